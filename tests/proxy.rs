//! The wake-on-request proxy with real kubectl and real API servers: a
//! sleeping vcluster answers, wakes once however many wait, streams and
//! upgrades work, access never widens, and refusals read well.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::PathBuf;
use std::process::Output;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;
use testbed::pki::Ca;
use testbed::process::free_port;
use testbed::vcluster::{VCluster, VClusterOptions};
use testbed::{Cluster, kubeconfig_yaml};

/// The body of every answer to an unauthenticated caller: the same bytes,
/// whatever the vcluster (unknown, asleep, refusing the credential).
const UNAUTHORIZED: &str = r#"{"apiVersion":"v1","code":401,"kind":"Status","message":"Unauthorized","metadata":{},"reason":"Unauthorized","status":"Failure"}"#;

/// A vcluster in its own scope, with an agent whose proxy serves it.
struct Setup {
    id: String,
    ns: String,
    vc: VCluster,
    agent: Agent,
    proxy: String,
    /// The vcluster's credentials through the proxy (`dormant kubeconfig`).
    kubeconfig: PathBuf,
}

fn setup(prefix: &str, extra: &[&str], policy: Option<&str>) -> Setup {
    setup_with(prefix, extra, policy, VClusterOptions::default())
}

fn setup_with(prefix: &str, extra: &[&str], policy: Option<&str>, opts: VClusterOptions) -> Setup {
    let c = Cluster::shared();
    let id = test_id(prefix);
    let ns = c.namespace(prefix, &[("dormant-test", &id)]).unwrap();
    if let Some(spec) = policy {
        install_crd(c);
        c.kubectl_apply(
            &c.admin,
            &format!("apiVersion: dormant.dev/v1alpha1\nkind: SleepPolicy\nmetadata: {{name: {id}}}\nspec:\n  selector: {{namespaceSelector: {{matchLabels: {{dormant-test: {id}}}}}}}\n{spec}"),
        )
        .unwrap();
    }
    let vc = VCluster::create(
        c,
        &ns,
        "dev",
        VClusterOptions { annotations: vec![("dormant.dev/sleep-after".into(), "1h".into())], ..opts },
    )
    .unwrap();
    vc.wait_serving(c, Duration::from_secs(60)).unwrap();
    let port = free_port().unwrap();
    let mut flags = vec![
        format!("--proxy-addr=127.0.0.1:{port}"),
        format!("--proxy-cert={}", c.dir.join("apiserver.crt").display()),
        format!("--proxy-key={}", c.dir.join("apiserver.key").display()),
    ];
    flags.extend(extra.iter().map(|s| s.to_string()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let agent = Agent::start(c, &id, &format!("{id}-system"), &format!("{id}-agent"), &flags);
    let proxy = format!("https://127.0.0.1:{port}");
    let kubeconfig = c.dir.join(format!("{ns}-proxy.kubeconfig"));
    let out = dormant(
        c,
        &[
            "kubeconfig",
            &format!("{ns}/dev"),
            "--server",
            &proxy,
            "--proxy-ca",
            c.ca_file.to_str().unwrap(),
            "-o",
            kubeconfig.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&kubeconfig).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "a kubeconfig with a client key must be private to its owner");
    Setup { id, ns, vc, agent, proxy, kubeconfig }
}

/// kubectl with `kubeconfig`.
fn kubectl_cmd(c: &Cluster, kubeconfig: &std::path::Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(c.bins.path("kubectl"));
    cmd.arg(format!("--kubeconfig={}", kubeconfig.display()));
    cmd
}

fn kubectl_with(c: &Cluster, kubeconfig: &std::path::Path, args: &[&str]) -> Output {
    kubectl_cmd(c, kubeconfig).args(args).output().unwrap()
}

/// `kubectl port-forward pod/shell :7` with `env`, then `line` sent to the
/// local port: (what came back, if all of it did; what kubectl said, with
/// its requests and responses logged).
fn port_forward_echo(
    c: &Cluster,
    kubeconfig: &std::path::Path,
    env: &[(&str, &str)],
    line: &str,
) -> (Option<String>, String) {
    use std::io::{BufRead, Read, Write};
    let mut forward = kubectl_cmd(c, kubeconfig)
        .args(["port-forward", "pod/shell", ":7", "-v=8"])
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    // Kept open: kubectl writes a line per connection, and dies writing to
    // a closed pipe.
    let mut stdout = std::io::BufReader::new(forward.stdout.take().unwrap());
    stdout.read_line(&mut first).unwrap();
    // "Forwarding from 127.0.0.1:PORT -> 7"
    let local: Option<u16> =
        first.split_whitespace().nth(2).and_then(|a| a.rsplit(':').next()).and_then(|p| p.parse().ok());
    let echoed = local.and_then(|port| {
        let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        tcp.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
        tcp.write_all(line.as_bytes()).ok()?;
        let mut got = vec![0u8; line.len()];
        tcp.read_exact(&mut got).ok()?;
        Some(String::from_utf8_lossy(&got).into_owned())
    });
    // Done with it, whatever state it is in: what it did is in `echoed`
    // and in what it printed, read below.
    forward.kill().ok();
    drop(stdout);
    let out = forward.wait_with_output().unwrap();
    (echoed, format!("{first}{}", String::from_utf8_lossy(&out.stderr)))
}

/// kubectl with `input` on its stdin (then closed); killed after 30 s.
fn kubectl_input(c: &Cluster, kubeconfig: &std::path::Path, args: &[&str], input: &[u8]) -> Output {
    use std::io::Write;
    let mut child = kubectl_cmd(c, kubeconfig)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    // Killed only while it still runs: the killer is told when it ended, so
    // it never signals a pid the system has given to another process.
    let (ended, killer_waits) = std::sync::mpsc::channel::<()>();
    let pid = child.id();
    let killer = std::thread::spawn(move || {
        if killer_waits.recv_timeout(Duration::from_secs(30)).is_err() {
            // Its output, read by the caller, says whether it was stopped;
            // it may have ended at this very moment.
            testbed::process::signal(pid, libc::SIGTERM).ok();
        }
    });
    let out = child.wait_with_output().unwrap();
    // The killer is gone already when it has signalled: nobody to tell.
    ended.send(()).ok();
    killer.join().unwrap();
    out
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// Wakes of the vcluster as its users can count them, once everything its
/// agent started has finished: `Woke` Events about its control plane (each
/// with its series' count), and the agent's completed wakes by trigger
/// (`dormant_transitions_total{direction="wake"}`; the agent is this
/// test's own). A wake done twice shows in both, even when its second
/// scale patch changes nothing and only its annotations are written again,
/// which the control plane's generation would not show.
fn wakes(c: &Cluster, s: &Setup) -> Wakes {
    s.agent.settle();
    let metrics = s.agent.get("/metrics");
    let wake = r#"dormant_transitions_total{kind="vcluster",direction="wake""#;
    Wakes {
        events: times(c, &s.ns, "Woke", "StatefulSet/dev"),
        transitions: metric_sum(&metrics, wake),
        by_request: metric_sum(&metrics, &format!(r#"{wake},trigger="request"}}"#)),
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Wakes {
    events: u64,
    transitions: f64,
    by_request: f64,
}

/// Asserts exactly one wake, by a request, between `before` and `after`.
fn assert_one_wake_by_a_request(before: Wakes, after: Wakes, agent: &Agent) {
    let one = Wakes {
        events: before.events + 1,
        transitions: before.transitions + 1.0,
        by_request: before.by_request + 1.0,
    };
    assert_eq!(after, one, "from {before:?}: not exactly one wake by a request; agent log:\n{}", agent.log());
}

fn put_to_sleep(c: &Cluster, s: &Setup) {
    let out = dormant(c, &["sleep", &format!("vcluster/{}/dev", s.ns), "--wait=60s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_until("the vcluster API server to stop", Duration::from_secs(30), || !s.vc.is_serving());
    // Asleep by hand without prevention: the next request wakes it.
}

/// A kubeconfig for `user` (a testbed certificate) against the proxy.
fn user_kubeconfig(c: &Cluster, s: &Setup, name: &str, cert: &testbed::pki::CertPair) -> PathBuf {
    let path = c.dir.join(format!("{}-{name}-proxy.kubeconfig", s.ns));
    std::fs::write(
        &path,
        kubeconfig_yaml(&format!("{}/vcluster/{}/dev", s.proxy, s.ns), &c.ca.cert_pem, name, cert),
    )
    .unwrap();
    path
}

#[test]
fn a_sleeping_vcluster_answers_kubectl_through_the_proxy_after_exactly_one_wake() {
    let c = Cluster::shared();
    let s = setup("proxy-wake", &[], None);
    let direct = kubectl_with(c, &s.vc.kubeconfig, &["create", "namespace", "inside"]);
    assert!(direct.status.success(), "{}", text(&direct).1);
    let expected = text(&kubectl_with(c, &s.vc.kubeconfig, &["get", "namespaces", "-o", "name"])).0;
    // Awake, the proxy forwards and answers what the upstream answers.
    let via = kubectl_with(c, &s.kubeconfig, &["get", "namespaces", "-o", "name"]);
    assert_eq!(text(&via).0, expected, "{}", text(&via).1);

    put_to_sleep(c, &s);
    let (starts, before) = (s.vc.starts(), wakes(c, &s));
    let t = Instant::now();
    let via = kubectl_with(c, &s.kubeconfig, &["get", "namespaces", "-o", "name"]);
    let took = t.elapsed();
    assert!(via.status.success(), "{}\n{}", text(&via).1, s.agent.log());
    assert_eq!(text(&via).0, expected);
    wait_until("the vcluster to be marked awake", Duration::from_secs(60), || {
        state(c, "statefulset", "dev", Some(&s.ns)) == "awake"
    });
    assert_one_wake_by_a_request(before, wakes(c, &s), &s.agent);
    assert_eq!(s.vc.starts(), starts + 1, "the API server started once");
    eprintln!("kubectl against the sleeping vcluster answered in {took:?}");
    let by = annotation(c, "statefulset", "dev", Some(&s.ns), "dormant.dev/last-activity-by");
    assert!(by.starts_with("kube:admin list namespaces (proxy)"), "{by}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_requests_during_one_wake_all_succeed_with_one_scale_up() {
    let s = tokio::task::spawn_blocking(|| setup("proxy-many", &[], None)).await.unwrap();
    let c = Cluster::shared();
    put_to_sleep(c, &s);
    let (starts, before) = (s.vc.starts(), tokio::task::block_in_place(|| wakes(c, &s)));
    let client = testbed::client_from_kubeconfig(&s.kubeconfig).await.unwrap();
    let kubeconfig = Arc::new(s.kubeconfig.clone());
    let kubectl_bin = Arc::new(c.bins.path("kubectl"));
    let mut tasks = Vec::new();
    for i in 0..200 {
        if i % 10 == 0 {
            // Every tenth is a real kubectl.
            let (k, bin) = (kubeconfig.clone(), kubectl_bin.clone());
            tasks.push(tokio::task::spawn_blocking(move || {
                let o = std::process::Command::new(&*bin)
                    .arg(format!("--kubeconfig={}", k.display()))
                    .args(["get", "namespace", "default", "-o", "name"])
                    .output()
                    .unwrap();
                if o.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&o.stderr).into_owned()) }
            }));
        } else {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let api: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(client);
                api.get("default").await.map(|_| ()).map_err(|e| e.to_string())
            }));
        }
    }
    let mut failures = Vec::new();
    for t in tasks {
        if let Err(e) = t.await.unwrap() {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{} failed, e.g. {:?}", failures.len(), failures.first());
    assert_eq!(s.vc.starts(), starts + 1, "the API server started once");
    let after = tokio::task::block_in_place(|| {
        wait_until("the vcluster to be marked awake", Duration::from_secs(60), || {
            state(c, "statefulset", "dev", Some(&s.ns)) == "awake"
        });
        wakes(c, &s)
    });
    assert_one_wake_by_a_request(before, after, &s.agent);
    let metrics = s.agent.get("/metrics");
    assert!(metrics.contains("dormant_proxy_requests_total{outcome=\"held\",code=\"200\"}"), "{metrics}");
}

#[test]
fn watches_stream_and_websocket_upgrades_pass_through() {
    let c = Cluster::shared();
    let s = setup("proxy-stream", &[], None);
    // kubectl get -w streams through the proxy.
    let mut watch = kubectl_cmd(c, &s.kubeconfig)
        .args(["get", "namespaces", "-w", "-o", "name"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(kubectl_with(c, &s.vc.kubeconfig, &["create", "namespace", "streamed"]).status.success());
    let stdout = watch.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            // Lines after the test stopped listening are not wanted.
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l == "namespace/streamed") {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "the watch did not stream the new namespace: {seen:?}");
        if let Ok(l) = rx.recv_timeout(left) {
            seen.push(l);
        }
    }
    assert!(watch.try_wait().unwrap().is_none(), "the watch ended after streaming");
    watch.kill().unwrap();
    watch.wait().unwrap();

    // A WebSocket upgrade, one of the API server's own (watch over WebSocket).
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cert = c.ca.client("kube:admin", &["system:masters"]).unwrap();
    let frames = rt.block_on(websocket_watch(&s, &cert));
    assert!(frames.contains("101 Switching Protocols"), "{frames}");
    assert!(frames.contains("ADDED") && frames.contains("streamed"), "{frames}");
}

/// An open watch through the proxy is use: it keeps its vcluster awake past
/// the idle timeout, and once closed the vcluster sleeps; a policy that
/// ignores active connections lets it sleep with the watch open.
/// `kubectl exec` and `kubectl port-forward` through the proxy, end to end:
/// kubectl's stream upgrade goes through dormant to the vcluster's API
/// server, which opens its own to the pod's kubelet (kwok's server, which
/// runs the command on this host or echoes the forwarded bytes).
#[test]
fn kubectl_exec_and_port_forward_stream_through_the_proxy() {
    let c = Cluster::shared();
    let s = setup("proxy-exec", &[], None);
    let kubelet = c.kubelet_port().expect("the testbed runs kwok");
    // In the vcluster: a Node whose kubelet is kwok's server, a pod on it.
    let vc = |args: &[&str]| {
        let out = kubectl_with(c, &s.vc.kubeconfig, args);
        assert!(out.status.success(), "kubectl {args:?}: {:?}", text(&out));
    };
    let manifests = c.dir.join(format!("{}-shell.yaml", s.ns));
    std::fs::write(
        &manifests,
        "apiVersion: v1\nkind: Node\nmetadata: {name: vc-node}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: default, namespace: default}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: shell, namespace: default}\nspec:\n  nodeName: vc-node\n  automountServiceAccountToken: false\n  containers: [{name: sh, image: none}]\n",
    )
    .unwrap();
    vc(&["apply", "-f", manifests.to_str().unwrap()]);
    let status = format!(
        r#"{{"status":{{"addresses":[{{"type":"InternalIP","address":"127.0.0.1"}}],"daemonEndpoints":{{"kubeletEndpoint":{{"Port":{kubelet}}}}}}}}}"#
    );
    vc(&["patch", "node", "vc-node", "--subresource=status", "--type=merge", "-p", &status]);
    // Running, as the pod's kubelet would report (port-forward asks).
    vc(&[
        "patch",
        "pod",
        "shell",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"Running"}}"#,
    ]);

    // Direct first, so that a testbed fault reads as one.
    let direct = kubectl_with(c, &s.vc.kubeconfig, &["exec", "shell", "--", "echo", "hello"]);
    assert_eq!(text(&direct).0, "hello\n", "direct exec: {:?}", text(&direct));

    // Through the proxy over both stream protocols kubectl speaks:
    // WebSocket (its default) and SPDY (its fallback, and what older
    // clients use); kubectl's log names the upgrade the proxy answered.
    for (protocol, env) in [
        ("websocket", ("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "true")),
        ("SPDY/3.1", ("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")),
    ] {
        let out = kubectl_cmd(c, &s.kubeconfig)
            .args(["exec", "shell", "-v=8", "--", "echo", "through the proxy"])
            .env(env.0, env.1)
            .output()
            .unwrap();
        let (stdout, log) = text(&out);
        assert_eq!(stdout, "through the proxy\n", "{protocol}: {log}\n{}", s.agent.log());
        assert!(log.contains(&format!("Upgrade: {protocol}")), "{protocol} was not used: {log}");
    }
    // stdin up, stdout back, on the same stream (one line: the end of
    // stdin does not reach kwok's command even directly).
    let upper = ["exec", "-i", "shell", "--", "sh", "-c", "read line; echo \"$line\" | tr a-z A-Z"];
    let direct = kubectl_input(c, &s.vc.kubeconfig, &upper, b"up\n");
    assert_eq!(text(&direct).0, "UP\n", "direct exec: {:?}", text(&direct));
    let out = kubectl_input(c, &s.kubeconfig, &upper, b"up and back\n");
    assert_eq!(text(&out).0, "UP AND BACK\n", "{:?}", text(&out));
    // A failing command fails the same way (kwok reports its exit status
    // as an error rather than as an exit code).
    let fail = ["exec", "shell", "--", "sh", "-c", "exit 3"];
    let (direct, out) = (kubectl_with(c, &s.vc.kubeconfig, &fail), kubectl_with(c, &s.kubeconfig, &fail));
    assert!(!out.status.success() && text(&out).1.contains("exit status 3"), "{:?}", text(&out));
    assert_eq!((out.status.code(), text(&out)), (direct.status.code(), text(&direct)));

    // port-forward: bytes to the pod's port 7 (an echo) and back, over
    // both protocols too.
    let direct = port_forward_echo(c, &s.vc.kubeconfig, &[], "ping\n");
    assert_eq!(direct.0, Some("ping\n".to_string()), "direct port-forward: {direct:?}");
    for (protocol, env) in [
        ("websocket", ("KUBECTL_PORT_FORWARD_WEBSOCKETS", "true")),
        ("SPDY/3.1", ("KUBECTL_PORT_FORWARD_WEBSOCKETS", "false")),
    ] {
        let line = format!("ping through the proxy over {protocol}\n");
        let (echoed, log) = port_forward_echo(c, &s.kubeconfig, &[env], &line);
        assert_eq!(echoed, Some(line), "{protocol}: {log}");
        assert!(log.contains(&format!("Upgrade: {protocol}")), "{protocol} was not used: {log}");
    }

    // An exec session keeps its vcluster awake while it lasts; then it
    // sleeps.
    let now_state = || state(c, "statefulset", "dev", Some(&s.ns));
    kubectl(c, &["annotate", "--overwrite", "statefulset", "dev", "-n", &s.ns, "dormant.dev/sleep-after=6s"]);
    let mut session = kubectl_cmd(c, &s.kubeconfig)
        .args(["exec", "shell", "--", "sleep", "25"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(20));
    assert_eq!(
        now_state(),
        "awake",
        "20 s into an exec session, idle timeout 6 s; agent log:\n{}",
        s.agent.log()
    );
    assert!(session.wait().unwrap().success());
    wait_until("asleep once the session is over", Duration::from_secs(40), || now_state() == "asleep");
    wait_until("the vcluster API server to stop", Duration::from_secs(30), || !s.vc.is_serving());

    // Asleep, `kubectl exec` wakes the vcluster and runs.
    let out = kubectl_with(c, &s.kubeconfig, &["exec", "shell", "--", "echo", "woken"]);
    assert_eq!(text(&out).0, "woken\n", "{:?}\n{}", text(&out), s.agent.log());
}

#[test]
fn an_open_watch_keeps_its_vcluster_awake_unless_the_policy_ignores_active_connections() {
    let c = Cluster::shared();
    let s = setup("proxy-conn", &[], Some("  ignore: {activeConnections: false}\n"));
    let watch = || {
        kubectl_cmd(c, &s.kubeconfig)
            .args(["get", "namespaces", "-w", "-o", "name"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let now_state = || state(c, "statefulset", "dev", Some(&s.ns));
    kubectl(c, &["annotate", "--overwrite", "statefulset", "dev", "-n", &s.ns, "dormant.dev/sleep-after=6s"]);

    let mut open = watch();
    std::thread::sleep(Duration::from_secs(20));
    assert!(open.try_wait().unwrap().is_none(), "the watch did not stay open");
    assert_eq!(
        now_state(),
        "awake",
        "20 s with a watch open, idle timeout 6 s; agent log:\n{}",
        s.agent.log()
    );
    open.kill().unwrap();
    open.wait().unwrap();
    wait_until("asleep once the watch is closed", Duration::from_secs(40), || now_state() == "asleep");

    kubectl(
        c,
        &[
            "patch",
            "sleeppolicy",
            &s.id,
            "--type=merge",
            "-p",
            r#"{"spec":{"ignore":{"activeConnections":true}}}"#,
        ],
    );
    let out = dormant(c, &["wake", &format!("vcluster/{}/dev", s.ns), "--wait=60s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    s.vc.wait_serving(c, Duration::from_secs(60)).unwrap();
    let mut open = watch();
    // The watch stays open until the sleep begins (then its API server
    // stops, and the watch with it): it must not have ended while the
    // vcluster was still awake, or it slept because nothing was open.
    wait_until("asleep with the watch open", Duration::from_secs(40), || {
        let ended = open.try_wait().unwrap();
        let now = now_state();
        assert!(
            ended.is_none() || now != "awake",
            "the watch ended ({ended:?}) while the vcluster was awake"
        );
        now == "asleep"
    });
    open.kill().unwrap();
    open.wait().unwrap();
    kubectl(c, &["delete", "sleeppolicy", &s.id]);
}

#[tokio::test(flavor = "multi_thread")]
async fn http1_clients_reuse_upstream_connections() {
    use http_body_util::BodyExt;
    let c = Cluster::shared();
    // The vcluster's Secret is re-read every second: unchanged, the same
    // upstream connection goes on serving.
    let s = setup("proxy-reuse", &["--proxy-upstream-refresh=1s"], None);
    let proxy_port: u16 = s.proxy.rsplit(':').next().unwrap().parse().unwrap();
    let upstream_port: u16 = s.vc.server.rsplit(':').next().unwrap().parse().unwrap();
    let path = format!("/vcluster/{}/dev/version", s.ns);
    // An administrator: a starting API server may still refuse others
    // until its RBAC roles are loaded.
    let admin = c.user("reuse-admin", &["system:masters"]).unwrap();
    // A first client's request may find the control plane not yet Ready as
    // the agent's watch sees it (the StatefulSet's status lags its pod):
    // it is held, and the wake checks the API server's readiness on a
    // connection of its own. The connections open after it are those the
    // requests below must share. Then one client sends 20 requests on its
    // connection, and ten more come one after another (as separate runs of
    // a tool would), a request each.
    let (mut before, mut seen) = (std::collections::BTreeSet::new(), std::collections::BTreeSet::new());
    for client in 0..12 {
        let tls = tls_connect(proxy_port, &c.ca.cert_pem, Some(&admin.cert)).await.unwrap();
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
        let conn = tokio::spawn(conn);
        for request in 0..if client == 1 { 20 } else { 1 } {
            let req = hyper::Request::get(path.as_str())
                .header("host", "127.0.0.1")
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap();
            let resp = send.send_request(req).await.unwrap();
            let status = resp.status();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(status, 200, "client {client}, request {request}: {}", String::from_utf8_lossy(&body));
            assert!(String::from_utf8_lossy(&body).contains("gitVersion"));
            let open = testbed::process::connections_to(s.agent.proc.pid(), upstream_port);
            if client == 0 {
                before.extend(open);
            } else {
                seen.extend(open);
            }
            if client == 1 {
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        }
        drop(send);
        // With its sender gone the connection closes cleanly.
        conn.await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let opened: Vec<_> = seen.difference(&before).collect();
    assert!(!seen.is_empty(), "the agent should keep its upstream connection open between requests");
    assert!(
        opened.is_empty(),
        "30 requests from 11 client connections, one after another, should share the upstream connection the first request left open; they opened {opened:?} (open after the first request: {before:?})"
    );
}

/// A client that vanishes without closing (a laptop shut with a watch open
/// over HTTP/1.1) is not noticed by a proxy that waits for the watch's next
/// event, and its watch keeps the vcluster awake; the proxy's connections,
/// to the client and to the upstream, are probed with TCP keepalive once
/// idle, as `ss -to` shows (`timer:(keepalive,…)`).
#[tokio::test(flavor = "multi_thread")]
async fn idle_watches_are_probed_with_tcp_keepalive() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let c = Cluster::shared();
    let s = setup("proxy-keepalive", &[], None);
    let proxy_port: u16 = s.proxy.rsplit(':').next().unwrap().parse().unwrap();
    let upstream_port: u16 = s.vc.server.rsplit(':').next().unwrap().parse().unwrap();
    let admin = c.user("keepalive-admin", &["system:masters"]).unwrap();
    let mut tls = tls_connect(proxy_port, &c.ca.cert_pem, Some(&admin.cert)).await.unwrap();
    let client_port = tls.get_ref().0.local_addr().unwrap().port();
    // A watch with nothing to report: no ConfigMap has this name.
    let watch = format!(
        "GET /vcluster/{}/dev/api/v1/namespaces/default/configmaps?watch=true&fieldSelector=metadata.name%3Dnone HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        s.ns
    );
    tls.write_all(watch.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&head).contains("\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(30), tls.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "closed before the watch's head: {}", String::from_utf8_lossy(&head));
        head.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&head).starts_with("HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head));

    let pid = s.agent.proc.pid();
    // The proxy's side of the client's connection and its connections to
    // the upstream.
    let watched = || {
        testbed::process::tcp_sockets(pid)
            .into_iter()
            .filter(|s| {
                (s.local_port == proxy_port && s.remote_port == client_port)
                    || (s.remote_port == upstream_port && s.established)
            })
            .collect::<Vec<_>>()
    };
    let probed = |sockets: &[testbed::process::TcpSocket]| {
        sockets.iter().filter(|s| s.local_port == proxy_port).count() == 1
            && sockets.iter().any(|s| s.remote_port == upstream_port)
            && sockets.iter().all(|s| s.established && s.timer == 2 && s.timer_in <= Duration::from_secs(30))
    };
    let start = Instant::now();
    let mut sockets = watched();
    while !probed(&sockets) && start.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        sockets = watched();
    }
    assert!(
        probed(&sockets),
        "with the watch idle, the proxy's connections to the client (port {client_port}) and to the upstream should have a keepalive timer (2) due within 30 s: {sockets:#?}"
    );
    drop(tls);
}

/// A GET through the proxy over raw HTTP/1.1 with a client certificate:
/// (status, the whole answer).
async fn raw_get(proxy: &str, path: &str, cert: &testbed::pki::CertPair) -> (u16, String) {
    raw_request(proxy, path, Some(cert), &[]).await
}

/// Opens a WebSocket watch of namespaces through the proxy and returns the
/// raw bytes seen in the first seconds (handshake and frames).
async fn websocket_watch(s: &Setup, cert: &testbed::pki::CertPair) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let port: u16 = s.proxy.rsplit(':').next().unwrap().parse().unwrap();
    let mut tls = tls_connect(port, &Cluster::shared().ca.cert_pem, Some(cert)).await.unwrap();
    let req = format!(
        "GET /vcluster/{}/dev/api/v1/namespaces?watch=true HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nOrigin: https://127.0.0.1\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        s.ns
    );
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, tls.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if String::from_utf8_lossy(&out).contains("streamed") {
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn access_never_widens_through_the_proxy() {
    let c = Cluster::shared();
    let s = setup("proxy-sec", &["--proxy-base-domain=vc.example.com"], None);

    // alice authenticates with her certificate: the proxy impersonates her.
    let alice = user_kubeconfig(c, &s, "alice", &c.alice.cert);
    let whoami = kubectl_with(
        c,
        &alice,
        &["auth", "whoami", "-o", "jsonpath={.status.userInfo.username} {.status.userInfo.groups}"],
    );
    let (out, err) = text(&whoami);
    assert!(out.starts_with("alice ") && out.contains("team-a"), "{out} {err}");
    let denied = kubectl_with(c, &alice, &["get", "secrets", "-n", "kube-system"]);
    assert!(
        text(&denied).1.contains("Forbidden") && text(&denied).1.contains("\"alice\""),
        "{:?}",
        text(&denied)
    );
    // Her own Impersonate-User header never reaches the upstream.
    let sneaky = kubectl_with(
        c,
        &alice,
        &["get", "secrets", "-n", "kube-system", "--as=kube:admin", "--as-group=system:masters"],
    );
    assert!(!sneaky.status.success(), "impersonation through the proxy widened access: {:?}", text(&sneaky));
    assert!(text(&sneaky).1.contains("\"alice\""), "{:?}", text(&sneaky));

    // A certificate from another CA is refused, with the answer every
    // unauthenticated caller gets (nothing about the vcluster).
    let stranger = Ca::new("not-the-vcluster-ca").unwrap().client("kube:admin", &["system:masters"]).unwrap();
    let other = user_kubeconfig(c, &s, "stranger", &stranger);
    let refused = kubectl_with(c, &other, &["get", "namespaces"]);
    assert!(!refused.status.success());
    assert!(
        text(&refused).1.contains("You must be logged in to the server (Unauthorized)"),
        "{:?}",
        text(&refused)
    );
    assert!(!text(&refused).1.contains(&s.ns), "{:?}", text(&refused));
    // A certificate issued by an intermediate of the vcluster's CA, sent
    // with that intermediate (as kube-apiserver accepts it).
    let intermediate = c.ca.intermediate("team-issuer").unwrap();
    let carol = intermediate.client("carol", &["team-c"]).unwrap();
    let chain =
        testbed::pki::CertPair { cert_pem: format!("{}{}", carol.cert_pem, intermediate.cert_pem), ..carol };
    let who = kubectl_with(
        c,
        &user_kubeconfig(c, &s, "carol", &chain),
        &["auth", "whoami", "-o", "jsonpath={.status.userInfo.username}"],
    );
    assert_eq!(text(&who).0, "carol", "{:?}", text(&who));
    // A certificate from the right CA that names nobody (an empty CN) would
    // impersonate nobody, and run as the admin credential: refused.
    let nobody = c.ca.client("", &["system:masters"]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (code, raw) =
        rt.block_on(raw_get(&s.proxy, &format!("/vcluster/{}/dev/api/v1/secrets", s.ns), &nobody));
    assert!(code == 401 && raw.ends_with(UNAUTHORIZED), "{raw}");

    // A bearer token is passed through: the upstream authorizes its owner.
    let sa = kubectl_with(c, &s.vc.kubeconfig, &["create", "serviceaccount", "viewer", "-n", "default"]);
    assert!(sa.status.success(), "{:?}", text(&sa));
    let token = text(&kubectl_with(c, &s.vc.kubeconfig, &["create", "token", "viewer", "-n", "default"]))
        .0
        .trim()
        .to_string();
    assert!(!token.is_empty());
    let token_kubeconfig = |name: &str, token: &str| {
        let path = c.dir.join(format!("{}-{name}.kubeconfig", s.ns));
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: p\n  cluster:\n    server: {}/vcluster/{}/dev\n    certificate-authority: {}\nusers:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: p\n  context: {{cluster: p, user: u}}\ncurrent-context: p\n",
                s.proxy,
                s.ns,
                c.ca_file.display()
            ),
        )
        .unwrap();
        path
    };
    let bearer = token_kubeconfig("viewer", &token);
    let who = kubectl_with(c, &bearer, &["auth", "whoami", "-o", "jsonpath={.status.userInfo.username}"]);
    assert_eq!(text(&who).0, "system:serviceaccount:default:viewer", "{:?}", text(&who));
    let denied = kubectl_with(c, &bearer, &["get", "secrets", "-n", "kube-system"]);
    assert!(text(&denied).1.contains("Forbidden"), "{:?}", text(&denied));
    // Its activity is the ServiceAccount's (what ignore rules on users see).
    let metrics = testbed::process::http_body(s.agent.admin_port, "/metrics");
    let source = r#"source="system:serviceaccount:default:viewer (kubectl)""#;
    assert!(
        metrics.lines().any(|l| l.starts_with("dormant_activity_sources_total{") && l.contains(source)),
        "no activity attributed to the token's ServiceAccount:\n{}",
        metrics.lines().filter(|l| l.starts_with("dormant_activity_sources")).collect::<Vec<_>>().join("\n")
    );

    // A token the upstream does not know gets the upstream's 401 and counts
    // for nothing: an expired CI credential polling forever must not keep
    // the vcluster awake.
    let expired = token_kubeconfig("expired", "not-a-token");
    let refused = kubectl_with(c, &expired, &["get", "namespaces"]);
    assert!(!refused.status.success() && text(&refused).1.contains("Unauthorized"), "{:?}", text(&refused));
    let metrics = testbed::process::http_body(s.agent.admin_port, "/metrics");
    let unauthenticated = metrics
        .lines()
        .find(|l| {
            l.starts_with(
                r#"dormant_activity_total{source="proxy",outcome="ignored",rule="unauthenticated"}"#,
            )
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
    assert!(unauthenticated.is_some_and(|n| n >= 1.0), "{metrics}");
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("dormant_activity_sources_total{") && l.contains("(bearer token)")),
        "the refused token's requests were counted:\n{metrics}"
    );

    // Routed by host name too (`<name>.<namespace>.<base domain>`); a
    // request with X-Dormant-Ignore is forwarded but counts for nothing, the
    // same request without it counts.
    let quiet = c.ca.client("quiet-user", &[]).unwrap();
    let host = format!("Host: dev.{}.vc.example.com", s.ns);
    let counted = |metrics: &str| {
        metrics.lines().any(|l| l.starts_with("dormant_activity_sources_total{") && l.contains("quiet-user"))
    };
    let (code, raw) =
        rt.block_on(raw_request(&s.proxy, "/api", Some(&quiet), &[&host, "X-Dormant-Ignore: true"]));
    assert!(code == 200 && raw.contains("\"kind\":\"APIVersions\""), "{raw}");
    assert!(
        !counted(&testbed::process::http_body(s.agent.admin_port, "/metrics")),
        "X-Dormant-Ignore was counted"
    );
    let (code, raw) = rt.block_on(raw_request(&s.proxy, "/api", Some(&quiet), &[&host]));
    assert_eq!(code, 200, "{raw}");
    assert!(
        counted(&testbed::process::http_body(s.agent.admin_port, "/metrics")),
        "a request was not counted"
    );

    // Asleep, the token its API server refused above does not wake it
    // again (else an expired CI credential polling would wake it on every
    // poll); kubectl says why. A good token still wakes it.
    put_to_sleep(c, &s);
    let refused = kubectl_with(c, &expired, &["get", "namespaces"]);
    let (_, err) = text(&refused);
    assert!(
        !refused.status.success() && err.contains("You must be logged in to the server (Unauthorized)"),
        "{err}"
    );
    assert_eq!(
        jsonpath(c, "statefulset", "dev", Some(&s.ns), "{.spec.replicas}"),
        "0",
        "woken for a token its API server refused"
    );
    let woke = kubectl_with(c, &bearer, &["auth", "whoami", "-o", "jsonpath={.status.userInfo.username}"]);
    assert_eq!(text(&woke).0, "system:serviceaccount:default:viewer", "{:?}", text(&woke));
}

/// A vcluster woken by something other than this proxy (`dormant wake`, a
/// schedule, another replica, audit activity) serves the requests that may
/// not wake it (anonymous, `X-Dormant-Ignore`, ignored by a rule) as soon as
/// its API server answers; they were refused as if it still slept.
#[test]
fn a_vcluster_woken_elsewhere_serves_requests_that_cannot_wake_it() {
    let c = Cluster::shared();
    let s = setup("proxy-elsewhere", &[], None);
    put_to_sleep(c, &s);
    let admin = c.ca.client("kube:admin", &["system:masters"]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let path = format!("/vcluster/{}/dev/api", s.ns);
    let ignored = || rt.block_on(raw_request(&s.proxy, &path, Some(&admin), &["X-Dormant-Ignore: true"]));
    let (code, raw) = ignored();
    assert!(code == 503 && raw.contains("does not count as use"), "{raw}");

    let out = dormant(c, &["wake", &format!("vcluster/{}/dev", s.ns), "--wait=60s"]);
    assert!(out.status.success(), "{}", text(&out).1);
    s.vc.wait_serving(c, Duration::from_secs(60)).unwrap();
    let start = Instant::now();
    let (mut code, mut raw) = ignored();
    while code != 200 && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(200));
        (code, raw) = ignored();
    }
    assert_eq!(code, 200, "20 s after the wake: {raw}\n{}", s.agent.log());
    // Without credentials: refused as ever, awake or not.
    let (code, raw) = rt.block_on(raw_request(&s.proxy, &path, None, &[]));
    assert!(code == 401 && raw.ends_with(UNAUTHORIZED), "{raw}");
}

/// A client that sends an incomplete request head and then nothing
/// (slowloris) is disconnected once the 30 s allowed for a head are over,
/// not held for ever.
#[test]
fn a_client_that_never_finishes_its_request_head_is_disconnected() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = setup("proxy-slow", &[], None);
    let port: u16 = s.proxy.rsplit(':').next().unwrap().parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (closed, after) = rt.block_on(async {
        let cert = Cluster::shared().ca.client("slow", &[]).unwrap();
        let mut tls = tls_connect(port, &Cluster::shared().ca.cert_pem, Some(&cert)).await.unwrap();
        let head = format!("GET /vcluster/{}/dev/api HTTP/1.1\r\nHost: 127.0.0.1\r\n", s.ns);
        tls.write_all(head.as_bytes()).await.unwrap();
        let started = Instant::now();
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(90), tls.read_to_end(&mut out)).await;
        (read.is_ok(), started.elapsed())
    });
    assert!(closed, "still connected after {after:?}");
    assert!(after >= Duration::from_secs(25), "closed after {after:?}, before its 30 s were over");
    eprintln!("the slow client was disconnected after {after:?}");
}

/// Out of file descriptors, accepting fails while connections wait in the
/// listener's backlog. The agent frees a descriptor by closing a
/// connection that has sat idle (for at least the handshake timeout, 10 s
/// by default), and otherwise pauses and retries rather than spin a core
/// (which would starve everything else it does); it does not close a
/// connection that has only just arrived. Once descriptors are free again,
/// a connection that waited through it all is served.
#[test]
fn out_of_file_descriptors_the_agent_waits_instead_of_spinning() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let c = Cluster::shared();
    let s = setup("proxy-fds", &[], None);
    let pid = s.agent.proc.pid();
    let port: u16 = s.proxy.rsplit(':').next().unwrap().parse().unwrap();
    let admin = c.ca.client("kube:admin", &["system:masters"]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // A client that connected and then said nothing for longer than the
    // handshake timeout: the one to make room.
    let mut idle = rt
        .block_on(tls_over(
            std::net::TcpStream::connect(("127.0.0.1", port)).unwrap(),
            &c.ca.cert_pem,
            Some(&admin),
        ))
        .unwrap();
    std::thread::sleep(Duration::from_millis(10_500));

    let fds = || std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count() as u64;
    let limit = fds();
    let log_from = std::fs::metadata(&s.agent.proc.log).unwrap().len() as usize;
    let started = Instant::now();
    let soft = testbed::process::set_open_files_limit(pid, limit).unwrap();
    let mut waiting: Vec<std::net::TcpStream> =
        (0..8).map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(500));
    let before = testbed::process::cpu_time(pid).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let spent = testbed::process::cpu_time(pid).unwrap() - before;
    let open_at_the_limit = fds();
    // The agent's own account of its accepts on the proxy's port: each
    // failure is logged, then waited out.
    let log = std::fs::read(&s.agent.proc.log).unwrap();
    let log = String::from_utf8_lossy(&log[log_from..]).into_owned();
    let on_this_port = |l: &&str| l.contains(&format!("127.0.0.1:{port}"));
    let failed: Vec<&str> =
        log.lines().filter(on_this_port).filter(|l| l.contains("cannot accept connections")).collect();
    let evicted: Vec<&str> =
        log.lines().filter(on_this_port).filter(|l| l.contains("out of file descriptors")).collect();
    let elapsed = started.elapsed();
    testbed::process::set_open_files_limit(pid, soft).unwrap();

    // The idle connection was closed to make room, and only it: the
    // connections accepted after it had only just arrived.
    let closed = rt.block_on(async {
        let mut buf = [0u8; 64];
        tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf)).await
    });
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "the idle connection is still open: {closed:?}");
    assert!(
        evicted.len() == 1 && evicted[0].contains("Too many open files"),
        "expected one idle connection closed for want of a descriptor; log:\n{log}"
    );
    assert!(
        failed.first().is_some_and(|l| l.contains("Too many open files")),
        "no accept failed for want of a descriptor ({open_at_the_limit} open, limit {limit}); log:\n{log}"
    );
    // A failure, then a pause of 250 ms: a loop that retried at once
    // would have logged thousands.
    let most = elapsed.as_millis() / 250 + 2;
    assert!(
        failed.len() as u128 <= most,
        "{} failed accepts in {elapsed:?} (at most {most} with a pause after each)",
        failed.len()
    );
    assert!(spent < Duration::from_secs(1), "{spent:?} of CPU in 3 s with its listener unable to accept");

    // Descriptors free again: a connection that waited all along (the
    // first, taken in the room the idle one left) is served, and so is a
    // new one.
    let (code, answer) = rt.block_on(async {
        let mut tls = tls_over(waiting.remove(0), &c.ca.cert_pem, Some(&admin)).await.unwrap();
        let request = format!(
            "GET /vcluster/{}/dev/version HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
            s.ns
        );
        tls.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(60), tls.read_to_end(&mut out)).await;
        let answer = String::from_utf8_lossy(&out).into_owned();
        // A close without TLS close_notify after a whole answer is fine.
        assert!(read.is_ok() && !answer.is_empty(), "{read:?}: {answer:?}");
        (answer.split_whitespace().nth(1).and_then(|c| c.parse::<u16>().ok()), answer)
    });
    assert!(code == Some(200) && answer.contains("gitVersion"), "{answer}");
    drop(waiting);
    let out = kubectl_with(c, &s.kubeconfig, &["get", "namespaces", "-o", "name"]);
    assert!(out.status.success() && text(&out).0.contains("namespace/default"), "{:?}", text(&out));
}

/// k3s-based vclusters sign client certificates with a CA of their own;
/// their Secret's `certificate-authority` is only the serving CA, and the
/// client CA follows the admin certificate in `client-certificate`.
#[test]
fn a_vcluster_with_its_own_client_ca_takes_its_certificates_through_the_proxy() {
    let c = Cluster::shared();
    let s = setup_with("proxy-k3s", &[], None, VClusterOptions { own_client_ca: true, ..Default::default() });
    let whoami = kubectl_with(
        c,
        &s.kubeconfig,
        &["auth", "whoami", "-o", "jsonpath={.status.userInfo.username} {.status.userInfo.groups}"],
    );
    let (out, err) = text(&whoami);
    assert!(
        whoami.status.success() && out.starts_with("system:admin ") && out.contains("system:masters"),
        "{out} {err}"
    );
    let direct = kubectl_with(c, &s.vc.kubeconfig, &["get", "namespaces", "-o", "name"]);
    let proxied = kubectl_with(c, &s.kubeconfig, &["get", "namespaces", "-o", "name"]);
    assert!(proxied.status.success(), "{:?}", text(&proxied));
    assert_eq!(text(&proxied).0, text(&direct).0);
    // A certificate from the serving CA alone is not a client of this vcluster.
    let host_admin = user_kubeconfig(c, &s, "alice", &c.alice.cert);
    let refused = kubectl_with(c, &host_admin, &["get", "namespaces"]);
    assert!(
        text(&refused).1.contains("You must be logged in to the server (Unauthorized)"),
        "{:?}",
        text(&refused)
    );
}

#[test]
fn refusals_have_the_documented_status_and_read_well_in_kubectl() {
    let c = Cluster::shared();
    // A control plane that cannot start (no node fits its pod) never wakes:
    // after the policy's 2 s every request gets 504, and kubectl says so.
    let s = setup("proxy-refuse", &["--proxy-max-waiting=2"], Some("  wake: {timeout: 2s}\n"));
    put_to_sleep(c, &s);
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Requests without credentials never wake it: none, an empty bearer
    // token, a scheme the proxy cannot forward as a credential.
    let namespaces = format!("/vcluster/{}/dev/api/v1/namespaces", s.ns);
    for headers in [&[][..], &["Authorization: Bearer "], &["Authorization: Basic YWxpY2U6c2VjcmV0"]] {
        let (code, raw) = rt.block_on(raw_request(&s.proxy, &namespaces, None, headers));
        assert_eq!(code, 401, "{headers:?}: {raw}");
        assert!(raw.ends_with(UNAUTHORIZED), "{headers:?}: {raw}");
    }
    // The same answer, byte for byte, for a vcluster that does not exist.
    let (code, raw) =
        rt.block_on(raw_request(&s.proxy, &format!("/vcluster/{}/nope/api/v1/namespaces", s.ns), None, &[]));
    assert!(code == 401 && raw.ends_with(UNAUTHORIZED), "{raw}");
    assert_eq!(
        jsonpath(c, "statefulset", "dev", Some(&s.ns), "{.spec.replicas}"),
        "0",
        "woken without credentials"
    );
    // Nor does a request that opts out.
    let admin = c.ca.client("kube:admin", &["system:masters"]).unwrap();
    let (code, raw) =
        rt.block_on(raw_request(&s.proxy, &namespaces, Some(&admin), &["X-Dormant-Ignore: true"]));
    assert!(code == 503 && raw.contains("does not count as use"), "{raw}");
    assert_eq!(jsonpath(c, "statefulset", "dev", Some(&s.ns), "{.spec.replicas}"), "0", "woken without use");
    let unschedulable =
        r#"{"spec":{"template":{"spec":{"nodeSelector":{"dormant.dev/test":"no-such-node"}}}}}"#;
    kubectl(c, &["patch", "statefulset", "dev", "-n", &s.ns, "-p", unschedulable]);
    let cert = admin;
    let (code, raw) = rt.block_on(raw_get(&s.proxy, &namespaces, &cert));
    assert_eq!(code, 504, "{raw}");
    assert!(
        raw.contains("\"reason\":\"Timeout\"") && !raw.to_ascii_lowercase().contains("retry-after"),
        "{raw}"
    );
    // kubectl's discovery requests time out first; it prints the standard
    // 504 message (its discovery decoder cannot read a Status)...
    let out = kubectl_with(c, &s.kubeconfig, &["get", "namespaces"]);
    let (_, err) = text(&out);
    assert!(!out.status.success());
    assert!(err.lines().last().unwrap_or_default().starts_with("Error from server (Timeout)"), "{err}");
    // ...and a request that skips discovery prints dormant's own.
    let out = kubectl_with(c, &s.kubeconfig, &["get", "--raw", "/api/v1/namespaces"]);
    let (_, err) = text(&out);
    assert!(err.contains("Error from server (Timeout)") && err.contains("did not wake within 2s"), "{err}");

    // Full queue: two may wait, the others are refused at once with
    // 503 and Retry-After (which kubectl honours by retrying).
    kubectl(c, &["delete", "sleeppolicy", &s.id]);
    let fixed = r#"[{"op":"remove","path":"/spec/template/spec/nodeSelector"}]"#;
    kubectl(c, &["patch", "statefulset", "dev", "-n", &s.ns, "--type=json", "-p", fixed]);
    // A StatefulSet does not replace a pod that never became Ready.
    kubectl(c, &["delete", "pod", "dev-0", "-n", &s.ns, "--wait=false"]);
    wait_until("the vcluster to wake", Duration::from_secs(60), || s.vc.is_serving());
    put_to_sleep(c, &s);
    let answers: Vec<(u16, String)> = rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..6 {
            let (cert, proxy, ns) = (cert.clone(), s.proxy.clone(), s.ns.clone());
            tasks.push(tokio::spawn(async move {
                raw_get(&proxy, &format!("/vcluster/{ns}/dev/api/v1/namespaces"), &cert).await
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    let refused: Vec<&(u16, String)> = answers.iter().filter(|(code, _)| *code == 503).collect();
    assert!(!refused.is_empty() && answers.iter().any(|(code, _)| *code == 200), "{answers:?}");
    for (_, raw) in refused {
        assert!(raw.to_ascii_lowercase().contains("retry-after: 5"), "{raw}");
        assert!(
            raw.contains("\"reason\":\"ServiceUnavailable\"") && raw.contains("requests are already waiting"),
            "{raw}"
        );
    }
    let metrics = s.agent.get("/metrics");
    assert!(
        metrics.contains("dormant_proxy_requests_total{outcome=\"overloaded\",code=\"503\"}"),
        "{metrics}"
    );

    // Prevented: asleep on purpose, and requests say until when.
    let out = dormant(c, &["sleep", &format!("vcluster/{}/dev", s.ns), "--prevent-wakeup=2h", "--wait=60s"]);
    assert!(out.status.success(), "{}", text(&out).1);
    let out = kubectl_with(c, &s.kubeconfig, &["get", "--raw", "/api/v1/namespaces"]);
    let (_, err) = text(&out);
    assert!(
        err.contains("Error from server (ServiceUnavailable)")
            && err.contains("requests do not wake it until"),
        "{err}"
    );
    let out = kubectl_with(c, &s.kubeconfig, &["get", "namespaces"]);
    assert!(text(&out).1.contains("Error from server (ServiceUnavailable)"), "{}", text(&out).1);
    assert_eq!(state(c, "statefulset", "dev", Some(&s.ns)), "asleep", "prevented requests do not wake it");
}

/// A target whose annotations cannot be read is left exactly as it is by
/// every part of dormant (docs/architecture.md): the controller neither
/// sleeps nor wakes it and says why in an Event; a use through the proxy
/// still counts (recorded on the target, so nothing is lost once it is
/// fixed); and the proxy refuses at once, saying what is wrong, instead of
/// holding the request for a wake that would never come.
#[test]
fn an_invalid_target_is_left_as_it_is_and_its_use_still_counts() {
    let c = Cluster::shared();
    let s = setup("proxy-invalid", &[], Some("  wake: {timeout: 30s}\n"));
    put_to_sleep(c, &s);
    kubectl(
        c,
        &["annotate", "--overwrite", "statefulset", "dev", "-n", &s.ns, "dormant.dev/sleep-after=soon"],
    );
    wait_until("the target to be reported invalid", Duration::from_secs(30), || {
        event_notes(c, &s.ns, "PolicyInvalid").contains("dormant.dev/sleep-after")
    });
    let cert = c.ca.client("kube:admin", &["system:masters"]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let asked = Instant::now();
    let (code, raw) =
        rt.block_on(raw_get(&s.proxy, &format!("/vcluster/{}/dev/api/v1/namespaces", s.ns), &cert));
    assert_eq!(code, 503, "{raw}");
    assert!(
        raw.contains("dormant leaves it as it is until this is fixed")
            && raw.contains("dormant.dev/sleep-after"),
        "{raw}"
    );
    assert!(asked.elapsed() < Duration::from_secs(20), "held for {:?}, not refused at once", asked.elapsed());
    // The use counted: written on the target as its last activity.
    wait_until("the refused use to be recorded", Duration::from_secs(15), || {
        annotation(c, "statefulset", "dev", Some(&s.ns), "dormant.dev/last-activity-by")
            .starts_with("kube:admin list namespaces (proxy)")
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        jsonpath(c, "statefulset", "dev", Some(&s.ns), "{.spec.replicas}"),
        "0",
        "an invalid target was woken"
    );
    assert_eq!(state(c, "statefulset", "dev", Some(&s.ns)), "asleep");
    let metrics = s.agent.get("/metrics");
    assert!(
        metrics.contains("dormant_proxy_requests_total{outcome=\"invalid\",code=\"503\"} 1"),
        "{metrics}"
    );
    // Fixed, the next request wakes it.
    kubectl(c, &["annotate", "statefulset", "dev", "-n", &s.ns, "dormant.dev/sleep-after-"]);
    let out = kubectl_with(c, &s.kubeconfig, &["get", "namespaces", "-o", "name"]);
    assert!(out.status.success(), "{}\n{}", text(&out).1, s.agent.log());
}

/// A bearer token the proxy cannot check while the vcluster sleeps (not a
/// ServiceAccount token its keys verify, nor one its API server accepted
/// lately) is the cheapest thing an attacker has: a fresh random one per
/// request. A hundred of them, at once, wake a sleeping vcluster at most
/// once per budget interval, are never recorded as its use, and cannot fill
/// the queue a certificate user waits in at the same time.
#[test]
fn a_hundred_fresh_random_tokens_wake_a_vcluster_at_most_once_and_count_for_nothing() {
    let c = Cluster::shared();
    // A queue of 20 leaves 2 places to requests nothing could prove.
    let s = setup("proxy-random", &["--proxy-max-waiting=20"], Some("  wake: {timeout: 20s}\n"));
    put_to_sleep(c, &s);
    let starts = s.vc.starts();
    let admin = c.ca.client("kube:admin", &["system:masters"]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let path = format!("/vcluster/{}/dev/api/v1/namespaces", s.ns);
    let (tokens, cert) = rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..100 {
            let (proxy, path) = (s.proxy.clone(), path.clone());
            let token = format!("Authorization: Bearer random-{i}-{}", test_id("t"));
            tasks.push(tokio::spawn(async move { raw_request(&proxy, &path, None, &[&token]).await }));
            if i == 20 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let cert = {
            let (proxy, path, admin) = (s.proxy.clone(), path.clone(), admin.clone());
            tokio::spawn(async move { raw_get(&proxy, &path, &admin).await })
        };
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        (out, cert.await.unwrap())
    });
    assert_eq!(cert.0, 200, "the certificate user was not answered: {}", cert.1);
    let codes: std::collections::BTreeMap<u16, usize> =
        tokens.iter().fold(Default::default(), |mut m, (c, _)| {
            *m.entry(*c).or_default() += 1;
            m
        });
    assert!(codes.keys().all(|c| [401, 503].contains(c)), "a random token got through: {codes:?}");
    let metrics = s.agent.get("/metrics");
    let requested = metrics
        .lines()
        .find(|l| l.starts_with(r#"dormant_proxy_unverified_wakes_total{outcome="requested"}"#))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u32>().ok())
        .unwrap_or(0);
    assert!(requested <= 1, "{requested} wakes for unverified tokens:\n{metrics}");
    assert!(s.vc.starts() <= starts + 1, "woken more than once");
    // The certificate user's request is the one use recorded.
    wait_until("the certificate user's use to be recorded", Duration::from_secs(15), || {
        annotation(c, "statefulset", "dev", Some(&s.ns), "dormant.dev/last-activity-by")
            .starts_with("kube:admin list namespaces (proxy)")
    });
    assert!(!metrics.contains("(bearer token)"), "a random token was counted:\n{metrics}");

    // Asleep again within the budget interval: they wake nothing at all.
    put_to_sleep(c, &s);
    let starts = s.vc.starts();
    let answers: Vec<(u16, String)> = rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..100 {
            let (proxy, path) = (s.proxy.clone(), path.clone());
            let token = format!("Authorization: Bearer again-{i}-{}", test_id("t"));
            tasks.push(tokio::spawn(async move { raw_request(&proxy, &path, None, &[&token]).await }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    assert!(answers.iter().all(|(code, raw)| *code == 401 && raw.ends_with(UNAUTHORIZED)), "{answers:?}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(jsonpath(c, "statefulset", "dev", Some(&s.ns), "{.spec.replicas}"), "0");
    assert_eq!(s.vc.starts(), starts);
    let refused = s
        .agent
        .get("/metrics")
        .lines()
        .find(|l| l.starts_with(r#"dormant_proxy_unverified_wakes_total{outcome="refused"}"#))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u32>().ok())
        .unwrap_or(0);
    assert!(refused >= 100, "{refused}");
}

/// A wake for a token nothing could check lasts only its grace (the wake
/// timeout and a minute) when no use follows: a token its API server then
/// refuses does not keep the vcluster awake, and the Event says why it
/// slept again.
#[test]
fn an_unverified_wake_that_no_use_confirms_ends_in_sleep() {
    let c = Cluster::shared();
    let s = setup("proxy-unconfirmed", &[], Some("  wake: {timeout: 5s}\n"));
    put_to_sleep(c, &s);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let path = format!("/vcluster/{}/dev/api/v1/namespaces", s.ns);
    let (code, raw) = rt.block_on(raw_request(&s.proxy, &path, None, &["Authorization: Bearer made-up"]));
    assert!(code == 401 || code == 504, "{raw}");
    wait_until("the vcluster to wake for it", Duration::from_secs(60), || {
        state(c, "statefulset", "dev", Some(&s.ns)) == "awake"
    });
    assert_ne!(annotation(c, "statefulset", "dev", Some(&s.ns), "dormant.dev/unverified-wake"), "");
    assert!(
        !annotation(c, "statefulset", "dev", Some(&s.ns), "dormant.dev/last-activity-by").contains("bearer"),
        "recorded as a use"
    );
    wait_until("no use to confirm it, and sleep again", Duration::from_secs(150), || {
        state(c, "statefulset", "dev", Some(&s.ns)) == "asleep"
    });
    let notes = event_notes(c, &s.ns, "Slept");
    assert!(notes.contains("no use confirmed the wake"), "{notes}");
}

/// ServiceAccount tokens are checked against the vcluster's own keys while
/// it sleeps: a valid one wakes it and is recorded as that account; one
/// signed by another key with the vcluster's key id, or one of its own
/// that has expired, is refused and wakes nothing.
#[test]
fn a_service_account_token_wakes_only_when_the_vclusters_keys_verify_it() {
    use base64::Engine as _;
    let c = Cluster::shared();
    let s = setup("proxy-satoken", &[], None);
    let in_vc = |args: &[&str]| {
        let out = kubectl_with(c, &s.vc.kubeconfig, args);
        assert!(out.status.success(), "{:?}", text(&out));
        text(&out).0.trim().to_string()
    };
    in_vc(&["create", "serviceaccount", "deployer", "-n", "default"]);
    // (Rules of its own: nothing aggregates `view` in this API server.)
    in_vc(&["create", "clusterrole", "namespace-reader", "--verb=list", "--resource=namespaces"]);
    in_vc(&[
        "create",
        "clusterrolebinding",
        "deployer-reads",
        "--clusterrole=namespace-reader",
        "--serviceaccount=default:deployer",
    ]);
    let valid = in_vc(&["create", "token", "deployer", "-n", "default"]);
    let jwks: serde_json::Value = serde_json::from_str(&in_vc(&["get", "--raw", "/openid/v1/jwks"])).unwrap();
    let kid = jwks["keys"][0]["kid"].as_str().unwrap().to_string();
    // A request while awake lets the proxy read the vcluster's keys.
    let admin = c.ca.client("kube:admin", &["system:masters"]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (code, _) = rt.block_on(raw_get(&s.proxy, &format!("/vcluster/{}/dev/api", s.ns), &admin));
    assert_eq!(code, 200);
    std::thread::sleep(Duration::from_secs(2));

    let sign = |der: &[u8], exp: i64| {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(kid.clone());
        let claims = serde_json::json!({
            "iss": "https://kubernetes.default.svc.cluster.local",
            "sub": "system:serviceaccount:default:deployer",
            "aud": ["https://kubernetes.default.svc.cluster.local"],
            "exp": chrono::Utc::now().timestamp() + exp,
        });
        jsonwebtoken::encode(&header, &claims, &jsonwebtoken::EncodingKey::from_ec_der(der)).unwrap()
    };
    let der = |pem: &str| {
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD.decode(body).unwrap()
    };
    let forged = sign(&der(&testbed::pki::service_account_key().unwrap().key_pem), 3600);
    let expired = sign(&der(&std::fs::read_to_string(c.dir.join("sa.key")).unwrap()), -3600);

    put_to_sleep(c, &s);
    let starts = s.vc.starts();
    let path = format!("/vcluster/{}/dev/api/v1/namespaces", s.ns);
    for (what, token) in [("forged", &forged), ("expired", &expired)] {
        let auth = format!("Authorization: Bearer {token}");
        let (code, raw) = rt.block_on(raw_request(&s.proxy, &path, None, &[&auth]));
        assert!(code == 401 && raw.ends_with(UNAUTHORIZED), "{what}: {raw}");
    }
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        jsonpath(c, "statefulset", "dev", Some(&s.ns), "{.spec.replicas}"),
        "0",
        "woken by a bad token"
    );
    assert_eq!(s.vc.starts(), starts);
    let metrics = s.agent.get("/metrics");
    assert!(!metrics.contains(r#"dormant_proxy_unverified_wakes_total{outcome="requested"} "#), "{metrics}");

    let auth = format!("Authorization: Bearer {valid}");
    let (code, raw) = rt.block_on(raw_request(&s.proxy, &path, None, &[&auth]));
    assert_eq!(code, 200, "{raw}\n{}", s.agent.log());
    let by = annotation(c, "statefulset", "dev", Some(&s.ns), "dormant.dev/last-activity-by");
    assert!(by.starts_with("system:serviceaccount:default:deployer list namespaces (proxy)"), "{by}");
}

/// A watch its API server refuses (401, or 403 to a token with no rights)
/// counts for nothing, also while its answer stays open: an HTTP/2 client
/// that never opens its flow-control window keeps the stream alive, and
/// must not keep the vcluster awake by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_watch_held_open_keeps_nothing_awake() {
    let s = tokio::task::spawn_blocking(|| setup("proxy-heldopen", &[], None)).await.unwrap();
    let c = Cluster::shared();
    let no_rights = {
        let out = kubectl_with(c, &s.vc.kubeconfig, &["create", "serviceaccount", "nobody", "-n", "default"]);
        assert!(out.status.success(), "{:?}", text(&out));
        text(&kubectl_with(c, &s.vc.kubeconfig, &["create", "token", "nobody", "-n", "default"]))
            .0
            .trim()
            .to_string()
    };
    let counted = |s: &Setup| {
        s.agent
            .get("/metrics")
            .lines()
            .find(|l| l.starts_with(r#"dormant_activity_total{source="proxy",outcome="counted",rule=""}"#))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let port: u16 = s.proxy.rsplit(':').next().unwrap().parse().unwrap();
    let mut held = Vec::new();
    for token in ["not-a-token".to_string(), no_rights] {
        let tls = tls_connect_alpn(port, &c.ca.cert_pem, None, b"h2").await.unwrap();
        let (mut client, conn) = h2::client::Builder::new()
            .initial_window_size(0)
            .handshake::<_, bytes::Bytes>(tls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = http::Request::get(format!(
            "https://127.0.0.1:{port}/vcluster/{}/dev/api/v1/namespaces/default/pods?watch=true",
            s.ns
        ))
        .header("authorization", format!("Bearer {token}"))
        .body(())
        .unwrap();
        let (resp, _) = client.send_request(req, true).unwrap();
        let resp = resp.await.unwrap();
        assert!([401, 403].contains(&resp.status().as_u16()), "{:?}", resp.status());
        // Its body is never read: the window stays shut.
        held.push((client, resp));
    }
    let (before, last) =
        (counted(&s), annotation(c, "statefulset", "dev", Some(&s.ns), "dormant.dev/last-activity"));
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert_eq!(counted(&s), before, "a refused watch counted as use while held open");
    assert_eq!(annotation(c, "statefulset", "dev", Some(&s.ns), "dormant.dev/last-activity"), last);
    drop(held);
}
