//! A load generator for the demo (`strata-load`): closed-loop streams of
//! chat completions to a Model's ready replicas (their sidecars, on the pod
//! IPs; loopback only), each request to the replica with the fewest
//! requests in flight (as a least-request load balancer would), adapter
//! requests only to replicas that carry the adapter. It measures each
//! request's time to first token on the client, and ramps the number of
//! streams up until the p95 over a short window crosses the TTFT target,
//! then holds that load until it is stopped (SIGINT or SIGTERM) or its
//! duration ends. At the end it writes a summary: requests, share within
//! the target, seconds of load within the target, tokens, peak replicas.
//!
//! The pure parts (percentiles, the ramp, SSE scanning, the summary) are
//! unit tested below; the rest is the shell that sends requests.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use serde_json::{Value, json};

use crate::http::is_loopback_str;

/// What to send and how to ramp.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// The Model's namespace.
    pub namespace: String,
    /// The Model (its pods carry `strata.ai/model=<model>`; also the
    /// OpenAI `model` of base requests).
    pub model: String,
    /// An Adapter to send every `adapter_every`-th request to, if any.
    pub adapter: Option<String>,
    /// Every how many requests one goes to the adapter.
    pub adapter_every: u64,
    /// The TTFT target, seconds.
    pub ttft_target: f64,
    /// Streams at the start.
    pub start: usize,
    /// Streams added per step while the p95 is within the target.
    pub step: usize,
    /// Seconds between steps.
    pub step_every: f64,
    /// Most streams.
    pub max: usize,
    /// Seconds of first tokens the ramp's p95 is taken over.
    pub window: f64,
    /// Characters of each prompt.
    pub prompt_chars: usize,
    /// Output tokens per request.
    pub max_tokens: u32,
    /// Stop after this many seconds, if not stopped before.
    pub duration: f64,
    /// Progress lines go here (appended), else to stderr.
    pub log: Option<PathBuf>,
    /// Where to write the summary (KEY=VALUE lines).
    pub summary: Option<PathBuf>,
}

// ---------------------------------------------------------------------------
// Pure parts
// ---------------------------------------------------------------------------

/// The `q` quantile (0 to 1) of `values` by nearest rank; None when empty.
pub fn percentile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = (q.clamp(0.0, 1.0) * v.len() as f64).ceil() as usize;
    v.get(rank.saturating_sub(1)).copied()
}

/// The ramp: where it stands and what it does next.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ramp {
    /// Streams now.
    pub streams: usize,
    /// Set once the p95 crossed the target: the load holds from then on.
    pub crossed: bool,
}

impl Ramp {
    /// One step, given the p95 TTFT over the window (None: no first token
    /// in it yet, which does not count as within the target). Returns true
    /// when this step crossed the target.
    pub fn step(&mut self, p95: Option<f64>, target: f64, step: usize, max: usize) -> bool {
        if self.crossed {
            return false;
        }
        match p95 {
            Some(p) if p > target => {
                self.crossed = true;
                true
            }
            Some(_) => {
                self.streams = (self.streams + step).min(max.max(1));
                false
            }
            None => false,
        }
    }
}

/// Scans a server-sent event stream of OpenAI chunks as bytes arrive, in
/// any framing: counts the chunks that carry generated text (a delta's
/// `content` or a completion's `text`, not empty), which the simulator
/// and vLLM send one token at a time.
#[derive(Debug, Default)]
pub struct SseScan {
    pending: Vec<u8>,
    /// Chunks with text so far.
    pub tokens: u64,
    /// Whether `data: [DONE]` was seen.
    pub done: bool,
}

impl SseScan {
    /// Feeds bytes; returns how many chunks with text they completed.
    pub fn feed(&mut self, bytes: &[u8]) -> u64 {
        self.pending.extend_from_slice(bytes);
        let mut found = 0;
        while let Some(end) = self.pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = self.pending.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&event);
            for line in text.lines() {
                let Some(data) = line.strip_prefix("data:") else {
                    continue;
                };
                let data = data.trim();
                if data == "[DONE]" {
                    self.done = true;
                    continue;
                }
                if serde_json::from_str::<Value>(data).is_ok_and(|v| has_text(&v)) {
                    found += 1;
                }
            }
        }
        self.tokens += found;
        found
    }
}

fn has_text(chunk: &Value) -> bool {
    let Some(choice) = chunk.get("choices").and_then(|c| c.get(0)) else {
        return false;
    };
    let text = choice
        .get("delta")
        .and_then(|d| d.get("content"))
        .or_else(|| choice.get("text"));
    text.and_then(Value::as_str).is_some_and(|s| !s.is_empty())
}

