//! Benchmark: the agent's memory under a tenant's abuse, with its resource
//! caps at their defaults and with them lifted, side by side in one run.
//!
//! `cargo bench --bench abuse`. Starts a testbed cluster, then for each
//! configuration a real `dormant agent` (audit webhook and proxy on
//! loopback, eight worker threads as on an eight-core node: the chart sets
//! no CPU limit), and measures its resident memory (sampled from /proc
//! every 10 ms) under:
//! - 40 senders posting, again and again for 10 s, a 16 KiB gzip body that
//!   inflates to 16 MiB (the issue-23 reproduction);
//! - 50 senders, half posting that bomb, half a 15.5 MiB gzip body of
//!   random bytes (stored, not compressed: as much is sent as inflated);
//! - 10,000 HTTP/2 connections to the proxy that complete their handshake,
//!   answer PINGs and send nothing.
//!
//! Configurations: `defaults` (this build, the chart's defaults); `caps
//! off` (this build, every cap raised out of reach and the body limit at
//! its old 16 MiB: what the agent did before the caps, as far as flags
//! can say); and, when `DORMANT_BENCH_BASE_AGENT=<path>` names another
//! build (say main before the caps), that build with its own defaults.
//! `DORMANT_BENCH_ABUSE_SECS` changes the 10 s.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use testbed::audit::AuditReceiver;
use testbed::process::{PeakRss, free_port, http_ok, rss_kib};
use testbed::{Cluster, ClusterOptions};

struct Config {
    name: &'static str,
    bin: PathBuf,
    flags: Vec<String>,
}

/// What one abuse did to one agent.
struct Run {
    before_kib: u64,
    peak_kib: u64,
    after_kib: u64,
    note: String,
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

struct Setup {
    c: Cluster,
    receiver: AuditReceiver,
    kubeconfig: PathBuf,
    _dir: tempfile::TempDir,
}

struct Agent {
    proc: testbed::process::Proc,
    admin_port: u16,
    proxy_port: u16,
}

fn start_agent(s: &Setup, cfg: &Config) -> anyhow::Result<Agent> {
    let admin_port = free_port()?;
    let proxy_port = free_port()?;
    let mut args: Vec<String> = vec![
        "agent".into(),
        "--namespace=dormant-bench".into(),
        format!("--admin-addr=127.0.0.1:{admin_port}"),
        format!("--proxy-addr=127.0.0.1:{proxy_port}"),
        format!("--proxy-cert={}", s.c.dir.join("apiserver.crt").display()),
        format!("--proxy-key={}", s.c.dir.join("apiserver.key").display()),
    ];
    args.extend(s.receiver.agent_flags());
    args.extend(cfg.flags.iter().cloned());
    let env = vec![
        ("KUBECONFIG".to_string(), s.kubeconfig.display().to_string()),
        ("RUST_LOG".to_string(), "warn".to_string()),
        ("TOKIO_WORKER_THREADS".to_string(), "8".to_string()),
    ];
    let mut proc = testbed::spawner::spawn_with_env("dormant-abuse-bench", &cfg.bin, &args, &env, &s.c.dir)?;
    proc.wait_ready(Duration::from_secs(60), || http_ok(admin_port, "/readyz"))?;
    Ok(Agent { proc, admin_port, proxy_port })
}

fn client_config(ca_pem: &str, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
    let roots =
        dormant::tls::root_store(&dormant::tls::certs_from_pem(ca_pem.as_bytes(), "ca").unwrap()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(dormant::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(config)
}

async fn tls(
    port: u16,
    config: &Arc<rustls::ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| e.to_string())?;
    tokio_rustls::TlsConnector::from(config.clone())
        .connect(rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())
}

/// Posts a gzip `body` to `/audit/host` in chunks with no length said up
/// front (so it cannot be refused by its length); the answer's status.
async fn post_gzip(port: u16, config: &Arc<rustls::ClientConfig>, token: &str, body: &[u8]) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = tls(port, config).await.ok()?;
    let head = format!(
        "POST /audit/host HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\ncontent-type: application/json\r\nauthorization: Bearer {token}\r\ncontent-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n"
    );
    let (mut rd, mut wr) = tokio::io::split(stream);
    let body = body.to_vec();
    let writer = tokio::spawn(async move {
        wr.write_all(head.as_bytes()).await?;
        for chunk in body.chunks(64 << 10) {
            wr.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).await?;
            wr.write_all(chunk).await?;
            wr.write_all(b"\r\n").await?;
        }
        wr.write_all(b"0\r\n\r\n").await?;
        wr.flush().await
    });
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(120), rd.read_to_end(&mut raw)).await;
    writer.abort();
    String::from_utf8_lossy(&raw).split_whitespace().nth(1)?.parse().ok()
}

