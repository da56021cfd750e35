#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration as StdDuration;

use chrono::{Duration, TimeZone};

use super::*;

const BERLIN: Tz = chrono_tz::Europe::Berlin;
const NEW_YORK: Tz = chrono_tz::America::New_York;

fn hm(h: u32, m: u32) -> NaiveTime {
    NaiveTime::from_hms_opt(h, m, 0).unwrap()
}

fn date(y: i32, m: u32, d: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(y, m, d).unwrap()
}

fn cfg(lead_minutes: u64, confidence: f64) -> Predictive {
    Predictive { lead: StdDuration::from_secs(lead_minutes * 60), confidence }
}

/// A profile of workdays from `first` for `days` days; `start(day)` is the
/// day's first use (local), `None` for a day off. Uses every 10 minutes
/// for 8 hours from it. Recorded as of the end of the last day.
fn learned(tz: Tz, first: NaiveDate, days: i64, start: impl Fn(NaiveDate) -> Option<NaiveTime>) -> Profile {
    let mut uses = Vec::new();
    for d in 0..days {
        let day = first + Duration::days(d);
        if !workday(day) {
            continue;
        }
        if let Some(s) = start(day) {
            let begin = local_instant(tz, day.and_time(s));
            for k in 0..48 {
                uses.push((begin + Duration::minutes(10 * k), 1));
            }
        }
    }
    let since = local_instant(tz, first.and_time(NaiveTime::MIN));
    let mut p = Profile::new(tz, since);
    let end = local_instant(tz, (first + Duration::days(days)).and_time(NaiveTime::MIN));
    p.record(&uses, &[], end);
    p
}

#[test]
fn clean_weeks_predict_the_usual_first_use_with_full_confidence() {
    // Six weeks from Monday 2026-01-05, every workday at 09:00.
    let p = learned(BERLIN, date(2026, 1, 5), 42, |_| Some(hm(9, 0)));
    let tuesday = date(2026, 2, 17);
    let f = first_use(&p, tuesday).unwrap();
    assert_eq!((f.local_time, f.basis, f.days, f.days_used), (hm(9, 0), Basis::Weekday, 6, 6));
    assert_eq!(f.confidence, 1.0);
    assert_eq!(f.at, BERLIN.with_ymd_and_hms(2026, 2, 17, 9, 0, 0).unwrap().with_timezone(&Utc));
    let w = pre_wake(&p, tuesday, &cfg(10, 0.8)).unwrap();
    assert_eq!(w.at, f.at - Duration::minutes(10));
    assert_eq!(w.predicted_use, f.at);
    assert_eq!(w.until, f.at + Duration::minutes(10), "every first use at 09:00: it waits the lead past it");
    // Weekends were never used: nothing to predict, nothing to wake.
    assert!(first_use(&p, date(2026, 2, 21)).is_none());
    assert!(pre_wake(&p, date(2026, 2, 22), &cfg(10, 0.1)).is_none());
}

#[test]
fn noisy_weeks_predict_a_low_quantile_of_first_uses() {
    // Eight weeks, first uses scattered 08:40–09:30 by weekday and week.
    let jitter = [0, 35, 10, 50, 20, 45, 5, 30];
    let p = learned(NEW_YORK, date(2026, 1, 5), 56, |d| {
        let week = (d - date(2026, 1, 5)).num_days() / 7;
        let m = jitter[((week + i64::from(d.weekday().num_days_from_monday())) % 8) as usize];
        Some(hm(8, 40) + Duration::minutes(m))
    });
    let monday = date(2026, 3, 2);
    let f = first_use(&p, monday).unwrap();
    let mut seen: Vec<NaiveTime> =
        (1..=8).map(|k| p.first_use_on(monday - Duration::days(7 * k)).unwrap()).collect();
    seen.sort();
    assert!(
        f.local_time >= seen[0] && f.local_time <= seen[3],
        "{} not in the low quarter of {seen:?}",
        f.local_time
    );
    assert!(f.latest_local_time >= seen[5], "{} is not among the latest of {seen:?}", f.latest_local_time);
    assert!(f.latest - f.at <= Duration::hours(1));
    let w = pre_wake(&p, monday, &cfg(10, 0.8)).unwrap();
    assert_eq!(w.until, f.latest + Duration::minutes(10), "a pre-wake waits for the late mornings too");
    assert_eq!(f.confidence, 1.0);
}

