//! From Kubernetes objects to the plain views placement and rollout work on.
//! Pure functions over already-fetched objects.

use std::borrow::{Borrow, Cow};
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, Pod};
use strata_crds::common::PlacementPolicy;
use strata_crds::gpupool::GPUPool;

use crate::placement::{self, NodeView, PoolView, Requirement, Selector, Taint, Toleration};
use crate::podgpus::GpuClaim;

/// GPUs (by resource name, only `nvidia.com/*`) a pod requests: the larger
/// of the sum over containers and any single init container, as the
/// scheduler counts.
pub fn pod_gpu_requests(pod: &Pod) -> BTreeMap<String, i64> {
    let mut total: BTreeMap<String, i64> = BTreeMap::new();
    let Some(spec) = &pod.spec else { return total };
    let amount = |c: &k8s_openapi::api::core::v1::Container| {
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
    };
    for c in &spec.containers {
        for (k, v) in amount(c) {
            *total.entry(k).or_default() += v;
        }
    }
    for c in spec.init_containers.iter().flatten() {
        for (k, v) in amount(c) {
            let e = total.entry(k).or_default();
            *e = (*e).max(v);
        }
    }
    total
}

/// The node a pod is bound to, or the node its required affinity pins it to
/// (a planned pod the scheduler has not bound yet).
pub fn pod_node(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    if let Some(n) = &spec.node_name {
        return Some(n.clone());
    }
    let terms = &spec
        .affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?
        .node_selector_terms;
    terms.iter().find_map(|t| {
        t.match_fields.iter().flatten().find_map(|f| {
            (f.key == "metadata.name" && f.operator == "In")
                .then(|| f.values.as_ref().and_then(|v| v.first().cloned()))
                .flatten()
        })
    })
}

/// Whether a pod's Ready condition is True.
pub fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Whether a node's Ready condition is True.
pub fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Seconds a node has not been Ready at `now_unix` (its Ready condition
/// False or Unknown since its last transition); None while it is Ready, or
/// when it reports no Ready condition yet. Pure.
pub fn node_not_ready_for(node: &Node, now_unix: i64) -> Option<u64> {
    let ready = node
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")?;
    if ready.status == "True" {
        return None;
    }
    let since = ready
        .last_transition_time
        .as_ref()
        .map_or(now_unix, |t| t.0.as_second());
    Some(now_unix.saturating_sub(since).max(0) as u64)
}

/// Whether a pod still holds its resources (not Succeeded or Failed).
pub fn pod_holds_resources(pod: &Pod) -> bool {
    !matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded") | Some("Failed")
    )
}

