//! The operator's memory in a shared cluster (issue [8] item 6): the local
//! world with other teams' pods in it (0, 1,000, 5,000, ...), the real
//! `strata-operator` serving a few Models of its own, and its resident
//! memory measured from `/proc/<pid>/status` once its caches are synced and
//! the world has settled.
//!
//! - **Foreign pods** are plain Pods in five `team-*` namespaces, bound to
//!   the simulated nodes by `spec.nodeName` (KWOK makes them Running with a
//!   loopback pod IP; no process runs for them: they do not carry the pod
//!   runner's label). Every 50th asks for an `nvidia.com/gpu` on the A100
//!   nodes; the rest run on CPU nodes. Each looks like a pod of a Helm-made
//!   Deployment in a service mesh (an init container and two containers
//!   with env, probes, mounts and resources; labels and annotations) and is
//!   written by server-side apply with two field managers, so that managed
//!   fields grow as they do in real clusters (about 12 KB per pod as the API
//!   server sends it, 4.7 KB of which are managed fields).
//! - **The operator** runs as a local process with the chart's
//!   ServiceAccount, three Models (four replicas of the real sidecar in
//!   front of the engine simulator, started by the pod runner), the H100
//!   pool and a pool over the other teams' A100 nodes (whose status shows
//!   that the operator's cluster-wide pod cache has seen their GPU pods).
//!   It caches Strata's own pods whole (a watch selected by
//!   `app.kubernetes.io/managed-by=strata`) and every pod of the cluster as
//!   `strata_core::podgpus::PodGpus` (identity and GPU claim, parsed lean).
//! - **Measured** at each level: the operator that was running while the
//!   pods were added, then a fresh one started with them already there (its
//!   initial list); the API server's pod list in bytes (as the watch gets it,
//!   as `kubectl get pods -A -o json` prints it); and, to separate the pod
//!   cache from the rest, bare reflectors of every pod (kube-rs, as the
//!   operator uses it) holding the pods in full, metadata only, or as
//!   `PodGpus` (the operator's way; also with the initial list in pages of
//!   50 instead of 500, or streamed as watch events).
//!
//! Waits are on conditions (readiness, reconcile counters, the Models' and
//! pools' status, the pods' phase), each with a deadline; the one timed part
//! is the measurement window, over which RSS is sampled.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, ServiceAccount};
use kube::api::{ListParams, ObjectList, Patch, PatchParams, PostParams};
use kube::core::PartialObjectMeta;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client, ResourceExt};
use serde::Serialize;
use serde_json::{Value, json};
use strata_core::podgpus::PodGpus;
use strata_crds::{GPUPool, Model};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::cluster::{Cluster, client_from};
use crate::runner::{PodRunner, ProcessSpec, Profile, RUN_LABEL, RunnerConfig};
use crate::topology::Topology;
use crate::wait::poll_until;

/// Label on every foreign pod (how the benchmark finds its own).
pub const FOREIGN_LABEL: &str = "bench.strata.ai/foreign";
/// One pod in this many asks for a GPU (the last of each level too).
pub const GPU_EVERY: usize = 50;
/// Namespaces of the other teams.
pub const TEAM_NAMESPACES: usize = 5;
/// Pods of one workload (a Deployment's replicas).
const REPLICAS_PER_WORKLOAD: usize = 10;
/// Namespace of the benchmark's Models.
const MODELS_NAMESPACE: &str = "bench-models";
/// The pod runner's profile for model pods.
const PROFILE: &str = "model-replica";
/// The Models' pool (samples/gpupool-h100.yaml).
const MODEL_POOL: &str = "h100";
/// The pool over the other teams' GPU nodes.
const TEAM_POOL: &str = "team-a100";
/// The other teams' GPU product (e2e/topology/bench-memory.yaml).
const TEAM_GPU_PRODUCT: &str = "NVIDIA-A100-SXM4-80GB";
/// How often RSS is sampled in a measurement window.
const SAMPLE_EVERY: Duration = Duration::from_millis(500);

/// Everything that can stop the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The local world failed (start, wait, harness I/O).
    #[error(transparent)]
    World(#[from] crate::Error),
    /// A Kubernetes API call failed.
    #[error("{what}: {source}")]
    Kube {
        /// The call.
        what: String,
        /// Cause.
        source: kube::Error,
    },
    /// A workspace binary is not built.
    #[error(
        "{} not found; build the workspace's binaries first: cargo build --release --workspace --bins",
        path.display()
    )]
    Binary {
        /// Where it was expected.
        path: PathBuf,
    },
    /// A process the benchmark runs failed.
    #[error("{what}: {reason}")]
    Process {
        /// The process and what it was doing.
        what: String,
        /// What went wrong.
        reason: String,
    },
    /// The options do not make sense.
    #[error("invalid options: {0}")]
    Options(String),
    /// An answer could not be parsed.
    #[error("parsing {what}: {reason}")]
    Parse {
        /// What.
        what: String,
        /// Why.
        reason: String,
    },
}

/// Result with the benchmark's error.
pub type Result<T, E = BenchError> = std::result::Result<T, E>;

pub(crate) fn kube_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> BenchError {
    let what = what.into();
    move |source| BenchError::Kube { what, source }
}

/// How to run the benchmark.
#[derive(Debug, Clone)]
pub struct Options {
    /// Foreign pod counts, ascending, each a multiple of [`GPU_EVERY`].
    pub levels: Vec<usize>,
    /// How long RSS is sampled once the world has settled (covers a resync
    /// of every object and an autoscaler evaluation).
    pub window: Duration,
    /// Pod writes in flight at once.
    pub concurrency: usize,
    /// Topology of the simulated nodes.
    pub topology: PathBuf,
    /// Working directory of the world (default: a temporary one).
    pub dir: Option<PathBuf>,
    /// Keep the world's directory (logs) at the end.
    pub keep: bool,
    /// Also run the bare-reflector probes.
    pub probes: bool,
    /// Deadline of each wait.
    pub timeout: Duration,
    /// The operator's --resync-seconds.
    pub resync_seconds: u64,
    /// Extra environment of the operator process (e.g. MALLOC_ARENA_MAX).
    pub operator_env: Vec<(String, String)>,
    /// Fresh operators started one after another at each level (their RSS
    /// varies from start to start).
    pub fresh_runs: usize,
}

impl Options {
    /// The benchmark's own topology file.
    pub fn default_topology() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("topology/bench-memory.yaml")
    }

    fn check(&self, layout: &Layout) -> Result<()> {
        if self.levels.is_empty() {
            return Err(BenchError::Options("no levels".into()));
        }
        if self.levels.windows(2).any(|w| w[0] >= w[1]) {
            return Err(BenchError::Options(format!(
                "levels must be ascending: {:?}",
                self.levels
            )));
        }
        if let Some(bad) = self.levels.iter().find(|l| !l.is_multiple_of(GPU_EVERY)) {
            return Err(BenchError::Options(format!(
                "level {bad} is not a multiple of {GPU_EVERY} (each level ends with a GPU pod)"
            )));
        }
        let most = self.levels.iter().copied().max().unwrap_or(0);
        if most > layout.capacity() {
            return Err(BenchError::Options(format!(
                "{most} pods need {} GPUs of the other teams; the topology has {}",
                gpu_pods(most),
                layout.gpu_nodes.len() * layout.gpus_per_node
            )));
        }
        if self.fresh_runs == 0 {
            return Err(BenchError::Options("fresh runs must be at least 1".into()));
        }
        if self.concurrency == 0 {
            return Err(BenchError::Options("concurrency must be at least 1".into()));
        }
        Ok(())
    }
}

/// Whether foreign pod `i` asks for a GPU.
pub fn is_gpu(i: usize) -> bool {
    i % GPU_EVERY == GPU_EVERY - 1
}

/// GPU pods among the first `n` foreign pods.
pub fn gpu_pods(n: usize) -> usize {
    n / GPU_EVERY
}

/// Where the foreign pods go.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Nodes without GPUs.
    pub cpu_nodes: Vec<String>,
    /// The other teams' GPU nodes.
    pub gpu_nodes: Vec<String>,
    /// GPUs per such node.
    pub gpus_per_node: usize,
}

/// SplitMix64: stable pseudo-random names and hashes.
pub(crate) fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn hex(seed: u64, len: usize) -> String {
    let mut s = String::new();
    let mut k = 0u64;
    while s.len() < len {
        s.push_str(&format!(
            "{:016x}",
            mix(seed ^ k.wrapping_mul(0x100_0000_01b3))
        ));
        k += 1;
    }
    s.truncate(len);
    s
}

