//! The sleep/wake engine on the real testbed: the `dormant` binary as an
//! agent, targets falling asleep and coming back exactly as they were.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use chrono::{DateTime, Utc};
use support::*;
use testbed::Cluster;
use testbed::vcluster::{VCluster, VClusterOptions};

fn workloads_yaml(ns: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: web.frontend, namespace: {ns}}}
spec:
  replicas: 3
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec: {{containers: [{{name: web, image: nginx:1.27, resources: {{requests: {{cpu: 250m, memory: 128Mi}}}}}}]}}
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {{name: db, namespace: {ns}}}
spec:
  replicas: 2
  serviceName: db
  selector: {{matchLabels: {{app: db}}}}
  template:
    metadata: {{labels: {{app: db}}}}
    spec: {{containers: [{{name: db, image: postgres:17, resources: {{requests: {{cpu: "1", memory: 1Gi}}}}}}]}}
---
apiVersion: batch/v1
kind: CronJob
metadata: {{name: report, namespace: {ns}}}
spec:
  schedule: "0 3 * * *"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: Never
          containers: [{{name: report, image: busybox:1.37}}]
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: payments-mock
  namespace: {ns}
  annotations: {{dormant.dev/exclude: "true"}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: payments}}}}
  template:
    metadata: {{labels: {{app: payments}}}}
    spec: {{containers: [{{name: mock, image: wiremock/wiremock:3.9.1}}]}}
"#
    )
}

fn replicas(c: &Cluster, kind: &str, name: &str, ns: &str) -> String {
    jsonpath(c, kind, name, Some(ns), "{.spec.replicas}")
}

fn assert_namespace_asleep(c: &Cluster, ns: &str) {
    assert_eq!(replicas(c, "deployment", "web.frontend", ns), "0");
    assert_eq!(
        annotation(c, "deployment", "web.frontend", Some(ns), "dormant.dev/replicas-before-sleep"),
        "3"
    );
    assert_eq!(replicas(c, "statefulset", "db", ns), "0");
    assert_eq!(annotation(c, "statefulset", "db", Some(ns), "dormant.dev/replicas-before-sleep"), "2");
    assert_eq!(jsonpath(c, "cronjob", "report", Some(ns), "{.spec.suspend}"), "true");
    assert_eq!(annotation(c, "cronjob", "report", Some(ns), "dormant.dev/suspend-before-sleep"), "false");
    // The excluded workload is untouched.
    assert_eq!(replicas(c, "deployment", "payments-mock", ns), "1");
    assert_eq!(
        annotation(c, "deployment", "payments-mock", Some(ns), "dormant.dev/replicas-before-sleep"),
        ""
    );
    wait_until("web and db pods to go", Duration::from_secs(30), || {
        pods(c, ns, "app=web") == 0 && pods(c, ns, "app=db") == 0
    });
    assert_eq!(ready_pods(c, ns, "app=payments"), 1);
}

fn assert_namespace_awake_as_before(c: &Cluster, ns: &str) {
    assert_eq!(replicas(c, "deployment", "web.frontend", ns), "3");
    assert_eq!(replicas(c, "statefulset", "db", ns), "2");
    assert_eq!(jsonpath(c, "cronjob", "report", Some(ns), "{.spec.suspend}"), "false");
    assert_eq!(replicas(c, "deployment", "payments-mock", ns), "1");
    for (kind, name) in [("deployment", "web.frontend"), ("statefulset", "db"), ("cronjob", "report")] {
        let all = jsonpath(c, kind, name, Some(ns), "{.metadata.annotations}");
        assert!(!all.contains("before-sleep"), "{kind}/{name} still carries a record: {all}");
    }
    wait_until("3 web and 2 db pods ready", Duration::from_secs(30), || {
        ready_pods(c, ns, "app=web") == 3 && ready_pods(c, ns, "app=db") == 2
    });
}

