//! Targets: the units that sleep and wake together — a vcluster (its
//! control-plane StatefulSet or Deployment labelled `app=vcluster`, plus the
//! pods it synced) or a namespace (its other workloads) — discovered from
//! reflector stores, with the workloads each one owns.

pub mod cached;
pub mod effective;
pub mod index;
pub mod scope;
pub mod stores;
pub mod workload;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use self::cached::{Deployment, StatefulSet};
use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::{Namespace, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::discovery::ApiResource;

pub use crate::policy::TargetKind;
pub use scope::Scope;
pub use stores::Stores;
pub use workload::{WorkloadKind, WorkloadView};

use crate::vocab::{VCLUSTER_APP_LABEL, VCLUSTER_ETCD_APP};

/// Names one target.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TargetRef {
    pub kind: TargetKind,
    /// The namespace (for a namespace target, its own name).
    pub namespace: String,
    /// The vcluster's name; for a namespace target, the namespace again.
    pub name: String,
}

impl TargetRef {
    pub fn namespace(ns: &str) -> Self {
        TargetRef { kind: TargetKind::Namespace, namespace: ns.into(), name: ns.into() }
    }

    pub fn vcluster(ns: &str, name: &str) -> Self {
        TargetRef { kind: TargetKind::VCluster, namespace: ns.into(), name: name.into() }
    }
}

impl fmt::Display for TargetRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            TargetKind::Namespace => write!(f, "namespace/{}", self.namespace),
            TargetKind::VCluster => write!(f, "vcluster/{}/{}", self.namespace, self.name),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid target {0:?}: expected namespace/<name>, vcluster/<namespace>/<name>, <namespace>/<vcluster> or <namespace>"
)]
pub struct ParseTargetError(pub String);

impl FromStr for TargetRef {
    type Err = ParseTargetError;

    /// `namespace/team-a` (or `ns/team-a`, or just `team-a`),
    /// `vcluster/team-a/dev` (or `vc/team-a/dev`, or `team-a/dev`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseTargetError(s.to_string());
        let parts: Vec<&str> = s.trim().split('/').collect();
        let valid =
            |p: &str| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
        let r = match parts.as_slice() {
            ["namespace" | "ns", ns] => TargetRef::namespace(ns),
            ["vcluster" | "vc", ns, name] => TargetRef::vcluster(ns, name),
            ["vcluster" | "vc", _] => return Err(bad()),
            [ns, name] => TargetRef::vcluster(ns, name),
            [ns] => TargetRef::namespace(ns),
            _ => return Err(bad()),
        };
        if valid(&r.namespace) && valid(&r.name) { Ok(r) } else { Err(bad()) }
    }
}

/// The object that carries a target's annotations.
#[derive(Debug, Clone)]
pub enum TargetObject {
    Namespace(Arc<Namespace>),
    StatefulSet(Arc<StatefulSet>),
    Deployment(Arc<Deployment>),
}

/// What `annotations` and `labels` give for an object that has none.
static NONE: BTreeMap<String, String> = BTreeMap::new();

impl TargetObject {
    /// The object's metadata, whichever kind it is.
    pub fn meta(&self) -> &ObjectMeta {
        match self {
            TargetObject::Namespace(o) => o.meta(),
            TargetObject::StatefulSet(o) => o.meta(),
            TargetObject::Deployment(o) => o.meta(),
        }
    }

    pub fn annotations(&self) -> &BTreeMap<String, String> {
        self.meta().annotations.as_ref().unwrap_or(&NONE)
    }

    pub fn resource_version(&self) -> Option<String> {
        self.meta().resource_version.clone()
    }

    pub fn labels(&self) -> &BTreeMap<String, String> {
        self.meta().labels.as_ref().unwrap_or(&NONE)
    }

    /// The reference Events are published against.
    pub fn object_ref(&self) -> ObjectReference {
        match self {
            TargetObject::Namespace(o) => {
                let mut r = o.object_ref(&());
                // Events are namespaced; a namespace's own events live in it.
                r.namespace = o.meta().name.clone();
                r
            }
            TargetObject::StatefulSet(o) => o.object_ref(&()),
            TargetObject::Deployment(o) => o.object_ref(&()),
        }
    }

    pub fn created(&self) -> Option<DateTime<Utc>> {
        self.meta().creation_timestamp.as_ref().and_then(|t| to_chrono(&t.0))
    }

    pub fn is_deleting(&self) -> bool {
        self.meta().deletion_timestamp.is_some()
    }
}

/// A target's own object (a Namespace is cluster-scoped: namespace "").
impl crate::client::Patchable for TargetObject {
    fn id(&self) -> String {
        let kind = self.api_resource().kind;
        match crate::client::Patchable::namespace(self) {
            "" => format!("{kind}/{}", crate::client::Patchable::name(self)),
            ns => format!("{kind}/{ns}/{}", crate::client::Patchable::name(self)),
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
    fn reread(&self, v: &serde_json::Value) -> Option<Self> {
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

/// A target as the stores see it now.
#[derive(Debug, Clone)]
pub struct Target {
    pub r: TargetRef,
    pub object: TargetObject,
    /// Labels of the namespace the target lives in (what policies select on).
    pub namespace_labels: BTreeMap<String, String>,
}

/// k8s-openapi's timestamps (jiff) as chrono's.
pub fn to_chrono(t: &k8s_openapi::jiff::Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.as_second(), t.subsec_nanosecond().max(0) as u32)
}

pub fn is_vcluster_control_plane(labels: &BTreeMap<String, String>) -> bool {
    labels.get(VCLUSTER_APP_LABEL.0).map(String::as_str) == Some(VCLUSTER_APP_LABEL.1)
}

/// The vcluster whose deployed etcd a workload with these labels is.
pub fn vcluster_etcd_of(labels: &BTreeMap<String, String>) -> Option<&str> {
    if labels.get(VCLUSTER_APP_LABEL.0).map(String::as_str) == Some(VCLUSTER_ETCD_APP) {
        labels.get("release").map(String::as_str).filter(|r| !r.is_empty())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_names_read_back() {
        for (text, want) in [
            ("namespace/team-a", TargetRef::namespace("team-a")),
            ("ns/team-a", TargetRef::namespace("team-a")),
            ("team-a", TargetRef::namespace("team-a")),
            ("vcluster/team-a/dev", TargetRef::vcluster("team-a", "dev")),
            ("vc/team-a/dev", TargetRef::vcluster("team-a", "dev")),
            ("team-a/dev", TargetRef::vcluster("team-a", "dev")),
        ] {
            let r: TargetRef = text.parse().unwrap();
            assert_eq!(r, want);
            assert_eq!(r.to_string().parse::<TargetRef>().unwrap(), want);
        }
        for bad in ["", "a/b/c/d", "namespace/", "vcluster/x", "x y", "pods/a/b"] {
            let e = bad.parse::<TargetRef>().unwrap_err().to_string();
            assert!(e.contains("expected namespace/<name>"), "{bad}: {e}");
        }
    }
}
