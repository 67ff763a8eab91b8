//! The gateway's router against fake replicas on 127.0.0.1, fed a routing
//! table directly (no Kubernetes): prefix affinity, spread, adapters,
//! retries after a connection failure, streaming passed through, the load
//! replicas report.

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::response::Response;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use strata_gateway::metrics::Metrics;
use strata_gateway::proxy::{Gateway, Settings, WakeFn};
use strata_gateway::table::{ModelRoutes, Replica, Snapshot};
use tokio::sync::{Notify, watch};

/// What a fake replica saw.
#[derive(Clone, Default)]
struct Seen {
    hits: Arc<Mutex<Vec<String>>>,
    /// Released by the test between a streamed answer's two chunks, or
    /// before a draining replica's 503.
    go_on: Arc<Notify>,
    /// Told when a draining replica has a request.
    arrived: Arc<Notify>,
}

async fn upstream_handler(
    State((name, seen)): State<(String, Seen)>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    // Hop-by-hop headers (and those Connection names) never arrive.
    if headers.contains_key("x-secret") {
        return Response::builder()
            .status(500)
            .body(Body::from("x-secret was forwarded"))
            .expect("response");
    }
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if let Ok(mut h) = seen.hits.lock() {
        h.push(name.clone());
    }
    // A replica going away: holds the request until the test has taken it
    // out of the table, then answers 503 as a draining sidecar would.
    if name.starts_with("r-going") && v["drain"] == json!(true) {
        seen.arrived.notify_one();
        seen.go_on.notified().await;
        return Response::builder()
            .status(503)
            .header("x-replica", name)
            .body(Body::from("draining"))
            .expect("response");
    }
    // A replica whose pod was deleted: the node stopped its engine, so
    // its sidecar answers 502 at once, before the gateway's view has
    // dropped it.
    if name.starts_with("r-stopping") {
        seen.arrived.notify_one();
        return Response::builder()
            .status(502)
            .header("x-replica", name)
            .body(Body::from("the engine is unreachable"))
            .expect("response");
    }
    // A live replica shedding load.
    if name.starts_with("r-full") {
        return Response::builder()
            .status(503)
            .header("x-replica", name)
            .header("retry-after", "1")
            .body(Body::from("too many requests in flight"))
            .expect("response");
    }
    if v["stream"] == json!(true) {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        let go_on = seen.go_on.clone();
        tokio::spawn(async move {
            let _ = tx.send(Bytes::from_static(b"data: {\"n\":1}\n\n")).await;
            go_on.notified().await;
            let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
        });
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|c| (Ok::<_, Infallible>(c), rx))
        });
        return Response::builder()
            .header("content-type", "text/event-stream")
            .header("x-replica", name)
            .body(Body::from_stream(stream))
            .expect("response");
    }
    // As a sidecar reports its load: a busy replica holds 40 requests
    // from elsewhere.
    let load = if name.starts_with("r-busy") {
        "in-flight=41; kv=0.5"
    } else {
        "in-flight=1; kv=0.1"
    };
    Response::builder()
        .header("x-replica", name.clone())
        .header(strata_net::load::HEADER, load)
        .body(Body::from(json!({"replica": name}).to_string()))
        .expect("response")
}

/// A listener on 127.0.0.1 and its address.
async fn loopback() -> (tokio::net::TcpListener, SocketAddr) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    (l, addr)
}

async fn upstream(name: &str) -> (SocketAddr, Seen) {
    let seen = Seen::default();
    let app = Router::new()
        .fallback(upstream_handler)
        .with_state((name.to_string(), seen.clone()));
    let (l, addr) = loopback().await;
    tokio::spawn(async move { axum::serve(l, app).await });
    (addr, seen)
}

/// An address nobody listens on.
async fn closed() -> SocketAddr {
    loopback().await.1
}

fn replica(name: &str, addr: SocketAddr, adapters: &[&str]) -> Replica {
    Replica {
        name: name.into(),
        addr,
        adapters: adapters.iter().map(|a| a.to_string()).collect(),
    }
}

struct World {
    url: String,
    client: Client<HttpConnector, Full<Bytes>>,
    metrics: Metrics,
    table: watch::Sender<Arc<Snapshot>>,
}

/// The one Model's table.
fn table(replicas: Vec<Replica>) -> Snapshot {
    Snapshot {
        models: vec![ModelRoutes {
            namespace: "ns".into(),
            name: "llama".into(),
            served: "meta/llama".into(),
            adapters: BTreeSet::from(["sql".to_string()]),
            wakeable: false,
            replicas,
        }],
        synced: true,
    }
}

