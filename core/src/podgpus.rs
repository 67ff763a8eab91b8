//! A pod as GPU accounting sees it, read straight from the API server's
//! JSON. The operator watches every pod of the cluster (other workloads
//! hold GPUs too) but needs only where each pod is (or is pinned), which
//! GPUs it requests and whether it still holds them. Deserializing the
//! watch into [`PodGpus`] instead of `Pod` keeps none of the rest: no
//! labels, annotations, managed fields, env, volumes or status conditions
//! are ever allocated (serde skips unknown fields), so the operator's
//! cluster-wide pod cache costs a few hundred bytes per pod whatever the
//! pods look like (docs/benchmarks.md, "Operator memory").
//!
//! Implements `k8s_openapi::Resource` and `Metadata` (kind Pod, core/v1),
//! so kube watches, lists and caches it as it would a `Pod`. Pure.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use serde::Deserialize;

use crate::view;

/// Where a pod's GPUs are counted: its node (bound, or pinned by a
/// required `metadata.name` node affinity before the scheduler binds it),
/// its GPUs by resource name (`nvidia.com/*`), and whether it still holds
/// them (not Succeeded or Failed).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GpuClaim {
    /// The node the GPUs are counted on; None for a pod neither bound nor
    /// pinned (it holds nothing yet).
    pub node: Option<String>,
    /// GPUs by resource name, as the scheduler counts them.
    pub gpus: BTreeMap<String, i64>,
    /// False once the pod has Succeeded or Failed.
    pub holds: bool,
}

impl GpuClaim {
    /// The claim of a full pod (the same rules as [`PodGpus`]).
    pub fn of(pod: &Pod) -> Self {
        Self {
            node: view::pod_node(pod),
            gpus: view::pod_gpu_requests(pod),
            holds: view::pod_holds_resources(pod),
        }
    }

    /// Whether it counts against a node now.
    pub fn counts(&self) -> bool {
        self.holds && self.node.is_some()
    }
}

/// A pod reduced to its identity and its [`GpuClaim`].
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(from = "wire::Pod")]
pub struct PodGpus {
    /// Name, namespace, uid, resourceVersion and deletionTimestamp only.
    pub metadata: ObjectMeta,
    /// What it holds.
    pub claim: GpuClaim,
}

