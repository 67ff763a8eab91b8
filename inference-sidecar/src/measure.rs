//! Measuring one request from what streams back: time to first token (at
//! the first chunk with content, reasoning or tool calls, not the role-only
//! chunk), inter-token latency ((t_last - t_first) / (tokens - 1), tokens
//! from usage.completion_tokens when present, else content chunks),
//! end-to-end latency and tokens. Pure: times are passed in.
//!
//! The proxy reads each chunk with [`summarize`]: a targeted parse that
//! keeps only what the measurement needs (whether a choice carries output,
//! how many choices, the usage counts) and skips everything else without
//! building it ([`classify`] and [`usage_of`] read a parsed
//! `serde_json::Value` the same way; the tests hold them equal).

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
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

/// What the measurement needs of one chunk (a `data:` payload, or a
/// non-streamed answer), read by [`summarize`] without building the JSON.
/// Duplicated keys read as a `serde_json::Value` does: the last one counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChunkSummary {
    /// The length of `choices` when it is an array.
    pub choices: Option<usize>,
    /// Whether one of the choices carries output (a non-empty `text`, or
    /// `delta` with a non-empty `content`, `reasoning_content` or
    /// `reasoning`, or a non-empty `tool_calls` array).
    pub output: bool,
    /// `usage` when present: its `prompt_tokens` and `completion_tokens`
    /// (0 when missing or not unsigned integers; both 0 for a `null`).
    pub usage: Option<Usage>,
    /// Whether `usage` is present and not `null`.
    pub usage_set: bool,
}

impl ChunkSummary {
    /// The chunk's kind, as [`classify`] gives it.
    pub fn kind(&self) -> ChunkKind {
        if self.usage_set && self.choices.is_none_or(|n| n == 0) {
            ChunkKind::Usage
        } else if self.output {
            ChunkKind::Token
        } else {
            ChunkKind::Other
        }
    }
}

/// Reads a chunk (one JSON object; anything else is None, as a payload
/// that is not JSON): only the members the measurement needs are looked
/// at, every other value is skipped by the parser without being built.
/// Invalid UTF-8 reads as replaced (as the text of the event would be).
pub fn summarize(json: &[u8]) -> Option<ChunkSummary> {
    match serde_json::from_slice(json) {
        Ok(s) => Some(s),
        Err(_) if std::str::from_utf8(json).is_err() => {
            serde_json::from_str(&String::from_utf8_lossy(json)).ok()
        }
        Err(_) => None,
    }
}

impl<'de> Deserialize<'de> for ChunkSummary {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(TopVisitor)
    }
}

/// The members [`summarize`] reads, matched without allocating.
enum Member {
    Choices,
    Usage,
    Text,
    Delta,
    Content,
    ReasoningContent,
    Reasoning,
    ToolCalls,
    PromptTokens,
    CompletionTokens,
    Other,
}

impl<'de> Deserialize<'de> for Member {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Member;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Member, E> {
                Ok(match v {
                    "choices" => Member::Choices,
                    "usage" => Member::Usage,
                    "text" => Member::Text,
                    "delta" => Member::Delta,
                    "content" => Member::Content,
                    "reasoning_content" => Member::ReasoningContent,
                    "reasoning" => Member::Reasoning,
                    "tool_calls" => Member::ToolCalls,
                    "prompt_tokens" => Member::PromptTokens,
                    "completion_tokens" => Member::CompletionTokens,
                    _ => Member::Other,
                })
            }
        }
        d.deserialize_identifier(V)
    }
}

/// A value read leniently: any JSON value is accepted; those of another
/// type than the one looked for read as the default (as `Value::as_str`
/// and the like give None).
trait Lenient: Default + Sized {
    /// Reads an object.
    fn map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Self::default())
    }
    /// Reads an array.
    fn seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Self::default())
    }
    /// Reads a string.
    fn str(_: &str) -> Self {
        Self::default()
    }
    /// Reads an integer.
    fn u64(_: u64) -> Self {
        Self::default()
    }
    /// Reads `null`.
    fn null() -> Self {
        Self::default()
    }
}

/// Deserializes a [`Lenient`] type from any JSON value.
struct LenientVisitor<T>(std::marker::PhantomData<T>);

