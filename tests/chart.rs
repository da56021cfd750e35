//! The Helm chart: lint and render for defaults and every option; install
//! into the testbed in both RBAC modes and run dormant under the chart's
//! own ServiceAccount, proxy and audit webhook on, through everything it
//! does. Its RBAC is held to an explicit allowlist (`kubectl auth can-i
//! --list`) and to the evidence of what dormant really did: the host API
//! server's audit log, every request dormant's ServiceAccount made.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use base64::Engine as _;
use serde_json::Value;
use support::*;
use testbed::kubelet::{Kubelet, PodView};
use testbed::process::{free_port, http_ok};
use testbed::vcluster::{VCluster, VClusterOptions};
use testbed::{AuditWebhook, Bins, Cluster, ClusterOptions};

/// The chart tests' cluster: its API server keeps an audit log, so what
/// dormant's ServiceAccount did can be read back.
fn cluster() -> &'static Cluster {
    static C: OnceLock<Result<Cluster, String>> = OnceLock::new();
    match C.get_or_init(|| {
        Cluster::start(ClusterOptions { audit_log: true, ..Default::default() }).map_err(|e| format!("{e:#}"))
    }) {
        Ok(c) => c,
        Err(e) => panic!("testbed cluster failed to start: {e}"),
    }
}

/// `helm template` of the chart with `args` after it (release `d` in
/// namespace `dormant`, Kubernetes 1.37.2).
fn render(c: &Cluster, args: &[&str]) -> String {
    let chart = chart();
    let mut all = vec!["template", "d", chart.to_str().unwrap(), "-n", "dormant", "--kube-version", "1.37.2"];
    all.extend(args);
    let (ok, out) = helm(c, &all);
    assert!(ok, "helm {all:?}: {out}");
    out
}

fn kinds(rendered: &str) -> Vec<String> {
    let mut k: Vec<String> =
        rendered.lines().filter_map(|l| l.strip_prefix("kind: ")).map(|s| s.trim().to_string()).collect();
    k.sort();
    k
}

/// The documents of `rendered` of `kind`.
fn documents<'a>(rendered: &'a str, kind: &str) -> Vec<&'a str> {
    rendered.split("\n---").filter(|d| d.lines().any(|l| l == format!("kind: {kind}"))).collect()
}

/// The token file of the audit token Secret in `rendered`.
fn rendered_tokens(rendered: &str) -> String {
    let secret = documents(rendered, "Secret")
        .into_iter()
        .find(|d| d.contains("audit-token.yaml"))
        .expect("the token Secret");
    let b64 = secret.lines().find_map(|l| l.trim().strip_prefix("tokens: ")).unwrap();
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b64.trim()).unwrap()).unwrap()
}

