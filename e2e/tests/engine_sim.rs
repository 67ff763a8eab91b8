//! The engine simulator over real sockets on loopback: the vLLM API shapes,
//! LoRA adapters, metrics, FIFO queueing, the load file and the GPUs' loads
//! in the node's GPU directory.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use strata_e2e::sim::{self, SimConfig, Simulator};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::time::Instant;

const TIMEOUT: Duration = Duration::from_secs(10);

/// A fast configuration: requests take milliseconds.
fn fast(model: &str) -> SimConfig {
    SimConfig {
        prefill_ms_per_token: 0.01,
        itl_ms: 1.0,
        max_tokens_default: 5,
        ..SimConfig::new(model)
    }
}

/// A running simulator; shut down when dropped.
struct Server {
    addr: SocketAddr,
    sim: Simulator,
    _stop: oneshot::Sender<()>,
}

async fn start(config: SimConfig) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let sim = Simulator::new(config).expect("valid config");
    let (stop, stopped) = oneshot::channel::<()>();
    let served = sim.clone();
    tokio::spawn(async move {
        let shutdown = async move {
            let _ = stopped.await;
        };
        sim::serve_simulator(listener, served, shutdown)
            .await
            .expect("serve");
    });
    Server {
        addr,
        sim,
        _stop: stop,
    }
}

/// A whole response.
#[derive(Debug)]
struct Resp {
    status: u16,
    head: String,
    body: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

/// An HTTP/1.1 exchange in progress: the head is read, the body is read as
/// it comes (chunked or not).
struct Exchange {
    sock: TcpStream,
    status: u16,
    head: String,
    chunked: bool,
    /// Raw bytes not yet decoded.
    raw: Vec<u8>,
    /// Decoded body bytes not yet consumed.
    body: Vec<u8>,
    /// The last chunk (or the end of the stream) has been seen.
    done: bool,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl Exchange {
    async fn open(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> Self {
        assert!(addr.ip().is_loopback());
        let mut sock = TcpStream::connect(addr).await.expect("connect");
        let body = body.map(Value::to_string).unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        sock.write_all(req.as_bytes()).await.expect("send");
        let mut ex = Exchange {
            sock,
            status: 0,
            head: String::new(),
            chunked: false,
            raw: Vec::new(),
            body: Vec::new(),
            done: false,
        };
        let end = loop {
            if let Some(i) = find(&ex.raw, b"\r\n\r\n") {
                break i;
            }
            assert!(ex.read_more().await, "connection closed before the head");
        };
        ex.head = String::from_utf8_lossy(&ex.raw[..end]).into_owned();
        ex.raw.drain(..end + 4);
        ex.status = ex
            .head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status");
        ex.chunked = ex
            .head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        ex.decode();
        ex
    }

    /// Reads more raw bytes; false at the end of the stream.
    async fn read_more(&mut self) -> bool {
        let mut buf = [0u8; 8192];
        let n = tokio::time::timeout(TIMEOUT, self.sock.read(&mut buf))
            .await
            .expect("read timed out")
            .expect("read");
        self.raw.extend_from_slice(&buf[..n]);
        n > 0
    }

    /// Moves complete body bytes from `raw` to `body`.
    fn decode(&mut self) {
        if !self.chunked {
            self.body.append(&mut self.raw);
            return;
        }
        while !self.done {
            let Some(line_end) = find(&self.raw, b"\r\n") else {
                return;
            };
            let line = String::from_utf8_lossy(&self.raw[..line_end]).into_owned();
            let size_text = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size_text, 16).expect("chunk size");
            if size == 0 {
                self.done = true;
                return;
            }
            let start = line_end + 2;
            if self.raw.len() < start + size + 2 {
                return;
            }
            self.body.extend_from_slice(&self.raw[start..start + size]);
            self.raw.drain(..start + size + 2);
        }
    }

    /// Reads more of the body; false when it has ended.
    async fn more_body(&mut self) -> bool {
        if self.done {
            return false;
        }
        if !self.read_more().await {
            self.done = true;
            return false;
        }
        self.decode();
        true
    }

    /// The next server-sent event's data, with the time it was read.
    async fn next_event(&mut self) -> Option<(Instant, String)> {
        loop {
            if let Some(i) = find(&self.body, b"\n\n") {
                let event = String::from_utf8_lossy(&self.body[..i]).into_owned();
                self.body.drain(..i + 2);
                let data = event
                    .strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("not a data event: {event:?}"));
                return Some((Instant::now(), data.to_string()));
            }
            if !self.more_body().await {
                assert!(self.body.is_empty(), "trailing bytes: {:?}", self.body);
                return None;
            }
        }
    }

