//! What GPUs cost, pure: GPUPools' `costPerGpuHour` times the GPUs that
//! Strata's replicas hold, per hour and per million generated tokens.

use std::collections::BTreeMap;

use strata_crds::GPUPool;
use strata_crds::common::CostStatus;

/// A price per GPU-hour from a GPUPool's `costPerGpuHour` (a decimal
/// string the API server validated); `None` when unset or unreadable.
pub fn price_per_gpu_hour(pool: &GPUPool) -> Option<f64> {
    pool.spec
        .cost_per_gpu_hour
        .as_deref()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|p| p.is_finite() && *p >= 0.0)
}

/// Cost per million generated tokens at `per_hour` while generating
/// `tokens_per_second`; `None` without tokens.
pub fn per_million_tokens(per_hour: f64, tokens_per_second: f64) -> Option<f64> {
    (tokens_per_second.is_finite() && tokens_per_second > 0.0 && per_hour.is_finite())
        .then(|| per_hour / (tokens_per_second * 3600.0) * 1e6)
}

/// Rounds money to 4 decimals (what status shows).
pub fn round_money(v: f64) -> f64 {
    (v * 10_000.0).round() / 10_000.0
}

/// One replica's footprint: its pool and the GPUs it requests.
#[derive(Debug, Clone, PartialEq)]
pub struct Footprint {
    /// The pool it was placed on.
    pub pool: String,
    /// GPUs it requests.
    pub gpus: i64,
}

/// The cost of `replicas` at `prices` (by pool) while generating
/// `tokens_per_second` (None: unknown); `None` when none of them is on a
/// priced pool.
pub fn cost(
    replicas: &[Footprint],
    prices: &BTreeMap<String, f64>,
    tokens_per_second: Option<f64>,
) -> Option<CostStatus> {
    let mut per_hour = 0.0;
    let mut gpus = 0i64;
    for r in replicas {
        if let Some(p) = prices.get(&r.pool) {
            per_hour += p * r.gpus as f64;
            gpus += r.gpus;
        }
    }
    (gpus > 0).then(|| CostStatus {
        per_hour: round_money(per_hour),
        per_million_tokens: tokens_per_second
            .and_then(|t| per_million_tokens(per_hour, t))
            .map(round_money),
        gpus: i32::try_from(gpus).unwrap_or(i32::MAX),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
    use strata_crds::gpupool::GPUPoolSpec;

    fn pool(name: &str, price: Option<&str>) -> GPUPool {
        GPUPool::new(
            name,
            GPUPoolSpec {
                node_selector: LabelSelector::default(),
                tolerations: Vec::new(),
                placement: Default::default(),
                gpu_resource_name: "nvidia.com/gpu".into(),
                cost_per_gpu_hour: price.map(Into::into),
                power_cap_watts: None,
            },
        )
    }

    #[test]
    fn cost_from_the_pools_price() {
        assert_eq!(price_per_gpu_hour(&pool("p", Some("2.49"))), Some(2.49));
        assert_eq!(price_per_gpu_hour(&pool("p", None)), None);
        assert_eq!(price_per_gpu_hour(&pool("p", Some("x"))), None);
        // 4 GPUs at 2.50 = 10 per hour; 1,000 tokens/s = 3.6M tokens/hour.
        let per_m = per_million_tokens(10.0, 1000.0).expect("tokens");
        assert!((per_m - 10.0 / 3.6).abs() < 1e-9, "{per_m}");
        assert_eq!(per_million_tokens(10.0, 0.0), None);
        assert_eq!(per_million_tokens(10.0, f64::NAN), None);
        assert_eq!(round_money(2.777_777), 2.7778);
    }

    #[test]
    fn a_models_cost_counts_only_priced_gpus() {
        let prices: BTreeMap<String, f64> = [("h100".to_owned(), 2.5)].into();
        let f = |pool: &str, gpus| Footprint {
            pool: pool.into(),
            gpus,
        };
        let c = cost(
            &[f("h100", 2), f("h100", 2), f("l4", 1)],
            &prices,
            Some(1000.0),
        )
        .expect("priced");
        assert_eq!(c.per_hour, 10.0);
        assert_eq!(c.gpus, 4);
        assert_eq!(c.per_million_tokens, Some(2.7778));
        let idle = cost(&[f("h100", 1)], &prices, Some(0.0)).expect("priced");
        assert_eq!((idle.per_hour, idle.per_million_tokens), (2.5, None));
        assert_eq!(cost(&[f("l4", 1)], &prices, Some(10.0)), None);
        assert_eq!(cost(&[], &prices, None), None);
    }
}