fn base36(seed: u64, len: usize) -> String {
    const DIGITS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut v = mix(seed);
    (0..len)
        .map(|_| {
            let d = DIGITS[(v % DIGITS.len() as u64) as usize] as char;
            v /= DIGITS.len() as u64;
            d
        })
        .collect()
}

const APPS: [&str; 12] = [
    "checkout",
    "payments",
    "search-api",
    "recommender",
    "ingest-worker",
    "feature-store",
    "notebook-hub",
    "auth-gateway",
    "etl-runner",
    "catalog",
    "ledger",
    "web-frontend",
];

impl Layout {
    /// The nodes of a topology: the other teams' GPU nodes are those with
    /// the A100 product; CPU nodes have no GPUs.
    pub fn from_topology(topology: &Topology) -> Result<Self> {
        let mut cpu_nodes = Vec::new();
        let mut gpu_nodes = Vec::new();
        let mut gpus_per_node = 0;
        for g in &topology.node_groups {
            let names = (0..g.count).map(|i| format!("{}-{i}", g.name));
            match &g.gpu {
                None => cpu_nodes.extend(names),
                Some(gpu) if gpu.product == TEAM_GPU_PRODUCT => {
                    gpu_nodes.extend(names);
                    gpus_per_node = gpu.count as usize;
                }
                Some(_) => {}
            }
        }
        if cpu_nodes.is_empty() || gpu_nodes.is_empty() {
            return Err(BenchError::Options(format!(
                "the topology needs CPU nodes and {TEAM_GPU_PRODUCT} nodes for the other teams' pods"
            )));
        }
        Ok(Self {
            cpu_nodes,
            gpu_nodes,
            gpus_per_node,
        })
    }

    /// The most foreign pods whose GPU pods fit the other teams' GPUs.
    pub fn capacity(&self) -> usize {
        self.gpu_nodes.len() * self.gpus_per_node * GPU_EVERY
    }

    /// The node of foreign pod `i`.
    pub fn node(&self, i: usize) -> &str {
        if is_gpu(i) {
            &self.gpu_nodes[(i / GPU_EVERY) % self.gpu_nodes.len()]
        } else {
            &self.cpu_nodes[(i - i / GPU_EVERY) % self.cpu_nodes.len()]
        }
    }

    /// Namespace and name of foreign pod `i`.
    pub fn name(&self, i: usize) -> (String, String) {
        let w = i / REPLICAS_PER_WORKLOAD;
        let app = if is_gpu(i) {
            "trainer"
        } else {
            APPS[w % APPS.len()]
        };
        (
            format!("team-{}", w % TEAM_NAMESPACES),
            format!("{app}-{w}-{}-{}", hex(w as u64, 10), base36(i as u64, 5)),
        )
    }

    /// The first manager's apply body of foreign pod `i`: a Helm-made
    /// Deployment's pod in a service mesh.
    pub fn pod(&self, i: usize) -> Value {
        let (ns, name) = self.name(i);
        let w = i / REPLICAS_PER_WORKLOAD;
        let gpu = is_gpu(i);
        let app = name.rsplitn(4, '-').nth(3).unwrap_or("app").to_string();
        let instance = format!("{app}-{w}");
        let team = format!("team-{}", w % TEAM_NAMESPACES);
        let hash = hex(w as u64, 10);
        let image = format!("registry.example.com/{team}/{app}:1.14.{}", w % 7);
        let env = |pairs: &[(&str, String)]| -> Vec<Value> {
            pairs
                .iter()
                .map(|(k, v)| json!({"name": k, "value": v}))
                .collect()
        };
        let mut app_env = env(&[
            ("APP_ENV", "production".into()),
            ("LOG_LEVEL", "info".into()),
            ("HTTP_PORT", "8080".into()),
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "http://otel-collector.observability:4317".into(),
            ),
            ("DATABASE_HOST", format!("{app}-db.{team}.svc")),
        ]);
        app_env.extend([
            json!({"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}}),
            json!({"name": "DATABASE_PASSWORD", "valueFrom": {"secretKeyRef": {"name": format!("{app}-db"), "key": "password"}}}),
        ]);
        let mut app_resources = json!({
            "requests": {"cpu": "500m", "memory": "1Gi"},
            "limits": {"cpu": "2", "memory": "2Gi"}
        });
        if gpu {
            app_resources["requests"]["nvidia.com/gpu"] = json!("1");
            app_resources["limits"]["nvidia.com/gpu"] = json!("1");
        }
        let restricted = json!({
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "runAsNonRoot": true,
            "capabilities": {"drop": ["ALL"]}
        });
        let app_container = json!({
            "name": "app",
            "image": image,
            "args": ["--config=/etc/app/config.yaml", "--http-addr=:8080", "--metrics-addr=:9102"],
            "ports": [
                {"name": "http", "containerPort": 8080, "protocol": "TCP"},
                {"name": "metrics", "containerPort": 9102, "protocol": "TCP"}
            ],
            "env": app_env,
            "resources": app_resources,
            "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 10},
            "volumeMounts": [
                {"name": "config", "mountPath": "/etc/app", "readOnly": true},
                {"name": "tmp", "mountPath": "/tmp"}
            ],
            "securityContext": restricted
        });
        let proxy = json!({
            "name": "istio-proxy",
            "image": "docker.io/istio/proxyv2:1.24.2",
            "args": ["proxy", "sidecar", "--domain", format!("{ns}.svc.cluster.local"),
                     "--proxyLogLevel=warning"],
            "ports": [{"name": "http-envoy-prom", "containerPort": 15090, "protocol": "TCP"}],
            "env": env(&[
                ("CA_ADDR", "istiod.istio-system.svc:15012".into()),
                ("ISTIO_META_WORKLOAD_NAME", instance.clone()),
                ("ISTIO_META_OWNER", format!("kubernetes://apis/apps/v1/namespaces/{ns}/deployments/{instance}")),
            ]),
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "2", "memory": "1Gi"}},
            "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": 15021}, "periodSeconds": 15},
            "volumeMounts": [
                {"name": "istiod-ca-cert", "mountPath": "/var/run/secrets/istio"},
                {"name": "istio-token", "mountPath": "/var/run/secrets/tokens"}
            ],
            "securityContext": {"runAsUser": 1337, "runAsGroup": 1337, "runAsNonRoot": true}
        });
        let init = json!({
            "name": "istio-init",
            "image": "docker.io/istio/proxyv2:1.24.2",
            "args": ["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT"],
            "resources": {"requests": {"cpu": "10m", "memory": "40Mi"}},
            "securityContext": {"capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}}
        });
        let mut spec = json!({
            "nodeName": self.node(i),
            "initContainers": [init],
            "containers": [app_container, proxy],
            "volumes": [
                {"name": "config", "configMap": {"name": format!("{app}-config")}},
                {"name": "tmp", "emptyDir": {}},
                {"name": "istiod-ca-cert", "configMap": {"name": "istio-ca-root-cert"}},
                {"name": "istio-token", "projected": {"sources": [
                    {"serviceAccountToken": {"audience": "istio-ca", "expirationSeconds": 43200, "path": "istio-token"}}
                ]}}
            ],
            "securityContext": {"fsGroup": 2000, "seccompProfile": {"type": "RuntimeDefault"}}
        });
        if gpu {
            spec["tolerations"] =
                json!([{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]);
        }
        let istio_status = format!(
            "{{\"initContainers\":[\"istio-init\"],\"containers\":[\"istio-proxy\"],\"volumes\":[\"istio-token\",\"istiod-ca-cert\"],\"revision\":\"default\",\"template\":\"{hash}\"}}"
        );
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": ns,
                "labels": {
                    FOREIGN_LABEL: "true",
                    "app.kubernetes.io/name": app,
                    "app.kubernetes.io/instance": instance,
                    "app.kubernetes.io/version": format!("1.14.{}", w % 7),
                    "app.kubernetes.io/component": if gpu { "training" } else { "server" },
                    "app.kubernetes.io/part-of": team,
                    "app.kubernetes.io/managed-by": "Helm",
                    "helm.sh/chart": format!("{app}-3.2.{}", w % 5),
                    "pod-template-hash": hash,
                    "security.istio.io/tlsMode": "istio",
                    "service.istio.io/canonical-name": app,
                    "service.istio.io/canonical-revision": "v3",
                    "team": team
                },
                "annotations": {
                    "prometheus.io/scrape": "true",
                    "prometheus.io/port": "9102",
                    "prometheus.io/path": "/metrics",
                    "kubectl.kubernetes.io/default-container": "app",
                    "kubectl.kubernetes.io/restartedAt": "2026-11-30T09:12:44Z",
                    "checksum/config": hex(w as u64 ^ 0xc0f1, 64),
                    "sidecar.istio.io/status": istio_status,
                    "cluster-autoscaler.kubernetes.io/safe-to-evict": "true"
                }
            },
            "spec": spec
        })
    }

    /// The second manager's apply body of foreign pod `i` (a policy
    /// controller that labels and annotates pods).
    pub fn annotations(&self, i: usize) -> Value {
        let (ns, name) = self.name(i);
        let w = i / REPLICAS_PER_WORKLOAD;
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": ns,
                "labels": {"policy.example.com/tier": if w.is_multiple_of(3) { "gold" } else { "silver" }},
                "annotations": {
                    "policy.example.com/owner": format!("team-{}@example.com", w % TEAM_NAMESPACES),
                    "policy.example.com/cost-center": format!("cc-{:04}", w % 97),
                    "policy.example.com/audited": "2026-11-28T17:03:12Z",
                    "policy.example.com/report": hex(w as u64 ^ 0xa0d1, 40)
                }
            }
        })
    }
}

