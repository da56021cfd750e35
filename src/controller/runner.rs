//! The runner: runs one reconcile per key at a time, at most `concurrency`
//! at once, each when its time comes (a delay queue, never a poll). A key
//! scheduled while its reconcile runs is run again once it finishes
//! ("dirty"), so no change is missed and none runs twice at once. A
//! reconcile that fails is retried with a backoff that doubles (1 s up to
//! 64 s); one that runs past the timeout is abandoned (every step of a
//! reconcile is safe to stop anywhere) and retried the same way; one that
//! panics is retried too, never left in flight for good. Each reconcile
//! runs in a tracing span `reconcile` naming its key.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Display;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use kube::runtime::scheduler::{ScheduleRequest, scheduler};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument as _;

/// Why a reconcile did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunError<E> {
    #[error("{0}")]
    Failed(E),
    #[error("reconcile did not finish within {0:?} (an API request hung?); retrying from a fresh read")]
    Timeout(Duration),
    #[error("reconcile panicked; retrying from a fresh read")]
    Panicked,
}

/// A reconcile that finished: its key and how it went (`Ok` with the next
/// instant it asked to run at, if any).
pub type Finished<K, E> = (K, Result<Option<Instant>, RunError<E>>);

type Reconcile<K, E> =
    Box<dyn Fn(K) -> Pin<Box<dyn Future<Output = Result<Option<Instant>, E>> + Send>> + Send>;

/// Runs reconciles (see the module's documentation).
pub struct Runner<K, E> {
    reconcile: Reconcile<K, E>,
    concurrency: usize,
    timeout: Duration,
    requests: mpsc::UnboundedSender<ScheduleRequest<K>>,
    queue: Pin<Box<dyn Stream<Item = K> + Send>>,
    in_flight: HashSet<K>,
    dirty: HashSet<K>,
    waiting: VecDeque<K>,
    failures: HashMap<K, u32>,
    tasks: JoinSet<Finished<K, E>>,
    /// Which key each task reconciles, for a task that panics (its result,
    /// which names the key, is lost with it).
    task_keys: HashMap<tokio::task::Id, K>,
}

/// The delay before retry `n` (1, 2, ...) of a failing key: 1 s, 2 s, ...,
/// then 64 s for good.
pub fn backoff(n: u32) -> Duration {
    Duration::from_millis(500 * 2u64.pow(n.clamp(1, 7)))
}

