#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use chrono::{Datelike, Duration, TimeZone, Weekday};
use proptest::prelude::*;

use super::*;
use crate::policy::{SleepPolicy, candidate};

const BERLIN: Tz = chrono_tz::Europe::Berlin;

/// The effective policy of a namespace under a `SleepPolicy` with this
/// spec (YAML flow style).
fn policy(spec: &str) -> EffectivePolicy {
    let p: SleepPolicy = serde_yaml::from_str(&format!(
        "apiVersion: dormant.dev/v1alpha1\nkind: SleepPolicy\nmetadata: {{name: p}}\nspec: {spec}"
    ))
    .unwrap();
    with_policy(
        TargetKind::Namespace,
        &BTreeMap::new(),
        &TargetAnnotations::default(),
        candidate(&p),
        &Defaults::default(),
    )
    .unwrap()
}

fn at(tz: Tz, y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
    tz.with_ymd_and_hms(y, mo, d, h, mi, 0).earliest().unwrap().with_timezone(&Utc)
}

fn scenario<'a>(from: DateTime<Utc>, to: DateTime<Utc>, uses: &'a [DateTime<Utc>]) -> Scenario<'a> {
    Scenario {
        target: "namespace/shop".into(),
        from,
        to,
        start: Start::fresh(from),
        uses,
        profile: None,
        requests: Requests { cpu_cores: 2.0, memory_bytes: 4.0 * GIB },
    }
}

/// Workdays from `first` for `days` days: a first use at 09:00 plus the
/// day's offset in minutes, then one every 10 minutes for 8 hours.
fn office(tz: Tz, first: NaiveDate, days: i64, jitter: impl Fn(i64) -> i64) -> Vec<DateTime<Utc>> {
    let mut out = Vec::new();
    for d in 0..days {
        let day = first + Duration::days(d);
        if matches!(day.weekday(), Weekday::Sat | Weekday::Sun) {
            continue;
        }
        let begin = local_instant(tz, day.and_hms_opt(9, 0, 0).unwrap()) + Duration::minutes(jitter(d));
        out.extend((0..48).map(|k| begin + Duration::minutes(10 * k)));
    }
    out
}

#[test]
fn cold_starts_are_uses_that_find_the_target_asleep() {
    let p = policy("{sleepAfter: 30m}");
    let utc = chrono_tz::UTC;
    let from = at(utc, 2026, 3, 2, 8, 0);
    let uses = [at(utc, 2026, 3, 2, 9, 0), at(utc, 2026, 3, 2, 9, 20), at(utc, 2026, 3, 2, 10, 30)];
    let run = simulate("idle 30m", &p, &scenario(from, at(utc, 2026, 3, 2, 12, 0), &uses));
    let seen: Vec<(String, State, &str)> =
        run.transitions.iter().map(|t| (t.local.clone(), t.to, t.trigger.as_str())).collect();
    assert_eq!(
        seen,
        [
            ("2026-03-02T08:30:00Z".to_string(), State::Asleep, "idle"),
            ("2026-03-02T09:00:00Z".to_string(), State::Awake, "request"),
            ("2026-03-02T09:50:00Z".to_string(), State::Asleep, "idle"),
            ("2026-03-02T10:30:00Z".to_string(), State::Awake, "request"),
            ("2026-03-02T11:00:00Z".to_string(), State::Asleep, "idle"),
        ]
    );
    // Awake 08:00–08:30, 09:00–09:50, 10:30–11:00.
    assert!((run.hours_awake - (0.5 + 50.0 / 60.0 + 0.5)).abs() < 1e-9, "{}", run.hours_awake);
    assert!((run.hours_asleep + run.hours_awake - 4.0).abs() < 1e-9);
    let cold: Vec<_> = run.cold_starts.iter().map(|c| (c.at, c.first_of_day)).collect();
    assert_eq!(cold, [(uses[0], true), (uses[2], false)]);
    assert_eq!(run.first_of_day_cold_starts, 1);
}

#[test]
fn a_use_at_the_instant_of_the_idle_deadline_keeps_the_target_awake() {
    let p = policy("{sleepAfter: 30m}");
    let utc = chrono_tz::UTC;
    let from = at(utc, 2026, 3, 2, 9, 0);
    let uses = [from, at(utc, 2026, 3, 2, 9, 30)];
    let run = simulate("idle 30m", &p, &scenario(from, at(utc, 2026, 3, 2, 11, 0), &uses));
    assert_eq!(run.transitions.len(), 1, "{:?}", run.transitions);
    assert_eq!(run.transitions[0].at, at(utc, 2026, 3, 2, 10, 0));
    assert!(run.cold_starts.is_empty());
}

