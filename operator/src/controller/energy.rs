//! The energy accountant's shell: every interval, read every running
//! replica's sidecar (in parallel, with timeouts, on pod IPs), account
//! (pure: strata_core::energy) and write Model, GPUPool and Adapter status with
//! its own field manager, so that no other writer overwrites the totals.
//!
//! Totals advance in memory; status is where they survive a restart or a
//! leader change: the baselines and the totals are written together, so a
//! new leader continues from a consistent pair (nothing lost, nothing
//! counted twice).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use serde_json::json;
use strata_core::cost;
use strata_core::powercap::{self, GpuLimit};
use strata_crds::gpupool::PowerCapStatus;
use strata_crds::model::EnergyStatus;
use strata_crds::{Adapter, GPUPool, Model};

use super::Context;
use super::reconcile::apply_status;
use strata_core::energy::{self, ReplicaReading};
use strata_core::labels;

/// What the accountant remembers between rounds.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Last written energy status, by Model UID.
    models: HashMap<String, EnergyStatus>,
    /// Last written joules, by pool.
    pools: HashMap<String, f64>,
    /// Last written (joules, tokens, requests), by Adapter UID.
    adapters: HashMap<String, (f64, i64, i64)>,
    /// When the last round ran (token rates for cost per million tokens).
    last_round: Option<std::time::Instant>,
    /// What was last written to each Model's status (energy and cost), and
    /// when, by UID.
    written: HashMap<String, (serde_json::Value, std::time::Instant)>,
    /// What was last written to each pool's status, by name.
    pools_written: HashMap<String, serde_json::Value>,
    /// Rounds in a row that deferred a Model's write (the client busy).
    deferred_rounds: u32,
}

/// Rounds in a row a Model's energy write may be deferred while the
/// client is busy (see [`crate::ratelimit::Lanes::busy`]); the next one
/// writes whatever the client's state.
pub const MAX_DEFERRED_ROUNDS: u32 = 4;

/// How often a Model's energy status is written while only its totals
/// grow: every reading for short intervals, at most every minute (or every
/// interval, when that is longer) otherwise. A new or gone replica, a first
/// reading, a change of cost are written at once. Totals and baselines are
/// always written together, so a new leader continues from the last
/// written pair and nothing is lost between writes. Pure.
pub fn status_every(interval: std::time::Duration) -> std::time::Duration {
    (interval * 4)
        .min(std::time::Duration::from_secs(60))
        .max(interval)
}

/// Whether a Model's energy status must be written now: it differs from
/// the last written (observedAt aside) and either its replicas, its cost or
/// anything but the running totals changed, or [`status_every`] has passed
/// since the last write. Pure.
pub fn energy_write_due(
    last: Option<&(serde_json::Value, std::time::Instant)>,
    next: &serde_json::Value,
    now: std::time::Instant,
    every: std::time::Duration,
) -> bool {
    let Some((before, at)) = last else {
        return true;
    };
    let strip = |v: &serde_json::Value, totals: bool| {
        let mut v = v.clone();
        if let Some(e) = v.get_mut("energy").and_then(|e| e.as_object_mut()) {
            e.remove("observedAt");
            if totals {
                for k in [
                    "energyJoules",
                    "generatedTokens",
                    "joulesPer1kTokens",
                    "powerWatts",
                    "gpuUtilization",
                ] {
                    e.remove(k);
                }
                // The replicas counted, not their baselines.
                if let Some(c) = e.get_mut("counters").and_then(|c| c.as_array_mut()) {
                    for r in c.iter_mut() {
                        if let Some(o) = r.as_object_mut() {
                            o.retain(|k, _| k == "pod");
                        }
                    }
                }
            }
        }
        if totals && let Some(c) = v.get_mut("cost").and_then(|c| c.as_object_mut()) {
            c.remove("perMillionTokens");
        }
        v
    };
    if strip(before, false) == strip(next, false) {
        return false;
    }
    strip(before, true) != strip(next, true) || now.saturating_duration_since(*at) >= every
}

