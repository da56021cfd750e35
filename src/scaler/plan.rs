//! The patches, as pure functions of a workload's current view. Each one
//! changes the workload and its record together, and carries the
//! resourceVersion it was computed from, so a concurrent change makes the
//! API server refuse it (409) instead of overwriting.

use serde_json::{Value, json};

use crate::target::WorkloadView;
use crate::vocab::{REPLICAS_BEFORE_SLEEP, SUSPEND_BEFORE_SLEEP};

fn meta(w: &WorkloadView, key: &str, value: Value) -> Value {
    crate::client::metadata(&w.resource_version, json!({ key: value }))
}

/// The patch that puts `w` to sleep, or `None` when there is nothing to do
/// (already asleep, excluded, a finished Job).
pub fn sleep_patch(w: &WorkloadView, excluded: bool) -> Result<Option<Value>, String> {
    if excluded {
        return Ok(None);
    }
    if w.kind.scales() {
        if w.annotations.contains_key(REPLICAS_BEFORE_SLEEP) {
            return Ok(None);
        }
        let replicas = w.replicas.unwrap_or(1);
        Ok(Some(json!({
            "metadata": meta(w, REPLICAS_BEFORE_SLEEP, json!(replicas.to_string())),
            "spec": { "replicas": 0 },
        })))
    } else {
        if w.annotations.contains_key(SUSPEND_BEFORE_SLEEP) || w.finished {
            return Ok(None);
        }
        let suspend = w.suspend.unwrap_or(false);
        Ok(Some(json!({
            "metadata": meta(w, SUSPEND_BEFORE_SLEEP, json!(suspend.to_string())),
            "spec": { "suspend": true },
        })))
    }
}

/// The patch that wakes `w`, or `None` when it carries no record. When
/// someone changed it by hand while asleep, their value stays and only the
/// record is removed. An unreadable record is an error: the workload is
/// left untouched.
pub fn wake_patch(w: &WorkloadView) -> Result<Option<Value>, String> {
    if w.kind.scales() {
        let Some(raw) = w.annotations.get(REPLICAS_BEFORE_SLEEP) else { return Ok(None) };
        let before: i32 = raw
            .trim()
            .parse()
            .ok()
            .filter(|n| *n >= 0)
            .ok_or_else(|| format!("{REPLICAS_BEFORE_SLEEP}={raw:?} is not a replica count"))?;
        if w.replicas.unwrap_or(1) != 0 {
            return Ok(Some(json!({ "metadata": meta(w, REPLICAS_BEFORE_SLEEP, Value::Null) })));
        }
        Ok(Some(json!({
            "metadata": meta(w, REPLICAS_BEFORE_SLEEP, Value::Null),
            "spec": { "replicas": before },
        })))
    } else {
        let Some(raw) = w.annotations.get(SUSPEND_BEFORE_SLEEP) else { return Ok(None) };
        let before = match raw.trim() {
            "true" => true,
            "false" => false,
            _ => return Err(format!("{SUSPEND_BEFORE_SLEEP}={raw:?} is not true or false")),
        };
        if w.suspend == Some(false) {
            return Ok(Some(json!({ "metadata": meta(w, SUSPEND_BEFORE_SLEEP, Value::Null) })));
        }
        Ok(Some(json!({
            "metadata": meta(w, SUSPEND_BEFORE_SLEEP, Value::Null),
            "spec": { "suspend": before },
        })))
    }
}

/// The target's copy of its workloads' records ([`crate::vocab::SLEEP_RECORD`]).
pub type SleepRecord = std::collections::BTreeMap<String, String>;

/// `w`'s key in a [`SleepRecord`]: `Deployment/web`.
pub fn record_key(w: &WorkloadView) -> String {
    format!("{}/{}", w.kind.as_str(), w.name)
}

/// The record `w` carries itself, if any.
pub fn own_record(w: &WorkloadView) -> Option<&String> {
    w.annotations.get(if w.kind.scales() { REPLICAS_BEFORE_SLEEP } else { SUSPEND_BEFORE_SLEEP })
}

/// The record [`sleep_patch`] writes on `w`: what the target's copy must
/// hold before that patch is made. `None` when the patch makes no record.
pub fn record_to_write(w: &WorkloadView, excluded: bool, copy: Option<&SleepRecord>) -> Option<String> {
    let patch = sleep_patch_from(w, excluded, copy).ok()??;
    let key = if w.kind.scales() { REPLICAS_BEFORE_SLEEP } else { SUSPEND_BEFORE_SLEEP };
    patch["metadata"]["annotations"][key].as_str().map(str::to_string)
}

