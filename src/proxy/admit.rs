//! Step 4, admit: whether a request for a target that is not ready may
//! wake it. A pure function of who the caller is (and, for a bearer token,
//! what can be proven of it while the target sleeps), whether the request
//! counts as use, the target's wake rules, and whether the budget of wakes
//! for unverified credentials allows one now.
//!
//! Only a proven caller (a verified certificate, a ServiceAccount token the
//! vcluster's keys verify, a token its API server accepted lately) counts
//! as use before the upstream has answered. A token nothing here can check
//! may wake the target within a small budget (one wake per interval per
//! target), counts for nothing until its API server answers it, and waits
//! in a smaller share of the queue. Every refusal of an unproven caller is
//! the same answer, whatever the target (unknown, asleep, out of budget).

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::auth::Caller;
use super::error::ProxyError;
use super::proof::Proof;
use crate::policy::EffectivePolicy;
use crate::policy::annotations::{ForceSleep, TargetAnnotations, Until};
use crate::target::TargetRef;

/// What governs waking a target now.
#[derive(Debug, Clone, PartialEq)]
pub struct WakeRules {
    pub on_request: bool,
    pub timeout: Duration,
    /// Put to sleep by hand with requests not to wake it, until then.
    pub prevented: Option<Until>,
    /// When the last wake for an unverified credential was asked for.
    pub unverified_wake: Option<DateTime<Utc>>,
}

impl WakeRules {
    /// The rules of a target with this policy and these annotations, `now`.
    pub fn of(policy: &EffectivePolicy, annotations: &TargetAnnotations, now: DateTime<Utc>) -> WakeRules {
        let prevented = match (annotations.force_sleep, annotations.prevent_wakeup_until) {
            (Some(ForceSleep::Since(_) | ForceSleep::Requested), Some(u)) if u.covers(now) => Some(u),
            _ => None,
        };
        WakeRules {
            on_request: policy.wake_on_request.value,
            timeout: policy.wake_timeout.value,
            prevented,
            unverified_wake: annotations.unverified_wake,
        }
    }

    /// Whether the budget allows a wake for an unverified credential now:
    /// none was asked for within `every`.
    pub fn unverified_budget(&self, every: Duration, now: DateTime<Utc>) -> bool {
        let every = chrono::Duration::from_std(every).unwrap_or(chrono::Duration::MAX);
        self.unverified_wake.is_none_or(|at| now.signed_duration_since(at) >= every)
    }
}

/// What to do with a request for a target that is not ready.
#[derive(Debug, Clone, PartialEq)]
pub enum Admission {
    /// Refused; it is no use of the target.
    Refuse(ProxyError),
    /// A use of the target (recorded), which may not wake it.
    RecordAndRefuse(ProxyError),
    /// A use that wakes it; the request waits at most this long.
    Wake(Duration),
    /// No use yet (nobody knows who asks), but a wake within the budget;
    /// the request waits at most this long, in the unverified share.
    WakeUnverified(Duration),
}