#[test]
fn the_chart_lints_and_renders_with_defaults_and_with_every_option_on() {
    let c = cluster();
    let chart = chart();
    let all = chart.join("ci/all-options.yaml");
    let all = all.to_str().unwrap();
    for extra in [vec![], vec!["-f", all]] {
        let mut args = vec!["lint", "--strict", chart.to_str().unwrap(), "--kube-version", "1.37.2"];
        args.extend(extra.iter());
        let (ok, out) = helm(c, &args);
        assert!(ok, "helm lint {extra:?}: {out}");
    }
    let defaults = render(c, &[]);
    let want = [
        // Reading, acting; the API's; the viewer and operator roles for people.
        "ClusterRole",
        "ClusterRole",
        "ClusterRole",
        "ClusterRole",
        "ClusterRole",
        "ClusterRoleBinding",
        "ClusterRoleBinding",
        "ClusterRoleBinding",
        // Three dashboards and where the API is published.
        "ConfigMap",
        "ConfigMap",
        "ConfigMap",
        "ConfigMap",
        "Deployment",
        "Job",
        "PodDisruptionBudget",
        // Leader election, reading the client CA, reading where the API
        // is, and the uninstall hook's scaling of the agent to zero.
        "Role",
        "Role",
        "Role",
        "Role",
        "RoleBinding",
        "RoleBinding",
        "RoleBinding",
        "RoleBinding",
        // TLS, the audit tokens, the session key.
        "Secret",
        "Secret",
        "Secret",
        "Service",
        "Service",
        "Service",
        "ServiceAccount",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ];
    assert_eq!(kinds(&defaults), want);
    // `helm uninstall` first restores every sleeping target, under
    // dormant's own ServiceAccount, and only then removes the chart.
    let hook = defaults.split("\n---").find(|d| d.contains("kind: Job")).unwrap();
    fn sa(doc: &str) -> &str {
        doc.lines().find(|l| l.trim().starts_with("serviceAccountName:")).map(str::trim).unwrap_or("")
    }
    let agent = defaults.split("\n---").find(|d| d.contains("kind: Deployment")).unwrap();
    assert!(
        !sa(agent).is_empty() && sa(hook) == sa(agent),
        "the hook runs as {:?}, the agent as {:?}",
        sa(hook),
        sa(agent)
    );
    for want in ["helm.sh/hook: pre-delete", "- restore\n        - --all\n        - --stop-agent="] {
        assert!(hook.contains(want), "the restore hook lacks {want:?}:\n{hook}");
    }
    // Only the hook may scale the agent to zero, and only its Deployment.
    let role = defaults
        .split("\n---")
        .find(|d| d.contains("kind: Role\n") && d.contains("helm.sh/hook: pre-delete"))
        .expect("the hook's Role");
    assert!(
        role.contains("resources: [deployments/scale]")
            && role.contains("resourceNames: [d-dormant]")
            && role.contains("verbs: [patch]"),
        "{role}"
    );
    assert!(!kinds(&render(c, &["--set", "uninstall.restore=false"])).iter().any(|k| k == "Job"));
    let everything = render(c, &["-f", all]);
    for k in ["Certificate", "ServiceMonitor", "PrometheusRule", "NetworkPolicy"] {
        assert!(kinds(&everything).iter().any(|x| x == k), "{k} missing with every option on");
    }
    // The API: published with its URL and CA; the operator role joins
    // `edit`, the viewer role (switched off here) not `view`.
    assert!(defaults.contains("url: \"https://d-dormant-proxy.dormant.svc\""), "{defaults}");
    assert!(defaults.contains("rbac.authorization.k8s.io/aggregate-to-view: \"true\""));
    assert!(everything.contains("url: \"https://dormant.example.com\""));
    assert!(everything.contains("rbac.authorization.k8s.io/aggregate-to-edit: \"true\""));
    assert!(!everything.contains("aggregate-to-view"), "aggregation is switchable");
    assert!(everything.contains("--api-auth-proxy-names=oauth2-proxy"));
    let off = render(c, &["--set", "api.enabled=false"]);
    assert!(off.contains("--api=false") && !off.contains("dormant-api"), "{off}");
    // Without the API (or the proxy it is served on), no grants for it.
    for r in [&off, &render(c, &["--set", "proxy.enabled=false"])] {
        assert!(!r.contains("tokenreviews") && !r.contains("extension-apiserver-authentication"), "{r}");
    }
    assert!(everything.contains("--dry-run") && everything.contains("--proxy-base-domain=vc.example.com"));
    // Opt-ins off by default, each with its flag and its grant when on.
    for flag in [
        "--enable-delete-after",
        "--vcluster-yaml",
        "--pause-argocd-applications",
        "--argocd-namespace=argo-cd",
    ] {
        assert!(everything.contains(flag) && !defaults.contains(flag), "{flag}");
    }
    fn act(r: &str) -> &str {
        documents(r, "ClusterRole").into_iter().find(|d| d.contains("-act\n")).unwrap_or_default()
    }
    assert!(act(&everything).contains("resources: [namespaces]\n  verbs: [delete]"), "{}", act(&everything));
    assert!(!act(&defaults).contains("resources: [namespaces]\n  verbs: [delete]"), "{}", act(&defaults));
    let argo =
        documents(&everything, "Role").into_iter().find(|d| d.contains("argoproj.io")).unwrap_or_default();
    assert!(argo.contains("namespace: argo-cd") && argo.contains("verbs: [get, patch]"), "{argo}");
    assert!(!defaults.contains("argoproj.io"));
    let no_proxy_yaml = render(c, &["--set", "proxy.enabled=false,agent.vclusterYaml=true"]);
    assert!(act(&no_proxy_yaml).contains("resources: [secrets]"), "--vcluster-yaml reads vc-config Secrets");
    // Prometheus keeps the targets' own namespace label (not the agent's).
    assert!(everything.contains("honorLabels: true"), "{everything}");
    // Host-name routing (<name>.<namespace>.<base>): one wildcard per
    // namespace, as a wildcard covers one label only.
    assert!(everything.contains("*.team-a.vc.example.com") && everything.contains("*.team-b.vc.example.com"));
    assert!(!everything.contains("\"*.vc.example.com\""), "a wildcard that matches no routed name");

    // The admin port: the pod's IP from the downward API, not every interface.
    for r in [&defaults, &everything] {
        assert!(r.contains("- --admin-addr=$(POD_IP):9090"), "{r}");
        assert!(
            r.contains("- name: POD_IP\n          valueFrom: {fieldRef: {fieldPath: status.podIP}}"),
            "{r}"
        );
        assert!(!r.contains("0.0.0.0:9090"), "the admin port on every interface");
        // Nothing derived from the audit tokens on the pod (the agent re-reads the file).
        assert!(!r.contains("checksum/"), "a checksum on the pod template: {r}");
    }
    // Audit tokens: the host's, for /audit/host only, by default.
    let tokens = rendered_tokens(&defaults);
    let lines: Vec<Vec<&str>> = tokens.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(lines.len(), 1, "{tokens}");
    assert!(lines[0].len() == 2 && lines[0][0].len() >= 32 && lines[0][1] == "/audit/host", "{tokens}");
    // ... and one per vcluster listed, each for its own path.
    let tokens = rendered_tokens(&everything);
    let paths: Vec<&str> = tokens.lines().map(|l| l.split_whitespace().nth(1).unwrap()).collect();
    assert_eq!(paths, ["/audit/host", "/audit/vcluster/team-a/dev", "/audit/vcluster/team-b/ci"], "{tokens}");
    assert!(tokens.contains("a-fixed-token-for-tests /audit/host\n"), "{tokens}");
    assert!(tokens.contains("a-fixed-vcluster-token /audit/vcluster/team-b/ci\n"), "{tokens}");

    // Cluster mode: everything acts through one ClusterRoleBinding, and an
    // admission policy keeps dormant's writes out of the protected namespaces.
    let policy = documents(&defaults, "ValidatingAdmissionPolicy").concat();
    assert!(policy.contains(r#"values: ["kube-system","kube-public","kube-node-lease"]"#), "{policy}");
    assert!(
        policy.contains(r#"request.userInfo.username == "system:serviceaccount:dormant:d-dormant""#),
        "{policy}"
    );
    let extra = render(c, &["--set", "agent.excludeNamespaces={kube-system,legacy,dormant}"]);
    assert!(
        extra.contains(r#"values: ["kube-system","kube-public","kube-node-lease","legacy"]"#),
        "the values' excluded namespaces, but never dormant's own (its Lease lives there): {extra}"
    );
    assert!(documents(&defaults, "ClusterRoleBinding").concat().contains("name: d-dormant-act"));
    // Namespaces mode: the agent is told its namespaces, a RoleBinding in
    // each grants acting there, and nothing grants it cluster-wide.
    assert!(everything.contains("- --namespaces=team-a,team-b"), "{everything}");
    let bindings = documents(&everything, "RoleBinding").concat();
    for ns in ["team-a", "team-b"] {
        assert!(bindings.contains(&format!("name: d-dormant\n  namespace: {ns}")), "{bindings}");
    }
    assert!(!documents(&everything, "ClusterRoleBinding").concat().contains("d-dormant-act"));
    assert!(documents(&everything, "ValidatingAdmissionPolicy").is_empty());
    assert!(!defaults.contains("--namespaces="), "cluster mode serves every namespace not excluded");
    // Secret reads only with the proxy on.
    // App traffic: off by default, with nothing of it rendered; on, the
    // agent listens on every interface on its port range, advertises the
    // pods its headless Service finds ready, may hold EndpointSlices where
    // it acts, and the NetworkPolicy lets ingress controllers in.
    assert!(!defaults.contains("app-traffic") && !defaults.contains("endpointslices"), "{defaults}");
    for arg in [
        "- --app-traffic-addr=0.0.0.0",
        "- --app-traffic-ports=30000-30099",
        "- --app-traffic-advertise=service:d-dormant-app-traffic",
        "- --app-traffic-max-waiting=500",
        "- --app-traffic-max-connections=5000",
    ] {
        assert!(everything.contains(arg), "{arg}");
    }
    let service = documents(&everything, "Service").concat();
    assert!(
        service.contains("name: d-dormant-app-traffic")
            && service.contains("clusterIP: None")
            && service.contains("{name: app-traffic, port: 30000, protocol: TCP}"),
        "{service}"
    );
    let roles = documents(&everything, "ClusterRole").concat();
    let read = roles.split("name: d-dormant-act").next().unwrap();
    assert!(read.contains("resources: [endpointslices]\n  verbs: [list, watch]"), "{read}");
    let act = documents(&everything, "ClusterRole")
        .into_iter()
        .find(|d| d.contains("name: d-dormant-act"))
        .unwrap();
    for rule in [
        "resources: [services]\n  verbs: [list]",
        "resources: [ingresses]\n  verbs: [list]",
        "resources: [httproutes, grpcroutes]\n  verbs: [list]",
        "resources: [endpointslices]\n  verbs: [get, create, patch, delete]",
    ] {
        assert!(act.contains(rule), "{rule}: {act}");
    }
    let netpol = documents(&everything, "NetworkPolicy").concat();
    assert!(
        netpol.contains("{port: 30000, endPort: 30099, protocol: TCP}") && netpol.contains("ingress-nginx"),
        "{netpol}"
    );

    let no_proxy = render(c, &["--set", "proxy.enabled=false"]);
    assert!(!documents(&no_proxy, "ClusterRole").concat().contains("secrets"), "{no_proxy}");

    // The real API server accepts what the defaults render, and every
    // option on (but the kinds of operators the testbed does not run).
    let file = c.dir.join("rendered-defaults.yaml");
    std::fs::write(&file, &defaults).unwrap();
    ensure_namespace(c, "dormant");
    ensure_namespace(c, "monitoring");
    ensure_namespace(c, "argo-cd");
    let out = c.kubectl_out(&c.admin, &["apply", "--dry-run=server", "-f", file.to_str().unwrap()]);
    assert!(out.is_ok(), "{}", out.unwrap_err());
    let [a, b] = ["team-a", "team-b"].map(|p| c.namespace(p, &[]).unwrap());
    let served = format!("rbac.namespaces={{{a},{b}}}");
    let on_testbed = render(
        c,
        &[
            "-f",
            all,
            "--set",
            "tls.certManager=false,metrics.serviceMonitor.enabled=false,metrics.prometheusRule.enabled=false",
            "--set",
            &served,
        ],
    );
    let file = c.dir.join("rendered-all-options.yaml");
    std::fs::write(&file, &on_testbed).unwrap();
    let out = c.kubectl_out(&c.admin, &["apply", "--dry-run=server", "-f", file.to_str().unwrap()]);
    assert!(out.is_ok(), "{}", out.unwrap_err());

    // A bad value is refused by values.schema.json with the field's name.
    let refused = |set: &str, field: &str| {
        let (ok, out) =
            helm(c, &["template", "d", chart.to_str().unwrap(), "--kube-version", "1.37.2", "--set", set]);
        assert!(!ok && out.contains(field), "{set}: {out}");
    };
    refused("agent.qps=0", "/agent/qps");
    // So is a duration the agent would refuse at start (a crash loop).
    for bad in ["agent.leaseDuration=never", "agent.flushInterval=0", "agent.defaultWakeTimeout="] {
        let field = bad.split('=').next().unwrap().replace('.', "/");
        refused(bad, &format!("/{field}"));
    }
    refused("rbac.mode=namespaces", "/rbac/namespaces");
    refused("rbac.mode=everywhere", "/rbac/mode");
    refused("audit.token=two words", "/audit/token");
    refused("audit.vclusters[0].namespace=team-a", "/audit/vclusters/0");
    // A namespace dormant never acts in cannot be served.
    let (ok, out) = helm(
        c,
        &[
            "template",
            "d",
            chart.to_str().unwrap(),
            "--kube-version",
            "1.37.2",
            "--set",
            "rbac.mode=namespaces,rbac.namespaces={team-a,kube-system}",
        ],
    );
    assert!(!ok && out.contains("rbac.namespaces lists kube-system"), "{out}");
    // As a parent chart's dependency it gets `global` values.
    let (ok, out) = helm(
        c,
        &["template", "d", chart.to_str().unwrap(), "--kube-version", "1.37.2", "--set", "global.region=eu"],
    );
    assert!(ok, "{out}");

    // The cluster's own CA as the audit client CA would let every kubelet
    // report: refused where the chart can see the cluster.
    let install = |ca: &Path| {
        helm(
            c,
            &[
                "install",
                "ca-check",
                chart.to_str().unwrap(),
                "-n",
                "dormant",
                "--dry-run=server",
                // Where the API is published is one ConfigMap per cluster:
                // a name of its own beside the other tests' releases.
                "--set",
                "api.discovery.name=ca-check-api",
                "--set-file",
                &format!("audit.clientCA={}", ca.display()),
            ],
        )
    };
    let (ok, out) = install(&c.ca_file);
    assert!(!ok && out.contains("audit.clientCA contains the cluster's CA"), "{out}");
    let own = c.dir.join("audit-client-ca.crt");
    std::fs::write(&own, testbed::pki::Ca::new("api-servers").unwrap().cert_pem).unwrap();
    let (ok, out) = install(&own);
    assert!(ok, "a CA of its own is fine: {out}");
}

// ---------------------------------------------------------------------
// The chart's RBAC, run.

/// What dormant's ServiceAccount may do, as `kubectl auth can-i --list`
/// writes it (`resource.group[/subresource]`, verb).
type Grants = BTreeSet<(String, String)>;

fn grants(list: &[(&str, &[&str])]) -> Grants {
    list.iter().flat_map(|(r, verbs)| verbs.iter().map(|v| (r.to_string(), v.to_string()))).collect()
}

/// Everywhere: reads that find targets, and its own policies' status.
const READS: &[(&str, &[&str])] = &[
    ("namespaces", &["list", "watch"]),
    ("deployments.apps", &["list", "watch"]),
    ("statefulsets.apps", &["list", "watch"]),
    ("replicasets.apps", &["list", "watch"]),
    ("cronjobs.batch", &["list", "watch"]),
    ("jobs.batch", &["list", "watch"]),
    ("pods", &["list", "watch"]),
    ("sleeppolicies.dormant.dev", &["list", "watch"]),
    ("sleeppolicies.dormant.dev/status", &["patch"]),
];

/// Where dormant serves (everywhere in cluster mode).
const ACT: &[(&str, &[&str])] = &[
    ("namespaces", &["get", "patch"]),
    ("deployments.apps", &["get", "patch"]),
    ("statefulsets.apps", &["get", "patch"]),
    ("replicasets.apps", &["get", "patch"]),
    ("cronjobs.batch", &["get", "patch"]),
    ("jobs.batch", &["get", "patch"]),
    ("scaledobjects.keda.sh", &["get", "list", "patch"]),
    ("scaledjobs.keda.sh", &["get", "list", "patch"]),
    ("pods", &["delete"]),
    ("secrets", &["get"]),
    ("events.events.k8s.io", &["create", "patch"]),
];

/// In dormant's own namespace.
const LEADER: &[(&str, &[&str])] = &[("leases.coordination.k8s.io", &["get", "create", "patch"])];

/// The agent's API (on with the proxy), cluster-wide: who a caller is
/// (a bearer token: TokenReview) and what they may do with a target
/// (SubjectAccessReview). Neither reads nor changes anything stored.
const API: &[(&str, &[&str])] = &[
    ("tokenreviews.authentication.k8s.io", &["create"]),
    ("subjectaccessreviews.authorization.k8s.io", &["create"]),
];

/// The agent's API, in kube-system: the cluster's client CA (for callers
/// with a client certificate), that one ConfigMap only. A grant limited to
/// names is written `resource[name]`.
const CLIENT_CA: &[(&str, &[&str])] = &[("configmaps[extension-apiserver-authentication]", &["get"])];

/// `kubectl auth can-i --list` for `user` in `ns`: its resource rules.
fn can_i_list(c: &Cluster, user: &str, ns: &str) -> Grants {
    let out = kubectl(c, &["auth", "can-i", "--list", "--as", user, "-n", ns]);
    let mut g = Grants::new();
    for line in out.lines().skip(1).filter(|l| !l.starts_with(' ')) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        // resource, non-resource URLs ([]), resource names, [verbs...]
        let (resource, names) = (cols[0], cols[2]);
        assert!(names.ends_with(']'), "a rule limited to several names, not expected: {line}");
        let resource = match names {
            "[]" => resource.to_string(),
            one => format!("{resource}{one}"),
        };
        let verbs = line[line.rfind('[').unwrap()..].trim_matches(|ch| ch == '[' || ch == ']');
        for v in verbs.split_whitespace() {
            g.insert((resource.clone(), v.to_string()));
        }
    }
    g
}

/// One request dormant made, from the host API server's audit log.
#[derive(Debug, Clone)]
struct Used {
    /// The object's namespace (a Namespace's own name for itself); `None`
    /// for a request across namespaces or of a cluster-scoped object.
    namespace: Option<String>,
    grant: (String, String),
    /// The grant limited to the object's name (`resource[name]`), for a
    /// request on one named object.
    named: Option<(String, String)>,
    code: u64,
    decision: String,
    /// Shown when an assertion fails.
    #[allow(dead_code)]
    uri: String,
}

/// Every request `user` made with dormant's user agent (the agent, and
/// dormant's code the test drives) since the log began.
fn used_by(c: &Cluster, user: &str) -> Vec<Used> {
    let log = std::fs::read_to_string(c.audit_log()).unwrap();
    let needle = format!("\"username\":\"{user}\"");
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for line in log.lines().filter(|l| l.contains(&needle)) {
        let e: Value = serde_json::from_str(line).unwrap();
        if e["user"]["username"] != user
            || e.get("impersonatedUser").is_some()
            || !e["userAgent"].as_str().unwrap_or_default().starts_with("dormant/")
            || e["stage"] == "ResponseStarted"
        {
            continue;
        }
        if !seen.insert(e["auditID"].as_str().unwrap().to_string()) {
            continue;
        }
        let o = &e["objectRef"];
        let Some(resource) = o["resource"].as_str() else {
            // A non-resource URL (discovery, /version): everyone's.
            assert_eq!(e["annotations"]["authorization.k8s.io/decision"], "allow", "{line}");
            continue;
        };
        let mut r = resource.to_string();
        if let Some(g) = o["apiGroup"].as_str().filter(|g| !g.is_empty()) {
            r = format!("{r}.{g}");
        }
        if let Some(s) = o["subresource"].as_str() {
            r = format!("{r}/{s}");
        }
        let verb = e["verb"].as_str().unwrap().to_string();
        out.push(Used {
            namespace: o["namespace"].as_str().map(str::to_string),
            named: o["name"].as_str().map(|n| (format!("{r}[{n}]"), verb.clone())),
            grant: (r, verb),
            code: e["responseStatus"]["code"].as_u64().unwrap_or(0),
            decision: e["annotations"]["authorization.k8s.io/decision"].as_str().unwrap_or("").to_string(),
            uri: e["requestURI"].as_str().unwrap_or("").to_string(),
        });
    }
    out
}

/// The chart installed as release `<id>` in `<id>-system`, its pods run
/// by a kubelet of its own (the testbed's: each container a local process
/// from the pod's spec, with its mounted Secrets and its ServiceAccount's
/// token), and what the tests check it with.
struct Release {
    id: String,
    ns: String,
    fullname: String,
    /// `system:serviceaccount:<ns>:<fullname>`
    sa: String,
    /// The chart's CA and certificate, and a kubeconfig of the
    /// ServiceAccount for kubectl.
    dir: PathBuf,
    kubeconfig: PathBuf,
    ca_pem: String,
    /// Path → token, from the chart's token Secret.
    tokens: BTreeMap<String, String>,
    args: Vec<String>,
    /// The release's ports (admin, proxy, audit): the kubelet's pods share
    /// the host's network, so each release listens on its own.
    ports: (u16, u16, u16),
    kubelet: Kubelet,
}

fn install(c: &Cluster, id: &str, values: &str) -> Release {
    install_crd(c);
    let keda_crd = testbed::Bins::keda_crd().unwrap();
    kubectl(c, &["apply", "--server-side", "-f", &keda_crd.display().to_string()]);
    c.wait_established("scaledobjects.keda.sh").unwrap();
    c.wait_established("scaledjobs.keda.sh").unwrap();
    let ns = format!("{id}-system");
    let dir = c.dir.join(id);
    std::fs::create_dir_all(&dir).unwrap();
    let kubelet =
        Kubelet::start(c, &format!("{id}-node"), &[("ghcr.io/dormant-dev/dormant", &dormant_bin())]).unwrap();
    let values_file = dir.join("values.yaml");
    std::fs::write(&values_file, values).unwrap();
    let node_file = dir.join("node.yaml");
    std::fs::write(&node_file, kubelet.helm_values()).unwrap();
    let ports = (free_port().unwrap(), free_port().unwrap(), free_port().unwrap());
    let chart = chart();
    let (ok, out) = helm(
        c,
        &[
            "install",
            id,
            chart.to_str().unwrap(),
            "-n",
            &ns,
            "--create-namespace",
            "--wait",
            "--timeout",
            "180s",
            "-f",
            values_file.to_str().unwrap(),
            "-f",
            node_file.to_str().unwrap(),
            // Where the API is published is one ConfigMap per cluster: a
            // name of its own beside the other tests' releases.
            "--set",
            &format!("api.discovery.name={id}-api"),
            "--set",
            &format!("admin.port={},proxy.port={},audit.port={}", ports.0, ports.1, ports.2),
            // One pod: a standby would listen on the leader's ports.
            "--set",
            "replicaCount=1",
        ],
    );
    let pods = kubelet.pods();
    assert!(
        ok,
        "{out}\npods: {pods:#?}\n{}",
        pods.values().map(|p| p.tail(30)).collect::<Vec<_>>().join("\n")
    );
    let fullname = format!("{id}-dormant");
    let sa = format!("system:serviceaccount:{ns}:{fullname}");
    let secret = |name: &str, key: &str| {
        kubectl(
            c,
            &[
                "get",
                "secret",
                name,
                "-n",
                &ns,
                "-o",
                &format!("go-template={{{{index .data \"{key}\" | base64decode}}}}"),
            ],
        )
    };
    for key in ["tls.crt", "tls.key", "ca.crt"] {
        std::fs::write(dir.join(key), secret(&format!("{fullname}-tls"), key)).unwrap();
    }
    let token_file = secret(&format!("{fullname}-audit-token"), "tokens");
    let tokens = token_file
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 2, "every generated token is limited to one path: {token_file}");
            (f[1].to_string(), f[0].to_string())
        })
        .collect();
    let token = kubectl(c, &["create", "token", &fullname, "-n", &ns, "--duration=1h"]).trim().to_string();
    let kubeconfig = dir.join("sa.kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: t\n  cluster: {{server: \"{}\", certificate-authority: \"{}\"}}\nusers:\n- name: sa\n  user: {{token: {token}}}\ncontexts:\n- name: t\n  context: {{cluster: t, user: sa}}\ncurrent-context: t\n",
            c.server,
            c.ca_file.display()
        ),
    )
    .unwrap();
    let args = kubectl(
        c,
        &[
            "get",
            "deployment",
            &fullname,
            "-n",
            &ns,
            "-o",
            "jsonpath={.spec.template.spec.containers[0].args}",
        ],
    );
    let args: Vec<String> = serde_json::from_str(&args).unwrap();
    let ca_pem = std::fs::read_to_string(dir.join("ca.crt")).unwrap();
    Release { id: id.into(), ns, fullname, sa, dir, kubeconfig, ca_pem, tokens, args, ports, kubelet }
}

