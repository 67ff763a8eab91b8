//! strata-operator: thin entry point. Parses flags, checks the CRDs, serves
//! health and metrics, elects a leader, runs the controllers, shuts down
//! gracefully on SIGTERM.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use clap::Parser;
use kube::api::ListParams;
use kube::{Api, Client};
use strata_core::template::Settings;
use strata_crds::{GPUPool, Model};
use strata_operator::controller::{self, Config};
use strata_operator::fence::{Fence, FenceLayer};
use strata_operator::leader::{Elector, LeaseConfig};
use strata_operator::metrics::Metrics;
use strata_operator::ratelimit::{Lanes, RateLimit, RateLimitLayer};
use strata_operator::server::{self, Health};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser, Debug)]
#[command(
    version,
    // A flag given again wins (the chart's `extraArgs` come after its own).
    args_override_self = true,
    about = "Strata: places foundation models on NVIDIA GPU pools and keeps them inside their SLAs"
)]
struct Cli {
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "STRATA_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Elect a leader through a Lease (run two replicas; one reconciles).
    #[arg(long, env = "STRATA_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Name of the leader Lease.
    #[arg(long, default_value = "strata-operator")]
    lease_name: String,
    /// Namespace of the leader Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "strata-system")]
    lease_namespace: String,
    /// Name of the Secret, in the operator's namespace (--lease-namespace),
    /// that holds the CA of the sidecars' admin TLS (created if absent).
    #[arg(long, default_value = strata_operator::pki::DEFAULT_CA_SECRET)]
    ca_secret: String,
    /// Seconds a Lease lasts without renewal.
    #[arg(long, default_value_t = 15)]
    lease_duration_seconds: u64,
    /// This instance's identity (its pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Image of strata-sidecar, added to every model pod.
    #[arg(long, env = "STRATA_SIDECAR_IMAGE", default_value = concat!("ghcr.io/strata-ai/strata-sidecar:", env!("CARGO_PKG_VERSION")))]
    sidecar_image: String,
    /// Label added to every model pod, KEY=VALUE (repeatable).
    #[arg(long = "pod-label", value_parser = parse_label)]
    pod_labels: Vec<(String, String)>,
    /// Seconds a replica may stay Unschedulable before it is placed elsewhere.
    #[arg(long, default_value_t = 30)]
    unschedulable_grace_seconds: u64,
    /// Seconds a replica's node may stay NotReady (after the node lifecycle
    /// controller marked it so) before the replica is placed elsewhere.
    #[arg(long, default_value_t = 30)]
    node_lost_grace_seconds: u64,
    /// Seconds between reconciles of converged objects.
    #[arg(long, default_value_t = 60)]
    resync_seconds: u64,
    /// Address of the activator (the front that holds requests for a Model
    /// at zero until a replica is ready), e.g. 0.0.0.0:8081; empty (the
    /// default) disables it. The chart sets it when activator.enabled.
    #[arg(long, default_value = "")]
    activator_addr: String,
    /// Seconds a request may wait at the activator for a replica.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=3600))]
    activator_timeout_seconds: u64,
    /// Requests that may wait at the activator for one Model (beyond: 503).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    activator_max_waiting_per_model: u64,
    /// Requests that may wait at the activator in all (beyond: 503).
    #[arg(long, default_value_t = 4000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    activator_max_waiting: u64,
    /// Largest request body the activator forwards, bytes.
    #[arg(long, default_value_t = 8 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1024..=1 << 30))]
    activator_max_request_bytes: u64,
    /// Requests per second the operator may send to the API server on
    /// average (the Lease's renewals excluded), like client-go's QPS.
    /// 200 and a burst of 300 are Karpenter's defaults, the other
    /// controller that creates a fleet's pods at once; the API server's
    /// flow control is what shares it between clients (docs/operator.md).
    #[arg(long, env = "STRATA_KUBE_API_QPS", default_value_t = 200.0, value_parser = qps)]
    kube_api_qps: f64,
    /// Requests that may go at once before the QPS applies (client-go's burst).
    #[arg(long, env = "STRATA_KUBE_API_BURST", default_value_t = 300, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    kube_api_burst: u32,
    /// Model reconciles that may run at once (as kube-controller-manager's
    /// `--concurrent-deployment-syncs`): more Models wait in the queue, so
    /// that a thousand applied at once are worked through in order rather
    /// than all interleaved on the rate limiter. A reconcile hands its
    /// writes to the background and only computes, so more reconciles than
    /// cores only queue for them: at 1,000 Models on 2 cores, 8 took the
    /// reconcile p99 from 62 to 39 ms with the same time to Ready as 32.
    #[arg(long, env = "STRATA_CONCURRENT_MODEL_RECONCILES", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=1024))]
    concurrent_model_reconciles: u16,
    /// Seconds between readings of the replicas' GPU energy counters.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=3600))]
    energy_interval_seconds: u64,
    /// Where the GPUs' energy, power and utilization are read: `node-agent`
    /// (strata-node-agent on each GPU node), `dcgm` (dcgm-exporter through
    /// Prometheus) or `sidecar` (each replica's sidecar; it sees GPUs only
    /// where the node lets it).
    #[arg(long, value_enum, default_value = "node-agent")]
    gpu_telemetry: strata_operator::controller::telemetry::Source,
    /// The node agents' metrics port (their pods are found by label in the
    /// operator's namespace).
    #[arg(long, default_value_t = 9402)]
    node_agent_port: u16,
    /// The Prometheus that scrapes dcgm-exporter, for `--gpu-telemetry=dcgm`.
    #[arg(long)]
    dcgm_prometheus_url: Option<String>,
    /// Credentials of the Prometheus servers queried (Models' metrics
    /// sources, `--dcgm-prometheus-url`): a YAML file of `endpoints`, each
    /// an https URL with `bearerToken`, `bearerTokenFile` or `basicAuth`;
    /// a query gets the credentials of the endpoint its URL is under, and
    /// no other (docs/autoscaling.md). Read again when it changes.
    #[arg(long, env = "STRATA_PROMETHEUS_AUTH_FILE")]
    prometheus_auth_file: Option<std::path::PathBuf>,
    /// Log format: text or json.
    #[arg(long, env = "STRATA_LOG_FORMAT", default_value = "text")]
    log_format: String,

