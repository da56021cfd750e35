//! One reconcile of one target: evaluate, then move the cluster one step
//! towards the desired state. Every step is idempotent and safe to
//! interrupt; the next reconcile (triggered by the watch of our own
//! patches) continues where this one stopped.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::runtime::events::{Event, EventType};

use super::{Context, Error, Evaluation, Invalid, Summary, delete, evaluate, lock, prewake};
use crate::metrics::{CategoryLabels, SavingsLabels, TransitionLabels, TriggerLabels};
use crate::policy::TargetKind;
use crate::policy::annotations::{TargetState, format_requests, rfc3339};
use crate::policy::decide::Desired;
use crate::scaler::{self, gitops, sleep_patch_marked, wake_patch_unmarked};
use crate::target::TargetRef;
use crate::vocab;

type Annotations = BTreeMap<&'static str, Option<String>>;

pub(super) async fn reconcile(ctx: &Context, r: &TargetRef) -> Result<Option<DateTime<Utc>>, Error> {
    if !ctx.is_leader() {
        return Ok(None);
    }
    // Observed when dropped: a reconcile abandoned at its timeout counts too.
    let _timer = ctx.metrics.reconcile_timer();
    let now = Utc::now();
    let newest = ctx.ledger.newest(r);
    let ev = match evaluate(&ctx.stores, &ctx.config.defaults, &ctx.config.scope, newest.as_ref(), r, now) {
        Ok(Some(ev)) => ev,
        Ok(None) => {
            forget(ctx, r);
            return Ok(None);
        }
        Err(invalid) => {
            report_invalid(ctx, r, &invalid).await;
            return Ok(None);
        }
    };
    if lock(&ctx.reported_invalid).remove(r).is_some() {
        tracing::info!(target = %r, "target is valid again");
    }
    // This replica changed the target's state from what the cache still
    // shows: wait for the cache rather than act twice on the old state. The
    // cache is behind while it shows another state, not only while it shows
    // the version the write was based on: a version written in between (a
    // scale patch on a control plane that is its own target, a status
    // update) still carries the old state.
    {
        let mut unseen = lock(&ctx.unseen_writes);
        if let Some((state, at)) = unseen.get(r) {
            if ev.annotations.state.unwrap_or(TargetState::Awake) != *state && at.elapsed() < CACHE_CATCH_UP {
                // The watch event that brings the cache up to date runs
                // this target again; looking again on a timer as well
                // would evaluate thousands of targets several times a
                // second while a busy API server's watch lags (the agent's
                // own CPU then slowed every sleep and wake at 10,000
                // targets). The timer only ends the wait.
                let left = CACHE_CATCH_UP.saturating_sub(at.elapsed());
                return Ok(Some(now + chrono::Duration::from_std(left).unwrap_or_default()));
            }
            unseen.remove(r);
        }
    }
    prewake::settle(ctx, &ev, now);
    let mut annotations = Annotations::new();
    if ev.first_seen_missing {
        annotations.insert(vocab::FIRST_SEEN, Some(rfc3339(now)));
    }
    if ev.force_unstamped
        && let Some(f) = ev.forced
    {
        annotations.insert(vocab::FORCE_SLEEP, Some(rfc3339(f.since)));
    }
    if !ev.hand_scaled.is_empty()
        && let Some(u) = &ev.last_use
    {
        tracing::info!(target = %r, workloads = ?ev.hand_scaled, "scaled by hand while asleep: waking");
        annotations.insert(vocab::LAST_ACTIVITY, Some(rfc3339(u.at)));
        annotations.insert(vocab::LAST_ACTIVITY_BY, Some(u.by.clone()));
    }
    let dry_run = ctx.config.dry_run || ev.policy.dry_run.value;
    if !ev.takeover.is_empty() && !dry_run {
        tracing::info!(target = %r, "taking vCluster Platform's forced sleep over as dormant's own");
        annotations.extend(ev.takeover.iter().map(|(k, v)| (*k, v.clone())));
    }
    // When to look again for app traffic still held after a wake, or not
    // held at a sleep.
    let mut again = None;
    let result = match ev.decision.desired {
        Desired::Leave => Ok(()),
        _ if dry_run => {
            tracing::info!(target = %r, desired = ?ev.decision.desired, reason = %ev.decision.reason, "dry run: not acting");
            Ok(())
        }
        Desired::Asleep => sleep(ctx, &ev, &mut annotations, now, &mut again).await,
        Desired::Awake => wake(ctx, &ev, &mut annotations, now, &mut again).await,
    };
    // delete-after, once the target is where the decision wanted it.
    let deletion = match &result {
        Ok(()) => {
            let plan = delete::plan(&delete::Facts::of(&ev, ctx.config.delete_after, dry_run), now);
            delete::act(ctx, &ev, plan, &mut annotations).await
        }
        Err(_) => Ok(None),
    };
    let written = ctx.annotator.set(&ev.target.object, &annotations).await;
    if written.is_ok()
        && let Some(Some(state)) = annotations.get(vocab::STATE)
        && let Ok(state) = state.parse()
    {
        wrote_state(ctx, &ev, state);
    }
    summarize(ctx, &ev, &annotations);
    result?;
    written?;
    let deletion = deletion?;
    Ok([ev.look_again(), again, deletion].into_iter().flatten().min())
}

