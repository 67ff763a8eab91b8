//! NVML, read on a thread of its own: NVML calls block (and on a sick GPU
//! can block for long), so they never run on the async threads. The async
//! side asks for a sample and waits at most a timeout; while a sample is
//! still in progress a new request is refused rather than queued, so a
//! stuck driver costs one thread, not one per interval.
//!
//! The library is (re)initialised lazily: a node whose driver is missing
//! or not loaded yet is retried at every request, and a failure to list
//! the devices drops the handle so that the next request starts afresh.

use std::ffi::OsStr;
use std::time::Duration;

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::error::NvmlError;
use strata_core::powercap::{self, Desired};
use tokio::sync::{mpsc, oneshot};

use crate::error::Error;
use crate::ledger::DeviceReading;

/// One sample of every GPU NVML shows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NvmlSample {
    /// The driver's version.
    pub driver_version: Option<String>,
    /// Every GPU, in NVML's index order.
    pub devices: Vec<DeviceReading>,
    /// Fields that failed (other than "not supported"), as messages.
    pub field_errors: Vec<String>,
    /// Power limits changed at this sample.
    pub limit_changes: Vec<LimitChange>,
    /// Power limits that could not be read or set, by GPU UUID.
    pub limit_errors: Vec<(String, String)>,
}

/// A GPU's power limit, changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitChange {
    /// The GPU.
    pub uuid: String,
    /// The limit before, mW.
    pub from_mw: u32,
    /// The limit now, mW.
    pub to_mw: u32,
}

type Reply = (Desired, oneshot::Sender<Result<NvmlSample, Error>>);

/// The NVML thread's handle; the thread ends when this is dropped.
#[derive(Debug)]
pub struct NvmlSource {
    requests: mpsc::Sender<Reply>,
}

impl NvmlSource {
    /// Starts the thread for the library at `lib` (a path, or a name the
    /// dynamic loader finds, such as `libnvidia-ml.so.1`).
    pub fn start(lib: String) -> Result<Self, Error> {
        // One request in progress and none waiting.
        let (requests, mut rx) = mpsc::channel::<Reply>(1);
        std::thread::Builder::new()
            .name("nvml".into())
            .spawn(move || {
                let mut nvml: Option<Nvml> = None;
                while let Some((desired, reply)) = rx.blocking_recv() {
                    let _ = reply.send(sample(&lib, &mut nvml, desired));
                }
            })
            .map_err(Error::Thread)?;
        Ok(Self { requests })
    }

    /// One sample of every GPU, within `timeout`, after bringing their
    /// power limits to `desired`.
    pub async fn sample(&self, timeout: Duration, desired: Desired) -> Result<NvmlSample, Error> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .try_send((desired, reply))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => Error::NvmlBusy,
                mpsc::error::TrySendError::Closed(_) => Error::NvmlThreadGone,
            })?;
        match tokio::time::timeout(timeout, answer).await {
            Err(_) => Err(Error::NvmlTimeout(timeout)),
            Ok(Err(_)) => Err(Error::NvmlThreadGone),
            Ok(Ok(result)) => result,
        }
    }
}

/// Initialises the library if needed, brings the power limits to
/// `desired`, then reads every device; drops the handle when the devices
/// cannot be listed.
fn sample(lib: &str, nvml: &mut Option<Nvml>, desired: Desired) -> Result<NvmlSample, Error> {
    let handle = match nvml.take() {
        Some(n) => n,
        None => Nvml::builder()
            .lib_path(OsStr::new(lib))
            .init()
            .map_err(|source| Error::NvmlInit {
                lib: lib.to_owned(),
                source,
            })?,
    };
    let changes = apply_limits(&handle, desired);
    let mut result = read_devices(&handle);
    if let Ok(sample) = &mut result {
        (sample.limit_changes, sample.limit_errors) = changes;
    }
    if result.is_ok() {
        *nvml = Some(handle);
    }
    result
}

/// A field's value; `None` when not supported (silently) or failed (noted).
fn field<T>(
    result: Result<T, NvmlError>,
    what: &str,
    gpu: u32,
    errors: &mut Vec<String>,
) -> Option<T> {
    match result {
        Ok(v) => Some(v),
        Err(NvmlError::NotSupported) => None,
        Err(e) => {
            errors.push(format!("GPU {gpu}: {what}: {e}"));
            None
        }
    }
}

