//! The wake-on-request proxy for vcluster API servers.
//!
//! A request passes through these steps, in this order:
//! 1. **route** — which vcluster (path prefix or host name); first, because
//!    everything after depends on the target;
//! 2. **authenticate** — a client certificate is verified against that
//!    vcluster's CA (so only now, once the target is known); a bearer token
//!    is passed through for the upstream to judge; without either the
//!    request may still be forwarded to an awake target but never wakes one;
//! 3. **record activity** — before waiting, so that even a request that
//!    times out counts as use;
//! 4. **wake gate** — a target that is not ready is woken once, and the
//!    request waits in a bounded queue (see [`gate`]);
//! 5. **forward** — bodies streamed both ways, upgrades (exec, attach,
//!    port-forward, WebSocket watches) bridged; in client-certificate mode
//!    with the vcluster's admin credential and `Impersonate-*` headers set
//!    by the proxy alone.
//!
//! Every refusal becomes an HTTP answer in one place ([`ProxyError`]), as a
//! Kubernetes `Status` that kubectl prints. Only "overloaded" carries
//! `Retry-After`: client-go retries 5xx answers that have it (up to ten
//! times), which is right for a full queue and wrong for a timeout or a
//! target that will not wake, whose message the user should see at once.

pub mod gate;
mod refused;
pub mod route;
pub mod upstream;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Utc;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::TokioIo;
use rustls_pki_types::CertificateDer;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_rustls::TlsAcceptor;

use crate::activity::observe::{Observer, UNAUTHENTICATED};
use crate::activity::{Activity, Source};
use crate::metrics::{Metrics, OutcomeLabels, ProxyLabels};
use crate::policy::annotations::{self as ann, ForceSleep, TargetAnnotations, Until, rfc3339};
use crate::policy::{Defaults, resolve};
use crate::scaler::Scaler;
use crate::target::stores::Change;
use crate::target::{Scope, Stores, TargetObject, TargetRef};
use crate::tls::Conn;
use gate::{Gate, GateError};
use upstream::{Busy, Kept, ProxyBody, Upstreams};

/// The header that opts a request out of counting as activity.
pub const IGNORE_HEADER: &str = "x-dormant-ignore";

pub use crate::policy::ignore::IGNORED_USER_AGENT_MARK;

/// Why the proxy answers instead of the upstream.
#[derive(Debug, Clone, PartialEq)]
pub enum ProxyError {
    NotRouted,
    NoSuchVCluster(TargetRef),
    BadClientCert(TargetRef, String),
    CredentialsRequired(TargetRef),
    TokenRefused(TargetRef),
    AsleepIgnored(TargetRef),
    Prevented(TargetRef, Until),
    WakeOnRequestOff(TargetRef),
    Overloaded(TargetRef, usize),
    WakeTimeout(TargetRef, Duration),
    WakeFailed(TargetRef, String),
    Upstream(TargetRef, String),
}

impl ProxyError {
    /// Metric label.
    pub fn outcome(&self) -> &'static str {
        match self {
            ProxyError::NotRouted | ProxyError::NoSuchVCluster(_) => "not-found",
            ProxyError::BadClientCert(..)
            | ProxyError::CredentialsRequired(_)
            | ProxyError::TokenRefused(_) => "unauthenticated",
            ProxyError::AsleepIgnored(_) | ProxyError::Prevented(..) | ProxyError::WakeOnRequestOff(_) => {
                "prevented"
            }
            ProxyError::Overloaded(..) => "overloaded",
            ProxyError::WakeTimeout(..) => "timeout",
            ProxyError::WakeFailed(..) | ProxyError::Upstream(..) => "upstream-error",
        }
    }

    /// The one place errors become HTTP answers: a Kubernetes `Status`.
    pub fn response(&self) -> Response<ProxyBody> {
        let (code, reason, message, retry_after): (StatusCode, &str, String, Option<u64>) = match self {
            ProxyError::NotRouted => (
                StatusCode::NOT_FOUND,
                "NotFound",
                "dormant proxies vclusters at /vcluster/<namespace>/<name>/".into(),
                None,
            ),
            ProxyError::NoSuchVCluster(t) => (
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("vcluster {}/{} not found", t.namespace, t.name),
                None,
            ),
            ProxyError::BadClientCert(t, why) => (
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                format!("client certificate not valid for vcluster {}/{}: {why}", t.namespace, t.name),
                None,
            ),
            ProxyError::CredentialsRequired(t) => (
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                format!(
                    "vcluster {}/{} is asleep; only an authenticated request wakes it",
                    t.namespace, t.name
                ),
                None,
            ),
            ProxyError::TokenRefused(t) => (
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                format!(
                    "vcluster {}/{} is asleep, and its API server refused this token when it was last awake; it is not woken for it (another credential wakes it, or: dormant wake vcluster/{}/{})",
                    t.namespace, t.name, t.namespace, t.name
                ),
                None,
            ),
            ProxyError::AsleepIgnored(t) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                format!(
                    "vcluster {}/{} is asleep and this request does not count as use ({IGNORE_HEADER} or an ignore rule)",
                    t.namespace, t.name
                ),
                None,
            ),
            ProxyError::Prevented(t, until) => match until {
                Until::Never => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailable",
                    format!(
                        "vcluster {}/{} was put to sleep and requests do not wake it; wake it with: dormant wake vcluster/{}/{}",
                        t.namespace, t.name, t.namespace, t.name
                    ),
                    None,
                ),
                Until::Time(at) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailable",
                    format!(
                        "vcluster {}/{} is asleep and requests do not wake it until {}",
                        t.namespace,
                        t.name,
                        rfc3339(*at)
                    ),
                    None,
                ),
            },
            ProxyError::WakeOnRequestOff(t) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                format!(
                    "vcluster {}/{} is asleep and its policy does not wake it on request (wake.onRequest: false)",
                    t.namespace, t.name
                ),
                None,
            ),
            ProxyError::Overloaded(t, n) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                format!(
                    "vcluster {}/{} is waking and {n} requests are already waiting; retry shortly",
                    t.namespace, t.name
                ),
                Some(5),
            ),
            ProxyError::WakeTimeout(t, d) => (
                StatusCode::GATEWAY_TIMEOUT,
                "Timeout",
                format!(
                    "vcluster {}/{} did not wake within {}",
                    t.namespace,
                    t.name,
                    crate::policy::duration::format(*d)
                ),
                None,
            ),
            ProxyError::WakeFailed(t, e) => (
                StatusCode::BAD_GATEWAY,
                "ServiceUnavailable",
                format!("waking vcluster {}/{} failed: {e}", t.namespace, t.name),
                None,
            ),
            ProxyError::Upstream(t, e) => (
                StatusCode::BAD_GATEWAY,
                "ServiceUnavailable",
                format!("vcluster {}/{} is unreachable: {e}", t.namespace, t.name),
                None,
            ),
        };
        let body = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code.as_u16(),
        });
        let mut r = Response::new(full(Bytes::from(body.to_string())));
        *r.status_mut() = code;
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(s) = retry_after
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        r
    }
}

