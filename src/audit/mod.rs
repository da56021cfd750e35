//! The audit webhook: an HTTPS endpoint on its own listener that takes
//! `audit.k8s.io/v1` `EventList` POSTs — `/audit/host` from the host
//! cluster's API server, `/audit/vcluster/<namespace>/<name>` from a
//! vcluster's — authenticates the sender (bearer token or client
//! certificate), decodes the batch, attributes each request to a target and
//! reports it as activity. It answers as soon as the batch is decoded:
//! kube-apiserver drops audit events when its receiver is slow, and a slow
//! Kubernetes API must never make this endpoint slow.

pub mod body;
pub mod decode;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::activity::observe::{Observer, UNAUTHENTICATED, UNKNOWN_VCLUSTER};
use crate::activity::{Activity, ResourceRef, Source};
use crate::auth::bearer_token;
use crate::metrics::{Metrics, OutcomeLabels};
use crate::status::Rejection;
use crate::target::TargetRef;
use crate::target::index::TargetIndex;

/// Where a batch came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Host,
    VCluster(TargetRef),
}

/// Parses the request path into an origin.
pub fn route(path: &str) -> Option<Origin> {
    let rest = path.strip_prefix("/audit/")?;
    if rest == "host" {
        return Some(Origin::Host);
    }
    let parts: Vec<&str> = rest.strip_prefix("vcluster/")?.split('/').collect();
    let valid = |p: &str| {
        !p.is_empty()
            && p.len() <= 253
            && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    };
    match parts.as_slice() {
        [ns, name] if valid(ns) && valid(name) => Some(Origin::VCluster(TargetRef::vcluster(ns, name))),
        _ => None,
    }
}

/// Bearer tokens accepted from API servers, read from a file (a mounted
/// Secret) and re-read when the file changes. One token per line, alone
/// (accepted on every path) or followed by the one path it may post to
/// (`/audit/host` or `/audit/vcluster/<namespace>/<name>`): a vcluster's
/// API server should hold a token that can only report for it, or whoever
/// can read that token can keep any target awake.
pub struct Tokens(crate::tls::Reloading<Arc<Vec<Token>>, std::io::Error>);

struct Token {
    secret: String,
    only: Option<Origin>,
}

fn read_tokens(files: &[PathBuf]) -> std::io::Result<Arc<Vec<Token>>> {
    let text = std::fs::read_to_string(&files[0])?;
    parse_tokens(&text).map(Arc::new).map_err(|e| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", files[0].display()))
    })
}

impl Tokens {
    pub fn from_file(path: PathBuf) -> std::io::Result<Tokens> {
        crate::tls::Reloading::new(vec![path], Duration::from_secs(5), "audit tokens", read_tokens)
            .map(Tokens)
    }

    fn accepts(&self, presented: &str, origin: &Origin) -> bool {
        self.0.current().iter().any(|t| {
            constant_time_eq(t.secret.as_bytes(), presented.as_bytes())
                && t.only.as_ref().is_none_or(|o| o == origin)
        })
    }
}

/// The token file's lines (see [`Tokens`]); blank lines are skipped, and
/// a word that starts with `#` starts a comment.
fn parse_tokens(text: &str) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.split_whitespace().take_while(|f| !f.starts_with('#')).collect();
        match fields.as_slice() {
            [] => {}
            [secret] => tokens.push(Token { secret: secret.to_string(), only: None }),
            [secret, path] => {
                let Some(origin) = route(path) else {
                    return Err(format!(
                        "line {}: {path:?} is not /audit/host or /audit/vcluster/<namespace>/<name>",
                        i + 1
                    ));
                };
                tokens.push(Token { secret: secret.to_string(), only: Some(origin) });
            }
            _ => return Err(format!("line {}: expected a token, optionally followed by one path", i + 1)),
        }
    }
    Ok(tokens)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// An audit event as an activity record, made once per event whatever
