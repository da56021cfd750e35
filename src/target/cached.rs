//! What the agent's caches keep of a workload that scales (StatefulSet,
//! Deployment, ReplicaSet): the few fields dormant reads, read straight
//! from the API's JSON, instead of k8s-openapi's objects with most fields
//! empty.
//!
//! A vcluster's control plane is a StatefulSet, and a namespace target is
//! made of Deployments and their ReplicaSets, so at 10,000 vclusters or
//! 50,000 namespace workloads these caches are most of the agent's
//! memory. k8s-openapi's structs are fixed size: a `StatefulSet` is about
//! 2.6 KB inline with every field empty and each kept `Container` 2.3 KB,
//! some 7 KB per cached object after [`super::stores::Trim`]
//! (BENCHMARKS.md, the heap profile at 5,000 targets). This record keeps
//! the metadata (labels, annotations, owners: what targets and policies
//! are made of) and otherwise only numbers and names; its pod template is
//! summed into the requests savings are computed from as it is read.

use std::collections::BTreeMap;

use std::marker::PhantomData;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::ObjectMeta;
use serde::Deserialize;

use super::workload::{Requests, parse_quantity};

/// A StatefulSet as the caches keep it.
pub type StatefulSet = Scalable<k8s_openapi::api::apps::v1::StatefulSet>;
/// A Deployment as the caches keep it.
pub type Deployment = Scalable<k8s_openapi::api::apps::v1::Deployment>;
/// A ReplicaSet as the caches keep it.
pub type ReplicaSet = Scalable<k8s_openapi::api::apps::v1::ReplicaSet>;

/// A workload of kind `K` as the caches keep it. `K` only names the kind:
/// nothing of type `K` is ever stored.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(from = "wire::Workload")]
pub struct Scalable<K> {
    pub metadata: ObjectMeta,
    /// `spec.replicas` (Kubernetes reads none as 1).
    pub replicas: Option<i32>,
    /// `status.replicas`: pods that exist.
    pub current_pods: i32,
    /// `status.readyReplicas`.
    pub ready_pods: i32,
    /// The pod template's labels (app traffic selects its pods by them);
    /// none for a Deployment's ReplicaSet.
    pub template_labels: BTreeMap<String, String>,
    /// The sum of the pod template's containers' requests.
    pub per_replica: Requests,
    /// `spec.selector.matchLabels`, kept only with claim templates (which
    /// it finds the claims of).
    pub selector: BTreeMap<String, String>,
    /// The names of its volume claim templates (a StatefulSet's; a
    /// vcluster's deletion finds its claims by them and the selector).
    pub claim_templates: Vec<String>,
    /// `persistentVolumeClaimRetentionPolicy.whenScaled` is `Delete` (a
    /// StatefulSet's).
    pub claims_deleted_when_scaled: bool,
    kind: PhantomData<K>,
}

impl<K: k8s_openapi::Resource> k8s_openapi::Resource for Scalable<K> {
    const API_VERSION: &'static str = K::API_VERSION;
    const GROUP: &'static str = K::GROUP;
    const KIND: &'static str = K::KIND;
    const VERSION: &'static str = K::VERSION;
    const URL_PATH_SEGMENT: &'static str = K::URL_PATH_SEGMENT;
    type Scope = K::Scope;
}

impl<K: k8s_openapi::Resource> k8s_openapi::Metadata for Scalable<K> {
    type Ty = ObjectMeta;
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The sum of `containers`' requests (cores, bytes); what cannot be read
/// counts as none.
pub fn requests<'a>(
    containers: impl IntoIterator<Item = Option<&'a BTreeMap<String, Quantity>>>,
) -> Requests {
    let mut r = Requests::default();
    for req in containers.into_iter().flatten() {
        r.cpu_cores += req.get("cpu").and_then(|q| parse_quantity(&q.0)).unwrap_or(0.0);
        r.memory_bytes += req.get("memory").and_then(|q| parse_quantity(&q.0)).unwrap_or(0.0);
    }
    r
}

/// The API's shape, only as deep as what is kept; everything else in the
/// JSON is skipped while it is read. Every field may be missing or null.
mod wire {
    use std::collections::BTreeMap;

    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use kube::api::ObjectMeta;
    use serde::Deserialize;

    #[derive(Default, Deserialize)]
    pub struct Workload {
        pub metadata: Option<ObjectMeta>,
        pub spec: Option<Spec>,
        pub status: Option<Status>,
    }

