//! The proxy's own connections to the engine (strata_sidecar::upstream),
//! against a raw TCP engine that behaves as engines do: keep-alive
//! connections reused, idle ones the engine closed without a word not an
//! error for the next request, at most `max_idle` kept, a stream's events
//! that arrive together forwarded together, an engine gone mid-answer a cut
//! stream, answers framed every way HTTP/1.1 allows read whole, and answers
//! that break its framing a 502.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use strata_sidecar::app::{App, Config, Limits};
use strata_sidecar::engine::EngineKind;
use strata_sidecar::metrics::Metrics;
use strata_sidecar::server::{self, Intervals};

use common::until;

/// How the raw engine treats a connection after an answer.
#[derive(Clone, Copy, PartialEq)]
enum After {
    /// Waits for the next request.
    KeepAlive,
    /// Closes it, though the answer did not say so (as an engine whose
    /// keep-alive timeout passed).
    Close,
    /// Takes the next request on it and closes it without an answer (as an
    /// engine whose keep-alive timeout passed just as the request came, or
    /// one that failed while it read it).
    DropNext,
}

/// What the engine saw of the proxy's requests (the sidecar's own health
/// and metrics calls, on connections of their own, are not counted).
#[derive(Default)]
struct Seen {
    connections: AtomicUsize,
    open: AtomicUsize,
    requests: AtomicUsize,
}

const ANSWER: &str = r#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"}}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;

/// Reads one request (head and Content-Length body): its head, None at
/// the end.
async fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                buf.drain(..end + 4 + len);
                return Some(head);
            }
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// An engine on raw TCP: every request gets `answer` (after `delay`); a
/// connection it closes is closed `linger` after the answer.
async fn engine(
    after: After,
    delay: Duration,
    linger: Duration,
    answer: &'static [u8],
) -> (SocketAddr, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let s = s.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut counted = false;
                let mut answered = 0;
                while let Some(head) = read_request(&mut conn, &mut buf).await {
                    if !head.starts_with("post /v1/chat/completions")
                        && !head.starts_with("get /v1/models")
                    {
                        // The sidecar's health check or metrics scrape.
                        let _ = conn
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                            .await;
                        continue;
                    }
                    if !counted {
                        counted = true;
                        s.connections.fetch_add(1, Ordering::SeqCst);
                        s.open.fetch_add(1, Ordering::SeqCst);
                    }
                    s.requests.fetch_add(1, Ordering::SeqCst);
                    if after == After::DropNext && answered > 0 {
                        break;
                    }
                    answered += 1;
                    tokio::time::sleep(delay).await;
                    if conn.write_all(answer).await.is_err() || after == After::Close {
                        tokio::time::sleep(linger).await;
                        break;
                    }
                }
                drop(conn);
                if counted {
                    s.open.fetch_sub(1, Ordering::SeqCst);
                }
            });
        }
    });
    (addr, seen)
}

fn whole_answer() -> &'static [u8] {
    let s = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{ANSWER}",
        ANSWER.len()
    );
    Box::leak(s.into_bytes().into_boxed_slice())
}