fn full(b: Bytes) -> ProxyBody {
    Full::new(b).map_err(|never| match never {}).boxed()
}

/// Who the caller is, as far as the proxy can tell.
#[derive(Debug, Clone, PartialEq)]
enum Caller {
    /// Verified client certificate: forwarded with impersonation.
    Certificate {
        user: String,
        groups: Vec<String>,
    },
    /// A bearer token, passed through untouched; for a ServiceAccount
    /// token, the account it names (not verified: used only to attribute
    /// activity, never to authorize).
    Bearer {
        service_account: Option<(String, Vec<String>)>,
    },
    Anonymous,
}

/// What governs waking a target now.
struct WakeRules {
    on_request: bool,
    timeout: Duration,
    prevented: Option<Until>,
}

pub struct Proxy {
    pub stores: Stores,
    pub upstreams: Upstreams,
    pub gate: Gate,
    pub observer: Arc<Observer>,
    pub metrics: Arc<Metrics>,
    pub scaler: Scaler,
    pub defaults: Defaults,
    pub scope: Scope,
    pub changes: broadcast::Sender<Change>,
    pub base_domain: Option<String>,
    /// Targets whose upstream answered since they were last seen asleep
    /// (false: the control plane may be Ready before its API server serves).
    confirmed: Mutex<HashMap<TargetRef, bool>>,
    /// Targets whose API server a background check is waiting for.
    confirming: Mutex<HashSet<TargetRef>>,
    /// Bearer tokens each target's API server answered 401.
    refused: refused::Refused,
}

