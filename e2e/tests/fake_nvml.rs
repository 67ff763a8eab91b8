//! The fake NVML library, loaded through the real `nvml-wrapper` crate.
//!
//! The library reads its configuration from the process environment at init,
//! and tests of one binary share a process, so every scenario runs in a child
//! process: this test binary re-invoked on the ignored test [`child`], with
//! the scenario and the library's configuration in its environment. The child
//! prints one JSON line of measurements; the parent asserts on them.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::error::NvmlError;
use serde_json::{Value, json};
use strata_e2e::fake_nvml::{self, FakeGpuConfig};

/// Selects the child's scenario; unset, [`child`] does nothing.
const SCENARIO: &str = "STRATA_FAKE_NVML_TEST_SCENARIO";
/// `probe`: the loads to write before each snapshot (`missing` deletes the
/// load file, any other non-number is written as is).
const LOADS: &str = "STRATA_FAKE_NVML_TEST_LOADS";
/// `energy_once`: how long to wait between the two energy readings, in ms.
const SLEEP_MS: &str = "STRATA_FAKE_NVML_TEST_SLEEP_MS";
/// The prefix of the child's result line.
const RESULT: &str = "FAKE_NVML_RESULT ";

const UUID_A: &str = "GPU-11111111-2222-3333-4444-555555555555";
const UUID_B: &str = "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";
const MIB: f64 = 1024.0 * 1024.0;

// ---------------------------------------------------------------------------
// The child side
// ---------------------------------------------------------------------------

/// Runs one scenario in a child process (see the module docs).
#[test]
#[ignore = "a helper run in child processes by the other tests"]
fn child() {
    let Ok(scenario) = std::env::var(SCENARIO) else {
        return;
    };
    let result = match scenario.as_str() {
        "probe" => probe(),
        "energy_rates" => energy_rates(),
        "energy_once" => energy_once(),
        "init_error" => init_error(),
        "device_readings" => device_readings(),
        "energy_loop" => energy_loop(),
        "power_limits" => power_limits(),
        "agent_limits" => agent_limits(),
        other => panic!("unknown scenario {other}"),
    };
    // On its own line: libtest prints "test child ... " before it.
    println!("\n{RESULT}{result}");
}

fn init() -> Nvml {
    Nvml::builder()
        .lib_path(OsStr::new(fake_nvml::LIB))
        .init()
        .expect("init the fake NVML")
}

fn load_file() -> std::path::PathBuf {
    std::env::var_os(fake_nvml::ENV_LOAD_FILE)
        .expect("the scenario needs a load file")
        .into()
}

/// Static information about every device, then, for each load in `LOADS`, a
/// snapshot of device 0's load-dependent readings.
fn probe() -> Value {
    let nvml = init();
    let count = nvml.device_count().expect("device count");
    let mut devices = Vec::new();
    for i in 0..count {
        let d = nvml.device_by_index(i).expect("device by index");
        let uuid = d.uuid().expect("uuid");
        let by_uuid = nvml.device_by_uuid(uuid.as_str()).expect("device by uuid");
        devices.push(json!({
            "uuid": uuid,
            "name": d.name().expect("name"),
            "index": d.index().expect("index"),
            "index_by_uuid": by_uuid.index().expect("index"),
            "power_limit_mw": d.enforced_power_limit().expect("power limit"),
        }));
    }
    let unknown = match nvml.device_by_uuid("GPU-ffffffff-ffff-ffff-ffff-ffffffffffff") {
        Ok(_) => "found".to_owned(),
        Err(e) => format!("{e:?}"),
    };
    let out_of_range = match nvml.device_by_index(count) {
        Ok(_) => "found".to_owned(),
        Err(e) => format!("{e:?}"),
    };

    let mut snapshots = Vec::new();
    if let Ok(loads) = std::env::var(LOADS) {
        let path = load_file();
        let d = nvml.device_by_index(0).expect("device 0");
        for load in loads.split(',') {
            match load {
                "missing" => {
                    let _ = std::fs::remove_file(&path);
                }
                l => match l.parse::<f64>() {
                    Ok(u) => fake_nvml::write_load(&path, u).expect("write load"),
                    Err(_) => std::fs::write(&path, l).expect("write garbage"),
                },
            }
            let util = d.utilization_rates().expect("utilization");
            let mem = d.memory_info().expect("memory v2");
            snapshots.push(json!({
                "load": load,
                "power_mw": d.power_usage().expect("power"),
                "gpu_pct": util.gpu,
                "mem_pct": util.memory,
                "mem_total": mem.total,
                "mem_used": mem.used,
                "mem_free": mem.free,
                "mem_reserved": mem.reserved,
                "temp_c": d.temperature(TemperatureSensor::Gpu).expect("temperature"),
            }));
        }
    }

    json!({
        "driver_version": nvml.sys_driver_version().expect("driver version"),
        "count": count,
        "devices": devices,
        "unknown_uuid": unknown,
        "out_of_range_index": out_of_range,
        "snapshots": snapshots,
    })
}

