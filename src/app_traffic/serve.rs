//! One request to a held Service port, in the order [`App::serve`] reads
//! top-down:
//! 1. **route** — the port it came to names the target, Service and port
//!    ([`super::listen`]); nothing in the request can change that;
//! 2. **record** — what it is (method, path, user agent) and whether it
//!    counts as use: the activity observer judges (health checkers and
//!    uptime robots never count), before any waiting;
//! 3. **forward at once** when the Service's own endpoints are ready and
//!    the target is not going to sleep (a wake just finished, or a client
//!    kept its connection from before);
//! 4. **admit** — may it wake the target ([`admit`], pure);
//! 5. **waiting page** for a browser, when the target or Service asks for
//!    it: the wake starts and the page answers at once;
//! 6. **hold and wake** — the proxy's gate: one wake per Service port
//!    however many wait, a bounded queue, a timeout (504);
//! 7. **forward** to one of the Service's own ready endpoints
//!    ([`super::forward`]).
//!
//! Every answer the listener gives itself comes from [`super::page`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Utc;
use http::{Request, Response, header};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use tokio::sync::broadcast;

use super::endpoints::{Endpoints, Ready};
use super::forward::{Awake, Failed, Upstream};
use super::page::{Answer, Progress, wants_html};
use super::slice::Route;
use crate::activity::observe::Observer;
use crate::activity::{Activity, Source};
use crate::annotate::Annotator;
use crate::metrics::{Metrics, OutcomeLabels, ProxyLabels};
use crate::policy::Defaults;
use crate::policy::annotations::TargetState;
use crate::proxy::admit::WakeRules;
use crate::proxy::error::full;
use crate::proxy::gate::{Class, Gate, GateError};
use crate::proxy::upstream::ProxyBody;
use crate::target::effective::effective;
use crate::target::stores::Change;
use crate::target::{Scope, Stores, TargetRef};
use crate::vocab::{IGNORE_HEADER, STATE, WAITING_PAGE};

/// Who app traffic is recorded as: visitors are anonymous.
pub const VISITOR: &str = "(visitor)";

/// An app's visitors carry no credential dormant could check: they all
/// wait in one queue, whose size is the listener's own flag
/// (`--app-traffic-max-waiting`), not the proxy's.
const VISITORS: Class = Class::Proven;

/// The gate's key: one wake per Service port.
pub type Key = (String, String, String);

fn key(route: &Route) -> Key {
    (route.namespace.clone(), route.service.clone(), route.port.clone())
}

/// Why a wake did not bring a Service's endpoints up.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WakeError {
    #[error("the target is gone")]
    Gone,
    #[error("failed to request the wake")]
    Request(#[source] Arc<crate::annotate::Error>),
    #[error("the Service had no ready endpoint within {}", crate::policy::duration::format(*.0))]
    NotReady(Duration),
}

/// What the listener is made of.
pub struct Parts {
    pub stores: Stores,
    pub observer: Arc<Observer>,
    pub annotator: Annotator,
    pub metrics: Arc<Metrics>,
    pub defaults: Defaults,
    pub scope: Scope,
    pub endpoints: Endpoints,
    /// The stores' changes (a target's state).
    pub changes: broadcast::Sender<Change>,
    /// Requests that may wait for one Service port.
    pub max_waiting: usize,
}

/// The app-traffic listener's request path, shared by every port.
pub struct App {
    stores: Stores,
    observer: Arc<Observer>,
    annotator: Annotator,
    metrics: Arc<Metrics>,
    defaults: Defaults,
    scope: Scope,
    pub endpoints: Endpoints,
    gate: Gate<WakeError, Key>,
    upstream: Upstream,
    changes: broadcast::Sender<Change>,
    /// Round-robin over a Service's endpoints.
    next: AtomicUsize,
    /// When this replica first asked to wake each target (the waiting
    /// page's clock).
    waking_since: std::sync::Mutex<std::collections::HashMap<TargetRef, Instant>>,
}