/// Memory figures of a process, KiB, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ProcMem {
    /// VmRSS: resident now.
    pub rss_kib: u64,
    /// VmHWM: the most ever resident.
    pub hwm_kib: u64,
    /// RssAnon: resident heap and stacks.
    pub anon_kib: u64,
}

/// Parses `/proc/<pid>/status`.
pub fn parse_status(text: &str) -> Option<ProcMem> {
    let field = |name: &str| {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(':')?;
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
    };
    Some(ProcMem {
        rss_kib: field("VmRSS")?,
        hwm_kib: field("VmHWM")?,
        anon_kib: field("RssAnon").unwrap_or(0),
    })
}

/// The memory of a running process.
pub fn proc_mem(pid: u32) -> Result<ProcMem> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).map_err(|e| BenchError::Process {
        what: format!("reading {path}"),
        reason: e.to_string(),
    })?;
    parse_status(&text).ok_or_else(|| BenchError::Parse {
        what: path,
        reason: "no VmRSS/VmHWM".into(),
    })
}

/// The sum of a counter's series whose labels include every one of `labels`
/// (`name="value"` pairs), from Prometheus text.
pub fn counter_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (series, value) = rest.rsplit_once(' ')?;
            let matches = (series.is_empty() && labels.is_empty())
                || (series.starts_with('{') && labels.iter().all(|lab| series.contains(lab)));
            if matches {
                value.trim().parse::<f64>().ok()
            } else {
                None
            }
        })
        .sum()
}

/// A workspace binary next to this one (target/<profile>/).
pub fn sibling_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().map_err(|e| BenchError::Process {
        what: "finding this executable".into(),
        reason: e.to_string(),
    })?;
    let path = exe
        .parent()
        .map(|d| d.join(name))
        .unwrap_or_else(|| PathBuf::from(name));
    if path.is_file() {
        Ok(path)
    } else {
        Err(BenchError::Binary { path })
    }
}

/// A model pod's processes: the engine simulator on the engine container's
/// port and served name, and the real sidecar with the arguments the
/// operator gave its container (the binaries found next to this one: the
/// benchmark measures processes, not images).
fn model_replica_profile() -> Result<Profile> {
    let args = [
        "--listen",
        "${POD_IP}:${ARG:engine:--port}",
        "--model",
        "${ARG:engine:--served-model-name}",
        "--load-file",
        "${POD_DIR}/load",
    ];
    Ok(Profile {
        processes: vec![
            ProcessSpec {
                name: "engine".into(),
                command: sibling_binary("strata-engine-sim")?,
                args: args.map(String::from).to_vec(),
                ..ProcessSpec::default()
            },
            ProcessSpec {
                name: "strata-sidecar".into(),
                command: sibling_binary("strata-sidecar")?,
                container_args: Some("strata-sidecar".into()),
                args: vec!["--nvml-lib=/nonexistent".into()],
                ..ProcessSpec::default()
            },
        ],
        restart: true,
        ..Profile::default()
    })
}

/// The operator as a local process.
struct Operator {
    child: Child,
    pid: u32,
    addr: SocketAddr,
}

impl Operator {
    async fn start(
        exe: &Path,
        kubeconfig: &Path,
        log: &Path,
        resync: u64,
        env: &[(String, String)],
    ) -> Result<Self> {
        let port = crate::ports::free_port().map_err(|e| BenchError::Process {
            what: "finding a free port".into(),
            reason: e.to_string(),
        })?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let out = std::fs::File::create(log).map_err(|e| BenchError::Process {
            what: format!("creating {}", log.display()),
            reason: e.to_string(),
        })?;
        let err = out.try_clone().map_err(|e| BenchError::Process {
            what: format!("opening {}", log.display()),
            reason: e.to_string(),
        })?;
        let child = Command::new(exe)
            .args([
                format!("--metrics-addr={addr}"),
                "--leader-elect=false".into(),
                "--lease-namespace=strata-system".into(),
                format!("--pod-label={RUN_LABEL}={PROFILE}"),
                "--sidecar-image=ghcr.io/strata-ai/strata-sidecar:bench".into(),
                format!("--resync-seconds={resync}"),
            ])
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| BenchError::Process {
                what: format!("starting {}", exe.display()),
                reason: e.to_string(),
            })?;
        let pid = child.id().ok_or_else(|| BenchError::Process {
            what: "strata-operator".into(),
            reason: "exited at once".into(),
        })?;
        Ok(Self { child, pid, addr })
    }

    fn check(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(BenchError::Process {
                what: "strata-operator".into(),
                reason: format!("exited ({status}); see its log"),
            }),
            Err(e) => Err(BenchError::Process {
                what: "strata-operator".into(),
                reason: e.to_string(),
            }),
        }
    }

    async fn metrics(&self) -> Result<String> {
        let r = crate::http::get(self.addr, "/metrics", Duration::from_secs(5))
            .await
            .map_err(|e| BenchError::Process {
                what: "the operator's /metrics".into(),
                reason: e.to_string(),
            })?;
        Ok(r.body)
    }

    /// Successful reconciles of Models and GPUPools so far.
    async fn reconciles(&self) -> Result<(f64, f64)> {
        let text = self.metrics().await?;
        let of = |c: &str| {
            counter_sum(
                &text,
                "strata_reconcile_total",
                &[&format!("controller=\"{c}\""), "result=\"success\""],
            )
        };
        Ok((of("model"), of("gpupool")))
    }

    /// SIGTERM, then SIGKILL after `grace`.
    async fn stop(mut self, grace: Duration) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
    }
}

/// The operator's memory over a measurement window.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Sample {
    /// Largest VmRSS sampled in the window, KiB.
    pub rss_max_kib: u64,
    /// VmRSS at the end of the window, KiB.
    pub rss_end_kib: u64,
    /// VmHWM at the end of the window (peak since the process started), KiB.
    pub hwm_kib: u64,
    /// RssAnon at the end of the window, KiB.
    pub anon_kib: u64,
    /// Successful Model and GPUPool reconciles during the window.
    pub reconciles: u64,
    /// Seconds from start (fresh) or from the last pod's creation (running)
    /// to settled.
    pub settle_seconds: f64,
}

/// Sizes of the pod list, bytes.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Sizes {
    /// Pods in the cluster.
    pub pods: usize,
    /// Foreign pods among them.
    pub foreign: usize,
    /// `GET /api/v1/pods`: every pod, compact JSON with managed fields
    /// (what the operator's watch receives).
    pub api_bytes: usize,
    /// `kubectl get pods -A -o json` (indented, without managed fields).
    pub kubectl_bytes: usize,
    /// Per foreign pod: compact JSON as the API server sends it.
    pub foreign_full: usize,
    /// Per foreign pod: without managed fields.
    pub foreign_no_managed_fields: usize,
    /// Per foreign pod: metadata only, without managed fields.
    pub foreign_metadata: usize,
}

/// A bare reflector's memory.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeResult {
    /// What it holds.
    pub mode: ProbeMode,
    /// Objects in its store.
    pub objects: usize,
    /// Largest VmRSS after sync, KiB.
    pub rss_kib: u64,
    /// VmHWM, KiB.
    pub hwm_kib: u64,
    /// Why it did not sync, if it did not.
    pub error: Option<String>,
}

