//! KEDA ScaledObjects and ScaledJobs. KEDA scales its target up again from
//! zero on the next activation of a trigger, so a sleeping namespace pauses
//! each ScaledObject at zero replicas through KEDA's own
//! `autoscaling.keda.sh/paused-replicas` annotation, and records what that
//! annotation was — in the same patch, as for workloads — so waking gives
//! KEDA back exactly the control it had. A ScaledJob would start new Jobs in
//! the sleeping namespace; it is paused with `autoscaling.keda.sh/paused`
//! the same way.

use std::collections::BTreeMap;

use kube::discovery::ApiResource;
use serde_json::{Value, json};

use crate::target::WorkloadView;
use crate::vocab::{KEDA_JOB_PAUSED_BEFORE_SLEEP, KEDA_PAUSED_BEFORE_SLEEP};

/// A merge patch of [`crate::client::metadata`] alone.
fn patch(resource_version: &Option<String>, annotations: Value) -> Value {
    json!({ "metadata": crate::client::metadata(resource_version, annotations) })
}

/// KEDA's annotation: while set, KEDA holds the target at this many replicas.
pub const PAUSED_REPLICAS: &str = "autoscaling.keda.sh/paused-replicas";

/// KEDA's annotation: while "true", a ScaledJob starts no Jobs.
pub const PAUSED: &str = "autoscaling.keda.sh/paused";

/// Recorded when the object had no pause annotation.
const NOT_PAUSED: &str = "none";

fn keda_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: "keda.sh".into(),
        version: "v1alpha1".into(),
        api_version: "keda.sh/v1alpha1".into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

pub fn api_resource() -> ApiResource {
    keda_resource("ScaledObject", "scaledobjects")
}

pub fn scaled_job_resource() -> ApiResource {
    keda_resource("ScaledJob", "scaledjobs")
}

fn string_map(v: Option<&Value>) -> BTreeMap<String, String> {
    v.and_then(Value::as_object)
        .map(|a| a.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
        .unwrap_or_default()
}

/// One ScaledObject as dormant sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaledObjectView {
    pub namespace: String,
    pub name: String,
    pub resource_version: Option<String>,
    pub annotations: BTreeMap<String, String>,
    /// `spec.scaleTargetRef`: kind (KEDA's default is Deployment) and name.
    pub target_kind: String,
    pub target_name: String,
}

impl ScaledObjectView {
    pub fn from_json(v: &Value) -> Option<Self> {
        let meta = v.get("metadata")?;
        let target = v.get("spec")?.get("scaleTargetRef")?;
        let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(String::from);
        Some(ScaledObjectView {
            namespace: s(meta, "namespace")?,
            name: s(meta, "name")?,
            resource_version: s(meta, "resourceVersion"),
            annotations: string_map(meta.get("annotations")),
            target_kind: s(target, "kind").unwrap_or_else(|| "Deployment".into()),
            target_name: s(target, "name")?,
        })
    }

    /// Whether this ScaledObject scales `w`.
    pub fn scales(&self, w: &WorkloadView) -> bool {
        w.namespace == self.namespace && w.name == self.target_name && w.kind.as_str() == self.target_kind
    }

    pub fn id(&self) -> String {
        format!("ScaledObject/{}/{}", self.namespace, self.name)
    }

    pub fn asleep(&self) -> bool {
        self.annotations.contains_key(KEDA_PAUSED_BEFORE_SLEEP)
    }
}

/// One ScaledJob as dormant sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaledJobView {
    pub namespace: String,
    pub name: String,
    pub resource_version: Option<String>,
    pub annotations: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
}

impl ScaledJobView {
    pub fn from_json(v: &Value) -> Option<Self> {
        let meta = v.get("metadata")?;
        let s = |k: &str| meta.get(k).and_then(Value::as_str).map(String::from);
        Some(ScaledJobView {
            namespace: s("namespace")?,
            name: s("name")?,
            resource_version: s("resourceVersion"),
            annotations: string_map(meta.get("annotations")),
            labels: string_map(meta.get("labels")),
        })
    }

