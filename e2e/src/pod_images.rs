//! The pod runner's image mode: what a kubelet does between "the pod is
//! bound" and "its containers run", for a pod whose containers run from
//! their images: pull (resolve in the local image store), volumes (Secret,
//! ConfigMap, emptyDir, projected: the ServiceAccount token, the cluster's
//! CA and the namespace at `/var/run/secrets/kubernetes.io/serviceaccount`),
//! the environment (the image's, `KUBERNETES_SERVICE_*`, the container's
//! `env` and `envFrom`), the user, and a [`ContainerInit`] per container for
//! `strata-e2e-container`.
//!
//! Errors carry the reason and message a kubelet would put in the
//! container's waiting state (`ErrImagePull`, `CreateContainerConfigError`).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret, ServiceAccount, Volume};
use kube::api::PostParams;
use kube::{Api, Client};
use serde::{Deserialize, Serialize};

use crate::container::{BindMount, ContainerInit};
use crate::oci::{ImageStore, command_line, resolve_user};
use crate::runner::PodVars;

/// What the node adds to a container beyond its spec (the local world's
/// stand-ins for a device plugin and the NVIDIA container toolkit, and test
/// knobs): values may use the runner's `${...}` placeholders.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Injection {
    /// Appended to the container's command line.
    #[serde(default)]
    pub args: Vec<String>,
    /// Added to (and overriding) its environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Host files or directories mounted into it (directories are created,
    /// world-writable, when missing).
    #[serde(default)]
    pub mounts: Vec<HostMount>,
}

/// A host path mounted into a container.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostMount {
    /// The path on the host.
    pub host: String,
    /// Where it appears in the container.
    pub path: String,
    /// Mounted read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// Why a container cannot start yet: the waiting reason and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    /// ErrImagePull, CreateContainerConfigError, ContainerCreating.
    pub reason: String,
    /// The kubelet-style message.
    pub message: String,
}

fn waiting(reason: &str, message: impl Into<String>) -> Waiting {
    Waiting {
        reason: reason.to_string(),
        message: message.into(),
    }
}

/// One container, ready to start.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The container's name.
    pub name: String,
    /// Its init spec, written to disk.
    pub spec_file: PathBuf,
}

/// The node's view of what it needs to start a pod's containers.
pub struct ImageMode<'a> {
    /// The API client (the runner's: a node's kubelet credentials).
    pub client: &'a Client,
    /// The image store.
    pub store: &'a ImageStore,
    /// The API server in-cluster clients reach (`KUBERNETES_SERVICE_HOST`
    /// and `_PORT`): its loopback address, since there is no kube-proxy.
    pub api_server: Option<(String, u16)>,
    /// Injections by container name (`*`: every container).
    pub inject: &'a BTreeMap<String, Injection>,
    /// The pod's node: its devices and what its toolkit adds.
    pub gpu: GpuNode,
}

/// The NVIDIA container toolkit of a simulated GPU node: to a container
/// whose `NVIDIA_VISIBLE_DEVICES` names devices or says `all` (set by the
/// device plugin for containers that request GPUs, or by the pod itself, as
/// monitoring agents do), it adds the driver's NVML library (here the fake
/// `libnvidia-ml.so.1`, at [`crate::harness::NVML_IN_CONTAINER`]), and the
/// node's GPUs (here the fake library's per-device state directory at
/// [`TOOLKIT_GPU_DIR`], with every device of the node listed: the library
/// shows only those `NVIDIA_VISIBLE_DEVICES` names). Containers without it
/// get nothing, as on a node: no library, no devices.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Toolkit {
    /// The fake NVML library on the host.
    pub nvml_lib: PathBuf,
    /// More of the fake library's settings (e.g. idle and full-load watts).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// Where the toolkit mounts the node's GPU state in a container.
pub const TOOLKIT_GPU_DIR: &str = "/run/nvidia-sim";

