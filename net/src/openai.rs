//! The OpenAI inference API as a default-deny allowlist: the only paths a
//! model's clients may reach through the sidecar's API port and the
//! activator. Everything else (engine admin paths such as adapter loading,
//! cache flushes, weight updates, profiling, sleep) is answered 404 before
//! it reaches the engine. Pure: no I/O.
//!
//! The path forwarded upstream is rebuilt from the table, never copied from
//! the client, so encodings, dot segments and doubled slashes cannot smuggle
//! another path through.

use http::{Method, StatusCode};
use serde_json::{Value, json};

/// An endpoint of the allowlist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/completions`.
    Completions,
    /// `POST /v1/embeddings`.
    Embeddings,
    /// `GET /v1/models`.
    Models,
    /// `GET /v1/models/{model}` (ids may contain `/`, e.g. `org/name`).
    Model,
}

impl Endpoint {
    /// The label used in metrics (`chat`, `completions`, ...).
    pub fn label(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Completions => "completions",
            Self::Embeddings => "embeddings",
            Self::Models => "models",
            Self::Model => "model",
        }
    }

    /// The method the endpoint takes.
    pub fn method(self) -> Method {
        match self {
            Self::Chat | Self::Completions | Self::Embeddings => Method::POST,
            Self::Models | Self::Model => Method::GET,
        }
    }

    /// Whether the request carries a JSON body the proxy reads.
    pub fn has_body(self) -> bool {
        self.method() == Method::POST
    }

    /// Whether the endpoint can stream (SSE).
    pub fn streams(self) -> bool {
        matches!(self, Self::Chat | Self::Completions)
    }
}

/// The allowed paths, as documented in docs/sidecar.md.
pub const ALLOWED: [(&str, Endpoint); 5] = [
    ("/v1/chat/completions", Endpoint::Chat),
    ("/v1/completions", Endpoint::Completions),
    ("/v1/embeddings", Endpoint::Embeddings),
    ("/v1/models", Endpoint::Models),
    ("/v1/models/{model}", Endpoint::Model),
];

/// What to do with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Forward to `upstream` (path and query, rebuilt from the table).
    Forward {
        /// The endpoint.
        endpoint: Endpoint,
        /// Path and query to send to the engine.
        upstream: String,
    },
    /// A known path with another method: 405.
    MethodNotAllowed {
        /// The endpoint whose method differs.
        endpoint: Endpoint,
    },
    /// Not part of the inference API: 404.
    NotFound,
}

/// Longest model id accepted in `/v1/models/{model}`.
const MAX_MODEL_ID: usize = 256;

/// Whether a model id is safe to put back into a path: printable ASCII
/// letters, digits and `-._:/@`, no empty or dot segment, no `%`.
fn safe_model_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_MODEL_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:/@".contains(&b))
        && id
            .split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
}

/// A query string is forwarded only when it is short and plain.
fn safe_query(q: &str) -> bool {
    q.len() <= 1024
        && q.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'#' && b != b'\\')
}

/// Routes a request by method, path and query.
pub fn route(method: &Method, path: &str, query: Option<&str>) -> Route {
    let query = match query {
        None | Some("") => String::new(),
        Some(q) if safe_query(q) => format!("?{q}"),
        Some(_) => return Route::NotFound,
    };
    let found = match path {
        "/v1/chat/completions" => Some((Endpoint::Chat, path.to_string())),
        "/v1/completions" => Some((Endpoint::Completions, path.to_string())),
        "/v1/embeddings" => Some((Endpoint::Embeddings, path.to_string())),
        "/v1/models" => Some((Endpoint::Models, path.to_string())),
        _ => path
            .strip_prefix("/v1/models/")
            .filter(|id| safe_model_id(id))
            .map(|id| (Endpoint::Model, format!("/v1/models/{id}"))),
    };
    match found {
        None => Route::NotFound,
        Some((endpoint, _)) if *method != endpoint.method() => Route::MethodNotAllowed { endpoint },
        Some((endpoint, p)) => Route::Forward {
            endpoint,
            upstream: format!("{p}{query}"),
        },
    }
}

/// An OpenAI-shaped error body.
pub fn error_body(status: StatusCode, kind: &str, message: &str) -> Value {
    json!({"error": {"message": message, "type": kind, "code": status.as_u16()}})
}

/// The error for a path outside the allowlist.
pub fn not_found_body(path: &str) -> Value {
    let shown: String = path.chars().take(128).collect();
    error_body(
        StatusCode::NOT_FOUND,
        "NotFoundError",
        &format!(
            "{shown:?} is not part of the inference API served here (POST /v1/chat/completions, /v1/completions, /v1/embeddings; GET /v1/models, /v1/models/<id>)"
        ),
    )
}

