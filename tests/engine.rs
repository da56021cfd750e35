//! The sleep/wake engine on the real testbed: the `dormant` binary as an
//! agent, targets falling asleep and coming back exactly as they were.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

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

fn wait_state(
    c: &Cluster,
    kind: &str,
    name: &str,
    ns: Option<&str>,
    want: &str,
    timeout: Duration,
    agent: &Agent,
) {
    let start = std::time::Instant::now();
    loop {
        let s = state(c, kind, name, ns);
        if s == want {
            return;
        }
        if start.elapsed() > timeout {
            panic!("{kind}/{name} is {s:?}, not {want:?}, after {timeout:?}; agent log:\n{}", agent.log());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
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
