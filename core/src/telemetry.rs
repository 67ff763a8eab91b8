//! Where the energy accountant's GPU readings come from, pure: a replica's
//! GPUs are metered where a real node lets them be seen, not by its sidecar
//! (which requests no GPU and sees none).
//!
//! - [`parse_node_agent`]: a `strata-node-agent`'s `/metrics` (every GPU of
//!   its node, with the pod that holds each, from the kubelet's
//!   PodResources API) as readings by pod.
//! - [`dcgm_queries`] and [`parse_dcgm`]: dcgm-exporter's metrics, as the
//!   NVIDIA GPU Operator exports them, read through Prometheus' HTTP API.
//!
//! A GPU that no pod holds is not any Model's and is left out.

use std::collections::BTreeMap;

use crate::energy::{GpuReading, label};
use crate::promql;

/// A pod, by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PodKey {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub pod: String,
}

/// GPU readings by pod, then by GPU UUID.
pub type ByPod = BTreeMap<PodKey, BTreeMap<String, GpuReading>>;

/// The node agent's metric names (its contract with the operator).
pub mod agent {
    /// The GPU's NVML energy counter (since the driver loaded), joules.
    pub const ENERGY_COUNTER: &str = "strata_gpu_energy_counter_joules";
    /// Energy the agent measured on the GPU while the pod held it, joules.
    pub const POD_ENERGY: &str = "strata_pod_gpu_energy_joules_total";
    /// Power now, watts.
    pub const POWER: &str = "strata_gpu_power_watts";
    /// Utilization, 0 to 1.
    pub const UTILIZATION: &str = "strata_gpu_utilization_ratio";
    /// The enforced power limit, watts.
    pub const POWER_LIMIT: &str = "strata_gpu_power_limit_watts";
}

/// Reads a node agent's exposition: for each GPU a pod holds, its counter,
/// the energy measured while the pod held it, power and utilization. Lines
/// without a pod, a UUID or a finite value are skipped.
pub fn parse_node_agent(text: &str) -> ByPod {
    let mut out = ByPod::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let Some((name, labels, value)) = crate::collect::labels_and_value(line) else {
            continue;
        };
        if !value.is_finite()
            || ![
                agent::ENERGY_COUNTER,
                agent::POD_ENERGY,
                agent::POWER,
                agent::UTILIZATION,
            ]
            .contains(&name)
        {
            continue;
        }
        let (Some(namespace), Some(pod), Some(uuid)) = (
            label(labels, "namespace").filter(|s| !s.is_empty()),
            label(labels, "pod").filter(|s| !s.is_empty()),
            label(labels, "UUID").filter(|s| !s.is_empty()),
        ) else {
            continue;
        };
        let slot = out
            .entry(PodKey { namespace, pod })
            .or_default()
            .entry(uuid)
            .or_default();
        match name {
            agent::ENERGY_COUNTER => slot.counter = Some(value),
            agent::POD_ENERGY => slot.since_start = Some(value),
            agent::POWER => slot.power = Some(value),
            _ => slot.utilization = Some(value),
        }
    }
    out
}

/// Every GPU's enforced power limit on a node agent's page, held or not
/// (by `Hostname` and `UUID`); lines without both or a finite value are
/// skipped.
pub fn parse_power_limits(text: &str) -> Vec<crate::powercap::GpuLimit> {
    text.lines()
        .filter(|l| l.starts_with(agent::POWER_LIMIT))
        .filter_map(|line| {
            let (name, labels, value) = crate::collect::labels_and_value(line)?;
            if name != agent::POWER_LIMIT || !value.is_finite() {
                return None;
            }
            Some(crate::powercap::GpuLimit {
                node: label(labels, "Hostname").filter(|s| !s.is_empty())?,
                uuid: label(labels, "UUID").filter(|s| !s.is_empty())?,
                watts: value,
            })
        })
        .collect()
}

/// dcgm-exporter's fields the accountant reads, with what each becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DcgmField {
    /// `DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION`: millijoules since the driver
    /// loaded (a counter).
    Energy,
    /// `DCGM_FI_DEV_POWER_USAGE`: watts.
    Power,
    /// `DCGM_FI_DEV_GPU_UTIL`: percent.
    Utilization,
}

impl DcgmField {
    /// The metric's name.
    pub fn metric(self) -> &'static str {
        match self {
            Self::Energy => "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
            Self::Power => "DCGM_FI_DEV_POWER_USAGE",
            Self::Utilization => "DCGM_FI_DEV_GPU_UTIL",
        }
    }

    fn put(self, slot: &mut GpuReading, value: f64) {
        match self {
            Self::Energy => slot.counter = Some(value / 1000.0),
            Self::Power => slot.power = Some(value),
            Self::Utilization => slot.utilization = Some((value / 100.0).clamp(0.0, 1.0)),
        }
    }
}

