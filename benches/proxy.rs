//! Benchmark: the wake-on-request proxy, side by side with nginx and
//! haproxy in one run.
//!
//! `hack/bench-proxy.sh` (installs nginx-light, haproxy, wrk and h2load
//! from Debian, then runs `cargo bench --bench proxy`). Prints:
//! - throughput and latency (wrk over HTTP/1.1, then h2load over HTTP/2;
//!   HTTPS, keep-alive) against one upstream
//!   (nginx serving a small JSON body over TLS, standing in for an API
//!   server that answers instantly): directly, through nginx, through
//!   haproxy, through dormant (with activity recording on);
//! - wake overhead: from the moment the vcluster's API server first
//!   answers to the moment the held request is answered, minus that
//!   request's direct latency, over repeated sleep/wake cycles;
//! - memory per waiting request, side by side: RSS with thousands of
//!   requests held by dormant for a vcluster that cannot wake, and by nginx
//!   and haproxy for an upstream that never answers; beside them the floor,
//!   the same TLS connections held with no HTTP at all (`--tls-floor`).
//!
//! `DORMANT_BENCH_THROUGHPUT_ONLY=1` stops after the throughput table (for
//! profiling the proxy's hot path); `DORMANT_BENCH_MEMORY_ONLY=1` measures
//! only the memory per waiting request; `DORMANT_BENCH_HOLD=1` sets up the
//! throughput run's upstream and proxies, prints their URLs and waits for
//! Ctrl-C (to drive load and profilers by hand). `DORMANT_BENCH_AGENT=path`
//! measures that build of the agent instead of this one's (an older
//! commit's, say, to tell a regression from a slower machine);
//! `DORMANT_BENCH_BASE_AGENT=path` measures that build beside this one's,
//! alternating, in the same run (after the side-by-side tables).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use anyhow::Context;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use testbed::bench::Throughput;
use testbed::process::{free_port, http_ok, rss_kib};
use testbed::vcluster::{VCluster, VClusterOptions};
use testbed::{Cluster, ClusterOptions};

fn which(bin: &str) -> String {
    testbed::bench::which(bin, "hack/bench-proxy.sh")
}

fn wrk(url: &str, headers: &[&str], seconds: u32) -> Throughput {
    testbed::bench::wrk(&[which("wrk")], url, headers, seconds)
}

/// h2load against `url` over HTTP/2 for `seconds`; latency percentiles
/// from its per-request log (it prints only mean and deviation).
fn h2load(url: &str, headers: &[&str], seconds: u32, dir: &std::path::Path) -> Throughput {
    let log = dir.join("h2load.log");
    let _ = std::fs::remove_file(&log);
    let mut cmd = Command::new(which("h2load"));
    cmd.args(["-t2", "-c8", "-m4", &format!("-D{seconds}"), "--warm-up-time=1"]);
    cmd.arg(format!("--log-file={}", log.display()));
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd.arg(url).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let rps = text
        .lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|v| v.strip_suffix(" req/s"))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    let mut ms: Vec<f64> = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f.get(1)? == &"200").then(|| f.get(2)?.parse::<f64>().ok().map(|us| us / 1000.0))?
        })
        .collect();
    let all_ok = text
        .lines()
        .any(|l| l.trim_start().starts_with("status codes:") && l.contains(" 0 3xx, 0 4xx, 0 5xx"))
        && text.lines().any(|l| {
            l.trim_start().starts_with("requests:") && l.contains(" 0 failed, 0 errored, 0 timeout")
        });
    if !all_ok || !rps.is_finite() || ms.is_empty() {
        panic!("h2load against {url} failed:\n{text}{}", String::from_utf8_lossy(&out.stderr));
    }
    Throughput { rps, p50_ms: percentile(&mut ms, 0.5), p99_ms: percentile(&mut ms, 0.99) }
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

