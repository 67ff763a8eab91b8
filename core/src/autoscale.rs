//! The SLA autoscaler's decision, as a pure function of what was observed,
//! the targets, the policy and a little remembered state.
//!
//! Each latency signal (TTFT, inter-token, end-to-end, at the SLA
//! percentile) and the queue depth per replica gives a recommendation:
//! above target by more than the tolerance, scale up in proportion to
//! `observed / target` over the *ready* replicas (pending replicas are
//! already on their way, so they are not asked for twice); below by more
//! than the tolerance on every signal, scale down, but never below what the
//! current load needs (`ready * max ratio`). The largest recommendation
//! wins. Scale-up is fast but rate-limited; scale-down waits for the
//! stabilization window (the highest recommendation in the window wins)
//! and goes one step at a time. Bounds last. With minReplicas 0, an idle
//! window with no requests scales to zero.

use std::collections::VecDeque;

/// Observed values over the window; None: unknown (no data).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Signals {
    /// TTFT at the percentile, seconds.
    pub ttft: Option<f64>,
    /// Inter-token latency at the percentile, seconds.
    pub itl: Option<f64>,
    /// End-to-end latency at the percentile, seconds.
    pub e2e: Option<f64>,
    /// Requests waiting in the engines, per ready replica.
    pub queue_per_replica: Option<f64>,
    /// Requests per second over the window.
    pub rps: Option<f64>,
    /// Requests arriving per second over the last interval, all replicas
    /// (completed plus the change in requests in flight).
    pub arrivals: Option<f64>,
    /// Requests completed per second over the last interval, all replicas.
    pub throughput: Option<f64>,
}

/// Targets from spec.sla (seconds, requests).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Targets {
    /// TTFT target.
    pub ttft: Option<f64>,
    /// Inter-token latency target.
    pub itl: Option<f64>,
    /// End-to-end target.
    pub e2e: Option<f64>,
    /// Queue depth per replica target.
    pub queue_per_replica: Option<f64>,
}

/// Rate limit of one direction: the larger of the two changes is allowed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    /// Replicas per evaluation.
    pub replicas: Option<i32>,
    /// Percent of the current count per evaluation.
    pub percent: Option<i32>,
}

impl Limit {
    fn max_change(&self, current: i32) -> i32 {
        let by_count = self.replicas.unwrap_or(0);
        let by_percent = self.percent.map_or(0, |p| {
            ((current as f64) * f64::from(p) / 100.0).ceil() as i32
        });
        by_count.max(by_percent).max(1)
    }
}

/// The Model's autoscaling policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// minReplicas.
    pub min: i32,
    /// maxReplicas.
    pub max: i32,
    /// Relative band around a target that causes no change (0.1 = 10 %).
    pub tolerance: f64,
    /// Scale-up limit (default: double, or +4, per evaluation).
    pub up: Limit,
    /// Scale-down limit (default: one replica per evaluation).
    pub down: Limit,
    /// Seconds a scale-up recommendation must hold (default 0).
    pub up_window: f64,
    /// Seconds over which the highest recommendation bounds a scale-down (default 300).
    pub down_window: f64,
    /// Seconds without requests before scaling to zero (min must be 0).
    pub idle_to_zero: Option<f64>,
}

/// What the autoscaler remembers between evaluations. Rebuilt empty after
/// an operator restart: the first scale-down then waits a whole window, so a
/// restart never causes a dip.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    /// (time, recommendation, what the arrival rate alone needed) within
    /// the longer window: scale-up stabilizes on the first, scale-down on
    /// the second.
    pub history: VecDeque<(f64, i32, i32)>,
    /// Last time a request was seen.
    pub last_request: Option<f64>,
    /// When this state started (operator start or first evaluation).
    pub since: Option<f64>,
    /// Requests per second one ready replica completes while saturated
    /// (learned; seeded from status after a restart).
    pub capacity: Option<f64>,
    /// Ready replicas at the previous evaluation.
    pub last_ready: Option<i32>,
}

/// Fraction of the learned capacity the throughput signal plans for.
pub const TARGET_UTILIZATION: f64 = 0.85;
/// Seconds in which the throughput signal plans to drain the engines' queues.
pub const BACKLOG_DRAIN_SECONDS: f64 = 60.0;

