//! Evaluation: everything known about one target, read from the stores,
//! and the decision for it. Shared by the controller (which then acts) and
//! the CLI (which explains).

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Pod;
use kube::core::SelectorExt;

use crate::activity::{Activity, Source};
use crate::foresight::predict::{self, Edges};
use crate::foresight::profile::Profile;
use crate::foresight::simulate::{Comparison, Start, with_policy};
use crate::foresight::what_if::{Period, Subject, simulate_subject};
use crate::policy::annotations::{
    AnnotationError, ForceSleep, TargetAnnotations, TargetState, WorkloadAnnotations,
};
use crate::policy::decide::{self, Current, Decision, Forced, Inputs, LastUse};
use crate::policy::{Candidate, Defaults, EffectivePolicy, RunningJobs, TargetKind, loft};
use crate::scaler::gitops;
use crate::scaler::hand_scaled;
pub use crate::target::effective::Invalid;
use crate::target::effective::{Governed, effective};
use crate::target::workload::{Requests, WorkloadKind, pod_spec_requests};
use crate::target::{Scope, Stores, Target, TargetRef, WorkloadView};
use crate::vocab::{EXCLUDE, REPLICAS_BEFORE_SLEEP};

/// One target, fully read, with its decision.
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub target: Target,
    pub annotations: TargetAnnotations,
    pub policy: EffectivePolicy,
    pub workloads: Vec<WorkloadView>,
    /// For a vcluster: the host pods it synced.
    pub synced_pods: Vec<Arc<Pod>>,
    /// What dormant last recorded (awake when nothing is recorded yet).
    pub state: TargetState,
    pub first_seen: DateTime<Utc>,
    /// `first-seen` is not written yet.
    pub first_seen_missing: bool,
    pub forced: Option<Forced>,
    /// `force-sleep: "true"` still needs its instant written.
    pub force_unstamped: bool,
    pub last_use: Option<LastUse>,
    /// Workloads someone scaled up by hand while the target slept.
    pub hand_scaled: Vec<String>,
    /// Its activity profile, when it has a readable one.
    pub profile: Option<Profile>,
    /// The pre-wakes the decision was given (none unless the policy sets
    /// `wake.predictive`), and when tomorrow's becomes known.
    pub predicted: Edges,
    pub decision: Decision,
    /// vCluster Platform's `sleepmode.loft.sh/exclude` on a workload counts
    /// (the agent reads the Platform's annotations).
    pub platform_exclude: bool,
    /// vCluster Platform's forced sleep, to be written as dormant's own
    /// (empty when there is none).
    pub takeover: BTreeMap<&'static str, Option<String>>,
}

impl Evaluation {
    /// True when a sleep leaves a workload as it is: annotated `exclude`,
    /// matched by the policy's exclude selector, or a Job the policy lets
    /// finish (`runningJobs: Finish`, the default).
    pub fn excluded(&self, w: &WorkloadView) -> bool {
        self.excluded_by(&w.annotations, &w.labels)
            || (w.kind == WorkloadKind::Job && self.policy.running_jobs.value == RunningJobs::Finish)
    }

    /// Excluded by its own annotation or the policy's label selector.
    pub fn excluded_by(
        &self,
        annotations: &BTreeMap<String, String>,
        labels: &BTreeMap<String, String>,
    ) -> bool {
        let by_annotation = match annotations.get(EXCLUDE) {
            Some(own) => own == "true",
            // dormant's own annotation, when present, wins over the Platform's.
            None => self.platform_exclude && loft::workload_excluded(annotations) == Ok(Some(true)),
        };
        by_annotation || self.policy.exclude.as_ref().is_some_and(|s| !s.selects_all() && s.matches(labels))
    }

    /// The target as a what-if run starts from it: its policy, profile,
    /// state, last use and requests now.
    pub fn subject(&self) -> Subject {
        let asleep = matches!(self.state, TargetState::Asleep | TargetState::Sleeping);
        let since = self.annotations.asleep_since.unwrap_or(self.first_seen);
        Subject {
            name: self.target.r.to_string(),
            policy_name: self.policy.policy.clone().unwrap_or_else(|| "agent defaults".into()),
            policy: self.policy.clone(),
            profile: self.profile.clone(),
            start: Start {
                current: if asleep { Current::Asleep { since } } else { Current::Awake },
                last_use: self.last_use.clone(),
                first_seen: self.first_seen,
                forced: self.forced,
            },
            requests: self.running_requests(),
        }
    }

