//! The energy accountant's GPU readings, thin shell over
//! [`strata_core::telemetry`]: each round, every ready `strata-node-agent`
//! (one per GPU node; its pods found by label in the operator's namespace)
//! is scraped, 32 at a time, each within a timeout and a size limit; or
//! dcgm-exporter's fields are read from Prometheus; or (the old way, for
//! clusters without either) the sidecars' own NVML readings are used.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::Store;
use strata_core::powercap::GpuLimit;
use strata_core::telemetry::{self, ByPod};

use super::prometheus;

/// The label the node agent's pods carry (the chart's DaemonSet).
pub const AGENT_SELECTOR: &str = "app.kubernetes.io/name=strata-node-agent";
/// How long one agent may take to answer.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(2);
/// Agents scraped at once.
const AGENT_CONCURRENCY: usize = 32;
/// The most of an agent's page that is read (a few hundred bytes per GPU).
const AGENT_MAX_BODY: usize = 4 << 20;
/// How long one dcgm query may take, and the most of its answer read
/// (every GPU of the cluster: a few hundred bytes each).
const DCGM_TIMEOUT: Duration = Duration::from_secs(5);
const DCGM_MAX_BODY: usize = 16 << 20;

/// Where GPU readings come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Source {
    /// `strata-node-agent` on each GPU node (NVML and PodResources).
    NodeAgent,
    /// dcgm-exporter's metrics through Prometheus (the NVIDIA GPU Operator).
    Dcgm,
    /// Each replica's sidecar (sees GPUs only where the node lets it: an
    /// explicit opt-in, see docs/energy.md).
    Sidecar,
}

impl Source {
    /// The name in metrics and flags.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NodeAgent => "node-agent",
            Self::Dcgm => "dcgm",
            Self::Sidecar => "sidecar",
        }
    }
}

/// What the accountant reads GPUs from.
#[derive(Clone)]
pub struct Telemetry {
    /// The source.
    pub source: Source,
    /// The node agents' pods (with [`Source::NodeAgent`]).
    pub agents: Option<Store<Pod>>,
    /// The agents' metrics port.
    pub agent_port: u16,
    /// The Prometheus that scrapes dcgm-exporter (with [`Source::Dcgm`]).
    pub dcgm_url: Option<String>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("source", &self.source)
            .field("agent_port", &self.agent_port)
            .field("dcgm_url", &self.dcgm_url)
            .finish_non_exhaustive()
    }
}

/// A failed read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A node agent did not answer usably.
    #[error("node agent {pod} on {node}: {reason}")]
    Agent {
        /// Its pod.
        pod: String,
        /// Its node.
        node: String,
        /// Why.
        reason: String,
    },
    /// A Prometheus query failed.
    #[error("dcgm-exporter through Prometheus: {0}")]
    Dcgm(#[from] prometheus::Error),
    /// No Prometheus URL for the dcgm source.
    #[error("the dcgm GPU telemetry source needs --dcgm-prometheus-url")]
    NoUrl,
}

/// One round's readings.
#[derive(Debug, Default)]
pub struct Readings {
    /// None for the sidecar source (the sidecars' pages carry them);
    /// otherwise every pod's GPUs that could be read (a pod missing from
    /// the map keeps its baselines for the next round).
    pub by_pod: Option<ByPod>,
    /// Every GPU's enforced power limit, where the source reports it (the
    /// node agents); None where it does not.
    pub limits: Option<Vec<GpuLimit>>,
    /// What could not be read.
    pub errors: Vec<Error>,
}

/// One round's readings from the configured source.
pub async fn read(t: &Telemetry) -> Readings {
    match t.source {
        Source::Sidecar => Readings::default(),
        Source::NodeAgent => {
            let (by_pod, limits, errors) = read_agents(t).await;
            Readings {
                by_pod: Some(by_pod),
                limits: Some(limits),
                errors,
            }
        }
        Source::Dcgm => match read_dcgm(t).await {
            Ok(by_pod) => Readings {
                by_pod: Some(by_pod),
                ..Readings::default()
            },
            Err(e) => Readings {
                by_pod: Some(ByPod::new()),
                limits: None,
                errors: vec![e],
            },
        },
    }
}

async fn read_agents(t: &Telemetry) -> (ByPod, Vec<GpuLimit>, Vec<Error>) {
    let agents: Vec<(String, String, String)> = t
        .agents
        .as_ref()
        .map(|s| s.state())
        .unwrap_or_default()
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| strata_core::view::pod_ready(p))
        .filter_map(|p| {
            let ip = p.status.as_ref()?.pod_ip.clone()?;
            let node = p.spec.as_ref()?.node_name.clone().unwrap_or_default();
            Some((p.metadata.name.clone().unwrap_or_default(), node, ip))
        })
        .collect();
    let port = t.agent_port;
    use futures::StreamExt;
    let pages: Vec<Result<(ByPod, Vec<GpuLimit>), Error>> =
        futures::stream::iter(agents.into_iter().map(|(pod, node, ip)| async move {
            let host = if ip.contains(':') {
                format!("[{ip}]")
            } else {
                ip.clone()
            };
            let uri: Result<http::Uri, _> = format!("http://{host}:{port}/metrics").parse();
            let fail = |reason: String| Error::Agent {
                pod: pod.clone(),
                node: node.clone(),
                reason,
            };
            let uri = uri.map_err(|e| fail(e.to_string()))?;
            let (status, body) =
                prometheus::fetch(uri, "node agent", AGENT_MAX_BODY, AGENT_TIMEOUT)
                    .await
                    .map_err(|e| fail(e.to_string()))?;
            if !status.is_success() {
                return Err(fail(format!("HTTP {status}")));
            }
            let text = String::from_utf8_lossy(&body);
            Ok((
                telemetry::parse_node_agent(&text),
                telemetry::parse_power_limits(&text),
            ))
        }))
        // At most this many agents at once, however many GPU nodes there are
        // (a round of 1,000 nodes takes 1,000 / 32 timeouts at worst).
        .buffer_unordered(AGENT_CONCURRENCY)
        .collect()
        .await;
    let mut out = ByPod::new();
    let mut limits = Vec::new();
    let mut errors = Vec::new();
    for page in pages {
        match page {
            Ok((by_pod, l)) => {
                out.extend(by_pod);
                limits.extend(l);
            }
            Err(e) => errors.push(e),
        }
    }
    (out, limits, errors)
}

async fn read_dcgm(t: &Telemetry) -> Result<ByPod, Error> {
    let url = t.dcgm_url.as_deref().ok_or(Error::NoUrl)?;
    let answers = futures::future::try_join_all(telemetry::dcgm_queries(&[]).into_iter().map(
        |(field, promql)| async move {
            let uri = prometheus::query_uri(url, &promql)?;
            let (status, body) =
                prometheus::fetch(uri, field.metric(), DCGM_MAX_BODY, DCGM_TIMEOUT).await?;
            Ok::<_, prometheus::Error>((field, status, body))
        },
    ))
    .await?;
    let mut out = ByPod::new();
    for (field, status, body) in answers {
        telemetry::parse_dcgm(&body, field, &mut out).map_err(|source| {
            if status.is_success() {
                prometheus::Error::Query {
                    signal: field.metric(),
                    source,
                }
            } else {
                prometheus::Error::Status {
                    signal: field.metric(),
                    status: status.as_u16(),
                    body: String::from_utf8_lossy(&body).chars().take(200).collect(),
                }
            }
        })?;
    }
    Ok(out)
}
