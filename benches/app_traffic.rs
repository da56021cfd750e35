//! Benchmark: waking on application traffic, side by side with the KEDA
//! HTTP add-on's interceptor (v0.8.0, built from the Go module proxy).
//!
//! `hack/bench-app-traffic.sh` (builds the interceptor once, installs wrk,
//! then runs `cargo bench --bench app_traffic`). Everything runs on the
//! real testbed, in a network namespace of the benchmark's own, as
//! `tests/app_traffic.rs` does: kwok's pod range `10.244.0.0/16` is local
//! there, so one HTTP server on `0.0.0.0:8080` answers for every pod of
//! the app, and `10.96.0.10` stands in for the KEDA app's ClusterIP (the
//! interceptor dials `<service>.<namespace>:<port>` by name: it runs in a
//! mount namespace whose `/etc/hosts` says where that is).
//!
//! Only KEDA's hold-and-forward part runs: its operator and external
//! scaler are KEDA itself (ScaledObject → HPA → scale from zero), which
//! this testbed does not run. The benchmark scales the KEDA app's
//! Deployment itself, as KEDA's operator would, while a request waits in
//! the interceptor; so KEDA's numbers below exclude the time its chain
//! takes to notice a waiting request and scale, which dormant's include.
//!
//! Prints:
//! - cold start, per round: from the moment the Service's ready endpoint
//!   appears (in the object each proxy waits on: Endpoints for KEDA,
//!   EndpointSlices for dormant, seen by this benchmark's own watch) to the
//!   first answer forwarded to the waiting client; and for dormant the
//!   whole first request (wake included);
//! - warm throughput and latency with wrk: straight to the pod, through
//!   KEDA's interceptor (always in the path), through dormant's listener
//!   (in the path only while the app sleeps and for 30 s after a wake: an
//!   awake app's traffic goes straight to its pods), with the proxy's CPU
//!   time per request;
//! - memory per held request: the proxy's RSS growth per request while
//!   `DORMANT_BENCH_HELD` (1000) requests wait for an app that never gets
//!   ready, none of them answered.
//!
//! `DORMANT_BENCH_ROUNDS` (10) cold starts each; `DORMANT_BENCH_SECONDS`
//! (10) per wrk run.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use futures::StreamExt as _;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::core::v1::Endpoints;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::{WatchStreamExt as _, watcher};
use testbed::bench::Throughput;
use testbed::netns::NetNs;
use testbed::process::{Proc, cpu_time, free_port, http_ok, rss_kib};
use testbed::{Cluster, ClusterOptions};
use tokio::sync::watch;

/// What dormant's slices list: an address of the benchmark's namespace.
const AGENT_ADDRESS: &str = "10.250.0.1";
/// Where the KEDA app's Service name points, inside the interceptor.
const CLUSTER_IP: &str = "10.96.0.10";
const APP_PORT: u16 = 8080;
const KEDA_PROXY_PORT: u16 = 8081;
const KEDA_ADMIN_PORT: u16 = 9090;
const KEDA_HOST: &str = "keda.example.test";
const KEDA_HOLD_HOST: &str = "keda-hold.example.test";
const DORMANT_HOST: &str = "web.example.test";
/// The namespaces: KEDA's app and its never-scaled twin, dormant's app and
/// its never-ready twin.
const KEDA_NS: &str = "keda-app";
const KEDA_HOLD_NS: &str = "keda-hold";
const DORMANT_NS: &str = "dormant-app";
const DORMANT_HOLD_NS: &str = "dormant-hold";

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn which(bin: &str) -> String {
    testbed::bench::which(bin, "hack/bench-app-traffic.sh")
}

fn enter(path: &Path) {
    testbed::netns::enter(path).unwrap_or_else(|e| panic!("setns {}: {e}", path.display()));
}

/// Runs `f` on a new thread inside the namespace: every socket it makes
/// lives there.
fn in_ns<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = path.to_owned();
    std::thread::spawn(move || {
        enter(&path);
        f()
    })
}

/// The app: a small plain-text answer to everything, HTTP/1.1 keep-alive.
async fn app_server() {
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", APP_PORT)).await.unwrap();
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(|_req| async {
                Ok::<_, Infallible>(
                    http::Response::builder()
                        .header("content-type", "text/plain")
                        .body(Full::new(Bytes::from_static(b"hello from the app\n")))
                        .unwrap(),
                )
            });
            hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await
                .ok();
        });
    }
}

