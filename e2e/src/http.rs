//! A minimal HTTP/1.1 GET over a plain TCP socket or over TLS, for health
//! checks and tests. Refuses anything outside 127.0.0.0/8: the local world
//! only ever talks to loopback. Over TLS ([`get_https`]) it verifies no
//! certificate, as the kubelet's HTTPS probes do not: for probes and
//! diagnostics only.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// A response: status code and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// Body as text.
    pub body: String,
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The address is not loopback.
    #[error("refusing to connect to {0}: only 127.0.0.0/8 is allowed")]
    NotLoopback(SocketAddr),
    /// Network error.
    #[error("{addr}: {source}")]
    Io {
        /// Target.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// No answer in time.
    #[error("{0}: timed out")]
    Timeout(SocketAddr),
    /// Not an HTTP response.
    #[error("{0}: malformed response")]
    Malformed(SocketAddr),
    /// The TLS handshake failed (not TLS, or no common parameters).
    #[error("{addr}: TLS: {source}")]
    Tls {
        /// Target.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
}

/// True for 127.0.0.0/8.
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.octets()[0] == 127,
        IpAddr::V6(v6) => v6.is_loopback(),
    }
}

/// True for a textual address in 127.0.0.0/8.
pub fn is_loopback_str(ip: &str) -> bool {
    ip.parse::<IpAddr>().is_ok_and(is_loopback)
}

/// GET `path` from `addr` (loopback only), with a timeout for the whole exchange.
pub async fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Response, HttpError> {
    if !is_loopback(addr.ip()) {
        return Err(HttpError::NotLoopback(addr));
    }
    let exchange = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| HttpError::Io { addr, source })?;
        request(stream, addr, path).await
    };
    match tokio::time::timeout(timeout, exchange).await {
        Err(_) => Err(HttpError::Timeout(addr)),
        Ok(r) => r,
    }
}

/// GET `path` from `addr` (loopback only) over TLS, accepting any server
/// certificate as the kubelet's HTTPS probes do (the handshake itself is
/// still checked), with a timeout for the whole exchange.
pub async fn get_https(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<Response, HttpError> {
    if !is_loopback(addr.ip()) {
        return Err(HttpError::NotLoopback(addr));
    }
    let exchange = async {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| HttpError::Tls {
                addr,
                source: std::io::Error::other(e),
            })?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth();
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| HttpError::Io { addr, source })?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await
            .map_err(|source| HttpError::Tls { addr, source })?;
        request(tls, addr, path).await
    };
    match tokio::time::timeout(timeout, exchange).await {
        Err(_) => Err(HttpError::Timeout(addr)),
        Ok(r) => r,
    }
}

/// One request on an open stream, read until the server closes it.
async fn request<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    addr: SocketAddr,
    path: &str,
) -> Result<Response, HttpError> {
    let io = async {
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        match stream.read_to_end(&mut buf).await {
            Ok(_) => {}
            // A TLS peer that closes without close_notify (after a complete
            // answer): what was read counts.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !buf.is_empty() => {}
            Err(e) => return Err(e),
        }
        Ok::<_, std::io::Error>(buf)
    };
    let buf = io.await.map_err(|source| HttpError::Io { addr, source })?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or(HttpError::Malformed(addr))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or(HttpError::Malformed(addr))?;
    Ok(Response {
        status,
        body: body.to_string(),
    })
}

/// Accepts any server certificate (what the kubelet's HTTPS probes do),
/// but still checks the handshake's signatures with the provider's
/// algorithms.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[tokio::test]
    async fn refuses_private_addresses() {
        for addr in ["10.96.0.1:443", "192.168.1.1:80", "172.16.0.1:80"] {
            let addr: SocketAddr = addr.parse().expect("addr");
            let err = get(addr, "/", Duration::from_millis(10))
                .await
                .expect_err("refused");
            assert!(matches!(err, HttpError::NotLoopback(_)), "{err}");
            let err = get_https(addr, "/", Duration::from_millis(10))
                .await
                .expect_err("refused");
            assert!(matches!(err, HttpError::NotLoopback(_)), "{err}");
        }
    }

    /// A TLS server on loopback with a self-signed certificate (no client
    /// could verify it) answering every request 200 "ok".
    pub(crate) async fn tls_server() -> SocketAddr {
        use rustls::pki_types::PrivateKeyDer;
        let cert =
            rcgen::generate_simple_self_signed(vec!["whatever.invalid".to_string()]).expect("cert");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.cert.der().clone()],
            PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into()),
        )
        .expect("config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    continue;
                };
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    )
                    .await;
                let _ = s.shutdown().await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn https_accepts_any_certificate_and_plain_http_does_not_speak_tls() {
        let addr = tls_server().await;
        let r = get_https(addr, "/readyz", Duration::from_secs(5))
            .await
            .expect("answer over TLS");
        assert_eq!((r.status, r.body.as_str()), (200, "ok"));
        // A plain-HTTP GET to a TLS port gets no HTTP answer.
        assert!(get(addr, "/readyz", Duration::from_secs(5)).await.is_err());
    }
}
