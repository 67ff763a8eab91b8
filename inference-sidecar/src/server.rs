//! The two listeners: the API port (the allowlisted proxy) and the admin
//! port (probes, metrics, the token-guarded adapter API; TLS when the pod
//! has a certificate). Both are bounded servers (strata_net::server).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{delete, get};

use crate::app::App;
use crate::{admin, proxy};

/// The API port's service (port 8080 in a pod): every request goes to the
/// proxy, which routes by the allowlist itself, so no router runs (nor the
/// boxed futures and request extensions it would add to each request).
pub fn api_service(
    app: Arc<App>,
) -> impl hyper::service::Service<
    http::Request<hyper::body::Incoming>,
    Response = axum::response::Response,
    Error = Infallible,
    Future = impl std::future::Future<Output = Result<axum::response::Response, Infallible>>
             + Send
             + 'static,
> + Clone
+ Send
+ 'static {
    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let app = app.clone();
        async move { Ok(proxy::entry(app, req.map(axum::body::Body::new)).await) }
    })
}

/// The admin router (port 9090 in a pod).
pub fn admin_router(app: Arc<App>) -> Router {
    Router::new()
        .route("/healthz", get(admin::healthz))
        .route("/readyz", get(admin::readyz))
        .route("/metrics", get(admin::metrics))
        .route("/v1/adapters", get(admin::list).post(admin::load))
        .route("/v1/adapters/{name}", delete(admin::unload))
        .layer(axum::extract::DefaultBodyLimit::max(
            admin::MAX_ADMIN_BODY_BYTES,
        ))
        .with_state(app)
}

/// Intervals of the background loops.
#[derive(Debug, Clone, Copy)]
pub struct Intervals {
    /// Engine health checks.
    pub health: Duration,
    /// Engine metrics scrapes.
    pub engine_metrics: Duration,
    /// Checks that the engine still has the adapters loaded through the
    /// adapter API.
    pub adapters: Duration,
}

/// Why the sidecar cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The admin port's certificate.
    #[error("admin TLS: {0}")]
    Tls(#[from] strata_net::server::TlsError),
    /// A listener failed.
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
}

/// Serves both ports and runs the background loops until `shutdown`.
pub async fn run(
    app: Arc<App>,
    api: tokio::net::TcpListener,
    admin: tokio::net::TcpListener,
    intervals: Intervals,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let tls = match &app.config.admin_tls {
        Some(files) => Some(strata_net::server::tls_acceptor_from_files(
            &files.cert.display().to_string(),
            &files.key.display().to_string(),
        )?),
        None => None,
    };
    let health = tokio::spawn(admin::watch_engine_health(app.clone(), intervals.health));
    let scrape = tokio::spawn(admin::scrape_engine(app.clone(), intervals.engine_metrics));
    let keep = tokio::spawn(admin::keep_adapters(app.clone(), intervals.adapters));
    let sweep = tokio::spawn(app.engine.clone().sweep());
    let (tx, rx) = tokio::sync::watch::channel(false);
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let limits = app.config.limits.server;
    let api_srv = strata_net::server::serve_service(
        api,
        api_service(app.clone()),
        limits,
        None,
        wait(rx.clone()),
    );
    let admin_srv = strata_net::server::serve(
        admin,
        admin_router(app),
        strata_net::server::ServerLimits {
            max_connections: 64,
            ..limits
        },
        tls,
        wait(rx),
    );
    tokio::spawn(async move {
        shutdown.await;
        let _ = tx.send(true);
    });
    let (a, b) = tokio::join!(api_srv, admin_srv);
    health.abort();
    scrape.abort();
    keep.abort();
    sweep.abort();
    a?;
    b?;
    Ok(())
}

/// Binds an address (for main and tests).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
