//! Why the proxy answers a request itself, and the one place such an
//! answer is made: a Kubernetes `Status` that kubectl prints. Only the
//! "overloaded" answers carry `Retry-After`: client-go retries 5xx answers
//! that have it (up to ten times), which is right for a full queue or no
//! room for another upstream connection, and wrong for a timeout or a
//! target that will not wake, whose message the user should see at once.

use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};

use super::upstream::ProxyBody;
use crate::policy::annotations::{Until, rfc3339};
use crate::status::Rejection;
use crate::target::TargetRef;
use crate::vocab::IGNORE_HEADER;

/// Why the proxy answers instead of the upstream.
#[derive(Debug, Clone, PartialEq)]
pub enum ProxyError {
    NotRouted,
    /// The caller is not proven for this target, whatever the reason (no
    /// credential, a certificate the vcluster does not trust, a token known
    /// bad or not checkable while it sleeps, a vcluster that does not exist
    /// or is not served): one answer, kube-apiserver's own, so that nobody
    /// unauthenticated learns which vclusters exist or sleep. The reason
    /// goes to the logs.
    Unauthorized,
    AsleepIgnored(TargetRef),
    Prevented(TargetRef, Until),
    WakeOnRequestOff(TargetRef),
    Overloaded(TargetRef, usize),
    /// No room for another connection to the upstream (the proxy's
    /// limits): nothing was sent.
    UpstreamBusy(TargetRef, String),
    WakeTimeout(TargetRef, Duration),
    /// The target's policy or annotations cannot be read: dormant leaves
    /// it as it is, so a sleeping one will not wake.
    Invalid(TargetRef, String),
    /// The host's API server did not answer what the request needed (down,
    /// restarting, overloaded): the wake's request, the vcluster's Secret.
    /// Nothing was changed; a retry may do.
    ApiUnavailable(TargetRef),
    WakeFailed(TargetRef, String),
    Upstream(TargetRef, String),
}

impl ProxyError {
    /// Why `t`'s upstream cannot be used: the API server did not answer
    /// for its Secret (a retry may do), or the upstream itself is unusable.
    pub fn from_upstream(t: &TargetRef, e: &super::upstream::Error) -> ProxyError {
        if e.transient() {
            ProxyError::ApiUnavailable(t.clone())
        } else {
            ProxyError::Upstream(t.clone(), crate::error::chain(e))
        }
    }

    /// Metric label.
    pub fn outcome(&self) -> &'static str {
        match self {
            ProxyError::NotRouted => "not-found",
            ProxyError::Unauthorized => "unauthenticated",
            ProxyError::AsleepIgnored(_) | ProxyError::Prevented(..) | ProxyError::WakeOnRequestOff(_) => {
                "prevented"
            }
            ProxyError::Overloaded(..) | ProxyError::UpstreamBusy(..) => "overloaded",
            ProxyError::ApiUnavailable(_) => "api-unavailable",
            ProxyError::WakeTimeout(..) => "timeout",
            ProxyError::Invalid(..) => "invalid",
            ProxyError::WakeFailed(..) | ProxyError::Upstream(..) => "upstream-error",
        }
    }

    /// The one place errors become HTTP answers: a Kubernetes `Status`.
    pub fn response(&self) -> Response<ProxyBody> {
        self.rejection().response(full)
    }

    /// What the caller is told.
    pub fn rejection(&self) -> Rejection {
        let (code, reason, message, retry_after): (StatusCode, &'static str, String, Option<u64>) = match self
        {
            ProxyError::NotRouted => (
                StatusCode::NOT_FOUND,
                "NotFound",
                "dormant proxies vclusters at /vcluster/<namespace>/<name>/".into(),
                None,
            ),
            ProxyError::Unauthorized => {
                (StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized".into(), None)
            }
            ProxyError::AsleepIgnored(t) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                format!(
                    "vcluster {}/{} is asleep and this request does not count as use ({IGNORE_HEADER} or an ignore rule)",
                    t.namespace, t.name
                ),
                None,
            ),
            ProxyError::Prevented(t, until) => match until {
                Until::Never => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailable",
                    format!(
                        "vcluster {}/{} was put to sleep and requests do not wake it; wake it with: dormant wake vcluster/{}/{}",
                        t.namespace, t.name, t.namespace, t.name
                    ),
                    None,
                ),
                Until::Time(at) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailable",
                    format!(
                        "vcluster {}/{} is asleep and requests do not wake it until {}",
                        t.namespace,
                        t.name,
                        rfc3339(*at)
                    ),
                    None,
                ),
            },
            ProxyError::WakeOnRequestOff(t) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                format!(
                    "vcluster {}/{} is asleep and its policy does not wake it on request (wake.onRequest: false)",
                    t.namespace, t.name
                ),
                None,
            ),
            ProxyError::Overloaded(t, n) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                format!(
                    "vcluster {}/{} is waking and {n} requests are already waiting; retry shortly",
                    t.namespace, t.name
                ),
                Some(5),
            ),
            ProxyError::UpstreamBusy(t, why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                format!("vcluster {}/{} was not asked: {why}; retry shortly", t.namespace, t.name),
                Some(1),
            ),
            ProxyError::WakeTimeout(t, d) => (
                StatusCode::GATEWAY_TIMEOUT,
                "Timeout",
                format!(
                    "vcluster {}/{} did not wake within {}",
                    t.namespace,
                    t.name,
                    crate::policy::duration::format(*d)
                ),
                None,
            ),
            ProxyError::Invalid(t, why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                format!(
                    "vcluster {}/{} is asleep and dormant leaves it as it is until this is fixed: {why}",
                    t.namespace, t.name
                ),
                None,
            ),
            ProxyError::ApiUnavailable(t) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                format!(
                    "vcluster {}/{}: the host cluster's API server did not answer dormant (down or restarting); retry shortly",
                    t.namespace, t.name
                ),
                Some(5),
            ),
            // What failed (a Secret, a TLS handshake) is the operator's to
            // read in the logs and Events, not the caller's.
            ProxyError::WakeFailed(t, _) => (
                StatusCode::BAD_GATEWAY,
                "ServiceUnavailable",
                format!("waking vcluster {}/{} failed; the agent's log says why", t.namespace, t.name),
                None,
            ),
            ProxyError::Upstream(t, _) => (
                StatusCode::BAD_GATEWAY,
                "ServiceUnavailable",
                format!("vcluster {}/{} is unreachable; the agent's log says why", t.namespace, t.name),
                None,
            ),
        };
        let r = Rejection::new(code, reason, message);
        match retry_after {
            Some(s) => r.retry_after(s),
            None => r,
        }
    }
}

