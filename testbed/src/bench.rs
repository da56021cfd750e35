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

/// The path of `bin` in the system's folders; panics naming `script`, the
/// benchmark's script that installs it.
pub fn which(bin: &str, script: &str) -> String {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/bin", "/sbin"] {
        let p = format!("{dir}/{bin}");
        if std::path::Path::new(&p).exists() {
            return p;
        }
    }
    panic!("{bin} is not installed; run {script}, which installs it")
}

/// One load run through one path: requests per second and latency.
pub struct Throughput {
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// A duration as wrk and h2load print it (`812.00us`, `1.20ms`, `2.01s`), in ms.
pub fn parse_ms(v: &str) -> f64 {
    let v = v.trim();
    if let Some(x) = v.strip_suffix("us") {
        x.parse::<f64>().unwrap_or(f64::NAN) / 1000.0
    } else if let Some(x) = v.strip_suffix("ms") {
        x.parse().unwrap_or(f64::NAN)
    } else if let Some(x) = v.strip_suffix('s') {
        x.parse::<f64>().unwrap_or(f64::NAN) * 1000.0
    } else {
        f64::NAN
    }
}

/// wrk (two threads, 32 keep-alive connections) against `url` for
/// `seconds`. `program` is the command that runs it: wrk's path, or a
/// wrapper such as `nsenter --net=… wrk`. Panics, with one answer fetched
/// by curl through the same wrapper, when any answer was not 2xx.
pub fn wrk(program: &[String], url: &str, headers: &[&str], seconds: u32) -> Throughput {
    let (bin, wrapper_args) = program.split_first().expect("a program to run wrk with");
    let mut cmd = std::process::Command::new(bin);
    cmd.args(wrapper_args);
    cmd.args(["-t2", "-c32", &format!("-d{seconds}s"), "--latency"]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd.arg(url).output().expect("wrk runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let find = |prefix: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(prefix))
            .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_string())
            .unwrap_or_default()
    };
    let rps = text
        .lines()
        .find(|l| l.starts_with("Requests/sec:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    let non2xx = text.lines().any(|l| l.contains("Non-2xx"));
    if non2xx || !rps.is_finite() {
        // One request by hand, to show what the failing answer was.
        let wrapper = &program[..program.len() - 1];
        let mut curl = match wrapper.split_first() {
            Some((w, rest)) => {
                let mut c = std::process::Command::new(w);
                c.args(rest).arg("curl");
                c
            }
            None => std::process::Command::new("curl"),
        };
        curl.args(["-sSk", "-i", "--max-time", "10"]);
        for h in headers {
            curl.args(["-H", h]);
        }
        let one = curl.arg(url).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
        panic!(
            "wrk against {url} failed:\n{text}{}\none request: {one:?}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Throughput { rps, p50_ms: parse_ms(&find("50%")), p99_ms: parse_ms(&find("99%")) }
}