/// Learns the per-replica capacity from the last interval: while the
/// engines hold waiting requests (saturated) and the ready count did not
/// change, completions per ready replica are the capacity (smoothed); an
/// unsaturated interval that completes more than the estimate raises it.
fn learn(input: &Input, state: &mut State) {
    let s = input.signals;
    let steady = state.last_ready == Some(input.ready) && input.ready > 0;
    state.last_ready = Some(input.ready);
    let (Some(throughput), true) = (s.throughput, steady) else {
        return;
    };
    if !(throughput.is_finite() && throughput > 0.0) {
        return;
    }
    let per = throughput / f64::from(input.ready);
    let saturated = s.queue_per_replica.is_some_and(|q| q >= 1.0);
    state.capacity = match state.capacity {
        _ if !per.is_finite() => state.capacity,
        None if saturated => Some(per),
        Some(c) if saturated => Some(0.5 * c + 0.5 * per),
        Some(c) if per > c => Some(per),
        other => other,
    };
}

/// Replicas the arrival rate and the queued backlog need at the learned
/// capacity, if both are known.
fn throughput_needed(input: &Input, state: &State) -> Option<(f64, f64, i32)> {
    let capacity = state.capacity.filter(|c| c.is_finite() && *c > 0.0)?;
    let arrivals = input
        .signals
        .arrivals
        .filter(|a| a.is_finite() && *a >= 0.0)?;
    let base = f64::from(input.ready.max(1));
    let backlog = input.signals.queue_per_replica.unwrap_or(0.0).max(0.0) * base;
    let demand = arrivals + backlog / BACKLOG_DRAIN_SECONDS;
    let per_replica = capacity * TARGET_UTILIZATION;
    Some((
        demand,
        per_replica,
        ((demand / per_replica).ceil() as i32).max(1),
    ))
}

/// One evaluation's input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Input {
    /// Now, seconds (any monotonic origin).
    pub now: f64,
    /// Replicas currently desired (status.desiredReplicas).
    pub current: i32,
    /// Ready replicas.
    pub ready: i32,
    /// Observations.
    pub signals: Signals,
    /// Targets.
    pub targets: Targets,
    /// Policy.
    pub policy: Policy,
}

/// Why the count is what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// More replicas.
    ScaleUp,
    /// Fewer replicas.
    ScaleDown,
    /// Within tolerance.
    Hold,
    /// A change was wanted but the rate limit allowed less.
    RateLimited,
    /// A scale-down is waiting for the stabilization window.
    Stabilizing,
    /// Clamped to minReplicas or maxReplicas.
    Bounds,
    /// Idle long enough: zero replicas.
    ScaleToZero,
    /// Requests arrived for a Model at zero.
    ScaleFromZero,
    /// No signal could be read: hold.
    NoData,
}

impl Reason {
    /// CamelCase name for status and Events.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ScaleUp => "ScaleUp",
            Self::ScaleDown => "ScaleDown",
            Self::Hold => "Hold",
            Self::RateLimited => "RateLimited",
            Self::Stabilizing => "Stabilizing",
            Self::Bounds => "Bounds",
            Self::ScaleToZero => "ScaleToZero",
            Self::ScaleFromZero => "ScaleFromZero",
            Self::NoData => "NoData",
        }
    }
}

/// One signal's view.
#[derive(Debug, Clone, PartialEq)]
pub struct SignalView {
    /// Name as in spec.sla.
    pub name: &'static str,
    /// Observed.
    pub observed: f64,
    /// Target.
    pub target: f64,
    /// observed / target.
    pub ratio: f64,
    /// Replicas this signal asks for.
    pub wants: i32,
}

/// The decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Replicas to run.
    pub desired: i32,
    /// Why.
    pub reason: Reason,
    /// The deciding signal (or "idle", "bounds", "none").
    pub signal: String,
    /// For people.
    pub message: String,
    /// Each signal's view.
    pub signals: Vec<SignalView>,
}

