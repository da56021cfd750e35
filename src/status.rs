//! The answers dormant's HTTPS endpoints give themselves, as Kubernetes
//! `Status` objects: kubectl prints their message, and API servers' logs
//! (which post to the audit webhook) print them well. Each endpoint maps
//! its own errors to a [`Rejection`] in one place; this is the one place a
//! `Rejection` becomes bytes on the wire.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use serde_json::json;

/// An answer an endpoint gives instead of (or before) doing its job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: StatusCode,
    /// The `Status` reason (`NotFound`, `Unauthorized`, ...).
    pub reason: &'static str,
    pub message: String,
    /// Seconds after which a retry may succeed. client-go retries 5xx
    /// answers that carry it (up to ten times): right for a full queue,
    /// wrong for an answer the user should see at once.
    pub retry_after: Option<u64>,
}

impl Rejection {
    pub fn new(code: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Rejection { code, reason, message: message.into(), retry_after: None }
    }

    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// The `Status` JSON.
    pub fn body(&self) -> Bytes {
        let status = if self.code.is_success() { "Success" } else { "Failure" };
        Bytes::from(
            json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": status,
                "message": self.message, "reason": self.reason, "code": self.code.as_u16(),
            })
            .to_string(),
        )
    }

    /// The whole answer, its body made by `body` from the JSON.
    pub fn response<B>(&self, body: impl FnOnce(Bytes) -> B) -> Response<B> {
        let mut r = Response::new(body(self.body()));
        *r.status_mut() = self.code;
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rejection_is_a_kubernetes_status_with_its_code() {
        let r = Rejection::new(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", "queue full")
            .retry_after(5);
        let resp = r.response(|b| b);
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "5");
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
        let v: serde_json::Value = serde_json::from_slice(resp.body()).unwrap();
        assert_eq!(v["kind"], "Status");
        assert_eq!(v["status"], "Failure");
        assert_eq!(v["code"], 503);
        assert_eq!(v["reason"], "ServiceUnavailable");
        assert_eq!(v["message"], "queue full");
        let ok = Rejection::new(StatusCode::OK, "", "").response(|b| b);
        let v: serde_json::Value = serde_json::from_slice(ok.body()).unwrap();
        assert_eq!((v["status"].as_str(), ok.headers().get(header::RETRY_AFTER)), (Some("Success"), None));
    }
}