/// A body of `b` alone.
pub fn full(b: Bytes) -> ProxyBody {
    Full::new(b).map_err(|never| match never {}).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header;

    /// Every answer the proxy gives itself is a Kubernetes `Status` with
    /// the code, reason and metric label `docs/proxy.md` gives it, one row
    /// per kind of refusal.
    #[test]
    fn errors_are_kubernetes_statuses_with_the_documented_codes() {
        let doc = include_str!("../../docs/proxy.md");
        // | `504` | `Timeout` | `timeout` | when |
        let documented: Vec<(u16, String, String)> = doc
            .lines()
            .filter_map(|l| {
                let cells: Vec<&str> = l.split('|').map(|c| c.trim().trim_matches('`')).collect();
                let code = cells.get(1)?.parse::<u16>().ok()?;
                Some((code, cells.get(2)?.to_string(), cells.get(3)?.to_string()))
            })
            .collect();
        let t = TargetRef::vcluster("team-a", "dev");
        let errors = [
            ProxyError::NotRouted,
            ProxyError::Unauthorized,
            ProxyError::AsleepIgnored(t.clone()),
            ProxyError::Prevented(t.clone(), Until::Never),
            ProxyError::WakeOnRequestOff(t.clone()),
            ProxyError::Invalid(t.clone(), "annotation dormant.dev/sleep-after=\"soon\": bad".into()),
            ProxyError::Overloaded(t.clone(), 1000),
            ProxyError::UpstreamBusy(
                t.clone(),
                "this connection already has 100 requests in flight, its limit".into(),
            ),
            ProxyError::WakeTimeout(t.clone(), Duration::from_secs(120)),
            ProxyError::ApiUnavailable(t.clone()),
            ProxyError::WakeFailed(
                t.clone(),
                "its upstream cannot be used: the Secret vc-dev is unusable".into(),
            ),
            ProxyError::Upstream(t.clone(), "failed to read the Secret vc-dev of vcluster team-a/dev".into()),
        ];
        assert_eq!(documented.len(), errors.len(), "docs/proxy.md's table: {documented:?}");
        for e in errors {
            let outcome = e.outcome();
            let r = e.response();
            let code = r.status().as_u16();
            let retry = r.headers().contains_key(header::RETRY_AFTER);
            assert_eq!(
                retry,
                matches!(
                    e,
                    ProxyError::Overloaded(..) | ProxyError::UpstreamBusy(..) | ProxyError::ApiUnavailable(_)
                ),
                "Retry-After on {e:?}"
            );
            let body = futures::executor::block_on(r.into_body().collect()).unwrap().to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let reason = v["reason"].as_str().unwrap_or_default().to_string();
            assert_eq!((v["kind"].as_str(), v["code"].as_u64()), (Some("Status"), Some(u64::from(code))));
            assert!(
                documented.contains(&(code, reason.clone(), outcome.to_string())),
                "{e:?} answers {code} {reason} ({outcome}), which docs/proxy.md does not list"
            );
            match e {
                ProxyError::NotRouted => {}
                // The same bytes whatever the target: nothing about it.
                ProxyError::Unauthorized => assert_eq!(
                    std::str::from_utf8(&body).unwrap(),
                    r#"{"apiVersion":"v1","code":401,"kind":"Status","message":"Unauthorized","metadata":{},"reason":"Unauthorized","status":"Failure"}"#
                ),
                _ => assert!(v["message"].as_str().unwrap().contains("team-a/dev"), "{v}"),
            }
            if matches!(e, ProxyError::WakeFailed(..) | ProxyError::Upstream(..)) {
                assert!(!v["message"].as_str().unwrap().contains("Secret"), "details go to the logs: {v}");
            }
        }
    }
}