/// `testbed::bench::percentile` of `v`, sorted here.
fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    testbed::bench::percentile(v, p)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    dormant::tls::install_default_provider();
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some(TLS_FLOOR_ARG) {
        return tls_floor(&argv[2..]).await;
    }
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
    // Each in a process of its own, one worker each, so the proxy in front
    // gets a core's worth as haproxy and dormant do. Neither closes a
    // keep-alive connection after 1,000 requests (nginx's default): an API
    // server (Go's net/http) never does, and a reconnect per 1,000 requests
    // would measure TLS handshakes, not proxying.
    let upstream_conf = format!(
        "worker_processes 1;\ndaemon off;\npid {d}/upstream.pid;\nerror_log {d}/upstream-error.log;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  keepalive_requests 1000000;\n  server {{ listen 127.0.0.1:{up_port} ssl http2; ssl_certificate {crt}; ssl_certificate_key {key}; location / {{ default_type application/json; return 200 '{{\"major\":\"1\",\"minor\":\"37\",\"gitVersion\":\"v1.37.2\"}}'; }} }}\n}}\n",
        d = dir.path().display(),
        crt = crt.display(),
        key = key.display()
    );
    let _upstream = nginx(dir.path(), "upstream", &upstream_conf)?;
    let nginx_conf = format!(
        "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  keepalive_requests 1000000;\n  client_body_temp_path {d};\n  proxy_temp_path {d};\n  upstream api {{ server 127.0.0.1:{up_port}; keepalive 64; keepalive_requests 1000000; }}\n  server {{ listen 127.0.0.1:{nginx_port} ssl http2; ssl_certificate {crt}; ssl_certificate_key {key};\n    location / {{ proxy_pass https://api; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_ssl_session_reuse on; }} }}\n}}\n",
        d = dir.path().display(),
        crt = crt.display(),
        key = key.display()
    );
    let _nginx = nginx(dir.path(), "nginx", &nginx_conf)?;
    std::fs::write(
        dir.path().join("haproxy.pem"),
        format!("{}{}", std::fs::read_to_string(&crt)?, std::fs::read_to_string(&key)?),
    )?;
    let haproxy_conf = format!(
        "global\n  maxconn 4096\n  nbthread 1\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  http-reuse always\nfrontend f\n  bind 127.0.0.1:{haproxy_port} ssl crt {pem} alpn h2,http/1.1\n  default_backend b\nbackend b\n  server api 127.0.0.1:{up_port} ssl verify none\n",
        pem = dir.path().join("haproxy.pem").display()
    );
    let _haproxy = haproxy(dir.path(), "haproxy", &haproxy_conf)?;

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
    // Another build of the agent, to compare two versions in one setup.
    let bin = std::env::var_os("DORMANT_BENCH_AGENT")
        .map_or_else(|| std::path::PathBuf::from(env!("CARGO_BIN_EXE_dormant")), std::path::PathBuf::from);
    // Thousands of held requests on their own connections: above the
    // default connection cap (1,024), which has its own test; a build from
    // before the cap (`DORMANT_BENCH_AGENT`) has no such flag.
    let help = Command::new(&bin).args(["agent", "--help"]).output()?;
    let mut args = args;
    if String::from_utf8_lossy(&help.stdout).contains("--proxy-max-connections") {
        args.push("--proxy-max-connections=20000".into());
    }
    let mut agent = testbed::spawner::spawn_with_env("dormant-proxy-bench", &bin, &args, &env, &c.dir)?;
    agent.wait_ready(Duration::from_secs(60), || http_ok(admin_port, "/readyz"))?;
    tokio::time::sleep(Duration::from_secs(3)).await;

    let memory = MemoryRun {
        c: &c,
        bin: &bin,
        args: &args,
        env: &env,
        proxy_port,
        admin_port,
        dir: dir.path(),
        crt: &crt,
        key: &key,
    };
    if std::env::var_os("DORMANT_BENCH_MEMORY_ONLY").is_some() {
        agent.kill();
        print_held(&held_memory(&memory).await?);
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
    if std::env::var_os("DORMANT_BENCH_HOLD").is_some() {
        println!("direct  https://127.0.0.1:{up_port}{path}");
        println!("nginx   https://127.0.0.1:{nginx_port}{path}");
        println!("haproxy https://127.0.0.1:{haproxy_port}{path}");
        println!("dormant https://127.0.0.1:{proxy_port}/vcluster/bench/fast{path} (pid {})", agent.pid());
        println!("header  {auth}; holding until interrupted");
        tokio::signal::ctrl_c().await?;
        return Ok(());
    }
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
    // The same over HTTP/2, as kubectl and client-go talk: 8 connections
    // with 4 streams each (32 requests in flight, as above).
    let h2 = |url: String, headers: &[&str]| h2load(&url, headers, secs, dir.path());
    let h2_runs = [
        h2(format!("https://127.0.0.1:{up_port}{path}"), &[auth]),
        h2(format!("https://127.0.0.1:{nginx_port}{path}"), &[auth]),
        h2(format!("https://127.0.0.1:{haproxy_port}{path}"), &[auth]),
        h2(format!("https://127.0.0.1:{proxy_port}/vcluster/bench/fast{path}"), &[auth]),
        h2(
            format!("https://127.0.0.1:{proxy_port}/vcluster/bench/fast{path}"),
            &[auth, "X-Dormant-Ignore: true"],
        ),
    ];
    let agent_rss_load = rss_kib(agent.pid());
    let print_both = || {
        print_throughput(
            &format!("wrk -t2 -c32 -d{secs}s, HTTP/1.1"),
            &[&direct, &via_nginx, &via_haproxy, &via_dormant, &via_dormant_quiet],
        );
        print_throughput(
            &format!("h2load -t2 -c8 -m4 -D{secs}, HTTP/2"),
            &[&h2_runs[0], &h2_runs[1], &h2_runs[2], &h2_runs[3], &h2_runs[4]],
        );
    };
    // `DORMANT_BENCH_BASE_AGENT=path`: another build beside this one, in
    // the same run, alternating (base, this, base, this) so that the
    // machine's drift hits both alike.
    if let Some(base) = std::env::var_os("DORMANT_BENCH_BASE_AGENT") {
        let (base_admin, base_proxy) = (free_port()?, free_port()?);
        let base_args: Vec<String> = args
            .iter()
            .map(|a| match a {
                a if a.starts_with("--admin-addr=") => format!("--admin-addr=127.0.0.1:{base_admin}"),
                a if a.starts_with("--proxy-addr=") => format!("--proxy-addr=127.0.0.1:{base_proxy}"),
                a => a.clone(),
            })
            .collect();
        let mut base_agent = testbed::spawner::spawn_with_env(
            "dormant-proxy-bench-base",
            std::path::Path::new(&base),
            &base_args,
            &env,
            &c.dir,
        )?;
        base_agent.wait_ready(Duration::from_secs(60), || http_ok(base_admin, "/readyz"))?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let url = |port: u16| format!("https://127.0.0.1:{port}/vcluster/bench/fast{path}");
        let mut rows = Vec::new();
        for round in 0..2 {
            for (name, port) in [("base build", base_proxy), ("this build", proxy_port)] {
                let w = wrk(&url(port), &[auth], secs);
                let h = h2load(&url(port), &[auth], secs, dir.path());
                rows.push((round, name, w, h));
            }
        }
        println!("\n## proxy: this build beside the base build (activity on, alternating, 2 rounds)\n");
        println!("| round | agent | HTTP/1.1 req/s | p50 | p99 | HTTP/2 req/s | p50 | p99 |");
        println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
        for (round, name, w, h) in &rows {
            println!(
                "| {} | {name} | {:.0} | {:.2} ms | {:.2} ms | {:.0} | {:.2} ms | {:.2} ms |",
                round + 1,
                w.rps,
                w.p50_ms,
                w.p99_ms,
                h.rps,
                h.p50_ms,
                h.p99_ms
            );
        }
        base_agent.kill();
    }
    if std::env::var_os("DORMANT_BENCH_THROUGHPUT_ONLY").is_some() {
        print_both();
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
            .args(["sleep", "vcluster/bench/real", "--wait=60s", "--direct"])
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
    let held = held_memory(&memory).await?;

    print_both();
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
    print_held(&held);
    drop(vc);
    Ok(())
}

/// What the memory measurement needs from the run: the agent's command
/// line, and the certificate the comparison proxies serve.
struct MemoryRun<'a> {
    c: &'a Cluster,
    bin: &'a std::path::Path,
    args: &'a [String],
    env: &'a [(String, String)],
    proxy_port: u16,
    admin_port: u16,
    dir: &'a std::path::Path,
    crt: &'a std::path::Path,
    key: &'a std::path::Path,
}

