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

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use http::{HeaderMap, StatusCode, header};
use strata_net::body::{self, BodyLimits, Held};
use strata_net::openai::{self, Endpoint, Route};
use tokio::sync::OwnedSemaphorePermit;

use crate::app::App;
use crate::measure::{ChunkKind, Measurement, StreamMeasure, summarize};
use crate::request;
use crate::sse::{EventTooLarge, Splitter};

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
pub async fn entry(app: Arc<App>, req: Request) -> Response {
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

/// Counts an engine answer cut short, unreadable or unmeasured.
fn engine_error(app: &App, reason: &str) {
    app.metrics
        .engine_response_errors
        .with_label_values(&[reason])
        .inc();
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

    let mut recorder = Recorder::new(app.clone(), slot, served, adapter, label, start);
    let mut headers = parts.headers;
    strata_net::headers::strip_hop_by_hop(&mut headers);
    let engine_timeout = app.config.limits.engine_timeout;
    let resp = match ask_engine(&app, &mut recorder, parts.method, headers, &upstream, body).await {
        Ok(r) => r,
        Err(answer) => return answer,
    };
    // The body is with the engine now.
    drop(held);
    let (head, engine) = resp.into_parts();
    let status = head.status;
    let mut headers = head.headers;
    let length = headers.get(header::CONTENT_LENGTH).cloned();
    let is_sse = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    strata_net::headers::strip_hop_by_hop(&mut headers);
    let limits = app.config.limits;
    let mut pass = Pass {
        engine,
        idle: engine_timeout,
        silence: Box::pin(tokio::time::sleep(engine_timeout)),
        armed: false,
        recorder,
        status,
    };
    let stream_body = if stream && is_sse && status.is_success() {
        SseStream {
            pass,
            splitter: Splitter::new(limits.max_sse_event_bytes),
            measure: StreamMeasure::default(),
            strip_usage,
            out: BytesMut::new(),
            failed: None,
            done: false,
        }
        .boxed()
    } else {
        // Passed through unchanged: the engine's length stays true (and
        // spares the client a chunked encoding).
        if let Some(v) = length {
            headers.insert(header::CONTENT_LENGTH, v);
        }
        // The first piece is awaited before the head is sent (see
        // WholeStream).
        let first = poll_fn(|cx| pass.poll_data(cx)).await;
        WholeStream {
            pass,
            first: Some(first),
            copy: Some(Vec::new()),
            held: Held::default(),
            keep: limits.max_response_parse_bytes,
            done: false,
        }
        .boxed()
    };
    report_load(&app, &mut headers);
    let mut out = Response::new(Body::from_stream(stream_body));
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    out
}

/// Sends a request to the engine and waits for its answer's head; when that
/// fails, the error answer for the client (the outcome recorded).
async fn ask_engine(
    app: &App,
    recorder: &mut Recorder,
    method: http::Method,
    headers: HeaderMap,
    upstream: &str,
    body: Bytes,
) -> Result<http::Response<crate::upstream::Exchange>, Response> {
    let uri = match app.engine.uri(upstream) {
        Ok(u) => u,
        Err(e) => {
            recorder.finish(None, "client_error");
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!("cannot forward: {e}"),
                "invalid_request_error",
            ));
        }
    };
    let mut req = http::Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    let engine_timeout = app.config.limits.engine_timeout;
    let failed = match tokio::time::timeout(engine_timeout, app.engine.send(req)).await {
        Ok(Ok(r)) => return Ok(r),
        Ok(Err(e @ crate::upstream::UpstreamError::Framing(_))) => {
            recorder.finish(None, "engine_error");
            engine_error(app, "malformed");
            error(
                StatusCode::BAD_GATEWAY,
                format!("the engine's answer cannot be read: {e}"),
                "engine_error",
            )
        }
        Ok(Err(e)) => {
            recorder.finish(None, "engine_unavailable");
            error(
                StatusCode::BAD_GATEWAY,
                format!("the engine is unreachable: {e}"),
                "engine_unavailable",
            )
        }
        Err(_) => {
            recorder.finish(None, "engine_error");
            engine_error(app, "timeout");
            error(
                StatusCode::GATEWAY_TIMEOUT,
                format!("the engine did not answer within {engine_timeout:?}"),
                "engine_error",
            )
        }
    };
    Err(failed)
}

