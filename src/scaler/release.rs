//! A vcluster's delete-after: the objects of its Helm release, found the
//! way Helm and the StatefulSet controller mark them, deleted one by one.
//!
//! What belongs to vcluster `name` in namespace `ns` ([`Release::owns`]):
//! - what Helm installed for the release: objects annotated
//!   `meta.helm.sh/release-name: name` and `meta.helm.sh/release-namespace:
//!   ns` (Helm writes both on every object it creates);
//! - Helm's own records of the release: Secrets labelled `owner=helm`,
//!   `name=<name>` (so `helm list` no longer shows it);
//! - the volumes of its StatefulSets (the control plane's, and an etcd's
//!   the chart deploys): PersistentVolumeClaims named
//!   `<template>-<statefulset>-<ordinal>` carrying the StatefulSet's
//!   selector labels, as the StatefulSet controller makes them;
//! - what the vcluster synced to the host namespace: objects labelled
//!   `vcluster.loft.sh/managed-by: name`.
//!
//! Nothing else: not an object of another release in the namespace, not a
//! cluster-scoped object (a ClusterRole the chart may create; a
//! PersistentVolume with a `Retain` policy stays, as with `vcluster
//! delete`), not what a multi-namespace vcluster synced elsewhere. Objects
//! these own (by owner references) go by the garbage collector. Each
//! deletion is conditional on the object's UID: a newer object of the same
//! name is not the one judged.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::StatefulSet;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Preconditions};
use kube::core::ObjectMeta;
use kube::discovery::ApiResource;

use super::{Error, Result, Scaler};
use crate::vocab::MANAGED_BY_LABEL;

const HELM_RELEASE_NAME: &str = "meta.helm.sh/release-name";
const HELM_RELEASE_NAMESPACE: &str = "meta.helm.sh/release-namespace";

/// The namespaced kinds the vcluster chart creates or the vcluster syncs,
/// in the order they are deleted (what runs first, the records last).
pub const KINDS: &[(&str, &str, &str, &str)] = &[
    ("", "v1", "Pod", "pods"),
    ("apps", "v1", "Deployment", "deployments"),
    ("apps", "v1", "StatefulSet", "statefulsets"),
    ("", "v1", "Service", "services"),
    ("", "v1", "Endpoints", "endpoints"),
    ("networking.k8s.io", "v1", "Ingress", "ingresses"),
    ("networking.k8s.io", "v1", "NetworkPolicy", "networkpolicies"),
    ("policy", "v1", "PodDisruptionBudget", "poddisruptionbudgets"),
    ("rbac.authorization.k8s.io", "v1", "RoleBinding", "rolebindings"),
    ("rbac.authorization.k8s.io", "v1", "Role", "roles"),
    ("", "v1", "ServiceAccount", "serviceaccounts"),
    ("", "v1", "ConfigMap", "configmaps"),
    ("", "v1", "PersistentVolumeClaim", "persistentvolumeclaims"),
    ("", "v1", "Secret", "secrets"),
];

/// One vcluster's release: what [`Release::owns`] judges by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    pub namespace: String,
    pub name: String,
    /// Per StatefulSet of the release: the name prefixes of its claims
    /// (`<template>-<statefulset>-`) and its selector labels.
    pub claims: Vec<(Vec<String>, BTreeMap<String, String>)>,
}

impl Release {
    pub fn new(namespace: &str, name: &str) -> Release {
        Release { namespace: namespace.into(), name: name.into(), claims: Vec::new() }
    }

    /// Adds a StatefulSet of the release: its claims belong too.
    pub fn with_statefulset(self, s: &StatefulSet) -> Release {
        let spec = &s.spec;
        let templates =
            spec.volume_claim_templates.iter().flatten().filter_map(|t| t.metadata.name.as_deref());
        self.with_claims(&s.name_any(), templates, spec.selector.match_labels.clone().unwrap_or_default())
    }

    /// Adds the control plane as the agent's cache keeps it.
    pub fn with_cached(self, s: &crate::target::cached::StatefulSet) -> Release {
        self.with_claims(&s.name_any(), s.claim_templates.iter().map(String::as_str), s.selector.clone())
    }

