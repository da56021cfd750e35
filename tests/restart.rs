//! kube-apiserver killed and started again under a working agent. A test
//! binary of its own: restarting the shared cluster's API server would cut
//! every other test's requests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use support::*;
use testbed::Cluster;
use testbed::vcluster::{VCluster, VClusterOptions};

/// Each Deployment's replica count in `ns`.
fn replica_counts(c: &Cluster, ns: &str) -> BTreeMap<String, String> {
    kubectl(
        c,
        &[
            "get",
            "deployments",
            "-n",
            ns,
            "-o",
            "jsonpath={range .items[*]}{.metadata.name}={.spec.replicas}{\"\\n\"}{end}",
        ],
    )
    .lines()
    .filter_map(|l| l.split_once('='))
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// kube-apiserver is SIGKILLed while 20 requests wait in the proxy's wake
/// gate for a vcluster and a namespace's sleep is half done, and comes back
/// once the leader's Lease (4 s) has run out: the leader stops acting
/// before that, by its own clock, and a replica leads again after. Every
/// held request gets the vcluster's answer (the wake is asked for again
/// once the API server is back), never a dropped connection nor an error;
/// a request for another sleeping vcluster while it is down, whose Secret
/// was never read, is told to retry (503, `Retry-After`) and wakes
/// nothing; the audit webhook takes a report while it is down and the use
/// is written once it is back; the agent finishes the sleep by itself, and
/// the wake restores every replica count exactly.
#[test]
fn a_restarting_api_server_loses_no_held_request_and_no_replica_count() {
    let c = Cluster::shared();
    let id = test_id("restart");
    let ns = c.namespace("restart-app", &[("dormant-test", &id)]).unwrap();
    let vc_ns = c.namespace("restart-vc", &[("dormant-test", &id)]).unwrap();
    // Awake, and used while the API server is down (reported to the
    // webhook, written once it is back).
    let used = c.namespace("restart-used", &[("dormant-test", &id)]).unwrap();
    kubectl(c, &["annotate", "namespace", &used, "dormant.dev/sleep-after=1h"]);
    let mut yaml = String::new();
    for i in 1..=8 {
        yaml.push_str(&deployment_yaml(&ns, &format!("app{i}"), i));
    }
    c.kubectl_apply(&c.admin, &yaml).unwrap();
    kubectl(c, &["annotate", "namespace", &ns, "dormant.dev/sleep-after=1h"]);
    let before = replica_counts(c, &ns);
    assert_eq!(before.len(), 8, "{before:?}");
    // Two vclusters idle for an hour: one woken through the held requests,
    // one asked for while the API server is down.
    let vcluster = |name: &str| {
        let annotations = vec![("dormant.dev/sleep-after".into(), "1h".into())];
        let vc =
            VCluster::create(c, &vc_ns, name, VClusterOptions { annotations, ..Default::default() }).unwrap();
        vc.wait_serving(c, Duration::from_secs(60)).unwrap();
        vc
    };
    let (vc, ops) = (vcluster("dev"), vcluster("ops"));
    let port = testbed::process::free_port().unwrap();
    let audit_port = testbed::process::free_port().unwrap();
    let token_file = c.dir.join(format!("{id}-tokens"));
    std::fs::write(&token_file, "restart-token /audit/host\n").unwrap();
    let flags = [
        format!("--audit-addr=127.0.0.1:{audit_port}"),
        format!("--audit-cert={}", c.dir.join("apiserver.crt").display()),
        format!("--audit-key={}", c.dir.join("apiserver.key").display()),
        format!("--audit-token-file={}", token_file.display()),
        format!("--proxy-addr=127.0.0.1:{port}"),
        format!("--proxy-cert={}", c.dir.join("apiserver.crt").display()),
        format!("--proxy-key={}", c.dir.join("apiserver.key").display()),
        // Slow enough that the restart lands in the middle of the sleep.
        "--qps=2".into(),
        "--burst=1".into(),
        // A Lease that runs out while the API server is down.
        "--lease-duration=4s".into(),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let agent = Agent::start(c, &id, &format!("{id}-system"), "replica-a", &flags);
    wait_until("replica-a to lead", Duration::from_secs(30), || {
        agent.get("/metrics").contains("dormant_leader 1")
    });
    let standby = Agent::start(c, &id, &format!("{id}-system"), "replica-b", &["--lease-duration=4s"]);
    let proxy = format!("https://127.0.0.1:{port}");
    for name in ["dev", "ops"] {
        let out = dormant(c, &["sleep", &format!("vcluster/{vc_ns}/{name}"), "--wait=60s"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    wait_until("the vclusters' API servers to stop", Duration::from_secs(30), || {
        !vc.is_serving() && !ops.is_serving()
    });

    let out = dormant(c, &["sleep", &format!("namespace/{ns}")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_until("the sleep to be half done", Duration::from_secs(30), || {
        replica_counts(c, &ns).values().any(|r| r == "0")
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    let admin = c.ca.client("kube:admin", &["system:masters"]).unwrap();
    let path = format!("/vcluster/{vc_ns}/dev/api/v1/namespaces/default");
    let held: Vec<_> = (0..20)
        .map(|_| {
            let (proxy, path, admin) = (proxy.clone(), path.clone(), admin.clone());
            rt.spawn(async move { raw_request(&proxy, &path, Some(&admin), &[]).await })
        })
        .collect();
    wait_until("20 requests held in the wake gate", Duration::from_secs(10), || {
        agent.metric("dormant_proxy_waiting_requests") == 20.0
    });
    let half = replica_counts(c, &ns);
    assert!(half.values().any(|r| r != "0"), "the sleep was done before the restart: {half:?}");
    c.kill_apiserver().unwrap();
    // The leader cannot renew its Lease: it stops acting by its own clock
    // before the Lease runs out, while nobody else can have taken it yet.
    wait_until("replica-a to step down with the API server down", Duration::from_secs(8), || {
        agent.get("/metrics").contains("dormant_leader 0")
    });
    assert!(standby.get("/metrics").contains("dormant_leader 0"), "replica-b leads with no API server");
    // While it is down, a request for another sleeping vcluster cannot get
    // its wake recorded: told to retry, nothing changed.
    let ops_path = format!("/vcluster/{vc_ns}/ops/api/v1/namespaces/default");
    let (code, raw) = rt.block_on(raw_request(&proxy, &ops_path, Some(&admin), &[]));
    assert!(code == 503 && raw.to_ascii_lowercase().contains("\r\nretry-after: 5"), "{raw}");
    assert!(raw.contains("did not answer dormant"), "{raw}");
    // The webhook needs no API server to take a report.
    let batch = format!(
        r#"{{"kind":"EventList","apiVersion":"audit.k8s.io/v1","items":[{}]}}"#,
        audit_event(&used, "during-the-outage")
    );
    assert_eq!(rt.block_on(post_audit_host(audit_port, "restart-token", batch)), 200);
    c.start_apiserver().unwrap();
    wait_until("a replica to lead again", Duration::from_secs(30), || {
        agent.get("/metrics").contains("dormant_leader 1")
            || standby.get("/metrics").contains("dormant_leader 1")
    });

    let answers: Vec<(u16, String)> = rt.block_on(async {
        let mut out = Vec::new();
        for t in held {
            out.push(t.await.unwrap());
        }
        out
    });
    // The outage (about 5 s) is far shorter than the wake timeout: the
    // wake is asked for again once the API server is back, and every held
    // request gets the vcluster's answer.
    for (code, raw) in &answers {
        assert_eq!(*code, 200, "a held request got {code}: {raw}");
    }

    // The sleep finishes by itself; a wake restores every count.
    wait_state(c, "namespace", &ns, None, "asleep", Duration::from_secs(120), &agent);
    assert!(replica_counts(c, &ns).values().all(|r| r == "0"), "{:?}", replica_counts(c, &ns));
    let out = dormant(c, &["wake", &format!("namespace/{ns}"), "--wait=120s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(replica_counts(c, &ns), before);
    // The vcluster serves through the proxy again.
    let (code, raw) = rt.block_on(raw_request(&proxy, &path, Some(&admin), &[]));
    assert_eq!(code, 200, "{raw}");
    wait_state(c, "statefulset", "dev", Some(&vc_ns), "awake", Duration::from_secs(60), &agent);
    // The use reported during the outage is written, now that it can be.
    wait_until("the use reported during the outage to be written", Duration::from_secs(60), || {
        annotation(c, "namespace", &used, None, "dormant.dev/last-activity-by")
            .starts_with("during-the-outage ")
    });
    // The one refused during the outage was not woken.
    assert_eq!(jsonpath(c, "statefulset", "ops", Some(&vc_ns), "{.spec.replicas}"), "0");
    assert_eq!(state(c, "statefulset", "ops", Some(&vc_ns)), "asleep");
}
