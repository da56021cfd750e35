//! A tenant trying to exhaust the agent, against the real `dormant` binary
//! on the testbed: fifty 16 MiB gzip bombs at once at the audit webhook
//! (sent again as soon as each is answered; half of them compact, half
//! full-size), and ten thousand idle connections at the proxy. The whole time the agent's
//! resident memory, sampled from /proc, stays under the chart's memory
//! limit; and meanwhile a certificate user's kubectl still wakes a
//! sleeping vcluster through the proxy, the webhook still takes a real
//! batch (after `Retry-After` if need be), and the host API server's own
//! reports of a user's request are not lost.
//!
//! The agent runs with eight worker threads, as on an eight-core node:
//! the chart sets no CPU limit, so the runtime starts one per core, and
//! the work one thread does at a time (inflating a body, say) is held by
//! each at once.
//!
//! `DORMANT_TEST_AGENT=<path>` runs these against another build of the
//! agent (the tests pass it no flag that build may lack).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use support::*;
use testbed::audit::AuditReceiver;
use testbed::process::{PeakRss, free_port, http_ok, rss_kib};
use testbed::vcluster::{VCluster, VClusterOptions};
use testbed::{Cluster, ClusterOptions};

/// The chart's memory limit (`resources.limits.memory: 256Mi`).
const CHART_MEMORY_LIMIT_KIB: u64 = 256 * 1024;

/// One audit-enabled cluster whose API server reports to the agent's
/// webhook; the tests take turns (each runs its own agent on the
/// webhook's port, and each needs the machine's cores to itself).
struct Env {
    cluster: Cluster,
    receiver: AuditReceiver,
    _dir: tempfile::TempDir,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let receiver = AuditReceiver::new(dir.path(), "abuse").unwrap();
        let cluster = Cluster::start(ClusterOptions {
            audit: Some(receiver.webhook("/audit/host")),
            ..Default::default()
        })
        .unwrap();
        Env { cluster, receiver, _dir: dir }
    })
}

async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    TURN.lock().await
}

/// An agent serving the webhook and the proxy, a sleeping vcluster behind
/// the proxy, and two namespaces whose use the webhook reports.
struct Setup {
    agent: Agent,
    proxy_port: u16,
    _vc: VCluster,
    /// The vcluster's credentials (a client certificate) through the proxy.
    kubeconfig: std::path::PathBuf,
    /// Namespaces a user's requests on the host, and a batch the test
    /// posts itself, are reported for.
    audited: String,
    posted: String,
}