impl<'de, T: Lenient> Visitor<'de> for LenientVisitor<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        Ok(u64::try_from(v).map_or_else(|_| T::default(), T::u64))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        Ok(T::u64(v))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        Ok(T::str(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<T, E> {
        Ok(T::null())
    }
    fn visit_none<E: de::Error>(self) -> Result<T, E> {
        Ok(T::null())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<T, A::Error> {
        T::seq(seq)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        T::map(map)
    }
}

/// Reads the next map value as `T`, leniently.
fn lenient<'de, T: Lenient, A: MapAccess<'de>>(map: &mut A) -> Result<T, A::Error> {
    struct Seed<T>(std::marker::PhantomData<T>);
    impl<'de, T: Lenient> de::DeserializeSeed<'de> for Seed<T> {
        type Value = T;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
            d.deserialize_any(LenientVisitor(std::marker::PhantomData))
        }
    }
    map.next_value_seed(Seed(std::marker::PhantomData))
}

/// A string that is not empty.
#[derive(Default)]
struct NonEmptyStr(bool);

impl Lenient for NonEmptyStr {
    fn str(v: &str) -> Self {
        Self(!v.is_empty())
    }
}

/// An array that is not empty (its elements skipped).
#[derive(Default)]
struct NonEmptyArray(bool);

impl Lenient for NonEmptyArray {
    fn seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        let mut any = false;
        while seq.next_element::<IgnoredAny>()?.is_some() {
            any = true;
        }
        Ok(Self(any))
    }
}

/// An unsigned integer (as `Value::as_u64`).
#[derive(Default)]
struct Count(u64);

impl Lenient for Count {
    fn u64(v: u64) -> Self {
        Self(v)
    }
}

/// `choices`: how many, and whether one carries output.
#[derive(Default)]
struct Choices {
    len: Option<usize>,
    output: bool,
}

impl Lenient for Choices {
    fn seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        let mut len = 0;
        let mut output = false;
        while let Some(c) = seq.next_element_seed(ChoiceSeed)? {
            len += 1;
            output |= c.0;
        }
        Ok(Self {
            len: Some(len),
            output,
        })
    }
}

struct ChoiceSeed;

impl<'de> de::DeserializeSeed<'de> for ChoiceSeed {
    type Value = Choice;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Choice, D::Error> {
        d.deserialize_any(LenientVisitor(std::marker::PhantomData))
    }
}

/// One choice: whether it carries output.
#[derive(Default)]
struct Choice(bool);

impl Lenient for Choice {
    fn map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let (mut text, mut delta) = (false, false);
        while let Some(key) = map.next_key::<Member>()? {
            match key {
                Member::Text => text = lenient::<NonEmptyStr, _>(&mut map)?.0,
                Member::Delta => delta = lenient::<Delta, _>(&mut map)?.0,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Self(text || delta))
    }
}

/// A choice's `delta`: whether it carries output.
#[derive(Default)]
struct Delta(bool);