/// Reads every device NVML shows.
pub fn read_devices(nvml: &Nvml) -> Result<NvmlSample, Error> {
    let count = nvml.device_count().map_err(|source| Error::Nvml {
        what: "device count",
        source,
    })?;
    let mut out = NvmlSample {
        driver_version: nvml.sys_driver_version().ok(),
        ..NvmlSample::default()
    };
    for index in 0..count {
        let errors = &mut out.field_errors;
        let Some(dev) = field(nvml.device_by_index(index), "handle", index, errors) else {
            continue;
        };
        // A GPU without its UUID cannot be told apart from the others.
        let Some(uuid) = field(dev.uuid(), "UUID", index, errors) else {
            continue;
        };
        let name = field(dev.name(), "name", index, errors).unwrap_or_default();
        let utilization = field(dev.utilization_rates(), "utilization", index, errors)
            .map(|u| f64::from(u.gpu.min(100)) / 100.0);
        let memory = field(dev.memory_info(), "memory", index, errors);
        let power_watts =
            field(dev.power_usage(), "power", index, errors).map(|mw| f64::from(mw) / 1000.0);
        let temperature_celsius = field(
            dev.temperature(TemperatureSensor::Gpu),
            "temperature",
            index,
            errors,
        )
        .map(f64::from);
        let power_limit_watts = field(dev.enforced_power_limit(), "power limit", index, errors)
            .map(|mw| f64::from(mw) / 1000.0);
        // The energy counter last: the sample's other fields were read
        // before the energy they go with.
        let energy_mj = field(dev.total_energy_consumption(), "energy", index, errors);
        out.devices.push(DeviceReading {
            index,
            uuid,
            name,
            utilization,
            memory_used_bytes: memory.as_ref().map(|m| m.used),
            memory_total_bytes: memory.as_ref().map(|m| m.total),
            power_watts,
            temperature_celsius,
            energy_mj,
            power_limit_watts,
        });
    }
    Ok(out)
}

/// Brings every GPU's power management limit to what `desired` asks
/// (nothing for [`Desired::Unmanaged`]), within the GPU's constraints;
/// a GPU already there is not written. Returns the changes and, by UUID,
/// what failed (setting needs root on the node; the caller reports it).
pub fn apply_limits(nvml: &Nvml, desired: Desired) -> (Vec<LimitChange>, Vec<(String, String)>) {
    let mut changes = Vec::new();
    let mut errors = Vec::new();
    if desired == Desired::Unmanaged {
        return (changes, errors);
    }
    let Ok(count) = nvml.device_count() else {
        return (changes, errors);
    };
    for index in 0..count {
        let Ok(mut dev) = nvml.device_by_index(index) else {
            continue;
        };
        let Ok(uuid) = dev.uuid() else { continue };
        let step = (|| -> Result<Option<LimitChange>, NvmlError> {
            let default = dev.power_management_limit_default()?;
            let c = dev.power_management_limit_constraints()?;
            let current = dev.power_management_limit()?;
            let Some(target) = powercap::target_mw(desired, default, c.min_limit, c.max_limit)
            else {
                return Ok(None);
            };
            if current == target {
                return Ok(None);
            }
            dev.set_power_management_limit(target)?;
            Ok(Some(LimitChange {
                uuid: uuid.clone(),
                from_mw: current,
                to_mw: target,
            }))
        })();
        match step {
            Ok(Some(change)) => changes.push(change),
            Ok(None) => {}
            Err(NvmlError::NoPermission) => errors.push((
                uuid,
                "NVML refused to set the power limit (no permission: the agent must run as root \
                 on the node)"
                    .to_owned(),
            )),
            Err(e) => errors.push((uuid, format!("power limit: {e}"))),
        }
    }
    (changes, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_missing_library_is_an_init_error_and_is_retried() {
        let source = NvmlSource::start("/nonexistent/libnvidia-ml.so.1".into()).expect("thread");
        for _ in 0..2 {
            let err = source
                .sample(Duration::from_secs(10), Desired::Unmanaged)
                .await
                .expect_err("no library");
            assert!(matches!(err, Error::NvmlInit { .. }), "{err}");
            assert!(err.to_string().contains("/nonexistent"), "{err}");
        }
    }
}
