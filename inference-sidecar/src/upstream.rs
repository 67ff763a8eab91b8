//! The proxy's HTTP/1.1 connections to the engine, driven by the request
//! that uses them.
//!
//! The proxy speaks to one engine, in the same pod, over loopback: a
//! request is written in one `writev` (head and body), the answer's head
//! is parsed by `httparse` (hyper's own parser) and its body taken apart
//! by [`crate::framing`], all inside the request's own task. What one read
//! from the engine brought is decoded and handed on in the same poll, and
//! the proxy forwards it in one write, as nginx does.
//!
//! Why not hyper's client, which the proxy used until 2026-12-05: its
//! connection keeps, besides its buffers, a request channel (two blocks of
//! tokio's unbounded channel, about 8 KiB) whether idle or busy, and runs a
//! dispatcher between the request and the socket. At 512 concurrent
//! requests that was about 11 MiB of the sidecar's peak heap and a share of
//! its CPU per request (docs/benchmarks.md, P2). A connection here is the
//! socket and, while an answer is read, one read buffer (none while idle).
//! Clients still talk to hyper's server: only the engine, a known local
//! peer, is spoken to by this module, and everything it sends is bounded
//! (head size and field count, chunk lines, trailers; the body's pace by the
//! proxy's silence timeout).
//!
//! Idle connections wait in a LIFO pool: at most `max_idle`, none older
//! than `idle_timeout`, which is below the engine's own keep-alive timeout
//! (uvicorn's, vLLM's and SGLang's server, closes an idle connection after
//! 5 s; the default here is 4 s), so the proxy closes an idle connection
//! before the engine does and never sends on one the engine is closing.
//! [`Pool::sweep`] closes expired ones even when no request comes, so no
//! socket waits in CLOSE_WAIT for the next burst. An idle connection is not
//! read (nobody needs it), so one the engine closed anyway (it restarted)
//! is found out when it is taken: a read that does not wait tells.
//!
//! A request that a reused connection did not deliver (the write failed)
//! is sent again on a new connection. One the engine took and then closed
//! the connection on before any byte of an answer is sent again only if
//! it can be repeated (GET, HEAD, OPTIONS, TRACE, or an `Idempotency-Key`),
//! as Go's transport does: a completion the engine read may be running,
//! and sending it twice would run and bill it twice.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::framing::{self, Decoder, FramingError, Step};

/// Bytes asked of a read from the engine at first.
const READ_BYTES: usize = 8 * 1024;
/// Most bytes asked of one read (reads that fill what they were given
/// double it, up to this).
const MAX_READ_BYTES: usize = 64 * 1024;

