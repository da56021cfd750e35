//! The real loft-sh/vcluster (v0.30.0, k8s distro) under the real agent:
//! it sleeps on idle, one kubectl through dormant's proxy wakes it with its
//! workloads, its API server's audit webhook counts a user's requests and
//! not its syncer's. See docs/real-vcluster.md for how the testbed runs it.
//!
//! Slow (each real vcluster takes tens of seconds to start on two cores);
//! the stand-in (`testbed::vcluster`) covers the proxy's and the engine's
//! details fast.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use support::*;
use testbed::Cluster;
use testbed::audit::AuditReceiver;
use testbed::process::free_port;
use testbed::real_vcluster::{RealVCluster, RealVClusterOptions};

/// How long a real vcluster may take to come up here (cold, two busy cores).
const START: Duration = Duration::from_secs(240);
const SYNCED: &str = "vcluster.loft.sh/managed-by=dev";

/// A real vcluster `dev` in its own scope, its API server auditing to an
/// agent whose proxy serves it.
struct Setup {
    ns: String,
    vc: RealVCluster,
    agent: Agent,
    /// The vcluster's credentials through the proxy (`dormant kubeconfig`).
    proxy_kubeconfig: PathBuf,
    _receiver: AuditReceiver,
    _dir: tempfile::TempDir,
}

