//! TLS plumbing shared by the audit endpoint and the proxy: PEM loading,
//! rustls configurations (ring provider only) and the HTTPS accept loop;
//! and the serving every listener shares (the admin port's plain HTTP
//! too), within the limits of [`limits`].

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::task::AtomicWaker;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use limits::{Admitted, Connections};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to read PEM from {path}")]
    ReadPem {
        path: String,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("failed to parse PEM {what}")]
    ParsePem {
        what: &'static str,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("no certificate found in {0}")]
    NoCertificate(String),
    #[error("failed to build TLS configuration")]
    Config(#[source] rustls::Error),
    #[error("failed to build client certificate verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub mod limits;

/// The process-wide crypto provider. Only `ring` is compiled in; installing
/// it explicitly avoids rustls guessing (two providers make it panic).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as the process default provider (idempotent). Libraries
/// that build their own configurations (kube's client) rely on it.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub fn certs_from_pem(pem: &[u8], what: &'static str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|source| Error::ParsePem { what, source })?;
    if certs.is_empty() {
        return Err(Error::NoCertificate(what.to_string()));
    }
    Ok(certs)
}

pub fn key_from_pem(pem: &[u8]) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|source| Error::ParsePem { what: "private key", source })
}

pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|source| Error::ReadPem { path: path.display().to_string(), source })?;
    if certs.is_empty() {
        return Err(Error::NoCertificate(path.display().to_string()));
    }
    Ok(certs)
}

pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|source| Error::ReadPem { path: path.display().to_string(), source })
}

pub fn root_store(cas: &[CertificateDer<'static>]) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots.add(ca.clone()).map_err(Error::Config)?;
    }
    Ok(roots)
}

/// A server configuration with `certs`/`key`, offering h2 and http/1.1.
/// With `client_cas`, client certificates signed by one of them are verified
/// when offered (but not required, so bearer-token clients still connect).
pub fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_cas: Option<&[CertificateDer<'static>]>,
) -> Result<rustls::ServerConfig> {
    let clients = client_cas.map(ca_verifier).transpose()?;
    let config = verifying(clients)?.with_single_cert(certs, key).map_err(Error::Config)?;
    Ok(offering_http(config))
}

/// A server configuration builder with the ring provider and safe protocol
/// versions, ready for a client-certificate verifier.
fn server_builder() -> Result<rustls::ConfigBuilder<rustls::ServerConfig, rustls::WantsVerifier>> {
    rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(Error::Config)
}

/// A server builder whose offered client certificates must pass `clients`
/// (clients without one may still connect and use a bearer token); none
/// are asked for without.
fn verifying(
    clients: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
) -> Result<rustls::ConfigBuilder<rustls::ServerConfig, rustls::server::WantsServerCert>> {
    let builder = server_builder()?;
    Ok(match clients {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    })
}

/// Verifies offered client certificates against `cas`; clients without one
/// may still connect.
fn ca_verifier(
    cas: &[CertificateDer<'static>],
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>> {
    WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(cas)?), provider())
        .allow_unauthenticated()
        .build()
        .map_err(Error::Verifier)
}

/// Offers h2 and http/1.1.
fn offering_http(mut config: rustls::ServerConfig) -> rustls::ServerConfig {
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config
}

/// A value read from files and read again when one of them changes
/// (checked at most every `check_every`, when the value is asked for), so
/// a rotated Secret needs no restart. A change that cannot be read is
/// logged and the value read before stays.
pub struct Reloading<T, E = Error> {
    files: Vec<std::path::PathBuf>,
    check_every: std::time::Duration,
    /// What is read, for the log.
    what: &'static str,
    read: fn(&[std::path::PathBuf]) -> Result<T, E>,
    state: std::sync::RwLock<ReloadState<T>>,
}

struct ReloadState<T> {
    checked: std::time::Instant,
    stamps: Vec<Option<std::time::SystemTime>>,
    current: T,
}

