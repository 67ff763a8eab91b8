//! SLA autoscaling in the local world: the operator runs in-cluster from
//! its chart (two replicas from the operator image, leader election); each
//! replica of the Model runs from images, the engine simulator's and the
//! real strata-sidecar's (pod runner in image mode, on the pod's IP); a load generator drives time to first token over target, replicas
//! are added and the SLA recovers; the load stops and the Model scales down
//! after its stabilization window; the status shows the trail of decisions.
//! Then, allowed to, it scales to zero after its idle window, and a request
//! sent to the operator's activator waits for a replica and is answered.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use strata_core::view::pod_ready;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::api::{ListParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use strata_crds::{GPUPool, Model};
use strata_e2e::harness::{
    World, chart_world, model_image_profile, operator_leader, repo_yaml, sidecar_fast_injection,
    sim_engine_gpu_injection, sim_image_model, test_namespace, wait_for, world,
};

const PROFILE: &str = "model-replica";
const OPERATOR: &str = "operator";

fn the_world() -> &'static World {
    world(env!("CARGO_BIN_EXE_strata-cluster"), || {
        chart_world(
            OPERATOR,
            [(
                PROFILE.to_string(),
                // The simulator's batch and latency knobs; the sidecar reads
                // the engine more often than its defaults, for the test's
                // clock. (The sidecar sees no GPU, as on a node; the chart's
                // node agents meter them.)
                model_image_profile(
                    sim_engine_gpu_injection(&[
                        "--max-batch",
                        "2",
                        "--itl-ms",
                        "15",
                        "--prefill-ms-per-token",
                        "0.5",
                        "--max-tokens-default",
                        "16",
                    ]),
                    sidecar_fast_injection(),
                ),
            )],
            &[],
        )
    })
}

