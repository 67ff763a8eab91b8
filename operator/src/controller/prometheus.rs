//! The autoscaler's Prometheus metrics source, thin shell: runs the queries
//! of [`strata_core::promql`] against a Prometheus HTTP API (`GET
//! /api/v1/query`), in parallel, each with a timeout.
//!
//! `http://` URLs are queried in the clear. `https://` URLs are verified
//! against the system's CA certificates (rustls-native-certs: the OS store,
//! or the PEM file in `SSL_CERT_FILE` / the directories in `SSL_CERT_DIR`
//! of the operator's environment); a query to an endpoint configured in
//! `--prometheus-auth-file` carries its bearer token or basic-auth
//! credentials ([`crate::prometheus_auth`]); there are no client
//! certificates.

use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connect, HttpConnector};
use hyper_util::rt::TokioExecutor;

use strata_core::promql::{self, Readings, Signal};

/// How long one query may take.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// The most of an answer that is read (results here are a few hundred bytes).
const MAX_BODY: usize = 1 << 20;

/// Why Prometheus gave no readings.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// spec.autoscaling.metrics.prometheus.url is not usable.
    #[error("Prometheus URL {url:?}: {reason}")]
    Url {
        /// The URL.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// https was asked for and no TLS client could be built.
    #[error("https Prometheus URL: no TLS client: {0}")]
    Tls(String),
    /// Prometheus answered, and the answer is an error or unreadable.
    #[error("{signal} query: {source}")]
    Query {
        /// Which query.
        signal: &'static str,
        /// What Prometheus said, or what was wrong with the answer.
        #[source]
        source: promql::Error,
    },
    /// An HTTP error status without an API answer (a proxy in between, ...).
    #[error("{signal} query: HTTP {status} from Prometheus: {body}")]
    Status {
        /// Which query.
        signal: &'static str,
        /// The status code.
        status: u16,
        /// The start of the body.
        body: String,
    },
    /// No answer: connection refused, DNS, TLS handshake, reset, ...
    #[error("{signal} query: {message}")]
    Unreachable {
        /// Which query.
        signal: &'static str,
        /// The transport error.
        message: String,
    },
    /// The configured credentials of its endpoint could not be read.
    #[error("{signal} query: {source}")]
    Credentials {
        /// Which query.
        signal: &'static str,
        /// Why.
        #[source]
        source: crate::prometheus_auth::CredentialsError,
    },
    /// No answer within [`QUERY_TIMEOUT`].
    #[error("{signal} query: no answer within {timeout:?}")]
    Timeout {
        /// Which query.
        signal: &'static str,
        /// The limit.
        timeout: Duration,
    },
}

fn http_connector() -> HttpConnector {
    let mut c = HttpConnector::new();
    c.set_connect_timeout(Some(Duration::from_secs(1)));
    c
}

static HTTP: LazyLock<Client<HttpConnector, Empty<Bytes>>> =
    LazyLock::new(|| Client::builder(TokioExecutor::new()).build(http_connector()));

/// The https client, or why there is none.
type HttpsClient = Result<Client<HttpsConnector<HttpConnector>, Empty<Bytes>>, String>;

static HTTPS: LazyLock<HttpsClient> = LazyLock::new(|| {
    let mut http = http_connector();
    http.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_native_roots(rustls::crypto::ring::default_provider())
        .map_err(|e| format!("loading the system's CA certificates: {e}"))?
        .https_only()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new()).build(connector))
});

/// `<base>/api/v1/query?query=<promql>`, checked.
pub fn query_uri(base: &str, promql: &str) -> Result<http::Uri, Error> {
    let bad = |reason: &str| Error::Url {
        url: base.to_string(),
        reason: reason.to_string(),
    };
    let parsed: http::Uri = base.parse().map_err(|e| bad(&format!("{e}")))?;
    match parsed.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(bad("not an http:// or https:// URL")),
    }
    if parsed.host().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    if parsed.query().is_some() || base.contains('#') {
        return Err(bad(
            "a query string or fragment cannot be combined with the API path",
        ));
    }
    let query = form_urlencoded::Serializer::new(String::new())
        .append_pair("query", promql)
        .finish();
    format!("{}/api/v1/query?{query}", base.trim_end_matches('/'))
        .parse()
        .map_err(|e| bad(&format!("{e}")))
}

