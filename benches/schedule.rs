//! Benchmark: namespaces put to sleep and woken on a schedule, side by side
//! with kube-green (the open-source tool a user would pick for this job)
//! on one testbed, one after the other.
//!
//! `hack/bench-schedule.sh` (builds kube-green, pinned in
//! `hack/versions.env`, then runs `cargo bench --bench schedule`). Env
//! `DORMANT_BENCH_NAMESPACES` (default 100).
//!
//! kube-green runs as it ships: controller-runtime turns client-side rate
//! limiting off and leaves it to the API server's priority and fairness.
//! Dormant runs twice: with its defaults (client QPS 50, burst 100), and
//! with QPS 1000 (burst 2000), which takes its client's limit out of the
//! way as kube-green's is.
//!
//! Each tool gets its own namespaces, each with two Deployments (3 and 2
//! replicas, kwok pods), and one schedule for all of them: sleep at a
//! minute boundary, wake two minutes later. Prints, per tool: the time from
//! the scheduled minute to each Deployment seen at 0 (p50 / p99 / max, and
//! the earliest, negative if before the minute); the same for waking, back
//! at its replicas; how many came back at exactly their replicas; resident
//! memory idle and at peak.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, DurationRound, Timelike, Utc};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use testbed::bench::{env_or, instant_at, percentile};
use testbed::process::{free_port, http_ok, rss_kib};
use testbed::{Cluster, ClusterOptions};

/// (namespace, name) → every (replicas, when first seen) of a Deployment.
type Seen = Arc<Mutex<HashMap<(String, String), Vec<(i32, Instant)>>>>;

/// A tool's client QPS and burst (dormant's flags; none for kube-green).
type Qps = Option<(usize, usize)>;

/// What one tool did.
struct Outcome {
    sleep: Vec<f64>,
    sleep_all: f64,
    wake: Vec<f64>,
    wake_all: f64,
    exact: usize,
    workloads: usize,
    rss_idle: u64,
    rss_peak: u64,
}

impl Outcome {
    /// What the tool got wrong, whatever its speed: a Deployment not asleep
    /// or not back within the measure's 110 s, one back at other replicas
    /// than it had, or a change before its scheduled minute.
    fn wrong(&self) -> Vec<String> {
        let mut wrong = Vec::new();
        let n = self.workloads;
        if n == 0 {
            wrong.push("no Deployments measured".to_string());
        }
        if self.sleep.len() != n {
            wrong.push(format!("{} of {n} Deployments asleep within 110 s", self.sleep.len()));
        }
        if self.wake.len() != n {
            wrong.push(format!("{} of {n} Deployments back within 110 s", self.wake.len()));
        }
        if self.exact != n {
            wrong.push(format!("{} of {n} Deployments back at exactly their replicas", self.exact));
        }
        for (what, times) in [("slept", &self.sleep), ("woke", &self.wake)] {
            if let Some(early) = times.first().filter(|t| **t < 0.0) {
                wrong.push(format!(
                    "{what} a Deployment {:.0} ms before the scheduled minute",
                    -early * 1000.0
                ));
            }
        }
        wrong
    }
}