    /// The rest of the response.
    async fn finish(mut self) -> Resp {
        while self.more_body().await {}
        Resp {
            status: self.status,
            head: self.head,
            body: String::from_utf8(self.body).expect("UTF-8 body"),
        }
    }
}

async fn post(addr: SocketAddr, path: &str, body: &Value) -> Resp {
    Exchange::open(addr, "POST", path, Some(body))
        .await
        .finish()
        .await
}

async fn get(addr: SocketAddr, path: &str) -> strata_e2e::http::Response {
    strata_e2e::http::get(addr, path, TIMEOUT)
        .await
        .expect("GET")
}

/// The samples of `/metrics`.
async fn metrics(addr: SocketAddr) -> std::collections::BTreeMap<String, f64> {
    let resp = get(addr, "/metrics").await;
    assert_eq!(resp.status, 200);
    sim::parse_metrics(&resp.body)
}

fn sample(samples: &std::collections::BTreeMap<String, f64>, series: &str) -> f64 {
    *samples
        .get(series)
        .unwrap_or_else(|| panic!("no {series} in {samples:#?}"))
}

/// Polls `check` every 10 ms until it holds, or panics after `what` times out.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + TIMEOUT;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn chat(model: &str, content: &str, max_tokens: u32, stream: bool) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "stream": stream,
    })
}

/// Reads a whole chat stream; returns the parsed events (the final
/// `[DONE]` as the string "[DONE]").
async fn read_stream(ex: &mut Exchange) -> Vec<Value> {
    let mut events = Vec::new();
    while let Some((_, data)) = ex.next_event().await {
        if data == "[DONE]" {
            events.push(Value::String(data));
        } else {
            events.push(serde_json::from_str(&data).expect("event JSON"));
        }
    }
    events
}

