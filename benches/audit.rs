//! Benchmark: the audit webhook.
//!
//! `cargo bench --bench audit`. Records a real batch (a testbed
//! kube-apiserver's audit webhook, pointed at a capture server, while users
//! list, get, create and delete things in a few namespaces), then prints:
//! - decode + attribution throughput on one core for 400-event batches of
//!   those real events, against decoding the same bytes into
//!   `serde_json::Value` (what a quick receiver would do);
//! - end to end: the `dormant` agent's webhook over HTTPS on loopback, one
//!   400-event batch per request on a kept-alive connection, p50/p99;
//! - the agent's memory before and after a million events with a small
//!   ledger queue (memory is bounded by the queue, not by the load).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use testbed::bench::percentile;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dormant::activity::ledger::{Ledger, NoFlush};
use dormant::activity::observe::{Observer, RulesCache};
use dormant::audit::{Origin, Receiver};
use dormant::metrics::Metrics;
use dormant::policy::Defaults;
use dormant::policy::ignore::IgnoreRules;
use dormant::target::Scope;
use dormant::target::index::TargetIndex;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, PostParams};
use testbed::pki::Ca;
use testbed::process::{free_port, http_ok, rss_kib};
use testbed::{AuditWebhook, Cluster, ClusterOptions};

/// Captures POST bodies over HTTPS.
async fn capture_server(ca: &Ca) -> (u16, Arc<Mutex<Vec<Vec<u8>>>>) {
    dormant::tls::install_default_provider();
    let pair = ca.server(&[]).unwrap();
    let config = dormant::tls::server_config(
        dormant::tls::certs_from_pem(pair.cert_pem.as_bytes(), "cert").unwrap(),
        dormant::tls::key_from_pem(pair.key_pem.as_bytes()).unwrap(),
        None,
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let bodies: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let store = bodies.clone();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let connections = dormant::tls::limits::Connections::new(
        dormant::tls::limits::Limits::default(),
        dormant::tls::limits::Counts::default(),
    );
    tokio::spawn(dormant::tls::serve_https(
        listener,
        acceptor,
        connections,
        move |req: hyper::Request<_>, _: Arc<dormant::tls::Conn<()>>| {
            let store = store.clone();
            async move {
                let body = req.into_body().collect().await.map(|b| b.to_bytes().to_vec()).unwrap_or_default();
                store.lock().unwrap().push(body);
                hyper::Response::new(Full::new(Bytes::new()))
            }
        },
    ));
    (port, bodies)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let ca = Ca::new("bench-audit-ca")?;
    let (capture_port, bodies) = capture_server(&ca).await;
    let opts = ClusterOptions {
        audit: Some(AuditWebhook {
            url: format!("https://127.0.0.1:{capture_port}/audit/host"),
            ca_pem: ca.cert_pem.clone(),
            token: "t".into(),
            batch_max_wait: Duration::from_millis(500),
        }),
        controllers: false,
        ..Default::default()
    };
    let c = tokio::task::spawn_blocking(move || Cluster::start(opts)).await??;
    let namespaces: Vec<String> = (0..5).map(|i| format!("team-{i}")).collect();
    for ns in &namespaces {
        c.kubectl_apply(&c.admin, &format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, annotations: {{dormant.dev/sleep-after: 1h}}}}\n"))?;
    }
    c.kubectl_apply(&c.admin, &dormant::cli::crd_yaml()?)?;
    // Realistic traffic: people and a robot listing, reading, writing.
    let admin = c.client().await?;
    let alice = c.client_for(&c.alice).await?;
    for round in 0..60 {
        for ns in &namespaces {
            let cms: Api<ConfigMap> = Api::namespaced(admin.clone(), ns);
            let name = format!("cm-{round}");
            let cm: ConfigMap =
                serde_json::from_value(serde_json::json!({"metadata": {"name": name}, "data": {"k": "v"}}))?;
            cms.create(&PostParams::default(), &cm).await?;
            let _ = cms.get(&name).await;
            let _ = cms.list(&Default::default()).await;
            let _ = cms.delete(&name, &DeleteParams::default()).await;
            let _: Result<_, _> =
                Api::<ConfigMap>::namespaced(alice.clone(), ns).list(&Default::default()).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut items: Vec<serde_json::Value> = Vec::new();
    for b in bodies.lock().unwrap().iter() {
        let v: serde_json::Value = serde_json::from_slice(b)?;
        items.extend(v["items"].as_array().cloned().unwrap_or_default());
    }
    anyhow::ensure!(items.len() >= 400, "only {} events captured", items.len());
    items.truncate(400);
    let batch = serde_json::to_vec(
        &serde_json::json!({"kind": "EventList", "apiVersion": "audit.k8s.io/v1", "metadata": {}, "items": items}),
    )?;
    let counted = dormant::audit::decode::decode(&batch)?.iter().filter(|e| e.counts()).count();
    eprintln!("recorded a real 400-event batch ({} bytes, {counted} events count)", batch.len());
    if let Ok(path) = std::env::var("DORMANT_BENCH_SAVE_BATCH") {
        std::fs::write(path, &batch)?;
    }

    // 1. In process, one core: decode + attribution + ignore rules + ledger.
    let (stores, writers) = dormant::target::stores::stores();
    writers.fill(admin.clone()).await?;
    let metrics = Arc::new(Metrics::new());
    let (ledger, worker) = Ledger::new(100_000);
    tokio::spawn(worker.run(|_| {}, NoFlush, Duration::from_secs(3600), std::future::pending()));
    let scope = Scope::default();
    let receiver = Receiver {
        observer: Arc::new(Observer::new(
            ledger,
            IgnoreRules::builtin(&["dormant".to_string()]),
            RulesCache::new(stores.clone(), Defaults::default(), scope.clone(), Duration::from_secs(5)),
            metrics.clone(),
        )),
        index: Arc::new(TargetIndex::new(stores.clone(), scope, Duration::from_secs(2))),
        metrics: metrics.clone(),
        tokens: None,
        client_certs: false,
        max_body: 16 << 20,
        budget: dormant::audit::budget::Budget::new(
            64 << 20,
            8,
            Duration::from_secs(2),
            prometheus_client::metrics::gauge::Gauge::default(),
        ),
        body_timeout: Duration::from_secs(10),
    };
    let rounds = 500;
    let (dormant_rate, value_rate) = tokio::task::block_in_place(|| {
        for _ in 0..20 {
            receiver.ingest(&Origin::Host, &batch).unwrap();
        }
        let t = Instant::now();
        for _ in 0..rounds {
            receiver.ingest(&Origin::Host, &batch).unwrap();
        }
        let dormant_rate = (rounds * 400) as f64 / t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut n = 0usize;
        for _ in 0..rounds {
            let v: serde_json::Value = serde_json::from_slice(&batch).unwrap();
            n += v["items"].as_array().map_or(0, Vec::len);
        }
        (dormant_rate, n as f64 / t.elapsed().as_secs_f64())
    });

    // 2. End to end through the agent's webhook.
    let dir = tempfile::tempdir()?;
    let pair = ca.server(&[])?;
    std::fs::write(dir.path().join("tls.crt"), &pair.cert_pem)?;
    std::fs::write(dir.path().join("tls.key"), &pair.key_pem)?;
    std::fs::write(dir.path().join("tokens"), "bench-token\n")?;
    c.kubectl_out(&c.admin, &["create", "namespace", "dormant"]).ok();
    let (admin_port, audit_port) = (free_port()?, free_port()?);
    let user = c.user("dormant-bench", &["system:masters"])?;
    let args: Vec<String> = vec![
        "agent".into(),
        "--namespace=dormant".into(),
        format!("--admin-addr=127.0.0.1:{admin_port}"),
        format!("--audit-addr=127.0.0.1:{audit_port}"),
        format!("--audit-cert={}", dir.path().join("tls.crt").display()),
        format!("--audit-key={}", dir.path().join("tls.key").display()),
        format!("--audit-token-file={}", dir.path().join("tokens").display()),
        "--activity-queue=1000".into(),
    ];
    let env = vec![
        ("KUBECONFIG".into(), user.kubeconfig.display().to_string()),
        ("RUST_LOG".into(), "warn".into()),
    ];
    let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_dormant"));
    let mut agent = testbed::spawner::spawn_with_env("dormant-audit-bench", &bin, &args, &env, &c.dir)?;
    agent.wait_ready(Duration::from_secs(60), || http_ok(admin_port, "/readyz"))?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_before = rss_kib(agent.pid());

    let roots = dormant::tls::root_store(&dormant::tls::certs_from_pem(ca.cert_pem.as_bytes(), "ca")?)?;
    let config = rustls::ClientConfig::builder_with_provider(dormant::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", audit_port)).await?;
    // As kube-apiserver's client does (Go sets TCP_NODELAY on every connection).
    tcp.set_nodelay(true)?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(rustls_pki_types::ServerName::try_from("127.0.0.1")?, tcp)
        .await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    let body = Bytes::from(batch.clone());
    let mut lat = Vec::new();
    let requests = 2500; // one million events
    for _ in 0..requests {
        let req = http::Request::post(format!("https://127.0.0.1:{audit_port}/audit/host"))
            .header("host", "127.0.0.1")
            .header("content-type", "application/json")
            .header("authorization", "Bearer bench-token")
            .body(Full::new(body.clone()))?;
        send.ready().await?;
        let t = Instant::now();
        let resp = send.send_request(req).await?;
        let status = resp.status();
        let _ = resp.into_body().collect().await?;
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(status == 200, "status {status}");
    }
    let rss_after = rss_kib(agent.pid());
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    agent.kill();

    println!("\n## audit: decode + attribution, and the webhook end to end\n");
    println!("| measure | value |");
    println!("| --- | --- |");
    println!("| real batch | 400 events, {} bytes, {counted} counted requests |", batch.len());
    println!(
        "| dormant decode + attribution + ignore rules + ledger, 1 core | {:.0} events/s |",
        dormant_rate
    );
    println!("| same bytes into serde_json::Value (decode only), 1 core | {:.0} events/s |", value_rate);
    println!(
        "| 400-event batch over HTTPS to the agent, acknowledged: p50 / p99 / max ({requests} batches) | {:.2} / {:.2} / {:.2} ms |",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or_default()
    );
    println!(
        "| agent RSS before / after {} events (ledger queue 1000) | {:.1} / {:.1} MiB |",
        requests * 400,
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0
    );
    Ok(())
}
