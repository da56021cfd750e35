//! Where and how the proxy reaches a vcluster's API server: the URL (the
//! `dormant.dev/upstream` annotation, else the vcluster's Service), the CA
//! that upstream TLS is verified against and the admin credential for
//! impersonation — both from the vcluster's `vc-<name>` Secret — and two
//! channels to it: one that presents no certificate (callers' bearer tokens
//! pass through untouched, and a presented admin certificate would
//! authenticate first and widen access) and one that presents the admin
//! certificate (for callers authenticated by client certificate, always
//! with impersonation).
//!
//! A client connection keeps the upstream connections its requests used
//! ([`Kept`]; an HTTP/1.1 client, sending one request at a time, needs
//! one; an HTTP/2 client one per stream in flight), driven in its own task
//! (`tls::Background`): no shared pool to lock and no task per request,
//! where hyper-util's pooled client takes a lock to check a connection out
//! and spawns a task to put it back after every response. When the client
//! leaves, its upstream connections wait in the channel's idle list for
//! the next. (So a client that keeps an idle connection open keeps an
//! upstream connection open too, as a tunnel would.) Upgrades and the
//! proxy's own checks use the pooled client.
//!
//! Upstream connections are bounded ([`UpstreamLimits`]): all of them
//! together (each holds a permit from one pool, whichever client or
//! channel opened it), and the requests one client connection has in
//! flight on them. At the overall cap the connection idle the longest is
//! closed to make room; a request that still finds none within a moment,
//! or whose client connection is at its own cap, is answered `503` with
//! `Retry-After` ([`Exhausted`]). HTTP/1.1 stays the upstream protocol:
//! upgrades (exec, attach, port-forward) need it, and a connection per
//! request in flight gives each stream its own flow control, where a
//! shared HTTP/2 connection would let one client that stops reading stall
//! every stream on it.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::policy::annotations::TargetAnnotations;
use crate::target::{Stores, TargetRef};
use crate::tls::{Background, Conn};
use crate::vocab::UPSTREAM;

/// The body type the proxy forwards.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;
type Connector = hyper_rustls::HttpsConnector<HttpConnector>;
pub type HttpClient = Client<Counted, ProxyBody>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long an upstream connection may wait unused in an idle list, and
/// how many may wait per channel; the pooled clients (upgrades, which
/// never go back to the pool, and the proxy's own checks, one at a time)
/// keep a few.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
const MAX_IDLE: usize = 64;
const MAX_POOLED_IDLE: usize = 4;

/// How long a request waits for an upstream connection at the overall cap
/// (an idle one closing to make room), before `503`.
const ROOM_WAIT: Duration = Duration::from_secs(1);

/// Bounds on upstream connections (see the module documentation).
#[derive(Clone)]
pub struct UpstreamLimits {
    /// Upstream connections open at once, all upstreams together.
    pub max_connections: usize,
    /// Requests one client connection may have in flight upstream.
    pub max_per_client: usize,
    /// Upstream connections open now (a metric).
    pub open: prometheus_client::metrics::gauge::Gauge,
}

/// Why a request gets no upstream connection: answered `503` with
/// `Retry-After`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Exhausted {
    #[error("this connection already has {0} requests in flight, its limit")]
    PerClient(usize),
    #[error("the proxy already holds {0} connections to vclusters, its limit")]
    Overall(usize),
}

/// The [`Exhausted`] that `e` is or was caused by, if any.
pub fn exhausted<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a Exhausted> {
    std::iter::successors(Some(e), |e| e.source()).find_map(|e| e.downcast_ref::<Exhausted>())
}

/// The permits every upstream connection holds one of, and the
/// connections that can be closed to make room.
struct Pool {
    permits: Arc<tokio::sync::Semaphore>,
    limits: UpstreamLimits,
    /// The connections client connections keep and idle lists hold (not
    /// the pooled clients'), to find an idle one at the cap.
    drivers: Mutex<Vec<std::sync::Weak<Driver>>>,
    epoch: Instant,
}

/// One upstream connection's permit; given back when it closes.
struct Permit {
    _permit: tokio::sync::OwnedSemaphorePermit,
    pool: Arc<Pool>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        // The permit itself goes back after this: count it gone now.
        self.pool.limits.open.dec();
    }
}

