//! Brings up the local world: etcd, kube-apiserver (RBAC, PodSecurity, an
//! audit log of writes), kube-controller-manager, kube-scheduler and KWOK,
//! all on loopback, with simulated GPU nodes from a topology file; then
//! supervises them (a component that exits is restarted, as a kubelet
//! restarts a control plane's static pods) and serves the control socket
//! that stops, pauses, kills and restarts them on request.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use kube::api::{Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::await_condition;
use kube::{Api, Client, Config};

use crate::control::Component;
use crate::error::{Error, Result, io_err};
use crate::pki::{Authority, write_kubeconfig};
use crate::supervisor::{ComponentStatus, Handle, Spec, Supervisor};
use crate::topology::Topology;
use crate::wait::{poll_until, within};

/// Pod IPs come from a /16 of loopback (KWOK's --cidr), so connecting to a
/// pod IP never leaves the machine: 127.N.0.0/16 with N in 64..=127, chosen
/// per world so that two worlds on one machine (two test binaries, or a test
/// run beside a kept cluster) do not hand out the same pod IPs.
pub fn pod_cidr() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let seed = u64::from(std::process::id()).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(nanos);
    format!("127.{}.0.0/16", 64 + (seed % 64))
}
/// Service ClusterIPs come from here: loopback too, so that even a mistaken
/// connection to a ClusterIP stays on this machine. Nothing listens there.
pub const SERVICE_CIDR: &str = "127.128.0.0/16";
/// The `kubernetes` Service's ClusterIP (first address of SERVICE_CIDR).
pub const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(127, 128, 0, 1);

const KWOK_STAGES: &str = include_str!("../kwok/stages.yaml");

/// How to bring the cluster up.
#[derive(Debug, Clone)]
pub struct Options {
    /// Directory for PKI, data, logs and kubeconfigs; a temporary one if None.
    /// Its etcd/, pki/, logs/, kwok/ and helm/ are reset on start.
    pub dir: Option<PathBuf>,
    /// Topology file (default: e2e/topology/default.yaml).
    pub topology: PathBuf,
    /// Directory of the upstream binaries (see tools::ensure_binaries).
    pub bin_dir: PathBuf,
    /// How long to wait for each component.
    pub timeout: Duration,
}

/// Where things are, once the cluster is up.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterInfo {
    /// The working directory.
    pub dir: PathBuf,
    /// Admin kubeconfig (system:masters).
    pub kubeconfig: PathBuf,
    /// API server URL.
    pub server: String,
    /// Logs of every component.
    pub log_dir: PathBuf,
    /// Directory of the upstream binaries (kubectl, helm, ...).
    pub bin_dir: PathBuf,
    /// Names of the simulated nodes.
    pub nodes: Vec<String>,
    /// Seconds from start to ready.
    pub startup_seconds: f64,
    /// The control socket (see [`crate::control`]); absent in worlds
    /// started before it existed.
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
    /// The kube-apiserver's audit log of writes (see [`crate::audit`]).
    #[serde(default)]
    pub audit_log: Option<PathBuf>,
    /// The topology file the nodes came from (to bring a deleted node back).
    #[serde(default)]
    pub topology: Option<PathBuf>,
}

/// A running cluster, supervised. Dropping it kills the processes (SIGKILL
/// via kill_on_drop); `shutdown` stops them gracefully and removes a
/// temporary directory.
pub struct Cluster {
    /// Where things are.
    pub info: ClusterInfo,
    supervisor: Handle,
    supervising: tokio::task::JoinHandle<()>,
    control: Option<tokio::task::JoinHandle<()>>,
    temp: Option<tempfile::TempDir>,
}

fn free_port() -> Result<u16> {
    crate::ports::free_port().map_err(io_err("a free port on 127.0.0.1"))
}

/// A kube client from a kubeconfig file.
pub async fn client_from(kubeconfig: &Path) -> Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig).map_err(|e| Error::Kubeconfig(e.to_string()))?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| Error::Kubeconfig(e.to_string()))?;
    Ok(Client::try_from(config)?)
}

fn s(v: impl Into<String>) -> String {
    v.into()
}

