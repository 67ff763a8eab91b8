//! The OpenAI-compatible proxy: forwards the inference API (and nothing
//! else: strata_net::openai is the allowlist) to the engine and measures
//! every request. Streams pass event by event (an SSE event is forwarded as
//! soon as it is complete; nothing is held longer); non-streamed answers
//! pass through as they come, a bounded copy kept for their token counts.
//!
//! Every resource a client can make the proxy spend is bounded: requests in
//! flight (429), body size (413), body time (408), the memory of all bodies
//! held at once (503), the parts of the body it parses (model, stream,
//! stream_options: crate::request), the engine's silence, and one event's
//! size.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderMap, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Body as _;
use serde_json::Value;
use strata_net::body::{self, BodyLimits, Held};
use strata_net::openai::{self, Endpoint, Route};
use tokio::sync::OwnedSemaphorePermit;

use crate::app::App;
use crate::measure::{ChunkKind, Measurement, StreamMeasure, usage_of};
use crate::request;
use crate::sse::Splitter;

fn error(status: StatusCode, message: String, kind: &str) -> Response {
    let body = openai::error_body(status, kind, &message);
    (status, axum::Json(body)).into_response()
}

/// An error with `Retry-After: 1`.
fn retry_later(status: StatusCode, message: String) -> Response {
    let mut r = error(status, message, "rate_limit_error");
    r.headers_mut()
        .insert(header::RETRY_AFTER, http::HeaderValue::from_static("1"));
    r
}

/// Records a request's metrics once, on completion or when the client goes away.
struct Recorder {
    app: Arc<App>,
    /// The request's slot: free again when the answer is complete.
    _slot: OwnedSemaphorePermit,
    model: String,
    adapter: String,
    endpoint: &'static str,
    start: Instant,
    done: bool,
}

