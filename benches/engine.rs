//! Benchmark: the sleep/wake engine with many targets on the testbed
//! (kwok makes thousands of control planes cheap: each is a real
//! StatefulSet with a real pod, without a real container).
//!
//! `cargo bench --bench engine`. Environment:
//! - `DORMANT_BENCH_TARGETS` (default 1000): vcluster targets, or with
//!   `DORMANT_BENCH_MODE=namespaces` namespace workloads (Deployments, 50
//!   per namespace, each namespace a target);
//! - `DORMANT_BENCH_QPS` (default 50) and `DORMANT_BENCH_CONCURRENCY`
//!   (default 32): the agent's client QPS (and burst) and reconciles at once;
//! - `DORMANT_BENCH_DEADLINES_PER_S` (default 10): how many idle deadlines
//!   arrive per second in the precision phase;
//! - `DORMANT_BENCH_AGENT`: that build of the agent instead of this one's
//!   (a script that `exec`s one under a heap profiler, say);
//! - `DORMANT_BENCH_MEMORY_ONLY=1`: stop the agent (SIGTERM, it shuts down
//!   in order) once its first pass is over, and print its memory then.
//!
//! Prints:
//! - idle precision: for targets whose idle deadlines are spread evenly,
//!   the time from each deadline to the moment its workloads are seen at
//!   zero replicas (p50/p99/max);
//! - wake all / sleep all at once: time until every workload is at its
//!   target replicas, the agent's API requests per second against its QPS
//!   and the time they waited for it, and the CPU the agent, the API
//!   server and etcd spent meanwhile (where the time goes);
//! - the agent's resident memory after its first pass and at its peak.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use anyhow::Context as _;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use testbed::bench::{env_or, instant_at, percentile};
use testbed::process::{cpu_time, free_port, http_body, http_ok, rss_kib};
use testbed::{Cluster, ClusterOptions};

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// What the benchmark last saw of one workload: its wanted and ready
/// replicas, and when the wanted count last changed.
#[derive(Clone, Copy)]
struct Seen {
    replicas: i32,
    ready: i32,
    at: Instant,
}

/// Workloads by (namespace, name); targets that carry `first-seen`.
#[derive(Default)]
struct Watched {
    workloads: HashMap<(String, String), Seen>,
    first_seen: HashSet<(String, String)>,
}

/// One target: a vcluster (its StatefulSet) or a namespace (its Deployments).
struct Target {
    namespace: String,
    /// The object dormant annotates: the StatefulSet's name, or none for
    /// the namespace itself.
    name: Option<String>,
    workloads: Vec<(String, String)>,
}

impl Target {
    fn key(&self) -> (String, String) {
        (self.namespace.clone(), self.name.clone().unwrap_or_default())
    }
}

/// CPU seconds of the agent, the API server and etcd over one phase.
struct Cpu([(u32, Duration); 3]);

impl Cpu {
    fn start(pids: [u32; 3]) -> Cpu {
        Cpu(pids.map(|p| (p, cpu_time(p).unwrap_or_default())))
    }
    fn spent(&self) -> [f64; 3] {
        self.0.map(|(p, t0)| cpu_time(p).unwrap_or_default().saturating_sub(t0).as_secs_f64())
    }
}

