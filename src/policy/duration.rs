//! Durations as users write them in policies and annotations: `30s`, `15m`,
//! `2h`, `1d`, combinations such as `1h30m`, and `0`/`never` where a duration
//! may be switched off.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A duration could not be read; the message says what is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid duration {value:?}: {reason} (expected a whole number with a unit s, m, h or d, such as 30s, 15m, 2h, 1d or 1h30m)"
)]
pub struct ParseDurationError {
    pub value: String,
    pub reason: &'static str,
}

/// Durations longer than this are refused (they overflow nothing useful and
/// are more likely typos).
const MAX_SECONDS: u64 = 10 * 365 * 86_400;

/// Parses `30s`, `15m`, `2h`, `1d`, `1h30m`. Zero is allowed (`0`, `0s`).
pub fn parse(text: &str) -> Result<Duration, ParseDurationError> {
    let err = |reason| ParseDurationError { value: text.to_string(), reason };
    let s = text.trim();
    if s.is_empty() {
        return Err(err("it is empty"));
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.starts_with('-') {
        return Err(err("it is negative"));
    }
    let mut total: u64 = 0;
    let mut digits = String::new();
    let mut last_unit = u64::MAX;
    for c in s.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3_600,
            'd' => 86_400,
            _ => return Err(err("it has an unknown unit or character")),
        };
        if digits.is_empty() {
            return Err(err("a unit has no number before it"));
        }
        if unit >= last_unit {
            return Err(err("its units must go from larger to smaller, each once"));
        }
        last_unit = unit;
        let n: u64 = digits.parse().map_err(|_| err("a number is too large"))?;
        digits.clear();
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .filter(|v| *v <= MAX_SECONDS)
            .ok_or_else(|| err("it is longer than ten years"))?;
    }
    if !digits.is_empty() {
        return Err(err("a number has no unit"));
    }
    Ok(Duration::from_secs(total))
}

/// Formats a duration the way [`parse`] reads it (`1h30m`, `45s`, `0s`).
pub fn format(d: Duration) -> String {
    let mut secs = d.as_secs();
    if secs == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, name) in [(86_400, 'd'), (3_600, 'h'), (60, 'm'), (1, 's')] {
        if secs >= unit {
            out.push_str(&(secs / unit).to_string());
            out.push(name);
            secs %= unit;
        }
    }
    out
}

/// The idle time before a target sleeps, or never.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SleepAfter {
    Never,
    After(Duration),
}

impl FromStr for SleepAfter {
    type Err = ParseDurationError;
    /// `never` and `0` switch idle sleep off.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "never" => Ok(SleepAfter::Never),
            _ => match parse(s)? {
                d if d.is_zero() => Ok(SleepAfter::Never),
                d => Ok(SleepAfter::After(d)),
            },
        }
    }
}

impl fmt::Display for SleepAfter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SleepAfter::Never => f.write_str("never"),
            SleepAfter::After(d) => f.write_str(&format(*d)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_unit_and_combinations() {
        for (text, secs) in [
            ("30s", 30),
            ("15m", 900),
            ("2h", 7_200),
            ("1d", 86_400),
            ("1h30m", 5_400),
            ("1d2h3m4s", 93_784),
            (" 10m ", 600),
            ("0", 0),
            ("0s", 0),
        ] {
            assert_eq!(parse(text), Ok(Duration::from_secs(secs)), "{text}");
        }
    }

    #[test]
    fn refuses_garbled_negative_and_unitless_durations() {
        for text in
            ["", "-5m", "5", "m", "5x", "1.5h", "30m1h", "1h1h", "5 m", "99999999999999999999s", "4000d"]
        {
            let e = parse(text).unwrap_err();
            assert_eq!(e.value, text);
            assert!(e.to_string().contains("expected a whole number with a unit"), "{e}");
        }
    }

    #[test]
    fn sleep_after_never_and_zero_switch_idle_sleep_off() {
        assert_eq!("never".parse(), Ok(SleepAfter::Never));
        assert_eq!("0".parse(), Ok(SleepAfter::Never));
        assert_eq!("30m".parse(), Ok(SleepAfter::After(Duration::from_secs(1800))));
        assert!("nevermore".parse::<SleepAfter>().is_err());
    }

    #[test]
    fn format_reads_back() {
        for secs in [0, 1, 59, 60, 61, 3_599, 3_600, 5_400, 86_400, 93_784] {
            let d = Duration::from_secs(secs);
            assert_eq!(parse(&format(d)), Ok(d));
        }
    }
}
