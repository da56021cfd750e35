use std::collections::BTreeMap;

use chrono::{Datelike, TimeZone};
use chrono_tz::Tz;
use proptest::prelude::*;

use super::*;
use crate::policy::annotations::TargetAnnotations;
use crate::policy::schedule::{Schedule, SchedulePair};
use crate::policy::{Defaults, Origin, Sourced, TargetKind, resolve};

fn policy(sleep_after: Option<u64>, pairs: &[(Option<&str>, Option<&str>)], tz: &str) -> EffectivePolicy {
    let mut p = resolve(
        TargetKind::Namespace,
        &BTreeMap::new(),
        &TargetAnnotations::default(),
        &[],
        &Defaults::default(),
    )
    .unwrap();
    p.sleep_after = Sourced {
        value: sleep_after.map_or(SleepAfter::Never, |s| SleepAfter::After(Duration::from_secs(s))),
        origin: Origin::Default,
    };
    p.schedules.value = pairs
        .iter()
        .map(|(s, w)| SchedulePair {
            sleep: s.map(|s| s.parse::<Schedule>().unwrap()),
            wake: w.map(|w| w.parse::<Schedule>().unwrap()),
        })
        .collect();
    p.timezone.value = tz.parse().unwrap();
    p
}

fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
}

fn local(tz: &str, y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
    let tz: Tz = tz.parse().unwrap();
    tz.with_ymd_and_hms(y, mo, d, h, mi, 0).earliest().unwrap().with_timezone(&Utc)
}

fn inputs(p: &EffectivePolicy, first_seen: DateTime<Utc>) -> Inputs<'_> {
    Inputs {
        policy: p,
        current: Current::Awake,
        last_use: None,
        first_seen,
        forced: None,
        unverified_wake: None,
        predicted: &[],
    }
}

fn used(at: DateTime<Utc>) -> Option<LastUse> {
    Some(LastUse { at, by: "alice list pods (audit)".into(), manual: false })
}

#[test]
fn an_idle_target_sleeps_exactly_sleep_after_past_its_last_use() {
    let p = policy(Some(30 * 60), &[], "UTC");
    let mut i = inputs(&p, utc(2026, 11, 1, 0, 0));
    i.last_use = used(utc(2026, 11, 26, 10, 0));
    let d = decide(&i, utc(2026, 11, 26, 10, 10));
    assert_eq!(d.desired, Desired::Awake);
    assert!(matches!(d.reason, Reason::InUse { .. }));
    assert_eq!(d.next, Some(utc(2026, 11, 26, 10, 30)));

    let d = decide(&i, utc(2026, 11, 26, 10, 30));
    assert_eq!(d.desired, Desired::Asleep);
    assert_eq!(
        d.reason,
        Reason::Idle {
            last_use: utc(2026, 11, 26, 10, 0),
            after: Duration::from_secs(1800),
            at: utc(2026, 11, 26, 10, 30)
        }
    );
    assert_eq!(d.next, None, "nothing wakes an idle target but new activity");
}

#[test]
fn a_new_target_is_not_idle_before_dormant_first_saw_it() {
    let p = policy(Some(600), &[], "UTC");
    let i = inputs(&p, utc(2026, 11, 26, 9, 0));
    let d = decide(&i, utc(2026, 11, 26, 9, 5));
    assert_eq!(d.desired, Desired::Awake);
    assert_eq!(d.reason, Reason::FirstSeen { at: utc(2026, 11, 26, 9, 0) });
    assert_eq!(d.next, Some(utc(2026, 11, 26, 9, 10)));
}

#[test]
fn never_sleeping_targets_have_no_deadline() {
    let p = policy(None, &[], "UTC");
    let i = inputs(&p, utc(2026, 1, 1, 0, 0));
    let d = decide(&i, utc(2026, 11, 26, 9, 5));
    assert_eq!((d.desired, d.next), (Desired::Awake, None));
}