fn modified(p: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

impl<T: Clone, E: std::fmt::Display> Reloading<T, E> {
    /// Reads the value now (failing if it cannot).
    pub fn new(
        files: Vec<std::path::PathBuf>,
        check_every: std::time::Duration,
        what: &'static str,
        read: fn(&[std::path::PathBuf]) -> Result<T, E>,
    ) -> Result<Self, E> {
        // Stamps first: a change while reading is then seen next time.
        let stamps = files.iter().map(|f| modified(f)).collect();
        let current = read(&files)?;
        Ok(Reloading {
            files,
            check_every,
            what,
            read,
            state: std::sync::RwLock::new(ReloadState {
                checked: std::time::Instant::now(),
                stamps,
                current,
            }),
        })
    }

    /// The value, read again first if a file changed.
    pub fn current(&self) -> T {
        {
            let s = self.state.read().unwrap_or_else(|e| e.into_inner());
            if s.checked.elapsed() < self.check_every {
                return s.current.clone();
            }
        }
        let mut s = self.state.write().unwrap_or_else(|e| e.into_inner());
        s.checked = std::time::Instant::now();
        let stamps: Vec<_> = self.files.iter().map(|f| modified(f)).collect();
        if stamps != s.stamps {
            match (self.read)(&self.files) {
                Ok(v) => {
                    tracing::info!(file = %self.files[0].display(), "reloaded the {}", self.what);
                    s.current = v;
                    s.stamps = stamps;
                }
                Err(e) => tracing::warn!(
                    file = %self.files[0].display(),
                    error = %e,
                    "the changed {} cannot be used; keeping the one read before",
                    self.what
                ),
            }
        }
        s.current.clone()
    }
}

impl<T, E> std::fmt::Debug for Reloading<T, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloading")
            .field("what", &self.what)
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

/// Serves the certificate and key from two files, read again when either
/// changes (cert-manager rotations need no restart).
#[derive(Debug)]
pub struct ReloadingCert(Reloading<Arc<rustls::sign::CertifiedKey>>);

fn load_pair(files: &[std::path::PathBuf]) -> Result<Arc<rustls::sign::CertifiedKey>> {
    let certs = read_certs(&files[0])?;
    let key = read_key(&files[1])?;
    rustls::sign::CertifiedKey::from_der(certs, key, &provider()).map(Arc::new).map_err(Error::Config)
}

impl ReloadingCert {
    /// Loads the pair now (failing if it cannot).
    pub fn new(cert: &Path, key: &Path, check_every: std::time::Duration) -> Result<Self> {
        Reloading::new(vec![cert.into(), key.into()], check_every, "serving certificate", load_pair)
            .map(ReloadingCert)
    }

    fn current(&self) -> Arc<rustls::sign::CertifiedKey> {
        self.0.current()
    }
}

impl rustls::server::ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current())
    }
}

/// A server configuration whose certificate comes from `resolver`; with
/// `clients`, offered client certificates must pass it (clients without
/// one may still connect and use a bearer token).
pub fn server_config_with_resolver(
    resolver: Arc<dyn rustls::server::ResolvesServerCert>,
    clients: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
) -> Result<rustls::ServerConfig> {
    Ok(offering_http(verifying(clients)?.with_cert_resolver(resolver)))
}

/// Verifies offered client certificates against the CAs in a file, read
/// again when it changes: a CA rotated in a mounted Secret (old and new CA
/// side by side, then the new one alone) needs no restart. Clients without
/// a certificate may still connect (and use a bearer token).
#[derive(Debug)]
pub struct ReloadingClientVerifier(Reloading<Arc<dyn rustls::server::danger::ClientCertVerifier>>);

fn client_verifier(
    files: &[std::path::PathBuf],
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>> {
    ca_verifier(&read_certs(&files[0])?)
}

impl ReloadingClientVerifier {
    /// Reads the CAs now (failing if it cannot).
    pub fn new(path: &Path, check_every: std::time::Duration) -> Result<Self> {
        Reloading::new(vec![path.into()], check_every, "client CAs", client_verifier)
            .map(ReloadingClientVerifier)
    }

    fn current(&self) -> Arc<dyn rustls::server::danger::ClientCertVerifier> {
        self.0.current()
    }
}

impl rustls::server::danger::ClientCertVerifier for ReloadingClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    /// No hints: they would have to outlive a reload. A client sends the
    /// certificate it is configured with (kube-apiserver's webhook does).
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls_pki_types::UnixTime,
    ) -> std::result::Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        self.current().verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.current().supported_verify_schemes()
    }
}

/// What a handler knows of the connection a request came on, and keeps
/// for it.
pub struct Conn<S> {
    /// The certificate chain the client presented (its own first, then any
    /// intermediates), if any.
    pub peer: Option<Vec<CertificateDer<'static>>>,
    /// The handler's own state for this connection, dropped with it.
    pub state: S,
    /// Futures that run in the connection's task.
    pub background: Background,
}

