//! The NVML sampler: off the request path, at an interval, for the pod's
//! GPUs; utilization, memory, power, temperature and the total-energy
//! counter (with resets handled). With no driver or no library it logs one
//! line, reports `strata_gpu_visible 0`, and the proxy keeps working.

use std::ffi::OsStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;

use crate::metrics::Metrics;

/// The reset-safe accumulator, shared with the node agent (strata-core).
pub use strata_core::energy_counter::{EnergyAccumulator, EnergyDelta};

/// Which devices a `NVIDIA_VISIBLE_DEVICES`-style value selects, from the
/// (index, UUID) pairs NVML lists. Unset, empty or `all`: every device;
/// `none` or `void`: none; otherwise a comma list of UUIDs (or UUID
/// prefixes) and indices.
pub fn select(devices: &[(u32, String)], spec: Option<&str>) -> Vec<u32> {
    let spec = spec.map(str::trim).unwrap_or("");
    match spec {
        "" | "all" => return devices.iter().map(|(i, _)| *i).collect(),
        "none" | "void" => return Vec::new(),
        _ => {}
    }
    let mut out = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let found = if let Ok(idx) = item.parse::<u32>() {
            devices.iter().find(|(i, _)| *i == idx)
        } else {
            devices
                .iter()
                .find(|(_, u)| u == item || (item.len() >= 8 && u.starts_with(item)))
        };
        if let Some((i, _)) = found
            && !out.contains(i)
        {
            out.push(*i);
        }
    }
    out
}

/// The running sampler.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts sampling on a thread of its own (NVML calls block). Returns None,
/// after one log line, when NVML cannot be initialised.
pub fn start(
    lib: Option<&str>,
    visible: Option<String>,
    interval: Duration,
    metrics: Metrics,
) -> Option<Sampler> {
    let mut builder = Nvml::builder();
    if let Some(path) = lib {
        builder.lib_path(OsStr::new(path));
    }
    let nvml = match builder.init() {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "NVML is not available; GPU metrics are disabled (strata_gpu_visible 0), the proxy works as usual");
            metrics.gpu_visible.set(0);
            return None;
        }
    };
    let count = nvml.device_count().unwrap_or(0);
    let devices: Vec<(u32, String)> = (0..count)
        .filter_map(|i| {
            nvml.device_by_index(i)
                .ok()
                .and_then(|d| d.uuid().ok())
                .map(|u| (i, u))
        })
        .collect();
    let chosen = select(&devices, visible.as_deref());
    metrics.gpu_visible.set(chosen.len() as i64);
    tracing::info!(
        gpus = chosen.len(),
        of = count,
        "sampling NVML every {interval:?}"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let thread = std::thread::Builder::new()
        .name("nvml-sampler".into())
        .spawn(move || {
            let mut energy = EnergyAccumulator::default();
            while !stop2.load(Ordering::Relaxed) {
                sample_once(&nvml, &devices, &chosen, &mut energy, &metrics);
                std::thread::sleep(interval);
            }
        })
        .ok()?;
    Some(Sampler {
        stop,
        thread: Some(thread),
    })
}

fn sample_once(
    nvml: &Nvml,
    devices: &[(u32, String)],
    chosen: &[u32],
    energy: &mut EnergyAccumulator,
    m: &Metrics,
) {
    for idx in chosen {
        let Ok(dev) = nvml.device_by_index(*idx) else {
            continue;
        };
        let uuid = devices
            .iter()
            .find(|(i, _)| i == idx)
            .map(|(_, u)| u.clone())
            .unwrap_or_default();
        let gpu = idx.to_string();
        let labels = [gpu.as_str(), uuid.as_str()];
        if let Ok(u) = dev.utilization_rates() {
            m.gpu_utilization
                .with_label_values(&labels)
                .set(f64::from(u.gpu) / 100.0);
        }
        if let Ok(mem) = dev.memory_info() {
            m.gpu_memory_used
                .with_label_values(&labels)
                .set(mem.used as f64);
            m.gpu_memory_total
                .with_label_values(&labels)
                .set(mem.total as f64);
        }
        if let Ok(mw) = dev.power_usage() {
            m.gpu_power
                .with_label_values(&labels)
                .set(f64::from(mw) / 1000.0);
        }
        if let Ok(t) = dev.temperature(TemperatureSensor::Gpu) {
            m.gpu_temperature
                .with_label_values(&labels)
                .set(f64::from(t));
        }
        if let Ok(mj) = dev.total_energy_consumption() {
            m.gpu_energy_counter
                .with_label_values(&labels)
                .set(mj as f64 / 1000.0);
            let d = energy.update(&uuid, mj);
            if d.reset {
                m.gpu_energy_resets.with_label_values(&labels).inc();
                tracing::warn!(gpu = %gpu, uuid = %uuid, "the NVML energy counter went backwards (driver reload); continuing from the new value");
            }
            if d.joules > 0.0 {
                m.gpu_energy.with_label_values(&labels).inc_by(d.joules);
                m.energy_total.inc_by(d.joules);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devs() -> Vec<(u32, String)> {
        vec![
            (0, "GPU-aaaaaaaa-1111".into()),
            (1, "GPU-bbbbbbbb-2222".into()),
            (2, "GPU-cccccccc-3333".into()),
        ]
    }

    #[test]
    fn selects_devices_like_the_nvidia_runtime() {
        assert_eq!(select(&devs(), None), [0, 1, 2]);
        assert_eq!(select(&devs(), Some("all")), [0, 1, 2]);
        assert_eq!(select(&devs(), Some("none")), Vec::<u32>::new());
        assert_eq!(select(&devs(), Some("2,0")), [2, 0]);
        assert_eq!(select(&devs(), Some("GPU-bbbbbbbb-2222")), [1]);
        assert_eq!(select(&devs(), Some("GPU-cccccccc")), [2], "UUID prefix");
        assert_eq!(
            select(&devs(), Some("7,GPU-zzzz")),
            Vec::<u32>::new(),
            "unknown devices are skipped"
        );
    }
}