#[test]
fn a_request_wakes_an_asleep_target_unless_the_policy_says_requests_do_not() {
    let mut p = policy(Some(600), &[], "UTC");
    let mut i = inputs(&p, utc(2026, 11, 1, 0, 0));
    i.current = Current::Asleep { since: utc(2026, 11, 26, 8, 0) };
    i.last_use = used(utc(2026, 11, 26, 9, 0));
    let d = decide(&i, utc(2026, 11, 26, 9, 0));
    assert_eq!(d.desired, Desired::Awake);
    assert_eq!(d.next, Some(utc(2026, 11, 26, 9, 10)));

    p.wake_on_request.value = false;
    let mut i = inputs(&p, utc(2026, 11, 1, 0, 0));
    i.current = Current::Asleep { since: utc(2026, 11, 26, 8, 0) };
    i.last_use = used(utc(2026, 11, 26, 9, 0));
    assert_eq!(decide(&i, utc(2026, 11, 26, 9, 1)).desired, Desired::Asleep);
    // A manual wake always wakes.
    i.last_use = Some(LastUse { at: utc(2026, 11, 26, 9, 0), by: "dormant wake".into(), manual: true });
    let d = decide(&i, utc(2026, 11, 26, 9, 1));
    assert_eq!(d.desired, Desired::Awake);
    assert!(matches!(d.reason, Reason::ManualWake { .. }));
}

#[test]
fn office_hours_sleep_on_weekday_evenings_and_over_the_weekend() {
    let tz = "Europe/Berlin";
    let p = policy(None, &[(Some("0 19 * * 1-5"), Some("0 8 * * 1-5"))], tz);
    let mut i = inputs(&p, utc(2026, 1, 1, 0, 0));
    i.last_use = used(local(tz, 2026, 11, 27, 18, 0)); // Friday 18:00

    let d = decide(&i, local(tz, 2026, 11, 27, 18, 30));
    assert_eq!(d.desired, Desired::Awake);
    assert_eq!(d.next, Some(local(tz, 2026, 11, 27, 19, 0)));

    let d = decide(&i, local(tz, 2026, 11, 28, 12, 0)); // Saturday noon
    assert_eq!(d.desired, Desired::Asleep);
    assert_eq!(
        d.reason,
        Reason::SleepSchedule { at: local(tz, 2026, 11, 27, 19, 0), schedule: "0 19 * * 1-5".into() }
    );
    assert_eq!(d.next, Some(local(tz, 2026, 11, 30, 8, 0)), "wakes Monday 08:00 Berlin");

    let d = decide(&i, local(tz, 2026, 11, 30, 8, 0));
    assert_eq!(d.desired, Desired::Awake);
    assert!(matches!(d.reason, Reason::ScheduledWake { .. }));
}

#[test]
fn use_inside_a_sleep_window_wakes_the_target_until_it_is_idle_again() {
    let tz = "UTC";
    let p = policy(Some(30 * 60), &[(Some("0 19 * * *"), Some("0 8 * * *"))], tz);
    let mut i = inputs(&p, utc(2026, 1, 1, 0, 0));
    i.current = Current::Asleep { since: utc(2026, 11, 26, 19, 0) };
    i.last_use = used(utc(2026, 11, 26, 21, 0));
    let d = decide(&i, utc(2026, 11, 26, 21, 5));
    assert_eq!(d.desired, Desired::Awake);
    assert_eq!(d.next, Some(utc(2026, 11, 26, 21, 30)));

    // Without an idle timeout it stays awake until the next sleep instant.
    let p = policy(None, &[(Some("0 19 * * *"), Some("0 8 * * *"))], tz);
    let mut i = inputs(&p, utc(2026, 1, 1, 0, 0));
    i.current = Current::Asleep { since: utc(2026, 11, 26, 19, 0) };
    i.last_use = used(utc(2026, 11, 26, 21, 0));
    assert_eq!(decide(&i, utc(2026, 11, 26, 21, 5)).next, Some(utc(2026, 11, 27, 19, 0)));
}