/// the number of targets it is attributed to. The event's own time is
/// used, but never later than when it arrived (an API server clock ahead
/// of ours must not date activity in the future).
pub fn to_activity(e: &decode::Event<'_>, received: chrono::DateTime<Utc>, origin: &Origin) -> Activity {
    let user = e.effective_user();
    let at = e
        .stage_timestamp
        .as_deref()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc).min(received))
        .unwrap_or(received);
    let path = e.request_uri.split('?').next().unwrap_or_default().to_string();
    Activity {
        at,
        source: Source::Audit,
        user: user.username.to_string(),
        groups: user.groups.iter().map(|g| g.to_string()).collect(),
        user_agent: e.user_agent.as_deref().unwrap_or_default().to_string(),
        verb: e.verb.to_string(),
        resource: e.object_ref.as_ref().and_then(|o| {
            o.resource.as_ref().map(|r| ResourceRef {
                group: o.api_group.as_deref().unwrap_or_default().to_string(),
                resource: r.to_string(),
                subresource: o.subresource.as_deref().unwrap_or_default().to_string(),
                namespace: o.namespace.as_deref().unwrap_or_default().to_string(),
                name: o.name.as_deref().unwrap_or_default().to_string(),
            })
        }),
        path,
        code: e.code(),
        in_vcluster: matches!(origin, Origin::VCluster(_)),
    }
}

/// Serves the webhook.
pub struct Receiver {
    pub observer: Arc<Observer>,
    pub index: Arc<TargetIndex>,
    pub metrics: Arc<Metrics>,
    pub tokens: Option<Tokens>,
    /// Client certificates are verified by the TLS layer when a client CA
    /// is configured; a verified one authenticates the sender.
    pub client_certs: bool,
    /// Largest body accepted (after decompression too).
    pub max_body: usize,
}

type Body = Full<Bytes>;

/// Why a batch is refused: each kind with its metric label and answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    NotFound,
    Unauthorized,
    BadMethod,
    MediaType(String),
    Body(body::BodyError),
    ReadError,
    Decode(decode::DecodeError),
}

impl Refused {
    /// The `outcome` label of `dormant_audit_batches_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            Refused::NotFound => "not-found",
            Refused::Unauthorized => "unauthorized",
            Refused::BadMethod => "bad-method",
            Refused::MediaType(_) => "unsupported-media-type",
            Refused::Body(e) => e.outcome(),
            Refused::ReadError => "read-error",
            Refused::Decode(e) => e.category(),
        }
    }

    /// The one place a refusal becomes an answer.
    pub fn rejection(&self) -> Rejection {
        let r = |code, reason, message: String| Rejection::new(code, reason, message);
        match self {
            Refused::NotFound => r(
                StatusCode::NOT_FOUND,
                "NotFound",
                "expected /audit/host or /audit/vcluster/<namespace>/<name>".into(),
            ),
            Refused::Unauthorized => r(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "a valid bearer token or client certificate is required".into(),
            ),
            Refused::BadMethod => {
                r(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "audit batches are POSTed".into())
            }
            Refused::MediaType(m) => r(StatusCode::UNSUPPORTED_MEDIA_TYPE, "UnsupportedMediaType", m.clone()),
            Refused::Body(e @ body::BodyError::TooLarge { .. }) => {
                r(StatusCode::PAYLOAD_TOO_LARGE, "RequestEntityTooLarge", e.to_string())
            }
            Refused::Body(e) => r(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()),
            Refused::ReadError => r(StatusCode::BAD_REQUEST, "BadRequest", "failed to read the body".into()),
            Refused::Decode(e) => r(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()),
        }
    }
}

impl Receiver {
    /// Handles one request. `client_cert` is true when the connection
    /// presented a certificate the TLS layer verified.
    pub async fn handle(&self, req: Request<Incoming>, client_cert: bool) -> Response<Body> {
        let started = Instant::now();
        let (outcome, answer) = match self.accept(req, client_cert).await {
            Ok(events) => {
                self.metrics.audit_events.inc_by(events as u64);
                self.metrics.audit_batch_duration.observe(started.elapsed().as_secs_f64());
                ("accepted", Rejection::new(StatusCode::OK, "", ""))
            }
            Err(e) => {
                if let Refused::Decode(e) = &e {
                    tracing::debug!(error = %e, "rejected an audit batch");
                }
                (e.outcome(), e.rejection())
            }
        };
        self.metrics.audit_batches.get_or_create(&OutcomeLabels { outcome }).inc();
        answer.response(Full::new)
    }

