//! `dormant restore`: every sleeping target back as it was, from the
//! records alone, with no agent running — before `helm uninstall` (the
//! chart's pre-delete hook runs it), or when the agent is gone for good.
//!
//! It does what a wake does, without waiting for readiness: each workload
//! from its own record or, when that is gone, from its target's copy
//! (`sleep-record`); KEDA's pauses lifted; the target marked awake with
//! its sleep state cleared. Running it again changes nothing.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::num::NonZeroU32;

use anyhow::Context as _;
use kube::Client;

use crate::annotate::{Annotator, Changes};
use crate::client::{Outcome, Patcher, Throttle};
use crate::policy::TargetKind;
use crate::scaler::{self, Scaler, SleepRecord};
use crate::target::{Scope, TargetRef, stores};
use crate::vocab;

/// How long a refusal to scale the agent is taken for a grant not yet in
/// force (see [`stop_agent`]) before it is an answer.
const GRANT_SETTLES: std::time::Duration = std::time::Duration::from_secs(30);

/// Stops the agent before a restore: scales its Deployment
/// (`namespace/name`) to zero and waits until its Lease (`lease`, in the
/// same namespace) is released or has run out, so no agent acts while the
/// records are given back. An agent still running could be half way
/// through putting a target to sleep, and would finish it after the
/// restore (then be removed with the chart, leaving it asleep). Fails
/// after `timeout`: restoring beside a running agent is what it avoids.
pub async fn stop_agent(
    client: &Client,
    deployment: &str,
    lease: &str,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::coordination::v1::Lease;
    use kube::api::{Api, Patch, PatchParams};
    let (ns, name) = deployment
        .split_once('/')
        .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
        .with_context(|| format!("--stop-agent {deployment:?}: expected <namespace>/<deployment>"))?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let scale = serde_json::json!({"spec": {"replicas": 0}});
    let asked = tokio::time::Instant::now();
    loop {
        match deployments.patch_scale(name, &PatchParams::default(), &Patch::Merge(&scale)).await {
            Ok(_) => break,
            // Gone already: nothing of it runs for long.
            Err(kube::Error::Api(e)) if e.code == 404 => break,
            // The chart's hook grants this right in a Role created just
            // before the Job: the API server's authorizer learns of it from
            // a watch, which can lag behind the pod's first request.
            Err(kube::Error::Api(e)) if e.code == 403 && asked.elapsed() < GRANT_SETTLES => {
                eprintln!(
                    "not yet allowed to scale {deployment} (the grant may not be in force yet); retrying"
                );
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("failed to scale the agent's Deployment {ns}/{name} to zero"));
            }
        }
    }
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    let started = tokio::time::Instant::now();
    loop {
        let held = match leases
            .get_opt(lease)
            .await
            .with_context(|| format!("failed to read Lease {ns}/{lease}"))?
        {
            None => false,
            Some(l) => l.spec.is_some_and(|s| {
                let renewed = s
                    .renew_time
                    .as_ref()
                    .or(s.acquire_time.as_ref())
                    .and_then(|t| crate::target::to_chrono(&t.0));
                let secs = i64::from(s.lease_duration_seconds.unwrap_or(15));
                s.holder_identity.is_some_and(|h| !h.is_empty())
                    && renewed.is_some_and(|at| at + chrono::Duration::seconds(secs) > chrono::Utc::now())
            }),
        };
        if !held {
            return Ok(());
        }
        if started.elapsed() > timeout {
            anyhow::bail!(
                "the agent still holds Lease {ns}/{lease} {}s after its Deployment was scaled to zero; not restoring beside a running agent",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// What a restore did, for its exit code.
#[derive(Debug, Default)]
pub struct Restored {
    /// Workloads and KEDA objects changed.
    pub changed: usize,
    /// Workloads at zero with no record anywhere (named in the output).
    pub lost: usize,
    /// Changes that failed (named in the output).
    pub failed: usize,
}

/// Restores `only` (or every target within `scope`), writing one line per
/// target to `out`.
pub async fn restore(
    client: &Client,
    only: Option<&TargetRef>,
    scope: &Scope,
    out: &mut String,
) -> anyhow::Result<Restored> {
    let (stores, writers) = stores::stores();
    writers.fill(client.clone()).await.context("failed to read the cluster")?;
    let qps = NonZeroU32::new(20).unwrap_or(NonZeroU32::MIN);
    let patcher = Patcher::new(client.clone(), Throttle::new(qps, qps));
    let (scaler, annotator) = (Scaler::new(patcher.clone()), Annotator::new(patcher));
    let mut done = Restored::default();
    for r in stores.targets(&[], scope) {
        if only.is_some_and(|o| *o != r) {
            continue;
        }
        let Some(target) = stores.target(&r) else { continue };
        let annotations = target.object.annotations();
        let copy: Option<SleepRecord> =
            annotations.get(vocab::SLEEP_RECORD).and_then(|v| serde_json::from_str(v).ok());
        let asleep = annotations.get(vocab::STATE).is_some_and(|s| s != "awake");
        let mut said = Vec::new();
        for w in stores.workloads(&target) {
            let before = if w.kind.scales() {
                w.replicas.map(|n| n.to_string()).unwrap_or_default()
            } else {
                format!("suspend={}", w.suspend.unwrap_or(false))
            };
            if asleep && scaler::record_lost(&w, copy.as_ref()) && !w.annotations.contains_key(vocab::EXCLUDE)
            {
                said.push(format!(
                    "{}/{} is at {before} with no record anywhere: left as it is",
                    w.kind.as_str(),
                    w.name
                ));
                done.lost += 1;
                continue;
            }
            match scaler.wake_workload(&w, copy.as_ref()).await {
                Ok(Outcome::Changed) => {
                    done.changed += 1;
                    let recorded = scaler::own_record(&w)
                        .or_else(|| copy.as_ref().and_then(|c| c.get(&scaler::record_key(&w))))
                        .cloned()
                        .unwrap_or_default();
                    said.push(format!("{}/{} {before} → {recorded}", w.kind.as_str(), w.name));
                }
                Ok(_) => {}
                Err(e) => {
                    done.failed += 1;
                    said.push(format!("{}/{}: {}", w.kind.as_str(), w.name, crate::error::chain(&e)));
                }
            }
        }
        if r.kind == TargetKind::Namespace {
            match resume_keda(&scaler, &r.namespace).await {
                Ok(n) if n > 0 => {
                    done.changed += n;
                    said.push(format!("{n} KEDA object(s) given back their pause"));
                }
                Ok(_) => {}
                // dormant pauses only what it may read: where it may not
                // list KEDA's objects (a namespace the chart does not grant
                // it, in namespaces mode) no pause is its own.
                Err(e) if e.read_forbidden() => {}
                Err(e) => {
                    done.failed += 1;
                    said.push(format!("KEDA: {}", crate::error::chain(&e)));
                }
            }
        }
        if done.failed == 0 && (asleep || copy.is_some()) {
            let mut changes: Changes = BTreeMap::new();
            changes.insert(vocab::STATE, Some("awake".into()));
            // Used now: an agent still running (the pre-delete hook runs
            // before the chart's Deployment goes) does not put it straight
            // back to sleep.
            changes
                .insert(vocab::LAST_ACTIVITY, Some(crate::policy::annotations::rfc3339(chrono::Utc::now())));
            changes.insert(vocab::LAST_ACTIVITY_BY, Some("dormant restore (cli)".into()));
            for k in [
                vocab::ASLEEP_SINCE,
                vocab::ASLEEP_REQUESTS,
                vocab::SLEEP_RECORD,
                vocab::FORCE_SLEEP,
                vocab::PREVENT_WAKEUP_UNTIL,
            ] {
                changes.insert(k, None);
            }
            if let Err(e) = annotator.set(&target.object, &changes).await {
                done.failed += 1;
                said.push(format!("marking it awake: {}", crate::error::chain(&e)));
            } else {
                said.push("marked awake".into());
            }
        }
        if !said.is_empty() {
            let _ = writeln!(out, "{r}: {}", said.join("; "));
        }
    }
    if done.changed == 0 && done.lost == 0 && done.failed == 0 {
        let _ = writeln!(out, "nothing to restore");
    }
    Ok(done)
}

async fn resume_keda(scaler: &Scaler, namespace: &str) -> Result<usize, scaler::Error> {
    let mut n = 0;
    for so in scaler.resumable_scaled_objects(namespace).await? {
        if so.asleep() && scaler.resume_scaled_object(&so).await? == Outcome::Changed {
            n += 1;
        }
    }
    for sj in scaler.scaled_jobs(namespace).await? {
        if sj.asleep() && scaler.resume_scaled_job(&sj).await? == Outcome::Changed {
            n += 1;
        }
    }
    Ok(n)
}
