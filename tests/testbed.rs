//! The testbed itself: real control-plane behaviour every other test relies on.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::service::service_fn;
use testbed::vcluster::{VCluster, VClusterOptions};
use testbed::{AuditWebhook, Cluster, ClusterOptions};

fn kubectl_ok(c: &Cluster, args: &[&str]) -> String {
    c.kubectl_out(&c.admin, args).unwrap_or_else(|e| panic!("kubectl {args:?} failed: {e}"))
}

fn ready_pods(c: &Cluster, ns: &str, selector: &str) -> usize {
    let out = kubectl_ok(
        c,
        &[
            "get",
            "pods",
            "-n",
            ns,
            "-l",
            selector,
            "-o",
            "jsonpath={range .items[*]}{.status.phase}/{.status.conditions[?(@.type==\"Ready\")].status} {end}",
        ],
    );
    out.split_whitespace().filter(|s| *s == "Running/True").count()
}

fn pod_count(c: &Cluster, ns: &str, selector: &str) -> usize {
    kubectl_ok(c, &["get", "pods", "-n", ns, "-l", selector, "-o", "name"]).lines().count()
}

#[test]
fn statefulset_gets_ready_pods_and_loses_them_when_scaled_to_zero_through_scale() {
    let c = Cluster::shared();
    let ns = c.namespace("sts", &[]).unwrap();
    c.kubectl_apply(
        &c.admin,
        &format!(
            r#"apiVersion: apps/v1
kind: StatefulSet
metadata: {{name: db, namespace: {ns}}}
spec:
  replicas: 3
  serviceName: db
  selector: {{matchLabels: {{app: db}}}}
  template:
    metadata: {{labels: {{app: db}}}}
    spec: {{containers: [{{name: db, image: postgres:17}}]}}
"#
        ),
    )
    .unwrap();
    c.wait_for(Duration::from_secs(30), "3 ready StatefulSet pods", || ready_pods(c, &ns, "app=db") == 3)
        .unwrap();

    // Scale through the /scale subresource, as dormant does.
    kubectl_ok(
        c,
        &["patch", "statefulset", "db", "-n", &ns, "--subresource=scale", "-p", r#"{"spec":{"replicas":0}}"#],
    );
    c.wait_for(Duration::from_secs(30), "StatefulSet pods to be deleted", || {
        pod_count(c, &ns, "app=db") == 0
    })
    .unwrap();
    let replicas = kubectl_ok(c, &["get", "statefulset", "db", "-n", &ns, "-o", "jsonpath={.spec.replicas}"]);
    assert_eq!(replicas, "0");
}

#[test]
fn deployment_and_cronjob_run_pods_on_the_fake_node() {
    let c = Cluster::shared();
    let ns = c.namespace("deploy", &[]).unwrap();
    c.kubectl_apply(
        &c.admin,
        &format!(
            r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: web.frontend, namespace: {ns}}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec: {{containers: [{{name: web, image: nginx:1.27}}]}}
---
apiVersion: batch/v1
kind: CronJob
metadata: {{name: report, namespace: {ns}}}
spec:
  schedule: "0 3 * * *"
  jobTemplate:
    spec:
      template:
        metadata: {{labels: {{app: report}}}}
        spec:
          restartPolicy: Never
          containers: [{{name: report, image: busybox:1.37}}]
"#
        ),
    )
    .unwrap();
    c.wait_for(Duration::from_secs(30), "2 ready Deployment pods", || ready_pods(c, &ns, "app=web") == 2)
        .unwrap();
    kubectl_ok(c, &["scale", "deployment", "web.frontend", "-n", &ns, "--replicas=0"]);
    c.wait_for(Duration::from_secs(30), "Deployment pods to be deleted", || {
        pod_count(c, &ns, "app=web") == 0
    })
    .unwrap();

    // A job from the CronJob's template runs to completion (kwok completes its pod).
    kubectl_ok(c, &["create", "job", "report-now", "--from=cronjob/report", "-n", &ns]);
    c.wait_for(Duration::from_secs(60), "the job to complete", || {
        kubectl_ok(c, &["get", "job", "report-now", "-n", &ns, "-o", "jsonpath={.status.succeeded}"]) == "1"
    })
    .unwrap();
}

