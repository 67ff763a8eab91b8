//! GPU power limits from GPUPools, and what a pool's GPUs report back, pure.
//!
//! The node agent asks [`desired`] what its node's GPUs should run at:
//! a node in no GPUPool is not Strata's to touch; a node in pools that set
//! no `powerCapWatts` runs at the GPUs' default limit; otherwise at the
//! lowest cap of its pools (a GPU counts once, so the strictest pool wins).
//! [`target_mw`] turns that into the limit one GPU gets within what its
//! driver allows. The operator summarises the limits the agents report
//! with [`summarise`] for the pool's status.

use std::collections::BTreeMap;

use strata_crds::GPUPool;

/// What a node's GPUs should run at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Desired {
    /// The node is in no GPUPool (or nothing is known yet): leave its GPUs
    /// as they are.
    Unmanaged,
    /// In pools without a cap: the GPUs' default limit.
    Default,
    /// The lowest cap of the node's pools, in watts.
    Cap(u32),
}

impl Desired {
    /// The cap in watts, if any.
    pub fn cap_watts(self) -> Option<u32> {
        match self {
            Self::Cap(w) => Some(w),
            _ => None,
        }
    }
}

/// What a node with `labels` should run its GPUs at, given every pool.
/// Pools being deleted still count until they are gone.
pub fn desired<'a>(
    labels: &BTreeMap<String, String>,
    pools: impl IntoIterator<Item = &'a GPUPool>,
) -> Desired {
    let mut out = Desired::Unmanaged;
    for pool in pools {
        if !crate::view::pool_view(pool).selector.matches(labels) {
            continue;
        }
        let cap = pool
            .spec
            .power_cap_watts
            .and_then(|w| u32::try_from(w).ok())
            .filter(|w| *w > 0);
        out = match (out, cap) {
            (Desired::Cap(a), Some(b)) => Desired::Cap(a.min(b)),
            (Desired::Cap(a), None) => Desired::Cap(a),
            (_, Some(b)) => Desired::Cap(b),
            (_, None) => Desired::Default,
        };
    }
    out
}

/// The limit one GPU should be set to, in mW, within its driver's
/// constraints `[min_mw, max_mw]`; `None`: leave it alone.
pub fn target_mw(desired: Desired, default_mw: u32, min_mw: u32, max_mw: u32) -> Option<u32> {
    let (lo, hi) = (min_mw.min(max_mw), max_mw.max(min_mw));
    match desired {
        Desired::Unmanaged => None,
        Desired::Default => Some(default_mw.clamp(lo, hi)),
        Desired::Cap(w) => Some(w.saturating_mul(1000).clamp(lo, hi)),
    }
}

/// One GPU's limit as an agent reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuLimit {
    /// Its node.
    pub node: String,
    /// Its UUID.
    pub uuid: String,
    /// The enforced power limit, watts.
    pub watts: f64,
}

/// A pool's power cap as its GPUs report it.
#[derive(Debug, Clone, PartialEq)]
pub struct CapSummary {
    /// GPUs of the pool's nodes that reported a limit.
    pub gpus: i32,
    /// Of those, the GPUs whose limit is at or under the cap.
    pub gpus_at_cap: i32,
    /// The highest limit reported, watts.
    pub max_limit_watts: Option<f64>,
    /// Up to three GPUs over the cap, for the status message.
    pub over: Vec<GpuLimit>,
}

/// Summarises the limits of the GPUs on `nodes` against `cap_watts`; a
/// limit within half a watt of the cap counts as at the cap (NVML works in
/// mW).
pub fn summarise<'a>(
    cap_watts: f64,
    nodes: &[String],
    limits: impl IntoIterator<Item = &'a GpuLimit>,
) -> CapSummary {
    let mut s = CapSummary {
        gpus: 0,
        gpus_at_cap: 0,
        max_limit_watts: None,
        over: Vec::new(),
    };
    for l in limits.into_iter().filter(|l| nodes.contains(&l.node)) {
        if !l.watts.is_finite() {
            continue;
        }
        s.gpus += 1;
        s.max_limit_watts = Some(s.max_limit_watts.map_or(l.watts, |m: f64| m.max(l.watts)));
        if l.watts <= cap_watts + 0.5 {
            s.gpus_at_cap += 1;
        } else if s.over.len() < 3 {
            s.over.push(l.clone());
        }
    }
    s
}