/// The chart's agent pod, running (from its rendered spec, on the
/// release's kubelet) and Ready by its own readiness probe.
struct RunningAgent {
    /// `namespace/name` of its pod.
    pod: String,
    ip: String,
    admin: u16,
    proxy: u16,
    audit: u16,
}

impl RunningAgent {
    fn tail(&self, r: &Release) -> String {
        r.kubelet.pods().get(&self.pod).map(|p| p.tail(40)).unwrap_or_default()
    }
}

/// The pods of the chart's Deployment that the kubelet runs.
fn agent_pods(r: &Release) -> Vec<(String, PodView)> {
    let prefix = format!("{}/{}-", r.ns, r.fullname);
    r.kubelet
        .pods()
        .into_iter()
        .filter(|(k, p)| k.starts_with(&prefix) && !k.contains("-restore-") && p.phase == "Running")
        .collect()
}

/// Scales the chart's Deployment to `replicas` and waits for its pods to
/// follow: the one pod Ready, or every process ended and its pod gone.
fn scale_agent(c: &Cluster, r: &Release, replicas: u32) -> Option<RunningAgent> {
    kubectl(c, &["scale", "deployment", &r.fullname, "-n", &r.ns, &format!("--replicas={replicas}")]);
    wait_until("the agent's pods to follow its scale", Duration::from_secs(120), || {
        let pods = agent_pods(r);
        let listed = kubectl(c, &["get", "pods", "-n", &r.ns, "-o", "name"]);
        let listed = listed
            .lines()
            .filter(|l| l.starts_with(&format!("pod/{}-", r.fullname)))
            .filter(|l| !l.contains("-restore-"))
            .count();
        pods.len() == replicas as usize && listed == replicas as usize && pods.iter().all(|(_, p)| p.ready)
    });
    (replicas > 0).then(|| running_agent(r))
}

