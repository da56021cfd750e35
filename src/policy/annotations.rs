//! dormant's annotations (prefix `dormant.dev/`) on targets and workloads,
//! parsed with errors that name the annotation and the bad value.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

use super::duration::SleepAfter;
use super::ignore::ResourceRule;
use super::schedule::{self, Schedule};
use crate::vocab::*;

/// One bad annotation: which, what value, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("annotation {key}={value:?}: {reason}")]
pub struct AnnotationError {
    pub key: String,
    pub value: String,
    pub reason: String,
}

/// The state dormant records on a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TargetState {
    Awake,
    Sleeping,
    Asleep,
    Waking,
}

impl TargetState {
    pub fn as_str(self) -> &'static str {
        match self {
            TargetState::Awake => "awake",
            TargetState::Sleeping => "sleeping",
            TargetState::Asleep => "asleep",
            TargetState::Waking => "waking",
        }
    }
}

impl fmt::Display for TargetState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TargetState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "awake" => Ok(TargetState::Awake),
            "sleeping" => Ok(TargetState::Sleeping),
            "asleep" => Ok(TargetState::Asleep),
            "waking" => Ok(TargetState::Waking),
            _ => Err("expected awake, sleeping, asleep or waking".into()),
        }
    }
}

/// An instant or "never", for `prevent-wakeup-until`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    Time(DateTime<Utc>),
    Never,
}

impl Until {
    /// True while `t` is before the end.
    pub fn covers(&self, t: DateTime<Utc>) -> bool {
        match self {
            Until::Time(end) => t < *end,
            Until::Never => true,
        }
    }
}

impl fmt::Display for Until {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Until::Time(t) => f.write_str(&rfc3339(*t)),
            Until::Never => f.write_str("never"),
        }
    }
}

/// RFC 3339 in UTC with millisecond precision, as dormant writes instants.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Overrides a target may carry for its ignore rules (each replaces the
/// policy's list of that kind).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IgnoreOverrides {
    pub users: Option<Vec<String>>,
    pub groups: Option<Vec<String>>,
    pub user_agents: Option<Vec<String>>,
    pub verbs: Option<Vec<String>>,
    pub resources: Option<Vec<ResourceRule>>,
    /// Whether the target's own service accounts are ignored (the policy's
    /// `ignore.ownServiceAccounts`).
    pub own_service_accounts: Option<bool>,
}

/// Everything dormant reads from a target's annotations.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TargetAnnotations {
    pub policy: Option<String>,
    pub sleep_after: Option<SleepAfter>,
    pub sleep_schedule: Option<Schedule>,
    pub wake_schedule: Option<Schedule>,
    pub timezone: Option<Tz>,
    pub disabled: bool,
    pub running_jobs: Option<super::RunningJobs>,
    /// When a forced sleep was requested (`true` reads as "at first sight":
    /// the caller supplies that instant).
    pub force_sleep: Option<ForceSleep>,
    pub prevent_wakeup_until: Option<Until>,
    pub upstream: Option<String>,
    pub ignore: IgnoreOverrides,
    pub state: Option<TargetState>,
    pub last_activity: Option<DateTime<Utc>>,
    pub last_activity_by: Option<String>,
    /// Who used the target most (`user (agent)` and a count), most first.
    pub activity_sources: Vec<(String, u64)>,
    pub asleep_since: Option<DateTime<Utc>>,
    pub first_seen: Option<DateTime<Utc>>,
    /// CPU cores and memory bytes requested by what the sleep scaled down.
    pub asleep_requests: Option<(f64, f64)>,
    /// When the proxy last asked to wake the target for a request whose
    /// credential it could not check.
    pub unverified_wake: Option<DateTime<Utc>>,
    /// The target's copy of its workloads' records (`sleep-record`); `None`
    /// when absent or unreadable (then only the workloads' own count).
    pub sleep_record: Option<BTreeMap<String, String>>,
    /// The activity profile as written (read by `crate::foresight`).
    pub activity_profile: Option<String>,
    /// Never deleted, whatever the policy's `deleteAfter` says.
    pub protect: bool,
    /// When dormant warned it would delete the target (`delete-at`).
    pub delete_at: Option<DateTime<Utc>>,
}