/// A counter of the agent's `/metrics` (0 when the build has none).
fn counter(admin: u16, name: &str) -> f64 {
    http_body(admin, "/metrics")
        .lines()
        .find(|l| l.split(' ').next() == Some(name))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// One phase's cost: wall time, the agent's API requests and the time
/// they waited for its rate limit, and CPU.
struct Phase {
    took: Duration,
    requests: f64,
    throttled: f64,
    cpu: [f64; 3],
}

impl Phase {
    fn row(&self, what: &str, n: usize, unit: &str, qps: usize) -> String {
        let secs = self.took.as_secs_f64();
        format!(
            "| {what} | {secs:.1} s ({:.1} {unit}/s); agent requests {:.0}/s of QPS {qps}, waited for the QPS {:.0} s in all; CPU s agent / kube-apiserver / etcd {:.1} / {:.1} / {:.1} (of {:.0} on 2 cores) |",
            n as f64 / secs,
            self.requests / secs,
            self.throttled,
            self.cpu[0],
            self.cpu[1],
            self.cpu[2],
            secs * 2.0
        )
    }
}

/// How many of `workloads` are as `pred` wants.
fn count_where(
    watched: &Mutex<Watched>,
    workloads: &[(String, String)],
    pred: impl Fn(&Seen) -> bool,
) -> usize {
    let w = watched.lock().unwrap();
    workloads.iter().filter(|k| w.workloads.get(*k).is_some_and(&pred)).count()
}

/// Waits until every workload wants `want` replicas.
async fn wait_all(
    watched: &Mutex<Watched>,
    workloads: &[(String, String)],
    want: i32,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        let done = count_where(watched, workloads, |s| s.replicas == want);
        if done == workloads.len() {
            return Ok(start.elapsed());
        }
        anyhow::ensure!(start.elapsed() < timeout, "{done}/{} at {want} after {timeout:?}", workloads.len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `f` (which answers its own wall time), measuring what it cost.
async fn phase(
    admin: u16,
    pids: [u32; 3],
    f: impl std::future::Future<Output = anyhow::Result<Duration>>,
) -> anyhow::Result<Phase> {
    let requests = || counter(admin, "dormant_kube_requests_total");
    let throttled = || counter(admin, "dormant_kube_throttled_seconds_total");
    let (r0, w0, cpu) = (requests(), throttled(), Cpu::start(pids));
    let took = f.await?;
    Ok(Phase { took, requests: requests() - r0, throttled: throttled() - w0, cpu: cpu.spent() })
}

/// Creates `objects` of kind `ar`, 16 requests at a time.
async fn create_all(
    client: &kube::Client,
    ar: &ApiResource,
    objects: Vec<serde_json::Value>,
) -> anyhow::Result<()> {
    futures::stream::iter(objects)
        .map(|o| {
            let ns = o["metadata"]["namespace"].as_str().map(str::to_string);
            let api: Api<DynamicObject> = match ns {
                Some(ns) => Api::namespaced_with(client.clone(), &ns, ar),
                None => Api::all_with(client.clone(), ar),
            };
            async move {
                let o: DynamicObject = serde_json::from_value(o)?;
                api.create(&PostParams::default(), &o).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let namespaces_mode = std::env::var("DORMANT_BENCH_MODE").as_deref() == Ok("namespaces");
    let n = env_or("DORMANT_BENCH_TARGETS", 1000);
    let qps = env_or("DORMANT_BENCH_QPS", 50);
    let concurrency = env_or("DORMANT_BENCH_CONCURRENCY", 32);
    let per_s = env_or("DORMANT_BENCH_DEADLINES_PER_S", 10).max(1);
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
    let client = c.client().await?;

    // Watch what the agent does, from before anything exists.
    let (workload_kind, target_kind) = if namespaces_mode {
        (ApiResource::erase::<Deployment>(&()), ApiResource::erase::<Namespace>(&()))
    } else {
        (ApiResource::erase::<StatefulSet>(&()), ApiResource::erase::<StatefulSet>(&()))
    };
    let watched: Arc<Mutex<Watched>> = Arc::default();
    let mut kinds = vec![(workload_kind.clone(), true, !namespaces_mode)];
    if namespaces_mode {
        kinds.push((target_kind.clone(), false, true));
    }
    for (ar, is_workload, is_target) in kinds {
        let watched = watched.clone();
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        tokio::spawn(async move {
            let mut s = watcher(api, watcher::Config::default()).default_backoff().boxed();
            while let Some(ev) = s.next().await {
                let Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) = ev else { continue };
                let key = (
                    o.metadata.namespace.clone().unwrap_or_default(),
                    o.metadata.name.clone().unwrap_or_default(),
                );
                let mut w = watched.lock().unwrap();
                if is_target
                    && o.metadata
                        .annotations
                        .as_ref()
                        .is_some_and(|a| a.contains_key("dormant.dev/first-seen"))
                {
                    // A namespace is its own key's namespace.
                    let key = if is_workload { key.clone() } else { (key.1.clone(), String::new()) };
                    w.first_seen.insert(key);
                }
                if is_workload {
                    let int = |v: &serde_json::Value| v.as_i64().unwrap_or(0) as i32;
                    let replicas = o.data["spec"]["replicas"].as_i64().map_or(1, |r| r as i32);
                    let ready = int(&o.data["status"]["readyReplicas"]);
                    let at = match w.workloads.get(&key) {
                        Some(old) if old.replicas == replicas => old.at,
                        _ => Instant::now(),
                    };
                    w.workloads.insert(key, Seen { replicas, ready, at });
                }
            }
        });
    }

    // The objects, made through the API 16 at a time (one `kubectl apply`
    // per namespace, one after the other, took 13 minutes for 10,000
    // Deployments: a GET before every create and a process per namespace).
    let requests = json!({"requests": {"cpu": "200m", "memory": "256Mi"}});
    let mut targets = Vec::new();
    let mut namespace_objects = Vec::new();
    let mut workload_objects = Vec::new();
    for ns_i in 0..namespaces {
        let ns = format!("bench-{ns_i}");
        let mut meta = json!({"name": ns, "labels": {"dormant-bench": "1"}});
        if namespaces_mode {
            meta["annotations"] = json!({"dormant.dev/sleep-after": "1h"});
        }
        namespace_objects.push(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": meta}));
        let mut workloads = Vec::new();
        for i in 0..per_ns {
            let idx = ns_i * per_ns + i;
            if idx >= n {
                break;
            }
            if namespaces_mode {
                let name = format!("app-{i}");
                workload_objects.push(json!({
                    "apiVersion": "apps/v1", "kind": "Deployment",
                    "metadata": {"name": name, "namespace": ns},
                    "spec": {
                        "replicas": 1,
                        // Pods of 50,000 take longer than the default
                        // 600 s to come up; past it, some Deployments
                        // kept readyReplicas unset with their pod ready.
                        "progressDeadlineSeconds": 7200,
                        "selector": {"matchLabels": {"app": name}},
                        "template": {
                            "metadata": {"labels": {"app": name}},
                            "spec": {"containers": [{"name": "app", "image": "registry.example/app:1", "resources": requests}]},
                        },
                    },
                }));
                workloads.push((ns.clone(), name));
            } else {
                let name = format!("vc-{idx}");
                let labels = json!({"app": "vcluster", "release": name});
                workload_objects.push(json!({
                    "apiVersion": "apps/v1", "kind": "StatefulSet",
                    "metadata": {"name": name, "namespace": ns, "labels": labels, "annotations": {"dormant.dev/sleep-after": "1h"}},
                    "spec": {
                        "replicas": 1,
                        "serviceName": name,
                        "selector": {"matchLabels": labels},
                        "template": {
                            "metadata": {"labels": labels},
                            "spec": {"containers": [{"name": "syncer", "image": "ghcr.io/loft-sh/vcluster-pro:0.30.0", "resources": requests}]},
                        },
                    },
                }));
                targets.push(Target {
                    namespace: ns.clone(),
                    name: Some(name.clone()),
                    workloads: vec![(ns.clone(), name)],
                });
            }
        }
        if namespaces_mode {
            targets.push(Target { namespace: ns.clone(), name: None, workloads });
        }
    }
    let t = Instant::now();
    create_all(&client, &ApiResource::erase::<Namespace>(&()), namespace_objects).await?;
    create_all(&client, &workload_kind, workload_objects).await?;
    eprintln!("{n} workloads created in {:.1}s", t.elapsed().as_secs_f64());
    let all_workloads: Vec<(String, String)> = targets.iter().flat_map(|t| t.workloads.clone()).collect();
    eprintln!("waiting for {} workloads' pods…", all_workloads.len());
    let t = Instant::now();
    let setup_timeout = Duration::from_secs(300 + all_workloads.len() as u64 / 10);
    loop {
        let ready = count_where(&watched, &all_workloads, |s| s.ready >= 1);
        if ready >= all_workloads.len() {
            break;
        }
        anyhow::ensure!(
            t.elapsed() < setup_timeout,
            "only {ready}/{} ready after {setup_timeout:?}",
            all_workloads.len()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    eprintln!("{} workloads ready in {:.1}s", all_workloads.len(), t.elapsed().as_secs_f64());

    let admin = free_port()?;
    let user = c.user("dormant-bench", &["system:masters"])?;
    let bin = std::env::var_os("DORMANT_BENCH_AGENT")
        .map_or_else(|| std::path::PathBuf::from(env!("CARGO_BIN_EXE_dormant")), std::path::PathBuf::from);
    let args: Vec<String> = vec![
        "agent".into(),
        "--namespace=dormant".into(),
        "--identity=bench".into(),
        format!("--admin-addr=127.0.0.1:{admin}"),
        "--namespace-selector=dormant-bench=1".into(),
        format!("--qps={qps}"),
        format!("--burst={qps}"),
        format!("--concurrency={concurrency}"),
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
    let of = |name: &str| c.pid_of(name).with_context(|| format!("no {name} process in the testbed"));
    let pids = [pid, of("kube-apiserver")?, of("etcd")?];
    // Let the agent's first pass over every target settle: each gets its
    // first-seen instant (the idle clock starts no earlier).
    let t = Instant::now();
    loop {
        let seen_all = {
            let w = watched.lock().unwrap();
            targets.iter().filter(|t| w.first_seen.contains(&t.key())).count()
        };
        if seen_all >= targets.len() {
            break;
        }
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(600),
            "only {seen_all}/{} seen after 600 s",
            targets.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let first_pass = t.elapsed() + sync;
    let rss_idle = rss_kib(pid);
    if std::env::var_os("DORMANT_BENCH_MEMORY_ONLY").is_some() {
        testbed::process::signal(pid, libc::SIGTERM)?;
        println!(
            "first pass over {} targets in {:.1} s; agent RSS then {:.1} MiB, peak {:.1} MiB",
            targets.len(),
            first_pass.as_secs_f64(),
            rss_idle as f64 / 1024.0,
            peak.kib() as f64 / 1024.0
        );
        tokio::time::sleep(Duration::from_secs(10)).await;
        return Ok(());
    }

    let patch_all = |values: Arc<dyn Fn(usize) -> serde_json::Value + Send + Sync>| {
        let client = client.clone();
        let keys: Vec<(String, Option<String>)> =
            targets.iter().map(|t| (t.namespace.clone(), t.name.clone())).collect();
        let ar = target_kind.clone();
        async move {
            futures::stream::iter(keys.into_iter().enumerate())
                .map(|(i, (ns, name))| {
                    let (api, name): (Api<DynamicObject>, String) = match name {
                        Some(name) => (Api::namespaced_with(client.clone(), &ns, &ar), name),
                        None => (Api::all_with(client.clone(), &ar), ns),
                    };
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
    // 1. Idle precision: one last use for all, idle timeouts in one-second
    // steps, `per_s` targets per step (deadlines spread evenly at `per_s`
    // targets/s). The first deadline comes after the benchmark's own
    // patches (one per target, all at once) have landed and the agent has
    // seen them: 20 s plus a second per 200 targets. A run whose patches
    // took longer measures that storm, not the agent, and stops.
    let used = Utc::now();
    let first = 20 + targets.len() / 200;
    let deadlines: Vec<DateTime<Utc>> =
        (0..targets.len()).map(|i| used + chrono::Duration::seconds((first + i / per_s) as i64)).collect();
    patch_all(Arc::new(move |i| {
        json!({"metadata": {"annotations": {
            "dormant.dev/sleep-after": format!("{}s", first + i / per_s),
            "dormant.dev/last-activity": rfc3339(used),
            "dormant.dev/last-activity-by": "bench get pods (audit)",
        }}})
    }))
    .await?;
    let patched = (Utc::now() - used).to_std().unwrap_or_default();
    eprintln!(
        "{} idle deadlines patched in {:.1} s; the first is due {first} s after the last use",
        targets.len(),
        patched.as_secs_f64()
    );
    anyhow::ensure!(
        patched < Duration::from_secs(first as u64),
        "the deadlines took {patched:?} to patch, past the first one ({first} s): the precision would measure the patches"
    );
    let deadline_instants: Vec<Instant> = deadlines.iter().map(|d| instant_at((*d).into())).collect();
    let idle_phase =
        deadlines.last().map(|l| (*l - Utc::now()).to_std().unwrap_or_default()).unwrap_or_default();
    let idle =
        phase(admin, pids, wait_all(&watched, &all_workloads, 0, idle_phase + Duration::from_secs(300)))
            .await?;
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
        let w = watched.lock().unwrap();
        targets
            .iter()
            .zip(&deadline_instants)
            .map(|(t, d)| {
                // Asleep when its last workload is at zero.
                let at = t.workloads.iter().map(|k| w.workloads[k].at).max().unwrap();
                at.saturating_duration_since(*d).as_secs_f64() - d.saturating_duration_since(at).as_secs_f64()
            })
            .collect()
    };
    precision.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let early = precision.iter().filter(|p| **p < 0.0).count();

    // 2. Wake all at once (new activity on every target).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let now = rfc3339(Utc::now());
    let wake_all = phase(admin, pids, async {
        let start = Instant::now();
        patch_all(Arc::new(move |_| {
            json!({"metadata": {"annotations": {"dormant.dev/sleep-after": "1h", "dormant.dev/last-activity": now, "dormant.dev/last-activity-by": "bench wake (cli)"}}})
        }))
        .await?;
        wait_all(&watched, &all_workloads, 1, Duration::from_secs(900)).await?;
        Ok(start.elapsed())
    })
    .await?;

    // 3. Sleep all at once (forced).
    tokio::time::sleep(Duration::from_secs(10)).await;
    let now = rfc3339(Utc::now());
    let sleep_all = phase(admin, pids, async {
        let start = Instant::now();
        patch_all(Arc::new(move |_| json!({"metadata": {"annotations": {"dormant.dev/force-sleep": now}}})))
            .await?;
        wait_all(&watched, &all_workloads, 0, Duration::from_secs(900)).await?;
        Ok(start.elapsed())
    })
    .await?;
    let peak = peak.kib();
    agent.kill();

    let (what, unit) = if namespaces_mode {
        (format!("{n} namespace workloads in {} namespaces", targets.len()), "namespaces")
    } else {
        (format!("{n} vcluster targets"), "targets")
    };
    println!(
        "\n## engine: {what}, client QPS {qps} (burst {qps}), concurrency {concurrency}, {per_s} deadlines/s\n"
    );
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
        "| idle precision (deadline → its workloads seen at 0), p50 / p99 / max | {:.0} / {:.0} / {:.0} ms |",
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
    let t = targets.len();
    println!("{}", idle.row(&format!("idle phase ({t} deadlines, {per_s}/s)"), t, unit, qps));
    println!("{}", wake_all.row(&format!("wake all {t} at once"), t, unit, qps));
    println!("{}", sleep_all.row(&format!("sleep all {t} at once"), t, unit, qps));
    Ok(())
}