fn gzip(data: &[u8], level: flate2::Compression) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), level);
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// `senders` posting `bombs[i % bombs.len()]` again and again for `secs`.
async fn bombard(s: &Setup, agent: &Agent, bombs: Arc<Vec<Vec<u8>>>, senders: usize, secs: u64) -> Run {
    let pid = agent.proc.pid();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before_kib = rss_kib(pid);
    let peak = PeakRss::every(pid, Duration::from_millis(10));
    let config = client_config(&s.receiver.ca.cert_pem, b"http/1.1");
    let stop = Arc::new(AtomicBool::new(false));
    let answers: Arc<Mutex<BTreeMap<u16, usize>>> = Arc::default();
    let tasks: Vec<_> = (0..senders)
        .map(|i| {
            let (bombs, stop, answers, config) =
                (bombs.clone(), stop.clone(), answers.clone(), config.clone());
            let (port, token) = (s.receiver.port, s.receiver.token.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let status = post_gzip(port, &config, &token, &bombs[i % bombs.len()]).await.unwrap_or(0);
                    *answers.lock().unwrap().entry(status).or_default() += 1;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let peak_kib = peak.kib();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let answers = answers.lock().unwrap().clone();
    let note = answers.iter().map(|(s, n)| format!("{n}×{s}")).collect::<Vec<_>>().join(" ");
    Run { before_kib, peak_kib, after_kib: rss_kib(pid), note }
}

/// 10,000 HTTP/2 connections that send nothing, opened 200 at a time.
async fn idle_connections(s: &Setup, agent: &Agent, count: usize) -> Run {
    let pid = agent.proc.pid();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before_kib = rss_kib(pid);
    let peak = PeakRss::every(pid, Duration::from_millis(50));
    let config = client_config(&s.c.ca.cert_pem, b"h2");
    let opened = Arc::new(AtomicUsize::new(0));
    let handshakes = Arc::new(tokio::sync::Semaphore::new(200));
    let tasks: Vec<_> = (0..count)
        .map(|_| {
            let (opened, handshakes, config) = (opened.clone(), handshakes.clone(), config.clone());
            let port = agent.proxy_port;
            tokio::spawn(async move {
                let permit = handshakes.acquire_owned().await.unwrap();
                let Ok(stream) = tls(port, &config).await else { return };
                let Ok((send, conn)) =
                    hyper::client::conn::http2::handshake::<_, _, http_body_util::Empty<bytes::Bytes>>(
                        hyper_util::rt::TokioExecutor::new(),
                        hyper_util::rt::TokioIo::new(stream),
                    )
                    .await
                else {
                    return;
                };
                drop(permit);
                opened.fetch_add(1, Ordering::Relaxed);
                let _keep = send;
                let _ = conn.await;
            })
        })
        .collect();
    let started = Instant::now();
    while tasks.iter().any(|t| !t.is_finished()) && started.elapsed() < Duration::from_secs(180) {
        if opened.load(Ordering::Relaxed) >= count {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let held = testbed::process::tcp_sockets(pid)
        .iter()
        .filter(|sock| sock.established && sock.local_port == agent.proxy_port)
        .count();
    let peak_kib = peak.kib();
    let after_kib = rss_kib(pid);
    let evicted = testbed::process::http_get(agent.admin_port, "/metrics")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("dormant_listener_evictions_total{listener=\"proxy\"} ").map(str::to_string)
        })
        .unwrap_or_else(|| "-".into());
    for t in tasks {
        t.abort();
    }
    let note = format!("{} opened, {held} held, {evicted} evicted", opened.load(Ordering::Relaxed));
    Run { before_kib, peak_kib, after_kib, note }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let secs: u64 = std::env::var("DORMANT_BENCH_ABUSE_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    // Ten thousand connections need as many descriptors, here and in the
    // agents started after (they inherit the limit).
    let me = std::process::id();
    testbed::process::set_open_files_limit(me, u64::MAX)?;
    let hard = testbed::process::set_open_files_limit(me, u64::MAX)?;
    anyhow::ensure!(hard >= 12_000, "this benchmark needs 12,000 file descriptors; the hard limit is {hard}");

    let dir = tempfile::tempdir()?;
    let receiver = AuditReceiver::new(dir.path(), "abuse-bench")?;
    let c = Cluster::start(ClusterOptions::default())?;
    c.kubectl_apply(&c.admin, &dormant::cli::crd_yaml()?)?;
    c.kubectl_apply(&c.admin, "apiVersion: v1\nkind: Namespace\nmetadata: {name: dormant-bench}\n")?;
    let user = c.user("dormant-abuse-bench", &["system:masters"])?;
    let s = Setup { kubeconfig: user.kubeconfig.clone(), c, receiver, _dir: dir };

    let this = PathBuf::from(env!("CARGO_BIN_EXE_dormant"));
    let off: Vec<String> = [
        "--audit-max-body=16777216",
        "--audit-max-inflight-bytes=1099511627776",
        "--audit-max-requests=1000000",
        "--audit-max-connections=1000000",
        "--proxy-max-connections=1000000",
        "--connection-idle-timeout=24h",
    ]
    .iter()
    .map(|f| f.to_string())
    .collect();
    let mut configs = vec![
        Config { name: "caps off (flags)", bin: this.clone(), flags: off },
        Config { name: "defaults", bin: this, flags: Vec::new() },
    ];
    if let Some(base) = std::env::var_os("DORMANT_BENCH_BASE_AGENT") {
        configs.insert(0, Config { name: "base build", bin: base.into(), flags: Vec::new() });
    }

    let compact = gzip(&vec![b' '; 16 << 20], flate2::Compression::best());
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    let noise: Vec<u8> = (0..(31 << 19))
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let full = gzip(&noise, flate2::Compression::none());
    eprintln!(
        "bombs: compact {} KiB, full-size {:.1} MiB",
        compact.len() / 1024,
        mib(full.len() as u64 / 1024)
    );
    let compact_only = Arc::new(vec![compact.clone()]);
    let mixed = Arc::new(vec![compact, full]);

    let mut rows = Vec::new();
    for cfg in &configs {
        for what in
            ["40 gzip bombs (16 KiB → 16 MiB)", "50 bombs, half full-size", "10,000 idle HTTP/2 connections"]
        {
            let mut agent = start_agent(&s, cfg)?;
            let run = match what {
                w if w.starts_with("40") => bombard(&s, &agent, compact_only.clone(), 40, secs).await,
                w if w.starts_with("50") => bombard(&s, &agent, mixed.clone(), 50, secs).await,
                _ => idle_connections(&s, &agent, 10_000).await,
            };
            eprintln!(
                "{} / {what}: {:.1} → peak {:.1} MiB, after {:.1} MiB; {}",
                cfg.name,
                mib(run.before_kib),
                mib(run.peak_kib),
                mib(run.after_kib),
                run.note
            );
            agent.proc.kill();
            rows.push((cfg.name, what, run));
        }
    }
    println!("| load | agent | RSS before | peak RSS | RSS 2-3 s after | what happened |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for (name, what, r) in &rows {
        println!(
            "| {what} | {name} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {} |",
            mib(r.before_kib),
            mib(r.peak_kib),
            mib(r.after_kib),
            r.note
        );
    }
    Ok(())
}
