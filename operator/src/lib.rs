//! strata-operator: places model replicas on GPU pools, rolls and scales
//! them, and reports what it did.
//!
//! Pure core: [`placement`], [`rollout`], [`template`], [`engine`], [`view`],
//! [`conditions`] take plain values and return plain values. Thin shell:
//! [`controller`] reads the cluster and applies the plans; [`leader`],
//! [`server`] and [`metrics`] run the process.

pub mod activator;
pub mod adapters;
pub mod autoscale;
pub mod collect;
pub mod conditions;
pub mod controller;
pub mod energy;
pub mod engine;
pub mod error;
pub mod labels;
pub mod leader;
pub mod metrics;
pub mod pki;
pub mod placement;
pub mod promql;
pub mod rollout;
pub mod server;
pub mod sidecar_client;
pub mod template;
pub mod view;
pub mod watch;
