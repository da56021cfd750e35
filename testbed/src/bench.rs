//! Small helpers the benchmarks share.

use std::time::{Instant, SystemTime};

/// A count from the environment, or `default`.
pub fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The `p` quantile (0–1, nearest rank) of `sorted`; NaN when it is empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// The monotonic instant of a wall-clock time (past or future).
pub fn instant_at(t: SystemTime) -> Instant {
    let (now_i, now_s) = (Instant::now(), SystemTime::now());
    match t.duration_since(now_s) {
        Ok(ahead) => now_i + ahead,
        Err(e) => now_i.checked_sub(e.duration()).unwrap_or(now_i),
    }
}
