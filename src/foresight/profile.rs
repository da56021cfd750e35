//! A target's weekly rhythm, kept on the target in one annotation
//! ([`ANNOTATION`]): counted use per hour of the week in the target's time
//! zone, how often each hour of the week was in use at all, the first use of
//! each recent day, and the latest first uses after a sleep (cold starts).
//!
//! Old weeks fade: every value decays by [`DECAY_PER_WEEK`] per week of
//! age, measured from the instant of each use, so the profile is the same
//! however often it is flushed. Values are stored scaled to a fixed epoch
//! (a multiple of four weeks since 1970) instead of being decayed at every
//! write: decaying a stored number by a tiny factor at each of many
//! frequent flushes would round the decay away. The epoch moves forward
//! four weeks at a time, scaling every value down once.
//!
//! The value is written by read-modify-write from the current annotation
//! ([`record`]), which is also how two replicas' flushes merge: counts add,
//! an hour already marked in use is not marked twice, a day keeps its
//! earliest first use. A value that cannot be read (hand-edited, garbage,
//! another format) starts a fresh profile; nothing here panics. Whatever the
//! input, the value stays within [`MAX_BYTES`].

use std::fmt::Write as _;

use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Timelike, Utc};
use chrono_tz::Tz;

/// The annotation that holds the profile, on the target (the namespace, or
/// the vcluster's StatefulSet/Deployment), written by dormant.
pub const ANNOTATION: &str = crate::vocab::ACTIVITY_PROFILE;
/// The format written; another prefix reads as garbage (a fresh start).
pub const VERSION: &str = "v1";
/// Buckets: Monday 00:00–01:00 local time is 0, Sunday 23:00–24:00 is 167.
pub const HOURS: usize = 168;
/// Weight of a use one week old relative to one now (half-life ≈ 3.1 weeks).
pub const DECAY_PER_WEEK: f64 = 0.8;
/// A use after at least this long without any starts a session; the first
/// session start of a local day is that day's first use.
pub const QUIET_SECS: i64 = 4 * 3600;
/// First uses are kept for this many days before the latest (nine weeks:
/// eight weeks of history for a prediction made up to a week later).
pub const DAYS_KEPT: i64 = 63;
/// How many cold starts (first uses after a sleep) are kept, newest.
pub const COLD_STARTS_KEPT: usize = 16;
/// The longest value [`Profile::encode`] writes, whatever the input
/// (checked by a worst-case test and a property test).
pub const MAX_BYTES: usize = 3_200;

const WEEK: i64 = 7 * 86_400;
const EPOCH_SPAN: i64 = 4 * WEEK;
/// Stored values are hundredths.
const UNIT: f64 = 100.0;
/// Caps that bound the value's size: a million uses per hour of the week
/// (decayed and scaled) and far more in-use weeks than decay allows.
const MAX_USES: u64 = 99_999_999;
const MAX_ACTIVE: u64 = 9_999;
/// Instants outside 2000..2200 are clamped (ten decimal digits at most).
const MIN_T: i64 = 946_684_800;
const MAX_T: i64 = 7_258_118_400;
const MAX_DAY: i64 = MAX_T / 86_400;

/// The profile value could not be read; the caller starts a fresh one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    #[error("activity profile is not in format {VERSION}")]
    Version,
    #[error("activity profile field {field} is missing or malformed")]
    Field { field: &'static str },
}

impl ProfileError {
    /// Short, stable category (metric label).
    pub fn category(&self) -> &'static str {
        "profile-unreadable"
    }
}

/// One target's activity profile.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    tz: Tz,
    /// Unix seconds: when recording began.
    since: i64,
    /// Unix seconds, a multiple of four weeks: what the values are scaled to.
    epoch: i64,
    /// Unix seconds of the latest use recorded.
    last: Option<i64>,
    /// Bit `i`: the local hour `i` hours before the local hour of `last` was
    /// marked in use (so an hour is counted once, whoever flushes it).
    recent: u64,
    /// Hundredths of uses per hour of the week, scaled to `epoch`.
    uses: [u64; HOURS],
    /// Hundredths of weeks in which the hour was in use, scaled to `epoch`.
    active: [u64; HOURS],
    /// (local date as days since 1970-01-01, minute of the day) of each
    /// day's first use, ascending, within [`DAYS_KEPT`] days of the latest.
    days: Vec<(i64, u16)>,
    /// Unix minutes of the latest cold starts, ascending.
    cold: Vec<i64>,
}

