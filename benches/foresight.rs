//! Benchmark: what predictive pre-wake buys on a synthetic 8-week trace.
//!
//! `cargo bench --bench foresight` (pure: no cluster, a few seconds).
//!
//! The trace (Europe/Berlin, Monday 2026-03-02 to Monday 2026-04-27, across
//! the spring daylight-saving change) comes from a committed seed: workday
//! office hours with a first use around 08:50 (Mondays 09:10), σ 12 min,
//! uses a few minutes apart, a lunch break of 40–70 minutes and an end
//! around 17:30; Easter Monday off; one late night (Thursday 2026-04-16,
//! 21:40 to 00:35); one weekend deploy (Saturday 2026-03-21, 14:00–15:20).
//! Each policy is replayed over it by `foresight::simulate`, which learns
//! the profile from the uses as the agent would (starting from none).
//!
//! Prints, per policy: awake hours, cold starts (uses that find the target
//! asleep), first-of-day cold starts, pre-wakes used/unused, money saved;
//! then, for predictive pre-wake against the same policy without it: the
//! share of first-of-day cold starts avoided and the extra awake time, and
//! whether the goal (≥ 80 % avoided for ≤ 5 % more awake time) is met.
//!
//! Exits non-zero when a correctness column is wrong: the simulation must
//! agree with the decision core at every use, every transition (± 1 s)
//! and every 7 minutes; a naive agent that polls the decision core every
//! minute (and at each use) must make the same transitions (each within
//! its minute) and find the same cold starts; hours must add up.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::process::ExitCode;

use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveTime, Utc, Weekday};
use chrono_tz::Tz;
use dormant::foresight::predict;
use dormant::foresight::profile::{Profile, local_instant};
use dormant::foresight::simulate::{self, Run, Scenario, Start, State};
use dormant::policy::annotations::TargetAnnotations;
use dormant::policy::decide::{Current, Desired, Inputs, LastUse, PredictedWake, decide};
use dormant::policy::{Defaults, EffectivePolicy, SleepPolicy, TargetKind, candidate};
use dormant::target::workload::Requests;

const SEED: u64 = 0x00D0_2A47_2026_0302;

/// The committed seed, or `DORMANT_BENCH_SEED` to see how much the figures
/// move with the draw.
fn seed() -> u64 {
    std::env::var("DORMANT_BENCH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(SEED)
}
const TZ: Tz = chrono_tz::Europe::Berlin;

/// splitmix64: small, seeded, good enough for a trace.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.unit().max(1e-12), self.unit());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
    /// Minutes between uses: exponential, mean 4, at most 25.
    fn gap(&mut self) -> Duration {
        let m = (-4.0 * (1.0 - self.unit()).max(1e-12).ln()).min(25.0);
        Duration::seconds((m * 60.0).round() as i64 + 5)
    }
}

fn at(d: NaiveDate, h: u32, m: u32) -> DateTime<Utc> {
    local_instant(TZ, d.and_time(NaiveTime::from_hms_opt(h, m, 0).unwrap()))
}

fn minutes(rng: &mut Rng, mean: f64, sd: f64, clip: f64) -> Duration {
    Duration::seconds(((mean + (rng.normal() * sd).clamp(-clip, clip)) * 60.0).round() as i64)
}

fn session(rng: &mut Rng, from: DateTime<Utc>, to: DateTime<Utc>, out: &mut Vec<DateTime<Utc>>) {
    let mut t = from;
    while t < to {
        out.push(t);
        t += rng.gap();
    }
}

fn trace(first: NaiveDate, weeks: i64) -> Vec<DateTime<Utc>> {
    let mut rng = Rng(seed());
    let holiday = NaiveDate::from_ymd_opt(2026, 4, 6).unwrap();
    let late_night = NaiveDate::from_ymd_opt(2026, 4, 16).unwrap();
    let deploy = NaiveDate::from_ymd_opt(2026, 3, 21).unwrap();
    let mut out = Vec::new();
    for d in 0..7 * weeks {
        let day = first + Duration::days(d);
        let weekend = matches!(day.weekday(), Weekday::Sat | Weekday::Sun);
        if !weekend && day != holiday {
            let mean = if day.weekday() == Weekday::Mon { 9.0 * 60.0 + 10.0 } else { 8.0 * 60.0 + 50.0 };
            let start = at(day, 0, 0) + minutes(&mut rng, mean, 12.0, 40.0);
            let lunch = at(day, 0, 0) + minutes(&mut rng, 12.0 * 60.0 + 15.0, 10.0, 30.0);
            let back = lunch + Duration::minutes(40 + (rng.next() % 31) as i64);
            let end = at(day, 0, 0) + minutes(&mut rng, 17.0 * 60.0 + 30.0, 20.0, 60.0);
            session(&mut rng, start, lunch, &mut out);
            session(&mut rng, back, end, &mut out);
        }
        if day == late_night {
            session(&mut rng, at(day, 21, 40), at(day, 21, 40) + Duration::minutes(175), &mut out);
        }
        if day == deploy {
            session(&mut rng, at(day, 14, 0), at(day, 15, 20), &mut out);
        }
    }
    out.sort();
    out
}