    /// What its current policy (unless `include_current` is false) and each
    /// of `files` would do to it over `period`, through the same decision
    /// core as the controller's. Each file is resolved as if the target's
    /// `policy` annotation named it; one that cannot be is the error.
    pub fn what_if(
        &self,
        files: &[Arc<Candidate>],
        defaults: &Defaults,
        include_current: bool,
        period: Period,
        now: DateTime<Utc>,
    ) -> Result<Comparison, String> {
        let mut others = Vec::new();
        for c in files {
            let p = with_policy(
                self.target.r.kind,
                &self.target.namespace_labels,
                &self.annotations,
                c.clone(),
                defaults,
            )
            .map_err(|e| format!("policy {} for {}: {e}", c.name, self.target.r))?;
            others.push((c.name.clone(), p));
        }
        Ok(simulate_subject(&self.subject(), &others, include_current, period, now))
    }

    /// What this target requests when awake (what a sleep saves): each
    /// workload at its recorded value if it has one, else its current one.
    pub fn running_requests(&self) -> Requests {
        let mut r = Requests::default();
        for w in &self.workloads {
            if self.excluded(w) {
                continue;
            }
            let recorded = w.annotations.get(REPLICAS_BEFORE_SLEEP).and_then(|v| v.parse::<i32>().ok());
            if let Some(n) = recorded.or(w.replicas) {
                r = r + w.per_replica * f64::from(n.max(0));
            } else if !w.finished && w.suspend == Some(false) {
                r = r + w.per_replica * f64::from(w.current_pods.max(0));
            }
        }
        // Bare pods in a vcluster keep running while it sleeps: no saving.
        for p in self.synced_pods.iter().filter(|p| crate::scaler::restorable(p)) {
            if let Some(spec) = &p.spec {
                r = r + pod_spec_requests(spec);
            }
        }
        r
    }

