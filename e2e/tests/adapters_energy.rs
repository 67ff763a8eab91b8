//! Live LoRA adapters and energy accounting in the local world. Two
//! adapters on a two-replica Model are served through the sidecars; a
//! third replica receives both; a deleted adapter is unloaded everywhere
//! while the other is still served. Under load the GPUs' energy counters
//! rise and the Model's joules equal the sum of the counters' deltas within
//! 1 %, across a sidecar restart, an engine restart, a change of operator
//! leader, a node-agent restart and a driver reload (the counters reset).
//!
//! What runs where, as on a GPU node: the operator is installed with its
//! chart and runs in-cluster (two replicas from its image, leader election;
//! its "restart" deletes the leader's pod); the chart's `strata-node-agent`
//! DaemonSet runs on each GPU node from its image and meters every GPU of
//! the node (NVML: the fake library, which the toolkit stand-in mounts
//! because the agent asks for `NVIDIA_VISIBLE_DEVICES=all`) attributed to
//! pods through the node's kubelet PodResources API; the operator reads the
//! agents (`--gpu-telemetry=node-agent`). Each replica runs from the engine
//! simulator's image (which requests the GPU: the device plugin stand-in
//! gives it one, and it publishes its load on it) and the product's sidecar
//! image (which requests none and sees none; it gets short intervals and
//! `HF_ENDPOINT` pointing at a fake Hugging Face hub that runs in this test
//! binary on 127.0.0.1). The truth is the GPUs' own state on their node
//! (`<logs>/nodes/<node>/gpus/<uuid>/energy`), for the GPUs the node's
//! PodResources API says each replica holds. Container crashes are
//! SIGKILLs of the containers' processes.
//!
//! Needs the images: `scripts/images --profile dev strata-operator
//! strata-sidecar strata-node-agent strata-engine-sim` (scripts/test builds
//! them first).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use strata_core::view::pod_ready;
use strata_crds::{Adapter, GPUPool, Model};
use strata_e2e::fake_nvml;
use strata_e2e::harness::{
    OPERATOR_NAMESPACE, World, chart_world, engine_sim_image, ensure_sample_pool,
    model_image_profile, operator_leader, repo_yaml, sidecar_fast_injection,
    sim_engine_gpu_injection, test_namespace, wait_for, world,
};

/// The runner profile of the operator's pods (the chart's `podLabels`).
const OPERATOR: &str = "adapters-operator";
/// The runner profile of the model pods (the chart's `modelPodLabels`).
const PROFILE: &str = "replica-with-gpu";
const IDLE_W: f64 = 70.0;
const TDP_W: f64 = 700.0;

/// The bearer token the fake hub accepts (kept in the sql Adapter's Secret).
const HUB_TOKEN: &str = "hf_e2e_token";

/// A fake Hugging Face hub on loopback (its own thread and runtime, for the
/// whole test binary): the sql adapter's files need the token.
fn fake_hub() -> SocketAddr {
    static HUB: std::sync::OnceLock<SocketAddr> = std::sync::OnceLock::new();
    *HUB.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let app = axum::Router::new().route(
                    "/strata-test/sql-lora/resolve/main/{file}",
                    axum::routing::get(
                        |axum::extract::Path(file): axum::extract::Path<String>,
                         headers: axum::http::HeaderMap| async move {
                            let ok = headers.get("authorization").and_then(|v| v.to_str().ok())
                                == Some(&format!("Bearer {HUB_TOKEN}"));
                            match (ok, file.as_str()) {
                                (false, _) => (
                                    axum::http::StatusCode::UNAUTHORIZED,
                                    "Invalid credentials".to_string(),
                                ),
                                (true, "adapter_config.json") => {
                                    (axum::http::StatusCode::OK, "{\"r\": 8}".to_string())
                                }
                                (true, "adapter_model.safetensors") => {
                                    (axum::http::StatusCode::OK, "WEIGHTS".to_string())
                                }
                                (true, _) => (axum::http::StatusCode::NOT_FOUND, String::new()),
                            }
                        },
                    ),
                );
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                let _ = tx.send(listener.local_addr().expect("addr"));
                let _ = axum::serve(listener, app).await;
            });
        });
        rx.recv().expect("the fake hub's address")
    })
}

