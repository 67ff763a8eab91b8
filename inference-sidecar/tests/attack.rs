//! The sidecar as an attacker meets it: the real `strata-sidecar` binary in
//! front of a scripted engine on loopback. Every known engine admin path is
//! refused on the API port and never reaches the engine; oversized, slow and
//! numerous bodies, trickled headers and idle connections are refused or
//! closed while valid requests sent meanwhile succeed, and the process's
//! peak resident memory (VmHWM) stays under 64 MiB.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::response::Response;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use strata_net::openai::ENGINE_ADMIN_PATHS;
use tokio::io::AsyncWriteExt;

/// Paths the scripted engine was asked for.
type Seen = Arc<Mutex<Vec<String>>>;

async fn engine(State(seen): State<Seen>, req: axum::extract::Request) -> Response {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    seen.lock().expect("lock").push(path.clone());
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    match path.as_str() {
        "/health" => Response::new(Body::from("ok")),
        "/metrics" => Response::new(Body::from("vllm:num_requests_waiting 0\n")),
        "/v1/chat/completions" | "/v1/completions" => {
            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            if v["stream"] == json!(true) {
                let text = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\ndata: [DONE]\n\n";
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(Body::from(text))
                    .expect("response")
            } else {
                let out = json!({"choices": [{"message": {"content": "hi"}}], "usage": {"prompt_tokens": 3, "completion_tokens": 1}});
                Response::new(Body::from(out.to_string()))
            }
        }
        // An engine would obey: this is what the sidecar must prevent.
        _ => Response::new(Body::from(
            "Success: LoRA adapter 'evil' added successfully",
        )),
    }
}

/// A port for the sidecar to bind, below the kernel's ephemeral range (as
/// strata-e2e's `ports` chooses them): a port from `bind(0)` is released
/// before the sidecar binds it, and any outgoing connection could take it
/// meanwhile.
fn free_port() -> u16 {
    use std::hash::{BuildHasher, RandomState};
    use std::sync::atomic::{AtomicU64, Ordering};
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let start = *START.get_or_init(|| RandomState::new().hash_one(std::process::id()));
    (0..512)
        .map(|_| 10_000 + ((start + NEXT.fetch_add(1, Ordering::Relaxed)) % 20_000) as u16)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port below 30000")
}

struct Sidecar {
    child: tokio::process::Child,
    api: SocketAddr,
    seen: Seen,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Sidecar {
    async fn start(extra: &[&str]) -> Self {
        let seen: Seen = Arc::default();
        let router = Router::new().fallback(engine).with_state(seen.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let engine_addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, router).await });
        let (api, admin) = (free_port(), free_port());
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_strata-sidecar"))
            .args([
                format!("--listen=127.0.0.1:{api}"),
                format!("--admin-listen=127.0.0.1:{admin}"),
                format!("--engine-url=http://{engine_addr}"),
                "--served-model=llama".into(),
                "--nvml-lib=/nonexistent".into(),
                "--gpus=none".into(),
                "--engine-health-interval=0.1".into(),
            ])
            .args(extra)
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .spawn()
            .expect("strata-sidecar");
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        let s = Self {
            child,
            api: SocketAddr::from(([127, 0, 0, 1], api)),
            seen,
            client: Client::builder(TokioExecutor::new()).build(connector),
        };
        let ready = format!("http://127.0.0.1:{admin}/readyz");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let req = http::Request::get(&ready)
                .body(Full::new(Bytes::new()))
                .expect("req");
            if let Ok(r) = s.client.request(req).await
                && r.status() == 200
            {
                break;
            }
            assert!(Instant::now() < deadline, "the sidecar never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        s
    }

    async fn send(&self, method: &str, path: &str, body: Bytes) -> Result<(u16, String), String> {
        let req = http::Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.api))
            .header("content-type", "application/json")
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(Duration::from_secs(30), self.client.request(req))
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
    }

    fn peak_rss_kib(&self) -> u64 {
        let pid = self.child.id().expect("running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM")
    }

    fn engine_saw(&self) -> Vec<String> {
        self.seen
            .lock()
            .expect("lock")
            .iter()
            .filter(|p| *p != "/health" && *p != "/metrics")
            .cloned()
            .collect()
    }
}

#[tokio::test]
async fn every_engine_admin_path_is_refused_and_never_reaches_the_engine() {
    let s = Sidecar::start(&[]).await;
    let evil =
        Bytes::from(json!({"lora_name": "evil", "lora_path": "/attacker/weights"}).to_string());
    for (engine, path) in ENGINE_ADMIN_PATHS {
        for method in ["GET", "POST", "PUT", "DELETE"] {
            let (status, body) = s
                .send(method, path, evil.clone())
                .await
                .unwrap_or_else(|e| panic!("{engine} {method} {path}: {e}"));
            assert_eq!(status, 404, "{engine} {method} {path}: {body}");
            let v: Value = serde_json::from_str(&body)
                .unwrap_or_else(|_| panic!("{engine} {method} {path}: not JSON: {body}"));
            assert_eq!(v["error"]["code"], json!(404), "{body}");
        }
    }
    assert_eq!(
        s.engine_saw(),
        Vec::<String>::new(),
        "nothing reached the engine"
    );
    // The inference API still passes; its path is the allowlist's own.
    let chat = Bytes::from(json!({"model": "llama", "messages": []}).to_string());
    let (status, _) = s
        .send("POST", "/v1/chat/completions", chat)
        .await
        .expect("chat");
    assert_eq!(status, 200);
    let (status, _) = s
        .send("GET", "/v1/models", Bytes::new())
        .await
        .expect("models");
    assert_eq!(status, 200);
    let (status, _) = s
        .send("GET", "/v1/chat/completions", Bytes::new())
        .await
        .expect("wrong method");
    assert_eq!(status, 405);
    assert_eq!(s.engine_saw(), ["/v1/chat/completions", "/v1/models"]);
}

