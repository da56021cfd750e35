//! Resolution: defaults < the highest-priority matching `SleepPolicy` < the
//! target's own annotations, into an [`EffectivePolicy`] that remembers
//! where each value came from.

use crate::vocab;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono_tz::Tz;
use kube::core::{Selector, SelectorExt};

use super::annotations::TargetAnnotations;
use super::duration::SleepAfter;
use super::ignore::IgnoreRules;
use super::schedule::SchedulePair;
use super::{FieldError, Policy, Predictive, Pricing};

/// The kind of a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TargetKind {
    Namespace,
    VCluster,
}

impl TargetKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TargetKind::Namespace => "namespace",
            TargetKind::VCluster => "vcluster",
        }
    }
}

/// Where a value of the effective policy came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Default,
    Policy(String),
    Annotation(&'static str),
    /// A field of the vcluster's own `vcluster.yaml` (read from its
    /// `vc-config-<name>` Secret), e.g. `sleepMode.autoSleep.afterInactivity`.
    VClusterConfig(&'static str),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("default"),
            Origin::Policy(name) => write!(f, "SleepPolicy {name}"),
            Origin::Annotation(key) => write!(f, "annotation {key}"),
            Origin::VClusterConfig(field) => write!(f, "vcluster.yaml {field}"),
        }
    }
}

/// A value and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Sourced<T> {
    pub value: T,
    pub origin: Origin,
}

impl<T> Sourced<T> {
    fn default(value: T) -> Self {
        Sourced { value, origin: Origin::Default }
    }
}

/// The agent's defaults, below every policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Defaults {
    pub sleep_after: SleepAfter,
    pub timezone: Tz,
    pub wake_timeout: Duration,
    pub pricing: Pricing,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            // Nothing sleeps until a policy or annotation says so.
            sleep_after: SleepAfter::Never,
            timezone: chrono_tz::UTC,
            wake_timeout: Duration::from_secs(120),
            pricing: Pricing::default(),
        }
    }
}

/// The policy resolved for one target.
#[derive(Debug, Clone)]
pub struct EffectivePolicy {
    /// The winning `SleepPolicy`, if any matched.
    pub policy: Option<String>,
    /// Other matching policies with the same priority that lost the tie
    /// (broken by name); reported so users can fix the overlap.
    pub tied_with: Vec<String>,
    pub sleep_after: Sourced<SleepAfter>,
    pub schedules: Sourced<Vec<SchedulePair>>,
    pub timezone: Sourced<Tz>,
    pub wake_on_request: Sourced<bool>,
    pub wake_on_schedule: Sourced<bool>,
    pub wake_timeout: Sourced<Duration>,
    /// Predictive pre-wake (`wake.predictive`); `None`: off.
    pub wake_predictive: Sourced<Option<Predictive>>,
    pub ignore: Sourced<IgnoreRules>,
    pub exclude: Option<Selector>,
    pub pricing: Sourced<Pricing>,
    /// What a sleep does to a Job still running.
    pub running_jobs: Sourced<super::RunningJobs>,
    pub dry_run: Sourced<bool>,
    pub disabled: Sourced<bool>,
    pub delete_after: Option<super::DeleteAfter>,
    /// The winning policy reads vCluster Platform's settings
    /// (`vclusterPlatformAnnotations`).
    pub platform_annotations: bool,
}

impl EffectivePolicy {
    /// True when this policy can ever put the target to sleep.
    pub fn can_sleep(&self) -> bool {
        !self.disabled.value
            && (matches!(self.sleep_after.value, SleepAfter::After(_))
                || self.schedules.value.iter().any(|p| p.sleep.is_some()))
    }
}

/// A `SleepPolicy` as the resolver sees it: how it selects, and whether it
/// could be read.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub name: String,
    pub priority: i32,
    /// `None` when the selector itself is invalid: then it matches every
    /// target of its kinds, so that where it may have won, the target is
    /// left alone with the policy's error instead of falling to a policy of
    /// lower priority (a typo must not put production to sleep).
    pub selector: Option<Selector>,
    pub kinds: Vec<TargetKind>,
    pub parsed: Result<Policy, Vec<FieldError>>,
}

impl Candidate {
    pub fn matches(&self, kind: TargetKind, namespace_labels: &BTreeMap<String, String>) -> bool {
        self.kinds.contains(&kind) && self.selector.as_ref().is_none_or(|s| s.matches(namespace_labels))
    }
}

/// Why a target has no effective policy; the target is left alone.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ResolveError {
    #[error("annotation {} names SleepPolicy {name:?}, which does not exist", vocab::POLICY)]
    PolicyNotFound { name: String },
    #[error("SleepPolicy {name} is invalid: {}", join(.errors))]
    PolicyInvalid { name: String, errors: Vec<FieldError> },
}

impl ResolveError {
    /// Short, stable category (metric label, Event reason).
    pub fn category(&self) -> &'static str {
        match self {
            ResolveError::PolicyNotFound { .. } => "policy-not-found",
            ResolveError::PolicyInvalid { .. } => "policy-invalid",
        }
    }
}