async fn fetch_with<C>(
    client: &Client<C, Empty<Bytes>>,
    name: &'static str,
    uri: http::Uri,
    max_body: usize,
    timeout: Duration,
) -> Result<(http::StatusCode, Bytes), Error>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    let mut request = http::Request::get(uri.clone());
    if let Some(auth) =
        crate::prometheus_auth::header_for(&uri).map_err(|source| Error::Credentials {
            signal: name,
            source,
        })?
    {
        request = request.header(http::header::AUTHORIZATION, auth);
    }
    let request = request.body(Empty::new()).map_err(|e| Error::Url {
        url: uri.to_string(),
        reason: e.to_string(),
    })?;
    let fetch = async {
        let resp = client
            .request(request)
            .await
            .map_err(|e| Error::Unreachable {
                signal: name,
                message: error_chain(&e),
            })?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), max_body)
            .collect()
            .await
            .map_err(|e| Error::Unreachable {
                signal: name,
                message: format!("reading the answer: {e}"),
            })?
            .to_bytes();
        Ok::<_, Error>((status, body))
    };
    tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| Error::Timeout {
            signal: name,
            timeout,
        })?
}

/// GETs `uri` (https verified against the system's CAs, http in the clear),
/// reading at most `max_body` bytes within `timeout`: the status and body.
/// `name` says what was asked, in errors.
pub async fn fetch(
    uri: http::Uri,
    name: &'static str,
    max_body: usize,
    timeout: Duration,
) -> Result<(http::StatusCode, Bytes), Error> {
    if uri.scheme_str() == Some("https") {
        match &*HTTPS {
            Ok(client) => fetch_with(client, name, uri, max_body, timeout).await,
            Err(e) => Err(Error::Tls(e.clone())),
        }
    } else {
        fetch_with(&HTTP, name, uri, max_body, timeout).await
    }
}

async fn get(name: &'static str, uri: http::Uri) -> Result<Option<f64>, Error> {
    let (status, body) = fetch(uri, name, MAX_BODY, QUERY_TIMEOUT).await?;
    // Prometheus answers API errors (400 bad_data, 422 execution, 503
    // timeout) with a JSON body that says why; prefer it.
    match promql::parse_value(&body) {
        Err(promql::Error::Malformed(_)) if !status.is_success() => Err(Error::Status {
            signal: name,
            status: status.as_u16(),
            body: String::from_utf8_lossy(&body).chars().take(200).collect(),
        }),
        r => r.map_err(|source| Error::Query {
            signal: name,
            source,
        }),
    }
}

/// "error: cause: cause", as hyper's errors say little at the top.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Runs one instant query whose result is at most one series (`name` for
/// errors): None for an empty result.
pub async fn query(url: &str, name: &'static str, promql: &str) -> Result<Option<f64>, Error> {
    let uri = query_uri(url, promql)?;
    get(name, uri).await
}