    /// The claims of StatefulSet `name`: named after its claim `templates`,
    /// labelled with its `selector`.
    fn with_claims<'a>(
        mut self,
        name: &str,
        templates: impl Iterator<Item = &'a str>,
        selector: BTreeMap<String, String>,
    ) -> Release {
        let prefixes = templates.map(|t| format!("{t}-{name}-")).collect::<Vec<_>>();
        // A StatefulSet without selector labels would claim every PVC with
        // a matching name: none of it is taken then.
        if !prefixes.is_empty() && !selector.is_empty() {
            self.claims.push((prefixes, selector));
        }
        self
    }

    /// Whether Helm installed `meta` for this release.
    pub fn installed(&self, meta: &ObjectMeta) -> bool {
        let a = meta.annotations.as_ref();
        let get = |k: &str| a.and_then(|a| a.get(k)).map(String::as_str);
        meta.namespace.as_deref() == Some(self.namespace.as_str())
            && get(HELM_RELEASE_NAME) == Some(self.name.as_str())
            && get(HELM_RELEASE_NAMESPACE) == Some(self.namespace.as_str())
    }

    /// Whether the object of this `kind` belongs to the release.
    pub fn owns(&self, kind: &str, meta: &ObjectMeta) -> bool {
        if meta.namespace.as_deref() != Some(self.namespace.as_str()) {
            return false;
        }
        let labels = meta.labels.as_ref();
        let label = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
        let name = meta.name.as_deref().unwrap_or_default();
        self.installed(meta)
            || label(MANAGED_BY_LABEL) == Some(self.name.as_str())
            || kind == "Secret"
                && label("owner") == Some("helm")
                && label("name") == Some(self.name.as_str())
                && name.starts_with(&format!("sh.helm.release.v1.{}.v", self.name))
            || kind == "PersistentVolumeClaim"
                && self.claims.iter().any(|(prefixes, selector)| {
                    prefixes.iter().any(|p| {
                        name.strip_prefix(p.as_str())
                            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                    }) && selector.iter().all(|(k, v)| label(k) == Some(v.as_str()))
                })
    }
}

fn resource((group, version, kind, plural): (&str, &str, &str, &str)) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