#[test]
fn money_follows_the_policys_pricing_and_the_targets_requests() {
    let p = policy("{sleepAfter: 1h, pricing: {cpuCoreHour: 0.05, memoryGiBHour: 0.01, currency: EUR}}");
    let utc = chrono_tz::UTC;
    let from = at(utc, 2026, 3, 2, 0, 0);
    let uses = [at(utc, 2026, 3, 2, 9, 0)];
    let run = simulate("p", &p, &scenario(from, from + Duration::days(1), &uses));
    // Awake 00:00–01:00 (first seen) and 09:00–10:00: 2 of 24 hours.
    assert!((run.hours_awake - 2.0).abs() < 1e-9);
    let per_hour = 2.0 * 0.05 + 4.0 * 0.01;
    assert_eq!(run.cost.currency, "EUR");
    assert!((run.cost.per_hour - per_hour).abs() < 1e-12);
    assert!((run.cost.always_on - 24.0 * per_hour).abs() < 1e-9);
    assert!((run.cost.saved - 22.0 * per_hour).abs() < 1e-9);
}

#[test]
fn transitions_are_given_in_local_time_and_utc_across_both_daylight_saving_changes() {
    let p = policy("{timezone: Europe/Berlin, schedules: [{sleep: '0 19 * * *', wake: '0 8 * * *'}]}");
    // Spring: Sunday 2026-03-29 02:00 → 03:00. Autumn: Sunday 2026-10-25 03:00 → 02:00.
    for (from, want) in [
        (
            at(BERLIN, 2026, 3, 28, 12, 0),
            [
                ("2026-03-28T19:00:00+01:00", "2026-03-28T18:00:00Z"),
                ("2026-03-29T08:00:00+02:00", "2026-03-29T06:00:00Z"),
                ("2026-03-29T19:00:00+02:00", "2026-03-29T17:00:00Z"),
                ("2026-03-30T08:00:00+02:00", "2026-03-30T06:00:00Z"),
            ],
        ),
        (
            at(BERLIN, 2026, 10, 24, 12, 0),
            [
                ("2026-10-24T19:00:00+02:00", "2026-10-24T17:00:00Z"),
                ("2026-10-25T08:00:00+01:00", "2026-10-25T07:00:00Z"),
                ("2026-10-25T19:00:00+01:00", "2026-10-25T18:00:00Z"),
                ("2026-10-26T08:00:00+01:00", "2026-10-26T07:00:00Z"),
            ],
        ),
    ] {
        let run = simulate("office", &p, &scenario(from, from + Duration::hours(48), &[]));
        let seen: Vec<(String, String)> = run
            .transitions
            .iter()
            .map(|t| (t.local.clone(), t.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)))
            .collect();
        let want: Vec<(String, String)> = want.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        assert_eq!(seen, want);
        // The spring night is an hour shorter, the autumn one an hour longer.
        let night = (run.transitions[1].at - run.transitions[0].at).num_hours();
        assert_eq!(night, if from.month() == 3 { 12 } else { 14 });
    }
    // New York, 2026-03-08 02:00 → 03:00 and 2026-11-01 02:00 → 01:00.
    let p = policy("{timezone: America/New_York, schedules: [{sleep: '30 1 * * *', wake: '30 2 * * *'}]}");
    let ny = chrono_tz::America::New_York;
    let run = simulate("ny", &p, &scenario(at(ny, 2026, 3, 7, 12, 0), at(ny, 2026, 3, 9, 0, 0), &[]));
    let local: Vec<&str> = run.transitions.iter().map(|t| t.local.as_str()).collect();
    // 02:30 does not exist on the 8th: the wake comes right after the gap.
    assert_eq!(local, ["2026-03-08T01:30:00-05:00", "2026-03-08T03:00:00-04:00"]);
    let run = simulate("ny", &p, &scenario(at(ny, 2026, 10, 31, 12, 0), at(ny, 2026, 11, 2, 0, 0), &[]));
    let local: Vec<&str> = run.transitions.iter().map(|t| t.local.as_str()).collect();
    // 01:30 happens twice on the 1st: one sleep.
    assert_eq!(local, ["2026-11-01T01:30:00-04:00", "2026-11-01T02:30:00-05:00"]);
}

