//! Routing policies side by side (issue [13] item 4): a fixed set of
//! engine simulators behind the gateway's real router, the replica picked
//! by Strata's policy (prefix affinity with bounded load, else least
//! loaded), at random (what a Kubernetes Service does) or round-robin, the
//! same open-loop load against each.
//!
//! - **Replicas**: `strata-engine-sim` processes on 127.0.0.1 with vLLM's
//!   automatic prefix caching on (`--enable-prefix-caching`, a per-replica
//!   LRU of KV blocks) and prefills that take turns
//!   (`--prefill-concurrency 1`: a GPU's prompt tokens per second are
//!   shared), restarted for every cell so that no cell inherits another's
//!   cache. The gateway talks to them directly (no sidecar in between).
//! - **The gateway**: `strata_gateway::proxy::Gateway` in this process,
//!   fed a static table of the replicas (as `gateway/tests/route.rs`),
//!   served on a loopback port: the production request path, with
//!   `routing::Settings::policy` set per run.
//! - **The load**: open loop, Poisson arrivals at a fixed rate (seeded),
//!   streamed chat completions; each request's time to first token (the
//!   first token event), end-to-end time, output tokens and errors. Two
//!   workloads of the same lengths: shared prefixes (a few long system
//!   prompts, each request one of them and a user's own short question)
//!   and unique prompts (no two requests share their first block). The
//!   same seed gives the same requests at the same times to every policy.
//! - **Per cell** (policy x workload x rate): warm-up (not counted), then
//!   the measured window; the requests sent in the window count for TTFT
//!   (one that failed or did not finish within the drain counts as
//!   infinitely late), output tokens of requests that completed in the
//!   window for throughput, and the replicas' prefix cache hits over it.
//! - **Summary**: output tokens/s at the SLA (the best throughput among the
//!   rates whose TTFT p95 met it, with no errors), and the replicas each
//!   policy needs for the SLA at one rate (searched over 1..=N).
//! - **Overhead**: one client, requests alternating between one simulator
//!   with no delays and the gateway in front of it: added p50/p99.
//!
//! Every address is loopback.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use strata_core::routing::Policy;
use strata_gateway::metrics::Metrics;
use strata_gateway::proxy::{Gateway, Settings, WakeFn};
use strata_gateway::table::{ModelRoutes, Replica, Snapshot};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use crate::bench_sidecar::percentile;
use crate::process::Component;

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum RoutingBenchError {
    /// A process of the benchmark could not start or died.
    #[error(transparent)]
    World(#[from] crate::Error),
    /// The simulator binary is missing.
    #[error("{} not found; build it first: cargo build --release -p strata-e2e --bin strata-engine-sim --bin strata-bench-routing", path.display())]
    Binary {
        /// Where it was expected.
        path: PathBuf,
    },
    /// A step failed.
    #[error("{what}: {reason}")]
    Step {
        /// The step.
        what: String,
        /// What went wrong.
        reason: String,
    },
    /// The options do not make sense.
    #[error("invalid options: {0}")]
    Options(String),
}

/// Result of this module.
pub type Result<T, E = RoutingBenchError> = std::result::Result<T, E>;

fn step(what: impl Into<String>, reason: impl ToString) -> RoutingBenchError {
    RoutingBenchError::Step {
        what: what.into(),
        reason: reason.to_string(),
    }
}

/// The served model's name.
pub const MODEL: &str = "bench";
const PATH: &str = "/v1/chat/completions";

// ---------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------

/// The two workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Workload {
    /// A few long system prompts, each request one of them (uniformly) and
    /// a question of its own.
    SharedPrefix,
    /// Prompts of the same lengths, no two sharing their first block.
    Unique,
}

impl Workload {
    /// Both, in report order.
    pub const ALL: [Workload; 2] = [Workload::SharedPrefix, Workload::Unique];

    /// Its name on the command line and in the report.
    pub fn label(self) -> &'static str {
        match self {
            Self::SharedPrefix => "shared-prefix",
            Self::Unique => "unique",
        }
    }
}

impl std::str::FromStr for Workload {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|w| w.label() == s)
            .ok_or_else(|| format!("unknown workload {s:?}: shared-prefix or unique"))
    }
}

/// The requests' shape.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Shape {
    /// Distinct system prompts of the shared-prefix workload.
    pub system_prompts: usize,
    /// Characters of a system prompt (the simulator counts 4 per token).
    pub system_chars: usize,
    /// Characters of a user's question.
    pub user_chars: usize,
    /// Output tokens of every answer (`max_tokens`).
    pub output_tokens: u32,
}

/// The simulated engines.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Engine {
    /// `--max-batch`.
    pub max_batch: usize,
    /// `--prefill-ms-per-token`.
    pub prefill_ms_per_token: f64,
    /// `--prefill-concurrency`.
    pub prefill_concurrency: usize,
    /// `--itl-ms`.
    pub itl_ms: f64,
    /// `--itl-batch-factor`.
    pub itl_batch_factor: f64,
    /// `--block-size`.
    pub block_size: u32,
    /// `--num-gpu-blocks-override`: the prefix cache's size.
    pub cache_blocks: usize,
}

impl Engine {
    fn args(&self, port: u16) -> Vec<String> {
        [
            "--listen".to_string(),
            loopback(port).to_string(),
            "--model".into(),
            MODEL.into(),
            "--enable-prefix-caching".into(),
            "--max-batch".into(),
            self.max_batch.to_string(),
            "--prefill-ms-per-token".into(),
            self.prefill_ms_per_token.to_string(),
            "--prefill-concurrency".into(),
            self.prefill_concurrency.to_string(),
            "--itl-ms".into(),
            self.itl_ms.to_string(),
            "--itl-batch-factor".into(),
            self.itl_batch_factor.to_string(),
            "--block-size".into(),
            self.block_size.to_string(),
            "--num-gpu-blocks-override".into(),
            self.cache_blocks.to_string(),
        ]
        .into()
    }
}

/// How to run it.
#[derive(Debug, Clone)]
pub struct Options {
    /// The release-built `strata-engine-sim`.
    pub engine_sim: PathBuf,
    /// Working directory (logs).
    pub dir: PathBuf,
    /// Replicas of the simulator.
    pub replicas: usize,
    /// Policies compared.
    pub policies: Vec<Policy>,
    /// Workloads run.
    pub workloads: Vec<Workload>,
    /// Offered request rates, per second, rising.
    pub rates: Vec<f64>,
    /// The rate at which the replicas each policy needs are searched (none:
    /// not searched).
    pub replicas_rate: Option<f64>,
    /// Unmeasured load before each window.
    pub warmup: Duration,
    /// Each measured window.
    pub duration: Duration,
    /// How long requests may finish after the window.
    pub drain: Duration,
    /// The SLA: TTFT p95 at most this, ms.
    pub sla_ttft_p95_ms: f64,
    /// The requests.
    pub shape: Shape,
    /// The engines.
    pub engine: Engine,
    /// The gateway's `--load-factor`.
    pub load_factor: f64,
    /// The gateway's `--spill-floor`.
    pub spill_floor: u32,
    /// The gateway's `--prefix-chars`.
    pub prefix_chars: usize,
    /// Requests of each kind in the overhead measurement (0: skipped).
    pub overhead_requests: usize,
    /// The workloads' seed.
    pub seed: u64,
}

