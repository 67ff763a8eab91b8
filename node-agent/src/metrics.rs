//! The agent's `/metrics`, rendered from one consistent snapshot of its
//! state at each scrape (a fresh registry each time, so a GPU that changed
//! hands or a container that was forgotten leaves no stale series).
//!
//! Names are `strata_` prefixed, in base units; labels follow
//! dcgm-exporter's so that dashboards and queries carry over:
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `strata_gpu_utilization_ratio` | gauge | device |
//! | `strata_gpu_memory_used_bytes` | gauge | device |
//! | `strata_gpu_memory_total_bytes` | gauge | device |
//! | `strata_gpu_power_watts` | gauge | device |
//! | `strata_gpu_temperature_celsius` | gauge | device |
//! | `strata_gpu_energy_joules_total` | counter | device |
//! | `strata_gpu_energy_counter_joules` | gauge | device |
//! | `strata_gpu_energy_counter_resets_total` | counter | device |
//! | `strata_gpu_power_limit_watts` | gauge | device |
//! | `strata_node_agent_power_cap_watts` | gauge | `Hostname` |
//! | `strata_node_agent_power_limit_changes_total` | counter | |
//! | `strata_node_agent_power_limit_errors_total` | counter | |
//! | `strata_pod_gpu_energy_joules_total` | counter | pod |
//! | `strata_node_gpu_unattributed_energy_joules_total` | counter | `Hostname` |
//! | `strata_node_agent_up` | gauge | `source` |
//! | `strata_node_agent_errors_total` | counter | `source` |
//! | `strata_node_agent_gpus` | gauge | |
//! | `strata_node_agent_samples_total` | counter | |
//! | `strata_node_agent_info` | gauge | `version`, `driver_version`, `Hostname` |
//!
//! Device labels ([`DEVICE_LABELS`]): `gpu` (NVML index), `UUID`,
//! `modelName`, `Hostname` (the node), and `container`, `namespace`, `pod`
//! of the container that holds the GPU (empty when none does). Pod labels
//! ([`POD_LABELS`]): `UUID`, `Hostname`, `container`, `namespace`, `pod`:
//! one series per container and GPU it held, the energy used on that GPU
//! while the container held it.

use prometheus::{CounterVec, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry};

use crate::ledger::{DeviceReading, HoldersByGpu, Ledger, PodContainer};

/// GPU utilization, 0 to 1.
pub const UTILIZATION: &str = "strata_gpu_utilization_ratio";
/// Memory used, bytes.
pub const MEMORY_USED: &str = "strata_gpu_memory_used_bytes";
/// Memory total, bytes.
pub const MEMORY_TOTAL: &str = "strata_gpu_memory_total_bytes";
/// Power now, watts.
pub const POWER: &str = "strata_gpu_power_watts";
/// Temperature, degrees Celsius.
pub const TEMPERATURE: &str = "strata_gpu_temperature_celsius";
/// Energy used on the GPU since the agent started, joules (reset-safe).
pub const ENERGY: &str = "strata_gpu_energy_joules_total";
/// NVML's energy counter itself (since the driver loaded), joules.
pub const ENERGY_COUNTER: &str = "strata_gpu_energy_counter_joules";
/// Resets of NVML's energy counter seen (driver reloads).
pub const ENERGY_RESETS: &str = "strata_gpu_energy_counter_resets_total";
/// The GPU's enforced power limit, watts.
pub const POWER_LIMIT: &str = "strata_gpu_power_limit_watts";
/// The cap the node's GPUPools ask for, watts (absent without one).
pub const POWER_CAP: &str = "strata_node_agent_power_cap_watts";
/// Power limits the agent changed.
pub const POWER_LIMIT_CHANGES: &str = "strata_node_agent_power_limit_changes_total";
/// Power limits the agent could not read or set.
pub const POWER_LIMIT_ERRORS: &str = "strata_node_agent_power_limit_errors_total";
/// Energy used on a GPU while a container held it, joules.
pub const POD_ENERGY: &str = "strata_pod_gpu_energy_joules_total";
/// Energy of the node's GPUs that no container held, joules.
pub const UNATTRIBUTED_ENERGY: &str = "strata_node_gpu_unattributed_energy_joules_total";
/// 1 when the source answered at the last interval.
pub const UP: &str = "strata_node_agent_up";
/// Failed reads, by source.
pub const ERRORS: &str = "strata_node_agent_errors_total";
/// GPUs NVML shows.
pub const GPUS: &str = "strata_node_agent_gpus";
/// Intervals completed.
pub const SAMPLES: &str = "strata_node_agent_samples_total";
/// The agent's version and the driver's.
pub const INFO: &str = "strata_node_agent_info";

