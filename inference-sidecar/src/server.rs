//! The two listeners: the API port (proxy) and the admin port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{any, delete, get, post};

use crate::app::App;
use crate::{admin, proxy};

/// The API router (port 8080 in a pod).
pub fn api_router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(proxy::forward))
        .route("/v1/completions", post(proxy::forward))
        .route("/v1/embeddings", post(proxy::forward))
        .route("/v1/models", get(proxy::forward))
        .fallback(any(proxy::forward))
        .with_state(app)
}

/// The admin router (port 9090 in a pod).
pub fn admin_router(app: Arc<App>) -> Router {
    Router::new()
        .route("/healthz", get(admin::healthz))
        .route("/readyz", get(admin::readyz))
        .route("/metrics", get(admin::metrics))
        .route("/v1/adapters", get(admin::list).post(admin::load))
        .route("/v1/adapters/{name}", delete(admin::unload))
        .with_state(app)
}

/// Intervals of the background loops.
#[derive(Debug, Clone, Copy)]
pub struct Intervals {
    /// Engine health checks.
    pub health: Duration,
    /// Engine metrics scrapes.
    pub engine_metrics: Duration,
}

/// Serves both ports and runs the background loops until `shutdown`.
pub async fn run(
    app: Arc<App>,
    api: tokio::net::TcpListener,
    admin: tokio::net::TcpListener,
    intervals: Intervals,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let health = tokio::spawn(admin::watch_engine_health(app.clone(), intervals.health));
    let scrape = tokio::spawn(admin::scrape_engine(app.clone(), intervals.engine_metrics));
    let (tx, rx) = tokio::sync::watch::channel(false);
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let api_srv =
        axum::serve(api, api_router(app.clone())).with_graceful_shutdown(wait(rx.clone()));
    let admin_srv = axum::serve(admin, admin_router(app)).with_graceful_shutdown(wait(rx));
    tokio::spawn(async move {
        shutdown.await;
        let _ = tx.send(true);
    });
    let (a, b) = tokio::join!(api_srv.into_future(), admin_srv.into_future());
    health.abort();
    scrape.abort();
    a?;
    b
}

/// Binds an address (for main and tests).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
