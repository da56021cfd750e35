//! dormant: sleep mode for Kubernetes. Idle virtual clusters and namespaces
//! scale to zero and wake on the first request. `docs/architecture.md`
//! draws the rooms below and which may use which; each module's first
//! lines say what it holds.

pub mod activity;
pub mod admin;
pub mod agent;
pub mod annotate;
pub mod api;
pub mod app_traffic;
pub mod audit;
pub mod auth;
pub mod cli;
pub mod client;
pub mod controller;
pub mod error;
pub mod foresight;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod scaler;
pub mod status;
pub mod target;
pub mod tls;
pub mod vocab;
