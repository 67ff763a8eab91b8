//! Metrics collection for the autoscaler: the sidecars' Prometheus text is
//! reduced to cumulative snapshots; windows of snapshots give histogram
//! bucket deltas, from which percentiles are interpolated like Prometheus'
//! `histogram_quantile`. Pure; the scraping itself is in the controller.

use std::collections::{BTreeMap, VecDeque};

/// A cumulative histogram: upper bound -> count (sorted), plus count and sum.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// (le, cumulative count), ascending, `+Inf` last as f64::INFINITY.
    pub buckets: Vec<(f64, f64)>,
    /// Total observations.
    pub count: f64,
    /// Sum of observations.
    pub sum: f64,
}

/// What one sidecar reported at one time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Time to first token.
    pub ttft: Histogram,
    /// Inter-token latency.
    pub itl: Histogram,
    /// End-to-end latency.
    pub e2e: Histogram,
    /// Generated tokens (counter).
    pub tokens: f64,
    /// Requests waiting in the engine (gauge), if known.
    pub queue: Option<f64>,
    /// Requests in flight through the sidecar (gauge); in a window, its
    /// change over the window.
    pub in_flight: f64,
    /// The engine's KV-cache use (gauge, 0 to 1), if known.
    pub kv_cache: Option<f64>,
}

pub(crate) fn labels_and_value(line: &str) -> Option<(&str, &str, f64)> {
    let (head, value) = line.rsplit_once(' ')?;
    let value: f64 = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    match head.split_once('{') {
        Some((name, rest)) => Some((name, rest.trim_end_matches('}'), value)),
        None => Some((head, "", value)),
    }
}

/// The bucket's upper bound; None for a NaN one (no bound at all).
fn le_of(labels: &str) -> Option<f64> {
    let start = labels.find("le=\"")? + 4;
    let end = labels[start..].find('"')? + start;
    match &labels[start..end] {
        "+Inf" => Some(f64::INFINITY),
        v => v.parse().ok().filter(|le: &f64| !le.is_nan()),
    }
}

/// Largest engine queue taken as a reading; beyond it the value is unknown.
pub const MAX_PLAUSIBLE_QUEUE: f64 = 1e6;

/// Reads the sidecar's exposition (summing over model and adapter labels).
pub fn parse(text: &str) -> Snapshot {
    let mut snap = Snapshot::default();
    let mut buckets: BTreeMap<&str, BTreeMap<u64, (f64, f64)>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let Some((name, labels, value)) = labels_and_value(line) else {
            continue;
        };
        if !value.is_finite() {
            continue;
        }
        let family = match name {
            n if n.starts_with("strata_request_time_to_first_token_seconds") => "ttft",
            n if n.starts_with("strata_request_inter_token_latency_seconds") => "itl",
            n if n.starts_with("strata_request_e2e_latency_seconds") => "e2e",
            "strata_request_generation_tokens_total" => {
                snap.tokens += value;
                continue;
            }
            // Implausible engine readings are unknown, as in the sidecar
            // (a pod could serve its own numbers on the admin port).
            "strata_engine_queue_depth" => {
                snap.queue = (0.0..=MAX_PLAUSIBLE_QUEUE)
                    .contains(&value)
                    .then_some(value);
                continue;
            }
            "strata_requests_in_flight" => {
                snap.in_flight += value;
                continue;
            }
            "strata_engine_kv_cache_usage_ratio" => {
                snap.kv_cache = (0.0..=1.0).contains(&value).then_some(value);
                continue;
            }
            _ => continue,
        };
        let h = match family {
            "ttft" => &mut snap.ttft,
            "itl" => &mut snap.itl,
            _ => &mut snap.e2e,
        };
        if name.ends_with("_bucket") {
            if let Some(le) = le_of(labels) {
                let e = buckets
                    .entry(family)
                    .or_default()
                    .entry(le.to_bits())
                    .or_insert((le, 0.0));
                e.1 += value;
            }
        } else if name.ends_with("_count") {
            h.count += value;
        } else if name.ends_with("_sum") {
            h.sum += value;
        }
    }
    for (family, map) in buckets {
        let mut v: Vec<(f64, f64)> = map.into_values().collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        match family {
            "ttft" => snap.ttft.buckets = v,
            "itl" => snap.itl.buckets = v,
            _ => snap.e2e.buckets = v,
        }
    }
    snap
}