    #[derive(Default, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Spec {
        pub replicas: Option<i32>,
        pub selector: Option<Selector>,
        pub template: Option<Template>,
        pub volume_claim_templates: Option<Vec<Named>>,
        pub persistent_volume_claim_retention_policy: Option<Retention>,
    }

    #[derive(Default, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Selector {
        pub match_labels: Option<BTreeMap<String, String>>,
    }

    #[derive(Default, Deserialize)]
    pub struct Template {
        pub metadata: Option<Labels>,
        pub spec: Option<PodSpec>,
    }

    #[derive(Default, Deserialize)]
    pub struct Labels {
        pub labels: Option<BTreeMap<String, String>>,
    }

    #[derive(Default, Deserialize)]
    pub struct PodSpec {
        pub containers: Option<Vec<Container>>,
    }

    #[derive(Default, Deserialize)]
    pub struct Container {
        pub resources: Option<Resources>,
    }

    #[derive(Default, Deserialize)]
    pub struct Resources {
        pub requests: Option<BTreeMap<String, Quantity>>,
    }

    #[derive(Default, Deserialize)]
    pub struct Named {
        pub metadata: Option<Name>,
    }

    #[derive(Default, Deserialize)]
    pub struct Name {
        pub name: Option<String>,
    }

    #[derive(Default, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Retention {
        pub when_scaled: Option<String>,
    }

    #[derive(Default, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Status {
        pub replicas: Option<i32>,
        pub ready_replicas: Option<i32>,
    }
}