    pub fn id(&self) -> String {
        format!("ScaledJob/{}/{}", self.namespace, self.name)
    }

    pub fn asleep(&self) -> bool {
        self.annotations.contains_key(KEDA_JOB_PAUSED_BEFORE_SLEEP)
    }
}

/// Sets KEDA's pause annotation `key` to `value`, recording in `record`
/// what it was, unless the object already carries the record.
fn pause(
    rv: &Option<String>,
    annotations: &BTreeMap<String, String>,
    (record, key, value): (&str, &str, &str),
) -> Option<Value> {
    if annotations.contains_key(record) {
        return None;
    }
    let before = annotations.get(key).map_or(NOT_PAUSED, String::as_str);
    Some(patch(rv, json!({ record: before, key: value })))
}

/// Removes `record` and gives `key` back `before`, unless someone changed
/// the pause while it slept (then their value stays).
fn resume(
    rv: &Option<String>,
    annotations: &BTreeMap<String, String>,
    (record, key, value): (&str, &str, &str),
    before: Value,
) -> Value {
    if annotations.get(key).map(String::as_str) != Some(value) {
        return patch(rv, json!({ record: null }));
    }
    patch(rv, json!({ record: null, key: before }))
}

/// How a ScaledObject is paused: at zero replicas.
const OBJECT_PAUSE: (&str, &str, &str) = (KEDA_PAUSED_BEFORE_SLEEP, PAUSED_REPLICAS, "0");
/// How a ScaledJob is paused: no new Jobs.
const JOB_PAUSE: (&str, &str, &str) = (KEDA_JOB_PAUSED_BEFORE_SLEEP, PAUSED, "true");

/// Pauses `sj` (no new Jobs), recording its previous pause, unless it
/// already carries dormant's record.
pub fn pause_job_patch(sj: &ScaledJobView) -> Result<Option<Value>, String> {
    Ok(pause(&sj.resource_version, &sj.annotations, JOB_PAUSE))
}

/// Gives `sj` back the pause it had before sleeping. Any recorded value is
/// given back as it was (KEDA reads only "true"), so none is unreadable.
pub fn resume_job_patch(sj: &ScaledJobView) -> Result<Option<Value>, String> {
    let Some(raw) = sj.annotations.get(KEDA_JOB_PAUSED_BEFORE_SLEEP) else { return Ok(None) };
    let before = if raw == NOT_PAUSED { Value::Null } else { json!(raw) };
    Ok(Some(resume(&sj.resource_version, &sj.annotations, JOB_PAUSE, before)))
}

/// Pauses `so` at zero replicas, recording its previous pause, unless it
/// already carries dormant's record.
pub fn pause_patch(so: &ScaledObjectView) -> Result<Option<Value>, String> {
    Ok(pause(&so.resource_version, &so.annotations, OBJECT_PAUSE))
}

