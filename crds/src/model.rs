//! Model: a foundation model served by an inference engine on GPU pools,
//! kept inside its latency targets.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::EnvVar;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Source, duration_format, duration_range};

/// A Model is a foundation model served by an inference engine on NVIDIA
/// GPUs: where its weights come from, which engine serves them, which
/// GPUPools may host its replicas, the latency it must hold, and how Strata
/// scales and rolls it.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "strata.ai",
    version = "v1alpha1",
    kind = "Model",
    plural = "models",
    singular = "model",
    namespaced,
    shortname = "mdl",
    category = "strata",
    status = "ModelStatus",
    derive = "PartialEq",
    cel,
    validation = Rule::new("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$') && size(self.metadata.name) <= 63").message("a Model's name becomes its Service's name and a label value: at most 63 lowercase letters, digits and '-', starting with a letter and ending with a letter or digit (e.g. llama-3-1-8b, not llama-3.1-8b)"),
    doc = "A foundation model served by an inference engine on NVIDIA GPU pools, kept inside its latency targets.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "READY",
        type_ = "integer",
        json_path = ".status.readyReplicas",
        description = "Replicas ready to serve"
    ),
    printcolumn(
        name = "DESIRED",
        type_ = "integer",
        json_path = ".status.desiredReplicas",
        description = "Replicas the operator is converging to"
    ),
    printcolumn(
        name = "POOL",
        type_ = "string",
        json_path = ".status.pools",
        description = "Pools the replicas run on"
    ),
    printcolumn(
        name = "TTFT-P95",
        type_ = "string",
        json_path = ".status.sla.timeToFirstToken.observed",
        description = "Observed time to first token at the SLA percentile"
    ),
    printcolumn(
        name = "WATTS",
        type_ = "number",
        json_path = ".status.energy.powerWatts",
        description = "GPU power drawn by the replicas now"
    ),
    printcolumn(
        name = "AGE",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("minReplicas must not be greater than maxReplicas").field_path(".minReplicas"))]
#[x_kube(validation = Rule::new("!has(self.replicas) || (self.replicas >= self.minReplicas && self.replicas <= self.maxReplicas)").message("replicas must lie between minReplicas and maxReplicas").field_path(".replicas"))]
#[x_kube(validation = Rule::new("self.autoscaling.mode != 'SLA' || has(self.sla)").message("autoscaling mode SLA needs spec.sla with at least one target; set targets or use mode Manual or External").reason(Reason::FieldValueRequired))]
#[x_kube(validation = Rule::new("self.minReplicas > 0 || self.autoscaling.mode != 'SLA' || has(self.autoscaling.scaleToZero)").message("minReplicas 0 in SLA mode needs autoscaling.scaleToZero to say after how long idle a Model may go to zero").field_path(".minReplicas"))]
#[x_kube(validation = Rule::new("!has(self.autoscaling.scaleToZero) || self.minReplicas == 0").message("autoscaling.scaleToZero needs minReplicas 0").field_path(".autoscaling.scaleToZero"))]
#[x_kube(validation = Rule::new("!has(self.adapters) || self.engine.type in ['vLLM', 'SGLang', 'Custom']").message("live LoRA adapters need the vLLM or SGLang engine (or a Custom image that serves the vLLM adapter API)").field_path(".adapters"))]
#[x_kube(validation = Rule::new("self.pools.all(p, !has(p.gpusPerReplica) || p.gpusPerReplica >= 1) && self.gpusPerReplica >= 1").message("GPUs per replica must be at least 1, for the Model and for every pool override").field_path(".gpusPerReplica"))]
pub struct ModelSpec {
    /// Where the weights come from.
    pub source: Source,

    /// The inference engine that serves the weights.
    pub engine: Engine,

    /// GPUs each replica requests (tensor parallelism). Pools may override it.
    #[serde(default = "default_one")]
    #[x_kube(validation = Rule::new("self <= 16").message("gpusPerReplica must be at most 16; a replica runs on one node"))]
    pub gpus_per_replica: i32,

    /// GPUPools that may host replicas, in order of preference. A replica goes
    /// to the first pool with room; later pools are fallbacks, each with its
    /// own engine arguments, environment and GPU count where its GPU type
    /// needs them.
    #[schemars(length(min = 1, max = 8))]
    #[x_kube(validation = Rule::new("size(self) >= 1").message("list at least one GPUPool in pools").reason(Reason::FieldValueRequired))]
    #[x_kube(validation = Rule::new("self.all(p, self.exists_one(q, q.name == p.name))").message("each GPUPool may be listed only once in pools"))]
    pub pools: Vec<PoolPreference>,