/// Every device's power limits and power; with `LOADS` set to a limit in
/// mW, first sets device 0's limit to it (and reports the outcome).
fn power_limits() -> Value {
    let nvml = init();
    let set = std::env::var(LOADS).ok().map(|mw| {
        let mw: u32 = mw.parse().expect("a limit in mW");
        let mut d = nvml.device_by_index(0).expect("device 0");
        match d.set_power_management_limit(mw) {
            Ok(()) => "ok".to_owned(),
            Err(e) => format!("{e:?}"),
        }
    });
    let devices: Vec<Value> = (0..nvml.device_count().expect("count"))
        .map(|i| {
            let d = nvml.device_by_index(i).expect("device");
            let c = d.power_management_limit_constraints().expect("constraints");
            json!({
                "uuid": d.uuid().expect("uuid"),
                "limit_mw": d.power_management_limit().expect("limit"),
                "default_mw": d.power_management_limit_default().expect("default"),
                "enforced_mw": d.enforced_power_limit().expect("enforced"),
                "min_mw": c.min_limit,
                "max_mw": c.max_limit,
                "power_mw": d.power_usage().expect("power"),
            })
        })
        .collect();
    json!({"set": set, "devices": devices})
}

/// The node agent's NVML step for each of `LOADS` (a comma list of
/// `unmanaged`, `default` or a cap in watts): the changes it made, the
/// errors, and every device's limit after it.
fn agent_limits() -> Value {
    use strata_core::powercap::Desired;
    let nvml = init();
    let steps = std::env::var(LOADS).unwrap_or_default();
    let results: Vec<Value> = steps
        .split(',')
        .map(|step| {
            let desired = match step {
                "unmanaged" => Desired::Unmanaged,
                "default" => Desired::Default,
                w => Desired::Cap(w.parse().expect("watts")),
            };
            let (changes, errors) = strata_node_agent::nvml::apply_limits(&nvml, desired);
            let limits: Vec<u32> = (0..nvml.device_count().expect("count"))
                .map(|i| {
                    nvml.device_by_index(i)
                        .expect("device")
                        .power_management_limit()
                        .expect("limit")
                })
                .collect();
            json!({
                "step": step,
                "changed": changes.len(),
                "errors": errors.iter().map(|(u, e)| format!("{u}: {e}")).collect::<Vec<_>>(),
                "limits_mw": limits,
            })
        })
        .collect();
    json!({"steps": results})
}

/// Reads the energy counter twice, `ms` apart; returns (delta mJ, dt s).
fn energy_delta(d: &nvml_wrapper::Device<'_>, ms: u64) -> (f64, f64) {
    let e1 = d.total_energy_consumption().expect("energy");
    let t1 = Instant::now();
    // Measuring the elapsed time of the integrator, not waiting for readiness.
    std::thread::sleep(Duration::from_millis(ms));
    let e2 = d.total_energy_consumption().expect("energy");
    let dt = t1.elapsed().as_secs_f64();
    assert!(e2 >= e1, "the energy counter went back: {e1} -> {e2}");
    ((e2 - e1) as f64, dt)
}

