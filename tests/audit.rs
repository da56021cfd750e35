//! Activity from the real kube-apiserver's audit webhook, pointed at the
//! `dormant` agent: what counts, what is ignored, and what bad input gets.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use support::*;
use testbed::audit::AuditReceiver;
use testbed::pki::{Ca, CertPair};
use testbed::vcluster::{VCluster, VClusterOptions};
use testbed::{Cluster, ClusterOptions, ROBOT_USER_AGENT};

const SCOPE: &str = "audit";

/// One audit-enabled cluster and one agent receiving its webhook, shared by
/// the tests of this file (they isolate by namespace).
struct Env {
    cluster: Cluster,
    agent: Agent,
    receiver: AuditReceiver,
    _dir: tempfile::TempDir,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let receiver = AuditReceiver::new(dir.path(), "dormant-test").unwrap();
        let cluster = Cluster::start(ClusterOptions {
            audit: Some(receiver.webhook("/audit/host")),
            ..Default::default()
        })
        .unwrap();
        let mut flags = receiver.agent_flags();
        flags.push("--audit-max-body=2097152".to_string());
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let agent = Agent::start(&cluster, SCOPE, "dormant-audit", "audit-agent", &flags);
        Env { cluster, agent, receiver, _dir: dir }
    })
}

/// Reads an annotation as dormant itself (never counted as activity).
fn quiet_annotation(c: &Cluster, kind: &str, name: &str, ns: Option<&str>, key: &str) -> String {
    let escaped = key.replace('.', "\\.").replace('/', "\\/");
    let jp = format!("jsonpath={{.metadata.annotations.{escaped}}}");
    let mut args = vec!["get", kind, name, "-o", &jp];
    if let Some(ns) = ns {
        args.extend(["-n", ns]);
    }
    kubectl_quiet(c, &args)
}

fn last_activity(c: &Cluster, ns: &str) -> String {
    quiet_annotation(c, "namespace", ns, None, "dormant.dev/last-activity")
}

fn last_activity_by(c: &Cluster, ns: &str) -> String {
    quiet_annotation(c, "namespace", ns, None, "dormant.dev/last-activity-by")
}

fn quiet_state(c: &Cluster, ns: &str) -> String {
    quiet_annotation(c, "namespace", ns, None, "dormant.dev/state")
}