fn policy(spec: &str) -> EffectivePolicy {
    let p: SleepPolicy = serde_yaml::from_str(&format!(
        "apiVersion: dormant.dev/v1alpha1\nkind: SleepPolicy\nmetadata: {{name: bench}}\nspec: {spec}"
    ))
    .unwrap();
    simulate::with_policy(
        TargetKind::VCluster,
        &BTreeMap::new(),
        &TargetAnnotations::default(),
        candidate(&p),
        &Defaults::default(),
    )
    .unwrap()
}

fn current(run: &Run, start: Current, s: DateTime<Utc>, at_s: bool) -> Current {
    let mut st = start;
    for tr in run.transitions.iter().take_while(|t| t.at < s || (at_s && t.at == s)) {
        st = match tr.to {
            State::Awake => Current::Awake,
            State::Asleep => Current::Asleep { since: tr.at },
        };
    }
    st
}

/// Instants at which the decision core, given what the agent would know,
/// disagrees with the simulation.
fn disagreements(p: &EffectivePolicy, sc: &Scenario<'_>, run: &Run) -> (usize, usize) {
    let mut instants: Vec<DateTime<Utc>> = Vec::new();
    for t in sc.uses.iter().chain(run.transitions.iter().map(|t| &t.at)) {
        instants.extend([*t - Duration::seconds(1), *t, *t + Duration::seconds(1)]);
    }
    let mut t = sc.from;
    while t < sc.to {
        instants.push(t);
        t += Duration::minutes(7);
    }
    instants.retain(|t| *t >= sc.from && *t < sc.to);
    let mut wrong = 0;
    for s in &instants {
        let day = s.with_timezone(&TZ).date_naive();
        let window: Vec<PredictedWake> = run
            .predicted
            .iter()
            .filter(|w| {
                let d = w.predicted_use.with_timezone(&TZ).date_naive();
                d <= day && d >= day - Duration::days(7)
            })
            .copied()
            .collect();
        let last_use = sc.uses.iter().rev().find(|u| *u <= s).map(|u| LastUse {
            at: *u,
            by: "bench".into(),
            manual: false,
        });
        let inputs = Inputs {
            policy: p,
            current: current(run, sc.start.current, *s, false),
            last_use,
            first_seen: sc.start.first_seen,
            forced: None,
            unverified_wake: None,
            predicted: &window,
        };
        let want = decide(&inputs, *s).desired;
        let got = match current(run, sc.start.current, *s, true) {
            Current::Awake => Desired::Awake,
            Current::Asleep { .. } => Desired::Asleep,
        };
        if want != got {
            wrong += 1;
            if wrong <= 3 {
                eprintln!("  disagreement at {s}: simulate {got:?}, decide {want:?}");
            }
        }
    }
    (wrong, instants.len())
}

/// A naive agent: looks at the decision every minute and at each use
/// (just before taking it in), learning its profile from each use at once.
struct Polled {
    transitions: Vec<(DateTime<Utc>, State)>,
    cold_starts: Vec<DateTime<Utc>>,
    hours_awake: f64,
}