/// Reads `current` (a fresh profile when absent, unreadable or kept in
/// another time zone), adds `uses` (instant, count) and `cold_starts` (first
/// uses that found the target asleep) as of `now`, and returns the new
/// annotation value. Order and batching of the uses do not matter, nor does
/// which replica flushes which of them.
pub fn record(
    current: Option<&str>,
    uses: &[(DateTime<Utc>, u64)],
    cold_starts: &[DateTime<Utc>],
    tz: Tz,
    now: DateTime<Utc>,
) -> String {
    let mut p = Profile::read_or_new(current, tz, now);
    p.record(uses, cold_starts, now);
    p.encode()
}

fn clamp(t: i64) -> i64 {
    t.clamp(MIN_T, MAX_T)
}

fn utc(t: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(clamp(t), 0).single().unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
}

fn day_number(d: NaiveDate) -> i64 {
    i64::from(d.num_days_from_ce()) - 719_163
}

fn date_of(n: i64) -> NaiveDate {
    i32::try_from(n + 719_163).ok().and_then(NaiveDate::from_num_days_from_ce_opt).unwrap_or_default()
}

/// Hours since 1970-01-01T00:00 of a local wall-clock time.
fn hour_index(t: NaiveDateTime) -> i64 {
    t.and_utc().timestamp().div_euclid(3600)
}

/// The bucket of a local wall-clock time.
pub fn hour_of_week(t: NaiveDateTime) -> usize {
    t.weekday().num_days_from_monday() as usize * 24 + t.hour() as usize
}

/// The instant of a local wall-clock time: the earlier one when it happens
/// twice, the first instant after the gap when it does not happen.
pub fn local_instant(tz: Tz, t: NaiveDateTime) -> DateTime<Utc> {
    let mut probe = t;
    // Gaps are at most a few hours: step a minute at a time past one.
    for _ in 0..(26 * 60) {
        if let Some(at) = tz.from_local_datetime(&probe).earliest() {
            return at.with_timezone(&Utc);
        }
        probe += chrono::Duration::minutes(1);
        probe = probe.with_second(0).unwrap_or(probe);
    }
    t.and_utc()
}

/// The decay factor over `secs` seconds.
fn decay(secs: i64) -> f64 {
    DECAY_PER_WEEK.powf(secs as f64 / WEEK as f64)
}

fn add_capped(v: u64, x: f64, cap: u64) -> u64 {
    let x = if x.is_finite() && x > 0.0 { x.round().min(cap as f64) as u64 } else { 0 };
    v.saturating_add(x).min(cap)
}

impl Profile {
    /// An empty profile recording from `since`.
    pub fn new(tz: Tz, since: DateTime<Utc>) -> Profile {
        let since = clamp(since.timestamp());
        Profile {
            tz,
            since,
            epoch: since.div_euclid(EPOCH_SPAN) * EPOCH_SPAN,
            last: None,
            recent: 0,
            uses: [0; HOURS],
            active: [0; HOURS],
            days: Vec::new(),
            cold: Vec::new(),
        }
    }

    /// The current value when readable and kept in `tz`; else a new
    /// profile recording from `now`.
    pub fn read_or_new(current: Option<&str>, tz: Tz, now: DateTime<Utc>) -> Profile {
        current
            .and_then(|v| Profile::parse(v).ok())
            .filter(|p| p.tz == tz)
            .unwrap_or_else(|| Profile::new(tz, now))
    }

    pub fn tz(&self) -> Tz {
        self.tz
    }

    /// When recording began.
    pub fn since(&self) -> DateTime<Utc> {
        utc(self.since)
    }

    /// The latest use recorded.
    pub fn last_use(&self) -> Option<DateTime<Utc>> {
        self.last.map(utc)
    }

    fn local(&self, t: i64) -> NaiveDateTime {
        utc(t).with_timezone(&self.tz).naive_local()
    }

