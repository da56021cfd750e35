#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use chrono::{Duration, NaiveDate, NaiveTime, TimeZone};
use proptest::prelude::*;

use super::*;

const BERLIN: Tz = chrono_tz::Europe::Berlin;
const NEW_YORK: Tz = chrono_tz::America::New_York;

fn at(tz: Tz, y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
    tz.with_ymd_and_hms(y, mo, d, h, mi, 0).earliest().unwrap().with_timezone(&Utc)
}

fn hm(h: u32, m: u32) -> NaiveTime {
    NaiveTime::from_hms_opt(h, m, 0).unwrap()
}

fn date(y: i32, m: u32, d: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(y, m, d).unwrap()
}

/// Monday to Friday from `first` for `days` days: uses every 10 minutes
/// from `start` local time for 8 hours.
fn office(tz: Tz, first: NaiveDate, days: i64, start: (u32, u32)) -> Vec<(DateTime<Utc>, u64)> {
    let mut out = Vec::new();
    for d in 0..days {
        let day = first + Duration::days(d);
        if matches!(day.weekday(), chrono::Weekday::Sat | chrono::Weekday::Sun) {
            continue;
        }
        let begin = local_instant(tz, day.and_time(hm(start.0, start.1)));
        for k in 0..48 {
            out.push((begin + Duration::minutes(10 * k), 1));
        }
    }
    out
}

fn close(a: f64, b: f64, tolerance: f64) -> bool {
    (a - b).abs() <= tolerance
}

#[test]
fn a_profile_round_trips_through_its_annotation_value() {
    let now = at(BERLIN, 2026, 3, 20, 18, 0);
    let mut p = Profile::new(BERLIN, at(BERLIN, 2026, 3, 2, 0, 0));
    p.record(&office(BERLIN, date(2026, 3, 2), 19, (9, 0)), &[at(BERLIN, 2026, 3, 19, 9, 0)], now);
    let v = p.encode();
    assert!(v.starts_with("v1;z=Europe/Berlin;"), "{v}");
    assert_eq!(Profile::parse(&v).unwrap(), p);
    assert_eq!(p.first_use_on(date(2026, 3, 19)), Some(hm(9, 0)));
    assert_eq!(p.cold_starts(), vec![at(BERLIN, 2026, 3, 19, 9, 0)]);
    // Monday 09:00–10:00 local: six uses a week, in use every week.
    let h = 9;
    assert!(p.uses(now)[h] > 6.0, "{}", p.uses(now)[h]);
    assert!(close(p.activity(now)[h], 1.0, 0.01), "{}", p.activity(now)[h]);
    assert_eq!(p.activity(now)[5 * 24 + 9], 0.0, "Saturday morning is never in use");
}

#[test]
fn unreadable_values_start_a_fresh_profile_and_never_panic() {
    let now = at(BERLIN, 2026, 3, 20, 18, 0);
    let good = record(None, &[(now, 3)], &[], BERLIN, now);
    let mut garbage = vec![
        String::new(),
        "{not json".into(),
        "v2;z=UTC".into(),
        "v1".into(),
        "v1;z=Mars/Olympus;s=1;e=0;l=;r=0;u=0*168;a=0*168;d=;c=".into(),
        good.replace("u=", "u=1,"),
        good.replace("a=", "a=99999999,"),
        good.replace(";c=", ";c=1,2"),
        good.replace("e=", "e=1"),
        format!("{good};extra=1"),
        good.replace("0*", "0*999999999999999999999"),
        good.replace("0*", "0*0,0*"),
        "v1;z=UTC;s=99999999999;e=0;l=;r=0;u=0*168;a=0*168;d=;c=".into(),
        "v1;z=UTC;s=1800000000;e=1799884800;l=;r=zz;u=0*168;a=0*168;d=;c=".into(),
        "v1;z=UTC;s=1800000000;e=1799884800;l=;r=0;u=0*168;a=0*168;d=5:1440;c=".into(),
        "v1;z=UTC;s=1800000000;e=1799884800;l=;r=0;u=0*168;a=0*168;d=20000:1,0:2;c=".into(),
    ];
    garbage.push(good.chars().rev().collect());
    for g in &garbage {
        assert!(Profile::parse(g).is_err(), "read {g:?}");
        let v = record(Some(g), &[(now, 1)], &[], BERLIN, now);
        let p = Profile::parse(&v).unwrap();
        assert_eq!(p.since(), now, "{g:?} did not start a fresh profile");
    }
    assert!(Profile::parse(&good).is_ok());
}