/// What a probe's reflector holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ProbeMode {
    /// No watch: a client and one request (the floor of such a process).
    Baseline,
    /// Every pod as received (managed fields included).
    Full,
    /// Metadata-only watch (PartialObjectMeta), managed fields dropped.
    Metadata,
    /// Every pod as [`PodGpus`], as the operator's cluster-wide pod cache
    /// holds them: only identity and GPU claim are deserialized, everything
    /// else is skipped while parsing, never built.
    PodGpus,
    /// The same, the initial list in pages of 50 pods (the default: 500).
    PodGpusPage50,
    /// The same, the initial list streamed as watch events
    /// (`sendInitialEvents`, the WatchList feature) instead of pages.
    PodGpusStreaming,
}

impl ProbeMode {
    /// All, in table order.
    pub const ALL: [ProbeMode; 6] = [
        Self::Baseline,
        Self::Full,
        Self::Metadata,
        Self::PodGpus,
        Self::PodGpusPage50,
        Self::PodGpusStreaming,
    ];

    fn arg(self) -> &'static str {
        match self {
            Self::Baseline => "baseline",
            Self::Full => "full",
            Self::Metadata => "metadata",
            Self::PodGpus => "pod-gpus",
            Self::PodGpusPage50 => "pod-gpus-page50",
            Self::PodGpusStreaming => "pod-gpus-streaming",
        }
    }
}

/// One level's results.
#[derive(Debug, Clone, Serialize)]
pub struct Level {
    /// Foreign pods in the cluster.
    pub foreign: usize,
    /// Seconds to create this level's new pods and see them Running.
    pub create_seconds: f64,
    /// The operator that was running while the pods were added.
    pub running: Option<Sample>,
    /// Fresh operators started with the pods already there, one after
    /// another.
    pub fresh: Vec<Sample>,
    /// The pod list's sizes.
    pub sizes: Sizes,
    /// The bare reflectors.
    pub probes: Vec<ProbeResult>,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The machine.
    pub machine: String,
    /// Nodes in the world.
    pub nodes: usize,
    /// Models and their replicas.
    pub models: String,
    /// The measurement window, seconds.
    pub window_seconds: u64,
    /// The operator's --resync-seconds.
    pub resync_seconds: u64,
    /// Extra environment of the operator process.
    pub operator_env: Vec<(String, String)>,
    /// Levels, ascending.
    pub levels: Vec<Level>,
}

/// KiB values as MiB: one, or the median with the range.
fn spread(mut kib: Vec<u64>) -> String {
    kib.sort_unstable();
    match kib.as_slice() {
        [] => "-".into(),
        [one] => mib(*one),
        all => format!(
            "{} ({}-{})",
            mib(all[all.len() / 2]),
            mib(all[0]),
            mib(all[all.len() - 1])
        ),
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn human(bytes: usize) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}

impl Report {
    /// The Markdown tables of docs/benchmarks.md.
    pub fn markdown(&self) -> String {
        let mut s = format!(
            "Machine: {}. World: {} simulated nodes; {}. RSS sampled every {} ms over a {} s window once settled (operator --resync-seconds={}).\n\n",
            self.machine,
            self.nodes,
            self.models,
            SAMPLE_EVERY.as_millis(),
            self.window_seconds,
            self.resync_seconds
        );
        if !self.operator_env.is_empty() {
            let env: Vec<String> = self
                .operator_env
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            s.push_str(&format!("Operator environment: `{}`.\n\n", env.join(" ")));
        }
        let runs = self.levels.iter().map(|l| l.fresh.len()).max().unwrap_or(0);
        s.push_str(&format!("**The operator's memory** (MiB; max VmRSS in the window, VmHWM = peak since the process started; fresh: {runs} operator(s) started one after another, median (min-max)):\n\n"));
        s.push_str("| Foreign pods | Fresh operator: VmRSS | VmHWM | RssAnon | Running since the previous level: VmRSS | VmHWM | Reconciles in window (fresh, fewest) | Fresh start to settled (s, slowest) |\n|---|---|---|---|---|---|---|---|\n");
        for l in &self.levels {
            let (run_rss, run_hwm) = l.running.map_or(("-".to_string(), "-".to_string()), |r| {
                (mib(r.rss_max_kib), mib(r.hwm_kib))
            });
            let of = |f: fn(&Sample) -> u64| spread(l.fresh.iter().map(f).collect());
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {:.1} |\n",
                l.foreign,
                of(|x| x.rss_max_kib),
                of(|x| x.hwm_kib),
                of(|x| x.anon_kib),
                run_rss,
                run_hwm,
                l.fresh.iter().map(|x| x.reconciles).min().unwrap_or(0),
                l.fresh.iter().map(|x| x.settle_seconds).fold(0.0, f64::max)
            ));
        }
        s.push_str(
            "\n**The pod list** (all pods of the cluster; per foreign pod, compact JSON):\n\n",
        );
        s.push_str("| Foreign pods | Pods | `GET /api/v1/pods` | `kubectl get pods -A -o json` | per pod: as sent | without managedFields | metadata only |\n|---|---|---|---|---|---|---|\n");
        for l in &self.levels {
            let z = &l.sizes;
            let per = |b: usize| {
                if z.foreign == 0 {
                    "-".to_string()
                } else {
                    format!("{b} B")
                }
            };
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                l.foreign,
                z.pods,
                human(z.api_bytes),
                human(z.kubectl_bytes),
                per(z.foreign_full),
                per(z.foreign_no_managed_fields),
                per(z.foreign_metadata)
            ));
        }
        if self.levels.iter().any(|l| !l.probes.is_empty()) {
            s.push_str("\n**A bare reflector of every pod** (kube-rs watcher + store as the operator uses them, nothing else; MiB, VmRSS after sync / VmHWM):\n\n");
            s.push_str("| Foreign pods |");
            for m in ProbeMode::ALL {
                s.push_str(&format!(" {} |", m.arg()));
            }
            s.push_str("\n|---|");
            for _ in ProbeMode::ALL {
                s.push_str("---|");
            }
            s.push('\n');
            for l in &self.levels {
                s.push_str(&format!("| {} |", l.foreign));
                for m in ProbeMode::ALL {
                    match l.probes.iter().find(|p| p.mode == m) {
                        Some(p) if p.error.is_some() => s.push_str(" did not sync |"),
                        Some(p) => {
                            s.push_str(&format!(" {} / {} |", mib(p.rss_kib), mib(p.hwm_kib)))
                        }
                        None => s.push_str(" - |"),
                    }
                }
                s.push('\n');
            }
        }
        s
    }
}

/// The pinned upstream Kubernetes binaries (built once, then cached).
pub(crate) async fn upstream_binaries() -> Result<PathBuf> {
    Ok(tokio::task::spawn_blocking(crate::tools::ensure_binaries)
        .await
        .map_err(|e| BenchError::Process {
            what: "finding the upstream binaries".into(),
            reason: e.to_string(),
        })??)
}

pub(crate) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| parse_kib_field(&t, "MemTotal"))
        .map_or_else(
            || "?".into(),
            |k| format!("{:.0} GiB", k as f64 / 1024.0 / 1024.0),
        );
    format!("{cores} cores ({cpu}), {mem} memory")
}

fn parse_kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        l.strip_prefix(name)?
            .strip_prefix(':')?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    })
}

/// The Models the operator serves.
fn models() -> Result<Vec<Model>> {
    let sample = crate::harness::repo_yaml("samples/model-llama.yaml")?;
    let make = |name: &str, autoscaling: Value, extra: Value| -> Result<Model> {
        let mut m = sample.clone();
        m["metadata"] = json!({"name": name, "namespace": MODELS_NAMESPACE});
        m["spec"]["pools"] = json!([{"name": MODEL_POOL}]);
        m["spec"]["autoscaling"] = autoscaling;
        if let (Some(spec), Some(extra)) = (m["spec"].as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                spec.insert(k.clone(), v.clone());
            }
        }
        serde_json::from_value(m).map_err(|e| BenchError::Parse {
            what: format!("Model {name}"),
            reason: e.to_string(),
        })
    };
    Ok(vec![
        make("chat", json!({"mode": "Manual"}), json!({"replicas": 2}))?,
        make("code", json!({"mode": "Manual"}), json!({"replicas": 1}))?,
        make(
            "summarize",
            json!({"mode": "SLA", "interval": "15s", "window": "1m"}),
            json!({"minReplicas": 1, "maxReplicas": 2}),
        )?,
    ])
}

