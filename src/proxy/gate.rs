//! The wake gate: "buffer + fail fast". Requests for a target that is not
//! ready wait in a bounded queue; the first one starts the wake (one per
//! target however many wait); when the wake completes every waiter is
//! released in arrival order; a waiter gives up after its timeout, and a
//! full queue refuses at once. Requests whose caller nothing could prove
//! ([`Class::Unverified`]) wait in a share of their own, so that throwaway
//! credentials cannot fill the queue real users wait in.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::target::TargetRef;

/// Why a request did not get through the gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateError<E> {
    /// The queue for this target is full.
    Overloaded { waiting: usize },
    /// The target was not ready within the timeout.
    Timeout(Duration),
    /// The wake itself failed.
    WakeFailed(E),
    /// The wake ended without an outcome (its task was cancelled).
    Abandoned,
}

/// One wake of one target: waiters queue on the semaphore (FIFO) and are
/// all released, in order, when the outcome is known.
struct Wake<E> {
    released: Semaphore,
    outcome: OnceLock<Result<(), E>>,
}

struct TargetGate<E> {
    /// Waiting, by class.
    waiting: [AtomicUsize; 2],
    current: Mutex<Option<Arc<Wake<E>>>>,
}

impl<E> Default for TargetGate<E> {
    fn default() -> Self {
        TargetGate { waiting: [AtomicUsize::new(0), AtomicUsize::new(0)], current: Mutex::new(None) }
    }
}

/// Who waits: a proven caller, or one nothing could prove.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Proven = 0,
    Unverified = 1,
}

/// Decrements the waiting count however the wait ends.
struct Waiting<'a>(&'a AtomicUsize, &'a prometheus_client::metrics::gauge::Gauge);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
        self.1.dec();
    }
}

/// The gate of every target; `E` is what a failed wake says.
pub struct Gate<E> {
    targets: Mutex<HashMap<TargetRef, Arc<TargetGate<E>>>>,
    /// Per target and class.
    max_waiting: [usize; 2],
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl<E: Clone + Send + Sync + 'static> Gate<E> {
    /// `max_waiting` proven requests per target, and a tenth of that (at
    /// least one) unverified ones; `gauge` counts waiters across targets.
    pub fn new(max_waiting: usize, gauge: prometheus_client::metrics::gauge::Gauge) -> Self {
        let max = max_waiting.max(1);
        Gate { targets: Mutex::new(HashMap::new()), max_waiting: [max, (max / 10).max(1)], gauge }
    }

    fn target(&self, t: &TargetRef) -> Arc<TargetGate<E>> {
        self.targets.lock().unwrap_or_else(|e| e.into_inner()).entry(t.clone()).or_default().clone()
    }

    /// Requests currently waiting for `t`.
    pub fn waiting(&self, t: &TargetRef) -> usize {
        self.target(t).waiting.iter().map(|w| w.load(Ordering::Acquire)).sum()
    }

