//! Credentials for the Prometheus servers the operator queries (a Model's
//! `spec.autoscaling.metrics.prometheus.url`, and `--dcgm-prometheus-url`).
//!
//! They are configured once for the operator, not per Model: a file
//! (`--prometheus-auth-file`, the chart mounts it from a Secret) lists
//! endpoints, each an `https://` URL with a bearer token, a bearer token
//! file (the operator's own ServiceAccount token, for a Prometheus behind
//! kube-rbac-proxy or OpenShift's Thanos querier) or basic-auth
//! credentials (a Prometheus with `basic_auth_users`, Grafana Mimir, ...):
//!
//! ```yaml
//! endpoints:
//!   - url: https://thanos-querier.openshift-monitoring.svc:9091
//!     bearerTokenFile: /var/run/secrets/kubernetes.io/serviceaccount/token
//!   - url: https://mimir.example.com/prometheus
//!     basicAuth: {username: tenant-1, password: s3cret}
//! ```
//!
//! A query gets an endpoint's credentials only when its URL is under that
//! endpoint's: same scheme, host and port, and a path that starts with the
//! endpoint's at a `/` (the longest such endpoint wins). Whoever may write a
//! Model chooses its Prometheus URL, so credentials bound to nothing would
//! go to any server a Model names; bound to their endpoint they go only
//! where the platform team sent them. `http://` endpoints are refused:
//! credentials never travel in clear. The file is read every
//! [`RELOAD_EVERY`] while queries are made and taken when its text changed
//! (a Secret volume is updated in place); a bearer token file is read again every
//! [`TOKEN_FILE_TTL`] (kubelet rotates projected ServiceAccount tokens).
//!
//! [`parse`] and [`Endpoints::matching`] are pure; [`install`] and
//! [`header_for`] are the process-wide shell the Prometheus client uses.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use base64::Engine as _;
use http::HeaderValue;
use serde::Deserialize;

/// How often the file's modification time is looked at.
pub const RELOAD_EVERY: Duration = Duration::from_secs(10);
/// How long a bearer token read from a file is used before it is read again.
pub const TOKEN_FILE_TTL: Duration = Duration::from_secs(60);
/// The largest credentials file or token file read.
const MAX_FILE: u64 = 1 << 20;

/// What is wrong with the credentials file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// It could not be read.
    #[error("reading {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// It is not the expected YAML.
    #[error(
        "not a Prometheus credentials file (`endpoints:` with url and one of bearerToken, bearerTokenFile, basicAuth): {0}"
    )]
    Format(String),
    /// One endpoint is not usable.
    #[error("endpoints[{index}] ({url:?}): {reason}")]
    Endpoint {
        /// Its position in the list.
        index: usize,
        /// Its URL as written.
        url: String,
        /// What is wrong.
        reason: String,
    },
}

/// Why a query could not be given its credentials.
#[derive(Debug, thiserror::Error)]
#[error("the bearer token file {path} of Prometheus endpoint {url}: {reason}")]
pub struct CredentialsError {
    /// The endpoint.
    pub url: String,
    /// The token file.
    pub path: String,
    /// Why it gave no token.
    pub reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSpec {
    endpoints: Vec<EndpointSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct EndpointSpec {
    url: String,
    #[serde(default)]
    bearer_token: Option<String>,
    #[serde(default)]
    bearer_token_file: Option<PathBuf>,
    #[serde(default)]
    basic_auth: Option<BasicSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BasicSpec {
    username: String,
    password: String,
}

/// How an endpoint is authenticated to.
#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    /// `Authorization: Bearer <token>`.
    Bearer(String),
    /// A bearer token read from a file.
    BearerFile(PathBuf),
    /// `Authorization: Basic <base64(username:password)>`.
    Basic {
        /// The user.
        username: String,
        /// The password.
        password: String,
    },
}

impl std::fmt::Debug for Auth {
    // Never the secrets themselves.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Bearer(_) => f.write_str("Bearer(..)"),
            Auth::BearerFile(p) => write!(f, "BearerFile({})", p.display()),
            Auth::Basic { username, .. } => write!(f, "Basic({username}, ..)"),
        }
    }
}