#[test]
fn predictive_pre_wake_avoids_first_use_cold_starts_and_says_why() {
    let plain = policy("{timezone: Europe/Berlin, sleepAfter: 30m}");
    let ahead = policy(
        "{timezone: Europe/Berlin, sleepAfter: 30m, wake: {predictive: {lead: 10m, confidence: 0.8}}}",
    );
    let first = NaiveDate::from_ymd_opt(2026, 3, 2).unwrap();
    let uses = office(BERLIN, first, 21, |d| (d * 7) % 11 - 5);
    let from = local_instant(BERLIN, first.and_hms_opt(0, 0, 0).unwrap());
    let sc = scenario(from, from + Duration::days(21), &uses);
    let c = compare(&[("idle 30m".into(), plain), ("idle 30m + predictive".into(), ahead)], &sc);
    let (base, pred) = (&c.runs[0].run, &c.runs[1].run);
    assert_eq!(base.first_of_day_cold_starts, 15, "every workday morning waits");
    // Monday of the first week has nothing to go by; every other morning is
    // woken ahead, from the pooled week at first, then per weekday.
    assert_eq!(pred.first_of_day_cold_starts, 1, "{:?}", pred.cold_starts);
    assert_eq!((pred.pre_wakes.count, pred.pre_wakes.used, pred.pre_wakes.unused), (14, 14, 0));
    let w = pred.transitions.iter().find(|t| t.trigger == "predicted").unwrap();
    assert!(w.reason.starts_with("woken ahead of its predicted first use at "), "{}", w.reason);
    // The extra awake time is exactly the time between pre-wakes and first uses.
    assert!(pred.pre_wakes.hours > 0.0);
    assert!((c.runs[1].extra_hours_awake - pred.pre_wakes.hours).abs() < 1e-9);
    assert_eq!(c.runs[1].extra_cold_starts, -14);
    assert!(c.runs[1].saved_vs_baseline < 0.0, "waking early costs a little");
}

#[test]
fn expected_uses_follow_the_profile() {
    let first = NaiveDate::from_ymd_opt(2026, 3, 2).unwrap();
    let uses = office(BERLIN, first, 28, |_| 0);
    let from = local_instant(BERLIN, (first + Duration::days(28)).and_hms_opt(0, 0, 0).unwrap());
    let mut p = Profile::new(BERLIN, local_instant(BERLIN, first.and_hms_opt(0, 0, 0).unwrap()));
    p.record(&uses.iter().map(|u| (*u, 1)).collect::<Vec<_>>(), &[], from);
    let expected = expected_uses(&p, from, from + Duration::days(7));
    assert!(!expected.is_empty());
    for u in &expected {
        let l = u.with_timezone(&BERLIN);
        assert!(!matches!(l.weekday(), Weekday::Sat | Weekday::Sun), "{l}");
        assert!((9..17).contains(&chrono::Timelike::hour(&l)), "{l}");
    }
    // Six uses an hour, eight hours, five days; the first at 09:00 sharp.
    assert_eq!(expected.len(), 5 * (8 * 6 + 1), "{expected:?}");
    assert_eq!(
        expected[0],
        local_instant(BERLIN, (first + Duration::days(28)).and_hms_opt(9, 0, 0).unwrap())
    );
}

