//! The agent's API and web page, on the proxy's HTTPS listener under
//! `/dormant/`: JSON under `/dormant/v1/` (the CLI's), HTML under
//! `/dormant/ui/`. Status, explain, sleep, wake and prevent-wakeup are
//! answered from the controller's own evaluation with the agent's own
//! settings, so what people are shown is what decides.
//!
//! Every request goes through the same steps, in this order:
//! 1. **authenticate** ([`authn`]) with the caller's own Kubernetes
//!    credentials (certificate, token, auth proxy) or the page's session;
//! 2. refuse an unsafe request that a browser could have been made to send
//!    (**CSRF**): JSON actions need `Content-Type: application/json` (no
//!    form can send it across sites) and, with the session cookie, a CSRF
//!    token; page forms always carry one ([`session`]);
//! 3. **authorize** ([`authz`]): a SubjectAccessReview per target and verb,
//!    asked before anything is looked up, so a caller who may not see a
//!    target learns nothing of whether it exists;
//! 4. read (the controller's [`evaluate`]) or act (through [`Annotator`],
//!    with an Event on the target naming who asked).
//!
//! `docs/api.md` is the reference.

pub mod authn;
pub mod authz;
pub mod model;
pub mod page;
pub mod session;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use chrono::{DateTime, NaiveDateTime, Utc};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

use crate::activity::ledger::Ledger;
use crate::annotate::Annotator;
use crate::controller::{Evaluation, Invalid, evaluate};
use crate::metrics::{ApiLabels, Metrics};
use crate::policy::Defaults;
use crate::policy::annotations::Until;
use crate::status::Rejection;
use crate::target::{Scope, Stores, Target, TargetRef};
use crate::tls::Conn;
use authn::{AuthProxy, Authenticator, AuthnError, Caller, Identity, Unauthenticated, Unavailable};
use authz::{Authorizer, Verb};
use model::{AgentSettings, TargetSummary};
use session::Keys;

/// Every path the agent answers itself, rather than the proxy.
pub const PREFIX: &str = "/dormant/";
/// The JSON API.
pub const V1: &str = "/dormant/v1/";
/// The largest request body read (a form or an action's JSON).
pub const MAX_BODY: usize = 16 * 1024;
/// The page's Content-Security-Policy: its own script and style only,
/// nothing inline, never in a frame.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Whether a request with this path is the API's (else the proxy's).
pub fn handles(path: &str) -> bool {
    path.starts_with(PREFIX) || path == "/dormant"
}

pub type Body = Full<Bytes>;

/// What the API is made of.
pub struct Parts {
    pub client: Client,
    pub stores: Stores,
    pub defaults: Defaults,
    pub scope: Scope,
    /// The agent's `--namespace-selector`, as given (shown in explain).
    pub namespace_selector: Option<String>,
    pub ledger: Ledger,
    pub annotator: Annotator,
    pub metrics: Arc<Metrics>,
    pub keys: Arc<Keys>,
    pub auth_proxy: Option<AuthProxy>,
    /// The caches have synced (the agent's `/readyz`).
    pub ready: Arc<AtomicBool>,
    /// This replica (the Events' reporting instance).
    pub identity: String,
}

pub struct Api {
    stores: Stores,
    defaults: Defaults,
    scope: Scope,
    agent: AgentSettings,
    ledger: Ledger,
    annotator: Annotator,
    client: Client,
    reporter: Reporter,
    metrics: Arc<Metrics>,
    authn: Arc<Authenticator>,
    authz: Authorizer,
    used: session::Used,
    ready: Arc<AtomicBool>,
}

/// An answer given instead of doing the job.
type Refusal = Box<Rejection>;

fn refuse(code: StatusCode, reason: &'static str, message: impl Into<String>) -> Refusal {
    Box::new(Rejection::new(code, reason, message))
}

fn unauthenticated(e: AuthnError) -> Refusal {
    match e {
        AuthnError::Unauthenticated(u) => refuse(StatusCode::UNAUTHORIZED, "Unauthorized", u.to_string()),
        AuthnError::Unavailable(Unavailable::TooManyReviews) => Box::new(
            Rejection::new(
                StatusCode::TOO_MANY_REQUESTS,
                "TooManyRequests",
                Unavailable::TooManyReviews.to_string(),
            )
            .retry_after(1),
        ),
        AuthnError::Unavailable(e) => {
            tracing::warn!(error = %crate::error::chain(&e), "cannot authenticate a caller");
            refuse(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", crate::error::chain(&e))
        }
    }
}

fn review_failed(e: kube::Error) -> Refusal {
    tracing::warn!(error = %crate::error::chain(&e), "SubjectAccessReview failed");
    refuse(
        StatusCode::SERVICE_UNAVAILABLE,
        "ServiceUnavailable",
        format!("cannot ask the cluster what you may do: {}", crate::error::chain(&e)),
    )
}

/// What a caller asks a target to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Sleep,
    Wake,
    PreventWakeup,
}

impl Action {
    fn parse(s: &str) -> Option<Action> {
        match s {
            "sleep" => Some(Action::Sleep),
            "wake" => Some(Action::Wake),
            "prevent-wakeup" => Some(Action::PreventWakeup),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Sleep => "sleep",
            Action::Wake => "wake",
            Action::PreventWakeup => "prevent-wakeup",
        }
    }

    fn verb(self) -> Verb {
        match self {
            Action::Wake => Verb::Wake,
            Action::Sleep | Action::PreventWakeup => Verb::Sleep,
        }
    }
}

