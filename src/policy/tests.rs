//! Resolution: precedence, ties, provenance and errors.

use crate::vocab;
use std::collections::BTreeMap;
use std::sync::Arc;

use super::annotations::TargetAnnotations;
use super::*;

fn policy(name: &str, yaml_spec: &str) -> Arc<Candidate> {
    let p: SleepPolicy = serde_yaml::from_str(&format!(
        "apiVersion: dormant.dev/v1alpha1\nkind: SleepPolicy\nmetadata: {{name: {name}}}\nspec:\n{yaml_spec}"
    ))
    .unwrap();
    candidate(&p)
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn annotations(pairs: &[(&str, &str)]) -> TargetAnnotations {
    TargetAnnotations::parse(&labels(pairs)).unwrap()
}

fn after(secs: u64) -> SleepAfter {
    SleepAfter::After(std::time::Duration::from_secs(secs))
}

#[test]
fn defaults_then_policy_then_annotations() {
    let dev = policy("dev", "  sleepAfter: 30m\n  timezone: Europe/Berlin\n  wake: {timeout: 5m}\n");
    let team_a = labels(&[("team", "a")]);
    let d = Defaults::default();

    let none = resolve(TargetKind::Namespace, &team_a, &TargetAnnotations::default(), &[], &d).unwrap();
    assert_eq!(none.policy, None);
    assert_eq!(none.sleep_after, Sourced { value: SleepAfter::Never, origin: Origin::Default });

    let p = resolve(
        TargetKind::Namespace,
        &team_a,
        &TargetAnnotations::default(),
        std::slice::from_ref(&dev),
        &d,
    )
    .unwrap();
    assert_eq!(p.policy.as_deref(), Some("dev"));
    assert_eq!(p.sleep_after, Sourced { value: after(1800), origin: Origin::Policy("dev".into()) });
    assert_eq!(p.timezone.value, chrono_tz::Europe::Berlin);
    assert_eq!(p.wake_timeout.value, std::time::Duration::from_secs(300));
    assert_eq!(p.wake_on_request, Sourced { value: true, origin: Origin::Default });

    let a = annotations(&[(vocab::SLEEP_AFTER, "2h"), (vocab::SLEEP_SCHEDULE, "0 20 * * *")]);
    let p = resolve(TargetKind::Namespace, &team_a, &a, &[dev], &d).unwrap();
    assert_eq!(p.sleep_after, Sourced { value: after(7200), origin: Origin::Annotation(vocab::SLEEP_AFTER) });
    assert_eq!(p.schedules.origin, Origin::Annotation(vocab::SLEEP_SCHEDULE));
    assert_eq!(p.timezone.origin, Origin::Policy("dev".into()), "the policy's time zone still applies");
}

#[test]
fn the_highest_priority_matching_policy_wins_and_ties_are_reported() {
    type Case<'a> =
        (&'a [(&'a str, i32, &'a str)], &'a [(&'a str, &'a str)], TargetKind, Option<&'a str>, &'a [&'a str]);
    let cases: &[Case] = &[
        // (policies: name, priority, selector yaml), namespace labels, kind, winner, tied
        (&[("a", 0, ""), ("b", 10, "")], &[], TargetKind::Namespace, Some("b"), &[]),
        (
            &[("zeta", 5, ""), ("alpha", 5, ""), ("low", 1, "")],
            &[],
            TargetKind::Namespace,
            Some("alpha"),
            &["zeta"],
        ),
        (
            &[("prod", 100, "  selector: {namespaceSelector: {matchLabels: {env: prod}}}\n"), ("dev", 0, "")],
            &[("env", "dev")],
            TargetKind::Namespace,
            Some("dev"),
            &[],
        ),
        (
            &[("prod", 100, "  selector: {namespaceSelector: {matchLabels: {env: prod}}}\n"), ("dev", 0, "")],
            &[("env", "prod")],
            TargetKind::Namespace,
            Some("prod"),
            &[],
        ),
        (
            &[("vc-only", 100, "  selector: {kinds: [VCluster]}\n"), ("any", 0, "")],
            &[],
            TargetKind::Namespace,
            Some("any"),
            &[],
        ),
        (
            &[("vc-only", 100, "  selector: {kinds: [VCluster]}\n")],
            &[],
            TargetKind::VCluster,
            Some("vc-only"),
            &[],
        ),
        (
            &[(
                "expr",
                1,
                "  selector: {namespaceSelector: {matchExpressions: [{key: tier, operator: NotIn, values: [critical]}]}}\n",
            )],
            &[("tier", "critical")],
            TargetKind::Namespace,
            None,
            &[],
        ),
    ];
    for (policies, ns_labels, kind, winner, tied) in cases {
        let candidates: Vec<_> =
            policies.iter().map(|(n, prio, sel)| policy(n, &format!("  priority: {prio}\n{sel}"))).collect();
        let p = resolve(
            *kind,
            &labels(ns_labels),
            &TargetAnnotations::default(),
            &candidates,
            &Defaults::default(),
        )
        .unwrap();
        assert_eq!(p.policy.as_deref(), *winner, "{policies:?} {ns_labels:?}");
        assert_eq!(p.tied_with, tied.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    }
}

#[test]
fn the_policy_annotation_picks_a_policy_by_name() {
    let candidates =
        vec![policy("high", "  priority: 100\n"), policy("chosen", "  priority: -5\n  sleepAfter: 5m\n")];
    let a = annotations(&[(vocab::POLICY, "chosen")]);
    let p = resolve(TargetKind::Namespace, &BTreeMap::new(), &a, &candidates, &Defaults::default()).unwrap();
    assert_eq!(p.policy.as_deref(), Some("chosen"));

    let a = annotations(&[(vocab::POLICY, "missing")]);
    let e =
        resolve(TargetKind::Namespace, &BTreeMap::new(), &a, &candidates, &Defaults::default()).unwrap_err();
    assert_eq!(e.category(), "policy-not-found");
    assert!(e.to_string().contains("\"missing\""), "{e}");
}

#[test]
fn an_invalid_winning_policy_is_an_error_not_a_fallback() {
    let candidates = vec![
        policy("broken", "  priority: 10\n  sleepAfter: 5 minutes\n"),
        policy("fallback", "  sleepAfter: 1h\n"),
    ];
    let e = resolve(
        TargetKind::Namespace,
        &BTreeMap::new(),
        &TargetAnnotations::default(),
        &candidates,
        &Defaults::default(),
    )
    .unwrap_err();
    assert_eq!(e.category(), "policy-invalid");
    let msg = e.to_string();
    assert!(msg.contains("SleepPolicy broken") && msg.contains("spec.sleepAfter"), "{msg}");
}

#[test]
fn ignore_annotations_replace_the_policys_list_of_that_kind() {
    let candidates = vec![policy("p", "  ignore: {users: [ci-bot], userAgents: [argocd*]}\n")];
    let a = annotations(&[(vocab::IGNORE_USER_AGENTS, "flux*")]);
    let p = resolve(TargetKind::Namespace, &BTreeMap::new(), &a, &candidates, &Defaults::default()).unwrap();
    assert_eq!(p.ignore.value.users, vec!["ci-bot".to_string()]);
    assert_eq!(p.ignore.value.user_agents, vec!["flux*".to_string()]);
    assert_eq!(p.ignore.origin, Origin::Annotation(vocab::IGNORE_USER_AGENTS));
}

#[test]
fn own_service_accounts_are_ignored_unless_the_policy_or_the_target_says_they_count() {
    let resolve_with = |spec: &str, pairs: &[(&str, &str)]| {
        let candidates = vec![policy("p", spec)];
        resolve(
            TargetKind::Namespace,
            &BTreeMap::new(),
            &annotations(pairs),
            &candidates,
            &Defaults::default(),
        )
        .unwrap()
        .ignore
        .value
        .count_own_service_accounts
    };
    let no_policy =
        resolve(TargetKind::Namespace, &BTreeMap::new(), &annotations(&[]), &[], &Defaults::default())
            .unwrap();
    assert!(!no_policy.ignore.value.count_own_service_accounts);
    assert!(!resolve_with("  sleepAfter: 1h\n", &[]));
    assert!(!resolve_with("  ignore: {users: [ci-bot]}\n", &[]));
    assert!(resolve_with("  ignore: {ownServiceAccounts: false}\n", &[]));
    assert!(resolve_with("  sleepAfter: 1h\n", &[(vocab::IGNORE_OWN_SERVICE_ACCOUNTS, "false")]));
    assert!(!resolve_with(
        "  ignore: {ownServiceAccounts: false}\n",
        &[(vocab::IGNORE_OWN_SERVICE_ACCOUNTS, "true")]
    ));
}

#[test]
fn every_bad_policy_field_is_named() {
    let table = [
        ("  sleepAfter: -5m\n", "spec.sleepAfter", "negative"),
        ("  sleepAfter: 5x\n", "spec.sleepAfter", "unknown unit"),
        ("  schedules: [{sleep: \"0 0 19 * * 1-5\"}]\n", "spec.schedules[0].sleep", "6 fields"),
        ("  schedules: [{wake: \"0 8 * *\"}]\n", "spec.schedules[0].wake", "4 fields"),
        (
            "  schedules: [{sleep: \"0 8 * * *\", wake: \"0 8 * * *\"}]\n",
            "spec.schedules[0]",
            "same schedule",
        ),
        ("  schedules: [{}]\n", "spec.schedules[0]", "needs a sleep or a wake"),
        ("  timezone: Europe/Nowhere\n", "spec.timezone", "unknown time zone"),
        ("  wake: {timeout: 0s}\n", "spec.wake.timeout", "longer than 0s"),
        ("  pricing: {cpuCoreHour: -1, memoryGiBHour: 0}\n", "spec.pricing.cpuCoreHour", "0 or more"),
        (
            "  selector: {namespaceSelector: {matchExpressions: [{key: a, operator: In}]}}\n",
            "spec.selector.namespaceSelector",
            "values",
        ),
        ("  ignore: {users: [\"\"]}\n", "spec.ignore.users[0]", "must not be empty"),
    ];
    for (spec, field, needle) in table {
        let c = policy("bad", spec);
        let errors = c.parsed.as_ref().unwrap_err();
        assert!(errors.iter().any(|e| e.field == field && e.message.contains(needle)), "{spec}: {errors:?}");
    }
}

#[test]
fn an_unreadable_selector_holds_every_target_it_may_have_selected() {
    // `in` (not `In`): the API server stores it, only dormant can tell.
    let broken = policy(
        "production-never",
        "  priority: 1000\n  sleepAfter: never\n  selector: {namespaceSelector: {matchExpressions: [{key: env, operator: in, values: [prod]}]}}\n",
    );
    let catch_all = policy("default", "  sleepAfter: 2h\n");
    let above = policy(
        "pinned",
        "  priority: 2000\n  sleepAfter: 10m\n  selector: {namespaceSelector: {matchLabels: {pinned: \"yes\"}}}\n",
    );
    let all = [broken, catch_all, above];
    let d = Defaults::default();
    let none = TargetAnnotations::default();
    for env in ["prod", "dev"] {
        let err = resolve(TargetKind::Namespace, &labels(&[("env", env)]), &none, &all, &d).unwrap_err();
        assert!(
            matches!(&err, ResolveError::PolicyInvalid { name, .. } if name == "production-never"),
            "{env}: {err}"
        );
    }
    // A valid policy of higher priority still wins where it matches.
    let p = resolve(TargetKind::Namespace, &labels(&[("env", "prod"), ("pinned", "yes")]), &none, &all, &d)
        .unwrap();
    assert_eq!(p.policy.as_deref(), Some("pinned"));
}

#[test]
fn predictive_wake_is_opt_in_read_with_defaults_and_carried_with_its_origin() {
    let resolve_with = |spec: &str| {
        resolve(
            TargetKind::Namespace,
            &BTreeMap::new(),
            &TargetAnnotations::default(),
            &[policy("p", spec)],
            &Defaults::default(),
        )
        .unwrap()
        .wake_predictive
    };
    assert_eq!(resolve_with("  sleepAfter: 1h\n"), Sourced { value: None, origin: Origin::Default });
    let on = resolve_with("  wake: {predictive: {}}\n");
    assert_eq!(on.value, Some(Predictive::default()));
    assert_eq!(on.origin, Origin::Policy("p".into()));
    assert_eq!(
        resolve_with("  wake: {predictive: {lead: 30m, confidence: 0.9}}\n").value,
        Some(Predictive { lead: std::time::Duration::from_secs(1800), confidence: 0.9 })
    );
}

#[test]
fn every_bad_predictive_value_is_named() {
    for (spec, field, needle) in [
        ("  wake: {predictive: {lead: 0s}}\n", "spec.wake.predictive.lead", "longer than 0s"),
        ("  wake: {predictive: {lead: 13h}}\n", "spec.wake.predictive.lead", "at most 12h"),
        ("  wake: {predictive: {lead: soon}}\n", "spec.wake.predictive.lead", "invalid duration"),
        ("  wake: {predictive: {confidence: 0}}\n", "spec.wake.predictive.confidence", "more than 0"),
        ("  wake: {predictive: {confidence: 1.5}}\n", "spec.wake.predictive.confidence", "at most 1"),
        ("  wake: {predictive: {confidence: -0.1}}\n", "spec.wake.predictive.confidence", "not -0.1"),
    ] {
        let c = policy("bad", spec);
        let errors = c.parsed.as_ref().unwrap_err();
        assert!(errors.iter().any(|e| e.field == field && e.message.contains(needle)), "{spec}: {errors:?}");
    }
}

#[test]
fn running_jobs_finish_unless_a_policy_or_the_target_says_suspend() {
    let ns = labels(&[]);
    let d = Defaults::default();
    let none = resolve(TargetKind::Namespace, &ns, &TargetAnnotations::default(), &[], &d).unwrap();
    assert_eq!(none.running_jobs, Sourced { value: RunningJobs::Finish, origin: Origin::Default });
    let strict = policy("strict", "  runningJobs: Suspend\n");
    let p =
        resolve(TargetKind::Namespace, &ns, &TargetAnnotations::default(), std::slice::from_ref(&strict), &d)
            .unwrap();
    assert_eq!(
        p.running_jobs,
        Sourced { value: RunningJobs::Suspend, origin: Origin::Policy("strict".into()) }
    );
    let a = annotations(&[(vocab::RUNNING_JOBS, "finish")]);
    let p = resolve(TargetKind::Namespace, &ns, &a, &[strict], &d).unwrap();
    assert_eq!(
        p.running_jobs,
        Sourced { value: RunningJobs::Finish, origin: Origin::Annotation(vocab::RUNNING_JOBS) }
    );
    // A value the CRD does not know is refused with the policy.
    let bad: Result<SleepPolicy, _> = serde_yaml::from_str(
        "apiVersion: dormant.dev/v1alpha1\nkind: SleepPolicy\nmetadata: {name: x}\nspec: {runningJobs: Kill}\n",
    );
    assert!(bad.is_err());
}