#[test]
fn alice_is_forbidden_until_a_rolebinding_allows_her() {
    let c = Cluster::shared();
    let ns = c.namespace("team-a", &[]).unwrap();
    let err = c.kubectl_out(&c.alice, &["get", "pods", "-n", &ns]).unwrap_err();
    assert!(err.contains("Forbidden") && err.contains("\"alice\""), "unexpected error: {err}");

    c.kubectl_apply(
        &c.admin,
        &format!(
            r#"apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: team-a-view, namespace: {ns}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: view}}
subjects: [{{apiGroup: rbac.authorization.k8s.io, kind: Group, name: team-a}}]
"#
        ),
    )
    .unwrap();
    // RBAC is read from an informer: allow it a moment.
    c.wait_for(Duration::from_secs(10), "alice to be allowed", || {
        c.kubectl_out(&c.alice, &["get", "pods", "-n", &ns]).is_ok()
    })
    .unwrap();
    let err = c.kubectl_out(&c.alice, &["get", "pods", "-n", "default"]).unwrap_err();
    assert!(err.contains("Forbidden"), "alice must still be forbidden elsewhere: {err}");
}

/// (path, authorization header, body) of each request received.
type Received = Arc<Mutex<Vec<(String, Option<String>, Vec<u8>)>>>;

/// An HTTPS server that records every request body.
struct Receiver {
    url: String,
    bodies: Received,
}

