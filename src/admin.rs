//! The admin port: `/livez`, `/readyz` (true once the caches have synced),
//! `/metrics` (OpenMetrics) and `/status` (what the controller concluded
//! per target, as JSON).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::controller::Context;
use crate::metrics::Metrics;
use crate::policy::annotations::rfc3339;

/// The controller's context, once this replica may lead (`/status` is
/// `null` until then).
pub type Controller = Arc<OnceLock<Weak<Context>>>;

/// What the admin port serves from.
pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub ready: Arc<AtomicBool>,
    pub controller: Controller,
}

fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

impl Admin {
    fn handle(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        match req.uri().path() {
            "/livez" => respond(StatusCode::OK, "text/plain", "ok\n"),
            "/readyz" if self.ready.load(Ordering::Acquire) => respond(StatusCode::OK, "text/plain", "ok\n"),
            "/readyz" => respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "caches not synced yet\n"),
            "/metrics" => respond(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.metrics.encode(),
            ),
            "/status" => {
                let status = match self.controller.get().and_then(Weak::upgrade) {
                    Some(ctx) => status_json(&ctx),
                    None => serde_json::Value::Null,
                };
                respond(StatusCode::OK, "application/json", status.to_string())
            }
            _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
        }
    }

    /// Serves on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let stream = crate::tls::accept(&listener).await;
            let admin = self.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let r = admin.handle(&req);
                    async move { Ok::<_, std::convert::Infallible>(r) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }
}

/// What the controller concluded per target, sorted by target.
fn status_json(ctx: &Context) -> serde_json::Value {
    let mut rows: Vec<serde_json::Value> = ctx
        .summaries()
        .into_iter()
        .map(|(t, s)| {
            serde_json::json!({
                "target": t.to_string(),
                "kind": t.kind.as_str(),
                "state": s.state.as_str(),
                "desired": s.desired.map(|d| format!("{d:?}").to_lowercase()),
                "policy": s.policy,
                "next": s.next.map(rfc3339),
                "invalid": s.invalid.map(|(_, m)| m),
            })
        })
        .collect();
    rows.sort_by(|a, b| a["target"].as_str().cmp(&b["target"].as_str()));
    serde_json::json!({ "leader": ctx.is_leader(), "targets": rows })
}

/// Binds the admin port.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
