//! The control plane at scale (issue [11] item 2): 1,000 Models on 200
//! simulated 8-GPU nodes, the release-built `strata-operator` with leader
//! election as in production, and, side by side in the same world, the
//! Deployment controller with 1,000 equivalent Deployments.
//!
//! Phases, one after another in one world:
//!
//! 1. **Strata**: the operator starts, the pools `h100` and `a100` are
//!    created, every Model is applied (server-side apply, bounded in
//!    flight); measured: seconds from the last apply until every Model has
//!    all its replicas ready, reconciles and their latency (the operator's
//!    own histogram), its peak RSS and CPU seconds, the requests it sent
//!    (its `strata_kube_requests_total`), its writes (the audit log) and the
//!    API server's `apiserver_request_total` over the phase.
//! 2. **Churn**: 10 % of the Models get new engine args and the 5 least
//!    used nodes that hold model replicas are deleted; seconds until every
//!    Model is ready again on the new template and off the deleted nodes.
//! 3. **Idle**: a timed window at rest: the operator's requests per minute.
//! 4. **Deployments**: the Models are deleted, the deleted nodes recreated,
//!    and 1,000 Deployments with the same GPU requests, tolerations, node
//!    affinity and replicas are applied; the same measures (writes from
//!    the audit log by the deployment and replicaset controllers' users,
//!    CPU and RSS of the whole kube-controller-manager), the same churn and
//!    a shorter idle window.
//!
//! Model pods carry no pod runner label: KWOK alone makes them Running and
//! Ready and no process runs for them, so only the control plane is
//! measured. Waits are on conditions (a LIST every 2 s) with deadlines; the
//! idle windows are the only timed parts.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde::Serialize;
use serde_json::{Value, json};
use strata_crds::{GPUPool, Model};
use tokio::process::{Child, Command};

use crate::bench_memory::{
    BenchError, Result, counter_sum, kube_err, machine, mix, proc_mem, sibling_binary,
};
use crate::cluster::{Cluster, client_from};
use crate::topology::Topology;
use crate::wait::poll_until;

/// The H100 nodes' product label.
pub const H100: &str = "NVIDIA-H100-80GB-HBM3";
/// The A100 nodes' product label.
pub const A100: &str = "NVIDIA-A100-SXM4-80GB";
/// GPUs per simulated node.
pub const GPUS_PER_NODE: u32 = 8;
/// Share of the GPUs the workloads ask for.
pub const FILL: f64 = 0.9;
/// Label on every object the benchmark applies.
const BENCH_LABEL: &str = "bench.strata.ai/scale";
/// Field manager of the benchmark's applies.
const MANAGER: &str = "strata-bench-scale";
/// The operator's ServiceAccount user.
const OPERATOR_USER: &str = "system:serviceaccount:strata-system:strata-operator";
/// The Deployment controller's users (kube-controller-manager runs with
/// --use-service-account-credentials).
const DEPLOYMENT_USERS: [&str; 2] = [
    "system:serviceaccount:kube-system:deployment-controller",
    "system:serviceaccount:kube-system:replicaset-controller",
];
/// The scheduler's user (it binds both kinds of pods).
const SCHEDULER_USER: &str = "system:kube-scheduler";
/// How often the waits LIST.
const POLL: Duration = Duration::from_secs(2);
/// How often a wait looks at its watched objects (a local read).
const WATCH_CHECK: Duration = Duration::from_millis(100);

/// A cache of the `K`s with `labels`, kept by a watch until the task is
/// dropped.
fn watch<K>(client: &Client, labels: &str) -> (kube::runtime::reflector::Store<K>, AbortOnDrop)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    use kube::runtime::{WatchStreamExt, reflector, watcher};
    let (reader, writer) = reflector::store();
    let stream = reflector(
        writer,
        watcher(
            Api::<K>::all(client.clone()),
            watcher::Config::default().labels(labels),
        ),
    )
    .default_backoff();
    let task = tokio::spawn(stream.for_each(|_| async {}));
    (reader, AbortOnDrop(task))
}

/// Aborts its task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A GPU pool of the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Pool {
    /// 8 × H100 nodes.
    H100,
    /// 8 × A100 nodes.
    A100,
}

impl Pool {
    /// The GPUPool's name.
    pub fn name(self) -> &'static str {
        match self {
            Pool::H100 => "h100",
            Pool::A100 => "a100",
        }
    }

    /// The nodes' `nvidia.com/gpu.product`.
    pub fn product(self) -> &'static str {
        match self {
            Pool::H100 => H100,
            Pool::A100 => A100,
        }
    }
}

/// One Model (or its equivalent Deployment).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Workload {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// GPUs per replica: 1, 2, 4 or 8.
    pub gpus: u32,
    /// Replicas: 1 to 3.
    pub replicas: u32,
    /// Its pool.
    pub pool: Pool,
}

/// The node split: 60 % H100 nodes, the rest A100.
pub fn node_split(nodes: usize) -> (usize, usize) {
    let h100 = (nodes * 3).div_ceil(5);
    (h100, nodes - h100)
}

/// A seeded pseudo-random stream (SplitMix64).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(1);
        mix(self.0) % n.max(1)
    }
}

/// The deterministic mix of `models` workloads over `namespaces`, asking
/// for about [`FILL`] of the GPUs of `h100_nodes` + `a100_nodes` 8-GPU
/// nodes, each pool about as full as the other. Most are 1 GPU × 1
/// replica (at 1,000 Models on 1,600 GPUs the mean is 1.44 GPUs a Model).
pub fn plan(
    h100_nodes: usize,
    a100_nodes: usize,
    models: usize,
    namespaces: usize,
    seed: u64,
) -> Result<Vec<Workload>> {
    let capacity = [h100_nodes, a100_nodes].map(|n| n as u64 * u64::from(GPUS_PER_NODE));
    let total = capacity[0] + capacity[1];
    let target = (total as f64 * FILL).round() as u64;
    if models == 0 || namespaces == 0 || h100_nodes == 0 || a100_nodes == 0 {
        return Err(BenchError::Options(
            "models, namespaces and both node kinds must be at least 1".into(),
        ));
    }
    if models as u64 > target {
        return Err(BenchError::Options(format!(
            "{models} Models of at least 1 GPU do not fit {:.0} % of {total} GPUs ({target}); add nodes",
            FILL * 100.0
        )));
    }
    // (GPUs per replica, replicas, weight in ‰)
    const SHAPES: [(u32, u32, u64); 9] = [
        (1, 1, 760),
        (1, 2, 80),
        (1, 3, 30),
        (2, 1, 60),
        (2, 2, 20),
        (4, 1, 30),
        (4, 2, 8),
        (8, 1, 10),
        (8, 2, 2),
    ];
    let mut rng = Rng(seed);
    let mut shapes: Vec<(u32, u32)> = (0..models)
        .map(|_| {
            let mut r = rng.below(1000);
            SHAPES
                .iter()
                .find(|(_, _, w)| {
                    if r < *w {
                        true
                    } else {
                        r -= w;
                        false
                    }
                })
                .map_or((1, 1), |(g, n, _)| (*g, *n))
        })
        .collect();
    let sum = |s: &[(u32, u32)]| s.iter().map(|(g, n)| u64::from(g * n)).sum::<u64>();
    // Down to the target: the largest become 1 × 1 (seeded picks) ...
    while sum(&shapes) > target {
        let big: Vec<usize> = (0..models).filter(|&i| shapes[i] != (1, 1)).collect();
        let i = big[rng.below(big.len() as u64) as usize];
        shapes[i] = (1, 1);
    }
    // ... and up to it: 1 × 1 ones get a second replica.
    while sum(&shapes) < target {
        let small: Vec<usize> = (0..models).filter(|&i| shapes[i] == (1, 1)).collect();
        if small.is_empty() {
            break;
        }
        let i = small[rng.below(small.len() as u64) as usize];
        shapes[i] = (1, 2);
    }
    // Pools: largest first, each to the pool with the lower fill.
    let mut order: Vec<usize> = (0..models).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(shapes[i].0 * shapes[i].1), i));
    let mut used = [0u64; 2];
    let mut pools = vec![Pool::H100; models];
    for i in order {
        let need = u64::from(shapes[i].0 * shapes[i].1);
        let fill = |p: usize| (used[p] + need) as f64 / capacity[p] as f64;
        let p = if fill(0) <= fill(1) { 0 } else { 1 };
        used[p] += need;
        pools[i] = if p == 0 { Pool::H100 } else { Pool::A100 };
    }
    Ok((0..models)
        .map(|i| Workload {
            namespace: format!("bench-{:02}", i % namespaces),
            name: format!("model-{i:04}"),
            gpus: shapes[i].0,
            replicas: shapes[i].1,
            pool: pools[i],
        })
        .collect())
}

/// The engine args of generation `generation` (churn bumps it).
fn engine_args(generation: u32) -> Vec<String> {
    let mut args: Vec<String> = ["--max-model-len", "8192", "--enable-prefix-caching"]
        .map(String::from)
        .to_vec();
    if generation > 0 {
        args.extend(["--max-num-seqs".into(), format!("{}", 128 + generation)]);
    }
    args
}

/// The Model of a workload (Manual autoscaling, `spec.replicas` set).
pub fn model(w: &Workload, generation: u32) -> Value {
    json!({
        "apiVersion": "strata.ai/v1alpha1",
        "kind": "Model",
        "metadata": {"name": w.name, "namespace": w.namespace, "labels": {BENCH_LABEL: "model"}},
        "spec": {
            "source": {"uri": format!("hf://bench/{}", w.name)},
            "engine": {
                "type": "vLLM",
                "args": engine_args(generation),
                "resources": {"cpu": "4", "memory": "32Gi"}
            },
            "gpusPerReplica": w.gpus,
            "pools": [{"name": w.pool.name()}],
            "replicas": w.replicas,
            "minReplicas": 1,
            "maxReplicas": 3,
            "autoscaling": {"mode": "Manual"}
        }
    })
}