impl Pool {
    fn new(limits: UpstreamLimits) -> Arc<Pool> {
        Arc::new(Pool {
            permits: Arc::new(tokio::sync::Semaphore::new(limits.max_connections)),
            limits,
            drivers: Mutex::new(Vec::new()),
            epoch: Instant::now(),
        })
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// A permit for a new connection; at the cap, the connection idle the
    /// longest is closed to make room and its permit awaited a moment.
    async fn permit(self: &Arc<Self>) -> Result<Permit, Exhausted> {
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                self.reclaim();
                match tokio::time::timeout(ROOM_WAIT, self.permits.clone().acquire_owned()).await {
                    Ok(Ok(p)) => p,
                    _ => return Err(Exhausted::Overall(self.limits.max_connections)),
                }
            }
        };
        self.limits.open.inc();
        Ok(Permit { _permit: permit, pool: self.clone() })
    }

    fn register(&self, driver: &Arc<Driver>) {
        let mut drivers = self.drivers.lock().unwrap_or_else(|e| e.into_inner());
        if drivers.len() >= 2 * self.limits.max_connections.max(32) {
            drivers.retain(|d| d.strong_count() > 0);
        }
        drivers.push(Arc::downgrade(driver));
    }

    /// Closes the connection idle the longest, if any is idle.
    fn reclaim(&self) -> bool {
        let victim = {
            let mut drivers = self.drivers.lock().unwrap_or_else(|e| e.into_inner());
            drivers.retain(|d| d.strong_count() > 0);
            drivers
                .iter()
                .filter_map(std::sync::Weak::upgrade)
                .filter(|d| d.state.load(Ordering::Acquire) == IDLE)
                .min_by_key(|d| d.since.load(Ordering::Relaxed))
        };
        victim.is_some_and(|d| d.reclaim())
    }
}

/// A connector whose connections each hold a permit of the pool.
#[derive(Clone)]
pub struct Counted {
    inner: Connector,
    pool: Arc<Pool>,
}

impl tower_service::Service<http::Uri> for Counted {
    type Response = CountedIo;
    type Error = BoxError;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<CountedIo, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let (mut inner, pool) = (self.inner.clone(), self.pool.clone());
        Box::pin(async move {
            let permit = pool.permit().await?;
            std::future::poll_fn(|cx| inner.poll_ready(cx)).await?;
            let io = inner.call(uri).await?;
            Ok(CountedIo { io, _permit: permit })
        })
    }
}

/// An upstream connection's stream, holding its permit until it closes.
pub struct CountedIo {
    io: hyper_rustls::MaybeHttpsStream<hyper_util::rt::TokioIo<tokio::net::TcpStream>>,
    _permit: Permit,
}

