//! The front door: one OpenAI-compatible endpoint for every Model
//! (`POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings`
//! routed by the body's `model`; `GET /v1/models` answered here) and the
//! activator's per-Model path (`/models/<namespace>/<model>/v1/...`).
//!
//! Per request: the path through the allowlist (strata_net::openai), the
//! body read within its bounds (strata_net::body), `model` resolved
//! ([`crate::table::resolve`]), the replica picked by
//! [`strata_core::routing::pick`] (adapter carriers only; bounded-load
//! consistent hashing of the prompt's first characters; else the least
//! loaded by this gateway's in-flight counts), the request forwarded with
//! hop-by-hop headers stripped and the answer streamed back untouched.
//! Connection failures, and 502/503 from a replica that is going away, are
//! tried on up to `retries` other replicas: only before anything reached
//! the client, which the buffered request body makes possible. A Model
//! without a ready replica that may scale from zero is woken (the
//! activator's annotation) while the request waits, bounded per Model and
//! in total.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::future::BoxFuture;
use http_body::{Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prometheus::{Histogram, IntGauge};
use serde_json::{Value, json};
use strata_core::routing::{self, Ask, Refusal};
use strata_net::body::{BodyError, BodyLimits, ByteBudget};
use strata_net::load::ReplicaLoad;
use strata_net::openai::{self, Endpoint, Route};
use strata_net::server::ServerLimits;
use strata_operator::activator::{WAKE_EVERY, Waiting, split_path};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use crate::metrics::Metrics;
use crate::retry::{self, Outcome};
use crate::signals::Reported;
use crate::table::{self, ResolveError, Routes, Snapshot};

/// How long one wake request (a PATCH) may take.
const WAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Asks for a replica of `(namespace, name)`.
pub type WakeFn =
    Arc<dyn Fn(String, String) -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// The gateway's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Characters of the prompt hashed for prefix affinity (0: none).
    pub prefix_chars: usize,
    /// The pick's settings.
    pub routing: routing::Settings,
    /// Other replicas tried after a connection failure (or a 502/503 from
    /// a replica going away).
    pub retries: usize,
    /// How long a request may wait for a replica (and for the first view).
    pub wait_timeout: Duration,
    /// Requests waiting for one Model at most.
    pub max_waiting_per_model: usize,
    /// Requests waiting in all at most.
    pub max_waiting: usize,
    /// Bounds of a request body.
    pub body: BodyLimits,
    /// Memory all request bodies held at once may take.
    pub body_budget: usize,
    /// Time to connect to a replica.
    pub connect_timeout: Duration,
    /// Time for a replica's answer to begin (its head).
    pub upstream_timeout: Duration,
    /// Time an answer's body may go without a byte.
    pub idle_timeout: Duration,
    /// The listener's bounds.
    pub server: ServerLimits,
    /// How long a replica's reported load ([`crate::signals`]) is used.
    pub signal_ttl: Duration,
    /// How long a 502 (or a 503 without `Retry-After`) from a replica
    /// still in the view waits for the view to drop it (its pod deleted:
    /// the node stops the engine about when the watch tells this gateway);
    /// if it does, the request is tried on another ([`retry::settle`]).
    pub settle: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            prefix_chars: 256,
            routing: routing::Settings::default(),
            retries: 2,
            wait_timeout: Duration::from_secs(600),
            max_waiting_per_model: 1000,
            max_waiting: 4000,
            body: BodyLimits {
                max_bytes: 8 * 1024 * 1024,
                timeout: Duration::from_secs(30),
            },
            body_budget: 256 * 1024 * 1024,
            connect_timeout: Duration::from_secs(5),
            upstream_timeout: Duration::from_secs(600),
            idle_timeout: Duration::from_secs(300),
            signal_ttl: Duration::from_secs(3),
            settle: Duration::from_secs(1),
            server: ServerLimits {
                max_connections: 8192,
                ..ServerLimits::default()
            },
        }
    }
}

