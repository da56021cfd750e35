//! How dormant renders an error for people: the error and each of its
//! causes, joined by `: ` (as `anyhow` prints `{:#}`), in one place, for
//! logs, Events and the answers its endpoints give; and whether a failed
//! API request is worth making again ([`transient`]).

use std::fmt;

/// Displays `error: cause: cause's cause`.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'a));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cur = self.0.source();
        while let Some(c) = cur {
            write!(f, ": {c}")?;
            cur = c.source();
        }
        Ok(())
    }
}

/// `error: cause: cause's cause`.
pub fn chain(e: &dyn std::error::Error) -> String {
    Chain(e).to_string()
}

/// Whether a failed API request may succeed if made again unchanged: the
/// API server was unreachable (down, restarting), overloaded (429) or
/// failed itself (5xx). A refusal (403, 404, 409, a bad request) is not.
pub fn transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => s.code == 429 || s.code >= 500,
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    fn api(code: u16) -> kube::Error {
        kube::Error::Api(kube::core::Status::failure("x", "y").with_code(code).boxed())
    }

    #[test]
    fn only_an_api_server_that_did_not_answer_is_worth_asking_again() {
        for code in [429, 500, 502, 503, 504] {
            assert!(super::transient(&api(code)), "{code}");
        }
        for code in [400, 401, 403, 404, 409, 422] {
            assert!(!super::transient(&api(code)), "{code}");
        }
        assert!(super::transient(&kube::Error::Service("connection refused".into())));
        assert!(!super::transient(&kube::Error::LinesCodecMaxLineLengthExceeded));
    }

    #[derive(Debug, thiserror::Error)]
    #[error("failed to patch Deployment shop/web")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("connection refused")]
    struct Inner;

    #[test]
    fn an_error_reads_with_every_cause() {
        assert_eq!(super::chain(&Outer(Inner)), "failed to patch Deployment shop/web: connection refused");
        assert_eq!(super::chain(&Inner), "connection refused");
    }
}