    /// Desired replicas while autoscaling is Manual or External; this is the
    /// field that `kubectl scale`, HPA and KEDA write through the scale
    /// subresource. In SLA mode the autoscaler decides, starts from this
    /// value (or minReplicas), and reports its decision in
    /// status.desiredReplicas; the operator never writes spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,

    /// Fewest replicas. 0 lets an idle Model scale to zero (see autoscaling.scaleToZero).
    #[serde(default = "default_one")]
    #[x_kube(validation = Rule::new("self >= 0").message("minReplicas must not be negative"))]
    pub min_replicas: i32,

    /// Most replicas.
    #[x_kube(validation = Rule::new("self >= 1 && self <= 1000").message("maxReplicas must be between 1 and 1000"))]
    pub max_replicas: i32,

    /// Latency and queue targets that the autoscaler holds. At least one
    /// target must be set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sla: Option<Sla>,

    /// How replicas are scaled.
    #[serde(default)]
    pub autoscaling: Autoscaling,

    /// How template changes are rolled out.
    #[serde(default)]
    pub rollout: Rollout,

    /// Live LoRA adapters. When unset, the Model takes no adapters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapters: Option<AdapterLimits>,

    /// The model name clients put in the OpenAI `model` field. Defaults to
    /// the Model's metadata.name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9][A-Za-z0-9._/:-]*$')").message("servedName may hold letters, digits, '.', '_', '/', ':' and '-', and must start with a letter or digit"))]
    pub served_name: Option<String>,

    /// How clients reach the Model besides its Service: for a cluster with
    /// a Gateway API inference gateway, an InferencePool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<Routing>,
}

/// How clients reach a Model besides its Service.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Routing {
    /// Emit an InferencePool (inference.networking.k8s.io/v1, the Gateway
    /// API Inference Extension) named like the Model, selecting its pods on
    /// the sidecar's port, for an inference gateway (Envoy Gateway,
    /// kgateway, Istio, GKE) to route to through its endpoint picker. Set
    /// (even to `{}`) to opt in; owned by the Model. Needs the extension's
    /// CRDs in the cluster: without them the Model reports
    /// Degraded/InferencePoolUnavailable and is served as usual.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference_pool: Option<InferencePoolRouting>,
}

/// The InferencePool a Model asks for.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct InferencePoolRouting {
    /// The endpoint picker (EPP) Service the gateway asks which replica
    /// serves each request. Defaults to `<model>-epp` on port 9002, the
    /// names the extension's `inferencepool` Helm chart gives an EPP
    /// installed for a pool named like the Model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_picker: Option<EndpointPicker>,
}

/// An endpoint picker Service in the Model's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct EndpointPicker {
    /// The Service's name. Default `<model>-epp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')").message("routing.inferencePool.endpointPicker.name must name a Service: lowercase letters, digits and '-', starting with a letter"))]
    pub name: Option<String>,

    /// The Service's port (its gRPC ext-proc port). Default 9002.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65535").message("routing.inferencePool.endpointPicker.port must be between 1 and 65535"))]
    pub port: Option<i32>,

    /// What the gateway does when the picker does not answer: `FailClose`
    /// (refuse the request; the extension's default) or `FailOpen` (route
    /// it without the picker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_mode: Option<FailureMode>,
}

/// What a gateway does when the endpoint picker does not answer.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum FailureMode {
    /// Route the request without the picker.
    FailOpen,
    /// Refuse the request.
    FailClose,
}

fn default_one() -> i32 {
    1
}

/// Inference engines Strata knows how to run.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum EngineType {
    /// vLLM's OpenAI-compatible server (`vllm serve`).
    #[default]
    #[serde(rename = "vLLM")]
    VLlm,
    /// SGLang's server (`python -m sglang.launch_server`).
    #[serde(rename = "SGLang")]
    SgLang,
    /// Hugging Face Text Generation Inference.
    #[serde(rename = "TGI")]
    Tgi,
    /// llama.cpp's `llama-server`.
    #[serde(rename = "LlamaCpp")]
    LlamaCpp,
    /// Any image that serves the OpenAI API on engine.port; set engine.image.
    Custom,
}

