//! The agent's accounts, pure: each interval's readings of every GPU of the
//! node and who held each GPU at that sample give energy per GPU and per
//! pod. No NVML, no sockets, no clock of its own (callers pass `now`).
//!
//! Rules:
//! - a GPU's NVML energy counter is read through
//!   [`EnergyAccumulator`](strata_core::energy_counter::EnergyAccumulator):
//!   the first reading is the baseline, a lower reading is a reset (driver
//!   reload) that counts the new value;
//! - each interval's increment of a GPU goes to the containers that held
//!   the GPU at that sample (PodResources `List`), in equal shares when
//!   several hold it (time-slicing replicas); with no holder, or when
//!   PodResources did not answer, to the node's unattributed energy;
//! - a container's series appears at 0 J as soon as it holds a GPU, and is
//!   forgotten `retention` after it was last seen holding it (its counter
//!   must outlive the pod a little, so that the last increments are
//!   scraped).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use strata_core::energy_counter::EnergyAccumulator;

/// One GPU as NVML showed it at one sample. Fields NVML could not give
/// (not supported, or an error) are `None`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceReading {
    /// NVML's index (what dcgm-exporter's `gpu` label carries).
    pub index: u32,
    /// The GPU's UUID (`GPU-...`): the device plugin's device ID.
    pub uuid: String,
    /// The product name (`modelName`).
    pub name: String,
    /// GPU utilization, 0 to 1.
    pub utilization: Option<f64>,
    /// Memory used, bytes.
    pub memory_used_bytes: Option<u64>,
    /// Memory total, bytes.
    pub memory_total_bytes: Option<u64>,
    /// Power now, watts.
    pub power_watts: Option<f64>,
    /// Temperature, degrees Celsius.
    pub temperature_celsius: Option<f64>,
    /// NVML's total-energy counter, millijoules since the driver loaded.
    pub energy_mj: Option<u64>,
    /// The enforced power limit, watts.
    pub power_limit_watts: Option<f64>,
}

/// A container that holds GPUs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodContainer {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// The container the GPU was allocated to.
    pub container: String,
}

/// Who holds each GPU, by GPU UUID, in the kubelet's order.
pub type HoldersByGpu = BTreeMap<String, Vec<PodContainer>>;

/// The GPU UUID a device plugin's device ID is on: the ID itself under the
/// default `uuid` strategy, `<uuid>::<replica>` under time-slicing. MIG
/// slices (`MIG-...`) are devices of their own and stay as they are.
pub fn gpu_of_device_id(id: &str) -> &str {
    id.split_once("::").map_or(id, |(gpu, _)| gpu)
}

/// The PodResources holders (by device ID) as holders by GPU UUID, each
/// container once per GPU.
pub fn holders_by_gpu(holders: &BTreeMap<String, strata_podresources::Holder>) -> HoldersByGpu {
    let mut out = HoldersByGpu::new();
    for (id, h) in holders {
        let holder = PodContainer {
            namespace: h.namespace.clone(),
            pod: h.pod.clone(),
            container: h.container.clone(),
        };
        let list = out.entry(gpu_of_device_id(id).to_owned()).or_default();
        if !list.contains(&holder) {
            list.push(holder);
        }
    }
    out
}

/// Shares `joules` used on one GPU among the containers that held it:
/// equal parts; nothing when none did.
pub fn share(joules: f64, holders: &[PodContainer]) -> Vec<(&PodContainer, f64)> {
    if holders.is_empty() {
        return Vec::new();
    }
    let part = joules / holders.len() as f64;
    holders.iter().map(|h| (h, part)).collect()
}

/// A counter reset seen on a GPU (to log).
#[derive(Debug, Clone, PartialEq)]
pub struct Reset {
    /// The GPU.
    pub uuid: String,
    /// The counter's new value, joules (counted as used since the reset).
    pub joules: f64,
}

#[derive(Debug, Clone, Default)]
struct DeviceAccount {
    joules: f64,
    resets: u64,
}

#[derive(Debug, Clone)]
struct PodAccount {
    joules: f64,
    last_seen: Instant,
}

/// Energy per GPU, per container and GPU, and unattributed, since the
/// agent started.
#[derive(Debug, Clone)]
pub struct Ledger {
    counters: EnergyAccumulator,
    devices: BTreeMap<String, DeviceAccount>,
    pods: BTreeMap<(PodContainer, String), PodAccount>,
    unattributed_joules: f64,
    retention: Duration,
}

impl Ledger {
    /// An empty ledger; containers are forgotten `retention` after they
    /// were last seen holding a GPU.
    pub fn new(retention: Duration) -> Self {
        Self {
            counters: EnergyAccumulator::default(),
            devices: BTreeMap::new(),
            pods: BTreeMap::new(),
            unattributed_joules: 0.0,
            retention,
        }
    }