async fn gateway(replicas: Vec<Replica>) -> World {
    let wake: WakeFn = Arc::new(|_, _| Box::pin(async { Ok(()) }));
    gateway_with(table(replicas), Settings::default(), wake).await
}

async fn gateway_with(snapshot: Snapshot, settings: Settings, wake: WakeFn) -> World {
    let (tx, rx) = watch::channel(Arc::new(snapshot));
    let metrics = Metrics::new().expect("metrics");
    let g = Gateway::new(rx, wake, settings, metrics.clone());
    let (l, addr) = loopback().await;
    let url = format!("http://{addr}");
    tokio::spawn(strata_gateway::proxy::serve(l, g, std::future::pending()));
    World {
        url,
        client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        metrics,
        table: tx,
    }
}

impl World {
    /// POSTs `body` (with a hop-by-hop header that must not be forwarded);
    /// the answer's head, its body still to read.
    async fn send(&self, path: &str, body: Value) -> hyper::Response<Incoming> {
        let req = hyper::Request::post(format!("{}{path}", self.url))
            .header("content-type", "application/json")
            .header("connection", "x-secret")
            .header("x-secret", "hop")
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("request");
        tokio::time::timeout(Duration::from_secs(10), self.client.request(req))
            .await
            .expect("in time")
            .expect("answer")
    }

    /// POSTs `body`; the status and the replica that answered.
    async fn post(&self, path: &str, body: Value) -> (u16, String) {
        let resp = self.send(path, body).await;
        let status = resp.status().as_u16();
        let replica = replica_of(&resp);
        let _ = resp.into_body().collect().await;
        (status, replica)
    }

    /// Opens a streamed chat request and keeps it in flight (the fake
    /// replica holds its stream after the first event): the replica that
    /// took it, and the answer to drop when done.
    async fn hold(&self, system: &str, user: &str) -> (String, hyper::Response<Incoming>) {
        let mut body = chat("meta/llama", system, user);
        body["stream"] = json!(true);
        let resp = self.send("/v1/chat/completions", body).await;
        assert_eq!(resp.status(), 200);
        (replica_of(&resp), resp)
    }

    /// Sends `n` requests, the i-th with `body(i)`, each answered 200; the
    /// replicas that answered.
    async fn answered_by(
        &self,
        path: &str,
        n: usize,
        body: impl Fn(usize) -> Value,
    ) -> Vec<String> {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let (status, r) = self.post(path, body(i)).await;
            assert_eq!(status, 200, "request {i}");
            out.push(r);
        }
        out
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let req = hyper::Request::get(format!("{}{path}", self.url))
            .body(Full::new(Bytes::new()))
            .expect("request");
        let resp = self.client.request(req).await.expect("answer");
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }
}