/// Labels of the per-GPU series, dcgm-exporter's names.
pub const DEVICE_LABELS: [&str; 7] = [
    "gpu",
    "UUID",
    "modelName",
    "Hostname",
    "container",
    "namespace",
    "pod",
];
/// Labels of the per-container series.
pub const POD_LABELS: [&str; 5] = ["UUID", "Hostname", "container", "namespace", "pod"];

/// The `source` label values.
pub const SOURCE_NVML: &str = "nvml";
/// The `source` label values.
pub const SOURCE_PODRESOURCES: &str = "podresources";

/// How the agent's sources are doing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Health {
    /// NVML answered at the last interval.
    pub nvml_up: bool,
    /// PodResources answered at the last interval.
    pub podresources_up: bool,
    /// Failed NVML reads (init, device listing, a device's field).
    pub nvml_errors: u64,
    /// Failed PodResources calls (connect or `List`).
    pub podresources_errors: u64,
    /// Intervals completed.
    pub samples: u64,
    /// Power limits changed.
    pub power_limit_changes: u64,
    /// Power limits that could not be read or set.
    pub power_limit_errors: u64,
}

/// What one scrape shows.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot<'a> {
    /// The node's name (`Hostname`).
    pub hostname: &'a str,
    /// The agent's version.
    pub version: &'a str,
    /// The driver's version, once NVML answered.
    pub driver_version: Option<&'a str>,
    /// The GPUs at the last interval (none when NVML did not answer).
    pub devices: &'a [DeviceReading],
    /// Who held each GPU at the last interval.
    pub holders: &'a HoldersByGpu,
    /// The energy accounts.
    pub ledger: &'a Ledger,
    /// The sources' health.
    pub health: &'a Health,
    /// The cap the node's pools ask for, watts.
    pub power_cap_watts: Option<u32>,
}

/// The label values of a GPU's series, in [`DEVICE_LABELS`] order: the
/// first container that holds it, or empty pod labels.
pub fn device_labels(
    d: &DeviceReading,
    holder: Option<&PodContainer>,
    hostname: &str,
) -> [String; 7] {
    let (container, namespace, pod) = holder.map_or(("", "", ""), |h| {
        (h.container.as_str(), h.namespace.as_str(), h.pod.as_str())
    });
    [
        d.index.to_string(),
        d.uuid.clone(),
        d.name.clone(),
        hostname.to_owned(),
        container.to_owned(),
        namespace.to_owned(),
        pod.to_owned(),
    ]
}

/// The label values of a container's series on a GPU, in [`POD_LABELS`]
/// order.
pub fn pod_labels(h: &PodContainer, uuid: &str, hostname: &str) -> [String; 5] {
    [
        uuid.to_owned(),
        hostname.to_owned(),
        h.container.clone(),
        h.namespace.clone(),
        h.pod.clone(),
    ]
}

