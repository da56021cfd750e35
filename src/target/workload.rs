//! Workloads: the objects a target scales, seen through one uniform view
//! (kind, name, annotations, replicas or suspend flag, readiness and what
//! one replica requests), built from typed store objects or from a fresh
//! read as JSON.

use std::collections::BTreeMap;

use super::cached::{self, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use kube::ResourceExt;
use kube::discovery::ApiResource;
use serde_json::Value;

/// The kinds of workload dormant scales or suspends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WorkloadKind {
    Deployment,
    StatefulSet,
    ReplicaSet,
    CronJob,
    Job,
}

impl WorkloadKind {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::Deployment => "Deployment",
            WorkloadKind::StatefulSet => "StatefulSet",
            WorkloadKind::ReplicaSet => "ReplicaSet",
            WorkloadKind::CronJob => "CronJob",
            WorkloadKind::Job => "Job",
        }
    }

    /// Scaled through replicas (else suspended).
    pub fn scales(self) -> bool {
        matches!(self, WorkloadKind::Deployment | WorkloadKind::StatefulSet | WorkloadKind::ReplicaSet)
    }

    pub fn api_resource(self) -> ApiResource {
        match self {
            WorkloadKind::Deployment => ApiResource::erase::<Deployment>(&()),
            WorkloadKind::StatefulSet => ApiResource::erase::<StatefulSet>(&()),
            WorkloadKind::ReplicaSet => ApiResource::erase::<ReplicaSet>(&()),
            WorkloadKind::CronJob => ApiResource::erase::<CronJob>(&()),
            WorkloadKind::Job => ApiResource::erase::<Job>(&()),
        }
    }
}

/// What one replica (one pod) asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Requests {
    pub cpu_cores: f64,
    pub memory_bytes: f64,
}

impl std::ops::Add for Requests {
    type Output = Requests;
    fn add(self, o: Requests) -> Requests {
        Requests { cpu_cores: self.cpu_cores + o.cpu_cores, memory_bytes: self.memory_bytes + o.memory_bytes }
    }
}

impl std::ops::Mul<f64> for Requests {
    type Output = Requests;
    fn mul(self, n: f64) -> Requests {
        Requests { cpu_cores: self.cpu_cores * n, memory_bytes: self.memory_bytes * n }
    }
}

/// One workload as dormant sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadView {
    pub kind: WorkloadKind,
    pub namespace: String,
    pub name: String,
    pub resource_version: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// `spec.replicas` (defaulted to 1 when unset) for scaled kinds.
    pub replicas: Option<i32>,
    /// `spec.suspend` (defaulted to false) for suspended kinds.
    pub suspend: Option<bool>,
    /// Pods that exist for it now (`status.replicas`; active pods for a Job).
    pub current_pods: i32,
    /// Ready pods (`status.readyReplicas`).
    pub ready_pods: i32,
    /// A Job that has completed or failed (nothing to suspend).
    pub finished: bool,
    /// Owned by a controller (such a workload is left to its owner).
    pub controlled: bool,
    pub per_replica: Requests,
    /// A StatefulSet whose PersistentVolumeClaims Kubernetes deletes when
    /// it is scaled down (`persistentVolumeClaimRetentionPolicy.whenScaled:
    /// Delete`, with claim templates).
    pub deletes_claims_when_scaled: bool,
}

impl WorkloadView {
    /// Ready when every wanted replica is ready (suspended kinds always are).
    pub fn ready(&self) -> bool {
        match self.replicas {
            Some(r) => self.ready_pods >= r,
            None => true,
        }
    }

    fn base(kind: WorkloadKind, meta: &kube::api::ObjectMeta) -> WorkloadView {
        WorkloadView {
            kind,
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            resource_version: meta.resource_version.clone(),
            labels: meta.labels.clone().unwrap_or_default(),
            annotations: meta.annotations.clone().unwrap_or_default(),
            replicas: None,
            suspend: None,
            current_pods: 0,
            ready_pods: 0,
            finished: false,
            controlled: meta
                .owner_references
                .as_ref()
                .is_some_and(|o| o.iter().any(|r| r.controller == Some(true))),
            per_replica: Requests::default(),
            deletes_claims_when_scaled: false,
        }
    }

    /// A Deployment, StatefulSet or ReplicaSet as the caches keep it.
    fn from_scalable<K>(kind: WorkloadKind, s: &cached::Scalable<K>) -> Self {
        let mut w = Self::base(kind, &s.metadata);
        w.replicas = Some(s.replicas.unwrap_or(1));
        w.current_pods = s.current_pods;
        w.ready_pods = s.ready_pods;
        w.per_replica = s.per_replica;
        w.deletes_claims_when_scaled = s.claims_deleted_when_scaled && !s.claim_templates.is_empty();
        w
    }

    pub fn from_deployment(d: &Deployment) -> Self {
        Self::from_scalable(WorkloadKind::Deployment, d)
    }

