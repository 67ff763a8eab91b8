//! An inference engine simulator: speaks enough of vLLM's OpenAI-compatible
//! HTTP API (completions, chat completions, streaming, LoRA adapters,
//! `/v1/models`, `/health`, `/metrics`) for Strata's e2e tests, benchmarks
//! and demo, with a latency model that makes load produce SLA pressure.
//! Test and demo only; never in a product image.
//!
//! The latency model (the pure functions below, no sleeping):
//!
//! - at most `max_batch` sequences run at once; the others wait, first in
//!   first out (the wait is queueing time);
//! - after admission, prefill takes `uncached_tokens * prefill_ms_per_token / speed`,
//!   where the uncached tokens are the prompt's tokens less those found in
//!   the prefix cache (all of them when prefix caching is off);
//! - with `prefill_concurrency` N > 0, at most N sequences prefill at once
//!   and the others wait for their turn, first in first out (a GPU's
//!   prefill is compute-bound: its prompt tokens per second are shared, as
//!   vLLM's per-step token budget shares them); 0 (the default) lets every
//!   admitted sequence prefill at once;
//! - then each output token takes
//!   `itl_ms * (1 + itl_batch_factor * (running - 1)) / speed`, where `running` is the
//!   number of sequences running at that step, so inter-token latency grows
//!   with load;
//! - the time to first token is queueing + prefill + the first token step.
//!
//! Prompt tokens are `ceil(chars / 4)` over all message contents (at least 1):
//! token `i` is characters `4i..4i+4` of the contents, concatenated;
//! a request always generates exactly `max_tokens` tokens (finish reason
//! `length`), which keeps token counts deterministic.
//!
//! The prefix cache (with `--enable-prefix-caching`, as vLLM's automatic
//! prefix caching): per engine, an LRU of KV blocks of `block_size` tokens,
//! at most `prefix_cache_blocks` of them, keyed by chained hashes (block
//! `i`'s hash covers the served model name and blocks `0..=i`,
//! [`prompt_block_hashes`]), so two prompts that share a text prefix share
//! its whole blocks. At admission the longest cached run of leading blocks
//! is looked up (at most `prompt_tokens - 1` tokens, since vLLM always
//! computes the last prompt token), and only the rest is prefilled; after
//! prefill the prompt's full blocks are cached, the chain's first block the
//! most recently used, so eviction takes chains from their tails as vLLM's
//! free-block queue does. Counted as vLLM counts them, in tokens:
//! `vllm:prefix_cache_queries_total` (the prompt tokens of each admitted
//! request) and `vllm:prefix_cache_hits_total` (those found cached).
//! Deviations: blocks held by running sequences are not pinned (the cache
//! is only the LRU of computed blocks), generated tokens are never cached,
//! message roles and boundaries are not part of the tokens.
//!
//! LoRA adapters (`/v1/load_lora_adapter`, at most `max_loras`) are served
//! under their names, and `vllm:lora_requests_info` is published as vLLM
//! with `--enable-lora` publishes it ([`LoraInfo`]): the adapters with
//! requests running and waiting as label values, a series per combination
//! seen, its value the last time it was current. `vllm:cache_config_info`
//! carries the block size and the GPU blocks in its labels.
//!
//! When a load file is configured, the simulated GPU utilization
//! ([`utilization`]) is written there every 100 ms and whenever the number of
//! running sequences changes, for the fake NVML library to report. With a
//! GPU directory (the node's GPU state, the fake library's per-device mode),
//! it is written to `<dir>/<uuid>/load` for each GPU the engine uses: the
//! ones its `NVIDIA_VISIBLE_DEVICES` names ([`visible_gpus`]), as a real
//! engine computes on the GPUs it sees.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::Instant;

// ---------------------------------------------------------------------------
// Configuration and the pure latency model
// ---------------------------------------------------------------------------

/// The simulator's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Served model name.
    pub model: String,
    /// Most sequences running at once; the others queue, first in first out.
    pub max_batch: usize,
    /// Prefill time per prompt token, in milliseconds, at speed 1.
    pub prefill_ms_per_token: f64,
    /// Time per output token with a batch of one, in milliseconds, at speed 1.
    pub itl_ms: f64,
    /// How the time per output token grows with the batch:
    /// `itl_ms * (1 + itl_batch_factor * (batch - 1))`.
    pub itl_batch_factor: f64,
    /// GPU speed factor; all durations are divided by it (H100 1.0, A100 0.6, L4 0.25).
    pub speed: f64,
    /// Output tokens when a request does not say `max_tokens`.
    pub max_tokens_default: u32,
    /// Where to publish the simulated GPU utilization, if anywhere.
    pub load_file: Option<PathBuf>,
    /// The node's GPU state directory: the utilization is also published
    /// to `<gpu_dir>/<uuid>/load` for each of [`SimConfig::gpus`].
    pub gpu_dir: Option<PathBuf>,
    /// The UUIDs of the GPUs the engine computes on (see [`visible_gpus`]).
    pub gpus: Vec<String>,
    /// Most LoRA adapters loaded at once.
    pub max_loras: usize,
    /// Whether prefill reuses cached KV blocks of shared prompt prefixes
    /// (vLLM's `--enable-prefix-caching`). Off by default, so that the
    /// latency model of tests and benchmarks that repeat one prompt stays
    /// the plain one.
    pub prefix_caching: bool,
    /// Tokens per KV block (vLLM's `--block-size`, default 16).
    pub block_size: u32,
    /// Most blocks the prefix cache holds (vLLM's KV cache size,
    /// `--num-gpu-blocks-override`).
    pub prefix_cache_blocks: usize,
    /// Most sequences prefilling at once (0: no limit); the others wait
    /// their turn after admission, first in first out.
    pub prefill_concurrency: usize,
    /// How long an idle keep-alive connection stays open: uvicorn, vLLM's
    /// HTTP server, closes it after `timeout_keep_alive` (5 s, vLLM's
    /// `VLLM_HTTP_TIMEOUT_KEEP_ALIVE`), and proxies in front of it must
    /// cope.
    pub keep_alive: Duration,
}

/// The prefix cache's default size in blocks: 16,384 blocks of 16 tokens,
/// 262,144 tokens. An 8B model in 16-bit precision needs 128 KiB of KV
/// cache per token, so this is about 32 GiB: between what an L4 (about
/// 40,000 tokens) and an H100 80GB (about 400,000) leave for it.
pub const DEFAULT_PREFIX_CACHE_BLOCKS: usize = 16_384;

impl SimConfig {
    /// A configuration with the defaults of `strata-engine-sim` for `model`.
    pub fn new(model: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            max_batch: 16,
            prefill_ms_per_token: 0.2,
            itl_ms: 20.0,
            itl_batch_factor: 0.05,
            speed: 1.0,
            max_tokens_default: 64,
            load_file: None,
            gpu_dir: None,
            gpus: Vec::new(),
            max_loras: 4,
            prefix_caching: false,
            block_size: 16,
            prefix_cache_blocks: DEFAULT_PREFIX_CACHE_BLOCKS,
            prefill_concurrency: 0,
            keep_alive: Duration::from_secs(5),
        }
    }

    /// Checks that the numbers make sense.
    pub fn validate(&self) -> Result<(), String> {
        if self.model.is_empty() {
            return Err("the model name must not be empty".into());
        }
        if self.max_batch == 0 {
            return Err("max-batch must be at least 1".into());
        }
        if !(self.speed.is_finite() && self.speed > 0.0) {
            return Err(format!("speed must be positive, got {}", self.speed));
        }
        for (name, v) in [
            ("prefill-ms-per-token", self.prefill_ms_per_token),
            ("itl-ms", self.itl_ms),
            ("itl-batch-factor", self.itl_batch_factor),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("{name} must be a non-negative number, got {v}"));
            }
        }
        if self.max_tokens_default == 0 {
            return Err("max-tokens-default must be at least 1".into());
        }
        if self.block_size == 0 {
            return Err("block-size must be at least 1".into());
        }
        if let Some(bad) = self.gpus.iter().find(|u| !is_device_name(u)) {
            return Err(format!("{bad:?} cannot name a GPU's directory"));
        }
        Ok(())
    }

    /// Every file the utilization is published to: the load file, then
    /// `<gpu_dir>/<uuid>/load` for each GPU.
    pub fn load_paths(&self) -> Vec<PathBuf> {
        let mut paths: Vec<PathBuf> = self.load_file.iter().cloned().collect();
        if let Some(dir) = &self.gpu_dir {
            paths.extend(self.gpus.iter().map(|u| dir.join(u).join("load")));
        }
        paths
    }
}

