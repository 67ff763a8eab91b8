//! The sidecar between a client and a scripted engine, over real sockets on
//! loopback: streams pass event by event and unchanged (but for the usage
//! chunk the sidecar asked for), measurements land in /metrics, the adapter
//! API needs the token, readiness follows the engine.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::response::Response;
use axum::routing::{get, post};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use strata_sidecar::app::{App, Config};
use strata_sidecar::engine::EngineKind;
use strata_sidecar::metrics::Metrics;
use strata_sidecar::server::{self, Intervals};

use common::until;

/// The scripted engine's knobs and what it saw.
#[derive(Default)]
struct Engine {
    bodies: Mutex<Vec<Value>>,
    lora_calls: Mutex<Vec<(String, Value)>>,
    healthy: AtomicBool,
    good_metrics: AtomicBool,
    release: tokio::sync::Notify,
    hold_stream: AtomicBool,
    streams: AtomicUsize,
}

// The stream as the engine sends it, cut into frames at awkward places: the
// second event is split in two frames, the third and fourth are merged, and
// a two-byte character is split between frames.
fn frames(include_usage: bool) -> Vec<Vec<u8>> {
    let ev = |v: Value| format!("data: {v}\n\n").into_bytes();
    let role =
        ev(json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}));
    let t1 = ev(json!({"choices": [{"index": 0, "delta": {"content": "Bonjour"}}]}));
    let t2 = ev(json!({"choices": [{"index": 0, "delta": {"content": " à"}}]}));
    let t3 = ev(
        json!({"choices": [{"index": 0, "delta": {"content": " tous"}, "finish_reason": "length"}]}),
    );
    let usage = ev(
        json!({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}}),
    );
    let done = b"data: [DONE]\n\n".to_vec();
    let split = t1.len() / 2;
    let accent = t2.iter().position(|b| *b == 0xC3).expect("à") + 1;
    let mut out = vec![
        role,
        t1[..split].to_vec(),
        t1[split..].to_vec(),
        t2[..accent].to_vec(),
    ];
    let mut merged = t2[accent..].to_vec();
    merged.extend(t3);
    out.push(merged);
    if include_usage {
        out.push(usage);
    }
    out.push(done);
    out
}

async fn chat(State(e): State<Arc<Engine>>, body: Bytes) -> Response {
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    e.bodies.lock().expect("lock").push(v.clone());
    if v["stream"] != json!(true) {
        let out = json!({"choices": [{"message": {"role": "assistant", "content": "hi"}}], "usage": {"prompt_tokens": 3, "completion_tokens": 7}});
        return Response::new(Body::from(out.to_string()));
    }
    e.streams.fetch_add(1, Ordering::SeqCst);
    let include = v.pointer("/stream_options/include_usage") == Some(&json!(true));
    let frames = frames(include);
    let hold = e.hold_stream.load(Ordering::SeqCst);
    let engine = e.clone();
    let stream = futures::stream::unfold(
        (0usize, frames, engine),
        move |(i, frames, engine)| async move {
            if i >= frames.len() {
                return None;
            }
            if i == 1 && hold {
                // Hold the rest until the test has seen the first event.
                engine.release.notified().await;
            } else if i > 0 {
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            let chunk = Bytes::from(frames[i].clone());
            Some((Ok::<_, Infallible>(chunk), (i + 1, frames, engine)))
        },
    );
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .expect("response")
}

async fn lora(State(e): State<Arc<Engine>>, uri: axum::http::Uri, body: Bytes) -> Response {
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    e.lora_calls
        .lock()
        .expect("lock")
        .push((uri.path().to_string(), v));
    Response::new(Body::from("Success"))
}

async fn health(State(e): State<Arc<Engine>>) -> Response {
    let code = if e.healthy.load(Ordering::SeqCst) {
        200
    } else {
        503
    };
    Response::builder()
        .status(code)
        .body(Body::empty())
        .expect("response")
}

async fn metrics(State(e): State<Arc<Engine>>) -> Response {
    let text = if e.good_metrics.load(Ordering::SeqCst) {
        "vllm:num_requests_waiting{model_name=\"m\"} 6\nvllm:num_requests_running{model_name=\"m\"} 2\nvllm:kv_cache_usage_perc{model_name=\"m\"} 0.5\n"
    } else {
        "<html>not metrics</html>"
    };
    Response::new(Body::from(text))
}

struct Harness {
    engine: Arc<Engine>,
    api: SocketAddr,
    admin: SocketAddr,
    client: Client<HttpConnector, Full<Bytes>>,
    _token_dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

const TOKEN: &str = "s3cr3t-operator-token";

async fn start() -> Harness {
    start_with(None, "http://127.0.0.1:9".into()).await
}

async fn start_with(adapter_dir: Option<std::path::PathBuf>, hf_endpoint: String) -> Harness {
    let engine = Arc::new(Engine::default());
    engine.healthy.store(true, Ordering::SeqCst);
    engine.good_metrics.store(true, Ordering::SeqCst);
    let router = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/load_lora_adapter", post(lora))
        .route("/v1/unload_lora_adapter", post(lora))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(engine.clone());
    let engine_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let engine_addr = engine_listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(engine_listener, router).await });

    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("token");
    let metrics = Metrics::new().expect("metrics");
    let app = Arc::new(App::new(
        Config {
            engine_url: format!("http://{engine_addr}"),
            engine: EngineKind::Vllm,
            health_path: "/health".into(),
            metrics_path: "/metrics".into(),
            served_model: "llama".into(),
            adapter_token_file: Some(token_file),
            adapter_dir,
            hf_endpoint,
            limits: Default::default(),
            admin_tls: None,
        },
        metrics,
    ));
    let api = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let (api_addr, admin_addr) = (api.local_addr().expect("a"), admin.local_addr().expect("a"));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let intervals = Intervals {
        health: Duration::from_millis(50),
        engine_metrics: Duration::from_millis(50),
        adapters: Duration::from_millis(200),
    };
    tokio::spawn(server::run(app, api, admin, intervals, async move {
        let _ = rx.await;
    }));
    Harness {
        engine,
        api: api_addr,
        admin: admin_addr,
        client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        _token_dir: dir,
        _stop: tx,
    }
}

