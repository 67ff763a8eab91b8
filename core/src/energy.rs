//! Energy accounting, pure: the replicas' sidecar readings (the NVML energy
//! counter of each GPU, power, utilization, generated tokens by adapter)
//! against the counters seen last time (kept in the Model's status, so an
//! operator restart continues from them) give what was used since then,
//! per Model, per pool and per adapter.
//!
//! Rules, per replica and GPU:
//! - a counter seen before: the difference; a counter that went backwards
//!   (a driver reload) counts its new value, the energy since the reset,
//!   or, when the meter's own reset-safe total (the node agent's, sampled
//!   far more often) moved more since the last round, that: the energy
//!   before the reload is not lost;
//! - a replica seen for the first time: the energy its sidecar measured
//!   since it started (so a new replica's start-up is not lost); then the
//!   counter is the baseline;
//! - a replica that did not answer this time keeps its baseline, so the next
//!   reading covers both intervals; a replica that is gone is forgotten.
//!
//! Generated tokens follow the same rules (a sidecar restart resets its
//! counters to zero, which counts as a reset). A replica's energy is shared
//! among the adapters it served by generated tokens in the interval.

use std::collections::{BTreeMap, BTreeSet};

use strata_crds::model::ReplicaEnergyCounters;

/// One GPU's reading.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GpuReading {
    /// The NVML energy counter (since the driver loaded), joules.
    pub counter: Option<f64>,
    /// Energy the sidecar measured since it started, joules.
    pub since_start: Option<f64>,
    /// Power now, watts.
    pub power: Option<f64>,
    /// Utilization, 0 to 1.
    pub utilization: Option<f64>,
}

/// One replica's reading from its sidecar.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplicaReading {
    /// The replica's pod.
    pub pod: String,
    /// The pool it was placed on.
    pub pool: String,
    /// By GPU UUID.
    pub gpus: BTreeMap<String, GpuReading>,
    /// Generated tokens (counter since the sidecar started) by adapter served
    /// name; "" is the base model.
    pub tokens: BTreeMap<String, f64>,
    /// Requests (counter since the sidecar started) by adapter served name.
    pub requests: BTreeMap<String, f64>,
}

/// What one round added.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Increment {
    /// Joules used since the last round.
    pub joules: f64,
    /// Tokens generated since the last round.
    pub tokens: f64,
    /// Joules by pool.
    pub pool_joules: BTreeMap<String, f64>,
    /// Power now by pool, watts.
    pub pool_watts: BTreeMap<String, f64>,
    /// Joules by adapter served name (its share by generated tokens).
    pub adapter_joules: BTreeMap<String, f64>,
    /// Tokens by adapter served name.
    pub adapter_tokens: BTreeMap<String, f64>,
    /// Requests by adapter served name.
    pub adapter_requests: BTreeMap<String, f64>,
    /// Power now, watts (sum over the GPUs that reported it).
    pub watts: Option<f64>,
    /// Mean utilization of the GPUs that reported it.
    pub utilization: Option<f64>,
    /// GPU counters that went backwards this round.
    pub resets: u32,
}

fn delta(now: f64, before: Option<f64>, first: Option<f64>) -> (f64, bool) {
    match before {
        Some(b) if now >= b => (now - b, false),
        Some(_) => (now, true),
        None => (first.unwrap_or(0.0).max(0.0), false),
    }
}

