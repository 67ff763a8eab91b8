//! The admin port: /healthz, /readyz, /metrics and the adapter API the
//! operator calls (bearer token from a mounted Secret).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode, header};
use prometheus::GaugeVec;
use serde::Deserialize;
use serde_json::json;

use crate::app::App;
use crate::engine::{CacheInfo, LoraInfo};
use crate::promtext;

/// Largest body of an adapter API call.
pub const MAX_ADMIN_BODY_BYTES: usize = 256 * 1024;

/// GET /healthz: the sidecar itself is alive.
pub async fn healthz() -> &'static str {
    "ok"
}

/// GET /readyz: ready only while the engine answers its health check.
pub async fn readyz(State(app): State<Arc<App>>) -> Response {
    if app.engine_ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the engine is not answering its health check",
        )
            .into_response()
    }
}

/// GET /metrics.
pub async fn metrics(State(app): State<Arc<App>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
        .into_response()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether the request carries the token in the token file. The file is
/// read on every call, so a rotated Secret takes effect without a restart.
/// No file, an empty file or a missing header: refused.
pub fn authorized(app: &App, headers: &HeaderMap) -> bool {
    let Some(path) = &app.config.adapter_token_file else {
        return false;
    };
    let Ok(expected) = std::fs::read_to_string(path) else {
        tracing::warn!(path = %path.display(), "the adapter token file cannot be read; refusing adapter calls");
        return false;
    };
    let expected = expected.trim();
    if expected.is_empty() {
        return false;
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("");
    constant_time_eq(given.as_bytes(), expected.as_bytes())
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        Json(json!({"error": {"message": "a valid bearer token is required for the adapter API", "code": 401}})),
    )
        .into_response()
}

fn problem(status: StatusCode, message: String) -> Response {
    (
        status,
        Json(json!({"error": {"message": message, "code": status.as_u16()}})),
    )
        .into_response()
}

/// A load request.
#[derive(Debug, Deserialize)]
pub struct LoadRequest {
    /// The name requests use.
    pub name: String,
    /// Where the engine finds the weights (a path or hub id).
    pub source: String,
    /// Credentials of the source (the Adapter's Secret, e.g. `HF_TOKEN`):
    /// with them the sidecar fetches the weights itself into
    /// `--adapter-dir` and the engine loads them from there.
    #[serde(default)]
    pub credentials: BTreeMap<String, String>,
}

/// GET /v1/adapters: what is loaded, with the reloads after engine
/// restarts (`reloads`, `lastReloadUnix`) where there were any.
pub async fn list(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if !authorized(&app, &headers) {
        return unauthorized();
    }
    let reloads = app
        .adapter_reloads
        .lock()
        .map(|r| r.clone())
        .unwrap_or_default();
    let adapters: Vec<_> = app
        .adapters
        .read()
        .await
        .iter()
        .map(|(n, s)| match reloads.get(n) {
            Some((count, at)) => {
                json!({"name": n, "source": s, "reloads": count, "lastReloadUnix": at})
            }
            None => json!({"name": n, "source": s}),
        })
        .collect();
    Json(json!({"adapters": adapters})).into_response()
}

/// POST /v1/adapters: load (idempotent).
pub async fn load(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    if !authorized(&app, &headers) {
        app.metrics
            .adapter_operations
            .with_label_values(&["load", "unauthorized"])
            .inc();
        return unauthorized();
    }
    let req: LoadRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return problem(
                StatusCode::BAD_REQUEST,
                format!("expected {{\"name\", \"source\"}}: {e}"),
            );
        }
    };
    if req.name.is_empty() || req.name == app.config.served_model {
        return problem(
            StatusCode::BAD_REQUEST,
            format!("invalid adapter name {:?}", req.name),
        );
    }
    let Some((load_path, _)) = app.config.engine.adapter_paths() else {
        return problem(
            StatusCode::NOT_IMPLEMENTED,
            format!(
                "the {:?} engine cannot load adapters at run time",
                app.config.engine
            ),
        );
    };
    let mut adapters = app.adapters.write().await;
    if let Some(existing) = adapters.get(&req.name) {
        return if *existing == req.source {
            app.metrics
                .adapter_operations
                .with_label_values(&["load", "already_loaded"])
                .inc();
            Json(json!({"name": req.name, "status": "loaded", "changed": false})).into_response()
        } else {
            problem(
                StatusCode::CONFLICT,
                format!(
                    "adapter {} is loaded from {existing}, not {}; unload it first",
                    req.name, req.source
                ),
            )
        };
    }
    let path = if req.credentials.is_empty() {
        req.source.clone()
    } else {
        let Some(dir) = app.config.adapter_dir.as_deref() else {
            return problem(
                StatusCode::BAD_REQUEST,
                format!(
                    "adapter {} comes with credentials, but this sidecar has no --adapter-dir to fetch it into",
                    req.name
                ),
            );
        };
        match crate::fetch::fetch_hf(
            &app.config.hf_endpoint,
            &req.source,
            req.credentials.get("HF_TOKEN").map(String::as_str),
            dir,
            &req.name,
        )
        .await
        {
            Ok(p) => p.display().to_string(),
            Err(e) => {
                app.metrics
                    .adapter_operations
                    .with_label_values(&["load", "fetch_error"])
                    .inc();
                return problem(
                    StatusCode::BAD_GATEWAY,
                    format!("fetching adapter {}: {e}", req.name),
                );
            }
        }
    };
    let body = json!({"lora_name": req.name, "lora_path": path}).to_string();
    match app
        .call(
            Method::POST,
            load_path,
            Some(Bytes::from(body)),
            Duration::from_secs(300),
        )
        .await
    {
        Ok((status, _)) if status.is_success() => {}
        // The engine already has it (the sidecar restarted): take it as
        // loaded. vLLM says "The lora adapter '<name>' has already been
        // loaded." (not to be confused with "... are loaded already, the
        // maximum", a refusal).
        Ok((status, text))
            if status == StatusCode::BAD_REQUEST
                && String::from_utf8_lossy(&text).contains("has already been loaded") => {}
        Ok((status, text)) => {
            app.metrics
                .adapter_operations
                .with_label_values(&["load", "engine_error"])
                .inc();
            return problem(
                StatusCode::BAD_GATEWAY,
                format!(
                    "the engine refused to load {} ({status}): {}",
                    req.name,
                    String::from_utf8_lossy(&text)
                ),
            );
        }
        Err(e) => {
            app.metrics
                .adapter_operations
                .with_label_values(&["load", "engine_error"])
                .inc();
            return problem(StatusCode::BAD_GATEWAY, e.to_string());
        }
    }
    adapters.insert(req.name.clone(), req.source.clone());
    if let Ok(mut paths) = app.adapter_paths.lock() {
        paths.insert(req.name.clone(), path.clone());
    }
    app.metrics.adapters_loaded.set(adapters.len() as i64);
    app.metrics
        .adapter_operations
        .with_label_values(&["load", "success"])
        .inc();
    tracing::info!(adapter = %req.name, source = %req.source, "adapter loaded");
    (
        StatusCode::CREATED,
        Json(json!({"name": req.name, "status": "loaded", "changed": true})),
    )
        .into_response()
}