/// The replica an answer names (`x-replica`, set by the fake replicas).
fn replica_of(resp: &hyper::Response<Incoming>) -> String {
    resp.headers()
        .get("x-replica")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// Completions for `model`, each with its own prompt.
fn prompts(model: &'static str) -> impl Fn(usize) -> Value {
    move |i| json!({"model": model, "prompt": format!("prompt {i} for {model}")})
}

fn chat(model: &str, system: &str, user: &str) -> Value {
    json!({"model": model, "messages": [
        {"role": "system", "content": system},
        {"role": "user", "content": user}
    ]})
}

async fn three() -> (Vec<Replica>, HashMap<String, Seen>) {
    let mut reps = Vec::new();
    let mut seen = HashMap::new();
    for (name, adapters) in [("r-a", vec![]), ("r-b", vec![]), ("r-c", vec!["sql"])] {
        let (addr, s) = upstream(name).await;
        reps.push(replica(name, addr, &adapters));
        seen.insert(name.to_string(), s);
    }
    (reps, seen)
}

#[tokio::test]
async fn a_shared_prefix_lands_on_one_replica_and_different_ones_spread() {
    let (reps, _) = three().await;
    let w = gateway(reps).await;
    let system = "You are a careful assistant for the ACME company. ".repeat(8);
    let used: BTreeSet<String> = w
        .answered_by("/v1/chat/completions", 12, |i| {
            chat("meta/llama", &system, &format!("question {i}"))
        })
        .await
        .into_iter()
        .collect();
    assert_eq!(used.len(), 1, "one replica for one prefix: {used:?}");

    let used: BTreeSet<String> = w
        .answered_by("/v1/completions", 30, prompts("meta/llama"))
        .await
        .into_iter()
        .collect();
    assert_eq!(used.len(), 3, "different prefixes spread: {used:?}");

    // The per-Model path reaches the same replicas; the Model's own name
    // works when no served name takes it.
    let (status, r) = w
        .post(
            "/models/ns/llama/v1/chat/completions",
            chat("meta/llama", &system, "hello"),
        )
        .await;
    assert_eq!(status, 200);
    assert!(r.starts_with("r-"));
    let (status, _) = w
        .post("/v1/completions", json!({"model": "llama", "prompt": "x"}))
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_recurring_prefix_stays_on_its_replica_under_the_spill_floor() {
    // A prefix routed before: six requests of it held at once all stay on
    // its replica (fewer than the floor's 8 there); without the floor the
    // load factor alone (ceil(1.25 * (in flight + 1) / 3)) spills them.
    // (That a prefix never routed gets no floor is routing.rs's unit test.)
    let system = "You answer questions about the ACME handbook. ".repeat(8);
    for floor in [8, 0] {
        let (reps, _) = three().await;
        let mut settings = Settings::default();
        settings.routing.spill_floor = floor;
        let wake: WakeFn = Arc::new(|_, _| Box::pin(async { Ok(()) }));
        let w = gateway_with(table(reps), settings, wake).await;
        let (status, home) = w
            .post("/v1/chat/completions", chat("meta/llama", &system, "first"))
            .await;
        assert_eq!(status, 200);
        let mut held = Vec::new();
        for i in 0..6 {
            held.push(w.hold(&system, &format!("user {i}")).await);
        }
        let on: BTreeSet<&str> = held.iter().map(|(r, _)| r.as_str()).collect();
        if floor > 0 {
            assert_eq!(on, BTreeSet::from([home.as_str()]), "floor {floor}");
        } else {
            assert!(on.len() > 1, "floor 0 spills: {on:?}");
        }
    }
}

#[tokio::test]
async fn adapter_requests_reach_only_replicas_that_carry_it() {
    let (reps, seen) = three().await;
    let w = gateway(reps).await;
    let by = w.answered_by("/v1/completions", 15, prompts("sql")).await;
    assert!(by.iter().all(|r| r == "r-c"), "{by:?}");
    let hits = |n: &str| seen[n].hits.lock().map(|h| h.len()).unwrap_or(0);
    assert_eq!((hits("r-a"), hits("r-b"), hits("r-c")), (0, 0, 15));
}

#[tokio::test]
async fn a_connection_failure_is_tried_on_another_replica() {
    let (addr, seen) = upstream("r-live").await;
    let w = gateway(vec![
        replica("r-dead", closed().await, &[]),
        replica("r-live", addr, &[]),
    ])
    .await;
    let by = w
        .answered_by("/v1/completions", 20, prompts("meta/llama"))
        .await;
    assert!(by.iter().all(|r| r == "r-live"), "{by:?}");
    assert_eq!(seen.hits.lock().map(|h| h.len()).unwrap_or(0), 20);
    let retried = w.metrics.retries.with_label_values(&["ns/llama"]).get();
    assert!(
        retried > 0,
        "some requests were picked for the dead one first"
    );
}

#[tokio::test]
async fn a_503_from_a_replica_going_away_is_tried_on_another() {
    let (going, seen) = upstream("r-going").await;
    let (stays, _) = upstream("r-stays").await;
    let both = vec![
        replica("r-going", going, &[]),
        replica("r-stays", stays, &[]),
    ];
    let w = Arc::new(gateway(both.clone()).await);
    // A prompt whose replica is r-going: the others are answered by r-stays.
    for i in 0..64 {
        let w2 = w.clone();
        let mut req = tokio::spawn(async move {
            w2.post(
                "/v1/completions",
                json!({"model": "meta/llama", "prompt": format!("p{i}"), "drain": true}),
            )
            .await
        });
        tokio::select! {
            done = &mut req => {
                assert_eq!(done.expect("request").0, 200);
                continue;
            }
            _ = seen.arrived.notified() => {}
        }
        // r-going has it and leaves the ready set before it answers 503.
        w.table.send_replace(Arc::new(table(vec![both[1].clone()])));
        tokio::time::sleep(Duration::from_millis(100)).await;
        seen.go_on.notify_one();
        let (status, by) = req.await.expect("request");
        assert_eq!((status, by.as_str()), (200, "r-stays"));
        assert_eq!(w.metrics.retries.with_label_values(&["ns/llama"]).get(), 1);
        return;
    }
    panic!("no prompt of 64 went to r-going first");
}

#[tokio::test]
async fn a_502_from_a_replica_the_view_still_lists_is_retried_once_the_view_drops_it() {
    let (stopping, seen) = upstream("r-stopping").await;
    let (stays, _) = upstream("r-stays").await;
    let both = vec![
        replica("r-stopping", stopping, &[]),
        replica("r-stays", stays, &[]),
    ];
    let w = Arc::new(gateway(both.clone()).await);
    for i in 0..64 {
        let w2 = w.clone();
        let mut req = tokio::spawn(async move {
            w2.post(
                "/v1/completions",
                json!({"model": "meta/llama", "prompt": format!("p{i}")}),
            )
            .await
        });
        tokio::select! {
            done = &mut req => {
                assert_eq!(done.expect("request"), (200, "r-stays".to_string()));
                continue;
            }
            _ = seen.arrived.notified() => {}
        }
        // r-stopping has answered 502; the view drops it 100 ms later
        // (the watch learning of the deletion), within the settle window.
        tokio::time::sleep(Duration::from_millis(100)).await;
        w.table.send_replace(Arc::new(table(vec![both[1].clone()])));
        let (status, by) = req.await.expect("request");
        assert_eq!((status, by.as_str()), (200, "r-stays"));
        assert_eq!(w.metrics.retries.with_label_values(&["ns/llama"]).get(), 1);
        return;
    }
    panic!("no prompt of 64 went to r-stopping first");
}

#[tokio::test]
async fn a_502_from_a_replica_that_stays_is_answered_after_the_settle_window_and_a_shedding_503_at_once()
 {
    let wake: WakeFn = Arc::new(|_, _| Box::pin(async { Ok(()) }));
    let settle = Duration::from_millis(300);
    let (stopping, _) = upstream("r-stopping").await;
    let w = gateway_with(
        table(vec![replica("r-stopping", stopping, &[])]),
        Settings {
            settle,
            ..Settings::default()
        },
        wake.clone(),
    )
    .await;
    let t = std::time::Instant::now();
    let (status, by) = w.post("/v1/completions", prompts("meta/llama")(0)).await;
    assert_eq!((status, by.as_str()), (502, "r-stopping"));
    assert!(
        t.elapsed() >= settle,
        "waited for the view: {:?}",
        t.elapsed()
    );
    assert_eq!(w.metrics.retries.with_label_values(&["ns/llama"]).get(), 0);

    let (full, _) = upstream("r-full").await;
    let w = gateway_with(
        table(vec![replica("r-full", full, &[])]),
        Settings {
            settle: Duration::from_secs(5),
            ..Settings::default()
        },
        wake,
    )
    .await;
    let t = std::time::Instant::now();
    let (status, by) = w.post("/v1/completions", prompts("meta/llama")(0)).await;
    assert_eq!((status, by.as_str()), (503, "r-full"));
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "a 503 with Retry-After is passed on at once: {:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn a_model_at_zero_is_woken_and_its_requests_wait_within_the_caps() {
    let woken: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = woken.clone();
    let wake: WakeFn = Arc::new(move |ns, name| {
        if let Ok(mut w) = log.lock() {
            w.push(format!("{ns}/{name}"));
        }
        Box::pin(async { Ok(()) })
    });
    let mut zero = table(vec![]);
    zero.models[0].wakeable = true;
    let settings = Settings {
        max_waiting_per_model: 1,
        ..Settings::default()
    };
    let w = Arc::new(gateway_with(zero.clone(), settings, wake).await);
    let w2 = w.clone();
    let waiting = tokio::spawn(async move {
        w2.post(
            "/v1/completions",
            json!({"model": "meta/llama", "prompt": "hi"}),
        )
        .await
    });
    // It asked for a replica, once; a second request finds the Model's one
    // waiting place taken: 503 at once.
    for _ in 0..100 {
        if woken.lock().map(|w| !w.is_empty()).unwrap_or(false) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, _) = w
        .post(
            "/v1/completions",
            json!({"model": "meta/llama", "prompt": "x"}),
        )
        .await;
    assert_eq!(status, 503, "beyond the cap");
    assert_eq!(
        woken.lock().map(|w| w.clone()).unwrap_or_default(),
        ["ns/llama"]
    );
    // A replica becomes ready: the waiting request goes there.
    let (addr, _) = upstream("r-new").await;
    zero.models[0].replicas = vec![replica("r-new", addr, &[])];
    w.table.send_replace(Arc::new(zero));
    let (status, by) = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("in time")
        .expect("request");
    assert_eq!((status, by.as_str()), (200, "r-new"));
    assert_eq!(w.metrics.wakes.get(), 1);
}

#[tokio::test]
async fn a_streamed_answer_passes_through_chunk_by_chunk() {
    let (addr, seen) = upstream("r-s").await;
    let w = gateway(vec![replica("r-s", addr, &[])]).await;
    let mut body = chat("meta/llama", "s", "u");
    body["stream"] = json!(true);
    let req = hyper::Request::post(format!("{}/v1/chat/completions", w.url))
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let resp = w.client.request(req).await.expect("answer");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        w.metrics.in_flight.with_label_values(&["ns/llama"]).get(),
        1
    );
    let mut body = resp.into_body();
    // The first chunk arrives while the replica still holds the second.
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("the first chunk before the answer ends")
        .expect("a frame")
        .expect("data");
    assert_eq!(
        first.into_data().ok(),
        Some(Bytes::from_static(b"data: {\"n\":1}\n\n"))
    );
    seen.go_on.notify_one();
    let rest = tokio::time::timeout(Duration::from_secs(5), body.collect())
        .await
        .expect("the rest")
        .expect("body")
        .to_bytes();
    assert_eq!(rest, Bytes::from_static(b"data: [DONE]\n\n"));
    // The in-flight count ends with the body.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        w.metrics.in_flight.with_label_values(&["ns/llama"]).get(),
        0
    );
}