/// This replica's load on the answer's head, for the gateway
/// ([`strata_net::load`]): requests held now (this one included) and the
/// engine's KV-cache use as last scraped. Whatever the engine put under
/// that name is replaced.
fn report_load(app: &App, headers: &mut HeaderMap) {
    let limit = app.config.limits.max_concurrent_requests.max(1);
    let held = limit.saturating_sub(app.slots.available_permits());
    let kv = app.metrics.engine_kv_cache.get();
    let load = strata_net::load::ReplicaLoad {
        in_flight: u32::try_from(held).unwrap_or(u32::MAX),
        kv_usage: kv.is_finite().then_some(kv),
    };
    if let Ok(v) = http::HeaderValue::from_str(&load.encode()) {
        headers.insert(strata_net::load::HEADER, v);
    }
}

/// Most bytes gathered for one write to the client: pieces that are
/// already there are forwarded together up to this much.
const MAX_GATHER_BYTES: usize = 64 * 1024;

/// An engine answer on its way to the client.
struct Pass {
    /// The answer's body, read from the engine connection as it is polled.
    engine: crate::upstream::Exchange,
    idle: std::time::Duration,
    /// The engine's silence: armed when no piece is there.
    silence: Pin<Box<tokio::time::Sleep>>,
    armed: bool,
    recorder: Recorder,
    status: StatusCode,
}