/// Futures that belong with a connection and run in its task: an HTTP/2
/// connection's streams, and the proxy's upstream connections for this
/// client. Polled where the client's requests are, they need no task of
/// their own, and a request and its answer pass between the client's
/// connection, its streams and the upstream connections without hand-offs
/// between tasks (as nginx and haproxy run a connection in one event
/// loop). Those still running when the connection ends move to tasks of
/// their own, as does anything spawned here after that.
#[derive(Clone, Default)]
pub struct Background(Arc<BackgroundInner>);

#[derive(Default)]
struct BackgroundInner {
    /// Polled only by the connection's task; made on first use (most
    /// connections never have any).
    running: std::sync::Mutex<Option<FuturesUnordered<BoxFuture<'static, ()>>>>,
    /// Spawned and not yet polled (a running future may spawn another).
    incoming: std::sync::Mutex<Spawned>,
    waker: AtomicWaker,
}

#[derive(Default)]
struct Spawned {
    futures: Vec<BoxFuture<'static, ()>>,
    /// The connection has ended: spawn on the runtime instead.
    detached: bool,
}

impl Background {
    pub fn spawn(&self, f: impl Future<Output = ()> + Send + 'static) {
        {
            let mut incoming = self.0.incoming.lock().unwrap_or_else(|e| e.into_inner());
            if !incoming.detached {
                incoming.futures.push(Box::pin(f));
                drop(incoming);
                self.0.waker.wake();
                return;
            }
        }
        tokio::spawn(f);
    }

    /// Runs the futures as far as they go; never finishes.
    fn poll(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        self.0.waker.register(cx.waker());
        let mut running = self.0.running.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let new = std::mem::take(&mut self.0.incoming.lock().unwrap_or_else(|e| e.into_inner()).futures);
            if !new.is_empty() {
                running.get_or_insert_default().extend(new);
            }
            let Some(futures) = running.as_mut() else { break };
            while let std::task::Poll::Ready(Some(())) = futures.poll_next_unpin(cx) {}
            // Futures spawned by those just polled are polled at once.
            if self.0.incoming.lock().unwrap_or_else(|e| e.into_inner()).futures.is_empty() {
                break;
            }
        }
        std::task::Poll::Pending
    }

    fn detach(&self) {
        let new = {
            let mut incoming = self.0.incoming.lock().unwrap_or_else(|e| e.into_inner());
            incoming.detached = true;
            std::mem::take(&mut incoming.futures)
        };
        let running = self.0.running.lock().unwrap_or_else(|e| e.into_inner()).take();
        for f in new.into_iter().chain(running.into_iter().flatten()) {
            tokio::spawn(f);
        }
    }
}

impl<F: Future + Send + 'static> hyper::rt::Executor<F> for Background {
    fn execute(&self, f: F) {
        // `map`: an async block awaiting `f` would store it twice, and a
        // stream held at the wake gate is what each waiting request costs.
        self.spawn(futures::FutureExt::map(f, drop));
    }
}

/// The next connection on `listener`. A failed accept that concerns one
/// connection (the client gave up first) is skipped; any other, such as
/// running out of file descriptors, is logged and retried after a pause:
/// the waiting connections keep the listener readable, so retrying at once
/// would spin a core and starve everything else the agent does.
pub async fn accept(listener: &TcpListener) -> tokio::net::TcpStream {
    accept_into(listener, None).await
}

/// [`accept`], for a listener whose connections are `connections`: out of
/// file descriptors, the connection idle the longest (for at least the
/// handshake timeout) is closed to free one, so idle connections cannot
/// lock users out that way either, and accepting is retried soon after.
async fn accept_into(listener: &TcpListener, connections: Option<&Connections>) -> tokio::net::TcpStream {
    use std::io::ErrorKind;
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => return tcp,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::ConnectionAborted
                        | ErrorKind::ConnectionReset
                        | ErrorKind::ConnectionRefused
                        | ErrorKind::Interrupted
                ) => {}
            Err(e)
                if matches!(e.raw_os_error(), Some(EMFILE | ENFILE))
                    && connections.is_some_and(Connections::evict_for_descriptor) =>
            {
                tracing::warn!(error = %e, addr = ?listener.local_addr().ok(), "out of file descriptors; closed the connection idle the longest");
                tokio::time::sleep(EVICTED_RETRY).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, addr = ?listener.local_addr().ok(), "cannot accept connections; retrying");
                tokio::time::sleep(ACCEPT_RETRY).await;
            }
        }
    }
}

