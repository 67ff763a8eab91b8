//! The operator's reading of the sidecars' Prometheus text: snapshots,
//! windows of them and the percentiles interpolated from their histograms.
//!
//! Input: two expositions separated by the first NUL byte (a scrape and a
//! later one). Checked: nothing panics, and every quantile (of a snapshot,
//! of a window's deltas, of replicas combined) is finite when there is one.

#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_core::collect::{self, Histogram, PodSeries, Snapshot};

const QS: [f64; 7] = [0.0, 0.01, 0.5, 0.9, 0.95, 0.99, 1.0];

fn check_hist(h: &Histogram) {
    for q in QS {
        if let Some(v) = h.quantile(q) {
            assert!(v.is_finite(), "quantile({q}) = {v} of {h:?}");
        }
    }
}

fn check_snap(s: &Snapshot) {
    check_hist(&s.ttft);
    check_hist(&s.itl);
    check_hist(&s.e2e);
}

fuzz_target!(|data: &[u8]| {
    let (first, second) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let a = collect::parse(&String::from_utf8_lossy(first));
    let b = collect::parse(&String::from_utf8_lossy(second));
    check_snap(&a);
    check_snap(&b);
    for (x, y) in [(&a, &b), (&b, &a)] {
        check_hist(&x.ttft.delta(&y.ttft));
        let mut sum = x.e2e.clone();
        sum.add(&y.e2e);
        check_hist(&sum);
    }

    let mut one = PodSeries::default();
    one.push(0.0, a.clone(), 120.0);
    one.push(30.0, b.clone(), 120.0);
    let mut two = PodSeries::default();
    two.push(0.0, b, 120.0);
    two.push(30.0, a, 120.0);
    if let Some((d, _)) = one.window(30.0, 60.0) {
        check_snap(&d);
    }
    for q in QS {
        let o = collect::observe([&one, &two], 30.0, 60.0, q);
        for v in [o.ttft, o.itl, o.e2e].into_iter().flatten() {
            assert!(v.is_finite(), "observed quantile {v}");
        }
    }
});
