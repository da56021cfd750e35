//! vCluster Platform's sleep settings, read so a team's existing
//! configuration works unchanged with dormant: the `sleepmode.loft.sh/*`
//! annotations (on a namespace, a vcluster's StatefulSet/Deployment, a
//! workload) and the sleep sections of a vcluster's own `vcluster.yaml`.
//! Both become an [`Overlay`] that sits UNDER dormant's own annotations
//! (`dormant.dev/*` wins, field by field) and remembers where each value
//! came from, so `explain` can name `annotation sleepmode.loft.sh/...` or
//! `vcluster.yaml sleepMode.autoSleep.afterInactivity`. [`plan_migration`]
//! turns the same settings into the equivalent `dormant.dev/*` annotations
//! and says what has no equivalent. The formats and their sources are in
//! `docs/vcluster-platform-formats.md`. Nothing here does I/O.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde_yaml::Value;

use super::annotations::{self as ann, AnnotationError, ForceSleep, TargetAnnotations, TargetState, Until};
use super::duration::{self, SleepAfter};
use super::ignore::ResourceRule;
use super::resolve::{EffectivePolicy, Origin, Sourced};
use super::schedule::{self, Schedule};
use crate::vocab;

pub const PREFIX: &str = "sleepmode.loft.sh/";

// Settings the Platform reads on a namespace (a "space") or a vcluster
// (agentapi `pkg/apis/loft/cluster/v1/sleepmodeconfig_types.go`).
/// Seconds of inactivity before sleeping (`3600`); the CLI writes
/// `strconv.FormatInt(seconds, 10)`.
pub const SLEEP_AFTER: &str = "sleepmode.loft.sh/sleep-after";
/// Seconds of inactivity before the Platform deletes the space.
pub const DELETE_AFTER: &str = "sleepmode.loft.sh/delete-after";
/// Cron (the time zone inside the string is ignored: `timezone` applies).
pub const SLEEP_SCHEDULE: &str = "sleepmode.loft.sh/sleep-schedule";
pub const WAKEUP_SCHEDULE: &str = "sleepmode.loft.sh/wakeup-schedule";
/// An IANA name, or `zone#offset` as the CLI writes it
/// (`zone, offset := time.Now().Zone()`: `CET#3600`).
pub const TIMEZONE: &str = "sleepmode.loft.sh/timezone";
/// `true`: sleep now (the CLI's `sleep`/`pause`).
pub const FORCE: &str = "sleepmode.loft.sh/force";
/// Seconds during which only a manual wake wakes it; `0`: until then.
pub const FORCE_DURATION: &str = "sleepmode.loft.sh/force-duration";
pub const IGNORE_ALL: &str = "sleepmode.loft.sh/ignore-all";
pub const IGNORE_INGRESSES: &str = "sleepmode.loft.sh/ignore-ingresses";
pub const IGNORE_GROUPS: &str = "sleepmode.loft.sh/ignore-groups";
pub const IGNORE_VCLUSTERS: &str = "sleepmode.loft.sh/ignore-vclusters";
pub const IGNORE_RESOURCES: &str = "sleepmode.loft.sh/ignore-resources";
pub const IGNORE_VERBS: &str = "sleepmode.loft.sh/ignore-verbs";
/// `myresource.mygroup=create update delete, myresource2.mygroup=create update`.
pub const IGNORE_RESOURCE_VERBS: &str = "sleepmode.loft.sh/ignore-resource-verbs";
/// `myresource.mygroup=name1 name2,myotherresource.mygroup=name1`.
pub const IGNORE_RESOURCE_NAMES: &str = "sleepmode.loft.sh/ignore-resource-names";
pub const IGNORE_ACTIVE_CONNECTIONS: &str = "sleepmode.loft.sh/ignore-active-connections";
/// `useragent1,useragentprefix/*,*`.
pub const IGNORE_USER_AGENTS: &str = "sleepmode.loft.sh/ignore-user-agents";
pub const DISABLE_INGRESS_WAKEUP: &str = "sleepmode.loft.sh/disable-ingress-wakeup";
pub const DISABLE_METRICS_TRACKING: &str = "sleepmode.loft.sh/disable-metrics-tracking";
/// On a VirtualClusterInstance: `workloads-only`.
pub const SCOPE: &str = "sleepmode.loft.sh/scope";
/// On a workload: `true` keeps it running while its target sleeps.
pub const EXCLUDE: &str = "sleepmode.loft.sh/exclude";

// Written by the Platform (and by vCluster's native sleep mode on the
// `vc-config-<name>` Secret). Instants are Unix seconds.
pub const LAST_ACTIVITY: &str = "sleepmode.loft.sh/last-activity";
pub const LAST_ACTIVITY_INFO: &str = "sleepmode.loft.sh/last-activity-info";
pub const SLEEPING_SINCE: &str = "sleepmode.loft.sh/sleeping-since";
pub const CURRENT_EPOCH_START: &str = "sleepmode.loft.sh/current-epoch-start";
pub const CURRENT_EPOCH_SLEPT: &str = "sleepmode.loft.sh/current-epoch-slept";
pub const LAST_EPOCH_START: &str = "sleepmode.loft.sh/last-epoch-start";
pub const LAST_EPOCH_SLEPT: &str = "sleepmode.loft.sh/last-epoch-slept";
pub const SCHEDULED_SLEEP: &str = "sleepmode.loft.sh/scheduled-sleep";
pub const SCHEDULED_WAKEUP: &str = "sleepmode.loft.sh/scheduled-wakeup";
/// `inactivitySleep`, `forcedSleep`, `forcedDurationSleep`, `scheduledSleep`.
pub const SLEEP_TYPE: &str = "sleepmode.loft.sh/sleep-type";

/// Every key above, for "did you mean" hints.
const KNOWN_KEYS: &[&str] = &[
    SLEEP_AFTER,
    DELETE_AFTER,
    SLEEP_SCHEDULE,
    WAKEUP_SCHEDULE,
    TIMEZONE,
    FORCE,
    FORCE_DURATION,
    IGNORE_ALL,
    IGNORE_INGRESSES,
    IGNORE_GROUPS,
    IGNORE_VCLUSTERS,
    IGNORE_RESOURCES,
    IGNORE_VERBS,
    IGNORE_RESOURCE_VERBS,
    IGNORE_RESOURCE_NAMES,
    IGNORE_ACTIVE_CONNECTIONS,
    IGNORE_USER_AGENTS,
    DISABLE_INGRESS_WAKEUP,
    DISABLE_METRICS_TRACKING,
    SCOPE,
    EXCLUDE,
    LAST_ACTIVITY,
    LAST_ACTIVITY_INFO,
    SLEEPING_SINCE,
    CURRENT_EPOCH_START,
    CURRENT_EPOCH_SLEPT,
    LAST_EPOCH_START,
    LAST_EPOCH_SLEPT,
    SCHEDULED_SLEEP,
    SCHEDULED_WAKEUP,
    SLEEP_TYPE,
];

/// Durations longer than this are refused, as dormant's own are.
const MAX_SECONDS: u64 = 10 * 365 * 86_400;

/// A bad `vcluster.yaml` sleep setting: which field, what value, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("vcluster.yaml {field}={value:?}: {reason}")]
pub struct ConfigError {
    /// The path of the field, e.g. `sleepMode.autoSleep.afterInactivity`.
    pub field: String,
    pub value: String,
    pub reason: String,
}

/// Why vCluster Platform settings could not be read; the target is left
/// alone, as for a bad `dormant.dev/*` annotation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("invalid vCluster Platform annotations: {}", join(.0))]
    Annotations(Vec<AnnotationError>),
    #[error("invalid vcluster.yaml sleep settings: {}", join(.0))]
    Config(Vec<ConfigError>),
}

impl Error {
    /// Short, stable category (metric label, Event reason).
    pub fn category(&self) -> &'static str {
        match self {
            Error::Annotations(_) => "loft-annotation-invalid",
            Error::Config(_) => "vcluster-config-invalid",
        }
    }
}

fn join<E: ToString>(errors: &[E]) -> String {
    errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// Something read that dormant does not act on (no equivalent, or a
/// Platform status value), said by `explain`, `policy lint` (as a warning)
/// and `dormant migrate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// `annotation sleepmode.loft.sh/ignore-ingresses`, `vcluster.yaml …`.
    pub source: String,
    pub value: String,
    pub message: String,
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={:?}: {}", self.source, self.value, self.message)
    }
}

/// How long only a manual wake may wake a force-slept target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prevent {
    /// `force-duration: 0`: until someone wakes it by hand.
    Never,
    /// `force-duration: N`: N seconds from when it fell asleep.
    For(Duration),
}

/// A forced sleep (`force: true`, or a `force-duration`, which implies it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Force {
    pub prevent: Option<Prevent>,
}

/// What the Platform recorded about a target's sleep.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlatformStatus {
    /// The Platform (or vCluster's native sleep mode) put it to sleep then.
    pub sleeping_since: Option<DateTime<Utc>>,
    pub last_activity: Option<DateTime<Utc>>,
}

/// Ignore rules read from vCluster Platform settings; each replaces the
/// policy's list of that kind, as dormant's own `ignore-*` annotations do.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IgnoreOverlay {
    /// From `ignore-all: "true"` (every user: `*`).
    pub users: Option<Sourced<Vec<String>>>,
    pub groups: Option<Sourced<Vec<String>>>,
    pub user_agents: Option<Sourced<Vec<String>>>,
    pub verbs: Option<Sourced<Vec<String>>>,
    /// `ignore-resources`, `ignore-resource-verbs` and `ignore-resource-names`
    /// together.
    pub resources: Option<Sourced<Vec<ResourceRule>>>,
    pub active_connections: Option<Sourced<bool>>,
}

/// vCluster Platform settings of one target, with where each came from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overlay {
    pub sleep_after: Option<Sourced<SleepAfter>>,
    pub sleep_schedule: Option<Sourced<Schedule>>,
    pub wake_schedule: Option<Sourced<Schedule>>,
    pub timezone: Option<Sourced<Tz>>,
    pub force: Option<Sourced<Force>>,
    /// Read, never acted on by itself: dormant deletes only when a
    /// `SleepPolicy`'s `deleteAfter` says so.
    pub delete_after: Option<Sourced<Duration>>,
    pub ignore: IgnoreOverlay,
    /// `vcluster.yaml` exclusion labels: workloads INSIDE the vcluster. dormant
    /// sleeps a vcluster whole, so they cannot stay up (a [`Note`] says so).
    pub exclude_labels: Option<Sourced<BTreeMap<String, String>>>,
    pub status: PlatformStatus,
    pub notes: Vec<Note>,
}

