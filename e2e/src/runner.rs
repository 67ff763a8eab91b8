//! The pod runner: for pods bound to simulated nodes that carry the label
//! `e2e.strata.ai/run: <profile>`, it starts the profile's local processes
//! listening on the pod's IP (loopback), marks the pod Ready while the
//! containers' readiness probes pass, reports a process that exits as the pod
//! failing (phase Failed), and stops the processes when the pod goes away.
//!
//! This is how real binaries (the sidecar, the engine simulator) run "inside"
//! KWOK's pods and answer on real sockets.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Container, Pod, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::error::{Error, Result, io_err};
use crate::oci::ImageStore;
use crate::process::Component;

/// The label that asks the runner to run a pod; its value names the profile.
pub const RUN_LABEL: &str = "e2e.strata.ai/run";

/// Profiles of processes, by name.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RunnerConfig {
    /// Profile name (the label value) to what runs.
    pub profiles: BTreeMap<String, Profile>,
    /// The OCI image layout that pods' images resolve in, for profiles with
    /// `images: true` (default: `$STRATA_IMAGE_LAYOUT`, else
    /// `target/images/oci` of the checkout, where `scripts/images` puts it).
    #[serde(default)]
    pub image_layout: Option<PathBuf>,
    /// The NVIDIA container toolkit of the simulated GPU nodes, for image
    /// mode: what it adds to a container whose `NVIDIA_VISIBLE_DEVICES`
    /// names devices (see [`crate::pod_images::Toolkit`]). None: no
    /// container gets NVML.
    #[serde(default)]
    pub nvidia_toolkit: Option<crate::pod_images::Toolkit>,
}

/// What runs for one pod.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Profile {
    /// The processes, started in order.
    pub processes: Vec<ProcessSpec>,
    /// Restart a process that exits in place, as the kubelet does for
    /// `restartPolicy: Always` (the pod stays, not Ready until its probes
    /// pass again), instead of failing the pod.
    #[serde(default)]
    pub restart: bool,
    /// Run the pod's own containers from their images, as a node does
    /// (`processes` is then not used): see [`crate::pod_images`].
    #[serde(default)]
    pub images: bool,
    /// With `images`: what the node adds to containers, by container name
    /// (`*` for every container).
    #[serde(default)]
    pub inject: BTreeMap<String, crate::pod_images::Injection>,
}

/// One local process. In `args` and `env` values, `${POD_IP}`, `${POD_NAME}`,
/// `${POD_NAMESPACE}`, `${POD_UID}` and `${NODE_NAME}` are replaced by the
/// pod's values; `${POD_DIR}` by a directory of the pod's own (shared by its
/// processes, e.g. for a simulated GPU's load file); `${GPU_COUNT}` and
/// `${GPU_UUIDS}` by the number of `nvidia.com/*` GPUs the pod's containers
/// request and stable fake UUIDs for them; `${ARG:<container>:<flag>}` by
/// the value that follows `<flag>` (or `<flag>=`) in that container's args.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProcessSpec {
    /// Name, used in logs and failure messages (usually the container's name).
    pub name: String,
    /// Executable.
    pub command: PathBuf,
    /// Arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Extra environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Also pass the literal `env` values of this container of the pod.
    #[serde(default)]
    pub container_env: Option<String>,
    /// Start with this container's own `args` from the pod spec (then
    /// `args`). Pods share the host's network here, so in the container's
    /// args and env, `0.0.0.0` and `127.0.0.1` become the pod IP: what a
    /// container binds or reaches on "its" loopback is its pod's address.
    #[serde(default)]
    pub container_args: Option<String>,
}

impl RunnerConfig {
    /// Reads a YAML configuration.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        serde_yaml_ng::from_str(&text).map_err(|e| Error::Serialize {
            what: path.display().to_string(),
            reason: e.to_string(),
        })
    }
}

/// The pod values a template may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodVars {
    /// status.podIP.
    pub ip: String,
    /// metadata.name.
    pub name: String,
    /// metadata.namespace.
    pub namespace: String,
    /// metadata.uid.
    pub uid: String,
    /// spec.nodeName.
    pub node: String,
    /// A directory of the pod's own (set by the runner).
    pub dir: String,
    /// GPUs the pod requests.
    pub gpus: u32,
    /// The device IDs the node allocated to the pod (set by the runner).
    pub gpu_ids: Vec<String>,
    /// The containers' args, by container name.
    pub container_args: BTreeMap<String, Vec<String>>,
}

impl PodVars {
    /// The values of a running pod; None until it is bound and has an IP.
    pub fn of(pod: &Pod) -> Option<Self> {
        let status = pod.status.as_ref()?;
        Some(Self {
            ip: status.pod_ip.clone()?,
            name: pod.metadata.name.clone()?,
            namespace: pod.metadata.namespace.clone()?,
            uid: pod.metadata.uid.clone()?,
            node: pod.spec.as_ref()?.node_name.clone()?,
            dir: String::new(),
            gpu_ids: Vec::new(),
            gpus: pod
                .spec
                .as_ref()?
                .containers
                .iter()
                .filter_map(|c| c.resources.as_ref().and_then(|r| r.limits.clone()))
                .flat_map(|l| l.into_iter())
                .filter(|(k, _)| k.starts_with("nvidia.com/"))
                .filter_map(|(_, q)| q.0.parse::<u32>().ok())
                .sum(),
            container_args: pod
                .spec
                .as_ref()?
                .containers
                .iter()
                .map(|c| (c.name.clone(), c.args.clone().unwrap_or_default()))
                .collect(),
        })
    }

