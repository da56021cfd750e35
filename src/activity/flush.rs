//! Writing counted activity to its target: the newest use (only when
//! newer than what is there: another replica may have written later) and
//! how often each source used it since the last write, added to the
//! target's `activity-sources` counts, which halve at every midnight (UTC).

use std::collections::{BTreeMap, HashMap};

use super::Activity;
use super::ledger::{Flush, SourceCounts};
use crate::annotate::{Annotator, Changes};
use crate::policy::annotations::{format_sources, parse_sources, rfc3339, top_sources};
use crate::target::{Stores, TargetRef};
use crate::vocab::{ACTIVITY_SOURCES, LAST_ACTIVITY, LAST_ACTIVITY_BY};

/// Writes the ledger's newest activity to the target's annotations (only
/// when newer than what is there: another replica may have written later),
/// and adds the counts since the last flush to `activity-sources`.
pub struct AnnotationFlusher {
    pub stores: Stores,
    pub annotator: Annotator,
}

impl Flush for AnnotationFlusher {
    async fn flush(
        &self,
        target: TargetRef,
        activity: Activity,
        sources: SourceCounts,
    ) -> Result<(), crate::annotate::Error> {
        let Some(t) = self.stores.target(&target) else { return Ok(()) };
        // From what the object holds, at that version: another replica (or
        // the controller) may write between the read and this patch.
        self.annotator
            .update(&t.object, |current| activity_changes(current, &activity, &sources))
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
}