/// The engine container of each replica.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.type != 'Custom' || has(self.image)").message("engine.image is required when engine.type is Custom").field_path(".image").reason(Reason::FieldValueRequired))]
pub struct Engine {
    /// Which engine: vLLM, SGLang, TGI, LlamaCpp or Custom.
    #[serde(rename = "type")]
    pub engine_type: EngineType,

    /// Container image. Defaults to the engine's release image pinned by the
    /// operator; required for Custom.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,

    /// Extra command-line arguments for the engine, after those Strata sets
    /// (model path, host, port, served name, tensor parallel size).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("!self.exists(a, a.startsWith('--port') || a.startsWith('--host'))").message("engine.args must not set --port or --host: Strata sets them so the sidecar can reach the engine (use engine.port)"))]
    pub args: Vec<String>,

    /// Extra environment variables for the engine container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub env: Vec<EnvVar>,

    /// Port the engine listens on inside the pod (loopback only; the sidecar
    /// is the pod's front door). Defaults to the engine's usual port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1024 && self <= 65535 && self != 8080 && self != 9090").message("engine.port must be between 1024 and 65535 and not 8080 or 9090 (the sidecar's ports)"))]
    pub port: Option<i32>,

    /// CPU, memory and shared memory for the engine container. GPUs are
    /// requested with gpusPerReplica, not here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<EngineResources>,

    /// Who the engine runs as. By default a non-root user (UID 1000, its
    /// home and caches on an emptyDir at /cache) with no privileges, no
    /// capabilities and the runtime's seccomp profile: admitted where Pod
    /// Security enforces "restricted".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security: Option<EngineSecurity>,
}

/// Who the engine container runs as.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct EngineSecurity {
    /// UID (and GID) of the engine process; default 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 2147483647").message("engine.security.runAsUser must be a non-root UID (1 or more); use runAsRoot for images that need root"))]
    pub run_as_user: Option<i64>,

    /// Run the engine as the image's user, root included, for images that
    /// need it. Such pods are refused where Pod Security enforces
    /// "restricted".
    #[serde(default)]
    pub run_as_root: bool,
}

/// CPU and memory of the engine container.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EngineResources {
    /// CPU request (and limit), e.g. "8".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,
    /// Memory request (and limit), e.g. "64Gi".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
    /// Size of /dev/shm, which tensor-parallel engines use for NCCL, e.g. "16Gi".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_memory: Option<Quantity>,
}

/// One acceptable GPUPool, with what changes when a replica runs there.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolPreference {
    /// Name of the GPUPool.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,

    /// Engine arguments appended for replicas on this pool (for example a
    /// smaller --max-model-len on 24 GB GPUs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("!self.exists(a, a.startsWith('--port') || a.startsWith('--host'))").message("pool args must not set --port or --host: Strata sets them"))]
    pub args: Vec<String>,

    /// Environment variables added (or overridden) for replicas on this pool.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub env: Vec<EnvVar>,

    /// GPUs per replica on this pool, instead of spec.gpusPerReplica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self <= 16").message("pool gpusPerReplica must be at most 16"))]
    pub gpus_per_replica: Option<i32>,

    /// Most replicas this pool may hold for this Model. Unset: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0").message("pool maxReplicas must not be negative"))]
    pub max_replicas: Option<i32>,
}

/// Service-level targets. The autoscaler adds replicas when an observed
/// value is above its target and removes them when all are comfortably below.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.timeToFirstToken) || has(self.interTokenLatency) || has(self.endToEndLatency) || has(self.queueDepthPerReplica)").message("sla must set at least one target: timeToFirstToken, interTokenLatency, endToEndLatency or queueDepthPerReplica").reason(Reason::FieldValueRequired))]
pub struct Sla {
    /// Target time to first token at the percentile (default p95), e.g. "500ms".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = duration_format("500ms"))]
    #[x_kube(validation = duration_range("10ms", "60s"))]
    pub time_to_first_token: Option<String>,

    /// Target inter-token latency at the percentile, e.g. "50ms".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = duration_format("50ms"))]
    #[x_kube(validation = duration_range("1ms", "10s"))]
    pub inter_token_latency: Option<String>,

    /// Target end-to-end request latency at the percentile, e.g. "20s".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = duration_format("20s"))]
    #[x_kube(validation = duration_range("10ms", "60m"))]
    pub end_to_end_latency: Option<String>,

