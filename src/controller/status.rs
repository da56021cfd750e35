//! Periodic bookkeeping: savings accrual, the targets-by-state gauge, and
//! each SleepPolicy's status (validity, governed targets, failures).

use std::collections::{BTreeMap, HashMap};

use chrono::Utc;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
use kube::api::{Api, Patch};
use serde_json::json;

use super::Context;
use crate::metrics::StateLabels;
use crate::policy::crd::{FailedTarget, SleepPolicyStatus};
use crate::policy::{SleepPolicy, TargetKind};

pub(super) async fn tick(ctx: &Context) {
    if !ctx.is_leader() {
        // Again on every tick: a reconcile that started before leadership
        // was lost may have reported its target since.
        ctx.step_down();
        return;
    }
    ctx.metrics.cost.accrue(&ctx.metrics.savings, Utc::now());
    let summaries = ctx.summaries();
    count_targets(ctx, &summaries);
    update_policy_status(ctx, &summaries).await;
}

/// The targets-by-state gauge, from `summaries`.
pub(super) fn count_targets(ctx: &Context, summaries: &HashMap<crate::target::TargetRef, super::Summary>) {
    let mut counts: HashMap<(TargetKind, &'static str), i64> = HashMap::new();
    for kind in [TargetKind::Namespace, TargetKind::VCluster] {
        for state in ["awake", "sleeping", "asleep", "waking", "invalid"] {
            counts.insert((kind, state), 0);
        }
    }
    for s in summaries.values() {
        let state = if s.invalid.is_some() { "invalid" } else { s.state.as_str() };
        *counts.entry((s.kind, state)).or_default() += 1;
    }
    for ((kind, state), n) in counts {
        ctx.metrics
            .targets
            .get_or_create(&StateLabels { kind: kind.as_str().into(), state: state.into() })
            .set(n);
    }
}

async fn update_policy_status(ctx: &Context, summaries: &HashMap<crate::target::TargetRef, super::Summary>) {
    let candidates = ctx.stores.candidates();
    let mut governed: BTreeMap<&str, i32> = BTreeMap::new();
    let mut failed: BTreeMap<&str, Vec<FailedTarget>> = BTreeMap::new();
    for (t, s) in summaries {
        if let Some(p) = &s.policy {
            *governed.entry(p.as_str()).or_default() += 1;
        }
        if let Some((Some(p), message)) = &s.invalid {
            // Once: a target that was valid under `p` keeps it as its policy.
            if s.policy.as_deref() != Some(p.as_str()) {
                *governed.entry(p.as_str()).or_default() += 1;
            }
            let list = failed.entry(p.as_str()).or_default();
            if list.len() < 20 {
                list.push(FailedTarget { target: t.to_string(), reason: message.clone() });
            }
        }
    }
    let api: Api<SleepPolicy> = Api::all(ctx.scaler.client().clone());
    for policy in ctx.stores.policies.state() {
        let name = policy.name_any();
        let Some(c) = candidates.iter().find(|c| c.name == name) else { continue };
        let (status, reason, message) = match &c.parsed {
            Ok(_) => ("True", "Valid", "the policy was read successfully".to_string()),
            Err(errors) => (
                "False",
                "InvalidSpec",
                errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
            ),
        };
        let old = policy.status.clone().unwrap_or_default();
        let old_valid = old.conditions.iter().find(|c| c.type_ == "Valid");
        let transition = match old_valid {
            Some(c) if c.status == status => c.last_transition_time.clone(),
            _ => Time(k8s_openapi::jiff::Timestamp::now()),
        };
        let mut failed_targets = failed.remove(name.as_str()).unwrap_or_default();
        failed_targets.sort_by(|a, b| a.target.cmp(&b.target));
        let new = SleepPolicyStatus {
            targets: governed.get(name.as_str()).copied().unwrap_or(0),
            conditions: vec![Condition {
                type_: "Valid".into(),
                status: status.into(),
                reason: reason.into(),
                message: message.chars().take(1000).collect(),
                last_transition_time: transition,
                observed_generation: policy.metadata.generation,
            }],
            observed_generation: policy.metadata.generation,
            failed_targets,
        };
        let same = old.targets == new.targets
            && old.observed_generation == new.observed_generation
            && old.failed_targets == new.failed_targets
            && old_valid.is_some_and(|c| c.status == status && c.message == new.conditions[0].message);
        if same {
            continue;
        }
        // A merge patch leaves out what is not in it: an empty list (not
        // serialized) must be sent as null, or the failures of a policy
        // since fixed would stay in its status for ever.
        let mut patch = json!({ "status": new });
        if new.failed_targets.is_empty() {
            patch["status"]["failedTargets"] = serde_json::Value::Null;
        }
        if let Err(e) = api.patch_status(&name, &crate::client::patch_params(), &Patch::Merge(&patch)).await {
            tracing::warn!(policy = %name, error = %e, "failed to update SleepPolicy status");
        }
    }
}