/// The status message for a summary.
pub fn message(cap_watts: f64, s: &CapSummary) -> String {
    if s.gpus == 0 {
        return "no node agent reports this pool's GPUs yet (is nodeAgent.powerCaps.enabled set, \
                and does the GPU telemetry source read node agents?)"
            .to_owned();
    }
    if s.gpus_at_cap == s.gpus {
        return format!("all {} GPUs run at or under {cap_watts} W", s.gpus);
    }
    let over: Vec<String> = s
        .over
        .iter()
        .map(|l| format!("{} on {} at {} W", l.uuid, l.node, l.watts))
        .collect();
    format!(
        "{} of {} GPUs run over the {cap_watts} W cap ({}); the node agent applies caps within \
         each GPU's limits and reports failures in strata_node_agent_power_limit_errors_total",
        s.gpus - s.gpus_at_cap,
        s.gpus,
        over.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
    use strata_crds::gpupool::GPUPoolSpec;

    fn pool(name: &str, product: &str, cap: Option<i32>, price: Option<&str>) -> GPUPool {
        GPUPool::new(
            name,
            GPUPoolSpec {
                node_selector: LabelSelector {
                    match_labels: Some(
                        [("nvidia.com/gpu.product".to_owned(), product.to_owned())].into(),
                    ),
                    match_expressions: None,
                },
                tolerations: Vec::new(),
                placement: Default::default(),
                gpu_resource_name: "nvidia.com/gpu".into(),
                cost_per_gpu_hour: price.map(Into::into),
                power_cap_watts: cap,
            },
        )
    }

    fn node(product: &str) -> BTreeMap<String, String> {
        [("nvidia.com/gpu.product".to_owned(), product.to_owned())].into()
    }

    #[test]
    fn the_strictest_pool_of_a_node_wins_and_other_nodes_are_left_alone() {
        let pools = [
            pool("h100", "H100", Some(500), None),
            pool("h100-eco", "H100", Some(350), None),
            pool("a100", "A100", None, None),
        ];
        assert_eq!(desired(&node("H100"), &pools), Desired::Cap(350));
        assert_eq!(desired(&node("A100"), &pools), Desired::Default);
        assert_eq!(desired(&node("L4"), &pools), Desired::Unmanaged);
        assert_eq!(desired(&node("H100"), &pools[2..]), Desired::Unmanaged);
        // A pool without a cap does not lift another's.
        let mixed = [
            pool("a", "H100", None, None),
            pool("b", "H100", Some(400), None),
        ];
        assert_eq!(desired(&node("H100"), &mixed), Desired::Cap(400));
        assert_eq!(Desired::Cap(400).cap_watts(), Some(400));
        assert_eq!(Desired::Default.cap_watts(), None);
    }

    #[test]
    fn targets_stay_within_the_drivers_constraints() {
        let (default, min, max) = (700_000, 200_000, 700_000);
        assert_eq!(target_mw(Desired::Unmanaged, default, min, max), None);
        assert_eq!(
            target_mw(Desired::Default, default, min, max),
            Some(700_000)
        );
        assert_eq!(
            target_mw(Desired::Cap(350), default, min, max),
            Some(350_000)
        );
        assert_eq!(
            target_mw(Desired::Cap(100), default, min, max),
            Some(200_000)
        );
        assert_eq!(
            target_mw(Desired::Cap(2000), default, min, max),
            Some(700_000)
        );
        // Swapped constraints from a confused driver still give a bound.
        assert_eq!(
            target_mw(Desired::Cap(350), default, max, min),
            Some(350_000)
        );
    }

    #[test]
    fn a_summary_counts_the_pools_gpus_at_and_over_the_cap() {
        let l = |node: &str, uuid: &str, watts: f64| GpuLimit {
            node: node.into(),
            uuid: uuid.into(),
            watts,
        };
        let limits = [
            l("n1", "GPU-a", 350.0),
            l("n1", "GPU-b", 350.4),
            l("n2", "GPU-c", 700.0),
            l("other", "GPU-d", 700.0),
            l("n2", "GPU-e", f64::NAN),
        ];
        let nodes = ["n1".to_owned(), "n2".to_owned()];
        let s = summarise(350.0, &nodes, &limits);
        assert_eq!((s.gpus, s.gpus_at_cap), (3, 2));
        assert_eq!(s.max_limit_watts, Some(700.0));
        assert_eq!(s.over, vec![l("n2", "GPU-c", 700.0)]);
        let m = message(350.0, &s);
        assert!(
            m.starts_with("1 of 3 GPUs run over the 350 W cap (GPU-c on n2 at 700 W)"),
            "{m}"
        );
        let all = summarise(350.0, &nodes[..1], &limits);
        assert_eq!(message(350.0, &all), "all 2 GPUs run at or under 350 W");
        let none = summarise(350.0, &["x".to_owned()], &limits);
        assert!(message(350.0, &none).starts_with("no node agent"));
    }
}