/// `vcluster/<ns>/<name>[/<action>]` or `namespace/<ns>[/<action>]`.
fn parse_target(segs: &[&str]) -> Option<(TargetRef, Option<&'static str>, bool)> {
    // Kubernetes names start and end with a letter or digit (no `.` or `..`).
    let name = |s: &str| {
        s.starts_with(|c: char| c.is_ascii_alphanumeric()) && s.ends_with(|c: char| c.is_ascii_alphanumeric())
    };
    let (text, rest) = match segs {
        ["vcluster", ns, name_, ..] | ["namespace", ns @ name_, ..] if !name(ns) || !name(name_) => {
            return None;
        }
        ["vcluster", ns, name, rest @ ..] => (format!("vcluster/{ns}/{name}"), rest),
        ["namespace", ns, rest @ ..] => (format!("namespace/{ns}"), rest),
        _ => return None,
    };
    let r: TargetRef = text.parse().ok()?;
    match rest {
        [] => Some((r, None, false)),
        [a] => Action::parse(a).map(|a| (r, Some(a.as_str()), true)),
        _ => None,
    }
}

/// The body of a JSON action.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ActionRequest {
    /// `sleep`: requests do not wake it until then (`2h`, `never`, RFC 3339).
    #[serde(default)]
    pub prevent_wakeup_until: Option<String>,
    /// `prevent-wakeup`: the same, required.
    #[serde(default)]
    pub until: Option<String>,
}

/// The answer to an action.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Accepted {
    pub target: String,
    pub action: String,
    pub by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prevent_wakeup_until: Option<String>,
}

/// The answer to `whoami`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WhoAmI {
    pub user: String,
    pub groups: Vec<String>,
    pub via: authn::Via,
}

/// The answer to `links`: a one-time sign-in link for the page.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Link {
    /// Path and query, to append to the API's base URL.
    pub path: String,
    pub expires_at: DateTime<Utc>,
}

/// The body of `POST /dormant/v1/simulate`.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SimulateRequest {
    /// `vcluster/<ns>/<name>` or `namespace/<name>`; none: every target
    /// the caller may see.
    #[serde(default)]
    pub targets: Vec<String>,
    /// SleepPolicy documents (YAML) to set beside each target's current
    /// policy, each resolved as if the target's `policy` annotation named it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policies: Option<String>,
    /// Leave the current policy out.
    #[serde(default)]
    pub no_current: bool,
    /// The coming days (default 7).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub days: Option<u32>,
    /// The past weeks instead, replayed from the activity profile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub past_weeks: Option<u32>,
}

/// The answer to `simulate`.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Simulation {
    pub items: Vec<crate::foresight::simulate::Comparison>,
    /// Targets that could not be simulated, and why.
    #[serde(default)]
    pub skipped: Vec<Skipped>,
}

impl Simulation {
    /// What-if runs for each target as `evaluated`, through
    /// [`Evaluation::what_if`]; a target that is none, is invalid, or that
    /// a policy cannot govern is listed in `skipped` with why. Pure
    /// computation: the API runs it off the threads that serve requests.
    pub fn run(
        evaluated: Vec<(TargetRef, Result<Option<Evaluation>, Invalid>)>,
        files: &[Arc<crate::policy::Candidate>],
        defaults: &Defaults,
        include_current: bool,
        period: crate::foresight::what_if::Period,
        now: DateTime<Utc>,
    ) -> Simulation {
        let mut sim = Simulation::default();
        for (r, ev) in evaluated {
            let reason = match ev {
                Ok(Some(ev)) => match ev.what_if(files, defaults, include_current, period, now) {
                    Ok(c) => {
                        sim.items.push(c);
                        continue;
                    }
                    Err(e) => e,
                },
                Ok(None) => format!("not a target (see `dormant explain {r}`)"),
                Err(e) => format!("invalid, dormant leaves it as it is: {e}"),
            };
            sim.skipped.push(Skipped { target: r.to_string(), reason });
        }
        sim
    }
}

/// A target left out of a simulation.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Skipped {
    pub target: String,
    pub reason: String,
}

/// The most targets a simulation may name, and the most days of runs it
/// may ask for (targets × policies × days).
pub const MAX_SIMULATED_TARGETS: usize = 100;
pub const MAX_SIMULATED_DAYS: u64 = 20_000;
/// The largest simulation request (it carries SleepPolicy files).
pub const MAX_SIMULATE_BODY: usize = 64 * 1024;

/// The answer to `targets`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TargetList {
    pub items: Vec<TargetSummary>,
}

fn json<T: serde::Serialize>(code: StatusCode, v: &T) -> Response<Body> {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn html(code: StatusCode, text: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(text)));
    *r.status_mut() = code;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    r
}

fn see_other(location: &str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(v) = HeaderValue::from_str(location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

fn with_cookie(mut r: Response<Body>, cookie: &str) -> Response<Body> {
    if let Ok(v) = HeaderValue::from_str(cookie) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    r
}

fn status_json(r: &Rejection) -> Response<Body> {
    r.response(Full::new)
}

/// Headers on every answer: nothing with data is cached, nothing is
/// sniffed, no URL leaks through `Referer`; pages get the CSP and may not
/// be framed.
fn harden(h: &mut HeaderMap, cacheable: bool) {
    let set = |h: &mut HeaderMap, k: header::HeaderName, v: &'static str| {
        h.insert(k, HeaderValue::from_static(v));
    };
    if cacheable {
        set(h, header::CACHE_CONTROL, "public, max-age=300");
    } else {
        set(h, header::CACHE_CONTROL, "no-store");
    }
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(h, header::REFERRER_POLICY, "no-referrer");
    set(h, header::X_FRAME_OPTIONS, "DENY");
    set(h, header::CONTENT_SECURITY_POLICY, CSP);
}

/// The fields of an `application/x-www-form-urlencoded` body or query
/// (the first of each name).
fn form(bytes: &[u8]) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for (k, v) in form_urlencoded::parse(bytes) {
        out.entry(k.into_owned()).or_insert_with(|| v.into_owned());
    }
    out
}

