//! The simulated nodes' GPUs as a GPU node's device plugin and kubelet
//! handle them: each node has devices with stable IDs (GPU UUIDs, derived
//! from the node's name), the runner allocates them to the containers that
//! request `nvidia.com/*` resources when it starts a pod (first free, as the
//! NVIDIA device plugin's default allocation), frees them when the pod
//! stops, and serves each node's kubelet **PodResources API** (v1, gRPC on
//! a Unix socket under the node's directory) from those assignments.
//!
//! A node's directory (`<log dir>/nodes/<node>/`) is its simulated host
//! filesystem: hostPath volumes of pods on the node resolve in it (the
//! kubelet's socket at `var/lib/kubelet/pod-resources/kubelet.sock`), and
//! `gpus/` holds the fake NVML library's per-device state (the GPUs' load
//! and energy: the "hardware", which the toolkit stand-in mounts).
//!
//! Deviation from a kubelet: only pods the runner runs (those with a runner
//! profile) hold devices and appear in `List`; pods KWOK alone "runs" do not.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use strata_podresources::v1::{
    AllocatableResourcesRequest, AllocatableResourcesResponse, ContainerDevices,
    ContainerResources, GetPodResourcesRequest, GetPodResourcesResponse, ListPodResourcesRequest,
    ListPodResourcesResponse, PodResources,
};
use strata_podresources::{PodResourcesLister, PodResourcesListerServer};
use tonic::{Request, Response, Status};

/// Where a node's kubelet serves PodResources, under its directory (the
/// node's `/var/lib/kubelet/pod-resources/kubelet.sock`: a hostPath volume
/// of that directory finds it, see `pod_images`).
pub const SOCKET: &str = "var/lib/kubelet/pod-resources/kubelet.sock";
/// The node's GPU state directory (the fake NVML library's
/// `STRATA_FAKE_NVML_GPU_DIR`), under its directory.
pub const GPU_DIR: &str = "gpus";

/// The stable ID of device `index` of `resource` on `node`: a GPU UUID
/// (`GPU-...`) for whole GPUs, `MIG-...` for MIG slices, as the NVIDIA
/// device plugin names them (its default `uuid` ID strategy). Pure.
pub fn device_id(node: &str, resource: &str, index: u32) -> String {
    // FNV-1a, 64 bits, of the node's name and the resource: stable across
    // runs and builds, unlike the std hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node.bytes().chain([0]).chain(resource.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let prefix = if resource.contains("/mig-") {
        "MIG"
    } else {
        "GPU"
    };
    format!(
        "{prefix}-{:08x}-{:04x}-{:04x}-{:04x}-{:04x}{:08x}",
        (h >> 32) as u32,
        (h >> 16) as u16,
        h as u16,
        0x5717u16,
        index as u16,
        (h as u32) ^ index,
    )
}

/// What a container requests of the node's devices: `(resource, count)`.
pub type Requests = Vec<(String, u32)>;

/// The `nvidia.com/*` devices each container of a pod requests (limits, as
/// for extended resources requests equal limits), by container name. Pure.
pub fn pod_requests(pod: &k8s_openapi::api::core::v1::Pod) -> BTreeMap<String, Requests> {
    let mut out = BTreeMap::new();
    for c in pod.spec.iter().flat_map(|s| s.containers.iter()) {
        let wanted: Requests = c
            .resources
            .iter()
            .flat_map(|r| r.limits.iter().flatten())
            .filter(|(k, _)| k.starts_with("nvidia.com/"))
            .filter_map(|(k, q)| Some((k.clone(), q.0.parse::<u32>().ok()?)))
            .filter(|(_, n)| *n > 0)
            .collect();
        if !wanted.is_empty() {
            out.insert(c.name.clone(), wanted);
        }
    }
    out
}

/// Who holds a device.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Holder {
    uid: String,
    namespace: String,
    pod: String,
    container: String,
    resource: String,
}

/// One node's devices.
#[derive(Debug, Default)]
struct NodeDevices {
    /// Device IDs by resource, in index order.
    capacity: BTreeMap<String, Vec<String>>,
    holders: BTreeMap<String, Holder>,
    serving: bool,
}

/// The devices a pod was given: device IDs per container.
pub type Allocation = BTreeMap<String, Vec<String>>;

