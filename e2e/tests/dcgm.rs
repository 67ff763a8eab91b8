//! The operator's DCGM GPU telemetry source end to end: GPU nodes as the
//! NVIDIA GPU Operator leaves them (the device plugin's allocations in the
//! kubelet's PodResources API, the container toolkit's NVML), a
//! dcgm-exporter per GPU node (the test-only stand-in
//! `strata-e2e-dcgm-exporter`: NVML through nvml-wrapper over the node's
//! fake GPUs, pods from PodResources, dcgm-exporter's exact page), a real
//! Prometheus scraping them as a ServiceMonitor would (target labels
//! `namespace`, `pod` and `container` of the exporter's own pod, without
//! `honor_labels`, so the exporter's `pod`/`namespace`/`container` become
//! `exported_*`), and the operator installed from its chart with
//! `gpuTelemetry.source=dcgm` pointed at that Prometheus.
//!
//! A Model from images (the simulator's engine, which publishes its load
//! on the GPU the device plugin gave it; the sidecar without NVML) runs
//! under load: its `status.energy.energyJoules` grows by the fake NVML
//! counters' deltas of the GPUs its pods hold (within 1 %), its
//! `powerWatts` stays within the fake GPUs' range, its pool counts the same
//! joules, and `strata_telemetry_errors_total{source="dcgm"}` stays 0.
//!
//! Needs the images (`scripts/images --profile dev --no-verify
//! strata-operator strata-sidecar strata-engine-sim`, `STRATA_IMAGE_LAYOUT`)
//! and Prometheus (`STRATA_PROMETHEUS_BIN`, from e2e/tools/prometheus.sh);
//! scripts/test provides both.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{ListParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};
use strata_crds::{GPUPool, Model};
use strata_e2e::fake_nvml::{self, FakeGpuConfig};
use strata_e2e::harness::{
    Leader, World, chart_world, ensure_sample_pool, free_port, model_image_profile, prometheus_bin,
    sim_engine_gpu_injection, sim_image_model, test_namespace, wait_for, world,
};
use strata_e2e::process::Component;
use strata_e2e::wait;
use strata_operator::controller::prometheus;

/// The runner profile of the operator's pods (the chart's `podLabels`).
const OPERATOR: &str = "dcgm-operator";
/// The runner profile of the model pods (the chart's `modelPodLabels`).
const PROFILE: &str = "replica-on-gpu-node";
/// The fake GPUs' power at idle and at full load.
const IDLE_W: f64 = 70.0;
const TDP_W: f64 = 700.0;
/// How long the Model is under load.
const LOAD: Duration = Duration::from_secs(30);
const TIMEOUT: Duration = Duration::from_secs(180);
/// How old a GPU reading can be when the operator gets it: the exporter's
/// collection interval (200 ms), Prometheus's scrape interval (1 s) and
/// some slack.
const LAG: Duration = Duration::from_secs(2);
/// The namespace and pods of the GPU Operator's dcgm-exporter.
const EXPORTER_NAMESPACE: &str = "gpu-operator";
const EXPORTER_CONTAINER: &str = "nvidia-dcgm-exporter";
/// Where Prometheus listens: a loopback address of its own, as a Service
/// elsewhere in the cluster (the pod runner turns `127.0.0.1` in a
/// container's arguments into the pod's own IP, as a pod's localhost).
const PROMETHEUS_IP: &str = "127.0.9.1";

/// Pods from images. The engine asks for a GPU: the device plugin gives it
/// one, the toolkit mounts NVML and the node's GPU state, and the
/// simulator publishes its load there; the sidecar gets nothing (it asks
/// for no GPU and does not meter).
fn the_world() -> &'static World {
    world(env!("CARGO_BIN_EXE_strata-cluster"), || {
        let engine = sim_engine_gpu_injection(&[
            "--max-batch",
            "4",
            "--itl-ms",
            "10",
            "--max-tokens-default",
            "32",
        ]);
        let (idle, tdp) = (IDLE_W.to_string(), TDP_W.to_string());
        chart_world(
            OPERATOR,
            [(
                PROFILE.to_string(),
                model_image_profile(engine, Default::default()),
            )],
            &[
                (fake_nvml::ENV_IDLE_WATTS, &idle),
                (fake_nvml::ENV_TDP_WATTS, &tdp),
            ],
        )
    })
}

