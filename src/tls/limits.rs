//! What every listener bounds, so that no client can exhaust the agent:
//! how many connections it holds, how long a TLS handshake and an HTTP/1.1
//! request head may take, how long a connection may stay open with no
//! request in flight, and how many streams an HTTP/2 connection may carry.
//!
//! At the cap a new connection is not refused: the connection that has
//! been idle (no request in flight) the longest is closed to make room.
//! Connections held open and idle are cheap to make, and HTTP/2 PINGs
//! alone used to keep them for ever; were they refused instead, a few
//! thousand of them would lock every real user out. Only when every
//! connection is busy with a request is a new one closed at once.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

// tokio's clock: the same as the system's, and paused in tests.
use tokio::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

/// One listener's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections held at once, those still in their TLS handshake
    /// included.
    pub max_connections: usize,
    /// How long a TLS handshake may take.
    pub handshake_timeout: Duration,
    /// How long an HTTP/1.1 client has to send a request head once the
    /// connection is ready for one (so between keep-alive requests too).
    pub header_read_timeout: Duration,
    /// How long a connection may stay open with no request in flight
    /// (HTTP/2 PINGs do not count).
    pub idle_timeout: Duration,
    /// Streams an HTTP/2 connection may have open at once.
    pub max_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(90),
            max_streams: 100,
        }
    }
}

/// What a listener reports about its connections (metric handles, shared
/// with the registry they are registered in).
#[derive(Clone, Default)]
pub struct Counts {
    /// Connections held now.
    pub open: Gauge,
    /// Idle connections closed to make room for a new one.
    pub evicted: Counter,
    /// New connections closed at once: the cap was reached and every
    /// connection had a request in flight.
    pub refused: Counter,
}

/// The connections one listener holds.
pub struct Connections {
    limits: Limits,
    epoch: Instant,
    slots: Mutex<Slots>,
    counts: Counts,
}

#[derive(Default)]
struct Slots {
    live: Vec<Option<Arc<Slot>>>,
    free: Vec<usize>,
    open: usize,
}

/// One connection as the registry sees it.
struct Slot {
    index: usize,
    epoch: Instant,
    in_flight: AtomicUsize,
    /// When a request last started or ended (or the connection was
    /// accepted), in milliseconds since `epoch`.
    active: AtomicU64,
    /// Chosen to make room: not chosen again.
    evicted: AtomicBool,
    close: tokio::sync::Notify,
}

impl Slot {
    fn stamp(&self) {
        self.active.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Connections {
    pub fn new(limits: Limits, counts: Counts) -> Arc<Connections> {
        Arc::new(Connections { limits, epoch: Instant::now(), slots: Mutex::default(), counts })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Connections held now.
    pub fn open(&self) -> usize {
        lock(&self.slots).open
    }

    /// Takes a connection just accepted. At the cap, the connection idle
    /// the longest is told to close (it goes at once) and this one is
    /// taken; `None` when every connection has a request in flight: the
    /// caller closes the new one.
    pub fn admit(self: &Arc<Self>) -> Option<Admitted> {
        let mut slots = lock(&self.slots);
        if slots.open >= self.limits.max_connections && !self.evict(&slots, Duration::ZERO) {
            self.counts.refused.inc();
            return None;
        }
        let index = slots.free.pop().unwrap_or(slots.live.len());
        let slot = Arc::new(Slot {
            index,
            epoch: self.epoch,
            in_flight: AtomicUsize::new(0),
            active: AtomicU64::new(0),
            evicted: AtomicBool::new(false),
            close: tokio::sync::Notify::new(),
        });
        slot.stamp();
        match slots.live.get_mut(index) {
            Some(s) => *s = Some(slot.clone()),
            None => slots.live.push(Some(slot.clone())),
        }
        slots.open += 1;
        self.counts.open.set(slots.open as i64);
        Some(Admitted { slot, connections: self.clone() })
    }

    /// Tells the connection idle the longest to close, to free the file
    /// descriptor it holds when accepting fails for want of one. Only a
    /// connection idle for at least the handshake timeout is taken: one
    /// that has just arrived has had no chance to speak (and one still in
    /// its handshake frees itself by then), so closing it would only trade
    /// one waiting client for the next, over and over, when what uses up
    /// the descriptors is not the connections. False when there is none.
    pub fn evict_for_descriptor(&self) -> bool {
        let slots = lock(&self.slots);
        self.evict(&slots, self.limits.handshake_timeout)
    }

    /// Closes the connection idle the longest, if it has been idle at
    /// least `min_idle`.
    fn evict(&self, slots: &Slots, min_idle: Duration) -> bool {
        let now = self.epoch.elapsed().as_millis() as u64;
        let victim = slots
            .live
            .iter()
            .flatten()
            .filter(|s| s.idle() && !s.evicted.load(Ordering::Relaxed))
            .min_by_key(|s| s.active.load(Ordering::Relaxed))
            .filter(|s| now.saturating_sub(s.active.load(Ordering::Relaxed)) >= min_idle.as_millis() as u64);
        let Some(victim) = victim else { return false };
        victim.evicted.store(true, Ordering::Relaxed);
        victim.close.notify_one();
        self.counts.evicted.inc();
        true
    }
}

/// A connection the listener holds; dropped when it ends.
pub struct Admitted {
    slot: Arc<Slot>,
    connections: Arc<Connections>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut slots = lock(&self.connections.slots);
        if let Some(s) = slots.live.get_mut(self.slot.index) {
            *s = None;
        }
        slots.free.push(self.slot.index);
        slots.open -= 1;
        self.connections.counts.open.set(slots.open as i64);
    }
}

/// Why a connection is to close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closing {
    /// Chosen to make room for a new connection.
    Evicted,
    /// No request in flight for the idle timeout.
    Idle,
}

impl Admitted {
    pub fn limits(&self) -> &Limits {
        &self.connections.limits
    }

