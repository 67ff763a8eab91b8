//! strata-sidecar: thin entry point.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use strata_net::server::ServerLimits;
use strata_sidecar::app::{App, Config, Limits, TlsFiles};
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
    /// Meter the GPUs this container sees through NVML (opt-in: a sidecar
    /// requests no GPU, so on a real node it sees none; the node agent or
    /// dcgm-exporter meters the pod's GPUs instead, see docs/energy.md).
    #[arg(long, env = "STRATA_METER_GPUS")]
    meter_gpus: bool,
    /// Path of libnvidia-ml.so.1 (default: the system's), with --meter-gpus.
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
    /// Seconds between checks that the engine still has its adapters
    /// (an engine restarted in the pod has lost them: they are reloaded).
    #[arg(long, default_value_t = 5.0)]
    adapter_check_interval: f64,
    /// Seconds between engine health checks.
    #[arg(long, default_value_t = 1.0)]
    engine_health_interval: f64,
    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    log_format: String,
    /// Largest request body, bytes.
    #[arg(long, default_value_t = 8 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1024..=1 << 30))]
    max_request_bytes: u64,
    /// Memory all request bodies held at once may use, bytes (beyond: 503).
    #[arg(long, default_value_t = 24 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1024..=1 << 34))]
    request_memory_bytes: u64,
    /// Requests in flight at most (beyond: 429 with Retry-After).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_concurrent_requests: u64,
    /// Open client connections at most, per port.
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_connections: u64,
    /// Seconds to receive a request's headers; also the idle keep-alive timeout.
    #[arg(long, default_value_t = 15.0)]
    header_read_timeout: f64,
    /// Seconds to receive a request body.
    #[arg(long, default_value_t = 30.0)]
    request_body_timeout: f64,
    /// Seconds the engine may stay silent (before and within an answer).
    #[arg(long, default_value_t = 600.0)]
    engine_timeout: f64,
    /// Largest server-sent event accepted from the engine, bytes.
    #[arg(long, default_value_t = 256 * 1024, value_parser = clap::value_parser!(u64).range(1024..=1 << 30))]
    max_sse_event_bytes: u64,
    /// Largest non-streamed answer read for its token counts, bytes.
    #[arg(long, default_value_t = 1024 * 1024, value_parser = clap::value_parser!(u64).range(0..=1 << 30))]
    max_response_parse_bytes: u64,
    /// Idle connections to the engine kept for the next requests at most
    /// (closed after --engine-idle-timeout). As many as requests in flight by default:
    /// fewer, and a burst of answers closes connections that the next burst
    /// opens again (an idle one costs a socket, no buffer).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    max_idle_engine_connections: u64,
    /// Seconds an idle connection to the engine is kept. Keep it below the
    /// engine's own keep-alive timeout (uvicorn, under vLLM and SGLang:
    /// 5 s), so the sidecar closes idle connections before the engine does.
    #[arg(long, default_value_t = 4.0)]
    engine_idle_timeout: f64,
    /// PEM certificate of the admin port (TLS; with --admin-tls-key-file).
    #[arg(long, requires = "admin_tls_key_file")]
    admin_tls_cert_file: Option<PathBuf>,
    /// PEM private key of the admin port.
    #[arg(long, requires = "admin_tls_cert_file")]
    admin_tls_key_file: Option<PathBuf>,

    /// Worker threads of the async runtime, as asked.
    /// Default: 2, or one per CPU when the container may use fewer; 0:
    /// one per CPU (without a CPU limit, every CPU of the node).
    /// A sidecar's work (one engine's requests) fits in two threads: 20,000
    /// proxied requests a second on this project's 2-core benchmark machine.
    #[arg(long, env = "STRATA_WORKER_THREADS")]
    worker_threads: Option<u16>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    strata_net::runtime::block_on(cli.worker_threads.map(usize::from), 2, run(cli))
}

async fn run(cli: Cli) -> ExitCode {
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
    let size = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
    let _sampler = if cli.meter_gpus {
        strata_sidecar::nvml::start(
            cli.nvml_lib.as_deref(),
            cli.gpus.clone(),
            secs(cli.nvml_interval),
            metrics.clone(),
        )
    } else {
        tracing::info!(
            "GPU metering off (the node agent or dcgm-exporter meters the pod's GPUs; --meter-gpus to meter the GPUs this container sees)"
        );
        None
    };
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
            limits: Limits {
                max_request_bytes: size(cli.max_request_bytes),
                request_memory_bytes: size(cli.request_memory_bytes),
                max_concurrent_requests: size(cli.max_concurrent_requests),
                request_body_timeout: secs(cli.request_body_timeout),
                max_response_parse_bytes: size(cli.max_response_parse_bytes),
                max_sse_event_bytes: size(cli.max_sse_event_bytes),
                engine_timeout: secs(cli.engine_timeout),
                server: ServerLimits {
                    max_connections: size(cli.max_connections),
                    header_read_timeout: secs(cli.header_read_timeout),
                    ..ServerLimits::default()
                },
                max_idle_engine_connections: size(cli.max_idle_engine_connections),
                engine_idle_timeout: secs(cli.engine_idle_timeout),
            },
            admin_tls: match (cli.admin_tls_cert_file, cli.admin_tls_key_file) {
                (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
                _ => None,
            },
        },
        metrics,
    ));
    if let Err(e) = app.engine.check() {
        tracing::error!("--engine-url: {e}");
        return ExitCode::FAILURE;
    }
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
        adapters: secs(cli.adapter_check_interval),
    };
    match server::run(app, api, admin, intervals, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("serving: {e}");
            ExitCode::FAILURE
        }
    }
}
