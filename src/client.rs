//! Talking to the Kubernetes API as dormant: a client that sends dormant's
//! user agent, who that client is, a rate limit on dormant's own requests,
//! and the one way dormant changes an object — a merge patch, as field
//! manager `dormant`, computed from the object as last read and computed
//! again from a fresh read when someone wrote in between. The agent and
//! the CLI both use it; it knows nothing of targets or policies.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use anyhow::Context as _;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use kube::Client;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::discovery::ApiResource;
use prometheus_client::metrics::counter::Counter;
use serde_json::{Value, json};

use crate::vocab::FIELD_MANAGER;

/// The user agent of every request dormant makes.
pub fn user_agent() -> String {
    format!("dormant/{}", env!("CARGO_PKG_VERSION"))
}

/// A client from the environment (in-cluster, or `$KUBECONFIG`), sending
/// dormant's user agent.
pub async fn client() -> anyhow::Result<Client> {
    crate::tls::install_default_provider();
    let config = kube::Config::infer().await.context("no Kubernetes configuration found")?;
    client_from(config)
}

/// A client from `config`, sending dormant's user agent.
pub fn client_from(mut config: kube::Config) -> anyhow::Result<Client> {
    crate::tls::install_default_provider();
    if let Ok(v) = user_agent().parse() {
        config.headers.push((http::header::USER_AGENT, v));
    }
    Client::try_from(config).context("failed to build a Kubernetes client")
}

/// The user `client` authenticates as (a SelfSubjectReview), or
/// `someone` when the API server does not say.
pub async fn whoami(client: &Client) -> String {
    let api: Api<SelfSubjectReview> = Api::all(client.clone());
    let review: SelfSubjectReview = serde_json::from_value(
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}),
    )
    .unwrap_or_default();
    api.create(&PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() }, &review)
        .await
        .ok()
        .and_then(|r| r.status.and_then(|s| s.user_info).and_then(|u| u.username))
        .unwrap_or_else(|| "someone".into())
}

/// Patch parameters for every write: dormant's field manager.
pub fn patch_params() -> PatchParams {
    PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() }
}

/// A client-side rate limit on dormant's own API requests (watches aside),
/// counting what passed it and how long they waited: whether the QPS is
/// what holds dormant back is then a question `/metrics` answers.
#[derive(Clone)]
pub struct Throttle {
    limiter: Arc<DefaultDirectRateLimiter>,
    requests: Counter,
    waited: Counter<f64, AtomicU64>,
}

impl Throttle {
    pub fn new(qps: NonZeroU32, burst: NonZeroU32) -> Self {
        Throttle::counted(qps, burst, Counter::default(), Counter::default())
    }

    /// A throttle that adds each request to `requests` and the seconds it
    /// waited for its turn to `waited`.
    pub fn counted(
        qps: NonZeroU32,
        burst: NonZeroU32,
        requests: Counter,
        waited: Counter<f64, AtomicU64>,
    ) -> Self {
        let limiter = Arc::new(RateLimiter::direct(Quota::per_second(qps).allow_burst(burst)));
        Throttle { limiter, requests, waited }
    }

    pub async fn wait(&self) {
        if self.limiter.check().is_err() {
            let start = std::time::Instant::now();
            self.limiter.until_ready().await;
            self.waited.inc_by(start.elapsed().as_secs_f64());
        }
        self.requests.inc();
    }
}

/// What a write changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Changed,
    Unchanged,
}

/// Why a write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    #[error("failed to patch {id}")]
    Patch {
        id: String,
        #[source]
        source: kube::Error,
    },
    #[error("failed to read {id}")]
    Read {
        id: String,
        #[source]
        source: kube::Error,
    },
    #[error("gave up on {id} after {attempts} conflicting updates")]
    Conflicts { id: String, attempts: u32 },
    #[error("{id} has an unreadable annotation: {message}")]
    BadAnnotation { id: String, message: String },
}

