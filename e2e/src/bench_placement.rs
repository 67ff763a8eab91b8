//! Placement quality after churn (issue [16] item 2, "P4"): one seeded
//! trace of Models of 1, 2, 4 and 8 GPUs arriving and leaving over a world
//! of 8-GPU nodes until it is about 85 % full, replayed event by event
//!
//! - through Strata's placement: `strata_core::placement::place`, fed as
//!   the Model controller feeds it (`view::node_views` over the Node
//!   objects and the live pods' `GpuClaim`s, `view::pool_view` of the
//!   `h100` sample GPUPool, a `Request` built as `placement_request` builds
//!   it for a Model of one replica), with no API server: the pure function;
//! - through the real kube-scheduler of the local world (its default
//!   profile), and through a second kube-scheduler the benchmark starts with
//!   a `KubeSchedulerConfiguration` whose `NodeResourcesFit` scores
//!   `MostAllocated` on `nvidia.com/gpu` (what a team would configure to
//!   bin-pack): one pod per arrival, requesting only `nvidia.com/gpu` and
//!   tolerating the GPU taint, no node affinity; each arrival waits until
//!   the pod is bound or marked unschedulable, each departure deletes its
//!   pod (grace period 0) before the next event.
//!
//! A request that cannot be placed is withdrawn on every side (the pod
//! deleted), so that all sides see the same trace; its departure is then a
//! no-op. Measured per side: **stranded** requests (rejected although the
//! GPUs in use plus the request could be repacked onto the nodes: see
//! [`repack_fits`]), **fragmented nodes** (0 < GPUs in use < 8) at the end
//! and after every event, and the time of each placement decision.
//!
//! The trace, the replay's bookkeeping and the counting are pure and unit
//! tested; nothing here asserts a time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, NodeCondition, Pod, ServiceAccount};
use kube::api::{DeleteParams, PostParams, WatchEvent, WatchParams};
use kube::{Api, Client};
use serde::Serialize;
use serde_json::json;
use strata_core::placement::{self, Preference, Request};
use strata_core::podgpus::GpuClaim;
use strata_core::view;
use strata_crds::GPUPool;
use tokio::process::{Child, Command};

use crate::bench_memory::{BenchError, Result, kube_err, machine, mix};
use crate::cluster::{Cluster, client_from};
use crate::topology::{GPU_RESOURCE, GPU_TAINT_KEY, Topology};
use crate::wait::poll_until;

/// GPUs per node in the benchmark's world.
pub const GPUS_PER_NODE: i64 = 8;
/// GPUs per Model replica the trace draws from, with their weights (by
/// count of arrivals): 40 % 1 GPU, 30 % 2, 20 % 4, 10 % 8.
pub const SIZES: [(i64, u64); 4] = [(1, 40), (2, 30), (4, 20), (8, 10)];
/// The namespace of the kube-scheduler columns' pods.
pub const NAMESPACE: &str = "bench-placement";
/// The profile name of the second (MostAllocated) kube-scheduler.
pub const MOST_ALLOCATED_SCHEDULER: &str = "most-allocated";
/// The GPUPool sample whose view Strata's side places with.
const POOL_SAMPLE: &str = "samples/gpupool-h100.yaml";

/// One event of the trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Event {
    /// A Model of one replica of `gpus` GPUs arrives.
    Arrive {
        /// Its number in the trace.
        id: usize,
        /// GPUs of its replica.
        gpus: i64,
    },
    /// Model `id` is deleted.
    Leave {
        /// Its number in the trace.
        id: usize,
    },
}

/// What trace to generate.
#[derive(Debug, Clone, Copy)]
pub struct TraceOptions {
    /// 8-GPU nodes.
    pub nodes: usize,
    /// The share of the GPUs the trace asks for once filled (0.85).
    pub fill: f64,
    /// While filling, the chance that an event is a departure.
    pub fill_leave_share: f64,
    /// Events after the fill, around the target.
    pub churn_events: usize,
    /// Seed.
    pub seed: u64,
}

impl Default for TraceOptions {
    fn default() -> Self {
        Self {
            nodes: 100,
            fill: 0.85,
            fill_leave_share: 0.25,
            churn_events: 600,
            seed: 16,
        }
    }
}

/// A seeded pseudo-random stream (SplitMix64).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(1);
        mix(self.0) % n.max(1)
    }

    fn unit(&mut self) -> f64 {
        self.below(1 << 53) as f64 / (1u64 << 53) as f64
    }

    fn size(&mut self) -> i64 {
        let total: u64 = SIZES.iter().map(|(_, w)| w).sum();
        let mut r = self.below(total);
        for (gpus, w) in SIZES {
            if r < w {
                return gpus;
            }
            r -= w;
        }
        SIZES[0].0
    }
}

/// A generated trace and where its fill phase ends.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Trace {
    /// The events, in order.
    pub events: Vec<Event>,
    /// Index of the first churn event (the fill phase is before it).
    pub churn_from: usize,
    /// GPUs the trace asks for at its end (if every request were placed).
    pub demand_end: i64,
    /// The target: `fill` of the GPUs.
    pub target: i64,
}