/// The running agent: its pod's IP, where its admin port listens (that IP
/// only: the chart binds it to `$(POD_IP)`, and the port has no
/// authentication).
fn running_agent(r: &Release) -> RunningAgent {
    let pods = agent_pods(r);
    assert_eq!(pods.len(), 1, "one agent pod: {pods:#?}");
    let (pod, view) = pods.into_iter().next().unwrap();
    assert!(view.ready && view.probes_passed > 0, "Ready by its own probe: {view:#?}");
    let (admin, proxy, audit) = r.ports;
    assert!(testbed::process::http_ok_at(&view.ip, admin, "/readyz"), "{}", view.tail(30));
    assert!(!http_ok(admin, "/readyz"), "the admin port listens beyond the pod's IP");
    RunningAgent { pod, ip: view.ip, admin, proxy, audit }
}

/// The chart's audit token Secret's `tokens`, after setting it to `set`.
fn tokens_secret(c: &Cluster, r: &Release, set: Option<&str>) -> String {
    let name = format!("{}-audit-token", r.fullname);
    if let Some(content) = set {
        let patch = serde_json::json!({"stringData": {"tokens": content}}).to_string();
        kubectl(c, &["patch", "secret", &name, "-n", &r.ns, "--type=merge", "-p", &patch]);
    }
    kubectl(
        c,
        &["get", "secret", &name, "-n", &r.ns, "-o", "go-template={{index .data \"tokens\" | base64decode}}"],
    )
}

