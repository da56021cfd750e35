//! The decision: given a target's effective policy, its last counted use,
//! its current state, manual overrides and the time, what state should it be
//! in, why, and when must we look again. Pure: no client, no clock.
//!
//! The model is "the most recent edge wins". Wake edges are the target's
//! first sighting, its last counted use (when that may wake it), a manual
//! wake, each schedule's wake instants, and (when the policy's
//! `wake.predictive` is set) each predicted pre-wake instant the caller
//! passes in (see `crate::foresight::predict`). Sleep edges are the idle deadline
//! (the latest wake edge + `sleepAfter`), each schedule's sleep instants, and
//! a forced sleep. The target should be asleep exactly when some sleep edge
//! lies after the latest wake edge; a wake edge wins a tie, except the first
//! sighting, which is no use of the target.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::annotations::{Until, rfc3339};
use super::duration::{self, SleepAfter};
use super::resolve::EffectivePolicy;

/// The state the cluster should be in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Desired {
    Awake,
    Asleep,
    /// The target is disabled: dormant leaves it exactly as it is.
    Leave,
}

/// What the cluster says the target is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Current {
    Awake,
    Asleep { since: DateTime<Utc> },
}

/// The newest counted use of the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastUse {
    pub at: DateTime<Utc>,
    pub by: String,
    /// An explicit wake (`dormant wake`, a hand-scaled workload): wakes the
    /// target whatever the policy says about requests.
    pub manual: bool,
}

/// A forced sleep (`dormant sleep`, the `force-sleep` annotation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forced {
    pub since: DateTime<Utc>,
    /// While this covers an instant, neither requests nor wake schedules wake
    /// the target (only a manual wake does).
    pub prevent_wakeup_until: Option<Until>,
}

/// A wake ahead of a predicted first use: a wake edge at `at`, like a
/// schedule's wake instant, whose instants come from the target's activity
/// profile instead of a cron expression.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PredictedWake {
    /// When to wake: the lead time before `predicted_use`.
    pub at: DateTime<Utc>,
    /// The predicted first use it prepares for.
    pub predicted_use: DateTime<Utc>,
    /// Unless used, the target stays awake until then (the latest usual
    /// first use), and at least `sleepAfter` past `at`.
    pub until: DateTime<Utc>,
}

/// Everything the decision depends on, besides the time.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    pub policy: &'a EffectivePolicy,
    pub current: Current,
    pub last_use: Option<LastUse>,
    /// When dormant first saw the target: it is never idle before that.
    pub first_seen: DateTime<Utc>,
    pub forced: Option<Forced>,
    /// A wake asked for by a request whose credential could not be checked
    /// while the target slept (the proxy's bounded budget of those): it
    /// wakes the target like a use, but only for [`unverified_grace`],
    /// unless a counted use follows.
    pub unverified_wake: Option<DateTime<Utc>>,
    /// Predicted pre-wakes, in any order; ignored unless the policy's
    /// `wake.predictive` is set. Pass those of the last week up to today
    /// (`foresight::predict::edges`): older ones cannot matter unless
    /// `sleepAfter` is longer than a week.
    pub predicted: &'a [PredictedWake],
}

/// How long a target woken for an unverified request stays awake with no
/// counted use after it: the wake timeout (the request waits that long at
/// most) and a minute for its answer.
pub fn unverified_grace(policy: &EffectivePolicy) -> Duration {
    policy.wake_timeout.value + Duration::from_secs(60)
}

/// Why the target should be in its desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    Disabled,
    FirstSeen {
        at: DateTime<Utc>,
    },
    InUse {
        at: DateTime<Utc>,
        by: String,
    },
    ManualWake {
        at: DateTime<Utc>,
        by: String,
    },
    ScheduledWake {
        at: DateTime<Utc>,
        schedule: String,
    },
    PredictedWake {
        at: DateTime<Utc>,
        predicted_use: DateTime<Utc>,
        until: DateTime<Utc>,
    },
    /// Woken for a request whose credential could not be checked.
    UnverifiedWake {
        at: DateTime<Utc>,
    },
    /// No counted use followed an unverified wake within its grace.
    Unconfirmed {
        woken: DateTime<Utc>,
        at: DateTime<Utc>,
    },
    Idle {
        last_use: DateTime<Utc>,
        after: Duration,
        at: DateTime<Utc>,
    },
    SleepSchedule {
        at: DateTime<Utc>,
        schedule: String,
    },
    Forced {
        at: DateTime<Utc>,
        until: Option<Until>,
    },
}

