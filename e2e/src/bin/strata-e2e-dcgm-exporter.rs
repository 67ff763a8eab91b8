//! strata-e2e-dcgm-exporter: a stand-in for NVIDIA's dcgm-exporter on one
//! simulated GPU node, for the operator's DCGM telemetry source
//! (e2e/tests/dcgm.rs). Test-only; never in a product image.
//!
//! `strata-e2e-dcgm-exporter --node h100-0 --listen 127.0.0.1:9400
//! --pod-resources-socket <node dir>/var/lib/kubelet/pod-resources/kubelet.sock`
//!
//! Every `--collect-interval-ms` (dcgm-exporter's `-c`, 30000 by default
//! there too) it reads every GPU of the node through NVML (nvml-wrapper,
//! the library at `--nvml-lib`, by default the fake one, configured by this
//! process's `STRATA_FAKE_NVML_*` environment: in the tests, the node's
//! per-device GPU state and all its UUIDs) and who holds each GPU from the
//! kubelet's PodResources API, and serves the result on `/metrics` in
//! dcgm-exporter's exact text format (its GPU template, the default
//! counters' names, types and help, values as its `%d`/`%f` conversions
//! print them):
//!
//! ```text
//! # HELP DCGM_FI_DEV_POWER_USAGE Power draw (in W).
//! # TYPE DCGM_FI_DEV_POWER_USAGE gauge
//! DCGM_FI_DEV_POWER_USAGE{gpu="0",UUID="GPU-...",pci_bus_id="00000000:07:00.0",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",Hostname="h100-0",DCGM_FI_DRIVER_VERSION="550.54.15",container="engine",namespace="team",pod="chat-0"} 385.000000
//! ```
//!
//! Fields: `DCGM_FI_DEV_POWER_USAGE` (gauge, W), `DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION`
//! (counter, mJ), `DCGM_FI_DEV_GPU_UTIL` (gauge, %), `DCGM_FI_DEV_FB_USED`
//! (gauge, MiB), in DCGM field-ID order as the exporter's template ranges
//! over them; the `DCGM_FI_DRIVER_VERSION` label as when the counters file
//! lists it as a label; `container`, `namespace` and `pod` only on a GPU a
//! pod holds, as with dcgm-exporter's Kubernetes mapping (the GPU
//! Operator's default). Without the socket, no pod labels (dcgm-exporter
//! ignores a missing socket); a round whose PodResources read fails keeps
//! the previous page, as dcgm-exporter's failed transform does. `/health`
//! answers once a page was collected.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use clap::Parser;
use nvml_wrapper::Nvml;
use strata_podresources::Holder;

#[derive(Parser)]
#[command(about = "dcgm-exporter stand-in for one simulated GPU node (tests only)")]
struct Cli {
    /// Address to serve `/metrics` on (dcgm-exporter's `-a`).
    #[arg(long)]
    listen: SocketAddr,
    /// The node's name: the `Hostname` label (dcgm-exporter's `NODE_NAME`).
    #[arg(long)]
    node: String,
    /// The kubelet's PodResources socket
    /// (dcgm-exporter's `--pod-resources-kubelet-socket`).
    #[arg(long, default_value = strata_podresources::KUBELET_SOCKET)]
    pod_resources_socket: PathBuf,
    /// The NVML library (default: the e2e fake one).
    #[arg(long)]
    nvml_lib: Option<PathBuf>,
    /// Milliseconds between collections (dcgm-exporter's `-c`).
    #[arg(long, default_value_t = 30_000)]
    collect_interval_ms: u64,
}

/// One GPU's reading; a field NVML did not give is left out of the page
/// (dcgm-exporter skips blank values).
#[derive(Debug, Clone, Default, PartialEq)]
struct Gpu {
    index: u32,
    uuid: String,
    name: String,
    pci_bus_id: String,
    minor: u32,
    power_w: Option<f64>,
    energy_mj: Option<u64>,
    util_pct: Option<u32>,
    fb_used_mib: Option<u64>,
}