    /// Route, authenticate, check and read the batch, then ingest it.
    async fn accept(&self, req: Request<Incoming>, client_cert: bool) -> Result<usize, Refused> {
        let origin = route(req.uri().path()).ok_or(Refused::NotFound)?;
        let token_ok = match (&self.tokens, bearer_token(req.headers())) {
            (Some(tokens), Some(t)) => tokens.accepts(t, &origin),
            _ => false,
        };
        if !(token_ok || (self.client_certs && client_cert)) {
            return Err(Refused::Unauthorized);
        }
        if req.method() != Method::POST {
            return Err(Refused::BadMethod);
        }
        let content_type =
            req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
        if !content_type.starts_with("application/json") {
            return Err(Refused::MediaType(format!(
                "expected Content-Type application/json, got {content_type:?}"
            )));
        }
        let gzip = match req.headers().get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok()) {
            None | Some("identity") => false,
            Some("gzip") => true,
            Some(other) => {
                return Err(Refused::MediaType(format!(
                    "unsupported Content-Encoding {other:?} (gzip or none)"
                )));
            }
        };
        let too_large = Refused::Body(body::BodyError::TooLarge { max: self.max_body });
        if req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .is_some_and(|n| n > self.max_body)
        {
            return Err(too_large);
        }
        let raw = match Limited::new(req.into_body(), self.max_body).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
                return Err(too_large);
            }
            Err(_) => return Err(Refused::ReadError),
        };
        let batch = body::inflate(&raw, gzip, self.max_body).map_err(Refused::Body)?;
        self.ingest(&origin, &batch).map_err(Refused::Decode)
    }

    /// Decodes a batch and hands each request, once, to the observer for
    /// each target it touched (which judges whether it counts). Returns
    /// the number of events in the batch.
    pub fn ingest(&self, origin: &Origin, body: &[u8]) -> Result<usize, decode::DecodeError> {
        let events = decode::decode(body)?;
        let received = Utc::now();
        let known_vcluster = match origin {
            Origin::VCluster(t) => Some(self.index.contains(t)),
            Origin::Host => None,
        };
        for e in events.iter().filter(|e| e.counts()) {
            if known_vcluster == Some(false) {
                let rule = if e.unauthenticated() { UNAUTHENTICATED } else { UNKNOWN_VCLUSTER };
                self.observer.turn_away(Source::Audit, rule);
                continue;
            }
            let activity = Arc::new(to_activity(e, received, origin));
            match origin {
                Origin::VCluster(t) => {
                    self.observer.observe(t, activity);
                }
                Origin::Host => {
                    let Some(ns) = e.namespace() else { continue };
                    for t in self.index.in_namespace(ns) {
                        self.observer.observe(&t, activity.clone());
                    }
                }
            }
        }
        Ok(events.len())
    }

    /// Serves HTTPS on `listener` with `tls` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, tls: TlsAcceptor) {
        crate::tls::serve_https(listener, tls, move |req, conn: Arc<crate::tls::Conn<()>>| {
            let receiver = self.clone();
            async move { receiver.handle(req, conn.peer.is_some()).await }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route("/audit/host"), Some(Origin::Host));
        assert_eq!(
            route("/audit/vcluster/team-a/dev"),
            Some(Origin::VCluster(TargetRef::vcluster("team-a", "dev")))
        );
        for bad in [
            "/audit",
            "/audit/",
            "/audit/hosts",
            "/audit/vcluster/a",
            "/audit/vcluster/a/b/c",
            "/audit/vcluster//b",
            "/audit/vcluster/a%2f/b",
            "/",
        ] {
            assert_eq!(route(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_token_may_be_limited_to_one_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "# tokens\nhost-token\n\n  vc-token   /audit/vcluster/team-a/dev  # team a\n")
            .unwrap();
        let file = Tokens::from_file(path).unwrap();
        assert_eq!(file.0.current().len(), 2);
        let (host, dev, other) = (
            Origin::Host,
            Origin::VCluster(TargetRef::vcluster("team-a", "dev")),
            Origin::VCluster(TargetRef::vcluster("team-b", "prod")),
        );
        assert!(file.accepts("host-token", &host) && file.accepts("host-token", &other));
        assert!(file.accepts("vc-token", &dev));
        assert!(!file.accepts("vc-token", &other), "a vcluster's token reported for another vcluster");
        assert!(!file.accepts("vc-token", &host));
        assert!(!file.accepts("nope", &host));
        for (bad, says) in [
            ("t /audit/vcluster/a", "line 1: \"/audit/vcluster/a\" is not"),
            ("ok\nt /x /y", "line 2: expected a token"),
        ] {
            let e = parse_tokens(bad).err().unwrap();
            assert!(e.starts_with(says), "{e}");
        }
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