/// Streams chat requests in `workers` closed loops against the Model's ready
/// replicas (pod IPs), each request to the replica with the fewest requests
/// in flight (as a least-request load balancer would).
fn start_load(
    client: kube::Client,
    ns: String,
    workers: usize,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) {
    let targets: Arc<tokio::sync::RwLock<Vec<String>>> = Arc::default();
    let in_flight: Arc<std::sync::Mutex<BTreeMap<String, usize>>> = Arc::default();
    let (t, s) = (targets.clone(), stop.clone());
    tokio::spawn(async move {
        let pods: Api<Pod> = Api::namespaced(client, &ns);
        while !s.load(Ordering::Relaxed) {
            if let Ok(list) = pods
                .list(&ListParams::default().labels("strata.ai/model=chat"))
                .await
            {
                let ready: Vec<String> = list
                    .items
                    .iter()
                    .filter(|p| p.metadata.deletion_timestamp.is_none() && pod_ready(p))
                    .filter_map(|p| p.status.as_ref().and_then(|s| s.pod_ip.clone()))
                    .filter(|ip| ip.starts_with("127."))
                    .collect();
                *t.write().await = ready;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    for w in 0..workers {
        let (targets, stop, done, in_flight) = (
            targets.clone(),
            stop.clone(),
            done.clone(),
            in_flight.clone(),
        );
        let _ = w;
        tokio::spawn(async move {
            let http: Client<HttpConnector, Full<Bytes>> =
                Client::builder(TokioExecutor::new()).build(HttpConnector::new());
            while !stop.load(Ordering::Relaxed) {
                let ip = {
                    let t = targets.read().await;
                    let mut f = in_flight.lock().expect("lock");
                    let chosen = t
                        .iter()
                        .min_by_key(|ip| f.get(*ip).copied().unwrap_or(0))
                        .cloned();
                    if let Some(ip) = &chosen {
                        *f.entry(ip.clone()).or_default() += 1;
                    }
                    chosen
                };
                let Some(ip) = ip else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                let body = json!({"model": "chat", "stream": true, "messages": [{"role": "user", "content": "x".repeat(400)}]});
                let req = http::Request::post(format!("http://{ip}:8080/v1/chat/completions"))
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body.to_string())))
                    .expect("request");
                if let Ok(Ok(resp)) =
                    tokio::time::timeout(Duration::from_secs(30), http.request(req)).await
                {
                    let mut s = resp.into_body().into_data_stream();
                    while s.next().await.is_some() {}
                    done.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(n) = in_flight.lock().expect("lock").get_mut(&ip) {
                    *n = n.saturating_sub(1);
                }
            }
        });
    }
}

/// Requests waiting at the activator at once.
const CONCURRENT: usize = 500;

/// The API server's request counters (`apiserver_request_total`), by label set.
async fn api_requests(client: &kube::Client) -> BTreeMap<String, f64> {
    let req = http::Request::get("/metrics")
        .body(Vec::new())
        .expect("request");
    let text = client.request_text(req).await.expect("apiserver /metrics");
    text.lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// What a polling activator costs: GET or LIST of Models or pods, and
/// PATCH of a Model itself (not its status). Watches and the controllers'
/// status writes are not counted.
fn is_activator_shaped(series: &str) -> bool {
    let resource = series.contains("resource=\"models\"") || series.contains("resource=\"pods\"");
    let verb = ["verb=\"GET\"", "verb=\"LIST\"", "verb=\"PATCH\""]
        .iter()
        .any(|v| series.contains(v));
    resource && verb && series.contains("subresource=\"\"")
}

fn status_of(m: &Model) -> strata_crds::ModelStatus {
    m.status.clone().unwrap_or_default()
}

#[tokio::test]
async fn the_sla_autoscaler_scales_up_under_load_and_down_after_it() {
    let w = the_world();
    let client = w.client().await;
    // The operator as users run it: the chart's two replicas from the
    // operator image, in-cluster; the leader serves the activator.
    let leader = w
        .install_operator(OPERATOR, PROFILE, &[])
        .await
        .expect("the chart's operator runs");
    let activator = leader.activator_addr();

    let pools: Api<GPUPool> = Api::all(client.clone());
    let pool: GPUPool =
        serde_json::from_value(repo_yaml("samples/gpupool-h100.yaml").expect("sample"))
            .expect("pool");
    pools
        .create(&PostParams::default(), &pool)
        .await
        .expect("pool");

    let ns = test_namespace(&client, "sla").await.expect("namespace");
    let models: Api<Model> = Api::namespaced(client.clone(), &ns);
    // The engine from the simulator's image.
    let mut m = serde_json::to_value(sim_image_model("chat", 1, 5).expect("model")).expect("json");
    let spec = m["spec"].as_object_mut().expect("spec");
    spec.insert("maxReplicas".into(), json!(5));
    spec.insert(
        "sla".into(),
        json!({"timeToFirstToken": "250ms", "queueDepthPerReplica": 2}),
    );
    spec.insert(
        "autoscaling".into(),
        json!({"mode": "SLA", "interval": "5s", "window": "15s",
               "scaleDown": {"stabilizationWindow": "20s", "maxReplicasPerInterval": 2}}),
    );
    let model: Model = serde_json::from_value(m).expect("model");
    models
        .create(&PostParams::default(), &model)
        .await
        .expect("model");
    wait_for(
        models.clone(),
        "chat",
        Duration::from_secs(90),
        |m: Option<&Model>| m.is_some_and(|m| status_of(m).ready_replicas == 1),
    )
    .await
    .expect("one replica ready");

    // Load: 8 streams against one replica that runs 2 at a time.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    start_load(client.clone(), ns.clone(), 8, stop.clone(), done.clone());
    wait_for(
        models.clone(),
        "chat",
        Duration::from_secs(120),
        |m: Option<&Model>| {
            m.is_some_and(|m| {
                let s = status_of(m);
                s.desired_replicas.unwrap_or(0) >= 3 && s.ready_replicas >= 3
            })
        },
    )
    .await
    .expect("the autoscaler adds replicas and they become ready");
    let m = models.get("chat").await.expect("model");
    let d = status_of(&m)
        .last_scale_decision
        .expect("a decision is recorded");
    assert!(d.to_replicas > d.from_replicas, "{d:?}");
    // A scale-up, possibly limited by the rate or clamped at maxReplicas
    // (Bounds: a slow machine can put TTFT far enough over target that the
    // autoscaler asks for more than 5).
    assert!(
        matches!(d.reason.as_str(), "ScaleUp" | "RateLimited" | "Bounds"),
        "{d:?}"
    );
    assert!(
        matches!(
            d.signal.as_str(),
            "timeToFirstToken" | "queueDepthPerReplica"
        ),
        "{d:?}"
    );
    // With more replicas the SLA recovers.
    let recovered = wait_for(
        models.clone(),
        "chat",
        Duration::from_secs(120),
        |m: Option<&Model>| {
            m.is_some_and(|m| {
                status_of(m)
                    .sla
                    .and_then(|s| s.time_to_first_token)
                    .and_then(|t| t.ratio)
                    .is_some_and(|r| r <= 1.0)
            })
        },
    )
    .await;
    if let Err(e) = recovered {
        let m = models.get("chat").await.expect("model");
        let mut diag = String::new();
        for p in &status_of(&m).placement {
            let pod = Api::<Pod>::namespaced(client.clone(), &ns)
                .get(&p.pod)
                .await
                .expect("pod");
            let ip = pod.status.and_then(|s| s.pod_ip).unwrap_or_default();
            // The engine's metrics in the clear, the sidecar's admin port over TLS.
            for port in [8000u16, 9090] {
                let addr = format!("{ip}:{port}").parse().expect("addr");
                let answer = if port == 9090 {
                    strata_e2e::http::get_https(addr, "/metrics", Duration::from_secs(2)).await
                } else {
                    strata_e2e::http::get(addr, "/metrics", Duration::from_secs(2)).await
                };
                if let Ok(r) = answer {
                    for l in r.body.lines().filter(|l| {
                        l.starts_with("vllm:num_requests")
                            || l.contains("_seconds_sum")
                            || l.contains("_seconds_count")
                            || l.starts_with("strata_requests_in_flight")
                    }) {
                        diag.push_str(&format!("{ip}:{port} {l}\n"));
                    }
                }
            }
        }
        panic!(
            "TTFT back under target: {e}; sla: {:?}\n{diag}",
            status_of(&m).sla
        );
    }
    assert!(
        done.load(Ordering::Relaxed) > 20,
        "the load generator completed requests"
    );
    // Under load the arrivals that feed the throughput signal are reported.
    let m = models.get("chat").await.expect("model");
    let sla = status_of(&m).sla.expect("status.sla");
    assert!(
        sla.arrivals_per_second.is_some_and(|a| a > 0.0),
        "arrivals under load: {sla:?}"
    );
    assert!(
        sla.kv_cache_usage.is_some_and(|k| k > 0.0 && k <= 1.0),
        "KV-cache use under load: {sla:?}"
    );

    // The load stops: after the stabilization window the Model scales down to one.
    stop.store(true, Ordering::Relaxed);
    wait_for(
        models.clone(),
        "chat",
        Duration::from_secs(150),
        |m: Option<&Model>| {
            m.is_some_and(|m| {
                let s = status_of(m);
                s.desired_replicas == Some(1) && s.replicas == 1
            })
        },
    )
    .await
    .expect("scaled back down");
    let d = status_of(&models.get("chat").await.expect("model"))
        .last_scale_decision
        .expect("decision");
    assert_eq!(d.reason, "ScaleDown", "{d:?}");

    // The trail of decisions in Events.
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let reasons: Vec<String> = events
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("chat"))
        .filter_map(|e| e.reason.clone())
        .collect();
    assert!(reasons.iter().any(|r| r == "ScaledUp"), "{reasons:?}");
    assert!(reasons.iter().any(|r| r == "ScaledDown"), "{reasons:?}");

    // The activator serves only Models that opt in (scale to zero, or the
    // annotation): this one does not yet.
    let http: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let chat_url = format!("http://{activator}/models/{ns}/chat/v1/chat/completions");
    let models_url = format!("http://{activator}/models/{ns}/chat/v1/models");
    let resp = http
        .request(
            http::Request::get(&models_url)
                .body(Full::new(Bytes::new()))
                .expect("request"),
        )
        .await
        .expect("response");
    assert_eq!(
        resp.status(),
        404,
        "a Model without scaleToZero is not served"
    );

    // Scale to zero after an idle window, and back through the activator:
    // the first requests wait for a replica and are answered.
    models
        .patch(
            "chat",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {
                "minReplicas": 0,
                "autoscaling": {"scaleToZero": {"idleWindow": "1m"}},
            }})),
        )
        .await
        .expect("allow scale to zero");
    wait_for(
        models.clone(),
        "chat",
        Duration::from_secs(150),
        |m: Option<&Model>| {
            m.is_some_and(|m| {
                let s = status_of(m);
                s.desired_replicas == Some(0) && s.replicas == 0
            })
        },
    )
    .await
    .expect("idle: scaled to zero");
    // 500 requests at once for the Model at zero: they wait at the
    // activator, which asks for a replica once and learns its readiness from
    // its watches, not by polling the API server; all 500 are served.
    let before = api_requests(&client).await;
    let started = std::time::Instant::now();
    let mut waiting = Vec::new();
    for _ in 0..CONCURRENT {
        let (http, url) = (http.clone(), chat_url.clone());
        waiting.push(tokio::spawn(async move {
            let body = json!({"model": "chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4});
            let req = http::Request::post(url)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.to_string())))
                .expect("request");
            let resp = tokio::time::timeout(Duration::from_secs(180), http.request(req))
                .await
                .map_err(|_| "no answer within 180 s".to_string())?
                .map_err(|e| e.to_string())?;
            let status = resp.status().as_u16();
            let text = resp
                .into_body()
                .collect()
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                .unwrap_or_default();
            Ok::<_, String>((status, text))
        }));
    }
    let mut failures = Vec::new();
    for w in waiting {
        match w.await.expect("task") {
            Ok((200, text)) if text.contains("choices") => {}
            other => failures.push(format!("{other:?}")),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let after = api_requests(&client).await;
    assert!(
        failures.is_empty(),
        "all {CONCURRENT} requests waiting at the activator are served; {} failed, e.g. {:?}",
        failures.len(),
        failures.first()
    );
    let polled: f64 = after
        .iter()
        .filter(|(k, _)| is_activator_shaped(k))
        .map(|(k, v)| v - before.get(k).copied().unwrap_or(0.0))
        .sum();
    let rate = polled / elapsed;
    println!(
        "activator: {CONCURRENT} requests served from zero in {elapsed:.1}s; model/pod GET+LIST+PATCH requests to the API server: {polled} ({rate:.2}/s)"
    );
    assert!(
        rate < 5.0,
        "{CONCURRENT} waiting requests cost {polled} model/pod GET/LIST/PATCH requests in {elapsed:.1}s ({rate:.2}/s); breakdown: {:?}",
        after
            .iter()
            .filter(|(k, _)| is_activator_shaped(k))
            .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
            .filter(|(_, d)| *d > 0.0)
            .collect::<Vec<_>>()
    );

    // Only the inference API passes the activator: every known engine admin
    // path is a 404, whatever the method.
    for (engine, path) in strata_net::openai::ENGINE_ADMIN_PATHS {
        for method in ["GET", "POST"] {
            let req = http::Request::builder()
                .method(method)
                .uri(format!("http://{activator}/models/{ns}/chat{path}"))
                .body(Full::new(Bytes::from(
                    json!({"lora_name": "evil", "lora_path": "/attacker"}).to_string(),
                )))
                .expect("request");
            let resp = http.request(req).await.expect("response");
            assert_eq!(resp.status(), 404, "{engine} {method} {path}");
        }
    }
    let m = models.get("chat").await.expect("model");
    let s = status_of(&m);
    assert!(s.ready_replicas >= 1, "{s:?}");
    // The decision from zero (later ones may have added replicas for the
    // queue the 500 requests made, and Events of one reason are aggregated).
    let d = s.last_scale_decision.expect("decision");
    // The decision was the leader's: read its metrics (a failover in between
    // would show in the Lease).
    let now_leader = operator_leader(&client, Duration::from_secs(30))
        .await
        .expect("a leader");
    assert_eq!(now_leader, leader, "no failover during the test");
    let metrics = strata_e2e::http::get(leader.metrics_addr(), "/metrics", Duration::from_secs(5))
        .await
        .expect("operator metrics");
    let from_zero = metrics
        .body
        .lines()
        .find(|l| l.starts_with("strata_autoscaler_decisions_total{reason=\"ScaleFromZero\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(from_zero >= 1.0, "a ScaleFromZero decision (last: {d:?})");
    let _ = models.get("chat").await.map(|m| m.name_any());
}