#[test]
fn without_wake_on_schedule_the_target_sleeps_until_someone_uses_it() {
    let mut p = policy(None, &[(Some("0 19 * * *"), Some("0 8 * * *"))], "UTC");
    p.wake_on_schedule.value = false;
    let mut i = inputs(&p, utc(2026, 1, 1, 0, 0));
    i.last_use = used(utc(2026, 11, 26, 18, 0));
    let d = decide(&i, utc(2026, 11, 27, 9, 0));
    assert_eq!(d.desired, Desired::Asleep);
    assert_eq!(d.next, None);
}

#[test]
fn a_forced_sleep_with_prevent_wakeup_ignores_requests_and_schedules_until_then() {
    let p = policy(Some(3600), &[(None, Some("0 8 * * *"))], "UTC");
    let forced_at = utc(2026, 11, 26, 7, 0);
    let until = utc(2026, 11, 27, 12, 0);
    let mut i = inputs(&p, utc(2026, 1, 1, 0, 0));
    i.last_use = used(utc(2026, 11, 26, 6, 50));
    i.forced = Some(Forced { since: forced_at, prevent_wakeup_until: Some(Until::Time(until)) });
    let d = decide(&i, forced_at);
    assert_eq!(d.desired, Desired::Asleep);
    assert!(matches!(d.reason, Reason::Forced { .. }));
    assert!(d.reason.to_string().contains("requests do not wake it until 2026-11-27T12:00:00.000Z"));
    // 08:00 on both days is inside the prevention; the wake at 08:00 on the
    // 28th is the first that counts.
    assert_eq!(d.next, Some(utc(2026, 11, 28, 8, 0)));

    i.current = Current::Asleep { since: forced_at };
    i.last_use = used(utc(2026, 11, 26, 9, 0));
    assert_eq!(decide(&i, utc(2026, 11, 26, 9, 1)).desired, Desired::Asleep, "a request does not wake it");
    i.last_use = used(utc(2026, 11, 27, 12, 30));
    assert_eq!(decide(&i, utc(2026, 11, 27, 12, 31)).desired, Desired::Awake, "after the prevention it does");
    i.last_use = Some(LastUse { at: utc(2026, 11, 26, 9, 0), by: "dormant wake".into(), manual: true });
    assert_eq!(decide(&i, utc(2026, 11, 26, 9, 1)).desired, Desired::Awake, "a manual wake always does");
}

#[test]
fn a_forced_sleep_without_prevention_wakes_on_the_next_request() {
    let p = policy(None, &[], "UTC");
    let mut i = inputs(&p, utc(2026, 1, 1, 0, 0));
    i.forced = Some(Forced { since: utc(2026, 11, 26, 7, 0), prevent_wakeup_until: None });
    i.current = Current::Asleep { since: utc(2026, 11, 26, 7, 0) };
    assert_eq!(decide(&i, utc(2026, 11, 26, 8, 0)).desired, Desired::Asleep);
    i.last_use = used(utc(2026, 11, 26, 8, 0));
    assert_eq!(decide(&i, utc(2026, 11, 26, 8, 0)).desired, Desired::Awake);
}

#[test]
fn a_sleep_forced_at_first_sight_wins_over_the_first_sighting() {
    let p = policy(None, &[], "UTC");
    let now = utc(2026, 11, 26, 8, 0);
    let mut i = inputs(&p, now);
    i.forced = Some(Forced { since: now, prevent_wakeup_until: None });
    let d = decide(&i, now);
    assert_eq!(d.desired, Desired::Asleep);
    assert!(matches!(d.reason, Reason::Forced { .. }));
}

#[test]
fn disabled_targets_are_left_alone() {
    let mut p = policy(Some(60), &[], "UTC");
    p.disabled.value = true;
    let i = inputs(&p, utc(2026, 1, 1, 0, 0));
    let d = decide(&i, utc(2026, 11, 26, 8, 0));
    assert_eq!((d.desired, d.reason, d.next), (Desired::Leave, Reason::Disabled, None));
}

