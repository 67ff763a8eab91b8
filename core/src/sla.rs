//! The SLA autoscaler's edges: its inputs from a Model's spec (policy,
//! targets, interval, window, percentile; replicas when not autoscaled) and
//! its outputs as status (`status.sla`, `status.lastScaleDecision`). The
//! decision itself is [`crate::autoscale`].

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use strata_crds::model::{
    AutoscalingMode, Model, ModelSpec, ScaleDecision, SignalStatus, SlaStatus,
};

use crate::autoscale::{Decision, Input, Limit, Policy, Reason, Targets};
use crate::collect;

/// Replicas from the spec: spec.replicas (written by people, `kubectl
/// scale`, HPA or KEDA), else minReplicas, within the bounds. Manual and
/// External modes run this; in SLA mode it is only the autoscaler's starting
/// point when status has no desiredReplicas yet.
pub fn desired_replicas(spec: &ModelSpec) -> i32 {
    let min = spec.min_replicas.max(0);
    let max = spec.max_replicas.max(min);
    let base = match spec.autoscaling.mode {
        AutoscalingMode::Manual | AutoscalingMode::External | AutoscalingMode::Sla => {
            spec.replicas.unwrap_or(min)
        }
    };
    base.clamp(min, max)
}

/// One evaluation's result.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// The decision.
    pub decision: Decision,
    /// The windowed signals.
    pub observed: collect::Observed,
    /// When.
    pub at: Time,
    /// Replicas before.
    pub from: i32,
    /// Arrivals per second over the last interval.
    pub arrivals: Option<f64>,
    /// The learned per-replica capacity.
    pub capacity: Option<f64>,
    /// Why there were no metrics (the Prometheus source failed), for status.
    pub error: Option<String>,
}

fn secs(d: &str) -> Option<f64> {
    crate::duration::parse(d).map(|d| d.as_secs_f64())
}

/// The decision's inputs from the Model spec.
pub fn policy_and_targets(model: &Model) -> (Policy, Targets, f64, f64, f64) {
    let spec = &model.spec;
    let a = &spec.autoscaling;
    let sla = spec.sla.clone().unwrap_or_default();
    let up = a.scale_up.clone().unwrap_or_default();
    let down = a.scale_down.clone().unwrap_or_default();
    let policy = Policy {
        min: spec.min_replicas,
        max: spec.max_replicas,
        tolerance: f64::from(a.tolerance_percent) / 100.0,
        up: Limit {
            replicas: up.max_replicas_per_interval.or(Some(4)),
            percent: up.max_percent_per_interval.or(Some(100)),
        },
        down: Limit {
            replicas: down.max_replicas_per_interval.or(Some(1)),
            percent: down.max_percent_per_interval,
        },
        up_window: up
            .stabilization_window
            .as_deref()
            .and_then(secs)
            .unwrap_or(0.0),
        down_window: down
            .stabilization_window
            .as_deref()
            .and_then(secs)
            .unwrap_or(300.0),
        idle_to_zero: a.scale_to_zero.as_ref().and_then(|z| secs(&z.idle_window)),
    };
    let targets = Targets {
        ttft: sla.time_to_first_token.as_deref().and_then(secs),
        itl: sla.inter_token_latency.as_deref().and_then(secs),
        e2e: sla.end_to_end_latency.as_deref().and_then(secs),
        queue_per_replica: sla.queue_depth_per_replica.map(f64::from),
    };
    let interval = secs(&a.interval).unwrap_or(15.0);
    let window = secs(&a.window).unwrap_or(60.0);
    (policy, targets, interval, window, sla.percentile / 100.0)
}

/// The decision while the metrics source fails: the current count (within
/// bounds). Not `decide` on empty signals, which would read an outage as
/// idleness and scale a Model with scaleToZero to zero.
pub fn hold(input: &Input, why: &str) -> Decision {
    let p = input.policy;
    let desired = input.current.clamp(p.min, p.max.max(p.min));
    Decision {
        desired,
        reason: if desired == input.current {
            Reason::NoData
        } else {
            Reason::Bounds
        },
        signal: "none".into(),
        message: format!("no metrics ({why}): holding"),
        signals: Vec::new(),
    }
}