#[tokio::test]
async fn health_and_models() {
    let s = start(fast("llama")).await;
    let health = get(s.addr, "/health").await;
    assert_eq!((health.status, health.body.as_str()), (200, ""));
    let models: Value = serde_json::from_str(&get(s.addr, "/v1/models").await.body).expect("json");
    assert_eq!(models["object"], "list");
    assert_eq!(
        models["data"],
        json!([{
            "id": "llama", "object": "model", "created": models["data"][0]["created"],
            "owned_by": "vllm", "root": "llama", "parent": null,
        }])
    );
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed_as_uvicorn_does() {
    let s = start(SimConfig {
        keep_alive: Duration::from_millis(300),
        ..fast("llama")
    })
    .await;
    let mut conn = TcpStream::connect(s.addr).await.expect("connect");
    conn.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(TIMEOUT, conn.read(&mut buf))
        .await
        .expect("answered")
        .expect("read");
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    // Kept alive, then closed once idle for the keep-alive timeout.
    let idle = Instant::now();
    let end = tokio::time::timeout(TIMEOUT, conn.read(&mut buf))
        .await
        .expect("closed in time");
    assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
    assert!(
        idle.elapsed() >= Duration::from_millis(250),
        "{:?}",
        idle.elapsed()
    );
}

#[tokio::test]
async fn streaming_chat_sends_role_tokens_usage_and_done() {
    let s = start(fast("llama")).await;
    for include_usage in [false, true] {
        let mut body = chat("llama", "hello there", 7, true);
        if include_usage {
            body["stream_options"] = json!({"include_usage": true});
        }
        let mut ex = Exchange::open(s.addr, "POST", "/v1/chat/completions", Some(&body)).await;
        assert_eq!(ex.status, 200);
        assert!(
            ex.head
                .to_ascii_lowercase()
                .contains("content-type: text/event-stream"),
            "{}",
            ex.head
        );
        let events = read_stream(&mut ex).await;
        let expected = 1 + 7 + usize::from(include_usage) + 1;
        assert_eq!(events.len(), expected, "{events:#?}");

        let role = &events[0];
        assert_eq!(role["object"], "chat.completion.chunk");
        assert_eq!(role["model"], "llama");
        assert_eq!(
            role["choices"],
            json!([{"index": 0, "delta": {"role": "assistant", "content": ""},
                    "logprobs": null, "finish_reason": null}])
        );
        let id = role["id"].as_str().expect("id").to_string();
        assert!(id.starts_with("chatcmpl-"), "{id}");

        for (i, e) in events[1..8].iter().enumerate() {
            assert_eq!(e["id"], id.as_str());
            let choice = &e["choices"][0];
            assert!(choice["delta"].get("role").is_none(), "{e}");
            let content = choice["delta"]["content"].as_str().expect("content");
            assert_eq!(content, format!(" tok{i}"));
            let finish = if i == 6 { json!("length") } else { Value::Null };
            assert_eq!(choice["finish_reason"], finish, "{e}");
        }
        if include_usage {
            let usage = &events[8];
            assert_eq!(usage["choices"], json!([]));
            // "hello there": 11 characters, 3 tokens.
            assert_eq!(
                usage["usage"],
                json!({"prompt_tokens": 3, "completion_tokens": 7, "total_tokens": 10})
            );
        } else {
            assert!(events.iter().all(|e| e.get("usage").is_none()));
        }
        assert_eq!(events[expected - 1], "[DONE]");
    }
}

#[tokio::test]
async fn streaming_completions_send_text_chunks() {
    let s = start(fast("llama")).await;
    let body = json!({"model": "llama", "prompt": "abcdefghi", "max_tokens": 3, "stream": true,
                      "stream_options": {"include_usage": true}});
    let mut ex = Exchange::open(s.addr, "POST", "/v1/completions", Some(&body)).await;
    assert_eq!(ex.status, 200);
    let events = read_stream(&mut ex).await;
    assert_eq!(events.len(), 3 + 1 + 1, "{events:#?}");
    for (i, e) in events[..3].iter().enumerate() {
        assert_eq!(e["object"], "text_completion");
        assert_eq!(e["choices"][0]["text"], format!(" tok{i}"));
    }
    assert_eq!(events[2]["choices"][0]["finish_reason"], "length");
    assert_eq!(
        events[3]["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6})
    );
    assert_eq!(events[4], "[DONE]");
}

#[tokio::test]
async fn non_streaming_responses_and_usage() {
    let s = start(fast("llama")).await;
    // 10 + 3 characters: 4 prompt tokens.
    let body = json!({
        "model": "llama",
        "messages": [{"role": "system", "content": "abcdefghij"},
                     {"role": "user", "content": "xyz"}],
        "max_tokens": 4,
    });
    let resp = post(s.addr, "/v1/chat/completions", &body).await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    let v = resp.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "llama");
    assert!(
        v["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("chatcmpl-"))
    );
    assert!(v["created"].as_u64().is_some_and(|c| c > 0));
    let choice = &v["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], " tok0 tok1 tok2 tok3");
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8})
    );

    // Completions, with the default max_tokens (5) and no model named.
    let resp = post(s.addr, "/v1/completions", &json!({"prompt": "x"})).await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    let v = resp.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], "llama");
    assert_eq!(v["choices"][0]["text"], " tok0 tok1 tok2 tok3 tok4");
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 1, "completion_tokens": 5, "total_tokens": 6})
    );

    // A body that is not a request.
    let resp = post(s.addr, "/v1/chat/completions", &json!({"nope": 1})).await;
    assert_eq!(resp.status, 400);
    assert_eq!(resp.json()["error"]["type"], "BadRequestError");
}

#[tokio::test]
async fn unknown_models_are_404() {
    let s = start(fast("llama")).await;
    for (path, body) in [
        ("/v1/chat/completions", chat("gpt-9", "hi", 2, false)),
        ("/v1/chat/completions", chat("gpt-9", "hi", 2, true)),
        (
            "/v1/completions",
            json!({"model": "gpt-9", "prompt": "hi", "max_tokens": 2}),
        ),
    ] {
        let resp = post(s.addr, path, &body).await;
        assert_eq!(resp.status, 404, "{path}: {}", resp.body);
        assert!(resp.head.to_ascii_lowercase().contains("application/json"));
        assert_eq!(
            resp.json(),
            json!({"error": {"message": "The model `gpt-9` does not exist.",
                             "type": "NotFoundError", "param": null, "code": 404}})
        );
    }
}