#[test]
fn past_weeks_replay_their_recorded_mornings_and_days_off() {
    let first = NaiveDate::from_ymd_opt(2026, 3, 2).unwrap();
    // Four weeks; Thursday the 19th starts at 09:30; Wednesday the 18th is off.
    let off = NaiveDate::from_ymd_opt(2026, 3, 18).unwrap();
    let uses: Vec<_> = office(BERLIN, first, 28, |d| if d == 17 { 30 } else { 0 })
        .into_iter()
        .filter(|u| u.with_timezone(&BERLIN).date_naive() != off)
        .collect();
    let end = local_instant(BERLIN, (first + Duration::days(28)).and_hms_opt(0, 0, 0).unwrap());
    let mut p = Profile::new(BERLIN, local_instant(BERLIN, first.and_hms_opt(0, 0, 0).unwrap()));
    p.record(&uses.iter().map(|u| (*u, 1)).collect::<Vec<_>>(), &[], end);
    let week =
        local_instant(BERLIN, NaiveDate::from_ymd_opt(2026, 3, 16).unwrap().and_hms_opt(0, 0, 0).unwrap());
    let replay = expected_uses(&p, week, week + Duration::days(7));
    let on = |d: u32| -> Vec<DateTime<Utc>> {
        replay.iter().filter(|u| u.with_timezone(&BERLIN).date_naive().day() == d).copied().collect()
    };
    assert!(on(18).is_empty(), "the day off has no use");
    let thursday = on(19);
    assert_eq!(thursday[0], at(BERLIN, 2026, 3, 19, 9, 30), "the recorded first use");
    assert_eq!(on(17)[0], at(BERLIN, 2026, 3, 17, 9, 0));
    assert!(on(21).is_empty() && on(22).is_empty(), "weekends stay quiet");
    // Replayed under a policy, the day off costs nothing and the late
    // Thursday wakes at 09:30.
    let run = simulate(
        "idle 30m",
        &policy("{timezone: Europe/Berlin, sleepAfter: 30m}"),
        &scenario(week, week + Duration::days(7), &replay),
    );
    assert_eq!(run.first_of_day_cold_starts, 4);
    assert!(run.cold_starts.iter().any(|c| c.at == at(BERLIN, 2026, 3, 19, 9, 30)));
}

#[test]
fn the_table_and_the_json_say_what_each_policy_does() {
    let utc = chrono_tz::UTC;
    let from = at(utc, 2026, 3, 2, 8, 0);
    let uses = [at(utc, 2026, 3, 2, 9, 0)];
    let sc = scenario(from, at(utc, 2026, 3, 2, 12, 0), &uses);
    let c = compare(&[("never".into(), policy("{}")), ("idle 30m".into(), policy("{sleepAfter: 30m}"))], &sc);
    let text = render(std::slice::from_ref(&c), true);
    assert!(text.contains("never (baseline)"), "{text}");
    let row = text.lines().find(|l| l.starts_with("idle 30m")).unwrap();
    assert!(row.contains("3.0") && row.contains("USD"), "{row}");
    assert!(text.contains("2026-03-02T08:30:00Z") && text.contains("idle"), "{text}");
    let json = serde_json::to_value(&c).unwrap();
    assert_eq!(json["baseline"], "never");
    let run = &json["runs"][1];
    assert_eq!(run["policy"], "idle 30m");
    assert_eq!(run["hoursAwake"], 1.0);
    assert_eq!(run["transitions"][0]["to"], "asleep");
    assert_eq!(run["transitions"][0]["local"], "2026-03-02T08:30:00Z");
    assert_eq!(run["coldStarts"][0]["firstOfDay"], true);
    assert!(run["savedVsBaseline"].as_f64().unwrap() > 0.0);
}

// ---- simulate agrees with the decision core, instant for instant ---------

const ZONES: &[&str] = &["UTC", "Europe/Berlin", "America/New_York", "Australia/Sydney", "Asia/Kolkata"];
const CRONS: &[&str] =
    &["0 19 * * 1-5", "0 8 * * 1-5", "30 2 * * *", "30 3 * * *", "0 12 * * 6", "*/45 * * * *"];

#[derive(Debug, Clone)]
struct Case {
    tz: &'static str,
    sleep_after: Option<u32>,
    pairs: Vec<(Option<&'static str>, Option<&'static str>)>,
    on_request: bool,
    on_schedule: bool,
    predictive: Option<(u32, f64)>,
    from: i64,
    days: i64,
    seed: u64,
    start_asleep: Option<i64>,
    forced: Option<(i64, Option<i64>)>,
}

fn case() -> impl Strategy<Value = Case> {
    let pair = (prop::option::of(prop::sample::select(CRONS)), prop::option::of(prop::sample::select(CRONS)))
        .prop_filter("a sleep or a wake, not the same", |(s, w)| (s.is_some() || w.is_some()) && s != w);
    (
        prop::sample::select(ZONES),
        prop::option::of(prop::sample::select(vec![60u32, 600, 1800, 3600, 4 * 3600, 26 * 3600])),
        prop::collection::vec(pair, 0..3),
        any::<bool>(),
        any::<bool>(),
        prop::option::of((
            prop::sample::select(vec![1u32, 10, 45, 180]),
            prop::sample::select(vec![0.3, 0.8, 1.0]),
        )),
        1_767_225_600i64..1_830_297_600,
        1i64..15,
        any::<u64>(),
        prop::option::of(0i64..86_400),
        prop::option::of((0i64..10 * 86_400, prop::option::of(0i64..86_400))),
    )
        .prop_map(
            |(
                tz,
                sleep_after,
                pairs,
                on_request,
                on_schedule,
                predictive,
                from,
                days,
                seed,
                start_asleep,
                forced,
            )| Case {
                tz,
                sleep_after,
                pairs,
                on_request,
                on_schedule,
                predictive,
                from,
                days,
                seed,
                start_asleep,
                forced,
            },
        )
}