/// A field of the page: name, Prometheus type, help (dcgm-exporter's
/// default-counters.csv), and the value as its conversions print it.
type Field = (
    &'static str,
    &'static str,
    &'static str,
    fn(&Gpu) -> Option<String>,
);

/// In DCGM field-ID order (155, 156, 203, 252), as the template ranges over them.
const FIELDS: [Field; 4] = [
    (
        "DCGM_FI_DEV_POWER_USAGE",
        "gauge",
        "Power draw (in W).",
        |g| g.power_w.map(|w| format!("{w:.6}")),
    ),
    (
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "counter",
        "Total energy consumption since boot (in mJ).",
        |g| g.energy_mj.map(|v| v.to_string()),
    ),
    (
        "DCGM_FI_DEV_GPU_UTIL",
        "gauge",
        "GPU utilization (in %).",
        |g| g.util_pct.map(|v| v.to_string()),
    ),
    (
        "DCGM_FI_DEV_FB_USED",
        "gauge",
        "Framebuffer memory used (in MiB).",
        |g| g.fb_used_mib.map(|v| v.to_string()),
    ),
];

/// A label value in the exposition format (dcgm-exporter writes them raw;
/// Kubernetes names and UUIDs need no escaping, so the two agree).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The page (pure): every field, every GPU, with its holder's labels when a
/// pod holds it.
fn render(
    gpus: &[Gpu],
    hostname: &str,
    driver: &str,
    holders: &BTreeMap<String, Holder>,
) -> String {
    let mut out = String::new();
    for (name, kind, help, value) in FIELDS {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for g in gpus {
            let Some(v) = value(g) else { continue };
            out.push_str(&format!(
                "{name}{{gpu=\"{}\",UUID=\"{}\",pci_bus_id=\"{}\",device=\"nvidia{}\",modelName=\"{}\",Hostname=\"{}\",DCGM_FI_DRIVER_VERSION=\"{}\"",
                g.index,
                escape(&g.uuid),
                escape(&g.pci_bus_id),
                g.minor,
                escape(&g.name),
                escape(hostname),
                escape(driver),
            ));
            // The Kubernetes mapping's attributes, in the template's (sorted) order.
            if let Some(h) = holders.get(&g.uuid) {
                out.push_str(&format!(
                    ",container=\"{}\",namespace=\"{}\",pod=\"{}\"",
                    escape(&h.container),
                    escape(&h.namespace),
                    escape(&h.pod)
                ));
            }
            out.push_str(&format!("}} {v}\n"));
        }
    }
    out
}

/// Reads every GPU NVML shows (blocking).
fn sample(nvml: &Nvml) -> Result<Vec<Gpu>, nvml_wrapper::error::NvmlError> {
    let count = nvml.device_count()?;
    let mut out = Vec::new();
    for i in 0..count {
        let d = nvml.device_by_index(i)?;
        let index = d.index().unwrap_or(i);
        out.push(Gpu {
            index,
            uuid: d.uuid()?,
            name: d.name().unwrap_or_default(),
            // The fake library has no PCI info: a plausible bus per index.
            pci_bus_id: d
                .pci_info()
                .map(|p| p.bus_id)
                .unwrap_or_else(|_| format!("00000000:{:02X}:00.0", 0x07 + index)),
            minor: d.minor_number().unwrap_or(index),
            power_w: d.power_usage().ok().map(|mw| f64::from(mw) / 1000.0),
            energy_mj: d.total_energy_consumption().ok(),
            util_pct: d.utilization_rates().ok().map(|u| u.gpu),
            fb_used_mib: d.memory_info().ok().map(|m| m.used / (1024 * 1024)),
        });
    }
    Ok(out)
}