fn setup(prefix: &str) -> Setup {
    let e = env();
    let c = &e.cluster;
    let scope = test_id(prefix);
    let ns = c.namespace(prefix, &[("dormant-test", &scope)]).unwrap();
    let audited = c.namespace(&format!("{prefix}-audited"), &[("dormant-test", &scope)]).unwrap();
    let posted = c.namespace(&format!("{prefix}-posted"), &[("dormant-test", &scope)]).unwrap();
    for n in [&audited, &posted] {
        kubectl(c, &["annotate", "namespace", n, "dormant.dev/sleep-after=1h"]);
    }
    // Only requests that were let in count: alice may list pods where the
    // host API server reports her.
    kubectl(
        c,
        &["create", "rolebinding", "alice-view", "--clusterrole=view", "--user=alice", "-n", &audited],
    );
    let vc = VCluster::create(
        c,
        &ns,
        "dev",
        VClusterOptions {
            annotations: vec![("dormant.dev/sleep-after".into(), "1h".into())],
            ..Default::default()
        },
    )
    .unwrap();
    vc.wait_serving(c, Duration::from_secs(60)).unwrap();
    let proxy_port = free_port().unwrap();
    let mut flags = e.receiver.agent_flags();
    flags.extend([
        format!("--proxy-addr=127.0.0.1:{proxy_port}"),
        format!("--proxy-cert={}", c.dir.join("apiserver.crt").display()),
        format!("--proxy-key={}", c.dir.join("apiserver.key").display()),
    ]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let agent = Agent::start_with_env(
        c,
        &scope,
        &format!("{scope}-system"),
        &format!("{scope}-agent"),
        &flags,
        &[("TOKIO_WORKER_THREADS", "8"), ("RUST_LOG", "info,kube_lease_manager=warn")],
    );
    let kubeconfig = c.dir.join(format!("{ns}-abuse.kubeconfig"));
    let out = dormant(
        c,
        &[
            "kubeconfig",
            &format!("{ns}/dev"),
            "--server",
            &format!("https://127.0.0.1:{proxy_port}"),
            "--proxy-ca",
            c.ca_file.to_str().unwrap(),
            "-o",
            kubeconfig.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = dormant(c, &["sleep", &format!("vcluster/{ns}/dev"), "--wait=60s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_until("the vcluster's API server to stop", Duration::from_secs(60), || !vc.is_serving());
    Setup { agent, proxy_port, _vc: vc, kubeconfig, audited, posted }
}

fn annotation_quietly(c: &Cluster, ns: &str, key: &str) -> String {
    let escaped = key.replace('.', "\\.").replace('/', "\\/");
    kubectl_quiet(
        c,
        &["get", "namespace", ns, "-o", &format!("jsonpath={{.metadata.annotations.{escaped}}}")],
    )
}

/// A batch of one event: `user` listed pods in `ns`.
fn batch(ns: &str, user: &str) -> Vec<u8> {
    format!(
        r#"{{"kind":"EventList","apiVersion":"audit.k8s.io/v1","metadata":{{}},"items":[{{"level":"Metadata","auditID":"legit-1","stage":"ResponseComplete","requestURI":"/api/v1/namespaces/{ns}/pods","verb":"list","user":{{"username":"{user}","groups":["system:authenticated"]}},"userAgent":"kubectl/v1.37.2","objectRef":{{"resource":"pods","namespace":"{ns}","apiVersion":"v1"}},"responseStatus":{{"code":200}},"stageTimestamp":"{}"}}]}}"#,
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
    )
    .into_bytes()
}

/// The two shapes of a 16 MiB gzip bomb, each inflating to (about)
/// 16 MiB: compact (16 MiB of spaces, about 16 KiB sent), and full-size
/// (15.5 MiB of random bytes, which gzip cannot shrink: as much is sent
/// as is inflated, and the receiver holds both).
fn bombs() -> [Vec<u8>; 2] {
    use std::io::Write;
    let gzip = |data: &[u8], level| {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), level);
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    };
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    let noise: Vec<u8> = (0..(31 << 19))
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    [gzip(&vec![b' '; 16 << 20], flate2::Compression::best()), gzip(&noise, flate2::Compression::none())]
}

/// An answer: status, `Retry-After` (seconds), body.
type Answer = (u16, Option<u64>, String);

/// POSTs `body` to the webhook's `/audit/host` with the API server's token,
/// on a connection of its own; a gzip body is sent in chunks, with no
/// length said up front (as a streaming client would, and so that the
/// receiver cannot refuse it by its length).
async fn post(port: u16, body: &[u8], gzip: bool) -> Result<Answer, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let e = env();
    let tls = tls_connect(port, &e.receiver.ca.cert_pem, None).await?;
    let mut head = format!(
        "POST /audit/host HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\ncontent-type: application/json\r\nauthorization: Bearer {}\r\n",
        e.receiver.token,
    );
    if gzip {
        head.push_str("content-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n");
    } else {
        head.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
    }
    let (mut rd, mut wr) = tokio::io::split(tls);
    let body = body.to_vec();
    // The answer may come before the body is all sent (503, 413).
    let writer = tokio::spawn(async move {
        wr.write_all(head.as_bytes()).await?;
        if gzip {
            for chunk in body.chunks(64 << 10) {
                wr.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).await?;
                wr.write_all(chunk).await?;
                wr.write_all(b"\r\n").await?;
            }
            wr.write_all(b"0\r\n\r\n").await?;
        } else {
            wr.write_all(&body).await?;
        }
        wr.flush().await
    });
    let mut raw = Vec::new();
    // Whatever arrived in time is the answer; no status line fails below.
    tokio::time::timeout(Duration::from_secs(120), rd.read_to_end(&mut raw)).await.ok();
    writer.abort();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("no HTTP answer: {text:?}"))?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let retry_after = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("retry-after").then(|| v.trim().parse().ok())?
    });
    Ok((status, retry_after, body.to_string()))
}

