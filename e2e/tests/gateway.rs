//! strata-gateway in the local world: the chart installed with
//! `gateway.enabled=true` runs the gateway's two replicas in-cluster from
//! the `strata-gateway` image (pod runner in image mode, the chart's
//! ServiceAccount and ClusterRole enforced by the real API server), beside
//! the operator's; every request goes to a gateway pod's IP (loopback),
//! port 8080, never to a Service.
//!
//! One scenario, in order, sharing one world:
//! 1. A Model with three replicas and an Adapter with `replicas: 1`:
//!    requests for the adapter's served name reach only the replica that
//!    carries it (counted by each replica's sidecar, `strata_requests_total`
//!    on its admin port), requests for the Model's served name reach all
//!    three, and `GET /v1/models` lists the Model and the adapter.
//! 2. Meanwhile a Model at zero replicas that may scale from zero: one
//!    request through the gateway wakes it and is answered.
//! 3. A steady stream of concurrent requests (streamed and not) while two
//!    replicas without the adapter are deleted, one after the other: every
//!    request that had not started streaming when its replica went
//!    succeeds (the gateway retries it on another); streams that had
//!    started may be cut, and are counted.
//!
//! Needs the images: `scripts/images --profile dev strata-operator
//! strata-sidecar strata-node-agent strata-engine-sim strata-gateway`
//! (scripts/test builds them first).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};
use strata_core::view::pod_ready;
use strata_crds::{Adapter, Model};
use strata_e2e::harness::{
    OPERATOR_NAMESPACE, World, chart_world, ensure_sample_pool, model_image_profile,
    sidecar_fast_injection, sim_engine_gpu_injection, sim_image_model, test_namespace, wait_for,
    world,
};
use strata_e2e::http::is_loopback_str;
use strata_e2e::runner::RUN_LABEL;

/// The runner profile of the operator's and the gateway's pods.
const PODS: &str = "gateway-system";
/// The runner profile of the model pods.
const PROFILE: &str = "gateway-replica";
/// The Model with [`REPLICAS`] replicas, and the name clients use for it.
const MODEL: &str = "chat";
const SERVED: &str = "acme/chat-8b";
/// Its adapter (served under its name), carried by one replica.
const ADAPTER: &str = "sql";
/// The Model at zero.
const SLEEPY: &str = "sleepy";
/// The Model's replicas.
const REPLICAS: usize = 3;
/// Concurrent clients while a replica goes (half of them streaming).
const CLIENTS: usize = 16;
/// Replicas deleted under the load, one after the other.
const ROUNDS: usize = 2;

type Http = Client<HttpConnector, Full<Bytes>>;

fn the_world() -> &'static World {
    world(env!("CARGO_BIN_EXE_strata-cluster"), || {
        chart_world(
            PODS,
            [(
                PROFILE.to_string(),
                // Short answers (10 ms per token), so that a stream is in
                // flight at any moment of the load without taking long.
                model_image_profile(
                    sim_engine_gpu_injection(&["--itl-ms", "10", "--max-tokens-default", "16"]),
                    sidecar_fast_injection(),
                ),
            )],
            &[],
        )
    })
}

fn http() -> Http {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// A POST with a JSON body to a gateway (loopback only); the status and
/// the whole body, or why there was none.
async fn post(http: &Http, gw: SocketAddr, path: &str, body: &Value) -> (u16, String) {
    assert!(is_loopback_str(&gw.ip().to_string()), "{gw}");
    let req = http::Request::post(format!("http://{gw}{path}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let exchange = async {
        let resp = http.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{status}, then the body failed: {e}"))?;
        Ok::<_, String>((
            status,
            String::from_utf8_lossy(&body.to_bytes()).into_owned(),
        ))
    };
    match tokio::time::timeout(Duration::from_secs(30), exchange).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => (0, e),
        Err(_) => (0, "no answer within 30 s".into()),
    }
}

/// A chat request for `model` with its own prompt (distinct prompts spread
/// over the replicas by the gateway's prefix hashing).
fn chat(model: &str, prompt: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "max_tokens": 16,
           "messages": [{"role": "user", "content": prompt}]})
}

