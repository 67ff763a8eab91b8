//! strata-node-agent: thin entry point (flags, logs, signals).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use strata_node_agent::agent::{self, Config};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Strata's node agent: NVML for every GPU of the node, the kubelet's PodResources for who holds each, on /metrics"
)]
struct Cli {
    /// The NVML library: a path, or a name the dynamic loader finds.
    #[arg(long, env = "STRATA_NVML_LIB", default_value = "libnvidia-ml.so.1")]
    nvml_lib: String,
    /// The kubelet's PodResources socket.
    #[arg(long, default_value = strata_podresources::KUBELET_SOCKET)]
    pod_resources_socket: PathBuf,
    /// The node's name (the `Hostname` label); default: the host name.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:9402")]
    listen: SocketAddr,
    /// Seconds between samples (fractions allowed, 0.05 to 3600).
    #[arg(long, default_value_t = 5.0)]
    interval_seconds: f64,
    /// Seconds a container's energy series stays after it last held a GPU.
    #[arg(long, default_value_t = 600.0)]
    pod_retention_seconds: f64,
    /// Apply the GPUPools' `powerCapWatts` to this node's GPUs through NVML
    /// (watches its Node and the GPUPools; needs root on the node).
    #[arg(long, env = "STRATA_APPLY_POWER_CAPS")]
    apply_power_caps: bool,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,

    /// Worker threads of the async runtime, as asked.
    /// Default: 2, or one per CPU when the container may use fewer; 0:
    /// one per CPU (without a CPU limit, every CPU of the node).
    /// The agent's work (NVML and the kubelet every few seconds, scrapes)
    /// fits in two threads.
    #[arg(long, env = "STRATA_WORKER_THREADS")]
    worker_threads: Option<u16>,
}

fn seconds(flag: &str, v: f64, min: f64, max: f64) -> Result<Duration, String> {
    if v.is_finite() && (min..=max).contains(&v) {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(format!("--{flag} must be between {min} and {max}, got {v}"))
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    strata_net::runtime::block_on(cli.worker_threads.map(usize::from), 2, run(cli))
}

async fn run(cli: Cli) -> ExitCode {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    match cli.log_format {
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
    }
    let durations =
        seconds("interval-seconds", cli.interval_seconds, 0.05, 3600.0).and_then(|interval| {
            seconds(
                "pod-retention-seconds",
                cli.pod_retention_seconds,
                0.0,
                86400.0,
            )
            .map(|retention| (interval, retention))
        });
    let (interval, pod_retention) = match durations {
        Ok(d) => d,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    let node_name = cli
        .node_name
        .filter(|n| !n.is_empty())
        .unwrap_or_else(host_name);
    let config = Config {
        nvml_lib: cli.nvml_lib,
        pod_resources_socket: cli.pod_resources_socket,
        node_name,
        interval,
        pod_retention,
        apply_power_caps: cli.apply_power_caps,
    };
    let listener = match agent::listen(cli.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    tracing::info!(
        listen = %cli.listen,
        node = %config.node_name,
        nvml = %config.nvml_lib,
        pod_resources = %config.pod_resources_socket.display(),
        interval = ?config.interval,
        power_caps = config.apply_power_caps,
        "node agent serving"
    );
    match agent::run(config, listener, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