/// True when `w` is as a sleep leaves it: at zero, or suspended.
fn asleep_shape(w: &WorkloadView) -> bool {
    if w.kind.scales() { w.replicas == Some(0) } else { w.suspend == Some(true) }
}

/// [`sleep_patch`], except for a workload still as the sleep left it whose
/// own record is gone but the target's copy has one: nothing to do (the
/// copy is its record now). Recording it again would record zero.
pub fn sleep_patch_from(
    w: &WorkloadView,
    excluded: bool,
    copy: Option<&SleepRecord>,
) -> Result<Option<Value>, String> {
    let in_copy = copy.is_some_and(|c| c.contains_key(&record_key(w)));
    if !excluded && own_record(w).is_none() && in_copy && asleep_shape(w) {
        return Ok(None);
    }
    sleep_patch(w, excluded)
}

/// The patch that wakes `w`: from its own record ([`wake_patch`]), or, when
/// that is gone (removed by hand or by a GitOps tool while the target
/// slept), from the target's copy if `w` is still as the sleep left it.
pub fn wake_patch_from(w: &WorkloadView, copy: Option<&SleepRecord>) -> Result<Option<Value>, String> {
    if own_record(w).is_some() {
        return wake_patch(w);
    }
    let Some(raw) = copy.and_then(|c| c.get(&record_key(w))) else { return Ok(None) };
    let restore = |w: &WorkloadView| {
        let mut view = w.clone();
        let key = if w.kind.scales() { REPLICAS_BEFORE_SLEEP } else { SUSPEND_BEFORE_SLEEP };
        view.annotations.insert(key.into(), raw.clone());
        wake_patch(&view)
    };
    let patch = match (w.kind.scales(), w.replicas, w.suspend) {
        (true, Some(0), _) | (false, _, Some(true)) => restore(w)?,
        _ => None,
    };
    // Only a patch that changes the spec (the record it also removes is
    // not there): restoring the value `w` already has is nothing to do.
    Ok(patch.filter(|p| {
        let spec = &p["spec"];
        match (spec.get("replicas"), spec.get("suspend")) {
            (Some(r), _) => r.as_i64() != w.replicas.map(i64::from),
            (None, Some(s)) => s.as_bool() != w.suspend,
            (None, None) => false,
        }
    }))
}

/// True when `w` is as a sleep leaves it (at zero, or suspended) with no
/// record of what it was, on itself or in the target's copy: nothing can
/// tell what to restore, so it must never be called ready.
pub fn record_lost(w: &WorkloadView, copy: Option<&SleepRecord>) -> bool {
    asleep_shape(w) && own_record(w).is_none() && !copy.is_some_and(|c| c.contains_key(&record_key(w)))
}