    /// Worker threads of the async runtime, as asked.
    /// Default: 4, or one per CPU when the container may use fewer; 0:
    /// one per CPU (without a CPU limit, every CPU of the node).
    /// The operator's work (reconciles reading caches, API requests) fits in
    /// a few threads: 1,000 Models converged on two.
    #[arg(long, env = "STRATA_WORKER_THREADS")]
    worker_threads: Option<u16>,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

async fn check_crds(client: &Client) -> Result<(), String> {
    let lp = ListParams::default().limit(1);
    let hint = "install them with `kubectl apply --server-side -f charts/strata/crds/` (or `helm install strata charts/strata`)";
    if let Err(e) = Api::<Model>::all(client.clone()).list(&lp).await {
        return Err(match e {
            kube::Error::Api(ae) if ae.code == 404 => {
                format!("the Model CRD (models.strata.ai) is not installed; {hint}")
            }
            other => format!("listing Models failed: {other}"),
        });
    }
    if let Err(e) = Api::<GPUPool>::all(client.clone()).list(&lp).await {
        return Err(match e {
            kube::Error::Api(ae) if ae.code == 404 => {
                format!("the GPUPool CRD (gpupools.strata.ai) is not installed; {hint}")
            }
            other => format!("listing GPUPools failed: {other}"),
        });
    }
    Ok(())
}

/// `--kube-api-qps`: 0.1 to 100,000.
fn qps(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.1..=100_000.0).contains(&v) => Ok(v),
        _ => Err(format!("must be a number between 0.1 and 100000, got {s}")),
    }
}

