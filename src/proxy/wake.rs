//! Step 5, hold and wake: when a vcluster is ready to be forwarded to, and
//! how a held request wakes it. Ready means its control plane Ready (from
//! the watch) *and* its API server confirmed answering: a control plane
//! can be Ready before its API server serves. The proxy follows every
//! vcluster's control plane through the watch, so one woken elsewhere
//! (another replica, `dormant wake`, a schedule) is confirmed by a check
//! of its own, and one seen down is unconfirmed until it answers again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Utc;
use http::Request;
use http_body_util::{BodyExt, Limited};
use jsonwebtoken::jwk::JwkSet;
use tokio::sync::broadcast;

use super::Proxy;
use super::admit::WakeRules;
use super::error::full;
use super::upstream::{self, Upstream};
use crate::activity::Activity;
use crate::policy::annotations::TargetState;
use crate::target::effective::effective;
use crate::target::stores::Change;
use crate::target::{TargetKind, TargetObject, TargetRef};
use crate::vocab;

/// What a wake is asked for by.
#[derive(Debug, Clone)]
pub enum WakeBy {
    /// A use by a proven caller: recorded as the target's last activity.
    Use(Arc<Activity>),
    /// A request whose credential could not be checked: no use, a wake
    /// within the budget (see [`super::admit`]).
    Unverified,
}