/// A simulated GPU node, as its exporter sees it.
struct GpuNode {
    name: String,
    /// NVML's product name (GPU feature discovery's label with spaces).
    product: String,
    memory_mib: u64,
    uuids: Vec<String>,
    /// Its per-device GPU state (the fake NVML's `STRATA_FAKE_NVML_GPU_DIR`).
    gpus: PathBuf,
    /// Its kubelet's PodResources socket.
    socket: PathBuf,
}

async fn gpu_nodes(w: &World, client: &kube::Client) -> Vec<GpuNode> {
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default().labels("nvidia.com/gpu.present=true"))
        .await
        .expect("nodes");
    nodes
        .items
        .iter()
        .map(|n| {
            let name = n.name_any();
            let count = strata_e2e::devices::node_capacity(n)
                .get("nvidia.com/gpu")
                .copied()
                .unwrap_or(0);
            let label = |k: &str| n.labels().get(k).cloned().unwrap_or_default();
            let dir = w.info.log_dir.join("nodes").join(&name);
            GpuNode {
                product: label("nvidia.com/gpu.product").replace('-', " "),
                memory_mib: label("nvidia.com/gpu.memory").parse().unwrap_or(81559),
                uuids: (0..count)
                    .map(|i| strata_e2e::devices::device_id(&name, "nvidia.com/gpu", i))
                    .collect(),
                gpus: dir.join(strata_e2e::devices::GPU_DIR),
                socket: dir.join(strata_e2e::devices::SOCKET),
                name,
            }
        })
        .collect()
}

/// A node's dcgm-exporter stand-in (killed when dropped).
struct Exporter {
    node: String,
    addr: SocketAddr,
    _process: Component,
}

/// Starts the exporter of `node`: NVML over all the node's GPUs (the GPU
/// Operator's `NVIDIA_VISIBLE_DEVICES=all`), collected every 200 ms.
fn start_exporter(node: &GpuNode, log_dir: &Path) -> Exporter {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let env = FakeGpuConfig::new()
        .devices(node.uuids.clone())
        .gpu_dir(&node.gpus)
        .name(node.product.clone())
        .memory_total_mib(node.memory_mib)
        .idle_watts(IDLE_W)
        .tdp_watts(TDP_W)
        .visible_devices("all")
        .env();
    let args = vec![
        format!("--listen={addr}"),
        format!("--node={}", node.name),
        format!("--pod-resources-socket={}", node.socket.display()),
        "--collect-interval-ms=200".to_string(),
    ];
    let process = Component::spawn(
        &format!("dcgm-exporter-{}", node.name),
        Path::new(env!("CARGO_BIN_EXE_strata-e2e-dcgm-exporter")),
        &args,
        &env,
        log_dir,
    )
    .expect("start the dcgm-exporter stand-in");
    Exporter {
        node: node.name.clone(),
        addr,
        _process: process,
    }
}