impl Lenient for Delta {
    fn map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        // content, reasoning_content, reasoning, tool_calls
        let mut parts = [false; 4];
        while let Some(key) = map.next_key::<Member>()? {
            let i = match key {
                Member::Content => 0,
                Member::ReasoningContent => 1,
                Member::Reasoning => 2,
                Member::ToolCalls => {
                    parts[3] = lenient::<NonEmptyArray, _>(&mut map)?.0;
                    continue;
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            parts[i] = lenient::<NonEmptyStr, _>(&mut map)?.0;
        }
        Ok(Self(parts.iter().any(|p| *p)))
    }
}

/// `usage`: its counts, and whether it is `null`.
#[derive(Default)]
struct UsageMember {
    counts: Usage,
    null: bool,
}

impl Lenient for UsageMember {
    fn map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let mut counts = Usage::default();
        while let Some(key) = map.next_key::<Member>()? {
            match key {
                Member::PromptTokens => counts.prompt = lenient::<Count, _>(&mut map)?.0,
                Member::CompletionTokens => counts.completion = lenient::<Count, _>(&mut map)?.0,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Self {
            counts,
            null: false,
        })
    }
    fn null() -> Self {
        Self {
            counts: Usage::default(),
            null: true,
        }
    }
}

/// The chunk itself: an object (anything else is an error: not a chunk).
struct TopVisitor;

impl<'de> Visitor<'de> for TopVisitor {
    type Value = ChunkSummary;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ChunkSummary, A::Error> {
        let mut s = ChunkSummary::default();
        while let Some(key) = map.next_key::<Member>()? {
            match key {
                Member::Choices => {
                    let c = lenient::<Choices, _>(&mut map)?;
                    s.choices = c.len;
                    s.output = c.output;
                }
                Member::Usage => {
                    let u = lenient::<UsageMember, _>(&mut map)?;
                    s.usage = Some(u.counts);
                    s.usage_set = !u.null;
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(s)
    }
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
        let usage = usage_of(chunk);
        self.record(classify(chunk), usage, at)
    }

    /// [`StreamMeasure::chunk`] for a chunk read by [`summarize`].
    pub fn summary(&mut self, chunk: &ChunkSummary, at: Duration) -> ChunkKind {
        self.record(chunk.kind(), chunk.usage, at)
    }

    fn record(&mut self, kind: ChunkKind, usage: Option<Usage>, at: Duration) -> ChunkKind {
        match kind {
            ChunkKind::Token => {
                self.first.get_or_insert(at);
                self.last = Some(at);
                self.chunks += 1;
            }
            ChunkKind::Usage => self.usage = usage,
            ChunkKind::Other => {
                if let Some(u) = usage {
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

    /// What the former reading (a whole `Value`) made of a payload: its
    /// kind and usage, or None when it is not JSON.
    fn by_value(json: &[u8]) -> Option<(ChunkKind, Option<Usage>)> {
        let text = String::from_utf8_lossy(json);
        let v: Value = serde_json::from_str(&text).ok()?;
        Some((classify(&v), usage_of(&v)))
    }

    /// What the targeted reading makes of it, for the same comparison (a
    /// JSON value that is not an object: as the former reading's, no kind
    /// but Other and no usage).
    fn by_summary(json: &[u8]) -> Option<(ChunkKind, Option<Usage>)> {
        match summarize(json) {
            Some(s) => Some((s.kind(), s.usage)),
            None => {
                let text = String::from_utf8_lossy(json);
                serde_json::from_str::<Value>(&text)
                    .ok()
                    .filter(|v| !v.is_object())
                    .map(|_| (ChunkKind::Other, None))
            }
        }
    }

    #[test]
    fn the_targeted_reading_of_chunks() {
        let usage = |p, c| {
            Some(Usage {
                prompt: p,
                completion: c,
            })
        };
        for (json, kind, want_usage) in [
            (
                &br#"{"id":"c","choices":[{"index":0,"delta":{"content":"x"},"logprobs":null}],"usage":null}"#[..],
                ChunkKind::Token,
                usage(0, 0),
            ),
            (
                br#"{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}"#,
                ChunkKind::Usage,
                usage(7, 3),
            ),
            // A non-streamed answer: its usage; `message` is not output.
            (
                br#"{"choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":2,"completion_tokens":1}}"#,
                ChunkKind::Other,
                usage(2, 1),
            ),
            (br#"{"choices":[{"text":"t"}]}"#, ChunkKind::Token, None),
            (
                br#"{"choices":[{"delta":{"tool_calls":[{"index":0}]}}]}"#,
                ChunkKind::Token,
                None,
            ),
            (
                br#"{"choices":[{"delta":{"tool_calls":[]}}]}"#,
                ChunkKind::Other,
                None,
            ),
            (
                br#"{"choices":[{"delta":{"reasoning":"r"}}]}"#,
                ChunkKind::Token,
                None,
            ),
            // Other types than expected read as absent, not as errors.
            (
                br#"{"choices":[1,"x",null,{"text":5},{"delta":[1]},{"delta":{"content":"y"}}]}"#,
                ChunkKind::Token,
                None,
            ),
            (
                br#"{"choices":{"text":"t"},"usage":{"prompt_tokens":-1,"completion_tokens":2.0}}"#,
                ChunkKind::Usage,
                usage(0, 0),
            ),
            (br#"{"usage":"many"}"#, ChunkKind::Usage, usage(0, 0)),
            // Duplicated keys: the last counts, as in a Value.
            (
                br#"{"choices":[{"text":"a","text":""}]}"#,
                ChunkKind::Other,
                None,
            ),
            (
                br#"{"usage":{"completion_tokens":1},"usage":null,"choices":[]}"#,
                ChunkKind::Other,
                usage(0, 0),
            ),
            // Escaped names and values.
            (
                br#"{"cho\u0069ces":[{"delta":{"content":"\n"}}]}"#,
                ChunkKind::Token,
                None,
            ),
        ] {
            let text = String::from_utf8_lossy(json);
            let s = summarize(json).expect(&text);
            assert_eq!((s.kind(), s.usage), (kind, want_usage), "{text}");
            assert_eq!(by_summary(json), by_value(json), "{text}");
        }
    }

    #[test]
    fn what_is_not_a_chunk_is_none() {
        for json in [
            &b""[..],
            b"[DONE]",
            b"not json",
            b"[1,2]",
            b"\"text\"",
            b"null",
            br#"{"choices":[{"delta":{"content":"x"}}]"#,
            br#"{"choices":[]} trailing"#,
            br#"{"choices":[{"delta":{"content":"unterminated}}]}"#,
        ] {
            assert_eq!(summarize(json), None, "{}", String::from_utf8_lossy(json));
        }
        // Deep nesting is skipped without recursion (no stack overflow).
        for (member, kind) in [
            ("x", ChunkKind::Other),
            ("choices", ChunkKind::Other),
            ("usage", ChunkKind::Usage),
        ] {
            let deep = format!(
                r#"{{"{member}":[{}{}]}}"#,
                "[".repeat(100_000),
                "]".repeat(100_000)
            );
            let s = summarize(deep.as_bytes()).expect(member);
            assert_eq!(s.kind(), kind, "{member}");
        }
        // Invalid UTF-8 reads as replaced, as the text of the event.
        let bad = b"{\"choices\":[{\"text\":\"\xff\"}]}";
        assert_eq!(summarize(bad).map(|s| s.kind()), Some(ChunkKind::Token));
    }

    #[test]
    fn a_stream_measured_from_summaries_is_measured_as_from_values() {
        let chunks = [
            json!({"choices": [{"delta": {"role": "assistant", "content": ""}}]}),
            json!({"choices": [{"delta": {"content": "a"}}]}),
            json!({"choices": [{"delta": {"content": "b"}, "finish_reason": "stop"}], "usage": null}),
            json!({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}}),
        ];
        let (mut a, mut b) = (StreamMeasure::default(), StreamMeasure::default());
        for (i, c) in chunks.iter().enumerate() {
            let at = ms(10 * i as u64);
            let s = summarize(c.to_string().as_bytes()).expect("chunk");
            assert_eq!(a.chunk(c, at), b.summary(&s, at));
        }
        assert_eq!(a.finish(ms(50)), b.finish(ms(50)));
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::collection::{btree_map, vec};
    use proptest::prelude::*;
    use serde_json::{Map, json};

    fn leaf() -> impl Strategy<Value = Value> + Clone {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-1e6f64..1e6).prop_map(Value::from),
            Just(json!("")),
            "[a-z ]{0,6}".prop_map(Value::String),
        ]
    }

    /// Any value, a few levels deep, with the member names the reading
    /// looks for among others.
    fn value() -> impl Strategy<Value = Value> {
        let names = prop_oneof![
            Just("choices".to_string()),
            Just("usage".to_string()),
            Just("text".to_string()),
            Just("delta".to_string()),
            Just("content".to_string()),
            Just("reasoning_content".to_string()),
            Just("reasoning".to_string()),
            Just("tool_calls".to_string()),
            Just("prompt_tokens".to_string()),
            Just("completion_tokens".to_string()),
            "[a-z_]{1,8}",
        ];
        leaf().prop_recursive(4, 48, 5, move |inner| {
            prop_oneof![
                vec(inner.clone(), 0..4).prop_map(Value::Array),
                btree_map(names.clone(), inner, 0..5)
                    .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn the_targeted_reading_agrees_with_a_whole_value(v in value()) {
            let json = v.to_string();
            prop_assert_eq!(by_summary_of(json.as_bytes()), by_value_of(json.as_bytes()), "{}", json);
        }

        #[test]
        fn duplicated_members_read_as_in_a_value(
            members in vec((prop_oneof![Just("choices"), Just("usage"), Just("text"), Just("delta"), Just("content")], value()), 0..6),
        ) {
            // Rendered by hand: a Value would not keep the duplicates.
            let inner: Vec<String> = members.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
            let choice = format!("{{{}}}", inner.join(","));
            let json = format!("{{\"choices\":[{choice}],{}}}", inner.join(",")).replace(",}", "}");
            prop_assert_eq!(by_summary_of(json.as_bytes()), by_value_of(json.as_bytes()), "{}", json);
        }

        #[test]
        fn never_panics_on_bytes(bytes in vec(any::<u8>(), 0..256)) {
            let _ = summarize(&bytes);
        }
    }

    fn by_value_of(json: &[u8]) -> Option<(ChunkKind, Option<Usage>)> {
        let text = String::from_utf8_lossy(json);
        let v: Value = serde_json::from_str(&text).ok()?;
        Some((classify(&v), usage_of(&v)))
    }

    fn by_summary_of(json: &[u8]) -> Option<(ChunkKind, Option<Usage>)> {
        match summarize(json) {
            Some(s) => Some((s.kind(), s.usage)),
            None => {
                let text = String::from_utf8_lossy(json);
                serde_json::from_str::<Value>(&text)
                    .ok()
                    .filter(|v| !v.is_object())
                    .map(|_| (ChunkKind::Other, None))
            }
        }
    }
}
