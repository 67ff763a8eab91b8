//! Live LoRA adapters and energy accounting in the local world: replicas
//! run the real strata-sidecar (on the fake NVML library, one simulated GPU
//! each) in front of the engine simulator. Two adapters on a two-replica
//! Model are served through the sidecars; a third replica receives both; a
//! deleted adapter is unloaded everywhere while the other is still served.
//! Under load the fake NVML counters rise and the Model's joules equal the
//! sum of the counters' deltas within 1 %, across a sidecar restart and an
//! operator restart.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    World, repo_yaml, service_account_kubeconfig, sim_replica_processes, test_namespace, wait_for,
    workspace_binary, world,
};
use strata_e2e::runner::{Profile, RUN_LABEL, RunnerConfig};
use tokio::process::Command;

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

fn the_world() -> &'static World {
    let hub = fake_hub();
    let sim = PathBuf::from(env!("CARGO_BIN_EXE_strata-engine-sim"));
    world(env!("CARGO_BIN_EXE_strata-cluster"), move || RunnerConfig {
        profiles: BTreeMap::from([(
            PROFILE.to_string(),
            Profile {
                processes: sim_replica_processes(
                    sim,
                    &[
                        "--max-batch",
                        "4",
                        "--itl-ms",
                        "10",
                        "--max-tokens-default",
                        "32",
                        // Fewer than the Model's adapters.maxPerReplica
                        // (4): a third adapter is refused by the engine.
                        "--max-loras",
                        "2",
                    ],
                    vec![
                        "--engine-health-interval=0.2".into(),
                        "--engine-metrics-interval=0.5".into(),
                        format!("--nvml-lib={}", fake_nvml::LIB),
                        "--nvml-interval=0.2".into(),
                    ],
                    BTreeMap::from([
                        ("STRATA_FAKE_NVML_DEVICES".into(), "${GPU_UUIDS}".into()),
                        (
                            "STRATA_FAKE_NVML_LOAD_FILE".into(),
                            "${POD_DIR}/load".into(),
                        ),
                        (
                            "STRATA_FAKE_NVML_STATE_FILE".into(),
                            "${POD_DIR}/nvml-state".into(),
                        ),
                        ("STRATA_FAKE_NVML_IDLE_WATTS".into(), IDLE_W.to_string()),
                        ("STRATA_FAKE_NVML_TDP_WATTS".into(), TDP_W.to_string()),
                        ("HF_ENDPOINT".into(), format!("http://{hub}")),
                    ]),
                ),
                restart: true,
                ..Profile::default()
            },
        )]),
        ..RunnerConfig::default()
    })
}

/// The pid of a pod's process (the runner's pid file), if it runs.
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

/// The pod's directory the runner keeps (fake NVML state, pid files).
fn pod_dir(w: &World, ns: &str, pod: &str) -> PathBuf {
    w.info.log_dir.join("pods").join(format!("{ns}_{pod}.d"))
}

/// A GPU's energy counter at `now_ns`, in joules, from the fake NVML state
/// file: the saved counter plus the power of the saved load since the
/// saved sample (the fake integrates exactly so between samples).
fn counters_at(dir: &Path, now_ns: u128) -> BTreeMap<String, f64> {
    let text = std::fs::read_to_string(dir.join("nvml-state")).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (uuid, mj, last_ns, util) = (
                f.first()?,
                f.get(1)?.parse::<f64>().ok()?,
                f.get(2)?.parse::<u128>().ok()?,
                f.get(3)?.parse::<f64>().ok()?,
            );
            let watts = IDLE_W + (TDP_W - IDLE_W) * util.clamp(0.0, 1.0);
            let since = now_ns.saturating_sub(last_ns) as f64 / 1e9;
            Some((uuid.to_string(), mj / 1000.0 + watts * since))
        })
        .collect()
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
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
    pods.list(&ListParams::default().labels("strata.ai/model=chat"))
        .await
        .expect("pods")
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none() && pod_ready(p))
        .collect()
}

fn ip(p: &Pod) -> String {
    let ip = p
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .expect("pod IP");
    assert!(strata_e2e::http::is_loopback_str(&ip), "{ip}");
    ip
}

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
    w: &World,
    ns: &str,
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
            let t = now_ns();
            let mut counters = BTreeMap::new();
            for p in pods {
                counters.extend(counters_at(&pod_dir(w, ns, p), t));
            }
            return (e.energy_joules.unwrap_or(0.0), counters);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no new energy status covering {pods:?}: {e:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the replicas' simulated GPUs are idle (the engines' load
/// files read 0), so that a reading is not taken in the middle of a request.
async fn gpus_idle(w: &World, ns: &str, pods: &[String]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let idle = pods.iter().all(|p| {
            std::fs::read_to_string(pod_dir(w, ns, p).join("load"))
                .ok()
                .and_then(|t| t.trim().parse::<f64>().ok())
                .is_some_and(|u| u == 0.0)
        });
        if idle {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "GPUs not idle");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn adapters_follow_replicas_and_energy_matches_the_gpu_counters() {
    let w = the_world();
    let client = w.client().await;
    w.install_chart_for_local_operator();
    let kubeconfig = service_account_kubeconfig(w, "strata-system", "strata-operator")
        .await
        .expect("kubeconfig");
    let start_operator = |n: u32| {
        let log = std::fs::File::create(w.info.log_dir.join(format!("operator-adapters-{n}.log")))
            .expect("log");
        Command::new(workspace_binary("strata-operator"))
            .args([
                "--metrics-addr=127.0.0.1:0".to_string(),
                "--activator-addr=".to_string(),
                "--leader-elect=false".to_string(),
                format!("--pod-label={RUN_LABEL}={PROFILE}"),
                "--sidecar-image=ghcr.io/strata-ai/strata-sidecar:e2e".to_string(),
                "--energy-interval-seconds=2".to_string(),
            ])
            .env("KUBECONFIG", &kubeconfig)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("operator")
    };
    let mut operator = start_operator(1);

    let pools: Api<GPUPool> = Api::all(client.clone());
    let pool: GPUPool =
        serde_json::from_value(repo_yaml("samples/gpupool-h100.yaml").expect("sample"))
            .expect("pool");
    match pools.create(&PostParams::default(), &pool).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("pool: {e}"),
    }
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
    spec.insert("engine".into(), json!({"type": "vLLM"}));
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
    gpus_idle(w, &ns, &names).await;
    let (j0, c0) = energy_reading(&models, w, &ns, &names).await;
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
    // The operator restarts too: the new one continues from status.
    operator.kill().await.expect("stop the operator");
    tokio::time::sleep(Duration::from_secs(3)).await; // load runs while no operator reads it
    operator = start_operator(2);
    tokio::time::sleep(Duration::from_secs(8)).await; // more load after the restarts
    stop.store(true, Ordering::Relaxed);
    gpus_idle(w, &ns, &names).await;
    let (j1, c1) = energy_reading(&models, w, &ns, &names).await;
    let counted = j1 - j0;
    let truth: f64 = c1
        .iter()
        .map(|(uuid, v)| v - c0.get(uuid).copied().unwrap_or(*v))
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
    let _ = operator.start_kill();
}