/// Prometheus scraping every exporter each second, with the target labels
/// a ServiceMonitor of the GPU Operator's exporter gives (its own pod's
/// namespace, pod and container) and without honor_labels.
fn start_prometheus(dir: &Path, exporters: &[Exporter]) -> (String, Component) {
    let mut targets = String::new();
    for e in exporters {
        targets.push_str(&format!(
            "      - targets: [\"{}\"]\n        labels: {{namespace: \"{EXPORTER_NAMESPACE}\", pod: \"nvidia-dcgm-exporter-{}\", container: \"{EXPORTER_CONTAINER}\"}}\n",
            e.addr, e.node
        ));
    }
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: nvidia-dcgm-exporter\n    honor_labels: false\n    static_configs:\n{targets}"
    );
    let file = dir.join("prometheus.yml");
    std::fs::write(&file, config).expect("prometheus.yml");
    let port = free_port();
    let args = vec![
        format!("--config.file={}", file.display()),
        format!("--storage.tsdb.path={}", dir.join("data").display()),
        format!("--web.listen-address={PROMETHEUS_IP}:{port}"),
        "--log.level=warn".to_string(),
    ];
    let process = Component::spawn("prometheus", &prometheus_bin(), &args, &[], dir)
        .expect("start prometheus");
    (format!("http://{PROMETHEUS_IP}:{port}"), process)
}

/// An instant query's JSON answer.
async fn query(url: &str, promql: &str) -> Value {
    let uri = prometheus::query_uri(url, promql).expect("query URI");
    let (status, body) = prometheus::fetch(uri, "test query", 16 << 20, Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("{promql}: {e}"));
    assert!(
        status.is_success(),
        "{promql}: HTTP {status}: {}",
        String::from_utf8_lossy(&body)
    );
    serde_json::from_slice(&body).expect("JSON")
}

/// The series of an instant vector answer.
fn series(answer: &Value) -> Vec<Value> {
    answer["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// A GPU's fake NVML energy counter now, in joules: the saved counter plus
/// the power of the saved load since the saved sample (the library
/// integrates exactly so between samples).
fn counter_now(gpus: &Path, uuid: &str) -> f64 {
    fake_nvml::read_device_energy(gpus, uuid)
        .unwrap_or_else(|| panic!("{uuid}'s energy counter in {}", gpus.display()))
        .joules_at(fake_nvml::now_ns(), IDLE_W, TDP_W)
}

/// A GPU a replica holds.
#[derive(Debug, Clone)]
struct Held {
    node: String,
    pod: String,
    gpus: PathBuf,
}

/// The GPUs the Model's pods hold, by UUID, from their nodes' kubelets.
async fn held_gpus(nodes: &[GpuNode], ns: &str, pods: &[Pod]) -> BTreeMap<String, Held> {
    let mut out = BTreeMap::new();
    for p in pods {
        let node_name = p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .expect("bound");
        let node = nodes
            .iter()
            .find(|n| n.name == node_name)
            .unwrap_or_else(|| panic!("{} is on {node_name}, not a GPU node", p.name_any()));
        let mut client = strata_podresources::Client::connect(&node.socket, Duration::from_secs(5))
            .await
            .expect("the node's PodResources socket");
        let list = client.list().await.expect("List");
        let holders =
            strata_podresources::device_holders(&list, strata_podresources::is_nvidia_gpu);
        for (uuid, h) in holders {
            if h.namespace == ns && h.pod == p.name_any() {
                assert_eq!(h.container, "engine", "the engine container holds the GPU");
                out.insert(
                    uuid,
                    Held {
                        node: node.name.clone(),
                        pod: h.pod,
                        gpus: node.gpus.clone(),
                    },
                );
            }
        }
    }
    out
}

async fn ready_pods(pods: &Api<Pod>) -> Vec<Pod> {
    strata_e2e::harness::ready_model_pods(pods, "chat").await
}

fn pod_ip(p: &Pod) -> String {
    p.status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .expect("pod IP")
}

/// Streams chat requests at the replicas through their sidecars until
/// `stop`; each worker ends after its request in flight.
fn start_load(ips: Vec<String>, stop: Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<()>> {
    (0..6usize)
        .map(|w| {
            let (ips, stop) = (ips.clone(), stop.clone());
            tokio::spawn(async move {
                let http: Client<HttpConnector, Full<Bytes>> =
                    Client::builder(TokioExecutor::new()).build(HttpConnector::new());
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    let ip = &ips[i % ips.len()];
                    i += 1;
                    let body = json!({"model": "chat", "stream": true, "max_tokens": 64,
                    "messages": [{"role": "user", "content": "x".repeat(200)}]});
                    let req = http::Request::post(format!("http://{ip}:8080/v1/chat/completions"))
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(body.to_string())))
                        .expect("request");
                    if let Ok(Ok(resp)) =
                        tokio::time::timeout(Duration::from_secs(20), http.request(req)).await
                    {
                        let mut s = resp.into_body().into_data_stream();
                        while s.next().await.is_some() {}
                    }
                }
            })
        })
        .collect()
}