/// The operator's pods and the node agents from their images; replicas
/// from the simulator's image (its knobs after the operator's arguments,
/// which they override; its load published on the GPU it holds) and the
/// sidecar's (short intervals, the fake hub; no GPU: it requests none);
/// GPU nodes with the NVIDIA toolkit stand-in (the fake NVML library at
/// the test's idle and peak power, into the engine's container and the
/// node agent's); containers restart in place, as a kubelet restarts them.
fn the_world() -> &'static World {
    let hub = fake_hub();
    world(env!("CARGO_BIN_EXE_strata-cluster"), move || {
        let engine = sim_engine_gpu_injection(&[
            "--max-batch",
            "4",
            "--itl-ms",
            "10",
            "--max-tokens-default",
            "32",
            // Fewer than the Model's adapters.maxPerReplica (4, which the
            // operator passes as --max-loras): a third adapter is refused
            // by the engine.
            "--max-loras",
            "2",
        ]);
        let mut sidecar = sidecar_fast_injection();
        sidecar
            .env
            .insert("HF_ENDPOINT".to_string(), format!("http://{hub}"));
        let (idle, tdp) = (IDLE_W.to_string(), TDP_W.to_string());
        chart_world(
            OPERATOR,
            [(PROFILE.to_string(), model_image_profile(engine, sidecar))],
            &[
                (fake_nvml::ENV_IDLE_WATTS, idle.as_str()),
                (fake_nvml::ENV_TDP_WATTS, tdp.as_str()),
            ],
        )
    })
}

/// The pid of a pod's container (the runner's pid file), if it runs.
fn process_pid(w: &World, ns: &str, pod: &str, process: &str) -> Option<i32> {
    std::fs::read_to_string(pod_dir(w, ns, pod).join(format!("{process}.pid")))
        .ok()
        .and_then(|p| p.trim().parse().ok())
}

/// SIGKILLs a pod's process (a container crash); returns its pid.
fn kill_process(w: &World, ns: &str, pod: &str, process: &str) -> i32 {
    let pid = process_pid(w, ns, pod, process).expect("pid file");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    pid
}

/// The pod's directory the runner keeps (pid files, volumes).
fn pod_dir(w: &World, ns: &str, pod: &str) -> PathBuf {
    w.info.log_dir.join("pods").join(format!("{ns}_{pod}.d"))
}

/// The GPUs a pod holds, as its node's kubelet says (PodResources `List`
/// on the node's socket): each GPU's state directory on the node (the fake
/// NVML library's per-device load and energy: the "hardware").
async fn pod_gpus(w: &World, client: &kube::Client, ns: &str, pod: &str) -> Vec<PathBuf> {
    let node = Api::<Pod>::namespaced(client.clone(), ns)
        .get(pod)
        .await
        .expect("pod")
        .spec
        .and_then(|s| s.node_name)
        .expect("bound");
    let node_dir = w.info.log_dir.join("nodes").join(&node);
    let mut api = strata_podresources::Client::connect(
        &node_dir.join(strata_e2e::devices::SOCKET),
        Duration::from_secs(5),
    )
    .await
    .expect("the node's PodResources socket");
    let list = api.list().await.expect("List");
    strata_podresources::device_holders(&list, strata_podresources::is_nvidia_gpu)
        .into_iter()
        .filter(|(_, h)| h.namespace == ns && h.pod == pod)
        .map(|(uuid, _)| node_dir.join(strata_e2e::devices::GPU_DIR).join(uuid))
        .collect()
}