/// The "decision" of an evaluation for a Model that Strata does not scale
/// (mode Manual or External): the current count, unchanged. Such a Model's
/// signals are still read every interval so that `status.sla` (the TTFT
/// column of `kubectl get models`) shows what its users get; nothing is
/// decided, recorded as a decision, or published as an Event.
pub fn observe_only(input: &Input, mode: &AutoscalingMode) -> Decision {
    let who = match mode {
        AutoscalingMode::External => "HPA or KEDA (mode External) scale",
        AutoscalingMode::Manual => "spec.replicas (mode Manual) sets",
        AutoscalingMode::Sla => "the SLA autoscaler sets",
    };
    Decision {
        desired: input.current,
        reason: Reason::Hold,
        signal: "none".into(),
        message: format!("signals observed, not acted on: {who} the replicas"),
        signals: Vec::new(),
    }
}

fn fmt_secs(v: f64) -> String {
    if v < 1.0 {
        format!("{:.0}ms", v * 1000.0)
    } else {
        format!("{v:.2}s")
    }
}

/// status.sla from the last evaluation.
pub fn sla_status(model: &Model, e: &Evaluation) -> SlaStatus {
    let sla = model.spec.sla.clone().unwrap_or_default();
    let sig = |observed: Option<f64>, target: Option<&String>, t: Option<f64>, latency: bool| {
        (observed.is_some() || target.is_some()).then(|| SignalStatus {
            observed: observed.map(|v| {
                if latency {
                    fmt_secs(v)
                } else {
                    format!("{v:.1}")
                }
            }),
            target: target.cloned(),
            ratio: match (observed, t) {
                (Some(o), Some(t)) if t > 0.0 => Some((o / t * 100.0).round() / 100.0),
                _ => None,
            },
        })
    };
    let (_, targets, ..) = policy_and_targets(model);
    let queue_target = sla.queue_depth_per_replica.map(|q| q.to_string());
    SlaStatus {
        time_to_first_token: sig(
            e.observed.ttft,
            sla.time_to_first_token.as_ref(),
            targets.ttft,
            true,
        ),
        inter_token_latency: sig(
            e.observed.itl,
            sla.inter_token_latency.as_ref(),
            targets.itl,
            true,
        ),
        end_to_end_latency: sig(
            e.observed.e2e,
            sla.end_to_end_latency.as_ref(),
            targets.e2e,
            true,
        ),
        queue_depth_per_replica: sig(
            e.observed.queue_per_replica,
            queue_target.as_ref(),
            targets.queue_per_replica,
            false,
        ),
        requests_per_second: e.observed.rps.map(|v| (v * 100.0).round() / 100.0),
        tokens_per_second: e
            .observed
            .tokens_per_second
            .map(|v| (v * 10.0).round() / 10.0),
        arrivals_per_second: e.arrivals.map(|v| (v * 100.0).round() / 100.0),
        kv_cache_usage: e.observed.kv_cache.map(|v| (v * 1000.0).round() / 1000.0),
        replica_capacity: e.capacity.map(|v| (v * 1000.0).round() / 1000.0),
        metrics_error: e.error.clone(),
        observed_at: Some(e.at.clone()),
    }
}

/// How old `status.sla.observedAt` may grow while the values stay the same.
pub const OBSERVED_AT_REFRESH: std::time::Duration = std::time::Duration::from_secs(300);

/// An evaluation that found the same values as the cached status keeps the
/// cached `observedAt` (so that the status, and a write, need not change
/// every autoscaling interval at rest), unless it is older than `refresh`:
/// `observedAt` is then when the values last changed, and at most
/// `refresh` old while the autoscaler runs. Pure.
pub fn unchanged_keeps_time(
    next: SlaStatus,
    cached: Option<&SlaStatus>,
    refresh: std::time::Duration,
) -> SlaStatus {
    let Some(cached) = cached else { return next };
    let (Some(now), Some(then)) = (next.observed_at.as_ref(), cached.observed_at.as_ref()) else {
        return next;
    };
    let age = now.0.as_second().saturating_sub(then.0.as_second());
    let same = SlaStatus {
        observed_at: None,
        ..cached.clone()
    } == SlaStatus {
        observed_at: None,
        ..next.clone()
    };
    if same && age >= 0 && (age as u64) < refresh.as_secs() {
        SlaStatus {
            observed_at: cached.observed_at.clone(),
            ..next
        }
    } else {
        next
    }
}