impl Proxy {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        stores: Stores,
        upstreams: Upstreams,
        gate: Gate,
        observer: Arc<Observer>,
        metrics: Arc<Metrics>,
        scaler: Scaler,
        defaults: Defaults,
        scope: Scope,
        changes: broadcast::Sender<Change>,
        base_domain: Option<String>,
    ) -> Self {
        Proxy {
            stores,
            upstreams,
            gate,
            observer,
            metrics,
            scaler,
            defaults,
            scope,
            changes,
            base_domain,
            confirmed: Mutex::new(HashMap::new()),
            confirming: Mutex::new(HashSet::new()),
            refused: refused::Refused::default(),
        }
    }

    /// The control plane runs and is Ready, as the watch sees it.
    fn control_plane_ready(&self, t: &TargetRef) -> bool {
        self.stores.object(t).is_some_and(|o| Self::object_ready(&o))
    }

    /// [`Proxy::control_plane_ready`] for the object at hand. Of its
    /// annotations only the state is read: this runs for each request.
    fn object_ready(object: &TargetObject) -> bool {
        let state = object.annotations().get(ann::STATE).and_then(|s| s.parse::<ann::TargetState>().ok());
        if matches!(state, Some(ann::TargetState::Asleep | ann::TargetState::Sleeping)) {
            return false;
        }
        match object {
            TargetObject::StatefulSet(s) => {
                s.spec.replicas.unwrap_or(1) > 0
                    && s.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0) > 0
            }
            TargetObject::Deployment(d) => {
                d.spec.replicas.unwrap_or(1) > 0
                    && d.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0) > 0
            }
            TargetObject::Namespace(_) => false,
        }
    }

    /// Ready to forward to: the control plane Ready (`object` is the
    /// target's, as the store has it) and its API server confirmed.
    fn ready(&self, t: &TargetRef, object: Option<&TargetObject>) -> bool {
        let up = object.is_some_and(Self::object_ready);
        let mut confirmed = self.confirmed.lock().unwrap_or_else(|e| e.into_inner());
        if !up {
            confirmed.insert(t.clone(), false);
            return false;
        }
        *confirmed.get(t).unwrap_or(&true)
    }

    /// Follows the watch: a control plane seen down (asleep, or restarting)
    /// is no longer confirmed until its API server answers again.
    pub async fn track(self: Arc<Self>) {
        let mut changes = self.changes.subscribe();
        loop {
            match changes.recv().await {
                Ok(Change::Target(t)) if t.kind == crate::target::TargetKind::VCluster => self.follow(&t),
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let known: Vec<TargetRef> =
                        self.confirmed.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
                    for t in known {
                        self.follow(&t);
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// A control plane seen down is unconfirmed; one seen Ready while
    /// unconfirmed, with no wake of this proxy's under way (something else
    /// woke it: another replica, `dormant wake`, a schedule, audit
    /// activity), is confirmed by a check of its own. Without it, requests
    /// that may not wake a vcluster (anonymous, ignored, a refused token)
    /// would be refused as if it slept until a counted request came.
    fn follow(self: &Arc<Self>, t: &TargetRef) {
        if !self.control_plane_ready(t) {
            self.set_confirmed(t, false);
            return;
        }
        let unconfirmed = self.confirmed.lock().unwrap_or_else(|e| e.into_inner()).get(t) == Some(&false);
        if !unconfirmed || self.gate.waking(t) {
            return;
        }
        if !self.confirming.lock().unwrap_or_else(|e| e.into_inner()).insert(t.clone()) {
            return;
        }
        let (proxy, t) = (self.clone(), t.clone());
        tokio::spawn(async move {
            let limit = proxy.wake_rules(&t).timeout * 3 + Duration::from_secs(60);
            match proxy.api_server_ready(&t, Instant::now(), limit).await {
                Ok(()) if proxy.control_plane_ready(&t) => {
                    proxy.set_confirmed(&t, true);
                    tracing::info!(target = %t, "vcluster woken elsewhere answers; forwarding to it");
                }
                Ok(()) => {}
                Err(e) => tracing::debug!(target = %t, error = %e, "vcluster seen Ready did not answer"),
            }
            proxy.confirming.lock().unwrap_or_else(|e| e.into_inner()).remove(&t);
        });
    }

    fn set_confirmed(&self, t: &TargetRef, v: bool) {
        self.confirmed.lock().unwrap_or_else(|e| e.into_inner()).insert(t.clone(), v);
    }

    /// Waits until `t`'s API server is ready, or `limit` after `started`,
    /// on a fresh upstream client: pooled connections went to the API server
    /// that stopped when the vcluster slept.
    async fn api_server_ready(&self, t: &TargetRef, started: Instant, limit: Duration) -> Result<(), String> {
        self.upstreams.invalidate(t);
        let up = self.upstreams.get(t).await.map_err(|e| e.to_string())?;
        readyz(&up, started, limit).await
    }

    fn wake_rules(&self, t: &TargetRef) -> WakeRules {
        let fallback = WakeRules { on_request: true, timeout: self.defaults.wake_timeout, prevented: None };
        let Some(target) = self.stores.target(t) else { return fallback };
        let Ok(a) = TargetAnnotations::parse(target.object.annotations()) else { return fallback };
        let now = Utc::now();
        let prevented = match (a.force_sleep, a.prevent_wakeup_until) {
            (Some(ForceSleep::Since(_) | ForceSleep::Requested), Some(u)) if u.covers(now) => Some(u),
            _ => None,
        };
        match resolve(t.kind, &target.namespace_labels, &a, &self.stores.candidates(), &self.defaults) {
            Ok(p) => {
                WakeRules { on_request: p.wake_on_request.value, timeout: p.wake_timeout.value, prevented }
            }
            Err(_) => WakeRules { prevented, ..fallback },
        }
    }

    /// Wakes `t`: a wake request on the target (an idempotent patch the
    /// leader acts on), then the control plane Ready (from the watch), then
    /// the API server answering `/readyz`.
    fn wake(
        self: &Arc<Self>,
        t: TargetRef,
        activity: Arc<Activity>,
        limit: Duration,
    ) -> impl Future<Output = Result<(), String>> + Send + 'static {
        let proxy = self.clone();
        async move {
            let started = Instant::now();
            let mut changes = proxy.changes.subscribe();
            proxy.set_confirmed(&t, false);
            let Some(target) = proxy.stores.target(&t) else { return Err("the vcluster is gone".into()) };
            let mut patch = BTreeMap::new();
            patch.insert(ann::LAST_ACTIVITY, Some(rfc3339(activity.at)));
            patch.insert(ann::LAST_ACTIVITY_BY, Some(activity.summary()));
            proxy.scaler.annotate_target(&target.object, &patch).await.map_err(|e| format!("{e}"))?;
            tracing::info!(target = %t, by = %activity.summary(), "wake requested by a held request");
            while !proxy.control_plane_ready(&t) {
                let left = limit.saturating_sub(started.elapsed());
                if left.is_zero() {
                    return Err(format!(
                        "the control plane was not Ready within {}",
                        crate::policy::duration::format(limit)
                    ));
                }
                // Woken by the watch; the timeout is only a backstop for a
                // missed or lagged broadcast.
                let _ = tokio::time::timeout(left.min(Duration::from_secs(1)), changes.recv()).await;
            }
            let ready_after = started.elapsed();
            proxy.api_server_ready(&t, started, limit).await?;
            proxy.set_confirmed(&t, true);
            tracing::info!(
                target = %t,
                took = ?started.elapsed(),
                control_plane_ready_after = ?ready_after,
                "vcluster awake; releasing held requests"
            );
            Ok(())
        }
    }

    /// Handles one request.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        conn: Arc<Conn<Kept>>,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let result = self.clone().serve(req, &conn).await;
        let (outcome, resp) = match result {
            Ok((outcome, resp)) => (outcome, resp),
            Err(e) => {
                if !matches!(e, ProxyError::NotRouted) {
                    tracing::debug!(error = ?e, "proxy refused a request");
                }
                (e.outcome(), e.response())
            }
        };
        self.metrics
            .proxy_requests
            .get_or_create(&ProxyLabels { outcome, code: resp.status().as_u16() })
            .inc();
        self.metrics
            .proxy_duration
            .get_or_create(&OutcomeLabels { outcome })
            .observe(started.elapsed().as_secs_f64());
        resp
    }

    async fn serve(
        self: Arc<Self>,
        req: Request<Incoming>,
        conn: &Conn<Kept>,
    ) -> Result<(&'static str, Response<ProxyBody>), ProxyError> {
        let (mut parts, body) = req.into_parts();
        let req = &parts;
        // 1. Route.
        let pq = req.uri.path_and_query().map_or("/", |p| p.as_str());
        let routed = self
            .base_domain
            .as_deref()
            .and_then(|base| {
                let host =
                    req.headers.get(header::HOST).and_then(|h| h.to_str().ok()).or_else(|| req.uri.host());
                route::by_host(host.unwrap_or_default(), base, pq)
            })
            .or_else(|| route::by_path(pq))
            .ok_or(ProxyError::NotRouted)?;
        let t = routed.target.clone();
        let object = self.stores.object(&t);
        if object.is_none() || !self.stores.in_scope(&self.scope, &t.namespace) {
            return Err(ProxyError::NoSuchVCluster(t));
        }

        // 2. Authenticate.
        let caller = match conn.peer.as_deref().and_then(<[_]>::split_first) {
            Some((cert, intermediates)) => {
                let up = self
                    .upstreams
                    .get(&t)
                    .await
                    .map_err(|e| ProxyError::Upstream(t.clone(), e.to_string()))?;
                up.client_verifier
                    .verify_client_cert(cert, intermediates, rustls_pki_types::UnixTime::now())
                    .map_err(|e| ProxyError::BadClientCert(t.clone(), e.to_string()))?;
                let (user, groups) = subject(cert)
                    .ok_or_else(|| ProxyError::BadClientCert(t.clone(), "no common name".into()))?;
                Caller::Certificate { user, groups }
            }
            None => match bearer_token(&req.headers) {
                Some(token) => Caller::Bearer { service_account: service_account(token) },
                None => Caller::Anonymous,
            },
        };

        // 3. Record activity.
        let route::RequestInfo { verb, resource, path, long_running } =
            route::request_info(req.method.as_str(), &routed.path_and_query);
        let (user, groups) = match &caller {
            Caller::Certificate { user, groups } => (user.clone(), groups.clone()),
            // Whether a token is valid is the upstream's to know; a
            // ServiceAccount token names its account, which is all the
            // activity record and ignore rules need. Other tokens are
            // attributed exactly by the vcluster's audit webhook.
            Caller::Bearer { service_account: Some((user, groups)) } => (user.clone(), groups.clone()),
            Caller::Bearer { service_account: None } => ("(bearer token)".to_string(), vec![]),
            Caller::Anonymous => ("system:anonymous".to_string(), vec![]),
        };
        // Shared: the ledger keeps it, and a held request wakes with it.
        let activity = Arc::new(Activity {
            at: Utc::now(),
            source: Source::Proxy,
            user,
            groups,
            user_agent: req
                .headers
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string(),
            verb,
            resource,
            path,
        });
        let opted_out = req
            .headers
            .get(IGNORE_HEADER)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        // Whether it counts is known now; it is recorded once the upstream
        // has answered, unless that answer is 401 (the upstream could not
        // authenticate the caller: nobody used the target), or when it wakes
        // the target (a sleeping API server cannot say whether a credential
        // is good).
        let counted =
            !opted_out && caller != Caller::Anonymous && self.observer.judge(&t, &activity).is_none();
        let mut recorded = false;

        // 4. Wake gate.
        let mut outcome = "forwarded";
        let bodiless = matches!(parts.method, http::Method::GET | http::Method::HEAD | http::Method::OPTIONS)
            && parts.headers.get(header::CONTENT_LENGTH).is_none_or(|v| v == "0")
            && !parts.headers.contains_key(header::TRANSFER_ENCODING);
        let mut attempts = 0;
        let mut body = Some(body);
        let mut object = object;
        loop {
            attempts += 1;
            // The object looked up above serves the first pass; a retry
            // looks again.
            if !self.ready(&t, object.take().or_else(|| self.stores.object(&t)).as_ref()) {
                if caller == Caller::Anonymous {
                    return Err(ProxyError::CredentialsRequired(t));
                }
                if matches!(caller, Caller::Bearer { .. })
                    && let Some(token) = bearer_token(&parts.headers)
                    && self.refused.refused(&t, token, Instant::now()).is_some()
                {
                    return Err(ProxyError::TokenRefused(t));
                }
                if !counted {
                    return Err(ProxyError::AsleepIgnored(t));
                }
                if !recorded {
                    self.observer.record(&t, activity.clone());
                    recorded = true;
                }
                let rules = self.wake_rules(&t);
                if let Some(until) = rules.prevented {
                    return Err(ProxyError::Prevented(t, until));
                }
                if !rules.on_request {
                    return Err(ProxyError::WakeOnRequestOff(t));
                }
                // The wake outlives the waiters' timeout: those who give up get
                // 504, later requests join the same wake while it goes on. It
                // is made only by the request that starts it (and runs in its
                // own task): a waiter holds nothing of it.
                let limit = rules.timeout * 3 + Duration::from_secs(60);
                let wake = || self.wake(t.clone(), activity.clone(), limit);
                self.gate.wait(&t, rules.timeout, wake).await.map_err(|e| match e {
                    GateError::Overloaded { waiting } => ProxyError::Overloaded(t.clone(), waiting),
                    GateError::Timeout(d) => ProxyError::WakeTimeout(t.clone(), d),
                    GateError::WakeFailed(e) => ProxyError::WakeFailed(t.clone(), e),
                })?;
                outcome = "held";
            }

            // 5. Forward. A bodiless GET/HEAD/OPTIONS that got no answer
            // (refused, or the connection closed first) is idempotent: it
            // goes through the gate again once (the control plane went down
            // or restarted under us).
            let keep_awake = long_running && counted && !self.observer.rules.get(&t).active_connections;
            let this_body = match body.take() {
                Some(b) => ForwardBody::Incoming(b),
                None => ForwardBody::Empty,
            };
            // Boxed: a request held at the gate above would otherwise carry
            // room for the whole forwarding state while it waits.
            match Box::pin(self.forward(
                &mut parts,
                conn,
                this_body,
                &routed,
                &caller,
                keep_awake.then_some(activity.clone()),
            ))
            .await
            {
                Err(Forward::NoAnswer(e)) if bodiless && attempts < 2 => {
                    tracing::debug!(target = %t, error = %e, "no answer from the upstream; waiting for it and retrying");
                    continue;
                }
                Err(Forward::NoAnswer(e)) => return Err(ProxyError::Upstream(t.clone(), e)),
                Err(Forward::Refused(e)) => return Err(e),
                Ok(resp) => {
                    // The token is read again only when there is something to
                    // remember or, with anything remembered, to forget.
                    let unauthorized = resp.status() == StatusCode::UNAUTHORIZED;
                    if matches!(caller, Caller::Bearer { .. })
                        && (unauthorized || !self.refused.is_empty())
                        && let Some(token) = bearer_token(&parts.headers)
                    {
                        if unauthorized {
                            self.refused.insert(&t, token, Instant::now());
                        } else {
                            self.refused.forget(&t, token);
                        }
                    }
                    if counted && !recorded {
                        if resp.status() == StatusCode::UNAUTHORIZED {
                            self.observer.turn_away(Source::Proxy, UNAUTHENTICATED);
                        } else {
                            self.observer.record(&t, activity);
                        }
                    }
                    return Ok((outcome, resp));
                }
            }
        }
    }

    async fn forward(
        self: &Arc<Self>,
        req: &mut http::request::Parts,
        conn: &Conn<Kept>,
        body: ForwardBody,
        routed: &route::Routed,
        caller: &Caller,
        keep_awake: Option<Arc<Activity>>,
    ) -> Result<Response<ProxyBody>, Forward> {
        let (t, path_and_query) = (&routed.target, routed.path_and_query.as_str());
        let up = self.upstreams.get(t).await.map_err(|e| ProxyError::Upstream(t.clone(), e.to_string()))?;
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
                let value = |s: &str| {
                    HeaderValue::from_str(s)
                        .map_err(|_| ProxyError::BadClientCert(t.clone(), "unusable subject".into()))
                };
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
                // No answer: the connection failed (refused, or closed
                // before a response — an API server restarting under us).
                // The target goes through the gate again, and a bodiless
                // GET/HEAD/OPTIONS is safe to send once more.
                self.set_confirmed(t, false);
                self.upstreams.invalidate(t);
                return Err(Forward::NoAnswer(error_chain(&*e)));
            }
        };
        let guard = keep_awake.map(|a| KeepAwake::start(self.observer.clone(), t.clone(), a));
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

    /// Serves HTTPS on `listener` until the task is dropped.
    pub async fn serve_tls(self: Arc<Self>, listener: TcpListener, tls: TlsAcceptor) {
        crate::tls::serve_https(listener, tls, move |req, conn| self.clone().handle(req, conn)).await
    }
}