impl Recorder {
    fn new(
        app: Arc<App>,
        slot: OwnedSemaphorePermit,
        model: String,
        adapter: String,
        endpoint: &'static str,
        start: Instant,
    ) -> Self {
        app.metrics.in_flight.with_label_values(&[&model]).inc();
        Self {
            app,
            _slot: slot,
            model,
            adapter,
            endpoint,
            start,
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

/// The API port's only handler: routes by the allowlist, then forwards.
pub async fn entry(State(app): State<Arc<App>>, req: Request) -> Response {
    let route = openai::route(req.method(), req.uri().path(), req.uri().query());
    match route {
        Route::Forward { endpoint, upstream } => forward(app, req, endpoint, upstream).await,
        Route::MethodNotAllowed { endpoint } => {
            app.metrics.rejected.with_label_values(&["method"]).inc();
            let mut r = error(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{} takes {}", req.uri().path(), endpoint.method()),
                "invalid_request_error",
            );
            if let Ok(v) = http::HeaderValue::from_str(endpoint.method().as_str()) {
                r.headers_mut().insert(header::ALLOW, v);
            }
            r
        }
        Route::NotFound => {
            app.metrics.rejected.with_label_values(&["not_found"]).inc();
            let body = openai::not_found_body(req.uri().path());
            (StatusCode::NOT_FOUND, axum::Json(body)).into_response()
        }
    }
}

fn reject(app: &App, reason: &str) {
    app.metrics.rejected.with_label_values(&[reason]).inc();
}

/// What a request body says, after its bounded read.
struct Incoming {
    body: Bytes,
    held: Held,
    fields: request::Fields,
}

/// The budget a body draws on: small declared bodies have their own.
fn budget_for(app: &App, declared: Option<u64>) -> &strata_net::body::ByteBudget {
    match declared {
        Some(n) if n <= crate::app::SMALL_BODY_BYTES => &app.small_budget,
        _ => &app.budget,
    }
}

/// Reads and checks the body of a POST endpoint.
async fn read_request(app: &App, headers: &HeaderMap, body: Body) -> Result<Incoming, Response> {
    let limits = &app.config.limits;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let read = body::read(
        body,
        declared,
        BodyLimits {
            max_bytes: limits.max_request_bytes,
            timeout: limits.request_body_timeout,
        },
        Some(budget_for(app, declared)),
    )
    .await;
    let (bytes, held) = match read {
        Ok(r) => r,
        Err(e) => {
            reject(app, e.label());
            return Err(match e {
                body::BodyError::TooLarge { .. } => error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("{e} (this sidecar's --max-request-bytes)"),
                    "invalid_request_error",
                ),
                body::BodyError::Timeout(_) => error(
                    StatusCode::REQUEST_TIMEOUT,
                    e.to_string(),
                    "invalid_request_error",
                ),
                body::BodyError::Busy => {
                    retry_later(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
                }
                body::BodyError::Read(_) => error(
                    StatusCode::BAD_REQUEST,
                    e.to_string(),
                    "invalid_request_error",
                ),
            });
        }
    };
    match request::parse(&bytes) {
        Ok(fields) => Ok(Incoming {
            body: bytes,
            held,
            fields,
        }),
        Err(e) => {
            reject(app, "bad_request");
            Err(error(
                StatusCode::BAD_REQUEST,
                e.to_string(),
                "invalid_request_error",
            ))
        }
    }
}

/// Forwards an allowed request to the engine and measures it.
async fn forward(app: Arc<App>, req: Request, endpoint: Endpoint, upstream: String) -> Response {
    let start = Instant::now();
    let Ok(slot) = app.slots.clone().try_acquire_owned() else {
        reject(&app, "concurrency");
        return retry_later(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "this replica has {} requests in flight, its limit",
                app.config.limits.max_concurrent_requests
            ),
        );
    };
    let (parts, body) = req.into_parts();
    let served = app.config.served_model.clone();
    let label = endpoint.label();

    // POST endpoints: the bounded body and its few fields. GET endpoints
    // carry no body (whatever was sent is not read, nor forwarded).
    let (mut body, mut held, fields) = if endpoint.has_body() {
        match read_request(&app, &parts.headers, body).await {
            Ok(i) => (i.body, i.held, i.fields),
            Err(r) => return r,
        }
    } else {
        (Bytes::new(), Held::default(), request::Fields::default())
    };
    let adapter = match fields.model.as_deref() {
        None => String::new(),
        Some(m) if m == served => String::new(),
        Some(m) => {
            let adapters = app.adapters.read().await;
            if !adapters.contains_key(m) {
                app.metrics
                    .requests
                    .with_label_values(&[&served, "unknown", label, "not_found"])
                    .inc();
                let loaded: Vec<&str> = adapters.keys().map(String::as_str).collect();
                let shown: String = m.chars().take(128).collect();
                return error(
                    StatusCode::NOT_FOUND,
                    format!(
                        "model `{shown}` is not served by this replica: the base model is `{served}`, adapters loaded here: [{}]",
                        loaded.join(", ")
                    ),
                    "NotFoundError",
                );
            }
            m.to_string()
        }
    };
    // Ask for the usage chunk (exact token counts) and drop it from what
    // the client sees.
    let stream = fields.stream && endpoint.streams();
    let mut strip_usage = false;
    if stream && let Some(b) = request::with_usage(&body, &fields) {
        let declared = u64::try_from(b.len()).ok();
        let Some(more) = budget_for(&app, declared).try_take(b.len()) else {
            reject(&app, "busy");
            return retry_later(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many large bodies in flight; retry shortly".into(),
            );
        };
        drop(std::mem::replace(&mut held, more));
        body = Bytes::from(b);
        strip_usage = true;
    }

    let mut recorder = Recorder::new(app.clone(), slot, served.clone(), adapter, label, start);
    let mut headers = parts.headers.clone();
    strata_net::headers::strip_hop_by_hop(&mut headers);
    let mut builder = http::Request::builder()
        .method(parts.method.clone())
        .uri(format!("{}{upstream}", app.config.engine_url));
    if let Some(h) = builder.headers_mut() {
        *h = headers;
    }
    let upstream_req = match builder.body(Full::new(body)) {
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
    let engine_timeout = app.config.limits.engine_timeout;
    let resp = match tokio::time::timeout(engine_timeout, app.client.request(upstream_req)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            recorder.finish(None, "engine_unavailable");
            return error(
                StatusCode::BAD_GATEWAY,
                format!("the engine is unreachable: {e}"),
                "engine_unavailable",
            );
        }
        Err(_) => {
            recorder.finish(None, "engine_error");
            app.metrics
                .engine_response_errors
                .with_label_values(&["timeout"])
                .inc();
            return error(
                StatusCode::GATEWAY_TIMEOUT,
                format!("the engine did not answer within {engine_timeout:?}"),
                "engine_error",
            );
        }
    };
    // The body is with the engine now.
    drop(held);
    let status = resp.status();
    let mut headers = resp.headers().clone();
    let length = resp.headers().get(header::CONTENT_LENGTH).cloned();
    strata_net::headers::strip_hop_by_hop(&mut headers);
    let is_sse = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let limits = app.config.limits;
    let pass = Pass {
        body: resp.into_body(),
        idle: engine_timeout,
        recorder,
        status,
    };
    let stream_body = if stream && is_sse && status.is_success() {
        sse_stream(pass, Splitter::new(limits.max_sse_event_bytes), strip_usage)
    } else {
        // Passed through unchanged: the engine's length stays true (and
        // spares the client a chunked encoding).
        if let Some(v) = length {
            headers.insert(header::CONTENT_LENGTH, v);
        }
        whole_stream(pass, limits.max_response_parse_bytes).await
    };
    let mut out = Response::new(Body::from_stream(stream_body));
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    out
}

/// An engine answer on its way to the client.
struct Pass {
    body: hyper::body::Incoming,
    idle: std::time::Duration,
    recorder: Recorder,
    status: StatusCode,
}

/// The next data frame: Ok(None) at the end, Err on failure or silence.
async fn next_data(p: &mut Pass) -> Result<Option<Bytes>, std::io::Error> {
    loop {
        match tokio::time::timeout(p.idle, p.body.frame()).await {
            Err(_) => {
                p.recorder
                    .app
                    .metrics
                    .engine_response_errors
                    .with_label_values(&["timeout"])
                    .inc();
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the engine went silent",
                ));
            }
            Ok(None) => return Ok(None),
            Ok(Some(Err(e))) => return Err(std::io::Error::other(e)),
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    return Ok(Some(data));
                }
            }
        }
    }
}

