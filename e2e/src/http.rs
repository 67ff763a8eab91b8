//! A minimal HTTP/1.1 GET over a plain TCP socket, for health checks and
//! tests. Refuses anything outside 127.0.0.0/8: the local world only ever
//! talks to loopback.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
        let mut stream = TcpStream::connect(addr).await?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = match tokio::time::timeout(timeout, exchange).await {
        Err(_) => return Err(HttpError::Timeout(addr)),
        Ok(Err(source)) => return Err(HttpError::Io { addr, source }),
        Ok(Ok(buf)) => buf,
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refuses_private_addresses() {
        for addr in ["10.96.0.1:443", "192.168.1.1:80", "172.16.0.1:80"] {
            let addr: SocketAddr = addr.parse().expect("addr");
            let err = get(addr, "/", Duration::from_millis(10))
                .await
                .expect_err("refused");
            assert!(matches!(err, HttpError::NotLoopback(_)), "{err}");
        }
    }
}
