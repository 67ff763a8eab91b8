//! strata-gateway: the Models' front door. See docs/routing.md.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use clap::Parser;
use strata_gateway::metrics::Metrics;
use strata_gateway::proxy::{self, Gateway, Settings};
use strata_net::body::BodyLimits;
use tokio::signal::unix::{SignalKind, signal};

/// The Models' front door: one OpenAI-compatible endpoint that picks the
/// replica per request.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Address of the OpenAI endpoint.
    #[arg(long, env = "STRATA_GATEWAY_ADDR", default_value = "0.0.0.0:8080")]
    addr: SocketAddr,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(
        long,
        env = "STRATA_GATEWAY_METRICS_ADDR",
        default_value = "0.0.0.0:9090"
    )]
    metrics_addr: SocketAddr,
    /// Port of the replicas' sidecars (their OpenAI port).
    #[arg(long, default_value_t = 8080)]
    replica_port: u16,
    /// Characters of the prompt hashed for prefix affinity (0: off).
    #[arg(long, default_value_t = 256)]
    prefix_chars: usize,
    /// A replica takes a prefix's request while its load stays within this
    /// factor of the mean (at least 1).
    #[arg(long, default_value_t = 1.25)]
    load_factor: f64,
    /// A replica holding fewer requests than this always takes its
    /// prefix's requests, whatever the mean (0: the load factor alone).
    #[arg(long, default_value_t = 8)]
    spill_floor: u32,
    /// How the replica is picked: strata (prefix affinity with bounded
    /// load, else least loaded), or, for benchmarks and debugging, random
    /// (as a Service) or round-robin.
    #[arg(long, default_value_t = strata_core::routing::Policy::Strata)]
    policy: strata_core::routing::Policy,
    /// Other replicas tried after a connection failure, or a 502/503 from
    /// a replica going away (only before anything reached the client).
    #[arg(long, default_value_t = 2)]
    retries: usize,
    /// Seconds a replica's reported load (on its answers) is used; 0: never.
    #[arg(long, default_value_t = 3.0)]
    replica_load_ttl_seconds: f64,
    /// Seconds a 502 (or a 503 without Retry-After) from a replica still
    /// listed waits for the view to drop it before it is answered; if the
    /// view does, the request is tried on another replica. 0: no wait.
    #[arg(long, default_value_t = 1.0)]
    settle_seconds: f64,
    /// Seconds a request may wait for a replica of a Model at zero.
    #[arg(long, default_value_t = 600)]
    wait_timeout_seconds: u64,
    /// Requests that may wait for one Model (beyond: 503).
    #[arg(long, default_value_t = 1000)]
    max_waiting_per_model: usize,
    /// Requests that may wait in all (beyond: 503).
    #[arg(long, default_value_t = 4000)]
    max_waiting: usize,
    /// Largest request body, bytes.
    #[arg(long, default_value_t = 8 * 1024 * 1024)]
    max_request_bytes: usize,
    /// Seconds to receive a request body.
    #[arg(long, default_value_t = 30)]
    body_timeout_seconds: u64,
    /// Memory all request bodies held at once may take, bytes (beyond: 503).
    #[arg(long, default_value_t = 256 * 1024 * 1024)]
    body_budget_bytes: usize,
    /// Seconds for a replica's answer to begin.
    #[arg(long, default_value_t = 600)]
    upstream_timeout_seconds: u64,
    /// Seconds an answer may go without a byte before it is cut.
    #[arg(long, default_value_t = 300)]
    idle_timeout_seconds: u64,
    /// Open client connections at most.
    #[arg(long, default_value_t = 8192)]
    max_connections: usize,
    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    log_format: String,

    /// Worker threads of the async runtime, as asked.
    /// Default: one per CPU the container may use (without a CPU limit,
    /// every CPU of the node); 0 says the same.
    /// The gateway carries every Model's traffic: by default it uses every
    /// CPU it may (give its container a CPU limit to bound it).
    #[arg(long, env = "STRATA_WORKER_THREADS")]
    worker_threads: Option<u16>,
}

