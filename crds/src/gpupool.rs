//! GPUPool: a named set of NVIDIA GPU nodes that models are placed on.

use k8s_openapi::api::core::v1::Toleration;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{ObjectRef, PlacementPolicy};

/// The extended resource a GPU is requested by, unless a pool says otherwise.
pub const DEFAULT_GPU_RESOURCE: &str = "nvidia.com/gpu";

fn default_gpu_resource() -> String {
    DEFAULT_GPU_RESOURCE.to_string()
}

/// A GPUPool is a set of NVIDIA GPU nodes, chosen by label, that Strata may
/// place model replicas on, with the tolerations pods need there and how
/// replicas are packed onto its nodes.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "strata.ai",
    version = "v1alpha1",
    kind = "GPUPool",
    plural = "gpupools",
    singular = "gpupool",
    shortname = "gpool",
    shortname = "gp",
    category = "strata",
    status = "GPUPoolStatus",
    derive = "PartialEq",
    cel,
    validation = Rule::new("self.metadata.name.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$') && size(self.metadata.name) <= 63").message("a GPUPool's name becomes a label value on its replicas: at most 63 lowercase letters, digits, '-' and '.', starting and ending with a letter or digit"),
    doc = "A set of NVIDIA GPU nodes, chosen by label, that Strata places model replicas on.",
    printcolumn(
        name = "NODES",
        type_ = "integer",
        json_path = ".status.nodeCount",
        description = "GPU nodes in the pool"
    ),
    printcolumn(
        name = "GPUS",
        type_ = "integer",
        json_path = ".status.gpuCapacity",
        description = "Allocatable GPUs on the pool's nodes"
    ),
    printcolumn(
        name = "FREE",
        type_ = "integer",
        json_path = ".status.gpuFree",
        description = "GPUs not requested by any pod"
    ),
    printcolumn(
        name = "WATTS",
        type_ = "number",
        json_path = ".status.powerWatts",
        description = "Power drawn now by the GPUs of Strata's replicas in the pool"
    ),
    printcolumn(
        name = "AGE",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct GPUPoolSpec {
    /// Selects the pool's nodes by their labels, typically the labels of
    /// NVIDIA GPU feature discovery such as `nvidia.com/gpu.product:
    /// NVIDIA-H100-80GB-HBM3`. A node may belong to several pools; Strata
    /// counts each GPU once.
    #[x_kube(validation = Rule::new("(has(self.matchLabels) && size(self.matchLabels) > 0) || (has(self.matchExpressions) && size(self.matchExpressions) > 0)").message("nodeSelector must set matchLabels or matchExpressions: an empty selector would take every node in the cluster").reason(Reason::FieldValueRequired))]
    pub node_selector: LabelSelector,

    /// Tolerations added to every pod placed in this pool, for example for the
    /// `nvidia.com/gpu=present:NoSchedule` taint that GPU nodes usually carry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub tolerations: Vec<Toleration>,

    /// How replicas are spread over the pool's nodes: `BinPack` (default)
    /// fills the fullest node that still fits, keeping whole nodes free for
    /// large models; `Spread` uses the emptiest node.
    #[serde(default)]
    pub placement: PlacementPolicy,

    /// The extended resource that GPUs are requested by on these nodes:
    /// `nvidia.com/gpu` (default), or a MIG profile resource such as
    /// `nvidia.com/mig-3g.40gb`. Immutable: pods already placed request it.
    #[serde(default = "default_gpu_resource")]
    #[schemars(length(max = 63))]
    #[x_kube(validation = Rule::new("self.matches('^nvidia[.]com/[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')").message("gpuResourceName must be an nvidia.com/ extended resource such as nvidia.com/gpu or nvidia.com/mig-3g.40gb"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("gpuResourceName is immutable: replicas already placed request it; create a new GPUPool instead"))]
    pub gpu_resource_name: String,

    /// Price of one GPU for one hour, as a decimal string in the team's
    /// currency (e.g. "2.49"). Used to report the cost of each Model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]{1,6}([.][0-9]{1,4})?$')").message("costPerGpuHour must be a decimal number such as 2.49"))]
    pub cost_per_gpu_hour: Option<String>,

    /// The power limit, in watts, that this pool's GPUs run under. Applied
    /// through NVML by Strata's node agent on each of the pool's nodes (when
    /// the chart enables `nodeAgent.powerCaps`), within each GPU's allowed
    /// range; where a node is in several pools the lowest cap wins. Without
    /// it the GPUs of the pool's nodes run at their default limit. Reported
    /// in `status.powerCap`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 50 && self <= 2000").message("powerCapWatts must be between 50 and 2000"))]
    pub power_cap_watts: Option<i32>,
}

/// Observed state of a GPUPool, written by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct GPUPoolStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Ready: the pool has at least one schedulable node with GPUs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// Number of nodes the selector matches.
    #[serde(default)]
    pub node_count: i32,

    /// Allocatable GPUs summed over schedulable nodes.
    #[serde(default)]
    pub gpu_capacity: i32,

    /// GPUs requested by pods bound or planned on the pool's nodes.
    #[serde(default)]
    pub gpu_allocated: i32,

    /// GPUs neither allocated nor on an unschedulable node.
    #[serde(default)]
    pub gpu_free: i32,

    /// The pool's nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub nodes: Vec<PoolNodeStatus>,

    /// Models with replicas on this pool.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<PoolModelStatus>,

    /// Power drawn now by the GPUs of Strata's replicas in the pool, in watts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_watts: Option<f64>,

    /// Energy used by Strata's replicas in the pool since it was created, in joules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy_joules: Option<f64>,

    /// How `spec.powerCapWatts` is applied, as the node agents report the
    /// GPUs' enforced power limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_cap: Option<PowerCapStatus>,

    /// What the GPUs held by Strata's replicas in the pool cost, from
    /// `spec.costPerGpuHour`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<crate::common::CostStatus>,
}

/// A pool's power cap as its GPUs report it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PowerCapStatus {
    /// The cap asked for, in watts (`spec.powerCapWatts`).
    pub target_watts: i32,
    /// GPUs of the pool's nodes whose power limit a node agent reports.
    pub gpus: i32,
    /// Of those, the GPUs whose enforced limit is at or under the cap.
    pub gpus_at_cap: i32,
    /// What stands, in words (which GPUs are over the cap and why to look).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// One node of a pool.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolNodeStatus {
    /// Node name.
    pub name: String,
    /// GPU product from the `nvidia.com/gpu.product` label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_product: Option<String>,
    /// Allocatable GPUs on the node.
    pub gpu_capacity: i32,
    /// GPUs requested by pods on the node.
    pub gpu_allocated: i32,
    /// Whether replicas can be placed here (Ready, not cordoned, taints tolerated).
    pub schedulable: bool,
    /// Why the node cannot take replicas, when it cannot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A Model's footprint on a pool.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolModelStatus {
    /// The Model.
    pub model: ObjectRef,
    /// Its replicas on this pool.
    pub replicas: i32,
    /// GPUs those replicas request.
    pub gpus: i32,
}