/// A device ID that can name a directory: not empty, no `/`, not `.`-led.
fn is_device_name(id: &str) -> bool {
    !id.is_empty() && !id.contains('/') && !id.starts_with('.')
}

/// The UUIDs of the GPUs an engine uses, from its `NVIDIA_VISIBLE_DEVICES`
/// (`visible`) as the NVIDIA device plugin sets it, and the node's GPUs
/// (`node`, comma-separated, as the fake NVML library's
/// `STRATA_FAKE_NVML_DEVICES`), which resolve `all` and indices. Unset,
/// empty, `none` or `void`: none (a container that requested no GPU).
/// UUIDs (`GPU-...`, `MIG-...`) are taken as they are. Pure.
pub fn visible_gpus(visible: Option<&str>, node: Option<&str>) -> Result<Vec<String>, String> {
    let node: Vec<&str> = node
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let visible = visible.map(str::trim).unwrap_or("");
    match visible {
        "" | "none" | "void" => return Ok(Vec::new()),
        "all" if node.is_empty() => {
            return Err(
                "NVIDIA_VISIBLE_DEVICES=all, but the node's GPUs are not known (STRATA_FAKE_NVML_DEVICES)"
                    .into(),
            );
        }
        "all" => return Ok(node.iter().map(|s| (*s).to_owned()).collect()),
        _ => {}
    }
    let mut out: Vec<String> = Vec::new();
    for item in visible.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let uuid = if item.starts_with("GPU-") || item.starts_with("MIG-") {
            item.to_owned()
        } else if let Ok(i) = item.parse::<usize>() {
            match node.get(i) {
                Some(u) => (*u).to_owned(),
                None => {
                    return Err(format!(
                        "NVIDIA_VISIBLE_DEVICES names GPU {i}, but the node's GPUs (STRATA_FAKE_NVML_DEVICES) are {node:?}"
                    ));
                }
            }
        } else {
            return Err(format!(
                "NVIDIA_VISIBLE_DEVICES item {item:?} is neither a GPU UUID nor an index"
            ));
        };
        if !is_device_name(&uuid) {
            return Err(format!("{uuid:?} cannot name a GPU's directory"));
        }
        if !out.contains(&uuid) {
            out.push(uuid);
        }
    }
    Ok(out)
}

/// Milliseconds (possibly fractional, never negative) as a duration.
fn millis(ms: f64) -> Duration {
    if ms.is_finite() && ms > 0.0 {
        Duration::from_secs_f64(ms / 1000.0)
    } else {
        Duration::ZERO
    }
}

/// Prompt tokens for a text of `chars` characters: `ceil(chars / 4)`, at least 1.
pub fn prompt_tokens(chars: usize) -> u32 {
    u32::try_from(chars.div_ceil(4)).unwrap_or(u32::MAX).max(1)
}

/// Hashes of the whole KV blocks of a prompt whose text (the message
/// contents, concatenated) is `text`, for the served model (base or
/// adapter) `model`: block `i` holds tokens `i * block_size ..
/// (i + 1) * block_size`, that is `4 * block_size` characters, and its hash
/// chains the previous block's (the first one's, the model's name), so it
/// stands for the whole prefix up to its end, as vLLM's block hashes do. A
/// trailing partial block has no hash: it is never cached. Deterministic
/// within a build. Pure.
pub fn prompt_block_hashes(model: &str, text: &str, block_size: u32) -> Vec<u64> {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let chars_per_block = (block_size.max(1) as usize).saturating_mul(4);
    let mut parent = {
        let mut h = DefaultHasher::new();
        model.hash(&mut h);
        h.finish()
    };
    let mut hashes = Vec::new();
    let mut block = String::new();
    let mut in_block = 0;
    for c in text.chars() {
        block.push(c);
        in_block += 1;
        if in_block == chars_per_block {
            let mut h = DefaultHasher::new();
            parent.hash(&mut h);
            block.hash(&mut h);
            parent = h.finish();
            hashes.push(parent);
            block.clear();
            in_block = 0;
        }
    }
    hashes
}

/// Prompt tokens left to prefill when `cached` of `prompt_tokens` are in
/// the prefix cache: at least one (vLLM computes the last token always).
pub fn uncached_tokens(prompt_tokens: u32, cached: u32) -> u32 {
    prompt_tokens.saturating_sub(cached).max(1)
}

/// An engine's prefix cache: an LRU of KV blocks keyed by their chained
/// hashes ([`prompt_block_hashes`]). Pure (no clock: recency is an
/// increasing stamp).
#[derive(Debug, Clone)]
pub struct PrefixCache {
    block_size: u32,
    capacity: usize,
    /// Block hash -> its stamp.
    blocks: std::collections::HashMap<u64, u64>,
    /// Stamp -> block hash; the first entry is the least recently used.
    order: BTreeMap<u64, u64>,
    next_stamp: u64,
}

impl PrefixCache {
    /// An empty cache of at most `capacity` blocks of `block_size` tokens.
    pub fn new(block_size: u32, capacity: usize) -> Self {
        Self {
            block_size: block_size.max(1),
            capacity,
            blocks: std::collections::HashMap::new(),
            order: BTreeMap::new(),
            next_stamp: 0,
        }
    }

    /// Blocks held now.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// Whether no block is held.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Whether the block with this hash is held.
    pub fn contains(&self, hash: u64) -> bool {
        self.blocks.contains_key(&hash)
    }

    /// The tokens of a prompt of `prompt_tokens` tokens with these block
    /// `hashes` that are cached: the longest run of leading blocks held,
    /// at most `prompt_tokens - 1` tokens. The blocks found become the most
    /// recently used.
    pub fn lookup(&mut self, hashes: &[u64], prompt_tokens: u32) -> u32 {
        let max_blocks = (prompt_tokens.saturating_sub(1) / self.block_size) as usize;
        let hit = hashes
            .iter()
            .take(max_blocks)
            .take_while(|h| self.blocks.contains_key(h))
            .count();
        self.touch(&hashes[..hit]);
        u32::try_from(hit)
            .unwrap_or(u32::MAX)
            .saturating_mul(self.block_size)
    }

    /// Caches a prompt's computed blocks (all of `hashes`), evicting the
    /// least recently used blocks beyond the capacity.
    pub fn insert(&mut self, hashes: &[u64]) {
        self.touch(hashes);
        while self.blocks.len() > self.capacity {
            let Some((_, hash)) = self.order.pop_first() else {
                break;
            };
            self.blocks.remove(&hash);
        }
    }

    /// Makes `hashes` the most recently used, the first one the most
    /// recent of all (so eviction takes a chain from its tail).
    fn touch(&mut self, hashes: &[u64]) {
        for hash in hashes.iter().rev() {
            let stamp = self.next_stamp;
            self.next_stamp += 1;
            if let Some(old) = self.blocks.insert(*hash, stamp) {
                self.order.remove(&old);
            }
            self.order.insert(stamp, *hash);
        }
    }
}

/// Prefill time for `prompt_tokens` tokens.
pub fn prefill_duration(config: &SimConfig, prompt_tokens: u32) -> Duration {
    millis(f64::from(prompt_tokens) * config.prefill_ms_per_token / config.speed)
}

/// Time to produce one output token while `running` sequences run (counted
/// as at least 1).
pub fn token_step(config: &SimConfig, running: usize) -> Duration {
    let extra = running.max(1) as f64 - 1.0;
    millis(config.itl_ms * (1.0 + config.itl_batch_factor * extra) / config.speed)
}

/// Time to first token after waiting `queue` for admission, with `running`
/// sequences running (this one included) at the first step.
pub fn time_to_first_token(
    config: &SimConfig,
    queue: Duration,
    prompt_tokens: u32,
    running: usize,
) -> Duration {
    queue + prefill_duration(config, prompt_tokens) + token_step(config, running)
}

/// Whole request duration after admission with a constant batch of
/// `running` sequences: prefill plus `completion_tokens` steps.
pub fn service_duration(
    config: &SimConfig,
    prompt_tokens: u32,
    completion_tokens: u32,
    running: usize,
) -> Duration {
    prefill_duration(config, prompt_tokens) + token_step(config, running) * completion_tokens
}