impl Reason {
    /// What caused the transition into this state, as a metric label:
    /// `idle`, `schedule`, `predicted`, `request`, `manual` or `new`.
    pub fn trigger(&self) -> &'static str {
        match self {
            Reason::Disabled => "disabled",
            Reason::FirstSeen { .. } => "new",
            Reason::InUse { .. } | Reason::UnverifiedWake { .. } => "request",
            Reason::ManualWake { .. } | Reason::Forced { .. } => "manual",
            Reason::ScheduledWake { .. } | Reason::SleepSchedule { .. } => "schedule",
            Reason::PredictedWake { .. } => "predicted",
            Reason::Idle { .. } | Reason::Unconfirmed { .. } => "idle",
        }
    }

    /// The instant of the edge behind this reason.
    pub fn at(&self) -> Option<DateTime<Utc>> {
        match self {
            Reason::Disabled => None,
            Reason::FirstSeen { at }
            | Reason::InUse { at, .. }
            | Reason::ManualWake { at, .. }
            | Reason::ScheduledWake { at, .. }
            | Reason::PredictedWake { at, .. }
            | Reason::UnverifiedWake { at }
            | Reason::Unconfirmed { at, .. }
            | Reason::Idle { at, .. }
            | Reason::SleepSchedule { at, .. }
            | Reason::Forced { at, .. } => Some(*at),
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Disabled => f.write_str("disabled by annotation dormant.dev/disabled"),
            Reason::FirstSeen { at } => {
                write!(f, "no use seen since dormant first saw it at {}", rfc3339(*at))
            }
            Reason::InUse { at, by } => write!(f, "in use: last activity at {} by {by}", rfc3339(*at)),
            Reason::ManualWake { at, by } => write!(f, "woken by hand at {} by {by}", rfc3339(*at)),
            Reason::ScheduledWake { at, schedule } => {
                write!(f, "wake schedule \"{schedule}\" fired at {}", rfc3339(*at))
            }
            Reason::PredictedWake { at, predicted_use, until } => write!(
                f,
                "woken ahead of its predicted first use at {} (pre-wake at {}; kept awake until {} unless used)",
                rfc3339(*predicted_use),
                rfc3339(*at),
                rfc3339(*until)
            ),
            Reason::UnverifiedWake { at } => write!(
                f,
                "woken at {} for a request whose credential could not be checked while it slept",
                rfc3339(*at)
            ),
            Reason::Unconfirmed { woken, at } => write!(
                f,
                "no use confirmed the wake at {} for an unchecked credential; asleep again since {}",
                rfc3339(*woken),
                rfc3339(*at)
            ),
            Reason::Idle { last_use, after, at } => write!(
                f,
                "idle since {} (sleep after {}), asleep since {}",
                rfc3339(*last_use),
                duration::format(*after),
                rfc3339(*at)
            ),
            Reason::SleepSchedule { at, schedule } => {
                write!(f, "inside sleep window: schedule \"{schedule}\" fired at {}", rfc3339(*at))
            }
            Reason::Forced { at, until } => {
                write!(f, "put to sleep by hand at {}", rfc3339(*at))?;
                match until {
                    Some(Until::Never) => f.write_str("; requests do not wake it"),
                    Some(Until::Time(t)) => write!(f, "; requests do not wake it until {}", rfc3339(*t)),
                    None => Ok(()),
                }
            }
        }
    }
}

/// The outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub desired: Desired,
    pub reason: Reason,
    /// The earliest instant after `now` at which the desired state changes
    /// with no new input; `None` when it never does.
    pub next: Option<DateTime<Utc>>,
    /// `next` is not a change but a horizon: no change was found within
    /// [`MAX_STEPS`] schedule instants, so look again then.
    pub recheck: bool,
}

/// How many future schedule instants the deadline search examines.
pub const MAX_STEPS: usize = 2_000;

