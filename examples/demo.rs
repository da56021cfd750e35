//! `make demo`: dormant's main job on a local testbed.
//!
//! Starts a real control plane (etcd, kube-apiserver, controller-manager,
//! scheduler, kwok), creates three vclusters — team-b/ci a real vcluster
//! v0.30.0 (`vcluster start`, its syncer and controller-manager, on kine),
//! the other two dormant's quicker stand-ins, each with its own real API
//! server — and a namespace with workloads, runs the agent with short idle
//! times, and shows a refreshing status table while targets fall asleep and
//! wake — by `dormant wake`, by a wake schedule, and by use: kubectl run
//! against a sleeping vcluster through dormant's proxy, and kubectl run on
//! the host cluster, which its API server's audit webhook reports to
//! dormant. Ctrl-C stops everything.
//!
//! `--exit-when-done` tells the story as plain lines instead, prints the
//! status table once at the end and exits: 0 when every step happened, 1
//! (with the reason) when one failed or the story took longer than six
//! minutes. `tests/demo.rs` runs it that way, through [`run`].
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{Timelike, Utc};
use clap::Parser;
use dormant::cli::targets::{View, rows, table};
use dormant::cli::{Cli, Command};
use dormant::policy::annotations::TargetState;
use dormant::target::TargetRef;
use testbed::real_vcluster::{RealVCluster, RealVClusterOptions};
use testbed::vcluster::{VCluster, VClusterOptions};
use testbed::{Cluster, ClusterOptions};

const IDLE: &str = "25s";
/// How long the whole story may take with `--exit-when-done`.
const STORY_TIMEOUT: Duration = Duration::from_secs(360);

struct Screen {
    step: Mutex<String>,
    /// What happened, one line each.
    log: Mutex<Vec<String>>,
    /// Plain lines as things happen, instead of a refreshing table.
    scripted: bool,
    /// Each wake as the cluster recorded it.
    wakes: Mutex<Vec<Wake>>,
}

/// One wake of the story as the cluster recorded it.
#[derive(Debug, Clone)]
pub struct Wake {
    pub target: String,
    /// The `Woke` Events dormant wrote about the target so far, each as
    /// `action: note` (the action names the trigger, e.g. `WokeSchedule`),
    /// repeated as often as its series counts.
    pub woke: Vec<String>,
    /// Pods running in the target's namespace once it woke (waited for
    /// until `want` or a minute), by name.
    pub pods: Vec<String>,
}

impl Screen {
    fn step(&self, s: &str) {
        *self.step.lock().unwrap() = s.to_string();
        self.note(s);
    }
    fn note(&self, s: &str) {
        let line = format!("{}  {s}", Utc::now().format("%H:%M:%S"));
        if self.scripted {
            println!("{line}");
        }
        self.log.lock().unwrap().push(line);
    }
}

fn apply(c: &Cluster, yaml: &str) {
    c.kubectl_apply(&c.admin, yaml).unwrap_or_else(|e| panic!("{e}"));
}

async fn state_of(client: &kube::Client, t: &TargetRef) -> Option<TargetState> {
    let view = View::load(client).await.ok()?;
    let ev = view.evaluate(t, Utc::now()).ok()??;
    ev.annotations.state
}