/// Why a request was not forwarded (or its forwarding failed).
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// Not part of the inference API.
    #[error("{0:?} is not part of the inference API")]
    NotFound(String),
    /// A known path with another method.
    #[error("{path} takes {method}")]
    Method {
        /// The path.
        path: String,
        /// The method it takes.
        method: Method,
    },
    /// The view of the cluster has not arrived yet.
    #[error("the gateway's view of the cluster is not ready")]
    NotSynced,
    /// The body was refused.
    #[error(transparent)]
    Body(#[from] BodyError),
    /// The body is not a JSON object.
    #[error("the body is not JSON: {0}")]
    BadJson(String),
    /// The body names no model.
    #[error("the body has no \"model\": say which Model (or adapter) the request is for")]
    NoModel,
    /// `model` names nothing (or several Models).
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    /// The per-Model path names no Model.
    #[error("no Model {0}")]
    UnknownModel(String),
    /// The Model has no ready replica and does not scale from zero.
    #[error("no replica of {0} is ready")]
    NoReplica(String),
    /// No ready replica carries the adapter (yet).
    #[error("no ready replica of {model} carries the adapter {adapter:?} yet")]
    NoAdapter {
        /// `namespace/name`.
        model: String,
        /// The adapter's served name.
        adapter: String,
    },
    /// Too many requests wait.
    #[error("too many requests are waiting for {0}; retry shortly")]
    Full(String),
    /// No replica became ready in time.
    #[error("no replica of {model} became ready within {secs}s")]
    WaitTimeout {
        /// `namespace/name`.
        model: String,
        /// The wait.
        secs: u64,
    },
    /// The gateway is stopping.
    #[error("the gateway is shutting down")]
    ShuttingDown,
    /// Forwarding failed.
    #[error("forwarding to replica {replica}: {error}")]
    Upstream {
        /// The replica.
        replica: String,
        /// What happened.
        error: String,
    },
    /// The replica's answer did not begin in time.
    #[error("replica {0} did not answer in time")]
    UpstreamTimeout(String),
}

