//! The autoscaler's Prometheus metrics source, pure half: the PromQL queries
//! for one Model's replicas and the reading of Prometheus' HTTP API answers
//! (`GET /api/v1/query`). The requests themselves are in
//! [`crate::controller::prometheus`].
//!
//! Series are selected by `{namespace="<ns>", pod=~"<pod>|<pod>|..."}`, the
//! ready replicas the operator knows. The Prometheus scrape configuration must
//! therefore attach `namespace` and `pod` target labels to what it scrapes
//! from the sidecars (port 9090, `/metrics`), as a PodMonitor does and as the
//! usual `kubernetes_sd_configs` relabeling does
//! (`__meta_kubernetes_namespace` -> `namespace`,
//! `__meta_kubernetes_pod_name` -> `pod`). Each pod should be scraped by one
//! job only: sums over duplicated series would count it twice.
//!
//! The signals mirror [`crate::collect`]: latency percentiles interpolated
//! from the summed histogram buckets over the window, completed requests and
//! generated tokens per second over the window, the engines' queue averaged
//! over the replicas that report it, and over the last interval the
//! completions and arrivals (completions plus the change in requests in
//! flight) that size the throughput signal.

use std::collections::BTreeMap;

use crate::collect::Observed;

/// The sidecar's histogram of time to first token.
pub const TTFT: &str = "strata_request_time_to_first_token_seconds";
/// The sidecar's histogram of inter-token latency.
pub const ITL: &str = "strata_request_inter_token_latency_seconds";
/// The sidecar's histogram of end-to-end latency.
pub const E2E: &str = "strata_request_e2e_latency_seconds";
/// The sidecar's counter of generated tokens.
pub const TOKENS: &str = "strata_request_generation_tokens_total";
/// The sidecar's gauge of requests waiting in the engine (NaN when unknown).
pub const QUEUE: &str = "strata_engine_queue_depth";
/// The engine's KV-cache use gauge (0 to 1).
pub const KV_CACHE: &str = "strata_engine_kv_cache_usage_ratio";
/// The sidecar's gauge of requests in flight through it.
pub const IN_FLIGHT: &str = "strata_requests_in_flight";

/// What went wrong reading a Prometheus answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// Prometheus answered `"status": "error"` (a bad query, a timeout, ...).
    #[error("Prometheus rejected the query ({error_type}): {message}")]
    Api {
        /// `errorType`, e.g. `bad_data`, `timeout`, `execution`.
        error_type: String,
        /// `error`, Prometheus' own message.
        message: String,
    },
    /// The body is not the JSON the HTTP API documents.
    #[error("Prometheus answered something that is not an API response: {0}")]
    Malformed(String),
    /// A result type other than vector or scalar.
    #[error("Prometheus answered a {0} where a vector was expected")]
    ResultType(String),
    /// An aggregated query gave more than one series.
    #[error("expected at most one series, Prometheus answered {0}")]
    Series(usize),
}

/// One of the values asked of Prometheus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Signal {
    /// TTFT at the percentile over the window.
    Ttft,
    /// Inter-token latency at the percentile over the window.
    Itl,
    /// End-to-end latency at the percentile over the window.
    E2e,
    /// Completed requests per second over the window.
    Rps,
    /// Generated tokens per second over the window.
    TokensPerSecond,
    /// Requests waiting in the engine, averaged over reporting replicas.
    QueuePerReplica,
    /// KV-cache use, averaged over reporting replicas.
    KvCache,
    /// Replicas Prometheus has series for.
    Replicas,
    /// Completed requests per second over the last interval.
    Throughput,
    /// The change in requests in flight over the last interval.
    InFlightDelta,
}

impl Signal {
    /// Name for logs and errors.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ttft => "ttft",
            Self::Itl => "itl",
            Self::E2e => "e2e",
            Self::Rps => "rps",
            Self::TokensPerSecond => "tokensPerSecond",
            Self::QueuePerReplica => "queuePerReplica",
            Self::KvCache => "kvCacheUsage",
            Self::Replicas => "replicas",
            Self::Throughput => "throughput",
            Self::InFlightDelta => "inFlightDelta",
        }
    }
}

