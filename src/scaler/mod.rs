//! The scaler: sleep and wake one target's workloads. Each workload changes
//! in one patch that also records (or clears) what it was, so the cluster
//! is restorable at any instant; conflicts are retried from a fresh read.

pub mod gitops;
pub mod keda;
pub mod plan;

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::Arc;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::discovery::ApiResource;
use serde_json::{Value, json};

use crate::target::{MANAGED_BY_LABEL, TargetObject, WorkloadView};
pub use keda::{ScaledJobView, ScaledObjectView};
pub use plan::{hand_scaled, sleep_patch, wake_patch};

/// The field manager dormant patches as.
pub const FIELD_MANAGER: &str = "dormant";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to patch {id}")]
    PatchWorkload {
        id: String,
        #[source]
        source: kube::Error,
    },
    #[error("failed to read {id}")]
    ReadWorkload {
        id: String,
        #[source]
        source: kube::Error,
    },
    #[error("gave up on {id} after {attempts} conflicting updates")]
    Conflicts { id: String, attempts: u32 },
    #[error("{id} has an unreadable annotation: {message}")]
    BadAnnotation { id: String, message: String },
    #[error("failed to delete the synced pods of vcluster {namespace}/{name}")]
    DeleteSyncedPods {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("failed to annotate target {target}")]
    PatchTarget {
        target: String,
        #[source]
        source: kube::Error,
    },
}

impl Error {
    /// Short, stable category for metrics and Event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            Error::PatchWorkload { .. } => "patch-workload",
            Error::ReadWorkload { .. } => "read-workload",
            Error::Conflicts { .. } => "conflict",
            Error::BadAnnotation { .. } => "bad-annotation",
            Error::DeleteSyncedPods { .. } => "delete-synced-pods",
            Error::PatchTarget { .. } => "patch-target",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A client-side rate limit on dormant's own API requests (watches aside).
#[derive(Clone)]
pub struct Throttle(Arc<DefaultDirectRateLimiter>);

impl Throttle {
    pub fn new(qps: NonZeroU32, burst: NonZeroU32) -> Self {
        Throttle(Arc::new(RateLimiter::direct(Quota::per_second(qps).allow_burst(burst))))
    }

    pub async fn wait(&self) {
        self.0.until_ready().await;
    }
}

/// What a call changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Changed,
    Unchanged,
}

/// Patch metadata setting `annotations`, at `resource_version` if known (a
/// conflict then says someone wrote since the read it was computed from).
fn metadata(resource_version: &Option<String>, annotations: Value) -> Value {
    let mut meta = json!({ "annotations": annotations });
    if let Some(rv) = resource_version {
        meta["resourceVersion"] = json!(rv);
    }
    meta
}

/// A merge patch of [`metadata`] alone.
fn annotations_patch(resource_version: &Option<String>, annotations: Value) -> Value {
    json!({ "metadata": metadata(resource_version, annotations) })
}

/// Acts on the cluster for the controller and the CLI.
#[derive(Clone)]
pub struct Scaler {
    client: Client,
    throttle: Throttle,
}

const MAX_CONFLICTS: u32 = 5;

/// An object dormant patches together with its record, re-read on conflict.
trait Recorded: Clone {
    fn id(&self) -> String;
    fn namespace(&self) -> &str;
    fn name(&self) -> &str;
    fn api_resource(&self) -> ApiResource;
    /// The same object from a fresh read.
    fn reread(&self, v: &Value) -> Option<Self>;
}