/// Simulated GPU utilization in `[0, 1]`: `running / max_batch * 2`, so half
/// the batch saturates the GPU.
pub fn utilization(running: usize, max_batch: usize) -> f64 {
    if max_batch == 0 {
        return if running > 0 { 1.0 } else { 0.0 };
    }
    (running as f64 / max_batch as f64 * 2.0).clamp(0.0, 1.0)
}

/// KV-cache usage in `[0, 1]`, approximated as `running / max_batch`.
pub fn kv_cache_usage(running: usize, max_batch: usize) -> f64 {
    if max_batch == 0 {
        return 0.0;
    }
    (running as f64 / max_batch as f64).clamp(0.0, 1.0)
}

/// The text of output token `index`.
pub fn token_text(index: u32) -> String {
    format!(" tok{index}")
}

// ---------------------------------------------------------------------------
// Metrics (Prometheus text format, vLLM names)
// ---------------------------------------------------------------------------

/// vLLM's buckets for `vllm:time_to_first_token_seconds`.
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// vLLM's buckets for `vllm:inter_token_latency_seconds`.
pub const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
/// vLLM's buckets for `vllm:e2e_request_latency_seconds`.
pub const E2E_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// A Prometheus histogram: per-bucket (not cumulative) counts, sum, count.
#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.counts[i] += 1;
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            cumulative += count;
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{}\",{labels}}} {cumulative}",
                float(*bound)
            );
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\",{labels}}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", float(self.sum));
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

/// A float the way Python's Prometheus client writes it (`1.0`, `0.25`).
fn float(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

/// A label value, escaped for the text format.
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[derive(Debug, Clone)]
struct Metrics {
    prompt_tokens: u64,
    generation_tokens: u64,
    request_success: u64,
    /// Prompt tokens looked up in the prefix cache.
    prefix_cache_queries: u64,
    /// Prompt tokens found there.
    prefix_cache_hits: u64,
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
}

impl Metrics {
    fn new() -> Self {
        Self {
            prompt_tokens: 0,
            generation_tokens: 0,
            request_success: 0,
            prefix_cache_queries: 0,
            prefix_cache_hits: 0,
            ttft: Histogram::new(TTFT_BUCKETS),
            itl: Histogram::new(ITL_BUCKETS),
            e2e: Histogram::new(E2E_BUCKETS),
        }
    }

    fn render(&self, model: &str, running: usize, waiting: usize, max_batch: usize) -> String {
        let labels = format!("model_name=\"{}\"", label_value(model));
        let mut out = String::new();
        let mut scalar = |name: &str, kind: &str, help: &str, extra: &str, value: String| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name}{{{extra}{labels}}} {value}");
        };
        scalar(
            "vllm:num_requests_running",
            "gauge",
            "Number of requests in model execution batches.",
            "",
            running.to_string(),
        );
        scalar(
            "vllm:num_requests_waiting",
            "gauge",
            "Number of requests waiting to be processed.",
            "",
            waiting.to_string(),
        );
        scalar(
            "vllm:kv_cache_usage_perc",
            "gauge",
            "KV-cache usage. 1 means 100 percent usage.",
            "",
            float(kv_cache_usage(running, max_batch)),
        );
        scalar(
            "vllm:prompt_tokens_total",
            "counter",
            "Number of prefill tokens processed.",
            "",
            self.prompt_tokens.to_string(),
        );
        scalar(
            "vllm:generation_tokens_total",
            "counter",
            "Number of generation tokens processed.",
            "",
            self.generation_tokens.to_string(),
        );
        scalar(
            "vllm:request_success_total",
            "counter",
            "Count of successfully processed requests.",
            "finished_reason=\"length\",",
            self.request_success.to_string(),
        );
        scalar(
            "vllm:prefix_cache_queries_total",
            "counter",
            "Prefix cache queries, in terms of number of queried tokens.",
            "",
            self.prefix_cache_queries.to_string(),
        );
        scalar(
            "vllm:prefix_cache_hits_total",
            "counter",
            "Prefix cache hits, in terms of number of cached tokens.",
            "",
            self.prefix_cache_hits.to_string(),
        );
        self.ttft.render(
            &mut out,
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            &labels,
        );
        self.itl.render(
            &mut out,
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            &labels,
        );
        self.e2e.render(
            &mut out,
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            &labels,
        );
        out
    }
}

/// `vllm:lora_requests_info`, as vLLM publishes it: a gauge whose labels
/// are the adapters with requests running and waiting (and `max_lora`), set
/// to the current time at every stats update, so that each combination of
/// lists seen stays a series of its own, its value the last time it was
/// current (readers take the series with the largest value). Here a stats
/// update is a read of `/metrics`; the oldest series beyond
/// [`LoraInfo::KEEP`] are dropped (vLLM keeps them all).
#[derive(Debug, Default)]
pub struct LoraInfo {
    series: BTreeMap<(String, String), f64>,
}

impl LoraInfo {
    /// Series kept.
    pub const KEEP: usize = 32;

    /// The lists `running` and `waiting` are current at `now` (Unix time).
    pub fn seen(&mut self, running: String, waiting: String, now: f64) {
        self.series.insert((running, waiting), now);
        while self.series.len() > Self::KEEP {
            let oldest = self
                .series
                .iter()
                .min_by(|a, b| a.1.total_cmp(b.1))
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => self.series.remove(&k),
                None => break,
            };
        }
    }

    /// Appends the gauge to `out`.
    pub fn render(&self, out: &mut String, max_lora: usize) {
        let _ = writeln!(
            out,
            "# HELP vllm:lora_requests_info Running stats on lora requests."
        );
        let _ = writeln!(out, "# TYPE vllm:lora_requests_info gauge");
        for ((running, waiting), at) in &self.series {
            let _ = writeln!(
                out,
                "vllm:lora_requests_info{{max_lora=\"{max_lora}\",running_lora_adapters=\"{}\",waiting_lora_adapters=\"{}\"}} {}",
                label_value(running),
                label_value(waiting),
                float(*at)
            );
        }
    }
}

// ---------------------------------------------------------------------------
// The simulator state
// ---------------------------------------------------------------------------

/// A running simulator: the engine state behind the HTTP API. Cheap to
/// clone (shared state).
#[derive(Clone)]
pub struct Simulator {
    inner: Arc<Inner>,
}