/// The fenced, rate-limited client (everything but the Lease) and the
/// elector's.
///
/// kube-client retries a 429, 503 or 504 answer inside its own stack, below
/// any layer added here: a retried write would leave without passing the
/// fence again (seconds later, perhaps after the lease was lost), without
/// a token of the bucket and uncounted. So its retry is off and the same
/// policy (server-aware: `Retry-After`, exponential backoff, 15 tries)
/// wraps the fence and the bucket instead: every attempt is fenced,
/// rate-limited and counted. (A buffer beneath makes the stack cloneable,
/// as a retry needs. ratelimit's unit tests build the same order.)
async fn clients(fence: &Fence, limit: &RateLimit) -> Result<(Client, Client), kube::Error> {
    let config = kube::Config::infer()
        .await
        .map_err(kube::Error::InferConfig)?;
    let mut controllers = config.clone();
    controllers.default_retry = false;
    let fenced = kube::client::ClientBuilder::try_from(controllers)?
        .with_layer(&tower::buffer::BufferLayer::new(1024))
        .with_layer(&FenceLayer(fence.clone()))
        .with_layer(&RateLimitLayer(limit.clone()))
        .with_layer(&tower::retry::RetryLayer::new(
            kube::client::retry::RetryPolicy::server_retry(),
        ))
        .build();
    Ok((fenced, Client::try_from(config)?))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    strata_net::runtime::block_on(cli.worker_threads.map(usize::from), 4, run(cli))
}