    /// The pod's GPU UUIDs: those the node allocated to it; before (or
    /// without) an allocation, stable fake UUIDs derived from its uid.
    pub fn gpu_uuids(&self) -> Vec<String> {
        if !self.gpu_ids.is_empty() {
            return self.gpu_ids.clone();
        }
        let compact: String = self.uid.chars().filter(|c| c.is_ascii_hexdigit()).collect();
        let stem = format!("{compact:0<32}");
        (0..self.gpus)
            .map(|i| {
                format!(
                    "GPU-{}-{}-{}-{}-{:04x}{}",
                    &stem[0..8],
                    &stem[8..12],
                    &stem[12..16],
                    &stem[16..20],
                    i,
                    &stem[24..32]
                )
            })
            .collect()
    }

    /// The value after `flag` in a container's args.
    pub fn arg(&self, container: &str, flag: &str) -> Option<String> {
        let args = self.container_args.get(container)?;
        let with_eq = format!("{flag}=");
        args.iter().enumerate().find_map(|(i, a)| {
            if a == flag {
                args.get(i + 1).cloned()
            } else {
                a.strip_prefix(&with_eq).map(str::to_string)
            }
        })
    }

    /// Rewrites a container's own arg or env value for the shared host network.
    pub fn rewrite(&self, value: &str) -> String {
        value
            .replace("0.0.0.0", &self.ip)
            .replace("127.0.0.1", &self.ip)
    }

    /// Replaces the placeholders in `template`.
    pub fn expand(&self, template: &str) -> String {
        let mut out = template
            .replace("${POD_IP}", &self.ip)
            .replace("${POD_NAME}", &self.name)
            .replace("${POD_NAMESPACE}", &self.namespace)
            .replace("${POD_UID}", &self.uid)
            .replace("${NODE_NAME}", &self.node)
            .replace("${POD_DIR}", &self.dir)
            .replace("${GPU_COUNT}", &self.gpus.to_string())
            .replace("${GPU_UUIDS}", &self.gpu_uuids().join(","));
        while let Some(start) = out.find("${ARG:") {
            let Some(len) = out[start..].find('}') else {
                break;
            };
            let inner = &out[start + 6..start + len];
            let value = inner
                .split_once(':')
                .and_then(|(c, f)| self.arg(c, f))
                .map(|v| self.rewrite(&v))
                .unwrap_or_default();
            out.replace_range(start..start + len + 1, &value);
        }
        out
    }
}

/// What the runner should do with a pod it sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Desired {
    /// Start its processes (not running yet).
    Start(String),
    /// Leave it alone (already running, or not ready to start).
    Nothing,
    /// Stop its processes (terminating, finished or failed).
    Stop,
}

/// Pure decision for one pod, given whether its processes run now.
pub fn desired(pod: &Pod, running: bool) -> Desired {
    let terminating = pod.metadata.deletion_timestamp.is_some();
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending");
    if terminating || phase == "Failed" || phase == "Succeeded" {
        return if running {
            Desired::Stop
        } else {
            Desired::Nothing
        };
    }
    if running {
        return Desired::Nothing;
    }
    match (phase, PodVars::of(pod), pod.labels().get(RUN_LABEL)) {
        ("Running", Some(vars), Some(profile)) if crate::http::is_loopback_str(&vars.ip) => {
            Desired::Start(profile.clone())
        }
        _ => Desired::Nothing,
    }
}

struct RunningPod {
    ip: String,
    namespace: String,
    name: String,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// The runner, watching pods in the background.
pub struct PodRunner {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl PodRunner {
    /// Starts watching pods with the admin kubeconfig.
    pub async fn start(kubeconfig: &Path, config: RunnerConfig, log_dir: &Path) -> Result<Self> {
        let client = crate::cluster::client_from(kubeconfig).await?;
        let node = std::sync::Arc::new(NodeRuntime::new(kubeconfig, &config, log_dir).await?);
        let (stop, stopped) = oneshot::channel();
        let log_dir = log_dir.join("pods");
        let task = tokio::spawn(run(client, config, node, log_dir, stopped));
        Ok(Self { stop, task })
    }