/// One endpoint: where its credentials may go, and which.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The URL as configured (for messages).
    pub url: String,
    host: String,
    port: u16,
    /// Without a trailing `/` (empty for the root).
    path: String,
    /// The credentials.
    pub auth: Auth,
}

/// The configured endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Endpoints(Vec<Endpoint>);

impl Endpoints {
    /// The endpoint whose credentials a request to `uri` gets: the one with
    /// the longest path that `uri` is under, on the same https origin.
    pub fn matching(&self, uri: &http::Uri) -> Option<&Endpoint> {
        if uri.scheme_str() != Some("https") {
            return None;
        }
        let host = uri.host()?.to_ascii_lowercase();
        let port = uri.port_u16().unwrap_or(443);
        let path = uri.path();
        self.0
            .iter()
            .filter(|e| e.host == host && e.port == port && under(path, &e.path))
            .max_by_key(|e| e.path.len())
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Whether `path` is `prefix` or below it (`prefix` has no trailing `/`).
fn under(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Reads the credentials file's text. Pure.
pub fn parse(text: &str) -> Result<Endpoints, ConfigError> {
    let json = strata_crds::validation::yaml_to_json(text)
        .map_err(|e| ConfigError::Format(e.to_string()))?;
    let spec: FileSpec =
        serde_json::from_value(json).map_err(|e| ConfigError::Format(e.to_string()))?;
    let mut endpoints: Vec<Endpoint> = Vec::with_capacity(spec.endpoints.len());
    for (index, e) in spec.endpoints.into_iter().enumerate() {
        let bad = |reason: &str| ConfigError::Endpoint {
            index,
            url: e.url.clone(),
            reason: reason.to_string(),
        };
        let endpoint = endpoint(&e).map_err(|r| bad(&r))?;
        if endpoints
            .iter()
            .any(|o| (&o.host, o.port, &o.path) == (&endpoint.host, endpoint.port, &endpoint.path))
        {
            return Err(bad("listed twice"));
        }
        endpoints.push(endpoint);
    }
    Ok(Endpoints(endpoints))
}

fn endpoint(e: &EndpointSpec) -> Result<Endpoint, String> {
    let uri: http::Uri = e.url.parse().map_err(|err| format!("not a URL: {err}"))?;
    match uri.scheme_str() {
        Some("https") => {}
        Some("http") => {
            return Err("credentials are sent over https only (they would travel in clear)".into());
        }
        _ => return Err("not an https:// URL".into()),
    }
    let authority = uri.authority().ok_or("no host")?;
    if authority.as_str().contains('@') {
        return Err("credentials in the URL: use bearerToken or basicAuth".into());
    }
    let host = uri.host().filter(|h| !h.is_empty()).ok_or("no host")?;
    if uri.query().is_some() || e.url.contains('#') {
        return Err("a query string or fragment cannot be part of an endpoint".into());
    }
    let auth = match (&e.bearer_token, &e.bearer_token_file, &e.basic_auth) {
        (Some(token), None, None) => {
            header_token(token)?;
            Auth::Bearer(token.trim().to_string())
        }
        (None, Some(path), None) => {
            if !path.is_absolute() {
                return Err("bearerTokenFile must be an absolute path".into());
            }
            Auth::BearerFile(path.clone())
        }
        (None, None, Some(b)) => {
            if b.username.is_empty() || b.username.contains(':') {
                return Err("basicAuth.username must be non-empty and without ':'".into());
            }
            if b.username
                .chars()
                .chain(b.password.chars())
                .any(char::is_control)
            {
                return Err("basicAuth has control characters".into());
            }
            Auth::Basic {
                username: b.username.clone(),
                password: b.password.clone(),
            }
        }
        _ => return Err("exactly one of bearerToken, bearerTokenFile and basicAuth".into()),
    };
    Ok(Endpoint {
        url: e.url.clone(),
        host: host.to_ascii_lowercase(),
        port: uri.port_u16().unwrap_or(443),
        path: uri.path().trim_end_matches('/').to_string(),
        auth,
    })
}

/// A token checked for use in a header: non-empty, no spaces or control
/// characters.
fn header_token(token: &str) -> Result<&str, String> {
    let t = token.trim();
    if t.is_empty() || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(
            "a bearer token must be non-empty, without spaces or control characters".into(),
        );
    }
    Ok(t)
}

/// The `Authorization` header for `auth`, with `token` standing for a token
/// file's content; marked sensitive (never logged by hyper). Pure.
pub fn authorization(auth: &Auth, token: Option<&str>) -> Result<HeaderValue, String> {
    let text = match auth {
        Auth::Bearer(t) => format!("Bearer {t}"),
        Auth::BearerFile(_) => format!("Bearer {}", header_token(token.unwrap_or_default())?),
        Auth::Basic { username, password } => format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"))
        ),
    };
    let mut value = HeaderValue::from_str(&text).map_err(|e| e.to_string())?;
    value.set_sensitive(true);
    Ok(value)
}

// ---------------------------------------------------------------------------
// The process-wide shell
// ---------------------------------------------------------------------------

/// Credentials loaded from a file, read again when it changes.
pub struct Credentials {
    path: PathBuf,
    endpoints: Endpoints,
    /// The file's text, as last read.
    text: String,
    checked: Instant,
    tokens: HashMap<PathBuf, (String, Instant)>,
}

static CREDENTIALS: OnceLock<Mutex<Credentials>> = OnceLock::new();

fn read_bounded(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut text = String::new();
    file.take(MAX_FILE + 1)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > MAX_FILE {
        return Err(format!("larger than {MAX_FILE} bytes"));
    }
    Ok(text)
}

fn read_config(path: &Path) -> Result<String, ConfigError> {
    read_bounded(path).map_err(|reason| ConfigError::Read {
        path: path.display().to_string(),
        reason,
    })
}

impl Credentials {
    /// The credentials file at `path`, or what is wrong with it.
    pub fn load(path: &Path, now: Instant) -> Result<Self, ConfigError> {
        let text = read_config(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            endpoints: parse(&text)?,
            text,
            checked: now,
            tokens: HashMap::new(),
        })
    }

