//! The kubelet's PodResources API, v1: which pod and container holds which
//! device of the node (the GPUs the NVIDIA device plugin allocated), served
//! by the kubelet over gRPC on a Unix socket
//! (`/var/lib/kubelet/pod-resources/kubelet.sock`).
//!
//! - [`v1`]: the messages, client and server generated from the upstream
//!   proto (k8s.io/kubelet, vendored under `proto/`).
//! - [`Client`]: a client bounded in time (connect and per-call timeouts)
//!   and size (the kubelet's own 16 MiB message limit).
//! - [`device_holders`] and [`allocatable_devices`]: the answers reduced to
//!   what GPU metering needs, as pure functions.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// The generated API (package `v1` of the proto).
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    unreachable_pub
)]
pub mod v1 {
    tonic::include_proto!("v1");
}

pub use v1::pod_resources_lister_client::PodResourcesListerClient;
pub use v1::pod_resources_lister_server::{PodResourcesLister, PodResourcesListerServer};

/// Where the kubelet serves the API on a node.
pub const KUBELET_SOCKET: &str = "/var/lib/kubelet/pod-resources/kubelet.sock";

/// The largest answer read: the limit the kubelet's own PodResources client
/// uses (`podresources.DefaultMaxMsgSize`, 16 MiB).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// What can go wrong talking to the kubelet.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket could not be reached.
    #[error("connecting to the PodResources socket {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
    /// A call failed (including its timeout).
    #[error("PodResources {call}: {status}")]
    Call {
        /// `List` or `GetAllocatableResources`.
        call: &'static str,
        /// What the server (or the transport) said.
        status: Box<tonic::Status>,
    },
}

/// A PodResources client over a Unix socket.
#[derive(Debug, Clone)]
pub struct Client {
    inner: PodResourcesListerClient<Channel>,
}

impl Client {
    /// Connects to the socket at `path`; `timeout` bounds the connection
    /// and every call.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, Error> {
        let socket = path.to_path_buf();
        // The URI is required by tonic but not used: the connector dials the socket.
        let endpoint = Endpoint::from_static("http://localhost")
            .connect_timeout(timeout)
            .timeout(timeout);
        let channel = endpoint
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move {
                    tokio::net::UnixStream::connect(socket)
                        .await
                        .map(TokioIo::new)
                }
            }))
            .await
            .map_err(|source| Error::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        let inner = PodResourcesListerClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Self { inner })
    }

    /// `List`: every pod of the node with the devices of each container.
    pub async fn list(&mut self) -> Result<v1::ListPodResourcesResponse, Error> {
        self.inner
            .list(v1::ListPodResourcesRequest {})
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| Error::Call {
                call: "List",
                status: Box::new(status),
            })
    }

    /// `GetAllocatableResources`: every device the node can hand out.
    pub async fn allocatable(&mut self) -> Result<v1::AllocatableResourcesResponse, Error> {
        self.inner
            .get_allocatable_resources(v1::AllocatableResourcesRequest {})
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| Error::Call {
                call: "GetAllocatableResources",
                status: Box::new(status),
            })
    }
}

/// Whether a resource name is an NVIDIA GPU the device plugin hands out:
/// whole GPUs (`nvidia.com/gpu`, `nvidia.com/gpu.shared` under time-slicing)
/// or MIG slices (`nvidia.com/mig-1g.10gb`, ...).
pub fn is_nvidia_gpu(resource: &str) -> bool {
    resource
        .strip_prefix("nvidia.com/")
        .is_some_and(|r| r == "gpu" || r.starts_with("gpu.") || r.starts_with("mig-"))
}

/// Who holds a device.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Holder {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// The container the device was allocated to.
    pub container: String,
    /// The resource it was allocated as (`nvidia.com/gpu`).
    pub resource: String,
}

/// The holder of each device whose resource `wanted` accepts (e.g.
/// [`is_nvidia_gpu`]), by device ID (the device plugin's ID: a GPU's UUID
/// under its default `uuid` strategy, `MIG-...` for MIG slices). A device
/// the kubelet reports twice (shared, e.g. time-slicing replicas) keeps its
/// first holder in the kubelet's order.
pub fn device_holders(
    list: &v1::ListPodResourcesResponse,
    wanted: impl Fn(&str) -> bool,
) -> BTreeMap<String, Holder> {
    let mut out = BTreeMap::new();
    for pod in &list.pod_resources {
        for container in &pod.containers {
            for devices in container
                .devices
                .iter()
                .filter(|d| wanted(&d.resource_name))
            {
                for id in &devices.device_ids {
                    out.entry(id.clone()).or_insert_with(|| Holder {
                        namespace: pod.namespace.clone(),
                        pod: pod.name.clone(),
                        container: container.name.clone(),
                        resource: devices.resource_name.clone(),
                    });
                }
            }
        }
    }
    out
}