// ---------------------------------------------------------------------------
// Pure parts: random numbers, workloads, percentiles, the SLA
// ---------------------------------------------------------------------------

/// SplitMix64: small, seeded, reproducible.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    pub fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }
}

/// Poisson arrivals at `rate` per second over `span`: the send times, from
/// 0, rising (exponential gaps).
pub fn arrivals(rate: f64, span: Duration, rng: &mut Rng) -> Vec<Duration> {
    let mut out = Vec::new();
    if !(rate.is_finite() && rate > 0.0) {
        return out;
    }
    let end = span.as_secs_f64();
    let mut t = 0.0;
    loop {
        t += -rng.unit().ln() / rate;
        if t >= end {
            return out;
        }
        out.push(Duration::from_secs_f64(t));
    }
}

const WORDS: &[&str] = &[
    "the",
    "model",
    "answers",
    "questions",
    "about",
    "orders",
    "refunds",
    "shipping",
    "policy",
    "always",
    "never",
    "customer",
    "account",
    "service",
    "please",
    "polite",
    "brief",
    "detail",
    "invoice",
    "product",
    "return",
    "warranty",
    "support",
    "escalate",
    "summary",
    "context",
    "language",
    "format",
    "table",
    "list",
    "when",
    "unless",
    "example",
    "rule",
    "tone",
    "safety",
];

/// `chars` characters of word-like text (ASCII).
pub fn text(rng: &mut Rng, chars: usize) -> String {
    let mut s = String::with_capacity(chars + 16);
    while s.len() < chars {
        s.push_str(WORDS[rng.below(WORDS.len())]);
        s.push(' ');
    }
    s.truncate(chars);
    s
}

/// One planned request.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    /// When it is sent, from the start of the cell.
    pub at: Duration,
    /// Its system prompt's index (shared-prefix workload), if any.
    pub group: Option<usize>,
    /// The request body.
    pub body: Bytes,
}

/// Mixes a cell's identity into the seed, so that every policy gets the
/// same requests at the same times for a workload and rate.
pub fn cell_seed(seed: u64, workload: Workload, rate: f64) -> u64 {
    let w = match workload {
        Workload::SharedPrefix => 1u64,
        Workload::Unique => 2,
    };
    Rng::new(seed ^ w.wrapping_mul(0x1000_0000_01b3) ^ rate.to_bits().rotate_left(17)).next_u64()
}

/// A chat completion request body.
pub fn chat_body(system: &str, user: &str, output_tokens: u32) -> Bytes {
    Bytes::from(
        serde_json::json!({
            "model": MODEL,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": user},
            ],
            "max_tokens": output_tokens,
            "stream": true,
        })
        .to_string(),
    )
}

/// The system prompts of the shared-prefix workload (the same for every
/// rate and policy of a seed).
pub fn system_prompts(shape: &Shape, seed: u64) -> Vec<String> {
    let mut rng = Rng::new(seed);
    (0..shape.system_prompts)
        .map(|i| {
            let head = format!("You are assistant {i} of the support desk. ");
            let len = shape.system_chars.saturating_sub(head.len());
            format!("{head}{}", text(&mut rng, len))
        })
        .collect()
}

/// The requests of one cell: Poisson arrivals at `rate` over `span`, each
/// with its prompt. Shared prefix: a system prompt drawn uniformly from
/// `prompts` and a question of the user's own; unique: a system prompt of
/// the same length whose first characters are the request's own (so no
/// two share a KV block or a routing key), then a common filler.
pub fn plan(
    workload: Workload,
    shape: &Shape,
    prompts: &[String],
    rate: f64,
    span: Duration,
    seed: u64,
) -> Vec<Planned> {
    let mut rng = Rng::new(seed);
    let times = arrivals(rate, span, &mut rng);
    let filler = text(&mut Rng::new(seed ^ 0x5eed), shape.system_chars);
    times
        .into_iter()
        .enumerate()
        .map(|(i, at)| {
            let user = format!(
                "[user {:016x}] {}",
                rng.next_u64(),
                text(&mut rng, shape.user_chars.saturating_sub(24))
            );
            let (group, system) = match workload {
                Workload::SharedPrefix if !prompts.is_empty() => {
                    let g = rng.below(prompts.len());
                    (Some(g), prompts[g].clone())
                }
                _ => {
                    let head = format!("[conversation {i:08} {:016x}] ", rng.next_u64());
                    let len = shape.system_chars.saturating_sub(head.len());
                    (None, format!("{head}{}", &filler[..len.min(filler.len())]))
                }
            };
            Planned {
                at,
                group,
                body: chat_body(&system, &user, shape.output_tokens),
            }
        })
        .collect()
}

/// What happened to one request.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Sample {
    /// When it was sent, from the start of the cell.
    pub sent: Duration,
    /// Time to its first token event (none: it failed or never got one).
    pub ttft: Option<Duration>,
    /// When it completed, from the start of the cell (none: not completed).
    pub done: Option<Duration>,
    /// From sending to its end (completed only).
    pub e2e: Option<Duration>,
    /// Token events received.
    pub tokens: u32,
    /// It failed (status, stream error) rather than completing.
    pub error: bool,
}

/// One cell's figures.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Figures {
    /// Requests sent in the window.
    pub sent: u64,
    /// Of those, completed.
    pub completed: u64,
    /// Of those, failed.
    pub errors: u64,
    /// Of those, still going after the drain.
    pub unfinished: u64,
    /// Output tokens per second completed in the window.
    pub output_tokens_per_s: f64,
    /// Requests per second completed in the window.
    pub completed_per_s: f64,
    /// TTFT p50, ms (infinite when more than half never got a token).
    pub ttft_p50_ms: f64,
    /// TTFT p95, ms.
    pub ttft_p95_ms: f64,
    /// End-to-end p50 of completed requests, ms.
    pub e2e_p50_ms: f64,
    /// End-to-end p95 of completed requests, ms.
    pub e2e_p95_ms: f64,
}

