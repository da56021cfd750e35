//! What the self-service tests share: an agent whose proxy listener
//! serves the API, two teams' namespaces, the chart's own roles for
//! targets, users with tokens and certificates, and raw HTTPS requests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Output;

use crate::support::*;
use testbed::Cluster;
use testbed::process::free_port;

/// An agent serving the API, and the namespaces of one test.
pub struct World {
    pub id: String,
    pub agent: Agent,
    /// `https://127.0.0.1:<port>`
    pub url: String,
    pub port: u16,
    /// The CA of the agent's certificate (the testbed's).
    pub ca: PathBuf,
    /// The ConfigMap that publishes the API, as the chart's does (`namespace/name`).
    pub published: String,
}

impl World {
    /// An agent scoped to namespaces labelled `dormant-test=<id>`, serving
    /// the proxy and the API, with `extra` flags.
    pub fn start(prefix: &str, extra: &[&str]) -> World {
        let c = Cluster::shared();
        let id = test_id(prefix);
        install_target_roles(c);
        let port = free_port().unwrap();
        let key = c.dir.join(format!("{id}-session.key"));
        std::fs::write(&key, format!("{}-0123456789abcdef0123456789abcdef", id)).unwrap();
        let mut flags = vec![
            format!("--proxy-addr=127.0.0.1:{port}"),
            format!("--proxy-cert={}", c.dir.join("apiserver.crt").display()),
            format!("--proxy-key={}", c.dir.join("apiserver.key").display()),
            format!("--api-session-key-file={}", key.display()),
        ];
        flags.extend(extra.iter().map(|s| s.to_string()));
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let agent = Agent::start(c, &id, &format!("{id}-system"), &format!("{id}-agent"), &flags);
        let url = format!("https://127.0.0.1:{port}");
        // What the chart publishes in kube-public, readable by everyone
        // authenticated (a name of this test's own).
        let name = format!("{id}-api");
        let yaml = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {name}, namespace: kube-public}}\ndata:\n  url: {url}\n  ca.crt: |\n{}\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {{name: {name}, namespace: kube-public}}\nrules:\n- {{apiGroups: [\"\"], resources: [configmaps], resourceNames: [{name}], verbs: [get]}}\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: {name}, namespace: kube-public}}\nroleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: {name}}}\nsubjects:\n- {{apiGroup: rbac.authorization.k8s.io, kind: Group, name: \"system:authenticated\"}}\n",
            c.ca.cert_pem.lines().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n")
        );
        c.kubectl_apply(&c.admin, &yaml).unwrap();
        World { id, agent, url, port, ca: c.ca_file.clone(), published: format!("kube-public/{name}") }
    }

    /// A namespace of this test's (`<prefix>-…`), a target (idle after an
    /// hour) with a Deployment `web` of one replica.
    pub fn team_namespace(&self, prefix: &str) -> String {
        let c = Cluster::shared();
        let ns = c.namespace(prefix, &[("dormant-test", &self.id)]).unwrap();
        kubectl(c, &["annotate", "namespace", &ns, "dormant.dev/sleep-after=1h"]);
        c.kubectl_apply(&c.admin, &deployment_yaml(&ns, "web", 1)).unwrap();
        wait_until("web ready", std::time::Duration::from_secs(60), || ready_pods(c, &ns, "app=web") == 1);
        ns
    }

    /// `dormant <args>` with `kubeconfig`, through this agent's API (found
    /// from `--server`/`--proxy-ca`).
    pub fn cli(&self, kubeconfig: &Path, args: &[&str]) -> Output {
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        all.push(format!("--kubeconfig={}", kubeconfig.display()));
        all.push(format!("--server={}", self.url));
        all.push(format!("--proxy-ca={}", self.ca.display()));
        std::process::Command::new(dormant_bin())
            .args(&all)
            .env_remove("KUBECONFIG")
            .env_remove("DORMANT_DIRECT")
            .output()
            .unwrap()
    }

    /// `dormant <args>` with `kubeconfig`, finding the agent from what is
    /// published in kube-public.
    pub fn cli_published(&self, kubeconfig: &Path, args: &[&str]) -> Output {
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        all.push(format!("--kubeconfig={}", kubeconfig.display()));
        all.push(format!("--agent-configmap={}", self.published));
        std::process::Command::new(dormant_bin())
            .args(&all)
            .env_remove("KUBECONFIG")
            .env_remove("DORMANT_DIRECT")
            .output()
            .unwrap()
    }

    /// One raw HTTP/1.1 request to the API (with `client` as the TLS
    /// client certificate): (status, headers and body as text).
    pub fn raw(&self, client: Option<&testbed::pki::CertPair>, request: &str) -> (u16, String) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let ca = std::fs::read_to_string(&self.ca).unwrap();
        rt.block_on(async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut tls = tls_connect(self.port, &ca, client).await.unwrap();
            tls.write_all(request.as_bytes()).await.unwrap();
            let mut out = Vec::new();
            // The server closes after its answer; a close without TLS
            // close_notify is an error here, not a missing answer (an empty
            // one gives code 0, which every caller's assertion refuses).
            tokio::time::timeout(std::time::Duration::from_secs(30), tls.read_to_end(&mut out)).await.ok();
            let text = String::from_utf8_lossy(&out).into_owned();
            let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
            (code, text)
        })
    }
}