/// The energy rate at full load, then at idle; and monotonic readings from
/// concurrent threads.
fn energy_rates() -> Value {
    let path = load_file();
    let nvml = init();
    let d = nvml.device_by_index(0).expect("device 0");

    fake_nvml::write_load(&path, 1.0).expect("write load");
    d.power_usage().expect("sample at full load");
    let (full_mj, full_s) = energy_delta(&d, 300);

    fake_nvml::write_load(&path, 0.0).expect("write load");
    d.power_usage().expect("sample at idle");
    let (idle_mj, idle_s) = energy_delta(&d, 300);

    let monotonic = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    let d = nvml.device_by_index(0).expect("device 0");
                    let mut last = 0;
                    for _ in 0..200 {
                        let e = d.total_energy_consumption().expect("energy");
                        if e < last {
                            return false;
                        }
                        last = e;
                        d.power_usage().expect("power");
                    }
                    true
                })
            })
            .collect();
        handles
            .into_iter()
            .all(|h| h.join().expect("thread panicked"))
    });

    json!({
        "full_mj": full_mj, "full_s": full_s,
        "idle_mj": idle_mj, "idle_s": idle_s,
        "monotonic": monotonic,
    })
}

/// The first energy reading after init, and one `SLEEP_MS` later.
fn energy_once() -> Value {
    let ms: u64 = std::env::var(SLEEP_MS)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let nvml = init();
    let d = nvml.device_by_index(0).expect("device 0");
    let first = d.total_energy_consumption().expect("energy");
    // Letting the integrator run, not waiting for readiness.
    std::thread::sleep(Duration::from_millis(ms));
    let last = d.total_energy_consumption().expect("energy");
    json!({ "first": first, "last": last })
}

/// Every device's UUID, index and load-dependent readings.
fn device_readings() -> Value {
    let nvml = init();
    let count = nvml.device_count().expect("device count");
    let devices: Vec<Value> = (0..count)
        .map(|i| {
            let d = nvml.device_by_index(i).expect("device by index");
            json!({
                "uuid": d.uuid().expect("uuid"),
                "index": d.index().expect("index"),
                "power_mw": d.power_usage().expect("power"),
                "gpu_pct": d.utilization_rates().expect("utilization").gpu,
                "temp_c": d.temperature(TemperatureSensor::Gpu).expect("temperature"),
            })
        })
        .collect();
    json!({ "count": count, "devices": devices })
}

/// Reads every device's energy counter in a loop for `SLEEP_MS`; reports
/// each device's first and last reading and whether each went only up.
fn energy_loop() -> Value {
    let ms: u64 = std::env::var(SLEEP_MS)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let nvml = init();
    let count = nvml.device_count().expect("device count");
    let devices: Vec<_> = (0..count)
        .map(|i| nvml.device_by_index(i).expect("device"))
        .collect();
    let read = || -> Vec<u64> {
        devices
            .iter()
            .map(|d| d.total_energy_consumption().expect("energy"))
            .collect()
    };
    let first = read();
    let mut last = first.clone();
    let mut monotonic = true;
    let started = Instant::now();
    loop {
        let now = read();
        monotonic &= now.iter().zip(&last).all(|(n, l)| n >= l);
        last = now;
        if started.elapsed() >= Duration::from_millis(ms) {
            break;
        }
        // Pacing the samples of an integrator, not waiting for readiness.
        std::thread::sleep(Duration::from_millis(5));
    }
    json!({ "first": first, "last": last, "monotonic": monotonic })
}

fn init_error() -> Value {
    match Nvml::builder().lib_path(OsStr::new(fake_nvml::LIB)).init() {
        Ok(_) => json!({ "error": null }),
        Err(e) => json!({
            "error": format!("{e:?}"),
            "driver_not_loaded": matches!(e, NvmlError::DriverNotLoaded),
        }),
    }
}

// ---------------------------------------------------------------------------
// The parent side
// ---------------------------------------------------------------------------

/// Runs `scenario` in a child process with the library configured by
/// `config` (and nothing else from this process's fake NVML environment).
fn run_child(scenario: &str, config: &FakeGpuConfig, extra: &[(&str, &str)]) -> Value {
    let out = child_command(scenario, config, extra)
        .output()
        .expect("run the child");
    child_result(scenario, &out)
}