/// Engine paths that must never be reachable from a model's clients: the
/// admin, debugging and non-OpenAI endpoints of vLLM, SGLang, TGI and
/// llama.cpp's llama-server (engine, path). Tests walk every one of them
/// through the sidecar and the activator.
pub const ENGINE_ADMIN_PATHS: &[(&str, &str)] = &[
    ("vLLM", "/v1/load_lora_adapter"),
    ("vLLM", "/v1/unload_lora_adapter"),
    ("vLLM", "/sleep"),
    ("vLLM", "/wake_up"),
    ("vLLM", "/is_sleeping"),
    ("vLLM", "/reset_prefix_cache"),
    ("vLLM", "/reset_mm_cache"),
    ("vLLM", "/collective_rpc"),
    ("vLLM", "/start_profile"),
    ("vLLM", "/stop_profile"),
    ("vLLM", "/scale_elastic_ep"),
    ("vLLM", "/is_scaling_elastic_ep"),
    ("vLLM", "/pause"),
    ("vLLM", "/resume"),
    ("vLLM", "/server_info"),
    ("vLLM", "/update_weights"),
    ("vLLM", "/metrics"),
    ("vLLM", "/health"),
    ("vLLM", "/load"),
    ("vLLM", "/ping"),
    ("vLLM", "/version"),
    ("vLLM", "/tokenize"),
    ("vLLM", "/detokenize"),
    ("vLLM", "/invocations"),
    ("vLLM", "/docs"),
    ("vLLM", "/openapi.json"),
    ("vLLM", "/v1/responses"),
    ("vLLM", "/v1/audio/transcriptions"),
    ("vLLM", "/pooling"),
    ("vLLM", "/classify"),
    ("vLLM", "/score"),
    ("vLLM", "/rerank"),
    ("SGLang", "/load_lora_adapter"),
    ("SGLang", "/unload_lora_adapter"),
    ("SGLang", "/flush_cache"),
    ("SGLang", "/update_weights_from_disk"),
    ("SGLang", "/update_weights_from_distributed"),
    ("SGLang", "/update_weights_from_tensor"),
    ("SGLang", "/init_weights_update_group"),
    ("SGLang", "/release_memory_occupation"),
    ("SGLang", "/resume_memory_occupation"),
    ("SGLang", "/start_profile"),
    ("SGLang", "/stop_profile"),
    ("SGLang", "/configure_logging"),
    ("SGLang", "/abort_request"),
    ("SGLang", "/set_internal_state"),
    ("SGLang", "/get_server_info"),
    ("SGLang", "/get_model_info"),
    ("SGLang", "/slow_down"),
    ("SGLang", "/open_session"),
    ("SGLang", "/close_session"),
    ("SGLang", "/start_expert_distribution_record"),
    ("SGLang", "/generate"),
    ("TGI", "/generate"),
    ("TGI", "/generate_stream"),
    ("TGI", "/info"),
    ("TGI", "/tokenize"),
    ("TGI", "/metrics"),
    ("TGI", "/health"),
    ("llama.cpp", "/slots"),
    ("llama.cpp", "/slots/0?action=erase"),
    ("llama.cpp", "/slots/0?action=save"),
    ("llama.cpp", "/props"),
    ("llama.cpp", "/lora-adapters"),
    ("llama.cpp", "/completion"),
    ("llama.cpp", "/infill"),
    ("llama.cpp", "/embedding"),
    ("llama.cpp", "/apply-template"),
    ("llama.cpp", "/metrics"),
    // Smuggling attempts: each names an admin path through an allowed one.
    ("smuggling", "/v1/chat/completions/../load_lora_adapter"),
    (
        "smuggling",
        "/v1/chat/completions/../../v1/load_lora_adapter",
    ),
    ("smuggling", "//v1/load_lora_adapter"),
    ("smuggling", "/v1/%6Coad_lora_adapter"),
    ("smuggling", "/v1/models/../load_lora_adapter"),
    ("smuggling", "/v1/models/%2e%2e/load_lora_adapter"),
    ("smuggling", "/V1/CHAT/COMPLETIONS"),
    ("smuggling", "/v1/chat/completions/"),
    ("smuggling", "/v1/chat/completions%00"),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn split(p: &str) -> (&str, Option<&str>) {
        match p.split_once('?') {
            Some((a, b)) => (a, Some(b)),
            None => (p, None),
        }
    }

    #[test]
    fn the_inference_api_is_forwarded_with_its_own_path() {
        let cases = [
            (
                Method::POST,
                "/v1/chat/completions",
                None,
                "/v1/chat/completions",
            ),
            (Method::POST, "/v1/completions", None, "/v1/completions"),
            (Method::POST, "/v1/embeddings", None, "/v1/embeddings"),
            (Method::GET, "/v1/models", None, "/v1/models"),
            (
                Method::GET,
                "/v1/models",
                Some("limit=5"),
                "/v1/models?limit=5",
            ),
            (
                Method::GET,
                "/v1/models/meta-llama/Llama-3.1-8B",
                None,
                "/v1/models/meta-llama/Llama-3.1-8B",
            ),
        ];
        for (m, p, q, want) in cases {
            match route(&m, p, q) {
                Route::Forward { upstream, .. } => assert_eq!(upstream, want),
                other => panic!("{m} {p}: {other:?}"),
            }
        }
    }

    #[test]
    fn every_known_admin_path_is_refused_with_any_method() {
        for (engine, path) in ENGINE_ADMIN_PATHS {
            let (p, q) = split(path);
            for m in [Method::GET, Method::POST, Method::PUT, Method::DELETE] {
                let r = route(&m, p, q);
                assert!(matches!(r, Route::NotFound), "{engine} {m} {path}: {r:?}");
            }
        }
    }

    #[test]
    fn wrong_methods_and_unsafe_ids_and_queries() {
        assert_eq!(
            route(&Method::GET, "/v1/chat/completions", None),
            Route::MethodNotAllowed {
                endpoint: Endpoint::Chat
            }
        );
        assert_eq!(
            route(&Method::DELETE, "/v1/models/x", None),
            Route::MethodNotAllowed {
                endpoint: Endpoint::Model
            }
        );
        for id in [
            "",
            "a//b",
            "a/./b",
            "../x",
            "a%2fb",
            "a b",
            &"x".repeat(300),
        ] {
            assert_eq!(
                route(&Method::GET, &format!("/v1/models/{id}"), None),
                Route::NotFound,
                "{id}"
            );
        }
        assert_eq!(
            route(&Method::GET, "/v1/models", Some("a=b c")),
            Route::NotFound
        );
        assert_eq!(
            route(&Method::GET, "/v1/models", Some(&"a".repeat(2000))),
            Route::NotFound
        );
    }
}
