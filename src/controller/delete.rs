//! delete-after: a target asleep longer than its SleepPolicy's
//! `deleteAfter` is deleted: a namespace with everything in it, a vcluster
//! by its Helm release's objects (see [`crate::scaler::release`]: what Helm
//! installed, its records, the control plane's volumes, what it synced).
//! Opt-in twice (the policy says so, and the agent runs with
//! `--enable-delete-after`, which the chart pairs with the RBAC to delete
//! them), and careful:
//!
//! - never in dry-run (the agent's or the policy's), never a disabled
//!   target or one annotated `dormant.dev/protect: "true"`, never one that
//!   is not asleep or is about to wake;
//! - always warned first: a Warning Event and `dormant.dev/delete-at`,
//!   `deleteWarning` before — and never sooner than that after the warning,
//!   whenever the warning was given (an agent that was down does not
//!   delete on its first look);
//! - the deletion is conditional on the target being exactly the object
//!   evaluated (its resourceVersion): a `protect` added since, or anything
//!   else written, makes it wait for the next look. A namespace goes in one
//!   conditional request; a vcluster's control plane is first annotated
//!   `dormant.dev/deleting` in one, then its release's objects go one by
//!   one, the control plane last, so a deletion cut short (a crash, a
//!   failed request) is finished by the next look, which plans it again;
//! - a target that wakes, or stops qualifying, has its warning withdrawn
//!   (a Normal Event says so).
//!
//! [`plan`] is pure; [`act`] writes.

use chrono::{DateTime, Utc};
use kube::runtime::events::{Event, EventType};

use super::Context;
use super::evaluate::Evaluation;
use crate::policy::annotations::{TargetState, rfc3339};
use crate::policy::decide::Desired;
use crate::policy::duration;
use crate::policy::{DeleteAfter, TargetKind};
use crate::vocab;

/// What delete-after does on one look at a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Nothing now; look again then (the warning's or the deletion's time).
    Wait(Option<DateTime<Utc>>),
    /// Warn that it will be deleted at this instant.
    Warn(DateTime<Utc>),
    /// Delete it now.
    Delete,
    /// Withdraw the warning given earlier, for this reason.
    Withdraw(&'static str),
}

/// What [`plan`] looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts {
    pub delete_after: Option<DeleteAfter>,
    /// `--enable-delete-after`.
    pub enabled: bool,
    pub dry_run: bool,
    pub protect: bool,
    pub disabled: bool,
    pub state: TargetState,
    pub asleep_since: Option<DateTime<Utc>>,
    /// The decision is to wake it.
    pub waking: bool,
    /// The warning given (`delete-at`).
    pub delete_at: Option<DateTime<Utc>>,
}

impl Facts {
    pub fn of(ev: &Evaluation, enabled: bool, dry_run: bool) -> Facts {
        Facts {
            delete_after: ev.policy.delete_after,
            enabled,
            dry_run,
            protect: ev.annotations.protect,
            disabled: ev.policy.disabled.value,
            state: ev.state,
            asleep_since: ev.annotations.asleep_since,
            waking: matches!(ev.decision.desired, Desired::Awake),
            delete_at: ev.annotations.delete_at,
        }
    }

    /// Why the target does not qualify for deletion, if it does not.
    fn unqualified(&self) -> Option<&'static str> {
        Some(if self.delete_after.is_none() {
            "its policy no longer says deleteAfter"
        } else if !self.enabled {
            "the agent runs without --enable-delete-after"
        } else if self.dry_run {
            "dry-run"
        } else if self.protect {
            "it is annotated dormant.dev/protect"
        } else if self.disabled {
            "it is disabled"
        } else if self.state != TargetState::Asleep || self.asleep_since.is_none() {
            "it is not asleep"
        } else if self.waking {
            "it is waking"
        } else {
            return None;
        })
    }
}