#[test]
fn a_wake_wins_a_tie_with_a_sleep() {
    let p = policy(None, &[(Some("0 8 * * *"), None), (None, Some("0 8 * * *"))], "UTC");
    let i = inputs(&p, utc(2026, 1, 1, 0, 0));
    assert_eq!(decide(&i, utc(2026, 11, 26, 8, 0)).desired, Desired::Awake);
}

#[test]
fn a_daily_window_flips_exactly_twice_a_day_across_daylight_saving_changes() {
    for tz in ["Europe/Berlin", "America/New_York", "Australia/Sydney"] {
        // 02:30 and 03:30 fall into (or next to) the changed hour in these zones.
        let p = policy(None, &[(Some("30 2 * * *"), Some("30 3 * * *"))], tz);
        let i = inputs(&p, utc(2025, 1, 1, 0, 0));
        for (start, days) in [(utc(2026, 3, 1, 12, 0), 60), (utc(2026, 9, 20, 12, 0), 60)] {
            let mut t = start;
            let mut flips = 0;
            let mut state = decide(&i, t).desired;
            let end = start + chrono::Duration::days(days);
            loop {
                let d = decide(&i, t);
                assert_eq!(d.desired, state);
                match d.next {
                    Some(n) if n < end => {
                        assert!(!d.recheck);
                        t = n;
                        let next_state = decide(&i, t).desired;
                        assert_ne!(next_state, state);
                        state = next_state;
                        flips += 1;
                    }
                    _ => break,
                }
            }
            assert_eq!(flips, 2 * days, "{tz} from {start}");
        }
    }
}

// ---- property tests -------------------------------------------------------

const ZONES: &[&str] = &[
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Australia/Sydney",
    "Asia/Kolkata",
    "Pacific/Chatham",
    "America/Santiago",
];

fn cron() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec!["0", "15", "30", "*/20", "5,35", "59"]),
        prop::sample::select(vec!["*", "0", "2", "3", "8", "19", "1-5", "*/6", "22-23"]),
        prop::sample::select(vec!["*", "*", "*", "1", "15", "1-7"]),
        prop::sample::select(vec!["*", "*", "*", "3", "10,11", "1-6"]),
        prop::sample::select(vec!["*", "1-5", "0", "6,0", "MON-FRI", "7", "3"]),
    )
        .prop_map(|(m, h, dom, mon, dow)| format!("{m} {h} {dom} {mon} {dow}"))
}

fn pair() -> impl Strategy<Value = (Option<String>, Option<String>)> {
    (prop::option::of(cron()), prop::option::of(cron()))
        .prop_filter("one of sleep or wake", |(s, w)| (s.is_some() || w.is_some()) && s != w)
}

#[derive(Debug, Clone)]
struct Case {
    tz: &'static str,
    sleep_after: Option<u64>,
    pairs: Vec<(Option<String>, Option<String>)>,
    now: i64,
    first_seen_ago: i64,
    last_use_ago: Option<(i64, bool)>,
    asleep_since_ago: Option<i64>,
    forced: Option<(i64, Option<i64>)>,
    on_request: bool,
    on_schedule: bool,
    unverified_wake_ago: Option<i64>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::sample::select(ZONES.to_vec()),
        prop::option::of(1u64..=3 * 86_400),
        prop::collection::vec(pair(), 0..3),
        1_767_225_600i64..1_830_297_600, // 2026-01-01 .. 2027-12-31
        0i64..60 * 86_400,
        prop::option::of((0i64..20 * 86_400, any::<bool>())),
        prop::option::of(0i64..20 * 86_400),
        prop::option::of((0i64..5 * 86_400, prop::option::of(-86_400i64..5 * 86_400))),
        any::<bool>(),
        any::<bool>(),
        prop::option::of(-3_600i64..2 * 86_400),
    )
        .prop_map(
            |(
                tz,
                sleep_after,
                pairs,
                now,
                first_seen_ago,
                last_use_ago,
                asleep_since_ago,
                forced,
                on_request,
                on_schedule,
                unverified_wake_ago,
            )| {
                Case {
                    tz,
                    sleep_after,
                    pairs,
                    now,
                    first_seen_ago,
                    last_use_ago,
                    asleep_since_ago,
                    forced,
                    on_request,
                    on_schedule,
                    unverified_wake_ago,
                }
            },
        )
}

