//! The activator: an OpenAI-compatible front for Models that scale to zero.
//! `POST /models/<namespace>/<model>/v1/...` reaches a ready replica of the
//! Model (its sidecar, on the pod IP); when the Model has none, the request
//! waits: the activator asks for a replica (annotation
//! `strata.ai/wake-requested-at` on the Model, which any operator replica can
//! write and the leader's autoscaler reads as a request), waits until one is
//! ready (up to `--activator-timeout-seconds`), then forwards the request and
//! streams the answer back.
//!
//! Scoped and cheap, by design:
//! - only Models that opt in are served: those with
//!   `spec.autoscaling.scaleToZero`, or the annotation
//!   `strata.ai/activator: enabled`; any other name is a 404, the same as a
//!   Model that does not exist;
//! - only the OpenAI inference API is forwarded (strata_net::openai), with
//!   the path rebuilt from the allowlist and hop-by-hop headers stripped;
//! - readiness comes from two shared watches (Models, and the pods labelled
//!   `strata.ai/model`), not from requests: a thousand waiting requests cost
//!   the API server nothing more, and one PATCH per Model asks for a replica;
//! - waiting requests are capped per Model and in total (503 with
//!   Retry-After beyond), and so are connections, request heads and bodies
//!   (strata_net::server and body limits).
//!
//! It runs on every operator replica (leader or not), so it keeps working
//! across leader changes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use strata_crds::Model;
use strata_net::openai::{self, Route};

use strata_core::labels;
use strata_core::template::SIDECAR_HTTP_PORT;
use strata_core::view;

/// The annotation by which the activator asks for a replica.
pub const WAKE_ANNOTATION: &str = "strata.ai/wake-requested-at";

/// The annotation by which a Model without scale to zero opts in.
pub const OPT_IN_ANNOTATION: &str = "strata.ai/activator";

/// A wake request is repeated at most this often per Model while requests
/// wait (the autoscaler takes the newest).
pub const WAKE_EVERY: Duration = Duration::from_secs(30);

/// Whether the activator serves a Model.
pub fn serves(model: &Model) -> bool {
    model.spec.autoscaling.scale_to_zero.is_some()
        || model
            .annotations()
            .get(OPT_IN_ANNOTATION)
            .is_some_and(|v| v == "enabled")
}

/// The pod IPs of a Model's ready replicas: owned by this Model (its UID,
/// not only its name), not terminating, ready, with an IP.
pub fn ready_ips<'a>(model_uid: &str, pods: impl IntoIterator<Item = &'a Pod>) -> Vec<String> {
    ready_pods(model_uid, pods)
        .filter_map(|p| p.status.as_ref().and_then(|s| s.pod_ip.clone()))
        .collect()
}

/// A Model's ready replicas (shared with strata-gateway): owned by this
/// Model (its UID), not terminating, ready.
pub fn ready_pods<'a, 'u>(
    model_uid: &'u str,
    pods: impl IntoIterator<Item = &'a Pod> + 'u,
) -> impl Iterator<Item = &'a Pod> + 'u
where
    'a: 'u,
{
    pods.into_iter().filter(move |p| {
        p.metadata.deletion_timestamp.is_none()
            && view::pod_ready(p)
            && p.owner_references().iter().any(|o| o.uid == model_uid)
    })
}

/// Asks for a replica of a Model: the wake annotation, stamped now (one
/// PATCH; shared with strata-gateway).
pub async fn request_wake(client: &Client, ns: &str, name: &str) -> Result<(), kube::Error> {
    let stamp = k8s_openapi::jiff::Timestamp::now().to_string();
    let patch = json!({"metadata": {"annotations": {WAKE_ANNOTATION: stamp}}});
    let api: Api<Model> = Api::namespaced(client.clone(), ns);
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// Bounds of the activator.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// How long a request may wait for a replica.
    pub timeout: Duration,
    /// Requests waiting for one Model at most.
    pub max_waiting_per_model: usize,
    /// Requests waiting in all at most.
    pub max_waiting: usize,
    /// Largest request body forwarded.
    pub max_request_bytes: usize,
    /// The listener's bounds.
    pub server: strata_net::server::ServerLimits,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(600),
            max_waiting_per_model: 1000,
            max_waiting: 4000,
            max_request_bytes: 8 * 1024 * 1024,
            server: strata_net::server::ServerLimits {
                max_connections: 8192,
                ..strata_net::server::ServerLimits::default()
            },
        }
    }
}

/// Counts of waiting requests, per Model and in total. Pure.
#[derive(Debug, Default)]
pub struct Waiting {
    per_model: HashMap<String, usize>,
    total: usize,
}

