//! The running agent: every interval, one NVML sample of every GPU of the
//! node and one PodResources `List`, at the same time; the results go into
//! [`State`] (the ledger and what the next scrape shows). `/metrics`
//! renders the state; `/healthz` says the loop runs; `/readyz` says both
//! sources answered at least once.
//!
//! Degradation: NVML missing or failing leaves no GPU series and
//! `strata_node_agent_up{source="nvml"} 0` (retried every interval);
//! PodResources down leaves the GPUs unattributed for that interval
//! (reconnected every interval). Either counts in
//! `strata_node_agent_errors_total{source}`.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State as AxumState;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use strata_core::powercap::Desired;
use strata_net::server::ServerLimits;
use strata_podresources::{Client, Holder, device_holders, is_nvidia_gpu};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::error::Error;
use crate::ledger::{DeviceReading, HoldersByGpu, Ledger, holders_by_gpu};
use crate::metrics::{self, Health, Snapshot};
use crate::nvml::{NvmlSample, NvmlSource};

/// The agent's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The NVML library (path or loader name).
    pub nvml_lib: String,
    /// The kubelet's PodResources socket.
    pub pod_resources_socket: PathBuf,
    /// The node's name (`Hostname`).
    pub node_name: String,
    /// Time between samples.
    pub interval: Duration,
    /// How long a container's energy series outlives its last sighting.
    pub pod_retention: Duration,
    /// Apply the GPUPools' power caps (watching the API server).
    pub apply_power_caps: bool,
}

impl Config {
    /// How long one NVML sample or PodResources call may take: the
    /// interval, within 1 to 10 seconds.
    pub fn call_timeout(&self) -> Duration {
        self.interval
            .clamp(Duration::from_secs(1), Duration::from_secs(10))
    }

    /// How long without a completed interval before `/healthz` fails.
    pub fn stall_after(&self) -> Duration {
        (self.interval * 10).max(Duration::from_secs(60))
    }
}

/// What the agent knows; one lock, held briefly (no await under it).
#[derive(Debug)]
pub struct State {
    ledger: Ledger,
    devices: Vec<DeviceReading>,
    holders: HoldersByGpu,
    driver_version: Option<String>,
    health: Health,
    nvml_answered: bool,
    podresources_answered: bool,
    last_interval: Instant,
    /// The power limit asked for at the last interval.
    power_target: Desired,
    /// The last power-limit error of each GPU (logged once per change).
    limit_errors: BTreeMap<String, String>,
}

impl State {
    /// A fresh state.
    pub fn new(pod_retention: Duration, now: Instant) -> Self {
        Self {
            ledger: Ledger::new(pod_retention),
            devices: Vec::new(),
            holders: HoldersByGpu::new(),
            driver_version: None,
            health: Health::default(),
            nvml_answered: false,
            podresources_answered: false,
            last_interval: now,
            power_target: Desired::Unmanaged,
            limit_errors: BTreeMap::new(),
        }
    }

    /// Takes one interval's results in: the energy goes into the ledger,
    /// attributed to the holders PodResources named (none when it failed).
    pub fn apply(
        &mut self,
        now: Instant,
        power_target: Desired,
        nvml: Result<NvmlSample, Error>,
        holders: Result<BTreeMap<String, Holder>, Error>,
    ) {
        match holders {
            Ok(h) => {
                if !self.health.podresources_up {
                    tracing::info!(gpus_held = h.len(), "PodResources answers");
                }
                self.holders = holders_by_gpu(&h);
                self.health.podresources_up = true;
                self.podresources_answered = true;
            }
            Err(e) => {
                if self.health.podresources_up || self.health.podresources_errors == 0 {
                    tracing::warn!(error = %e, "PodResources did not answer; GPUs are unattributed until it does (retried every interval)");
                } else {
                    tracing::debug!(error = %e, "PodResources still not answering");
                }
                self.holders.clear();
                self.health.podresources_up = false;
                self.health.podresources_errors += 1;
            }
        }
        let holders = self.health.podresources_up.then_some(&self.holders);
        match nvml {
            Ok(sample) => {
                if !self.health.nvml_up {
                    tracing::info!(
                        gpus = sample.devices.len(),
                        driver = sample.driver_version.as_deref().unwrap_or("?"),
                        "NVML answers"
                    );
                }
                for e in &sample.field_errors {
                    tracing::debug!("NVML: {e}");
                }
                for c in &sample.limit_changes {
                    tracing::info!(uuid = %c.uuid, from_watts = f64::from(c.from_mw) / 1000.0, to_watts = f64::from(c.to_mw) / 1000.0, "power limit set");
                }
                self.health.power_limit_changes += sample.limit_changes.len() as u64;
                self.health.power_limit_errors += sample.limit_errors.len() as u64;
                let errors: BTreeMap<String, String> =
                    sample.limit_errors.iter().cloned().collect();
                for (uuid, e) in &errors {
                    if self.limit_errors.get(uuid) != Some(e) {
                        tracing::warn!(uuid = %uuid, "{e} (retried every interval)");
                    }
                }
                self.limit_errors = errors;
                self.health.nvml_errors += sample.field_errors.len() as u64;
                for r in self.ledger.record(now, &sample.devices, holders) {
                    tracing::warn!(uuid = %r.uuid, joules = r.joules, "the GPU's NVML energy counter went backwards (driver reload); counting from its new value");
                }
                self.devices = sample.devices;
                if sample.driver_version.is_some() {
                    self.driver_version = sample.driver_version;
                }
                self.health.nvml_up = true;
                self.nvml_answered = true;
            }
            Err(e) => {
                if self.health.nvml_up || self.health.nvml_errors == 0 {
                    tracing::warn!(error = %e, "NVML is not available; no GPU metrics until it is (retried every interval)");
                } else {
                    tracing::debug!(error = %e, "NVML still not available");
                }
                self.devices.clear();
                self.health.nvml_up = false;
                self.health.nvml_errors += 1;
            }
        }
        self.health.samples += 1;
        self.last_interval = now;
        self.power_target = power_target;
    }