/// The figures of the samples of requests sent in `[from, to)`.
pub fn figures(samples: &[Sample], from: Duration, to: Duration) -> Figures {
    let window: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.sent >= from && s.sent < to)
        .collect();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut ttft: Vec<f64> = window
        .iter()
        .map(|s| match (s.ttft, s.error) {
            (Some(t), false) => ms(t),
            _ => f64::INFINITY,
        })
        .collect();
    ttft.sort_by(f64::total_cmp);
    let mut e2e: Vec<f64> = window.iter().filter_map(|s| s.e2e.map(ms)).collect();
    e2e.sort_by(f64::total_cmp);
    let secs = (to.saturating_sub(from)).as_secs_f64().max(1e-9);
    let finished_in = |s: &&Sample| s.done.is_some_and(|d| d >= from && d < to) && !s.error;
    let in_window: Vec<&Sample> = samples.iter().filter(finished_in).collect();
    Figures {
        sent: window.len() as u64,
        completed: window
            .iter()
            .filter(|s| s.done.is_some() && !s.error)
            .count() as u64,
        errors: window.iter().filter(|s| s.error).count() as u64,
        unfinished: window
            .iter()
            .filter(|s| s.done.is_none() && !s.error)
            .count() as u64,
        output_tokens_per_s: in_window.iter().map(|s| f64::from(s.tokens)).sum::<f64>() / secs,
        completed_per_s: in_window.len() as f64 / secs,
        ttft_p50_ms: percentile(&ttft, 50.0),
        ttft_p95_ms: percentile(&ttft, 95.0),
        e2e_p50_ms: percentile(&e2e, 50.0),
        e2e_p95_ms: percentile(&e2e, 95.0),
    }
}

impl Figures {
    /// Whether the cell met the SLA: TTFT p95 within `sla_ms`, every
    /// request answered.
    pub fn meets(&self, sla_ms: f64) -> bool {
        self.sent > 0 && self.errors == 0 && self.unfinished == 0 && self.ttft_p95_ms <= sla_ms
    }
}

/// Output tokens/s at the SLA: the best throughput among the cells that
/// met it (0 when none did).
pub fn at_sla(cells: &[Figures], sla_ms: f64) -> f64 {
    cells
        .iter()
        .filter(|f| f.meets(sla_ms))
        .map(|f| f.output_tokens_per_s)
        .fold(0.0, f64::max)
}

/// The search for the fewest replicas in `1..=max` that meet the SLA,
/// taking meeting it as monotone in the replicas: `max` first (if it
/// fails, none will), then a binary search. Pure: [`Search::next`] says
/// which count to measure, [`Search::record`] takes the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Search {
    max: usize,
    lo: usize,
    hi: usize,
    /// Whether `max` met it (unknown until measured).
    top: Option<bool>,
    /// Counts measured, and whether each met it.
    pub tried: BTreeMap<usize, bool>,
}

impl Search {
    /// A search over `1..=max`.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            lo: 1,
            hi: max,
            top: None,
            tried: BTreeMap::new(),
        }
    }

    /// The next count to measure; `None` when the answer is known.
    pub fn next(&self) -> Option<usize> {
        if self.max == 0 {
            return None;
        }
        match self.top {
            None => Some(self.max),
            Some(false) => None,
            Some(true) if self.lo < self.hi => Some(self.lo + (self.hi - self.lo) / 2),
            Some(true) => None,
        }
    }

    /// Whether `n` replicas met the SLA.
    pub fn record(&mut self, n: usize, meets: bool) {
        self.tried.insert(n, meets);
        if self.top.is_none() {
            self.top = Some(meets);
            return;
        }
        if meets {
            self.hi = n;
        } else {
            self.lo = n + 1;
        }
    }

    /// The answer once [`Search::next`] is `None`: the fewest that met it,
    /// or `None` when even `max` did not.
    pub fn fewest(&self) -> Option<usize> {
        (self.top == Some(true)).then_some(self.hi)
    }
}

/// The value of a counter sample (`name{...} value`) in Prometheus text,
/// summed over label sets; 0 when absent.
pub fn counter(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// ---------------------------------------------------------------------------
// The world: simulators and the gateway
// ---------------------------------------------------------------------------

fn free_port() -> Result<u16> {
    crate::ports::free_port().map_err(|e| step("a free port", e))
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

async fn wait_ready(comp: &mut Component, addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        comp.check_running()?;
        if let Ok(r) = crate::http::get(addr, "/health", Duration::from_secs(2)).await
            && r.status == 200
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(step(
                format!("waiting for {} at {addr}", comp.name),
                "no 200 within 30 s",
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Simulators on loopback ports.
struct Sims {
    procs: Vec<Component>,
    addrs: Vec<SocketAddr>,
}

impl Sims {
    async fn start(program: &Path, dir: &Path, engine: &Engine, n: usize) -> Result<Self> {
        let mut sims = Sims {
            procs: Vec::new(),
            addrs: Vec::new(),
        };
        for i in 0..n {
            let port = free_port()?;
            let started = Component::spawn(
                &format!("sim-{i}"),
                program,
                &engine.args(port),
                &[("RUST_LOG".into(), "warn".into())],
                dir,
            );
            let mut c = match started {
                Ok(c) => c,
                Err(e) => {
                    sims.stop().await;
                    return Err(e.into());
                }
            };
            let ready = wait_ready(&mut c, loopback(port)).await;
            sims.procs.push(c);
            sims.addrs.push(loopback(port));
            if let Err(e) = ready {
                sims.stop().await;
                return Err(e);
            }
        }
        Ok(sims)
    }

    /// Prefix cache (queries, hits) summed over the replicas, in tokens.
    async fn cache(&self) -> (f64, f64) {
        let mut q = 0.0;
        let mut h = 0.0;
        for a in &self.addrs {
            if let Ok(r) = crate::http::get(*a, "/metrics", Duration::from_secs(5)).await {
                q += counter(&r.body, "vllm:prefix_cache_queries_total");
                h += counter(&r.body, "vllm:prefix_cache_hits_total");
            }
        }
        (q, h)
    }

    async fn stop(&mut self) {
        for p in &mut self.procs {
            p.stop(Duration::from_secs(5)).await;
        }
    }
}

/// The gateway's router on a loopback port, fed a static table.
struct GatewayRun {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    metrics: Metrics,
    _table: watch::Sender<Arc<Snapshot>>,
}

impl GatewayRun {
    async fn start(opts: &Options, policy: Policy, replicas: &[SocketAddr]) -> Result<Self> {
        let snapshot = Snapshot {
            models: vec![ModelRoutes {
                namespace: "bench".into(),
                name: MODEL.into(),
                served: MODEL.into(),
                adapters: Default::default(),
                wakeable: false,
                replicas: replicas
                    .iter()
                    .enumerate()
                    .map(|(i, addr)| Replica {
                        name: format!("{MODEL}-replica-{i}"),
                        addr: *addr,
                        adapters: Default::default(),
                    })
                    .collect(),
            }],
            synced: true,
        };
        let (tx, rx) = watch::channel(Arc::new(snapshot));
        let metrics = Metrics::new().map_err(|e| step("the gateway's metrics", e))?;
        let mut settings = Settings {
            prefix_chars: opts.prefix_chars,
            ..Settings::default()
        };
        settings.routing.policy = policy;
        settings.routing.load_factor = opts.load_factor.max(1.0);
        settings.routing.spill_floor = opts.spill_floor;
        let wake: WakeFn = Arc::new(|_, _| Box::pin(async { Ok(()) }));
        let gateway = Gateway::new(rx, wake, settings, metrics.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| step("the gateway's port", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| step("the gateway's port", e))?;
        let (stop, stopped) = oneshot::channel::<()>();
        let kept = metrics.clone();
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            if let Err(e) = strata_gateway::proxy::serve(listener, gateway, shutdown).await {
                tracing::error!("the gateway: {e}");
            }
        });
        Ok(Self {
            addr,
            stop: Some(stop),
            metrics: kept,
            _table: tx,
        })
    }

    /// Requests forwarded so far by the pick's reason (`prefix`,
    /// `spilled_over`, ...), every status.
    fn reasons(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for family in self
            .metrics
            .registry
            .gather()
            .into_iter()
            .filter(|f| f.name() == "strata_gateway_requests_total")
        {
            for m in family.get_metric() {
                let reason = m
                    .get_label()
                    .iter()
                    .find(|l| l.name() == "reason")
                    .map(|l| l.value().to_string())
                    .unwrap_or_default();
                *out.entry(reason).or_default() += m.get_counter().value() as u64;
            }
        }
        out
    }
}

impl Drop for GatewayRun {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

// ---------------------------------------------------------------------------
// The load
// ---------------------------------------------------------------------------

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client(idle: usize) -> HttpClient {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(idle)
        .build(c)
}

/// One streamed request: (time to the first token event, token events),
/// or why it failed.
async fn one(
    client: &HttpClient,
    uri: &http::Uri,
    body: Bytes,
) -> std::result::Result<(Option<Duration>, u32), String> {
    let req = http::Request::post(uri.clone())
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status()));
    }
    let mut body = resp.into_body();
    let mut splitter = strata_sidecar::sse::Splitter::default();
    let mut first = None;
    let mut tokens = 0u32;
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
                tokens += 1;
                first.get_or_insert(at);
            }
        }
    }
    Ok((first, tokens))
}

