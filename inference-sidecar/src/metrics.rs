//! The sidecar's Prometheus metrics (`strata_` prefix, base units).

use prometheus::{
    Counter, CounterVec, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

/// Latency buckets that resolve SLA targets from 10 ms to 60 s.
pub const LATENCY_BUCKETS: [f64; 24] = [
    0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
    7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
];
/// Inter-token latency buckets, 1 ms to 10 s.
pub const ITL_BUCKETS: [f64; 22] = [
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
    0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
];

/// Every metric the sidecar serves.
#[derive(Clone)]
pub struct Metrics {
    /// The registry.
    pub registry: Registry,
    /// Time to first token.
    pub ttft: HistogramVec,
    /// Inter-token latency (per request mean).
    pub itl: HistogramVec,
    /// End-to-end latency.
    pub e2e: HistogramVec,
    /// Prompt tokens.
    pub prompt_tokens: IntCounterVec,
    /// Generated tokens.
    pub generation_tokens: IntCounterVec,
    /// Requests by outcome.
    pub requests: IntCounterVec,
    /// Requests in flight.
    pub in_flight: IntGaugeVec,
    /// Engine queue depth.
    pub engine_queue: prometheus::Gauge,
    /// Engine running requests.
    pub engine_running: prometheus::Gauge,
    /// Engine KV-cache use.
    pub engine_kv_cache: prometheus::Gauge,
    /// The engine's `vllm:lora_requests_info`, its most recent series.
    pub engine_lora_info: GaugeVec,
    /// The engine's `vllm:cache_config_info`: block size and GPU blocks.
    pub engine_cache_info: GaugeVec,
    /// 1 when the engine's metrics were read at the last scrape.
    pub engine_metrics_up: IntGauge,
    /// 1 while the engine answers its health check.
    pub engine_up: IntGauge,
    /// GPUs visible to the sampler.
    pub gpu_visible: IntGauge,
    /// GPU utilization, 0 to 1.
    pub gpu_utilization: GaugeVec,
    /// GPU memory used.
    pub gpu_memory_used: GaugeVec,
    /// GPU memory total.
    pub gpu_memory_total: GaugeVec,
    /// GPU power.
    pub gpu_power: GaugeVec,
    /// GPU temperature.
    pub gpu_temperature: GaugeVec,
    /// GPU energy since the sidecar started.
    pub gpu_energy: CounterVec,
    /// Energy counter resets seen (driver reloads).
    pub gpu_energy_resets: IntCounterVec,
    /// The NVML energy counter itself (since the driver loaded): continuous
    /// across sidecar restarts, so the operator can account exactly.
    pub gpu_energy_counter: GaugeVec,
    /// Adapters loaded.
    pub adapters_loaded: IntGauge,
    /// Adapter operations by kind and result.
    pub adapter_operations: IntCounterVec,
    /// Total energy across GPUs (convenience for dashboards).
    pub energy_total: Counter,
    /// Requests refused before they reached the engine, by reason.
    pub rejected: IntCounterVec,
    /// Engine answers cut short or passed unmeasured, by reason.
    pub engine_response_errors: IntCounterVec,
    /// Engine metric readings discarded as implausible, by reason.
    pub engine_metrics_rejected: IntCounterVec,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Result<Self, prometheus::Error> {
        let r = Registry::new();
        let req_labels = &["model", "adapter"];
        let gpu_labels = &["gpu", "uuid"];
        let h = |name: &str, help: &str, buckets: &[f64]| {
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                req_labels,
            )
        };
        let m = Self {
            ttft: h(
                "strata_request_time_to_first_token_seconds",
                "Time to first token of streamed requests.",
                &LATENCY_BUCKETS,
            )?,
            itl: h(
                "strata_request_inter_token_latency_seconds",
                "Mean inter-token latency of streamed requests.",
                &ITL_BUCKETS,
            )?,
            e2e: h(
                "strata_request_e2e_latency_seconds",
                "End-to-end request latency.",
                &LATENCY_BUCKETS,
            )?,
            prompt_tokens: IntCounterVec::new(
                Opts::new("strata_request_prompt_tokens_total", "Prompt tokens."),
                req_labels,
            )?,
            generation_tokens: IntCounterVec::new(
                Opts::new(
                    "strata_request_generation_tokens_total",
                    "Generated tokens.",
                ),
                req_labels,
            )?,
            requests: IntCounterVec::new(
                Opts::new("strata_requests_total", "Requests by endpoint and outcome."),
                &["model", "adapter", "endpoint", "outcome"],
            )?,
            in_flight: IntGaugeVec::new(
                Opts::new("strata_requests_in_flight", "Requests in flight."),
                &["model"],
            )?,
            engine_queue: prometheus::Gauge::new(
                "strata_engine_queue_depth",
                "Requests waiting in the engine.",
            )?,
            engine_running: prometheus::Gauge::new(
                "strata_engine_running_requests",
                "Requests the engine is processing.",
            )?,
            engine_kv_cache: prometheus::Gauge::new(
                "strata_engine_kv_cache_usage_ratio",
                "Engine KV-cache use, 0 to 1.",
            )?,
            engine_lora_info: GaugeVec::new(
                Opts::new(
                    "strata_engine_lora_requests_info",
                    "The engine's vllm:lora_requests_info, its most recent series: the adapters with requests running and waiting (comma-separated) and max_lora as labels, the Unix time the engine last saw them as the value (for the endpoint picker's LoRA affinity).",
                ),
                &["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
            )?,
            engine_cache_info: GaugeVec::new(
                Opts::new(
                    "strata_engine_cache_config_info",
                    "The engine's KV-cache configuration (vllm:cache_config_info): tokens per block and blocks on the GPU as labels, value 1 (for the endpoint picker's prefix-cache index).",
                ),
                &["block_size", "num_gpu_blocks"],
            )?,
            engine_metrics_up: IntGauge::new(
                "strata_engine_metrics_up",
                "1 when the engine's metrics were read at the last scrape.",
            )?,
            engine_up: IntGauge::new(
                "strata_engine_up",
                "1 while the engine answers its health check.",
            )?,
            gpu_visible: IntGauge::new(
                "strata_gpu_visible",
                "GPUs the NVML sampler sees (0: no driver or no GPU).",
            )?,
            gpu_utilization: GaugeVec::new(
                Opts::new("strata_gpu_utilization_ratio", "GPU utilization, 0 to 1."),
                gpu_labels,
            )?,
            gpu_memory_used: GaugeVec::new(
                Opts::new("strata_gpu_memory_used_bytes", "GPU memory used."),
                gpu_labels,
            )?,
            gpu_memory_total: GaugeVec::new(
                Opts::new("strata_gpu_memory_total_bytes", "GPU memory total."),
                gpu_labels,
            )?,
            gpu_power: GaugeVec::new(
                Opts::new("strata_gpu_power_watts", "GPU power draw."),
                gpu_labels,
            )?,
            gpu_temperature: GaugeVec::new(
                Opts::new("strata_gpu_temperature_celsius", "GPU temperature."),
                gpu_labels,
            )?,
            gpu_energy: CounterVec::new(
                Opts::new(
                    "strata_gpu_energy_joules_total",
                    "GPU energy used since the sidecar started (from the NVML energy counter).",
                ),
                gpu_labels,
            )?,
            gpu_energy_resets: IntCounterVec::new(
                Opts::new(
                    "strata_gpu_energy_counter_resets_total",
                    "Times the NVML energy counter went backwards (driver reload).",
                ),
                gpu_labels,
            )?,
            gpu_energy_counter: GaugeVec::new(
                Opts::new(
                    "strata_gpu_energy_counter_joules",
                    "The NVML total energy counter (since the driver loaded), in joules.",
                ),
                gpu_labels,
            )?,
            adapters_loaded: IntGauge::new(
                "strata_adapters_loaded",
                "LoRA adapters loaded in the engine.",
            )?,
            adapter_operations: IntCounterVec::new(
                Opts::new(
                    "strata_adapter_operations_total",
                    "Adapter loads and unloads by result.",
                ),
                &["operation", "result"],
            )?,
            energy_total: Counter::new(
                "strata_pod_gpu_energy_joules_total",
                "Energy of all the pod's GPUs since the sidecar started.",
            )?,
            rejected: IntCounterVec::new(
                Opts::new(
                    "strata_proxy_rejected_requests_total",
                    "Requests refused before they reached the engine, by reason (not_found, method, concurrency, too_large, body_timeout, busy, bad_request, read_error).",
                ),
                &["reason"],
            )?,
            engine_response_errors: IntCounterVec::new(
                Opts::new(
                    "strata_engine_response_errors_total",
                    "Engine answers cut short (timeout, event_too_large), unreadable (malformed) or passed through unmeasured (unmeasured_large).",
                ),
                &["reason"],
            )?,
            engine_metrics_rejected: IntCounterVec::new(
                Opts::new(
                    "strata_engine_metrics_rejected_total",
                    "Engine metric values read as unknown, by reason (non_finite, negative, out_of_range).",
                ),
                &["reason"],
            )?,
            registry: r,
        };
        let reg = &m.registry;
        reg.register(Box::new(m.ttft.clone()))?;
        reg.register(Box::new(m.itl.clone()))?;
        reg.register(Box::new(m.e2e.clone()))?;
        reg.register(Box::new(m.prompt_tokens.clone()))?;
        reg.register(Box::new(m.generation_tokens.clone()))?;
        reg.register(Box::new(m.requests.clone()))?;
        reg.register(Box::new(m.in_flight.clone()))?;
        reg.register(Box::new(m.engine_queue.clone()))?;
        reg.register(Box::new(m.engine_running.clone()))?;
        reg.register(Box::new(m.engine_kv_cache.clone()))?;
        reg.register(Box::new(m.engine_lora_info.clone()))?;
        reg.register(Box::new(m.engine_cache_info.clone()))?;
        reg.register(Box::new(m.engine_metrics_up.clone()))?;
        reg.register(Box::new(m.engine_up.clone()))?;
        reg.register(Box::new(m.gpu_visible.clone()))?;
        reg.register(Box::new(m.gpu_utilization.clone()))?;
        reg.register(Box::new(m.gpu_memory_used.clone()))?;
        reg.register(Box::new(m.gpu_memory_total.clone()))?;
        reg.register(Box::new(m.gpu_power.clone()))?;
        reg.register(Box::new(m.gpu_temperature.clone()))?;
        reg.register(Box::new(m.gpu_energy.clone()))?;
        reg.register(Box::new(m.gpu_energy_resets.clone()))?;
        reg.register(Box::new(m.gpu_energy_counter.clone()))?;
        reg.register(Box::new(m.adapters_loaded.clone()))?;
        reg.register(Box::new(m.adapter_operations.clone()))?;
        reg.register(Box::new(m.energy_total.clone()))?;
        reg.register(Box::new(m.rejected.clone()))?;
        reg.register(Box::new(m.engine_response_errors.clone()))?;
        reg.register(Box::new(m.engine_metrics_rejected.clone()))?;
        Ok(m)
    }

    /// Text exposition.
    pub fn render(&self) -> String {
        prometheus::TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}