/// One finished request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Record {
    /// Seconds since the load started, when it was sent.
    pub sent: f64,
    /// Time to first token, seconds (None: no token came).
    pub ttft: Option<f64>,
    /// Answered 200 and streamed to the end.
    pub ok: bool,
    /// Chunks with text received.
    pub tokens: u64,
}

/// What the load did, for people and for scripts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    /// Requests answered in full.
    pub requests: u64,
    /// Requests that failed (an HTTP error, a broken stream, a timeout).
    pub errors: u64,
    /// Requests answered in full whose TTFT was within the target.
    pub within: u64,
    /// TTFT p50 and p95 of the requests answered, seconds.
    pub p50: Option<f64>,
    /// See p50.
    pub p95: Option<f64>,
    /// Tokens received.
    pub tokens: u64,
    /// Seconds of load with a p95 over the window (sampled each second).
    pub seconds: u64,
    /// Of those, seconds whose p95 was within the target.
    pub seconds_within: u64,
    /// Most ready replicas seen.
    pub peak_replicas: usize,
    /// Most streams.
    pub peak_streams: usize,
    /// Seconds from the start to the crossing, and the streams then.
    pub crossed: Option<(f64, usize)>,
    /// How long the load ran, seconds.
    pub elapsed: f64,
}

impl Summary {
    /// From the records and what the shell counted.
    pub fn from_records(records: &[Record], target: f64) -> Self {
        let ok: Vec<&Record> = records.iter().filter(|r| r.ok).collect();
        let ttfts: Vec<f64> = ok.iter().filter_map(|r| r.ttft).collect();
        Self {
            requests: ok.len() as u64,
            errors: records.len() as u64 - ok.len() as u64,
            within: ok
                .iter()
                .filter(|r| r.ttft.is_some_and(|t| t <= target))
                .count() as u64,
            p50: percentile(&ttfts, 0.5),
            p95: percentile(&ttfts, 0.95),
            tokens: records.iter().map(|r| r.tokens).sum(),
            ..Self::default()
        }
    }

    /// Percent of the answered requests within the target.
    pub fn attainment(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.within as f64 * 100.0 / self.requests as f64)
    }

    /// KEY=VALUE lines (numbers only), for scripts.
    pub fn to_env(&self) -> String {
        let ms = |v: Option<f64>| v.map_or("".into(), |v| format!("{:.0}", v * 1000.0));
        let mut out = String::new();
        let mut kv = |k: &str, v: String| {
            let _ = writeln!(out, "{k}={v}");
        };
        kv("requests", self.requests.to_string());
        kv("errors", self.errors.to_string());
        kv("within_target", self.within.to_string());
        kv(
            "attainment_pct",
            self.attainment().map_or("".into(), |a| format!("{a:.1}")),
        );
        kv("ttft_p50_ms", ms(self.p50));
        kv("ttft_p95_ms", ms(self.p95));
        kv("tokens", self.tokens.to_string());
        kv("seconds", self.seconds.to_string());
        kv("seconds_within", self.seconds_within.to_string());
        kv("peak_replicas", self.peak_replicas.to_string());
        kv("peak_streams", self.peak_streams.to_string());
        kv(
            "crossed_after_s",
            self.crossed.map_or("".into(), |(t, _)| format!("{t:.1}")),
        );
        kv(
            "crossed_streams",
            self.crossed.map_or("".into(), |(_, n)| n.to_string()),
        );
        kv("elapsed_s", format!("{:.1}", self.elapsed));
        out
    }
}

/// "812ms" or "1.25s".
pub fn fmt_secs(v: f64) -> String {
    if v < 1.0 {
        format!("{:.0}ms", v * 1000.0)
    } else {
        format!("{v:.2}s")
    }
}

// ---------------------------------------------------------------------------
// The shell
// ---------------------------------------------------------------------------

/// A ready replica to send to.
#[derive(Debug, Clone)]
struct Replica {
    ip: String,
    /// Carries the adapter.
    adapter: bool,
}

struct Shared {
    config: LoadConfig,
    start: Instant,
    stop: AtomicBool,
    /// Streams that may run (workers above it wait).
    streams: AtomicUsize,
    replicas: Mutex<Vec<Replica>>,
    peak_replicas: AtomicUsize,
    in_flight: Mutex<BTreeMap<String, usize>>,
    records: Mutex<Vec<Record>>,
    /// First tokens: (seconds since start, TTFT), for the windowed p95.
    firsts: Mutex<Vec<(f64, f64)>>,
    sent: AtomicU64,
    log: Mutex<Option<std::fs::File>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn say(&self, line: &str) {
        use std::io::Write as _;
        let mut log = lock(&self.log);
        match log.as_mut() {
            // One write per line, so that a reader never sees half of one.
            Some(f) => {
                let _ = f.write_all(format!("{line}\n").as_bytes());
            }
            None => eprintln!("{line}"),
        }
    }