/// Waits until the held GPUs are idle (the engines' load files read 0), so
/// that a reading is not taken in the middle of a request; returns when.
async fn gpus_idle(held: &BTreeMap<String, Held>) -> SystemTime {
    let held = held.clone();
    wait::poll_until(
        "the Model's GPUs idle",
        Duration::from_secs(30),
        Duration::from_millis(50),
        move || {
            let idle = held.iter().all(|(uuid, h)| {
                std::fs::read_to_string(h.gpus.join(uuid).join("load"))
                    .ok()
                    .and_then(|t| t.trim().parse::<f64>().ok())
                    .is_some_and(|u| u == 0.0)
            });
            async move { Ok(idle) }
        },
    )
    .await
    .expect("idle GPUs");
    SystemTime::now()
}

fn energy(m: &Model) -> strata_crds::model::EnergyStatus {
    m.status
        .as_ref()
        .and_then(|s| s.energy.clone())
        .unwrap_or_default()
}

/// Waits for a new energy status covering every held GPU, from a round
/// that started at least `LAG` after `idle` (so that the counters it read
/// through the exporter and Prometheus were sampled while the GPUs were
/// idle), then reads the fake counters at once: the Model's joules, the
/// counters the operator read (by UUID, from status) and the truth now (by
/// UUID). What remains between the two is the idle power over the
/// readings' lag.
async fn energy_reading(
    models: &Api<Model>,
    held: &BTreeMap<String, Held>,
    idle: SystemTime,
) -> (f64, BTreeMap<String, f64>, BTreeMap<String, f64>) {
    let before = energy(&models.get("chat").await.expect("model"));
    // observedAt has whole seconds: one more for the truncation.
    let not_before = idle
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
        + LAG.as_secs_f64()
        + 1.0;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let e = energy(&models.get("chat").await.expect("model"));
        let late_enough = e
            .observed_at
            .as_ref()
            .is_some_and(|t| t.0.as_second() as f64 >= not_before);
        let read: BTreeMap<String, f64> = e
            .counters
            .iter()
            .flat_map(|c| c.gpu_joules.iter().map(|(u, j)| (u.clone(), *j)))
            .collect();
        let covers = held.iter().all(|(uuid, h)| {
            e.counters
                .iter()
                .any(|c| c.pod == h.pod && c.gpu_joules.contains_key(uuid))
        });
        if covers && late_enough && e.counters != before.counters {
            let truth = held
                .iter()
                .map(|(uuid, h)| (uuid.clone(), counter_now(&h.gpus, uuid)))
                .collect();
            return (e.energy_joules.unwrap_or(0.0), read, truth);
        }
        assert!(
            Instant::now() < deadline,
            "no new energy status covering {held:?}: {e:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The operator's `strata_telemetry_errors_total{source="dcgm"}` (absent: 0).
async fn dcgm_errors(leader: &Leader) -> f64 {
    let m = strata_e2e::http::get(leader.metrics_addr(), "/metrics", Duration::from_secs(5))
        .await
        .expect("the operator's metrics");
    m.body
        .lines()
        .find(|l| l.starts_with("strata_telemetry_errors_total{source=\"dcgm\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dcgm_exporter_through_prometheus_meters_the_models_gpus() {
    let started = Instant::now();
    let w = the_world();
    let client = w.client().await;
    let nodes = gpu_nodes(w, &client).await;
    assert!(!nodes.is_empty(), "the world has GPU nodes");
    let total_gpus: usize = nodes.iter().map(|n| n.uuids.len()).sum();

    // dcgm-exporter on every GPU node, and Prometheus scraping them.
    let log_dir = w.info.log_dir.join("dcgm");
    let exporters: Vec<Exporter> = nodes.iter().map(|n| start_exporter(n, &log_dir)).collect();
    let prom_dir = tempfile::tempdir().expect("tempdir");
    let (prom_url, _prometheus) = start_prometheus(prom_dir.path(), &exporters);
    let url = prom_url.clone();
    wait::poll_until(
        "Prometheus to have every GPU's energy counter from the exporters",
        Duration::from_secs(60),
        Duration::from_millis(250),
        move || {
            let url = url.clone();
            async move {
                let n =
                    prometheus::query(&url, "count", "count(DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION)")
                        .await;
                Ok(matches!(n, Ok(Some(n)) if n == total_gpus as f64))
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e} (logs in {})", log_dir.display()));

    // dcgm-exporter's page: its names, types and help, every GPU of the
    // node, its identity labels; no pod labels while nothing holds a GPU.
    let h100 = exporters
        .iter()
        .zip(&nodes)
        .find(|(_, n)| n.product == "NVIDIA H100 80GB HBM3")
        .expect("an H100 node");
    let page = strata_e2e::http::get(h100.0.addr, "/metrics", Duration::from_secs(5))
        .await
        .expect("the exporter's page")
        .body;
    for (name, kind, help) in [
        ("DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W)."),
        (
            "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
            "counter",
            "Total energy consumption since boot (in mJ).",
        ),
        ("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %)."),
        (
            "DCGM_FI_DEV_FB_USED",
            "gauge",
            "Framebuffer memory used (in MiB).",
        ),
    ] {
        assert!(
            page.contains(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n")),
            "{page}"
        );
        let lines: Vec<&str> = page
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .collect();
        assert_eq!(lines.len(), h100.1.uuids.len(), "{page}");
        for (i, uuid) in h100.1.uuids.iter().enumerate() {
            let head = format!(
                "{name}{{gpu=\"{i}\",UUID=\"{uuid}\",pci_bus_id=\"00000000:{:02X}:00.0\",device=\"nvidia{i}\",modelName=\"NVIDIA H100 80GB HBM3\",Hostname=\"{}\",DCGM_FI_DRIVER_VERSION=\"550.54.15\"}} ",
                0x07 + i,
                h100.1.name
            );
            assert!(lines.iter().any(|l| l.starts_with(&head)), "{head}\n{page}");
        }
    }
    assert!(
        page.lines()
            .any(|l| l.starts_with("DCGM_FI_DEV_POWER_USAGE{") && l.ends_with(" 70.000000")),
        "idle GPUs draw the fake's idle power, printed as dcgm-exporter's %f: {page}"
    );
    assert!(!page.contains("pod=\""), "no GPU is held yet: {page}");

    // The operator from its chart, reading GPUs from that Prometheus (no
    // node agent).
    let url_value = format!("gpuTelemetry.dcgmPrometheusUrl={prom_url}");
    let leader = w
        .install_operator(
            OPERATOR,
            PROFILE,
            &[
                "gpuTelemetry.source=dcgm",
                &url_value,
                // DCGM instead of the node agent: none is needed.
                "nodeAgent.enabled=false",
                "energyIntervalSeconds=2",
            ],
        )
        .await
        .unwrap_or_else(|e| panic!("the operator in-cluster: {e}"));

    let pools: Api<GPUPool> = Api::all(client.clone());
    ensure_sample_pool(&client, "samples/gpupool-h100.yaml")
        .await
        .expect("pool");
    let ns = test_namespace(&client, "dcgm").await.expect("namespace");
    let models: Api<Model> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let mut model = sim_image_model("chat", 2, 2).expect("model");
    model.spec.replicas = Some(2);
    models
        .create(&PostParams::default(), &model)
        .await
        .expect("model");
    wait_for(models.clone(), "chat", TIMEOUT, |m: Option<&Model>| {
        m.and_then(|m| m.status.as_ref())
            .is_some_and(|s| s.ready_replicas == 2)
    })
    .await
    .expect("two ready replicas");
    let replicas = ready_pods(&pods).await;
    assert_eq!(replicas.len(), 2);
    let held = held_gpus(&nodes, &ns, &replicas).await;
    assert_eq!(held.len(), 2, "one GPU per replica: {held:?}");

    // The exporters label the held GPUs with their pods; Prometheus moves
    // those labels to exported_* under its own target labels.
    for (uuid, h) in &held {
        let exporter = exporters
            .iter()
            .find(|e| e.node == h.node)
            .expect("the node's exporter");
        let (addr, attribution) = (
            exporter.addr,
            format!("UUID=\"{uuid}\",pci_bus_id=\"00000000:"),
        );
        let labels = format!(
            ",container=\"engine\",namespace=\"{ns}\",pod=\"{}\"}} ",
            h.pod
        );
        wait::poll_until(
            "the exporter to label the held GPU with its pod",
            Duration::from_secs(30),
            Duration::from_millis(100),
            || {
                let (attribution, labels) = (attribution.clone(), labels.clone());
                async move {
                    let page = strata_e2e::http::get(addr, "/metrics", Duration::from_secs(5))
                        .await
                        .map(|r| r.body)
                        .unwrap_or_default();
                    Ok(page
                        .lines()
                        .filter(|l| l.contains(&attribution) && l.starts_with("DCGM_FI_DEV_"))
                        .filter(|l| l.contains(&labels))
                        .count()
                        == 4)
                }
            },
        )
        .await
        .expect("pod labels on the held GPU's four series");
        let promql = format!(
            "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{exported_pod=\"{}\"}}",
            h.pod
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        let found = loop {
            let s = series(&query(&prom_url, &promql).await);
            if !s.is_empty() {
                break s;
            }
            assert!(Instant::now() < deadline, "{promql}: no series");
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        assert_eq!(found.len(), 1, "{found:?}");
        let m = &found[0]["metric"];
        assert_eq!(m["UUID"], json!(uuid), "{m}");
        assert_eq!(m["exported_namespace"], json!(ns), "{m}");
        assert_eq!(m["exported_container"], json!("engine"), "{m}");
        assert_eq!(m["namespace"], json!(EXPORTER_NAMESPACE), "{m}");
        assert_eq!(
            m["pod"],
            json!(format!("nvidia-dcgm-exporter-{}", h.node)),
            "{m}"
        );
        assert_eq!(m["container"], json!(EXPORTER_CONTAINER), "{m}");
    }
    assert_eq!(dcgm_errors(&leader).await, 0.0, "no DCGM read failed");

    // A baseline at idle covering both replicas, then load for a measured time.
    let idle = gpus_idle(&held).await;
    let (j0, read0, c0) = energy_reading(&models, &held, idle).await;
    for (uuid, truth) in &c0 {
        // The operator's counter is the GPU's own, a scrape or so old.
        let read = read0.get(uuid).copied().unwrap_or(f64::NAN);
        assert!(
            read <= truth + 0.01 && read >= truth - 3.0 * TDP_W,
            "{uuid}: the operator read {read} J, the GPU's counter is {truth} J"
        );
    }
    let ips: Vec<String> = replicas.iter().map(pod_ip).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let workers = start_load(ips, stop.clone());
    let load_start = Instant::now();
    let (mut max_watts, mut max_util, mut observations) = (0.0f64, 0.0f64, 0usize);
    let n = held.len() as f64;
    while load_start.elapsed() < LOAD {
        let e = energy(&models.get("chat").await.expect("model"));
        if let Some(p) = e.power_watts {
            assert!(
                p >= n * IDLE_W - 0.1 && p <= n * TDP_W + 0.1,
                "the Model's {p} W is outside its {n} fake GPUs' range [{}, {}]",
                n * IDLE_W,
                n * TDP_W
            );
            max_watts = max_watts.max(p);
            observations += 1;
        }
        if let Some(u) = e.gpu_utilization {
            assert!((0.0..=1.0).contains(&u), "utilization {u}");
            max_util = max_util.max(u);
        }
        assert_eq!(
            dcgm_errors(&leader).await,
            0.0,
            "no DCGM read failed under load"
        );
        // The next observation (the operator writes every 2 s).
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    stop.store(true, Ordering::Relaxed);
    tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(workers))
        .await
        .expect("the load's last requests end");
    assert!(observations >= 10, "power observed under load");
    assert!(
        max_watts > n * IDLE_W + 100.0,
        "the load shows in the Model's power: at most {max_watts} W"
    );
    assert!(
        max_util > 0.5,
        "the load shows in the Model's GPU utilization: {max_util}"
    );
    let idle = gpus_idle(&held).await;
    let (j1, read1, c1) = energy_reading(&models, &held, idle).await;
    for (uuid, truth) in &c1 {
        let read = read1.get(uuid).copied().unwrap_or(f64::NAN);
        assert!(
            read <= truth + 0.01 && read >= truth - 3.0 * TDP_W,
            "{uuid}: the operator read {read} J, the GPU's counter is {truth} J"
        );
    }
    let counted = j1 - j0;
    let truth: f64 = c1
        .iter()
        .map(|(u, v)| v - c0.get(u).copied().unwrap_or(*v))
        .sum();
    assert!(
        truth > n * IDLE_W * LOAD.as_secs_f64() * 2.0,
        "the GPUs worked: their counters rose {truth:.1} J"
    );
    let error = (counted - truth) / truth;
    eprintln!(
        "dcgm energy: the Model counted {counted:.1} J, the fake NVML counters of its GPUs rose {truth:.1} J (ratio {:.5}, {:+.3} %); peak {max_watts:.1} W, utilization {max_util:.3}",
        counted / truth,
        error * 100.0
    );
    assert!(
        error.abs() <= 0.01,
        "the Model's joules {counted:.1} vs the counters' deltas {truth:.1} ({:.2} %)",
        error * 100.0
    );

    // The pool counts everything placed on it: the same joules (written
    // after the Model in each round: a consistent pair is waited for).
    let (p_models, p_pools) = (models.clone(), pools.clone());
    let pair = Arc::new(std::sync::Mutex::new((0.0, 0.0, None)));
    let seen = pair.clone();
    wait::poll_until(
        "the pool's joules to equal the Model's",
        Duration::from_secs(30),
        Duration::from_millis(100),
        move || {
            let (models, pools, seen) = (p_models.clone(), p_pools.clone(), seen.clone());
            async move {
                let pool = pools.get("h100").await?;
                let model = energy(&models.get("chat").await?)
                    .energy_joules
                    .unwrap_or(0.0);
                let s = pool.status.unwrap_or_default();
                let joules = s.energy_joules.unwrap_or(0.0);
                if let Ok(mut p) = seen.lock() {
                    *p = (model, joules, s.power_watts);
                }
                Ok(model > 0.0 && (joules - model).abs() <= model * 1e-6 + 1e-3)
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}", pair.lock().map(|p| *p)));
    let (model_j, pool_j, pool_w) = pair.lock().map(|p| *p).expect("pair");
    assert!(
        pool_w.is_some_and(|w| w >= n * IDLE_W - 0.1 && w <= n * TDP_W + 0.1),
        "the pool's power {pool_w:?} W within its {n} GPUs' range"
    );
    assert!(
        pool_j >= j1,
        "the pool's joules {pool_j} grew with the Model's {model_j}"
    );
    assert_eq!(dcgm_errors(&leader).await, 0.0, "no DCGM read failed");
    eprintln!(
        "dcgm: pool h100 {pool_j:.1} J = Model {model_j:.1} J; test took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
