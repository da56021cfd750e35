//! Forwarding one request to one of the app's own endpoints: HTTP/1.1, or
//! HTTP/2 without TLS when the Service port says so (`appProtocol:
//! kubernetes.io/h2c`, `grpc`); bodies streamed both ways (server-sent
//! events flow as they come), upgrades (WebSockets) bridged, headers that
//! belong to one connection dropped, and the client recorded in
//! `X-Forwarded-For` and `Forwarded` (appended to what came: the app
//! decides whom to trust), `X-Forwarded-Proto` and `X-Forwarded-Host` set
//! when absent.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Version, header};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::proxy::forward::KeepAwake;
use crate::proxy::headers::{is_upgrade, strip_hop_by_hop};
use crate::proxy::upstream::ProxyBody;
use crate::vocab::IGNORE_HEADER;

type AppClient = Client<HttpConnector, ProxyBody>;

/// The clients to apps' endpoints (pooled per endpoint).
pub struct Upstream {
    h1: AppClient,
    h2c: AppClient,
}

impl Default for Upstream {
    fn default() -> Self {
        Self::new()
    }
}

/// How long an idle connection to an app waits in the pool.
const IDLE: Duration = Duration::from_secs(90);

impl Upstream {
    pub fn new() -> Self {
        let connector = || {
            let mut c = HttpConnector::new();
            // Responses are small writes after the request: without it they
            // wait for the peer's delayed ACK.
            c.set_nodelay(true);
            c.set_keepalive(Some(crate::tls::KEEPALIVE_IDLE));
            c.set_connect_timeout(Some(Duration::from_secs(5)));
            c
        };
        let builder = || {
            let mut b = Client::builder(TokioExecutor::new());
            b.pool_idle_timeout(IDLE).pool_max_idle_per_host(64);
            b
        };
        Upstream { h1: builder().build(connector()), h2c: builder().http2_only(true).build(connector()) }
    }

    /// Sends the request (`parts` and `body`) to `to`. [`Failed::Connect`]
    /// when nothing could be sent: another endpoint may be tried. `awake`
    /// keeps the target awake while an upgraded connection or an event
    /// stream stays open.
    pub async fn send(
        &self,
        to: SocketAddr,
        h2c: bool,
        parts: &mut http::request::Parts,
        body: ProxyBody,
        peer: IpAddr,
        awake: Option<&Awake>,
    ) -> Result<Response<ProxyBody>, Failed> {
        let upgrade = is_upgrade(&parts.headers) && !h2c;
        let client_upgrade =
            if upgrade { parts.extensions.remove::<hyper::upgrade::OnUpgrade>() } else { None };
        let host = host(parts);
        let headers = request_headers(&parts.headers, peer, host.as_deref(), upgrade);
        let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let uri: http::Uri = format!("http://{to}{pq}").parse().map_err(|_| Failed::Sent)?;
        let mut out =
            Request::builder().method(parts.method.clone()).uri(uri).body(body).map_err(|_| Failed::Sent)?;
        *out.headers_mut() = headers;
        *out.version_mut() = if h2c { Version::HTTP_2 } else { Version::HTTP_11 };
        let client = if h2c { &self.h2c } else { &self.h1 };
        let mut resp = match client.request(out).await {
            Ok(r) => r,
            Err(e) if e.is_connect() => return Err(Failed::Connect(crate::error::chain(&e))),
            Err(e) => {
                tracing::debug!(to = %to, error = %crate::error::Chain(&e), "app endpoint failed mid-request");
                return Err(Failed::Sent);
            }
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_upgrade) = client_upgrade
        {
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            let keep_awake = awake.map(Awake::start);
            tokio::spawn(async move {
                let _awake = keep_awake;
                if let (Ok(a), Ok(b)) = (client_upgrade.await, upstream_upgrade.await) {
                    let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(a), &mut TokioIo::new(b)).await;
                }
            });
            let (parts, _) = resp.into_parts();
            return Ok(Response::from_parts(parts, crate::proxy::error::full(Bytes::new())));
        }
        let (mut rparts, body) = resp.into_parts();
        strip_hop_by_hop(&mut rparts.headers, false);
        let streaming = rparts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let body = match awake.filter(|_| streaming) {
            Some(awake) => Guarded { inner: body, _guard: awake.start() }.boxed(),
            None => body.boxed(),
        };
        Ok(Response::from_parts(rparts, body))
    }
}