/// How long a reconcile waits for the cache to show this replica's own
/// state change before acting anyway (a write that changed nothing, a
/// watch that lags).
const CACHE_CATCH_UP: std::time::Duration = std::time::Duration::from_secs(10);

/// Remembers that this reconcile wrote `state` on `ev`'s target.
fn wrote_state(ctx: &Context, ev: &Evaluation, state: TargetState) {
    if ev.annotations.state.unwrap_or(TargetState::Awake) != state {
        lock(&ctx.unseen_writes).insert(ev.target.r.clone(), (state, tokio::time::Instant::now()));
    }
}

fn forget(ctx: &Context, r: &TargetRef) {
    if lock(&ctx.summaries).remove(r).is_some() {
        ctx.metrics.forget_target(r);
        ctx.ledger.forget(r);
    }
    prewake::forget(ctx, r);
}

/// Publishes an Event about the target. Events with the same reason and
/// action are aggregated into a series (keeping the first note), so the
/// action carries the trigger: each kind of wake keeps its own note.
pub(super) async fn publish(ctx: &Context, ev: &Evaluation, type_: EventType, reason: &str, note: String) {
    let trigger = ev.decision.reason.trigger();
    let action = format!("{reason}{}{}", trigger[..1].to_ascii_uppercase(), &trigger[1..]);
    let event =
        Event { type_, reason: reason.into(), note: Some(truncate(note, 1000)), action, secondary: None };
    if let Err(e) = ctx.publish(&event, &ev.target.object.object_ref()).await {
        tracing::warn!(target = %ev.target.r, error = %e, "failed to publish event {reason}");
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

async fn report_invalid(ctx: &Context, r: &TargetRef, invalid: &Invalid) {
    let message = invalid.to_string();
    {
        let mut summaries = lock(&ctx.summaries);
        let s = summaries.entry(r.clone()).or_insert_with(|| Summary {
            kind: r.kind,
            policy: None,
            state: TargetState::Awake,
            desired: None,
            next: None,
            invalid: None,
        });
        s.invalid = Some((invalid.policy().map(String::from), message.clone()));
        s.desired = None;
    }
    let previous = lock(&ctx.reported_invalid).insert(r.clone(), message.clone());
    if previous.as_deref() == Some(message.as_str()) {
        return;
    }
    tracing::warn!(target = %r, category = invalid.category(), %message, "invalid policy or annotation; target left untouched");
    ctx.metrics.reconcile_errors.get_or_create(&CategoryLabels { category: invalid.category().into() }).inc();
    if let Some(target) = ctx.stores.target(r) {
        let event = Event {
            type_: EventType::Warning,
            reason: "PolicyInvalid".into(),
            note: Some(truncate(format!("{message}; dormant leaves this target as it is"), 1000)),
            action: "Evaluate".into(),
            secondary: None,
        };
        if let Err(e) = ctx.publish(&event, &target.object.object_ref()).await {
            tracing::warn!(target = %r, error = %e, "failed to publish event PolicyInvalid");
        }
    }
}

/// One step towards asleep: mark `sleeping` (with what runs, for the
/// savings; a vcluster's in its control plane's scale patch), scale every
/// workload down, then (vcluster) delete the synced pods once the control
/// plane is down, then mark `asleep`.
async fn sleep(
    ctx: &Context,
    ev: &Evaluation,
    annotations: &mut Annotations,
    now: DateTime<Utc>,
    again: &mut Option<DateTime<Utc>>,
) -> Result<(), Error> {
    let r = &ev.target.r;
    let mut written = None;
    // The target's copy of every record this sleep makes, complete before
    // any workload changes (a workload that appears later joins it before
    // its own patch).
    let copy = ev.annotations.sleep_record.clone().unwrap_or_default();
    let mut full_copy = copy.clone();
    // Once asleep, a workload at zero with no record on itself nor in the
    // copy lost them both (removed by hand): recording it now would record
    // zero. It is left for the wake to report.
    let first_pass = matches!(ev.state, TargetState::Awake | TargetState::Waking);
    let lost = |w: &crate::target::WorkloadView| !first_pass && scaler::record_lost(w, Some(&copy));
    for w in ev.workloads.iter().filter(|w| !lost(w)) {
        if let Some(v) = scaler::own_record(w) {
            full_copy.entry(scaler::record_key(w)).or_insert_with(|| v.clone());
        } else if let Some(v) = scaler::record_to_write(w, ev.excluded(w), Some(&copy)) {
            full_copy.insert(scaler::record_key(w), v);
        }
    }
    let copy_changed = full_copy != copy || ev.annotations.sleep_record.is_none() && !full_copy.is_empty();
    if copy_changed {
        annotations.insert(vocab::SLEEP_RECORD, Some(record_json(&full_copy)));
    }
    if first_pass {
        let requests = ev.running_requests();
        annotations.insert(vocab::STATE, Some(TargetState::Sleeping.as_str().into()));
        annotations.insert(vocab::ASLEEP_SINCE, Some(rfc3339(now)));
        annotations
            .insert(vocab::ASLEEP_REQUESTS, Some(format_requests(requests.cpu_cores, requests.memory_bytes)));
    }
    // A vcluster's control plane is its target object: the mark (and the
    // copy) go in the patch that scales it down, one request instead of two
    // and no instant with one but not the other. Nothing else of a vcluster
    // must happen before it: Argo CD is never paused for one, and its app
    // traffic is held after (below), which is still before any synced pod
    // goes (the pods keep running with the control plane down).
    let mark = first_pass || copy_changed;
    let folded = ev
        .control_plane()
        .filter(|cp| mark && !lost(cp))
        .filter(|cp| sleep_patch_marked(cp, ev.excluded(cp), Some(&copy)).is_ok());
    if mark {
        // Written before any other workload changes: a crash from here on
        // leaves a target that says it is going to sleep.
        let excluded = folded.is_some_and(|cp| ev.excluded(cp));
        let make = |w: &crate::target::WorkloadView| sleep_patch_marked(w, excluded, Some(&copy));
        match write_mark(ctx, ev, "SleepFailed", annotations, folded, make).await? {
            Marked::Written(w) => written = w,
            Marked::Gone => return Ok(()),
        }
    }
    if first_pass {
        wrote_state(ctx, ev, TargetState::Sleeping);
        if let Some(edge) = ev.decision.reason.at() {
            let lag = (Utc::now() - edge).num_milliseconds() as f64 / 1000.0;
            // Only for edges that just passed (not a sleep resumed after a restart).
            if (0.0..300.0).contains(&lag) {
                ctx.metrics.sleep_lag.observe(lag);
            }
        }
        lock(&ctx.waking).remove(r);
        tracing::info!(target = %r, reason = %ev.decision.reason, "putting to sleep");
    }
    // Argo CD told to leave the workloads alone before they change.
    step(ctx, ev, "SleepFailed", pause_argocd(ctx, ev)).await?;
    // A namespace's app traffic is held before any workload scales down:
    // no request meets a Service without an endpoint.
    if r.kind == TargetKind::Namespace && !hold_app_traffic(ctx, ev).await {
        *again = Some(now + chrono::Duration::seconds(HOLD_RETRY_SECONDS));
    }
    let mut pending = false;
    let mut patches = Vec::new();
    for w in ev.workloads.iter().filter(|w| !lost(w)) {
        let w = after_target_write(w, &written);
        let excluded = ev.excluded(&w);
        // Judged against the copy as it was: a workload this pass adds to
        // the copy still gets its own record.
        if !matches!(sleep_patch_marked(&w, excluded, Some(&copy)), Ok(None)) {
            pending = true;
        }
        if folded.is_some_and(|cp| same_workload(cp, &w)) {
            continue;
        }
        let copy = &copy;
        patches.push(async move { ctx.scaler.sleep_workload(&w, excluded, Some(copy)).await });
    }
    step(ctx, ev, "SleepFailed", a_few_at_once(patches)).await?;
    // KEDA after the workloads, which are recorded and at zero by now: a
    // pause first would let KEDA scale a workload to zero before its count
    // was recorded (a failed or slow step in between, a shared schedule
    // queueing patches behind the client's rate limit), and "0" would be
    // recorded and restored. KEDA could scale a workload up again in the
    // moment before the pause lands (a trigger active right then): that
    // only shows as a hand-scaled workload, which wakes the target.
    if r.kind == TargetKind::Namespace && ev.state != TargetState::Asleep {
        step(ctx, ev, "SleepFailed", pause_keda(ctx, ev)).await?;
    }
    if r.kind == TargetKind::VCluster {
        if !hold_app_traffic(ctx, ev).await {
            *again = Some(now + chrono::Duration::seconds(HOLD_RETRY_SECONDS));
        }
        if !ev.control_plane_down() {
            pending = true;
        } else {
            let doomed: Vec<&Pod> =
                ev.synced_pods.iter().map(AsRef::as_ref).filter(|p| scaler::restorable(p)).collect();
            if !doomed.is_empty() {
                step(ctx, ev, "SleepFailed", ctx.scaler.delete_synced_pods(&r.namespace, &r.name, &doomed))
                    .await?;
                pending = true;
            }
        }
    }
    if !pending && ev.state != TargetState::Asleep {
        annotations.insert(vocab::STATE, Some(TargetState::Asleep.as_str().into()));
        if ev.annotations.asleep_since.is_none() {
            annotations.insert(vocab::ASLEEP_SINCE, Some(rfc3339(now)));
        }
        let trigger = ev.decision.reason.trigger();
        ctx.metrics
            .transitions
            .get_or_create(&TransitionLabels {
                kind: r.kind.as_str().into(),
                direction: "sleep".into(),
                trigger: trigger.into(),
            })
            .inc();
        tracing::info!(target = %r, reason = %ev.decision.reason, "asleep");
        publish(ctx, ev, EventType::Normal, "Slept", format!("Asleep: {}", ev.decision.reason)).await;
        let bare: Vec<String> = ev
            .synced_pods
            .iter()
            .filter(|p| !scaler::restorable(p))
            .map(|p| scaler::virtual_name(p))
            .collect();
        if !bare.is_empty() {
            tracing::warn!(target = %r, pods = ?bare, "bare pods in the vcluster keep running while it sleeps");
            let note = format!(
                "{} bare pod(s) kept running ({}): a pod without a controller in the vcluster would be lost for good if its host pod were deleted",
                bare.len(),
                bare.join(", ")
            );
            publish(ctx, ev, EventType::Warning, "BarePodsKept", note).await;
        }
    }
    Ok(())
}

/// One step towards awake: mark `waking` (clearing a forced sleep), restore
/// every workload, and mark `awake` once everything is back and ready.
async fn wake(
    ctx: &Context,
    ev: &Evaluation,
    annotations: &mut Annotations,
    now: DateTime<Utc>,
    again: &mut Option<DateTime<Utc>>,
) -> Result<(), Error> {
    let r = &ev.target.r;
    // The target's copy of the records, with the workloads' own records in
    // it (a target put to sleep by an older dormant has only those): the
    // wake patches clear the own records, the copy stays until awake.
    let mut copy = ev.annotations.sleep_record.clone().unwrap_or_default();
    for w in &ev.workloads {
        if let Some(v) = scaler::own_record(w) {
            copy.entry(scaler::record_key(w)).or_insert_with(|| v.clone());
        }
    }
    let copy_changed = ev.annotations.sleep_record.as_ref() != Some(&copy) && !copy.is_empty();
    let copy = (ev.annotations.sleep_record.is_some() || !copy.is_empty()).then_some(copy);
    let records = ev.workloads.iter().any(|w| !matches!(wake_patch_unmarked(w, copy.as_ref()), Ok(None)));
    let forced_leftover =
        ev.annotations.force_sleep.is_some() || ev.annotations.prevent_wakeup_until.is_some();
    if ev.state == TargetState::Awake && !records {
        release_app_traffic(ctx, ev, now, again).await;
        if ev.annotations.state.is_none() {
            annotations.insert(vocab::STATE, Some(TargetState::Awake.as_str().into()));
        }
        if forced_leftover {
            annotations.insert(vocab::FORCE_SLEEP, None);
            annotations.insert(vocab::PREVENT_WAKEUP_UNTIL, None);
        }
        return Ok(());
    }
    let scaled_objects = match r.kind {
        TargetKind::Namespace => {
            step(ctx, ev, "WakeFailed", ctx.scaler.resumable_scaled_objects(&r.namespace)).await?
        }
        TargetKind::VCluster => Vec::new(),
    };
    let mut written = None;
    if let Some(copy) = copy.as_ref().filter(|_| copy_changed) {
        annotations.insert(vocab::SLEEP_RECORD, Some(record_json(copy)));
    }
    let first_pass = ev.state != TargetState::Waking;
    if first_pass {
        annotations.insert(vocab::STATE, Some(TargetState::Waking.as_str().into()));
        annotations.insert(vocab::FORCE_SLEEP, None);
        annotations.insert(vocab::PREVENT_WAKEUP_UNTIL, None);
    }
    // As for a sleep: a vcluster's control plane carries the mark in the
    // patch that wakes it.
    let mark = first_pass || copy_changed;
    let folded = ev.control_plane().filter(|cp| mark && wake_patch_unmarked(cp, copy.as_ref()).is_ok());
    if mark {
        let make = |w: &crate::target::WorkloadView| wake_patch_unmarked(w, copy.as_ref());
        match write_mark(ctx, ev, "WakeFailed", annotations, folded, make).await? {
            Marked::Written(w) => written = w,
            Marked::Gone => return Ok(()),
        }
    }
    if first_pass {
        wrote_state(ctx, ev, TargetState::Waking);
        lock(&ctx.waking).insert(r.clone(), (tokio::time::Instant::now(), ev.decision.reason.trigger()));
        tracing::info!(target = %r, reason = %ev.decision.reason, "waking");
    }
    let mut patches = Vec::new();
    for w in ev.workloads.iter().filter(|w| !folded.is_some_and(|cp| same_workload(cp, w))) {
        let w = after_target_write(w, &written);
        let copy = copy.as_ref();
        patches.push(async move { ctx.scaler.wake_workload(&w, copy).await });
    }
    step(ctx, ev, "WakeFailed", a_few_at_once(patches)).await?;
    // KEDA and Argo CD last: their pauses are lifted once the workloads
    // are back.
    if r.kind == TargetKind::Namespace {
        step(ctx, ev, "WakeFailed", resume_keda(ctx, ev, &scaled_objects)).await?;
    }
    step(ctx, ev, "WakeFailed", resume_argocd(ctx, ev)).await?;
    // A workload the sleep left at zero whose record is gone everywhere is
    // never ready: nothing can tell what it ran. (Every record dormant ever
    // made is in the copy by now, so a workload at zero outside it was not
    // at zero by choice.)
    let lost: Vec<String> = ev
        .workloads
        .iter()
        .filter(|w| !ev.excluded(w) && scaler::record_lost(w, copy.as_ref()))
        .map(|w| format!("{}/{}", w.kind.as_str(), w.name))
        .collect();
    if !records && !lost.is_empty() {
        tracing::warn!(target = %r, workloads = ?lost, "no record of what these ran before the sleep");
        let note = format!(
            "No record of what {} ran before the sleep (dormant.dev/replicas-before-sleep or suspend-before-sleep removed from the workload and from the target's dormant.dev/sleep-record): scale or resume it by hand; the target is awake once it is ready",
            lost.join(", ")
        );
        publish(ctx, ev, EventType::Warning, "WakeFailed", note).await;
    }
    release_app_traffic(ctx, ev, now, again).await;
    let ready = !records && lost.is_empty() && ev.workloads.iter().all(|w| ev.excluded(w) || w.ready());
    if ready {
        annotations.insert(vocab::STATE, Some(TargetState::Awake.as_str().into()));
        annotations.insert(vocab::ASLEEP_SINCE, None);
        annotations.insert(vocab::ASLEEP_REQUESTS, None);
        annotations.insert(vocab::SLEEP_RECORD, None);
        let (trigger, took) = match lock(&ctx.waking).remove(r) {
            Some((since, trigger)) => (trigger, Some(since.elapsed())),
            None => (ev.decision.reason.trigger(), None),
        };
        if let Some(took) = took {
            ctx.metrics
                .wake_duration
                .get_or_create(&TriggerLabels { trigger: trigger.into() })
                .observe(took.as_secs_f64());
        }
        if trigger == "predicted" {
            let began = took.and_then(|t| chrono::Duration::from_std(t).ok()).map_or(now, |t| now - t);
            prewake::woke(ctx, r, began);
        }
        ctx.metrics
            .transitions
            .get_or_create(&TransitionLabels {
                kind: r.kind.as_str().into(),
                direction: "wake".into(),
                trigger: trigger.into(),
            })
            .inc();
        // Count what the sleep saved up to now, then stop the meter.
        ctx.metrics.cost.accrue(&ctx.metrics.savings, now);
        ctx.metrics.cost.stop(r);
        tracing::info!(target = %r, reason = %ev.decision.reason, "awake");
        publish(ctx, ev, EventType::Normal, "Woke", format!("Awake: {}", ev.decision.reason)).await;
    }
    Ok(())
}

fn record_json(copy: &scaler::SleepRecord) -> String {
    serde_json::to_string(copy).unwrap_or_default()
}

/// How long after a failed hold it is tried again (sooner when the agent's
/// own addresses change).
const HOLD_RETRY_SECONDS: i64 = 30;

/// Holds the target's app traffic (see [`crate::app_traffic::hold`]). A
/// failure is reported and the sleep goes on: it saves as much, and a
/// reconcile tries again (false).
async fn hold_app_traffic(ctx: &Context, ev: &Evaluation) -> bool {
    let Some(holder) = &ctx.app_traffic else { return true };
    let pods = holder.pods(&ev.workloads, |w| ev.excluded(w));
    match holder.hold(&ev.target.r, &pods).await {
        Ok(held) => {
            if !held.made.is_empty() {
                let note = format!("Requests to Service {} wake it while it sleeps", held.made.join(", "));
                publish(ctx, ev, EventType::Normal, "AppTrafficHeld", note).await;
            }
            // Said once per sleep (when it begins), also when nothing
            // else could be held.
            if !held.made.is_empty() || ev.state != TargetState::Asleep {
                for (svc, why) in &held.skipped {
                    let note = format!("Requests to Service {svc} do not wake it: {why}");
                    publish(ctx, ev, EventType::Warning, "AppTrafficNotHeld", note).await;
                }
            }
            if !held.mended.is_empty() && ev.state == TargetState::Asleep {
                let note = format!(
                    "dormant's EndpointSlice for Service {} was gone or changed while asleep (deleted by hand or pruned by a tool?) and is made again",
                    held.mended.join(", ")
                );
                publish(ctx, ev, EventType::Warning, "AppTrafficMended", note).await;
            }
            true
        }
        Err(e) => {
            tracing::warn!(target = %ev.target.r, error = %crate::error::Chain(&e), "cannot hold app traffic");
            publish(ctx, ev, EventType::Warning, "AppTrafficFailed", crate::error::chain(&e)).await;
            false
        }
    }
}

/// Gives back the Services whose own endpoints are ready again (see
/// [`crate::app_traffic::hold`]); while one is held, the target is looked
/// at again in a second.
async fn release_app_traffic(
    ctx: &Context,
    ev: &Evaluation,
    now: DateTime<Utc>,
    again: &mut Option<DateTime<Utc>>,
) {
    let Some(holder) = &ctx.app_traffic else { return };
    holder.clear_failure(&ev.target.r);
    if !holder.holds(&ev.target.r) {
        return;
    }
    let give_up = crate::app_traffic::give_up_after(ev.policy.wake_timeout.value);
    match holder.release(&ev.target.r, give_up).await {
        Ok(released) => {
            if !released.gave_up.is_empty() {
                let note = format!(
                    "Service {} had no ready endpoint {} after the wake began; its traffic no longer waits for it",
                    released.gave_up.join(", "),
                    crate::policy::duration::format(give_up)
                );
                publish(ctx, ev, EventType::Warning, "AppTrafficReleased", note).await;
            }
            if !released.pending.is_empty() {
                *again = Some(now + chrono::Duration::seconds(1));
            }
        }
        Err(e) => {
            tracing::warn!(target = %ev.target.r, error = %crate::error::Chain(&e), "cannot release app traffic");
            *again = Some(now + chrono::Duration::seconds(5));
        }
    }
}

/// `w` as it is after this reconcile wrote the target's annotations: a
/// vcluster's control plane is the target object itself, so its patch is
/// made from the object that write returned (see
/// [`crate::annotate::Annotator::set`]), not from the cache.
fn after_target_write(
    w: &crate::target::WorkloadView,
    written: &Option<crate::target::WorkloadView>,
) -> crate::target::WorkloadView {
    match written {
        Some(fresh) if same_workload(fresh, w) => fresh.clone(),
        _ => w.clone(),
    }
}

/// What writing a target's mark left.
enum Marked {
    /// Written; the control plane as the write returned it, when the mark
    /// went on it alone (see [`crate::annotate::Annotator::set`]).
    Written(Option<crate::target::WorkloadView>),
    /// The control plane went since it was read: nothing to act on.
    Gone,
}

/// Writes the target's `annotations` (its mark) and clears them: in the
/// patch `make` computes for its control plane when `folded` (a vcluster,
/// whose control plane is its target object: one request, and never the
/// mark without the change), else on the target object alone. A failed
/// control-plane patch is a scaler step's: its Event says `reason`.
async fn write_mark(
    ctx: &Context,
    ev: &Evaluation,
    reason: &str,
    annotations: &mut Annotations,
    folded: Option<&crate::target::WorkloadView>,
    make: impl Fn(&crate::target::WorkloadView) -> Result<Option<serde_json::Value>, String>,
) -> Result<Marked, Error> {
    let marked = match folded {
        Some(cp) => {
            let outcome = step(ctx, ev, reason, async {
                Ok::<_, scaler::Error>(ctx.annotator.set_with(cp, annotations, make).await?)
            })
            .await?;
            if outcome == scaler::Outcome::Unchanged { Marked::Gone } else { Marked::Written(None) }
        }
        None => Marked::Written(ctx.annotator.set(&ev.target.object, annotations).await?),
    };
    annotations.clear();
    Ok(marked)
}

fn same_workload(a: &crate::target::WorkloadView, b: &crate::target::WorkloadView) -> bool {
    a.kind == b.kind && a.name == b.name && a.namespace == b.namespace
}

/// How many of one target's workloads are patched at once. One after the
/// other, a namespace of fifty Deployments took fifty round trips to fall
/// asleep (5.5 s on the loaded two-core testbed); the client's QPS still
/// bounds them all. Their order does not matter: the target's copy of
/// every record is written before any of them, and each patch carries the
/// workload's own.
const WORKLOAD_PATCHES_AT_ONCE: usize = 8;

/// Runs one target's workload patches, [`WORKLOAD_PATCHES_AT_ONCE`] in
/// flight; the first failure ends it (the patches still in flight are
/// dropped: each is idempotent, and the next reconcile sends what is left).
async fn a_few_at_once<T>(
    patches: impl IntoIterator<Item = impl std::future::Future<Output = Result<T, scaler::Error>>>,
) -> Result<(), scaler::Error> {
    use futures::{StreamExt as _, TryStreamExt as _};
    futures::stream::iter(patches)
        .buffer_unordered(WORKLOAD_PATCHES_AT_ONCE)
        .try_for_each(|_| std::future::ready(Ok(())))
        .await
}

/// One scaler step; when it fails, a Warning Event (`SleepFailed`,
/// `WakeFailed`) says why.
async fn step<T>(
    ctx: &Context,
    ev: &Evaluation,
    reason: &str,
    action: impl std::future::Future<Output = Result<T, scaler::Error>>,
) -> Result<T, Error> {
    match action.await {
        Ok(v) => Ok(v),
        Err(e) => {
            publish(ctx, ev, EventType::Warning, reason, crate::error::chain(&e)).await;
            Err(e.into())
        }
    }
}

/// Pauses the namespace's KEDA ScaledObjects that scale a workload this
/// sleep scales (not those of excluded workloads), and, for a namespace
/// target, its ScaledJobs (unless excluded like a workload).
async fn pause_keda(ctx: &Context, ev: &Evaluation) -> Result<(), scaler::Error> {
    for so in ctx.scaler.scaled_objects(&ev.target.r.namespace).await? {
        if ev.workloads.iter().any(|w| so.scales(w) && !ev.excluded(w)) {
            ctx.scaler.pause_scaled_object(&so).await?;
        }
    }
    if ev.target.r.kind == TargetKind::Namespace {
        for sj in ctx.scaler.scaled_jobs(&ev.target.r.namespace).await? {
            if !ev.excluded_by(&sj.annotations, &sj.labels) {
                ctx.scaler.pause_scaled_job(&sj).await?;
            }
        }
    }
    Ok(())
}

/// Pauses the Argo CD Applications that deploy this namespace target's
/// workloads, before they sleep (so Argo CD does not scale them back up):
/// only an Application whose destination and every workload it tracks,
/// anywhere, are in namespaces asleep or going to sleep
/// ([`gitops::may_pause_application`]). vcluster targets: never.
async fn pause_argocd(ctx: &Context, ev: &Evaluation) -> Result<(), scaler::Error> {
    let Some(argocd) = &ctx.config.argocd else { return Ok(()) };
    if ev.target.r.kind != TargetKind::Namespace {
        return Ok(());
    }
    let mine = gitops::applications_of(ev.workloads.iter().filter(|w| !ev.excluded(w)), argocd, false);
    if mine.is_empty() {
        return Ok(());
    }
    // Read first: the cluster-wide scan below only when one is not paused
    // (a sleeping target passes here on every look).
    let mut unpaused = Vec::new();
    for (namespace, name) in mine.keys() {
        if let Some(app) = ctx.scaler.application(namespace, name).await?
            && !app.paused()
        {
            unpaused.push(app);
        }
    }
    if unpaused.is_empty() {
        return Ok(());
    }
    let stores = &ctx.stores;
    let namespaces = stores.namespaces.state();
    let everything: Vec<_> =
        namespaces.iter().flat_map(|n| stores.namespace_workloads(&n.name_any())).collect();
    let tracked = gitops::applications_of(&everything, argocd, false);
    let mut sleeping: BTreeSet<String> = namespaces
        .iter()
        .filter(|n| {
            n.annotations()
                .get(vocab::STATE)
                .is_some_and(|s| s == TargetState::Asleep.as_str() || s == TargetState::Sleeping.as_str())
        })
        .map(|n| n.name_any())
        .collect();
    sleeping.insert(ev.target.r.namespace.clone());
    for app in unpaused {
        let workload_namespaces = tracked.get(&(app.namespace.clone(), app.name.clone()));
        if gitops::may_pause_application(
            &app,
            workload_namespaces.into_iter().flatten().map(String::as_str),
            &sleeping,
        ) {
            tracing::info!(target = %ev.target.r, application = %app.id(), "pausing Argo CD Application");
            ctx.scaler.pause_application(&app).await?;
        }
    }
    Ok(())
}

/// Gives the Argo CD Applications that deploy this namespace target back
/// what they had, once its workloads are back. Only an Application whose
/// destination is this namespace: a workload's tracking annotation is
/// anyone's to write, and one naming another team's Application must not
/// let this namespace's wake resume it while that team's sleeps.
async fn resume_argocd(ctx: &Context, ev: &Evaluation) -> Result<(), scaler::Error> {
    let Some(argocd) = &ctx.config.argocd else { return Ok(()) };
    if ev.target.r.kind != TargetKind::Namespace {
        return Ok(());
    }
    for (namespace, name) in gitops::applications_of(&ev.workloads, argocd, false).keys() {
        if let Some(app) = ctx.scaler.application(namespace, name).await?
            && app.paused()
            && app.destination_namespace.as_deref() == Some(ev.target.r.namespace.as_str())
        {
            tracing::info!(target = %ev.target.r, application = %app.id(), "resuming Argo CD Application");
            ctx.scaler.resume_application(&app).await?;
        }
    }
    Ok(())
}

/// Lifts every pause dormant put on the namespace's ScaledObjects (read
/// before the wake began; a changed one is read again on conflict) and
/// ScaledJobs.
async fn resume_keda(
    ctx: &Context,
    ev: &Evaluation,
    scaled_objects: &[crate::scaler::ScaledObjectView],
) -> Result<(), scaler::Error> {
    for so in scaled_objects {
        if so.asleep() {
            ctx.scaler.resume_scaled_object(so).await?;
        }
    }
    if ev.target.r.kind == TargetKind::Namespace {
        for sj in ctx.scaler.scaled_jobs(&ev.target.r.namespace).await? {
            if sj.asleep() {
                ctx.scaler.resume_scaled_job(&sj).await?;
            }
        }
    }
    Ok(())
}

/// Records what this reconcile concluded, and the per-target metrics.
fn summarize(ctx: &Context, ev: &Evaluation, written: &Annotations) {
    let r = &ev.target.r;
    let state = written
        .get(vocab::STATE)
        .and_then(|v| v.as_deref())
        .and_then(|s| s.parse::<TargetState>().ok())
        .unwrap_or(ev.state);
    let policy = ev.policy.policy.clone();
    lock(&ctx.summaries).insert(
        r.clone(),
        Summary {
            kind: r.kind,
            policy: policy.clone(),
            state,
            desired: Some(ev.decision.desired),
            next: ev.decision.next,
            invalid: None,
        },
    );
    let m = &ctx.metrics;
    let labels = m.target_labels(r, policy.as_deref().unwrap_or(""));
    let asleep = matches!(state, TargetState::Asleep | TargetState::Sleeping);
    m.target_asleep.get_or_create(&labels).set(i64::from(asleep));
    let (cpu, mem) = if asleep { ev.annotations.asleep_requests.unwrap_or_default() } else { (0.0, 0.0) };
    let (cpu, mem) = if asleep && ev.annotations.asleep_requests.is_none() {
        let r = ev.running_requests();
        (r.cpu_cores, r.memory_bytes)
    } else {
        (cpu, mem)
    };
    m.target_cpu_cores.get_or_create(&labels).set(cpu);
    m.target_memory_bytes.get_or_create(&labels).set(mem);
    let since = ev.annotations.asleep_since;
    let asleep_for = match (asleep, since) {
        (true, Some(s)) => (Utc::now() - s).num_milliseconds().max(0) as f64 / 1000.0,
        _ => 0.0,
    };
    m.target_asleep_seconds.get_or_create(&labels).set(asleep_for);
    if asleep && !ctx.config.dry_run && !ev.policy.dry_run.value {
        let pricing = &ev.policy.pricing.value;
        let per_hour = crate::metrics::cost::hourly_cost(
            crate::target::workload::Requests { cpu_cores: cpu, memory_bytes: mem },
            pricing,
        );
        let savings = SavingsLabels {
            target: labels.target.clone(),
            kind: labels.kind.clone(),
            namespace: labels.namespace.clone(),
            policy: labels.policy.clone(),
            currency: pricing.currency.clone(),
        };
        // Accrue from when the sleep began, or from now if this replica only
        // learned of it now (a previous replica counted the time before).
        let from = if m.cost.is_running(r) {
            Utc::now()
        } else {
            since.unwrap_or_else(Utc::now).max(ctx.leading_since())
        };
        m.cost.run(r, per_hour, savings, from);
    } else if !asleep && m.cost.is_running(r) {
        m.cost.accrue(&m.savings, Utc::now());
        m.cost.stop(r);
    }
}
