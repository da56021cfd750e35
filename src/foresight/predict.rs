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
//! - Confidence: the weighted fraction of the observed days that had a use.
//! - Predicted first use: the weighted [`QUANTILE`] of those days' first-use
//!   times (a low quantile: wake before most mornings, robust to one odd
//!   day).
//! - Pre-wake: `lead` before the predicted first use, never before D's local
//!   midnight (so it is known when D begins), when confidence is at least
//!   the policy's threshold.
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
pub const QUANTILE: f64 = 0.25;
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
    /// Weighted fraction of the observed days that had a first use.
    pub confidence: f64,
    /// Observed days read, and how many of them had a first use.
    pub days: usize,
    pub days_used: usize,
    pub basis: Basis,
}

fn workday(d: NaiveDate) -> bool {
    !matches!(d.weekday(), Weekday::Sat | Weekday::Sun)
}

/// The predicted first use of local date `date` (in the profile's time
/// zone), from the days before it; `None` when no day it reads was observed
/// or none had a use. Meant for today or earlier: a later date's pooled days
/// may not be over yet.
pub fn first_use(profile: &Profile, date: NaiveDate) -> Option<Prediction> {
    let since = profile.since();
    let tz = profile.tz();
    let observed = |d: NaiveDate| {
        d < date
            && (profile.first_use_on(d).is_some() || local_instant(tz, d.and_time(NaiveTime::MIN)) >= since)
    };
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
    let total: f64 = days.iter().map(|(w, _)| w).sum();
    let mut used: Vec<(NaiveTime, f64)> = days.iter().filter_map(|(w, t)| t.map(|t| (t, *w))).collect();
    if total <= 0.0 || used.is_empty() {
        return None;
    }
    let used_weight: f64 = used.iter().map(|(_, w)| w).sum();
    used.sort_by_key(|(t, _)| *t);
    let mut acc = 0.0;
    let mut local_time = used[used.len() - 1].0;
    for (t, w) in &used {
        acc += w;
        if acc >= QUANTILE * used_weight - 1e-9 {
            local_time = *t;
            break;
        }
    }
    Some(Prediction {
        date,
        local_time,
        at: local_instant(profile.tz(), date.and_time(local_time)),
        confidence: used_weight / total,
        days: days.len(),
        days_used: used.len(),
        basis,
    })
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
    Some(PredictedWake { at: (p.at - lead).max(midnight), predicted_use: p.at })
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