fn build(c: &Case) -> (EffectivePolicy, DateTime<Utc>) {
    let pairs: Vec<(Option<&str>, Option<&str>)> =
        c.pairs.iter().map(|(s, w)| (s.as_deref(), w.as_deref())).collect();
    let mut p = policy(c.sleep_after, &pairs, c.tz);
    p.wake_on_request.value = c.on_request;
    p.wake_on_schedule.value = c.on_schedule;
    (p, Utc.timestamp_opt(c.now, 0).unwrap())
}

fn inputs_for<'a>(c: &Case, p: &'a EffectivePolicy, now: DateTime<Utc>) -> Inputs<'a> {
    let ago = |s: i64| now - chrono::Duration::seconds(s);
    Inputs {
        policy: p,
        current: c.asleep_since_ago.map_or(Current::Awake, |s| Current::Asleep { since: ago(s) }),
        last_use: c.last_use_ago.map(|(s, manual)| LastUse { at: ago(s), by: "someone".into(), manual }),
        first_seen: ago(c.first_seen_ago),
        forced: c.forced.map(|(since, until)| Forced {
            since: ago(since),
            prevent_wakeup_until: until.map(|u| Until::Time(ago(since) + chrono::Duration::seconds(u))),
        }),
        unverified_wake: c.unverified_wake_ago.map(ago),
        predicted: &[],
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// The deadline lies in the future, nothing changes before it (checked at
    /// every schedule instant and idle deadline in between, and at random
    /// instants), and the state does change at it.
    #[test]
    fn the_next_deadline_is_the_earliest_change(c in case(), samples in prop::collection::vec(0.0f64..1.0, 8)) {
        let (p, now) = build(&c);
        let i = inputs_for(&c, &p, now);
        let d = decide(&i, now);
        prop_assert_eq!(state_at(&i, now).0, d.desired);
        let Some(next) = d.next else {
            // No change foreseeable: check a year of schedule instants.
            let horizon = now + chrono::Duration::days(366);
            for t in change_points(&i, now, horizon) {
                prop_assert_eq!(state_at(&i, t).0, d.desired, "changed at {} with no deadline", t);
            }
            return Ok(());
        };
        prop_assert!(next > now);
        for t in change_points(&i, now, next) {
            prop_assert_eq!(state_at(&i, t).0, d.desired, "changed at {} before the deadline {}", t, next);
        }
        let span = (next - now).num_seconds();
        for f in samples {
            let t = now + chrono::Duration::seconds(((span - 1) as f64 * f) as i64);
            prop_assert_eq!(state_at(&i, t).0, d.desired);
        }
        if !d.recheck {
            prop_assert_ne!(state_at(&i, next).0, d.desired, "no change at the deadline {}", next);
            prop_assert_eq!(state_at(&i, next - chrono::Duration::seconds(1)).0, d.desired);
        }
    }

    /// With only an idle timeout, the deadline is exactly last use + sleepAfter.
    #[test]
    fn the_idle_deadline_is_last_use_plus_sleep_after(
        sleep_after in 1u64..86_400, used_ago in 0i64..86_400, seen_ago in 86_400i64..2 * 86_400, now in 1_767_225_600i64..1_830_297_600,
    ) {
        let p = policy(Some(sleep_after), &[], "UTC");
        let now = Utc.timestamp_opt(now, 0).unwrap();
        let used_at = now - chrono::Duration::seconds(used_ago);
        let mut i = inputs(&p, now - chrono::Duration::seconds(seen_ago));
        i.last_use = used(used_at);
        let d = decide(&i, now);
        let deadline = used_at + chrono::Duration::seconds(sleep_after as i64);
        if deadline > now {
            prop_assert_eq!(d.desired, Desired::Awake);
            prop_assert_eq!(d.next, Some(deadline));
        } else {
            prop_assert_eq!(d.desired, Desired::Asleep);
            prop_assert_eq!(d.reason, Reason::Idle { last_use: used_at, after: Duration::from_secs(sleep_after), at: deadline });
        }
    }

    /// A daily schedule fires once per local calendar day through a whole
    /// year, whatever daylight saving does.
    #[test]
    fn daily_schedules_neither_skip_nor_double_fire(tz in prop::sample::select(ZONES.to_vec()), h in 0u32..24, m in prop::sample::select(vec![0u32, 15, 30, 59])) {
        let zone: Tz = tz.parse().unwrap();
        let s: Schedule = format!("{m} {h} * * *").parse().unwrap();
        let mut t = utc(2025, 12, 31, 0, 0);
        let mut last_day: Option<chrono::NaiveDate> = None;
        for _ in 0..370 {
            let n = s.next_after(t, zone).unwrap();
            let day = n.with_timezone(&zone).date_naive();
            if let Some(prev) = last_day {
                prop_assert_eq!(day, prev.succ_opt().unwrap(), "{} {}: {} after {}", tz, s, n, t);
            }
            last_day = Some(day);
            t = n;
        }
        prop_assert!(last_day.unwrap().year() >= 2026);
    }
}