/// One query to run.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    /// What it measures.
    pub signal: Signal,
    /// The PromQL expression.
    pub promql: String,
}

/// Escapes `s` for a literal match inside an RE2 regular expression.
pub fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// `s` as a double-quoted PromQL string literal.
pub fn string_literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The label matchers for the pods `pods` in `namespace`, without braces;
/// None without pods (an empty alternation would match series that have no
/// `pod` label at all).
pub fn selector(namespace: &str, pods: &[impl AsRef<str>]) -> Option<String> {
    if pods.is_empty() {
        return None;
    }
    let mut names: Vec<String> = pods.iter().map(|p| regex_escape(p.as_ref())).collect();
    names.sort();
    names.dedup();
    Some(format!(
        "namespace={}, pod=~{}",
        string_literal(namespace),
        string_literal(&names.join("|"))
    ))
}

/// A PromQL duration for `secs` seconds: whole seconds, else milliseconds
/// (PromQL durations take no fractions); at least 1 ms.
pub fn duration(secs: f64) -> String {
    let ms = (secs * 1000.0).round().max(1.0) as u64;
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// The queries for one Model: `sel` from [`selector`], `window` and
/// `interval` in seconds, `quantile` in 0..1.
pub fn queries(sel: &str, window: f64, interval: f64, quantile: f64) -> Vec<Query> {
    let w = duration(window);
    let i = duration(interval);
    let q = quantile.clamp(0.0, 1.0);
    let pct = |hist: &str| {
        format!("histogram_quantile({q}, sum by (le) (rate({hist}_bucket{{{sel}}}[{w}])))")
    };
    vec![
        Query {
            signal: Signal::Ttft,
            promql: pct(TTFT),
        },
        Query {
            signal: Signal::Itl,
            promql: pct(ITL),
        },
        Query {
            signal: Signal::E2e,
            promql: pct(E2E),
        },
        Query {
            signal: Signal::Rps,
            promql: format!("sum(rate({E2E}_count{{{sel}}}[{w}]))"),
        },
        Query {
            signal: Signal::TokensPerSecond,
            promql: format!("sum(rate({TOKENS}{{{sel}}}[{w}]))"),
        },
        Query {
            signal: Signal::QueuePerReplica,
            // `>= 0` drops NaN, the sidecar's "unknown".
            promql: format!("avg({QUEUE}{{{sel}}} >= 0)"),
        },
        Query {
            signal: Signal::KvCache,
            promql: format!("avg({KV_CACHE}{{{sel}}} >= 0)"),
        },
        Query {
            signal: Signal::Replicas,
            promql: format!("count(count by (pod) ({QUEUE}{{{sel}}}))"),
        },
        Query {
            signal: Signal::Throughput,
            promql: format!("sum(rate({E2E}_count{{{sel}}}[{i}]))"),
        },
        Query {
            signal: Signal::InFlightDelta,
            promql: format!("sum(delta({IN_FLIGHT}{{{sel}}}[{i}]))"),
        },
    ]
}

/// Reads a `/api/v1/query` answer whose query aggregates to at most one
/// series: None for an empty result (no data). NaN and infinities come back
/// as such (`"NaN"`, `"+Inf"`, `"-Inf"`).
pub fn parse_value(body: &[u8]) -> Result<Option<f64>, Error> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| Error::Malformed(e.to_string()))?;
    let field = |name: &str| v.get(name).and_then(|s| s.as_str());
    match field("status") {
        Some("success") => {}
        Some("error") => {
            return Err(Error::Api {
                error_type: field("errorType").unwrap_or("unknown").to_string(),
                message: field("error").unwrap_or("").to_string(),
            });
        }
        other => {
            return Err(Error::Malformed(format!("status {other:?}")));
        }
    }
    let data = v
        .get("data")
        .ok_or_else(|| Error::Malformed("no data".into()))?;
    let result_type = data
        .get("resultType")
        .and_then(|t| t.as_str())
        .ok_or_else(|| Error::Malformed("no data.resultType".into()))?;
    let result = data
        .get("result")
        .ok_or_else(|| Error::Malformed("no data.result".into()))?;
    match result_type {
        "vector" => {
            let series = result
                .as_array()
                .ok_or_else(|| Error::Malformed("data.result is not a list".into()))?;
            match series.as_slice() {
                [] => Ok(None),
                [one] => sample(one.get("value")).map(Some),
                many => Err(Error::Series(many.len())),
            }
        }
        "scalar" => sample(Some(result)).map(Some),
        other => Err(Error::ResultType(other.to_string())),
    }
}

