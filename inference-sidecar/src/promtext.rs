//! A small parser of the Prometheus text format, enough to read an engine's
//! gauges and counters. Malformed lines are skipped, never fatal.

use std::collections::BTreeMap;

/// One sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Value.
    pub value: f64,
}

fn parse_labels(s: &str) -> Option<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let after = after.trim_start().strip_prefix('"')?;
        // Find the closing quote, honouring escapes.
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => return None,
                },
                '"' => {
                    end = Some(i);
                    break;
                }
                c => value.push(c),
            }
        }
        let end = end?;
        out.insert(key.trim().trim_start_matches(',').trim().to_string(), value);
        rest = after[end + 1..]
            .trim_start()
            .trim_start_matches(',')
            .trim_start();
    }
    Some(out)
}

/// Parses the text exposition format.
pub fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (head, value_part) = if let Some(close) = line.rfind('}') {
            (&line[..=close], line[close + 1..].trim())
        } else {
            match line.split_once(char::is_whitespace) {
                Some((h, v)) => (h, v.trim()),
                None => continue,
            }
        };
        let value_str = value_part.split_whitespace().next().unwrap_or("");
        let Ok(value) = value_str.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match head.split_once('{') {
            Some((n, l)) => match parse_labels(l.trim_end_matches('}')) {
                Some(labels) => (n.to_string(), labels),
                None => continue,
            },
            None => (head.to_string(), BTreeMap::new()),
        };
        if name.is_empty() {
            continue;
        }
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

/// Sum of the samples named `name` (over all label sets), if any exists.
pub fn sum(samples: &[Sample], name: &str) -> Option<f64> {
    let mut found = false;
    let mut total = 0.0;
    for s in samples.iter().filter(|s| s.name == name) {
        found = true;
        total += s.value;
    }
    found.then_some(total)
}

/// Mean of the samples named `name`, if any exists.
pub fn mean(samples: &[Sample], name: &str) -> Option<f64> {
    let values: Vec<f64> = samples
        .iter()
        .filter(|s| s.name == name)
        .map(|s| s.value)
        .collect();
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_labels_and_values() {
        let text = r#"
# HELP vllm:num_requests_waiting Number of requests waiting.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="llama"} 3.0
vllm:num_requests_running{model_name="a,b \"q\""} 7
tgi_queue_size 2
broken line here
bad{unterminated="x 1
vllm:gpu_cache_usage_perc{model_name="llama"} 0.25 1700000000000
"#;
        let s = parse(text);
        assert_eq!(sum(&s, "vllm:num_requests_waiting"), Some(3.0));
        assert_eq!(
            s[1].labels.get("model_name").map(String::as_str),
            Some("a,b \"q\"")
        );
        assert_eq!(sum(&s, "tgi_queue_size"), Some(2.0));
        assert_eq!(
            mean(&s, "vllm:gpu_cache_usage_perc"),
            Some(0.25),
            "timestamps ignored"
        );
        assert_eq!(sum(&s, "missing"), None);
        assert_eq!(s.len(), 4);
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::collection::{btree_map, vec};
    use proptest::prelude::*;

    /// `s` as a quoted label value of the exposition format.
    fn quote(s: &str) -> String {
        let mut out = String::from("\"");
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

    fn sample() -> impl Strategy<Value = Sample> {
        (
            "[a-zA-Z_:][a-zA-Z0-9_:]{0,24}",
            btree_map("[a-zA-Z_][a-zA-Z0-9_]{0,12}", any::<String>(), 0..4),
            any::<f64>().prop_filter("comparable", |v| !v.is_nan()),
        )
            .prop_map(|(name, labels, value)| Sample {
                name,
                labels,
                value,
            })
    }

    fn render(s: &Sample, timestamp: Option<i64>, spaced: bool) -> String {
        let sp = if spaced { " " } else { "" };
        let mut line = s.name.clone();
        if !s.labels.is_empty() || spaced {
            let labels: Vec<String> = s
                .labels
                .iter()
                .map(|(k, v)| format!("{k}{sp}={sp}{}", quote(v)))
                .collect();
            line.push_str(&format!("{{{sp}{}{sp}}}", labels.join(&format!(",{sp}"))));
        }
        line.push_str(&format!(" {}", s.value));
        if let Some(t) = timestamp {
            line.push_str(&format!(" {t}"));
        }
        line
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn well_formed_samples_read_back(
            samples in vec((sample(), any::<Option<i64>>(), any::<bool>()), 0..12),
            comments in vec("# [ -~]{0,20}", 0..3),
        ) {
            let mut text: Vec<String> = comments;
            text.extend(samples.iter().map(|(s, t, sp)| render(s, *t, *sp)));
            let got = parse(&text.join("\n"));
            let want: Vec<Sample> = samples.into_iter().map(|(s, ..)| s).collect();
            prop_assert_eq!(got, want);
        }

        #[test]
        fn never_panics_and_names_every_sample(text in any::<String>()) {
            for s in parse(&text) {
                prop_assert!(!s.name.is_empty());
            }
        }

        #[test]
        fn never_panics_on_exposition_like_text(
            lines in vec("[a-z_:{}=\", \\\\#.0-9eE+\\-InfNa\\n]{0,40}", 0..16),
        ) {
            let text = lines.join("\n");
            let samples = parse(&text);
            for s in &samples {
                prop_assert!(!s.name.is_empty());
                prop_assert!(sum(&samples, &s.name).is_some());
                prop_assert!(mean(&samples, &s.name).is_some());
            }
        }
    }
}