#[tokio::test]
async fn lora_adapters_load_list_serve_and_unload() {
    let s = start(fast("llama")).await;
    let load = json!({"lora_name": "sql", "lora_path": "/adapters/sql"});
    let resp = post(s.addr, "/v1/load_lora_adapter", &load).await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert_eq!(resp.body, "Success: LoRA adapter 'sql' added successfully.");

    // The same name again: refused, like vLLM.
    let resp = post(s.addr, "/v1/load_lora_adapter", &load).await;
    assert_eq!(resp.status, 400, "{}", resp.body);
    assert_eq!(resp.json()["error"]["type"], "BadRequestError");

    let models: Value = serde_json::from_str(&get(s.addr, "/v1/models").await.body).expect("json");
    let data = models["data"].as_array().expect("data");
    assert_eq!(data.len(), 2, "{models}");
    assert_eq!(data[1]["id"], "sql");
    assert_eq!(data[1]["root"], "/adapters/sql");
    assert_eq!(data[1]["parent"], "llama");
    assert_eq!(data[1]["object"], "model");

    let resp = post(s.addr, "/v1/chat/completions", &chat("sql", "hi", 2, false)).await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert_eq!(resp.json()["model"], "sql");
    let mut ex = Exchange::open(
        s.addr,
        "POST",
        "/v1/chat/completions",
        Some(&chat("sql", "hi", 2, true)),
    )
    .await;
    assert_eq!(read_stream(&mut ex).await.len(), 1 + 2 + 1);

    let unload = json!({"lora_name": "sql"});
    let resp = post(s.addr, "/v1/unload_lora_adapter", &unload).await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert_eq!(
        resp.body,
        "Success: LoRA adapter 'sql' removed successfully."
    );
    let resp = post(s.addr, "/v1/chat/completions", &chat("sql", "hi", 2, false)).await;
    assert_eq!(resp.status, 404, "{}", resp.body);
    assert_eq!(
        resp.json()["error"]["message"],
        "The model `sql` does not exist."
    );
    let resp = post(s.addr, "/v1/unload_lora_adapter", &unload).await;
    assert_eq!(resp.status, 404, "{}", resp.body);
    assert_eq!(resp.json()["error"]["type"], "NotFoundError");
    assert!(s.sim.loras().is_empty());
}

