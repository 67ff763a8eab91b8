//! strata-gateway: the Models' front door, its own process (stateless; any
//! number of replicas). One OpenAI-compatible endpoint for every Model,
//! routed by the request's `model`, and the activator's per-Model path;
//! the replica picked per request by `strata_core::routing` (adapter
//! carriers only, prefix affinity with bounded load, least loaded);
//! Models at zero woken as the activator does. See docs/routing.md.
//!
//! - [`table`]: the routing table and `model` resolution, pure;
//! - [`retry`]: when an attempt is tried on another replica, pure;
//! - [`signals`]: the load replicas report on their answers, pure;
//! - [`proxy`]: the request path;
//! - [`cluster`]: the table from watches of Models, Adapters and pods;
//! - [`metrics`]: the `strata_gateway_*` metrics.

pub mod cluster;
pub mod metrics;
pub mod proxy;
pub mod retry;
pub mod signals;
pub mod table;