/// Accounts one round. `previous`: the baselines from last time; `readings`:
/// the replicas that answered; `alive`: every replica that still exists
/// (answering or not). Returns what was used and the new baselines.
pub fn account(
    previous: &[ReplicaEnergyCounters],
    readings: &[ReplicaReading],
    alive: &BTreeSet<String>,
) -> (Increment, Vec<ReplicaEnergyCounters>) {
    let mut inc = Increment::default();
    let mut next: Vec<ReplicaEnergyCounters> = Vec::new();
    let (mut watts, mut util, mut util_n, mut any_watts) = (0.0, 0.0, 0usize, false);
    for r in readings {
        let before = previous.iter().find(|p| p.pod == r.pod);
        let mut counters = ReplicaEnergyCounters {
            pod: r.pod.clone(),
            ..ReplicaEnergyCounters::default()
        };
        let mut joules = 0.0;
        for (uuid, g) in &r.gpus {
            let Some(now) = g.counter.or(g.since_start).filter(|v| v.is_finite()) else {
                // Keep an unreadable GPU's baselines for the next round.
                if let Some(b) = before.and_then(|b| b.gpu_joules.get(uuid)) {
                    counters.gpu_joules.insert(uuid.clone(), *b);
                }
                if let Some(b) = before.and_then(|b| b.gpu_metered_joules.get(uuid)) {
                    counters.gpu_metered_joules.insert(uuid.clone(), *b);
                }
                continue;
            };
            let metered_now = g.since_start.filter(|v| v.is_finite());
            let metered_before = before.and_then(|b| b.gpu_metered_joules.get(uuid)).copied();
            let (mut d, reset) = delta(
                now,
                before.and_then(|b| b.gpu_joules.get(uuid)).copied(),
                g.since_start,
            );
            if reset {
                inc.resets += 1;
                // The counter restarted (a driver reload): the meter, which
                // samples far more often and survived it, says what was
                // used since the last round, including before the reload.
                if let (Some(m), Some(mb)) = (metered_now, metered_before)
                    && g.counter.is_some()
                    && m >= mb
                {
                    d = d.max(m - mb);
                }
            }
            joules += d;
            counters.gpu_joules.insert(uuid.clone(), now);
            if let Some(m) = metered_now.filter(|_| g.counter.is_some()) {
                counters.gpu_metered_joules.insert(uuid.clone(), m);
            }
            if let Some(p) = g.power.filter(|p| p.is_finite()) {
                watts += p;
                any_watts = true;
                *inc.pool_watts.entry(r.pool.clone()).or_default() += p;
            }
            if let Some(u) = g.utilization.filter(|u| u.is_finite()) {
                util += u;
                util_n += 1;
            }
        }
        let mut tokens: BTreeMap<String, f64> = BTreeMap::new();
        for (adapter, now) in r.tokens.iter().filter(|(_, v)| v.is_finite()) {
            let (d, _) = delta(
                *now,
                before.and_then(|b| b.tokens.get(adapter)).copied(),
                Some(*now),
            );
            tokens.insert(adapter.clone(), d);
            counters.tokens.insert(adapter.clone(), *now);
        }
        for (adapter, now) in r.requests.iter().filter(|(_, v)| v.is_finite()) {
            let (d, _) = delta(
                *now,
                before.and_then(|b| b.requests.get(adapter)).copied(),
                Some(*now),
            );
            if !adapter.is_empty() {
                *inc.adapter_requests.entry(adapter.clone()).or_default() += d;
            }
            counters.requests.insert(adapter.clone(), *now);
        }
        let total_tokens: f64 = tokens.values().sum();
        for (adapter, t) in &tokens {
            if adapter.is_empty() {
                continue;
            }
            *inc.adapter_tokens.entry(adapter.clone()).or_default() += t;
            if total_tokens > 0.0 {
                *inc.adapter_joules.entry(adapter.clone()).or_default() +=
                    joules * t / total_tokens;
            }
        }
        inc.joules += joules;
        inc.tokens += total_tokens;
        *inc.pool_joules.entry(r.pool.clone()).or_default() += joules;
        next.push(counters);
    }
    // Replicas that exist but did not answer keep their baselines.
    for p in previous {
        if alive.contains(&p.pod) && !next.iter().any(|n| n.pod == p.pod) {
            next.push(p.clone());
        }
    }
    next.sort_by(|a, b| a.pod.cmp(&b.pod));
    inc.watts = any_watts.then_some(watts);
    inc.utilization = (util_n > 0).then(|| util / util_n as f64);
    (inc, next)
}