/// Waits until `up`'s API server is ready, or `limit` after `started`.
///
/// Ready means `/readyz` 200, asked with the vcluster's admin credential: a
/// starting kube-apiserver serves requests before its RBAC roles are
/// loaded, and would refuse users it is about to allow. Without an admin
/// credential only anonymous asking is possible, and 401/403 must do (the
/// server answers). Attempts are short (one sent while the server starts
/// may hang) and follow each other quickly while held requests may be
/// waiting, then slowly (see [`readyz_pause`]).
async fn readyz(up: &upstream::Upstream, started: Instant, limit: Duration) -> Result<(), String> {
    let (checker, strict) = match &up.admin {
        Some(admin) => (&admin.client, true),
        None => (&up.plain.client, false),
    };
    let polling = Instant::now();
    loop {
        let req = Request::get(up.origin.uri("/readyz").map_err(|e| e.to_string())?)
            .body(full(Bytes::new()))
            .map_err(|e| e.to_string())?;
        if let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_millis(250), checker.request(req)).await {
            let answers = !strict && matches!(resp.status().as_u16(), 401 | 403);
            if resp.status().is_success() || answers {
                return Ok(());
            }
        }
        if started.elapsed() > limit {
            return Err(format!(
                "the API server did not answer within {}",
                crate::policy::duration::format(limit)
            ));
        }
        tokio::time::sleep(readyz_pause(polling.elapsed())).await;
    }
}