    /// Target requests waiting in the engine's queue per replica, a leading
    /// signal that reacts before latency does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 10000").message("queueDepthPerReplica must be between 1 and 10000"))]
    pub queue_depth_per_replica: Option<i32>,

    /// The percentile the latency targets refer to, 50 to 99.9 (default 95).
    #[serde(default = "default_percentile")]
    #[x_kube(validation = Rule::new("self >= 50.0 && self <= 99.9").message("percentile must be between 50 and 99.9"))]
    pub percentile: f64,
}

fn default_percentile() -> f64 {
    95.0
}

/// Who decides the number of replicas.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum AutoscalingMode {
    /// Strata's SLA autoscaler (default).
    #[default]
    #[serde(rename = "SLA")]
    Sla,
    /// No autoscaling: spec.replicas (or minReplicas) is what runs, changed
    /// by hand or with `kubectl scale`. (Not called "Off": YAML 1.1 parsers,
    /// kubectl's among them, read an unquoted Off as the boolean false.)
    Manual,
    /// An external autoscaler (HPA, KEDA) drives spec.replicas through the
    /// scale subresource; Strata places what it asks for and does not fight it.
    External,
}

/// Where the autoscaler reads metrics from.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum MetricsSourceType {
    /// Scrape every ready replica's sidecar directly (default).
    #[default]
    Sidecars,
    /// Query a Prometheus server that scrapes the sidecars.
    Prometheus,
}

/// Where the autoscaler reads metrics from.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(self.type == 'Prometheus') == has(self.prometheus)").message("metrics.prometheus must be set exactly when metrics.type is Prometheus"))]
pub struct MetricsSource {
    /// Sidecars (default) or Prometheus.
    #[serde(rename = "type", default)]
    pub source_type: MetricsSourceType,
    /// The Prometheus server, when type is Prometheus.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<PrometheusSource>,
}

/// A Prometheus server that scrapes the replicas' sidecars.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrometheusSource {
    /// Base URL of the Prometheus HTTP API, e.g. "http://prometheus.monitoring:9090".
    #[schemars(length(min = 8, max = 2048))]
    #[x_kube(validation = Rule::new("self.matches('^https?://[^ ]+$')").message("prometheus.url must be an http:// or https:// URL"))]
    pub url: String,
}

/// Limits on how fast replicas change in one direction.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScalingRules {
    /// How long a recommendation must hold before it is acted on; for
    /// scale-down the highest recommendation in the window wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = duration_format("5m"))]
    #[x_kube(validation = duration_range("0s", "1h"))]
    pub stabilization_window: Option<String>,

    /// Most replicas added or removed in one interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("maxReplicasPerInterval must be at least 1"))]
    pub max_replicas_per_interval: Option<i32>,

    /// Most replicas added or removed in one interval, as a percentage of the
    /// current count. With both limits set, the larger change is allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 1000").message("maxPercentPerInterval must be between 1 and 1000"))]
    pub max_percent_per_interval: Option<i32>,
}

/// When an idle Model may drop to zero replicas.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScaleToZero {
    /// How long without requests before the last replica goes, e.g. "15m".
    #[schemars(length(max = 32))]
    #[x_kube(validation = duration_format("15m"))]
    #[x_kube(validation = duration_range("1m", "24h"))]
    pub idle_window: String,
}

/// How the number of replicas is decided.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.mode != 'External' || !has(self.scaleToZero)").message("scaleToZero is done by Strata's SLA autoscaler; in External mode let HPA or KEDA scale to zero instead").field_path(".scaleToZero").reason(Reason::FieldValueForbidden))]
pub struct Autoscaling {
    /// SLA (default): Strata's autoscaler holds spec.sla. Manual: spec.replicas
    /// runs. External: HPA or KEDA drives spec.replicas.
    #[serde(default)]
    pub mode: AutoscalingMode,

    /// How often the autoscaler evaluates, e.g. "15s"; in every mode, how
    /// often status.sla is refreshed.
    #[serde(default = "default_interval")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = duration_format("15s"))]
    #[x_kube(validation = duration_range("5s", "10m"))]
    pub interval: String,

    /// The window over which latency percentiles are computed, e.g. "1m".
    #[serde(default = "default_window")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = duration_format("1m"))]
    #[x_kube(validation = duration_range("10s", "30m"))]
    pub window: String,

