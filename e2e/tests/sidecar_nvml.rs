//! The strata-sidecar binary metering fake GPUs through the real
//! nvml-wrapper path: the fake libnvidia-ml.so.1 built by this crate, its
//! load following a load file (as the engine simulator writes it).

use std::process::Stdio;
use std::time::{Duration, Instant};

use strata_e2e::fake_nvml::{self, FakeGpuConfig};
use strata_e2e::harness::{free_port, workspace_binary};
use tokio::process::Command;

fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn metrics(admin: u16) -> String {
    let addr = format!("127.0.0.1:{admin}").parse().expect("addr");
    strata_e2e::http::get(addr, "/metrics", Duration::from_secs(2))
        .await
        .map(|r| r.body)
        .unwrap_or_default()
}

async fn until(what: &str, admin: u16, check: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = metrics(admin).await;
        if check(&m) {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; metrics:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_sidecar_meters_the_pods_gpus_through_nvml() {
    let dir = tempfile::tempdir().expect("tempdir");
    let load = dir.path().join("load");
    fake_nvml::write_load(&load, 0.0).expect("load");
    let uuids = [
        "GPU-11111111-2222-3333-4444-555555555555",
        "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
        "GPU-99999999-8888-7777-6666-555555555555",
    ];
    let env = FakeGpuConfig::new()
        .devices(uuids)
        .load_file(&load)
        .idle_watts(70.0)
        .tdp_watts(700.0)
        .env();
    let (api, admin) = (free_port(), free_port());
    let mut sidecar = Command::new(workspace_binary("strata-sidecar"))
        .args([
            format!("--listen=127.0.0.1:{api}"),
            format!("--admin-listen=127.0.0.1:{admin}"),
            "--engine-url=http://127.0.0.1:9".to_string(),
            "--served-model=m".to_string(),
            "--meter-gpus".into(),
            format!("--nvml-lib={}", fake_nvml::LIB),
            "--nvml-interval=0.1".to_string(),
            // The pod's GPUs: two of the node's three, one by UUID, one by index.
            format!("--gpus={},2", uuids[0]),
        ])
        .envs(env)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("sidecar");

    let m = until("GPUs visible", admin, |m| {
        metric(m, "strata_gpu_visible") == Some(2.0)
    })
    .await;
    assert!(m.contains(uuids[0]) && m.contains(uuids[2]), "{m}");
    assert!(!m.contains(uuids[1]), "a GPU of another pod is not metered");
    let idle = until("idle power", admin, |m| {
        metric(
            m,
            &format!("strata_gpu_power_watts{{gpu=\"0\",uuid=\"{}\"}}", uuids[0]),
        ) == Some(70.0)
    })
    .await;
    assert_eq!(
        metric(
            &idle,
            &format!(
                "strata_gpu_utilization_ratio{{gpu=\"0\",uuid=\"{}\"}}",
                uuids[0]
            )
        ),
        Some(0.0)
    );

    // Full load: power goes to TDP, and energy accumulates at about 2 x 700 W.
    fake_nvml::write_load(&load, 1.0).expect("load");
    let busy = until("power at TDP", admin, |m| {
        metric(
            m,
            &format!("strata_gpu_power_watts{{gpu=\"2\",uuid=\"{}\"}}", uuids[2]),
        ) == Some(700.0)
    })
    .await;
    assert_eq!(
        metric(
            &busy,
            &format!(
                "strata_gpu_utilization_ratio{{gpu=\"0\",uuid=\"{}\"}}",
                uuids[0]
            )
        ),
        Some(1.0)
    );
    let e0 = metric(&busy, "strata_pod_gpu_energy_joules_total").unwrap_or(0.0);
    let t0 = Instant::now();
    let later = until("energy growing", admin, |m| {
        metric(m, "strata_pod_gpu_energy_joules_total").is_some_and(|e| e > e0 + 5600.0)
    })
    .await;
    let e1 = metric(&later, "strata_pod_gpu_energy_joules_total").expect("energy");
    let elapsed = t0.elapsed().as_secs_f64();
    let watts = (e1 - e0) / elapsed;
    // Two GPUs at 700 W = 1400 W over about 4 s. The counter itself is exact;
    // the edges of this window and of the sidecar's 100 ms samples differ by a
    // few hundred ms at most, hence the 25 % tolerance.
    assert!(
        (watts - 1400.0).abs() < 350.0,
        "{watts:.0} W from {:.0} J over {elapsed:.2} s",
        e1 - e0
    );
    assert!(metric(&later, "strata_gpu_memory_total_bytes").is_some_and(|b| b > 8.0e10));
    let _ = sidecar.start_kill();
}