/// The trace: arrivals (sizes drawn from [`SIZES`]) mixed with departures
/// (a uniformly chosen live Model, `fill_leave_share` of the events) until
/// the GPUs asked for reach `fill` of the capacity; then `churn_events`
/// events that hold it there: an arrival with probability
/// `0.5 + (target - demand) / (10 % of the GPUs)`, clamped to 0.1..0.9, a
/// departure otherwise. Demand counts every arrival as placed.
pub fn trace(opts: &TraceOptions) -> Trace {
    let capacity = opts.nodes as i64 * GPUS_PER_NODE;
    let target = (capacity as f64 * opts.fill).round() as i64;
    // Decorrelated: seeds s and s + 1 must not give shifted streams.
    let mut rng = Rng(mix(opts.seed ^ 0x5eed_0016));
    let mut live: Vec<(usize, i64)> = Vec::new();
    let mut demand = 0i64;
    let mut next = 0usize;
    let mut events = Vec::new();
    let mut step = |arrive: bool, rng: &mut Rng, events: &mut Vec<Event>| {
        if arrive || live.is_empty() {
            let gpus = rng.size();
            events.push(Event::Arrive { id: next, gpus });
            live.push((next, gpus));
            demand += gpus;
            next += 1;
        } else {
            let (id, gpus) = live.swap_remove(rng.below(live.len() as u64) as usize);
            events.push(Event::Leave { id });
            demand -= gpus;
        }
        demand
    };
    let mut d = 0;
    while d < target {
        let arrive = rng.unit() >= opts.fill_leave_share;
        d = step(arrive, &mut rng, &mut events);
    }
    let churn_from = events.len();
    let band = (capacity as f64 * 0.1).max(1.0);
    for _ in 0..opts.churn_events {
        let p = (0.5 + (target - d) as f64 / band).clamp(0.1, 0.9);
        let arrive = rng.unit() < p;
        d = step(arrive, &mut rng, &mut events);
    }
    Trace {
        events,
        churn_from,
        demand_end: d,
        target,
    }
}

/// Whether items of `sizes` GPUs fit on `nodes` nodes of `per_node` GPUs
/// if every one of them could be placed anew: first-fit decreasing. For
/// sizes that each divide the next larger one and the node (1, 2, 4, 8 on
/// 8 GPUs) first-fit decreasing is exact (it leaves no gap before the last
/// node it opens), so this is true exactly when the sum fits.
pub fn repack_fits(sizes: &[i64], nodes: usize, per_node: i64) -> bool {
    let mut sorted = sizes.to_vec();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    let mut free = vec![per_node; nodes];
    for s in sorted {
        match free.iter_mut().find(|f| **f >= s) {
            Some(f) => *f -= s,
            None => return false,
        }
    }
    true
}

/// Where each placed Model runs and what each node holds, for one side.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    /// GPUs in use per node, every node of the world (names in order).
    pub used: BTreeMap<String, i64>,
    /// Placed Models: id -> (node, GPUs).
    pub placed: BTreeMap<usize, (String, i64)>,
}

impl Ledger {
    /// An empty world of `names`.
    pub fn new(names: &[String]) -> Self {
        Self {
            used: names.iter().map(|n| (n.clone(), 0)).collect(),
            placed: BTreeMap::new(),
        }
    }

    /// Nodes with some but not all GPUs in use.
    pub fn fragmented(&self) -> usize {
        self.used
            .values()
            .filter(|u| **u > 0 && **u < GPUS_PER_NODE)
            .count()
    }

    /// Nodes with no GPU in use.
    pub fn empty(&self) -> usize {
        self.used.values().filter(|u| **u == 0).count()
    }

    /// GPUs in use.
    pub fn in_use(&self) -> i64 {
        self.used.values().sum()
    }

    /// Whether some node has `gpus` free now.
    pub fn fits_somewhere(&self, gpus: i64) -> bool {
        self.used.values().any(|u| GPUS_PER_NODE - u >= gpus)
    }

    /// Whether the placed Models plus one of `gpus` could be repacked.
    pub fn repack_fits_with(&self, gpus: i64) -> bool {
        let mut sizes: Vec<i64> = self.placed.values().map(|(_, g)| *g).collect();
        sizes.push(gpus);
        repack_fits(&sizes, self.used.len(), GPUS_PER_NODE)
    }

    fn place(&mut self, id: usize, node: &str, gpus: i64) {
        *self.used.entry(node.to_string()).or_default() += gpus;
        self.placed.insert(id, (node.to_string(), gpus));
    }

    fn remove(&mut self, id: usize) -> Option<(String, i64)> {
        let (node, gpus) = self.placed.remove(&id)?;
        if let Some(u) = self.used.get_mut(&node) {
            *u -= gpus;
        }
        Some((node, gpus))
    }
}

/// What one side did with the trace.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SideResult {
    /// Name of the column.
    pub name: String,
    /// Arrivals.
    pub arrivals: usize,
    /// Arrivals placed.
    pub placed: usize,
    /// Arrivals rejected.
    pub rejected: usize,
    /// Rejected although a repacking of the placed Models and the request
    /// existed.
    pub stranded: usize,
    /// Stranded, by GPUs of the request.
    pub stranded_by_size: BTreeMap<i64, usize>,
    /// Rejected although some node had the GPUs free at the time (a
    /// placement miss; 0 for a correct placer).
    pub missed: usize,
    /// Rejected with too few GPUs free in the whole world (no packing).
    pub full: usize,
    /// Bound only after the scheduler first said Unschedulable (its cache
    /// had not yet seen a departure), counted as placed.
    pub late: usize,
    /// Fragmented nodes at the end.
    pub fragmented_end: usize,
    /// Mean of the fragmented nodes after each event of the churn phase.
    pub fragmented_churn_mean: f64,
    /// Most fragmented nodes after any event.
    pub fragmented_max: usize,
    /// Empty nodes at the end.
    pub empty_end: usize,
    /// GPUs in use at the end.
    pub gpus_end: i64,
    /// Mean GPUs in use after each event of the churn phase.
    pub gpus_churn_mean: f64,
    /// Decision times, µs: p50, p99, max.
    pub decision_us: [f64; 3],
    /// Strata only: building the node views as the controller does, then
    /// deciding, µs: p50, p99, max.
    pub view_and_decision_us: Option<[f64; 3]>,
    /// Fragmented nodes after every event (for plotting).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fragmented_series: Vec<usize>,
}

