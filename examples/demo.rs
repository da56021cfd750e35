//! `make demo`: dormant's main job on a local testbed.
//!
//! Starts a real control plane (etcd, kube-apiserver, controller-manager,
//! scheduler, kwok), creates two vclusters (each with its own real API
//! server) and a namespace with workloads, runs the agent with short idle
//! times, and shows a refreshing status table while targets fall asleep and
//! wake — by `dormant wake`, by a wake schedule and by use. Ctrl-C stops
//! everything.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{Timelike, Utc};
use clap::Parser;
use dormant::cli::targets::{View, rows, table};
use dormant::cli::{Cli, Command};
use dormant::policy::annotations::TargetState;
use dormant::target::TargetRef;
use testbed::vcluster::{VCluster, VClusterOptions};
use testbed::{Cluster, ClusterOptions};

const IDLE: &str = "25s";

struct Screen {
    step: Mutex<String>,
    log: Mutex<VecDeque<String>>,
}

impl Screen {
    fn step(&self, s: &str) {
        *self.step.lock().unwrap() = s.to_string();
        self.note(s);
    }
    fn note(&self, s: &str) {
        let mut log = self.log.lock().unwrap();
        log.push_back(format!("{}  {s}", Utc::now().format("%H:%M:%S")));
        while log.len() > 12 {
            log.pop_front();
        }
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

async fn wait_state(client: &kube::Client, t: &TargetRef, want: TargetState) {
    while state_of(client, t).await != Some(want) {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    eprintln!("Starting a local testbed (etcd, kube-apiserver, controller-manager, scheduler, kwok)…");
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(ClusterOptions::default())).await??;
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
    for ns in ["team-a", "team-b", "shop"] {
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
    let vc_b =
        Arc::new(VCluster::create(&c, "team-b", "ci", VClusterOptions { pods: 2, ..Default::default() })?);

    let client = testbed::client_from_kubeconfig(&c.admin.kubeconfig).await?;
    let agent_args = match Cli::parse_from([
        "dormant",
        "agent",
        "--namespace=dormant",
        "--identity=demo-agent",
        "--admin-addr=127.0.0.1:0",
        "--flush-interval=1s",
    ])
    .command
    {
        Command::Agent(a) => a,
        _ => unreachable!(),
    };
    c.kubectl_out(&c.admin, &["create", "namespace", "dormant"]).ok();
    let settings = agent_args.validate().map_err(|e| anyhow::anyhow!(e.join("; ")))?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let agent_client = client.clone();
    let agent = tokio::spawn(async move {
        let _ = dormant::agent::run_with(settings, agent_client, async {
            let _ = stop_rx.await;
        })
        .await;
    });

    let screen = Arc::new(Screen { step: Mutex::new(String::new()), log: Mutex::new(VecDeque::new()) });
    let targets = [
        TargetRef::vcluster("team-a", "dev"),
        TargetRef::vcluster("team-b", "ci"),
        TargetRef::namespace("shop"),
    ];

    // The table, refreshed every second.
    let painter = {
        let screen = screen.clone();
        let client = client.clone();
        let c = c.clone();
        let (vc_a, vc_b) = (vc_a.clone(), vc_b.clone());
        tokio::spawn(async move {
            loop {
                if let Ok(view) = View::load(&client).await {
                    let mut mine = rows(&view, Utc::now());
                    mine.retain(|r| {
                        r.target.contains("team-a")
                            || r.target.contains("team-b")
                            || r.target.contains("shop")
                    });
                    let pods = c
                        .kubectl_out(&c.admin, &["get", "pods", "-A", "--no-headers"])
                        .map(|s| {
                            s.lines()
                                .filter(|l| ["team-a ", "team-b ", "shop "].iter().any(|n| l.starts_with(n)))
                                .count()
                        })
                        .unwrap_or(0);
                    let mut out = String::from("\x1b[2J\x1b[H");
                    out.push_str("dormant demo — sleep mode for Kubernetes on a local testbed (Ctrl-C stops everything)\n\n");
                    out.push_str(&format!("Now: {}\n\n", screen.step.lock().unwrap()));
                    out.push_str(&table(&mine));
                    out.push_str(&format!(
                        "\nPods running on the fake node: {pods}    vcluster API servers: team-a/dev {}  team-b/ci {}\n",
                        if vc_a.is_serving() { "up" } else { "down" },
                        if vc_b.is_serving() { "up" } else { "down" },
                    ));
                    out.push_str(&format!("\nSTATE is what dormant last did; NEXT is when it changes without new use; idle time before sleep: {IDLE}.\n\nWhat happened:\n"));
                    for l in screen.log.lock().unwrap().iter() {
                        out.push_str(&format!("  {l}\n"));
                    }
                    print!("{out}");
                    let _ = std::io::stdout().flush();
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };

    // The story.
    let story = {
        let screen = screen.clone();
        let client = client.clone();
        let c = c.clone();
        tokio::spawn(async move {
            screen.step(&format!(
                "everything is awake; nobody uses it, so each target sleeps after {IDLE} idle"
            ));
            for t in &targets {
                wait_state(&client, t, TargetState::Asleep).await;
                screen.note(&format!("{t} fell asleep (idle): replicas 0, pods gone"));
            }
            screen.step("all asleep. A developer runs `dormant wake vcluster/team-a/dev`");
            let mut sink = Vec::new();
            let _ = dormant::cli::targets::wake(&client, &targets[0], None, &mut sink).await;
            wait_state(&client, &targets[0], TargetState::Awake).await;
            screen.note("vcluster/team-a/dev is awake again: control plane 1, its API server serves, synced pods back");
            let at = Utc::now() + chrono::Duration::seconds(70);
            let cron = format!("{} {} * * *", at.minute(), at.hour());
            c.kubectl_out(
                &c.admin,
                &[
                    "annotate",
                    "--overwrite",
                    "namespace",
                    "shop",
                    &format!("dormant.dev/wake-schedule={cron}"),
                ],
            )
            .ok();
            screen.step(&format!(
                "namespace shop gets a wake schedule \"{cron}\" (UTC): it wakes at {:02}:{:02}",
                at.hour(),
                at.minute()
            ));
            wait_state(&client, &targets[2], TargetState::Awake).await;
            screen.note("namespace/shop woke on schedule: web 3, db 1, the CronJob resumed");
            screen.step("someone uses vcluster team-b/ci (its last-activity is updated, as the audit webhook and proxy do)");
            let now = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            c.kubectl_out(
                &c.admin,
                &[
                    "annotate",
                    "--overwrite",
                    "statefulset",
                    "ci",
                    "-n",
                    "team-b",
                    &format!("dormant.dev/last-activity={now}"),
                    "dormant.dev/last-activity-by=ci-robot create pods (audit)",
                ],
            )
            .ok();
            wait_state(&client, &targets[1], TargetState::Awake).await;
            screen.note("vcluster/team-b/ci woke because it was used");
            screen.step(&format!("left alone, everything goes back to sleep after {IDLE}; Ctrl-C to stop"));
        })
    };

    let _ = tokio::signal::ctrl_c().await;
    story.abort();
    painter.abort();
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), agent).await;
    println!("\nStopping the testbed…");
    drop(story);
    drop(painter);
    drop(vc_a);
    drop(vc_b);
    drop(c);
    Ok(())
}