/// The IDs of the node's devices whose resource `wanted` accepts.
pub fn allocatable_devices(
    resp: &v1::AllocatableResourcesResponse,
    wanted: impl Fn(&str) -> bool,
) -> BTreeSet<String> {
    resp.devices
        .iter()
        .filter(|d| wanted(&d.resource_name))
        .flat_map(|d| d.device_ids.iter().cloned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use v1::{ContainerDevices, ContainerResources, PodResources};

    fn pod(ns: &str, name: &str, containers: Vec<ContainerResources>) -> PodResources {
        PodResources {
            name: name.into(),
            namespace: ns.into(),
            containers,
        }
    }

    fn container(name: &str, devices: &[(&str, &[&str])]) -> ContainerResources {
        ContainerResources {
            name: name.into(),
            devices: devices
                .iter()
                .map(|(r, ids)| ContainerDevices {
                    resource_name: (*r).into(),
                    device_ids: ids.iter().map(|s| (*s).into()).collect(),
                    topology: None,
                })
                .collect(),
            ..ContainerResources::default()
        }
    }

    #[test]
    fn gpu_resources_are_told_apart_from_other_devices() {
        for r in [
            "nvidia.com/gpu",
            "nvidia.com/gpu.shared",
            "nvidia.com/mig-1g.10gb",
        ] {
            assert!(is_nvidia_gpu(r), "{r}");
        }
        for r in [
            "nvidia.com/gpux",
            "amd.com/gpu",
            "example.com/nvidia.com/gpu",
            "rdma/hca",
            "",
        ] {
            assert!(!is_nvidia_gpu(r), "{r}");
        }
    }

    #[test]
    fn each_gpu_maps_to_the_container_that_holds_it() {
        let list = v1::ListPodResourcesResponse {
            pod_resources: vec![
                pod(
                    "team-a",
                    "chat-0",
                    vec![
                        container("engine", &[("nvidia.com/gpu", &["GPU-1", "GPU-2"])]),
                        container("strata-sidecar", &[]),
                    ],
                ),
                pod(
                    "team-b",
                    "mig-0",
                    vec![container(
                        "engine",
                        &[
                            ("nvidia.com/mig-1g.10gb", &["MIG-7"]),
                            ("rdma/hca", &["mlx5_0"]),
                        ],
                    )],
                ),
                pod("kube-system", "no-devices", vec![container("c", &[])]),
            ],
        };
        let holders = device_holders(&list, is_nvidia_gpu);
        assert_eq!(
            holders.keys().collect::<Vec<_>>(),
            ["GPU-1", "GPU-2", "MIG-7"]
        );
        let h = &holders["GPU-2"];
        assert_eq!(
            (&*h.namespace, &*h.pod, &*h.container, &*h.resource),
            ("team-a", "chat-0", "engine", "nvidia.com/gpu")
        );
        assert_eq!(holders["MIG-7"].pod, "mig-0");
        assert!(!holders.contains_key("mlx5_0"));
    }

    #[test]
    fn a_shared_device_keeps_its_first_holder() {
        let list = v1::ListPodResourcesResponse {
            pod_resources: vec![
                pod(
                    "a",
                    "first",
                    vec![container("c", &[("nvidia.com/gpu.shared", &["GPU-1"])])],
                ),
                pod(
                    "a",
                    "second",
                    vec![container("c", &[("nvidia.com/gpu.shared", &["GPU-1"])])],
                ),
            ],
        };
        assert_eq!(device_holders(&list, is_nvidia_gpu)["GPU-1"].pod, "first");
    }

    #[test]
    fn allocatable_gpus_exclude_other_resources() {
        let resp = v1::AllocatableResourcesResponse {
            devices: vec![
                ContainerDevices {
                    resource_name: "nvidia.com/gpu".into(),
                    device_ids: vec!["GPU-1".into(), "GPU-2".into()],
                    topology: None,
                },
                ContainerDevices {
                    resource_name: "rdma/hca".into(),
                    device_ids: vec!["mlx5_0".into()],
                    topology: None,
                },
            ],
            ..Default::default()
        };
        let ids: Vec<String> = allocatable_devices(&resp, is_nvidia_gpu)
            .into_iter()
            .collect();
        assert_eq!(ids, ["GPU-1", "GPU-2"]);
    }
}