/// What keeps a target awake while a long-lived answer stays open: the
/// request's activity, recorded again every few seconds.
#[derive(Clone)]
pub struct Awake {
    pub observer: std::sync::Arc<crate::activity::observe::Observer>,
    pub target: crate::target::TargetRef,
    pub activity: std::sync::Arc<crate::activity::Activity>,
}

impl Awake {
    fn start(&self) -> KeepAwake {
        KeepAwake::start(self.observer.clone(), self.target.clone(), self.activity.clone())
    }
}

/// Why forwarding failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failed {
    /// No connection: nothing was sent, another endpoint may be tried.
    Connect(String),
    /// The request went (or may have gone) out: not retried.
    Sent,
}

/// A response body that keeps a guard until it is done.
struct Guarded {
    inner: Incoming,
    _guard: KeepAwake,
}

impl hyper::body::Body for Guarded {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// The host the client asked for: `Host`, or an HTTP/2 request's authority.
pub fn host(parts: &http::request::Parts) -> Option<String> {
    parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| parts.uri.authority().map(|a| a.as_str().to_string()))
}

/// The headers to send on: hop-by-hop ones dropped (an upgrade keeps its
/// own), dormant's opt-out dropped, `Host` kept as the client sent it, and
/// the client's address added to the forwarding headers.
pub fn request_headers(h: &HeaderMap, peer: IpAddr, host: Option<&str>, upgrade: bool) -> HeaderMap {
    let mut out = h.clone();
    strip_hop_by_hop(&mut out, upgrade);
    if upgrade {
        out.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    }
    out.remove(IGNORE_HEADER);
    if let Some(host) = host.and_then(|h| HeaderValue::from_str(h).ok()) {
        out.insert(header::HOST, host);
    }
    append(&mut out, "x-forwarded-for", &peer.to_string());
    let node = match peer {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("\"[{ip}]\""),
    };
    let mut forwarded = format!("for={node};proto=http");
    if let Some(host) = host.filter(|h| h.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b)))
    {
        forwarded.push_str(&format!(";host=\"{host}\""));
    }
    append(&mut out, "forwarded", &forwarded);
    if !out.contains_key("x-forwarded-proto") {
        out.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    }
    if !out.contains_key("x-forwarded-host")
        && let Some(v) = host.and_then(|h| HeaderValue::from_str(h).ok())
    {
        out.insert("x-forwarded-host", v);
    }
    out
}

/// Appends `value` to the list header `name` (one header, comma-joined).
fn append(h: &mut HeaderMap, name: &'static str, value: &str) {
    let joined = match h.get_all(name).iter().filter_map(|v| v.to_str().ok()).collect::<Vec<_>>() {
        before if before.is_empty() => value.to_string(),
        before => format!("{}, {value}", before.join(", ")),
    };
    if let Ok(v) = HeaderValue::from_str(&joined) {
        h.insert(name, v);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn the_client_is_appended_to_the_forwarding_headers_and_connection_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("shop.example.com"));
        h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert(IGNORE_HEADER, HeaderValue::from_static("true"));
        h.insert(header::USER_AGENT, HeaderValue::from_static("Mozilla/5.0"));
        let out = request_headers(&h, "10.2.0.5".parse().unwrap(), Some("shop.example.com"), false);
        assert_eq!(out["x-forwarded-for"], "203.0.113.9, 10.2.0.5");
        assert_eq!(out["forwarded"], "for=10.2.0.5;proto=http;host=\"shop.example.com\"");
        assert_eq!(out["x-forwarded-proto"], "https", "what the ingress said stays");
        assert_eq!(out["x-forwarded-host"], "shop.example.com");
        assert_eq!(out[header::HOST], "shop.example.com");
        assert_eq!(out[header::USER_AGENT], "Mozilla/5.0", "the user agent is the client's, unmarked");
        for gone in [header::CONNECTION.as_str(), "x-hop", IGNORE_HEADER] {
            assert!(!out.contains_key(gone), "{gone}");
        }
        // IPv6 clients are quoted in Forwarded; a host with odd bytes is left out of it.
        let out = request_headers(&HeaderMap::new(), "fd00::5".parse().unwrap(), Some("a\"b"), false);
        assert_eq!(out["forwarded"], "for=\"[fd00::5]\";proto=http");
        assert_eq!(out["x-forwarded-for"], "fd00::5");
        // An upgrade keeps what it needs.
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("sec-websocket-key", HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="));
        let out = request_headers(&h, "10.2.0.5".parse().unwrap(), None, true);
        assert_eq!(out[header::UPGRADE], "websocket");
        assert_eq!(out[header::CONNECTION], "Upgrade");
        assert!(out.contains_key("sec-websocket-key"));
    }
}
