//! The local world: a real Kubernetes control plane with simulated NVIDIA GPU
//! nodes, for Strata's e2e tests, benchmarks and demo.
//!
//! - [`tools`]: the pinned upstream binaries, built from their Go modules.
//! - [`cluster`]: etcd, kube-apiserver, kube-controller-manager,
//!   kube-scheduler and KWOK as local processes on loopback.
//! - [`topology`]: the simulated GPU nodes.
//! - [`runner`]: starts local processes for pods, listening on the pod IP.
//! - [`supervisor`], [`control`]: the components are restarted when they
//!   exit, and stopped, paused, killed or restarted on request through a
//!   control socket (`strata-cluster ctl`, `harness::World::fault`).
//! - [`audit`]: the kube-apiserver's audit log of writes.
//! - [`load`]: the demo's load generator (`strata-load`).
//! - [`harness`]: what tests use: one shared cluster per test binary, a
//!   namespace per test, helpers for waiting and for kubectl and helm.

pub mod audit;
pub mod bench;
pub mod bench_cli;
pub mod bench_memory;
pub mod bench_placement;
pub mod bench_routing;
pub mod bench_scale;
pub mod bench_sidecar;
pub mod cluster;
pub mod container;
pub mod control;
pub mod devices;
pub mod error;
pub mod fake_nvml;
pub mod harness;
pub mod http;
pub mod load;
pub mod oci;
pub mod pki;
pub mod pod_images;
pub mod ports;
pub mod process;
pub mod runner;
pub mod sim;
pub mod supervisor;
pub mod tools;
pub mod topology;
pub mod wait;

pub use error::{Error, Result};