fn model_settled(m: &Model) -> bool {
    let Some(s) = &m.status else { return false };
    s.observed_generation == m.metadata.generation
        && s.replicas >= 1
        && s.ready_replicas == s.replicas
        && s.desired_replicas.is_none_or(|d| d == s.replicas)
}

/// The benchmark, with its world.
pub struct Bench {
    opts: Options,
    cluster: Cluster,
    runner: PodRunner,
    client: Client,
    layout: Layout,
    operator_exe: PathBuf,
    sa_kubeconfig: PathBuf,
    created: usize,
    log_dir: PathBuf,
    operator_starts: u32,
}

/// A kubeconfig with a token of the chart's ServiceAccount
/// (`strata-system/strata-operator`), written next to the world's files:
/// an operator run as a local process gets exactly the chart's RBAC.
pub(crate) async fn chart_operator_kubeconfig(
    client: &Client,
    info: &crate::cluster::ClusterInfo,
) -> Result<PathBuf> {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), "strata-system");
    let req = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: None,
            expiration_seconds: Some(6 * 3600),
            bound_object_ref: None,
        }),
        ..TokenRequest::default()
    };
    let token = api
        .create_token_request("strata-operator", &PostParams::default(), &req)
        .await
        .map_err(kube_err("TokenRequest for strata-system/strata-operator"))?
        .status
        .and_then(|s| s.token)
        .ok_or_else(|| BenchError::Parse {
            what: "the TokenRequest".into(),
            reason: "no token".into(),
        })?;
    let admin = std::fs::read_to_string(&info.kubeconfig).map_err(|e| BenchError::Process {
        what: format!("reading {}", info.kubeconfig.display()),
        reason: e.to_string(),
    })?;
    let ca = admin
        .lines()
        .find_map(|l| l.trim().strip_prefix("certificate-authority: "))
        .ok_or_else(|| BenchError::Parse {
            what: "the admin kubeconfig".into(),
            reason: "no certificate-authority".into(),
        })?;
    let path = info.dir.join("sa-strata-operator.kubeconfig");
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: bench\n  cluster:\n    server: {}\n    certificate-authority: {ca}\nusers:\n- name: strata-operator\n  user:\n    token: {token}\ncontexts:\n- name: bench\n  context:\n    cluster: bench\n    user: strata-operator\n    namespace: strata-system\ncurrent-context: bench\n",
        info.server
    );
    std::fs::write(&path, text).map_err(|e| BenchError::Process {
        what: format!("writing {}", path.display()),
        reason: e.to_string(),
    })?;
    Ok(path)
}

impl Bench {
    /// Brings up the world (cluster, pod runner, chart, pools, Models,
    /// namespaces of the other teams).
    pub async fn start(opts: Options) -> Result<Self> {
        let topology = Topology::load(&opts.topology)?;
        let layout = Layout::from_topology(&topology)?;
        opts.check(&layout)?;
        let operator_exe = sibling_binary("strata-operator")?;
        let profile = model_replica_profile()?;
        let bin_dir = upstream_binaries().await?;
        let cluster = Cluster::start(crate::cluster::Options {
            dir: opts.dir.clone(),
            topology: opts.topology.clone(),
            bin_dir,
            timeout: opts.timeout,
        })
        .await?;
        tracing::info!(
            seconds = %format!("{:.0}", cluster.info.startup_seconds),
            nodes = cluster.info.nodes.len(),
            "world up"
        );
        let runner = PodRunner::start(
            &cluster.info.kubeconfig,
            RunnerConfig {
                profiles: BTreeMap::from([(PROFILE.to_string(), profile)]),
                ..RunnerConfig::default()
            },
            &cluster.info.log_dir,
        )
        .await?;
        let client = client_from(&cluster.info.kubeconfig).await?;
        let log_dir = cluster.info.log_dir.clone();
        let mut bench = Self {
            opts,
            cluster,
            runner,
            client,
            layout,
            operator_exe,
            sa_kubeconfig: PathBuf::new(),
            created: 0,
            log_dir,
            operator_starts: 0,
        };
        bench.install().await?;
        Ok(bench)
    }

    async fn tool(&self, tool: &str, args: &[&str]) -> Result<Vec<u8>> {
        let helm = self.cluster.info.dir.join("helm");
        let out = Command::new(self.cluster.info.bin_dir.join(tool))
            .args(args)
            .env("KUBECONFIG", &self.cluster.info.kubeconfig)
            .env("HELM_CACHE_HOME", helm.join("cache"))
            .env("HELM_CONFIG_HOME", helm.join("config"))
            .env("HELM_DATA_HOME", helm.join("data"))
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| BenchError::Process {
                what: format!("running {tool}"),
                reason: e.to_string(),
            })?;
        if !out.status.success() {
            return Err(BenchError::Process {
                what: format!("{tool} {}", args.join(" ")),
                reason: format!(
                    "{}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        Ok(out.stdout)
    }

    async fn install(&mut self) -> Result<()> {
        let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/strata");
        let chart = chart.to_string_lossy();
        self.tool(
            "helm",
            &[
                "upgrade",
                "--install",
                "strata",
                &chart,
                "--namespace",
                "strata-system",
                "--create-namespace",
                "--set",
                "replicaCount=0",
                "--wait",
                "--timeout",
                "2m",
            ],
        )
        .await?;
        self.sa_kubeconfig = self.service_account_kubeconfig().await?;

        let pools: Api<GPUPool> = Api::all(self.client.clone());
        let h100: GPUPool =
            serde_json::from_value(crate::harness::repo_yaml("samples/gpupool-h100.yaml")?)
                .map_err(|e| BenchError::Parse {
                    what: "samples/gpupool-h100.yaml".into(),
                    reason: e.to_string(),
                })?;
        let team: GPUPool = serde_json::from_value(json!({
            "apiVersion": "strata.ai/v1alpha1",
            "kind": "GPUPool",
            "metadata": {"name": TEAM_POOL},
            "spec": {
                "nodeSelector": {"matchLabels": {"nvidia.com/gpu.product": TEAM_GPU_PRODUCT}},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
            }
        }))
        .map_err(|e| BenchError::Parse {
            what: "the team pool".into(),
            reason: e.to_string(),
        })?;
        for p in [h100, team] {
            pools
                .create(&PostParams::default(), &p)
                .await
                .map_err(kube_err(format!("creating GPUPool {}", p.name_any())))?;
        }

        let mut namespaces = vec![MODELS_NAMESPACE.to_string()];
        namespaces.extend((0..TEAM_NAMESPACES).map(|t| format!("team-{t}")));
        let ns_api: Api<Namespace> = Api::all(self.client.clone());
        for ns in &namespaces {
            let obj: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}}))
                .map_err(|e| BenchError::Parse {
                    what: format!("namespace {ns}"),
                    reason: e.to_string(),
                })?;
            ns_api
                .create(&PostParams::default(), &obj)
                .await
                .map_err(kube_err(format!("creating namespace {ns}")))?;
        }
        // Pods are refused until the namespace's default ServiceAccount exists.
        for ns in &namespaces {
            let sas: Api<ServiceAccount> = Api::namespaced(self.client.clone(), ns);
            poll_until(
                &format!("ServiceAccount {ns}/default"),
                self.opts.timeout,
                Duration::from_millis(200),
                || {
                    let sas = sas.clone();
                    async move { Ok(sas.get_opt("default").await.ok().flatten().is_some()) }
                },
            )
            .await?;
        }