async fn stopped() {
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

#[derive(Clone)]
struct Health {
    gateway: Arc<Gateway>,
    metrics: Metrics,
}

async fn readyz(State(h): State<Health>) -> (StatusCode, &'static str) {
    if h.gateway.synced() {
        (StatusCode::OK, "ok")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the view of the cluster is not ready",
        )
    }
}

async fn metrics(State(h): State<Health>) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        h.metrics.render(),
    )
}

/// Why the gateway stopped.
#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("no Kubernetes client: {0}")]
    Kube(#[from] kube::Error),
    #[error("listening on {0}: {1}")]
    Listen(SocketAddr, #[source] std::io::Error),
    #[error("serving: {0}")]
    Serve(std::io::Error),
}

async fn listen(addr: SocketAddr) -> Result<tokio::net::TcpListener, MainError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| MainError::Listen(addr, e))
}

async fn run(cli: Cli) -> Result<(), MainError> {
    let metrics = Metrics::new()?;
    let client = kube::Client::try_default().await?;
    let settings = Settings {
        prefix_chars: cli.prefix_chars,
        routing: strata_core::routing::Settings {
            load_factor: cli.load_factor.max(1.0),
            spill_floor: cli.spill_floor,
            policy: cli.policy,
            ..strata_core::routing::Settings::default()
        },
        retries: cli.retries,
        wait_timeout: Duration::from_secs(cli.wait_timeout_seconds),
        max_waiting_per_model: cli.max_waiting_per_model,
        max_waiting: cli.max_waiting,
        body: BodyLimits {
            max_bytes: cli.max_request_bytes,
            timeout: Duration::from_secs(cli.body_timeout_seconds),
        },
        body_budget: cli.body_budget_bytes,
        upstream_timeout: Duration::from_secs(cli.upstream_timeout_seconds),
        idle_timeout: Duration::from_secs(cli.idle_timeout_seconds),
        signal_ttl: Duration::try_from_secs_f64(cli.replica_load_ttl_seconds)
            .unwrap_or(Duration::ZERO),
        settle: Duration::try_from_secs_f64(cli.settle_seconds).unwrap_or(Duration::ZERO),
        server: strata_net::server::ServerLimits {
            max_connections: cli.max_connections,
            ..strata_net::server::ServerLimits::default()
        },
        ..Settings::default()
    };
    let listener = listen(cli.addr).await?;
    let admin = listen(cli.metrics_addr).await?;
    let snapshots = strata_gateway::cluster::snapshots(client.clone(), cli.replica_port);
    let gateway = Gateway::new(
        snapshots,
        strata_gateway::cluster::waker(client),
        settings,
        metrics.clone(),
    );
    let health = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(self::metrics))
        .with_state(Health {
            gateway: gateway.clone(),
            metrics,
        });
    tokio::spawn(async move {
        let limits = strata_net::server::ServerLimits {
            max_connections: 64,
            ..strata_net::server::ServerLimits::default()
        };
        if let Err(e) = strata_net::server::serve(admin, health, limits, None, stopped()).await {
            tracing::error!("the metrics port failed: {e}");
        }
    });
    tracing::info!(addr = %cli.addr, policy = %cli.policy, "serving /v1/... for every Model and /models/<namespace>/<model>/v1/...");
    proxy::serve(listener, gateway, stopped())
        .await
        .map_err(MainError::Serve)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    strata_net::runtime::block_on(cli.worker_threads.map(usize::from), 0, start(cli))
}

/// Logs, then [`run`], its error logged.
async fn start(cli: Cli) -> ExitCode {
    let logs = tracing_subscriber::fmt().with_env_filter(
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
    );
    if cli.log_format == "json" {
        logs.json().init();
    } else {
        logs.init();
    }
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