/// Percentiles p50, p99 and the maximum of `xs` (nearest rank).
pub fn percentiles(xs: &[f64]) -> [f64; 3] {
    if xs.is_empty() {
        return [0.0; 3];
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    [rank(0.5), rank(0.99), v[v.len() - 1]]
}

/// What a placer answered for one arrival.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Placed on this node (`late`: bound after an Unschedulable).
    Placed {
        /// The node.
        node: String,
        /// Bound only after a first Unschedulable.
        late: bool,
    },
    /// Not placed.
    Rejected,
}

/// Counts one side's replay: feed it each event's outcome in order.
#[derive(Debug)]
pub struct Tally {
    result: SideResult,
    ledger: Ledger,
    churn_from: usize,
    index: usize,
    times: Vec<f64>,
    gpus_churn: Vec<f64>,
    frag_churn: Vec<f64>,
}

impl Tally {
    /// A tally over the world `names` for a trace whose churn starts at
    /// event `churn_from`.
    pub fn new(name: &str, names: &[String], churn_from: usize) -> Self {
        Self {
            result: SideResult {
                name: name.to_string(),
                ..SideResult::default()
            },
            ledger: Ledger::new(names),
            churn_from,
            index: 0,
            times: Vec::new(),
            gpus_churn: Vec::new(),
            frag_churn: Vec::new(),
        }
    }

    /// The side's ledger (what is placed where).
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// An arrival's decision and how long it took.
    pub fn arrival(&mut self, id: usize, gpus: i64, decision: Decision, took: Duration) {
        self.result.arrivals += 1;
        self.times.push(took.as_secs_f64() * 1e6);
        match decision {
            Decision::Placed { node, late } => {
                self.result.placed += 1;
                if late {
                    self.result.late += 1;
                }
                self.ledger.place(id, &node, gpus);
            }
            Decision::Rejected => {
                self.result.rejected += 1;
                if self.ledger.fits_somewhere(gpus) {
                    self.result.missed += 1;
                } else if self.ledger.repack_fits_with(gpus) {
                    self.result.stranded += 1;
                    *self.result.stranded_by_size.entry(gpus).or_default() += 1;
                } else {
                    self.result.full += 1;
                }
            }
        }
        self.sample();
    }

    /// A departure; returns the node and GPUs it held, if it was placed.
    pub fn departure(&mut self, id: usize) -> Option<(String, i64)> {
        let held = self.ledger.remove(id);
        self.sample();
        held
    }

    fn sample(&mut self) {
        let f = self.ledger.fragmented();
        self.result.fragmented_series.push(f);
        self.result.fragmented_max = self.result.fragmented_max.max(f);
        if self.index >= self.churn_from {
            self.frag_churn.push(f as f64);
            self.gpus_churn.push(self.ledger.in_use() as f64);
        }
        self.index += 1;
    }

    /// The result.
    pub fn finish(mut self, view_and_decision_us: Option<Vec<f64>>) -> SideResult {
        let mean = |v: &[f64]| {
            if v.is_empty() {
                0.0
            } else {
                v.iter().sum::<f64>() / v.len() as f64
            }
        };
        self.result.fragmented_end = self.ledger.fragmented();
        self.result.empty_end = self.ledger.empty();
        self.result.gpus_end = self.ledger.in_use();
        self.result.fragmented_churn_mean = mean(&self.frag_churn);
        self.result.gpus_churn_mean = mean(&self.gpus_churn);
        self.result.decision_us = percentiles(&self.times);
        self.result.view_and_decision_us = view_and_decision_us.map(|v| percentiles(&v));
        self.result
    }
}

/// The Node objects of `topology` as the operator's cache holds them once
/// KWOK has made them Ready.
pub fn ready_nodes(topology: &Topology) -> Vec<Node> {
    topology
        .nodes()
        .into_iter()
        .map(|mut n| {
            let status = n.status.get_or_insert_with(Default::default);
            status.conditions = Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..NodeCondition::default()
            }]);
            n
        })
        .collect()
}

/// The GPUPool Strata's side places in (the `h100` sample: BinPack).
pub fn sample_pool() -> Result<GPUPool> {
    let value = crate::harness::repo_yaml(POOL_SAMPLE)?;
    serde_json::from_value(value).map_err(|e| BenchError::Parse {
        what: POOL_SAMPLE.into(),
        reason: e.to_string(),
    })
}

