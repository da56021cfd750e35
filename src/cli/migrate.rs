//! `dormant migrate`: what a cluster set up for vCluster Platform's sleep
//! mode becomes under dormant. For every namespace and vcluster carrying
//! `sleepmode.loft.sh/*` annotations (and, for a vcluster, the `sleepMode`
//! section of the `vcluster.yaml` in its `vc-config-<name>` Secret), and
//! every workload the Platform excludes, it lists each setting found and
//! its `dormant.dev/*` equivalent, the SleepPolicy field that expresses it,
//! or why nothing does ([`loft::plan_migration`]). With `--write` it adds
//! the annotations, never replacing a `dormant.dev/*` one already there
//! and never removing the Platform's; running it again writes nothing.
//!
//! It reads the cluster with the kubeconfig's credentials, as `restore`
//! does: it works whether or not an agent runs, and before one is started
//! with `--vcluster-platform-annotations`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::num::NonZeroU32;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use super::Output;
use crate::annotate::{Annotator, Changes};
use crate::client::{Outcome as Written, Patcher, Throttle, metadata};
use crate::policy::TargetKind;
use crate::policy::loft::{self, Migration, Outcome, Step};
use crate::target::scope::parse_selector;
use crate::target::{Scope, TargetRef, WorkloadView, stores};

/// `dormant migrate` flags.
#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// One target (namespace/<name>, vcluster/<namespace>/<name>, <namespace>/<vcluster>
    /// or <namespace>); none: every one in the cluster.
    pub target: Option<TargetRef>,
    /// Only namespaces whose labels match (`team=a`, `env in (dev,ci)`),
    /// to move a few teams at a time.
    #[arg(short = 'l', long)]
    pub namespace_selector: Option<String>,
    /// Add the planned `dormant.dev/*` annotations (the Platform's stay).
    #[arg(long)]
    pub write: bool,
    #[arg(short, long, value_enum, default_value = "table", env = "DORMANT_OUTPUT")]
    pub output: Output,
}

/// The plan for one object, or why there is none.
struct Found {
    /// `namespace/team-a`, `vcluster/team-b/dev`, `Deployment/team-a/db`.
    what: String,
    plan: Result<Migration, String>,
    /// Why the vcluster's `vcluster.yaml` was not read, when it was not.
    config_note: Option<String>,
    /// What `--write` did: `Some(Ok(n))` annotations written.
    written: Option<Result<usize, String>>,
}

/// What a run found and did, for the exit code.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Annotations planned (and not already there).
    pub planned: usize,
    /// Annotations written (`--write`).
    pub written: usize,
    /// Objects whose settings are invalid (nothing planned for them).
    pub invalid: usize,
    /// Writes that failed.
    pub failed: usize,
}

/// The annotations a plan adds, as a target's [`Changes`].
fn changes(plan: &Migration) -> Changes {
    plan.steps
        .iter()
        .filter_map(|s| match &s.outcome {
            Outcome::Annotate { key, value } => Some((*key, Some(value.clone()))),
            _ => None,
        })
        .collect()
}

