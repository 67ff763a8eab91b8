//! strata-sidecar: thin entry point.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use strata_sidecar::app::{App, Config};
use strata_sidecar::engine::EngineKind;
use strata_sidecar::metrics::Metrics;
use strata_sidecar::server::{self, Intervals};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Strata's inference sidecar: measures every request, meters the GPUs, loads adapters"
)]
struct Cli {
    /// Address of the OpenAI-compatible API (the pod's front door).
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Address of /metrics, /healthz, /readyz and the adapter API.
    #[arg(long, default_value = "0.0.0.0:9090")]
    admin_listen: SocketAddr,
    /// Base URL of the engine in the pod.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    engine_url: String,
    /// Which engine.
    #[arg(long, value_enum, default_value = "vllm")]
    engine: EngineKind,
    /// The engine's health path.
    #[arg(long, default_value = "/health")]
    engine_health_path: String,
    /// The engine's metrics path.
    #[arg(long, default_value = "/metrics")]
    engine_metrics_path: String,
    /// The base model's served name (the OpenAI `model` field).
    #[arg(long)]
    served_model: String,
    /// File with the adapter API's bearer token (a mounted Secret).
    #[arg(long, env = "STRATA_ADAPTER_TOKEN_FILE")]
    adapter_token_file: Option<PathBuf>,
    /// Directory (shared with the engine) for adapters fetched with their
    /// own credentials.
    #[arg(long)]
    adapter_dir: Option<PathBuf>,
    /// The Hugging Face hub.
    #[arg(long, env = "HF_ENDPOINT", default_value = "https://huggingface.co")]
    hf_endpoint: String,
    /// Path of libnvidia-ml.so.1 (default: the system's).
    #[arg(long, env = "STRATA_NVML_LIB")]
    nvml_lib: Option<String>,
    /// GPUs to meter: UUIDs or indices, `all` or `none` (default: NVIDIA_VISIBLE_DEVICES).
    #[arg(long, env = "NVIDIA_VISIBLE_DEVICES")]
    gpus: Option<String>,
    /// Seconds between NVML samples.
    #[arg(long, default_value_t = 1.0)]
    nvml_interval: f64,
    /// Seconds between engine metric scrapes.
    #[arg(long, default_value_t = 2.0)]
    engine_metrics_interval: f64,
    /// Seconds between engine health checks.
    #[arg(long, default_value_t = 1.0)]
    engine_health_interval: f64,
    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    log_format: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    if cli.log_format == "json" {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let metrics = match Metrics::new() {
        Ok(m) => m,
        Err(e) => {
            tracing::error!("metrics: {e}");
            return ExitCode::FAILURE;
        }
    };
    let secs = |s: f64| Duration::from_secs_f64(s.clamp(0.05, 3600.0));
    let _sampler = strata_sidecar::nvml::start(
        cli.nvml_lib.as_deref(),
        cli.gpus.clone(),
        secs(cli.nvml_interval),
        metrics.clone(),
    );
    let app = Arc::new(App::new(
        Config {
            engine_url: cli.engine_url.trim_end_matches('/').to_string(),
            engine: cli.engine,
            health_path: cli.engine_health_path,
            metrics_path: cli.engine_metrics_path,
            served_model: cli.served_model,
            adapter_token_file: cli.adapter_token_file,
            adapter_dir: cli.adapter_dir,
            hf_endpoint: cli.hf_endpoint,
        },
        metrics,
    ));
    let (api, admin) = match (
        server::bind(cli.listen).await,
        server::bind(cli.admin_listen).await,
    ) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!("binding {} / {}: {e}", cli.listen, cli.admin_listen);
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(api = %cli.listen, admin = %cli.admin_listen, engine = %app.config.engine_url, "strata-sidecar serving");
    let shutdown = async {
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutting down");
    };
    let intervals = Intervals {
        health: secs(cli.engine_health_interval),
        engine_metrics: secs(cli.engine_metrics_interval),
    };
    match server::run(app, api, admin, intervals, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("serving: {e}");
            ExitCode::FAILURE
        }
    }
}
