//! The scaler: sleep and wake one target's workloads. Each workload changes
//! in one patch that also records (or clears) what it was, so the cluster
//! is restorable at any instant; conflicts are retried from a fresh read.

pub mod gitops;
pub mod keda;
pub mod plan;
pub mod release;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Client;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Preconditions};
use kube::discovery::ApiResource;
use serde_json::Value;

pub use crate::client::Outcome;
use crate::client::{PatchError, Patchable, Patcher};
use crate::target::WorkloadView;
use crate::vocab::{OBJECT_NAME_ANNOTATION, OBJECT_NAMESPACE_ANNOTATION, OWNER_REFERENCES_ANNOTATION};
pub use keda::{ScaledJobView, ScaledObjectView};
pub use plan::{
    SleepRecord, hand_scaled, own_record, record_key, record_lost, record_to_write, sleep_patch,
    sleep_patch_from, wake_patch, wake_patch_from,
};

/// The one patch that puts `w` to sleep: [`sleep_patch_from`] plus the
/// marks that keep a GitOps controller from scaling it back up
/// ([`gitops::with_sleep_marks`]), so no instant has one without the other.
pub fn sleep_patch_marked(
    w: &WorkloadView,
    excluded: bool,
    copy: Option<&SleepRecord>,
) -> Result<Option<Value>, String> {
    Ok(gitops::with_sleep_marks(w, excluded, sleep_patch_from(w, excluded, copy)?))
}