impl hyper::rt::Read for CountedIo {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for CountedIo {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

impl hyper_util::client::legacy::connect::Connection for CountedIo {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        self.io.connected()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("vcluster {0} does not exist")]
    NotFound(TargetRef),
    #[error("failed to read the Secret vc-{name} of vcluster {namespace}/{name}")]
    ReadSecret {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("the Secret vc-{name} of vcluster {namespace}/{name} is unusable: {reason}")]
    BadSecret { namespace: String, name: String, reason: String },
    #[error("invalid upstream {url:?} for vcluster {target}: {reason}")]
    BadUpstream { target: TargetRef, url: String, reason: String },
    #[error("failed to build the TLS configuration for vcluster {0}")]
    Tls(TargetRef, #[source] crate::tls::Error),
}

impl Error {
    /// The Secret could not be read because the API server did not answer
    /// (see [`crate::error::transient`]): a retry may do.
    pub fn transient(&self) -> bool {
        matches!(self, Error::ReadSecret { source, .. } if crate::error::transient(source))
    }
}

/// How to reach one vcluster.
pub struct Upstream {
    /// `https://host:port` plus an optional path prefix, parsed once: each
    /// request's URL is made from it.
    pub origin: Origin,
    /// Verifies client certificates presented to the proxy for this vcluster.
    pub client_verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    /// No client certificate: for bearer tokens and anonymous requests.
    pub plain: Channel,
    /// Presents the vcluster's admin certificate: only with impersonation.
    pub admin: Option<Channel>,
    /// What it was made from (URL and Secret material), hashed: a re-read
    /// that finds the same keeps this upstream and the connections to it.
    made_from: u64,
    /// Replaced or forgotten in the cache: connections to it that client
    /// connections keep are closed, not used again.
    retired: std::sync::atomic::AtomicBool,
    /// Shared by every upstream (see [`UpstreamLimits`]).
    pool: Arc<Pool>,
}

/// One way to the upstream (with or without the admin certificate).
pub struct Channel {
    /// Pooled: for concurrent requests, upgrades and the proxy's checks.
    pub client: HttpClient,
    connector: Counted,
    /// Upstream connections that no client connection keeps, newest last.
    idle: Mutex<Vec<(Instant, Sender, Arc<Driver>)>>,
}

type Sender = http1::SendRequest<ProxyBody>;
type UpstreamIo = CountedIo;

/// Holds an upstream connection's future, which runs in the task of the
/// client connection that last took the connection from an idle list: a
/// new runner takes it over from the old one, which then ends.
struct Driver {
    conn: Mutex<DriverState>,
    /// [`IDLE`], [`BUSY`] or [`RECLAIMED`].
    state: std::sync::atomic::AtomicU8,
    /// When it last became idle (the pool's clock, ms).
    since: std::sync::atomic::AtomicU64,
}

/// A connection no request uses.
const IDLE: u8 = 0;
/// A connection a request was sent on and whose answer is not done with.
const BUSY: u8 = 1;
/// An idle connection closed to make room: never used again.
const RECLAIMED: u8 = 2;

struct DriverState {
    conn: Option<std::pin::Pin<Box<http1::Connection<UpstreamIo, ProxyBody>>>>,
    runner: u64,
    waker: Option<std::task::Waker>,
}

impl Driver {
    fn new(conn: http1::Connection<UpstreamIo, ProxyBody>) -> Arc<Driver> {
        Arc::new(Driver {
            conn: Mutex::new(DriverState { conn: Some(Box::pin(conn)), runner: 0, waker: None }),
            state: std::sync::atomic::AtomicU8::new(BUSY),
            since: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Takes an idle connection for a request; false if it was closed to
    /// make room.
    fn take(&self) -> bool {
        self.state.compare_exchange(IDLE, BUSY, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// The request's answer is done with.
    fn done(&self, now: u64) {
        self.since.store(now, Ordering::Relaxed);
        let _ = self.state.compare_exchange(BUSY, IDLE, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Closes the connection if it is idle (it closes when its runner next
    /// polls it, woken here).
    fn reclaim(&self) -> bool {
        if self.state.compare_exchange(IDLE, RECLAIMED, Ordering::AcqRel, Ordering::Acquire).is_err() {
            return false;
        }
        if let Some(w) = self.conn.lock().unwrap_or_else(|e| e.into_inner()).waker.take() {
            w.wake();
        }
        true
    }

    /// Drives the connection in the task that polls this, until it ends or
    /// another runner takes over.
    fn run(self: &Arc<Self>) -> impl Future<Output = ()> + Send + 'static {
        let me = {
            let mut s = self.conn.lock().unwrap_or_else(|e| e.into_inner());
            s.runner += 1;
            if let Some(w) = s.waker.take() {
                w.wake();
            }
            s.runner
        };
        let driver = self.clone();
        std::future::poll_fn(move |cx| {
            let mut s = driver.conn.lock().unwrap_or_else(|e| e.into_inner());
            if s.runner != me {
                return std::task::Poll::Ready(());
            }
            if driver.state.load(Ordering::Acquire) == RECLAIMED {
                // Closed to make room: dropping it gives back its permit.
                s.conn = None;
                return std::task::Poll::Ready(());
            }
            let polled = match s.conn.as_mut() {
                Some(conn) => conn.as_mut().poll(cx),
                None => return std::task::Poll::Ready(()),
            };
            match polled {
                std::task::Poll::Ready(result) => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "upstream connection failed");
                    }
                    s.conn = None;
                    std::task::Poll::Ready(())
                }
                std::task::Poll::Pending => {
                    if !s.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        s.waker = Some(cx.waker().clone());
                    }
                    std::task::Poll::Pending
                }
            }
        })
    }
}

/// The upstream connections one client connection keeps (see the module
/// documentation): those not busy with one of its requests. They go to
/// their channel's idle list when the client connection is dropped, or
/// when it keeps more than [`MAX_KEPT`].
#[derive(Default)]
pub struct Kept(Arc<KeptConns>);

#[derive(Default)]
struct KeptConns {
    conns: Mutex<Vec<KeptConn>>,
    /// Requests of this client connection in flight upstream.
    busy: std::sync::atomic::AtomicUsize,
}

/// At most this many idle upstream connections per client connection (an
/// HTTP/2 client's streams run concurrently, each on its own).
const MAX_KEPT: usize = 16;

struct KeptConn {
    upstream: Arc<Upstream>,
    admin: bool,
    sender: Sender,
    driver: Arc<Driver>,
}

impl Kept {
    /// The newest kept sender to `up`'s channel `admin`. On a miss (a new
    /// connection follows), connections to retired upstreams are dropped
    /// (closed): they would never match again.
    fn take(&self, up: &Arc<Upstream>, admin: bool) -> Option<(Sender, Arc<Driver>)> {
        let mut kept = self.0.conns.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let Some(i) = kept.iter().rposition(|k| Arc::ptr_eq(&k.upstream, up) && k.admin == admin) else {
                kept.retain(|k| !k.upstream.retired.load(Ordering::Relaxed));
                return None;
            };
            // One closed to make room is dropped; the next is tried.
            let k = kept.remove(i);
            if k.driver.take() {
                return Some((k.sender, k.driver));
            }
        }
    }
}

impl KeptConns {
    fn keep(&self, conn: KeptConn) {
        let oldest = {
            let mut kept = self.conns.lock().unwrap_or_else(|e| e.into_inner());
            kept.push(conn);
            (kept.len() > MAX_KEPT).then(|| kept.remove(0))
        };
        if let Some(old) = oldest {
            old.release();
        }
    }
}

impl Drop for KeptConns {
    fn drop(&mut self) {
        for kept in self.conns.get_mut().unwrap_or_else(|e| e.into_inner()).drain(..) {
            kept.release();
        }
    }
}

impl KeptConn {
    fn release(self) {
        if let Some(channel) = self.upstream.channel(self.admin) {
            channel.release(self.sender, self.driver);
        }
    }
}

/// An upstream connection busy with a response: when the response's body
/// is done with (sent on, or dropped), the connection goes back to the
/// client connection that sent the request, or to its channel's idle list
/// if that client connection is gone.
pub struct Busy {
    conn: Option<KeptConn>,
    to: std::sync::Weak<KeptConns>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else { return };
        conn.driver.done(conn.upstream.pool.now());
        match self.to.upgrade() {
            Some(kept) => {
                kept.busy.fetch_sub(1, Ordering::AcqRel);
                kept.keep(conn)
            }
            None => conn.release(),
        }
    }
}

/// One request in flight upstream for a client connection, until the
/// request has a [`Busy`] connection (which then counts it) or fails.
struct Counting<'a>(Option<&'a KeptConns>);

impl Counting<'_> {
    fn handed_over(mut self) {
        self.0 = None;
    }
}

impl Drop for Counting<'_> {
    fn drop(&mut self) {
        if let Some(kept) = self.0 {
            kept.busy.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Channel {
    fn new(tls: rustls::ClientConfig, pool: &Arc<Pool>) -> Channel {
        // TCP_NODELAY: a forwarded request is written as more than one
        // segment (headers, then the body's end); with Nagle's algorithm the
        // second waits for the upstream's delayed ACK (up to 40 ms).
        // TCP keepalive: an upstream that vanished (its node lost) with a
        // watch open would otherwise hold the client's watch for ever.
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_keepalive(Some(crate::tls::KEEPALIVE_IDLE));
        http.set_keepalive_interval(Some(crate::tls::KEEPALIVE_INTERVAL));
        http.set_keepalive_retries(Some(crate::tls::KEEPALIVE_PROBES));
        http.set_tcp_user_timeout(Some(crate::tls::UNACKED_TIMEOUT));
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .wrap_connector(http);
        let connector = Counted { inner: connector, pool: pool.clone() };
        // The timer closes pooled connections idle for IDLE_TIMEOUT (without
        // one they are only found stale when next checked out).
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .pool_idle_timeout(IDLE_TIMEOUT)
            .pool_max_idle_per_host(MAX_POOLED_IDLE)
            .build(connector.clone());
        Channel { client, connector, idle: Mutex::new(Vec::new()) }
    }

    /// The newest idle connection that is still open and fresh, now driven
    /// in `background`.
    fn checkout(&self, background: &Background) -> Option<(Sender, Arc<Driver>)> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((since, sender, driver)) = idle.pop() {
            if !sender.is_closed() && since.elapsed() < IDLE_TIMEOUT && driver.take() {
                drop(idle);
                background.spawn(driver.run());
                return Some((sender, driver));
            }
        }
        None
    }

    fn release(&self, sender: Sender, driver: Arc<Driver>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|(since, s, _)| !s.is_closed() && since.elapsed() < IDLE_TIMEOUT);
        if idle.len() < MAX_IDLE {
            idle.push((Instant::now(), sender, driver));
        }
    }

    /// A new HTTP/1.1 connection to `origin`, driven in `background`.
    async fn connect(
        &self,
        origin: &Origin,
        background: &Background,
    ) -> Result<(Sender, Arc<Driver>), BoxError> {
        use tower_service::Service as _;
        let mut connector = self.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx)).await?;
        let io = connector.call(origin.root()?).await?;
        let (sender, conn) = http1::handshake(io).await?;
        let driver = Driver::new(conn);
        self.connector.pool.register(&driver);
        background.spawn(driver.run());
        Ok((sender, driver))
    }
}