#[test]
fn a_day_off_lowers_confidence_below_the_threshold_for_a_while() {
    // Wednesdays from 2026-01-07: the fourth is a holiday.
    let first = date(2026, 1, 5);
    let holiday = date(2026, 1, 28);
    let p = learned(BERLIN, first, 35, |d| (d != holiday).then_some(hm(9, 0)));
    let next = holiday + Duration::days(7);
    let f = first_use(&p, next).unwrap();
    // Three of the four Wednesdays.
    assert_eq!((f.days, f.days_used, f.confidence), (4, 3, 0.75));
    assert!(pre_wake(&p, next, &cfg(10, 0.8)).is_none(), "0.75 < 0.8: no pre-wake");
    assert!(pre_wake(&p, next, &cfg(10, 0.6)).is_some());
    // The Thursday after is untouched.
    assert_eq!(first_use(&p, next + Duration::days(1)).unwrap().confidence, 1.0);
}

#[test]
fn one_early_morning_long_ago_does_not_move_the_prediction() {
    let first = date(2026, 1, 5);
    let odd = date(2026, 1, 12);
    let p = learned(BERLIN, first, 56, |d| Some(if d == odd { hm(5, 0) } else { hm(9, 0) }));
    assert_eq!(first_use(&p, date(2026, 3, 2)).unwrap().local_time, hm(9, 0));
}

#[test]
fn a_new_profile_pools_the_last_days_of_the_same_kind() {
    // Recording began Sunday 2026-03-01; Monday had a first use at 09:10.
    let p = learned(BERLIN, date(2026, 3, 1), 2, |_| Some(hm(9, 10)));
    let f = first_use(&p, date(2026, 3, 3)).unwrap();
    assert_eq!((f.basis, f.local_time, f.days, f.confidence), (Basis::Workdays, hm(9, 10), 1, 1.0));
    // Saturday: the only weekend day observed, Sunday the 1st, had no use.
    assert!(first_use(&p, date(2026, 3, 7)).is_none());
    // Monday has nothing to go by.
    assert!(first_use(&p, date(2026, 3, 2)).is_none());
    // Recording that began during a day with a first use counts it.
    let mut late = Profile::new(BERLIN, local_instant(BERLIN, date(2026, 3, 2).and_time(hm(9, 10))));
    late.record(&[(late.since(), 1)], &[], late.since());
    assert_eq!(first_use(&late, date(2026, 3, 3)).map(|f| f.days), Some(1));
    // …and one without a use does not.
    let empty = Profile::new(BERLIN, local_instant(BERLIN, date(2026, 3, 2).and_time(hm(9, 10))));
    assert!(first_use(&empty, date(2026, 3, 3)).is_none());
}

#[test]
fn predictions_keep_local_wall_clock_time_across_both_daylight_saving_changes() {
    for (tz, spring, fall) in
        [(BERLIN, date(2026, 3, 29), date(2026, 10, 25)), (NEW_YORK, date(2026, 3, 8), date(2026, 11, 1))]
    {
        for change in [spring, fall] {
            let first = change - Duration::days(36);
            let p = learned(tz, first, 50, |_| Some(hm(9, 0)));
            for d in [change - Duration::days(2), change + Duration::days(1)] {
                let f = first_use(&p, d).unwrap();
                assert_eq!(f.local_time, hm(9, 0), "{tz} {d}");
                assert_eq!(f.at.with_timezone(&tz).naive_local(), d.and_time(hm(9, 0)), "{tz} {d}");
            }
        }
    }
    // A first use at 02:30, which does not exist on the spring-forward day:
    // predicted right after the gap.
    let mut p = Profile::new(BERLIN, local_instant(BERLIN, date(2026, 2, 28).and_time(NaiveTime::MIN)));
    let uses: Vec<_> = (1..=28)
        .map(|d| (local_instant(BERLIN, (date(2026, 2, 28) + Duration::days(d)).and_time(hm(2, 30))), 1))
        .collect();
    p.record(&uses, &[], local_instant(BERLIN, date(2026, 3, 29).and_time(NaiveTime::MIN)));
    let f = first_use(&p, date(2026, 3, 29)).unwrap();
    assert_eq!(f.local_time, hm(2, 30));
    assert_eq!(f.at, BERLIN.with_ymd_and_hms(2026, 3, 29, 3, 0, 0).unwrap().with_timezone(&Utc));
}