impl Histogram {
    /// `self - older`; a counter that went backwards (sidecar restart) means
    /// everything in `self` is new.
    pub fn delta(&self, older: &Histogram) -> Histogram {
        if self.count < older.count {
            return self.clone();
        }
        let buckets = self
            .buckets
            .iter()
            .map(|(le, c)| {
                let old = older
                    .buckets
                    .iter()
                    .find(|(l, _)| l == le)
                    .map_or(0.0, |(_, c)| *c);
                (*le, (c - old).max(0.0))
            })
            .collect();
        Histogram {
            buckets,
            count: self.count - older.count,
            sum: (self.sum - older.sum).max(0.0),
        }
    }

    /// Adds another histogram with the same buckets.
    pub fn add(&mut self, other: &Histogram) {
        if self.buckets.is_empty() {
            self.buckets = other.buckets.clone();
        } else {
            for (le, c) in &other.buckets {
                match self.buckets.iter_mut().find(|(l, _)| l == le) {
                    Some(b) => b.1 += c,
                    None => self.buckets.push((*le, *c)),
                }
            }
            self.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        self.count += other.count;
        self.sum += other.sum;
    }

    /// The q-quantile (0..1), interpolated linearly within the bucket as
    /// Prometheus does; None without observations. A quantile in the +Inf
    /// bucket is reported as the highest finite bound. Never infinite nor
    /// NaN: buckets no sane exposition has (bounds or counts near
    /// `f64::MAX`, a `-Inf` bound) give None.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.buckets.last().map_or(0.0, |(_, c)| *c);
        if total <= 0.0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total;
        let mut prev_le = 0.0;
        let mut prev_count = 0.0;
        let value = 'found: {
            for (le, count) in &self.buckets {
                if *count >= rank {
                    if le.is_infinite() {
                        break 'found prev_le;
                    }
                    let in_bucket = count - prev_count;
                    if in_bucket <= 0.0 {
                        break 'found *le;
                    }
                    break 'found prev_le + (le - prev_le) * (rank - prev_count) / in_bucket;
                }
                prev_le = *le;
                prev_count = *count;
            }
            prev_le
        };
        value.is_finite().then_some(value)
    }
}

/// Snapshots of one pod over time.
#[derive(Debug, Clone, Default)]
pub struct PodSeries {
    /// (time, snapshot), oldest first.
    pub points: VecDeque<(f64, Snapshot)>,
}

impl PodSeries {
    /// Adds a snapshot and forgets those older than `keep` seconds, keeping
    /// one older point as the window's start.
    pub fn push(&mut self, now: f64, snap: Snapshot, keep: f64) {
        self.points.push_back((now, snap));
        while self.points.len() > 2 && self.points.get(1).is_some_and(|(t, _)| now - t >= keep) {
            self.points.pop_front();
        }
    }

    /// The change over the last `window` seconds (None: only one point yet,
    /// the baseline).
    pub fn window(&self, now: f64, window: f64) -> Option<(Snapshot, f64)> {
        let (t_last, last) = self.points.back()?;
        let (t_first, first) = self
            .points
            .iter()
            .rev()
            .find(|(t, _)| now - t >= window)
            .or_else(|| self.points.front())?;
        if t_last <= t_first {
            return None;
        }
        let tokens = if last.tokens >= first.tokens {
            last.tokens - first.tokens
        } else {
            last.tokens
        };
        Some((
            Snapshot {
                ttft: last.ttft.delta(&first.ttft),
                itl: last.itl.delta(&first.itl),
                e2e: last.e2e.delta(&first.e2e),
                tokens,
                queue: last.queue,
                in_flight: last.in_flight - first.in_flight,
                kv_cache: last.kv_cache,
            },
            t_last - t_first,
        ))
    }
}

