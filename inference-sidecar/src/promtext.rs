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