/// What to do about a target's deletion at `now`.
pub fn plan(f: &Facts, now: DateTime<Utc>) -> Plan {
    if let Some(why) = f.unqualified() {
        return match f.delete_at {
            Some(_) => Plan::Withdraw(why),
            None => Plan::Wait(None),
        };
    }
    let (Some(d), Some(since)) = (f.delete_after, f.asleep_since) else {
        return Plan::Wait(None);
    };
    let far = |x: std::time::Duration| chrono::Duration::from_std(x).unwrap_or(chrono::Duration::MAX);
    let due = since.checked_add_signed(far(d.after)).unwrap_or(DateTime::<Utc>::MAX_UTC);
    let warn_from = due.checked_sub_signed(far(d.warning)).unwrap_or(DateTime::<Utc>::MIN_UTC);
    let warned_due = |from: DateTime<Utc>| {
        due.max(from.checked_add_signed(far(d.warning)).unwrap_or(DateTime::<Utc>::MAX_UTC))
    };
    match f.delete_at {
        None if now < warn_from => Plan::Wait(Some(warn_from)),
        None => Plan::Warn(warned_due(now)),
        // Sooner than the policy allows: the policy moved the deletion
        // later, or the annotation was not dormant's (anyone who may
        // annotate the target can write one). Warned again, in full.
        Some(at) if due > at => Plan::Warn(warned_due(now)),
        Some(at) if now >= at => Plan::Delete,
        Some(at) => Plan::Wait(Some(at)),
    }
}

