//! The one writer of a target's own annotations (the Namespace, or the
//! vcluster's control-plane StatefulSet/Deployment). Sources of activity
//! and requests only report through here; the controller records its
//! state here; the keys come from [`crate::vocab`]. Workloads' own records
//! (`replicas-before-sleep` and the like) are the scaler's, written in the
//! same patch that scales them.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, Patch};
use serde_json::{Value, json};

use crate::client::{Outcome, PatchError, Patcher, metadata, patch_params};
use crate::policy::annotations::{ForceSleep, TargetAnnotations, Until, rfc3339};
use crate::target::{TargetObject, WorkloadView};
use crate::vocab::{FORCE_SLEEP, LAST_ACTIVITY, LAST_ACTIVITY_BY, PREVENT_WAKEUP_UNTIL, UNVERIFIED_WAKE};

/// Annotations to set (`Some`) or remove (`None`).
pub type Changes = BTreeMap<&'static str, Option<String>>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to annotate target {target}")]
    PatchTarget {
        target: String,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    Update(#[from] PatchError),
}

impl Error {
    /// Short, stable category for metrics and Event reasons.
    pub fn category(&self) -> &'static str {
        "patch-target"
    }

    /// The API server did not take the write (see [`crate::error::transient`]).
    pub fn transient(&self) -> bool {
        match self {
            Error::PatchTarget { source, .. }
            | Error::Update(PatchError::Patch { source, .. } | PatchError::Read { source, .. }) => {
                crate::error::transient(source)
            }
            Error::Update(_) => false,
        }
    }
}

/// Writes target annotations; cheap to clone.
#[derive(Clone)]
pub struct Annotator {
    patcher: Patcher,
}

impl Annotator {
    pub fn new(patcher: Patcher) -> Self {
        Annotator { patcher }
    }

    /// Sets (Some) or removes (None) annotations on a target's object, and
    /// returns the object as written when it is a workload (None for a
    /// namespace, or when nothing changed). A vcluster's control plane is
    /// both its target object and its workload: the scale patch that
    /// follows is made from this read, replicas and version together, so
    /// it does not conflict with this write, and a change someone else made
    /// before it (a `kubectl scale`) is what gets recorded, not the cache's
    /// older count under the newer version.
    pub async fn set(&self, object: &TargetObject, changes: &Changes) -> Result<Option<WorkloadView>, Error> {
        if changes.is_empty() {
            return Ok(None);
        }
        let patch = json!({ "metadata": { "annotations": changes } });
        let p = Patch::Merge(&patch);
        let pp = patch_params();
        let client = self.patcher.client().clone();
        self.patcher.throttle().wait().await;
        let (target, r) = match object {
            TargetObject::Namespace(n) => {
                let name = n.metadata.name.clone().unwrap_or_default();
                (name.clone(), Api::<Namespace>::all(client).patch(&name, &pp, &p).await.map(|_| None))
            }
            TargetObject::StatefulSet(s) => {
                let (ns, name) = (
                    s.metadata.namespace.clone().unwrap_or_default(),
                    s.metadata.name.clone().unwrap_or_default(),
                );
                (
                    format!("{ns}/{name}"),
                    Api::<crate::target::cached::StatefulSet>::namespaced(client, &ns)
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
                    Api::<crate::target::cached::Deployment>::namespaced(client, &ns)
                        .patch(&name, &pp, &p)
                        .await
                        .map(|o| Some(WorkloadView::from_deployment(&o))),
                )
            }
        };
        r.map_err(|source| Error::PatchTarget { target, source })
    }

    /// Sets `changes` on a target that is also one of its workloads (a
    /// vcluster's control plane) in the patch `make` computes for that
    /// workload: the target's mark and the workload's change land together
    /// or not at all, in one request instead of two. A conflict computes
    /// both again from a fresh read, so what gets recorded is the workload
    /// as it is at the version written, as with [`Annotator::set`].
    pub async fn set_with(
        &self,
        w: &WorkloadView,
        changes: &Changes,
        make: impl Fn(&WorkloadView) -> Result<Option<Value>, String>,
    ) -> Result<Outcome, PatchError> {
        self.patcher.patch_until_settled(w, |w| Ok(Some(with_changes(make(w)?, w, changes)))).await
    }

