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

pub fn dormant_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_dormant"))
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
        install_crd(c);
        ensure_namespace(c, lease_ns);
        let admin_port = free_port().unwrap();
        let user = agent_user(c);
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
        let env = vec![
            ("KUBECONFIG".to_string(), user.kubeconfig.display().to_string()),
            ("RUST_LOG".to_string(), "info,dormant=debug,kube_lease_manager=warn".to_string()),
        ];
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

/// Runs `dormant <args>` as the cluster admin.
pub fn dormant(c: &Cluster, args: &[&str]) -> Output {
    std::process::Command::new(dormant_bin())
        .args(args)
        .env("KUBECONFIG", &c.admin.kubeconfig)
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

pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The notes of the Events with `reason` in `ns`, one per line.
pub fn event_notes(c: &Cluster, ns: &str, reason: &str) -> String {
    kubectl(
        c,
        &[
            "get",
            "events.events.k8s.io",
            "-n",
            ns,
            &format!("--field-selector=reason={reason}"),
            "-o",
            "jsonpath={range .items[*]}{.note}{\"\\n\"}{end}",
        ],
    )
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
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| e.to_string())?;
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .map_err(|e| format!("tls: {e}"))
}
