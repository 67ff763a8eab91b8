//! The OpenAI-compatible proxy: forwards to the engine and measures every
//! request. Streams pass event by event (an SSE event is forwarded as soon
//! as it is complete; nothing is held longer).

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderMap, StatusCode, header};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

use crate::app::App;
use crate::measure::{ChunkKind, Measurement, StreamMeasure, usage_of};
use crate::sse::Splitter;

/// Largest request body accepted (prompts with long contexts).
pub const MAX_REQUEST_BYTES: usize = 32 * 1024 * 1024;

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
];

fn error(status: StatusCode, message: String, kind: &str) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "code": status.as_u16()}});
    (status, axum::Json(body)).into_response()
}

/// Records a request's metrics once, on completion or when the client goes away.
struct Recorder {
    app: Arc<App>,
    model: String,
    adapter: String,
    endpoint: &'static str,
    start: Instant,
    done: bool,
}

impl Recorder {
    fn new(app: Arc<App>, model: String, adapter: String, endpoint: &'static str) -> Self {
        app.metrics.in_flight.with_label_values(&[&model]).inc();
        Self {
            app,
            model,
            adapter,
            endpoint,
            start: Instant::now(),
            done: false,
        }
    }

    fn finish(&mut self, m: Option<Measurement>, outcome: &str) {
        if self.done {
            return;
        }
        self.done = true;
        let metrics = &self.app.metrics;
        let l = [self.model.as_str(), self.adapter.as_str()];
        metrics.in_flight.with_label_values(&[&self.model]).dec();
        metrics
            .requests
            .with_label_values(&[&self.model, &self.adapter, self.endpoint, outcome])
            .inc();
        let e2e = m.map_or(self.start.elapsed(), |m| m.e2e);
        metrics.e2e.with_label_values(&l).observe(e2e.as_secs_f64());
        if let Some(m) = m {
            if let Some(t) = m.ttft {
                metrics.ttft.with_label_values(&l).observe(t.as_secs_f64());
            }
            if let Some(t) = m.itl {
                metrics.itl.with_label_values(&l).observe(t.as_secs_f64());
            }
            metrics
                .prompt_tokens
                .with_label_values(&l)
                .inc_by(m.prompt_tokens);
            metrics
                .generation_tokens
                .with_label_values(&l)
                .inc_by(m.completion_tokens);
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        // The client went away before the answer was complete.
        self.finish(None, "disconnected");
    }
}

fn outcome(status: StatusCode) -> &'static str {
    if status.is_success() {
        "success"
    } else if status.is_client_error() {
        "client_error"
    } else {
        "engine_error"
    }
}

fn endpoint_of(path: &str) -> &'static str {
    match path {
        "/v1/chat/completions" => "chat",
        "/v1/completions" => "completions",
        "/v1/embeddings" => "embeddings",
        _ => "other",
    }
}