/// Picks free devices for `requests` (first free in index order; pure).
fn pick(
    node: &NodeDevices,
    requests: &BTreeMap<String, Requests>,
) -> Result<BTreeMap<String, Vec<(String, String)>>, String> {
    let mut taken: Vec<&str> = Vec::new();
    let mut out = BTreeMap::new();
    for (container, wanted) in requests {
        let mut got = Vec::new();
        for (resource, count) in wanted {
            let all = node
                .capacity
                .get(resource)
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            let free: Vec<&String> = all
                .iter()
                .filter(|id| !node.holders.contains_key(*id) && !taken.contains(&id.as_str()))
                .collect();
            if free.len() < *count as usize {
                // The kubelet's device manager's words.
                return Err(format!(
                    "Allocate failed due to requested number of devices unavailable for {resource}. Requested: {count}, Available: {}",
                    free.len()
                ));
            }
            for id in free.into_iter().take(*count as usize) {
                taken.push(id);
                got.push((resource.clone(), id.clone()));
            }
        }
        out.insert(container.clone(), got);
    }
    Ok(out)
}

/// Every simulated node's devices, and their PodResources servers.
#[derive(Debug)]
pub struct Devices {
    root: PathBuf,
    nodes: Mutex<BTreeMap<String, NodeDevices>>,
}

impl Devices {
    /// Devices with node directories under `root` (`<log dir>/nodes`).
    pub fn new(root: PathBuf) -> Arc<Self> {
        Arc::new(Self {
            root,
            nodes: Mutex::new(BTreeMap::new()),
        })
    }

