//! How much the webhook holds in memory at once: a budget of bytes for the
//! batches being read and decoded, and of batches read at once. A batch
//! is charged what it may cost before its body is read (see
//! [`Budget::hold`]), waits a short while for room, and is answered `503`
//! with `Retry-After` if none comes: kube-apiserver's webhook retries any
//! error (client-go honours `Retry-After` up to ten times, then the
//! webhook backs off and tries again, five rounds in all), so a batch
//! turned away here is sent again, not lost.
//!
//! When room frees up the smallest waiting batch goes first: a bomb
//! charged the whole body limit does not hold up a real batch, charged
//! its `Content-Length`, that arrived behind it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::oneshot;

/// The webhook's budget (see the module documentation).
pub struct Budget {
    state: Mutex<State>,
    /// How long a batch may wait for room.
    wait: Duration,
    total_bytes: usize,
    /// Bytes held now (a metric).
    held: Gauge,
}

struct State {
    free_bytes: usize,
    free_requests: usize,
    /// Batches waiting for room, smallest first (then oldest).
    waiting: BTreeMap<(usize, u64), oneshot::Sender<()>>,
    next: u64,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Budget {
    /// `bytes` held at once by at most `requests` batches; a batch waits
    /// at most `wait` for its share.
    pub fn new(bytes: usize, requests: usize, wait: Duration, held: Gauge) -> Arc<Budget> {
        Arc::new(Budget {
            state: Mutex::new(State {
                free_bytes: bytes,
                free_requests: requests,
                waiting: BTreeMap::new(),
                next: 0,
            }),
            wait,
            total_bytes: bytes,
            held,
        })
    }

    /// Holds `bytes` (at most the whole budget) and one request's room
    /// until the returned guard is dropped; `None` when there was no room
    /// within the wait.
    pub async fn hold(self: &Arc<Self>, bytes: usize) -> Option<Held> {
        let bytes = bytes.min(self.total_bytes);
        let (key, granted) = {
            let mut s = lock(&self.state);
            if s.free_requests > 0
                && s.free_bytes >= bytes
                && s.waiting.keys().next().is_none_or(|k| k.0 > bytes)
            {
                s.free_bytes -= bytes;
                s.free_requests -= 1;
                self.held.set((self.total_bytes - s.free_bytes) as i64);
                return Some(Held { budget: self.clone(), bytes });
            }
            let key = (bytes, s.next);
            s.next += 1;
            let (tx, rx) = oneshot::channel();
            s.waiting.insert(key, tx);
            (key, rx)
        };
        let mut granted = granted;
        match tokio::time::timeout(self.wait, &mut granted).await {
            Ok(Ok(())) => return Some(Held { budget: self.clone(), bytes }),
            Ok(Err(_)) => return None,
            Err(_) => {}
        }
        // Out of time; granted meanwhile if no longer waiting.
        let still_waiting = lock(&self.state).waiting.remove(&key).is_some();
        if !still_waiting && granted.try_recv().is_ok() {
            return Some(Held { budget: self.clone(), bytes });
        }
        None
    }

    fn release(&self, bytes: usize) {
        let mut s = lock(&self.state);
        s.free_bytes += bytes;
        s.free_requests += 1;
        // The smallest waiting batches that fit, in order.
        while s.free_requests > 0 {
            let Some(key) = s.waiting.keys().next().copied() else { break };
            let want = key.0;
            if want > s.free_bytes {
                break;
            }
            let Some(tx) = s.waiting.remove(&key) else { break };
            if tx.send(()).is_ok() {
                s.free_bytes -= want;
                s.free_requests -= 1;
            }
        }
        self.held.set((self.total_bytes - s.free_bytes) as i64);
    }
}

/// A batch's share of the budget, given back when dropped.
pub struct Held {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_batch_waits_for_room_then_is_turned_away_and_the_smallest_goes_first() {
        let budget = Budget::new(100, 3, Duration::from_secs(1), Gauge::default());
        let bomb = budget.hold(100).await.expect("room for one");
        assert_eq!(budget.held.get(), 100);
        // No room: a second bomb waits, then a small batch behind it.
        let second_bomb = tokio::spawn({
            let b = budget.clone();
            async move { b.hold(100).await.is_some() }
        });
        tokio::task::yield_now().await;
        let small = tokio::spawn({
            let b = budget.clone();
            async move { b.hold(10).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(bomb);
        // The small batch came second but goes first; the second bomb no
        // longer fits and is turned away after its wait.
        let small = small.await.unwrap().expect("the small batch got room");
        assert!(!second_bomb.await.unwrap(), "the second bomb should have been turned away");
        assert_eq!(budget.held.get(), 10);
        drop(small);
        assert_eq!(budget.held.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn batches_at_once_are_bounded_whatever_their_size() {
        let budget = Budget::new(1000, 2, Duration::from_millis(500), Gauge::default());
        let a = budget.hold(1).await.unwrap();
        let _b = budget.hold(1).await.unwrap();
        assert!(budget.hold(1).await.is_none(), "a third batch at once");
        drop(a);
        assert!(budget.hold(1).await.is_some());
    }
}