/// Replays the trace through `strata_core::placement::place`, fed as the
/// Model controller feeds it for a Model of one replica in `pool`.
pub fn replay_strata(trace: &Trace, nodes: &[Node], pool: &GPUPool) -> SideResult {
    let names: Vec<String> = nodes
        .iter()
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    let pool_views = vec![view::pool_view(pool)];
    let pool_name = pool_views[0].name.clone();
    let resource = pool.spec.gpu_resource_name.clone();
    let mut tally = Tally::new(
        "Strata (placement::place, BinPack)",
        &names,
        trace.churn_from,
    );
    let mut with_views = Vec::new();
    for event in &trace.events {
        match *event {
            Event::Arrive { id, gpus } => {
                let started = Instant::now();
                let claims: Vec<GpuClaim> = tally
                    .ledger()
                    .placed
                    .values()
                    .map(|(node, g)| GpuClaim {
                        node: Some(node.clone()),
                        gpus: BTreeMap::from([(resource.clone(), *g)]),
                        holds: true,
                    })
                    .collect();
                let node_views = view::node_views(nodes, claims);
                let request = Request {
                    preferences: vec![Preference {
                        pool: pool_name.clone(),
                        gpus,
                        max_replicas: None,
                        existing: 0,
                    }],
                    replicas: 1,
                    existing_per_node: BTreeMap::new(),
                    avoid_nodes: Vec::new(),
                };
                let decided = Instant::now();
                let outcome = placement::place(&node_views, &pool_views, &request);
                let took = decided.elapsed();
                with_views.push(started.elapsed().as_secs_f64() * 1e6);
                let decision = match outcome.assignments.first() {
                    Some(a) => Decision::Placed {
                        node: a.node.clone(),
                        late: false,
                    },
                    None => Decision::Rejected,
                };
                tally.arrival(id, gpus, decision, took);
            }
            Event::Leave { id } => {
                tally.departure(id);
            }
        }
    }
    tally.finish(Some(with_views))
}

/// The pod of arrival `id` for the kube-scheduler columns: only
/// `nvidia.com/gpu`, the GPU taint tolerated, no affinity.
pub fn arrival_pod(id: usize, gpus: i64, scheduler: Option<&str>) -> Result<Pod> {
    let mut spec = json!({
        "containers": [{
            "name": "model",
            "image": "registry.k8s.io/pause:3.10",
            "resources": {"limits": {GPU_RESOURCE: gpus.to_string()}},
        }],
        "tolerations": [{"key": GPU_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}],
        "terminationGracePeriodSeconds": 0,
        "automountServiceAccountToken": false,
    });
    if let Some(s) = scheduler {
        spec["schedulerName"] = json!(s);
    }
    serde_json::from_value(json!({
        "metadata": {"name": pod_name(id), "labels": {"bench.strata.ai/placement": "true"}},
        "spec": spec,
    }))
    .map_err(|e| BenchError::Parse {
        what: "an arrival's pod".into(),
        reason: e.to_string(),
    })
}

fn pod_name(id: usize) -> String {
    format!("model-{id:05}")
}

/// Bound to a node, or marked unschedulable by the scheduler.
fn scheduling_state(pod: &Pod) -> Option<std::result::Result<String, ()>> {
    if let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) {
        return Some(Ok(node));
    }
    let unschedulable = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c.type_ == "PodScheduled" && c.status == "False")
        });
    unschedulable.then_some(Err(()))
}

/// Watches pod `name` from `rv` until it is bound (Some(node)) or marked
/// unschedulable (None), or `timeout` passes.
async fn await_scheduling(
    api: &Api<Pod>,
    name: &str,
    rv: &str,
    timeout: Duration,
    skip_unschedulable: bool,
) -> Result<Option<String>> {
    let deadline = Instant::now() + timeout;
    let mut rv = rv.to_string();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(BenchError::World(crate::Error::Timeout {
                what: format!("pod {name} bound or unschedulable"),
                seconds: timeout.as_secs(),
            }));
        }
        let wp = WatchParams::default()
            .fields(&format!("metadata.name={name}"))
            .timeout(left.as_secs().clamp(1, 290) as u32);
        let mut stream = api
            .watch(&wp, &rv)
            .await
            .map_err(kube_err(format!("watching pod {name}")))?
            .boxed();
        loop {
            let next = tokio::time::timeout(left, stream.try_next()).await;
            let event = match next {
                Ok(Ok(Some(e))) => e,
                // The watch ended (its timeout) or timed out here: look again.
                Ok(Ok(None)) | Err(_) => break,
                Ok(Err(e)) => return Err(kube_err(format!("watching pod {name}"))(e)),
            };
            match event {
                WatchEvent::Added(p) | WatchEvent::Modified(p) => {
                    if let Some(v) = p.metadata.resource_version.clone() {
                        rv = v;
                    }
                    match scheduling_state(&p) {
                        Some(Ok(node)) => return Ok(Some(node)),
                        Some(Err(())) if !skip_unschedulable => return Ok(None),
                        _ => {}
                    }
                }
                WatchEvent::Deleted(_) => {
                    return Err(BenchError::Process {
                        what: format!("pod {name}"),
                        reason: "deleted while waiting for its scheduling".into(),
                    });
                }
                WatchEvent::Bookmark(_) => {}
                WatchEvent::Error(e) if e.code == 410 => {
                    // Too old: start again from the pod as it is now.
                    let p = api
                        .get(name)
                        .await
                        .map_err(kube_err(format!("getting pod {name}")))?;
                    match scheduling_state(&p) {
                        Some(Ok(node)) => return Ok(Some(node)),
                        Some(Err(())) if !skip_unschedulable => return Ok(None),
                        _ => {}
                    }
                    rv = p.metadata.resource_version.unwrap_or_default();
                    break;
                }
                WatchEvent::Error(e) => {
                    return Err(BenchError::Process {
                        what: format!("watching pod {name}"),
                        reason: e.message,
                    });
                }
            }
        }
    }
}