#[tokio::test]
async fn what_is_not_routable_is_answered_here() {
    let (reps, seen) = three().await;
    let w = gateway(reps).await;
    let (status, list) = w.get("/v1/models").await;
    assert_eq!(status, 200);
    let ids: Vec<&str> = list["data"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["id"].as_str())
        .collect();
    assert_eq!(ids, ["meta/llama", "sql"]);
    assert_eq!(w.get("/v1/models/sql").await.0, 200);
    assert_eq!(w.get("/v1/models/nope").await.0, 404);
    let big = "x".repeat(9 * 1024 * 1024);
    for (path, body, want) in [
        (
            "/v1/completions",
            json!({"model": "nope", "prompt": "x"}),
            404,
        ),
        ("/v1/completions", json!({"prompt": "x"}), 400),
        ("/v1/load_lora_adapter", json!({"model": "sql"}), 404),
        ("/models/ns/llama/v1/load_lora_adapter", json!({}), 404),
        (
            "/models/ns/other/v1/completions",
            json!({"model": "x"}),
            404,
        ),
        (
            "/v1/completions",
            json!({"model": "meta/llama", "prompt": big}),
            413,
        ),
    ] {
        assert_eq!(w.post(path, body).await.0, want, "{path}");
    }
    let total: usize = seen
        .values()
        .map(|s| s.hits.lock().map(|h| h.len()).unwrap_or(0))
        .sum();
    assert_eq!(total, 0, "none of these reached a replica");
}