fn running(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        && p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some()
}

/// The running replicas' readings: tokens and requests from each sidecar
/// (in parallel, with its timeout), GPUs from the node-level source when
/// there is one (`gpus`; a replica it missed keeps its baselines).
async fn replica_readings(
    ctx: &Context,
    ns: &str,
    name: &str,
    mine: &[&Pod],
    gpus: Option<&strata_core::telemetry::ByPod>,
    previous: &EnergyStatus,
) -> Vec<ReplicaReading> {
    futures::future::join_all(mine.iter().filter(|p| running(p)).map(|p| async {
        let ip = p.status.as_ref().and_then(|s| s.pod_ip.clone())?;
        let text = super::scale::scrape(&ctx.sidecars, &ip, ns, name).await?;
        let pool = p.labels().get(labels::POOL).cloned().unwrap_or_default();
        let mut r = energy::parse(&text, &p.name_any(), &pool);
        if let Some(by_pod) = gpus {
            r.gpus = energy::gpus_from(
                by_pod.get(&strata_core::telemetry::PodKey {
                    namespace: ns.to_string(),
                    pod: p.name_any(),
                }),
                previous.counters.iter().find(|c| c.pod == r.pod),
            );
        }
        Some(r)
    }))
    .await
    .into_iter()
    .flatten()
    .collect()
}

