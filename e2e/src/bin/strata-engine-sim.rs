//! strata-engine-sim: an inference engine simulator speaking vLLM's
//! OpenAI-compatible HTTP API with a latency model (FIFO queueing, prefill
//! time, inter-token latency growing with the batch), so that load produces
//! SLA pressure. See `strata_e2e::sim`. Test and demo only; never in a
//! product image.
//!
//! `strata-engine-sim --listen 127.64.0.5:8000 --model llama-3-8b --speed 0.6`
//!
//! It also takes the command line the operator gives a vLLM engine container
//! (`--model <repo> --host <ip> --port <port> --served-model-name <name>
//! --tensor-parallel-size N --enable-lora --max-loras N ...`, and the
//! samples' `--max-model-len` and `--gpu-memory-utilization`, ignored), so that its
//! image (`localhost/strata-engine-sim`) can stand in for vLLM's in a Model;
//! a repeated flag takes its last value (test knobs appended by the world).
//!
//! `--enable-prefix-caching` (vLLM's flag; `--no-enable-prefix-caching`
//! turns it off again) makes prefill cost only the part of the prompt that
//! is not in the engine's prefix cache, an LRU of `--num-gpu-blocks-override`
//! KV blocks of `--block-size` tokens (see `strata_e2e::sim`). Off by
//! default here, unlike vLLM V1, so that tests that repeat one prompt keep
//! the plain latency model.
//!
//! `--gpu-dir DIR` publishes its load to `DIR/<uuid>/load` for each GPU its
//! container sees (`NVIDIA_VISIBLE_DEVICES`), for the fake NVML library's
//! per-device mode.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use strata_e2e::sim::{self, SimConfig};

