//! `dormant policy lint`: checks `SleepPolicy` documents and the dormant
//! annotations of any other Kubernetes object, naming the file, the
//! document and the field of each problem.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde_yaml::Value;

use super::annotations::{TargetAnnotations, WorkloadAnnotations};
use super::{Policy, SleepPolicy};

/// One problem found by the linter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LintError {
    pub file: String,
    /// 1-based index of the YAML document in the file.
    pub document: usize,
    /// `SleepPolicy office-hours`, `Namespace team-a`, … when known.
    pub object: Option<String>,
    pub field: String,
    pub message: String,
}

impl fmt::Display for LintError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: document {}", self.file, self.document)?;
        if let Some(o) = &self.object {
            write!(f, " ({o})")?;
        }
        write!(f, ": {}: {}", self.field, self.message)
    }
}

/// What a lint run looked at.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LintReport {
    pub policies: usize,
    pub annotated_objects: usize,
    pub errors: Vec<LintError>,
    /// Valid, but probably not what the author expects.
    pub warnings: Vec<LintError>,
}

/// When `deleteAfter` acts, said wherever it is shown.
pub const DELETE_AFTER_NOTE: &str = "deletes targets (a namespace with everything in it, a vcluster by its Helm release's objects) only when the agent runs with --enable-delete-after; never a disabled or a dormant.dev/protect target, nor in dry-run";

/// Lints every YAML document in `text` (named `file` in messages).
pub fn lint(file: &str, text: &str) -> LintReport {
    let mut report = LintReport::default();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let document = i + 1;
        let mut push = |object: Option<String>, field: &str, message: String| {
            report.errors.push(LintError {
                file: file.into(),
                document,
                object,
                field: field.into(),
                message,
            })
        };
        let value = match Value::deserialize(de) {
            Ok(Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                push(None, "(document)", format!("not valid YAML: {e}"));
                // The YAML stream cannot be resynchronised after a syntax error.
                break;
            }
        };
        let kind = value.get("kind").and_then(Value::as_str).unwrap_or_default().to_string();
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .unwrap_or("(unnamed)")
            .to_string();
        let object = (!kind.is_empty()).then(|| format!("{kind} {name}"));
        if kind.is_empty() {
            push(
                None,
                "kind",
                "missing: expected a SleepPolicy or a Kubernetes object with annotations".into(),
            );
            continue;
        }
        if kind == "SleepPolicy" {
            report.policies += 1;
            let api = value.get("apiVersion").and_then(Value::as_str).unwrap_or_default();
            if api != "dormant.dev/v1alpha1" {
                push(object.clone(), "apiVersion", format!("expected dormant.dev/v1alpha1, not {api:?}"));
            }
            // Through text rather than `from_value`: serde_yaml then reports
            // the path of a field with the wrong type.
            let parsed =
                serde_yaml::to_string(&value).and_then(|text| serde_yaml::from_str::<SleepPolicy>(&text));
            match parsed {
                Ok(policy) => {
                    if let Ok(round_trip) = serde_yaml::to_value(&policy) {
                        for field in unknown_fields(&value, &round_trip, "") {
                            if !field.starts_with("metadata.")
                                && field != "status"
                                && !field.starts_with("status.")
                            {
                                push(
                                    object.clone(),
                                    &field,
                                    "unknown field (the API server would drop it)".into(),
                                );
                            }
                        }
                    }
                    if let Err(errors) = Policy::from_resource(&policy) {
                        for e in errors {
                            push(object.clone(), &e.field, e.message);
                        }
                    }
                    if policy.spec.delete_after.is_some() {
                        report.warnings.push(LintError {
                            file: file.into(),
                            document,
                            object: object.clone(),
                            field: "spec.deleteAfter".into(),
                            message: DELETE_AFTER_NOTE.into(),
                        });
                    }
                }
                Err(e) => {
                    let (field, message) = split_serde_error(&e.to_string());
                    push(object.clone(), &field, message)
                }
            }
            continue;
        }
        let annotations: BTreeMap<String, String> = match value
            .get("metadata")
            .and_then(|m| m.get("annotations"))
        {
            None | Some(Value::Null) => BTreeMap::new(),
            Some(a) => match serde_yaml::from_value(a.clone()) {
                Ok(a) => a,
                Err(e) => {
                    push(object.clone(), "metadata.annotations", format!("expected a map of strings: {e}"));
                    continue;
                }
            },
        };
        if annotations.keys().any(|k| k.starts_with(crate::vocab::PREFIX)) {
            report.annotated_objects += 1;
        }
        let field = |key: &str| format!("metadata.annotations[{key}]");
        if let Err(errors) = TargetAnnotations::parse(&annotations) {
            for e in errors {
                push(object.clone(), &field(&e.key), format!("{:?}: {}", e.value, e.reason));
            }
        }
        if let Err(errors) = WorkloadAnnotations::parse(&annotations) {
            for e in errors {
                push(object.clone(), &field(&e.key), format!("{:?}: {}", e.value, e.reason));
            }
        }
    }
    report
}

/// `spec.priority: invalid type … at line 5 column 3` → (`spec.priority`,
/// `invalid type …`); the position refers to a re-serialised document, so
/// it is dropped.
fn split_serde_error(text: &str) -> (String, String) {
    let text = match text.rfind(" at line ") {
        Some(i) => &text[..i],
        None => text,
    };
    match text.split_once(": ") {
        Some((path, msg)) if !path.contains(' ') => (path.to_string(), msg.to_string()),
        _ => ("spec".to_string(), text.to_string()),
    }
}