fn poll(p: &EffectivePolicy, sc: &Scenario<'_>) -> Polled {
    let mut ticks: Vec<(DateTime<Utc>, bool)> = sc.uses.iter().map(|u| (*u, true)).collect();
    let mut t = sc.from;
    while t < sc.to {
        ticks.push((t, false));
        t += Duration::minutes(1);
    }
    // At an instant that is both, the tick looks first, then the use.
    ticks.sort();
    let cfg = p.wake_predictive.value;
    let mut profile: Option<Profile> = None;
    let mut state = sc.start.current;
    let mut last_use: Option<LastUse> = None;
    let mut out = Polled { transitions: vec![], cold_starts: vec![], hours_awake: 0.0 };
    let mut awake_since = matches!(state, Current::Awake).then_some(sc.from);
    let look = |now: DateTime<Utc>,
                state: &mut Current,
                last_use: &Option<LastUse>,
                profile: &Option<Profile>,
                out: &mut Polled,
                awake_since: &mut Option<DateTime<Utc>>| {
        let edges = predict::edges(profile.as_ref(), cfg.as_ref(), TZ, now);
        let inputs = Inputs {
            policy: p,
            current: *state,
            last_use: last_use.clone(),
            first_seen: sc.start.first_seen,
            forced: None,
            unverified_wake: None,
            predicted: &edges.wakes,
        };
        match (decide(&inputs, now).desired, *state) {
            (Desired::Asleep, Current::Awake) => {
                *state = Current::Asleep { since: now };
                out.transitions.push((now, State::Asleep));
                if let Some(a) = awake_since.take() {
                    out.hours_awake += (now - a).num_milliseconds() as f64 / 3.6e6;
                }
            }
            (Desired::Awake, Current::Asleep { .. }) => {
                *state = Current::Awake;
                out.transitions.push((now, State::Awake));
                *awake_since = Some(now);
            }
            _ => {}
        }
    };
    for (now, is_use) in ticks {
        if is_use {
            look(
                now - Duration::milliseconds(1),
                &mut state,
                &last_use,
                &profile,
                &mut out,
                &mut awake_since,
            );
            let cold = matches!(state, Current::Asleep { .. });
            if cold {
                out.cold_starts.push(now);
            }
            last_use = Some(LastUse { at: now, by: "bench".into(), manual: false });
            let mut pr = profile.take().unwrap_or_else(|| Profile::new(TZ, now));
            let first_after_sleep: Vec<DateTime<Utc>> = if cold { vec![now] } else { vec![] };
            pr.record(&[(now, 1)], &first_after_sleep, now);
            profile = Some(pr);
        }
        look(now, &mut state, &last_use, &profile, &mut out, &mut awake_since);
    }
    if let Some(a) = awake_since {
        out.hours_awake += (sc.to - a).num_milliseconds() as f64 / 3.6e6;
    }
    out
}

