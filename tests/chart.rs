//! The Helm chart: lint and render for defaults and every option, install
//! into the testbed, and prove its RBAC is exactly enough by running
//! dormant with the chart's ServiceAccount token through a full cycle.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use support::*;
use testbed::Cluster;

fn chart() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("charts/dormant")
}

fn helm(c: &Cluster, args: &[&str]) -> (bool, String) {
    let out = Command::new(c.bins.path("helm"))
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

fn kinds(rendered: &str) -> Vec<String> {
    let mut k: Vec<String> =
        rendered.lines().filter_map(|l| l.strip_prefix("kind: ")).map(|s| s.trim().to_string()).collect();
    k.sort();
    k
}

#[test]
fn the_chart_lints_and_renders_with_defaults_and_with_every_option_on() {
    let c = Cluster::shared();
    let chart = chart();
    let all = chart.join("ci/all-options.yaml");
    for extra in [vec![], vec!["-f", all.to_str().unwrap()]] {
        let mut args = vec!["lint", "--strict", chart.to_str().unwrap(), "--kube-version", "1.37.2"];
        args.extend(extra.iter());
        let (ok, out) = helm(c, &args);
        assert!(ok, "helm lint {extra:?}: {out}");
    }
    let (ok, defaults) =
        helm(c, &["template", "d", chart.to_str().unwrap(), "-n", "dormant", "--kube-version", "1.37.2"]);
    assert!(ok, "{defaults}");
    let want = [
        // The agent's, the API's, and the viewer and operator roles for people.
        "ClusterRole",
        "ClusterRole",
        "ClusterRole",
        "ClusterRole",
        "ClusterRoleBinding",
        "ClusterRoleBinding",
        // Three dashboards and where the API is published.
        "ConfigMap",
        "ConfigMap",
        "ConfigMap",
        "ConfigMap",
        "Deployment",
        "PodDisruptionBudget",
        // Leader election; reading the published API.
        "Role",
        "Role",
        // Those two, and reading the cluster's client CA.
        "RoleBinding",
        "RoleBinding",
        "RoleBinding",
        // TLS, the audit token, the session key.
        "Secret",
        "Secret",
        "Secret",
        "Service",
        "Service",
        "Service",
        "ServiceAccount",
    ];
    assert_eq!(kinds(&defaults), want);
    let (ok, everything) = helm(
        c,
        &[
            "template",
            "d",
            chart.to_str().unwrap(),
            "-n",
            "dormant",
            "--kube-version",
            "1.37.2",
            "-f",
            all.to_str().unwrap(),
        ],
    );
    assert!(ok, "{everything}");
    for k in ["Certificate", "ServiceMonitor", "PrometheusRule"] {
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
    let (ok, off) = helm(
        c,
        &["template", "d", chart.to_str().unwrap(), "--kube-version", "1.37.2", "--set", "api.enabled=false"],
    );
    assert!(ok && off.contains("--api=false") && !off.contains("dormant-api"), "{off}");
    assert!(everything.contains("--dry-run") && everything.contains("--proxy-base-domain=vc.example.com"));
    // Prometheus keeps the targets' own namespace label (not the agent's).
    assert!(everything.contains("honorLabels: true"), "{everything}");
    // Host-name routing (<name>.<namespace>.<base>): one wildcard per
    // namespace, as a wildcard covers one label only.
    assert!(everything.contains("*.team-a.vc.example.com") && everything.contains("*.team-b.vc.example.com"));
    assert!(!everything.contains("\"*.vc.example.com\""), "a wildcard that matches no routed name");
    // The real API server accepts what the defaults render.
    let file = c.dir.join("rendered-defaults.yaml");
    std::fs::write(&file, &defaults).unwrap();
    let _ = c.kubectl_out(&c.admin, &["create", "namespace", "dormant"]);
    let out = c.kubectl_out(&c.admin, &["apply", "--dry-run=server", "-f", file.to_str().unwrap()]);
    assert!(out.is_ok(), "{}", out.unwrap_err());
    // A bad value is refused by values.schema.json with the field's name.
    let (ok, out) = helm(
        c,
        &["template", "d", chart.to_str().unwrap(), "--kube-version", "1.37.2", "--set", "agent.qps=0"],
    );
    assert!(!ok && out.contains("/agent/qps"), "{out}");
    // So is a duration the agent would refuse at start (a crash loop).
    for bad in ["agent.leaseDuration=never", "agent.flushInterval=0", "agent.defaultWakeTimeout="] {
        let (ok, out) =
            helm(c, &["template", "d", chart.to_str().unwrap(), "--kube-version", "1.37.2", "--set", bad]);
        let field = bad.split('=').next().unwrap().replace('.', "/");
        assert!(!ok && out.contains(&format!("/{field}")), "{bad}: {out}");
    }
    // As a parent chart's dependency it gets `global` values.
    let (ok, out) = helm(
        c,
        &["template", "d", chart.to_str().unwrap(), "--kube-version", "1.37.2", "--set", "global.region=eu"],
    );
    assert!(ok, "{out}");
}

#[test]
fn helm_install_creates_everything_and_the_chart_rbac_is_exactly_enough() {
    let c = Cluster::shared();
    let id = test_id("chart");
    let release_ns = format!("{id}-system");
    let chart = chart();
    let (ok, out) = helm(
        c,
        &[
            "install",
            "dormant",
            chart.to_str().unwrap(),
            "-n",
            &release_ns,
            "--create-namespace",
            "--wait",
            "--timeout",
            "120s",
            "--set",
            "proxy.service.type=ClusterIP",
        ],
    );
    assert!(ok, "{out}");
    c.wait_established("sleeppolicies.dormant.dev").unwrap();
    for (kind, name) in [
        ("deployment", "dormant"),
        ("serviceaccount", "dormant"),
        ("service", "dormant-proxy"),
        ("service", "dormant-audit"),
        ("service", "dormant-admin"),
        ("secret", "dormant-tls"),
        ("secret", "dormant-audit-token"),
        ("configmap", "dormant-dashboard-savings"),
        ("configmap", "dormant-dashboard-activity"),
        ("configmap", "dormant-dashboard-health"),
        ("role", "dormant-leader"),
        ("poddisruptionbudget", "dormant"),
    ] {
        assert!(
            c.kubectl_out(&c.admin, &["get", kind, name, "-n", &release_ns]).is_ok(),
            "{kind}/{name} missing"
        );
    }
    assert!(c.kubectl_out(&c.admin, &["get", "clusterrole", "dormant"]).is_ok());
    let ca = jsonpath(c, "secret", "dormant-tls", Some(&release_ns), "{.data.ca\\.crt}");
    assert!(!ca.is_empty(), "the generated TLS Secret has a CA for API servers to trust");

    // KEDA's CRD, so pausing a ScaledObject is part of the cycle (and `auth can-i` knows the resource).
    let keda_crd = testbed::Bins::keda_crd().unwrap();
    kubectl(c, &["apply", "--server-side", "-f", &keda_crd.display().to_string()]);
    c.wait_established("scaledobjects.keda.sh").unwrap();
    c.wait_established("scaledjobs.keda.sh").unwrap();
    // What the ServiceAccount may not do.
    let sa = format!("system:serviceaccount:{release_ns}:dormant");
    // `kubectl auth can-i` answers on stdout and exits 1 for "no".
    let can = |verb: &str, what: &str, ns: &str| {
        let out =
            c.kubectl(&c.admin).args(["auth", "can-i", verb, what, "-n", ns, "--as", &sa]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    for (verb, what) in [
        ("delete", "deployments.apps"),
        ("create", "pods"),
        ("update", "secrets"),
        ("list", "secrets"),
        ("delete", "namespaces"),
        ("patch", "nodes"),
    ] {
        assert_eq!(can(verb, what, "default"), "no", "{verb} {what} must be forbidden");
    }
    for (verb, what) in [
        ("patch", "scaledobjects.keda.sh"),
        ("get", "scaledobjects.keda.sh"),
        ("patch", "scaledjobs.keda.sh"),
        ("patch", "deployments.apps"),
        ("patch", "statefulsets.apps"),
        ("deletecollection", "pods"),
        ("get", "secrets"),
        ("create", "events.events.k8s.io"),
    ] {
        assert_eq!(can(verb, what, "default"), "yes", "{verb} {what} is needed");
    }
    // The API: who a caller is, what they may do, the cluster's client CA.
    for (verb, what, ns) in [
        ("create", "tokenreviews.authentication.k8s.io", "default"),
        ("create", "subjectaccessreviews.authorization.k8s.io", "default"),
        ("get", "configmaps/extension-apiserver-authentication", "kube-system"),
    ] {
        assert_eq!(can(verb, what, ns), "yes", "{verb} {what} is needed by the API");
    }
    assert_eq!(can("get", "configmaps/other", "kube-system"), "no", "only the client CA's ConfigMap");
    // People: `edit` may sleep targets, `view` may only look.
    let people = c.namespace("chart-people", &[]).unwrap();
    kubectl(c, &["create", "rolebinding", "e", "--clusterrole=edit", "--user=editor", "-n", &people]);
    kubectl(c, &["create", "rolebinding", "v", "--clusterrole=view", "--user=viewer", "-n", &people]);
    let person = |who: &str, verb: &str| {
        let out = c
            .kubectl(&c.admin)
            .args(["auth", "can-i", verb, "targets.dormant.dev", "-n", &people, "--as", who])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    wait_until("the aggregated roles", Duration::from_secs(30), || person("editor", "sleep") == "yes");
    for (who, verb, answer) in [
        ("editor", "wake", "yes"),
        ("viewer", "get", "yes"),
        ("viewer", "list", "yes"),
        ("viewer", "sleep", "no"),
    ] {
        assert_eq!(person(who, verb), answer, "{who} {verb}");
    }
    // Anyone authenticated may read where the API is.
    let published = c
        .kubectl(&c.admin)
        .args([
            "auth",
            "can-i",
            "get",
            "configmaps/dormant-api",
            "-n",
            "kube-public",
            "--as",
            "x",
            "--as-group",
            "system:authenticated",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&published.stdout).trim(), "yes");
    assert_eq!(can("patch", "leases.coordination.k8s.io", &release_ns), "yes");
    assert_eq!(
        can("patch", "leases.coordination.k8s.io", "default"),
        "no",
        "leases only in its own namespace"
    );

    // dormant, out of cluster, with the chart's ServiceAccount token.
    let token =
        kubectl(c, &["create", "token", "dormant", "-n", &release_ns, "--duration=1h"]).trim().to_string();
    let kubeconfig = c.dir.join(format!("{id}-sa.kubeconfig"));
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: t\n  cluster: {{server: \"{}\", certificate-authority: \"{}\"}}\nusers:\n- name: sa\n  user: {{token: {token}}}\ncontexts:\n- name: t\n  context: {{cluster: t, user: sa}}\ncurrent-context: t\n",
            c.server,
            c.ca_file.display()
        ),
    )
    .unwrap();
    let ns = c.namespace("chart-app", &[("dormant-test", &id)]).unwrap();
    c.kubectl_apply(
        &c.admin,
        &format!(
            r#"apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata: {{name: web, namespace: {ns}}}
spec:
  scaleTargetRef: {{name: web}}
  triggers: [{{type: cron, metadata: {{timezone: UTC, start: "0 8 * * *", end: "0 18 * * *", desiredReplicas: "2"}}}}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: {ns}}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec: {{containers: [{{name: web, image: nginx:1.27}}]}}
---
apiVersion: batch/v1
kind: CronJob
metadata: {{name: job, namespace: {ns}}}
spec:
  schedule: "0 3 * * *"
  jobTemplate: {{spec: {{template: {{spec: {{restartPolicy: Never, containers: [{{name: j, image: busybox:1.37}}]}}}}}}}}
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {{name: vc, namespace: {ns}, labels: {{app: vcluster, release: vc}}}}
spec:
  replicas: 1
  serviceName: vc
  selector: {{matchLabels: {{app: vcluster, release: vc}}}}
  template:
    metadata: {{labels: {{app: vcluster, release: vc}}}}
    spec: {{containers: [{{name: syncer, image: ghcr.io/loft-sh/vcluster-pro:0.30.0}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: app-x-default-x-vc, namespace: {ns}, labels: {{vcluster.loft.sh/managed-by: vc}}}}
spec: {{containers: [{{name: app, image: nginx:1.27}}]}}
---
apiVersion: dormant.dev/v1alpha1
kind: SleepPolicy
metadata: {{name: {id}}}
spec:
  selector: {{namespaceSelector: {{matchLabels: {{dormant-test: {id}}}}}}}
  sleepAfter: 1h
"#
        ),
    )
    .unwrap();
    wait_until("workloads ready", Duration::from_secs(60), || ready_pods(c, &ns, "app=web") == 2);
    let admin_port = testbed::process::free_port().unwrap();
    let proxy_port = testbed::process::free_port().unwrap();
    let args: Vec<String> = vec![
        "agent".into(),
        format!("--namespace={release_ns}"),
        format!("--admin-addr=127.0.0.1:{admin_port}"),
        format!("--namespace-selector=dormant-test={id}"),
        "--identity=chart-sa".into(),
        "--lease-duration=3s".into(),
        // The API too, on the proxy's listener.
        format!("--proxy-addr=127.0.0.1:{proxy_port}"),
        format!("--proxy-cert={}", c.dir.join("apiserver.crt").display()),
        format!("--proxy-key={}", c.dir.join("apiserver.key").display()),
    ];
    let env = vec![
        ("KUBECONFIG".to_string(), kubeconfig.display().to_string()),
        ("RUST_LOG".to_string(), "info".to_string()),
    ];
    let mut agent =
        testbed::spawner::spawn_with_env("dormant-chart-sa", &dormant_bin(), &args, &env, &c.dir).unwrap();
    agent.wait_ready(Duration::from_secs(60), || testbed::process::http_ok(admin_port, "/readyz")).unwrap();

    for target in [format!("namespace/{ns}"), format!("vcluster/{ns}/vc")] {
        let out = dormant(c, &["sleep", &target, "--wait=60s"]);
        assert!(
            out.status.success(),
            "{target}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            agent.tail(40)
        );
    }
    assert_eq!(jsonpath(c, "deployment", "web", Some(&ns), "{.spec.replicas}"), "0");
    assert_eq!(annotation(c, "scaledobject", "web", Some(&ns), "autoscaling.keda.sh/paused-replicas"), "0");
    assert_eq!(jsonpath(c, "cronjob", "job", Some(&ns), "{.spec.suspend}"), "true");
    assert_eq!(jsonpath(c, "statefulset", "vc", Some(&ns), "{.spec.replicas}"), "0");
    wait_until("the synced pod to be deleted", Duration::from_secs(30), || {
        pods(c, &ns, "vcluster.loft.sh/managed-by=vc") == 0
    });
    for target in [format!("namespace/{ns}"), format!("vcluster/{ns}/vc")] {
        let out = dormant(c, &["wake", &target, "--wait=60s"]);
        assert!(
            out.status.success(),
            "{target}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            agent.tail(40)
        );
    }
    assert_eq!(jsonpath(c, "deployment", "web", Some(&ns), "{.spec.replicas}"), "2");
    assert_eq!(annotation(c, "scaledobject", "web", Some(&ns), "autoscaling.keda.sh/paused-replicas"), "");
    // Through the API, with the chart's RBAC: a token (TokenReview), a
    // certificate (the cluster's client CA), and RBAC (SubjectAccessReview).
    kubectl(c, &["create", "serviceaccount", "looker", "-n", &ns]);
    kubectl(
        c,
        &[
            "create",
            "rolebinding",
            "looker",
            "--clusterrole=view",
            &format!("--serviceaccount={ns}:looker"),
            "-n",
            &ns,
        ],
    );
    let looker = kubectl(c, &["create", "token", "looker", "-n", &ns, "--duration=1h"]).trim().to_string();
    let looker_kc = c.dir.join(format!("{id}-looker.kubeconfig"));
    std::fs::write(
        &looker_kc,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: t\n  cluster: {{server: \"{}\", certificate-authority: \"{}\"}}\nusers:\n- name: u\n  user: {{token: {looker}}}\ncontexts:\n- name: t\n  context: {{cluster: t, user: u}}\ncurrent-context: t\n",
            c.server,
            c.ca_file.display()
        ),
    )
    .unwrap();
    for kubeconfig in [&looker_kc, &c.admin.kubeconfig] {
        let out = std::process::Command::new(dormant_bin())
            .args(["status", &format!("--kubeconfig={}", kubeconfig.display())])
            .args([
                &format!("--server=https://127.0.0.1:{proxy_port}"),
                &format!("--proxy-ca={}", c.ca_file.display()),
            ])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains(&ns),
            "{stdout}{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            agent.tail(40)
        );
    }
    assert_eq!(jsonpath(c, "statefulset", "vc", Some(&ns), "{.spec.replicas}"), "1");
    wait_until("the policy status", Duration::from_secs(30), || {
        jsonpath(c, "sleeppolicy", &id, None, "{.status.conditions[?(@.type==\"Valid\")].status}") == "True"
    });
    let events = kubectl(
        c,
        &["get", "events.events.k8s.io", "-n", &ns, "-o", "jsonpath={range .items[*]}{.reason} {end}"],
    );
    assert!(events.contains("Slept") && events.contains("Woke"), "{events}");
    let log = std::fs::read_to_string(&agent.log).unwrap();
    assert!(!log.to_lowercase().contains("forbidden"), "the chart's RBAC fell short:\n{log}");
    agent.kill();
    let (ok, out) = helm(c, &["uninstall", "dormant", "-n", &release_ns, "--wait"]);
    assert!(ok, "{out}");
}