impl Upstream {
    fn retire(&self) {
        self.retired.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn channel(&self, admin: bool) -> Option<&Channel> {
        if admin { self.admin.as_ref() } else { Some(&self.plain) }
    }

    /// Sends `req` (its URI absolute, see [`Origin::uri`]) through the
    /// channel's pooled client.
    pub async fn send_pooled(
        &self,
        admin: bool,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, BoxError> {
        let channel = self.channel(admin).ok_or("no admin credential for this upstream")?;
        Ok(channel.client.request(req).await?)
    }

    /// Sends `req` (its URI in origin form, see [`Origin::path`]) on an
    /// upstream connection the client connection `conn` keeps, else on one
    /// from the channel's idle list, else on a new one driven in `conn`'s
    /// task. The connection is busy until the answer's body is done with
    /// ([`Busy`]), then `conn` keeps it. A request that a reused connection
    /// could not take (the upstream closed it while idle) goes on the next
    /// one; an error after it was written is the caller's.
    pub async fn send_kept(
        self: &Arc<Self>,
        admin: bool,
        conn: &Conn<Kept>,
        mut req: Request<ProxyBody>,
    ) -> Result<(Response<Incoming>, Busy), BoxError> {
        let channel = self.channel(admin).ok_or("no admin credential for this upstream")?;
        let kept = &*conn.state.0;
        let per_client = self.pool.limits.max_per_client;
        if kept.busy.fetch_add(1, Ordering::AcqRel) >= per_client {
            kept.busy.fetch_sub(1, Ordering::AcqRel);
            return Err(Box::new(Exhausted::PerClient(per_client)));
        }
        let counting = Counting(Some(kept));
        loop {
            let ((mut sender, driver), fresh) =
                match conn.state.take(self, admin).or_else(|| channel.checkout(&conn.background)) {
                    Some(s) => (s, false),
                    // Boxed: rare, and a connect (TCP, TLS, HTTP handshakes)
                    // would otherwise make every request's future that much
                    // bigger (allocated and moved per request).
                    None => (Box::pin(channel.connect(&self.origin, &conn.background)).await?, true),
                };
            if let Err(e) = sender.ready().await {
                if fresh {
                    return Err(e.into());
                }
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let busy = KeptConn { upstream: self.clone(), admin, sender, driver };
                    counting.handed_over();
                    return Ok((resp, Busy { conn: Some(busy), to: Arc::downgrade(&conn.state.0) }));
                }
                Err(mut e) => match e.take_message() {
                    Some(r) if !fresh => req = r,
                    _ => return Err(e.into_error().into()),
                },
            }
        }
    }
}

/// Resolves and caches upstreams (re-read after a TTL, or on demand after
/// a TLS failure).
pub struct Upstreams {
    client: kube::Client,
    stores: Stores,
    ttl: Duration,
    /// Each upstream with when its Secret was last read.
    cache: RwLock<HashMap<TargetRef, (Instant, Arc<Upstream>)>>,
    pool: Arc<Pool>,
}

/// Where an upstream is: scheme, authority and path prefix.
#[derive(Debug, Clone)]
pub struct Origin {
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    /// Empty, or `/prefix` (no trailing slash).
    prefix: String,
    /// The `Host` header requests to it carry (`host[:port]`, the port only
    /// when not 443), made once rather than by the client per request.
    pub host: http::HeaderValue,
}

impl Origin {
    /// `uri`'s origin, if it is `https://host[:port][/prefix]`.
    pub fn https(uri: &http::Uri) -> Option<Origin> {
        match (uri.scheme(), uri.authority()) {
            (Some(s), Some(a)) if s == &http::uri::Scheme::HTTPS => {
                let host = match a.port_u16() {
                    Some(p) if p != 443 => format!("{}:{p}", a.host()),
                    _ => a.host().to_string(),
                };
                Some(Origin {
                    scheme: s.clone(),
                    authority: a.clone(),
                    prefix: uri.path().trim_end_matches('/').to_string(),
                    host: http::HeaderValue::from_str(&host).ok()?,
                })
            }
            _ => None,
        }
    }

