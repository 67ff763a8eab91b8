//! Prometheus metrics of the operator (`strata_` prefix, base units).

use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// The operator's metrics.
#[derive(Clone)]
pub struct Metrics {
    /// The registry /metrics serves.
    pub registry: Registry,
    /// Reconciles by controller and result (success, error).
    pub reconciles: IntCounterVec,
    /// Reconcile duration by controller.
    pub reconcile_duration: HistogramVec,
    /// Reconcile errors by controller and category.
    pub errors: IntCounterVec,
    /// Reconciles running now, by controller.
    pub in_flight: IntGaugeVec,
    /// Objects whose latest generation has not been reconciled yet, by controller.
    pub queue_depth: IntGaugeVec,
    /// Replica pods created, by pool.
    pub placements: IntCounterVec,
    /// Replica pods deleted, by reason.
    pub deletions: IntCounterVec,
    /// Replicas that fit nowhere, by Model.
    pub unplaceable: IntGaugeVec,
    /// 1 while this instance holds the leader Lease.
    pub leader: IntGauge,
    /// Autoscaler evaluations by reason.
    pub autoscaler_decisions: IntCounterVec,
    /// Replicas the autoscaler wants, by Model.
    pub desired_replicas: IntGaugeVec,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new(
                "strata_reconcile_total",
                "Reconciles by controller and result.",
            ),
            &["controller", "result"],
        )?;
        let reconcile_duration = HistogramVec::new(
            HistogramOpts::new("strata_reconcile_duration_seconds", "Reconcile duration.").buckets(
                vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ],
            ),
            &["controller"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "strata_reconcile_errors_total",
                "Reconcile errors by controller and category.",
            ),
            &["controller", "category"],
        )?;
        let in_flight = IntGaugeVec::new(
            Opts::new("strata_reconcile_in_flight", "Reconciles running now."),
            &["controller"],
        )?;
        let queue_depth = IntGaugeVec::new(
            Opts::new(
                "strata_reconcile_queue_depth",
                "Objects whose latest spec generation no reconcile has handled yet (the work backlog).",
            ),
            &["controller"],
        )?;
        let placements = IntCounterVec::new(
            Opts::new(
                "strata_replica_placements_total",
                "Replica pods created, by pool.",
            ),
            &["pool"],
        )?;
        let deletions = IntCounterVec::new(
            Opts::new(
                "strata_replica_deletions_total",
                "Replica pods deleted, by reason.",
            ),
            &["reason"],
        )?;
        let unplaceable = IntGaugeVec::new(
            Opts::new(
                "strata_model_unplaceable_replicas",
                "Replicas of a Model that no pool can take now.",
            ),
            &["namespace", "model"],
        )?;
        let leader = IntGauge::new(
            "strata_leader",
            "1 while this instance holds the leader Lease.",
        )?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(queue_depth.clone()))?;
        registry.register(Box::new(placements.clone()))?;
        registry.register(Box::new(deletions.clone()))?;
        registry.register(Box::new(unplaceable.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        let autoscaler_decisions = IntCounterVec::new(
            Opts::new(
                "strata_autoscaler_decisions_total",
                "SLA autoscaler evaluations by reason.",
            ),
            &["reason"],
        )?;
        let desired_replicas = IntGaugeVec::new(
            Opts::new(
                "strata_model_desired_replicas",
                "Replicas the operator converges each Model to.",
            ),
            &["namespace", "model"],
        )?;
        registry.register(Box::new(autoscaler_decisions.clone()))?;
        registry.register(Box::new(desired_replicas.clone()))?;
        Ok(Self {
            registry,
            reconciles,
            reconcile_duration,
            errors,
            in_flight,
            queue_depth,
            placements,
            deletions,
            unplaceable,
            leader,
            autoscaler_decisions,
            desired_replicas,
        })
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let encoder = prometheus::TextEncoder::new();
        encoder
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_follow_prometheus_naming() {
        let m = Metrics::new().expect("metrics");
        m.reconciles.with_label_values(&["model", "success"]).inc();
        m.reconcile_duration
            .with_label_values(&["model"])
            .observe(0.01);
        m.errors.with_label_values(&["model", "api"]).inc();
        m.placements.with_label_values(&["h100"]).inc();
        m.deletions.with_label_values(&["Replaced"]).inc();
        m.in_flight.with_label_values(&["model"]).set(0);
        m.queue_depth.with_label_values(&["model"]).set(0);
        m.unplaceable.with_label_values(&["ns", "m"]).set(0);
        let text = m.render();
        for name in [
            "strata_reconcile_total",
            "strata_reconcile_duration_seconds_bucket",
            "strata_reconcile_errors_total",
            "strata_replica_placements_total",
            "strata_leader",
        ] {
            assert!(text.contains(name), "{name} missing");
        }
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("strata_"), "{line}");
        }
    }
}