/// How held requests reach a proxy: `connections` TLS connections offering
/// `alpn`, each carrying `streams` requests (one for HTTP/1.1).
#[derive(Clone, Copy)]
struct Load {
    how: &'static str,
    alpn: &'static [u8],
    connections: usize,
    streams: usize,
}

const LOADS: [Load; 3] = [
    Load { how: "each on its own HTTP/1.1 TLS connection", alpn: b"http/1.1", connections: 5000, streams: 1 },
    Load { how: "each on its own HTTP/2 TLS connection", alpn: b"h2", connections: 5000, streams: 1 },
    // As one client process sends concurrent requests: client-go
    // multiplexes them on one connection. 100 streams per connection, the
    // most haproxy allows by default (nginx 128).
    Load { how: "HTTP/2, 100 streams on each of 50 connections", alpn: b"h2", connections: 50, streams: 100 },
];

/// The argument that makes this binary the floor for memory per held
/// connection: a server that accepts TLS connections as the proxy does
/// (`TCP_NODELAY`, TCP keepalive, tokio-rustls with the ring provider, the
/// proxy's ALPN) and only reads them, with no HTTP at all.
const TLS_FLOOR_ARG: &str = "--tls-floor";

async fn tls_floor(args: &[String]) -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt;
    let [port, crt, key] = args else { anyhow::bail!("usage: {TLS_FLOOR_ARG} PORT CRT KEY") };
    let (crt, key) = (std::path::Path::new(crt), std::path::Path::new(key));
    // The proxy's ALPN (`server_config` offers h2 and http/1.1).
    let config =
        dormant::tls::server_config(dormant::tls::read_certs(crt)?, dormant::tls::read_key(key)?, None)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port.parse::<u16>()?)).await?;
    loop {
        let tcp = dormant::tls::accept(&listener).await;
        dormant::tls::tune(&tcp);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(mut tls) = acceptor.accept(tcp).await else { return };
            let mut buf = [0u8; 64];
            while let Ok(1..) = tls.read(&mut buf).await {}
        });
    }
}