/// What to do with a request for a target that is not serving.
pub fn admit(counted: bool, rules: &Result<WakeRules, String>) -> Result<Duration, Answer> {
    if !counted {
        return Err(Answer::AsleepIgnored);
    }
    match rules {
        Err(_) => Err(Answer::Invalid),
        Ok(WakeRules { prevented: Some(until), .. }) => Err(Answer::Prevented(*until)),
        Ok(WakeRules { on_request: false, .. }) => Err(Answer::WakeOnRequestOff),
        Ok(WakeRules { timeout, .. }) => Ok(*timeout),
    }
}

impl App {
    pub fn new(p: Parts) -> Self {
        let gate = Gate::new(p.max_waiting, p.metrics.app_waiting.clone());
        App {
            stores: p.stores,
            observer: p.observer,
            annotator: p.annotator,
            metrics: p.metrics,
            defaults: p.defaults,
            scope: p.scope,
            endpoints: p.endpoints,
            gate,
            upstream: Upstream::new(),
            changes: p.changes,
            next: AtomicUsize::new(0),
            waking_since: Default::default(),
        }
    }

    /// Handles one request that came to `route`'s port from `peer`.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        route: Arc<Route>,
        peer: SocketAddr,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let html = wants_html(req.headers());
        let span = tracing::debug_span!("app", target = %route.target, service = %route.service);
        let (outcome, resp) = match tracing::Instrument::instrument(self.serve(req, &route, peer), span).await
        {
            Ok(done) => done,
            Err(answer) => {
                if !matches!(answer, Answer::Waiting(_)) {
                    tracing::debug!(target = %route.target, service = %route.service, answer = ?answer, "answered a request itself");
                }
                (answer.outcome(), answer.response(html))
            }
        };
        self.metrics.app_requests.get_or_create(&ProxyLabels { outcome, code: resp.status().as_u16() }).inc();
        self.metrics
            .app_duration
            .get_or_create(&OutcomeLabels { outcome })
            .observe(started.elapsed().as_secs_f64());
        resp
    }

    /// The steps of the module documentation, in order.
    async fn serve(
        self: &Arc<Self>,
        req: Request<Incoming>,
        route: &Arc<Route>,
        peer: SocketAddr,
    ) -> Result<(&'static str, Response<ProxyBody>), Answer> {
        let t = &route.target;
        let (mut parts, body) = req.into_parts();

        // 2. Record.
        let activity = Arc::new(activity(&parts));
        let opted_out = parts
            .headers
            .get(IGNORE_HEADER)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let counted = if opted_out {
            self.observer.turn_away(Source::App, "header");
            false
        } else {
            self.observer.judge(t, &activity).is_none()
        };

        // 3. Forward at once when it serves.
        let mut eps = self.endpoints.watch(&route.namespace, &route.service);
        if !eps.borrow().known {
            // A Service seen for the first time: its slices are listed
            // once (a few milliseconds), rather than it taken for asleep.
            let _ = tokio::time::timeout(Duration::from_secs(2), eps.wait_for(|r| r.known)).await;
        }
        if self.serving(route, &eps.borrow()) {
            if counted {
                self.observer.record(t, activity.clone());
            }
            let resp = self.forward(route, &mut parts, body, peer, counted.then_some(&activity)).await?;
            return Ok(("forwarded", resp));
        }
        if self.stores.object(t).is_none() || !self.stores.in_scope(&self.scope, &t.namespace) {
            return Err(Answer::Gone);
        }

        // 4. Admit.
        let timeout = admit(counted, &self.wake_rules(t)).inspect_err(|_| {
            if counted {
                self.observer.record(t, activity.clone());
            }
        })?;
        self.observer.record(t, activity.clone());
        let limit = crate::proxy::wake::wake_limit(timeout);
        let wake = || self.wake(route.clone(), activity.clone(), limit);

        // 5. The waiting page: the wake starts (a wait that gives up at
        // once), the page answers; past the wake timeout, the page that
        // says it did not wake in time (as a held request is answered).
        if parts.method == http::Method::GET && self.waiting_page(route) && wants_html(&parts.headers) {
            let _ = self.gate.wait(&key(route), VISITORS, Duration::ZERO, wake).await;
            let progress = self.progress(route, &eps.borrow());
            if !progress.serving && progress.elapsed >= timeout {
                return Err(Answer::Timeout(timeout));
            }
            return Err(Answer::Waiting(progress));
        }

        // 6. Hold while it wakes.
        self.gate.wait(&key(route), VISITORS, timeout, wake).await.map_err(|e| match e {
            GateError::Overloaded { .. } => Answer::Overloaded,
            GateError::Timeout(d) => Answer::Timeout(d),
            GateError::WakeFailed(e) => {
                tracing::warn!(target = %t, service = %route.service, error = %crate::error::Chain(&e), "app-traffic wake failed");
                Answer::WakeFailed
            }
            GateError::Abandoned => Answer::WakeFailed,
        })?;

        // 7. Forward.
        let resp = self.forward(route, &mut parts, body, peer, Some(&activity)).await?;
        Ok(("held", resp))
    }

    /// Forwards to one of the Service port's ready endpoints, round-robin;
    /// a bodiless request that found no connection tries the next one.
    async fn forward(
        &self,
        route: &Route,
        parts: &mut http::request::Parts,
        body: Incoming,
        peer: SocketAddr,
        counted: Option<&Arc<Activity>>,
    ) -> Result<Response<ProxyBody>, Answer> {
        let eps: Vec<SocketAddr> =
            self.endpoints.watch(&route.namespace, &route.service).borrow().of(&route.port).to_vec();
        if eps.is_empty() {
            return Err(Answer::Unreachable);
        }
        let bodiless = matches!(parts.method, http::Method::GET | http::Method::HEAD | http::Method::OPTIONS)
            && parts.headers.get(header::CONTENT_LENGTH).is_none_or(|v| v == "0")
            && !parts.headers.contains_key(header::TRANSFER_ENCODING);
        let awake = counted.filter(|_| !self.observer.rules.get(&route.target).active_connections).map(|a| {
            Awake { observer: self.observer.clone(), target: route.target.clone(), activity: a.clone() }
        });
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        let mut body = Some(body.boxed());
        let tries = if bodiless { eps.len().min(3) } else { 1 };
        for i in 0..tries {
            let to = eps[(first + i) % eps.len()];
            let this = body.take().unwrap_or_else(|| full(Bytes::new()));
            match self.upstream.send(to, route.h2c(), parts, this, peer.ip(), awake.as_ref()).await {
                Ok(resp) => return Ok(resp),
                Err(Failed::Connect(e)) => {
                    tracing::debug!(target = %route.target, endpoint = %to, error = %e, "app endpoint refused; trying the next")
                }
                Err(Failed::Sent) => return Err(Answer::Unreachable),
            }
        }
        Err(Answer::Unreachable)
    }

    /// The Service port has a ready endpoint of its own and the target is
    /// not asleep or going to sleep.
    fn serving(&self, route: &Route, ready: &Ready) -> bool {
        if ready.of(&route.port).is_empty() {
            return false;
        }
        let state = self
            .stores
            .object(&route.target)
            .and_then(|o| o.annotations().get(STATE).and_then(|s| s.parse::<TargetState>().ok()));
        !matches!(state, Some(TargetState::Asleep | TargetState::Sleeping))
    }

    /// What governs waking `t` now, or why its policy cannot be read.
    fn wake_rules(&self, t: &TargetRef) -> Result<WakeRules, String> {
        match effective(&self.stores, &self.defaults, &self.scope, t) {
            Ok(Some(g)) => Ok(WakeRules::of(&g.policy, &g.annotations, Utc::now())),
            Ok(None) => Ok(WakeRules {
                on_request: true,
                timeout: self.defaults.wake_timeout,
                prevented: None,
                unverified_wake: None,
            }),
            Err(invalid) => Err(invalid.to_string()),
        }
    }

    /// The target or the Service asks for the waiting page.
    fn waiting_page(&self, route: &Route) -> bool {
        route.waiting_page
            || self
                .stores
                .object(&route.target)
                .is_some_and(|o| o.annotations().get(WAITING_PAGE).is_some_and(|v| v.trim() == "true"))
    }

    /// How far the target's wake is: its workloads' pods ready of those
    /// wanted (a recorded count while asleep), the app answering, and the
    /// time since this replica first asked to wake it.
    fn progress(&self, route: &Route, ready: &Ready) -> Progress {
        let t = &route.target;
        let (mut have, mut want) = (0u32, 0u32);
        if let Some(target) = self.stores.target(t) {
            for w in self.stores.workloads(&target).iter().filter(|w| w.kind.scales()) {
                let recorded = w
                    .annotations
                    .get(crate::vocab::REPLICAS_BEFORE_SLEEP)
                    .and_then(|v| v.parse::<i32>().ok());
                let wanted = u32::try_from(recorded.or(w.replicas).unwrap_or(0)).unwrap_or(0);
                want += wanted;
                have += u32::try_from(w.ready_pods).unwrap_or(0).min(wanted);
            }
        }
        let since = *self
            .waking_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(t.clone())
            .or_insert_with(Instant::now);
        Progress { ready: have, wanted: want, serving: self.serving(route, ready), elapsed: since.elapsed() }
    }

    /// Wakes `route`'s target: a use recorded on it (the leader acts on
    /// it), then the Service's own endpoints ready and the target no
    /// longer asleep, within `limit`.
    fn wake(
        self: &Arc<Self>,
        route: Arc<Route>,
        activity: Arc<Activity>,
        limit: Duration,
    ) -> impl Future<Output = Result<(), WakeError>> + Send + 'static {
        let app = self.clone();
        async move {
            let started = Instant::now();
            let t = &route.target;
            app.waking_since.lock().unwrap_or_else(|e| e.into_inner()).entry(t.clone()).or_insert(started);
            let mut changes = app.changes.subscribe();
            let mut eps = app.endpoints.watch(&route.namespace, &route.service);
            let object = app.stores.object(t).ok_or(WakeError::Gone)?;
            app.annotator
                .record_use(&object, activity.at, activity.summary())
                .await
                .map_err(|e| WakeError::Request(Arc::new(e)))?;
            tracing::info!(target = %t, service = %route.service, by = %activity.summary(), "wake requested by app traffic");
            let done = loop {
                if app.serving(&route, &eps.borrow_and_update()) {
                    break Ok(());
                }
                let left = limit.saturating_sub(started.elapsed());
                if left.is_zero() {
                    break Err(WakeError::NotReady(limit));
                }
                // Woken by the endpoints or the target changing; the
                // timeout is a backstop for a lagged broadcast.
                tokio::select! {
                    changed = eps.changed() => if changed.is_err() {
                        eps = app.endpoints.watch(&route.namespace, &route.service);
                    },
                    _ = changes.recv() => {}
                    () = tokio::time::sleep(left.min(Duration::from_secs(1))) => {}
                }
            };
            if done.is_ok() {
                tracing::info!(target = %t, service = %route.service, took = ?started.elapsed(), "app answers; releasing held requests");
            }
            app.waking_since.lock().unwrap_or_else(|e| e.into_inner()).remove(t);
            done
        }
    }

    /// Forgets what is kept for Services and targets nobody asked about in
    /// `idle`.
    pub fn sweep(&self, idle: Duration) {
        self.endpoints.sweep(idle);
    }

    /// A TLS connection (dormant does not terminate the app's TLS): held
    /// like a request while the target wakes, then spliced to one of the
    /// Service's ready endpoints. One connection is one use.
    pub async fn tunnel(self: Arc<Self>, mut client: tokio::net::TcpStream, route: Arc<Route>) {
        let t = &route.target;
        let activity = Arc::new(Activity {
            verb: "connect".into(),
            ..activity_of(String::new(), String::new(), String::new())
        });
        let counted = self.observer.judge(t, &activity).is_none();
        let eps = self.endpoints.watch(&route.namespace, &route.service);
        let outcome = async {
            if !self.serving(&route, &eps.borrow()) {
                let timeout = admit(counted, &self.wake_rules(t)).map_err(|a| a.outcome())?;
                self.observer.record(t, activity.clone());
                let wake =
                    || self.wake(route.clone(), activity.clone(), crate::proxy::wake::wake_limit(timeout));
                self.gate.wait(&key(&route), VISITORS, timeout, wake).await.map_err(|_| "timeout")?;
            } else if counted {
                self.observer.record(t, activity.clone());
            }
            let to: Vec<SocketAddr> =
                self.endpoints.watch(&route.namespace, &route.service).borrow().of(&route.port).to_vec();
            for addr in &to {
                if let Ok(Ok(up)) =
                    tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr)).await
                {
                    return Ok(up);
                }
            }
            Err("upstream-error")
        }
        .await;
        let outcome_label = match &outcome {
            Ok(_) => "tunneled",
            Err(o) => o,
        };
        self.metrics.app_requests.get_or_create(&ProxyLabels { outcome: outcome_label, code: 0 }).inc();
        let Ok(mut up) = outcome else { return };
        let _ = up.set_nodelay(true);
        let _awake = (counted && !self.observer.rules.get(t).active_connections).then(|| {
            crate::proxy::forward::KeepAwake::start(self.observer.clone(), t.clone(), activity.clone())
        });
        let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
    }
}