    /// The local date recording began.
    pub fn since_date(&self) -> NaiveDate {
        self.local(self.since).date()
    }

    /// The local date of an instant, in the profile's time zone.
    pub fn date_of(&self, t: DateTime<Utc>) -> NaiveDate {
        self.local(t.timestamp()).date()
    }

    /// The first use of a local day, if one was recorded (and is still kept).
    pub fn first_use_on(&self, date: NaiveDate) -> Option<NaiveTime> {
        let n = day_number(date);
        let i = self.days.binary_search_by_key(&n, |(d, _)| *d).ok()?;
        self.days.get(i).and_then(|(_, m)| NaiveTime::from_hms_opt(u32::from(*m) / 60, u32::from(*m) % 60, 0))
    }

    /// Every kept day's first use, oldest first.
    pub fn first_uses(&self) -> Vec<(NaiveDate, NaiveTime)> {
        self.days
            .iter()
            .filter_map(|(d, m)| {
                NaiveTime::from_hms_opt(u32::from(*m) / 60, u32::from(*m) % 60, 0).map(|t| (date_of(*d), t))
            })
            .collect()
    }

    /// The latest cold starts (to the minute), oldest first.
    pub fn cold_starts(&self) -> Vec<DateTime<Utc>> {
        self.cold.iter().map(|m| utc(m.saturating_mul(60))).collect()
    }

    /// Counted uses per hour of the week, decayed to `at`.
    pub fn uses(&self, at: DateTime<Utc>) -> [f64; HOURS] {
        self.decayed(&self.uses, at)
    }

    /// Weeks in which each hour of the week was in use, decayed to `at`.
    pub fn active(&self, at: DateTime<Utc>) -> [f64; HOURS] {
        self.decayed(&self.active, at)
    }

    fn decayed(&self, v: &[u64; HOURS], at: DateTime<Utc>) -> [f64; HOURS] {
        let f = decay(clamp(at.timestamp()) - self.epoch) / UNIT;
        v.map(|x| x as f64 * f)
    }

    /// How often each hour of the week has occurred since recording began
    /// (up to `at`), each occurrence weighted by its decay: the denominator
    /// of [`Profile::activity`].
    pub fn occurrences(&self, at: DateTime<Utc>) -> [f64; HOURS] {
        let at = clamp(at.timestamp());
        let now = self.local(at);
        let monday = now.date() - chrono::Duration::days(i64::from(now.weekday().num_days_from_monday()));
        let mut out = [0.0; HOURS];
        for (h, slot) in out.iter_mut().enumerate() {
            let mut start = monday.and_time(NaiveTime::MIN) + chrono::Duration::hours(h as i64);
            if start > now {
                start -= chrono::Duration::days(7);
            }
            for _ in 0..60 {
                // An hour skipped by daylight saving did not occur that week.
                if let Some(o) = self.tz.from_local_datetime(&start).earliest() {
                    let o = o.timestamp();
                    if o + 3600 <= self.since {
                        break;
                    }
                    *slot += decay(at - o);
                }
                start -= chrono::Duration::days(7);
            }
        }
        out
    }

    /// The decayed fraction of weeks each hour of the week was in use (0
    /// for an hour that has not occurred yet).
    pub fn activity(&self, at: DateTime<Utc>) -> [f64; HOURS] {
        let active = self.active(at);
        let seen = self.occurrences(at);
        let mut out = [0.0; HOURS];
        for h in 0..HOURS {
            if seen[h] > 0.0 {
                out[h] = (active[h] / seen[h]).clamp(0.0, 1.0);
            }
        }
        out
    }

    /// Moves the epoch forward to the four-week boundary at or before
    /// `now`, scaling every value down once.
    fn rebase(&mut self, now: i64) {
        let target = now.div_euclid(EPOCH_SPAN) * EPOCH_SPAN;
        if target <= self.epoch {
            return;
        }
        let f = decay(target - self.epoch);
        for v in self.uses.iter_mut().chain(self.active.iter_mut()) {
            *v = (*v as f64 * f).round() as u64;
        }
        self.epoch = target;
    }

