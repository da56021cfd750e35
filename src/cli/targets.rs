//! `dormant status`, `explain`, `sleep` and `wake`: read the cluster the way
//! the agent does (the same stores, the same evaluation) and change targets
//! only through their annotations, which the agent acts on.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context as _, bail};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use kube::api::{Api, DynamicObject};
use kube::discovery::ApiResource;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};

use crate::annotate::Annotator;
use crate::client::{Patcher, Throttle, whoami};
use crate::controller::{Evaluation, Invalid, evaluate};
use crate::policy::annotations::{TargetState, Until, rfc3339};
use crate::policy::decide::Desired;
use crate::policy::duration;
use crate::policy::{Defaults, Origin};
use crate::target::stores::{self, Stores};
use crate::target::{Scope, TargetKind, TargetObject, TargetRef};
use crate::vocab;

/// The cluster as the agent would see it.
pub struct View {
    pub stores: Stores,
    pub scope: Scope,
    pub defaults: Defaults,
}

impl View {
    pub async fn load(client: &Client) -> anyhow::Result<View> {
        let (stores, writers) = stores::stores();
        writers.fill(client.clone()).await.context("failed to read the cluster")?;
        let excluded: HashSet<String> = ["kube-system", "kube-public", "kube-node-lease", "dormant"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        Ok(View { stores, scope: Scope { excluded, ..Scope::default() }, defaults: Defaults::default() })
    }

    pub fn evaluate(&self, r: &TargetRef, now: DateTime<Utc>) -> Result<Option<Evaluation>, Invalid> {
        evaluate(&self.stores, &self.defaults, &self.scope, None, r, now)
    }

    pub fn targets(&self) -> Vec<TargetRef> {
        self.stores.targets(&self.stores.candidates(), &self.scope)
    }
}

/// `1h2m`, `45s` (whole seconds).
pub fn short(d: chrono::Duration) -> String {
    duration::format(Duration::from_secs(d.num_seconds().max(0) as u64))
}

fn next_text(ev: &Evaluation, now: DateTime<Utc>) -> String {
    match (ev.decision.next, ev.decision.desired) {
        (_, Desired::Leave) => "disabled".into(),
        (Some(at), Desired::Awake) => format!("asleep in {}", short(at - now)),
        (Some(at), Desired::Asleep) => format!("awake in {}", short(at - now)),
        (None, Desired::Asleep) if ev.policy.wake_on_request.value => "wakes on request".into(),
        (None, Desired::Asleep) => "stays asleep".into(),
        (None, Desired::Awake) => "never sleeps".into(),
    }
}

fn idle_for(ev: &Evaluation, now: DateTime<Utc>) -> String {
    let since = ev.last_use.as_ref().map_or(ev.first_seen, |u| u.at);
    short(now - since)
}

/// One row of `dormant status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub target: String,
    pub kind: String,
    pub state: String,
    pub desired: String,
    pub idle_for: String,
    pub next: String,
    pub policy: String,
    pub reason: String,
}

pub fn rows(view: &View, now: DateTime<Utc>) -> Vec<Row> {
    view.targets()
        .iter()
        .filter_map(|t| match view.evaluate(t, now) {
            Ok(Some(ev)) => Some(Row {
                target: t.to_string(),
                kind: t.kind.as_str().into(),
                state: ev.annotations.state.unwrap_or(TargetState::Awake).as_str().into(),
                desired: format!("{:?}", ev.decision.desired).to_lowercase(),
                idle_for: idle_for(&ev, now),
                next: next_text(&ev, now),
                policy: ev.policy.policy.clone().unwrap_or_else(|| "-".into()),
                reason: ev.decision.reason.to_string(),
            }),
            Ok(None) => None,
            Err(e) => Some(Row {
                target: t.to_string(),
                kind: t.kind.as_str().into(),
                state: "invalid".into(),
                desired: "-".into(),
                idle_for: "-".into(),
                next: "-".into(),
                policy: e.policy().unwrap_or("-").to_string(),
                reason: e.to_string(),
            }),
        })
        .collect()
}

