//! `make demo`, the README's command for dormant's main job, told to its
//! end on a real testbed: every step of its story must happen.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

// The example itself, so this test always runs the demo as it is now.
#[path = "../examples/demo.rs"]
#[allow(dead_code)]
mod demo;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_sleeps_everything_and_wakes_it_by_cli_by_kubectl_through_the_proxy_by_audit_and_by_schedule()
 {
    let told = demo::run(true).await.unwrap_or_else(|e| panic!("the demo failed: {e:#}"));
    let text = told.lines.join("\n");
    for said in [
        "vcluster/team-a/dev fell asleep (idle)",
        "vcluster/team-b/ci fell asleep (idle)",
        "namespace/shop fell asleep (idle)",
        "vcluster/team-c/qa fell asleep (idle)",
        "vcluster/team-a/dev is awake again",
        "namespace/shop woke on schedule",
        // kubectl's own output: the sleeping vcluster's namespaces.
        "(default, kube-node-lease, kube-public, kube-system)",
        "vcluster/team-b/ci woke because it was used",
        // alice's kubectl on the host, as its audit webhook reported it.
        "vcluster/team-c/qa woke",
        "(last activity by: alice",
    ] {
        assert!(text.contains(said), "the demo never said {said:?}; it said:\n{text}");
    }
    // The closing status table: shop, woken last, is awake.
    let row = told.table.lines().find(|l| l.starts_with("namespace/shop")).unwrap_or_else(|| {
        panic!("no row for namespace/shop in:\n{}", told.table);
    });
    assert!(row.split_whitespace().nth(2) == Some("awake"), "{}", told.table);
}