fn main() -> ExitCode {
    let first = NaiveDate::from_ymd_opt(2026, 3, 2).unwrap();
    let weeks = 8;
    let uses = trace(first, weeks);
    let from = at(first, 0, 0);
    let to = at(first + Duration::weeks(weeks), 0, 0);
    let sc = Scenario {
        target: "vcluster/team-a/dev".into(),
        from,
        to,
        start: Start::fresh(from),
        uses: &uses,
        profile: None,
        requests: Requests { cpu_cores: 4.0, memory_bytes: 16.0 * 1024.0 * 1024.0 * 1024.0 },
    };
    let policies = [
        ("sleepAfter 30m", policy("{timezone: Europe/Berlin, sleepAfter: 30m}")),
        (
            "office hours + sleepAfter 1h",
            policy(
                "{timezone: Europe/Berlin, sleepAfter: 1h, schedules: [{sleep: '0 19 * * 1-5', wake: '0 8 * * 1-5'}]}",
            ),
        ),
        (
            "sleepAfter 30m + predictive 10m/0.8",
            policy(
                "{timezone: Europe/Berlin, sleepAfter: 30m, wake: {predictive: {lead: 10m, confidence: 0.8}}}",
            ),
        ),
        (
            "sleepAfter 30m + predictive 15m/0.8",
            policy(
                "{timezone: Europe/Berlin, sleepAfter: 30m, wake: {predictive: {lead: 15m, confidence: 0.8}}}",
            ),
        ),
    ];
    let named: Vec<(String, EffectivePolicy)> =
        policies.iter().map(|(n, p)| (n.to_string(), p.clone())).collect();
    let started = std::time::Instant::now();
    let c = simulate::compare(&named, &sc);
    let took = started.elapsed();
    println!(
        "trace: {} uses over {weeks} weeks ({} to {}, {}), seed {:#x}; requests 4 cores, 16 GiB",
        uses.len(),
        from.with_timezone(&TZ).format("%Y-%m-%d"),
        to.with_timezone(&TZ).format("%Y-%m-%d"),
        TZ.name(),
        seed()
    );
    let learned = dormant::foresight::profile::record(
        None,
        &uses.iter().map(|u| (*u, 1)).collect::<Vec<_>>(),
        &[],
        TZ,
        to,
    );
    println!(
        "simulated {} policies in {:.1} ms; the profile learned from the trace is {} bytes (bound {})\n",
        named.len(),
        took.as_secs_f64() * 1e3,
        learned.len(),
        dormant::foresight::profile::MAX_BYTES
    );
    print!("{}", simulate::render(std::slice::from_ref(&c), false));

    println!("correctness:");
    let mut ok = true;
    for ((name, p), x) in named.iter().zip(&c.runs) {
        let run = &x.run;
        let (wrong, checked) = disagreements(p, &sc, run);
        let polled = poll(p, &sc);
        let same_count = polled.transitions.len() == run.transitions.len();
        let max_shift = polled
            .transitions
            .iter()
            .zip(&run.transitions)
            .map(
                |((t, s), r)| {
                    if *s == r.to && *t >= r.at { (*t - r.at).num_milliseconds() } else { i64::MAX }
                },
            )
            .max()
            .unwrap_or(0);
        let cold_same = polled.cold_starts == run.cold_starts.iter().map(|c| c.at).collect::<Vec<_>>();
        let hours_close = (polled.hours_awake - run.hours_awake).abs() <= run.transitions.len() as f64 / 60.0;
        let adds_up = (run.hours_awake + run.hours_asleep - (to - from).num_hours() as f64).abs() < 1e-6
            && run.pre_wakes.used + run.pre_wakes.unused == run.pre_wakes.count
            && run.first_of_day_cold_starts <= run.cold_starts.len()
            && run.cold_starts.len() <= run.uses;
        let good = wrong == 0 && same_count && max_shift <= 60_000 && cold_same && hours_close && adds_up;
        ok &= good;
        println!(
            "  {name:<36} decide agrees at {}/{checked} instants; polled every minute: {} vs {} transitions, \
             latest {:.1} s after, cold starts {}, awake {:.2} vs {:.2} h; hours add up: {}  {}",
            checked - wrong,
            polled.transitions.len(),
            run.transitions.len(),
            if max_shift == i64::MAX { f64::INFINITY } else { max_shift as f64 / 1e3 },
            if cold_same { "same" } else { "DIFFERENT" },
            polled.hours_awake,
            run.hours_awake,
            if adds_up { "yes" } else { "NO" },
            if good { "ok" } else { "WRONG" }
        );
    }

    let base = &c.runs[0].run;
    let hm = |t: DateTime<Utc>| t.with_timezone(&TZ).format("%H:%M").to_string();
    for pred in c.runs.iter().map(|x| &x.run).filter(|r| r.policy.contains("predictive")) {
        let avoided = base.first_of_day_cold_starts.saturating_sub(pred.first_of_day_cold_starts);
        let share = avoided as f64 / base.first_of_day_cold_starts.max(1) as f64;
        let extra = pred.hours_awake - base.hours_awake;
        let extra_share = extra / base.hours_awake;
        println!("\n{} against {}:", pred.policy, base.policy);
        println!(
            "  first-of-day cold starts: {} → {} ({avoided} avoided, {:.1} %); all cold starts {} → {}",
            base.first_of_day_cold_starts,
            pred.first_of_day_cold_starts,
            share * 100.0,
            base.cold_starts.len(),
            pred.cold_starts.len()
        );
        println!(
            "  awake: {:.1} h → {:.1} h ({:+.1} h, {:+.2} %); pre-wakes {} ({} used, {} unused), costing {:.1} h",
            base.hours_awake,
            pred.hours_awake,
            extra,
            extra_share * 100.0,
            pred.pre_wakes.count,
            pred.pre_wakes.used,
            pred.pre_wakes.unused,
            pred.pre_wakes.hours
        );
        println!("  first-of-day cold starts left:");
        for c in pred.cold_starts.iter().filter(|c| c.first_of_day) {
            let day = c.at.with_timezone(&TZ).date_naive();
            let why = match pred
                .predicted
                .iter()
                .find(|w| w.predicted_use.with_timezone(&TZ).date_naive() == day)
            {
                Some(w) if c.at < w.at => format!("came before the pre-wake at {}", hm(w.at)),
                Some(w) => {
                    format!(
                        "came after the pre-wake at {} had slept again (waited until {})",
                        hm(w.at),
                        hm(w.until)
                    )
                }
                None => "no confident prediction for the day".to_string(),
            };
            println!("    {}: {why}", c.at.with_timezone(&TZ).format("%a %Y-%m-%d %H:%M"));
        }
        let met = share >= 0.8 && extra_share <= 0.05;
        println!(
            "  goal (≥ 80 % of first-of-day cold starts avoided for ≤ 5 % more awake time): {}",
            if met { "met" } else { "NOT met" }
        );
    }
    if ok {
        println!("\ncorrectness: ok");
        ExitCode::SUCCESS
    } else {
        println!("\ncorrectness: WRONG (see above)");
        ExitCode::FAILURE
    }
}