/// `[<unix time>, "<value>"]`.
fn sample(v: Option<&serde_json::Value>) -> Result<f64, Error> {
    let text = v
        .and_then(|v| v.as_array())
        .and_then(|pair| pair.get(1))
        .and_then(|s| s.as_str())
        .ok_or_else(|| Error::Malformed(format!("sample {v:?} is not [time, \"value\"]")))?;
    match text {
        "NaN" => Ok(f64::NAN),
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        t => t
            .parse()
            .map_err(|_| Error::Malformed(format!("sample value {t:?}"))),
    }
}

/// What Prometheus said about one Model: the windowed signals of
/// [`collect::Observed`](crate::collect::Observed) plus the last interval's
/// throughput and arrivals.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Readings {
    /// TTFT at the percentile over the window.
    pub ttft: Option<f64>,
    /// Inter-token latency at the percentile over the window.
    pub itl: Option<f64>,
    /// End-to-end latency at the percentile over the window.
    pub e2e: Option<f64>,
    /// Waiting requests per reporting replica.
    pub queue_per_replica: Option<f64>,
    /// KV-cache use, mean of the reporting replicas.
    pub kv_cache: Option<f64>,
    /// Completed requests per second over the window.
    pub rps: Option<f64>,
    /// Generated tokens per second over the window.
    pub tokens_per_second: Option<f64>,
    /// Completed requests per second over the last interval.
    pub throughput: Option<f64>,
    /// Arriving requests per second over the last interval (completed plus
    /// the change in flight, never below zero).
    pub arrivals: Option<f64>,
    /// Replicas Prometheus has series for.
    pub replicas: usize,
}

impl Readings {
    /// Combines the answers (`interval` in seconds). NaN and infinities are
    /// no data: Prometheus gives NaN for a percentile of a window without
    /// requests, and infinities only for quantiles outside 0..1. Rates of
    /// counters that have no series yet on replicas Prometheus does scrape
    /// are zero (the sidecar exports a request counter after its first
    /// request); without any scraped replica they stay unknown.
    pub fn from_values(values: &BTreeMap<Signal, Option<f64>>, interval: f64) -> Readings {
        let get = |s: Signal| values.get(&s).copied().flatten().filter(|v| v.is_finite());
        let replicas = get(Signal::Replicas).map_or(0, |n| n.max(0.0).round() as usize);
        let counter = |s: Signal| get(s).map(|v| v.max(0.0)).or((replicas > 0).then_some(0.0));
        let throughput = counter(Signal::Throughput);
        // Unknown, not infinite, when the sum overflows (values near
        // `f64::MAX`, or a tiny interval).
        let arrivals = throughput.and_then(|t| {
            let change = if interval > 0.0 {
                get(Signal::InFlightDelta).unwrap_or(0.0) / interval
            } else {
                0.0
            };
            Some((t + change).max(0.0)).filter(|a| a.is_finite())
        });
        Readings {
            ttft: get(Signal::Ttft),
            itl: get(Signal::Itl),
            e2e: get(Signal::E2e),
            queue_per_replica: get(Signal::QueuePerReplica),
            kv_cache: get(Signal::KvCache),
            rps: counter(Signal::Rps),
            tokens_per_second: counter(Signal::TokensPerSecond),
            throughput,
            arrivals,
            replicas,
        }
    }

