//! Shared helpers for tests that run the real `dormant` binary against the
//! testbed. Each test scopes its agent to its own namespaces with
//! `--namespace-selector dormant-test=<id>`, so agents of tests running at
//! the same time never touch each other's targets.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::Output;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use testbed::process::{Proc, free_port, http_ok};
use testbed::{Cluster, User};

/// The `dormant` binary under test: this build's, or the one
/// `DORMANT_TEST_AGENT` names (to see a test fail against an older build).
pub fn dormant_bin() -> PathBuf {
    std::env::var_os("DORMANT_TEST_AGENT")
        .map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_dormant")), PathBuf::from)
}

/// A unique id for this test's scope.
pub fn test_id(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}-{}-{}", std::process::id() % 100_000, N.fetch_add(1, Ordering::Relaxed))
}

/// The identity dormant runs as in tests (cluster-admin by group), one per
/// cluster (a test may start a cluster of its own beside the shared one).
pub fn agent_user(c: &Cluster) -> User {
    static USERS: std::sync::Mutex<Vec<(String, User)>> = std::sync::Mutex::new(Vec::new());
    let mut users = USERS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, u)) = users.iter().find(|(server, _)| *server == c.server) {
        return u.clone();
    }
    let u = c.user("dormant-agent", &["system:masters"]).unwrap();
    users.push((c.server.clone(), u.clone()));
    u
}

/// A running `dormant agent`.
pub struct Agent {
    pub proc: Proc,
    pub admin_port: u16,
    pub identity: String,
}

impl Agent {
    /// Starts an agent scoped to namespaces labelled `dormant-test=<scope>`,
    /// with its Lease in namespace `lease_ns` (created if missing). A flag
    /// in `extra` replaces the test default of the same name.
    pub fn start(c: &Cluster, scope: &str, lease_ns: &str, identity: &str, extra: &[&str]) -> Agent {
        Agent::start_as(c, &agent_user(c), scope, lease_ns, identity, extra)
    }

    /// [`Agent::start`] with extra environment variables.
    pub fn start_with_env(
        c: &Cluster,
        scope: &str,
        lease_ns: &str,
        identity: &str,
        extra: &[&str],
        extra_env: &[(&str, &str)],
    ) -> Agent {
        Agent::start_as_with_env(c, &agent_user(c), scope, lease_ns, identity, extra, extra_env)
    }

    /// [`Agent::start`] with credentials of its own (`user`), so that what
    /// this replica writes can be told apart from another's in the API
    /// server's audit log.
    pub fn start_as(
        c: &Cluster,
        user: &User,
        scope: &str,
        lease_ns: &str,
        identity: &str,
        extra: &[&str],
    ) -> Agent {
        Agent::start_as_with_env(c, user, scope, lease_ns, identity, extra, &[])
    }

    fn start_as_with_env(
        c: &Cluster,
        user: &User,
        scope: &str,
        lease_ns: &str,
        identity: &str,
        extra: &[&str],
        extra_env: &[(&str, &str)],
    ) -> Agent {
        install_crd(c);
        ensure_namespace(c, lease_ns);
        let admin_port = free_port().unwrap();
        let mut args: Vec<String> = vec![
            "agent".into(),
            format!("--namespace={lease_ns}"),
            format!("--identity={identity}"),
            format!("--admin-addr=127.0.0.1:{admin_port}"),
            format!("--namespace-selector=dormant-test={scope}"),
            "--lease-duration=3s".into(),
            "--flush-interval=1s".into(),
            // Tests read who kept a target awake from the metrics.
            "--metrics-user-names".into(),
        ];
        let flag = |a: &str| a.split('=').next().unwrap_or_default().to_string();
        args.retain(|a| !extra.iter().any(|e| flag(e) == flag(a)));
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut env = vec![
            ("KUBECONFIG".to_string(), user.kubeconfig.display().to_string()),
            ("RUST_LOG".to_string(), "info,dormant=debug,kube_lease_manager=warn".to_string()),
        ];
        env.extend(extra_env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let proc = testbed::spawner::spawn_with_env(
            &format!("dormant-{identity}"),
            &dormant_bin(),
            &args,
            &env,
            &c.dir,
        )
        .unwrap();
        let mut agent = Agent { proc, admin_port, identity: identity.into() };
        let port = agent.admin_port;
        agent.proc.wait_ready(Duration::from_secs(60), || http_ok(port, "/readyz")).unwrap();
        agent
    }

    pub fn kill(&mut self) {
        self.proc.kill();
    }

    pub fn log(&self) -> String {
        self.proc.tail(60)
    }

    pub fn get(&self, path: &str) -> String {
        testbed::process::http_body(self.admin_port, path)
    }

    /// The sum of the samples whose line starts with `line_start` (a metric
    /// name and the beginning of its labels), in one scrape.
    pub fn metric(&self, line_start: &str) -> f64 {
        metric_sum(&self.get("/metrics"), line_start)
    }

    /// Waits until nothing the agent started is still running: its count of
    /// finished reconciles stays the same for three seconds. A read made
    /// after it does not race a reconcile in flight.
    pub fn settle(&self) {
        let count = || self.metric("dormant_reconcile_duration_seconds_count");
        let mut last = count();
        let mut quiet_since = Instant::now();
        let start = Instant::now();
        while quiet_since.elapsed() < Duration::from_secs(3) {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the agent kept reconciling for a minute; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(500));
            let now = count();
            if now != last {
                (last, quiet_since) = (now, Instant::now());
            }
        }
    }
}