/// Records how `t` (its object `regarding` in namespace `ns`) woke: the
/// `Woke` Events about it (waited for up to 10 s) and the pods running
/// in `ns` (waited for until there are `want`, up to a minute).
async fn record_wake(
    screen: &Screen,
    c: &Cluster,
    t: &TargetRef,
    ns: &str,
    regarding: &str,
    want: usize,
) -> Wake {
    let read = |args: &[&str]| c.kubectl_out(&c.admin, args).unwrap_or_default();
    let start = Instant::now();
    let woke = loop {
        let events = read(&[
            "get",
            "events.events.k8s.io",
            "-n",
            ns,
            "--field-selector=reason=Woke",
            "-o",
            "jsonpath={range .items[*]}{.regarding.name}|{.series.count}|{.action}: {.note}{\"\\n\"}{end}",
        ]);
        let woke: Vec<String> = events
            .lines()
            .filter_map(|l| {
                let (name, rest) = l.split_once('|')?;
                let (count, said) = rest.split_once('|')?;
                (name == regarding).then(|| vec![said.to_string(); count.parse().unwrap_or(1)])
            })
            .flatten()
            .collect();
        if !woke.is_empty() || start.elapsed() > Duration::from_secs(10) {
            break woke;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let start = Instant::now();
    let pods = loop {
        let pods: Vec<String> = read(&[
            "get",
            "pods",
            "-n",
            ns,
            "--field-selector=status.phase=Running",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name}{\"\\n\"}{end}",
        ])
        .lines()
        .map(String::from)
        .collect();
        if pods.len() >= want || start.elapsed() > Duration::from_secs(60) {
            break pods;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let wake = Wake { target: t.to_string(), woke, pods };
    screen.wakes.lock().unwrap().push(wake.clone());
    wake
}

async fn wait_state(client: &kube::Client, t: &TargetRef, want: TargetState) {
    while state_of(client, t).await != Some(want) {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    run(std::env::args().skip(1).any(|a| a == "--exit-when-done")).await.map(drop)
}

/// How the story went, with `--exit-when-done`.
pub struct Told {
    /// What happened, one line each, as printed.
    pub lines: Vec<String>,
    /// `dormant status` for the demo's targets when the story ended.
    pub table: String,
    /// Each wake, in the order of the story.
    pub wakes: Vec<Wake>,
}

/// Runs the demo: until Ctrl-C, or with `scripted` until the story ends
/// (an error if a step failed or it took longer than [`STORY_TIMEOUT`]).
pub async fn run(scripted: bool) -> anyhow::Result<Told> {
    eprintln!("Starting a local testbed (etcd, kube-apiserver, controller-manager, scheduler, kwok)…");
    // The host API server reports every request to the agent's audit
    // webhook (a bearer token, and a serving certificate from a CA of the
    // demo's own).
    let audit_dir = tempfile::tempdir()?;
    let audit = testbed::audit::AuditReceiver::new(audit_dir.path(), "dormant-demo")?;
    let options = ClusterOptions { audit: Some(audit.webhook("/audit/host")), ..Default::default() };
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(options)).await??;
    let c = Arc::new(cluster);
    eprintln!("Cluster up in {:.1}s. Creating targets…", c.started_in.as_secs_f64());

    let crd = dormant::cli::crd_yaml()?;
    apply(&c, &crd);
    c.kubectl_out(&c.admin, &["wait", "--for=condition=Established", "crd/sleeppolicies.dormant.dev"]).ok();
    apply(
        &c,
        &format!(
            "apiVersion: dormant.dev/v1alpha1\nkind: SleepPolicy\nmetadata: {{name: demo}}\nspec:\n  selector: {{namespaceSelector: {{matchLabels: {{demo: \"true\"}}}}}}\n  sleepAfter: {IDLE}\n  pricing: {{cpuCoreHour: 0.05, memoryGiBHour: 0.006, currency: USD}}\n"
        ),
    );
    for ns in ["team-a", "team-b", "team-c", "shop"] {
        apply(
            &c,
            &format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{demo: \"true\"}}}}\n"
            ),
        );
    }
    apply(
        &c,
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec: {containers: [{name: web, image: nginx:1.27, resources: {requests: {cpu: 500m, memory: 512Mi}}}]}
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db, namespace: shop}
spec:
  replicas: 1
  serviceName: db
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec: {containers: [{name: db, image: postgres:17, resources: {requests: {cpu: "1", memory: 2Gi}}}]}
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: nightly-report, namespace: shop}
spec:
  schedule: "0 3 * * *"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: Never
          containers: [{name: report, image: busybox:1.37}]
"#,
    );
    let vc_a =
        Arc::new(VCluster::create(&c, "team-a", "dev", VClusterOptions { pods: 3, ..Default::default() })?);
    // A real vcluster: its syncer deploys CoreDNS inside it, and that
    // Deployment's pod is synced to the host.
    let vc_b = Arc::new(RealVCluster::create(&c, "team-b", "ci", RealVClusterOptions::default())?);
    let vc_c =
        Arc::new(VCluster::create(&c, "team-c", "qa", VClusterOptions { pods: 1, ..Default::default() })?);
    // alice (group team-a) may look at team-c too.
    c.kubectl_out(
        &c.admin,
        &["create", "rolebinding", "alice-view", "--clusterrole=view", "--user=alice", "-n", "team-c"],
    )
    .map_err(|e| anyhow::anyhow!("kubectl create rolebinding: {e}"))?;

    let client = testbed::client_from_kubeconfig(&c.admin.kubeconfig).await?;
    // The proxy serves the testbed API server's certificate (its CA is the
    // testbed's), on a loopback port.
    let proxy = format!("https://127.0.0.1:{}", testbed::process::free_port()?);
    let args = [
        "dormant".to_string(),
        "agent".into(),
        "--namespace=dormant".into(),
        "--identity=demo-agent".into(),
        "--admin-addr=127.0.0.1:0".into(),
        "--flush-interval=1s".into(),
        format!("--proxy-addr={}", proxy.trim_start_matches("https://")),
        format!("--proxy-cert={}", c.dir.join("apiserver.crt").display()),
        format!("--proxy-key={}", c.dir.join("apiserver.key").display()),
    ];
    let agent_args = match Cli::parse_from(args.into_iter().chain(audit.agent_flags())).command {
        Command::Agent(a) => a,
        _ => unreachable!(),
    };
    c.kubectl_out(&c.admin, &["create", "namespace", "dormant"]).ok();
    // The real vcluster writes its `vc-ci` Secret (the kubeconfig dormant
    // reads) once it has started.
    eprintln!("Waiting for the real vcluster team-b/ci to start…");
    let started = Instant::now();
    tokio::task::block_in_place(|| vc_b.wait_serving(&c, Duration::from_secs(300)))?;
    eprintln!("vcluster team-b/ci serving after {:.1}s.", started.elapsed().as_secs_f64());
    let settings = agent_args.validate().map_err(|e| anyhow::anyhow!(e.join("; ")))?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let agent_client = client.clone();
    let agent = tokio::spawn(async move {
        let _ = dormant::agent::run_with(settings, agent_client, async {
            let _ = stop_rx.await;
        })
        .await;
    });

    let screen = Arc::new(Screen {
        step: Mutex::new(String::new()),
        log: Mutex::new(Vec::new()),
        scripted,
        wakes: Mutex::new(Vec::new()),
    });
    let targets = [
        TargetRef::vcluster("team-a", "dev"),
        TargetRef::vcluster("team-b", "ci"),
        TargetRef::namespace("shop"),
        TargetRef::vcluster("team-c", "qa"),
    ];
    // What `dormant kubeconfig team-b/ci` writes: the vcluster's own
    // credentials, through the proxy.
    let proxy_kubeconfig = c.dir.join("team-b-ci-via-dormant.kubeconfig");
    std::fs::write(
        &proxy_kubeconfig,
        dormant::cli::kubeconfig::kubeconfig(&client, &targets[1], &proxy, &c.ca.cert_pem).await?,
    )?;

    // The table, refreshed every second.
    let painter = (!scripted).then(|| {
        let screen = screen.clone();
        let client = client.clone();
        let c = c.clone();
        let (vc_a, vc_b, vc_c) = (vc_a.clone(), vc_b.clone(), vc_c.clone());
        tokio::spawn(async move {
            loop {
                if let Ok(view) = View::load(&client).await {
                    let mut mine = rows(&view, Utc::now());
                    mine.retain(|r| {
                        r.target.contains("team-a")
                            || r.target.contains("team-b")
                            || r.target.contains("team-c")
                            || r.target.contains("shop")
                    });
                    let pods = c
                        .kubectl_out(&c.admin, &["get", "pods", "-A", "--no-headers"])
                        .map(|s| {
                            s.lines()
                                .filter(|l| ["team-a ", "team-b ", "team-c ", "shop "].iter().any(|n| l.starts_with(n)))
                                .count()
                        })
                        .unwrap_or(0);
                    let mut out = String::from("\x1b[2J\x1b[H");
                    out.push_str("dormant demo — sleep mode for Kubernetes on a local testbed (Ctrl-C stops everything)\n\n");
                    out.push_str(&format!("Now: {}\n\n", screen.step.lock().unwrap()));
                    out.push_str(&table(&mine));
                    out.push_str(&format!(
                        "\nPods running on the fake node: {pods}    vcluster API servers: team-a/dev {}  team-b/ci {}  team-c/qa {}\n",
                        if vc_a.is_serving() { "up" } else { "down" },
                        if vc_b.is_running() { "up" } else { "down" },
                        if vc_c.is_serving() { "up" } else { "down" },
                    ));
                    out.push_str(&format!("\nSTATE is what dormant last did; NEXT is when it changes without new use; idle time before sleep: {IDLE}.\n\nWhat happened:\n"));
                    let log = screen.log.lock().unwrap();
                    for l in &log[log.len().saturating_sub(12)..] {
                        out.push_str(&format!("  {l}\n"));
                    }
                    print!("{out}");
                    let _ = std::io::stdout().flush();
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    });

    // The story.
    let story = {
        let (screen, client, c, targets) = (screen.clone(), client.clone(), c.clone(), targets.clone());
        tokio::spawn(async move {
            let told = story(&screen, &client, &c, &targets, proxy_kubeconfig).await;
            if let Err(e) = &told {
                screen.step(&format!("the demo stopped: {e:#}"));
            }
            told
        })
    };

    let mut table = String::new();
    let outcome = if scripted {
        let outcome = match tokio::time::timeout(STORY_TIMEOUT, story).await {
            Ok(Ok(told)) => told,
            Ok(Err(e)) => Err(anyhow::anyhow!("the story panicked: {e}")),
            Err(_) => Err(anyhow::anyhow!(
                "the story did not finish within {STORY_TIMEOUT:?}; it was at: {}",
                screen.step.lock().unwrap()
            )),
        };
        table = status_table(&client, &targets).await;
        print!("\n{table}");
        outcome
    } else {
        let _ = tokio::signal::ctrl_c().await;
        story.abort();
        Ok(())
    };
    if let Some(painter) = painter {
        painter.abort();
    }
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), agent).await;
    println!("\nStopping the testbed…");
    drop(vc_a);
    drop(vc_b);
    drop(vc_c);
    drop(c);
    outcome?;
    let lines = screen.log.lock().unwrap().clone();
    let wakes = screen.wakes.lock().unwrap().clone();
    Ok(Told { lines, table, wakes })
}

/// `dormant status`, for the demo's targets only.
async fn status_table(client: &kube::Client, targets: &[TargetRef; 4]) -> String {
    match View::load(client).await {
        Ok(view) => {
            let mut mine = rows(&view, Utc::now());
            mine.retain(|r| targets.iter().any(|t| r.target == t.to_string()));
            table(&mine)
        }
        Err(e) => format!("(no status: {e})\n"),
    }
}

/// Everything asleep by idleness; then woken by `dormant wake`, by kubectl
/// through the proxy, by kubectl on the host (audit), and by a wake schedule.
async fn story(
    screen: &Screen,
    client: &kube::Client,
    c: &Cluster,
    targets: &[TargetRef; 4],
    proxy_kubeconfig: PathBuf,
) -> anyhow::Result<()> {
    screen.step(&format!("everything is awake; nobody uses it, so each target sleeps after {IDLE} idle"));
    for t in targets {
        wait_state(client, t, TargetState::Asleep).await;
        screen.note(&format!("{t} fell asleep (idle): replicas 0, pods gone"));
    }

    screen.step("all asleep. A developer runs `dormant wake vcluster/team-a/dev`");
    dormant::cli::targets::wake(client, &targets[0], None, &mut Vec::new()).await?;
    wait_state(client, &targets[0], TargetState::Awake).await;
    let wake = record_wake(screen, c, &targets[0], "team-a", "dev", 4).await;
    screen.note(&format!("vcluster/team-a/dev is awake again: {} pods running", wake.pods.len()));

    let at = Utc::now() + chrono::Duration::seconds(80);
    let cron = format!("{} {} * * *", at.minute(), at.hour());
    c.kubectl_out(
        &c.admin,
        &["annotate", "--overwrite", "namespace", "shop", &format!("dormant.dev/wake-schedule={cron}")],
    )
    .map_err(|e| anyhow::anyhow!("kubectl annotate: {e}"))?;
    screen.note(&format!(
        "namespace shop gets a wake schedule \"{cron}\" (UTC): it will wake at {:02}:{:02}",
        at.hour(),
        at.minute()
    ));

    screen.step(
        "vcluster team-b/ci (a real vcluster) is asleep; a developer runs `kubectl get namespaces` on it through dormant's proxy \
         (kubeconfig from `dormant kubeconfig team-b/ci`)",
    );
    let start = Instant::now();
    let mut kubectl = std::process::Command::new(c.bins.path("kubectl"));
    kubectl.arg(format!("--kubeconfig={}", proxy_kubeconfig.display())).args([
        "get",
        "namespaces",
        "-o",
        "name",
    ]);
    let out = tokio::task::spawn_blocking(move || kubectl.output()).await??;
    anyhow::ensure!(
        out.status.success(),
        "kubectl through the proxy failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let names: Vec<String> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| l.replace("namespace/", "")).collect();
    screen.note(&format!(
        "kubectl answered after {:.1} s ({}): the proxy held the request, woke vcluster/team-b/ci and forwarded it once its API server was ready",
        start.elapsed().as_secs_f64(),
        names.join(", ")
    ));
    wait_state(client, &targets[1], TargetState::Awake).await;
    // The real vcluster's control plane is back when kubectl is answered;
    // its synced CoreDNS pod follows once the vcluster's own
    // controller-manager leads again (16-30 s), which the 25 s idle time may
    // not leave it: only the control plane is waited for.
    let wake = record_wake(screen, c, &targets[1], "team-b", "ci", 1).await;
    screen.note(&format!("vcluster/team-b/ci woke because it was used: {} pods running", wake.pods.len()));

    screen.step(
        "vcluster team-c/qa is asleep; alice runs `kubectl get pods -n team-c` on the host cluster, \
         whose API server reports it to dormant's audit webhook",
    );
    let start = Instant::now();
    c.kubectl_out(&c.alice, &["get", "pods", "-n", "team-c"])
        .map_err(|e| anyhow::anyhow!("kubectl as alice: {e}"))?;
    wait_state(client, &targets[3], TargetState::Awake).await;
    let woke_after = start.elapsed();
    record_wake(screen, c, &targets[3], "team-c", "qa", 2).await;
    // The ledger writes who it was onto the target within its flush interval.
    let mut by = String::new();
    while by.is_empty() && start.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        by = c
            .kubectl_out(
                &c.admin,
                &[
                    "get",
                    "statefulset",
                    "qa",
                    "-n",
                    "team-c",
                    "-o",
                    "jsonpath={.metadata.annotations.dormant\\.dev/last-activity-by}",
                ],
            )
            .unwrap_or_default();
    }
    screen.note(&format!(
        "vcluster/team-c/qa woke {:.1} s later, on the audit event (last activity by: {by})",
        woke_after.as_secs_f64()
    ));

    screen.step(&format!(
        "waiting for namespace shop's wake schedule ({:02}:{:02} UTC)",
        at.hour(),
        at.minute()
    ));
    wait_state(client, &targets[2], TargetState::Awake).await;
    let wake = record_wake(screen, c, &targets[2], "shop", "shop", 4).await;
    screen.note(&format!("namespace/shop woke on schedule: {} pods running", wake.pods.len()));

    screen.step(&format!(
        "left alone, everything goes back to sleep after {IDLE}{}",
        if screen.scripted { "" } else { "; Ctrl-C to stop" }
    ));
    Ok(())
}