struct Inner {
    config: SimConfig,
    /// FIFO admission: one permit per running sequence.
    admission: Arc<Semaphore>,
    /// FIFO turns at prefill, when [`SimConfig::prefill_concurrency`] is set.
    prefill: Option<Arc<Semaphore>>,
    /// Running sequences; watched by the load publisher.
    running: watch::Sender<usize>,
    waiting: AtomicUsize,
    /// Loaded LoRA adapters, name and path, in load order.
    loras: Mutex<Vec<(String, String)>>,
    /// Requests for each adapter: (running, waiting).
    lora_requests: Mutex<BTreeMap<String, (usize, usize)>>,
    /// `vllm:lora_requests_info`'s series: (running, waiting) adapter
    /// lists to the time they were last seen (see [`LoraInfo`]).
    lora_info: Mutex<LoraInfo>,
    metrics: Mutex<Metrics>,
    /// The KV blocks of computed prompt prefixes (used when
    /// [`SimConfig::prefix_caching`] is on).
    prefix_cache: Mutex<PrefixCache>,
    next_id: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Simulator {
    /// A simulator for `config` (which must validate).
    pub fn new(config: SimConfig) -> Result<Self, String> {
        config.validate()?;
        let (running, _) = watch::channel(0);
        Ok(Self {
            inner: Arc::new(Inner {
                admission: Arc::new(Semaphore::new(config.max_batch)),
                prefill: (config.prefill_concurrency > 0)
                    .then(|| Arc::new(Semaphore::new(config.prefill_concurrency))),
                prefix_cache: Mutex::new(PrefixCache::new(
                    config.block_size,
                    config.prefix_cache_blocks,
                )),
                config,
                running,
                waiting: AtomicUsize::new(0),
                loras: Mutex::new(Vec::new()),
                lora_requests: Mutex::new(BTreeMap::new()),
                lora_info: Mutex::new(LoraInfo::default()),
                metrics: Mutex::new(Metrics::new()),
                next_id: AtomicU64::new(1),
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SimConfig {
        &self.inner.config
    }

    /// Sequences running now.
    pub fn running(&self) -> usize {
        *self.inner.running.borrow()
    }

    /// Requests waiting for admission now.
    pub fn waiting(&self) -> usize {
        self.inner.waiting.load(Ordering::SeqCst)
    }

    /// Loaded LoRA adapters (name, path), in load order.
    pub fn loras(&self) -> Vec<(String, String)> {
        lock(&self.inner.loras).clone()
    }

    /// The `/metrics` text.
    pub fn metrics_text(&self) -> String {
        let metrics = lock(&self.inner.metrics).clone();
        let mut text = metrics.render(
            &self.inner.config.model,
            self.running(),
            self.waiting(),
            self.inner.config.max_batch,
        );
        let (running, waiting) = self.lora_lists();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        let mut info = lock(&self.inner.lora_info);
        info.seen(running, waiting, now);
        info.render(&mut text, self.inner.config.max_loras);
        drop(info);
        self.render_cache_config(&mut text);
        text
    }

    /// `vllm:cache_config_info`, as vLLM publishes its cache configuration:
    /// value 1, the configuration in labels (here the ones a reader uses:
    /// tokens per block, and blocks on the GPU, `--num-gpu-blocks-override`).
    fn render_cache_config(&self, out: &mut String) {
        let c = &self.inner.config;
        let python_bool = |b: bool| if b { "True" } else { "False" };
        let _ = writeln!(
            out,
            "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig"
        );
        let _ = writeln!(out, "# TYPE vllm:cache_config_info gauge");
        let _ = writeln!(
            out,
            "vllm:cache_config_info{{block_size=\"{}\",cache_dtype=\"auto\",enable_prefix_caching=\"{}\",gpu_memory_utilization=\"0.9\",num_gpu_blocks=\"{}\"}} 1.0",
            c.block_size,
            python_bool(c.prefix_caching),
            c.prefix_cache_blocks
        );
    }

    /// The adapters with requests running, and with requests waiting, each
    /// comma-separated in name order (vLLM's label values).
    pub fn lora_lists(&self) -> (String, String) {
        let requests = lock(&self.inner.lora_requests);
        let list = |pick: fn(&(usize, usize)) -> usize| {
            requests
                .iter()
                .filter(|(_, n)| pick(n) > 0)
                .map(|(name, _)| name.as_str())
                .collect::<Vec<_>>()
                .join(",")
        };
        (list(|n| n.0), list(|n| n.1))
    }

    /// Counts one request for `adapter` as running (`running`) or waiting,
    /// by `delta`.
    fn count_lora(&self, adapter: &str, running: bool, delta: isize) {
        let mut requests = lock(&self.inner.lora_requests);
        let entry = requests.entry(adapter.to_string()).or_default();
        let n = if running { &mut entry.0 } else { &mut entry.1 };
        *n = n.saturating_add_signed(delta);
        if *entry == (0, 0) {
            requests.remove(adapter);
        }
    }

    /// Blocks in the prefix cache now.
    pub fn prefix_cache_len(&self) -> usize {
        lock(&self.inner.prefix_cache).len()
    }

    /// The HTTP API.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/chat/completions", post(chat_completions))
            .route("/v1/completions", post(completions))
            .route("/v1/models", get(models))
            .route("/v1/load_lora_adapter", post(load_lora))
            .route("/v1/unload_lora_adapter", post(unload_lora))
            .route("/health", get(health))
            .route("/metrics", get(metrics))
            .with_state(self.clone())
    }

    /// Publishes [`utilization`] to `path` every 100 ms and whenever the
    /// number of running sequences changes, until the simulator is dropped
    /// or the task is aborted.
    pub fn publish_load(&self, path: PathBuf) -> tokio::task::JoinHandle<()> {
        self.publish_loads(vec![path])
    }

    /// Like [`Simulator::publish_load`], to every one of `paths` (their
    /// directories are created when missing).
    pub fn publish_loads(&self, paths: Vec<PathBuf>) -> tokio::task::JoinHandle<()> {
        let mut rx = self.inner.running.subscribe();
        let max_batch = self.inner.config.max_batch;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_error: Vec<Option<String>> = vec![None; paths.len()];
            loop {
                let running = *rx.borrow_and_update();
                let text = format!("{:.4}\n", utilization(running, max_batch));
                for (path, last_error) in paths.iter().zip(last_error.iter_mut()) {
                    match write_load_file(path, text.as_bytes()).await {
                        Ok(()) => *last_error = None,
                        Err(e) => {
                            // Say it once, not every 100 ms.
                            let msg = e.to_string();
                            if last_error.as_ref() != Some(&msg) {
                                tracing::warn!(path = %path.display(), "cannot write the load file: {msg}");
                            }
                            *last_error = Some(msg);
                        }
                    }
                }
                tokio::select! {
                    _ = tick.tick() => {}
                    changed = rx.changed() => if changed.is_err() { return },
                }
            }
        })
    }

    fn model_known(&self, name: &str) -> bool {
        name == self.inner.config.model || lock(&self.inner.loras).iter().any(|(n, _)| n == name)
    }

    fn next_id(&self) -> u64 {
        self.inner.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// Writes a load file atomically, creating its directory when missing.
async fn write_load_file(path: &Path, data: &[u8]) -> std::io::Result<()> {
    match write_atomic(path, data).await {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                tokio::fs::create_dir_all(dir).await?;
            }
            write_atomic(path, data).await
        }
        other => other,
    }
}

/// Writes `<path>.tmp`, then renames it to `path`.
async fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    tokio::fs::write(&tmp, data).await?;
    tokio::fs::rename(&tmp, path).await
}

/// Serves the simulator for `config` on `listener` until `shutdown`
/// completes (then lets in-flight requests finish). Publishes the load file
/// and the GPUs' loads if the configuration names them.
pub async fn serve(
    listener: TcpListener,
    config: SimConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let sim = Simulator::new(config)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    serve_simulator(listener, sim, shutdown).await
}

/// Like [`serve`], for an existing [`Simulator`] (whose state the caller can
/// inspect).
pub async fn serve_simulator(
    listener: TcpListener,
    sim: Simulator,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let paths = sim.config().load_paths();
    let publisher = (!paths.is_empty()).then(|| sim.publish_loads(paths));
    // As uvicorn: idle keep-alive connections closed after `keep_alive`,
    // connections unbounded (uvicorn's `limit_concurrency` is unset), no
    // Nagle (a streamed answer is many small writes, and Nagle's wait for
    // the client's delayed ACK would hold each up to 40 ms; uvicorn sets
    // TCP_NODELAY too; so does this server).
    let limits = strata_net::server::ServerLimits {
        max_connections: 1 << 20,
        header_read_timeout: sim.config().keep_alive,
        ..strata_net::server::ServerLimits::default()
    };
    let result = strata_net::server::serve(listener, sim.router(), limits, None, shutdown).await;
    if let Some(p) = publisher {
        p.abort();
    }
    result
}

// ---------------------------------------------------------------------------
// One sequence: admission, prefill, decode
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SeqEvent {
    /// Admitted into the running batch.
    Admitted,
    /// Output token `index` produced.
    Token { index: u32, last: bool },
    /// All tokens produced; metrics recorded, batch slot released.
    Finished,
}

/// Counts a request as waiting while it lives (and for its adapter, if
/// any).
struct WaitingGuard(Simulator, Option<String>);

impl WaitingGuard {
    fn new(sim: &Simulator, adapter: Option<&str>) -> Self {
        sim.inner.waiting.fetch_add(1, Ordering::SeqCst);
        if let Some(a) = adapter {
            sim.count_lora(a, false, 1);
        }
        Self(sim.clone(), adapter.map(str::to_string))
    }
}

impl Drop for WaitingGuard {
    fn drop(&mut self) {
        self.0.inner.waiting.fetch_sub(1, Ordering::SeqCst);
        if let Some(a) = &self.1 {
            self.0.count_lora(a, false, -1);
        }
    }
}

/// Counts a sequence as running while it lives, and holds its batch slot
/// (released after the count goes down).
struct RunningGuard {
    sim: Simulator,
    adapter: Option<String>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl RunningGuard {
    fn new(
        sim: &Simulator,
        adapter: Option<String>,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Self {
        sim.inner.running.send_modify(|n| *n += 1);
        if let Some(a) = &adapter {
            sim.count_lora(a, true, 1);
        }
        Self {
            sim: sim.clone(),
            adapter,
            _permit: permit,
        }
    }
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        if let Some(a) = &self.adapter {
            self.sim.count_lora(a, true, -1);
        }
        self.sim
            .inner
            .running
            .send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Sleeps until `deadline`; false if the consumer went away first.
async fn sleep_until(deadline: Instant, tx: &mpsc::UnboundedSender<SeqEvent>) -> bool {
    tokio::select! {
        () = tokio::time::sleep_until(deadline) => true,
        () = tx.closed() => false,
    }
}

/// Runs one sequence, reporting to `tx`; stops early when `tx`'s receiver
/// is dropped (the client went away).
async fn run_sequence(
    sim: Simulator,
    arrived: Instant,
    prompt: Prompt,
    adapter: Option<String>,
    completion_tokens: u32,
    tx: mpsc::UnboundedSender<SeqEvent>,
) {
    let prompt_tokens = prompt.tokens;
    let waiting = WaitingGuard::new(&sim, adapter.as_deref());
    let permit = tokio::select! {
        p = sim.inner.admission.clone().acquire_owned() => match p {
            Ok(p) => p,
            Err(_) => return,
        },
        () = tx.closed() => return,
    };
    drop(waiting);
    let running = RunningGuard::new(&sim, adapter, permit);
    if tx.send(SeqEvent::Admitted).is_err() {
        return;
    }
    let config = &sim.inner.config;
    // Its turn at prefill (held until its prefill is done), when prefills
    // share the GPU.
    let turn = match &sim.inner.prefill {
        Some(p) => tokio::select! {
            t = p.clone().acquire_owned() => match t {
                Ok(t) => Some(t),
                Err(_) => return,
            },
            () = tx.closed() => return,
        },
        None => None,
    };
    // As vLLM's scheduler: the cached prefix is looked up when the
    // sequence is scheduled, and only the rest is prefilled.
    let cached = if config.prefix_caching {
        let cached = lock(&sim.inner.prefix_cache).lookup(&prompt.blocks, prompt_tokens);
        let mut m = lock(&sim.inner.metrics);
        m.prefix_cache_queries += u64::from(prompt_tokens);
        m.prefix_cache_hits += u64::from(cached);
        cached
    } else {
        0
    };
    // Deadlines accumulate, so timer granularity does not add up over tokens.
    let mut deadline =
        Instant::now() + prefill_duration(config, uncached_tokens(prompt_tokens, cached));
    if !sleep_until(deadline, &tx).await {
        return;
    }
    if config.prefix_caching {
        lock(&sim.inner.prefix_cache).insert(&prompt.blocks);
    }
    drop(turn);
    lock(&sim.inner.metrics).prompt_tokens += u64::from(prompt_tokens);
    let mut previous: Option<Instant> = None;
    for index in 0..completion_tokens {
        deadline += token_step(config, sim.running());
        if !sleep_until(deadline, &tx).await {
            return;
        }
        let now = Instant::now();
        {
            let mut m = lock(&sim.inner.metrics);
            m.generation_tokens += 1;
            match previous {
                None => m.ttft.observe((now - arrived).as_secs_f64()),
                Some(p) => m.itl.observe((now - p).as_secs_f64()),
            }
        }
        previous = Some(now);
        let last = index + 1 == completion_tokens;
        if tx.send(SeqEvent::Token { index, last }).is_err() {
            return;
        }
    }
    {
        let mut m = lock(&sim.inner.metrics);
        m.request_success += 1;
        m.e2e.observe(arrived.elapsed().as_secs_f64());
    }
    drop(running);
    let _ = tx.send(SeqEvent::Finished);
}

// ---------------------------------------------------------------------------
// HTTP handlers
// ---------------------------------------------------------------------------

/// A vLLM-style JSON error.
fn error(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    let body = json!({
        "error": {
            "message": message.into(),
            "type": kind,
            "param": null,
            "code": status.as_u16(),
        }
    });
    (status, axum::Json(body)).into_response()
}

fn bad_request(message: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, "BadRequestError", message)
}

fn not_found(message: impl Into<String>) -> Response {
    error(StatusCode::NOT_FOUND, "NotFoundError", message)
}

fn parse<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("invalid request body: {e}"))
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
struct Message {
    #[serde(default)]
    content: Value,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    model: Option<String>,
    messages: Vec<Message>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    model: Option<String>,
    prompt: Value,
    max_tokens: Option<u32>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
}

/// The text of a message content: a string, or a list of parts with `text`.
fn content_text(content: &Value, out: &mut String) {
    match content {
        Value::String(s) => out.push_str(s),
        Value::Array(parts) => {
            for p in parts {
                match p {
                    Value::String(s) => out.push_str(s),
                    other => {
                        if let Some(s) = other.get("text").and_then(Value::as_str) {
                            out.push_str(s);
                        }
                    }
                }
            }
        }
        _ => {}
    }
}

/// A prompt as the engine sees it: its tokens and, with prefix caching,
/// the hashes of its whole blocks.
#[derive(Debug, Clone, Default)]
struct Prompt {
    tokens: u32,
    blocks: Vec<u64>,
}

impl Prompt {
    fn new(config: &SimConfig, model: &str, text: &str) -> Self {
        Self {
            tokens: prompt_tokens(text.chars().count()),
            blocks: if config.prefix_caching {
                prompt_block_hashes(model, text, config.block_size)
            } else {
                Vec::new()
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

/// What a validated request asks for.
struct Job {
    kind: Kind,
    model: String,
    prompt_tokens: u32,
    completion_tokens: u32,
    stream: bool,
    include_usage: bool,
}

async fn chat_completions(State(sim): State<Simulator>, body: Bytes) -> Response {
    let req: ChatRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return bad_request(e),
    };
    let mut text = String::new();
    for m in &req.messages {
        content_text(&m.content, &mut text);
    }
    let model = req.model.unwrap_or_else(|| sim.config().model.clone());
    let prompt = Prompt::new(sim.config(), &model, &text);
    let job = Job {
        kind: Kind::Chat,
        model,
        prompt_tokens: prompt.tokens,
        completion_tokens: req
            .max_tokens
            .or(req.max_completion_tokens)
            .unwrap_or(sim.config().max_tokens_default),
        stream: req.stream,
        include_usage: req.stream_options.unwrap_or_default().include_usage,
    };
    run_job(sim, job, prompt).await
}

async fn completions(State(sim): State<Simulator>, body: Bytes) -> Response {
    let req: CompletionRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return bad_request(e),
    };
    let text = match &req.prompt {
        Value::String(s) => s,
        _ => return bad_request("prompt must be a string"),
    };
    let model = req.model.unwrap_or_else(|| sim.config().model.clone());
    let prompt = Prompt::new(sim.config(), &model, text);
    let job = Job {
        kind: Kind::Completion,
        model,
        prompt_tokens: prompt.tokens,
        completion_tokens: req.max_tokens.unwrap_or(sim.config().max_tokens_default),
        stream: req.stream,
        include_usage: req.stream_options.unwrap_or_default().include_usage,
    };
    run_job(sim, job, prompt).await
}

async fn run_job(sim: Simulator, job: Job, prompt: Prompt) -> Response {
    if !sim.model_known(&job.model) {
        return not_found(format!("The model `{}` does not exist.", job.model));
    }
    if job.completion_tokens == 0 {
        return bad_request("max_tokens must be at least 1, got 0.");
    }
    let arrived = Instant::now();
    let (tx, rx) = mpsc::unbounded_channel();
    let adapter = (job.model != sim.config().model).then(|| job.model.clone());
    tokio::spawn(run_sequence(
        sim.clone(),
        arrived,
        prompt,
        adapter,
        job.completion_tokens,
        tx,
    ));
    let prefix = match job.kind {
        Kind::Chat => "chatcmpl",
        Kind::Completion => "cmpl",
    };
    let out = Output {
        id: format!("{prefix}-{:016x}", sim.next_id()),
        created: now_unix(),
        job,
    };
    if out.job.stream {
        stream_response(out, rx)
    } else {
        whole_response(out, rx).await
    }
}

/// The fixed parts of a response.
struct Output {
    id: String,
    created: u64,
    job: Job,
}

impl Output {
    fn usage(&self) -> Value {
        json!({
            "prompt_tokens": self.job.prompt_tokens,
            "completion_tokens": self.job.completion_tokens,
            "total_tokens": u64::from(self.job.prompt_tokens) + u64::from(self.job.completion_tokens),
        })
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.job.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    fn chunk(&self, choices: Value) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.job.model,
            "choices": choices,
        });
        if self.job.include_usage
            && let Some(obj) = v.as_object_mut()
        {
            obj.insert("usage".into(), Value::Null);
        }
        v
    }

    /// The server-sent events for one sequence event, if any.
    fn sse(&self, event: SeqEvent) -> Option<Bytes> {
        let data = |v: &Value| format!("data: {v}\n\n");
        let text = match (event, self.job.kind) {
            (SeqEvent::Admitted, Kind::Chat) => data(&self.chunk(json!([{
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": null,
                "finish_reason": null,
            }]))),
            (SeqEvent::Admitted, Kind::Completion) => return None,
            (SeqEvent::Token { index, last }, kind) => {
                let finish = if last { json!("length") } else { Value::Null };
                let choice = match kind {
                    Kind::Chat => json!({
                        "index": 0,
                        "delta": {"content": token_text(index)},
                        "logprobs": null,
                        "finish_reason": finish,
                    }),
                    Kind::Completion => json!({
                        "index": 0,
                        "text": token_text(index),
                        "logprobs": null,
                        "finish_reason": finish,
                    }),
                };
                data(&self.chunk(json!([choice])))
            }
            (SeqEvent::Finished, _) => {
                let mut s = String::new();
                if self.job.include_usage {
                    let v = json!({
                        "id": self.id,
                        "object": self.object(true),
                        "created": self.created,
                        "model": self.job.model,
                        "choices": [],
                        "usage": self.usage(),
                    });
                    s.push_str(&data(&v));
                }
                s.push_str("data: [DONE]\n\n");
                s
            }
        };
        Some(Bytes::from(text))
    }
}

fn stream_response(out: Output, rx: mpsc::UnboundedReceiver<SeqEvent>) -> Response {
    let events = futures::stream::unfold((out, rx), |(out, mut rx)| async move {
        loop {
            let event = rx.recv().await?;
            if let Some(bytes) = out.sse(event) {
                return Some((Ok::<_, std::convert::Infallible>(bytes), (out, rx)));
            }
        }
    });
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/event-stream; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(events),
    )
        .into_response()
}

async fn whole_response(out: Output, mut rx: mpsc::UnboundedReceiver<SeqEvent>) -> Response {
    let mut text = String::new();
    loop {
        match rx.recv().await {
            Some(SeqEvent::Admitted) => {}
            Some(SeqEvent::Token { index, .. }) => text.push_str(&token_text(index)),
            Some(SeqEvent::Finished) => break,
            None => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalServerError",
                    "the request was aborted",
                );
            }
        }
    }
    let choice = match out.job.kind {
        Kind::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": text, "tool_calls": []},
            "logprobs": null,
            "finish_reason": "length",
            "stop_reason": null,
        }),
        Kind::Completion => json!({
            "index": 0,
            "text": text,
            "logprobs": null,
            "finish_reason": "length",
            "stop_reason": null,
        }),
    };
    axum::Json(json!({
        "id": out.id,
        "object": out.object(false),
        "created": out.created,
        "model": out.job.model,
        "choices": [choice],
        "usage": out.usage(),
    }))
    .into_response()
}