fn metric(agent: &RunningAgent, line_start: &str) -> f64 {
    testbed::process::http_body_at(&agent.ip, agent.admin, "/metrics")
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// POSTs an audit batch to the agent's webhook at `path` with `token`, as
/// an API server trusting the chart's CA would (to `localhost`, one of the
/// certificate's names); the HTTP status.
fn post_audit(r: &Release, port: u16, path: &str, token: &str, body: &str) -> u16 {
    let roots =
        dormant::tls::root_store(&dormant::tls::certs_from_pem(r.ca_pem.as_bytes(), "ca").unwrap()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(dormant::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut conn = rustls::ClientConnection::new(
        Arc::new(config),
        rustls_pki_types::ServerName::try_from("localhost").unwrap(),
    )
    .unwrap();
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    write!(
        tls,
        "POST {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\ncontent-type: application/json\r\nauthorization: Bearer {token}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = Vec::new();
    if let Err(e) = tls.read_to_end(&mut answer) {
        // A server that closes without TLS's close_notify after answering.
        assert!(!answer.is_empty(), "no answer from the audit webhook: {e}");
    }
    let answer = String::from_utf8_lossy(&answer);
    answer.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{answer}"))
}

/// An audit batch: `user` listed the pods of `ns`.
fn audit_batch(ns: &str, user: &str) -> String {
    format!(
        r#"{{"kind":"EventList","apiVersion":"audit.k8s.io/v1","metadata":{{}},"items":[{{"level":"Metadata","auditID":"{}","stage":"ResponseComplete","requestURI":"/api/v1/namespaces/{ns}/pods","verb":"list","user":{{"username":"{user}","groups":["system:authenticated"]}},"userAgent":"curl/8","objectRef":{{"resource":"pods","namespace":"{ns}","apiVersion":"v1"}},"responseStatus":{{"code":200}},"stageTimestamp":"{}"}}]}}"#,
        test_id("audit"),
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
    )
}

/// kubectl as the chart's ServiceAccount (with kubectl's own user agent,
/// so its requests are not counted as dormant's).
fn kubectl_as_sa(c: &Cluster, r: &Release, args: &[&str]) -> Result<String, String> {
    let out = Command::new(c.bins.path("kubectl"))
        .arg(format!("--kubeconfig={}", r.kubeconfig.display()))
        .args(args)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Everything dormant does in a namespace it serves: the namespace holds
/// a Deployment under a KEDA ScaledObject, a StatefulSet, an ownerless
/// ReplicaSet, a CronJob, a Job, a ScaledJob, and a vcluster (the
/// stand-in: a real API server that reports to the webhook with its own
/// token). Slept and woken by hand, the vcluster woken through the proxy,
/// use reported through the webhook by its API server and by the host's
/// token, a wake that fails (a KEDA record nobody can read) and is
/// retried, and dormant's writes from a stale read, which conflict and are
/// made again from a fresh one. `meanwhile` runs once the agent is
/// ready. The agent is stopped at the end.
fn everything_dormant_does(c: &Cluster, r: &Release, served: &str, meanwhile: impl FnOnce(&RunningAgent)) {
    let id = &r.id;
    let ns = served;
    c.kubectl_apply(
        &c.admin,
        &format!(
            r#"apiVersion: dormant.dev/v1alpha1
kind: SleepPolicy
metadata: {{name: {id}}}
spec:
  selector: {{namespaceSelector: {{matchLabels: {{dormant-test: {id}}}}}}}
  sleepAfter: 1h
  # Jobs are suspended, not left to finish: what the Job grants are for.
  runningJobs: Suspend
---
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata: {{name: web, namespace: {ns}}}
spec:
  scaleTargetRef: {{name: web}}
  triggers: [{{type: cron, metadata: {{timezone: UTC, start: "0 8 * * *", end: "0 18 * * *", desiredReplicas: "2"}}}}]
---
apiVersion: keda.sh/v1alpha1
kind: ScaledJob
metadata: {{name: jobs, namespace: {ns}}}
spec:
  jobTargetRef: {{template: {{spec: {{restartPolicy: Never, containers: [{{name: j, image: busybox:1.37}}]}}}}}}
  triggers: [{{type: cron, metadata: {{timezone: UTC, start: "0 8 * * *", end: "0 18 * * *", desiredReplicas: "1"}}}}]
---
{web}apiVersion: apps/v1
kind: StatefulSet
metadata: {{name: db, namespace: {ns}}}
spec:
  replicas: 1
  serviceName: db
  selector: {{matchLabels: {{app: db}}}}
  template:
    metadata: {{labels: {{app: db}}}}
    spec: {{containers: [{{name: db, image: postgres:17}}]}}
---
apiVersion: apps/v1
kind: ReplicaSet
metadata: {{name: rs, namespace: {ns}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: rs}}}}
  template:
    metadata: {{labels: {{app: rs}}}}
    spec: {{containers: [{{name: rs, image: nginx:1.27}}]}}
---
apiVersion: batch/v1
kind: CronJob
metadata: {{name: nightly, namespace: {ns}}}
spec:
  schedule: "0 3 * * *"
  jobTemplate: {{spec: {{template: {{spec: {{restartPolicy: Never, containers: [{{name: j, image: busybox:1.37}}]}}}}}}}}
---
apiVersion: batch/v1
kind: Job
metadata: {{name: backfill, namespace: {ns}}}
spec:
  suspend: true
  template: {{spec: {{restartPolicy: Never, containers: [{{name: j, image: busybox:1.37}}]}}}}
"#,
            web = deployment_yaml(ns, "web", 2)
        ),
    )
    .unwrap();
    let vc = VCluster::create(
        c,
        ns,
        "vc",
        VClusterOptions {
            pods: 1,
            audit: Some(AuditWebhook {
                url: format!("https://localhost:{}/audit/vcluster/{ns}/vc", r.ports.2),
                ca_pem: r.ca_pem.clone(),
                token: r.tokens[&format!("/audit/vcluster/{ns}/vc")].clone(),
                batch_max_wait: Duration::from_secs(1),
            }),
            ..Default::default()
        },
    )
    .unwrap();
    vc.wait_serving(c, Duration::from_secs(60)).unwrap();
    wait_until("workloads ready", Duration::from_secs(60), || {
        ready_pods(c, ns, "app=web") == 2
            && ready_pods(c, ns, "app=db") == 1
            && ready_pods(c, ns, "app=rs") == 1
    });
    let agent = running_agent(r);
    let tail = |agent: &RunningAgent| agent.tail(r);
    meanwhile(&agent);

    // The agent's API, with the chart's RBAC: someone with `view` here and
    // a token (TokenReview, then SubjectAccessReview per target), and the
    // admin with a client certificate (the cluster's client CA).
    kubectl(c, &["create", "serviceaccount", "looker", "-n", ns]);
    kubectl(
        c,
        &[
            "create",
            "rolebinding",
            "looker",
            "--clusterrole=view",
            &format!("--serviceaccount={ns}:looker"),
            "-n",
            ns,
        ],
    );
    let token = kubectl(c, &["create", "token", "looker", "-n", ns, "--duration=1h"]).trim().to_string();
    let looker_kc = r.dir.join("looker.kubeconfig");
    std::fs::write(
        &looker_kc,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: t\n  cluster: {{server: \"{}\", certificate-authority: \"{}\"}}\nusers:\n- name: u\n  user: {{token: {token}}}\ncontexts:\n- name: t\n  context: {{cluster: t, user: u}}\ncurrent-context: t\n",
            c.server,
            c.ca_file.display()
        ),
    )
    .unwrap();
    for (kubeconfig, args) in [
        (&looker_kc, vec!["status".to_string()]),
        (&c.admin.kubeconfig, vec!["explain".to_string(), format!("namespace/{ns}")]),
    ] {
        let out = Command::new(dormant_bin())
            .args(&args)
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--server=https://localhost:{}", agent.proxy))
            .arg(format!("--proxy-ca={}", r.dir.join("ca.crt").display()))
            .env_remove("KUBECONFIG")
            .env_remove("DORMANT_DIRECT")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains(ns),
            "{args:?} as {}: {stdout}{}\n{}",
            kubeconfig.display(),
            String::from_utf8_lossy(&out.stderr),
            tail(&agent)
        );
    }

    // Sleep, by hand.
    for target in [format!("namespace/{ns}"), format!("vcluster/{ns}/vc")] {
        let out = dormant(c, &["sleep", &target, "--wait=60s"]);
        assert!(out.status.success(), "{target}: {}\n{}", String::from_utf8_lossy(&out.stderr), tail(&agent));
    }
    assert_eq!(jsonpath(c, "deployment", "web", Some(ns), "{.spec.replicas}"), "0");
    assert_eq!(jsonpath(c, "statefulset", "db", Some(ns), "{.spec.replicas}"), "0");
    assert_eq!(jsonpath(c, "replicaset", "rs", Some(ns), "{.spec.replicas}"), "0");
    assert_eq!(jsonpath(c, "cronjob", "nightly", Some(ns), "{.spec.suspend}"), "true");
    assert_eq!(annotation(c, "job", "backfill", Some(ns), "dormant.dev/suspend-before-sleep"), "true");
    assert_eq!(annotation(c, "scaledobject", "web", Some(ns), "autoscaling.keda.sh/paused-replicas"), "0");
    assert_eq!(annotation(c, "scaledjob", "jobs", Some(ns), "autoscaling.keda.sh/paused"), "true");
    assert_eq!(jsonpath(c, "statefulset", "vc", Some(ns), "{.spec.replicas}"), "0");
    wait_until("the synced pod to be deleted and the vcluster down", Duration::from_secs(30), || {
        pods(c, ns, "vcluster.loft.sh/managed-by=vc") == 0 && !vc.is_serving()
    });

    // Through the proxy: the first request wakes the vcluster and is answered.
    let proxied = r.dir.join("vc-proxy.kubeconfig");
    let out = dormant(
        c,
        &[
            "kubeconfig",
            &format!("{ns}/vc"),
            "--server",
            &format!("https://localhost:{}", agent.proxy),
            "--proxy-ca",
            r.dir.join("ca.crt").to_str().unwrap(),
            "-o",
            proxied.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new(c.bins.path("kubectl"))
        .arg(format!("--kubeconfig={}", proxied.display()))
        .args(["get", "namespaces", "--request-timeout=90s"])
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("kube-system"),
        "through the proxy: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        tail(&agent)
    );
    assert_eq!(jsonpath(c, "statefulset", "vc", Some(ns), "{.spec.replicas}"), "1");

    // Use reported by the vcluster's own API server, with its own token.
    vc.wait_serving(c, Duration::from_secs(60)).unwrap();
    let out = Command::new(c.bins.path("kubectl"))
        .arg(format!("--kubeconfig={}", vc.kubeconfig.display()))
        .args(["get", "configmaps", "-n", "default"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let by = || annotation(c, "statefulset", "vc", Some(ns), "dormant.dev/last-activity-by");
    wait_until_showing(
        "the vcluster's API server's report to count",
        Duration::from_secs(30),
        || by().contains("list configmaps (audit)"),
        || {
            format!(
                "last-activity-by: {}\nthe vcluster's API server:\n{}\nthe agent:\n{}",
                by(),
                c.log_tail(&format!("vcluster-{ns}-vc-apiserver"), 30),
                tail(&agent)
            )
        },
    );
    assert!(metric(&agent, "dormant_audit_batches_total{outcome=\"accepted\"}") >= 1.0);
    // The vcluster's own requests (its syncer's list and watch at every
    // start) are reported too, and judged its own: never a use.
    let syncer =
        "dormant_activity_total{source=\"audit\",outcome=\"ignored\",rule=\"builtin-vcluster-syncer\"}";
    assert!(metric(&agent, syncer) >= 1.0, "{}", tail(&agent));
    // The host's token reports use of the sleeping namespace, which wakes
    // it; but its wake cannot proceed (a KEDA record nobody can read): it
    // is retried, and its repeated WakeFailed Event is one Event, counted.
    let record = "dormant.dev/keda-paused-replicas-before-sleep";
    let kept = annotation(c, "scaledobject", "web", Some(ns), record);
    assert!(!kept.is_empty(), "the ScaledObject's pause is recorded");
    kubectl(c, &["annotate", "scaledobject", "web", "-n", ns, &format!("{record}=???"), "--overwrite"]);
    let host = &r.tokens["/audit/host"];
    let vc_token = &r.tokens[&format!("/audit/vcluster/{ns}/vc")];
    assert_eq!(post_audit(r, agent.audit, "/audit/host", host, &audit_batch(ns, "ci-bot")), 200);
    wait_until("the host's report to count", Duration::from_secs(30), || {
        annotation(c, "namespace", ns, None, "dormant.dev/last-activity-by")
            .starts_with("ci-bot list pods (audit)")
    });
    wait_until("WakeFailed to repeat", Duration::from_secs(60), || {
        kubectl(
            c,
            &[
                "get",
                "events.events.k8s.io",
                "-n",
                ns,
                "--field-selector=reason=WakeFailed",
                "-o",
                "jsonpath={.items[*].series.count}",
            ],
        )
        .split_whitespace()
        .any(|n| n.parse::<u32>().unwrap_or(0) >= 2)
    });
    // Each token reports for its own path only.
    let refused = "dormant_audit_batches_total{outcome=\"unauthorized\"}";
    let before = metric(&agent, refused);
    for (path, token) in [("/audit/host", vc_token), (&*format!("/audit/vcluster/{ns}/vc"), host)] {
        assert_eq!(post_audit(r, agent.audit, path, token, &audit_batch(ns, "mallory")), 401, "{path}");
    }
    assert_eq!(metric(&agent, refused), before + 2.0, "{}", tail(&agent));
    kubectl(c, &["annotate", "scaledobject", "web", "-n", ns, &format!("{record}={kept}"), "--overwrite"]);
    wait_until("the namespace awake", Duration::from_secs(90), || state(c, "namespace", ns, None) == "awake");
    assert_eq!(jsonpath(c, "deployment", "web", Some(ns), "{.spec.replicas}"), "2");
    assert_eq!(jsonpath(c, "statefulset", "db", Some(ns), "{.spec.replicas}"), "1");
    assert_eq!(jsonpath(c, "replicaset", "rs", Some(ns), "{.spec.replicas}"), "1");
    assert_eq!(jsonpath(c, "cronjob", "nightly", Some(ns), "{.spec.suspend}"), "false");
    assert_eq!(
        jsonpath(c, "job", "backfill", Some(ns), "{.spec.suspend}"),
        "true",
        "its own suspend, given back"
    );
    assert_eq!(annotation(c, "scaledobject", "web", Some(ns), "autoscaling.keda.sh/paused-replicas"), "");
    assert_eq!(annotation(c, "scaledjob", "jobs", Some(ns), "autoscaling.keda.sh/paused"), "");
    let events = kubectl(
        c,
        &["get", "events.events.k8s.io", "-n", ns, "-o", "jsonpath={range .items[*]}{.reason} {end}"],
    );
    assert!(events.contains("Slept") && events.contains("Woke"), "{events}");
    wait_until("the policy status", Duration::from_secs(30), || {
        jsonpath(c, "sleeppolicy", id, None, "{.status.conditions[?(@.type==\"Valid\")].status}") == "True"
    });
    scale_agent(c, r, 0);
    drop(vc);

    conflicting_writes_are_made_again_from_a_fresh_read(c, r, ns);
}

/// dormant's writes carry the version they were computed from; one made
/// from a view someone wrote after (as when a write lands between the
/// cache and the patch) conflicts and is made again from a fresh read.
/// A live agent cannot be made to hit that window on cue, so dormant's own
/// writers run here, as the chart's ServiceAccount, from a stale view of
/// each kind of object it writes.
fn conflicting_writes_are_made_again_from_a_fresh_read(c: &Cluster, r: &Release, ns: &str) {
    use dormant::client::{Outcome, Patcher, Throttle};
    use dormant::scaler::{ScaledJobView, ScaledObjectView, Scaler};
    use dormant::target::workload::{WorkloadKind, WorkloadView};

    let object = |kind: &str, name: &str| -> Value {
        let mut args = vec!["get", kind, name, "-o", "json"];
        if kind != "namespace" {
            args.extend(["-n", ns]);
        }
        serde_json::from_str(&kubectl(c, &args)).unwrap()
    };
    let write_after = |kind: &str, name: &str| {
        let mut args = vec!["annotate", kind, name, "example.com/touched=now", "--overwrite"];
        if kind != "namespace" {
            args.extend(["-n", ns]);
        }
        kubectl(c, &args);
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    rt.block_on(async {
        let kc = kube::config::Kubeconfig::read_from(&r.kubeconfig).unwrap();
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.unwrap();
        let client = dormant::client::client_from(config).unwrap();
        let patcher = Patcher::new(client, Throttle::new(50.try_into().unwrap(), 50.try_into().unwrap()));
        let scaler = Scaler::new(patcher.clone());
        let annotator = dormant::annotate::Annotator::new(patcher);

        let stale = object("namespace", ns);
        write_after("namespace", ns);
        let target =
            dormant::target::TargetObject::Namespace(Arc::new(serde_json::from_value(stale).unwrap()));
        let when = "2030-01-01T00:00:00Z".to_string();
        let outcome = annotator
            .update(&target, |_| BTreeMap::from([(dormant::vocab::LAST_ACTIVITY, Some(when.clone()))]))
            .await
            .unwrap();
        assert_eq!(outcome, Outcome::Changed);
        assert_eq!(annotation(c, "namespace", ns, None, dormant::vocab::LAST_ACTIVITY), when);

        for (kind, resource, name, field) in [
            (WorkloadKind::Deployment, "deployment", "web", "{.spec.replicas}"),
            (WorkloadKind::StatefulSet, "statefulset", "db", "{.spec.replicas}"),
            (WorkloadKind::ReplicaSet, "replicaset", "rs", "{.spec.replicas}"),
            (WorkloadKind::CronJob, "cronjob", "nightly", "{.spec.suspend}"),
            (
                WorkloadKind::Job,
                "job",
                "backfill",
                "{.metadata.annotations.dormant\\.dev/suspend-before-sleep}",
            ),
        ] {
            let before = jsonpath(c, resource, name, Some(ns), field);
            let stale = WorkloadView::from_json(kind, &object(resource, name)).unwrap();
            write_after(resource, name);
            assert_eq!(
                scaler.sleep_workload(&stale, false, None).await.unwrap(),
                Outcome::Changed,
                "{resource}/{name}"
            );
            assert_ne!(jsonpath(c, resource, name, Some(ns), field), before, "{resource}/{name} slept");
            let fresh = WorkloadView::from_json(kind, &object(resource, name)).unwrap();
            assert_eq!(scaler.wake_workload(&fresh, None).await.unwrap(), Outcome::Changed);
            assert_eq!(jsonpath(c, resource, name, Some(ns), field), before, "{resource}/{name} woken");
        }

        let stale = ScaledObjectView::from_json(&object("scaledobject", "web")).unwrap();
        write_after("scaledobject", "web");
        assert_eq!(scaler.pause_scaled_object(&stale).await.unwrap(), Outcome::Changed);
        assert_eq!(
            annotation(c, "scaledobject", "web", Some(ns), "autoscaling.keda.sh/paused-replicas"),
            "0"
        );
        let fresh = ScaledObjectView::from_json(&object("scaledobject", "web")).unwrap();
        assert_eq!(scaler.resume_scaled_object(&fresh).await.unwrap(), Outcome::Changed);

        let stale = ScaledJobView::from_json(&object("scaledjob", "jobs")).unwrap();
        write_after("scaledjob", "jobs");
        assert_eq!(scaler.pause_scaled_job(&stale).await.unwrap(), Outcome::Changed);
        assert_eq!(annotation(c, "scaledjob", "jobs", Some(ns), "autoscaling.keda.sh/paused"), "true");
        let fresh = ScaledJobView::from_json(&object("scaledjob", "jobs")).unwrap();
        assert_eq!(scaler.resume_scaled_job(&fresh).await.unwrap(), Outcome::Changed);
    });
}

/// The chart's grants are exactly the allowlist, dormant used every one
/// of them where it is granted, and everything it did was granted.
///
/// `granted` is, per namespace, what `kubectl auth can-i --list` must show
/// for dormant's ServiceAccount beyond what every authenticated user may
/// (cluster-wide rules included). The evidence is the host API server's
/// audit log: dormant reads across namespaces (`READS`), asks who its API's
/// callers are and what they may do (`API`), acts in `served` (`ACT`),
/// reads the cluster's client CA in kube-system (`CLIENT_CA`) and holds its
/// Lease in its own namespace (`LEADER`), and makes no request anywhere
/// else.
fn rbac_is_exactly_what_was_used(
    c: &Cluster,
    r: &Release,
    granted: &[(&str, Grants)],
    served: &str,
    anywhere: &str,
) {
    let everyone = format!("system:serviceaccount:{}:default", r.ns);
    let mut cache: BTreeMap<String, (Grants, Grants)> = BTreeMap::new();
    let mut rules = |ns: &str| {
        cache
            .entry(ns.to_string())
            .or_insert_with(|| (can_i_list(c, &r.sa, ns), can_i_list(c, &everyone, ns)))
            .clone()
    };
    for (ns, want) in granted {
        let (sa, all) = rules(ns);
        let beyond: Grants = sa.difference(&all).cloned().collect();
        assert_eq!(
            &beyond,
            want,
            "in {ns}: granted beyond the allowlist {:?}; allowlisted but not granted {:?}",
            beyond.difference(want).collect::<Vec<_>>(),
            want.difference(&beyond).collect::<Vec<_>>()
        );
    }
    let used = used_by(c, &r.sa);
    let mut summary: BTreeMap<(Option<&str>, &(String, String)), usize> = BTreeMap::new();
    for u in &used {
        *summary.entry((u.namespace.as_deref(), &u.grant)).or_default() += 1;
    }
    eprintln!("requests by {} (namespace, grant): count", r.sa);
    for ((ns, g), n) in &summary {
        eprintln!("  {:<28} {:<40} {:<16} {n}", ns.unwrap_or("(across namespaces)"), g.0, g.1);
    }
    // Everything dormant did was allowed, granted where it did it, and
    // only where it serves.
    for u in &used {
        assert!(u.decision == "allow" && u.code != 403, "refused: {u:?}");
        let ns = u.namespace.as_deref();
        let client_ca =
            ns == Some("kube-system") && u.named.as_ref().is_some_and(|n| grants(CLIENT_CA).contains(n));
        assert!(
            ns.is_none() || ns == Some(served) || ns == Some(r.ns.as_str()) || client_ca,
            "dormant made a request in a namespace it does not serve: {u:?}"
        );
        let (sa, all) = rules(ns.unwrap_or(anywhere));
        assert!(
            sa.contains(&u.grant)
                || all.contains(&u.grant)
                || u.named.as_ref().is_some_and(|n| sa.contains(n)),
            "used but not granted: {u:?}"
        );
    }
    // Every grant was used, where it is granted.
    for (ns, want) in [
        (None, READS),
        (None, API),
        (Some(served), ACT),
        (Some("kube-system"), CLIENT_CA),
        (Some(r.ns.as_str()), LEADER),
    ] {
        for g in grants(want) {
            assert!(
                used.iter()
                    .any(|u| u.namespace.as_deref() == ns && (u.grant == g || u.named.as_ref() == Some(&g))),
                "granted but never used {}: {g:?}; used there: {:?}",
                ns.map(|n| format!("in {n}")).unwrap_or("across namespaces".into()),
                used.iter()
                    .filter(|u| u.namespace.as_deref() == ns)
                    .map(|u| &u.grant)
                    .collect::<BTreeSet<_>>()
            );
        }
    }
}

#[test]
fn in_namespaces_mode_dormant_does_everything_where_it_serves_and_nothing_anywhere_else() {
    let c = cluster();
    let id = test_id("rbac-ns");
    let served = c.namespace("served", &[("dormant-test", &id)]).unwrap();
    // Labelled like the served one, and asked to sleep: only the chart's
    // namespace list keeps dormant out.
    let other = c.namespace("other", &[("dormant-test", &id)]).unwrap();
    c.kubectl_apply(
        &c.admin,
        &format!("{}apiVersion: v1\nkind: Secret\nmetadata: {{name: creds, namespace: {other}}}\nstringData: {{password: hunter2}}\n", deployment_yaml(&other, "web", 1)),
    )
    .unwrap();
    let r = install(
        c,
        &id,
        &format!(
            "rbac: {{mode: namespaces, namespaces: [{served}]}}\nagent: {{namespaceSelector: dormant-test={id}, logFormat: plain, leaseDuration: 3s, flushInterval: 1s}}\naudit:\n  vclusters: [{{namespace: {served}, name: vc}}]\ntls: {{extraDnsNames: [localhost]}}\n"
        ),
    );
    assert!(r.args.contains(&format!("--namespaces={served}")), "{:?}", r.args);
    let out = dormant(c, &["sleep", &format!("namespace/{other}")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Where it does not serve, its ServiceAccount may not read a Secret or
    // scale a Deployment.
    let refused = |args: &[&str]| {
        let e = kubectl_as_sa(c, &r, args).expect_err("must be forbidden");
        assert!(e.contains("Forbidden") && e.contains(&r.sa), "{args:?}: {e}");
    };
    refused(&["get", "secret", "creds", "-n", &other]);
    refused(&[
        "patch",
        "deployment",
        "web",
        "-n",
        &other,
        "--type=merge",
        "-p",
        r#"{"spec":{"replicas":0}}"#,
    ]);
    refused(&["annotate", "namespace", &other, "dormant.dev/state=asleep"]);
    refused(&["get", "secrets", "-n", &r.ns]);

    // A vcluster where dormant does not serve, which someone else puts to
    // sleep and wakes while dormant runs: dormant neither routes to it nor
    // reads its credentials.
    let elsewhere = VCluster::create(c, &other, "vc", VClusterOptions::default()).unwrap();
    elsewhere.wait_serving(c, Duration::from_secs(60)).unwrap();
    everything_dormant_does(c, &r, &served, |agent| {
        let kubeconfig = r.dir.join("elsewhere.kubeconfig");
        let out = dormant(
            c,
            &[
                "kubeconfig",
                &format!("{other}/vc"),
                "--server",
                &format!("https://localhost:{}", agent.proxy),
                "--proxy-ca",
                r.dir.join("ca.crt").to_str().unwrap(),
                "-o",
                kubeconfig.to_str().unwrap(),
            ],
        );
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let out = Command::new(c.bins.path("kubectl"))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .args(["get", "namespaces", "--request-timeout=20s"])
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&out.stderr);
        // Not served: the answer any unauthenticated caller gets.
        assert!(
            !out.status.success() && (e.contains("(Unauthorized)") || e.contains("provide credentials")),
            "{e}"
        );
        for replicas in ["0", "1"] {
            kubectl(c, &["scale", "statefulset", "vc", "-n", &other, &format!("--replicas={replicas}")]);
            wait_until("the other vcluster to follow its scale", Duration::from_secs(60), || {
                elsewhere.is_serving() == (replicas == "1")
            });
        }
        elsewhere.wait_serving(c, Duration::from_secs(60)).unwrap();
    });

    // The namespace it does not serve was left alone.
    assert_eq!(jsonpath(c, "deployment", "web", Some(&other), "{.spec.replicas}"), "1");
    assert_eq!(state(c, "namespace", &other, None), "", "dormant wrote on a namespace it does not serve");
    let everywhere: Grants = grants(READS).union(&grants(API)).cloned().collect();
    rbac_is_exactly_what_was_used(
        c,
        &r,
        &[
            (other.as_str(), everywhere.clone()),
            (served.as_str(), everywhere.union(&grants(ACT)).cloned().collect()),
            (r.ns.as_str(), everywhere.union(&grants(LEADER)).cloned().collect()),
            ("kube-system", everywhere.union(&grants(CLIENT_CA)).cloned().collect()),
        ],
        &served,
        &other,
    );

    // helm uninstall leaves nothing asleep: its pre-delete hook runs
    // `dormant restore --all` once, as a Job under the chart's
    // ServiceAccount, while the agent still runs.
    scale_agent(c, &r, 1);
    // The conflict test left a use dated 2030 (read as now, for ever).
    kubectl(c, &["annotate", "namespace", &served, "dormant.dev/last-activity-"]);
    let out = dormant(c, &["sleep", &format!("namespace/{served}"), "--wait=60s"]);
    assert!(
        out.status.success(),
        "{}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&dormant(c, &["explain", &format!("namespace/{served}")]).stdout),
        kubectl(c, &["get", "namespace", &served, "-o", "jsonpath={.metadata.annotations}"]),
    );
    for (kind, name, slept) in
        [("deployment", "web", "0"), ("statefulset", "db", "0"), ("replicaset", "rs", "0")]
    {
        assert_eq!(jsonpath(c, kind, name, Some(&served), "{.spec.replicas}"), slept, "{kind}/{name}");
    }
    // What another dormant put to sleep where this one does not serve
    // (a namespace of its own, written here as it would write it) is not
    // this release's to restore.
    kubectl(c, &["scale", "deployment", "web", "-n", &other, "--replicas=0"]);
    kubectl(c, &["annotate", "deployment", "web", "-n", &other, "dormant.dev/replicas-before-sleep=1"]);
    kubectl(c, &["annotate", "namespace", &other, "dormant.dev/state=asleep"]);
    let (ok, out) = helm(c, &["uninstall", &id, "-n", &r.ns, "--wait"]);
    assert!(ok, "{out}");
    let restores: Vec<PodView> = r
        .kubelet
        .pods()
        .into_iter()
        .filter(|(k, _)| k.starts_with(&format!("{}/{}-restore-", r.ns, r.fullname)))
        .map(|(_, p)| p)
        .collect();
    assert_eq!(
        restores.len(),
        1,
        "the restore runs once: {restores:#?}\n{}",
        restores
            .iter()
            .map(|p| format!("--- {} ---\n{}", p.phase, p.tail(50)))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let log = restores[0].tail(50);
    assert_eq!(restores[0].phase, "Succeeded", "{log}");
    assert!(log.contains("Deployment/web 0 → 2"), "{log}");
    assert_eq!(jsonpath(c, "deployment", "web", Some(&served), "{.spec.replicas}"), "2");
    assert_eq!(jsonpath(c, "statefulset", "db", Some(&served), "{.spec.replicas}"), "1");
    assert_eq!(jsonpath(c, "replicaset", "rs", Some(&served), "{.spec.replicas}"), "1");
    assert_eq!(jsonpath(c, "cronjob", "nightly", Some(&served), "{.spec.suspend}"), "false");
    assert_eq!(jsonpath(c, "job", "backfill", Some(&served), "{.spec.suspend}"), "true", "its own suspend");
    assert_eq!(
        annotation(c, "scaledobject", "web", Some(&served), "autoscaling.keda.sh/paused-replicas"),
        ""
    );
    assert_eq!(state(c, "namespace", &served, None), "awake");
    assert_eq!(jsonpath(c, "deployment", "web", Some(&other), "{.spec.replicas}"), "0", "not its to wake");
    assert_eq!(state(c, "namespace", &other, None), "asleep");
}

#[test]
fn in_cluster_mode_the_api_server_refuses_dormants_writes_where_it_never_acts() {
    let c = cluster();
    let id = test_id("rbac-cl");
    let served = c.namespace("served", &[("dormant-test", &id)]).unwrap();
    let protected = c.namespace("protected", &[("dormant-test", &id)]).unwrap();
    let plain = c.namespace("plain", &[]).unwrap();
    for ns in ["kube-system", &protected, &plain] {
        c.kubectl_apply(&c.admin, &deployment_yaml(ns, &id, 1)).unwrap();
    }
    let r = install(
        c,
        &id,
        &format!(
            "agent: {{namespaceSelector: dormant-test={id}, logFormat: plain, leaseDuration: 3s, flushInterval: 1s, excludeNamespaces: [kube-system, kube-public, kube-node-lease, {protected}]}}\naudit:\n  vclusters: [{{namespace: {served}, name: vc}}]\ntls: {{extraDnsNames: [localhost]}}\nproxy: {{service: {{type: ClusterIP}}}}\n"
        ),
    );
    for (kind, name) in [
        ("deployment", r.fullname.clone()),
        ("serviceaccount", r.fullname.clone()),
        ("service", format!("{}-proxy", r.fullname)),
        ("service", format!("{}-audit", r.fullname)),
        ("service", format!("{}-admin", r.fullname)),
        ("secret", format!("{}-tls", r.fullname)),
        ("secret", format!("{}-audit-token", r.fullname)),
        ("configmap", format!("{}-dashboard-savings", r.fullname)),
        ("role", format!("{}-leader", r.fullname)),
    ] {
        assert!(c.kubectl_out(&c.admin, &["get", kind, &name, "-n", &r.ns]).is_ok(), "{kind}/{name} missing");
    }
    for (kind, name) in [
        ("clusterrole", r.fullname.clone()),
        ("clusterrole", format!("{}-act", r.fullname)),
        ("clusterrolebinding", format!("{}-act", r.fullname)),
        ("validatingadmissionpolicy", format!("{}-protected-namespaces", r.fullname)),
        ("validatingadmissionpolicybinding", format!("{}-protected-namespaces", r.fullname)),
    ] {
        assert!(c.kubectl_out(&c.admin, &["get", kind, &name]).is_ok(), "{kind}/{name} missing");
    }
    assert!(!r.args.iter().any(|a| a.starts_with("--namespaces")), "{:?}", r.args);

    // RBAC grants writes everywhere; the API server's admission refuses
    // them in kube-system and in the namespaces the values exclude.
    assert_eq!(
        kubectl(c, &["auth", "can-i", "patch", "deployments.apps", "-n", "kube-system", "--as", &r.sa])
            .trim(),
        "yes"
    );
    let policy = format!("ValidatingAdmissionPolicy '{}-protected-namespaces'", r.fullname);
    let scale = r#"{"spec":{"replicas":0}}"#;
    for ns in ["kube-system", protected.as_str()] {
        for args in [
            vec!["patch", "deployment", id.as_str(), "-n", ns, "--type=merge", "-p", scale],
            vec!["annotate", "namespace", ns, "dormant.dev/state=asleep"],
        ] {
            let e = kubectl_as_sa(c, &r, &args).expect_err("must be refused");
            assert!(e.contains(&policy) && e.contains("denied request"), "{args:?}: {e}");
        }
        assert_eq!(jsonpath(c, "deployment", &id, Some(ns), "{.spec.replicas}"), "1");
    }
    // The same write elsewhere is dormant's to make (the refusal is the policy's).
    kubectl_as_sa(c, &r, &["patch", "deployment", &id, "-n", &plain, "--type=merge", "-p", scale]).unwrap();
    let out = dormant(c, &["sleep", &format!("namespace/{protected}")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    everything_dormant_does(c, &r, &served, |agent| {
        // A token rotated in the Secret reaches the agent as a change of
        // the mounted file (the kubelet swaps it): accepted without a
        // restart (nothing on the pod template needs to change for it).
        let file = tokens_secret(c, &r, None);
        let old = &r.tokens["/audit/host"];
        let new = format!("rotated-{id}");
        tokens_secret(c, &r, Some(&file.replace(old.as_str(), &new)));
        let post =
            |token: &str| post_audit(&r, agent.audit, "/audit/host", token, &audit_batch(&plain, "ci-bot"));
        wait_until("the rotated token to be read", Duration::from_secs(30), || post(&new) == 200);
        assert_eq!(post(old), 401, "the token rotated out still works");
        tokens_secret(c, &r, Some(&file));
        wait_until("the first token to be read again", Duration::from_secs(30), || post(old) == 200);
    });

    assert_eq!(state(c, "namespace", &protected, None), "", "dormant acted in an excluded namespace");
    let all: Grants = [READS, API, ACT].iter().flat_map(|g| grants(g)).collect();
    rbac_is_exactly_what_was_used(
        c,
        &r,
        &[
            (plain.as_str(), all.clone()),
            ("kube-system", all.union(&grants(CLIENT_CA)).cloned().collect()),
            (served.as_str(), all.clone()),
            (r.ns.as_str(), all.union(&grants(LEADER)).cloned().collect()),
        ],
        &served,
        &plain,
    );

    // helm upgrade with changed values while a namespace sleeps (the CRD
    // applied first: Helm never upgrades crds/): the new pod runs with the
    // new values, the namespace stays asleep with its records, and its
    // wake brings back exactly what was there. (Scaled to zero first: the
    // testbed's pods share one network, so the rolling update's new pod
    // could not listen beside the old one. A rolling update of the
    // chart's two pods, each in a network namespace of its own, is
    // app_traffic::the_charts_pods_hold_app_traffic_…_through_a_rolling_update.)
    let agent = scale_agent(c, &r, 1).unwrap();
    // The conflict test left a use dated 2030 (read as now, for ever).
    kubectl(c, &["annotate", "namespace", &served, "dormant.dev/last-activity-"]);
    let out = dormant(c, &["sleep", &format!("namespace/{served}"), "--wait=60s"]);
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), agent.tail(&r));
    let asleep = |what: &str| {
        assert_eq!(state(c, "namespace", &served, None), "asleep", "{what}");
        assert_eq!(jsonpath(c, "deployment", "web", Some(&served), "{.spec.replicas}"), "0", "{what}");
        assert_eq!(
            annotation(c, "deployment", "web", Some(&served), "dormant.dev/replicas-before-sleep"),
            "2",
            "{what}"
        );
    };
    asleep("before the upgrade");
    scale_agent(c, &r, 0);
    let crd = Bins::repo_root().join("charts/dormant/crds");
    kubectl(c, &["apply", "--server-side", "-f", crd.to_str().unwrap()]);
    let args = upgrade(c, &r, "agent.defaultSleepAfter=2h");
    assert!(args.contains("--default-sleep-after=2h"), "{args}");
    let agent = running_agent(&r);
    asleep("after the upgrade");
    let out = dormant(c, &["wake", &format!("namespace/{served}"), "--wait=90s"]);
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), agent.tail(&r));
    assert_eq!(jsonpath(c, "deployment", "web", Some(&served), "{.spec.replicas}"), "2");
    assert_eq!(jsonpath(c, "statefulset", "db", Some(&served), "{.spec.replicas}"), "1");
    assert_eq!(jsonpath(c, "replicaset", "rs", Some(&served), "{.spec.replicas}"), "1");

    kubectl(c, &["delete", "deployment", &id, "-n", "kube-system"]);
    let (ok, out) = helm(c, &["uninstall", &id, "-n", &r.ns, "--wait"]);
    assert!(ok, "{out}");
}

/// A new version of the SleepPolicy CRD, and `helm upgrade` across it, while
/// a namespace and a vcluster sleep: the agent reads every policy through
/// the change, and every target keeps its state exactly (its mark, its
/// records, the copy on the target) until its wake brings back what ran.
///
/// Only `v1alpha1` has shipped, so the next version is made here as a
/// release would make it: the same schema served as `v1beta1`, which
/// becomes the storage version, with `v1alpha1` still served (one schema:
/// no conversion webhook). Its own cluster: a CRD's storage version is the
/// whole cluster's, and the other tests here apply the one-version CRD.
#[test]
fn a_new_crd_version_and_helm_upgrade_keep_every_targets_state() {
    let c = &Cluster::start(ClusterOptions::default()).unwrap();
    let id = test_id("crdv");
    let ns = c.namespace("team", &[("dormant-test", &id)]).unwrap();
    let r = install(
        c,
        &id,
        &format!(
            "agent: {{namespaceSelector: dormant-test={id}, logFormat: plain, leaseDuration: 3s, flushInterval: 1s}}\ntls: {{extraDnsNames: [localhost]}}\nproxy: {{service: {{type: ClusterIP}}}}\n"
        ),
    );
    c.kubectl_apply(
        &c.admin,
        &format!(
            "apiVersion: dormant.dev/v1alpha1\nkind: SleepPolicy\nmetadata: {{name: {id}}}\nspec:\n  selector: {{namespaceSelector: {{matchLabels: {{dormant-test: {id}}}}}}}\n  sleepAfter: 1h\n---\n{}apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {{name: db, namespace: {ns}}}\nspec:\n  replicas: 1\n  serviceName: db\n  selector: {{matchLabels: {{app: db}}}}\n  template:\n    metadata: {{labels: {{app: db}}}}\n    spec: {{containers: [{{name: db, image: postgres:17}}]}}\n",
            deployment_yaml(&ns, "web", 2)
        ),
    )
    .unwrap();
    let vc = VCluster::create(c, &ns, "vc", VClusterOptions { pods: 1, ..Default::default() }).unwrap();
    vc.wait_serving(c, Duration::from_secs(60)).unwrap();
    wait_until("workloads ready", Duration::from_secs(60), || {
        ready_pods(c, &ns, "app=web") == 2
            && ready_pods(c, &ns, "app=db") == 1
            && pods(c, &ns, "vcluster.loft.sh/managed-by=vc") == 1
    });
    let agent = running_agent(&r);
    // The policy as the agent sees it: every spec field, read back at
    // the version the agent reads.
    let policy = |version: &str| {
        let kind = format!("sleeppolicies.{version}.dormant.dev");
        serde_json::from_str::<Value>(&kubectl(c, &["get", &kind, &id, "-o", "json"])).unwrap()
    };
    let governs = |version: &str| {
        let p = policy(version);
        p["status"]["observedGeneration"] == p["metadata"]["generation"] && p["status"]["targets"] == 2
    };
    wait_until("the policy to govern both targets", Duration::from_secs(60), || governs("v1alpha1"));

    for target in [format!("namespace/{ns}"), format!("vcluster/{ns}/vc")] {
        let out = dormant(c, &["sleep", &target, "--wait=60s"]);
        assert!(
            out.status.success(),
            "{target}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            agent.tail(&r)
        );
    }
    wait_until("the synced pod gone and the vcluster down", Duration::from_secs(30), || {
        pods(c, &ns, "vcluster.loft.sh/managed-by=vc") == 0 && !vc.is_serving()
    });
    // What a wake restores from: every object's replicas and `dormant.dev/`
    // annotations (marks, records, the copy on the target).
    let kept = || {
        [
            ("namespace", ns.as_str(), None),
            ("deployment", "web", Some(&ns)),
            ("statefulset", "db", Some(&ns)),
            ("statefulset", "vc", Some(&ns)),
        ]
        .into_iter()
        .map(|(kind, name, namespace)| {
            (format!("{kind}/{name}"), dormant_state(c, kind, name, namespace.map(String::as_str)))
        })
        .collect::<BTreeMap<_, _>>()
    };
    let before = kept();
    for (what, replicas, record) in
        [("deployment/web", 0, Some("2")), ("statefulset/db", 0, Some("1")), ("statefulset/vc", 0, Some("1"))]
    {
        let (r, marks) = &before[what];
        assert_eq!(r, &serde_json::json!(replicas), "{what}: {before:#?}");
        assert_eq!(
            marks.get("dormant.dev/replicas-before-sleep").and_then(Value::as_str),
            record,
            "{what}: {before:#?}"
        );
    }
    for what in [format!("namespace/{ns}"), "statefulset/vc".into()] {
        assert_eq!(before[&what].1.get("dormant.dev/state"), Some(&Value::from("asleep")), "{before:#?}");
    }

    // The next release's CRD, applied while the agent runs (as `kubectl
    // apply` before `helm upgrade` does): the agent's policy watch goes
    // through the API server's switch to the new storage version.
    let file = r.dir.join("next-crd.json");
    std::fs::write(&file, next_crd_version().to_string()).unwrap();
    kubectl(c, &["apply", "--server-side", "--force-conflicts", "-f", file.to_str().unwrap()]);
    c.wait_established("sleeppolicies.dormant.dev").unwrap();
    wait_until("v1beta1 served", Duration::from_secs(30), || {
        c.kubectl_out(&c.admin, &["get", "sleeppolicies.v1beta1.dormant.dev", &id]).is_ok()
    });
    // The policy changed at the new version (so stored at it) reaches the
    // running agent, which writes its status through the old one.
    let spec = policy("v1alpha1")["spec"].clone();
    kubectl(
        c,
        &[
            "patch",
            "sleeppolicies.v1beta1.dormant.dev",
            &id,
            "--type=merge",
            "-p",
            r#"{"spec":{"sleepAfter":"2h"}}"#,
        ],
    );
    wait_until("the running agent to read the policy stored at v1beta1", Duration::from_secs(60), || {
        governs("v1alpha1")
    });
    assert_eq!(
        jsonpath(c, "crd", "sleeppolicies.dormant.dev", None, "{.status.storedVersions}"),
        r#"["v1alpha1","v1beta1"]"#
    );
    let mut changed = spec.clone();
    changed["sleepAfter"] = "2h".into();
    assert_eq!(policy("v1alpha1")["spec"], changed, "read back at the old version");
    assert_eq!(policy("v1beta1")["spec"], changed, "read back at the new version");
    assert_eq!(kept(), before, "the CRD change moved a target\n{}", agent.tail(&r));

    // helm upgrade with changed values; the new pod reads the policy and
    // leaves every target as it was.
    scale_agent(c, &r, 0);
    assert!(upgrade(c, &r, "agent.defaultSleepAfter=3h").contains("--default-sleep-after=3h"));
    let agent = running_agent(&r);
    kubectl(
        c,
        &[
            "patch",
            "sleeppolicies.v1beta1.dormant.dev",
            &id,
            "--type=merge",
            "-p",
            r#"{"spec":{"sleepAfter":"4h"}}"#,
        ],
    );
    wait_until("the new agent to read the policy", Duration::from_secs(60), || governs("v1beta1"));
    assert_eq!(kept(), before, "the upgrade moved a target\n{}", agent.tail(&r));

    for target in [format!("namespace/{ns}"), format!("vcluster/{ns}/vc")] {
        let out = dormant(c, &["wake", &target, "--wait=90s"]);
        assert!(
            out.status.success(),
            "{target}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            agent.tail(&r)
        );
    }
    assert_eq!(jsonpath(c, "deployment", "web", Some(&ns), "{.spec.replicas}"), "2");
    assert_eq!(jsonpath(c, "statefulset", "db", Some(&ns), "{.spec.replicas}"), "1");
    assert_eq!(jsonpath(c, "statefulset", "vc", Some(&ns), "{.spec.replicas}"), "1");
    vc.wait_serving(c, Duration::from_secs(60)).unwrap();
    wait_until("the synced pod back", Duration::from_secs(60), || {
        pods(c, &ns, "vcluster.loft.sh/managed-by=vc") == 1
    });
}

/// `spec.replicas` and the `dormant.dev/` annotations of one object.
fn dormant_state(c: &Cluster, kind: &str, name: &str, ns: Option<&str>) -> (Value, BTreeMap<String, Value>) {
    let mut args = vec!["get", kind, name, "-o", "json"];
    args.extend(ns.map(|n| ["-n", n]).into_iter().flatten());
    let v: Value = serde_json::from_str(&kubectl(c, &args)).unwrap();
    let marks = v["metadata"]["annotations"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| k.starts_with("dormant.dev/"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    (v["spec"]["replicas"].clone(), marks)
}

/// The chart's CRD as the release after `v1alpha1` would ship it: the same
/// schema also served as `v1beta1`, the new storage version.
fn next_crd_version() -> Value {
    let text =
        std::fs::read_to_string(Bins::repo_root().join("charts/dormant/crds/sleeppolicies.dormant.dev.yaml"))
            .unwrap();
    let mut crd: Value = serde_yaml::from_str(&text).unwrap();
    let versions = crd["spec"]["versions"].as_array_mut().unwrap();
    assert_eq!(versions.len(), 1, "a second version has shipped: test the upgrade to it instead");
    let mut next = versions[0].clone();
    assert_eq!(next["name"], "v1alpha1");
    versions[0]["storage"] = false.into();
    next["name"] = "v1beta1".into();
    next["storage"] = true.into();
    versions.push(next);
    crd
}

/// `helm upgrade` of the release with its values and `set`, waiting for
/// it; the agent container's arguments it renders.
fn upgrade(c: &Cluster, r: &Release, set: &str) -> String {
    let chart = chart();
    let (ok, out) = helm(
        c,
        &[
            "upgrade",
            &r.id,
            chart.to_str().unwrap(),
            "-n",
            &r.ns,
            "--reuse-values",
            "--wait",
            "--timeout",
            "180s",
            "--set",
            set,
        ],
    );
    assert!(ok, "{out}");
    kubectl(
        c,
        &[
            "get",
            "deployment",
            &r.fullname,
            "-n",
            &r.ns,
            "-o",
            "jsonpath={.spec.template.spec.containers[0].args}",
        ],
    )
}