/// The one patch that wakes `w`: [`wake_patch_from`] with its GitOps marks
/// removed and their previous values given back.
pub fn wake_patch_unmarked(w: &WorkloadView, copy: Option<&SleepRecord>) -> Result<Option<Value>, String> {
    gitops::with_wake_unmarks(w, wake_patch_from(w, copy)?)
}

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
    #[error("failed to delete namespace {name}")]
    DeleteNamespace {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("failed to delete {id} (delete-after)")]
    DeleteRelease {
        id: String,
        #[source]
        source: kube::Error,
    },
    #[error("failed to delete the synced pods of vcluster {namespace}/{name}")]
    DeleteSyncedPods {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

impl Error {
    /// A read the API server refused to dormant's own identity (403).
    pub fn read_forbidden(&self) -> bool {
        matches!(self, Error::List { source: kube::Error::Api(s), .. } if s.code == 403)
    }

    /// Short, stable category for metrics and Event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Patch(PatchError::Patch { .. }) => "patch-workload",
            Error::Patch(PatchError::Read { .. }) | Error::List { .. } => "read-workload",
            Error::Patch(PatchError::Conflicts { .. }) => "conflict",
            Error::Patch(PatchError::BadAnnotation { .. }) | Error::BadAnnotation { .. } => "bad-annotation",
            Error::DeleteSyncedPods { .. } => "delete-synced-pods",
            Error::DeleteNamespace { .. } => "delete-namespace",
            Error::DeleteRelease { .. } => "delete-release",
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

    /// The client rate limit every request of the controller passes.
    pub fn throttle(&self) -> &crate::client::Throttle {
        self.patcher.throttle()
    }

    /// Scales `w` to zero (or suspends it), recording what it was, unless it
    /// already sleeps or is `excluded`.
    pub async fn sleep_workload(
        &self,
        w: &WorkloadView,
        excluded: bool,
        copy: Option<&SleepRecord>,
    ) -> Result<Outcome> {
        Ok(self.patcher.patch_until_settled(w, |w| sleep_patch_marked(w, excluded, copy)).await?)
    }

    /// Restores `w` to what was recorded, unless someone changed it by hand
    /// meanwhile (then their value stays and only the record goes).
    /// `copy` is the target's copy of the records, for a workload whose own
    /// record is gone.
    pub async fn wake_workload(&self, w: &WorkloadView, copy: Option<&SleepRecord>) -> Result<Outcome> {
        Ok(self.patcher.patch_until_settled(w, |w| wake_patch_unmarked(w, copy)).await?)
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

    /// The Argo CD Application `namespace/name`; `None` when there is none
    /// (or Argo CD is not installed).
    pub async fn application(&self, namespace: &str, name: &str) -> Result<Option<gitops::ApplicationView>> {
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client().clone(), namespace, &gitops::application_resource());
        self.patcher.throttle().wait().await;
        match api.get_opt(name).await {
            Ok(o) => Ok(o.and_then(|o| gitops::ApplicationView::from_json(&serde_json::to_value(o).ok()?))),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(None),
            Err(source) => Err(Error::List { id: format!("Application/{namespace}/{name}"), source }),
        }
    }

    /// Pauses an Argo CD Application (`skip-reconcile`), recording what it had.
    pub async fn pause_application(&self, app: &gitops::ApplicationView) -> Result<Outcome> {
        Ok(self.patcher.patch_until_settled(app, |a| Ok(gitops::pause_application_patch(a))).await?)
    }

    /// Gives an Argo CD Application back the `skip-reconcile` it had.
    pub async fn resume_application(&self, app: &gitops::ApplicationView) -> Result<Outcome> {
        Ok(self.patcher.patch_until_settled(app, gitops::resume_application_patch).await?)
    }

    /// Deletes a namespace (delete-after), only if it is still exactly the
    /// object given (its UID and resourceVersion). `Ok(false)`: it changed
    /// or went since; look again.
    pub async fn delete_namespace(&self, ns: &Namespace) -> Result<bool> {
        let name = ns.name_any();
        let dp = DeleteParams {
            preconditions: Some(Preconditions { uid: ns.uid(), resource_version: ns.resource_version() }),
            ..DeleteParams::default()
        };
        self.patcher.throttle().wait().await;
        match Api::<Namespace>::all(self.client().clone()).delete(&name, &dp).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(false),
            Err(source) => Err(Error::DeleteNamespace { name, source }),
        }
    }

    /// Deletes these host pods of vcluster `name`, each only if it is still
    /// the pod that was seen (its UID): a pod the syncer created since is a
    /// new one, not ours to judge. Only pods whose virtual pod has a
    /// controller are given here (see [`restorable`]): that controller
    /// creates them again when the vcluster wakes.
    pub async fn delete_synced_pods(&self, namespace: &str, name: &str, pods: &[&Pod]) -> Result<()> {
        let api: Api<Pod> = Api::namespaced(self.client().clone(), namespace);
        for p in pods {
            self.patcher.throttle().wait().await;
            let dp = DeleteParams {
                preconditions: Some(Preconditions { uid: p.uid(), resource_version: None }),
                ..DeleteParams::default()
            };
            match api.delete(&p.name_any(), &dp).await {
                Ok(_) => {}
                // Gone already, or replaced by another pod of that name.
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
                Err(source) => {
                    return Err(Error::DeleteSyncedPods {
                        namespace: namespace.into(),
                        name: name.into(),
                        source,
                    });
                }
            }
        }
        Ok(())
    }
}

/// A synced host pod that comes back after a wake: its virtual pod has an
/// owner (a ReplicaSet, a StatefulSet, a Job, a DaemonSet…) whose controller
/// inside the vcluster creates it again once the syncer has deleted the
/// started virtual pod whose host pod vanished. A bare virtual pod has no
/// such owner, so deleting its host pod loses it for good (vCluster's own
/// sleep mode documents that loss); dormant leaves those running.
pub fn restorable(p: &Pod) -> bool {
    p.annotations()
        .get(OWNER_REFERENCES_ANNOTATION)
        .is_some_and(|v| serde_json::from_str::<Vec<Value>>(v).is_ok_and(|owners| !owners.is_empty()))
}

/// `namespace/name` of the virtual pod a host pod stands for.
pub fn virtual_name(p: &Pod) -> String {
    let a = p.annotations();
    match (a.get(OBJECT_NAMESPACE_ANNOTATION), a.get(OBJECT_NAME_ANNOTATION)) {
        (Some(ns), Some(n)) => format!("{ns}/{n}"),
        _ => p.name_any(),
    }
}