#[test]
fn a_profile_kept_in_another_time_zone_is_started_again() {
    let now = at(BERLIN, 2026, 3, 20, 18, 0);
    let v = record(None, &[(now - Duration::days(3), 3)], &[], BERLIN, now);
    let later = now + Duration::hours(1);
    let p = Profile::parse(&record(Some(&v), &[(later, 1)], &[], NEW_YORK, later)).unwrap();
    assert_eq!(p.tz(), NEW_YORK);
    assert_eq!(p.since(), later);
}

#[test]
fn the_worst_case_value_fits_the_bound() {
    let longest = chrono_tz::TZ_VARIANTS.iter().max_by_key(|t| t.name().len()).copied().unwrap();
    let mut p = Profile::new(longest, Utc.timestamp_opt(MAX_T, 0).unwrap());
    p.since = MAX_T;
    p.epoch = MAX_T / EPOCH_SPAN * EPOCH_SPAN;
    p.last = Some(MAX_T);
    p.recent = u64::MAX;
    for h in 0..HOURS {
        // All different, so no run is shortened.
        p.uses[h] = MAX_USES - h as u64;
        p.active[h] = MAX_ACTIVE - h as u64;
    }
    p.days = (0..=DAYS_KEPT).map(|k| (MAX_DAY - 63 * (DAYS_KEPT - k), 1439)).collect();
    p.cold = (0..COLD_STARTS_KEPT as i64).map(|k| MIN_T / 60 + k * (MAX_T - MIN_T) / 60 / 15).collect();
    let v = p.encode();
    assert!(v.len() <= MAX_BYTES, "{} bytes > {MAX_BYTES}", v.len());
    assert!(v.len() > MAX_BYTES - 200, "the bound is loose: the worst case is {} bytes", v.len());
    assert_eq!(Profile::parse(&v).unwrap(), p);
}

#[test]
fn old_weeks_fade_by_the_decay_per_week() {
    let monday = at(chrono_tz::UTC, 2026, 3, 2, 10, 15);
    let mut p = Profile::new(chrono_tz::UTC, monday);
    p.record(&[(monday, 10)], &[], monday);
    let h = 10;
    assert!(close(p.uses(monday)[h], 10.0, 0.01));
    for weeks in [1, 2, 4, 5, 9] {
        let later = monday + Duration::weeks(weeks);
        // A flush of a use in another hour moves the epoch forward, scaling once.
        p.record(&[(later - Duration::hours(5), 1)], &[], later);
        let want = 10.0 * DECAY_PER_WEEK.powi(weeks as i32);
        assert!(close(p.uses(later)[h], want, 0.02), "after {weeks} weeks: {} not {want}", p.uses(later)[h]);
    }
}

#[test]
fn the_first_use_of_a_day_is_the_first_after_four_quiet_hours() {
    let tz = BERLIN;
    let mut p = Profile::new(tz, at(tz, 2026, 4, 1, 0, 0));
    let mut uses = vec![];
    // Thursday: 09:00 to 23:50, then a late night until 00:40 on Friday.
    for k in 0..96 {
        uses.push((at(tz, 2026, 4, 2, 9, 0) + Duration::minutes(10 * k), 1));
    }
    for k in 0..6 {
        uses.push((at(tz, 2026, 4, 3, 0, 0) + Duration::minutes(10 * k), 1));
    }
    // Friday morning after a quiet night.
    uses.push((at(tz, 2026, 4, 3, 9, 12), 1));
    p.record(&uses, &[], at(tz, 2026, 4, 3, 12, 0));
    assert_eq!(p.first_use_on(date(2026, 4, 2)), Some(hm(9, 0)));
    assert_eq!(p.first_use_on(date(2026, 4, 3)), Some(hm(9, 12)), "the late night is no first use");
}