/// Every instant in (from, to) at which the state could change: schedule
/// instants and idle deadlines measured from each of them.
fn change_points(i: &Inputs<'_>, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<DateTime<Utc>> {
    let p = i.policy;
    let tz = p.timezone.value;
    let mut out = vec![i.first_seen];
    out.extend(i.last_use.as_ref().map(|u| u.at));
    out.extend(i.forced.map(|f| f.since));
    if let Some(at) = i.unverified_wake {
        out.push(at);
        out.push(at + chrono::Duration::from_std(super::unverified_grace(p)).unwrap());
    }
    if let SleepAfter::After(d) = p.sleep_after.value {
        let d = chrono::Duration::from_std(d).unwrap();
        let extra: Vec<_> = out.iter().map(|t| *t + d).collect();
        out.extend(extra);
    }
    for pair in &p.schedules.value {
        for s in [&pair.sleep, &pair.wake].into_iter().flatten() {
            let mut t = from;
            for _ in 0..3_000 {
                match s.next_after(t, tz) {
                    Some(n) if n < to => {
                        out.push(n);
                        if let SleepAfter::After(d) = p.sleep_after.value {
                            out.push(n + chrono::Duration::from_std(d).unwrap());
                        }
                        t = n;
                    }
                    _ => break,
                }
            }
        }
    }
    out.retain(|t| *t > from && *t < to);
    out
}

// ---- predicted wakes (wake.predictive) ------------------------------------

fn predictive(mut p: EffectivePolicy) -> EffectivePolicy {
    p.wake_predictive.value = Some(crate::policy::Predictive::default());
    p
}

