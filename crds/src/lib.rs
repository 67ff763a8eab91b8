//! The strata.ai API: GPUPool, Model and Adapter.
//!
//! Rust types of Strata's custom resources, their validation rules (CEL and
//! OpenAPI bounds, embedded in the generated CRDs), and the generators of the
//! CRD YAML and the API reference.

// clippy reads the repeated `printcolumn(type_ = ...)` arguments of the
// CustomResource derive as duplicated attributes; they are separate columns.
#![allow(clippy::duplicated_attributes)]

pub mod adapter;
pub mod common;
pub mod generate;
pub mod gpupool;
pub mod model;
pub mod validation;

pub use adapter::{Adapter, AdapterSpec, AdapterStatus};
pub use common::{API_VERSION, GROUP, VERSION};
pub use gpupool::{GPUPool, GPUPoolSpec, GPUPoolStatus};
pub use model::{Model, ModelSpec, ModelStatus};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The CustomResourceDefinitions of every Strata kind, in a stable order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![GPUPool::crd(), Model::crd(), Adapter::crd()]
}
