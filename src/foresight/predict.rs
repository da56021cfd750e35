//! Predicting a target's first use of a day from its profile, and the
//! pre-wake that follows from it under a policy's `wake.predictive`.
//!
//! The rule, for a local date D:
//! - The days looked at are the same weekday in the [`WEEKS`] weeks before
//!   D, each weighted by [`DECAY_PER_WEEK`] per week of age. While fewer
//!   than [`MIN_SAME_WEEKDAY`] of them were observed (recording began after
//!   them), the [`POOLED_DAYS`] days before D of the same kind (Monday to
//!   Friday, or Saturday and Sunday) are looked at instead, weighted the
//!   same way by their age.
//! - A day "had a use" when its first use (the first use after at least
//!   [`QUIET_SECS`](super::profile::QUIET_SECS) without any) was recorded.
//!   It counts as observed when it had a use, or when recording began by
//!   its local midnight (a day partly before recording says nothing by
//!   having no use).
//! - Confidence: the fraction of the observed days that had a use (each
//!   day counts the same: one holiday among eight weeks is one eighth).
//! - Predicted first use: the weighted [`QUANTILE`] of those days' first-use
//!   times (a low quantile: wake before most mornings, robust to one odd
//!   day). The latest usual first use: the weighted [`LATE_QUANTILE`], at
//!   most [`MAX_HOLD_SECS`] after the predicted one.
//! - Pre-wake: `lead` before the predicted first use, never before D's local
//!   midnight (so it is known when D begins), when confidence is at least
//!   the policy's threshold; unless used, the target then waits until `lead`
//!   after the latest usual first use (and at least `sleepAfter`): the lead
//!   is a margin on both sides of the usual first-use window.
//!
//! A prediction for D reads only days before D, so it does not move during D.

use chrono::{DateTime, Datelike, NaiveDate, NaiveTime, Utc, Weekday};
use chrono_tz::Tz;
use serde::Serialize;

use super::profile::{DECAY_PER_WEEK, Profile, local_instant};
use crate::policy::Predictive;
use crate::policy::decide::PredictedWake;

/// Weeks of the same weekday a prediction reads.
pub const WEEKS: i64 = 8;
/// Below this many observed same weekdays, days of the same kind are pooled.
pub const MIN_SAME_WEEKDAY: usize = 3;
/// How many days back the pooled rule reads.
pub const POOLED_DAYS: i64 = 7;
/// The quantile of first-use times predicted.
pub const QUANTILE: f64 = 0.2;
/// The quantile of first-use times a pre-wake waits for (plus the lead).
pub const LATE_QUANTILE: f64 = 0.9;
/// The latest usual first use is at most this long after the predicted one.
pub const MAX_HOLD_SECS: i64 = 3600;
/// How many past days' pre-wakes [`edges`] passes to the decision.
pub const PAST_DAYS: i64 = 7;

/// Which days a prediction read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Basis {
    /// The same weekday in recent weeks.
    Weekday,
    /// The last week's Mondays to Fridays.
    Workdays,
    /// The last week's Saturday and Sunday.
    Weekend,
}

/// The predicted first use of one local day.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Prediction {
    pub date: NaiveDate,
    /// Local wall-clock time.
    pub local_time: NaiveTime,
    pub at: DateTime<Utc>,
    /// The latest usual first use (local, and its instant).
    pub latest_local_time: NaiveTime,
    pub latest: DateTime<Utc>,
    /// Fraction of the observed days that had a first use.
    pub confidence: f64,
    /// Observed days read, and how many of them had a first use.
    pub days: usize,
    pub days_used: usize,
    pub basis: Basis,
}

fn workday(d: NaiveDate) -> bool {
    !matches!(d.weekday(), Weekday::Sat | Weekday::Sun)
}

/// A day the profile can speak for: it had a recorded first use, or
/// recording began by its local midnight.
pub fn observed(profile: &Profile, d: NaiveDate) -> bool {
    profile.first_use_on(d).is_some()
        || local_instant(profile.tz(), d.and_time(NaiveTime::MIN)) >= profile.since()
}

