//! The SLA autoscaler's shell: scrape the ready replicas' sidecars (in
//! parallel, with timeouts, on pod IPs) and keep windows of snapshots, or
//! ask Prometheus (spec.autoscaling.metrics, [`super::prometheus`]); decide
//! (pure: strata_core::autoscale), and report the decision. Models in mode
//! Manual or External are observed the same way (their `status.sla`), but
//! nothing is decided for them.

use std::collections::HashMap;
use std::sync::{LazyLock, OnceLock};
use std::time::Instant;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use strata_core::autoscale::{self, Input, Signals};
use strata_core::collect::{self, PodSeries};
use strata_core::sla::{Evaluation, hold, observe_only, policy_and_targets};
use strata_crds::model::{AutoscalingMode, MetricsSourceType, Model, ScaleDecision};

use crate::sidecar_client::{SidecarClient, Target};

/// Per-Model memory of the autoscaler.
#[derive(Debug, Default)]
pub struct ModelScaler {
    state: autoscale::State,
    series: HashMap<String, PodSeries>,
    last_eval: Option<Instant>,
    /// The last evaluation's view, for status.
    pub last: Option<Evaluation>,
    /// The activator's last wake request acted on (annotation value).
    pub last_wake: Option<String>,
    /// The replicas this process decided last (status can lag behind).
    pub desired: Option<i32>,
    /// The last change this process decided, for status.
    pub last_decision: Option<ScaleDecision>,
}

impl ModelScaler {
    /// Forgets what the autoscaler decided and learned in this process (a
    /// Model that left SLA mode), keeping the metric windows: coming back
    /// to SLA mode starts from the status, not from an old decision, and
    /// with the signals already observed.
    pub fn forget_decisions(&mut self) {
        self.state = autoscale::State::default();
        self.desired = None;
        self.last_decision = None;
    }

    /// The activator asked for a replica (annotation value `at`, RFC 3339):
    /// evaluate at once, with a request seen now. Acts once per value, and
    /// only on a request younger than `max_age` seconds (an old annotation
    /// after an operator restart is not a request).
    pub fn wake(&mut self, at: &str, max_age: f64) -> bool {
        if self.last_wake.as_deref() == Some(at) {
            return false;
        }
        self.last_wake = Some(at.to_string());
        let Ok(t) = at.parse::<k8s_openapi::jiff::Timestamp>() else {
            return false;
        };
        let age = k8s_openapi::jiff::Timestamp::now()
            .duration_since(t)
            .as_secs_f64();
        if !(0.0..=max_age).contains(&age.max(0.0)) {
            return false;
        }
        self.last_eval = None;
        self.state.last_request = Some(EPOCH.elapsed().as_secs_f64());
        true
    }
}

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Reads a replica's `/metrics` over TLS (the Model's certificate from the
/// operator's CA), bounded in size and to 2 s; None when it does not answer.
pub(crate) async fn scrape(
    client: &SidecarClient,
    ip: &str,
    namespace: &str,
    model: &str,
) -> Option<String> {
    let target = Target::pod(ip, namespace, model).ok()?;
    match client.metrics(&target).await {
        Ok(text) => Some(text),
        Err(e) => {
            tracing::debug!(%model, %namespace, "scraping a replica: {e}");
            None
        }
    }
}

/// The sidecars' client for the autoscaler's scrapes: the Context's, set
/// once when the controllers start (until then nothing is scraped).
pub(crate) static CLIENT: OnceLock<SidecarClient> = OnceLock::new();

/// With spec.autoscaling.metrics type Prometheus: the window's and the last
/// interval's signals from Prometheus, or why there are none (logged; the
/// caller holds on empty signals). None: the sidecars are the source.
async fn from_prometheus(
    model: &Model,
    ready_pods: &[&Pod],
    window: f64,
    interval: f64,
    quantile: f64,
) -> Option<Result<(collect::Observed, collect::Observed), String>> {
    let source = model.spec.autoscaling.metrics.as_ref()?;
    if source.source_type != MetricsSourceType::Prometheus {
        return None;
    }
    let url = source.prometheus.as_ref()?.url.as_str();
    let ns = model.namespace().unwrap_or_default();
    let pods: Vec<String> = ready_pods.iter().map(|p| p.name_any()).collect();
    Some(
        match super::prometheus::observe(url, &ns, &pods, window, interval, quantile).await {
            Ok(r) => Ok(r.observed()),
            Err(e) => {
                tracing::warn!(model = %model.name_any(), namespace = %ns, url, error = %e,
                    "Prometheus metrics source failed; holding");
                Err(e.to_string())
            }
        },
    )
}