/// The instant queries of one round: each field for every GPU a pod holds
/// (dcgm-exporter labels attributed series with `pod`; behind a Prometheus
/// scrape without `honor_labels` they become `exported_pod`), optionally
/// limited to `namespaces`.
pub fn dcgm_queries(namespaces: &[String]) -> Vec<(DcgmField, String)> {
    let ns = if namespaces.is_empty() {
        String::new()
    } else {
        let alternatives = namespaces
            .iter()
            .map(|n| promql::regex_escape(n))
            .collect::<Vec<_>>()
            .join("|");
        format!(",namespace=~{}", promql::string_literal(&alternatives))
    };
    let exported_ns = ns.replace(",namespace=~", ",exported_namespace=~");
    [DcgmField::Energy, DcgmField::Power, DcgmField::Utilization]
        .into_iter()
        .map(|f| {
            let m = f.metric();
            (
                f,
                format!("{m}{{pod!=\"\"{ns}}} or {m}{{exported_pod!=\"\"{exported_ns}}}"),
            )
        })
        .collect()
}

/// Reads one `/api/v1/query` vector answer for `field` into `into`: each
/// series' pod (`exported_pod`/`exported_namespace` first, then
/// `pod`/`namespace`) and GPU (`UUID`). Series without them are skipped.
pub fn parse_dcgm(body: &[u8], field: DcgmField, into: &mut ByPod) -> Result<(), promql::Error> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| promql::Error::Malformed(e.to_string()))?;
    let status = v.get("status").and_then(|s| s.as_str());
    if status == Some("error") {
        let field = |name: &str| v.get(name).and_then(|s| s.as_str()).unwrap_or("");
        return Err(promql::Error::Api {
            error_type: field("errorType").to_string(),
            message: field("error").to_string(),
        });
    }
    if status != Some("success") {
        return Err(promql::Error::Malformed(format!("status {status:?}")));
    }
    let data = v
        .get("data")
        .ok_or_else(|| promql::Error::Malformed("no data".into()))?;
    match data.get("resultType").and_then(|t| t.as_str()) {
        Some("vector") => {}
        other => return Err(promql::Error::ResultType(format!("{other:?}"))),
    }
    let series = data
        .get("result")
        .and_then(|r| r.as_array())
        .ok_or_else(|| promql::Error::Malformed("data.result is not a list".into()))?;
    for s in series {
        let metric = s.get("metric");
        let get = |k: &str| {
            metric
                .and_then(|m| m.get(k))
                .and_then(|v| v.as_str())
                .filter(|v| !v.is_empty())
                .map(str::to_string)
        };
        let (Some(namespace), Some(pod), Some(uuid)) = (
            get("exported_namespace").or_else(|| get("namespace")),
            get("exported_pod").or_else(|| get("pod")),
            get("UUID"),
        ) else {
            continue;
        };
        let Some(value) = s
            .get("value")
            .and_then(|v| v.as_array())
            .and_then(|p| p.get(1))
            .and_then(|t| t.as_str())
            .and_then(|t| t.parse::<f64>().ok())
            .filter(|v| v.is_finite())
        else {
            continue;
        };
        let slot = into
            .entry(PodKey { namespace, pod })
            .or_default()
            .entry(uuid)
            .or_default();
        field.put(slot, value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ns: &str, pod: &str) -> PodKey {
        PodKey {
            namespace: ns.into(),
            pod: pod.into(),
        }
    }

    #[test]
    fn a_node_agents_page_becomes_readings_by_pod() {
        let text = r#"# HELP strata_gpu_energy_counter_joules x
# TYPE strata_gpu_energy_counter_joules gauge
strata_gpu_energy_counter_joules{gpu="0",UUID="GPU-a",modelName="NVIDIA H100 80GB HBM3",Hostname="n1",namespace="team",pod="chat-0",container="engine"} 1234.5
strata_gpu_energy_counter_joules{gpu="1",UUID="GPU-b",modelName="NVIDIA H100 80GB HBM3",Hostname="n1",namespace="team",pod="chat-0",container="engine"} 99
strata_gpu_energy_counter_joules{gpu="2",UUID="GPU-c",modelName="NVIDIA H100 80GB HBM3",Hostname="n1",namespace="",pod="",container=""} 7
strata_pod_gpu_energy_joules_total{UUID="GPU-a",namespace="team",pod="chat-0",container="engine"} 12
strata_gpu_power_watts{gpu="0",UUID="GPU-a",namespace="team",pod="chat-0",container="engine"} 350
strata_gpu_utilization_ratio{gpu="0",UUID="GPU-a",namespace="team",pod="chat-0",container="engine"} 0.5
strata_gpu_power_watts{gpu="0",UUID="GPU-a",namespace="team",pod="chat-0",container="engine"} NaN
strata_gpu_temperature_celsius{gpu="0",UUID="GPU-a",namespace="team",pod="chat-0",container="engine"} 60
"#;
        let by_pod = parse_node_agent(text);
        assert_eq!(by_pod.len(), 1, "the unheld GPU is nobody's: {by_pod:?}");
        let gpus = &by_pod[&key("team", "chat-0")];
        assert_eq!(gpus.len(), 2);
        assert_eq!(
            gpus["GPU-a"],
            GpuReading {
                counter: Some(1234.5),
                since_start: Some(12.0),
                power: Some(350.0),
                utilization: Some(0.5),
            }
        );
        assert_eq!(gpus["GPU-b"].counter, Some(99.0));
        assert_eq!(gpus["GPU-b"].since_start, None);
    }

    #[test]
    fn dcgm_queries_cover_both_label_styles_and_escape_namespaces() {
        let q = dcgm_queries(&[]);
        assert_eq!(q.len(), 3);
        assert_eq!(
            q[0].1,
            "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{pod!=\"\"} or DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{exported_pod!=\"\"}"
        );
        let q = dcgm_queries(&["a.b".into(), "c".into()]);
        assert!(
            q[1].1.contains("namespace=~\"a\\\\.b|c\"")
                && q[1].1.contains("exported_namespace=~\"a\\\\.b|c\""),
            "{}",
            q[1].1
        );
    }

    #[test]
    fn dcgm_answers_become_readings_in_base_units() {
        let energy = br#"{"status":"success","data":{"resultType":"vector","result":[
          {"metric":{"__name__":"DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION","gpu":"0","UUID":"GPU-a","modelName":"NVIDIA H100 80GB HBM3","Hostname":"n1","namespace":"team","pod":"chat-0","container":"engine"},"value":[1.7e9,"123456789"]},
          {"metric":{"__name__":"DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION","gpu":"1","UUID":"GPU-b","namespace":"gpu-operator","pod":"nvidia-dcgm-exporter-x","exported_namespace":"team","exported_pod":"chat-1","exported_container":"engine"},"value":[1.7e9,"5000"]},
          {"metric":{"__name__":"DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION","gpu":"2","UUID":"GPU-c"},"value":[1.7e9,"1"]}
        ]}}"#;
        let util = br#"{"status":"success","data":{"resultType":"vector","result":[
          {"metric":{"UUID":"GPU-a","namespace":"team","pod":"chat-0"},"value":[1.7e9,"85"]}
        ]}}"#;
        let power = br#"{"status":"success","data":{"resultType":"vector","result":[
          {"metric":{"UUID":"GPU-a","namespace":"team","pod":"chat-0"},"value":[1.7e9,"412.5"]},
          {"metric":{"UUID":"GPU-a","namespace":"team","pod":"chat-0"},"value":[1.7e9,"NaN"]}
        ]}}"#;
        let mut by_pod = ByPod::new();
        parse_dcgm(energy, DcgmField::Energy, &mut by_pod).expect("energy");
        parse_dcgm(util, DcgmField::Utilization, &mut by_pod).expect("util");
        parse_dcgm(power, DcgmField::Power, &mut by_pod).expect("power");
        let a = by_pod[&key("team", "chat-0")]["GPU-a"];
        assert_eq!(a.counter, Some(123_456.789));
        assert_eq!(a.utilization, Some(0.85));
        assert_eq!(a.power, Some(412.5));
        assert_eq!(a.since_start, None);
        // Behind a scrape without honor_labels: the exported_ labels name the pod.
        assert_eq!(by_pod[&key("team", "chat-1")]["GPU-b"].counter, Some(5.0));
        assert_eq!(by_pod.len(), 2);
        let err = parse_dcgm(
            br#"{"status":"error","errorType":"bad_data","error":"parse error"}"#,
            DcgmField::Power,
            &mut by_pod,
        )
        .expect_err("an error answer");
        assert!(err.to_string().contains("parse error"), "{err}");
        assert!(parse_dcgm(b"not json", DcgmField::Power, &mut by_pod).is_err());
    }
}