#[test]
fn hours_of_the_week_are_local_across_both_daylight_saving_changes() {
    // (zone, the Sunday it springs forward, the Sunday it falls back, the repeated hour)
    for (tz, spring, fall, repeated) in [
        (BERLIN, date(2026, 3, 29), date(2026, 10, 25), 2),
        (NEW_YORK, date(2026, 3, 8), date(2026, 11, 1), 1),
    ] {
        for change in [spring, fall] {
            let mut p = Profile::new(tz, local_instant(tz, (change - Duration::days(8)).and_time(hm(0, 0))));
            // 09:30 local every day from a week before to a week after.
            let uses: Vec<_> = (-7..=7)
                .map(|d| (local_instant(tz, (change + Duration::days(d)).and_time(hm(9, 30))), 1))
                .collect();
            let now = local_instant(tz, (change + Duration::days(8)).and_time(hm(0, 0)));
            p.record(&uses, &[], now);
            let counted: f64 = p.uses(now).iter().sum();
            for day in 0..7 {
                let h = day * 24 + 9;
                // Two or three uses, a week or two old.
                assert!(p.uses(now)[h] > 1.2, "{tz} {change}: bucket {h} has {}", p.uses(now)[h]);
            }
            let nine: f64 = (0..7).map(|d| p.uses(now)[d * 24 + 9]).sum();
            assert!(close(nine, counted, 1e-9), "{tz} {change}: a use left 09:00 local");
            assert_eq!(p.first_use_on(change), Some(hm(9, 30)), "{tz} {change}");
        }
        // The repeated hour: two uses an hour apart (UTC), one local hour.
        let sunday = 6 * 24 + repeated;
        let first = tz
            .from_local_datetime(&fall.and_time(hm(repeated as u32, 15)))
            .earliest()
            .unwrap()
            .with_timezone(&Utc);
        let second = first + Duration::hours(1);
        assert_eq!(second.with_timezone(&tz).naive_local(), fall.and_time(hm(repeated as u32, 15)));
        let mut p = Profile::new(tz, first - Duration::days(1));
        p.record(&[(first, 1), (second, 1)], &[], second);
        assert!(close(p.uses(second)[sunday], 2.0, 0.02), "{tz}: {}", p.uses(second)[sunday]);
        assert!(close(p.active(second)[sunday], 1.0, 0.01), "{tz}: the repeated hour is one hour in use");
        // The skipped hour did not occur that week.
        // Both zones skip 02:00–03:00.
        let skipped = 6 * 24 + 2;
        let after = local_instant(tz, (spring + Duration::days(1)).and_time(hm(0, 0)));
        let p = Profile::new(tz, local_instant(tz, spring.and_time(hm(0, 0))));
        assert_eq!(p.occurrences(after)[skipped], 0.0, "{tz}: 02:00 on {spring} never happened");
        assert!(p.occurrences(after)[6 * 24 + 3] > 0.9, "{tz}: 03:00 did");
    }
}

#[test]
fn cold_starts_keep_the_newest_sixteen() {
    let now = at(chrono_tz::UTC, 2026, 3, 20, 18, 0);
    let cold: Vec<_> = (0..40).map(|k| now - Duration::hours(k)).collect();
    let p = Profile::parse(&record(None, &[], &cold, chrono_tz::UTC, now)).unwrap();
    let kept = p.cold_starts();
    assert_eq!(kept.len(), COLD_STARTS_KEPT);
    assert_eq!(kept.last(), Some(&now));
    assert_eq!(kept.first(), Some(&(now - Duration::hours(15))));
}

/// Uses from two replicas, each flushing its own share every 10 s into the
/// value the other wrote (read-modify-write, one after the other).
#[test]
fn two_replicas_flushes_merge_like_one_agents() {
    let tz = BERLIN;
    let begin = at(tz, 2026, 3, 23, 0, 0);
    let mut all = vec![];
    let mut seed = 7u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for d in 0..5 {
        let day = begin + Duration::days(d);
        let mut t = day + Duration::hours(8) + Duration::seconds((next() % 3600) as i64);
        while t < day + Duration::hours(18) {
            all.push(t);
            t += Duration::seconds(5 + (next() % 900) as i64);
        }
    }
    let single = Profile::parse(&record(
        None,
        &all.iter().map(|t| (*t, 1)).collect::<Vec<_>>(),
        &[],
        tz,
        begin + Duration::days(6),
    ))
    .unwrap();
    let (a, b): (Vec<_>, Vec<_>) = all.iter().partition(|_| next() % 2 == 0);
    let mut value: Option<String> = None;
    let mut flush = |mine: &[DateTime<Utc>], now: DateTime<Utc>, flushed: &mut usize| {
        let batch: Vec<_> = mine[*flushed..].iter().take_while(|t| **t <= now).map(|t| (*t, 1)).collect();
        *flushed += batch.len();
        if !batch.is_empty() {
            value = Some(record(value.as_deref(), &batch, &[], tz, now));
        }
    };
    let (mut fa, mut fb) = (0, 0);
    let mut now = begin;
    while now < begin + Duration::days(6) {
        flush(&a, now, &mut fa);
        flush(&b, now + Duration::seconds(5), &mut fb);
        now += Duration::seconds(10);
    }
    let merged = Profile::parse(value.as_deref().unwrap()).unwrap();
    let end = begin + Duration::days(6);
    assert_eq!(merged.first_uses(), single.first_uses(), "a day keeps its earliest first use");
    for h in 0..HOURS {
        assert!(close(merged.uses(end)[h], single.uses(end)[h], 0.5), "uses of hour {h}");
        assert!(
            close(merged.active(end)[h], single.active(end)[h], 0.01),
            "an hour in use counted once: {h}"
        );
    }
    assert_eq!(merged.last_use(), single.last_use());
}

// ---- property tests -------------------------------------------------------