    /// A wake of `t` is under way.
    pub fn waking(&self, t: &TargetRef) -> bool {
        let Some(tg) = self.targets.lock().unwrap_or_else(|e| e.into_inner()).get(t).cloned() else {
            return false;
        };
        tg.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|w| w.outcome.get().is_none())
    }

    /// Waits until `t` is ready, starting `wake` if no wake is under way.
    /// `wake` resolves when the target is ready (or failed); it runs on its
    /// own task, so a waiter that gives up does not cancel it.
    pub async fn wait<F, Fut>(
        &self,
        t: &TargetRef,
        class: Class,
        timeout: Duration,
        wake: F,
    ) -> Result<(), GateError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
    {
        let tg = self.target(t);
        let waiting = &tg.waiting[class as usize];
        let before = waiting.fetch_add(1, Ordering::AcqRel);
        self.gauge.inc();
        let _waiting = Waiting(waiting, &self.gauge);
        if before >= self.max_waiting[class as usize] {
            return Err(GateError::Overloaded { waiting: before });
        }
        let current = {
            let mut cur = tg.current.lock().unwrap_or_else(|e| e.into_inner());
            match cur.as_ref() {
                Some(w) if w.outcome.get().is_none() => w.clone(),
                _ => {
                    let w = Arc::new(Wake { released: Semaphore::new(0), outcome: OnceLock::new() });
                    *cur = Some(w.clone());
                    let fut = wake();
                    let (w2, tg2) = (w.clone(), tg.clone());
                    tokio::spawn(async move {
                        let outcome = fut.await;
                        let _ = w2.outcome.set(outcome);
                        // Enough permits for every waiter there could be.
                        w2.released.add_permits(Semaphore::MAX_PERMITS / 2);
                        let mut cur = tg2.current.lock().unwrap_or_else(|e| e.into_inner());
                        if cur.as_ref().is_some_and(|c| Arc::ptr_eq(c, &w2)) {
                            *cur = None;
                        }
                    });
                    w
                }
            }
        };
        match tokio::time::timeout(timeout, current.released.acquire()).await {
            Err(_) => Err(GateError::Timeout(timeout)),
            Ok(Err(_)) => Err(GateError::Abandoned),
            Ok(Ok(_permit)) => match current.outcome.get() {
                Some(Ok(())) => Ok(()),
                Some(Err(e)) => Err(GateError::WakeFailed(e.clone())),
                None => Err(GateError::Abandoned),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    fn gate(max: usize) -> Arc<Gate<String>> {
        Arc::new(Gate::new(max, Default::default()))
    }

    #[tokio::test(start_paused = true)]
    async fn many_waiters_one_wake_released_in_order() {
        let g = gate(1000);
        let t = TargetRef::vcluster("ns", "vc");
        let wakes = Arc::new(AtomicU32::new(0));
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..200 {
            let (g, t, wakes, order) = (g.clone(), t.clone(), wakes.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let r = g
                    .wait(&t, Class::Proven, Duration::from_secs(60), || {
                        wakes.fetch_add(1, Ordering::SeqCst);
                        async {
                            tokio::time::sleep(Duration::from_secs(3)).await;
                            Ok(())
                        }
                    })
                    .await;
                order.lock().unwrap().push(i);
                r
            }));
            tokio::task::yield_now().await;
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), Ok(()));
        }
        assert_eq!(wakes.load(Ordering::SeqCst), 1);
        let order = order.lock().unwrap().clone();
        assert_eq!(order, (0..200).collect::<Vec<_>>());
        assert_eq!(g.waiting(&t), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_times_out_but_the_wake_goes_on() {
        let g = gate(10);
        let t = TargetRef::vcluster("ns", "vc");
        let r = g
            .wait(&t, Class::Proven, Duration::from_secs(2), || async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok(())
            })
            .await;
        assert_eq!(r, Err(GateError::Timeout(Duration::from_secs(2))));
        // A later waiter joins the same wake rather than starting another.
        let r = g
            .wait(&t, Class::Proven, Duration::from_secs(10), || async { Err("second wake".to_string()) })
            .await;
        assert_eq!(r, Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_refuses_at_once() {
        let g = gate(2);
        let t = TargetRef::vcluster("ns", "vc");
        let slow = || async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok(())
        };
        let (g1, g2, t1, t2) = (g.clone(), g.clone(), t.clone(), t.clone());
        let a = tokio::spawn(async move { g1.wait(&t1, Class::Proven, Duration::from_secs(10), slow).await });
        let b = tokio::spawn(async move { g2.wait(&t2, Class::Proven, Duration::from_secs(10), slow).await });
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        assert_eq!(
            g.wait(&t, Class::Proven, Duration::from_secs(10), slow).await,
            Err(GateError::Overloaded { waiting: 2 })
        );
        assert_eq!(a.await.unwrap(), Ok(()));
        assert_eq!(b.await.unwrap(), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_wake_fails_its_waiters_and_the_next_request_tries_again() {
        let g = gate(10);
        let t = TargetRef::vcluster("ns", "vc");
        let r = g.wait(&t, Class::Proven, Duration::from_secs(10), || async { Err("no".to_string()) }).await;
        assert_eq!(r, Err(GateError::WakeFailed("no".into())));
        let r = g.wait(&t, Class::Proven, Duration::from_secs(10), || async { Ok(()) }).await;
        assert_eq!(r, Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn unverified_requests_cannot_fill_the_queue_proven_ones_wait_in() {
        let g = gate(20);
        let t = TargetRef::vcluster("ns", "vc");
        let slow = || async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok(())
        };
        let mut tasks = Vec::new();
        for _ in 0..2 {
            let (g, t) = (g.clone(), t.clone());
            tasks.push(tokio::spawn(async move {
                g.wait(&t, Class::Unverified, Duration::from_secs(10), slow).await
            }));
        }
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        // Their share (a tenth of 20) is full...
        assert_eq!(
            g.wait(&t, Class::Unverified, Duration::from_secs(10), slow).await,
            Err(GateError::Overloaded { waiting: 2 })
        );
        // ...and a proven request still waits and gets through.
        assert_eq!(g.wait(&t, Class::Proven, Duration::from_secs(10), slow).await, Ok(()));
        for task in tasks {
            assert_eq!(task.await.unwrap(), Ok(()));
        }
    }
}