/// The floor for `load`: RSS per connection held by [`tls_floor`], in a
/// process of its own (this binary again, one worker thread).
async fn held_floor(run: &MemoryRun<'_>, load: Load) -> anyhow::Result<Held> {
    let port = free_port()?;
    let floor = Stopped(
        Command::new(std::env::current_exe()?)
            .args([
                TLS_FLOOR_ARG.into(),
                port.to_string(),
                run.crt.display().to_string(),
                run.key.display().to_string(),
            ])
            .env("TOKIO_WORKER_THREADS", "1")
            .stderr(Stdio::null())
            .spawn()?,
    );
    wait_listening(port).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = floor.0.id();
    let sockets = || std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0) as f64;
    let before = sockets();
    measure(|| rss_kib(pid), &|| sockets() - before, port, "/api", load, None).await
}

/// Requests held, and RSS (KiB) before and after.
#[derive(Clone, Copy, Default)]
struct Held {
    held: f64,
    before: u64,
    after: u64,
}

impl Held {
    fn cell(&self) -> String {
        format!(
            "{:.1} KiB ({:.0} held, RSS {:.1} → {:.1} MiB)",
            self.after.saturating_sub(self.before) as f64 / self.held.max(1.0),
            self.held,
            self.before as f64 / 1024.0,
            self.after as f64 / 1024.0
        )
    }
}

