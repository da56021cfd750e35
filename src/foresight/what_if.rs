//! What-if runs for targets: a period (the coming days, or the past weeks
//! replayed from the activity profile), a target as it stands (its current
//! policy, profile, state and requests), and policies from SleepPolicy
//! files to set beside its current one. Days are local calendar days in
//! the target's time zone: a day with a daylight-saving change lasts 23 or
//! 25 hours. `dormant simulate` and the agent's API both come here.

use std::sync::Arc;

use chrono::{DateTime, Days, Utc};
use chrono_tz::Tz;

use super::profile::{Profile, local_instant};
use super::simulate::{Comparison, Scenario, Start, compare, expected_uses};
use crate::policy::{Candidate, EffectivePolicy, SleepPolicy, candidate};

/// The longest period ahead, in days, and back, in weeks.
pub const MAX_DAYS: u32 = 366;
pub const MAX_PAST_WEEKS: u32 = 52;
/// The most SleepPolicy documents set side by side.
pub const MAX_POLICIES: usize = 10;

/// The period simulated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    /// From now to the same local wall-clock time this many days ahead.
    Coming(u32),
    /// From the same local wall-clock time this many weeks ago to now.
    Past(u32),
}

impl Period {
    /// From `--past-weeks` / `--days` (or an API request's): at most a year
    /// ahead or back, a week ahead when neither is given.
    pub fn of(past_weeks: Option<u32>, days: Option<u32>) -> Period {
        match (past_weeks, days) {
            (Some(w), _) => Period::Past(w.clamp(1, MAX_PAST_WEEKS)),
            (None, d) => Period::Coming(d.unwrap_or(7).clamp(1, MAX_DAYS)),
        }
    }

    /// Its length in days (a bound on the work it takes).
    pub fn days(self) -> u32 {
        match self {
            Period::Coming(d) => d,
            Period::Past(w) => 7 * w,
        }
    }

    /// `[from, to)` as of `now`, counted in local calendar days of `tz`.
    pub fn bounds(self, tz: Tz, now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
        let here = now.with_timezone(&tz).naive_local();
        match self {
            Period::Coming(days) => {
                let end = here.checked_add_days(Days::new(u64::from(days))).unwrap_or(here);
                (now, local_instant(tz, end).max(now))
            }
            Period::Past(weeks) => {
                let start = here.checked_sub_days(Days::new(7 * u64::from(weeks))).unwrap_or(here);
                (local_instant(tz, start).min(now), now)
            }
        }
    }
}

/// One target as the simulation needs it.
pub struct Subject {
    pub name: String,
    /// The current policy's name (`agent defaults` when none).
    pub policy_name: String,
    pub policy: EffectivePolicy,
    pub profile: Option<Profile>,
    pub start: Start,
    pub requests: crate::target::workload::Requests,
}

/// Every policy over the period for one target: the current one first
/// (unless left out), then `others` (name, effective policy for this
/// target). Pure.
pub fn simulate_subject(
    s: &Subject,
    others: &[(String, EffectivePolicy)],
    include_current: bool,
    period: Period,
    now: DateTime<Utc>,
) -> Comparison {
    let (from, to) = period.bounds(s.policy.timezone.value, now);
    let uses = s.profile.as_ref().map(|p| expected_uses(p, from, to)).unwrap_or_default();
    let start = match period {
        Period::Coming(_) => s.start.clone(),
        // The replay begins with what the profile recorded before it.
        Period::Past(_) => Start::fresh(from),
    };
    let sc = Scenario {
        target: s.name.clone(),
        from,
        to,
        start,
        uses: &uses,
        profile: s.profile.as_ref(),
        requests: s.requests,
    };
    let mut policies = Vec::new();
    if include_current {
        policies.push((s.policy_name.clone(), s.policy.clone()));
    }
    policies.extend(others.iter().cloned());
    compare(&policies, &sc)
}