impl Overlay {
    /// `self` over `lower`, field by field (annotations over `vcluster.yaml`:
    /// `annotations.over(yaml)`).
    pub fn over(self, lower: Overlay) -> Overlay {
        let mut notes = self.notes;
        notes.extend(lower.notes);
        Overlay {
            sleep_after: self.sleep_after.or(lower.sleep_after),
            sleep_schedule: self.sleep_schedule.or(lower.sleep_schedule),
            wake_schedule: self.wake_schedule.or(lower.wake_schedule),
            timezone: self.timezone.or(lower.timezone),
            force: self.force.or(lower.force),
            delete_after: self.delete_after.or(lower.delete_after),
            ignore: IgnoreOverlay {
                users: self.ignore.users.or(lower.ignore.users),
                groups: self.ignore.groups.or(lower.ignore.groups),
                user_agents: self.ignore.user_agents.or(lower.ignore.user_agents),
                verbs: self.ignore.verbs.or(lower.ignore.verbs),
                resources: self.ignore.resources.or(lower.ignore.resources),
                active_connections: self.ignore.active_connections.or(lower.ignore.active_connections),
            },
            exclude_labels: self.exclude_labels.or(lower.exclude_labels),
            status: PlatformStatus {
                sleeping_since: self.status.sleeping_since.or(lower.status.sleeping_since),
                last_activity: self.status.last_activity.or(lower.status.last_activity),
            },
            notes,
        }
    }

    /// True when nothing was read.
    pub fn is_empty(&self) -> bool {
        *self == Overlay::default()
    }
}

fn sourced<T>(value: T, origin: Origin) -> Sourced<T> {
    Sourced { value, origin }
}

// ---------------------------------------------------------------------------
// Value formats shared by the annotations and vcluster.yaml.

/// Whole seconds, as the Platform writes `sleep-after`, `delete-after`,
/// `force-duration` and `external.platform.autoSleep.afterInactivity`.
fn parse_seconds(v: &str) -> Result<Duration, String> {
    let n: u64 = v.trim().parse().map_err(|_| {
        "expected a whole number of seconds such as 3600 (vCluster Platform writes seconds)".to_string()
    })?;
    if n > MAX_SECONDS {
        return Err("it is longer than ten years".into());
    }
    Ok(Duration::from_secs(n))
}

fn sleep_after_from(d: Duration) -> SleepAfter {
    if d.is_zero() { SleepAfter::Never } else { SleepAfter::After(d) }
}

fn parse_bool(v: &str) -> Result<bool, String> {
    match v.trim() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err("expected true or false".into()),
    }
}

/// A comma-separated list; blank items are skipped (the Platform splits on
/// commas and trims). `None` when nothing is left.
fn parse_list(v: &str) -> Option<Vec<String>> {
    let items: Vec<String> =
        v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
    (!items.is_empty()).then_some(items)
}

/// A cron schedule as the Platform reads it: five fields or an `@daily`
/// alias, optionally prefixed with `CRON_TZ=<zone>` or `TZ=<zone>`, which the
/// Platform ignores ("timezone defined in the schedule string will be
/// ignored"), and so does dormant. Returns the schedule and whether a zone
/// prefix was dropped.
pub fn parse_schedule(v: &str) -> Result<(Schedule, bool), String> {
    let text = v.trim();
    let (rest, dropped) = match text.split_once(char::is_whitespace) {
        Some((first, rest)) if first.starts_with("CRON_TZ=") || first.starts_with("TZ=") => {
            (rest.trim(), true)
        }
        _ => (text, false),
    };
    if rest.starts_with("@every") {
        return Err("@every intervals are not read by dormant; write a 5-field cron schedule".into());
    }
    let schedule = rest.parse::<Schedule>().map_err(|e| e.to_string())?;
    Ok((schedule, dropped))
}

/// Zones whose UTC offset is fixed and not a whole number of hours (the
/// `Etc/GMT±N` zones cover whole hours); a test checks each is constant.
const FIXED_HALF_HOUR_ZONES: &[(i32, &str)] = &[
    (-34_200, "Pacific/Marquesas"),
    (12_600, "Asia/Tehran"),
    (16_200, "Asia/Kabul"),
    (19_800, "Asia/Kolkata"),
    (20_700, "Asia/Kathmandu"),
    (23_400, "Asia/Yangon"),
    (31_500, "Australia/Eucla"),
    (34_200, "Australia/Darwin"),
];

/// The IANA zone that is always `offset` seconds east of UTC.
fn fixed_offset_zone(offset: i32) -> Option<Tz> {
    if offset == 0 {
        return Some(chrono_tz::UTC);
    }
    if offset % 3600 == 0 && (-12..=14).contains(&(offset / 3600)) {
        // POSIX-style names: Etc/GMT-1 is one hour EAST of UTC.
        let hours = offset / 3600;
        let name = if hours > 0 { format!("Etc/GMT-{hours}") } else { format!("Etc/GMT+{}", -hours) };
        return name.parse().ok();
    }
    FIXED_HALF_HOUR_ZONES.iter().find(|(o, _)| *o == offset).and_then(|(_, name)| name.parse().ok())
}

fn format_offset(offset: i32) -> String {
    let sign = if offset < 0 { '-' } else { '+' };
    let a = offset.unsigned_abs();
    let (h, m, s) = (a / 3600, (a % 3600) / 60, a % 60);
    if s == 0 { format!("{sign}{h:02}:{m:02}") } else { format!("{sign}{h:02}:{m:02}:{s:02}") }
}

/// An IANA name (`Europe/Berlin`), or the `zone#offset` form the Platform's
/// CLI writes (`CET#3600`: the local zone's abbreviation and its offset in
/// seconds east of UTC at the moment the CLI ran). For the latter the
/// offset is what counts — the abbreviation is ambiguous (`IST`) and
/// mostly not an IANA name (`CEST`, `PST`) — so it reads as a zone fixed
/// at that offset, without daylight-saving changes.
pub fn parse_timezone(v: &str) -> Result<Tz, String> {
    match v.trim().rsplit_once('#') {
        Some((_, offset)) => {
            let seconds: i32 = offset.trim().parse().map_err(|_| {
                "expected an IANA time zone such as Europe/Berlin, or zone#offset-in-seconds such as CET#3600"
                    .to_string()
            })?;
            fixed_offset_zone(seconds).ok_or_else(|| {
                format!(
                    "no time zone is fixed at UTC{}; set {} to an IANA name such as Europe/Berlin",
                    format_offset(seconds),
                    vocab::TIMEZONE
                )
            })
        }
        None => schedule::parse_timezone(v).map_err(|e| e.to_string()),
    }
}

/// `resource[.group]=item item, …` (the Platform's `ignore-resource-verbs`
/// and `ignore-resource-names`).
fn parse_resource_items(v: &str) -> Result<Vec<(ResourceRule, Vec<String>)>, String> {
    let mut out = Vec::new();
    for entry in v.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (resource, items) =
            entry.split_once('=').ok_or_else(|| format!("{entry:?}: expected resource.group=item item …"))?;
        let rule = ResourceRule::parse(resource)?;
        let items: Vec<String> = items.split_whitespace().map(String::from).collect();
        if items.is_empty() {
            return Err(format!("{entry:?}: nothing after ="));
        }
        out.push((rule, items));
    }
    if out.is_empty() {
        return Err("expected resource.group=item item, …".into());
    }
    Ok(out)
}

fn parse_unix(v: &str) -> Option<DateTime<Utc>> {
    v.trim().parse::<i64>().ok().filter(|n| *n > 0).and_then(|n| DateTime::from_timestamp(n, 0))
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
    KNOWN_KEYS.iter().map(|k| (distance(key, k), *k)).filter(|(d, _)| *d <= 3).min().map(|(_, k)| k)
}

// ---------------------------------------------------------------------------
// The annotations.

