//! Cron schedules with time zones, read like Kubernetes CronJobs read them:
//! exactly five fields (minute hour day-of-month month day-of-week; seconds
//! and years are refused), day-of-week 0 and 7 both Sunday, and a day that
//! matches day-of-month OR day-of-week when both are restricted. Instants are
//! evaluated in the policy's IANA time zone; across daylight-saving changes a
//! wall-clock time that does not exist fires once right after the gap, and one
//! that exists twice fires once (croner's OCPS behaviour).

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};

/// A schedule could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error(
        "invalid schedule {value:?}: it has {fields} fields; exactly 5 are expected (minute hour day-of-month month day-of-week)"
    )]
    FieldCount { value: String, fields: usize },
    #[error("invalid schedule {value:?}: {reason}")]
    Cron { value: String, reason: String },
    #[error("invalid schedule {value:?}: it never fires")]
    Never { value: String },
    #[error("unknown time zone {value:?} (expected an IANA name such as Europe/Berlin or UTC)")]
    TimeZone { value: String },
}

/// A parsed 5-field cron expression.
#[derive(Clone)]
pub struct Schedule {
    text: String,
    cron: Cron,
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Schedule({:?})", self.text)
    }
}

impl PartialEq for Schedule {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for Schedule {
    type Err = ScheduleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim().to_string();
        let fields = text.split_whitespace().count();
        let alias = text.starts_with('@');
        if !alias && fields != 5 {
            return Err(ScheduleError::FieldCount { value: text, fields });
        }
        if alias && fields != 1 {
            return Err(ScheduleError::FieldCount { value: text, fields });
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Disallowed)
            .year(Year::Disallowed)
            .dom_and_dow(false)
            .build()
            // Kubernetes CronJobs also read `@midnight` (as `@daily`).
            .parse(if text == "@midnight" { "@daily" } else { &text })
            .map_err(|e| ScheduleError::Cron { value: text.clone(), reason: e.to_string() })?;
        // "0 0 30 2 *" parses but never fires; say so now rather than never
        // finding a deadline. Eight years cover every leap-day schedule.
        let probe = Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0).single();
        let fires = probe.and_then(|p| cron.find_next_occurrence(&p, true).ok()).is_some_and(|next| {
            Utc.with_ymd_and_hms(2032, 1, 1, 0, 0, 0).single().is_some_and(|limit| next < limit)
        });
        if !fires {
            return Err(ScheduleError::Never { value: text });
        }
        Ok(Schedule { text, cron })
    }
}

impl Schedule {
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The first instant strictly after `t` at which the schedule fires in `tz`.
    pub fn next_after(&self, t: DateTime<Utc>, tz: Tz) -> Option<DateTime<Utc>> {
        self.cron.find_next_occurrence(&t.with_timezone(&tz), false).ok().map(|d| d.with_timezone(&Utc))
    }

    /// The last instant at or before `t` at which the schedule fired in `tz`.
    pub fn last_at_or_before(&self, t: DateTime<Utc>, tz: Tz) -> Option<DateTime<Utc>> {
        self.cron.find_previous_occurrence(&t.with_timezone(&tz), true).ok().map(|d| d.with_timezone(&Utc))
    }
}

/// Parses an IANA time zone name.
pub fn parse_timezone(s: &str) -> Result<Tz, ScheduleError> {
    s.trim().parse::<Tz>().map_err(|_| ScheduleError::TimeZone { value: s.to_string() })
}

