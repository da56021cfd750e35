//! The activity ledger: the newest counted activity per target, in memory,
//! fed through a bounded queue (so a slow Kubernetes API never slows the
//! senders), flushed to the target's `last-activity` annotations at most
//! every flush interval per target, together with how often each source
//! used it since the last flush (added to the target's `activity-sources`:
//! "who keeps it awake").

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::mpsc;

use super::Activity;
use crate::target::TargetRef;

/// How many distinct sources are counted per target (between two flushes
/// here; in the metric, for good).
pub const MAX_SOURCES: usize = 32;

/// Counted activities by source (`user (agent)`).
pub type SourceCounts = HashMap<String, u64>;

#[derive(Debug, Clone)]
struct Entry {
    newest: Arc<Activity>,
    /// The newest activity has not been written to the target yet.
    dirty: bool,
    /// Counted activities by source since the last flush.
    unflushed: SourceCounts,
    last_notified: Option<tokio::time::Instant>,
}

/// A queued activity, with its source (`user (agent)`) already formatted.
/// Shared with the sender, which may still need it (the proxy, to wake).
type Queued = (TargetRef, Arc<Activity>, String);

/// Shared, cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    tx: mpsc::Sender<Queued>,
    inner: Arc<Inner>,
}

struct Inner {
    entries: Mutex<HashMap<TargetRef, Entry>>,
    dropped: AtomicU64,
}

/// Consumes the queue; run it with [`LedgerWorker::run`].
pub struct LedgerWorker {
    rx: mpsc::Receiver<Queued>,
    inner: Arc<Inner>,
}

/// Writes flushed activity to the cluster.
pub trait Flush: Send + Sync + 'static {
    fn flush(
        &self,
        target: TargetRef,
        activity: Activity,
        sources: SourceCounts,
    ) -> impl std::future::Future<Output = Result<(), crate::annotate::Error>> + Send;
}

/// Writes nothing (benchmarks and tests of what comes before a flush).
pub struct NoFlush;

impl Flush for NoFlush {
    async fn flush(&self, _: TargetRef, _: Activity, _: SourceCounts) -> Result<(), crate::annotate::Error> {
        Ok(())
    }
}

