//! The simulated nodes: a small topology file turned into Node objects that
//! look like GPU nodes labelled by NVIDIA GPU feature discovery.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeSpec, NodeStatus, Taint};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

use crate::error::{Error, Result, io_err};

/// Annotation KWOK conventionally uses to pick the nodes it simulates.
pub const KWOK_NODE_ANNOTATION: &str = "kwok.x-k8s.io/node";
/// The label the world's KWOK picks its nodes by (value `fake`). A label,
/// not the annotation: the API server filters a label-selected watch, so a
/// node whose label is removed leaves KWOK's view at once (its heartbeat
/// stops) and comes back when the label does, without restarting KWOK
/// (which would forget the pod IPs it handed out).
pub const KWOK_NODE_LABEL: &str = "kwok.x-k8s.io/node";
/// The taint GPU nodes carry so that only pods asking for GPUs land there.
pub const GPU_TAINT_KEY: &str = "nvidia.com/gpu";
/// The GPU extended resource.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// Label marking a node as part of the simulated world.
pub const SIMULATED_LABEL: &str = "e2e.strata.ai/simulated";

/// A topology file.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Topology {
    /// Groups of identical nodes.
    pub node_groups: Vec<NodeGroup>,
}

/// Identical nodes.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeGroup {
    /// Name prefix; nodes are `<name>-<i>`.
    pub name: String,
    /// How many.
    pub count: u32,
    /// Allocatable CPU.
    pub cpu: String,
    /// Allocatable memory.
    pub memory: String,
    /// GPUs, if any.
    #[serde(default)]
    pub gpu: Option<GpuSpec>,
}

/// The GPUs of a node.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GpuSpec {
    /// `nvidia.com/gpu.product`.
    pub product: String,
    /// `nvidia.com/gpu.family`.
    pub family: String,
    /// GPUs per node.
    pub count: u32,
    /// `nvidia.com/gpu.memory`, in MiB.
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u64,
}

impl Topology {
    /// The topology shipped with the harness.
    pub fn default_path() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("topology/default.yaml")
    }

    /// Reads and checks a topology file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        let topo: Topology = serde_yaml_ng::from_str(&text).map_err(|e| Error::Topology {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        topo.check().map_err(|reason| Error::Topology {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(topo)
    }

    fn check(&self) -> std::result::Result<(), String> {
        let total: u32 = self.node_groups.iter().map(|g| g.count).sum();
        if total == 0 {
            return Err("no nodes".into());
        }
        if total > 250 {
            return Err(format!("{total} nodes; at most 250 fit in 127.1.0.0/24"));
        }
        let mut names: Vec<&str> = self.node_groups.iter().map(|g| g.name.as_str()).collect();
        names.sort();
        names.dedup();
        if names.len() != self.node_groups.len() {
            return Err("node group names must be unique".into());
        }
        for g in &self.node_groups {
            if g.gpu.as_ref().is_some_and(|gpu| gpu.count == 0) {
                return Err(format!("group {}: gpu.count must be at least 1", g.name));
            }
        }
        Ok(())
    }

    /// The Node objects, with InternalIPs 127.1.0.1, 127.1.0.2, ...
    pub fn nodes(&self) -> Vec<Node> {
        let mut out = Vec::new();
        let mut ip_index: u8 = 1;
        for group in &self.node_groups {
            for i in 0..group.count {
                let ip = Ipv4Addr::new(127, 1, 0, ip_index);
                ip_index = ip_index.saturating_add(1);
                out.push(group.node(&format!("{}-{i}", group.name), ip));
            }
        }
        out
    }
}