    /// The URL for `path_and_query` (which starts with `/`): one
    /// allocation, as it is made for each request.
    pub fn uri(&self, path_and_query: &str) -> Result<http::Uri, http::Error> {
        http::Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(self.joined(path_and_query)?)
            .build()
    }

    /// `path_and_query` under the prefix, alone (origin form): what a
    /// request written on a connection of one's own carries.
    pub fn path(&self, path_and_query: &str) -> Result<http::Uri, http::Error> {
        Ok(http::Uri::from(self.joined(path_and_query)?))
    }

    /// Scheme and authority alone: what a connector dials.
    fn root(&self) -> Result<http::Uri, http::Error> {
        http::Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query("/")
            .build()
    }

    fn joined(&self, path_and_query: &str) -> Result<http::uri::PathAndQuery, http::Error> {
        let mut pq = String::with_capacity(self.prefix.len() + path_and_query.len());
        pq.push_str(&self.prefix);
        pq.push_str(path_and_query);
        Ok(http::uri::PathAndQuery::from_maybe_shared(bytes::Bytes::from(pq))?)
    }
}

fn b64(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(s.trim()).ok()
}

struct Material {
    ca: Vec<u8>,
    cert: Option<Vec<u8>>,
    key: Option<Vec<u8>>,
}

/// Reads the CA and admin credential from a `vc-<name>` Secret: its
/// `certificate-authority`/`client-certificate`/`client-key` keys, or else
/// the kubeconfig under `config`.
fn material(secret: &Secret) -> Result<Material, String> {
    let data = secret.data.clone().unwrap_or_default();
    let get = |k: &str| data.get(k).map(|v| v.0.clone()).filter(|v| !v.is_empty());
    if let Some(ca) = get("certificate-authority") {
        return Ok(Material { ca, cert: get("client-certificate"), key: get("client-key") });
    }
    let config = get("config").ok_or("it has neither certificate-authority nor config")?;
    let text = String::from_utf8(config).map_err(|_| "its config is not UTF-8")?;
    let kc = kube::config::Kubeconfig::from_yaml(&text)
        .map_err(|e| format!("its config is not a kubeconfig: {e}"))?;
    let ca = kc
        .clusters
        .first()
        .and_then(|c| c.cluster.as_ref())
        .and_then(|c| c.certificate_authority_data.as_deref())
        .and_then(b64)
        .ok_or("its kubeconfig has no certificate-authority-data")?;
    let user = kc.auth_infos.first().and_then(|a| a.auth_info.as_ref());
    let cert = user.and_then(|u| u.client_certificate_data.as_deref()).and_then(b64);
    let key = user
        .and_then(|u| u.client_key_data.as_ref())
        .and_then(|k| b64(secrecy::ExposeSecret::expose_secret(k)));
    Ok(Material { ca, cert, key })
}

impl Upstreams {
    pub fn new(client: kube::Client, stores: Stores, ttl: Duration, limits: UpstreamLimits) -> Self {
        Upstreams { client, stores, ttl, cache: RwLock::new(HashMap::new()), pool: Pool::new(limits) }
    }