/// What a pod's node has for its containers' GPUs.
#[derive(Debug, Clone, Default)]
pub struct GpuNode {
    /// The devices allocated to the pod, by container.
    pub allocation: BTreeMap<String, Vec<String>>,
    /// Every device of the node.
    pub devices: Vec<String>,
    /// The node's directory (its simulated host filesystem, see
    /// [`crate::devices`]).
    pub dir: PathBuf,
    /// The node's container toolkit, if it is a GPU node.
    pub toolkit: Option<Toolkit>,
}

/// Whether an `NVIDIA_VISIBLE_DEVICES` value asks for devices (the
/// toolkit's rule: unset, empty, `void` and `none` do not).
pub fn wants_devices(value: Option<&str>) -> bool {
    value.is_some_and(|v| !matches!(v.trim(), "" | "void" | "none"))
}

fn write_file(path: &Path, data: &[u8]) -> Result<(), Waiting> {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p)
            .map_err(|e| waiting("ContainerCreating", format!("{}: {e}", p.display())))?;
    }
    std::fs::write(path, data)
        .map_err(|e| waiting("ContainerCreating", format!("{}: {e}", path.display())))?;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644));
    Ok(())
}

/// A volume's relative file path, refusing `..` and absolute paths.
fn rel(path: &str) -> Result<PathBuf, Waiting> {
    crate::container::under(Path::new(""), path)
        .map_err(|e| waiting("ContainerCreating", e.to_string()))
}