async fn models(State(sim): State<Simulator>) -> Response {
    let model = &sim.config().model;
    let created = now_unix();
    let mut data = vec![json!({
        "id": model,
        "object": "model",
        "created": created,
        "owned_by": "vllm",
        "root": model,
        "parent": null,
    })];
    for (name, path) in sim.loras() {
        data.push(json!({
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": path,
            "parent": model,
        }));
    }
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

#[derive(Debug, Deserialize)]
struct LoadLora {
    #[serde(default)]
    lora_name: String,
    #[serde(default)]
    lora_path: String,
}

#[derive(Debug, Deserialize)]
struct UnloadLora {
    #[serde(default)]
    lora_name: String,
}

async fn load_lora(State(sim): State<Simulator>, body: Bytes) -> Response {
    let req: LoadLora = match parse(&body) {
        Ok(r) => r,
        Err(e) => return bad_request(e),
    };
    if req.lora_name.is_empty() || req.lora_path.is_empty() {
        return bad_request("Both 'lora_name' and 'lora_path' must be provided.");
    }
    if req.lora_name == sim.config().model {
        return bad_request(format!(
            "The lora adapter name '{}' is the served model name.",
            req.lora_name
        ));
    }
    {
        let mut loras = lock(&sim.inner.loras);
        if loras.iter().any(|(n, _)| *n == req.lora_name) {
            return bad_request(format!(
                "The lora adapter '{}' has already been loaded.",
                req.lora_name
            ));
        }
        let max = sim.config().max_loras;
        if loras.len() >= max {
            return bad_request(format!(
                "Cannot load LoRA adapter '{}': {max} adapters are loaded already, the maximum.",
                req.lora_name
            ));
        }
        loras.push((req.lora_name.clone(), req.lora_path.clone()));
    }
    tracing::info!(name = %req.lora_name, path = %req.lora_path, "loaded LoRA adapter");
    format!(
        "Success: LoRA adapter '{}' added successfully.",
        req.lora_name
    )
    .into_response()
}

async fn unload_lora(State(sim): State<Simulator>, body: Bytes) -> Response {
    let req: UnloadLora = match parse(&body) {
        Ok(r) => r,
        Err(e) => return bad_request(e),
    };
    if req.lora_name.is_empty() {
        return bad_request("'lora_name' needs to be provided to unload a LoRA adapter.");
    }
    {
        let mut loras = lock(&sim.inner.loras);
        let Some(i) = loras.iter().position(|(n, _)| *n == req.lora_name) else {
            return not_found(format!(
                "The lora adapter '{}' cannot be found.",
                req.lora_name
            ));
        };
        loras.remove(i);
    }
    tracing::info!(name = %req.lora_name, "unloaded LoRA adapter");
    format!(
        "Success: LoRA adapter '{}' removed successfully.",
        req.lora_name
    )
    .into_response()
}

async fn health() -> StatusCode {
    StatusCode::OK
}

async fn metrics(State(sim): State<Simulator>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        sim.metrics_text(),
    )
        .into_response()
}