impl GatewayError {
    /// The status code the client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NotFound(_) | Self::UnknownModel(_) => StatusCode::NOT_FOUND,
            Self::Resolve(ResolveError::Unknown(_)) => StatusCode::NOT_FOUND,
            Self::Resolve(ResolveError::Ambiguous { .. }) => StatusCode::BAD_REQUEST,
            Self::Method { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::Body(BodyError::TooLarge { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Body(BodyError::Timeout(_)) => StatusCode::REQUEST_TIMEOUT,
            Self::Body(BodyError::Busy) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Body(BodyError::Read(_)) | Self::BadJson(_) | Self::NoModel => {
                StatusCode::BAD_REQUEST
            }
            Self::NotSynced
            | Self::NoReplica(_)
            | Self::NoAdapter { .. }
            | Self::Full(_)
            | Self::WaitTimeout { .. }
            | Self::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Self::Upstream { .. } => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The `reason` label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotFound(_) => "not_found",
            Self::Method { .. } => "method",
            Self::NotSynced => "not_synced",
            Self::Body(e) => e.label(),
            Self::BadJson(_) => "bad_json",
            Self::NoModel => "no_model",
            Self::Resolve(ResolveError::Unknown(_)) | Self::UnknownModel(_) => "unknown_model",
            Self::Resolve(ResolveError::Ambiguous { .. }) => "ambiguous",
            Self::NoReplica(_) => "no_replica",
            Self::NoAdapter { .. } => "no_adapter",
            Self::Full(_) => "full",
            Self::WaitTimeout { .. } => "timeout",
            Self::ShuttingDown => "shutting_down",
            Self::Upstream { .. } => "upstream",
            Self::UpstreamTimeout(_) => "upstream_timeout",
        }
    }

    /// The OpenAI-shaped answer (with Retry-After where retrying helps).
    fn response(&self) -> Response {
        let status = self.status();
        let body = match self {
            Self::NotFound(path) => openai::not_found_body(path),
            e => openai::error_body(status, "gateway_error", &e.to_string()),
        };
        let mut r = (status, axum::Json(body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        r
    }
}

/// A refusal with the Model it concerns (`namespace/name`, or empty).
type Refused = (String, GatewayError);

/// Shared by every request.
pub struct Gateway {
    routes: watch::Receiver<Arc<Routes>>,
    http: HttpClient<HttpConnector, Full<Bytes>>,
    settings: Settings,
    metrics: Metrics,
    budget: ByteBudget,
    /// Requests this gateway has in flight, per `namespace/pod`.
    in_flight: Arc<Mutex<HashMap<String, Arc<AtomicU32>>>>,
    /// The replicas' last reports, per `namespace/pod`, and when.
    reports: Arc<Mutex<HashMap<String, (Reported, Instant)>>>,
    waiting: Mutex<Waiting>,
    /// When this process last asked for a replica of a Model.
    woken: Mutex<HashMap<String, Instant>>,
    wake: WakeFn,
    ticks: AtomicU64,
    /// The prefixes routed recently (a prefix seen before may be cached
    /// on its replica: see [`routing::Ask::recurring`]).
    recent: routing::Recent,
}

/// Prefixes [`Gateway`] remembers (8 bytes each: 512 KiB).
const RECENT_PREFIXES: usize = 65_536;

impl Gateway {
    /// A gateway routing by the views `snapshots` sends (the cluster's
    /// watches, or a test's table); `wake` asks for a replica.
    pub fn new(
        mut snapshots: watch::Receiver<Arc<Snapshot>>,
        wake: WakeFn,
        settings: Settings,
        metrics: Metrics,
    ) -> Arc<Self> {
        let (tx, routes) = watch::channel(Arc::new(Routes::default()));
        let in_flight: Arc<Mutex<HashMap<String, Arc<AtomicU32>>>> = Arc::default();
        let points = settings.routing.virtual_points;
        let counts = in_flight.clone();
        let reports: Arc<Mutex<HashMap<String, (Reported, Instant)>>> = Arc::default();
        let reported = reports.clone();
        tokio::spawn(async move {
            loop {
                let snapshot = (**snapshots.borrow_and_update()).clone();
                let prev = tx.borrow().clone();
                let next = Routes::build(snapshot, Some(&prev), points);
                // Forget the counts of replicas that are gone and idle.
                if let Ok(mut c) = counts.lock() {
                    let live: std::collections::HashSet<String> = next
                        .snapshot
                        .models
                        .iter()
                        .flat_map(|m| {
                            m.replicas
                                .iter()
                                .map(|r| format!("{}/{}", m.namespace, r.name))
                        })
                        .collect();
                    c.retain(|k, n| live.contains(k) || n.load(Ordering::Relaxed) > 0);
                    if let Ok(mut r) = reported.lock() {
                        r.retain(|k, _| c.contains_key(k));
                    }
                }
                if tx.send(Arc::new(next)).is_err() || snapshots.changed().await.is_err() {
                    return;
                }
            }
        });
        let mut c = HttpConnector::new();
        c.set_connect_timeout(Some(settings.connect_timeout));
        c.set_nodelay(true);
        Arc::new(Self {
            routes,
            http: HttpClient::builder(TokioExecutor::new())
                .pool_idle_timeout(strata_net::server::CLIENT_IDLE_TIMEOUT)
                .build(c),
            budget: ByteBudget::new(settings.body_budget),
            settings,
            metrics,
            in_flight,
            reports,
            waiting: Mutex::new(Waiting::default()),
            woken: Mutex::new(HashMap::new()),
            wake,
            ticks: AtomicU64::new(0),
            recent: routing::Recent::new(RECENT_PREFIXES),
        })
    }

    /// Whether the first view of the cluster has arrived.
    pub fn synced(&self) -> bool {
        self.routes.borrow().snapshot.synced
    }

    fn refuse(&self, model: &str, start: Instant, e: &GatewayError) -> Response {
        let status = e.status();
        self.metrics
            .requests
            .with_label_values(&[model, e.reason(), status.as_str()])
            .inc();
        self.metrics
            .duration
            .with_label_values(&[model])
            .observe(start.elapsed().as_secs_f64());
        if status.is_server_error() {
            tracing::warn!(model, reason = e.reason(), "{e}");
        } else {
            tracing::debug!(model, reason = e.reason(), "{e}");
        }
        e.response()
    }

    /// The current routes once the first view has arrived.
    async fn synced_routes(&self) -> Result<Arc<Routes>, GatewayError> {
        let mut rx = self.routes.clone();
        let ready = tokio::time::timeout(
            self.settings.wait_timeout,
            rx.wait_for(|r| r.snapshot.synced),
        )
        .await;
        match ready {
            Ok(Ok(r)) => Ok(r.clone()),
            Ok(Err(_)) => Err(GatewayError::ShuttingDown),
            Err(_) => Err(GatewayError::NotSynced),
        }
    }

    async fn serve(self: &Arc<Self>, req: Request, start: Instant) -> Result<Response, Refused> {
        let none = |e: GatewayError| (String::new(), e);
        let path = req.uri().path().to_string();
        let (fixed, rest) = match split_path(&path) {
            Some((ns, name, rest)) => (Some(format!("{ns}/{name}")), rest),
            None => (None, path.clone()),
        };
        let (endpoint, upstream) = match openai::route(req.method(), &rest, req.uri().query()) {
            Route::Forward { endpoint, upstream } => (endpoint, upstream),
            Route::MethodNotAllowed { endpoint } => {
                return Err(none(GatewayError::Method {
                    path: rest,
                    method: endpoint.method(),
                }));
            }
            Route::NotFound => return Err(none(GatewayError::NotFound(rest))),
        };
        let routes = self.synced_routes().await.map_err(none)?;
        if fixed.is_none() && !endpoint.has_body() {
            return Ok(self.list(&routes, endpoint, &upstream, start));
        }
        let (mut parts, body) = req.into_parts();
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        // The body is held until the answer's head arrives (a retry sends
        // it again), drawn from the shared budget.
        let (bytes, _held, json) = if endpoint.has_body() {
            let (bytes, held) =
                strata_net::body::read(body, declared, self.settings.body, Some(&self.budget))
                    .await
                    .map_err(|e| none(e.into()))?;
            let json: Value = serde_json::from_slice(&bytes)
                .map_err(|e| none(GatewayError::BadJson(e.to_string())))?;
            (bytes, held, Some(json))
        } else {
            (Bytes::new(), strata_net::body::Held::default(), None)
        };
        let asked = json
            .as_ref()
            .and_then(|v| v.get("model"))
            .and_then(Value::as_str);
        let (key, adapter) = match fixed {
            Some(key) => {
                let Some(i) = routes.find(&key) else {
                    return Err((String::new(), GatewayError::UnknownModel(key)));
                };
                let adapter = table::adapter_of(&routes.snapshot.models[i], asked);
                (key, adapter)
            }
            None => {
                let name = asked.ok_or_else(|| none(GatewayError::NoModel))?;
                let t = table::resolve(&routes.snapshot, name).map_err(|e| none(e.into()))?;
                (routes.snapshot.models[t.model].key(), t.adapter)
            }
        };
        let chars = self.settings.prefix_chars;
        let prefix = json.as_ref().and_then(|v| {
            let scope = format!("{key}\0{}", adapter.as_deref().unwrap_or(""));
            routing::prefix_key(&scope, &routing::prompt_text(v, chars), chars)
        });
        strata_net::headers::strip_hop_by_hop(&mut parts.headers);
        let ask = Asked {
            key,
            adapter,
            prefix,
            recurring: prefix.is_some_and(|k| self.recent.seen(k)),
            method: parts.method,
            headers: parts.headers,
            upstream,
            body: bytes,
        };
        self.forward(&ask, start)
            .await
            .map_err(|e| (ask.key.clone(), e))
    }

    /// `GET /v1/models` and `/v1/models/<id>` of the shared endpoint: what
    /// the gateway routes to (each Model's served name and its adapters'),
    /// answered here.
    fn list(
        &self,
        routes: &Routes,
        endpoint: Endpoint,
        upstream: &str,
        start: Instant,
    ) -> Response {
        let mut data = Vec::new();
        for m in &routes.snapshot.models {
            let meta = json!({"namespace": m.namespace, "name": m.name, "readyReplicas": m.replicas.len()});
            data.push(json!({"id": m.served, "object": "model", "owned_by": "strata", "root": m.served, "parent": null, "strata": meta}));
            for a in &m.adapters {
                data.push(json!({"id": a, "object": "model", "owned_by": "strata", "root": a, "parent": m.served, "strata": meta}));
            }
        }
        let code = |c: StatusCode| {
            self.metrics
                .requests
                .with_label_values(&["", "list", c.as_str()])
                .inc();
            self.metrics
                .duration
                .with_label_values(&[""])
                .observe(start.elapsed().as_secs_f64());
        };
        if endpoint == Endpoint::Model {
            let id = upstream
                .strip_prefix("/v1/models/")
                .map(|p| p.split('?').next().unwrap_or(p))
                .unwrap_or_default();
            return match data.into_iter().find(|d| d["id"] == id) {
                Some(d) => {
                    code(StatusCode::OK);
                    axum::Json(d).into_response()
                }
                None => self.refuse(
                    "",
                    start,
                    &GatewayError::Resolve(ResolveError::Unknown(id.to_string())),
                ),
            };
        }
        code(StatusCode::OK);
        axum::Json(json!({"object": "list", "data": data})).into_response()
    }

    /// The in-flight count of a replica.
    fn counter(&self, ns: &str, pod: &str) -> Arc<AtomicU32> {
        let key = format!("{ns}/{pod}");
        match self.in_flight.lock() {
            Ok(mut c) => c.entry(key).or_default().clone(),
            Err(_) => Arc::default(),
        }
    }

    /// What each of `replicas` last reported, `(waiting, kv_usage)` for
    /// the pick ([`Reported::current`]).
    fn reported(&self, ns: &str, replicas: &[table::Replica]) -> Vec<(u32, f64)> {
        let now = Instant::now();
        let Ok(reports) = self.reports.lock() else {
            return vec![(0, 0.0); replicas.len()];
        };
        replicas
            .iter()
            .map(|r| {
                let found = reports
                    .get(&format!("{ns}/{}", r.name))
                    .map(|(rep, at)| (*rep, now.saturating_duration_since(*at)));
                Reported::current(found.as_ref(), self.settings.signal_ttl)
            })
            .collect()
    }

    /// Takes the replica's load report off an answer's head (the client
    /// does not see it) and keeps it.
    fn note_report(&self, ns: &str, pod: &str, headers: &mut HeaderMap, ours: &AtomicU32) {
        let Some(value) = headers.remove(strata_net::load::HEADER) else {
            return;
        };
        let Some(load) = value.to_str().ok().and_then(ReplicaLoad::parse) else {
            return;
        };
        let report = Reported::new(load, ours.load(Ordering::Relaxed));
        if let Ok(mut r) = self.reports.lock() {
            r.insert(format!("{ns}/{pod}"), (report, Instant::now()));
        }
    }

    /// Picks, forwards and retries.
    async fn forward(&self, ask: &Asked, start: Instant) -> Result<Response, GatewayError> {
        let deadline = Instant::now() + self.settings.wait_timeout;
        let mut tried: Vec<String> = Vec::new();
        // The previous attempt, answered to the client when no other
        // replica is left to try.
        let mut last: Option<Kept> = None;
        loop {
            let (routes, i) = match self.ready(&ask.key, deadline).await {
                Ok(r) => r,
                Err(e) => return last.map_or(Err(e), |k| self.finish(ask, k, start)),
            };
            let m = &routes.snapshot.models[i];
            let counts: Vec<Arc<AtomicU32>> = m
                .replicas
                .iter()
                .map(|r| self.counter(&m.namespace, &r.name))
                .collect();
            let reported = self.reported(&m.namespace, &m.replicas);
            let replicas: Vec<routing::Replica> = m
                .replicas
                .iter()
                .zip(&counts)
                .zip(reported)
                .map(|((r, c), (waiting, kv_usage))| routing::Replica {
                    name: r.name.clone(),
                    in_flight: c.load(Ordering::Relaxed),
                    waiting,
                    kv_usage,
                    adapters: r.adapters.clone(),
                })
                .collect();
            let exclude: Vec<usize> = (0..replicas.len())
                .filter(|&j| tried.contains(&replicas[j].name))
                .collect();
            let pick = routing::pick(
                &replicas,
                &routes.rings[i],
                &Ask {
                    adapter: ask.adapter.as_deref(),
                    prefix: ask.prefix,
                    recurring: ask.recurring,
                },
                &exclude,
                &self.settings.routing,
                self.ticks.fetch_add(1, Ordering::Relaxed),
            );
            let (j, reason) = match (pick, last.take()) {
                (Ok(p), _) => p,
                // Nobody left to retry on: what the last attempt got.
                (Err(_), Some(k)) => return self.finish(ask, k, start),
                (Err(Refusal::NoReplica), None) => {
                    return Err(GatewayError::NoReplica(ask.key.clone()));
                }
                (Err(Refusal::NoAdapter), None) => {
                    return Err(GatewayError::NoAdapter {
                        model: ask.key.clone(),
                        adapter: ask.adapter.clone().unwrap_or_default(),
                    });
                }
            };
            let replica = &m.replicas[j];
            tried.push(replica.name.clone());
            let flight = InFlight::new(
                counts[j].clone(),
                self.metrics.in_flight.with_label_values(&[&ask.key]),
            );
            let (outcome, mut result) = self.attempt(ask, replica.addr, &replica.name).await;
            if let Ok(resp) = &mut result {
                self.note_report(&m.namespace, &replica.name, resp.headers_mut(), &counts[j]);
            }
            let mut going = self.going(&ask.key, &replica.name);
            let retry_after = result
                .as_ref()
                .is_ok_and(|r| r.headers().contains_key(header::RETRY_AFTER));
            if retry::settle(
                outcome,
                retry_after,
                tried.len(),
                self.settings.retries,
                going,
            ) {
                going = self.gone_within(&ask.key, &replica.name).await;
            }
            if retry::again(outcome, tried.len(), self.settings.retries, going) {
                self.metrics.retries.with_label_values(&[&ask.key]).inc();
                tracing::info!(model = %ask.key, replica = %replica.name, ?outcome, "trying another replica");
                last = Some((result, reason, flight));
                continue;
            }
            return self.finish(ask, (result, reason, flight), start);
        }
    }

    /// Whether `replica` has left the Model's ready replicas in the view.
    fn going(&self, key: &str, replica: &str) -> bool {
        let now = self.routes.borrow();
        !now.find(key).is_some_and(|k| {
            now.snapshot.models[k]
                .replicas
                .iter()
                .any(|r| r.name == replica)
        })
    }

    /// Waits up to `settings.settle` for the view to drop `replica`;
    /// whether it did.
    async fn gone_within(&self, key: &str, replica: &str) -> bool {
        let deadline = Instant::now() + self.settings.settle;
        let mut changes = self.routes.clone();
        loop {
            changes.borrow_and_update();
            if self.going(key, replica) {
                return true;
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => return self.going(key, replica),
            }
        }
    }

    /// An attempt's result for the client.
    fn finish(
        &self,
        ask: &Asked,
        (result, reason, flight): Kept,
        start: Instant,
    ) -> Result<Response, GatewayError> {
        result.map(|r| self.pass(ask, r, reason, flight, start))
    }

    /// One attempt on one replica.
    async fn attempt(
        &self,
        ask: &Asked,
        addr: std::net::SocketAddr,
        name: &str,
    ) -> (Outcome, Result<hyper::Response<Incoming>, GatewayError>) {
        let upstream = |error: String| GatewayError::Upstream {
            replica: name.to_string(),
            error,
        };
        let mut req = hyper::Request::new(Full::new(ask.body.clone()));
        *req.method_mut() = ask.method.clone();
        *req.headers_mut() = ask.headers.clone();
        match format!("http://{addr}{}", ask.upstream).parse() {
            Ok(uri) => *req.uri_mut() = uri,
            Err(e) => return (Outcome::Failed, Err(upstream(format!("bad address: {e}")))),
        }
        match tokio::time::timeout(self.settings.upstream_timeout, self.http.request(req)).await {
            Ok(Ok(resp)) => (Outcome::Answered(resp.status()), Ok(resp)),
            Ok(Err(e)) if e.is_connect() => (Outcome::Connect, Err(upstream(e.to_string()))),
            Ok(Err(e)) => (Outcome::Failed, Err(upstream(e.to_string()))),
            Err(_) => (
                Outcome::Failed,
                Err(GatewayError::UpstreamTimeout(name.to_string())),
            ),
        }
    }

    /// The replica's answer on its way to the client, body streamed.
    fn pass(
        &self,
        ask: &Asked,
        resp: hyper::Response<Incoming>,
        reason: routing::Reason,
        mut flight: InFlight,
        start: Instant,
    ) -> Response {
        let (mut parts, body) = resp.into_parts();
        self.metrics
            .requests
            .with_label_values(&[&ask.key, reason.label(), parts.status.as_str()])
            .inc();
        flight.timing = Some((self.metrics.duration.with_label_values(&[&ask.key]), start));
        strata_net::headers::strip_hop_by_hop(&mut parts.headers);
        let idle = self.settings.idle_timeout;
        Response::from_parts(
            parts,
            Body::new(Tracked {
                inner: body,
                idle,
                timer: Box::pin(tokio::time::sleep(idle)),
                flight: Some(flight),
            }),
        )
    }

    /// The Model's routes once it has a ready replica: now, or after
    /// waking it (only a Model that may scale from zero), bounded.
    async fn ready(
        &self,
        key: &str,
        deadline: Instant,
    ) -> Result<(Arc<Routes>, usize), GatewayError> {
        let mut changes = self.routes.clone();
        let now = changes.borrow_and_update().clone();
        let Some(i) = now.find(key) else {
            return Err(GatewayError::UnknownModel(key.to_string()));
        };
        let m = &now.snapshot.models[i];
        if !m.replicas.is_empty() {
            return Ok((now, i));
        }
        if !m.wakeable {
            return Err(GatewayError::NoReplica(key.to_string()));
        }
        let (ns, name) = (m.namespace.clone(), m.name.clone());
        let entered = self.waiting.lock().is_ok_and(|mut w| {
            w.enter(
                key,
                self.settings.max_waiting_per_model,
                self.settings.max_waiting,
            )
        });
        if !entered {
            return Err(GatewayError::Full(key.to_string()));
        }
        let _place = Place { g: self, key };
        loop {
            self.wake_once(&ns, &name).await;
            let next = (Instant::now() + WAKE_EVERY).min(deadline);
            if let Ok(Err(_)) = tokio::time::timeout_at(next, changes.changed()).await {
                return Err(GatewayError::ShuttingDown);
            }
            let now = changes.borrow_and_update().clone();
            match now.find(key) {
                None => return Err(GatewayError::UnknownModel(key.to_string())),
                Some(i) if !now.snapshot.models[i].replicas.is_empty() => return Ok((now, i)),
                Some(_) => {}
            }
            if Instant::now() >= deadline {
                return Err(GatewayError::WaitTimeout {
                    model: key.to_string(),
                    secs: self.settings.wait_timeout.as_secs(),
                });
            }
        }
    }

    /// Asks for a replica unless this process did within WAKE_EVERY.
    async fn wake_once(&self, ns: &str, name: &str) {
        let key = format!("{ns}/{name}");
        let now = Instant::now();
        let due = self.woken.lock().is_ok_and(|mut w| {
            let due = w
                .get(&key)
                .is_none_or(|t| now.duration_since(*t) >= WAKE_EVERY);
            if due {
                w.insert(key, now);
            }
            due
        });
        if !due {
            return;
        }
        self.metrics.wakes.inc();
        // Bounded: a stalled API server does not hold the waiting requests
        // past their own deadline (the next wake is WAKE_EVERY later).
        match tokio::time::timeout(WAKE_TIMEOUT, (self.wake)(ns.to_string(), name.to_string()))
            .await
        {
            Ok(Ok(())) => {
                tracing::info!(namespace = %ns, model = %name, "no ready replica: asked for one; requests wait")
            }
            Ok(Err(e)) => {
                tracing::warn!(namespace = %ns, model = %name, "asking for a replica: {e}")
            }
            Err(_) => {
                tracing::warn!(namespace = %ns, model = %name, "asking for a replica: no answer within {WAKE_TIMEOUT:?}")
            }
        }
    }
}

/// An attempt kept for the client: its result, how its replica was
/// picked, and its in-flight count.
type Kept = (
    Result<hyper::Response<Incoming>, GatewayError>,
    routing::Reason,
    InFlight,
);

/// A request ready to forward.
struct Asked {
    key: String,
    adapter: Option<String>,
    prefix: Option<u64>,
    /// Whether this gateway routed the prefix recently.
    recurring: bool,
    method: Method,
    headers: HeaderMap,
    upstream: String,
    body: Bytes,
}

/// A place among the waiting requests, given back on drop.
struct Place<'a> {
    g: &'a Gateway,
    key: &'a str,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        if let Ok(mut w) = self.g.waiting.lock() {
            w.leave(self.key);
        }
    }
}