/// Deletes pod `name` at once (grace period 0) and waits until it is gone.
async fn delete_now(api: &Api<Pod>, name: &str, timeout: Duration) -> Result<()> {
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    match api.delete(name, &dp).await {
        Ok(either) if either.is_right() => return Ok(()),
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => return Ok(()),
        Err(e) => return Err(kube_err(format!("deleting pod {name}"))(e)),
    }
    poll_until(
        &format!("pod {name} gone"),
        timeout,
        Duration::from_millis(10),
        || async move { Ok(api.get_opt(name).await.ok().flatten().is_none()) },
    )
    .await?;
    Ok(())
}

/// Replays the trace through a kube-scheduler: `scheduler` None is the
/// world's default one. Each decision's time is from just before the pod's
/// create call until the watch delivers its binding (or its Unschedulable
/// condition): API round trips, the scheduler's queue and its informer lag
/// included.
pub async fn replay_kube(
    client: &Client,
    name: &str,
    trace: &Trace,
    names: &[String],
    scheduler: Option<&str>,
    timeout: Duration,
) -> Result<SideResult> {
    let api: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let mut tally = Tally::new(name, names, trace.churn_from);
    let total = trace.events.len();
    for (i, event) in trace.events.iter().enumerate() {
        match *event {
            Event::Arrive { id, gpus } => {
                let pod = arrival_pod(id, gpus, scheduler)?;
                let started = Instant::now();
                let created = api
                    .create(&PostParams::default(), &pod)
                    .await
                    .map_err(kube_err(format!("creating pod {}", pod_name(id))))?;
                let rv = created.metadata.resource_version.unwrap_or_default();
                let pod_name = pod_name(id);
                let first = await_scheduling(&api, &pod_name, &rv, timeout, false).await?;
                let took = started.elapsed();
                let decision = match first {
                    Some(node) => Decision::Placed { node, late: false },
                    // The scheduler said Unschedulable although a node had
                    // room by our count: its cache had not seen a departure
                    // yet; it retries when it does.
                    None if tally.ledger().fits_somewhere(gpus) => {
                        match await_scheduling(&api, &pod_name, &rv, Duration::from_secs(30), true)
                            .await
                        {
                            Ok(Some(node)) => Decision::Placed { node, late: true },
                            _ => Decision::Rejected,
                        }
                    }
                    None => Decision::Rejected,
                };
                if decision == Decision::Rejected {
                    delete_now(&api, &pod_name, timeout).await?;
                }
                tally.arrival(id, gpus, decision, took);
            }
            Event::Leave { id } => {
                if tally.departure(id).is_some() {
                    delete_now(&api, &pod_name(id), timeout).await?;
                }
            }
        }
        if (i + 1) % 100 == 0 {
            tracing::info!(side = name, "{}/{} events", i + 1, total);
        }
    }
    // Leave the namespace empty for the next column.
    let left: Vec<usize> = tally.ledger().placed.keys().copied().collect();
    for id in left {
        delete_now(&api, &pod_name(id), timeout).await?;
    }
    Ok(tally.finish(None))
}

/// The KubeSchedulerConfiguration of the second scheduler: one profile,
/// `NodeResourcesFit` scoring MostAllocated on `nvidia.com/gpu`.
pub fn most_allocated_config(kubeconfig: &Path) -> String {
    format!(
        "apiVersion: kubescheduler.config.k8s.io/v1\n\
         kind: KubeSchedulerConfiguration\n\
         clientConnection:\n  kubeconfig: {}\n\
         leaderElection:\n  leaderElect: false\n\
         profiles:\n\
         \x20 - schedulerName: {MOST_ALLOCATED_SCHEDULER}\n\
         \x20   pluginConfig:\n\
         \x20     - name: NodeResourcesFit\n\
         \x20       args:\n\
         \x20         scoringStrategy:\n\
         \x20           type: MostAllocated\n\
         \x20           resources:\n\
         \x20             - name: {GPU_RESOURCE}\n\
         \x20               weight: 1\n",
        kubeconfig.display()
    )
}

/// How to run the benchmark.
#[derive(Debug, Clone)]
pub struct Options {
    /// The trace.
    pub trace: TraceOptions,
    /// Only Strata's side (no world).
    pub strata_only: bool,
    /// Skip the MostAllocated scheduler column.
    pub skip_most_allocated: bool,
    /// Working directory of the world (default: a temporary one).
    pub dir: Option<PathBuf>,
    /// Keep the world's directory.
    pub keep: bool,
    /// Seconds each wait may take.
    pub timeout: Duration,
}

/// The report.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// When.
    pub date: String,
    /// Where.
    pub machine: String,
    /// Nodes.
    pub nodes: usize,
    /// Seed.
    pub seed: u64,
    /// Events, arrivals and departures of the trace.
    pub events: usize,
    /// Arrivals.
    pub arrivals: usize,
    /// First event of the churn phase.
    pub churn_from: usize,
    /// GPUs the trace asks for at its end.
    pub demand_end: i64,
    /// Arrivals by GPUs.
    pub arrivals_by_size: BTreeMap<i64, usize>,
    /// One result per column.
    pub sides: Vec<SideResult>,
    /// Columns not run, and why.
    pub notes: Vec<String>,
}

fn us(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.0} ms", v / 1000.0)
    } else if v >= 1000.0 {
        format!("{:.1} ms", v / 1000.0)
    } else {
        format!("{v:.0} µs")
    }
}

