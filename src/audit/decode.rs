//! Decoding `audit.k8s.io/v1` `EventList` bodies: tolerant of unknown and
//! absent optional fields, strict about the ones dormant needs, and cheap —
//! strings are borrowed from the body unless they contain escapes.
//!
//! Self-contained (serde and thiserror only) so the fuzzer builds it alone.

use std::borrow::Cow;

use serde::Deserialize;

/// Why a body is not an audit event list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("body is not a valid audit EventList: {0}")]
    Json(String),
    #[error("expected kind EventList, got {0:?}")]
    Kind(String),
    #[error("expected apiVersion audit.k8s.io/v1, got {0:?}")]
    Version(String),
}

impl DecodeError {
    /// Short, stable category (metric label).
    pub fn category(&self) -> &'static str {
        match self {
            DecodeError::Json(_) => "malformed",
            DecodeError::Kind(_) => "wrong-kind",
            DecodeError::Version(_) => "wrong-version",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawList<'a> {
    #[serde(borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    api_version: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    items: Vec<Event<'a>>,
}

/// One audit event (the fields dormant reads).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event<'a> {
    #[serde(borrow, rename = "auditID")]
    pub audit_id: Cow<'a, str>,
    #[serde(borrow)]
    pub stage: Cow<'a, str>,
    #[serde(borrow, rename = "requestURI")]
    pub request_uri: Cow<'a, str>,
    #[serde(borrow)]
    pub verb: Cow<'a, str>,
    #[serde(borrow)]
    pub user: UserInfo<'a>,
    #[serde(borrow, default)]
    pub impersonated_user: Option<UserInfo<'a>>,
    #[serde(borrow, default)]
    pub user_agent: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub object_ref: Option<ObjectRef<'a>>,
    #[serde(default)]
    pub response_status: Option<ResponseStatus>,
    #[serde(borrow, default)]
    pub stage_timestamp: Option<Cow<'a, str>>,
    /// The authorizer's decision and reason, and whatever else the API
    /// server annotated the event with (only the decision is read).
    #[serde(borrow, default)]
    pub annotations: Option<Annotations<'a>>,
}

