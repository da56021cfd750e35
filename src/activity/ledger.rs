//! The activity ledger: the newest counted activity per target, in memory,
//! fed through a bounded queue (so a slow Kubernetes API never slows the
//! senders), flushed to the target's `last-activity` annotations at most
//! every flush interval per target, and the top sources of activity per
//! target ("who keeps it awake").

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::mpsc;

use super::Activity;
use crate::target::TargetRef;

/// How many distinct sources are counted per target.
const MAX_SOURCES: usize = 32;

#[derive(Debug, Clone)]
struct Entry {
    newest: Activity,
    /// The newest activity has not been written to the target yet.
    dirty: bool,
    /// Counted activities by source (`user (user agent)`).
    sources: HashMap<String, u64>,
    last_notified: Option<tokio::time::Instant>,
}

/// Shared, cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    tx: mpsc::Sender<(TargetRef, Activity)>,
    inner: Arc<Inner>,
}

struct Inner {
    entries: Mutex<HashMap<TargetRef, Entry>>,
    dropped: AtomicU64,
}

/// Consumes the queue; run it with [`LedgerWorker::run`].
pub struct LedgerWorker {
    rx: mpsc::Receiver<(TargetRef, Activity)>,
    inner: Arc<Inner>,
}

/// Writes flushed activity to the cluster.
pub trait Flush: Send + Sync + 'static {
    fn flush(
        &self,
        target: TargetRef,
        activity: Activity,
    ) -> impl std::future::Future<Output = Result<(), String>> + Send;
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
    pub fn record(&self, target: TargetRef, activity: Activity) -> bool {
        match self.tx.try_send((target, activity)) {
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
        self.entries().get(target).map(|e| e.newest.clone())
    }

    /// The `n` sources with the most counted activity for `target`.
    pub fn top_sources(&self, target: &TargetRef, n: usize) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self
            .entries()
            .get(target)
            .map(|e| e.sources.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v.truncate(n);
        v
    }

    /// Forgets a target that no longer exists.
    pub fn forget(&self, target: &TargetRef) {
        self.entries().remove(target);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    /// Applies one activity; returns true when the controller should look
    /// at the target (at most once a second per target).
    fn apply(&self, target: TargetRef, activity: Activity) -> bool {
        let mut entries = lock(&self.entries);
        let source = format!("{} ({})", activity.user, activity.user_agent);
        let now = tokio::time::Instant::now();
        let e = entries.entry(target).or_insert_with(|| Entry {
            newest: activity.clone(),
            dirty: true,
            sources: HashMap::new(),
            last_notified: None,
        });
        if activity.at >= e.newest.at {
            e.newest = activity;
            e.dirty = true;
        }
        if e.sources.len() < MAX_SOURCES || e.sources.contains_key(&source) {
            *e.sources.entry(source).or_default() += 1;
        }
        let notify = e.last_notified.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1));
        if notify {
            e.last_notified = Some(now);
        }
        notify
    }

    fn take_dirty(&self) -> Vec<(TargetRef, Activity)> {
        let mut entries = lock(&self.entries);
        entries
            .iter_mut()
            .filter(|(_, e)| e.dirty)
            .map(|(t, e)| {
                e.dirty = false;
                (t.clone(), e.newest.clone())
            })
            .collect()
    }

    fn mark_dirty(&self, target: &TargetRef) {
        if let Some(e) = lock(&self.entries).get_mut(target) {
            e.dirty = true;
        }
    }
}

impl LedgerWorker {
    /// Consumes activities until every [`Ledger`] handle is dropped; calls
    /// `notify` for targets the controller should look at, and flushes the
    /// newest activity of each target at most every `flush_every`.
    pub async fn run<F: Flush>(
        mut self,
        notify: impl Fn(TargetRef) + Send,
        flusher: F,
        flush_every: Duration,
    ) {
        // The first flush comes one interval after start, not at once.
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + flush_every, flush_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                item = self.rx.recv() => match item {
                    Some((target, activity)) => {
                        if self.inner.apply(target.clone(), activity) {
                            notify(target);
                        }
                    }
                    None => break,
                },
                _ = tick.tick() => {
                    for (target, activity) in self.inner.take_dirty() {
                        if let Err(e) = flusher.flush(target.clone(), activity).await {
                            tracing::warn!(%target, error = %e, "failed to write last activity; will retry");
                            self.inner.mark_dirty(&target);
                        }
                    }
                }
            }
        }
        for (target, activity) in self.inner.take_dirty() {
            let _ = flusher.flush(target, activity).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::activity::Source;
    use chrono::{TimeZone, Utc};

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
        }
    }

    struct Recorder(Arc<Mutex<Vec<(TargetRef, Activity)>>>);

    impl Flush for Recorder {
        async fn flush(&self, target: TargetRef, activity: Activity) -> Result<(), String> {
            lock(&self.0).push((target, activity));
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn keeps_the_newest_activity_and_flushes_once_per_interval() {
        let (ledger, worker) = Ledger::new(100);
        let flushed = Arc::new(Mutex::new(Vec::new()));
        let t = TargetRef::namespace("team-a");
        let task = tokio::spawn(worker.run(|_| {}, Recorder(flushed.clone()), Duration::from_secs(5)));
        for (secs, user) in [(10, "alice"), (30, "bob"), (20, "carol"), (30, "bob")] {
            assert!(ledger.record(t.clone(), activity(secs, user)));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(ledger.newest(&t).unwrap().user, "bob");
        assert_eq!(
            ledger.top_sources(&t, 2),
            vec![("bob (kubectl/v1.37.2)".to_string(), 2), ("alice (kubectl/v1.37.2)".to_string(), 1)]
        );
        tokio::time::sleep(Duration::from_secs(6)).await;
        tokio::time::sleep(Duration::from_secs(6)).await;
        let f = lock(&flushed).clone();
        assert_eq!(f.len(), 1, "coalesced into one write: {f:?}");
        assert_eq!(f[0].1.user, "bob");
        drop(ledger);
        task.await.unwrap();
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
