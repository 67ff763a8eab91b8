//! The operator's reading of Prometheus HTTP API answers, on any bytes.
//!
//! Checked: `parse_value` never panics, and the readings built from what it
//! returns hold only finite values, counters and arrivals never negative.

#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use strata_core::promql::{Readings, Signal, parse_value};

const SIGNALS: [Signal; 10] = [
    Signal::Ttft,
    Signal::Itl,
    Signal::E2e,
    Signal::Rps,
    Signal::TokensPerSecond,
    Signal::QueuePerReplica,
    Signal::KvCache,
    Signal::Replicas,
    Signal::Throughput,
    Signal::InFlightDelta,
];

fuzz_target!(|data: &[u8]| {
    let Ok(value) = parse_value(data) else {
        return;
    };
    let values: BTreeMap<Signal, Option<f64>> = SIGNALS.iter().map(|s| (*s, value)).collect();
    for interval in [0.0, 15.0] {
        let r = Readings::from_values(&values, interval);
        for v in [r.ttft, r.itl, r.e2e, r.queue_per_replica, r.kv_cache]
            .into_iter()
            .flatten()
        {
            assert!(v.is_finite(), "{v}");
        }
        for v in [r.rps, r.tokens_per_second, r.throughput, r.arrivals]
            .into_iter()
            .flatten()
        {
            assert!(v.is_finite() && v >= 0.0, "{v}");
        }
    }
});
