//! The operator's client of the sidecars' admin ports (adapter API,
//! metrics): HTTPS to `<pod IP>:9090`, the sidecar's certificate verified
//! against the operator's CA with the Model's server name
//! ([`strata_core::template::sidecar_server_name`]), never the IP. Every answer
//! is bounded in size ([`MAX_ANSWER_BYTES`]) and in time (the caller's
//! deadline covers connecting, the handshake, the request and the whole
//! body). One connection per call: calls are rare (a scrape per replica
//! per interval, adapter loads), and nothing is shared between Models.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use crate::pki::Ca;
use strata_core::template::{SIDECAR_ADMIN_PORT, sidecar_server_name};

/// The largest answer read from a sidecar.
pub const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;
/// Deadline of a metrics scrape.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
/// Deadline of an adapter API call (a load may fetch the adapter).
pub const ADAPTER_TIMEOUT: Duration = Duration::from_secs(300);
/// Deadline of the TCP connect (within the call's).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a call to a sidecar failed.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    /// The pod IP is not an IP address.
    #[error("{0:?} is not an IP address")]
    Address(String),
    /// The Model's server name is not a DNS name.
    #[error("{0:?} is not a TLS server name")]
    ServerName(String),
    /// The CA could not be a trust anchor.
    #[error("the CA: {0}")]
    Ca(#[from] crate::pki::PkiError),
    /// rustls refused the client configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// No TCP connection.
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// The sidecar.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The TLS handshake failed: not TLS, or a certificate that is not the
    /// Model's from the operator's CA.
    #[error("TLS with {addr} as {server_name}: {source}")]
    Tls {
        /// The sidecar.
        addr: SocketAddr,
        /// The name its certificate must carry.
        server_name: String,
        /// Cause (a rustls error inside).
        source: std::io::Error,
    },
    /// HTTP failed.
    #[error("{addr}: {source}")]
    Http {
        /// The sidecar.
        addr: SocketAddr,
        /// Cause.
        source: hyper::Error,
    },
    /// The request could not be built.
    #[error("building the request: {0}")]
    Request(#[from] http::Error),
    /// The answer is over [`MAX_ANSWER_BYTES`].
    #[error("{addr}: the answer is larger than {MAX_ANSWER_BYTES} bytes")]
    TooLarge {
        /// The sidecar.
        addr: SocketAddr,
    },
    /// Reading the answer's body failed.
    #[error("{addr}: reading the answer: {reason}")]
    Body {
        /// The sidecar.
        addr: SocketAddr,
        /// Cause.
        reason: String,
    },
    /// The deadline passed.
    #[error("{addr}: no answer within {after:?}")]
    Timeout {
        /// The sidecar.
        addr: SocketAddr,
        /// The deadline.
        after: Duration,
    },
    /// A scrape answered other than 200.
    #[error("{addr}: answered {status}")]
    Status {
        /// The sidecar.
        addr: SocketAddr,
        /// HTTP status.
        status: u16,
    },
}

/// One sidecar: where it listens and the name its certificate must carry.
#[derive(Debug, Clone)]
pub struct Target {
    addr: SocketAddr,
    server_name: ServerName<'static>,
}

impl Target {
    /// The admin port of a Model's replica at `ip`.
    pub fn pod(ip: &str, namespace: &str, model: &str) -> Result<Self, SidecarError> {
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| SidecarError::Address(ip.to_string()))?;
        let port = u16::try_from(SIDECAR_ADMIN_PORT).unwrap_or(9090);
        Self::new(
            SocketAddr::new(ip, port),
            &sidecar_server_name(namespace, model),
        )
    }

    /// Any address with the name its certificate must carry.
    pub fn new(addr: SocketAddr, server_name: &str) -> Result<Self, SidecarError> {
        let server_name = ServerName::try_from(server_name.to_string())
            .ok()
            .filter(|n| matches!(n, ServerName::DnsName(_)))
            .ok_or_else(|| SidecarError::ServerName(server_name.to_string()))?;
        Ok(Self { addr, server_name })
    }

    /// The address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// A sidecar's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// Body (at most [`MAX_ANSWER_BYTES`]).
    pub body: Bytes,
}

/// Calls sidecars, trusting only the operator's CA.
#[derive(Clone)]
pub struct SidecarClient {
    tls: TlsConnector,
}

impl std::fmt::Debug for SidecarClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SidecarClient").finish_non_exhaustive()
    }
}