fn kubectl(c: &Cluster, args: &[&str]) -> String {
    c.kubectl_out(&c.admin, args).unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"))
}

/// A Deployment `web` of `replicas` pods (never ready with `never_ready`:
/// they ask for a node none has) and its Service on port 8080; for
/// dormant's, the Ingress that makes it app traffic.
fn app_yaml(ns: &str, replicas: u32, never_ready: bool, ingress_host: Option<&str>) -> String {
    let node = if never_ready { ", nodeSelector: {nowhere: \"true\"}" } else { "" };
    let mut y = format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: {ns}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec: {{containers: [{{name: web, image: nginx:1.27, ports: [{{containerPort: {APP_PORT}}}]}}]{node}}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: {ns}}}
spec:
  selector: {{app: web}}
  ports: [{{name: http, port: {APP_PORT}, targetPort: {APP_PORT}}}]
"#
    );
    if let Some(host) = ingress_host {
        y.push_str(&format!(
            r#"---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: web, namespace: {ns}}}
spec:
  rules:
  - host: {host}
    http:
      paths:
      - {{path: /, pathType: Prefix, backend: {{service: {{name: web, port: {{number: {APP_PORT}}}}}}}}}
"#
        ));
    }
    y
}

fn http_scaled_object(ns: &str, host: &str) -> String {
    format!(
        r#"apiVersion: http.keda.sh/v1alpha1
kind: HTTPScaledObject
metadata: {{name: web, namespace: {ns}}}
spec:
  hosts: [{host}]
  scaleTargetRef: {{name: web, kind: Deployment, apiVersion: apps/v1, service: web, port: {APP_PORT}}}
  replicas: {{min: 0, max: 1}}
"#
    )
}

/// The Service `web`'s endpoints in `ns` as this benchmark's watch sees
/// them: how many are ready (the Service's own, not dormant's), and since
/// when there are any.
#[derive(Clone, Copy, Debug, Default)]
struct Ready {
    own: usize,
    since: Option<Instant>,
    /// dormant's endpoint (`address:port`), while its slice exists.
    held: Option<SocketAddr>,
}

/// Set once the run is over: the watches end quietly as the cluster stops.
static STOPPING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn stopping() -> bool {
    STOPPING.load(std::sync::atomic::Ordering::Relaxed)
}

fn publish(tx: &watch::Sender<Ready>, own: usize, held: Option<SocketAddr>) {
    tx.send_modify(|r| {
        if own > 0 && r.own == 0 {
            r.since = Some(Instant::now());
        }
        if own == 0 {
            r.since = None;
        }
        r.own = own;
        r.held = held;
    });
}

/// Watches the EndpointSlices of Service `web` in `ns`.
fn watch_slices(client: kube::Client, ns: &str) -> watch::Receiver<Ready> {
    let (tx, rx) = watch::channel(Ready::default());
    let api: kube::Api<EndpointSlice> = kube::Api::namespaced(client, ns);
    let cfg = watcher::Config::default().labels("kubernetes.io/service-name=web");
    let ns = ns.to_string();
    tokio::spawn(async move {
        let mut slices: BTreeMap<String, EndpointSlice> = BTreeMap::new();
        let mut events = watcher(api, cfg).default_backoff().boxed();
        while let Some(ev) = events.next().await {
            match ev {
                Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => {
                    slices.insert(s.metadata.name.clone().unwrap_or_default(), s);
                }
                Ok(watcher::Event::Delete(s)) => {
                    slices.remove(s.metadata.name.as_deref().unwrap_or_default());
                }
                Ok(watcher::Event::Init) => slices.clear(),
                Ok(watcher::Event::InitDone) => {}
                Err(_) if stopping() => break,
                Err(e) => {
                    eprintln!("[bench] EndpointSlice watch in {ns}: {e}");
                    continue;
                }
            }
            let mut own = 0;
            let mut held = None;
            for s in slices.values() {
                let dormants =
                    s.metadata.labels.as_ref().and_then(|l| l.get("endpointslice.kubernetes.io/managed-by"))
                        == Some(&"dormant.dev".to_string());
                let port = s.ports.iter().flatten().find_map(|p| p.port).unwrap_or(0) as u16;
                for e in s.endpoints.iter().flatten() {
                    if e.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                        continue;
                    }
                    if dormants {
                        held = e.addresses.first().and_then(|a| format!("{a}:{port}").parse().ok());
                    } else {
                        own += e.addresses.len();
                    }
                }
            }
            publish(&tx, own, held);
        }
    });
    rx
}

