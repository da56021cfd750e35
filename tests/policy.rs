//! Policies on the command line and against a real kube-apiserver.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use testbed::Cluster;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn examples() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("policies"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn is_policy(path: &Path) -> bool {
    std::fs::read_to_string(path).unwrap().contains("kind: SleepPolicy")
}

fn dormant(args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dormant"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_committed_crd_is_what_the_code_generates() {
    let committed =
        std::fs::read_to_string(repo().join("charts/dormant/crds/sleeppolicies.dormant.dev.yaml")).unwrap();
    let generated = dormant::cli::crd_yaml().unwrap();
    assert!(
        committed == generated,
        "charts/dormant/crds/sleeppolicies.dormant.dev.yaml is stale; regenerate it with:\n\n    cargo run -- crd > charts/dormant/crds/sleeppolicies.dormant.dev.yaml\n"
    );
}

#[test]
fn there_are_at_least_five_example_policies_and_each_lints_clean() {
    let policies: Vec<_> = examples().into_iter().filter(|p| is_policy(p)).collect();
    assert!(policies.len() >= 5, "{policies:?}");
    for file in examples() {
        let (ok, out, err) = dormant(&["policy", "lint", file.to_str().unwrap()], None);
        assert!(ok, "{}: {err}", file.display());
        assert!(out.ends_with(": ok\n"), "{out}");
    }
}

#[test]
fn lint_names_file_document_and_field_and_fails() {
    let bad = "apiVersion: dormant.dev/v1alpha1\nkind: SleepPolicy\nmetadata: {name: good}\nspec: {sleepAfter: 1h}\n---\n\
               apiVersion: dormant.dev/v1alpha1\nkind: SleepPolicy\nmetadata: {name: late}\nspec:\n  schedules: [{sleep: \"0 0 19 * * 1-5\"}]\n";
    let (ok, out, err) = dormant(&["policy", "lint", "-"], Some(bad));
    assert!(!ok);
    assert!(
        err.contains("<stdin>: document 2 (SleepPolicy late): spec.schedules[0].sleep: invalid schedule \"0 0 19 * * 1-5\": it has 6 fields"),
        "{err}"
    );
    assert!(out.contains("1 error(s)"), "{out}");

    let (ok, _, err) = dormant(&["policy", "lint", "/nonexistent/policy.yaml"], None);
    assert!(!ok);
    assert!(err.contains("/nonexistent/policy.yaml: cannot read"), "{err}");
}

fn apply_crd(c: &Cluster) {
    let crd = repo().join("charts/dormant/crds/sleeppolicies.dormant.dev.yaml");
    c.kubectl_out(&c.admin, &["apply", "--server-side", "-f", crd.to_str().unwrap()]).unwrap();
    c.wait_established("sleeppolicies.dormant.dev").unwrap();
}

#[test]
fn the_api_server_accepts_every_example_and_rejects_invalid_fields_by_name() {
    let c = Cluster::shared();
    apply_crd(c);
    for file in examples().into_iter().filter(|p| is_policy(p)) {
        // Server-side dry run: validated by the real schema, stored nowhere.
        let out = c.kubectl_out(&c.admin, &["apply", "--dry-run=server", "-f", file.to_str().unwrap()]);
        assert!(out.is_ok(), "{}: {}", file.display(), out.unwrap_err());
    }
    let invalid = r#"apiVersion: dormant.dev/v1alpha1
kind: SleepPolicy
metadata: {name: invalid}
spec:
  sleepAfter: 30 minutes
  schedules:
  - sleep: "0 0 19 * * 1-5"
  pricing: {cpuCoreHour: -1, memoryGiBHour: 0.1, currency: euro}
  selector: {kinds: [Pod]}
"#;
    let err = c.kubectl_apply(&c.admin, invalid).unwrap_err().to_string();
    for field in [
        "spec.sleepAfter",
        "spec.schedules[0].sleep",
        "spec.pricing.cpuCoreHour",
        "spec.pricing.currency",
        "spec.selector.kinds[0]",
    ] {
        assert!(err.contains(field), "the API server's error should name {field}: {err}");
    }
    assert!(c.kubectl_out(&c.admin, &["get", "sleeppolicy", "invalid"]).is_err(), "nothing was stored");

    // Printer columns.
    c.kubectl_apply(&c.admin, &std::fs::read_to_string(repo().join("policies/office-hours.yaml")).unwrap())
        .unwrap();
    let table = c.kubectl_out(&c.admin, &["get", "sleeppolicies", "office-hours"]).unwrap();
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "PRIORITY", "SLEEP-AFTER", "TARGETS", "VALID", "AGE"]);
}