    /// Counts requests on this connection (see [`Tracker::start`]).
    pub fn tracker(&self) -> Tracker {
        Tracker(self.slot.clone())
    }

    /// No request in flight.
    pub fn idle(&self) -> bool {
        self.slot.idle()
    }

    /// Resolves when the connection is to close: chosen to make room, or
    /// idle for the idle timeout.
    pub async fn closing(&self) -> Closing {
        let timeout = self.connections.limits.idle_timeout;
        loop {
            let since = Duration::from_millis(self.slot.active.load(Ordering::Relaxed));
            let idle_for = self.slot.epoch.elapsed().saturating_sub(since);
            let wait = if self.slot.idle() {
                match timeout.checked_sub(idle_for) {
                    Some(left) if !left.is_zero() => left,
                    _ => return Closing::Idle,
                }
            } else {
                timeout
            };
            tokio::select! {
                () = self.slot.close.notified() => return Closing::Evicted,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// Counts a connection's requests in flight, and when it was last active.
#[derive(Clone)]
pub struct Tracker(Arc<Slot>);

impl Tracker {
    /// A request starts; it is in flight until the guard is dropped (with
    /// its response's body, so a watch is in flight while it streams).
    pub fn start(&self) -> InFlight {
        self.0.in_flight.fetch_add(1, Ordering::AcqRel);
        self.0.stamp();
        InFlight(self.0.clone())
    }
}

/// A request in flight (see [`Tracker::start`]).
pub struct InFlight(Arc<Slot>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.stamp();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request in flight until it is done.
pub struct Tracked<B> {
    pub inner: B,
    pub in_flight: InFlight,
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize) -> Limits {
        Limits { max_connections: max, idle_timeout: Duration::from_secs(60), ..Limits::default() }
    }

    #[tokio::test(start_paused = true)]
    async fn at_the_cap_the_connection_idle_longest_makes_room_and_busy_ones_stay() {
        let counts = Counts::default();
        let conns = Connections::new(limits(3), counts.clone());
        let first = conns.admit().unwrap();
        tokio::time::advance(Duration::from_millis(10)).await;
        let second = conns.admit().unwrap();
        tokio::time::advance(Duration::from_millis(10)).await;
        let third = conns.admit().unwrap();
        // The oldest is busy (a watch, say): it is not the one to go.
        let watch = first.tracker().start();
        tokio::time::advance(Duration::from_millis(10)).await;
        let fourth = conns.admit().expect("an idle connection makes room");
        assert_eq!(second.closing().await, Closing::Evicted);
        assert_eq!(counts.evicted.get(), 1);
        drop(second);
        // The first is still busy: the third goes next.
        let fifth = conns.admit().unwrap();
        assert_eq!(third.closing().await, Closing::Evicted);
        drop(third);
        // With every connection busy, a new one is refused.
        let _busy4 = fourth.tracker().start();
        let _busy5 = fifth.tracker().start();
        assert!(conns.admit().is_none(), "every connection is busy");
        assert_eq!(counts.refused.get(), 1);
        assert_eq!(conns.open(), 3);
        drop(watch);
        assert!(first.idle());
    }

    #[tokio::test(start_paused = true)]
    async fn out_of_descriptors_only_a_connection_idle_for_the_handshake_timeout_goes() {
        let counts = Counts::default();
        let conns = Connections::new(limits(100), counts.clone());
        let hoarder = conns.admit().unwrap();
        tokio::time::advance(Duration::from_secs(11)).await;
        // Just accepted: it has had no chance to speak, so it stays even
        // though it is idle, and so does the older one while busy.
        let fresh = conns.admit().unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        let busy = hoarder.tracker().start();
        assert!(!conns.evict_for_descriptor());
        drop(busy);
        // Idle again, its last request just ended: too recent.
        assert!(!conns.evict_for_descriptor());
        // Idle for 10.5 s and for 9.5 s: only the first is taken.
        tokio::time::advance(Duration::from_millis(9_500)).await;
        assert!(conns.evict_for_descriptor());
        assert_eq!(fresh.closing().await, Closing::Evicted);
        assert!(!conns.evict_for_descriptor());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(conns.evict_for_descriptor());
        assert_eq!(hoarder.closing().await, Closing::Evicted);
        assert_eq!(counts.evicted.get(), 2);
        assert!(!conns.evict_for_descriptor(), "nothing left to close");
    }

    #[test]
    fn a_connection_that_ends_leaves_the_listener() {
        let conns = Connections::new(limits(10), Counts::default());
        let c = conns.admit().unwrap();
        assert_eq!(conns.open(), 1);
        drop(c);
        assert_eq!(conns.open(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_closes_after_the_idle_timeout_with_no_request_in_flight() {
        let conns = Connections::new(limits(10), Counts::default());
        let c = conns.admit().unwrap();
        let started = tokio::time::Instant::now();
        let request = c.tracker().start();
        // Busy for two minutes (longer than the idle timeout): still open.
        let closing = c.closing();
        tokio::pin!(closing);
        tokio::select! {
            _ = &mut closing => panic!("closed while a request was in flight"),
            () = tokio::time::sleep(Duration::from_secs(120)) => {}
        }
        drop(request);
        assert_eq!(closing.await, Closing::Idle);
        assert!(started.elapsed() >= Duration::from_secs(180), "{:?}", started.elapsed());
        assert_eq!(conns.open(), 1);
    }
}