/// An object dormant patches from what it last read of it.
pub trait Patchable: Clone {
    /// `Kind/namespace/name`, for errors and logs.
    fn id(&self) -> String;
    /// Empty for a cluster-scoped object.
    fn namespace(&self) -> &str;
    fn name(&self) -> &str;
    fn api_resource(&self) -> ApiResource;
    /// The same object from a fresh read (`None`: no longer one of these).
    fn reread(&self, v: &Value) -> Option<Self>;
}

const MAX_CONFLICTS: u32 = 5;

/// Writes objects for dormant: every write waits for the [`Throttle`] and
/// carries dormant's field manager.
#[derive(Clone)]
pub struct Patcher {
    client: Client,
    throttle: Throttle,
}

impl Patcher {
    pub fn new(client: Client, throttle: Throttle) -> Self {
        Patcher { client, throttle }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn throttle(&self) -> &Throttle {
        &self.throttle
    }

    /// Patches `o` with what `make` computes from it, until it is written
    /// or nothing is left to write (`make` answers `None`, or the object is
    /// gone). A conflict (409: someone wrote since the read `make` worked
    /// from; patches carry `resourceVersion` for that) computes the patch
    /// again from a fresh read, at most a few times.
    pub async fn patch_until_settled<O: Patchable>(
        &self,
        o: &O,
        make: impl Fn(&O) -> Result<Option<Value>, String>,
    ) -> Result<Outcome, PatchError> {
        let api: Api<DynamicObject> = match o.namespace() {
            "" => Api::all_with(self.client.clone(), &o.api_resource()),
            ns => Api::namespaced_with(self.client.clone(), ns, &o.api_resource()),
        };
        let id = o.id();
        let mut current = o.clone();
        for _ in 0..MAX_CONFLICTS {
            let patch = match make(&current) {
                Ok(Some(p)) => p,
                Ok(None) => return Ok(Outcome::Unchanged),
                Err(message) => return Err(PatchError::BadAnnotation { id, message }),
            };
            self.throttle.wait().await;
            match api.patch(current.name(), &patch_params(), &Patch::Merge(&patch)).await {
                Ok(_) => return Ok(Outcome::Changed),
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    tracing::debug!(object = %id, "conflict; retrying from a fresh read");
                    self.throttle.wait().await;
                    let fresh = match api.get_opt(current.name()).await {
                        Ok(Some(o)) => o,
                        Ok(None) => return Ok(Outcome::Unchanged),
                        Err(source) => return Err(PatchError::Read { id, source }),
                    };
                    let json = serde_json::to_value(&fresh).unwrap_or(Value::Null);
                    match current.reread(&json) {
                        Some(v) => current = v,
                        None => return Ok(Outcome::Unchanged),
                    }
                }
                Err(kube::Error::Api(e)) if e.code == 404 => return Ok(Outcome::Unchanged),
                Err(source) => return Err(PatchError::Patch { id, source }),
            }
        }
        Err(PatchError::Conflicts { id, attempts: MAX_CONFLICTS })
    }
}

/// Patch metadata setting `annotations`, at `resource_version` if known (a
/// conflict then says someone wrote since the read it was computed from).
pub fn metadata(resource_version: &Option<String>, annotations: Value) -> Value {
    let mut meta = json!({ "annotations": annotations });
    if let Some(rv) = resource_version {
        meta["resourceVersion"] = json!(rv);
    }
    meta
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every request is counted; only those that found the burst spent
    /// add to the time waited.
    #[tokio::test]
    async fn the_throttle_counts_requests_and_the_time_they_waited() {
        let (requests, waited) = (Counter::default(), Counter::<f64, AtomicU64>::default());
        let ten = NonZeroU32::new(10).unwrap();
        let t = Throttle::counted(ten, NonZeroU32::new(2).unwrap(), requests.clone(), waited.clone());
        t.wait().await;
        t.wait().await;
        assert_eq!((requests.get(), waited.get()), (2, 0.0), "within the burst nobody waits");
        t.wait().await;
        assert_eq!(requests.get(), 3);
        assert!(waited.get() > 0.0, "the third request waited for its turn");
    }
}
