//! The leadership the controller acts on: the lease manager's, and only
//! while this replica has seen, lately, that the Lease is its own and
//! unexpired.
//!
//! The lease manager learns that it lost the Lease from the API server. If
//! the API server cannot be reached (down, restarting, a partition), its
//! renewals fail and it retries, still saying "leader", while the Lease
//! runs out; when the API server comes back a standby may take the Lease
//! at once, and both would act until the manager's next read. Here the
//! Lease is read every fifth of its duration. While the reads answer, the
//! Lease as read decides: this replica's and not run out by its whole
//! duration (the manager renews it a grace period before that; a margin
//! here made a 3 s lease's leader stand down between renewals). Once they fail, leadership ends by this replica's own clock
//! when the last renewal it saw runs out (a second early): the leader
//! stops acting before anyone else can start.

use std::time::Duration;

use chrono::Utc;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use tokio::sync::watch;
use tokio::time::Instant;

/// What the guard needs to know about the Lease.
#[derive(Clone, Debug)]
pub struct LeaseSpec {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub duration: Duration,
}

/// Until when (on this replica's monotonic clock) the Lease, as read,
/// is `identity`'s: its last renewal plus its duration, less a second.
/// `None` when it is someone else's, or says nothing usable.
pub fn held_until(lease: &Lease, identity: &str, duration: Duration, now: Instant) -> Option<Instant> {
    let spec = lease.spec.as_ref()?;
    if spec.holder_identity.as_deref() != Some(identity) {
        return None;
    }
    let renewed = spec.renew_time.as_ref().or(spec.acquire_time.as_ref())?;
    let renewed = crate::target::to_chrono(&renewed.0)?;
    let expires = renewed + chrono::Duration::from_std(duration).ok()? - chrono::Duration::seconds(1);
    let left = (expires - Utc::now()).to_std().ok()?;
    Some(now + left)
}

/// Whether the Lease, as just read, is `identity`'s and has not run out
/// (its last renewal plus its whole duration: the manager renews it a
/// grace period before that). An expired Lease that still names this
/// replica (the API server back after an outage) is not held: a standby
/// may be taking it.
pub fn live(lease: &Lease, identity: &str, duration: Duration) -> bool {
    held_until(lease, identity, duration + Duration::from_secs(1), Instant::now()).is_some()
}

/// Whether the controller acts: the manager says it leads, and the Lease
/// was just read held by this replica (`read`: `Some(held by us)`), or,
/// when it could not be read (`None`), the last renewal seen has not run
/// out (`held`).
pub fn acting(leading: bool, read: Option<bool>, held: Option<Instant>, now: Instant) -> bool {
    leading
        && match read {
            Some(ours) => ours,
            None => held.is_some_and(|until| now < until),
        }
}

/// Forwards `manager`'s leadership to the returned receiver, but says
/// `false` whenever the Lease was not seen held by this replica within its
/// duration. Ends when every receiver is gone (dropping `manager`, so the
/// manager releases the Lease).
pub fn guard(client: Client, lease: LeaseSpec, mut manager: watch::Receiver<bool>) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let api: Api<Lease> = Api::namespaced(client, &lease.namespace);
        let every = (lease.duration / 5).max(Duration::from_millis(500));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut held: Option<Instant> = None;
        loop {
            tokio::select! {
                () = tx.closed() => return,
                changed = manager.changed() => if changed.is_err() {
                    tx.send_replace(false);
                    return;
                },
                _ = tick.tick() => {}
            }
            let leading = *manager.borrow_and_update();
            let mut read = None;
            if leading {
                match tokio::time::timeout(every, api.get(&lease.name)).await {
                    Ok(Ok(l)) => {
                        read = Some(live(&l, &lease.identity, lease.duration));
                        held = held_until(&l, &lease.identity, lease.duration, Instant::now());
                    }
                    // Unreachable: what was seen last still holds, until it runs out.
                    Ok(Err(e)) => {
                        tracing::debug!(error = %crate::error::Chain(&e), "reading the Lease failed")
                    }
                    Err(_) => tracing::debug!("reading the Lease timed out"),
                }
            } else {
                held = None;
            }
            let acting = acting(leading, read, held, Instant::now());
            if leading && !acting && *tx.borrow() {
                tracing::warn!(
                    lease = %lease.name,
                    "the Lease could not be renewed before it ran out: this replica stops acting as leader"
                );
            }
            tx.send_if_modified(|v| std::mem::replace(v, acting) != acting);
        }
    });
    rx
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec as Spec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    fn lease(holder: &str, renewed_ago: Duration) -> Lease {
        let at = Utc::now() - chrono::Duration::from_std(renewed_ago).unwrap_or_default();
        Lease {
            spec: Some(Spec {
                holder_identity: Some(holder.into()),
                renew_time: Some(MicroTime(
                    k8s_openapi::jiff::Timestamp::from_millisecond(at.timestamp_millis()).unwrap(),
                )),
                ..Spec::default()
            }),
            ..Lease::default()
        }
    }

    #[test]
    fn held_until_its_last_renewal_runs_out_a_second_early_and_only_by_its_holder() {
        let now = Instant::now();
        let d = Duration::from_secs(15);
        let until = held_until(&lease("a", Duration::from_secs(5)), "a", d, now).unwrap_or(now);
        let left = until - now;
        assert!(left > Duration::from_millis(8_500) && left <= Duration::from_secs(9), "{left:?}");
        assert_eq!(held_until(&lease("b", Duration::ZERO), "a", d, now), None, "someone else's");
        assert_eq!(held_until(&lease("a", Duration::from_secs(20)), "a", d, now), None, "ran out");
        assert_eq!(held_until(&Lease::default(), "a", d, now), None, "says nothing");
    }

    #[test]
    fn a_lease_read_is_held_while_its_own_and_unexpired_by_its_whole_duration() {
        let d = Duration::from_secs(3);
        assert!(live(&lease("a", Duration::from_millis(2_500)), "a", d), "renewal due, not yet run out");
        assert!(!live(&lease("a", Duration::from_millis(3_200)), "a", d), "ran out, still naming a");
        assert!(!live(&lease("b", Duration::ZERO), "a", d), "someone else's");
    }

    #[test]
    fn a_readable_lease_decides_and_an_unreadable_one_runs_out_by_the_clock() {
        let now = Instant::now();
        let later = Some(now + Duration::from_secs(1));
        let passed = Some(now - Duration::from_millis(1));
        // Read: whose it is, whatever its renewal time says.
        assert!(acting(true, Some(true), passed, now));
        assert!(!acting(true, Some(false), later, now));
        // Not read: until the last renewal seen runs out.
        assert!(acting(true, None, later, now));
        assert!(!acting(true, None, passed, now));
        assert!(!acting(true, None, None, now));
        // The manager's word first.
        assert!(!acting(false, Some(true), later, now));
    }
}