/// Forwards an OpenAI request to the engine and measures it.
pub async fn forward(State(app): State<Arc<App>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| path.clone());
    let endpoint = endpoint_of(&path);
    let body = match axum::body::to_bytes(body, MAX_REQUEST_BYTES).await {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body: {e}"),
                "invalid_request_error",
            );
        }
    };
    let served = app.config.served_model.clone();

    // Which model or adapter, whether streamed, whether usage was asked for.
    let mut parsed: Option<Value> = serde_json::from_slice(&body).ok();
    let requested = parsed
        .as_ref()
        .and_then(|v| v.get("model"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let adapter = match requested.as_deref() {
        None => String::new(),
        Some(m) if m == served => String::new(),
        Some(m) => {
            if !app.adapters.read().await.contains_key(m) {
                app.metrics
                    .requests
                    .with_label_values(&[&served, "unknown", endpoint, "not_found"])
                    .inc();
                let loaded: Vec<String> = app.adapters.read().await.keys().cloned().collect();
                return error(
                    StatusCode::NOT_FOUND,
                    format!(
                        "model `{m}` is not served by this replica: the base model is `{served}`, adapters loaded here: [{}]",
                        loaded.join(", ")
                    ),
                    "NotFoundError",
                );
            }
            m.to_string()
        }
    };
    let stream = parsed
        .as_ref()
        .and_then(|v| v.get("stream"))
        .and_then(Value::as_bool)
        == Some(true);
    let mut strip_usage = false;
    let mut body = body;
    if stream
        && matches!(endpoint, "chat" | "completions")
        && let Some(v) = parsed.as_mut()
    {
        let asked = v
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            == Some(true);
        if !asked {
            // Ask for the usage chunk (exact token counts) and drop it from what the client sees.
            match v.get_mut("stream_options").and_then(Value::as_object_mut) {
                Some(o) => {
                    o.insert("include_usage".into(), Value::Bool(true));
                }
                None => {
                    if let Some(o) = v.as_object_mut() {
                        o.insert("stream_options".into(), json!({"include_usage": true}));
                    }
                }
            }
            if let Ok(b) = serde_json::to_vec(v) {
                body = Bytes::from(b);
                strip_usage = true;
            }
        }
    }

    let mut recorder = Recorder::new(app.clone(), served.clone(), adapter, endpoint);
    let mut builder = http::Request::builder()
        .method(parts.method.clone())
        .uri(format!("{}{path_and_query}", app.config.engine_url));
    for (k, v) in &parts.headers {
        if !HOP_BY_HOP.contains(&k.as_str()) && k != header::HOST {
            builder = builder.header(k, v);
        }
    }
    let upstream = match builder.body(Full::new(body)) {
        Ok(r) => r,
        Err(e) => {
            recorder.finish(None, "client_error");
            return error(
                StatusCode::BAD_REQUEST,
                format!("cannot forward: {e}"),
                "invalid_request_error",
            );
        }
    };
    let resp = match app.client.request(upstream).await {
        Ok(r) => r,
        Err(e) => {
            recorder.finish(None, "engine_unavailable");
            return error(
                StatusCode::BAD_GATEWAY,
                format!("the engine is unreachable: {e}"),
                "engine_unavailable",
            );
        }
    };
    let status = resp.status();
    let mut headers = HeaderMap::new();
    for (k, v) in resp.headers() {
        if !HOP_BY_HOP.contains(&k.as_str()) {
            headers.append(k, v.clone());
        }
    }
    let is_sse = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));

    if !(stream && is_sse && status.is_success()) {
        // Whole answer: usage from the body.
        let bytes = match resp.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                recorder.finish(None, "engine_error");
                return error(
                    StatusCode::BAD_GATEWAY,
                    format!("reading the engine's answer: {e}"),
                    "engine_error",
                );
            }
        };
        let usage = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| usage_of(&v));
        let m = Measurement {
            ttft: None,
            itl: None,
            e2e: recorder.start.elapsed(),
            prompt_tokens: usage.map_or(0, |u| u.prompt),
            completion_tokens: usage.map_or(0, |u| u.completion),
        };
        recorder.finish(Some(m), outcome(status));
        let mut out = Response::new(Body::from(bytes));
        *out.status_mut() = status;
        *out.headers_mut() = headers;
        return out;
    }

    struct St {
        body: hyper::body::Incoming,
        splitter: Splitter,
        measure: StreamMeasure,
        recorder: Recorder,
        strip_usage: bool,
    }
    impl St {
        fn process(&mut self, events: Vec<crate::sse::SseEvent>) -> Vec<u8> {
            let mut out = Vec::new();
            for ev in events {
                if let Some(data) = &ev.data
                    && data.trim() != "[DONE]"
                    && let Ok(v) = serde_json::from_str::<Value>(data)
                {
                    let kind = self.measure.chunk(&v, self.recorder.start.elapsed());
                    if kind == ChunkKind::Usage && self.strip_usage {
                        continue;
                    }
                }
                out.extend_from_slice(&ev.raw);
            }
            out
        }
    }
    let state = St {
        body: resp.into_body(),
        splitter: Splitter::default(),
        measure: StreamMeasure::default(),
        recorder,
        strip_usage,
    };
    let events = futures::stream::unfold(Some(state), |st| async move {
        let mut st = st?;
        loop {
            match st.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        let events = st.splitter.feed(&data);
                        let out = st.process(events);
                        if !out.is_empty() {
                            return Some((Ok::<Bytes, std::io::Error>(Bytes::from(out)), Some(st)));
                        }
                    }
                }
                Some(Err(e)) => {
                    let m = st.measure.finish(st.recorder.start.elapsed());
                    st.recorder.finish(Some(m), "engine_error");
                    return Some((Err(std::io::Error::other(e)), None));
                }
                None => {
                    let rest: Vec<_> = st.splitter.finish().into_iter().collect();
                    let out = st.process(rest);
                    let m = st.measure.finish(st.recorder.start.elapsed());
                    st.recorder.finish(Some(m), "success");
                    return if out.is_empty() {
                        None
                    } else {
                        Some((Ok(Bytes::from(out)), None))
                    };
                }
            }
        }
    });
    let mut out = Response::new(Body::from_stream(events.boxed()));
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    out
}