/// How long an idle engine connection is kept by default: below the 5 s
/// after which uvicorn (vLLM's and SGLang's HTTP server) closes it.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// Why the engine could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The engine URL is not `http://host[:port][/path]`.
    #[error("the engine URL {0} is not http://host[:port][/path]")]
    Url(String),
    /// The path cannot be sent.
    #[error("cannot forward the path {0}")]
    Path(String),
    /// Connecting failed.
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// The engine's address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// No connection within the connect timeout.
    #[error("connecting to {0}: timed out")]
    ConnectTimeout(String),
    /// The engine closed the connection before answering.
    #[error("the engine closed the connection without answering")]
    Unanswered,
    /// Writing the request or reading the answer failed.
    #[error("talking to the engine: {0}")]
    Io(#[from] std::io::Error),
    /// The answer is not HTTP/1.1 as the proxy reads it.
    #[error(transparent)]
    Framing(#[from] FramingError),
}

/// Settings of a [`Pool`].
#[derive(Debug, Clone, Copy)]
pub struct PoolLimits {
    /// Idle connections kept at most.
    pub max_idle: usize,
    /// How long an idle connection is kept.
    pub idle_timeout: Duration,
    /// Time to connect.
    pub connect_timeout: Duration,
}

impl Default for PoolLimits {
    fn default() -> Self {
        Self {
            max_idle: 64,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            connect_timeout: Duration::from_secs(2),
        }
    }
}

/// Where the engine is.
#[derive(Debug)]
struct Target {
    /// `host:port`.
    addr: String,
    /// The `Host` header of requests that come without one.
    host: http::HeaderValue,
    /// The URL's path, put before every request's (empty for `/`).
    prefix: String,
}

/// Connections to one engine.
pub struct Pool {
    /// The engine, or the URL that does not name one.
    target: Result<Target, String>,
    limits: PoolLimits,
    /// Oldest first; taken from the back.
    idle: Mutex<VecDeque<(TcpStream, Instant)>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("target", &self.target)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

fn target(url: &str) -> Option<Target> {
    let uri: http::Uri = url.parse().ok()?;
    if uri.scheme_str() != Some("http") || uri.query().is_some() {
        return None;
    }
    let authority = uri.authority()?;
    if authority.as_str().contains('@') {
        return None;
    }
    let port = authority.port_u16().unwrap_or(80);
    let host = authority.host();
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addr = if bare.contains(':') {
        format!("[{bare}]:{port}")
    } else {
        format!("{bare}:{port}")
    };
    Some(Target {
        addr,
        host: http::HeaderValue::from_str(authority.as_str()).ok()?,
        prefix: uri.path().trim_end_matches('/').to_string(),
    })
}

/// The request's fields that are not copied to the engine: the head
/// written there frames the message itself.
const NOT_COPIED: [http::HeaderName; 4] = [
    http::header::HOST,
    http::header::CONTENT_LENGTH,
    http::header::TRANSFER_ENCODING,
    http::header::CONNECTION,
];

/// A request's head as written to the engine: its method and URI (origin
/// form), `Host` (the request's, else the engine's), its fields but those
/// that frame a message (the body's length is written here), and
/// `Content-Length` when there is a body or the method expects one.
/// Nothing of it can break the framing: methods, URIs and field names and
/// values were validated by `http` (no CR, LF or NUL).
fn request_head(parts: &http::request::Parts, host: &http::HeaderValue, body: usize) -> Bytes {
    use http::{Method, header};
    use std::io::Write as _;
    let mut h = Vec::with_capacity(256);
    h.extend_from_slice(parts.method.as_str().as_bytes());
    h.push(b' ');
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    h.extend_from_slice(if target.is_empty() { "/" } else { target }.as_bytes());
    h.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    h.extend_from_slice(parts.headers.get(header::HOST).unwrap_or(host).as_bytes());
    h.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        if NOT_COPIED.contains(name) {
            continue;
        }
        h.extend_from_slice(name.as_str().as_bytes());
        h.extend_from_slice(b": ");
        h.extend_from_slice(value.as_bytes());
        h.extend_from_slice(b"\r\n");
    }
    if body > 0 || [Method::POST, Method::PUT, Method::PATCH].contains(&parts.method) {
        // Writing to a Vec cannot fail.
        let _ = write!(h, "content-length: {body}\r\n");
    }
    h.extend_from_slice(b"\r\n");
    Bytes::from(h)
}

/// One connection to the engine while it carries a request.
struct EngineConn {
    stream: TcpStream,
    /// Bytes read and not yet decoded.
    buf: BytesMut,
    /// How much the next read asks for.
    want: usize,
}

impl EngineConn {
    fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            buf: BytesMut::new(),
            want: READ_BYTES,
        }
    }

    /// Reads more into the buffer: how many bytes (0: the engine closed).
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        loop {
            ready!(self.stream.poll_read_ready(cx))?;
            self.buf.reserve(self.want);
            let room = self.buf.capacity() - self.buf.len();
            match self.stream.try_read_buf(&mut self.buf) {
                Ok(n) => {
                    if n >= room {
                        self.want = (self.want * 2).min(MAX_READ_BYTES);
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// Whether the engine closed an idle connection (or sent on it unasked):
/// a read that does not wait finds the end, an error or bytes.
fn closed(stream: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    !matches!(stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// How far a failed try of a request got.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Reached {
    /// The request was not all written: the engine cannot act on it.
    NotSent,
    /// Written, and the connection ended before any byte of an answer:
    /// the engine may have read it (and may be running it).
    Unanswered,
    /// An answer had begun.
    Answered,
}

/// How one try of a request failed.
struct Failure {
    reached: Reached,
    error: UpstreamError,
}

/// Whether a request may be sent twice (RFC 9110 9.2.2; Go's transport
/// retries these, and any with an idempotency key, after a connection it
/// reused ended unanswered).
fn replayable(parts: &http::request::Parts) -> bool {
    matches!(
        parts.method,
        http::Method::GET | http::Method::HEAD | http::Method::OPTIONS | http::Method::TRACE
    ) || parts.headers.contains_key("idempotency-key")
        || parts.headers.contains_key("x-idempotency-key")
}

impl Pool {
    /// A pool for the engine at `url` (`http://host[:port][/path]`); with
    /// another URL every request fails ([`Pool::check`] tells at start).
    pub fn new(url: &str, limits: PoolLimits) -> Self {
        Self {
            target: target(url).ok_or_else(|| url.to_string()),
            limits,
            idle: Mutex::new(VecDeque::new()),
        }
    }

    /// Whether the URL names an engine.
    pub fn check(&self) -> Result<(), UpstreamError> {
        match &self.target {
            Ok(_) => Ok(()),
            Err(url) => Err(UpstreamError::Url(url.clone())),
        }
    }

    /// The URI of `path_and_query` at the engine (origin form).
    pub fn uri(&self, path_and_query: &str) -> Result<http::Uri, UpstreamError> {
        let t = self.target()?;
        let uri = if t.prefix.is_empty() {
            http::Uri::try_from(path_and_query)
        } else {
            http::Uri::try_from(format!("{}{path_and_query}", t.prefix))
        };
        uri.map_err(|_| UpstreamError::Path(path_and_query.chars().take(256).collect()))
    }

    fn target(&self) -> Result<&Target, UpstreamError> {
        self.target
            .as_ref()
            .map_err(|url| UpstreamError::Url(url.clone()))
    }

    /// Idle connections now (for tests and metrics).
    pub fn idle_count(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(TcpStream, Instant)>> {
        match self.idle.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Takes the idle connections older than the idle timeout out of
    /// `idle` (oldest first, so they are at the front).
    fn expired(&self, idle: &mut VecDeque<(TcpStream, Instant)>) -> Vec<(TcpStream, Instant)> {
        let now = Instant::now();
        let mut expired = Vec::new();
        while idle
            .front()
            .is_some_and(|(_, since)| now.duration_since(*since) >= self.limits.idle_timeout)
        {
            expired.extend(idle.pop_front());
        }
        expired
    }

    /// The most recently used idle connection that is still open.
    fn take(&self) -> Option<TcpStream> {
        loop {
            let (stream, expired) = {
                let mut idle = self.lock();
                let expired = self.expired(&mut idle);
                (idle.pop_back(), expired)
            };
            // Closed outside the lock.
            drop(expired);
            let (stream, _) = stream?;
            if !closed(&stream) {
                return Some(stream);
            }
        }
    }

    /// Closes idle connections as they expire, whether or not requests
    /// come; runs until dropped (the server aborts it at shutdown).
    pub async fn sweep(self: Arc<Self>) {
        // A connection lives at most a quarter of the timeout past it.
        let every = (self.limits.idle_timeout / 4).max(Duration::from_millis(10));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let expired = {
                let mut idle = self.lock();
                self.expired(&mut idle)
            };
            if !expired.is_empty() {
                tracing::debug!(closed = expired.len(), "idle engine connections expired");
            }
        }
    }

    /// Keeps an idle connection, within the limits.
    fn put(&self, stream: TcpStream) {
        let mut idle = self.lock();
        let rejected = if idle.len() >= self.limits.max_idle {
            Some(stream)
        } else {
            idle.push_back((stream, Instant::now()));
            None
        };
        drop(idle);
        drop(rejected);
    }

    async fn connect(&self) -> Result<TcpStream, UpstreamError> {
        let addr = &self.target()?.addr;
        let stream = tokio::time::timeout(
            self.limits.connect_timeout,
            TcpStream::connect(addr.as_str()),
        )
        .await
        .map_err(|_| UpstreamError::ConnectTimeout(addr.clone()))?
        .map_err(|source| UpstreamError::Connect {
            addr: addr.clone(),
            source,
        })?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// Sends `req` (its URI the path and query) on a pooled or new
    /// connection and waits for the answer's head. The answer's body comes
    /// through the returned [`Exchange`], which gives the connection back
    /// to the pool once the body is complete.
    pub async fn send(
        self: &Arc<Self>,
        req: http::Request<Bytes>,
    ) -> Result<http::Response<Exchange>, UpstreamError> {
        let host = &self.target()?.host;
        let head_request = req.method() == http::Method::HEAD;
        let (parts, body) = req.into_parts();
        let head = request_head(&parts, host, body.len());
        let mut reuse = true;
        loop {
            let (stream, reused) = match reuse.then(|| self.take()).flatten() {
                Some(s) => (s, true),
                None => (self.connect().await?, false),
            };
            let mut conn = EngineConn::new(stream);
            match ask(&mut conn, &head, &body, head_request).await {
                Ok(answer) => {
                    let mut ex = Exchange {
                        pool: self.clone(),
                        conn: Some(conn),
                        decoder: Decoder::new(answer.framing),
                        keep_alive: answer.keep_alive,
                    };
                    if ex.decoder.is_done() {
                        ex.release();
                    }
                    let mut resp = http::Response::new(ex);
                    *resp.status_mut() = answer.status;
                    *resp.headers_mut() = answer.headers;
                    return Ok(resp);
                }
                Err(f)
                    if reused
                        && (f.reached == Reached::NotSent
                            || (f.reached == Reached::Unanswered && replayable(&parts))) =>
                {
                    tracing::debug!("an idle engine connection was closed: {}", f.error);
                    reuse = false;
                }
                Err(f) => return Err(f.error),
            }
        }
    }
}

/// Writes the request (head and body in one `writev` where they fit) and
/// reads the answer's head.
async fn ask(
    conn: &mut EngineConn,
    head: &Bytes,
    body: &Bytes,
    head_request: bool,
) -> Result<framing::Head, Failure> {
    let mut out = head.clone().chain(body.clone());
    if let Err(e) = conn.stream.write_all_buf(&mut out).await {
        return Err(Failure {
            reached: Reached::NotSent,
            error: e.into(),
        });
    }
    loop {
        match framing::parse_head(&mut conn.buf, head_request) {
            Ok(Some(h)) => return Ok(h),
            Ok(None) => {}
            Err(e) => {
                return Err(Failure {
                    reached: Reached::Answered,
                    error: e.into(),
                });
            }
        }
        let read = poll_fn(|cx| conn.poll_read(cx)).await;
        // The end, or a reset, before any byte of an answer: the engine
        // closed the connection, before or after it read the request.
        let nothing = conn.buf.is_empty();
        let reached = if nothing {
            Reached::Unanswered
        } else {
            Reached::Answered
        };
        match read {
            Ok(0) => {
                return Err(Failure {
                    reached,
                    error: if nothing {
                        UpstreamError::Unanswered
                    } else {
                        FramingError::Truncated.into()
                    },
                });
            }
            Ok(_) => {}
            Err(e) => {
                return Err(Failure {
                    reached,
                    error: e.into(),
                });
            }
        }
    }
}

/// A request's hold on its engine connection while the answer's body
/// streams.
pub struct Exchange {
    pool: Arc<Pool>,
    /// None once the connection ended (or went back to the pool).
    conn: Option<EngineConn>,
    decoder: Decoder,
    /// Whether the connection can carry another request after this one.
    keep_alive: bool,
}

impl std::fmt::Debug for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchange")
            .field("open", &self.conn.is_some())
            .field("done", &self.decoder.is_done())
            .finish()
    }
}

impl Exchange {
    /// Whether the whole body has been read (for a body of known length:
    /// as soon as its last piece is handed out).
    pub fn is_end(&self) -> bool {
        self.decoder.is_done()
    }

    /// The next piece of the body, reading from the engine as needed;
    /// None at its end. Once complete, the connection goes back to the
    /// pool (in the same poll as the last piece of a body of known
    /// length, since a client told the length may stop polling).
    pub fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, UpstreamError>>> {
        loop {
            if self.decoder.is_done() {
                self.release();
                return Poll::Ready(None);
            }
            let Some(c) = self.conn.as_mut() else {
                return Poll::Ready(Some(Err(FramingError::Truncated.into())));
            };
            match self.decoder.decode(&mut c.buf) {
                Ok(Step::Data(data)) => {
                    if self.decoder.is_done() {
                        self.release();
                    }
                    return Poll::Ready(Some(Ok(data)));
                }
                Ok(Step::End) => continue,
                Ok(Step::More) => {}
                Err(e) => return Poll::Ready(Some(Err(self.fail(e.into())))),
            }
            match c.poll_read(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    self.keep_alive = false;
                    if let Err(e) = self.decoder.eof() {
                        return Poll::Ready(Some(Err(self.fail(e.into()))));
                    }
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(self.fail(e.into())))),
            }
        }
    }

    /// Drops the connection after a failure.
    fn fail(&mut self, e: UpstreamError) -> UpstreamError {
        self.conn = None;
        tracing::debug!("engine connection: {e}");
        e
    }

    /// The answer is complete: the connection goes back to the pool if it
    /// can carry another request and nothing came after the answer.
    fn release(&mut self) {
        if let Some(c) = self.conn.take() {
            if self.keep_alive && c.buf.is_empty() {
                self.pool.put(c.stream);
            } else if !c.buf.is_empty() {
                tracing::debug!("{}", FramingError::Trailing);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_urls() {
        for (url, addr, host, path) in [
            (
                "http://127.0.0.1:8000",
                "127.0.0.1:8000",
                "127.0.0.1:8000",
                "/v1/models",
            ),
            (
                "http://localhost",
                "localhost:80",
                "localhost",
                "/v1/models",
            ),
            ("http://[::1]:9", "[::1]:9", "[::1]:9", "/v1/models"),
            (
                "http://engine:8000/base",
                "engine:8000",
                "engine:8000",
                "/base/v1/models",
            ),
        ] {
            let p = Pool::new(url, PoolLimits::default());
            let t = p.target().expect(url);
            assert_eq!((t.addr.as_str(), t.host.to_str().ok()), (addr, Some(host)));
            assert_eq!(p.uri("/v1/models").expect("uri").to_string(), path);
        }
        for url in [
            "https://127.0.0.1:8000",
            "127.0.0.1:8000",
            "http://",
            "",
            "http://user@127.0.0.1:8000",
            "http://127.0.0.1:8000/?q",
        ] {
            let p = Pool::new(url, PoolLimits::default());
            assert!(p.check().is_err(), "{url}");
            assert!(p.uri("/v1/models").is_err(), "{url}");
        }
    }

    #[test]
    fn request_heads_carry_their_own_framing_only() {
        let host = http::HeaderValue::from_static("127.0.0.1:8000");
        let req = http::Request::post("/v1/chat/completions?x=1")
            .header("content-type", "application/json")
            .header("content-length", "999")
            .header("transfer-encoding", "chunked")
            .header("connection", "close")
            .header("x-request-id", "abc")
            .body(())
            .expect("request");
        let (parts, ()) = req.into_parts();
        assert_eq!(
            request_head(&parts, &host, 12),
            "POST /v1/chat/completions?x=1 HTTP/1.1\r\nhost: 127.0.0.1:8000\r\ncontent-type: application/json\r\nx-request-id: abc\r\ncontent-length: 12\r\n\r\n"
        );
        // A POST without a body still says so; a GET does not.
        let (parts, ()) = http::Request::post("/v1/completions")
            .header("host", "engine")
            .body(())
            .expect("request")
            .into_parts();
        assert_eq!(
            request_head(&parts, &host, 0),
            "POST /v1/completions HTTP/1.1\r\nhost: engine\r\ncontent-length: 0\r\n\r\n"
        );
        let (parts, ()) = http::Request::get("/v1/models")
            .body(())
            .expect("request")
            .into_parts();
        assert_eq!(
            request_head(&parts, &host, 0),
            "GET /v1/models HTTP/1.1\r\nhost: 127.0.0.1:8000\r\n\r\n"
        );
    }

    #[test]
    fn only_requests_that_may_run_twice_are_replayable() {
        let parts = |method: &str, key: Option<&str>| {
            let mut b = http::Request::builder().method(method).uri("/v1/x");
            if let Some(k) = key {
                b = b.header(k, "k-1");
            }
            b.body(()).expect("request").into_parts().0
        };
        for m in ["GET", "HEAD", "OPTIONS", "TRACE"] {
            assert!(replayable(&parts(m, None)), "{m}");
        }
        for m in ["POST", "PUT", "DELETE", "PATCH"] {
            assert!(!replayable(&parts(m, None)), "{m}");
        }
        assert!(replayable(&parts("POST", Some("Idempotency-Key"))));
        assert!(replayable(&parts("POST", Some("x-idempotency-key"))));
    }
}