/// Paths present in `original` but not in `known` (what deserialising
/// silently dropped).
fn unknown_fields(original: &Value, known: &Value, path: &str) -> Vec<String> {
    let join = |k: &str| if path.is_empty() { k.to_string() } else { format!("{path}.{k}") };
    match (original, known) {
        (Value::Mapping(o), Value::Mapping(k)) => o
            .iter()
            .flat_map(|(key, v)| {
                let name = key.as_str().map(String::from).unwrap_or_else(|| format!("{key:?}"));
                match k.get(key) {
                    Some(kv) => unknown_fields(v, kv, &join(&name)),
                    None if v.is_null() => vec![],
                    None => vec![join(&name)],
                }
            })
            .collect(),
        (Value::Sequence(o), Value::Sequence(k)) => o
            .iter()
            .zip(k.iter())
            .enumerate()
            .flat_map(|(i, (ov, kv))| unknown_fields(ov, kv, &format!("{path}[{i}]")))
            .collect(),
        _ => vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_good_policy_and_annotated_objects_pass() {
        let r = lint(
            "ok.yaml",
            r#"
apiVersion: dormant.dev/v1alpha1
kind: SleepPolicy
metadata: {name: dev}
spec:
  sleepAfter: 30m
  schedules: [{sleep: "0 19 * * 1-5", wake: "0 8 * * 1-5"}]
  timezone: Europe/Berlin
---
apiVersion: v1
kind: Namespace
metadata:
  name: team-a
  annotations: {dormant.dev/sleep-after: 1h, other.io/x: "y"}
"#,
        );
        assert_eq!(r.errors, vec![]);
        assert_eq!((r.policies, r.annotated_objects), (1, 1));
    }

    #[test]
    fn errors_name_file_document_object_and_field() {
        let r = lint(
            "bad.yaml",
            r#"
apiVersion: dormant.dev/v1alpha1
kind: SleepPolicy
metadata: {name: ok}
spec: {sleepAfter: 30m}
---
apiVersion: dormant.dev/v1alpha1
kind: SleepPolicy
metadata: {name: broken}
spec:
  sleepAfter: 30 minutes
  sleepAftr: 10m
  schedules:
  - sleep: "0 0 19 * * 1-5"
  timezone: Berlin/Europe
  pricing: {cpuCoreHour: -1, memoryGiBHour: 0.1}
---
apiVersion: v1
kind: Namespace
metadata:
  name: team-b
  annotations: {dormant.dev/disabled: "yes"}
"#,
        );
        let lines: Vec<String> = r.errors.iter().map(ToString::to_string).collect();
        let expect = [
            "bad.yaml: document 2 (SleepPolicy broken): spec.sleepAftr: unknown field",
            "bad.yaml: document 2 (SleepPolicy broken): spec.sleepAfter: invalid duration \"30 minutes\"",
            "bad.yaml: document 2 (SleepPolicy broken): spec.schedules[0].sleep: invalid schedule \"0 0 19 * * 1-5\": it has 6 fields",
            "bad.yaml: document 2 (SleepPolicy broken): spec.timezone: unknown time zone \"Berlin/Europe\"",
            "bad.yaml: document 2 (SleepPolicy broken): spec.pricing.cpuCoreHour: must be a price of 0 or more",
            "bad.yaml: document 3 (Namespace team-b): metadata.annotations[dormant.dev/disabled]: \"yes\": expected true or false",
        ];
        for e in expect {
            assert!(lines.iter().any(|l| l.starts_with(e)), "missing {e:?} in {lines:#?}");
        }
        assert_eq!(lines.len(), expect.len(), "{lines:#?}");
    }

    #[test]
    fn delete_after_is_valid_and_warned_about_with_when_it_acts() {
        let policy = "apiVersion: dormant.dev/v1alpha1\nkind: SleepPolicy\nmetadata: {name: x}\nspec: {sleepAfter: 30m, deleteAfter: 7d}\n";
        let r = lint("d.yaml", policy);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(r.warnings.len(), 1);
        assert_eq!(r.warnings[0].field, "spec.deleteAfter");
        assert!(r.warnings[0].message.contains("--enable-delete-after"), "{}", r.warnings[0]);
        let r = lint("e.yaml", &policy.replace("7d", "soon"));
        assert_eq!(r.errors.len(), 1, "a bad duration is still an error");
        let r = lint("f.yaml", &policy.replace("7d}", "7d, deleteWarning: 0s}"));
        assert_eq!(
            r.errors.iter().map(|e| e.field.as_str()).collect::<Vec<_>>(),
            ["spec.deleteWarning"],
            "a deletion is always warned"
        );
    }

    #[test]
    fn wrong_types_and_broken_yaml_are_errors_not_panics() {
        let r = lint(
            "t.yaml",
            "apiVersion: dormant.dev/v1alpha1\nkind: SleepPolicy\nmetadata: {name: x}\nspec: {priority: high}\n",
        );
        assert_eq!(r.errors.len(), 1);
        assert_eq!(r.errors[0].field, "spec.priority", "{}", r.errors[0]);
        assert!(r.errors[0].message.contains("invalid type"), "{}", r.errors[0]);
        let r = lint("y.yaml", "kind: [unclosed\n");
        assert_eq!(r.errors.len(), 1);
        assert!(r.errors[0].message.contains("not valid YAML"));
        let r = lint("z.yaml", "just: a map\n");
        assert_eq!(r.errors[0].field, "kind");
    }
}