/// Runs one round over every Model.
pub async fn round(
    ctx: &Arc<Context>,
    models: &Store<Model>,
    adapters: &Store<Adapter>,
    ledger: &mut Ledger,
) {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let started = std::time::Instant::now();
    let elapsed = ledger
        .last_round
        .replace(started)
        .map(|t| started.duration_since(t).as_secs_f64())
        .filter(|s| *s > 0.0);
    // The GPUs, from where a node shows them (None: the sidecars' pages).
    let readings = super::telemetry::read(&ctx.telemetry).await;
    let gpus = readings.by_pod;
    for e in &readings.errors {
        tracing::warn!("GPU telemetry: {e}");
        ctx.metrics
            .telemetry_errors
            .with_label_values(&[ctx.telemetry.source.as_str()])
            .inc();
    }
    let pods = ctx.pods.state();
    let mut pool_joules: BTreeMap<String, f64> = BTreeMap::new();
    let mut pool_watts: BTreeMap<String, f64> = BTreeMap::new();
    let prices: BTreeMap<String, f64> = ctx
        .pools
        .state()
        .iter()
        .filter_map(|p| Some((p.name_any(), cost::price_per_gpu_hour(p)?)))
        .collect();
    // Per pool: the replicas' footprints and token rates (by GPU share).
    let mut pool_footprints: BTreeMap<String, Vec<cost::Footprint>> = BTreeMap::new();
    let mut pool_tokens: BTreeMap<String, f64> = BTreeMap::new();
    let all_models = models.state();
    let live: BTreeSet<String> = all_models.iter().filter_map(|m| m.uid()).collect();
    ledger.models.retain(|uid, _| live.contains(uid));
    ledger.written.retain(|uid, _| live.contains(uid));
    let live_adapters: BTreeSet<String> = adapters.state().iter().filter_map(|a| a.uid()).collect();
    ledger.adapters.retain(|uid, _| live_adapters.contains(uid));
    let live_pools: BTreeSet<String> = ctx.pools.state().iter().map(|p| p.name_any()).collect();
    ledger.pools.retain(|name, _| live_pools.contains(name));
    ledger
        .pools_written
        .retain(|name, _| live_pools.contains(name));
    let mut deferred_any = false;
    for model in all_models.iter() {
        let (Some(ns), Some(uid)) = (model.namespace(), model.uid()) else {
            continue;
        };
        if model.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let name = model.name_any();
        let mine: Vec<&Pod> = pods
            .iter()
            .map(|p| p.as_ref())
            .filter(|p| {
                p.metadata.namespace.as_deref() == Some(ns.as_str())
                    && p.labels().get(labels::MODEL) == Some(&name)
                    && p.owner_references().iter().any(|o| o.uid == uid)
            })
            .collect();
        let alive: BTreeSet<String> = mine
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .map(|p| p.name_any())
            .collect();
        let previous = ledger.models.get(&uid).cloned().unwrap_or_else(|| {
            model
                .status
                .as_ref()
                .and_then(|s| s.energy.clone())
                .unwrap_or_default()
        });
        let readings = replica_readings(ctx, &ns, &name, &mine, gpus.as_ref(), &previous).await;
        if readings.is_empty() && previous.counters.is_empty() && mine.is_empty() {
            continue;
        }
        let (inc, counters) = energy::account(&previous.counters, &readings, &alive);
        let joules = previous.energy_joules.unwrap_or(0.0) + inc.joules;
        let tokens = previous.generated_tokens.unwrap_or(0) + inc.tokens.round() as i64;
        let status = EnergyStatus {
            power_watts: inc.watts.map(|w| (w * 10.0).round() / 10.0),
            energy_joules: Some(joules),
            joules_per_1k_tokens: (tokens > 0)
                .then(|| (joules / tokens as f64 * 1000.0 * 1000.0).round() / 1000.0),
            generated_tokens: Some(tokens),
            gpu_utilization: inc.utilization.map(|u| (u * 1000.0).round() / 1000.0),
            observed_at: Some(now.clone()),
            counters,
        };
        // Cost: the GPUs its running replicas hold, at their pools' prices.
        let footprints: Vec<cost::Footprint> = mine
            .iter()
            .filter(|p| running(p))
            .map(|p| cost::Footprint {
                pool: p.labels().get(labels::POOL).cloned().unwrap_or_default(),
                gpus: strata_core::view::pod_gpu_requests(p).values().sum(),
            })
            .collect();
        let tokens_per_second = elapsed.map(|s| inc.tokens / s);
        let model_cost = cost::cost(&footprints, &prices, tokens_per_second);
        let total_gpus: i64 = footprints.iter().map(|f| f.gpus).sum();
        for f in &footprints {
            if let (Some(t), true) = (tokens_per_second, total_gpus > 0) {
                *pool_tokens.entry(f.pool.clone()).or_default() +=
                    t * f.gpus as f64 / total_gpus as f64;
            }
            pool_footprints
                .entry(f.pool.clone())
                .or_default()
                .push(f.clone());
        }
        let m = &ctx.metrics;
        let l = [ns.as_str(), name.as_str()];
        m.model_energy.with_label_values(&l).inc_by(inc.joules);
        m.model_tokens.with_label_values(&l).inc_by(inc.tokens);
        m.model_power
            .with_label_values(&l)
            .set(inc.watts.unwrap_or(0.0));
        if let Some(u) = inc.utilization {
            m.model_utilization.with_label_values(&l).set(u);
        }
        if inc.resets > 0 {
            m.energy_counter_resets
                .with_label_values(&l)
                .inc_by(u64::from(inc.resets));
        }
        for (pool, j) in &inc.pool_joules {
            *pool_joules.entry(pool.clone()).or_default() += j;
        }
        for (pool, w) in &inc.pool_watts {
            *pool_watts.entry(pool.clone()).or_default() += w;
        }
        let next = json!({"energy": status, "cost": model_cost});
        let due = energy_write_due(
            ledger.written.get(&uid),
            &next,
            started,
            status_every(ctx.config.energy_interval),
        );
        ledger.models.insert(uid.clone(), status);
        // Energy and cost are no reason to delay the writes that make
        // replicas exist: while the client is busy, the write waits for a
        // later round (the totals keep counting here meanwhile).
        let deferred = due && ledger.deferred_rounds < MAX_DEFERRED_ROUNDS && ctx.lanes.busy();
        deferred_any |= deferred;
        let result = match (due, deferred) {
            (true, false) => "written",
            (true, true) => "deferred",
            (false, _) => "unchanged",
        };
        ctx.metrics
            .status_writes
            .with_label_values(&["energy", result])
            .inc();
        if due && !deferred {
            match apply_status(
                &ctx.client,
                model.as_ref(),
                labels::ENERGY_FIELD_MANAGER,
                &next,
            )
            .await
            {
                Ok(()) => {
                    ledger.written.insert(uid.clone(), (next, started));
                }
                Err(e) => {
                    tracing::warn!(namespace = %ns, model = %name, "writing energy status: {e}");
                }
            }
        }

        // Adapters: their share by generated tokens.
        for a in adapters.state().iter().filter(|a| {
            a.metadata.namespace.as_deref() == Some(ns.as_str()) && a.spec.model == name
        }) {
            let served = a.spec.served_name.clone().unwrap_or_else(|| a.name_any());
            let aj = inc.adapter_joules.get(&served).copied().unwrap_or(0.0);
            let at = inc.adapter_tokens.get(&served).copied().unwrap_or(0.0);
            let ar = inc.adapter_requests.get(&served).copied().unwrap_or(0.0);
            if aj == 0.0 && at == 0.0 && ar == 0.0 {
                continue;
            }
            let Some(auid) = a.uid() else { continue };
            let (pj, pt, pr) = ledger.adapters.get(&auid).copied().unwrap_or_else(|| {
                let s = a.status.as_ref();
                (
                    s.and_then(|s| s.energy_joules).unwrap_or(0.0),
                    s.and_then(|s| s.generated_tokens).unwrap_or(0),
                    s.and_then(|s| s.requests).unwrap_or(0),
                )
            });
            let (nj, nt, nr) = (pj + aj, pt + at.round() as i64, pr + ar.round() as i64);
            ledger.adapters.insert(auid, (nj, nt, nr));
            m.adapter_energy
                .with_label_values(&[ns.as_str(), a.name_any().as_str()])
                .inc_by(aj);
            if let Err(e) = apply_status(
                &ctx.client,
                a.as_ref(),
                labels::ENERGY_FIELD_MANAGER,
                json!({"energyJoules": nj, "generatedTokens": nt, "requests": nr}),
            )
            .await
            {
                tracing::warn!(namespace = %ns, adapter = %a.name_any(), "writing energy status: {e}");
            }
        }
    }

    ledger.deferred_rounds = if deferred_any {
        ledger.deferred_rounds.saturating_add(1)
    } else {
        0
    };

    // Pools: everything placed on them.
    for pool in ctx.pools.state().iter() {
        let name = pool.name_any();
        let before = ledger.pools.get(&name).copied().unwrap_or_else(|| {
            pool.status
                .as_ref()
                .and_then(|s| s.energy_joules)
                .unwrap_or(0.0)
        });
        let added = pool_joules.get(&name).copied().unwrap_or(0.0);
        let watts = pool_watts.get(&name).copied().unwrap_or(0.0);
        let joules = before + added;
        ledger.pools.insert(name.clone(), joules);
        ctx.metrics
            .pool_energy
            .with_label_values(&[name.as_str()])
            .inc_by(added);
        ctx.metrics
            .pool_power
            .with_label_values(&[name.as_str()])
            .set(watts);
        let pool_cost = cost::cost(
            pool_footprints.get(&name).map_or(&[][..], Vec::as_slice),
            &prices,
            elapsed.map(|_| pool_tokens.get(&name).copied().unwrap_or(0.0)),
        );
        let power_cap = power_cap_status(pool, readings.limits.as_deref(), ctx.telemetry.source);
        let next = json!({
            "powerWatts": (watts * 10.0).round() / 10.0,
            "energyJoules": joules,
            "cost": pool_cost,
            "powerCap": power_cap,
        });
        if ledger.pools_written.get(&name) == Some(&next) {
            ctx.metrics
                .status_writes
                .with_label_values(&["energy-pool", "unchanged"])
                .inc();
            continue;
        }
        ctx.metrics
            .status_writes
            .with_label_values(&["energy-pool", "written"])
            .inc();
        match apply_status(
            &ctx.client,
            pool.as_ref(),
            labels::ENERGY_FIELD_MANAGER,
            &next,
        )
        .await
        {
            Ok(()) => {
                ledger.pools_written.insert(name.clone(), next);
            }
            Err(e) => tracing::warn!(pool = %name, "writing energy status: {e}"),
        }
    }
}