async fn start_receiver(c: &Cluster, token: &str) -> Receiver {
    dormant::tls::install_default_provider();
    let pair = c.serving_cert();
    let config = dormant::tls::server_config(
        dormant::tls::certs_from_pem(pair.cert_pem.as_bytes(), "cert").unwrap(),
        dormant::tls::key_from_pem(pair.key_pem.as_bytes()).unwrap(),
        None,
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://127.0.0.1:{}/audit", listener.local_addr().unwrap().port());
    let bodies: Received = Arc::default();
    let store = bodies.clone();
    let want = format!("Bearer {token}");
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let acceptor = acceptor.clone();
            let store = store.clone();
            let want = want.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let store = store.clone();
                    let want = want.clone();
                    async move {
                        let path = req.uri().path().to_string();
                        let auth = req
                            .headers()
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .map(String::from);
                        let ok = auth.as_deref() == Some(want.as_str());
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes().to_vec())
                            .unwrap_or_default();
                        store.lock().unwrap().push((path, auth, body));
                        let status = if ok { 200 } else { 401 };
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .status(status)
                                .body(http_body_util::Full::new(hyper::body::Bytes::new()))
                                .unwrap(),
                        )
                    }
                });
                // How the API server's connection ends (it may just go) is
                // no concern of this receiver: what it sent is in `store`.
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await
                    .ok();
            });
        }
    });
    Receiver { url, bodies }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_apiserver_sends_audit_event_lists_for_alices_requests() {
    // The receiver needs the testbed CA for its certificate, and the cluster
    // needs the receiver's URL: a first shared cluster provides the CA.
    let shared = Cluster::shared();
    let receiver = start_receiver(shared, "s3cret").await;
    let opts = ClusterOptions {
        audit: Some(AuditWebhook {
            url: receiver.url.clone(),
            ca_pem: shared.ca.cert_pem.clone(),
            token: "s3cret".into(),
            batch_max_wait: Duration::from_millis(500),
        }),
        controllers: false,
        ..Default::default()
    };
    let c = tokio::task::spawn_blocking(move || Cluster::start(opts)).await.unwrap().unwrap();
    // alice may not list pods there: refused, and audited all the same.
    let refused = c.kubectl_out(&c.alice, &["get", "pods", "-n", "team-a"]);
    assert!(refused.as_ref().is_err_and(|e| e.contains("forbidden")), "{refused:?}");

    let bodies = receiver.bodies.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let event = loop {
        let found = bodies.lock().unwrap().iter().find_map(|(path, auth, body)| {
            assert_eq!(path, "/audit");
            assert_eq!(auth.as_deref(), Some("Bearer s3cret"));
            let list: serde_json::Value = serde_json::from_slice(body).ok()?;
            assert_eq!(list["apiVersion"], "audit.k8s.io/v1");
            assert_eq!(list["kind"], "EventList");
            list["items"]
                .as_array()?
                .iter()
                .find(|e| e["user"]["username"] == "alice" && e["objectRef"]["resource"] == "pods")
                .cloned()
        });
        if let Some(e) = found {
            break e;
        }
        assert!(tokio::time::Instant::now() < deadline, "no audit event for alice within 20s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(event["verb"], "list");
    assert_eq!(event["objectRef"]["resource"], "pods");
    assert_eq!(event["objectRef"]["namespace"], "team-a");
    assert_eq!(event["responseStatus"]["code"], 403);
    assert_eq!(event["stage"], "ResponseComplete");
    let groups: Vec<&str> =
        event["user"]["groups"].as_array().unwrap().iter().filter_map(|g| g.as_str()).collect();
    assert_eq!(groups, ["team-a", "system:authenticated"]);
    assert!(event["userAgent"].as_str().unwrap().starts_with("kubectl/"));
    drop(c);
}

#[test]
fn vcluster_secret_kubeconfig_reaches_its_own_api_server_which_lives_with_its_pod() {
    let c = Cluster::shared();
    let ns = c.namespace("vc", &[]).unwrap();
    let vc = VCluster::create(c, &ns, "dev", VClusterOptions { pods: 2, ..Default::default() }).unwrap();
    vc.wait_serving(c, Duration::from_secs(60)).unwrap();

    // A user extracts the kubeconfig from the Secret, as with a real vcluster.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let kubeconfig = rt
        .block_on(async {
            let client = c.client().await?;
            testbed::vcluster::secret_kubeconfig(&client, &ns, "dev").await
        })
        .unwrap();
    let path = c.dir.join(format!("{ns}-dev-from-secret.kubeconfig"));
    std::fs::write(&path, kubeconfig).unwrap();
    let vkubectl = |args: &[&str]| {
        std::process::Command::new(c.bins.path("kubectl"))
            .arg(format!("--kubeconfig={}", path.display()))
            .args(args)
            .output()
            .unwrap()
    };
    let out = vkubectl(&["create", "namespace", "inside-vcluster"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The namespace exists in the vcluster, not on the host.
    assert!(c.kubectl_out(&c.admin, &["get", "namespace", "inside-vcluster"]).is_err());

    // The syncer stand-in mirrors the vcluster's pods into the host namespace.
    c.wait_for(Duration::from_secs(30), "2 synced pods", || {
        pod_count(c, &ns, "vcluster.loft.sh/managed-by=dev") == 2
    })
    .unwrap();
    let names =
        kubectl_ok(c, &["get", "pods", "-n", &ns, "-l", "vcluster.loft.sh/managed-by=dev", "-o", "name"]);
    assert!(names.contains("pod/app-0-x-default-x-dev"), "{names}");

    // Asleep (StatefulSet at zero), the API server is gone for real.
    kubectl_ok(c, &["scale", "statefulset", "dev", "-n", &ns, "--replicas=0"]);
    c.wait_for(Duration::from_secs(30), "the vcluster API server to stop", || !vc.is_serving()).unwrap();
    let out = vkubectl(&["get", "namespaces", "--request-timeout=3s"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    // kubectl says either, depending on which of its requests met the
    // closed port first ("dial tcp …: connect: connection refused", or its
    // own "The connection to the server … was refused").
    assert!(err.contains("connection refused") || err.contains("was refused"), "{err}");

    // Awake again, it serves the same data.
    kubectl_ok(c, &["scale", "statefulset", "dev", "-n", &ns, "--replicas=1"]);
    vc.wait_serving(c, Duration::from_secs(60)).unwrap();
    let out = vkubectl(&["get", "namespace", "inside-vcluster", "-o", "name"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "namespace/inside-vcluster");
    assert_eq!(vc.starts(), 2);
}

#[test]
fn a_missing_testbed_binary_fails_with_the_install_command() {
    let empty = tempfile::tempdir().unwrap();
    let err = testbed::Bins::find_in(Some(empty.path())).unwrap_err().to_string();
    assert!(err.contains("hack/testbed.sh install"), "{err}");
    assert!(err.contains("kube-apiserver"), "the message names what is missing: {err}");
}

#[test]
fn folders_of_ended_test_runs_are_swept_and_live_ones_kept() {
    let folder = |owner: u32| {
        let dir = tempfile::Builder::new().prefix("dormant-testbed-").tempdir().unwrap().keep();
        std::fs::write(dir.join("owner.pid"), owner.to_string()).unwrap();
        dir
    };
    let mut ended = std::process::Command::new("true").spawn().unwrap();
    let ended_pid = ended.id();
    ended.wait().unwrap();
    let stale = folder(ended_pid);
    let live = folder(std::process::id());
    testbed::sweep_stale_folders();
    assert!(!stale.exists(), "{} outlived its test process", stale.display());
    assert!(live.exists(), "{} belongs to a running process", live.display());
    std::fs::remove_dir_all(live).unwrap();
}
