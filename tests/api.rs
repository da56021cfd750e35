//! The agent's API through the CLI and by hand, against the real testbed:
//! people use their own credentials (a token, a client certificate, an
//! auth proxy's headers), RBAC on `targets.dormant.dev` decides what they
//! see and do, every action is recorded with who did it, and explain shows
//! the agent's own settings.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod self_service;
mod support;

use std::time::Duration;

use self_service::*;
use support::*;
use testbed::Cluster;

#[test]
fn alice_with_a_token_and_edit_in_team_a_sees_sleeps_and_wakes_only_her_targets() {
    let c = Cluster::shared();
    let w = World::start("api-token", &[]);
    let (a, b) = (w.team_namespace("team-a"), w.team_namespace("team-b"));
    let (alice, kubeconfig, token) = token_user(c, &a, "alice");
    // Kubernetes' own `edit`, which the chart's operator role joins.
    bind(c, &a, "edit", &alice);

    // `--context`, as kubectl has it: the current context has no
    // credentials, alice's is chosen by name.
    let two = c.dir.join(format!("{}-two-contexts.kubeconfig", w.id));
    std::fs::write(
        &two,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: t\n  cluster: {{server: \"{}\", certificate-authority: \"{}\"}}\nusers:\n- name: nobody\n  user: {{}}\n- name: alice\n  user: {{token: {token}}}\ncontexts:\n- name: nobody\n  context: {{cluster: t, user: nobody}}\n- name: alice\n  context: {{cluster: t, user: alice}}\ncurrent-context: nobody\n",
            c.server,
            c.ca_file.display()
        ),
    )
    .unwrap();
    let out = w.cli(&two, &["status"]);
    assert!(!out.status.success() && text(&out).1.contains("no credentials"), "{}", text(&out).1);
    let out = w.cli(&two, &["status", "--context", "alice"]);
    assert!(out.status.success(), "{}", text(&out).1);
    assert!(text(&out).0.contains(&format!("namespace/{a}")), "{}", text(&out).0);

    // The CLI finds the agent from what is published in kube-public.
    let out = w.cli_published(&kubeconfig, &["status"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}\n{}", w.agent.log());
    assert!(stdout.contains(&format!("namespace/{a}")), "{stdout}");
    assert!(!stdout.contains(&format!("namespace/{b}")), "alice sees team-b's target:\n{stdout}");

    let manual = |direction: &str| {
        metric(
            &w.agent,
            &format!(
                "dormant_transitions_total{{kind=\"namespace\",direction=\"{direction}\",trigger=\"manual\"}}"
            ),
        )
    };
    let (slept_before, woke_before) = (manual("sleep"), manual("wake"));
    let out = w.cli_published(&kubeconfig, &["sleep", &format!("namespace/{a}"), "--wait=60s"]);
    assert!(out.status.success(), "{}\n{}", text(&out).1, w.agent.log());
    assert!(text(&out).0.contains(&format!("sleep requested by {alice}")), "{}", text(&out).0);
    assert_eq!(jsonpath(c, "deployment", "web", Some(&a), "{.spec.replicas}"), "0");
    assert!(
        event_notes(c, &a, "SleepRequested").contains(&format!("{alice} (groups")),
        "the Event names her"
    );

    let out = w.cli_published(&kubeconfig, &["wake", &format!("namespace/{a}"), "--wait=60s"]);
    assert!(out.status.success(), "{}\n{}", text(&out).1, w.agent.log());
    assert_eq!(jsonpath(c, "deployment", "web", Some(&a), "{.spec.replicas}"), "1");
    assert_eq!(ready_pods(c, &a, "app=web"), 1, "--wait waits until the workloads are ready");
    let notes = event_notes(c, &a, "WakeRequested");
    assert!(notes.contains(&alice) && notes.contains("dormant's API"), "{notes}");
    assert_eq!(
        annotation(c, "namespace", &a, None, "dormant.dev/last-activity-by"),
        format!("{alice} wake namespace/{a} (api)")
    );
    wait_until("the manual transitions to be counted", Duration::from_secs(10), || {
        manual("sleep") > slept_before && manual("wake") > woke_before
    });

    // team-b: refused, saying who may not do what and what grants it.
    for args in [vec!["sleep", &*format!("namespace/{b}")], vec!["explain", &*format!("namespace/{b}")]] {
        let out = w.cli(&kubeconfig, &args);
        let stderr = text(&out).1;
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains("403 Forbidden") && stderr.contains(&format!("{alice} may not")), "{stderr}");
        assert!(
            stderr.contains("targets.dormant.dev") && stderr.contains("ClusterRole dormant-"),
            "{stderr}"
        );
    }
    assert_eq!(jsonpath(c, "deployment", "web", Some(&b), "{.spec.replicas}"), "1");
}

#[test]
fn a_client_certificate_user_works_and_refusals_say_what_is_missing() {
    let c = Cluster::shared();
    let w = World::start("api-cert", &[]);
    let a = w.team_namespace("team-a");
    let carol = c.user(&format!("carol-{}", w.id), &["team-c"]).unwrap();
    bind(c, &a, "dormant-operator", &carol.name);

    let out = w.cli(&carol.kubeconfig, &["status", "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out).1);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 1, "{rows}");
    assert_eq!(rows[0]["target"], format!("namespace/{a}"));
    for (verb, replicas) in [("sleep", "0"), ("wake", "1")] {
        let out = w.cli(&carol.kubeconfig, &[verb, &format!("namespace/{a}"), "--wait=60s"]);
        assert!(out.status.success(), "{verb}: {}\n{}", text(&out).1, w.agent.log());
        assert_eq!(jsonpath(c, "deployment", "web", Some(&a), "{.spec.replicas}"), replicas);
    }

    // No credentials at all.
    let nobody = c.dir.join(format!("{}-nobody.kubeconfig", w.id));
    std::fs::write(&nobody, token_kubeconfig(&c.server, &c.ca_file, None)).unwrap();
    let out = w.cli(&nobody, &["status"]);
    let stderr = text(&out).1;
    assert!(!out.status.success());
    assert!(stderr.contains("401 Unauthorized") && stderr.contains("no credentials"), "{stderr}");
    // A token the cluster does not accept.
    let forged = c.dir.join(format!("{}-forged.kubeconfig", w.id));
    std::fs::write(&forged, token_kubeconfig(&c.server, &c.ca_file, Some("not-a-real-token"))).unwrap();
    let stderr = text(&w.cli(&forged, &["status"])).1;
    assert!(
        stderr.contains("401 Unauthorized") && stderr.contains("did not accept the bearer token"),
        "{stderr}"
    );

    // bob may do nothing here: he sees nothing, and may not act.
    let bob = c.user("bob", &["team-b"]).unwrap();
    let out = w.cli(&bob.kubeconfig, &["status"]);
    assert!(out.status.success(), "{}", text(&out).1);
    assert!(!text(&out).0.contains(&a), "{}", text(&out).0);
    let out = w.cli(&bob.kubeconfig, &["wake", &format!("namespace/{a}")]);
    let stderr = text(&out).1;
    assert!(!out.status.success());
    assert!(stderr.contains("403 Forbidden") && stderr.contains("bob may not wake"), "{stderr}");
    // The same answer whether or not the target exists.
    let ghost = text(&w.cli(&bob.kubeconfig, &["wake", &format!("namespace/{a}-ghost")])).1;
    assert_eq!(
        ghost.replace(&format!("{a}-ghost"), "X"),
        stderr.replace(&a, "X"),
        "a 403 must not tell a missing target from a real one"
    );
    // Someone who may see it learns that a missing one is missing.
    let missing = text(&w.cli(&c.admin.kubeconfig, &["explain", &format!("namespace/{a}-ghost")])).1;
    assert!(missing.contains("404 NotFound"), "{missing}");
}

#[test]
fn explain_shows_the_agents_default_sleep_after_and_says_it_comes_from_the_agents_settings() {
    let c = Cluster::shared();
    let w = World::start("api-explain", &["--default-sleep-after=1h"]);
    let ns = c.namespace("explain", &[("dormant-test", &w.id)]).unwrap();
    // A target by its time zone; nothing says when it sleeps.
    kubectl(c, &["annotate", "namespace", &ns, "dormant.dev/timezone=UTC"]);
    wait_until("the agent to see it", Duration::from_secs(20), || {
        text(&w.cli(&c.admin.kubeconfig, &["status"])).0.contains(&ns)
    });
    let out = w.cli(&c.admin.kubeconfig, &["explain", &format!("namespace/{ns}")]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let line = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("sleepAfter"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(line.contains(" 1h ") && line.ends_with("(from agent setting --default-sleep-after)"), "{line}");
    assert!(stdout.contains("Next:     asleep at"), "it sleeps in an hour:\n{stdout}");
    let tz = stdout.lines().find(|l| l.trim_start().starts_with("timezone")).unwrap();
    assert!(tz.ends_with("(from annotation dormant.dev/timezone)"), "{tz}");
    assert!(stdout.contains("Agent:    --default-sleep-after 1h"), "{stdout}");
}

/// An agent started with `--vcluster-platform-annotations` reads a team's
/// existing vCluster Platform settings: a namespace with only
/// `sleepmode.loft.sh/*` annotations is a target, `explain` names those
/// keys as the sources, dormant's own annotation wins where both are set,
/// a Platform-excluded workload keeps running through a sleep, and a bad
/// value leaves the target alone and says which key. Without the flag
/// (the CLI's direct mode reads with the built-in settings) the same
/// namespace is no target at all.
#[test]
fn with_the_platform_flag_the_agent_reads_sleepmode_loft_sh_settings_under_its_own() {
    let c = Cluster::shared();
    let w = World::start("api-loft", &["--vcluster-platform-annotations"]);
    let ns = |prefix: &str, annotations: &[&str]| {
        let ns = c.namespace(prefix, &[("dormant-test", &w.id)]).unwrap();
        let mut args = vec!["annotate", "namespace", ns.as_str()];
        args.extend_from_slice(annotations);
        kubectl(c, &args);
        ns
    };
    let platform = ns("loft", &["sleepmode.loft.sh/sleep-after=3600", "sleepmode.loft.sh/timezone=CET#3600"]);
    let both = ns("loft-both", &["sleepmode.loft.sh/sleep-after=60", "dormant.dev/sleep-after=2h"]);
    let bad = ns("loft-bad", &["sleepmode.loft.sh/sleep-after=an hour"]);
    c.kubectl_apply(&c.admin, &deployment_yaml(&platform, "web", 1)).unwrap();
    c.kubectl_apply(&c.admin, &deployment_yaml(&platform, "keep", 1)).unwrap();
    kubectl(c, &["annotate", "deployment", "keep", "-n", &platform, "sleepmode.loft.sh/exclude=true"]);
    wait_until("web and keep ready", Duration::from_secs(60), || {
        ready_pods(c, &platform, "app=web") == 1 && ready_pods(c, &platform, "app=keep") == 1
    });
    wait_until("the agent to see all three", Duration::from_secs(20), || {
        let status = text(&w.cli(&c.admin.kubeconfig, &["status"])).0;
        [&platform, &both, &bad].iter().all(|n| status.contains(n.as_str()))
    });
    // Read with the built-in settings, the Platform's annotations make no
    // target (a namespace outside this agent's scope, which would write its
    // own `first-seen` on it: the direct mode reads no agent's settings).
    let unread = c.namespace("loft-unread", &[]).unwrap();
    kubectl(c, &["annotate", "namespace", &unread, "sleepmode.loft.sh/sleep-after=3600"]);
    let direct = dormant(c, &["status"]);
    let listed = String::from_utf8_lossy(&direct.stdout).into_owned();
    assert!(direct.status.success() && listed.contains(&both), "{listed}");
    assert!(!listed.contains(&format!("namespace/{unread} ")), "{listed}");
    let explain = |ns: &str| {
        let out = w.cli(&c.admin.kubeconfig, &["explain", &format!("namespace/{ns}")]);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{stderr}");
        stdout
    };
    let line = |text: &str, field: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(field))
            .unwrap_or_else(|| panic!("no {field} in:\n{text}"))
            .to_string()
    };
    let got = explain(&platform);
    let after = line(&got, "sleepAfter");
    assert!(
        after.contains(" 1h ") && after.ends_with("(from annotation sleepmode.loft.sh/sleep-after)"),
        "{after}"
    );
    let tz = line(&got, "timezone");
    assert!(tz.contains("GMT-1") && tz.ends_with("(from annotation sleepmode.loft.sh/timezone)"), "{tz}");
    let got = explain(&both);
    let after = line(&got, "sleepAfter");
    assert!(
        after.contains(" 2h ") && after.ends_with("(from annotation dormant.dev/sleep-after)"),
        "{after}"
    );
    let got = explain(&bad);
    assert!(
        got.contains("State:    invalid")
            && got.contains("Problem:  annotation sleepmode.loft.sh/sleep-after=\"an hour\"")
            && got.contains("whole number of seconds"),
        "{got}"
    );

    // The Platform's exclude keeps `keep` up while its namespace sleeps.
    let out = w.cli(&c.admin.kubeconfig, &["sleep", &format!("namespace/{platform}"), "--wait=60s"]);
    assert!(out.status.success(), "{}", text(&out).1);
    let replicas = |name: &str| {
        kubectl(c, &["get", "deployment", name, "-n", &platform, "-o", "jsonpath={.spec.replicas}"])
    };
    assert_eq!((replicas("web"), replicas("keep")), ("0".to_string(), "1".to_string()));
    let out = w.cli(&c.admin.kubeconfig, &["wake", &format!("namespace/{platform}"), "--wait=60s"]);
    assert!(out.status.success(), "{}", text(&out).1);
    assert_eq!((replicas("web"), replicas("keep")), ("1".to_string(), "1".to_string()));
}

/// With `--vcluster-yaml`, a vcluster's own `vcluster.yaml` sleep settings
/// (in its `vc-config-<name>` Secret) apply under the annotations, field by
/// field, and a bad one leaves the vcluster alone and says why.
#[test]
fn with_vcluster_yaml_a_vclusters_own_sleep_settings_apply_under_the_annotations() {
    let c = Cluster::shared();
    let w = World::start("api-vc-yaml", &["--vcluster-platform-annotations", "--vcluster-yaml"]);
    let ns = c.namespace("vc-yaml", &[("dormant-test", &w.id)]).unwrap();
    let vcluster = |name: &str, annotations: &str, config: &str| {
        format!(
            "apiVersion: apps/v1\nkind: StatefulSet\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels: {{app: vcluster, release: {name}}}\n  annotations: {{{annotations}}}\nspec:\n  replicas: 1\n  serviceName: {name}\n  selector: {{matchLabels: {{app: vcluster, release: {name}}}}}\n  template:\n    metadata: {{labels: {{app: vcluster, release: {name}}}}}\n    spec: {{containers: [{{name: syncer, image: loftsh/vcluster:0.30.0}}]}}\n---\napiVersion: v1\nkind: Secret\nmetadata: {{name: vc-config-{name}, namespace: {ns}}}\nstringData:\n  config.yaml: |\n{config}"
        )
    };
    let good = "    sleepMode:\n      enabled: true\n      timeZone: Asia/Tokyo\n      autoSleep:\n        afterInactivity: 2h\n";
    let bad = "    sleepMode:\n      enabled: true\n      autoSleep:\n        afterInactivity: soon\n";
    c.kubectl_apply(&c.admin, &vcluster("dev", "sleepmode.loft.sh/sleep-after: \"1800\"", good)).unwrap();
    c.kubectl_apply(&c.admin, &vcluster("plain", "", good)).unwrap();
    c.kubectl_apply(&c.admin, &vcluster("broken", "", bad)).unwrap();
    let explain = |name: &str| {
        let out = w.cli(&c.admin.kubeconfig, &["explain", &format!("vcluster/{ns}/{name}")]);
        text(&out).0
    };
    let line = |text: &str, field: &str| {
        text.lines().find(|l| l.trim_start().starts_with(field)).unwrap_or_default().to_string()
    };
    // Read every 30 s: the first read is at the agent's start.
    wait_until("the vcluster.yaml settings", Duration::from_secs(90), || {
        line(&explain("plain"), "sleepAfter").contains(" 2h ")
    });
    let plain = explain("plain");
    assert!(
        line(&plain, "sleepAfter").ends_with("(from vcluster.yaml sleepMode.autoSleep.afterInactivity)"),
        "{plain}"
    );
    let dev = explain("dev");
    assert!(
        line(&dev, "sleepAfter").contains(" 30m ")
            && line(&dev, "sleepAfter").ends_with("(from annotation sleepmode.loft.sh/sleep-after)"),
        "the annotation wins: {dev}"
    );
    assert!(
        line(&dev, "timezone").contains("Asia/Tokyo")
            && line(&dev, "timezone").ends_with("(from vcluster.yaml sleepMode.timeZone)"),
        "the rest still comes from vcluster.yaml: {dev}"
    );
    let broken = explain("broken");
    assert!(
        broken.contains("State:    invalid") && broken.contains("sleepMode.autoSleep.afterInactivity"),
        "{broken}"
    );
}

/// Without the agent's flag, a SleepPolicy's `vclusterPlatformAnnotations`
/// reads the Platform's settings on the targets it governs, and only there.
#[test]
fn a_policy_can_read_sleepmode_loft_sh_settings_for_its_own_targets() {
    let c = Cluster::shared();
    let w = World::start("api-loft-policy", &[]);
    let (reads, plain) = (format!("{}-reads", w.id), format!("{}-plain", w.id));
    c.kubectl_apply(
        &c.admin,
        &format!(
            "apiVersion: dormant.dev/v1alpha1\nkind: SleepPolicy\nmetadata: {{name: {reads}}}\nspec:\n  selector: {{namespaceSelector: {{matchLabels: {{loft-policy: {reads}}}}}}}\n  sleepAfter: 4h\n  vclusterPlatformAnnotations: true\n---\napiVersion: dormant.dev/v1alpha1\nkind: SleepPolicy\nmetadata: {{name: {plain}}}\nspec:\n  selector: {{namespaceSelector: {{matchLabels: {{loft-policy: {plain}}}}}}}\n  sleepAfter: 4h\n"
        ),
    )
    .unwrap();
    let ns = |policy: &str| {
        let ns = c.namespace("loft-pol", &[("dormant-test", &w.id), ("loft-policy", policy)]).unwrap();
        kubectl(c, &["annotate", "namespace", &ns, "sleepmode.loft.sh/sleep-after=3600"]);
        c.kubectl_apply(&c.admin, &deployment_yaml(&ns, "web", 1)).unwrap();
        c.kubectl_apply(&c.admin, &deployment_yaml(&ns, "keep", 1)).unwrap();
        kubectl(c, &["annotate", "deployment", "keep", "-n", &ns, "sleepmode.loft.sh/exclude=true"]);
        ns
    };
    let (read, unread) = (ns(&reads), ns(&plain));
    let sleep_after = |ns: &str| {
        let out = w.cli(&c.admin.kubeconfig, &["explain", &format!("namespace/{ns}")]);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{stderr}");
        stdout.lines().find(|l| l.trim_start().starts_with("sleepAfter")).unwrap_or_default().to_string()
    };
    wait_until("the agent to see both", Duration::from_secs(30), || {
        sleep_after(&read).contains(" 1h ") && sleep_after(&unread).contains(" 4h ")
    });
    assert!(
        sleep_after(&read).ends_with("(from annotation sleepmode.loft.sh/sleep-after)"),
        "{}",
        sleep_after(&read)
    );
    assert!(
        sleep_after(&unread).ends_with(&format!("(from SleepPolicy {plain})")),
        "{}",
        sleep_after(&unread)
    );

    // The Platform's exclude counts where the policy reads it, only there.
    let replicas = |ns: &str, name: &str| {
        kubectl(c, &["get", "deployment", name, "-n", ns, "-o", "jsonpath={.spec.replicas}"])
    };
    for ns in [&read, &unread] {
        wait_until("web and keep ready", Duration::from_secs(60), || {
            ready_pods(c, ns, "app=web") == 1 && ready_pods(c, ns, "app=keep") == 1
        });
        let out = w.cli(&c.admin.kubeconfig, &["sleep", &format!("namespace/{ns}"), "--wait=60s"]);
        assert!(out.status.success(), "{}", text(&out).1);
    }
    assert_eq!((replicas(&read, "web"), replicas(&read, "keep")), ("0".to_string(), "1".to_string()));
    assert_eq!((replicas(&unread, "web"), replicas(&unread, "keep")), ("0".to_string(), "0".to_string()));
}

/// The Platform's forced sleep (`force`, `force-duration: 0`, as its CLI's
/// `sleep --prevent-wakeup 0` writes them) puts the namespace to sleep at
/// once, idle or not, and is taken over as dormant's own: the Platform's
/// keys are gone, so a manual wake ends it for good, as the Platform's own
/// wakeup does by deleting `force`.
#[test]
fn with_the_platform_flag_its_forced_sleep_is_taken_over_and_a_manual_wake_ends_it() {
    let c = Cluster::shared();
    let w = World::start("api-loft-force", &["--vcluster-platform-annotations"]);
    let ns = c.namespace("loft-force", &[("dormant-test", &w.id)]).unwrap();
    c.kubectl_apply(&c.admin, &deployment_yaml(&ns, "web", 2)).unwrap();
    wait_until("web ready", Duration::from_secs(60), || ready_pods(c, &ns, "app=web") == 2);
    let replicas = || kubectl(c, &["get", "deployment", "web", "-n", &ns, "-o", "jsonpath={.spec.replicas}"]);
    let ann = |key: &str| annotation(c, "namespace", &ns, None, key);
    // In use a moment ago: only the forced sleep puts it to sleep.
    kubectl(
        c,
        &[
            "annotate",
            "namespace",
            &ns,
            "dormant.dev/sleep-after=1h",
            &format!("dormant.dev/last-activity={}", chrono::Utc::now().to_rfc3339()),
            "sleepmode.loft.sh/force=true",
            "sleepmode.loft.sh/force-duration=0",
        ],
    );
    wait_until("the forced sleep", Duration::from_secs(60), || {
        state(c, "namespace", &ns, None) == "asleep" && replicas() == "0"
    });
    assert_eq!(
        (ann("sleepmode.loft.sh/force"), ann("sleepmode.loft.sh/force-duration")),
        (String::new(), String::new()),
        "the Platform's keys are taken over"
    );
    assert!(!ann("dormant.dev/force-sleep").is_empty(), "dormant's own force-sleep is written");
    assert_eq!(ann("dormant.dev/prevent-wakeup-until"), "never", "force-duration 0: until woken by hand");

    // Woken by hand: it stays awake.
    let out = w.cli(&c.admin.kubeconfig, &["wake", &format!("namespace/{ns}"), "--wait=60s"]);
    assert!(out.status.success(), "{}", text(&out).1);
    assert_eq!(replicas(), "2");
    // Long enough for several reconciles and activity flushes.
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!((state(c, "namespace", &ns, None), replicas()), ("awake".to_string(), "2".to_string()));
    assert_eq!(
        (ann("dormant.dev/force-sleep"), ann("dormant.dev/prevent-wakeup-until")),
        (String::new(), String::new()),
        "a manual wake ends the forced sleep"
    );
}

#[test]
fn an_auth_proxys_user_headers_count_only_on_its_own_certificate() {
    let c = Cluster::shared();
    let proxy_ca = testbed::pki::Ca::new("oauth2-proxy-ca").unwrap();
    let ca_file = c.dir.join(format!("{}-auth-proxy-ca.crt", test_id("ca")));
    std::fs::write(&ca_file, &proxy_ca.cert_pem).unwrap();
    let w = World::start(
        "api-proxy",
        &[&format!("--api-auth-proxy-ca={}", ca_file.display()), "--api-auth-proxy-names=oauth2-proxy"],
    );
    let whoami = |client: Option<&testbed::pki::CertPair>| {
        w.raw(
            client,
            &request(
                "GET",
                "/dormant/v1/whoami",
                &[("X-Forwarded-User", "alice@example.com"), ("X-Forwarded-Groups", "team-a,admins")],
                "",
            ),
        )
    };
    let oauth2_proxy = proxy_ca.client("oauth2-proxy", &[]).unwrap();
    let (code, answer) = whoami(Some(&oauth2_proxy));
    assert_eq!(code, 200, "{answer}");
    assert!(answer.contains(r#""user":"alice@example.com""#) && answer.contains("admins"), "{answer}");
    // The same headers from anyone else mean nothing.
    let (code, answer) = whoami(None);
    assert_eq!(code, 401, "{answer}");
    assert!(answer.contains("no credentials"), "{answer}");
    let (code, answer) = whoami(Some(&proxy_ca.client("mallory", &[]).unwrap()));
    assert_eq!(code, 401, "another name from the same CA: {answer}");
    let bob = c.user("bob", &["team-b"]).unwrap();
    let (code, answer) = whoami(Some(&bob.cert));
    assert_eq!(code, 200, "{answer}");
    assert!(answer.contains(r#""user":"bob""#) && !answer.contains("alice"), "{answer}");
}

#[test]
fn hand_made_requests_are_bounded_and_need_json_and_leak_nothing() {
    let c = Cluster::shared();
    let w = World::start("api-raw", &[]);
    let a = w.team_namespace("team-a");
    let admin = &c.admin.cert;
    let path = format!("/dormant/v1/targets/namespace/{a}/sleep");
    // An action sent as a form (what another site could make a browser send).
    let (code, answer) = w.raw(Some(admin), &request("POST", &path, &[("Content-Type", "text/plain")], "{}"));
    assert_eq!(code, 415, "{answer}");
    // A body too large (as it says up front: refused unread).
    let big = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"
    );
    let (code, answer) = w.raw(Some(admin), &big);
    assert_eq!(code, 413, "{answer}");
    // Unknown fields are refused, not ignored.
    let (code, answer) = w.raw(
        Some(admin),
        &request("POST", &path, &[("Content-Type", "application/json")], r#"{"replicas": 5}"#),
    );
    assert_eq!(code, 400, "{answer}");
    assert_eq!(jsonpath(c, "deployment", "web", Some(&a), "{.spec.replicas}"), "1", "nothing changed");
    // Every answer says: do not cache, do not sniff, do not frame.
    for header in ["cache-control: no-store", "x-content-type-options: nosniff", "x-frame-options: DENY"] {
        assert!(answer.to_ascii_lowercase().contains(&header.to_ascii_lowercase()), "{header}: {answer}");
    }
    // A route label is never what the caller wrote.
    let (code, answer) =
        w.raw(Some(admin), &request("GET", &format!("/dormant/v1/%3Cscript%3E/{a}"), &[], ""));
    assert_eq!(code, 404, "{answer}");
    let metrics = w.agent.get("/metrics");
    let api: Vec<&str> = metrics.lines().filter(|l| l.starts_with("dormant_api_requests_total{")).collect();
    assert!(!api.is_empty() && api.iter().all(|l| !l.contains("script") && !l.contains(&a)), "{api:?}");
}

#[test]
fn simulate_asks_the_agent_and_shows_only_what_the_caller_may_see() {
    let c = Cluster::shared();
    let w = World::start("api-simulate", &["--default-sleep-after=45m"]);
    let a = w.team_namespace("team-a");
    let b = w.team_namespace("team-b");
    // A target that only names its time zone: the agent's setting says
    // when it sleeps.
    let quiet = c.namespace("quiet", &[("dormant-test", &w.id)]).unwrap();
    kubectl(c, &["annotate", "namespace", &quiet, "dormant.dev/timezone=UTC"]);
    wait_until("the agent to see it", Duration::from_secs(20), || {
        text(&w.cli(&c.admin.kubeconfig, &["status"])).0.contains(&quiet)
    });
    let first_transition = |out: &std::process::Output| -> serde_json::Value {
        assert!(out.status.success(), "{}", text(out).1);
        let sim: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        sim[0]["runs"][0]["transitions"][0].clone()
    };
    let target = format!("namespace/{quiet}");
    let out = w.cli(&c.admin.kubeconfig, &["simulate", &target, "--days=1", "-o", "json"]);
    let t = first_transition(&out);
    assert_eq!((t["to"].as_str(), t["trigger"].as_str()), (Some("asleep"), Some("idle")), "{t:#}");
    let at: chrono::DateTime<chrono::Utc> = t["at"].as_str().unwrap().parse().unwrap();
    // 45 minutes after it was last used, or first seen if never.
    let since = ["dormant.dev/last-activity", "dormant.dev/first-seen"]
        .iter()
        .find_map(|k| {
            annotation(c, "namespace", &quiet, None, k).parse::<chrono::DateTime<chrono::Utc>>().ok()
        })
        .unwrap();
    assert_eq!(at, since + chrono::Duration::minutes(45), "{t:#}");
    // Reading the cluster alone, with the built-in defaults, it would
    // never sleep: what the agent says is what the agent does.
    let out = dormant(c, &["simulate", &target, "--days=1", "-o", "json"]);
    assert!(first_transition(&out).is_null(), "{}", text(&out).0);

    // A policy file beside the current policy, in the table people read.
    let file = c.dir.join(format!("{}-office.yaml", w.id));
    std::fs::write(
        &file,
        "apiVersion: dormant.dev/v1alpha1\nkind: SleepPolicy\nmetadata: {name: office}\nspec:\n  timezone: UTC\n  schedules: [{sleep: '0 19 * * *', wake: '0 8 * * *'}]\n",
    )
    .unwrap();
    let out =
        w.cli(&c.admin.kubeconfig, &["simulate", &target, "-f", &file.display().to_string(), "--days=2"]);
    let (table, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(table.contains("agent defaults (baseline)") && table.contains("office"), "{table}");

    // Alice may see team-a only: that is all she is shown, and naming
    // team-b is refused without running anything.
    let (alice, kubeconfig, _) = token_user(c, &a, "alice");
    bind(c, &a, "edit", &alice);
    let out = w.cli(&kubeconfig, &["simulate", "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out).1);
    let sim: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = sim.as_array().unwrap().iter().map(|c| c["target"].as_str().unwrap()).collect();
    assert_eq!(names, [format!("namespace/{a}")]);
    let out = w.cli(&kubeconfig, &["simulate", &format!("namespace/{b}")]);
    let stderr = text(&out).1;
    assert!(!out.status.success() && stderr.contains("403 Forbidden"), "{stderr}");

    // By hand: every bound is a clear refusal.
    let admin = &c.admin.cert;
    let post = |client: Option<&testbed::pki::CertPair>, body: &str| {
        w.raw(client, &request("POST", "/dormant/v1/simulate", &[("Content-Type", "application/json")], body))
    };
    let many: Vec<String> = (0..101).map(|i| format!("\"namespace/n{i}\"")).collect();
    for (body, says) in [
        (r#"{"days": 100000}"#.to_string(), "days must be between 1 and 366"),
        (r#"{"days": 1, "pastWeeks": 1}"#.to_string(), "not both"),
        (format!(r#"{{"targets": [{}]}}"#, many.join(",")), "at most 100 targets"),
        (r#"{"policies": "kind: SleepPolicy\nspec: ["}"#.to_string(), "policies:"),
        (r#"{"noCurrent": true}"#.to_string(), "nothing to simulate"),
        (r#"{"replicas": 5}"#.to_string(), "unknown field"),
        (r#"{"targets": ["namespace/<script>"]}"#.to_string(), "namespace/<script>"),
        (
            format!(r#"{{"policies": "{}"}}"#, "apiVersion: dormant.dev/v1alpha1\\nkind: SleepPolicy\\nmetadata: {name: p}\\nspec: {}\\n---\\n".repeat(11)),
            "more than 10 SleepPolicy documents",
        ),
        // A billion laughs: nine levels of ten aliases each.
        (serde_json::json!({ "policies": alias_bomb() }).to_string(), "policies:"),
        (format!(r#"{{"targets": ["{target}"], "pastWeeks": 52, "policies": "{}"}}"#, "apiVersion: dormant.dev/v1alpha1\\nkind: SleepPolicy\\nmetadata: {name: p}\\nspec: {}\\n---\\n".repeat(10)), ""),
    ] {
        let (code, answer) = post(Some(admin), &body);
        if says.is_empty() {
            // 1 target × 11 policies × 364 days: within the bound.
            assert_eq!(code, 200, "{answer}");
        } else {
            assert_eq!(code, 400, "{body}: {answer}");
            assert!(answer.contains(says), "{says}: {answer}");
        }
    }
    // A name that passes for one but names nothing here.
    let (code, answer) = post(Some(admin), r#"{"targets": ["namespace/.."]}"#);
    assert_eq!(code, 404, "{answer}");
    let (code, answer) = post(None, "{}");
    assert_eq!(code, 401, "{answer}");
    // A body over 64 KiB, as it says up front: refused unread.
    let big = "POST /dormant/v1/simulate HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: 71680\r\n\r\n";
    let (code, answer) = w.raw(Some(admin), big);
    assert_eq!(code, 413, "{answer}");
}

/// YAML whose aliases expand to a billion strings if followed.
fn alias_bomb() -> String {
    let mut y = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..=9 {
        let refs = vec![format!("*a{}", i - 1); 10].join(", ");
        y.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
    }
    y
}
