//! The autoscaler's Prometheus metrics source against a real Prometheus
//! (Debian's 2.42.0 build, from `e2e/tools/prometheus.sh`; its path in
//! `STRATA_PROMETHEUS_BIN`) scraping real sidecars in front of the engine
//! simulator, all on 127.0.0.1: what `controller::prometheus::observe`
//! reads agrees with the sidecars' own histograms and with what the clients
//! saw, counts only the Model's pods, and failures are typed errors.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use strata_core::collect::{self, PodSeries};
use strata_core::promql;
use strata_e2e::harness::{free_port, prometheus_bin};
use strata_e2e::process::Component;
use strata_e2e::sim::{self, SimConfig, Simulator};
use strata_e2e::wait;
use strata_operator::controller::prometheus::{self, Error};
use strata_sidecar::app::{App, Config};
use strata_sidecar::engine::EngineKind;
use strata_sidecar::metrics::Metrics;
use strata_sidecar::server::{self, Intervals};

/// Seconds of the percentile and rate window, and of the interval.
const WINDOW: f64 = 10.0;
const INTERVAL: f64 = 5.0;
const MAX_TOKENS: u32 = 20;

struct Pair {
    api: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    metrics: Metrics,
    _stops: (
        tokio::sync::oneshot::Sender<()>,
        tokio::sync::oneshot::Sender<()>,
    ),
}