impl NodeGroup {
    fn node(&self, name: &str, ip: Ipv4Addr) -> Node {
        let mut labels = BTreeMap::from([
            ("kubernetes.io/hostname".to_string(), name.to_string()),
            ("kubernetes.io/os".to_string(), "linux".to_string()),
            ("kubernetes.io/arch".to_string(), "amd64".to_string()),
            (
                "node.kubernetes.io/instance-type".to_string(),
                self.name.clone(),
            ),
            (SIMULATED_LABEL.to_string(), "true".to_string()),
            (KWOK_NODE_LABEL.to_string(), "fake".to_string()),
        ]);
        let mut capacity = BTreeMap::from([
            ("cpu".to_string(), Quantity(self.cpu.clone())),
            ("memory".to_string(), Quantity(self.memory.clone())),
            ("pods".to_string(), Quantity("110".to_string())),
            ("ephemeral-storage".to_string(), Quantity("1Ti".to_string())),
        ]);
        let mut taints = Vec::new();
        if let Some(gpu) = &self.gpu {
            labels.insert("nvidia.com/gpu.present".into(), "true".into());
            labels.insert("nvidia.com/gpu.product".into(), gpu.product.clone());
            labels.insert("nvidia.com/gpu.family".into(), gpu.family.clone());
            labels.insert("nvidia.com/gpu.count".into(), gpu.count.to_string());
            labels.insert("nvidia.com/gpu.memory".into(), gpu.memory_mib.to_string());
            capacity.insert(GPU_RESOURCE.into(), Quantity(gpu.count.to_string()));
            taints.push(Taint {
                key: GPU_TAINT_KEY.into(),
                value: Some("present".into()),
                effect: "NoSchedule".into(),
                time_added: None,
            });
        }
        Node {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                labels: Some(labels),
                annotations: Some(BTreeMap::from([(
                    KWOK_NODE_ANNOTATION.to_string(),
                    "fake".to_string(),
                )])),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec {
                taints: (!taints.is_empty()).then_some(taints),
                ..NodeSpec::default()
            }),
            status: Some(NodeStatus {
                allocatable: Some(capacity.clone()),
                capacity: Some(capacity),
                addresses: Some(vec![
                    NodeAddress {
                        type_: "InternalIP".into(),
                        address: ip.to_string(),
                    },
                    NodeAddress {
                        type_: "Hostname".into(),
                        address: name.to_string(),
                    },
                ]),
                ..NodeStatus::default()
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_topology_has_the_fleet_of_the_issue() {
        let topo = Topology::load(&Topology::default_path()).expect("default topology loads");
        let nodes = topo.nodes();
        let gpus = |product: &str| {
            nodes
                .iter()
                .filter(|n| {
                    n.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("nvidia.com/gpu.product"))
                        .map(String::as_str)
                        == Some(product)
                })
                .map(|n| {
                    n.status
                        .as_ref()
                        .and_then(|s| s.capacity.as_ref())
                        .and_then(|c| c.get(GPU_RESOURCE))
                        .map(|q| q.0.clone())
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            gpus("NVIDIA-H100-80GB-HBM3"),
            [Some("8".into()), Some("8".into())]
        );
        assert_eq!(gpus("NVIDIA-A100-SXM4-80GB"), [Some("4".into())]);
        assert_eq!(gpus("NVIDIA-L4"), [Some("1".into()), Some("1".into())]);
        assert_eq!(nodes.len(), 6, "plus one CPU-only node");
        let cpu = nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some("cpu-0"))
            .expect("cpu node");
        assert!(
            cpu.spec.as_ref().and_then(|s| s.taints.as_ref()).is_none(),
            "CPU node carries no GPU taint"
        );
        for n in &nodes {
            let ip = &n
                .status
                .as_ref()
                .and_then(|s| s.addresses.as_ref())
                .expect("addresses")[0]
                .address;
            assert!(ip.starts_with("127."), "node IP {ip} must be loopback");
        }
    }

    #[test]
    fn bad_topologies_are_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.yaml");
        for (text, why) in [
            ("nodeGroups: []", "no nodes"),
            (
                "nodeGroups: [{name: a, count: 1, cpu: '1', memory: 1Gi}, {name: a, count: 1, cpu: '1', memory: 1Gi}]",
                "unique",
            ),
            (
                "nodeGroups: [{name: a, count: 1, cpu: '1', memory: 1Gi, gpu: {product: X, family: y, count: 0, memoryMiB: 1}}]",
                "gpu.count",
            ),
            (
                "nodeGroups: [{name: a, count: 300, cpu: '1', memory: 1Gi}]",
                "at most 250",
            ),
            (
                "nodeGroups: [{name: a, count: 1, cpu: '1', memory: 1Gi, gpus: 2}]",
                "unknown field",
            ),
        ] {
            std::fs::write(&path, text).expect("write");
            let err = Topology::load(&path).expect_err(text).to_string();
            assert!(err.contains(why), "{text}: {err}");
        }
    }
}