/// The `force-sleep` annotation: `true`, or the instant it was requested
/// (what `dormant sleep` writes, so the request survives restarts exactly).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForceSleep {
    Requested,
    Since(DateTime<Utc>),
}

fn err(key: &str, value: &str, reason: impl Into<String>) -> AnnotationError {
    AnnotationError { key: key.into(), value: value.into(), reason: reason.into() }
}

fn parse_bool(key: &str, v: &str) -> Result<bool, AnnotationError> {
    match v.trim() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(err(key, v, "expected true or false")),
    }
}

fn parse_time(key: &str, v: &str) -> Result<DateTime<Utc>, AnnotationError> {
    DateTime::parse_from_rfc3339(v.trim())
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| err(key, v, format!("expected an RFC 3339 time such as 2026-11-26T18:00:00Z ({e})")))
}

fn parse_list(key: &str, v: &str) -> Result<Vec<String>, AnnotationError> {
    let items: Vec<String> = v.split(',').map(|s| s.trim().to_string()).collect();
    if items.iter().any(String::is_empty) {
        return Err(err(key, v, "expected a comma-separated list without empty items"));
    }
    Ok(items)
}

impl TargetAnnotations {
    /// Reads every `dormant.dev/` annotation; returns all errors at once.
    /// Unknown `dormant.dev/` keys are errors too (they are usually typos).
    pub fn parse(annotations: &BTreeMap<String, String>) -> Result<Self, Vec<AnnotationError>> {
        let mut out = TargetAnnotations::default();
        let mut errors = Vec::new();
        for (key, value) in annotations {
            if !key.starts_with(PREFIX) {
                continue;
            }
            if let Err(e) = out.set(key, value) {
                errors.push(e);
            }
        }
        if errors.is_empty() { Ok(out) } else { Err(errors) }
    }