#[derive(Parser)]
#[command(
    about = "Simulated vLLM engine for Strata's tests and demo",
    args_override_self = true
)]
struct Cli {
    /// Address to listen on (the pod IP and a port); or `--host` and `--port`.
    #[arg(long, required_unless_present = "port")]
    listen: Option<SocketAddr>,
    /// vLLM's `--host` (with `--port`, instead of `--listen`).
    #[arg(long, default_value = "0.0.0.0")]
    host: std::net::IpAddr,
    /// vLLM's `--port`.
    #[arg(long)]
    port: Option<u16>,
    /// Served model name (with `--served-model-name`, as vLLM: the model
    /// repository or path, then only reported).
    #[arg(long)]
    model: String,
    /// vLLM's served model name (wins over `--model`).
    #[arg(long)]
    served_model_name: Option<String>,
    /// vLLM's flags that change nothing in the simulation (accepted so that
    /// the operator's command line runs as is).
    #[arg(long)]
    tensor_parallel_size: Option<u32>,
    #[arg(long)]
    revision: Option<String>,
    #[arg(long)]
    enable_lora: bool,
    #[arg(long)]
    max_lora_rank: Option<u32>,
    /// vLLM's memory flags (the samples' engine args), accepted and
    /// ignored: the simulation sizes its KV cache in blocks.
    #[arg(long)]
    max_model_len: Option<u32>,
    #[arg(long)]
    gpu_memory_utilization: Option<f64>,
    /// Reuse the KV blocks of cached prompt prefixes (vLLM's automatic
    /// prefix caching): prefill costs only the uncached part.
    #[arg(long, overrides_with = "no_enable_prefix_caching")]
    enable_prefix_caching: bool,
    /// Turn prefix caching off (the default here).
    #[arg(long, overrides_with = "enable_prefix_caching")]
    no_enable_prefix_caching: bool,
    /// Tokens per KV block (vLLM's default, 16).
    #[arg(long, default_value_t = 16)]
    block_size: u32,
    /// KV blocks the prefix cache holds (vLLM computes this from the GPU's
    /// memory; here it is given).
    #[arg(long, default_value_t = sim::DEFAULT_PREFIX_CACHE_BLOCKS)]
    num_gpu_blocks_override: usize,
    /// Most sequences running at once; the others queue, first in first out.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Most sequences prefilling at once (0: no limit); the others wait
    /// their turn, first in first out (1: the GPU's prompt tokens per
    /// second are shared, as on a real GPU).
    #[arg(long, default_value_t = 0)]
    prefill_concurrency: usize,
    /// Seconds an idle keep-alive connection stays open, from vLLM's
    /// environment variable (uvicorn's `timeout_keep_alive`, 5 s).
    #[arg(long, env = "VLLM_HTTP_TIMEOUT_KEEP_ALIVE", default_value_t = 5)]
    http_timeout_keep_alive: u64,
    /// Prefill time per prompt token, in milliseconds (at speed 1).
    #[arg(long, default_value_t = 0.2)]
    prefill_ms_per_token: f64,
    /// Time per output token with a batch of one, in milliseconds (at speed 1).
    #[arg(long, default_value_t = 20.0)]
    itl_ms: f64,
    /// Growth of the time per output token with the batch:
    /// itl = itl-ms * (1 + factor * (batch - 1)).
    #[arg(long, default_value_t = 0.05)]
    itl_batch_factor: f64,
    /// GPU speed factor; durations are divided by it (H100 1.0, A100 0.6, L4 0.25).
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    /// Output tokens when a request does not say max_tokens.
    #[arg(long, default_value_t = 64)]
    max_tokens_default: u32,
    /// File to publish the simulated GPU utilization to (for the fake NVML library).
    #[arg(long)]
    load_file: Option<PathBuf>,
    /// The node's GPU state directory (the fake NVML library's per-device
    /// mode): the utilization is published to `DIR/<uuid>/load` for each
    /// GPU of NVIDIA_VISIBLE_DEVICES (UUIDs; `all` and indices resolve
    /// against STRATA_FAKE_NVML_DEVICES).
    #[arg(long, value_name = "DIR")]
    gpu_dir: Option<PathBuf>,
    /// Most LoRA adapters loaded at once.
    #[arg(long, default_value_t = 4)]
    max_loras: usize,
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot watch SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
    tracing::info!("shutting down");
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    let listen = match (cli.listen, cli.port) {
        (Some(l), _) => l,
        (None, Some(port)) => SocketAddr::new(cli.host, port),
        (None, None) => {
            tracing::error!("--listen or --port is required");
            return ExitCode::from(2);
        }
    };
    tracing::debug!(
        repository = %cli.model,
        tensor_parallel = ?cli.tensor_parallel_size,
        revision = ?cli.revision,
        lora = cli.enable_lora,
        max_lora_rank = ?cli.max_lora_rank,
        max_model_len = ?cli.max_model_len,
        gpu_memory_utilization = ?cli.gpu_memory_utilization,
        prefix_caching = cli.enable_prefix_caching,
        "vLLM flags accepted"
    );
    let gpus = if cli.gpu_dir.is_some() {
        let visible = std::env::var("NVIDIA_VISIBLE_DEVICES").ok();
        let node = std::env::var("STRATA_FAKE_NVML_DEVICES").ok();
        match sim::visible_gpus(visible.as_deref(), node.as_deref()) {
            Ok(g) if g.is_empty() => {
                tracing::warn!(
                    "--gpu-dir is set but NVIDIA_VISIBLE_DEVICES names no GPU: no GPU load is published"
                );
                g
            }
            Ok(g) => g,
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::from(2);
            }
        }
    } else {
        Vec::new()
    };
    let config = SimConfig {
        model: cli.served_model_name.clone().unwrap_or(cli.model),
        max_batch: cli.max_batch,
        prefill_ms_per_token: cli.prefill_ms_per_token,
        itl_ms: cli.itl_ms,
        itl_batch_factor: cli.itl_batch_factor,
        speed: cli.speed,
        max_tokens_default: cli.max_tokens_default,
        load_file: cli.load_file,
        gpu_dir: cli.gpu_dir,
        gpus,
        max_loras: cli.max_loras,
        prefix_caching: cli.enable_prefix_caching && !cli.no_enable_prefix_caching,
        block_size: cli.block_size,
        prefix_cache_blocks: cli.num_gpu_blocks_override,
        prefill_concurrency: cli.prefill_concurrency,
        keep_alive: std::time::Duration::from_secs(cli.http_timeout_keep_alive),
    };
    if let Err(e) = config.validate() {
        tracing::error!("invalid configuration: {e}");
        return ExitCode::from(2);
    }
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("listen {}: {e}", listen);
            return ExitCode::from(2);
        }
    };
    tracing::info!(
        listen = %listen,
        model = %config.model,
        max_batch = config.max_batch,
        speed = config.speed,
        prefix_caching = config.prefix_caching,
        block_size = config.block_size,
        prefix_cache_blocks = config.prefix_cache_blocks,
        gpus = ?config.gpus,
        "engine simulator serving"
    );
    match sim::serve(listener, config, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("serve: {e}");
            ExitCode::FAILURE
        }
    }
}