/// The predicted first use of local date `date` (in the profile's time
/// zone), from the days before it; `None` when no day it reads was observed
/// or none had a use. Meant for today or earlier: a later date's pooled days
/// may not be over yet.
pub fn first_use(profile: &Profile, date: NaiveDate) -> Option<Prediction> {
    let tz = profile.tz();
    let observed = |d: NaiveDate| d < date && observed(profile, d);
    let mut days: Vec<(f64, Option<NaiveTime>)> = (1..=WEEKS)
        .filter_map(|k| {
            let d = date - chrono::Duration::days(7 * k);
            observed(d).then(|| (DECAY_PER_WEEK.powi(k as i32), profile.first_use_on(d)))
        })
        .collect();
    let mut basis = Basis::Weekday;
    if days.len() < MIN_SAME_WEEKDAY {
        basis = if workday(date) { Basis::Workdays } else { Basis::Weekend };
        days = (1..=POOLED_DAYS)
            .filter_map(|j| {
                let d = date - chrono::Duration::days(j);
                (observed(d) && workday(d) == workday(date))
                    .then(|| (DECAY_PER_WEEK.powf(j as f64 / 7.0), profile.first_use_on(d)))
            })
            .collect();
    }
    let mut used: Vec<(NaiveTime, f64)> = days.iter().filter_map(|(w, t)| t.map(|t| (t, *w))).collect();
    used.sort_by_key(|(t, _)| *t);
    let local_time = quantile(&used, QUANTILE)?;
    let at = local_instant(tz, date.and_time(local_time));
    let latest_local_time = quantile(&used, LATE_QUANTILE)?;
    let latest = local_instant(tz, date.and_time(latest_local_time))
        .clamp(at, at + chrono::Duration::seconds(MAX_HOLD_SECS));
    Some(Prediction {
        date,
        local_time,
        at,
        latest_local_time: latest.with_timezone(&tz).time(),
        latest,
        confidence: used.len() as f64 / days.len() as f64,
        days: days.len(),
        days_used: used.len(),
        basis,
    })
}

/// The weighted `q` quantile of sorted (time, weight) samples.
fn quantile(sorted: &[(NaiveTime, f64)], q: f64) -> Option<NaiveTime> {
    let total: f64 = sorted.iter().map(|(_, w)| w).sum();
    let mut acc = 0.0;
    for (t, w) in sorted {
        acc += w;
        if acc >= q * total - 1e-9 {
            return Some(*t);
        }
    }
    sorted.last().map(|(t, _)| *t)
}

/// The pre-wake of local date `date` under `cfg`, when the prediction is
/// confident enough.
pub fn pre_wake(profile: &Profile, date: NaiveDate, cfg: &Predictive) -> Option<PredictedWake> {
    let p = first_use(profile, date)?;
    if p.confidence + 1e-9 < cfg.confidence {
        return None;
    }
    let midnight = local_instant(profile.tz(), date.and_time(NaiveTime::MIN));
    let lead = chrono::Duration::from_std(cfg.lead).unwrap_or_default();
    Some(PredictedWake { at: (p.at - lead).max(midnight), predicted_use: p.at, until: p.latest + lead })
}

/// What the decision needs at one instant.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Edges {
    /// The pre-wakes of the last [`PAST_DAYS`] days and today, oldest first:
    /// pass them as `decide::Inputs::predicted`.
    pub wakes: Vec<PredictedWake>,
    /// The next local midnight, when tomorrow's pre-wake becomes known:
    /// look again then (`None` when nothing is predicted at all).
    pub refresh_at: Option<DateTime<Utc>>,
}

/// The pre-wakes in force at `now` for a target whose policy has `cfg`
/// (`None`: predictive pre-wake is off) and whose time zone is `tz`. A
/// profile kept in another time zone predicts nothing (it is rebuilt at the
/// next flush).
pub fn edges(profile: Option<&Profile>, cfg: Option<&Predictive>, tz: Tz, now: DateTime<Utc>) -> Edges {
    let (Some(profile), Some(cfg)) = (profile, cfg) else { return Edges::default() };
    if profile.tz() != tz {
        return Edges::default();
    }
    let today = profile.date_of(now);
    let wakes = (0..=PAST_DAYS)
        .rev()
        .filter_map(|k| pre_wake(profile, today - chrono::Duration::days(k), cfg))
        .collect();
    let tomorrow = today.succ_opt().unwrap_or(today);
    Edges { wakes, refresh_at: Some(local_instant(tz, tomorrow.and_time(NaiveTime::MIN))) }
}