/// The series of `vllm:lora_requests_info` with the largest value (the
/// most recent, as readers pick it): its labels.
fn latest_lora_info(m: &std::collections::BTreeMap<String, f64>) -> String {
    m.iter()
        .filter(|(k, _)| k.starts_with("vllm:lora_requests_info{"))
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(k, _)| k.clone())
        .unwrap_or_else(|| panic!("no vllm:lora_requests_info in {m:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_requests_info_names_the_adapters_running_and_waiting() {
    let s = start(SimConfig {
        max_batch: 1,
        itl_ms: 2.0,
        ..SimConfig::new("llama")
    })
    .await;
    for name in ["sql", "chat"] {
        let load = json!({"lora_name": name, "lora_path": format!("/adapters/{name}")});
        assert_eq!(
            post(s.addr, "/v1/load_lora_adapter", &load).await.status,
            200
        );
    }
    // Nothing asked yet: one series with empty lists, as vLLM with
    // --enable-lora publishes.
    let idle = latest_lora_info(&metrics(s.addr).await);
    assert_eq!(
        idle,
        "vllm:lora_requests_info{max_lora=\"4\",running_lora_adapters=\"\",waiting_lora_adapters=\"\"}"
    );
    // sql runs (the batch holds one), chat waits behind it.
    let (admitted_tx, admitted_rx) = oneshot::channel();
    let a = tokio::spawn(stream_chat(
        s.addr,
        chat("sql", "hi", 150, true),
        Some(admitted_tx),
    ));
    admitted_rx.await.expect("sql admitted");
    let b = tokio::spawn(stream_chat(s.addr, chat("chat", "hi", 2, true), None));
    let sim = s.sim.clone();
    eventually("chat waiting behind sql", || {
        let sim = sim.clone();
        async move { sim.waiting() == 1 }
    })
    .await;
    let busy = metrics(s.addr).await;
    assert_eq!(
        latest_lora_info(&busy),
        "vllm:lora_requests_info{max_lora=\"4\",running_lora_adapters=\"sql\",waiting_lora_adapters=\"chat\"}"
    );
    a.await.expect("sql");
    b.await.expect("chat");
    // Done: the newest series has empty lists again; the older ones stay,
    // each with the time it was last current.
    let after = metrics(s.addr).await;
    assert_eq!(latest_lora_info(&after), idle);
    let series = after
        .keys()
        .filter(|k| k.starts_with("vllm:lora_requests_info{"))
        .count();
    assert!(series >= 2, "{after:#?}");
}

#[tokio::test]
async fn loading_more_than_max_loras_is_refused() {
    let s = start(SimConfig {
        max_loras: 2,
        ..fast("llama")
    })
    .await;
    for name in ["a", "b"] {
        let resp = post(
            s.addr,
            "/v1/load_lora_adapter",
            &json!({"lora_name": name, "lora_path": format!("/l/{name}")}),
        )
        .await;
        assert_eq!(resp.status, 200, "{}", resp.body);
    }
    let resp = post(
        s.addr,
        "/v1/load_lora_adapter",
        &json!({"lora_name": "c", "lora_path": "/l/c"}),
    )
    .await;
    assert_eq!(resp.status, 400, "{}", resp.body);
    assert_eq!(resp.json()["error"]["code"], 400);
    // Unloading one makes room.
    let resp = post(
        s.addr,
        "/v1/unload_lora_adapter",
        &json!({"lora_name": "a"}),
    )
    .await;
    assert_eq!(resp.status, 200);
    let resp = post(
        s.addr,
        "/v1/load_lora_adapter",
        &json!({"lora_name": "c", "lora_path": "/l/c"}),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    let names: Vec<_> = s.sim.loras().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["b", "c"]);
}

#[tokio::test]
async fn metrics_count_what_was_served() {
    let s = start(fast("llama")).await;
    let before = metrics(s.addr).await;
    let l = "model_name=\"llama\"";
    assert_eq!(
        sample(&before, &format!("vllm:generation_tokens_total{{{l}}}")),
        0.0
    );

    // (characters, max_tokens, stream)
    let requests = [(4, 3, false), (8, 5, true), (40, 2, false), (1, 1, true)];
    for (chars, max_tokens, stream) in requests {
        let body = chat("llama", &"x".repeat(chars), max_tokens, stream);
        let resp = post(s.addr, "/v1/chat/completions", &body).await;
        assert_eq!(resp.status, 200, "{}", resp.body);
    }
    // A failed request counts nowhere.
    let resp = post(s.addr, "/v1/chat/completions", &chat("nope", "x", 3, false)).await;
    assert_eq!(resp.status, 404);

    let m = metrics(s.addr).await;
    let n = requests.len() as f64;
    let prompt: u32 = requests.iter().map(|r| sim::prompt_tokens(r.0)).sum();
    let generated: u32 = requests.iter().map(|r| r.1).sum();
    assert_eq!(prompt, 1 + 2 + 10 + 1);
    assert_eq!(
        sample(&m, &format!("vllm:prompt_tokens_total{{{l}}}")),
        f64::from(prompt)
    );
    assert_eq!(
        sample(&m, &format!("vllm:generation_tokens_total{{{l}}}")),
        f64::from(generated)
    );
    assert_eq!(
        sample(
            &m,
            &format!("vllm:request_success_total{{finished_reason=\"length\",{l}}}")
        ),
        n
    );
    assert_eq!(
        sample(&m, &format!("vllm:num_requests_running{{{l}}}")),
        0.0
    );
    assert_eq!(
        sample(&m, &format!("vllm:num_requests_waiting{{{l}}}")),
        0.0
    );
    assert_eq!(sample(&m, &format!("vllm:kv_cache_usage_perc{{{l}}}")), 0.0);
    for (name, count) in [
        ("vllm:time_to_first_token_seconds", n),
        ("vllm:e2e_request_latency_seconds", n),
        // One interval between each pair of consecutive tokens.
        ("vllm:inter_token_latency_seconds", f64::from(generated) - n),
    ] {
        assert_eq!(sample(&m, &format!("{name}_count{{{l}}}")), count, "{name}");
        assert_eq!(
            sample(&m, &format!("{name}_bucket{{le=\"+Inf\",{l}}}")),
            count,
            "{name}"
        );
        assert!(sample(&m, &format!("{name}_sum{{{l}}}")) > 0.0, "{name}");
    }
    // vLLM's first and last bucket boundaries.
    for series in [
        format!("vllm:time_to_first_token_seconds_bucket{{le=\"0.001\",{l}}}"),
        format!("vllm:time_to_first_token_seconds_bucket{{le=\"2560.0\",{l}}}"),
        format!("vllm:inter_token_latency_seconds_bucket{{le=\"0.01\",{l}}}"),
        format!("vllm:inter_token_latency_seconds_bucket{{le=\"80.0\",{l}}}"),
        format!("vllm:e2e_request_latency_seconds_bucket{{le=\"0.3\",{l}}}"),
        format!("vllm:e2e_request_latency_seconds_bucket{{le=\"7680.0\",{l}}}"),
    ] {
        sample(&m, &series);
    }
}

/// What a streaming client saw, with the times it saw it.
#[derive(Debug)]
struct Seen {
    sent: Instant,
    first_token: Instant,
    done: Instant,
    tokens: usize,
}

/// Streams a chat request; signals `admitted` on the role-only chunk.
async fn stream_chat(addr: SocketAddr, body: Value, admitted: Option<oneshot::Sender<()>>) -> Seen {
    let mut admitted = admitted;
    let sent = Instant::now();
    let mut ex = Exchange::open(addr, "POST", "/v1/chat/completions", Some(&body)).await;
    assert_eq!(ex.status, 200);
    let mut first_token = None;
    let mut tokens = 0;
    while let Some((at, data)) = ex.next_event().await {
        if data == "[DONE]" {
            return Seen {
                sent,
                first_token: first_token.expect("a token before [DONE]"),
                done: at,
                tokens,
            };
        }
        let v: Value = serde_json::from_str(&data).expect("json");
        let delta = &v["choices"][0]["delta"];
        if delta.get("role").is_some() {
            assert!(first_token.is_none(), "role chunk after a token");
            if let Some(tx) = admitted.take() {
                let _ = tx.send(());
            }
        } else if delta["content"].as_str().is_some_and(|c| !c.is_empty()) {
            first_token.get_or_insert(at);
            tokens += 1;
        }
    }
    panic!("stream ended without [DONE]");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_batch_queue_in_order() {
    let s = start(SimConfig {
        max_batch: 1,
        prefill_ms_per_token: 0.5,
        itl_ms: 2.0,
        itl_batch_factor: 0.05,
        ..SimConfig::new("llama")
    })
    .await;
    let addr = s.addr;
    // A: short prompt, 150 tokens of 2 ms. B: 100 prompt tokens (50 ms of
    // prefill), 20 tokens.
    let t0 = Instant::now();
    let (admitted_tx, admitted_rx) = oneshot::channel();
    let a = tokio::spawn(stream_chat(
        addr,
        chat("llama", "hi", 150, true),
        Some(admitted_tx),
    ));
    admitted_rx.await.expect("A admitted");
    let b = tokio::spawn(stream_chat(
        addr,
        chat("llama", &"y".repeat(400), 20, true),
        None,
    ));
    // While A runs, B waits: one running, one waiting.
    let sim = s.sim.clone();
    eventually("B waiting behind A", || {
        let sim = sim.clone();
        async move { sim.waiting() == 1 }
    })
    .await;
    assert_eq!(s.sim.running(), 1);
    let m = metrics(addr).await;
    assert_eq!(
        sample(&m, "vllm:num_requests_waiting{model_name=\"llama\"}"),
        1.0
    );
    assert_eq!(
        sample(&m, "vllm:num_requests_running{model_name=\"llama\"}"),
        1.0
    );
    assert_eq!(
        sample(&m, "vllm:kv_cache_usage_perc{model_name=\"llama\"}"),
        1.0
    );

    let a = a.await.expect("A");
    let b = b.await.expect("B");
    assert_eq!((a.tokens, b.tokens), (150, 20));
    let a_total = a.done - t0;
    let b_ttft_from_t0 = b.first_token - t0;
    assert!(
        b_ttft_from_t0 >= a_total,
        "B's first token ({b_ttft_from_t0:?} after the start) came before A finished ({a_total:?})"
    );
    // B's own TTFT includes the wait for A.
    let b_ttft = b.first_token - b.sent;
    assert!(b_ttft >= a.done - b.sent, "{b_ttft:?}");
    // And B alone would have been much faster than its queued TTFT: 50 ms
    // of prefill and one step of 2 ms, against A's 300 ms of decoding.
    assert!(b_ttft > Duration::from_millis(100), "{b_ttft:?}");
    assert_eq!(s.sim.running(), 0);
    assert_eq!(s.sim.waiting(), 0);
}

#[tokio::test]
async fn a_client_going_away_frees_its_batch_slot() {
    let s = start(SimConfig {
        max_batch: 1,
        itl_ms: 2.0,
        ..fast("llama")
    })
    .await;
    // 5000 tokens of 2 ms: 10 s, unless the slot is freed on disconnect.
    let mut ex = Exchange::open(
        s.addr,
        "POST",
        "/v1/chat/completions",
        Some(&chat("llama", "hi", 5000, true)),
    )
    .await;
    ex.next_event().await.expect("role chunk");
    ex.next_event().await.expect("first token");
    assert_eq!(s.sim.running(), 1);
    drop(ex);
    let sim = s.sim.clone();
    eventually("the slot to be freed", || {
        let sim = sim.clone();
        async move { sim.running() == 0 }
    })
    .await;
    let resp = post(
        s.addr,
        "/v1/chat/completions",
        &chat("llama", "hi", 3, false),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    let m = metrics(s.addr).await;
    assert_eq!(
        sample(
            &m,
            "vllm:request_success_total{finished_reason=\"length\",model_name=\"llama\"}"
        ),
        1.0
    );
}

async fn read_load(path: &Path) -> Option<f64> {
    let text = tokio::fs::read_to_string(path).await.ok()?;
    let value = text.strip_suffix('\n')?;
    value.parse().ok()
}

#[tokio::test]
async fn the_load_file_follows_the_running_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gpu-load");
    let s = start(SimConfig {
        max_batch: 4,
        itl_ms: 2.0,
        load_file: Some(path.clone()),
        ..fast("llama")
    })
    .await;
    eventually("an idle load file", || {
        let path = path.clone();
        async move { read_load(&path).await == Some(0.0) }
    })
    .await;

    // One of four running: 1 / 4 * 2 = 0.5.
    let mut ex = Exchange::open(
        s.addr,
        "POST",
        "/v1/chat/completions",
        Some(&chat("llama", "hi", 5000, true)),
    )
    .await;
    ex.next_event().await.expect("role chunk");
    eventually("a half-busy load file", || {
        let path = path.clone();
        async move { read_load(&path).await == Some(0.5) }
    })
    .await;
    drop(ex);
    eventually("an idle load file again", || {
        let path = path.clone();
        async move {
            let load = read_load(&path).await;
            assert!(load.is_none_or(|u| (0.0..=1.0).contains(&u)), "{load:?}");
            load == Some(0.0)
        }
    })
    .await;
}

#[tokio::test]
async fn each_gpu_the_engine_uses_gets_its_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gpus = dir.path().join("gpus");
    let load = |uuid: &str| gpus.join(uuid).join("load");
    let s = start(SimConfig {
        max_batch: 4,
        itl_ms: 2.0,
        gpu_dir: Some(gpus.clone()),
        gpus: vec!["GPU-a".into(), "GPU-b".into()],
        ..fast("llama")
    })
    .await;
    eventually("idle loads in both GPUs' directories", || {
        let (a, b) = (load("GPU-a"), load("GPU-b"));
        async move { read_load(&a).await == Some(0.0) && read_load(&b).await == Some(0.0) }
    })
    .await;

    let mut ex = Exchange::open(
        s.addr,
        "POST",
        "/v1/chat/completions",
        Some(&chat("llama", "hi", 5000, true)),
    )
    .await;
    ex.next_event().await.expect("role chunk");
    eventually("both GPUs half busy", || {
        let (a, b) = (load("GPU-a"), load("GPU-b"));
        async move { read_load(&a).await == Some(0.5) && read_load(&b).await == Some(0.5) }
    })
    .await;
    drop(ex);
    let mut entries: Vec<String> = std::fs::read_dir(&gpus)
        .expect("the GPU dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    assert_eq!(entries, ["GPU-a", "GPU-b"], "no other GPU is touched");
}

/// The binary takes its GPUs from NVIDIA_VISIBLE_DEVICES, as a container
/// that requested them gets them from the device plugin.
#[tokio::test]
async fn the_binary_publishes_to_the_gpus_of_nvidia_visible_devices() {
    let bin = strata_e2e::harness::workspace_binary("strata-engine-sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let gpus = dir.path().join("gpus");
    let listen = format!("127.0.0.1:{}", strata_e2e::harness::free_port());
    let command = |visible: &str| {
        let mut cmd = tokio::process::Command::new(&bin);
        cmd.args(["--listen", &listen, "--model", "m", "--gpu-dir"])
            .arg(&gpus)
            .env("NVIDIA_VISIBLE_DEVICES", visible)
            .env("STRATA_FAKE_NVML_DEVICES", "GPU-z,GPU-b,GPU-c")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        cmd
    };

    // A GPU the node does not have: the engine refuses to start.
    let out = tokio::time::timeout(TIMEOUT, command("GPU-a,7").output())
        .await
        .expect("exits")
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("GPU 7"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut child = command("GPU-a,1").spawn().expect("spawn");
    eventually("idle loads for GPU-a and GPU-b", || {
        let (a, b) = (gpus.join("GPU-a/load"), gpus.join("GPU-b/load"));
        async move { read_load(&a).await == Some(0.0) && read_load(&b).await == Some(0.0) }
    })
    .await;
    assert!(!gpus.join("GPU-z").exists() && !gpus.join("GPU-c").exists());
    child.kill().await.expect("kill");
}

/// One non-streamed chat request of one token; its duration.
async fn timed_chat(addr: SocketAddr, content: &str) -> Duration {
    let sent = Instant::now();
    let resp = post(
        addr,
        "/v1/chat/completions",
        &chat("llama", content, 1, false),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    sent.elapsed()
}

#[tokio::test]
async fn prefix_caching_prefills_only_the_uncached_part_and_counts_hits_in_tokens() {
    // 2,048 characters = 512 tokens = 32 blocks of 16: 256 ms of prefill cold.
    let config = SimConfig {
        prefill_ms_per_token: 0.5,
        itl_ms: 1.0,
        prefix_caching: true,
        ..SimConfig::new("llama")
    };
    let s = start(config).await;
    let l = "model_name=\"llama\"";
    let system = "You are a helpful assistant. ".repeat(80);
    let prompt = |user: &str| format!("{}{user}", &system[..2048 - user.len()]);
    let cold = timed_chat(s.addr, &prompt("first question")).await;
    // Shares all blocks but the last with the first prompt (the question
    // is in block 31): 31 blocks cached, 16 tokens prefilled.
    let warm = timed_chat(s.addr, &prompt("another one....")).await;
    assert!(cold >= Duration::from_millis(250), "cold {cold:?}");
    assert!(warm < Duration::from_millis(150), "warm {warm:?}");
    let m = metrics(s.addr).await;
    assert_eq!(
        sample(&m, &format!("vllm:prefix_cache_queries_total{{{l}}}")),
        1024.0
    );
    assert_eq!(
        sample(&m, &format!("vllm:prefix_cache_hits_total{{{l}}}")),
        496.0
    );
    // Prompt tokens count every token, cached or not, as vLLM's do.
    assert_eq!(
        sample(&m, &format!("vllm:prompt_tokens_total{{{l}}}")),
        1024.0
    );
    assert_eq!(s.sim.prefix_cache_len(), 33, "32 blocks, then one more");
    // Another text from its first block on: a miss.
    let other = "x".repeat(2048);
    let missed = timed_chat(s.addr, &other).await;
    assert!(missed >= Duration::from_millis(250), "miss {missed:?}");
    let m = metrics(s.addr).await;
    assert_eq!(
        sample(&m, &format!("vllm:prefix_cache_hits_total{{{l}}}")),
        496.0
    );

    // Without prefix caching (the default) the same prompt costs the same
    // every time, and nothing is counted.
    let plain = start(SimConfig {
        prefix_caching: false,
        ..s.sim.config().clone()
    })
    .await;
    for _ in 0..2 {
        let d = timed_chat(plain.addr, &prompt("first question")).await;
        assert!(d >= Duration::from_millis(250), "{d:?}");
    }
    let m = metrics(plain.addr).await;
    assert_eq!(
        sample(&m, &format!("vllm:prefix_cache_queries_total{{{l}}}")),
        0.0
    );
    assert_eq!(plain.sim.prefix_cache_len(), 0);
}

#[tokio::test]
async fn prefill_concurrency_makes_prefills_take_turns() {
    // 400 characters = 100 tokens = 200 ms of prefill each.
    let config = SimConfig {
        prefill_ms_per_token: 2.0,
        itl_ms: 1.0,
        ..SimConfig::new("llama")
    };
    let prompt = "y".repeat(400);
    let both = |addr: SocketAddr| {
        let p = prompt.clone();
        async move {
            let sent = Instant::now();
            let (a, b) = tokio::join!(timed_chat(addr, &p), timed_chat(addr, &p));
            (a.max(b), sent.elapsed())
        }
    };
    // No limit (the default): two prefills overlap.
    let free = start(config.clone()).await;
    let (slowest, _) = both(free.addr).await;
    assert!(slowest < Duration::from_millis(350), "{slowest:?}");
    // One at a time: the second waits for the first.
    let serial = start(SimConfig {
        prefill_concurrency: 1,
        ..config
    })
    .await;
    let (slowest, _) = both(serial.addr).await;
    assert!(slowest >= Duration::from_millis(400), "{slowest:?}");
}