/// The sum of the samples in the OpenMetrics text `metrics` whose line
/// starts with `line_start` (0 when there is none).
pub fn metric_sum(metrics: &str, line_start: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(line_start))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Creates namespace `ns` unless it exists. A cluster that has just
/// started may refuse for a moment (its admission and RBAC still
/// loading): retried, and a lasting refusal fails the test with it.
pub fn ensure_namespace(c: &Cluster, ns: &str) {
    let start = Instant::now();
    loop {
        match c.kubectl_out(&c.admin, &["create", "namespace", ns]) {
            Ok(_) => return,
            Err(e) if e.contains("AlreadyExists") || e.contains("already exists") => return,
            Err(e) if start.elapsed() > Duration::from_secs(30) => {
                panic!("cannot create namespace {ns}: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// Applies the SleepPolicy CRD (idempotent) and waits until it is served.
pub fn install_crd(c: &Cluster) {
    let crd =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("charts/dormant/crds/sleeppolicies.dormant.dev.yaml");
    kubectl(c, &["apply", "--server-side", "--force-conflicts", "-f", crd.to_str().unwrap()]);
    c.wait_established("sleeppolicies.dormant.dev").unwrap();
}

/// Runs `dormant <args>` as the cluster admin, reading and annotating the
/// cluster itself (`--direct`: these tests need no agent's API).
pub fn dormant(c: &Cluster, args: &[&str]) -> Output {
    std::process::Command::new(dormant_bin())
        .args(args)
        .env("KUBECONFIG", &c.admin.kubeconfig)
        .env("DORMANT_DIRECT", "true")
        .output()
        .unwrap()
}

/// kubectl as dormant's own identity: reads that no agent counts as activity
/// (tests that watch activity must not make any themselves).
pub fn kubectl_quiet(c: &Cluster, args: &[&str]) -> String {
    c.kubectl_out(&agent_user(c), args).unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"))
}

pub fn kubectl(c: &Cluster, args: &[&str]) -> String {
    c.kubectl_out(&c.admin, args).unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"))
}

pub fn jsonpath(c: &Cluster, kind: &str, name: &str, ns: Option<&str>, path: &str) -> String {
    let mut args = vec!["get", kind, name, "-o"];
    let jp = format!("jsonpath={path}");
    args.push(&jp);
    if let Some(ns) = ns {
        args.push("-n");
        args.push(ns);
    }
    kubectl(c, &args)
}

pub fn annotation(c: &Cluster, kind: &str, name: &str, ns: Option<&str>, key: &str) -> String {
    let escaped = key.replace('.', "\\.").replace('/', "\\/");
    jsonpath(c, kind, name, ns, &format!("{{.metadata.annotations.{escaped}}}"))
}

pub fn state(c: &Cluster, kind: &str, name: &str, ns: Option<&str>) -> String {
    annotation(c, kind, name, ns, "dormant.dev/state")
}

pub fn wait_until(what: &str, timeout: Duration, cond: impl FnMut() -> bool) {
    wait_until_showing(what, timeout, cond, String::new);
}

/// [`wait_until`], and on timeout also what `show` says (logs, the state
/// the wait looked at).
pub fn wait_until_showing(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> bool,
    show: impl Fn() -> String,
) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}\n{}", show());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The notes of the Events with `reason` in `ns`, one per line.
pub fn event_notes(c: &Cluster, ns: &str, reason: &str) -> String {
    events_jsonpath(c, ns, reason, "{.note}")
}

/// One line per Event with `reason` in `ns`: `fields` (a jsonpath) of each.
fn events_jsonpath(c: &Cluster, ns: &str, reason: &str, fields: &str) -> String {
    kubectl(
        c,
        &[
            "get",
            "events.events.k8s.io",
            "-n",
            ns,
            &format!("--field-selector=reason={reason}"),
            "-o",
            &format!("jsonpath={{range .items[*]}}{fields}{{\"\\n\"}}{{end}}"),
        ],
    )
}

/// How many times Events with `reason` happened in `ns`: a repeat of an
/// Event joins its series (`series.count`) rather than adding an object.
pub fn event_count(c: &Cluster, ns: &str, reason: &str) -> u64 {
    events_jsonpath(c, ns, reason, "{.metadata.name}={.series.count}")
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(_, count)| count.parse().unwrap_or(1))
        .sum()
}

/// An Event (`events.k8s.io/v1`) as a user reads it with kubectl.
#[derive(Debug, Clone)]
pub struct EventSeen {
    pub reason: String,
    pub action: String,
    pub note: String,
    /// `Kind/name` of the object it is about.
    pub regarding: String,
    /// The controller that wrote it (`dormant` for the agent).
    pub reporting_controller: String,
    /// The replica that wrote it.
    pub reporting_instance: String,
    /// How often it happened: its series' count (or the older API's
    /// count), else 1.
    pub count: u64,
    /// When it first happened.
    pub first: chrono::DateTime<chrono::Utc>,
    /// When it last happened (the series' last observation, else `first`).
    pub last: chrono::DateTime<chrono::Utc>,
}

/// Every Event with `reason` in `ns` (every reason when empty).
pub fn events(c: &Cluster, ns: &str, reason: &str) -> Vec<EventSeen> {
    let mut args = vec!["get", "events.events.k8s.io", "-n", ns, "-o", "json"];
    let selector = format!("--field-selector=reason={reason}");
    if !reason.is_empty() {
        args.push(&selector);
    }
    let list: serde_json::Value = serde_json::from_str(&kubectl_quiet(c, &args)).unwrap();
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
    let time = |v: &serde_json::Value| {
        v.as_str().and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()).map(|t| t.to_utc())
    };
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            // Events written through the older core API (by Kubernetes'
            // own controllers) carry their times in the deprecated fields.
            let first = time(&e["eventTime"])
                .or_else(|| time(&e["deprecatedFirstTimestamp"]))
                .unwrap_or_else(|| panic!("an Event without a time: {e}"));
            EventSeen {
                reason: text(&e["reason"]),
                action: text(&e["action"]),
                note: text(&e["note"]),
                regarding: format!("{}/{}", text(&e["regarding"]["kind"]), text(&e["regarding"]["name"])),
                reporting_controller: text(&e["reportingController"]),
                reporting_instance: text(&e["reportingInstance"]),
                count: e["series"]["count"].as_u64().or(e["deprecatedCount"].as_u64()).unwrap_or(1),
                first,
                last: time(&e["series"]["lastObservedTime"])
                    .or_else(|| time(&e["deprecatedLastTimestamp"]))
                    .unwrap_or(first),
            }
        })
        .collect()
}