    /// Forgets a cached upstream (after a TLS or connection failure).
    pub fn invalidate(&self, t: &TargetRef) {
        if let Some((_, old)) = self.cache.write().unwrap_or_else(|e| e.into_inner()).remove(t) {
            old.retire();
        }
    }

    pub async fn get(&self, t: &TargetRef) -> Result<Arc<Upstream>, Error> {
        let cached = match self.cache.read().unwrap_or_else(|e| e.into_inner()).get(t) {
            Some((read, u)) if read.elapsed() < self.ttl => return Ok(u.clone()),
            Some((_, u)) => Some(u.clone()),
            None => None,
        };
        // Boxed: the slow path (a Secret read) would otherwise size every
        // request's future, held ones included, for itself.
        let u = match Box::pin(self.build(t, cached.clone())).await {
            Ok(u) => u,
            // The API server is down or restarting: what was read last
            // still serves (until the next try, a TTL later), rather than
            // refusing everyone for an outage that is not the vcluster's.
            Err(e) if e.transient() && cached.is_some() => {
                tracing::warn!(target = %t, error = %crate::error::Chain(&e), "keeping the upstream read before: its Secret cannot be read now");
                cached.unwrap_or_else(|| unreachable!())
            }
            Err(e) => return Err(e),
        };
        let old = self
            .cache
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(t.clone(), (Instant::now(), u.clone()));
        if let Some((_, old)) = old
            && !Arc::ptr_eq(&old, &u)
        {
            old.retire();
        }
        Ok(u)
    }