/// The Deployment equivalent to a workload's Model: the same GPU, CPU and
/// memory requests, the GPU taint's toleration, required node affinity to
/// the pool's product, the same replicas and a rolling update with one
/// surge replica (the Model's default).
pub fn deployment(w: &Workload, generation: u32) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": w.name, "namespace": w.namespace, "labels": {BENCH_LABEL: "deployment"}},
        "spec": {
            "replicas": w.replicas,
            "selector": {"matchLabels": {"app": w.name}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": {"app": w.name, BENCH_LABEL: "deployment"}},
                "spec": {
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [{"matchExpressions": [{
                            "key": "nvidia.com/gpu.product", "operator": "In", "values": [w.pool.product()]
                        }]}]
                    }}},
                    "containers": [{
                        "name": "engine",
                        "image": "vllm/vllm-openai:v0.6.3",
                        "args": engine_args(generation),
                        "resources": {
                            "requests": {"cpu": "4", "memory": "32Gi", "nvidia.com/gpu": w.gpus.to_string()},
                            "limits": {"nvidia.com/gpu": w.gpus.to_string()}
                        }
                    }]
                }
            }
        }
    })
}

/// The topology file text of `h100` + `a100` nodes.
pub fn topology_yaml(h100: usize, a100: usize) -> String {
    format!(
        "# The scale benchmark's world (strata-bench-scale): 8-GPU nodes, 60 % H100, 40 % A100.\n\
         nodeGroups:\n  - name: h100\n    count: {h100}\n    cpu: \"192\"\n    memory: 2Ti\n    gpu:\n      product: {H100}\n      family: hopper\n      count: 8\n      memoryMiB: 81559\n\
         \x20 - name: a100\n    count: {a100}\n    cpu: \"128\"\n    memory: 1Ti\n    gpu:\n      product: {A100}\n      family: ampere\n      count: 8\n      memoryMiB: 81920\n"
    )
}

/// Prometheus' `histogram_quantile` over cumulative `(le, count)` buckets
/// (sorted by `le`, the last `+Inf`): linear within the bucket, the lower
/// bound of the first bucket 0, and the highest finite bound when the rank
/// falls in `+Inf`.
pub fn histogram_quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let in_bucket = count - prev.1;
            if in_bucket <= 0.0 {
                return Some(le);
            }
            return Some(prev.0 + (le - prev.0) * (rank - prev.1) / in_bucket);
        }
        prev = (le, count);
    }
    Some(prev.0)
}

fn label<'a>(series: &'a str, name: &str) -> Option<&'a str> {
    let key = format!("{name}=\"");
    let start = series.find(&key)? + key.len();
    let rest = &series[start..];
    Some(&rest[..rest.find('"')?])
}

/// The buckets of a histogram's series whose labels include `labels`,
/// summed over other labels, cumulative and sorted by `le`.
pub fn histogram_buckets(text: &str, name: &str, labels: &[&str]) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{");
    let mut by_le: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for l in text.lines().filter(|l| l.starts_with(&prefix)) {
        let Some((series, value)) = l.rsplit_once(' ') else {
            continue;
        };
        if !labels.iter().all(|lab| series.contains(lab)) {
            continue;
        }
        let (Some(le), Ok(v)) = (label(series, "le"), value.trim().parse::<f64>()) else {
            continue;
        };
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            match le.parse::<f64>() {
                Ok(x) => x,
                Err(_) => continue,
            }
        };
        by_le.entry(le.to_bits()).or_insert((le, 0.0)).1 += v;
    }
    let mut out: Vec<(f64, f64)> = by_le.into_values().collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// Bucket-wise difference (a phase's histogram from two snapshots).
fn buckets_delta(after: &[(f64, f64)], before: &[(f64, f64)]) -> Vec<(f64, f64)> {
    after
        .iter()
        .map(|&(le, c)| {
            let b = before
                .iter()
                .find(|(l, _)| l.to_bits() == le.to_bits())
                .map_or(0.0, |x| x.1);
            (le, c - b)
        })
        .collect()
}

/// A series' `VERB resource[/subresource]` (its `verb`, `resource` and
/// `subresource` labels; the verb alone without a resource).
fn verb_resource(series: &str) -> String {
    let verb = label(series, "verb").unwrap_or("?");
    match (
        label(series, "resource").filter(|r| !r.is_empty()),
        label(series, "subresource").filter(|r| !r.is_empty()),
    ) {
        (Some(r), Some(sub)) => format!("{verb} {r}/{sub}"),
        (Some(r), None) => format!("{verb} {r}"),
        (None, _) => verb.to_string(),
    }
}

/// A histogram's `(sum, count)` by `VERB resource[/subresource]`, summed
/// over its other labels; watches (verb `WATCH`, whose duration is the
/// watch's life) left out.
pub fn sum_and_count(text: &str, name: &str) -> BTreeMap<String, (f64, f64)> {
    let (sum, count) = (format!("{name}_sum{{"), format!("{name}_count{{"));
    let mut out: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for l in text.lines() {
        let is_sum = l.starts_with(&sum);
        if !is_sum && !l.starts_with(&count) {
            continue;
        }
        let Some((series, value)) = l.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.trim().parse::<f64>() else {
            continue;
        };
        if label(series, "verb") == Some("WATCH") {
            continue;
        }
        let e = out.entry(verb_resource(series)).or_insert((0.0, 0.0));
        if is_sum {
            e.0 += v;
        } else {
            e.1 += v;
        }
    }
    out
}

/// The mean over a phase, by key, from two [`sum_and_count`] snapshots
/// (keys without requests in the phase left out).
pub fn mean_delta(
    after: &BTreeMap<String, (f64, f64)>,
    before: &BTreeMap<String, (f64, f64)>,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .filter_map(|(k, &(s1, c1))| {
            let (s0, c0) = before.get(k).copied().unwrap_or((0.0, 0.0));
            (c1 - c0 > 0.0).then(|| (k.clone(), (s1 - s0) / (c1 - c0)))
        })
        .collect()
}

/// `apiserver_request_total` summed by `VERB resource[/subresource]`.
pub fn apiserver_requests(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for l in text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        let Some((series, value)) = l.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.trim().parse::<f64>() else {
            continue;
        };
        *out.entry(verb_resource(series)).or_insert(0.0) += v;
    }
    out
}

/// `apiserver_flowcontrol_rejected_requests_total`, every series summed.
fn flow_control_rejected(text: &str) -> f64 {
    crate::bench_memory::counter_sum(text, "apiserver_flowcontrol_rejected_requests_total", &[])
}

/// A counter's series summed by one label.
fn by_label(text: &str, name: &str, by: &str) -> BTreeMap<String, f64> {
    let prefix = format!("{name}{{");
    let mut out = BTreeMap::new();
    for l in text.lines().filter(|l| l.starts_with(&prefix)) {
        let Some((series, value)) = l.rsplit_once(' ') else {
            continue;
        };
        if let (Some(k), Ok(v)) = (label(series, by), value.trim().parse::<f64>()) {
            *out.entry(k.to_string()).or_insert(0.0) += v;
        }
    }
    out
}

/// A counter's series summed by `VERB resource` (its `verb` and
/// `resource` labels; a series without `resource` counts under its verb).
fn by_verb_and_resource(text: &str, name: &str) -> BTreeMap<String, f64> {
    let prefix = format!("{name}{{");
    let mut out = BTreeMap::new();
    for l in text.lines().filter(|l| l.starts_with(&prefix)) {
        let Some((series, value)) = l.rsplit_once(' ') else {
            continue;
        };
        if let (Some(_), Ok(v)) = (label(series, "verb"), value.trim().parse::<f64>()) {
            *out.entry(verb_resource(series)).or_insert(0.0) += v;
        }
    }
    out
}

fn map_delta(
    after: &BTreeMap<String, f64>,
    before: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v > 0.0)
        .collect()
}

/// utime + stime of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).map_err(|e| BenchError::Process {
        what: format!("reading {path}"),
        reason: e.to_string(),
    })?;
    parse_stat_cpu(&text, clk_tck()).ok_or_else(|| BenchError::Parse {
        what: path,
        reason: "no utime/stime".into(),
    })
}

fn clk_tck() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |t| t as f64)
}

/// utime + stime (fields 14 and 15) of `/proc/<pid>/stat`, in seconds.
pub fn parse_stat_cpu(text: &str, ticks: f64) -> Option<f64> {
    // Fields after the command's closing parenthesis start at field 3.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks)
}

/// Samples a process's VmRSS until stopped, keeping the largest.
struct RssSampler {
    peak_kib: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    fn start(pid: Arc<AtomicU32>) -> Self {
        let peak_kib = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak_kib.clone(), stop.clone());
        let task = tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                if let Ok(m) = proc_mem(pid.load(Ordering::Relaxed)) {
                    p.fetch_max(m.rss_kib, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        Self {
            peak_kib,
            stop,
            task,
        }
    }

    /// The largest VmRSS so far, KiB (and restarts the peak).
    fn take_peak(&self) -> u64 {
        self.peak_kib.swap(0, Ordering::Relaxed)
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
    }
}

/// How to run the benchmark.
#[derive(Debug, Clone)]
pub struct Options {
    /// Simulated 8-GPU nodes (60 % H100, 40 % A100).
    pub nodes: usize,
    /// Models (and Deployments).
    pub models: usize,
    /// Namespaces they are spread over.
    pub namespaces: usize,
    /// Seed of the mix.
    pub seed: u64,
    /// The idle window after Strata's churn.
    pub idle: Duration,
    /// The idle window after the Deployments' churn.
    pub deployment_idle: Duration,
    /// Applies in flight at once.
    pub concurrency: usize,
    /// Share of the objects the churn patches, %.
    pub churn_percent: usize,
    /// Nodes the churn deletes.
    pub churn_nodes: usize,
    /// The operator's --node-lost-grace-seconds.
    pub node_lost_grace_seconds: u64,
    /// The operator's --resync-seconds.
    pub resync_seconds: u64,
    /// More flags for the operator, after the benchmark's own (e.g.
    /// `--kube-api-qps=200`).
    pub operator_args: Vec<String>,
    /// The operator binary (default: target/release/strata-operator).
    pub operator: Option<PathBuf>,
    /// Skip the Deployment controller's phases.
    pub skip_deployments: bool,
    /// Working directory of the world (default: a temporary one).
    pub dir: Option<PathBuf>,
    /// Keep the world's directory (logs) at the end.
    pub keep: bool,
    /// Deadline of each wait.
    pub timeout: Duration,
}

impl Options {
    /// The benchmark's own topology file (200 nodes).
    pub fn default_topology() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("topology/bench-scale.yaml")
    }
}

/// The operator as a local process, as in production: leader election on,
/// default client rate limits; restarted when it exits (as the kubelet
/// restarts its container), its counters carried over.
struct Operator {
    child: Child,
    pid: u32,
    addr: SocketAddr,
    shared_pid: Arc<AtomicU32>,
    exe: PathBuf,
    kubeconfig: PathBuf,
    log: PathBuf,
    opts: Options,
    /// Restarts so far.
    restarts: u32,
    /// The last /metrics of the running process and its CPU seconds.
    last: Option<(String, f64)>,
    /// The last /metrics and CPU seconds of processes that exited in the
    /// current phase.
    carried: Vec<(String, f64)>,
}