    /// Marks the local hour `hi` in use; true when it was not yet.
    fn mark(&mut self, hi: i64) -> bool {
        let Some(anchor) = self.last.map(|l| hour_index(self.local(l))) else {
            self.recent = 1;
            return true;
        };
        if hi > anchor {
            let shift = hi - anchor;
            self.recent = if shift >= 64 { 1 } else { (self.recent << shift) | 1 };
            return true;
        }
        let back = anchor - hi;
        if back >= 64 {
            // Too old to tell: never counted twice.
            return false;
        }
        let bit = 1u64 << back;
        let new = self.recent & bit == 0;
        self.recent |= bit;
        new
    }

    /// Adds uses (instant, count) and cold starts as of `now`. Instants after
    /// `now` count as `now`; counts of 0 are nothing.
    pub fn record(
        &mut self,
        uses: &[(DateTime<Utc>, u64)],
        cold_starts: &[DateTime<Utc>],
        now: DateTime<Utc>,
    ) {
        let now = clamp(now.timestamp());
        self.rebase(now);
        let mut batch: Vec<(i64, u64)> =
            uses.iter().filter(|(_, n)| *n > 0).map(|(t, n)| (clamp(t.timestamp()).min(now), *n)).collect();
        batch.sort_unstable();
        for (t, n) in batch {
            self.since = self.since.min(t);
            let local = self.local(t);
            let h = hour_of_week(local);
            let w = decay(self.epoch - t) * UNIT;
            self.uses[h] = add_capped(self.uses[h], n as f64 * w, MAX_USES);
            let start = match self.last {
                None => true,
                Some(l) if t >= l => t - l >= QUIET_SECS,
                // Flushed late (another replica): it starts the day's session
                // only in place of a later first use of the same day.
                Some(_) => false,
            };
            let day = day_number(local.date());
            let minute = (local.hour() * 60 + local.minute()) as u16;
            match self.days.binary_search_by_key(&day, |(d, _)| *d) {
                Ok(i) => {
                    if let Some(e) = self.days.get_mut(i)
                        && minute < e.1
                        && (start || self.last.is_some_and(|l| t < l))
                    {
                        e.1 = minute;
                    }
                }
                Err(i) if start => self.days.insert(i, (day, minute)),
                Err(_) => {}
            }
            if self.mark(hour_index(local)) {
                self.active[h] = add_capped(self.active[h], w, MAX_ACTIVE);
            }
            self.last = Some(self.last.map_or(t, |l| l.max(t)));
        }
        let today = day_number(self.local(now).date());
        // Days after today come from a replica whose clock is ahead: kept.
        self.days.retain(|(d, _)| *d >= today - DAYS_KEPT);
        let extra = self.days.len().saturating_sub(DAYS_KEPT as usize + 1);
        self.days.drain(..extra);
        for c in cold_starts {
            self.cold.push(clamp(c.timestamp()).min(now).div_euclid(60));
        }
        self.cold.sort_unstable();
        self.cold.dedup();
        let extra = self.cold.len().saturating_sub(COLD_STARTS_KEPT);
        self.cold.drain(..extra);
    }