/// One request in flight to a replica: counted from the pick until the
/// answer's body ends or is dropped.
pub struct InFlight {
    count: Arc<AtomicU32>,
    gauge: IntGauge,
    timing: Option<(Histogram, Instant)>,
}

impl InFlight {
    fn new(count: Arc<AtomicU32>, gauge: IntGauge) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        gauge.inc();
        Self {
            count,
            gauge,
            timing: None,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
        self.gauge.dec();
        if let Some((h, start)) = &self.timing {
            h.observe(start.elapsed().as_secs_f64());
        }
    }
}

/// Why an answer's body stopped.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The replica's stream failed.
    #[error("the replica's answer failed: {0}")]
    Upstream(#[from] hyper::Error),
    /// No byte for too long.
    #[error("the replica sent nothing for {0:?}")]
    Idle(Duration),
}

/// The replica's answer body, passed through frame by frame; ends the
/// in-flight count when it ends, fails or is dropped; fails when idle.
struct Tracked {
    inner: Incoming,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
    flight: Option<InFlight>,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = StreamError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StreamError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let idle = this.idle;
                this.timer.as_mut().reset(Instant::now() + idle);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.flight = None;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.flight = None;
                Poll::Ready(None)
            }
            Poll::Pending => {
                if this.timer.as_mut().poll(cx).is_ready() {
                    this.flight = None;
                    Poll::Ready(Some(Err(StreamError::Idle(this.idle))))
                } else {
                    Poll::Pending
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

async fn handle(State(g): State<Arc<Gateway>>, req: Request) -> Response {
    let start = Instant::now();
    match g.serve(req, start).await {
        Ok(r) => r,
        Err((model, e)) => g.refuse(&model, start, &e),
    }
}

/// The gateway's router (every path: the allowlist decides).
pub fn router(gateway: Arc<Gateway>) -> Router {
    Router::new().fallback(handle).with_state(gateway)
}

/// Serves the gateway on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    gateway: Arc<Gateway>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = gateway.settings.server;
    strata_net::server::serve(listener, router(gateway), limits, None, shutdown).await
}
