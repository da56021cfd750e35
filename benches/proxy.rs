//! Benchmark: the wake-on-request proxy, side by side with nginx and
//! haproxy in one run.
//!
//! `hack/bench-proxy.sh` (installs nginx-light, haproxy and wrk from
//! Debian, then runs `cargo bench --bench proxy`). Prints:
//! - throughput and latency (wrk, HTTPS, keep-alive) against one upstream
//!   (nginx serving a small JSON body over TLS, standing in for an API
//!   server that answers instantly): directly, through nginx, through
//!   haproxy, through dormant (with activity recording on);
//! - wake overhead: from the moment the vcluster's API server first
//!   answers to the moment the held request is answered, minus that
//!   request's direct latency, over repeated sleep/wake cycles;
//! - memory per waiting request: the agent's RSS with thousands of
//!   requests held for a vcluster that cannot wake.
//!
//! `DORMANT_BENCH_THROUGHPUT_ONLY=1` stops after the throughput table (for
//! profiling the proxy's hot path); `DORMANT_BENCH_MEMORY_ONLY=1` measures
//! only the memory per waiting request.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use anyhow::Context;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use testbed::process::{free_port, http_ok, rss_kib};
use testbed::vcluster::{VCluster, VClusterOptions};
use testbed::{Cluster, ClusterOptions};

fn which(bin: &str) -> String {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/bin", "/sbin"] {
        let p = format!("{dir}/{bin}");
        if std::path::Path::new(&p).exists() {
            return p;
        }
    }
    panic!("{bin} is not installed; run hack/bench-proxy.sh (it installs nginx-light, haproxy and wrk)");
}

