//! The fake NVIDIA Management Library: a small C shared library
//! (`e2e/fake-nvml/fake_nvml.c`, built by `build.rs`) named
//! `libnvidia-ml.so.1` that the real `nvml-wrapper` crate loads with
//! `Nvml::builder().lib_path(LIB).init()`. Test and demo only; never shipped.
//!
//! It simulates NVIDIA GPUs whose load comes from a file written by the
//! engine simulator ([`crate::sim`]). It is configured by environment
//! variables of the process that loads it, read at `nvmlInit_v2` (when the
//! init refcount goes from 0 to 1):
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `STRATA_FAKE_NVML_DEVICES` | comma-separated GPU UUIDs, at most 16 (set but empty: no GPU) | one GPU, `GPU-00000000-0000-0000-0000-000000000000` |
//! | `STRATA_FAKE_NVML_NAME` | product name | `NVIDIA H100 80GB HBM3` |
//! | `STRATA_FAKE_NVML_LOAD_FILE` | file holding one number, the utilization in \[0,1\], re-read on every query (missing or garbage: 0) | none: utilization 0 |
//! | `STRATA_FAKE_NVML_IDLE_WATTS` | power at utilization 0, in W | 70 |
//! | `STRATA_FAKE_NVML_TDP_WATTS` | power at utilization 1 and enforced power limit, in W | 700 |
//! | `STRATA_FAKE_NVML_MEMORY_TOTAL_MIB` | memory total, in MiB | 81559 |
//! | `STRATA_FAKE_NVML_STATE_FILE` | where the energy counters persist across processes | none: counters start at 0 at init |
//! | `STRATA_FAKE_NVML_RESET_ENERGY` | `1`: counters start at 0 even with a state file (a driver reload) | off |
//! | `STRATA_FAKE_NVML_FAIL_INIT` | `1`: init fails with `DriverNotLoaded` | off |
//!
//! An unparsable configuration makes init fail with `Unknown` (and a line on
//! stderr). With `util` the utilization from the load file:
//!
//! - power = `idle + (tdp - idle) * util` (reported in mW);
//! - memory used = `total * (0.1 + 0.8 * util)` (weights + KV cache), in bytes;
//! - temperature = `30 + 50 * util` °C;
//! - utilization rates: gpu `round(100 * util)` %, memory `round(60 * util)` %;
//! - energy (mJ since "driver load") integrates power over wall-clock time
//!   as a left Riemann sum: every device query first adds
//!   `power(util of the previous query) * (now - previous query time)`.
//!   With a state file, the counters and their last sample are persisted
//!   after every query (temporary file + rename), so a restarted process
//!   continues the same counter, as with a real driver.
//!
//! The driver version is `550.54.15`.

use std::path::{Path, PathBuf};

/// The absolute path of the built fake `libnvidia-ml.so.1`.
pub const LIB: &str = env!("STRATA_FAKE_NVML_LIB");

/// Comma-separated GPU UUIDs.
pub const ENV_DEVICES: &str = "STRATA_FAKE_NVML_DEVICES";
/// Product name.
pub const ENV_NAME: &str = "STRATA_FAKE_NVML_NAME";
/// Path of the utilization file.
pub const ENV_LOAD_FILE: &str = "STRATA_FAKE_NVML_LOAD_FILE";
/// Idle power, in W.
pub const ENV_IDLE_WATTS: &str = "STRATA_FAKE_NVML_IDLE_WATTS";
/// Full-load power and power limit, in W.
pub const ENV_TDP_WATTS: &str = "STRATA_FAKE_NVML_TDP_WATTS";
/// Memory total, in MiB.
pub const ENV_MEMORY_TOTAL_MIB: &str = "STRATA_FAKE_NVML_MEMORY_TOTAL_MIB";
/// Path of the energy state file.
pub const ENV_STATE_FILE: &str = "STRATA_FAKE_NVML_STATE_FILE";
/// `1` to reset the energy counters at init.
pub const ENV_RESET_ENERGY: &str = "STRATA_FAKE_NVML_RESET_ENERGY";
/// `1` to make init fail with `DriverNotLoaded`.
pub const ENV_FAIL_INIT: &str = "STRATA_FAKE_NVML_FAIL_INIT";

/// The path of the built fake `libnvidia-ml.so.1`.
pub fn lib_path() -> &'static Path {
    Path::new(LIB)
}