/// `dormant migrate` as the cluster admin: `(success, stdout, stderr)`.
fn migrate(c: &Cluster, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dormant"))
        .arg("migrate")
        .args(args)
        .env("KUBECONFIG", &c.admin.kubeconfig)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A cluster set up the vCluster Platform's way (annotations on namespaces,
/// a vcluster and a workload, and a vcluster's `vcluster.yaml`) is listed,
/// then written as `dormant.dev/*` annotations that dormant, reading only
/// its own, takes to mean the same; what was already dormant's is kept,
/// what is invalid is refused and left alone, and a second run writes
/// nothing.
#[test]
fn migrate_lists_then_writes_the_platforms_settings_as_dormants_and_twice_is_once() {
    let c = Cluster::shared();
    let id = format!("migrate-{}", std::process::id());
    let labels = [("migrate", id.as_str())];
    let annotate = |kind: &str, name: &str, ns: Option<&str>, pairs: &[&str]| {
        let mut args = vec!["annotate", kind, name];
        if let Some(ns) = ns {
            args.extend(["-n", ns]);
        }
        args.extend_from_slice(pairs);
        c.kubectl_out(&c.admin, &args).unwrap();
    };
    let get = |kind: &str, name: &str, ns: Option<&str>, key: &str| {
        let path = format!("jsonpath={{.metadata.annotations.{}}}", key.replace('.', "\\."));
        let mut args = vec!["get", kind, name, "-o", path.as_str()];
        if let Some(ns) = ns {
            args.extend(["-n", ns]);
        }
        c.kubectl_out(&c.admin, &args).unwrap()
    };

    let team = c.namespace("mig-team", &labels).unwrap();
    annotate(
        "namespace",
        &team,
        None,
        &[
            "sleepmode.loft.sh/sleep-after=3600",
            "sleepmode.loft.sh/timezone=CET#3600",
            "sleepmode.loft.sh/sleep-schedule=0 20 * * 1-5",
            "sleepmode.loft.sh/ignore-user-agents=kubewatch/*",
            "sleepmode.loft.sh/ignore-active-connections=true",
            "sleepmode.loft.sh/delete-after=86400",
        ],
    );
    c.kubectl_apply(
        &c.admin,
        &format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: keep, namespace: {team}, annotations: {{sleepmode.loft.sh/exclude: \"true\"}}}}\nspec:\n  replicas: 1\n  selector: {{matchLabels: {{app: keep}}}}\n  template:\n    metadata: {{labels: {{app: keep}}}}\n    spec: {{containers: [{{name: keep, image: nginx:1.27}}]}}\n"
        ),
    )
    .unwrap();
    let both = c.namespace("mig-both", &labels).unwrap();
    annotate("namespace", &both, None, &["sleepmode.loft.sh/sleep-after=60", "dormant.dev/sleep-after=2h"]);
    let bad = c.namespace("mig-bad", &labels).unwrap();
    annotate("namespace", &bad, None, &["sleepmode.loft.sh/sleep-after=an hour"]);
    // A vcluster: its annotation wins over its vcluster.yaml, field by field.
    let vc = c.namespace("mig-vc", &labels).unwrap();
    c.kubectl_apply(
        &c.admin,
        &format!(
            r#"apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: dev
  namespace: {vc}
  labels: {{app: vcluster, release: dev}}
  annotations: {{sleepmode.loft.sh/sleep-after: "1800"}}
spec:
  replicas: 1
  serviceName: dev
  selector: {{matchLabels: {{app: vcluster, release: dev}}}}
  template:
    metadata: {{labels: {{app: vcluster, release: dev}}}}
    spec: {{containers: [{{name: syncer, image: loftsh/vcluster:0.30.0}}]}}
---
apiVersion: v1
kind: Secret
metadata: {{name: vc-config-dev, namespace: {vc}}}
stringData:
  config.yaml: |
    sleepMode:
      enabled: true
      timeZone: Europe/Berlin
      autoSleep:
        afterInactivity: 2h
"#
        ),
    )
    .unwrap();
    // Outside the selector: never listed, never written.
    let other = c.namespace("mig-other", &[]).unwrap();
    annotate("namespace", &other, None, &["sleepmode.loft.sh/sleep-after=3600"]);
    let selector = format!("migrate={id}");

    // Listed, nothing written; the invalid namespace fails the run.
    let (ok, listed, stderr) = migrate(c, &["-l", &selector]);
    assert!(!ok, "an invalid setting must fail the run:\n{listed}{stderr}");
    for line in [
        format!("namespace/{team}"),
        "annotation sleepmode.loft.sh/sleep-after = \"3600\" → dormant.dev/sleep-after: 1h".into(),
        "annotation sleepmode.loft.sh/timezone = \"CET#3600\" → dormant.dev/timezone: Etc/GMT-1".into(),
        "annotation sleepmode.loft.sh/sleep-schedule = \"0 20 * * 1-5\" → dormant.dev/sleep-schedule: 0 20 * * 1-5"
            .into(),
        "annotation sleepmode.loft.sh/ignore-user-agents = \"kubewatch/*\" → dormant.dev/ignore-user-agents: kubewatch/*"
            .into(),
        "annotation sleepmode.loft.sh/ignore-active-connections = \"true\" → SleepPolicy spec.ignore.activeConnections: true"
            .into(),
        "annotation sleepmode.loft.sh/delete-after = \"86400\" → SleepPolicy spec.deleteAfter: 1d".into(),
        format!("Deployment/{team}/keep"),
        "annotation sleepmode.loft.sh/exclude = \"true\" → dormant.dev/exclude: true".into(),
        "annotation sleepmode.loft.sh/sleep-after = \"60\" → kept dormant.dev/sleep-after: 2h (already set)".into(),
        format!("namespace/{bad}"),
        "sleepmode.loft.sh/sleep-after".into(),
        format!("vcluster/{vc}/dev"),
        "annotation sleepmode.loft.sh/sleep-after = \"1800\" → dormant.dev/sleep-after: 30m".into(),
        "vcluster.yaml sleepMode.timeZone = \"Europe/Berlin\" → dormant.dev/timezone: Europe/Berlin".into(),
    ] {
        assert!(listed.contains(&line), "missing {line:?} in:\n{listed}");
    }
    assert!(!listed.contains(&other), "a namespace outside the selector was listed:\n{listed}");
    assert_eq!(get("namespace", &team, None, "dormant.dev/sleep-after"), "", "written without --write");

    // Written: dormant's equivalents beside the Platform's own.
    let (ok, written, stderr) = migrate(c, &["-l", &selector, "--write"]);
    assert!(!ok, "the invalid namespace still fails the run:\n{written}{stderr}");
    for (kind, name, ns, key, want) in [
        ("namespace", team.as_str(), None, "dormant.dev/sleep-after", "1h"),
        ("namespace", &team, None, "dormant.dev/timezone", "Etc/GMT-1"),
        ("namespace", &team, None, "dormant.dev/sleep-schedule", "0 20 * * 1-5"),
        ("namespace", &team, None, "dormant.dev/ignore-user-agents", "kubewatch/*"),
        ("namespace", &team, None, "sleepmode.loft.sh/sleep-after", "3600"),
        ("deployment", "keep", Some(team.as_str()), "dormant.dev/exclude", "true"),
        ("namespace", &both, None, "dormant.dev/sleep-after", "2h"),
        ("namespace", &bad, None, "dormant.dev/sleep-after", ""),
        ("statefulset", "dev", Some(vc.as_str()), "dormant.dev/sleep-after", "30m"),
        ("statefulset", "dev", Some(vc.as_str()), "dormant.dev/timezone", "Europe/Berlin"),
        ("namespace", &other, None, "dormant.dev/sleep-after", ""),
    ] {
        assert_eq!(get(kind, name, ns, key), want, "{kind} {name} {key} after --write:\n{written}");
    }
    assert!(written.contains("Wrote 7 of 7 annotations on 3 objects."), "{written}");
    assert_eq!(
        listed.matches("sleepmode.loft.sh/delete-after").count(),
        1,
        "one line per setting:\n{listed}"
    );

    // Again: nothing left to write.
    let (ok, again, stderr) = migrate(c, &[&format!("namespace/{team}"), "--write", "-o", "json"]);
    assert!(ok, "{again}{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&again).unwrap();
    assert_eq!((doc["planned"].as_u64(), doc["written"].as_u64()), (Some(0), Some(0)), "{again}");

    // Dormant, reading only its own annotations now, means the same.
    let out = Command::new(env!("CARGO_BIN_EXE_dormant"))
        .args(["explain", "--direct", &format!("namespace/{team}")])
        .env("KUBECONFIG", &c.admin.kubeconfig)
        .output()
        .unwrap();
    let explained = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for (field, value, key) in [
        ("sleepAfter", " 1h ", "dormant.dev/sleep-after"),
        ("timezone", " Etc/GMT-1 ", "dormant.dev/timezone"),
    ] {
        let line = explained.lines().find(|l| l.trim_start().starts_with(field)).unwrap_or_default();
        assert!(line.contains(value) && line.ends_with(&format!("(from annotation {key})")), "{explained}");
    }
}