/// Watches the Endpoints of Service `web` in `ns` (what KEDA waits on).
fn watch_endpoints(client: kube::Client, ns: &str) -> watch::Receiver<Ready> {
    let (tx, rx) = watch::channel(Ready::default());
    let api: kube::Api<Endpoints> = kube::Api::namespaced(client, ns);
    let cfg = watcher::Config::default().fields("metadata.name=web");
    tokio::spawn(async move {
        let mut events = watcher(api, cfg).default_backoff().boxed();
        while let Some(ev) = events.next().await {
            let own = match ev {
                Ok(watcher::Event::Apply(e) | watcher::Event::InitApply(e)) => {
                    e.subsets.iter().flatten().map(|s| s.addresses.as_ref().map_or(0, Vec::len)).sum()
                }
                Ok(watcher::Event::Delete(_)) => 0,
                Ok(_) => continue,
                Err(_) if stopping() => break,
                Err(e) => {
                    eprintln!("[bench] Endpoints watch: {e}");
                    continue;
                }
            };
            publish(&tx, own, None);
        }
    });
    rx
}

async fn wait_for(rx: &mut watch::Receiver<Ready>, what: &str, cond: impl Fn(&Ready) -> bool) -> Ready {
    let found = match tokio::time::timeout(Duration::from_secs(120), rx.wait_for(|r| cond(r))).await {
        Ok(Ok(r)) => Some(*r),
        _ => None,
    };
    found.unwrap_or_else(|| panic!("{what}: still {:?} after 120 s", *rx.borrow()))
}

/// One GET with `Host: host` from inside the namespace: when its answer's
/// first byte came, and the answer.
fn get(ns: &Path, addr: SocketAddr, host: &str) -> std::thread::JoinHandle<(Instant, String)> {
    let host = host.to_string();
    in_ns(ns, move || {
        let mut s = connect(addr);
        s.set_read_timeout(Some(Duration::from_secs(180))).unwrap();
        write!(s, "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").unwrap();
        let mut first = [0u8; 1];
        let n = s.read(&mut first).unwrap_or(0);
        let at = Instant::now();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).ok();
        (at, format!("{}{}", String::from_utf8_lossy(&first[..n]), String::from_utf8_lossy(&rest)))
    })
}