    /// When to evaluate again: the decision's deadline, or the next local
    /// midnight when pre-wakes are predicted (the next day's becomes known).
    pub fn look_again(&self) -> Option<DateTime<Utc>> {
        match (self.decision.next, self.predicted.refresh_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// What `explain` says about the target's rhythm and pre-wakes, as
    /// (label, text) lines; none without a profile.
    pub fn foresight(&self, now: DateTime<Utc>) -> Vec<(&'static str, String)> {
        let Some(profile) = &self.profile else { return Vec::new() };
        let cfg = self.policy.wake_predictive.value.as_ref();
        let mut lines = predict::describe(profile, cfg, now);
        if let Some(w) = self.predicted.wakes.iter().find(|w| w.at > now) {
            let tz = self.policy.timezone.value;
            lines.push((
                "Next pre-wake",
                format!(
                    "{} ({}), for the first use predicted at {}",
                    w.at.with_timezone(&tz).format("%Y-%m-%d %H:%M %Z"),
                    crate::policy::annotations::rfc3339(w.at),
                    w.predicted_use.with_timezone(&tz).format("%H:%M")
                ),
            ));
        }
        lines
    }

    /// A vcluster's control plane, which is both its target object and its
    /// first workload: its patches can carry the target's own annotations.
    pub fn control_plane(&self) -> Option<&WorkloadView> {
        use crate::client::Patchable as _;
        use crate::target::TargetObject;
        let cp = self.workloads.first().filter(|_| self.target.r.kind == TargetKind::VCluster)?;
        let object = &self.target.object;
        let kind = match object {
            TargetObject::StatefulSet(_) => WorkloadKind::StatefulSet,
            TargetObject::Deployment(_) => WorkloadKind::Deployment,
            TargetObject::Namespace(_) => return None,
        };
        (cp.kind == kind && cp.namespace == object.namespace() && cp.name == object.name()).then_some(cp)
    }

    /// The vcluster's control plane is at zero with no pod left.
    pub fn control_plane_down(&self) -> bool {
        self.target.r.kind == TargetKind::VCluster
            && self.workloads.first().is_some_and(|cp| cp.replicas == Some(0) && cp.current_pods == 0)
    }
}

/// A wake by hand: `dormant wake --direct` writes `(cli)`, the agent's
/// API (the CLI and the web page) `(api)`, a workload scaled up by hand
/// `(scale)`.
fn manual_source(by: &str) -> bool {
    by.ends_with("(cli)") || by.ends_with("(api)") || by.ends_with("(scale)")
}

/// Reads one target from the stores and decides. `Ok(None)` when it is not
/// a target (anymore).
pub fn evaluate(
    stores: &Stores,
    defaults: &Defaults,
    scope: &Scope,
    ledger: Option<&Activity>,
    r: &TargetRef,
    now: DateTime<Utc>,
) -> Result<Option<Evaluation>, Invalid> {
    let Some(Governed { target, annotations, policy, takeover }) = effective(stores, defaults, scope, r)?
    else {
        return Ok(None);
    };
    let workloads = stores.workloads(&target);
    for w in &workloads {
        if let Err(errors) = WorkloadAnnotations::parse(&w.annotations) {
            return Err(Invalid::Workload { id: w.id(), errors });
        }
        if let Err(value) = gitops::check_record(&w.annotations) {
            let reason = gitops::BAD_RECORD.into();
            let e = AnnotationError { key: gitops::GITOPS_BEFORE_SLEEP.into(), value, reason };
            return Err(Invalid::Workload { id: w.id(), errors: vec![e] });
        }
        if (scope.platform_annotations || policy.platform_annotations)
            && let Err(e) = loft::workload_excluded(&w.annotations)
        {
            return Err(Invalid::Workload { id: w.id(), errors: vec![e] });
        }
    }
    let synced_pods =
        if r.kind == TargetKind::VCluster { stores.synced_pods(&r.namespace, &r.name) } else { Vec::new() };

    let state = annotations.state.unwrap_or(TargetState::Awake);
    let (first_seen, first_seen_missing) = match annotations.first_seen {
        Some(t) => (t, false),
        None => (now, true),
    };
    let asleep_since = annotations.asleep_since.unwrap_or(now);
    let (forced, force_unstamped) = match annotations.force_sleep {
        None => (None, false),
        Some(ForceSleep::Since(t)) => (
            Some(Forced { since: t.min(now), prevent_wakeup_until: annotations.prevent_wakeup_until }),
            false,
        ),
        Some(ForceSleep::Requested) => {
            let since =
                if matches!(state, TargetState::Asleep | TargetState::Sleeping) { asleep_since } else { now };
            (Some(Forced { since, prevent_wakeup_until: annotations.prevent_wakeup_until }), true)
        }
    };
    // Dated by other clocks (`dormant wake` on a laptop, another replica):
    // one ahead of this one reads as now, not as a use that has not
    // happened yet (which would count only once this clock got there).
    let from_annotation = annotations.last_activity.map(|at| {
        let by = annotations.last_activity_by.clone().unwrap_or_default();
        LastUse { at: at.min(now), manual: manual_source(&by), by }
    });
    let from_ledger = ledger.map(|a| LastUse {
        at: a.at,
        by: a.summary(),
        manual: matches!(a.source, Source::Cli | Source::Scale),
    });
    let mut last_use = match (from_annotation, from_ledger) {
        (Some(a), Some(l)) => Some(if l.at > a.at { l } else { a }),
        (a, l) => a.or(l),
    };
    let asleep = matches!(state, TargetState::Asleep | TargetState::Sleeping);
    let hand_scaled: Vec<String> = if asleep {
        workloads.iter().filter(|w| hand_scaled(w)).map(WorkloadView::id).collect()
    } else {
        vec![]
    };
    if let Some(first) = hand_scaled.first() {
        last_use = Some(LastUse { at: now, by: format!("{first} scaled by hand (scale)"), manual: true });
    }
    let current = if asleep { Current::Asleep { since: asleep_since } } else { Current::Awake };
    let unverified_wake = annotations.unverified_wake.map(|at| at.min(now));
    let profile = annotations.activity_profile.as_deref().and_then(|v| Profile::parse(v).ok());
    let predicted =
        predict::edges(profile.as_ref(), policy.wake_predictive.value.as_ref(), policy.timezone.value, now);
    let inputs = Inputs {
        policy: &policy,
        current,
        last_use: last_use.clone(),
        first_seen,
        forced,
        unverified_wake,
        predicted: &predicted.wakes,
    };
    let decision = decide::decide(&inputs, now);
    let platform_exclude = scope.platform_annotations || policy.platform_annotations;
    let ev = Evaluation {
        target,
        annotations,
        policy,
        workloads,
        synced_pods,
        state,
        first_seen,
        first_seen_missing,
        forced,
        force_unstamped,
        last_use,
        hand_scaled,
        profile,
        predicted,
        decision,
        platform_exclude,
        takeover,
    };
    // Checked while a sleep could still scale such a workload down (not
    // while asleep or waking: waking must be able to finish).
    if matches!(state, TargetState::Awake | TargetState::Sleeping)
        && let Some(w) = ev
            .workloads
            .iter()
            .find(|w| w.deletes_claims_when_scaled && w.replicas.is_some_and(|n| n > 0) && !ev.excluded(w))
    {
        return Err(Invalid::DeletesClaims { id: w.id() });
    }
    Ok(Some(ev))
}