    /// As the sidecar path's pair: the window's signals, and the last
    /// interval's (`rps` is the throughput there, `arrivals` the arrivals).
    pub fn observed(&self) -> (Observed, Observed) {
        let window = Observed {
            ttft: self.ttft,
            itl: self.itl,
            e2e: self.e2e,
            queue_per_replica: self.queue_per_replica,
            kv_cache: self.kv_cache,
            rps: self.rps,
            arrivals: None,
            tokens_per_second: self.tokens_per_second,
            replicas: self.replicas,
        };
        let recent = Observed {
            rps: self.throughput,
            arrivals: self.arrivals,
            replicas: self.replicas,
            ..Observed::default()
        };
        (window, recent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_names_are_escaped_and_anchored_by_an_alternation() {
        assert_eq!(regex_escape("chat-7f9c.x"), "chat-7f9c\\.x");
        assert_eq!(regex_escape("a+b(c)|d"), "a\\+b\\(c\\)\\|d");
        let sel = selector("prod", &["chat-b", "chat.a", "chat-b"]).expect("pods");
        // The regex `chat-b|chat\.a` (sorted, deduplicated), its backslash
        // doubled in the string literal.
        assert_eq!(sel, r#"namespace="prod", pod=~"chat-b|chat\\.a""#);
        assert_eq!(string_literal(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(
            selector("prod", &[] as &[&str]),
            None,
            "no pods: no query (pod=~\"\" would match series without a pod label)"
        );
    }

    #[test]
    fn durations_are_whole_seconds_or_milliseconds() {
        assert_eq!(duration(60.0), "60s");
        assert_eq!(duration(15.0), "15s");
        assert_eq!(duration(1.5), "1500ms");
        assert_eq!(duration(0.0), "1ms");
    }

    #[test]
    fn the_queries() {
        let sel = selector("t", &["chat-a", "chat-b"]).expect("pods");
        let qs = queries(&sel, 60.0, 15.0, 0.95);
        let by = |s: Signal| {
            qs.iter()
                .find(|q| q.signal == s)
                .map(|q| q.promql.clone())
                .expect("query")
        };
        assert_eq!(
            by(Signal::Ttft),
            r#"histogram_quantile(0.95, sum by (le) (rate(strata_request_time_to_first_token_seconds_bucket{namespace="t", pod=~"chat-a|chat-b"}[60s])))"#
        );
        assert!(by(Signal::Itl).contains("strata_request_inter_token_latency_seconds_bucket{"));
        assert!(by(Signal::E2e).contains("strata_request_e2e_latency_seconds_bucket{"));
        assert_eq!(
            by(Signal::Rps),
            r#"sum(rate(strata_request_e2e_latency_seconds_count{namespace="t", pod=~"chat-a|chat-b"}[60s]))"#
        );
        assert_eq!(
            by(Signal::TokensPerSecond),
            r#"sum(rate(strata_request_generation_tokens_total{namespace="t", pod=~"chat-a|chat-b"}[60s]))"#
        );
        assert_eq!(
            by(Signal::QueuePerReplica),
            r#"avg(strata_engine_queue_depth{namespace="t", pod=~"chat-a|chat-b"} >= 0)"#
        );
        assert_eq!(
            by(Signal::KvCache),
            r#"avg(strata_engine_kv_cache_usage_ratio{namespace="t", pod=~"chat-a|chat-b"} >= 0)"#
        );
        assert_eq!(
            by(Signal::Throughput),
            r#"sum(rate(strata_request_e2e_latency_seconds_count{namespace="t", pod=~"chat-a|chat-b"}[15s]))"#
        );
        assert_eq!(
            by(Signal::InFlightDelta),
            r#"sum(delta(strata_requests_in_flight{namespace="t", pod=~"chat-a|chat-b"}[15s]))"#
        );
        assert!(
            by(Signal::Replicas).starts_with("count(count by (pod) (strata_engine_queue_depth{")
        );
        assert_eq!(qs.len(), 10, "one query per signal");
    }

    #[test]
    fn vectors_scalars_and_special_values() {
        let one = br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1700000000.5,"0.25"]}]}}"#;
        assert_eq!(parse_value(one), Ok(Some(0.25)));
        let empty = br#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
        assert_eq!(parse_value(empty), Ok(None), "no series: no data");
        let nan = br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"NaN"]}]}}"#;
        assert!(parse_value(nan).expect("nan").expect("value").is_nan());
        let inf = br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"+Inf"]}]}}"#;
        assert_eq!(parse_value(inf), Ok(Some(f64::INFINITY)));
        let scalar = br#"{"status":"success","data":{"resultType":"scalar","result":[1,"3"]}}"#;
        assert_eq!(parse_value(scalar), Ok(Some(3.0)));
        let two = br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"pod":"a"},"value":[1,"1"]},{"metric":{"pod":"b"},"value":[1,"2"]}]}}"#;
        assert_eq!(parse_value(two), Err(Error::Series(2)));
        let matrix = br#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#;
        assert_eq!(parse_value(matrix), Err(Error::ResultType("matrix".into())));
    }

    #[test]
    fn errors_carry_prometheus_message() {
        let bad = br#"{"status":"error","errorType":"bad_data","error":"1:5: parse error: unexpected end of input"}"#;
        let err = parse_value(bad).expect_err("error");
        assert_eq!(
            err,
            Error::Api {
                error_type: "bad_data".into(),
                message: "1:5: parse error: unexpected end of input".into()
            }
        );
        assert!(err.to_string().contains("unexpected end of input"));
        assert!(matches!(
            parse_value(b"<html>bad gateway</html>"),
            Err(Error::Malformed(_))
        ));
        assert!(matches!(
            parse_value(br#"{"status":"success","data":{"resultType":"vector","result":[{"value":[1,"x"]}]}}"#),
            Err(Error::Malformed(_))
        ));
        assert!(matches!(
            parse_value(br#"{"status":"success"}"#),
            Err(Error::Malformed(_))
        ));
    }

    #[test]
    fn readings_combine_and_drop_non_finite_values() {
        let mut v = BTreeMap::new();
        v.insert(Signal::Ttft, Some(0.4));
        v.insert(Signal::Itl, Some(f64::NAN));
        v.insert(Signal::Rps, Some(3.0));
        v.insert(Signal::TokensPerSecond, Some(60.0));
        v.insert(Signal::QueuePerReplica, Some(1.5));
        v.insert(Signal::Replicas, Some(2.0));
        v.insert(Signal::Throughput, Some(2.0));
        // Six more in flight after 15 s: 0.4 more per second arrived than completed.
        v.insert(Signal::InFlightDelta, Some(6.0));
        let r = Readings::from_values(&v, 15.0);
        assert_eq!(r.ttft, Some(0.4));
        assert_eq!(r.itl, None, "NaN: no requests in the window");
        assert_eq!(r.e2e, None);
        assert_eq!(r.replicas, 2);
        assert_eq!(r.throughput, Some(2.0));
        assert!((r.arrivals.expect("arrivals") - 2.4).abs() < 1e-9);
        let (obs, recent) = r.observed();
        assert_eq!(obs.rps, Some(3.0));
        assert_eq!(obs.tokens_per_second, Some(60.0));
        assert_eq!(obs.queue_per_replica, Some(1.5));
        assert_eq!(obs.replicas, 2);
        assert_eq!(recent.rps, Some(2.0), "throughput is the interval's rps");
        assert_eq!(recent.arrivals, r.arrivals);

        // The backlog drained faster than requests came: clamped at zero.
        v.insert(Signal::InFlightDelta, Some(-60.0));
        assert_eq!(Readings::from_values(&v, 15.0).arrivals, Some(0.0));
    }

    #[test]
    fn counters_without_series_are_zero_only_on_scraped_replicas() {
        let mut v = BTreeMap::new();
        v.insert(Signal::Replicas, Some(2.0));
        let r = Readings::from_values(&v, 15.0);
        assert_eq!(r.rps, Some(0.0), "replicas up, never a request");
        assert_eq!(r.throughput, Some(0.0));
        assert_eq!(r.arrivals, Some(0.0));
        assert_eq!(r.ttft, None);
        let none = Readings::from_values(&BTreeMap::new(), 15.0);
        assert_eq!(
            none,
            Readings::default(),
            "nothing scraped: unknown, not idle"
        );
    }

    #[test]
    fn arrivals_that_overflow_are_unknown() {
        // Found by the property tests: throughput plus the change in flight
        // per second overflowed to an infinite arrival rate.
        let mut v = BTreeMap::new();
        v.insert(Signal::Throughput, Some(f64::MAX));
        v.insert(Signal::InFlightDelta, Some(f64::MAX));
        let r = Readings::from_values(&v, 15.0);
        assert_eq!((r.throughput, r.arrivals), (Some(f64::MAX), None));
        v.insert(Signal::Throughput, Some(0.0));
        v.insert(Signal::InFlightDelta, Some(1.3e225));
        assert_eq!(Readings::from_values(&v, 1.5e-308).arrivals, None);
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::collection::{btree_map, vec};
    use proptest::prelude::*;
    use serde_json::{Value, json};

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

    /// Any JSON value, a few levels deep, with the API's words likely.
    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            any::<String>().prop_map(Value::String),
            prop::sample::select(vec![
                "success", "error", "vector", "scalar", "matrix", "NaN", "+Inf", "-Inf", "Inf",
                "1e309", "0.25",
            ])
            .prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                vec(inner.clone(), 0..4).prop_map(Value::Array),
                btree_map(
                    prop_oneof![
                        prop::sample::select(vec![
                            "status",
                            "data",
                            "resultType",
                            "result",
                            "value",
                            "metric",
                            "errorType",
                            "error",
                        ])
                        .prop_map(str::to_string),
                        any::<String>(),
                    ],
                    inner,
                    0..4,
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// An answer shaped like the API's, with anything where a result goes.
    fn answer() -> impl Strategy<Value = Value> {
        (
            prop::sample::select(vec!["success", "error", "warning"]),
            prop::sample::select(vec!["vector", "scalar", "matrix", "string"]),
            value(),
            vec((any::<f64>(), value()), 0..3),
        )
            .prop_map(|(status, kind, result, samples)| {
                let series: Vec<Value> = samples
                    .into_iter()
                    .map(|(t, v)| json!({"metric": {}, "value": [t, v]}))
                    .collect();
                let result = if kind == "vector" && result.is_null() {
                    Value::Array(series)
                } else {
                    result
                };
                json!({"status": status, "data": {"resultType": kind, "result": result}})
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn never_panics_on_bytes(body in vec(any::<u8>(), 0..256)) {
            let _ = parse_value(&body);
        }

        #[test]
        fn never_panics_on_json(v in prop_oneof![value(), answer()]) {
            let _ = parse_value(v.to_string().as_bytes());
        }

        #[test]
        fn one_sample_reads_back(v in any::<f64>(), scalar in any::<bool>()) {
            let text = if v.is_nan() {
                "NaN".to_string()
            } else if v.is_infinite() {
                (if v > 0.0 { "+Inf" } else { "-Inf" }).to_string()
            } else {
                v.to_string()
            };
            let body = if scalar {
                json!({"status": "success", "data": {"resultType": "scalar", "result": [1.5, text]}})
            } else {
                json!({"status": "success", "data": {"resultType": "vector",
                    "result": [{"metric": {"pod": "a"}, "value": [1.5, text]}]}})
            };
            let got = parse_value(body.to_string().as_bytes())
                .expect("a valid answer")
                .expect("one sample");
            if v.is_nan() {
                prop_assert!(got.is_nan());
            } else {
                prop_assert_eq!(got, v);
            }
        }

        #[test]
        fn readings_are_finite_and_counters_never_negative(
            values in vec(any::<Option<f64>>(), 10),
            interval in prop_oneof![Just(0.0), Just(15.0), any::<f64>()],
        ) {
            let values: BTreeMap<Signal, Option<f64>> =
                SIGNALS.iter().copied().zip(values).collect();
            let r = Readings::from_values(&values, interval);
            for v in [r.ttft, r.itl, r.e2e, r.queue_per_replica, r.kv_cache].into_iter().flatten() {
                prop_assert!(v.is_finite(), "{}", v);
            }
            for v in [r.rps, r.tokens_per_second, r.throughput, r.arrivals].into_iter().flatten() {
                prop_assert!(v.is_finite() && v >= 0.0, "{}", v);
            }
        }
    }
}