impl Harness {
    async fn send(
        &self,
        method: &str,
        addr: SocketAddr,
        path: &str,
        body: Option<Value>,
        token: Option<&str>,
    ) -> (u16, String) {
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"));
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let resp = self
            .client
            .request(req.body(Full::new(body)).expect("req"))
            .await
            .expect("response");
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    async fn metrics(&self) -> String {
        self.send("GET", self.admin, "/metrics", None, None).await.1
    }

    /// A chat request's status and the load its answer reported.
    async fn load_reported(&self) -> (u16, Option<String>) {
        let req = http::Request::post(format!("http://{}/v1/chat/completions", self.api))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(
                json!({"model": "llama", "messages": []}).to_string(),
            )))
            .expect("req");
        let resp = self.client.request(req).await.expect("response");
        let load = resp
            .headers()
            .get(strata_net::load::HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let status = resp.status().as_u16();
        let _ = resp.into_body().collect().await;
        (status, load)
    }
}

fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn streams_pass_unchanged_event_by_event_and_are_measured() {
    let h = start().await;
    h.engine.hold_stream.store(true, Ordering::SeqCst);
    let req = json!({"model": "llama", "stream": true, "messages": [{"role": "user", "content": "salut"}]});
    let http_req = http::Request::post(format!("http://{}/v1/chat/completions", h.api))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(req.to_string())))
        .expect("req");
    let resp = h.client.request(http_req).await.expect("response");
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    // The first event arrives while the engine still holds the rest: nothing is buffered.
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("first event in time");
    let first = first
        .expect("a frame")
        .expect("ok")
        .into_data()
        .expect("data");
    assert!(String::from_utf8_lossy(&first).contains("\"role\":\"assistant\""));
    h.engine.release.notify_one();
    let mut rest = first.to_vec();
    while let Some(frame) = body.frame().await {
        rest.extend_from_slice(&frame.expect("frame").into_data().expect("data"));
    }
    // The client sees exactly the engine's stream without the usage chunk it did not ask for.
    let expected: Vec<u8> = frames(false).concat();
    assert_eq!(
        String::from_utf8_lossy(&rest),
        String::from_utf8_lossy(&expected)
    );
    // The engine was asked for usage.
    let seen = h
        .engine
        .bodies
        .lock()
        .expect("lock")
        .last()
        .cloned()
        .expect("body");
    assert_eq!(
        seen.pointer("/stream_options/include_usage"),
        Some(&json!(true))
    );

    let m = h.metrics().await;
    assert_eq!(
        metric(
            &m,
            "strata_request_time_to_first_token_seconds_count{adapter=\"\",model=\"llama\"}"
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "strata_request_generation_tokens_total{adapter=\"\",model=\"llama\"}"
        ),
        Some(4.0),
        "tokens from usage"
    );
    assert_eq!(
        metric(
            &m,
            "strata_request_prompt_tokens_total{adapter=\"\",model=\"llama\"}"
        ),
        Some(11.0)
    );
    assert_eq!(
        metric(
            &m,
            "strata_request_inter_token_latency_seconds_count{adapter=\"\",model=\"llama\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            "strata_requests_total{adapter=\"\",endpoint=\"chat\",model=\"llama\",outcome=\"success\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "strata_requests_in_flight{model=\"llama\"}"),
        Some(0.0)
    );
    // TTFT is at the first content chunk (after the held role chunk), not the role chunk.
    let ttft_sum = metric(&m, "strata_request_time_to_first_token_seconds_sum").expect("sum");
    assert!(ttft_sum > 0.0);
}

#[tokio::test]
async fn usage_the_client_asked_for_is_kept_and_plain_requests_are_counted() {
    let h = start().await;
    let req = json!({"model": "llama", "stream": true, "stream_options": {"include_usage": true}, "messages": []});
    let (status, body) = h
        .send("POST", h.api, "/v1/chat/completions", Some(req), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(body, String::from_utf8_lossy(&frames(true).concat()));
    let (status, body) = h
        .send(
            "POST",
            h.api,
            "/v1/chat/completions",
            Some(json!({"model": "llama", "messages": []})),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert!(body.contains("\"completion_tokens\":7"));
    let m = h.metrics().await;
    assert_eq!(
        metric(
            &m,
            "strata_request_generation_tokens_total{adapter=\"\",model=\"llama\"}"
        ),
        Some(11.0),
        "4 + 7"
    );
    assert_eq!(
        metric(
            &m,
            "strata_request_e2e_latency_seconds_count{adapter=\"\",model=\"llama\"}"
        ),
        Some(2.0)
    );
}

#[tokio::test]
async fn the_adapter_api_needs_the_token_and_is_idempotent() {
    let h = start().await;
    let load = json!({"name": "sql", "source": "/adapters/sql"});
    for token in [None, Some("wrong")] {
        let (status, _) = h
            .send("POST", h.admin, "/v1/adapters", Some(load.clone()), token)
            .await;
        assert_eq!(status, 401, "token {token:?}");
    }
    assert!(
        h.engine.lora_calls.lock().expect("lock").is_empty(),
        "nothing loaded without the token"
    );
    // A request for the adapter before it is loaded: 404 naming it.
    let ask = json!({"model": "sql", "messages": []});
    let (status, body) = h
        .send(
            "POST",
            h.api,
            "/v1/chat/completions",
            Some(ask.clone()),
            None,
        )
        .await;
    assert_eq!(status, 404);
    assert!(body.contains("`sql`"), "{body}");

    let (status, body) = h
        .send(
            "POST",
            h.admin,
            "/v1/adapters",
            Some(load.clone()),
            Some(TOKEN),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = h
        .send(
            "POST",
            h.admin,
            "/v1/adapters",
            Some(load.clone()),
            Some(TOKEN),
        )
        .await;
    assert_eq!(status, 200);
    assert!(body.contains("\"changed\":false"));
    {
        let calls = h.engine.lora_calls.lock().expect("lock");
        assert_eq!(calls.len(), 1, "loaded once");
        assert_eq!(calls[0].0, "/v1/load_lora_adapter");
        assert_eq!(
            calls[0].1,
            json!({"lora_name": "sql", "lora_path": "/adapters/sql"})
        );
    }
    let (status, _) = h
        .send(
            "POST",
            h.admin,
            "/v1/adapters",
            Some(json!({"name": "sql", "source": "/other"})),
            Some(TOKEN),
        )
        .await;
    assert_eq!(status, 409, "another source under the same name");
    let (_, list) = h
        .send("GET", h.admin, "/v1/adapters", None, Some(TOKEN))
        .await;
    assert!(list.contains("\"sql\""));

    let (status, _) = h
        .send(
            "POST",
            h.api,
            "/v1/chat/completions",
            Some(ask.clone()),
            None,
        )
        .await;
    assert_eq!(status, 200, "the adapter is served now");
    let m = h.metrics().await;
    assert_eq!(
        metric(
            &m,
            "strata_request_generation_tokens_total{adapter=\"sql\",model=\"llama\"}"
        ),
        Some(7.0),
        "labelled by adapter"
    );

    let (status, _) = h
        .send("DELETE", h.admin, "/v1/adapters/sql", None, Some(TOKEN))
        .await;
    assert_eq!(status, 200);
    let (status, body) = h
        .send("DELETE", h.admin, "/v1/adapters/sql", None, Some(TOKEN))
        .await;
    assert_eq!(status, 200);
    assert!(body.contains("not_loaded"));
    assert_eq!(
        h.engine.lora_calls.lock().expect("lock").len(),
        2,
        "one unload reached the engine"
    );
    let (status, _) = h
        .send("DELETE", h.admin, "/v1/adapters/sql", None, None)
        .await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn readiness_follows_the_engine_and_bad_engine_metrics_read_as_unknown() {
    let h = start().await;
    until("ready", async || {
        h.send("GET", h.admin, "/readyz", None, None).await.0 == 200
    })
    .await;
    h.engine.healthy.store(false, Ordering::SeqCst);
    until("not ready", async || {
        h.send("GET", h.admin, "/readyz", None, None).await.0 == 503
    })
    .await;
    assert_eq!(
        h.send("GET", h.admin, "/healthz", None, None).await.0,
        200,
        "the sidecar itself is alive"
    );
    h.engine.healthy.store(true, Ordering::SeqCst);
    until("ready again", async || {
        h.send("GET", h.admin, "/readyz", None, None).await.0 == 200
    })
    .await;

    until("engine queue read", async || {
        metric(&h.metrics().await, "strata_engine_queue_depth") == Some(6.0)
    })
    .await;
    let m = h.metrics().await;
    assert_eq!(metric(&m, "strata_engine_kv_cache_usage_ratio"), Some(0.5));
    assert_eq!(metric(&m, "strata_engine_metrics_up"), Some(1.0));
    // The load reported to the gateway on each answer: this request, and
    // the KV-cache use last scraped.
    assert_eq!(
        h.load_reported().await,
        (200, Some("in-flight=1; kv=0.500".to_string()))
    );
    h.engine.good_metrics.store(false, Ordering::SeqCst);
    until("unknown", async || {
        metric(&h.metrics().await, "strata_engine_metrics_up") == Some(0.0)
    })
    .await;
    // The proxy keeps working; the unknown KV use is left out.
    assert_eq!(
        h.load_reported().await,
        (200, Some("in-flight=1".to_string()))
    );
}

#[tokio::test]
async fn without_nvml_the_gpu_gauge_says_none_and_nothing_breaks() {
    let metrics = Metrics::new().expect("metrics");
    metrics.gpu_visible.set(5);
    let sampler = strata_sidecar::nvml::start(
        Some("/nonexistent/libnvidia-ml.so.1"),
        None,
        Duration::from_secs(1),
        metrics.clone(),
    );
    assert!(sampler.is_none());
    assert!(metrics.render().contains("strata_gpu_visible 0"));
}

#[tokio::test]
async fn an_unreachable_engine_is_a_clear_502() {
    let metrics = Metrics::new().expect("metrics");
    let app = Arc::new(App::new(
        Config {
            engine_url: "http://127.0.0.1:9".into(),
            engine: EngineKind::Vllm,
            health_path: "/health".into(),
            metrics_path: "/metrics".into(),
            served_model: "llama".into(),
            adapter_token_file: None,
            adapter_dir: None,
            hf_endpoint: "http://127.0.0.1:9".into(),
            limits: Default::default(),
            admin_tls: None,
        },
        metrics.clone(),
    ));
    let api = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = api.local_addr().expect("addr");
    let intervals = Intervals {
        health: Duration::from_millis(50),
        engine_metrics: Duration::from_millis(50),
        adapters: Duration::from_millis(200),
    };
    tokio::spawn(server::run(
        app,
        api,
        admin,
        intervals,
        std::future::pending(),
    ));
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let req = http::Request::post(format!("http://{addr}/v1/completions"))
        .body(Full::new(Bytes::from(
            json!({"model": "llama", "prompt": "x"}).to_string(),
        )))
        .expect("req");
    let resp = client.request(req).await.expect("response");
    assert_eq!(resp.status(), 502);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("unreachable"));
    assert!(metrics.render().contains("outcome=\"engine_unavailable\""));
}

/// A fake Hugging Face hub on loopback: the adapter's files need the bearer
/// token; the weights redirect to a "CDN" on another port, which refuses
/// requests that carry the token (it must not leak off the hub).
async fn fake_hub() -> (SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
    use axum::response::IntoResponse;
    let seen: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let cdn_seen = seen.clone();
    let cdn = Router::new().route(
        "/blob/weights",
        get(move |headers: axum::http::HeaderMap| {
            let seen = cdn_seen.clone();
            async move {
                seen.lock().expect("lock").push("cdn".into());
                if headers.contains_key("authorization") {
                    return (
                        axum::http::StatusCode::BAD_REQUEST,
                        "token leaked to the CDN",
                    )
                        .into_response();
                }
                (axum::http::StatusCode::OK, "WEIGHTS").into_response()
            }
        }),
    );
    let cdn_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let cdn_addr = cdn_listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(cdn_listener, cdn).await });
    let hub_seen = seen.clone();
    let hub = Router::new().route(
        "/acme/sql-lora/resolve/v2/{file}",
        get(
            move |axum::extract::Path(file): axum::extract::Path<String>,
                  headers: axum::http::HeaderMap| {
                let seen = hub_seen.clone();
                async move {
                    seen.lock().expect("lock").push(file.clone());
                    let authorized = headers.get("authorization").and_then(|v| v.to_str().ok())
                        == Some("Bearer hf_good");
                    if !authorized {
                        return (axum::http::StatusCode::UNAUTHORIZED, "Invalid credentials")
                            .into_response();
                    }
                    match file.as_str() {
                        "adapter_config.json" => {
                            (axum::http::StatusCode::OK, "{\"r\": 8}").into_response()
                        }
                        "adapter_model.safetensors" => Response::builder()
                            .status(302)
                            .header("location", format!("http://{cdn_addr}/blob/weights"))
                            .body(Body::empty())
                            .expect("redirect"),
                        _ => axum::http::StatusCode::NOT_FOUND.into_response(),
                    }
                }
            },
        ),
    );
    let hub_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let hub_addr = hub_listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(hub_listener, hub).await });
    (hub_addr, seen)
}

