//! What the API answers, as JSON: a target's summary (the status row, and
//! what the page's list shows) and its explanation (explain's content),
//! both made here from the controller's own [`Evaluation`], and read back
//! by the CLI from the same types.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::controller::{Evaluation, Invalid};
use crate::metrics::cost::hourly_cost;
use crate::policy::annotations::{TargetState, Until};
use crate::policy::decide::Desired;
use crate::policy::{Defaults, EffectivePolicy, Origin, duration};
use crate::target::{Scope, Target, TargetKind, TargetObject, TargetRef};
use crate::vocab;

/// One target, as a list shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TargetSummary {
    /// `vcluster/<namespace>/<name>` or `namespace/<name>`.
    pub target: String,
    /// `vcluster` or `namespace`.
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// `awake`, `sleeping`, `asleep`, `waking`, or `invalid` (dormant leaves
    /// it as it is until its policy or annotations are fixed).
    pub state: String,
    /// `awake`, `asleep`, `leave`; none when invalid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<String>,
    /// Why it is (or should be) in that state; for an invalid one, what is wrong.
    pub reason: String,
    /// Since when nobody used it (its last use, or when dormant first saw it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_since: Option<DateTime<Utc>>,
    /// The next transition without new use, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<Transition>,
    /// `asleep in 10m`, `wakes on request`, `never sleeps`, ...
    pub next_text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// What it requests while awake, and what that costs: what sleeping saves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saves: Option<Savings>,
    /// Requests do not wake it until then (`never`, or an RFC 3339 time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prevent_wakeup_until: Option<String>,
    /// How many of its workloads are ready (a wake's progress).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Transition {
    /// `sleep` or `wake`.
    pub action: String,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Savings {
    pub cpu_cores: f64,
    pub memory_bytes: f64,
    pub per_hour: f64,
    pub currency: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    pub workloads: usize,
    pub ready: usize,
    /// Awake, and every workload it scales ready.
    pub done: bool,
}

/// Everything `explain` says about one target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    pub summary: TargetSummary,
    /// The object that carries its annotations (`StatefulSet team-a/dev`).
    pub object: String,
    /// False: the namespace is no target (no policy selects it and it has
    /// no dormant annotation).
    pub is_target: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asleep_since: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_seen: Option<DateTime<Utc>>,
    /// Who used it most lately, with request counts (halved every day).
    #[serde(default)]
    pub used_by: Vec<(String, u64)>,
    /// Put to sleep by hand since then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forced_since: Option<DateTime<Utc>>,
    /// Its weekly rhythm and predicted first use (label, text), as
    /// `dormant explain` shows them (see `crate::foresight`).
    #[serde(default)]
    pub foresight: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The effective policy, value by value, each with where it came from.
    #[serde(default)]
    pub settings: Vec<Setting>,
    #[serde(default)]
    pub workloads: Vec<Workload>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synced_pods: Option<usize>,
    /// The agent's own settings, which apply where nothing else says.
    pub agent: AgentSettings,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Setting {
    pub name: String,
    pub value: String,
    /// `agent`, `built-in`, `policy`, `annotation` or `vcluster`.
    pub origin: String,
    /// `agent setting --default-sleep-after`, `SleepPolicy office-hours`,
    /// `annotation dormant.dev/sleep-after`, ...
    pub from: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    pub kind: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    pub ready: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspend: Option<bool>,
    /// What dormant recorded before scaling it down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before_sleep: Option<String>,
    pub excluded: bool,
}

/// The agent's settings that stand where no policy or annotation says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentSettings {
    pub default_sleep_after: String,
    pub default_timezone: String,
    pub default_wake_timeout: String,
    pub cpu_core_hour: f64,
    pub memory_gib_hour: f64,
    pub currency: String,
    pub excluded_namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<String>,
    /// `--namespaces`: the only namespaces that may hold targets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub only_namespaces: Option<Vec<String>>,
}