    /// The Prometheus page.
    pub fn render(&self, node_name: &str) -> Result<String, Error> {
        Ok(metrics::render(&Snapshot {
            hostname: node_name,
            version: env!("CARGO_PKG_VERSION"),
            driver_version: self.driver_version.as_deref(),
            devices: &self.devices,
            holders: &self.holders,
            ledger: &self.ledger,
            health: &self.health,
            power_cap_watts: self.power_target.cap_watts(),
        })?)
    }

    /// Whether both sources answered at least once; else what is missing.
    pub fn readiness(&self) -> Result<(), String> {
        match (self.nvml_answered, self.podresources_answered) {
            (true, true) => Ok(()),
            (false, true) => Err("NVML has not answered yet".into()),
            (true, false) => Err("PodResources has not answered yet".into()),
            (false, false) => Err("neither NVML nor PodResources has answered yet".into()),
        }
    }

    /// When the last interval completed.
    pub fn last_interval(&self) -> Instant {
        self.last_interval
    }
}

/// The kubelet's PodResources, reconnected after any failure.
struct PodResources {
    socket: PathBuf,
    timeout: Duration,
    client: Option<Client>,
}

impl PodResources {
    async fn holders(&mut self) -> Result<BTreeMap<String, Holder>, Error> {
        let mut client = match self.client.take() {
            Some(c) => c,
            None => Client::connect(&self.socket, self.timeout).await?,
        };
        let list = client.list().await?;
        self.client = Some(client);
        Ok(device_holders(&list, is_nvidia_gpu))
    }
}

struct Shared {
    config: Config,
    state: Mutex<State>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The HTTP routes over a shared state.
fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(shared)
}

async fn metrics_page(AxumState(shared): AxumState<Arc<Shared>>) -> Response {
    let page = shared.state().render(&shared.config.node_name);
    match page {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => {
            tracing::error!("{e}");
            (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
        }
    }
}

async fn healthz(AxumState(shared): AxumState<Arc<Shared>>) -> Response {
    let since = shared.state().last_interval().elapsed();
    if since > shared.config.stall_after() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("no interval completed for {since:?}\n"),
        )
            .into_response()
    } else {
        "ok\n".into_response()
    }
}

async fn readyz(AxumState(shared): AxumState<Arc<Shared>>) -> Response {
    let ready = shared.state().readiness();
    match ready {
        Ok(()) => "ok\n".into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
    }
}

/// The sampling loop: never returns.
async fn sample_forever(shared: Arc<Shared>, nvml: NvmlSource, target: watch::Receiver<Desired>) {
    let config = shared.config.clone();
    let timeout = config.call_timeout();
    let mut podresources = PodResources {
        socket: config.pod_resources_socket.clone(),
        timeout,
        client: None,
    };
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let desired = *target.borrow();
        let (sample, holders) = tokio::join!(nvml.sample(timeout, desired), podresources.holders());
        shared
            .state()
            .apply(Instant::now(), desired, sample, holders);
    }
}