/// Why a wake did not bring a vcluster up.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WakeError {
    #[error("the vcluster is gone")]
    Gone,
    #[error("failed to request the wake")]
    Request(#[source] Arc<crate::annotate::Error>),
    #[error("the control plane was not Ready within {}", crate::policy::duration::format(*.0))]
    ControlPlane(Duration),
    #[error("the API server did not answer within {}", crate::policy::duration::format(*.0))]
    ApiServer(Duration),
    #[error("its upstream cannot be used")]
    Upstream(#[source] Arc<upstream::Error>),
}

impl Proxy {
    /// The control plane runs and is Ready, as the watch sees it.
    pub(super) fn control_plane_ready(&self, t: &TargetRef) -> bool {
        self.stores.object(t).is_some_and(|o| Self::object_ready(&o))
    }

    /// [`Proxy::control_plane_ready`] for the object at hand. Of its
    /// annotations only the state is read: this runs for each request.
    pub(super) fn object_ready(object: &TargetObject) -> bool {
        let state = object.annotations().get(vocab::STATE).and_then(|s| s.parse::<TargetState>().ok());
        if matches!(state, Some(TargetState::Asleep | TargetState::Sleeping)) {
            return false;
        }
        match object {
            TargetObject::StatefulSet(s) => s.replicas.unwrap_or(1) > 0 && s.ready_pods > 0,
            TargetObject::Deployment(d) => d.replicas.unwrap_or(1) > 0 && d.ready_pods > 0,
            TargetObject::Namespace(_) => false,
        }
    }

    /// Ready to forward to: the control plane Ready (`object` is the
    /// target's, as the store has it) and its API server confirmed.
    pub(super) fn ready(&self, t: &TargetRef, object: Option<&TargetObject>) -> bool {
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
                Ok(Change::Target(t)) if t.kind == TargetKind::VCluster => self.follow(&t),
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
        // Only a vcluster it serves: confirming reads the vc-<name> Secret,
        // which dormant may not read elsewhere (`--namespaces`).
        if !self.stores.in_scope(&self.scope, &t.namespace) {
            return;
        }
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
            let timeout = proxy.wake_rules(&t).map_or(proxy.defaults.wake_timeout, |r| r.timeout);
            let limit = wake_limit(timeout);
            match proxy.api_server_ready(&t, Instant::now(), limit).await {
                Ok(()) if proxy.control_plane_ready(&t) => {
                    proxy.set_confirmed(&t, true);
                    proxy.learn_keys(&t);
                    tracing::info!(target = %t, "vcluster woken elsewhere answers; forwarding to it");
                }
                Ok(()) => {}
                Err(e) => {
                    tracing::debug!(target = %t, error = %crate::error::Chain(&e), "vcluster seen Ready did not answer")
                }
            }
            proxy.confirming.lock().unwrap_or_else(|e| e.into_inner()).remove(&t);
        });
    }

    /// Reads `t`'s service-account keys in the background, when they are
    /// wanted (see [`super::proof::Proofs::want_keys`]).
    pub(super) fn learn_keys(self: &Arc<Self>, t: &TargetRef) {
        if !self.proofs.want_keys(t, Instant::now()) {
            return;
        }
        let (proxy, t) = (self.clone(), t.clone());
        tokio::spawn(async move { proxy.read_and_learn_keys(&t).await });
    }

    /// Reads `t`'s service-account keys now (the caller checked
    /// [`super::proof::Proofs::want_keys`]).
    pub(super) async fn read_and_learn_keys(&self, t: &TargetRef) {
        match self.read_keys(t).await {
            Ok(set) => {
                tracing::debug!(target = %t, keys = set.keys.len(), "read the vcluster's service-account keys");
                self.proofs.learned(t, set, Instant::now());
            }
            Err(e) => {
                tracing::debug!(target = %t, error = %e, "cannot read the vcluster's service-account keys")
            }
        }
    }

    /// `t`'s service-account keys, from its API server's
    /// `/openid/v1/jwks`, asked with its admin credential.
    async fn read_keys(&self, t: &TargetRef) -> Result<JwkSet, String> {
        let up = self.upstreams.get(t).await.map_err(|e| crate::error::chain(&e))?;
        let admin = up.admin.as_ref().ok_or("its Secret has no admin credential")?;
        let uri = up.origin.uri("/openid/v1/jwks").map_err(|e| e.to_string())?;
        let req = Request::get(uri).body(full(Bytes::new())).map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(Duration::from_secs(10), admin.client.request(req))
            .await
            .map_err(|_| "no answer within 10s".to_string())?
            .map_err(|e| crate::error::chain(&e))?;
        if !resp.status().is_success() {
            return Err(format!("answered {}", resp.status()));
        }
        let body =
            Limited::new(resp.into_body(), 1 << 20).collect().await.map_err(|e| e.to_string())?.to_bytes();
        serde_json::from_slice(&body).map_err(|e| format!("not a JWK set: {e}"))
    }

    pub(super) fn set_confirmed(&self, t: &TargetRef, v: bool) {
        self.confirmed.lock().unwrap_or_else(|e| e.into_inner()).insert(t.clone(), v);
    }

    /// Waits until `t`'s API server is ready, or `limit` after `started`,
    /// on a fresh upstream client: pooled connections went to the API server
    /// that stopped when the vcluster slept.
    async fn api_server_ready(
        &self,
        t: &TargetRef,
        started: Instant,
        limit: Duration,
    ) -> Result<(), WakeError> {
        self.upstreams.invalidate(t);
        let up = self.upstreams.get(t).await.map_err(|e| WakeError::Upstream(Arc::new(e)))?;
        readyz(&up, started, limit).await
    }

    /// What governs waking `t` now, from its effective policy (see
    /// [`crate::target::effective`]), or why that cannot be read.
    pub(super) fn wake_rules(&self, t: &TargetRef) -> Result<WakeRules, String> {
        match effective(&self.stores, &self.defaults, &self.scope, t) {
            Ok(Some(g)) => Ok(WakeRules::of(&g.policy, &g.annotations, Utc::now())),
            // Gone or being deleted while a request came: nothing keeps it
            // asleep but the wake that cannot happen (it times out).
            Ok(None) => Ok(WakeRules {
                on_request: true,
                timeout: self.defaults.wake_timeout,
                prevented: None,
                unverified_wake: None,
            }),
            Err(invalid) => Err(invalid.to_string()),
        }
    }

    /// Wakes `t`: a wake request on the target (an idempotent patch the
    /// leader acts on), then the control plane Ready (from the watch), then
    /// the API server answering `/readyz`.
    pub(super) fn wake(
        self: &Arc<Self>,
        t: TargetRef,
        by: WakeBy,
        limit: Duration,
    ) -> impl Future<Output = Result<(), WakeError>> + Send + 'static {
        let proxy = self.clone();
        async move {
            let started = Instant::now();
            let mut changes = proxy.changes.subscribe();
            proxy.set_confirmed(&t, false);
            let Some(object) = proxy.stores.object(&t) else { return Err(WakeError::Gone) };
            match &by {
                WakeBy::Use(activity) => {
                    tracing::info!(target = %t, by = %activity.summary(), "wake requested by a held request");
                }
                WakeBy::Unverified => {
                    tracing::info!(target = %t, "wake requested by a request whose credential cannot be checked while it sleeps");
                    let requested = crate::metrics::OutcomeLabels { outcome: "requested" };
                    proxy.metrics.proxy_unverified_wakes.get_or_create(&requested).inc();
                }
            }
            // An API server down or restarting is waited for (within the
            // limit): the requests held for this wake are answered once it
            // is back, not turned away by a short outage.
            let mut pause = Duration::from_millis(250);
            loop {
                let requested = match &by {
                    WakeBy::Use(activity) => {
                        proxy.annotator.record_use(&object, activity.at, activity.summary()).await
                    }
                    WakeBy::Unverified => proxy.annotator.request_unverified_wake(&object, Utc::now()).await,
                };
                match requested {
                    Ok(()) => break,
                    Err(e) if e.transient() && started.elapsed() + pause < limit => {
                        tracing::warn!(target = %t, error = %crate::error::Chain(&e), "the wake request did not reach the API server; trying again");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(2));
                    }
                    Err(e) => return Err(WakeError::Request(Arc::new(e))),
                }
            }
            while !proxy.control_plane_ready(&t) {
                let left = limit.saturating_sub(started.elapsed());
                if left.is_zero() {
                    return Err(WakeError::ControlPlane(limit));
                }
                // Woken by the watch; the timeout is only a backstop for a
                // missed or lagged broadcast.
                let _ = tokio::time::timeout(left.min(Duration::from_secs(1)), changes.recv()).await;
            }
            let ready_after = started.elapsed();
            proxy.api_server_ready(&t, started, limit).await?;
            proxy.set_confirmed(&t, true);
            proxy.proofs.stale(&t);
            proxy.learn_keys(&t);
            tracing::info!(
                target = %t,
                took = ?started.elapsed(),
                control_plane_ready_after = ?ready_after,
                "vcluster awake; releasing held requests"
            );
            Ok(())
        }
    }
}

/// How long a wake may go on: it outlives the waiters' timeout (those who
/// give up get 504, later requests join the same wake while it goes on).
pub fn wake_limit(timeout: Duration) -> Duration {
    timeout * 3 + Duration::from_secs(60)
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
async fn readyz(up: &Upstream, started: Instant, limit: Duration) -> Result<(), WakeError> {
    let (checker, strict) = match &up.admin {
        Some(admin) => (&admin.client, true),
        None => (&up.plain.client, false),
    };
    let polling = Instant::now();
    loop {
        let uri = up.origin.uri("/readyz").map_err(|_| WakeError::ApiServer(limit))?;
        let req = Request::get(uri).body(full(Bytes::new())).map_err(|_| WakeError::ApiServer(limit))?;
        if let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_millis(250), checker.request(req)).await {
            let answers = !strict && matches!(resp.status().as_u16(), 401 | 403);
            if resp.status().is_success() || answers {
                return Ok(());
            }
        }
        if started.elapsed() > limit {
            return Err(WakeError::ApiServer(limit));
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