fn setup(prefix: &str) -> Setup {
    let c = Cluster::shared();
    let id = test_id(prefix);
    let ns = c.namespace(prefix, &[("dormant-test", &id)]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let receiver = AuditReceiver::new(dir.path(), &id).unwrap();
    let vc = RealVCluster::create(
        c,
        &ns,
        "dev",
        RealVClusterOptions {
            audit: Some(receiver.webhook(&format!("/audit/vcluster/{ns}/dev"))),
            annotations: vec![("dormant.dev/sleep-after".into(), "1h".into())],
            ..Default::default()
        },
    )
    .unwrap();
    let port = free_port().unwrap();
    let mut flags = vec![
        format!("--proxy-addr=127.0.0.1:{port}"),
        format!("--proxy-cert={}", c.dir.join("apiserver.crt").display()),
        format!("--proxy-key={}", c.dir.join("apiserver.key").display()),
        "--default-wake-timeout=5m".to_string(),
    ];
    flags.extend(receiver.agent_flags());
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let agent = Agent::start(c, &id, &format!("{id}-system"), &format!("{id}-agent"), &flags);
    let started = Instant::now();
    vc.wait_serving(c, START).unwrap();
    eprintln!("[{ns}] real vcluster serving {:?} after its objects were applied", started.elapsed());
    let proxy_kubeconfig = c.dir.join(format!("{ns}-proxy.kubeconfig"));
    let out = dormant(
        c,
        &[
            "kubeconfig",
            &format!("{ns}/dev"),
            "--server",
            &format!("https://127.0.0.1:{port}"),
            "--proxy-ca",
            c.ca_file.to_str().unwrap(),
            "-o",
            proxy_kubeconfig.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Setup { ns, vc, agent, proxy_kubeconfig, _receiver: receiver, _dir: dir }
}

fn kubectl_with(c: &Cluster, kubeconfig: &Path, args: &[&str]) -> Output {
    std::process::Command::new(c.bins.path("kubectl"))
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .args(args)
        .output()
        .unwrap()
}

/// kubectl against the vcluster's own API server (not through dormant).
fn in_vcluster(c: &Cluster, s: &Setup, args: &[&str]) -> String {
    let out = kubectl_with(c, &s.vc.kubeconfig, args);
    assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Host pods synced from the vcluster whose name starts with `prefix`, with
/// their readiness: `name/True`.
fn synced(c: &Cluster, ns: &str, prefix: &str) -> Vec<String> {
    kubectl_quiet(
        c,
        &[
            "get",
            "pods",
            "-n",
            ns,
            "-l",
            SYNCED,
            "-o",
            "jsonpath={range .items[*]}{.metadata.name}/{.status.conditions[?(@.type==\"Ready\")].status} {end}",
        ],
    )
    .split_whitespace()
    .filter(|p| p.starts_with(prefix))
    .map(str::to_string)
    .collect()
}

fn wait_synced_ready(c: &Cluster, s: &Setup, prefix: &str) {
    let start = Instant::now();
    while !synced(c, &s.ns, prefix).iter().any(|p| p.ends_with("/True")) {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no Ready host pod {prefix}* after 120 s; host pods: {}\nvcluster pods: {}\n{}",
            kubectl(c, &["get", "pods", "-n", &s.ns, "-o", "wide"]),
            in_vcluster(c, s, &["get", "pods", "-A", "-o", "wide"]),
            tail(&s.vc.log_text(), 40)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn replicas(c: &Cluster, ns: &str) -> String {
    jsonpath(c, "statefulset", "dev", Some(ns), "{.spec.replicas}")
}

fn generation(c: &Cluster, ns: &str) -> i64 {
    jsonpath(c, "statefulset", "dev", Some(ns), "{.metadata.generation}").parse().unwrap()
}

/// A StatefulSet annotation, read as dormant itself (never counted).
fn quiet_annotation(c: &Cluster, ns: &str, key: &str) -> String {
    let escaped = key.replace('.', "\\.").replace('/', "\\/");
    kubectl_quiet(
        c,
        &[
            "get",
            "statefulset",
            "dev",
            "-n",
            ns,
            "-o",
            &format!("jsonpath={{.metadata.annotations.{escaped}}}"),
        ],
    )
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

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn woke_events(c: &Cluster, ns: &str) -> u64 {
    event_count(c, ns, "Woke")
}

/// Who counted for the vcluster, by `user (agent)`, from its
/// `activity-sources` annotation.
fn counted_sources(c: &Cluster, ns: &str) -> Vec<String> {
    let sources: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&quiet_annotation(c, ns, "dormant.dev/activity-sources")).unwrap_or_default();
    sources.keys().cloned().collect()
}

const SYNCER_IGNORED: &str =
    "dormant_activity_total{source=\"audit\",outcome=\"ignored\",rule=\"builtin-vcluster-syncer\"}";

#[test]
fn a_real_vcluster_sleeps_on_idle_and_one_kubectl_through_the_proxy_wakes_it_with_its_deployment() {
    let c = Cluster::shared();
    let s = setup("real-vc");
    let ns = s.ns.clone();
    let deploy = deployment_yaml("default", "web.v1", 1);
    let out = std::process::Command::new(c.bins.path("kubectl"))
        .arg(format!("--kubeconfig={}", s.vc.kubeconfig.display()))
        .args(["apply", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(deploy.as_bytes())?;
            child.wait_with_output()
        })
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_synced_ready(c, &s, "web.v1-");

    // A user's request straight to the vcluster's API server (not through
    // dormant) reaches dormant through the audit webhook and counts for
    // this vcluster.
    in_vcluster(c, &s, &["get", "configmaps", "-n", "kube-public"]);
    wait_until("the user's audited request on the vcluster", Duration::from_secs(30), || {
        quiet_annotation(c, &ns, "dormant.dev/last-activity-by").contains(" list configmaps (audit)")
    });
    // Its syncer started up, listed and watched everything and synced the
    // pods with the same admin credential as the user's: none of that
    // counted. Then, in steady state, nothing it does counts: last-activity
    // stays where the user left it.
    assert!(metric(&s.agent, SYNCER_IGNORED) > 10.0, "the syncer's requests were not seen (and ignored)");
    let sources = quiet_annotation(c, &ns, "dormant.dev/activity-sources");
    assert!(!sources.contains("(vcluster)"), "the syncer counted as use: {sources}");
    let last = quiet_annotation(c, &ns, "dormant.dev/last-activity");
    std::thread::sleep(Duration::from_secs(10));
    assert_eq!(quiet_annotation(c, &ns, "dormant.dev/last-activity"), last, "something else counted");

    let pods_before = in_vcluster(c, &s, &["get", "pods", "-o", "name"]);
    // Idle: it goes to sleep.
    kubectl(c, &["annotate", "--overwrite", "statefulset", "dev", "-n", &ns, "dormant.dev/sleep-after=10s"]);
    wait_until("the idle vcluster to sleep", Duration::from_secs(90), || {
        state(c, "statefulset", "dev", Some(&ns)) == "asleep"
    });
    assert_eq!(replicas(c, &ns), "0");
    wait_until("the vcluster process to stop", Duration::from_secs(30), || !s.vc.is_running());
    wait_until("the synced pods to go", Duration::from_secs(30), || synced(c, &ns, "").is_empty());
    // Nothing comes back while it sleeps.
    let (starts, generation_before, woke_before) = (s.vc.starts(), generation(c, &ns), woke_events(c, &ns));
    let quiet = Instant::now();
    while quiet.elapsed() < Duration::from_secs(20) {
        assert!(synced(c, &ns, "").is_empty(), "a synced pod came back while asleep");
        assert_eq!(replicas(c, &ns), "0", "the control plane came back while asleep");
        assert!(!s.vc.is_running());
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(generation(c, &ns), generation_before);

    // One kubectl through the proxy wakes it and gets its answer.
    let pod_ready_at = std::sync::Arc::new(std::sync::Mutex::new(None::<Duration>));
    let t0 = Instant::now();
    let watcher = {
        let (ready, ns) = (pod_ready_at.clone(), ns.clone());
        std::thread::spawn(move || {
            let c = Cluster::shared();
            while t0.elapsed() < Duration::from_secs(300) {
                if ready_pods(c, &ns, "app=vcluster,release=dev") == 1 {
                    *ready.lock().unwrap() = Some(t0.elapsed());
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let via = kubectl_with(c, &s.proxy_kubeconfig, &["get", "deploy", "-o", "name"]);
    let answered = t0.elapsed();
    // Awake again, it must stay so while the test looks (changed while it
    // slept, the later deadline would have woken it).
    kubectl(c, &["annotate", "--overwrite", "statefulset", "dev", "-n", &ns, "dormant.dev/sleep-after=1h"]);
    watcher.join().unwrap();
    assert!(
        via.status.success(),
        "{}\n{}\n{}",
        String::from_utf8_lossy(&via.stderr),
        s.agent.log(),
        tail(&s.vc.log_text(), 30)
    );
    assert_eq!(String::from_utf8_lossy(&via.stdout).trim(), "deployment.apps/web.v1");
    let rss_at_wake = s.vc.rss_kib();
    eprintln!(
        "[{ns}] real vcluster wake: control-plane pod Ready {:?}, first answer through the proxy {answered:?} after the request; RSS {} MiB",
        pod_ready_at.lock().unwrap().unwrap_or_default(),
        rss_at_wake / 1024
    );
    assert_eq!(s.vc.starts(), starts + 1, "vcluster started once");
    wait_until("the Woke event", Duration::from_secs(10), || woke_events(c, &ns) > woke_before);
    // Its Deployment's pod is synced again.
    wait_synced_ready(c, &s, "web.v1-");
    eprintln!("[{ns}] the Deployment's host pod Ready again {:?} after the request", t0.elapsed());
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(generation(c, &ns), generation_before + 1, "the control plane was scaled up exactly once");
    assert_eq!(woke_events(c, &ns), woke_before + 1, "one wake: {}", event_notes(c, &ns, "Woke"));
    assert_eq!(replicas(c, &ns), "1");
    wait_until("the Deployment to be ready in the vcluster again", Duration::from_secs(60), || {
        in_vcluster(c, &s, &["get", "deploy", "web.v1", "-o", "jsonpath={.status.readyReplicas}"]) == "1"
    });
    let pods_after = in_vcluster(c, &s, &["get", "pods", "-o", "name"]);
    eprintln!("[{ns}] vcluster pods before the sleep: {pods_before:?}, after the wake: {pods_after:?}");
    eprintln!("[{ns}] real vcluster RSS once settled: {} MiB", s.vc.rss_kib() / 1024);
}

/// A bare pod (no controller) inside the vcluster is there after a sleep
/// and a wake, as it was: the same pod, never stopped. vcluster's syncer
/// deletes a started virtual pod whose host pod vanished (`SyncToHost`: "pod
/// is being deleted & there is no physical pod") and only a controller
/// brings its pods back, so deleting a bare pod's host pod would lose it for
/// good (vCluster's own sleep mode documents that loss). Dormant deletes only
/// the host pods whose virtual pod has an owner, keeps the bare ones running
/// and says so in a Warning Event.
#[test]
fn a_bare_pod_inside_a_real_vcluster_is_kept_through_sleep_and_wake_and_a_deployments_pod_comes_back() {
    let c = Cluster::shared();
    let s = setup("real-bare");
    let ns = s.ns.clone();
    in_vcluster(c, &s, &["run", "solo", "--image=nginx:1.27", "--restart=Never", "--labels=app=solo"]);
    in_vcluster(c, &s, &["create", "deployment", "web.v1", "--image=nginx:1.27"]);
    wait_synced_ready(c, &s, "solo-x-default-x-dev");
    wait_synced_ready(c, &s, "web.v1-");
    let uid_before = in_vcluster(c, &s, &["get", "pod", "solo", "-o", "jsonpath={.metadata.uid}"]);
    let host_uid = |c: &Cluster| {
        kubectl_quiet(c, &["get", "pod", "solo-x-default-x-dev", "-n", &ns, "-o", "jsonpath={.metadata.uid}"])
    };
    let host_uid_before = host_uid(c);
    assert!(!host_uid_before.is_empty(), "the bare pod's host pod has no uid");

    let out = dormant(c, &["sleep", &format!("vcluster/{ns}/dev"), "--wait=60s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_until("the vcluster process to stop", Duration::from_secs(30), || !s.vc.is_running());
    wait_until("the Deployment's synced pod to go", Duration::from_secs(30), || {
        synced(c, &ns, "web.v1-").is_empty()
    });
    assert_eq!(quiet_annotation(c, &ns, "dormant.dev/state"), "asleep");
    assert_eq!(host_uid(c), host_uid_before, "the bare pod's host pod was deleted or replaced by the sleep");
    let kept = event_notes(c, &ns, "BarePodsKept");
    assert!(kept.contains("default/solo"), "no BarePodsKept Event naming default/solo: {kept:?}");

    let via = kubectl_with(c, &s.proxy_kubeconfig, &["get", "pods", "-o", "name"]);
    assert!(via.status.success(), "{}", String::from_utf8_lossy(&via.stderr));
    // The Deployment's pod is back once the syncer and the vcluster's
    // controller-manager have caught up.
    wait_synced_ready(c, &s, "web.v1-");
    let solo = kubectl_with(c, &s.vc.kubeconfig, &["get", "pod", "solo", "-o", "jsonpath={.metadata.uid}"]);
    let syncer_said: Vec<String> =
        s.vc.log_text().lines().filter(|l| l.contains("solo")).map(str::to_string).collect();
    assert!(
        solo.status.success(),
        "the bare pod is gone from the vcluster after the wake (uid before {uid_before}): {}\nthe syncer said:\n{}",
        String::from_utf8_lossy(&solo.stderr),
        syncer_said.join("\n")
    );
    assert_eq!(String::from_utf8_lossy(&solo.stdout).trim(), uid_before, "the bare pod is another pod now");
    assert_eq!(host_uid(c), host_uid_before, "the bare pod's host pod was replaced at the wake");
    wait_synced_ready(c, &s, "solo-x-default-x-dev");
}

/// Everything a real vcluster does by itself as it starts counts for
/// nothing: only the user's kubectl shows among who used it. Besides its
/// syncer (`vcluster/…`), vcluster 0.30 deploys CoreDNS into itself at every
/// start with a plain Go HTTP client: `Go-http-client/2.0`, user
/// `kubernetes-super-admin` (the admin credential of the `vc-<name>`
/// Secret), `fieldManager=vcluster` on its writes.
#[test]
fn a_real_vclusters_own_start_up_counts_for_nothing_and_only_the_user_shows_as_its_use() {
    let c = Cluster::shared();
    let s = setup("real-own");
    in_vcluster(c, &s, &["get", "configmaps", "-n", "kube-public"]);
    wait_until("the user's audited request on the vcluster", Duration::from_secs(30), || {
        quiet_annotation(c, &s.ns, "dormant.dev/last-activity-by").contains(" list configmaps (audit)")
    });
    // Its start-up requests were sent in earlier batches than the user's.
    let sources = counted_sources(c, &s.ns);
    assert!(
        sources.iter().all(|who| who.ends_with("(kubectl)")),
        "something other than the user's kubectl counted as use: {sources:?}"
    );
}

/// Two real vclusters on one machine each have their own network namespace
/// (their ports are fixed): both serve, each its own API server.
#[test]
fn two_real_vclusters_serve_side_by_side_each_its_own_cluster() {
    let c = Cluster::shared();
    let id = test_id("real-two");
    let namespaces: Vec<String> =
        (0..2).map(|i| c.namespace(&format!("real-two-{i}"), &[("dormant-test", &id)]).unwrap()).collect();
    let vcs: Vec<RealVCluster> = namespaces
        .iter()
        .map(|ns| RealVCluster::create(c, ns, "dev", RealVClusterOptions::default()).unwrap())
        .collect();
    for vc in &vcs {
        vc.wait_serving(c, START).unwrap();
    }
    assert_ne!(vcs[0].server, vcs[1].server);
    let out = kubectl_with(c, &vcs[0].kubeconfig, &["create", "namespace", "only-in-the-first"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let names = |vc: &RealVCluster| {
        String::from_utf8_lossy(&kubectl_with(c, &vc.kubeconfig, &["get", "namespaces", "-o", "name"]).stdout)
            .into_owned()
    };
    assert!(names(&vcs[0]).contains("namespace/only-in-the-first"));
    assert!(!names(&vcs[1]).contains("namespace/only-in-the-first"), "the second answered for the first");
}