fn metric(agent: &Agent, line_start: &str) -> f64 {
    agent
        .get("/metrics")
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// New namespaces that are targets (idle after 1 h), once the agent has
/// seen them and the admin's own requests there have settled.
fn idle_targets<const N: usize>(c: &Cluster, prefixes: [&str; N]) -> [String; N] {
    let names = prefixes.map(|p| c.namespace(p, &[("dormant-test", SCOPE)]).unwrap());
    for ns in &names {
        kubectl(c, &["annotate", "namespace", ns, "dormant.dev/sleep-after=1h"]);
    }
    std::thread::sleep(Duration::from_secs(4));
    names
}

#[test]
fn alices_request_updates_her_namespace_within_the_batch_wait_and_no_other() {
    let e = env();
    let c = &e.cluster;
    let [mine, other] = idle_targets(c, ["team-a", "team-b"]);
    // alice may read both (a request refused her would be no use).
    for ns in [&mine, &other] {
        kubectl(c, &["create", "rolebinding", "alice-view", "--clusterrole=view", "--user=alice", "-n", ns]);
    }

    let sent = Instant::now();
    let out = c.kubectl_out(&c.alice, &["get", "pods", "-n", &mine]);
    assert!(out.is_ok(), "{out:?}");
    while !last_activity_by(c, &mine).starts_with("alice list pods (audit)") {
        assert!(
            sent.elapsed() < Duration::from_secs(20),
            "alice's request was not recorded; agent metrics:\n{}\nagent log:\n{}",
            e.agent
                .get("/metrics")
                .lines()
                .filter(|l| l.contains("audit") || l.contains("activity"))
                .collect::<Vec<_>>()
                .join("\n"),
            e.agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "alice's request reached the annotation after {:?} (batch wait 1 s, flush 1 s)",
        sent.elapsed()
    );
    let mine_at = last_activity(c, &mine);
    // Who keeps it awake: counted per source, written with the last activity,
    // and shown by explain.
    let sources: std::collections::BTreeMap<String, u64> =
        serde_json::from_str(&quiet_annotation(c, "namespace", &mine, None, "dormant.dev/activity-sources"))
            .unwrap();
    assert!(sources.get("alice (kubectl)").is_some_and(|n| *n >= 1), "{sources:?}");
    let out = dormant(c, &["explain", &format!("namespace/{mine}")]);
    let explained = String::from_utf8_lossy(&out.stdout);
    assert!(
        explained.lines().any(|l| l.starts_with("Used by:") && l.contains("alice (kubectl): ")),
        "{explained}"
    );

    c.kubectl_out(&c.alice, &["get", "configmaps", "-n", &other]).unwrap();
    wait_until("alice's request on the other namespace", Duration::from_secs(20), || {
        last_activity_by(c, &other).starts_with("alice list configmaps (audit)")
    });
    assert_eq!(last_activity(c, &mine), mine_at, "untouched by requests elsewhere");
}

/// Any pod's token can ask the host API server for any namespace's
/// objects. A request it refuses (403) is no use of that namespace,
/// however often it is made: it keeps nothing awake, and shows in the
/// metrics as turned away by `forbidden`.
#[test]
fn a_forbidden_request_from_another_namespaces_service_account_keeps_nothing_awake() {
    let e = env();
    let c = &e.cluster;
    let [target, intruders] = idle_targets(c, ["forbidden", "intruders"]);
    kubectl(c, &["create", "serviceaccount", "curious", "-n", &intruders]);
    let token = kubectl(c, &["create", "token", "curious", "-n", &intruders]).trim().to_string();
    let rule = "dormant_activity_total{source=\"audit\",outcome=\"ignored\",rule=\"forbidden\"}";
    let (before, seen_before) = (last_activity(c, &target), metric(&e.agent, rule));
    for what in ["pods", "secrets", "configmaps"] {
        let out = kubectl_with_token(c, &token, &["get", what, "-n", &target]);
        assert!(String::from_utf8_lossy(&out.stderr).contains("Forbidden"), "{out:?}");
    }
    wait_until("the three refused requests to be turned away", Duration::from_secs(20), || {
        metric(&e.agent, rule) >= seen_before + 3.0
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(last_activity(c, &target), before, "kept awake by {:?}", last_activity_by(c, &target));
}

/// kubectl against the host API server with a bearer token only.
fn kubectl_with_token(c: &Cluster, token: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(c.bins.path("kubectl"))
        .env("KUBECONFIG", "/dev/null")
        .args(["--server", &c.server, "--token", token, "--certificate-authority"])
        .arg(&c.ca_file)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn a_namespaces_own_service_accounts_do_not_keep_it_awake_unless_its_policy_counts_them() {
    let e = env();
    let c = &e.cluster;
    install_crd(c);
    let own = c.namespace("own-sa", &[("dormant-test", SCOPE)]).unwrap();
    let counts = c.namespace("own-sa-counts", &[("dormant-test", SCOPE), ("own-sa", "counted")]).unwrap();
    c.kubectl_apply(
        &c.admin,
        "apiVersion: dormant.dev/v1alpha1\nkind: SleepPolicy\nmetadata: {name: audit-own-sa-counted}\nspec:\n  selector: {namespaceSelector: {matchLabels: {own-sa: counted}}}\n  sleepAfter: 1h\n  ignore: {ownServiceAccounts: false}\n",
    )
    .unwrap();
    kubectl(c, &["annotate", "namespace", &own, "dormant.dev/sleep-after=1h"]);
    // Each namespace runs an app with a ServiceAccount of its own.
    let token = |ns: &str| {
        kubectl(c, &["create", "serviceaccount", "app", "-n", ns]);
        kubectl(c, &["create", "token", "app", "-n", ns]).trim().to_string()
    };
    let (own_app, counted_app) = (token(&own), token(&counts));
    // Each may do what it does below: a request refused (403) would be no
    // use of anything, whatever its account.
    kubectl(
        c,
        &[
            "create",
            "rolebinding",
            "own-view",
            "--clusterrole=view",
            &format!("--serviceaccount={own}:app"),
            "-n",
            &own,
        ],
    );
    kubectl(
        c,
        &[
            "create",
            "rolebinding",
            "own-view",
            "--clusterrole=view",
            &format!("--serviceaccount={own}:app"),
            "-n",
            &counts,
        ],
    );
    kubectl(c, &["create", "role", "secrets", "--verb=list", "--resource=secrets", "-n", &counts]);
    kubectl(
        c,
        &[
            "create",
            "rolebinding",
            "secrets",
            "--role=secrets",
            &format!("--serviceaccount={counts}:app"),
            "-n",
            &counts,
        ],
    );
    std::thread::sleep(Duration::from_secs(4));
    let rule = "dormant_activity_total{source=\"audit\",outcome=\"ignored\",rule=\"own-service-account\"}";
    let ignored_before = metric(&e.agent, rule);
    let own_before = last_activity(c, &own);

    // The app reads its own namespace's ConfigMaps, as an operator or a
    // config reloader does all day; then the other namespace's, which is
    // use of that one; then the other namespace's own app reads its
    // Secrets, and its policy counts its own service accounts.
    for (token, ns, what) in [
        (&own_app, &own, "configmaps"),
        (&own_app, &counts, "configmaps"),
        (&counted_app, &counts, "secrets"),
    ] {
        let out = kubectl_with_token(c, token, &["get", what, "-n", ns]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let counted_by = format!("system:serviceaccount:{counts}:app list secrets (audit)");
    wait_until("the counted app's request to be recorded", Duration::from_secs(20), || {
        last_activity_by(c, &counts).starts_with(&counted_by)
    });
    let sources = quiet_annotation(c, "namespace", &counts, None, "dormant.dev/activity-sources");
    assert!(sources.contains(&format!("\"system:serviceaccount:{own}:app (kubectl)\"")), "{sources}");
    assert_eq!(
        last_activity(c, &own),
        own_before,
        "its own app kept {own} awake (by {:?})",
        last_activity_by(c, &own)
    );
    assert!(metric(&e.agent, rule) > ignored_before, "not counted as ignored");
}

/// Flux's kustomize-controller re-applies a target's objects all day; its
/// requests never keep the target awake (the agent counts them only with
/// `--count-gitops-requests`). A deployer's account, doing the same thing
/// from the same namespace a moment later, does count: that is what shows
/// the controller's request was seen and left out, not lost.
#[test]
fn a_gitops_controllers_requests_keep_nothing_awake_but_a_deployers_do() {
    let e = env();
    let c = &e.cluster;
    let flux = c.namespace("flux-system", &[("dormant-test", SCOPE)]).unwrap();
    let apps = c.namespace("gitops-apps", &[("dormant-test", SCOPE)]).unwrap();
    kubectl(c, &["annotate", "namespace", &apps, "dormant.dev/sleep-after=1h"]);
    let mut tokens = Vec::new();
    for sa in ["kustomize-controller", "deployer"] {
        kubectl(c, &["create", "serviceaccount", sa, "-n", &flux]);
        kubectl(
            c,
            &[
                "create",
                "rolebinding",
                sa,
                "--clusterrole=edit",
                &format!("--serviceaccount={flux}:{sa}"),
                "-n",
                &apps,
            ],
        );
        tokens.push(kubectl(c, &["create", "token", sa, "-n", &flux]).trim().to_string());
    }
    std::thread::sleep(Duration::from_secs(4));
    let before = last_activity(c, &apps);
    let apply = |token: &str, value: &str| {
        let out = kubectl_with_token(
            c,
            token,
            &[
                "create",
                "configmap",
                &format!("settings-{value}"),
                "-n",
                &apps,
                &format!("--from-literal=v={value}"),
            ],
        );
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    apply(&tokens[0], "flux");
    apply(&tokens[1], "deployer");
    let deployer = format!("system:serviceaccount:{flux}:deployer create configmaps (audit)");
    wait_until("the deployer's request to be recorded", Duration::from_secs(20), || {
        last_activity_by(c, &apps).starts_with(&deployer)
    });
    assert!(last_activity(c, &apps) > before);
    let sources = quiet_annotation(c, "namespace", &apps, None, "dormant.dev/activity-sources");
    assert!(!sources.contains("kustomize-controller"), "Flux counted as use: {sources}");
}

/// kube-apiserver audits a request it could not authenticate with no user
/// at all (`"user":{}`): it counts for nothing, and the batch it comes in,
/// with other people's requests, is still taken.
#[test]
fn a_request_the_api_server_could_not_authenticate_counts_for_nothing() {
    let e = env();
    let c = &e.cluster;
    let [refused, sentinel] = idle_targets(c, ["refused", "sentinel"]);
    kubectl(
        c,
        &["create", "rolebinding", "alice-view", "--clusterrole=view", "--user=alice", "-n", &sentinel],
    );
    let unauthenticated =
        "dormant_activity_total{source=\"audit\",outcome=\"ignored\",rule=\"unauthenticated\"}";
    let ignored_before = metric(&e.agent, unauthenticated);
    let refused_before = last_activity(c, &refused);

    // A token the API server does not know (an expired CI credential,
    // say), then alice, within the same batch wait.
    let out = kubectl_with_token(c, "not-a-token", &["get", "pods", "-n", &refused]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("Unauthorized"), "{stderr}");
    let out = c.kubectl_out(&c.alice, &["get", "pods", "-n", &sentinel]);
    assert!(out.is_ok(), "{out:?}");

    wait_until("alice's request to be recorded", Duration::from_secs(20), || {
        last_activity_by(c, &sentinel).starts_with("alice list pods (audit)")
    });
    assert_eq!(
        last_activity(c, &refused),
        refused_before,
        "an unauthenticated request was counted (by {:?})",
        last_activity_by(c, &refused)
    );
    // Counted as turned away, so its batch was read and taken (a refused
    // batch is decoded into nothing). Only this test sends requests the
    // API server cannot authenticate. (The count of refused batches is no
    // sign: another test sends malformed ones at the same time.)
    assert!(
        metric(&e.agent, unauthenticated) > ignored_before,
        "not counted as ignored; agent log:\n{}",
        e.agent.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_ignored_activity_lets_a_target_sleep_on_time_while_counted_activity_keeps_one_awake() {
    let e = env();
    let c = &e.cluster;
    let polled = c.namespace("gitops", &[("dormant-test", SCOPE)]).unwrap();
    let used = c.namespace("busy", &[("dormant-test", SCOPE)]).unwrap();
    for ns in [&polled, &used] {
        c.kubectl_apply(
            &c.admin,
            &format!("apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: app, namespace: {ns}}}\nspec:\n  replicas: 2\n  selector: {{matchLabels: {{app: a}}}}\n  template:\n    metadata: {{labels: {{app: a}}}}\n    spec: {{containers: [{{name: c, image: nginx:1.27}}]}}\n"),
        )
        .unwrap();
        c.kubectl_apply(
            &c.admin,
            &format!("apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: view, namespace: {ns}}}\nroleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: view}}\nsubjects: [{{apiGroup: rbac.authorization.k8s.io, kind: Group, name: team-a}}, {{apiGroup: rbac.authorization.k8s.io, kind: User, name: ci-robot}}]\n"),
        )
        .unwrap();
        kubectl(
            c,
            &[
                "annotate",
                "namespace",
                ns,
                "dormant.dev/sleep-after=8s",
                "dormant.dev/ignore-user-agents=kubewatch/*",
            ],
        );
    }
    // The robot (a poller no built-in rule ignores) polls both; alice
    // works in one.
    let mut config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&c.robot.kubeconfig).unwrap(),
        &Default::default(),
    )
    .await
    .unwrap();
    config.headers.push((http::header::USER_AGENT, ROBOT_USER_AGENT.parse().unwrap()));
    let robot = kube::Client::try_from(config).unwrap();
    let ignored_before =
        metric(&e.agent, "dormant_activity_total{source=\"audit\",outcome=\"ignored\",rule=\"user-agent\"}");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Stops the pollers however the test ends (a blocking poller would
    // otherwise keep the runtime, and the test, alive after a failure).
    struct StopOnDrop(Arc<std::sync::atomic::AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let _stop_guard = StopOnDrop(stop.clone());
    // The robot's and alice's requests must be let in (a refused one counts
    // for nothing whoever makes it): each failure is kept and reported.
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let poller = {
        let (robot, stop, polled, used) = (robot.clone(), stop.clone(), polled.clone(), used.clone());
        let failures = failures.clone();
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for ns in [&polled, &used] {
                    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
                        kube::Api::namespaced(robot.clone(), ns);
                    if let Err(e) = pods.list(&Default::default()).await {
                        failures.lock().unwrap().push(format!("the robot in {ns}: {e}"));
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let worker = {
        let (c_alice, stop, used) = (c.alice.kubeconfig.clone(), stop.clone(), used.clone());
        let kubectl_bin = c.bins.path("kubectl");
        let failures = failures.clone();
        tokio::task::spawn_blocking(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let out = std::process::Command::new(&kubectl_bin)
                    .arg(format!("--kubeconfig={}", c_alice.display()))
                    .args(["get", "pods", "-n", &used])
                    .output()
                    .unwrap();
                if !out.status.success() {
                    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
                    failures.lock().unwrap().push(format!("alice in {used}: {stderr}"));
                }
                std::thread::sleep(Duration::from_secs(2));
            }
        })
    };

    let polled_ns = polled.clone();
    tokio::task::spawn_blocking(move || {
        let c = &env().cluster;
        wait_until("the polled namespace to fall asleep", Duration::from_secs(60), || {
            quiet_state(c, &polled_ns) == "asleep"
        });
    })
    .await
    .unwrap();
    // On time: it went to sleep when its last counted use was 8 s old
    // (give or take the batch wait and one reconcile).
    // Its idle clock started at its last counted use, or when dormant first
    // saw it if nothing it saw counted.
    let mut last = last_activity(c, &polled);
    if last.is_empty() {
        last = quiet_annotation(c, "namespace", &polled, None, "dormant.dev/first-seen");
    }
    let since = quiet_annotation(c, "namespace", &polled, None, "dormant.dev/asleep-since");
    let last = chrono::DateTime::parse_from_rfc3339(&last).unwrap();
    let since = chrono::DateTime::parse_from_rfc3339(&since).unwrap();
    let late = (since - last).num_milliseconds() as f64 / 1000.0 - 8.0;
    eprintln!("asleep {late:.2}s after its idle deadline");
    assert!((-0.01..3.0).contains(&late), "asleep {late:.2}s after the deadline");
    let by = last_activity_by(c, &polled);
    assert!(!by.starts_with("ci-robot") && !by.starts_with("dormant") && !by.contains("system:"), "{by}");

    // While it sleeps, the robot keeps polling and the controller-manager
    // and dormant itself work in it: none of that wakes it.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(quiet_state(c, &polled), "asleep", "woken by {}", last_activity_by(c, &polled));
    assert_eq!(quiet_state(c, &used), "awake");
    assert!(last_activity_by(c, &used).starts_with("alice list pods (audit)"));
    let ignored_after =
        metric(&e.agent, "dormant_activity_total{source=\"audit\",outcome=\"ignored\",rule=\"user-agent\"}");
    assert!(ignored_after > ignored_before + 10.0, "{ignored_before} -> {ignored_after}");
    assert!(
        metric(
            &e.agent,
            "dormant_activity_total{source=\"audit\",outcome=\"ignored\",rule=\"builtin-user\"}"
        ) > 0.0
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    poller.await.unwrap();
    worker.await.unwrap();
    let failures = failures.lock().unwrap();
    assert!(failures.is_empty(), "requests that should have been let in failed: {failures:#?}");
}

/// Posts to the agent's webhook over HTTPS (trusting the test CA).
/// An audit batch with no events.
const EMPTY_BATCH: &[u8] = br#"{"kind":"EventList","apiVersion":"audit.k8s.io/v1","items":[]}"#;

/// Posts an empty batch to `path` until it is accepted (the agent re-reads
/// its token and CA files within 5 s of a change); fails after 30 s.
async fn accepted_once_reread(
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
    cert: Option<&CertPair>,
    what: &str,
) {
    let started = Instant::now();
    loop {
        let r = post(port, path, headers, EMPTY_BATCH.to_vec(), cert, "POST").await;
        if matches!(r, Ok((200, _))) {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{what} was never read: {r:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn post(
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
    client_cert: Option<&CertPair>,
    method: &str,
) -> Result<(u16, String), String> {
    let tls = tls_connect(port, &env().receiver.ca.cert_pem, client_cert).await?;
    // Raw HTTP/1.1: the server may answer (413) before it has read the
    // whole body and close; the answer is what matters, not the write.
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let (mut rd, mut wr) = tokio::io::split(tls);
    let writer = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        // A write the server cut short by answering first is no failure:
        // the answer, read below, says what happened.
        wr.write_all(head.as_bytes()).await.ok();
        wr.write_all(&body).await.ok();
        wr.flush().await.ok();
        wr
    });
    let mut raw = Vec::new();
    let read = {
        use tokio::io::AsyncReadExt;
        tokio::time::timeout(Duration::from_secs(20), rd.read_to_end(&mut raw)).await
    };
    writer.abort();
    let text = String::from_utf8_lossy(&raw).into_owned();
    // With no answer, how the read ended is the answer (a TLS alert, say).
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("no HTTP response ({read:?}): {text:?}"))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// How the webhook's TLS turns away a client that presents `cert`: the TLS
/// error that ended its session (`Ok`), or, when something else happened,
/// what (`Err`): no connection at all (the port refused it, which is no TLS
/// refusal), or an HTTP answer.
async fn tls_refusal(port: u16, cert: &CertPair) -> Result<rustls::Error, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("no TCP connection: {e}"))?;
    let config = client_config(&env().receiver.ca.cert_pem, Some(cert), b"http/1.1");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let session: std::io::Result<String> = async {
        // In TLS 1.3 the client's side of the handshake ends before the
        // server has judged its certificate: the verdict may come as the
        // first thing read.
        let mut tls = connector.connect(name, tcp).await?;
        tls.write_all(
            b"POST /audit/host HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
        )
        .await?;
        let mut answer = Vec::new();
        tls.read_to_end(&mut answer).await?;
        Ok(String::from_utf8_lossy(&answer).into_owned())
    }
    .await;
    match session {
        Ok(answer) => Err(format!("a TLS session, and an answer: {answer:?}")),
        Err(e) => match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
            Some(tls) => Ok(tls.clone()),
            None => Err(format!("not a TLS error: {e}")),
        },
    }
}

fn batch(ns: &str, user: &str) -> String {
    format!(
        r#"{{"kind":"EventList","apiVersion":"audit.k8s.io/v1","metadata":{{}},"items":[{{"level":"Metadata","auditID":"x1","stage":"ResponseComplete","requestURI":"/api/v1/namespaces/{ns}/pods","verb":"list","user":{{"username":"{user}","groups":["system:authenticated"]}},"userAgent":"curl/8","objectRef":{{"resource":"pods","namespace":"{ns}","apiVersion":"v1"}},"responseStatus":{{"code":200}},"stageTimestamp":"{}"}}]}}"#,
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
    )
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_batches_get_the_right_status_record_nothing_and_the_server_keeps_serving() {
    let e = env();
    let c = &e.cluster;
    let ns = c.namespace("bad-input", &[("dormant-test", SCOPE)]).unwrap();
    kubectl(c, &["annotate", "namespace", &ns, "dormant.dev/sleep-after=1h"]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let bearer = format!("Bearer {}", e.receiver.token);
    let json = ("content-type", "application/json");
    let good = batch(&ns, "mallory").into_bytes();
    let mut missing = batch(&ns, "mallory").replace("\"verb\":\"list\",", "").into_bytes();
    let other_ca = Ca::new("someone-else").unwrap().client("api-server", &[]).unwrap();
    let big = format!(
        "{{\"kind\":\"EventList\",\"apiVersion\":\"audit.k8s.io/v1\",\"items\":[],\"pad\":\"{}\"}}",
        "x".repeat(2_200_000)
    )
    .into_bytes();
    let bomb = gzip(&vec![b' '; 30_000_000]);
    // (case, headers, body, client certificate, method, status, message)
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, Vec<u8>, Option<&'a CertPair>, &'a str, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("no token", vec![json], good.clone(), None, "POST", 401, "Unauthorized"),
        (
            "wrong token",
            vec![json, ("authorization", "Bearer nope")],
            good.clone(),
            None,
            "POST",
            401,
            "Unauthorized",
        ),
        (
            "not json",
            vec![json, ("authorization", &bearer)],
            b"hello".to_vec(),
            None,
            "POST",
            400,
            "not a valid audit EventList",
        ),
        (
            "wrong apiVersion",
            vec![json, ("authorization", &bearer)],
            batch(&ns, "mallory").replace("audit.k8s.io/v1", "audit.k8s.io/v1beta1").into_bytes(),
            None,
            "POST",
            400,
            "expected apiVersion audit.k8s.io/v1",
        ),
        (
            "missing verb",
            vec![json, ("authorization", &bearer)],
            std::mem::take(&mut missing),
            None,
            "POST",
            400,
            "missing field `verb`",
        ),
        (
            "oversize",
            vec![json, ("authorization", &bearer)],
            big,
            None,
            "POST",
            413,
            "larger than 2097152 bytes",
        ),
        (
            "gzip bomb",
            vec![json, ("authorization", &bearer), ("content-encoding", "gzip")],
            bomb,
            None,
            "POST",
            413,
            "larger than",
        ),
        (
            "corrupt gzip",
            vec![json, ("authorization", &bearer), ("content-encoding", "gzip")],
            b"\x1f\x8bnot".to_vec(),
            None,
            "POST",
            400,
            "gzip",
        ),
        (
            "text/plain",
            vec![("content-type", "text/plain"), ("authorization", &bearer)],
            good.clone(),
            None,
            "POST",
            415,
            "application/json",
        ),
        ("GET", vec![json, ("authorization", &bearer)], vec![], None, "GET", 405, "POSTed"),
        (
            "unknown path",
            vec![json, ("authorization", &bearer)],
            good.clone(),
            None,
            "POST",
            404,
            "/audit/host",
        ),
    ];
    // Counters of this agent are shared with the other tests of this file:
    // what these cases add is read as a difference, and only these cases
    // send batches that are refused.
    let outcomes = ["unauthorized", "malformed", "wrong-version", "too-large", "unsupported-media-type"];
    let refused =
        |outcome: &str| metric(&e.agent, &format!("dormant_audit_batches_total{{outcome=\"{outcome}\"}}"));
    let refused_before: Vec<f64> = outcomes.iter().map(|o| refused(o)).collect();
    for (name, headers, body, cert, method, want, needle) in cases {
        let path = if name == "unknown path" { "/audit/somewhere" } else { "/audit/host" };
        let (status, text) = post(e.receiver.port, path, &headers, body, cert, method).await.unwrap();
        assert_eq!(status, want, "{name}: {text}");
        assert!(text.contains(needle), "{name}: {text}");
    }
    // A certificate from another CA does not even get a TLS session: the
    // webhook's port takes the connection and its TLS refuses the
    // certificate as issued by a CA it does not know.
    let refusal = tls_refusal(e.receiver.port, &other_ca).await;
    assert_eq!(
        refusal.as_ref().ok(),
        Some(&rustls::Error::AlertReceived(rustls::AlertDescription::UnknownCA)),
        "{refusal:?}"
    );
    // (The same port, the webhook's own CA: a session, and an answer.)
    let own = e.receiver.ca.client("kube-apiserver", &[]).unwrap();
    let (status, text) =
        post(e.receiver.port, "/audit/host", &[json], EMPTY_BATCH.to_vec(), Some(&own), "POST")
            .await
            .unwrap();
    assert_eq!(status, 200, "{text}");

    // A token limited to one vcluster's path (added to the file while the
    // agent runs) is good there and nowhere else.
    let mut file = std::fs::read_to_string(&e.receiver.token_file).unwrap();
    if !file.contains("vc-only-token") {
        file.push_str("vc-only-token /audit/vcluster/team-x/dev  # one vcluster's API server\n");
        std::fs::write(&e.receiver.token_file, file).unwrap();
    }
    let scoped = [json, ("authorization", "Bearer vc-only-token")];
    accepted_once_reread(e.receiver.port, "/audit/vcluster/team-x/dev", &scoped, None, "the new token").await;
    for path in ["/audit/host", "/audit/vcluster/team-y/prod"] {
        let (status, text) = post(e.receiver.port, path, &scoped, good.clone(), None, "POST").await.unwrap();
        assert_eq!(status, 401, "a token limited to team-x/dev posted to {path}: {text}");
    }
    // The client CA file rotates (the new CA added beside the old one, as
    // in a mounted Secret): the new CA's certificates are accepted without
    // a restart, and the old CA's still are.
    let rotated = Ca::new("rotated-audit-ca").unwrap();
    let rotated_client = rotated.client("kube-apiserver-2", &[]).unwrap();
    let mut bundle = std::fs::read_to_string(&e.receiver.ca_file).unwrap();
    if !bundle.contains(rotated.cert_pem.trim()) {
        bundle.push_str(&rotated.cert_pem);
        std::fs::write(&e.receiver.ca_file, bundle).unwrap();
    }
    accepted_once_reread(e.receiver.port, "/audit/host", &[json], Some(&rotated_client), "the rotated CA")
        .await;
    let old_client = e.receiver.ca.client("kube-apiserver", &[]).unwrap();
    let (status, text) =
        post(e.receiver.port, "/audit/host", &[json], EMPTY_BATCH.to_vec(), Some(&old_client), "POST")
            .await
            .unwrap();
    assert_eq!(status, 200, "{text}");

    // team-x/dev does not exist: its events are accepted and counted as
    // turned away, not dropped unseen.
    let unknown = "dormant_activity_total{source=\"audit\",outcome=\"ignored\",rule=\"unknown-vcluster\"}";
    let before = metric(&e.agent, unknown);
    let (status, text) =
        post(e.receiver.port, "/audit/vcluster/team-x/dev", &scoped, good.clone(), None, "POST")
            .await
            .unwrap();
    assert_eq!(status, 200, "{text}");
    // At least this one: another test's vcluster may report before the
    // agent knows it, and count here too.
    assert!(metric(&e.agent, unknown) >= before + 1.0, "not counted (was {before})");

    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!last_activity_by(c, &ns).contains("mallory"), "a rejected batch was recorded");
    for (outcome, before) in outcomes.iter().zip(&refused_before) {
        assert!(refused(outcome) > *before, "{outcome} not counted (was {before})");
    }

    // The server keeps serving: a good batch (gzip, with a client
    // certificate instead of a token) is recorded.
    let client = e.receiver.ca.client("kube-apiserver", &[]).unwrap();
    let (status, text) = post(
        e.receiver.port,
        "/audit/host",
        &[json, ("content-encoding", "gzip")],
        gzip(&good),
        Some(&client),
        "POST",
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{text}");
    let ns2 = ns.clone();
    tokio::task::spawn_blocking(move || {
        wait_until("the good batch to be recorded", Duration::from_secs(15), || {
            last_activity_by(&env().cluster, &ns2).starts_with("mallory list pods (audit)")
        })
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_served_without_a_restart() {
    let e = env();
    let fingerprint = |port: u16| async move {
        let tls = tls_connect(port, &env().receiver.ca.cert_pem, None).await.unwrap();
        tls.get_ref().1.peer_certificates().unwrap()[0].as_ref().to_vec()
    };
    let before = fingerprint(e.receiver.port).await;
    let fresh = e.receiver.ca.server(&[]).unwrap();
    // Write the key first: the pair is only reloaded when both parse and match.
    let (key, cert) = (&e.receiver.key_file, &e.receiver.cert_file);
    let staged = |p: &std::path::Path| std::path::PathBuf::from(format!("{}.new", p.display()));
    std::fs::write(staged(key), &fresh.key_pem).unwrap();
    std::fs::write(staged(cert), &fresh.cert_pem).unwrap();
    std::fs::rename(staged(key), key).unwrap();
    std::fs::rename(staged(cert), cert).unwrap();
    let start = Instant::now();
    loop {
        let now = fingerprint(e.receiver.port).await;
        if now != before {
            assert_eq!(
                now,
                dormant::tls::certs_from_pem(fresh.cert_pem.as_bytes(), "cert").unwrap()[0].as_ref()
            );
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "still serving the old certificate");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vclusters_api_server_reports_to_its_own_endpoint_and_its_syncer_counts_for_nothing() {
    tokio::task::spawn_blocking(vcluster_audit_scenario).await.unwrap();
}

/// What a vcluster's syncer does to its own API server all the time: list
/// and watch, with the admin credential from the `vc-<name>` Secret and
/// client-go's default user agent for the `vcluster` binary.
async fn act_as_syncer(kubeconfig: &std::path::Path) {
    let mut config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(kubeconfig).unwrap(),
        &Default::default(),
    )
    .await
    .unwrap();
    config.headers.push((
        http::header::USER_AGENT,
        "vcluster/v0.26.1 (linux/amd64) kubernetes/1a2b3c4".parse().unwrap(),
    ));
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::all(kube::Client::try_from(config).unwrap());
    pods.list(&Default::default()).await.unwrap();
    let mut watch = Box::pin(pods.watch(&kube::api::WatchParams::default().timeout(1), "0").await.unwrap());
    while futures::StreamExt::next(&mut watch).await.is_some() {}
}

fn vcluster_audit_scenario() {
    let e = env();
    let c = &e.cluster;
    let ns = c.namespace("vc-audit", &[("dormant-test", SCOPE)]).unwrap();
    let vc = VCluster::create(
        c,
        &ns,
        "dev",
        VClusterOptions {
            audit: Some(e.receiver.webhook(&format!("/audit/vcluster/{ns}/dev"))),
            annotations: vec![("dormant.dev/sleep-after".into(), "1h".into())],
            ..Default::default()
        },
    )
    .unwrap();
    vc.wait_serving(c, Duration::from_secs(60)).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let syncer_rule =
        "dormant_activity_total{source=\"audit\",outcome=\"ignored\",rule=\"builtin-vcluster-syncer\"}";
    let syncer_before = metric(&e.agent, syncer_rule);
    tokio::runtime::Handle::current().block_on(act_as_syncer(&vc.kubeconfig));
    // An app inside the vcluster reads its ConfigMaps with its own
    // ServiceAccount: the vcluster's own workload, not a use of it.
    let in_vc = |args: &[&str]| {
        let out = std::process::Command::new(c.bins.path("kubectl"))
            .arg(format!("--kubeconfig={}", vc.kubeconfig.display()))
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    in_vc(&["create", "serviceaccount", "app", "-n", "default"]);
    let app = in_vc(&["create", "token", "app", "-n", "default"]);
    let out = std::process::Command::new(c.bins.path("kubectl"))
        .env("KUBECONFIG", "/dev/null")
        .args(["--server", &vc.server, "--token", &app, "--certificate-authority"])
        .arg(&c.ca_file)
        .args(["get", "configmaps", "-n", "default"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("Forbidden"), "{out:?}");
    // alice's certificate is valid for the vcluster's API server too. A
    // request it refuses her (403) is no use of it; one it lets her make is.
    std::fs::write(c.dir.join("alice-vc.crt"), &c.alice.cert.cert_pem).unwrap();
    std::fs::write(c.dir.join("alice-vc.key"), &c.alice.cert.key_pem).unwrap();
    let as_alice = |args: &[&str]| {
        std::process::Command::new(c.bins.path("kubectl"))
            .args(["--server", &vc.server, "--certificate-authority"])
            .arg(&c.ca_file)
            .arg(format!("--client-certificate={}", c.dir.join("alice-vc.crt").display()))
            .arg(format!("--client-key={}", c.dir.join("alice-vc.key").display()))
            .args(args)
            .output()
            .unwrap()
    };
    let forbidden_rule = "dormant_activity_total{source=\"audit\",outcome=\"ignored\",rule=\"forbidden\"}";
    let forbidden_before = metric(&e.agent, forbidden_rule);
    let out = as_alice(&["get", "secrets", "-n", "kube-system"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Forbidden"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until("alice's refused request to be seen and turned away", Duration::from_secs(20), || {
        metric(&e.agent, forbidden_rule) > forbidden_before
    });
    // (Its own rules: nothing aggregates `view` in this API server.)
    in_vc(&["create", "clusterrole", "configmap-reader", "--verb=list", "--resource=configmaps"]);
    in_vc(&["create", "clusterrolebinding", "alice-reads", "--clusterrole=configmap-reader", "--user=alice"]);
    // The binding takes a moment to reach the authorizer.
    wait_until("alice to be allowed", Duration::from_secs(20), || {
        as_alice(&["get", "configmaps", "-n", "kube-system"]).status.success()
    });
    wait_until("alice's vcluster request on the vcluster target", Duration::from_secs(20), || {
        quiet_annotation(c, "statefulset", "dev", Some(&ns), "dormant.dev/last-activity-by")
            .starts_with("alice list configmaps (audit)")
    });
    let sources = quiet_annotation(c, "statefulset", "dev", Some(&ns), "dormant.dev/activity-sources");
    assert!(sources.contains(r#""alice (kubectl)":1"#), "her refused request counted too: {sources}");
    // The syncer's requests came first, and none counted.
    let sources = quiet_annotation(c, "statefulset", "dev", Some(&ns), "dormant.dev/activity-sources");
    assert!(!sources.contains("(vcluster)"), "the syncer kept its vcluster awake: {sources}");
    assert!(!sources.contains("system:serviceaccount:default:app"), "its own app kept it awake: {sources}");
    assert!(metric(&e.agent, syncer_rule) >= syncer_before + 2.0, "its list and watch were not seen");
}

/// Two replicas each count activity for the same target and flush their
/// counts into its `activity-sources` annotation from the same view of it:
/// the second write must not replace the first one's counts (it conflicts,
/// reads again and adds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_flushing_counts_for_one_target_lose_none() {
    use dormant::activity::ledger::Flush;
    let e = env();
    let c = &e.cluster;
    let ns = c.namespace("two-replicas", &[("dormant-test", SCOPE)]).unwrap();
    let client = c.client().await.unwrap();
    let (stores, writers) = dormant::target::stores::stores();
    writers.fill(client.clone()).await.unwrap();
    let throttle = dormant::client::Throttle::new(50.try_into().unwrap(), 50.try_into().unwrap());
    let flusher = |_| dormant::activity::flush::AnnotationFlusher {
        stores: stores.clone(),
        annotator: dormant::annotate::Annotator::new(dormant::client::Patcher::new(
            client.clone(),
            throttle.clone(),
        )),
        defaults: Default::default(),
        scope: Default::default(),
    };
    let (a, b) = (flusher(1), flusher(2));
    let target = dormant::target::TargetRef::namespace(&ns);
    let activity = |user: &str| dormant::activity::Activity {
        at: chrono::Utc::now(),
        source: dormant::activity::Source::Audit,
        user: user.into(),
        groups: vec![],
        user_agent: "kubectl/v1.37.2".into(),
        verb: "list".into(),
        resource: None,
        path: "/api/v1/namespaces".into(),
        code: None,
        in_vcluster: false,
    };
    let counts = |n: u64| [("alice (kubectl)".to_string(), n)].into_iter().collect();
    // Both from the store's view before either write (no watch runs here,
    // so the store never sees the first write).
    a.flush(target.clone(), activity("alice"), counts(3)).await.unwrap();
    b.flush(target.clone(), activity("alice"), counts(4)).await.unwrap();
    let sources = annotation(c, "namespace", &ns, None, "dormant.dev/activity-sources");
    assert!(sources.contains(r#""alice (kubectl)":7"#), "3 + 4 counted: {sources}");
}

/// A request sent through dormant's proxy with `X-Dormant-Ignore: true`
/// reaches the vcluster's API server with a mark in its user agent; when
/// that server reports it through the webhook, it counts for nothing there
/// either. (The proxy's side is a unit test of the forwarded headers.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_marked_ignored_by_the_proxy_counts_for_nothing_when_audited() {
    let e = env();
    let c = &e.cluster;
    let [ns] = tokio::task::spawn_blocking(|| idle_targets(&env().cluster, ["marked"])).await.unwrap();
    let bearer = format!("Bearer {}", e.receiver.token);
    let headers = [("content-type", "application/json"), ("authorization", bearer.as_str())];
    let rule = "dormant_activity_total{source=\"audit\",outcome=\"ignored\",rule=\"builtin-user-agent\"}";
    let before = metric(&e.agent, rule);
    let marked = batch(&ns, "dashboard")
        .replace("\"curl/8\"", &format!("\"curl/8 {}\"", dormant::vocab::IGNORED_USER_AGENT_MARK));
    let (status, text) =
        post(e.receiver.port, "/audit/host", &headers, marked.into_bytes(), None, "POST").await.unwrap();
    assert_eq!(status, 200, "{text}");
    // At least this one: `dormant` commands other tests run are audited
    // with dormant's user agent and move this counter too. That it counted
    // for nothing is read from the target itself, below.
    assert!(metric(&e.agent, rule) >= before + 1.0, "not counted as ignored (was {before})");
    // The same request unmarked counts (and is flushed within a second).
    let (status, text) =
        post(e.receiver.port, "/audit/host", &headers, batch(&ns, "someone").into_bytes(), None, "POST")
            .await
            .unwrap();
    assert_eq!(status, 200, "{text}");
    let ns2 = ns.clone();
    tokio::task::spawn_blocking(move || {
        wait_until("the unmarked request to be recorded", Duration::from_secs(15), || {
            last_activity_by(&env().cluster, &ns2).starts_with("someone list pods (audit)")
        })
    })
    .await
    .unwrap();
    let sources = quiet_annotation(c, "namespace", &ns, None, "dormant.dev/activity-sources");
    assert!(sources.contains("someone") && !sources.contains("dashboard"), "{sources}");
}
