//! strata-sidecar in front of the engine simulator, over real sockets on
//! loopback: what the sidecar measures agrees with what the client sees and
//! with the engine's own histograms, and load shows up as SLA pressure.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use strata_e2e::sim::{self, SimConfig, Simulator};
use strata_sidecar::app::{App, Config};
use strata_sidecar::engine::EngineKind;
use strata_sidecar::metrics::Metrics;
use strata_sidecar::server::{self, Intervals};

struct Pair {
    api: std::net::SocketAddr,
    engine: std::net::SocketAddr,
    metrics: Metrics,
    sim: Simulator,
    _stops: (
        tokio::sync::oneshot::Sender<()>,
        tokio::sync::oneshot::Sender<()>,
    ),
}

async fn start(config: SimConfig) -> Pair {
    let engine = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let engine_addr = engine.local_addr().expect("addr");
    let sim = Simulator::new(config).expect("config");
    let (s1, r1) = tokio::sync::oneshot::channel::<()>();
    let served = sim.clone();
    tokio::spawn(async move {
        let _ = sim::serve_simulator(engine, served, async move {
            let _ = r1.await;
        })
        .await;
    });
    let metrics = Metrics::new().expect("metrics");
    let app = Arc::new(App::new(
        Config {
            engine_url: format!("http://{engine_addr}"),
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
    let api_addr = api.local_addr().expect("addr");
    let (s2, r2) = tokio::sync::oneshot::channel::<()>();
    let intervals = Intervals {
        health: Duration::from_millis(100),
        engine_metrics: Duration::from_millis(100),
        adapters: Duration::from_millis(200),
    };
    tokio::spawn(server::run(app, api, admin, intervals, async move {
        let _ = r2.await;
    }));
    Pair {
        api: api_addr,
        engine: engine_addr,
        metrics,
        sim,
        _stops: (s1, s2),
    }
}

/// Streams one chat request; returns (client-side TTFT, total, events).
async fn stream_chat(addr: std::net::SocketAddr, max_tokens: u32) -> (Duration, Duration, String) {
    stream_chat_to(addr, "llama", max_tokens).await
}

/// [`stream_chat`] for `model` (the base model or an adapter).
async fn stream_chat_to(
    addr: std::net::SocketAddr,
    model: &str,
    max_tokens: u32,
) -> (Duration, Duration, String) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let body = json!({"model": model, "stream": true, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "a prompt of a few dozen characters, say forty"}]});
    let req = http::Request::post(format!("http://{addr}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("req");
    let start = Instant::now();
    let resp = client.request(req).await.expect("response");
    assert_eq!(resp.status(), 200);
    let mut stream = resp.into_body().into_data_stream();
    let mut text = String::new();
    let mut ttft = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("chunk");
        text.push_str(&String::from_utf8_lossy(&chunk));
        if ttft.is_none() && text.contains("\"content\":\" tok") {
            ttft = Some(start.elapsed());
        }
    }
    (ttft.expect("a token arrived"), start.elapsed(), text)
}

fn value(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{prefix} not in metrics"))
}

#[tokio::test]
async fn the_sidecar_measures_what_the_client_sees() {
    let config = SimConfig {
        itl_ms: 10.0,
        prefill_ms_per_token: 2.0,
        ..SimConfig::new("llama")
    };
    let p = start(config).await;
    let (client_ttft, client_total, text) = stream_chat(p.api, 20).await;
    assert!(
        !text.contains("\"usage\":{"),
        "the usage chunk the sidecar asked for is not forwarded"
    );
    assert!(text.trim_end().ends_with("data: [DONE]"));
    let m = p.metrics.render();
    let ttft = value(&m, "strata_request_time_to_first_token_seconds_sum");
    let itl = value(&m, "strata_request_inter_token_latency_seconds_sum");
    let e2e = value(&m, "strata_request_e2e_latency_seconds_sum");
    assert_eq!(value(&m, "strata_request_generation_tokens_total"), 20.0);
    assert_eq!(
        value(&m, "strata_request_prompt_tokens_total"),
        12.0,
        "ceil(46/4) from the engine's usage"
    );
    // The sidecar sits between client and engine: its window starts after
    // the client's and ends before it, and contains the engine's.
    assert!(
        ttft <= client_ttft.as_secs_f64(),
        "sidecar TTFT {ttft} vs client {client_ttft:?}"
    );
    assert!(
        e2e <= client_total.as_secs_f64(),
        "sidecar e2e {e2e} vs client {client_total:?}"
    );
    // The engine's own figure for the same request.
    let engine = sim::parse_metrics(&p.sim.metrics_text());
    let engine_ttft = engine
        .iter()
        .find(|(k, _)| k.starts_with("vllm:time_to_first_token_seconds_sum"))
        .map(|(_, v)| *v)
        .expect("engine ttft");
    assert!(
        ttft >= engine_ttft,
        "the proxy cannot see a token before the engine produces it: {ttft} < {engine_ttft}"
    );
    assert!(
        ttft - engine_ttft < 0.05,
        "proxy overhead on TTFT: sidecar {ttft} vs engine {engine_ttft}"
    );
    assert!(
        itl > 0.008 && itl < 0.03,
        "ITL about 10 ms per token at batch 1: {itl}"
    );
}

#[tokio::test]
async fn queueing_under_load_shows_as_time_to_first_token() {
    // Two sequences at a time; eight concurrent requests must queue.
    let config = SimConfig {
        max_batch: 2,
        itl_ms: 5.0,
        prefill_ms_per_token: 0.5,
        ..SimConfig::new("llama")
    };
    let p = start(config).await;
    let (alone, _, _) = stream_chat(p.api, 10).await;
    let runs = futures::future::join_all((0..8).map(|_| stream_chat(p.api, 10))).await;
    let worst = runs.iter().map(|r| r.0).max().expect("runs");
    assert!(
        worst > alone * 3,
        "queueing: worst TTFT {worst:?} vs alone {alone:?}"
    );
    let m = p.metrics.render();
    assert_eq!(
        value(&m, "strata_request_time_to_first_token_seconds_count"),
        9.0
    );
    // Most queued TTFTs land above the 50 ms bucket that holds the unloaded one.
    let fast = value(
        &m,
        "strata_request_time_to_first_token_seconds_bucket{adapter=\"\",model=\"llama\",le=\"0.05\"}",
    );
    assert!(fast < 9.0, "some requests waited: {fast} of 9 under 50 ms");
}

/// The sidecar's `strata_engine_lora_requests_info` lines.
fn lora_series(pair: &Pair) -> Vec<String> {
    pair.metrics
        .render()
        .lines()
        .filter(|l| l.starts_with("strata_engine_lora_requests_info{"))
        .map(str::to_string)
        .collect()
}

/// Waits (10 s at most) until the sidecar publishes exactly one LoRA
/// series, the one whose labels are `series`.
async fn only_lora_series(pair: &Pair, series: &str, what: &str) {
    strata_e2e::wait::poll_until(
        what,
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            let s = lora_series(pair);
            let shown = s.len() == 1 && s[0].starts_with(series);
            async move { Ok(shown) }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

/// The engine's `vllm:lora_requests_info` (vLLM's label format) is
/// published on the sidecar's admin port as one series, the engine's most
/// recent, for a gateway's endpoint picker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engines_lora_requests_info_is_published_as_its_latest_series() {
    let pair = start(SimConfig {
        itl_ms: 20.0,
        ..SimConfig::new("llama")
    })
    .await;
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let load = json!({"lora_name": "sql", "lora_path": "/adapters/sql"});
    let req = http::Request::post(format!("http://{}/v1/load_lora_adapter", pair.engine))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(load.to_string())))
        .expect("req");
    assert_eq!(client.request(req).await.expect("load").status(), 200);
    let idle = r#"strata_engine_lora_requests_info{max_lora="4",running_lora_adapters="",waiting_lora_adapters=""}"#;
    only_lora_series(&pair, idle, "the idle series").await;
    // A request for the adapter runs on the engine for about 2 s.
    let engine = pair.engine;
    let running = tokio::spawn(async move { stream_chat_to(engine, "sql", 100).await });
    let busy = r#"strata_engine_lora_requests_info{max_lora="4",running_lora_adapters="sql",waiting_lora_adapters=""}"#;
    only_lora_series(&pair, busy, "sql running").await;
    running.await.expect("the adapter's request");
    // The engine still publishes the old series; the sidecar only the
    // newest, whose value is a Unix time.
    only_lora_series(&pair, idle, "the idle series again").await;
    let at = value(&pair.metrics.render(), idle);
    assert!(at > 1.7e9, "a Unix time: {at}");
    // And the engine's KV-cache configuration, for the picker's prefix
    // index: the simulator's block size and GPU blocks.
    let cache = format!(
        "strata_engine_cache_config_info{{block_size=\"16\",num_gpu_blocks=\"{}\"}} 1",
        pair.sim.config().prefix_cache_blocks
    );
    assert!(
        pair.metrics.render().lines().any(|l| l == cache),
        "{cache} in {}",
        pair.metrics.render()
    );
}