/// A raw request: `method path`, the headers, and a body (Content-Length set).
pub fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> String {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    r
}

/// The chart's ClusterRoles for targets (`dormant-viewer`,
/// `dormant-operator`, aggregated into `view` and `edit`), rendered by
/// helm from the chart and applied.
pub fn install_target_roles(c: &Cluster) {
    static DONE: std::sync::Once = std::sync::Once::new();
    DONE.call_once(|| {
        let chart = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("charts/dormant");
        let out = std::process::Command::new(c.bins.path("helm"))
            .args([
                "template",
                "dormant",
                chart.to_str().unwrap(),
                "-n",
                "dormant",
                "--kube-version",
                "1.37.2",
            ])
            .args(["--show-only", "templates/api.yaml"])
            .env("HELM_CACHE_HOME", c.dir.join("helm/cache"))
            .env("HELM_CONFIG_HOME", c.dir.join("helm/config"))
            .env("HELM_DATA_HOME", c.dir.join("helm/data"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let rendered = String::from_utf8_lossy(&out.stdout).into_owned();
        let roles: Vec<&str> = rendered
            .split("\n---")
            .filter(|d| {
                d.contains("kind: ClusterRole\n")
                    && (d.contains("name: dormant-viewer") || d.contains("name: dormant-operator"))
            })
            .collect();
        assert_eq!(roles.len(), 2, "the chart's viewer and operator roles:\n{rendered}");
        c.kubectl_apply(&c.admin, &roles.join("\n---\n")).unwrap();
    });
}

/// A ServiceAccount `name` in `ns`, and a token-only kubeconfig for it
/// against the host API server.
pub fn token_user(c: &Cluster, ns: &str, name: &str) -> (String, PathBuf, String) {
    kubectl(c, &["create", "serviceaccount", name, "-n", ns]);
    let token = kubectl(c, &["create", "token", name, "-n", ns, "--duration=1h"]).trim().to_string();
    let path = c.dir.join(format!("{ns}-{name}-token.kubeconfig"));
    std::fs::write(&path, token_kubeconfig(&c.server, &c.ca_file, Some(&token))).unwrap();
    (format!("system:serviceaccount:{ns}:{name}"), path, token)
}

/// A kubeconfig with a token (or no credentials at all).
pub fn token_kubeconfig(server: &str, ca: &Path, token: Option<&str>) -> String {
    let user = match token {
        Some(t) => format!("{{token: {t}}}"),
        None => "{}".to_string(),
    };
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: t\n  cluster: {{server: \"{server}\", certificate-authority: \"{}\"}}\nusers:\n- name: u\n  user: {user}\ncontexts:\n- name: t\n  context: {{cluster: t, user: u}}\ncurrent-context: t\n",
        ca.display()
    )
}

/// Binds `role` to a user (`kind` `User` or `ServiceAccount`) in `ns`.
pub fn bind(c: &Cluster, ns: &str, role: &str, subject: &str) {
    let name = format!("{role}-{}", subject.replace(':', "-"));
    let who = match subject.strip_prefix("system:serviceaccount:") {
        Some(sa) => format!("--serviceaccount={sa}"),
        None => format!("--user={subject}"),
    };
    kubectl(c, &["create", "rolebinding", &name, &format!("--clusterrole={role}"), &who, "-n", ns]);
}

pub fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// The value of the first metric line starting with `line_start`.
pub fn metric(agent: &Agent, line_start: &str) -> f64 {
    agent
        .get("/metrics")
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}