impl Waiting {
    /// Takes a place for `key`, or false when a cap is reached.
    pub fn enter(&mut self, key: &str, per_model: usize, total: usize) -> bool {
        let n = self.per_model.get(key).copied().unwrap_or(0);
        if n >= per_model || self.total >= total {
            return false;
        }
        self.per_model.insert(key.to_string(), n + 1);
        self.total += 1;
        true
    }

    /// Gives a place back.
    pub fn leave(&mut self, key: &str) {
        if let Some(n) = self.per_model.get_mut(key) {
            *n -= 1;
            self.total -= 1;
            if *n == 0 {
                self.per_model.remove(key);
            }
        }
    }

    /// Requests waiting in all.
    pub fn total(&self) -> usize {
        self.total
    }
}

/// Shared by every request.
pub struct Activator {
    client: Client,
    http: HttpClient<HttpConnector, Body>,
    limits: Limits,
    metrics: crate::metrics::Metrics,
    models: Store<Model>,
    pods: Store<Pod>,
    /// Bumped on every change the watches see.
    changes: tokio::sync::watch::Receiver<u64>,
    waiting: Mutex<Waiting>,
    /// When this process last asked for a replica of a Model.
    woken: Mutex<HashMap<String, tokio::time::Instant>>,
}

/// A place among the waiting requests, given back on drop.
struct Place<'a> {
    a: &'a Activator,
    key: String,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        if let Ok(mut w) = self.a.waiting.lock() {
            w.leave(&self.key);
            self.a.metrics.activator_waiting.set(w.total() as i64);
        }
    }
}

impl Activator {
    /// An activator with its own watches of Models and model pods.
    pub fn new(client: Client, limits: Limits, metrics: crate::metrics::Metrics) -> Self {
        let mut c = HttpConnector::new();
        c.set_connect_timeout(Some(Duration::from_secs(5)));
        c.set_nodelay(true);
        let (tx, changes) = tokio::sync::watch::channel(0u64);
        let tx = Arc::new(tx);
        let bump = |tx: Arc<tokio::sync::watch::Sender<u64>>| {
            move || tx.send_modify(|n| *n = n.wrapping_add(1))
        };
        let models = crate::watch::spawn_store(
            Api::<Model>::all(client.clone()),
            watcher::Config::default(),
            crate::watch::drop_managed_fields,
            bump(tx.clone()),
        );
        let pods = crate::watch::spawn_store(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().labels(labels::MODEL),
            crate::watch::drop_managed_fields,
            bump(tx),
        );
        Self {
            client,
            http: HttpClient::builder(TokioExecutor::new())
                .pool_idle_timeout(strata_net::server::CLIENT_IDLE_TIMEOUT)
                .build(c),
            limits,
            metrics,
            models,
            pods,
            changes,
            waiting: Mutex::new(Waiting::default()),
            woken: Mutex::new(HashMap::new()),
        }
    }