/// Windowed SLA signals over every pod.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Observed {
    /// TTFT at the percentile.
    pub ttft: Option<f64>,
    /// Inter-token latency at the percentile.
    pub itl: Option<f64>,
    /// End-to-end latency at the percentile.
    pub e2e: Option<f64>,
    /// Waiting requests per reporting replica.
    pub queue_per_replica: Option<f64>,
    /// KV-cache use, mean of the reporting replicas (0 to 1).
    pub kv_cache: Option<f64>,
    /// Completed requests per second.
    pub rps: Option<f64>,
    /// Arriving requests per second (completed plus the change in flight).
    pub arrivals: Option<f64>,
    /// Generated tokens per second.
    pub tokens_per_second: Option<f64>,
    /// Replicas that contributed a window.
    pub replicas: usize,
}

/// Combines the pods' windows.
pub fn observe<'a>(
    series: impl IntoIterator<Item = &'a PodSeries>,
    now: f64,
    window: f64,
    quantile: f64,
) -> Observed {
    let mut ttft = Histogram::default();
    let mut itl = Histogram::default();
    let mut e2e = Histogram::default();
    let (mut tokens, mut requests, mut span, mut queue, mut queue_n, mut n) =
        (0.0, 0.0, 0.0f64, 0.0, 0usize, 0usize);
    let mut arrived = 0.0;
    let (mut kv, mut kv_n) = (0.0, 0usize);
    for s in series {
        if let Some(k) = s.points.back().and_then(|(_, snap)| snap.kv_cache) {
            kv += k;
            kv_n += 1;
        }
        if let Some(q) = s.points.back().and_then(|(_, snap)| snap.queue) {
            queue += q;
            queue_n += 1;
        }
        let Some((d, secs)) = s.window(now, window) else {
            continue;
        };
        n += 1;
        ttft.add(&d.ttft);
        itl.add(&d.itl);
        e2e.add(&d.e2e);
        tokens += d.tokens;
        requests += d.e2e.count;
        arrived += (d.e2e.count + d.in_flight).max(0.0);
        span = span.max(secs);
    }
    Observed {
        ttft: ttft.quantile(quantile),
        itl: itl.quantile(quantile),
        e2e: e2e.quantile(quantile),
        queue_per_replica: (queue_n > 0).then(|| queue / queue_n as f64),
        kv_cache: (kv_n > 0).then(|| kv / kv_n as f64),
        rps: (span > 0.0).then(|| requests / span),
        arrivals: (span > 0.0).then(|| arrived / span),
        tokens_per_second: (span > 0.0).then(|| tokens / span),
        replicas: n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(ttft_counts: [u64; 4], count: u64, tokens: u64, queue: f64) -> String {
        let les = ["0.1", "0.5", "1", "+Inf"];
        let mut s = String::from("# TYPE strata_request_time_to_first_token_seconds histogram\n");
        for (le, c) in les.iter().zip(ttft_counts) {
            // Two label sets (base model and an adapter) are summed.
            s.push_str(&format!("strata_request_time_to_first_token_seconds_bucket{{adapter=\"\",model=\"m\",le=\"{le}\"}} {c}\n"));
            s.push_str(&format!("strata_request_time_to_first_token_seconds_bucket{{adapter=\"a\",model=\"m\",le=\"{le}\"}} 0\n"));
        }
        s.push_str(&format!(
            "strata_request_time_to_first_token_seconds_count{{adapter=\"\",model=\"m\"}} {count}\n"
        ));
        s.push_str(&format!("strata_request_e2e_latency_seconds_bucket{{adapter=\"\",model=\"m\",le=\"+Inf\"}} {count}\n"));
        s.push_str(&format!(
            "strata_request_e2e_latency_seconds_count{{adapter=\"\",model=\"m\"}} {count}\n"
        ));
        s.push_str(&format!(
            "strata_request_generation_tokens_total{{adapter=\"\",model=\"m\"}} {tokens}\n"
        ));
        s.push_str(&format!("strata_engine_queue_depth {queue}\n"));
        s
    }

    #[test]
    fn quantiles_interpolate_like_prometheus() {
        let h = Histogram {
            buckets: vec![
                (0.1, 50.0),
                (0.5, 90.0),
                (1.0, 100.0),
                (f64::INFINITY, 100.0),
            ],
            count: 100.0,
            sum: 0.0,
        };
        assert_eq!(h.quantile(0.5), Some(0.1));
        let p95 = h.quantile(0.95).expect("p95");
        assert!((p95 - 0.75).abs() < 1e-9, "{p95}");
        let tail = Histogram {
            buckets: vec![(1.0, 1.0), (f64::INFINITY, 10.0)],
            count: 10.0,
            sum: 0.0,
        };
        assert_eq!(
            tail.quantile(0.95),
            Some(1.0),
            "+Inf bucket: the highest finite bound"
        );
        assert_eq!(Histogram::default().quantile(0.95), None);
    }

    #[test]
    fn windows_use_deltas_survive_restarts_and_skip_the_baseline() {
        let mut s = PodSeries::default();
        s.push(
            0.0,
            parse(&text([100, 100, 100, 100], 100, 1000, 0.0)),
            120.0,
        );
        assert!(
            s.window(0.0, 60.0).is_none(),
            "the first scrape is only a baseline"
        );
        // In the next 60 s: 10 requests, 8 slower than 0.5 s.
        s.push(
            60.0,
            parse(&text([102, 102, 110, 110], 110, 1500, 3.0)),
            120.0,
        );
        let (d, secs) = s.window(60.0, 60.0).expect("window");
        assert_eq!(secs, 60.0);
        assert_eq!(d.ttft.count, 10.0);
        assert_eq!(d.tokens, 500.0);
        let p95 = d.ttft.quantile(0.95).expect("p95");
        assert!(p95 > 0.5 && p95 <= 1.0, "{p95}");
        // The sidecar restarted: counters fall back; what it shows is new.
        s.push(120.0, parse(&text([4, 4, 4, 4], 4, 40, 0.0)), 120.0);
        let (d, _) = s.window(120.0, 60.0).expect("window");
        assert_eq!(d.ttft.count, 4.0);
        assert_eq!(d.tokens, 40.0);
    }

    #[test]
    fn implausible_engine_readings_are_unknown() {
        for (queue, kv) in [("-1", "1.5"), ("2e6", "-0.1"), ("NaN", "+Inf")] {
            let s = parse(&format!(
                "strata_engine_queue_depth {queue}\nstrata_engine_kv_cache_usage_ratio {kv}\n"
            ));
            assert_eq!((s.queue, s.kv_cache), (None, None), "{queue} {kv}");
        }
        let s = parse("strata_engine_queue_depth 3\nstrata_engine_kv_cache_usage_ratio 0.5\n");
        assert_eq!((s.queue, s.kv_cache), (Some(3.0), Some(0.5)));
    }

    #[test]
    fn observe_combines_replicas() {
        let mut a = PodSeries::default();
        let mut b = PodSeries::default();
        a.push(0.0, parse(&text([0, 0, 0, 0], 0, 0, 0.0)), 120.0);
        b.push(0.0, parse(&text([0, 0, 0, 0], 0, 0, 0.0)), 120.0);
        a.push(30.0, parse(&text([30, 30, 30, 30], 30, 300, 2.0)), 120.0);
        b.push(30.0, parse(&text([0, 0, 30, 30], 30, 300, 6.0)), 120.0);
        let o = observe([&a, &b], 30.0, 60.0, 0.75);
        assert_eq!(o.replicas, 2);
        assert_eq!(o.rps, Some(2.0), "60 requests in 30 s");
        assert_eq!(o.tokens_per_second, Some(20.0));
        assert_eq!(o.queue_per_replica, Some(4.0));
        assert_eq!(o.kv_cache, None, "no KV-cache gauge exported");
        let kv = |v: &str| parse(&format!("strata_engine_kv_cache_usage_ratio {v}\n"));
        let (mut c, mut d, mut e) = (
            PodSeries::default(),
            PodSeries::default(),
            PodSeries::default(),
        );
        c.push(0.0, kv("0.2"), 120.0);
        d.push(0.0, kv("0.6"), 120.0);
        e.push(0.0, kv("NaN"), 120.0);
        let k = observe([&c, &d, &e], 0.0, 60.0, 0.95);
        assert_eq!(
            k.kv_cache,
            Some(0.4),
            "the mean of the replicas that know it"
        );
        // Half under 0.1 s (from a), half in (0.5, 1] s (from b): p75 is halfway up that bucket.
        assert_eq!(o.ttft, Some(0.75));
    }

    #[test]
    fn hostile_buckets_give_no_quantile_rather_than_inf_or_nan() {
        // Found by the property tests: a NaN bound, or bounds and counts
        // whose differences overflow, gave NaN or infinite percentiles.
        let nan = parse("strata_request_time_to_first_token_seconds_bucket{le=\"NaN\"} 5\n");
        assert!(nan.ttft.buckets.is_empty(), "a NaN bound is no bucket");
        assert_eq!(nan.ttft.quantile(0.5), None);
        let wide = parse(
            "strata_request_e2e_latency_seconds_bucket{le=\"-1e308\"} 0\n\
             strata_request_e2e_latency_seconds_bucket{le=\"1e308\"} 1\n\
             strata_request_e2e_latency_seconds_bucket{le=\"+Inf\"} 1\n",
        );
        assert_eq!(wide.e2e.buckets.len(), 3);
        assert_eq!(wide.e2e.quantile(0.5), None, "1e308 - -1e308 overflows");
        let h = Histogram {
            buckets: vec![(-1.8e182, -4.9e194), (0.0, 4e-309)],
            count: 0.0,
            sum: 0.0,
        };
        assert_eq!(h.quantile(0.0), None);
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    const FAMILIES: [&str; 3] = [
        "strata_request_time_to_first_token_seconds",
        "strata_request_inter_token_latency_seconds",
        "strata_request_e2e_latency_seconds",
    ];

    fn quantiles_are_finite(h: &Histogram, qs: &[f64]) -> Result<(), TestCaseError> {
        for q in qs {
            if let Some(v) = h.quantile(*q) {
                prop_assert!(v.is_finite(), "quantile({}) = {} of {:?}", q, v, h);
            }
        }
        Ok(())
    }

    fn snapshot_quantiles_are_finite(s: &Snapshot, qs: &[f64]) -> Result<(), TestCaseError> {
        for h in [&s.ttft, &s.itl, &s.e2e] {
            quantiles_are_finite(h, qs)?;
        }
        Ok(())
    }

    /// Numbers as an exposition may write them, hostile ones included.
    fn number() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<f64>().prop_map(|v| v.to_string()),
            (0u32..1000).prop_map(|v| v.to_string()),
            prop::sample::select(vec![
                "+Inf",
                "-Inf",
                "NaN",
                "inf",
                "1e308",
                "-1e308",
                "1.7976931348623157e308",
                "0",
                "-0",
                "5e-324",
                "1e-320",
            ])
            .prop_map(str::to_string),
        ]
    }

    /// Lines of the sidecar's exposition, with any bounds and counts.
    fn line() -> impl Strategy<Value = String> {
        let suffix = prop::sample::select(vec!["_bucket", "_count", "_sum", ""]);
        prop_oneof![
            4 => (prop::sample::select(FAMILIES.to_vec()), suffix, number(), number())
                .prop_map(|(f, s, le, v)| format!("{f}{s}{{model=\"m\",le=\"{le}\"}} {v}")),
            1 => (
                prop::sample::select(vec![
                    "strata_request_generation_tokens_total",
                    "strata_engine_queue_depth",
                    "strata_requests_in_flight",
                    "strata_engine_kv_cache_usage_ratio",
                ]),
                number(),
            )
                .prop_map(|(n, v)| format!("{n} {v}")),
            1 => "[a-z_{}=\" #.0-9+\\-]{0,40}",
        ]
    }

    /// A well-formed histogram: ascending finite bounds, cumulative counts,
    /// `+Inf` last.
    fn histogram() -> impl Strategy<Value = Histogram> {
        (vec((1e-6f64..100.0, 0u32..1000), 1..8), 0u32..100).prop_map(|(steps, over)| {
            let (mut le, mut count) = (0.0, 0.0);
            let mut buckets: Vec<(f64, f64)> = steps
                .into_iter()
                .map(|(width, n)| {
                    le += width;
                    count += f64::from(n);
                    (le, count)
                })
                .collect();
            count += f64::from(over);
            buckets.push((f64::INFINITY, count));
            Histogram {
                buckets,
                count,
                sum: 0.0,
            }
        })
    }

    const QS: [f64; 8] = [0.0, 0.01, 0.5, 0.9, 0.95, 0.99, 1.0, 1.5];

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn never_panics_and_quantiles_are_finite(text in any::<String>(), q in any::<f64>()) {
            snapshot_quantiles_are_finite(&parse(&text), &[q])?;
        }

        #[test]
        fn any_exposition_gives_finite_quantiles(
            first in vec(line(), 0..24),
            second in vec(line(), 0..24),
            q in any::<f64>(),
        ) {
            let mut qs = QS.to_vec();
            qs.push(q);
            let a = parse(&first.join("\n"));
            let b = parse(&second.join("\n"));
            snapshot_quantiles_are_finite(&a, &qs)?;
            snapshot_quantiles_are_finite(&b, &qs)?;
            let mut sum = a.ttft.clone();
            sum.add(&b.ttft);
            quantiles_are_finite(&sum, &qs)?;
            quantiles_are_finite(&b.e2e.delta(&a.e2e), &qs)?;
            let mut one = PodSeries::default();
            one.push(0.0, a.clone(), 120.0);
            one.push(30.0, b.clone(), 120.0);
            let mut two = PodSeries::default();
            two.push(0.0, b, 120.0);
            two.push(30.0, a, 120.0);
            for q in qs {
                let o = observe([&one, &two], 30.0, 60.0, q);
                for v in [o.ttft, o.itl, o.e2e].into_iter().flatten() {
                    prop_assert!(v.is_finite(), "observed {}", v);
                }
            }
        }

        #[test]
        fn any_histogram_gives_finite_quantiles(
            buckets in vec((any::<f64>(), any::<f64>()), 0..6),
            q in any::<f64>(),
        ) {
            let h = Histogram { buckets, count: 0.0, sum: 0.0 };
            let mut qs = QS.to_vec();
            qs.push(q);
            quantiles_are_finite(&h, &qs)?;
        }

        #[test]
        fn well_formed_quantiles_are_bounded_and_monotone(h in histogram()) {
            let top = h.buckets[h.buckets.len() - 2].0;
            let mut last = 0.0f64;
            for q in (0..=100).map(|i| f64::from(i) / 100.0) {
                let Some(v) = h.quantile(q) else {
                    prop_assert_eq!(h.count, 0.0, "None only without observations");
                    return Ok(());
                };
                prop_assert!((0.0..=top * (1.0 + 1e-12)).contains(&v), "{} outside 0..={}", v, top);
                prop_assert!(v >= last - top * 1e-12, "quantile({}) = {} < {}", q, v, last);
                last = v;
            }
        }
    }
}
