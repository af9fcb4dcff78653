//! `trenv-bench`, the load generator: a small FaaS controller that replays workloads against
//! containerd (runc, plain CRIU, trenv's pool, trenv with templates) and reports latency and
//! memory. See docs/benchmarks.md.

pub mod client;
pub mod cni;
pub mod controller;
pub mod manifest;
pub mod memory;
pub mod node;
pub mod plot;
pub mod report;
pub mod trace;