/// The SleepPolicy documents of a YAML file, as candidates.
pub fn read_policies(text: &str) -> Result<Vec<Arc<Candidate>>, String> {
    let mut out = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value: serde_yaml::Value =
            serde::Deserialize::deserialize(de).map_err(|e| format!("document {}: {e}", i + 1))?;
        if value.is_null() || value.get("kind").and_then(|k| k.as_str()) != Some("SleepPolicy") {
            continue;
        }
        let p: SleepPolicy = serde_yaml::from_value(value).map_err(|e| format!("document {}: {e}", i + 1))?;
        out.push(candidate(&p));
        if out.len() > MAX_POLICIES {
            return Err(format!("more than {MAX_POLICIES} SleepPolicy documents"));
        }
    }
    if out.is_empty() {
        return Err("no SleepPolicy document".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::collections::BTreeMap;

    use chrono::{NaiveDate, TimeZone};

    use super::*;
    use crate::foresight::simulate::{State, render, with_policy};
    use crate::policy::Defaults;
    use crate::policy::TargetKind;
    use crate::policy::annotations::TargetAnnotations;
    use crate::target::workload::Requests;

    const BERLIN: Tz = chrono_tz::Europe::Berlin;

    fn at(tz: Tz, y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        tz.with_ymd_and_hms(y, mo, d, h, mi, 0).earliest().unwrap().with_timezone(&Utc)
    }

    fn effective(c: Arc<Candidate>) -> EffectivePolicy {
        with_policy(
            TargetKind::Namespace,
            &BTreeMap::new(),
            &TargetAnnotations::default(),
            c,
            &Defaults::default(),
        )
        .unwrap()
    }

    const FILE: &str = "\
apiVersion: dormant.dev/v1alpha1
kind: SleepPolicy
metadata: {name: office}
spec:
  timezone: Europe/Berlin
  schedules: [{sleep: '0 19 * * *', wake: '0 8 * * *'}]
---
apiVersion: v1
kind: Namespace
metadata: {name: ignored}
---
apiVersion: dormant.dev/v1alpha1
kind: SleepPolicy
metadata: {name: idle}
spec: {timezone: Europe/Berlin, sleepAfter: 30m}
";

    fn subject(policy: EffectivePolicy, start: DateTime<Utc>) -> Subject {
        Subject {
            name: "namespace/shop".into(),
            policy_name: "always-on".into(),
            policy,
            profile: None,
            start: Start::fresh(start),
            requests: Requests { cpu_cores: 1.0, memory_bytes: 0.0 },
        }
    }

    #[test]
    fn a_policy_file_gives_its_sleep_policies_and_skips_other_objects() {
        let names: Vec<String> = read_policies(FILE).unwrap().iter().map(|c| c.name.clone()).collect();
        assert_eq!(names, ["office", "idle"]);
        assert!(read_policies("apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n").is_err());
        assert!(read_policies("kind: SleepPolicy\nspec: [").is_err());
    }

    #[test]
    fn coming_days_are_local_days_23_hours_in_spring_and_25_in_autumn() {
        // Berlin: 2026-03-29 02:00 → 03:00, 2026-10-25 03:00 → 02:00.
        let spring = at(BERLIN, 2026, 3, 28, 12, 0);
        let (from, to) = Period::Coming(2).bounds(BERLIN, spring);
        assert_eq!((from, (to - from).num_hours()), (spring, 47));
        assert_eq!(to, at(BERLIN, 2026, 3, 30, 12, 0));
        let autumn = at(BERLIN, 2026, 10, 24, 12, 0);
        let (from, to) = Period::Coming(2).bounds(BERLIN, autumn);
        assert_eq!((from, (to - from).num_hours()), (autumn, 49));
        // Looking back over the same changes.
        let (from, to) = Period::Past(1).bounds(BERLIN, at(BERLIN, 2026, 4, 1, 12, 0));
        assert_eq!((to - from).num_hours(), 7 * 24 - 1);
        assert_eq!(from, at(BERLIN, 2026, 3, 25, 12, 0));
        let (from, to) = Period::Past(1).bounds(BERLIN, at(BERLIN, 2026, 10, 28, 12, 0));
        assert_eq!((to - from).num_hours(), 7 * 24 + 1);
    }

    /// A schedule from a file, against an always-on current policy, over
    /// the coming days across each daylight-saving change: the wake stays at
    /// 08:00 local while its UTC instant moves by the hour, and the awake
    /// hours and savings follow the shorter or longer night.
    #[test]
    fn simulated_schedules_keep_local_time_across_both_daylight_saving_changes() {
        let files = read_policies(FILE).unwrap();
        let office = effective(files[0].clone());
        let always = effective(read_policies(
            "kind: SleepPolicy\napiVersion: dormant.dev/v1alpha1\nmetadata: {name: on}\nspec: {timezone: Europe/Berlin}\n",
        )
        .unwrap()[0]
            .clone());
        for (now, want, night) in [
            (
                at(BERLIN, 2026, 3, 28, 12, 0),
                [
                    ("2026-03-28T19:00:00+01:00", "2026-03-28T18:00:00+00:00"),
                    ("2026-03-29T08:00:00+02:00", "2026-03-29T06:00:00+00:00"),
                    ("2026-03-29T19:00:00+02:00", "2026-03-29T17:00:00+00:00"),
                    ("2026-03-30T08:00:00+02:00", "2026-03-30T06:00:00+00:00"),
                ],
                12,
            ),
            (
                at(BERLIN, 2026, 10, 24, 12, 0),
                [
                    ("2026-10-24T19:00:00+02:00", "2026-10-24T17:00:00+00:00"),
                    ("2026-10-25T08:00:00+01:00", "2026-10-25T07:00:00+00:00"),
                    ("2026-10-25T19:00:00+01:00", "2026-10-25T18:00:00+00:00"),
                    ("2026-10-26T08:00:00+01:00", "2026-10-26T07:00:00+00:00"),
                ],
                14,
            ),
        ] {
            let s = subject(always.clone(), now - chrono::Duration::days(1));
            let c = simulate_subject(&s, &[("office".into(), office.clone())], true, Period::Coming(2), now);
            assert_eq!(c.baseline, "always-on");
            assert!(c.runs[0].run.transitions.is_empty());
            let run = &c.runs[1].run;
            let seen: Vec<(String, String)> =
                run.transitions.iter().map(|t| (t.local.clone(), t.at.to_rfc3339())).collect();
            let want: Vec<(String, String)> =
                want.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
            assert_eq!(seen, want);
            assert_eq!(
                run.transitions.iter().map(|t| t.to).collect::<Vec<_>>(),
                [State::Asleep, State::Awake, State::Asleep, State::Awake]
            );
            // Asleep two nights: 13 h + 13 h normally, one of them an hour
            // shorter (spring) or longer (autumn).
            assert!((run.hours_asleep - f64::from(13 + night)).abs() < 1e-9, "{}", run.hours_asleep);
            let total = run.hours_awake + run.hours_asleep;
            assert!((total - if night == 12 { 47.0 } else { 49.0 }).abs() < 1e-9);
            let saved = run.hours_asleep * run.cost.per_hour;
            assert!((c.runs[1].saved_vs_baseline - saved).abs() < 1e-9);
            let table = render(std::slice::from_ref(&c), true);
            assert!(table.contains("office") && table.contains("always-on (baseline)"), "{table}");
            assert!(table.contains(&want[1].0[..16].replace('T', " ")), "{table}");
        }
    }

    #[test]
    fn past_weeks_replay_the_recorded_mornings() {
        let p = effective(read_policies(FILE).unwrap()[1].clone());
        let first = NaiveDate::from_ymd_opt(2026, 11, 2).unwrap();
        // Two weeks of weekday mornings at 09:10, recorded by the flusher.
        let mut uses = Vec::new();
        for d in 0..14 {
            let day = first + chrono::Duration::days(d);
            if chrono::Datelike::weekday(&day).number_from_monday() <= 5 {
                let t = local_instant(BERLIN, day.and_hms_opt(9, 10, 0).unwrap());
                uses.extend((0..6).map(|k| (t + chrono::Duration::minutes(10 * k), 1)));
            }
        }
        let now = local_instant(BERLIN, (first + chrono::Duration::days(12)).and_hms_opt(0, 0, 0).unwrap());
        let mut profile = Profile::new(BERLIN, uses[0].0);
        profile.record(&uses, &[], now);
        let mut s = subject(p, now);
        s.profile = Some(profile);
        let c = simulate_subject(&s, &[], true, Period::Past(2), now);
        let run = &c.runs[0].run;
        assert_eq!(run.from, now - chrono::Duration::days(14));
        // Each recorded weekday morning finds it asleep (30m idle) once, at
        // the time it was recorded; the last day's is predicted instead
        // (the profile does not know yet whether it is over).
        let firsts: Vec<String> =
            run.cold_starts.iter().filter(|c| c.first_of_day).map(|c| c.local[11..16].to_string()).collect();
        assert_eq!(firsts.len(), 10, "{:?}", run.cold_starts);
        assert!(firsts[..9].iter().all(|t| t == "09:10"), "{firsts:?}");
    }
}