/// How many times Events with `reason` in `ns` say `regarding` (`Kind/name`)
/// happened: each Event counts its series.
pub fn times(c: &Cluster, ns: &str, reason: &str, regarding: &str) -> u64 {
    events(c, ns, reason).iter().filter(|e| e.regarding == regarding).map(|e| e.count).sum()
}

/// A Deployment `name` in `ns` running `replicas` pods labelled
/// `app=<name>`, as YAML.
pub fn deployment_yaml(ns: &str, name: &str, replicas: u32) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  replicas: {replicas}\n  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    spec: {{containers: [{{name: c, image: nginx:1.27}}]}}\n---\n"
    )
}

pub fn pods(c: &Cluster, ns: &str, selector: &str) -> usize {
    kubectl(c, &["get", "pods", "-n", ns, "-l", selector, "-o", "name"]).lines().count()
}

pub fn ready_pods(c: &Cluster, ns: &str, selector: &str) -> usize {
    kubectl(
        c,
        &[
            "get",
            "pods",
            "-n",
            ns,
            "-l",
            selector,
            "-o",
            "jsonpath={range .items[*]}{.metadata.deletionTimestamp}/{.status.conditions[?(@.type==\"Ready\")].status} {end}",
        ],
    )
    .split_whitespace()
    .filter(|s| *s == "/True")
    .count()
}

/// A TLS connection to 127.0.0.1:`port` as a client that trusts `ca_pem`
/// and presents `client` if given, offering HTTP/1.1 (the tests write raw
/// HTTP/1.1 on it).
pub async fn tls_connect(
    port: u16,
    ca_pem: &str,
    client: Option<&testbed::pki::CertPair>,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    tls_connect_alpn(port, ca_pem, client, b"http/1.1").await
}

/// [`tls_connect`] offering `alpn` (`h2` for an HTTP/2 client).
pub async fn tls_connect_alpn(
    port: u16,
    ca_pem: &str,
    client: Option<&testbed::pki::CertPair>,
    alpn: &[u8],
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| e.to_string())?;
    tls_handshake(tcp, client_config(ca_pem, client, alpn)).await
}