impl AgentSettings {
    pub fn new(defaults: &Defaults, scope: &Scope, namespace_selector: Option<String>) -> Self {
        let mut excluded: Vec<String> = scope.excluded.iter().cloned().collect();
        excluded.sort();
        AgentSettings {
            default_sleep_after: defaults.sleep_after.to_string(),
            default_timezone: defaults.timezone.name().to_string(),
            default_wake_timeout: duration::format(defaults.wake_timeout),
            cpu_core_hour: defaults.pricing.cpu_core_hour,
            memory_gib_hour: defaults.pricing.memory_gib_hour,
            currency: defaults.pricing.currency.clone(),
            excluded_namespaces: excluded,
            namespace_selector,
            only_namespaces: scope.only.as_ref().map(|o| o.iter().cloned().collect()),
        }
    }
}

/// Where a setting's value came from, for people: a default is the agent's
/// own setting (naming its flag) where the agent has one for it, else
/// dormant's built-in default.
pub fn origin(setting: &str, o: &Origin) -> (&'static str, String) {
    match o {
        Origin::Default => match agent_flag(setting) {
            Some(flag) => ("agent", format!("agent setting {flag}")),
            None => ("built-in", "built-in default".into()),
        },
        Origin::Policy(name) => ("policy", format!("SleepPolicy {name}")),
        Origin::Annotation(key) => ("annotation", format!("annotation {key}")),
        Origin::VClusterConfig(field) => ("vcluster", format!("vcluster.yaml {field}")),
    }
}

/// The agent flag that sets a setting's default, if one does.
pub fn agent_flag(setting: &str) -> Option<&'static str> {
    match setting {
        "sleepAfter" => Some("--default-sleep-after"),
        "timezone" => Some("--default-timezone"),
        "wake.timeout" => Some("--default-wake-timeout"),
        "pricing" => Some("--cpu-core-hour/--memory-gib-hour/--currency"),
        _ => None,
    }
}

/// `1h2m`, `45s` (whole seconds, never negative).
pub fn short(d: chrono::Duration) -> String {
    duration::format(std::time::Duration::from_secs(d.num_seconds().max(0) as u64))
}

fn next_text(ev: &Evaluation, now: DateTime<Utc>) -> String {
    match (ev.decision.next, ev.decision.desired) {
        (_, Desired::Leave) => "disabled".into(),
        (Some(at), Desired::Awake) => format!("asleep in {}", short(at - now)),
        (Some(at), Desired::Asleep) => format!("awake in {}", short(at - now)),
        (None, Desired::Asleep) if ev.policy.wake_on_request.value => "wakes on request".into(),
        (None, Desired::Asleep) => "stays asleep".into(),
        (None, Desired::Awake) => "never sleeps".into(),
    }
}

fn kind_str(k: TargetKind) -> &'static str {
    match k {
        TargetKind::Namespace => "namespace",
        TargetKind::VCluster => "vcluster",
    }
}

/// Where a wake stands: how many workloads dormant scales are ready.
pub fn progress(ev: &Evaluation) -> Progress {
    let scaled: Vec<_> =
        ev.workloads.iter().filter(|w| !ev.excluded(w) && w.replicas.is_some() && !w.controlled).collect();
    let ready = scaled.iter().filter(|w| w.ready()).count();
    let done = ev.state == TargetState::Awake && ready == scaled.len();
    Progress { workloads: scaled.len(), ready, done }
}

/// The summary of `r`, from its evaluation; `None` when it is not a target.
pub fn summary(
    r: &TargetRef,
    evaluated: &Result<Option<Evaluation>, Invalid>,
    now: DateTime<Utc>,
) -> Option<TargetSummary> {
    let base = |state: String, reason: String| TargetSummary {
        target: r.to_string(),
        kind: kind_str(r.kind).into(),
        namespace: r.namespace.clone(),
        name: r.name.clone(),
        state,
        desired: None,
        reason,
        idle_since: None,
        next: None,
        next_text: "-".into(),
        last_used_by: None,
        policy: None,
        saves: None,
        prevent_wakeup_until: None,
        progress: None,
    };
    match evaluated {
        Ok(None) => None,
        Err(e) => Some(TargetSummary {
            policy: e.policy().map(String::from),
            ..base("invalid".into(), e.to_string())
        }),
        Ok(Some(ev)) => {
            let pricing = &ev.policy.pricing.value;
            let requests = ev.running_requests();
            let next = ev.decision.next.and_then(|at| match ev.decision.desired {
                Desired::Awake => Some(Transition { action: "sleep".into(), at }),
                Desired::Asleep => Some(Transition { action: "wake".into(), at }),
                Desired::Leave => None,
            });
            Some(TargetSummary {
                desired: Some(format!("{:?}", ev.decision.desired).to_lowercase()),
                idle_since: Some(ev.last_use.as_ref().map_or(ev.first_seen, |u| u.at)),
                next,
                next_text: next_text(ev, now),
                last_used_by: ev.last_use.as_ref().map(|u| u.by.clone()),
                policy: ev.policy.policy.clone(),
                saves: Some(Savings {
                    cpu_cores: requests.cpu_cores,
                    memory_bytes: requests.memory_bytes,
                    per_hour: hourly_cost(requests, pricing),
                    currency: pricing.currency.clone(),
                }),
                prevent_wakeup_until: ev
                    .forced
                    .and_then(|f| f.prevent_wakeup_until)
                    .filter(|u| u.covers(now))
                    .map(|u| u.to_string()),
                progress: Some(progress(ev)),
                ..base(ev.state.as_str().into(), ev.decision.reason.to_string())
            })
        }
    }
}