/// Plans (and with `write`, applies) the migration of `only` or of every
/// target and workload; writes the result to `out` as `output` says.
pub async fn migrate(client: &Client, args: &MigrateArgs, out: &mut String) -> anyhow::Result<Summary> {
    let (stores, writers) = stores::stores();
    writers.fill(client.clone()).await.context("failed to read the cluster")?;
    let qps = NonZeroU32::new(20).unwrap_or(NonZeroU32::MIN);
    let patcher = Patcher::new(client.clone(), Throttle::new(qps, qps));
    let annotator = Annotator::new(patcher.clone());
    // Every namespace carrying the Platform's annotations is a target here,
    // as it is to an agent started with `--vcluster-platform-annotations`.
    let selector = match &args.namespace_selector {
        Some(s) => Some(parse_selector(s).map_err(|e| anyhow::anyhow!("--namespace-selector: {e}"))?),
        None => None,
    };
    let scope = Scope { platform_annotations: true, selector, ..Scope::default() };
    let now = Utc::now();
    let mut found = Vec::new();
    let wanted = |r: &TargetRef| args.target.as_ref().is_none_or(|o| o == r);

    for r in stores.targets(&[], &scope) {
        if !wanted(&r) {
            continue;
        }
        let Some(target) = stores.target(&r) else { continue };
        let annotations = target.object.annotations();
        let (yaml, config_note) = match r.kind {
            TargetKind::VCluster => match stores::vcluster_yaml(client, &r.namespace, &r.name).await {
                Ok(y) => (y, None),
                Err(note) => (None, Some(note)),
            },
            TargetKind::Namespace => (None, None),
        };
        let has_platform = annotations.keys().any(|k| k.starts_with(loft::PREFIX));
        if !has_platform && yaml.is_none() && config_note.is_none() {
            continue;
        }
        let plan = loft::plan_migration(annotations, yaml.as_deref(), now)
            .map(|mut plan| {
                // Shown as written on the object (`3600`, `CET#3600`),
                // beside what it becomes.
                for s in &mut plan.steps {
                    if let Some(raw) = s.source.strip_prefix("annotation ").and_then(|k| annotations.get(k)) {
                        s.value = raw.clone();
                    }
                }
                plan
            })
            .map_err(|e| e.to_string());
        if matches!(&plan, Ok(p) if p.steps.is_empty()) && config_note.is_none() {
            continue;
        }
        let mut f = Found { what: r.to_string(), plan, config_note, written: None };
        if args.write
            && let Ok(plan) = &f.plan
            && !plan.annotations.is_empty()
        {
            f.written = Some(write_target(&annotator, &target.object, yaml.as_deref(), now).await);
        }
        found.push(f);
    }

    // Workloads the Platform excludes, in every namespace (a namespace a
    // SleepPolicy selects carries no annotation of its own).
    let namespaces: Vec<String> = match &args.target {
        Some(t) if t.kind == TargetKind::Namespace => vec![t.namespace.clone()],
        Some(_) => Vec::new(),
        None => {
            let mut all: Vec<String> = stores
                .namespaces
                .state()
                .iter()
                .filter(|n| scope.allows(&n.name_any(), n.labels()))
                .map(|n| n.name_any())
                .collect();
            all.sort();
            all
        }
    };
    for ns in namespaces {
        for w in stores.namespace_workloads(&ns) {
            let plan = match loft::plan_workload_migration(&w.annotations) {
                Ok(None) => continue,
                Ok(Some((key, value))) => Ok(workload_migration(&w, key, value)),
                Err(e) => Err(e.to_string()),
            };
            let mut f = Found { what: w.id(), plan, config_note: None, written: None };
            if args.write && f.plan.is_ok() {
                f.written = Some(write_workload(&patcher, &w).await);
            }
            found.push(f);
        }
    }

    let summary = Summary {
        planned: found.iter().filter_map(|f| f.plan.as_ref().ok()).map(|p| p.annotations.len()).sum(),
        written: found.iter().filter_map(|f| f.written.as_ref()?.as_ref().ok()).sum(),
        invalid: found.iter().filter(|f| f.plan.is_err()).count(),
        failed: found.iter().filter(|f| matches!(f.written, Some(Err(_)))).count(),
    };
    match args.output {
        Output::Table => render_table(&found, &summary, args.write, out),
        Output::Json => {
            let doc = json!({
                "objects": found.iter().map(found_json).collect::<Vec<_>>(),
                "planned": summary.planned,
                "written": summary.written,
            });
            let _ = writeln!(out, "{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        }
    }
    Ok(summary)
}

/// The one step of a workload's migration, shaped like a target's.
fn workload_migration(w: &WorkloadView, key: &'static str, value: String) -> Migration {
    let step = Step {
        source: format!("annotation {}", loft::EXCLUDE),
        value: w.annotations.get(loft::EXCLUDE).cloned().unwrap_or_default(),
        outcome: Outcome::Annotate { key, value: value.clone() },
    };
    Migration { annotations: BTreeMap::from([(key.to_string(), value)]), steps: vec![step] }
}

/// Adds a target's planned annotations, planned again from a fresh read
/// on a conflict: a `dormant.dev/*` value someone set meanwhile is kept.
async fn write_target(
    annotator: &Annotator,
    object: &crate::target::TargetObject,
    yaml: Option<&str>,
    now: DateTime<Utc>,
) -> Result<usize, String> {
    let count = std::sync::atomic::AtomicUsize::new(0);
    let r = annotator
        .update(object, |current| {
            let c = loft::plan_migration(current, yaml, now).map(|p| changes(&p)).unwrap_or_default();
            count.store(c.len(), std::sync::atomic::Ordering::Relaxed);
            c
        })
        .await;
    match r {
        Ok(Written::Changed) => Ok(count.into_inner()),
        Ok(Written::Unchanged) => Ok(0),
        Err(e) => Err(crate::error::Chain(&e).to_string()),
    }
}

/// Adds a workload's `dormant.dev/exclude`, unless it has one by then.
async fn write_workload(patcher: &Patcher, w: &WorkloadView) -> Result<usize, String> {
    let r = patcher
        .patch_until_settled(w, |w| {
            Ok(loft::plan_workload_migration(&w.annotations)
                .ok()
                .flatten()
                .map(|(k, v)| json!({ "metadata": metadata(&w.resource_version, json!({ k: v })) })))
        })
        .await;
    match r {
        Ok(Written::Changed) => Ok(1),
        Ok(Written::Unchanged) => Ok(0),
        Err(e) => Err(crate::error::Chain(&e).to_string()),
    }
}

fn outcome_text(o: &Outcome) -> String {
    match o {
        Outcome::Annotate { key, value } => format!("{key}: {value}"),
        Outcome::Kept { key, existing } => format!("kept {key}: {existing} (already set)"),
        Outcome::Policy(field) => format!("SleepPolicy {field}"),
        Outcome::Nothing(why) => format!("nothing: {why}"),
    }
}

fn render_table(found: &[Found], summary: &Summary, write: bool, out: &mut String) {
    if found.is_empty() {
        let _ = writeln!(out, "No vCluster Platform sleep settings found.");
        return;
    }
    for f in found {
        let _ = writeln!(out, "{}", f.what);
        if let Some(note) = &f.config_note {
            let _ = writeln!(out, "  vcluster.yaml: {note}");
        }
        match &f.plan {
            Err(e) => {
                let _ = writeln!(out, "  {e}; nothing planned");
            }
            Ok(plan) => {
                for s in &plan.steps {
                    let _ = writeln!(out, "  {} = {:?} → {}", s.source, s.value, outcome_text(&s.outcome));
                }
            }
        }
        match &f.written {
            Some(Ok(n)) => {
                let _ = writeln!(out, "  wrote {}", count(*n, "annotation"));
            }
            Some(Err(e)) => {
                let _ = writeln!(out, "  not written: {e}");
            }
            None => {}
        }
    }
    let objects = found.iter().filter(|f| matches!(&f.plan, Ok(p) if !p.annotations.is_empty())).count();
    let _ = if write {
        writeln!(
            out,
            "\nWrote {} of {} on {}.",
            summary.written,
            count(summary.planned, "annotation"),
            count(objects, "object")
        )
    } else if summary.planned > 0 {
        writeln!(
            out,
            "\n{} to add on {}; `dormant migrate --write` adds them.",
            count(summary.planned, "annotation"),
            count(objects, "object")
        )
    } else {
        writeln!(out, "\nNothing to add: every setting found already has its dormant equivalent or none.")
    };
    if summary.invalid > 0 {
        let _ = writeln!(
            out,
            "{} with invalid settings (above): nothing planned for {}; fix and run again.",
            count(summary.invalid, "object"),
            if summary.invalid == 1 { "it" } else { "them" }
        );
    }
}

/// `1 object`, `3 objects`.
fn count(n: usize, noun: &str) -> String {
    format!("{n} {noun}{}", if n == 1 { "" } else { "s" })
}

fn found_json(f: &Found) -> Value {
    let steps = |p: &Migration| {
        p.steps
            .iter()
            .map(|s| {
                let outcome = match &s.outcome {
                    Outcome::Annotate { key, value } => json!({"annotate": {"key": key, "value": value}}),
                    Outcome::Kept { key, existing } => json!({"kept": {"key": key, "value": existing}}),
                    Outcome::Policy(field) => json!({"policy": field}),
                    Outcome::Nothing(why) => json!({"nothing": why}),
                };
                json!({"source": s.source, "value": s.value, "outcome": outcome})
            })
            .collect::<Vec<_>>()
    };
    let mut v = json!({ "object": f.what });
    match &f.plan {
        Ok(p) => {
            v["steps"] = json!(steps(p));
            v["annotations"] = json!(p.annotations);
        }
        Err(e) => v["error"] = json!(e),
    }
    if let Some(note) = &f.config_note {
        v["vclusterConfig"] = json!(note);
    }
    match &f.written {
        Some(Ok(n)) => v["written"] = json!(n),
        Some(Err(e)) => v["writeError"] = json!(e),
        None => {}
    }
    v
}