fn child_command(scenario: &str, config: &FakeGpuConfig, extra: &[(&str, &str)]) -> Command {
    let exe = std::env::current_exe().expect("current exe");
    let mut cmd = Command::new(exe);
    cmd.args([
        "child",
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ]);
    for k in fake_nvml::ALL_ENV {
        cmd.env_remove(k);
    }
    cmd.envs(config.env()).env(SCENARIO, scenario);
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd
}

/// The JSON line of a finished child.
fn child_result(scenario: &str, out: &std::process::Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "child {scenario} failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    let line = stdout
        .lines()
        .find_map(|l| l.split_once(RESULT).map(|(_, json)| json))
        .unwrap_or_else(|| panic!("no result from child {scenario}:\n{stdout}\n{stderr}"));
    serde_json::from_str(line).expect("the child's JSON")
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn assert_close(what: &str, actual: f64, expected: f64, rel: f64) {
    assert!(
        (actual - expected).abs() <= rel * expected.abs(),
        "{what}: {actual} is not within {}% of {expected}",
        rel * 100.0
    );
}

#[test]
fn defaults() {
    let r = run_child("probe", &FakeGpuConfig::new(), &[]);
    assert_eq!(r["count"], 1);
    assert_eq!(r["driver_version"], "550.54.15");
    let d = &r["devices"][0];
    assert_eq!(d["uuid"], "GPU-00000000-0000-0000-0000-000000000000");
    assert_eq!(d["name"], "NVIDIA H100 80GB HBM3");
    assert_eq!(d["index"], 0);
    assert_eq!(d["power_limit_mw"], 700_000);
    assert_eq!(r["unknown_uuid"], "NotFound");
    assert_eq!(r["out_of_range_index"], "InvalidArg");
}

#[test]
fn no_devices() {
    let r = run_child(
        "probe",
        &FakeGpuConfig::new().devices(Vec::<String>::new()),
        &[],
    );
    assert_eq!(r["count"], 0);
    assert_eq!(r["out_of_range_index"], "InvalidArg");
}

#[test]
fn devices_and_readings_follow_the_config_and_the_load() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = FakeGpuConfig::new()
        .devices([UUID_A, UUID_B])
        .name("NVIDIA A100-SXM4-40GB")
        .load_file(dir.path().join("load"))
        .idle_watts(50.0)
        .tdp_watts(400.0)
        .memory_total_mib(40960);
    let r = run_child(
        "probe",
        &config,
        &[(LOADS, "0,1,0.5,0.25,1.7,garbage,missing")],
    );

    assert_eq!(r["count"], 2);
    for (i, uuid) in [UUID_A, UUID_B].into_iter().enumerate() {
        let d = &r["devices"][i];
        assert_eq!(d["uuid"], uuid);
        assert_eq!(d["name"], "NVIDIA A100-SXM4-40GB");
        assert_eq!(d["index"], i);
        assert_eq!(d["index_by_uuid"], i);
        assert_eq!(d["power_limit_mw"], 400_000);
    }
    assert_eq!(r["unknown_uuid"], "NotFound");
    assert_eq!(r["out_of_range_index"], "InvalidArg");

    let total = 40960.0 * MIB;
    // 1.7 is clamped to 1; garbage and a missing file read as 0.
    let expected_util: [f64; 7] = [0.0, 1.0, 0.5, 0.25, 1.0, 0.0, 0.0];
    let snapshots = r["snapshots"].as_array().expect("snapshots");
    assert_eq!(snapshots.len(), expected_util.len());
    for (s, util) in snapshots.iter().zip(expected_util) {
        let what = |m: &str| format!("{m} at load {}", s["load"]);
        assert_eq!(
            f(&s["power_mw"]),
            (1000.0 * (50.0 + 350.0 * util)).round(),
            "{}",
            what("power")
        );
        assert_eq!(f(&s["gpu_pct"]), (util * 100.0).round(), "{}", what("gpu%"));
        assert_eq!(f(&s["mem_pct"]), (util * 60.0).round(), "{}", what("mem%"));
        assert_eq!(
            f(&s["temp_c"]),
            (30.0 + 50.0 * util).round(),
            "{}",
            what("temp")
        );
        assert_eq!(f(&s["mem_total"]), total, "{}", what("memory total"));
        assert_close(
            &what("memory used"),
            f(&s["mem_used"]),
            total * (0.1 + 0.8 * util),
            1e-9,
        );
        assert_eq!(
            f(&s["mem_used"]) + f(&s["mem_free"]),
            total,
            "{}",
            what("used + free")
        );
        assert_eq!(s["mem_reserved"], 0);
    }
}