/// How a pool's `powerCapWatts` stands, from the GPUs' limits the agents
/// report (None without a cap).
fn power_cap_status(
    pool: &GPUPool,
    limits: Option<&[GpuLimit]>,
    source: super::telemetry::Source,
) -> Option<PowerCapStatus> {
    let target = pool.spec.power_cap_watts?;
    let nodes: Vec<String> = pool
        .status
        .as_ref()
        .map(|s| s.nodes.iter().map(|n| n.name.clone()).collect())
        .unwrap_or_default();
    let Some(limits) = limits else {
        return Some(PowerCapStatus {
            target_watts: target,
            gpus: 0,
            gpus_at_cap: 0,
            message: Some(format!(
                "the GPU telemetry source ({}) does not report power limits; the node agent \
                 applies and reports caps",
                source.as_str()
            )),
        });
    };
    let summary = powercap::summarise(f64::from(target), &nodes, limits);
    Some(PowerCapStatus {
        target_watts: target,
        gpus: summary.gpus,
        gpus_at_cap: summary.gpus_at_cap,
        message: Some(powercap::message(f64::from(target), &summary)),
    })
}

/// Runs rounds every `ctx.config.energy_interval` until `stop` fires.
pub async fn run(
    ctx: Arc<Context>,
    models: Store<Model>,
    adapters: Store<Adapter>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut ledger = Ledger::default();
    let mut tick = tokio::time::interval(ctx.config.energy_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|v| *v) => return,
        }
        round(&ctx, &models, &adapters, &mut ledger).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn status(joules: f64, pods: &[&str], at: &str) -> serde_json::Value {
        json!({
            "energy": {
                "energyJoules": joules,
                "powerWatts": joules / 10.0,
                "observedAt": at,
                "counters": pods.iter().map(|p| json!({"pod": p, "gpuJoules": {"GPU-a": joules}})).collect::<Vec<_>>(),
            },
            "cost": {"perHour": 2.5, "gpus": 1, "perMillionTokens": joules},
        })
    }

    #[test]
    fn growing_totals_are_written_at_the_status_cadence_new_replicas_at_once() {
        let t0 = Instant::now();
        let every = status_every(Duration::from_secs(15));
        assert_eq!(every, Duration::from_secs(60));
        assert_eq!(status_every(Duration::from_secs(2)), Duration::from_secs(8));
        assert_eq!(
            status_every(Duration::from_secs(600)),
            Duration::from_secs(600)
        );
        let last = (status(100.0, &["a"], "t0"), t0);
        // Nothing new but the time: never.
        assert!(!energy_write_due(
            Some(&last),
            &status(100.0, &["a"], "t1"),
            t0 + every * 2,
            every
        ));
        // Totals grew: at the cadence.
        let grown = status(150.0, &["a"], "t1");
        assert!(!energy_write_due(
            Some(&last),
            &grown,
            t0 + every / 2,
            every
        ));
        assert!(energy_write_due(Some(&last), &grown, t0 + every, every));
        // A new replica, or no write yet: at once.
        assert!(energy_write_due(
            Some(&last),
            &status(150.0, &["a", "b"], "t1"),
            t0,
            every
        ));
        assert!(energy_write_due(None, &grown, t0, every));
    }
}