/// True when `w` was put to sleep by dormant but someone has since scaled it
/// up (or resumed it) by hand: that counts as waking the target.
pub fn hand_scaled(w: &WorkloadView) -> bool {
    if w.kind.scales() {
        w.annotations.contains_key(REPLICAS_BEFORE_SLEEP) && w.replicas.unwrap_or(1) > 0
    } else {
        w.annotations.contains_key(SUSPEND_BEFORE_SLEEP) && w.suspend == Some(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::WorkloadKind;
    use crate::target::workload::Requests;
    use std::collections::BTreeMap;

    fn view(
        kind: WorkloadKind,
        replicas: Option<i32>,
        suspend: Option<bool>,
        ann: &[(&str, &str)],
    ) -> WorkloadView {
        WorkloadView {
            kind,
            namespace: "ns".into(),
            name: "w".into(),
            resource_version: Some("42".into()),
            labels: BTreeMap::new(),
            annotations: ann.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            replicas,
            suspend,
            current_pods: 0,
            ready_pods: 0,
            finished: false,
            controlled: false,
            per_replica: Requests::default(),
            deletes_claims_when_scaled: false,
        }
    }

    #[test]
    fn sleeping_records_the_replicas_in_the_same_patch() {
        let p = sleep_patch(&view(WorkloadKind::Deployment, Some(3), None, &[]), false).unwrap().unwrap();
        assert_eq!(
            p,
            json!({"metadata": {"resourceVersion": "42", "annotations": {REPLICAS_BEFORE_SLEEP: "3"}}, "spec": {"replicas": 0}})
        );
        let p = sleep_patch(&view(WorkloadKind::CronJob, None, Some(false), &[]), false).unwrap().unwrap();
        assert_eq!(p["spec"]["suspend"], json!(true));
        assert_eq!(p["metadata"]["annotations"][SUSPEND_BEFORE_SLEEP], json!("false"));
    }

    #[test]
    fn sleeping_twice_or_excluded_changes_nothing() {
        let asleep = view(WorkloadKind::StatefulSet, Some(0), None, &[(REPLICAS_BEFORE_SLEEP, "2")]);
        assert_eq!(sleep_patch(&asleep, false), Ok(None));
        assert_eq!(sleep_patch(&view(WorkloadKind::Deployment, Some(3), None, &[]), true), Ok(None));
        let mut done = view(WorkloadKind::Job, None, Some(false), &[]);
        done.finished = true;
        assert_eq!(sleep_patch(&done, false), Ok(None));
    }

    #[test]
    fn waking_restores_exactly_and_removes_the_record() {
        let p = wake_patch(&view(WorkloadKind::Deployment, Some(0), None, &[(REPLICAS_BEFORE_SLEEP, "3")]))
            .unwrap()
            .unwrap();
        assert_eq!(
            p,
            json!({"metadata": {"resourceVersion": "42", "annotations": {REPLICAS_BEFORE_SLEEP: null}}, "spec": {"replicas": 3}})
        );
        let p = wake_patch(&view(WorkloadKind::CronJob, None, Some(true), &[(SUSPEND_BEFORE_SLEEP, "true")]))
            .unwrap()
            .unwrap();
        assert_eq!(p["spec"]["suspend"], json!(true), "a CronJob suspended before sleep stays suspended");
        assert_eq!(wake_patch(&view(WorkloadKind::Deployment, Some(2), None, &[])), Ok(None));
    }

    #[test]
    fn a_hand_scaled_workload_keeps_its_value() {
        let w = view(WorkloadKind::Deployment, Some(5), None, &[(REPLICAS_BEFORE_SLEEP, "3")]);
        assert!(hand_scaled(&w));
        let p = wake_patch(&w).unwrap().unwrap();
        assert_eq!(p.get("spec"), None);
        assert_eq!(p["metadata"]["annotations"][REPLICAS_BEFORE_SLEEP], Value::Null);
        assert!(!hand_scaled(&view(
            WorkloadKind::Deployment,
            Some(0),
            None,
            &[(REPLICAS_BEFORE_SLEEP, "3")]
        )));
    }

    #[test]
    fn an_unreadable_record_is_an_error_and_no_patch() {
        for (kind, ann) in
            [(WorkloadKind::Deployment, REPLICAS_BEFORE_SLEEP), (WorkloadKind::CronJob, SUSPEND_BEFORE_SLEEP)]
        {
            let e = wake_patch(&view(kind, Some(0), Some(true), &[(ann, "three")])).unwrap_err();
            assert!(e.contains(ann), "{e}");
        }
    }

    /// Any interleaving of sleep and wake patches, applied to a model of the
    /// object, ends at the original value: nothing is lost.
    #[test]
    fn any_sequence_of_sleeps_and_wakes_ends_where_it_started() {
        use proptest::prelude::*;
        proptest!(|(original in 0i32..10, ops in proptest::collection::vec(any::<bool>(), 0..20))| {
            let mut w = view(WorkloadKind::Deployment, Some(original), None, &[]);
            for sleep in ops {
                let patch = if sleep { sleep_patch(&w, false).unwrap() } else { wake_patch(&w).unwrap() };
                if let Some(p) = patch {
                    apply(&mut w, &p);
                }
                // At every instant the true value is recoverable.
                let recorded = w.annotations.get(REPLICAS_BEFORE_SLEEP).map(|v| v.parse::<i32>().unwrap());
                prop_assert_eq!(recorded.unwrap_or(w.replicas.unwrap()), original);
            }
            if let Some(p) = wake_patch(&w).unwrap() {
                apply(&mut w, &p);
            }
            prop_assert_eq!(w.replicas, Some(original));
            prop_assert!(!w.annotations.contains_key(REPLICAS_BEFORE_SLEEP));
        });
    }

    fn apply(w: &mut WorkloadView, p: &Value) {
        if let Some(r) = p["spec"]["replicas"].as_i64() {
            w.replicas = Some(r as i32);
        }
        for (k, v) in p["metadata"]["annotations"].as_object().unwrap() {
            match v.as_str() {
                Some(s) => w.annotations.insert(k.clone(), s.to_string()),
                None => w.annotations.remove(k),
            };
        }
    }

    fn copy(entries: &[(&str, &str)]) -> SleepRecord {
        entries.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn the_copy_holds_what_the_sleep_patch_records() {
        let w = view(WorkloadKind::Deployment, Some(3), None, &[]);
        assert_eq!(record_key(&w), "Deployment/w");
        assert_eq!(record_to_write(&w, false, None).as_deref(), Some("3"));
        assert_eq!(record_to_write(&w, true, None), None);
        let cj = view(WorkloadKind::CronJob, None, Some(true), &[]);
        assert_eq!(record_to_write(&cj, false, None).as_deref(), Some("true"));
        let asleep = view(WorkloadKind::Deployment, Some(0), None, &[(REPLICAS_BEFORE_SLEEP, "3")]);
        assert_eq!(record_to_write(&asleep, false, None), None, "already recorded: no new record");
        assert_eq!(own_record(&asleep).map(String::as_str), Some("3"));
    }

    #[test]
    fn a_sleeping_workload_whose_record_was_removed_is_not_recorded_again_at_zero() {
        let c = copy(&[("Deployment/w", "3")]);
        let stripped = view(WorkloadKind::Deployment, Some(0), None, &[]);
        assert_eq!(sleep_patch_from(&stripped, false, Some(&c)), Ok(None));
        assert_eq!(record_to_write(&stripped, false, Some(&c)), None);
        // Without the copy, a workload at zero is new to this sleep: its
        // zero is what it ran.
        assert_eq!(record_to_write(&stripped, false, None).as_deref(), Some("0"));
        // Scaled up by hand since: slept again, its new value recorded.
        let up = view(WorkloadKind::Deployment, Some(2), None, &[]);
        assert_eq!(record_to_write(&up, false, Some(&c)).as_deref(), Some("2"));
    }

    #[test]
    fn a_wake_restores_from_the_targets_copy_when_the_workloads_record_is_gone() {
        let c = copy(&[("Deployment/w", "3"), ("CronJob/w", "false")]);
        let w = view(WorkloadKind::Deployment, Some(0), None, &[]);
        let p = wake_patch_from(&w, Some(&c)).unwrap().unwrap();
        assert_eq!(p["spec"]["replicas"], json!(3));
        assert_eq!(p["metadata"]["resourceVersion"], json!("42"));
        let cj = view(WorkloadKind::CronJob, None, Some(true), &[]);
        assert_eq!(wake_patch_from(&cj, Some(&c)).unwrap().unwrap()["spec"]["suspend"], json!(false));
        // Its own record wins over the copy.
        let own = view(WorkloadKind::Deployment, Some(0), None, &[(REPLICAS_BEFORE_SLEEP, "5")]);
        assert_eq!(wake_patch_from(&own, Some(&c)).unwrap().unwrap()["spec"]["replicas"], json!(5));
        // Changed by hand, already restored, at the value it had, or not in
        // the copy: nothing to do.
        assert_eq!(wake_patch_from(&view(WorkloadKind::Deployment, Some(2), None, &[]), Some(&c)), Ok(None));
        let zero = copy(&[("Deployment/w", "0")]);
        assert_eq!(wake_patch_from(&w, Some(&zero)), Ok(None));
        assert_eq!(wake_patch_from(&w, Some(&copy(&[("StatefulSet/w", "3")]))), Ok(None));
        assert_eq!(wake_patch_from(&w, None), Ok(None));
        assert!(wake_patch_from(&w, Some(&copy(&[("Deployment/w", "many")]))).is_err());
        // A hand-written copy is read as strictly as a workload's own record.
        for hostile in ["-3", "3.5", " ", "99999999999", "true"] {
            assert!(wake_patch_from(&w, Some(&copy(&[("Deployment/w", hostile)]))).is_err(), "{hostile:?}");
        }
        assert!(wake_patch_from(&cj, Some(&copy(&[("CronJob/w", "yes")]))).is_err());
    }

    #[test]
    fn a_workload_at_zero_with_no_record_anywhere_is_lost() {
        let w = view(WorkloadKind::Deployment, Some(0), None, &[]);
        assert!(record_lost(&w, None));
        assert!(record_lost(&w, Some(&copy(&[("StatefulSet/w", "1")]))));
        assert!(!record_lost(&w, Some(&copy(&[("Deployment/w", "0")]))));
        assert!(!record_lost(
            &view(WorkloadKind::Deployment, Some(0), None, &[(REPLICAS_BEFORE_SLEEP, "2")]),
            None
        ));
        assert!(!record_lost(&view(WorkloadKind::Deployment, Some(1), None, &[]), None));
        assert!(record_lost(&view(WorkloadKind::CronJob, None, Some(true), &[]), None));
        assert!(!record_lost(&view(WorkloadKind::CronJob, None, Some(false), &[]), None));
    }
}