    /// Relative deviation from a target that causes no change, in percent (default 10).
    #[serde(default = "default_tolerance")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 50").message("tolerancePercent must be between 0 and 50"))]
    pub tolerance_percent: i32,

    /// Limits on scaling up (default: no stabilization, at most double per interval).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_up: Option<ScalingRules>,

    /// Limits on scaling down (default: 5m stabilization, one replica per interval).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down: Option<ScalingRules>,

    /// Lets an idle Model go to zero replicas; needs minReplicas 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_to_zero: Option<ScaleToZero>,

    /// Where metrics come from (default: the sidecars).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsSource>,
}

impl Default for Autoscaling {
    fn default() -> Self {
        Self {
            mode: AutoscalingMode::default(),
            interval: default_interval(),
            window: default_window(),
            tolerance_percent: default_tolerance(),
            scale_up: None,
            scale_down: None,
            scale_to_zero: None,
            metrics: None,
        }
    }
}

fn default_interval() -> String {
    "15s".to_string()
}
fn default_window() -> String {
    "1m".to_string()
}
fn default_tolerance() -> i32 {
    10
}

/// How a change to the pod template replaces replicas.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.maxSurge + self.maxUnavailable >= 1").message("maxSurge and maxUnavailable cannot both be 0: the rollout could never make progress"))]
pub struct Rollout {
    /// Replicas created above the desired count during a rollout (default 1):
    /// a new replica is Ready before an old one goes.
    #[serde(default = "default_one")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 100").message("maxSurge must be between 0 and 100"))]
    pub max_surge: i32,

    /// Replicas that may be missing during a rollout (default 0). Raise it when
    /// the pools have no spare GPUs for a surge replica.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 100").message("maxUnavailable must be between 0 and 100"))]
    pub max_unavailable: i32,

    /// How long a rollout may go without progress before Progressing turns
    /// False with reason ProgressDeadlineExceeded (default 15m; model
    /// downloads are slow).
    #[serde(default = "default_progress_deadline")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = duration_format("15m"))]
    #[x_kube(validation = duration_range("1m", "24h"))]
    pub progress_deadline: String,
}

impl Default for Rollout {
    fn default() -> Self {
        Self {
            max_surge: 1,
            max_unavailable: 0,
            progress_deadline: default_progress_deadline(),
        }
    }
}

fn default_progress_deadline() -> String {
    "15m".to_string()
}

/// LoRA adapter limits of a Model.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdapterLimits {
    /// Most adapters loaded on one replica at a time (the engine's --max-loras).
    #[x_kube(validation = Rule::new("self >= 1 && self <= 256").message("adapters.maxPerReplica must be between 1 and 256"))]
    pub max_per_replica: i32,

    /// Highest LoRA rank accepted (the engine's --max-lora-rank), default 16.
    #[serde(default = "default_lora_rank")]
    #[x_kube(validation = Rule::new("self in [8, 16, 32, 64, 128, 256, 320, 512]").message("adapters.maxRank must be one of 8, 16, 32, 64, 128, 256, 320, 512"))]
    pub max_rank: i32,
}

fn default_lora_rank() -> i32 {
    16
}

/// Observed state of a Model, written by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Ready, Progressing and Degraded, each with a reason and message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// Replicas that exist (the scale subresource's status.replicas).
    #[serde(default)]
    pub replicas: i32,

    /// Replicas ready to serve.
    #[serde(default)]
    pub ready_replicas: i32,

    /// Replicas running the current pod template.
    #[serde(default)]
    pub updated_replicas: i32,

    /// Replicas the operator is converging to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,

    /// Label selector of the Model's pods, in string form (for the scale subresource, HPA and KEDA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,

    /// Comma-separated names of the pools that hold replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pools: Option<String>,

    /// Where each replica runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["pod".into()]))]
    pub placement: Vec<ReplicaPlacement>,

    /// Observed SLA signals against their targets, refreshed every
    /// autoscaling.interval in every autoscaling mode (Manual and External
    /// Models are observed too; only SLA mode acts on them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sla: Option<SlaStatus>,

    /// The autoscaler's last decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_decision: Option<ScaleDecision>,

    /// GPU utilization and energy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy: Option<EnergyStatus>,

    /// What the Model's GPUs cost, from its pools' `costPerGpuHour`
    /// (absent when no pool it runs on has a price).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<crate::common::CostStatus>,

    /// Adapters loaded on the Model's replicas.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub adapters: Vec<ModelAdapterStatus>,
}