        let secret: Secret = serde_json::from_value(
            json!({"metadata": {"name": "hf-token"}, "stringData": {"HF_TOKEN": "hf_bench"}}),
        )
        .map_err(|e| BenchError::Parse {
            what: "the hf-token Secret".into(),
            reason: e.to_string(),
        })?;
        Api::<Secret>::namespaced(self.client.clone(), MODELS_NAMESPACE)
            .create(&PostParams::default(), &secret)
            .await
            .map_err(kube_err("creating Secret hf-token"))?;
        let model_api: Api<Model> = Api::namespaced(self.client.clone(), MODELS_NAMESPACE);
        for m in models()? {
            model_api
                .create(&PostParams::default(), &m)
                .await
                .map_err(kube_err(format!("creating Model {}", m.name_any())))?;
        }
        Ok(())
    }

    /// A kubeconfig with a token of the chart's ServiceAccount (the
    /// operator runs with exactly its RBAC).
    async fn service_account_kubeconfig(&self) -> Result<PathBuf> {
        chart_operator_kubeconfig(&self.client, &self.cluster.info).await
    }

    async fn start_operator(&mut self) -> Result<Operator> {
        self.operator_starts += 1;
        let log = self
            .log_dir
            .join(format!("strata-operator-{}.log", self.operator_starts));
        Operator::start(
            &self.operator_exe,
            &self.sa_kubeconfig,
            &log,
            self.opts.resync_seconds,
            &self.opts.operator_env,
        )
        .await
    }

    /// Creates foreign pods `from..to` (the last one once every other is
    /// Running), bounded in flight, and waits until all are Running.
    async fn add_pods(&mut self, to: usize) -> Result<()> {
        let from = self.created;
        if to <= from {
            return Ok(());
        }
        let write = |i: usize| {
            let client = self.client.clone();
            let layout = &self.layout;
            async move {
                let (ns, name) = layout.name(i);
                let api: Api<Pod> = Api::namespaced(client, &ns);
                api.patch(
                    &name,
                    &PatchParams::apply("team-deployer").force(),
                    &Patch::Apply(layout.pod(i)),
                )
                .await
                .map_err(kube_err(format!("applying pod {ns}/{name}")))?;
                api.patch(
                    &name,
                    &PatchParams::apply("policy-controller").force(),
                    &Patch::Apply(layout.annotations(i)),
                )
                .await
                .map_err(kube_err(format!("annotating pod {ns}/{name}")))?;
                Ok::<_, BenchError>(())
            }
        };
        let started = Instant::now();
        futures::stream::iter(from..to - 1)
            .map(&write)
            .buffer_unordered(self.opts.concurrency)
            .try_collect::<Vec<()>>()
            .await?;
        tracing::info!(
            pods = to - 1 - from,
            seconds = %format!("{:.1}", started.elapsed().as_secs_f64()),
            "created"
        );
        let deadline = self.opts.timeout + Duration::from_millis(60 * (to - from) as u64);
        self.wait_all_running(deadline).await?;
        // The last pod of the level (a GPU pod) goes in only now: once the
        // operator's cache holds it, it holds every event before it.
        write(to - 1).await?;
        let (ns, name) = self.layout.name(to - 1);
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        poll_until(
            &format!("pod {ns}/{name} Running"),
            self.opts.timeout,
            Duration::from_millis(200),
            || {
                let api = api.clone();
                let name = name.clone();
                async move {
                    let pod = api.get(&name).await.map_err(crate::Error::Kube)?;
                    Ok(pod.status.and_then(|s| s.phase).as_deref() == Some("Running"))
                }
            },
        )
        .await?;
        self.created = to;
        Ok(())
    }

    async fn wait_all_running(&self, timeout: Duration) -> Result<()> {
        let api: Api<Pod> = Api::all(self.client.clone());
        let lp = ListParams::default()
            .labels(&format!("{FOREIGN_LABEL}=true"))
            .fields("status.phase!=Running")
            .match_any();
        poll_until(
            "every foreign pod Running",
            timeout,
            Duration::from_secs(2),
            || {
                let api = api.clone();
                let lp = lp.clone();
                async move {
                    let left = api.list_metadata(&lp).await.map_err(crate::Error::Kube)?;
                    tracing::debug!(left = left.items.len(), "foreign pods not Running yet");
                    Ok(left.items.is_empty())
                }
            },
        )
        .await?;
        Ok(())
    }

    /// Waits until `op` is ready, has reconciled every Model and pool, the
    /// Models are ready and the team pool counts every foreign GPU pod; then
    /// samples its memory over the window.
    async fn settle_and_measure(&self, op: &mut Operator, since: Instant) -> Result<Sample> {
        let timeout = self.opts.timeout;
        let every = Duration::from_millis(250);
        let deadline = Instant::now() + timeout;
        loop {
            op.check()?;
            if crate::http::get(op.addr, "/readyz", Duration::from_secs(2))
                .await
                .is_ok_and(|r| r.status == 200)
            {
                break;
            }
            if Instant::now() >= deadline {
                return Err(crate::Error::Timeout {
                    what: "the operator's /readyz (caches synced)".into(),
                    seconds: timeout.as_secs(),
                }
                .into());
            }
            tokio::time::sleep(every).await;
        }
        let model_count = models()?.len() as f64;
        loop {
            op.check()?;
            let (m, p) = op.reconciles().await?;
            if m >= model_count && p >= 2.0 {
                break;
            }
            if Instant::now() >= deadline {
                return Err(crate::Error::Timeout {
                    what: format!(
                        "the operator to reconcile every Model and pool (models {m}, pools {p})"
                    ),
                    seconds: timeout.as_secs(),
                }
                .into());
            }
            tokio::time::sleep(every).await;
        }
        let model_api: Api<Model> = Api::namespaced(self.client.clone(), MODELS_NAMESPACE);
        poll_until("every Model ready", timeout, every, || {
            let api = model_api.clone();
            async move {
                let list = api
                    .list(&ListParams::default())
                    .await
                    .map_err(crate::Error::Kube)?;
                Ok(!list.items.is_empty() && list.items.iter().all(model_settled))
            }
        })
        .await?;
        let expected = gpu_pods(self.created) as i32;
        let pools: Api<GPUPool> = Api::all(self.client.clone());
        poll_until(
            &format!("pool {TEAM_POOL} counting {expected} GPUs of other teams"),
            timeout,
            every,
            || {
                let pools = pools.clone();
                async move {
                    let p = pools.get(TEAM_POOL).await.map_err(crate::Error::Kube)?;
                    Ok(p.status.is_some_and(|s| s.gpu_allocated == expected))
                }
            },
        )
        .await?;
        let settle_seconds = since.elapsed().as_secs_f64();

        // The window.
        let (m0, p0) = op.reconciles().await?;
        let start = Instant::now();
        let mut sample = Sample {
            settle_seconds,
            ..Sample::default()
        };
        loop {
            op.check()?;
            let mem = proc_mem(op.pid)?;
            sample.rss_max_kib = sample.rss_max_kib.max(mem.rss_kib);
            sample.rss_end_kib = mem.rss_kib;
            sample.hwm_kib = mem.hwm_kib;
            sample.anon_kib = mem.anon_kib;
            if start.elapsed() >= self.opts.window {
                break;
            }
            tokio::time::sleep(SAMPLE_EVERY).await;
        }
        let (m1, p1) = op.reconciles().await?;
        sample.reconciles = ((m1 - m0) + (p1 - p0)).max(0.0) as u64;
        Ok(sample)
    }

    async fn sizes(&self) -> Result<Sizes> {
        let req = http::Request::get("/api/v1/pods")
            .body(Vec::new())
            .map_err(|e| BenchError::Parse {
                what: "GET /api/v1/pods".into(),
                reason: e.to_string(),
            })?;
        let body = self
            .client
            .request_text(req)
            .await
            .map_err(kube_err("GET /api/v1/pods"))?;
        let list: ObjectList<Pod> = serde_json::from_str(&body).map_err(|e| BenchError::Parse {
            what: "the pod list".into(),
            reason: e.to_string(),
        })?;
        let kubectl = self
            .tool("kubectl", &["get", "pods", "-A", "-o", "json"])
            .await?;
        let mut z = Sizes {
            pods: list.items.len(),
            api_bytes: body.len(),
            kubectl_bytes: kubectl.len(),
            ..Sizes::default()
        };
        let (mut full, mut no_mf, mut meta) = (0, 0, 0);
        for mut p in list.items {
            if !p.labels().contains_key(FOREIGN_LABEL) {
                continue;
            }
            z.foreign += 1;
            full += json_len(&p);
            p.metadata.managed_fields = None;
            no_mf += json_len(&p);
            meta += json_len(&p.metadata);
        }
        let per = |total: usize| total.checked_div(z.foreign).unwrap_or(0);
        z.foreign_full = per(full);
        z.foreign_no_managed_fields = per(no_mf);
        z.foreign_metadata = per(meta);
        Ok(z)
    }

    async fn probe(&self, mode: ProbeMode, expected: usize) -> Result<ProbeResult> {
        let exe = std::env::current_exe().map_err(|e| BenchError::Process {
            what: "finding this executable".into(),
            reason: e.to_string(),
        })?;
        let mut child = Command::new(exe)
            .args(["probe", "--mode", mode.arg(), "--kubeconfig"])
            .arg(&self.cluster.info.kubeconfig)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| BenchError::Process {
                what: "starting a probe".into(),
                reason: e.to_string(),
            })?;
        let pid = child.id().unwrap_or_default();
        let stdout = child.stdout.take().ok_or_else(|| BenchError::Process {
            what: "a probe".into(),
            reason: "no stdout".into(),
        })?;
        let mut line = String::new();
        let limit = self.opts.timeout.min(Duration::from_secs(120));
        let read = tokio::time::timeout(limit, BufReader::new(stdout).read_line(&mut line)).await;
        let failed = |error: String| ProbeResult {
            mode,
            objects: 0,
            rss_kib: 0,
            hwm_kib: 0,
            error: Some(error),
        };
        let objects = match read {
            Err(_) => None,
            Ok(Err(e)) => return Ok(failed(format!("reading its answer: {e}"))),
            Ok(Ok(_)) => serde_json::from_str::<Value>(line.trim())
                .ok()
                .and_then(|v| v["objects"].as_u64()),
        };
        let Some(objects) = objects else {
            let _ = child.start_kill();
            let status = child
                .wait()
                .await
                .map(|s| s.to_string())
                .unwrap_or_default();
            let why = if read.is_err() {
                format!("not synced within {} s", limit.as_secs())
            } else {
                format!("exited ({status}) without syncing; see its log above")
            };
            tracing::warn!(probe = mode.arg(), "{why}");
            return Ok(failed(why));
        };
        let objects = objects as usize;
        if mode != ProbeMode::Baseline && objects < expected {
            return Err(BenchError::Process {
                what: format!("the {} probe", mode.arg()),
                reason: format!("holds {objects} pods, expected at least {expected}"),
            });
        }
        // A short window: the probe does nothing after its sync.
        let mut rss = 0;
        let mut hwm = 0;
        for _ in 0..4 {
            let m = proc_mem(pid)?;
            rss = rss.max(m.rss_kib);
            hwm = m.hwm_kib;
            tokio::time::sleep(SAMPLE_EVERY).await;
        }
        drop(child.stdin.take());
        if tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .is_err()
        {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        Ok(ProbeResult {
            mode,
            objects,
            rss_kib: rss,
            hwm_kib: hwm,
            error: None,
        })
    }

    /// Runs every level and returns the report.
    pub async fn run(&mut self) -> Result<Report> {
        let levels = self.opts.levels.clone();
        let mut out = Vec::new();
        let mut running: Option<Operator> = None;
        for level in levels {
            let created = Instant::now();
            self.add_pods(level).await?;
            let create_seconds = created.elapsed().as_secs_f64();
            let all_running = Instant::now();
            let running_sample = match running.as_mut() {
                Some(op) => Some(self.settle_and_measure(op, all_running).await?),
                None => None,
            };
            if let Some(op) = running.take() {
                op.stop(Duration::from_secs(10)).await;
            }
            let mut fresh = Vec::new();
            for run in 0..self.opts.fresh_runs {
                let started = Instant::now();
                let mut op = self.start_operator().await?;
                fresh.push(self.settle_and_measure(&mut op, started).await?);
                if run + 1 < self.opts.fresh_runs {
                    op.stop(Duration::from_secs(10)).await;
                } else {
                    running = Some(op);
                }
            }
            let sizes = self.sizes().await?;
            let mut probes = Vec::new();
            if self.opts.probes {
                for mode in ProbeMode::ALL {
                    probes.push(self.probe(mode, sizes.foreign).await?);
                }
            }
            let l = Level {
                foreign: level,
                create_seconds,
                running: running_sample,
                fresh: fresh.clone(),
                sizes,
                probes,
            };
            tracing::info!(
                foreign = level,
                fresh_rss_mib = %spread(fresh.iter().map(|x| x.rss_max_kib).collect()),
                fresh_hwm_mib = %spread(fresh.iter().map(|x| x.hwm_kib).collect()),
                running_rss_mib = ?running_sample.map(|s| mib(s.rss_max_kib)),
                "level measured"
            );
            out.push(l);
        }
        if let Some(op) = running.take() {
            op.stop(Duration::from_secs(10)).await;
        }
        let replicas: i32 = Api::<Model>::namespaced(self.client.clone(), MODELS_NAMESPACE)
            .list(&ListParams::default())
            .await
            .map_err(kube_err("listing Models"))?
            .items
            .iter()
            .filter_map(|m| m.status.as_ref().map(|s| s.replicas))
            .sum();
        Ok(Report {
            machine: machine(),
            nodes: self.cluster.info.nodes.len(),
            models: format!(
                "{} Models with {replicas} replicas (the real sidecar in front of the engine simulator), 2 GPUPools",
                models()?.len()
            ),
            window_seconds: self.opts.window.as_secs(),
            resync_seconds: self.opts.resync_seconds,
            operator_env: self.opts.operator_env.clone(),
            levels: out,
        })
    }

    /// Stops the pod runner and the world.
    pub async fn shutdown(self) {
        self.runner.stop().await;
        self.cluster.shutdown(self.opts.keep).await;
    }
}

