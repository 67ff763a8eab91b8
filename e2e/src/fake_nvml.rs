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
//! | `STRATA_FAKE_NVML_GPU_DIR` | the node's GPU state, one directory per device (per-device mode, below); wins over the load and state files | none |
//! | `NVIDIA_VISIBLE_DEVICES` | which of the node's devices the process sees, as the NVIDIA container toolkit arranges it (below) | unset: all of them |
//!
//! **Visibility.** `STRATA_FAKE_NVML_DEVICES` is the node's list of GPUs;
//! `NVIDIA_VISIBLE_DEVICES` narrows it the way the container toolkit does:
//! unset (a process on the host) or `all`: every device; `none`, `void` or
//! empty: no device (the count is 0); otherwise a comma list of UUIDs or
//! indices into the node's list: only those, renumbered `0..n` in the listed
//! order. A UUID or index the node does not have makes init fail with
//! `Unknown` (and a line on stderr), as a misconfigured driver would.
//!
//! **Per-device mode** (`STRATA_FAKE_NVML_GPU_DIR=<dir>`): each device's
//! state lives in `<dir>/<uuid>/`, shared by every process of the node, so
//! that the energy counter is the device's, not the process's, as with real
//! hardware:
//!
//! - `load`: the device's utilization in \[0,1\], written by whoever computes
//!   on it (the engine simulator's `--gpu-dir`, [`write_device_load`]);
//!   missing or garbage: 0;
//! - `energy`: one line `<energy_mj> <last_ns> <last_util>`, the counter and
//!   its last sample ([`read_device_energy`]); missing: the counter starts
//!   from 0;
//! - `lock`: every sample locks it (`flock`, exclusive), reads `energy`,
//!   integrates, and rewrites it (temporary file + rename), so that several
//!   processes (a node agent, its restart, a sidecar that opts in) see one
//!   monotonic counter.
//!
//! `STRATA_FAKE_NVML_RESET_ENERGY=1` in this mode resets each visible
//! device's counter to 0 at init (a driver reload).
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
/// The node's GPU state directory (per-device mode).
pub const ENV_GPU_DIR: &str = "STRATA_FAKE_NVML_GPU_DIR";
/// The devices a container sees (set by the NVIDIA device plugin, honoured
/// by the container toolkit).
pub const ENV_VISIBLE_DEVICES: &str = "NVIDIA_VISIBLE_DEVICES";

/// Every variable the library reads, to clear from a child's environment
/// before configuring it.
pub const ALL_ENV: [&str; 11] = [
    ENV_DEVICES,
    ENV_NAME,
    ENV_LOAD_FILE,
    ENV_IDLE_WATTS,
    ENV_TDP_WATTS,
    ENV_MEMORY_TOTAL_MIB,
    ENV_STATE_FILE,
    ENV_RESET_ENERGY,
    ENV_FAIL_INIT,
    ENV_GPU_DIR,
    ENV_VISIBLE_DEVICES,
];

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
    /// The node's GPU state directory (per-device mode).
    pub gpu_dir: Option<PathBuf>,
    /// `NVIDIA_VISIBLE_DEVICES`; `None`: unset (the host's view).
    pub visible_devices: Option<String>,
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

    /// Per-device mode: each device's load and energy counter in
    /// `<dir>/<uuid>/`, shared by every process that uses this directory.
    pub fn gpu_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.gpu_dir = Some(dir.into());
        self
    }

    /// Sets `NVIDIA_VISIBLE_DEVICES` as the device plugin would: `all`,
    /// `none`, `void`, empty, or a comma list of UUIDs or indices.
    pub fn visible_devices(mut self, spec: impl Into<String>) -> Self {
        self.visible_devices = Some(spec.into());
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
        if let Some(dir) = &self.gpu_dir {
            put(ENV_GPU_DIR, dir.display().to_string());
        }
        if let Some(spec) = &self.visible_devices {
            put(ENV_VISIBLE_DEVICES, spec.clone());
        }
        env
    }
}

/// One device's energy counter in per-device mode (`<dir>/<uuid>/energy`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceEnergy {
    /// The counter, in millijoules (NVML reports it truncated to an integer).
    pub energy_mj: f64,
    /// When it was last sampled (CLOCK_REALTIME, nanoseconds).
    pub last_ns: i64,
    /// The utilization seen at that sample.
    pub last_util: f64,
}

/// The library's clock (CLOCK_REALTIME), in nanoseconds.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

impl DeviceEnergy {
    /// The counter at `now_ns` (CLOCK_REALTIME), in joules, as the library
    /// integrates it: the saved counter plus the power of the saved load
    /// (`idle_w` to `tdp_w`) since the saved sample.
    pub fn joules_at(&self, now_ns: i64, idle_w: f64, tdp_w: f64) -> f64 {
        let watts = idle_w + (tdp_w - idle_w) * self.last_util.clamp(0.0, 1.0);
        self.energy_mj / 1000.0 + watts * (now_ns - self.last_ns).max(0) as f64 / 1e9
    }
}

/// Writes a device's utilization in per-device mode
/// (`<dir>/<uuid>/load`, creating the directory), atomically.
pub fn write_device_load(dir: &Path, uuid: &str, util: f64) -> std::io::Result<()> {
    let device = dir.join(uuid);
    std::fs::create_dir_all(&device)?;
    write_load(&device.join("load"), util)
}

/// Reads a device's energy counter in per-device mode; `None` when no
/// process sampled it yet (or the file is not in the library's format).
/// The library replaces the file atomically, so a read sees one sample.
pub fn read_device_energy(dir: &Path, uuid: &str) -> Option<DeviceEnergy> {
    let text = std::fs::read_to_string(dir.join(uuid).join("energy")).ok()?;
    let mut fields = text.split_whitespace();
    let energy_mj = fields.next()?.parse().ok()?;
    let last_ns = fields.next()?.parse().ok()?;
    let last_util = fields.next()?.parse().ok()?;
    Some(DeviceEnergy {
        energy_mj,
        last_ns,
        last_util,
    })
}

/// A device's power limit in per-device mode (`<dir>/<uuid>/power_limit`),
/// in mW; `None` when none was set (the device runs at its default).
pub fn read_device_power_limit(dir: &Path, uuid: &str) -> Option<f64> {
    std::fs::read_to_string(dir.join(uuid).join("power_limit"))
        .ok()?
        .trim()
        .parse()
        .ok()
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
            .gpu_dir("/tmp/gpus")
            .visible_devices("GPU-b,0")
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
            (ENV_GPU_DIR, "/tmp/gpus"),
            (ENV_VISIBLE_DEVICES, "GPU-b,0"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(env, expected);
    }

    #[test]
    fn device_state_files_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(read_device_energy(dir.path(), "GPU-a"), None);
        write_device_load(dir.path(), "GPU-a", 0.25).expect("write load");
        let load = std::fs::read_to_string(dir.path().join("GPU-a/load")).expect("load");
        assert_eq!(load, "0.2500\n");
        std::fs::write(
            dir.path().join("GPU-a/energy"),
            "1234.500000 1700000000000000000 0.250000\n",
        )
        .expect("write energy");
        assert_eq!(
            read_device_energy(dir.path(), "GPU-a"),
            Some(DeviceEnergy {
                energy_mj: 1234.5,
                last_ns: 1_700_000_000_000_000_000,
                last_util: 0.25
            })
        );
    }

    #[test]
    fn lib_is_built() {
        assert!(lib_path().is_absolute());
        assert!(lib_path().is_file(), "{LIB} is missing");
    }
}
