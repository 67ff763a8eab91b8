//! Shared state of the sidecar and the HTTP client to the engine.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::engine::EngineKind;
use crate::metrics::Metrics;

/// Settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Base URL of the engine, e.g. `http://127.0.0.1:8000`.
    pub engine_url: String,
    /// Which engine.
    pub engine: EngineKind,
    /// The engine's health path.
    pub health_path: String,
    /// The engine's metrics path.
    pub metrics_path: String,
    /// The base model's served name.
    pub served_model: String,
    /// File holding the adapter API's bearer token (a mounted Secret).
    pub adapter_token_file: Option<PathBuf>,
    /// Where adapters fetched with their own credentials are put (a
    /// directory the engine shares); None: the engine fetches every source.
    pub adapter_dir: Option<PathBuf>,
    /// The Hugging Face hub's base URL.
    pub hf_endpoint: String,
}

/// Everything handlers share.
pub struct App {
    /// Settings.
    pub config: Config,
    /// HTTP/1 client to the engine (pooled keep-alive connections).
    pub client: Client<HttpConnector, Full<Bytes>>,
    /// Metrics.
    pub metrics: Metrics,
    /// True while the engine answers its health check.
    pub engine_ready: AtomicBool,
    /// Adapters loaded through the adapter API: name to source.
    pub adapters: tokio::sync::RwLock<BTreeMap<String, String>>,
}

/// Errors talking to the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Bad URL.
    #[error("invalid engine request: {0}")]
    Request(#[from] http::Error),
    /// Connection or protocol failure.
    #[error("engine unreachable: {0}")]
    Unreachable(#[from] hyper_util::client::legacy::Error),
    /// Reading the body failed.
    #[error("reading the engine's answer: {0}")]
    Body(#[from] hyper::Error),
    /// No answer in time.
    #[error("the engine did not answer within {0:?}")]
    Timeout(Duration),
}

impl App {
    /// A new App.
    pub fn new(config: Config, metrics: Metrics) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Self {
            config,
            client,
            metrics,
            engine_ready: AtomicBool::new(false),
            adapters: tokio::sync::RwLock::new(BTreeMap::new()),
        }
    }

    /// A small request to the engine with a timeout; returns status and body.
    pub async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Bytes>,
        timeout: Duration,
    ) -> Result<(http::StatusCode, Bytes), EngineError> {
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.config.engine_url));
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(body.unwrap_or_default()))?;
        let exchange = async {
            let resp = self.client.request(req).await?;
            let status = resp.status();
            let bytes = resp.into_body().collect().await?.to_bytes();
            Ok::<_, EngineError>((status, bytes))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| EngineError::Timeout(timeout))?
    }
}