/// An event's `annotations`, of which dormant reads one.
#[derive(Debug, Clone, Deserialize)]
pub struct Annotations<'a> {
    #[serde(borrow, default, rename = "authorization.k8s.io/decision")]
    pub decision: Option<Cow<'a, str>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct UserInfo<'a> {
    /// Empty (absent) for a request the API server could not authenticate.
    #[serde(borrow, default)]
    pub username: Cow<'a, str>,
    #[serde(borrow, default)]
    pub groups: Vec<Cow<'a, str>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectRef<'a> {
    #[serde(borrow, default)]
    pub resource: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub namespace: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub api_group: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub subresource: Option<Cow<'a, str>>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
pub struct ResponseStatus {
    #[serde(default)]
    pub code: Option<i32>,
}

/// Decodes an `EventList`; every item must carry auditID, stage,
/// requestURI, verb and user (whose username is absent when the request
/// could not be authenticated).
pub fn decode(body: &[u8]) -> Result<Vec<Event<'_>>, DecodeError> {
    let list: RawList<'_> = serde_json::from_slice(body).map_err(|e| DecodeError::Json(e.to_string()))?;
    match list.kind.as_deref() {
        Some("EventList") => {}
        other => return Err(DecodeError::Kind(other.unwrap_or("").to_string())),
    }
    match list.api_version.as_deref() {
        Some("audit.k8s.io/v1") => {}
        other => return Err(DecodeError::Version(other.unwrap_or("").to_string())),
    }
    Ok(list.items)
}

/// Subresources whose requests stay open (their `ResponseStarted` counts):
/// kube-apiserver's own list (`BasicLongRunningRequestCheck`). `log` is one:
/// `kubectl logs -f` counts when it starts, not when the stream ends.
const LONG_RUNNING_SUBRESOURCES: &[&str] = &["exec", "attach", "portforward", "proxy", "log"];

impl Event<'_> {
    /// True for long-running requests: watches and streams.
    pub fn long_running(&self) -> bool {
        self.verb == "watch"
            || self
                .object_ref
                .as_ref()
                .and_then(|o| o.subresource.as_deref())
                .is_some_and(|s| LONG_RUNNING_SUBRESOURCES.contains(&s))
            || self.request_uri.contains("watch=true")
            || self.request_uri.contains("watch=1")
    }

    /// One request counts once: at `ResponseComplete`, or at
    /// `ResponseStarted` for long-running requests and for requests that
    /// failed authentication (audited only at that stage).
    pub fn counts(&self) -> bool {
        match self.stage.as_ref() {
            "ResponseComplete" => !self.long_running(),
            "ResponseStarted" => self.long_running() || self.user.username.is_empty(),
            _ => false,
        }
    }

    /// True for a request the API server refused because it could not
    /// authenticate it (audited with no user, status 401).
    pub fn unauthenticated(&self) -> bool {
        self.user.username.is_empty() || self.response_status.and_then(|s| s.code) == Some(401)
    }

    /// The code of the API server's answer: its `responseStatus`, or 403
    /// when the authorizer's decision was `forbid` (a request refused by
    /// authorization is audited with that decision even where the status
    /// is missing).
    pub fn code(&self) -> Option<u16> {
        let code = self.response_status.and_then(|s| s.code).and_then(|c| u16::try_from(c).ok());
        let forbidden = self.annotations.as_ref().and_then(|a| a.decision.as_deref()) == Some("forbid");
        match code {
            None if forbidden => Some(403),
            code => code,
        }
    }

    /// The user the request acted as (the impersonated one, if any).
    pub fn effective_user(&self) -> &UserInfo<'_> {
        self.impersonated_user.as_ref().unwrap_or(&self.user)
    }

    /// The namespace the request touched: the object's namespace, or the
    /// namespace itself for a Namespace object.
    pub fn namespace(&self) -> Option<&str> {
        let o = self.object_ref.as_ref()?;
        match (o.namespace.as_deref(), o.resource.as_deref(), o.api_group.as_deref()) {
            (Some(ns), _, _) if !ns.is_empty() => Some(ns),
            (_, Some("namespaces"), None | Some("")) => o.name.as_deref().filter(|n| !n.is_empty()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::to_activity;
    use chrono::Utc;

    const ONE: &str = r#"{"kind":"EventList","apiVersion":"audit.k8s.io/v1","metadata":{},"items":[
      {"level":"Metadata","auditID":"a1","stage":"ResponseComplete","requestURI":"/api/v1/namespaces/team-a/pods?limit=500",
       "verb":"list","user":{"username":"alice","groups":["team-a","system:authenticated"]},"sourceIPs":["127.0.0.1"],
       "userAgent":"kubectl/v1.37.2 (linux/amd64) kubernetes/abc","objectRef":{"resource":"pods","namespace":"team-a","apiVersion":"v1"},
       "responseStatus":{"metadata":{},"status":"Failure","reason":"Forbidden","code":403},
       "requestReceivedTimestamp":"2026-11-26T10:00:00.000000Z","stageTimestamp":"2026-11-26T10:00:00.010000Z",
       "annotations":{"authorization.k8s.io/decision":"forbid"},"somethingNew":{"x":1}}]}"#;

    #[test]
    fn decodes_a_real_shaped_event_and_ignores_unknown_fields() {
        let items = decode(ONE.as_bytes()).unwrap();
        assert_eq!(items.len(), 1);
        let e = &items[0];
        assert!(e.counts());
        assert_eq!(e.namespace(), Some("team-a"));
        let a = to_activity(e, Utc::now(), &crate::audit::Origin::Host);
        assert_eq!(a.user, "alice");
        assert_eq!(a.verb, "list");
        assert_eq!(a.path, "/api/v1/namespaces/team-a/pods");
        assert_eq!(a.resource.unwrap().resource, "pods");
        assert_eq!(a.at.to_rfc3339(), "2026-11-26T10:00:00.010+00:00");
        // Borrowed, not copied, when there is nothing to unescape.
        assert!(matches!(e.verb, Cow::Borrowed(_)));
    }

    #[test]
    fn bad_bodies_are_errors_with_a_reason() {
        for (body, category, needle) in [
            ("not json", "malformed", "expected"),
            (
                r#"{"kind":"EventList","apiVersion":"audit.k8s.io/v1beta1","items":[]}"#,
                "wrong-version",
                "v1beta1",
            ),
            (r#"{"kind":"Event","apiVersion":"audit.k8s.io/v1","items":[]}"#, "wrong-kind", "Event"),
            (r#"{"apiVersion":"audit.k8s.io/v1","items":[]}"#, "wrong-kind", "EventList"),
            (
                r#"{"kind":"EventList","apiVersion":"audit.k8s.io/v1","items":[{"auditID":"x","stage":"ResponseComplete","requestURI":"/","user":{"username":"a"}}]}"#,
                "malformed",
                "missing field `verb`",
            ),
            (
                r#"{"kind":"EventList","apiVersion":"audit.k8s.io/v1","items":[{"auditID":"x","stage":"ResponseComplete","requestURI":"/","verb":"get"}]}"#,
                "malformed",
                "missing field `user`",
            ),
            (
                r#"{"kind":"EventList","apiVersion":"audit.k8s.io/v1","items":[{"auditID":"x","stage":"ResponseComplete","requestURI":"/","verb":"get","user":{"username":7}}]}"#,
                "malformed",
                "invalid type",
            ),
        ] {
            let e = decode(body.as_bytes()).unwrap_err();
            assert_eq!(e.category(), category, "{body}");
            assert!(e.to_string().contains(needle), "{body}: {e}");
        }
    }

    #[test]
    fn each_request_counts_once() {
        let ev = |stage: &str, verb: &str, sub: &str, uri: &str| {
            format!(
                r#"{{"kind":"EventList","apiVersion":"audit.k8s.io/v1","items":[{{"auditID":"x","stage":"{stage}","requestURI":"{uri}","verb":"{verb}","user":{{"username":"a"}},"objectRef":{{"resource":"pods","namespace":"n","subresource":"{sub}"}}}}]}}"#
            )
        };
        for (stage, verb, sub, uri, counts) in [
            ("RequestReceived", "get", "", "/api/v1/namespaces/n/pods/p", false),
            ("ResponseStarted", "get", "", "/api/v1/namespaces/n/pods/p", false),
            ("ResponseComplete", "get", "", "/api/v1/namespaces/n/pods/p", true),
            ("Panic", "get", "", "/api/v1/namespaces/n/pods/p", false),
            ("ResponseStarted", "watch", "", "/api/v1/namespaces/n/pods?watch=true", true),
            ("ResponseComplete", "watch", "", "/api/v1/namespaces/n/pods?watch=true", false),
            ("ResponseStarted", "create", "exec", "/api/v1/namespaces/n/pods/p/exec", true),
            ("ResponseComplete", "create", "exec", "/api/v1/namespaces/n/pods/p/exec", false),
            ("ResponseStarted", "get", "log", "/api/v1/namespaces/n/pods/p/log?follow=true", true),
            ("ResponseComplete", "get", "log", "/api/v1/namespaces/n/pods/p/log?follow=true", false),
            ("ResponseStarted", "list", "", "/api/v1/namespaces/n/pods?watch=true&resourceVersion=1", true),
        ] {
            let body = ev(stage, verb, sub, uri);
            let items = decode(body.as_bytes()).unwrap();
            assert_eq!(items[0].counts(), counts, "{stage} {verb} {sub} {uri}");
        }
    }

    #[test]
    fn a_request_that_failed_authentication_decodes_and_is_unauthenticated() {
        // As kube-apiserver audits a request with a token it does not know.
        let body = r#"{"kind":"EventList","apiVersion":"audit.k8s.io/v1","items":[
          {"level":"Metadata","auditID":"f1","stage":"ResponseStarted","requestURI":"/api/v1/namespaces/team-a/pods?limit=500","verb":"list","user":{},"sourceIPs":["127.0.0.1"],"userAgent":"kubectl/v1.37.2","objectRef":{"resource":"pods","namespace":"team-a","apiVersion":"v1"},"responseStatus":{"metadata":{},"status":"Failure","message":"Unauthorized","reason":"Unauthorized","code":401}},
          {"auditID":"f2","stage":"ResponseComplete","requestURI":"/api","verb":"get","user":{"username":"alice"},"responseStatus":{"code":401}},
          {"auditID":"f3","stage":"ResponseComplete","requestURI":"/api","verb":"get","user":{"username":"alice"},"responseStatus":{"code":403}}]}"#;
        let items = decode(body.as_bytes()).unwrap();
        let refused: Vec<bool> = items.iter().map(Event::unauthenticated).collect();
        assert_eq!(refused, [true, true, false]);
        // Each is looked at once (the first is audited at no other stage).
        assert!(items.iter().all(Event::counts));
    }

    #[test]
    fn namespace_objects_count_for_themselves_and_impersonation_for_the_impersonated() {
        let body = r#"{"kind":"EventList","apiVersion":"audit.k8s.io/v1","items":[{"auditID":"x","stage":"ResponseComplete","requestURI":"/api/v1/namespaces/team-b","verb":"get","user":{"username":"dormant-proxy"},"impersonatedUser":{"username":"bob","groups":["devs"]},"objectRef":{"resource":"namespaces","name":"team-b","apiVersion":"v1"}}]}"#;
        let items = decode(body.as_bytes()).unwrap();
        assert_eq!(items[0].namespace(), Some("team-b"));
        let a = to_activity(&items[0], Utc::now(), &crate::audit::Origin::Host);
        assert_eq!((a.user.as_str(), a.groups.as_slice()), ("bob", &["devs".to_string()][..]));
    }
}