/// A `datetime-local` value (`2026-12-01T18:30`) at the browser's offset
/// (`Date.getTimezoneOffset()`: minutes to add to get UTC; 0 without
/// script), or anything [`model::parse_until`] reads.
fn until_from_form(f: &HashMap<String, String>, now: DateTime<Utc>) -> Result<Until, String> {
    let v = f.get("until").map(|s| s.trim()).unwrap_or_default();
    if v.is_empty() {
        return Err("say until when requests may not wake it".into());
    }
    for format in ["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S"] {
        if let Ok(local) = NaiveDateTime::parse_from_str(v, format) {
            let offset: i64 = f.get("tz_offset").and_then(|o| o.trim().parse().ok()).unwrap_or(0);
            if offset.abs() > 24 * 60 {
                return Err("the time-zone offset is out of range".into());
            }
            let t = local.and_utc() + chrono::Duration::minutes(offset);
            return if t > now { Ok(Until::Time(t)) } else { Err(format!("{v} is not in the future")) };
        }
    }
    model::parse_until(v, now)
}

impl Api {
    pub fn new(p: Parts) -> Api {
        let agent = AgentSettings::new(&p.defaults, &p.scope, p.namespace_selector.clone());
        let authn = Arc::new(Authenticator::new(p.client.clone(), p.keys, p.auth_proxy));
        Api {
            stores: p.stores,
            defaults: p.defaults,
            scope: p.scope,
            agent,
            ledger: p.ledger,
            annotator: p.annotator,
            reporter: Reporter { controller: "dormant".into(), instance: Some(p.identity) },
            authz: Authorizer::new(p.client.clone()),
            client: p.client,
            metrics: p.metrics,
            authn,
            used: session::Used::default(),
            ready: p.ready,
        }
    }

    /// The authenticator, whose client-CA reader the agent runs.
    pub fn authenticator(&self) -> Arc<Authenticator> {
        self.authn.clone()
    }