impl Report {
    /// The Markdown of docs/benchmarks.md.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let sizes: Vec<String> = self
            .arrivals_by_size
            .iter()
            .map(|(g, n)| format!("{g} GPU: {n}"))
            .collect();
        out.push_str(&format!(
            "{} nodes × 8 GPUs; seed {}; {} events ({} arrivals: {}), churn from event {}; the trace asks for {} GPUs at its end; {}; {}.\n\n",
            self.nodes,
            self.seed,
            self.events,
            self.arrivals,
            sizes.join(", "),
            self.churn_from,
            self.demand_end,
            self.machine,
            self.date
        ));
        out.push_str("| | ");
        out.push_str(
            &self
                .sides
                .iter()
                .map(|s| s.name.clone())
                .collect::<Vec<_>>()
                .join(" | "),
        );
        out.push_str(" |\n|---|");
        out.push_str(&"---|".repeat(self.sides.len()));
        out.push('\n');
        let row = |label: &str, f: &dyn Fn(&SideResult) -> String| {
            let cells: Vec<String> = self.sides.iter().map(f).collect();
            format!("| {label} | {} |\n", cells.join(" | "))
        };
        let by_size = |m: &BTreeMap<i64, usize>| {
            if m.is_empty() {
                String::new()
            } else {
                let parts: Vec<String> = m.iter().map(|(g, n)| format!("{n}×{g}")).collect();
                format!(" ({})", parts.join(", "))
            }
        };
        out.push_str(&row("arrivals placed / rejected", &|s| {
            format!("{} / {}", s.placed, s.rejected)
        }));
        out.push_str(&row(
            "**stranded** (rejected; a repacking existed), by GPUs",
            &|s| format!("**{}**{}", s.stranded, by_size(&s.stranded_by_size)),
        ));
        out.push_str(&row(
            "rejected, fewer GPUs free than asked (no packing)",
            &|s| s.full.to_string(),
        ));
        out.push_str(&row("rejected although a node had room (misses)", &|s| {
            s.missed.to_string()
        }));
        out.push_str(&row(
            "**fragmented nodes** (0 < used < 8) at the end",
            &|s| format!("**{}**", s.fragmented_end),
        ));
        out.push_str(&row(
            "fragmented nodes, churn mean / max over the trace",
            &|s| format!("{:.1} / {}", s.fragmented_churn_mean, s.fragmented_max),
        ));
        out.push_str(&row("empty nodes at the end", &|s| s.empty_end.to_string()));
        out.push_str(&row("GPUs in use at the end / churn mean", &|s| {
            format!("{} / {:.0}", s.gpus_end, s.gpus_churn_mean)
        }));
        out.push_str(&row("decision time p50 / p99 / max", &|s| {
            let [a, b, c] = s.decision_us;
            format!("{} / {} / {}", us(a), us(b), us(c))
        }));
        out.push_str(&row(
            "with the node views built as the controller does, p50 / p99",
            &|s| match s.view_and_decision_us {
                Some([a, b, _]) => format!("{} / {}", us(a), us(b)),
                None => "-".into(),
            },
        ));
        out.push_str(&row(
            "bound after a first Unschedulable (stale cache)",
            &|s| {
                if s.view_and_decision_us.is_some() {
                    "-".into()
                } else {
                    s.late.to_string()
                }
            },
        ));
        for n in &self.notes {
            out.push_str(&format!("\n{n}\n"));
        }
        out
    }
}

/// The benchmark's world: 100 8-GPU nodes, no operator.
fn topology_yaml(nodes: usize) -> String {
    format!(
        "# strata-bench-placement: {nodes} 8 x H100 nodes.\n\
         nodeGroups:\n  - name: h100\n    count: {nodes}\n    cpu: \"192\"\n    memory: 2Ti\n    gpu:\n      product: {}\n      family: hopper\n      count: 8\n      memoryMiB: 81559\n",
        crate::bench_scale::H100
    )
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> BenchError + '_ {
    move |e| BenchError::Process {
        what: what.to_string(),
        reason: e.to_string(),
    }
}

/// Runs every column and returns the report.
pub async fn run(opts: &Options) -> Result<Report> {
    if opts.trace.nodes == 0 || opts.trace.nodes > 250 {
        return Err(BenchError::Options("nodes must be 1..=250".into()));
    }
    if !(0.0..1.0).contains(&opts.trace.fill) || !(0.0..0.9).contains(&opts.trace.fill_leave_share)
    {
        return Err(BenchError::Options(
            "fill must be in 0..1 and the fill's departure share in 0..0.9".into(),
        ));
    }
    let trace = trace(&opts.trace);
    let tmp = tempfile::tempdir().map_err(io("a temporary directory"))?;
    let topology_path = tmp.path().join("bench-placement.yaml");
    std::fs::write(&topology_path, topology_yaml(opts.trace.nodes))
        .map_err(io("writing the topology"))?;
    let topology = Topology::load(&topology_path)?;
    let nodes = ready_nodes(&topology);
    let names: Vec<String> = nodes
        .iter()
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    let pool = sample_pool()?;
    let mut arrivals_by_size: BTreeMap<i64, usize> = BTreeMap::new();
    for e in &trace.events {
        if let Event::Arrive { gpus, .. } = e {
            *arrivals_by_size.entry(*gpus).or_default() += 1;
        }
    }
    let mut report = Report {
        date: k8s_openapi::jiff::Timestamp::now().to_string(),
        machine: machine(),
        nodes: opts.trace.nodes,
        seed: opts.trace.seed,
        events: trace.events.len(),
        arrivals: arrivals_by_size.values().sum(),
        churn_from: trace.churn_from,
        demand_end: trace.demand_end,
        arrivals_by_size,
        sides: vec![replay_strata(&trace, &nodes, &pool)],
        notes: Vec::new(),
    };
    if opts.strata_only {
        report
            .notes
            .push("kube-scheduler: not run (--strata-only).".into());
        return Ok(report);
    }
    let bin_dir = crate::bench_memory::upstream_binaries().await?;
    let cluster = Cluster::start(crate::cluster::Options {
        dir: opts.dir.clone(),
        topology: topology_path.clone(),
        bin_dir: bin_dir.clone(),
        timeout: opts.timeout,
    })
    .await?;
    let result = run_kube(opts, &cluster, &trace, &names, &bin_dir, &mut report).await;
    cluster.shutdown(opts.keep).await;
    result?;
    Ok(report)
}

