//! Benchmark: the sleep/wake engine with many vcluster targets on the
//! testbed (kwok makes a thousand control planes cheap: each is a real
//! StatefulSet with a real pod, without a real container).
//!
//! `cargo bench --bench engine` (env `DORMANT_BENCH_TARGETS`, default 1000;
//! `DORMANT_BENCH_QPS`, default 50). Prints:
//! - idle precision: for targets whose idle deadlines are spread at ten per
//!   second, the time from each deadline to the moment its StatefulSet is
//!   seen at zero replicas (p50/p99/max);
//! - wake all / sleep all at once: time until every StatefulSet is at its
//!   target replicas, and the rate against the configured client QPS;
//! - the agent's peak resident memory.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::StatefulSet;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use testbed::bench::{env_or, instant_at, percentile};
use testbed::process::{free_port, http_ok, rss_kib};
use testbed::{Cluster, ClusterOptions};

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// (namespace, name) → when the StatefulSet was last seen at each replica count.
type Seen = Arc<Mutex<HashMap<(String, String), (i32, Instant)>>>;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n = env_or("DORMANT_BENCH_TARGETS", 1000);
    let qps = env_or("DORMANT_BENCH_QPS", 50);
    let per_ns = 50;
    let namespaces = n.div_ceil(per_ns);
    eprintln!("starting the testbed (fast controllers)…");
    let started = Instant::now();
    let c = tokio::task::spawn_blocking(|| {
        Cluster::start(ClusterOptions { fast_controllers: true, ..Default::default() })
    })
    .await??;
    eprintln!("cluster up in {:.1}s", started.elapsed().as_secs_f64());
    c.kubectl_apply(&c.admin, &dormant::cli::crd_yaml()?)?;
    c.wait_established("sleeppolicies.dormant.dev")?;
    c.kubectl_out(&c.admin, &["create", "namespace", "dormant"]).ok();

    let mut targets = Vec::new();
    for ns_i in 0..namespaces {
        let ns = format!("bench-{ns_i}");
        let mut yaml = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{dormant-bench: \"1\"}}}}\n"
        );
        for i in 0..per_ns {
            let idx = ns_i * per_ns + i;
            if idx >= n {
                break;
            }
            let name = format!("vc-{idx}");
            yaml.push_str(&format!(
                "---\napiVersion: apps/v1\nkind: StatefulSet\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels: {{app: vcluster, release: {name}}}\n  annotations: {{dormant.dev/sleep-after: 1h}}\nspec:\n  replicas: 1\n  serviceName: {name}\n  selector: {{matchLabels: {{app: vcluster, release: {name}}}}}\n  template:\n    metadata: {{labels: {{app: vcluster, release: {name}}}}}\n    spec: {{containers: [{{name: syncer, image: ghcr.io/loft-sh/vcluster-pro:0.30.0, resources: {{requests: {{cpu: 200m, memory: 256Mi}}}}}}]}}\n"
            ));
            targets.push((ns.clone(), name));
        }
        c.kubectl_apply(&c.admin, &yaml)?;
    }
    let client = c.client().await?;
    let sts_all: Api<StatefulSet> = Api::all(client.clone());
    eprintln!("waiting for {n} control-plane pods…");
    let t = Instant::now();
    loop {
        let list = sts_all.list(&Default::default()).await?;
        let ready =
            list.items.iter().filter(|s| s.status.as_ref().and_then(|s| s.ready_replicas) == Some(1)).count();
        if ready >= n {
            break;
        }
        anyhow::ensure!(t.elapsed() < Duration::from_secs(300), "only {ready}/{n} ready after 300 s");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    eprintln!("{n} targets ready in {:.1}s", t.elapsed().as_secs_f64());

    // Watch what the agent does.
    let seen: Seen = Arc::default();
    {
        let seen = seen.clone();
        let api = sts_all.clone();
        tokio::spawn(async move {
            let mut s = watcher(api, watcher::Config::default()).default_backoff().boxed();
            while let Some(ev) = s.next().await {
                let Ok(ev) = ev else { continue };
                if let watcher::Event::Apply(o) | watcher::Event::InitApply(o) = ev {
                    let key = (
                        o.metadata.namespace.clone().unwrap_or_default(),
                        o.metadata.name.clone().unwrap_or_default(),
                    );
                    let r = o.spec.replicas.unwrap_or(1);
                    let mut seen = seen.lock().unwrap();
                    if seen.get(&key).is_none_or(|(old, _)| *old != r) {
                        seen.insert(key, (r, Instant::now()));
                    }
                }
            }
        });
    }

    let admin = free_port()?;
    let user = c.user("dormant-bench", &["system:masters"])?;
    let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_dormant"));
    let args: Vec<String> = vec![
        "agent".into(),
        "--namespace=dormant".into(),
        "--identity=bench".into(),
        format!("--admin-addr=127.0.0.1:{admin}"),
        "--namespace-selector=dormant-bench=1".into(),
        format!("--qps={qps}"),
        format!("--burst={qps}"),
        "--concurrency=32".into(),
    ];
    let env = vec![
        ("KUBECONFIG".to_string(), user.kubeconfig.display().to_string()),
        ("RUST_LOG".to_string(), "warn".to_string()),
    ];
    let mut agent = testbed::spawner::spawn_with_env("dormant-bench", &bin, &args, &env, &c.dir)?;
    let t = Instant::now();
    agent.wait_ready(Duration::from_secs(120), || http_ok(admin, "/readyz"))?;
    let sync = t.elapsed();
    let pid = agent.pid();
    let peak = testbed::process::PeakRss::start(pid);
    // Let the agent's first pass over every target settle: each gets its
    // first-seen instant (the idle clock starts no earlier).
    let t = Instant::now();
    loop {
        let list = sts_all.list(&Default::default()).await?;
        let seen_all = list
            .items
            .iter()
            .filter(|s| {
                s.metadata.annotations.as_ref().is_some_and(|a| a.contains_key("dormant.dev/first-seen"))
            })
            .count();
        if seen_all >= n {
            break;
        }
        anyhow::ensure!(t.elapsed() < Duration::from_secs(300), "only {seen_all}/{n} seen after 300 s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let first_pass = t.elapsed() + sync;
    let rss_idle = rss_kib(pid);

    let patch_all = |values: Arc<dyn Fn(usize) -> serde_json::Value + Send + Sync>| {
        let client = client.clone();
        let targets = targets.clone();
        async move {
            futures::stream::iter(targets.into_iter().enumerate())
                .map(|(i, (ns, name))| {
                    let api: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
                    let patch = values(i);
                    async move {
                        api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await.map(|_| ())
                    }
                })
                .buffer_unordered(32)
                .try_collect::<Vec<()>>()
                .await
        }
    };
    let wait_all = |want: i32, timeout: Duration| {
        let seen = seen.clone();
        let targets = targets.clone();
        async move {
            let start = Instant::now();
            loop {
                let done = {
                    let s = seen.lock().unwrap();
                    targets.iter().filter(|k| s.get(*k).is_some_and(|(r, _)| *r == want)).count()
                };
                if done == targets.len() {
                    return Ok::<_, anyhow::Error>(start.elapsed());
                }
                anyhow::ensure!(
                    start.elapsed() < timeout,
                    "{done}/{} at {want} after {timeout:?}",
                    targets.len()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };

    // 1. Idle precision: one last use for all, idle timeouts from 20 s up
    // in one-second steps, ten targets per step (deadlines spread evenly
    // at 10 targets/s, within the client QPS).
    let used = Utc::now();
    let deadlines: Vec<DateTime<Utc>> =
        (0..n).map(|i| used + chrono::Duration::seconds(20 + (i / 10) as i64)).collect();
    patch_all(Arc::new(move |i| {
        json!({"metadata": {"annotations": {
            "dormant.dev/sleep-after": format!("{}s", 20 + i / 10),
            "dormant.dev/last-activity": rfc3339(used),
            "dormant.dev/last-activity-by": "bench get pods (audit)",
        }}})
    }))
    .await?;
    let deadline_instants: Vec<Instant> = deadlines.iter().map(|d| instant_at((*d).into())).collect();
    let idle_phase =
        deadlines.last().map(|l| (*l - Utc::now()).to_std().unwrap_or_default()).unwrap_or_default();
    wait_all(0, idle_phase + Duration::from_secs(120)).await?;
    // The agent's own share, read now: the forced sleeps below would add
    // their (long, queued) lags to the same histogram.
    let lag = testbed::process::http_body(admin, "/metrics");
    let lag_quantile = |q: f64| {
        // From the cumulative buckets of dormant_sleep_lag_seconds.
        let buckets: Vec<(f64, f64)> = lag
            .lines()
            .filter(|l| l.starts_with("dormant_sleep_lag_seconds_bucket{le=\""))
            .filter_map(|l| {
                let le = l.split('"').nth(1)?;
                let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
                Some((le, l.rsplit(' ').next()?.parse().ok()?))
            })
            .collect();
        let total = buckets.last().map_or(0.0, |b| b.1);
        buckets.iter().find(|(_, c)| *c >= total * q).map_or(f64::NAN, |b| b.0)
    };
    let mut precision: Vec<f64> = {
        let s = seen.lock().unwrap();
        targets
            .iter()
            .zip(&deadline_instants)
            .map(|(k, d)| {
                let (_, at) = s[k];
                at.saturating_duration_since(*d).as_secs_f64() - d.saturating_duration_since(at).as_secs_f64()
            })
            .collect()
    };
    precision.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let early = precision.iter().filter(|p| **p < 0.0).count();

    // 2. Wake all at once (new activity on every target).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let now = rfc3339(Utc::now());
    let start = Instant::now();
    patch_all(Arc::new(move |_| {
        json!({"metadata": {"annotations": {"dormant.dev/sleep-after": "1h", "dormant.dev/last-activity": now, "dormant.dev/last-activity-by": "bench wake (cli)"}}})
    }))
    .await?;
    wait_all(1, Duration::from_secs(600)).await?;
    let wake_all = start.elapsed();

    // 3. Sleep all at once (forced).
    tokio::time::sleep(Duration::from_secs(10)).await;
    let now = rfc3339(Utc::now());
    let start = Instant::now();
    patch_all(Arc::new(move |_| json!({"metadata": {"annotations": {"dormant.dev/force-sleep": now}}})))
        .await?;
    wait_all(0, Duration::from_secs(600)).await?;
    let sleep_all = start.elapsed();
    let peak = peak.kib();
    agent.kill();

    println!("\n## engine: {n} vcluster targets, client QPS {qps} (burst {qps}), concurrency 32\n");
    println!("| measure | value |");
    println!("| --- | --- |");
    println!("| caches synced after start | {:.2} s |", sync.as_secs_f64());
    println!(
        "| first pass over all targets (first-seen written, at the QPS) | {:.1} s |",
        first_pass.as_secs_f64()
    );
    println!("| agent RSS after first pass | {:.1} MiB |", rss_idle as f64 / 1024.0);
    println!("| agent peak RSS | {:.1} MiB |", peak as f64 / 1024.0);
    println!(
        "| idle precision (deadline → StatefulSet seen at 0), p50 / p99 / max | {:.0} / {:.0} / {:.0} ms |",
        percentile(&precision, 0.5) * 1000.0,
        percentile(&precision, 0.99) * 1000.0,
        precision.last().copied().unwrap_or(f64::NAN) * 1000.0
    );
    println!(
        "| of which the agent's own lag (deadline → starting to scale, `dormant_sleep_lag_seconds`), p50 / p99 bucket | ≤ {:.0} / ≤ {:.0} ms |",
        lag_quantile(0.5) * 1000.0,
        lag_quantile(0.99) * 1000.0
    );
    println!("| targets scaled before their deadline | {early} |");
    println!(
        "| wake all {n} at once | {:.1} s ({:.1} targets/s) |",
        wake_all.as_secs_f64(),
        n as f64 / wake_all.as_secs_f64()
    );
    println!(
        "| sleep all {n} at once | {:.1} s ({:.1} targets/s) |",
        sleep_all.as_secs_f64(),
        n as f64 / sleep_all.as_secs_f64()
    );
    Ok(())
}