/// Runs the agent: samples every interval and serves HTTP on `listener`
/// until `shutdown` completes.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let nvml = NvmlSource::start(config.nvml_lib.clone())?;
    let shared = Arc::new(Shared {
        state: Mutex::new(State::new(config.pod_retention, Instant::now())),
        config,
    });
    let (target_tx, target) = watch::channel(Desired::Unmanaged);
    let caps = if shared.config.apply_power_caps {
        let client = kube::Client::try_default().await.map_err(Error::Kube)?;
        Some(tokio::spawn(crate::caps::run(
            client,
            shared.config.node_name.clone(),
            target_tx,
        )))
    } else {
        drop(target_tx);
        None
    };
    let sampler = tokio::spawn(sample_forever(shared.clone(), nvml, target));
    let limits = ServerLimits {
        max_connections: 64,
        header_read_timeout: Duration::from_secs(10),
        max_header_bytes: 16 * 1024,
        shutdown_grace: Duration::from_secs(5),
        ..ServerLimits::default()
    };
    let served = strata_net::server::serve(listener, router(shared), limits, None, shutdown).await;
    sampler.abort();
    if let Some(c) = caps {
        c.abort();
    }
    served.map_err(Error::Serve)
}

/// Opens the HTTP port.
pub async fn listen(addr: std::net::SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Listen { addr, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::PodContainer;

    fn sample(mj: u64) -> Result<NvmlSample, Error> {
        Ok(NvmlSample {
            driver_version: Some("550.54.15".into()),
            devices: vec![DeviceReading {
                index: 0,
                uuid: "GPU-a".into(),
                name: "NVIDIA H100 80GB HBM3".into(),
                power_watts: Some(300.0),
                energy_mj: Some(mj),
                ..DeviceReading::default()
            }],
            ..NvmlSample::default()
        })
    }

    fn held() -> Result<BTreeMap<String, Holder>, Error> {
        Ok([(
            "GPU-a".to_owned(),
            Holder {
                namespace: "ns".into(),
                pod: "p".into(),
                container: "engine".into(),
                resource: "nvidia.com/gpu".into(),
            },
        )]
        .into_iter()
        .collect())
    }

    fn down() -> Result<BTreeMap<String, Holder>, Error> {
        Err(Error::PodResources(strata_podresources::Error::Call {
            call: "List",
            status: Box::new(tonic::Status::unavailable("down")),
        }))
    }

    fn pod_joules(s: &State) -> f64 {
        let p = PodContainer {
            namespace: "ns".into(),
            pod: "p".into(),
            container: "engine".into(),
        };
        s.ledger
            .pods()
            .filter(|(h, _, _)| **h == p)
            .map(|(_, _, j)| j)
            .sum()
    }

    #[test]
    fn ready_once_both_sources_answered_and_degraded_without_them() {
        let t = Instant::now();
        let mut s = State::new(Duration::from_secs(600), t);
        assert!(s.readiness().is_err());

        // NVML missing: not ready, the page says so, the errors count.
        s.apply(t, Desired::Unmanaged, Err(Error::NvmlBusy), held());
        assert_eq!(s.readiness(), Err("NVML has not answered yet".to_owned()));
        assert!(!s.health.nvml_up && s.health.podresources_up);
        assert_eq!(s.health.nvml_errors, 1);

        // NVML back: baseline, then energy attributed.
        s.apply(t, Desired::Unmanaged, sample(1_000_000), held());
        assert!(s.readiness().is_ok());
        s.apply(t, Desired::Unmanaged, sample(1_010_000), held());
        assert_eq!(pod_joules(&s), 10.0);

        // PodResources down: the interval's energy is nobody's, the
        // GPU's series lose their pod labels; still ready.
        s.apply(t, Desired::Unmanaged, sample(1_015_000), down());
        assert_eq!(pod_joules(&s), 10.0);
        assert_eq!(s.ledger.unattributed_joules(), 5.0);
        assert!(s.holders.is_empty());
        assert_eq!(s.health.podresources_errors, 1);
        assert!(s.readiness().is_ok());
        let page = s.render("node-1").expect("render");
        assert!(page.contains(r#"strata_node_agent_up{source="podresources"} 0"#));
        assert!(page.contains(r#"pod=""} 300"#), "{page}");

        // Back: attributed again.
        s.apply(t, Desired::Unmanaged, sample(1_020_000), held());
        assert_eq!(pod_joules(&s), 15.0);
        assert_eq!(s.health.samples, 5);
    }

    #[test]
    fn timeouts_follow_the_interval_within_bounds() {
        let c = |secs: f64| Config {
            nvml_lib: String::new(),
            pod_resources_socket: PathBuf::new(),
            node_name: String::new(),
            interval: Duration::from_secs_f64(secs),
            pod_retention: Duration::from_secs(600),
            apply_power_caps: false,
        };
        assert_eq!(c(0.2).call_timeout(), Duration::from_secs(1));
        assert_eq!(c(5.0).call_timeout(), Duration::from_secs(5));
        assert_eq!(c(60.0).call_timeout(), Duration::from_secs(10));
        assert_eq!(c(0.2).stall_after(), Duration::from_secs(60));
        assert_eq!(c(30.0).stall_after(), Duration::from_secs(300));
    }
}
