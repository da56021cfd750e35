//! Policies: the `SleepPolicy` resource, dormant's annotations, schedules,
//! ignore rules, resolution into an effective policy per target, and the
//! pure decision that maps (target, policy, activity, time) to a desired
//! state, a reason and the next deadline. Nothing here does I/O.

pub mod annotations;
pub mod crd;
pub mod decide;
pub mod duration;
pub mod ignore;
pub mod lint;
pub mod loft;
pub mod resolve;
pub mod schedule;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono_tz::Tz;
use kube::ResourceExt;
use kube::core::Selector;

pub use crd::{RunningJobs, SleepPolicy, SleepPolicySpec, SleepPolicyStatus};
use duration::SleepAfter;
use ignore::{IgnoreRules, ResourceRule};
pub use resolve::{Candidate, Defaults, EffectivePolicy, Origin, ResolveError, Sourced, TargetKind, resolve};
use schedule::{Schedule, SchedulePair};

/// One invalid field of a policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// The path of the field, e.g. `spec.schedules[0].sleep`.
    pub field: String,
    pub message: String,
}

/// What running costs, for the savings figures.
#[derive(Debug, Clone, PartialEq)]
pub struct Pricing {
    pub cpu_core_hour: f64,
    pub memory_gib_hour: f64,
    pub currency: String,
}

impl Default for Pricing {
    /// Roughly a general-purpose on-demand cloud VM's list price.
    fn default() -> Self {
        Pricing { cpu_core_hour: 0.0316, memory_gib_hour: 0.0042, currency: "USD".into() }
    }
}

/// Predictive pre-wake (`wake.predictive`): wake `lead` before a target's
/// predicted first use of the day when at least `confidence` of the recent
/// such days had one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Predictive {
    pub lead: Duration,
    pub confidence: f64,
}

impl Predictive {
    pub const DEFAULT_LEAD: Duration = Duration::from_secs(10 * 60);
    pub const DEFAULT_CONFIDENCE: f64 = 0.8;
    /// Longer leads are refused: a pre-wake never reaches into the day before.
    pub const MAX_LEAD: Duration = Duration::from_secs(12 * 3600);
}

impl Default for Predictive {
    fn default() -> Self {
        Predictive { lead: Self::DEFAULT_LEAD, confidence: Self::DEFAULT_CONFIDENCE }
    }
}

/// A validated `SleepPolicy`: every string read, every value checked.
#[derive(Debug, Clone)]
pub struct Policy {
    pub name: String,
    pub priority: i32,
    pub sleep_after: Option<SleepAfter>,
    pub schedules: Vec<SchedulePair>,
    pub timezone: Option<Tz>,
    pub wake_on_request: Option<bool>,
    pub wake_on_schedule: Option<bool>,
    pub wake_timeout: Option<Duration>,
    pub wake_predictive: Option<Predictive>,
    pub ignore: IgnoreRules,
    pub exclude: Option<Selector>,
    pub pricing: Option<Pricing>,
    pub running_jobs: Option<RunningJobs>,
    pub dry_run: bool,
    pub delete_after: Option<DeleteAfter>,
    /// `vclusterPlatformAnnotations`.
    pub platform_annotations: bool,
}

/// A policy's `deleteAfter` and its warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeleteAfter {
    /// Asleep this long, a target is deleted.
    pub after: Duration,
    /// Warned this long before; never deleted sooner after the warning.
    pub warning: Duration,
}

/// `deleteWarning` when a policy does not say.
pub const DEFAULT_DELETE_WARNING: Duration = Duration::from_secs(24 * 3600);

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SleepPolicy {}", self.name)
    }
}

impl Policy {
    /// Reads and checks a `SleepPolicy`; returns every problem at once.
    pub fn from_resource(p: &SleepPolicy) -> Result<Policy, Vec<FieldError>> {
        Self::from_spec(&p.name_any(), &p.spec)
    }

    pub fn from_spec(name: &str, spec: &SleepPolicySpec) -> Result<Policy, Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut fail = |field: String, message: String| errors.push(FieldError { field, message });

