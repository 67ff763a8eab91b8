//! Fetching an adapter's weights with its own credentials. An engine takes
//! one set of hub credentials for its whole process (`HF_TOKEN` in its
//! environment), so an Adapter whose source needs credentials of its own is
//! downloaded here, into a directory the engine shares (`--adapter-dir`, an
//! emptyDir), and the engine loads it from that path.
//!
//! Supported: `hf://<org>/<repo>[@<revision>]` from the Hugging Face hub (or
//! `HF_ENDPOINT`), with the `HF_TOKEN` credential as a bearer token; the
//! files `adapter_config.json` and `adapter_model.safetensors` (or
//! `adapter_model.bin`). Redirects (the hub sends large files to its CDN) are
//! followed without the token when they leave the hub's host.

use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Empty};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::AsyncWriteExt;

/// Why an adapter could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The source is not an `hf://` reference this fetcher understands.
    #[error(
        "cannot fetch {0}: only hf://<org>/<repo>[@<revision>] sources are fetched with credentials"
    )]
    Unsupported(String),
    /// No TLS roots for https.
    #[error("no TLS client: {0}")]
    Tls(String),
    /// The hub answered an error.
    #[error("{url}: HTTP {status}{hint}")]
    Status {
        /// What was asked.
        url: String,
        /// The answer.
        status: u16,
        /// For people (e.g. the token is refused).
        hint: &'static str,
    },
    /// No answer, or a broken one.
    #[error("{url}: {message}")]
    Transport {
        /// What was asked.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// Writing the files failed.
    #[error("writing {path}: {source}")]
    Io {
        /// Where.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// `hf://org/repo[@rev]` to (`org/repo`, revision; default `main`).
pub fn parse_hf(source: &str) -> Option<(String, String)> {
    let rest = source.strip_prefix("hf://")?;
    let (repo, rev) = match rest.split_once('@') {
        Some((r, v)) if !v.is_empty() => (r, v),
        Some(_) => return None,
        None => (rest, "main"),
    };
    let (org, name) = repo.split_once('/')?;
    let ok = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    (ok(org) && ok(name) && !rev.contains("..")).then(|| (repo.to_string(), rev.to_string()))
}

/// The directory an adapter lives in under `root` (its name, made safe).
pub fn adapter_path(root: &Path, name: &str) -> PathBuf {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    root.join(safe.trim_start_matches('.'))
}

/// The hub client (http or https), or why there is none.
type HubClient = Result<Client<HttpsConnector<HttpConnector>, Empty<Bytes>>, String>;

static CLIENT: LazyLock<HubClient> = LazyLock::new(|| {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_native_roots(rustls::crypto::ring::default_provider())
        .map_err(|e| format!("loading the system's CA certificates: {e}"))?
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new()).build(https))
});

async fn download(url: &str, token: Option<&str>, dest: &Path) -> Result<bool, FetchError> {
    let client = CLIENT.as_ref().map_err(|e| FetchError::Tls(e.clone()))?;
    let origin = url
        .parse::<http::Uri>()
        .ok()
        .and_then(|u| u.authority().map(|a| a.to_string()));
    let mut current = url.to_string();
    for _ in 0..5 {
        let uri: http::Uri = current.parse().map_err(|e| FetchError::Transport {
            url: current.clone(),
            message: format!("bad URL: {e}"),
        })?;
        let same_host = uri.authority().map(|a| a.to_string()) == origin;
        let mut req = http::Request::get(uri.clone());
        if let (Some(t), true) = (token, same_host) {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req
            .body(Empty::<Bytes>::new())
            .map_err(|e| FetchError::Transport {
                url: current.clone(),
                message: e.to_string(),
            })?;
        let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
            .await
            .map_err(|_| FetchError::Transport {
                url: current.clone(),
                message: "no answer within 30 s".into(),
            })?
            .map_err(|e| FetchError::Transport {
                url: current.clone(),
                message: e.to_string(),
            })?;
        let status = resp.status();
        if status.is_redirection() {
            let Some(next) = resp
                .headers()
                .get(http::header::LOCATION)
                .and_then(|l| l.to_str().ok())
            else {
                break;
            };
            current = if next.starts_with('/') {
                format!(
                    "{}://{}{next}",
                    uri.scheme_str().unwrap_or("https"),
                    uri.authority().map(|a| a.as_str()).unwrap_or_default()
                )
            } else {
                next.to_string()
            };
            continue;
        }
        if status == http::StatusCode::NOT_FOUND {
            return Ok(false);
        }
        if !status.is_success() {
            return Err(FetchError::Status {
                url: current,
                status: status.as_u16(),
                hint: match status.as_u16() {
                    401 | 403 => {
                        " (the credentials are missing or refused: check HF_TOKEN in the Adapter's credentials Secret)"
                    }
                    _ => "",
                },
            });
        }
        let io = |source| FetchError::Io {
            path: dest.display().to_string(),
            source,
        };
        let mut file = tokio::fs::File::create(dest).await.map_err(io)?;
        let mut body = resp.into_body().into_data_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| FetchError::Transport {
                url: current.clone(),
                message: e.to_string(),
            })?;
            file.write_all(&chunk).await.map_err(io)?;
        }
        file.flush().await.map_err(io)?;
        return Ok(true);
    }
    Err(FetchError::Transport {
        url: url.to_string(),
        message: "too many redirects".into(),
    })
}