    /// The endpoints in use.
    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// Reads the file again if [`RELOAD_EVERY`] has passed since the last
    /// look, and takes it if its text changed; a changed file that is not
    /// valid (or not readable) is logged and the endpoints in use stay.
    fn refresh(&mut self, now: Instant) {
        if now.saturating_duration_since(self.checked) < RELOAD_EVERY {
            return;
        }
        self.checked = now;
        let read = read_config(&self.path);
        if read.as_ref().is_ok_and(|text| *text == self.text) {
            return;
        }
        match read.and_then(|text| parse(&text).map(|e| (e, text))) {
            Ok((endpoints, text)) => {
                self.text = text;
                tracing::info!(
                    path = %self.path.display(),
                    endpoints = endpoints.len(),
                    "Prometheus credentials read again"
                );
                self.endpoints = endpoints;
                self.tokens.clear();
            }
            Err(e) => tracing::error!(
                path = %self.path.display(),
                "the changed Prometheus credentials file is not used (the previous one is): {e}"
            ),
        }
    }

    /// The `Authorization` header a query to `uri` carries at `now`, if an
    /// endpoint covers it.
    pub fn header_for(
        &mut self,
        uri: &http::Uri,
        now: Instant,
    ) -> Result<Option<HeaderValue>, CredentialsError> {
        self.refresh(now);
        let Some(endpoint) = self.endpoints.matching(uri) else {
            return Ok(None);
        };
        let fail = |reason: String| CredentialsError {
            url: endpoint.url.clone(),
            path: match &endpoint.auth {
                Auth::BearerFile(p) => p.display().to_string(),
                _ => "-".into(),
            },
            reason,
        };
        let token = match &endpoint.auth {
            Auth::BearerFile(path) => {
                let fresh = self
                    .tokens
                    .get(path)
                    .filter(|(_, at)| now.saturating_duration_since(*at) < TOKEN_FILE_TTL)
                    .map(|(t, _)| t.clone());
                let token = match fresh {
                    Some(t) => t,
                    None => {
                        let t = read_bounded(path).map_err(&fail)?.trim().to_string();
                        self.tokens.insert(path.clone(), (t.clone(), now));
                        t
                    }
                };
                Some(token)
            }
            _ => None,
        };
        authorization(&endpoint.auth, token.as_deref())
            .map(Some)
            .map_err(fail)
    }
}