    /// Stops the runner and every process it started.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// What the runner's "node" has for image-mode pods.
struct NodeRuntime {
    store: ImageStore,
    api_server: Option<(String, u16)>,
    init: Option<PathBuf>,
    devices: std::sync::Arc<crate::devices::Devices>,
    toolkit: Option<crate::pod_images::Toolkit>,
}

impl NodeRuntime {
    async fn new(kubeconfig: &Path, config: &RunnerConfig, log_dir: &Path) -> Result<Self> {
        let layout = config
            .image_layout
            .clone()
            .or_else(|| std::env::var_os("STRATA_IMAGE_LAYOUT").map(PathBuf::from))
            .unwrap_or_else(|| crate::harness::repo_path("target/images/oci"));
        let cache = layout
            .parent()
            .map_or_else(|| layout.join("unpacked"), |p| p.join("unpacked"));
        let kc = kube::config::Kubeconfig::read_from(kubeconfig)
            .map_err(|e| Error::Kubeconfig(e.to_string()))?;
        let cfg =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| Error::Kubeconfig(e.to_string()))?;
        let api_server = cfg.cluster_url.host().map(|h| {
            (
                h.trim_matches(['[', ']']).to_string(),
                cfg.cluster_url.port_u16().unwrap_or(443),
            )
        });
        Ok(Self {
            store: ImageStore::new(layout, cache),
            api_server,
            init: crate::pod_images::container_init_binary(),
            devices: crate::devices::Devices::new(log_dir.join("nodes")),
            toolkit: config.nvidia_toolkit.clone(),
        })
    }
}

async fn run(
    client: Client,
    config: RunnerConfig,
    node: std::sync::Arc<NodeRuntime>,
    log_dir: PathBuf,
    mut stopped: oneshot::Receiver<()>,
) {
    let pods: Api<Pod> = Api::all(client.clone());
    let stream = watcher(pods, watcher::Config::default().labels(RUN_LABEL)).default_backoff();
    tokio::pin!(stream);
    let mut running: HashMap<String, RunningPod> = HashMap::new();
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            event = stream.next() => {
                let Some(event) = event else { break };
                let pod = match event {
                    Ok(watcher::Event::Apply(p)) | Ok(watcher::Event::InitApply(p)) => p,
                    Ok(watcher::Event::Delete(p)) => {
                        if let Some(r) = running.remove(&p.uid().unwrap_or_default()) {
                            stop_pod(r).await;
                        }
                        continue;
                    }
                    Ok(_) => continue,
                    Err(e) => {
                        tracing::warn!("pod watch: {e}");
                        continue;
                    }
                };
                let uid = pod.uid().unwrap_or_default();
                // Reap tasks that ended on their own (a crashed pod).
                running.retain(|_, r| !r.task.is_finished() || r.stop.is_closed());
                match desired(&pod, running.contains_key(&uid)) {
                    Desired::Start(profile_name) => {
                        let Some(profile) = config.profiles.get(&profile_name).cloned() else {
                            tracing::warn!(pod = %pod.name_any(), profile = %profile_name, "no such runner profile");
                            mark_failed(&client, &pod, &format!("the pod runner has no profile {profile_name:?}")).await;
                            continue;
                        };
                        // KWOK reuses the IPs of deleted pods: whatever still runs on
                        // this IP belongs to a pod that is gone; stop it first so the
                        // new processes can bind.
                        let ip = PodVars::of(&pod).map(|v| v.ip).unwrap_or_default();
                        let stale: Vec<String> = running.iter().filter(|(_, r)| r.ip == ip).map(|(u, _)| u.clone()).collect();
                        // Unless that pod still lives with this IP: then the
                        // world handed one IP to two live pods, which no real
                        // IPAM does; the new pod fails loudly (as a kubelet's
                        // sandbox would) instead of killing the other's processes.
                        if let Some(other) = live_owner(&client, &running, &stale, &ip).await {
                            let message = format!("the world gave pod IP {ip} to two live pods ({other} and this one)");
                            tracing::error!(pod = %pod.name_any(), %ip, %other, "duplicate pod IP");
                            mark_failed_with(&client, &pod, "DuplicatePodIP", &message).await;
                            continue;
                        }
                        for u in stale {
                            if let Some(r) = running.remove(&u) {
                                tracing::info!(ip = %ip, "stopping the processes of a previous pod with this IP");
                                stop_pod(r).await;
                            }
                        }
                        let (stop, stop_rx) = oneshot::channel();
                        let (n, pod_uid) = (node.clone(), uid.clone());
                        let run = run_pod(client.clone(), pod.clone(), profile, node.clone(), log_dir.clone(), stop_rx);
                        // The devices go back to the node when the pod's
                        // containers are gone (stopped, failed or deleted).
                        let task = tokio::spawn(async move {
                            run.await;
                            n.devices.release(&pod_uid);
                        });
                        let (namespace, name) = (pod.namespace().unwrap_or_default(), pod.name_any());
                        running.insert(uid, RunningPod { ip, namespace, name, stop, task });
                    }
                    Desired::Stop => {
                        if let Some(r) = running.remove(&uid) {
                            stop_pod(r).await;
                        }
                    }
                    Desired::Nothing => {}
                }
            }
        }
    }
    for (_, r) in running.drain() {
        stop_pod(r).await;
    }
}

