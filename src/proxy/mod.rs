//! The wake-on-request proxy for vcluster API servers.
//!
//! A request goes through these steps, each in a file of its own, in the
//! order [`Proxy::serve`] reads top-down:
//! 1. **route** ([`route`]) — which vcluster (path prefix or host name);
//!    first, because everything after depends on the target;
//! 2. **authenticate** ([`auth`]) — a client certificate is verified
//!    against that vcluster's CA (so only now, once the target is known);
//!    a bearer token is passed through for the upstream to judge;
//! 3. **record** — what the request does and whether it counts as use
//!    (the activity observer judges); recorded before any waiting, so that
//!    even a request that times out counts;
//! 4. **admit** ([`admit`]) — for a vcluster that is not ready: may this
//!    request wake it (a pure function, table-tested);
//! 5. **hold and wake** ([`wake`], [`gate`]) — the vcluster is woken once,
//!    and the request waits in a bounded queue until its API server answers;
//! 6. **forward** ([`forward`]) — streamed both ways, upgrades bridged.
//!
//! Every refusal becomes an HTTP answer in one place ([`error`]).

pub mod admit;
pub mod auth;
pub mod error;
pub mod forward;
pub mod gate;
pub mod headers;
pub mod proof;
pub mod route;
pub mod tls;
pub mod upstream;
pub mod wake;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use http::{HeaderMap, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument as _;

use crate::activity::observe::{Observer, refused_by_answer};
use crate::activity::{Activity, Source};
use crate::annotate::Annotator;
use crate::auth::bearer_token;
use crate::metrics::{Metrics, OutcomeLabels, ProxyLabels};
use crate::policy::Defaults;
use crate::target::stores::Change;
use crate::target::{Scope, Stores, TargetRef};
use crate::tls::Conn;
pub use crate::vocab::{IGNORE_HEADER, IGNORED_USER_AGENT_MARK};
use admit::{Admission, admit};
use auth::Caller;
pub use error::ProxyError;
use forward::{Forward, ForwardBody, KeepAwake};
use gate::{Class, Gate, GateError};
use proof::{Proof, Proofs};
use upstream::{Kept, ProxyBody, Upstreams};
use wake::{WakeBy, WakeError, wake_limit};

/// What the proxy is made of.
pub struct Parts {
    pub stores: Stores,
    pub upstreams: Upstreams,
    pub gate: Gate<WakeError>,
    pub observer: Arc<Observer>,
    pub metrics: Arc<Metrics>,
    /// Requests wakes (the leader acts on them).
    pub annotator: Annotator,
    pub defaults: Defaults,
    pub scope: Scope,
    /// The stores' changes (a control plane becoming Ready).
    pub changes: broadcast::Sender<Change>,
    pub base_domain: Option<String>,
    /// At most one wake per target this often for requests whose
    /// credential cannot be checked while it sleeps.
    pub unverified_wake_every: Duration,
}

pub struct Proxy {
    stores: Stores,
    upstreams: Upstreams,
    gate: Gate<WakeError>,
    observer: Arc<Observer>,
    metrics: Arc<Metrics>,
    annotator: Annotator,
    defaults: Defaults,
    scope: Scope,
    changes: broadcast::Sender<Change>,
    base_domain: Option<String>,
    unverified_wake_every: Duration,
    /// Targets whose upstream answered since they were last seen asleep
    /// (false: the control plane may be Ready before its API server serves).
    confirmed: Mutex<HashMap<TargetRef, bool>>,
    /// Targets whose API server a background check is waiting for.
    confirming: Mutex<HashSet<TargetRef>>,
    /// What is known of bearer tokens, per target.
    proofs: Proofs,
}

impl Proxy {
    pub fn new(p: Parts) -> Self {
        Proxy {
            stores: p.stores,
            upstreams: p.upstreams,
            gate: p.gate,
            observer: p.observer,
            metrics: p.metrics,
            annotator: p.annotator,
            defaults: p.defaults,
            scope: p.scope,
            changes: p.changes,
            base_domain: p.base_domain,
            unverified_wake_every: p.unverified_wake_every,
            confirmed: Mutex::new(HashMap::new()),
            confirming: Mutex::new(HashSet::new()),
            proofs: Proofs::default(),
        }
    }

    /// Handles one request, in a `proxy` span (debug level: free unless
    /// asked for).
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        conn: Arc<Conn<Kept>>,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let span = tracing::debug_span!("proxy", target = tracing::field::Empty);
        let result = self.clone().serve(req, &conn).instrument(span).await;
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

