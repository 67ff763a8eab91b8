//! The sidecar against the limit (issue [12] item 1, "P2"): the engine
//! simulator reached directly, through `strata-sidecar` and through Debian's
//! nginx as a plain reverse proxy, in one run, with the same load generator.
//!
//! - **Per request**: `wrk` (Debian's package, installed with apt-get when
//!   missing) against each target: non-streamed and streamed chat
//!   completions of a few tokens from a simulator with no artificial delay,
//!   at 1, 64 and 512 concurrent connections (closed loop). Throughput and
//!   latency percentiles come from wrk's own histogram (a Lua `done` hook
//!   prints them in one parseable line).
//! - **Per streamed chunk**: neither wrk nor oha times the pieces of an
//!   answer, so a small client of ours ([`chunk_load`], hyper) streams chat
//!   completions from a simulator restarted with a real inter-token time and
//!   stamps every server-sent event as it arrives: time to first token and
//!   the gaps between token events.
//! - **Cost**: CPU seconds (`/proc/<pid>/stat`, utime + stime) of the
//!   sidecar and of nginx (master and every worker) over the wrk runs
//!   against them, per 1,000 requests; VmRSS sampled every 250 ms and VmHWM
//!   (`/proc/<pid>/status`).
//!
//! Added latency is the difference of percentiles (p99 through the proxy
//! minus p99 direct, same mode and concurrency, same run): requests cannot
//! be paired across runs. Every address is loopback.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;

use crate::process::Component;

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum SidecarBenchError {
    /// A process of the benchmark could not start or died.
    #[error(transparent)]
    World(#[from] crate::Error),
    /// A binary is missing.
    #[error("{} not found; build it first: cargo build --release -p strata-sidecar -p strata-e2e --bin strata-sidecar --bin strata-engine-sim", path.display())]
    Binary {
        /// Where it was expected.
        path: PathBuf,
    },
    /// wrk or nginx could not be installed.
    #[error("installing {what}: {reason}")]
    Install {
        /// The packages.
        what: String,
        /// What went wrong.
        reason: String,
    },
    /// A step failed.
    #[error("{what}: {reason}")]
    Step {
        /// The step.
        what: String,
        /// What went wrong.
        reason: String,
    },
    /// A file could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The options do not make sense.
    #[error("invalid options: {0}")]
    Options(String),
}

/// Result of this module.
pub type Result<T, E = SidecarBenchError> = std::result::Result<T, E>;

fn step(what: impl Into<String>, reason: impl ToString) -> SidecarBenchError {
    SidecarBenchError::Step {
        what: what.into(),
        reason: reason.to_string(),
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SidecarBenchError + '_ {
    move |source| SidecarBenchError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How to run it.
#[derive(Debug, Clone)]
pub struct Options {
    /// The release-built `strata-sidecar`.
    pub sidecar: PathBuf,
    /// The release-built `strata-engine-sim`.
    pub engine_sim: PathBuf,
    /// Concurrent clients (connections), each cell of the table.
    pub clients: Vec<usize>,
    /// Measured seconds of each load run.
    pub duration: Duration,
    /// Unmeasured load before each measured run.
    pub warmup: Duration,
    /// Rounds (each round runs every cell against every target, the
    /// targets' order rotated); figures are the median over rounds.
    pub rounds: usize,
    /// Tokens of each answer in the per-request runs.
    pub tokens: u32,
    /// Tokens of each answer in the per-chunk runs.
    pub chunk_tokens: u32,
    /// The simulator's time per token in the per-chunk runs, ms.
    pub chunk_itl_ms: f64,
    /// Working directory (configs, logs).
    pub dir: PathBuf,
    /// Skip the per-chunk runs.
    pub skip_chunks: bool,
    /// More flags for the sidecar, after the benchmark's own.
    pub sidecar_args: Vec<String>,
    /// Environment of the sidecar beyond its image's: each replaces the
    /// image's variable of the same name, and an empty value removes it.
    pub sidecar_env: Vec<(String, String)>,
}

/// The sidecar's environment: its image's ([`SIDECAR_IMAGE_ENV`]) with
/// `overrides` applied (a variable replaced, or removed by an empty value).
pub fn sidecar_env(overrides: &[(String, String)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = SIDECAR_IMAGE_ENV
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for (k, v) in overrides {
        env.retain(|(key, _)| key != k);
        if !v.is_empty() {
            env.push((k.clone(), v.clone()));
        }
    }
    env
}

/// What the load goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Target {
    /// The simulator itself.
    Direct,
    /// strata-sidecar in front of it.
    Sidecar,
    /// nginx in front of it.
    Nginx,
}

impl Target {
    /// Every target, in table order.
    pub const ALL: [Target; 3] = [Target::Direct, Target::Sidecar, Target::Nginx];

    /// Its name in the report.
    pub fn label(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Sidecar => "sidecar",
            Target::Nginx => "nginx",
        }
    }
}

/// Streamed or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Mode {
    /// One JSON answer.
    Whole,
    /// Server-sent events.
    Stream,
}

impl Mode {
    /// Its name in the report.
    pub fn label(self) -> &'static str {
        match self {
            Mode::Whole => "non-streamed",
            Mode::Stream => "streamed",
        }
    }
}

