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
        "vcluster/team-a/dev is awake again: 4 pods running",
        "namespace/shop woke on schedule: 4 pods running",
        // kubectl's own output: the sleeping vcluster's namespaces.
        "(default, kube-node-lease, kube-public, kube-system)",
        "vcluster/team-b/ci woke because it was used: ",
        // alice's kubectl on the host, as its audit webhook reported it.
        "vcluster/team-c/qa woke",
        "(last activity by: alice",
    ] {
        assert!(text.contains(said), "the demo never said {said:?}; it said:\n{text}");
    }
    // What happened, as the cluster recorded it: each target woke once,
    // by the trigger the story used, and its pods were running again.
    let wake = |target: &str| {
        told.wakes.iter().find(|w| w.target == target).unwrap_or_else(|| {
            panic!("no wake of {target} recorded: {:#?}", told.wakes);
        })
    };
    let synced = |vc: &str, n: usize| {
        let mut want: Vec<String> = vec![format!("{vc}-0")];
        want.extend((0..n).map(|_| format!("-x-default-x-{vc}")));
        want
    };
    for (target, action, says, pods) in [
        ("vcluster/team-a/dev", "WokeManual", "woken by hand", synced("dev", 3)),
        // A real vcluster: its control plane back (its synced CoreDNS pod
        // may follow, see the demo).
        ("vcluster/team-b/ci", "WokeRequest", "(proxy)", vec!["ci-0".to_string()]),
        ("vcluster/team-c/qa", "WokeRequest", "alice", synced("qa", 1)),
        (
            "namespace/shop",
            "WokeSchedule",
            "wake schedule \"",
            vec!["web-".into(), "web-".into(), "web-".into(), "db-0".into()],
        ),
    ] {
        let w = wake(target);
        assert!(
            w.woke.len() == 1 && w.woke[0].starts_with(&format!("{action}: ")) && w.woke[0].contains(says),
            "{target} did not wake once by {action} ({says}): {w:#?}"
        );
        // The pods back: one for each wanted name (a prefix for pods of a
        // Deployment, a suffix for a vcluster's synced ones).
        let mut left = w.pods.clone();
        for p in &pods {
            let i = left.iter().position(|name| name.starts_with(p.as_str()) || name.ends_with(p.as_str()));
            assert!(i.is_some(), "{target}: no running pod {p:?} after the wake: {w:#?}");
            left.remove(i.unwrap());
        }
        left.retain(|p| !(target == "vcluster/team-b/ci" && p.ends_with("-x-kube-system-x-ci")));
        assert!(left.is_empty(), "{target}: pods nobody wanted: {left:?}");
    }
    assert!(wake("vcluster/team-c/qa").woke[0].contains("(audit)"), "{:#?}", told.wakes);
    // The closing status table: shop, woken last, is awake.
    let row = told.table.lines().find(|l| l.starts_with("namespace/shop")).unwrap_or_else(|| {
        panic!("no row for namespace/shop in:\n{}", told.table);
    });
    assert!(row.split_whitespace().nth(2) == Some("awake"), "{}", told.table);
}