impl Operator {
    async fn start(exe: &Path, kubeconfig: &Path, log: &Path, opts: &Options) -> Result<Self> {
        let (child, pid, addr) = Self::spawn(exe, kubeconfig, log, opts).await?;
        Ok(Self {
            child,
            pid,
            addr,
            shared_pid: Arc::new(AtomicU32::new(pid)),
            exe: exe.to_path_buf(),
            kubeconfig: kubeconfig.to_path_buf(),
            log: log.to_path_buf(),
            opts: opts.clone(),
            restarts: 0,
            last: None,
            carried: Vec::new(),
        })
    }

    /// Restarts the operator if it exited (its last metrics are carried
    /// into the phase's counts).
    async fn ensure(&mut self) -> Result<()> {
        if self.check().is_ok() {
            return Ok(());
        }
        self.restarts += 1;
        tracing::warn!(
            restarts = self.restarts,
            "strata-operator exited; restarting it"
        );
        if let Some(last) = self.last.take() {
            self.carried.push(last);
        }
        let log = self
            .log
            .with_extension(format!("restart-{}.log", self.restarts));
        let (child, pid, addr) = Self::spawn(&self.exe, &self.kubeconfig, &log, &self.opts).await?;
        self.child = child;
        self.pid = pid;
        self.addr = addr;
        self.shared_pid.store(pid, Ordering::Relaxed);
        let deadline = Instant::now() + self.opts.timeout;
        while self.metrics().await.is_err() {
            self.check()?;
            if Instant::now() >= deadline {
                return Err(BenchError::Process {
                    what: "strata-operator".into(),
                    reason: "restarted but serves no /metrics".into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }

    /// Remembers the running process's counters (carried if it exits).
    async fn observe(&mut self) {
        if let (Ok(text), Ok(cpu)) = (self.metrics().await, cpu_seconds(self.pid)) {
            self.last = Some((text, cpu));
        }
    }

    /// The metrics text and CPU seconds since the phase began: those of the
    /// processes that exited in it, then the running one's.
    async fn phase_end(&mut self) -> Result<(String, f64)> {
        self.ensure().await?;
        let mut text = self.metrics().await?;
        let mut cpu = cpu_seconds(self.pid)?;
        for (t, c) in self.carried.drain(..) {
            text.push('\n');
            text.push_str(&t);
            cpu += c;
        }
        Ok((text, cpu))
    }

    async fn spawn(
        exe: &Path,
        kubeconfig: &Path,
        log: &Path,
        opts: &Options,
    ) -> Result<(Child, u32, SocketAddr)> {
        let port = crate::ports::free_port().map_err(|e| BenchError::Process {
            what: "finding a free port".into(),
            reason: e.to_string(),
        })?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let out = std::fs::File::create(log).map_err(|e| BenchError::Process {
            what: format!("creating {}", log.display()),
            reason: e.to_string(),
        })?;
        let err = out.try_clone().map_err(|e| BenchError::Process {
            what: format!("opening {}", log.display()),
            reason: e.to_string(),
        })?;
        let child = Command::new(exe)
            .args([
                format!("--metrics-addr={addr}"),
                "--leader-elect=true".into(),
                "--lease-namespace=strata-system".into(),
                "--identity=strata-operator-bench-0".into(),
                "--sidecar-image=ghcr.io/strata-ai/strata-sidecar:bench".into(),
                format!("--resync-seconds={}", opts.resync_seconds),
                format!("--node-lost-grace-seconds={}", opts.node_lost_grace_seconds),
            ])
            .args(&opts.operator_args)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| BenchError::Process {
                what: format!("starting {}", exe.display()),
                reason: e.to_string(),
            })?;
        let pid = child.id().ok_or_else(|| BenchError::Process {
            what: "strata-operator".into(),
            reason: "exited at once".into(),
        })?;
        Ok((child, pid, addr))
    }

    fn check(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(BenchError::Process {
                what: "strata-operator".into(),
                reason: format!("exited ({status}); see its log"),
            }),
            Err(e) => Err(BenchError::Process {
                what: "strata-operator".into(),
                reason: e.to_string(),
            }),
        }
    }

    async fn metrics(&self) -> Result<String> {
        let r = crate::http::get(self.addr, "/metrics", Duration::from_secs(10))
            .await
            .map_err(|e| BenchError::Process {
                what: "the operator's /metrics".into(),
                reason: e.to_string(),
            })?;
        Ok(r.body)
    }

    async fn stop(mut self, grace: Duration) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
    }
}

/// How long the operator sends nothing before a phase counts as done.
const QUIET: Duration = Duration::from_secs(3);
/// The longest wait for a quiet operator (the Event lane yields 2 minutes
/// at most).
const QUIET_AT_MOST: Duration = Duration::from_secs(150);

/// What one controller did in one phase.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Phase {
    /// Objects (Models or Deployments) the phase converged.
    pub objects: usize,
    /// Seconds from the first to the last apply (patch, delete).
    pub apply_seconds: f64,
    /// Seconds from the last apply (or node deletion) until every object
    /// was ready.
    pub converge_seconds: f64,
    /// The API server's `apiserver_request_total` over the phase (every
    /// client, KWOK's node heartbeats included), by `VERB resource`.
    pub apiserver_requests: BTreeMap<String, f64>,
    /// Requests the API server's flow control (API Priority and Fairness)
    /// rejected with 429 over the phase, every client
    /// (`apiserver_flowcontrol_rejected_requests_total`). kube-client
    /// retries them beneath the operator's own request counter, which
    /// does not see them.
    pub flow_control_rejected: f64,
    /// Requests the controller sent (Strata: its own counter, by
    /// `VERB resource`; the
    /// Deployment controller: its writes from the audit log, its reads being
    /// watches).
    pub controller_requests: BTreeMap<String, f64>,
    /// Mean seconds per request as the operator saw them (its
    /// `strata_kube_request_duration_seconds`: sent until the answer's
    /// headers), by `VERB resource` (Strata only).
    pub controller_request_seconds: BTreeMap<String, f64>,
    /// Mean seconds per request in the API server
    /// (`apiserver_request_duration_seconds`, every client; watches left
    /// out), by `VERB resource`.
    pub apiserver_request_seconds: BTreeMap<String, f64>,
    /// Writes by the controller's users from the audit log, by
    /// `verb resource[/sub]` (Leases excluded).
    pub controller_writes: BTreeMap<String, u64>,
    /// Writes by the scheduler (bindings).
    pub scheduler_writes: u64,
    /// Reconciles (Strata's Model controller), and their p50 / p99 seconds.
    pub reconciles: Option<f64>,
    /// The reconcile duration histogram over the phase: cumulative
    /// `(le, count)` (Strata's Model controller).
    pub reconcile_buckets: Vec<(f64, f64)>,
    /// p50 of the reconcile duration, seconds.
    pub reconcile_p50: Option<f64>,
    /// p99 of the reconcile duration, seconds.
    pub reconcile_p99: Option<f64>,
    /// Status writes (Strata) over the phase, by result.
    pub status_writes: BTreeMap<String, f64>,
    /// Peak RSS of the controller's process over the phase, MiB
    /// (Deployments: the whole kube-controller-manager).
    pub rss_peak_mib: Option<f64>,
    /// CPU seconds of the controller's process over the phase.
    pub cpu_seconds: Option<f64>,
    /// CPU seconds of the API server and etcd over the phase (every
    /// client's work), against `wall_seconds`.
    pub control_plane_cpu_seconds: Option<f64>,
    /// Seconds requests waited for the operator's client-side rate limiter
    /// over the phase (summed over requests; Strata only).
    pub rate_limit_wait_seconds: Option<f64>,
    /// Strata: seconds from every object ready until the operator had sent
    /// its last request of the phase (what waited in the status and Event
    /// lanes); the phase's counters run until then.
    pub trailing_seconds: Option<f64>,
    /// Wall seconds of the phase (the idle window's length).
    pub wall_seconds: f64,
    /// Times the operator exited and was restarted in the phase.
    pub operator_restarts: u32,
}

impl Phase {
    fn requests_total(&self) -> f64 {
        self.controller_requests.values().sum()
    }

    fn writes_total(&self) -> u64 {
        self.controller_writes.values().sum()
    }
}

/// One controller's run: converge, churn, idle.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Side {
    /// Who.
    pub controller: String,
    /// Applying every object and waiting until all are ready.
    pub converge: Phase,
    /// New engine args on some, nodes deleted.
    pub churn: Phase,
    /// At rest.
    pub idle: Phase,
    /// Objects patched in the churn.
    pub churned_objects: usize,
    /// Nodes deleted in the churn.
    pub deleted_nodes: Vec<String>,
    /// Peak RSS at the end (VmHWM), MiB.
    pub hwm_mib: Option<f64>,
    /// Times the operator exited and was restarted (e.g. a lost lease),
    /// in all phases.
    pub operator_restarts: u32,
    /// Over the idle window: status fields that changed, by field, in how
    /// many objects.
    pub idle_status_changes: BTreeMap<String, usize>,
}

/// Top-level status fields that differ between two lists of objects (by
/// namespace/name), with the number of objects each differs in.
pub fn status_changes(before: &[Value], after: &[Value]) -> BTreeMap<String, usize> {
    let key = |v: &Value| {
        format!(
            "{}/{}",
            v["metadata"]["namespace"].as_str().unwrap_or(""),
            v["metadata"]["name"].as_str().unwrap_or("")
        )
    };
    let old: BTreeMap<String, &Value> = before.iter().map(|v| (key(v), &v["status"])).collect();
    let mut out = BTreeMap::new();
    for v in after {
        let Some(o) = old.get(&key(v)) else { continue };
        let new = &v["status"];
        let mut fields: BTreeSet<String> = BTreeSet::new();
        for s in [o, &new] {
            if let Some(m) = s.as_object() {
                fields.extend(m.keys().cloned());
            }
        }
        for f in fields {
            if o.get(&f) != new.get(&f) {
                *out.entry(f).or_insert(0) += 1;
            }
        }
    }
    out
}

