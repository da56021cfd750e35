//! The API resource a request touched. Self-contained, so the fuzzer
//! builds it with the proxy's request reading.

/// The API resource a request touched.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResourceRef {
    /// API group; empty for the core group.
    pub group: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
}