    /// Answers one request on a connection whose client presented the
    /// certificates in `conn` (if any).
    pub async fn handle<S, B>(self: Arc<Self>, req: Request<B>, conn: Arc<Conn<S>>) -> Response<Body>
    where
        B: hyper::body::Body<Data = Bytes> + Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let peer = conn.peer.as_deref();
        let (route, mut resp) = self.serve(req, peer).await;
        let cacheable = route == "asset" && resp.status() == StatusCode::OK;
        harden(resp.headers_mut(), cacheable);
        self.metrics.api_requests.get_or_create(&ApiLabels { route, code: resp.status().as_u16() }).inc();
        resp
    }

    async fn serve<B>(
        &self,
        req: Request<B>,
        peer: Option<&[rustls_pki_types::CertificateDer<'static>]>,
    ) -> (&'static str, Response<Body>)
    where
        B: hyper::body::Body<Data = Bytes> + Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (parts, body) = req.into_parts();
        let path = parts.uri.path().to_string();
        let ui = path.starts_with(page::BASE) || path == "/dormant/ui";
        if ui && path.starts_with(&format!("{}assets/", page::BASE)) {
            return ("asset", self.asset(&parts.method, &path));
        }
        if !self.ready.load(Ordering::Acquire) {
            let r = refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                "the agent is starting: its caches have not synced yet",
            );
            return ("unavailable", if ui { self.problem_page(&r, None) } else { status_json(&r) });
        }
        if ui {
            let rest = path.strip_prefix(page::BASE).unwrap_or("").to_string();
            return self.ui(parts, body, &rest, peer).await;
        }
        let Some(rest) = path.strip_prefix(V1) else {
            return (
                "not-found",
                status_json(&refuse(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    "no such path: the API is under /dormant/v1/, the page under /dormant/ui/",
                )),
            );
        };
        let rest = rest.to_string();
        let (route, r) = self.v1(parts, body, &rest, peer).await;
        (route, r.unwrap_or_else(|e| status_json(&e)))
    }

    fn asset(&self, method: &Method, path: &str) -> Response<Body> {
        let (text, kind) = match path.strip_prefix(page::BASE) {
            Some("assets/app.js") => (page::SCRIPT, "text/javascript; charset=utf-8"),
            Some("assets/app.css") => (page::STYLE, "text/css; charset=utf-8"),
            _ => return status_json(&refuse(StatusCode::NOT_FOUND, "NotFound", "no such asset")),
        };
        if method != Method::GET {
            return status_json(&refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "assets are read with GET",
            ));
        }
        let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
        r
    }

    /// Reads a body of at most [`MAX_BODY`] bytes.
    async fn read_body<B>(body: B) -> Result<Bytes, Refusal>
    where
        B: hyper::body::Body<Data = Bytes> + Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        Self::read_body_up_to(body, MAX_BODY).await
    }

    /// Reads a body of at most `limit` bytes.
    async fn read_body_up_to<B>(body: B, limit: usize) -> Result<Bytes, Refusal>
    where
        B: hyper::body::Body<Data = Bytes> + Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        // A body that says up front it is too large is refused unread.
        if hyper::body::Body::size_hint(&body).lower() > limit as u64 {
            return Err(refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestEntityTooLarge",
                format!("the body is larger than {limit} bytes"),
            ));
        }
        match Limited::new(body, limit).collect().await {
            Ok(c) => Ok(c.to_bytes()),
            Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestEntityTooLarge",
                format!("the body is larger than {limit} bytes"),
            )),
            Err(_) => Err(refuse(StatusCode::BAD_REQUEST, "BadRequest", "the body could not be read")),
        }
    }

    fn evaluate(&self, r: &TargetRef, now: DateTime<Utc>) -> Result<Option<Evaluation>, Invalid> {
        evaluate(&self.stores, &self.defaults, &self.scope, self.ledger.newest(r).as_ref(), r, now)
    }

    /// The target `r`, if dormant serves it (it exists and lies in the
    /// agent's scope). Asked only once the caller may see it.
    fn lookup(&self, r: &TargetRef) -> Result<Target, Refusal> {
        self.stores.target(r).filter(|_| self.stores.in_scope(&self.scope, &r.namespace)).ok_or_else(|| {
            refuse(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!(
                    "{r} is not a target of this agent: it does not exist, or lies outside the agent's scope"
                ),
            )
        })
    }

    async fn authorize(&self, who: &Identity, verb: Verb, r: &TargetRef) -> Result<(), Refusal> {
        let name = authz::review_name(r);
        if self.authz.allowed(who, verb, &r.namespace, Some(name)).await.map_err(review_failed)? {
            Ok(())
        } else {
            Err(refuse(
                StatusCode::FORBIDDEN,
                "Forbidden",
                authz::denied(who, verb, &r.namespace, Some(name)),
            ))
        }
    }

    /// The summaries of every target `who` may see.
    async fn visible(&self, who: &Identity) -> Result<Vec<TargetSummary>, Refusal> {
        let mut all = self.stores.targets(&self.stores.candidates(), &self.scope);
        all.sort_by_key(|t| t.to_string());
        let visible = self.authz.visible(who, &all).await.map_err(review_failed)?;
        let now = Utc::now();
        Ok(visible.iter().filter_map(|r| model::summary(r, &self.evaluate(r, now), now)).collect())
    }

    /// What-if runs for `who`: the targets named (each one they may see)
    /// or every target they may see, through the controller's evaluation
    /// with the agent's settings. Bounded before any work: the number of
    /// targets named, and targets × policies × days.
    async fn simulate(&self, who: &Identity, req: SimulateRequest) -> Result<Simulation, Refusal> {
        use crate::foresight::what_if::{MAX_DAYS, MAX_PAST_WEEKS, Period, read_policies};
        let bad = |m: String| refuse(StatusCode::BAD_REQUEST, "BadRequest", m);
        match (req.days, req.past_weeks) {
            (Some(_), Some(_)) => return Err(bad("ask for days ahead or past weeks, not both".into())),
            (Some(d), None) if d == 0 || d > MAX_DAYS => {
                return Err(bad(format!("days must be between 1 and {MAX_DAYS}")));
            }
            (None, Some(w)) if w == 0 || w > MAX_PAST_WEEKS => {
                return Err(bad(format!("pastWeeks must be between 1 and {MAX_PAST_WEEKS}")));
            }
            _ => {}
        }
        let period = Period::of(req.past_weeks, req.days);
        let files = match req.policies.as_deref() {
            Some(text) => read_policies(text).map_err(|e| bad(format!("policies: {e}")))?,
            None => Vec::new(),
        };
        if req.no_current && files.is_empty() {
            return Err(bad("noCurrent leaves nothing to simulate without policies".into()));
        }
        if req.targets.len() > MAX_SIMULATED_TARGETS {
            return Err(bad(format!("at most {MAX_SIMULATED_TARGETS} targets at once")));
        }
        let mut targets: Vec<TargetRef> = Vec::new();
        for t in &req.targets {
            let r: TargetRef = t.parse().map_err(|e| bad(format!("{t:?}: {e}")))?;
            if !targets.contains(&r) {
                targets.push(r);
            }
        }
        if targets.is_empty() {
            let mut all = self.stores.targets(&self.stores.candidates(), &self.scope);
            all.sort_by_key(|t| t.to_string());
            targets = self.authz.visible(who, &all).await.map_err(review_failed)?;
        } else {
            for r in &targets {
                self.authorize(who, Verb::Get, r).await?;
                self.lookup(r)?;
            }
        }
        let runs = (files.len() + usize::from(!req.no_current)) as u64;
        let work = targets.len() as u64 * runs * u64::from(period.days());
        if work > MAX_SIMULATED_DAYS {
            return Err(bad(format!(
                "{} targets × {runs} policies × {} days is more than {MAX_SIMULATED_DAYS} target-days at once; name fewer targets, or ask for fewer days",
                targets.len(),
                period.days()
            )));
        }
        let now = Utc::now();
        let evaluated: Vec<_> = targets.into_iter().map(|r| (r.clone(), self.evaluate(&r, now))).collect();
        let defaults = self.defaults.clone();
        let include_current = !req.no_current;
        tokio::task::spawn_blocking(move || {
            Simulation::run(evaluated, &files, &defaults, include_current, period, now)
        })
        .await
        .map_err(|e| {
            refuse(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", format!("the simulation failed: {e}"))
        })
    }

    fn explain(&self, r: &TargetRef) -> Result<model::Explanation, Refusal> {
        let target = self.lookup(r)?;
        let now = Utc::now();
        Ok(model::explanation(r, &target, &self.evaluate(r, now), self.agent.clone(), now))
    }

    /// Asks for `action` on `r` for `who` (authorized already), through
    /// the page (`through`) or the API, and records who did it.
    async fn act(
        &self,
        who: &Identity,
        r: &TargetRef,
        action: Action,
        until: Option<Until>,
        through: &str,
    ) -> Result<Accepted, Refusal> {
        let target = self.lookup(r)?;
        match self.evaluate(r, Utc::now()) {
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err(refuse(
                    StatusCode::CONFLICT,
                    "Conflict",
                    format!(
                        "{r} is not a target: no SleepPolicy selects it and it carries no dormant.dev/ annotation"
                    ),
                ));
            }
            Err(e) => {
                return Err(refuse(
                    StatusCode::CONFLICT,
                    "Conflict",
                    format!("{r} is left as it is until this is fixed: {e}"),
                ));
            }
        }
        let written = match action {
            Action::Wake => {
                self.annotator.request_wake(&target.object, format!("{} wake {r} (api)", who.user)).await
            }
            Action::Sleep | Action::PreventWakeup => {
                self.annotator.request_sleep(&target.object, until).await
            }
        };
        written.map_err(|e| {
            tracing::warn!(target = %r, error = %crate::error::chain(&e), "failed to ask for {}", action.as_str());
            refuse(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", crate::error::chain(&e))
        })?;
        let groups = who.groups.iter().filter(|g| *g != "system:authenticated").cloned().collect::<Vec<_>>();
        let who_text = if groups.is_empty() {
            who.user.clone()
        } else {
            format!("{} (groups {})", who.user, groups.join(", "))
        };
        let (reason, verb, note) = match (action, until) {
            (Action::Wake, _) => {
                ("WakeRequested", "Wake", format!("{who_text} asked to wake it through {through}"))
            }
            (_, None) => {
                ("SleepRequested", "Sleep", format!("{who_text} asked to put it to sleep through {through}"))
            }
            (_, Some(u)) => (
                "SleepRequested",
                "Sleep",
                format!(
                    "{who_text} asked to put it to sleep through {through}; requests do not wake it until {u}"
                ),
            ),
        };
        tracing::info!(target = %r, user = %who.user, action = action.as_str(), "{note}");
        // A recorder of its own: a shared one would fold a second person's
        // request into the first one's Event (a series keeps the first note).
        let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
        let event = Event {
            type_: EventType::Normal,
            reason: reason.into(),
            note: Some(note),
            action: verb.into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, &target.object.object_ref()).await {
            tracing::warn!(target = %r, error = %e, "failed to publish event {reason}");
        }
        Ok(Accepted {
            target: r.to_string(),
            action: action.as_str().into(),
            by: who.user.clone(),
            prevent_wakeup_until: until.map(|u| u.to_string()),
        })
    }

    /// The JSON API.
    async fn v1<B>(
        &self,
        parts: http::request::Parts,
        body: B,
        rest: &str,
        peer: Option<&[rustls_pki_types::CertificateDer<'static>]>,
    ) -> (&'static str, Result<Response<Body>, Refusal>)
    where
        B: hyper::body::Body<Data = Bytes> + Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let segs: Vec<&str> = rest.split('/').collect();
        let route: &'static str = match (&parts.method, segs.as_slice()) {
            (&Method::GET, ["whoami"]) => "whoami",
            (&Method::GET, ["targets"]) => "targets",
            (&Method::POST, ["links"]) => "links",
            (&Method::POST, ["simulate"]) => "simulate",
            (m, ["targets", t @ ..]) => match (m, parse_target(t)) {
                (&Method::GET, Some((_, None, false))) => "target",
                (&Method::POST, Some((_, Some(a), true))) => a,
                (_, Some(_)) => {
                    return (
                        "not-allowed",
                        Err(refuse(
                            StatusCode::METHOD_NOT_ALLOWED,
                            "MethodNotAllowed",
                            "read a target with GET; act on it with POST to .../sleep, .../wake or .../prevent-wakeup",
                        )),
                    );
                }
                (_, None) => {
                    return (
                        "not-found",
                        Err(refuse(
                            StatusCode::NOT_FOUND,
                            "NotFound",
                            "expected /dormant/v1/targets/vcluster/<namespace>/<name> or /dormant/v1/targets/namespace/<name>",
                        )),
                    );
                }
            },
            _ => {
                return (
                    "not-found",
                    Err(refuse(StatusCode::NOT_FOUND, "NotFound", "no such API path; see docs/api.md")),
                );
            }
        };
        // An action must say it is JSON: a form on another site cannot
        // (the browser would ask first, and nothing here says yes).
        if parts.method == Method::POST {
            let ct = parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
            if !ct.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json")) {
                return (
                    route,
                    Err(refuse(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        "UnsupportedMediaType",
                        "send Content-Type: application/json",
                    )),
                );
            }
        }
        let result = async {
            let caller = self.authn.authenticate(peer, &parts.headers).await.map_err(unauthenticated)?;
            if parts.method == Method::POST && let Some(s) = &caller.session {
                let token = parts.headers.get("x-csrf-token").and_then(|v| v.to_str().ok()).unwrap_or("");
                if !self.authn.keys().check_csrf(&s.sid, token, Utc::now()) {
                    return Err(refuse(StatusCode::FORBIDDEN, "Forbidden", "this request came with the page's session but without its CSRF token (X-CSRF-Token)"));
                }
            }
            let who = &caller.who;
            match route {
                "whoami" => Ok(json(StatusCode::OK, &WhoAmI { user: who.user.clone(), groups: who.groups.clone(), via: who.via })),
                "targets" => Ok(json(StatusCode::OK, &TargetList { items: self.visible(who).await? })),
                "links" => {
                    if caller.session.is_some() {
                        return Err(refuse(StatusCode::FORBIDDEN, "Forbidden", "a sign-in link is made with your own credentials (`dormant ui`), not from a page session"));
                    }
                    let now = Utc::now();
                    let ticket = self.authn.keys().ticket(who, now).ok_or_else(|| {
                        refuse(StatusCode::BAD_REQUEST, "BadRequest", "your identity (user and groups) is too large for a sign-in link")
                    })?;
                    let path = format!("{}link?ticket={ticket}", page::BASE);
                    Ok(json(StatusCode::CREATED, &Link { path, expires_at: now + session::TICKET_LIFE }))
                }
                "simulate" => {
                    let bytes = Self::read_body_up_to(body, MAX_SIMULATE_BODY).await?;
                    let req: SimulateRequest = serde_json::from_slice(&bytes).map_err(|e| refuse(StatusCode::BAD_REQUEST, "BadRequest", format!("the body is not a simulation request: {e}")))?;
                    Ok(json(StatusCode::OK, &self.simulate(who, req).await?))
                }
                _ => {
                    let segs: Vec<&str> = segs.iter().skip(1).copied().collect();
                    let Some((r, action, _)) = parse_target(&segs) else {
                        return Err(refuse(StatusCode::NOT_FOUND, "NotFound", "no such target path"));
                    };
                    match action.and_then(Action::parse) {
                        None => {
                            self.authorize(who, Verb::Get, &r).await?;
                            Ok(json(StatusCode::OK, &self.explain(&r)?))
                        }
                        Some(action) => {
                            self.authorize(who, action.verb(), &r).await?;
                            let bytes = Self::read_body(body).await?;
                            let req: ActionRequest = if bytes.iter().all(u8::is_ascii_whitespace) {
                                ActionRequest::default()
                            } else {
                                serde_json::from_slice(&bytes).map_err(|e| refuse(StatusCode::BAD_REQUEST, "BadRequest", format!("the body is not an action: {e}")))?
                            };
                            let now = Utc::now();
                            let until = match action {
                                Action::Wake => Ok(None),
                                Action::Sleep => req.prevent_wakeup_until.as_deref().map(|v| model::parse_until(v, now)).transpose(),
                                Action::PreventWakeup => match req.until.as_deref().or(req.prevent_wakeup_until.as_deref()) {
                                    Some(v) => model::parse_until(v, now).map(Some),
                                    None => Err("prevent-wakeup needs \"until\": a duration (2h), never, or an RFC 3339 time".into()),
                                },
                            }
                            .map_err(|e| refuse(StatusCode::BAD_REQUEST, "BadRequest", e))?;
                            let accepted = self.act(who, &r, action, until, "dormant's API").await?;
                            Ok(json(StatusCode::ACCEPTED, &accepted))
                        }
                    }
                }
            }
        }
        .await;
        (route, result)
    }

    fn problem_page(&self, r: &Rejection, signed_in: Option<(&Identity, &str)>) -> Response<Body> {
        let title = match r.code {
            StatusCode::FORBIDDEN => "Not allowed",
            StatusCode::NOT_FOUND => "Not found",
            StatusCode::UNAUTHORIZED => "Not signed in",
            c if c.is_server_error() => "Unavailable",
            _ => "Cannot do that",
        };
        html(r.code, page::problem(title, &r.message, signed_in.map(|s| s.0), signed_in.map(|s| s.1)))
    }

    /// The CSRF binding of a signed-in caller.
    fn binding(caller: &Caller) -> String {
        caller.binding.clone().unwrap_or_else(|| format!("user\0{}", caller.who.user))
    }

    /// The browser's pre-session nonce, and a `Set-Cookie` when it has none yet.
    fn pre_session(headers: &HeaderMap) -> (String, Option<String>) {
        match session::cookie(headers, session::PRE_COOKIE).filter(|v| v.len() <= 64) {
            Some(v) => (v.to_string(), None),
            None => {
                let n = session::random_id(18);
                let c = session::set_cookie(session::PRE_COOKIE, &n, 600);
                (n, Some(c))
            }
        }
    }

    fn signin_page(&self, headers: &HeaderMap, code: StatusCode, problem: Option<&str>) -> Response<Body> {
        let (nonce, set) = Self::pre_session(headers);
        let csrf =
            self.authn.keys().csrf(&format!("pre\0{nonce}"), Utc::now() + chrono::Duration::minutes(10));
        let r = html(code, page::signin(&csrf, problem));
        match set {
            Some(c) => with_cookie(r, &c),
            None => r,
        }
    }

    /// Whether a pre-session form's CSRF token is this browser's.
    fn pre_session_ok(&self, headers: &HeaderMap, f: &HashMap<String, String>) -> bool {
        let Some(nonce) = session::cookie(headers, session::PRE_COOKIE) else { return false };
        let token = f.get("csrf").map(String::as_str).unwrap_or("");
        self.authn.keys().check_csrf(&format!("pre\0{nonce}"), token, Utc::now())
    }

    /// A new session for `who`: the cookie, and the pre-session's removed.
    fn start_session(&self, who: &Identity) -> Result<Response<Body>, Refusal> {
        let (_, value) =
            self.authn.keys().session(who, Utc::now() + session::SESSION_LIFE).ok_or_else(|| {
                refuse(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "your identity (user and groups) is too large for a session cookie",
                )
            })?;
        let r = see_other(page::BASE);
        let r = with_cookie(
            r,
            &session::set_cookie(session::COOKIE, &value, session::SESSION_LIFE.num_seconds()),
        );
        Ok(with_cookie(r, &session::set_cookie(session::PRE_COOKIE, "", 0)))
    }

    /// The web page.
    async fn ui<B>(
        &self,
        parts: http::request::Parts,
        body: B,
        rest: &str,
        peer: Option<&[rustls_pki_types::CertificateDer<'static>]>,
    ) -> (&'static str, Response<Body>)
    where
        B: hyper::body::Body<Data = Bytes> + Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let segs: Vec<&str> = rest.split('/').collect();
        let headers = &parts.headers;
        let query = form(parts.uri.query().unwrap_or("").as_bytes());
        match (&parts.method, segs.as_slice()) {
            (&Method::GET, [""]) => {
                let caller = match self.authn.authenticate(peer, headers).await {
                    Ok(c) => c,
                    Err(AuthnError::Unauthenticated(Unauthenticated::NoCredentials)) => {
                        return ("page", self.signin_page(headers, StatusCode::OK, None));
                    }
                    Err(AuthnError::Unauthenticated(u)) => {
                        return (
                            "page",
                            self.signin_page(headers, StatusCode::UNAUTHORIZED, Some(&u.to_string())),
                        );
                    }
                    Err(e) => return ("page", self.problem_page(&unauthenticated(e), None)),
                };
                let csrf =
                    self.authn.keys().csrf(&Self::binding(&caller), Utc::now() + session::SESSION_LIFE);
                match self.visible(&caller.who).await {
                    Ok(items) => {
                        ("page", html(StatusCode::OK, page::list(&caller.who, &csrf, &items, Utc::now())))
                    }
                    Err(e) => ("page", self.problem_page(&e, Some((&caller.who, &csrf)))),
                }
            }
            (&Method::POST, ["signin"]) => {
                let f = match Self::read_body(body).await {
                    Ok(b) => form(&b),
                    Err(e) => return ("signin", self.problem_page(&e, None)),
                };
                if !self.pre_session_ok(headers, &f) {
                    return (
                        "signin",
                        self.signin_page(
                            headers,
                            StatusCode::FORBIDDEN,
                            Some("the sign-in form expired or came from elsewhere: try again"),
                        ),
                    );
                }
                let token = f.get("token").map(|t| t.trim()).unwrap_or("");
                if token.is_empty() {
                    return (
                        "signin",
                        self.signin_page(headers, StatusCode::UNAUTHORIZED, Some("paste a bearer token")),
                    );
                }
                match self.authn.review(token).await {
                    Ok(who) => {
                        ("signin", self.start_session(&who).unwrap_or_else(|e| self.problem_page(&e, None)))
                    }
                    Err(AuthnError::Unauthenticated(u)) => {
                        ("signin", self.signin_page(headers, StatusCode::UNAUTHORIZED, Some(&u.to_string())))
                    }
                    Err(e) => ("signin", self.problem_page(&unauthenticated(e), None)),
                }
            }
            (&Method::GET, ["link"]) => {
                let ticket = query.get("ticket").map(String::as_str).unwrap_or("");
                let Some(t) = self.authn.keys().open_ticket(ticket, Utc::now()) else {
                    return (
                        "link",
                        self.signin_page(
                            headers,
                            StatusCode::UNAUTHORIZED,
                            Some("this sign-in link is not valid or has expired: run `dormant ui` again"),
                        ),
                    );
                };
                let (nonce, set) = Self::pre_session(headers);
                let csrf = self
                    .authn
                    .keys()
                    .csrf(&format!("pre\0{nonce}"), Utc::now() + chrono::Duration::minutes(10));
                let r = html(StatusCode::OK, page::link(&t.who, ticket, &csrf));
                (
                    "link",
                    match set {
                        Some(c) => with_cookie(r, &c),
                        None => r,
                    },
                )
            }
            (&Method::POST, ["link"]) => {
                let f = match Self::read_body(body).await {
                    Ok(b) => form(&b),
                    Err(e) => return ("link", self.problem_page(&e, None)),
                };
                if !self.pre_session_ok(headers, &f) {
                    return (
                        "link",
                        self.signin_page(
                            headers,
                            StatusCode::FORBIDDEN,
                            Some("the sign-in form expired or came from elsewhere: open the link again"),
                        ),
                    );
                }
                let now = Utc::now();
                let ticket = f.get("ticket").and_then(|t| self.authn.keys().open_ticket(t, now));
                match ticket {
                    Some(t) if self.used.take(&t, now) => {
                        ("link", self.start_session(&t.who).unwrap_or_else(|e| self.problem_page(&e, None)))
                    }
                    Some(_) => (
                        "link",
                        self.signin_page(
                            headers,
                            StatusCode::UNAUTHORIZED,
                            Some("this sign-in link was used already: run `dormant ui` again"),
                        ),
                    ),
                    None => (
                        "link",
                        self.signin_page(
                            headers,
                            StatusCode::UNAUTHORIZED,
                            Some("this sign-in link is not valid or has expired: run `dormant ui` again"),
                        ),
                    ),
                }
            }
            (&Method::POST, ["signout"]) => {
                let f = match Self::read_body(body).await {
                    Ok(b) => form(&b),
                    Err(e) => return ("signout", self.problem_page(&e, None)),
                };
                if let Ok(caller) = self.authn.authenticate(peer, headers).await {
                    let token = f.get("csrf").map(String::as_str).unwrap_or("");
                    if !self.authn.keys().check_csrf(&Self::binding(&caller), token, Utc::now()) {
                        let e = refuse(
                            StatusCode::FORBIDDEN,
                            "Forbidden",
                            "this form came without a valid CSRF token: reload the page and try again",
                        );
                        return ("signout", self.problem_page(&e, None));
                    }
                }
                let r = see_other(page::BASE);
                ("signout", with_cookie(r, &session::set_cookie(session::COOKIE, "", 0)))
            }
            (m, ["targets", t @ ..]) => {
                let Some((r, action, has_action)) = parse_target(t) else {
                    let e = refuse(StatusCode::NOT_FOUND, "NotFound", "no such page");
                    return ("not-found", self.problem_page(&e, None));
                };
                let route = if has_action { "page-action" } else { "page-target" };
                let caller = match self.authn.authenticate(peer, headers).await {
                    Ok(c) => c,
                    Err(AuthnError::Unauthenticated(_)) if *m == Method::GET => {
                        return (route, see_other(page::BASE));
                    }
                    Err(e) => return (route, self.problem_page(&unauthenticated(e), None)),
                };
                let binding = Self::binding(&caller);
                let csrf = self.authn.keys().csrf(&binding, Utc::now() + session::SESSION_LIFE);
                let signed_in = Some((&caller.who, csrf.as_str()));
                let result: Result<Response<Body>, Refusal> = async {
                    match (m, action.and_then(Action::parse)) {
                        (&Method::GET, None) => {
                            self.authorize(&caller.who, Verb::Get, &r).await?;
                            let x = self.explain(&r)?;
                            let watch = query.get("watch").map(String::as_str).filter(|w| matches!(*w, "wake" | "sleep"));
                            let notice = match watch {
                                Some("wake") => Some("Wake requested: following it until it is ready."),
                                Some("sleep") => Some("Sleep requested: following it until it is asleep."),
                                _ => None,
                            };
                            Ok(html(StatusCode::OK, page::detail(&caller.who, &csrf, &x, Utc::now(), watch, notice)))
                        }
                        (&Method::POST, Some(action)) => {
                            let f = form(&Self::read_body(body).await?);
                            let token = f.get("csrf").map(String::as_str).unwrap_or("");
                            if !self.authn.keys().check_csrf(&binding, token, Utc::now()) {
                                return Err(refuse(StatusCode::FORBIDDEN, "Forbidden", "this form came without a valid CSRF token (it expired, or another site sent it): reload the page and try again"));
                            }
                            self.authorize(&caller.who, action.verb(), &r).await?;
                            let until = match action {
                                Action::PreventWakeup => Some(until_from_form(&f, Utc::now()).map_err(|e| refuse(StatusCode::BAD_REQUEST, "BadRequest", e))?),
                                _ => None,
                            };
                            self.act(&caller.who, &r, action, until, "dormant's web page").await?;
                            let watch = if action == Action::Wake { "wake" } else { "sleep" };
                            Ok(see_other(&format!("{}?watch={watch}", page::target_path(&r.to_string()))))
                        }
                        _ => Err(refuse(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "not here")),
                    }
                }
                .await;
                (route, result.unwrap_or_else(|e| self.problem_page(&e, signed_in)))
            }
            _ => {
                let e = refuse(StatusCode::NOT_FOUND, "NotFound", "no such page");
                ("not-found", self.problem_page(&e, None))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_paths_name_a_target_and_at_most_one_known_action() {
        let vc = TargetRef::vcluster("team-a", "dev");
        assert_eq!(parse_target(&["vcluster", "team-a", "dev"]), Some((vc.clone(), None, false)));
        assert_eq!(parse_target(&["vcluster", "team-a", "dev", "wake"]), Some((vc, Some("wake"), true)));
        assert_eq!(
            parse_target(&["namespace", "shop", "prevent-wakeup"]),
            Some((TargetRef::namespace("shop"), Some("prevent-wakeup"), true))
        );
        for bad in [
            &["vcluster", "team-a"][..],
            &["vcluster", "team-a", "dev", "delete"],
            &["vcluster", "team-a", "dev", "wake", "x"],
            &["vcluster", "..", "dev"],
            &["vcluster", "a b", "dev"],
            &["namespace", ""],
            &["pods", "x"],
        ] {
            assert_eq!(parse_target(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn prevent_wakeup_until_reads_the_browsers_local_time_and_offset() {
        let now = DateTime::parse_from_rfc3339("2026-12-01T10:00:00Z").unwrap().with_timezone(&Utc);
        let f = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        // Berlin in winter: getTimezoneOffset() is -60.
        assert_eq!(
            until_from_form(&f(&[("until", "2026-12-01T18:30"), ("tz_offset", "-60")]), now),
            Ok(Until::Time(
                DateTime::parse_from_rfc3339("2026-12-01T17:30:00Z").unwrap().with_timezone(&Utc)
            ))
        );
        assert!(until_from_form(&f(&[("until", "2026-12-01T08:00")]), now).is_err(), "in the past");
        assert!(until_from_form(&f(&[]), now).is_err());
        assert!(until_from_form(&f(&[("until", "2026-12-01T18:30"), ("tz_offset", "99999")]), now).is_err());
        assert_eq!(until_from_form(&f(&[("until", "never")]), now), Ok(Until::Never));
    }

    #[test]
    fn the_api_takes_only_its_own_prefix() {
        assert!(handles("/dormant/v1/targets"));
        assert!(handles("/dormant/ui/"));
        assert!(!handles("/dormantx"));
        assert!(!handles("/vcluster/team-a/dev/api/v1/pods"));
        assert!(!handles("/api/v1/namespaces/dormant/pods"));
    }
}