/// Carries out `plan` for `ev`: the annotation changes go into
/// `annotations` (written by the reconcile with the rest); the Events and
/// the deletion happen here. Returns when to look again.
pub async fn act(
    ctx: &Context,
    ev: &Evaluation,
    plan: Plan,
    annotations: &mut crate::annotate::Changes,
) -> Result<Option<DateTime<Utc>>, super::Error> {
    let r = &ev.target.r;
    let policy = ev.policy.policy.as_deref().unwrap_or("agent defaults");
    match plan {
        Plan::Wait(at) => Ok(at),
        Plan::Warn(at) => {
            let after = ev.policy.delete_after.map(|d| duration::format(d.after)).unwrap_or_default();
            annotations.insert(vocab::DELETE_AT, Some(rfc3339(at)));
            tracing::warn!(target = %r, at = %rfc3339(at), "will be deleted (deleteAfter)");
            super::reconcile::publish(
                ctx,
                ev,
                EventType::Warning,
                "DeletionScheduled",
                format!(
                    "asleep since {}: will be DELETED {} at {} (deleteAfter {after} of SleepPolicy {policy}); wake it, or annotate it dormant.dev/protect=true, to keep it",
                    ev.annotations.asleep_since.map(rfc3339).unwrap_or_default(),
                    match r.kind {
                        TargetKind::Namespace => "with everything in it",
                        TargetKind::VCluster => "with its Helm release's objects and volumes",
                    },
                    rfc3339(at)
                ),
            )
            .await;
            Ok(Some(at))
        }
        Plan::Withdraw(why) => {
            annotations.insert(vocab::DELETE_AT, None);
            if ev.target.object.annotations().contains_key(vocab::DELETING) {
                annotations.insert(vocab::DELETING, None);
            }
            tracing::info!(target = %r, why, "deletion withdrawn");
            super::reconcile::publish(
                ctx,
                ev,
                EventType::Normal,
                "DeletionCancelled",
                format!("will not be deleted: {why}"),
            )
            .await;
            Ok(None)
        }
        Plan::Delete => {
            let what = match &ev.target.object {
                crate::target::TargetObject::Namespace(ns) => {
                    if !ctx.scaler.delete_namespace(ns).await? {
                        // Changed since it was evaluated: the next look decides.
                        return Ok(Some(Utc::now() + chrono::Duration::seconds(1)));
                    }
                    format!("namespace {} deleted with everything in it", r.namespace)
                }
                cp => {
                    if !cp.annotations().contains_key(vocab::DELETING) {
                        let mark =
                            crate::annotate::Changes::from([(vocab::DELETING, Some(rfc3339(Utc::now())))]);
                        if !ctx.annotator.set_if_unchanged(cp, &mark).await? {
                            return Ok(Some(Utc::now() + chrono::Duration::seconds(1)));
                        }
                    }
                    let Some(deleted) = ctx.scaler.delete_vcluster_release(cp).await? else {
                        // Gone already: the pass that deleted it counted it.
                        return Ok(None);
                    };
                    let counts: Vec<String> = deleted.iter().map(|(kind, n)| format!("{n} {kind}")).collect();
                    format!(
                        "vcluster {}/{} deleted by its Helm release's objects ({})",
                        r.namespace,
                        r.name,
                        counts.join(", ")
                    )
                }
            };
            ctx.metrics.deleted_targets.inc();
            tracing::warn!(target = %r, policy, "{what} (deleteAfter)");
            // Not on the object, which is going: in `default` for a
            // namespace (where Events about cluster-scoped objects live),
            // beside the control plane for a vcluster.
            let mut regarding = ev.target.object.object_ref();
            if r.kind == TargetKind::Namespace {
                regarding.namespace = None;
            }
            let note = format!(
                "{what}: asleep since {}, past deleteAfter of SleepPolicy {policy} (warned for {})",
                ev.annotations.asleep_since.map(rfc3339).unwrap_or_default(),
                ev.annotations.delete_at.map(rfc3339).unwrap_or_default()
            );
            let event = Event {
                type_: EventType::Warning,
                reason: "Deleted".into(),
                note: Some(note),
                action: "DeleteAfter".into(),
                secondary: None,
            };
            if let Err(e) = ctx.publish(&event, &regarding).await {
                tracing::warn!(target = %r, error = %e, "failed to publish event Deleted");
            }
            Ok(None)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use std::time::Duration;

    fn t(h: u32, m: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 2, h, m, 0).unwrap()
    }

    /// Asleep since 08:00; deleted after 4h, warned 1h before.
    fn facts() -> Facts {
        Facts {
            delete_after: Some(DeleteAfter {
                after: Duration::from_secs(4 * 3600),
                warning: Duration::from_secs(3600),
            }),
            enabled: true,
            dry_run: false,
            protect: false,
            disabled: false,
            state: TargetState::Asleep,
            asleep_since: Some(t(8, 0)),
            waking: false,
            delete_at: None,
        }
    }

    #[test]
    fn warned_the_warning_before_then_deleted_at_the_time_warned() {
        let f = facts();
        assert_eq!(plan(&f, t(10, 0)), Plan::Wait(Some(t(11, 0))), "look again when the warning is due");
        assert_eq!(plan(&f, t(11, 0)), Plan::Warn(t(12, 0)));
        let warned = Facts { delete_at: Some(t(12, 0)), ..f };
        assert_eq!(plan(&warned, t(11, 30)), Plan::Wait(Some(t(12, 0))));
        assert_eq!(plan(&warned, t(12, 0)), Plan::Delete);
    }

    #[test]
    fn never_sooner_than_the_warning_after_it_was_given() {
        // The agent was down past the deadline: warned now, deleted an hour later.
        assert_eq!(plan(&facts(), t(15, 0)), Plan::Warn(t(16, 0)));
        let warned = Facts { delete_at: Some(t(16, 0)), ..facts() };
        assert_eq!(plan(&warned, t(15, 59)), Plan::Wait(Some(t(16, 0))));
    }

    #[test]
    fn a_longer_delete_after_warns_again_a_shorter_one_never_deletes_sooner() {
        let longer = Facts {
            delete_after: Some(DeleteAfter {
                after: Duration::from_secs(6 * 3600),
                warning: Duration::from_secs(3600),
            }),
            delete_at: Some(t(12, 0)),
            ..facts()
        };
        assert_eq!(plan(&longer, t(12, 0)), Plan::Warn(t(14, 0)));
        let shorter = Facts {
            delete_after: Some(DeleteAfter {
                after: Duration::from_secs(3600),
                warning: Duration::from_secs(60),
            }),
            delete_at: Some(t(12, 0)),
            ..facts()
        };
        assert_eq!(plan(&shorter, t(11, 0)), Plan::Wait(Some(t(12, 0))));
    }

    #[test]
    fn a_delete_at_dormant_never_wrote_cannot_hasten_the_deletion() {
        // Asleep since 08:00, due at 12:00; at 15:00 someone writes a
        // delete-at in the past: a full warning first, not a deletion.
        let forged = Facts { delete_at: Some(t(9, 0)), ..facts() };
        assert_eq!(plan(&forged, t(15, 0)), Plan::Warn(t(16, 0)));
        let forged = Facts { delete_at: Some(t(1, 0)), ..facts() };
        assert_eq!(plan(&forged, t(11, 30)), Plan::Warn(t(12, 30)));
    }

    #[test]
    fn nothing_unqualified_is_deleted_and_a_warning_given_is_withdrawn() {
        let cases: [(&str, Facts); 7] = [
            ("policy", Facts { delete_after: None, ..facts() }),
            ("--enable-delete-after", Facts { enabled: false, ..facts() }),
            ("dry-run", Facts { dry_run: true, ..facts() }),
            ("protect", Facts { protect: true, ..facts() }),
            ("disabled", Facts { disabled: true, ..facts() }),
            ("not asleep", Facts { state: TargetState::Waking, ..facts() }),
            ("waking", Facts { waking: true, ..facts() }),
        ];
        for (name, f) in cases {
            assert_eq!(plan(&f, t(23, 0)), Plan::Wait(None), "{name}");
            let warned = Facts { delete_at: Some(t(12, 0)), ..f };
            assert!(matches!(plan(&warned, t(23, 0)), Plan::Withdraw(_)), "{name}");
        }
    }
}
