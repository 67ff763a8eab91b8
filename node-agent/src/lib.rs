//! strata-node-agent: a DaemonSet on GPU nodes. Every interval it reads
//! NVML for every GPU of its node (utilization, memory, power, temperature,
//! the total-energy counter) and the kubelet's PodResources API for which
//! pod and container holds each GPU, and serves both on `/metrics` with
//! dcgm-exporter's labels, plus energy per container and GPU (each
//! interval's increment of a GPU's counter goes to its holder at that
//! sample, reset-safe).
//!
//! - [`ledger`]: the accounts, pure (readings and holders in, joules out).
//! - [`metrics`]: the exposition, pure (names, labels, rendering).
//! - [`nvml`]: NVML on a thread of its own, bounded in time.
//! - [`agent`]: the loop, its state, and the HTTP endpoints.
//! - [`caps`]: the GPUPools' power cap for this node, from the API server.
//! - [`error`]: one error enum.
//!
//! See docs/node-agent.md for what it needs from a node.

pub mod agent;
pub mod caps;
pub mod error;
pub mod ledger;
pub mod metrics;
pub mod nvml;

pub use error::Error;