/// A replica's GPUs from a node-level source (a node agent, dcgm-exporter):
/// what the source read for its pod; where it read nothing for the pod (its
/// node's agent did not answer, the query failed), its GPUs of the last
/// round as unreadable, so that their baselines are kept and the next
/// reading covers both intervals (nothing lost, nothing counted twice).
pub fn gpus_from(
    read: Option<&BTreeMap<String, GpuReading>>,
    before: Option<&ReplicaEnergyCounters>,
) -> BTreeMap<String, GpuReading> {
    match read {
        Some(gpus) => gpus.clone(),
        None => before
            .map(|b| {
                b.gpu_joules
                    .keys()
                    .map(|uuid| (uuid.clone(), GpuReading::default()))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// The value of label `name` in a Prometheus label set (`a="x",b="y"`).
pub(crate) fn label(labels: &str, name: &str) -> Option<String> {
    let mut rest = labels;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(match n {
                            'n' => '\n',
                            other => other,
                        });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                other => value.push(other),
            }
        }
        if key.trim_start_matches(',').trim() == name {
            return Some(value);
        }
        rest = after[end..].trim_start_matches(',');
    }
    None
}

/// Reads a sidecar's exposition into a replica reading.
pub fn parse(text: &str, pod: &str, pool: &str) -> ReplicaReading {
    let mut r = ReplicaReading {
        pod: pod.to_string(),
        pool: pool.to_string(),
        ..ReplicaReading::default()
    };
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let Some((name, labels, value)) = crate::collect::labels_and_value(line) else {
            continue;
        };
        if !value.is_finite() {
            continue;
        }
        if name == "strata_request_generation_tokens_total" {
            let adapter = label(labels, "adapter").unwrap_or_default();
            *r.tokens.entry(adapter).or_default() += value;
            continue;
        }
        if name == "strata_requests_total" {
            let adapter = label(labels, "adapter").unwrap_or_default();
            *r.requests.entry(adapter).or_default() += value;
            continue;
        }
        let slot = match name {
            "strata_gpu_energy_counter_joules"
            | "strata_gpu_energy_joules_total"
            | "strata_gpu_power_watts"
            | "strata_gpu_utilization_ratio" => {
                let Some(uuid) = label(labels, "uuid").filter(|u| !u.is_empty()) else {
                    continue;
                };
                r.gpus.entry(uuid).or_default()
            }
            _ => continue,
        };
        match name {
            "strata_gpu_energy_counter_joules" => slot.counter = Some(value),
            "strata_gpu_energy_joules_total" => slot.since_start = Some(value),
            "strata_gpu_power_watts" => slot.power = Some(value),
            _ => slot.utilization = Some(value),
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_driver_reload_is_bridged_by_the_meters_own_total() {
        let alive = BTreeSet::from(["r1".to_string()]);
        let reading = |counter: f64, metered: f64| ReplicaReading {
            pod: "r1".into(),
            gpus: BTreeMap::from([(
                "GPU-a".to_string(),
                GpuReading {
                    counter: Some(counter),
                    since_start: Some(metered),
                    ..GpuReading::default()
                },
            )]),
            ..ReplicaReading::default()
        };
        let (_, c) = account(&[], &[reading(10_000.0, 50.0)], &alive);
        assert_eq!(c[0].gpu_metered_joules["GPU-a"], 50.0);
        // 300 J used before the reload, 200 J after: the counter shows only
        // the 200, the meter all 500.
        let (inc, c) = account(&c, &[reading(200.0, 550.0)], &alive);
        assert_eq!((inc.joules, inc.resets), (500.0, 1));
        // Afterwards the counter again.
        let (inc, _) = account(&c, &[reading(260.0, 610.0)], &alive);
        assert_eq!((inc.joules, inc.resets), (60.0, 0));
        // A meter that restarted too (its total went back): only the
        // counter's value since the reload is known.
        let (inc, _) = account(&c, &[reading(10.0, 5.0)], &alive);
        assert_eq!((inc.joules, inc.resets), (10.0, 1));
    }

    #[test]
    fn a_replica_the_node_source_missed_keeps_its_baselines() {
        let before = ReplicaEnergyCounters {
            pod: "r1".into(),
            gpu_joules: BTreeMap::from([("GPU-a".into(), 1000.0)]),
            ..ReplicaEnergyCounters::default()
        };
        // Round 1: the agent did not answer; round 2: it did.
        let missed = ReplicaReading {
            pod: "r1".into(),
            gpus: gpus_from(None, Some(&before)),
            ..ReplicaReading::default()
        };
        let alive = BTreeSet::from(["r1".to_string()]);
        let (inc, counters) = account(std::slice::from_ref(&before), &[missed], &alive);
        assert_eq!(inc.joules, 0.0);
        assert_eq!(counters[0].gpu_joules["GPU-a"], 1000.0, "baseline kept");
        let read = BTreeMap::from([(
            "GPU-a".to_string(),
            GpuReading {
                counter: Some(1500.0),
                since_start: Some(9999.0),
                ..GpuReading::default()
            },
        )]);
        let answered = ReplicaReading {
            pod: "r1".into(),
            gpus: gpus_from(Some(&read), Some(&counters[0])),
            ..ReplicaReading::default()
        };
        let (inc, _) = account(&counters, &[answered], &alive);
        assert_eq!(inc.joules, 500.0, "both intervals, once");
        assert!(gpus_from(None, None).is_empty());
    }

    #[test]
    fn parses_a_sidecar_exposition() {
        let text = r#"# HELP strata_gpu_energy_counter_joules x
strata_gpu_energy_counter_joules{gpu="0",uuid="GPU-a"} 1234.5
strata_gpu_energy_counter_joules{gpu="1",uuid="GPU-b"} 99
strata_gpu_energy_joules_total{gpu="0",uuid="GPU-a"} 12
strata_gpu_power_watts{gpu="0",uuid="GPU-a"} 350
strata_gpu_utilization_ratio{gpu="0",uuid="GPU-a"} 0.5
strata_request_generation_tokens_total{adapter="",model="m"} 10
strata_request_generation_tokens_total{adapter="sql",model="m"} 7
strata_request_generation_tokens_total{adapter="a\"b",model="m"} 1
strata_requests_total{adapter="sql",endpoint="chat",model="m",outcome="ok"} 3
strata_requests_total{adapter="sql",endpoint="chat",model="m",outcome="error"} 1
strata_pod_gpu_energy_joules_total 12
"#;
        let r = parse(text, "p", "h100");
        assert_eq!(r.gpus.len(), 2);
        let a = r.gpus["GPU-a"];
        assert_eq!(
            (a.counter, a.since_start, a.power, a.utilization),
            (Some(1234.5), Some(12.0), Some(350.0), Some(0.5))
        );
        assert_eq!(r.gpus["GPU-b"].counter, Some(99.0));
        assert_eq!(r.tokens[""], 10.0);
        assert_eq!(r.tokens["sql"], 7.0);
        assert_eq!(r.tokens["a\"b"], 1.0);
        assert_eq!(r.requests["sql"], 4.0, "summed over endpoints and outcomes");
    }

    fn reading(pod: &str, gpus: &[(&str, f64, f64)], tokens: &[(&str, f64)]) -> ReplicaReading {
        ReplicaReading {
            pod: pod.into(),
            pool: "h100".into(),
            gpus: gpus
                .iter()
                .map(|(u, counter, since)| {
                    (
                        u.to_string(),
                        GpuReading {
                            counter: Some(*counter),
                            since_start: Some(*since),
                            power: Some(300.0),
                            utilization: Some(0.5),
                        },
                    )
                })
                .collect(),
            tokens: tokens.iter().map(|(a, t)| (a.to_string(), *t)).collect(),
            requests: tokens
                .iter()
                .map(|(a, t)| (a.to_string(), t / 10.0))
                .collect(),
        }
    }

    fn alive(pods: &[&str]) -> BTreeSet<String> {
        pods.iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn first_sight_counts_since_start_then_differences() {
        let (inc, base) = account(
            &[],
            &[reading("a", &[("GPU-1", 10_000.0, 500.0)], &[("", 100.0)])],
            &alive(&["a"]),
        );
        assert_eq!(inc.joules, 500.0, "energy since the sidecar started");
        assert_eq!(inc.tokens, 100.0);
        assert_eq!(base[0].gpu_joules["GPU-1"], 10_000.0);
        let (inc, base) = account(
            &base,
            &[reading("a", &[("GPU-1", 10_800.0, 1300.0)], &[("", 150.0)])],
            &alive(&["a"]),
        );
        assert_eq!(inc.joules, 800.0);
        assert_eq!(inc.tokens, 50.0);
        assert_eq!(inc.watts, Some(300.0));
        assert_eq!(inc.utilization, Some(0.5));
        assert_eq!(base[0].tokens[""], 150.0);
    }

    #[test]
    fn a_sidecar_restart_loses_and_doubles_nothing() {
        // The NVML counter keeps going; the sidecar's own counters restart.
        let base = account(
            &[],
            &[reading("a", &[("GPU-1", 1000.0, 0.0)], &[("", 100.0)])],
            &alive(&["a"]),
        )
        .1;
        let (inc, _) = account(
            &base,
            &[reading("a", &[("GPU-1", 1700.0, 50.0)], &[("", 30.0)])],
            &alive(&["a"]),
        );
        assert_eq!(inc.joules, 700.0, "from the NVML counter, not since start");
        assert_eq!(inc.tokens, 30.0, "tokens since the restart");
        assert_eq!(inc.resets, 0);
    }

    #[test]
    fn a_counter_reset_counts_the_new_value() {
        let base = account(
            &[],
            &[reading("a", &[("GPU-1", 5000.0, 0.0)], &[])],
            &alive(&["a"]),
        )
        .1;
        let (inc, base) = account(
            &base,
            // (The meter's own total did not move: it cannot bridge the
            // reload; see a_driver_reload_is_bridged_by_the_meters_own_total.)
            &[reading("a", &[("GPU-1", 120.0, 0.0)], &[])],
            &alive(&["a"]),
        );
        assert_eq!(inc.joules, 120.0);
        assert_eq!(inc.resets, 1);
        assert_eq!(base[0].gpu_joules["GPU-1"], 120.0);
    }

    #[test]
    fn silent_replicas_keep_their_baseline_and_gone_ones_are_forgotten() {
        let base = account(
            &[],
            &[
                reading("a", &[("GPU-1", 100.0, 0.0)], &[]),
                reading("b", &[("GPU-2", 200.0, 0.0)], &[]),
                reading("c", &[("GPU-3", 300.0, 0.0)], &[]),
            ],
            &alive(&["a", "b", "c"]),
        )
        .1;
        // b does not answer; c is gone.
        let (inc, base) = account(
            &base,
            &[reading("a", &[("GPU-1", 150.0, 50.0)], &[])],
            &alive(&["a", "b"]),
        );
        assert_eq!(inc.joules, 50.0);
        let pods: Vec<&str> = base.iter().map(|b| b.pod.as_str()).collect();
        assert_eq!(pods, ["a", "b"]);
        // b answers again: both intervals at once, nothing lost.
        let (inc, _) = account(
            &base,
            &[
                reading("a", &[("GPU-1", 150.0, 50.0)], &[]),
                reading("b", &[("GPU-2", 260.0, 60.0)], &[]),
            ],
            &alive(&["a", "b"]),
        );
        assert_eq!(inc.joules, 60.0);
    }

    #[test]
    fn adapters_share_a_replicas_energy_by_tokens() {
        let base = account(
            &[],
            &[reading(
                "a",
                &[("GPU-1", 0.0, 0.0)],
                &[("", 0.0), ("sql", 0.0), ("poet", 0.0)],
            )],
            &alive(&["a"]),
        )
        .1;
        let (inc, _) = account(
            &base,
            &[reading(
                "a",
                &[("GPU-1", 1000.0, 1000.0)],
                &[("", 500.0), ("sql", 300.0), ("poet", 200.0)],
            )],
            &alive(&["a"]),
        );
        assert_eq!(inc.tokens, 1000.0);
        assert_eq!(inc.adapter_joules["sql"], 300.0);
        assert_eq!(inc.adapter_joules["poet"], 200.0);
        assert_eq!(inc.adapter_tokens["sql"], 300.0);
        assert_eq!(inc.adapter_requests["sql"], 30.0);
        assert_eq!(inc.pool_joules["h100"], 1000.0);
        assert_eq!(inc.pool_watts["h100"], 300.0);
    }
}