    /// A node's directory (its simulated host filesystem).
    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.root.join(node)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, NodeDevices>> {
        match self.nodes.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Sets a node's device capacity (`nvidia.com/*` resources of its
    /// Node object) and starts its PodResources server if it has none yet.
    pub fn set_node(self: &Arc<Self>, node: &str, capacity: &BTreeMap<String, u32>) {
        let start = {
            let mut nodes = self.lock();
            let n = nodes.entry(node.to_string()).or_default();
            n.capacity = capacity
                .iter()
                .map(|(r, count)| {
                    (
                        r.clone(),
                        (0..*count).map(|i| device_id(node, r, i)).collect(),
                    )
                })
                .collect();
            !std::mem::replace(&mut n.serving, true)
        };
        if start {
            let dir = self.node_dir(node);
            if let Err(e) = std::fs::create_dir_all(dir.join(GPU_DIR)) {
                tracing::warn!("creating {}: {e}", dir.display());
            }
            let socket = dir.join(SOCKET);
            match self.clone().serve(node.to_string(), &socket) {
                Ok(()) => {
                    tracing::info!(node, socket = %socket.display(), "PodResources API served")
                }
                Err(e) => {
                    tracing::warn!(node, "PodResources API not served: {e}");
                    if let Some(n) = self.lock().get_mut(node) {
                        n.serving = false;
                    }
                }
            }
        }
    }

    /// All device IDs of a node (every resource).
    pub fn node_devices(&self, node: &str) -> Vec<String> {
        self.lock()
            .get(node)
            .map(|n| n.capacity.values().flatten().cloned().collect())
            .unwrap_or_default()
    }

    /// Allocates the devices a pod's containers request on its node (the
    /// device plugin's Allocate at admission); the same pod asking again
    /// gets what it holds. Errors in the kubelet's words when the node has
    /// too few free.
    pub fn allocate(
        &self,
        node: &str,
        namespace: &str,
        pod: &str,
        uid: &str,
        requests: &BTreeMap<String, Requests>,
    ) -> Result<Allocation, String> {
        let mut nodes = self.lock();
        let n = nodes.entry(node.to_string()).or_default();
        let held: Allocation = n.holders.iter().filter(|(_, h)| h.uid == uid).fold(
            BTreeMap::new(),
            |mut acc, (id, h)| {
                acc.entry(h.container.clone())
                    .or_insert_with(Vec::new)
                    .push(id.clone());
                acc
            },
        );
        if !held.is_empty() {
            return Ok(held);
        }
        let picked = pick(n, requests)?;
        let mut out = Allocation::new();
        for (container, ids) in picked {
            for (resource, id) in ids {
                n.holders.insert(
                    id.clone(),
                    Holder {
                        uid: uid.to_string(),
                        namespace: namespace.to_string(),
                        pod: pod.to_string(),
                        container: container.clone(),
                        resource,
                    },
                );
                out.entry(container.clone()).or_default().push(id);
            }
        }
        Ok(out)
    }

    /// Frees what a pod holds (on every node).
    pub fn release(&self, uid: &str) {
        for n in self.lock().values_mut() {
            n.holders.retain(|_, h| h.uid != uid);
        }
    }

    /// The `List` answer for a node.
    pub fn list(&self, node: &str) -> ListPodResourcesResponse {
        let nodes = self.lock();
        let Some(n) = nodes.get(node) else {
            return ListPodResourcesResponse::default();
        };
        // pod uid -> (namespace, name, container -> resource -> ids)
        type Containers = BTreeMap<String, BTreeMap<String, Vec<String>>>;
        let mut pods: BTreeMap<&str, (&str, &str, Containers)> = BTreeMap::new();
        for (id, h) in &n.holders {
            pods.entry(&h.uid)
                .or_insert_with(|| (&h.namespace, &h.pod, BTreeMap::new()))
                .2
                .entry(h.container.clone())
                .or_default()
                .entry(h.resource.clone())
                .or_default()
                .push(id.clone());
        }
        ListPodResourcesResponse {
            pod_resources: pods
                .into_values()
                .map(|(ns, name, containers)| PodResources {
                    name: name.to_string(),
                    namespace: ns.to_string(),
                    containers: containers
                        .into_iter()
                        .map(|(c, by_resource)| ContainerResources {
                            name: c,
                            devices: by_resource
                                .into_iter()
                                .map(|(r, ids)| ContainerDevices {
                                    resource_name: r,
                                    device_ids: ids,
                                    topology: None,
                                })
                                .collect(),
                            ..ContainerResources::default()
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    /// The `GetAllocatableResources` answer for a node.
    pub fn allocatable(&self, node: &str) -> AllocatableResourcesResponse {
        let nodes = self.lock();
        AllocatableResourcesResponse {
            devices: nodes
                .get(node)
                .map(|n| {
                    n.capacity
                        .iter()
                        .map(|(r, ids)| ContainerDevices {
                            resource_name: r.clone(),
                            device_ids: ids.clone(),
                            topology: None,
                        })
                        .collect()
                })
                .unwrap_or_default(),
            ..AllocatableResourcesResponse::default()
        }
    }

    /// Serves a node's PodResources API on `socket` in the background.
    fn serve(self: Arc<Self>, node: String, socket: &Path) -> std::io::Result<()> {
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let _ = std::fs::remove_file(socket);
        let listener = tokio::net::UnixListener::bind(socket)?;
        // Connecting needs write permission on the socket: root's only, as
        // the kubelet's (the chart runs the node agent as uid 0 for it).
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o755));
        }
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        let service = PodResourcesListerServer::new(NodeLister {
            devices: self,
            node,
        });
        tokio::spawn(async move {
            if let Err(e) = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await
            {
                tracing::warn!("PodResources server: {e}");
            }
        });
        Ok(())
    }
}

/// One node's PodResources service.
struct NodeLister {
    devices: Arc<Devices>,
    node: String,
}

#[tonic::async_trait]
impl PodResourcesLister for NodeLister {
    async fn list(
        &self,
        _: Request<ListPodResourcesRequest>,
    ) -> Result<Response<ListPodResourcesResponse>, Status> {
        Ok(Response::new(self.devices.list(&self.node)))
    }

    async fn get_allocatable_resources(
        &self,
        _: Request<AllocatableResourcesRequest>,
    ) -> Result<Response<AllocatableResourcesResponse>, Status> {
        Ok(Response::new(self.devices.allocatable(&self.node)))
    }

    async fn get(
        &self,
        req: Request<GetPodResourcesRequest>,
    ) -> Result<Response<GetPodResourcesResponse>, Status> {
        let r = req.into_inner();
        let found = self
            .devices
            .list(&self.node)
            .pod_resources
            .into_iter()
            .find(|p| p.name == r.pod_name && p.namespace == r.pod_namespace);
        match found {
            Some(p) => Ok(Response::new(GetPodResourcesResponse {
                pod_resources: Some(p),
            })),
            // The kubelet's answer for a pod it does not know.
            None => Err(Status::not_found(format!(
                "pod {} in namespace {} not found",
                r.pod_name, r.pod_namespace
            ))),
        }
    }
}

/// The `nvidia.com/*` capacity of a Node object (pure).
pub fn node_capacity(node: &k8s_openapi::api::core::v1::Node) -> BTreeMap<String, u32> {
    node.status
        .iter()
        .flat_map(|s| s.capacity.iter().flatten())
        .filter(|(k, _)| k.starts_with("nvidia.com/"))
        .filter_map(|(k, q)| Some((k.clone(), q.0.parse::<u32>().ok()?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(container: &str, resource: &str, n: u32) -> BTreeMap<String, Requests> {
        BTreeMap::from([(container.to_string(), vec![(resource.to_string(), n)])])
    }

    fn devices_with(node: &str, gpus: u32) -> Arc<Devices> {
        let d = Devices::new(PathBuf::from("/nonexistent"));
        d.lock().entry(node.into()).or_default().capacity = BTreeMap::from([(
            "nvidia.com/gpu".to_string(),
            (0..gpus)
                .map(|i| device_id(node, "nvidia.com/gpu", i))
                .collect(),
        )]);
        d
    }

    #[test]
    fn device_ids_are_stable_distinct_and_shaped_like_uuids() {
        let a = device_id("gpu-h100-0", "nvidia.com/gpu", 0);
        assert_eq!(a, device_id("gpu-h100-0", "nvidia.com/gpu", 0));
        assert_ne!(a, device_id("gpu-h100-0", "nvidia.com/gpu", 1));
        assert_ne!(a, device_id("gpu-h100-1", "nvidia.com/gpu", 0));
        assert!(a.starts_with("GPU-"), "{a}");
        let parts: Vec<usize> = a[4..].split('-').map(str::len).collect();
        assert_eq!(parts, [8, 4, 4, 4, 12], "{a}");
        assert!(device_id("n", "nvidia.com/mig-1g.10gb", 0).starts_with("MIG-"));
    }

    #[test]
    fn allocation_takes_the_first_free_devices_and_frees_them() {
        let d = devices_with("n", 4);
        let a = d
            .allocate("n", "ns", "a", "uid-a", &req("engine", "nvidia.com/gpu", 2))
            .expect("fits");
        assert_eq!(
            a["engine"],
            [
                device_id("n", "nvidia.com/gpu", 0),
                device_id("n", "nvidia.com/gpu", 1)
            ]
        );
        // Asking again (a restarted container) keeps the same devices.
        let again = d
            .allocate("n", "ns", "a", "uid-a", &req("engine", "nvidia.com/gpu", 2))
            .expect("held");
        assert_eq!(again, a);
        let b = d
            .allocate("n", "ns", "b", "uid-b", &req("engine", "nvidia.com/gpu", 2))
            .expect("fits");
        assert_eq!(b["engine"][0], device_id("n", "nvidia.com/gpu", 2));
        let err = d
            .allocate("n", "ns", "c", "uid-c", &req("engine", "nvidia.com/gpu", 1))
            .expect_err("full");
        assert_eq!(
            err,
            "Allocate failed due to requested number of devices unavailable for nvidia.com/gpu. Requested: 1, Available: 0"
        );
        d.release("uid-a");
        let c = d
            .allocate("n", "ns", "c", "uid-c", &req("engine", "nvidia.com/gpu", 1))
            .expect("freed");
        assert_eq!(c["engine"], [device_id("n", "nvidia.com/gpu", 0)]);
    }

    #[test]
    fn list_reports_each_container_with_its_devices() {
        let d = devices_with("n", 8);
        let mut two = req("engine", "nvidia.com/gpu", 2);
        two.insert("other".into(), vec![("nvidia.com/gpu".into(), 1)]);
        d.allocate("n", "ns", "a", "uid-a", &two).expect("fits");
        let list = d.list("n");
        assert_eq!(list.pod_resources.len(), 1);
        let holders =
            strata_podresources::device_holders(&list, strata_podresources::is_nvidia_gpu);
        assert_eq!(holders.len(), 3);
        assert_eq!(
            holders
                .values()
                .filter(|h| h.container == "engine" && h.pod == "a")
                .count(),
            2
        );
        let alloc = d.allocatable("n");
        assert_eq!(alloc.devices[0].device_ids.len(), 8);
        assert!(d.list("other-node").pod_resources.is_empty());
    }
}