/// Seconds from `from` to the Deployment's change to `want` (negative when
/// it came early): the first such change no more than a minute before.
fn reached(history: &[(i32, Instant)], want: i32, from: Instant) -> Option<f64> {
    let window = from.checked_sub(Duration::from_secs(60)).unwrap_or(from);
    let (_, at) = history.iter().find(|(r, at)| *at >= window && *r == want)?;
    Some(at.saturating_duration_since(from).as_secs_f64() - from.saturating_duration_since(*at).as_secs_f64())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n = env_or("DORMANT_BENCH_NAMESPACES", 100);
    let kube_green = PathBuf::from(std::env::var("KUBE_GREEN_DIR").map_err(|_| {
        anyhow::anyhow!("KUBE_GREEN_DIR is not set: run hack/bench-schedule.sh (it builds kube-green)")
    })?);
    eprintln!("starting the testbed (fast controllers)…");
    let c = tokio::task::spawn_blocking(|| {
        Cluster::start(ClusterOptions { fast_controllers: true, ..Default::default() })
    })
    .await??;
    c.kubectl_apply(&c.admin, &dormant::cli::crd_yaml()?)?;
    c.wait_established("sleeppolicies.dormant.dev")?;
    c.kubectl_apply(&c.admin, &std::fs::read_to_string(kube_green.join("sleepinfos.yaml"))?)?;
    c.wait_established("sleepinfos.kube-green.com")?;
    c.kubectl_out(&c.admin, &["create", "namespace", "dormant"]).ok();
    let client = c.client().await?;

    let seen: Seen = Arc::default();
    {
        let seen = seen.clone();
        let api: Api<Deployment> = Api::all(client.clone());
        tokio::spawn(async move {
            let config = watcher::Config::default().labels("bench-tool");
            let mut s = watcher(api, config).default_backoff().boxed();
            while let Some(ev) = s.next().await {
                let Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) = ev else { continue };
                let key = (
                    o.metadata.namespace.clone().unwrap_or_default(),
                    o.metadata.name.clone().unwrap_or_default(),
                );
                let r = o.spec.replicas.unwrap_or(1);
                let mut seen = seen.lock().unwrap();
                let history = seen.entry(key).or_default();
                if history.last().is_none_or(|(old, _)| *old != r) {
                    history.push((r, Instant::now()));
                }
            }
        });
    }

    let mut outcomes = Vec::new();
    // (label, namespace prefix, dormant's client QPS and burst; None: kube-green)
    let phases = [
        ("kube-green", "kg", None as Qps),
        ("dormant", "dm", Some((50, 100))),
        ("dormant-qps-1000", "dq", Some((1000, 2000))),
    ];
    for (tool, prefix, dormant_qps) in phases {
        // The workloads: two Deployments per namespace.
        let mut workloads = Vec::new();
        for batch in (0..n).collect::<Vec<_>>().chunks(10) {
            let mut yaml = String::new();
            for i in batch {
                let ns = format!("{prefix}-{i}");
                yaml.push_str(&format!(
                    "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{bench-tool: {tool}}}}}\n"
                ));
                for (name, replicas) in [("web", 3), ("api", 2)] {
                    yaml.push_str(&format!(
                        "---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}, namespace: {ns}, labels: {{bench-tool: {tool}}}}}\nspec:\n  replicas: {replicas}\n  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    spec: {{containers: [{{name: {name}, image: nginx:1.27, resources: {{requests: {{cpu: 100m, memory: 128Mi}}}}}}]}}\n"
                    ));
                    workloads.push(((ns.clone(), name.to_string()), replicas));
                }
            }
            c.kubectl_apply(&c.admin, &yaml)?;
        }

        // The tool, started before it is told the schedule.
        let user = c.user(&format!("{tool}-bench"), &["system:masters"])?;
        let env = vec![
            ("KUBECONFIG".to_string(), user.kubeconfig.display().to_string()),
            ("RUST_LOG".to_string(), "warn".to_string()),
        ];
        let probe = free_port()?;
        let mut proc = if let Some((qps, burst)) = dormant_qps {
            let bin = PathBuf::from(env!("CARGO_BIN_EXE_dormant"));
            let args: Vec<String> = vec![
                "agent".into(),
                "--namespace=dormant".into(),
                "--identity=bench".into(),
                format!("--admin-addr=127.0.0.1:{probe}"),
                format!("--qps={qps}"),
                format!("--burst={burst}"),
            ];
            testbed::spawner::spawn_with_env("dormant-schedule-bench", &bin, &args, &env, &c.dir)?
        } else {
            // Its admission webhook is not registered here; its server
            // still needs a certificate to start.
            let certs = c.dir.join("kube-green-certs");
            std::fs::create_dir_all(&certs)?;
            std::fs::copy(c.dir.join("apiserver.crt"), certs.join("tls.crt"))?;
            std::fs::copy(c.dir.join("apiserver.key"), certs.join("tls.key"))?;
            let args: Vec<String> = vec![
                format!("--health-probe-bind-address=127.0.0.1:{probe}"),
                "--metrics-bind-address=0".into(),
                "--webhook-host=127.0.0.1".into(),
                format!("--webhook-server-port={}", free_port()?),
                format!("--webhook-cert-path={}", certs.display()),
            ];
            testbed::spawner::spawn_with_env(
                "kube-green-bench",
                &kube_green.join("kube-green"),
                &args,
                &env,
                &c.dir,
            )?
        };
        proc.wait_ready(Duration::from_secs(120), || http_ok(probe, "/readyz"))?;
        let pid = proc.pid();
        let peak = testbed::process::PeakRss::start(pid);

        // The schedule: sleep at the first minute boundary at least 75 s
        // away, wake two minutes later. (kube-green runs a schedule at once
        // when it reconciles within `--sleep-delta`, 60 s, before it.)
        let sleep_at = (Utc::now() + chrono::Duration::seconds(75))
            .duration_trunc(chrono::Duration::minutes(1))?
            + chrono::Duration::minutes(1);
        let wake_at = sleep_at + chrono::Duration::minutes(2);
        if dormant_qps.is_some() {
            c.kubectl_apply(
                &c.admin,
                &format!(
                    "apiVersion: dormant.dev/v1alpha1\nkind: SleepPolicy\nmetadata: {{name: {tool}}}\nspec:\n  selector: {{namespaceSelector: {{matchLabels: {{bench-tool: {tool}}}}}}}\n  timezone: UTC\n  schedules:\n  - sleep: \"{} {} * * *\"\n    wake: \"{} {} * * *\"\n  sleepAfter: 24h\n",
                    sleep_at.minute(),
                    sleep_at.hour(),
                    wake_at.minute(),
                    wake_at.hour()
                ),
            )?;
        } else {
            let mut yaml = String::new();
            for i in 0..n {
                yaml.push_str(&format!(
                    "---\napiVersion: kube-green.com/v1alpha1\nkind: SleepInfo\nmetadata: {{name: bench, namespace: {prefix}-{i}}}\nspec:\n  weekdays: \"*\"\n  sleepAt: \"{}\"\n  wakeUpAt: \"{}\"\n  timeZone: UTC\n",
                    sleep_at.format("%H:%M"),
                    wake_at.format("%H:%M")
                ));
            }
            c.kubectl_apply(&c.admin, &yaml)?;
        }
        eprintln!("{tool}: sleeping {n} namespaces at {sleep_at}, waking them at {wake_at}");
        tokio::time::sleep((sleep_at - Utc::now()).to_std().unwrap_or_default()).await;
        let rss_idle = rss_kib(pid);

        // Measures the time from `at` until every workload is seen at
        // `want(replicas)`, each and all.
        let measure = |at: DateTime<Utc>, want: fn(i32) -> i32| {
            let (seen, workloads) = (seen.clone(), workloads.clone());
            async move {
                let from = instant_at(at.into());
                let deadline = from + Duration::from_secs(110);
                loop {
                    let times: Vec<Option<f64>> = {
                        let s = seen.lock().unwrap();
                        workloads
                            .iter()
                            .map(|(k, r)| s.get(k).and_then(|h| reached(h, want(*r), from)))
                            .collect()
                    };
                    if times.iter().all(Option::is_some) || Instant::now() > deadline {
                        let mut each: Vec<f64> = times.into_iter().flatten().collect();
                        each.sort_by(|a, b| a.partial_cmp(b).unwrap());
                        return each;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        let sleep = measure(sleep_at, |_| 0).await;
        tokio::time::sleep((wake_at - Utc::now()).to_std().unwrap_or_default()).await;
        let wake = measure(wake_at, |r| r).await;
        let exact = {
            let s = seen.lock().unwrap();
            workloads
                .iter()
                .filter(|(k, r)| s.get(k).and_then(|h| h.last()).is_some_and(|(now, _)| now == r))
                .count()
        };
        proc.kill();
        // The next agent must not govern these namespaces too.
        if dormant_qps.is_some() {
            c.kubectl_out(&c.admin, &["delete", "sleeppolicy", tool]).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        let o = Outcome {
            sleep_all: sleep.last().copied().unwrap_or(f64::NAN),
            wake_all: wake.last().copied().unwrap_or(f64::NAN),
            sleep,
            wake,
            exact,
            workloads: workloads.len(),
            rss_idle,
            rss_peak: peak.kib(),
        };
        eprintln!("{tool}: {} of {} asleep, {} of them back", o.sleep.len(), o.workloads, o.wake.len());
        outcomes.push((tool, o));
    }

    println!(
        "\n## schedule: {n} namespaces, 2 Deployments each, side by side with kube-green (dormant-qps-1000: --qps=1000 --burst=2000)\n"
    );
    println!("| measure | {} |", outcomes.iter().map(|(t, _)| *t).collect::<Vec<_>>().join(" | "));
    println!("| --- |{}", " --- |".repeat(outcomes.len()));
    let row = |what: &str, f: &dyn Fn(&Outcome) -> String| {
        println!("| {what} | {} |", outcomes.iter().map(|(_, o)| f(o)).collect::<Vec<_>>().join(" | "));
    };
    let ms = |v: &[f64], p: f64| percentile(v, p) * 1000.0;
    row("sleep: scheduled minute → each Deployment seen at 0, p50 / p99 / max", &|o| {
        format!("{:.0} / {:.0} / {:.0} ms", ms(&o.sleep, 0.5), ms(&o.sleep, 0.99), o.sleep_all * 1000.0)
    });
    row("sleep: earliest (negative: before the scheduled minute)", &|o| {
        format!("{:.0} ms", o.sleep.first().copied().unwrap_or(f64::NAN) * 1000.0)
    });
    row("Deployments asleep within 110 s", &|o| format!("{} / {}", o.sleep.len(), o.workloads));
    row("wake: scheduled minute → each Deployment back at its replicas, p50 / p99 / max", &|o| {
        format!("{:.0} / {:.0} / {:.0} ms", ms(&o.wake, 0.5), ms(&o.wake, 0.99), o.wake_all * 1000.0)
    });
    row("wake: earliest (negative: before the scheduled minute)", &|o| {
        format!("{:.0} ms", o.wake.first().copied().unwrap_or(f64::NAN) * 1000.0)
    });
    row("Deployments back at exactly their replicas", &|o| format!("{} / {}", o.exact, o.workloads));
    row("resident memory before the sleep / peak", &|o| {
        format!("{:.1} / {:.1} MiB", o.rss_idle as f64 / 1024.0, o.rss_peak as f64 / 1024.0)
    });
    // Timings of a tool that did the job wrong compare nothing: the
    // benchmark fails (after printing the table, so the numbers are seen).
    let wrong: Vec<String> = outcomes
        .iter()
        .flat_map(|(tool, o)| o.wrong().into_iter().map(move |w| format!("{tool}: {w}")))
        .collect();
    anyhow::ensure!(wrong.is_empty(), "the schedule was not kept:\n{}", wrong.join("\n"));
    Ok(())
}