/// A sidecar in front of a simulator, as in e2e/tests/sidecar_sim.rs, with
/// its admin (metrics) address too.
async fn start_pair(config: SimConfig) -> Pair {
    let engine = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let engine_addr = engine.local_addr().expect("addr");
    let sim = Simulator::new(config).expect("config");
    let (s1, r1) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = sim::serve_simulator(engine, sim, async move {
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
    let (api_addr, admin_addr) = (
        api.local_addr().expect("addr"),
        admin.local_addr().expect("addr"),
    );
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
        admin: admin_addr,
        metrics,
        _stops: (s1, s2),
    }
}

/// Streams one chat request; returns the client-side TTFT.
async fn stream_chat(addr: std::net::SocketAddr) -> Duration {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let body = json!({"model": "llama", "stream": true, "max_tokens": MAX_TOKENS,
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
        text.push_str(&String::from_utf8_lossy(&chunk.expect("chunk")));
        if ttft.is_none() && text.contains("\"content\":\" tok") {
            ttft = Some(start.elapsed());
        }
    }
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    ttft.expect("a token arrived")
}

struct Prometheus {
    url: String,
    process: Component,
}

/// Starts Prometheus with `config` (YAML) and, if given, `web_config` (the
/// `--web.config.file`, for TLS) in `dir`, on 127.0.0.1.
fn start_prometheus(dir: &std::path::Path, config: &str, web_config: Option<&str>) -> Prometheus {
    let config_file = dir.join("prometheus.yml");
    std::fs::write(&config_file, config).expect("write config");
    let port = free_port();
    let mut args = vec![
        format!("--config.file={}", config_file.display()),
        format!("--storage.tsdb.path={}", dir.join("data").display()),
        format!("--web.listen-address=127.0.0.1:{port}"),
        "--log.level=warn".to_string(),
    ];
    let scheme = match web_config {
        Some(web) => {
            let web_file = dir.join("web.yml");
            std::fs::write(&web_file, web).expect("write web config");
            args.push(format!("--web.config.file={}", web_file.display()));
            "https"
        }
        None => "http",
    };
    let process = Component::spawn("prometheus", &prometheus_bin(), &args, &[], dir)
        .expect("start prometheus");
    Prometheus {
        url: format!("{scheme}://127.0.0.1:{port}"),
        process,
    }
}

/// Polls `/-/ready` over plain HTTP until Prometheus answers 200, failing
/// at once (with its log) if it exits.
async fn wait_ready(p: &mut Prometheus) -> strata_e2e::error::Result<()> {
    let addr: std::net::SocketAddr = p.url.trim_start_matches("http://").parse().expect("addr");
    let process = &mut p.process;
    wait::poll_until(
        "Prometheus /-/ready",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            let exited = process.check_running();
            async move {
                exited?;
                Ok(
                    strata_e2e::http::get(addr, "/-/ready", Duration::from_secs(1))
                        .await
                        .is_ok_and(|r| r.status == 200),
                )
            }
        },
    )
    .await
}

/// Starts Prometheus (plain HTTP) and waits until it is ready. The port is
/// picked free and released before Prometheus binds it, so another process
/// may take it in between: then Prometheus exits with "address already in
/// use" and it is started again on another port (three tries).
async fn start_ready(dir: &std::path::Path, config: &str) -> Prometheus {
    let mut tries = 0;
    loop {
        let mut prom = start_prometheus(dir, config, None);
        match wait_ready(&mut prom).await {
            Ok(()) => return prom,
            Err(strata_e2e::error::Error::Exited { tail, .. })
                if tries < 2 && tail.contains("address already in use") =>
            {
                tries += 1
            }
            Err(e) => panic!("Prometheus ready: {e:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prometheus_reads_the_models_pods_like_the_sidecars_do() {
    // chat-a and chat-b are the Model's replicas: two sequences at a time,
    // three clients each, so one request waits. `other` (same namespace, not
    // the Model's) is much slower to its first token; counting it would show.
    let fast = SimConfig {
        max_batch: 2,
        itl_ms: 10.0,
        prefill_ms_per_token: 5.0,
        ..SimConfig::new("llama")
    };
    let slow = SimConfig {
        max_batch: 4,
        itl_ms: 10.0,
        prefill_ms_per_token: 100.0,
        ..SimConfig::new("llama")
    };
    let pairs = [
        ("chat-a", start_pair(fast.clone()).await, 3),
        ("chat-b", start_pair(fast).await, 3),
        ("other", start_pair(slow).await, 2),
    ];
    let mut targets = String::new();
    for (pod, p, _) in &pairs {
        targets.push_str(&format!(
            "      - targets: [\"{}\"]\n        labels: {{namespace: \"t\", pod: \"{pod}\"}}\n",
            p.admin
        ));
    }
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: strata-sidecars\n    static_configs:\n{targets}"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let mut prom = start_ready(dir.path(), &config).await;
    let url = prom.url.clone();

    // Readiness: every target scraped successfully.
    wait::poll_until(
        "Prometheus to scrape the three sidecars",
        Duration::from_secs(30),
        Duration::from_millis(250),
        || {
            let url = url.clone();
            async move {
                let up = prometheus::query(&url, "up", r#"count(up{namespace="t"} == 1)"#).await;
                Ok(matches!(up, Ok(Some(n)) if n == 3.0))
            }
        },
    )
    .await
    .expect("targets up");

    // Load, until told to stop: each client records (completed at, TTFT).
    let start_snaps: Vec<collect::Snapshot> = pairs[..2]
        .iter()
        .map(|(_, p, _)| collect::parse(&p.metrics.render()))
        .collect();
    let load_start = Instant::now();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut clients = Vec::new();
    for (pod, p, n) in &pairs {
        for _ in 0..*n {
            let (api, mut stop, pod) = (p.api, stop_rx.clone(), *pod);
            clients.push(tokio::spawn(async move {
                let mut done = Vec::new();
                while !*stop.borrow_and_update() {
                    let ttft = stream_chat(api).await;
                    done.push((Instant::now(), ttft));
                }
                (pod, done)
            }));
        }
    }

    // The workload runs for a full window before it is measured (this is the
    // length of the experiment, not a wait for readiness).
    tokio::time::sleep_until((load_start + Duration::from_secs_f64(WINDOW + 2.0)).into()).await;
    let pods = &["chat-a", "chat-b"][..];
    let deadline = Instant::now() + Duration::from_secs(15);
    let r = loop {
        let r = prometheus::observe(&url, "t", pods, WINDOW, INTERVAL, 0.95)
            .await
            .expect("observe");
        if r.replicas == 2 && r.rps.is_some_and(|v| v > 0.0) && r.ttft.is_some() {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "no readings with traffic on both pods within 15 s: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let observed_at = Instant::now();
    let end_snaps: Vec<collect::Snapshot> = pairs[..2]
        .iter()
        .map(|(_, p, _)| collect::parse(&p.metrics.render()))
        .collect();
    let direct_secs = load_start.elapsed().as_secs_f64();
    stop_tx.send(true).expect("stop load");
    let mut client_ttfts: Vec<(&str, Instant, Duration)> = Vec::new();
    for c in clients {
        let (pod, done) = c.await.expect("client");
        client_ttfts.extend(done.into_iter().map(|(at, t)| (pod, at, t)));
    }

    // The sidecars' own view over the load, reduced as the sidecar source does.
    let series: Vec<PodSeries> = start_snaps
        .into_iter()
        .zip(end_snaps)
        .map(|(a, b)| {
            let mut s = PodSeries::default();
            s.push(0.0, a, 1e9);
            s.push(direct_secs, b, 1e9);
            s
        })
        .collect();
    let direct = collect::observe(&series, direct_secs, direct_secs, 0.95);

    // What the clients saw in Prometheus' window (its data lag a scrape).
    let in_window = |pod: &str| {
        client_ttfts
            .iter()
            .filter(move |(p, at, _)| {
                *p == pod && observed_at.duration_since(*at).as_secs_f64() <= WINDOW
            })
            .count()
    };
    let client_rps = (in_window("chat-a") + in_window("chat-b")) as f64 / WINDOW;
    let other_fastest = client_ttfts
        .iter()
        .filter(|(p, ..)| *p == "other")
        .map(|(_, _, t)| t.as_secs_f64())
        .fold(f64::INFINITY, f64::min);
    let ours: Vec<f64> = client_ttfts
        .iter()
        .filter(|(p, ..)| *p != "other")
        .map(|(_, _, t)| t.as_secs_f64())
        .collect();
    let mut sorted = ours.clone();
    sorted.sort_by(f64::total_cmp);
    let client_p95 = sorted[((sorted.len() as f64 * 0.95).ceil() as usize).saturating_sub(1)];
    eprintln!(
        "prometheus: {r:?}\nsidecars directly over {direct_secs:.1}s: {direct:?}\n\
         clients: {} requests to chat-a/b, p95 TTFT {client_p95:.3}s, {client_rps:.2} rps in the last {WINDOW}s; \
         other's fastest TTFT {other_fastest:.3}s",
        ours.len()
    );

    assert_eq!(r.replicas, 2, "chat-a and chat-b, not other");
    let ttft = r.ttft.expect("ttft p95");
    let direct_ttft = direct.ttft.expect("direct ttft p95");
    assert!(
        ttft < other_fastest,
        "other's slow requests are not counted: p95 {ttft} vs other's fastest {other_fastest}"
    );
    assert!(
        ttft > direct_ttft * 0.8 && ttft < direct_ttft * 1.25,
        "Prometheus' p95 TTFT {ttft} vs the sidecars' own histograms {direct_ttft}"
    );
    assert!(
        ttft > client_p95 * 0.7 && ttft < client_p95 * 1.4,
        "Prometheus' p95 TTFT {ttft} vs the clients' {client_p95}"
    );
    let rps = r.rps.expect("rps");
    assert!(
        rps > client_rps * 0.8 && rps < client_rps * 1.2,
        "rps {rps} vs the clients' {client_rps}"
    );
    let tokens = r.tokens_per_second.expect("tokens per second");
    assert!(
        (tokens / rps - f64::from(MAX_TOKENS)).abs() < 1.0,
        "{MAX_TOKENS} tokens per request: {tokens} tokens/s at {rps} rps"
    );
    let throughput = r.throughput.expect("throughput");
    let arrivals = r.arrivals.expect("arrivals");
    assert!(
        throughput > client_rps * 0.6 && throughput < client_rps * 1.4,
        "throughput over {INTERVAL}s {throughput} vs {client_rps}"
    );
    assert!(
        arrivals > 0.0 && (arrivals - throughput).abs() < throughput * 0.5,
        "steady load: arrivals {arrivals} about throughput {throughput}"
    );
    let queue = r.queue_per_replica.expect("queue per replica");
    assert!(
        queue > 0.0 && queue <= 1.0,
        "three clients, two sequences at a time: one waits per replica: {queue}"
    );
    assert!(r.itl.is_some() && r.e2e.is_some(), "{r:?}");

    // The autoscaler's pair of views.
    let (window, recent) = r.observed();
    assert_eq!(window.ttft, Some(ttft));
    assert_eq!(recent.rps, Some(throughput));
    assert_eq!(recent.arrivals, Some(arrivals));

    // Typed errors from the real Prometheus.
    let bad = prometheus::query(&url, "bad", "sum(rate(x[5m]")
        .await
        .expect_err("a parse error");
    match &bad {
        Error::Query {
            source:
                promql::Error::Api {
                    error_type,
                    message,
                },
            ..
        } => {
            assert_eq!(error_type, "bad_data");
            assert!(message.contains("parse error"), "{message}");
        }
        other => panic!("expected Prometheus' bad_data error, got {other}"),
    }
    let many = prometheus::query(&url, "up", r#"up{namespace="t"}"#)
        .await
        .expect_err("three series");
    assert!(
        matches!(
            many,
            Error::Query {
                source: promql::Error::Series(3),
                ..
            }
        ),
        "{many}"
    );
    // Not a Prometheus: the sidecar's admin port has no /api/v1/query.
    let not_prom = prometheus::observe(
        &format!("http://{}", pairs[0].1.admin),
        "t",
        pods,
        WINDOW,
        INTERVAL,
        0.95,
    )
    .await
    .expect_err("not Prometheus");
    assert!(
        matches!(not_prom, Error::Status { status: 404, .. }),
        "{not_prom}"
    );
    // Nothing listens: an error, promptly.
    let closed = format!("http://127.0.0.1:{}", free_port());
    let t = Instant::now();
    let down = prometheus::observe(&closed, "t", pods, WINDOW, INTERVAL, 0.95)
        .await
        .expect_err("nothing listens");
    assert!(matches!(down, Error::Unreachable { .. }), "{down}");
    assert!(t.elapsed() < prometheus::QUERY_TIMEOUT * 2);

    prom.process.stop(Duration::from_secs(5)).await;
}

// ---------------------------------------------------------------------------
// https: a Prometheus serving TLS with a certificate from a test CA
// ---------------------------------------------------------------------------

/// The https Prometheus URL, for the child.
const TLS_URL: &str = "STRATA_TEST_TLS_PROMETHEUS_URL";
/// The operator's Prometheus credentials file (`--prometheus-auth-file`),
/// for the child.
const TLS_AUTH_FILE: &str = "STRATA_TEST_PROMETHEUS_AUTH_FILE";
/// The user Prometheus admits (`basic_auth_users`), and its password.
const USER: &str = "strata";
const PASSWORD: &str = "strata-test-password";
/// bcrypt of PASSWORD (cost 4: checked on every request), made with
/// Python's `bcrypt.hashpw(PASSWORD, bcrypt.gensalt(rounds=4))`.
const PASSWORD_BCRYPT: &str = "$2b$04$UO2RclRtKmwxXFqydzHdmuxwVbgytYHntcCY0BbTuZmy/yk5NsZ1y";

/// Runs in a child process with `SSL_CERT_FILE` naming the test CA (the
/// operator's https client reads the system roots, which honour it; this
/// process's own environment cannot be changed safely once threads run).
#[tokio::test]
#[ignore = "a helper run in a child process by https_prometheus_is_verified_against_the_system_roots_with_credentials"]
async fn tls_child() {
    let (Ok(url), Ok(auth_file)) = (std::env::var(TLS_URL), std::env::var(TLS_AUTH_FILE)) else {
        return;
    };
    // Prometheus may still be starting: poll until it answers over TLS.
    // Without credentials it refuses, and says so.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match prometheus::query(&url, "tls", "vector(1)").await {
            Err(Error::Status { status, .. }) => {
                assert_eq!(status, 401, "no credentials: unauthorized");
                break;
            }
            other => assert!(
                Instant::now() < deadline,
                "no answer over https within 30 s: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // With the operator's credentials file, the queries carry them.
    let n = strata_operator::prometheus_auth::install(std::path::Path::new(&auth_file))
        .expect("the credentials file");
    assert_eq!(n, 2);
    assert_eq!(
        prometheus::query(&url, "tls", "vector(1)")
            .await
            .expect("answered with credentials"),
        Some(1.0)
    );
    let r = prometheus::observe(&url, "t", &["chat-a"], WINDOW, INTERVAL, 0.95)
        .await
        .expect("observe over https");
    assert_eq!(r.replicas, 0, "nothing scraped: {r:?}");
    assert_eq!(r.rps, None, "nothing scraped: unknown, not idle");
}

#[tokio::test]
async fn https_prometheus_is_verified_against_the_system_roots_with_credentials() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A CA and a server certificate for 127.0.0.1 (the harness's PKI).
    let (_ca, pki) = strata_e2e::pki::Authority::create(
        &dir.path().join("pki"),
        std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
    )
    .expect("pki");
    let web = format!(
        "tls_server_config:\n  cert_file: {}\n  key_file: {}\nbasic_auth_users:\n  {USER}: {PASSWORD_BCRYPT}\n",
        pki.apiserver.cert.display(),
        pki.apiserver.key.display()
    );
    let mut prom = start_prometheus(
        dir.path(),
        "global:\n  scrape_interval: 1s\nscrape_configs: []\n",
        Some(&web),
    );
    // The credentials for this Prometheus, and another server's (another
    // port) that must not be sent to it.
    let auth_file = dir.path().join("prometheus-auth.yaml");
    std::fs::write(
        &auth_file,
        format!(
            "endpoints:\n  - url: {}\n    basicAuth: {{username: {USER}, password: {PASSWORD}}}\n  - url: https://127.0.0.1:1\n    bearerToken: not-for-this-prometheus\n",
            prom.url
        ),
    )
    .expect("write the credentials file");
    let exe = std::env::current_exe().expect("current exe");
    let child = tokio::process::Command::new(exe)
        .args([
            "tls_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SSL_CERT_FILE", &pki.ca_cert)
        .env_remove("SSL_CERT_DIR")
        .env(TLS_URL, &prom.url)
        .env(TLS_AUTH_FILE, &auth_file)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), child)
        .await
        .expect("the child finishes")
        .expect("run the child");
    prom.process.check_running().expect("Prometheus runs");
    assert!(
        out.status.success(),
        "the child failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 passed"),
        "the child ran its test: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Here the test CA is not trusted: the handshake fails, as an error.
    let err = prometheus::query(&prom.url, "tls", "vector(1)")
        .await
        .expect_err("an unknown CA");
    assert!(
        matches!(&err, Error::Unreachable { message, .. } if message.contains("certificate") || message.contains("UnknownIssuer")),
        "{err}"
    );
    prom.process.stop(Duration::from_secs(5)).await;
}