    fn reject(&self, status: StatusCode, reason: &str, message: String) -> Response {
        self.metrics
            .activator_rejected
            .with_label_values(&[reason])
            .inc();
        let mut r = (
            status,
            axum::Json(openai::error_body(status, "activator_error", &message)),
        )
            .into_response();
        if matches!(
            status,
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS
        ) {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        r
    }

    fn ready(&self, ns: &str, uid: &str) -> Vec<String> {
        let pods = self.pods.state();
        ready_ips(
            uid,
            pods.iter()
                .filter(|p| p.metadata.namespace.as_deref() == Some(ns))
                .map(|p| p.as_ref()),
        )
    }

    /// Asks for a replica unless this process did within WAKE_EVERY.
    async fn wake(&self, ns: &str, name: &str) -> Result<(), kube::Error> {
        let key = format!("{ns}/{name}");
        let now = tokio::time::Instant::now();
        {
            let Ok(mut woken) = self.woken.lock() else {
                return Ok(());
            };
            if woken
                .get(&key)
                .is_some_and(|t| now.duration_since(*t) < WAKE_EVERY)
            {
                return Ok(());
            }
            woken.insert(key, now);
        }
        self.metrics.activator_wakes.inc();
        request_wake(&self.client, ns, name).await?;
        tracing::info!(namespace = %ns, model = %name, "no ready replica: asked for one; requests wait");
        Ok(())
    }

    /// Waits for a ready replica of the Model; returns its IP.
    async fn replica(&self, ns: &str, name: &str) -> Result<(String, bool), Response> {
        let not_served = || {
            self.reject(
                StatusCode::NOT_FOUND,
                "not_served",
                format!("no Model {ns}/{name} is served by the activator (it serves Models with spec.autoscaling.scaleToZero or the annotation {OPT_IN_ANNOTATION}: enabled)"),
            )
        };
        let deadline = tokio::time::Instant::now() + self.limits.timeout;
        let mut changes = self.changes.clone();
        // The watches' first lists may still be on their way.
        if tokio::time::timeout_at(deadline, self.models.wait_until_ready())
            .await
            .is_err()
        {
            return Err(self.reject(
                StatusCode::SERVICE_UNAVAILABLE,
                "timeout",
                "the activator's view of the cluster is not ready".into(),
            ));
        }
        let lookup = |a: &Self| {
            a.models
                .get(&ObjectRef::new(name).within(ns))
                .filter(|m| serves(m))
        };
        let Some(model) = lookup(self) else {
            return Err(not_served());
        };
        let uid = model.uid().unwrap_or_default();
        if let Some(ip) = pick(&self.ready(ns, &uid)) {
            return Ok((ip, false));
        }
        let key = format!("{ns}/{name}");
        let entered = self.waiting.lock().is_ok_and(|mut w| {
            let ok = w.enter(
                &key,
                self.limits.max_waiting_per_model,
                self.limits.max_waiting,
            );
            self.metrics.activator_waiting.set(w.total() as i64);
            ok
        });
        if !entered {
            return Err(self.reject(
                StatusCode::SERVICE_UNAVAILABLE,
                "full",
                format!("too many requests are waiting for {ns}/{name}; retry shortly"),
            ));
        }
        let _place = Place { a: self, key };
        loop {
            if let Err(e) = self.wake(ns, name).await {
                tracing::warn!(namespace = %ns, model = %name, "asking for a replica: {e}");
            }
            // Wait for a change, or for the next wake-up.
            let next = (tokio::time::Instant::now() + WAKE_EVERY).min(deadline);
            match tokio::time::timeout_at(next, changes.changed()).await {
                Ok(Ok(())) | Err(_) => {}
                Ok(Err(_)) => {
                    return Err(self.reject(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "timeout",
                        "the activator is shutting down".into(),
                    ));
                }
            }
            match lookup(self) {
                Some(m) if m.uid().unwrap_or_default() == uid => {}
                _ => return Err(not_served()),
            }
            if let Some(ip) = pick(&self.ready(ns, &uid)) {
                return Ok((ip, true));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(self.reject(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "timeout",
                    format!(
                        "no replica of {ns}/{name} became ready within {}s",
                        self.limits.timeout.as_secs()
                    ),
                ));
            }
        }
    }
}

/// One of the ready replicas, spread by a cheap clock-based pick.
fn pick(ips: &[String]) -> Option<String> {
    if ips.is_empty() {
        return None;
    }
    let i = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as usize);
    Some(ips[i % ips.len()].clone())
}

/// Splits `/models/<ns>/<model>/<rest>` into its parts.
pub fn split_path(path: &str) -> Option<(&str, &str, String)> {
    let rest = path.strip_prefix("/models/")?;
    let (ns, rest) = rest.split_once('/')?;
    let (name, rest) = rest.split_once('/')?;
    (!ns.is_empty() && !name.is_empty()).then(|| (ns, name, format!("/{rest}")))
}

async fn handle(State(a): State<Arc<Activator>>, req: Request) -> Response {
    let Some((ns, name, rest)) = split_path(req.uri().path()) else {
        return a.reject(
            StatusCode::NOT_FOUND,
            "not_found",
            "the activator serves /models/<namespace>/<model>/v1/...".into(),
        );
    };
    let (ns, name) = (ns.to_string(), name.to_string());
    let upstream = match openai::route(req.method(), &rest, req.uri().query()) {
        Route::Forward { upstream, .. } => upstream,
        Route::MethodNotAllowed { endpoint } => {
            return a.reject(
                StatusCode::METHOD_NOT_ALLOWED,
                "method",
                format!("{rest} takes {}", endpoint.method()),
            );
        }
        Route::NotFound => {
            a.metrics
                .activator_rejected
                .with_label_values(&["not_found"])
                .inc();
            return (
                StatusCode::NOT_FOUND,
                axum::Json(openai::not_found_body(&rest)),
            )
                .into_response();
        }
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > a.limits.max_request_bytes as u64) {
        return a.reject(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "the body is larger than {} bytes",
                a.limits.max_request_bytes
            ),
        );
    }
    let (ip, woke) = match a.replica(&ns, &name).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };

    // Forward: the allowlisted path, end-to-end headers, the body streamed
    // (at most max_request_bytes of it).
    let (mut parts, body) = req.into_parts();
    parts.uri = match format!("http://{ip}:{SIDECAR_HTTP_PORT}{upstream}").parse() {
        Ok(u) => u,
        Err(e) => {
            return a.reject(
                StatusCode::BAD_REQUEST,
                "not_found",
                format!("bad path: {e}"),
            );
        }
    };
    strata_net::headers::strip_hop_by_hop(&mut parts.headers);
    if let Some(n) = declared
        && let Ok(v) = HeaderValue::from_str(&n.to_string())
    {
        parts.headers.insert(header::CONTENT_LENGTH, v);
    }
    let body = Body::new(http_body_util::Limited::new(
        body,
        a.limits.max_request_bytes,
    ));
    let forwarded = Request::from_parts(parts, body);
    match tokio::time::timeout(a.limits.timeout, a.http.request(forwarded)).await {
        Ok(Ok(resp)) => {
            a.metrics
                .activator_requests
                .with_label_values(&[if woke { "woke" } else { "ready" }])
                .inc();
            let (mut parts, body) = resp.into_parts();
            strata_net::headers::strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, Body::new(body))
        }
        Ok(Err(e)) => a.reject(
            StatusCode::BAD_GATEWAY,
            "upstream",
            format!("forwarding to replica {ip}: {e}"),
        ),
        Err(_) => a.reject(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream",
            format!("replica {ip} did not answer in time"),
        ),
    }
}