/// DELETE /v1/adapters/{name}: unload (idempotent).
pub async fn unload(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    if !authorized(&app, &headers) {
        app.metrics
            .adapter_operations
            .with_label_values(&["unload", "unauthorized"])
            .inc();
        return unauthorized();
    }
    let Some((_, unload_path)) = app.config.engine.adapter_paths() else {
        return problem(
            StatusCode::NOT_IMPLEMENTED,
            "this engine cannot unload adapters at run time".into(),
        );
    };
    let mut adapters = app.adapters.write().await;
    if !adapters.contains_key(&name) {
        return Json(json!({"name": name, "status": "not_loaded", "changed": false}))
            .into_response();
    }
    let body = json!({"lora_name": name}).to_string();
    match app
        .call(
            Method::POST,
            unload_path,
            Some(Bytes::from(body)),
            Duration::from_secs(60),
        )
        .await
    {
        Ok((status, _)) if status.is_success() || status == StatusCode::NOT_FOUND => {}
        Ok((status, text)) => {
            app.metrics
                .adapter_operations
                .with_label_values(&["unload", "engine_error"])
                .inc();
            return problem(
                StatusCode::BAD_GATEWAY,
                format!(
                    "the engine refused to unload {name} ({status}): {}",
                    String::from_utf8_lossy(&text)
                ),
            );
        }
        Err(e) => {
            app.metrics
                .adapter_operations
                .with_label_values(&["unload", "engine_error"])
                .inc();
            return problem(StatusCode::BAD_GATEWAY, e.to_string());
        }
    }
    adapters.remove(&name);
    if let Ok(mut paths) = app.adapter_paths.lock() {
        paths.remove(&name);
    }
    if let Ok(mut reloads) = app.adapter_reloads.lock() {
        reloads.remove(&name);
    }
    if let Some(dir) = app.config.adapter_dir.as_deref() {
        let _ = tokio::fs::remove_dir_all(crate::fetch::adapter_path(dir, &name)).await;
    }
    app.metrics.adapters_loaded.set(adapters.len() as i64);
    app.metrics
        .adapter_operations
        .with_label_values(&["unload", "success"])
        .inc();
    tracing::info!(adapter = %name, "adapter unloaded");
    Json(json!({"name": name, "status": "unloaded", "changed": true})).into_response()
}