/// Decides (see [`Admission`]). `proof` is what is known of a bearer
/// caller's token; `rules` the target's wake rules, or why its policy
/// cannot be read; `budget` whether a wake for an unverified credential is
/// allowed now.
pub fn admit(
    t: &TargetRef,
    caller: &Caller,
    proof: Option<&Proof>,
    counted: bool,
    rules: &Result<WakeRules, String>,
    budget: bool,
) -> Admission {
    let proven = match (caller, proof) {
        (Caller::Anonymous, _) => false,
        (Caller::Certificate { .. }, _) => true,
        (Caller::Bearer { .. }, Some(Proof::Refused(_))) => {
            return Admission::Refuse(ProxyError::Unauthorized);
        }
        (Caller::Bearer { .. }, Some(Proof::ServiceAccount { .. } | Proof::Accepted)) => true,
        (Caller::Bearer { .. }, Some(Proof::Unknown) | None) => false,
    };
    if !proven {
        return match rules {
            Ok(r)
                if *caller != Caller::Anonymous
                    && counted
                    && budget
                    && r.on_request
                    && r.prevented.is_none() =>
            {
                Admission::WakeUnverified(r.timeout)
            }
            _ => Admission::Refuse(ProxyError::Unauthorized),
        };
    }
    if !counted {
        return Admission::Refuse(ProxyError::AsleepIgnored(t.clone()));
    }
    match rules {
        Err(why) => Admission::RecordAndRefuse(ProxyError::Invalid(t.clone(), why.clone())),
        Ok(WakeRules { prevented: Some(until), .. }) => {
            Admission::RecordAndRefuse(ProxyError::Prevented(t.clone(), *until))
        }
        Ok(WakeRules { on_request: false, .. }) => {
            Admission::RecordAndRefuse(ProxyError::WakeOnRequestOff(t.clone()))
        }
        Ok(WakeRules { timeout, .. }) => Admission::Wake(*timeout),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Who may wake what: each row a caller, what is known of its token,
    /// whether the request counts, the target's rules, whether the budget
    /// for unverified wakes allows one, and the answer.
    #[test]
    fn who_may_wake_what() {
        let t = TargetRef::vcluster("team-a", "dev");
        let two_min = Duration::from_secs(120);
        let cert = Caller::Certificate { user: "alice".into(), groups: vec!["team-a".into()] };
        let bearer = Caller::Bearer { verified: None };
        let anon = Caller::Anonymous;
        let sa = Proof::ServiceAccount { user: "system:serviceaccount:ci:deployer".into(), groups: vec![] };
        let (accepted, unknown, refused) = (Proof::Accepted, Proof::Unknown, Proof::Refused("expired"));
        let rules = |on_request: bool, prevented: Option<Until>| -> Result<WakeRules, String> {
            Ok(WakeRules { on_request, timeout: two_min, prevented, unverified_wake: None })
        };
        let (wakes, off, never) = (rules(true, None), rules(false, None), rules(true, Some(Until::Never)));
        let invalid: Result<WakeRules, String> = Err("SleepPolicy p is invalid".into());
        use Admission::*;
        type Row<'a> = (&'a Caller, Option<&'a Proof>, bool, &'a Result<WakeRules, String>, bool, Admission);
        let unauthorized = || Refuse(ProxyError::Unauthorized);
        let table: Vec<Row<'_>> = vec![
            // Proven callers count and wake.
            (&cert, None, true, &wakes, false, Wake(two_min)),
            (&bearer, Some(&sa), true, &wakes, false, Wake(two_min)),
            (&bearer, Some(&accepted), true, &wakes, false, Wake(two_min)),
            // A token known bad (refused lately, forged, expired) never wakes.
            (&bearer, Some(&refused), true, &wakes, true, unauthorized()),
            // A token nothing can check wakes within the budget only, and
            // only where a proven request would.
            (&bearer, Some(&unknown), true, &wakes, true, WakeUnverified(two_min)),
            (&bearer, Some(&unknown), true, &wakes, false, unauthorized()),
            (&bearer, None, true, &wakes, true, WakeUnverified(two_min)),
            (&bearer, Some(&unknown), false, &wakes, true, unauthorized()),
            (&bearer, Some(&unknown), true, &off, true, unauthorized()),
            (&bearer, Some(&unknown), true, &never, true, unauthorized()),
            (&bearer, Some(&unknown), true, &invalid, true, unauthorized()),
            // Nobody wakes nothing, and hears nothing about the target.
            (&anon, None, true, &wakes, true, unauthorized()),
            // No use (opted out, an ignore rule) wakes nothing.
            (&cert, None, false, &wakes, false, Refuse(ProxyError::AsleepIgnored(t.clone()))),
            // A use is recorded, but the target's rules keep it asleep.
            (&cert, None, true, &off, false, RecordAndRefuse(ProxyError::WakeOnRequestOff(t.clone()))),
            (
                &cert,
                None,
                true,
                &never,
                false,
                RecordAndRefuse(ProxyError::Prevented(t.clone(), Until::Never)),
            ),
            (
                &bearer,
                Some(&sa),
                true,
                &never,
                false,
                RecordAndRefuse(ProxyError::Prevented(t.clone(), Until::Never)),
            ),
            (
                &cert,
                None,
                true,
                &invalid,
                false,
                RecordAndRefuse(ProxyError::Invalid(t.clone(), "SleepPolicy p is invalid".into())),
            ),
        ];
        for (caller, proof, counted, rules, budget, want) in table {
            assert_eq!(
                admit(&t, caller, proof, counted, rules, budget),
                want,
                "{caller:?} {proof:?} counted={counted} {rules:?} budget={budget}"
            );
        }
    }

    #[test]
    fn one_unverified_wake_per_interval() {
        let now: DateTime<Utc> = "2026-12-02T10:00:00Z".parse().unwrap();
        let every = Duration::from_secs(600);
        let rules = |at: Option<&str>| WakeRules {
            on_request: true,
            timeout: Duration::from_secs(120),
            prevented: None,
            unverified_wake: at.map(|a| a.parse().unwrap()),
        };
        assert!(rules(None).unverified_budget(every, now));
        assert!(!rules(Some("2026-12-02T09:55:00Z")).unverified_budget(every, now));
        assert!(rules(Some("2026-12-02T09:50:00Z")).unverified_budget(every, now));
        // One dated ahead (another clock) spends the budget, never refunds it.
        assert!(!rules(Some("2026-12-02T10:05:00Z")).unverified_budget(every, now));
    }

    #[test]
    fn a_forced_sleep_prevents_wakes_only_until_its_end() {
        let policy = crate::policy::resolve(
            crate::policy::TargetKind::VCluster,
            &Default::default(),
            &TargetAnnotations::default(),
            &[],
            &crate::policy::Defaults::default(),
        )
        .unwrap();
        let now: DateTime<Utc> = "2026-12-02T10:00:00Z".parse().unwrap();
        let until = |s: &str| Until::Time(s.parse().unwrap());
        let forced = |u: Option<Until>| TargetAnnotations {
            force_sleep: Some(ForceSleep::Requested),
            prevent_wakeup_until: u,
            ..Default::default()
        };
        assert_eq!(WakeRules::of(&policy, &forced(Some(Until::Never)), now).prevented, Some(Until::Never));
        let later = until("2026-12-02T11:00:00Z");
        assert_eq!(WakeRules::of(&policy, &forced(Some(later)), now).prevented, Some(later));
        assert_eq!(WakeRules::of(&policy, &forced(Some(until("2026-12-02T09:00:00Z"))), now).prevented, None);
        assert_eq!(WakeRules::of(&policy, &forced(None), now).prevented, None);
        // Without a forced sleep, a leftover prevent-wakeup-until prevents nothing.
        let leftover = TargetAnnotations { prevent_wakeup_until: Some(Until::Never), ..Default::default() };
        assert_eq!(WakeRules::of(&policy, &leftover, now).prevented, None);
        assert!(WakeRules::of(&policy, &leftover, now).on_request);
    }
}