#[test]
fn a_pre_wake_never_reaches_into_the_day_before() {
    let p = learned(BERLIN, date(2026, 1, 5), 35, |_| Some(hm(0, 5)));
    let d = date(2026, 2, 10);
    let w = pre_wake(&p, d, &cfg(30, 0.8)).unwrap();
    assert_eq!(w.at, local_instant(BERLIN, d.and_time(NaiveTime::MIN)));
    assert_eq!(w.predicted_use, local_instant(BERLIN, d.and_time(hm(0, 5))));
}

#[test]
fn a_prediction_for_a_day_does_not_move_during_that_day() {
    let mut p = learned(BERLIN, date(2026, 1, 5), 35, |_| Some(hm(9, 0)));
    let d = date(2026, 2, 9);
    let before = first_use(&p, d);
    let uses: Vec<_> = (0..30)
        .map(|k| (local_instant(BERLIN, d.and_time(hm(6, 0))) + Duration::minutes(20 * k), 1))
        .collect();
    p.record(&uses, &[], local_instant(BERLIN, d.and_time(hm(23, 0))));
    assert_eq!(first_use(&p, d), before);
    assert_eq!(p.first_use_on(d), Some(hm(6, 0)), "recorded, for the days after");
}

#[test]
fn edges_are_the_last_week_of_pre_wakes_and_look_again_at_midnight() {
    let p = learned(BERLIN, date(2026, 1, 5), 42, |_| Some(hm(9, 0)));
    let now = BERLIN.with_ymd_and_hms(2026, 2, 17, 12, 0, 0).unwrap().with_timezone(&Utc);
    let e = edges(Some(&p), Some(&cfg(10, 0.8)), BERLIN, now);
    // Tuesday the 17th and the five workdays before it (back to the 10th).
    let days: Vec<NaiveDate> =
        e.wakes.iter().map(|w| w.predicted_use.with_timezone(&BERLIN).date_naive()).collect();
    assert_eq!(days, [10, 11, 12, 13, 16, 17].map(|d| date(2026, 2, d)));
    assert_eq!(
        e.refresh_at,
        Some(BERLIN.with_ymd_and_hms(2026, 2, 18, 0, 0, 0).unwrap().with_timezone(&Utc))
    );
    assert_eq!(edges(Some(&p), None, BERLIN, now), Edges::default(), "off");
    assert_eq!(edges(None, Some(&cfg(10, 0.8)), BERLIN, now), Edges::default(), "no profile yet");
    assert_eq!(edges(Some(&p), Some(&cfg(10, 0.8)), NEW_YORK, now), Edges::default(), "another zone");
}

#[test]
fn describe_says_the_rhythm_the_prediction_and_the_pre_wake() {
    let p = learned(BERLIN, date(2026, 1, 5), 42, |_| Some(hm(9, 0)));
    let now = BERLIN.with_ymd_and_hms(2026, 2, 17, 7, 0, 0).unwrap().with_timezone(&Utc);
    let lines = describe(&p, Some(&cfg(10, 0.8)), now);
    let get = |label: &str| lines.iter().find(|(l, _)| *l == label).map(|(_, t)| t.clone()).unwrap();
    assert_eq!(get("Rhythm"), "Mon–Fri 09–17");
    assert!(
        get("First use").starts_with("today predicted at 09:00 (confidence 1.00 over 6 same-weekday"),
        "{lines:?}"
    );
    assert_eq!(get("Pre-wake"), "today at 08:50 CET (10m before the predicted first use)");
    let saturday = BERLIN.with_ymd_and_hms(2026, 2, 21, 7, 0, 0).unwrap().with_timezone(&Utc);
    let lines = describe(&p, Some(&cfg(10, 0.8)), saturday);
    assert!(lines.iter().any(|(l, t)| *l == "Pre-wake" && t == "none today: no prediction"), "{lines:?}");
}