fn views(input: &Input, state: &State) -> Vec<SignalView> {
    let base = input.ready.max(1);
    let needed = throughput_needed(input, state);
    let tol = input.policy.tolerance;
    let mut s = input.signals;
    // No request in the window (known, not unknown): latency is no constraint.
    if s.rps == Some(0.0) {
        s.ttft = s.ttft.or(Some(0.0));
        s.itl = s.itl.or(Some(0.0));
        s.e2e = s.e2e.or(Some(0.0));
    }
    let t = input.targets;
    let mut out = Vec::new();
    for (name, observed, target) in [
        ("timeToFirstToken", s.ttft, t.ttft),
        ("interTokenLatency", s.itl, t.itl),
        ("endToEndLatency", s.e2e, t.e2e),
        (
            "queueDepthPerReplica",
            s.queue_per_replica,
            t.queue_per_replica,
        ),
    ] {
        let (Some(observed), Some(target)) = (observed, target) else {
            continue;
        };
        if !(observed.is_finite() && target > 0.0) {
            continue;
        }
        let ratio = observed / target;
        let wants = if ratio > 1.0 + tol {
            match needed {
                // Latency and queue say "more"; with a learned capacity the
                // throughput says how many. Latency that is over target
                // because of a backlog being drained would otherwise keep
                // asking for more long after capacity caught up.
                Some((_, _, n)) if name != "interTokenLatency" => n.max(base),
                _ => ((f64::from(base) * ratio).ceil() as i32).max(base + 1),
            }
        } else if ratio < 1.0 - tol {
            // What the load needs at this ratio, never below one replica.
            ((f64::from(base) * ratio).ceil() as i32).max(1)
        } else {
            base
        };
        out.push(SignalView {
            name,
            observed,
            target,
            ratio,
            wants,
        });
    }
    if let Some((demand, per_replica, n)) = needed {
        let ratio = demand / (per_replica * f64::from(base));
        let wants = if (ratio - 1.0).abs() <= tol { base } else { n };
        out.push(SignalView {
            name: "throughput",
            observed: demand,
            target: per_replica * f64::from(base),
            ratio,
            wants,
        });
    }
    out
}