    pub fn from_statefulset(s: &StatefulSet) -> Self {
        Self::from_scalable(WorkloadKind::StatefulSet, s)
    }

    pub fn from_replicaset(r: &ReplicaSet) -> Self {
        Self::from_scalable(WorkloadKind::ReplicaSet, r)
    }

    pub fn from_cronjob(c: &CronJob) -> Self {
        let mut w = Self::base(WorkloadKind::CronJob, &c.metadata);
        w.suspend = Some(c.spec.suspend.unwrap_or(false));
        w.current_pods = c.status.as_ref().and_then(|s| s.active.as_ref()).map_or(0, |a| a.len() as i32);
        w
    }

    pub fn from_job(j: &Job) -> Self {
        let mut w = Self::base(WorkloadKind::Job, &j.metadata);
        let spec = j.spec.as_ref();
        w.suspend = Some(spec.and_then(|s| s.suspend).unwrap_or(false));
        let status = j.status.as_ref();
        w.current_pods = status.and_then(|s| s.active).unwrap_or(0);
        w.finished = status.and_then(|s| s.conditions.as_ref()).is_some_and(|cs| {
            cs.iter().any(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
        });
        // A Job's pods belong to its CronJob's schedule when it has one; it
        // is still suspended on its own while it runs.
        w.controlled = false;
        w.per_replica = template_requests(spec.map(|s| &s.template));
        w
    }

    /// From a fresh read (`DynamicObject` as JSON).
    pub fn from_json(kind: WorkloadKind, v: &Value) -> Option<Self> {
        Some(match kind {
            WorkloadKind::Deployment => Self::from_deployment(&serde_json::from_value(v.clone()).ok()?),
            WorkloadKind::StatefulSet => Self::from_statefulset(&serde_json::from_value(v.clone()).ok()?),
            WorkloadKind::ReplicaSet => Self::from_replicaset(&serde_json::from_value(v.clone()).ok()?),
            WorkloadKind::CronJob => Self::from_cronjob(&serde_json::from_value(v.clone()).ok()?),
            WorkloadKind::Job => Self::from_job(&serde_json::from_value(v.clone()).ok()?),
        })
    }

    pub fn id(&self) -> String {
        format!("{}/{}/{}", self.kind.as_str(), self.namespace, self.name)
    }
}

/// What any of these kinds can be read as, for generic code.
pub trait AsWorkload: ResourceExt {
    fn view(&self) -> WorkloadView;
}

impl crate::client::Patchable for WorkloadView {
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

impl AsWorkload for Deployment {
    fn view(&self) -> WorkloadView {
        WorkloadView::from_deployment(self)
    }
}
impl AsWorkload for StatefulSet {
    fn view(&self) -> WorkloadView {
        WorkloadView::from_statefulset(self)
    }
}
impl AsWorkload for ReplicaSet {
    fn view(&self) -> WorkloadView {
        WorkloadView::from_replicaset(self)
    }
}
impl AsWorkload for CronJob {
    fn view(&self) -> WorkloadView {
        WorkloadView::from_cronjob(self)
    }
}
impl AsWorkload for Job {
    fn view(&self) -> WorkloadView {
        WorkloadView::from_job(self)
    }
}

/// The sum of the containers' requests in a pod template.
pub fn template_requests(t: Option<&PodTemplateSpec>) -> Requests {
    t.and_then(|t| t.spec.as_ref()).map(pod_spec_requests).unwrap_or_default()
}

pub fn pod_spec_requests(spec: &k8s_openapi::api::core::v1::PodSpec) -> Requests {
    cached::requests(spec.containers.iter().map(|c| c.resources.as_ref().and_then(|r| r.requests.as_ref())))
}

/// A Kubernetes quantity (`100m`, `1.5`, `64Mi`, `1G`, `2e3`) as a number
/// of base units (cores, bytes).
pub fn parse_quantity(s: &str) -> Option<f64> {
    let s = s.trim();
    let split =
        s.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-')).unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0f64.powi(4),
        "Pi" => 1024.0f64.powi(5),
        "Ei" => 1024.0f64.powi(6),
        e if e.starts_with(['e', 'E']) => 10f64.powi(e[1..].parse().ok()?),
        _ => return None,
    };
    Some(n * mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        for (q, v) in [
            ("100m", 0.1),
            ("1", 1.0),
            ("1.5", 1.5),
            ("64Mi", 67_108_864.0),
            ("1Gi", 1_073_741_824.0),
            ("1G", 1e9),
            ("2e3", 2000.0),
            ("250u", 0.00025),
        ] {
            assert!((parse_quantity(q).unwrap() - v).abs() < 1e-9, "{q}");
        }
        assert_eq!(parse_quantity("lots"), None);
        assert_eq!(parse_quantity("1Zi"), None);
    }
}