    /// Sets annotations only if the target is still exactly `object` (its
    /// resourceVersion). `Ok(false)`: it changed or went since.
    pub async fn set_if_unchanged(&self, object: &TargetObject, changes: &Changes) -> Result<bool, Error> {
        use crate::client::Patchable;
        let rv = object.resource_version();
        let patch = json!({ "metadata": metadata(&rv, json!(changes)) });
        let client = self.patcher.client().clone();
        let ar = object.api_resource();
        let api: Api<kube::api::DynamicObject> = match Patchable::namespace(object) {
            "" => Api::all_with(client, &ar),
            ns => Api::namespaced_with(client, ns, &ar),
        };
        self.patcher.throttle().wait().await;
        match api.patch(Patchable::name(object), &patch_params(), &Patch::Merge(&patch)).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(false),
            Err(source) => Err(Error::PatchTarget { target: object.id(), source }),
        }
    }

    /// Sets annotations computed from the target object's current ones, at
    /// the version they were read at: on a conflict (someone wrote since),
    /// computed again from a fresh read.
    pub async fn update(
        &self,
        object: &TargetObject,
        changes: impl Fn(&BTreeMap<String, String>) -> Changes,
    ) -> Result<Outcome, Error> {
        let outcome = self
            .patcher
            .patch_until_settled(object, |o| {
                let changes = changes(o.annotations());
                if changes.is_empty() {
                    return Ok(None);
                }
                Ok(Some(json!({ "metadata": metadata(&o.resource_version(), json!(changes)) })))
            })
            .await?;
        Ok(outcome)
    }

    /// A use that should wake the target (a request held by the proxy):
    /// its last activity, which the leader acts on.
    pub async fn record_use(
        &self,
        object: &TargetObject,
        at: DateTime<Utc>,
        by: String,
    ) -> Result<(), Error> {
        let changes = Changes::from([(LAST_ACTIVITY, Some(rfc3339(at))), (LAST_ACTIVITY_BY, Some(by))]);
        self.set(object, &changes).await.map(|_| ())
    }

    /// A wake for a request whose credential the proxy could not check
    /// while the target slept: no use (nobody is known to have used it),
    /// but a wake the leader acts on for a short grace (see
    /// [`crate::policy::decide::unverified_grace`]).
    pub async fn request_unverified_wake(
        &self,
        object: &TargetObject,
        at: DateTime<Utc>,
    ) -> Result<(), Error> {
        let changes = Changes::from([(UNVERIFIED_WAKE, Some(rfc3339(at)))]);
        self.set(object, &changes).await.map(|_| ())
    }

    /// A wake by hand (`dormant wake`, the agent's API): a use by `by`, dated
    /// after the sleep it ends, and the end of any forced sleep.
    pub async fn request_wake(&self, object: &TargetObject, by: String) -> Result<(), Error> {
        let at = wake_time(object.annotations(), Utc::now());
        let changes = Changes::from([
            (LAST_ACTIVITY, Some(rfc3339(at))),
            (LAST_ACTIVITY_BY, Some(by)),
            (FORCE_SLEEP, None),
            (PREVENT_WAKEUP_UNTIL, None),
        ]);
        self.set(object, &changes).await.map(|_| ())
    }

    /// A sleep by hand: `force-sleep: "true"`, which the agent stamps with
    /// its own clock (the requester's may be off, and a date before the
    /// last use would be no sleep at all), and until when requests may not
    /// wake it.
    pub async fn request_sleep(&self, object: &TargetObject, until: Option<Until>) -> Result<(), Error> {
        let changes = Changes::from([
            (FORCE_SLEEP, Some("true".to_string())),
            (PREVENT_WAKEUP_UNTIL, until.map(|u| u.to_string())),
        ]);
        self.set(object, &changes).await.map(|_| ())
    }
}