impl Cluster {
    /// Starts every component and waits until the cluster can run pods.
    pub async fn start(opts: Options) -> Result<Self> {
        let started = Instant::now();
        let topology = Topology::load(&opts.topology)?;
        let (temp, dir) = match &opts.dir {
            Some(d) => {
                std::fs::create_dir_all(d).map_err(io_err(d))?;
                // A fresh world each start: only the parts this harness writes.
                for part in ["etcd", "pki", "logs", "kwok", "helm"] {
                    let p = d.join(part);
                    if p.exists() {
                        std::fs::remove_dir_all(&p).map_err(io_err(&p))?;
                    }
                }
                (None, d.clone())
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("strata-e2e-")
                    .tempdir()
                    .map_err(io_err(std::env::temp_dir()))?;
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        let log_dir = dir.join("logs");
        let mut sup = Supervisor::new(&log_dir);
        match start_components(&opts, &topology, &dir, &log_dir, &mut sup).await {
            Ok((server, kubeconfig, names)) => {
                let (supervisor, supervising) = sup.run();
                let socket = crate::control::socket_in(&dir);
                // Without a control socket (a --dir too long for a socket
                // path) the world still runs; faults cannot be injected.
                let control = match crate::control::serve(&socket, supervisor.clone()) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        tracing::warn!("no control socket: {e}");
                        None
                    }
                };
                let info = ClusterInfo {
                    dir,
                    kubeconfig,
                    server,
                    audit_log: Some(log_dir.join(crate::audit::LOG_NAME)),
                    log_dir,
                    bin_dir: opts.bin_dir.clone(),
                    nodes: names,
                    startup_seconds: started.elapsed().as_secs_f64(),
                    control_socket: control.is_some().then_some(socket),
                    topology: Some(opts.topology.clone()),
                };
                tracing::info!(seconds = info.startup_seconds, server = %info.server, "cluster ready");
                Ok(Self {
                    info,
                    supervisor,
                    supervising,
                    control,
                    temp,
                })
            }
            Err(e) => {
                sup.stop_all().await;
                Err(e)
            }
        }
    }

    /// The supervisor (to act on components from this process).
    pub fn supervisor(&self) -> &Handle {
        &self.supervisor
    }

    /// Every component's state.
    pub async fn status(&self) -> Result<Vec<ComponentStatus>> {
        self.supervisor.status().await.map_err(Error::Control)
    }

    /// Stops every component (reverse start order) and removes a temporary
    /// directory unless `keep`.
    pub async fn shutdown(mut self, keep: bool) {
        if let Some(c) = &self.control {
            c.abort();
        }
        if let Some(socket) = &self.info.control_socket {
            let _ = std::fs::remove_file(socket);
        }
        self.supervisor.shutdown().await;
        let _ = (&mut self.supervising).await;
        if let Some(t) = self.temp.take() {
            if keep {
                let path = t.keep();
                tracing::info!(dir = %path.display(), "kept the cluster directory");
            } else {
                let _ = t.close();
            }
        }
    }
}

fn spec(
    component: Component,
    bin_dir: &Path,
    args: Vec<String>,
    env: Vec<(String, String)>,
) -> Spec {
    Spec {
        component,
        program: bin_dir.join(component.name()),
        args,
        env,
    }
}

