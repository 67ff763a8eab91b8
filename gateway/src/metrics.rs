//! The gateway's Prometheus metrics (`strata_gateway_` prefix, base units).

use prometheus::{
    HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Registry,
    register_histogram_vec_with_registry, register_int_counter_vec_with_registry,
    register_int_counter_with_registry, register_int_gauge_vec_with_registry,
};

/// The gateway's metrics.
#[derive(Clone)]
pub struct Metrics {
    /// The registry /metrics serves.
    pub registry: Registry,
    /// Requests by Model (`namespace/name`, empty when none was found),
    /// reason (how the replica was picked, or why the request was refused)
    /// and status code.
    pub requests: IntCounterVec,
    /// From the request's arrival to the end of the answer's body, by Model.
    pub duration: HistogramVec,
    /// Requests forwarded and not yet finished, by Model.
    pub in_flight: IntGaugeVec,
    /// Attempts tried again on another replica, by Model.
    pub retries: IntCounterVec,
    /// Wake requests (PATCHes of the wake annotation) sent.
    pub wakes: IntCounter,
}

impl Metrics {
    /// Registers every metric in a new registry.
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let r = &registry;
        let requests = register_int_counter_vec_with_registry!(
            "strata_gateway_requests_total",
            "Requests by Model, reason (prefix, spilled_over, least_loaded, or why refused) and status code.",
            &["model", "reason", "code"],
            r
        )?;
        let duration = register_histogram_vec_with_registry!(
            "strata_gateway_request_duration_seconds",
            "From a request's arrival to the end of its answer's body, by Model.",
            &["model"],
            prometheus::exponential_buckets(0.005, 2.5, 14)?,
            r
        )?;
        let in_flight = register_int_gauge_vec_with_registry!(
            "strata_gateway_in_flight",
            "Requests forwarded to a replica whose answer has not ended, by Model.",
            &["model"],
            r
        )?;
        let retries = register_int_counter_vec_with_registry!(
            "strata_gateway_retries_total",
            "Attempts tried again on another replica before any byte reached the client, by Model.",
            &["model"],
            r
        )?;
        let wakes = register_int_counter_with_registry!(
            "strata_gateway_wakes_total",
            "Times the gateway asked for a replica of a Model at zero (the wake annotation).",
            r
        )?;
        Ok(Self {
            registry,
            requests,
            duration,
            in_flight,
            retries,
            wakes,
        })
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) =
            prometheus::TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out)
        {
            tracing::warn!("rendering metrics: {e}");
        }
        out
    }
}