/// Memory per waiting request, side by side, for each way of holding:
/// dormant holding requests for a vcluster that cannot wake (its pod fits
/// no node); nginx and haproxy holding requests that their upstream, an
/// API server still starting, has taken but not answered. Every
/// measurement on a freshly started process, so memory freed by an earlier
/// one is not reused.
async fn held_memory(run: &MemoryRun<'_>) -> anyhow::Result<Vec<(Load, [Held; 3], Option<Held>)>> {
    // The stuck vcluster's CA, in its Secret as vcluster writes it: its
    // users wait with certificates it signed (proven while it sleeps).
    let ca = testbed::pki::Ca::new("stuck-vcluster-ca")?;
    let (admin, user) = (ca.client("admin", &["system:masters"])?, ca.client("bench-user", &["bench"])?);
    let indent = |pem: &str| pem.lines().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n");
    run.c.kubectl_apply(
        &run.c.admin,
        &format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: vc-stuck, namespace: bench}}\nstringData:\n  certificate-authority: |\n{}\n  client-certificate: |\n{}\n  client-key: |\n{}\n",
            indent(&ca.cert_pem),
            indent(&admin.cert_pem),
            indent(&admin.key_pem)
        ),
    )?;
    run.c.kubectl_apply(
        &run.c.admin,
        "apiVersion: apps/v1\nkind: StatefulSet\nmetadata:\n  name: stuck\n  namespace: bench\n  labels: {app: vcluster, release: stuck}\n  annotations: {dormant.dev/sleep-after: 1h}\nspec:\n  replicas: 0\n  serviceName: stuck\n  selector: {matchLabels: {app: vcluster, release: stuck}}\n  template:\n    metadata: {labels: {app: vcluster, release: stuck}}\n    spec: {nodeSelector: {no: node}, containers: [{name: c, image: x}]}\n",
    )?;
    let waiting = || {
        testbed::process::http_body(run.admin_port, "/metrics")
            .lines()
            .find(|l| l.starts_with("dormant_proxy_waiting_requests "))
            .and_then(|l| l.split(' ').nth(1)?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let mut rows = Vec::new();
    for load in LOADS {
        let mut agent = testbed::spawner::spawn_with_env(
            "dormant-proxy-bench-held",
            run.bin,
            run.args,
            run.env,
            &run.c.dir,
        )?;
        agent.wait_ready(Duration::from_secs(60), || http_ok(run.admin_port, "/readyz"))?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let pid = agent.pid();
        let dormant = measure(
            || rss_kib(pid),
            &waiting,
            run.proxy_port,
            "/vcluster/bench/stuck/api",
            load,
            Some(&user),
        )
        .await?;
        agent.kill();

        let mut others = [Held::default(); 2];
        for (i, other) in others.iter_mut().enumerate() {
            let upstream = SilentUpstream::start(run.crt, run.key).await?;
            let port = free_port()?;
            let proxy = if i == 0 {
                nginx(run.dir, "nginx-held", &nginx_held_conf(run, port, upstream.port))?
            } else {
                haproxy(run.dir, "haproxy-held", &haproxy_held_conf(run, port, upstream.port))?
            };
            wait_listening(port).await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let pid = proxy.0.id();
            let taken = || upstream.taken.load(std::sync::atomic::Ordering::Relaxed) as f64;
            *other = measure(|| tree_rss_kib(pid), &taken, port, "/api", load, None).await?;
        }
        // One connection per request: what TLS alone costs per connection.
        let floor = if load.streams == 1 { Some(held_floor(run, load).await?) } else { None };
        rows.push((load, [dormant, others[0], others[1]], floor));
    }
    Ok(rows)
}

fn print_held(rows: &[(Load, [Held; 3], Option<Held>)]) {
    println!(
        "\n| memory per waiting request | dormant | nginx | haproxy | floor: the TLS connection alone (tokio-rustls, no HTTP) |\n| --- | --- | --- | --- | --- |"
    );
    for (load, [d, n, h], floor) in rows {
        let floor = floor.as_ref().map_or("—".to_string(), Held::cell);
        println!("| {} | {} | {} | {} | {floor} |", load.how, d.cell(), n.cell(), h.cell());
    }
}

/// RSS before, sends `load` to 127.0.0.1:`port`, waits until `held` counts
/// (nearly) all of it, RSS after; then lets the requests go.
async fn measure(
    rss: impl Fn() -> u64,
    held: &impl Fn() -> f64,
    port: u16,
    path: &str,
    load: Load,
    client: Option<&testbed::pki::CertPair>,
) -> anyhow::Result<Held> {
    let before = rss();
    let holders = hold(port, path, load, client).await?;
    let want = (load.connections * load.streams) as f64;
    let start = Instant::now();
    while held() < want * 0.99 && start.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Connections still handshaking settle (what `held` counts may run ahead).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let held = held();
    let after = rss();
    for h in holders {
        h.abort();
    }
    Ok(Held { held, before, after })
}

/// Sends `load`: requests for `path` that wait for an answer, on
/// connections that present `client` when asked for a certificate (a
/// user dormant can prove while the vcluster sleeps: an unproven caller
/// is refused 401 at once, not held).
async fn hold(
    port: u16,
    path: &str,
    load: Load,
    client: Option<&testbed::pki::CertPair>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let config = unverified_config(load.alpn, client)?;
    let mut holders = Vec::new();
    for _ in 0..load.connections {
        if load.alpn == b"http/1.1" {
            let head = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
            let config = config.clone();
            holders.push(tokio::spawn(async move {
                let Ok(mut tls) = connect_unverified(port, config).await else { return };
                let _ = tls.write_all(head.as_bytes()).await;
                let mut buf = [0u8; 64];
                let _ = tls.read(&mut buf).await;
            }));
            continue;
        }
        let tls = connect_unverified(port, config.clone()).await?;
        let (send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await?;
        holders.push(tokio::spawn(async move {
            let _ = conn.await;
        }));
        for _ in 0..load.streams {
            let mut send = send.clone();
            let uri = format!("https://127.0.0.1{path}");
            holders.push(tokio::spawn(async move {
                let req = http::Request::get(uri).body(http_body_util::Empty::<bytes::Bytes>::new()).unwrap();
                let _ = send.send_request(req).await;
            }));
        }
    }
    Ok(holders)
}

/// An upstream that takes requests and never answers, as an API server
/// that is still starting would: what nginx and haproxy hold a waiting
/// request against. Counts the requests it has taken; stops on drop.
struct SilentUpstream {
    port: u16,
    taken: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl SilentUpstream {
    async fn start(crt: &std::path::Path, key: &std::path::Path) -> anyhow::Result<Self> {
        use tokio::io::AsyncReadExt;
        let mut config =
            dormant::tls::server_config(dormant::tls::read_certs(crt)?, dormant::tls::read_key(key)?, None)?;
        config.alpn_protocols.clear();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let taken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = taken.clone();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, counter) = (acceptor.clone(), counter.clone());
                connections.spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                    let (mut head, mut buf, mut counted) = (Vec::new(), [0u8; 4096], false);
                    while let Ok(n @ 1..) = tls.read(&mut buf).await {
                        if !counted {
                            head.extend_from_slice(&buf[..n]);
                            counted = head.windows(4).any(|w| w == b"\r\n\r\n");
                            if counted {
                                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                head = Vec::new();
                            }
                        }
                    }
                });
            }
        });
        Ok(Self { port, taken, task })
    }
}