/// Asks the Prometheus at `url` about the replicas `pods` in `namespace`:
/// percentiles (`quantile`, 0..1) and rates over `window` seconds, arrivals
/// and throughput over `interval` seconds. Without pods nothing is asked
/// and nothing is known. Any failed query fails the whole (the autoscaler
/// then holds); the queries run in parallel, each within [`QUERY_TIMEOUT`].
pub async fn observe(
    url: &str,
    namespace: &str,
    pods: &[impl AsRef<str>],
    window: f64,
    interval: f64,
    quantile: f64,
) -> Result<Readings, Error> {
    // Checked even without pods, so that a bad URL shows at once.
    query_uri(url, "up")?;
    if url.starts_with("https://") {
        HTTPS.as_ref().map_err(|e| Error::Tls(e.clone()))?;
    }
    let Some(sel) = promql::selector(namespace, pods) else {
        return Ok(Readings::default());
    };
    let queries = promql::queries(&sel, window, interval, quantile);
    let answers = futures::future::try_join_all(queries.into_iter().map(|q| async move {
        let value = query(url, q.signal.as_str(), &q.promql).await?;
        Ok::<_, Error>((q.signal, value))
    }))
    .await?;
    let values: BTreeMap<Signal, Option<f64>> = answers.into_iter().collect();
    Ok(Readings::from_values(&values, interval))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_uris() {
        let uri = query_uri(
            "http://prometheus.monitoring:9090/",
            r#"sum(rate(x{pod=~"a|b"}[60s]))"#,
        )
        .expect("uri");
        assert_eq!(
            uri.to_string(),
            "http://prometheus.monitoring:9090/api/v1/query?query=sum%28rate%28x%7Bpod%3D%7E%22a%7Cb%22%7D%5B60s%5D%29%29"
        );
        let prefixed = query_uri("https://example.com/prometheus", "up").expect("uri");
        assert_eq!(
            prefixed.to_string(),
            "https://example.com/prometheus/api/v1/query?query=up"
        );
        for bad in [
            "prometheus:9090",
            "ftp://example.com",
            "http://",
            "http://p:9090/?x=1",
            "http://exa mple.com",
        ] {
            assert!(
                matches!(query_uri(bad, "up"), Err(Error::Url { .. })),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn a_closed_port_is_an_error_not_a_hang() {
        // Bind, learn the port, close: nothing listens there now.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("port");
        let start = std::time::Instant::now();
        let err = observe(
            &format!("http://127.0.0.1:{port}"),
            "t",
            &["chat-a"],
            60.0,
            15.0,
            0.95,
        )
        .await
        .expect_err("nothing listens");
        assert!(matches!(err, Error::Unreachable { .. }), "{err}");
        assert!(start.elapsed() < QUERY_TIMEOUT * 2);
        // No pods: nothing to ask, nothing known.
        let none = observe(
            &format!("http://127.0.0.1:{port}"),
            "t",
            &[] as &[&str],
            60.0,
            15.0,
            0.95,
        )
        .await
        .expect("no pods");
        assert_eq!(none, Readings::default());
    }

    #[tokio::test]
    async fn the_autoscaler_holds_and_keeps_the_reason_when_prometheus_fails() {
        use k8s_openapi::api::core::v1::Pod;
        use strata_crds::model::{MetricsSource, MetricsSourceType, Model, PrometheusSource};

        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../samples/model-llama.yaml"
        ))
        .expect("sample");
        let mut model: Model =
            serde_json::from_value(strata_crds::validation::yaml_to_json(&text).expect("yaml"))
                .expect("model");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("port");
        model.spec.autoscaling.metrics = Some(MetricsSource {
            source_type: MetricsSourceType::Prometheus,
            prometheus: Some(PrometheusSource {
                url: format!("http://127.0.0.1:{port}"),
            }),
        });
        let pods: Vec<Pod> = ["llama-a", "llama-b"]
            .iter()
            .map(|name| {
                serde_json::from_value(serde_json::json!({
                    "metadata": {"name": name, "namespace": "default"},
                    "status": {"podIP": "127.0.0.1"},
                }))
                .expect("pod")
            })
            .collect();
        let ready: Vec<&Pod> = pods.iter().collect();
        let mut scaler = super::super::scale::ModelScaler::default();
        let (desired, evaluated) =
            super::super::scale::evaluate(&mut scaler, &model, &ready, 2).await;
        assert!(evaluated);
        assert_eq!(desired, 2, "held");
        let e = scaler.last.expect("an evaluation");
        assert_eq!(e.decision.reason, strata_core::autoscale::Reason::NoData);
        assert_eq!(e.observed, strata_core::collect::Observed::default());
        let why = e.error.expect("the reason is kept");
        assert!(
            why.contains("query") && why.contains("Connection refused"),
            "{why}"
        );
        assert!(e.decision.message.contains(&why), "{}", e.decision.message);
    }
}