impl Ledger {
    /// A ledger whose queue holds at most `capacity` activities.
    pub fn new(capacity: usize) -> (Ledger, LedgerWorker) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let inner = Arc::new(Inner { entries: Mutex::new(HashMap::new()), dropped: AtomicU64::new(0) });
        (Ledger { tx, inner: inner.clone() }, LedgerWorker { rx, inner })
    }

    fn entries(&self) -> MutexGuard<'_, HashMap<TargetRef, Entry>> {
        lock(&self.inner.entries)
    }

    /// Queues a counted activity. Never waits: when the queue is full the
    /// activity is dropped and counted, and false is returned.
    pub fn record(&self, target: TargetRef, activity: impl Into<Arc<Activity>>) -> bool {
        let activity = activity.into();
        let source = activity.who();
        self.record_from(target, activity, source)
    }

    /// [`Ledger::record`] with the activity's source (`who()`) at hand.
    pub fn record_from(&self, target: TargetRef, activity: impl Into<Arc<Activity>>, source: String) -> bool {
        match self.tx.try_send((target, activity.into(), source)) {
            Ok(()) => true,
            Err(_) => {
                self.inner.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Activities dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// The newest counted activity of `target` this replica knows of.
    pub fn newest(&self, target: &TargetRef) -> Option<Activity> {
        self.entries().get(target).map(|e| Activity::clone(&e.newest))
    }

    /// Forgets a target that no longer exists.
    pub fn forget(&self, target: &TargetRef) {
        self.entries().remove(target);
    }

    /// Keeps the entries of the targets `keep` says yes to.
    pub fn retain(&self, keep: impl Fn(&TargetRef) -> bool) {
        self.entries().retain(|t, _| keep(t));
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    /// Applies one activity; returns true when the controller should look
    /// at the target (at most once a second per target).
    fn apply(&self, target: &TargetRef, activity: Arc<Activity>, source: String) -> bool {
        let mut entries = lock(&self.entries);
        let now = tokio::time::Instant::now();
        // Looked up by reference: the target is copied only the first time.
        if !entries.contains_key(target) {
            let e = Entry {
                newest: activity.clone(),
                dirty: true,
                unflushed: HashMap::new(),
                last_notified: None,
            };
            entries.insert(target.clone(), e);
        }
        let Some(e) = entries.get_mut(target) else { return false };
        if activity.at >= e.newest.at {
            e.newest = activity;
            e.dirty = true;
        }
        if e.unflushed.len() < MAX_SOURCES || e.unflushed.contains_key(&source) {
            *e.unflushed.entry(source).or_default() += 1;
        }
        let notify = e.last_notified.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1));
        if notify {
            e.last_notified = Some(now);
        }
        notify
    }

    fn take_dirty(&self) -> Vec<(TargetRef, Activity, SourceCounts)> {
        let mut entries = lock(&self.entries);
        entries
            .iter_mut()
            .filter(|(_, e)| e.dirty)
            .map(|(t, e)| {
                e.dirty = false;
                (t.clone(), Activity::clone(&e.newest), std::mem::take(&mut e.unflushed))
            })
            .collect()
    }

    /// A flush failed: its counts go back, to be written next time.
    fn mark_dirty(&self, target: &TargetRef, sources: SourceCounts) {
        if let Some(e) = lock(&self.entries).get_mut(target) {
            e.dirty = true;
            for (k, n) in sources {
                *e.unflushed.entry(k).or_default() += n;
            }
        }
    }
}

impl LedgerWorker {
    /// Consumes activities until every [`Ledger`] handle is dropped or
    /// `stop` completes; calls `notify` for targets the controller should
    /// look at, and flushes the newest activity of each target at most every
    /// `flush_every`. A flush runs while activities keep being taken in
    /// (hundreds of targets, written at the client's rate limit, would
    /// otherwise fill the queue and drop activity). On the way out, what is
    /// queued is taken in and everything unwritten is flushed once more:
    /// stop the agent with a time limit around this, not by aborting it,
    /// or a restart loses up to an interval of activity no other replica
    /// may have seen.
    pub async fn run<F: Flush>(
        mut self,
        notify: impl Fn(TargetRef) + Send,
        flusher: F,
        flush_every: Duration,
        stop: impl std::future::Future<Output = ()> + Send,
    ) {
        use futures::FutureExt as _;
        use futures::future::{Fuse, FusedFuture as _};
        // The first flush comes one interval after start, not at once.
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + flush_every, flush_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let inner = self.inner.clone();
        let mut flushing = std::pin::pin!(Fuse::terminated());
        let mut stop = std::pin::pin!(stop);
        loop {
            tokio::select! {
                item = self.rx.recv() => match item {
                    Some((target, activity, source)) => {
                        if inner.apply(&target, activity, source) {
                            notify(target);
                        }
                    }
                    None => break,
                },
                () = flushing.as_mut(), if !flushing.is_terminated() => {}
                _ = tick.tick(), if flushing.is_terminated() => {
                    let batch = inner.take_dirty();
                    if !batch.is_empty() {
                        flushing.set(flush_batch(&inner, &flusher, batch).fuse());
                    }
                }
                () = &mut stop => break,
            }
        }
        if !flushing.is_terminated() {
            flushing.await;
        }
        while let Ok((target, activity, source)) = self.rx.try_recv() {
            inner.apply(&target, activity, source);
        }
        flush_batch(&inner, &flusher, inner.take_dirty()).await;
    }
}

/// Writes each target's newest activity; a failed write goes back to be
/// retried with the next batch.
async fn flush_batch<F: Flush>(inner: &Inner, flusher: &F, batch: Vec<(TargetRef, Activity, SourceCounts)>) {
    for (target, activity, sources) in batch {
        if let Err(e) = flusher.flush(target.clone(), activity, sources.clone()).await {
            tracing::warn!(%target, error = %crate::error::Chain(&e), "failed to write last activity; will retry");
            inner.mark_dirty(&target, sources);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::activity::Source;
    use chrono::{TimeZone, Utc};
    use std::collections::BTreeMap;

    fn activity(secs: i64, user: &str) -> Activity {
        Activity {
            at: Utc.timestamp_opt(1_800_000_000 + secs, 0).unwrap(),
            source: Source::Audit,
            user: user.into(),
            groups: vec![],
            user_agent: "kubectl/v1.37.2".into(),
            verb: "get".into(),
            resource: None,
            path: "/api".into(),
            code: None,
            in_vcluster: false,
        }
    }

    /// Keeps what it is given to write; each write takes `.1` (a slow API
    /// server, or many targets written at the client's rate limit).
    struct Recorder(Arc<Mutex<Vec<(TargetRef, Activity, SourceCounts)>>>, Duration);

    impl Flush for Recorder {
        async fn flush(
            &self,
            target: TargetRef,
            activity: Activity,
            sources: SourceCounts,
        ) -> Result<(), crate::annotate::Error> {
            tokio::time::sleep(self.1).await;
            lock(&self.0).push((target, activity, sources));
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn keeps_the_newest_activity_and_flushes_once_per_interval() {
        let (ledger, worker) = Ledger::new(100);
        let flushed = Arc::new(Mutex::new(Vec::new()));
        let t = TargetRef::namespace("team-a");
        let task = tokio::spawn(worker.run(
            |_| {},
            Recorder(flushed.clone(), Duration::ZERO),
            Duration::from_secs(5),
            std::future::pending(),
        ));
        for (secs, user) in [(10, "alice"), (30, "bob"), (20, "carol"), (30, "bob")] {
            assert!(ledger.record(t.clone(), activity(secs, user)));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(ledger.newest(&t).unwrap().user, "bob");
        tokio::time::sleep(Duration::from_secs(6)).await;
        tokio::time::sleep(Duration::from_secs(6)).await;
        let f = lock(&flushed).clone();
        assert_eq!(f.len(), 1, "coalesced into one write: {f:?}");
        assert_eq!(f[0].1.user, "bob");
        let counts: BTreeMap<_, _> = f[0].2.clone().into_iter().collect();
        assert_eq!(
            counts,
            BTreeMap::from([
                ("alice (kubectl)".to_string(), 1),
                ("bob (kubectl)".to_string(), 2),
                ("carol (kubectl)".to_string(), 1)
            ]),
            "each source counted once per use, then the counts start again"
        );
        assert!(ledger.record(t.clone(), activity(40, "alice")));
        tokio::time::sleep(Duration::from_secs(6)).await;
        let f = lock(&flushed).clone();
        assert_eq!(f.len(), 2);
        assert_eq!(f[1].2, HashMap::from([("alice (kubectl)".to_string(), 1)]));
        drop(ledger);
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn activity_keeps_coming_in_while_a_slow_flush_runs() {
        let (ledger, worker) = Ledger::new(2);
        let flushed = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn(worker.run(
            |_| {},
            Recorder(flushed.clone(), Duration::from_secs(60)),
            Duration::from_secs(5),
            std::future::pending(),
        ));
        let t = TargetRef::namespace("team-a");
        assert!(ledger.record(t.clone(), activity(1, "alice")));
        // The first flush starts at 5 s and takes a minute; one activity a
        // second arrives all along, into a queue of two.
        for i in 0..30 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert!(ledger.record(t.clone(), activity(2 + i, "bob")), "dropped the activity of second {i}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(ledger.dropped(), 0);
        assert_eq!(ledger.newest(&t).unwrap().at, activity(31, "bob").at);
        drop(ledger);
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn stopping_writes_what_was_not_written_yet() {
        let (ledger, worker) = Ledger::new(100);
        let flushed = Arc::new(Mutex::new(Vec::new()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(worker.run(
            |_| {},
            Recorder(flushed.clone(), Duration::ZERO),
            Duration::from_secs(3600),
            async {
                let _ = stopped.await;
            },
        ));
        let t = TargetRef::namespace("team-a");
        assert!(ledger.record(t.clone(), activity(10, "alice")));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(lock(&flushed).is_empty(), "flushed before the interval");
        // Still queued when the stop comes: taken in and written too.
        assert!(ledger.record(t.clone(), activity(20, "bob")));
        stop.send(()).unwrap();
        task.await.unwrap();
        let f = lock(&flushed).clone();
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].1.user, "bob");
        assert_eq!(f[0].2.len(), 2, "both sources counted: {f:?}");
        // The ledger handle is still alive: the stop alone ended the worker.
        drop(ledger);
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let (ledger, _worker) = Ledger::new(2);
        let t = TargetRef::namespace("x");
        assert!(ledger.record(t.clone(), activity(1, "a")));
        assert!(ledger.record(t.clone(), activity(2, "a")));
        assert!(!ledger.record(t.clone(), activity(3, "a")));
        assert_eq!(ledger.dropped(), 1);
    }
}