    /// Records one sample: the GPUs' readings and who held each GPU then
    /// (`None`: PodResources did not answer, every GPU is unattributed).
    /// Returns the counter resets seen.
    pub fn record(
        &mut self,
        now: Instant,
        devices: &[DeviceReading],
        holders: Option<&HoldersByGpu>,
    ) -> Vec<Reset> {
        let mut resets = Vec::new();
        if let Some(holders) = holders {
            for (uuid, list) in holders {
                for h in list {
                    self.pods
                        .entry((h.clone(), uuid.clone()))
                        .and_modify(|p| p.last_seen = now)
                        .or_insert(PodAccount {
                            joules: 0.0,
                            last_seen: now,
                        });
                }
            }
        }
        for d in devices {
            let Some(mj) = d.energy_mj else { continue };
            let delta = self.counters.update(&d.uuid, mj);
            let account = self.devices.entry(d.uuid.clone()).or_default();
            account.joules += delta.joules;
            if delta.reset {
                account.resets += 1;
                resets.push(Reset {
                    uuid: d.uuid.clone(),
                    joules: delta.joules,
                });
            }
            let held = holders
                .and_then(|h| h.get(&d.uuid))
                .map(Vec::as_slice)
                .unwrap_or_default();
            let shares = share(delta.joules, held);
            if shares.is_empty() {
                self.unattributed_joules += delta.joules;
            }
            for (h, joules) in shares {
                if let Some(p) = self.pods.get_mut(&(h.clone(), d.uuid.clone())) {
                    p.joules += joules;
                }
            }
        }
        let retention = self.retention;
        self.pods
            .retain(|_, p| now.saturating_duration_since(p.last_seen) <= retention);
        resets
    }

    /// Energy used on a GPU since the agent first read it, joules.
    pub fn device_joules(&self, uuid: &str) -> f64 {
        self.devices.get(uuid).map_or(0.0, |a| a.joules)
    }

    /// Counter resets seen on a GPU.
    pub fn device_resets(&self, uuid: &str) -> u64 {
        self.devices.get(uuid).map_or(0, |a| a.resets)
    }

    /// Energy each container used on each GPU while it held it, joules:
    /// `(container, GPU UUID, joules)`.
    pub fn pods(&self) -> impl Iterator<Item = (&PodContainer, &str, f64)> {
        self.pods
            .iter()
            .map(|((h, uuid), p)| (h, uuid.as_str(), p.joules))
    }

    /// Energy no container held, joules (idle GPUs, and intervals when
    /// PodResources did not answer).
    pub fn unattributed_joules(&self) -> f64 {
        self.unattributed_joules
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pc(ns: &str, pod: &str, c: &str) -> PodContainer {
        PodContainer {
            namespace: ns.into(),
            pod: pod.into(),
            container: c.into(),
        }
    }

    fn gpu(index: u32, uuid: &str, mj: u64) -> DeviceReading {
        DeviceReading {
            index,
            uuid: uuid.into(),
            name: "NVIDIA H100 80GB HBM3".into(),
            energy_mj: Some(mj),
            ..DeviceReading::default()
        }
    }

    fn holders(list: &[(&str, PodContainer)]) -> HoldersByGpu {
        let mut out = HoldersByGpu::new();
        for (uuid, h) in list {
            out.entry((*uuid).to_owned()).or_default().push(h.clone());
        }
        out
    }

    fn pod_joules(l: &Ledger, h: &PodContainer, uuid: &str) -> Option<f64> {
        l.pods()
            .find(|(p, u, _)| *p == h && *u == uuid)
            .map(|(_, _, j)| j)
    }

    #[test]
    fn device_ids_map_to_their_gpu() {
        assert_eq!(gpu_of_device_id("GPU-a"), "GPU-a");
        assert_eq!(
            gpu_of_device_id("GPU-a::3"),
            "GPU-a",
            "time-slicing replica"
        );
        assert_eq!(gpu_of_device_id("MIG-x"), "MIG-x");
    }

    #[test]
    fn kubelet_holders_become_holders_by_gpu() {
        let h = |pod: &str| strata_podresources::Holder {
            namespace: "ns".into(),
            pod: pod.into(),
            container: "engine".into(),
            resource: "nvidia.com/gpu".into(),
        };
        let by_id: BTreeMap<String, _> = [
            ("GPU-a".to_owned(), h("p1")),
            ("GPU-b::0".to_owned(), h("p2")),
            ("GPU-b::1".to_owned(), h("p3")),
            ("GPU-b::2".to_owned(), h("p2")),
        ]
        .into_iter()
        .collect();
        let by_gpu = holders_by_gpu(&by_id);
        assert_eq!(by_gpu["GPU-a"], [pc("ns", "p1", "engine")]);
        assert_eq!(
            by_gpu["GPU-b"],
            [pc("ns", "p2", "engine"), pc("ns", "p3", "engine")],
            "each container once"
        );
    }

    #[test]
    fn shares_are_equal_and_nobody_gets_nothing() {
        let a = pc("ns", "a", "c");
        let b = pc("ns", "b", "c");
        assert!(share(10.0, &[]).is_empty());
        assert_eq!(share(10.0, std::slice::from_ref(&a)), [(&a, 10.0)]);
        assert_eq!(share(10.0, &[a.clone(), b.clone()]), [(&a, 5.0), (&b, 5.0)]);
    }

    #[test]
    fn each_intervals_energy_goes_to_the_holder_at_that_sample() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let a = pc("team", "chat-0", "engine");
        let b = pc("team", "chat-1", "engine");
        let mut l = Ledger::new(Duration::from_secs(600));

        // Baseline: 0 J for everyone, A's series exists at 0.
        let held_a = holders(&[("GPU-0", a.clone())]);
        l.record(
            s(0),
            &[gpu(0, "GPU-0", 1_000_000), gpu(1, "GPU-1", 5_000)],
            Some(&held_a),
        );
        assert_eq!(pod_joules(&l, &a, "GPU-0"), Some(0.0));
        assert_eq!(l.device_joules("GPU-0"), 0.0);

        // 100 J on GPU-0 (A's), 7 J on GPU-1 (nobody's).
        l.record(
            s(1),
            &[gpu(0, "GPU-0", 1_100_000), gpu(1, "GPU-1", 12_000)],
            Some(&held_a),
        );
        assert_eq!(pod_joules(&l, &a, "GPU-0"), Some(100.0));
        assert_eq!(l.unattributed_joules(), 7.0);

        // GPU-0 changes hands: the interval ending at this sample is B's.
        let held_b = holders(&[("GPU-0", b.clone())]);
        l.record(s(2), &[gpu(0, "GPU-0", 1_150_000)], Some(&held_b));
        assert_eq!(pod_joules(&l, &a, "GPU-0"), Some(100.0));
        assert_eq!(pod_joules(&l, &b, "GPU-0"), Some(50.0));

        // PodResources did not answer: unattributed, B keeps its total.
        l.record(s(3), &[gpu(0, "GPU-0", 1_160_000)], None);
        assert_eq!(pod_joules(&l, &b, "GPU-0"), Some(50.0));
        assert_eq!(l.unattributed_joules(), 17.0);
        assert_eq!(l.device_joules("GPU-0"), 160.0);
    }