/// The body of every request.
pub fn request_body(tokens: u32, stream: bool) -> String {
    let mut body = serde_json::json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello in a few words."}],
        "max_tokens": tokens,
    });
    if stream && let Some(o) = body.as_object_mut() {
        o.insert("stream".into(), serde_json::Value::Bool(true));
    }
    body.to_string()
}

/// The served model's name.
pub const MODEL: &str = "bench";

const PATH: &str = "/v1/chat/completions";

// ---------------------------------------------------------------------------
// Pure helpers: wrk's output, percentiles, /proc
// ---------------------------------------------------------------------------

/// One wrk run, from the line our Lua `done` hook prints.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct WrkResult {
    /// Completed requests.
    pub requests: u64,
    /// Seconds the run lasted.
    pub seconds: f64,
    /// Socket errors (connect, read, write, timeout) and non-2xx/3xx answers.
    pub errors: u64,
    /// Latency percentiles, microseconds.
    pub p50_us: f64,
    /// p90.
    pub p90_us: f64,
    /// p99.
    pub p99_us: f64,
    /// The slowest request.
    pub max_us: f64,
}

impl WrkResult {
    /// Requests per second.
    pub fn rps(&self) -> f64 {
        if self.seconds > 0.0 {
            self.requests as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// The Lua script given to wrk: the request, and a `done` hook that prints
/// one `STRATA-WRK key=value ...` line.
pub fn wrk_script(body: &str) -> String {
    let quoted = body.replace('\\', "\\\\").replace('\'', "\\'");
    format!(
        r#"wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{quoted}'
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("STRATA-WRK requests=%d duration_us=%d errors=%d status_errors=%d p50_us=%d p90_us=%d p99_us=%d max_us=%d\n",
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"#
    )
}

/// Parses the `STRATA-WRK` line of wrk's output.
pub fn parse_wrk(output: &str) -> Option<WrkResult> {
    let line = output
        .lines()
        .find_map(|l| l.trim().strip_prefix("STRATA-WRK "))?;
    let mut kv = BTreeMap::new();
    for pair in line.split_whitespace() {
        let (k, v) = pair.split_once('=')?;
        kv.insert(k, v.parse::<f64>().ok()?);
    }
    let get = |k: &str| kv.get(k).copied();
    Some(WrkResult {
        requests: get("requests")? as u64,
        seconds: get("duration_us")? / 1e6,
        errors: (get("errors")? + get("status_errors")?) as u64,
        p50_us: get("p50_us")?,
        p90_us: get("p90_us")?,
        p99_us: get("p99_us")?,
        max_us: get("max_us")?,
    })
}

/// The nearest-rank percentile `p` (0..=100) of sorted values; 0 when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The median of some values (the mean of the middle two for an even
/// count); 0 when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// utime + stime of a process, seconds; 0 if it is gone.
fn cpu_seconds(pid: u32) -> f64 {
    crate::bench_scale::cpu_seconds(pid).unwrap_or(0.0)
}

/// VmRSS and VmHWM of a process, KiB; zeros if it is gone.
fn mem_kib(pid: u32) -> (u64, u64) {
    crate::bench_memory::proc_mem(pid).map_or((0, 0), |m| (m.rss_kib, m.hwm_kib))
}

/// The parent pid in the text of `/proc/<pid>/stat`.
pub fn parse_ppid(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// A process and its direct children (nginx's master and its workers).
fn with_children(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            if parse_ppid(&stat) == Some(pid) {
                pids.push(child);
            }
        }
    }
    pids
}

// ---------------------------------------------------------------------------
// Tools and processes
// ---------------------------------------------------------------------------

/// Debian's wrk.
pub const WRK: &str = "/usr/bin/wrk";
/// Debian's nginx.
pub const NGINX: &str = "/usr/sbin/nginx";

/// Installs wrk and nginx with apt-get when either is missing (as root, or
/// through sudo).
pub async fn ensure_tools() -> Result<()> {
    if Path::new(WRK).exists() && Path::new(NGINX).exists() {
        return Ok(());
    }
    let root = nix::unistd::geteuid().is_root();
    let apt = |args: &[&str]| {
        let mut c = if root {
            tokio::process::Command::new("apt-get")
        } else {
            let mut c = tokio::process::Command::new("sudo");
            c.arg("apt-get");
            c
        };
        c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    let install = [
        "install",
        "-y",
        "--no-install-recommends",
        "wrk",
        "nginx-light",
    ];
    let what = "wrk nginx-light (apt-get)";
    tracing::info!("installing {what}");
    let first = apt(&install)
        .output()
        .await
        .map_err(|e| SidecarBenchError::Install {
            what: what.into(),
            reason: e.to_string(),
        })?;
    if !first.status.success() {
        // A fresh machine may not have the package lists yet.
        let _ = apt(&["update"]).output().await;
        let again = apt(&install)
            .output()
            .await
            .map_err(|e| SidecarBenchError::Install {
                what: what.into(),
                reason: e.to_string(),
            })?;
        if !again.status.success() {
            return Err(SidecarBenchError::Install {
                what: what.into(),
                reason: String::from_utf8_lossy(&again.stderr).into_owned(),
            });
        }
    }
    for p in [WRK, NGINX] {
        if !Path::new(p).exists() {
            return Err(SidecarBenchError::Install {
                what: what.into(),
                reason: format!("{p} is still missing"),
            });
        }
    }
    Ok(())
}

/// A loopback port for a process started later ([`crate::ports`]).
fn free_port() -> Result<u16> {
    crate::ports::free_port().map_err(|e| step("a free port", e))
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Waits until `GET path` answers 200.
async fn wait_ready(comp: &mut Component, addr: SocketAddr, path: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        comp.check_running()?;
        if let Ok(r) = crate::http::get(addr, path, Duration::from_secs(2)).await
            && r.status == 200
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(step(
                format!("waiting for {} at {addr}{path}", comp.name),
                "no 200 within 30 s",
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The nginx configuration: a plain keep-alive reverse proxy that buffers
/// no answer and logs no request.
pub fn nginx_conf(dir: &Path, listen: u16, engine: u16) -> String {
    let d = dir.display();
    format!(
        r#"# strata-bench-sidecar: nginx as a plain reverse proxy (measures nothing).
worker_processes auto;
worker_rlimit_nofile 16384;
daemon off;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{
    worker_connections 8192;
}}
http {{
    access_log off;
    client_body_temp_path {d}/nginx-tmp/body;
    proxy_temp_path {d}/nginx-tmp/proxy;
    fastcgi_temp_path {d}/nginx-tmp/fastcgi;
    uwsgi_temp_path {d}/nginx-tmp/uwsgi;
    scgi_temp_path {d}/nginx-tmp/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    upstream engine {{
        server 127.0.0.1:{engine};
        keepalive 1024;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{listen} backlog=1024;
        location / {{
            proxy_pass http://engine;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"#
    )
}

/// The processes of the run.
struct Procs {
    sim: Component,
    sidecar: Component,
    nginx: Component,
    ports: BTreeMap<Target, u16>,
    sim_port: u16,
}

fn sim_args(port: u16, itl_ms: f64) -> Vec<String> {
    [
        "--listen",
        &loopback(port).to_string(),
        "--model",
        MODEL,
        // No queue: every request runs at once.
        "--max-batch",
        "100000",
        "--prefill-ms-per-token",
        "0",
        "--itl-ms",
        &itl_ms.to_string(),
        "--itl-batch-factor",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The environment `images/strata-sidecar/Containerfile` sets (`ENV`), given
/// to the sidecar here as a pod's container gets it (a test holds the two
/// equal).
pub const SIDECAR_IMAGE_ENV: &[(&str, &str)] = &[("MALLOC_ARENA_MAX", "2")];

async fn start_sim(opts: &Options, port: u16, itl_ms: f64) -> Result<Component> {
    let mut sim = Component::spawn(
        "strata-engine-sim",
        &opts.engine_sim,
        &sim_args(port, itl_ms),
        &[("RUST_LOG".into(), "warn".into())],
        &opts.dir,
    )?;
    wait_ready(&mut sim, loopback(port), "/health").await?;
    Ok(sim)
}

async fn start(opts: &Options) -> Result<Procs> {
    for p in [&opts.sidecar, &opts.engine_sim] {
        if !p.exists() {
            return Err(SidecarBenchError::Binary { path: p.clone() });
        }
    }
    let sim_port = free_port()?;
    let sidecar_port = free_port()?;
    let admin_port = free_port()?;
    let nginx_port = free_port()?;
    let sim = start_sim(opts, sim_port, 0.0).await?;
    let args: Vec<String> = [
        "--listen".to_string(),
        loopback(sidecar_port).to_string(),
        "--admin-listen".into(),
        loopback(admin_port).to_string(),
        "--engine-url".into(),
        format!("http://{}", loopback(sim_port)),
        "--served-model".into(),
        MODEL.into(),
        // Never contacted (no adapter is loaded); loopback all the same.
        "--hf-endpoint".into(),
        "http://127.0.0.1:9".into(),
    ]
    .into_iter()
    .chain(opts.sidecar_args.iter().cloned())
    .collect();
    // The environment the sidecar's image gives it (its Containerfile's ENV).
    let env = sidecar_env(&opts.sidecar_env);
    let mut sidecar = Component::spawn("strata-sidecar", &opts.sidecar, &args, &env, &opts.dir)?;
    wait_ready(&mut sidecar, loopback(admin_port), "/readyz").await?;

    let conf = opts.dir.join("nginx.conf");
    for sub in ["body", "proxy", "fastcgi", "uwsgi", "scgi"] {
        let d = opts.dir.join("nginx-tmp").join(sub);
        std::fs::create_dir_all(&d).map_err(io(&d))?;
    }
    std::fs::write(&conf, nginx_conf(&opts.dir, nginx_port, sim_port)).map_err(io(&conf))?;
    let nginx_args: Vec<String> = [
        "-p".to_string(),
        opts.dir.display().to_string(),
        "-c".into(),
        conf.display().to_string(),
        "-e".into(),
        opts.dir.join("nginx-error.log").display().to_string(),
    ]
    .into();
    let mut nginx = Component::spawn("nginx", Path::new(NGINX), &nginx_args, &[], &opts.dir)?;
    // A path the simulator answers on GET through the proxy.
    wait_ready(&mut nginx, loopback(nginx_port), "/health").await?;
    let ports = BTreeMap::from([
        (Target::Direct, sim_port),
        (Target::Sidecar, sidecar_port),
        (Target::Nginx, nginx_port),
    ]);
    Ok(Procs {
        sim,
        sidecar,
        nginx,
        ports,
        sim_port,
    })
}

impl Procs {
    /// The processes a target adds (none for direct).
    fn pids(&self, t: Target) -> Vec<u32> {
        match t {
            Target::Direct => Vec::new(),
            Target::Sidecar => self.sidecar.pid().into_iter().collect(),
            Target::Nginx => self.nginx.pid().map(with_children).unwrap_or_default(),
        }
    }

    fn cpu(&self, t: Target) -> f64 {
        self.pids(t).into_iter().map(cpu_seconds).sum()
    }

    fn mem(&self, t: Target) -> (u64, u64) {
        self.pids(t)
            .into_iter()
            .map(mem_kib)
            .fold((0, 0), |a, m| (a.0 + m.0, a.1 + m.1))
    }

    fn check(&mut self) -> Result<()> {
        self.sim.check_running()?;
        self.sidecar.check_running()?;
        self.nginx.check_running()?;
        Ok(())
    }

    async fn stop(&mut self) {
        let grace = Duration::from_secs(5);
        self.nginx.stop(grace).await;
        self.sidecar.stop(grace).await;
        self.sim.stop(grace).await;
    }
}

impl Drop for Procs {
    /// A run stopped by a signal drops its processes, each killed on drop;
    /// nginx's workers would outlive their master that way, so they are
    /// killed here too (after [`Procs::stop`] there are none).
    fn drop(&mut self) {
        let Some(master) = self.nginx.pid() else {
            return;
        };
        let path = format!("/proc/{master}/task/{master}/children");
        let Ok(children) = std::fs::read_to_string(path) else {
            return;
        };
        // The master first: alive, it would start a worker for each killed.
        let master = master.to_string();
        let pids = std::iter::once(master.as_str()).chain(children.split_whitespace());
        let _ = std::process::Command::new("kill")
            .arg("-KILL")
            .args(pids)
            .status();
    }
}

// ---------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------

async fn wrk(script: &Path, port: u16, clients: usize, duration: Duration) -> Result<WrkResult> {
    let threads = clients.clamp(1, 2);
    let secs = duration.as_secs().max(1);
    let url = format!("http://{}{PATH}", loopback(port));
    let out = tokio::process::Command::new(WRK)
        .args([
            format!("-t{threads}"),
            format!("-c{clients}"),
            format!("-d{secs}s"),
            "--timeout".into(),
            "10s".into(),
            "-s".into(),
            script.display().to_string(),
            url.clone(),
        ])
        .output()
        .await
        .map_err(|e| step(format!("running {WRK}"), e))?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_wrk(&text).ok_or_else(|| {
        step(
            format!("wrk -c{clients} {url}"),
            format!(
                "no result line in its output: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    })
}

/// What the streaming client saw.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ChunkResult {
    /// Requests completed in the measured window.
    pub requests: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Time to the first token event, µs.
    pub ttft_p50_us: f64,
    /// p99.
    pub ttft_p99_us: f64,
    /// Gap between successive token events, µs.
    pub gap_p50_us: f64,
    /// p99.
    pub gap_p99_us: f64,
    /// Gaps measured.
    pub gaps: u64,
}

#[derive(Default)]
struct ChunkSamples {
    requests: u64,
    errors: u64,
    ttft: Vec<f64>,
    gaps: Vec<f64>,
}

/// One streamed request: the times of its token events after `t0`.
async fn one_stream(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    uri: &http::Uri,
    body: &Bytes,
) -> std::result::Result<Vec<Duration>, String> {
    let req = http::Request::post(uri.clone())
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body.clone()))
        .map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status()));
    }
    let mut body = resp.into_body();
    let mut splitter = strata_sidecar::sse::Splitter::default();
    let mut times = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        let at = t0.elapsed();
        let Ok(data) = frame.into_data() else {
            continue;
        };
        for ev in splitter.feed(&data).map_err(|e| e.to_string())? {
            let Some(d) = ev.data else { continue };
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&d)
                && strata_sidecar::measure::classify(&v)
                    == strata_sidecar::measure::ChunkKind::Token
            {
                times.push(at);
            }
        }
    }
    Ok(times)
}

/// `clients` streaming clients for `warmup + duration`; requests started
/// after the warm-up and finished within the window count.
pub async fn chunk_load(
    port: u16,
    clients: usize,
    tokens: u32,
    warmup: Duration,
    duration: Duration,
) -> Result<ChunkResult> {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(clients)
        .build(connector);
    let uri: http::Uri = format!("http://{}{PATH}", loopback(port))
        .parse()
        .map_err(|e| step("the URI", e))?;
    let body = Bytes::from(request_body(tokens, true));
    let start = Instant::now();
    let (from, to) = (start + warmup, start + warmup + duration);
    let samples = Arc::new(Mutex::new(ChunkSamples::default()));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (client, uri, body, samples) =
            (client.clone(), uri.clone(), body.clone(), samples.clone());
        tasks.push(tokio::spawn(async move {
            let mut mine = ChunkSamples::default();
            loop {
                let began = Instant::now();
                if began >= to {
                    break;
                }
                let r = one_stream(&client, &uri, &body).await;
                let counted = began >= from && Instant::now() <= to;
                match r {
                    Ok(times) if counted => {
                        mine.requests += 1;
                        if let Some(first) = times.first() {
                            mine.ttft.push(first.as_secs_f64() * 1e6);
                        }
                        for w in times.windows(2) {
                            mine.gaps.push((w[1] - w[0]).as_secs_f64() * 1e6);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if counted {
                            mine.errors += 1;
                        }
                        tracing::debug!("stream: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            let mut all = match samples.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            all.requests += mine.requests;
            all.errors += mine.errors;
            all.ttft.extend(mine.ttft);
            all.gaps.extend(mine.gaps);
        }));
    }
    for t in tasks {
        t.await.map_err(|e| step("a streaming client", e))?;
    }
    let mut s = match samples.lock() {
        Ok(mut g) => std::mem::take(&mut *g),
        Err(p) => std::mem::take(&mut *p.into_inner()),
    };
    s.ttft.sort_by(f64::total_cmp);
    s.gaps.sort_by(f64::total_cmp);
    Ok(ChunkResult {
        requests: s.requests,
        errors: s.errors,
        ttft_p50_us: percentile(&s.ttft, 50.0),
        ttft_p99_us: percentile(&s.ttft, 99.0),
        gap_p50_us: percentile(&s.gaps, 50.0),
        gap_p99_us: percentile(&s.gaps, 99.0),
        gaps: s.gaps.len() as u64,
    })
}

// ---------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------

/// One cell of the per-request table: a target at a mode and concurrency,
/// every round.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Cell {
    /// The rounds' results.
    pub rounds: Vec<WrkResult>,
    /// CPU seconds the target's processes used in the measured runs.
    pub cpu_s: f64,
}

impl Cell {
    /// Median requests per second.
    pub fn rps(&self) -> f64 {
        median(&self.rounds.iter().map(WrkResult::rps).collect::<Vec<_>>())
    }
    /// Median p50, µs.
    pub fn p50(&self) -> f64 {
        median(&self.rounds.iter().map(|r| r.p50_us).collect::<Vec<_>>())
    }
    /// Median p99, µs.
    pub fn p99(&self) -> f64 {
        median(&self.rounds.iter().map(|r| r.p99_us).collect::<Vec<_>>())
    }
    /// Requests over all rounds.
    pub fn requests(&self) -> u64 {
        self.rounds.iter().map(|r| r.requests).sum()
    }
    /// Errors over all rounds.
    pub fn errors(&self) -> u64 {
        self.rounds.iter().map(|r| r.errors).sum()
    }
    /// CPU seconds per 1,000 requests.
    pub fn cpu_per_1k(&self) -> f64 {
        let n = self.requests();
        if n == 0 {
            0.0
        } else {
            self.cpu_s * 1000.0 / n as f64
        }
    }
}

/// Memory of a proxy, KiB.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Memory {
    /// VmRSS once started, before any load.
    pub idle_rss_kib: u64,
    /// The largest VmRSS sampled (every 250 ms) under load.
    pub max_rss_kib: u64,
    /// VmHWM at the end (for nginx: the sum over its processes, an upper
    /// bound of their peak together).
    pub hwm_kib: u64,
    /// Processes (nginx: master and workers).
    pub processes: usize,
}

/// The whole result.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// When.
    pub date: String,
    /// The machine.
    pub machine: String,
    /// Load averages before and after.
    pub load_before: String,
    /// Load averages after.
    pub load_after: String,
    /// Options, as text.
    pub settings: String,
    /// Per-request cells: (mode, clients, target).
    #[serde(serialize_with = "as_list")]
    pub cells: BTreeMap<(Mode, usize, Target), Cell>,
    /// Per-chunk results: (clients, target).
    #[serde(serialize_with = "as_list")]
    pub chunks: BTreeMap<(usize, Target), ChunkResult>,
    /// Memory of the sidecar and of nginx.
    pub memory: BTreeMap<Target, Memory>,
    /// Versions of the tools.
    pub tools: String,
}

/// A map as a list of `[key, value]` (JSON keys must be strings).
fn as_list<K: Serialize, V: Serialize, S: serde::Serializer>(
    map: &BTreeMap<K, V>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.collect_seq(map.iter())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

async fn version(cmd: &str, arg: &str) -> String {
    match tokio::process::Command::new(cmd).arg(arg).output().await {
        Ok(o) => {
            let t = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            t.lines().next().unwrap_or("").trim().to_string()
        }
        Err(_) => String::new(),
    }
}

/// Samples VmRSS of the sidecar's and nginx's processes until dropped.
struct Sampler {
    peaks: Arc<Mutex<BTreeMap<Target, u64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    fn start(pids: BTreeMap<Target, Vec<u32>>) -> Self {
        let peaks = Arc::new(Mutex::new(BTreeMap::new()));
        let p = peaks.clone();
        let task = tokio::spawn(async move {
            loop {
                for (t, ps) in &pids {
                    let rss: u64 = ps.iter().map(|pid| mem_kib(*pid).0).sum();
                    if let Ok(mut m) = p.lock() {
                        let e = m.entry(*t).or_insert(0);
                        *e = (*e).max(rss);
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        Self { peaks, task }
    }

    fn peak(&self, t: Target) -> u64 {
        self.peaks
            .lock()
            .map(|m| m.get(&t).copied().unwrap_or(0))
            .unwrap_or(0)
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs the benchmark.
pub async fn run(opts: &Options) -> Result<Report> {
    if opts.clients.is_empty() || opts.clients.contains(&0) {
        return Err(SidecarBenchError::Options(
            "--clients needs counts of at least 1".into(),
        ));
    }
    if opts.rounds == 0 || opts.tokens == 0 || opts.chunk_tokens < 2 {
        return Err(SidecarBenchError::Options(
            "--rounds and --tokens at least 1, --chunk-tokens at least 2".into(),
        ));
    }
    ensure_tools().await?;
    let load_before = loadavg();
    let mut procs = start(opts).await?;
    let result = measure(opts, &mut procs).await;
    procs.stop().await;
    let (cells, chunks, memory) = result?;
    Ok(Report {
        date: k8s_openapi::jiff::Timestamp::now().to_string(),
        machine: crate::bench_memory::machine(),
        load_before,
        load_after: loadavg(),
        settings: format!(
            "{} s measured after {} s of warm-up per run, {} round(s); {} tokens per answer with no simulated delay; per chunk: {} tokens {} ms apart",
            opts.duration.as_secs(),
            opts.warmup.as_secs(),
            opts.rounds,
            opts.tokens,
            opts.chunk_tokens,
            opts.chunk_itl_ms
        ) + &sidecar_settings(opts),
        cells,
        chunks,
        memory,
        tools: format!(
            "{}; {}",
            version(WRK, "--version").await,
            version(NGINX, "-v").await
        ),
    })
}

type Measured = (
    BTreeMap<(Mode, usize, Target), Cell>,
    BTreeMap<(usize, Target), ChunkResult>,
    BTreeMap<Target, Memory>,
);

async fn measure(opts: &Options, procs: &mut Procs) -> Result<Measured> {
    let mut memory = BTreeMap::new();
    for t in [Target::Sidecar, Target::Nginx] {
        let pids = procs.pids(t);
        memory.insert(
            t,
            Memory {
                idle_rss_kib: procs.mem(t).0,
                processes: pids.len(),
                ..Memory::default()
            },
        );
    }
    let sampler = Sampler::start(
        [Target::Sidecar, Target::Nginx]
            .into_iter()
            .map(|t| (t, procs.pids(t)))
            .collect(),
    );
    let mut scripts = BTreeMap::new();
    for mode in [Mode::Whole, Mode::Stream] {
        let path = opts.dir.join(format!("wrk-{}.lua", mode.label()));
        std::fs::write(
            &path,
            wrk_script(&request_body(opts.tokens, mode == Mode::Stream)),
        )
        .map_err(io(&path))?;
        scripts.insert(mode, path);
    }
    let mut cells: BTreeMap<(Mode, usize, Target), Cell> = BTreeMap::new();
    for round in 0..opts.rounds {
        for mode in [Mode::Whole, Mode::Stream] {
            for &clients in &opts.clients {
                let mut order = Target::ALL.to_vec();
                let n = order.len();
                order.rotate_left(round % n);
                for target in order {
                    let port = procs.ports[&target];
                    let script = &scripts[&mode];
                    if !opts.warmup.is_zero() {
                        wrk(script, port, clients, opts.warmup).await?;
                    }
                    let cpu0 = procs.cpu(target);
                    let r = wrk(script, port, clients, opts.duration).await?;
                    let cpu = procs.cpu(target) - cpu0;
                    procs.check()?;
                    eprintln!(
                        "round {} {:>12} {:>3} clients {:>7}: {:>8.0} req/s p50 {:>8.0} us p99 {:>8.0} us errors {} cpu {:.2} s",
                        round + 1,
                        mode.label(),
                        clients,
                        target.label(),
                        r.rps(),
                        r.p50_us,
                        r.p99_us,
                        r.errors,
                        cpu
                    );
                    let cell = cells.entry((mode, clients, target)).or_default();
                    cell.rounds.push(r);
                    cell.cpu_s += cpu;
                }
            }
        }
    }
    let mut chunks = BTreeMap::new();
    if !opts.skip_chunks {
        // The same port, a simulator with a real inter-token time.
        procs.sim.stop(Duration::from_secs(5)).await;
        procs.sim = start_sim(opts, procs.sim_port, opts.chunk_itl_ms).await?;
        for &clients in &opts.clients {
            for target in Target::ALL {
                let port = procs.ports[&target];
                let r = chunk_load(
                    port,
                    clients,
                    opts.chunk_tokens,
                    opts.warmup.max(Duration::from_secs(1)),
                    opts.duration,
                )
                .await?;
                procs.check()?;
                eprintln!(
                    "chunks {:>3} clients {:>7}: {} requests ({} errors), TTFT p50 {:.0} us p99 {:.0} us, gap p50 {:.0} us p99 {:.0} us",
                    clients,
                    target.label(),
                    r.requests,
                    r.errors,
                    r.ttft_p50_us,
                    r.ttft_p99_us,
                    r.gap_p50_us,
                    r.gap_p99_us
                );
                chunks.insert((clients, target), r);
            }
        }
    }
    for (t, m) in memory.iter_mut() {
        m.max_rss_kib = sampler.peak(*t).max(procs.mem(*t).0);
        m.hwm_kib = procs.mem(*t).1;
    }
    drop(sampler);
    Ok((cells, chunks, memory))
}

// ---------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------

fn ms(us: f64) -> String {
    format!("{:.2}", us / 1000.0)
}

fn signed_ms(us: f64) -> String {
    format!("{:+.2}", us / 1000.0)
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

impl Report {
    /// The Markdown tables of docs/benchmarks.md.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "{}; {}; load average {} before, {} after; {}; {}.\n\n",
            self.date, self.machine, self.load_before, self.load_after, self.settings, self.tools
        ));
        s.push_str("**Per request** (wrk, closed loop; latency in ms, added = the percentile through the proxy minus direct's; throughput as % of direct's; CPU seconds per 1,000 requests):\n\n");
        s.push_str("| Mode | Clients | Direct req/s | Direct p50 / p99 | Sidecar req/s (% of direct) | Sidecar added p50 / p99 | nginx req/s (% of direct) | nginx added p50 / p99 | CPU s per 1k req: sidecar / nginx | Errors (d/s/n) |\n|---|---|---|---|---|---|---|---|---|---|\n");
        let modes: Vec<Mode> = {
            let mut m: Vec<Mode> = self.cells.keys().map(|k| k.0).collect();
            m.dedup();
            m
        };
        let mut clients: Vec<usize> = self.cells.keys().map(|k| k.1).collect();
        clients.sort_unstable();
        clients.dedup();
        for &mode in &modes {
            for &c in &clients {
                let get = |t| self.cells.get(&(mode, c, t));
                let (Some(d), Some(sc), Some(n)) = (
                    get(Target::Direct),
                    get(Target::Sidecar),
                    get(Target::Nginx),
                ) else {
                    continue;
                };
                let pct = |x: &Cell| {
                    if d.rps() > 0.0 {
                        format!("{:.0} ({:.0} %)", x.rps(), 100.0 * x.rps() / d.rps())
                    } else {
                        format!("{:.0}", x.rps())
                    }
                };
                s.push_str(&format!(
                    "| {} | {} | {:.0} | {} / {} | {} | {} / {} | {} | {} / {} | {:.3} / {:.3} | {}/{}/{} |\n",
                    mode.label(),
                    c,
                    d.rps(),
                    ms(d.p50()),
                    ms(d.p99()),
                    pct(sc),
                    signed_ms(sc.p50() - d.p50()),
                    signed_ms(sc.p99() - d.p99()),
                    pct(n),
                    signed_ms(n.p50() - d.p50()),
                    signed_ms(n.p99() - d.p99()),
                    sc.cpu_per_1k(),
                    n.cpu_per_1k(),
                    d.errors(),
                    sc.errors(),
                    n.errors()
                ));
            }
        }
        s.push_str("\n**Maximum throughput** (the best cell of each mode):\n\n| Mode | Direct req/s | Sidecar req/s (% of direct) | nginx req/s (% of direct) |\n|---|---|---|---|\n");
        for &mode in &modes {
            let best = |t: Target| {
                self.cells
                    .iter()
                    .filter(|(k, _)| k.0 == mode && k.2 == t)
                    .map(|(_, c)| c.rps())
                    .fold(0.0, f64::max)
            };
            let d = best(Target::Direct);
            let pct = |x: f64| {
                if d > 0.0 {
                    format!("{x:.0} ({:.0} %)", 100.0 * x / d)
                } else {
                    format!("{x:.0}")
                }
            };
            s.push_str(&format!(
                "| {} | {d:.0} | {} | {} |\n",
                mode.label(),
                pct(best(Target::Sidecar)),
                pct(best(Target::Nginx))
            ));
        }
        if !self.chunks.is_empty() {
            s.push_str("\n**Per streamed chunk** (our streaming client, `strata_e2e::bench_sidecar::chunk_load`: each token event stamped as it arrives; ms; added = through the proxy minus direct):\n\n| Clients | Direct TTFT p50 / p99 | Direct gap p50 / p99 | Sidecar added TTFT p50 / p99 | Sidecar added gap p50 / p99 | nginx added TTFT p50 / p99 | nginx added gap p50 / p99 | Requests (d/s/n) | Errors (d/s/n) |\n|---|---|---|---|---|---|---|---|---|\n");
            let mut cs: Vec<usize> = self.chunks.keys().map(|k| k.0).collect();
            cs.dedup();
            for c in cs {
                let get = |t| self.chunks.get(&(c, t));
                let (Some(d), Some(sc), Some(n)) = (
                    get(Target::Direct),
                    get(Target::Sidecar),
                    get(Target::Nginx),
                ) else {
                    continue;
                };
                s.push_str(&format!(
                    "| {c} | {} / {} | {} / {} | {} / {} | {} / {} | {} / {} | {} / {} | {}/{}/{} | {}/{}/{} |\n",
                    ms(d.ttft_p50_us),
                    ms(d.ttft_p99_us),
                    ms(d.gap_p50_us),
                    ms(d.gap_p99_us),
                    signed_ms(sc.ttft_p50_us - d.ttft_p50_us),
                    signed_ms(sc.ttft_p99_us - d.ttft_p99_us),
                    signed_ms(sc.gap_p50_us - d.gap_p50_us),
                    signed_ms(sc.gap_p99_us - d.gap_p99_us),
                    signed_ms(n.ttft_p50_us - d.ttft_p50_us),
                    signed_ms(n.ttft_p99_us - d.ttft_p99_us),
                    signed_ms(n.gap_p50_us - d.gap_p50_us),
                    signed_ms(n.gap_p99_us - d.gap_p99_us),
                    d.requests,
                    sc.requests,
                    n.requests,
                    d.errors,
                    sc.errors,
                    n.errors
                ));
            }
        }
        s.push_str("\n**Memory** (MiB; nginx: master and workers summed):\n\n| Proxy | Processes | VmRSS idle | VmRSS max under load (sampled every 250 ms) | VmHWM at the end |\n|---|---|---|---|---|\n");
        for (t, m) in &self.memory {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                t.label(),
                m.processes,
                mib(m.idle_rss_kib),
                mib(m.max_rss_kib),
                mib(m.hwm_kib)
            ));
        }
        s
    }
}

/// The sidecar's flags and environment beyond the defaults, for the
/// report's settings line (empty when there are none).
fn sidecar_settings(opts: &Options) -> String {
    let env = sidecar_env(&opts.sidecar_env);
    let mut s = String::new();
    if !opts.sidecar_args.is_empty() {
        s.push_str(&format!("; sidecar flags: {}", opts.sidecar_args.join(" ")));
    }
    if !opts.sidecar_env.is_empty() {
        let vars: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        s.push_str(&format!("; sidecar environment: {}", vars.join(" ")));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sidecar_runs_with_its_images_environment() {
        let file = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../images/strata-sidecar/Containerfile"
        );
        let text = std::fs::read_to_string(file).expect("the sidecar's Containerfile");
        let env: Vec<(String, String)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("ENV "))
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        let ours: Vec<(String, String)> = SIDECAR_IMAGE_ENV
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(env, ours, "{file}'s ENV lines and SIDECAR_IMAGE_ENV differ");
    }

    #[test]
    fn the_sidecar_environment_takes_overrides() {
        let o = |k: &str, v: &str| (k.to_string(), v.to_string());
        assert_eq!(sidecar_env(&[]), vec![o("MALLOC_ARENA_MAX", "2")]);
        assert_eq!(
            sidecar_env(&[o("MALLOC_ARENA_MAX", "1"), o("RUST_LOG", "warn")]),
            vec![o("MALLOC_ARENA_MAX", "1"), o("RUST_LOG", "warn")]
        );
        assert!(sidecar_env(&[o("MALLOC_ARENA_MAX", "")]).is_empty());
    }

    #[test]
    fn the_wrk_line_is_parsed() {
        let out = "Running 5s test @ http://127.0.0.1:1/v1/chat/completions\n  2 threads and 64 connections\nSTRATA-WRK requests=12345 duration_us=5000000 errors=2 status_errors=1 p50_us=812 p90_us=1500 p99_us=4200 max_us=9000\n";
        let r = parse_wrk(out).expect("parsed");
        assert_eq!(r.requests, 12345);
        assert_eq!(r.errors, 3);
        assert!((r.seconds - 5.0).abs() < 1e-9);
        assert!((r.rps() - 2469.0).abs() < 1e-9);
        assert!((r.p99_us - 4200.0).abs() < 1e-9);
        assert!(parse_wrk("no line").is_none());
        assert!(parse_wrk("STRATA-WRK requests=x").is_none());
    }

    #[test]
    fn the_wrk_script_quotes_the_body() {
        let s = wrk_script(r#"{"a":"it's \"x\""}"#);
        assert!(s.contains(r#"wrk.body = '{"a":"it\'s \\"x\\""}'"#), "{s}");
        assert!(s.contains("STRATA-WRK requests=%d"));
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn the_parent_pid_is_read_past_the_command() {
        let stat = "4242 (nginx: worker (x)) S 4200 4200 4200 0 -1 4194624 100 0 0 0 5 3 0 0 20 0";
        assert_eq!(parse_ppid(stat), Some(4200));
        assert_eq!(parse_ppid("garbage"), None);
    }

    #[test]
    fn request_bodies_and_nginx_conf() {
        let b: serde_json::Value = serde_json::from_str(&request_body(4, true)).expect("json");
        assert_eq!(b["stream"], true);
        assert_eq!(b["max_tokens"], 4);
        assert_eq!(b["model"], MODEL);
        let b: serde_json::Value = serde_json::from_str(&request_body(4, false)).expect("json");
        assert!(b.get("stream").is_none());
        let conf = nginx_conf(Path::new("/tmp/x"), 8081, 8000);
        assert!(conf.contains("listen 127.0.0.1:8081"));
        assert!(conf.contains("server 127.0.0.1:8000;"));
        assert!(conf.contains("proxy_buffering off;"));
        assert!(conf.contains("keepalive 1024;"));
    }
}