/// The pause between `/readyz` attempts after `polling_for`: 2 ms for the
/// first 10 s (an API server usually starts within them, and held requests
/// wait on this), then 250 ms, so that an API server that never says ready
/// (a rejected admin credential, a gateway that does not pass `/readyz`) is
/// not asked hundreds of times a second until the wake gives up.
fn readyz_pause(polling_for: Duration) -> Duration {
    if polling_for < Duration::from_secs(10) { Duration::from_millis(2) } else { Duration::from_millis(250) }
}

/// The token of an `Authorization: Bearer` header, read as kube-apiserver
/// reads it: the scheme in any case, the token up to the next space, none
/// when empty.
fn bearer_token(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let mut parts = value.splitn(3, ' ');
    let (scheme, token) = (parts.next()?, parts.next()?);
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The body to forward: the caller's, or none on a retry.
enum ForwardBody {
    Incoming(Incoming),
    Empty,
}

/// Why forwarding failed.
enum Forward {
    /// No answer came back (refused, or the connection closed first).
    NoAnswer(String),
    Refused(ProxyError),
}

impl From<ProxyError> for Forward {
    fn from(e: ProxyError) -> Self {
        Forward::Refused(e)
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The user and groups Kubernetes gives the ServiceAccount a token was
/// issued to (`sub` of a JWT: `system:serviceaccount:<namespace>:<name>`),
/// read without verifying the signature. A forged token gains nothing: the
/// upstream rejects it, and the proxy only attributes activity with this.
fn service_account(token: &str) -> Option<(String, Vec<String>)> {
    use base64::Engine;
    let mut parts = token.split('.');
    let (_, payload, _) = (parts.next()?, parts.next()?, parts.next()?);
    // Only `sub`, borrowed: this runs for every request with a token.
    #[derive(serde::Deserialize)]
    struct Claims<'a> {
        #[serde(borrow)]
        sub: std::borrow::Cow<'a, str>,
    }
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).ok()?;
    let claims: Claims<'_> = serde_json::from_slice(&payload).ok()?;
    let sub = claims.sub.as_ref();
    let (namespace, name) = sub.strip_prefix("system:serviceaccount:")?.split_once(':')?;
    let valid = |s: &str| !s.is_empty() && !s.contains(':');
    (valid(namespace) && valid(name)).then(|| {
        (
            sub.to_string(),
            vec![
                "system:serviceaccounts".to_string(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".to_string(),
            ],
        )
    })
}

/// The user (CN) and groups (O) a certificate names, read as
/// kube-apiserver reads them: the last CN (Go's `pkix.Name` keeps the last),
/// which must not be empty. An empty `Impersonate-User` would not
/// impersonate anyone, and the request would run as the admin credential
/// it is sent with.
fn subject(cert: &CertificateDer<'_>) -> Option<(String, Vec<String>)> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let subject = x509.subject();
    let user = subject.iter_common_name().last()?.as_str().ok()?.to_string();
    if user.is_empty() {
        return None;
    }
    let groups = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok().filter(|g| !g.is_empty()).map(String::from))
        .collect();
    Some((user, groups))
}

fn is_upgrade(h: &HeaderMap) -> bool {
    h.get(header::CONNECTION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case("upgrade")))
        && h.contains_key(header::UPGRADE)
}

