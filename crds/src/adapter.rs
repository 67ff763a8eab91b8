//! Adapter: a LoRA adapter loaded live onto the replicas of a Model.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::Source;

/// An Adapter is a LoRA adapter for a Model in the same namespace, loaded
/// into the running engines without a restart and carried by new replicas as
/// the Model scales.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "strata.ai",
    version = "v1alpha1",
    kind = "Adapter",
    plural = "adapters",
    singular = "adapter",
    namespaced,
    shortname = "lora",
    category = "strata",
    status = "AdapterStatus",
    derive = "PartialEq",
    cel,
    validation = Rule::new("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$') && size(self.metadata.name) <= 58").message("an Adapter's name becomes its Service's name (<name>-lora) and a label key: at most 58 lowercase letters, digits and '-', starting with a letter and ending with a letter or digit (e.g. sql-v2, not sql.v2)"),
    doc = "A LoRA adapter loaded live onto the replicas of a Model in the same namespace.",
    printcolumn(
        name = "MODEL",
        type_ = "string",
        json_path = ".spec.model",
        description = "The Model it adapts"
    ),
    printcolumn(
        name = "LOADED",
        type_ = "integer",
        json_path = ".status.loadedReplicas",
        description = "Replicas carrying it"
    ),
    printcolumn(name = "PHASE", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "AGE",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct AdapterSpec {
    /// Name of the Model, in the same namespace, that this adapter is loaded
    /// onto. The Model must set spec.adapters. Immutable.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("model is immutable: create a new Adapter for another Model"))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$') && size(self) <= 63").message("model must be the name of a Model: at most 63 lowercase letters, digits and '-', starting with a letter"))]
    pub model: String,

    /// Where the adapter's weights come from (hf://, s3://, gs://, pvc://,
    /// oci://). Immutable: engines cannot swap weights under a served name;
    /// create a new Adapter to roll out new weights.
    #[x_kube(validation = Rule::new("self == oldSelf").message("source is immutable: engines cannot swap an adapter's weights under the same name; create a new Adapter"))]
    pub source: Source,

    /// The name clients put in the OpenAI `model` field to use the adapter.
    /// Defaults to metadata.name. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9][A-Za-z0-9._:-]*$')").message("servedName may hold letters, digits, '.', '_', ':' and '-' (no '/': the name is part of the adapter API's paths), and must start with a letter or digit"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("servedName is immutable: clients address the adapter by it"))]
    pub served_name: Option<String>,

    /// How many of the Model's replicas carry the adapter; unset means all.
    /// The replicas with the fewest adapters are chosen first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("replicas must be at least 1; delete the Adapter to unload it everywhere"))]
    pub replicas: Option<i32>,
}

/// Lifecycle phase of an Adapter.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum AdapterPhase {
    /// Waiting for the Model or for replicas to load it on.
    #[default]
    Pending,
    /// Loading onto replicas.
    Loading,
    /// Loaded on every replica that should carry it.
    Ready,
    /// Loaded on some replicas, failing on others.
    Degraded,
    /// Could not be loaded anywhere.
    Failed,
}

/// Observed state of an Adapter, written by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdapterStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Lifecycle phase.
    #[serde(default)]
    pub phase: AdapterPhase,

    /// Ready and Degraded, each with a reason and message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// Replicas that should carry the adapter.
    #[serde(default)]
    pub desired_replicas: i32,

    /// Replicas that carry it now.
    #[serde(default)]
    pub loaded_replicas: i32,

    /// The replicas that carry it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["pod".into()]))]
    pub replicas: Vec<AdapterReplicaStatus>,

    /// Requests served with the adapter since it was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<i64>,

    /// Tokens generated with the adapter since it was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generated_tokens: Option<i64>,

    /// The adapter's share of its Model's GPU energy, by generated tokens, in joules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy_joules: Option<f64>,
}

/// One replica carrying the adapter.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdapterReplicaStatus {
    /// The replica's pod.
    pub pod: String,
    /// Its node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// When the adapter was loaded there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loaded_at: Option<Time>,
    /// Times the replica's sidecar loaded the adapter again after its
    /// engine restarted (and lost it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reloads: Option<i32>,
    /// When it last did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reload_time: Option<Time>,
}
