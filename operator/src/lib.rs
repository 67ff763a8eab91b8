//! strata-operator: places model replicas on GPU pools, rolls and scales
//! them, and reports what it did.
//!
//! This crate is the thin shell: it reads the cluster, asks the pure core
//! (the `strata-core` crate: placement, rollout, templates, autoscaling,
//! metric math, energy ledger, status building) what to do, and applies
//! the answer. [`controller`] holds the reconcilers (each a pipeline of
//! phases, see its module docs); [`activator`] holds requests for Models
//! at zero; [`leader`], [`server`] and [`metrics`] run the process;
//! [`sidecar_client`] and [`pki`] talk to the sidecars' admin ports;
//! [`prometheus_auth`] holds the credentials of the Prometheus servers it
//! queries.

pub mod activator;
pub mod controller;
pub mod error;
pub mod fence;
pub mod leader;
pub mod metrics;
pub mod pki;
pub mod prometheus_auth;
pub mod ratelimit;
pub mod server;
pub mod sidecar_client;
pub mod watch;