    fn set(&mut self, key: &str, v: &str) -> Result<(), AnnotationError> {
        let sched = |v: &str| v.parse::<Schedule>().map_err(|e| err(key, v, e.to_string()));
        match key {
            POLICY => {
                if v.trim().is_empty() {
                    return Err(err(key, v, "expected the name of a SleepPolicy"));
                }
                self.policy = Some(v.trim().to_string());
            }
            SLEEP_AFTER => {
                self.sleep_after = Some(v.parse::<SleepAfter>().map_err(|e| err(key, v, e.to_string()))?);
            }
            SLEEP_SCHEDULE => self.sleep_schedule = Some(sched(v)?),
            WAKE_SCHEDULE => self.wake_schedule = Some(sched(v)?),
            TIMEZONE => {
                self.timezone = Some(schedule::parse_timezone(v).map_err(|e| err(key, v, e.to_string()))?);
            }
            DISABLED => self.disabled = parse_bool(key, v)?,
            RUNNING_JOBS => {
                self.running_jobs = Some(match v.trim().to_ascii_lowercase().as_str() {
                    "finish" => super::RunningJobs::Finish,
                    "suspend" => super::RunningJobs::Suspend,
                    _ => return Err(err(key, v, "expected finish or suspend")),
                })
            }
            FORCE_SLEEP => {
                self.force_sleep = match v.trim() {
                    "true" => Some(ForceSleep::Requested),
                    "false" => None,
                    _ => Some(ForceSleep::Since(parse_time(key, v).map_err(|_| {
                        err(key, v, "expected true, false or the RFC 3339 time it was requested")
                    })?)),
                }
            }
            PREVENT_WAKEUP_UNTIL => {
                self.prevent_wakeup_until = Some(match v.trim() {
                    "never" => Until::Never,
                    _ => Until::Time(parse_time(key, v)?),
                })
            }
            UPSTREAM => {
                let uri: http::Uri = v.trim().parse().map_err(|_| err(key, v, "expected an https:// URL"))?;
                if !matches!(uri.scheme_str(), Some("https")) || uri.authority().is_none() {
                    return Err(err(key, v, "expected an https:// URL with a host"));
                }
                self.upstream = Some(v.trim().trim_end_matches('/').to_string());
            }
            IGNORE_USER_AGENTS => self.ignore.user_agents = Some(parse_list(key, v)?),
            IGNORE_USERS => self.ignore.users = Some(parse_list(key, v)?),
            IGNORE_GROUPS => self.ignore.groups = Some(parse_list(key, v)?),
            IGNORE_VERBS => self.ignore.verbs = Some(parse_list(key, v)?),
            IGNORE_RESOURCES => {
                let rules = parse_list(key, v)?
                    .iter()
                    .map(|r| ResourceRule::parse(r).map_err(|e| err(key, v, e)))
                    .collect::<Result<Vec<_>, _>>()?;
                self.ignore.resources = Some(rules);
            }
            IGNORE_OWN_SERVICE_ACCOUNTS => self.ignore.own_service_accounts = Some(parse_bool(key, v)?),
            // Read where it is used (the app-traffic listener); checked here.
            WAITING_PAGE => {
                parse_bool(key, v)?;
            }
            STATE => self.state = Some(v.parse().map_err(|e: String| err(key, v, e))?),
            LAST_ACTIVITY => self.last_activity = Some(parse_time(key, v)?),
            LAST_ACTIVITY_BY => self.last_activity_by = Some(v.to_string()),
            // A statistic dormant writes: unreadable means none yet, never a
            // reason to leave the target alone.
            ACTIVITY_SOURCES => self.activity_sources = parse_sources(v),
            ASLEEP_SINCE => self.asleep_since = Some(parse_time(key, v)?),
            FIRST_SEEN => self.first_seen = Some(parse_time(key, v)?),
            // Written by dormant's proxy: unreadable means none.
            UNVERIFIED_WAKE => self.unverified_wake = parse_time(key, v).ok(),
            // Written by dormant; a mangled copy is no copy, never a reason
            // to leave the target alone (its wake needs it most).
            SLEEP_RECORD => self.sleep_record = serde_json::from_str(v).ok(),
            // A statistic dormant writes; an unreadable one starts afresh.
            ACTIVITY_PROFILE => self.activity_profile = Some(v.to_string()),
            ASLEEP_REQUESTS => {
                self.asleep_requests = Some(
                    parse_requests(v).ok_or_else(|| err(key, v, "expected cpu=<cores>,memory=<bytes>"))?,
                )
            }
            PROTECT => self.protect = parse_bool(key, v)?,
            // Written by dormant with its warning; an unreadable one is no
            // warning (a new one is given before any deletion).
            DELETE_AT => self.delete_at = parse_time(key, v).ok(),
            // dormant's note that a deletion began (read by the deletion).
            DELETING => {}
            EXCLUDE
            | REPLICAS_BEFORE_SLEEP
            | SUSPEND_BEFORE_SLEEP
            | KEDA_PAUSED_BEFORE_SLEEP
            | KEDA_JOB_PAUSED_BEFORE_SLEEP
            | GITOPS_BEFORE_SLEEP => {
                // Workload annotations (a vcluster's control plane is both
                // its target and a workload); checked by `WorkloadAnnotations`
                // and the scaler.
            }
            _ => {
                let hint = closest_key(key).map(|k| format!("; did you mean {k}?")).unwrap_or_default();
                return Err(err(key, v, format!("unknown dormant annotation{hint}")));
            }
        }
        Ok(())
    }
}

/// How many sources `activity-sources` keeps.
pub const KEPT_SOURCES: usize = 5;

/// `{"alice (kubectl)": 42, …}` as (source, count), most first; empty when
/// unreadable.
pub fn parse_sources(v: &str) -> Vec<(String, u64)> {
    let map: BTreeMap<String, u64> = serde_json::from_str(v).unwrap_or_default();
    top_sources(map)
}