        let sleep_after = spec.sleep_after.as_deref().and_then(|s| {
            s.parse::<SleepAfter>().map_err(|e| fail("spec.sleepAfter".into(), e.to_string())).ok()
        });
        let mut schedules = Vec::new();
        for (i, s) in spec.schedules.iter().enumerate() {
            let mut read = |field: &str, text: &Option<String>| {
                text.as_deref().and_then(|t| {
                    t.parse::<Schedule>()
                        .map_err(|e| fail(format!("spec.schedules[{i}].{field}"), e.to_string()))
                        .ok()
                })
            };
            let sleep = read("sleep", &s.sleep);
            let wake = read("wake", &s.wake);
            if s.sleep.is_none() && s.wake.is_none() {
                fail(format!("spec.schedules[{i}]"), "needs a sleep or a wake schedule (or both)".into());
            }
            if let (Some(a), Some(b)) = (&s.sleep, &s.wake)
                && a.split_whitespace().eq(b.split_whitespace())
            {
                fail(format!("spec.schedules[{i}]"), "sleep and wake are the same schedule".into());
            }
            schedules.push(SchedulePair { sleep, wake });
        }
        let timezone = spec.timezone.as_deref().and_then(|tz| {
            schedule::parse_timezone(tz).map_err(|e| fail("spec.timezone".into(), e.to_string())).ok()
        });
        let wake = spec.wake.clone().unwrap_or_default();
        let wake_timeout = wake.timeout.as_deref().and_then(|t| match duration::parse(t) {
            Ok(d) if d.is_zero() => {
                fail("spec.wake.timeout".into(), "must be longer than 0s".into());
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                fail("spec.wake.timeout".into(), e.to_string());
                None
            }
        });
        let wake_predictive = wake.predictive.as_ref().map(|p| {
            let lead = p.lead.as_deref().map_or(Ok(Predictive::DEFAULT_LEAD), duration::parse);
            let lead = match lead {
                Ok(d) if d.is_zero() => {
                    fail("spec.wake.predictive.lead".into(), "must be longer than 0s".into());
                    Predictive::DEFAULT_LEAD
                }
                Ok(d) if d > Predictive::MAX_LEAD => {
                    fail("spec.wake.predictive.lead".into(), "must be at most 12h".into());
                    Predictive::DEFAULT_LEAD
                }
                Ok(d) => d,
                Err(e) => {
                    fail("spec.wake.predictive.lead".into(), e.to_string());
                    Predictive::DEFAULT_LEAD
                }
            };
            let confidence = p.confidence.unwrap_or(Predictive::DEFAULT_CONFIDENCE);
            if !(confidence.is_finite() && confidence > 0.0 && confidence <= 1.0) {
                fail(
                    "spec.wake.predictive.confidence".into(),
                    format!("must be more than 0 and at most 1, not {confidence}"),
                );
            }
            Predictive { lead, confidence }
        });
        let delete_after = spec.delete_after.as_deref().and_then(|t| match duration::parse(t) {
            Ok(d) if d.is_zero() => None,
            Ok(d) => Some(d),
            Err(e) => {
                fail("spec.deleteAfter".into(), e.to_string());
                None
            }
        });
        let delete_warning = match spec.delete_warning.as_deref().map(duration::parse) {
            None => DEFAULT_DELETE_WARNING,
            Some(Ok(d)) if d.is_zero() => {
                fail("spec.deleteWarning".into(), "must be more than 0: a deletion is always warned".into());
                DEFAULT_DELETE_WARNING
            }
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                fail("spec.deleteWarning".into(), e.to_string());
                DEFAULT_DELETE_WARNING
            }
        };
        let delete_after = delete_after.map(|after| DeleteAfter { after, warning: delete_warning });
        let ig = spec.ignore.clone().unwrap_or_default();
        let mut resources = Vec::new();
        for (i, r) in ig.resources.iter().enumerate() {
            if r.resource.trim().is_empty() {
                fail(format!("spec.ignore.resources[{i}].resource"), "must not be empty".into());
            }
            resources.push(ResourceRule {
                group: r.group.clone(),
                resource: r.resource.clone(),
                names: r.names.clone(),
                verbs: vec![],
            });
        }
        for (list, field) in [
            (&ig.users, "users"),
            (&ig.groups, "groups"),
            (&ig.user_agents, "userAgents"),
            (&ig.verbs, "verbs"),
            (&ig.non_resource_urls, "nonResourceURLs"),
        ] {
            for (i, item) in list.iter().enumerate() {
                if item.trim().is_empty() {
                    fail(format!("spec.ignore.{field}[{i}]"), "must not be empty".into());
                }
            }
        }
        let exclude = spec
            .exclude
            .clone()
            .and_then(|s| Selector::try_from(s).map_err(|e| fail("spec.exclude".into(), e.to_string())).ok());
        let pricing = spec.pricing.as_ref().and_then(|p| {
            let mut ok = true;
            for (v, field) in [(p.cpu_core_hour, "cpuCoreHour"), (p.memory_gib_hour, "memoryGiBHour")] {
                if !v.is_finite() || v < 0.0 {
                    fail(format!("spec.pricing.{field}"), format!("must be a price of 0 or more, not {v}"));
                    ok = false;
                }
            }
            ok.then(|| Pricing {
                cpu_core_hour: p.cpu_core_hour,
                memory_gib_hour: p.memory_gib_hour,
                currency: p.currency.clone(),
            })
        });
        if let Err(e) = selector(spec) {
            fail("spec.selector.namespaceSelector".into(), e);
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Policy {
            name: name.to_string(),
            priority: spec.priority,
            sleep_after,
            schedules,
            timezone,
            wake_on_request: wake.on_request,
            wake_on_schedule: wake.on_schedule,
            wake_timeout,
            wake_predictive,
            ignore: IgnoreRules {
                users: ig.users,
                groups: ig.groups,
                user_agents: ig.user_agents,
                verbs: ig.verbs,
                resources,
                non_resource_urls: ig.non_resource_urls,
                active_connections: ig.active_connections,
                count_own_service_accounts: !ig.own_service_accounts,
            },
            exclude,
            pricing,
            running_jobs: spec.running_jobs,
            dry_run: spec.dry_run,
            delete_after,
            platform_annotations: spec.vcluster_platform_annotations,
        })
    }
}

fn selector(spec: &SleepPolicySpec) -> Result<Selector, String> {
    match spec.selector.as_ref().and_then(|s| s.namespace_selector.clone()) {
        Some(s) => Selector::try_from(s).map_err(|e| e.to_string()),
        None => Ok(Selector::default()),
    }
}

/// The resolver's view of a `SleepPolicy`.
pub fn candidate(p: &SleepPolicy) -> Arc<Candidate> {
    let kinds = match p.spec.selector.as_ref().and_then(|s| s.kinds.clone()) {
        Some(kinds) => kinds
            .iter()
            .map(|k| match k {
                crd::TargetKindSpec::Namespace => TargetKind::Namespace,
                crd::TargetKindSpec::VCluster => TargetKind::VCluster,
            })
            .collect(),
        None => vec![TargetKind::Namespace, TargetKind::VCluster],
    };
    Arc::new(Candidate {
        name: p.name_any(),
        priority: p.spec.priority,
        selector: selector(&p.spec).ok(),
        kinds,
        parsed: Policy::from_resource(p),
    })
}

#[cfg(test)]
mod tests;