#[test]
fn idle_targets_sleep_and_come_back_exactly_by_cli_schedule_and_activity() {
    let c = Cluster::shared();
    let id = test_id("engine");
    let ns = c.namespace("apps", &[("dormant-test", &id)]).unwrap();
    let vc_ns = c.namespace("vc", &[("dormant-test", &id)]).unwrap();
    c.kubectl_apply(&c.admin, &workloads_yaml(&ns)).unwrap();
    let vc = VCluster::create(
        c,
        &vc_ns,
        "dev",
        VClusterOptions {
            pods: 5,
            annotations: vec![("dormant.dev/sleep-after".into(), "6s".into())],
            ..Default::default()
        },
    )
    .unwrap();
    wait_until("workloads ready", Duration::from_secs(60), || {
        ready_pods(c, &ns, "app=web") == 3
            && ready_pods(c, &ns, "app=db") == 2
            && ready_pods(c, &ns, "app=payments") == 1
    });
    vc.wait_serving(c, Duration::from_secs(60)).unwrap();
    wait_until("5 synced pods", Duration::from_secs(60), || {
        pods(c, &vc_ns, "vcluster.loft.sh/managed-by=dev") == 5
    });
    kubectl(c, &["annotate", "namespace", &ns, "dormant.dev/sleep-after=6s"]);

    let agent = Agent::start(c, &id, &format!("{id}-system"), "a1", &[]);

    // Idle: both fall asleep.
    wait_state(c, "namespace", &ns, None, "asleep", Duration::from_secs(60), &agent);
    wait_state(c, "statefulset", "dev", Some(&vc_ns), "asleep", Duration::from_secs(60), &agent);
    assert_namespace_asleep(c, &ns);
    assert_eq!(replicas(c, "statefulset", "dev", &vc_ns), "0");
    assert_eq!(annotation(c, "statefulset", "dev", Some(&vc_ns), "dormant.dev/replicas-before-sleep"), "1");
    assert_eq!(pods(c, &vc_ns, "vcluster.loft.sh/managed-by=dev"), 0);
    wait_until("the vcluster API server to stop", Duration::from_secs(30), || !vc.is_serving());
    let events = kubectl(c, &["get", "events", "-n", &ns, "-o", "jsonpath={range .items[*]}{.reason} {end}"]);
    assert!(events.contains("Slept"), "{events}");

    // Woken by the CLI.
    let out = dormant(c, &["wake", &format!("namespace/{ns}"), "--wait=60s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("wake requested by admin") && printed.contains(": awake ("), "{printed}");
    assert_namespace_awake_as_before(c, &ns);
    let out = dormant(c, &["wake", &format!("vcluster/{vc_ns}/dev"), "--wait=60s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(replicas(c, "statefulset", "dev", &vc_ns), "1");
    vc.wait_serving(c, Duration::from_secs(60)).unwrap();
    wait_until("5 synced pods back", Duration::from_secs(60), || {
        pods(c, &vc_ns, "vcluster.loft.sh/managed-by=dev") == 5
    });

    // Idle again, then woken by new activity (the last-activity annotation).
    wait_state(c, "statefulset", "dev", Some(&vc_ns), "asleep", Duration::from_secs(60), &agent);
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    kubectl(
        c,
        &[
            "annotate",
            "--overwrite",
            "statefulset",
            "dev",
            "-n",
            &vc_ns,
            &format!("dormant.dev/last-activity={now}"),
            "dormant.dev/last-activity-by=alice list pods (audit)",
        ],
    );
    wait_state(c, "statefulset", "dev", Some(&vc_ns), "awake", Duration::from_secs(60), &agent);
    assert_eq!(replicas(c, "statefulset", "dev", &vc_ns), "1");
    assert_eq!(annotation(c, "statefulset", "dev", Some(&vc_ns), "dormant.dev/replicas-before-sleep"), "");

    // Woken by a wake schedule: put to sleep by hand (with a long idle
    // timeout, so only the schedule can wake it), then a wake instant one to
    // two minutes ahead brings it back.
    kubectl(c, &["annotate", "--overwrite", "namespace", &ns, "dormant.dev/sleep-after=10m"]);
    let out = dormant(c, &["sleep", &format!("namespace/{ns}"), "--wait=60s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_namespace_asleep(c, &ns);
    let at = chrono::Utc::now() + chrono::Duration::seconds(90);
    let cron = format!("{} {} * * *", chrono::Timelike::minute(&at), chrono::Timelike::hour(&at));
    kubectl(c, &["annotate", "--overwrite", "namespace", &ns, &format!("dormant.dev/wake-schedule={cron}")]);
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(state(c, "namespace", &ns, None), "asleep", "nothing wakes it before the schedule");
    wait_state(c, "namespace", &ns, None, "awake", Duration::from_secs(150), &agent);
    assert_namespace_awake_as_before(c, &ns);
    let notes = kubectl(
        c,
        &[
            "get",
            "events.events.k8s.io",
            "-n",
            &ns,
            "--field-selector=reason=Woke",
            "-o",
            "jsonpath={range .items[*]}{.note}{\"\\n\"}{end}",
        ],
    );
    assert!(notes.contains(&format!("wake schedule \"{cron}\"")), "{notes}");
}

#[test]
fn a_hand_scaled_workload_wakes_its_target_and_keeps_its_value() {
    let c = Cluster::shared();
    let id = test_id("hand");
    let ns = c.namespace("hand", &[("dormant-test", &id)]).unwrap();
    c.kubectl_apply(&c.admin, &workloads_yaml(&ns)).unwrap();
    let agent = Agent::start(c, &id, &format!("{id}-system"), "h1", &[]);
    kubectl(c, &["annotate", "namespace", &ns, "dormant.dev/sleep-after=10m"]);
    let out = dormant(c, &["sleep", &format!("namespace/{ns}"), "--wait=60s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_namespace_asleep(c, &ns);

    kubectl(c, &["scale", "deployment", "web.frontend", "-n", &ns, "--replicas=5"]);
    wait_state(c, "namespace", &ns, None, "awake", Duration::from_secs(60), &agent);
    assert_eq!(replicas(c, "deployment", "web.frontend", &ns), "5", "the hand-set value stays");
    assert_eq!(replicas(c, "statefulset", "db", &ns), "2", "the rest is restored");
    assert_eq!(jsonpath(c, "cronjob", "report", Some(&ns), "{.spec.suspend}"), "false");
    let by = annotation(c, "namespace", &ns, None, "dormant.dev/last-activity-by");
    assert!(by.contains("Deployment") && by.ends_with("(scale)"), "{by}");
}

/// Putting a namespace to sleep lets a Job that is still running finish
/// (its work in progress is not thrown away): the namespace's CronJobs are
/// suspended so that no new Job starts, but the Job keeps its pod and is
/// not touched. With `running-jobs: suspend` on the target, the Job is
/// suspended (its pod goes) and the wake resumes it.
#[test]
fn a_running_job_finishes_while_its_namespace_sleeps_unless_the_target_says_suspend() {
    let c = Cluster::shared();
    let id = test_id("jobs");
    let ns = c.namespace("jobs", &[("dormant-test", &id)]).unwrap();
    // kwok completes a Job's pod as soon as it runs; one that no node
    // takes keeps its Job active, as a long computation would.
    let job = format!(
        "apiVersion: batch/v1\nkind: Job\nmetadata: {{name: backfill, namespace: {ns}}}\nspec:\n  backoffLimit: 0\n  template:\n    spec: {{restartPolicy: Never, nodeSelector: {{dormant-test/nowhere: \"true\"}}, containers: [{{name: j, image: busybox:1.37}}]}}\n"
    );
    c.kubectl_apply(&c.admin, &format!("{}---\n{job}", workloads_yaml(&ns))).unwrap();
    let job_pods = || pods(c, &ns, "batch.kubernetes.io/job-name=backfill");
    let active = || jsonpath(c, "job", "backfill", Some(&ns), "{.status.active}");
    wait_until("the Job active with its pod", Duration::from_secs(60), || job_pods() == 1 && active() == "1");
    let agent = Agent::start(c, &id, &format!("{id}-system"), "jobs1", &[]);
    kubectl(c, &["annotate", "namespace", &ns, "dormant.dev/sleep-after=1h"]);
    let sleep_wake = |verb: &str| {
        let out = dormant(c, &[verb, &format!("namespace/{ns}"), "--wait=60s"]);
        assert!(out.status.success(), "{verb}: {}\n{}", String::from_utf8_lossy(&out.stderr), agent.log());
    };

    sleep_wake("sleep");
    assert_namespace_asleep(c, &ns);
    // Asleep, and the Job runs on, untouched.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!((job_pods(), active().as_str()), (1, "1"), "the running Job lost its pod");
    assert_eq!(jsonpath(c, "job", "backfill", Some(&ns), "{.spec.suspend}"), "false");
    assert_eq!(annotation(c, "job", "backfill", Some(&ns), "dormant.dev/suspend-before-sleep"), "");
    let explain =
        String::from_utf8_lossy(&dormant(c, &["explain", &format!("namespace/{ns}")]).stdout).into_owned();
    let line = explain
        .lines()
        .find(|l| l.trim_start().starts_with("runningJobs"))
        .unwrap_or_else(|| panic!("{explain}"));
    assert!(line.contains("Finish"), "{line}");
    sleep_wake("wake");
    assert_namespace_awake_as_before(c, &ns);

    // Suspend: the Job is suspended with its record, its pod goes, and the
    // wake resumes it.
    kubectl(c, &["annotate", "namespace", &ns, "dormant.dev/running-jobs=suspend"]);
    sleep_wake("sleep");
    assert_namespace_asleep(c, &ns);
    assert_eq!(jsonpath(c, "job", "backfill", Some(&ns), "{.spec.suspend}"), "true", "{}", agent.log());
    assert_eq!(annotation(c, "job", "backfill", Some(&ns), "dormant.dev/suspend-before-sleep"), "false");
    wait_until("the suspended Job's pod to go", Duration::from_secs(30), || {
        pods(c, &ns, "batch.kubernetes.io/job-name=backfill") == 0
    });
    sleep_wake("wake");
    assert_namespace_awake_as_before(c, &ns);
    assert_eq!(jsonpath(c, "job", "backfill", Some(&ns), "{.spec.suspend}"), "false");
    assert_eq!(annotation(c, "job", "backfill", Some(&ns), "dormant.dev/suspend-before-sleep"), "");
    wait_until("the resumed Job active again", Duration::from_secs(60), || {
        job_pods() == 1 && active() == "1"
    });
}

/// A workload's record removed while its target sleeps (a user tidying
/// annotations, a GitOps tool pruning them) is not the only copy: the
/// target's `sleep-record` names everything the sleep scaled, and the wake
/// restores from it. With both gone, the workload is never called ready:
/// the target stays `waking` with a WakeFailed Event naming it, until
/// someone scales it by hand.
#[test]
fn a_record_removed_while_asleep_is_restored_from_the_targets_copy_and_none_anywhere_is_a_wake_failure() {
    let c = Cluster::shared();
    let id = test_id("record");
    let ns = c.namespace("record", &[("dormant-test", &id)]).unwrap();
    c.kubectl_apply(&c.admin, &workloads_yaml(&ns)).unwrap();
    let agent = Agent::start(c, &id, &format!("{id}-system"), "r1", &[]);
    kubectl(c, &["annotate", "namespace", &ns, "dormant.dev/sleep-after=10m"]);
    let out = dormant(c, &["sleep", &format!("namespace/{ns}"), "--wait=60s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_namespace_asleep(c, &ns);
    let copy: serde_json::Value =
        serde_json::from_str(&annotation(c, "namespace", &ns, None, "dormant.dev/sleep-record")).unwrap();
    assert_eq!(
        copy,
        serde_json::json!({"Deployment/web.frontend": "3", "StatefulSet/db": "2", "CronJob/report": "false"}),
        "the target's copy names everything the sleep changed, and nothing excluded"
    );

    // Every workload's own record goes.
    for (kind, name, key) in [
        ("deployment", "web.frontend", "replicas-before-sleep"),
        ("statefulset", "db", "replicas-before-sleep"),
        ("cronjob", "report", "suspend-before-sleep"),
    ] {
        kubectl(c, &["annotate", kind, name, "-n", &ns, &format!("dormant.dev/{key}-")]);
    }
    let out = dormant(c, &["wake", &format!("namespace/{ns}"), "--wait=60s"]);
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), agent.log());
    assert_namespace_awake_as_before(c, &ns);
    assert_eq!(
        annotation(c, "namespace", &ns, None, "dormant.dev/sleep-record"),
        "",
        "the copy outlived the wake"
    );

    // Asleep again; now the record goes from the workload and the target.
    let out = dormant(c, &["sleep", &format!("namespace/{ns}"), "--wait=60s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_namespace_asleep(c, &ns);
    kubectl(c, &["annotate", "deployment", "web.frontend", "-n", &ns, "dormant.dev/replicas-before-sleep-"]);
    kubectl(c, &["annotate", "namespace", &ns, "dormant.dev/sleep-record-"]);
    let out = dormant(c, &["wake", &format!("namespace/{ns}"), "--wait=20s"]);
    assert!(!out.status.success(), "the wake said it finished: {}", String::from_utf8_lossy(&out.stdout));
    wait_until("a WakeFailed Event naming the workload", Duration::from_secs(60), || {
        event_notes(c, &ns, "WakeFailed").contains("Deployment/web.frontend")
    });
    assert_eq!(state(c, "namespace", &ns, None), "waking", "called awake with a workload at zero");
    assert_eq!(replicas(c, "statefulset", "db", &ns), "2", "what has a record is restored");
    assert_eq!(replicas(c, "deployment", "web.frontend", &ns), "0");

    // Scaled by hand, as the Event says: the target is awake.
    kubectl(c, &["scale", "deployment", "web.frontend", "-n", &ns, "--replicas=3"]);
    wait_state(c, "namespace", &ns, None, "awake", Duration::from_secs(60), &agent);
    assert_namespace_awake_as_before(c, &ns);
}

/// With no agent running (uninstalled, or the chart's pre-delete hook
/// about to remove it), `dormant restore --all` brings every sleeping
/// target back exactly from the records alone — a workload whose own
/// record was removed from the target's copy — and a second run changes
/// nothing. On a cluster of its own: `--all` means every target there.
#[test]
fn restore_all_brings_every_sleeping_target_back_from_its_records_with_no_agent_and_twice_is_once() {
    let c = &Cluster::start(testbed::ClusterOptions::default()).unwrap();
    let id = test_id("restore");
    let ns = c.namespace("restore", &[("dormant-test", &id)]).unwrap();
    let vc_ns = c.namespace("restore-vc", &[("dormant-test", &id)]).unwrap();
    c.kubectl_apply(&c.admin, &workloads_yaml(&ns)).unwrap();
    let vc = VCluster::create(c, &vc_ns, "dev", VClusterOptions { pods: 2, ..Default::default() }).unwrap();
    vc.wait_serving(c, Duration::from_secs(60)).unwrap();
    wait_until("2 synced pods", Duration::from_secs(60), || {
        pods(c, &vc_ns, "vcluster.loft.sh/managed-by=dev") == 2
    });
    let agent = Agent::start(c, &id, &format!("{id}-system"), "x1", &[]);
    for t in [format!("namespace/{ns}"), format!("vcluster/{vc_ns}/dev")] {
        let out = dormant(c, &["sleep", &t, "--wait=60s"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert_namespace_asleep(c, &ns);
    assert_eq!(replicas(c, "statefulset", "dev", &vc_ns), "0");
    drop(agent);
    kubectl(c, &["annotate", "deployment", "web.frontend", "-n", &ns, "dormant.dev/replicas-before-sleep-"]);

    let out = dormant(c, &["restore", "--all"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}{}", String::from_utf8_lossy(&out.stderr));
    assert!(said.contains("Deployment/web.frontend 0 → 3"), "{said}");
    assert_namespace_awake_as_before(c, &ns);
    assert_eq!(replicas(c, "statefulset", "dev", &vc_ns), "1");
    vc.wait_serving(c, Duration::from_secs(60)).unwrap();
    for (kind, name, namespace) in
        [("namespace", ns.as_str(), None), ("statefulset", "dev", Some(vc_ns.as_str()))]
    {
        assert_eq!(state(c, kind, name, namespace), "awake");
        assert_eq!(annotation(c, kind, name, namespace, "dormant.dev/sleep-record"), "");
        assert_eq!(annotation(c, kind, name, namespace, "dormant.dev/asleep-since"), "");
    }

    // What a restore writes: specs (generations) and annotations.
    let versions = |c: &Cluster| {
        let mut v = String::new();
        for n in [&ns, &vc_ns] {
            v += &kubectl(
                c,
                &[
                    "get",
                    "deploy,sts,cronjob",
                    "-n",
                    n,
                    "-o",
                    "jsonpath={range .items[*]}{.metadata.name} {.metadata.generation} {.metadata.annotations}{\"\\n\"}{end}",
                ],
            );
            v += &annotation(c, "namespace", n, None, "dormant.dev/state");
            v += &annotation(c, "namespace", n, None, "dormant.dev/last-activity");
        }
        v
    };
    let before = versions(c);
    let again = dormant(c, &["restore", "--all"]);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert_eq!(String::from_utf8_lossy(&again.stdout).trim(), "nothing to restore");
    assert_eq!(versions(c), before, "a second restore changed something");
}

/// The chart's pre-delete hook grants the right to stop the agent in a
/// Role created just before its Job, and the API server's authorizer
/// learns of a new binding from a watch: a restore that starts first is
/// refused for a moment. `--stop-agent` waits for the grant (and says so)
/// instead of failing the hook.
#[test]
fn restore_stops_the_agent_once_a_grant_made_after_it_started_is_in_force() {
    let c = Cluster::shared();
    let id = test_id("stop");
    let ns = c.namespace("stop", &[("dormant-test", &id)]).unwrap();
    c.kubectl_apply(&c.admin, &deployment_yaml(&ns, "agent", 1)).unwrap();
    let user = c.user(&format!("{id}-restorer"), &[]).unwrap();
    c.kubectl_apply(
        &c.admin,
        &format!(
            r#"apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: {id}-read-all}}
rules: [{{apiGroups: ["*"], resources: ["*"], verbs: [get, list, watch]}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: {id}-read-all}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: {id}-read-all}}
subjects: [{{kind: User, name: {id}-restorer}}]
"#
        ),
    )
    .unwrap();
    let mut restore = std::process::Command::new(dormant_bin())
        .args(["restore", &format!("namespace/{ns}"), &format!("--stop-agent={ns}/agent")])
        .env("KUBECONFIG", &user.kubeconfig)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let err = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let (err, stderr) = (err.clone(), restore.stderr.take().unwrap());
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                err.lock().unwrap().push_str(&(line + "\n"));
            }
        })
    };
    wait_until("the restore to be refused", Duration::from_secs(20), || {
        err.lock().unwrap().contains("retrying")
    });
    assert_eq!(replicas(c, "deployment", "agent", &ns), "1", "scaled without the right to");
    c.kubectl_apply(
        &c.admin,
        &format!(
            r#"apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: stop-agent, namespace: {ns}}}
rules: [{{apiGroups: [apps], resources: [deployments/scale], resourceNames: [agent], verbs: [patch]}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: stop-agent, namespace: {ns}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: stop-agent}}
subjects: [{{kind: User, name: {id}-restorer}}]
"#
        ),
    )
    .unwrap();
    let out = restore.wait_with_output().unwrap();
    reader.join().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}{}", err.lock().unwrap());
    assert!(said.contains(&format!("agent {ns}/agent stopped")), "{said}");
    assert_eq!(replicas(c, "deployment", "agent", &ns), "0");
}

/// Flux's labels for an object a Kustomization applies, and for one a
/// HelmRelease renders.
const FLUX_KUSTOMIZATION: &str =
    "kustomize.toolkit.fluxcd.io/name: apps, kustomize.toolkit.fluxcd.io/namespace: flux-system";
const FLUX_HELMRELEASE: &str =
    "helm.toolkit.fluxcd.io/name: db, helm.toolkit.fluxcd.io/namespace: flux-system";

/// The workloads of the crash test, with their original values. Some are
/// managed by Flux (d1, d2 and c-active by a Kustomization, d2 already
/// carrying `reconcile: enabled`; s1 by a HelmRelease), so the marks that
/// keep Flux away while asleep go through the same kills.
fn crash_workloads(ns: &str) -> (String, Vec<(&'static str, String, String)>) {
    let mut yaml = String::new();
    let mut originals = Vec::new();
    let flux = |name: &str| match name {
        "d1" | "c-active" => format!("labels: {{{FLUX_KUSTOMIZATION}}}"),
        "d2" => format!(
            "labels: {{{FLUX_KUSTOMIZATION}}}, annotations: {{kustomize.toolkit.fluxcd.io/reconcile: enabled}}"
        ),
        "s1" => format!("labels: {{{FLUX_HELMRELEASE}}}"),
        _ => "labels: {}".into(),
    };
    for i in 1..=6 {
        let meta = flux(&format!("d{i}"));
        yaml.push_str(&format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: d{i}, namespace: {ns}, {meta}}}\nspec:\n  replicas: {i}\n  selector: {{matchLabels: {{app: d{i}}}}}\n  template:\n    metadata: {{labels: {{app: d{i}}}}}\n    spec: {{containers: [{{name: c, image: nginx:1.27}}]}}\n---\n"
        ));
        originals.push(("deployment", format!("d{i}"), i.to_string()));
    }
    let meta = flux("s1");
    yaml.push_str(&format!(
        "apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {{name: s1, namespace: {ns}, {meta}}}\nspec:\n  replicas: 2\n  serviceName: s1\n  selector: {{matchLabels: {{app: s1}}}}\n  template:\n    metadata: {{labels: {{app: s1}}}}\n    spec: {{containers: [{{name: c, image: postgres:17}}]}}\n---\n"
    ));
    originals.push(("statefulset", "s1".into(), "2".into()));
    for (name, suspend) in [("c-active", false), ("c-paused", true)] {
        let meta = flux(name);
        yaml.push_str(&format!(
            "apiVersion: batch/v1\nkind: CronJob\nmetadata: {{name: {name}, namespace: {ns}, {meta}}}\nspec:\n  schedule: \"0 3 * * *\"\n  suspend: {suspend}\n  jobTemplate:\n    spec:\n      template:\n        spec:\n          restartPolicy: Never\n          containers: [{{name: c, image: busybox:1.37}}]\n---\n"
        ));
        originals.push(("cronjob", name.into(), suspend.to_string()));
    }
    (yaml, originals)
}

/// The Flux mark a crash-test workload has while awake (d2's own
/// `enabled`, nobody else's) and while asleep.
fn flux_mark(kind_name: &str) -> (&'static str, &'static str) {
    match kind_name {
        "deployment/d1" | "cronjob/c-active" => ("", "reconcile=disabled"),
        "deployment/d2" => ("reconcile=enabled", "reconcile=disabled"),
        "statefulset/s1" => ("", "driftDetection=disabled"),
        _ => ("", ""),
    }
}

/// Every workload's Flux marks and dormant's record of them, in one read:
/// `kind/name` → (`reconcile=…` or `driftDetection=…` or "", the record).
fn flux_snapshot(c: &Cluster, ns: &str) -> std::collections::BTreeMap<String, (String, String)> {
    workload_columns(
        c,
        ns,
        "{.metadata.annotations.kustomize\\.toolkit\\.fluxcd\\.io/reconcile}|{.metadata.annotations.helm\\.toolkit\\.fluxcd\\.io/driftDetection}|{.metadata.annotations.dormant\\.dev/gitops-before-sleep}",
    )
    .into_iter()
    .map(|(k, [reconcile, drift, record])| {
        let mark = match (reconcile.as_str(), drift.as_str()) {
            ("", "") => String::new(),
            (r, "") => format!("reconcile={r}"),
            (_, d) => format!("driftDetection={d}"),
        };
        (k, (mark, record))
    })
    .collect()
}

/// Every crash-test workload in one read: `kind/name` (lower case) → the
/// `N` `|`-separated jsonpath `columns`, as text.
fn workload_columns<const N: usize>(
    c: &Cluster,
    ns: &str,
    columns: &str,
) -> std::collections::BTreeMap<String, [String; N]> {
    let out = kubectl(
        c,
        &[
            "get",
            "deployments,statefulsets,cronjobs",
            "-n",
            ns,
            "-o",
            &format!("jsonpath={{range .items[*]}}{{.kind}}/{{.metadata.name}}|{columns}{{\"\\n\"}}{{end}}"),
        ],
    );
    out.lines()
        .filter_map(|l| {
            let (k, rest) = l.split_once('|')?;
            let values: Vec<String> = rest.splitn(N, '|').map(str::to_string).collect();
            Some((k.to_lowercase(), values.try_into().ok()?))
        })
        .collect()
}

/// What each workload says now: (current value, recorded value or "").
fn observed(c: &Cluster, ns: &str, kind: &str, name: &str) -> (String, String) {
    let (field, key) = if kind == "cronjob" {
        ("{.spec.suspend}", "dormant.dev/suspend-before-sleep")
    } else {
        ("{.spec.replicas}", "dormant.dev/replicas-before-sleep")
    };
    let out = jsonpath(
        c,
        kind,
        name,
        Some(ns),
        &format!("{field}|{{.metadata.annotations.{}}}", key.replace('.', "\\.").replace('/', "\\/")),
    );
    let (v, r) = out.split_once('|').unwrap();
    (v.to_string(), r.to_string())
}

/// Every workload of the crash test as it is now, in one read: `kind/name`
/// → (current value, recorded value or "").
fn snapshot(c: &Cluster, ns: &str) -> std::collections::BTreeMap<String, (String, String)> {
    workload_columns(
        c,
        ns,
        "{.spec.replicas}{.spec.suspend}|{.metadata.annotations.dormant\\.dev/replicas-before-sleep}{.metadata.annotations.dormant\\.dev/suspend-before-sleep}",
    )
    .into_iter()
    .map(|(k, [value, record])| (k, (value, record)))
    .collect()
}

#[test]
fn sigkill_at_random_moments_of_sleep_and_wake_never_loses_a_replica_count_or_a_gitops_mark() {
    let rounds: usize =
        std::env::var("DORMANT_SIGKILL_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(30);
    let c = Cluster::shared();
    let id = test_id("crash");
    let ns = c.namespace("crash", &[("dormant-test", &id)]).unwrap();
    let (yaml, originals) = crash_workloads(&ns);
    c.kubectl_apply(&c.admin, &yaml).unwrap();
    kubectl(c, &["annotate", "namespace", &ns, "dormant.dev/sleep-after=1h"]);
    // d6 is deployed by an Argo CD Application, paused while it sleeps.
    c.kubectl_apply(&c.admin, ARGOCD_APPLICATION_CRD).unwrap();
    c.wait_established("applications.argoproj.io").unwrap();
    let argocd = format!("{id}-argocd");
    ensure_namespace(c, &argocd);
    c.kubectl_apply(
        &c.admin,
        &format!(
            "apiVersion: argoproj.io/v1alpha1\nkind: Application\nmetadata: {{name: crash-app, namespace: {argocd}}}\nspec:\n  destination: {{server: \"https://kubernetes.default.svc\", namespace: {ns}}}\n"
        ),
    )
    .unwrap();
    kubectl(
        c,
        &[
            "annotate",
            "deployment",
            "d6",
            "-n",
            &ns,
            &format!("argocd.argoproj.io/tracking-id=crash-app:apps/Deployment:{ns}/d6"),
        ],
    );
    // d3 is scaled by KEDA, paused while it sleeps.
    let crd = testbed::Bins::keda_crd().unwrap();
    kubectl(c, &["apply", "--server-side", "-f", &crd.display().to_string()]);
    c.wait_established("scaledobjects.keda.sh").unwrap();
    c.kubectl_apply(
        &c.admin,
        &format!(
            "apiVersion: keda.sh/v1alpha1\nkind: ScaledObject\nmetadata: {{name: d3, namespace: {ns}}}\nspec:\n  scaleTargetRef: {{name: d3}}\n  triggers: [{{type: cron, metadata: {{timezone: UTC, start: \"0 8 * * *\", end: \"0 18 * * *\", desiredReplicas: \"3\"}}}}]\n"
        ),
    )
    .unwrap();
    // KEDA's pause and dormant's record of what it was are one patch.
    let keda = || {
        (
            annotation(c, "scaledobject", "d3", Some(&ns), "autoscaling.keda.sh/paused-replicas"),
            annotation(c, "scaledobject", "d3", Some(&ns), "dormant.dev/keda-paused-replicas-before-sleep"),
        )
    };
    // A vcluster, put to sleep and woken in the same rounds: its control
    // plane is at 1 without a record, or at 0 with the record "1".
    let vc_ns = c.namespace("crash-vc", &[("dormant-test", &id)]).unwrap();
    let vc = VCluster::create(
        c,
        &vc_ns,
        "vc",
        VClusterOptions {
            pods: 1,
            annotations: vec![("dormant.dev/sleep-after".into(), "1h".into())],
            ..Default::default()
        },
    )
    .unwrap();
    vc.wait_serving(c, Duration::from_secs(60)).unwrap();
    let vc_target = format!("vcluster/{vc_ns}/vc");
    let control_plane = || snapshot(c, &vc_ns).remove("statefulset/vc").unwrap_or_default();
    let argocd_flag = format!("--argocd-namespace={argocd}");
    let application = || {
        (
            annotation(
                c,
                "applications.argoproj.io",
                "crash-app",
                Some(&argocd),
                "argocd.argoproj.io/skip-reconcile",
            ),
            annotation(
                c,
                "applications.argoproj.io",
                "crash-app",
                Some(&argocd),
                "dormant.dev/gitops-before-sleep",
            ),
        )
    };
    let lease_ns = format!("{id}-system");
    let seed: u64 =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    let mut rng = seed;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let target = format!("namespace/{ns}");
    // Asleep, every workload is at 0 (suspended) with a record; awake, at
    // its value without one.
    let asleep: std::collections::BTreeMap<String, (String, String)> = originals
        .iter()
        .map(|(kind, name, original)| {
            let value = if *kind == "cronjob" { "true" } else { "0" };
            (format!("{kind}/{name}"), (value.to_string(), original.clone()))
        })
        .collect();
    let awake: std::collections::BTreeMap<String, (String, String)> = originals
        .iter()
        .map(|(kind, name, original)| (format!("{kind}/{name}"), (original.clone(), String::new())))
        .collect();
    // A slow client spreads the patches out (one request each half
    // second) so there is a window between the first and the last.
    let start_round = |verb: &str| {
        let agent = Agent::start(
            c,
            &id,
            &lease_ns,
            "crash-1",
            &["--qps=2", "--burst=1", "--pause-argocd-applications", &argocd_flag],
        );
        for t in [&target, &vc_target] {
            let out = dormant(c, &[verb, t]);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
        agent
    };
    // How long a sleep and a wake take from their first change to their
    // last (KEDA's pause or its end) at this client rate on this machine,
    // measured once without a kill: the kills are spread over that span
    // and a quarter beyond it, so some land mid-change and some after.
    let mut span = Duration::ZERO;
    for (verb, done, paused) in [("sleep", &asleep, "0"), ("wake", &awake, "")] {
        let before = snapshot(c, &ns);
        let mut agent = start_round(verb);
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while snapshot(c, &ns) == before && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let first = std::time::Instant::now();
        while (&snapshot(c, &ns) != done || keda().0 != paused) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(std::time::Instant::now() < deadline, "calibration {verb} never finished:\n{}", agent.log());
        span = span.max(first.elapsed());
        agent.kill();
    }
    let window = (span * 5 / 4).max(Duration::from_secs(1));
    let mut kills_mid_change = 0;
    let mut kills_mid_vcluster = 0;
    let mut kills_keda_paused = 0;
    for round in 0..rounds {
        let verb = if round % 2 == 0 { "sleep" } else { "wake" };
        let done = if verb == "sleep" { &asleep } else { &awake };
        let before = snapshot(c, &ns);
        let mut agent = start_round(verb);
        // The kill is aimed into that window: once the first change is
        // seen, at a random moment within the measured span and a
        // quarter beyond it (the last steps, KEDA's pause or its end,
        // come after every workload at two requests a second), and
        // anywhere if there was nothing to change.
        let started = std::time::Instant::now();
        while &before != done && snapshot(c, &ns) == before && started.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(next() % window.as_millis() as u64));
        agent.kill();
        let after = snapshot(c, &ns);
        assert_eq!(after.len(), originals.len(), "round {round}: {after:?}");
        let so = keda();
        if !so.0.is_empty() {
            kills_keda_paused += 1;
        }
        assert!(
            so == (String::new(), String::new()) || so == ("0".into(), "none".into()),
            "round {round} (seed {seed}): KEDA's (pause, record of it) is {so:?}"
        );
        let cp = control_plane();
        assert!(
            cp == ("1".into(), String::new()) || cp == ("0".into(), "1".into()),
            "round {round} (seed {seed}): the vcluster's control plane at {cp:?}"
        );
        if matches!(state(c, "statefulset", "vc", Some(&vc_ns)).as_str(), "sleeping" | "waking") {
            kills_mid_vcluster += 1;
        }
        // A workload Flux manages is marked exactly while it has a record:
        // the mark and the scaling are one patch.
        let marks = flux_snapshot(c, &ns);
        for (kind_name, (_, record)) in &after {
            let (awake_mark, asleep_mark) = flux_mark(kind_name);
            let (mark, mark_record) = &marks[kind_name];
            if record.is_empty() {
                assert_eq!(
                    (mark.as_str(), mark_record.as_str()),
                    (awake_mark, ""),
                    "round {round} (seed {seed}): {kind_name} is awake but marked"
                );
            } else {
                assert_eq!(mark, asleep_mark, "round {round} (seed {seed}): {kind_name} asleep, mark wrong");
                assert_eq!(
                    mark_record.is_empty(),
                    asleep_mark.is_empty(),
                    "round {round} (seed {seed}): {kind_name} asleep, record of marks {mark_record:?}"
                );
            }
        }
        // Argo CD's Application is paused before its workload changes, and
        // given back only once it is back.
        if after.values().any(|(_, record)| !record.is_empty()) {
            assert_eq!(
                application(),
                ("true".to_string(), "{\"argocd.argoproj.io/skip-reconcile\":null}".to_string()),
                "round {round} (seed {seed}): a workload sleeps while Argo CD may scale it back"
            );
        }
        for (kind, name, original) in &originals {
            let (value, record) = &after[&format!("{kind}/{name}")];
            if record.is_empty() {
                assert_eq!(value, original, "round {round} (seed {seed}): {kind}/{name} lost its value");
            } else {
                assert_eq!(
                    record, original,
                    "round {round} (seed {seed}): {kind}/{name} recorded the wrong value"
                );
                let asleep = if *kind == "cronjob" { "true" } else { "0" };
                assert_eq!(
                    value, asleep,
                    "round {round} (seed {seed}): {kind}/{name} has a record but is not asleep"
                );
            }
        }
        // Killed after this round's first write and before its last.
        if after != before && &after != done {
            kills_mid_change += 1;
        }
    }
    eprintln!(
        "{rounds} kills (seed {seed}) within {window:?} of a round's first change; {kills_mid_change} landed after a round's first change and before its last; {kills_mid_vcluster} while the vcluster was between asleep and awake; {kills_keda_paused} with KEDA paused"
    );
    // A test of kills mid-change in which none landed there proves nothing.
    assert!(
        kills_mid_change >= 1 && kills_keda_paused >= 1,
        "of {rounds} kills, {kills_mid_change} landed mid-change and {kills_keda_paused} with KEDA paused (seed {seed}); raise DORMANT_SIGKILL_ROUNDS or slow the agent"
    );
    // After the last restart, a wake brings everything back exactly.
    let agent = Agent::start(c, &id, &lease_ns, "crash-1", &["--pause-argocd-applications", &argocd_flag]);
    let out = dormant(c, &["wake", &vc_target, "--wait=120s"]);
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), agent.log());
    assert_eq!(control_plane(), ("1".into(), String::new()));
    vc.wait_serving(c, Duration::from_secs(60)).unwrap();
    let out = dormant(c, &["wake", &target, "--wait=120s"]);
    assert!(
        out.status.success(),
        "{}\n{}\nagent log:\n{}\npods:\n{}\nnodes:\n{}\nkwok:\n{}\nscheduler:\n{}\ncontroller-manager:\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&dormant(c, &["explain", &target]).stdout),
        agent.log(),
        c.kubectl_out(&c.admin, &["get", "pods", "-n", &ns, "-o", "wide"]).unwrap_or_default(),
        c.kubectl_out(&c.admin, &["get", "nodes", "-o", "wide"]).unwrap_or_default(),
        c.log_tail("kwok", 20),
        c.log_tail("kube-scheduler", 20),
        c.log_tail("kube-controller-manager", 20),
    );
    for (kind, name, original) in &originals {
        assert_eq!(observed(c, &ns, kind, name), (original.clone(), String::new()), "{kind}/{name}");
    }
    // Flux's marks are gone and d2's own `enabled` is back.
    let expected: std::collections::BTreeMap<String, (String, String)> = originals
        .iter()
        .map(|(kind, name, _)| {
            let k = format!("{kind}/{name}");
            let awake = flux_mark(&k).0.to_string();
            (k, (awake, String::new()))
        })
        .collect();
    assert_eq!(flux_snapshot(c, &ns), expected);
    assert_eq!(application(), (String::new(), String::new()), "Argo CD's Application is given back");
    assert_eq!(keda(), (String::new(), String::new()), "KEDA's ScaledObject is given back");
}

/// The Lease as the API server has it: (holder, acquireTime, renewTime,
/// leaseDurationSeconds); a released Lease has no holder and no times.
fn lease(c: &Cluster, ns: &str) -> (String, Option<DateTime<Utc>>, Option<DateTime<Utc>>, i64) {
    let json: serde_json::Value =
        serde_json::from_str(&kubectl(c, &["get", "lease", "dormant-controller", "-n", ns, "-o", "json"]))
            .unwrap();
    let spec = &json["spec"];
    let time = |k: &str| Some(DateTime::parse_from_rfc3339(spec[k].as_str()?).unwrap().to_utc());
    (
        spec["holderIdentity"].as_str().unwrap_or_default().to_string(),
        time("acquireTime"),
        time("renewTime"),
        spec["leaseDurationSeconds"].as_i64().unwrap_or_default(),
    )
}

/// When dormant last wrote the Deployment `app` in `ns` (its managed
/// fields' time, whole seconds).
fn last_written_by_dormant(c: &Cluster, ns: &str) -> DateTime<Utc> {
    let json: serde_json::Value = serde_json::from_str(&kubectl(
        c,
        &["get", "deployment", "app", "-n", ns, "-o", "json", "--show-managed-fields"],
    ))
    .unwrap();
    let entries = json["metadata"]["managedFields"].as_array().unwrap();
    entries
        .iter()
        .filter(|e| e["manager"] == "dormant")
        .filter_map(|e| DateTime::parse_from_rfc3339(e["time"].as_str()?).ok())
        .map(|t| t.to_utc())
        .max()
        .unwrap_or_else(|| panic!("dormant never wrote deployment/app in {ns}: {entries:?}"))
}

#[test]
fn only_the_leader_acts_and_a_standby_takes_over_within_the_lease() {
    let c = Cluster::shared();
    let id = test_id("lease");
    let lease_ns = format!("{id}-system");
    let ns1 = c.namespace("lease", &[("dormant-test", &id)]).unwrap();
    let ns2 = c.namespace("lease", &[("dormant-test", &id)]).unwrap();
    for ns in [&ns1, &ns2] {
        c.kubectl_apply(
            &c.admin,
            &format!("apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: app, namespace: {ns}, annotations: {{}}}}\nspec:\n  replicas: 2\n  selector: {{matchLabels: {{app: a}}}}\n  template:\n    metadata: {{labels: {{app: a}}}}\n    spec: {{containers: [{{name: c, image: nginx:1.27, resources: {{requests: {{cpu: 500m, memory: 256Mi}}}}}}]}}\n"),
        )
        .unwrap();
        kubectl(c, &["annotate", "namespace", ns, "dormant.dev/sleep-after=1h"]);
    }
    let holder = || lease(c, &lease_ns).0;
    // What each replica did, by its own account: reconciles it finished,
    // sleeps and wakes it completed.
    let reconciles = |agent: &Agent| agent.metric("dormant_reconcile_duration_seconds_count");
    let transitions = |agent: &Agent, direction: &str| {
        agent.metric(&format!("dormant_transitions_total{{kind=\"namespace\",direction=\"{direction}\""))
    };
    let all_transitions = |agent: &Agent| agent.metric("dormant_transitions_total{");
    let a = Agent::start(c, &id, &lease_ns, "replica-a", &[]);
    wait_until("replica-a to hold the lease", Duration::from_secs(30), || holder() == "replica-a");
    let mut b = Agent::start(c, &id, &lease_ns, "replica-b", &[]);
    wait_until("replica-b to know it stands by", Duration::from_secs(30), || {
        b.get("/metrics").contains("dormant_leader 0")
    });
    assert!(a.get("/metrics").contains("dormant_leader 1"));

    let reporters = |ns: &str| {
        kubectl(
            c,
            &[
                "get",
                "events.events.k8s.io",
                "-n",
                ns,
                "--field-selector=reason=Slept",
                "-o",
                "jsonpath={range .items[*]}{.reportingInstance} {end}",
            ],
        )
    };
    let out = dormant(c, &["sleep", &format!("namespace/{ns1}"), "--wait=60s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_until("the Slept event", Duration::from_secs(10), || !reporters(&ns1).trim().is_empty());
    assert_eq!(reporters(&ns1).trim(), "replica-a", "only the leader acts");
    assert!(b.get("/status").contains("\"leader\":false"));

    // The leader is paused past its Lease (as by a long GC pause or a
    // network partition) and comes back a standby: from then on only the
    // new leader reports the sleeping target and counts what it saves.
    // Dashboards sum over replicas, so a former leader's numbers would
    // count it twice.
    let t1 = format!("target=\"namespace/{ns1}\"");
    let series = |agent: &Agent, name: &str| {
        agent
            .get("/metrics")
            .lines()
            .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(&t1))
            .map(|l| l.rsplit(' ').next().unwrap_or_default().parse::<f64>().unwrap())
    };
    wait_until("replica-a to count savings", Duration::from_secs(15), || {
        series(&a, "dormant_savings_total").is_some_and(|v| v > 0.0)
    });
    assert_eq!(series(&a, "dormant_target_asleep"), Some(1.0));
    // All along, the standby has done nothing at all.
    assert_eq!(reconciles(&b), 0.0, "the standby reconciled; its log:\n{}", b.log());
    assert_eq!(all_transitions(&b), 0.0, "the standby slept or woke something");
    // What the replicas wrote and did, for a failure's message.
    let why = |agent: &Agent| {
        let written: Vec<EventSeen> = [&ns1, &ns2]
            .iter()
            .flat_map(|ns| events(c, ns, ""))
            .filter(|e| e.reporting_controller == "dormant")
            .collect();
        let log = std::fs::read_to_string(&agent.proc.log).unwrap_or_default();
        let done: Vec<&str> = log.lines().filter(|l| l.contains("asleep") || l.contains("awake")).collect();
        format!("Events: {written:#?}\n{} said:\n{}", agent.identity, done.join("\n"))
    };
    assert_eq!(transitions(&a, "sleep"), 1.0, "the leader's one sleep; {}", why(&a));
    let signal = |s: i32| testbed::process::signal(a.proc.pid(), s).unwrap();
    let a_paused = Utc::now();
    signal(libc::SIGSTOP);
    wait_until("replica-b to take the lease from the paused leader", Duration::from_secs(30), || {
        holder() == "replica-b"
    });
    let b_acquired = lease(c, &lease_ns).1.unwrap();
    signal(libc::SIGCONT);
    wait_until("replica-a to know it lost the lease", Duration::from_secs(30), || {
        a.get("/metrics").contains("dormant_leader 0")
    });
    // What the former leader had finished by now; as a standby it must do
    // nothing more.
    a.settle();
    let a_reconciles = reconciles(&a);
    wait_until("replica-b to report the sleeping target", Duration::from_secs(30), || {
        series(&b, "dormant_target_asleep") == Some(1.0)
    });
    assert_eq!(series(&a, "dormant_target_asleep"), None, "the former leader still reports the target");
    assert!(
        a.get("/metrics").contains("dormant_targets{kind=\"namespace\",state=\"asleep\"} 0"),
        "{}",
        a.get("/metrics")
    );
    let stopped_at = series(&a, "dormant_savings_total").unwrap();
    let b_start = series(&b, "dormant_savings_total").unwrap_or(0.0);
    // Both replicas add savings every 5 s: once the new leader has added
    // twice, the former one would have too.
    wait_until("replica-b to count savings twice", Duration::from_secs(30), || {
        series(&b, "dormant_savings_total").is_some_and(|v| v > b_start)
    });
    let b_next = series(&b, "dormant_savings_total").unwrap();
    wait_until("replica-b to count savings again", Duration::from_secs(30), || {
        series(&b, "dormant_savings_total").is_some_and(|v| v > b_next)
    });
    assert_eq!(
        series(&a, "dormant_savings_total"),
        Some(stopped_at),
        "the former leader still counts savings"
    );
    assert_eq!(
        reconciles(&a),
        a_reconciles,
        "the former leader reconciled as a standby; its log:\n{}",
        a.log()
    );
    assert_eq!(transitions(&a, "sleep"), 1.0, "the former leader slept something as a standby; {}", why(&a));
    assert_eq!(all_transitions(&b), 0.0, "the new leader slept or woke a target nobody asked it to");

    // The leader is killed: the standby (the former leader) takes over as
    // soon as the Lease the dead leader last renewed has run out: at once
    // after its expiry, kube-lease-manager releases it by force, waits up
    // to 1 s (against a race with other standbys) and takes it; 1 s more
    // is allowed for those API calls on a loaded machine. Never before.
    b.kill();
    let b_killed = Utc::now();
    let (_, _, renewed, duration) = lease(c, &lease_ns);
    let renewed = renewed.unwrap();
    let expiry = renewed + chrono::Duration::seconds(duration);
    wait_until("replica-a to take the lease", Duration::from_secs(30), || holder() == "replica-a");
    let a_acquired = lease(c, &lease_ns).1.unwrap();
    let after_expiry = a_acquired - expiry;
    assert!(
        after_expiry >= chrono::Duration::zero() && after_expiry <= chrono::Duration::seconds(2),
        "took the lease {after_expiry:?} after it expired (renewed {renewed}, {duration} s)"
    );
    let out = dormant(c, &["sleep", &format!("namespace/{ns2}"), "--wait=60s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_until("the Slept event", Duration::from_secs(10), || !reporters(&ns2).trim().is_empty());
    assert_eq!(reporters(&ns2).trim(), "replica-a");
    wait_until("replica-a to count savings again", Duration::from_secs(15), || {
        series(&a, "dormant_savings_total").is_some_and(|v| v > stopped_at)
    });
    assert_eq!(series(&a, "dormant_target_asleep"), Some(1.0));
    assert_eq!(transitions(&a, "sleep"), 2.0, "the leader's second sleep; {}", why(&a));
    assert_eq!(transitions(&a, "wake"), 0.0, "a wake nobody asked for");

    // Over the whole test, each Event dormant wrote came from the replica
    // that held the Lease when it happened.
    for ns in [&ns1, &ns2] {
        for e in events(c, ns, "").iter().filter(|e| e.reporting_controller == "dormant") {
            let led = |t: DateTime<Utc>| match e.reporting_instance.as_str() {
                "replica-a" => t <= a_paused || t >= a_acquired,
                "replica-b" => t >= b_acquired && t <= b_killed,
                other => panic!("an Event from {other:?}: {e:?}"),
            };
            let (led_first, led_last) = (led(e.first), led(e.last));
            assert!(led_first && led_last, "written by a replica that did not lead then: {e:?}");
        }
    }
    // Neither the new leader nor the resumed former one wrote the sleeping
    // Deployment again: its last write by dormant is the sleep itself.
    assert!(
        last_written_by_dormant(c, &ns1) <= a_paused,
        "deployment/app in {ns1} was written after the sleep"
    );
    assert!(last_written_by_dormant(c, &ns2) >= a_acquired - chrono::Duration::seconds(1));
    eprintln!("standby took over {after_expiry:?} after the dead leader's lease expired");
}

#[test]
fn an_invalid_policy_or_annotation_leaves_the_target_untouched_and_says_why() {
    let c = Cluster::shared();
    let id = test_id("invalid");
    install_crd(c);
    let bad_annotation = c.namespace("bad-ann", &[("dormant-test", &id)]).unwrap();
    let bad_policy = c.namespace("bad-pol", &[("dormant-test", &id), ("invalid-policy", &id)]).unwrap();
    // A workload's record of GitOps marks that is not dormant's (a hand
    // edit): refused before anything changes, not half-way through a wake.
    let bad_mark = c.namespace("bad-mark", &[("dormant-test", &id)]).unwrap();
    for ns in [&bad_annotation, &bad_policy, &bad_mark] {
        c.kubectl_apply(
            &c.admin,
            &format!("apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: app, namespace: {ns}}}\nspec:\n  replicas: 2\n  selector: {{matchLabels: {{app: a}}}}\n  template:\n    metadata: {{labels: {{app: a}}}}\n    spec: {{containers: [{{name: c, image: nginx:1.27}}]}}\n"),
        )
        .unwrap();
    }
    // Even a forced sleep does not move a target whose configuration is wrong.
    kubectl(
        c,
        &[
            "annotate",
            "namespace",
            &bad_annotation,
            "dormant.dev/sleep-after=soon",
            "dormant.dev/force-sleep=true",
        ],
    );
    kubectl(
        c,
        &["annotate", "deployment", "app", "-n", &bad_mark, "dormant.dev/gitops-before-sleep=disabled"],
    );
    kubectl(c, &["annotate", "namespace", &bad_mark, "dormant.dev/force-sleep=true"]);
    let policy = format!("{id}-broken");
    c.kubectl_apply(
        &c.admin,
        &format!("apiVersion: dormant.dev/v1alpha1\nkind: SleepPolicy\nmetadata: {{name: {policy}}}\nspec:\n  priority: 100\n  selector: {{namespaceSelector: {{matchLabels: {{invalid-policy: {id}}}}}}}\n  sleepAfter: 1s\n  schedules: [{{sleep: \"0 25 * * *\"}}]\n"),
    )
    .unwrap();
    let agent = Agent::start(c, &id, &format!("{id}-system"), "inv-1", &[]);

    let warnings = |ns: &str| event_notes(c, ns, "PolicyInvalid");
    wait_until("a PolicyInvalid event for the bad annotation", Duration::from_secs(30), || {
        !warnings(&bad_annotation).is_empty()
    });
    let note = warnings(&bad_annotation);
    assert!(note.contains("dormant.dev/sleep-after") && note.contains("\"soon\""), "{note}");
    wait_until("a PolicyInvalid event for the bad policy", Duration::from_secs(30), || {
        !warnings(&bad_policy).is_empty()
    });
    let note = warnings(&bad_policy);
    assert!(
        note.contains(&format!("SleepPolicy {policy} is invalid"))
            && note.contains("spec.schedules[0].sleep"),
        "{note}"
    );

    wait_until("a PolicyInvalid event for the bad GitOps record", Duration::from_secs(30), || {
        !warnings(&bad_mark).is_empty()
    });
    let note = warnings(&bad_mark);
    assert!(
        note.contains(&format!("Deployment/{bad_mark}/app"))
            && note.contains("dormant.dev/gitops-before-sleep"),
        "{note}"
    );

    std::thread::sleep(Duration::from_secs(3));
    for ns in [&bad_annotation, &bad_policy, &bad_mark] {
        assert_eq!(jsonpath(c, "deployment", "app", Some(ns), "{.spec.replicas}"), "2", "{ns} was touched");
        assert_eq!(annotation(c, "deployment", "app", Some(ns), "dormant.dev/replicas-before-sleep"), "");
        assert_eq!(state(c, "namespace", ns, None), "", "{ns} got a state");
    }
    let explain = String::from_utf8_lossy(&dormant(c, &["explain", &bad_annotation]).stdout).into_owned();
    assert!(
        explain.contains("State:    invalid") && explain.contains("dormant.dev/sleep-after=\"soon\""),
        "{explain}"
    );
    assert!(explain.contains("leaves this target exactly as it is"), "{explain}");

    // The policy's status says what is wrong and whom it failed.
    wait_until("the policy's Valid condition", Duration::from_secs(30), || {
        jsonpath(c, "sleeppolicy", &policy, None, "{.status.conditions[?(@.type==\"Valid\")].status}")
            == "False"
    });
    let message =
        jsonpath(c, "sleeppolicy", &policy, None, "{.status.conditions[?(@.type==\"Valid\")].message}");
    assert!(message.contains("spec.schedules[0].sleep"), "{message}");
    wait_until("the failed target in the policy status", Duration::from_secs(30), || {
        jsonpath(c, "sleeppolicy", &policy, None, "{.status.failedTargets[*].target}").contains(&bad_policy)
    });

    // Fixed, the forced sleep goes ahead.
    kubectl(c, &["annotate", "--overwrite", "namespace", &bad_annotation, "dormant.dev/sleep-after=1h"]);
    wait_state(c, "namespace", &bad_annotation, None, "asleep", Duration::from_secs(60), &agent);
    assert_eq!(jsonpath(c, "deployment", "app", Some(&bad_annotation), "{.spec.replicas}"), "0");
}

#[test]
fn an_hpa_pauses_while_its_workload_sleeps_and_resumes_on_wake() {
    let c = Cluster::shared();
    let id = test_id("hpa");
    let ns = c.namespace("hpa", &[("dormant-test", &id)]).unwrap();
    c.kubectl_apply(
        &c.admin,
        &format!(
            r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: api, namespace: {ns}}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: api}}}}
  template:
    metadata: {{labels: {{app: api}}}}
    spec: {{containers: [{{name: api, image: nginx:1.27, resources: {{requests: {{cpu: 100m}}}}}}]}}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {{name: api, namespace: {ns}}}
spec:
  scaleTargetRef: {{apiVersion: apps/v1, kind: Deployment, name: api}}
  minReplicas: 2
  maxReplicas: 4
  metrics: [{{type: Resource, resource: {{name: cpu, target: {{type: Utilization, averageUtilization: 50}}}}}}]
"#
        ),
    )
    .unwrap();
    let scaling =
        || jsonpath(c, "hpa", "api", Some(&ns), "{.status.conditions[?(@.type==\"ScalingActive\")].reason}");
    wait_until("the HPA controller to look at the HPA", Duration::from_secs(60), || !scaling().is_empty());
    assert_ne!(scaling(), "ScalingDisabled");
    let _agent = Agent::start(c, &id, &format!("{id}-system"), "hpa-1", &[]);
    kubectl(c, &["annotate", "namespace", &ns, "dormant.dev/sleep-after=1h"]);

    let out = dormant(c, &["sleep", &ns, "--wait=60s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(jsonpath(c, "deployment", "api", Some(&ns), "{.spec.replicas}"), "0");
    wait_until("the HPA to pause (ScalingDisabled)", Duration::from_secs(60), || {
        scaling() == "ScalingDisabled"
    });
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        jsonpath(c, "deployment", "api", Some(&ns), "{.spec.replicas}"),
        "0",
        "the paused HPA does not scale it back"
    );

    let out = dormant(c, &["wake", &ns, "--wait=60s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(jsonpath(c, "deployment", "api", Some(&ns), "{.spec.replicas}"), "2");
    wait_until("the HPA to resume", Duration::from_secs(60), || scaling() != "ScalingDisabled");
}

/// KEDA would scale a sleeping workload straight back up on its next
/// activation, and a ScaledJob would start new Jobs; dormant pauses each
/// ScaledObject at zero and each ScaledJob through KEDA's own annotations
/// (on real objects, from KEDA's CRDs) and gives back exactly the pause
/// each had. The KEDA operator itself is not part of the
/// testbed: what it reads is the annotation asserted here.
#[test]
fn keda_scaled_objects_and_jobs_are_paused_while_asleep_and_given_back_exactly() {
    let c = Cluster::shared();
    let crd = testbed::Bins::keda_crd().unwrap();
    kubectl(c, &["apply", "--server-side", "-f", &crd.display().to_string()]);
    c.wait_established("scaledobjects.keda.sh").unwrap();
    c.wait_established("scaledjobs.keda.sh").unwrap();
    let id = test_id("keda");
    let ns = c.namespace("keda", &[("dormant-test", &id)]).unwrap();
    let mut yaml = String::new();
    for (name, replicas, so_annotations, exclude) in [
        ("worker", 2, "{}", false),
        ("batch", 1, "{autoscaling.keda.sh/paused-replicas: \"1\"}", false),
        ("payments", 1, "{}", true),
    ] {
        let workload_annotations = if exclude { "{dormant.dev/exclude: \"true\"}" } else { "{}" };
        yaml.push_str(&format!(
            r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: {ns}, annotations: {workload_annotations}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec: {{containers: [{{name: c, image: nginx:1.27}}]}}
---
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata: {{name: {name}, namespace: {ns}, annotations: {so_annotations}}}
spec:
  scaleTargetRef: {{name: {name}}}
  minReplicaCount: 0
  triggers:
  - type: cron
    metadata: {{timezone: Europe/Berlin, start: "0 8 * * 1-5", end: "0 19 * * 1-5", desiredReplicas: "{replicas}"}}
---
"#
        ));
    }
    // ScaledJobs would start new Jobs in the sleeping namespace.
    for (name, annotations) in [("reports", "{}"), ("exports", "{dormant.dev/exclude: \"true\"}")] {
        yaml.push_str(&format!(
            r#"apiVersion: keda.sh/v1alpha1
kind: ScaledJob
metadata: {{name: {name}, namespace: {ns}, annotations: {annotations}}}
spec:
  jobTargetRef: {{template: {{spec: {{containers: [{{name: c, image: busybox:1.37}}], restartPolicy: Never}}}}}}
  triggers:
  - type: cron
    metadata: {{timezone: Europe/Berlin, start: "0 2 * * *", end: "0 3 * * *", desiredReplicas: "1"}}
---
"#
        ));
    }
    c.kubectl_apply(&c.admin, &yaml).unwrap();
    let _agent = Agent::start(c, &id, &format!("{id}-system"), "keda-1", &[]);
    kubectl(c, &["annotate", "namespace", &ns, "dormant.dev/sleep-after=1h"]);
    let paused =
        |so: &str| annotation(c, "scaledobject", so, Some(&ns), "autoscaling.keda.sh/paused-replicas");
    let record = |so: &str| {
        annotation(c, "scaledobject", so, Some(&ns), "dormant.dev/keda-paused-replicas-before-sleep")
    };

    let out = dormant(c, &["sleep", &ns, "--wait=60s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!((paused("worker"), record("worker")), ("0".into(), "none".into()));
    assert_eq!((paused("batch"), record("batch")), ("0".into(), "1".into()));
    let untouched = jsonpath(c, "scaledobject", "payments", Some(&ns), "{.metadata.annotations}");
    assert!(
        !untouched.contains("paused-replicas") && !untouched.contains("dormant.dev"),
        "the excluded workload's ScaledObject is untouched: {untouched}"
    );
    assert_eq!(replicas(c, "deployment", "worker", &ns), "0");
    assert_eq!(replicas(c, "deployment", "payments", &ns), "1");
    let job_pause = |sj: &str| annotation(c, "scaledjob", sj, Some(&ns), "autoscaling.keda.sh/paused");
    let job_record =
        |sj: &str| annotation(c, "scaledjob", sj, Some(&ns), "dormant.dev/keda-paused-before-sleep");
    assert_eq!((job_pause("reports"), job_record("reports")), ("true".into(), "none".into()));
    assert_eq!((job_pause("exports"), job_record("exports")), (String::new(), String::new()), "excluded");

    let out = dormant(c, &["wake", &ns, "--wait=60s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(replicas(c, "deployment", "worker", &ns), "2");
    assert_eq!(replicas(c, "deployment", "batch", &ns), "1");
    let all = jsonpath(c, "scaledobject", "worker", Some(&ns), "{.metadata.annotations}");
    assert!(!all.contains("paused-replicas"), "KEDA controls worker again: {all}");
    assert_eq!((paused("batch"), record("batch")), ("1".into(), String::new()), "batch stays paused at 1");
    assert_eq!(
        (job_pause("reports"), job_record("reports")),
        (String::new(), String::new()),
        "reports runs again"
    );
}

#[test]
fn status_and_explain_say_what_each_target_does_and_why() {
    let c = Cluster::shared();
    let id = test_id("explain");
    install_crd(c);
    let ns = c.namespace("explain", &[("dormant-test", &id)]).unwrap();
    let policy = format!("{id}-office");
    c.kubectl_apply(
        &c.admin,
        &format!("apiVersion: dormant.dev/v1alpha1\nkind: SleepPolicy\nmetadata: {{name: {policy}}}\nspec:\n  selector: {{namespaceSelector: {{matchLabels: {{dormant-test: {id}}}}}}}\n  sleepAfter: 45m\n  timezone: Europe/Berlin\n  schedules: [{{sleep: \"0 19 * * 1-5\", wake: \"0 8 * * 1-5\"}}]\n"),
    )
    .unwrap();
    kubectl(c, &["annotate", "namespace", &ns, "dormant.dev/sleep-after=30m"]);

    let out = dormant(c, &["status"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    let header: Vec<&str> =
        table.lines().next().unwrap().split("   ").map(str::trim).filter(|s| !s.is_empty()).collect();
    assert_eq!(header, ["TARGET", "KIND", "STATE", "IDLE FOR", "NEXT", "POLICY"]);
    let row = table
        .lines()
        .find(|l| l.starts_with(&format!("namespace/{ns} ")))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(row.contains(" awake ") && row.contains(&policy), "{row}");

    let out = dormant(c, &["status", "-o", "json"]);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mine = rows.iter().find(|r| r["target"] == format!("namespace/{ns}")).unwrap();
    assert_eq!(mine["policy"], policy.as_str());
    assert_eq!(mine["desired"], "awake");

    let out = dormant(c, &["explain", &format!("namespace/{ns}")]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    for needle in [
        format!("Policy:   SleepPolicy {policy}"),
        "sleepAfter       30m".to_string(),
        "(from annotation dormant.dev/sleep-after)".to_string(),
        format!("Europe/Berlin                            (from SleepPolicy {policy})"),
        "sleep \"0 19 * * 1-5\" / wake \"0 8 * * 1-5\"".to_string(),
    ] {
        assert!(text.contains(&needle), "missing {needle:?} in:\n{text}");
    }

    let out = dormant(c, &["explain", "namespace/does-not-exist"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("namespace/does-not-exist does not exist"));
    let out = dormant(c, &["explain", "a/b/c/d"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected namespace/<name>"));
}

/// An API server that stops answering just as a target's idle time runs
/// out: the reconcile that would put it to sleep hangs, is abandoned after
/// `--reconcile-timeout` (counted as a timeout), and is retried; once the
/// server answers again the target falls asleep and wakes with every
/// replica count kept, whatever of the abandoned attempt the server applied
/// late.
#[test]
fn a_reconcile_stuck_on_a_silent_api_server_times_out_and_completes_later() {
    // A cluster of its own: its API server is frozen (SIGSTOP) for a while.
    let c = Cluster::start(testbed::ClusterOptions::default()).unwrap();
    let id = test_id("frozen");
    let ns = c.namespace("frozen", &[("dormant-test", &id)]).unwrap();
    c.kubectl_apply(&c.admin, &workloads_yaml(&ns)).unwrap();
    wait_until("3 web and 2 db pods ready", Duration::from_secs(60), || {
        ready_pods(&c, &ns, "app=web") == 3 && ready_pods(&c, &ns, "app=db") == 2
    });
    kubectl(&c, &["annotate", "namespace", &ns, "dormant.dev/sleep-after=12s"]);
    // A long Lease, so this replica stays the leader while the server is frozen.
    let agent = Agent::start(
        &c,
        &id,
        &format!("{id}-system"),
        "frozen-1",
        &["--reconcile-timeout=2s", "--lease-duration=2m"],
    );
    wait_state(&c, "namespace", &ns, None, "awake", Duration::from_secs(30), &agent);
    let first_seen: chrono::DateTime<chrono::Utc> =
        annotation(&c, "namespace", &ns, None, "dormant.dev/first-seen").parse().unwrap();
    let deadline = first_seen + chrono::Duration::seconds(12);

    // Freeze the API server a moment before the deadline.
    let left = (deadline - chrono::Utc::now()).to_std().unwrap_or_default();
    std::thread::sleep(left.saturating_sub(Duration::from_millis(1500)));
    let api = c.pid_of("kube-apiserver").unwrap();
    let signal = |s: i32| testbed::process::signal(api, s).unwrap();
    signal(libc::SIGSTOP);
    let timeouts = || {
        agent
            .get("/metrics")
            .lines()
            .find(|l| l.starts_with("dormant_reconcile_errors_total{") && l.contains("category=\"timeout\""))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let start = std::time::Instant::now();
    while timeouts() < 1.0 && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let counted = timeouts();
    signal(libc::SIGCONT);
    assert!(
        counted >= 1.0,
        "no reconcile timed out while the API server was frozen; agent log:\n{}",
        agent.log()
    );
    assert!(agent.log().contains("reconcile failed"), "{}", agent.log());

    wait_state(&c, "namespace", &ns, None, "asleep", Duration::from_secs(60), &agent);
    assert_namespace_asleep(&c, &ns);
    let out = dormant(&c, &["wake", &ns, "--wait=60s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_namespace_awake_as_before(&c, &ns);
}

/// A vcluster's control plane is its target object: its sleep writes the
/// target's annotations in the patch that scales it, made from the agent's
/// cache. A `kubectl scale` the cache has not seen yet must be what gets
/// recorded (the patch carries the version it was made from; the conflict
/// makes it again from a fresh read), not the cache's older count, and the
/// mark lands with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_scaled_just_before_its_sleep_records_the_new_count() {
    use dormant::target::cached::StatefulSet;
    use dormant::vocab::STATE;
    let c = Cluster::shared();
    let ns = c.namespace("stale", &[("dormant-test", &test_id("stale"))]).unwrap();
    c.kubectl_apply(
        &c.admin,
        &format!("apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {{name: vc, namespace: {ns}}}\nspec:\n  replicas: 1\n  serviceName: vc\n  selector: {{matchLabels: {{app: vc}}}}\n  template:\n    metadata: {{labels: {{app: vc}}}}\n    spec: {{containers: [{{name: c, image: nginx:1.27}}]}}\n"),
    )
    .unwrap();
    let client = c.client().await.unwrap();
    let api: kube::Api<StatefulSet> = kube::Api::namespaced(client.clone(), &ns);
    let cached = dormant::target::WorkloadView::from_statefulset(&api.get("vc").await.unwrap());
    assert_eq!(cached.replicas, Some(1));
    kubectl(c, &["scale", "statefulset", "vc", "-n", &ns, "--replicas=3"]);

    let throttle = dormant::client::Throttle::new(50.try_into().unwrap(), 50.try_into().unwrap());
    let annotator = dormant::annotate::Annotator::new(dormant::client::Patcher::new(client, throttle));
    let changes = [(STATE, Some("sleeping".to_string()))].into_iter().collect();
    let outcome = annotator
        .set_with(&cached, &changes, |w| dormant::scaler::sleep_patch_marked(w, false, None))
        .await
        .unwrap();
    assert_eq!(outcome, dormant::client::Outcome::Changed);
    assert_eq!(replicas(c, "statefulset", "vc", &ns), "0");
    assert_eq!(annotation(c, "statefulset", "vc", Some(&ns), "dormant.dev/replicas-before-sleep"), "3");
    assert_eq!(annotation(c, "statefulset", "vc", Some(&ns), STATE), "sleeping");
}

/// Kubernetes deletes the PersistentVolumeClaims of a StatefulSet with
/// `persistentVolumeClaimRetentionPolicy.whenScaled: Delete` when it scales
/// down: dormant refuses to sleep a target holding one (the data would be
/// gone on wake), says why, and sleeps it once that workload is excluded.
#[test]
fn a_statefulset_that_deletes_its_claims_when_scaled_down_is_never_slept() {
    let c = Cluster::shared();
    let id = test_id("claims");
    let ns = c.namespace("claims", &[("dormant-test", &id)]).unwrap();
    c.kubectl_apply(
        &c.admin,
        &format!(
            r#"{}apiVersion: apps/v1
kind: StatefulSet
metadata: {{name: db, namespace: {ns}}}
spec:
  replicas: 1
  serviceName: db
  persistentVolumeClaimRetentionPolicy: {{whenDeleted: Retain, whenScaled: Delete}}
  selector: {{matchLabels: {{app: db}}}}
  template:
    metadata: {{labels: {{app: db}}}}
    spec: {{containers: [{{name: c, image: postgres:17}}]}}
  volumeClaimTemplates:
  - metadata: {{name: data}}
    spec: {{accessModes: [ReadWriteOnce], resources: {{requests: {{storage: 1Gi}}}}}}
"#,
            deployment_yaml(&ns, "web", 2)
        ),
    )
    .unwrap();
    kubectl(c, &["annotate", "namespace", &ns, "dormant.dev/sleep-after=1h", "dormant.dev/force-sleep=true"]);
    let agent = Agent::start(c, &id, &format!("{id}-system"), "claims-1", &[]);
    let warnings = || event_notes(c, &ns, "PolicyInvalid");
    wait_until("a PolicyInvalid event", Duration::from_secs(30), || !warnings().is_empty());
    let note = warnings();
    assert!(
        note.contains(&format!("StatefulSet/{ns}/db"))
            && note.contains("whenScaled: Delete")
            && note.contains("dormant.dev/exclude"),
        "{note}"
    );
    assert_eq!(replicas(c, "deployment", "web", &ns), "2");
    assert_eq!(replicas(c, "statefulset", "db", &ns), "1");
    assert_eq!(state(c, "namespace", &ns, None), "", "the target got a state");

    // Excluded, the StatefulSet stays up and the rest of the namespace sleeps.
    kubectl(c, &["annotate", "statefulset", "db", "-n", &ns, "dormant.dev/exclude=true"]);
    wait_state(c, "namespace", &ns, None, "asleep", Duration::from_secs(30), &agent);
    assert_eq!(replicas(c, "deployment", "web", &ns), "0");
    assert_eq!(replicas(c, "statefulset", "db", &ns), "1");
}

/// `dormant wake` from a machine whose clock is ahead of the agent's dates
/// the wake in the agent's future: it still wakes the target now (a use
/// dated later than the agent's clock reads as now).
#[test]
fn a_wake_dated_by_a_clock_ahead_of_the_agents_wakes_now() {
    let c = Cluster::shared();
    let id = test_id("skew");
    let ns = c.namespace("skew", &[("dormant-test", &id)]).unwrap();
    c.kubectl_apply(&c.admin, &deployment_yaml(&ns, "app", 2)).unwrap();
    // Asleep because idle (a forced sleep would end with its annotation).
    kubectl(c, &["annotate", "namespace", &ns, "dormant.dev/sleep-after=5s"]);
    let agent = Agent::start(c, &id, &format!("{id}-system"), "skew-1", &[]);
    wait_state(c, "namespace", &ns, None, "asleep", Duration::from_secs(30), &agent);
    assert_eq!(replicas(c, "deployment", "app", &ns), "0");

    // What `dormant wake` writes, from a clock an hour ahead.
    let ahead = dormant::policy::annotations::rfc3339(chrono::Utc::now() + chrono::Duration::hours(1));
    kubectl(
        c,
        &[
            "annotate",
            "--overwrite",
            "namespace",
            &ns,
            &format!("dormant.dev/last-activity={ahead}"),
            &format!("dormant.dev/last-activity-by=bob wake namespace/{ns} (cli)"),
        ],
    );
    wait_state(c, "namespace", &ns, None, "awake", Duration::from_secs(30), &agent);
    assert_eq!(replicas(c, "deployment", "app", &ns), "2");
}

/// KEDA holds a paused ScaledObject's workload at the paused count, so a
/// pause that landed before the workload's own patch would let KEDA scale
/// it to zero first, and "0" would be recorded and restored. Here the
/// workload's patch is refused for a while (an admission policy): the
/// ScaledObject must stay unpaused until the workload is recorded.
#[test]
fn keda_is_paused_only_after_its_workload_is_recorded() {
    let c = Cluster::shared();
    let crd = testbed::Bins::keda_crd().unwrap();
    kubectl(c, &["apply", "--server-side", "-f", &crd.display().to_string()]);
    c.wait_established("scaledobjects.keda.sh").unwrap();
    let id = test_id("keda-order");
    let ns = c.namespace("keda-order", &[("dormant-test", &id)]).unwrap();
    let agent_name = agent_user(c).name.clone();
    c.kubectl_apply(
        &c.admin,
        &format!(
            r#"{}apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata: {{name: worker, namespace: {ns}}}
spec:
  scaleTargetRef: {{name: worker}}
  triggers:
  - type: cron
    metadata: {{timezone: UTC, start: "0 8 * * *", end: "0 18 * * *", desiredReplicas: "2"}}
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {{name: {id}}}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
    - {{apiGroups: [apps], apiVersions: [v1], operations: [UPDATE], resources: [deployments]}}
  validations:
  - expression: "request.userInfo.username != '{agent_name}'"
    message: "refused by the test"
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata: {{name: {id}}}
spec:
  policyName: {id}
  validationActions: [Deny]
  matchResources:
    namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: {ns}}}}}
"#,
            deployment_yaml(&ns, "worker", 2)
        ),
    )
    .unwrap();
    // The policy takes effect a moment after it is created.
    wait_until("the admission policy to refuse the agent", Duration::from_secs(30), || {
        let out = c
            .kubectl(&c.admin)
            .args(["annotate", "deployment", "worker", "-n", &ns, "x=y", "--dry-run=server"])
            .arg(format!("--as={agent_name}"))
            .arg("--as-group=system:masters")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stderr).contains("refused by the test")
    });
    kubectl(c, &["annotate", "namespace", &ns, "dormant.dev/sleep-after=1h", "dormant.dev/force-sleep=true"]);
    let agent = Agent::start(c, &id, &format!("{id}-system"), "keda-order-1", &[]);
    let failures = || event_notes(c, &ns, "SleepFailed");
    wait_until("the refused workload patch", Duration::from_secs(30), || {
        failures().contains("refused by the test")
    });
    let paused = || annotation(c, "scaledobject", "worker", Some(&ns), "autoscaling.keda.sh/paused-replicas");
    assert_eq!(paused(), "", "KEDA was paused before its workload was recorded");
    assert_eq!(replicas(c, "deployment", "worker", &ns), "2");

    kubectl(c, &["delete", "validatingadmissionpolicybinding", &id]);
    wait_state(c, "namespace", &ns, None, "asleep", Duration::from_secs(90), &agent);
    assert_eq!(replicas(c, "deployment", "worker", &ns), "0");
    assert_eq!(annotation(c, "deployment", "worker", Some(&ns), "dormant.dev/replicas-before-sleep"), "2");
    assert_eq!(paused(), "0");
    kubectl(c, &["delete", "validatingadmissionpolicy", &id]);
}

/// A KEDA record dormant cannot give back (edited by hand while asleep)
/// stops the wake before anything changes, with an Event that names it,
/// instead of leaving the workloads woken and the target stuck waking.
#[test]
fn an_unreadable_keda_record_stops_a_wake_before_anything_changes() {
    let c = Cluster::shared();
    let crd = testbed::Bins::keda_crd().unwrap();
    kubectl(c, &["apply", "--server-side", "-f", &crd.display().to_string()]);
    c.wait_established("scaledobjects.keda.sh").unwrap();
    let id = test_id("keda-bad");
    let ns = c.namespace("keda-bad", &[("dormant-test", &id)]).unwrap();
    c.kubectl_apply(
        &c.admin,
        &format!(
            r#"{}apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata: {{name: worker, namespace: {ns}}}
spec:
  scaleTargetRef: {{name: worker}}
  triggers:
  - type: cron
    metadata: {{timezone: UTC, start: "0 8 * * *", end: "0 18 * * *", desiredReplicas: "2"}}
"#,
            deployment_yaml(&ns, "worker", 2)
        ),
    )
    .unwrap();
    kubectl(c, &["annotate", "namespace", &ns, "dormant.dev/sleep-after=1h"]);
    let agent = Agent::start(c, &id, &format!("{id}-system"), "keda-bad-1", &[]);
    let out = dormant(c, &["sleep", &format!("namespace/{ns}"), "--wait=60s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    kubectl(
        c,
        &[
            "annotate",
            "--overwrite",
            "scaledobject",
            "worker",
            "-n",
            &ns,
            "dormant.dev/keda-paused-replicas-before-sleep=lots",
        ],
    );

    let out = dormant(c, &["wake", &format!("namespace/{ns}")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let failures = || event_notes(c, &ns, "WakeFailed");
    wait_until("a WakeFailed event", Duration::from_secs(30), || !failures().is_empty());
    assert!(failures().contains("keda-paused-replicas-before-sleep=\"lots\""), "{}", failures());
    assert_eq!(replicas(c, "deployment", "worker", &ns), "0", "woken in part");
    assert_eq!(state(c, "namespace", &ns, None), "asleep");

    kubectl(
        c,
        &[
            "annotate",
            "--overwrite",
            "scaledobject",
            "worker",
            "-n",
            &ns,
            "dormant.dev/keda-paused-replicas-before-sleep=none",
        ],
    );
    wait_state(c, "namespace", &ns, None, "awake", Duration::from_secs(90), &agent);
    assert_eq!(replicas(c, "deployment", "worker", &ns), "2");
    assert_eq!(annotation(c, "scaledobject", "worker", Some(&ns), "autoscaling.keda.sh/paused-replicas"), "");
}

/// A SleepPolicy's status counts each target it governs once, also after
/// the policy turns invalid under a target it governed while valid.
#[test]
fn a_policy_that_turns_invalid_counts_its_targets_once() {
    let c = Cluster::shared();
    let id = test_id("turns");
    install_crd(c);
    let ns = c.namespace("turns", &[("dormant-test", &id), ("turns-policy", &id)]).unwrap();
    let policy = format!("{id}-p");
    let apply = |sleep: &str| {
        c.kubectl_apply(
            &c.admin,
            &format!("apiVersion: dormant.dev/v1alpha1\nkind: SleepPolicy\nmetadata: {{name: {policy}}}\nspec:\n  priority: 100\n  selector: {{namespaceSelector: {{matchLabels: {{turns-policy: {id}}}}}}}\n  sleepAfter: 1h\n  schedules: [{{sleep: \"{sleep}\"}}]\n"),
        )
        .unwrap();
    };
    apply("0 19 * * *");
    let _agent = Agent::start(c, &id, &format!("{id}-system"), "turns-1", &[]);
    let status = |path: &str| jsonpath(c, "sleeppolicy", &policy, None, path);
    wait_until("the policy to govern its namespace", Duration::from_secs(30), || {
        status("{.status.targets}") == "1"
    });
    apply("0 25 * * *");
    wait_until("the policy's Valid condition to turn False", Duration::from_secs(30), || {
        status("{.status.conditions[?(@.type==\"Valid\")].status}") == "False"
    });
    // One read of one status write: the failed target and the count it
    // was written with (two reads could straddle another write).
    let mut seen = String::new();
    wait_until("the failed target in the status", Duration::from_secs(30), || {
        seen = status("{.status.failedTargets[*].target} {.status.targets}");
        seen.starts_with(&format!("namespace/{ns} "))
    });
    assert_eq!(seen, format!("namespace/{ns} 1"), "counted twice, or not at all");

    // Fixed: valid again, and the failure is gone from the status.
    apply("0 19 * * *");
    wait_until("the policy valid again with no failed target", Duration::from_secs(30), || {
        status("{.status.conditions[?(@.type==\"Valid\")].status}|{.status.failedTargets}|{.status.targets}")
            == "True||1"
    });
}

/// A replica whose caches cannot sync (here its RBAC does not let it list
/// pods) stays unready and never takes part in leader election: it must
/// not win the Lease and hold it with no controller running. A SIGTERM
/// while it waits stops it cleanly.
#[test]
fn a_replica_whose_caches_never_sync_never_takes_the_lease() {
    let c = Cluster::shared();
    let id = test_id("unsynced");
    install_crd(c);
    let lease_ns = format!("{id}-system");
    ensure_namespace(c, &lease_ns);
    let user = c.user(&format!("{id}-agent"), &[]).unwrap();
    c.kubectl_apply(
        &c.admin,
        &format!(
            r#"apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: {id}}}
rules:
- {{apiGroups: [apps, batch, coordination.k8s.io, dormant.dev, events.k8s.io, authentication.k8s.io], resources: ["*"], verbs: ["*"]}}
- {{apiGroups: [""], resources: [namespaces, secrets, events], verbs: ["*"]}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: {id}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: {id}}}
subjects: [{{kind: User, name: {id}-agent}}]
"#
        ),
    )
    .unwrap();
    let admin_port = testbed::process::free_port().unwrap();
    let args: Vec<String> = vec![
        "agent".into(),
        format!("--namespace={lease_ns}"),
        format!("--admin-addr=127.0.0.1:{admin_port}"),
        format!("--namespace-selector=dormant-test={id}"),
        "--identity=unsynced-1".into(),
        "--lease-duration=3s".into(),
    ];
    let env = vec![
        ("KUBECONFIG".to_string(), user.kubeconfig.display().to_string()),
        ("RUST_LOG".to_string(), "info".to_string()),
    ];
    let mut agent =
        testbed::spawner::spawn_with_env("dormant-unsynced", &dormant_bin(), &args, &env, &c.dir).unwrap();
    wait_until("the pods watch to be refused", Duration::from_secs(30), || {
        std::fs::read_to_string(&agent.log).unwrap_or_default().contains("watch error")
    });
    // Leader election used to start with the reflectors: by now the Lease
    // would exist, held by this replica.
    std::thread::sleep(Duration::from_secs(3));
    assert!(!testbed::process::http_ok(admin_port, "/readyz"), "ready without synced caches");
    let leases = kubectl(c, &["get", "leases", "-n", &lease_ns, "-o", "name"]);
    assert_eq!(leases.trim(), "", "a replica with unsynced caches took part in leader election");

    testbed::process::signal(agent.pid(), libc::SIGTERM).unwrap();
    wait_until("the agent to stop", Duration::from_secs(15), || agent.exited().is_some());
    let status = agent.exited().unwrap();
    let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
    assert!(status.success() && log.contains("shutting down"), "{status:?}\n{log}");
}

/// A vcluster that deploys its own etcd (`backingStore.etcd.deploy`: a
/// StatefulSet `app=vcluster-etcd`, `release=<name>`): the etcd sleeps and
/// wakes with its vcluster, and never with the namespace around it (which
/// would stop the store under an awake vcluster).
#[test]
fn a_vclusters_deployed_etcd_sleeps_and_wakes_with_it_not_with_its_namespace() {
    let c = Cluster::shared();
    let id = test_id("vc-etcd");
    let ns = c.namespace("vc-etcd", &[("dormant-test", &id)]).unwrap();
    let sts = |name: &str, app: &str, replicas: u32| {
        format!(
            "apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {app}, release: vc}}}}\nspec:\n  replicas: {replicas}\n  serviceName: {name}\n  selector: {{matchLabels: {{app: {app}, release: vc}}}}\n  template:\n    metadata: {{labels: {{app: {app}, release: vc}}}}\n    spec: {{containers: [{{name: c, image: nginx:1.27}}]}}\n---\n"
        )
    };
    c.kubectl_apply(
        &c.admin,
        &format!(
            "{}{}{}",
            sts("vc", "vcluster", 1),
            sts("vc-etcd", "vcluster-etcd", 3),
            deployment_yaml(&ns, "web", 2),
        ),
    )
    .unwrap();
    kubectl(c, &["annotate", "namespace", &ns, "dormant.dev/sleep-after=1h"]);
    kubectl(c, &["annotate", "statefulset", "vc", "-n", &ns, "dormant.dev/sleep-after=1h"]);
    let _agent = Agent::start(c, &id, &format!("{id}-system"), "vc-etcd-1", &[]);

    let out = dormant(c, &["sleep", &format!("namespace/{ns}"), "--wait=60s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(replicas(c, "deployment", "web", &ns), "0");
    assert_eq!(replicas(c, "statefulset", "vc-etcd", &ns), "3", "the namespace stopped the vcluster's store");
    assert_eq!(replicas(c, "statefulset", "vc", &ns), "1");

    let vc = format!("vcluster/{ns}/vc");
    let out = dormant(c, &["sleep", &vc, "--wait=60s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(replicas(c, "statefulset", "vc", &ns), "0");
    assert_eq!(replicas(c, "statefulset", "vc-etcd", &ns), "0", "the vcluster's store kept running");
    assert_eq!(annotation(c, "statefulset", "vc-etcd", Some(&ns), "dormant.dev/replicas-before-sleep"), "3");

    let out = dormant(c, &["wake", &vc, "--wait=60s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(replicas(c, "statefulset", "vc", &ns), "1");
    assert_eq!(replicas(c, "statefulset", "vc-etcd", &ns), "3");
    assert_eq!(annotation(c, "statefulset", "vc-etcd", Some(&ns), "dormant.dev/replicas-before-sleep"), "");
}

/// Only a SleepPolicy's spec (or its coming and going) makes every target
/// be looked at again, not its status, which dormant itself writes.
#[test]
fn a_policys_status_changing_reconciles_nothing() {
    let c = Cluster::shared();
    let id = test_id("status-only");
    install_crd(c);
    let mut namespaces = Vec::new();
    for _ in 0..3 {
        namespaces.push(c.namespace("status-only", &[("dormant-test", &id), ("status-only", &id)]).unwrap());
    }
    let policy = format!("{id}-p");
    c.kubectl_apply(
        &c.admin,
        &format!("apiVersion: dormant.dev/v1alpha1\nkind: SleepPolicy\nmetadata: {{name: {policy}}}\nspec:\n  selector: {{namespaceSelector: {{matchLabels: {{status-only: {id}}}}}}}\n  sleepAfter: 1h\n"),
    )
    .unwrap();
    let agent = Agent::start(c, &id, &format!("{id}-system"), "status-only-1", &[]);
    let reconciles = || {
        agent
            .get("/metrics")
            .lines()
            .find(|l| l.starts_with("dormant_reconcile_duration_seconds_count"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    wait_until("the policy's status", Duration::from_secs(30), || {
        jsonpath(c, "sleeppolicy", &policy, None, "{.status.targets}") == "3"
    });
    // Settled: no reconcile for a while.
    let settle = || {
        let mut settled = reconciles();
        wait_until("the agent to settle", Duration::from_secs(30), || {
            std::thread::sleep(Duration::from_secs(2));
            let now = reconciles();
            std::mem::replace(&mut settled, now) == now
        });
    };
    // Someone (here: the test) writes the status; dormant writes it back.
    // Other tests add and change SleepPolicies (cluster-wide objects) at
    // any time, and each of those rightly makes this agent look at its
    // targets again; the agent names the policies behind each such pass.
    // A round in which only this policy's status moved must reconcile
    // nothing, and no round may name this policy.
    let policy_passes = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|l| l.contains("SleepPolicies changed; looking at every target again"))
            .map(str::to_string)
            .collect()
    };
    let mut clean_round = false;
    for round in 0..10 {
        settle();
        let seen = policy_passes(&std::fs::read_to_string(&agent.proc.log).unwrap()).len();
        let before = reconciles();
        for n in [7, 8] {
            kubectl(
                c,
                &[
                    "patch",
                    "sleeppolicy",
                    &policy,
                    "--subresource=status",
                    "--type=merge",
                    "-p",
                    &format!("{{\"status\":{{\"targets\":{n}}}}}"),
                ],
            );
        }
        wait_until("dormant to write the status back", Duration::from_secs(30), || {
            jsonpath(c, "sleeppolicy", &policy, None, "{.status.targets}") == "3"
        });
        let after = reconciles();
        let passes = policy_passes(&std::fs::read_to_string(&agent.proc.log).unwrap()).split_off(seen);
        assert!(
            passes.iter().all(|l| !l.contains(&format!("\"{policy}\""))),
            "a status write was taken for a policy change: {passes:?}"
        );
        if passes.is_empty() {
            assert_eq!(after, before, "status writes reconciled targets");
            clean_round = true;
            break;
        }
        eprintln!("round {round}: other tests' policies changed meanwhile ({passes:?}); again");
    }
    assert!(clean_round, "no round without another test's policy change");
    let before = reconciles();
    // A spec change does reconcile every target.
    kubectl(
        c,
        &["patch", "sleeppolicy", &policy, "--type=merge", "-p", "{\"spec\":{\"sleepAfter\":\"2h\"}}"],
    );
    wait_until("the spec change to reconcile the targets", Duration::from_secs(30), || {
        reconciles() >= before + 3.0
    });
}

/// A target disabled while asleep is left exactly as it is (docs/architecture.md:
/// bad or disabled input changes nothing), and `dormant explain` says how to bring it back.
#[test]
fn a_target_disabled_while_asleep_stays_asleep_and_explain_says_how_to_wake_it() {
    let c = Cluster::shared();
    let id = test_id("disabled");
    let ns = c.namespace("disabled", &[("dormant-test", &id)]).unwrap();
    c.kubectl_apply(&c.admin, &deployment_yaml(&ns, "app", 2)).unwrap();
    kubectl(c, &["annotate", "namespace", &ns, "dormant.dev/sleep-after=1h"]);
    let agent = Agent::start(c, &id, &format!("{id}-system"), "disabled-1", &[]);
    let out = dormant(c, &["sleep", &format!("namespace/{ns}"), "--wait=60s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    kubectl(c, &["annotate", "namespace", &ns, "dormant.dev/disabled=true"]);
    let explain = || String::from_utf8_lossy(&dormant(c, &["explain", &ns]).stdout).into_owned();
    let text = explain();
    assert!(
        text.contains("disabled while asleep")
            && text.contains("remove dormant.dev/disabled")
            && text.contains(&format!("dormant wake namespace/{ns}")),
        "{text}"
    );
    // `dormant wake` alone does not move a disabled target.
    let out = dormant(c, &["wake", &format!("namespace/{ns}")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(replicas(c, "deployment", "app", &ns), "0");
    // As the note says.
    kubectl(c, &["annotate", "namespace", &ns, "dormant.dev/disabled-"]);
    let out = dormant(c, &["wake", &format!("namespace/{ns}"), "--wait=60s"]);
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), agent.log());
    assert_eq!(replicas(c, "deployment", "app", &ns), "2");
}

/// A SleepPolicy's `deleteAfter`, with the agent's `--enable-delete-after`:
/// a namespace asleep that long is warned (Event, `delete-at`), then
/// deleted with everything in it. One woken after the warning, one whose
/// policy turns dry-run, and one annotated `protect` are never deleted,
/// and the warnings given to the first two are withdrawn.
#[test]
fn delete_after_warns_then_deletes_and_never_a_woken_dry_run_or_protected_target() {
    let c = Cluster::shared();
    let id = test_id("delafter");
    install_crd(c);
    let ns = |prefix: &str| c.namespace(prefix, &[("dormant-test", &id), ("delete-after", &id)]).unwrap();
    let (doomed, woken, dry, protected) =
        (ns("del-doomed"), ns("del-woken"), ns("del-dry"), ns("del-protected"));
    for ns in [&doomed, &woken, &dry, &protected] {
        c.kubectl_apply(&c.admin, &deployment_yaml(ns, "app", 1)).unwrap();
    }
    let (policy, dry_policy) = (format!("{id}-delete"), format!("{id}-dry"));
    c.kubectl_apply(
        &c.admin,
        &format!(
            "apiVersion: dormant.dev/v1alpha1\nkind: SleepPolicy\nmetadata: {{name: {policy}}}\nspec:\n  selector: {{namespaceSelector: {{matchLabels: {{delete-after: {id}}}}}}}\n  sleepAfter: 1h\n  deleteAfter: 20s\n  deleteWarning: 15s\n---\napiVersion: dormant.dev/v1alpha1\nkind: SleepPolicy\nmetadata: {{name: {dry_policy}}}\nspec:\n  selector: {{namespaceSelector: {{matchLabels: {{never: {id}}}}}}}\n  sleepAfter: 1h\n  dryRun: true\n  deleteAfter: 20s\n  deleteWarning: 15s\n"
        ),
    )
    .unwrap();
    kubectl(c, &["annotate", "namespace", &protected, "dormant.dev/protect=true"]);
    for ns in [&doomed, &woken, &dry, &protected] {
        kubectl(c, &["annotate", "namespace", ns, "dormant.dev/force-sleep=true"]);
    }
    let agent = Agent::start(c, &id, &format!("{id}-system"), "del-1", &["--enable-delete-after"]);
    for ns in [&doomed, &woken, &dry, &protected] {
        wait_state(c, "namespace", ns, None, "asleep", Duration::from_secs(60), &agent);
    }
    let delete_at = |ns: &str| annotation(c, "namespace", ns, None, "dormant.dev/delete-at");
    wait_until("the warnings", Duration::from_secs(30), || {
        [&doomed, &woken, &dry].iter().all(|ns| !delete_at(ns).is_empty())
    });
    let note = event_notes(c, &doomed, "DeletionScheduled");
    assert!(note.contains("will be DELETED") && note.contains(&policy), "{note}");

    // Woken by hand, and moved to a dry-run policy: warnings withdrawn.
    let out = dormant(c, &["wake", &format!("namespace/{woken}"), "--wait=60s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    kubectl(c, &["annotate", "namespace", &dry, &format!("dormant.dev/policy={dry_policy}")]);
    wait_until("the withdrawals", Duration::from_secs(30), || {
        delete_at(&woken).is_empty() && delete_at(&dry).is_empty()
    });
    let note = event_notes(c, &woken, "DeletionCancelled");
    assert!(
        note.contains("will not be deleted: it is waking") || note.contains("it is not asleep"),
        "{note}"
    );
    assert!(event_notes(c, &dry, "DeletionCancelled").contains("dry-run"));

    // The doomed one goes, when it was warned it would.
    let warned: chrono::DateTime<chrono::Utc> = delete_at(&doomed).parse().unwrap();
    let phase = |ns: &str| {
        c.kubectl_out(&c.admin, &["get", "namespace", ns, "-o", "jsonpath={.status.phase}"]).unwrap_or_else(
            |e| {
                assert!(e.contains("NotFound"), "{e}");
                "gone".into()
            },
        )
    };
    wait_until("the deletion", Duration::from_secs(60), || {
        matches!(phase(&doomed).as_str(), "Terminating" | "gone")
    });
    assert!(chrono::Utc::now() >= warned, "deleted before the time it was warned of ({warned})");
    let deleted: Vec<_> =
        events(c, "default", "Deleted").into_iter().filter(|e| e.note.contains(&doomed)).collect();
    assert_eq!(deleted.len(), 1, "{deleted:?}");
    assert_eq!(deleted[0].regarding, format!("Namespace/{doomed}"));
    assert_eq!(agent.metric("dormant_deleted_targets_total"), 1.0);

    // The others stay as they are, a while after.
    std::thread::sleep(Duration::from_secs(5));
    for ns in [&woken, &dry, &protected] {
        assert_eq!(phase(ns), "Active", "{ns}");
        assert_eq!(delete_at(ns), "", "{ns}");
    }
    assert_eq!(jsonpath(c, "deployment", "app", Some(&protected), "{.spec.replicas}"), "0", "still asleep");
    assert_eq!(jsonpath(c, "deployment", "app", Some(&woken), "{.spec.replicas}"), "1", "awake");
}

/// `helm` against the testbed, with its own folders.
fn helm(c: &Cluster, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(c.bins.path("helm"))
        .args(args)
        .env("KUBECONFIG", &c.admin.kubeconfig)
        .env("HELM_CACHE_HOME", c.dir.join("helm/cache"))
        .env("HELM_CONFIG_HOME", c.dir.join("helm/config"))
        .env("HELM_DATA_HOME", c.dir.join("helm/data"))
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Every object of the kinds a vcluster release holds in `ns`, as
/// `Kind/name` to its UID, with its labels and annotations.
fn namespace_inventory(
    c: &Cluster,
    ns: &str,
) -> std::collections::BTreeMap<String, (String, serde_json::Value, serde_json::Value)> {
    let kinds = "pods,deployments,statefulsets,services,endpoints,ingresses,networkpolicies,poddisruptionbudgets,rolebindings,roles,serviceaccounts,configmaps,persistentvolumeclaims,secrets";
    let list: serde_json::Value =
        serde_json::from_str(&kubectl(c, &["get", kinds, "-n", ns, "-o", "json"])).unwrap();
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            let m = &o["metadata"];
            (
                format!("{}/{}", o["kind"].as_str().unwrap(), m["name"].as_str().unwrap()),
                (m["uid"].as_str().unwrap().to_string(), m["labels"].clone(), m["annotations"].clone()),
            )
        })
        .collect()
}

/// A vcluster installed with Helm (the real vcluster chart, v0.30.0) and
/// asleep past its policy's `deleteAfter` is deleted by its release's
/// objects: everything Helm installed for it, Helm's records (so `helm
/// list` no longer shows it), the control plane's volume claim the
/// StatefulSet controller made, what it synced to the host; nothing of
/// another release in the same namespace (protected, so warned never), nor
/// a look-alike carrying the chart's labels.
#[test]
fn delete_after_deletes_a_vcluster_by_its_helm_releases_objects_and_nothing_else() {
    let c = Cluster::shared();
    let id = test_id("delvc");
    install_crd(c);
    let ns = c.namespace("del-vc", &[("dormant-test", &id), ("delete-vc", &id)]).unwrap();
    let chart = testbed::Bins::vcluster_dir().unwrap().join("chart");
    for release in ["vc", "vc2"] {
        let (ok, out) = helm(
            c,
            &[
                "install",
                release,
                chart.to_str().unwrap(),
                "-n",
                &ns,
                "--set",
                "controlPlane.distro.k8s.enabled=true",
            ],
        );
        assert!(ok, "helm install {release}: {out}");
    }
    // What the vclusters' syncers would have made on the host, and a
    // look-alike with the chart's labels that nobody installed.
    c.kubectl_apply(
        &c.admin,
        &format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: kube-root-ca.crt-x-default-x-vc, namespace: {ns}, labels: {{vcluster.loft.sh/managed-by: vc}}}}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: kube-root-ca.crt-x-default-x-vc2, namespace: {ns}, labels: {{vcluster.loft.sh/managed-by: vc2}}}}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: lookalike, namespace: {ns}, labels: {{app: vcluster, release: vc}}}}\n"
        ),
    )
    .unwrap();
    // The StatefulSet controller makes the control plane's claim.
    wait_until("the control planes' claims", Duration::from_secs(60), || {
        let all = namespace_inventory(c, &ns);
        all.contains_key("PersistentVolumeClaim/data-vc-0")
            && all.contains_key("PersistentVolumeClaim/data-vc2-0")
    });
    let before = namespace_inventory(c, &ns);
    let of = |release: &str| -> std::collections::BTreeMap<String, String> {
        before
            .iter()
            .filter(|(key, (_, labels, annotations))| {
                annotations["meta.helm.sh/release-name"] == release
                    || labels["vcluster.loft.sh/managed-by"] == release
                    || labels["owner"] == "helm" && labels["name"] == release
                    || key.as_str() == format!("PersistentVolumeClaim/data-{release}-0")
            })
            .map(|(key, (uid, _, _))| (key.clone(), uid.clone()))
            .collect()
    };
    let (doomed, kept) = (of("vc"), of("vc2"));
    for key in [
        "StatefulSet/vc",
        "Service/vc",
        "Secret/vc-config-vc",
        "Secret/sh.helm.release.v1.vc.v1",
        "PersistentVolumeClaim/data-vc-0",
        "ConfigMap/kube-root-ca.crt-x-default-x-vc",
    ] {
        assert!(doomed.contains_key(key), "{key} not in {doomed:?}");
    }
    assert!(kept.contains_key("StatefulSet/vc2") && kept.len() == doomed.len(), "{kept:?}");

    let policy = format!("{id}-delete");
    c.kubectl_apply(
        &c.admin,
        &format!(
            "apiVersion: dormant.dev/v1alpha1\nkind: SleepPolicy\nmetadata: {{name: {policy}}}\nspec:\n  selector: {{namespaceSelector: {{matchLabels: {{delete-vc: {id}}}}}, kinds: [VCluster]}}\n  sleepAfter: 1h\n  deleteAfter: 20s\n  deleteWarning: 15s\n"
        ),
    )
    .unwrap();
    kubectl(c, &["annotate", "statefulset", "vc2", "-n", &ns, "dormant.dev/protect=true"]);
    for vc in ["vc", "vc2"] {
        kubectl(c, &["annotate", "statefulset", vc, "-n", &ns, "dormant.dev/force-sleep=true"]);
    }
    let agent = Agent::start(c, &id, &format!("{id}-system"), "delvc-1", &["--enable-delete-after"]);
    for vc in ["vc", "vc2"] {
        wait_state(c, "statefulset", vc, Some(&ns), "asleep", Duration::from_secs(60), &agent);
    }
    wait_until("the warning", Duration::from_secs(30), || {
        !annotation(c, "statefulset", "vc", Some(&ns), "dormant.dev/delete-at").is_empty()
    });
    let warned: DateTime<Utc> =
        annotation(c, "statefulset", "vc", Some(&ns), "dormant.dev/delete-at").parse().unwrap();
    let note = event_notes(c, &ns, "DeletionScheduled");
    assert!(note.contains("with its Helm release's objects and volumes") && note.contains(&policy), "{note}");

    wait_until("the deletion", Duration::from_secs(60), || {
        let now = namespace_inventory(c, &ns);
        doomed.keys().all(|key| !now.contains_key(key))
    });
    assert!(Utc::now() >= warned, "deleted before the time it was warned of ({warned})");
    let (ok, out) = helm(c, &["list", "-n", &ns, "-q"]);
    assert!(ok, "{out}");
    assert_eq!(out.split_whitespace().collect::<Vec<_>>(), ["vc2"], "helm list");
    let deleted = events(c, &ns, "Deleted");
    assert_eq!(deleted.len(), 1, "{deleted:?}");
    assert_eq!(deleted[0].regarding, "StatefulSet/vc");
    assert!(deleted[0].note.contains("deleted by its Helm release's objects"), "{}", deleted[0].note);
    assert_eq!(agent.metric("dormant_deleted_targets_total"), 1.0);

    // The other release, the look-alike and the rest stay as they were, a while after.
    std::thread::sleep(Duration::from_secs(5));
    let after = namespace_inventory(c, &ns);
    for (key, uid) in &kept {
        assert_eq!(after.get(key).map(|(u, _, _)| u), Some(uid), "{key} of the protected release");
    }
    assert!(after.contains_key("ConfigMap/lookalike"), "{:?}", after.keys());
    assert_eq!(annotation(c, "statefulset", "vc2", Some(&ns), "dormant.dev/delete-at"), "");
    assert_eq!(annotation(c, "statefulset", "vc2", Some(&ns), "dormant.dev/state"), "asleep");
    let (ok, out) = helm(c, &["status", "vc2", "-n", &ns]);
    assert!(ok && out.contains("STATUS: deployed"), "{out}");
}

/// Argo CD's Application, as far as dormant reads and writes it.
const ARGOCD_APPLICATION_CRD: &str = r#"apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: applications.argoproj.io}
spec:
  group: argoproj.io
  names: {kind: Application, listKind: ApplicationList, plural: applications, singular: application}
  scope: Namespaced
  versions:
  - name: v1alpha1
    served: true
    storage: true
    schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
"#;

/// With `--pause-argocd-applications`, the Argo CD Application that
/// deploys only a sleeping namespace is paused (`skip-reconcile`, what it
/// had recorded) before its workloads sleep, and given back exactly what it
/// had at wake; one that also deploys to a namespace still awake is left
/// alone. Argo CD itself does not run here: this checks the objects
/// dormant writes, which are what Argo CD reads.
#[test]
fn argocd_applications_pause_while_all_they_deploy_sleeps_and_get_back_what_they_had() {
    let c = Cluster::shared();
    let id = test_id("argocd");
    install_crd(c);
    c.kubectl_apply(&c.admin, ARGOCD_APPLICATION_CRD).unwrap();
    c.wait_established("applications.argoproj.io").unwrap();
    let argocd = format!("{id}-argocd");
    ensure_namespace(c, &argocd);
    let ns = c.namespace("argo", &[("dormant-test", &id)]).unwrap();
    let awake = c.namespace("argo-awake", &[]).unwrap();
    // Another team's namespace whose workload claims to be `shop`'s (a
    // tracking annotation is anyone's to write).
    let forger = c.namespace("argo-forger", &[("dormant-test", &id)]).unwrap();
    let tracked = |ns: &str, name: &str, app: &str| {
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\n  namespace: {ns}\n  annotations: {{argocd.argoproj.io/tracking-id: \"{app}:apps/Deployment:{ns}/{name}\"}}\nspec:\n  replicas: 1\n  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    spec: {{containers: [{{name: c, image: nginx:1.27}}]}}\n"
        )
    };
    c.kubectl_apply(&c.admin, &tracked(&ns, "web", "shop")).unwrap();
    c.kubectl_apply(&c.admin, &tracked(&ns, "db", "shared")).unwrap();
    c.kubectl_apply(&c.admin, &tracked(&awake, "api", "shared")).unwrap();
    c.kubectl_apply(&c.admin, &tracked(&forger, "claims", "shop")).unwrap();
    let application = |name: &str, annotations: &str| {
        format!(
            "apiVersion: argoproj.io/v1alpha1\nkind: Application\nmetadata: {{name: {name}, namespace: {argocd}, annotations: {{{annotations}}}}}\nspec:\n  destination: {{server: \"https://kubernetes.default.svc\", namespace: {ns}}}\n  source: {{repoURL: \"https://git.example/apps.git\", path: {name}}}\n"
        )
    };
    c.kubectl_apply(&c.admin, &application("shop", "argocd.argoproj.io/skip-reconcile: \"false\"")).unwrap();
    c.kubectl_apply(&c.admin, &application("shared", "")).unwrap();
    let app_annotation =
        |name: &str, key: &str| annotation(c, "applications.argoproj.io", name, Some(&argocd), key);
    wait_until("workloads ready", Duration::from_secs(60), || {
        ready_pods(c, &ns, "app=web") == 1 && ready_pods(c, &ns, "app=db") == 1
    });
    for n in [&ns, &forger] {
        kubectl(c, &["annotate", "namespace", n, "dormant.dev/force-sleep=true"]);
    }
    let agent = Agent::start(
        c,
        &id,
        &format!("{id}-system"),
        "argo-1",
        &["--pause-argocd-applications", &format!("--argocd-namespace={argocd}")],
    );
    for n in [&ns, &forger] {
        wait_state(c, "namespace", n, None, "asleep", Duration::from_secs(60), &agent);
    }
    wait_until("shop paused", Duration::from_secs(30), || {
        app_annotation("shop", "argocd.argoproj.io/skip-reconcile") == "true"
    });
    assert_eq!(app_annotation("shop", "argocd.argoproj.io/skip-reconcile"), "true");
    assert_eq!(
        app_annotation("shop", "dormant.dev/gitops-before-sleep"),
        r#"{"argocd.argoproj.io/skip-reconcile":"false"}"#
    );
    assert_eq!(
        (
            app_annotation("shared", "argocd.argoproj.io/skip-reconcile"),
            app_annotation("shared", "dormant.dev/gitops-before-sleep")
        ),
        (String::new(), String::new()),
        "it also deploys a namespace that is awake"
    );

    // The forger waking does not resume `shop`: its namespace still sleeps.
    let out = dormant(c, &["wake", &format!("namespace/{forger}"), "--wait=60s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        app_annotation("shop", "argocd.argoproj.io/skip-reconcile"),
        "true",
        "resumed by another's wake"
    );

    let out = dormant(c, &["wake", &format!("namespace/{ns}"), "--wait=60s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        (
            app_annotation("shop", "argocd.argoproj.io/skip-reconcile"),
            app_annotation("shop", "dormant.dev/gitops-before-sleep")
        ),
        ("false".to_string(), String::new()),
        "exactly what it had"
    );
}