/// A sleep instant and/or a wake instant, as one entry of a policy's
/// `schedules` or the `sleep-schedule`/`wake-schedule` annotations.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulePair {
    pub sleep: Option<Schedule>,
    pub wake: Option<Schedule>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(tz: Tz, y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        tz.with_ymd_and_hms(y, mo, d, h, mi, 0).earliest().unwrap().with_timezone(&Utc)
    }

    #[test]
    fn reads_five_fields_and_aliases() {
        for ok in [
            "0 19 * * 1-5",
            "*/15 8-18 * * MON-FRI",
            "0 0 1 * *",
            "30 2 * * 0,7",
            "@yearly",
            "@annually",
            "@monthly",
            "@weekly",
            "@daily",
            "@midnight",
            "@hourly",
        ] {
            ok.parse::<Schedule>().unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn refuses_seconds_years_garbage_and_schedules_that_never_fire() {
        for (bad, needle) in [
            ("0 0 19 * * 1-5", "6 fields"),
            ("0 0 19 * * 1-5 2030", "7 fields"),
            ("0 19 * *", "4 fields"),
            ("", "0 fields"),
            ("61 * * * *", "invalid schedule"),
            ("0 25 * * *", "invalid schedule"),
            ("0 0 * * MONDAY", "invalid schedule"),
            ("0 0 30 2 *", "never fires"),
            ("@reboot", "invalid schedule"),
        ] {
            let e = bad.parse::<Schedule>().unwrap_err().to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn one_to_five_is_monday_to_friday_and_seven_is_sunday() {
        let utc = chrono_tz::UTC;
        let s: Schedule = "0 8 * * 1-5".parse().unwrap();
        // Friday 2026-11-27 09:00 → next is Monday 2026-11-30 08:00.
        assert_eq!(s.next_after(at(utc, 2026, 11, 27, 9, 0), utc), Some(at(utc, 2026, 11, 30, 8, 0)));
        let sun: Schedule = "0 8 * * 7".parse().unwrap();
        let zero: Schedule = "0 8 * * 0".parse().unwrap();
        let t = at(utc, 2026, 11, 26, 0, 0);
        assert_eq!(sun.next_after(t, utc), Some(at(utc, 2026, 11, 29, 8, 0)));
        assert_eq!(sun.next_after(t, utc), zero.next_after(t, utc));
    }

    #[test]
    fn day_of_month_or_day_of_week_as_in_cronjobs() {
        let utc = chrono_tz::UTC;
        // The 1st of the month OR any Monday.
        let s: Schedule = "0 0 1 * 1".parse().unwrap();
        // Thu 2026-11-26 → Mon 2026-11-30, then Tue 2026-12-01 (the 1st).
        let first = s.next_after(at(utc, 2026, 11, 26, 12, 0), utc).unwrap();
        assert_eq!(first, at(utc, 2026, 11, 30, 0, 0));
        assert_eq!(s.next_after(first, utc), Some(at(utc, 2026, 12, 1, 0, 0)));
    }

    #[test]
    fn evaluated_in_the_time_zone() {
        let berlin: Tz = parse_timezone("Europe/Berlin").unwrap();
        let s: Schedule = "0 8 * * *".parse().unwrap();
        // 08:00 in Berlin in winter is 07:00 UTC.
        let next = s.next_after(Utc.with_ymd_and_hms(2026, 11, 26, 0, 0, 0).unwrap(), berlin).unwrap();
        assert_eq!(next, Utc.with_ymd_and_hms(2026, 11, 26, 7, 0, 0).unwrap());
        assert_eq!(s.last_at_or_before(next, berlin), Some(next));
    }

    #[test]
    fn unknown_time_zones_are_named_in_the_error() {
        let e = parse_timezone("Europe/Atlantis").unwrap_err().to_string();
        assert!(e.contains("Europe/Atlantis") && e.contains("IANA"), "{e}");
        assert!(parse_timezone("UTC").is_ok());
    }

    #[test]
    fn a_time_skipped_by_daylight_saving_fires_once_right_after_the_gap() {
        let berlin: Tz = parse_timezone("Europe/Berlin").unwrap();
        // 2026-03-29: 02:00 → 03:00 in Berlin.
        let s: Schedule = "30 2 * * *".parse().unwrap();
        let before = at(berlin, 2026, 3, 29, 1, 0);
        let fired = s.next_after(before, berlin).unwrap();
        assert_eq!(fired, at(berlin, 2026, 3, 29, 3, 0));
        assert_eq!(s.next_after(fired, berlin), Some(at(berlin, 2026, 3, 30, 2, 30)));
    }

    #[test]
    fn a_time_repeated_by_daylight_saving_fires_once() {
        let berlin: Tz = parse_timezone("Europe/Berlin").unwrap();
        // 2026-10-25: 03:00 → 02:00 in Berlin; 02:30 happens twice.
        let s: Schedule = "30 2 * * *".parse().unwrap();
        let first = s.next_after(at(berlin, 2026, 10, 25, 1, 0), berlin).unwrap();
        assert_eq!(first, at(berlin, 2026, 10, 25, 2, 30));
        let second = s.next_after(first, berlin).unwrap();
        assert_eq!(second, at(berlin, 2026, 10, 26, 2, 30));
    }
}