impl Pass {
    /// The next data frame: None at the end, an error on failure or when
    /// the engine stays silent longer than allowed.
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, std::io::Error>> {
        match self.engine.poll_data(cx) {
            Poll::Ready(None) => Poll::Ready(Ok(None)),
            Poll::Ready(Some(Err(e))) => {
                if matches!(e, crate::upstream::UpstreamError::Framing(_)) {
                    engine_error(&self.recorder.app, "malformed");
                }
                Poll::Ready(Err(std::io::Error::other(e)))
            }
            Poll::Ready(Some(Ok(data))) => {
                self.armed = false;
                Poll::Ready(Ok(Some(data)))
            }
            Poll::Pending => {
                if !self.armed {
                    self.armed = true;
                    let deadline = tokio::time::Instant::now() + self.idle;
                    self.silence.as_mut().reset(deadline);
                }
                if self.silence.as_mut().poll(cx).is_ready() {
                    engine_error(&self.recorder.app, "timeout");
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the engine went silent",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

/// A non-streamed answer: passed through as it comes; a copy of at most
/// `keep` bytes (drawn from the memory budget) gives the token counts.
///
/// Its first piece is awaited before the answer's head is sent, so that the
/// head and the first piece leave in one write (a short answer: in one
/// write, as the engine sent it) instead of two writes and two wake-ups of
/// the client; an engine sends a non-streamed answer's head and body
/// together, so nothing is held back.
struct WholeStream {
    pass: Pass,
    first: Option<Result<Option<Bytes>, std::io::Error>>,
    copy: Option<Vec<u8>>,
    held: Held,
    keep: usize,
    done: bool,
}

impl WholeStream {
    /// Records the answer's measurement (token counts from the copy, or
    /// from `whole`, the answer in one piece, not copied).
    fn finish(&mut self, last: Option<&[u8]>) {
        self.done = true;
        let whole = last.or(self.copy.as_deref());
        let usage = whole.and_then(summarize).and_then(|s| s.usage);
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

    /// Keeps a copy of `data` for the counts, within the limits.
    fn copy(&mut self, data: &[u8]) {
        let Some(copy) = &mut self.copy else {
            return;
        };
        let fits = copy.len() + data.len() <= self.keep;
        let more = fits
            .then(|| self.pass.recorder.app.budget.try_take(data.len()))
            .flatten();
        match more {
            Some(h) => {
                copy.extend_from_slice(data);
                self.held.absorb(h);
            }
            None => {
                // Too large to read for its counts: pass it on unmeasured.
                engine_error(&self.pass.recorder.app, "unmeasured_large");
                self.copy = None;
                self.held = Held::default();
            }
        }
    }
}

impl futures::Stream for WholeStream {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let st = &mut *self;
        if st.done {
            return Poll::Ready(None);
        }
        let next = match st.first.take() {
            Some(r) => r,
            None => match st.pass.poll_data(cx) {
                Poll::Ready(r) => r,
                Poll::Pending => return Poll::Pending,
            },
        };
        match next {
            Ok(Some(data)) => {
                // The engine's length is reached: measured now, before the
                // last bytes go out (the client, told the length, may not
                // wait for more, and the server stops polling this stream).
                // An answer in one piece is read where it is, not copied.
                if st.pass.engine.is_end() {
                    let one_piece =
                        st.copy.as_ref().is_some_and(Vec::is_empty) && data.len() <= st.keep;
                    if !one_piece {
                        st.copy(&data);
                    }
                    st.finish(one_piece.then_some(&data[..]));
                } else {
                    st.copy(&data);
                }
                Poll::Ready(Some(Ok(data)))
            }
            Ok(None) => {
                st.finish(None);
                Poll::Ready(None)
            }
            Err(e) => {
                st.done = true;
                st.pass.recorder.finish(None, "engine_error");
                Poll::Ready(Some(Err(e)))
            }
        }
    }
}

/// A streamed answer, event by event, measured. The events that are
/// there when the client's connection asks for more (all those one read
/// from the engine brought) leave together, in one write; none waits for
/// a later one.
struct SseStream {
    pass: Pass,
    splitter: Splitter,
    measure: StreamMeasure,
    strip_usage: bool,
    /// Complete events not yet forwarded.
    out: BytesMut,
    /// An error to give once what came before it is forwarded.
    failed: Option<std::io::Error>,
    done: bool,
}

impl SseStream {
    /// Measures one event; whether it goes on to the client.
    fn keep(measure: &mut StreamMeasure, start: Instant, strip_usage: bool, raw: &[u8]) -> bool {
        let Some(data) = crate::sse::data_bytes(raw) else {
            return true;
        };
        if data.trim_ascii() == b"[DONE]" {
            return true;
        }
        let Some(chunk) = summarize(&data) else {
            return true;
        };
        let kind = measure.summary(&chunk, start.elapsed());
        !(kind == ChunkKind::Usage && strip_usage)
    }

    /// Splits `data` into events, measures them and gathers those kept.
    fn feed(&mut self, data: &[u8]) -> Result<(), EventTooLarge> {
        let (measure, out, strip, start) = (
            &mut self.measure,
            &mut self.out,
            self.strip_usage,
            self.pass.recorder.start,
        );
        self.splitter.feed_each(data, |raw| {
            if Self::keep(measure, start, strip, raw) {
                out.extend_from_slice(raw);
            }
        })
    }

    fn end(&mut self, outcome: &str) {
        self.done = true;
        let m = self.measure.finish(self.pass.recorder.start.elapsed());
        self.pass.recorder.finish(Some(m), outcome);
    }

    /// What is gathered, if anything.
    fn gathered(&mut self) -> Option<Result<Bytes, std::io::Error>> {
        (!self.out.is_empty()).then(|| Ok(self.out.split().freeze()))
    }
}

impl futures::Stream for SseStream {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let st = &mut *self;
        if let Some(e) = st.failed.take() {
            return Poll::Ready(Some(Err(e)));
        }
        if st.done {
            return Poll::Ready(st.gathered());
        }
        while st.out.len() < MAX_GATHER_BYTES {
            match st.pass.poll_data(cx) {
                Poll::Ready(Ok(Some(data))) => {
                    if let Err(e) = st.feed(&data) {
                        engine_error(&st.pass.recorder.app, "event_too_large");
                        st.end("engine_error");
                        st.failed = Some(std::io::Error::other(e));
                        break;
                    }
                }
                Poll::Ready(Ok(None)) => {
                    let rest = st.splitter.finish();
                    if let Some(ev) = rest
                        && Self::keep(
                            &mut st.measure,
                            st.pass.recorder.start,
                            st.strip_usage,
                            &ev.raw,
                        )
                    {
                        st.out.extend_from_slice(&ev.raw);
                    }
                    st.end("success");
                    break;
                }
                Poll::Ready(Err(e)) => {
                    st.end("engine_error");
                    st.failed = Some(e);
                    break;
                }
                Poll::Pending => {
                    return match st.gathered() {
                        Some(out) => Poll::Ready(Some(out)),
                        None => Poll::Pending,
                    };
                }
            }
        }
        match st.gathered() {
            Some(out) => Poll::Ready(Some(out)),
            None => match st.failed.take() {
                Some(e) => Poll::Ready(Some(Err(e))),
                None if st.done => Poll::Ready(None),
                // The gathering cap: more at the next poll.
                None => {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
            },
        }
    }
}