/// Aborts the connection's task when the call ends (also on a deadline).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl SidecarClient {
    /// A client that trusts `ca` and nothing else.
    pub fn new(ca: &Ca) -> Result<Self, SidecarError> {
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(ca.roots()?)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            tls: TlsConnector::from(Arc::new(config)),
        })
    }

    /// One request: `method path`, with the adapter API token as a bearer
    /// token and a JSON body if given; the status and the body, within
    /// `timeout` and [`MAX_ANSWER_BYTES`].
    pub async fn call(
        &self,
        target: &Target,
        method: http::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Bytes>,
        timeout: Duration,
    ) -> Result<Answer, SidecarError> {
        let addr = target.addr;
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, target_host(target));
        if let Some(token) = token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(body.unwrap_or_default()))?;
        tokio::time::timeout(timeout, self.exchange(target, req))
            .await
            .map_err(|_| SidecarError::Timeout {
                addr,
                after: timeout,
            })?
    }

    /// The sidecar's `/metrics` text (200 only), within [`SCRAPE_TIMEOUT`].
    pub async fn metrics(&self, target: &Target) -> Result<String, SidecarError> {
        let a = self
            .call(
                target,
                http::Method::GET,
                "/metrics",
                None,
                None,
                SCRAPE_TIMEOUT,
            )
            .await?;
        if a.status != 200 {
            return Err(SidecarError::Status {
                addr: target.addr,
                status: a.status,
            });
        }
        Ok(String::from_utf8_lossy(&a.body).into_owned())
    }

    async fn exchange(
        &self,
        target: &Target,
        req: http::Request<Full<Bytes>>,
    ) -> Result<Answer, SidecarError> {
        let addr = target.addr;
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| SidecarError::Connect {
                addr,
                source: std::io::ErrorKind::TimedOut.into(),
            })?
            .map_err(|source| SidecarError::Connect { addr, source })?;
        let _ = tcp.set_nodelay(true);
        let tls = self
            .tls
            .connect(target.server_name.clone(), tcp)
            .await
            .map_err(|source| SidecarError::Tls {
                addr,
                server_name: target_host(target),
                source,
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|source| SidecarError::Http { addr, source })?;
        let _conn = AbortOnDrop(tokio::spawn(async move {
            let _ = conn.await;
        }));
        let resp = sender
            .send_request(req)
            .await
            .map_err(|source| SidecarError::Http { addr, source })?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| {
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    SidecarError::TooLarge { addr }
                } else {
                    SidecarError::Body {
                        addr,
                        reason: e.to_string(),
                    }
                }
            })?
            .to_bytes();
        Ok(Answer { status, body })
    }
}

