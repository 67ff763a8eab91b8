//! A bounded HTTP/1.1 server for an axum router: at most `max_connections`
//! open connections (the next waits in the listen backlog), request heads
//! bounded in size and in time (the same timer closes an idle keep-alive
//! connection and a slowloris that trickles its headers), optional TLS with
//! a bounded handshake (from files: reloaded when they change), and a
//! graceful shutdown that lets requests in
//! flight finish within a grace period.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

/// The default time to receive a request's head, which is also how long
/// an idle keep-alive connection stays open.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a client of these servers (the gateway and the activator,
/// calling sidecars) keeps an idle connection: 5 s below the servers'
/// default keep-alive timeout ([`DEFAULT_HEADER_READ_TIMEOUT`]), so the
/// client closes an idle connection before the server does and never sends
/// a request on one the server is closing (which, for a POST already
/// written, would be a failed request: it cannot be sent again).
pub const CLIENT_IDLE_TIMEOUT: Duration =
    DEFAULT_HEADER_READ_TIMEOUT.saturating_sub(Duration::from_secs(5));

/// Bounds of a server.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Open connections at most.
    pub max_connections: usize,
    /// Time to receive a request's head; also how long a keep-alive
    /// connection may stay idle.
    pub header_read_timeout: Duration,
    /// Largest request head (request line and headers), bytes.
    pub max_header_bytes: usize,
    /// Time allowed for a TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// Time requests in flight get to finish at shutdown.
    pub shutdown_grace: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            max_header_bytes: 64 * 1024,
            tls_handshake_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(25),
        }
    }
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Reading a PEM file.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Not a PEM certificate chain or key.
    #[error("{0}: not a PEM certificate chain and private key")]
    Pem(String),
    /// Refused by rustls.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The crypto provider every TLS endpoint of Strata uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS acceptor from a PEM certificate chain and private key.
pub fn tls_acceptor(cert_pem: &[u8], key_pem: &[u8]) -> Result<TlsAcceptor, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Pem("no certificate".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Pem(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// How often [`tls_acceptor_from_files`] looks whether its files changed.
pub const TLS_RELOAD_CHECK: Duration = Duration::from_secs(30);

/// A TLS acceptor from PEM files that follows them: a certificate rotated
/// on disk (e.g. a mounted Secret updated by the operator) is served from
/// the next handshake after the next check (at most every
/// [`TLS_RELOAD_CHECK`]), without a restart. The files must be good at
/// start.
pub fn tls_acceptor_from_files(cert: &str, key: &str) -> Result<TlsAcceptor, TlsError> {
    tls_acceptor_reloading(Path::new(cert), Path::new(key), TLS_RELOAD_CHECK)
}

/// [`tls_acceptor_from_files`] with the interval between checks.
pub fn tls_acceptor_reloading(
    cert: &Path,
    key: &Path,
    check_every: Duration,
) -> Result<TlsAcceptor, TlsError> {
    let resolver = ReloadingCert::new(cert, key, check_every)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A file's modification time and size (what tells that it changed; a
/// mounted Secret's files are links, followed).
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// The server certificate of a [`tls_acceptor_reloading`]: read again when
/// either file's stamp changes, looked at during a handshake at most every
/// `check_every`. A pair that cannot be read or does not match (a rotation
/// half written) keeps the previous certificate and is tried again at the
/// next check.
#[derive(Debug)]
struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    check_every: Duration,
    state: std::sync::Mutex<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    stamps: (Stamp, Stamp),
    checked: Instant,
}

impl ReloadingCert {
    fn new(cert: &Path, key: &Path, check_every: Duration) -> Result<Self, TlsError> {
        let stamps = (stamp(cert), stamp(key));
        let loaded = load_pair(cert, key)?;
        Ok(Self {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            check_every,
            state: std::sync::Mutex::new(Loaded {
                key: Arc::new(loaded),
                stamps,
                checked: Instant::now(),
            }),
        })
    }
}

fn load_pair(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| TlsError::Read {
            path: p.display().to_string(),
            source,
        })
    };
    let (cert_pem, key_pem) = (read(cert)?, read(key)?);
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Pem("no certificate".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem(e.to_string()))?;
    // Refuses a key that is not the certificate's.
    Ok(CertifiedKey::from_der(certs, key, &provider())?)
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut s = match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        if s.checked.elapsed() >= self.check_every {
            s.checked = Instant::now();
            let stamps = (stamp(&self.cert), stamp(&self.key));
            if stamps != s.stamps {
                match load_pair(&self.cert, &self.key) {
                    Ok(k) => {
                        s.key = Arc::new(k);
                        s.stamps = stamps;
                        tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
                    }
                    Err(e) => {
                        tracing::warn!(
                            "TLS certificate changed but not reloaded (keeping the previous one): {e}"
                        );
                    }
                }
            }
        }
        Some(s.key.clone())
    }
}

/// Serves `router` on `listener` within `limits` until `shutdown` resolves,
/// then lets requests in flight finish (up to the grace period).
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    limits: ServerLimits,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    serve_service(
        listener,
        TowerToHyperService::new(router),
        limits,
        tls,
        shutdown,
    )
    .await
}

/// [`serve`] for any hyper service: a port whose every request goes to one
/// handler (the sidecar's proxy) needs no router, nor the boxed futures
/// and request extensions a router adds to each request.
pub async fn serve_service<S, B>(
    listener: TcpListener,
    service: S,
    limits: ServerLimits,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()>
where
    S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    let mut shutdown = pin!(shutdown);
    loop {
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, _peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off, go on.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        let handshake = limits.tls_handshake_timeout;
        tokio::spawn(async move {
            let _slot = slot;
            match tls {
                None => {
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    let _ = watcher.watch(conn).await;
                }
                Some(acceptor) => {
                    let Ok(Ok(stream)) =
                        tokio::time::timeout(handshake, acceptor.accept(stream)).await
                    else {
                        return;
                    };
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    let _ = watcher.watch(conn).await;
                }
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "requests still in flight after {:?}; closing",
            limits.shutdown_grace
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn start(limits: ServerLimits) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let router = axum::Router::new().route("/", get(|| async { "ok" }));
        tokio::spawn(serve(
            listener,
            router,
            limits,
            None,
            std::future::pending(),
        ));
        addr
    }

    #[tokio::test]
    async fn a_slowloris_and_an_idle_connection_are_closed() {
        let addr = start(ServerLimits {
            header_read_timeout: Duration::from_millis(300),
            ..ServerLimits::default()
        })
        .await;
        // Headers trickled, never finished.
        let mut slow = tokio::net::TcpStream::connect(addr).await.expect("connect");
        slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        let mut buf = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buf))
            .await
            .expect("closed by the server, not by the test's timeout");
        assert!(n.is_ok());
        // One request, then idle: closed too.
        let mut idle = tokio::net::TcpStream::connect(addr).await.expect("connect");
        idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut buf))
            .await
            .expect("the idle connection is closed")
            .expect("read");
        assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"));
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_wait_for_a_slot() {
        let addr = start(ServerLimits {
            max_connections: 1,
            header_read_timeout: Duration::from_secs(60),
            ..ServerLimits::default()
        })
        .await;
        // The hog is first in the listen backlog and takes the only slot.
        let hog = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut first = [0u8; 1];
        assert!(
            tokio::time::timeout(Duration::from_millis(300), s.read(&mut first))
                .await
                .is_err(),
            "not served while the hog holds the slot"
        );
        drop(hog);
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
            .await
            .expect("served once the slot is free")
            .expect("read");
        assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"));
    }
}