/// Decides for `now`.
pub fn decide(inputs: &Inputs<'_>, now: DateTime<Utc>) -> Decision {
    if inputs.policy.disabled.value {
        return Decision { desired: Desired::Leave, reason: Reason::Disabled, next: None, recheck: false };
    }
    let (desired, reason) = state_at(inputs, now);
    let (next, recheck) = next_change(inputs, now, desired);
    Decision { desired, reason, next, recheck }
}

/// The desired state at `t`, from the same inputs (no new activity).
pub fn state_at(inputs: &Inputs<'_>, t: DateTime<Utc>) -> (Desired, Reason) {
    let wake = latest_wake(inputs, t);
    match first_sleep_after(inputs, &wake, t) {
        Some(sleep) => (Desired::Asleep, sleep),
        None => (Desired::Awake, wake.1),
    }
}

/// The predicted pre-wakes that count: none unless the policy opts in.
fn predicted<'a>(inputs: &Inputs<'a>) -> &'a [PredictedWake] {
    if inputs.policy.wake_predictive.value.is_some() { inputs.predicted } else { &[] }
}

fn prevented(inputs: &Inputs<'_>, x: DateTime<Utc>) -> bool {
    inputs.forced.is_some_and(|f| f.since <= x && f.prevent_wakeup_until.is_some_and(|u| u.covers(x)))
}

/// The latest effective wake edge at or before `t` (the first sighting
/// counts as one, so there always is one).
fn latest_wake(inputs: &Inputs<'_>, t: DateTime<Utc>) -> (DateTime<Utc>, Reason) {
    let p = inputs.policy;
    let tz = p.timezone.value;
    let mut best = (inputs.first_seen, Reason::FirstSeen { at: inputs.first_seen });
    let mut consider = |at: DateTime<Utc>, reason: Reason| {
        if at <= t && at >= best.0 {
            best = (at, reason);
        }
    };
    // Before the schedules: a schedule's wake at the same instant names the
    // reason (it is the one a user wrote).
    for w in predicted(inputs) {
        if !prevented(inputs, w.at) {
            consider(
                w.at,
                Reason::PredictedWake { at: w.at, predicted_use: w.predicted_use, until: w.until },
            );
        }
    }
    if p.wake_on_schedule.value {
        for pair in &p.schedules.value {
            if let Some(w) = &pair.wake
                && let Some(at) = w.last_at_or_before(t, tz)
                && !prevented(inputs, at)
            {
                consider(at, Reason::ScheduledWake { at, schedule: w.to_string() });
            }
        }
    }
    if let Some(at) = inputs.unverified_wake {
        let counts = !prevented(inputs, at)
            && match inputs.current {
                Current::Awake => true,
                Current::Asleep { since } => at <= since || p.wake_on_request.value,
            };
        if counts {
            consider(at, Reason::UnverifiedWake { at });
        }
    }
    if let Some(u) = &inputs.last_use {
        let counts = u.manual
            || (!prevented(inputs, u.at)
                && match inputs.current {
                    Current::Awake => true,
                    Current::Asleep { since } => u.at <= since || p.wake_on_request.value,
                });
        if counts {
            let reason = if u.manual {
                Reason::ManualWake { at: u.at, by: u.by.clone() }
            } else {
                Reason::InUse { at: u.at, by: u.by.clone() }
            };
            consider(u.at, reason);
        }
    }
    best
}

/// The earliest sleep edge in (wake, t] — or in [wake, t] when the wake
/// edge is only the first sighting, which is no use and so loses a tie.
fn first_sleep_after(
    inputs: &Inputs<'_>,
    wake: &(DateTime<Utc>, Reason),
    t: DateTime<Utc>,
) -> Option<Reason> {
    let p = inputs.policy;
    let tz = p.timezone.value;
    let from = wake.0;
    let baseline = matches!(wake.1, Reason::FirstSeen { .. });
    let mut best: Option<Reason> = None;
    let mut consider = |r: Reason| {
        if let Some(at) = r.at()
            && (at > from || (baseline && at == from))
            && at <= t
            && best.as_ref().and_then(Reason::at).is_none_or(|b| at < b)
        {
            best = Some(r);
        }
    };
    if let SleepAfter::After(d) = p.sleep_after.value
        && let Some(at) = idle_deadline(inputs, wake, d, t)
    {
        consider(Reason::Idle { last_use: from, after: d, at });
    }
    if matches!(wake.1, Reason::UnverifiedWake { .. })
        && let Some(at) = add(from, unverified_grace(p))
    {
        consider(Reason::Unconfirmed { woken: from, at });
    }
    for pair in &p.schedules.value {
        if let Some(s) = &pair.sleep {
            let at = if baseline { s.last_at_or_before(from, tz).filter(|a| *a == from) } else { None };
            if let Some(at) = at.or_else(|| s.next_after(from, tz)) {
                consider(Reason::SleepSchedule { at, schedule: s.to_string() });
            }
        }
    }
    if let Some(f) = &inputs.forced {
        consider(Reason::Forced { at: f.since, until: f.prevent_wakeup_until });
    }
    best
}