struct Wrk {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn parse_ms(v: &str) -> f64 {
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

fn wrk(url: &str, headers: &[&str], seconds: u32) -> Wrk {
    let mut cmd = Command::new(which("wrk"));
    cmd.args(["-t2", "-c32", &format!("-d{seconds}s"), "--latency"]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd.arg(url).output().unwrap();
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
        let mut curl = Command::new("curl");
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
    Wrk { rps, p50_ms: parse_ms(&find("50%")), p99_ms: parse_ms(&find("99%")) }
}

/// Ready replicas of StatefulSet `bench/<name>`.
fn jsonpath_ready(c: &Cluster, name: &str) -> i64 {
    c.kubectl_out(
        &c.admin,
        &["get", "statefulset", name, "-n", "bench", "-o", "jsonpath={.status.readyReplicas}"],
    )
    .ok()
    .and_then(|s| s.trim().parse().ok())
    .unwrap_or(0)
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    dormant::tls::install_default_provider();
    let c = Arc::new(tokio::task::spawn_blocking(|| Cluster::start(ClusterOptions::default())).await??);
    c.kubectl_apply(&c.admin, &dormant::cli::crd_yaml()?)?;
    c.wait_established("sleeppolicies.dormant.dev")?;
    for ns in ["dormant", "bench"] {
        c.kubectl_out(&c.admin, &["create", "namespace", ns]).ok();
    }
    let dir = tempfile::tempdir()?;
    let crt = c.dir.join("apiserver.crt");
    let key = c.dir.join("apiserver.key");

    // The upstream: nginx answering a small JSON body over TLS.
    let up_port = free_port()?;
    let (nginx_port, haproxy_port, proxy_port, admin_port) =
        (free_port()?, free_port()?, free_port()?, free_port()?);
    let nginx_conf = format!(
        "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d};\n  proxy_temp_path {d};\n  upstream api {{ server 127.0.0.1:{up_port}; keepalive 64; }}\n  server {{ listen 127.0.0.1:{up_port} ssl; ssl_certificate {crt}; ssl_certificate_key {key}; location / {{ default_type application/json; return 200 '{{\"major\":\"1\",\"minor\":\"37\",\"gitVersion\":\"v1.37.2\"}}'; }} }}\n  server {{ listen 127.0.0.1:{nginx_port} ssl; ssl_certificate {crt}; ssl_certificate_key {key};\n    location / {{ proxy_pass https://api; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_ssl_session_reuse on; }} }}\n}}\n",
        d = dir.path().display(),
        crt = crt.display(),
        key = key.display()
    );
    std::fs::write(dir.path().join("nginx.conf"), nginx_conf)?;
    let _nginx = Stopped(
        Command::new(which("nginx"))
            .args(["-c", &dir.path().join("nginx.conf").display().to_string(), "-e", "stderr"])
            .stderr(Stdio::null())
            .spawn()?,
    );
    std::fs::write(
        dir.path().join("haproxy.pem"),
        format!("{}{}", std::fs::read_to_string(&crt)?, std::fs::read_to_string(&key)?),
    )?;
    let haproxy_conf = format!(
        "global\n  maxconn 4096\n  nbthread 1\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  http-reuse always\nfrontend f\n  bind 127.0.0.1:{haproxy_port} ssl crt {pem}\n  default_backend b\nbackend b\n  server api 127.0.0.1:{up_port} ssl verify none\n",
        pem = dir.path().join("haproxy.pem").display()
    );
    std::fs::write(dir.path().join("haproxy.cfg"), haproxy_conf)?;
    let _haproxy = Stopped(
        Command::new(which("haproxy"))
            .args(["-f", &dir.path().join("haproxy.cfg").display().to_string()])
            .stderr(Stdio::null())
            .spawn()?,
    );

    // A vcluster target whose upstream is that nginx (the vc Secret carries the testbed CA).
    c.kubectl_apply(
        &c.admin,
        &format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: vc-fast, namespace: bench}}\nstringData:\n  certificate-authority: {}\n---\napiVersion: apps/v1\nkind: StatefulSet\nmetadata:\n  name: fast\n  namespace: bench\n  labels: {{app: vcluster, release: fast}}\n  annotations: {{dormant.dev/upstream: \"https://127.0.0.1:{up_port}\", dormant.dev/sleep-after: 1h}}\nspec:\n  replicas: 1\n  serviceName: fast\n  selector: {{matchLabels: {{app: vcluster, release: fast}}}}\n  template:\n    metadata: {{labels: {{app: vcluster, release: fast}}}}\n    spec: {{containers: [{{name: c, image: x}}]}}\n",
            serde_json::to_string(&c.ca.cert_pem)?
        ),
    )?;
    let user = c.user("dormant-bench", &["system:masters"])?;
    let args: Vec<String> = vec![
        "agent".into(),
        "--namespace=dormant".into(),
        format!("--admin-addr=127.0.0.1:{admin_port}"),
        format!("--proxy-addr=127.0.0.1:{proxy_port}"),
        format!("--proxy-cert={}", crt.display()),
        format!("--proxy-key={}", key.display()),
        "--proxy-max-waiting=20000".into(),
    ];
    let env = vec![
        ("KUBECONFIG".into(), user.kubeconfig.display().to_string()),
        ("RUST_LOG".into(), "warn,dormant::proxy=info".into()),
        // One thread, as nginx (worker_processes 1) and haproxy (nbthread 1)
        // get: the comparison is per core.
        ("TOKIO_WORKER_THREADS".into(), "1".into()),
    ];
    let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_dormant"));
    let mut agent = testbed::spawner::spawn_with_env("dormant-proxy-bench", &bin, &args, &env, &c.dir)?;
    agent.wait_ready(Duration::from_secs(60), || http_ok(admin_port, "/readyz"))?;
    tokio::time::sleep(Duration::from_secs(3)).await;

    if std::env::var_os("DORMANT_BENCH_MEMORY_ONLY").is_some() {
        agent.kill();
        println!("| measure | value |\n| --- | --- |");
        held_memory(&c, &bin, &args, &env, proxy_port, admin_port).await?.print();
        return Ok(());
    }

    // The target must be up (its kwok pod Ready) before it is measured.
    let t = Instant::now();
    while jsonpath_ready(&c, "fast") < 1 {
        anyhow::ensure!(t.elapsed() < Duration::from_secs(120), "statefulset bench/fast never became Ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // 1. Throughput and latency, side by side. A path that counts as use,
    // so dormant records activity for every request.
    let auth = "Authorization: Bearer bench";
    let secs = 15;
    let path = "/api/v1/namespaces/default/configmaps";
    let direct = wrk(&format!("https://127.0.0.1:{up_port}{path}"), &[auth], secs);
    let via_nginx = wrk(&format!("https://127.0.0.1:{nginx_port}{path}"), &[auth], secs);
    let via_haproxy = wrk(&format!("https://127.0.0.1:{haproxy_port}{path}"), &[auth], secs);
    let via_dormant =
        wrk(&format!("https://127.0.0.1:{proxy_port}/vcluster/bench/fast{path}"), &[auth], secs);
    let via_dormant_quiet = wrk(
        &format!("https://127.0.0.1:{proxy_port}/vcluster/bench/fast{path}"),
        &[auth, "X-Dormant-Ignore: true"],
        secs,
    );
    let agent_rss_load = rss_kib(agent.pid());
    if std::env::var_os("DORMANT_BENCH_THROUGHPUT_ONLY").is_some() {
        print_throughput(secs, &[&direct, &via_nginx, &via_haproxy, &via_dormant, &via_dormant_quiet]);
        println!("| agent RSS under the throughput run | {:.1} MiB |", agent_rss_load as f64 / 1024.0);
        return Ok(());
    }

    // 2. Wake overhead on a real (stand-in) vcluster.
    let vc = VCluster::create(
        &c,
        "bench",
        "real",
        VClusterOptions {
            annotations: vec![("dormant.dev/sleep-after".into(), "1h".into())],
            ..Default::default()
        },
    )?;
    vc.wait_serving(&c, Duration::from_secs(60))?;
    let proxy_kc = dir.path().join("proxy.kubeconfig");
    let out = Command::new(&bin)
        .args([
            "kubeconfig",
            "bench/real",
            "--server",
            &format!("https://127.0.0.1:{proxy_port}"),
            "--proxy-ca",
        ])
        .arg(&c.ca_file)
        .arg("-o")
        .arg(&proxy_kc)
        .env("KUBECONFIG", &c.admin.kubeconfig)
        .output()?;
    anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let via = testbed::client_from_kubeconfig(&proxy_kc).await?;
    let sts: kube::Api<k8s_openapi::api::apps::v1::StatefulSet> =
        kube::Api::namespaced(c.client().await?, "bench");
    let ready_replicas = |s: &k8s_openapi::api::apps::v1::StatefulSet| {
        s.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0)
    };
    let mut overheads = Vec::new();
    let mut ready_to_serving = Vec::new();
    let cycles = 15;
    for _ in 0..cycles {
        let o = Command::new(&bin)
            .args(["sleep", "vcluster/bench/real", "--wait=60s"])
            .env("KUBECONFIG", &c.admin.kubeconfig)
            .output()?;
        anyhow::ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        while vc.is_serving() || ready_replicas(&sts.get("real").await?) > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // A watch notes when the control plane is Ready, as Kubernetes
        // reports it (what dormant's own watch waits for)…
        let ready_watch = {
            use futures::StreamExt;
            use kube::runtime::{WatchStreamExt, watcher};
            let stream = watcher(sts.clone(), watcher::Config::default().fields("metadata.name=real"))
                .applied_objects();
            tokio::spawn(async move {
                futures::pin_mut!(stream);
                while let Some(item) = stream.next().await {
                    if let Ok(s) = item
                        && ready_replicas(&s) > 0
                    {
                        return Instant::now();
                    }
                }
                Instant::now()
            })
        };
        // …and a prober when its API server is ready (/readyz 200).
        // Fresh direct clients each cycle: the last cycle's pooled
        // connections died with the API server they went to.
        let direct_client = testbed::client_from_kubeconfig(&vc.kubeconfig).await?;
        let prober_client = direct_client.clone();
        let prober = tokio::spawn(async move {
            // Ready to serve everyone: /readyz 200 (a starting kube-apiserver
            // answers some requests earlier, before its RBAC roles are
            // loaded; the proxy does not release held requests into that).
            loop {
                let req = http::Request::get("/readyz").body(Vec::new()).unwrap();
                if prober_client.request_text(req).await.is_ok() {
                    return Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        let api: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(via.clone());
        let sent = Instant::now();
        api.get("default").await.context("a request held through the wake")?;
        let answered = Instant::now();
        let serving_at = prober.await?;
        let ready_at = ready_watch.await?;
        let ms = |t: Instant| t.saturating_duration_since(sent).as_secs_f64() * 1000.0;
        eprintln!(
            "wake: Ready seen +{:.1} ms, /readyz 200 +{:.1} ms, answered +{:.1} ms after the request was sent",
            ms(ready_at),
            ms(serving_at),
            ms(answered)
        );
        ready_to_serving.push(if serving_at >= ready_at {
            serving_at.duration_since(ready_at).as_secs_f64() * 1000.0
        } else {
            -(ready_at.duration_since(serving_at).as_secs_f64() * 1000.0)
        });
        // Both must hold before the request can be answered.
        let up_at = serving_at.max(ready_at);
        let t = Instant::now();
        kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(direct_client.clone())
            .get("default")
            .await
            .context("the same request, direct")?;
        let direct_latency = t.elapsed();
        // Signed: below zero when the held request was answered before the
        // benchmark's own watch or prober noticed.
        let after_up = if answered >= up_at {
            answered.duration_since(up_at).as_secs_f64()
        } else {
            -up_at.duration_since(answered).as_secs_f64()
        };
        overheads.push((after_up - direct_latency.as_secs_f64()) * 1000.0);
    }

    // The proxy's own account of each wake, for the record.
    for line in std::fs::read_to_string(&agent.log).unwrap_or_default().lines() {
        if line.contains("releasing held requests") {
            eprintln!("{line}");
        }
    }
    agent.kill();
    let held = held_memory(&c, &bin, &args, &env, proxy_port, admin_port).await?;

    print_throughput(secs, &[&direct, &via_nginx, &via_haproxy, &via_dormant, &via_dormant_quiet]);
    println!("\n| measure | value |\n| --- | --- |");
    let mut o = overheads.clone();
    println!(
        "| wake overhead (control plane Ready and its API server's /readyz 200 → the held request answered through the proxy, minus its direct latency), p50 / p99 / max over {cycles} wakes | {:.1} / {:.1} / {:.1} ms |",
        percentile(&mut o, 0.5),
        percentile(&mut o, 0.99),
        o.last().copied().unwrap_or_default()
    );
    let mut r = ready_to_serving.clone();
    println!(
        "| for reference: control plane Ready → its API server's /readyz 200, p50 / min / max | {:.1} / {:.1} / {:.1} ms |",
        percentile(&mut r, 0.5),
        r.first().copied().unwrap_or_default(),
        r.last().copied().unwrap_or_default()
    );
    println!("| agent RSS under the throughput run | {:.1} MiB |", agent_rss_load as f64 / 1024.0);
    held.print();
    drop(vc);
    Ok(())
}

/// Agent RSS with many requests held for a vcluster that cannot wake (its
/// pod fits no node): each on its own HTTP/1.1 TLS connection, then as
/// HTTP/2 streams. Each on a fresh agent, so memory freed earlier is not
/// reused.
async fn held_memory(
    c: &Cluster,
    bin: &std::path::Path,
    args: &[String],
    env: &[(String, String)],
    proxy_port: u16,
    admin_port: u16,
) -> anyhow::Result<HeldMemory> {
    c.kubectl_apply(
        &c.admin,
        "apiVersion: v1\nkind: Secret\nmetadata: {name: vc-stuck, namespace: bench}\nstringData: {certificate-authority: x}\n---\napiVersion: apps/v1\nkind: StatefulSet\nmetadata:\n  name: stuck\n  namespace: bench\n  labels: {app: vcluster, release: stuck}\n  annotations: {dormant.dev/sleep-after: 1h}\nspec:\n  replicas: 0\n  serviceName: stuck\n  selector: {matchLabels: {app: vcluster, release: stuck}}\n  template:\n    metadata: {labels: {app: vcluster, release: stuck}}\n    spec: {nodeSelector: {no: node}, containers: [{name: c, image: x}]}\n",
    )?;
    let metric = || {
        testbed::process::http_body(admin_port, "/metrics")
            .lines()
            .find(|l| l.starts_with("dormant_proxy_waiting_requests "))
            .and_then(|l| l.split(' ').nth(1)?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let mut agent = testbed::spawner::spawn_with_env("dormant-proxy-bench-h1", bin, args, env, &c.dir)?;
    agent.wait_ready(Duration::from_secs(60), || http_ok(admin_port, "/readyz"))?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = rss_kib(agent.pid());
    let waiting = 5000;
    let mut holders = Vec::new();
    for _ in 0..waiting {
        let port = proxy_port;
        holders.push(tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let Ok(mut tls) = connect_unverified(port, b"http/1.1").await else { return };
            let _ = tls
                .write_all(
                    b"GET /vcluster/bench/stuck/api HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\n\r\n",
                )
                .await;
            let mut buf = [0u8; 64];
            let _ = tls.read(&mut buf).await;
        }));
    }
    // Wait until they are all held.
    let start = Instant::now();
    while metric() < waiting as f64 * 0.99 && start.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let held = metric();
    let after = rss_kib(agent.pid());
    for h in holders {
        h.abort();
    }
    agent.kill();

    // The same over HTTP/2, as one client process sends concurrent requests
    // (client-go multiplexes them on one connection): 25 connections of 200
    // streams, each stream a held request; then as many processes would,
    // each with a connection of its own.
    let h2 = held_h2(c, bin, args, env, (proxy_port, admin_port), (25, 200), &metric).await?;
    let h2_own = held_h2(c, bin, args, env, (proxy_port, admin_port), (5000, 1), &metric).await?;
    Ok(HeldMemory { h1: (held, before, after), h2, h2_own })
}

/// Requests held as HTTP/2 streams, `streams` on each of `connections`, on
/// a fresh agent: (held, RSS before, RSS after in KiB).
async fn held_h2(
    c: &Cluster,
    bin: &std::path::Path,
    args: &[String],
    env: &[(String, String)],
    (proxy_port, admin_port): (u16, u16),
    (connections, streams): (usize, usize),
    metric: &impl Fn() -> f64,
) -> anyhow::Result<(f64, u64, u64)> {
    let mut agent = testbed::spawner::spawn_with_env("dormant-proxy-bench-h2", bin, args, env, &c.dir)?;
    agent.wait_ready(Duration::from_secs(60), || http_ok(admin_port, "/readyz"))?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = rss_kib(agent.pid());
    let mut holders = Vec::new();
    for _ in 0..connections {
        let tls = connect_unverified(proxy_port, b"h2").await?;
        let (send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await?;
        holders.push(tokio::spawn(async move {
            let _ = conn.await;
        }));
        for _ in 0..streams {
            let mut send = send.clone();
            holders.push(tokio::spawn(async move {
                let req = http::Request::get("https://127.0.0.1/vcluster/bench/stuck/api")
                    .header(http::header::AUTHORIZATION, "Bearer t")
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                    .unwrap();
                let _ = send.send_request(req).await;
            }));
        }
    }
    let waiting = (connections * streams) as f64;
    let start = Instant::now();
    while metric() < waiting * 0.99 && start.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let held = metric();
    let after = rss_kib(agent.pid());
    for h in holders {
        h.abort();
    }
    agent.kill();
    Ok((held, before, after))
}

/// Requests held, and RSS (KiB) before and after, per protocol.
struct HeldMemory {
    h1: (f64, u64, u64),
    h2: (f64, u64, u64),
    h2_own: (f64, u64, u64),
}

impl HeldMemory {
    fn print(&self) {
        let rows = [
            ("each on its own HTTP/1.1 TLS connection", self.h1),
            ("HTTP/2 streams on 25 connections", self.h2),
            ("each on its own HTTP/2 TLS connection", self.h2_own),
        ];
        for (how, (held, before, after)) in rows {
            println!(
                "| memory per waiting request, {how} ({held:.0} held) | {:.1} KiB (RSS {:.1} → {:.1} MiB) |",
                after.saturating_sub(before) as f64 / held.max(1.0),
                before as f64 / 1024.0,
                after as f64 / 1024.0
            );
        }
    }
}

/// The side-by-side table: direct, nginx, haproxy, dormant on and off.
fn print_throughput(secs: u32, runs: &[&Wrk; 5]) {
    println!(
        "\n## proxy: side by side on loopback (wrk -t2 -c32 -d{secs}s, HTTPS keep-alive, 2 cores shared by all)\n"
    );
    println!("| path | requests/s | p50 | p99 | added p50 | added p99 |");
    println!("| --- | --- | --- | --- | --- | --- |");
    let direct = runs[0];
    let names = [
        "direct to upstream",
        "nginx",
        "haproxy",
        "dormant (activity on)",
        "dormant (activity off: X-Dormant-Ignore)",
    ];
    for (name, w) in names.iter().zip(runs) {
        println!(
            "| {name} | {:.0} | {:.2} ms | {:.2} ms | {:+.2} ms | {:+.2} ms |",
            w.rps,
            w.p50_ms,
            w.p99_ms,
            w.p50_ms - direct.p50_ms,
            w.p99_ms - direct.p99_ms
        );
    }
}

/// A TLS connection to the proxy on 127.0.0.1:`port` offering `alpn`, not
/// verifying its certificate (memory is measured here, not trust).
async fn connect_unverified(
    port: u16,
    alpn: &[u8],
) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut config = rustls::ClientConfig::builder_with_provider(dormant::tls::provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoVerify))
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(rustls_pki_types::ServerName::try_from("127.0.0.1")?, tcp)
        .await?)
}

/// A comparison proxy, stopped (SIGTERM, so nginx's master takes its
/// worker with it) however the benchmark ends.
struct Stopped(std::process::Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

#[derive(Debug)]
struct NoVerify;

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        dormant::tls::provider().signature_verification_algorithms.supported_schemes()
    }
}