/// Reads the credentials file at `path` and uses it for every Prometheus
/// query of this process from now on; an error says what is wrong with it.
/// Once per process (a second call changes nothing and says so).
pub fn install(path: &Path) -> Result<usize, ConfigError> {
    let credentials = Credentials::load(path, Instant::now())?;
    let n = credentials.endpoints().len();
    CREDENTIALS
        .set(Mutex::new(credentials))
        .map_err(|_| ConfigError::Read {
            path: path.display().to_string(),
            reason: "credentials were installed already".into(),
        })?;
    Ok(n)
}

/// The `Authorization` header a query to `uri` carries, if an installed
/// endpoint covers it.
pub fn header_for(uri: &http::Uri) -> Result<Option<HeaderValue>, CredentialsError> {
    let Some(lock) = CREDENTIALS.get() else {
        return Ok(None);
    };
    lock.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .header_for(uri, Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
endpoints:
  - url: https://thanos.monitoring.svc:9091
    bearerTokenFile: /var/run/secrets/kubernetes.io/serviceaccount/token
  - url: https://Mimir.example.com/prometheus/
    basicAuth: {username: tenant-1, password: "s3cret:x"}
  - url: https://mimir.example.com/prometheus/tenant-2
    bearerToken: abc.def
"#;

    fn uri(s: &str) -> http::Uri {
        s.parse().expect("uri")
    }

    #[test]
    fn credentials_go_only_to_urls_under_their_endpoint() {
        let e = parse(FILE).expect("valid");
        assert_eq!(e.len(), 3);
        let url = |u: &str| e.matching(&uri(u)).map(|e| e.url.as_str());
        assert_eq!(
            url("https://thanos.monitoring.svc:9091/api/v1/query?query=up"),
            Some("https://thanos.monitoring.svc:9091")
        );
        // Another port, scheme or host: nothing.
        assert_eq!(url("https://thanos.monitoring.svc/api/v1/query"), None);
        assert_eq!(url("http://thanos.monitoring.svc:9091/api/v1/query"), None);
        assert_eq!(
            url("https://thanos.monitoring.svc.evil.com:9091/api/v1/query"),
            None
        );
        // Hosts compare without case; the default port is 443.
        assert_eq!(
            url("https://MIMIR.example.com:443/prometheus/api/v1/query"),
            Some("https://Mimir.example.com/prometheus/")
        );
        // A path under the endpoint's at a '/', the longest wins.
        assert_eq!(
            url("https://mimir.example.com/prometheus/tenant-2/api/v1/query"),
            Some("https://mimir.example.com/prometheus/tenant-2")
        );
        assert_eq!(
            url("https://mimir.example.com/prometheus-other/api/v1/query"),
            None
        );
        assert_eq!(url("https://mimir.example.com/api/v1/query"), None);
    }

    #[test]
    fn headers_are_bearer_or_basic_and_sensitive() {
        let e = parse(FILE).expect("valid");
        let basic = e
            .matching(&uri("https://mimir.example.com/prometheus/api/v1/query"))
            .expect("basic");
        let h = authorization(&basic.auth, None).expect("header");
        // base64("tenant-1:s3cret:x")
        assert_eq!(h, "Basic dGVuYW50LTE6czNjcmV0Ong=");
        assert!(h.is_sensitive());
        let bearer = e
            .matching(&uri("https://mimir.example.com/prometheus/tenant-2/x"))
            .expect("bearer");
        assert_eq!(
            authorization(&bearer.auth, None).expect("header"),
            "Bearer abc.def"
        );
        let file = e
            .matching(&uri("https://thanos.monitoring.svc:9091/"))
            .expect("file");
        assert_eq!(
            authorization(&file.auth, Some("tok\n")).expect("header"),
            "Bearer tok"
        );
        assert!(
            authorization(&file.auth, Some("")).is_err(),
            "an empty token file"
        );
        // Debug output never shows a secret.
        let shown = format!("{e:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("abc.def"),
            "{shown}"
        );
    }

    #[test]
    fn a_changed_file_and_token_file_are_read_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (file, token) = (dir.path().join("auth.yaml"), dir.path().join("token"));
        std::fs::write(&token, "one\n").expect("write");
        let write = |text: String| std::fs::write(&file, text).expect("write");
        write(format!(
            "endpoints:\n  - url: https://p\n    bearerTokenFile: {}\n",
            token.display()
        ));
        let t0 = Instant::now();
        let mut c = Credentials::load(&file, t0).expect("load");
        let u = uri("https://p/api/v1/query");
        let header = |c: &mut Credentials, at| c.header_for(&u, at).expect("header");
        assert_eq!(header(&mut c, t0).expect("covered"), "Bearer one");
        // The token rotates: used until TOKEN_FILE_TTL has passed.
        std::fs::write(&token, "two").expect("write");
        assert_eq!(
            header(&mut c, t0 + Duration::from_secs(1)).expect("covered"),
            "Bearer one"
        );
        assert_eq!(
            header(&mut c, t0 + TOKEN_FILE_TTL).expect("covered"),
            "Bearer two"
        );
        // The file changes to another endpoint: seen after RELOAD_EVERY.
        write("endpoints:\n  - url: https://q\n    bearerToken: q\n".into());
        let later = t0 + TOKEN_FILE_TTL + RELOAD_EVERY;
        assert!(header(&mut c, later).is_none(), "p is no longer configured");
        // An invalid edit keeps the endpoints in use.
        write("endpoints:\n  - url: http://q\n    bearerToken: q\n".into());
        let q = uri("https://q/api/v1/query");
        let much_later = later + RELOAD_EVERY;
        assert_eq!(
            c.header_for(&q, much_later).expect("ok").expect("q still"),
            "Bearer q"
        );
        // A token file that cannot be read is an error naming it.
        let missing = format!(
            "endpoints:\n  - url: https://r\n    bearerTokenFile: {}\n",
            dir.path().join("nothing").display()
        );
        write(missing);
        let err = c
            .header_for(&uri("https://r/x"), much_later + RELOAD_EVERY)
            .expect_err("no token file");
        assert!(err.to_string().contains("nothing"), "{err}");
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let err = |text: &str| parse(text).expect_err(text).to_string();
        let one = |url: &str, rest: &str| format!("endpoints:\n  - url: {url}\n{rest}");
        // (url, the rest of the endpoint, what the error says)
        let cases = [
            // Credentials never travel in clear.
            ("http://prom:9090", "    bearerToken: t", "over https only"),
            ("https://prom", "", "exactly one of"),
            (
                "https://prom",
                "    bearerToken: t\n    basicAuth: {username: u, password: p}",
                "exactly one of",
            ),
            ("https://prom", "    bearerToken: \"a b\"", "without spaces"),
            ("https://prom", "    bearerTokenFile: token", "absolute"),
            (
                "https://prom",
                "    basicAuth: {username: \"a:b\", password: p}",
                "without ':'",
            ),
            (
                "https://u:p@prom",
                "    bearerToken: t",
                "credentials in the URL",
            ),
            ("https://prom/?x=1", "    bearerToken: t", "query string"),
            ("https://prom", "    bearerTokn: t", "unknown field"),
        ];
        for (url, rest, says) in cases {
            let e = err(&one(url, rest));
            assert!(e.contains(says), "{url} {rest:?}: {e}");
        }
        assert!(err("endpoint: []").contains("endpoints"));
        let twice = "endpoints:\n  - url: https://p/x/\n    bearerToken: a\n  - url: https://P:443/x\n    bearerToken: b\n";
        assert!(err(twice).contains("listed twice"));
        assert_eq!(parse("endpoints: []").expect("empty").len(), 0);
    }
}