/// A TLS session on `tcp`, a connection already open to a server on
/// 127.0.0.1, as [`tls_connect`] makes one.
pub async fn tls_over(
    tcp: std::net::TcpStream,
    ca_pem: &str,
    client: Option<&testbed::pki::CertPair>,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    tcp.set_nonblocking(true).map_err(|e| e.to_string())?;
    let tcp = tokio::net::TcpStream::from_std(tcp).map_err(|e| e.to_string())?;
    tls_handshake(tcp, client_config(ca_pem, client, b"http/1.1")).await
}

/// A client configuration that trusts `ca_pem`, presents `client` if
/// given, and offers `alpn`.
pub fn client_config(
    ca_pem: &str,
    client: Option<&testbed::pki::CertPair>,
    alpn: &[u8],
) -> rustls::ClientConfig {
    let roots =
        dormant::tls::root_store(&dormant::tls::certs_from_pem(ca_pem.as_bytes(), "ca").unwrap()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(dormant::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match client {
        Some(p) => builder
            .with_client_auth_cert(
                dormant::tls::certs_from_pem(p.cert_pem.as_bytes(), "cert").unwrap(),
                dormant::tls::key_from_pem(p.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    config
}

async fn tls_handshake(
    tcp: tokio::net::TcpStream,
    config: rustls::ClientConfig,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .map_err(|e| format!("tls: {e}"))
}

/// A GET with `cert` (if any) and extra header lines (`Host: 127.0.0.1`
/// unless they name one); (status, the whole answer).
pub async fn raw_request(
    proxy: &str,
    path: &str,
    cert: Option<&testbed::pki::CertPair>,
    headers: &[&str],
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let port: u16 = proxy.rsplit(':').next().unwrap().parse().unwrap();
    let mut tls = tls_connect(port, &Cluster::shared().ca.cert_pem, cert).await.unwrap();
    let mut extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    if !headers.iter().any(|h| h.to_ascii_lowercase().starts_with("host:")) {
        extra.insert_str(0, "Host: 127.0.0.1\r\n");
    }
    tls.write_all(format!("GET {path} HTTP/1.1\r\n{extra}Connection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(60), tls.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    // An answer is read to its end: the server closes the connection
    // (`Connection: close`). A close without TLS close_notify after it is
    // fine; no answer, or none within a minute, is not.
    assert!(read.is_ok() && !text.is_empty(), "GET {path}: {read:?} after {text:?}");
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, text)
}

/// POSTs an audit batch to an agent's webhook at `/audit/host` on
/// 127.0.0.1:`port` (served with the shared cluster's certificate) with
/// bearer `token`; the HTTP status.
pub async fn post_audit_host(port: u16, token: &str, body: String) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = tls_connect(port, &Cluster::shared().ca.cert_pem, None).await.unwrap();
    let req = format!(
        "POST /audit/host HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let read = tls.read_to_end(&mut out).await;
    // An answer read to its end; a close without TLS close_notify after it
    // is fine.
    assert!(read.is_ok() || !out.is_empty(), "{read:?}");
    String::from_utf8_lossy(&out).split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// One audit event: `user` listed the pods of `ns` with kubectl, now.
pub fn audit_event(ns: &str, user: &str) -> String {
    format!(
        r#"{{"auditID":"{user}-1","stage":"ResponseComplete","requestURI":"/api/v1/namespaces/{ns}/pods","verb":"list","user":{{"username":"{user}"}},"userAgent":"kubectl/v1.37.2","objectRef":{{"resource":"pods","namespace":"{ns}"}},"stageTimestamp":"{}"}}"#,
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
    )
}

/// Waits until the target's `dormant.dev/state` is `want`; on a timeout,
/// fails with the agent's log.
pub fn wait_state(
    c: &Cluster,
    kind: &str,
    name: &str,
    ns: Option<&str>,
    want: &str,
    timeout: Duration,
    agent: &Agent,
) {
    let start = std::time::Instant::now();
    loop {
        let s = state(c, kind, name, ns);
        if s == want {
            return;
        }
        if start.elapsed() > timeout {
            panic!("{kind}/{name} is {s:?}, not {want:?}, after {timeout:?}; agent log:\n{}", agent.log());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The repository's Helm chart.
pub fn chart() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("charts/dormant")
}

/// `helm <args>` against the testbed, its caches in the testbed's folder:
/// whether it succeeded, and what it printed.
pub fn helm(c: &Cluster, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(c.bins.path("helm"))
        .args(args)
        .env("KUBECONFIG", &c.admin.kubeconfig)
        .env("HELM_CACHE_HOME", c.dir.join("helm/cache"))
        .env("HELM_CONFIG_HOME", c.dir.join("helm/config"))
        .env("HELM_DATA_HOME", c.dir.join("helm/data"))
        .output()
        .unwrap();
    (
        out.status.success(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}
