//! Following each pre-wake (a wake ahead of a predicted first use,
//! `wake.predictive`) to its outcome, for the metrics: **used** when a use
//! comes while the target is still awake (a cold start avoided), **unused**
//! when it falls asleep again first; either way the awake hours it cost
//! (until that use, or until that sleep). Kept in the leader's memory: a
//! pre-wake still open when the Lease changes hands is not settled.

use chrono::{DateTime, Utc};

use super::{Context, Evaluation, lock};
use crate::metrics::{KindLabels, PreWakeLabels};
use crate::policy::annotations::TargetState;
use crate::policy::decide::Desired;
use crate::target::TargetRef;

/// A pre-wake of `r` that began at `since` has completed.
pub(super) fn woke(ctx: &Context, r: &TargetRef, since: DateTime<Utc>) {
    ctx.metrics.prewakes.get_or_create(&KindLabels { kind: r.kind.as_str().into() }).inc();
    lock(&ctx.prewoken).insert(r.clone(), since);
}

/// Settles the open pre-wake of the evaluated target, if its outcome is
/// known by `now`.
pub(super) fn settle(ctx: &Context, ev: &Evaluation, now: DateTime<Utc>) {
    let r = &ev.target.r;
    let Some(since) = lock(&ctx.prewoken).get(r).copied() else { return };
    let (outcome, until) = match &ev.last_use {
        Some(u) if u.at > since => ("used", u.at),
        _ if ev.decision.desired == Desired::Asleep
            || matches!(ev.state, TargetState::Asleep | TargetState::Sleeping) =>
        {
            ("unused", ev.decision.reason.at().filter(|t| *t > since && *t <= now).unwrap_or(now))
        }
        _ => return,
    };
    lock(&ctx.prewoken).remove(r);
    let kind = r.kind.as_str().to_string();
    let hours = (until - since).num_milliseconds().max(0) as f64 / 3_600_000.0;
    ctx.metrics.prewake_outcomes.get_or_create(&PreWakeLabels { kind: kind.clone(), outcome }).inc();
    ctx.metrics.prewake_awake_hours.get_or_create(&KindLabels { kind }).inc_by(hours);
    tracing::info!(target = %r, outcome, hours, "pre-wake settled");
}

/// The target is gone: nothing to settle.
pub(super) fn forget(ctx: &Context, r: &TargetRef) {
    lock(&ctx.prewoken).remove(r);
}