impl Drop for SilentUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn nginx_held_conf(run: &MemoryRun<'_>, port: u16, upstream: u16) -> String {
    format!(
        "worker_processes 1;\nworker_rlimit_nofile 20000;\ndaemon off;\npid {d}/nginx-held.pid;\nerror_log {d}/nginx-held-error.log;\nevents {{ worker_connections 16000; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d};\n  proxy_temp_path {d};\n  upstream silent {{ server 127.0.0.1:{upstream}; }}\n  server {{ listen 127.0.0.1:{port} ssl http2; ssl_certificate {crt}; ssl_certificate_key {key};\n    location / {{ proxy_pass https://silent; proxy_http_version 1.1; proxy_read_timeout 600s; }} }}\n}}\n",
        d = run.dir.display(),
        crt = run.crt.display(),
        key = run.key.display()
    )
}

fn haproxy_held_conf(run: &MemoryRun<'_>, port: u16, upstream: u16) -> String {
    format!(
        "global\n  maxconn 6000\n  nbthread 1\ndefaults\n  mode http\n  maxconn 6000\n  timeout connect 5s\n  timeout client 600s\n  timeout server 600s\nfrontend f\n  bind 127.0.0.1:{port} ssl crt {pem} alpn h2,http/1.1\n  default_backend b\nbackend b\n  server silent 127.0.0.1:{upstream} ssl verify none\n",
        pem = run.dir.join("haproxy.pem").display()
    )
}