/// Linux's "too many open files" for the process and for the system.
const EMFILE: i32 = 24;
const ENFILE: i32 = 23;

/// How often an idle HTTP/2 connection is PINGed, and how long the answer
/// may take.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// TCP keepalive on every connection the agent accepts or opens upstream:
/// after `KEEPALIVE_IDLE` with nothing sent or received the kernel probes
/// the peer every `KEEPALIVE_INTERVAL` and closes the connection after
/// `KEEPALIVE_PROBES` unanswered probes. A peer that vanished without
/// closing (a laptop shut or a node lost with a watch open over HTTP/1.1,
/// where nothing else would notice while the watch has nothing to report)
/// is found within a minute; its watch then stops keeping its vcluster
/// awake. HTTP/2 PINGs (above) do the same from the protocol's side.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const KEEPALIVE_PROBES: u32 = 3;
/// How long what the agent sent may go unacknowledged before the
/// connection is closed (`TCP_USER_TIMEOUT`): keepalive probes only an idle
/// connection, and a client that vanished while a watch streams to it
/// would otherwise be retried by the kernel for about 15 minutes, keeping
/// its vcluster awake all that time. As long as keepalive's own limit
/// (idle, then every probe unanswered), which it also governs once set.
pub const UNACKED_TIMEOUT: Duration =
    Duration::from_secs(KEEPALIVE_IDLE.as_secs() + KEEPALIVE_INTERVAL.as_secs() * KEEPALIVE_PROBES as u64);

/// Turns TCP keepalive on for `tcp` (see [`KEEPALIVE_IDLE`]) and closes it
/// when what is sent goes unacknowledged for [`UNACKED_TIMEOUT`].
pub fn keep_alive(tcp: &tokio::net::TcpStream) -> std::io::Result<()> {
    let params = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    let socket = socket2::SockRef::from(tcp);
    socket.set_tcp_keepalive(&params)?;
    socket.set_tcp_user_timeout(Some(UNACKED_TIMEOUT))
}

/// Sets up a connection the agent accepted: `TCP_NODELAY` (responses are
/// small writes after the request: with Nagle's algorithm they would wait
/// for the client's delayed ACK, up to 40 ms) and [`keep_alive`]. A socket
/// that refuses either is served all the same.
pub fn tune(tcp: &tokio::net::TcpStream) {
    let _ = tcp.set_nodelay(true);
    let _ = keep_alive(tcp);
}

/// How long a listener pauses after a failed accept (see [`accept`]).
const ACCEPT_RETRY: Duration = Duration::from_millis(250);
/// How soon accepting is retried after an idle connection was closed to
/// free a file descriptor (its task closes it when next polled).
const EVICTED_RETRY: Duration = Duration::from_millis(10);

/// How long a connection told to close when idle may take over it (an
/// HTTP/2 client acknowledging GOAWAY's PING) before it is closed anyway.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Serves HTTPS on `listener` until the task is dropped, holding at most
/// what `connections` allows (see [`limits`]). Each connection is
/// [`tune`]d, gets the handshake timeout for its handshake, a [`Conn`]
/// with a fresh `S`, and `handle(request, that Conn)` for each request;
/// upgrades pass.
pub async fn serve_https<S, H, F, B>(
    listener: TcpListener,
    tls: TlsAcceptor,
    connections: Arc<Connections>,
    handle: H,
) where
    S: Default + Send + Sync + 'static,
    H: Fn(Request<Incoming>, Arc<Conn<S>>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    loop {
        let tcp = accept_into(&listener, Some(&connections)).await;
        // At the cap with every connection busy: closed at once.
        let Some(admitted) = connections.admit() else { continue };
        tune(&tcp);
        let (tls, handle) = (tls.clone(), handle.clone());
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(admitted.limits().handshake_timeout, tls.accept(tcp));
            let stream = tokio::select! {
                r = handshake => match r {
                    Ok(Ok(stream)) => stream,
                    _ => return,
                },
                _ = admitted.closing() => return,
            };
            let session = stream.get_ref().1;
            // The protocol TLS negotiated (ALPN), so hyper need not sniff
            // the first bytes for an HTTP/2 preface; no ALPN is HTTP/1.1.
            let http2 = session.alpn_protocol() == Some(b"h2");
            let conn = Arc::new(Conn {
                peer: session
                    .peer_certificates()
                    .filter(|c| !c.is_empty())
                    .map(|c| c.iter().map(|c| c.clone().into_owned()).collect()),
                state: S::default(),
                background: Background::default(),
            });
            let this = conn.clone();
            let serving = serve_connection(
                TokioIo::new(stream),
                Some(http2),
                &admitted,
                this.background.clone(),
                move |req| handle(req, conn.clone()),
            );
            tokio::select! {
                biased;
                _ = std::future::poll_fn(|cx| this.background.poll(cx)) => {}
                _ = serving => {}
            }
            this.background.detach();
        });
    }
}

