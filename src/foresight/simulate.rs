//! What-if: what one or several policies would do to a target over a
//! period — every transition (in local time and UTC), hours awake, cold
//! starts, pre-wakes and money — computed by the agent's own decision core
//! ([`decide`]), stepping from deadline to deadline and use to use, so what
//! it says is what the agent would do.
//!
//! The agent is modelled as acting at once: a transition happens at the
//! instant the decision changes, a use is recorded at its instant (before
//! the decision for that instant, so a use at the very instant of an idle
//! deadline keeps the target awake), and waking takes no time. A **cold
//! start** is a use that finds the target asleep (whether or not it wakes
//! it). With `wake.predictive`, the simulation learns the target's profile
//! from the uses it replays, as the agent would from its flushes, and the
//! pre-wakes come from [`predict::edges`] at each local midnight.

use std::fmt::Write as _;
use std::sync::Arc;

use chrono::{DateTime, NaiveDate, NaiveTime, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use super::predict::{self, Edges};
use super::profile::{HOURS, Profile, QUIET_SECS, hour_of_week, local_instant};
use crate::policy::annotations::TargetAnnotations;
use crate::policy::decide::{Current, Desired, Forced, Inputs, LastUse, PredictedWake, Reason, decide};
use crate::policy::{Candidate, Defaults, EffectivePolicy, ResolveError, TargetKind, resolve};
use crate::target::workload::Requests;

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// The target as the period begins (what `decide::Inputs` holds besides
/// the policy).
#[derive(Debug, Clone)]
pub struct Start {
    pub current: Current,
    pub last_use: Option<LastUse>,
    pub first_seen: DateTime<Utc>,
    pub forced: Option<Forced>,
}

impl Start {
    /// A target first seen, awake, at `at`.
    pub fn fresh(at: DateTime<Utc>) -> Start {
        Start { current: Current::Awake, last_use: None, first_seen: at, forced: None }
    }
}

/// One target over one period.
#[derive(Debug, Clone)]
pub struct Scenario<'a> {
    /// How it is named in the output (`namespace/shop`).
    pub target: String,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub start: Start,
    /// Counted uses (any order; those outside the period are ignored):
    /// recorded ones replayed, or [`expected_uses`].
    pub uses: &'a [DateTime<Utc>],
    /// The target's profile as of `from`, if it has one.
    pub profile: Option<&'a Profile>,
    /// What the target requests while awake (what sleeping saves).
    pub requests: Requests,
}

/// A state a transition leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Awake,
    Asleep,
}

/// One transition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Transition {
    pub at: DateTime<Utc>,
    /// The same instant in the policy's time zone, RFC 3339 with its offset.
    pub local: String,
    pub to: State,
    /// `idle`, `schedule`, `predicted`, `request`, `manual`, `new`.
    pub trigger: String,
    pub reason: String,
}

/// A use that found the target asleep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ColdStart {
    pub at: DateTime<Utc>,
    pub local: String,
    /// It was the day's first use (the first after at least four quiet
    /// hours, first of its local day): the one a pre-wake is for.
    pub first_of_day: bool,
}

/// Wakes ahead of a predicted first use.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PreWakes {
    /// Wakes whose trigger was `predicted`.
    pub count: usize,
    /// Used before the target slept again: a cold start avoided.
    pub used: usize,
    /// Not used before it slept again.
    pub unused: usize,
    /// Awake hours they cost: until the first use, or until the sleep.
    pub hours: f64,
}

/// Money, from the policy's pricing and the target's requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cost {
    pub currency: String,
    pub per_hour: f64,
    /// What running while awake costs.
    pub awake: f64,
    /// What running all the period would cost.
    pub always_on: f64,
    /// `always_on - awake`.
    pub saved: f64,
}

/// One policy over the period.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Run {
    pub target: String,
    pub policy: String,
    pub timezone: String,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub transitions: Vec<Transition>,
    pub hours_awake: f64,
    pub hours_asleep: f64,
    pub uses: usize,
    pub cold_starts: Vec<ColdStart>,
    pub first_of_day_cold_starts: usize,
    pub pre_wakes: PreWakes,
    /// Every pre-wake the decision was given, oldest first.
    pub predicted: Vec<PredictedWake>,
    pub cost: Cost,
}

/// A run set against the first policy of a comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Compared {
    #[serde(flatten)]
    pub run: Run,
    /// Money saved compared with the baseline (negative: it costs more).
    pub saved_vs_baseline: f64,
    /// Awake hours more than the baseline (negative: fewer).
    pub extra_hours_awake: f64,
    /// Cold starts more than the baseline (negative: fewer).
    pub extra_cold_starts: i64,
}