    /// The steps of the module's documentation, in order.
    async fn serve(
        self: Arc<Self>,
        req: Request<Incoming>,
        conn: &Conn<Kept>,
    ) -> Result<(&'static str, Response<ProxyBody>), ProxyError> {
        let (mut parts, body) = req.into_parts();

        // 1. Route.
        let routed = self.route(&parts)?;
        let t = TargetRef::vcluster(&routed.namespace, &routed.name);
        tracing::Span::current().record("target", tracing::field::display(&t));
        let mut object = self.stores.object(&t);
        if object.is_none() || !self.stores.in_scope(&self.scope, &t.namespace) {
            tracing::debug!(target = %t, "refused: no such vcluster, or not served here");
            return Err(ProxyError::Unauthorized);
        }

        // 2. Authenticate. Nobody is forwarded, nor learns anything of the
        // target, without a credential.
        let mut caller = auth::authenticate(conn, &parts.headers, &t, &self.upstreams, &self.proofs).await?;
        if caller == Caller::Anonymous {
            tracing::debug!(target = %t, "refused: no credential");
            return Err(ProxyError::Unauthorized);
        }
        // A ServiceAccount token for an awake vcluster whose keys are not
        // known yet (the agent just started): read them first, once, so it
        // is attributed to its account from the first request.
        if let Caller::Bearer { verified: None } = caller
            && let Some(token) = bearer_token(&parts.headers)
            && crate::auth::service_account(token).is_some()
            && object.as_ref().is_some_and(Self::object_ready)
            && self.proofs.want_keys(&t, Instant::now())
        {
            let _ = tokio::time::timeout(Duration::from_secs(2), self.read_and_learn_keys(&t)).await;
            caller = Caller::Bearer { verified: self.proofs.identity(&t, token, Instant::now()) };
        }

        // 3. Record: what the request does, and whether it counts. It is
        // recorded once the upstream has answered, unless that answer is
        // 401 (the upstream could not authenticate the caller: nobody used
        // the target), or when it wakes the target (a sleeping API server
        // cannot say whether a credential is good).
        let info = route::request_info(parts.method.as_str(), &routed.path_and_query);
        let activity = Arc::new(self.activity(&parts.headers, &caller, info.verb, info.resource, info.path));
        let opted_out = parts
            .headers
            .get(IGNORE_HEADER)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let counted = !opted_out && self.observer.judge(&t, &activity).is_none();
        let mut recorded = false;

        let mut outcome = "forwarded";
        let bodiless = matches!(parts.method, http::Method::GET | http::Method::HEAD | http::Method::OPTIONS)
            && parts.headers.get(header::CONTENT_LENGTH).is_none_or(|v| v == "0")
            && !parts.headers.contains_key(header::TRANSFER_ENCODING);
        let mut attempts = 0;
        let mut body = Some(body);
        let mut holding: Option<KeepAwake> = None;
        loop {
            attempts += 1;
            // The object looked up above serves the first pass; a retry
            // looks again.
            if !self.ready(&t, object.take().or_else(|| self.stores.object(&t)).as_ref()) {
                // 4. Admit.
                let (timeout, by, class) = match self.admit(&t, &caller, &parts.headers, counted) {
                    Admission::Refuse(e) => return Err(e),
                    Admission::RecordAndRefuse(e) => {
                        self.record_once(&t, &activity, &mut recorded);
                        return Err(e);
                    }
                    Admission::Wake(timeout) => {
                        self.record_once(&t, &activity, &mut recorded);
                        // A held request is a use going on: it keeps the
                        // target awake while it waits (a short idle timeout
                        // must not put it back to sleep before its API
                        // server is up).
                        holding = Some(KeepAwake::start(self.observer.clone(), t.clone(), activity.clone()));
                        (timeout, WakeBy::Use(activity.clone()), Class::Proven)
                    }
                    Admission::WakeUnverified(timeout) => (timeout, WakeBy::Unverified, Class::Unverified),
                };
                // 5. Hold while it wakes. The wake outlives the waiters'
                // timeout; it is made only by the request that starts it
                // (and runs in its own task): a waiter holds nothing of it.
                let wake = || self.wake(t.clone(), by, wake_limit(timeout));
                self.gate.wait(&t, class, timeout, wake).await.map_err(|e| match e {
                    GateError::Overloaded { waiting } => ProxyError::Overloaded(t.clone(), waiting),
                    GateError::Timeout(d) => ProxyError::WakeTimeout(t.clone(), d),
                    GateError::WakeFailed(e) => {
                        tracing::warn!(target = %t, error = %crate::error::Chain(&e), "waking the vcluster failed");
                        match e {
                            WakeError::Request(e) if e.transient() => ProxyError::ApiUnavailable(t.clone()),
                            e => ProxyError::WakeFailed(t.clone(), crate::error::chain(&e)),
                        }
                    }
                    GateError::Abandoned => {
                        ProxyError::WakeFailed(t.clone(), "the wake was abandoned".into())
                    }
                })?;
                drop(holding.take());
                outcome = "held";
            }

            // Its service-account keys are read while it is awake, to check
            // tokens while it sleeps.
            self.learn_keys(&t);

            // 6. Forward. A bodiless GET/HEAD/OPTIONS that got no answer
            // (refused, or the connection closed first) is idempotent: it
            // goes through the gate again once (the control plane went down
            // or restarted under us).
            let keep_awake = info.long_running && counted && !self.observer.rules.get(&t).active_connections;
            let this_body = match body.take() {
                Some(b) => ForwardBody::Incoming(b),
                None => ForwardBody::Empty,
            };
            // Boxed: a request held at the gate above would otherwise carry
            // room for the whole forwarding state while it waits.
            let forwarded = Box::pin(self.forward(
                &t,
                &routed.path_and_query,
                &mut parts,
                conn,
                this_body,
                &caller,
                keep_awake.then_some(activity.clone()),
            ))
            .await;
            match forwarded {
                Err(Forward::NoAnswer(e)) if bodiless && attempts < 2 => {
                    tracing::debug!(target = %t, error = %e, "no answer from the upstream; waiting for it and retrying");
                }
                Err(Forward::NoAnswer(e)) => {
                    tracing::warn!(target = %t, error = %e, "no answer from the vcluster's API server");
                    return Err(ProxyError::Upstream(t.clone(), e));
                }
                Err(Forward::Refused(e)) => return Err(e),
                Ok(resp) => {
                    self.answered(&t, &caller, &parts.headers, resp.status(), counted && !recorded, activity);
                    return Ok((outcome, resp));
                }
            }
        }
    }

