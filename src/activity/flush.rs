//! Writing counted activity to its target: the newest use (only when
//! newer than what is there: another replica may have written later) and
//! how often each source used it since the last write, added to the
//! target's `activity-sources` counts, which halve at every midnight (UTC),
//! and to its weekly activity profile (`crate::foresight::profile`), kept
//! in the time zone of its policy.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

use super::Activity;
use super::ledger::{Flush, SourceCounts};
use crate::annotate::{Annotator, Changes};
use crate::foresight::profile::Profile;
use crate::policy::Defaults;
use crate::policy::annotations::{TargetState, format_sources, parse_sources, rfc3339, top_sources};
use crate::target::effective::effective;
use crate::target::{Scope, Stores, TargetRef};
use crate::vocab::{
    ACTIVITY_PROFILE, ACTIVITY_SOURCES, ASLEEP_SINCE, LAST_ACTIVITY, LAST_ACTIVITY_BY, STATE,
};

/// Writes the ledger's newest activity to the target's annotations (only
/// when newer than what is there: another replica may have written later),
/// and adds the counts since the last flush to `activity-sources` and the
/// activity profile.
pub struct AnnotationFlusher {
    pub stores: Stores,
    pub annotator: Annotator,
    /// What the target's effective policy (its time zone, for the profile)
    /// is resolved with: the agent's.
    pub defaults: Defaults,
    pub scope: Scope,
}

impl Flush for AnnotationFlusher {
    async fn flush(
        &self,
        target: TargetRef,
        activity: Activity,
        sources: SourceCounts,
    ) -> Result<(), crate::annotate::Error> {
        let Some(t) = self.stores.target(&target) else { return Ok(()) };
        // The profile is kept in the policy's time zone; an invalid target
        // keeps its profile as it is (its activity is still written).
        let tz = effective(&self.stores, &self.defaults, &self.scope, &target)
            .ok()
            .flatten()
            .map(|g| g.policy.timezone.value);
        // From what the object holds, at that version: another replica (or
        // the controller) may write between the read and this patch.
        self.annotator
            .update(&t.object, |current| {
                let mut changes = activity_changes(current, &activity, &sources);
                if let Some(tz) = tz
                    && let Some(p) = profile_change(current, &activity, &sources, tz, Utc::now())
                {
                    changes.insert(ACTIVITY_PROFILE, Some(p));
                }
                changes
            })
            .await
            .map(|_| ())
    }
}

/// The annotations that record `activity` and add `sources` to the counts
/// in `current`. The counts recorded there halve at every midnight (UTC)
/// since the last recorded activity, so who uses a target now outweighs
/// who used it weeks ago, and sources that stopped drop out.
fn activity_changes(
    current: &BTreeMap<String, String>,
    activity: &Activity,
    sources: &SourceCounts,
) -> Changes {
    // Only the two values this write builds on, each on its own: a typo in
    // any other annotation of the target must not make them unreadable
    // (last-activity would move back, the counts start again).
    let last = current
        .get(LAST_ACTIVITY)
        .and_then(|v| chrono::DateTime::parse_from_rfc3339(v.trim()).ok())
        .map(|t| t.with_timezone(&chrono::Utc));
    let recorded = current.get(ACTIVITY_SOURCES).map(|v| parse_sources(v)).unwrap_or_default();
    let mut changes = Changes::new();
    if last.is_none_or(|c| c < activity.at) {
        changes.insert(LAST_ACTIVITY, Some(rfc3339(activity.at)));
        changes.insert(LAST_ACTIVITY_BY, Some(activity.summary()));
    }
    if !sources.is_empty() {
        // Midnights crossed: the same halvings however often it is flushed.
        let halvings =
            last.map_or(0, |c| (activity.at.date_naive() - c.date_naive()).num_days().clamp(0, 63));
        let mut counts: HashMap<String, u64> =
            recorded.into_iter().map(|(who, n)| (who, n >> halvings)).filter(|(_, n)| *n > 0).collect();
        for (who, n) in sources {
            *counts.entry(who.clone()).or_default() += n;
        }
        changes.insert(ACTIVITY_SOURCES, Some(format_sources(&top_sources(counts))));
    }
    changes
}

