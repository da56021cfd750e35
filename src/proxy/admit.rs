//! Step 4, admit: whether a request for a target that is not ready may
//! wake it. A pure function of who the caller is, whether the request
//! counts as use, whether the caller's token was refused when the target
//! was last awake, and the target's wake rules.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::auth::Caller;
use super::error::ProxyError;
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
}

impl WakeRules {
    /// The rules of a target with this policy and these annotations, `now`.
    pub fn of(policy: &EffectivePolicy, annotations: &TargetAnnotations, now: DateTime<Utc>) -> WakeRules {
        let prevented = match (annotations.force_sleep, annotations.prevent_wakeup_until) {
            (Some(ForceSleep::Since(_) | ForceSleep::Requested), Some(u)) if u.covers(now) => Some(u),
            _ => None,
        };
        WakeRules { on_request: policy.wake_on_request.value, timeout: policy.wake_timeout.value, prevented }
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
}

/// Decides (see [`Admission`]); `rules` is the target's wake rules, or
/// why its policy cannot be read.
pub fn admit(
    t: &TargetRef,
    caller: &Caller,
    counted: bool,
    token_refused: bool,
    rules: &Result<WakeRules, String>,
) -> Admission {
    if *caller == Caller::Anonymous {
        return Admission::Refuse(ProxyError::CredentialsRequired(t.clone()));
    }
    if token_refused && matches!(caller, Caller::Bearer { .. }) {
        return Admission::Refuse(ProxyError::TokenRefused(t.clone()));
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

    /// Who may wake what: each row a caller, whether the request counts,
    /// whether its token was refused, the target's rules, and the answer.
    #[test]
    fn who_may_wake_what() {
        let t = TargetRef::vcluster("team-a", "dev");
        let cert = Caller::Certificate { user: "alice".into(), groups: vec!["team-a".into()] };
        let sa = Caller::Bearer {
            service_account: Some((
                "system:serviceaccount:ci:deployer".into(),
                vec!["system:serviceaccounts".into()],
            )),
        };
        let token = Caller::Bearer { service_account: None };
        let anon = Caller::Anonymous;
        let wakes = Ok(WakeRules { on_request: true, timeout: Duration::from_secs(120), prevented: None });
        let off = Ok(WakeRules { on_request: false, timeout: Duration::from_secs(120), prevented: None });
        let never = Ok(WakeRules {
            on_request: true,
            timeout: Duration::from_secs(120),
            prevented: Some(Until::Never),
        });
        let invalid: Result<WakeRules, String> = Err("SleepPolicy p is invalid".into());
        use Admission::*;
        type Row<'a> = (&'a Caller, bool, bool, &'a Result<WakeRules, String>, Admission);
        let table: [Row<'_>; 14] = [
            (&cert, true, false, &wakes, Wake(Duration::from_secs(120))),
            (&sa, true, false, &wakes, Wake(Duration::from_secs(120))),
            (&token, true, false, &wakes, Wake(Duration::from_secs(120))),
            // A refused token is remembered for bearer callers only.
            (&token, true, true, &wakes, Refuse(ProxyError::TokenRefused(t.clone()))),
            (&sa, true, true, &wakes, Refuse(ProxyError::TokenRefused(t.clone()))),
            (&cert, true, true, &wakes, Wake(Duration::from_secs(120))),
            // Nobody, or no use (opted out, an ignore rule), wakes nothing.
            (&anon, true, false, &wakes, Refuse(ProxyError::CredentialsRequired(t.clone()))),
            (&anon, false, false, &wakes, Refuse(ProxyError::CredentialsRequired(t.clone()))),
            (&cert, false, false, &wakes, Refuse(ProxyError::AsleepIgnored(t.clone()))),
            (&token, false, true, &wakes, Refuse(ProxyError::TokenRefused(t.clone()))),
            // A use is recorded, but the target's rules keep it asleep.
            (&cert, true, false, &off, RecordAndRefuse(ProxyError::WakeOnRequestOff(t.clone()))),
            (&cert, true, false, &never, RecordAndRefuse(ProxyError::Prevented(t.clone(), Until::Never))),
            (&sa, true, false, &never, RecordAndRefuse(ProxyError::Prevented(t.clone(), Until::Never))),
            (
                &cert,
                true,
                false,
                &invalid,
                RecordAndRefuse(ProxyError::Invalid(t.clone(), "SleepPolicy p is invalid".into())),
            ),
        ];
        for (caller, counted, refused, rules, want) in table {
            assert_eq!(
                admit(&t, caller, counted, refused, rules),
                want,
                "{caller:?} counted={counted} refused={refused} {rules:?}"
            );
        }
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