/// Sends `plan` open loop to `addr` and waits for the answers until `end`
/// (from the start); what happened to each request.
async fn drive(addr: SocketAddr, plan: Vec<Planned>, end: Duration) -> Result<Vec<Sample>> {
    let client = client(4096);
    let uri: http::Uri = format!("http://{addr}{PATH}")
        .parse()
        .map_err(|e| step("the URI", e))?;
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for p in plan {
        tokio::time::sleep_until(start + p.at).await;
        let (client, uri) = (client.clone(), uri.clone());
        tasks.spawn(async move {
            let sent = start.elapsed();
            let r = one(&client, &uri, p.body).await;
            let done = start.elapsed();
            match r {
                Ok((ttft, tokens)) => Sample {
                    sent,
                    ttft,
                    done: Some(done),
                    e2e: Some(done.saturating_sub(sent)),
                    tokens,
                    error: tokens == 0,
                },
                Err(e) => {
                    tracing::debug!("request: {e}");
                    Sample {
                        sent,
                        error: true,
                        ..Sample::default()
                    }
                }
            }
        });
    }
    let mut samples = Vec::new();
    let deadline = start + end;
    loop {
        match tokio::time::timeout_at(deadline, tasks.join_next()).await {
            Ok(Some(Ok(s))) => samples.push(s),
            Ok(Some(Err(e))) => return Err(step("a request's task", e)),
            Ok(None) => break,
            Err(_) => {
                // Still going: counted as unfinished (sent times unknown
                // here, so they are taken as sent in the window).
                let left = tasks.len();
                tasks.abort_all();
                samples.extend((0..left).map(|_| Sample {
                    sent: Duration::MAX,
                    ..Sample::default()
                }));
                break;
            }
        }
    }
    Ok(samples)
}