/// Reads every `sleepmode.loft.sh/` annotation of a target (a namespace, or
/// a vcluster's StatefulSet/Deployment or `vc-config-<name>` Secret);
/// returns all errors at once. Status values the Platform writes never
/// fail (unreadable reads as none); settings dormant has no equivalent for,
/// and unknown keys, become [`Note`]s rather than errors, so an annotation
/// dormant does not act on never leaves a target alone.
pub fn parse_annotations(annotations: &BTreeMap<String, String>) -> Result<Overlay, Vec<AnnotationError>> {
    let mut out = Overlay::default();
    let mut errors = Vec::new();
    let mut resources: Option<(Vec<ResourceRule>, &'static str)> = None;
    let mut force: Option<bool> = None;
    let mut force_duration: Option<Duration> = None;
    let err = |key: &str, value: &str, reason: String| AnnotationError {
        key: key.to_string(),
        value: value.to_string(),
        reason,
    };
    for (key, v) in annotations {
        let Some(&k) = KNOWN_KEYS.iter().find(|k| **k == key.as_str()) else {
            if key.starts_with(PREFIX) {
                let hint = closest_key(key).map(|k| format!("; did you mean {k}?")).unwrap_or_default();
                out.notes.push(Note {
                    source: format!("annotation {key}"),
                    value: v.clone(),
                    message: format!("unknown vCluster Platform annotation, ignored{hint}"),
                });
            }
            continue;
        };
        let origin = Origin::Annotation(k);
        let mut said: Vec<String> = Vec::new();
        let mut note = |message: &str| said.push(message.to_string());
        let result: Result<(), String> = match k {
            SLEEP_AFTER => parse_seconds(v).map(|d| out.sleep_after = Some(sourced(sleep_after_from(d), origin.clone()))),
            DELETE_AFTER => parse_seconds(v).map(|d| {
                note(
                    "read but not acted on by itself: dormant deletes a target only when its SleepPolicy's deleteAfter says so",
                );
                if !d.is_zero() {
                    out.delete_after = Some(sourced(d, origin.clone()));
                }
            }),
            SLEEP_SCHEDULE | WAKEUP_SCHEDULE => parse_schedule(v).map(|(s, dropped)| {
                if dropped {
                    note("the time zone inside the schedule is ignored, as vCluster Platform ignores it; the timezone annotation applies");
                }
                let s = Some(sourced(s, origin.clone()));
                if k == SLEEP_SCHEDULE { out.sleep_schedule = s } else { out.wake_schedule = s }
            }),
            TIMEZONE => parse_timezone(v).map(|tz| {
                if v.contains('#') {
                    note(&format!("read as {}, a zone fixed at the offset the Platform's CLI recorded (no daylight-saving changes)", tz.name()));
                }
                out.timezone = Some(sourced(tz, origin.clone()));
            }),
            FORCE => parse_bool(v).map(|b| force = Some(b)),
            FORCE_DURATION => parse_seconds(v).map(|d| force_duration = Some(d)),
            IGNORE_ALL => parse_bool(v).map(|b| {
                if b {
                    out.ignore.users = Some(sourced(vec!["*".into()], origin.clone()));
                }
            }),
            IGNORE_GROUPS | IGNORE_USER_AGENTS | IGNORE_VERBS => {
                match parse_list(v) {
                    Some(items) => {
                        let field = match k {
                            IGNORE_GROUPS => &mut out.ignore.groups,
                            IGNORE_USER_AGENTS => &mut out.ignore.user_agents,
                            _ => &mut out.ignore.verbs,
                        };
                        *field = Some(sourced(items, origin.clone()));
                    }
                    None => note("empty: no rule"),
                }
                Ok(())
            }
            IGNORE_RESOURCES => match parse_list(v) {
                Some(items) => items
                    .iter()
                    .map(|r| ResourceRule::parse(r))
                    .collect::<Result<Vec<_>, _>>()
                    .map(|rules| add_resources(&mut resources, rules, k)),
                None => {
                    note("empty: no rule");
                    Ok(())
                }
            },
            IGNORE_RESOURCE_VERBS | IGNORE_RESOURCE_NAMES => parse_resource_items(v).map(|items| {
                let rules = items
                    .into_iter()
                    .map(|(rule, list)| {
                        if k == IGNORE_RESOURCE_VERBS {
                            ResourceRule { verbs: list, ..rule }
                        } else {
                            ResourceRule { names: list, ..rule }
                        }
                    })
                    .collect();
                add_resources(&mut resources, rules, k)
            }),
            IGNORE_ACTIVE_CONNECTIONS => {
                parse_bool(v).map(|b| out.ignore.active_connections = Some(sourced(b, origin.clone())))
            }
            IGNORE_INGRESSES | DISABLE_INGRESS_WAKEUP => {
                note("no effect: dormant neither counts nor wakes on ingress traffic (only API requests)");
                Ok(())
            }
            IGNORE_VCLUSTERS => {
                note("already dormant's behaviour: use of a vcluster counts for the vcluster, not for its namespace");
                Ok(())
            }
            DISABLE_METRICS_TRACKING | SCOPE => {
                note("no effect in dormant");
                Ok(())
            }
            EXCLUDE => Ok(()), // a workload annotation: see `workload_excluded`
            SLEEPING_SINCE => {
                out.status.sleeping_since = parse_unix(v);
                note("vCluster Platform put this target to sleep; wake it there before dormant takes over (dormant restores only what it recorded itself)");
                Ok(())
            }
            LAST_ACTIVITY => {
                out.status.last_activity = parse_unix(v);
                Ok(())
            }
            // Statistics and status the Platform writes for itself.
            _ => Ok(()),
        };
        for message in said {
            out.notes.push(Note { source: origin.to_string(), value: v.clone(), message });
        }
        if let Err(reason) = result {
            errors.push(err(key, v, reason));
        }
    }
    if let Some((rules, key)) = resources {
        out.ignore.resources = Some(sourced(rules, Origin::Annotation(key)));
    }
    // `force-duration` "also implies that forceSleep is true" (agentapi).
    if force == Some(true) || force_duration.is_some() {
        let key = if force == Some(true) { FORCE } else { FORCE_DURATION };
        let prevent = force_duration.map(|d| if d.is_zero() { Prevent::Never } else { Prevent::For(d) });
        out.force = Some(sourced(Force { prevent }, Origin::Annotation(key)));
    }
    if errors.is_empty() { Ok(out) } else { Err(errors) }
}

/// The three resource annotations add up to one list; its origin is the
/// last key read (in key order, as `resolve` does for `ignore`).
fn add_resources(
    acc: &mut Option<(Vec<ResourceRule>, &'static str)>,
    rules: Vec<ResourceRule>,
    key: &'static str,
) {
    match acc {
        Some((all, k)) => {
            all.extend(rules);
            *k = key;
        }
        None => *acc = Some((rules, key)),
    }
}

/// Whether `sleepmode.loft.sh/exclude` keeps a workload running; `None`
/// when absent. dormant's own `dormant.dev/exclude` wins when present.
pub fn workload_excluded(annotations: &BTreeMap<String, String>) -> Result<Option<bool>, AnnotationError> {
    match annotations.get(EXCLUDE) {
        None => Ok(None),
        Some(v) => parse_bool(v).map(Some).map_err(|reason| AnnotationError {
            key: EXCLUDE.into(),
            value: v.clone(),
            reason,
        }),
    }
}

// ---------------------------------------------------------------------------
// vcluster.yaml

/// A Go duration (`time.ParseDuration`: `1h`, `90m`, `1h30m0s`, `1.5h`,
/// `300ms`), as vCluster's `sleepMode`/`sleep` sections take them, in whole
/// seconds. `0` or empty is zero.
pub fn parse_go_duration(v: &str) -> Result<Duration, String> {
    let s = v.trim();
    if s.is_empty() || s == "0" {
        return Ok(Duration::ZERO);
    }
    let bad = || format!("expected a Go duration such as 30m, 1h or 1h30m ({s:?} is not one)");
    if s.starts_with('-') {
        return Err("it is negative".into());
    }
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    let mut nanos: u128 = 0;
    while !rest.is_empty() {
        let int_len = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        let (int, after) = rest.split_at(int_len);
        let (frac, after) = match after.strip_prefix('.') {
            Some(f) => {
                let n = f.find(|c: char| !c.is_ascii_digit()).unwrap_or(f.len());
                f.split_at(n)
            }
            None => ("", after),
        };
        if int.is_empty() && frac.is_empty() {
            return Err(bad());
        }
        let unit_len = after.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let per: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return Err(bad()),
        };
        let whole: u128 = if int.is_empty() { 0 } else { int.parse().map_err(|_| bad())? };
        let mut part = whole.checked_mul(per).ok_or_else(bad)?;
        if !frac.is_empty() {
            let digits = frac.len().min(18) as u32;
            let f: u128 = frac[..digits as usize].parse().map_err(|_| bad())?;
            part += f * per / 10u128.pow(digits);
        }
        nanos = nanos.checked_add(part).ok_or_else(bad)?;
        rest = after;
    }
    let secs = (nanos / 1_000_000_000) as u64;
    if secs == 0 && nanos > 0 {
        return Err("it is shorter than a second".into());
    }
    if secs > MAX_SECONDS {
        return Err("it is longer than ten years".into());
    }
    Ok(Duration::from_secs(secs))
}

/// The scalar at `path` as text (numbers and booleans as YAML writes them).
fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn get<'a>(root: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(root, |v, k| v.get(k)).filter(|v| !v.is_null())
}

/// How one generation of vCluster's sleep configuration names its fields.
struct Shape {
    /// The section whose presence selects this shape.
    section: &'static str,
    after_inactivity: &'static str,
    /// Go durations (`sleep`, `sleepMode`) or whole seconds (`external.platform`).
    seconds: bool,
    schedule: &'static str,
    wakeup: &'static str,
    timezone: &'static str,
    exclude: Option<&'static str>,
    /// `sleepMode.enabled` must be true for `sleepMode` to apply.
    enabled: Option<&'static str>,
}

const SHAPES: &[Shape] = &[
    // vCluster ≥ 0.31-ish and vCluster Platform 4.x: `sleep` "replaces
    // sleepMode" (loft-sh/api pkg/vclusterconfig).
    Shape {
        section: "sleep",
        after_inactivity: "sleep.auto.afterInactivity",
        seconds: false,
        schedule: "sleep.auto.schedule",
        wakeup: "sleep.auto.wakeup.schedule",
        timezone: "sleep.auto.timezone",
        exclude: Some("sleep.auto.exclude.selector.labels"),
        enabled: None,
    },
    // vCluster 0.24–0.30 native sleep mode (config/config.go `SleepMode`).
    Shape {
        section: "sleepMode",
        after_inactivity: "sleepMode.autoSleep.afterInactivity",
        seconds: false,
        schedule: "sleepMode.autoSleep.schedule",
        wakeup: "sleepMode.autoWakeup.schedule",
        timezone: "sleepMode.timeZone",
        exclude: Some("sleepMode.autoSleep.exclude.selector.labels"),
        enabled: Some("sleepMode.enabled"),
    },
    // vCluster 0.22–0.23: the same section under `experimental` (vCluster's
    // own upgrade warning shows the move, pkg/platform/sleepmode/sleepmode.go).
    Shape {
        section: "experimental.sleepMode",
        after_inactivity: "experimental.sleepMode.autoSleep.afterInactivity",
        seconds: false,
        schedule: "experimental.sleepMode.autoSleep.schedule",
        wakeup: "experimental.sleepMode.autoWakeup.schedule",
        timezone: "experimental.sleepMode.timeZone",
        exclude: Some("experimental.sleepMode.autoSleep.exclude.selector.labels"),
        enabled: Some("experimental.sleepMode.enabled"),
    },
    // vCluster Platform's own section (vCluster 0.20–0.23 and later, legacy).
    Shape {
        section: "external.platform.autoSleep",
        after_inactivity: "external.platform.autoSleep.afterInactivity",
        seconds: true,
        schedule: "external.platform.autoSleep.schedule",
        wakeup: "external.platform.autoSleep.autoWakeup.schedule",
        timezone: "external.platform.autoSleep.timezone",
        exclude: None,
        enabled: None,
    },
];