impl k8s_openapi::Resource for PodGpus {
    const API_VERSION: &'static str = <Pod as k8s_openapi::Resource>::API_VERSION;
    const GROUP: &'static str = <Pod as k8s_openapi::Resource>::GROUP;
    const KIND: &'static str = <Pod as k8s_openapi::Resource>::KIND;
    const VERSION: &'static str = <Pod as k8s_openapi::Resource>::VERSION;
    const URL_PATH_SEGMENT: &'static str = <Pod as k8s_openapi::Resource>::URL_PATH_SEGMENT;
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::Metadata for PodGpus {
    type Ty = ObjectMeta;
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The subset of a pod's JSON that is read; everything else is skipped
/// without being allocated.
mod wire {
    use std::collections::BTreeMap;

    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use serde::Deserialize;

    use super::Time;

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub struct Pod {
        pub metadata: Meta,
        pub spec: Option<Spec>,
        pub status: Option<Status>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default, rename_all = "camelCase")]
    pub struct Meta {
        pub name: Option<String>,
        pub namespace: Option<String>,
        pub uid: Option<String>,
        pub resource_version: Option<String>,
        pub deletion_timestamp: Option<Time>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default, rename_all = "camelCase")]
    pub struct Spec {
        pub node_name: Option<String>,
        pub containers: Vec<Container>,
        pub init_containers: Vec<Container>,
        pub affinity: Option<Affinity>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub struct Container {
        pub resources: Option<Resources>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub struct Resources {
        pub limits: Option<BTreeMap<String, Quantity>>,
        pub requests: Option<BTreeMap<String, Quantity>>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default, rename_all = "camelCase")]
    pub struct Affinity {
        pub node_affinity: Option<NodeAffinity>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub struct NodeAffinity {
        #[serde(rename = "requiredDuringSchedulingIgnoredDuringExecution")]
        pub required: Option<NodeSelector>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default, rename_all = "camelCase")]
    pub struct NodeSelector {
        pub node_selector_terms: Vec<Term>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default, rename_all = "camelCase")]
    pub struct Term {
        pub match_fields: Vec<Requirement>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub struct Requirement {
        pub key: String,
        pub operator: String,
        pub values: Vec<String>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub struct Status {
        pub phase: Option<String>,
    }
}

/// GPUs of one container, `nvidia.com/*` only: the larger of limit and
/// request (extended resources must be equal when both are set).
fn container_gpus(c: &wire::Container) -> BTreeMap<String, i64> {
    let mut m: BTreeMap<String, i64> = BTreeMap::new();
    if let Some(res) = &c.resources {
        for map in [&res.limits, &res.requests].into_iter().flatten() {
            for (k, q) in map {
                if k.starts_with("nvidia.com/")
                    && let Ok(n) = q.0.parse::<i64>()
                {
                    let e = m.entry(k.clone()).or_default();
                    *e = (*e).max(n);
                }
            }
        }
    }
    m
}

impl From<wire::Pod> for PodGpus {
    fn from(p: wire::Pod) -> Self {
        let spec = p.spec.unwrap_or_default();
        // As the scheduler counts: the sum over containers, or any single
        // init container if larger.
        let mut gpus: BTreeMap<String, i64> = BTreeMap::new();
        for c in &spec.containers {
            for (k, v) in container_gpus(c) {
                *gpus.entry(k).or_default() += v;
            }
        }
        for c in &spec.init_containers {
            for (k, v) in container_gpus(c) {
                let e = gpus.entry(k).or_default();
                *e = (*e).max(v);
            }
        }
        let pinned = || {
            spec.affinity
                .as_ref()?
                .node_affinity
                .as_ref()?
                .required
                .as_ref()?
                .node_selector_terms
                .iter()
                .find_map(|t| {
                    t.match_fields
                        .iter()
                        .find(|f| f.key == "metadata.name" && f.operator == "In")
                        .and_then(|f| f.values.first().cloned())
                })
        };
        let node = spec.node_name.clone().or_else(pinned);
        let holds = !matches!(
            p.status.and_then(|s| s.phase).as_deref(),
            Some("Succeeded") | Some("Failed")
        );
        PodGpus {
            metadata: ObjectMeta {
                name: p.metadata.name,
                namespace: p.metadata.namespace,
                uid: p.metadata.uid,
                resource_version: p.metadata.resource_version,
                deletion_timestamp: p.metadata.deletion_timestamp,
                ..Default::default()
            },
            claim: GpuClaim { node, gpus, holds },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn both(v: serde_json::Value) -> (PodGpus, GpuClaim) {
        let lean: PodGpus = serde_json::from_value(v.clone()).expect("lean");
        let full: Pod = serde_json::from_value(v).expect("full");
        (lean, GpuClaim::of(&full))
    }

    #[test]
    fn a_bound_pod_claims_its_gpus_as_the_full_pod_does() {
        let (lean, full) = both(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "train-0", "namespace": "ml", "uid": "u1",
                "resourceVersion": "42", "labels": {"app": "train"},
                "annotations": {"big": "x".repeat(4096)},
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
            "spec": {"nodeName": "gpu-1",
                "containers": [
                    {"name": "a", "image": "i", "env": [{"name": "E", "value": "v"}],
                     "resources": {"limits": {"nvidia.com/gpu": "2", "cpu": "4"}}},
                    {"name": "b", "image": "i",
                     "resources": {"requests": {"nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "1"}}}],
                "initContainers": [{"name": "init", "image": "i",
                     "resources": {"limits": {"nvidia.com/gpu": "4"}}}]},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
        }));
        assert_eq!(lean.claim, full);
        assert_eq!(lean.claim.node.as_deref(), Some("gpu-1"));
        assert_eq!(
            lean.claim.gpus,
            BTreeMap::from([("nvidia.com/gpu".to_string(), 4)])
        );
        assert!(lean.claim.counts());
        assert_eq!(lean.metadata.name.as_deref(), Some("train-0"));
        assert_eq!(lean.metadata.namespace.as_deref(), Some("ml"));
        assert_eq!(lean.metadata.resource_version.as_deref(), Some("42"));
        assert!(lean.metadata.labels.is_none());
        assert!(lean.metadata.annotations.is_none());
        assert!(lean.metadata.managed_fields.is_none());
    }

    #[test]
    fn a_pinned_pod_counts_on_its_node_before_binding() {
        let (lean, full) = both(json!({
            "metadata": {"name": "r", "namespace": "n"},
            "spec": {"containers": [{"name": "e", "image": "i",
                "resources": {"limits": {"nvidia.com/mig-1g.10gb": "1"}}}],
                "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{"matchFields": [
                        {"key": "metadata.name", "operator": "In", "values": ["gpu-7"]}]}]}}}}
        }));
        assert_eq!(lean.claim, full);
        assert_eq!(lean.claim.node.as_deref(), Some("gpu-7"));
    }

    #[test]
    fn finished_unbound_and_gpu_less_pods() {
        for (pod, node, gpus, holds) in [
            (
                json!({"metadata": {"name": "done"}, "spec": {"nodeName": "n1", "containers": [
                    {"name": "c", "image": "i", "resources": {"limits": {"nvidia.com/gpu": "1"}}}]},
                    "status": {"phase": "Succeeded"}}),
                Some("n1"),
                1,
                false,
            ),
            (
                json!({"metadata": {"name": "pending"}, "spec": {"containers": [
                    {"name": "c", "image": "i", "resources": {"limits": {"nvidia.com/gpu": "1"}}}]},
                    "status": {"phase": "Pending"}}),
                None,
                1,
                true,
            ),
            (
                json!({"metadata": {"name": "web"}, "spec": {"nodeName": "n2", "containers": [
                    {"name": "c", "image": "i", "resources": {"limits": {"cpu": "1", "nvidia.com/gpu": "lots"}}}]}}),
                Some("n2"),
                0,
                true,
            ),
            (json!({"metadata": {"name": "bare"}}), None, 0, true),
        ] {
            let (lean, full) = both(pod);
            assert_eq!(lean.claim, full, "{:?}", lean.metadata.name);
            assert_eq!(lean.claim.node.as_deref(), node);
            assert_eq!(lean.claim.gpus.values().sum::<i64>(), gpus);
            assert_eq!(lean.claim.holds, holds);
        }
    }

    #[test]
    fn a_deleted_pod_keeps_its_deletion_timestamp() {
        let lean: PodGpus = serde_json::from_value(json!({
            "metadata": {"name": "x", "deletionTimestamp": "2026-12-03T00:00:00Z"}
        }))
        .expect("lean");
        assert!(lean.metadata.deletion_timestamp.is_some());
    }
}