#[test]
fn energy_integrates_power_over_time() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = FakeGpuConfig::new().load_file(dir.path().join("load"));
    let r = run_child("energy_rates", &config, &[]);
    // 700 W = 700 mJ/ms at full load, 70 W at idle.
    assert_close(
        "energy at full load",
        f(&r["full_mj"]),
        700_000.0 * f(&r["full_s"]),
        0.15,
    );
    assert_close(
        "energy at idle",
        f(&r["idle_mj"]),
        70_000.0 * f(&r["idle_s"]),
        0.15,
    );
    assert_eq!(r["monotonic"], true);
}

#[test]
fn energy_persists_across_processes_and_resets_on_request() {
    let dir = tempfile::tempdir().expect("temp dir");
    let load = dir.path().join("load");
    let state = dir.path().join("state");
    fake_nvml::write_load(&load, 1.0).expect("write load");
    let config = FakeGpuConfig::new()
        .devices([UUID_A])
        .load_file(&load)
        .state_file(&state);

    // A fresh state file: the counter starts at 0 and runs at 700 W.
    let started = Instant::now();
    let a = run_child("energy_once", &config, &[(SLEEP_MS, "200")]);
    let (a_first, a_last) = (f(&a["first"]), f(&a["last"]));
    assert!(
        a_first < 35_000.0,
        "a fresh counter starts near 0, got {a_first}"
    );
    assert!(
        a_last >= 0.85 * 700.0 * 200.0,
        "200 ms at 700 W, got {a_last}"
    );
    assert_state_file(&state, UUID_A);

    // A second process continues the counter, including the time between.
    let b = run_child("energy_once", &config, &[]);
    let bound = 700.0 * started.elapsed().as_secs_f64() * 1000.0;
    let b_first = f(&b["first"]);
    assert!(
        b_first >= a_last,
        "the counter went back: {a_last} -> {b_first}"
    );
    assert!(
        b_first <= bound,
        "{b_first} mJ is more than 700 W since the start ({bound})"
    );

    // A driver reload: back to ~0, and the state file follows. At idle
    // from here on, so that the counter stays well below A's.
    fake_nvml::write_load(&load, 0.0).expect("write load");
    let reset = config.clone().reset_energy(true);
    let c = run_child("energy_once", &reset, &[]);
    let c_first = f(&c["first"]);
    assert!(
        c_first < 35_000.0,
        "a reset counter starts near 0, got {c_first}"
    );
    let d = run_child("energy_once", &config, &[]);
    let d_first = f(&d["first"]);
    assert!(
        d_first >= f(&c["last"]) && d_first < a_last,
        "after the reset, the counter continues from the reset value: {d_first}"
    );

    // Without a state file, every process starts at 0.
    let fresh = FakeGpuConfig::new().load_file(&load);
    let e = run_child("energy_once", &fresh, &[]);
    assert!(
        f(&e["first"]) < 35_000.0,
        "no state file: starts near 0, got {}",
        e["first"]
    );
}

fn assert_state_file(state: &Path, uuid: &str) {
    let text = std::fs::read_to_string(state).expect("the state file");
    let line = text.lines().next().expect("a line per device");
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields.len(), 4, "uuid energy_mj last_ns last_util: {line}");
    assert_eq!(fields[0], uuid);
}

#[test]
fn fail_init_is_driver_not_loaded() {
    let r = run_child("init_error", &FakeGpuConfig::new().fail_init(true), &[]);
    assert_eq!(r["error"], "DriverNotLoaded");
    assert_eq!(r["driver_not_loaded"], true);
}

#[test]
fn bad_config_fails_init() {
    let r = run_child("init_error", &FakeGpuConfig::new().idle_watts(800.0), &[]);
    assert_eq!(r["error"], "Unknown");
}