/// Reads the sleep settings of a vcluster's `vcluster.yaml` (the text of
/// `config.yaml` in its `vc-config-<name>` Secret) into an [`Overlay`];
/// returns every problem at once. Every generation of the format is read:
/// `sleep.auto`, `sleepMode` and `experimental.sleepMode` (applied only with
/// `enabled: true`, as vCluster does) and `external.platform.autoSleep`
/// (seconds); more than one at once
/// is an error, as vCluster Platform refuses a vcluster with both platform
/// and native sleep configured. Everything else in the file is ignored.
pub fn parse_vcluster_config(text: &str) -> Result<Overlay, Vec<ConfigError>> {
    let err = |field: &str, value: String, reason: String| ConfigError { field: field.into(), value, reason };
    let root: Value = match serde_yaml::from_str(text) {
        Ok(Value::Null) => return Ok(Overlay::default()),
        Ok(v) => v,
        Err(e) => return Err(vec![err("(document)", String::new(), format!("not valid YAML: {e}"))]),
    };
    let mut out = Overlay::default();
    let mut errors = Vec::new();
    let present: Vec<&Shape> = SHAPES.iter().filter(|s| get(&root, s.section).is_some()).collect();
    let mut applied = Vec::new();
    for shape in present {
        if let Some(path) = shape.enabled {
            let enabled = get(&root, path).and_then(Value::as_bool).unwrap_or(false);
            if !enabled {
                out.notes.push(Note {
                    source: format!("vcluster.yaml {path}"),
                    value: get(&root, path).and_then(scalar).unwrap_or_default(),
                    message: format!(
                        "{} is not applied: it takes effect only with enabled: true",
                        shape.section
                    ),
                });
                continue;
            }
        }
        applied.push(shape);
    }
    if applied.len() > 1 {
        let names: Vec<&str> = applied.iter().map(|s| s.section).collect();
        return Err(vec![err(
            names[0],
            names.join(", "),
            "more than one sleep configuration is set (vCluster Platform rejects a vcluster with both platform and native sleep mode); keep one".into(),
        )]);
    }
    if let Some(shape) = applied.first() {
        let text_at = |path: &str| get(&root, path).map(|v| scalar(v).ok_or_else(|| format!("{v:?}")));
        let path = shape.after_inactivity;
        match text_at(path) {
            None => {}
            Some(Err(v)) => errors.push(err(path, v, "expected a duration".into())),
            Some(Ok(t)) => {
                let d = if shape.seconds { parse_seconds(&t) } else { parse_go_duration(&t) };
                match d {
                    Ok(d) => {
                        out.sleep_after = Some(sourced(sleep_after_from(d), Origin::VClusterConfig(path)))
                    }
                    Err(reason) => errors.push(err(path, t, reason)),
                }
            }
        }
        for (path, wake) in [(shape.schedule, false), (shape.wakeup, true)] {
            match text_at(path) {
                None => {}
                Some(Err(v)) => errors.push(err(path, v, "expected a cron schedule".into())),
                Some(Ok(t)) => match parse_schedule(&t) {
                    Ok((s, dropped)) => {
                        if dropped {
                            out.notes.push(Note {
                                source: format!("vcluster.yaml {path}"),
                                value: t.clone(),
                                message: format!(
                                    "the time zone inside the schedule is ignored; {} applies",
                                    shape.timezone
                                ),
                            });
                        }
                        let s = Some(sourced(s, Origin::VClusterConfig(path)));
                        if wake { out.wake_schedule = s } else { out.sleep_schedule = s }
                    }
                    Err(reason) => errors.push(err(path, t, reason)),
                },
            }
        }
        match text_at(shape.timezone) {
            None => {}
            Some(Err(v)) => errors.push(err(shape.timezone, v, "expected a time zone name".into())),
            Some(Ok(t)) if t.trim().is_empty() => {}
            Some(Ok(t)) => match parse_timezone(&t) {
                Ok(tz) => out.timezone = Some(sourced(tz, Origin::VClusterConfig(shape.timezone))),
                Err(reason) => errors.push(err(shape.timezone, t, reason)),
            },
        }
        if let Some(path) = shape.exclude
            && let Some(v) = get(&root, path)
        {
            match serde_yaml::from_value::<BTreeMap<String, String>>(v.clone()) {
                Ok(labels) if labels.is_empty() => {}
                Ok(labels) => {
                    out.notes.push(Note {
                        source: format!("vcluster.yaml {path}"),
                        value: labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","),
                        message: "no equivalent: dormant sleeps a vcluster whole (its control plane stops), so no workload inside it can stay up".into(),
                    });
                    out.exclude_labels = Some(sourced(labels, Origin::VClusterConfig(path)));
                }
                Err(e) => errors.push(err(
                    path,
                    format!("{v:?}"),
                    format!("expected a map of label names to values: {e}"),
                )),
            }
        }
    }
    for (path, seconds) in
        [("deletion.auto.afterInactivity", false), ("external.platform.autoDelete.afterInactivity", true)]
    {
        let Some(v) = get(&root, path).and_then(scalar) else { continue };
        let d = if seconds { parse_seconds(&v) } else { parse_go_duration(&v) };
        match d {
            Ok(d) => {
                out.notes.push(Note {
                    source: format!("vcluster.yaml {path}"),
                    value: v,
                    message: "read but not acted on by itself: dormant deletes a target only when its SleepPolicy's deleteAfter says so".into(),
                });
                if !d.is_zero() && out.delete_after.is_none() {
                    out.delete_after = Some(sourced(d, Origin::VClusterConfig(path)));
                }
            }
            Err(reason) => errors.push(err(path, v, reason)),
        }
    }
    if errors.is_empty() { Ok(out) } else { Err(errors) }
}

// ---------------------------------------------------------------------------
// Layering under dormant's own annotations.

/// Where the values [`layer_under`] took from the overlay came from: the
/// origins `resolve` cannot know (it names dormant's own keys). `None`
/// fields came from dormant's annotations (or nowhere).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Provenance {
    pub sleep_after: Option<Origin>,
    /// Of the schedule pair (the sleep schedule's origin if there is one,
    /// else the wake schedule's: what `resolve` reports).
    pub schedules: Option<Origin>,
    pub timezone: Option<Origin>,
    /// Of the `ignore` rules, when the last kind `resolve` looks at came from
    /// the overlay.
    pub ignore: Option<Origin>,
    /// dormant has no annotation for it, so it is applied here.
    pub active_connections: Option<Sourced<bool>>,
    /// Of `force_sleep` and `prevent_wakeup_until`.
    pub force: Option<Origin>,
    pub last_activity: Option<Origin>,
}

/// The Platform's settings of a target as the agent acts on them (see
/// [`layer_under`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Layered {
    /// Pass these to `resolve` and the decision in place of the target's
    /// own annotations, then [`Provenance::attribute`] the policy.
    pub annotations: TargetAnnotations,
    pub provenance: Provenance,
    /// The patch that takes the Platform's forced sleep over as dormant's
    /// own (empty when there is none to take): `force-sleep` and
    /// `prevent-wakeup-until` written, the Platform's `force` and
    /// `force-duration` removed.
    pub takeover: BTreeMap<&'static str, Option<String>>,
}

/// dormant's annotations over the overlay, field by field: what a field of
/// `dormant` sets is kept; a field it leaves unset takes the overlay's value,
/// and [`Provenance`] records where that came from.
///
/// The Platform's `last-activity` continues the idle clock until dormant
/// records its own. Its forced sleep (`force`, `force-duration`) is taken
/// over: it reads as dormant's `force-sleep` dated at the Platform's
/// `sleeping-since`, else when dormant put the target to sleep, else `now`,
/// and a `force-duration` as `prevent-wakeup-until` that long after (`0`:
/// `never`), each unless dormant's own is set; [`Layered::takeover`]
/// writes that in dormant's words and removes the Platform's two keys, so
/// a manual wake ends it as it ends any of dormant's forced sleeps (as the
/// Platform's own wakeup deletes `force`).
pub fn layer_under(dormant: &TargetAnnotations, overlay: &Overlay, now: DateTime<Utc>) -> Layered {
    let (mut merged, mut prov) = layer_policy_under(dormant, overlay);
    let mut takeover = BTreeMap::new();
    if let Some(f) = &overlay.force {
        let asleep = matches!(dormant.state, Some(TargetState::Asleep | TargetState::Sleeping));
        let since = overlay.status.sleeping_since.or(dormant.asleep_since.filter(|_| asleep)).unwrap_or(now);
        if dormant.force_sleep.is_none() {
            merged.force_sleep = Some(ForceSleep::Since(since));
            takeover.insert(vocab::FORCE_SLEEP, Some(ann::rfc3339(since)));
            prov.force = Some(f.origin.clone());
        }
        let until = match f.value.prevent {
            None => None,
            Some(Prevent::Never) => Some(Until::Never),
            Some(Prevent::For(d)) => {
                chrono::Duration::from_std(d).ok().and_then(|d| since.checked_add_signed(d)).map(Until::Time)
            }
        };
        if let Some(until) = until
            && dormant.prevent_wakeup_until.is_none()
        {
            takeover.insert(vocab::PREVENT_WAKEUP_UNTIL, Some(until.to_string()));
            merged.prevent_wakeup_until = Some(until);
            prov.force = Some(f.origin.clone());
        }
        takeover.insert(FORCE, None);
        takeover.insert(FORCE_DURATION, None);
    }
    if merged.last_activity.is_none()
        && let Some(t) = overlay.status.last_activity
    {
        merged.last_activity = Some(t);
        prov.last_activity = Some(Origin::Annotation(LAST_ACTIVITY));
    }
    Layered { annotations: merged, provenance: prov, takeover }
}

/// [`layer_under`] for the policy's fields only (sleep-after, schedules,
/// timezone, the ignore rules).
fn layer_policy_under(dormant: &TargetAnnotations, overlay: &Overlay) -> (TargetAnnotations, Provenance) {
    let mut merged = dormant.clone();
    let mut prov = Provenance::default();
    fn fill<T: Clone>(slot: &mut Option<T>, from: &Option<Sourced<T>>) -> Option<Origin> {
        match (slot.is_none(), from) {
            (true, Some(s)) => {
                *slot = Some(s.value.clone());
                Some(s.origin.clone())
            }
            _ => None,
        }
    }
    prov.sleep_after = fill(&mut merged.sleep_after, &overlay.sleep_after);
    let sleep_origin = fill(&mut merged.sleep_schedule, &overlay.sleep_schedule);
    let wake_origin = fill(&mut merged.wake_schedule, &overlay.wake_schedule);
    prov.schedules = if merged.sleep_schedule.is_some() { sleep_origin } else { wake_origin };
    prov.timezone = fill(&mut merged.timezone, &overlay.timezone);

    let i = &overlay.ignore;
    let o = &mut merged.ignore;
    // In the order `resolve` reads them: the last one set names the origin.
    let set = [
        (o.users.is_some(), fill(&mut o.users, &i.users)),
        (o.groups.is_some(), fill(&mut o.groups, &i.groups)),
        (o.user_agents.is_some(), fill(&mut o.user_agents, &i.user_agents)),
        (o.verbs.is_some(), fill(&mut o.verbs, &i.verbs)),
        (o.resources.is_some(), fill(&mut o.resources, &i.resources)),
        (o.own_service_accounts.is_some(), None),
    ];
    prov.ignore =
        set.into_iter().rev().find(|(was_set, filled)| *was_set || filled.is_some()).and_then(|(_, f)| f);
    prov.active_connections = i.active_connections.clone();
    (merged, prov)
}

impl Provenance {
    /// Names the overlay's keys as the origins of the values `resolve` took
    /// from it (it named dormant's keys), and applies what dormant has no
    /// annotation for (`ignore-active-connections`).
    pub fn attribute(&self, eff: &mut EffectivePolicy) {
        fn name(slot: &mut Origin, from: &Option<Origin>) {
            if let (Origin::Annotation(_), Some(o)) = (&*slot, from) {
                *slot = o.clone();
            }
        }
        name(&mut eff.sleep_after.origin, &self.sleep_after);
        name(&mut eff.schedules.origin, &self.schedules);
        name(&mut eff.timezone.origin, &self.timezone);
        name(&mut eff.ignore.origin, &self.ignore);
        if let Some(a) = &self.active_connections {
            eff.ignore.value.active_connections = a.value;
            eff.ignore.origin = a.origin.clone();
        }
    }
}

// ---------------------------------------------------------------------------
// dormant migrate

/// What `dormant migrate` does with one setting it found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Write this `dormant.dev/*` annotation on the same object.
    Annotate { key: &'static str, value: String },
    /// The object already has this `dormant.dev/*` annotation; it is kept.
    Kept { key: &'static str, existing: String },
    /// No annotation expresses it; this `SleepPolicy` field does.
    Policy(String),
    /// Nothing does; why.
    Nothing(String),
}

/// One setting found and what it becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// `annotation sleepmode.loft.sh/sleep-after`, `vcluster.yaml …`.
    pub source: String,
    /// The setting as dormant read it.
    pub value: String,
    pub outcome: Outcome,
}

/// The plan for one object (a namespace, or a vcluster's StatefulSet or
/// Deployment — the vcluster's `vcluster.yaml` settings go on it too).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Migration {
    /// The `dormant.dev/*` annotations to add (never one it already has).
    pub annotations: BTreeMap<String, String>,
    pub steps: Vec<Step>,
}