#[cfg(test)]
mod tests;

/// What `dormant explain` can say about a target's profile and pre-wake,
/// as (label, text) lines: the rhythm (local hours in use in at least half
/// the recent weeks), today's predicted first use, the pre-wake in force
/// or why there is none, and the latest cold starts.
pub fn describe(
    profile: &Profile,
    cfg: Option<&Predictive>,
    now: DateTime<Utc>,
) -> Vec<(&'static str, String)> {
    let tz = profile.tz();
    let mut out = vec![(
        "Profile",
        format!(
            "recorded since {} ({}), last use {}",
            profile.since().with_timezone(&tz).format("%Y-%m-%d %H:%M %Z"),
            tz.name(),
            profile
                .last_use()
                .map_or("none".into(), |t| t.with_timezone(&tz).format("%Y-%m-%d %H:%M %Z").to_string())
        ),
    )];
    out.push(("Rhythm", rhythm(&profile.activity(now))));
    let today = profile.date_of(now);
    let first = first_use(profile, today);
    out.push((
        "First use",
        match &first {
            Some(f) => format!(
                "today predicted at {} (confidence {:.2} over {} {} day(s), {} with a use)",
                f.local_time.format("%H:%M"),
                f.confidence,
                f.days,
                match f.basis {
                    Basis::Weekday => "same-weekday",
                    Basis::Workdays => "recent workday",
                    Basis::Weekend => "recent weekend",
                },
                f.days_used
            ),
            None => "nothing to predict today from (no observed day like it with a use)".into(),
        },
    ));
    if let Some(cfg) = cfg {
        let lead = crate::policy::duration::format(cfg.lead);
        out.push((
            "Pre-wake",
            match (pre_wake(profile, today, cfg), &first) {
                (Some(w), _) => format!(
                    "today at {} ({lead} before the predicted first use)",
                    w.at.with_timezone(&tz).format("%H:%M %Z")
                ),
                (None, Some(f)) => {
                    format!("none today: confidence {:.2} is below {:.2}", f.confidence, cfg.confidence)
                }
                (None, None) => "none today: no prediction".into(),
            },
        ));
    }
    let cold = profile.cold_starts();
    if !cold.is_empty() {
        let latest: Vec<String> = cold
            .iter()
            .rev()
            .take(3)
            .map(|t| t.with_timezone(&tz).format("%a %m-%d %H:%M").to_string())
            .collect();
        out.push(("Cold starts", format!("{} kept, latest {}", cold.len(), latest.join(", "))));
    }
    out
}

/// `Mon–Fri 09–12, 13–17; Sat 14–15`: the hours in use in at least half the
/// recent weeks, weekdays with the same hours grouped.
fn rhythm(activity: &[f64; super::profile::HOURS]) -> String {
    const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    let hours = |d: usize| -> String {
        let mut ranges = Vec::new();
        let mut h = 0;
        while h < 24 {
            if activity[d * 24 + h] >= 0.5 {
                let start = h;
                while h < 24 && activity[d * 24 + h] >= 0.5 {
                    h += 1;
                }
                ranges.push(format!("{start:02}–{h:02}"));
            } else {
                h += 1;
            }
        }
        ranges.join(", ")
    };
    let mut groups: Vec<(usize, usize, String)> = Vec::new();
    for d in 0..7 {
        let h = hours(d);
        match groups.last_mut() {
            Some((_, end, prev)) if *prev == h && *end + 1 == d => *end = d,
            _ => groups.push((d, d, h)),
        }
    }
    let parts: Vec<String> = groups
        .into_iter()
        .filter(|(_, _, h)| !h.is_empty())
        .map(
            |(a, b, h)| {
                if a == b { format!("{} {h}", DAYS[a]) } else { format!("{}–{} {h}", DAYS[a], DAYS[b]) }
            },
        )
        .collect();
    if parts.is_empty() { "no hour in use in half the recent weeks yet".into() } else { parts.join("; ") }
}
