//! The admin port over TLS, as model pods run it (the operator's CA signs a
//! certificate for the Model's server name, mounted from the Model's
//! Secret): /metrics answers a client that trusts the CA and checks that
//! name; a plain-HTTP request gets no HTTP answer; a client that trusts
//! another CA is refused; a rotated certificate is served without a
//! restart. Loopback only.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use strata_sidecar::app::{App, Config, TlsFiles};
use strata_sidecar::engine::EngineKind;
use strata_sidecar::metrics::Metrics;
use strata_sidecar::server::{self, Intervals};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the operator puts in a Model's certificate (template::sidecar_server_name).
const NAME: &str = "llama.default.sidecar.strata.internal";

/// A CA as the operator makes one (ECDSA P-256).
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn new_ca() -> Ca {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "test sidecar CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key).expect("ca cert");
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

/// A leaf for `name` signed by `ca`: (certificate PEM, key PEM).
fn leaf(ca: &Ca, name: &str) -> (String, String) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::DnsName(name.try_into().expect("dns name"))];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &ca.issuer).expect("leaf");
    (cert.pem(), key.serialize_pem())
}

/// Writes the pair as the mounted Secret's files, with a new modification time.
fn write_pair(dir: &Path, (cert, key): &(String, String), bump: u64) {
    for (file, pem) in [("tls.crt", cert), ("tls.key", key)] {
        let path = dir.join(file);
        std::fs::write(&path, pem).expect("write");
        std::fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(SystemTime::now() + Duration::from_secs(bump)))
            .expect("mtime");
    }
}

type TlsClient = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Empty<Bytes>,
>;

/// A client that trusts only `ca_pem` and expects the sidecar to be `name`.
fn client(ca_pem: &str, name: &str) -> TlsClient {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).expect("ca pem"))
        .expect("root");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(
            rustls::pki_types::ServerName::try_from(name.to_string()).expect("name"),
        ))
        .enable_http1()
        .build();
    Client::builder(TokioExecutor::new()).build(connector)
}

async fn get(client: &TlsClient, addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let uri: http::Uri = format!("https://{addr}{path}").parse().expect("uri");
    let resp = tokio::time::timeout(Duration::from_secs(10), client.get(uri))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| format!("{e:?}"))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// A sidecar whose admin port serves TLS from files in `dir`; its admin
/// address. (The engine is absent: /metrics answers all the same.)
async fn sidecar(dir: &Path) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let app = Arc::new(App::new(
        Config {
            engine_url: "http://127.0.0.1:9".into(),
            engine: EngineKind::Vllm,
            health_path: "/health".into(),
            metrics_path: "/metrics".into(),
            served_model: "llama".into(),
            adapter_token_file: None,
            adapter_dir: None,
            hf_endpoint: "http://127.0.0.1:9".into(),
            limits: Default::default(),
            admin_tls: Some(TlsFiles {
                cert: dir.join("tls.crt"),
                key: dir.join("tls.key"),
            }),
        },
        Metrics::new().expect("metrics"),
    ));
    let api = server::bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    let admin = server::bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    let addr = admin.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let intervals = Intervals {
        health: Duration::from_millis(100),
        engine_metrics: Duration::from_millis(100),
        adapters: Duration::from_millis(200),
    };
    tokio::spawn(server::run(app, api, admin, intervals, async move {
        let _ = rx.await;
    }));
    (addr, tx)
}

#[tokio::test]
async fn the_admin_port_answers_only_over_tls_with_the_models_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = new_ca();
    write_pair(dir.path(), &leaf(&ca, NAME), 0);
    let (addr, _stop) = sidecar(dir.path()).await;

    // A client that trusts the CA and checks the Model's name.
    let trusted = client(&ca.pem, NAME);
    let (status, body) = get(&trusted, addr, "/metrics").await.expect("metrics");
    assert_eq!(status, 200);
    assert!(body.contains("strata_engine_up"), "{body}");
    assert_eq!(
        get(&trusted, addr, "/healthz").await.expect("healthz").0,
        200
    );

    // Plain HTTP to the admin port: no HTTP answer.
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("the sidecar closes the connection");
    assert!(
        !String::from_utf8_lossy(&buf).contains("HTTP/1."),
        "an HTTP answer in the clear: {:?}",
        String::from_utf8_lossy(&buf)
    );

    // A client that trusts another CA, or expects another Model: refused.
    let other = new_ca();
    let err = get(&client(&other.pem, NAME), addr, "/metrics")
        .await
        .expect_err("another CA");
    // (Both test CAs have the same subject: the signature gives it away.)
    assert!(
        err.contains("UnknownIssuer") || err.contains("BadSignature"),
        "{err}"
    );
    let err = get(
        &client(&ca.pem, "other.default.sidecar.strata.internal"),
        addr,
        "/metrics",
    )
    .await
    .expect_err("another name");
    assert!(err.contains("NotValidForName"), "{err}");
}

#[tokio::test]
async fn a_rotated_certificate_is_served_without_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let (old_ca, new_ca) = (new_ca(), new_ca());
    write_pair(dir.path(), &leaf(&old_ca, NAME), 0);
    // The sidecar checks its files every 30 s; here at every handshake.
    let acceptor =
        strata_net::server::tls_acceptor_reloading(&cert, &key, Duration::ZERO).expect("acceptor");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let router = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
    tokio::spawn(strata_net::server::serve(
        listener,
        router,
        strata_net::server::ServerLimits::default(),
        Some(acceptor),
        std::future::pending(),
    ));
    // New clients each time: no connection is reused across a rotation.
    let (old, new) = (|| client(&old_ca.pem, NAME), || client(&new_ca.pem, NAME));
    assert_eq!(get(&old(), addr, "/").await.expect("old CA").0, 200);
    assert!(get(&new(), addr, "/").await.is_err());

    // Half a rotation (a certificate without its key): the previous pair stays.
    let (new_cert, new_key) = leaf(&new_ca, NAME);
    std::fs::write(&cert, &new_cert).expect("write");
    std::fs::File::options()
        .write(true)
        .open(&cert)
        .and_then(|f| f.set_modified(SystemTime::now() + Duration::from_secs(5)))
        .expect("mtime");
    assert_eq!(
        get(&old(), addr, "/").await.expect("still the old pair").0,
        200
    );

    // The whole rotation: the new certificate from the next handshake.
    write_pair(dir.path(), &(new_cert, new_key), 10);
    assert_eq!(get(&new(), addr, "/").await.expect("new CA").0, 200);
    assert!(get(&old(), addr, "/").await.is_err());

    // A bad file at start is an error, not a server without a certificate.
    std::fs::write(&cert, "garbage").expect("write");
    assert!(strata_net::server::tls_acceptor_reloading(&cert, &key, Duration::ZERO).is_err());
}