/// Plans the `dormant.dev/*` equivalent of an object's vCluster Platform
/// annotations and, for a vcluster, its `vcluster.yaml` (annotations win
/// over `vcluster.yaml`, as when dormant reads them). `now` anchors a
/// `force-duration` whose start the Platform did not record. Errors are
/// those of the settings themselves: nothing is planned from a bad value.
pub fn plan_migration(
    annotations: &BTreeMap<String, String>,
    vcluster_yaml: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Migration, Error> {
    let from_annotations = parse_annotations(annotations).map_err(Error::Annotations)?;
    let overlay = match vcluster_yaml {
        Some(text) => from_annotations.over(parse_vcluster_config(text).map_err(Error::Config)?),
        None => from_annotations,
    };
    let mut plan = Migration::default();
    let annotate = |plan: &mut Migration, origin: &Origin, value: String, key: &'static str, to: String| {
        let outcome = match annotations.get(key) {
            Some(existing) => Outcome::Kept { key, existing: existing.clone() },
            None => {
                plan.annotations.insert(key.to_string(), to.clone());
                Outcome::Annotate { key, value: to }
            }
        };
        plan.steps.push(Step { source: origin.to_string(), value, outcome });
    };
    let step = |plan: &mut Migration, origin: &Origin, value: String, outcome: Outcome| {
        plan.steps.push(Step { source: origin.to_string(), value, outcome })
    };

    if let Some(s) = &overlay.sleep_after {
        annotate(&mut plan, &s.origin, s.value.to_string(), vocab::SLEEP_AFTER, s.value.to_string());
    }
    if let Some(s) = &overlay.sleep_schedule {
        annotate(&mut plan, &s.origin, s.value.to_string(), vocab::SLEEP_SCHEDULE, s.value.to_string());
    }
    if let Some(s) = &overlay.wake_schedule {
        annotate(&mut plan, &s.origin, s.value.to_string(), vocab::WAKE_SCHEDULE, s.value.to_string());
    }
    if let Some(s) = &overlay.timezone {
        annotate(
            &mut plan,
            &s.origin,
            s.value.name().to_string(),
            vocab::TIMEZONE,
            s.value.name().to_string(),
        );
    }
    if let Some(f) = &overlay.force {
        let shown = match f.value.prevent {
            None => "force".to_string(),
            Some(Prevent::Never) => "force until woken by hand".to_string(),
            Some(Prevent::For(d)) => format!("force, no wake for {}", duration::format(d)),
        };
        annotate(&mut plan, &f.origin, shown.clone(), vocab::FORCE_SLEEP, "true".into());
        let until = match f.value.prevent {
            None => None,
            Some(Prevent::Never) => Some(Until::Never),
            Some(Prevent::For(d)) => {
                let start = overlay.status.sleeping_since.unwrap_or(now);
                chrono::Duration::from_std(d).ok().and_then(|d| start.checked_add_signed(d)).map(Until::Time)
            }
        };
        if let Some(until) = until {
            annotate(&mut plan, &f.origin, shown, vocab::PREVENT_WAKEUP_UNTIL, until.to_string());
        }
    }
    let list = |s: &Sourced<Vec<String>>| s.value.join(",");
    for (slot, key) in [
        (&overlay.ignore.users, vocab::IGNORE_USERS),
        (&overlay.ignore.groups, vocab::IGNORE_GROUPS),
        (&overlay.ignore.user_agents, vocab::IGNORE_USER_AGENTS),
        (&overlay.ignore.verbs, vocab::IGNORE_VERBS),
    ] {
        if let Some(s) = slot {
            annotate(&mut plan, &s.origin, list(s), key, list(s));
        }
    }
    if let Some(s) = &overlay.ignore.resources {
        let (plain, detailed): (Vec<&ResourceRule>, Vec<&ResourceRule>) =
            s.value.iter().partition(|r| r.names.is_empty() && r.verbs.is_empty());
        if !plain.is_empty() {
            let text = plain.iter().map(|r| r.pattern()).collect::<Vec<_>>().join(",");
            let origin = match &s.origin {
                Origin::Annotation(_) => Origin::Annotation(IGNORE_RESOURCES),
                o => o.clone(),
            };
            annotate(&mut plan, &origin, text.clone(), vocab::IGNORE_RESOURCES, text);
        }
        for r in detailed {
            let outcome = if r.verbs.is_empty() {
                Outcome::Policy(format!(
                    "spec.ignore.resources: [{{group: {:?}, resource: {:?}, names: [{}]}}]",
                    r.group,
                    r.resource,
                    r.names.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ")
                ))
            } else {
                Outcome::Nothing(
                    "neither an annotation nor a SleepPolicy names verbs of one resource (dormant reads this one from the Platform's annotation)".into(),
                )
            };
            // Each kind of rule comes from its own annotation.
            let origin = match (&s.origin, r.verbs.is_empty()) {
                (Origin::Annotation(_), true) => Origin::Annotation(IGNORE_RESOURCE_NAMES),
                (Origin::Annotation(_), false) => Origin::Annotation(IGNORE_RESOURCE_VERBS),
                (o, _) => o.clone(),
            };
            step(&mut plan, &origin, r.pattern(), outcome);
        }
    }
    if let Some(a) = &overlay.ignore.active_connections {
        step(
            &mut plan,
            &a.origin,
            a.value.to_string(),
            Outcome::Policy(format!("spec.ignore.activeConnections: {}", a.value)),
        );
    }
    if let Some(d) = &overlay.delete_after {
        step(
            &mut plan,
            &d.origin,
            duration::format(d.value),
            Outcome::Policy(format!(
                "spec.deleteAfter: {} (dormant deletes only when a policy opts in)",
                duration::format(d.value)
            )),
        );
    }
    if let Some(t) = overlay.status.last_activity {
        let origin = Origin::Annotation(LAST_ACTIVITY);
        annotate(&mut plan, &origin, ann::rfc3339(t), vocab::LAST_ACTIVITY, ann::rfc3339(t));
    }
    for n in &overlay.notes {
        // A setting a SleepPolicy field expresses needs no second line.
        if plan.steps.iter().any(|s| s.source == n.source && matches!(s.outcome, Outcome::Policy(_))) {
            continue;
        }
        plan.steps.push(Step {
            source: n.source.clone(),
            value: n.value.clone(),
            outcome: Outcome::Nothing(n.message.clone()),
        });
    }
    Ok(plan)
}