/// Prepares an image-mode pod's containers (retrying, as a kubelet does,
/// while an image, Secret or ConfigMap is missing, and saying why in the
/// containers' waiting state); None if told to stop first.
#[allow(clippy::too_many_arguments)]
async fn image_launches(
    client: &Client,
    pod: &Pod,
    vars: &PodVars,
    allocation: &crate::devices::Allocation,
    profile: &Profile,
    node: &NodeRuntime,
    pod_dir: &Path,
    stop: &mut oneshot::Receiver<()>,
) -> Option<Vec<Launch>> {
    let mode = crate::pod_images::ImageMode {
        client,
        store: &node.store,
        api_server: node.api_server.clone(),
        inject: &profile.inject,
        gpu: crate::pod_images::GpuNode {
            allocation: allocation.clone(),
            devices: node.devices.node_devices(&vars.node),
            dir: node.devices.node_dir(&vars.node),
            toolkit: node.toolkit.clone(),
        },
    };
    let mut said: Option<String> = None;
    let mut attempts: u32 = 0;
    loop {
        let outcome = match &node.init {
            None => Err(crate::pod_images::Waiting {
                reason: "ContainerCreating".into(),
                message: "strata-e2e-container (the runner's container init) is not built next to the runner: cargo build -p strata-e2e --bins".into(),
            }),
            Some(_) => mode.prepare(pod, vars, pod_dir).await,
        };
        match outcome {
            Ok(prepared) => {
                let init = node.init.clone()?;
                return Some(
                    prepared
                        .into_iter()
                        .map(|p| Launch {
                            log_name: format!("{}_{}_{}", vars.namespace, vars.name, p.name),
                            name: p.name,
                            command: init.clone(),
                            args: vec![p.spec_file.display().to_string()],
                            env: Vec::new(),
                        })
                        .collect(),
                );
            }
            Err(w) => {
                attempts += 1;
                // The kubelet's wording: the first failure is ErrImagePull,
                // the retries back off (ImagePullBackOff).
                let reason = if w.reason == "ErrImagePull" && attempts > 1 {
                    "ImagePullBackOff".to_string()
                } else {
                    w.reason.clone()
                };
                let key = format!("{reason}: {}", w.message);
                if said.as_deref() != Some(key.as_str()) {
                    tracing::warn!(pod = %vars.name, "{key}");
                    mark_waiting(client, pod, &reason, &w.message).await;
                    said = Some(key);
                }
            }
        }
        let wait = Duration::from_secs(u64::from(attempts.min(4)) * 2);
        tokio::select! {
            _ = &mut *stop => return None,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// How a process was started.
struct Launch {
    name: String,
    command: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log_name: String,
}

/// `<pod dir>/<process>.pid`, for tests that crash a process on purpose.
fn write_pid(pod_dir: &Path, name: &str, pid: Option<u32>) {
    if let Some(pid) = pid
        && let Err(e) = std::fs::write(pod_dir.join(format!("{name}.pid")), pid.to_string())
    {
        tracing::warn!("writing the pid of {name}: {e}");
    }
}

async fn stop_pod(r: RunningPod) {
    let _ = r.stop.send(());
    let _ = r.task.await;
}

async fn run_pod(
    client: Client,
    pod: Pod,
    profile: Profile,
    node: std::sync::Arc<NodeRuntime>,
    log_dir: PathBuf,
    mut stop: oneshot::Receiver<()>,
) {
    let Some(mut vars) = PodVars::of(&pod) else {
        return;
    };
    let pod_dir = log_dir.join(format!("{}_{}.d", vars.namespace, vars.name));
    if let Err(e) = std::fs::create_dir_all(&pod_dir) {
        tracing::warn!("creating {}: {e}", pod_dir.display());
    }
    vars.dir = pod_dir.display().to_string();
    let pod_name = format!("{}/{}", vars.namespace, vars.name);
    let containers: Vec<Container> = pod
        .spec
        .as_ref()
        .map(|s| s.containers.clone())
        .unwrap_or_default();
    // As the kubelet: no container starts while a Secret it needs (not
    // marked optional) is missing; the pod says which, and starts once it
    // exists.
    if !secrets_present(&client, &pod, &mut stop).await {
        return;
    }
    // As the kubelet's device manager at admission: the node's devices for
    // the containers that request them (the node's capacity read from its
    // Node object; its PodResources API serves from here on).
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    match nodes.get_opt(&vars.node).await {
        Ok(Some(n)) => node
            .devices
            .set_node(&vars.node, &crate::devices::node_capacity(&n)),
        Ok(None) => {}
        Err(e) => tracing::warn!(node = %vars.node, "reading the node: {e}"),
    }
    let allocation = match node.devices.allocate(
        &vars.node,
        &vars.namespace,
        &vars.name,
        &vars.uid,
        &crate::devices::pod_requests(&pod),
    ) {
        Ok(a) => a,
        Err(message) => {
            tracing::warn!(pod = %pod_name, "{message}");
            mark_failed_with(&client, &pod, "UnexpectedAdmissionError", &message).await;
            return;
        }
    };
    vars.gpu_ids = allocation.values().flatten().cloned().collect();
    // Secret and emptyDir volumes, as the kubelet mounts them: a directory
    // under the pod's (a Secret's keys as files in it); the mount path in a
    // container's args points there.
    let mut mounts: Vec<(String, String)> = Vec::new();
    if let Some(spec) = pod.spec.as_ref().filter(|_| !profile.images) {
        let secrets: Api<k8s_openapi::api::core::v1::Secret> =
            Api::namespaced(client.clone(), &vars.namespace);
        for v in spec.volumes.iter().flatten() {
            let secret = v.secret.as_ref().and_then(|s| s.secret_name.clone());
            if secret.is_none() && v.empty_dir.is_none() {
                continue;
            }
            let dir = pod_dir.join("volumes").join(&v.name);
            let _ = std::fs::create_dir_all(&dir);
            if let Some(secret) = secret {
                match secrets.get(&secret).await {
                    Ok(sec) => {
                        for (k, b) in sec.data.unwrap_or_default() {
                            if let Err(e) = std::fs::write(dir.join(&k), &b.0) {
                                tracing::warn!("writing secret volume {}: {e}", v.name);
                            }
                        }
                    }
                    Err(e) => tracing::warn!(pod = %vars.name, "secret {secret}: {e}"),
                }
            }
            for c in &containers {
                for m in c
                    .volume_mounts
                    .iter()
                    .flatten()
                    .filter(|m| m.name == v.name)
                {
                    mounts.push((m.mount_path.clone(), dir.display().to_string()));
                }
            }
        }
    }
    // One mapping per mount path (the same volume may be mounted in
    // several containers); the longest paths first.
    mounts.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
    mounts.dedup_by(|a, b| a.0 == b.0);
    let mut procs = Vec::new();
    // What each process was started with, to restart it in place.
    let mut launch: Vec<Launch> = Vec::new();
    let processes: &[ProcessSpec] = if profile.images {
        &[]
    } else {
        &profile.processes
    };
    for spec in processes {
        let mut env: Vec<(String, String)> = Vec::new();
        if let Some(c) = spec
            .container_env
            .as_ref()
            .and_then(|n| containers.iter().find(|c| &c.name == n))
        {
            for e in c.env.iter().flatten() {
                if let Some(v) = &e.value {
                    env.push((e.name.clone(), vars.rewrite(&vars.expand(v))));
                }
            }
        }
        env.extend(spec.env.iter().map(|(k, v)| (k.clone(), vars.expand(v))));
        env.push(("POD_IP".into(), vars.ip.clone()));
        env.push(("POD_NAME".into(), vars.name.clone()));
        env.push(("POD_NAMESPACE".into(), vars.namespace.clone()));
        let mut args: Vec<String> = spec
            .container_args
            .as_ref()
            .and_then(|c| vars.container_args.get(c))
            .map(|a| {
                a.iter()
                    .map(|x| {
                        // One pass: a mount path inside an already
                        // rewritten local path is not rewritten again.
                        let mut x = vars.rewrite(x);
                        for (i, (path, _)) in mounts.iter().enumerate() {
                            x = x.replace(path.as_str(), &format!("\u{0}{i}\u{0}"));
                        }
                        for (i, (_, local)) in mounts.iter().enumerate() {
                            x = x.replace(&format!("\u{0}{i}\u{0}"), local);
                        }
                        x
                    })
                    .collect()
            })
            .unwrap_or_default();
        args.extend(spec.args.iter().map(|a| vars.expand(a)));
        let log_name = format!("{}_{}_{}", vars.namespace, vars.name, spec.name);
        launch.push(Launch {
            name: spec.name.clone(),
            command: spec.command.clone(),
            args,
            env,
            log_name,
        });
    }
    if profile.images {
        match image_launches(
            &client,
            &pod,
            &vars,
            &allocation,
            &profile,
            &node,
            &pod_dir,
            &mut stop,
        )
        .await
        {
            Some(l) => launch = l,
            None => return,
        }
    }
    for l in &launch {
        match Component::spawn(&l.log_name, &l.command, &l.args, &l.env, &log_dir) {
            Ok(c) => {
                write_pid(&pod_dir, &l.name, c.pid());
                procs.push((l.name.clone(), c));
            }
            Err(e) => {
                tracing::warn!(pod = %pod_name, "{e}");
                mark_failed(
                    &client,
                    &pod,
                    &format!("process {} could not start: {e}", l.name),
                )
                .await;
                for (_, mut c) in procs {
                    c.stop(Duration::from_secs(2)).await;
                }
                let _ = stop.await;
                return;
            }
        }
    }
    tracing::info!(pod = %pod_name, processes = procs.len(), ip = %vars.ip, "started pod processes");

    let probes: Vec<(Probe, Container)> = containers
        .iter()
        .filter_map(|c| c.readiness_probe.clone().map(|p| (p, c.clone())))
        .collect();
    let period = probes
        .iter()
        .filter_map(|(p, _)| p.period_seconds)
        .min()
        .map_or(Duration::from_secs(1), |s| {
            Duration::from_secs(s.clamp(1, 2) as u64)
        });
    let mut ready: Option<bool> = None;
    let mut restarts: BTreeMap<String, u32> = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut last_probe = tokio::time::Instant::now() - period;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {
                if profile.restart {
                    let exited: Vec<usize> = procs
                        .iter_mut()
                        .enumerate()
                        .filter_map(|(i, (_, c))| c.check_running().err().map(|_| i))
                        .collect();
                    for i in exited {
                        let Launch { name, command, args, env, log_name } = &launch[i];
                        tracing::warn!(pod = %pod_name, process = %name, "process exited: restarting it in place");
                        if ready != Some(false) {
                            ready = Some(false);
                            set_ready(&client, &pod, false, &restarts).await;
                        }
                        let count = restarts.entry(name.clone()).or_default();
                        *count += 1;
                        let why = format!("pod runner: {name} exited; restarting it in place (restart {count})");
                        match Component::respawn(log_name, command, args, env, &log_dir, &why) {
                            Ok(c) => {
                                write_pid(&pod_dir, name, c.pid());
                                procs[i].1 = c;
                            }
                            Err(e) => tracing::warn!(pod = %pod_name, "restarting {name}: {e}"),
                        }
                    }
                }
                if let Some((name, status)) = procs.iter_mut().find_map(|(n, c)| c.check_running().err().map(|e| (n.clone(), e))) {
                    let message = match &status {
                        // The last line it wrote, as a container's termination message.
                        Error::Exited { status, tail, .. } => match tail.lines().rev().find(|l| !l.trim().is_empty()) {
                            Some(last) => format!("process {name} exited ({status}): {}", last.trim()),
                            None => format!("process {name} exited ({status})"),
                        },
                        other => format!("process {name}: {other}"),
                    };
                    tracing::warn!(pod = %pod_name, "{message}");
                    for (_, c) in procs.iter_mut() {
                        c.stop(Duration::from_secs(2)).await;
                    }
                    mark_failed(&client, &pod, &message).await;
                    let _ = (&mut stop).await;
                    return;
                }
                if last_probe.elapsed() < period {
                    continue;
                }
                last_probe = tokio::time::Instant::now();
                let mut ok = true;
                for (probe, container) in &probes {
                    ok &= probe_once(probe, container, &vars.ip).await;
                }
                if ready != Some(ok) {
                    ready = Some(ok);
                    set_ready(&client, &pod, ok, &restarts).await;
                }
            }
        }
    }
    for (_, c) in procs.iter_mut() {
        c.stop(Duration::from_secs(5)).await;
    }
    tracing::info!(pod = %pod_name, "stopped pod processes");
}

/// A Secret a pod cannot start without.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct NeededSecret {
    /// Its name (in the pod's namespace).
    pub name: String,
    /// Mounted as a volume (the kubelet keeps the pod ContainerCreating),
    /// rather than read into the environment (CreateContainerConfigError).
    pub volume: bool,
}