/// Evaluates once and updates `state`.
pub fn decide(input: &Input, state: &mut State) -> Decision {
    let p = input.policy;
    let now = input.now;
    state.since.get_or_insert(now);
    if input.signals.rps.is_some_and(|r| r > 0.0)
        || input.signals.queue_per_replica.is_some_and(|q| q > 0.0)
    {
        state.last_request = Some(now);
    }
    learn(input, state);
    let signals = views(input, state);
    let needed = throughput_needed(input, state).map(|(_, _, n)| n);
    let current = input.current;

    // Scale to zero and back.
    if let Some(idle) = p.idle_to_zero
        && p.min == 0
    {
        let quiet_since = state.last_request.or(state.since).unwrap_or(now);
        // Not while replicas are still starting (a woken Model's first
        // replica may take longer than the idle window to load).
        if current > 0 && input.ready >= current && now - quiet_since >= idle {
            state.history.clear();
            return Decision {
                desired: 0,
                reason: Reason::ScaleToZero,
                signal: "idle".into(),
                message: format!(
                    "no requests for {:.0}s (idle window {idle:.0}s): scaling to zero",
                    now - quiet_since
                ),
                signals,
            };
        }
        if current == 0 {
            let woke = state.last_request.is_some_and(|t| now - t < idle);
            let desired = i32::from(woke).max(p.min).min(p.max);
            return Decision {
                desired,
                reason: if woke {
                    Reason::ScaleFromZero
                } else {
                    Reason::Hold
                },
                signal: "idle".into(),
                message: if woke {
                    "requests arrived: starting one replica".into()
                } else {
                    "idle at zero".into()
                },
                signals,
            };
        }
    }

    let Some(decider) = signals
        .iter()
        .max_by(|a, b| a.wants.cmp(&b.wants).then(a.ratio.total_cmp(&b.ratio)))
    else {
        let desired = current.clamp(p.min, p.max.max(p.min));
        return Decision {
            desired,
            reason: if desired == current {
                Reason::NoData
            } else {
                Reason::Bounds
            },
            signal: "none".into(),
            message: "no SLA signal could be read (no ready replica or no traffic yet): holding"
                .into(),
            signals,
        };
    };
    let raw = decider.wants;
    // History for stabilization. With a learned capacity it records what the
    // arrival rate alone needs: replicas added to drain a backlog are let go
    // once it is drained, while a demand that comes and goes still holds
    // its replicas for the window.
    let steady = throughput_needed(
        &Input {
            signals: Signals {
                queue_per_replica: None,
                ..input.signals
            },
            ..*input
        },
        state,
    )
    .map(|(_, _, n)| n);
    state
        .history
        .push_back((now, raw, steady.map_or(raw, |s| raw.min(s))));
    let keep = p.down_window.max(p.up_window);
    while state.history.front().is_some_and(|(t, ..)| now - t > keep) {
        state.history.pop_front();
    }
    let in_window = |w: f64, for_down: bool| {
        state
            .history
            .iter()
            .filter(move |(t, ..)| now - t <= w)
            .map(move |(_, r, d)| if for_down { *d } else { *r })
    };

    let (mut desired, mut reason) = if raw > current && input.ready < current {
        // Replicas are still starting: their capacity is on its way and the
        // backlog they will drain inflates latency meanwhile; asking for more
        // now would over-react. Decide again once they are ready, unless the
        // measured demand needs more than is already on its way.
        match needed {
            Some(n) if n > current => (n.min(raw), Reason::ScaleUp),
            _ => (current, Reason::Stabilizing),
        }
    } else if raw > current {
        // Up: the lowest recommendation in the up window (0 = now).
        let stable = in_window(p.up_window, false).min().unwrap_or(raw);
        if stable > current {
            (stable, Reason::ScaleUp)
        } else {
            (current, Reason::Stabilizing)
        }
    } else if raw < current {
        // Down: the highest recommendation in the down window, and only once
        // the window has been observed whole.
        let observed_for = now - state.since.unwrap_or(now);
        let stable = in_window(p.down_window, true).max().unwrap_or(current);
        // Never while a signal is over target: a backlog is still draining.
        let over = signals.iter().any(|v| v.ratio > 1.0 + p.tolerance);
        if observed_for + 1e-9 < p.down_window || stable >= current || over {
            (current, Reason::Stabilizing)
        } else {
            (stable, Reason::ScaleDown)
        }
    } else {
        (current, Reason::Hold)
    };

    // Rate limits.
    if desired > current {
        let cap = current.max(1) + p.up.max_change(current.max(1));
        if desired > cap {
            desired = cap;
            reason = Reason::RateLimited;
        }
    } else if desired < current {
        let floor = current - p.down.max_change(current);
        if desired < floor {
            desired = floor;
        }
    }
    // Bounds.
    // A running Model keeps one replica unless it may scale to zero (idle path above).
    let lower = if p.idle_to_zero.is_some() {
        p.min
    } else {
        p.min.max(1)
    };
    let bounded = desired.clamp(lower, p.max.max(lower));
    if bounded != desired {
        desired = bounded;
        reason = Reason::Bounds;
    }
    if desired == current && reason == Reason::ScaleDown {
        reason = Reason::Hold;
    }

    let unit = |name: &str, v: f64| {
        if name == "queueDepthPerReplica" {
            format!("{v:.1}")
        } else if name == "throughput" {
            format!("{v:.2}req/s")
        } else {
            format!("{:.0}ms", v * 1000.0)
        }
    };
    let mut message = format!(
        "{} {} vs target {} (x{:.2}) over {} ready: {} -> {} replicas ({})",
        decider.name,
        unit(decider.name, decider.observed),
        unit(decider.name, decider.target),
        decider.ratio,
        input.ready,
        current,
        desired,
        reason.as_str()
    );
    if decider.name != "throughput"
        && let Some((demand, per_replica, n)) = throughput_needed(input, state)
    {
        message.push_str(&format!(
            "; demand {demand:.2} req/s at {per_replica:.2} req/s per replica needs {n}"
        ));
    }
    Decision {
        desired,
        reason,
        signal: decider.name.to_string(),
        message,
        signals,
    }
}

