//! The scaler: sleep and wake one target's workloads. Each workload changes
//! in one patch that also records (or clears) what it was, so the cluster
//! is restorable at any instant; conflicts are retried from a fresh read.

pub mod gitops;
pub mod keda;
pub mod plan;

use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams};
use kube::discovery::ApiResource;
use serde_json::Value;

pub use crate::client::Outcome;
use crate::client::{PatchError, Patchable, Patcher};
use crate::target::WorkloadView;
use crate::vocab::MANAGED_BY_LABEL;
pub use keda::{ScaledJobView, ScaledObjectView};
pub use plan::{hand_scaled, sleep_patch, wake_patch};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Patch(#[from] PatchError),
    #[error("failed to read {id}")]
    List {
        id: String,
        #[source]
        source: kube::Error,
    },
    #[error("{id} has an unreadable annotation: {message}")]
    BadAnnotation { id: String, message: String },
    #[error("failed to delete the synced pods of vcluster {namespace}/{name}")]
    DeleteSyncedPods {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

impl Error {
    /// Short, stable category for metrics and Event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Patch(PatchError::Patch { .. }) => "patch-workload",
            Error::Patch(PatchError::Read { .. }) | Error::List { .. } => "read-workload",
            Error::Patch(PatchError::Conflicts { .. }) => "conflict",
            Error::Patch(PatchError::BadAnnotation { .. }) | Error::BadAnnotation { .. } => "bad-annotation",
            Error::DeleteSyncedPods { .. } => "delete-synced-pods",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Sleeps and wakes workloads (and the KEDA objects that scale them) for
/// the controller. It only scales: a target's own annotations are
/// [`crate::annotate`]'s to write.
#[derive(Clone)]
pub struct Scaler {
    patcher: Patcher,
}

impl Patchable for ScaledObjectView {
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

impl Patchable for ScaledJobView {
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

impl Scaler {
    pub fn new(patcher: Patcher) -> Self {
        Scaler { patcher }
    }

    pub fn client(&self) -> &Client {
        self.patcher.client()
    }

    /// Scales `w` to zero (or suspends it), recording what it was, unless it
    /// already sleeps or is `excluded`.
    pub async fn sleep_workload(&self, w: &WorkloadView, excluded: bool) -> Result<Outcome> {
        Ok(self.patcher.patch_until_settled(w, |w| sleep_patch(w, excluded)).await?)
    }

    /// Restores `w` to what was recorded, unless someone changed it by hand
    /// meanwhile (then their value stays and only the record goes).
    pub async fn wake_workload(&self, w: &WorkloadView) -> Result<Outcome> {
        Ok(self.patcher.patch_until_settled(w, wake_patch).await?)
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
        let api: Api<DynamicObject> = Api::namespaced_with(self.client().clone(), namespace, resource);
        self.patcher.throttle().wait().await;
        match api.list(&ListParams::default()).await {
            Ok(list) => Ok(list.items.iter().filter_map(|o| view(&serde_json::to_value(o).ok()?)).collect()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(Vec::new()),
            Err(source) => {
                Err(Error::List { id: format!("{} in namespace {namespace}", resource.kind), source })
            }
        }
    }

    /// Pauses a ScaledJob (no new Jobs), recording its previous pause.
    pub async fn pause_scaled_job(&self, sj: &ScaledJobView) -> Result<Outcome> {
        Ok(self.patcher.patch_until_settled(sj, keda::pause_job_patch).await?)
    }

    /// Gives a ScaledJob back the pause it had before sleeping.
    pub async fn resume_scaled_job(&self, sj: &ScaledJobView) -> Result<Outcome> {
        Ok(self.patcher.patch_until_settled(sj, keda::resume_job_patch).await?)
    }

    /// Pauses a ScaledObject at zero replicas, recording its previous pause.
    pub async fn pause_scaled_object(&self, so: &ScaledObjectView) -> Result<Outcome> {
        Ok(self.patcher.patch_until_settled(so, keda::pause_patch).await?)
    }

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

    /// Gives a ScaledObject back the pause it had before sleeping.
    pub async fn resume_scaled_object(&self, so: &ScaledObjectView) -> Result<Outcome> {
        Ok(self.patcher.patch_until_settled(so, keda::resume_patch).await?)
    }

    /// Deletes the host pods vcluster `name` synced (its syncer recreates
    /// them when it wakes).
    pub async fn delete_synced_pods(&self, namespace: &str, name: &str) -> Result<()> {
        let pods: Api<Pod> = Api::namespaced(self.client().clone(), namespace);
        self.patcher.throttle().wait().await;
        let lp = ListParams::default().labels(&format!("{MANAGED_BY_LABEL}={name}"));
        pods.delete_collection(&DeleteParams::default(), &lp).await.map(|_| ()).map_err(|source| {
            Error::DeleteSyncedPods { namespace: namespace.into(), name: name.into(), source }
        })
    }
}