/// The [`KEPT_SOURCES`] largest counts, most first (ties by name).
pub fn top_sources(counts: impl IntoIterator<Item = (String, u64)>) -> Vec<(String, u64)> {
    let mut v: Vec<_> = counts.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v.truncate(KEPT_SOURCES);
    v
}

/// The `activity-sources` value for (source, count) pairs.
pub fn format_sources(sources: &[(String, u64)]) -> String {
    let map: serde_json::Map<String, serde_json::Value> =
        sources.iter().map(|(k, n)| (k.clone(), serde_json::Value::from(*n))).collect();
    serde_json::Value::Object(map).to_string()
}

/// `cpu=1.5,memory=1073741824` as (cores, bytes).
pub fn parse_requests(v: &str) -> Option<(f64, f64)> {
    let (mut cpu, mut mem) = (None, None);
    for part in v.split(',') {
        match part.trim().split_once('=')? {
            ("cpu", n) => cpu = n.parse::<f64>().ok().filter(|n| n.is_finite() && *n >= 0.0),
            ("memory", n) => mem = n.parse::<f64>().ok().filter(|n| n.is_finite() && *n >= 0.0),
            _ => return None,
        }
    }
    Some((cpu?, mem?))
}

/// At the precision Kubernetes keeps (millicores, bytes): a sum of
/// requests such as 0.1 + 0.2 cores is written `0.3`, not
/// `0.30000000000000004`. A sum too large to scale to millicores (requests are the tenant's to
/// write) is written as it is, not as `inf`.
pub fn format_requests(cpu_cores: f64, memory_bytes: f64) -> String {
    let rounded = (cpu_cores * 1000.0).round() / 1000.0;
    let cpu = if rounded.is_finite() { rounded } else { cpu_cores };
    format!("cpu={cpu},memory={}", memory_bytes.round())
}

/// The known key nearest to a misspelt one (edit distance ≤ 3).
fn closest_key(key: &str) -> Option<&'static str> {
    fn distance(a: &str, b: &str) -> usize {
        let b: Vec<char> = b.chars().collect();
        let mut prev: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut cur = vec![i + 1];
            for (j, cb) in b.iter().enumerate() {
                cur.push((prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1));
            }
            prev = cur;
        }
        prev[b.len()]
    }
    TARGET_KEYS.iter().map(|k| (distance(key, k), *k)).filter(|(d, _)| *d <= 3).min().map(|(_, k)| k)
}

/// What dormant reads from a workload's annotations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkloadAnnotations {
    pub exclude: bool,
    pub replicas_before_sleep: Option<i32>,
    pub suspend_before_sleep: Option<bool>,
}