impl Scaler {
    /// Deletes vcluster `control_plane`'s release (see the module's doc),
    /// the control plane itself last. Returns how many objects of each kind
    /// were deleted, or `None` when the control plane was gone already (an
    /// earlier pass finished the deletion; a cache that has not seen it
    /// yet asked again). Safe to run again after an interruption: it
    /// deletes what is left.
    pub async fn delete_vcluster_release(
        &self,
        control_plane: &crate::target::TargetObject,
    ) -> Result<Option<BTreeMap<&'static str, usize>>> {
        let ns = control_plane.meta().namespace.clone().unwrap_or_default();
        let name = control_plane.meta().name.clone().unwrap_or_default();
        let client = self.client().clone();
        let mut release = Release::new(&ns, &name);
        if let crate::target::TargetObject::StatefulSet(s) = control_plane {
            release = release.with_cached(s);
        }
        self.patcher.throttle().wait().await;
        let statefulsets = Api::<StatefulSet>::namespaced(client.clone(), &ns)
            .list(&ListParams::default())
            .await
            .map_err(|source| Error::List { id: format!("statefulsets in {ns}"), source })?;
        for s in &statefulsets.items {
            if release.installed(&s.metadata) {
                release = release.with_statefulset(s);
            }
        }
        let cp_uid = control_plane.meta().uid.clone();
        let mut deleted = BTreeMap::new();
        for &kind in KINDS {
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &resource(kind));
            let mut doomed = Vec::new();
            let mut lp = ListParams::default().limit(500);
            loop {
                self.patcher.throttle().wait().await;
                let page = api
                    .list_metadata(&lp)
                    .await
                    .map_err(|source| Error::List { id: format!("{} in {ns}", kind.3), source })?;
                doomed.extend(
                    page.items
                        .into_iter()
                        .filter(|o| release.owns(kind.2, &o.metadata) && o.metadata.uid != cp_uid)
                        .map(|o| (o.name_any(), o.metadata.uid)),
                );
                match page.metadata.continue_.filter(|c| !c.is_empty()) {
                    Some(c) => lp = lp.continue_token(&c),
                    None => break,
                }
            }
            for (object, uid) in doomed {
                if self.delete_one(&api, &object, uid, kind.2, &ns).await? {
                    *deleted.entry(kind.2).or_default() += 1;
                }
            }
        }
        let api: Api<DynamicObject> =
            Api::namespaced_with(client, &ns, &crate::client::Patchable::api_resource(control_plane));
        let kind = control_plane.object_ref().kind.unwrap_or_default();
        let kind = KINDS.iter().find(|k| k.2 == kind).map_or("StatefulSet", |k| k.2);
        if !self.delete_one(&api, &name, cp_uid, kind, &ns).await? {
            return Ok(None);
        }
        *deleted.entry(kind).or_default() += 1;
        Ok(Some(deleted))
    }

    /// Deletes one object if it is still the one seen (its UID), in the
    /// foreground of nothing (the garbage collector takes what it owns).
    /// `Ok(false)`: gone already, or another object by now.
    async fn delete_one(
        &self,
        api: &Api<DynamicObject>,
        name: &str,
        uid: Option<String>,
        kind: &str,
        namespace: &str,
    ) -> Result<bool> {
        self.patcher.throttle().wait().await;
        let dp = DeleteParams {
            preconditions: Some(Preconditions { uid, resource_version: None }),
            ..DeleteParams::background()
        };
        match api.delete(name, &dp).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(false),
            Err(source) => Err(Error::DeleteRelease { id: format!("{kind} {namespace}/{name}"), source }),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn meta(ns: &str, name: &str, labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> ObjectMeta {
        let map = |kv: &[(&str, &str)]| {
            Some(kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>())
        };
        ObjectMeta {
            namespace: Some(ns.into()),
            name: Some(name.into()),
            labels: map(labels),
            annotations: map(annotations),
            ..ObjectMeta::default()
        }
    }

    fn control_plane() -> StatefulSet {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "vc", "namespace": "team"},
            "spec": {
                "serviceName": "vc-headless",
                "selector": {"matchLabels": {"app": "vcluster", "release": "vc"}},
                "template": {},
                "volumeClaimTemplates": [{"metadata": {"name": "data"}}]
            }
        }))
        .unwrap()
    }

    #[test]
    fn what_helm_installed_its_records_its_claims_and_what_it_synced_belong() {
        let r = Release::new("team", "vc").with_statefulset(&control_plane());
        let helm = [(HELM_RELEASE_NAME, "vc"), (HELM_RELEASE_NAMESPACE, "team")];
        let selector = [("app", "vcluster"), ("release", "vc")];
        let records = [("owner", "helm"), ("name", "vc"), ("status", "deployed")];
        let owned = [
            ("Service", meta("team", "vc", &[], &helm)),
            ("Secret", meta("team", "vc-config-vc", &[], &helm)),
            ("Secret", meta("team", "sh.helm.release.v1.vc.v1", &records, &[])),
            ("PersistentVolumeClaim", meta("team", "data-vc-0", &selector, &[])),
            ("PersistentVolumeClaim", meta("team", "data-vc-12", &selector, &[])),
            ("ConfigMap", meta("team", "kube-root-ca.crt-x-default-x-vc", &[(MANAGED_BY_LABEL, "vc")], &[])),
        ];
        for (kind, m) in &owned {
            assert!(r.owns(kind, m), "{kind} {:?}", m.name);
        }
    }

    /// The agent's cache keeps a compact record of the control plane:
    /// read from it, the release claims the same PVCs.
    #[test]
    fn the_cached_control_plane_names_the_same_claims() {
        let cached: crate::target::cached::StatefulSet =
            serde_json::from_value(serde_json::to_value(control_plane()).unwrap()).unwrap();
        let (from_cache, whole) = (
            Release::new("team", "vc").with_cached(&cached).claims,
            Release::new("team", "vc").with_statefulset(&control_plane()).claims,
        );
        assert_eq!(from_cache, whole);
        assert_eq!(from_cache.len(), 1);
    }

    #[test]
    fn another_release_look_alikes_and_other_namespaces_do_not() {
        let r = Release::new("team", "vc").with_statefulset(&control_plane());
        let selector = [("app", "vcluster"), ("release", "vc")];
        let not_owned = [
            // Another release in the same namespace, and this one's name in another.
            (
                "Service",
                meta("team", "vc2", &[], &[(HELM_RELEASE_NAME, "vc2"), (HELM_RELEASE_NAMESPACE, "team")]),
            ),
            (
                "Service",
                meta("other", "vc", &[], &[(HELM_RELEASE_NAME, "vc"), (HELM_RELEASE_NAMESPACE, "other")]),
            ),
            (
                "Service",
                meta("team", "vc", &[], &[(HELM_RELEASE_NAME, "vc"), (HELM_RELEASE_NAMESPACE, "other")]),
            ),
            // The chart's labels without Helm's marks: anyone's to write.
            ("ConfigMap", meta("team", "app", &selector, &[])),
            // Helm's records of another release, or a look-alike name.
            ("Secret", meta("team", "sh.helm.release.v1.vc2.v1", &[("owner", "helm"), ("name", "vc2")], &[])),
            ("Secret", meta("team", "mine", &[("owner", "helm"), ("name", "vc")], &[])),
            (
                "ConfigMap",
                meta("team", "sh.helm.release.v1.vc.v1", &[("owner", "helm"), ("name", "vc")], &[]),
            ),
            // Claims: another StatefulSet's, one without the selector, no ordinal.
            ("PersistentVolumeClaim", meta("team", "data-vc-db-0", &selector, &[])),
            ("PersistentVolumeClaim", meta("team", "data-vc-0", &[("app", "vcluster")], &[])),
            ("PersistentVolumeClaim", meta("team", "data-vc-", &selector, &[])),
            ("PersistentVolumeClaim", meta("other", "data-vc-0", &selector, &[])),
            // Synced by another vcluster.
            ("Pod", meta("team", "p-x-default-x-vc2", &[(MANAGED_BY_LABEL, "vc2")], &[])),
        ];
        for (kind, m) in &not_owned {
            assert!(!r.owns(kind, m), "{kind} {:?} {:?}", m.namespace, m.name);
        }
    }
}