fn gauge(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<GaugeVec> {
    let g = GaugeVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

fn counter(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<CounterVec> {
    let c = CounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

/// Sets a gauge when the value is known and finite.
fn set(g: &GaugeVec, labels: &[&str], v: Option<f64>) {
    if let Some(v) = v.filter(|v| v.is_finite()) {
        g.with_label_values(labels).set(v);
    }
}

/// The Prometheus text exposition of `s`.
pub fn render(s: &Snapshot<'_>) -> prometheus::Result<String> {
    let r = Registry::new();
    let dl = &DEVICE_LABELS;
    let utilization = gauge(&r, UTILIZATION, "GPU utilization (NVML), 0 to 1.", dl)?;
    let mem_used = gauge(&r, MEMORY_USED, "GPU memory used (NVML), bytes.", dl)?;
    let mem_total = gauge(&r, MEMORY_TOTAL, "GPU memory total (NVML), bytes.", dl)?;
    let power = gauge(&r, POWER, "GPU power draw (NVML), watts.", dl)?;
    let temperature = gauge(
        &r,
        TEMPERATURE,
        "GPU temperature (NVML), degrees Celsius.",
        dl,
    )?;
    let energy = counter(
        &r,
        ENERGY,
        "Energy used on the GPU since the agent started, joules (from NVML's energy counter; reset-safe).",
        dl,
    )?;
    let energy_counter = gauge(
        &r,
        ENERGY_COUNTER,
        "NVML's total energy counter of the GPU (since the driver loaded), joules.",
        dl,
    )?;
    let resets = counter(
        &r,
        ENERGY_RESETS,
        "Times NVML's energy counter of the GPU went backwards (driver reloads) since the agent started.",
        dl,
    )?;
    let pod_energy = counter(
        &r,
        POD_ENERGY,
        "Energy used on the GPU while the container held it (kubelet PodResources), joules, since the agent started.",
        &POD_LABELS,
    )?;
    let unattributed = counter(
        &r,
        UNATTRIBUTED_ENERGY,
        "Energy of the node's GPUs while no container held them (or PodResources did not answer), joules, since the agent started.",
        &["Hostname"],
    )?;
    let up = IntGaugeVec::new(
        Opts::new(
            UP,
            "1 when the source (nvml, podresources) answered at the last interval.",
        ),
        &["source"],
    )?;
    r.register(Box::new(up.clone()))?;
    let errors = IntCounterVec::new(
        Opts::new(ERRORS, "Failed reads, by source (nvml, podresources)."),
        &["source"],
    )?;
    r.register(Box::new(errors.clone()))?;
    let power_limit = gauge(
        &r,
        POWER_LIMIT,
        "The GPU's enforced power limit (NVML), watts.",
        dl,
    )?;
    let power_cap = gauge(
        &r,
        POWER_CAP,
        "The power cap the node's GPUPools ask for (the lowest), watts; absent without one.",
        &["Hostname"],
    )?;
    let limit_changes = prometheus::IntCounter::new(
        POWER_LIMIT_CHANGES,
        "GPU power limits the agent set (GPUPool powerCapWatts).",
    )?;
    r.register(Box::new(limit_changes.clone()))?;
    let limit_errors = prometheus::IntCounter::new(
        POWER_LIMIT_ERRORS,
        "GPU power limits the agent could not set (each GPU, each interval).",
    )?;
    r.register(Box::new(limit_errors.clone()))?;
    let gpus = prometheus::IntGauge::new(GPUS, "GPUs NVML shows on this node.")?;
    r.register(Box::new(gpus.clone()))?;
    let samples = prometheus::IntCounter::new(SAMPLES, "Intervals completed.")?;
    r.register(Box::new(samples.clone()))?;
    let info = IntGaugeVec::new(
        Opts::new(INFO, "The agent's version and the NVIDIA driver's."),
        &["version", "driver_version", "Hostname"],
    )?;
    r.register(Box::new(info.clone()))?;

    for d in s.devices {
        let holder = s.holders.get(&d.uuid).and_then(|h| h.first());
        let values = device_labels(d, holder, s.hostname);
        let labels: Vec<&str> = values.iter().map(String::as_str).collect();
        set(&utilization, &labels, d.utilization);
        set(&mem_used, &labels, d.memory_used_bytes.map(|b| b as f64));
        set(&mem_total, &labels, d.memory_total_bytes.map(|b| b as f64));
        set(&power, &labels, d.power_watts);
        set(&temperature, &labels, d.temperature_celsius);
        set(&power_limit, &labels, d.power_limit_watts);
        set(
            &energy_counter,
            &labels,
            d.energy_mj.map(|mj| mj as f64 / 1000.0),
        );
        if d.energy_mj.is_some() {
            energy
                .with_label_values(&labels)
                .inc_by(s.ledger.device_joules(&d.uuid).max(0.0));
            resets
                .with_label_values(&labels)
                .inc_by(s.ledger.device_resets(&d.uuid) as f64);
        }
    }
    for (h, uuid, joules) in s.ledger.pods() {
        let values = pod_labels(h, uuid, s.hostname);
        let labels: Vec<&str> = values.iter().map(String::as_str).collect();
        pod_energy
            .with_label_values(&labels)
            .inc_by(joules.max(0.0));
    }
    unattributed
        .with_label_values(&[s.hostname])
        .inc_by(s.ledger.unattributed_joules().max(0.0));
    up.with_label_values(&[SOURCE_NVML])
        .set(i64::from(s.health.nvml_up));
    up.with_label_values(&[SOURCE_PODRESOURCES])
        .set(i64::from(s.health.podresources_up));
    errors
        .with_label_values(&[SOURCE_NVML])
        .inc_by(s.health.nvml_errors);
    errors
        .with_label_values(&[SOURCE_PODRESOURCES])
        .inc_by(s.health.podresources_errors);
    set(&power_cap, &[s.hostname], s.power_cap_watts.map(f64::from));
    limit_changes.inc_by(s.health.power_limit_changes);
    limit_errors.inc_by(s.health.power_limit_errors);
    gpus.set(i64::try_from(s.devices.len()).unwrap_or(i64::MAX));
    samples.inc_by(s.health.samples);
    info.with_label_values(&[s.version, s.driver_version.unwrap_or(""), s.hostname])
        .set(1);

    prometheus::TextEncoder::new().encode_to_string(&r.gather())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    fn pc(pod: &str) -> PodContainer {
        PodContainer {
            namespace: "team-a".into(),
            pod: pod.into(),
            container: "engine".into(),
        }
    }

    fn reading(index: u32, uuid: &str, mj: u64) -> DeviceReading {
        DeviceReading {
            index,
            uuid: uuid.into(),
            name: "NVIDIA H100 80GB HBM3".into(),
            utilization: Some(0.5),
            memory_used_bytes: Some(1024),
            memory_total_bytes: Some(4096),
            power_watts: Some(350.0),
            temperature_celsius: Some(55.0),
            energy_mj: Some(mj),
            power_limit_watts: Some(700.0),
        }
    }

    #[test]
    fn labels_are_dcgm_exporters_with_empty_pod_labels_when_unheld() {
        let d = reading(3, "GPU-x", 0);
        assert_eq!(
            device_labels(&d, Some(&pc("chat-0")), "node-1"),
            [
                "3",
                "GPU-x",
                "NVIDIA H100 80GB HBM3",
                "node-1",
                "engine",
                "team-a",
                "chat-0"
            ]
        );
        assert_eq!(
            device_labels(&d, None, "node-1"),
            ["3", "GPU-x", "NVIDIA H100 80GB HBM3", "node-1", "", "", ""]
        );
        assert_eq!(
            pod_labels(&pc("chat-0"), "GPU-x", "node-1"),
            ["GPU-x", "node-1", "engine", "team-a", "chat-0"]
        );
    }

    #[test]
    fn a_page_shows_every_gpu_its_holder_and_the_pods_energy() {
        let t0 = Instant::now();
        let mut ledger = Ledger::new(Duration::from_secs(600));
        let mut holders = HoldersByGpu::new();
        holders.insert("GPU-a".into(), vec![pc("chat-0")]);
        ledger.record(
            t0,
            &[reading(0, "GPU-a", 1_000), reading(1, "GPU-b", 0)],
            Some(&holders),
        );
        let devices = [reading(0, "GPU-a", 3_500), reading(1, "GPU-b", 1_000)];
        ledger.record(t0, &devices, Some(&holders));
        let health = Health {
            nvml_up: true,
            podresources_up: false,
            nvml_errors: 0,
            podresources_errors: 3,
            samples: 2,
            power_limit_changes: 8,
            power_limit_errors: 1,
        };
        let text = render(&Snapshot {
            hostname: "node-1",
            version: "0.1.0",
            driver_version: Some("550.54.15"),
            devices: &devices,
            holders: &holders,
            ledger: &ledger,
            health: &health,
            power_cap_watts: Some(350),
        })
        .expect("render");
        // The encoder sorts labels by name.
        let held = r#"{Hostname="node-1",UUID="GPU-a",container="engine",gpu="0",modelName="NVIDIA H100 80GB HBM3",namespace="team-a",pod="chat-0"}"#;
        let free = r#"{Hostname="node-1",UUID="GPU-b",container="",gpu="1",modelName="NVIDIA H100 80GB HBM3",namespace="",pod=""}"#;
        for line in [
            format!("strata_gpu_utilization_ratio{held} 0.5"),
            format!("strata_gpu_memory_used_bytes{held} 1024"),
            format!("strata_gpu_memory_total_bytes{held} 4096"),
            format!("strata_gpu_power_watts{held} 350"),
            format!("strata_gpu_temperature_celsius{held} 55"),
            format!("strata_gpu_energy_joules_total{held} 2.5"),
            format!("strata_gpu_energy_counter_joules{held} 3.5"),
            format!("strata_gpu_energy_counter_resets_total{held} 0"),
            format!("strata_gpu_power_limit_watts{held} 700"),
            r#"strata_node_agent_power_cap_watts{Hostname="node-1"} 350"#.to_owned(),
            "strata_node_agent_power_limit_changes_total 8".to_owned(),
            "strata_node_agent_power_limit_errors_total 1".to_owned(),
            format!("strata_gpu_energy_joules_total{free} 1"),
            r#"strata_pod_gpu_energy_joules_total{Hostname="node-1",UUID="GPU-a",container="engine",namespace="team-a",pod="chat-0"} 2.5"#.to_owned(),
            r#"strata_node_gpu_unattributed_energy_joules_total{Hostname="node-1"} 1"#.to_owned(),
            r#"strata_node_agent_up{source="nvml"} 1"#.to_owned(),
            r#"strata_node_agent_up{source="podresources"} 0"#.to_owned(),
            r#"strata_node_agent_errors_total{source="podresources"} 3"#.to_owned(),
            r#"strata_node_agent_errors_total{source="nvml"} 0"#.to_owned(),
            "strata_node_agent_gpus 2".to_owned(),
            "strata_node_agent_samples_total 2".to_owned(),
            r#"strata_node_agent_info{Hostname="node-1",driver_version="550.54.15",version="0.1.0"} 1"#.to_owned(),
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line} in\n{text}"
            );
        }
        // The operator's reader finds the pod's GPU on this page.
        let by_pod = strata_core::telemetry::parse_node_agent(&text);
        let key = strata_core::telemetry::PodKey {
            namespace: "team-a".into(),
            pod: "chat-0".into(),
        };
        let gpu = &by_pod[&key]["GPU-a"];
        assert_eq!(gpu.since_start, Some(2.5));
        assert_eq!(gpu.counter, Some(3.5));
        assert_eq!(gpu.power, Some(350.0));
        assert_eq!(by_pod.len(), 1, "unheld GPUs are nobody's");
        // And every GPU's limit, held or not.
        let limits = strata_core::telemetry::parse_power_limits(&text);
        assert_eq!(limits.len(), 2);
        assert_eq!(
            (
                limits[0].node.as_str(),
                limits[0].uuid.as_str(),
                limits[0].watts
            ),
            ("node-1", "GPU-a", 700.0)
        );
    }

    #[test]
    fn without_nvml_the_page_says_so() {
        let ledger = Ledger::new(Duration::from_secs(600));
        let health = Health {
            nvml_errors: 4,
            samples: 4,
            ..Health::default()
        };
        let text = render(&Snapshot {
            hostname: "n",
            version: "0.1.0",
            driver_version: None,
            devices: &[],
            holders: &HoldersByGpu::new(),
            ledger: &ledger,
            health: &health,
            power_cap_watts: None,
        })
        .expect("render");
        assert!(!text.contains("strata_node_agent_power_cap_watts{"));
        assert!(
            text.contains("strata_node_agent_up{source=\"nvml\"} 0"),
            "{text}"
        );
        assert!(text.contains("strata_node_agent_errors_total{source=\"nvml\"} 4"));
        assert!(text.contains("strata_node_agent_gpus 0"));
        assert!(!text.contains("strata_gpu_power_watts{"));
    }
}