/// Sends every system prompt once through the gateway, all at once, and
/// waits for the answers: the caches start where the policy puts each
/// prompt, not empty (the warm-up then brings them to their steady state).
async fn prime(addr: SocketAddr, prompts: &[String], shape: &Shape) -> Result<()> {
    let plan: Vec<Planned> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| Planned {
            at: Duration::ZERO,
            group: Some(i),
            body: chat_body(p, "[priming]", shape.output_tokens.min(2)),
        })
        .collect();
    let n = plan.len();
    let samples = drive(addr, plan, Duration::from_secs(60)).await?;
    let failed = samples
        .iter()
        .filter(|s| s.error || s.done.is_none())
        .count();
    if failed > 0 {
        return Err(step(
            "priming the caches",
            format!("{failed} of {n} requests failed"),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Cells
// ---------------------------------------------------------------------------

/// One cell's result.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Cell {
    /// The policy.
    pub policy: Policy,
    /// The workload.
    pub workload: Workload,
    /// Offered requests per second.
    pub rate: f64,
    /// Replicas.
    pub replicas: usize,
    /// What the load saw.
    pub figures: Figures,
    /// Share of prompt tokens found in the replicas' prefix caches over
    /// the window and drain.
    pub cache_hit_rate: f64,
    /// Whether it met the SLA.
    pub meets_sla: bool,
    /// Share of the cell's requests (warm-up included, priming not) that
    /// Strata's pick spilled off their prefix's replica (bounded load).
    pub spilled: f64,
}

/// The share of `reason` among the counts.
pub fn share(counts: &BTreeMap<String, u64>, reason: &str) -> f64 {
    let total: u64 = counts.values().sum();
    if total == 0 {
        return 0.0;
    }
    counts.get(reason).copied().unwrap_or(0) as f64 / total as f64
}

async fn run_cell(
    opts: &Options,
    prompts: &[String],
    policy: Policy,
    workload: Workload,
    rate: f64,
    replicas: usize,
) -> Result<Cell> {
    let from = opts.warmup;
    let to = opts.warmup + opts.duration;
    let plan = plan(
        workload,
        &opts.shape,
        prompts,
        rate,
        to,
        cell_seed(opts.seed, workload, rate),
    );
    let mut sims = Sims::start(&opts.engine_sim, &opts.dir, &opts.engine, replicas).await?;
    let result = async {
        let gw = GatewayRun::start(opts, policy, &sims.addrs).await?;
        if workload == Workload::SharedPrefix {
            prime(gw.addr, prompts, &opts.shape).await?;
        }
        let primed = gw.reasons();
        let load = drive(gw.addr, plan, to + opts.drain);
        let before = async {
            tokio::time::sleep(from).await;
            sims.cache().await
        };
        let (samples, (q0, h0)) = tokio::join!(load, before);
        let samples = samples?;
        let (q1, h1) = sims.cache().await;
        let mut reasons = gw.reasons();
        for (k, v) in primed {
            if let Some(n) = reasons.get_mut(&k) {
                *n = n.saturating_sub(v);
            }
        }
        drop(gw);
        // Unfinished requests were sent before the window's end.
        let samples: Vec<Sample> = samples
            .into_iter()
            .map(|s| {
                if s.sent == Duration::MAX {
                    Sample { sent: from, ..s }
                } else {
                    s
                }
            })
            .collect();
        let f = figures(&samples, from, to);
        let queries = q1 - q0;
        Ok::<_, RoutingBenchError>(Cell {
            policy,
            workload,
            rate,
            replicas,
            figures: f,
            cache_hit_rate: if queries > 0.0 {
                (h1 - h0) / queries
            } else {
                0.0
            },
            meets_sla: f.meets(opts.sla_ttft_p95_ms),
            spilled: share(&reasons, "spilled_over"),
        })
    }
    .await;
    sims.stop().await;
    let cell = result?;
    tracing::info!(
        policy = %policy,
        workload = workload.label(),
        rate,
        replicas,
        tokens_per_s = format!("{:.0}", cell.figures.output_tokens_per_s),
        ttft_p50_ms = format!("{:.0}", cell.figures.ttft_p50_ms),
        ttft_p95_ms = format!("{:.0}", cell.figures.ttft_p95_ms),
        hit = format!("{:.2}", cell.cache_hit_rate),
        errors = cell.figures.errors,
        unfinished = cell.figures.unfinished,
        sla = cell.meets_sla,
        "cell"
    );
    Ok(cell)
}

// ---------------------------------------------------------------------------
// Overhead
// ---------------------------------------------------------------------------

/// The gateway's added latency at one client.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Overhead {
    /// Requests of each kind.
    pub requests: usize,
    /// Direct to the simulator: end-to-end p50, ms.
    pub direct_p50_ms: f64,
    /// p99.
    pub direct_p99_ms: f64,
    /// Through the gateway: p50, ms.
    pub gateway_p50_ms: f64,
    /// p99.
    pub gateway_p99_ms: f64,
    /// Direct TTFT p50 / p99 and through the gateway, ms.
    pub direct_ttft_p50_ms: f64,
    /// p99.
    pub direct_ttft_p99_ms: f64,
    /// Through the gateway.
    pub gateway_ttft_p50_ms: f64,
    /// p99.
    pub gateway_ttft_p99_ms: f64,
    /// Failed requests (both kinds).
    pub errors: usize,
}

async fn overhead(opts: &Options, body: Bytes) -> Result<Overhead> {
    let engine = Engine {
        max_batch: 100_000,
        prefill_ms_per_token: 0.0,
        prefill_concurrency: 0,
        itl_ms: 0.0,
        itl_batch_factor: 0.0,
        ..opts.engine
    };
    let mut sims = Sims::start(&opts.engine_sim, &opts.dir, &engine, 1).await?;
    let result = async {
        let gw = GatewayRun::start(opts, Policy::Strata, &sims.addrs).await?;
        let c = client(4);
        let direct: http::Uri = format!("http://{}{PATH}", sims.addrs[0])
            .parse()
            .map_err(|e| step("the URI", e))?;
        let through: http::Uri = format!("http://{}{PATH}", gw.addr)
            .parse()
            .map_err(|e| step("the URI", e))?;
        let warm = (opts.overhead_requests / 10).max(20);
        let mut d = (Vec::new(), Vec::new());
        let mut g = (Vec::new(), Vec::new());
        let mut errors = 0;
        let ms = |x: Duration| x.as_secs_f64() * 1000.0;
        for i in 0..(warm + opts.overhead_requests) * 2 {
            let (uri, into) = if i % 2 == 0 {
                (&direct, &mut d)
            } else {
                (&through, &mut g)
            };
            let t0 = Instant::now();
            let r = one(&c, uri, body.clone()).await;
            let total = t0.elapsed();
            if i / 2 < warm {
                continue;
            }
            match r {
                Ok((Some(first), _)) => {
                    into.0.push(ms(total));
                    into.1.push(ms(first));
                }
                _ => errors += 1,
            }
        }
        drop(gw);
        for v in [&mut d.0, &mut d.1, &mut g.0, &mut g.1] {
            v.sort_by(f64::total_cmp);
        }
        Ok(Overhead {
            requests: opts.overhead_requests,
            direct_p50_ms: percentile(&d.0, 50.0),
            direct_p99_ms: percentile(&d.0, 99.0),
            gateway_p50_ms: percentile(&g.0, 50.0),
            gateway_p99_ms: percentile(&g.0, 99.0),
            direct_ttft_p50_ms: percentile(&d.1, 50.0),
            direct_ttft_p99_ms: percentile(&d.1, 99.0),
            gateway_ttft_p50_ms: percentile(&g.1, 50.0),
            gateway_ttft_p99_ms: percentile(&g.1, 99.0),
            errors,
        })
    }
    .await;
    sims.stop().await;
    result
}

// ---------------------------------------------------------------------------
// The run and its report
// ---------------------------------------------------------------------------

/// Replicas a policy needs for the SLA at a rate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Needed {
    /// The policy.
    pub policy: Policy,
    /// The workload.
    pub workload: Workload,
    /// The offered rate.
    pub rate: f64,
    /// The fewest replicas that met the SLA (none: not even the most).
    pub replicas: Option<usize>,
    /// Replica counts tried and whether each met it.
    pub tried: Vec<(usize, bool)>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// When it ended.
    pub date: String,
    /// The machine.
    pub machine: String,
    /// Load average before and after.
    pub load_before: String,
    /// After.
    pub load_after: String,
    /// Minutes it took.
    pub minutes: f64,
    /// Replicas of the grid.
    pub replicas: usize,
    /// The SLA, ms.
    pub sla_ttft_p95_ms: f64,
    /// Measured seconds per cell, and warm-up.
    pub seconds: f64,
    /// Warm-up seconds.
    pub warmup_seconds: f64,
    /// The requests.
    pub shape: Shape,
    /// The engines.
    pub engine: Engine,
    /// The gateway's load factor.
    pub load_factor: f64,
    /// The gateway's spill floor.
    pub spill_floor: u32,
    /// The seed.
    pub seed: u64,
    /// Every cell of the grid.
    pub cells: Vec<Cell>,
    /// The replicas search.
    pub needed: Vec<Needed>,
    /// The gateway's added latency.
    pub overhead: Option<Overhead>,
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Runs the benchmark.
pub async fn run(opts: &Options) -> Result<Report> {
    if opts.replicas == 0 || opts.policies.is_empty() || opts.workloads.is_empty() {
        return Err(RoutingBenchError::Options(
            "--replicas, --policies and --workloads must not be empty".into(),
        ));
    }
    if opts.rates.is_empty() || opts.rates.iter().any(|r| !(r.is_finite() && *r > 0.0)) {
        return Err(RoutingBenchError::Options(
            "--rates must be positive numbers".into(),
        ));
    }
    if opts.shape.output_tokens == 0 || opts.shape.system_prompts == 0 {
        return Err(RoutingBenchError::Options(
            "--output-tokens and --system-prompts at least 1".into(),
        ));
    }
    if !opts.engine_sim.exists() {
        return Err(RoutingBenchError::Binary {
            path: opts.engine_sim.clone(),
        });
    }
    let began = Instant::now();
    let load_before = loadavg();
    let prompts = system_prompts(&opts.shape, opts.seed);
    let overhead = if opts.overhead_requests > 0 {
        let body = chat_body(&prompts[0], "How do I return an order?", 4);
        let o = overhead(opts, body).await?;
        tracing::info!(?o, "overhead");
        Some(o)
    } else {
        None
    };
    let mut cells = Vec::new();
    for &workload in &opts.workloads {
        for &rate in &opts.rates {
            for &policy in &opts.policies {
                cells.push(run_cell(opts, &prompts, policy, workload, rate, opts.replicas).await?);
            }
        }
    }
    let mut needed = Vec::new();
    if let Some(rate) = opts.replicas_rate {
        for &workload in &opts.workloads {
            for &policy in &opts.policies {
                let known: BTreeMap<usize, bool> = cells
                    .iter()
                    .filter(|c| c.policy == policy && c.workload == workload && c.rate == rate)
                    .map(|c| (c.replicas, c.meets_sla))
                    .collect();
                let mut search = Search::new(opts.replicas);
                while let Some(n) = search.next() {
                    let meets = match known.get(&n) {
                        Some(m) => *m,
                        None => {
                            run_cell(opts, &prompts, policy, workload, rate, n)
                                .await?
                                .meets_sla
                        }
                    };
                    search.record(n, meets);
                }
                needed.push(Needed {
                    policy,
                    workload,
                    rate,
                    replicas: search.fewest(),
                    tried: search.tried.into_iter().collect(),
                });
            }
        }
    }
    Ok(Report {
        date: k8s_openapi::jiff::Timestamp::now().to_string(),
        machine: crate::bench_memory::machine(),
        load_before,
        load_after: loadavg(),
        minutes: began.elapsed().as_secs_f64() / 60.0,
        replicas: opts.replicas,
        sla_ttft_p95_ms: opts.sla_ttft_p95_ms,
        seconds: opts.duration.as_secs_f64(),
        warmup_seconds: opts.warmup.as_secs_f64(),
        shape: opts.shape,
        engine: opts.engine,
        load_factor: opts.load_factor,
        spill_floor: opts.spill_floor,
        seed: opts.seed,
        cells,
        needed,
        overhead,
    })
}

fn ms(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.0}")
    } else {
        "∞".into()
    }
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a.is_finite() && b.is_finite() {
        format!("{:.2}×", a / b)
    } else if a > 0.0 && b == 0.0 {
        "∞ (random: none)".into()
    } else {
        "–".into()
    }
}