/// The Secrets a pod needs (not marked optional): volumes, `envFrom` and
/// `env[].valueFrom.secretKeyRef` of its containers (pure).
pub fn needed_secrets(pod: &Pod) -> Vec<NeededSecret> {
    let Some(spec) = pod.spec.as_ref() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for v in spec.volumes.iter().flatten() {
        if let Some(sv) = &v.secret
            && sv.optional != Some(true)
            && let Some(name) = &sv.secret_name
        {
            out.push(NeededSecret {
                name: name.clone(),
                volume: true,
            });
        }
    }
    for c in &spec.containers {
        for from in c.env_from.iter().flatten() {
            if let Some(r) = &from.secret_ref
                && r.optional != Some(true)
            {
                out.push(NeededSecret {
                    name: r.name.clone(),
                    volume: false,
                });
            }
        }
        for e in c.env.iter().flatten() {
            if let Some(r) = e
                .value_from
                .as_ref()
                .and_then(|v| v.secret_key_ref.as_ref())
                && r.optional != Some(true)
            {
                out.push(NeededSecret {
                    name: r.name.clone(),
                    volume: false,
                });
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Waits until every Secret the pod needs exists, saying in the pod's
/// container statuses what is missing meanwhile (as the kubelet does:
/// CreateContainerConfigError for the environment, ContainerCreating for
/// volumes). False if told to stop first.
async fn secrets_present(client: &Client, pod: &Pod, stop: &mut oneshot::Receiver<()>) -> bool {
    let needed = needed_secrets(pod);
    if needed.is_empty() {
        return true;
    }
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let api: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &ns);
    let mut said: Option<String> = None;
    loop {
        let mut missing: Option<&NeededSecret> = None;
        for n in &needed {
            match api.get_opt(&n.name).await {
                Ok(Some(_)) => {}
                Ok(None) => {
                    missing = Some(n);
                    break;
                }
                Err(e) => {
                    tracing::warn!(pod = %pod.name_any(), "reading secret {}: {e}", n.name);
                    missing = Some(n);
                    break;
                }
            }
        }
        let Some(m) = missing else {
            return true;
        };
        let message = format!("secret \"{}\" not found", m.name);
        if said.as_deref() != Some(message.as_str()) {
            let reason = if m.volume {
                "ContainerCreating"
            } else {
                "CreateContainerConfigError"
            };
            tracing::info!(pod = %pod.name_any(), "{reason}: {message}");
            mark_waiting(client, pod, reason, &message).await;
            said = Some(message);
        }
        tokio::select! {
            _ = &mut *stop => return false,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

async fn mark_waiting(client: &Client, pod: &Pod, reason: &str, message: &str) {
    let statuses: Vec<serde_json::Value> = pod
        .spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .map(|c| {
            serde_json::json!({
                "name": c.name,
                "image": c.image.clone().unwrap_or_default(),
                "imageID": "",
                "ready": false,
                "started": false,
                "restartCount": 0,
                "state": {"waiting": {"reason": reason, "message": message}},
            })
        })
        .collect();
    let patch = serde_json::json!({
        "status": {
            "conditions": [
                {"type": "Ready", "status": "False", "reason": "ContainersNotReady", "message": message, "lastTransitionTime": now()},
                {"type": "ContainersReady", "status": "False", "reason": "ContainersNotReady", "message": message, "lastTransitionTime": now()},
            ],
            "containerStatuses": statuses,
        }
    });
    patch_status(client, pod, &patch).await;
}

fn resolve_port(port: &IntOrString, container: &Container) -> Option<u16> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p).ok(),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

async fn probe_once(probe: &Probe, container: &Container, ip: &str) -> bool {
    let Ok(ip) = ip.parse::<IpAddr>() else {
        return false;
    };
    let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).max(1) as u64);
    if let Some(get) = &probe.http_get {
        let Some(port) = resolve_port(&get.port, container) else {
            return false;
        };
        let path = get.path.clone().unwrap_or_else(|| "/".into());
        let addr = SocketAddr::new(ip, port);
        // HTTPS as the kubelet does it: no certificate verification.
        let answer = if get
            .scheme
            .as_deref()
            .is_some_and(|s| s.eq_ignore_ascii_case("HTTPS"))
        {
            crate::http::get_https(addr, &path, timeout).await
        } else {
            crate::http::get(addr, &path, timeout).await
        };
        return answer.is_ok_and(|r| (200..400).contains(&r.status));
    }
    if let Some(tcp) = &probe.tcp_socket {
        let Some(port) = resolve_port(&tcp.port, container) else {
            return false;
        };
        return tokio::time::timeout(
            timeout,
            tokio::net::TcpStream::connect(SocketAddr::new(ip, port)),
        )
        .await
        .is_ok_and(|r| r.is_ok());
    }
    // exec and gRPC probes are not simulated: a running process counts as ready.
    true
}

fn now() -> String {
    Timestamp::now().to_string()
}

/// Sets the pod's Ready and ContainersReady conditions and, as the kubelet
/// does, each container's `ready` and `restartCount` (processes restarted in
/// place count for the container of the same name).
async fn set_ready(client: &Client, pod: &Pod, ready: bool, restarts: &BTreeMap<String, u32>) {
    let status = if ready { "True" } else { "False" };
    let reason = if ready {
        "ProbesPassed"
    } else {
        "ReadinessProbeFailed"
    };
    let started = pod
        .status
        .as_ref()
        .and_then(|s| s.start_time.as_ref())
        .map_or_else(now, |t| t.0.to_string());
    let containers: Vec<serde_json::Value> = pod
        .spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .map(|c| {
            serde_json::json!({
                "name": c.name,
                "image": c.image.clone().unwrap_or_default(),
                "imageID": "",
                "ready": ready,
                "started": true,
                "restartCount": restarts.get(&c.name).copied().unwrap_or(0),
                "state": {"running": {"startedAt": started}},
            })
        })
        .collect();
    let patch = serde_json::json!({
        "status": {
            "conditions": [
                {"type": "Ready", "status": status, "reason": reason, "lastTransitionTime": now()},
                {"type": "ContainersReady", "status": status, "reason": reason, "lastTransitionTime": now()},
            ],
            "containerStatuses": containers,
        }
    });
    patch_status(client, pod, &patch).await;
}

/// The first of `stale` (running pods with `ip`) that the API server still
/// holds, undeleted and with that IP: its `namespace/name`.
async fn live_owner(
    client: &Client,
    running: &HashMap<String, RunningPod>,
    stale: &[String],
    ip: &str,
) -> Option<String> {
    for uid in stale {
        let Some(r) = running.get(uid) else { continue };
        let pods: Api<Pod> = Api::namespaced(client.clone(), &r.namespace);
        // An error reading it: assume it is gone (the previous behaviour).
        let Ok(Some(p)) = pods.get_opt(&r.name).await else {
            continue;
        };
        let same_ip = p.status.as_ref().and_then(|s| s.pod_ip.as_deref()) == Some(ip);
        if p.uid().as_deref() == Some(uid.as_str())
            && p.metadata.deletion_timestamp.is_none()
            && same_ip
        {
            return Some(format!("{}/{}", r.namespace, r.name));
        }
    }
    None
}

async fn mark_failed(client: &Client, pod: &Pod, message: &str) {
    mark_failed_with(client, pod, "ProcessExited", message).await;
}

/// The pod Failed with `reason` (e.g. the kubelet's
/// `UnexpectedAdmissionError` when its devices cannot be allocated).
async fn mark_failed_with(client: &Client, pod: &Pod, reason: &str, message: &str) {
    let containers = pod
        .spec
        .as_ref()
        .map(|s| s.containers.clone())
        .unwrap_or_default();
    let statuses: Vec<serde_json::Value> = containers
        .iter()
        .map(|c| {
            serde_json::json!({
                "name": c.name,
                "image": c.image.clone().unwrap_or_default(),
                "imageID": "",
                "ready": false,
                "restartCount": 0,
                "state": {"terminated": {"exitCode": 1, "reason": "Error", "message": message, "finishedAt": now()}},
            })
        })
        .collect();
    let patch = serde_json::json!({
        "status": {
            "phase": "Failed",
            "reason": reason,
            "message": message,
            "conditions": [
                {"type": "Ready", "status": "False", "reason": reason, "message": message, "lastTransitionTime": now()},
                {"type": "ContainersReady", "status": "False", "reason": reason, "message": message, "lastTransitionTime": now()},
            ],
            "containerStatuses": statuses,
        }
    });
    patch_status(client, pod, &patch).await;
}

async fn patch_status(client: &Client, pod: &Pod, patch: &serde_json::Value) {
    let (Some(ns), Some(name)) = (
        pod.metadata.namespace.as_deref(),
        pod.metadata.name.as_deref(),
    ) else {
        return;
    };
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    if let Err(e) = api
        .patch_status(name, &PatchParams::default(), &Patch::Strategic(patch))
        .await
    {
        tracing::warn!(pod = %name, "status patch: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerPort, HTTPGetAction, PodSpec, PodStatus};
    use kube::api::ObjectMeta;

    #[tokio::test]
    async fn https_probes_skip_verification_and_http_probes_do_not_speak_tls() {
        let addr = crate::http::tests::tls_server().await;
        let container = Container {
            name: "strata-sidecar".into(),
            ports: Some(vec![ContainerPort {
                name: Some("admin".into()),
                container_port: i32::from(addr.port()),
                ..ContainerPort::default()
            }]),
            ..Container::default()
        };
        let probe = |scheme: Option<&str>| Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/readyz".into()),
                port: IntOrString::String("admin".into()),
                scheme: scheme.map(Into::into),
                ..HTTPGetAction::default()
            }),
            timeout_seconds: Some(2),
            ..Probe::default()
        };
        let ip = addr.ip().to_string();
        assert!(probe_once(&probe(Some("HTTPS")), &container, &ip).await);
        assert!(!probe_once(&probe(Some("HTTP")), &container, &ip).await);
        assert!(!probe_once(&probe(None), &container, &ip).await);
    }

    fn pod(phase: &str, ip: Option<&str>, label: bool, deleting: bool) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("ns".into()),
                uid: Some("u".into()),
                labels: label.then(|| BTreeMap::from([(RUN_LABEL.to_string(), "web".to_string())])),
                deletion_timestamp: deleting.then(|| {
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now())
                }),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some("h100-0".into()),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                pod_ip: ip.map(Into::into),
                ..PodStatus::default()
            }),
        }
    }

    #[test]
    fn decides_what_to_do_with_a_pod() {
        let ip = Some("127.64.0.5");
        assert_eq!(
            desired(&pod("Running", ip, true, false), false),
            Desired::Start("web".into())
        );
        assert_eq!(
            desired(&pod("Running", ip, true, false), true),
            Desired::Nothing
        );
        assert_eq!(
            desired(&pod("Pending", None, true, false), false),
            Desired::Nothing
        );
        assert_eq!(
            desired(&pod("Running", ip, false, false), false),
            Desired::Nothing
        );
        assert_eq!(
            desired(&pod("Running", ip, true, true), true),
            Desired::Stop
        );
        assert_eq!(
            desired(&pod("Failed", ip, true, false), true),
            Desired::Stop
        );
        assert_eq!(
            desired(&pod("Failed", ip, true, false), false),
            Desired::Nothing
        );
        // Never listen on a non-loopback pod IP.
        assert_eq!(
            desired(&pod("Running", Some("10.0.0.5"), true, false), false),
            Desired::Nothing
        );
    }

    #[test]
    fn expands_gpus_dirs_and_container_args() {
        let mut p = pod("Running", Some("127.64.0.9"), true, false);
        p.metadata.uid = Some("0123abcd-4567-89ef-0123-456789abcdef".into());
        if let Some(spec) = p.spec.as_mut() {
            spec.containers = vec![
                serde_json::from_value(serde_json::json!({
                    "name": "engine",
                    "args": ["--model", "m", "--served-model-name", "llama", "--port=8000", "--host", "127.0.0.1"],
                    "resources": {"limits": {"nvidia.com/gpu": "2"}}
                }))
                .expect("container"),
            ];
        }
        let mut vars = PodVars::of(&p).expect("vars");
        vars.dir = "/tmp/pod".into();
        assert_eq!(vars.gpus, 2);
        let uuids = vars.gpu_uuids();
        assert_eq!(uuids.len(), 2);
        assert_ne!(uuids[0], uuids[1]);
        assert!(uuids[0].starts_with("GPU-0123abcd-"), "{}", uuids[0]);
        let groups: Vec<usize> = uuids[0]
            .trim_start_matches("GPU-")
            .split('-')
            .map(str::len)
            .collect();
        assert_eq!(groups, [8, 4, 4, 4, 12], "{}", uuids[0]);
        assert_eq!(vars.gpu_uuids(), uuids, "stable");
        assert_eq!(
            vars.expand("--listen=${POD_IP}:${ARG:engine:--port} --model ${ARG:engine:--served-model-name} --dir ${POD_DIR} --n ${GPU_COUNT} --x ${ARG:engine:--missing}"),
            "--listen=127.64.0.9:8000 --model llama --dir /tmp/pod --n 2 --x "
        );
        assert_eq!(
            vars.rewrite("http://127.0.0.1:8000"),
            "http://127.64.0.9:8000"
        );
        assert_eq!(
            vars.rewrite("--listen=0.0.0.0:8080"),
            "--listen=127.64.0.9:8080"
        );
    }

    #[test]
    fn finds_the_secrets_a_pod_cannot_start_without() {
        let mut p = pod("Running", Some("127.64.0.9"), true, false);
        if let Some(spec) = p.spec.as_mut() {
            *spec = serde_json::from_value(serde_json::json!({
                "nodeName": "h100-0",
                "volumes": [
                    {"name": "tls", "secret": {"secretName": "model-tls"}},
                    {"name": "maybe", "secret": {"secretName": "optional-one", "optional": true}},
                    {"name": "cache", "emptyDir": {}},
                ],
                "containers": [{
                    "name": "engine",
                    "envFrom": [{"secretRef": {"name": "hf-token"}}, {"secretRef": {"name": "opt", "optional": true}}],
                    "env": [
                        {"name": "A", "value": "x"},
                        {"name": "B", "valueFrom": {"secretKeyRef": {"name": "keys", "key": "b"}}},
                        {"name": "C", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "c"}}},
                    ],
                }],
            }))
            .expect("spec");
        }
        let needed = needed_secrets(&p);
        let names: Vec<(&str, bool)> = needed.iter().map(|n| (n.name.as_str(), n.volume)).collect();
        assert_eq!(
            names,
            [("hf-token", false), ("keys", false), ("model-tls", true)]
        );
        assert!(needed_secrets(&pod("Running", None, true, false)).is_empty());
    }

    #[test]
    fn expands_pod_values() {
        let vars = PodVars::of(&pod("Running", Some("127.64.0.9"), true, false)).expect("vars");
        assert_eq!(
            vars.expand("--listen=${POD_IP}:8080 --name=${POD_NAMESPACE}/${POD_NAME}@${NODE_NAME}"),
            "--listen=127.64.0.9:8080 --name=ns/p@h100-0"
        );
    }
}