/// The model ids an engine's `/v1/models` answer lists. Pure.
pub fn listed_models(body: &[u8]) -> Option<std::collections::BTreeSet<String>> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    Some(
        v.get("data")?
            .as_array()?
            .iter()
            .filter_map(|m| m.get("id").and_then(serde_json::Value::as_str))
            .map(str::to_string)
            .collect(),
    )
}

/// Keeps the engine's adapters in line with what was loaded through the
/// adapter API: an engine that restarted inside the pod (its process alone)
/// has lost them, so every `every` the engine's `/v1/models` is read and
/// what is missing there is loaded again from the same path. Only for
/// engines that list their adapters there (vLLM and Custom).
pub async fn keep_adapters(app: Arc<App>, every: Duration) {
    let Some((load_path, _)) = app.config.engine.adapter_paths() else {
        return;
    };
    if !matches!(
        app.config.engine,
        crate::engine::EngineKind::Vllm | crate::engine::EngineKind::Custom
    ) {
        return;
    }
    loop {
        tokio::time::sleep(every).await;
        if !app.engine_ready.load(Ordering::Relaxed) || app.adapters.read().await.is_empty() {
            continue;
        }
        let listed = match app
            .call(Method::GET, "/v1/models", None, Duration::from_secs(5))
            .await
        {
            Ok((s, body)) if s.is_success() => listed_models(&body),
            _ => None,
        };
        let Some(listed) = listed else {
            continue;
        };
        // Hold the adapter API while reloading: no load or unload meanwhile.
        let adapters = app.adapters.write().await;
        let paths = app
            .adapter_paths
            .lock()
            .map(|p| p.clone())
            .unwrap_or_default();
        for name in adapters.keys().filter(|n| !listed.contains(*n)) {
            let Some(path) = paths.get(name) else {
                continue;
            };
            tracing::warn!(adapter = %name, "the engine lost the adapter (restarted?); loading it again");
            let body = json!({"lora_name": name, "lora_path": path}).to_string();
            let result = match app
                .call(
                    Method::POST,
                    load_path,
                    Some(Bytes::from(body)),
                    Duration::from_secs(300),
                )
                .await
            {
                Ok((status, text))
                    if status.is_success()
                        || String::from_utf8_lossy(&text).contains("has already been loaded") =>
                {
                    "success"
                }
                Ok((status, text)) => {
                    tracing::warn!(adapter = %name, %status, "reloading: {}", String::from_utf8_lossy(&text));
                    "engine_error"
                }
                Err(e) => {
                    tracing::warn!(adapter = %name, "reloading: {e}");
                    "engine_error"
                }
            };
            if result == "success"
                && let Ok(mut reloads) = app.adapter_reloads.lock()
            {
                let at = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or_default();
                let entry = reloads.entry(name.clone()).or_default();
                *entry = (entry.0.saturating_add(1), at);
            }
            app.metrics
                .adapter_operations
                .with_label_values(&["reload", result])
                .inc();
        }
    }
}

/// Polls the engine's health endpoint: readiness follows it.
pub async fn watch_engine_health(app: Arc<App>, every: Duration) {
    let mut was = None;
    loop {
        let ok = matches!(
            app.call(Method::GET, &app.config.health_path, None, Duration::from_secs(2)).await,
            Ok((s, _)) if s.is_success()
        );
        app.engine_ready.store(ok, Ordering::Relaxed);
        app.metrics.engine_up.set(i64::from(ok));
        if was != Some(ok) {
            tracing::info!(engine_ready = ok, "engine health changed");
            was = Some(ok);
        }
        tokio::time::sleep(every).await;
    }
}