impl WorkloadAnnotations {
    pub fn parse(annotations: &BTreeMap<String, String>) -> Result<Self, Vec<AnnotationError>> {
        let mut out = WorkloadAnnotations::default();
        let mut errors = Vec::new();
        for (key, v) in annotations {
            let r = match key.as_str() {
                EXCLUDE => parse_bool(key, v).map(|b| out.exclude = b),
                REPLICAS_BEFORE_SLEEP => match v.trim().parse::<i32>() {
                    Ok(n) if n >= 0 => {
                        out.replicas_before_sleep = Some(n);
                        Ok(())
                    }
                    _ => Err(err(key, v, "expected a replica count (a whole number, 0 or more)")),
                },
                SUSPEND_BEFORE_SLEEP => parse_bool(key, v).map(|b| out.suspend_before_sleep = Some(b)),
                _ => Ok(()),
            };
            if let Err(e) = r {
                errors.push(e);
            }
        }
        if errors.is_empty() { Ok(out) } else { Err(errors) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_vcluster_control_planes_gitops_record_and_the_delete_after_keys_are_known() {
        // A vcluster's StatefulSet is its target and a workload Flux may
        // manage: the record dormant writes on it must not make it invalid.
        let a = TargetAnnotations::parse(&map(&[
            (GITOPS_BEFORE_SLEEP, r#"{"kustomize.toolkit.fluxcd.io/reconcile":null}"#),
            (PROTECT, "true"),
            (DELETE_AT, "2026-12-09T10:00:00Z"),
        ]))
        .unwrap();
        assert!(a.protect);
        assert_eq!(a.delete_at.map(rfc3339), Some("2026-12-09T10:00:00.000Z".into()));
        let a = TargetAnnotations::parse(&map(&[(DELETE_AT, "soon")])).unwrap();
        assert_eq!(a.delete_at, None, "an unreadable warning is no warning: a new one comes first");
        assert!(TargetAnnotations::parse(&map(&[(PROTECT, "yes")])).is_err());
    }

    #[test]
    fn a_mangled_sleep_record_is_no_copy_and_never_makes_the_target_invalid() {
        for v in ["{not json", "[1,2]", "{\"Deployment/web\": 3}", ""] {
            let a = TargetAnnotations::parse(&map(&[(SLEEP_RECORD, v)])).unwrap();
            assert_eq!(a.sleep_record, None, "{v:?}");
        }
        let a = TargetAnnotations::parse(&map(&[(SLEEP_RECORD, "{\"Deployment/web\": \"3\"}")])).unwrap();
        assert_eq!(a.sleep_record.unwrap().get("Deployment/web").map(String::as_str), Some("3"));
    }

    #[test]
    fn activity_sources_round_trip_keep_the_top_and_never_fail() {
        let counts = (1..=8).map(|n| (format!("user{n} (kubectl)"), n)).collect::<Vec<_>>();
        let top = top_sources(counts);
        assert_eq!(top.len(), KEPT_SOURCES);
        assert_eq!(top[0], ("user8 (kubectl)".to_string(), 8));
        assert_eq!(parse_sources(&format_sources(&top)), top);
        let a = TargetAnnotations::parse(&map(&[(ACTIVITY_SOURCES, "{not json")])).unwrap();
        assert!(a.activity_sources.is_empty(), "unreadable is none, not an error");
    }

    #[test]
    fn reads_every_target_annotation() {
        let a = TargetAnnotations::parse(&map(&[
            (POLICY, "office-hours"),
            (SLEEP_AFTER, "45m"),
            (SLEEP_SCHEDULE, "0 20 * * *"),
            (WAKE_SCHEDULE, "0 7 * * 1-5"),
            (TIMEZONE, "Europe/Berlin"),
            (DISABLED, "false"),
            (RUNNING_JOBS, "Suspend"),
            (FORCE_SLEEP, "2026-11-26T18:00:00Z"),
            (PREVENT_WAKEUP_UNTIL, "never"),
            (UPSTREAM, "https://127.0.0.1:6443/"),
            (IGNORE_USER_AGENTS, "argocd*, flux*"),
            (IGNORE_RESOURCES, "configmaps,leases.coordination.k8s.io"),
            (IGNORE_OWN_SERVICE_ACCOUNTS, "false"),
            (STATE, "asleep"),
            (LAST_ACTIVITY, "2026-11-26T17:00:00Z"),
            // Dormant's own statistic, whatever it holds: never a typo.
            (ACTIVITY_PROFILE, "v1;garbled"),
            ("app.kubernetes.io/name", "not ours"),
        ]))
        .unwrap();
        assert_eq!(a.policy.as_deref(), Some("office-hours"));
        assert_eq!(a.sleep_after, Some(SleepAfter::After(std::time::Duration::from_secs(2700))));
        assert_eq!(a.timezone, Some(chrono_tz::Europe::Berlin));
        assert_eq!(a.running_jobs, Some(super::super::RunningJobs::Suspend));
        assert!(matches!(a.force_sleep, Some(ForceSleep::Since(_))));
        assert_eq!(a.prevent_wakeup_until, Some(Until::Never));
        assert_eq!(a.upstream.as_deref(), Some("https://127.0.0.1:6443"));
        assert_eq!(a.ignore.user_agents, Some(vec!["argocd*".to_string(), "flux*".to_string()]));
        assert_eq!(a.ignore.resources.as_ref().map(Vec::len), Some(2));
        assert_eq!(a.ignore.own_service_accounts, Some(false));
        assert_eq!(a.state, Some(TargetState::Asleep));
        assert_eq!(a.activity_profile.as_deref(), Some("v1;garbled"));
    }

    #[test]
    fn every_bad_value_is_reported_with_its_annotation_and_value() {
        let table = [
            (SLEEP_AFTER, "-5m", "expected a whole number with a unit"),
            (SLEEP_AFTER, "soon", "expected a whole number with a unit"),
            (SLEEP_SCHEDULE, "0 0 19 * * 1-5", "exactly 5 are expected"),
            (WAKE_SCHEDULE, "0 99 * * *", "invalid schedule"),
            (TIMEZONE, "Mars/Olympus", "unknown time zone"),
            (DISABLED, "yes", "expected true or false"),
            (RUNNING_JOBS, "kill", "expected finish or suspend"),
            (FORCE_SLEEP, "now", "expected true, false or the RFC 3339 time"),
            (PREVENT_WAKEUP_UNTIL, "tomorrow", "RFC 3339"),
            (UPSTREAM, "http://vc.example", "https://"),
            (IGNORE_USERS, "alice,,bob", "without empty items"),
            (IGNORE_RESOURCES, ".apps", "resource[/subresource][.group]"),
            (IGNORE_OWN_SERVICE_ACCOUNTS, "no", "expected true or false"),
            (STATE, "dozing", "expected awake, sleeping, asleep or waking"),
            (LAST_ACTIVITY, "yesterday", "RFC 3339"),
            (POLICY, " ", "name of a SleepPolicy"),
            ("dormant.dev/sleep-afer", "30m", "did you mean dormant.dev/sleep-after?"),
            ("dormant.dev/frobnicate", "1", "unknown dormant annotation"),
        ];
        for (key, value, needle) in table {
            let errors = TargetAnnotations::parse(&map(&[(key, value)])).unwrap_err();
            assert_eq!(errors.len(), 1, "{key}={value}");
            let msg = errors[0].to_string();
            assert!(msg.contains(key) && msg.contains(&format!("{value:?}")), "{msg}");
            assert!(msg.contains(needle), "{key}={value}: {msg}");
        }
    }

    #[test]
    fn all_errors_are_reported_at_once() {
        let errors = TargetAnnotations::parse(&map(&[(SLEEP_AFTER, "x"), (TIMEZONE, "y"), (DISABLED, "z")]))
            .unwrap_err();
        assert_eq!(errors.len(), 3);
    }

    #[test]
    fn workload_annotations() {
        let w = WorkloadAnnotations::parse(&map(&[(EXCLUDE, "true"), (REPLICAS_BEFORE_SLEEP, "3")])).unwrap();
        assert!(w.exclude);
        assert_eq!(w.replicas_before_sleep, Some(3));
        for (k, v) in
            [(REPLICAS_BEFORE_SLEEP, "-1"), (REPLICAS_BEFORE_SLEEP, "three"), (SUSPEND_BEFORE_SLEEP, "1")]
        {
            let e = WorkloadAnnotations::parse(&map(&[(k, v)])).unwrap_err();
            assert!(e[0].to_string().contains(k), "{}", e[0]);
        }
    }

    #[test]
    fn requests_are_written_at_kubernetes_precision_and_read_back() {
        let text = format_requests(0.1 + 0.2, 335_544_320.4);
        assert_eq!(text, "cpu=0.3,memory=335544320");
        assert_eq!(parse_requests(&text), Some((0.3, 335_544_320.0)));
        assert_eq!(format_requests(0.0004, 0.0), "cpu=0,memory=0");
        assert_eq!(parse_requests(&format_requests(12.3456, 1e12)), Some((12.346, 1e12)));
        // A hostile request as large as a quantity can spell still reads back.
        assert_eq!(parse_requests(&format_requests(1e307, 1e307)), Some((1e307, 1e307)));
    }
}
