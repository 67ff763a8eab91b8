//! Shared state of the sidecar and the HTTP client to the engine.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
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
    /// Bounds of the request path.
    pub limits: Limits,
    /// Certificate and key of the admin port (TLS); None: plain HTTP.
    pub admin_tls: Option<TlsFiles>,
}

/// PEM files of a TLS endpoint.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Certificate chain.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
}

/// A body declared this small or smaller draws on the small-body budget.
pub const SMALL_BODY_BYTES: u64 = 64 * 1024;

/// Bounds of the request path (docs/sidecar.md, "Limits").
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request body.
    pub max_request_bytes: usize,
    /// Memory all request bodies held at once may use (bodies beyond it
    /// are answered 503 with Retry-After). A quarter of it is kept for
    /// small bodies (at most [`SMALL_BODY_BYTES`], by their Content-Length),
    /// so that large bodies, however many, cannot crowd out ordinary
    /// requests.
    pub request_memory_bytes: usize,
    /// Requests in flight at most (beyond: 429 with Retry-After).
    pub max_concurrent_requests: usize,
    /// Time to receive a request body.
    pub request_body_timeout: Duration,
    /// Largest non-streamed engine answer read for its token counts (a
    /// larger one is passed through unmeasured).
    pub max_response_parse_bytes: usize,
    /// Largest server-sent event from the engine.
    pub max_sse_event_bytes: usize,
    /// Time the engine may stay silent: before its answer starts, and
    /// between two pieces of it.
    pub engine_timeout: Duration,
    /// The listeners' bounds (connections, request heads, idle time).
    pub server: strata_net::server::ServerLimits,
    /// Idle connections to the engine kept for the next requests at most.
    pub max_idle_engine_connections: usize,
    /// How long an idle engine connection is kept: below the engine's own
    /// keep-alive timeout, so the sidecar closes it first.
    pub engine_idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request_bytes: 8 * 1024 * 1024,
            request_memory_bytes: 24 * 1024 * 1024,
            max_concurrent_requests: 1024,
            request_body_timeout: Duration::from_secs(30),
            max_response_parse_bytes: 1024 * 1024,
            max_sse_event_bytes: crate::sse::DEFAULT_MAX_EVENT_BYTES,
            engine_timeout: Duration::from_secs(600),
            server: strata_net::server::ServerLimits {
                max_connections: 2048,
                ..strata_net::server::ServerLimits::default()
            },
            max_idle_engine_connections: 1024,
            engine_idle_timeout: crate::upstream::DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// Everything handlers share.
pub struct App {
    /// Settings.
    pub config: Config,
    /// HTTP/1 client to the engine (pooled keep-alive connections) for the
    /// sidecar's own calls (health, metrics, adapters).
    pub client: Client<HttpConnector, Full<Bytes>>,
    /// The proxy's connections to the engine (crate::upstream).
    pub engine: Arc<crate::upstream::Pool>,
    /// Metrics.
    pub metrics: Metrics,
    /// True while the engine answers its health check.
    pub engine_ready: AtomicBool,
    /// Adapters loaded through the adapter API: name to source.
    pub adapters: tokio::sync::RwLock<BTreeMap<String, String>>,
    /// Where the engine loaded each adapter from (its `lora_path`), to load
    /// it again after an engine restart.
    pub adapter_paths: std::sync::Mutex<BTreeMap<String, String>>,
    /// Reloads after engine restarts, by adapter: how many, and when the
    /// last one was (Unix seconds). Listed by `GET /v1/adapters`, so the
    /// operator can show them on the Adapter.
    pub adapter_reloads: std::sync::Mutex<BTreeMap<String, (u32, u64)>>,
    /// Slots of requests in flight.
    pub slots: Arc<tokio::sync::Semaphore>,
    /// Memory of large (or undeclared) request bodies and of answers read
    /// for their counts.
    pub budget: strata_net::body::ByteBudget,
    /// Memory of small request bodies.
    pub small_budget: strata_net::body::ByteBudget,
}

/// Largest answer of the engine's own endpoints the sidecar reads (health,
/// metrics, adapter calls).
pub const MAX_CALL_ANSWER_BYTES: usize = 4 * 1024 * 1024;

/// Errors talking to the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Bad URL.
    #[error("invalid engine request: {0}")]
    Request(#[from] http::Error),
    /// Connection or protocol failure.
    #[error("engine unreachable: {0}")]
    Unreachable(#[from] hyper_util::client::legacy::Error),
    /// Reading the answer failed, or it was larger than
    /// [`MAX_CALL_ANSWER_BYTES`].
    #[error("reading the engine's answer: {0}")]
    Answer(String),
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
            .pool_idle_timeout(config.limits.engine_idle_timeout)
            .pool_max_idle_per_host(4)
            .build(connector);
        let engine = Arc::new(crate::upstream::Pool::new(
            &config.engine_url,
            crate::upstream::PoolLimits {
                max_idle: config.limits.max_idle_engine_connections,
                idle_timeout: config.limits.engine_idle_timeout,
                ..crate::upstream::PoolLimits::default()
            },
        ));
        Self {
            client,
            engine,
            metrics,
            engine_ready: AtomicBool::new(false),
            adapters: tokio::sync::RwLock::new(BTreeMap::new()),
            adapter_paths: std::sync::Mutex::new(BTreeMap::new()),
            adapter_reloads: std::sync::Mutex::new(BTreeMap::new()),
            slots: Arc::new(tokio::sync::Semaphore::new(
                config.limits.max_concurrent_requests.max(1),
            )),
            budget: strata_net::body::ByteBudget::new(
                config.limits.request_memory_bytes - config.limits.request_memory_bytes / 4,
            ),
            small_budget: strata_net::body::ByteBudget::new(config.limits.request_memory_bytes / 4),
            config,
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
            let bytes = http_body_util::Limited::new(resp.into_body(), MAX_CALL_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| EngineError::Answer(e.to_string()))?
                .to_bytes();
            Ok::<_, EngineError>((status, bytes))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| EngineError::Timeout(timeout))?
    }
}