/// Counts `claim` on its node in `views` (`sign` 1) or takes it back
/// (`sign` -1), as [`node_views`] counts the claims it is given: a view
/// made from some claims and corrected this way equals one made from the
/// corrected claims. Pure.
pub fn count_claim(views: &mut [NodeView<'_>], claim: &GpuClaim, sign: i64) {
    if !claim.holds {
        return;
    }
    let Some(view) = claim
        .node
        .as_deref()
        .and_then(|n| views.iter_mut().find(|v| v.name == n))
    else {
        return;
    };
    for (k, v) in &claim.gpus {
        let used = view.used.entry(k.clone()).or_default();
        *used += sign * v;
        if *used == 0 {
            view.used.remove(k);
        }
    }
}

/// Node views with the GPUs held by `claims` (bound or pinned pods that
/// have not finished; see [`GpuClaim`]).
pub fn node_views<'a, C: Borrow<GpuClaim>>(
    nodes: impl IntoIterator<Item = &'a Node>,
    claims: impl IntoIterator<Item = C>,
) -> Vec<NodeView<'a>> {
    let mut used: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for claim in claims {
        let claim = claim.borrow();
        if !claim.holds {
            continue;
        }
        if let Some(node) = &claim.node {
            let entry = used.entry(node.clone()).or_default();
            for (k, v) in &claim.gpus {
                *entry.entry(k.clone()).or_default() += v;
            }
        }
    }
    nodes
        .into_iter()
        .filter_map(|n| {
            let name = n.metadata.name.clone()?;
            let status = n.status.as_ref();
            let allocatable = status
                .and_then(|s| s.allocatable.as_ref())
                .map(|a| {
                    a.iter()
                        .filter(|(k, _)| k.starts_with("nvidia.com/"))
                        .filter_map(|(k, q)| q.0.parse::<i64>().ok().map(|v| (k.clone(), v)))
                        .collect()
                })
                .unwrap_or_default();
            let ready = node_ready(n);
            let spec = n.spec.as_ref();
            Some(NodeView {
                used: used.remove(&name).unwrap_or_default(),
                name,
                labels: n
                    .metadata
                    .labels
                    .as_ref()
                    .map_or_else(Cow::default, Cow::Borrowed),
                taints: spec
                    .and_then(|s| s.taints.as_ref())
                    .map(|ts| {
                        ts.iter()
                            .map(|t| Taint {
                                key: t.key.clone(),
                                value: t.value.clone(),
                                effect: t.effect.clone(),
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                allocatable,
                ready,
                unschedulable: spec.and_then(|s| s.unschedulable).unwrap_or(false),
            })
        })
        .collect()
}

/// The placement view of a GPUPool.
pub fn pool_view(pool: &GPUPool) -> PoolView {
    let sel = &pool.spec.node_selector;
    PoolView {
        name: pool.metadata.name.clone().unwrap_or_default(),
        selector: Selector {
            match_labels: sel.match_labels.clone().unwrap_or_default(),
            match_expressions: sel
                .match_expressions
                .iter()
                .flatten()
                .map(|e| Requirement {
                    key: e.key.clone(),
                    operator: e.operator.clone(),
                    values: e.values.clone().unwrap_or_default(),
                })
                .collect(),
        },
        tolerations: pool
            .spec
            .tolerations
            .iter()
            .map(|t| Toleration {
                key: t.key.clone(),
                operator: t.operator.clone(),
                value: t.value.clone(),
                effect: t.effect.clone(),
            })
            .collect(),
        policy: match pool.spec.placement {
            PlacementPolicy::BinPack => placement::Policy::BinPack,
            PlacementPolicy::Spread => placement::Policy::Spread,
        },
        gpu_resource: pool.spec.gpu_resource_name.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_node_is_not_ready_from_its_ready_conditions_last_transition() {
        let node = |status: &str| -> Node {
            serde_json::from_value(json!({
                "metadata": {"name": "n"},
                "status": {"conditions": [{"type": "Ready", "status": status,
                    "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
            }))
            .expect("node")
        };
        let t0 = 1_767_225_600; // 2026-01-01T00:00:00Z
        assert_eq!(node_not_ready_for(&node("True"), t0 + 100), None);
        assert_eq!(node_not_ready_for(&node("Unknown"), t0 + 42), Some(42));
        assert_eq!(node_not_ready_for(&node("False"), t0 + 7), Some(7));
        let bare: Node = serde_json::from_value(json!({"metadata": {"name": "n"}})).expect("node");
        assert_eq!(
            node_not_ready_for(&bare, t0),
            None,
            "no condition yet: not judged"
        );
    }

    #[test]
    fn counts_bound_and_planned_gpu_pods_but_not_finished_ones() {
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": "h100-0", "labels": {"nvidia.com/gpu.product": "H100"}},
            "spec": {"taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]},
            "status": {"allocatable": {"nvidia.com/gpu": "8", "cpu": "96"},
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .expect("node");
        let bound: Pod = serde_json::from_value(json!({
            "spec": {"nodeName": "h100-0", "containers": [{"name": "a", "resources": {"limits": {"nvidia.com/gpu": "2"}}}]}
        }))
        .expect("pod");
        let planned: Pod = serde_json::from_value(json!({
            "spec": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["h100-0"]}]}]}}},
                "containers": [{"name": "a", "resources": {"limits": {"nvidia.com/gpu": "3"}}}]}
        }))
        .expect("pod");
        let finished: Pod = serde_json::from_value(json!({
            "spec": {"nodeName": "h100-0", "containers": [{"name": "a", "resources": {"limits": {"nvidia.com/gpu": "1"}}}]},
            "status": {"phase": "Failed"}
        }))
        .expect("pod");
        let views = node_views([&node], [&bound, &planned, &finished].map(GpuClaim::of));
        assert_eq!(views.len(), 1);
        let v = &views[0];
        assert_eq!(v.allocatable.get("nvidia.com/gpu"), Some(&8));
        assert_eq!(v.used.get("nvidia.com/gpu"), Some(&5));
        assert!(v.ready);
        assert_eq!(v.taints.len(), 1);
        assert!(!v.allocatable.contains_key("cpu"));
    }

    #[test]
    fn a_view_corrected_claim_by_claim_equals_one_made_from_the_claims() {
        let nodes: Vec<Node> = ["a", "b"]
            .iter()
            .map(|n| {
                serde_json::from_value(json!({
                    "metadata": {"name": n},
                    "status": {"allocatable": {"nvidia.com/gpu": "8"}}
                }))
                .expect("node")
            })
            .collect();
        let claim = |node: Option<&str>, gpus: i64, holds: bool| GpuClaim {
            node: node.map(str::to_string),
            gpus: BTreeMap::from([("nvidia.com/gpu".to_string(), gpus)]),
            holds,
        };
        let old = [claim(Some("a"), 2, true), claim(Some("b"), 4, true)];
        let new = [
            claim(Some("a"), 2, true),
            claim(Some("a"), 1, true),
            claim(None, 8, true),
            claim(Some("b"), 8, false),
            claim(Some("gone"), 1, true),
        ];
        let mut views = node_views(&nodes, old.iter());
        for c in &old {
            count_claim(&mut views, c, -1);
        }
        for c in &new {
            count_claim(&mut views, c, 1);
        }
        let used = |vs: &[NodeView]| -> Vec<(String, BTreeMap<String, i64>)> {
            vs.iter()
                .map(|v| (v.name.clone(), v.used.clone()))
                .collect()
        };
        assert_eq!(used(&views), used(&node_views(&nodes, new.iter())));
        assert_eq!(views[0].free("nvidia.com/gpu"), 5);
        assert_eq!(
            views[1].free("nvidia.com/gpu"),
            8,
            "b's claims are gone or finished"
        );
    }
}