impl Recorded for WorkloadView {
    fn id(&self) -> String {
        WorkloadView::id(self)
    }
    fn namespace(&self) -> &str {
        &self.namespace
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn api_resource(&self) -> ApiResource {
        self.kind.api_resource()
    }
    fn reread(&self, v: &Value) -> Option<Self> {
        WorkloadView::from_json(self.kind, v)
    }
}

impl Recorded for ScaledObjectView {
    fn id(&self) -> String {
        ScaledObjectView::id(self)
    }
    fn namespace(&self) -> &str {
        &self.namespace
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn api_resource(&self) -> ApiResource {
        keda::api_resource()
    }
    fn reread(&self, v: &Value) -> Option<Self> {
        ScaledObjectView::from_json(v)
    }
}

impl Recorded for ScaledJobView {
    fn id(&self) -> String {
        ScaledJobView::id(self)
    }
    fn namespace(&self) -> &str {
        &self.namespace
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn api_resource(&self) -> ApiResource {
        keda::scaled_job_resource()
    }
    fn reread(&self, v: &Value) -> Option<Self> {
        ScaledJobView::from_json(v)
    }
}

/// A target's own object (a Namespace is cluster-scoped: namespace "").
impl Recorded for TargetObject {
    fn id(&self) -> String {
        match Recorded::namespace(self) {
            "" => format!("{}/{}", self.api_resource().kind, Recorded::name(self)),
            ns => format!("{}/{ns}/{}", self.api_resource().kind, Recorded::name(self)),
        }
    }
    fn namespace(&self) -> &str {
        match self {
            TargetObject::Namespace(_) => "",
            _ => self.meta().namespace.as_deref().unwrap_or_default(),
        }
    }
    fn name(&self) -> &str {
        self.meta().name.as_deref().unwrap_or_default()
    }
    fn api_resource(&self) -> ApiResource {
        match self {
            TargetObject::Namespace(_) => ApiResource::erase::<Namespace>(&()),
            TargetObject::StatefulSet(_) => ApiResource::erase::<StatefulSet>(&()),
            TargetObject::Deployment(_) => ApiResource::erase::<Deployment>(&()),
        }
    }
    fn reread(&self, v: &Value) -> Option<Self> {
        let v = v.clone();
        Some(match self {
            TargetObject::Namespace(_) => TargetObject::Namespace(Arc::new(serde_json::from_value(v).ok()?)),
            TargetObject::StatefulSet(_) => {
                TargetObject::StatefulSet(Arc::new(serde_json::from_value(v).ok()?))
            }
            TargetObject::Deployment(_) => {
                TargetObject::Deployment(Arc::new(serde_json::from_value(v).ok()?))
            }
        })
    }
}

impl Scaler {
    pub fn new(client: Client, throttle: Throttle) -> Self {
        Scaler { client, throttle }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Scales `w` to zero (or suspends it), recording what it was, unless it
    /// already sleeps or is `excluded`.
    pub async fn sleep_workload(&self, w: &WorkloadView, excluded: bool) -> Result<Outcome> {
        self.patch_until_settled(w, |w| sleep_patch(w, excluded)).await
    }

    /// Restores `w` to what was recorded, unless someone changed it by hand
    /// meanwhile (then their value stays and only the record goes).
    pub async fn wake_workload(&self, w: &WorkloadView) -> Result<Outcome> {
        self.patch_until_settled(w, wake_patch).await
    }

    /// The KEDA ScaledObjects in `namespace` (none when KEDA is not installed).
    pub async fn scaled_objects(&self, namespace: &str) -> Result<Vec<ScaledObjectView>> {
        self.list_keda(namespace, &keda::api_resource(), ScaledObjectView::from_json).await
    }

    /// The KEDA ScaledJobs in `namespace` (none when KEDA is not installed).
    pub async fn scaled_jobs(&self, namespace: &str) -> Result<Vec<ScaledJobView>> {
        self.list_keda(namespace, &keda::scaled_job_resource(), ScaledJobView::from_json).await
    }

    async fn list_keda<T>(
        &self,
        namespace: &str,
        resource: &ApiResource,
        view: impl Fn(&Value) -> Option<T>,
    ) -> Result<Vec<T>> {
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), namespace, resource);
        self.throttle.wait().await;
        match api.list(&ListParams::default()).await {
            Ok(list) => Ok(list.items.iter().filter_map(|o| view(&serde_json::to_value(o).ok()?)).collect()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(Vec::new()),
            Err(source) => {
                Err(Error::ReadWorkload { id: format!("{} in namespace {namespace}", resource.kind), source })
            }
        }
    }

    /// Pauses a ScaledJob (no new Jobs), recording its previous pause.
    pub async fn pause_scaled_job(&self, sj: &ScaledJobView) -> Result<Outcome> {
        self.patch_until_settled(sj, keda::pause_job_patch).await
    }

    /// Gives a ScaledJob back the pause it had before sleeping.
    pub async fn resume_scaled_job(&self, sj: &ScaledJobView) -> Result<Outcome> {
        self.patch_until_settled(sj, keda::resume_job_patch).await
    }

    /// Pauses a ScaledObject at zero replicas, recording its previous pause.
    pub async fn pause_scaled_object(&self, so: &ScaledObjectView) -> Result<Outcome> {
        self.patch_until_settled(so, keda::pause_patch).await
    }

    /// Gives a ScaledObject back the pause it had before sleeping.
    /// The ScaledObjects in `namespace`, failing when one carries a record
    /// dormant could not give back: read before a wake changes anything,
    /// so such a target is left as it is rather than half woken.
    pub async fn resumable_scaled_objects(&self, namespace: &str) -> Result<Vec<ScaledObjectView>> {
        let all = self.scaled_objects(namespace).await?;
        for so in &all {
            if let Err(message) = keda::resume_patch(so) {
                return Err(Error::BadAnnotation { id: so.id(), message });
            }
        }
        Ok(all)
    }