/// Gives `so` back the pause it had before sleeping (usually none). If
/// someone changed the pause while it slept, their value stays and only the
/// record goes. An unreadable record is an error and changes nothing.
pub fn resume_patch(so: &ScaledObjectView) -> Result<Option<Value>, String> {
    let Some(raw) = so.annotations.get(KEDA_PAUSED_BEFORE_SLEEP) else { return Ok(None) };
    let before = match raw.trim() {
        NOT_PAUSED => Value::Null,
        n if n.parse::<u32>().is_ok() => json!(n),
        _ => {
            return Err(format!(
                "{KEDA_PAUSED_BEFORE_SLEEP}={raw:?} is neither a replica count nor \"none\""
            ));
        }
    };
    Ok(Some(resume(&so.resource_version, &so.annotations, OBJECT_PAUSE, before)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn so(ann: &[(&str, &str)]) -> ScaledObjectView {
        ScaledObjectView::from_json(&json!({
            "metadata": {
                "namespace": "ns", "name": "worker", "resourceVersion": "7",
                "annotations": ann.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            },
            "spec": { "scaleTargetRef": { "name": "worker" } },
        }))
        .unwrap()
    }

    fn apply(so: &mut ScaledObjectView, p: &Value) {
        for (k, v) in p["metadata"]["annotations"].as_object().unwrap() {
            match v.as_str() {
                Some(s) => so.annotations.insert(k.clone(), s.to_string()),
                None => so.annotations.remove(k),
            };
        }
    }

    #[test]
    fn the_target_kind_defaults_to_deployment() {
        let s = so(&[]);
        assert_eq!((s.target_kind.as_str(), s.target_name.as_str()), ("Deployment", "worker"));
        assert_eq!(ScaledObjectView::from_json(&json!({"metadata": {"name": "x"}})), None);
    }

    #[test]
    fn pausing_and_resuming_gives_keda_back_exactly_what_it_had() {
        for before in [None, Some("0"), Some("2")] {
            let ann: Vec<_> = before.map(|b| (PAUSED_REPLICAS, b)).into_iter().collect();
            let mut s = so(&ann);
            let p = pause_patch(&s).unwrap().unwrap();
            assert_eq!(p["metadata"]["resourceVersion"], json!("7"));
            apply(&mut s, &p);
            assert_eq!(s.annotations[PAUSED_REPLICAS], "0");
            assert_eq!(pause_patch(&s), Ok(None), "pausing twice changes nothing");
            let p = resume_patch(&s).unwrap().unwrap();
            apply(&mut s, &p);
            assert_eq!(s.annotations.get(PAUSED_REPLICAS).map(String::as_str), before, "{before:?}");
            assert!(!s.asleep());
            assert_eq!(resume_patch(&s), Ok(None));
        }
    }

    #[test]
    fn a_pause_changed_while_asleep_stays() {
        let mut s = so(&[(KEDA_PAUSED_BEFORE_SLEEP, "none"), (PAUSED_REPLICAS, "3")]);
        let p = resume_patch(&s).unwrap().unwrap();
        apply(&mut s, &p);
        assert_eq!(s.annotations.get(PAUSED_REPLICAS).map(String::as_str), Some("3"));
        assert!(!s.asleep());
    }

    #[test]
    fn scaled_jobs_are_paused_and_given_back_their_pause() {
        for before in [None, Some("true"), Some("false")] {
            let ann: serde_json::Map<_, _> =
                before.map(|b| (PAUSED.to_string(), json!(b))).into_iter().collect();
            let mut sj = ScaledJobView::from_json(&json!({
                "metadata": { "namespace": "ns", "name": "jobs", "resourceVersion": "3", "annotations": ann },
            }))
            .unwrap();
            let p = pause_job_patch(&sj).unwrap().unwrap();
            assert_eq!(p["metadata"]["resourceVersion"], json!("3"));
            for (k, v) in p["metadata"]["annotations"].as_object().unwrap() {
                sj.annotations.insert(k.clone(), v.as_str().unwrap().to_string());
            }
            assert_eq!(sj.annotations[PAUSED], "true");
            assert!(sj.asleep());
            assert_eq!(pause_job_patch(&sj), Ok(None), "pausing twice changes nothing");
            let p = resume_job_patch(&sj).unwrap().unwrap();
            for (k, v) in p["metadata"]["annotations"].as_object().unwrap() {
                match v.as_str() {
                    Some(s) => sj.annotations.insert(k.clone(), s.to_string()),
                    None => sj.annotations.remove(k),
                };
            }
            assert_eq!(sj.annotations.get(PAUSED).map(String::as_str), before, "{before:?}");
            assert!(!sj.asleep());
        }
    }

    #[test]
    fn an_unreadable_record_is_an_error() {
        let e = resume_patch(&so(&[(KEDA_PAUSED_BEFORE_SLEEP, "lots"), (PAUSED_REPLICAS, "0")])).unwrap_err();
        assert!(e.contains(KEDA_PAUSED_BEFORE_SLEEP) && e.contains("lots"), "{e}");
    }
}