    /// The annotation value (at most [`MAX_BYTES`]).
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(1024);
        let _ = write!(out, "{VERSION};z={};s={};e={};l=", self.tz.name(), self.since, self.epoch);
        if let Some(l) = self.last {
            let _ = write!(out, "{l}");
        }
        let _ = write!(out, ";r={:x};u=", self.recent);
        rle(&mut out, &self.uses);
        out.push_str(";a=");
        rle(&mut out, &self.active);
        out.push_str(";d=");
        let mut prev: Option<i64> = None;
        for (d, m) in &self.days {
            if prev.is_some() {
                out.push(',');
            }
            let _ = write!(out, "{}:{m}", prev.map_or(*d, |p| d - p));
            prev = Some(*d);
        }
        out.push_str(";c=");
        let mut prev: Option<i64> = None;
        for c in &self.cold {
            if prev.is_some() {
                out.push(',');
            }
            let _ = write!(out, "{}", prev.map_or(*c, |p| c - p));
            prev = Some(*c);
        }
        out
    }

    /// Reads an annotation value written by [`Profile::encode`].
    pub fn parse(v: &str) -> Result<Profile, ProfileError> {
        let mut parts = v.trim().split(';');
        if parts.next() != Some(VERSION) {
            return Err(ProfileError::Version);
        }
        let mut field = |key: &'static str| -> Result<&str, ProfileError> {
            parts
                .next()
                .and_then(|p| p.strip_prefix(key))
                .and_then(|p| p.strip_prefix('='))
                .ok_or(ProfileError::Field { field: key })
        };
        let bad = |field| ProfileError::Field { field };
        let time =
            |s: &str, key| s.parse::<i64>().ok().filter(|t| (MIN_T..=MAX_T).contains(t)).ok_or(bad(key));
        let tz: Tz = field("z")?.parse().map_err(|_| bad("z"))?;
        let since = time(field("s")?, "s")?;
        let epoch = field("e")?
            .parse::<i64>()
            .ok()
            .filter(|e| e % EPOCH_SPAN == 0 && (MIN_T - EPOCH_SPAN..=MAX_T).contains(e))
            .ok_or(bad("e"))?;
        let last = match field("l")? {
            "" => None,
            s => Some(time(s, "l")?),
        };
        let recent = u64::from_str_radix(field("r")?, 16).map_err(|_| bad("r"))?;
        let uses = unrle(field("u")?, MAX_USES).ok_or(bad("u"))?;
        let active = unrle(field("a")?, MAX_ACTIVE).ok_or(bad("a"))?;
        let mut days: Vec<(i64, u16)> = Vec::new();
        let d = field("d")?;
        if !d.is_empty() {
            for item in d.split(',') {
                let (n, m) = item.split_once(':').ok_or(bad("d"))?;
                let n: i64 = n.parse().map_err(|_| bad("d"))?;
                let m: u16 = m.parse().ok().filter(|m| *m < 1440).ok_or(bad("d"))?;
                let day = match days.last() {
                    None if (0..=MAX_DAY).contains(&n) => n,
                    Some((p, _)) if (1..=DAYS_KEPT).contains(&n) => p + n,
                    _ => return Err(bad("d")),
                };
                if days.len() > DAYS_KEPT as usize {
                    return Err(bad("d"));
                }
                days.push((day, m));
            }
        }
        let mut cold: Vec<i64> = Vec::new();
        let c = field("c")?;
        if !c.is_empty() {
            for item in c.split(',') {
                let n: i64 = item.parse().map_err(|_| bad("c"))?;
                let m = match cold.last() {
                    None if (MIN_T / 60..=MAX_T / 60).contains(&n) => n,
                    Some(p) if n > 0 && p + n <= MAX_T / 60 => p + n,
                    _ => return Err(bad("c")),
                };
                if cold.len() >= COLD_STARTS_KEPT {
                    return Err(bad("c"));
                }
                cold.push(m);
            }
        }
        if parts.next().is_some() {
            return Err(bad("c"));
        }
        Ok(Profile { tz, since, epoch, last, recent, uses, active, days, cold })
    }
}

/// `3,0*5,7`: values separated by commas, a run of one value as `value*count`.
fn rle(out: &mut String, values: &[u64]) {
    let mut i = 0;
    let mut first = true;
    while i < values.len() {
        let v = values[i];
        let mut run = 1;
        while i + run < values.len() && values[i + run] == v {
            run += 1;
        }
        if !first {
            out.push(',');
        }
        first = false;
        if run > 1 {
            let _ = write!(out, "{v}*{run}");
        } else {
            let _ = write!(out, "{v}");
        }
        i += run;
    }
}

fn unrle(s: &str, cap: u64) -> Option<[u64; HOURS]> {
    let mut out = [0u64; HOURS];
    let mut i = 0;
    for item in s.split(',') {
        let (v, run) = match item.split_once('*') {
            Some((v, run)) => (v, run.parse::<usize>().ok()?),
            None => (item, 1),
        };
        let v: u64 = v.parse().ok().filter(|v| *v <= cap)?;
        if run == 0 || i + run > HOURS {
            return None;
        }
        out[i..i + run].fill(v);
        i += run;
    }
    (i == HOURS).then_some(out)
}

#[cfg(test)]
mod tests;