#[tokio::test]
async fn the_load_a_replica_reports_steers_picks_while_it_is_fresh() {
    let (busy, _) = upstream("r-busy").await;
    let (idle, _) = upstream("r-idle").await;
    let replicas = vec![replica("r-busy", busy, &[]), replica("r-idle", idle, &[])];
    let wake: WakeFn = Arc::new(|_, _| Box::pin(async { Ok(()) }));
    // No prefix affinity: the least loaded takes each request.
    let fresh = Settings {
        prefix_chars: 0,
        ..Settings::default()
    };
    let w = gateway_with(table(replicas.clone()), fresh, wake.clone()).await;
    // Nothing reported yet: both loads are 0, ties rotate, so the first
    // two requests reach both and each reports.
    let first = w
        .answered_by("/v1/completions", 2, prompts("meta/llama"))
        .await;
    assert_eq!(
        first.iter().collect::<BTreeSet<_>>().len(),
        2,
        "ties rotate: {first:?}"
    );
    // Then the busy one's 40 other requests keep ours off it.
    let then = w
        .answered_by("/v1/completions", 12, prompts("meta/llama"))
        .await;
    assert!(then.iter().all(|r| r == "r-idle"), "{then:?}");
    // The report is the gateway's: the client never sees it.
    let req = hyper::Request::post(format!("{}/v1/completions", w.url))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(prompts("meta/llama")(0).to_string())))
        .expect("request");
    let resp = w.client.request(req).await.expect("answer");
    assert_eq!(resp.status(), 200);
    assert!(!resp.headers().contains_key(strata_net::load::HEADER));

    // Reports older than the TTL are forgotten: the loads read 0 again
    // and the two replicas share the requests.
    let stale = Settings {
        prefix_chars: 0,
        signal_ttl: Duration::ZERO,
        ..Settings::default()
    };
    let w = gateway_with(table(replicas), stale, wake).await;
    let spread = w
        .answered_by("/v1/completions", 12, prompts("meta/llama"))
        .await;
    let on_busy = spread.iter().filter(|r| *r == "r-busy").count();
    assert_eq!(on_busy, 6, "{spread:?}");
}