/// A request whose headers trickle in and never end.
async fn slowloris(addr: SocketAddr) -> Option<tokio::net::TcpStream> {
    let mut c = tokio::net::TcpStream::connect(addr).await.ok()?;
    c.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-A: ")
        .await
        .ok()?;
    Some(c)
}

/// A request that declares a large body and sends a little of it.
async fn slow_body(addr: SocketAddr, declared: usize) -> Option<tokio::net::TcpStream> {
    let mut c = tokio::net::TcpStream::connect(addr).await.ok()?;
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\n\r\n{{\"prompt\":["
    );
    c.write_all(head.as_bytes()).await.ok()?;
    Some(c)
}

#[tokio::test]
async fn attack_bodies_cannot_exhaust_the_sidecar_and_valid_traffic_goes_on() {
    let s =
        Arc::new(Sidecar::start(&["--header-read-timeout=3", "--request-body-timeout=4"]).await);
    let baseline = s.peak_rss_kib();

    // Valid traffic throughout the attacks.
    let valid = {
        let s = s.clone();
        tokio::spawn(async move {
            let mut results = Vec::new();
            for i in 0..60 {
                let stream = i % 2 == 0;
                let body = json!({"model": "llama", "prompt": "hello", "stream": stream});
                let r = s
                    .send("POST", "/v1/completions", Bytes::from(body.to_string()))
                    .await;
                results.push(r.map(|(status, _)| status));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            results
        })
    };

    // 1. A 30 MB integer prompt, declared: refused before it is read.
    let mut prompt = Vec::with_capacity(30 * 1024 * 1024 + 64);
    prompt.extend_from_slice(b"{\"model\":\"llama\",\"prompt\":[0");
    while prompt.len() < 30 * 1024 * 1024 {
        prompt.extend_from_slice(b",0");
    }
    prompt.extend_from_slice(b"]}");
    let prompt = Bytes::from(prompt);
    let r = s.send("POST", "/v1/completions", prompt.clone()).await;
    assert!(
        matches!(r, Ok((413, _)) | Err(_)),
        "the 30 MB body is refused: {r:?}"
    );

    // 2. The same, chunked (no Content-Length): cut at the cap.
    let chunks = prompt
        .chunks(256 * 1024)
        .map(|c| {
            Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::copy_from_slice(c)))
        })
        .collect::<Vec<_>>();
    let req = http::Request::post(format!("http://{}/v1/completions", s.api))
        .body(http_body_util::StreamBody::new(futures::stream::iter(
            chunks,
        )))
        .expect("req");
    let chunked: Client<HttpConnector, _> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let r = tokio::time::timeout(Duration::from_secs(30), chunked.request(req)).await;
    if let Ok(Ok(resp)) = r {
        assert_eq!(resp.status(), 413, "the chunked 30 MB body is refused");
    }

    // 3. Many large bodies at once (each under the cap): the budget holds
    //    some, the rest are told to retry; none is an OOM.
    let large = {
        let mut b = b"{\"model\":\"llama\",\"prompt\":[0".to_vec();
        while b.len() < 7 * 1024 * 1024 {
            b.extend_from_slice(b",0");
        }
        b.extend_from_slice(b"]}");
        Bytes::from(b)
    };
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let (s, large) = (s.clone(), large.clone());
        tasks.push(tokio::spawn(async move {
            s.send("POST", "/v1/completions", large).await
        }));
    }
    // 4. Slowloris and slow bodies, held open meanwhile.
    let mut held = Vec::new();
    for _ in 0..300 {
        held.extend(slowloris(s.api).await);
    }
    for _ in 0..100 {
        held.extend(slow_body(s.api, 8 * 1024 * 1024).await);
    }
    // A body refused before it is read closes the connection under the
    // client still sending it: that client sees the refusal as a send error.
    let mut codes = std::collections::BTreeMap::<String, u32>::new();
    for t in tasks {
        let key = match t.await.expect("task") {
            Ok((status, _)) => status.to_string(),
            Err(e) if e.contains("SendRequest") => "refused while sending".into(),
            Err(e) => format!("error: {e}"),
        };
        *codes.entry(key).or_default() += 1;
    }
    assert!(
        codes
            .keys()
            .all(|k| k == "200" || k == "503" || k == "refused while sending"),
        "large bodies are served or told to retry: {codes:?}"
    );
    assert!(
        codes.contains_key("200"),
        "some large bodies are served: {codes:?}"
    );

    let results = valid.await.expect("valid traffic");
    let failed: Vec<_> = results.iter().filter(|r| !matches!(r, Ok(200))).collect();
    assert!(
        failed.is_empty(),
        "valid requests during the attacks all succeed: {failed:?} of {}",
        results.len()
    );
    drop(held);

    let peak = s.peak_rss_kib();
    println!(
        "sidecar peak RSS: {:.1} MiB under attack (baseline {:.1} MiB); large bodies: {codes:?}",
        peak as f64 / 1024.0,
        baseline as f64 / 1024.0
    );
    assert!(
        peak < 64 * 1024,
        "peak RSS {:.1} MiB must stay under 64 MiB",
        peak as f64 / 1024.0
    );
}