/// Where one replica runs.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaPlacement {
    /// The replica's pod.
    pub pod: String,
    /// The node it was placed on.
    pub node: String,
    /// The pool that node was chosen from.
    pub pool: String,
    /// GPUs it requests.
    pub gpus: i32,
    /// Whether it is ready to serve.
    pub ready: bool,
    /// Hash of the pod template it runs; equal to the Model's current one when up to date.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_hash: Option<String>,
}

/// One SLA signal: observed value against target.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SignalStatus {
    /// Observed value, human readable (e.g. "412ms", "3.5").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed: Option<String>,
    /// Target from spec.sla.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// observed / target; above 1 means the target is missed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
}

/// Observed SLA signals over the autoscaling window.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SlaStatus {
    /// Time to first token at the SLA percentile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_to_first_token: Option<SignalStatus>,
    /// Inter-token latency at the SLA percentile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inter_token_latency: Option<SignalStatus>,
    /// End-to-end latency at the SLA percentile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_to_end_latency: Option<SignalStatus>,
    /// Requests waiting per replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_depth_per_replica: Option<SignalStatus>,
    /// Requests per second over the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_second: Option<f64>,
    /// Generated tokens per second over the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_second: Option<f64>,
    /// The engines' KV-cache use, mean over the replicas (0 to 1); near 1
    /// the engines start preempting sequences.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache_usage: Option<f64>,
    /// Requests arriving per second over the last interval (completed plus
    /// the change in requests in flight).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arrivals_per_second: Option<f64>,
    /// Requests per second one replica completes while saturated, learned
    /// by the autoscaler; it sizes scale-ups by demand and seeds the
    /// autoscaler again after an operator restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_capacity: Option<f64>,
    /// Why the signals could not be read, when they could not (e.g. the
    /// Prometheus source failed); the autoscaler then holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_error: Option<String>,
    /// When these values were computed; while an evaluation finds the same
    /// values it is left as it was (and the status is not written), for at
    /// most 5 minutes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_at: Option<Time>,
}

/// An autoscaling decision.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScaleDecision {
    /// When it was made.
    pub time: Time,
    /// Replicas before.
    pub from_replicas: i32,
    /// Replicas decided.
    pub to_replicas: i32,
    /// The signal that decided (e.g. timeToFirstToken, queueDepthPerReplica, idle, bounds).
    pub signal: String,
    /// Machine-readable reason, e.g. ScaleUp, ScaleDown, Hold, RateLimited, Stabilizing, ScaleToZero.
    pub reason: String,
    /// What a person needs to know, e.g. "TTFT p95 820ms > target 500ms: 3 -> 5 replicas".
    pub message: String,
}

/// GPU utilization and energy of a Model's replicas.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnergyStatus {
    /// Power drawn now by the replicas' GPUs, in watts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_watts: Option<f64>,
    /// Energy used since the Model was created, in joules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy_joules: Option<f64>,
    /// Energy per 1000 generated tokens, in joules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub joules_per_1k_tokens: Option<f64>,
    /// Tokens generated since the Model was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generated_tokens: Option<i64>,
    /// Mean GPU utilization of the replicas, 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_utilization: Option<f64>,
    /// When the replicas were last read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_at: Option<Time>,
    /// The counters each replica showed at that time: the baselines of the
    /// next reading, kept here so an operator restart loses and doubles
    /// nothing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub counters: Vec<ReplicaEnergyCounters>,
}

/// The energy and token counters one replica showed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaEnergyCounters {
    /// The replica's pod.
    pub pod: String,
    /// NVML energy counter by GPU UUID, joules.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub gpu_joules: BTreeMap<String, f64>,
    /// The meter's own reset-safe total by GPU UUID (the node agent's
    /// energy while the pod held the GPU, or the sidecar's since it
    /// started), joules: what bridges a driver reload of the NVML counter.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub gpu_metered_joules: BTreeMap<String, f64>,
    /// Generated-token counter by adapter served name ("" for the base model).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tokens: BTreeMap<String, f64>,
    /// Request counter by adapter served name ("" for the base model).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: BTreeMap<String, f64>,
}

/// An adapter as seen from its Model.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelAdapterStatus {
    /// Name of the Adapter.
    pub name: String,
    /// Replicas that carry it.
    pub replicas: i32,
}