#[tokio::test]
async fn an_adapter_with_credentials_is_fetched_by_the_sidecar_and_loaded_from_disk() {
    let (hub, seen) = fake_hub().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let h = start_with(Some(dir.path().to_path_buf()), format!("http://{hub}")).await;

    // Refused credentials: a clear error naming the credentials, and the
    // engine is not asked.
    let bad = json!({"name": "sql", "source": "hf://acme/sql-lora@v2", "credentials": {"HF_TOKEN": "hf_wrong"}});
    let (status, body) = h
        .send("POST", h.admin, "/v1/adapters", Some(bad), Some(TOKEN))
        .await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("401") && body.contains("HF_TOKEN"), "{body}");
    assert!(h.engine.lora_calls.lock().expect("lock").is_empty());

    // The right token: fetched (the weights through the CDN redirect, without
    // the token), then the engine loads the local copy.
    let good = json!({"name": "sql", "source": "hf://acme/sql-lora@v2", "credentials": {"HF_TOKEN": "hf_good"}});
    let (status, body) = h
        .send("POST", h.admin, "/v1/adapters", Some(good), Some(TOKEN))
        .await;
    assert_eq!(status, 201, "{body}");
    let local = dir.path().join("sql");
    assert_eq!(
        std::fs::read_to_string(local.join("adapter_config.json")).expect("config"),
        "{\"r\": 8}"
    );
    assert_eq!(
        std::fs::read_to_string(local.join("adapter_model.safetensors")).expect("weights"),
        "WEIGHTS"
    );
    assert!(
        seen.lock().expect("lock").iter().any(|s| s == "cdn"),
        "the redirect was followed"
    );
    {
        let calls = h.engine.lora_calls.lock().expect("lock");
        assert_eq!(calls.len(), 1);
        assert_eq!(
            calls[0].1,
            json!({"lora_name": "sql", "lora_path": local.display().to_string()})
        );
    }
    // Unloading removes the local copy.
    let (status, _) = h
        .send("DELETE", h.admin, "/v1/adapters/sql", None, Some(TOKEN))
        .await;
    assert_eq!(status, 200);
    assert!(!local.exists(), "the fetched files are removed on unload");
}

#[tokio::test]
async fn a_whole_answer_keeps_the_engines_length_and_is_measured_before_it_ends() {
    let h = start().await;
    let req = json!({"model": "llama", "messages": []});
    let http_req = http::Request::post(format!("http://{}/v1/chat/completions", h.api))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(req.to_string())))
        .expect("req");
    let resp = h.client.request(http_req).await.expect("response");
    assert_eq!(resp.status(), 200);
    let length: Option<usize> = resp
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    assert!(
        resp.headers().get("transfer-encoding").is_none(),
        "not re-chunked"
    );
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(length, Some(bytes.len()), "the engine's length, passed on");
    // Counted by the time the client has the last byte (the client, told
    // the length, does not wait for the stream's end).
    let m = h.metrics().await;
    assert_eq!(
        metric(
            &m,
            "strata_requests_total{adapter=\"\",endpoint=\"chat\",model=\"llama\",outcome=\"success\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            "strata_request_generation_tokens_total{adapter=\"\",model=\"llama\"}"
        ),
        Some(7.0)
    );
}