/// The benchmark's results.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// When it ran (UTC).
    pub date: String,
    /// The machine.
    pub machine: String,
    /// Nodes: H100, A100.
    pub nodes: (usize, usize),
    /// Models (and Deployments).
    pub models: usize,
    /// Namespaces.
    pub namespaces: usize,
    /// Replicas (pods) in all.
    pub replicas: u64,
    /// GPUs asked for in all.
    pub gpus: u64,
    /// Seed.
    pub seed: u64,
    /// The operator's flags beyond the benchmark's own.
    pub operator_args: Vec<String>,
    /// The mix: `GPUs×replicas` → Models.
    pub mix: BTreeMap<String, usize>,
    /// Strata.
    pub strata: Side,
    /// The Deployment controller (absent when skipped or failed).
    pub deployments: Option<Side>,
    /// Why the Deployment phases did not complete, if they did not.
    pub deployments_error: Option<String>,
    /// KubeAI's outcome.
    pub kubeai: String,
}

/// A phase's mean request times for its most frequent requests: the
/// controller's view / the API server's (or the API server's alone), ms.
fn latency(p: &Phase) -> String {
    let mut keys: Vec<(&String, f64)> = if p.controller_request_seconds.is_empty() {
        p.apiserver_requests.iter().map(|(k, v)| (k, *v)).collect()
    } else {
        p.controller_requests.iter().map(|(k, v)| (k, *v)).collect()
    };
    keys.sort_by(|a, b| b.1.total_cmp(&a.1));
    keys.iter()
        .filter(|(k, _)| p.apiserver_request_seconds.contains_key(*k))
        .take(8)
        .map(|(k, _)| {
            let server = p.apiserver_request_seconds.get(*k).copied().unwrap_or(0.0) * 1e3;
            match p.controller_request_seconds.get(*k) {
                Some(c) => format!("{k} {:.1} / {server:.1}", c * 1e3),
                None => format!("{k} {server:.1}"),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn f1(x: f64) -> String {
    format!("{x:.1}")
}

fn opt(x: Option<f64>, f: impl Fn(f64) -> String) -> String {
    x.map_or_else(|| "-".into(), f)
}

fn top(m: &BTreeMap<String, f64>, n: usize) -> String {
    let mut v: Vec<(&String, &f64)> = m.iter().collect();
    v.sort_by(|a, b| b.1.total_cmp(a.1));
    v.iter()
        .take(n)
        .map(|(k, c)| format!("{k} {c:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Report {
    /// The Markdown of docs/benchmarks.md.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "{} Models in {} namespaces ({} replicas, {} GPUs asked of {}) on {} H100 + {} A100 8-GPU KWOK nodes; seed {}; {}; {}.\n\n",
            self.models,
            self.namespaces,
            self.replicas,
            self.gpus,
            (self.nodes.0 + self.nodes.1) as u64 * u64::from(GPUS_PER_NODE),
            self.nodes.0,
            self.nodes.1,
            self.seed,
            self.machine,
            self.date
        ));
        if !self.operator_args.is_empty() {
            s.push_str(&format!(
                "The operator's flags beyond the benchmark's own: `{}`.\n\n",
                self.operator_args.join(" ")
            ));
        }
        s.push_str(&format!(
            "Mix (GPUs per replica × replicas: Models): {}.\n\n",
            self.mix
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        let sides: Vec<&Side> = std::iter::once(&self.strata)
            .chain(self.deployments.as_ref())
            .collect();
        s.push_str("| | ");
        s.push_str(
            &sides
                .iter()
                .map(|x| x.controller.as_str())
                .collect::<Vec<_>>()
                .join(" | "),
        );
        s.push_str(" |\n|---|");
        s.push_str(&"---|".repeat(sides.len()));
        s.push('\n');
        let n = self.models as f64;
        let row = |name: &str, f: &dyn Fn(&Side) -> String| -> String {
            format!(
                "| {name} | {} |\n",
                sides.iter().map(|x| f(x)).collect::<Vec<_>>().join(" | ")
            )
        };
        s.push_str(&row("seconds from the first to the last apply", &|x| {
            f1(x.converge.apply_seconds)
        }));
        s.push_str(&row(
            "seconds from the last apply to all Ready/Available",
            &|x| f1(x.converge.converge_seconds),
        ));
        s.push_str(&row(
            "seconds from all Ready until the operator's last request (converge)",
            &|x| opt(x.converge.trailing_seconds, f1),
        ));
        s.push_str(&row("API requests sent per object (converge)", &|x| {
            format!("{:.2}", x.converge.requests_total() / n)
        }));
        s.push_str(&row("writes per object (converge, audit log)", &|x| {
            format!("{:.2}", x.converge.writes_total() as f64 / n)
        }));
        s.push_str(&row("scheduler bindings (converge)", &|x| {
            x.converge.scheduler_writes.to_string()
        }));
        s.push_str(&row(
            "apiserver_request_total, all clients (converge)",
            &|x| format!("{:.0}", x.converge.apiserver_requests.values().sum::<f64>()),
        ));
        s.push_str(&row(
            "rejected by the API server's flow control (429), all clients (converge)",
            &|x| format!("{:.0}", x.converge.flow_control_rejected),
        ));
        s.push_str(&row("reconciles (converge)", &|x| {
            opt(x.converge.reconciles, |r| format!("{r:.0}"))
        }));
        s.push_str(&row("reconcile p50 / p99, ms (converge)", &|x| match (
            x.converge.reconcile_p50,
            x.converge.reconcile_p99,
        ) {
            (Some(a), Some(b)) => format!("{:.1} / {:.1}", a * 1e3, b * 1e3),
            _ => "-".into(),
        }));
        s.push_str(&row("peak RSS, MiB (converge / all phases' VmHWM)", &|x| {
            format!(
                "{} / {}",
                opt(x.converge.rss_peak_mib, f1),
                opt(x.hwm_mib, f1)
            )
        }));
        s.push_str(&row("CPU seconds (converge)", &|x| {
            opt(x.converge.cpu_seconds, f1)
        }));
        s.push_str(&row(
            "API server + etcd CPU seconds (converge; per wall second)",
            &|x| {
                opt(x.converge.control_plane_cpu_seconds, |c| {
                    format!("{c:.1} ({:.2})", c / x.converge.wall_seconds.max(1e-9))
                })
            },
        ));
        s.push_str(&row(
            "seconds requests waited for the client rate limiter, summed (converge)",
            &|x| opt(x.converge.rate_limit_wait_seconds, f1),
        ));
        s.push_str(&row("operator restarts (converge / churn / idle)", &|x| {
            format!(
                "{} / {} / {}",
                x.converge.operator_restarts, x.churn.operator_restarts, x.idle.operator_restarts
            )
        }));
        s.push_str(&row("churn: objects patched, nodes deleted", &|x| {
            format!("{}, {}", x.churned_objects, x.deleted_nodes.len())
        }));
        s.push_str(&row("churn: seconds to converge", &|x| {
            f1(x.churn.converge_seconds)
        }));
        s.push_str(&row("churn: API requests sent / writes", &|x| {
            format!(
                "{:.0} / {}",
                x.churn.requests_total(),
                x.churn.writes_total()
            )
        }));
        s.push_str(&row("churn: reconciles, p50 / p99 ms", &|x| match (
            x.churn.reconciles,
            x.churn.reconcile_p50,
            x.churn.reconcile_p99,
        ) {
            (Some(r), Some(a), Some(b)) => {
                format!("{r:.0}, {:.1} / {:.1}", a * 1e3, b * 1e3)
            }
            _ => "-".into(),
        }));
        s.push_str(&row("churn: CPU seconds", &|x| {
            opt(x.churn.cpu_seconds, f1)
        }));
        s.push_str(&row("idle: minutes", &|x| {
            format!("{:.1}", x.idle.wall_seconds / 60.0)
        }));
        s.push_str(&row("idle: requests per minute (per object)", &|x| {
            let m = x.idle.wall_seconds / 60.0;
            if m <= 0.0 {
                return "-".into();
            }
            let r = x.idle.requests_total() / m + 0.0;
            format!("{r:.1} ({:.4})", r / n)
        }));
        s.push_str(&row("idle: writes per minute", &|x| {
            let m = x.idle.wall_seconds / 60.0;
            if m <= 0.0 {
                return "-".into();
            }
            format!("{:.1}", x.idle.writes_total() as f64 / m)
        }));
        s.push_str(&row("idle: CPU seconds per minute", &|x| {
            let m = x.idle.wall_seconds / 60.0;
            opt(x.idle.cpu_seconds.filter(|_| m > 0.0), |c| {
                format!("{:.2}", c / m)
            })
        }));
        s.push('\n');
        for x in &sides {
            s.push_str(&format!("{}:\n\n", x.controller));
            for (name, p) in [
                ("converge", &x.converge),
                ("churn", &x.churn),
                ("idle", &x.idle),
            ] {
                let writes: BTreeMap<String, f64> = p
                    .controller_writes
                    .iter()
                    .map(|(k, v)| (k.clone(), *v as f64))
                    .collect();
                s.push_str(&format!(
                    "- {name}: requests sent: {}; writes: {}; status writes: {}; API server (all clients) top: {}\n",
                    if p.controller_requests.is_empty() {
                        "-".into()
                    } else {
                        top(&p.controller_requests, 8)
                    },
                    if writes.is_empty() {
                        "-".into()
                    } else {
                        top(&writes, 8)
                    },
                    if p.status_writes.is_empty() {
                        "-".into()
                    } else {
                        top(&p.status_writes, 4)
                    },
                    top(&p.apiserver_requests, 6)
                ));
            }
            for (name, p) in [("converge", &x.converge), ("churn", &x.churn)] {
                if p.apiserver_request_seconds.is_empty() {
                    continue;
                }
                s.push_str(&format!(
                    "- {name}: mean ms per request, {}API server: {}\n",
                    if p.controller_request_seconds.is_empty() {
                        ""
                    } else {
                        "as the operator saw it / in the "
                    },
                    latency(p)
                ));
            }
            if !x.idle_status_changes.is_empty() {
                s.push_str(&format!(
                    "- idle: status fields that changed (in how many objects): {}\n",
                    x.idle_status_changes
                        .iter()
                        .map(|(k, v)| format!("{k} {v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            if !x.deleted_nodes.is_empty() {
                s.push_str(&format!(
                    "- deleted nodes: {}\n",
                    x.deleted_nodes.join(", ")
                ));
            }
            s.push('\n');
        }
        if let Some(e) = &self.deployments_error {
            s.push_str(&format!("The Deployment controller's phases: {e}\n\n"));
        }
        s.push_str(&format!("KubeAI: {}\n", self.kubeai));
        s
    }
}

fn parse_err(what: &str) -> impl FnOnce(serde_json::Error) -> BenchError + '_ {
    move |e| BenchError::Parse {
        what: what.into(),
        reason: e.to_string(),
    }
}

fn model_ready(m: &Model, updated: bool) -> bool {
    let Some(s) = &m.status else { return false };
    let want = m.spec.replicas.unwrap_or(0);
    s.observed_generation == m.metadata.generation
        && s.replicas == want
        && s.ready_replicas == want
        && (!updated || s.updated_replicas == want)
}

fn deployment_ready(d: &Deployment) -> bool {
    let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let Some(s) = &d.status else { return false };
    s.observed_generation == d.metadata.generation
        && s.replicas == Some(want)
        && s.available_replicas == Some(want)
        && s.updated_replicas == Some(want)
}

/// Which kind the benchmark is driving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Models,
    Deployments,
}

/// The benchmark, with its world.
pub struct Bench {
    opts: Options,
    cluster: Cluster,
    client: Client,
    workloads: Vec<Workload>,
    operator_exe: PathBuf,
    sa_kubeconfig: PathBuf,
    topology: PathBuf,
    _topology_dir: Option<tempfile::TempDir>,
    h100: usize,
    a100: usize,
}

fn operator_binary(opt: &Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = opt {
        return if p.is_file() {
            Ok(p.clone())
        } else {
            Err(BenchError::Binary { path: p.clone() })
        };
    }
    // target/<profile>/strata-bench-scale -> target/release/strata-operator
    let release = std::env::current_exe().ok().and_then(|e| {
        e.parent()
            .and_then(Path::parent)
            .map(|t| t.join("release/strata-operator"))
    });
    match release {
        Some(p) if p.is_file() => Ok(p),
        _ => sibling_binary("strata-operator"),
    }
}

impl Bench {
    /// Brings up the world and installs the chart (CRDs, RBAC; no operator
    /// pod), the namespaces and a ServiceAccount kubeconfig.
    pub async fn start(opts: Options) -> Result<Self> {
        if opts.concurrency == 0 {
            return Err(BenchError::Options("concurrency must be at least 1".into()));
        }
        let (h100, a100) = node_split(opts.nodes);
        let workloads = plan(h100, a100, opts.models, opts.namespaces, opts.seed)?;
        let operator_exe = operator_binary(&opts.operator)?;
        let (topology, topology_dir) = if opts.nodes == 200 {
            (Options::default_topology(), None)
        } else {
            let dir = tempfile::tempdir().map_err(|e| BenchError::Process {
                what: "a temporary directory".into(),
                reason: e.to_string(),
            })?;
            let path = dir.path().join("bench-scale.yaml");
            std::fs::write(&path, topology_yaml(h100, a100)).map_err(|e| BenchError::Process {
                what: format!("writing {}", path.display()),
                reason: e.to_string(),
            })?;
            (path, Some(dir))
        };
        let topo = Topology::load(&topology)?;
        let counted: usize = topo.node_groups.iter().map(|g| g.count as usize).sum();
        if counted != opts.nodes {
            return Err(BenchError::Options(format!(
                "{} has {counted} nodes, not {}",
                topology.display(),
                opts.nodes
            )));
        }
        let bin_dir = crate::bench_memory::upstream_binaries().await?;
        let cluster = Cluster::start(crate::cluster::Options {
            dir: opts.dir.clone(),
            topology: topology.clone(),
            bin_dir,
            timeout: opts.timeout,
        })
        .await?;
        tracing::info!(
            seconds = %format!("{:.0}", cluster.info.startup_seconds),
            nodes = cluster.info.nodes.len(),
            "world up"
        );
        let client = client_from(&cluster.info.kubeconfig).await?;
        let mut bench = Self {
            opts,
            cluster,
            client,
            workloads,
            operator_exe,
            sa_kubeconfig: PathBuf::new(),
            topology,
            _topology_dir: topology_dir,
            h100,
            a100,
        };
        bench.install().await?;
        Ok(bench)
    }

    async fn helm(&self, args: &[&str]) -> Result<()> {
        let helm = self.cluster.info.dir.join("helm");
        let out = Command::new(self.cluster.info.bin_dir.join("helm"))
            .args(args)
            .env("KUBECONFIG", &self.cluster.info.kubeconfig)
            .env("HELM_CACHE_HOME", helm.join("cache"))
            .env("HELM_CONFIG_HOME", helm.join("config"))
            .env("HELM_DATA_HOME", helm.join("data"))
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| BenchError::Process {
                what: "running helm".into(),
                reason: e.to_string(),
            })?;
        if !out.status.success() {
            return Err(BenchError::Process {
                what: format!("helm {}", args.join(" ")),
                reason: format!(
                    "{}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        Ok(())
    }

    async fn install(&mut self) -> Result<()> {
        let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/strata");
        let chart = chart.to_string_lossy();
        self.helm(&[
            "upgrade",
            "--install",
            "strata",
            &chart,
            "--namespace",
            "strata-system",
            "--create-namespace",
            "--set",
            "replicaCount=0",
            "--wait",
            "--timeout",
            "2m",
        ])
        .await?;
        self.sa_kubeconfig = self.service_account_kubeconfig().await?;
        let namespaces: BTreeSet<String> =
            self.workloads.iter().map(|w| w.namespace.clone()).collect();
        let ns_api: Api<Namespace> = Api::all(self.client.clone());
        for ns in &namespaces {
            let obj: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}}))
                .map_err(parse_err("a namespace"))?;
            ns_api
                .create(&PostParams::default(), &obj)
                .await
                .map_err(kube_err(format!("creating namespace {ns}")))?;
        }
        // Pods are refused until the namespace's default ServiceAccount exists.
        for ns in &namespaces {
            let sas: Api<ServiceAccount> = Api::namespaced(self.client.clone(), ns);
            poll_until(
                &format!("ServiceAccount {ns}/default"),
                self.opts.timeout,
                Duration::from_millis(200),
                || {
                    let sas = sas.clone();
                    async move { Ok(sas.get_opt("default").await.ok().flatten().is_some()) }
                },
            )
            .await?;
        }
        Ok(())
    }

    /// A kubeconfig with a token of the chart's ServiceAccount.
    async fn service_account_kubeconfig(&self) -> Result<PathBuf> {
        crate::bench_memory::chart_operator_kubeconfig(&self.client, &self.cluster.info).await
    }

    /// The API server's /metrics.
    async fn apiserver_metrics(&self) -> Result<String> {
        let req = http::Request::get("/metrics")
            .body(Vec::new())
            .map_err(|e| BenchError::Parse {
                what: "GET /metrics".into(),
                reason: e.to_string(),
            })?;
        let text = self
            .client
            .request_text(req)
            .await
            .map_err(kube_err("GET the API server's /metrics"))?;
        Ok(text)
    }

    /// Writes in the audit log received in `[from, to]`, by user.
    fn audit_writes(
        &self,
        from: Timestamp,
        to: Timestamp,
        users: &[&str],
    ) -> Result<BTreeMap<String, u64>> {
        let path = self
            .cluster
            .info
            .audit_log
            .clone()
            .unwrap_or_else(|| self.cluster.info.log_dir.join(crate::audit::LOG_NAME));
        let events = crate::audit::read(&path)?;
        let mut out = BTreeMap::new();
        for e in events {
            if !users.contains(&e.user.username.as_str()) {
                continue;
            }
            if !e.received().is_some_and(|t| t >= from && t <= to) {
                continue;
            }
            let o = e.object_ref.clone().unwrap_or_default();
            if o.resource == "leases" {
                continue;
            }
            let sub = o.subresource.map(|s| format!("/{s}")).unwrap_or_default();
            *out.entry(format!("{} {}{sub}", e.verb, o.resource))
                .or_insert(0) += 1;
        }
        Ok(out)
    }

    /// The kube-controller-manager of this world (by its kubeconfig in
    /// the world's directory).
    fn controller_manager_pid(&self) -> Option<u32> {
        self.world_pid("kube-controller-manager")
    }

    /// CPU seconds of the world's API server and etcd together, now.
    fn control_plane_cpu(&self) -> Option<f64> {
        let a = cpu_seconds(self.world_pid("kube-apiserver")?).ok()?;
        let e = cpu_seconds(self.world_pid("etcd")?).ok()?;
        Some(a + e)
    }

    /// The pid of this world's process running `binary`.
    fn world_pid(&self, binary: &str) -> Option<u32> {
        let dir = self.cluster.info.dir.to_string_lossy().to_string();
        let entries = std::fs::read_dir("/proc").ok()?;
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let cmd = String::from_utf8_lossy(&cmd);
            let mut parts = cmd.split('\0');
            if parts
                .next()
                .is_some_and(|a| a.ends_with(&format!("/{binary}")) || a == binary)
                && cmd.contains(&dir)
            {
                return Some(pid);
            }
        }
        None
    }

    /// Applies `bodies` (server-side apply), `concurrency` in flight;
    /// returns the first and last successful apply's instants.
    async fn apply_all(
        &self,
        kind: Kind,
        generation: u32,
        which: &[usize],
    ) -> Result<(Instant, Instant)> {
        let first = Instant::now();
        let pp = PatchParams::apply(MANAGER).force();
        let results: Vec<Result<Instant>> = futures::stream::iter(which.iter().copied())
            .map(|i| {
                let w = &self.workloads[i];
                let client = self.client.clone();
                let pp = pp.clone();
                async move {
                    let what = format!("applying {kind:?} {}/{}", w.namespace, w.name);
                    match kind {
                        Kind::Models => {
                            Api::<Model>::namespaced(client, &w.namespace)
                                .patch(&w.name, &pp, &Patch::Apply(model(w, generation)))
                                .await
                                .map_err(kube_err(what))?;
                        }
                        Kind::Deployments => {
                            Api::<Deployment>::namespaced(client, &w.namespace)
                                .patch(&w.name, &pp, &Patch::Apply(deployment(w, generation)))
                                .await
                                .map_err(kube_err(what))?;
                        }
                    }
                    Ok(Instant::now())
                }
            })
            .buffer_unordered(self.opts.concurrency)
            .collect()
            .await;
        let mut last = first;
        for r in results {
            last = last.max(r?);
        }
        Ok((first, last))
    }

    /// Waits until every object of `kind` is ready (and, if `updated`, on
    /// the newest template) and no bench pod is on a node in `gone`.
    async fn wait_ready(
        &self,
        kind: Kind,
        updated: bool,
        gone: &BTreeSet<String>,
        mut op: Option<&mut Operator>,
    ) -> Result<()> {
        let deadline = Instant::now() + self.opts.timeout;
        let mut last_log = Instant::now();
        // Watched, as `kubectl wait` does: a LIST of every object each poll
        // cost the API server more than a change sent once (and the poll's
        // interval was the measurement's resolution).
        let models = (kind == Kind::Models)
            .then(|| watch::<Model>(&self.client, &format!("{BENCH_LABEL}=model")));
        let deployments = (kind == Kind::Deployments)
            .then(|| watch::<Deployment>(&self.client, &format!("{BENCH_LABEL}=deployment")));
        let mut last_op = Instant::now();
        loop {
            if let Some(op) = op.as_deref_mut()
                && last_op.elapsed() >= POLL
            {
                op.ensure().await?;
                op.observe().await;
                last_op = Instant::now();
            }
            let ready = match (&models, &deployments) {
                (Some((m, _)), _) => m.state().iter().filter(|m| model_ready(m, updated)).count(),
                (_, Some((d, _))) => d.state().iter().filter(|d| deployment_ready(d)).count(),
                _ => 0,
            };
            let mut stranded = 0;
            if ready == self.workloads.len() && !gone.is_empty() {
                stranded = self
                    .bench_pods(kind)
                    .await?
                    .iter()
                    .filter(|p| {
                        p.spec
                            .as_ref()
                            .and_then(|s| s.node_name.as_ref())
                            .is_some_and(|n| gone.contains(n))
                    })
                    .count();
            }
            if ready == self.workloads.len() && stranded == 0 {
                return Ok(());
            }
            if last_log.elapsed() > Duration::from_secs(20) {
                tracing::info!(ready, of = self.workloads.len(), stranded, ?kind, "waiting");
                last_log = Instant::now();
            }
            if Instant::now() >= deadline {
                return Err(BenchError::World(crate::Error::Timeout {
                    what: format!(
                        "every {kind:?} ready ({ready} of {} so far, {stranded} pods on deleted nodes)",
                        self.workloads.len()
                    ),
                    seconds: self.opts.timeout.as_secs(),
                }));
            }
            tokio::time::sleep(WATCH_CHECK).await;
        }
    }

    async fn bench_pods(&self, kind: Kind) -> Result<Vec<Pod>> {
        let selector = match kind {
            Kind::Models => format!(
                "{}={}",
                strata_core::labels::MANAGED_BY,
                strata_core::labels::MANAGER
            ),
            Kind::Deployments => format!("{BENCH_LABEL}=deployment"),
        };
        Ok(Api::<Pod>::all(self.client.clone())
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(kube_err("listing pods"))?
            .items)
    }

    /// Up to `n` nodes holding bench pods, while each pool keeps room for
    /// its replicas (and 4 GPUs of surge) without them: nodes whose
    /// replicas are the smallest first (a node holding only 1-GPU replicas
    /// can always be emptied into any free GPU; at 90 % fill the free GPUs
    /// are scattered, and a 4- or 8-GPU replica of a deleted node may find
    /// no node with that many free), then those with the fewest GPUs asked.
    async fn nodes_to_delete(&self, kind: Kind, n: usize) -> Result<Vec<String>> {
        let mut used: BTreeMap<String, (i64, i64)> = BTreeMap::new();
        for p in self.bench_pods(kind).await? {
            let Some(node) = p.spec.as_ref().and_then(|s| s.node_name.clone()) else {
                continue;
            };
            let gpus: i64 = strata_core::view::pod_gpu_requests(&p).values().sum();
            let e = used.entry(node).or_insert((0, 0));
            e.0 = e.0.max(gpus);
            e.1 += gpus;
        }
        let mut v: Vec<((i64, i64), String)> = used.into_iter().map(|(k, g)| (g, k)).collect();
        v.sort();
        // A pool keeps room for its replicas and a few surge GPUs.
        let pool_of = |node: &str| {
            if node.starts_with("a100-") {
                Pool::A100
            } else {
                Pool::H100
            }
        };
        let mut room: BTreeMap<Pool, i64> = BTreeMap::new();
        for (pool, nodes) in [(Pool::H100, self.h100), (Pool::A100, self.a100)] {
            let demand: i64 = self
                .workloads
                .iter()
                .filter(|w| w.pool == pool)
                .map(|w| i64::from(w.gpus * w.replicas))
                .sum();
            room.insert(pool, nodes as i64 * i64::from(GPUS_PER_NODE) - demand - 4);
        }
        let mut out = Vec::new();
        for (_, node) in v {
            if out.len() == n {
                break;
            }
            let r = room.entry(pool_of(&node)).or_insert(0);
            if *r >= i64::from(GPUS_PER_NODE) {
                *r -= i64::from(GPUS_PER_NODE);
                out.push(node);
            }
        }
        Ok(out)
    }

    /// The objects the churn patches: a seeded `churn_percent` of those
    /// with at most 2 GPUs per replica (a surge replica of 4 or 8 GPUs
    /// finds no room at 90 % fill).
    fn churn_set(&self) -> Vec<usize> {
        let mut small: Vec<usize> = (0..self.workloads.len())
            .filter(|&i| self.workloads[i].gpus <= 2)
            .collect();
        let want = (self.workloads.len() * self.opts.churn_percent / 100).min(small.len());
        let mut rng = Rng(self.opts.seed ^ 0xc4u64);
        let mut out = Vec::new();
        while out.len() < want {
            let k = rng.below(small.len() as u64) as usize;
            out.push(small.swap_remove(k));
        }
        out.sort();
        out
    }

    async fn delete_nodes(&self, names: &[String]) -> Result<()> {
        let api: Api<Node> = Api::all(self.client.clone());
        for n in names {
            api.delete(n, &DeleteParams::default())
                .await
                .map_err(kube_err(format!("deleting Node {n}")))?;
        }
        Ok(())
    }

    async fn recreate_nodes(&self, names: &[String]) -> Result<()> {
        let all = Topology::load(&self.topology)?.nodes();
        let api: Api<Node> = Api::all(self.client.clone());
        for name in names {
            let Some(node) = all
                .iter()
                .find(|n| n.metadata.name.as_deref() == Some(name))
            else {
                return Err(BenchError::Options(format!(
                    "no node {name} in the topology"
                )));
            };
            match api.create(&PostParams::default(), node).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(kube_err(format!("creating Node {name}"))(e)),
            }
            let status = json!({ "status": node.status });
            api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
                .await
                .map_err(kube_err(format!("status of Node {name}")))?;
        }
        for name in names {
            let api = api.clone();
            poll_until(
                &format!("Node {name} Ready"),
                self.opts.timeout,
                Duration::from_millis(500),
                || {
                    let api = api.clone();
                    async move {
                        Ok(crate::cluster::node_ready(
                            api.get_opt(name).await.ok().flatten().as_ref(),
                        ))
                    }
                },
            )
            .await?;
        }
        Ok(())
    }

    /// Strata's phases.
    async fn strata(&self) -> Result<Side> {
        let mut side = Side {
            controller: "Strata (strata-operator, release)".into(),
            ..Side::default()
        };
        let log = self.cluster.info.log_dir.join("strata-operator-scale.log");
        let mut op =
            Operator::start(&self.operator_exe, &self.sa_kubeconfig, &log, &self.opts).await?;
        let sampler = RssSampler::start(op.shared_pid.clone());
        let result = self.strata_phases(&mut op, &sampler, &mut side).await;
        sampler.stop().await;
        if let Ok(m) = proc_mem(op.pid) {
            side.hwm_mib = Some(m.hwm_kib as f64 / 1024.0);
        }
        // Models go (their pods with them) while the operator still runs
        // (it owns their finalizers, if any).
        let cleanup = match result {
            Ok(()) => self.delete_models(&mut op).await,
            Err(e) => Err(e),
        };
        side.operator_restarts = op.restarts;
        op.stop(Duration::from_secs(10)).await;
        cleanup?;
        Ok(side)
    }

    async fn strata_phases(
        &self,
        op: &mut Operator,
        sampler: &RssSampler,
        side: &mut Side,
    ) -> Result<()> {
        // The pools, then the operator's caches synced and the pools seen.
        let pools: Api<GPUPool> = Api::all(self.client.clone());
        for p in [Pool::H100, Pool::A100] {
            let pool: GPUPool = serde_json::from_value(json!({
                "apiVersion": "strata.ai/v1alpha1",
                "kind": "GPUPool",
                "metadata": {"name": p.name()},
                "spec": {
                    "nodeSelector": {"matchLabels": {"nvidia.com/gpu.product": p.product()}},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "placement": "BinPack"
                }
            }))
            .map_err(parse_err("a GPUPool"))?;
            pools
                .create(&PostParams::default(), &pool)
                .await
                .map_err(kube_err(format!("creating GPUPool {}", p.name())))?;
        }
        let deadline = Instant::now() + self.opts.timeout;
        loop {
            op.ensure().await?;
            if let Ok(text) = op.metrics().await {
                let pools_done = counter_sum(
                    &text,
                    "strata_reconcile_total",
                    &["controller=\"gpupool\"", "result=\"success\""],
                );
                if pools_done >= 2.0 {
                    break;
                }
            }
            if Instant::now() >= deadline {
                return Err(BenchError::Process {
                    what: "strata-operator".into(),
                    reason: "did not become leader and reconcile the pools in time".into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        tracing::info!("operator leading; applying Models");

        // 1. Converge.
        let all: Vec<usize> = self.largest_first();
        side.converge = self
            .strata_phase(op, sampler, || async {
                let (first, last) = self.apply_all(Kind::Models, 0, &all).await?;
                tracing::info!(
                    seconds = %format!("{:.1}", (last - first).as_secs_f64()),
                    "every Model applied"
                );
                Ok((first, last, BTreeSet::new(), false))
            })
            .await?;
        tracing::info!(
            seconds = %format!("{:.1}", side.converge.converge_seconds),
            "every Model ready"
        );

        // 2. Churn.
        let churn = self.churn_set();
        side.churned_objects = churn.len();
        let nodes = self
            .nodes_to_delete(Kind::Models, self.opts.churn_nodes)
            .await?;
        side.deleted_nodes = nodes.clone();
        side.churn = self
            .strata_phase(op, sampler, || async {
                let (first, _) = self.apply_all(Kind::Models, 1, &churn).await?;
                self.delete_nodes(&nodes).await?;
                Ok((first, Instant::now(), nodes.iter().cloned().collect(), true))
            })
            .await?;
        tracing::info!(
            seconds = %format!("{:.1}", side.churn.converge_seconds),
            "churn converged"
        );

        // 3. Idle.
        let before = self.model_values().await?;
        side.idle = self
            .strata_phase(op, sampler, || async {
                let start = Instant::now();
                tracing::info!(minutes = self.opts.idle.as_secs() / 60, "idle window");
                Ok((start, start, BTreeSet::new(), true))
            })
            .await?;
        side.idle_status_changes = status_changes(&before, &self.model_values().await?);
        side.idle.converge_seconds = 0.0;
        // Every Model still ready after the window.
        self.wait_ready(Kind::Models, true, &BTreeSet::new(), Some(op))
            .await?;
        // Put the nodes back for the Deployments.
        self.recreate_nodes(&side.deleted_nodes).await?;
        Ok(())
    }

    /// Runs `act` (which returns the first and last action's instants, the
    /// nodes gone and whether the template changed), waits until every
    /// Model is ready, and measures the operator over it.
    async fn strata_phase<F, Fut>(
        &self,
        op: &mut Operator,
        sampler: &RssSampler,
        act: F,
    ) -> Result<Phase>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<(Instant, Instant, BTreeSet<String>, bool)>>,
    {
        op.ensure().await?;
        op.carried.clear();
        let m0 = op.metrics().await?;
        let a0 = self.apiserver_metrics().await?;
        let cpu0 = cpu_seconds(op.pid)?;
        let cp0 = self.control_plane_cpu();
        op.last = Some((m0.clone(), cpu0));
        let t0 = Timestamp::now();
        let w0 = Instant::now();
        sampler.take_peak();
        let restarts0 = op.restarts;
        let (first, last, gone, updated) = act().await?;
        if first == last && gone.is_empty() {
            // The idle window: the operator watched (restarted if it exits,
            // its counters carried) until it ends.
            while first.elapsed() < self.opts.idle {
                op.ensure().await?;
                op.observe().await;
                let left = self.opts.idle.saturating_sub(first.elapsed());
                tokio::time::sleep(left.min(Duration::from_secs(5))).await;
            }
        }
        self.wait_ready(Kind::Models, updated, &gone, Some(&mut *op))
            .await?;
        let converged = Instant::now();
        // The phase's work is not done until the operator has sent what it
        // deferred (Events after a busy minute): counted in this phase, and
        // the next one starts from a quiet operator.
        let trailing = if first == last && gone.is_empty() {
            None
        } else {
            Some(self.wait_quiet(op, converged).await?)
        };
        let (m1, cpu1) = op.phase_end().await?;
        let a1 = self.apiserver_metrics().await?;
        let t1 = Timestamp::now();
        let model = ["controller=\"model\""];
        let hist = buckets_delta(
            &histogram_buckets(&m1, "strata_reconcile_duration_seconds", &model),
            &histogram_buckets(&m0, "strata_reconcile_duration_seconds", &model),
        );
        let reconciles = counter_sum(&m1, "strata_reconcile_total", &model)
            - counter_sum(&m0, "strata_reconcile_total", &model);
        Ok(Phase {
            objects: self.workloads.len(),
            apply_seconds: (last - first).as_secs_f64(),
            converge_seconds: (converged - last).as_secs_f64(),
            apiserver_requests: map_delta(&apiserver_requests(&a1), &apiserver_requests(&a0)),
            flow_control_rejected: flow_control_rejected(&a1) - flow_control_rejected(&a0),
            apiserver_request_seconds: mean_delta(
                &sum_and_count(&a1, "apiserver_request_duration_seconds"),
                &sum_and_count(&a0, "apiserver_request_duration_seconds"),
            ),
            controller_requests: map_delta(
                &by_verb_and_resource(&m1, "strata_kube_requests_total"),
                &by_verb_and_resource(&m0, "strata_kube_requests_total"),
            ),
            controller_request_seconds: mean_delta(
                &sum_and_count(&m1, "strata_kube_request_duration_seconds"),
                &sum_and_count(&m0, "strata_kube_request_duration_seconds"),
            ),
            controller_writes: self.audit_writes(t0, t1, &[OPERATOR_USER])?,
            scheduler_writes: self.audit_writes(t0, t1, &[SCHEDULER_USER])?.values().sum(),
            reconciles: Some(reconciles),
            reconcile_buckets: hist
                .iter()
                .map(|&(le, c)| (if le.is_finite() { le } else { f64::MAX }, c))
                .collect(),
            reconcile_p50: histogram_quantile(0.5, &hist),
            reconcile_p99: histogram_quantile(0.99, &hist),
            status_writes: map_delta(
                &by_label(&m1, "strata_status_writes_total", "result"),
                &by_label(&m0, "strata_status_writes_total", "result"),
            ),
            rss_peak_mib: Some(sampler.take_peak() as f64 / 1024.0),
            cpu_seconds: Some(cpu1 - cpu0),
            control_plane_cpu_seconds: self.control_plane_cpu().zip(cp0).map(|(b, a)| b - a),
            rate_limit_wait_seconds: Some(
                counter_sum(&m1, "strata_kube_rate_limit_wait_seconds_total", &[])
                    - counter_sum(&m0, "strata_kube_rate_limit_wait_seconds_total", &[]),
            ),
            trailing_seconds: trailing,
            operator_restarts: op.restarts - restarts0,
            wall_seconds: w0.elapsed().as_secs_f64(),
        })
    }

    /// Waits until the operator has sent no request for [`QUIET`]
    /// (polling its counters every second, at most [`QUIET_AT_MOST`]):
    /// seconds from `since` until its last request.
    async fn wait_quiet(&self, op: &mut Operator, since: Instant) -> Result<f64> {
        let mut last_change = since;
        let mut sent = None;
        while last_change.elapsed() < QUIET && since.elapsed() < QUIET_AT_MOST {
            op.ensure().await?;
            let now_sent = counter_sum(&op.metrics().await?, "strata_kube_requests_total", &[]);
            if sent != Some(now_sent) {
                if sent.is_some() {
                    last_change = Instant::now();
                }
                sent = Some(now_sent);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        Ok((last_change - since).as_secs_f64())
    }

    async fn model_values(&self) -> Result<Vec<Value>> {
        let list = Api::<Model>::all(self.client.clone())
            .list(&ListParams::default().labels(&format!("{BENCH_LABEL}=model")))
            .await
            .map_err(kube_err("listing Models"))?;
        list.items
            .iter()
            .map(|m| serde_json::to_value(m).map_err(parse_err("a Model")))
            .collect()
    }

    fn largest_first(&self) -> Vec<usize> {
        let mut all: Vec<usize> = (0..self.workloads.len()).collect();
        all.sort_by_key(|&i| {
            let w = &self.workloads[i];
            (std::cmp::Reverse(w.gpus), std::cmp::Reverse(w.replicas), i)
        });
        all
    }

    async fn delete_models(&self, op: &mut Operator) -> Result<()> {
        let namespaces: BTreeSet<&str> = self
            .workloads
            .iter()
            .map(|w| w.namespace.as_str())
            .collect();
        let lp = ListParams::default().labels(&format!("{BENCH_LABEL}=model"));
        for ns in &namespaces {
            Api::<Model>::namespaced(self.client.clone(), ns)
                .delete_collection(&DeleteParams::default(), &lp)
                .await
                .map_err(kube_err(format!("deleting the Models of {ns}")))?;
        }
        let deadline = Instant::now() + self.opts.timeout;
        loop {
            op.ensure().await?;
            let models = Api::<Model>::all(self.client.clone())
                .list(&lp)
                .await
                .map_err(kube_err("listing Models"))?
                .items
                .len();
            let pods = self.bench_pods(Kind::Models).await?.len();
            if models == 0 && pods == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(BenchError::World(crate::Error::Timeout {
                    what: format!("Models gone ({models} Models, {pods} pods left)"),
                    seconds: self.opts.timeout.as_secs(),
                }));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The Deployment controller's phases.
    async fn deployments(&self) -> Result<Side> {
        let mut side = Side {
            controller: "Deployment controller (kube-controller-manager)".into(),
            ..Side::default()
        };
        let kcm = self.controller_manager_pid();
        let sampler = kcm.map(|p| RssSampler::start(Arc::new(AtomicU32::new(p))));
        let result = self
            .deployment_phases(kcm, sampler.as_ref(), &mut side)
            .await;
        if let Some(s) = sampler {
            s.stop().await;
        }
        if let Some(m) = kcm.and_then(|p| proc_mem(p).ok()) {
            side.hwm_mib = Some(m.hwm_kib as f64 / 1024.0);
        }
        result.map(|()| side)
    }

    async fn deployment_phases(
        &self,
        kcm: Option<u32>,
        sampler: Option<&RssSampler>,
        side: &mut Side,
    ) -> Result<()> {
        let all = self.largest_first();
        side.converge = self
            .deployment_phase(kcm, sampler, || async {
                let (first, last) = self.apply_all(Kind::Deployments, 0, &all).await?;
                Ok((first, last, BTreeSet::new()))
            })
            .await?;
        tracing::info!(
            seconds = %format!("{:.1}", side.converge.converge_seconds),
            "every Deployment available"
        );
        let churn = self.churn_set();
        side.churned_objects = churn.len();
        let nodes = self
            .nodes_to_delete(Kind::Deployments, self.opts.churn_nodes)
            .await?;
        side.deleted_nodes = nodes.clone();
        side.churn = self
            .deployment_phase(kcm, sampler, || async {
                let (first, _) = self.apply_all(Kind::Deployments, 1, &churn).await?;
                self.delete_nodes(&nodes).await?;
                Ok((first, Instant::now(), nodes.iter().cloned().collect()))
            })
            .await?;
        tracing::info!(
            seconds = %format!("{:.1}", side.churn.converge_seconds),
            "Deployment churn converged"
        );
        side.idle = self
            .deployment_phase(kcm, sampler, || async {
                let start = Instant::now();
                tokio::time::sleep(self.opts.deployment_idle).await;
                Ok((start, start, BTreeSet::new()))
            })
            .await?;
        side.idle.converge_seconds = 0.0;
        Ok(())
    }

    async fn deployment_phase<F, Fut>(
        &self,
        kcm: Option<u32>,
        sampler: Option<&RssSampler>,
        act: F,
    ) -> Result<Phase>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<(Instant, Instant, BTreeSet<String>)>>,
    {
        let a0 = self.apiserver_metrics().await?;
        let cpu0 = kcm.and_then(|p| cpu_seconds(p).ok());
        let cp0 = self.control_plane_cpu();
        let t0 = Timestamp::now();
        let w0 = Instant::now();
        if let Some(s) = sampler {
            s.take_peak();
        }
        let (first, last, gone) = act().await?;
        self.wait_ready(Kind::Deployments, true, &gone, None)
            .await?;
        let converged = Instant::now();
        let a1 = self.apiserver_metrics().await?;
        let cpu1 = kcm.and_then(|p| cpu_seconds(p).ok());
        let t1 = Timestamp::now();
        let writes = self.audit_writes(t0, t1, &DEPLOYMENT_USERS)?;
        Ok(Phase {
            objects: self.workloads.len(),
            apply_seconds: (last - first).as_secs_f64(),
            converge_seconds: (converged - last).as_secs_f64(),
            apiserver_requests: map_delta(&apiserver_requests(&a1), &apiserver_requests(&a0)),
            flow_control_rejected: flow_control_rejected(&a1) - flow_control_rejected(&a0),
            apiserver_request_seconds: mean_delta(
                &sum_and_count(&a1, "apiserver_request_duration_seconds"),
                &sum_and_count(&a0, "apiserver_request_duration_seconds"),
            ),
            controller_requests: writes.iter().map(|(k, v)| (k.clone(), *v as f64)).collect(),
            controller_request_seconds: BTreeMap::new(),
            controller_writes: writes,
            scheduler_writes: self.audit_writes(t0, t1, &[SCHEDULER_USER])?.values().sum(),
            reconciles: None,
            reconcile_buckets: Vec::new(),
            reconcile_p50: None,
            reconcile_p99: None,
            status_writes: BTreeMap::new(),
            rss_peak_mib: sampler.map(|s| s.take_peak() as f64 / 1024.0),
            operator_restarts: 0,
            rate_limit_wait_seconds: None,
            trailing_seconds: None,
            control_plane_cpu_seconds: self.control_plane_cpu().zip(cp0).map(|(b, a)| b - a),
            cpu_seconds: match (cpu0, cpu1) {
                (Some(a), Some(b)) => Some(b - a),
                _ => None,
            },
            wall_seconds: w0.elapsed().as_secs_f64(),
        })
    }

    /// Runs every phase.
    pub async fn run(&mut self, kubeai: String) -> Result<Report> {
        let date = Timestamp::now().to_string();
        let strata = self.strata().await?;
        let (deployments, deployments_error) = if self.opts.skip_deployments {
            (None, Some("skipped (--skip-deployments)".to_string()))
        } else {
            match self.deployments().await {
                Ok(d) => (Some(d), None),
                Err(e) => {
                    tracing::error!("the Deployment controller's phases: {e}");
                    (None, Some(format!("failed: {e}")))
                }
            }
        };
        let mut mix: BTreeMap<String, usize> = BTreeMap::new();
        for w in &self.workloads {
            *mix.entry(format!("{}×{}", w.gpus, w.replicas)).or_insert(0) += 1;
        }
        Ok(Report {
            date,
            machine: machine(),
            nodes: (self.h100, self.a100),
            models: self.workloads.len(),
            namespaces: self.opts.namespaces.min(self.workloads.len()),
            replicas: self.workloads.iter().map(|w| u64::from(w.replicas)).sum(),
            gpus: self
                .workloads
                .iter()
                .map(|w| u64::from(w.gpus * w.replicas))
                .sum(),
            seed: self.opts.seed,
            operator_args: self.opts.operator_args.clone(),
            mix,
            strata,
            deployments,
            deployments_error,
            kubeai,
        })
    }

    /// Stops the world.
    pub async fn shutdown(self) {
        self.cluster.shutdown(self.opts.keep).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mix_is_deterministic_and_fills_both_pools_to_ninety_percent() {
        let (h, a) = node_split(200);
        assert_eq!((h, a), (120, 80));
        let p = plan(h, a, 1000, 50, 7).expect("plan");
        assert_eq!(p, plan(h, a, 1000, 50, 7).expect("plan"));
        assert_eq!(p.len(), 1000);
        let gpus = |pool: Option<Pool>| -> u64 {
            p.iter()
                .filter(|w| pool.is_none_or(|x| x == w.pool))
                .map(|w| u64::from(w.gpus * w.replicas))
                .sum()
        };
        assert_eq!(gpus(None), 1440);
        let h_fill = gpus(Some(Pool::H100)) as f64 / 960.0;
        let a_fill = gpus(Some(Pool::A100)) as f64 / 640.0;
        assert!((0.85..=0.95).contains(&h_fill), "{h_fill}");
        assert!((0.85..=0.95).contains(&a_fill), "{a_fill}");
        let ones = p.iter().filter(|w| w.gpus == 1 && w.replicas == 1).count();
        assert!(ones > 500, "{ones}");
        assert!(p.iter().any(|w| w.gpus == 8));
        assert!(
            p.iter()
                .all(|w| [1, 2, 4, 8].contains(&w.gpus) && (1..=3).contains(&w.replicas))
        );
        let ns: BTreeSet<&str> = p.iter().map(|w| w.namespace.as_str()).collect();
        assert_eq!(ns.len(), 50);
        assert!(plan(10, 10, 200, 5, 1).is_err(), "200 Models need 200 GPUs");
        let m: Model = serde_json::from_value(model(&p[0], 1)).expect("a Model");
        assert_eq!(m.spec.replicas, Some(p[0].replicas as i32));
        let d: Deployment = serde_json::from_value(deployment(&p[0], 1)).expect("a Deployment");
        assert_eq!(d.spec.and_then(|s| s.replicas), Some(p[0].replicas as i32));
        let t: Topology = serde_yaml_ng::from_str(&topology_yaml(12, 8)).expect("topology");
        assert_eq!(t.nodes().len(), 20);
    }

    #[test]
    fn quantiles_as_prometheus_and_metrics_parsed() {
        let text = "# TYPE strata_reconcile_duration_seconds histogram\n\
strata_reconcile_duration_seconds_bucket{controller=\"model\",le=\"0.005\"} 50\n\
strata_reconcile_duration_seconds_bucket{controller=\"model\",le=\"0.01\"} 90\n\
strata_reconcile_duration_seconds_bucket{controller=\"model\",le=\"+Inf\"} 100\n\
strata_reconcile_duration_seconds_bucket{controller=\"gpupool\",le=\"0.005\"} 3\n\
strata_reconcile_duration_seconds_bucket{controller=\"gpupool\",le=\"+Inf\"} 3\n\
apiserver_request_total{code=\"200\",component=\"apiserver\",group=\"\",resource=\"pods\",scope=\"namespace\",subresource=\"\",verb=\"LIST\",version=\"v1\"} 4\n\
apiserver_request_total{code=\"201\",component=\"apiserver\",group=\"\",resource=\"pods\",scope=\"namespace\",subresource=\"binding\",verb=\"POST\",version=\"v1\"} 6\n\
apiserver_request_total{code=\"200\",component=\"apiserver\",group=\"\",resource=\"pods\",scope=\"cluster\",subresource=\"\",verb=\"LIST\",version=\"v1\"} 1\n\
strata_kube_requests_total{verb=\"GET\",resource=\"secrets\"} 3\n\
strata_kube_requests_total{verb=\"PATCH\",resource=\"models/status\"} 5\n\
strata_kube_requests_total{verb=\"PATCH\",resource=\"services\"} 1\n";
        let b = histogram_buckets(
            text,
            "strata_reconcile_duration_seconds",
            &["controller=\"model\""],
        );
        assert_eq!(b.len(), 3);
        let p50 = histogram_quantile(0.5, &b).expect("p50");
        assert!((p50 - 0.005).abs() < 1e-9, "{p50}");
        let p70 = histogram_quantile(0.7, &b).expect("p70");
        assert!((p70 - 0.0075).abs() < 1e-9, "{p70}");
        assert_eq!(histogram_quantile(0.99, &b), Some(0.01));
        assert_eq!(histogram_quantile(0.5, &[]), None);
        let a = apiserver_requests(text);
        assert_eq!(a.get("LIST pods"), Some(&5.0));
        assert_eq!(a.get("POST pods/binding"), Some(&6.0));
        let r = by_label(text, "strata_kube_requests_total", "verb");
        assert_eq!(r.values().sum::<f64>(), 9.0);
        assert_eq!(r.get("PATCH"), Some(&6.0));
        let r = by_verb_and_resource(text, "strata_kube_requests_total");
        assert_eq!(r.get("PATCH models/status"), Some(&5.0));
        assert_eq!(r.get("GET secrets"), Some(&3.0));
        let d0 = "apiserver_request_duration_seconds_sum{component=\"apiserver\",dry_run=\"\",group=\"\",resource=\"pods\",scope=\"resource\",subresource=\"\",verb=\"POST\",version=\"v1\"} 1.5\n\
apiserver_request_duration_seconds_count{component=\"apiserver\",dry_run=\"\",group=\"\",resource=\"pods\",scope=\"resource\",subresource=\"\",verb=\"POST\",version=\"v1\"} 10\n\
apiserver_request_duration_seconds_sum{component=\"apiserver\",dry_run=\"\",group=\"\",resource=\"pods\",scope=\"namespace\",subresource=\"\",verb=\"WATCH\",version=\"v1\"} 900\n\
apiserver_request_duration_seconds_count{component=\"apiserver\",dry_run=\"\",group=\"\",resource=\"pods\",scope=\"namespace\",subresource=\"\",verb=\"WATCH\",version=\"v1\"} 2\n\
strata_kube_request_duration_seconds_sum{verb=\"POST\",resource=\"pods\"} 2\n\
strata_kube_request_duration_seconds_count{verb=\"POST\",resource=\"pods\"} 4\n";
        let d1 = d0
            .replace("} 1.5\n", "} 5.5\n")
            .replace("\"v1\"} 10\n", "\"v1\"} 20\n");
        let server = sum_and_count(&d1, "apiserver_request_duration_seconds");
        assert_eq!(server.get("POST pods"), Some(&(5.5, 20.0)));
        assert!(!server.contains_key("WATCH pods"), "{server:?}");
        let mean = mean_delta(
            &server,
            &sum_and_count(d0, "apiserver_request_duration_seconds"),
        );
        assert_eq!(mean.get("POST pods"), Some(&0.4));
        let ours = sum_and_count(d0, "strata_kube_request_duration_seconds");
        assert_eq!(mean_delta(&ours, &ours), BTreeMap::new());
        assert_eq!(
            mean_delta(&ours, &BTreeMap::new()).get("POST pods"),
            Some(&0.5)
        );
        let stat =
            "1234 (strata op) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0 100 0 0";
        assert_eq!(parse_stat_cpu(stat, 100.0), Some(3.0));
    }
}
