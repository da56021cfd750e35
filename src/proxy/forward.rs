//! Step 6, forward: the request to the vcluster's API server with its own
//! credentials (or, for a verified client certificate, the vcluster's
//! admin credential and impersonation of exactly that identity), bodies
//! streamed both ways, upgrades bridged, hop-by-hop headers dropped. A
//! long-running request that counts keeps its target awake while it
//! stays open.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::TokioIo;

use super::Proxy;
use super::auth::Caller;
use super::error::{ProxyError, full};
use super::headers::{forwardable, is_upgrade, strip_hop_by_hop};
use super::upstream::{Busy, Kept, ProxyBody};
use crate::activity::Activity;
use crate::activity::observe::Observer;
use crate::target::TargetRef;
use crate::tls::Conn;

impl Proxy {
    /// Forwards one request to `t`'s API server: bodies streamed both ways,
    /// upgrades (exec, attach, port-forward, WebSocket watches) bridged; in
    /// client-certificate mode with the vcluster's admin credential and
    /// `Impersonate-*` headers set by the proxy alone. `keep_awake` records
    /// activity while a long-running answer stays open.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn forward(
        self: &Arc<Self>,
        t: &TargetRef,
        path_and_query: &str,
        req: &mut http::request::Parts,
        conn: &Conn<Kept>,
        body: ForwardBody,
        caller: &Caller,
        keep_awake: Option<Arc<Activity>>,
    ) -> Result<Response<ProxyBody>, Forward> {
        let up = self.upstreams.get(t).await.map_err(|e| ProxyError::from_upstream(t, &e))?;
        let upgrade = is_upgrade(&req.headers);
        let client_upgrade =
            if upgrade { req.extensions.remove::<hyper::upgrade::OnUpgrade>() } else { None };
        let mut headers = forwardable(&req.headers, upgrade);
        headers.insert(header::HOST, up.origin.host.clone());
        let admin = match caller {
            Caller::Certificate { user, groups } => {
                // Never widen access: the caller's own Authorization and
                // Impersonate-* headers go; the proxy's impersonation of
                // exactly the verified identity comes in.
                headers.remove(header::AUTHORIZATION);
                let names: Vec<HeaderName> =
                    headers.keys().filter(|k| k.as_str().starts_with("impersonate-")).cloned().collect();
                for k in names {
                    headers.remove(k);
                }
                if up.admin.is_none() {
                    return Err(ProxyError::Upstream(
                        t.clone(),
                        "its Secret has no admin credential for client-certificate callers".into(),
                    )
                    .into());
                }
                let value = |s: &str| HeaderValue::from_str(s).map_err(|_| ProxyError::Unauthorized);
                headers.insert("impersonate-user", value(user)?);
                for g in groups {
                    headers.append("impersonate-group", value(g)?);
                }
                true
            }
            Caller::Bearer { .. } | Caller::Anonymous => false,
        };
        // The client connection's own upstream connections (see
        // `upstream`); an upgrade, whose connection becomes a tunnel, takes
        // one from the pool.
        let kept = !upgrade;
        let uri = if kept { up.origin.path(path_and_query) } else { up.origin.uri(path_and_query) }
            .map_err(|_| ProxyError::Upstream(t.clone(), "invalid upstream URL".into()))?;
        let body = match body {
            ForwardBody::Incoming(b) => b.boxed(),
            ForwardBody::Empty => full(Bytes::new()),
        };
        let mut out = Request::builder()
            .method(req.method.clone())
            .uri(uri)
            .body(body)
            .map_err(|e| ProxyError::Upstream(t.clone(), e.to_string()))?;
        *out.headers_mut() = headers;
        let sent = if kept {
            up.send_kept(admin, conn, out).await.map(|(r, busy)| (r, Some(busy)))
        } else {
            up.send_pooled(admin, out).await.map(|r| (r, None))
        };
        let (mut resp, busy) = match sent {
            Ok(r) => r,
            Err(e) => {
                if let Some(exhausted) = super::upstream::exhausted(&*e) {
                    // Nothing was sent: no room for another upstream connection.
                    return Err(Forward::Refused(ProxyError::UpstreamBusy(t.clone(), exhausted.to_string())));
                }
                // No answer: the connection failed (refused, or closed
                // before a response — an API server restarting under us).
                // The target goes through the gate again, and a bodiless
                // GET/HEAD/OPTIONS is safe to send once more.
                self.set_confirmed(t, false);
                self.upstreams.invalidate(t);
                return Err(Forward::NoAnswer(crate::error::chain(&*e)));
            }
        };
        // Kept awake only by an answer that let the caller in: a 401 or 403
        // watch held open (an HTTP/2 client can keep any body open with a
        // zero window) is nobody's use.
        let let_in = resp.status().is_success() || resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        let guard =
            keep_awake.filter(|_| let_in).map(|a| KeepAwake::start(self.observer.clone(), t.clone(), a));
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_upgrade) = client_upgrade
        {
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                let _guard = guard;
                if let (Ok(a), Ok(b)) = (client_upgrade.await, upstream_upgrade.await) {
                    let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(a), &mut TokioIo::new(b)).await;
                }
            });
            let (parts, _) = resp.into_parts();
            return Ok(Response::from_parts(parts, full(Bytes::new())));
        }
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers, false);
        Ok(Response::from_parts(parts, Guarded { inner: body, _guard: guard, _busy: busy }.boxed()))
    }
}

/// How often an open long-running request counts as use again: well inside
/// any idle timeout a user would set, and one in-memory ledger entry each.
const KEEP_AWAKE_EVERY: Duration = Duration::from_secs(5);

/// Keeps recording activity while a long-running request stays open (a
/// watch, exec or port-forward is use), until dropped.
pub struct KeepAwake(tokio::task::JoinHandle<()>);

impl KeepAwake {
    pub fn start(observer: Arc<Observer>, t: TargetRef, a: Arc<Activity>) -> Self {
        let mut a = Activity::clone(&a);
        KeepAwake(tokio::spawn(async move {
            loop {
                tokio::time::sleep(KEEP_AWAKE_EVERY).await;
                a.at = Utc::now();
                observer.observe(&t, a.clone());
            }
        }))
    }
}

impl Drop for KeepAwake {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A response body that holds a guard until it is done.
struct Guarded {
    inner: Incoming,
    _guard: Option<KeepAwake>,
    /// Frees the upstream connection once the body is done with.
    _busy: Option<Busy>,
}

impl Body for Guarded {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// The body to forward: the caller's, or none on a retry.
pub(super) enum ForwardBody {
    Incoming(Incoming),
    Empty,
}

/// Why forwarding failed.
pub(super) enum Forward {
    /// No answer came back (refused, or the connection closed first).
    NoAnswer(String),
    Refused(ProxyError),
}

impl From<ProxyError> for Forward {
    fn from(e: ProxyError) -> Self {
        Forward::Refused(e)
    }
}