    /// Reads `t`'s URL and Secret; `cached` when they are what
    /// it was made from (client connections keep upstream connections per
    /// upstream: a new one for the same material would strand them and open
    /// new ones every TTL), else a new upstream.
    async fn build(&self, t: &TargetRef, cached: Option<Arc<Upstream>>) -> Result<Arc<Upstream>, Error> {
        let target = self.stores.target(t).ok_or_else(|| Error::NotFound(t.clone()))?;
        let annotated = TargetAnnotations::parse(target.object.annotations()).ok().and_then(|a| a.upstream);
        // `<name>.<namespace>`, which vcluster's serving certificate names
        // (`<name>.<namespace>.svc` it does not) and a pod's DNS search
        // path resolves to the Service.
        let base = annotated.unwrap_or_else(|| format!("https://{}.{}:443", t.name, t.namespace));
        let uri: http::Uri = base.parse().map_err(|_| Error::BadUpstream {
            target: t.clone(),
            url: base.clone(),
            reason: format!("not a URL (set by {UPSTREAM} or the Service)"),
        })?;
        let Some(origin) = Origin::https(&uri) else {
            return Err(Error::BadUpstream {
                target: t.clone(),
                url: base,
                reason: "expected https://host[:port]".into(),
            });
        };
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &t.namespace);
        let secret = secrets.get(&format!("vc-{}", t.name)).await.map_err(|source| Error::ReadSecret {
            namespace: t.namespace.clone(),
            name: t.name.clone(),
            source,
        })?;
        let bad = |reason: String| Error::BadSecret {
            namespace: t.namespace.clone(),
            name: t.name.clone(),
            reason,
        };
        let m = material(&secret).map_err(|r| bad(r.to_string()))?;
        let made_from = {
            use std::hash::BuildHasher;
            // One process-wide key: equal inputs hash alike on every read.
            static KEY: std::sync::OnceLock<std::hash::RandomState> = std::sync::OnceLock::new();
            KEY.get_or_init(std::hash::RandomState::new).hash_one((&base, &m.ca, &m.cert, &m.key))
        };
        if let Some(u) = cached
            && u.made_from == made_from
        {
            return Ok(u);
        }
        let ca = crate::tls::certs_from_pem(&m.ca, "vcluster CA").map_err(|e| bad(e.to_string()))?;
        let roots = Arc::new(crate::tls::root_store(&ca).map_err(|e| Error::Tls(t.clone(), e))?);
        let builder = || {
            rustls::ClientConfig::builder_with_provider(crate::tls::provider())
                .with_safe_default_protocol_versions()
                .map(|b| b.with_root_certificates(roots.clone()))
                .map_err(|e| Error::Tls(t.clone(), crate::tls::Error::Config(e)))
        };
        // HTTP/1.1 upstream (no ALPN): what upgrades need, and all a Kubernetes API server needs.
        let plain_tls = builder()?.with_no_client_auth();
        let chain: Option<Vec<CertificateDer<'static>>> = m
            .cert
            .as_deref()
            .map(|c| crate::tls::certs_from_pem(c, "vcluster admin certificate"))
            .transpose()
            .map_err(|e| bad(e.to_string()))?;
        // Client certificates are checked against what the vcluster's API
        // server trusts for clients: the CA that issued its admin
        // certificate when the Secret carries it after that certificate
        // (k3s signs clients with a CA of its own, not the one in
        // `certificate-authority`), else its one CA.
        let client_roots = match chain.as_deref() {
            Some([_, cas @ ..]) if !cas.is_empty() => Arc::new(
                crate::tls::root_store(cas)
                    .map_err(|e| bad(format!("the CA after its admin certificate: {e}")))?,
            ),
            _ => roots.clone(),
        };
        let admin = match (chain, m.key) {
            (Some(certs), Some(key)) => {
                let key: PrivateKeyDer<'static> =
                    crate::tls::key_from_pem(&key).map_err(|e| bad(e.to_string()))?;
                let tls = builder()?
                    .with_client_auth_cert(certs, key)
                    .map_err(|e| Error::Tls(t.clone(), crate::tls::Error::Config(e)))?;
                Some(Channel::new(tls, &self.pool))
            }
            _ => None,
        };
        let client_verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(client_roots, crate::tls::provider())
                .build()
                .map_err(|e| Error::Tls(t.clone(), crate::tls::Error::Verifier(e)))?;
        Ok(Arc::new(Upstream {
            origin,
            client_verifier,
            plain: Channel::new(plain_tls, &self.pool),
            admin,
            made_from,
            retired: std::sync::atomic::AtomicBool::new(false),
            pool: self.pool.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_urls_join_the_upstream_prefix_and_keep_the_query() {
        let at = |base: &str, pq: &str| {
            Origin::https(&base.parse().unwrap()).unwrap().uri(pq).unwrap().to_string()
        };
        assert_eq!(
            at("https://10.0.0.1:6443", "/api/v1/pods?watch=1"),
            "https://10.0.0.1:6443/api/v1/pods?watch=1"
        );
        assert_eq!(at("https://h/", "/version"), "https://h/version");
        assert_eq!(at("https://h/vc/team-a/", "/apis?x=%2F"), "https://h/vc/team-a/apis?x=%2F");
        let host = |base: &str| Origin::https(&base.parse().unwrap()).unwrap().host;
        assert_eq!(host("https://10.0.0.1:6443/x"), "10.0.0.1:6443");
        assert_eq!(host("https://vc.team-a.svc:443"), "vc.team-a.svc");
        assert_eq!(host("https://[::1]:8443"), "[::1]:8443");
    }

    #[test]
    fn only_https_with_a_host_is_an_upstream() {
        for base in ["http://h:80", "/just/a/path", "h:443"] {
            assert!(Origin::https(&base.parse().unwrap()).is_none(), "{base}");
        }
    }
}