/// Fetches the adapter `name` from `source` into `root/<name>` (atomically:
/// a temporary directory renamed when complete) and returns that path.
pub async fn fetch_hf(
    endpoint: &str,
    source: &str,
    token: Option<&str>,
    root: &Path,
    name: &str,
) -> Result<PathBuf, FetchError> {
    let (repo, rev) = parse_hf(source).ok_or_else(|| FetchError::Unsupported(source.into()))?;
    let dest = adapter_path(root, name);
    let tmp = root.join(format!(
        ".{}.partial",
        dest.file_name()
            .map_or_else(String::new, |f| f.to_string_lossy().into_owned())
    ));
    let io = |p: &Path| {
        let p = p.display().to_string();
        move |source| FetchError::Io { path: p, source }
    };
    let _ = tokio::fs::remove_dir_all(&tmp).await;
    tokio::fs::create_dir_all(&tmp).await.map_err(io(&tmp))?;
    let base = endpoint.trim_end_matches('/');
    let url = |file: &str| format!("{base}/{repo}/resolve/{rev}/{file}");
    let config = url("adapter_config.json");
    if !download(&config, token, &tmp.join("adapter_config.json")).await? {
        return Err(FetchError::Status {
            url: config,
            status: 404,
            hint: " (no adapter_config.json: is this a LoRA adapter repository?)",
        });
    }
    if !download(
        &url("adapter_model.safetensors"),
        token,
        &tmp.join("adapter_model.safetensors"),
    )
    .await?
        && !download(
            &url("adapter_model.bin"),
            token,
            &tmp.join("adapter_model.bin"),
        )
        .await?
    {
        return Err(FetchError::Status {
            url: url("adapter_model.safetensors"),
            status: 404,
            hint: " (neither adapter_model.safetensors nor adapter_model.bin)",
        });
    }
    let _ = tokio::fs::remove_dir_all(&dest).await;
    tokio::fs::rename(&tmp, &dest).await.map_err(io(&dest))?;
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_sources() {
        assert_eq!(
            parse_hf("hf://acme/sql-lora"),
            Some(("acme/sql-lora".into(), "main".into()))
        );
        assert_eq!(
            parse_hf("hf://acme/sql-lora@v2"),
            Some(("acme/sql-lora".into(), "v2".into()))
        );
        assert_eq!(parse_hf("hf://acme"), None);
        assert_eq!(parse_hf("hf://acme/x@"), None);
        assert_eq!(parse_hf("hf://../x"), None);
        assert_eq!(parse_hf("s3://bucket/x"), None);
    }

    #[test]
    fn adapter_paths_stay_under_the_root() {
        let root = Path::new("/adapters");
        assert_eq!(adapter_path(root, "sql"), Path::new("/adapters/sql"));
        assert_eq!(adapter_path(root, "../etc"), Path::new("/adapters/_etc"));
        assert_eq!(adapter_path(root, "a/b:c"), Path::new("/adapters/a_b_c"));
    }
}