impl Report {
    fn cell(&self, policy: Policy, workload: Workload, rate: f64) -> Option<&Cell> {
        self.cells.iter().find(|c| {
            c.policy == policy
                && c.workload == workload
                && c.rate == rate
                && c.replicas == self.replicas
        })
    }

    fn policies(&self) -> Vec<Policy> {
        let mut p: Vec<Policy> = self.cells.iter().map(|c| c.policy).collect();
        p.sort_unstable();
        p.dedup();
        p
    }

    fn workloads(&self) -> Vec<Workload> {
        let mut w: Vec<Workload> = self.cells.iter().map(|c| c.workload).collect();
        w.sort_unstable();
        w.dedup();
        w
    }

    fn rates(&self) -> Vec<f64> {
        let mut r: Vec<f64> = self.cells.iter().map(|c| c.rate).collect();
        r.sort_by(f64::total_cmp);
        r.dedup();
        r
    }

    /// The Markdown of docs/benchmarks.md.
    pub fn markdown(&self) -> String {
        let e = &self.engine;
        let sh = &self.shape;
        let mut s = format!(
            "{}; {}; load average {} before, {} after; {:.1} min. {} replicas of strata-engine-sim (prefix caching on, {} blocks of {} tokens each; --max-batch {}, --prefill-ms-per-token {}, --prefill-concurrency {}, --itl-ms {}, --itl-batch-factor {}); gateway load factor {}, spill floor {}; streamed chat completions, {} output tokens; shared-prefix: {} system prompts of {} characters (~{} tokens) and a {}-character question; unique: the same lengths; Poisson arrivals, seed {}; {} s warm-up then {} s measured per cell; SLA: TTFT p95 ≤ {} ms and no errors.\n\n",
            self.date,
            self.machine,
            self.load_before,
            self.load_after,
            self.minutes,
            self.replicas,
            e.cache_blocks,
            e.block_size,
            e.max_batch,
            e.prefill_ms_per_token,
            e.prefill_concurrency,
            e.itl_ms,
            e.itl_batch_factor,
            self.load_factor,
            self.spill_floor,
            sh.output_tokens,
            sh.system_prompts,
            sh.system_chars,
            sh.system_chars / 4,
            sh.user_chars,
            self.seed,
            self.warmup_seconds,
            self.seconds,
            self.sla_ttft_p95_ms,
        );
        let policies = self.policies();
        let rates = self.rates();
        for w in self.workloads() {
            s.push_str(&format!(
                "**{}** ({} replicas; ms; hits: prompt tokens found in the replicas' prefix caches; spilled: Strata's picks off the prefix's own replica, bounded load):\n\n",
                w.label(),
                self.replicas
            ));
            s.push_str("| Rate (req/s) | Policy | Output tok/s | TTFT p50 / p95 | TTFT p95 vs random | E2E p50 / p95 | Prefix cache hits | Spilled | Sent / errors / unfinished | SLA |\n|---|---|---|---|---|---|---|---|---|---|\n");
            for &r in &rates {
                let random = self.cell(Policy::Random, w, r);
                for &p in &policies {
                    let Some(c) = self.cell(p, w, r) else {
                        continue;
                    };
                    let f = &c.figures;
                    s.push_str(&format!(
                        "| {r} | {p} | {:.0} | {} / {} | {} | {} / {} | {:.0} % | {} | {} / {} / {} | {} |\n",
                        f.output_tokens_per_s,
                        ms(f.ttft_p50_ms),
                        ms(f.ttft_p95_ms),
                        random.map_or("–".into(), |x| ratio(f.ttft_p95_ms, x.figures.ttft_p95_ms)),
                        ms(f.e2e_p50_ms),
                        ms(f.e2e_p95_ms),
                        c.cache_hit_rate * 100.0,
                        if p == Policy::Strata {
                            format!("{:.0} %", c.spilled * 100.0)
                        } else {
                            "–".into()
                        },
                        f.sent,
                        f.errors,
                        f.unfinished,
                        if c.meets_sla { "met" } else { "missed" },
                    ));
                }
            }
            s.push('\n');
        }
        s.push_str("**Summary** (output tokens/s at the SLA: the best throughput among the rates that met it; replicas needed: the fewest that meet the SLA at the rate, searched over 1..");
        s.push_str(&format!("{}):\n\n", self.replicas));
        s.push_str("| Workload | Policy | Output tok/s at the SLA | vs random | Highest rate meeting the SLA | Replicas needed (rate; counts tried) |\n|---|---|---|---|---|---|\n");
        for w in self.workloads() {
            let best = |p: Policy| {
                let cells: Vec<Figures> = rates
                    .iter()
                    .filter_map(|&r| self.cell(p, w, r).map(|c| c.figures))
                    .collect();
                at_sla(&cells, self.sla_ttft_p95_ms)
            };
            let random = best(Policy::Random);
            for &p in &policies {
                let b = best(p);
                let top = rates
                    .iter()
                    .rev()
                    .find(|&&r| self.cell(p, w, r).is_some_and(|c| c.meets_sla))
                    .map_or("none".into(), |r| format!("{r} req/s"));
                let needed = self
                    .needed
                    .iter()
                    .find(|n| n.policy == p && n.workload == w)
                    .map_or("–".into(), |n| {
                        let tried: Vec<String> = n
                            .tried
                            .iter()
                            .map(|(k, m)| format!("{k}{}", if *m { "✓" } else { "✗" }))
                            .collect();
                        format!(
                            "{} ({} req/s; {})",
                            n.replicas
                                .map_or(format!("> {}", self.replicas), |r| r.to_string()),
                            n.rate,
                            tried.join(" ")
                        )
                    });
                s.push_str(&format!(
                    "| {} | {p} | {b:.0} | {} | {top} | {needed} |\n",
                    w.label(),
                    if p == Policy::Random {
                        "1.00×".into()
                    } else {
                        ratio(b, random)
                    },
                ));
            }
        }
        s.push('\n');
        if let Some(o) = &self.overhead {
            s.push_str(&format!(
                "**Gateway overhead** (1 client, {} requests each way, alternating: one simulator with no delays direct, and the gateway in front of it; streamed, {}-character prompt, 4 tokens; ms):\n\n",
                o.requests,
                sh.system_chars + 25
            ));
            s.push_str("| Path | TTFT p50 / p99 | End-to-end p50 / p99 |\n|---|---|---|\n");
            s.push_str(&format!(
                "| direct | {:.3} / {:.3} | {:.3} / {:.3} |\n| through the gateway | {:.3} / {:.3} | {:.3} / {:.3} |\n| added | {:+.3} / {:+.3} | {:+.3} / {:+.3} |\n\n",
                o.direct_ttft_p50_ms,
                o.direct_ttft_p99_ms,
                o.direct_p50_ms,
                o.direct_p99_ms,
                o.gateway_ttft_p50_ms,
                o.gateway_ttft_p99_ms,
                o.gateway_p50_ms,
                o.gateway_p99_ms,
                o.gateway_ttft_p50_ms - o.direct_ttft_p50_ms,
                o.gateway_ttft_p99_ms - o.direct_ttft_p99_ms,
                o.gateway_p50_ms - o.direct_p50_ms,
                o.gateway_p99_ms - o.direct_p99_ms,
            ));
            if o.errors > 0 {
                s.push_str(&format!("{} requests failed.\n\n", o.errors));
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> Shape {
        Shape {
            system_prompts: 4,
            system_chars: 800,
            user_chars: 100,
            output_tokens: 8,
        }
    }

    #[test]
    fn arrivals_are_poisson_at_the_rate_and_reproducible() {
        let a = arrivals(20.0, Duration::from_secs(500), &mut Rng::new(7));
        let b = arrivals(20.0, Duration::from_secs(500), &mut Rng::new(7));
        assert_eq!(a, b);
        // 10,000 expected; the count's sd is 100.
        assert!((9_600..=10_400).contains(&a.len()), "{}", a.len());
        assert!(a.windows(2).all(|w| w[0] <= w[1]));
        assert!(a.iter().all(|t| *t < Duration::from_secs(500)));
        // Exponential gaps: the share above the mean is 1/e.
        let gaps: Vec<f64> = a.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).collect();
        let above = gaps.iter().filter(|g| **g > 0.05).count() as f64 / gaps.len() as f64;
        assert!((above - (-1f64).exp()).abs() < 0.02, "{above}");
        assert!(arrivals(0.0, Duration::from_secs(5), &mut Rng::new(1)).is_empty());
        assert_ne!(
            a,
            arrivals(20.0, Duration::from_secs(500), &mut Rng::new(8))
        );
    }

    #[test]
    fn shared_prefix_requests_share_a_few_system_prompts_and_unique_ones_share_nothing() {
        let sh = shape();
        let prompts = system_prompts(&sh, 1);
        assert_eq!(prompts.len(), 4);
        assert!(prompts.iter().all(|p| p.len() == 800));
        let seed = cell_seed(1, Workload::SharedPrefix, 10.0);
        let shared = plan(
            Workload::SharedPrefix,
            &sh,
            &prompts,
            10.0,
            Duration::from_secs(60),
            seed,
        );
        assert_eq!(
            shared,
            plan(
                Workload::SharedPrefix,
                &sh,
                &prompts,
                10.0,
                Duration::from_secs(60),
                seed
            )
        );
        let groups: std::collections::BTreeSet<usize> =
            shared.iter().filter_map(|p| p.group).collect();
        assert_eq!(groups.len(), 4);
        let texts = |p: &Planned| -> (String, String) {
            let v: serde_json::Value = serde_json::from_slice(&p.body).expect("json");
            assert_eq!(v["stream"], true);
            assert_eq!(v["max_tokens"], 8);
            (
                v["messages"][0]["content"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
                v["messages"][1]["content"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            )
        };
        for p in &shared {
            let (sys, user) = texts(p);
            assert_eq!(Some(sys.as_str()), p.group.map(|g| prompts[g].as_str()));
            assert_eq!(user.len(), 100);
        }
        // Users' questions are their own.
        let users: std::collections::BTreeSet<String> = shared.iter().map(|p| texts(p).1).collect();
        assert_eq!(users.len(), shared.len());
        let unique = plan(
            Workload::Unique,
            &sh,
            &prompts,
            10.0,
            Duration::from_secs(60),
            cell_seed(1, Workload::Unique, 10.0),
        );
        let firsts: std::collections::BTreeSet<String> = unique
            .iter()
            .map(|p| {
                let (sys, user) = texts(p);
                assert_eq!((sys.len(), user.len()), (800, 100));
                // The first KV block (16 tokens, 64 characters) is its own.
                sys[..64].to_string()
            })
            .collect();
        assert_eq!(firsts.len(), unique.len());
        assert!(unique.iter().all(|p| p.group.is_none()));
        // Every policy gets the same cell; another rate another one.
        assert_ne!(
            cell_seed(1, Workload::Unique, 10.0),
            cell_seed(1, Workload::Unique, 20.0)
        );
        assert_ne!(
            cell_seed(1, Workload::Unique, 10.0),
            cell_seed(1, Workload::SharedPrefix, 10.0)
        );
    }

    fn sample(sent_ms: u64, ttft_ms: Option<u64>, done_ms: Option<u64>, tokens: u32) -> Sample {
        let d = Duration::from_millis;
        Sample {
            sent: d(sent_ms),
            ttft: ttft_ms.map(d),
            done: done_ms.map(d),
            e2e: done_ms.map(|x| d(x - sent_ms)),
            tokens,
            error: false,
        }
    }

    #[test]
    fn figures_count_the_window_and_late_requests_as_infinitely_late() {
        let mut s: Vec<Sample> = (0..100)
            .map(|i| sample(1000 + i * 10, Some(10 + i), Some(1500 + i * 10), 8))
            .collect();
        // Before the window: not counted for TTFT, but its tokens are
        // when it completes inside.
        s.push(sample(500, Some(5000), Some(1200), 8));
        let f = figures(&s, Duration::from_secs(1), Duration::from_secs(3));
        assert_eq!(
            (f.sent, f.completed, f.errors, f.unfinished),
            (100, 100, 0, 0)
        );
        assert_eq!(f.ttft_p50_ms, 59.0);
        assert_eq!(f.ttft_p95_ms, 104.0);
        assert_eq!(f.e2e_p50_ms, 500.0);
        // 101 completions inside [1 s, 3 s): 808 tokens over 2 s.
        assert_eq!(f.output_tokens_per_s, 404.0);
        assert!(f.meets(104.0));
        assert!(!f.meets(103.0));
        // Six requests that never answer: p95 is infinite, SLA missed.
        for i in 0..6 {
            s.push(Sample {
                error: i % 2 == 0,
                ..sample(2000 + i, None, None, 0)
            });
        }
        let f = figures(&s, Duration::from_secs(1), Duration::from_secs(3));
        assert_eq!((f.sent, f.errors, f.unfinished), (106, 3, 3));
        assert!(f.ttft_p95_ms.is_infinite());
        assert!(!f.meets(1e9));
        assert!(!Figures::default().meets(1e9));
    }

    #[test]
    fn throughput_at_the_sla_is_the_best_of_the_cells_that_met_it() {
        let cell = |tok: f64, p95: f64| Figures {
            sent: 10,
            completed: 10,
            output_tokens_per_s: tok,
            ttft_p95_ms: p95,
            ..Figures::default()
        };
        let cells = [cell(100.0, 200.0), cell(200.0, 400.0), cell(300.0, 900.0)];
        assert_eq!(at_sla(&cells, 500.0), 200.0);
        assert_eq!(at_sla(&cells, 1000.0), 300.0);
        assert_eq!(at_sla(&cells, 100.0), 0.0);
        let failed = Figures {
            errors: 1,
            ..cell(400.0, 10.0)
        };
        assert_eq!(at_sla(&[failed], 500.0), 0.0);
    }

    fn search(max: usize, fewest_ok: usize) -> (Option<usize>, Vec<usize>) {
        let mut s = Search::new(max);
        let mut asked = Vec::new();
        while let Some(n) = s.next() {
            asked.push(n);
            s.record(n, n >= fewest_ok);
        }
        (s.fewest(), asked)
    }

    #[test]
    fn the_replicas_search_is_a_binary_search_after_the_most() {
        assert_eq!(search(4, 2), (Some(2), vec![4, 2, 1]));
        assert_eq!(search(4, 1), (Some(1), vec![4, 2, 1]));
        assert_eq!(search(4, 3), (Some(3), vec![4, 2, 3]));
        assert_eq!(search(4, 4), (Some(4), vec![4, 2, 3]));
        assert_eq!(search(4, 5), (None, vec![4]));
        assert_eq!(search(1, 1), (Some(1), vec![1]));
        assert_eq!(search(0, 1), (None, vec![]));
        for max in 1..20 {
            for ok in 1..=max {
                assert_eq!(search(max, ok).0, Some(ok));
            }
        }
    }

    #[test]
    fn counters_are_read_from_prometheus_text() {
        let t = "# HELP vllm:prefix_cache_hits_total x\nvllm:prefix_cache_hits_total{model_name=\"bench\"} 496\nvllm:prefix_cache_hits_total_other 5\nvllm:prefix_cache_queries_total{model_name=\"bench\"} 1024\n";
        assert_eq!(counter(t, "vllm:prefix_cache_hits_total"), 496.0);
        assert_eq!(counter(t, "vllm:prefix_cache_queries_total"), 1024.0);
        assert_eq!(counter(t, "vllm:nothing"), 0.0);
    }

    #[test]
    fn rng_is_uniform_enough() {
        let mut r = Rng::new(3);
        let mut counts = [0u32; 8];
        for _ in 0..80_000 {
            counts[r.below(8)] += 1;
        }
        assert!(
            counts.iter().all(|c| (9_500..=10_500).contains(c)),
            "{counts:?}"
        );
        assert!((0..1000).all(|_| {
            let u = r.unit();
            u > 0.0 && u <= 1.0
        }));
        assert_eq!(text(&mut Rng::new(1), 37).len(), 37);
    }
}
