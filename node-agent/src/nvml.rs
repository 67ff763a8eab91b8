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
}

type Reply = oneshot::Sender<Result<NvmlSample, Error>>;

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
                while let Some(reply) = rx.blocking_recv() {
                    let _ = reply.send(sample(&lib, &mut nvml));
                }
            })
            .map_err(Error::Thread)?;
        Ok(Self { requests })
    }

    /// One sample of every GPU, within `timeout`.
    pub async fn sample(&self, timeout: Duration) -> Result<NvmlSample, Error> {
        let (reply, answer) = oneshot::channel();
        self.requests.try_send(reply).map_err(|e| match e {
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

/// Initialises the library if needed, then reads every device; drops the
/// handle when the devices cannot be listed.
fn sample(lib: &str, nvml: &mut Option<Nvml>) -> Result<NvmlSample, Error> {
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
    let result = read_devices(&handle);
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
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_missing_library_is_an_init_error_and_is_retried() {
        let source = NvmlSource::start("/nonexistent/libnvidia-ml.so.1".into()).expect("thread");
        for _ in 0..2 {
            let err = source
                .sample(Duration::from_secs(10))
                .await
                .expect_err("no library");
            assert!(matches!(err, Error::NvmlInit { .. }), "{err}");
            assert!(err.to_string().contains("/nonexistent"), "{err}");
        }
    }
}