/// The `dormant.dev/exclude` a workload needs for its
/// `sleepmode.loft.sh/exclude`, unless it already has one.
pub fn plan_workload_migration(
    annotations: &BTreeMap<String, String>,
) -> Result<Option<(&'static str, String)>, AnnotationError> {
    Ok(match workload_excluded(annotations)? {
        Some(true) if !annotations.contains_key(vocab::EXCLUDE) => Some((vocab::EXCLUDE, "true".into())),
        _ => None,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::policy::resolve::{Defaults, TargetKind, resolve};
    use chrono::TimeZone;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn read(pairs: &[(&str, &str)]) -> Overlay {
        parse_annotations(&map(pairs)).unwrap_or_else(|e| panic!("{pairs:?}: {e:?}"))
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn at(unix: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(unix, 0).unwrap()
    }

    fn rule(resource: &str, group: &str, names: &[&str], verbs: &[&str]) -> ResourceRule {
        ResourceRule {
            group: group.into(),
            resource: resource.into(),
            names: names.iter().map(|s| s.to_string()).collect(),
            verbs: verbs.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn sleep_after_and_delete_after_are_whole_seconds() {
        let o = read(&[(SLEEP_AFTER, "3600"), (DELETE_AFTER, "86400")]);
        assert_eq!(
            o.sleep_after,
            Some(Sourced { value: SleepAfter::After(secs(3600)), origin: Origin::Annotation(SLEEP_AFTER) })
        );
        assert_eq!(o.delete_after.as_ref().map(|d| d.value), Some(secs(86_400)));
        assert!(
            o.notes.iter().any(
                |n| n.source == format!("annotation {DELETE_AFTER}") && n.message.contains("deleteAfter")
            )
        );
        assert_eq!(
            read(&[(SLEEP_AFTER, "0")]).sleep_after.map(|s| s.value),
            Some(SleepAfter::Never),
            "0 switches idle sleep off"
        );
        assert_eq!(read(&[(DELETE_AFTER, "0")]).delete_after, None);
    }

    #[test]
    fn schedules_are_cron_and_a_zone_inside_them_is_ignored_as_the_platform_does() {
        let o = read(&[(SLEEP_SCHEDULE, "0 19 * * 1-5"), (WAKEUP_SCHEDULE, "0 8 * * 1-5")]);
        assert_eq!(o.sleep_schedule.as_ref().map(|s| s.value.to_string()), Some("0 19 * * 1-5".into()));
        assert_eq!(
            o.wake_schedule.as_ref().map(|s| s.origin.clone()),
            Some(Origin::Annotation(WAKEUP_SCHEDULE))
        );
        assert!(o.notes.is_empty());
        for (text, cron) in
            [("CRON_TZ=Europe/Berlin 30 17 * * 5", "30 17 * * 5"), ("TZ=UTC @daily", "@daily")]
        {
            let o = read(&[(SLEEP_SCHEDULE, text)]);
            assert_eq!(o.sleep_schedule.map(|s| s.value.to_string()), Some(cron.to_string()));
            assert!(o.notes[0].message.contains("time zone inside the schedule is ignored"), "{:?}", o.notes);
        }
    }

    #[test]
    fn time_zones_are_iana_names_or_the_clis_zone_and_offset() {
        for (text, zone) in [
            ("Europe/Berlin", "Europe/Berlin"),
            ("CET#3600", "Etc/GMT-1"),
            ("CEST#7200", "Etc/GMT-2"),
            ("EST#-18000", "Etc/GMT+5"),
            ("UTC#0", "UTC"),
            ("IST#19800", "Asia/Kolkata"),
            ("NPT#20700", "Asia/Kathmandu"),
        ] {
            let o = read(&[(TIMEZONE, text)]);
            assert_eq!(o.timezone.map(|t| t.value.name()), Some(zone), "{text}");
            assert_eq!(o.notes.len(), usize::from(text.contains('#')), "{text}: {:?}", o.notes);
        }
    }

    #[test]
    fn every_fixed_offset_zone_really_keeps_its_offset_all_year() {
        use chrono::Offset;
        let mut offsets: Vec<i32> = (-12..=14).map(|h| h * 3600).collect();
        offsets.extend(FIXED_HALF_HOUR_ZONES.iter().map(|(o, _)| *o));
        for offset in offsets {
            let tz = fixed_offset_zone(offset).unwrap_or_else(|| panic!("{offset}"));
            for month in [1, 4, 7, 10] {
                let t = Utc.with_ymd_and_hms(2026, month, 15, 12, 0, 0).unwrap();
                let got = tz.offset_from_utc_datetime(&t.naive_utc()).fix().local_minus_utc();
                assert_eq!(got, offset, "{} in month {month}", tz.name());
            }
        }
        assert_eq!(fixed_offset_zone(3601), None);
        assert_eq!(fixed_offset_zone(15 * 3600), None);
    }

    #[test]
    fn force_and_its_duration() {
        let o = read(&[(FORCE, "true")]);
        assert_eq!(
            o.force,
            Some(Sourced { value: Force { prevent: None }, origin: Origin::Annotation(FORCE) })
        );
        assert_eq!(read(&[(FORCE, "false")]).force, None);
        let o = read(&[(FORCE, "true"), (FORCE_DURATION, "600")]);
        assert_eq!(o.force.map(|f| f.value.prevent), Some(Some(Prevent::For(secs(600)))));
        let o = read(&[(FORCE, "true"), (FORCE_DURATION, "0")]);
        assert_eq!(o.force.map(|f| f.value.prevent), Some(Some(Prevent::Never)), "0: until woken by hand");
        let o = read(&[(FORCE_DURATION, "60")]);
        assert_eq!(
            o.force.map(|f| (f.value.prevent, f.origin)),
            Some((Some(Prevent::For(secs(60))), Origin::Annotation(FORCE_DURATION))),
            "a duration implies force"
        );
    }

    #[test]
    fn the_ignore_family() {
        let o = read(&[
            (IGNORE_ALL, "true"),
            (IGNORE_GROUPS, "group2, group3"),
            (IGNORE_USER_AGENTS, "kubectl*,argo,useragent3,"),
            (IGNORE_VERBS, "create,verb1"),
            (IGNORE_RESOURCES, "pods,deployments.apps"),
            (
                IGNORE_RESOURCE_VERBS,
                "myresource.mygroup=create update delete, myresource2.mygroup=create update",
            ),
            (IGNORE_RESOURCE_NAMES, "myresource.mygroup=name1 name2,myotherresource.mygroup=name1"),
            (IGNORE_ACTIVE_CONNECTIONS, "true"),
        ]);
        let i = &o.ignore;
        assert_eq!(
            i.users.as_ref().map(|s| (&s.value, &s.origin)),
            Some((&strings(&["*"]), &Origin::Annotation(IGNORE_ALL)))
        );
        assert_eq!(i.groups.as_ref().map(|s| &s.value), Some(&strings(&["group2", "group3"])));
        assert_eq!(
            i.user_agents.as_ref().map(|s| &s.value),
            Some(&strings(&["kubectl*", "argo", "useragent3"]))
        );
        assert_eq!(i.verbs.as_ref().map(|s| &s.value), Some(&strings(&["create", "verb1"])));
        let resources = i.resources.as_ref().unwrap();
        assert_eq!(
            resources.value,
            vec![
                rule("myresource", "mygroup", &["name1", "name2"], &[]),
                rule("myotherresource", "mygroup", &["name1"], &[]),
                rule("myresource", "mygroup", &[], &["create", "update", "delete"]),
                rule("myresource2", "mygroup", &[], &["create", "update"]),
                rule("pods", "", &[], &[]),
                rule("deployments", "apps", &[], &[]),
            ]
        );
        assert_eq!(resources.origin, Origin::Annotation(IGNORE_RESOURCES), "the last key in order");
        assert_eq!(i.active_connections.as_ref().map(|s| s.value), Some(true));
        assert!(o.notes.is_empty(), "{:?}", o.notes);
        assert_eq!(read(&[(IGNORE_ALL, "false")]).ignore.users, None);
        assert_eq!(
            read(&[(IGNORE_ACTIVE_CONNECTIONS, "false")]).ignore.active_connections.map(|s| s.value),
            Some(false)
        );
        let empty = read(&[(IGNORE_GROUPS, " , ")]);
        assert_eq!(empty.ignore.groups, None);
        assert!(empty.notes[0].message.contains("empty"));
    }

    #[test]
    fn settings_dormant_has_no_equivalent_for_are_notes_whatever_their_value() {
        for (key, needle) in [
            (IGNORE_INGRESSES, "ingress"),
            (DISABLE_INGRESS_WAKEUP, "ingress"),
            (IGNORE_VCLUSTERS, "already dormant's behaviour"),
            (DISABLE_METRICS_TRACKING, "no effect"),
            (SCOPE, "no effect"),
        ] {
            for value in ["true", "whatever"] {
                let o = read(&[(key, value)]);
                assert_eq!(o.notes.len(), 1, "{key}");
                assert!(
                    o.notes[0].to_string().contains(key) && o.notes[0].message.contains(needle),
                    "{}",
                    o.notes[0]
                );
                assert_eq!(Overlay { notes: vec![], ..o }, Overlay::default(), "{key} changes nothing else");
            }
        }
    }

    #[test]
    fn status_the_platform_writes_is_read_and_never_an_error() {
        let o = read(&[
            (SLEEPING_SINCE, "1774883460"),
            (LAST_ACTIVITY, "1774800000"),
            (LAST_ACTIVITY_INFO, r#"{"subject":"loft:user:alice","verb":"get"}"#),
            (SLEEP_TYPE, "forcedSleep"),
            (SCHEDULED_SLEEP, "1774900000"),
            (SCHEDULED_WAKEUP, "1774883460"),
            (CURRENT_EPOCH_START, "1774000000"),
            (CURRENT_EPOCH_SLEPT, "51523"),
            (LAST_EPOCH_START, "1773000000"),
            (LAST_EPOCH_SLEPT, "42"),
        ]);
        assert_eq!(o.status.sleeping_since, Some(at(1_774_883_460)));
        assert_eq!(o.status.last_activity, Some(at(1_774_800_000)));
        assert_eq!(o.notes.len(), 1);
        assert!(o.notes[0].message.contains("wake it there"), "{}", o.notes[0]);
        let garbage = read(&[(SLEEPING_SINCE, "yesterday"), (LAST_ACTIVITY, "-1"), (SLEEP_TYPE, "?")]);
        assert_eq!(garbage.status, PlatformStatus::default());
    }

    #[test]
    fn unknown_keys_are_notes_with_a_hint_and_other_prefixes_are_ignored() {
        let o = read(&[("sleepmode.loft.sh/sleep-afer", "60"), ("loft.sh/sleep-mode", "true"), ("app", "x")]);
        assert_eq!(o.notes.len(), 1);
        assert!(o.notes[0].message.contains("did you mean sleepmode.loft.sh/sleep-after?"), "{}", o.notes[0]);
        assert_eq!(o.sleep_after, None);
    }

    #[test]
    fn every_bad_value_is_reported_with_its_annotation_and_value() {
        let table = [
            (SLEEP_AFTER, "1h", "whole number of seconds"),
            (SLEEP_AFTER, "-5", "whole number of seconds"),
            (SLEEP_AFTER, "999999999999", "ten years"),
            (DELETE_AFTER, "soon", "whole number of seconds"),
            (SLEEP_SCHEDULE, "0 0 19 * * 1-5", "exactly 5 are expected"),
            (SLEEP_SCHEDULE, "@every 1h", "@every"),
            (WAKEUP_SCHEDULE, "0 99 * * *", "invalid schedule"),
            (WAKEUP_SCHEDULE, "TZ=UTC 0 8 * *", "4 fields"),
            (TIMEZONE, "Mars/Olympus", "unknown time zone"),
            (TIMEZONE, "CET#one", "zone#offset-in-seconds"),
            (TIMEZONE, "XYZ#3601", "no time zone is fixed at UTC+01:00:01"),
            (FORCE, "yes", "expected true or false"),
            (FORCE_DURATION, "-1", "whole number of seconds"),
            (IGNORE_ALL, "1", "expected true or false"),
            (IGNORE_ACTIVE_CONNECTIONS, "on", "expected true or false"),
            (IGNORE_RESOURCES, ".apps", "resource[/subresource][.group]"),
            (IGNORE_RESOURCE_VERBS, "configmaps", "expected resource.group=item"),
            (IGNORE_RESOURCE_VERBS, "configmaps=", "nothing after ="),
            (IGNORE_RESOURCE_NAMES, ".apps=web", "resource[/subresource][.group]"),
            (IGNORE_RESOURCE_NAMES, " , ", "expected resource.group=item"),
        ];
        for (key, value, needle) in table {
            let errors = parse_annotations(&map(&[(key, value)])).unwrap_err();
            assert_eq!(errors.len(), 1, "{key}={value}");
            let msg = errors[0].to_string();
            assert!(msg.contains(key) && msg.contains(&format!("{value:?}")), "{msg}");
            assert!(msg.contains(needle), "{key}={value}: {msg}");
        }
        let e = parse_annotations(&map(&[(SLEEP_AFTER, "x"), (TIMEZONE, "y"), (FORCE, "z")])).unwrap_err();
        assert_eq!(e.len(), 3, "all at once");
    }

    #[test]
    fn a_workload_is_excluded_by_the_platforms_annotation() {
        assert_eq!(workload_excluded(&map(&[(EXCLUDE, "true")])), Ok(Some(true)));
        assert_eq!(workload_excluded(&map(&[(EXCLUDE, "false")])), Ok(Some(false)));
        assert_eq!(workload_excluded(&map(&[])), Ok(None));
        let e = workload_excluded(&map(&[(EXCLUDE, "yes")])).unwrap_err();
        assert!(e.to_string().contains(EXCLUDE) && e.to_string().contains("\"yes\""), "{e}");
        assert!(read(&[(EXCLUDE, "true")]).is_empty(), "not a target setting");
    }

    #[test]
    fn go_durations_as_vcluster_reads_them() {
        for (text, s) in [
            ("1h", 3600),
            ("90m", 5400),
            ("1h30m0s", 5400),
            ("1.5h", 5400),
            (".5m", 30),
            ("3h", 10_800),
            ("0", 0),
            ("", 0),
            ("1500ms", 1),
            ("+2m", 120),
        ] {
            assert_eq!(parse_go_duration(text), Ok(secs(s)), "{text}");
        }
        for (text, needle) in [
            ("-1h", "negative"),
            ("1d", "Go duration"),
            ("h", "Go duration"),
            ("5", "Go duration"),
            ("500ms", "shorter than a second"),
            ("100000h", "ten years"),
            ("1h 30m", "Go duration"),
        ] {
            let e = parse_go_duration(text).unwrap_err();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }

    fn yaml(text: &str) -> Overlay {
        parse_vcluster_config(text).unwrap_or_else(|e| panic!("{text}: {e:?}"))
    }

    #[test]
    fn the_sleep_mode_section_of_vcluster_0_24_to_0_30() {
        let o = yaml(
            "controlPlane: {distro: {k8s: {enabled: true}}}\nsleepMode:\n  enabled: true\n  timeZone: America/Denver\n  autoSleep:\n    afterInactivity: 3h\n    schedule: 30 17 * * 5\n    exclude:\n      selector:\n        labels: {dont: sleep}\n  autoWakeup:\n    schedule: 0 7 * * 1\n",
        );
        assert_eq!(
            o.sleep_after,
            Some(Sourced {
                value: SleepAfter::After(secs(10_800)),
                origin: Origin::VClusterConfig("sleepMode.autoSleep.afterInactivity")
            })
        );
        assert_eq!(o.sleep_schedule.as_ref().map(|s| s.value.to_string()), Some("30 17 * * 5".into()));
        assert_eq!(
            o.wake_schedule.as_ref().map(|s| s.origin.to_string()),
            Some("vcluster.yaml sleepMode.autoWakeup.schedule".into())
        );
        assert_eq!(o.timezone.as_ref().map(|t| t.value.name()), Some("America/Denver"));
        assert_eq!(o.exclude_labels.as_ref().map(|l| l.value.clone()), Some(map(&[("dont", "sleep")])));
        assert!(o.notes.iter().any(|n| n.message.contains("sleeps a vcluster whole")), "{:?}", o.notes);
    }

    #[test]
    fn sleep_mode_applies_only_when_enabled() {
        for text in [
            "sleepMode: {autoSleep: {afterInactivity: 1h}}",
            "sleepMode: {enabled: false, autoSleep: {afterInactivity: 1h}}",
        ] {
            let o = yaml(text);
            assert_eq!(o.sleep_after, None, "{text}");
            assert!(o.notes[0].message.contains("enabled: true"), "{:?}", o.notes);
        }
    }

    #[test]
    fn the_experimental_sleep_mode_of_vcluster_0_22_and_0_23() {
        let o =
            yaml("experimental:\n  sleepMode:\n    enabled: true\n    autoSleep: {afterInactivity: 90m}\n");
        assert_eq!(
            o.sleep_after.map(|s| (s.value, s.origin.to_string())),
            Some((
                SleepAfter::After(secs(5400)),
                "vcluster.yaml experimental.sleepMode.autoSleep.afterInactivity".into()
            ))
        );
    }

    #[test]
    fn the_newer_sleep_section() {
        let o = yaml(
            "sleep:\n  auto:\n    afterInactivity: 30m0s\n    schedule: \"0 22 * * *\"\n    timezone: Europe/Berlin\n    wakeup: {schedule: \"0 8 * * *\"}\ndeletion: {auto: {afterInactivity: 720h}}\n",
        );
        assert_eq!(
            o.sleep_after.map(|s| (s.value, s.origin.to_string())),
            Some((SleepAfter::After(secs(1800)), "vcluster.yaml sleep.auto.afterInactivity".into()))
        );
        assert_eq!(o.sleep_schedule.map(|s| s.value.to_string()), Some("0 22 * * *".into()));
        assert_eq!(o.wake_schedule.map(|s| s.value.to_string()), Some("0 8 * * *".into()));
        assert_eq!(o.timezone.map(|t| t.value), Some(chrono_tz::Europe::Berlin));
        assert_eq!(o.delete_after.map(|d| d.value), Some(secs(720 * 3600)));
        assert!(o.notes.iter().any(|n| n.source == "vcluster.yaml deletion.auto.afterInactivity"));
    }

    #[test]
    fn the_platforms_external_section_counts_in_seconds() {
        let o = yaml(
            "external:\n  platform:\n    autoSleep:\n      afterInactivity: 600\n      schedule: \"0 17 * * *\"\n      timezone: CET#3600\n      autoWakeup: {schedule: \"0 9 * * *\"}\n    autoDelete: {afterInactivity: 3600}\n",
        );
        assert_eq!(o.sleep_after.map(|s| s.value), Some(SleepAfter::After(secs(600))));
        assert_eq!(
            o.wake_schedule.map(|s| s.origin),
            Some(Origin::VClusterConfig("external.platform.autoSleep.autoWakeup.schedule"))
        );
        assert_eq!(o.timezone.map(|t| t.value.name()), Some("Etc/GMT-1"));
        assert_eq!(o.delete_after.map(|d| d.value), Some(secs(3600)));
    }

    #[test]
    fn nothing_to_read_is_an_empty_overlay() {
        for text in ["", "controlPlane: {}\n", "sleep: {}", "sleepMode: {enabled: true}"] {
            assert_eq!(yaml(text).sleep_after, None, "{text}");
            assert!(yaml(text).notes.is_empty(), "{text}");
        }
    }

    #[test]
    fn bad_vcluster_yaml_values_name_the_field() {
        let table = [
            (
                "sleepMode: {enabled: true, autoSleep: {afterInactivity: 1d}}",
                "sleepMode.autoSleep.afterInactivity",
                "Go duration",
            ),
            (
                "sleepMode: {enabled: true, autoSleep: {afterInactivity: [1]}}",
                "sleepMode.autoSleep.afterInactivity",
                "expected a duration",
            ),
            (
                "sleepMode: {enabled: true, autoSleep: {schedule: \"0 0 19 * * 1-5\"}}",
                "sleepMode.autoSleep.schedule",
                "6 fields",
            ),
            (
                "sleepMode: {enabled: true, autoWakeup: {schedule: \"0 99 * * *\"}}",
                "sleepMode.autoWakeup.schedule",
                "invalid schedule",
            ),
            ("sleepMode: {enabled: true, timeZone: Berlin}", "sleepMode.timeZone", "unknown time zone"),
            (
                "sleepMode: {enabled: true, autoSleep: {exclude: {selector: {labels: [a]}}}}",
                "sleepMode.autoSleep.exclude.selector.labels",
                "map of label names",
            ),
            ("sleep: {auto: {afterInactivity: -5m}}", "sleep.auto.afterInactivity", "negative"),
            (
                "external: {platform: {autoSleep: {afterInactivity: 1h}}}",
                "external.platform.autoSleep.afterInactivity",
                "whole number of seconds",
            ),
            (
                "external: {platform: {autoDelete: {afterInactivity: soon}}}",
                "external.platform.autoDelete.afterInactivity",
                "whole number of seconds",
            ),
            ("deletion: {auto: {afterInactivity: 2 days}}", "deletion.auto.afterInactivity", "Go duration"),
            (
                "sleep: {auto: {afterInactivity: 1h}}\nsleepMode: {enabled: true}",
                "sleep",
                "more than one sleep configuration",
            ),
            ("sleepMode: [unclosed", "(document)", "not valid YAML"),
        ];
        for (text, field, needle) in table {
            let errors = parse_vcluster_config(text).unwrap_err();
            assert_eq!(errors.len(), 1, "{text}: {errors:?}");
            assert_eq!(errors[0].field, field, "{text}");
            let msg = errors[0].to_string();
            assert!(
                msg.starts_with(&format!("vcluster.yaml {field}=")) && msg.contains(needle),
                "{text}: {msg}"
            );
        }
        let all =
            parse_vcluster_config("sleepMode: {enabled: true, timeZone: x, autoSleep: {afterInactivity: y}}")
                .unwrap_err();
        assert_eq!(all.len(), 2, "all at once");
    }

    #[test]
    fn a_hostile_vcluster_yaml_is_refused_quickly() {
        // A team writes its vcluster.yaml, and the agent reads it every
        // 30 s: an alias bomb (a billion laughs) or deep nesting must be
        // refused, not expanded.
        let mut bomb =
            String::from("a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n");
        for (prev, name) in
            ["a", "b", "c", "d", "e", "f", "g", "h"].iter().zip(["b", "c", "d", "e", "f", "g", "h", "i"])
        {
            bomb.push_str(&format!(
                "{name}: &{name} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]\n"
            ));
        }
        bomb.push_str("sleepMode: {enabled: true, autoSleep: {afterInactivity: *i}}\n");
        assert!(parse_vcluster_config(&bomb).is_err(), "expanded");
        let deep = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(parse_vcluster_config(&deep).is_err(), "nested without limit");
    }

    #[test]
    fn annotations_win_over_vcluster_yaml_field_by_field() {
        let a = read(&[(SLEEP_AFTER, "60"), (IGNORE_VERBS, "watch")]);
        let y = yaml("sleepMode: {enabled: true, timeZone: UTC, autoSleep: {afterInactivity: 1h}}");
        let o = a.over(y);
        assert_eq!(
            o.sleep_after.map(|s| (s.value, s.origin)),
            Some((SleepAfter::After(secs(60)), Origin::Annotation(SLEEP_AFTER)))
        );
        assert_eq!(o.timezone.map(|t| t.origin), Some(Origin::VClusterConfig("sleepMode.timeZone")));
        assert!(o.ignore.verbs.is_some());
    }

    fn effective(
        dormant: &[(&str, &str)],
        overlay: &Overlay,
    ) -> (EffectivePolicy, TargetAnnotations, Provenance) {
        let own = TargetAnnotations::parse(&map(dormant)).unwrap();
        let Layered { annotations: merged, provenance: prov, .. } = layer_under(&own, overlay, test_now());
        let mut eff =
            resolve(TargetKind::VCluster, &BTreeMap::new(), &merged, &[], &Defaults::default()).unwrap();
        prov.attribute(&mut eff);
        (eff, merged, prov)
    }

    #[test]
    fn explain_names_the_platforms_annotation_and_dormants_own_wins() {
        let overlay = read(&[
            (SLEEP_AFTER, "1800"),
            (SLEEP_SCHEDULE, "0 19 * * 1-5"),
            (TIMEZONE, "Europe/Berlin"),
            (IGNORE_GROUPS, "ci"),
        ]);
        let (eff, _, _) = effective(&[], &overlay);
        assert_eq!(eff.sleep_after.value, SleepAfter::After(secs(1800)));
        assert_eq!(eff.sleep_after.origin.to_string(), "annotation sleepmode.loft.sh/sleep-after");
        assert_eq!(eff.schedules.origin.to_string(), "annotation sleepmode.loft.sh/sleep-schedule");
        assert_eq!(eff.timezone.origin.to_string(), "annotation sleepmode.loft.sh/timezone");
        assert_eq!(eff.ignore.value.groups, strings(&["ci"]));
        assert_eq!(eff.ignore.origin.to_string(), "annotation sleepmode.loft.sh/ignore-groups");

        let (eff, _, _) = effective(
            &[(vocab::SLEEP_AFTER, "2h"), (vocab::TIMEZONE, "UTC"), (vocab::IGNORE_GROUPS, "ops")],
            &overlay,
        );
        assert_eq!(
            eff.sleep_after,
            Sourced { value: SleepAfter::After(secs(7200)), origin: Origin::Annotation(vocab::SLEEP_AFTER) }
        );
        assert_eq!(
            eff.timezone,
            Sourced { value: chrono_tz::UTC, origin: Origin::Annotation(vocab::TIMEZONE) }
        );
        assert_eq!(
            (eff.ignore.value.groups.clone(), eff.ignore.origin.clone()),
            (strings(&["ops"]), Origin::Annotation(vocab::IGNORE_GROUPS))
        );
        assert_eq!(
            eff.schedules.origin.to_string(),
            "annotation sleepmode.loft.sh/sleep-schedule",
            "fields dormant leaves unset still come from the Platform"
        );
    }

    #[test]
    fn explain_names_the_vcluster_yaml_field() {
        let overlay = read(&[(IGNORE_ACTIVE_CONNECTIONS, "true")]).over(yaml(
            "sleepMode: {enabled: true, timeZone: Asia/Tokyo, autoWakeup: {schedule: \"0 8 * * *\"}}",
        ));
        let (eff, _, _) = effective(&[(vocab::SLEEP_SCHEDULE, "0 20 * * *")], &overlay);
        assert_eq!(eff.timezone.origin.to_string(), "vcluster.yaml sleepMode.timeZone");
        assert_eq!(
            eff.schedules.value[0].wake.as_ref().map(|s| s.to_string()),
            Some("0 8 * * *".into()),
            "dormant's sleep and the yaml's wake form a pair"
        );
        assert_eq!(
            eff.schedules.origin,
            Origin::Annotation(vocab::SLEEP_SCHEDULE),
            "the pair is named by its sleep schedule"
        );
        assert!(eff.ignore.value.active_connections);
        assert_eq!(eff.ignore.origin.to_string(), "annotation sleepmode.loft.sh/ignore-active-connections");
    }

    /// When the tests' layering happens.
    fn test_now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 30, 15, 0, 0).unwrap()
    }

    fn takeover(dormant: &[(&str, &str)], overlay: &[(&str, &str)]) -> Vec<(&'static str, Option<String>)> {
        let own = TargetAnnotations::parse(&map(dormant)).unwrap();
        layer_under(&own, &read(overlay), test_now()).takeover.into_iter().collect()
    }

    #[test]
    fn a_forced_sleep_is_taken_over_as_dormants_force_and_prevent_wakeup() {
        let removed = |mut v: Vec<(&'static str, Option<String>)>| {
            v.extend([(FORCE, None), (FORCE_DURATION, None)]);
            v.sort();
            v
        };
        let now = "2026-03-30T15:00:00.000Z".to_string();
        let (_, merged, prov) = effective(&[], &read(&[(FORCE, "true")]));
        assert_eq!(
            (merged.force_sleep, merged.prevent_wakeup_until),
            (Some(ForceSleep::Since(test_now())), None)
        );
        assert_eq!(prov.force, Some(Origin::Annotation(FORCE)));
        assert_eq!(takeover(&[], &[(FORCE, "true")]), removed(vec![(vocab::FORCE_SLEEP, Some(now.clone()))]));

        let (_, merged, _) = effective(&[], &read(&[(FORCE, "true"), (FORCE_DURATION, "0")]));
        assert_eq!(merged.prevent_wakeup_until, Some(Until::Never));
        assert_eq!(
            takeover(&[], &[(FORCE_DURATION, "0")]),
            removed(vec![
                (vocab::FORCE_SLEEP, Some(now.clone())),
                (vocab::PREVENT_WAKEUP_UNTIL, Some("never".into()))
            ]),
            "force-duration implies force"
        );

        let asleep = &[(FORCE, "true"), (FORCE_DURATION, "600"), (SLEEPING_SINCE, "1774883460")];
        let (_, merged, _) = effective(&[], &read(asleep));
        assert_eq!(merged.force_sleep, Some(ForceSleep::Since(at(1_774_883_460))));
        assert_eq!(
            merged.prevent_wakeup_until,
            Some(Until::Time(at(1_774_884_060))),
            "from when the Platform put it to sleep"
        );

        let dormant_asleep = [(vocab::STATE, "asleep"), (vocab::ASLEEP_SINCE, "2026-03-30T12:00:00Z")];
        let (_, merged, _) = effective(&dormant_asleep, &read(&[(FORCE_DURATION, "60")]));
        assert_eq!(
            merged.prevent_wakeup_until,
            Some(Until::Time(Utc.with_ymd_and_hms(2026, 3, 30, 12, 1, 0).unwrap())),
            "else from when dormant put it to sleep"
        );
        let (_, merged, _) = effective(
            &[(vocab::STATE, "awake"), (vocab::ASLEEP_SINCE, "2026-03-30T12:00:00Z")],
            &read(&[(FORCE_DURATION, "60")]),
        );
        assert_eq!(
            merged.prevent_wakeup_until,
            Some(Until::Time(Utc.with_ymd_and_hms(2026, 3, 30, 15, 1, 0).unwrap())),
            "else from now: an earlier sleep of dormant's is over"
        );

        let (_, merged, prov) = effective(
            &[(vocab::PREVENT_WAKEUP_UNTIL, "never")],
            &read(&[(FORCE, "true"), (FORCE_DURATION, "60")]),
        );
        assert_eq!(merged.prevent_wakeup_until, Some(Until::Never), "dormant's own prevent-wakeup wins");
        assert_eq!(prov.force, Some(Origin::Annotation(FORCE)), "the forced sleep is still the Platform's");
        let forced = [(vocab::FORCE_SLEEP, "2026-03-30T14:00:00Z")];
        let (_, merged, prov) = effective(&forced, &read(&[(FORCE, "true")]));
        assert_eq!((merged.force_sleep, prov.force), (Some(ForceSleep::Since(at(1_774_879_200))), None));
        assert_eq!(
            takeover(&forced, &[(FORCE, "true")]),
            removed(vec![]),
            "already forced by dormant: the Platform's key is only removed"
        );
        assert_eq!(takeover(&[], &[(SLEEP_AFTER, "60")]), vec![], "no force: nothing written");
    }

    #[test]
    fn the_platforms_last_activity_continues_the_idle_clock_until_dormant_records_one() {
        let o = read(&[(LAST_ACTIVITY, "1774800000")]);
        let (_, merged, prov) = effective(&[], &o);
        assert_eq!(merged.last_activity, Some(at(1_774_800_000)));
        assert_eq!(
            prov.last_activity.map(|o| o.to_string()),
            Some("annotation sleepmode.loft.sh/last-activity".into())
        );
        let (_, merged, _) = effective(&[(vocab::LAST_ACTIVITY, "2026-04-01T00:00:00Z")], &o);
        assert_eq!(merged.last_activity, Some(Utc.with_ymd_and_hms(2026, 4, 1, 0, 0, 0).unwrap()));
    }

    #[test]
    fn migrating_a_platform_annotated_namespace() {
        let now = Utc.with_ymd_and_hms(2026, 5, 4, 10, 0, 0).unwrap();
        let plan = plan_migration(
            &map(&[
                (SLEEP_AFTER, "5400"),
                (SLEEP_SCHEDULE, "CRON_TZ=Europe/Berlin 0 19 * * 1-5"),
                (WAKEUP_SCHEDULE, "0 8 * * 1-5"),
                (TIMEZONE, "CET#3600"),
                (FORCE, "true"),
                (FORCE_DURATION, "3600"),
                (IGNORE_ALL, "false"),
                (IGNORE_USER_AGENTS, "argo*"),
                (IGNORE_RESOURCES, "configmaps,leases.coordination.k8s.io"),
                (IGNORE_RESOURCE_NAMES, "secrets=token"),
                (IGNORE_RESOURCE_VERBS, "pods=get"),
                (IGNORE_ACTIVE_CONNECTIONS, "true"),
                (IGNORE_INGRESSES, "true"),
                (DELETE_AFTER, "604800"),
                (LAST_ACTIVITY, "1777888800"),
                (vocab::IGNORE_VERBS, "watch"),
                (vocab::SLEEP_AFTER, "2h"),
            ]),
            None,
            now,
        )
        .unwrap();
        assert_eq!(
            plan.annotations,
            map(&[
                (vocab::SLEEP_SCHEDULE, "0 19 * * 1-5"),
                (vocab::WAKE_SCHEDULE, "0 8 * * 1-5"),
                (vocab::TIMEZONE, "Etc/GMT-1"),
                (vocab::FORCE_SLEEP, "true"),
                (vocab::PREVENT_WAKEUP_UNTIL, "2026-05-04T11:00:00.000Z"),
                (vocab::IGNORE_USER_AGENTS, "argo*"),
                (vocab::IGNORE_RESOURCES, "configmaps,leases.coordination.k8s.io"),
                (vocab::LAST_ACTIVITY, "2026-05-04T10:00:00.000Z"),
            ])
        );
        let outcome = |source: &str| {
            plan.steps.iter().filter(|s| s.source == source).map(|s| s.outcome.clone()).collect::<Vec<_>>()
        };
        assert_eq!(
            outcome("annotation sleepmode.loft.sh/sleep-after"),
            vec![Outcome::Kept { key: vocab::SLEEP_AFTER, existing: "2h".into() }]
        );
        assert!(
            matches!(&outcome("annotation sleepmode.loft.sh/ignore-active-connections")[..], [Outcome::Policy(p)] if p == "spec.ignore.activeConnections: true")
        );
        assert!(
            matches!(&outcome("annotation sleepmode.loft.sh/delete-after")[..], [Outcome::Policy(p)] if p.starts_with("spec.deleteAfter: 7d"))
        );
        assert!(
            matches!(&outcome("annotation sleepmode.loft.sh/ignore-ingresses")[..], [Outcome::Nothing(why)] if why.contains("ingress"))
        );
        assert!(
            matches!(&outcome("annotation sleepmode.loft.sh/ignore-resource-names")[..], [Outcome::Policy(p)] if p.contains("names: [\"token\"]"))
        );
        assert!(
            matches!(&outcome("annotation sleepmode.loft.sh/ignore-resource-verbs")[..], [Outcome::Nothing(why)] if why.contains("verbs"))
        );
    }

    #[test]
    fn migrated_annotations_mean_what_the_platforms_meant() {
        let platform = map(&[
            (SLEEP_AFTER, "1800"),
            (SLEEP_SCHEDULE, "0 19 * * 1-5"),
            (TIMEZONE, "EST#-18000"),
            (IGNORE_ALL, "true"),
            (IGNORE_GROUPS, "ci"),
            (IGNORE_VERBS, "watch,list"),
            (IGNORE_RESOURCES, "pods/log,deployments.apps"),
        ]);
        let yaml_text = "sleepMode: {enabled: true, autoWakeup: {schedule: \"0 7 * * 1-5\"}}";
        let plan = plan_migration(&platform, Some(yaml_text), Utc::now()).unwrap();
        let overlay = parse_annotations(&platform).unwrap().over(yaml(yaml_text));
        let (through_platform, _, _) = effective(&[], &overlay);
        let migrated = TargetAnnotations::parse(&plan.annotations).unwrap();
        let after =
            resolve(TargetKind::VCluster, &BTreeMap::new(), &migrated, &[], &Defaults::default()).unwrap();
        assert_eq!(after.sleep_after.value, through_platform.sleep_after.value);
        assert_eq!(after.schedules.value, through_platform.schedules.value);
        assert_eq!(after.timezone.value, through_platform.timezone.value);
        assert_eq!(after.ignore.value, through_platform.ignore.value);
        assert_eq!(
            plan.annotations.get(vocab::WAKE_SCHEDULE).map(String::as_str),
            Some("0 7 * * 1-5"),
            "from vcluster.yaml"
        );
    }

    #[test]
    fn migration_refuses_bad_settings_and_plans_workload_exclusion() {
        let e = plan_migration(&map(&[(SLEEP_AFTER, "1h")]), None, Utc::now()).unwrap_err();
        assert_eq!(e.category(), "loft-annotation-invalid");
        assert!(e.to_string().contains(SLEEP_AFTER), "{e}");
        let e = plan_migration(&map(&[]), Some("sleepMode: {enabled: true, timeZone: Nowhere}"), Utc::now())
            .unwrap_err();
        assert_eq!(e.category(), "vcluster-config-invalid");
        assert_eq!(
            plan_workload_migration(&map(&[(EXCLUDE, "true")])),
            Ok(Some((vocab::EXCLUDE, "true".into())))
        );
        assert_eq!(
            plan_workload_migration(&map(&[(EXCLUDE, "true"), (vocab::EXCLUDE, "false")])),
            Ok(None),
            "dormant's own kept"
        );
        assert_eq!(plan_workload_migration(&map(&[(EXCLUDE, "false")])), Ok(None));
        assert!(plan_workload_migration(&map(&[(EXCLUDE, "maybe")])).is_err());
    }
}