pub fn table(rows: &[Row]) -> String {
    let header = ["TARGET", "KIND", "STATE", "IDLE FOR", "NEXT", "POLICY"];
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            [
                r.target.clone(),
                r.kind.clone(),
                r.state.clone(),
                r.idle_for.clone(),
                r.next.clone(),
                r.policy.clone(),
            ]
        })
        .collect();
    let mut width = header.map(str::len);
    for c in &cells {
        for (i, v) in c.iter().enumerate() {
            width[i] = width[i].max(v.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, vals: &[&str]| {
        let mut l = String::new();
        for (i, v) in vals.iter().enumerate() {
            if i + 1 == vals.len() {
                l.push_str(v);
            } else {
                let _ = write!(l, "{v:<w$}   ", w = width[i]);
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut out, &header);
    for c in &cells {
        let v: Vec<&str> = c.iter().map(String::as_str).collect();
        line(&mut out, &v);
    }
    out
}

pub async fn status(client: &Client, json_output: bool) -> anyhow::Result<String> {
    let view = View::load(client).await?;
    let rows = rows(&view, Utc::now());
    if json_output { Ok(serde_json::to_string_pretty(&rows)? + "\n") } else { Ok(table(&rows)) }
}

fn origin(o: &Origin) -> String {
    format!("(from {o})")
}

/// `dormant explain TARGET`.
pub async fn explain(client: &Client, r: &TargetRef) -> anyhow::Result<String> {
    let view = View::load(client).await?;
    let now = Utc::now();
    let mut out = String::new();
    let Some(target) = view.stores.target(r) else {
        bail!(
            "{r} does not exist (expected a namespace, or a vcluster StatefulSet/Deployment labelled app=vcluster)"
        )
    };
    let object = match &target.object {
        TargetObject::Namespace(_) => format!("Namespace {}", r.namespace),
        TargetObject::StatefulSet(_) => format!("StatefulSet {}/{}", r.namespace, r.name),
        TargetObject::Deployment(_) => format!("Deployment {}/{}", r.namespace, r.name),
    };
    let _ = writeln!(out, "Target:   {r} ({object})");
    let ev = match view.evaluate(r, now) {
        Ok(Some(ev)) => ev,
        Ok(None) => {
            let _ = writeln!(
                out,
                "Not a target: no SleepPolicy selects this namespace and it carries no dormant.dev/ annotation."
            );
            return Ok(out);
        }
        Err(e) => {
            let _ = writeln!(out, "State:    invalid ({})", e.category());
            let _ = writeln!(out, "Problem:  {e}");
            let _ = writeln!(out, "Dormant leaves this target exactly as it is until this is fixed.");
            return Ok(out);
        }
    };
    let a = &ev.annotations;
    let state = a.state.unwrap_or(TargetState::Awake);
    match (state, a.asleep_since) {
        (TargetState::Asleep | TargetState::Sleeping, Some(s)) => {
            let _ = writeln!(out, "State:    {state} since {} ({} ago)", rfc3339(s), short(now - s));
        }
        _ => {
            let _ = writeln!(out, "State:    {state}");
        }
    }
    let desired = format!("{:?}", ev.decision.desired).to_lowercase();
    let _ = writeln!(out, "Desired:  {desired}: {}", ev.decision.reason);
    if ev.decision.desired == Desired::Leave && state != TargetState::Awake {
        let _ = writeln!(
            out,
            "Note:     disabled while {state}: its workloads stay as dormant left them (scaled down, with \
             their records); remove {} and run `dormant wake {}` to bring them back",
            vocab::DISABLED,
            ev.target.r
        );
    }
    let _ = writeln!(
        out,
        "Next:     {}",
        match ev.decision.next {
            Some(at) => format!(
                "{} at {} (in {})",
                if ev.decision.desired == Desired::Awake { "asleep" } else { "awake" },
                rfc3339(at),
                short(at - now)
            ),
            None => next_text(&ev, now),
        }
    );
    match &ev.last_use {
        Some(u) => {
            let _ = writeln!(out, "Last use: {} by {} ({} ago)", rfc3339(u.at), u.by, short(now - u.at));
        }
        None => {
            let _ = writeln!(
                out,
                "Last use: none recorded since dormant first saw it at {}",
                rfc3339(ev.first_seen)
            );
        }
    }
    if !a.activity_sources.is_empty() {
        let who: Vec<String> = a.activity_sources.iter().map(|(who, n)| format!("{who}: {n}")).collect();
        let _ = writeln!(out, "Used by:  {} (requests, halved every day)", who.join(", "));
    }
    for (label, text) in ev.foresight(now) {
        let _ = writeln!(out, "{label}: {text}");
    }
    if let Some(f) = &ev.forced {
        let until = match f.prevent_wakeup_until {
            Some(Until::Never) => "; requests never wake it".to_string(),
            Some(Until::Time(t)) => format!("; requests do not wake it until {}", rfc3339(t)),
            None => String::new(),
        };
        let _ = writeln!(out, "Forced:   asleep by hand since {}{until}", rfc3339(f.since));
    }
    let p = &ev.policy;
    let _ = writeln!(
        out,
        "Policy:   {}{}",
        p.policy.as_ref().map_or("none (agent defaults)".to_string(), |n| format!("SleepPolicy {n}")),
        if p.tied_with.is_empty() {
            String::new()
        } else {
            format!(" (won a tie by name over {})", p.tied_with.join(", "))
        }
    );
    let delete_after = p.delete_after.map(|d| {
        (
            "deleteAfter",
            format!(
                "{}, warned {} before ({})",
                duration::format(d.after),
                duration::format(d.warning),
                crate::policy::lint::DELETE_AFTER_NOTE
            ),
            String::new(),
        )
    });
    let rows = crate::api::model::policy_settings(p).into_iter().map(|(k, v, o)| (k, v, origin(o)));
    for (k, v, o) in rows.chain(delete_after) {
        let _ = writeln!(out, "  {k:<16} {v:<40} {o}");
    }
    let _ = writeln!(out, "Workloads:");
    for w in &ev.workloads {
        let now_value = match (w.replicas, w.suspend) {
            (Some(r), _) => format!("replicas {r} ({} ready)", w.ready_pods),
            (None, Some(s)) => format!("suspend {s}"),
            _ => String::new(),
        };
        let record = w
            .annotations
            .get(vocab::REPLICAS_BEFORE_SLEEP)
            .map(|v| format!(", {v} before sleep"))
            .or_else(|| {
                w.annotations.get(vocab::SUSPEND_BEFORE_SLEEP).map(|v| format!(", suspend {v} before sleep"))
            })
            .unwrap_or_default();
        let excluded = if ev.excluded(w) { " [excluded]" } else { "" };
        let _ = writeln!(out, "  {} {}: {now_value}{record}{excluded}", w.kind.as_str(), w.name);
    }
    if r.kind == TargetKind::VCluster {
        let _ = writeln!(out, "Synced pods: {}", ev.synced_pods.len());
    }
    Ok(out)
}

fn target_api(client: &Client, r: &TargetRef, object: &TargetObject) -> Api<DynamicObject> {
    match object {
        TargetObject::Namespace(_) => {
            Api::all_with(client.clone(), &ApiResource::erase::<k8s_openapi::api::core::v1::Namespace>(&()))
        }
        TargetObject::StatefulSet(_) => Api::namespaced_with(
            client.clone(),
            &r.namespace,
            &ApiResource::erase::<k8s_openapi::api::apps::v1::StatefulSet>(&()),
        ),
        TargetObject::Deployment(_) => Api::namespaced_with(
            client.clone(),
            &r.namespace,
            &ApiResource::erase::<k8s_openapi::api::apps::v1::Deployment>(&()),
        ),
    }
}

/// The target `r` as the cluster has it now, and a writer of its
/// annotations.
async fn target_and_writer(client: &Client, r: &TargetRef) -> anyhow::Result<(TargetObject, Annotator)> {
    let view = View::load(client).await?;
    let Some(t) = view.stores.target(r) else {
        bail!(
            "{r} does not exist (expected a namespace, or a vcluster StatefulSet/Deployment labelled app=vcluster)"
        )
    };
    let ten = std::num::NonZeroU32::new(10).unwrap_or(std::num::NonZeroU32::MIN);
    Ok((t.object, Annotator::new(Patcher::new(client.clone(), Throttle::new(ten, ten)))))
}

/// Waits until the target's recorded state is `want`, printing each state
/// it passes through.
async fn wait_for_state(
    client: &Client,
    r: &TargetRef,
    object: &TargetObject,
    want: TargetState,
    timeout: Duration,
    out: &mut (dyn std::io::Write + Send),
) -> anyhow::Result<()> {
    let api = target_api(client, r, object);
    let name = if r.kind == TargetKind::Namespace { r.namespace.clone() } else { r.name.clone() };
    let started = tokio::time::Instant::now();
    let stream = watcher(api, watcher::Config::default().fields(&format!("metadata.name={name}")));
    futures::pin_mut!(stream);
    let mut last: Option<String> = None;
    let wait = async {
        while let Some(ev) = stream.next().await {
            let obj = match ev {
                Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => o,
                Ok(_) => continue,
                Err(e) => return Err(anyhow::anyhow!("watching {r}: {e}")),
            };
            let state = obj.annotations().get(vocab::STATE).cloned().unwrap_or_else(|| "awake".into());
            if last.as_ref() != Some(&state) {
                let _ = writeln!(out, "{r}: {state} ({:.1}s)", started.elapsed().as_secs_f64());
                last = Some(state.clone());
            }
            if state == want.as_str() {
                return Ok(());
            }
        }
        Err(anyhow::anyhow!("the watch of {r} ended"))
    };
    match tokio::time::timeout(timeout, wait).await {
        Ok(r) => r,
        Err(_) => bail!("{r} was not {want} after {}; see `dormant explain {r}`", duration::format(timeout)),
    }
}

/// `dormant sleep TARGET [--prevent-wakeup D|never] [--wait]`.
pub async fn sleep(
    client: &Client,
    r: &TargetRef,
    prevent_wakeup: Option<&str>,
    wait: Option<Duration>,
    out: &mut (dyn std::io::Write + Send),
) -> anyhow::Result<()> {
    let now = Utc::now();
    let until = match prevent_wakeup {
        None => None,
        Some("never") => Some(Until::Never),
        Some(d) => {
            let d = duration::parse(d).map_err(|e| anyhow::anyhow!("--prevent-wakeup: {e}"))?;
            Some(Until::Time(now + chrono::Duration::from_std(d)?))
        }
    };
    let (object, annotator) = target_and_writer(client, r).await?;
    annotator.request_sleep(&object, until).await.with_context(|| format!("failed to annotate {r}"))?;
    let note = match until {
        None => String::new(),
        Some(Until::Never) => "; requests will not wake it until `dormant wake`".into(),
        Some(Until::Time(t)) => format!("; requests will not wake it until {}", rfc3339(t)),
    };
    writeln!(out, "{r}: sleep requested{note}")?;
    if let Some(timeout) = wait {
        wait_for_state(client, r, &object, TargetState::Asleep, timeout, out).await?;
    }
    Ok(())
}

/// `dormant wake TARGET [--wait]`.
pub async fn wake(
    client: &Client,
    r: &TargetRef,
    wait: Option<Duration>,
    out: &mut (dyn std::io::Write + Send),
) -> anyhow::Result<()> {
    let user = whoami(client).await;
    let (object, annotator) = target_and_writer(client, r).await?;
    annotator
        .request_wake(&object, format!("{user} wake {r} (cli)"))
        .await
        .with_context(|| format!("failed to annotate {r}"))?;
    writeln!(out, "{r}: wake requested by {user}")?;
    if let Some(timeout) = wait {
        wait_for_state(client, r, &object, TargetState::Awake, timeout, out).await?;
    }
    Ok(())
}