/// Who holds each GPU, from the kubelet. No socket: nobody (dcgm-exporter
/// logs "No Kubelet socket, ignoring" and exports without pod labels).
async fn holders(socket: &std::path::Path) -> Result<BTreeMap<String, Holder>, String> {
    if !socket.exists() {
        return Ok(BTreeMap::new());
    }
    let timeout = Duration::from_secs(2);
    let mut client = strata_podresources::Client::connect(socket, timeout)
        .await
        .map_err(|e| e.to_string())?;
    let list = client.list().await.map_err(|e| e.to_string())?;
    Ok(strata_podresources::device_holders(
        &list,
        strata_podresources::is_nvidia_gpu,
    ))
}

type Page = Arc<RwLock<Option<String>>>;

async fn metrics(page: Page) -> axum::response::Response {
    let body = page.read().ok().and_then(|p| p.clone()).unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn health(page: Page) -> axum::response::Response {
    let ready = page.read().is_ok_and(|p| p.is_some());
    if ready {
        (StatusCode::OK, "OK").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not collected yet").into_response()
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    let lib = cli
        .nvml_lib
        .clone()
        .unwrap_or_else(|| strata_e2e::fake_nvml::lib_path().to_path_buf());
    let nvml = match Nvml::builder().lib_path(OsStr::new(&lib)).init() {
        Ok(n) => Arc::new(n),
        Err(e) => {
            tracing::error!(lib = %lib.display(), "NVML: {e}");
            return ExitCode::from(2);
        }
    };
    let driver = nvml.sys_driver_version().unwrap_or_default();
    let listener = match tokio::net::TcpListener::bind(cli.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("listen {}: {e}", cli.listen);
            return ExitCode::from(2);
        }
    };
    let page: Page = Arc::new(RwLock::new(None));

    // Collection, off the request path.
    let interval = Duration::from_millis(cli.collect_interval_ms.max(10));
    let (collected, node, socket) = (page.clone(), cli.node.clone(), cli.pod_resources_socket);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let n = nvml.clone();
            let gpus = match tokio::task::spawn_blocking(move || sample(&n)).await {
                Ok(Ok(g)) => g,
                Ok(Err(e)) => {
                    tracing::warn!("NVML: {e}; keeping the last page");
                    continue;
                }
                Err(e) => {
                    tracing::warn!("NVML sampling: {e}");
                    continue;
                }
            };
            match holders(&socket).await {
                Ok(h) => {
                    let text = render(&gpus, &node, &driver, &h);
                    if let Ok(mut p) = collected.write() {
                        *p = Some(text);
                    }
                }
                Err(e) => tracing::warn!("PodResources: {e}; keeping the last page"),
            }
        }
    });

    let (p1, p2) = (page.clone(), page);
    let router = axum::Router::new()
        .route("/metrics", get(move || metrics(p1.clone())))
        .route("/health", get(move || health(p2.clone())));
    let limits = strata_net::server::ServerLimits {
        max_connections: 32,
        header_read_timeout: Duration::from_secs(5),
        max_header_bytes: 16 * 1024,
        shutdown_grace: Duration::from_secs(1),
        ..strata_net::server::ServerLimits::default()
    };
    tracing::info!(listen = %cli.listen, node = %cli.node, ?interval, "dcgm-exporter stand-in serving");
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    let stop = async {
        tokio::select! {
            () = shutdown => {}
            () = term => {}
        }
    };
    match strata_net::server::serve(listener, router, limits, None, stop).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("serve: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(index: u32, uuid: &str) -> Gpu {
        Gpu {
            index,
            uuid: uuid.into(),
            name: "NVIDIA H100 80GB HBM3".into(),
            pci_bus_id: format!("00000000:{:02X}:00.0", 0x07 + index),
            minor: index,
            power_w: Some(95.5),
            energy_mj: Some(123_456_789),
            util_pct: Some(37),
            fb_used_mib: Some(8155),
        }
    }

    #[test]
    fn the_page_is_in_dcgm_exporters_format() {
        let holders = BTreeMap::from([(
            "GPU-b".to_string(),
            Holder {
                namespace: "team".into(),
                pod: "chat-0".into(),
                container: "engine".into(),
                resource: "nvidia.com/gpu".into(),
            },
        )]);
        let mut a = gpu(0, "GPU-a");
        a.fb_used_mib = None;
        let page = render(&[a, gpu(1, "GPU-b")], "h100-0", "550.54.15", &holders);
        let want = "\
# HELP DCGM_FI_DEV_POWER_USAGE Power draw (in W).
# TYPE DCGM_FI_DEV_POWER_USAGE gauge
DCGM_FI_DEV_POWER_USAGE{gpu=\"0\",UUID=\"GPU-a\",pci_bus_id=\"00000000:07:00.0\",device=\"nvidia0\",modelName=\"NVIDIA H100 80GB HBM3\",Hostname=\"h100-0\",DCGM_FI_DRIVER_VERSION=\"550.54.15\"} 95.500000
DCGM_FI_DEV_POWER_USAGE{gpu=\"1\",UUID=\"GPU-b\",pci_bus_id=\"00000000:08:00.0\",device=\"nvidia1\",modelName=\"NVIDIA H100 80GB HBM3\",Hostname=\"h100-0\",DCGM_FI_DRIVER_VERSION=\"550.54.15\",container=\"engine\",namespace=\"team\",pod=\"chat-0\"} 95.500000
# HELP DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION Total energy consumption since boot (in mJ).
# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter
DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{gpu=\"0\",UUID=\"GPU-a\",pci_bus_id=\"00000000:07:00.0\",device=\"nvidia0\",modelName=\"NVIDIA H100 80GB HBM3\",Hostname=\"h100-0\",DCGM_FI_DRIVER_VERSION=\"550.54.15\"} 123456789
DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{gpu=\"1\",UUID=\"GPU-b\",pci_bus_id=\"00000000:08:00.0\",device=\"nvidia1\",modelName=\"NVIDIA H100 80GB HBM3\",Hostname=\"h100-0\",DCGM_FI_DRIVER_VERSION=\"550.54.15\",container=\"engine\",namespace=\"team\",pod=\"chat-0\"} 123456789
# HELP DCGM_FI_DEV_GPU_UTIL GPU utilization (in %).
# TYPE DCGM_FI_DEV_GPU_UTIL gauge
DCGM_FI_DEV_GPU_UTIL{gpu=\"0\",UUID=\"GPU-a\",pci_bus_id=\"00000000:07:00.0\",device=\"nvidia0\",modelName=\"NVIDIA H100 80GB HBM3\",Hostname=\"h100-0\",DCGM_FI_DRIVER_VERSION=\"550.54.15\"} 37
DCGM_FI_DEV_GPU_UTIL{gpu=\"1\",UUID=\"GPU-b\",pci_bus_id=\"00000000:08:00.0\",device=\"nvidia1\",modelName=\"NVIDIA H100 80GB HBM3\",Hostname=\"h100-0\",DCGM_FI_DRIVER_VERSION=\"550.54.15\",container=\"engine\",namespace=\"team\",pod=\"chat-0\"} 37
# HELP DCGM_FI_DEV_FB_USED Framebuffer memory used (in MiB).
# TYPE DCGM_FI_DEV_FB_USED gauge
DCGM_FI_DEV_FB_USED{gpu=\"1\",UUID=\"GPU-b\",pci_bus_id=\"00000000:08:00.0\",device=\"nvidia1\",modelName=\"NVIDIA H100 80GB HBM3\",Hostname=\"h100-0\",DCGM_FI_DRIVER_VERSION=\"550.54.15\",container=\"engine\",namespace=\"team\",pod=\"chat-0\"} 8155
";
        assert_eq!(page, want);
    }
}