/// Serves plain HTTP (either version) on `listener` until the task is
/// dropped, holding at most what `connections` allows: the admin port.
pub async fn serve_http<H, F, B>(listener: TcpListener, connections: Arc<Connections>, handle: H)
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    loop {
        let tcp = accept_into(&listener, Some(&connections)).await;
        let Some(admitted) = connections.admit() else { continue };
        let _ = tcp.set_nodelay(true);
        let handle = handle.clone();
        tokio::spawn(async move {
            let background = Background::default();
            let serving = serve_connection(TokioIo::new(tcp), None, &admitted, background.clone(), handle);
            tokio::select! {
                biased;
                _ = std::future::poll_fn(|cx| background.poll(cx)) => {}
                _ = serving => {}
            }
            background.detach();
        });
    }
}

/// Serves one connection (HTTP/2 or HTTP/1.1 as `http2` says, else either)
/// within its listener's limits, until it ends or is to close: told to
/// make room (closed at once unless a request is in flight), or idle for
/// the idle timeout (closed gracefully, then after [`CLOSE_GRACE`] anyway
/// if still idle). A request that is in flight when its connection is to
/// close is finished first.
async fn serve_connection<I, H, F, B>(
    io: I,
    http2: Option<bool>,
    admitted: &Admitted,
    background: Background,
    handle: H,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let limits = *admitted.limits();
    let tracker = admitted.tracker();
    // `map`, not `async move { Ok(answer.await) }`: an async block that
    // awaits a future it captured stores it twice, and a held request's
    // future is what each waiting request costs. The request is in flight
    // until its answer's body is done with (a watch while it streams).
    let svc = service_fn(move |req| {
        let in_flight = tracker.start();
        futures::FutureExt::map(handle(req), move |resp| {
            Ok::<_, std::convert::Infallible>(resp.map(|inner| limits::Tracked { inner, in_flight }))
        })
    });
    // An HTTP/2 connection's streams run in its task (see `Background`).
    let mut builder = hyper_util::server::conn::auto::Builder::new(background);
    // A client that sends no (complete) request head within the header
    // read timeout, idle between requests included, is closed; so is an
    // HTTP/2 client that leaves a PING unanswered (a laptop shut with a
    // watch open would otherwise hold its connection, and keep its
    // vcluster awake, for ever). An HTTP/2 client that answers PINGs but
    // sends nothing is closed after the idle timeout (below).
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
        .max_concurrent_streams(limits.max_streams);
    let builder = match http2 {
        Some(true) => builder.http2_only(),
        Some(false) => builder.http1_only(),
        None => builder,
    };
    let serving = builder.serve_connection_with_upgrades(io, svc);
    let mut serving = std::pin::pin!(serving);
    let why = tokio::select! {
        _ = serving.as_mut() => return,
        why = admitted.closing() => why,
    };
    if why == limits::Closing::Evicted && admitted.idle() {
        // The room is needed now.
        return;
    }
    serving.as_mut().graceful_shutdown();
    loop {
        tokio::select! {
            _ = serving.as_mut() => return,
            () = tokio::time::sleep(CLOSE_GRACE) => if admitted.idle() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_are_probed_and_time_out_unacknowledged_data() -> anyhow::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let _client = tokio::net::TcpStream::connect(listener.local_addr()?).await?;
        let tcp = accept(&listener).await;
        keep_alive(&tcp)?;
        let socket = socket2::SockRef::from(&tcp);
        assert!(socket.keepalive()?);
        assert_eq!(socket.tcp_keepalive_time()?, KEEPALIVE_IDLE);
        assert_eq!(socket.tcp_keepalive_interval()?, KEEPALIVE_INTERVAL);
        assert_eq!(socket.tcp_keepalive_retries()?, KEEPALIVE_PROBES);
        assert_eq!(socket.tcp_user_timeout()?, Some(UNACKED_TIMEOUT));
        Ok(())
    }
}