#[test]
fn a_predicted_wake_wakes_like_a_scheduled_one_and_names_its_prediction() {
    let p = predictive(policy(Some(30 * 60), &[], "UTC"));
    let wakes = [PredictedWake {
        at: utc(2026, 11, 26, 8, 50),
        predicted_use: utc(2026, 11, 26, 9, 0),
        until: utc(2026, 11, 26, 9, 30),
    }];
    let mut i = inputs(&p, utc(2026, 11, 1, 0, 0));
    i.current = Current::Asleep { since: utc(2026, 11, 25, 18, 30) };
    i.last_use = used(utc(2026, 11, 25, 18, 0));
    i.predicted = &wakes;
    let d = decide(&i, utc(2026, 11, 26, 8, 40));
    assert_eq!((d.desired, d.next), (Desired::Asleep, Some(utc(2026, 11, 26, 8, 50))));
    let d = decide(&i, utc(2026, 11, 26, 8, 50));
    assert_eq!(d.desired, Desired::Awake);
    assert_eq!(
        d.reason,
        Reason::PredictedWake {
            at: wakes[0].at,
            predicted_use: wakes[0].predicted_use,
            until: wakes[0].until
        }
    );
    assert_eq!(d.reason.trigger(), "predicted");
    assert!(d.reason.to_string().contains("predicted first use at 2026-11-26T09:00:00.000Z"), "{}", d.reason);
    assert_eq!(
        d.next,
        Some(utc(2026, 11, 26, 9, 30)),
        "unused, it stays awake until the latest usual first use"
    );
    let d = decide(&i, utc(2026, 11, 26, 9, 30));
    assert_eq!(d.desired, Desired::Asleep);
    // Never less than sleepAfter past the pre-wake.
    let short = [PredictedWake { until: utc(2026, 11, 26, 9, 0), ..wakes[0] }];
    i.predicted = &short;
    assert_eq!(decide(&i, utc(2026, 11, 26, 8, 50)).next, Some(utc(2026, 11, 26, 9, 20)));
    i.predicted = &wakes;
    // A use after the pre-wake is the newer wake edge.
    i.current = Current::Awake;
    i.last_use = used(utc(2026, 11, 26, 9, 5));
    assert!(matches!(decide(&i, utc(2026, 11, 26, 9, 10)).reason, Reason::InUse { .. }));
}

#[test]
fn predicted_wakes_count_only_when_the_policy_opts_in() {
    let p = policy(Some(30 * 60), &[], "UTC");
    let wakes = [PredictedWake {
        at: utc(2026, 11, 26, 8, 50),
        predicted_use: utc(2026, 11, 26, 9, 0),
        until: utc(2026, 11, 26, 9, 0),
    }];
    let mut i = inputs(&p, utc(2026, 11, 1, 0, 0));
    i.current = Current::Asleep { since: utc(2026, 11, 25, 18, 30) };
    i.last_use = used(utc(2026, 11, 25, 18, 0));
    i.predicted = &wakes;
    let d = decide(&i, utc(2026, 11, 26, 8, 50));
    assert_eq!((d.desired, d.next), (Desired::Asleep, None));
}

#[test]
fn a_forced_sleep_that_prevents_wakeup_holds_off_a_predicted_wake() {
    let p = predictive(policy(Some(30 * 60), &[], "UTC"));
    let wakes = [PredictedWake {
        at: utc(2026, 11, 26, 8, 50),
        predicted_use: utc(2026, 11, 26, 9, 0),
        until: utc(2026, 11, 26, 9, 0),
    }];
    let mut i = inputs(&p, utc(2026, 11, 1, 0, 0));
    i.forced = Some(Forced { since: utc(2026, 11, 25, 20, 0), prevent_wakeup_until: Some(Until::Never) });
    i.current = Current::Asleep { since: utc(2026, 11, 25, 20, 0) };
    i.last_use = used(utc(2026, 11, 25, 19, 59));
    i.predicted = &wakes;
    let d = decide(&i, utc(2026, 11, 26, 8, 50));
    assert_eq!(d.desired, Desired::Asleep);
    assert!(matches!(d.reason, Reason::Forced { .. }));
}