/// Starts nginx with `conf` (written to `name`.conf in `dir`).
fn nginx(dir: &std::path::Path, name: &str, conf: &str) -> anyhow::Result<Stopped> {
    let path = dir.join(format!("{name}.conf"));
    std::fs::write(&path, conf)?;
    Ok(Stopped(
        Command::new(which("nginx"))
            .args(["-c", &path.display().to_string(), "-e", "stderr"])
            .stderr(Stdio::null())
            .spawn()?,
    ))
}

/// Starts haproxy with `conf` (written to `name`.cfg in `dir`).
fn haproxy(dir: &std::path::Path, name: &str, conf: &str) -> anyhow::Result<Stopped> {
    let path = dir.join(format!("{name}.cfg"));
    std::fs::write(&path, conf)?;
    Ok(Stopped(
        Command::new(which("haproxy"))
            .args(["-f", &path.display().to_string()])
            .stderr(Stdio::null())
            .spawn()?,
    ))
}

/// Waits (up to 10 s) until something listens on 127.0.0.1:`port`.
async fn wait_listening(port: u16) -> anyhow::Result<()> {
    let start = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        anyhow::ensure!(start.elapsed() < Duration::from_secs(10), "nothing listens on port {port}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// RSS (KiB) of `pid` and its children (nginx's master and its worker).
fn tree_rss_kib(pid: u32) -> u64 {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    rss_kib(pid) + children.split_whitespace().filter_map(|c| c.parse().ok()).map(rss_kib).sum::<u64>()
}

/// The side-by-side table: direct, nginx, haproxy, dormant on and off.
fn print_throughput(load: &str, runs: &[&Throughput; 5]) {
    println!("\n## proxy: side by side on loopback ({load}, HTTPS keep-alive, 2 cores shared by all)\n");
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

/// A client that checks no server certificate (memory is measured here,
/// not trust), offers `alpn`, and presents `client`'s certificate to a
/// server that asks for one (dormant does; nginx and haproxy here do not).
fn unverified_config(
    alpn: &[u8],
    client: Option<&testbed::pki::CertPair>,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let builder = rustls::ClientConfig::builder_with_provider(dormant::tls::provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoVerify));
    let mut config = match client {
        Some(c) => builder.with_client_auth_cert(
            dormant::tls::certs_from_pem(c.cert_pem.as_bytes(), "client certificate")?,
            dormant::tls::key_from_pem(c.key_pem.as_bytes())?,
        )?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(config))
}

/// A TLS connection to the proxy on 127.0.0.1:`port` with `config`.
async fn connect_unverified(
    port: u16,
    config: Arc<rustls::ClientConfig>,
) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    Ok(tokio_rustls::TlsConnector::from(config)
        .connect(rustls_pki_types::ServerName::try_from("127.0.0.1")?, tcp)
        .await?)
}

/// A comparison proxy, stopped (SIGTERM, so nginx's master takes its
/// worker with it) however the benchmark ends.
struct Stopped(std::process::Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = testbed::process::signal(self.0.id(), libc::SIGTERM);
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