struct Sidecar {
    app: Arc<App>,
    api: SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn sidecar(engine: SocketAddr, max_idle: usize) -> Sidecar {
    sidecar_with(engine, max_idle, Duration::from_secs(4)).await
}

async fn sidecar_with(engine: SocketAddr, max_idle: usize, idle_timeout: Duration) -> Sidecar {
    let app = Arc::new(App::new(
        Config {
            engine_url: format!("http://{engine}"),
            engine: EngineKind::Vllm,
            health_path: "/health".into(),
            metrics_path: "/metrics".into(),
            served_model: "m".into(),
            adapter_token_file: None,
            adapter_dir: None,
            hf_endpoint: "http://127.0.0.1:9".into(),
            limits: Limits {
                max_idle_engine_connections: max_idle,
                engine_idle_timeout: idle_timeout,
                engine_timeout: Duration::from_secs(5),
                ..Limits::default()
            },
            admin_tls: None,
        },
        Metrics::new().expect("metrics"),
    ));
    let api = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = api.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let intervals = Intervals {
        // The background loops stay out of the way (their own client).
        health: Duration::from_secs(3600),
        engine_metrics: Duration::from_secs(3600),
        adapters: Duration::from_secs(3600),
    };
    tokio::spawn(server::run(
        app.clone(),
        api,
        admin,
        intervals,
        async move {
            let _ = rx.await;
        },
    ));
    Sidecar {
        app,
        api: addr,
        _stop: tx,
    }
}

/// One raw request on a new client connection (which it closes): the
/// status and the body.
async fn exchange(addr: SocketAddr, req: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("answered")
        .expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .unwrap_or_default();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// One chat completion: the status and the body.
async fn post(addr: SocketAddr, body: &str) -> (u16, String) {
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    exchange(addr, &req).await
}

/// One GET: the status.
async fn get(addr: SocketAddr, path: &str) -> u16 {
    let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    exchange(addr, &req).await.0
}

/// Whether the sidecar's metrics hold a sample whose line starts with
/// `prefix` (name and labels) and has value `value`.
fn has_sample(sc: &Sidecar, prefix: &str, value: u64) -> bool {
    let text = sc.app.metrics.render();
    let found = text
        .lines()
        .any(|l| l.starts_with(prefix) && l.ends_with(&format!(" {value}")));
    if !found {
        eprintln!("{text}");
    }
    found
}

const CHAT: &str = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;

#[tokio::test]
async fn engine_connections_are_reused() {
    let (engine, seen) = engine(
        After::KeepAlive,
        Duration::ZERO,
        Duration::ZERO,
        whole_answer(),
    )
    .await;
    let sc = sidecar(engine, 8).await;
    for _ in 0..20 {
        let (status, body) = post(sc.api, CHAT).await;
        assert_eq!((status, body.as_str()), (200, ANSWER));
    }
    assert_eq!(seen.requests.load(Ordering::SeqCst), 20);
    assert_eq!(seen.connections.load(Ordering::SeqCst), 1, "one connection");
    assert_eq!(sc.app.engine.idle_count(), 1);
}

#[tokio::test]
async fn connections_the_engine_closed_while_idle_are_not_an_error() {
    let (engine, seen) = engine(After::Close, Duration::ZERO, Duration::ZERO, whole_answer()).await;
    let sc = sidecar(engine, 8).await;
    for i in 0..10 {
        let (status, body) = post(sc.api, CHAT).await;
        assert_eq!((status, body.as_str()), (200, ANSWER), "request {i}");
        // The engine's close reaches the sidecar while the connection idles.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(seen.connections.load(Ordering::SeqCst), 10);
    assert_eq!(sc.app.engine.idle_count(), 1, "the last, not yet taken");
    // Taken again: found closed and replaced.
    assert_eq!(post(sc.api, CHAT).await.0, 200);
}

#[tokio::test]
async fn at_most_max_idle_connections_are_kept() {
    let (engine, seen) = engine(
        After::KeepAlive,
        Duration::from_millis(300),
        Duration::ZERO,
        whole_answer(),
    )
    .await;
    let sc = sidecar(engine, 2).await;
    let all: Vec<_> = (0..8).map(|_| tokio::spawn(post(sc.api, CHAT))).collect();
    for r in all {
        assert_eq!(r.await.expect("joined").0, 200);
    }
    assert_eq!(seen.connections.load(Ordering::SeqCst), 8, "8 at once");
    assert_eq!(sc.app.engine.idle_count(), 2);
    // The engine sees the others closed.
    until("the engine to see the others closed", async || {
        seen.open.load(Ordering::SeqCst) <= 2
    })
    .await;
}

fn stream_answer(events: &[&str], end: bool) -> &'static [u8] {
    let mut s =
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
            .to_string();
    for e in events {
        let ev = format!("data: {e}\n\n");
        s.push_str(&format!("{:x}\r\n{ev}\r\n", ev.len()));
    }
    if end {
        s.push_str("0\r\n\r\n");
    }
    Box::leak(s.into_bytes().into_boxed_slice())
}

const STREAM: &str = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

#[tokio::test]
async fn a_stream_sent_at_once_leaves_at_once_and_is_measured() {
    let events = [
        r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#,
        r#"{"choices":[{"index":0,"delta":{"content":"a"}}]}"#,
        r#"{"choices":[{"index":0,"delta":{"content":"b"}}]}"#,
        r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}"#,
        "[DONE]",
    ];
    let (engine, _) = engine(
        After::KeepAlive,
        Duration::ZERO,
        Duration::ZERO,
        stream_answer(&events, true),
    )
    .await;
    let sc = sidecar(engine, 8).await;
    let (status, body) = post(sc.api, STREAM).await;
    assert_eq!(status, 200);
    // The usage chunk the sidecar asked for is not forwarded; one chunk
    // of the chunked encoding carries every other event.
    let want: String = [events[0], events[1], events[2], events[4]]
        .iter()
        .map(|e| format!("data: {e}\n\n"))
        .collect();
    assert_eq!(body, format!("{:X}\r\n{want}\r\n0\r\n\r\n", want.len()));
    assert!(has_sample(&sc, "strata_request_generation_tokens_total", 2));
}

#[tokio::test]
async fn an_engine_gone_mid_stream_cuts_the_stream_and_the_connection_is_not_kept() {
    let events = [r#"{"choices":[{"index":0,"delta":{"content":"a"}}]}"#];
    // The engine closes 200 ms after its first event (what came before an
    // error is forwarded only if the client's connection got to write it).
    let (engine, _) = engine(
        After::Close,
        Duration::ZERO,
        Duration::from_millis(200),
        stream_answer(&events, false),
    )
    .await;
    let sc = sidecar(engine, 8).await;
    let (status, body) = post(sc.api, STREAM).await;
    assert_eq!(status, 200);
    assert!(body.contains(events[0]), "{body}");
    assert!(!body.ends_with("0\r\n\r\n"), "the stream is cut: {body}");
    assert_eq!(sc.app.engine.idle_count(), 0);
}

#[tokio::test]
async fn a_repeatable_request_the_engine_dropped_on_a_kept_connection_goes_again_on_a_new_one() {
    let (engine, seen) = engine(
        After::DropNext,
        Duration::ZERO,
        Duration::ZERO,
        whole_answer(),
    )
    .await;
    let sc = sidecar(engine, 8).await;
    for i in 0..5 {
        assert_eq!(get(sc.api, "/v1/models").await, 200, "request {i}");
    }
    // Every request after the first reached a connection that the engine
    // then closed unanswered, and went again on a new one.
    assert_eq!(seen.connections.load(Ordering::SeqCst), 5);
    assert_eq!(seen.requests.load(Ordering::SeqCst), 9);
}

#[tokio::test]
async fn a_completion_the_engine_took_and_dropped_is_not_sent_twice() {
    let (engine, seen) = engine(
        After::DropNext,
        Duration::ZERO,
        Duration::ZERO,
        whole_answer(),
    )
    .await;
    let sc = sidecar(engine, 8).await;
    let (status, body) = post(sc.api, CHAT).await;
    assert_eq!((status, body.as_str()), (200, ANSWER));
    // The engine read the second on the kept connection and closed it: it
    // may be running it, so it is not sent again (a 502), and the next
    // request goes on a new connection.
    let (status, body) = post(sc.api, CHAT).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("without answering"), "{body}");
    assert_eq!(seen.requests.load(Ordering::SeqCst), 2, "sent once");
    let (status, body) = post(sc.api, CHAT).await;
    assert_eq!((status, body.as_str()), (200, ANSWER));
    assert_eq!(seen.connections.load(Ordering::SeqCst), 2);
    assert_eq!(seen.requests.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn idle_connections_are_closed_when_they_expire_though_no_request_comes() {
    let (engine, seen) = engine(
        After::KeepAlive,
        Duration::ZERO,
        Duration::ZERO,
        whole_answer(),
    )
    .await;
    let sc = sidecar_with(engine, 8, Duration::from_millis(300)).await;
    let sent = tokio::time::Instant::now();
    let answers = futures::future::join_all((0..3).map(|_| post(sc.api, CHAT))).await;
    for (status, body) in answers {
        assert_eq!((status, body.as_str()), (200, ANSWER));
    }
    let opened = seen.connections.load(Ordering::SeqCst);
    assert!(opened >= 1, "{opened}");
    // The sidecar closes them (the engine sees each end) with no further
    // request, within a quarter of the timeout past it.
    until(
        "the engine to see every idle connection closed",
        async || seen.open.load(Ordering::SeqCst) == 0,
    )
    .await;
    assert!(
        sent.elapsed() >= Duration::from_millis(300),
        "not before the timeout"
    );
    assert_eq!(sc.app.engine.idle_count(), 0);
    // The next request opens a new one.
    assert_eq!(post(sc.api, CHAT).await.0, 200);
    assert_eq!(seen.connections.load(Ordering::SeqCst), opened + 1);
}

#[tokio::test]
async fn answers_framed_every_way_http_allows_pass_whole() {
    // Delimited by the end of the connection, after an interim answer.
    let until_close = format!(
        "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n{ANSWER}"
    );
    let until_close: &'static [u8] = Box::leak(until_close.into_bytes().into_boxed_slice());
    let (engine_a, seen) = engine(After::Close, Duration::ZERO, Duration::ZERO, until_close).await;
    let sc = sidecar(engine_a, 8).await;
    for _ in 0..2 {
        let (status, body) = post(sc.api, CHAT).await;
        assert!(status == 200 && body.contains(ANSWER), "{status} {body}");
    }
    assert_eq!(
        sc.app.engine.idle_count(),
        0,
        "a connection that ends its answer is not kept"
    );
    assert_eq!(seen.connections.load(Ordering::SeqCst), 2);

    // Chunked, with an extension and a trailer, in two chunks.
    let (first, rest) = ANSWER.split_at(40);
    let chunked = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n{:x};ext=1\r\n{first}\r\n{:X}\r\n{rest}\r\n0\r\nx-trailer: 1\r\n\r\n",
        first.len(),
        rest.len()
    );
    let chunked: &'static [u8] = Box::leak(chunked.into_bytes().into_boxed_slice());
    let (engine_b, seen) = engine(After::KeepAlive, Duration::ZERO, Duration::ZERO, chunked).await;
    let sc = sidecar(engine_b, 8).await;
    for _ in 0..3 {
        let (status, body) = post(sc.api, CHAT).await;
        assert!(
            status == 200 && body.contains(first) && body.contains(rest),
            "{status} {body}"
        );
        assert!(
            !body.contains("x-trailer"),
            "trailers are not forwarded: {body}"
        );
    }
    assert_eq!(
        seen.connections.load(Ordering::SeqCst),
        1,
        "kept and reused"
    );
    assert_eq!(sc.app.engine.idle_count(), 1);
    // Read whole: the usage at its end was counted, once per answer.
    assert!(has_sample(&sc, "strata_request_prompt_tokens_total", 9));
}

#[tokio::test]
async fn answers_that_break_http_framing_are_a_502_and_the_connection_is_not_kept() {
    let two_lengths: &'static [u8] =
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!";
    let endless_head: &'static [u8] = Box::leak(
        format!("HTTP/1.1 200 OK\r\nx-filler: {}", "a".repeat(70 * 1024))
            .into_bytes()
            .into_boxed_slice(),
    );
    for (answer, why) in [
        (two_lengths, "Content-Length"),
        (endless_head, "exceeds 65536 bytes"),
    ] {
        // The engine holds the connection open after its answer: the error
        // is the answer's, not the end of the connection.
        let (engine, _) =
            engine(After::Close, Duration::ZERO, Duration::from_secs(3), answer).await;
        let sc = sidecar(engine, 8).await;
        let (status, body) = post(sc.api, CHAT).await;
        assert_eq!(status, 502, "{body}");
        assert!(
            body.contains("the engine's answer cannot be read") && body.contains(why),
            "{body}"
        );
        assert_eq!(sc.app.engine.idle_count(), 0);
        assert!(has_sample(
            &sc,
            "strata_engine_response_errors_total{reason=\"malformed\"}",
            1
        ));
    }
}

#[tokio::test]
async fn an_answer_whose_body_breaks_the_chunked_framing_is_cut_and_counted() {
    let bad_chunk: &'static [u8] = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n";
    let (engine, _) = engine(
        After::Close,
        Duration::ZERO,
        Duration::from_secs(3),
        bad_chunk,
    )
    .await;
    let sc = sidecar(engine, 8).await;
    let (status, body) = post(sc.api, CHAT).await;
    assert!(
        !body.ends_with("0\r\n\r\n"),
        "not a complete answer: {status} {body}"
    );
    assert_eq!(sc.app.engine.idle_count(), 0);
    assert!(has_sample(
        &sc,
        "strata_engine_response_errors_total{reason=\"malformed\"}",
        1
    ));
}