/// The activity a request is: method, path (without its query: what
/// `last-activity-by` shows must not carry tokens), user agent.
fn activity(parts: &http::request::Parts) -> Activity {
    let ua = parts.headers.get(header::USER_AGENT).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let mut path = parts.uri.path().to_string();
    if path.len() > 200 {
        let mut cut = 200;
        while !path.is_char_boundary(cut) {
            cut -= 1;
        }
        path.truncate(cut);
    }
    activity_of(parts.method.as_str().to_string(), path, ua.to_string())
}

fn activity_of(verb: String, path: String, user_agent: String) -> Activity {
    Activity {
        at: Utc::now(),
        source: Source::App,
        user: VISITOR.into(),
        groups: Vec::new(),
        user_agent,
        verb,
        resource: None,
        path,
        code: None,
        in_vcluster: false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::policy::annotations::Until;

    #[test]
    fn who_may_wake_an_app() {
        let wakes = Ok(WakeRules {
            on_request: true,
            timeout: Duration::from_secs(120),
            prevented: None,
            unverified_wake: None,
        });
        let off = Ok(WakeRules {
            on_request: false,
            timeout: Duration::from_secs(120),
            prevented: None,
            unverified_wake: None,
        });
        let never = Ok(WakeRules {
            on_request: true,
            timeout: Duration::from_secs(120),
            prevented: Some(Until::Never),
            unverified_wake: None,
        });
        let invalid: Result<WakeRules, String> = Err("bad".into());
        assert_eq!(admit(true, &wakes), Ok(Duration::from_secs(120)));
        assert_eq!(admit(false, &wakes), Err(Answer::AsleepIgnored));
        assert_eq!(admit(true, &off), Err(Answer::WakeOnRequestOff));
        assert_eq!(admit(true, &never), Err(Answer::Prevented(Until::Never)));
        assert_eq!(admit(true, &invalid), Err(Answer::Invalid));
        assert_eq!(admit(false, &invalid), Err(Answer::AsleepIgnored));
    }

    #[test]
    fn an_apps_activity_keeps_no_query_and_a_bounded_path() {
        let req = Request::get(format!("http://shop.example.com/reset/{}?token=secret", "é".repeat(150)))
            .header(header::USER_AGENT, "Mozilla/5.0")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let a = activity(&parts);
        assert!(!a.path.contains("secret") && a.path.len() <= 200, "{}", a.path);
        assert_eq!((a.user.as_str(), a.verb.as_str(), a.source), (VISITOR, "GET", Source::App));
        assert_eq!(a.summary().split(' ').next(), Some(VISITOR));
    }
}