type ByteStream = futures::stream::BoxStream<'static, Result<Bytes, std::io::Error>>;

/// A non-streamed answer: passed through as it comes; a copy of at most
/// `keep` bytes (drawn from the memory budget) gives the token counts.
///
/// Its first piece is awaited before the answer's head is sent, so that the
/// head and the first piece leave in one write (a short answer: in one
/// write, as the engine sent it) instead of two writes and two wake-ups of
/// the client; an engine sends a non-streamed answer's head and body
/// together, so nothing is held back.
async fn whole_stream(mut pass: Pass, keep: usize) -> ByteStream {
    struct St {
        pass: Pass,
        first: Option<Result<Option<Bytes>, std::io::Error>>,
        copy: Option<Vec<u8>>,
        held: Held,
        keep: usize,
    }
    impl St {
        /// Records the answer's measurement (token counts from the copy).
        fn finish(&mut self) {
            let usage = self
                .copy
                .as_deref()
                .and_then(|c| serde_json::from_slice::<Value>(c).ok())
                .and_then(|v| usage_of(&v));
            let m = Measurement {
                ttft: None,
                itl: None,
                e2e: self.pass.recorder.start.elapsed(),
                prompt_tokens: usage.map_or(0, |u| u.prompt),
                completion_tokens: usage.map_or(0, |u| u.completion),
            };
            let status = self.pass.status;
            self.pass.recorder.finish(Some(m), outcome(status));
        }
    }
    let first = next_data(&mut pass).await;
    let st = St {
        pass,
        first: Some(first),
        copy: Some(Vec::new()),
        held: Held::default(),
        keep,
    };
    futures::stream::unfold(Some(st), |st| async move {
        let mut st = st?;
        let next = match st.first.take() {
            Some(r) => r,
            None => next_data(&mut st.pass).await,
        };
        match next {
            Ok(Some(data)) => {
                if let Some(copy) = &mut st.copy {
                    let fits = copy.len() + data.len() <= st.keep;
                    let more = fits
                        .then(|| st.pass.recorder.app.budget.try_take(data.len()))
                        .flatten();
                    match more {
                        Some(h) => {
                            copy.extend_from_slice(&data);
                            st.held.absorb(h);
                        }
                        None => {
                            // Too large to read for its counts: pass it on unmeasured.
                            st.pass
                                .recorder
                                .app
                                .metrics
                                .engine_response_errors
                                .with_label_values(&["unmeasured_large"])
                                .inc();
                            st.copy = None;
                            st.held = Held::default();
                        }
                    }
                }
                // The engine's length is reached: measured now, before the
                // last bytes go out (the client, told the length, may not
                // wait for more, and the server stops polling this stream).
                if st.pass.body.is_end_stream() {
                    st.finish();
                    return Some((Ok(data), None));
                }
                Some((Ok(data), Some(st)))
            }
            Ok(None) => {
                st.finish();
                None
            }
            Err(e) => {
                st.pass.recorder.finish(None, "engine_error");
                Some((Err(e), None))
            }
        }
    })
    .boxed()
}