fn spec(c: &Case) -> String {
    let pairs: Vec<String> = c
        .pairs
        .iter()
        .map(|(s, w)| {
            let mut f = vec![];
            if let Some(s) = s {
                f.push(format!("sleep: '{s}'"));
            }
            if let Some(w) = w {
                f.push(format!("wake: '{w}'"));
            }
            format!("{{{}}}", f.join(", "))
        })
        .collect();
    let predictive = c
        .predictive
        .map(|(lead, confidence)| format!(", predictive: {{lead: {lead}m, confidence: {confidence}}}"))
        .unwrap_or_default();
    format!(
        "{{timezone: {}, sleepAfter: {}, schedules: [{}], wake: {{onRequest: {}, onSchedule: {}{predictive}}}}}",
        c.tz,
        c.sleep_after.map_or("never".to_string(), |s| format!("{s}s")),
        pairs.join(", "),
        c.on_request,
        c.on_schedule
    )
}

/// A rhythm with noise: most workdays a session from about 09:00 with uses
/// a few minutes apart, some evenings and weekends, and stray uses.
fn trace(tz: Tz, from: DateTime<Utc>, to: DateTime<Utc>, mut seed: u64) -> Vec<DateTime<Utc>> {
    let mut next = move || {
        seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut out = Vec::new();
    let mut day = from.with_timezone(&tz).date_naive();
    while local_instant(tz, day.and_hms_opt(0, 0, 0).unwrap()) < to {
        let weekend = matches!(day.weekday(), Weekday::Sat | Weekday::Sun);
        if next() % 100 < if weekend { 10 } else { 85 } {
            let mut t = local_instant(tz, day.and_hms_opt(9, 0, 0).unwrap())
                + Duration::minutes((next() % 60) as i64 - 30);
            let end = t + Duration::minutes(60 + (next() % 480) as i64);
            while t < end {
                out.push(t);
                t += Duration::seconds(30 + (next() % 2400) as i64);
            }
        }
        for _ in 0..(next() % 3) {
            out.push(
                local_instant(tz, day.and_hms_opt(0, 0, 0).unwrap())
                    + Duration::seconds((next() % 86_400) as i64),
            );
        }
        day = day.succ_opt().unwrap();
    }
    out.retain(|u| *u >= from && *u < to);
    out.sort();
    out
}

/// The state the run says the target is in: just before `s`, or once
/// everything at `s` is done.
fn state(run: &Run, start: Current, s: DateTime<Utc>, at_s: bool) -> Current {
    let n = run.transitions.partition_point(|t| t.at < s || (at_s && t.at == s));
    match n.checked_sub(1).and_then(|k| run.transitions.get(k)) {
        None => start,
        Some(tr) if tr.to == State::Awake => Current::Awake,
        Some(tr) => Current::Asleep { since: tr.at },
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// At every use, every transition, a second either side of them and at
    /// random instants, the state the simulation reports is what the
    /// decision core says for that instant, given what the agent would
    /// know then (its state just before, the latest use, the pre-wakes of
    /// the last week); cold starts are exactly the uses made while asleep;
    /// awake hours add up.
    #[test]
    fn simulate_agrees_with_the_decision_core_instant_for_instant(c in case(), samples in prop::collection::vec(0.0f64..1.0, 40)) {
        agrees(&c, &samples)?;
    }
}

/// Found by the property test: requests do not wake the target, a
/// pre-wake did, someone came and it slept again; a request while it
/// sleeps must not let the pre-wake wake it a second time, and the agent
/// looks again right after each transition.
#[test]
fn a_request_that_cannot_wake_it_after_a_used_pre_wake_leaves_it_asleep() {
    let c = Case {
        tz: "UTC",
        sleep_after: Some(60),
        pairs: vec![],
        on_request: false,
        on_schedule: false,
        predictive: Some((10, 0.3)),
        from: 1_767_916_800,
        days: 7,
        seed: 435_212_187_707_198_548,
        start_asleep: None,
        forced: None,
    };
    agrees(&c, &[0.0; 40]).unwrap();
}

fn agrees(c: &Case, samples: &[f64]) -> Result<(), TestCaseError> {
    let p = policy(&spec(c));
    let tz = p.timezone.value;
    let from = Utc.timestamp_opt(c.from, 0).unwrap();
    let to = from + Duration::days(c.days);
    let history = from - Duration::days(28);
    let all = trace(tz, history, to, c.seed);
    let (before, uses): (Vec<DateTime<Utc>>, Vec<DateTime<Utc>>) = all.iter().partition(|u| **u < from);
    let mut profile = Profile::new(tz, history);
    profile.record(&before.iter().map(|u| (*u, 1)).collect::<Vec<_>>(), &[], from);
    let start = Start {
        current: c
            .start_asleep
            .map_or(Current::Awake, |s| Current::Asleep { since: from - Duration::seconds(s) }),
        last_use: before.last().map(|u| LastUse { at: *u, by: "someone".into(), manual: false }),
        first_seen: history,
        forced: c.forced.map(|(since, until)| Forced {
            since: from + Duration::seconds(since),
            prevent_wakeup_until: until
                .map(|u| crate::policy::annotations::Until::Time(from + Duration::seconds(since + u))),
        }),
    };
    let sc = Scenario { start: start.clone(), profile: Some(&profile), ..scenario(from, to, &uses) };
    let run = simulate("p", &p, &sc);

    let mut instants: Vec<DateTime<Utc>> = vec![from];
    for t in uses.iter().chain(run.transitions.iter().map(|t| &t.at)) {
        instants.extend([*t - Duration::seconds(1), *t, *t + Duration::seconds(1)]);
    }
    instants.extend(
        samples
            .iter()
            .map(|f| from + Duration::milliseconds(((to - from).num_milliseconds() as f64 * f) as i64)),
    );
    instants.retain(|t| *t >= from && *t < to);
    for s in instants {
        let day = s.with_timezone(&tz).date_naive();
        let window: Vec<PredictedWake> = run
            .predicted
            .iter()
            .filter(|w| {
                let d = w.predicted_use.with_timezone(&tz).date_naive();
                d <= day && d >= day - Duration::days(7)
            })
            .copied()
            .collect();
        let last_use = uses[..uses.partition_point(|u| *u <= s)]
            .last()
            .map(|u| LastUse { at: *u, by: "someone".into(), manual: false })
            .or_else(|| start.last_use.clone());
        let inputs = Inputs {
            policy: &p,
            current: state(&run, start.current, s, false),
            last_use,
            first_seen: start.first_seen,
            forced: start.forced,
            unverified_wake: None,
            predicted: &window,
        };
        let want = decide(&inputs, s).desired;
        let got = state(&run, start.current, s, true);
        let got = if matches!(got, Current::Awake) { Desired::Awake } else { Desired::Asleep };
        prop_assert_eq!(got, want, "at {} ({}): {}", s, s.with_timezone(&tz), spec(c));
    }
    let cold: Vec<DateTime<Utc>> = uses
        .iter()
        .filter(|u| matches!(state(&run, start.current, **u, false), Current::Asleep { .. }))
        .copied()
        .collect();
    prop_assert_eq!(run.cold_starts.iter().map(|c| c.at).collect::<Vec<_>>(), cold);
    let mut awake = 0.0;
    let mut t = from;
    let mut st = start.current;
    for tr in run.transitions.iter().chain(std::iter::once(&Transition {
        at: to,
        local: String::new(),
        to: State::Awake,
        trigger: String::new(),
        reason: String::new(),
    })) {
        if matches!(st, Current::Awake) {
            awake += hours(tr.at - t);
        }
        st = if tr.to == State::Awake { Current::Awake } else { Current::Asleep { since: tr.at } };
        t = tr.at;
    }
    prop_assert!((awake - run.hours_awake).abs() < 1e-6, "{} vs {}", awake, run.hours_awake);
    for w in run.transitions.windows(2) {
        prop_assert!(w[0].at <= w[1].at && w[0].to != w[1].to, "{:?}", w);
    }
    Ok(())
}
