//! Measuring one request from what streams back: time to first token (at
//! the first chunk with content, reasoning or tool calls, not the role-only
//! chunk), inter-token latency ((t_last - t_first) / (tokens - 1), tokens
//! from usage.completion_tokens when present, else content chunks),
//! end-to-end latency and tokens. Pure: times are passed in.

use std::time::Duration;

use serde_json::Value;

/// What a chunk contributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkKind {
    /// Carries generated output (content, text, reasoning or tool calls).
    Token,
    /// The usage chunk (choices empty, usage present).
    Usage,
    /// Anything else (role-only, finish-only, malformed).
    Other,
}

/// Classifies a parsed `data:` payload.
pub fn classify(chunk: &Value) -> ChunkKind {
    let choices = chunk.get("choices").and_then(Value::as_array);
    if chunk.get("usage").is_some_and(|u| !u.is_null()) && choices.is_none_or(|c| c.is_empty()) {
        return ChunkKind::Usage;
    }
    let has_output = choices.is_some_and(|cs| {
        cs.iter().any(|c| {
            let nonempty =
                |v: Option<&Value>| v.and_then(Value::as_str).is_some_and(|s| !s.is_empty());
            let delta = c.get("delta");
            nonempty(c.get("text"))
                || nonempty(delta.and_then(|d| d.get("content")))
                || nonempty(delta.and_then(|d| d.get("reasoning_content")))
                || nonempty(delta.and_then(|d| d.get("reasoning")))
                || delta
                    .and_then(|d| d.get("tool_calls"))
                    .and_then(Value::as_array)
                    .is_some_and(|t| !t.is_empty())
        })
    });
    if has_output {
        ChunkKind::Token
    } else {
        ChunkKind::Other
    }
}

/// Token counts from a usage object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt: u64,
    /// Generated tokens.
    pub completion: u64,
}

/// Reads `usage` from a response or chunk.
pub fn usage_of(v: &Value) -> Option<Usage> {
    let u = v.get("usage")?;
    Some(Usage {
        prompt: u.get("prompt_tokens").and_then(Value::as_u64).unwrap_or(0),
        completion: u
            .get("completion_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(0),
    })
}

/// The measurement of one streamed request, fed chunk by chunk.
#[derive(Debug, Clone, Default)]
pub struct StreamMeasure {
    first: Option<Duration>,
    last: Option<Duration>,
    chunks: u64,
    usage: Option<Usage>,
}

/// The result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measurement {
    /// Time to first token, if any token came.
    pub ttft: Option<Duration>,
    /// Mean inter-token latency, if at least two tokens came.
    pub itl: Option<Duration>,
    /// Whole request.
    pub e2e: Duration,
    /// Prompt tokens (from usage; 0 if unknown).
    pub prompt_tokens: u64,
    /// Generated tokens (usage, else content chunks).
    pub completion_tokens: u64,
}

impl StreamMeasure {
    /// Records one parsed chunk that arrived `at` after the request started.
    /// Returns its kind (the proxy drops a usage chunk it asked for itself).
    pub fn chunk(&mut self, chunk: &Value, at: Duration) -> ChunkKind {
        let kind = classify(chunk);
        match kind {
            ChunkKind::Token => {
                self.first.get_or_insert(at);
                self.last = Some(at);
                self.chunks += 1;
            }
            ChunkKind::Usage => self.usage = usage_of(chunk),
            ChunkKind::Other => {
                if let Some(u) = usage_of(chunk) {
                    self.usage = Some(u);
                }
            }
        }
        kind
    }

    /// The measurement, the stream having ended at `end`.
    pub fn finish(&self, end: Duration) -> Measurement {
        let tokens = self
            .usage
            .map(|u| u.completion)
            .filter(|c| *c > 0)
            .unwrap_or(self.chunks);
        let itl = match (self.first, self.last) {
            (Some(f), Some(l)) if tokens >= 2 && l > f => Some((l - f) / (tokens - 1) as u32),
            _ => None,
        };
        Measurement {
            ttft: self.first,
            itl,
            e2e: end,
            prompt_tokens: self.usage.map_or(0, |u| u.prompt),
            completion_tokens: tokens,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn ttft_ignores_the_role_only_chunk_and_itl_uses_usage() {
        let mut m = StreamMeasure::default();
        let role = json!({"choices": [{"delta": {"role": "assistant", "content": ""}}]});
        assert_eq!(m.chunk(&role, ms(5)), ChunkKind::Other);
        // One event carrying several tokens: usage says 5 tokens in 3 chunks.
        assert_eq!(
            m.chunk(
                &json!({"choices": [{"delta": {"content": "Hel"}}]}),
                ms(100)
            ),
            ChunkKind::Token
        );
        m.chunk(
            &json!({"choices": [{"delta": {"content": "lo, wor"}}]}),
            ms(140),
        );
        m.chunk(
            &json!({"choices": [{"delta": {"content": "ld"}, "finish_reason": "stop"}]}),
            ms(180),
        );
        let usage = json!({"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 5}});
        assert_eq!(m.chunk(&usage, ms(181)), ChunkKind::Usage);
        let r = m.finish(ms(182));
        assert_eq!(r.ttft, Some(ms(100)));
        assert_eq!(r.itl, Some(ms(20)), "(180-100)/(5-1)");
        assert_eq!((r.prompt_tokens, r.completion_tokens), (12, 5));
        assert_eq!(r.e2e, ms(182));
    }

    #[test]
    fn without_usage_tokens_are_chunks() {
        let mut m = StreamMeasure::default();
        for (i, t) in [10u64, 30, 50].iter().enumerate() {
            m.chunk(&json!({"choices": [{"text": format!("t{i}")}]}), ms(*t));
        }
        let r = m.finish(ms(60));
        assert_eq!(r.completion_tokens, 3);
        assert_eq!(r.itl, Some(ms(20)));
    }

    #[test]
    fn reasoning_and_tool_calls_count_as_output() {
        assert_eq!(
            classify(&json!({"choices": [{"delta": {"reasoning_content": "hmm"}}]})),
            ChunkKind::Token
        );
        assert_eq!(
            classify(
                &json!({"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"name": "f"}}]}}]})
            ),
            ChunkKind::Token
        );
        assert_eq!(
            classify(&json!({"choices": [{"delta": {}, "finish_reason": "stop"}]})),
            ChunkKind::Other
        );
        assert_eq!(classify(&json!("garbage")), ChunkKind::Other);
    }

    #[test]
    fn a_single_token_has_no_itl_and_no_tokens_no_ttft() {
        let mut m = StreamMeasure::default();
        m.chunk(&json!({"choices": [{"delta": {"content": "x"}}]}), ms(10));
        assert_eq!(m.finish(ms(11)).itl, None);
        assert_eq!(StreamMeasure::default().finish(ms(5)).ttft, None);
    }
}