/// Parses the CRD's duration strings for the policy (seconds).
pub fn seconds(s: Option<&str>, default: f64) -> f64 {
    s.and_then(crate::duration::parse)
        .map_or(default, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            min: 1,
            max: 10,
            tolerance: 0.1,
            up: Limit {
                replicas: Some(4),
                percent: Some(100),
            },
            down: Limit {
                replicas: Some(1),
                percent: None,
            },
            up_window: 0.0,
            down_window: 300.0,
            idle_to_zero: None,
        }
    }

    fn targets() -> Targets {
        Targets {
            ttft: Some(0.5),
            itl: Some(0.05),
            e2e: None,
            queue_per_replica: Some(8.0),
        }
    }

    fn input(now: f64, current: i32, ready: i32, ttft: f64, itl: f64, queue: f64) -> Input {
        Input {
            now,
            current,
            ready,
            signals: Signals {
                ttft: Some(ttft),
                itl: Some(itl),
                e2e: None,
                queue_per_replica: Some(queue),
                rps: Some(5.0),
                ..Signals::default()
            },
            targets: targets(),
            policy: policy(),
        }
    }

    #[test]
    fn table() {
        struct Case {
            name: &'static str,
            input: Input,
            expect: (i32, Reason, &'static str),
        }
        let cases = [
            Case {
                name: "within tolerance holds",
                input: input(0.0, 2, 2, 0.52, 0.04, 2.0),
                expect: (2, Reason::Hold, "timeToFirstToken"),
            },
            Case {
                name: "TTFT 2x over target doubles",
                input: input(0.0, 2, 2, 1.0, 0.04, 2.0),
                expect: (4, Reason::ScaleUp, "timeToFirstToken"),
            },
            Case {
                name: "the worst signal decides",
                input: input(0.0, 2, 2, 0.6, 0.15, 2.0),
                expect: (6, Reason::ScaleUp, "interTokenLatency"),
            },
            Case {
                name: "queue is a leading signal",
                input: input(0.0, 2, 2, 0.3, 0.03, 24.0),
                expect: (6, Reason::ScaleUp, "queueDepthPerReplica"),
            },
            Case {
                name: "slightly over asks for at least one more",
                input: input(0.0, 3, 3, 0.58, 0.04, 2.0),
                expect: (4, Reason::ScaleUp, "timeToFirstToken"),
            },
            Case {
                name: "pending replicas are not asked for twice",
                input: input(0.0, 4, 2, 1.0, 0.04, 2.0),
                expect: (4, Reason::Hold, "timeToFirstToken"),
            },
            Case {
                name: "while replicas start, no further scale-up",
                input: input(0.0, 4, 2, 3.0, 0.04, 2.0),
                expect: (4, Reason::Stabilizing, "timeToFirstToken"),
            },
            Case {
                name: "rate limit: +max(4, 100 %) per evaluation",
                input: input(0.0, 2, 2, 5.0, 0.04, 2.0),
                expect: (6, Reason::RateLimited, "timeToFirstToken"),
            },
            Case {
                name: "max bound",
                input: input(0.0, 8, 8, 2.0, 0.04, 2.0),
                expect: (10, Reason::Bounds, "timeToFirstToken"),
            },
            Case {
                name: "below target waits for the window first",
                input: input(0.0, 4, 4, 0.1, 0.01, 0.0),
                expect: (4, Reason::Stabilizing, "timeToFirstToken"),
            },
        ];
        for c in cases {
            let mut st = State::default();
            let d = decide(&c.input, &mut st);
            assert_eq!(
                (d.desired, d.reason, d.signal.as_str()),
                c.expect,
                "{}: {}",
                c.name,
                d.message
            );
        }
    }

    /// Saturated input: a queue of `queue` per replica, `throughput` req/s
    /// completed and `arrivals` req/s arriving.
    fn loaded(
        now: f64,
        current: i32,
        ready: i32,
        ttft: f64,
        queue: f64,
        throughput: f64,
        arrivals: f64,
    ) -> Input {
        let mut i = input(now, current, ready, ttft, 0.03, queue);
        i.signals.throughput = Some(throughput);
        i.signals.arrivals = Some(arrivals);
        i.policy.max = 40;
        i
    }

    #[test]
    fn capacity_is_learned_only_while_saturated_and_steady() {
        let mut st = State::default();
        // First evaluation: nothing to compare the ready count with.
        decide(&loaded(0.0, 2, 2, 0.3, 4.0, 8.0, 8.0), &mut st);
        assert_eq!(st.capacity, None);
        // Unsaturated (no queue): no estimate.
        decide(&loaded(15.0, 2, 2, 0.3, 0.0, 5.0, 5.0), &mut st);
        assert_eq!(st.capacity, None);
        // Saturated with the same ready count: 8 req/s over 2 replicas.
        decide(&loaded(30.0, 2, 2, 0.3, 4.0, 8.0, 8.0), &mut st);
        assert_eq!(st.capacity, Some(4.0));
        // Smoothed towards a new saturated reading.
        decide(&loaded(45.0, 2, 2, 0.3, 4.0, 6.0, 6.0), &mut st);
        assert_eq!(st.capacity, Some(3.5));
        // The ready count changed during the interval: not a clean reading.
        decide(&loaded(60.0, 2, 3, 0.3, 4.0, 3.0, 3.0), &mut st);
        assert_eq!(st.capacity, Some(3.5));
        // Unsaturated but completing more than the estimate: raised.
        decide(&loaded(75.0, 3, 3, 0.3, 0.0, 12.0, 12.0), &mut st);
        assert_eq!(st.capacity, Some(4.0));
    }

    #[test]
    fn throughput_sizes_a_scale_up_instead_of_the_latency_ratio() {
        // 2 replicas of 4 req/s, arrivals jump to 24 req/s: TTFT is 20x its
        // target. The latency ratio alone would ask for 40 (capped by the
        // rate limit); the demand needs ceil((24 + 2*10/60) / (4*0.85)) = 8.
        let mut st = State {
            capacity: Some(4.0),
            ..State::default()
        };
        let d = decide(&loaded(0.0, 2, 2, 10.0, 10.0, 8.0, 24.0), &mut st);
        assert_eq!(d.desired, 6, "rate limited from 8: {}", d.message);
        assert_eq!(d.reason, Reason::RateLimited);
        assert!(d.message.contains("needs 8"), "{}", d.message);
        // While those start, demand that needs more than is on its way still
        // scales up, to the demand and no further.
        let d = decide(&loaded(15.0, 6, 2, 30.0, 40.0, 8.0, 24.0), &mut st);
        let needed = ((24.0 + 80.0 / BACKLOG_DRAIN_SECONDS) / (3.4_f64)).ceil() as i32;
        assert!(needed > 6);
        assert_eq!(d.desired, needed, "{}", d.message);
        assert_eq!(d.reason, Reason::ScaleUp);
        // Once ready, latency still over target from the backlog being
        // drained does not add more than the demand needs.
        let d = decide(
            &loaded(75.0, needed, needed, 30.0, 0.0, 24.0, 24.0),
            &mut st,
        );
        assert_eq!(d.desired, needed, "{}", d.message);
        // Without a learned capacity the ratio decides, as before.
        let mut fresh = State::default();
        let d = decide(&loaded(0.0, 2, 2, 10.0, 10.0, 8.0, 20.0), &mut fresh);
        assert_eq!(d.desired, 6);
        assert_eq!(d.signal, "timeToFirstToken");
    }

    #[test]
    fn demand_alone_leads_and_backlog_replicas_are_let_go() {
        let mut st = State {
            capacity: Some(4.0),
            ..State::default()
        };
        // Latency still fine, but arrivals exceed what 2 replicas serve at
        // 85 %: the throughput signal scales up before latency suffers.
        let d = decide(&loaded(0.0, 2, 2, 0.2, 0.0, 7.0, 9.0), &mut st);
        assert_eq!(
            (d.desired, d.signal.as_str()),
            (3, "throughput"),
            "{}",
            d.message
        );
        // A backlog asks for drain capacity: 3 replicas, 120 waiting each.
        let d = decide(&loaded(15.0, 3, 3, 5.0, 120.0, 12.0, 9.0), &mut st);
        let drain = ((9.0 + 360.0 / BACKLOG_DRAIN_SECONDS) / 3.4_f64).ceil() as i32;
        assert!(drain > 3);
        assert_eq!(d.desired, drain, "{}", d.message);
        // Never down while a signal is over target (the backlog drains).
        let d = decide(&loaded(400.0, drain, drain, 5.0, 0.0, 9.0, 9.0), &mut st);
        assert_eq!(d.desired, drain, "{}", d.message);
        // Once latency recovers, the window holds what the arrivals needed
        // (3), not the drain capacity, so it scales down to 3.
        let mut desired = drain;
        for t in (415..=700).step_by(15) {
            let d = decide(
                &loaded(f64::from(t), desired, desired, 0.2, 0.0, 9.0, 9.0),
                &mut st,
            );
            desired = d.desired;
        }
        assert_eq!(desired, 3);
    }

    #[test]
    fn scale_down_after_the_window_one_step_and_not_below_what_load_needs() {
        let mut st = State::default();
        // Comfortable for 300 s at 4 replicas: ratio 0.4 => load needs 2.
        let mut last = None;
        for t in (0..=300).step_by(15) {
            last = Some(decide(&input(f64::from(t), 4, 4, 0.2, 0.02, 0.0), &mut st));
            if t < 300 {
                assert_eq!(last.as_ref().map(|d| d.desired), Some(4), "t={t}");
            }
        }
        let d = last.expect("decision");
        assert_eq!(
            (d.desired, d.reason),
            (3, Reason::ScaleDown),
            "{}",
            d.message
        );
        // Next step goes to 2 and stops there.
        let d = decide(&input(315.0, 3, 3, 0.2 * 4.0 / 3.0, 0.02, 0.0), &mut st);
        assert!(d.desired >= 2, "{}", d.message);
    }

    #[test]
    fn a_spike_inside_the_window_blocks_scale_down() {
        let mut st = State::default();
        for t in (0..300).step_by(15) {
            let ttft = if t == 150 { 0.6 } else { 0.2 };
            decide(&input(f64::from(t), 4, 4, ttft, 0.02, 0.0), &mut st);
        }
        let d = decide(&input(300.0, 4, 4, 0.2, 0.02, 0.0), &mut st);
        assert_eq!(
            d.desired, 4,
            "the recommendation of 5 at t=150 is still in the window: {}",
            d.message
        );
    }

    #[test]
    fn no_data_holds_and_restarts_do_not_flap() {
        let mut st = State::default();
        let mut i = input(0.0, 3, 3, 0.2, 0.02, 0.0);
        i.signals = Signals::default();
        let d = decide(&i, &mut st);
        assert_eq!((d.desired, d.reason), (3, Reason::NoData));
        // A fresh state (operator restart) with low load: no immediate dip.
        let mut fresh = State::default();
        let d = decide(&input(10_000.0, 3, 3, 0.1, 0.01, 0.0), &mut fresh);
        assert_eq!((d.desired, d.reason), (3, Reason::Stabilizing));
    }

    #[test]
    fn no_traffic_counts_as_comfortable_not_unknown() {
        let mut st = State::default();
        let mut i = input(0.0, 3, 3, 0.2, 0.02, 0.0);
        i.signals = Signals {
            rps: Some(0.0),
            ..Signals::default()
        };
        let mut d = decide(&i, &mut st);
        assert_eq!(d.reason, Reason::Stabilizing, "{}", d.message);
        i.now = 301.0;
        d = decide(&i, &mut st);
        assert_eq!(
            (d.desired, d.reason),
            (2, Reason::ScaleDown),
            "{}",
            d.message
        );
    }

    #[test]
    fn scale_to_zero_and_back() {
        let mut p = policy();
        p.min = 0;
        p.idle_to_zero = Some(600.0);
        let mut st = State::default();
        let mut i = input(0.0, 1, 1, 0.2, 0.02, 0.0);
        i.policy = p;
        i.signals.rps = Some(0.0);
        assert_eq!(decide(&i, &mut st).desired, 1);
        i.now = 601.0;
        let d = decide(&i, &mut st);
        assert_eq!((d.desired, d.reason), (0, Reason::ScaleToZero));
        i.current = 0;
        i.ready = 0;
        i.now = 700.0;
        i.signals = Signals {
            queue_per_replica: Some(3.0),
            ..Signals::default()
        };
        let d = decide(&i, &mut st);
        assert_eq!((d.desired, d.reason), (1, Reason::ScaleFromZero));
    }
}