/// Parses the samples of a Prometheus text exposition into
/// `series -> value`, where `series` is the text before the value (name and
/// labels as written). For tests and tools reading `/metrics`.
pub fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> SimConfig {
        SimConfig::new("m")
    }

    fn ms(d: Duration) -> f64 {
        d.as_secs_f64() * 1000.0
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6
    }

    #[test]
    fn defaults_validate() {
        let c = config();
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.max_batch, 16);
        assert!(close(c.prefill_ms_per_token, 0.2));
        assert!(close(c.itl_ms, 20.0));
        assert!(close(c.itl_batch_factor, 0.05));
        assert!(close(c.speed, 1.0));
        assert_eq!(c.max_tokens_default, 64);
        assert_eq!(c.max_loras, 4);
    }

    #[test]
    fn bad_configs_are_refused() {
        let cases: Vec<fn(&mut SimConfig)> = vec![
            |c| c.max_batch = 0,
            |c| c.speed = 0.0,
            |c| c.speed = -1.0,
            |c| c.speed = f64::NAN,
            |c| c.itl_ms = -1.0,
            |c| c.prefill_ms_per_token = f64::INFINITY,
            |c| c.itl_batch_factor = -0.1,
            |c| c.max_tokens_default = 0,
            |c| c.model.clear(),
        ];
        for change in cases {
            let mut c = config();
            change(&mut c);
            assert!(c.validate().is_err(), "{c:?}");
            assert!(Simulator::new(c).is_err());
        }
    }

    #[test]
    fn prompt_tokens_are_a_quarter_of_the_characters_rounded_up() {
        assert_eq!(prompt_tokens(0), 1);
        assert_eq!(prompt_tokens(1), 1);
        assert_eq!(prompt_tokens(4), 1);
        assert_eq!(prompt_tokens(5), 2);
        assert_eq!(prompt_tokens(400), 100);
        assert_eq!(prompt_tokens(401), 101);
    }

    #[test]
    fn content_text_takes_strings_and_text_parts() {
        let text = |v: Value| {
            let mut out = String::new();
            content_text(&v, &mut out);
            out
        };
        assert_eq!(text(json!("héllo")), "héllo");
        assert_eq!(
            text(json!([{"type": "text", "text": "abc"}, {"type": "image_url"}, "de"])),
            "abcde"
        );
        assert_eq!(text(Value::Null), "");
    }

    /// A text of `blocks` whole blocks of 16 tokens (64 characters each),
    /// block `i` filled with `fill(i)`.
    fn blocks_text(blocks: usize, fill: impl Fn(usize) -> char) -> String {
        (0..blocks)
            .map(|i| std::iter::repeat_n(fill(i), 64).collect::<String>())
            .collect()
    }

    #[test]
    fn block_hashes_chain_whole_blocks_of_the_prompt() {
        let a = blocks_text(3, |i| (b'a' + i as u8) as char);
        let h = prompt_block_hashes("m", &a, 16);
        assert_eq!(h.len(), 3);
        assert_eq!(h, prompt_block_hashes("m", &a, 16), "deterministic");
        // A partial block is not hashed: 3 blocks and 63 characters more.
        let longer = format!("{a}{}", "z".repeat(63));
        assert_eq!(prompt_block_hashes("m", &longer, 16), h);
        assert_eq!(prompt_block_hashes("m", &format!("{longer}z"), 16).len(), 4);
        // A shared prefix shares the hashes of its blocks, and only those.
        let b = format!("{}{}", &a[..128], "x".repeat(64));
        let hb = prompt_block_hashes("m", &b, 16);
        assert_eq!(hb[..2], h[..2]);
        assert_ne!(hb[2], h[2]);
        // A block's hash covers everything before it: the same third block
        // after a different first one hashes differently.
        let c = format!("{}{}", "q".repeat(64), &a[64..]);
        let hc = prompt_block_hashes("m", &c, 16);
        assert!(hc.iter().zip(&h).all(|(x, y)| x != y));
        // Another served model (an adapter) shares nothing.
        assert!(
            prompt_block_hashes("adapter", &a, 16)
                .iter()
                .zip(&h)
                .all(|(x, y)| x != y)
        );
        // Smaller blocks: more of them.
        assert_eq!(prompt_block_hashes("m", &a, 4).len(), 12);
        assert!(prompt_block_hashes("m", "", 16).is_empty());
    }

    #[test]
    fn the_prefix_cache_hits_a_shared_prefix_and_misses_a_different_one() {
        let mut cache = PrefixCache::new(16, 100);
        let a = blocks_text(4, |_| 's');
        let ha = prompt_block_hashes("m", &a, 16);
        let tokens = prompt_tokens(a.chars().count());
        assert_eq!(tokens, 64);
        assert_eq!(cache.lookup(&ha, tokens), 0, "cold");
        cache.insert(&ha);
        assert_eq!(cache.len(), 4);
        // The same prompt again: all but the last block, since the last
        // token is always computed.
        assert_eq!(cache.lookup(&ha, tokens), 48);
        // The same prompt and more: every block of it.
        let longer = format!("{a}{}", "u".repeat(10));
        let hl = prompt_block_hashes("m", &longer, 16);
        assert_eq!(cache.lookup(&hl, prompt_tokens(longer.chars().count())), 64);
        // Sharing the first two blocks only.
        let b = format!("{}{}", &a[..128], blocks_text(2, |_| 'd'));
        let hb = prompt_block_hashes("m", &b, 16);
        assert_eq!(cache.lookup(&hb, 64), 32);
        // Nothing shared at the start: no hit even though later text matches.
        let c = format!("{}{}", blocks_text(1, |_| 'x'), &a[64..]);
        let hc = prompt_block_hashes("m", &c, 16);
        assert_eq!(cache.lookup(&hc, 64), 0);
        // A prompt shorter than one block is never cached.
        let short = prompt_block_hashes("m", "hello", 16);
        cache.insert(&short);
        assert_eq!(cache.lookup(&short, prompt_tokens(5)), 0);
        assert_eq!(cache.len(), 4);
    }

    #[test]
    fn the_prefix_cache_evicts_the_least_recently_used_blocks_at_capacity() {
        let mut cache = PrefixCache::new(16, 4);
        let a = prompt_block_hashes("m", &blocks_text(3, |_| 'a'), 16);
        let b = prompt_block_hashes("m", &blocks_text(3, |_| 'b'), 16);
        cache.insert(&a);
        cache.insert(&b);
        assert_eq!(cache.len(), 4);
        // The older chain lost its tail first: its first block stays.
        assert!(cache.contains(a[0]));
        assert!(!cache.contains(a[1]) && !cache.contains(a[2]));
        assert!(b.iter().all(|h| cache.contains(*h)));
        // A hit makes blocks recent: a[0] is used, then a new chain evicts b's tail.
        assert_eq!(cache.lookup(&a, 100), 16);
        let c = prompt_block_hashes("m", &blocks_text(2, |_| 'c'), 16);
        cache.insert(&c);
        assert_eq!(cache.len(), 4);
        assert!(cache.contains(a[0]));
        assert!(cache.contains(b[0]));
        assert!(!cache.contains(b[1]) && !cache.contains(b[2]));
        assert!(c.iter().all(|h| cache.contains(*h)));
        // A chain longer than the cache keeps its first blocks.
        let mut small = PrefixCache::new(16, 2);
        small.insert(&a);
        assert!(small.contains(a[0]) && small.contains(a[1]) && !small.contains(a[2]));
        // No capacity: nothing is cached.
        let mut none = PrefixCache::new(16, 0);
        none.insert(&a);
        assert!(none.is_empty());
        assert_eq!(none.lookup(&a, 100), 0);
    }

    #[test]
    fn prefill_costs_only_the_uncached_tokens() {
        let c = config();
        assert_eq!(uncached_tokens(100, 0), 100);
        assert_eq!(uncached_tokens(100, 64), 36);
        assert_eq!(uncached_tokens(100, 100), 1, "the last token is computed");
        assert_eq!(uncached_tokens(10, 64), 1);
        let mut cache = PrefixCache::new(16, 100);
        let text = blocks_text(8, |_| 'p');
        let h = prompt_block_hashes("m", &text, 16);
        let tokens = prompt_tokens(text.chars().count());
        let cold = prefill_duration(&c, uncached_tokens(tokens, cache.lookup(&h, tokens)));
        cache.insert(&h);
        let warm = prefill_duration(&c, uncached_tokens(tokens, cache.lookup(&h, tokens)));
        assert!(close(ms(cold), 128.0 * 0.2));
        assert!(close(ms(warm), 16.0 * 0.2), "one block of 16 tokens left");
    }

    #[test]
    fn prefix_caching_is_off_by_default_and_block_size_must_be_positive() {
        let c = config();
        assert!(!c.prefix_caching);
        assert_eq!(c.block_size, 16);
        assert_eq!(c.prefix_cache_blocks, DEFAULT_PREFIX_CACHE_BLOCKS);
        let bad = SimConfig {
            block_size: 0,
            ..config()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn prefill_is_linear_in_prompt_tokens_and_divided_by_speed() {
        let mut c = config();
        assert!(close(ms(prefill_duration(&c, 100)), 20.0));
        assert!(close(ms(prefill_duration(&c, 1000)), 200.0));
        c.speed = 0.25;
        assert!(close(ms(prefill_duration(&c, 100)), 80.0));
        c.prefill_ms_per_token = 0.0;
        assert_eq!(prefill_duration(&c, 100), Duration::ZERO);
    }

    #[test]
    fn token_step_grows_with_the_batch() {
        let mut c = config();
        assert!(close(ms(token_step(&c, 1)), 20.0));
        // Zero running counts as one: the sequence asking is running.
        assert!(close(ms(token_step(&c, 0)), 20.0));
        assert!(close(ms(token_step(&c, 2)), 21.0));
        assert!(close(ms(token_step(&c, 16)), 20.0 * 1.75));
        let steps: Vec<_> = (1..=32).map(|b| token_step(&c, b)).collect();
        assert!(steps.windows(2).all(|w| w[0] < w[1]));
        c.speed = 0.6;
        assert!(close(ms(token_step(&c, 1)), 20.0 / 0.6));
        c.itl_batch_factor = 0.0;
        assert_eq!(token_step(&c, 1), token_step(&c, 100));
    }

    #[test]
    fn time_to_first_token_is_queue_plus_prefill_plus_one_step() {
        let c = config();
        let ttft = time_to_first_token(&c, Duration::from_millis(500), 100, 3);
        assert!(close(ms(ttft), 500.0 + 20.0 + 20.0 * 1.1));
        let total = service_duration(&c, 100, 10, 1);
        assert!(close(ms(total), 20.0 + 200.0));
        // Slower GPUs are slower.
        let slow = SimConfig {
            speed: 0.25,
            ..c.clone()
        };
        assert!(service_duration(&slow, 100, 10, 1) > total * 3);
    }

    #[test]
    fn utilization_saturates_at_half_the_batch() {
        assert!(close(utilization(0, 16), 0.0));
        assert!(close(utilization(4, 16), 0.5));
        assert!(close(utilization(8, 16), 1.0));
        assert!(close(utilization(16, 16), 1.0));
        assert!(close(utilization(100, 16), 1.0));
        assert!(close(utilization(1, 1), 1.0));
        assert!(close(utilization(0, 0), 0.0));
        for b in 1..20 {
            for r in 0..40 {
                let u = utilization(r, b);
                assert!((0.0..=1.0).contains(&u));
            }
        }
        assert!(close(kv_cache_usage(4, 16), 0.25));
        assert!(close(kv_cache_usage(40, 16), 1.0));
    }

    #[test]
    fn histograms_render_cumulative_buckets() {
        let mut h = Histogram::new(TTFT_BUCKETS);
        h.observe(0.003);
        h.observe(0.003);
        h.observe(0.3);
        h.observe(5000.0);
        let mut out = String::new();
        h.render(&mut out, "x", "help", "model_name=\"m\"");
        let samples = parse_metrics(&out);
        assert_eq!(samples["x_bucket{le=\"0.001\",model_name=\"m\"}"], 0.0);
        assert_eq!(samples["x_bucket{le=\"0.005\",model_name=\"m\"}"], 2.0);
        assert_eq!(samples["x_bucket{le=\"0.25\",model_name=\"m\"}"], 2.0);
        assert_eq!(samples["x_bucket{le=\"0.5\",model_name=\"m\"}"], 3.0);
        assert_eq!(samples["x_bucket{le=\"2560.0\",model_name=\"m\"}"], 3.0);
        assert_eq!(samples["x_bucket{le=\"+Inf\",model_name=\"m\"}"], 4.0);
        assert_eq!(samples["x_count{model_name=\"m\"}"], 4.0);
        assert!(close(samples["x_sum{model_name=\"m\"}"], 5000.306));
        assert!(out.contains("# TYPE x histogram\n"));
    }

    #[test]
    fn bucket_boundaries_are_vllms() {
        assert_eq!(TTFT_BUCKETS.len(), 22);
        assert_eq!(ITL_BUCKETS.len(), 19);
        assert_eq!(E2E_BUCKETS.len(), 21);
        for b in [TTFT_BUCKETS, ITL_BUCKETS, E2E_BUCKETS] {
            assert!(b.windows(2).all(|w| w[0] < w[1]));
        }
    }

    #[test]
    fn metrics_text_has_vllm_names_and_escaped_labels() {
        let text = Metrics::new().render("a\"b", 3, 2, 4);
        let samples = parse_metrics(&text);
        let l = "model_name=\"a\\\"b\"";
        assert_eq!(samples[&format!("vllm:num_requests_running{{{l}}}")], 3.0);
        assert_eq!(samples[&format!("vllm:num_requests_waiting{{{l}}}")], 2.0);
        assert_eq!(samples[&format!("vllm:kv_cache_usage_perc{{{l}}}")], 0.75);
        assert_eq!(samples[&format!("vllm:prompt_tokens_total{{{l}}}")], 0.0);
        assert_eq!(
            samples[&format!("vllm:generation_tokens_total{{{l}}}")],
            0.0
        );
        assert_eq!(
            samples[&format!("vllm:request_success_total{{finished_reason=\"length\",{l}}}")],
            0.0
        );
        assert_eq!(
            samples[&format!("vllm:prefix_cache_queries_total{{{l}}}")],
            0.0
        );
        assert_eq!(
            samples[&format!("vllm:prefix_cache_hits_total{{{l}}}")],
            0.0
        );
        for name in [
            "vllm:time_to_first_token_seconds",
            "vllm:inter_token_latency_seconds",
            "vllm:e2e_request_latency_seconds",
        ] {
            assert!(text.contains(&format!("# TYPE {name} histogram")), "{name}");
            assert_eq!(samples[&format!("{name}_count{{{l}}}")], 0.0);
        }
        assert!(text.contains("# TYPE vllm:prompt_tokens_total counter"));
        assert!(text.contains("# TYPE vllm:num_requests_running gauge"));
    }

    #[test]
    fn stream_events_for_chat_and_completions() {
        let out = |kind, include_usage| Output {
            id: "x".into(),
            created: 1,
            job: Job {
                kind,
                model: "m".into(),
                prompt_tokens: 3,
                completion_tokens: 2,
                stream: true,
                include_usage,
            },
        };
        let parse = |b: Bytes| -> Value {
            let s = String::from_utf8(b.to_vec()).expect("utf8");
            let json = s
                .strip_prefix("data: ")
                .and_then(|s| s.strip_suffix("\n\n"))
                .expect("one event");
            serde_json::from_str(json).expect("json")
        };
        let chat = out(Kind::Chat, false);
        let role = parse(chat.sse(SeqEvent::Admitted).expect("role chunk"));
        assert_eq!(role["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(role["choices"][0]["delta"]["content"], "");
        assert!(role.get("usage").is_none());
        let tok = parse(
            chat.sse(SeqEvent::Token {
                index: 1,
                last: true,
            })
            .expect("token"),
        );
        assert_eq!(tok["choices"][0]["delta"]["content"], " tok1");
        assert_eq!(tok["choices"][0]["finish_reason"], "length");
        assert_eq!(
            chat.sse(SeqEvent::Finished).expect("done"),
            Bytes::from("data: [DONE]\n\n")
        );

        let cmpl = out(Kind::Completion, true);
        assert_eq!(cmpl.sse(SeqEvent::Admitted), None);
        let tok = parse(
            cmpl.sse(SeqEvent::Token {
                index: 0,
                last: false,
            })
            .expect("token"),
        );
        assert_eq!(tok["object"], "text_completion");
        assert_eq!(tok["choices"][0]["text"], " tok0");
        assert_eq!(tok["choices"][0]["finish_reason"], Value::Null);
        assert_eq!(tok["usage"], Value::Null);
        let done =
            String::from_utf8(cmpl.sse(SeqEvent::Finished).expect("done").to_vec()).expect("utf8");
        let (usage, rest) = done.split_once("\n\n").expect("two events");
        assert_eq!(rest, "data: [DONE]\n\n");
        let usage: Value =
            serde_json::from_str(usage.trim_start_matches("data: ")).expect("usage json");
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["total_tokens"], 5);
    }

    #[test]
    fn an_engine_uses_the_gpus_its_container_sees() {
        let node = Some("GPU-a,GPU-b,GPU-c");
        let ok = |v: Option<&str>, n: Option<&str>| visible_gpus(v, n).expect("valid");
        for v in [None, Some(""), Some("none"), Some("void")] {
            assert!(ok(v, node).is_empty(), "{v:?}: no GPU requested");
        }
        assert_eq!(ok(Some("all"), node), ["GPU-a", "GPU-b", "GPU-c"]);
        assert_eq!(ok(Some("GPU-x, GPU-y"), None), ["GPU-x", "GPU-y"]);
        assert_eq!(
            ok(Some("2,GPU-a,0"), node),
            ["GPU-c", "GPU-a"],
            "deduplicated"
        );
        assert_eq!(ok(Some("MIG-1"), None), ["MIG-1"]);
        for (v, n) in [
            ("all", None),
            ("3", node),
            ("0", None),
            ("gpu0", node),
            ("GPU-a/../b", node),
        ] {
            assert!(visible_gpus(Some(v), n).is_err(), "{v} on {n:?}");
        }
    }

    #[test]
    fn the_load_goes_to_the_load_file_and_each_gpus_directory() {
        let both = SimConfig {
            load_file: Some("/run/load".into()),
            gpu_dir: Some("/node/gpus".into()),
            gpus: vec!["GPU-a".into(), "GPU-b".into()],
            ..config()
        };
        assert!(both.validate().is_ok());
        assert_eq!(
            both.load_paths(),
            [
                PathBuf::from("/run/load"),
                "/node/gpus/GPU-a/load".into(),
                "/node/gpus/GPU-b/load".into()
            ]
        );
        assert!(config_with_gpu("../x").validate().is_err());
        assert!(config().load_paths().is_empty());
    }

    fn config_with_gpu(uuid: &str) -> SimConfig {
        SimConfig {
            gpus: vec![uuid.into()],
            ..config()
        }
    }
}