/// The new activity profile, when this flush adds to it: the uses since
/// the last flush (how many each source made, at the newest one's instant:
/// flushes are a second or so apart), and, when this is the first use the
/// profile sees since the target fell asleep, a cold start. Bounded in size
/// whatever `current` holds (`foresight::profile::MAX_BYTES`).
fn profile_change(
    current: &BTreeMap<String, String>,
    activity: &Activity,
    sources: &SourceCounts,
    tz: Tz,
    now: DateTime<Utc>,
) -> Option<String> {
    let mut count = sources.values().fold(0u64, |a, n| a.saturating_add(*n));
    let last = current
        .get(LAST_ACTIVITY)
        .and_then(|v| DateTime::parse_from_rfc3339(v.trim()).ok())
        .map(|t| t.with_timezone(&Utc));
    if count == 0 && last.is_none_or(|l| l < activity.at) {
        count = 1;
    }
    if count == 0 {
        return None;
    }
    let mut profile = Profile::read_or_new(current.get(ACTIVITY_PROFILE).map(String::as_str), tz, now);
    let asleep = current
        .get(STATE)
        .and_then(|s| s.parse::<TargetState>().ok())
        .is_some_and(|s| matches!(s, TargetState::Asleep | TargetState::Sleeping | TargetState::Waking));
    let since = current
        .get(ASLEEP_SINCE)
        .and_then(|v| DateTime::parse_from_rfc3339(v.trim()).ok())
        .map(|t| t.with_timezone(&Utc));
    let cold = match since {
        Some(s) if asleep && activity.at > s && profile.last_use().is_none_or(|l| l <= s) => {
            vec![activity.at]
        }
        _ => vec![],
    };
    profile.record(&[(activity.at, count)], &cold, now);
    let value = profile.encode();
    (current.get(ACTIVITY_PROFILE) != Some(&value)).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::activity::Source;

    fn alice_at(at: &str) -> Activity {
        Activity {
            at: at.parse().unwrap(),
            source: Source::Proxy,
            user: "alice".into(),
            groups: vec![],
            user_agent: "kubectl".into(),
            verb: "get".into(),
            resource: None,
            path: "/api".into(),
            code: None,
            in_vcluster: false,
        }
    }

    fn annotations(last: &str, sources: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            (LAST_ACTIVITY.to_string(), last.to_string()),
            (ACTIVITY_SOURCES.to_string(), sources.to_string()),
        ])
    }

    fn sources_after(current: &BTreeMap<String, String>, at: &str, n: u64) -> serde_json::Value {
        let counts = SourceCounts::from([("alice (kubectl)".to_string(), n)]);
        let changes = activity_changes(current, &alice_at(at), &counts);
        serde_json::from_str(changes[ACTIVITY_SOURCES].as_deref().unwrap()).unwrap()
    }

    #[test]
    fn recorded_counts_halve_at_each_midnight_and_stopped_sources_drop_out() {
        let current = annotations("2026-11-24T23:59:00Z", r#"{"bob (ci)": 8, "carol (k9s)": 1}"#);
        assert_eq!(
            sources_after(&current, "2026-11-25T00:01:00Z", 3),
            serde_json::json!({"alice (kubectl)": 3, "bob (ci)": 4})
        );
        assert_eq!(
            sources_after(&current, "2026-11-27T12:00:00Z", 3),
            serde_json::json!({"alice (kubectl)": 3, "bob (ci)": 1})
        );
        assert_eq!(
            sources_after(&current, "2026-12-30T12:00:00Z", 3),
            serde_json::json!({"alice (kubectl)": 3})
        );
    }

    #[test]
    fn flushes_within_one_day_add_up_exactly() {
        let mut current = annotations("2026-11-25T00:00:00Z", r#"{"bob (ci)": 5}"#);
        for minute in 1..=30 {
            let at = format!("2026-11-25T10:{minute:02}:00Z");
            let counts = SourceCounts::from([("alice (kubectl)".to_string(), 1)]);
            for (k, v) in activity_changes(&current, &alice_at(&at), &counts) {
                current.insert(k.to_string(), v.unwrap());
            }
        }
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&current[ACTIVITY_SOURCES]).unwrap(),
            serde_json::json!({"alice (kubectl)": 30, "bob (ci)": 5})
        );
        assert_eq!(current[LAST_ACTIVITY], rfc3339("2026-11-25T10:30:00Z".parse().unwrap()));
    }

    #[test]
    fn a_typo_in_another_annotation_changes_nothing_here() {
        let mut current = annotations("2026-11-26T08:00:00Z", r#"{"bob (ci)": 8}"#);
        current.insert("dormant.dev/sleep-afer".into(), "1h".into());
        assert!(crate::policy::annotations::TargetAnnotations::parse(&current).is_err());
        let counts = SourceCounts::from([("alice (kubectl)".to_string(), 2)]);
        let changes = activity_changes(&current, &alice_at("2026-11-26T07:00:00Z"), &counts);
        assert!(!changes.contains_key(LAST_ACTIVITY), "moved last-activity back: {changes:?}");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(changes[ACTIVITY_SOURCES].as_deref().unwrap()).unwrap(),
            serde_json::json!({"alice (kubectl)": 2, "bob (ci)": 8})
        );
    }

    #[test]
    fn an_older_flush_from_another_replica_neither_decays_nor_moves_last_activity_back() {
        let current = annotations("2026-11-26T08:00:00Z", r#"{"bob (ci)": 8}"#);
        let counts = SourceCounts::from([("alice (kubectl)".to_string(), 2)]);
        let changes = activity_changes(&current, &alice_at("2026-11-24T08:00:00Z"), &counts);
        assert!(!changes.contains_key(LAST_ACTIVITY));
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(changes[ACTIVITY_SOURCES].as_deref().unwrap()).unwrap(),
            serde_json::json!({"alice (kubectl)": 2, "bob (ci)": 8})
        );
    }

    #[test]
    fn flushes_add_to_the_profile_and_only_the_first_use_after_a_sleep_is_a_cold_start() {
        let tz = chrono_tz::Europe::Berlin;
        let mut current = annotations("2026-11-25T08:00:00Z", "{}");
        current.insert(STATE.into(), "asleep".into());
        current.insert(ASLEEP_SINCE.into(), "2026-11-25T08:30:00Z".into());
        let counts = SourceCounts::from([("alice (kubectl)".to_string(), 4)]);
        let a = alice_at("2026-11-26T08:05:00Z");
        let v = profile_change(&current, &a, &counts, tz, a.at).unwrap();
        let p = Profile::parse(&v).unwrap();
        assert_eq!((p.cold_starts(), p.last_use()), (vec![a.at], Some(a.at)));
        // Thursday 09:05 in Berlin.
        let h = crate::foresight::profile::hour_of_week(a.at.with_timezone(&tz).naive_local());
        assert_eq!(h, 3 * 24 + 9);
        assert!((p.uses(a.at)[h] - 4.0).abs() < 0.01, "{}", p.uses(a.at)[h]);
        // The next flush, while it wakes: more use, no second cold start.
        current.insert(STATE.into(), "waking".into());
        current.insert(ACTIVITY_PROFILE.into(), v);
        current.insert(LAST_ACTIVITY.into(), rfc3339(a.at));
        let b = alice_at("2026-11-26T08:05:02Z");
        let p = Profile::parse(&profile_change(&current, &b, &counts, tz, b.at).unwrap()).unwrap();
        assert_eq!(p.cold_starts(), vec![a.at]);
        assert!((p.uses(b.at)[h] - 8.0).abs() < 0.01);
        // Nothing new since the last write: the profile stays as it is.
        let none = SourceCounts::new();
        assert_eq!(profile_change(&current, &a, &none, tz, a.at), None);
    }

    #[test]
    fn a_garbage_profile_starts_afresh_within_its_size_bound() {
        let mut current = annotations("2026-11-25T08:00:00Z", "{}");
        current.insert(ACTIVITY_PROFILE.into(), "v1;".repeat(50_000));
        let counts = SourceCounts::from([("alice (kubectl)".to_string(), u64::MAX / 2)]);
        let a = alice_at("2026-11-26T08:05:00Z");
        let v = profile_change(&current, &a, &counts, chrono_tz::UTC, a.at).unwrap();
        assert!(v.len() <= crate::foresight::profile::MAX_BYTES, "{}", v.len());
        assert_eq!(Profile::parse(&v).unwrap().last_use(), Some(a.at));
    }
}