    /// Step 1: by host name under the base domain, else by path prefix.
    fn route(&self, parts: &http::request::Parts) -> Result<route::Routed, ProxyError> {
        let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        self.base_domain
            .as_deref()
            .and_then(|base| {
                let host = parts
                    .headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .or_else(|| parts.uri.host());
                route::by_host(host.unwrap_or_default(), base, pq)
            })
            .or_else(|| route::by_path(pq))
            .ok_or(ProxyError::NotRouted)
    }

    /// Step 3: the request as an activity record, made once (the ledger
    /// keeps it, and a held request wakes with it).
    fn activity(
        &self,
        headers: &HeaderMap,
        caller: &Caller,
        verb: String,
        resource: Option<crate::activity::ResourceRef>,
        path: String,
    ) -> Activity {
        let (user, groups) = caller.identity();
        Activity {
            at: Utc::now(),
            source: Source::Proxy,
            user,
            groups,
            user_agent: headers
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string(),
            verb,
            resource,
            path,
            code: None,
            in_vcluster: true,
        }
    }

    fn record_once(&self, t: &TargetRef, activity: &Arc<Activity>, recorded: &mut bool) {
        if !*recorded {
            self.observer.record(t, activity.clone());
            *recorded = true;
        }
    }

    /// Step 4 for `t`, which is not ready: what can be proven of a bearer
    /// caller's token now, the target's wake rules, and the budget of wakes
    /// for unverified credentials, weighed by [`admit`].
    fn admit(&self, t: &TargetRef, caller: &Caller, headers: &HeaderMap, counted: bool) -> Admission {
        let proof = match caller {
            Caller::Bearer { .. } => {
                bearer_token(headers).map(|token| self.proofs.prove(t, token, Instant::now()))
            }
            _ => None,
        };
        let rules = self.wake_rules(t);
        let budget =
            rules.as_ref().is_ok_and(|r| r.unverified_budget(self.unverified_wake_every, Utc::now()));
        let admission = admit(t, caller, proof.as_ref(), counted, &rules, budget);
        let unverified =
            matches!(caller, Caller::Bearer { .. }) && matches!(proof, Some(Proof::Unknown) | None);
        match &admission {
            Admission::Refuse(_) if unverified && counted && !budget => {
                tracing::debug!(target = %t, "refused: a credential that cannot be checked while it sleeps, over budget");
                self.metrics
                    .proxy_unverified_wakes
                    .get_or_create(&OutcomeLabels { outcome: "refused" })
                    .inc();
            }
            Admission::Refuse(ProxyError::Unauthorized) => {
                tracing::debug!(target = %t, proof = ?proof, "refused: a credential that cannot wake it");
            }
            _ => {}
        }
        admission
    }

    /// After the upstream answered: what it said of a bearer token is
    /// remembered (refused, or accepted), and a request that counts and was
    /// not yet recorded is, unless its answer says nobody was let in.
    fn answered(
        &self,
        t: &TargetRef,
        caller: &Caller,
        headers: &HeaderMap,
        status: StatusCode,
        record: bool,
        activity: Arc<Activity>,
    ) {
        let refused = refused_by_answer(status.as_u16());
        if matches!(caller, Caller::Bearer { .. })
            && (status == StatusCode::UNAUTHORIZED || refused.is_none())
            && let Some(token) = bearer_token(headers)
        {
            self.proofs.answered(t, token, status == StatusCode::UNAUTHORIZED, Instant::now());
        }
        if record {
            match refused {
                Some(rule) => self.observer.turn_away(Source::Proxy, rule),
                None => {
                    self.observer.record(t, activity);
                }
            }
        }
    }

    /// Serves HTTPS on `listener` until the task is dropped, within
    /// `connections`' limits.
    pub async fn serve_tls(
        self: Arc<Self>,
        listener: TcpListener,
        tls: TlsAcceptor,
        connections: Arc<crate::tls::limits::Connections>,
    ) {
        crate::tls::serve_https(listener, tls, connections, move |req, conn| self.clone().handle(req, conn))
            .await
    }
}