/// Bytes of `v` as compact JSON.
fn json_len<T: Serialize>(v: &T) -> usize {
    serde_json::to_vec(v).map_or(0, |v| v.len())
}

/// The probe process: a reflector of every pod in `mode`; prints
/// `{"objects": N}` once synced and holds its store until standard input
/// closes.
pub async fn probe(kubeconfig: &Path, mode: ProbeMode) -> Result<()> {
    let client = client_from(kubeconfig).await?;
    let store_err = |e: reflector::store::WriterDropped| BenchError::Process {
        what: "the probe's store".into(),
        reason: e.to_string(),
    };
    match mode {
        ProbeMode::Baseline => {
            client
                .apiserver_version()
                .await
                .map_err(kube_err("GET /version"))?;
            synced_until_stdin_eof(0).await;
        }
        ProbeMode::Full => {
            let (reader, writer) = reflector::store();
            let stream = reflector::reflector(
                writer,
                watcher(Api::<Pod>::all(client.clone()), watcher::Config::default())
                    .default_backoff(),
            );
            tokio::spawn(stream.for_each(|_| async {}));
            reader.wait_until_ready().await.map_err(store_err)?;
            synced_until_stdin_eof(reader.state().len()).await;
        }
        ProbeMode::Metadata => {
            let (reader, writer) = reflector::store();
            let stream = reflector::reflector(
                writer,
                watcher(
                    Api::<PartialObjectMeta<Pod>>::all(client.clone()),
                    watcher::Config::default(),
                )
                .default_backoff()
                .modify(|m| m.metadata.managed_fields = None),
            );
            tokio::spawn(stream.for_each(|_| async {}));
            reader.wait_until_ready().await.map_err(store_err)?;
            synced_until_stdin_eof(reader.state().len()).await;
        }
        ProbeMode::PodGpus | ProbeMode::PodGpusPage50 | ProbeMode::PodGpusStreaming => {
            let config = match mode {
                ProbeMode::PodGpusPage50 => watcher::Config::default().page_size(50),
                ProbeMode::PodGpusStreaming => watcher::Config::default().streaming_lists(),
                _ => watcher::Config::default(),
            };
            let (reader, writer) = reflector::store();
            let stream = reflector::reflector(
                writer,
                watcher(Api::<PodGpus>::all(client.clone()), config).default_backoff(),
            );
            tokio::spawn(stream.for_each(|_| async {}));
            reader.wait_until_ready().await.map_err(store_err)?;
            synced_until_stdin_eof(reader.state().len()).await;
        }
    }
    Ok(())
}