#[test]
fn a_scheduled_wake_at_the_same_instant_names_the_reason() {
    let p = predictive(policy(None, &[(Some("0 19 * * *"), Some("0 8 * * *"))], "UTC"));
    let wakes = [PredictedWake {
        at: utc(2026, 11, 26, 8, 0),
        predicted_use: utc(2026, 11, 26, 8, 10),
        until: utc(2026, 11, 26, 8, 10),
    }];
    let mut i = inputs(&p, utc(2026, 11, 1, 0, 0));
    i.predicted = &wakes;
    let d = decide(&i, utc(2026, 11, 26, 8, 0));
    assert_eq!(d.desired, Desired::Awake);
    assert!(matches!(d.reason, Reason::ScheduledWake { .. }), "{:?}", d.reason);
}

#[test]
fn the_first_use_after_a_pre_wake_ends_its_wait_counted_or_not() {
    // Requests do not wake it; the pre-wake did, someone came, it slept
    // again, and a request comes while it sleeps: the pre-wake's wait is
    // over, so it does not wake it a second time.
    let mut p = predictive(policy(Some(60), &[], "UTC"));
    p.wake_on_request.value = false;
    let wakes = [PredictedWake {
        at: utc(2026, 11, 26, 8, 50),
        predicted_use: utc(2026, 11, 26, 9, 0),
        until: utc(2026, 11, 26, 10, 0),
    }];
    let mut i = inputs(&p, utc(2026, 11, 1, 0, 0));
    i.predicted = &wakes;
    i.current = Current::Asleep { since: utc(2026, 11, 26, 9, 3) };
    i.last_use = used(utc(2026, 11, 26, 9, 3) + chrono::Duration::seconds(33));
    let d = decide(&i, utc(2026, 11, 26, 9, 4));
    assert_eq!(d.desired, Desired::Asleep, "{}", d.reason);
    // Before anyone came, it waits for the late mornings.
    i.last_use = used(utc(2026, 11, 25, 17, 0));
    i.current = Current::Awake;
    assert_eq!(decide(&i, utc(2026, 11, 26, 9, 30)).desired, Desired::Awake);
}

/// A wake for a request whose credential could not be checked wakes the
/// target like a use, but sends it back to sleep after the grace unless a
/// counted use follows; it wakes nothing while wake-up is prevented or
/// requests may not wake the target.
#[test]
fn an_unverified_wake_lasts_its_grace_unless_a_use_confirms_it() {
    let p = policy(Some(3600), &[], "UTC");
    let grace = chrono::Duration::from_std(super::unverified_grace(&p)).unwrap();
    let now = utc(2026, 12, 2, 12, 0);
    let slept = now - chrono::Duration::hours(3);
    let mut i = inputs(&p, now - chrono::Duration::days(2));
    i.current = Current::Asleep { since: slept };
    i.last_use = used(slept - chrono::Duration::hours(1));
    let woken = now - chrono::Duration::seconds(10);
    i.unverified_wake = Some(woken);
    let d = decide(&i, now);
    assert_eq!(
        (d.desired, d.reason.clone(), d.next),
        (Desired::Awake, Reason::UnverifiedWake { at: woken }, Some(woken + grace))
    );
    assert_eq!(d.reason.trigger(), "request");
    let later = decide(&i, woken + grace);
    assert_eq!(later.desired, Desired::Asleep);
    assert_eq!(later.reason, Reason::Unconfirmed { woken, at: woken + grace });
    // A counted use after it: the usual idle timeout from that use.
    i.last_use = used(woken + chrono::Duration::seconds(5));
    let d = decide(&i, woken + grace);
    assert_eq!(d.desired, Desired::Awake);
    assert_eq!(d.next, Some(woken + chrono::Duration::seconds(5) + chrono::Duration::hours(1)));
    // Requests may not wake it: nor may an unverified one.
    let mut off = p.clone();
    off.wake_on_request.value = false;
    let mut j = inputs(&off, now - chrono::Duration::days(2));
    j.current = Current::Asleep { since: slept };
    j.last_use = used(slept - chrono::Duration::hours(1));
    j.unverified_wake = Some(woken);
    assert_eq!(decide(&j, now).desired, Desired::Asleep);
}