/// The endpoint picker's configuration in docs/examples names metrics the
/// sidecar publishes (a renamed metric would leave a gateway's picker
/// without the engines' load, silently).
#[test]
fn the_example_endpoint_picker_config_names_the_sidecars_metrics() {
    let config =
        strata_e2e::harness::repo_yaml("docs/examples/epp-config.yaml").expect("the example");
    let plugins = config["plugins"].as_array().expect("plugins");
    let extractor = plugins
        .iter()
        .find(|p| p["type"] == "core-metrics-extractor")
        .expect("a core-metrics-extractor");
    let vllm = &extractor["parameters"]["engineConfigs"][0];
    assert_eq!(vllm["name"], "vllm", "the entry every unlabelled pod reads");
    let metrics = Metrics::new().expect("metrics");
    // A vector's family shows once it has a series (the engine published
    // its LoRA metric).
    metrics
        .engine_lora_info
        .with_label_values(&["4", "", ""])
        .set(1.7e9);
    metrics
        .engine_cache_info
        .with_label_values(&["16", "1000"])
        .set(1.0);
    let published = metrics.render();
    for spec in [
        "queuedRequestsSpec",
        "runningRequestsSpec",
        "kvUsageSpec",
        "loraSpec",
        "cacheInfoSpec",
    ] {
        let name = vllm[spec].as_str().unwrap_or_default();
        assert!(
            published.contains(&format!("# TYPE {name} gauge")),
            "{spec}: {name:?} is not a gauge the sidecar publishes"
        );
    }
    // The admin port, where those are, speaks TLS.
    let source = plugins
        .iter()
        .find(|p| p["type"] == "metrics-data-source")
        .expect("a metrics-data-source");
    assert_eq!(source["parameters"]["scheme"], "https");
    // Every plugin the profile and the data layer use is declared.
    let declared: Vec<&str> = plugins.iter().filter_map(|p| p["type"].as_str()).collect();
    let used = config["schedulingProfiles"][0]["plugins"]
        .as_array()
        .expect("profile plugins")
        .iter()
        .chain(config["dataLayer"]["sources"].as_array().expect("sources"))
        .filter_map(|p| p["pluginRef"].as_str());
    for r in used {
        assert!(declared.contains(&r), "{r} is used but not declared");
    }
}