/// Starts the components in order, each once the one before is usable, and
/// the nodes; the API server's URL, the admin kubeconfig and the node names.
async fn start_components(
    opts: &Options,
    topology: &Topology,
    dir: &Path,
    log_dir: &Path,
    sup: &mut Supervisor,
) -> Result<(String, PathBuf, Vec<String>)> {
    let bin_dir = opts.bin_dir.as_path();
    {
        // PKI and kubeconfigs.
        let (ca, pki) = Authority::create(&dir.join("pki"), IpAddr::V4(KUBERNETES_SERVICE_IP))?;
        let api_port = free_port()?;
        let server = format!("https://127.0.0.1:{api_port}");
        let kubeconfig = dir.join("admin.kubeconfig");
        let admin = ca.client("admin", "strata-e2e-admin", Some("system:masters"))?;
        write_kubeconfig(&kubeconfig, &server, &pki.ca_cert, &admin, "admin")?;
        let kcm_kc = dir.join("controller-manager.kubeconfig");
        let kcm = ca.client("controller-manager", "system:kube-controller-manager", None)?;
        write_kubeconfig(
            &kcm_kc,
            &server,
            &pki.ca_cert,
            &kcm,
            "kube-controller-manager",
        )?;
        let sched_kc = dir.join("scheduler.kubeconfig");
        let sched = ca.client("scheduler", "system:kube-scheduler", None)?;
        write_kubeconfig(&sched_kc, &server, &pki.ca_cert, &sched, "kube-scheduler")?;
        let kwok_kc = dir.join("kwok.kubeconfig");
        let kwok = ca.client("kwok", "kwok-controller", Some("system:masters"))?;
        write_kubeconfig(&kwok_kc, &server, &pki.ca_cert, &kwok, "kwok")?;

        // etcd.
        let etcd_port = free_port()?;
        let etcd_peer = free_port()?;
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer}");
        sup.spawn(spec(
            Component::Etcd,
            bin_dir,
            vec![
                s("--name=strata-e2e"),
                format!("--data-dir={}", dir.join("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=strata-e2e={peer_url}"),
                s("--listen-metrics-urls="),
                s("--unsafe-no-fsync=true"),
                s("--quota-backend-bytes=4294967296"),
                s("--log-level=warn"),
            ],
            Vec::new(),
        ))?;
        let etcd_addr = format!("127.0.0.1:{etcd_port}")
            .parse()
            .map_err(|_| Error::Tools("bad etcd address".into()))?;
        poll_until(
            "etcd /health",
            opts.timeout,
            Duration::from_millis(100),
            || {
                let alive = sup.check(Component::Etcd);
                async move {
                    alive?;
                    Ok(
                        crate::http::get(etcd_addr, "/health", Duration::from_secs(2))
                            .await
                            .is_ok_and(|r| r.status == 200 && r.body.contains("true")),
                    )
                }
            },
        )
        .await?;

        // kube-apiserver.
        let audit_policy = dir.join("audit-policy.yaml");
        std::fs::write(&audit_policy, crate::audit::POLICY).map_err(io_err(&audit_policy))?;
        sup.spawn(spec(
            Component::ApiServer,
            bin_dir,
            vec![
                format!("--etcd-servers={etcd_url}"),
                s("--bind-address=127.0.0.1"),
                s("--advertise-address=127.0.0.1"),
                format!("--secure-port={api_port}"),
                format!("--tls-cert-file={}", pki.apiserver.cert.display()),
                format!("--tls-private-key-file={}", pki.apiserver.key.display()),
                format!("--client-ca-file={}", pki.ca_cert.display()),
                format!(
                    "--service-account-key-file={}",
                    pki.service_account_pub.display()
                ),
                format!(
                    "--service-account-signing-key-file={}",
                    pki.service_account_key.display()
                ),
                s("--service-account-issuer=https://kubernetes.default.svc.cluster.local"),
                s("--api-audiences=https://kubernetes.default.svc.cluster.local"),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                s("--authorization-mode=RBAC"),
                s("--enable-admission-plugins=PodSecurity"),
                // Webhooks and aggregated APIs are reached through endpoint (pod)
                // IPs, which are loopback, never through a ClusterIP.
                s("--enable-aggregator-routing=true"),
                s("--allow-privileged=false"),
                // Off, as a hardened control plane has it; the environment's
                // STRATA_APISERVER_PROFILING=true turns it on to take a CPU
                // profile of a benchmark (/debug/pprof, docs/testing.md).
                format!(
                    "--profiling={}",
                    std::env::var("STRATA_APISERVER_PROFILING").is_ok_and(|v| v == "true")
                ),
                // Every write, at Metadata level (see crate::audit); appended
                // across restarts, never rotated.
                format!("--audit-policy-file={}", audit_policy.display()),
                format!(
                    "--audit-log-path={}",
                    log_dir.join(crate::audit::LOG_NAME).display()
                ),
                s("--audit-log-format=json"),
                s("--audit-log-maxsize=0"),
                s("--audit-log-maxbackup=0"),
                s("--v=1"),
            ],
            Vec::new(),
        ))?;
        let admin_client = {
            let deadline = Instant::now() + opts.timeout;
            loop {
                sup.check(Component::ApiServer)?;
                let client = client_from(&kubeconfig).await?;
                match client.request_text(http_request("/readyz")?).await {
                    Ok(body) if body.trim() == "ok" => break client,
                    _ if Instant::now() >= deadline => {
                        return Err(with_logs(
                            Error::Timeout {
                                what: "kube-apiserver /readyz".into(),
                                seconds: opts.timeout.as_secs(),
                            },
                            log_dir,
                            "kube-apiserver",
                        ));
                    }
                    _ => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        };

        // kube-controller-manager and kube-scheduler.
        sup.spawn(spec(
            Component::ControllerManager,
            bin_dir,
            vec![
                format!("--kubeconfig={}", kcm_kc.display()),
                format!("--authentication-kubeconfig={}", kcm_kc.display()),
                format!("--authorization-kubeconfig={}", kcm_kc.display()),
                s("--bind-address=127.0.0.1"),
                format!("--secure-port={}", free_port()?),
                s("--leader-elect=true"),
                s("--use-service-account-credentials=true"),
                format!("--service-account-private-key-file={}", pki.service_account_key.display()),
                format!("--root-ca-file={}", pki.ca_cert.display()),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                // Without the Endpoints and EndpointSlice controllers: the
                // API server refuses the loopback pod IPs of this world in
                // both, so here they only retried rejected writes (over
                // 4,000 creates and their Events in the idle phase of the
                // 700-Model scale benchmark: docs/benchmarks.md, the API
                // server's top requests), load a real cluster, whose
                // writes succeed once, does not carry. Nothing in
                // Strata reads Endpoints or EndpointSlices (docs/routing.md).
                s("--controllers=*,-node-ipam-controller,-cloud-node-lifecycle-controller,-service-lb-controller,-node-route-controller,-persistentvolume-attach-detach-controller,-persistentvolume-binder-controller,-persistentvolume-expander-controller,-ephemeral-volume-controller,-ttl-controller,-endpoints-controller,-endpointslice-controller,-endpointslice-mirroring-controller"),
                s("--concurrent-gc-syncs=10"),
                s("--v=1"),
            ],
            Vec::new(),
        ))?;
        sup.spawn(spec(
            Component::Scheduler,
            bin_dir,
            vec![
                format!("--kubeconfig={}", sched_kc.display()),
                format!("--authentication-kubeconfig={}", sched_kc.display()),
                format!("--authorization-kubeconfig={}", sched_kc.display()),
                s("--bind-address=127.0.0.1"),
                format!("--secure-port={}", free_port()?),
                s("--leader-elect=true"),
                s("--v=1"),
            ],
            Vec::new(),
        ))?;

        // KWOK with the stages of this world.
        let pod_cidr = pod_cidr();
        let stages = dir.join("kwok-stages.yaml");
        std::fs::write(&stages, KWOK_STAGES).map_err(io_err(&stages))?;
        sup.spawn(spec(
            Component::Kwok,
            bin_dir,
            vec![
                format!("--kubeconfig={}", kwok_kc.display()),
                format!("--config={}", stages.display()),
                s("--manage-all-nodes=false"),
                format!(
                    "--manage-nodes-with-label-selector={}=fake",
                    crate::topology::KWOK_NODE_LABEL
                ),
                format!("--cidr={pod_cidr}"),
                s("--node-ip=127.1.0.254"),
                s("--node-lease-duration-seconds=40"),
            ],
            // KWOK reads ~/.kwok unless told otherwise; keep it inside the world.
            vec![(s("KWOK_WORKDIR"), dir.join("kwok").display().to_string())],
        ))?;

        // The simulated nodes.
        let nodes: Api<Node> = Api::all(admin_client.clone());
        let mut names = Vec::new();
        for node in topology.nodes() {
            let name = node.metadata.name.clone().unwrap_or_default();
            nodes.create(&PostParams::default(), &node).await?;
            let status = serde_json::json!({ "status": node.status });
            nodes
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                .await?;
            names.push(name);
        }

        // Ready: every node Ready (KWOK is simulating them), both control-plane
        // controllers hold their leases, and the controller-manager has created
        // the default ServiceAccount.
        for name in &names {
            sup.check_all()?;
            within(&format!("node {name} Ready"), opts.timeout, async {
                await_condition(nodes.clone(), name, node_ready)
                    .await
                    .map_err(|e| Error::Kubeconfig(e.to_string()))?;
                Ok(())
            })
            .await
            .map_err(|e| with_logs(e, log_dir, "kwok"))?;
        }
        let leases: Api<Lease> = Api::namespaced(admin_client.clone(), "kube-system");
        for lease in ["kube-controller-manager", "kube-scheduler"] {
            sup.check_all()?;
            within(
                &format!("lease kube-system/{lease} held"),
                opts.timeout,
                async {
                    await_condition(leases.clone(), lease, |l: Option<&Lease>| {
                        l.and_then(|l| l.spec.as_ref())
                            .and_then(|s| s.holder_identity.as_ref())
                            .is_some_and(|h| !h.is_empty())
                    })
                    .await
                    .map_err(|e| Error::Kubeconfig(e.to_string()))?;
                    Ok(())
                },
            )
            .await
            .map_err(|e| with_logs(e, log_dir, lease))?;
        }
        let sas: Api<ServiceAccount> = Api::namespaced(admin_client.clone(), "default");
        within("ServiceAccount default/default", opts.timeout, async {
            await_condition(sas, "default", |sa: Option<&ServiceAccount>| sa.is_some())
                .await
                .map_err(|e| Error::Kubeconfig(e.to_string()))?;
            Ok(())
        })
        .await
        .map_err(|e| with_logs(e, log_dir, "kube-controller-manager"))?;
        sup.check_all()?;
        Ok((server, kubeconfig, names))
    }
}

fn with_logs(e: Error, log_dir: &Path, component: &str) -> Error {
    match e {
        Error::Timeout { what, seconds } => Error::Timeout {
            what: format!(
                "{what}; last lines of {component}.log:\n{}",
                crate::process::tail(&log_dir.join(format!("{component}.log")), 20)
            ),
            seconds,
        },
        other => other,
    }
}

/// True when the node's Ready condition is True.
pub fn node_ready(node: Option<&Node>) -> bool {
    node.is_some_and(strata_core::view::node_ready)
}

fn http_request(path: &str) -> Result<http::Request<Vec<u8>>> {
    http::Request::get(path)
        .body(Vec::new())
        .map_err(|e| Error::Kubeconfig(e.to_string()))
}