/// Scrapes the engine's metrics for queue depth, running requests and KV-cache use,
/// and republishes its LoRA and cache-configuration info series (one each).
/// A missing or malformed endpoint reads as unknown (`strata_engine_metrics_up 0`).
pub async fn scrape_engine(app: Arc<App>, every: Duration) {
    // What is published now of the engine's info metrics.
    let mut lora_shown: Option<LoraInfo> = None;
    let mut cache_shown: Option<CacheInfo> = None;
    loop {
        let mut lora = None;
        let mut cache = None;
        let stats = match app
            .call(
                Method::GET,
                &app.config.metrics_path,
                None,
                Duration::from_secs(3),
            )
            .await
        {
            Ok((s, body)) if s.is_success() => {
                let samples = promtext::parse(&String::from_utf8_lossy(&body));
                lora = crate::engine::lora_info(&samples);
                cache = crate::engine::cache_info(&samples);
                let (stats, rejected) = app.config.engine.raw_stats(&samples).sanitized();
                for why in rejected {
                    app.metrics
                        .engine_metrics_rejected
                        .with_label_values(&[why])
                        .inc();
                }
                Some(stats)
            }
            _ => None,
        };
        let m = &app.metrics;
        match stats {
            Some(s) if s.queue.is_some() || s.running.is_some() || s.kv_cache.is_some() => {
                m.engine_metrics_up.set(1);
                m.engine_queue.set(s.queue.unwrap_or(f64::NAN));
                m.engine_running.set(s.running.unwrap_or(f64::NAN));
                m.engine_kv_cache.set(s.kv_cache.unwrap_or(f64::NAN));
            }
            _ => {
                m.engine_metrics_up.set(0);
                m.engine_queue.set(f64::NAN);
                m.engine_running.set(f64::NAN);
                m.engine_kv_cache.set(f64::NAN);
            }
        }
        replace_series(
            &m.engine_lora_info,
            lora_shown.as_ref().map(|i| i.labels().to_vec()),
            lora.as_ref().map(|l| (l.labels().to_vec(), l.at)),
        );
        lora_shown = lora;
        replace_series(
            &m.engine_cache_info,
            cache_shown.as_ref().map(|i| i.labels().to_vec()),
            cache.as_ref().map(|c| (c.labels().to_vec(), 1.0)),
        );
        cache_shown = cache;
        tokio::time::sleep(every).await;
    }
}

/// Publishes in `gauge` the one series `now` (label values and value) in
/// place of the series `shown` (the new one is set before the old one
/// goes, so that a scrape in between never finds none); none when `now` is
/// None (the engine publishes nothing of the kind, or could not be read).
fn replace_series(gauge: &GaugeVec, shown: Option<Vec<&str>>, now: Option<(Vec<&str>, f64)>) {
    if let Some((labels, value)) = &now {
        gauge.with_label_values(labels).set(*value);
    }
    if let Some(shown) = shown
        && now.is_none_or(|(labels, _)| labels != shown)
    {
        let _ = gauge.remove_label_values(&shown);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_lora_series_is_published_the_engines_latest() {
        let m = crate::metrics::Metrics::new().expect("metrics");
        let info = |running: &str, at: f64| LoraInfo {
            max_lora: "4".into(),
            running: running.into(),
            waiting: String::new(),
            at,
        };
        let series = |m: &crate::metrics::Metrics| {
            let text = m.render();
            text.lines()
                .filter(|l| l.starts_with("strata_engine_lora_requests_info{"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        let show = |shown: Option<&LoraInfo>, now: Option<&LoraInfo>| {
            replace_series(
                &m.engine_lora_info,
                shown.map(|l| l.labels().to_vec()),
                now.map(|n| (n.labels().to_vec(), n.at)),
            )
        };
        let (a, b) = (info("sql", 1.0e9), info("chat", 2.0e9));
        show(None, Some(&a));
        assert_eq!(
            series(&m),
            [
                "strata_engine_lora_requests_info{max_lora=\"4\",running_lora_adapters=\"sql\",waiting_lora_adapters=\"\"} 1000000000"
            ]
        );
        // Other lists: the new series replaces the old one.
        show(Some(&a), Some(&b));
        assert_eq!(series(&m).len(), 1);
        assert!(series(&m)[0].contains("running_lora_adapters=\"chat\""));
        // The same lists seen again: its time moves.
        show(Some(&b), Some(&info("chat", 3.0e9)));
        assert!(series(&m)[0].ends_with(" 3000000000"), "{:?}", series(&m));
        // The engine's metrics unreadable: none.
        show(Some(&b), None);
        assert!(series(&m).is_empty());
    }

    #[test]
    fn reads_the_ids_an_engine_lists() {
        let body = br#"{"object":"list","data":[{"id":"llama","object":"model"},{"id":"sql","root":"/a","parent":"llama"}]}"#;
        let ids = listed_models(body).expect("a list");
        assert_eq!(ids.into_iter().collect::<Vec<_>>(), ["llama", "sql"]);
        assert_eq!(listed_models(b"<html>"), None);
        assert_eq!(listed_models(br#"{"data": 3}"#), None);
    }
}