/// Several policies over the same scenario; the first is the baseline
/// (the target's current policy).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Comparison {
    pub target: String,
    pub baseline: String,
    pub runs: Vec<Compared>,
}

/// The effective policy `candidate` would give this target: resolved as if
/// the target's `policy` annotation named it (its other annotations still
/// apply), for "what would this file do here".
pub fn with_policy(
    kind: TargetKind,
    namespace_labels: &std::collections::BTreeMap<String, String>,
    annotations: &TargetAnnotations,
    candidate: Arc<Candidate>,
    defaults: &Defaults,
) -> Result<EffectivePolicy, ResolveError> {
    let mut a = annotations.clone();
    a.policy = Some(candidate.name.clone());
    resolve(kind, namespace_labels, &a, &[candidate], defaults)
}

fn local(t: DateTime<Utc>, tz: Tz) -> String {
    t.with_timezone(&tz).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn hours(d: chrono::Duration) -> f64 {
    d.num_milliseconds() as f64 / 3_600_000.0
}

/// Tells the day's first uses in a stream of uses in time order.
struct FirstOfDay {
    tz: Tz,
    last: Option<DateTime<Utc>>,
    day: Option<NaiveDate>,
}

impl FirstOfDay {
    fn observe(&mut self, u: DateTime<Utc>) -> bool {
        let start = self.last.is_none_or(|l| (u - l).num_seconds() >= QUIET_SECS);
        let day = u.with_timezone(&self.tz).date_naive();
        let first = start && self.day != Some(day);
        if first {
            self.day = Some(day);
        }
        self.last = Some(u);
        first
    }
}

/// The next local midnight after `t`.
fn next_midnight(tz: Tz, t: DateTime<Utc>) -> DateTime<Utc> {
    let today = t.with_timezone(&tz).date_naive();
    let m = local_instant(tz, today.succ_opt().unwrap_or(today).and_time(NaiveTime::MIN));
    if m > t { m } else { t + chrono::Duration::days(1) }
}

/// What `policy` (named `name`) would do over the scenario.
pub fn simulate(name: &str, policy: &EffectivePolicy, sc: &Scenario<'_>) -> Run {
    let tz = policy.timezone.value;
    let (from, to) = (sc.from, sc.to.max(sc.from));
    let mut uses: Vec<DateTime<Utc>> = sc.uses.iter().copied().filter(|u| *u >= from && *u < to).collect();
    uses.sort_unstable();
    let cfg = policy.wake_predictive.value;
    let mut profile: Option<Profile> = sc.profile.cloned();
    let mut pending: Vec<(DateTime<Utc>, u64)> = Vec::new();
    let mut pending_cold: Vec<DateTime<Utc>> = Vec::new();
    let mut edges = Edges::default();
    let mut refresh = cfg.map(|_| from);
    let mut predicted: Vec<PredictedWake> = Vec::new();
    let mut state = sc.start.current;
    let mut last_use = sc.start.last_use.clone();
    let mut first_of_day = FirstOfDay { tz, last: last_use.as_ref().map(|u| u.at), day: None };
    let mut transitions = Vec::new();
    let mut cold_starts = Vec::new();
    let mut awake = chrono::Duration::zero();
    let mut t = from;
    let mut i = 0;
    loop {
        while let Some(&u) = uses.get(i).filter(|u| **u <= t) {
            i += 1;
            let first = first_of_day.observe(u);
            if matches!(state, Current::Asleep { .. }) {
                cold_starts.push(ColdStart { at: u, local: local(u, tz), first_of_day: first });
                pending_cold.push(u);
            }
            last_use = Some(LastUse { at: u, by: "simulated use".into(), manual: false });
            pending.push((u, 1));
        }
        if let (Some(c), Some(r)) = (cfg.as_ref(), refresh)
            && t >= r
        {
            if !pending.is_empty() || !pending_cold.is_empty() {
                let mut p = profile.take().filter(|p| p.tz() == tz).unwrap_or_else(|| Profile::new(tz, t));
                p.record(&pending, &pending_cold, t);
                profile = Some(p);
                pending.clear();
                pending_cold.clear();
            }
            edges = predict::edges(profile.as_ref(), Some(c), tz, t);
            for w in &edges.wakes {
                if !predicted.contains(w) {
                    predicted.push(*w);
                }
            }
            refresh = Some(next_midnight(tz, t));
        }
        // A transition changes an input (the current state): the agent
        // looks again at once, for its next deadline.
        let mut deadline = None;
        for _ in 0..3 {
            let inputs = Inputs {
                policy,
                current: state,
                last_use: last_use.clone(),
                first_seen: sc.start.first_seen,
                forced: sc.start.forced,
                unverified_wake: None,
                predicted: &edges.wakes,
            };
            let decision = decide(&inputs, t);
            deadline = decision.next;
            let to_state = match (decision.desired, state) {
                (Desired::Asleep, Current::Awake) => Some((Current::Asleep { since: t }, State::Asleep)),
                (Desired::Awake, Current::Asleep { .. }) => Some((Current::Awake, State::Awake)),
                _ => None,
            };
            let Some((s, to_state)) = to_state else { break };
            state = s;
            transitions.push(transition(t, tz, to_state, &decision.reason));
        }
        let mut next = to;
        for c in [deadline, uses.get(i).copied(), refresh].into_iter().flatten() {
            if c > t {
                next = next.min(c);
            }
        }
        if matches!(state, Current::Awake) {
            awake += next - t;
        }
        if next >= to {
            break;
        }
        t = next;
    }
    predicted.sort_by_key(|w| w.at);
    let pre_wakes = pre_wakes(&transitions, &uses, to);
    let total = hours(to - from);
    let hours_awake = hours(awake);
    let pricing = &policy.pricing.value;
    let per_hour = sc.requests.cpu_cores * pricing.cpu_core_hour
        + sc.requests.memory_bytes / GIB * pricing.memory_gib_hour;
    Run {
        target: sc.target.clone(),
        policy: name.to_string(),
        timezone: tz.name().to_string(),
        from,
        to,
        first_of_day_cold_starts: cold_starts.iter().filter(|c| c.first_of_day).count(),
        transitions,
        hours_awake,
        hours_asleep: total - hours_awake,
        uses: uses.len(),
        cold_starts,
        pre_wakes,
        predicted,
        cost: Cost {
            currency: pricing.currency.clone(),
            per_hour,
            awake: hours_awake * per_hour,
            always_on: total * per_hour,
            saved: (total - hours_awake) * per_hour,
        },
    }
}

fn transition(at: DateTime<Utc>, tz: Tz, to: State, reason: &Reason) -> Transition {
    Transition { at, local: local(at, tz), to, trigger: reason.trigger().into(), reason: reason.to_string() }
}

fn pre_wakes(transitions: &[Transition], uses: &[DateTime<Utc>], to: DateTime<Utc>) -> PreWakes {
    let mut out = PreWakes::default();
    for (k, tr) in transitions.iter().enumerate() {
        if tr.to != State::Awake || tr.trigger != "predicted" {
            continue;
        }
        let end = transitions[k + 1..].iter().find(|x| x.to == State::Asleep).map_or(to, |x| x.at);
        let i = uses.partition_point(|u| *u < tr.at);
        out.count += 1;
        match uses.get(i).filter(|u| **u < end) {
            Some(u) => {
                out.used += 1;
                out.hours += hours(*u - tr.at);
            }
            None => {
                out.unused += 1;
                out.hours += hours(end - tr.at);
            }
        }
    }
    out
}

/// Each policy over the same scenario, set against the first.
pub fn compare(policies: &[(String, EffectivePolicy)], sc: &Scenario<'_>) -> Comparison {
    let runs: Vec<Run> = policies.iter().map(|(name, p)| simulate(name, p, sc)).collect();
    let baseline = runs.first().map(|r| (r.policy.clone(), r.cost.awake, r.hours_awake, r.cold_starts.len()));
    Comparison {
        target: sc.target.clone(),
        baseline: baseline.as_ref().map(|b| b.0.clone()).unwrap_or_default(),
        runs: runs
            .into_iter()
            .map(|run| {
                let (cost, hours, cold) = baseline.as_ref().map_or((0.0, 0.0, 0), |b| (b.1, b.2, b.3));
                Compared {
                    saved_vs_baseline: cost - run.cost.awake,
                    extra_hours_awake: run.hours_awake - hours,
                    extra_cold_starts: run.cold_starts.len() as i64 - cold as i64,
                    run,
                }
            })
            .collect(),
    }
}

/// The uses a profile expects over `[from, to)`. Each local hour of the
/// week in use in at least half of the recent weeks (decay-weighted) gets
/// its average number of uses (1 to 60), spread evenly. Then, on a day the
/// profile recorded (before the day of its latest use), the recorded first
/// use replaces what came before it, and a day without one has no use at
/// all (past weeks replay their mornings and days off); on any other day a
/// first use predicted with confidence of at least one half is added, and
/// replaces what came before it. Periods longer than 400 days are cut
/// there.
pub fn expected_uses(profile: &Profile, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<DateTime<Utc>> {
    let tz = profile.tz();
    let activity = profile.activity(from);
    let uses = profile.uses(from);
    let active = profile.active(from);
    let last_day = profile.last_use().map(|t| profile.date_of(t));
    let mut out = Vec::new();
    let mut day = profile.date_of(from);
    let end = profile.date_of(to);
    for _ in 0..400 {
        if day > end {
            break;
        }
        let mut today: Vec<DateTime<Utc>> = Vec::new();
        for naive in (0..24).filter_map(|h| day.and_hms_opt(h, 0, 0)) {
            let b = hour_of_week(naive);
            let at = local_instant(tz, naive);
            // An hour skipped by daylight saving has no use; a repeated
            // one is taken once.
            if b >= HOURS
                || activity[b] < 0.5
                || active[b] <= 0.0
                || at.with_timezone(&tz).naive_local() != naive
            {
                continue;
            }
            let n = (uses[b] / active[b]).round().clamp(1.0, 60.0) as i64;
            today.extend((0..n).map(|k| at + chrono::Duration::milliseconds((2 * k + 1) * 1_800_000 / n)));
        }
        if last_day.is_some_and(|l| day < l) && predict::observed(profile, day) {
            match profile.first_use_on(day) {
                Some(t) => {
                    let first = local_instant(tz, day.and_time(t));
                    today.retain(|u| *u > first);
                    today.push(first);
                }
                None => today.clear(),
            }
        } else if let Some(p) = predict::first_use(profile, day).filter(|p| p.confidence >= 0.5) {
            // The day's first use: the hour's uses spread before it are
            // not expected.
            today.retain(|u| *u > p.at);
            today.push(p.at);
        }
        out.extend(today.into_iter().filter(|u| *u >= from && *u < to));
        let Some(next) = day.succ_opt() else { break };
        day = next;
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// A table for people: one row per policy, and each run's transitions
/// when `transitions` is set.
pub fn render(comparisons: &[Comparison], transitions: bool) -> String {
    let mut out = String::new();
    for c in comparisons {
        let Some(first) = c.runs.first() else { continue };
        let r = &first.run;
        let tz: Tz = r.timezone.parse().unwrap_or(chrono_tz::UTC);
        let _ = writeln!(
            out,
            "{}: {} to {} ({}), {:.0} h",
            c.target,
            r.from.with_timezone(&tz).format("%Y-%m-%d %H:%M %Z"),
            r.to.with_timezone(&tz).format("%Y-%m-%d %H:%M %Z"),
            r.timezone,
            hours(r.to - r.from)
        );
        let header = [
            "POLICY",
            "AWAKE H",
            "ASLEEP H",
            "USES",
            "COLD STARTS",
            "FIRST OF DAY",
            "PRE-WAKES USED/UNUSED",
            "SAVED",
            "VS BASELINE",
        ];
        let rows: Vec<Vec<String>> = c
            .runs
            .iter()
            .enumerate()
            .map(|(k, x)| {
                let r = &x.run;
                vec![
                    if k == 0 { format!("{} (baseline)", r.policy) } else { r.policy.clone() },
                    format!("{:.1}", r.hours_awake),
                    format!("{:.1}", r.hours_asleep),
                    r.uses.to_string(),
                    r.cold_starts.len().to_string(),
                    r.first_of_day_cold_starts.to_string(),
                    if r.pre_wakes.count == 0 {
                        "-".into()
                    } else {
                        format!("{}/{}", r.pre_wakes.used, r.pre_wakes.unused)
                    },
                    format!("{:.2} {}", r.cost.saved, r.cost.currency),
                    if k == 0 {
                        "-".into()
                    } else {
                        format!("{:+.2} {}", x.saved_vs_baseline, r.cost.currency)
                    },
                ]
            })
            .collect();
        table(&mut out, &header, &rows);
        if transitions {
            for x in &c.runs {
                let _ = writeln!(out, "\n{} — {} transitions:", x.run.policy, x.run.transitions.len());
                for t in &x.run.transitions {
                    let at = t.at.with_timezone(&tz);
                    let _ = writeln!(
                        out,
                        "  {}  {}  {:<6}  {:<9}  {}",
                        at.format("%a %Y-%m-%d %H:%M:%S %Z"),
                        t.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                        match t.to {
                            State::Awake => "awake",
                            State::Asleep => "asleep",
                        },
                        t.trigger,
                        t.reason
                    );
                }
            }
        }
        out.push('\n');
    }
    out
}

fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, v) in r.iter().enumerate() {
            if let Some(w) = width.get_mut(i) {
                *w = (*w).max(v.chars().count());
            }
        }
    }
    let mut line = |vals: &[&str]| {
        let mut l = String::new();
        for (i, v) in vals.iter().enumerate() {
            let w = width.get(i).copied().unwrap_or(0);
            if i == 0 {
                let _ = write!(l, "{v:<w$}");
            } else {
                let _ = write!(l, "  {v:>w$}");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header);
    for r in rows {
        let v: Vec<&str> = r.iter().map(String::as_str).collect();
        line(&v);
    }
}

#[cfg(test)]
mod tests;