    pub async fn resume_scaled_object(&self, so: &ScaledObjectView) -> Result<Outcome> {
        self.patch_until_settled(so, keda::resume_patch).await
    }

    async fn patch_until_settled<O: Recorded>(
        &self,
        o: &O,
        make: impl Fn(&O) -> Result<Option<Value>, String>,
    ) -> Result<Outcome> {
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
                Err(message) => return Err(Error::BadAnnotation { id, message }),
            };
            self.throttle.wait().await;
            match api.patch(current.name(), &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => return Ok(Outcome::Changed),
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    tracing::debug!(object = %id, "conflict; retrying from a fresh read");
                    self.throttle.wait().await;
                    let fresh = match api.get_opt(current.name()).await {
                        Ok(Some(o)) => o,
                        Ok(None) => return Ok(Outcome::Unchanged),
                        Err(source) => return Err(Error::ReadWorkload { id, source }),
                    };
                    let json = serde_json::to_value(&fresh).unwrap_or(Value::Null);
                    match current.reread(&json) {
                        Some(v) => current = v,
                        None => return Ok(Outcome::Unchanged),
                    }
                }
                Err(kube::Error::Api(e)) if e.code == 404 => return Ok(Outcome::Unchanged),
                Err(source) => return Err(Error::PatchWorkload { id, source }),
            }
        }
        Err(Error::Conflicts { id, attempts: MAX_CONFLICTS })
    }

    /// Sets annotations computed from the target object's current ones, at
    /// the version they were read at: on a conflict (someone wrote since),
    /// computed again from a fresh read.
    pub async fn update_target_annotations(
        &self,
        object: &TargetObject,
        changes: impl Fn(&BTreeMap<String, String>) -> BTreeMap<&'static str, Option<String>>,
    ) -> Result<Outcome> {
        self.patch_until_settled(object, |o| {
            let changes = changes(o.annotations());
            if changes.is_empty() {
                return Ok(None);
            }
            Ok(Some(annotations_patch(&o.resource_version(), json!(changes))))
        })
        .await
    }

    /// Deletes the host pods vcluster `name` synced (its syncer recreates
    /// them when it wakes).
    pub async fn delete_synced_pods(&self, namespace: &str, name: &str) -> Result<()> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        self.throttle.wait().await;
        let lp = ListParams::default().labels(&format!("{MANAGED_BY_LABEL}={name}"));
        pods.delete_collection(&DeleteParams::default(), &lp).await.map(|_| ()).map_err(|source| {
            Error::DeleteSyncedPods { namespace: namespace.into(), name: name.into(), source }
        })
    }

    /// Sets (Some) or removes (None) annotations on a target's object, and
    /// returns the object as written when it is a workload (None for a
    /// namespace, or when nothing changed). A vcluster's control plane is
    /// both its target object and its workload: the scale patch that
    /// follows is made from this read, replicas and version together, so
    /// it does not conflict with this write, and a change someone else made
    /// before it (a `kubectl scale`) is what gets recorded, not the cache's
    /// older count under the newer version.
    pub async fn annotate_target(
        &self,
        object: &TargetObject,
        changes: &BTreeMap<&'static str, Option<String>>,
    ) -> Result<Option<WorkloadView>> {
        if changes.is_empty() {
            return Ok(None);
        }
        let patch = json!({ "metadata": { "annotations": changes } });
        let p = Patch::Merge(&patch);
        let pp = PatchParams::default();
        self.throttle.wait().await;
        let (target, r) = match object {
            TargetObject::Namespace(n) => {
                let name = n.metadata.name.clone().unwrap_or_default();
                (
                    name.clone(),
                    Api::<Namespace>::all(self.client.clone()).patch(&name, &pp, &p).await.map(|_| None),
                )
            }
            TargetObject::StatefulSet(s) => {
                let (ns, name) = (
                    s.metadata.namespace.clone().unwrap_or_default(),
                    s.metadata.name.clone().unwrap_or_default(),
                );
                (
                    format!("{ns}/{name}"),
                    Api::<StatefulSet>::namespaced(self.client.clone(), &ns)
                        .patch(&name, &pp, &p)
                        .await
                        .map(|o| Some(WorkloadView::from_statefulset(&o))),
                )
            }
            TargetObject::Deployment(d) => {
                let (ns, name) = (
                    d.metadata.namespace.clone().unwrap_or_default(),
                    d.metadata.name.clone().unwrap_or_default(),
                );
                (
                    format!("{ns}/{name}"),
                    Api::<Deployment>::namespaced(self.client.clone(), &ns)
                        .patch(&name, &pp, &p)
                        .await
                        .map(|o| Some(WorkloadView::from_deployment(&o))),
                )
            }
        };
        r.map_err(|source| Error::PatchTarget { target, source })
    }
}