#[test]
fn missing_library_is_a_libloading_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("libnvidia-ml.so.1");
    let Err(err) = Nvml::builder().lib_path(missing.as_os_str()).init() else {
        panic!("init must fail without a library");
    };
    assert!(matches!(err, NvmlError::LibloadingError(_)), "{err:?}");
}

// ---------------------------------------------------------------------------
// What a container sees (NVIDIA_VISIBLE_DEVICES) and per-device mode
// ---------------------------------------------------------------------------

const UUID_C: &str = "GPU-cccccccc-0000-1111-2222-333333333333";

fn uuids(r: &Value) -> Vec<String> {
    r["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| d["uuid"].as_str().expect("uuid").to_owned())
        .collect()
}

#[test]
fn visible_devices_narrow_the_nodes_gpus_like_the_container_toolkit() {
    let node = FakeGpuConfig::new().devices([UUID_A, UUID_B, UUID_C]);

    // The host's view, and `all`.
    for config in [node.clone(), node.clone().visible_devices("all")] {
        let r = run_child("probe", &config, &[]);
        assert_eq!(r["count"], 3, "{config:?}");
        assert_eq!(uuids(&r), [UUID_A, UUID_B, UUID_C]);
    }

    // A container that requested no GPU.
    for spec in ["none", "void", ""] {
        let r = run_child("probe", &node.clone().visible_devices(spec), &[]);
        assert_eq!(r["count"], 0, "NVIDIA_VISIBLE_DEVICES={spec:?}");
    }

    // UUIDs and indices, renumbered in the listed order; a repeat is seen once.
    let r = run_child(
        "probe",
        &node
            .clone()
            .visible_devices(format!("{UUID_C}, 0,{UUID_C}")),
        &[],
    );
    assert_eq!(r["count"], 2);
    assert_eq!(uuids(&r), [UUID_C, UUID_A]);
    for (i, d) in r["devices"].as_array().expect("devices").iter().enumerate() {
        assert_eq!(d["index"], i, "renumbered from 0");
        assert_eq!(d["index_by_uuid"], i);
    }
    // A device of the node that the container may not see is not found.
    let r = run_child("probe", &node.clone().visible_devices(UUID_B), &[]);
    assert_eq!(uuids(&r), [UUID_B]);
    assert_eq!(r["out_of_range_index"], "InvalidArg");

    // A device the node does not have: the driver refuses to start.
    for spec in ["3", "GPU-ffffffff-ffff-ffff-ffff-ffffffffffff", "1,x"] {
        let out = child_command("init_error", &node.clone().visible_devices(spec), &[])
            .output()
            .expect("run the child");
        let r = child_result("init_error", &out);
        assert_eq!(r["error"], "Unknown", "NVIDIA_VISIBLE_DEVICES={spec:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("NVIDIA_VISIBLE_DEVICES names"),
            "a message says why: {stderr}"
        );
    }
}

#[test]
fn each_device_follows_its_own_load_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let gpus = dir.path().join("gpus");
    fake_nvml::write_device_load(&gpus, UUID_A, 1.0).expect("load A");
    fake_nvml::write_device_load(&gpus, UUID_B, 0.25).expect("load B");
    // UUID_C has no load file: idle. A process-wide load file is ignored.
    let busy = dir.path().join("load");
    fake_nvml::write_load(&busy, 1.0).expect("load file");
    let config = FakeGpuConfig::new()
        .devices([UUID_A, UUID_B, UUID_C])
        .gpu_dir(&gpus)
        .load_file(&busy)
        .idle_watts(100.0)
        .tdp_watts(500.0);

    let r = run_child("device_readings", &config, &[]);
    assert_eq!(r["count"], 3);
    let expected = [(UUID_A, 1.0), (UUID_B, 0.25), (UUID_C, 0.0)];
    for (d, (uuid, util)) in r["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .zip(expected)
    {
        assert_eq!(d["uuid"], uuid);
        assert_eq!(f(&d["power_mw"]), 1000.0 * (100.0 + 400.0 * util), "{uuid}");
        assert_eq!(f(&d["gpu_pct"]), (100.0 * util).round(), "{uuid}");
        assert_eq!(f(&d["temp_c"]), (30.0 + 50.0 * util).round(), "{uuid}");
        // The sample created the device's state.
        let e = fake_nvml::read_device_energy(&gpus, uuid).expect("energy file");
        assert_eq!(e.last_util, util, "{uuid}");
    }

    // A container sees its own devices' loads, renumbered.
    let r = run_child(
        "device_readings",
        &config.clone().visible_devices(UUID_B),
        &[],
    );
    assert_eq!(r["count"], 1);
    assert_eq!(r["devices"][0]["uuid"], UUID_B);
    assert_eq!(r["devices"][0]["index"], 0);
    assert_eq!(f(&r["devices"][0]["power_mw"]), 200_000.0);
}

#[test]
fn processes_share_one_monotonic_counter_per_device() {
    let dir = tempfile::tempdir().expect("temp dir");
    let gpus = dir.path().join("gpus");
    fake_nvml::write_device_load(&gpus, UUID_A, 1.0).expect("load A");
    fake_nvml::write_device_load(&gpus, UUID_B, 0.0).expect("load B");
    let node = FakeGpuConfig::new()
        .devices([UUID_A, UUID_B])
        .gpu_dir(&gpus);

    // The first process starts both counters from 0.
    let a = run_child("energy_loop", &node, &[(SLEEP_MS, "200")]);
    assert_eq!(a["monotonic"], true);
    let a_last = f(&a["last"][0]);
    assert!(f(&a["first"][0]) < 35_000.0, "from ~0: {}", a["first"]);
    assert!(a_last >= 0.85 * 700.0 * 200.0, "200 ms at 700 W: {a_last}");
    let start = fake_nvml::read_device_energy(&gpus, UUID_A).expect("A's counter");

    // Two processes at once, one seeing both devices and one (a container)
    // seeing only A: each sees A's counter go only up, and A's counter
    // integrates 700 W over wall-clock time exactly (no sample of one
    // process lost to the other's).
    let both = child_command("energy_loop", &node, &[(SLEEP_MS, "400")])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let only_a = child_command(
        "energy_loop",
        &node.clone().visible_devices(UUID_A),
        &[(SLEEP_MS, "400")],
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .expect("spawn");
    let both = child_result("energy_loop", &both.wait_with_output().expect("wait"));
    let only_a = child_result("energy_loop", &only_a.wait_with_output().expect("wait"));
    for r in [&both, &only_a] {
        assert_eq!(r["monotonic"], true, "{r}");
        assert!(
            f(&r["first"][0]) >= a_last,
            "the counter continues across processes: {a_last} -> {}",
            r["first"][0]
        );
    }
    let end = fake_nvml::read_device_energy(&gpus, UUID_A).expect("A's counter");
    let seconds = (end.last_ns - start.last_ns) as f64 / 1e9;
    assert!(seconds >= 0.4, "the two processes ran: {seconds} s");
    assert_close(
        "A's counter over the concurrent run",
        end.energy_mj - start.energy_mj,
        700_000.0 * seconds,
        0.001,
    );
    // B, at idle, was seen by one process only and integrates 70 W.
    assert!(f(&both["last"][1]) >= f(&a["last"][1]));

    // A driver reload: the counters restart from ~0 (and the state with
    // them); the next process continues from there.
    fake_nvml::write_device_load(&gpus, UUID_A, 0.0).expect("idle A");
    let reset = run_child(
        "energy_loop",
        &node.clone().reset_energy(true),
        &[(SLEEP_MS, "0")],
    );
    let reset_first = f(&reset["first"][0]);
    assert!(reset_first < 35_000.0, "reset to ~0: {reset_first}");
    let after = run_child("energy_loop", &node, &[(SLEEP_MS, "0")]);
    let after_first = f(&after["first"][0]);
    assert!(
        after_first >= f(&reset["last"][0]) && after_first < f(&both["last"][0]),
        "after the reset the counter continues from the reset value: {after_first}"
    );
}

#[test]
fn a_power_limit_caps_the_draw_and_outlives_the_process_that_set_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let gpus = dir.path().join("gpus");
    fake_nvml::write_device_load(&gpus, UUID_A, 1.0).expect("load A");
    fake_nvml::write_device_load(&gpus, UUID_B, 1.0).expect("load B");
    let config = FakeGpuConfig::new()
        .devices([UUID_A, UUID_B])
        .gpu_dir(&gpus)
        .idle_watts(100.0)
        .tdp_watts(500.0);

    // Defaults: the TDP is the limit, the default and the maximum.
    let r = run_child("power_limits", &config, &[]);
    for d in r["devices"].as_array().expect("devices") {
        assert_eq!(f(&d["limit_mw"]), 500_000.0, "{d}");
        assert_eq!(f(&d["default_mw"]), 500_000.0, "{d}");
        assert_eq!(f(&d["enforced_mw"]), 500_000.0, "{d}");
        assert_eq!(f(&d["min_mw"]), 100_000.0, "{d}");
        assert_eq!(f(&d["max_mw"]), 500_000.0, "{d}");
        assert_eq!(f(&d["power_mw"]), 500_000.0, "{d}");
    }

    // Outside the constraints: refused, nothing changes.
    let r = run_child("power_limits", &config, &[(LOADS, "600000")]);
    assert_eq!(r["set"], "InvalidArg", "{r}");
    assert_eq!(f(&r["devices"][0]["limit_mw"]), 500_000.0);

    // Device A capped at 300 W: its draw at full load is 300 W, B's is not.
    let r = run_child("power_limits", &config, &[(LOADS, "300000")]);
    assert_eq!(r["set"], "ok", "{r}");
    assert_eq!(f(&r["devices"][0]["limit_mw"]), 300_000.0);
    assert_eq!(f(&r["devices"][0]["enforced_mw"]), 300_000.0);
    assert_eq!(f(&r["devices"][0]["default_mw"]), 500_000.0);
    assert_eq!(f(&r["devices"][0]["power_mw"]), 300_000.0);
    assert_eq!(f(&r["devices"][1]["power_mw"]), 500_000.0);

    // The driver keeps it: another process (and a container that sees only
    // A, renumbered) reads the cap, and a light load is under it.
    let r = run_child("power_limits", &config.clone().visible_devices(UUID_A), &[]);
    assert_eq!(r["devices"][0]["uuid"], UUID_A);
    assert_eq!(f(&r["devices"][0]["limit_mw"]), 300_000.0);
    fake_nvml::write_device_load(&gpus, UUID_A, 0.25).expect("load A");
    let r = run_child("power_limits", &config, &[]);
    assert_eq!(f(&r["devices"][0]["power_mw"]), 200_000.0);
    assert_eq!(
        fake_nvml::read_device_power_limit(&gpus, UUID_A),
        Some(300_000.0)
    );
    assert_eq!(fake_nvml::read_device_power_limit(&gpus, UUID_B), None);
}

#[test]
fn the_node_agent_brings_every_gpu_to_the_pools_cap_and_back() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = FakeGpuConfig::new()
        .devices([UUID_A, UUID_B])
        .gpu_dir(dir.path().join("gpus"))
        .idle_watts(100.0)
        .tdp_watts(500.0);
    let r = run_child(
        "agent_limits",
        &config,
        &[(LOADS, "unmanaged,300,300,50,default,unmanaged")],
    );
    let steps = r["steps"].as_array().expect("steps");
    let got: Vec<(u64, Vec<u64>)> = steps
        .iter()
        .map(|s| {
            assert_eq!(s["errors"].as_array().map(Vec::len), Some(0), "{s}");
            (
                s["changed"].as_u64().expect("changed"),
                s["limits_mw"]
                    .as_array()
                    .expect("limits")
                    .iter()
                    .map(|v| v.as_u64().expect("mW"))
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            // Not in a pool: untouched.
            (0, vec![500_000, 500_000]),
            // A cap: both GPUs set; again: nothing to write.
            (2, vec![300_000, 300_000]),
            (0, vec![300_000, 300_000]),
            // Below what the GPU allows: its minimum.
            (2, vec![100_000, 100_000]),
            // No cap any more: the default.
            (2, vec![500_000, 500_000]),
            (0, vec![500_000, 500_000]),
        ]
    );
}