/// The configuration of the fake GPUs of one process, as environment
/// variables ([`FakeGpuConfig::env`]). Unset fields keep the library's
/// defaults.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FakeGpuConfig {
    /// GPU UUIDs; `None`: the library's single default GPU.
    pub devices: Option<Vec<String>>,
    /// Product name.
    pub name: Option<String>,
    /// Utilization file.
    pub load_file: Option<PathBuf>,
    /// Idle power, in W.
    pub idle_watts: Option<f64>,
    /// Full-load power, in W.
    pub tdp_watts: Option<f64>,
    /// Memory total, in MiB.
    pub memory_total_mib: Option<u64>,
    /// Energy state file.
    pub state_file: Option<PathBuf>,
    /// Reset the energy counters at init.
    pub reset_energy: bool,
    /// Make init fail with `DriverNotLoaded`.
    pub fail_init: bool,
}

impl FakeGpuConfig {
    /// The library's defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the GPU UUIDs (an empty list means no GPU).
    pub fn devices<I, S>(mut self, uuids: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.devices = Some(uuids.into_iter().map(Into::into).collect());
        self
    }

    /// Sets the product name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Sets the utilization file.
    pub fn load_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.load_file = Some(path.into());
        self
    }

    /// Sets the idle power, in W.
    pub fn idle_watts(mut self, watts: f64) -> Self {
        self.idle_watts = Some(watts);
        self
    }

    /// Sets the full-load power, in W.
    pub fn tdp_watts(mut self, watts: f64) -> Self {
        self.tdp_watts = Some(watts);
        self
    }

    /// Sets the memory total, in MiB.
    pub fn memory_total_mib(mut self, mib: u64) -> Self {
        self.memory_total_mib = Some(mib);
        self
    }

    /// Sets the energy state file.
    pub fn state_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.state_file = Some(path.into());
        self
    }

    /// Resets the energy counters at init.
    pub fn reset_energy(mut self, reset: bool) -> Self {
        self.reset_energy = reset;
        self
    }

    /// Makes init fail with `DriverNotLoaded`.
    pub fn fail_init(mut self, fail: bool) -> Self {
        self.fail_init = fail;
        self
    }

    /// The environment variables that configure the library this way, to
    /// set on the process that loads it.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = Vec::new();
        let mut put = |k: &str, v: String| env.push((k.to_owned(), v));
        if let Some(devices) = &self.devices {
            put(ENV_DEVICES, devices.join(","));
        }
        if let Some(name) = &self.name {
            put(ENV_NAME, name.clone());
        }
        if let Some(path) = &self.load_file {
            put(ENV_LOAD_FILE, path.display().to_string());
        }
        if let Some(w) = self.idle_watts {
            put(ENV_IDLE_WATTS, w.to_string());
        }
        if let Some(w) = self.tdp_watts {
            put(ENV_TDP_WATTS, w.to_string());
        }
        if let Some(mib) = self.memory_total_mib {
            put(ENV_MEMORY_TOTAL_MIB, mib.to_string());
        }
        if let Some(path) = &self.state_file {
            put(ENV_STATE_FILE, path.display().to_string());
        }
        if self.reset_energy {
            put(ENV_RESET_ENERGY, "1".to_owned());
        }
        if self.fail_init {
            put(ENV_FAIL_INIT, "1".to_owned());
        }
        env
    }
}

/// Writes `util` to a load file atomically (`<path>.tmp`, then rename), in
/// the format the engine simulator uses.
pub fn write_load(path: &Path, util: f64) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, format!("{util:.4}\n"))?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_lists_only_what_is_set() {
        assert!(FakeGpuConfig::new().env().is_empty());
        let env = FakeGpuConfig::new()
            .devices(["GPU-a", "GPU-b"])
            .name("NVIDIA A100")
            .load_file("/tmp/load")
            .idle_watts(50.0)
            .tdp_watts(400.5)
            .memory_total_mib(40960)
            .state_file("/tmp/state")
            .reset_energy(true)
            .fail_init(true)
            .env();
        let expected: Vec<(String, String)> = [
            (ENV_DEVICES, "GPU-a,GPU-b"),
            (ENV_NAME, "NVIDIA A100"),
            (ENV_LOAD_FILE, "/tmp/load"),
            (ENV_IDLE_WATTS, "50"),
            (ENV_TDP_WATTS, "400.5"),
            (ENV_MEMORY_TOTAL_MIB, "40960"),
            (ENV_STATE_FILE, "/tmp/state"),
            (ENV_RESET_ENERGY, "1"),
            (ENV_FAIL_INIT, "1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(env, expected);
    }

    #[test]
    fn lib_is_built() {
        assert!(lib_path().is_absolute());
        assert!(lib_path().is_file(), "{LIB} is missing");
    }
}