/// What a real user and a real API server do while the abuse goes on,
/// each checked as they would check it:
/// - a certificate user's kubectl through the proxy wakes the sleeping
///   vcluster and is answered;
/// - the webhook takes a real batch the test posts (after `Retry-After`
///   if it says so), and its activity is recorded;
/// - a user's request on the host, reported by the host API server's own
///   webhook (which retries), is recorded.
///
/// Returns what happened, and what went wrong (asserted by the caller
/// after it has reported the agent's memory).
async fn legitimate_use(s: &Setup) -> (String, Vec<String>) {
    let mut report = String::new();
    let mut failed = Vec::new();
    // The host API server reports alice's request on its own.
    let audited = s.audited.clone();
    let alice = tokio::task::spawn_blocking(move || {
        let c = &env().cluster;
        // Refused or not, the API server reports it: what counts is
        // checked from the agent's side below.
        c.kubectl_out(&c.alice, &["get", "pods", "-n", &audited]).ok();
    });

    // kubectl wakes the vcluster through the proxy.
    let kubeconfig = s.kubeconfig.clone();
    let started = Instant::now();
    let woke = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env().cluster.bins.path("kubectl"))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .args(["get", "namespaces", "-o", "name"])
            .output()
            .unwrap()
    });

    // The test posts a batch as an API server would, retrying as it is told.
    let mut retried = 0;
    let posted_at = Instant::now();
    let accepted = loop {
        match post(env().receiver.port, &batch(&s.posted, "bob"), false).await {
            Ok((200, _, _)) => break true,
            Ok((503, Some(after), _)) if posted_at.elapsed() < Duration::from_secs(120) => {
                retried += 1;
                tokio::time::sleep(Duration::from_secs(after)).await;
            }
            other => {
                failed.push(format!("a real batch got {other:?} after {retried} Retry-After"));
                break false;
            }
        }
    };
    if accepted {
        report.push_str(&format!("a real batch was accepted after {retried} Retry-After; "));
    }

    let woke = woke.await.unwrap();
    let out = String::from_utf8_lossy(&woke.stdout);
    if woke.status.success() && out.contains("namespace/default") {
        report.push_str(&format!(
            "the vcluster woke for kubectl in {:.1} s; ",
            started.elapsed().as_secs_f64()
        ));
    } else {
        failed.push(format!(
            "kubectl through the proxy, after {:?}: {out}{}",
            started.elapsed(),
            String::from_utf8_lossy(&woke.stderr)
        ));
    }
    alice.await.unwrap();

    let (posted, audited) = (s.posted.clone(), s.audited.clone());
    let recorded = tokio::task::spawn_blocking(move || {
        let c = &env().cluster;
        let by = |ns: &str| annotation_quietly(c, ns, "dormant.dev/last-activity-by");
        let mut missing = Vec::new();
        let mut expected = vec![(&audited, "alice list pods (audit)", Duration::from_secs(150))];
        if accepted {
            expected.push((&posted, "bob list pods (audit)", Duration::from_secs(30)));
        }
        for (ns, who, within) in expected {
            let since = Instant::now();
            while !by(ns).starts_with(who) {
                if since.elapsed() > within {
                    missing.push(format!("{who} was not recorded on {ns} within {within:?}"));
                    break;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        missing
    })
    .await
    .unwrap();
    failed.extend(recorded);
    if failed.is_empty() {
        report.push_str("both were recorded");
    }
    (report, failed)
}

/// The agent's memory while `abuse` runs, and what the abuse reported.
struct Measured {
    before_kib: u64,
    peak_kib: u64,
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_gzip_bombs_at_once_leave_the_agent_under_its_memory_limit_and_serving() {
    let _turn = one_at_a_time().await;
    let s = tokio::task::spawn_blocking(|| setup("bombs")).await.unwrap();
    let pid = s.agent.proc.pid();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let m = Measured { before_kib: rss_kib(pid), peak_kib: 0 };
    let peak = PeakRss::every(pid, Duration::from_millis(10));

    let bombs = Arc::new(bombs());
    let stop = Arc::new(AtomicBool::new(false));
    let answers: Arc<Mutex<std::collections::BTreeMap<u16, usize>>> = Arc::default();
    let port = env().receiver.port;
    // Half the bombers send compact bombs, half full-size ones.
    let bombers: Vec<_> = (0..50)
        .map(|i| {
            let (bombs, stop, answers) = (bombs.clone(), stop.clone(), answers.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((status, _, _)) = post(port, &bombs[i % 2], true).await {
                        *answers.lock().unwrap().entry(status).or_default() += 1;
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (report, failed) = legitimate_use(&s).await;
    stop.store(true, Ordering::Relaxed);
    for b in bombers {
        b.await.unwrap();
    }
    let m = Measured { peak_kib: peak.kib(), ..m };
    let answers = answers.lock().unwrap().clone();
    eprintln!(
        "gzip bombs: agent RSS {:.1} MiB before, peak {:.1} MiB (+{:.1} MiB); bombs answered {answers:?}; {report}",
        mib(m.before_kib),
        mib(m.peak_kib),
        mib(m.peak_kib.saturating_sub(m.before_kib)),
    );
    let refused_whole: usize = answers.iter().filter(|(s, _)| matches!(s, 400 | 413)).map(|(_, n)| n).sum();
    assert!(refused_whole >= 50, "the bombs were hardly read ({answers:?}): the test measured nothing");
    assert!(
        m.peak_kib < CHART_MEMORY_LIMIT_KIB,
        "the agent reached {:.1} MiB under the bombs, over the chart's 256 MiB limit",
        mib(m.peak_kib)
    );
    assert!(failed.is_empty(), "under the bombs: {failed:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_idle_connections_leave_the_agent_under_its_memory_limit_and_serving() {
    let _turn = one_at_a_time().await;
    // Ten thousand connections need as many descriptors here (the agent,
    // started after, inherits the limit).
    let pid = std::process::id();
    testbed::process::set_open_files_limit(pid, u64::MAX).unwrap();
    // The soft limit, now the hard one (the call returns the limit it replaces).
    let hard = testbed::process::set_open_files_limit(pid, u64::MAX).unwrap();
    assert!(hard >= 12_000, "this test needs 12,000 file descriptors; the hard limit is {hard}");
    let s = tokio::task::spawn_blocking(|| setup("idle")).await.unwrap();
    let pid = s.agent.proc.pid();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let m = Measured { before_kib: rss_kib(pid), peak_kib: 0 };
    let peak = PeakRss::every(pid, Duration::from_millis(50));

    // Ten thousand HTTP/2 connections that complete their handshakes,
    // answer PINGs and send nothing, opened 200 at a time.
    let opened = Arc::new(AtomicUsize::new(0));
    let open_now = Arc::new(AtomicUsize::new(0));
    let handshakes = Arc::new(tokio::sync::Semaphore::new(200));
    let mut idle = Vec::new();
    for _ in 0..10_000 {
        let (opened, open_now, handshakes) = (opened.clone(), open_now.clone(), handshakes.clone());
        let port = s.proxy_port;
        idle.push(tokio::spawn(async move {
            let permit = handshakes.acquire_owned().await.unwrap();
            let Ok(tls) = tls_connect_h2(port).await else { return };
            let Ok((_send, conn)) =
                hyper::client::conn::http2::handshake::<_, _, http_body_util::Empty<bytes::Bytes>>(
                    hyper_util::rt::TokioExecutor::new(),
                    hyper_util::rt::TokioIo::new(tls),
                )
                .await
            else {
                return;
            };
            drop(permit);
            opened.fetch_add(1, Ordering::Relaxed);
            open_now.fetch_add(1, Ordering::Relaxed);
            // Held until the agent closes it (the request sender, kept,
            // keeps the connection open from this side).
            conn.await.ok();
            open_now.fetch_sub(1, Ordering::Relaxed);
        }));
    }
    // The agent is well past any cap it may have before the real user
    // comes; the rest of the connections keep coming meanwhile.
    while opened.load(Ordering::Relaxed) < 3_000 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (report, failed) = legitimate_use(&s).await;
    let started = Instant::now();
    while opened.load(Ordering::Relaxed) < 10_000 && started.elapsed() < Duration::from_secs(180) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Everything open has settled; the agent holds what it holds.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let held = testbed::process::tcp_sockets(pid)
        .iter()
        .filter(|sock| sock.established && sock.local_port == s.proxy_port)
        .count();
    let m = Measured { peak_kib: peak.kib(), ..m };
    let growth = m.peak_kib.saturating_sub(m.before_kib);
    eprintln!(
        "idle connections: {} opened, {} still open on the test's side, {held} held by the agent; agent RSS {:.1} MiB before, peak {:.1} MiB (+{:.1} MiB, {:.1} KiB per connection held); {report}",
        opened.load(Ordering::Relaxed),
        open_now.load(Ordering::Relaxed),
        mib(m.before_kib),
        mib(m.peak_kib),
        mib(growth),
        growth as f64 / held.max(1) as f64,
    );
    for h in idle {
        h.abort();
    }
    assert!(
        opened.load(Ordering::Relaxed) >= 9_000,
        "the connections were not all made: the test measured little"
    );
    assert!(
        m.peak_kib < CHART_MEMORY_LIMIT_KIB,
        "the agent reached {:.1} MiB holding idle connections, over the chart's 256 MiB limit",
        mib(m.peak_kib)
    );
    assert!(failed.is_empty(), "with the connections held: {failed:#?}");
    // The vcluster still answers a user after the flood.
    let kubeconfig = s.kubeconfig.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env().cluster.bins.path("kubectl"))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .args(["get", "namespaces", "-o", "name"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A TLS connection to the proxy offering only h2, trusting the testbed CA.
async fn tls_connect_h2(port: u16) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    let config = CONFIG.get_or_init(|| {
        let pem = env().cluster.ca.cert_pem.as_bytes();
        let roots = dormant::tls::root_store(&dormant::tls::certs_from_pem(pem, "ca").unwrap()).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(dormant::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    });
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| e.to_string())?;
    tokio_rustls::TlsConnector::from(config.clone())
        .connect(rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())
}

/// An agent serving the webhook and the proxy (no vcluster behind it),
/// with `flags`; the proxy's port.
fn light_agent(prefix: &str, flags: &[&str]) -> (Agent, u16) {
    let e = env();
    let c = &e.cluster;
    let scope = test_id(prefix);
    let proxy_port = free_port().unwrap();
    let mut all = e.receiver.agent_flags();
    all.extend([
        format!("--proxy-addr=127.0.0.1:{proxy_port}"),
        format!("--proxy-cert={}", c.dir.join("apiserver.crt").display()),
        format!("--proxy-key={}", c.dir.join("apiserver.key").display()),
    ]);
    all.extend(flags.iter().map(|f| f.to_string()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let agent = Agent::start(c, &scope, &format!("{scope}-system"), &format!("{scope}-agent"), &all);
    (agent, proxy_port)
}

/// The value of the metric line that starts with `series` (0 if none).
fn metric(agent: &Agent, series: &str) -> f64 {
    agent
        .get("/metrics")
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// An HTTP/2 connection to the proxy that does its handshake and then
/// sends nothing (hyper answers the agent's PINGs; `ping_every` makes it
/// send its own too); resolves when the agent closes it.
async fn idle_h2(port: u16, ping_every: Option<Duration>) -> Result<impl Future<Output = ()>, String> {
    let tls = tls_connect_h2(port).await?;
    let mut builder = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder.timer(hyper_util::rt::TokioTimer::new());
    if let Some(every) = ping_every {
        builder
            .keep_alive_interval(every)
            .keep_alive_while_idle(true)
            .keep_alive_timeout(Duration::from_secs(5));
    }
    let (send, conn) = builder
        .handshake::<_, http_body_util::Empty<bytes::Bytes>>(hyper_util::rt::TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    Ok(async move {
        let _keep = send;
        // Resolves when the agent closes the connection, however it does.
        conn.await.ok();
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn at_the_proxy_s_cap_the_connection_idle_longest_is_closed_to_make_room() {
    let _turn = one_at_a_time().await;
    let (agent, port) =
        tokio::task::spawn_blocking(|| light_agent("evict", &["--proxy-max-connections=8"])).await.unwrap();
    // Eight idle connections, oldest first.
    let mut held = Vec::new();
    for _ in 0..8 {
        let conn = idle_h2(port, None).await.unwrap();
        held.push(tokio::spawn(conn));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(held.iter().all(|h| !h.is_finished()), "eight connections fit under a cap of eight");
    // A ninth: the oldest is closed for it, the rest stay.
    let ninth = tokio::spawn(idle_h2(port, None).await.unwrap());
    let oldest = held.remove(0);
    tokio::time::timeout(Duration::from_secs(30), oldest)
        .await
        .expect("the connection idle the longest should have been closed")
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(held.iter().all(|h| !h.is_finished()), "only the oldest idle connection should go");
    assert!(!ninth.is_finished(), "the new connection should be held");
    // (A short, blocking read of the admin port's metrics.)
    let evicted = metric(&agent, "dormant_listener_evictions_total{listener=\"proxy\"}");
    let open = metric(&agent, "dormant_listener_connections{listener=\"proxy\"}");
    eprintln!("proxy at its cap of 8: {evicted} evicted, {open} held");
    assert_eq!(evicted, 1.0);
    assert_eq!(open, 8.0);
    for h in held {
        h.abort();
    }
    ninth.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn at_the_webhook_s_cap_with_every_connection_busy_a_new_one_is_closed_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _turn = one_at_a_time().await;
    let (agent, _) = tokio::task::spawn_blocking(|| {
        light_agent("refuse", &["--audit-max-connections=4", "--audit-body-timeout=120s"])
    })
    .await
    .unwrap();
    let e = env();
    let port = e.receiver.port;
    // Four batches whose bodies never come: each connection is busy.
    let mut busy = Vec::new();
    for _ in 0..4 {
        let mut tls = tls_connect(port, &e.receiver.ca.cert_pem, None).await.unwrap();
        let head = format!(
            "POST /audit/host HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\nauthorization: Bearer {}\r\ncontent-length: 1000\r\n\r\n{{",
            e.receiver.token
        );
        tls.write_all(head.as_bytes()).await.unwrap();
        tls.flush().await.unwrap();
        busy.push(tls);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A fifth is closed before its TLS handshake completes.
    let fifth = tls_connect(port, &e.receiver.ca.cert_pem, None).await;
    let closed = match fifth {
        Err(_) => true,
        Ok(mut tls) => matches!(
            tokio::time::timeout(Duration::from_secs(10), tls.read(&mut [0u8; 1])).await,
            Ok(Ok(0) | Err(_))
        ),
    };
    assert!(closed, "a connection over the cap with every connection busy should be closed at once");
    let refused = metric(&agent, "dormant_listener_refused_connections_total{listener=\"audit\"}");
    assert!(refused >= 1.0, "the refusal should be counted");
    // One busy connection ends: a real batch is taken again.
    drop(busy.pop());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, _, body) = post(port, &batch("default", "bob"), false).await.unwrap();
    assert_eq!(status, 200, "{body}");
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_http2_connection_that_answers_pings_but_sends_nothing_is_closed_after_the_idle_timeout() {
    let _turn = one_at_a_time().await;
    let (_agent, port) =
        tokio::task::spawn_blocking(|| light_agent("pings", &["--connection-idle-timeout=3s"]))
            .await
            .unwrap();
    // The client PINGs every half second and answers the agent's PINGs:
    // a live peer that never asks for anything.
    let conn = idle_h2(port, Some(Duration::from_millis(500))).await.unwrap();
    let started = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(60), conn).await;
    eprintln!("idle HTTP/2 connection with PINGs closed after {:.1} s", started.elapsed().as_secs_f64());
    assert!(closed.is_ok(), "an idle HTTP/2 connection answering PINGs was still open after 60 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_http2_client_is_told_the_proxy_s_stream_limit_in_its_settings() {
    let _turn = one_at_a_time().await;
    let (_agent, port) =
        tokio::task::spawn_blocking(|| light_agent("streams", &["--proxy-max-streams=4"])).await.unwrap();
    let tls = tls_connect_h2(port).await.unwrap();
    let (mut client, mut conn) = h2::client::handshake(tls).await.unwrap();
    // One request answered: the agent's SETTINGS have been read.
    let req = http::Request::get("https://127.0.0.1/version").body(()).unwrap();
    let (answer, _) = client.send_request(req, true).unwrap();
    let answer = tokio::select! {
        a = answer => a.unwrap(),
        r = &mut conn => panic!("connection ended: {r:?}"),
    };
    eprintln!("a request with no credentials got {}", answer.status());
    assert_eq!(conn.max_concurrent_send_streams(), 4, "SETTINGS_MAX_CONCURRENT_STREAMS the proxy sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_admin_port_closes_a_client_that_dribbles_its_request_head() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _turn = one_at_a_time().await;
    let (agent, _) = tokio::task::spawn_blocking(|| light_agent("slowloris", &["--header-read-timeout=2s"]))
        .await
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", agent.admin_port)).await.unwrap();
    let (mut rd, mut wr) = tcp.into_split();
    let started = Instant::now();
    // One header line every half second, never the blank line that ends the head.
    let dribble = tokio::spawn(async move {
        wr.write_all(b"GET /metrics HTTP/1.1\r\nhost: 127.0.0.1\r\n").await?;
        for i in 0.. {
            tokio::time::sleep(Duration::from_millis(500)).await;
            wr.write_all(format!("x-slow-{i}: a\r\n").as_bytes()).await?;
        }
        Ok::<_, std::io::Error>(())
    });
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(60), rd.read_to_end(&mut answer)).await;
    dribble.abort();
    eprintln!(
        "slowloris on the admin port closed after {:.1} s, answered {:?}",
        started.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&answer).lines().next()
    );
    assert!(read.is_ok(), "a request head dribbled for 60 s was still being read");
    assert!(!String::from_utf8_lossy(&answer).contains(" 200 "), "the dribbled request was answered 200");
    // A client that sends its request at once is still answered.
    let port = agent.admin_port;
    assert!(tokio::task::spawn_blocking(move || http_ok(port, "/livez")).await.unwrap());
}