fn join(errors: &[FieldError]) -> String {
    errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// Resolves the effective policy of one target.
///
/// `candidates` are every `SleepPolicy` in the cluster. A policy named by the
/// target's `policy` annotation wins regardless of selectors; otherwise the
/// matching policy with the highest priority, ties going to the name that
/// sorts first. An invalid winner is an error (a lower-priority policy does
/// not silently take over).
pub fn resolve(
    kind: TargetKind,
    namespace_labels: &BTreeMap<String, String>,
    annotations: &TargetAnnotations,
    candidates: &[Arc<Candidate>],
    defaults: &Defaults,
) -> Result<EffectivePolicy, ResolveError> {
    let (winner, tied_with) = match &annotations.policy {
        Some(name) => match candidates.iter().find(|c| &c.name == name) {
            Some(c) => (Some(c.clone()), vec![]),
            None => return Err(ResolveError::PolicyNotFound { name: name.clone() }),
        },
        None => {
            let mut matching: Vec<&Arc<Candidate>> =
                candidates.iter().filter(|c| c.matches(kind, namespace_labels)).collect();
            matching.sort_by(|a, b| b.priority.cmp(&a.priority).then_with(|| a.name.cmp(&b.name)));
            let tied = match matching.first() {
                Some(top) => matching
                    .iter()
                    .skip(1)
                    .filter(|c| c.priority == top.priority)
                    .map(|c| c.name.clone())
                    .collect(),
                None => vec![],
            };
            (matching.first().map(|c| (*c).clone()), tied)
        }
    };
    let policy = match &winner {
        Some(c) => match &c.parsed {
            Ok(p) => Some(p),
            Err(errors) => {
                return Err(ResolveError::PolicyInvalid { name: c.name.clone(), errors: errors.clone() });
            }
        },
        None => None,
    };

    // Layer: default, then policy (when it sets the value), then annotation.
    fn layer<T: Clone>(
        default: T,
        policy: Option<(Option<T>, &Origin)>,
        annotation: Option<(T, &'static str)>,
    ) -> Sourced<T> {
        let mut v = Sourced::default(default);
        if let Some((Some(p), origin)) = policy {
            v = Sourced { value: p, origin: origin.clone() };
        }
        if let Some((a, key)) = annotation {
            v = Sourced { value: a, origin: Origin::Annotation(key) };
        }
        v
    }
    let po = policy.map(|p| Origin::Policy(p.name.clone())).unwrap_or(Origin::Default);

    let sleep_after = layer(
        defaults.sleep_after,
        policy.map(|p| (p.sleep_after, &po)),
        annotations.sleep_after.map(|v| (v, vocab::SLEEP_AFTER)),
    );
    let annotated_schedules = match (&annotations.sleep_schedule, &annotations.wake_schedule) {
        (None, None) => None,
        (sleep, wake) => {
            let key = if sleep.is_some() { vocab::SLEEP_SCHEDULE } else { vocab::WAKE_SCHEDULE };
            Some((vec![SchedulePair { sleep: sleep.clone(), wake: wake.clone() }], key))
        }
    };
    let schedules = layer(
        Vec::new(),
        policy.map(|p| (if p.schedules.is_empty() { None } else { Some(p.schedules.clone()) }, &po)),
        annotated_schedules,
    );
    let timezone = layer(
        defaults.timezone,
        policy.map(|p| (p.timezone, &po)),
        annotations.timezone.map(|t| (t, vocab::TIMEZONE)),
    );
    let wake_on_request = layer(true, policy.map(|p| (p.wake_on_request, &po)), None);
    let wake_on_schedule = layer(true, policy.map(|p| (p.wake_on_schedule, &po)), None);
    let wake_timeout = layer(defaults.wake_timeout, policy.map(|p| (p.wake_timeout, &po)), None);
    let wake_predictive = layer(None, policy.map(|p| (p.wake_predictive.map(Some), &po)), None);
    let pricing = layer(defaults.pricing.clone(), policy.map(|p| (p.pricing.clone(), &po)), None);
    let running_jobs = layer(
        super::RunningJobs::Finish,
        policy.map(|p| (p.running_jobs, &po)),
        annotations.running_jobs.map(|v| (v, vocab::RUNNING_JOBS)),
    );
    let dry_run = layer(false, policy.map(|p| (Some(p.dry_run), &po)), None);
    let disabled = layer(false, None, annotations.disabled.then_some((true, vocab::DISABLED)));

    let mut ignore =
        Sourced { value: policy.map(|p| p.ignore.clone()).unwrap_or_default(), origin: po.clone() };
    let o = &annotations.ignore;
    for (set, key) in [
        (o.users.as_ref().map(|v| ignore.value.users = v.clone()), vocab::IGNORE_USERS),
        (o.groups.as_ref().map(|v| ignore.value.groups = v.clone()), vocab::IGNORE_GROUPS),
        (o.user_agents.as_ref().map(|v| ignore.value.user_agents = v.clone()), vocab::IGNORE_USER_AGENTS),
        (o.verbs.as_ref().map(|v| ignore.value.verbs = v.clone()), vocab::IGNORE_VERBS),
        (o.resources.as_ref().map(|v| ignore.value.resources = v.clone()), vocab::IGNORE_RESOURCES),
        (
            o.own_service_accounts.map(|ignored| ignore.value.count_own_service_accounts = !ignored),
            vocab::IGNORE_OWN_SERVICE_ACCOUNTS,
        ),
    ] {
        if set.is_some() {
            ignore.origin = Origin::Annotation(key);
        }
    }

    Ok(EffectivePolicy {
        policy: policy.map(|p| p.name.clone()),
        tied_with,
        sleep_after,
        schedules,
        timezone,
        wake_on_request,
        wake_on_schedule,
        wake_timeout,
        wake_predictive,
        ignore,
        exclude: policy.and_then(|p| p.exclude.clone()),
        pricing,
        running_jobs,
        dry_run,
        disabled,
        delete_after: policy.and_then(|p| p.delete_after),
        platform_annotations: policy.is_some_and(|p| p.platform_annotations),
    })
}