fn target_host(target: &Target) -> String {
    target.server_name.to_str().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const NAME: &str = "llama.default.sidecar.strata.internal";

    #[derive(Clone, Copy)]
    enum Mode {
        Ok,
        Huge,
        Silent,
    }

    /// A TLS server on loopback with `leaf` that answers every request
    /// according to `mode`; returns its address.
    async fn server(leaf: &crate::pki::Leaf, mode: Mode) -> SocketAddr {
        use rustls::pki_types::pem::PemObject;
        let certs = vec![
            rustls::pki_types::CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes())
                .expect("cert"),
        ];
        let key =
            rustls::pki_types::PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("key");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut s) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&head).to_string();
                    match mode {
                        Mode::Ok => {
                            let body = format!("seen: {}", head.lines().next().unwrap_or_default());
                            let auth = head
                                .lines()
                                .find(|l| l.to_ascii_lowercase().starts_with("authorization:"))
                                .unwrap_or("none")
                                .to_string();
                            let body = format!("{body}\n{auth}");
                            let _ = s
                                .write_all(
                                    format!(
                                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                                        body.len()
                                    )
                                    .as_bytes(),
                                )
                                .await;
                        }
                        Mode::Huge => {
                            let n = MAX_ANSWER_BYTES + 1024;
                            let _ = s
                                .write_all(
                                    format!("HTTP/1.1 200 OK\r\ncontent-length: {n}\r\n\r\n")
                                        .as_bytes(),
                                )
                                .await;
                            let chunk = vec![b'x'; 64 * 1024];
                            let mut left = n;
                            while left > 0 {
                                let k = left.min(chunk.len());
                                if s.write_all(&chunk[..k]).await.is_err() {
                                    return;
                                }
                                left -= k;
                            }
                        }
                        Mode::Silent => std::future::pending::<()>().await,
                    }
                    let _ = s.shutdown().await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn talks_to_a_sidecar_with_the_models_certificate_from_the_ca() {
        let ca = Ca::generate(SystemTime::now()).expect("ca");
        let leaf = ca.issue(NAME, SystemTime::now()).expect("leaf");
        let addr = server(&leaf, Mode::Ok).await;
        let client = SidecarClient::new(&ca).expect("client");
        let a = client
            .call(
                &Target::new(addr, NAME).expect("target"),
                http::Method::POST,
                "/v1/adapters",
                Some("t0ken"),
                Some(Bytes::from_static(b"{}")),
                Duration::from_secs(5),
            )
            .await
            .expect("answer");
        assert_eq!(a.status, 200);
        let body = String::from_utf8_lossy(&a.body);
        assert!(body.contains("POST /v1/adapters HTTP/1.1"), "{body}");
        assert!(body.contains("Bearer t0ken"), "{body}");
        let m = client
            .metrics(&Target::new(addr, NAME).expect("target"))
            .await
            .expect("metrics");
        assert!(m.starts_with("seen: GET /metrics"), "{m}");
    }

    #[tokio::test]
    async fn refuses_another_ca_another_models_name_and_plain_http() {
        let ca = Ca::generate(SystemTime::now()).expect("ca");
        let client = SidecarClient::new(&ca).expect("client");
        // A certificate for the right name from another CA.
        let other = Ca::generate(SystemTime::now()).expect("ca");
        let addr = server(
            &other.issue(NAME, SystemTime::now()).expect("leaf"),
            Mode::Ok,
        )
        .await;
        let err = client
            .metrics(&Target::new(addr, NAME).expect("target"))
            .await
            .expect_err("another CA");
        assert!(matches!(err, SidecarError::Tls { .. }), "{err}");
        // (Both CAs have the operator's subject: the signature gives it away.)
        assert!(
            err.to_string().contains("invalid peer certificate"),
            "{err}"
        );
        // Our CA, another Model's certificate.
        let addr = server(
            &ca.issue("other.default.sidecar.strata.internal", SystemTime::now())
                .expect("leaf"),
            Mode::Ok,
        )
        .await;
        let err = client
            .metrics(&Target::new(addr, NAME).expect("target"))
            .await
            .expect_err("another name");
        assert!(matches!(err, SidecarError::Tls { .. }), "{err}");
        // A plain-HTTP server: no request is sent in the clear.
        let plain = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let paddr = plain.local_addr().expect("addr");
        let seen = tokio::spawn(async move {
            let (mut s, _) = plain.accept().await.expect("accept");
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.unwrap_or(0);
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
            String::from_utf8_lossy(&buf[..n]).to_string()
        });
        let err = client
            .metrics(&Target::new(paddr, NAME).expect("target"))
            .await
            .expect_err("plain HTTP");
        assert!(matches!(err, SidecarError::Tls { .. }), "{err}");
        let first = seen.await.expect("server");
        assert!(
            !first.contains("GET /metrics"),
            "sent in the clear: {first:?}"
        );
    }

    #[tokio::test]
    async fn answers_are_bounded_in_size_and_time() {
        let ca = Ca::generate(SystemTime::now()).expect("ca");
        let leaf = ca.issue(NAME, SystemTime::now()).expect("leaf");
        let client = SidecarClient::new(&ca).expect("client");
        let huge = server(&leaf, Mode::Huge).await;
        let err = client
            .call(
                &Target::new(huge, NAME).expect("target"),
                http::Method::GET,
                "/metrics",
                None,
                None,
                Duration::from_secs(20),
            )
            .await
            .expect_err("too large");
        assert!(matches!(err, SidecarError::TooLarge { .. }), "{err}");
        let silent = server(&leaf, Mode::Silent).await;
        let start = std::time::Instant::now();
        let err = client
            .call(
                &Target::new(silent, NAME).expect("target"),
                http::Method::GET,
                "/metrics",
                None,
                None,
                Duration::from_millis(300),
            )
            .await
            .expect_err("timeout");
        assert!(matches!(err, SidecarError::Timeout { .. }), "{err}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn targets_name_the_model_not_the_ip() {
        let t = Target::pod("10.1.2.3", "default", "llama").expect("target");
        assert_eq!(t.addr(), "10.1.2.3:9090".parse().expect("addr"));
        assert_eq!(target_host(&t), NAME);
        assert!(matches!(
            Target::pod("not-an-ip", "default", "llama"),
            Err(SidecarError::Address(_))
        ));
        assert!(matches!(
            Target::new("127.0.0.1:1".parse().expect("addr"), "127.0.0.1"),
            Err(SidecarError::ServerName(_))
        ));
    }
}