/// A connection to `addr`, retried while nothing listens yet (the agent
/// opens a held Service's port once it sees the slice this benchmark saw).
fn connect(addr: SocketAddr) -> TcpStream {
    let start = Instant::now();
    loop {
        match TcpStream::connect(addr) {
            Ok(s) => return s,
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && start.elapsed() < Duration::from_secs(10) =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("connect {addr}: {e}"),
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Signed milliseconds from `from` to `to`.
fn ms_between(from: Instant, to: Instant) -> f64 {
    if to >= from { ms(to - from) } else { -ms(from - to) }
}

fn summary(v: &[f64]) -> String {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return "-".into();
    }
    format!("{:.0} / {:.0} / {:.0}", s[0], s[s.len() / 2], s[s.len() - 1])
}

fn scale(c: &Cluster, ns: &str, replicas: u32) {
    kubectl(c, &["scale", "deployment", "web", "-n", ns, &format!("--replicas={replicas}")]);
}

/// Puts dormant's app to sleep by hand (a request ends such a sleep).
fn sleep_dormant_app(c: &Cluster) {
    let out = Command::new(env!("CARGO_BIN_EXE_dormant"))
        .args(["sleep", "--direct", &format!("namespace/{DORMANT_NS}"), "--wait=120s"])
        .env("KUBECONFIG", &c.admin.kubeconfig)
        .output()
        .unwrap();
    assert!(out.status.success(), "dormant sleep: {}", String::from_utf8_lossy(&out.stderr));
}

/// Opens `n` connections from inside the namespace, each sending one GET
/// to `addr` with `Host: host`, and keeps them.
fn hold(ns: &Path, addr: SocketAddr, host: &str, n: usize) -> Vec<TcpStream> {
    let host = host.to_string();
    in_ns(ns, move || {
        (0..n)
            .map(|_| {
                let mut s = connect(addr);
                write!(s, "GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").unwrap();
                s
            })
            .collect()
    })
    .join()
    .unwrap()
}

/// How many of `held` have been answered (or closed) so far.
fn answered(held: &[TcpStream]) -> usize {
    held.iter()
        .filter(|s| {
            s.set_nonblocking(true).unwrap();
            let mut b = [0u8; 1];
            !matches!((&**s).read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        })
        .count()
}

/// RSS once it has settled (two readings 500 ms apart within 64 KiB).
fn settled_rss(pid: u32) -> u64 {
    let mut last = rss_kib(pid);
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(500));
        let now = rss_kib(pid);
        if now.abs_diff(last) < 64 {
            return now;
        }
        last = now;
    }
    last
}

/// Memory per held request: RSS growth from `n/2` to `n` requests held
/// by `pid`, in KiB per request; none may have been answered.
fn memory_per_held(ns: &Path, pid: u32, addr: SocketAddr, host: &str, n: usize) -> (u64, u64, f64) {
    let base = settled_rss(pid);
    let mut held = hold(ns, addr, host, n / 2);
    let half = settled_rss(pid);
    held.extend(hold(ns, addr, host, n - n / 2));
    let full = settled_rss(pid);
    let done = answered(&held);
    assert_eq!(done, 0, "{done} of {n} held requests to {addr} were answered or closed");
    drop(held);
    (base, full, (full as f64 - half as f64) / (n - n / 2) as f64)
}

fn row(name: &str, t: &Throughput, direct: Option<&Throughput>, cpu_us: Option<f64>) {
    let added = direct.map_or("-".into(), |d| format!("{:+.2}", t.p99_ms - d.p99_ms));
    let cpu = cpu_us.map_or("-".into(), |c| format!("{c:.1}"));
    println!(
        "| {name:<38} | {:>9.0} | {:>7.2} | {:>7.2} | {added:>13} | {cpu:>11} |",
        t.rps, t.p50_ms, t.p99_ms
    );
}

/// wrk through one path, with the CPU time `pid` spent per request.
fn measure(
    wrk: &[String],
    url: &str,
    host: &str,
    seconds: u32,
    pid: Option<u32>,
) -> (Throughput, Option<f64>) {
    let before = pid.map(|p| cpu_time(p).unwrap());
    let header = format!("Host: {host}");
    let t = testbed::bench::wrk(wrk, url, &[&header], seconds);
    let cpu = pid.zip(before).map(|(p, b)| {
        let used = cpu_time(p).unwrap() - b;
        used.as_secs_f64() * 1e6 / (t.rps * f64::from(seconds))
    });
    (t, cpu)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    dormant::tls::install_default_provider();
    let keda_dir = PathBuf::from(
        std::env::var("KEDA_HTTP_ADDON_DIR").context("KEDA_HTTP_ADDON_DIR: run hack/bench-app-traffic.sh")?,
    );
    let rounds = env_num("DORMANT_BENCH_ROUNDS", 10);
    let n_held = env_num("DORMANT_BENCH_HELD", 1000);
    let seconds = env_num("DORMANT_BENCH_SECONDS", 10) as u32;

    let c = tokio::task::spawn_blocking(|| {
        Cluster::start(ClusterOptions { fast_controllers: true, ..ClusterOptions::default() })
    })
    .await??;
    c.kubectl_apply(&c.admin, &dormant::cli::crd_yaml()?)?;
    c.wait_established("sleeppolicies.dormant.dev")?;
    kubectl(&c, &["apply", "-f", keda_dir.join("httpscaledobjects.yaml").to_str().unwrap()]);
    c.wait_established("httpscaledobjects.http.keda.sh")?;
    for (ns, label) in [
        ("dormant", ""),
        (KEDA_NS, ""),
        (KEDA_HOLD_NS, ""),
        (DORMANT_NS, "dormant-bench: app"),
        (DORMANT_HOLD_NS, "dormant-bench: app"),
    ] {
        c.kubectl_apply(
            &c.admin,
            &format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  labels: {{{label}}}\n"),
        )?;
    }
    c.kubectl_apply(&c.admin, &app_yaml(KEDA_NS, 0, false, None))?;
    c.kubectl_apply(&c.admin, &http_scaled_object(KEDA_NS, KEDA_HOST))?;
    c.kubectl_apply(&c.admin, &app_yaml(KEDA_HOLD_NS, 0, false, None))?;
    c.kubectl_apply(&c.admin, &http_scaled_object(KEDA_HOLD_NS, KEDA_HOLD_HOST))?;
    c.kubectl_apply(&c.admin, &app_yaml(DORMANT_NS, 1, false, Some(DORMANT_HOST)))?;
    c.kubectl_apply(&c.admin, &app_yaml(DORMANT_HOLD_NS, 1, true, Some(DORMANT_HOST)))?;

    let client = {
        let kc = kube::config::Kubeconfig::read_from(&c.admin.kubeconfig)?;
        kube::Client::try_from(kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?)?
    };
    let mut keda_ready = watch_endpoints(client.clone(), KEDA_NS);
    let mut dormant_ready = watch_slices(client.clone(), DORMANT_NS);
    let mut hold_ready = watch_slices(client.clone(), DORMANT_HOLD_NS);
    wait_for(&mut dormant_ready, "dormant's app ready", |r| r.own == 1).await;

    // The namespace: pod addresses and the stand-in ClusterIP are local;
    // the API server is reached through a forwarder.
    let net = NetNs::new("apptraffic")?;
    let ns_path = net.path.clone();
    let ip = |args: &[&str]| {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", ns_path.display()))
            .arg("ip")
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!("ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    ip(&["route", "add", "local", "10.244.0.0/16", "dev", "lo"])?;
    ip(&["addr", "add", &format!("{AGENT_ADDRESS}/32"), "dev", "lo"])?;
    ip(&["addr", "add", &format!("{CLUSTER_IP}/32"), "dev", "lo"])?;
    let api_port: u16 = c.server.rsplit(':').next().unwrap().parse()?;
    tokio::spawn(testbed::netns::forward(net.listen(api_port)?, move || {
        TcpStream::connect(("127.0.0.1", api_port))
    }));
    {
        let path = ns_path.clone();
        std::thread::spawn(move || {
            enter(&path);
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(app_server());
        });
    }
    let nsenter = PathBuf::from("/usr/bin/nsenter");
    let net_arg = format!("--net={}", ns_path.display());

    // KEDA's interceptor, in a mount namespace of its own whose /etc/hosts
    // names the KEDA apps' Services.
    let hosts = c.dir.join("keda-hosts");
    std::fs::write(&hosts, format!("127.0.0.1 localhost\n{CLUSTER_IP} web.{KEDA_NS} web.{KEDA_HOLD_NS}\n"))?;
    let keda_admin = free_port()?;
    tokio::spawn(testbed::netns::forward(
        TcpListener::bind(("127.0.0.1", keda_admin))?,
        net.connector(KEDA_ADMIN_PORT),
    ));
    let keda_env: Vec<(String, String)> = [
        ("KUBECONFIG", c.admin.kubeconfig.display().to_string()),
        ("KEDA_HTTP_CURRENT_NAMESPACE", KEDA_NS.into()),
        ("KEDA_HTTP_PROXY_PORT", KEDA_PROXY_PORT.to_string()),
        ("KEDA_HTTP_ADMIN_PORT", KEDA_ADMIN_PORT.to_string()),
        ("KEDA_HTTP_OTEL_PROM_EXPORTER_ENABLED", "false".into()),
        // Long enough for the slowest cold start and for the held requests.
        ("KEDA_CONDITION_WAIT_TIMEOUT", "600s".into()),
        ("NO_PROXY", "*".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let mut keda = testbed::spawner::spawn_with_env(
        "keda-interceptor",
        &nsenter,
        &[
            net_arg.clone(),
            "--".into(),
            "unshare".into(),
            "-m".into(),
            "sh".into(),
            "-c".into(),
            "mount --bind \"$0\" /etc/hosts && exec \"$1\"".into(),
            hosts.display().to_string(),
            keda_dir.join("interceptor").display().to_string(),
        ],
        &keda_env,
        &c.dir,
    )?;
    keda.wait_ready(Duration::from_secs(60), || http_ok(keda_admin, "/queue"))?;

    // dormant's agent, serving app traffic on AGENT_ADDRESS.
    let user = c.user("dormant-bench", &["system:masters"])?;
    let (admin_port, admin_host) = (free_port()?, free_port()?);
    tokio::spawn(testbed::netns::forward(
        TcpListener::bind(("127.0.0.1", admin_host))?,
        net.connector(admin_port),
    ));
    let args: Vec<String> = vec![
        net_arg.clone(),
        "--".into(),
        env!("CARGO_BIN_EXE_dormant").into(),
        "agent".into(),
        "--namespace=dormant".into(),
        "--identity=bench".into(),
        format!("--admin-addr=127.0.0.1:{admin_port}"),
        "--namespace-selector=dormant-bench=app".into(),
        "--default-wake-timeout=1h".into(),
        "--app-traffic-addr=0.0.0.0".into(),
        format!("--app-traffic-advertise={AGENT_ADDRESS}"),
        "--app-traffic-ports=20000-20099".into(),
    ];
    let env = vec![
        ("KUBECONFIG".to_string(), user.kubeconfig.display().to_string()),
        ("RUST_LOG".to_string(), "info".to_string()),
    ];
    let mut agent: Proc = testbed::spawner::spawn_with_env("dormant-agent", &nsenter, &args, &env, &c.dir)?;
    agent.wait_ready(Duration::from_secs(60), || http_ok(admin_host, "/readyz"))?;
    // Both of dormant's apps asleep, each Service held.
    for ns in [DORMANT_NS, DORMANT_HOLD_NS] {
        kubectl(
            &c,
            &["annotate", "namespace", ns, "dormant.dev/sleep-after=1h", "dormant.dev/force-sleep=true"],
        );
    }
    let held = wait_for(&mut dormant_ready, "dormant's app held", |r| r.own == 0 && r.held.is_some()).await;
    let hold_held = wait_for(&mut hold_ready, "dormant's never-ready app held", |r| r.held.is_some()).await;
    let mut last_held = held.held.unwrap();

    let keda_addr: SocketAddr = format!("127.0.0.1:{KEDA_PROXY_PORT}").parse()?;
    // The interceptor routes once its table has the HTTPScaledObjects
    // (404 until then): wait for the app's answer through it, once.
    scale(&c, KEDA_NS, 1);
    wait_for(&mut keda_ready, "KEDA's app ready", |r| r.own > 0).await;
    let start = Instant::now();
    loop {
        let (_, answer) = tokio::task::block_in_place(|| get(&ns_path, keda_addr, KEDA_HOST).join().unwrap());
        if answer.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "KEDA's interceptor does not route: {answer}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    scale(&c, KEDA_NS, 0);

    println!("\n## Cold start, {rounds} rounds each (ms: min / median / max)\n");
    let (mut keda_cold, mut dormant_cold, mut dormant_total) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        // KEDA: a request waits in the interceptor; the app is scaled up as
        // KEDA's operator would.
        wait_for(&mut keda_ready, "KEDA's app at zero", |r| r.own == 0).await;
        let req = get(&ns_path, keda_addr, KEDA_HOST);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!req.is_finished(), "KEDA answered before the app was up: {:?}", req.join().unwrap());
        scale(&c, KEDA_NS, 1);
        let ready = wait_for(&mut keda_ready, "KEDA's app ready", |r| r.own > 0).await.since.unwrap();
        let (at, answer) = tokio::task::spawn_blocking(move || req.join().unwrap()).await?;
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.contains("hello from the app"),
            "KEDA: {answer}"
        );
        keda_cold.push(ms_between(ready, at));
        scale(&c, KEDA_NS, 0);

        // dormant: the request to the held Service wakes the namespace.
        let asleep =
            wait_for(&mut dormant_ready, "dormant's app held", |r| r.own == 0 && r.held.is_some()).await;
        let sent = Instant::now();
        last_held = asleep.held.unwrap();
        let req = get(&ns_path, last_held, DORMANT_HOST);
        let ready = wait_for(&mut dormant_ready, "dormant's app ready", |r| r.own > 0).await.since.unwrap();
        let (at, answer) = tokio::task::spawn_blocking(move || req.join().unwrap()).await?;
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.contains("hello from the app"),
            "dormant: {answer}"
        );
        dormant_cold.push(ms_between(ready, at));
        dormant_total.push(ms_between(sent, at));
        eprintln!(
            "[bench] round {round}: KEDA {:.0} ms, dormant {:.0} ms (whole request {:.0} ms)",
            keda_cold[round], dormant_cold[round], dormant_total[round]
        );
        if round + 1 < rounds {
            let c2 = &c;
            tokio::task::block_in_place(|| sleep_dormant_app(c2));
        }
    }
    println!("| path | endpoint ready → first answer | first request → answer |");
    println!("| --- | ---: | ---: |");
    println!("| KEDA HTTP add-on v0.8.0 interceptor | {} | (scaled by the benchmark) |", summary(&keda_cold));
    println!("| dormant (EndpointSlice hold) | {} | {} |", summary(&dormant_cold), summary(&dormant_total));

    // Warm: dormant's app was just woken by the last round, so its port
    // lingers (30 s) and wrk's keep-alive connections, opened at once, go
    // on through it after.
    let wrk: Vec<String> = vec![nsenter.display().to_string(), net_arg.clone(), which("wrk")];
    let (through_dormant, dormant_cpu) = tokio::task::block_in_place(|| {
        measure(&wrk, &format!("http://{last_held}/"), DORMANT_HOST, seconds, Some(agent.pid()))
    });
    scale(&c, KEDA_NS, 1);
    wait_for(&mut keda_ready, "KEDA's app ready", |r| r.own > 0).await;
    let pod = format!("http://{}:{APP_PORT}/", jsonpath_pod_ip(&c, DORMANT_NS));
    let (direct, _) = tokio::task::block_in_place(|| measure(&wrk, &pod, DORMANT_HOST, seconds, None));
    let (through_keda, keda_cpu) = tokio::task::block_in_place(|| {
        measure(&wrk, &format!("http://{keda_addr}/"), KEDA_HOST, seconds, Some(keda.pid()))
    });
    println!("\n## Warm, wrk -t2 -c32 -d{seconds}s, HTTP/1.1 keep-alive, one run each\n");
    println!(
        "| {:<38} | {:>9} | {:>7} | {:>7} | {:>13} | {:>11} |",
        "path", "req/s", "p50 ms", "p99 ms", "added p99 ms", "proxy µs/req"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    row("direct to the pod", &direct, None, None);
    row("KEDA interceptor (always in the path)", &through_keda, Some(&direct), keda_cpu);
    row("dormant listener (asleep + 30 s only)", &through_dormant, Some(&direct), dormant_cpu);
    row("dormant, app awake (= direct)", &direct, Some(&direct), Some(0.0));

    // Memory per held request: apps that never get ready.
    let (kb, kf, kper) = tokio::task::block_in_place(|| {
        memory_per_held(&ns_path, keda.pid(), keda_addr, KEDA_HOLD_HOST, n_held)
    });
    let hold_addr = hold_held.held.unwrap();
    let (db, df, dper) = tokio::task::block_in_place(|| {
        memory_per_held(&ns_path, agent.pid(), hold_addr, DORMANT_HOST, n_held)
    });
    println!("\n## Memory per held request ({n_held} held, none answered)\n");
    println!("| proxy | RSS before (MiB) | RSS holding (MiB) | KiB per held request |");
    println!("| --- | ---: | ---: | ---: |");
    println!("| KEDA interceptor | {:.1} | {:.1} | {kper:.1} |", kb as f64 / 1024.0, kf as f64 / 1024.0);
    println!("| dormant agent | {:.1} | {:.1} | {dper:.1} |", db as f64 / 1024.0, df as f64 / 1024.0);
    STOPPING.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(keda);
    drop(agent);
    Ok(())
}

/// The IP of dormant's app's one pod.
fn jsonpath_pod_ip(c: &Cluster, ns: &str) -> String {
    let ip =
        kubectl(c, &["get", "pods", "-n", ns, "-l", "app=web", "-o", "jsonpath={.items[0].status.podIP}"]);
    assert!(ip.starts_with("10.244."), "pod IP {ip:?}");
    ip
}