/// The effective policy's settings as explain shows them: (name, value,
/// where the value came from), in the order people read them.
pub fn policy_settings(p: &EffectivePolicy) -> Vec<(&'static str, String, &Origin)> {
    let schedules = if p.schedules.value.is_empty() {
        "none".to_string()
    } else {
        p.schedules
            .value
            .iter()
            .map(|s| {
                format!(
                    "sleep {} / wake {}",
                    s.sleep.as_ref().map_or("-".into(), |c| format!("\"{c}\"")),
                    s.wake.as_ref().map_or("-".into(), |c| format!("\"{c}\""))
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    let pricing = &p.pricing.value;
    let mut settings = vec![
        ("sleepAfter", p.sleep_after.value.to_string(), &p.sleep_after.origin),
        ("schedules", schedules, &p.schedules.origin),
        ("timezone", p.timezone.value.name().to_string(), &p.timezone.origin),
        ("wake.onRequest", p.wake_on_request.value.to_string(), &p.wake_on_request.origin),
        ("wake.onSchedule", p.wake_on_schedule.value.to_string(), &p.wake_on_schedule.origin),
        ("wake.timeout", duration::format(p.wake_timeout.value), &p.wake_timeout.origin),
        ("runningJobs", p.running_jobs.value.to_string(), &p.running_jobs.origin),
        ("dryRun", p.dry_run.value.to_string(), &p.dry_run.origin),
        ("disabled", p.disabled.value.to_string(), &p.disabled.origin),
        (
            "pricing",
            format!(
                "{} {c}/core-hour, {} {c}/GiB-hour",
                pricing.cpu_core_hour,
                pricing.memory_gib_hour,
                c = pricing.currency
            ),
            &p.pricing.origin,
        ),
    ];
    settings.push(("ignore", p.ignore.value.summary(), &p.ignore.origin));
    settings
}

/// explain's content for `r`, whose object is `target`.
pub fn explanation(
    r: &TargetRef,
    target: &Target,
    evaluated: &Result<Option<Evaluation>, Invalid>,
    agent: AgentSettings,
    now: DateTime<Utc>,
) -> Explanation {
    let object = match &target.object {
        TargetObject::Namespace(_) => format!("Namespace {}", r.namespace),
        TargetObject::StatefulSet(_) => format!("StatefulSet {}/{}", r.namespace, r.name),
        TargetObject::Deployment(_) => format!("Deployment {}/{}", r.namespace, r.name),
    };
    let summary = summary(r, evaluated, now).unwrap_or_else(|| TargetSummary {
        target: r.to_string(),
        kind: kind_str(r.kind).into(),
        namespace: r.namespace.clone(),
        name: r.name.clone(),
        state: "none".into(),
        desired: None,
        reason:
            "not a target: no SleepPolicy selects this namespace and it carries no dormant.dev/ annotation"
                .into(),
        idle_since: None,
        next: None,
        next_text: "-".into(),
        last_used_by: None,
        policy: None,
        saves: None,
        prevent_wakeup_until: None,
        progress: None,
    });
    let mut x = Explanation {
        summary,
        object,
        is_target: !matches!(evaluated, Ok(None)),
        asleep_since: None,
        last_used_at: None,
        first_seen: None,
        used_by: vec![],
        forced_since: None,
        foresight: vec![],
        note: None,
        settings: vec![],
        workloads: vec![],
        synced_pods: None,
        agent,
    };
    let Ok(Some(ev)) = evaluated else { return x };
    let a = &ev.annotations;
    if matches!(ev.state, TargetState::Asleep | TargetState::Sleeping) {
        x.asleep_since = a.asleep_since;
    }
    x.last_used_at = ev.last_use.as_ref().map(|u| u.at);
    x.first_seen = Some(ev.first_seen);
    x.used_by = a.activity_sources.clone();
    x.forced_since = ev.forced.map(|f| f.since);
    x.foresight = ev.foresight(now).into_iter().map(|(l, t)| (l.to_string(), t)).collect();
    if ev.decision.desired == Desired::Leave && ev.state != TargetState::Awake {
        x.note = Some(format!(
            "disabled while {}: its workloads stay as dormant left them (scaled down, with their records); remove {} and wake it to bring them back",
            ev.state,
            vocab::DISABLED
        ));
    }
    let settings = policy_settings(&ev.policy);
    x.settings = settings
        .into_iter()
        .map(|(name, value, o)| {
            let (origin, from) = origin(name, o);
            Setting { name: name.into(), value, origin: origin.into(), from }
        })
        .collect();
    x.workloads = ev
        .workloads
        .iter()
        .map(|w| Workload {
            kind: w.kind.as_str().into(),
            name: w.name.clone(),
            replicas: w.replicas,
            ready: w.ready_pods,
            suspend: if w.replicas.is_none() { w.suspend } else { None },
            before_sleep: w
                .annotations
                .get(vocab::REPLICAS_BEFORE_SLEEP)
                .map(|v| format!("replicas {v}"))
                .or_else(|| w.annotations.get(vocab::SUSPEND_BEFORE_SLEEP).map(|v| format!("suspend {v}"))),
            excluded: ev.excluded(w),
        })
        .collect();
    if r.kind == TargetKind::VCluster {
        x.synced_pods = Some(ev.synced_pods.len());
    }
    x
}

/// `2h` from now, `never`, or an RFC 3339 instant: until when requests may
/// not wake a target put to sleep.
pub fn parse_until(v: &str, now: DateTime<Utc>) -> Result<Until, String> {
    let v = v.trim();
    if v == "never" {
        return Ok(Until::Never);
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(v) {
        let t = t.with_timezone(&Utc);
        return if t > now { Ok(Until::Time(t)) } else { Err(format!("{v} is not in the future")) };
    }
    let d = duration::parse(v)
        .map_err(|e| format!("{v:?}: expected a duration (2h), never, or an RFC 3339 time ({e})"))?;
    let d = chrono::Duration::from_std(d).map_err(|e| e.to_string())?;
    Ok(Until::Time(now + d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_default_names_the_agent_flag_that_set_it_or_says_it_is_built_in() {
        assert_eq!(
            origin("sleepAfter", &Origin::Default),
            ("agent", "agent setting --default-sleep-after".to_string())
        );
        assert_eq!(origin("wake.timeout", &Origin::Default).1, "agent setting --default-wake-timeout");
        assert_eq!(origin("wake.onRequest", &Origin::Default), ("built-in", "built-in default".to_string()));
        assert_eq!(origin("sleepAfter", &Origin::Policy("p".into())).1, "SleepPolicy p");
        assert_eq!(
            origin("sleepAfter", &Origin::Annotation(vocab::SLEEP_AFTER)).1,
            format!("annotation {}", vocab::SLEEP_AFTER)
        );
    }

    #[test]
    fn until_reads_durations_never_and_future_times() {
        let now = DateTime::parse_from_rfc3339("2026-12-01T10:00:00Z").unwrap().with_timezone(&Utc);
        assert_eq!(parse_until("never", now), Ok(Until::Never));
        assert_eq!(parse_until("2h", now), Ok(Until::Time(now + chrono::Duration::hours(2))));
        assert_eq!(
            parse_until("2026-12-01T12:30:00+01:00", now),
            Ok(Until::Time(now + chrono::Duration::minutes(90)))
        );
        assert!(parse_until("2026-12-01T09:00:00Z", now).unwrap_err().contains("not in the future"));
        assert!(parse_until("soon", now).is_err());
    }
}