/// A GET from a gateway (plain HTTP, loopback): status and body.
async fn get(gw: SocketAddr, path: &str) -> (u16, String) {
    match strata_e2e::http::get(gw, path, Duration::from_secs(10)).await {
        Ok(r) => (r.status, r.body),
        Err(e) => (0, e.to_string()),
    }
}

/// The ready gateway pods' OpenAI endpoints (pod IP, port 8080), once
/// `n` are ready.
async fn gateways(client: &kube::Client, n: usize) -> Vec<SocketAddr> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let list = pods
            .list(&ListParams::default().labels("app.kubernetes.io/name=strata-gateway"))
            .await
            .expect("gateway pods");
        let ready: Vec<SocketAddr> = list
            .items
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none() && pod_ready(p))
            .filter_map(|p| p.status.as_ref().and_then(|s| s.pod_ip.clone()))
            .map(|ip| {
                assert!(is_loopback_str(&ip), "a gateway pod IP off loopback: {ip}");
                SocketAddr::new(ip.parse().expect("pod IP"), 8080)
            })
            .collect();
        if ready.len() == n {
            return ready;
        }
        assert!(
            Instant::now() < deadline,
            "{n} ready gateway pods within 120 s: {ready:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The Model's ready, not terminating replicas.
async fn replicas(pods: &Api<Pod>, model: &str) -> Vec<Pod> {
    strata_e2e::harness::ready_model_pods(pods, model).await
}

use strata_e2e::harness::loopback_pod_ip as ip;

/// Requests a replica's sidecar answered with success for `adapter` (""
/// for the base model), from its `strata_requests_total` (admin port 9090,
/// TLS); and the adapter requests it refused (`adapter="unknown"`).
async fn served_by(ip: &str, adapter: &str) -> (u64, u64) {
    let addr: SocketAddr = format!("{ip}:9090").parse().expect("addr");
    let metrics = strata_e2e::http::get_https(addr, "/metrics", Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("the sidecar's metrics on {addr}: {e}"));
    let sum = |want: &str| -> u64 {
        metrics
            .body
            .lines()
            .filter(|l| l.starts_with("strata_requests_total{") && l.contains(want))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    let ok = metrics
        .body
        .lines()
        .filter(|l| {
            l.starts_with("strata_requests_total{")
                && l.contains(&format!("adapter=\"{adapter}\""))
                && l.contains("outcome=\"success\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64;
    (ok, sum("adapter=\"unknown\""))
}

/// A gateway's own counter (sum over its labels), from its /metrics (9090).
async fn gateway_metric(gw: SocketAddr, name: &str) -> u64 {
    let (status, body) = get(SocketAddr::new(gw.ip(), 9090), "/metrics").await;
    assert_eq!(status, 200, "the gateway's metrics on {gw}: {body}");
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Model objects of the scenario: the simulator's image on the h100 pool.
fn model(name: &str, edit: Value) -> Model {
    let mut m = serde_json::to_value(sim_image_model(name, 0, 3).expect("model")).expect("json");
    if let (Some(spec), Some(edit)) = (m["spec"].as_object_mut(), edit.as_object()) {
        spec.extend(edit.clone());
    }
    serde_json::from_value(m).expect("model")
}

/// What one request of the load got.
#[derive(Debug)]
enum Got {
    /// Answered whole (a stream up to `[DONE]`).
    Whole,
    /// A stream that had begun (its head, 200, reached the client at
    /// `started`) and was cut.
    Cut { started: Instant, why: String },
    /// Failed before anything of an answer reached the client, or a
    /// non-streamed answer that was not a completion.
    Failed {
        stream: bool,
        sent: Instant,
        why: String,
    },
}

/// Seconds from `origin` to `t` (negative before it).
fn secs_from(origin: Instant, t: Instant) -> f64 {
    if t >= origin {
        t.duration_since(origin).as_secs_f64()
    } else {
        -origin.duration_since(t).as_secs_f64()
    }
}

/// One request of the load.
async fn one(http: &Http, gw: SocketAddr, prompt: &str, stream: bool) -> Got {
    let sent = Instant::now();
    let failed = |why: String| Got::Failed { stream, sent, why };
    let req = http::Request::post(format!("http://{gw}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            chat(SERVED, prompt, stream).to_string(),
        )))
        .expect("request");
    let resp = match tokio::time::timeout(Duration::from_secs(30), http.request(req)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return failed(format!("no answer: {e}")),
        Err(_) => return failed("no answer within 30 s".into()),
    };
    let status = resp.status().as_u16();
    let started = Instant::now();
    let body = tokio::time::timeout(Duration::from_secs(30), resp.into_body().collect()).await;
    let text = match body {
        Ok(Ok(b)) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
        Ok(Err(e)) if stream && status == 200 => {
            return Got::Cut {
                started,
                why: e.to_string(),
            };
        }
        Ok(Err(e)) => return failed(format!("{status}, then the body failed: {e}")),
        Err(_) => return failed(format!("{status}, then no whole body within 30 s")),
    };
    match (status, stream) {
        (200, true) if text.contains("data: [DONE]") => Got::Whole,
        (200, true) => Got::Cut {
            started,
            why: format!("ended without [DONE]: {text:?}"),
        },
        (200, false) if text.contains("\"choices\"") => Got::Whole,
        _ => failed(format!("{status}: {text}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_routes_by_adapter_wakes_a_model_at_zero_and_retries_a_replica_that_goes() {
    let began = Instant::now();
    let w = the_world();
    let client = w.client().await;
    // The chart as users install it, with the gateway on; its pods (and
    // the operator's) run from their images. No node agents: nothing here
    // meters GPUs.
    let run = RUN_LABEL.replace('.', "\\.");
    let gateway_pods = format!("gateway.podLabels.{run}={PODS}");
    w.install_operator(
        PODS,
        PROFILE,
        &[
            "gateway.enabled=true",
            &gateway_pods,
            "nodeAgent.enabled=false",
        ],
    )
    .await
    .unwrap_or_else(|e| panic!("the chart with the gateway: {e}"));
    let gws = gateways(&client, 2).await;
    println!(
        "chart installed, gateways ready on {gws:?} after {:.1}s",
        began.elapsed().as_secs_f64()
    );

    ensure_sample_pool(&client, "samples/gpupool-h100.yaml")
        .await
        .expect("pool");
    let ns = test_namespace(&client, "gateway").await.expect("namespace");
    let models: Api<Model> = Api::namespaced(client.clone(), &ns);
    let adapters: Api<Adapter> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    // Three replicas that take adapters; an Adapter for one of them.
    models
        .create(
            &PostParams::default(),
            &model(
                MODEL,
                json!({"servedName": SERVED, "replicas": REPLICAS, "minReplicas": 1,
                       "adapters": {"maxPerReplica": 2}}),
            ),
        )
        .await
        .expect("the Model with replicas");
    // At zero, allowed to scale from zero (SLA mode; idle window long
    // enough that it stays up for the rest of the test once woken).
    models
        .create(
            &PostParams::default(),
            &model(
                SLEEPY,
                json!({"replicas": 0, "minReplicas": 0, "maxReplicas": 1,
                       "autoscaling": {"mode": "SLA", "interval": "5s",
                                       "scaleToZero": {"idleWindow": "10m"}}}),
            ),
        )
        .await
        .expect("the Model at zero");
    let adapter: Adapter = serde_json::from_value(json!({
        "apiVersion": "strata.ai/v1alpha1",
        "kind": "Adapter",
        "metadata": {"name": ADAPTER},
        "spec": {"model": MODEL, "source": {"uri": "hf://strata-test/sql-lora"}, "replicas": 1},
    }))
    .expect("adapter");
    adapters
        .create(&PostParams::default(), &adapter)
        .await
        .expect("adapter");

    // Both gateways see the Model at zero (a Model they do not know yet
    // is a 404): then one request wakes it, in the background.
    for gw in &gws {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, body) = get(*gw, &format!("/v1/models/{SLEEPY}")).await;
            if status == 200 {
                let v: Value = serde_json::from_str(&body).expect("a model");
                assert_eq!(v["strata"]["readyReplicas"], json!(0), "{v}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{gw} lists {SLEEPY}: {status} {body}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let sleepy_status = models.get(SLEEPY).await.expect("model").status;
    assert_eq!(
        sleepy_status.as_ref().map_or(0, |s| s.replicas),
        0,
        "{SLEEPY} starts at zero"
    );
    let wake = {
        let (http, gw) = (http(), gws[1]);
        tokio::spawn(async move {
            let t = Instant::now();
            let got = post(
                &http,
                gw,
                "/v1/chat/completions",
                &chat(SLEEPY, "wake up", false),
            )
            .await;
            (got, t.elapsed())
        })
    };

    // The adapter on one replica of three.
    wait_for(
        models.clone(),
        MODEL,
        Duration::from_secs(120),
        |m: Option<&Model>| {
            m.and_then(|m| m.status.as_ref())
                .is_some_and(|s| s.ready_replicas == REPLICAS as i32)
        },
    )
    .await
    .expect("the Model's replicas ready");
    wait_for(
        adapters.clone(),
        ADAPTER,
        Duration::from_secs(120),
        |a: Option<&Adapter>| {
            a.and_then(|a| a.status.as_ref()).is_some_and(|s| {
                s.loaded_replicas == 1
                    && s.desired_replicas == 1
                    && s.phase == strata_crds::adapter::AdapterPhase::Ready
            })
        },
    )
    .await
    .expect("the adapter loaded on one replica");
    let all = replicas(&pods, MODEL).await;
    assert_eq!(all.len(), REPLICAS, "the Model's replicas ready");
    let label = format!("adapter.strata.ai/{ADAPTER}");
    let (carrier, others): (Vec<&Pod>, Vec<&Pod>) = all
        .iter()
        .partition(|p| p.labels().get(&label).map(String::as_str) == Some("loaded"));
    assert_eq!(carrier.len(), 1, "one carrier");
    // The carrier first, then the others, by pod name and IP.
    let order: Vec<(String, String)> = carrier
        .iter()
        .chain(&others)
        .map(|p| (p.name_any(), ip(p)))
        .collect();
    let carrier = order[0].1.clone();

    // Each gateway learns the carrier from the pod's label: until then an
    // adapter request is a 503 that reaches no replica.
    let http = http();
    for gw in &gws {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, body) = post(
                &http,
                *gw,
                "/v1/chat/completions",
                &chat(ADAPTER, "probe", false),
            )
            .await;
            if status == 200 {
                break;
            }
            assert!(
                status == 503 || status == 404,
                "before the gateway sees the adapter and its carrier: {status} {body}"
            );
            assert!(Instant::now() < deadline, "{gw} routes {ADAPTER}: {body}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let counts = || async {
        let mut v = Vec::new();
        for (_, ip) in &order {
            let (adapter, refused) = served_by(ip, ADAPTER).await;
            v.push((adapter, refused, served_by(ip, "").await.0));
        }
        v
    };
    let before = counts().await;
    const N: u64 = 20;
    for i in 0..N {
        let gw = gws[i as usize % gws.len()];
        let prompt = format!("question {i}: which table holds the orders?");
        let (status, body) = post(
            &http,
            gw,
            "/v1/chat/completions",
            &chat(ADAPTER, &prompt, i % 2 == 0),
        )
        .await;
        assert_eq!(status, 200, "{ADAPTER} through {gw}: {body}");
    }
    // The base model's name: spread over every replica by prefix.
    const BASE: u64 = 30;
    for i in 0..BASE {
        let gw = gws[i as usize % gws.len()];
        let prompt = format!("{i}: a prompt of its own, to spread by prefix");
        let (status, body) = post(
            &http,
            gw,
            "/v1/chat/completions",
            &chat(SERVED, &prompt, i % 2 == 1),
        )
        .await;
        assert_eq!(status, 200, "{SERVED} through {gw}: {body}");
        assert!(
            body.contains("choices") || body.contains("data: [DONE]"),
            "{body}"
        );
    }
    // The per-Model path, whatever the served name.
    let (status, body) = post(
        &http,
        gws[0],
        &format!("/models/{ns}/{MODEL}/v1/chat/completions"),
        &chat(SERVED, "by path", false),
    )
    .await;
    assert_eq!(status, 200, "the per-Model path: {body}");
    let after = counts().await;
    let delta: Vec<(u64, u64, u64)> = after
        .iter()
        .zip(&before)
        .map(|(a, b)| (a.0 - b.0, a.1 - b.1, a.2 - b.2))
        .collect();
    assert_eq!(
        delta[0].0, N,
        "every {ADAPTER} request reached the carrier {carrier}: {delta:?}"
    );
    for (d, (pod, _)) in delta.iter().zip(&order).skip(1) {
        assert_eq!(
            (d.0, d.1),
            (0, 0),
            "no {ADAPTER} request reached {pod}, which does not carry it"
        );
    }
    let base: Vec<u64> = delta.iter().map(|d| d.2).collect();
    assert_eq!(
        base.iter().sum::<u64>(),
        BASE + 1,
        "every base request answered once: {base:?}"
    );
    assert!(
        base.iter().all(|n| *n > 0),
        "base requests reach every replica: {base:?}"
    );
    println!(
        "adapter {ADAPTER}: {N} of {N} on the carrier, 0 on the {} others; {SERVED}: {base:?} (the per-Model path's one included)",
        REPLICAS - 1
    );
    // GET /v1/models lists both names (and the Model at zero).
    let (status, body) = get(gws[0], "/v1/models").await;
    assert_eq!(status, 200, "{body}");
    let list: Value = serde_json::from_str(&body).expect("the list");
    let data = list["data"].as_array().expect("data");
    let find = |id: &str| data.iter().find(|d| d["id"] == id).cloned();
    let m = find(SERVED).unwrap_or_else(|| panic!("{SERVED} listed: {body}"));
    assert_eq!(m["strata"]["namespace"], json!(ns), "{m}");
    assert_eq!(m["strata"]["name"], json!(MODEL), "{m}");
    assert_eq!(m["strata"]["readyReplicas"], json!(REPLICAS), "{m}");
    let a = find(ADAPTER).unwrap_or_else(|| panic!("{ADAPTER} listed: {body}"));
    assert_eq!(a["parent"], json!(SERVED), "{a}");
    assert!(find(SLEEPY).is_some(), "{SLEEPY} listed: {body}");

    // The Model at zero answered its waking request.
    let ((status, body), took) = tokio::time::timeout(Duration::from_secs(240), wake)
        .await
        .expect("the waking request ends")
        .expect("task");
    assert_eq!(status, 200, "the request that woke {SLEEPY}: {body}");
    assert!(body.contains("choices"), "{body}");
    let decision = models
        .get(SLEEPY)
        .await
        .expect("model")
        .status
        .and_then(|s| s.last_scale_decision)
        .expect("a scale decision");
    assert_eq!(decision.reason, "ScaleFromZero", "{decision:?}");
    let wakes: u64 = {
        let mut n = 0;
        for gw in &gws {
            n += gateway_metric(*gw, "strata_gateway_wakes_total").await;
        }
        n
    };
    assert!(wakes >= 1, "a gateway asked for a replica");
    println!(
        "{SLEEPY}: woken from zero by a request through the gateway, answered after {:.1}s ({wakes} wake(s))",
        took.as_secs_f64()
    );

    // A replica goes under load.
    let retries_before = {
        let mut n = 0;
        for gw in &gws {
            n += gateway_metric(*gw, "strata_gateway_retries_total").await;
        }
        n
    };
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let results: Arc<Mutex<Vec<Got>>> = Arc::default();
    let mut workers = Vec::new();
    for c in 0..CLIENTS {
        let (stop, sent, results, gws) = (stop.clone(), sent.clone(), results.clone(), gws.clone());
        workers.push(tokio::spawn(async move {
            let http = self::http();
            let stream = c % 2 == 0;
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let gw = gws[(c + i) % gws.len()];
                let prompt = format!("client {c} request {i}: tell me something");
                sent.fetch_add(1, Ordering::Relaxed);
                let got = one(&http, gw, &prompt, stream).await;
                results.lock().expect("results").push(got);
                i += 1;
            }
        }));
    }
    // Load on every replica, then one without the adapter goes; the
    // operator replaces it, and once the newcomer has answered some of the
    // load, another one without the adapter goes.
    let mut known: Vec<String> = order.iter().map(|(n, _)| n.clone()).collect();
    let mut rounds: Vec<(String, Instant, Instant)> = Vec::new();
    let mut sent_before = Vec::new();
    for (pod, victim_ip) in order.iter().skip(1).take(ROUNDS) {
        let start = (
            served_by(&carrier, "").await.0,
            served_by(victim_ip, "").await.0,
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (a, b) = (
                served_by(&carrier, "").await.0,
                served_by(victim_ip, "").await.0,
            );
            if a >= start.0 + 10 && b >= start.1 + 10 {
                break;
            }
            assert!(Instant::now() < deadline, "the load reaches {pod}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let deleted_at = Instant::now();
        sent_before.push(sent.load(Ordering::Relaxed));
        pods.delete(pod, &DeleteParams::default())
            .await
            .expect("delete a replica");
        let deadline = Instant::now() + Duration::from_secs(120);
        let newcomer = loop {
            let now = replicas(&pods, MODEL).await;
            if let Some(p) = now.iter().find(|p| !known.contains(&p.name_any())) {
                break (p.name_any(), ip(p));
            }
            assert!(
                Instant::now() < deadline,
                "a replica replacing {pod} within 120 s"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        let replaced_at = Instant::now();
        known.push(newcomer.0.clone());
        let deadline = Instant::now() + Duration::from_secs(60);
        while served_by(&newcomer.1, "").await.0 < 10 {
            assert!(
                Instant::now() < deadline,
                "the load reaches the new replica {newcomer:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        rounds.push((pod.clone(), deleted_at, replaced_at));
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        tokio::time::timeout(Duration::from_secs(60), w)
            .await
            .expect("the clients stop")
            .expect("client task");
    }
    let retries = {
        let mut n = 0;
        for gw in &gws {
            n += gateway_metric(*gw, "strata_gateway_retries_total").await;
        }
        n
    } - retries_before;
    let results = std::mem::take(&mut *results.lock().expect("results"));
    let whole = results.iter().filter(|g| matches!(g, Got::Whole)).count();
    let cut: Vec<&Got> = results
        .iter()
        .filter(|g| matches!(g, Got::Cut { .. }))
        .collect();
    let failed: Vec<&Got> = results
        .iter()
        .filter(|g| matches!(g, Got::Failed { .. }))
        .collect();
    // Each cut or failure, by the deletion nearest to it.
    let nearest = |t: Instant| -> (usize, f64) {
        rounds
            .iter()
            .enumerate()
            .map(|(i, (_, at, _))| (i, secs_from(*at, t)))
            .min_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .unwrap_or((0, 0.0))
    };
    let cut_begun_before = cut
        .iter()
        .filter(|g| matches!(g, Got::Cut { started, .. } if nearest(*started).1 <= 0.0))
        .count();
    println!(
        "{ROUNDS} replicas deleted under load ({CLIENTS} clients, half streaming, through {} gateways): {} requests ({sent_before:?} sent before each deletion), {whole} whole, {} streams cut after they began ({cut_begun_before} of them begun before a deletion), {} failed before an answer began; gateway retries: {retries}; replacements ready after {:?} s; whole test {:.1}s",
        gws.len(),
        results.len(),
        cut.len(),
        failed.len(),
        rounds
            .iter()
            .map(|(_, d, r)| format!("{:.1}", r.duration_since(*d).as_secs_f64()))
            .collect::<Vec<_>>(),
        began.elapsed().as_secs_f64()
    );
    for g in cut.iter().chain(&failed) {
        match g {
            Got::Cut { started, why } => {
                let (i, dt) = nearest(*started);
                println!(
                    "  cut: a stream begun {dt:+.3}s from deleting {}: {why}",
                    rounds[i].0
                );
            }
            Got::Failed { stream, sent, why } => {
                let (i, dt) = nearest(*sent);
                println!(
                    "  failed: {} request sent {dt:+.3}s from deleting {}: {why}",
                    if *stream { "a streamed" } else { "a" },
                    rounds[i].0
                );
            }
            Got::Whole => {}
        }
    }
    assert!(
        failed.is_empty(),
        "every request that had not begun streaming when the replica went is answered: {} failed (above)",
        failed.len()
    );
    let last_ready = rounds.last().map(|r| r.2).unwrap_or_else(Instant::now);
    assert!(
        cut.iter()
            .all(|g| matches!(g, Got::Cut { started, .. } if *started <= last_ready)),
        "only streams in flight while a replica went are cut: {cut:#?}"
    );
}