/// Headers that belong to one connection, never forwarded (RFC 9110 7.6.1).
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    // Headers the Connection header names are hop-by-hop too.
    // Removed by name as written: looking a header up by `&str` does not
    // allocate (a `HeaderName` for `keep-alive` would).
    if h.contains_key(header::CONNECTION) {
        let values: Vec<HeaderValue> = h.get_all(header::CONNECTION).iter().cloned().collect();
        // Byte-wise: a value with one non-ASCII part still names the others.
        for part in values.iter().flat_map(|v| v.as_bytes().split(|b| *b == b',')) {
            let Ok(name) = std::str::from_utf8(part.trim_ascii()) else { continue };
            if !(keep_upgrade && name.eq_ignore_ascii_case("upgrade")) {
                h.remove(name);
            }
        }
    }
    for n in HOP_BY_HOP {
        if keep_upgrade && (n == header::CONNECTION || n == header::UPGRADE) {
            continue;
        }
        h.remove(n);
    }
}

/// The request headers to send upstream (hop-by-hop and Host removed:
/// `forward` sets the upstream's own; upgrades keep their headers).
fn forwardable(h: &HeaderMap, upgrade: bool) -> HeaderMap {
    let mut out = h.clone();
    strip_hop_by_hop(&mut out, upgrade);
    if upgrade {
        out.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    }
    out.remove(header::HOST);
    if let Some(v) = out.remove(IGNORE_HEADER)
        && v.to_str().is_ok_and(|v| v.eq_ignore_ascii_case("true"))
    {
        // The vcluster's API server may report this request through the
        // audit webhook too: the mark in its user agent tells dormant it
        // does not count there either.
        let ua = match out.get(header::USER_AGENT).map(HeaderValue::as_bytes) {
            Some(ua) => [ua, b" ", IGNORED_USER_AGENT_MARK.as_bytes()].concat(),
            None => IGNORED_USER_AGENT_MARK.as_bytes().to_vec(),
        };
        if let Ok(ua) = HeaderValue::from_bytes(&ua) {
            out.insert(header::USER_AGENT, ua);
        }
    }
    out
}