/// When a wake from this clock happened: now, but never before the sleep
/// it ends. A clock behind the agent's would otherwise date the wake
/// before the sleep, and it would wake nothing. (One ahead is the agent's
/// to correct: it reads a use dated in the future as now.)
fn wake_time(annotations: &BTreeMap<String, String>, now: DateTime<Utc>) -> DateTime<Utc> {
    let Ok(a) = TargetAnnotations::parse(annotations) else { return now };
    let forced = match a.force_sleep {
        Some(ForceSleep::Since(t)) => Some(t),
        _ => None,
    };
    [a.asleep_since, forced]
        .into_iter()
        .flatten()
        .map(|t| t + chrono::Duration::milliseconds(1))
        .fold(now, DateTime::max)
}

/// `patch` (a workload's own, if any) with the target's `changes` among
/// its annotations; with no patch of its own, the changes alone at the
/// workload's version.
fn with_changes(patch: Option<Value>, w: &WorkloadView, changes: &Changes) -> Value {
    let mut patch = patch.unwrap_or_else(|| json!({ "metadata": metadata(&w.resource_version, json!({})) }));
    let annotations = &mut patch["metadata"]["annotations"];
    if !annotations.is_object() {
        *annotations = json!({});
    }
    for (key, value) in changes {
        annotations[*key] = json!(value);
    }
    patch
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::{ASLEEP_SINCE, STATE};
    use chrono::TimeZone;

    #[test]
    fn the_targets_changes_ride_in_its_workloads_patch() {
        let w = WorkloadView {
            kind: crate::target::WorkloadKind::StatefulSet,
            namespace: "vc".into(),
            name: "vc1".into(),
            resource_version: Some("42".into()),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            replicas: Some(1),
            suspend: None,
            current_pods: 1,
            ready_pods: 1,
            finished: false,
            controlled: false,
            per_replica: Default::default(),
            deletes_claims_when_scaled: false,
        };
        let changes = Changes::from([(STATE, Some("sleeping".into())), (FORCE_SLEEP, None)]);
        // The workload's own patch, as the scaler makes it.
        let scale = json!({
            "metadata": { "resourceVersion": "42", "annotations": { crate::vocab::REPLICAS_BEFORE_SLEEP: "1" } },
            "spec": { "replicas": 0 },
        });
        let patch = with_changes(Some(scale), &w, &changes);
        assert_eq!(patch["spec"]["replicas"], json!(0));
        assert_eq!(patch["metadata"]["resourceVersion"], json!("42"));
        let annotations = &patch["metadata"]["annotations"];
        assert_eq!(annotations[crate::vocab::REPLICAS_BEFORE_SLEEP], json!("1"));
        assert_eq!(annotations[STATE], json!("sleeping"));
        // A removal stays a removal (null in a merge patch).
        assert!(annotations.as_object().unwrap().contains_key(FORCE_SLEEP));
        assert_eq!(annotations[FORCE_SLEEP], Value::Null);
        // Nothing of the workload's own to change: the target's changes
        // alone, still at the version they were computed from.
        let alone = with_changes(None, &w, &changes);
        assert_eq!(
            alone,
            json!({ "metadata": {
                "resourceVersion": "42",
                "annotations": { STATE: "sleeping", FORCE_SLEEP: null },
            }})
        );
    }

    #[test]
    fn a_wake_from_a_clock_behind_the_agents_still_comes_after_the_sleep() {
        let here = Utc.with_ymd_and_hms(2026, 11, 27, 9, 0, 0).unwrap();
        let annotations = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        // The agent (30 s ahead of this machine) put it to sleep 10 s ago.
        let asleep = annotations(&[
            (STATE, "asleep"),
            (ASLEEP_SINCE, "2026-11-27T09:00:20Z"),
            (FORCE_SLEEP, "2026-11-27T09:00:19.500Z"),
        ]);
        let at = wake_time(&asleep, here);
        assert_eq!(rfc3339(at), "2026-11-27T09:00:20.001Z");
        // This machine's clock when it is the later one.
        let later = here + chrono::Duration::minutes(5);
        assert_eq!(wake_time(&asleep, later), later);
        // Nothing recorded, or nothing readable: this machine's clock.
        assert_eq!(wake_time(&annotations(&[]), here), here);
        assert_eq!(wake_time(&annotations(&[(ASLEEP_SINCE, "yesterday")]), here), here);
    }
}