impl<K> From<wire::Workload> for Scalable<K> {
    /// Each non-empty map costs a B-tree node of about half a kilobyte,
    /// so what is never read is not kept: the template of a Deployment's
    /// ReplicaSet (never scaled, nor looked at: its Deployment is) and a
    /// selector where no claim needs it.
    fn from(w: wire::Workload) -> Self {
        let mut metadata = w.metadata.unwrap_or_default();
        super::stores::trim_meta(&mut metadata);
        let status = w.status.unwrap_or_default();
        let spec = w.spec.unwrap_or_default();
        let a_deployments = metadata
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.controller == Some(true) && o.kind == "Deployment" && o.api_version == "apps/v1");
        let template =
            if a_deployments { wire::Template::default() } else { spec.template.unwrap_or_default() };
        let containers = template.spec.and_then(|s| s.containers).unwrap_or_default();
        let claim_templates: Vec<String> = spec
            .volume_claim_templates
            .into_iter()
            .flatten()
            .filter_map(|t| t.metadata.and_then(|m| m.name))
            .collect();
        let selector = if claim_templates.is_empty() {
            BTreeMap::new()
        } else {
            spec.selector.and_then(|s| s.match_labels).unwrap_or_default()
        };
        Scalable {
            metadata,
            replicas: spec.replicas,
            current_pods: status.replicas.unwrap_or(0),
            ready_pods: status.ready_replicas.unwrap_or(0),
            template_labels: template.metadata.and_then(|m| m.labels).unwrap_or_default(),
            per_replica: requests(
                containers.iter().map(|c| c.resources.as_ref().and_then(|r| r.requests.as_ref())),
            ),
            selector,
            claim_templates,
            claims_deleted_when_scaled: spec
                .persistent_volume_claim_retention_policy
                .and_then(|p| p.when_scaled)
                .as_deref()
                == Some("Delete"),
            kind: PhantomData,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::WorkloadView;
    use crate::target::stores::LAST_APPLIED;

    /// A vcluster's StatefulSet as its chart renders it (abridged), applied
    /// with `kubectl apply`: the record reads the same as the whole object
    /// and is a fraction of its size.
    #[test]
    fn the_record_of_a_vcluster_reads_as_the_whole_object_does() {
        let raw = serde_json::json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "vc", "namespace": "team", "resourceVersion": "42", "uid": "u1",
                "labels": {"app": "vcluster", "release": "vc"},
                "annotations": {"dormant.dev/sleep-after": "1h", LAST_APPLIED: "{\"apiVersion\":\"apps/v1\",\"kind\":\"StatefulSet\",\"spec\":{}}".repeat(20)},
                "managedFields": [{"manager": "kubectl", "operation": "Apply", "fieldsV1": {"f:spec": {}}}]},
            "spec": {
                "replicas": 1, "serviceName": "vc",
                "selector": {"matchLabels": {"app": "vcluster", "release": "vc"}},
                "persistentVolumeClaimRetentionPolicy": {"whenScaled": "Delete", "whenDeleted": "Retain"},
                "volumeClaimTemplates": [{"metadata": {"name": "data", "creationTimestamp": null}, "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "5Gi"}}}}],
                "template": {
                    "metadata": {"labels": {"app": "vcluster", "release": "vc"}, "annotations": {"checksum/config": "abc"}, "creationTimestamp": null},
                    "spec": {
                        "serviceAccountName": "vc-vc",
                        "containers": [{"name": "syncer", "image": "ghcr.io/loft-sh/vcluster-pro:0.30.0",
                            "args": ["--name=vc", "--service-account=vc-workload"],
                            "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                            "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                            "readinessProbe": {"httpGet": {"path": "/readyz", "port": 8443}},
                            "resources": {"requests": {"cpu": "200m", "memory": "256Mi"}}},
                            {"name": "sidecar", "image": "busybox", "resources": {"limits": {"cpu": "1"}, "requests": {"cpu": "50m"}}}],
                        "volumes": [{"name": "certs", "secret": {"secretName": "vc-certs"}}]
                    }
                }
            },
            "status": {"replicas": 2, "readyReplicas": 1, "availableReplicas": 1}
        });
        let whole: k8s_openapi::api::apps::v1::StatefulSet = serde_json::from_value(raw.clone()).unwrap();
        let kept: StatefulSet = serde_json::from_value(raw).unwrap();
        let w = WorkloadView::from_statefulset(&kept);
        assert_eq!((w.replicas, w.ready_pods, w.current_pods), (Some(1), 1, 2));
        assert_eq!(w.per_replica, Requests { cpu_cores: 0.25, memory_bytes: 256.0 * 1024.0 * 1024.0 });
        assert_eq!(
            w.per_replica,
            crate::target::workload::template_requests(Some(&whole.spec.template)),
            "the same sum as from the whole template"
        );
        assert!(w.deletes_claims_when_scaled);
        assert_eq!(w.resource_version.as_deref(), Some("42"));
        assert_eq!(w.annotations.get("dormant.dev/sleep-after").map(String::as_str), Some("1h"));
        assert!(!w.annotations.contains_key(LAST_APPLIED) && kept.metadata.managed_fields.is_none());
        // Deleting a vcluster finds its claims by template name and selector
        // (scaler::release's tests read them from this record).
        assert_eq!(kept.claim_templates, ["data"]);
        assert_eq!(Some(&kept.selector), whole.spec.selector.match_labels.as_ref());
        // App traffic selects its pods by the template's labels.
        assert_eq!(
            Some(&kept.template_labels),
            whole.spec.template.metadata.as_ref().and_then(|m| m.labels.as_ref())
        );
        let (k, s) = (size_of::<StatefulSet>(), size_of::<k8s_openapi::api::apps::v1::StatefulSet>());
        assert!(k * 2 < s, "{k} bytes inline, the whole object {s} before any container");
    }

    /// What the API server never sends but a hostile or broken object
    /// might: nulls and missing parts read as empty, never as an error
    /// (one object that failed to read would stop the whole cache).
    #[test]
    fn nulls_and_missing_parts_read_as_empty() {
        for raw in [
            serde_json::json!({"metadata": {"name": "a"}}),
            serde_json::json!({"metadata": {"name": "a"}, "spec": null, "status": null}),
            serde_json::json!({"metadata": {"name": "a"}, "spec": {"selector": null, "template": null,
                "volumeClaimTemplates": null, "persistentVolumeClaimRetentionPolicy": null}}),
            serde_json::json!({"metadata": {"name": "a"}, "spec": {"template": {"metadata": null,
                "spec": {"containers": [{"resources": null}, {"resources": {"requests": null}}]}},
                "volumeClaimTemplates": [{"metadata": null}, {}]}}),
        ] {
            let s: StatefulSet = serde_json::from_value(raw.clone()).unwrap_or_else(|e| panic!("{raw}: {e}"));
            let w = WorkloadView::from_statefulset(&s);
            assert_eq!((w.name.as_str(), w.replicas, w.ready_pods), ("a", Some(1), 0), "{raw}");
            assert_eq!(w.per_replica, Requests::default());
            assert!(s.claim_templates.is_empty() && s.selector.is_empty() && s.template_labels.is_empty());
        }
    }
}