/// Installs the Prometheus credentials of `--prometheus-auth-file`, if
/// given; false (the reason logged) when the file is not valid.
fn prometheus_credentials(path: Option<&std::path::Path>) -> bool {
    let Some(path) = path else {
        return true;
    };
    match strata_operator::prometheus_auth::install(path) {
        Ok(n) => {
            tracing::info!(path = %path.display(), endpoints = n, "Prometheus credentials");
            true
        }
        Err(e) => {
            tracing::error!("--prometheus-auth-file: {e}");
            false
        }
    }
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

    if !prometheus_credentials(cli.prometheus_auth_file.as_deref()) {
        return ExitCode::FAILURE;
    }
    let metrics = match Metrics::new() {
        Ok(m) => m,
        Err(e) => {
            tracing::error!("metrics: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Two clients: the elector's (it writes the Lease) and everyone else's,
    // whose writes are fenced while this instance does not hold a current
    // lease (see strata_operator::fence). Without election the fence is open.
    let fence = if cli.leader_elect {
        Fence::elected()
    } else {
        Fence::open()
    };
    // Every request but the Lease's waits for a token bucket (client-go's
    // QPS and burst), so that no burst of work can starve the API server.
    let limit = match RateLimit::new(cli.kube_api_qps, cli.kube_api_burst)
        .and_then(|l| l.register(&metrics.registry).map(|()| l))
    {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("metrics: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Status writes and Events yield to the other requests while the
    // bucket is busy (see strata_operator::ratelimit::Lanes).
    let lanes = match Lanes::new(Some(limit.clone()))
        .and_then(|l| l.register(&metrics.registry).map(|()| l))
    {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("metrics: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (client, lease_client) = match clients(&fence, &limit).await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("no Kubernetes client configuration: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = check_crds(&client).await {
        tracing::error!("{e}");
        return ExitCode::FAILURE;
    }
    // The CA of the sidecars' admin TLS: the same for every replica.
    // Every replica, before the election: the CA is made once (a create that
    // loses the race reads the winner's), through the unfenced client.
    let ca =
        match strata_operator::pki::ensure_ca(&lease_client, &cli.lease_namespace, &cli.ca_secret)
            .await
        {
            Ok(ca) => Arc::new(ca),
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::FAILURE;
            }
        };

    let identity = cli
        .identity
        .clone()
        .unwrap_or_else(|| format!("strata-operator-{}", std::process::id()));
    let ready = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let health = Health {
        ready: ready.clone(),
        metrics: metrics.clone(),
    };
    let server = tokio::spawn(server::serve(
        cli.metrics_addr,
        health,
        stopped(stop_rx.clone()),
    ));
    if !cli.activator_addr.is_empty() {
        match cli.activator_addr.parse::<SocketAddr>() {
            Ok(addr) => {
                let size = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
                let limits = strata_operator::activator::Limits {
                    timeout: Duration::from_secs(cli.activator_timeout_seconds),
                    max_waiting_per_model: size(cli.activator_max_waiting_per_model),
                    max_waiting: size(cli.activator_max_waiting),
                    max_request_bytes: size(cli.activator_max_request_bytes),
                    ..strata_operator::activator::Limits::default()
                };
                // Every replica serves the activator, standbys too: its one
                // write (the wake annotation, at most one per Model per 30 s)
                // asks the leader for a replica, so it is not fenced.
                let activator = strata_operator::activator::Activator::new(
                    lease_client.clone(),
                    limits,
                    metrics.clone(),
                );
                let stop = stopped(stop_rx.clone());
                tokio::spawn(async move {
                    if let Err(e) = strata_operator::activator::serve(addr, activator, stop).await {
                        tracing::error!(%addr, "the activator cannot serve: {e}");
                    }
                });
            }
            Err(e) => {
                tracing::error!("--activator-addr {:?}: {e}", cli.activator_addr);
                return ExitCode::FAILURE;
            }
        }
    }
    tokio::spawn(async move {
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
        let _ = stop_tx.send(true);
    });

    let config = Config {
        template: Settings {
            sidecar_image: cli.sidecar_image.clone(),
            extra_pod_labels: cli.pod_labels.iter().cloned().collect::<BTreeMap<_, _>>(),
        },
        unschedulable_grace: cli.unschedulable_grace_seconds,
        node_lost_grace: cli.node_lost_grace_seconds,
        resync: Duration::from_secs(cli.resync_seconds),
        model_workers: cli.concurrent_model_reconciles,
        energy_interval: Duration::from_secs(cli.energy_interval_seconds),
        ca,
        telemetry: strata_operator::controller::TelemetryConfig {
            source: cli.gpu_telemetry,
            agent_namespace: cli.lease_namespace.clone(),
            agent_port: cli.node_agent_port,
            dcgm_url: cli.dcgm_prometheus_url.clone(),
        },
    };

    let elector = cli.leader_elect.then(|| {
        Elector::new(
            lease_client.clone(),
            LeaseConfig {
                name: cli.lease_name.clone(),
                namespace: cli.lease_namespace.clone(),
                identity: identity.clone(),
                duration: Duration::from_secs(cli.lease_duration_seconds),
            },
            fence.clone(),
        )
    });
    let mut code = ExitCode::SUCCESS;
    if let Some(elector) = &elector {
        // A standby is healthy and ready to serve its endpoints; it just does not reconcile.
        ready.store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(identity = %identity, lease = %cli.lease_name, "waiting to lead");
        tokio::select! {
            _ = elector.acquire() => {}
            _ = stopped(stop_rx.clone()) => {
                let _ = server.await;
                return code;
            }
        }
        tracing::info!(identity = %identity, "leading");
        metrics.leader.set(1);
        ready.store(false, std::sync::atomic::Ordering::Relaxed);
    }
    let controllers = controller::run(
        client.clone(),
        metrics.clone(),
        config,
        lanes,
        identity,
        ready,
        stopped(stop_rx.clone()),
    );
    match &elector {
        Some(elector) => {
            tokio::select! {
                _ = controllers => {}
                _ = elector.hold() => {
                    tracing::error!("lost leadership; exiting so that a standby takes over");
                    code = ExitCode::FAILURE;
                }
            }
            metrics.leader.set(0);
            elector.release().await;
        }
        None => controllers.await,
    }
    server.abort();
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flag_given_again_wins_and_labels_accumulate() {
        let cli = Cli::try_parse_from([
            "strata-operator",
            "--resync-seconds=300",
            "--pod-label=a=1",
            "--resync-seconds=10",
            "--pod-label=b=2",
        ])
        .expect("parses");
        assert_eq!(cli.resync_seconds, 10);
        assert_eq!(cli.pod_labels.len(), 2);
    }
}