/// How often an open long-running request counts as use again: well inside
/// any idle timeout a user would set, and one in-memory ledger entry each.
const KEEP_AWAKE_EVERY: Duration = Duration::from_secs(5);

/// Keeps recording activity while a long-running request stays open (a
/// watch, exec or port-forward is use), until dropped.
struct KeepAwake(tokio::task::JoinHandle<()>);

impl KeepAwake {
    fn start(observer: Arc<Observer>, t: TargetRef, a: Arc<Activity>) -> Self {
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

/// Accepts any client certificate at the TLS layer (checking only that the
/// client holds its key); the chain is verified per request against the
/// CA of the vcluster the request is for, which the handshake cannot know.
#[derive(Debug)]
pub struct DeferredClientCert {
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl Default for DeferredClientCert {
    fn default() -> Self {
        DeferredClientCert { provider: crate::tls::provider() }
    }
}

impl rustls::server::danger::ClientCertVerifier for DeferredClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The proxy's TLS configuration: its certificate (reloaded on change),
/// h2 and http/1.1, client certificates requested but optional.
pub fn tls_config(cert: Arc<crate::tls::ReloadingCert>) -> Result<rustls::ServerConfig, crate::tls::Error> {
    crate::tls::server_config_with_resolver(cert, Some(Arc::new(DeferredClientCert::default())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_never_pass_and_upgrades_keep_theirs() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.append(header::CONNECTION, HeaderValue::from_static(" X-Other "));
        h.append(header::CONNECTION, HeaderValue::from_bytes(b"x-third, \xe9t\xe9").unwrap());
        h.insert("x-third", HeaderValue::from_static("1"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("x-other", HeaderValue::from_static("1"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::HOST, HeaderValue::from_static("proxy"));
        h.insert(IGNORE_HEADER, HeaderValue::from_static("true"));
        h.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        let out = forwardable(&h, false);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(out.contains_key(header::ACCEPT));
        // The opt-out goes on as a mark in the user agent.
        assert_eq!(out.get(header::USER_AGENT).unwrap(), IGNORED_USER_AGENT_MARK);
        h.insert(header::USER_AGENT, HeaderValue::from_static("kubectl/v1.37.2 (linux/amd64)"));
        let out = forwardable(&h, false);
        assert_eq!(out.get(header::USER_AGENT).unwrap(), "kubectl/v1.37.2 (linux/amd64) (dormant-ignore)");
        h.insert(IGNORE_HEADER, HeaderValue::from_static("false"));
        let out = forwardable(&h, false);
        assert_eq!(out.get(header::USER_AGENT).unwrap(), "kubectl/v1.37.2 (linux/amd64)");
        assert!(!out.contains_key(IGNORE_HEADER));

        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
        assert!(is_upgrade(&h));
        let out = forwardable(&h, true);
        assert_eq!(out.get(header::UPGRADE).unwrap(), "SPDY/3.1");
        assert_eq!(out.get(header::CONNECTION).unwrap(), "Upgrade");
    }

    #[test]
    fn bearer_tokens_are_read_as_kube_apiserver_reads_them() {
        let token = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            bearer_token(&h).map(String::from)
        };
        assert_eq!(token("Bearer abc"), Some("abc".into()));
        assert_eq!(token("bearer abc"), Some("abc".into()));
        assert_eq!(token("BEARER abc "), Some("abc".into()));
        assert_eq!(token("Bearer abc def"), Some("abc".into()));
        assert_eq!(token("Bearer"), None);
        assert_eq!(token("Bearer "), None);
        assert_eq!(token("Bearer  abc"), None, "kube-apiserver reads an empty token here");
        assert_eq!(token("Basic YWxpY2U6c2VjcmV0"), None);
        assert_eq!(token("Bearerabc"), None);
    }

    #[test]
    fn a_certificate_names_its_last_common_name_and_never_an_empty_one() {
        let der = |cert: testbed::pki::CertPair| {
            crate::tls::certs_from_pem(cert.cert_pem.as_bytes(), "test").unwrap().remove(0)
        };
        let ca = testbed::pki::Ca::new("subject-test").unwrap();
        assert_eq!(
            subject(&der(ca.client("alice", &["team-a"]).unwrap())),
            Some(("alice".to_string(), vec!["team-a".to_string()]))
        );
        assert_eq!(subject(&der(ca.client("", &[]).unwrap())), None);
        assert_eq!(subject(&der(ca.client("", &["system:masters"]).unwrap())), None);
    }

    #[test]
    fn a_service_account_token_names_its_account_and_other_tokens_nothing() {
        use base64::Engine;
        let jwt = |claims: &str| {
            let b = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
            format!("{}.{}.{}", b(r#"{"alg":"RS256"}"#), b(claims), b("signature"))
        };
        let (user, groups) =
            service_account(&jwt(r#"{"sub":"system:serviceaccount:argocd:argocd-application-controller"}"#))
                .unwrap();
        assert_eq!(user, "system:serviceaccount:argocd:argocd-application-controller");
        assert_eq!(
            groups,
            ["system:serviceaccounts", "system:serviceaccounts:argocd", "system:authenticated"]
        );
        for token in [
            jwt(r#"{"sub":"alice@example.com"}"#),
            jwt(r#"{"sub":"system:serviceaccount:argocd"}"#),
            jwt(r#"{"sub":"system:serviceaccount:a:b:c"}"#),
            jwt("not json"),
            "abcdef0123456789".to_string(),
            "a.%%%.c".to_string(),
        ] {
            assert_eq!(service_account(&token), None, "{token}");
        }
    }

    /// Every answer the proxy gives itself is a Kubernetes `Status` with
    /// the code, reason and metric label `docs/proxy.md` gives it, one row
    /// per kind of refusal.
    #[test]
    fn errors_are_kubernetes_statuses_with_the_documented_codes() {
        let doc = include_str!("../../docs/proxy.md");
        // | `504` | `Timeout` | `timeout` | when |
        let documented: Vec<(u16, String, String)> = doc
            .lines()
            .filter_map(|l| {
                let cells: Vec<&str> = l.split('|').map(|c| c.trim().trim_matches('`')).collect();
                let code = cells.get(1)?.parse::<u16>().ok()?;
                Some((code, cells.get(2)?.to_string(), cells.get(3)?.to_string()))
            })
            .collect();
        let t = TargetRef::vcluster("team-a", "dev");
        let errors = [
            ProxyError::NotRouted,
            ProxyError::NoSuchVCluster(t.clone()),
            ProxyError::BadClientCert(t.clone(), "unknown issuer".into()),
            ProxyError::CredentialsRequired(t.clone()),
            ProxyError::TokenRefused(t.clone()),
            ProxyError::AsleepIgnored(t.clone()),
            ProxyError::Prevented(t.clone(), Until::Never),
            ProxyError::WakeOnRequestOff(t.clone()),
            ProxyError::Overloaded(t.clone(), 1000),
            ProxyError::WakeTimeout(t.clone(), Duration::from_secs(120)),
            ProxyError::WakeFailed(t.clone(), "forbidden".into()),
            ProxyError::Upstream(t.clone(), "connection refused".into()),
        ];
        assert_eq!(documented.len(), errors.len(), "docs/proxy.md's table: {documented:?}");
        for e in errors {
            let outcome = e.outcome();
            let r = e.response();
            let code = r.status().as_u16();
            let retry = r.headers().contains_key(header::RETRY_AFTER);
            assert_eq!(retry, matches!(e, ProxyError::Overloaded(..)), "Retry-After on {e:?}");
            let body = futures::executor::block_on(r.into_body().collect()).unwrap().to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let reason = v["reason"].as_str().unwrap_or_default().to_string();
            assert_eq!((v["kind"].as_str(), v["code"].as_u64()), (Some("Status"), Some(u64::from(code))));
            assert!(
                documented.contains(&(code, reason.clone(), outcome.to_string())),
                "{e:?} answers {code} {reason} ({outcome}), which docs/proxy.md does not list"
            );
            if !matches!(e, ProxyError::NotRouted) {
                assert!(v["message"].as_str().unwrap().contains("team-a/dev"), "{v}");
            }
        }
    }
}
