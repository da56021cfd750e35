//! dormant: sleep mode for Kubernetes. Idle virtual clusters and namespaces
//! scale to zero and wake on the first request. See `DESIGN.md` for the
//! picture; each module below is one room of it.

pub mod activity;
pub mod admin;
pub mod agent;
pub mod audit;
pub mod cli;
pub mod controller;
pub mod foresight;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod scaler;
pub mod target;
pub mod tls;