impl<K, E> Runner<K, E>
where
    K: Clone + Eq + Hash + Display + Send + Sync + Unpin + 'static,
    E: Send + 'static,
{
    pub fn new<F, Fut>(concurrency: usize, timeout: Duration, reconcile: F) -> Self
    where
        F: Fn(K) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Option<Instant>, E>> + Send + 'static,
    {
        let (requests, mut rx) = mpsc::unbounded_channel::<ScheduleRequest<K>>();
        let queue = scheduler(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)));
        Runner {
            reconcile: Box::new(move |k| Box::pin(reconcile(k))),
            concurrency: concurrency.max(1),
            timeout,
            requests,
            queue: Box::pin(queue),
            in_flight: HashSet::new(),
            dirty: HashSet::new(),
            waiting: VecDeque::new(),
            failures: HashMap::new(),
            tasks: JoinSet::new(),
            task_keys: HashMap::new(),
        }
    }

    /// Runs `k` at `at` (or at once if that has passed). Scheduling a key
    /// that is already scheduled keeps the earlier instant.
    pub fn schedule(&self, k: K, at: Instant) {
        let _ = self.requests.send(ScheduleRequest { message: k, run_at: at });
    }

    /// Keys running now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Waits for the next thing to happen: a key whose time came is started
    /// (or queued, or marked dirty; `None`), or a reconcile finished
    /// (`Some`, after its next run, retry or re-run is scheduled).
    /// Cancel-safe: nothing is lost when another branch of a `select!`
    /// wins.
    pub async fn step(&mut self) -> Option<Finished<K, E>> {
        loop {
            tokio::select! {
                Some(k) = self.queue.next() => {
                    self.due(k);
                    return None;
                }
                Some(done) = self.tasks.join_next_with_id() => {
                    if let Some(finished) = self.finished(done) {
                        return Some(finished);
                    }
                }
            }
        }
    }

    fn due(&mut self, k: K) {
        if self.in_flight.contains(&k) {
            self.dirty.insert(k);
        } else if self.in_flight.len() >= self.concurrency {
            if !self.waiting.contains(&k) {
                self.waiting.push_back(k);
            }
        } else {
            self.spawn(k);
        }
    }

    fn spawn(&mut self, k: K) {
        self.in_flight.insert(k.clone());
        let span = tracing::info_span!("reconcile", target = %k);
        let run = (self.reconcile)(k.clone());
        let limit = self.timeout;
        let key = k.clone();
        let handle = self.tasks.spawn(
            async move {
                let r = match tokio::time::timeout(limit, run).await {
                    Ok(r) => r.map_err(RunError::Failed),
                    Err(_) => Err(RunError::Timeout(limit)),
                };
                (key, r)
            }
            .instrument(span),
        );
        self.task_keys.insert(handle.id(), k);
    }

    fn finished(
        &mut self,
        done: Result<(tokio::task::Id, Finished<K, E>), tokio::task::JoinError>,
    ) -> Option<Finished<K, E>> {
        let (k, result) = match done {
            Ok((id, (k, result))) => {
                self.task_keys.remove(&id);
                (k, result)
            }
            Err(e) => {
                // A panic (from a dependency: dormant's own code returns
                // errors): retried like a failure. Every task is keyed.
                let k = self.task_keys.remove(&e.id())?;
                tracing::error!(target = %k, error = %e, "reconcile panicked");
                (k, Err(RunError::Panicked))
            }
        };
        self.in_flight.remove(&k);
        match &result {
            Ok(next) => {
                self.failures.remove(&k);
                if let Some(at) = next {
                    self.schedule(k.clone(), *at);
                }
            }
            Err(_) => {
                let n = self.failures.entry(k.clone()).or_default();
                *n += 1;
                let retry = Instant::now() + backoff(*n);
                self.schedule(k.clone(), retry);
            }
        }
        if self.dirty.remove(&k) {
            self.schedule(k.clone(), Instant::now());
        }
        self.start_waiting();
        Some((k, result))
    }

    fn start_waiting(&mut self) {
        while self.in_flight.len() < self.concurrency {
            let Some(next) = self.waiting.pop_front() else { break };
            if self.in_flight.contains(&next) {
                self.dirty.insert(next);
            } else {
                self.spawn(next);
            }
        }
    }

    /// Retries `k` has failed in a row.
    pub fn failures(&self, k: &K) -> u32 {
        self.failures.get(k).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// What each reconcile of a key does, and a log of when each started
    /// and ended.
    /// `("start" | "end", key, when)`.
    type Log = Arc<Mutex<Vec<(&'static str, u32, Duration)>>>;

    #[derive(Clone, Default)]
    struct World {
        log: Log,
        running: Arc<Mutex<(usize, usize)>>,
    }

    impl World {
        fn runner(
            &self,
            concurrency: usize,
            timeout: Duration,
            behave: impl Fn(u32, u32) -> Behave + Send + Sync + 'static,
        ) -> Runner<u32, String> {
            let (world, behave) = (self.clone(), Arc::new(behave));
            let start = Instant::now();
            let runs = Arc::new(Mutex::new(HashMap::<u32, u32>::new()));
            Runner::new(concurrency, timeout, move |k: u32| {
                let (world, behave, runs) = (world.clone(), behave.clone(), runs.clone());
                async move {
                    let n = {
                        let mut runs = runs.lock().unwrap();
                        let n = runs.entry(k).or_default();
                        *n += 1;
                        *n
                    };
                    world.log.lock().unwrap().push(("start", k, start.elapsed()));
                    {
                        let mut r = world.running.lock().unwrap();
                        r.0 += 1;
                        r.1 = r.1.max(r.0);
                    }
                    let b = behave(k, n);
                    tokio::time::sleep(b.takes).await;
                    world.running.lock().unwrap().0 -= 1;
                    world.log.lock().unwrap().push(("end", k, start.elapsed()));
                    if b.panics {
                        panic!("reconcile {k} panicked");
                    }
                    b.result
                }
            })
        }

        fn starts(&self, k: u32) -> Vec<Duration> {
            self.log
                .lock()
                .unwrap()
                .iter()
                .filter(|(e, key, _)| *e == "start" && *key == k)
                .map(|(_, _, t)| *t)
                .collect()
        }
    }

    struct Behave {
        takes: Duration,
        result: Result<Option<Instant>, String>,
        panics: bool,
    }

    fn ok(takes_ms: u64) -> Behave {
        Behave { takes: Duration::from_millis(takes_ms), result: Ok(None), panics: false }
    }

    /// Drives the runner for `d` of (paused) time, collecting what finished.
    async fn drive(r: &mut Runner<u32, String>, d: Duration) -> Vec<Finished<u32, String>> {
        let mut done = Vec::new();
        let until = Instant::now() + d;
        while let Ok(step) = tokio::time::timeout_at(until, r.step()).await {
            done.extend(step);
        }
        done
    }

    #[tokio::test(start_paused = true)]
    async fn no_more_than_the_cap_run_at_once_and_the_rest_wait_their_turn() {
        let w = World::default();
        let mut r = w.runner(3, Duration::from_secs(60), |_, _| ok(1000));
        for k in 0..10 {
            r.schedule(k, Instant::now());
        }
        let done = drive(&mut r, Duration::from_secs(10)).await;
        assert_eq!(done.len(), 10);
        assert!(done.iter().all(|(_, res)| res.is_ok()));
        assert_eq!(w.running.lock().unwrap().1, 3, "at most 3 at once");
        // Four rounds of a second each: 3 + 3 + 3 + 1.
        let last = (0..10).flat_map(|k| w.starts(k)).max().unwrap();
        assert_eq!(last.as_secs(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_scheduled_while_it_runs_runs_again_once_after_and_never_twice_at_once() {
        let w = World::default();
        let mut r = w.runner(4, Duration::from_secs(60), |_, _| ok(1000));
        r.schedule(7, Instant::now());
        // Let it start, then schedule it three more times while it runs.
        let mut done = drive(&mut r, Duration::from_millis(100)).await;
        for _ in 0..3 {
            r.schedule(7, Instant::now());
            done.extend(drive(&mut r, Duration::from_millis(100)).await);
        }
        done.extend(drive(&mut r, Duration::from_secs(5)).await);
        assert_eq!(w.starts(7).len(), 2, "one run, and one re-run for all the changes during it");
        assert_eq!(w.running.lock().unwrap().1, 1, "never two at once");
        assert!(w.starts(7)[1] >= Duration::from_secs(1), "the re-run waits for the first to end");
        assert_eq!(done.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_doubling_and_success_resets_it() {
        let w = World::default();
        // Fails five times, then succeeds; then fails once more.
        let mut r = w.runner(1, Duration::from_secs(60), |_, n| Behave {
            takes: Duration::ZERO,
            result: if n <= 5 || n == 7 { Err(format!("failure {n}")) } else { Ok(None) },
            panics: false,
        });
        r.schedule(1, Instant::now());
        let done = drive(&mut r, Duration::from_secs(60)).await;
        let starts = w.starts(1);
        let gaps: Vec<u64> = starts.windows(2).map(|p| (p[1] - p[0]).as_millis() as u64).collect();
        assert_eq!(gaps, [1000, 2000, 4000, 8000, 16000], "{starts:?}");
        assert_eq!(done.iter().filter(|(_, r)| r.is_err()).count(), 5);
        assert_eq!(r.failures(&1), 0, "a success resets the backoff");
        // The next failure starts from 1 s again.
        r.schedule(1, Instant::now());
        drive(&mut r, Duration::from_millis(10)).await;
        assert_eq!(r.failures(&1), 1);
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(7), Duration::from_secs(64));
        assert_eq!(backoff(30), Duration::from_secs(64), "the backoff stops growing");
    }

    #[tokio::test(start_paused = true)]
    async fn a_reconcile_that_panics_or_hangs_is_retried_not_left_in_flight() {
        let w = World::default();
        let mut r = w.runner(2, Duration::from_secs(30), |k, n| match (k, n) {
            (1, 1) => Behave { takes: Duration::ZERO, result: Ok(None), panics: true },
            (2, 1) => ok(3_600_000),
            _ => ok(0),
        });
        r.schedule(1, Instant::now());
        r.schedule(2, Instant::now());
        let done = drive(&mut r, Duration::from_secs(60)).await;
        let outcome =
            |k: u32| done.iter().filter(|(key, _)| *key == k).map(|(_, r)| r.clone()).collect::<Vec<_>>();
        assert_eq!(outcome(1), [Err(RunError::Panicked), Ok(None)]);
        assert_eq!(outcome(2), [Err(RunError::Timeout(Duration::from_secs(30))), Ok(None)]);
        assert_eq!(r.in_flight(), 0);
        // Retried after the first backoff (1 s), the hung one after its timeout.
        assert_eq!(w.starts(1)[1].as_millis(), 1000);
        assert_eq!(w.starts(2)[1].as_millis(), 31_000);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reconcile_runs_again_at_the_instant_it_asks_for() {
        let w = World::default();
        let mut r = w.runner(1, Duration::from_secs(30), |_, n| Behave {
            takes: Duration::ZERO,
            result: Ok((n == 1).then(|| Instant::now() + Duration::from_secs(42))),
            panics: false,
        });
        r.schedule(5, Instant::now());
        drive(&mut r, Duration::from_secs(100)).await;
        assert_eq!(w.starts(5).iter().map(|d| d.as_secs()).collect::<Vec<_>>(), [0, 42]);
    }
}
