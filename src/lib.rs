//! dormant: sleep mode for Kubernetes. Idle virtual clusters and namespaces
//! scale to zero and wake on the first request. See `DESIGN.md` for the
//! picture; each module below is one room of it.

pub mod activity;
pub mod cli;
pub mod policy;
pub mod tls;