/// status.lastScaleDecision from an evaluation that changed the count.
pub fn decision_status(e: &Evaluation) -> ScaleDecision {
    ScaleDecision {
        time: e.at.clone(),
        from_replicas: e.from,
        to_replicas: e.decision.desired,
        signal: e.decision.signal.clone(),
        reason: e.decision.reason.as_str().to_string(),
        message: e.decision.message.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Model {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../samples/model-llama.yaml"
        ))
        .expect("sample");
        serde_json::from_value(strata_crds::validation::yaml_to_json(&text).expect("yaml"))
            .expect("model")
    }

    #[test]
    fn the_same_values_keep_their_time_for_a_while() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        let at = |s: i64| {
            Some(Time(
                k8s_openapi::jiff::Timestamp::from_second(s).expect("time"),
            ))
        };
        let status = |rps: f64, t: i64| SlaStatus {
            requests_per_second: Some(rps),
            observed_at: at(t),
            ..SlaStatus::default()
        };
        let refresh = std::time::Duration::from_secs(300);
        let cached = status(1.0, 1000);
        // Same values 15 s later: the cached time stays (nothing to write).
        assert_eq!(
            unchanged_keeps_time(status(1.0, 1015), Some(&cached), refresh),
            cached
        );
        // Changed values, or the time too old: the new one.
        assert_eq!(
            unchanged_keeps_time(status(2.0, 1015), Some(&cached), refresh),
            status(2.0, 1015)
        );
        assert_eq!(
            unchanged_keeps_time(status(1.0, 1300), Some(&cached), refresh),
            status(1.0, 1300)
        );
        assert_eq!(
            unchanged_keeps_time(status(1.0, 1015), None, refresh),
            status(1.0, 1015)
        );
    }

    #[test]
    fn desired_replicas_follow_spec_within_bounds() {
        let mut m = sample();
        assert_eq!(
            desired_replicas(&m.spec),
            1,
            "minReplicas when spec.replicas is unset"
        );
        m.spec.replicas = Some(3);
        assert_eq!(desired_replicas(&m.spec), 3);
        m.spec.replicas = Some(60);
        assert_eq!(desired_replicas(&m.spec), 6, "clamped to maxReplicas");
    }

    #[test]
    fn a_model_not_autoscaled_is_observed_and_keeps_its_count() {
        let mut m = sample();
        m.spec.autoscaling.mode = AutoscalingMode::Manual;
        let (policy, targets, ..) = policy_and_targets(&m);
        // Far over target: an SLA Model would scale up; this one does not.
        let input = Input {
            now: 0.0,
            current: 2,
            ready: 2,
            signals: crate::autoscale::Signals {
                ttft: Some(2.0),
                rps: Some(5.0),
                ..Default::default()
            },
            targets,
            policy,
        };
        for (mode, words) in [
            (AutoscalingMode::Manual, "spec.replicas"),
            (AutoscalingMode::External, "HPA or KEDA"),
        ] {
            let d = observe_only(&input, &mode);
            assert_eq!((d.desired, d.reason), (2, Reason::Hold), "{mode:?}");
            assert!(d.message.contains(words), "{}", d.message);
        }
        // Its observed signals reach status.sla as in SLA mode.
        let e = Evaluation {
            decision: observe_only(&input, &AutoscalingMode::Manual),
            observed: collect::Observed {
                ttft: Some(0.8123),
                rps: Some(5.0),
                ..Default::default()
            },
            at: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
            from: 2,
            arrivals: Some(5.0),
            capacity: Some(3.0),
            error: None,
        };
        let s = sla_status(&m, &e);
        let ttft = s.time_to_first_token.expect("TTFT in status");
        assert_eq!(ttft.observed.as_deref(), Some("812ms"));
        assert_eq!(ttft.target.as_deref(), Some("500ms"));
        assert_eq!(ttft.ratio, Some(1.62));
        assert_eq!(
            s.replica_capacity,
            Some(3.0),
            "the learned capacity is kept"
        );
    }

    #[test]
    fn an_outage_holds_the_count_within_bounds() {
        let m = sample();
        let (policy, targets, ..) = policy_and_targets(&m);
        let input = Input {
            now: 0.0,
            current: 3,
            ready: 3,
            signals: crate::autoscale::Signals::default(),
            targets,
            policy,
        };
        let d = hold(&input, "prometheus: timeout");
        assert_eq!((d.desired, d.reason), (3, Reason::NoData));
        assert!(d.message.contains("prometheus: timeout"));
    }
}