/// The idle deadline of a wake edge at `t`: `sleepAfter` past it, and for
/// a pre-wake not before its `until` while nobody has used the target since
/// (the first use after it, counted or not, ends the wait: a pre-wake never
/// wakes a target again after that).
fn idle_deadline(
    inputs: &Inputs<'_>,
    wake: &(DateTime<Utc>, Reason),
    d: Duration,
    t: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let at = add(wake.0, d)?;
    let used_since = inputs.last_use.as_ref().is_some_and(|u| u.at > wake.0 && u.at <= t);
    Some(match wake.1 {
        Reason::PredictedWake { until, .. } if !used_since => at.max(until),
        _ => at,
    })
}

fn add(t: DateTime<Utc>, d: Duration) -> Option<DateTime<Utc>> {
    chrono::Duration::from_std(d).ok().and_then(|d| t.checked_add_signed(d))
}

/// Walks the future instants at which anything could change (schedule
/// instants, the idle deadline of the wake edge in force, inputs dated in
/// the future) and returns the first at which the desired state differs.
fn next_change(inputs: &Inputs<'_>, now: DateTime<Utc>, current: Desired) -> (Option<DateTime<Utc>>, bool) {
    let p = inputs.policy;
    let tz = p.timezone.value;
    let asleep = current == Desired::Asleep;
    // Only a wake edge can end a sleep, only a sleep edge can end a wake
    // (wake instants still matter while awake: they move the idle deadline).
    let can_flip = if asleep {
        (p.wake_on_schedule.value && p.schedules.value.iter().any(|s| s.wake.is_some()))
            || predicted(inputs).iter().any(|w| w.at > now)
    } else {
        // An unverified wake ends by itself, whatever the policy.
        p.can_sleep() || (inputs.unverified_wake.is_some() && !p.disabled.value)
    };
    let future_input = |t: DateTime<Utc>| {
        [
            Some(inputs.first_seen),
            inputs.last_use.as_ref().map(|u| u.at),
            inputs.forced.map(|f| f.since),
            inputs.unverified_wake,
        ]
        .into_iter()
        .flatten()
        .any(|x| x > t)
    };
    if !can_flip && !future_input(now) {
        return (None, false);
    }
    let mut t = now;
    for _ in 0..MAX_STEPS {
        let mut next: Option<DateTime<Utc>> = None;
        let mut candidate = |c: Option<DateTime<Utc>>| {
            if let Some(c) = c
                && c > t
                && next.is_none_or(|n| c < n)
            {
                next = Some(c);
            }
        };
        let wake = latest_wake(inputs, t);
        if let SleepAfter::After(d) = p.sleep_after.value {
            candidate(idle_deadline(inputs, &wake, d, t));
        }
        if matches!(wake.1, Reason::UnverifiedWake { .. }) {
            candidate(add(wake.0, unverified_grace(p)));
        }
        for pair in &p.schedules.value {
            if !asleep {
                candidate(pair.sleep.as_ref().and_then(|s| s.next_after(t, tz)));
            }
            if p.wake_on_schedule.value {
                candidate(pair.wake.as_ref().and_then(|w| w.next_after(t, tz)));
            }
        }
        candidate(Some(inputs.first_seen));
        candidate(inputs.last_use.as_ref().map(|u| u.at));
        candidate(inputs.forced.map(|f| f.since));
        candidate(inputs.unverified_wake);
        for w in predicted(inputs) {
            candidate(Some(w.at));
        }
        let Some(c) = next else { return (None, false) };
        if state_at(inputs, c).0 != current {
            return (Some(c), false);
        }
        t = c;
    }
    (Some(t), true)
}

#[cfg(test)]
mod tests;