impl ImageMode<'_> {
    async fn secret(&self, ns: &str, name: &str) -> Result<Option<Secret>, Waiting> {
        Api::<Secret>::namespaced(self.client.clone(), ns)
            .get_opt(name)
            .await
            .map_err(|e| waiting("ContainerCreating", format!("secret {name:?}: {e}")))
    }

    async fn config_map(&self, ns: &str, name: &str) -> Result<Option<ConfigMap>, Waiting> {
        Api::<ConfigMap>::namespaced(self.client.clone(), ns)
            .get_opt(name)
            .await
            .map_err(|e| waiting("ContainerCreating", format!("configmap {name:?}: {e}")))
    }

    /// A Secret's keys; None when it is missing and `optional`, else an
    /// error with `reason` (as the kubelet reports a missing source).
    async fn secret_keys(
        &self,
        ns: &str,
        name: &str,
        optional: Option<bool>,
        reason: &str,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, Waiting> {
        match self.secret(ns, name).await? {
            Some(s) => Ok(Some(Self::secret_data(&s))),
            None if optional == Some(true) => Ok(None),
            None => Err(waiting(reason, format!("secret \"{name}\" not found"))),
        }
    }

    /// A ConfigMap's keys, as [`Self::secret_keys`].
    async fn config_map_keys(
        &self,
        ns: &str,
        name: &str,
        optional: Option<bool>,
        reason: &str,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, Waiting> {
        match self.config_map(ns, name).await? {
            Some(c) => Ok(Some(Self::config_map_data(&c))),
            None if optional == Some(true) => Ok(None),
            None => Err(waiting(reason, format!("configmap \"{name}\" not found"))),
        }
    }

    /// Writes a key/value set into `dir` (all keys, or `items` as paths).
    fn write_keys(
        dir: &Path,
        data: &BTreeMap<String, Vec<u8>>,
        items: Option<&[(String, String)]>,
        what: &str,
    ) -> Result<(), Waiting> {
        match items {
            Some(items) => {
                for (key, path) in items {
                    let value = data.get(key).ok_or_else(|| {
                        waiting(
                            "ContainerCreating",
                            format!("{what}: couldn't find key {key} in {what}"),
                        )
                    })?;
                    write_file(&dir.join(rel(path)?), value)?;
                }
            }
            None => {
                for (k, v) in data {
                    write_file(&dir.join(rel(k)?), v)?;
                }
            }
        }
        Ok(())
    }

    fn secret_data(s: &Secret) -> BTreeMap<String, Vec<u8>> {
        let mut d: BTreeMap<String, Vec<u8>> = s
            .data
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect();
        for (k, v) in s.string_data.clone().unwrap_or_default() {
            d.insert(k, v.into_bytes());
        }
        d
    }

    fn config_map_data(c: &ConfigMap) -> BTreeMap<String, Vec<u8>> {
        let mut d: BTreeMap<String, Vec<u8>> = c
            .data
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.into_bytes()))
            .collect();
        for (k, v) in c.binary_data.clone().unwrap_or_default() {
            d.insert(k, v.0);
        }
        d
    }

    /// Materialises one volume under `dir`, as the kubelet does.
    async fn volume(
        &self,
        pod: &Pod,
        vars: &PodVars,
        v: &Volume,
        dir: &Path,
    ) -> Result<(), Waiting> {
        let ns = vars.namespace.as_str();
        std::fs::create_dir_all(dir)
            .map_err(|e| waiting("ContainerCreating", format!("{}: {e}", dir.display())))?;
        let items = |i: &Option<Vec<k8s_openapi::api::core::v1::KeyToPath>>| {
            i.as_ref().map(|i| {
                i.iter()
                    .map(|k| (k.key.clone(), k.path.clone()))
                    .collect::<Vec<_>>()
            })
        };
        if v.empty_dir.is_some() {
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777));
        } else if let Some(s) = &v.secret {
            let name = s.secret_name.clone().unwrap_or_default();
            if let Some(data) = self
                .secret_keys(ns, &name, s.optional, "ContainerCreating")
                .await?
            {
                Self::write_keys(
                    dir,
                    &data,
                    items(&s.items).as_deref(),
                    &format!("secret {name:?}"),
                )?;
            }
        } else if let Some(c) = &v.config_map {
            let name = c.name.clone();
            if let Some(data) = self
                .config_map_keys(ns, &name, c.optional, "ContainerCreating")
                .await?
            {
                Self::write_keys(
                    dir,
                    &data,
                    items(&c.items).as_deref(),
                    &format!("configmap {name:?}"),
                )?;
            }
        } else if let Some(p) = &v.projected {
            for source in p.sources.iter().flatten() {
                if let Some(t) = &source.service_account_token {
                    let token = self
                        .token(pod, vars, t.audience.clone(), t.expiration_seconds)
                        .await?;
                    write_file(&dir.join(rel(&t.path)?), token.as_bytes())?;
                }
                if let Some(c) = &source.config_map
                    && let Some(data) = self
                        .config_map_keys(ns, &c.name, c.optional, "ContainerCreating")
                        .await?
                {
                    Self::write_keys(
                        dir,
                        &data,
                        items(&c.items).as_deref(),
                        &format!("configmap {:?}", c.name),
                    )?;
                }
                if let Some(s) = &source.secret
                    && let Some(data) = self
                        .secret_keys(ns, &s.name, s.optional, "ContainerCreating")
                        .await?
                {
                    Self::write_keys(
                        dir,
                        &data,
                        items(&s.items).as_deref(),
                        &format!("secret {:?}", s.name),
                    )?;
                }
                if let Some(d) = &source.downward_api {
                    for item in d.items.iter().flatten() {
                        let Some(f) = &item.field_ref else { continue };
                        let value = field_value(pod, vars, &f.field_path).ok_or_else(|| {
                            waiting(
                                "ContainerCreating",
                                format!(
                                    "downward API field {} is not supported by the local world",
                                    f.field_path
                                ),
                            )
                        })?;
                        write_file(&dir.join(rel(&item.path)?), value.as_bytes())?;
                    }
                }
            }
        } else {
            return Err(waiting(
                "ContainerCreating",
                format!(
                    "volume {:?}: only Secret, ConfigMap, emptyDir, projected and hostPath volumes exist in the local world",
                    v.name
                ),
            ));
        }
        Ok(())
    }

    /// A hostPath volume: the path in the node's simulated host filesystem
    /// (its directory, see [`crate::devices`]), with the kubelet's type
    /// checks (`Directory` must exist, `DirectoryOrCreate` is created;
    /// sockets and files are checked likewise).
    fn host_path(&self, name: &str, path: &str, kind: Option<&str>) -> Result<PathBuf, Waiting> {
        let local = crate::container::under(&self.gpu.dir, path)
            .map_err(|e| waiting("ContainerCreating", e.to_string()))?;
        let failed = |what: &str| {
            waiting(
                "ContainerCreating",
                format!(
                    "MountVolume.SetUp failed for volume {name:?} : hostPath type check failed: {path} is not {what}"
                ),
            )
        };
        match kind.unwrap_or("") {
            "DirectoryOrCreate" => {
                std::fs::create_dir_all(&local).map_err(|e| {
                    waiting("ContainerCreating", format!("{}: {e}", local.display()))
                })?;
            }
            "Directory" if !local.is_dir() => return Err(failed("a directory")),
            "Socket" => {
                use std::os::unix::fs::FileTypeExt;
                let is_socket = std::fs::metadata(&local)
                    .map(|m| m.file_type().is_socket())
                    .unwrap_or(false);
                if !is_socket {
                    return Err(failed("a socket file"));
                }
            }
            "File" if !local.is_file() => return Err(failed("a file")),
            "" | "Directory" | "File" => {}
            other => {
                return Err(waiting(
                    "ContainerCreating",
                    format!(
                        "volume {name:?}: hostPath type {other} is not simulated by the local world"
                    ),
                ));
            }
        }
        Ok(local)
    }

    /// A bound ServiceAccount token for the pod (TokenRequest), as the
    /// kubelet requests it for a projected volume.
    async fn token(
        &self,
        pod: &Pod,
        vars: &PodVars,
        audience: Option<String>,
        expiration: Option<i64>,
    ) -> Result<String, Waiting> {
        let sa = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        let req = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: audience.map(|a| vec![a]),
                expiration_seconds: Some(expiration.unwrap_or(3607)),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(vars.name.clone()),
                    uid: Some(vars.uid.clone()),
                }),
            }),
            ..TokenRequest::default()
        };
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &vars.namespace);
        let answer = api
            .create_token_request(&sa, &PostParams::default(), &req)
            .await
            .map_err(|e| {
                waiting(
                    "ContainerCreating",
                    format!("requesting a token for service account {sa:?}: {e}"),
                )
            })?;

        answer.status.and_then(|s| s.token).ok_or_else(|| {
            waiting(
                "ContainerCreating",
                format!("the token request for {sa:?} returned no token"),
            )
        })
    }

    /// The environment of one container, in the order a kubelet builds it
    /// (later entries win): the image's, the service variables, `envFrom`,
    /// `env`, then the node's injection.
    async fn env(
        &self,
        pod: &Pod,
        vars: &PodVars,
        c: &Container,
        image_env: &[String],
        injected: &BTreeMap<String, String>,
    ) -> Result<(Vec<String>, bool), Waiting> {
        // The device plugin's Allocate answer for the container's GPUs,
        // after the container's own environment (it wins, as on a node).
        let device_env: Vec<(String, String)> = self
            .gpu
            .allocation
            .get(&c.name)
            .filter(|ids| !ids.is_empty())
            .map(|ids| vec![("NVIDIA_VISIBLE_DEVICES".to_string(), ids.join(","))])
            .unwrap_or_default();
        let ns = vars.namespace.as_str();
        let mut env: Vec<(String, String)> = image_env
            .iter()
            .filter_map(|e| {
                e.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect();
        env.push(("HOSTNAME".into(), vars.name.clone()));
        if let Some((host, port)) = &self.api_server {
            env.push(("KUBERNETES_SERVICE_HOST".into(), host.clone()));
            env.push(("KUBERNETES_SERVICE_PORT".into(), port.to_string()));
            env.push(("KUBERNETES_SERVICE_PORT_HTTPS".into(), port.to_string()));
        }
        for from in c.env_from.iter().flatten() {
            let prefix = from.prefix.clone().unwrap_or_default();
            let mut sources = Vec::new();
            if let Some(r) = &from.secret_ref {
                sources.extend(
                    self.secret_keys(ns, &r.name, r.optional, "CreateContainerConfigError")
                        .await?,
                );
            }
            if let Some(r) = &from.config_map_ref {
                sources.extend(
                    self.config_map_keys(ns, &r.name, r.optional, "CreateContainerConfigError")
                        .await?,
                );
            }
            for (k, v) in sources.into_iter().flatten() {
                env.push((
                    format!("{prefix}{k}"),
                    String::from_utf8_lossy(&v).into_owned(),
                ));
            }
        }
        for e in c.env.iter().flatten() {
            if let Some(v) = &e.value {
                env.push((e.name.clone(), vars.rewrite(v)));
                continue;
            }
            let Some(from) = &e.value_from else {
                env.push((e.name.clone(), String::new()));
                continue;
            };
            if let Some(f) = &from.field_ref {
                let v = field_value(pod, vars, &f.field_path).ok_or_else(|| {
                    waiting(
                        "CreateContainerConfigError",
                        format!(
                            "env {}: field {} is not supported by the local world",
                            e.name, f.field_path
                        ),
                    )
                })?;
                env.push((e.name.clone(), v));
            } else if let Some(r) = &from.secret_key_ref {
                let value = self
                    .secret(ns, &r.name)
                    .await?
                    .and_then(|s| Self::secret_data(&s).remove(&r.key));
                match value {
                    Some(v) => env.push((e.name.clone(), String::from_utf8_lossy(&v).into_owned())),
                    None if r.optional == Some(true) => {}
                    None => {
                        return Err(waiting(
                            "CreateContainerConfigError",
                            format!("couldn't find key {} in Secret {}/{}", r.key, ns, r.name),
                        ));
                    }
                }
            } else if let Some(r) = &from.config_map_key_ref {
                let value = self
                    .config_map(ns, &r.name)
                    .await?
                    .and_then(|c| Self::config_map_data(&c).remove(&r.key));
                match value {
                    Some(v) => env.push((e.name.clone(), String::from_utf8_lossy(&v).into_owned())),
                    None if r.optional == Some(true) => {}
                    None => {
                        return Err(waiting(
                            "CreateContainerConfigError",
                            format!("couldn't find key {} in ConfigMap {}/{}", r.key, ns, r.name),
                        ));
                    }
                }
            } else {
                return Err(waiting(
                    "CreateContainerConfigError",
                    format!(
                        "env {}: resourceFieldRef is not supported by the local world",
                        e.name
                    ),
                ));
            }
        }
        env.extend(device_env);
        // The toolkit, for a container that asks for devices.
        let visible = env
            .iter()
            .rev()
            .find(|(k, _)| k == "NVIDIA_VISIBLE_DEVICES")
            .map(|(_, v)| v.as_str());
        let toolkit = self.gpu.toolkit.as_ref().filter(|_| wants_devices(visible));
        if let Some(toolkit) = toolkit {
            env.push((
                crate::fake_nvml::ENV_DEVICES.to_string(),
                self.gpu.devices.join(","),
            ));
            env.push((
                crate::fake_nvml::ENV_GPU_DIR.to_string(),
                TOOLKIT_GPU_DIR.to_string(),
            ));
            env.extend(toolkit.env.clone());
        }
        env.extend(injected.iter().map(|(k, v)| (k.clone(), vars.expand(v))));
        // Later entries win; the order of first appearance is kept.
        let mut out: Vec<(String, String)> = Vec::new();
        for (k, v) in env {
            match out.iter_mut().find(|(n, _)| *n == k) {
                Some(slot) => slot.1 = v,
                None => out.push((k, v)),
            }
        }
        Ok((
            out.into_iter().map(|(k, v)| format!("{k}={v}")).collect(),
            toolkit.is_some(),
        ))
    }

    /// Prepares every container of the pod: volumes under
    /// `<pod_dir>/volumes`, each container's layer and init spec under
    /// `<pod_dir>/containers/<name>`.
    pub async fn prepare(
        &self,
        pod: &Pod,
        vars: &PodVars,
        pod_dir: &Path,
    ) -> Result<Vec<Prepared>, Waiting> {
        let Some(spec) = pod.spec.as_ref() else {
            return Err(waiting("ContainerCreating", "the pod has no spec"));
        };
        if spec.init_containers.as_ref().is_some_and(|i| !i.is_empty()) {
            return Err(waiting(
                "CreateContainerConfigError",
                "init containers are not run by the local world's pod runner",
            ));
        }
        let vol_root = pod_dir.join("volumes");
        let mut volumes: BTreeMap<String, (PathBuf, bool)> = BTreeMap::new();
        for v in spec.volumes.iter().flatten() {
            if let Some(h) = &v.host_path {
                let dir = self.host_path(&v.name, &h.path, h.type_.as_deref())?;
                volumes.insert(v.name.clone(), (dir, false));
                continue;
            }
            let dir = vol_root.join(&v.name);
            self.volume(pod, vars, v, &dir).await?;
            // Secret, ConfigMap and projected volumes are always read-only.
            let ro = v.empty_dir.is_none();
            volumes.insert(v.name.clone(), (dir, ro));
        }
        let pod_sc = spec.security_context.clone().unwrap_or_default();
        let mut out = Vec::new();
        for c in &spec.containers {
            let image = c.image.clone().unwrap_or_default();
            let unpacked = self
                .store
                .unpack(&image)
                .map_err(|e| waiting("ErrImagePull", e.to_string()))?;
            let sc = c.security_context.clone().unwrap_or_default();
            let read =
                |f: &str| std::fs::read_to_string(unpacked.rootfs.join(f)).unwrap_or_default();
            let user = resolve_user(
                unpacked.config.user.as_deref(),
                sc.run_as_user.or(pod_sc.run_as_user),
                sc.run_as_group.or(pod_sc.run_as_group),
                sc.run_as_non_root
                    .or(pod_sc.run_as_non_root)
                    .unwrap_or(false),
                &read("etc/passwd"),
                &read("etc/group"),
            )
            .map_err(|m| waiting("CreateContainerConfigError", m))?;
            let injected: Vec<&Injection> = [self.inject.get("*"), self.inject.get(&c.name)]
                .into_iter()
                .flatten()
                .collect();
            let mut argv = command_line(&unpacked.config, c.command.as_deref(), c.args.as_deref());
            // The container's own arguments see its pod's address as its
            // loopback (the pods share the host's network here).
            for a in argv.iter_mut().skip(1) {
                *a = vars.rewrite(a);
            }
            argv.extend(
                injected
                    .iter()
                    .flat_map(|i| i.args.iter())
                    .map(|a| vars.expand(a)),
            );
            if argv.is_empty() {
                return Err(waiting(
                    "CreateContainerConfigError",
                    format!("container {}: no command specified", c.name),
                ));
            }
            let mut inj_env = BTreeMap::new();
            for i in &injected {
                inj_env.extend(i.env.clone());
            }
            // (`gets_gpus`: the toolkit gives the container NVML and the
            // node's GPUs, decided with its environment.)
            let (env, gets_gpus) = self
                .env(
                    pod,
                    vars,
                    c,
                    unpacked.config.env.as_deref().unwrap_or_default(),
                    &inj_env,
                )
                .await?;
            let mut mounts = Vec::new();
            if let Some(toolkit) = self.gpu.toolkit.as_ref().filter(|_| gets_gpus) {
                let gpus = self.gpu.dir.join(crate::devices::GPU_DIR);
                std::fs::create_dir_all(&gpus).map_err(|e| {
                    waiting("ContainerCreating", format!("{}: {e}", gpus.display()))
                })?;
                let _ = std::fs::set_permissions(&gpus, std::fs::Permissions::from_mode(0o777));
                mounts.push(BindMount {
                    source: toolkit.nvml_lib.clone(),
                    target: crate::harness::NVML_IN_CONTAINER.to_string(),
                    read_only: true,
                });
                mounts.push(BindMount {
                    source: gpus,
                    target: TOOLKIT_GPU_DIR.to_string(),
                    read_only: false,
                });
            }
            for m in c.volume_mounts.iter().flatten() {
                let (dir, ro) = volumes.get(&m.name).ok_or_else(|| {
                    waiting(
                        "CreateContainerConfigError",
                        format!(
                            "container {}: volume mount {:?} names no volume of the pod",
                            c.name, m.name
                        ),
                    )
                })?;
                let source = match m.sub_path.as_deref().filter(|s| !s.is_empty()) {
                    Some(s) => dir.join(rel(s)?),
                    None => dir.clone(),
                };
                mounts.push(BindMount {
                    source,
                    target: m.mount_path.clone(),
                    read_only: *ro || m.read_only == Some(true),
                });
            }
            for i in &injected {
                for m in &i.mounts {
                    let host = PathBuf::from(vars.expand(&m.host));
                    if !host.exists() {
                        std::fs::create_dir_all(&host).map_err(|e| {
                            waiting("ContainerCreating", format!("{}: {e}", host.display()))
                        })?;
                        let _ =
                            std::fs::set_permissions(&host, std::fs::Permissions::from_mode(0o777));
                    }
                    mounts.push(BindMount {
                        source: host,
                        target: vars.expand(&m.path),
                        read_only: m.read_only,
                    });
                }
            }
            let groups: Vec<u32> = pod_sc
                .supplemental_groups
                .iter()
                .flatten()
                .chain(pod_sc.fs_group.iter())
                .filter_map(|g| u32::try_from(*g).ok())
                .collect();
            let dir = pod_dir.join("containers").join(&c.name);
            // A fresh writable layer for each start, as a new container gets.
            let _ = std::fs::remove_dir_all(&dir);
            let init = ContainerInit {
                lower: unpacked.rootfs.clone(),
                upper: dir.join("upper"),
                work: dir.join("work"),
                rootfs: dir.join("rootfs"),
                read_only_root: sc.read_only_root_filesystem == Some(true),
                mounts,
                hostname: vars.name.clone(),
                uid: user.uid,
                gid: user.gid,
                groups,
                no_new_privileges: sc.allow_privilege_escalation == Some(false),
                cwd: c
                    .working_dir
                    .clone()
                    .or_else(|| unpacked.config.working_dir.clone())
                    .unwrap_or_default(),
                argv,
                env,
            };
            std::fs::create_dir_all(&dir)
                .map_err(|e| waiting("ContainerCreating", format!("{}: {e}", dir.display())))?;
            let spec_file = dir.with_extension("json");
            let json = serde_json::to_vec_pretty(&init)
                .map_err(|e| waiting("ContainerCreating", e.to_string()))?;
            std::fs::write(&spec_file, json).map_err(|e| {
                waiting("ContainerCreating", format!("{}: {e}", spec_file.display()))
            })?;
            out.push(Prepared {
                name: c.name.clone(),
                spec_file,
            });
        }
        Ok(out)
    }
}

/// A downward-API field of the pod (pure); None for unsupported ones.
pub fn field_value(pod: &Pod, vars: &PodVars, path: &str) -> Option<String> {
    Some(match path {
        "metadata.name" => vars.name.clone(),
        "metadata.namespace" => vars.namespace.clone(),
        "metadata.uid" => vars.uid.clone(),
        "spec.nodeName" => vars.node.clone(),
        "status.podIP" => vars.ip.clone(),
        "status.hostIP" => pod.status.as_ref()?.host_ip.clone().unwrap_or_default(),
        "spec.serviceAccountName" => pod
            .spec
            .as_ref()?
            .service_account_name
            .clone()
            .unwrap_or_else(|| "default".into()),
        _ => {
            let key = path
                .strip_prefix("metadata.labels['")
                .or_else(|| path.strip_prefix("metadata.annotations['"))?
                .strip_suffix("']")?;
            let map = if path.starts_with("metadata.labels") {
                pod.metadata.labels.as_ref()
            } else {
                pod.metadata.annotations.as_ref()
            };
            map?.get(key).cloned().unwrap_or_default()
        }
    })
}

/// The path of `strata-e2e-container`: next to this executable, or next to
/// its directory (a test binary lives in `target/<profile>/deps`).
pub fn container_init_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("STRATA_CONTAINER_INIT") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [
        dir.join("strata-e2e-container"),
        dir.parent()?.join("strata-e2e-container"),
    ]
    .into_iter()
    .find(|p| p.is_file())
}
