//! The listeners: one port per held Service port, opened on every replica
//! as dormant's EndpointSlices appear (a watch of them, by label) and
//! closed when they go. A connection's port is its route (see
//! [`super::slice`]); a connection whose first byte opens a TLS handshake
//! is tunnelled to the app untouched ([`App::tunnel`]), any other is
//! served as HTTP/1.1 or HTTP/2 without TLS (`h2c`, prior knowledge).
//!
//! Limits: at most `max_connections` at once across all ports (more are
//! closed at once), 30 s for a request's head (and between requests), 64
//! KiB of HTTP/1.1 head, 32 KiB of HTTP/2 header list and 256 streams per
//! connection. A held request's body stays in the client's socket until
//! it is forwarded: a held request costs its head and its future, no body.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::FutureExt as _;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::serve::App;
use super::slice::{Route, routes};

/// How long a client has to send a request head (also between requests).
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADER_LIST: u32 = 32 * 1024;
const MAX_STREAMS: u32 = 256;

struct Bound {
    route: Arc<Route>,
    task: tokio::task::JoinHandle<()>,
    /// When its slice went: the port stays open [`LINGER`] longer.
    gone_since: Option<std::time::Instant>,
}

/// How long a port stays open after its slice went (a wake gave the
/// Service back): kube-proxies and ingress controllers learn of the
/// deletion a moment later and send new connections here until then,
/// which are forwarded to the Service's own pods rather than refused.
const LINGER: Duration = Duration::from_secs(30);

impl Drop for Bound {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The ports this replica listens on, and what each stands for.
pub struct Listeners {
    app: Arc<App>,
    bind: IpAddr,
    range: RangeInclusive<u16>,
    bound: Mutex<BTreeMap<u16, Bound>>,
    /// Ports two slices claim (a leader handover's race): served by neither.
    conflicts: RwLock<Vec<u16>>,
    connections: Arc<Semaphore>,
}

impl Listeners {
    pub fn new(app: Arc<App>, bind: IpAddr, range: RangeInclusive<u16>, max_connections: usize) -> Self {
        Listeners {
            app,
            bind,
            range,
            bound: Mutex::new(BTreeMap::new()),
            conflicts: RwLock::new(Vec::new()),
            connections: Arc::new(Semaphore::new(max_connections.max(1))),
        }
    }

    /// Listens on every port `slices` hold (in this replica's range) and
    /// stops listening on the others once they have lingered (see
    /// [`LINGER`]). Connections already open go on.
    pub async fn sync<'a>(&self, slices: impl IntoIterator<Item = &'a EndpointSlice>) {
        let mut want: HashMap<u16, Route> = HashMap::new();
        let mut conflicts = Vec::new();
        for r in slices.into_iter().flat_map(routes) {
            if !self.range.contains(&r.listen) {
                continue;
            }
            match want.get(&r.listen) {
                Some(other) if *other != r => conflicts.push(r.listen),
                _ => {
                    want.insert(r.listen, r);
                }
            }
        }
        for p in &conflicts {
            if want.remove(p).is_some() {
                tracing::warn!(
                    port = p,
                    "two held Services claim one app-traffic port; serving neither until the leader reassigns one"
                );
            }
        }
        *self.conflicts.write().unwrap_or_else(|e| e.into_inner()) = conflicts;
        let mut todo = Vec::new();
        {
            let mut bound = self.bound.lock().unwrap_or_else(|e| e.into_inner());
            bound.retain(|port, b| match want.get(port) {
                Some(r) if *r == *b.route => {
                    b.gone_since = None;
                    true
                }
                // Another route now: its own listener, at once.
                Some(_) => false,
                None => b.gone_since.get_or_insert_with(std::time::Instant::now).elapsed() < LINGER,
            });
            for (port, route) in want {
                if !bound.contains_key(&port) {
                    todo.push((port, route));
                }
            }
        }
        for (port, route) in todo {
            let addr = SocketAddr::new(self.bind, port);
            match TcpListener::bind(addr).await {
                Ok(listener) => {
                    let route = Arc::new(route);
                    tracing::info!(%addr, target = %route.target, service = %route.service, port = %route.port, "holding app traffic");
                    let task = tokio::spawn(accept(
                        listener,
                        route.clone(),
                        self.app.clone(),
                        self.connections.clone(),
                    ));
                    self.bound
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(port, Bound { route, task, gone_since: None });
                }
                Err(e) => tracing::warn!(%addr, error = %e, "cannot listen for app traffic"),
            }
        }
    }

    /// The ports listened on now, with what each holds.
    pub fn routes(&self) -> Vec<(u16, Arc<Route>)> {
        self.bound
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(p, b)| (*p, b.route.clone()))
            .collect()
    }
}

/// Accepts connections for one route until aborted.
async fn accept(listener: TcpListener, route: Arc<Route>, app: Arc<App>, connections: Arc<Semaphore>) {
    loop {
        let tcp = crate::tls::accept(&listener).await;
        crate::tls::tune(&tcp);
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            // Over the cap: closed at once (a client retries elsewhere).
            continue;
        };
        let Ok(peer) = tcp.peer_addr() else { continue };
        tokio::spawn(connection(app.clone(), route.clone(), tcp, peer, permit));
    }
}

/// Serves one connection: TLS tunnelled, anything else as HTTP.
async fn connection(
    app: Arc<App>,
    route: Arc<Route>,
    tcp: TcpStream,
    peer: SocketAddr,
    _permit: OwnedSemaphorePermit,
) {
    let mut first = [0u8; 1];
    match tokio::time::timeout(HEAD_TIMEOUT, tcp.peek(&mut first)).await {
        Ok(Ok(1)) => {}
        _ => return,
    }
    // A TLS record of type handshake.
    if first[0] == 0x16 {
        app.tunnel(tcp, route).await;
        return;
    }
    let svc = service_fn(move |req| {
        app.clone().handle(req, route.clone(), peer).map(Ok::<_, std::convert::Infallible>)
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_LIST)
        .max_concurrent_streams(MAX_STREAMS)
        .keep_alive_interval(crate::tls::KEEPALIVE_IDLE)
        .keep_alive_timeout(Duration::from_secs(20));
    let _ = builder.serve_connection_with_upgrades(TokioIo::new(tcp), svc).await;
}