async fn run_kube(
    opts: &Options,
    cluster: &Cluster,
    trace: &Trace,
    names: &[String],
    bin_dir: &Path,
    report: &mut Report,
) -> Result<()> {
    let client = client_from(&cluster.info.kubeconfig).await?;
    let ns: Namespace =
        serde_json::from_value(json!({"metadata": {"name": NAMESPACE}})).map_err(|e| {
            BenchError::Parse {
                what: "the namespace".into(),
                reason: e.to_string(),
            }
        })?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .map_err(kube_err("creating the namespace"))?;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), NAMESPACE);
    poll_until(
        "the namespace's default ServiceAccount",
        opts.timeout,
        Duration::from_millis(200),
        || {
            let sas = sas.clone();
            async move { Ok(sas.get_opt("default").await.ok().flatten().is_some()) }
        },
    )
    .await?;
    warm_up(&client, None, opts.timeout).await?;
    tracing::info!("kube-scheduler (default profile): replaying the trace");
    report.sides.push(
        replay_kube(
            &client,
            "kube-scheduler (default scoring)",
            trace,
            names,
            None,
            opts.timeout,
        )
        .await?,
    );
    if opts.skip_most_allocated {
        report
            .notes
            .push("kube-scheduler MostAllocated: not run (--skip-most-allocated).".into());
        return Ok(());
    }
    let mut second = start_most_allocated(cluster, bin_dir)?;
    let side = async {
        warm_up(&client, Some(MOST_ALLOCATED_SCHEDULER), opts.timeout).await?;
        tracing::info!("kube-scheduler (MostAllocated on nvidia.com/gpu): replaying the trace");
        replay_kube(
            &client,
            "kube-scheduler (MostAllocated on nvidia.com/gpu)",
            trace,
            names,
            Some(MOST_ALLOCATED_SCHEDULER),
            opts.timeout,
        )
        .await
    }
    .await;
    let _ = second.kill().await;
    report.sides.push(side?);
    Ok(())
}

fn free_port() -> Result<u16> {
    crate::ports::free_port().map_err(io("a free port on 127.0.0.1"))
}

/// Starts the second kube-scheduler (profile [`MOST_ALLOCATED_SCHEDULER`])
/// with the world's scheduler credentials; its log beside the others.
fn start_most_allocated(cluster: &Cluster, bin_dir: &Path) -> Result<Child> {
    let dir = &cluster.info.dir;
    let kubeconfig = dir.join("scheduler.kubeconfig");
    let config = dir.join("most-allocated-scheduler.yaml");
    std::fs::write(&config, most_allocated_config(&kubeconfig))
        .map_err(io("writing the scheduler configuration"))?;
    let log_path = cluster
        .info
        .log_dir
        .join("kube-scheduler-most-allocated.log");
    let log = std::fs::File::create(&log_path).map_err(io("creating the scheduler's log"))?;
    let err = log.try_clone().map_err(io("the scheduler's log"))?;
    Command::new(bin_dir.join("kube-scheduler"))
        .arg(format!("--config={}", config.display()))
        .arg(format!(
            "--authentication-kubeconfig={}",
            kubeconfig.display()
        ))
        .arg(format!(
            "--authorization-kubeconfig={}",
            kubeconfig.display()
        ))
        .arg("--bind-address=127.0.0.1")
        .arg(format!("--secure-port={}", free_port()?))
        .arg("--v=1")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .map_err(io("starting the MostAllocated kube-scheduler"))
}

