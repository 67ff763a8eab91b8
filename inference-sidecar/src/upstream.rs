//! The proxy's HTTP/1.1 connections to the engine, driven by the request
//! that uses them.
//!
//! hyper's pooled client runs every connection as a task of its own and
//! hands each piece of an answer over a channel: a request crosses tasks
//! (and often threads) several times, and a streamed answer reaches the
//! proxy one piece per wake-up, so that each server-sent event left in a
//! write of its own. Here a connection ([`hyper::client::conn::http1`]) is
//! polled by the request's own task, inside [`Exchange::poll_frame`]: what
//! one read from the engine brought is decoded and handed on in the same
//! poll, and the proxy forwards it in one write, as nginx does.
//!
//! Idle connections wait in a small LIFO pool: at most `max_idle`, none
//! older than `idle_timeout`. An idle connection is not polled (nobody
//! needs it), so one the engine closed meanwhile (uvicorn closes idle
//! keep-alive connections after 5 s) is found out when it is taken: it is
//! polled once, sees the end of the stream and is dropped; a request that
//! a reused connection could not send is sent again on a new one (hyper
//! gives it back when none of it was written).

use std::collections::VecDeque;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

type Body = Full<Bytes>;
type Conn = http1::Connection<TokioIo<TcpStream>, Body>;

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
    /// The HTTP exchange failed.
    #[error("{0}")]
    Http(#[from] hyper::Error),
}

/// One connection to the engine.
struct EngineConn {
    send: http1::SendRequest<Body>,
    conn: Conn,
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
            idle_timeout: Duration::from_secs(30),
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
    idle: Mutex<VecDeque<(EngineConn, Instant)>>,
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

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(EngineConn, Instant)>> {
        match self.idle.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The most recently used idle connection that is still open.
    fn take(&self) -> Option<EngineConn> {
        loop {
            let (conn, expired) = {
                let mut idle = self.lock();
                let now = Instant::now();
                let mut expired = Vec::new();
                while idle
                    .front()
                    .is_some_and(|(_, since)| now.duration_since(*since) > self.limits.idle_timeout)
                {
                    expired.extend(idle.pop_front());
                }
                (idle.pop_back(), expired)
            };
            // Closed outside the lock.
            drop(expired);
            let (mut c, _) = conn?;
            // Polled once: a connection the engine closed ends now.
            let mut cx = Context::from_waker(std::task::Waker::noop());
            if c.send.is_closed() || Pin::new(&mut c.conn).poll(&mut cx).is_ready() {
                continue;
            }
            return Some(c);
        }
    }

    /// Keeps an idle connection, within the limits.
    fn put(&self, c: EngineConn) {
        if c.send.is_closed() {
            return;
        }
        let mut idle = self.lock();
        let rejected = if idle.len() >= self.limits.max_idle {
            Some(c)
        } else {
            idle.push_back((c, Instant::now()));
            None
        };
        drop(idle);
        drop(rejected);
    }

    async fn connect(&self) -> Result<EngineConn, UpstreamError> {
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
        let (send, conn) = http1::handshake(TokioIo::new(stream)).await?;
        Ok(EngineConn { send, conn })
    }

    /// Sends `req` (its URI the path and query; `Host` added when missing)
    /// on a pooled or new connection and waits for the answer's head,
    /// driving the connection meanwhile. The answer's body comes through
    /// the returned [`Exchange`], which gives the connection back to the
    /// pool once the body is complete.
    pub async fn send(
        self: &Arc<Self>,
        mut req: http::Request<Body>,
    ) -> Result<(http::Response<Incoming>, Exchange), UpstreamError> {
        let host = &self.target()?.host;
        if !req.headers().contains_key(http::header::HOST) {
            req.headers_mut().insert(http::header::HOST, host.clone());
        }
        // A reused connection may have been closed by the engine in the
        // meantime: its request, not sent, goes again on a new connection.
        let mut reuse = true;
        loop {
            let (c, reused) = match reuse.then(|| self.take()).flatten() {
                Some(c) => (c, true),
                None => (self.connect().await?, false),
            };
            let mut ex = Exchange {
                pool: self.clone(),
                conn: Some(c),
            };
            if let Err(e) = poll_fn(|cx| ex.poll_ready(cx)).await {
                if reused {
                    reuse = false;
                    continue;
                }
                return Err(e.into());
            }
            let Some(c) = ex.conn.as_mut() else {
                reuse = false;
                continue;
            };
            let mut answer = std::pin::pin!(c.send.try_send_request(req));
            let result = poll_fn(|cx| {
                ex.drive(cx);
                answer.as_mut().poll(cx)
            })
            .await;
            match result {
                Ok(resp) => return Ok((resp, ex)),
                Err(mut e) => match e.take_message() {
                    Some(r) if reused => {
                        tracing::debug!("an idle engine connection was closed: {}", e.error());
                        req = r;
                        reuse = false;
                    }
                    _ => return Err(e.into_error().into()),
                },
            }
        }
    }
}

/// A request's hold on its engine connection while the answer's body
/// streams: polling the body polls the connection.
pub struct Exchange {
    pool: Arc<Pool>,
    /// None once the connection ended (or went back to the pool).
    conn: Option<EngineConn>,
}

impl std::fmt::Debug for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchange")
            .field("open", &self.conn.is_some())
            .finish()
    }
}

impl Exchange {
    /// Polls the connection: it writes what is to be written, reads what
    /// the engine sent and hands it to the body. A connection that ends
    /// (closed, or failed: the body then reports the error) is dropped.
    fn drive(&mut self, cx: &mut Context<'_>) {
        if let Some(c) = &mut self.conn
            && let Poll::Ready(r) = Pin::new(&mut c.conn).poll(cx)
        {
            if let Err(e) = r {
                tracing::debug!("engine connection: {e}");
            }
            self.conn = None;
        }
    }

    /// Whether the connection can take a request (driving it meanwhile).
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        self.drive(cx);
        match &mut self.conn {
            Some(c) => c.send.poll_ready(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    /// The next frame of `body` (the answer of this exchange), driving the
    /// connection; at the end of the body the connection goes back to the
    /// pool.
    pub fn poll_frame(
        &mut self,
        body: &mut Incoming,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        use hyper::body::Body as _;
        self.drive(cx);
        let frame = Pin::new(&mut *body).poll_frame(cx);
        match &frame {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if body.is_end_stream() => self.release(),
            _ => {}
        }
        frame
    }

    /// Gives the connection back to the pool (the answer is complete).
    fn release(&mut self) {
        if let Some(c) = self.conn.take() {
            self.pool.put(c);
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
}