/// A streamed answer, event by event, measured.
fn sse_stream(pass: Pass, splitter: Splitter, strip_usage: bool) -> ByteStream {
    struct St {
        pass: Pass,
        splitter: Splitter,
        measure: StreamMeasure,
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
                    let at = self.pass.recorder.start.elapsed();
                    let kind = self.measure.chunk(&v, at);
                    if kind == ChunkKind::Usage && self.strip_usage {
                        continue;
                    }
                }
                out.extend_from_slice(&ev.raw);
            }
            out
        }
    }
    let st = St {
        pass,
        splitter,
        measure: StreamMeasure::default(),
        strip_usage,
    };
    futures::stream::unfold(Some(st), |st| async move {
        let mut st = st?;
        loop {
            match next_data(&mut st.pass).await {
                Ok(Some(data)) => match st.splitter.feed(&data) {
                    Ok(events) => {
                        let out = st.process(events);
                        if !out.is_empty() {
                            return Some((Ok(Bytes::from(out)), Some(st)));
                        }
                    }
                    Err(e) => {
                        st.pass
                            .recorder
                            .app
                            .metrics
                            .engine_response_errors
                            .with_label_values(&["event_too_large"])
                            .inc();
                        let m = st.measure.finish(st.pass.recorder.start.elapsed());
                        st.pass.recorder.finish(Some(m), "engine_error");
                        return Some((Err(std::io::Error::other(e)), None));
                    }
                },
                Err(e) => {
                    let m = st.measure.finish(st.pass.recorder.start.elapsed());
                    st.pass.recorder.finish(Some(m), "engine_error");
                    return Some((Err(e), None));
                }
                Ok(None) => {
                    let rest: Vec<_> = st.splitter.finish().into_iter().collect();
                    let out = st.process(rest);
                    let m = st.measure.finish(st.pass.recorder.start.elapsed());
                    st.pass.recorder.finish(Some(m), "success");
                    return if out.is_empty() {
                        None
                    } else {
                        Some((Ok(Bytes::from(out)), None))
                    };
                }
            }
        }
    })
    .boxed()
}