/// Reports the store's size and waits (holding it) until stdin closes.
async fn synced_until_stdin_eof(objects: usize) {
    println!("{}", json!({ "objects": objects }));
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    while let Ok(n) = stdin.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_core::podgpus::GpuClaim;

    fn layout() -> Layout {
        let topo = Topology::load(&Options::default_topology()).expect("bench topology");
        Layout::from_topology(&topo).expect("layout")
    }

    #[test]
    fn foreign_pods_are_realistic_never_run_by_the_pod_runner_and_fit_their_nodes() {
        let l = layout();
        assert_eq!(l.gpu_nodes.len(), 16);
        assert_eq!(l.cpu_nodes.len(), 48);
        assert!(l.capacity() >= 5000, "{}", l.capacity());
        let mut per_gpu_node: BTreeMap<&str, usize> = BTreeMap::new();
        let mut per_cpu_node: BTreeMap<&str, usize> = BTreeMap::new();
        let mut names = std::collections::BTreeSet::new();
        for i in 0..5000 {
            let pod = l.pod(i);
            let labels = pod["metadata"]["labels"].as_object().expect("labels");
            assert!(
                !labels.contains_key(RUN_LABEL),
                "pod {i} would get processes"
            );
            assert!(
                !labels.contains_key("strata.ai/model"),
                "pod {i} would count as Strata's"
            );
            let (ns, name) = l.name(i);
            assert_eq!(pod["metadata"]["name"], json!(name));
            assert_eq!(pod["metadata"]["namespace"], json!(ns));
            assert!(
                name.len() <= 63 && names.insert((ns, name.clone())),
                "{name}"
            );
            let parsed: Pod = serde_json::from_value(pod.clone()).expect("a valid Pod");
            let gpus = strata_core::view::pod_gpu_requests(&parsed);
            if is_gpu(i) {
                assert_eq!(gpus.get("nvidia.com/gpu"), Some(&1), "pod {i}");
                *per_gpu_node.entry(l.node(i)).or_default() += 1;
                assert!(l.gpu_nodes.iter().any(|n| n == l.node(i)));
            } else {
                assert!(gpus.is_empty(), "pod {i}");
                *per_cpu_node.entry(l.node(i)).or_default() += 1;
            }
            // What the API server adds (managed fields, status, the
            // service account's volume) about doubles it.
            let size = serde_json::to_vec(&pod).expect("json").len();
            assert!((3000..5000).contains(&size), "pod {i}: {size} bytes");
        }
        assert_eq!(per_gpu_node.values().sum::<usize>(), gpu_pods(5000));
        assert!(per_gpu_node.values().all(|n| *n <= l.gpus_per_node));
        assert!(per_cpu_node.values().all(|n| *n <= 110), "{per_cpu_node:?}");
        // Deterministic.
        assert_eq!(l.pod(4321), l.pod(4321));
        assert_eq!(
            l.annotations(7)["metadata"]["name"],
            l.pod(7)["metadata"]["name"]
        );
    }

    #[test]
    fn the_pod_gpus_probe_holds_the_claims_of_the_full_pods() {
        let l = layout();
        for i in [0, 48, 49, 99, 4999] {
            let mut pod = l.pod(i);
            pod["metadata"]["managedFields"] = json!([{"manager": "x", "operation": "Apply",
                "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}]);
            pod["metadata"]["uid"] = json!(format!("uid-{i}"));
            pod["metadata"]["resourceVersion"] = json!("7");
            pod["status"] = json!({"phase": "Running", "podIP": "127.64.0.9",
                "conditions": [{"type": "Ready", "status": "True"}]});
            let full: Pod = serde_json::from_value(pod.clone()).expect("pod");
            let lean: PodGpus = serde_json::from_value(pod).expect("lean");
            assert_eq!(lean.claim, GpuClaim::of(&full), "pod {i}");
            assert_eq!(lean.claim.node.as_deref(), Some(l.node(i)));
            assert!(lean.claim.counts());
            assert_eq!(
                lean.claim.gpus.get("nvidia.com/gpu").copied(),
                is_gpu(i).then_some(1),
                "pod {i}"
            );
            assert_eq!(lean.metadata.name, full.metadata.name);
            assert_eq!(lean.metadata.namespace, full.metadata.namespace);
            assert_eq!(lean.metadata.uid, full.metadata.uid);
            assert_eq!(
                lean.metadata.resource_version,
                full.metadata.resource_version
            );
            assert!(
                lean.metadata.managed_fields.is_none()
                    && lean.metadata.labels.is_none()
                    && lean.metadata.annotations.is_none()
            );
        }
        // A finished GPU pod claims its GPUs no more, as for the full pod.
        let mut done = l.pod(49);
        done["status"] = json!({"phase": "Succeeded"});
        let full: Pod = serde_json::from_value(done.clone()).expect("pod");
        let lean: PodGpus = serde_json::from_value(done).expect("lean");
        assert_eq!(lean.claim, GpuClaim::of(&full));
        assert!(!lean.claim.counts());
    }

    #[test]
    fn levels_end_with_a_gpu_pod_and_fit_the_topology() {
        let l = layout();
        let opts = |levels: Vec<usize>| Options {
            levels,
            window: Duration::from_secs(1),
            concurrency: 4,
            topology: Options::default_topology(),
            dir: None,
            keep: false,
            probes: false,
            timeout: Duration::from_secs(1),
            resync_seconds: 15,
            operator_env: Vec::new(),
            fresh_runs: 1,
        };
        assert!(opts(vec![0, 1000, 5000]).check(&l).is_ok());
        assert!(is_gpu(999) && is_gpu(4999) && is_gpu(199));
        assert!(opts(vec![0, 1001]).check(&l).is_err());
        assert!(opts(vec![1000, 0]).check(&l).is_err());
        assert!(opts(vec![l.capacity() + GPU_EVERY]).check(&l).is_err());
    }

    #[test]
    fn reads_proc_status_and_counters() {
        let status = "Name:\tstrata-operator\nVmPeak:\t  900000 kB\nVmHWM:\t   41234 kB\nVmRSS:\t   39876 kB\nRssAnon:\t   30000 kB\n";
        assert_eq!(
            parse_status(status),
            Some(ProcMem {
                rss_kib: 39876,
                hwm_kib: 41234,
                anon_kib: 30000
            })
        );
        assert_eq!(parse_status("Name: x\n"), None);
        let own = proc_mem(std::process::id()).expect("own status");
        assert!(own.rss_kib > 0 && own.hwm_kib >= own.rss_kib);

        let text = "# HELP strata_reconcile_total x\n# TYPE strata_reconcile_total counter\nstrata_reconcile_total{controller=\"model\",result=\"success\"} 7\nstrata_reconcile_total{controller=\"model\",result=\"error\"} 2\nstrata_reconcile_total{controller=\"gpupool\",result=\"success\"} 3\nstrata_reconcile_total_other 100\n";
        let sum = |c: &str, r: &str| {
            counter_sum(
                text,
                "strata_reconcile_total",
                &[&format!("controller=\"{c}\""), &format!("result=\"{r}\"")],
            )
        };
        assert_eq!(sum("model", "success"), 7.0);
        assert_eq!(sum("gpupool", "success"), 3.0);
        assert_eq!(sum("adapter", "success"), 0.0);
    }

    #[test]
    fn the_report_has_a_row_per_level() {
        let sample = Sample {
            rss_max_kib: 40 * 1024,
            rss_end_kib: 40 * 1024,
            hwm_kib: 50 * 1024,
            anon_kib: 30 * 1024,
            reconciles: 4,
            settle_seconds: 3.0,
        };
        let r = Report {
            machine: "test".into(),
            nodes: 66,
            models: "3 Models".into(),
            window_seconds: 20,
            resync_seconds: 15,
            operator_env: Vec::new(),
            levels: vec![
                Level {
                    foreign: 0,
                    create_seconds: 0.0,
                    running: None,
                    fresh: vec![sample],
                    sizes: Sizes::default(),
                    probes: Vec::new(),
                },
                Level {
                    foreign: 5000,
                    create_seconds: 100.0,
                    running: Some(sample),
                    fresh: vec![
                        Sample {
                            rss_max_kib: 60 * 1024,
                            ..sample
                        },
                        sample,
                        Sample {
                            rss_max_kib: 45 * 1024,
                            ..sample
                        },
                    ],
                    sizes: Sizes {
                        pods: 5004,
                        foreign: 5000,
                        api_bytes: 40 << 20,
                        foreign_full: 8000,
                        ..Sizes::default()
                    },
                    probes: vec![ProbeResult {
                        mode: ProbeMode::Full,
                        objects: 5004,
                        rss_kib: 200 * 1024,
                        hwm_kib: 210 * 1024,
                        error: None,
                    }],
                },
            ],
        };
        let md = r.markdown();
        assert!(
            md.contains("| 0 | 40.0 | 50.0 | 30.0 | - | - | 4 | 3.0 |"),
            "{md}"
        );
        assert!(
            md.contains("| 5000 | 45.0 (40.0-60.0) | 50.0 (50.0-50.0) | 30.0 (30.0-30.0) | 40.0 | 50.0 | 4 | 3.0 |"),
            "{md}"
        );
        assert!(md.contains("| 5000 | 5004 | 40.0 MiB |"), "{md}");
        assert!(
            md.contains("| 5000 | - | 200.0 / 210.0 | - | - | - | - |\n"),
            "{md}"
        );
    }
}