/// Serves the activator on `addr` until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    activator: Activator,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = activator.limits.server;
    let app = Router::new()
        .fallback(handle)
        .with_state(Arc::new(activator));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "activator: /models/<namespace>/<model>/v1/...");
    strata_net::server::serve(listener, app, limits, None, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_into_namespace_model_and_rest() {
        assert_eq!(
            split_path("/models/ns/m/v1/chat/completions"),
            Some(("ns", "m", "/v1/chat/completions".to_string()))
        );
        assert_eq!(split_path("/models/ns/m"), None);
        assert_eq!(split_path("/models//m/v1/x"), None);
        assert_eq!(split_path("/v1/chat/completions"), None);
        // The rest goes through the allowlist: admin paths do not pass.
        let (_, _, rest) = split_path("/models/ns/m/v1/load_lora_adapter").expect("split");
        assert_eq!(
            openai::route(&http::Method::POST, &rest, None),
            Route::NotFound
        );
    }

    #[test]
    fn waiting_is_capped_per_model_and_in_total() {
        let mut w = Waiting::default();
        assert!(w.enter("a", 2, 3));
        assert!(w.enter("a", 2, 3));
        assert!(!w.enter("a", 2, 3), "per model");
        assert!(w.enter("b", 2, 3));
        assert!(!w.enter("c", 2, 3), "in total");
        w.leave("a");
        assert!(w.enter("c", 2, 3));
        assert_eq!(w.total(), 3);
        w.leave("nobody");
        assert_eq!(w.total(), 3);
    }

    #[test]
    fn ready_replicas_of_this_model_only() {
        let pod = |name: &str, uid: &str, ready: &str, ip: Option<&str>, deleting: bool| -> Pod {
            let mut p: Pod = serde_json::from_value(json!({
                "metadata": {"name": name, "ownerReferences": [{"apiVersion": "strata.ai/v1alpha1", "kind": "Model", "name": "m", "uid": uid}]},
                "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": ready}]}
            }))
            .expect("pod");
            if deleting {
                p.metadata.deletion_timestamp =
                    Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                        k8s_openapi::jiff::Timestamp::now(),
                    ));
            }
            p
        };
        let pods = [
            pod("a", "u1", "True", Some("127.0.0.2"), false),
            pod("b", "u1", "False", Some("127.0.0.3"), false),
            pod("c", "u1", "True", Some("127.0.0.4"), true),
            pod("d", "old-uid", "True", Some("127.0.0.5"), false),
            pod("e", "u1", "True", None, false),
        ];
        assert_eq!(ready_ips("u1", &pods), ["127.0.0.2"]);
        assert!(pick(&[]).is_none());
    }

    #[test]
    fn only_opted_in_models_are_served() {
        let mut m: Model = serde_json::from_value(json!({
            "apiVersion": "strata.ai/v1alpha1", "kind": "Model",
            "metadata": {"name": "m", "namespace": "ns"},
            "spec": {"source": {"uri": "hf://a/b"}, "engine": {"type": "vLLM"}, "pools": [{"name": "p"}], "maxReplicas": 2}
        }))
        .expect("model");
        assert!(!serves(&m));
        m.metadata.annotations =
            Some([(OPT_IN_ANNOTATION.to_string(), "enabled".to_string())].into());
        assert!(serves(&m));
        m.metadata.annotations = None;
        m.spec.autoscaling.scale_to_zero = serde_json::from_value(json!({"idleWindow": "5m"})).ok();
        assert!(serves(&m));
    }
}
