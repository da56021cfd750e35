//! How dormant renders an error for people: the error and each of its
//! causes, joined by `: ` (as `anyhow` prints `{:#}`), in one place, for
//! logs, Events and the answers its endpoints give.

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

#[cfg(test)]
mod tests {
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