    #[test]
    fn a_counter_reset_counts_the_new_value_not_a_negative_or_the_whole_counter() {
        let t0 = Instant::now();
        let a = pc("team", "chat-0", "engine");
        let held = holders(&[("GPU-0", a.clone())]);
        let mut l = Ledger::new(Duration::from_secs(600));
        l.record(t0, &[gpu(0, "GPU-0", 9_000_000)], Some(&held));
        l.record(t0, &[gpu(0, "GPU-0", 9_010_000)], Some(&held));
        let resets = l.record(t0, &[gpu(0, "GPU-0", 2_000)], Some(&held));
        assert_eq!(
            resets,
            [Reset {
                uuid: "GPU-0".into(),
                joules: 2.0
            }]
        );
        assert_eq!(pod_joules(&l, &a, "GPU-0"), Some(12.0));
        assert_eq!(l.device_resets("GPU-0"), 1);
        // A GPU without an energy counter (pre-Volta) counts nothing.
        let mut old = gpu(1, "GPU-1", 0);
        old.energy_mj = None;
        l.record(t0, &[old], Some(&held));
        assert_eq!(l.device_joules("GPU-1"), 0.0);
    }

    #[test]
    fn time_sliced_gpus_split_and_gone_pods_are_forgotten_after_retention() {
        let t0 = Instant::now();
        let a = pc("ns", "a", "engine");
        let b = pc("ns", "b", "engine");
        let mut l = Ledger::new(Duration::from_secs(60));
        let both = holders(&[("GPU-0", a.clone()), ("GPU-0", b.clone())]);
        l.record(t0, &[gpu(0, "GPU-0", 0)], Some(&both));
        l.record(t0, &[gpu(0, "GPU-0", 30_000)], Some(&both));
        assert_eq!(pod_joules(&l, &a, "GPU-0"), Some(15.0));
        assert_eq!(pod_joules(&l, &b, "GPU-0"), Some(15.0));

        // B leaves; within the retention its series stays, then goes.
        let only_a = holders(&[("GPU-0", a.clone())]);
        l.record(
            t0 + Duration::from_secs(30),
            &[gpu(0, "GPU-0", 40_000)],
            Some(&only_a),
        );
        assert_eq!(pod_joules(&l, &b, "GPU-0"), Some(15.0));
        assert_eq!(pod_joules(&l, &a, "GPU-0"), Some(25.0));
        l.record(
            t0 + Duration::from_secs(61),
            &[gpu(0, "GPU-0", 40_000)],
            Some(&only_a),
        );
        assert_eq!(pod_joules(&l, &b, "GPU-0"), None);
        assert!(pod_joules(&l, &a, "GPU-0").is_some());
    }
}
