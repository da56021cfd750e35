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