/// The GPU's UUID (its directory's name).
fn uuid_of(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A GPU's energy counter at `now_ns`, in joules, from its state: the
/// saved counter plus the power of the saved load since the saved sample
/// (the fake integrates exactly so between samples).
fn counter_at(gpu: &Path, now_ns: i64) -> Option<f64> {
    let dir = gpu.parent()?;
    fake_nvml::read_device_energy(dir, &uuid_of(gpu)).map(|e| e.joules_at(now_ns, IDLE_W, TDP_W))
}

/// The counters of `gpus` at `now_ns`, by UUID.
fn counters_at(gpus: &[PathBuf], now_ns: i64) -> BTreeMap<String, f64> {
    gpus.iter()
        .filter_map(|g| Some((uuid_of(g), counter_at(g, now_ns)?)))
        .collect()
}

/// A driver reload on the GPUs' node: their energy counters start again
/// from 0 (the fake library's state rewritten under its lock, as the
/// hardware's counter would be). Returns the counters just before.
fn reset_counters(gpus: &[PathBuf]) -> BTreeMap<String, f64> {
    use std::os::fd::AsRawFd;
    let mut before = BTreeMap::new();
    for g in gpus {
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(g.join("lock"))
            .expect("the GPU's lock");
        #[allow(deprecated)]
        nix::fcntl::flock(lock.as_raw_fd(), nix::fcntl::FlockArg::LockExclusive).expect("flock");
        let t = fake_nvml::now_ns();
        let util = std::fs::read_to_string(g.join("energy"))
            .ok()
            .and_then(|s| s.split_whitespace().nth(2).map(str::to_string))
            .unwrap_or_else(|| "0".into());
        before.insert(uuid_of(g), counter_at(g, t).unwrap_or(0.0));
        std::fs::write(g.join("energy"), format!("0 {t} {util}\n")).expect("reset");
        drop(lock);
    }
    before
}

async fn chat(ip: &str, model: &str) -> (u16, String) {
    let http: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let body = json!({"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8});
    let req = http::Request::post(format!("http://{ip}:8080/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    match tokio::time::timeout(Duration::from_secs(20), http.request(req)).await {
        Ok(Ok(resp)) => {
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                .unwrap_or_default();
            (status, body)
        }
        other => (0, format!("{other:?}")),
    }
}

async fn ready_pods(pods: &Api<Pod>) -> Vec<Pod> {
    strata_e2e::harness::ready_model_pods(pods, "chat").await
}

use strata_e2e::harness::loopback_pod_ip as ip;

fn adapter(name: &str) -> Adapter {
    let mut source = json!({"uri": format!("hf://strata-test/{name}-lora")});
    if name == "sql" {
        // A private repository: the sidecar fetches it with the Secret's token.
        source["credentialsSecretRef"] = json!({"name": "hub-token"});
    }
    serde_json::from_value(json!({
        "apiVersion": "strata.ai/v1alpha1",
        "kind": "Adapter",
        "metadata": {"name": name},
        "spec": {"model": "chat", "source": source},
    }))
    .expect("adapter")
}

async fn adapter_loaded_on(adapters: &Api<Adapter>, name: &str, n: i32) {
    wait_for(
        adapters.clone(),
        name,
        Duration::from_secs(90),
        move |a: Option<&Adapter>| {
            a.and_then(|a| a.status.as_ref()).is_some_and(|s| {
                s.loaded_replicas == n
                    && s.desired_replicas == n
                    && s.phase == strata_crds::adapter::AdapterPhase::Ready
            })
        },
    )
    .await
    .unwrap_or_else(|e| panic!("adapter {name} loaded on {n} replicas: {e}"));
}

/// Streams requests at every ready replica until `stop`.
fn start_load(pods: Api<Pod>, stop: Arc<AtomicBool>) {
    for w in 0..6usize {
        let (pods, stop) = (pods.clone(), stop.clone());
        tokio::spawn(async move {
            let http: Client<HttpConnector, Full<Bytes>> =
                Client::builder(TokioExecutor::new()).build(HttpConnector::new());
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                let targets: Vec<String> = ready_pods(&pods).await.iter().map(ip).collect();
                let Some(ip) = targets.get(i % targets.len().max(1)).cloned() else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                i += 1;
                let model = ["chat", "sql"][i % 2];
                let body = json!({"model": model, "stream": true, "max_tokens": 64,
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
        });
    }
}

/// Waits for the operator to write a new energy status (one that covers
/// `pods`), then reads the fake counters at once: the two are then at most
/// a poll (50 ms) and a sidecar sample (200 ms) apart.
async fn energy_reading(
    models: &Api<Model>,
    gpus: &[PathBuf],
    pods: &[String],
) -> (f64, BTreeMap<String, f64>) {
    let energy = |m: Model| m.status.and_then(|s| s.energy).unwrap_or_default();
    let before = energy(models.get("chat").await.expect("model"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let e = energy(models.get("chat").await.expect("model"));
        let covers = pods.iter().all(|p| {
            e.counters
                .iter()
                .any(|c| &c.pod == p && !c.gpu_joules.is_empty())
        });
        if covers && e.counters != before.counters {
            return (
                e.energy_joules.unwrap_or(0.0),
                counters_at(gpus, fake_nvml::now_ns()),
            );
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no new energy status covering {pods:?}: {e:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every one of the replicas' simulated GPUs has work (its
/// engine's load file reads more than 0): the load has reached them all.
async fn gpus_busy(gpus: &[PathBuf]) {
    gpus_until(gpus, "busy", |load| load > 0.0).await;
}

/// Waits until the replicas' simulated GPUs are idle (the engines' load
/// files read 0), so that a reading is not taken in the middle of a request.
async fn gpus_idle(gpus: &[PathBuf]) {
    gpus_until(gpus, "idle", |load| load == 0.0).await;
}

/// Waits (30 s at most) until every GPU's engine load file reads a load
/// that `wanted` accepts.
async fn gpus_until(gpus: &[PathBuf], what: &str, wanted: impl Fn(f64) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let all = gpus.iter().all(|g| {
            std::fs::read_to_string(g.join("load"))
                .ok()
                .and_then(|t| t.trim().parse::<f64>().ok())
                .is_some_and(&wanted)
        });
        if all {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "GPUs not {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn adapters_follow_replicas_and_energy_matches_the_gpu_counters() {
    let w = the_world();
    let client = w.client().await;
    // The operator in-cluster from its chart, its energy read every 2 s.
    let leader = w
        .install_operator(
            OPERATOR,
            PROFILE,
            &["energyIntervalSeconds=2", "nodeAgent.intervalSeconds=0.2"],
        )
        .await
        .unwrap_or_else(|e| panic!("the operator in-cluster: {e}"));

    let pools: Api<GPUPool> = Api::all(client.clone());
    ensure_sample_pool(&client, "samples/gpupool-h100.yaml")
        .await
        .expect("pool");
    let ns = test_namespace(&client, "lora").await.expect("namespace");
    let models: Api<Model> = Api::namespaced(client.clone(), &ns);
    let adapters: Api<Adapter> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let mut m = repo_yaml("samples/model-llama.yaml").expect("sample");
    m["metadata"] = json!({"name": "chat"});
    let spec = m["spec"].as_object_mut().expect("spec");
    spec.remove("sla");
    spec.insert(
        "source".into(),
        json!({"uri": "hf://meta-llama/Llama-3.1-8B-Instruct"}),
    );
    spec.insert(
        "engine".into(),
        json!({"type": "vLLM", "image": engine_sim_image()}),
    );
    spec.insert("pools".into(), json!([{"name": "h100"}]));
    spec.insert("replicas".into(), json!(2));
    spec.insert("minReplicas".into(), json!(1));
    spec.insert("maxReplicas".into(), json!(4));
    spec.insert("autoscaling".into(), json!({"mode": "Manual"}));
    spec.insert("adapters".into(), json!({"maxPerReplica": 4}));
    let model: Model = serde_json::from_value(m).expect("model");
    models
        .create(&PostParams::default(), &model)
        .await
        .expect("model");

    // Two adapters on a two-replica Model.
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "hub-token"},
        "stringData": {"HF_TOKEN": HUB_TOKEN},
    }))
    .expect("secret");
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &secret)
        .await
        .expect("the hub token Secret");
    for name in ["sql", "poet"] {
        adapters
            .create(&PostParams::default(), &adapter(name))
            .await
            .expect("adapter");
    }
    adapter_loaded_on(&adapters, "sql", 2).await;
    adapter_loaded_on(&adapters, "poet", 2).await;
    let replicas = ready_pods(&pods).await;
    assert_eq!(replicas.len(), 2);
    for p in &replicas {
        for name in ["sql", "poet", "chat"] {
            let (status, body) = chat(&ip(p), name).await;
            assert_eq!(status, 200, "{name} on {}: {body}", p.name_any());
        }
        let labels = p.labels();
        assert_eq!(
            labels.get("adapter.strata.ai/sql").map(String::as_str),
            Some("loaded")
        );
        // The private adapter was fetched by the sidecar with the Secret's
        // token into the pod's shared adapters volume.
        let fetched =
            pod_dir(w, &ns, &p.name_any()).join("volumes/adapters/sql/adapter_model.safetensors");
        assert_eq!(
            std::fs::read_to_string(&fetched).ok().as_deref(),
            Some("WEIGHTS"),
            "{} (the sidecar's log: {})",
            fetched.display(),
            w.info
                .log_dir
                .join("pods")
                .join(format!("{ns}_{}_strata-sidecar.log", p.name_any()))
                .display()
        );
    }
    // A Service per Adapter selects exactly the replicas carrying it.
    let svc = Api::<Service>::namespaced(client.clone(), &ns)
        .get("sql-lora")
        .await
        .expect("the sql Adapter's Service");
    let selector = svc.spec.and_then(|s| s.selector).unwrap_or_default();
    assert_eq!(
        selector.get("adapter.strata.ai/sql").map(String::as_str),
        Some("loaded"),
        "{selector:?}"
    );

    // An engine that refuses a load (its --max-loras is full): the Adapter
    // says so, with the engine's words, and a Warning Event; deleting it
    // leaves the others alone.
    adapters
        .create(&PostParams::default(), &adapter("third"))
        .await
        .expect("adapter");
    wait_for(
        adapters.clone(),
        "third",
        Duration::from_secs(60),
        |a: Option<&Adapter>| {
            a.and_then(|a| a.status.as_ref()).is_some_and(|s| {
                s.phase == strata_crds::adapter::AdapterPhase::Failed
                    && s.loaded_replicas == 0
                    && s.conditions.iter().any(|c| {
                        c.type_ == "Ready"
                            && c.reason == "LoadFailed"
                            && c.message.contains("maximum")
                    })
            })
        },
    )
    .await
    .expect("a refused load: phase Failed, reason LoadFailed, the engine's message");
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await
        .expect("events");
    assert!(
        events.items.iter().any(|e| {
            e.reason.as_deref() == Some("LoadFailed")
                && e.type_.as_deref() == Some("Warning")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("third")
        }),
        "a Warning Event LoadFailed on the Adapter"
    );
    adapters
        .delete("third", &DeleteParams::default())
        .await
        .expect("delete");
    wait_for(
        adapters.clone(),
        "third",
        Duration::from_secs(60),
        |a: Option<&Adapter>| a.is_none(),
    )
    .await
    .expect("an Adapter loaded nowhere goes at once");
    adapter_loaded_on(&adapters, "sql", 2).await;
    adapter_loaded_on(&adapters, "poet", 2).await;

    // Scaling to three replicas gives the new one both adapters.
    models
        .patch(
            "chat",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 3}})),
        )
        .await
        .expect("scale");
    adapter_loaded_on(&adapters, "sql", 3).await;
    adapter_loaded_on(&adapters, "poet", 3).await;
    let replicas = ready_pods(&pods).await;
    assert_eq!(replicas.len(), 3);
    for p in &replicas {
        let (status, body) = chat(&ip(p), "poet").await;
        assert_eq!(status, 200, "poet on {}: {body}", p.name_any());
    }

    // Deleting one adapter unloads it everywhere; the other is still served.
    adapters
        .delete("poet", &DeleteParams::default())
        .await
        .expect("delete");
    wait_for(
        adapters.clone(),
        "poet",
        Duration::from_secs(60),
        |a: Option<&Adapter>| a.is_none(),
    )
    .await
    .expect("the finalizer unloads it and lets it go");
    for p in &ready_pods(&pods).await {
        let (status, body) = chat(&ip(p), "poet").await;
        assert_eq!(status, 404, "poet is gone from {}: {body}", p.name_any());
        assert!(body.contains("poet"), "the 404 names the adapter: {body}");
        assert!(!p.labels().contains_key("adapter.strata.ai/poet"));
        let (status, body) = chat(&ip(p), "sql").await;
        assert_eq!(status, 200, "sql still served on {}: {body}", p.name_any());
    }

    // Energy: a baseline covering the three replicas, then load.
    let names: Vec<String> = ready_pods(&pods)
        .await
        .iter()
        .map(|p| p.name_any())
        .collect();
    let mut gpus = Vec::new();
    for n in &names {
        gpus.extend(pod_gpus(w, &client, &ns, n).await);
    }
    assert_eq!(gpus.len(), 3, "one GPU per replica: {gpus:?}");
    gpus_idle(&gpus).await;
    let (j0, c0) = energy_reading(&models, &gpus, &names).await;
    assert_eq!(c0.len(), 3, "one simulated GPU per replica: {c0:?}");
    let stop = Arc::new(AtomicBool::new(false));
    start_load(pods.clone(), stop.clone());
    tokio::time::sleep(Duration::from_secs(8)).await; // load runs for a measured time
    // A replica restart under load: its sidecar crashes and comes back in place.
    let victim = &names[0];
    kill_process(w, &ns, victim, "strata-sidecar");
    wait_for(
        pods.clone(),
        victim,
        Duration::from_secs(30),
        |p: Option<&Pod>| p.is_some_and(|p| !pod_ready(p)),
    )
    .await
    .expect("the restarted replica is not ready for a moment");
    wait_for(
        pods.clone(),
        victim,
        Duration::from_secs(60),
        |p: Option<&Pod>| p.is_some_and(pod_ready),
    )
    .await
    .expect("the restarted replica is ready again");
    let restarts = pods
        .get(victim)
        .await
        .expect("pod")
        .status
        .and_then(|s| s.container_statuses)
        .unwrap_or_default()
        .iter()
        .find(|c| c.name == "strata-sidecar")
        .map(|c| c.restart_count);
    assert_eq!(
        restarts,
        Some(1),
        "restarted in place, as the kubelet would"
    );
    adapter_loaded_on(&adapters, "sql", 3).await;
    // The engine alone restarts in another replica (the kubelet restarts
    // the container in place): it comes back without its adapters, and the
    // sidecar loads them again; `sql` is served there within 30 s.
    let engine_victim = &names[1];
    let pid = kill_process(w, &ns, engine_victim, "engine");
    let victim_ip = ip(&pods.get(engine_victim).await.expect("pod"));
    let killed = std::time::Instant::now();
    loop {
        let restarted = process_pid(w, &ns, engine_victim, "engine").is_some_and(|p| p != pid);
        if restarted && chat(&victim_ip, "sql").await.0 == 200 {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "sql is served again by {engine_victim} within 30 s of its engine's restart"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let metrics = strata_e2e::http::get_https(
        format!("{victim_ip}:9090").parse().expect("addr"),
        "/metrics",
        Duration::from_secs(5),
    )
    .await
    .expect("sidecar metrics");
    assert!(
        metrics.body.lines().any(|l| l.starts_with(
            "strata_adapter_operations_total{operation=\"reload\",result=\"success\"}"
        )),
        "the sidecar counts the reload"
    );
    // The Adapter says what happened: the replica's reload in status and
    // a Normal Event naming the replica.
    let reloaded_on = engine_victim.clone();
    wait_for(
        adapters.clone(),
        "sql",
        Duration::from_secs(60),
        move |a: Option<&Adapter>| {
            a.and_then(|a| a.status.as_ref()).is_some_and(|s| {
                s.replicas.iter().any(|r| {
                    r.pod == reloaded_on
                        && r.reloads.unwrap_or(0) >= 1
                        && r.last_reload_time.is_some()
                })
            })
        },
    )
    .await
    .expect("the Adapter's status shows the reload on the replica whose engine restarted");
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await
        .expect("events");
    assert!(
        events.items.iter().any(|e| {
            e.reason.as_deref() == Some("Reloaded")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("sql")
                && e.note
                    .as_deref()
                    .is_some_and(|n| n.contains(engine_victim.as_str()))
        }),
        "a Reloaded Event on the Adapter names the replica"
    );
    // The operator restarts too: the leader's pod is deleted; the standby
    // (or the Deployment's new pod) takes the Lease over and continues from
    // status. Load runs while no operator reads it.
    let operator_pods: Api<Pod> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    operator_pods
        .delete(&leader.pod, &DeleteParams::default())
        .await
        .expect("delete the leader's pod");
    let deleted = std::time::Instant::now();
    let successor = operator_leader(&client, Duration::from_secs(90))
        .await
        .unwrap_or_else(|e| panic!("a new leader after {} went: {e}", leader.pod));
    assert_ne!(successor.pod, leader.pod, "the Lease moved to another pod");
    eprintln!(
        "operator: {} took the Lease over from {} {:.1} s after its pod was deleted",
        successor.pod,
        leader.pod,
        deleted.elapsed().as_secs_f64()
    );
    // The node agent of the replicas' node restarts (its DaemonSet pod
    // deleted and recreated): the GPUs' counters go on in the hardware, the
    // agent's own totals start again; nothing is lost or counted twice.
    let agents: Api<Pod> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let node = pods
        .get(&names[0])
        .await
        .expect("pod")
        .spec
        .and_then(|s| s.node_name)
        .expect("bound");
    let on_node = |list: Vec<Pod>| {
        list.into_iter()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.as_str()))
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect::<Vec<_>>()
    };
    let agent_list = |agents: Api<Pod>| async move {
        agents
            .list(&ListParams::default().labels("app.kubernetes.io/name=strata-node-agent"))
            .await
            .expect("agents")
            .items
    };
    let old_agent = on_node(agent_list(agents.clone()).await)
        .first()
        .map(|p| p.name_any())
        .expect("a node agent on the replicas' node");
    agents
        .delete(&old_agent, &DeleteParams::default())
        .await
        .expect("delete the node agent's pod");
    let agent_back = std::time::Instant::now();
    loop {
        let now = on_node(agent_list(agents.clone()).await);
        if now
            .iter()
            .any(|p| p.name_any() != old_agent && pod_ready(p))
        {
            break;
        }
        assert!(
            agent_back.elapsed() < Duration::from_secs(60),
            "the DaemonSet's new agent on {node} is ready within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "node agent: {old_agent} replaced and ready in {:.1} s",
        agent_back.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(4)).await; // load runs on the new agent
    // A driver reload: the node's energy counters start again from 0.
    let before_reset = reset_counters(&gpus);
    tokio::time::sleep(Duration::from_secs(4)).await; // more load after the restarts
    stop.store(true, Ordering::Relaxed);
    gpus_idle(&gpus).await;
    let (j1, c1) = energy_reading(&models, &gpus, &names).await;
    let counted = j1 - j0;
    // What the GPUs used: up to the reset, then since it.
    let truth: f64 = c1
        .iter()
        .map(|(uuid, v)| {
            let start = c0.get(uuid).copied().unwrap_or(0.0);
            before_reset.get(uuid).copied().unwrap_or(start) - start + v
        })
        .sum();
    // The GPUs worked: more than idle power for the whole time.
    assert!(truth > 3.0 * IDLE_W * 16.0, "the counters rose: {truth} J");
    let error = (counted - truth).abs() / truth;
    eprintln!(
        "energy: the Model counted {counted:.1} J, the fake NVML counters rose {truth:.1} J ({:+.3} %)",
        (counted - truth) / truth * 100.0
    );
    assert!(
        error <= 0.01,
        "the Model's joules {counted:.1} vs the counters' deltas {truth:.1} ({:.2} %)",
        error * 100.0
    );
    let e = models
        .get("chat")
        .await
        .expect("model")
        .status
        .and_then(|s| s.energy)
        .expect("energy");
    assert!(e.generated_tokens.unwrap_or(0) > 0, "{e:?}");
    assert!(e.joules_per_1k_tokens.is_some_and(|j| j > 0.0), "{e:?}");
    // The adapter's share by tokens, and the pool's total.
    let sql = adapters
        .get("sql")
        .await
        .expect("sql")
        .status
        .expect("status");
    assert!(
        sql.energy_joules
            .is_some_and(|j| j > 0.0 && j < e.energy_joules.unwrap_or(0.0)),
        "{sql:?}"
    );
    assert!(
        sql.requests.is_some_and(|r| r > 0) && sql.generated_tokens.is_some_and(|t| t > 0),
        "requests and tokens served with the adapter: {sql:?}"
    );
    // The pool counts everything placed on it (written after the Models in
    // each reading, so it catches up with this one within a reading).
    let model_joules = e.energy_joules.unwrap_or(0.0);
    wait_for(
        pools.clone(),
        "h100",
        Duration::from_secs(30),
        move |p: Option<&GPUPool>| {
            p.and_then(|p| p.status.as_ref())
                .and_then(|s| s.energy_joules)
                .is_some_and(|j| j >= model_joules - 1.0)
        },
    )
    .await
    .expect("the pool's joules reach the Model's");

    power_caps_and_cost(w, &pools, &models, &pods, &gpus).await;
}

/// A GPU's average draw between two readings of its state (the fake's
/// counter and sample time), watts.
fn draw_watts(a: &fake_nvml::DeviceEnergy, b: &fake_nvml::DeviceEnergy) -> f64 {
    (b.energy_mj - a.energy_mj) / 1000.0 / ((b.last_ns - a.last_ns) as f64 / 1e9)
}

/// GPUPool `powerCapWatts` and `costPerGpuHour`: the node agents set the
/// cap on every GPU of the pool's nodes (and on no other), the GPUs under
/// load draw no more than it, the pool's status says so; the Model's and
/// the pool's cost follow the GPUs held; removing the cap gives the GPUs
/// their default limit back.
async fn power_caps_and_cost(
    w: &World,
    pools: &Api<GPUPool>,
    models: &Api<Model>,
    pods: &Api<Pod>,
    gpus: &[PathBuf],
) {
    const CAP_W: i32 = 150;
    pools
        .patch(
            "h100",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"powerCapWatts": CAP_W, "costPerGpuHour": "2.50"}})),
        )
        .await
        .expect("cap and price the pool");
    wait_for(
        pools.clone(),
        "h100",
        Duration::from_secs(60),
        |p: Option<&GPUPool>| {
            p.and_then(|p| p.status.as_ref())
                .and_then(|s| s.power_cap.as_ref())
                .is_some_and(|c| c.target_watts == CAP_W && c.gpus > 0 && c.gpus_at_cap == c.gpus)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("the pool's status shows every GPU at the cap: {e}"));
    let status = pools
        .get("h100")
        .await
        .expect("pool")
        .status
        .expect("status");
    let cap = status.power_cap.expect("powerCap");
    eprintln!("power cap: {cap:?}");
    // The hardware: every GPU of the pool's nodes runs at 150 W, the GPUs
    // of nodes in no pool keep their default (no limit was ever set).
    let pool_nodes: Vec<String> = status.nodes.iter().map(|n| n.name.clone()).collect();
    let mut seen = 0;
    for entry in std::fs::read_dir(w.info.log_dir.join("nodes")).expect("nodes") {
        let node_dir = entry.expect("node").path();
        let node = node_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let gpu_dir = node_dir.join(strata_e2e::devices::GPU_DIR);
        let Ok(devices) = std::fs::read_dir(&gpu_dir) else {
            continue;
        };
        for d in devices.flatten() {
            let uuid = d.file_name().to_string_lossy().into_owned();
            let limit = fake_nvml::read_device_power_limit(&gpu_dir, &uuid);
            if pool_nodes.contains(&node) {
                assert_eq!(limit, Some(f64::from(CAP_W) * 1000.0), "{node}/{uuid}");
                seen += 1;
            } else {
                assert_eq!(limit, None, "{node}/{uuid} is in no pool: left alone");
            }
        }
    }
    assert_eq!(seen, cap.gpus, "the status counts the pool's GPUs");

    // Under load the replicas' GPUs draw at most the cap (they would draw
    // up to 700 W), and more than idle (the load ran).
    let stop = Arc::new(AtomicBool::new(false));
    start_load(pods.clone(), stop.clone());
    gpus_busy(gpus).await;
    let read = |g: &PathBuf| {
        fake_nvml::read_device_energy(g.parent().expect("dir"), &uuid_of(g)).expect("energy")
    };
    let before: Vec<_> = gpus.iter().map(read).collect();
    tokio::time::sleep(Duration::from_secs(4)).await; // a measured window under load
    let after: Vec<_> = gpus.iter().map(read).collect();
    // Cost while tokens flow: 3 GPUs at 2.50 per hour.
    wait_for(
        models.clone(),
        "chat",
        Duration::from_secs(30),
        |m: Option<&Model>| {
            m.and_then(|m| m.status.as_ref())
                .and_then(|s| s.cost.as_ref())
                .is_some_and(|c| c.per_million_tokens.is_some_and(|t| t > 0.0))
        },
    )
    .await
    .expect("the Model's cost per million tokens while it generates");
    let priced = models.get("chat").await.expect("model");
    stop.store(true, Ordering::Relaxed);
    for (g, (a, b)) in gpus.iter().zip(before.iter().zip(&after)) {
        let watts = draw_watts(a, b);
        eprintln!("power cap: {} drew {watts:.1} W under load", uuid_of(g));
        assert!(
            watts <= f64::from(CAP_W) + 1.0 && watts > 100.0,
            "{}: {watts:.1} W under a {CAP_W} W cap",
            uuid_of(g)
        );
    }
    let cost = priced.status.and_then(|s| s.cost).expect("cost");
    assert_eq!((cost.per_hour, cost.gpus), (7.5, 3), "{cost:?}");
    let pool_cost = wait_for(
        pools.clone(),
        "h100",
        Duration::from_secs(30),
        |p: Option<&GPUPool>| {
            p.and_then(|p| p.status.as_ref())
                .and_then(|s| s.cost.as_ref())
                .is_some_and(|c| c.per_hour == 7.5 && c.gpus == 3)
        },
    )
    .await;
    assert!(pool_cost.is_ok(), "the pool's cost: {pool_cost:?}");

    // The cap removed: the GPUs get their default limit back, the status
    // drops it.
    pools
        .patch(
            "h100",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"powerCapWatts": null}})),
        )
        .await
        .expect("uncap the pool");
    wait_for(
        pools.clone(),
        "h100",
        Duration::from_secs(60),
        |p: Option<&GPUPool>| {
            p.and_then(|p| p.status.as_ref())
                .is_some_and(|s| s.power_cap.is_none())
        },
    )
    .await
    .expect("the pool's status drops the cap");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for g in gpus {
        loop {
            let limit = fake_nvml::read_device_power_limit(g.parent().expect("dir"), &uuid_of(g));
            if limit == Some(700_000.0) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{}: the default limit back within 30 s, is {limit:?}",
                uuid_of(g)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