/// Runs an evaluation if the interval has passed; returns the desired
/// replicas (the current value between evaluations). A Model in mode
/// Manual or External is observed only: its signals are read and kept for
/// status, and the desired count stays `current`.
pub async fn evaluate(
    scaler: &mut ModelScaler,
    model: &Model,
    ready_pods: &[&Pod],
    current: i32,
) -> (i32, bool) {
    let (policy, targets, interval, window, quantile) = policy_and_targets(model);
    if scaler
        .last_eval
        .is_some_and(|t| t.elapsed().as_secs_f64() < interval)
    {
        return (current, false);
    }
    scaler.last_eval = Some(Instant::now());
    let now = EPOCH.elapsed().as_secs_f64();
    // After an operator restart the learned capacity comes back from status.
    if scaler.state.capacity.is_none() {
        scaler.state.capacity = model
            .status
            .as_ref()
            .and_then(|s| s.sla.as_ref())
            .and_then(|s| s.replica_capacity)
            .filter(|c| c.is_finite() && *c > 0.0);
    }

    let prometheus = from_prometheus(model, ready_pods, window, interval, quantile).await;
    let scraped: &[&Pod] = if prometheus.is_some() {
        &[]
    } else {
        ready_pods
    };
    // Scrape in parallel; a replica that does not answer is left out this time.
    let (ns, name) = (model.namespace().unwrap_or_default(), model.name_any());
    let (ns, name) = (ns.as_str(), name.as_str());
    let scrapes = futures::future::join_all(scraped.iter().map(|p| async move {
        let ip = p.status.as_ref().and_then(|s| s.pod_ip.clone())?;
        Some((p.name_any(), scrape(CLIENT.get()?, &ip, ns, name).await?))
    }))
    .await;
    let live: std::collections::HashSet<String> = scraped.iter().map(|p| p.name_any()).collect();
    scaler.series.retain(|name, _| live.contains(name));
    for (name, text) in scrapes.into_iter().flatten() {
        scaler
            .series
            .entry(name)
            .or_default()
            .push(now, collect::parse(&text), window * 2.0);
    }
    let observed = collect::observe(scaler.series.values(), now, window, quantile);
    // Arrivals and completions over the last interval size the throughput signal.
    let recent = collect::observe(scaler.series.values(), now, interval, quantile);
    let (observed, recent, error) = match prometheus {
        Some(Ok((observed, recent))) => (observed, recent, None),
        // Hold: no signals rather than stale or partial ones.
        Some(Err(e)) => (
            collect::Observed::default(),
            collect::Observed::default(),
            Some(e),
        ),
        None => (observed, recent, None),
    };
    let input = Input {
        now,
        current,
        ready: ready_pods.len() as i32,
        signals: Signals {
            ttft: observed.ttft,
            itl: observed.itl,
            e2e: observed.e2e,
            queue_per_replica: observed.queue_per_replica,
            rps: observed.rps,
            arrivals: recent.arrivals,
            throughput: recent.rps,
        },
        targets,
        policy,
    };
    let mode = &model.spec.autoscaling.mode;
    let decision = match &error {
        _ if *mode != AutoscalingMode::Sla => observe_only(&input, mode),
        Some(e) => hold(&input, e),
        None => autoscale::decide(&input, &mut scaler.state),
    };
    let desired = decision.desired;
    scaler.last = Some(Evaluation {
        decision,
        observed,
        arrivals: recent.arrivals,
        capacity: scaler.state.capacity,
        at: Time(k8s_openapi::jiff::Timestamp::now()),
        from: current,
        error,
    });
    (desired, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaving_sla_mode_forgets_decisions_but_keeps_the_windows() {
        let mut s = ModelScaler {
            desired: Some(4),
            last_eval: Some(Instant::now()),
            ..ModelScaler::default()
        };
        s.state.capacity = Some(3.0);
        s.state.since = Some(1.0);
        s.series.insert("pod-a".into(), PodSeries::default());
        s.forget_decisions();
        assert_eq!(s.state, autoscale::State::default());
        assert_eq!((s.desired, s.last_decision.is_none()), (None, true));
        assert!(s.series.contains_key("pod-a") && s.last_eval.is_some());
    }

    #[test]
    fn a_wake_request_acts_once_and_only_while_fresh() {
        let mut s = ModelScaler {
            last_eval: Some(Instant::now()),
            ..ModelScaler::default()
        };
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        assert!(s.wake(&now, 600.0), "a fresh request wakes");
        assert!(s.last_eval.is_none(), "and forces an evaluation");
        assert!(s.state.last_request.is_some());
        s.last_eval = Some(Instant::now());
        assert!(!s.wake(&now, 600.0), "the same request acts once");
        assert!(s.last_eval.is_some());
        let old = "2020-01-01T00:00:00Z";
        let mut fresh = ModelScaler::default();
        assert!(
            !fresh.wake(old, 600.0),
            "an old annotation is not a request"
        );
        assert!(fresh.state.last_request.is_none());
        assert!(!fresh.wake("not a time", 600.0));
    }
}