    /// The p95 of the first tokens within the last `window` seconds.
    fn windowed_p95(&self) -> Option<f64> {
        let now = self.now();
        let window = self.config.window;
        let firsts = lock(&self.firsts);
        let recent: Vec<f64> = firsts
            .iter()
            .filter(|(t, _)| now - t <= window)
            .map(|(_, v)| *v)
            .collect();
        percentile(&recent, 0.95)
    }

    /// The least loaded replica (for the adapter: among those that carry
    /// it), counted as one more in flight.
    fn pick(&self, adapter: bool) -> Option<String> {
        let replicas = lock(&self.replicas);
        let mut in_flight = lock(&self.in_flight);
        let ip = replicas
            .iter()
            .filter(|r| !adapter || r.adapter)
            .min_by_key(|r| in_flight.get(&r.ip).copied().unwrap_or(0))?
            .ip
            .clone();
        *in_flight.entry(ip.clone()).or_default() += 1;
        Some(ip)
    }

    fn done_with(&self, ip: &str) {
        if let Some(n) = lock(&self.in_flight).get_mut(ip) {
            *n = n.saturating_sub(1);
        }
    }
}

/// Keeps the list of ready replicas (loopback pod IPs) fresh, every 500 ms.
async fn discover(shared: Arc<Shared>, pods: Api<Pod>) {
    let selector = format!("{}={}", strata_core::labels::MODEL, shared.config.model);
    let adapter_label = shared
        .config
        .adapter
        .as_ref()
        .map(|a| format!("{}{a}", strata_core::labels::ADAPTER_PREFIX));
    while !shared.stop.load(Ordering::Relaxed) {
        match pods.list(&ListParams::default().labels(&selector)).await {
            Ok(list) => {
                let ready: Vec<Replica> = list
                    .items
                    .iter()
                    .filter(|p| {
                        p.metadata.deletion_timestamp.is_none() && strata_core::view::pod_ready(p)
                    })
                    .filter_map(|p| {
                        let ip = p.status.as_ref()?.pod_ip.clone()?;
                        // The local world's rule: traffic to loopback only.
                        is_loopback_str(&ip).then(|| Replica {
                            ip,
                            adapter: adapter_label.as_ref().is_some_and(|l| {
                                p.metadata
                                    .labels
                                    .as_ref()
                                    .is_some_and(|ls| ls.contains_key(l))
                            }),
                        })
                    })
                    .collect();
                shared
                    .peak_replicas
                    .fetch_max(ready.len(), Ordering::Relaxed);
                *lock(&shared.replicas) = ready;
            }
            Err(e) => shared.say(&format!("[load] listing the replicas: {e}")),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One closed-loop stream: while the ramp lets it run, a request at a time.
async fn worker(shared: Arc<Shared>, index: usize) {
    let http: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let prompt = "tell me a story ".repeat(shared.config.prompt_chars / 16 + 1);
    let prompt = &prompt[..shared.config.prompt_chars.min(prompt.len())];
    while !shared.stop.load(Ordering::Relaxed) {
        if index >= shared.streams.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let n = shared.sent.fetch_add(1, Ordering::Relaxed) + 1;
        let use_adapter = shared.config.adapter.is_some()
            && shared.config.adapter_every > 0
            && n.is_multiple_of(shared.config.adapter_every);
        let (model, ip) = match shared.pick(use_adapter) {
            Some(ip) => (
                shared
                    .config
                    .adapter
                    .clone()
                    .filter(|_| use_adapter)
                    .unwrap_or_else(|| shared.config.model.clone()),
                ip,
            ),
            // No replica carries the adapter (yet): a base request.
            None if use_adapter => match shared.pick(false) {
                Some(ip) => (shared.config.model.clone(), ip),
                None => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
            None => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let record = one_request(&shared, &http, &ip, &model, prompt).await;
        shared.done_with(&ip);
        // A request cut short by the stop is not counted.
        if record.ok || !shared.stop.load(Ordering::Relaxed) {
            if let Some(t) = record.ttft {
                lock(&shared.firsts).push((record.sent + t, t));
            }
            lock(&shared.records).push(record);
        }
        if !record.ok {
            // Do not spin on a replica that refuses.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn one_request(
    shared: &Shared,
    http: &Client<HttpConnector, Full<Bytes>>,
    ip: &str,
    model: &str,
    prompt: &str,
) -> Record {
    let sent_at = Instant::now();
    let mut record = Record {
        sent: shared.now(),
        ttft: None,
        ok: false,
        tokens: 0,
    };
    let body = json!({
        "model": model,
        "stream": true,
        "max_tokens": shared.config.max_tokens,
        "messages": [{"role": "user", "content": prompt}],
    });
    let Ok(req) = http::Request::post(format!("http://{ip}:8080/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
    else {
        return record;
    };
    // (answered in full, first token after, tokens)
    let exchange = async {
        let resp = http.request(req).await.ok()?;
        if resp.status() != http::StatusCode::OK {
            return Some((false, None, 0));
        }
        let mut body = resp.into_body();
        let mut scan = SseScan::default();
        let mut first = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.ok()?;
            if let Some(data) = frame.data_ref()
                && scan.feed(data) > 0
                && first.is_none()
            {
                first = Some(sent_at.elapsed().as_secs_f64());
            }
        }
        Some((scan.done, first, scan.tokens))
    };
    tokio::select! {
        r = tokio::time::timeout(Duration::from_secs(60), exchange) => {
            if let Ok(Some((ok, first, tokens))) = r {
                record.ok = ok;
                record.ttft = first;
                record.tokens = tokens;
            }
        }
        () = stopped(shared) => {}
    }
    record
}

async fn stopped(shared: &Shared) {
    while !shared.stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs the load until `stop` resolves or the duration ends; returns the
/// summary (also written to the summary file, if configured).
pub async fn run(
    client: kube::Client,
    config: LoadConfig,
    stop: impl std::future::Future<Output = ()>,
) -> std::io::Result<Summary> {
    let log = match &config.log {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)?,
        ),
        None => None,
    };
    let shared = Arc::new(Shared {
        start: Instant::now(),
        stop: AtomicBool::new(false),
        streams: AtomicUsize::new(config.start.max(1).min(config.max.max(1))),
        replicas: Mutex::new(Vec::new()),
        peak_replicas: AtomicUsize::new(0),
        in_flight: Mutex::new(BTreeMap::new()),
        records: Mutex::new(Vec::new()),
        firsts: Mutex::new(Vec::new()),
        sent: AtomicU64::new(0),
        log: Mutex::new(log),
        config,
    });
    let pods: Api<Pod> = Api::namespaced(client, &shared.config.namespace);
    let mut tasks = vec![tokio::spawn(discover(shared.clone(), pods))];
    for i in 0..shared.config.max.max(1) {
        tasks.push(tokio::spawn(worker(shared.clone(), i)));
    }
    let target = shared.config.ttft_target;
    let mut ramp = Ramp {
        streams: shared.streams.load(Ordering::Relaxed),
        crossed: false,
    };
    let mut crossed = None;
    let (mut seconds, mut seconds_within) = (0u64, 0u64);
    let mut next_step = shared.config.step_every;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    shared.say(&format!(
        "[load] {} streams to start, +{} every {:.0}s while the client's TTFT p95 over {:.0}s is within {}",
        ramp.streams,
        shared.config.step,
        shared.config.step_every,
        shared.config.window,
        fmt_secs(target)
    ));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = &mut stop => break,
        }
        let now = shared.now();
        if now >= shared.config.duration {
            break;
        }
        let p95 = shared.windowed_p95();
        if let Some(p) = p95 {
            seconds += 1;
            seconds_within += u64::from(p <= target);
        }
        if now + 1e-6 >= next_step {
            next_step += shared.config.step_every;
            if ramp.step(p95, target, shared.config.step, shared.config.max) {
                crossed = Some((now, ramp.streams));
                shared.say(&format!(
                    "[load] t={now:>3.0}s client TTFT p95 {} crossed the target {} at {} streams: holding this load",
                    p95.map(fmt_secs).unwrap_or_default(),
                    fmt_secs(target),
                    ramp.streams
                ));
            }
            shared.streams.store(ramp.streams, Ordering::Relaxed);
        }
        if (now.round() as u64).is_multiple_of(2) {
            let done = lock(&shared.records).len();
            shared.say(&format!(
                "[load] t={now:>3.0}s streams {:>2}  replicas {}  requests {done:>5}  client TTFT p95 ({:.0}s) {}",
                ramp.streams,
                lock(&shared.replicas).len(),
                shared.config.window,
                p95.map(fmt_secs).unwrap_or_else(|| "-".into()),
            ));
        }
    }
    shared.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let records = lock(&shared.records).clone();
    let mut summary = Summary::from_records(&records, target);
    summary.seconds = seconds;
    summary.seconds_within = seconds_within;
    summary.peak_replicas = shared.peak_replicas.load(Ordering::Relaxed);
    summary.peak_streams = ramp.streams;
    summary.crossed = crossed;
    summary.elapsed = shared.now();
    shared.say(&format!(
        "[load] stopped after {:.0}s: {} requests ({} failed), {} within {} ({}), TTFT p50 {} p95 {}, {} tokens",
        summary.elapsed,
        summary.requests,
        summary.errors,
        summary.within,
        fmt_secs(target),
        summary
            .attainment()
            .map_or("-".into(), |a| format!("{a:.1} %")),
        summary.p50.map(fmt_secs).unwrap_or_default(),
        summary.p95.map(fmt_secs).unwrap_or_default(),
        summary.tokens
    ));
    if let Some(p) = &shared.config.summary {
        std::fs::write(p, summary.to_env())?;
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        assert_eq!(percentile(&[], 0.95), None);
        assert_eq!(percentile(&[f64::NAN], 0.5), None);
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.95), Some(95.0));
        assert_eq!(percentile(&v, 0.5), Some(50.0));
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 0.95), Some(3.0));
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 0.0), Some(1.0));
    }

    #[test]
    fn the_ramp_rises_until_the_target_is_crossed_then_holds() {
        let mut r = Ramp {
            streams: 2,
            crossed: false,
        };
        assert!(!r.step(None, 0.5, 2, 10), "no data: wait");
        assert_eq!(r.streams, 2);
        assert!(!r.step(Some(0.1), 0.5, 2, 10));
        assert_eq!(r.streams, 4);
        assert!(!r.step(Some(0.5), 0.5, 2, 10), "at the target is within");
        assert_eq!(r.streams, 6);
        assert!(!r.step(Some(0.2), 0.5, 8, 10));
        assert_eq!(r.streams, 10, "capped at max");
        assert!(r.step(Some(0.7), 0.5, 2, 10), "crossed");
        assert!(r.crossed);
        assert!(!r.step(Some(0.1), 0.5, 2, 10), "holds once crossed");
        assert_eq!(r.streams, 10);
    }

    #[test]
    fn sse_chunks_with_text_are_counted_in_any_framing() {
        let role = r#"data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#;
        let tok = r#"data: {"choices":[{"index":0,"delta":{"content":" tok0"}}]}"#;
        let text = r#"data: {"choices":[{"index":0,"text":" tok1"}]}"#;
        let stream = format!("{role}\n\n{tok}\n\n{text}\n\ndata: [DONE]\n\n");
        let mut whole = SseScan::default();
        assert_eq!(whole.feed(stream.as_bytes()), 2);
        assert!(whole.done);
        // Byte by byte: the first token completes on its event's end.
        let mut split = SseScan::default();
        let mut firsts = Vec::new();
        for (i, b) in stream.as_bytes().iter().enumerate() {
            if split.feed(&[*b]) > 0 {
                firsts.push(i);
            }
        }
        assert_eq!(split.tokens, 2);
        assert_eq!(firsts[0], role.len() + 2 + tok.len() + 1);
        assert!(split.done);
        let mut junk = SseScan::default();
        assert_eq!(junk.feed(b"data: not json\n\n: comment\n\n"), 0);
        assert!(!junk.done);
    }

    #[test]
    fn the_summary_counts_answered_requests_against_the_target() {
        let r = |ttft: Option<f64>, ok: bool| Record {
            sent: 0.0,
            ttft,
            ok,
            tokens: if ok { 64 } else { 3 },
        };
        let records = [
            r(Some(0.1), true),
            r(Some(0.4), true),
            r(Some(0.9), true),
            r(Some(0.2), false),
            r(None, false),
        ];
        let s = Summary::from_records(&records, 0.5);
        assert_eq!((s.requests, s.errors, s.within), (3, 2, 2));
        assert_eq!(s.tokens, 3 * 64 + 6);
        assert_eq!((s.p50, s.p95), (Some(0.4), Some(0.9)));
        let a = s.attainment().expect("attainment");
        assert!((a - 66.666).abs() < 0.01, "{a}");
        let env = s.to_env();
        for line in [
            "requests=3",
            "errors=2",
            "attainment_pct=66.7",
            "ttft_p95_ms=900",
            "crossed_after_s=",
        ] {
            assert!(env.lines().any(|l| l == line), "{line} in\n{env}");
        }
        assert_eq!(Summary::default().attainment(), None);
    }

    #[test]
    fn durations_for_people() {
        assert_eq!(fmt_secs(0.8123), "812ms");
        assert_eq!(fmt_secs(1.25), "1.25s");
    }
}