const ZONES: &[Tz] = &[
    chrono_tz::UTC,
    BERLIN,
    NEW_YORK,
    chrono_tz::Australia::Sydney,
    chrono_tz::Asia::Kolkata,
    chrono_tz::Pacific::Chatham,
    chrono_tz::Australia::Lord_Howe,
];

/// Instants anywhere, including far outside the years dormant runs in.
fn instant() -> impl Strategy<Value = DateTime<Utc>> {
    prop_oneof![
        8 => 1_767_225_600i64..1_830_297_600,
        1 => -100_000_000_000i64..100_000_000_000,
        1 => prop::sample::select(vec![i64::MIN / 1_000_000, 0, MIN_T - 1, MAX_T + 1, 8_000_000_000_000]),
    ]
    .prop_map(|s| Utc.timestamp_opt(s, 0).single().unwrap_or_default())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Whatever is recorded, however often, the value stays within
    /// MAX_BYTES and reads back as what was written.
    #[test]
    fn the_value_stays_within_its_size_bound_whatever_the_input(
        tz in prop::sample::select(ZONES.to_vec()),
        rounds in prop::collection::vec(
            (prop::collection::vec((instant(), prop_oneof![1u64..10, Just(u64::MAX), any::<u64>()]), 0..300),
             prop::collection::vec(instant(), 0..30),
             instant()),
            1..6),
    ) {
        let mut value: Option<String> = None;
        for (uses, cold, now) in rounds {
            let v = record(value.as_deref(), &uses, &cold, tz, now);
            prop_assert!(v.len() <= MAX_BYTES, "{} bytes: {}", v.len(), v);
            let p = Profile::parse(&v);
            prop_assert!(p.is_ok(), "unreadable: {}", v);
            prop_assert_eq!(p.unwrap().encode(), v.clone());
            value = Some(v);
        }
    }

    /// Garbage, or a written value with bytes changed, is read or refused,
    /// never a panic, and recording over it stays within the bound.
    #[test]
    fn hand_edited_values_are_read_or_refused_never_a_panic(
        text in ".{0,400}",
        edits in prop::collection::vec((0usize..4000, any::<char>()), 0..5),
    ) {
        let now = Utc.timestamp_opt(1_800_000_000, 0).unwrap();
        let good = record(None, &[(now, 5), (now - Duration::days(2), 3)], &[now], BERLIN, now);
        let mut edited: Vec<char> = good.chars().collect();
        for (i, c) in edits {
            let n = edited.len();
            edited[i % n] = c;
        }
        let edited: String = edited.into_iter().collect();
        for v in [text, edited] {
            let _ = Profile::parse(&v);
            let out = record(Some(&v), &[(now, 1)], &[], BERLIN, now);
            prop_assert!(out.len() <= MAX_BYTES);
        }
    }

    /// The same uses give the same profile whether flushed at once or in
    /// any number of batches (up to rounding: a hundredth of a use per
    /// batch and epoch).
    #[test]
    fn the_result_is_the_same_however_often_it_is_flushed(
        tz in prop::sample::select(ZONES.to_vec()),
        offsets in prop::collection::vec(0i64..10 * 7 * 86_400, 1..200),
        cuts in prop::collection::vec(0usize..200, 0..12),
    ) {
        let begin = Utc.timestamp_opt(1_790_000_000, 0).unwrap();
        let mut uses: Vec<DateTime<Utc>> = offsets.iter().map(|s| begin + Duration::seconds(*s)).collect();
        uses.sort();
        let end = *uses.last().unwrap() + Duration::seconds(1);
        let at_once = Profile::parse(&record(None, &uses.iter().map(|t| (*t, 1)).collect::<Vec<_>>(), &[], tz, end)).unwrap();
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % uses.len()).collect();
        cuts.push(uses.len());
        cuts.sort();
        cuts.dedup();
        let mut value: Option<String> = None;
        let mut from = 0;
        for c in &cuts {
            if *c <= from {
                continue;
            }
            let batch: Vec<_> = uses[from..*c].iter().map(|t| (*t, 1)).collect();
            let now = if *c == uses.len() { end } else { uses[*c - 1] + Duration::seconds(1) };
            value = Some(record(value.as_deref(), &batch, &[], tz, now));
            from = *c;
        }
        let batched = Profile::parse(value.as_deref().unwrap()).unwrap();
        prop_assert_eq!(batched.first_uses(), at_once.first_uses());
        prop_assert_eq!(batched.last_use(), at_once.last_use());
        let tolerance = 0.01 * (cuts.len() as f64 + 4.0);
        for h in 0..HOURS {
            prop_assert!(close(batched.uses(end)[h], at_once.uses(end)[h], tolerance), "uses {}: {} vs {}", h, batched.uses(end)[h], at_once.uses(end)[h]);
            prop_assert!(close(batched.active(end)[h], at_once.active(end)[h], tolerance), "active {}", h);
        }
    }
}
