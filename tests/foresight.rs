//! Predictive pre-wake on the real testbed: the running agent wakes a
//! target ahead of the first use its activity profile predicts, says so in
//! an Event, `explain` and the metrics, and `dormant simulate` lists that
//! wake before it happens. The profile is seeded as the flusher would have
//! written it over the past eight weeks, with a first use on the same
//! weekday at a time a minute or two from now: no clock is compressed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use chrono::{DurationRound, SecondsFormat, Utc};
use support::*;
use testbed::Cluster;

fn metric(agent: &Agent, line_start: &str) -> Option<f64> {
    agent.get("/metrics").lines().find(|l| l.starts_with(line_start))?.rsplit(' ').next()?.parse().ok()
}

#[test]
fn a_target_is_woken_ahead_of_its_predicted_first_use_and_says_why() {
    let c = Cluster::shared();
    let id = test_id("foresight");
    install_crd(c);
    let ns = c.namespace("rhythm", &[("dormant-test", &id)]).unwrap();
    c.kubectl_apply(&c.admin, &deployment_yaml(&ns, "web", 2)).unwrap();
    wait_until("web ready", Duration::from_secs(60), || ready_pods(c, &ns, "app=web") == 2);
    let policy = format!("{id}-predictive");
    c.kubectl_apply(
        &c.admin,
        &format!(
            "apiVersion: dormant.dev/v1alpha1\nkind: SleepPolicy\nmetadata: {{name: {policy}}}\nspec:\n  \
             selector: {{namespaceSelector: {{matchLabels: {{dormant-test: {id}}}}}}}\n  timezone: UTC\n  \
             sleepAfter: 10m\n  wake:\n    predictive: {{lead: 1m, confidence: 0.8}}\n"
        ),
    )
    .unwrap();
    let agent = Agent::start(c, &id, &format!("{id}-system"), "a1", &[]);
    let out = dormant(c, &["sleep", &format!("namespace/{ns}"), "--wait=60s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(ready_pods(c, &ns, "app=web"), 0);

    // Eight weeks of the same weekday with a first use at `first` (whole
    // minutes, 90 to 150 s from now), then an hour of use.
    let first =
        (Utc::now() + chrono::Duration::seconds(150)).duration_trunc(chrono::Duration::minutes(1)).unwrap();
    let pre_wake = first - chrono::Duration::minutes(1);
    let uses: Vec<(chrono::DateTime<Utc>, u64)> = (1..=8)
        .flat_map(|week| {
            let day = first - chrono::Duration::weeks(week);
            (0..6).map(move |k| (day + chrono::Duration::minutes(10 * k), 3))
        })
        .collect();
    let profile = dormant::foresight::profile::record(None, &uses, &[], chrono_tz::UTC, Utc::now());
    kubectl(
        c,
        &["annotate", "--overwrite", "namespace", &ns, &format!("dormant.dev/activity-profile={profile}")],
    );

    // Before it happens: simulate and explain name the coming pre-wake.
    let out = dormant(c, &["simulate", &format!("namespace/{ns}"), "--days=1", "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let sim: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let transitions = &sim[0]["runs"][0]["transitions"];
    assert_eq!(sim[0]["baseline"], policy.as_str());
    assert_eq!(transitions[0]["to"], "awake", "{sim:#}");
    assert_eq!(transitions[0]["trigger"], "predicted", "{sim:#}");
    let simulated_at: chrono::DateTime<Utc> = transitions[0]["at"].as_str().unwrap().parse().unwrap();
    assert_eq!(simulated_at, pre_wake);
    let out = dormant(c, &["explain", &format!("namespace/{ns}")]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains(&format!("Pre-wake: today at {} UTC", pre_wake.format("%H:%M"))), "{text}");
    assert!(text.contains("Rhythm:"), "{text}");
    assert_eq!(state(c, "namespace", &ns, None), "asleep", "nothing wakes it before the pre-wake");

    // The agent wakes it between the pre-wake and the predicted first use.
    let start = std::time::Instant::now();
    loop {
        if state(c, "namespace", &ns, None) == "awake" && ready_pods(c, &ns, "app=web") == 2 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(200), "not awake; agent log:\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(250));
    }
    let woke = Utc::now();
    assert!(woke >= pre_wake && woke < first, "awake at {woke}, pre-wake {pre_wake}, first use {first}");
    let notes = event_notes(c, &ns, "Woke");
    let predicted = first.to_rfc3339_opts(SecondsFormat::Millis, true);
    assert!(notes.contains(&format!("woken ahead of its predicted first use at {predicted}")), "{notes}");
    let prewakes = r#"dormant_prewakes_total{kind="namespace"}"#;
    wait_until("the pre-wake counted", Duration::from_secs(10), || metric(&agent, prewakes) == Some(1.0));

    // Someone comes: the pre-wake was used, a cold start avoided, and what
    // it cost is counted.
    let now = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
    kubectl(
        c,
        &[
            "annotate",
            "--overwrite",
            "namespace",
            &ns,
            &format!("dormant.dev/last-activity={now}"),
            "dormant.dev/last-activity-by=alice list pods (audit)",
        ],
    );
    let used = r#"dormant_prewake_outcomes_total{kind="namespace",outcome="used"}"#;
    wait_until("the pre-wake counted as used", Duration::from_secs(20), || metric(&agent, used) == Some(1.0));
    let hours = metric(&agent, r#"dormant_prewake_awake_hours_total{kind="namespace"}"#).unwrap();
    assert!(hours > 0.0 && hours < 0.1, "{hours}");
}