/// One pod through `scheduler` before its column: it is up and its caches
/// are synced.
async fn warm_up(client: &Client, scheduler: Option<&str>, timeout: Duration) -> Result<()> {
    let api: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let mut pod = arrival_pod(usize::MAX, 1, scheduler)?;
    pod.metadata.name = Some("warm-up".into());
    let created = api
        .create(&PostParams::default(), &pod)
        .await
        .map_err(kube_err("creating the warm-up pod"))?;
    let rv = created.metadata.resource_version.unwrap_or_default();
    let bound = await_scheduling(&api, "warm-up", &rv, timeout, true).await?;
    tracing::info!(node = ?bound, scheduler = scheduler.unwrap_or("default-scheduler"), "warm-up pod bound");
    delete_now(&api, "warm-up", timeout).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("n{i}")).collect()
    }

    #[test]
    fn the_trace_is_seeded_and_fills_to_the_target() {
        let opts = TraceOptions::default();
        let a = trace(&opts);
        assert_eq!(a, trace(&opts), "same seed, same trace");
        assert_ne!(
            a.events,
            trace(&TraceOptions { seed: 17, ..opts }).events,
            "another seed, another trace"
        );
        assert_eq!(a.target, 680);
        // The fill phase ends at the target; the churn stays near it.
        let mut live: BTreeMap<usize, i64> = BTreeMap::new();
        for (i, e) in a.events.iter().enumerate() {
            match *e {
                Event::Arrive { id, gpus } => {
                    assert!(SIZES.iter().any(|(g, _)| *g == gpus));
                    assert!(live.insert(id, gpus).is_none(), "ids are unique");
                }
                Event::Leave { id } => {
                    assert!(live.remove(&id).is_some(), "only live Models leave");
                }
            }
            let demand: i64 = live.values().sum();
            if i + 1 == a.churn_from {
                assert!((680..680 + 8).contains(&demand), "{demand}");
            }
            if i >= a.churn_from {
                assert!((600..=800).contains(&demand), "event {i}: {demand}");
            }
        }
        assert_eq!(live.values().sum::<i64>(), a.demand_end);
        assert_eq!(a.events.len() - a.churn_from, opts.churn_events);
        let leaves = a
            .events
            .iter()
            .filter(|e| matches!(e, Event::Leave { .. }))
            .count();
        assert!(leaves > 200, "it churns: {leaves} departures");
    }

    #[test]
    fn first_fit_decreasing_is_exact_for_power_of_two_sizes() {
        let mut rng = Rng(7);
        for _ in 0..500 {
            let n = 1 + rng.below(6) as usize;
            let k = rng.below(30) as usize;
            let sizes: Vec<i64> = (0..k).map(|_| rng.size()).collect();
            let sum: i64 = sizes.iter().sum();
            assert_eq!(
                repack_fits(&sizes, n, 8),
                sum <= n as i64 * 8,
                "{sizes:?} on {n}"
            );
        }
        // Not so for other sizes: 3 + 3 + 2 + 2 + 2 + 2 = 14 does not fit on 7 + 7.
        assert!(!repack_fits(&[3, 3, 2, 2, 2, 2], 2, 7));
    }

    #[test]
    fn stranded_missed_and_full_are_told_apart() {
        let mut t = Tally::new("t", &names(2), 0);
        let ms = Duration::from_millis(1);
        let placed = |node: &str| Decision::Placed {
            node: node.into(),
            late: false,
        };
        t.arrival(0, 4, placed("n0"), ms);
        t.arrival(1, 4, placed("n1"), ms);
        assert_eq!(t.ledger().fragmented(), 2);
        // 8 free GPUs in all, on two nodes: an 8-GPU request is stranded.
        t.arrival(2, 8, Decision::Rejected, ms);
        // A 4-GPU request fits on either node: a miss.
        t.arrival(3, 4, Decision::Rejected, ms);
        t.arrival(4, 4, placed("n0"), ms);
        t.arrival(5, 4, placed("n1"), ms);
        assert_eq!(t.ledger().fragmented(), 0);
        // Nothing free: no packing exists.
        t.arrival(6, 1, Decision::Rejected, ms);
        assert_eq!(t.departure(0), Some(("n0".into(), 4)));
        assert_eq!(t.departure(2), None, "never placed");
        let r = t.finish(None);
        assert_eq!((r.arrivals, r.placed, r.rejected), (7, 4, 3));
        assert_eq!((r.stranded, r.missed, r.full), (1, 1, 1));
        assert_eq!(r.stranded_by_size, BTreeMap::from([(8, 1)]));
        assert_eq!(r.fragmented_end, 1);
        assert_eq!(r.fragmented_max, 2);
        assert_eq!(r.gpus_end, 12);
        assert_eq!(r.fragmented_series, [1, 2, 2, 2, 1, 0, 0, 1, 1]);
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentiles(&xs), [50.0, 99.0, 100.0]);
        assert_eq!(percentiles(&[]), [0.0; 3]);
    }

    #[test]
    fn strata_side_places_as_the_controller_would() {
        let topology = Topology {
            node_groups: serde_yaml_ng::from_str(
                "[{name: h100, count: 4, cpu: '1', memory: 1Gi, gpu: {product: NVIDIA-H100-80GB-HBM3, family: hopper, count: 8, memoryMiB: 1}}]",
            )
            .expect("groups"),
        };
        let nodes = ready_nodes(&topology);
        let pool = sample_pool().expect("the h100 sample");
        let t = Trace {
            events: vec![
                Event::Arrive { id: 0, gpus: 2 },
                Event::Arrive { id: 1, gpus: 4 },
                Event::Arrive { id: 2, gpus: 8 },
                Event::Leave { id: 0 },
                Event::Arrive { id: 3, gpus: 1 },
            ],
            churn_from: 0,
            demand_end: 13,
            target: 13,
        };
        let r = replay_strata(&t, &nodes, &pool);
        assert_eq!((r.placed, r.rejected), (4, 0));
        // BinPack: the 4 joins the 2 on one node, the 8 takes a whole node,
        // the 1 goes where the 4 is.
        assert_eq!(r.fragmented_end, 1);
        assert_eq!(r.empty_end, 2);
        assert_eq!(r.gpus_end, 13);
    }

    #[test]
    fn the_most_allocated_config_names_its_profile_and_strategy() {
        let text = most_allocated_config(Path::new("/w/scheduler.kubeconfig"));
        let v: serde_json::Value = serde_yaml_ng::from_str(&text).expect("yaml");
        assert_eq!(v["profiles"][0]["schedulerName"], MOST_ALLOCATED_SCHEDULER);
        let args = &v["profiles"][0]["pluginConfig"][0]["args"]["scoringStrategy"];
        assert_eq!(args["type"], "MostAllocated");
        assert_eq!(args["resources"][0]["name"], "nvidia.com/gpu");
        assert_eq!(
            v["clientConnection"]["kubeconfig"],
            "/w/scheduler.kubeconfig"
        );
    }
}
