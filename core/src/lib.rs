//! strata-core: everything Strata decides, as pure functions of plain
//! values. No API client, no I/O, no clock of its own (callers pass `now`):
//! this crate does not depend on kube or tokio, so the compiler keeps the
//! controllers (in strata-operator) out of it.
//!
//! - [`placement`]: which node of which GPUPool gets the next replica.
//! - [`rollout`]: which replicas to delete and how many to create.
//! - [`template`] and [`engine`]: the replica pod (engine, sidecar, volumes).
//! - [`autoscale`]: the SLA autoscaler's decision from observed signals;
//!   [`sla`]: its inputs from a Model's spec and its outputs as status.
//! - [`collect`] and [`promql`]: metric math on scraped text or PromQL answers.
//! - [`energy`]: the per-Model, per-Adapter energy ledger;
//!   [`energy_counter`]: NVML energy counter readings as reset-safe joules.
//! - [`telemetry`]: the GPU readings of pods from a node agent's page or
//!   dcgm-exporter's metrics through Prometheus.
//! - [`adapters`]: which replicas carry which LoRA adapter.
//! - [`inference_pool`]: the Gateway API Inference Extension's
//!   InferencePool a Model asks for.
//! - [`routing`]: which replica serves a request (the gateway's pick:
//!   adapter, KV room, prefix affinity with bounded load, least load).
//! - [`view`]: the plain views placement reads, built from Nodes and Pods.
//! - [`status`]: a Model's status and conditions from what a reconcile saw
//!   and did.
//! - [`conditions`], [`labels`], [`duration`]: shared vocabulary.

pub mod adapters;
pub mod autoscale;
pub mod collect;
pub mod conditions;
pub mod cost;
pub mod duration;
pub mod energy;
pub mod energy_counter;
pub mod engine;
pub mod expect;
pub mod inference_pool;
pub mod labels;
pub mod placement;
pub mod podgpus;
pub mod powercap;
pub mod promql;
pub mod rollout;
pub mod routing;
pub mod sla;
pub mod status;
pub mod telemetry;
pub mod template;
pub mod view;
