//! The activator: an OpenAI-compatible front for Models that scale to zero.
//! `POST /models/<namespace>/<model>/v1/...` reaches a ready replica of the
//! Model (its sidecar, on the pod IP); when the Model has none, the request
//! waits: the activator asks for a replica (annotation
//! `strata.ai/wake-requested-at` on the Model, which any operator replica can
//! write and the leader's autoscaler reads as a request), waits until one is
//! ready (up to `--activator-timeout-seconds`), then forwards the request and
//! streams the answer back.
//!
//! It runs on every operator replica (leader or not), reading the API server
//! directly, so it keeps working across leader changes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use strata_crds::Model;

use crate::labels;
use crate::template::SIDECAR_HTTP_PORT;
use crate::view;

/// The annotation by which the activator asks for a replica.
pub const WAKE_ANNOTATION: &str = "strata.ai/wake-requested-at";

/// Shared by every request.
#[derive(Clone)]
pub struct Activator {
    client: Client,
    http: HttpClient<HttpConnector, Body>,
    timeout: Duration,
    metrics: crate::metrics::Metrics,
}

impl Activator {
    /// An activator that waits at most `timeout` for a replica.
    pub fn new(client: Client, timeout: Duration, metrics: crate::metrics::Metrics) -> Self {
        let mut c = HttpConnector::new();
        c.set_connect_timeout(Some(Duration::from_secs(5)));
        Self {
            client,
            http: HttpClient::builder(TokioExecutor::new()).build(c),
            timeout,
            metrics,
        }
    }
}

fn problem(status: StatusCode, message: String) -> Response {
    (
        status,
        axum::Json(json!({"error": {"code": status.as_u16(), "message": message}})),
    )
        .into_response()
}

/// The pod IPs of the Model's ready replicas.
async fn ready_ips(client: &Client, ns: &str, model: &Model) -> Result<Vec<String>, kube::Error> {
    let uid = model.uid().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let list = pods
        .list(&ListParams::default().labels(&format!("{}={}", labels::MODEL, model.name_any())))
        .await?;
    Ok(list
        .items
        .iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && view::pod_ready(p)
                && p.owner_references().iter().any(|o| o.uid == uid)
        })
        .filter_map(|p| p.status.as_ref().and_then(|s| s.pod_ip.clone()))
        .collect())
}

async fn handle(
    State(a): State<Arc<Activator>>,
    Path((ns, name, rest)): Path<(String, String, String)>,
    req: Request,
) -> Response {
    let models: Api<Model> = Api::namespaced(a.client.clone(), &ns);
    let model = match models.get_opt(&name).await {
        Ok(Some(m)) => m,
        Ok(None) => {
            return problem(
                StatusCode::NOT_FOUND,
                format!("no Model {name} in namespace {ns}"),
            );
        }
        Err(e) => return problem(StatusCode::BAD_GATEWAY, format!("reading the Model: {e}")),
    };
    let deadline = tokio::time::Instant::now() + a.timeout;
    let mut woke = false;
    let ip = loop {
        match ready_ips(&a.client, &ns, &model).await {
            Ok(ips) if !ips.is_empty() => {
                // Spread requests: the replica by a cheap clock-based pick.
                let i = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos() as usize);
                break ips[i % ips.len()].clone();
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(namespace = %ns, model = %name, "listing replicas: {e}"),
        }
        if !woke {
            woke = true;
            a.metrics.activator_wakes.inc();
            let now = k8s_openapi::jiff::Timestamp::now().to_string();
            let patch = json!({"metadata": {"annotations": {WAKE_ANNOTATION: now}}});
            if let Err(e) = models
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                return problem(
                    StatusCode::BAD_GATEWAY,
                    format!("asking for a replica of {ns}/{name}: {e}"),
                );
            }
            tracing::info!(namespace = %ns, model = %name, "no ready replica: asked for one; the request waits");
        }
        if tokio::time::Instant::now() >= deadline {
            return problem(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "no replica of {ns}/{name} became ready within {}s",
                    a.timeout.as_secs()
                ),
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    // Forward: same method, path after the prefix, query, headers and body.
    let (mut parts, body) = req.into_parts();
    let query = parts
        .uri
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let uri = format!("http://{ip}:{SIDECAR_HTTP_PORT}/{rest}{query}");
    parts.uri = match uri.parse() {
        Ok(u) => u,
        Err(e) => return problem(StatusCode::BAD_REQUEST, format!("bad path: {e}")),
    };
    if let Ok(host) = HeaderValue::from_str(&format!("{ip}:{SIDECAR_HTTP_PORT}")) {
        parts.headers.insert(axum::http::header::HOST, host);
    }
    let forwarded = Request::from_parts(parts, body);
    match a.http.request(forwarded).await {
        Ok(resp) => {
            a.metrics
                .activator_requests
                .with_label_values(&[if woke { "woke" } else { "ready" }])
                .inc();
            resp.map(Body::new).into_response()
        }
        Err(e) => problem(
            StatusCode::BAD_GATEWAY,
            format!("forwarding to replica {ip}: {e}"),
        ),
    }
}

/// Serves the activator on `addr` until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    activator: Activator,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/models/{ns}/{model}/{*rest}", any(handle))
        .with_state(Arc::new(activator));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "activator: /models/<namespace>/<model>/v1/...");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
