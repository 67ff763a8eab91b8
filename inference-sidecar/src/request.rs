//! The few fields of an OpenAI request the proxy needs (`model`, `stream`,
//! `stream_options.include_usage`), read without building the request in
//! memory: every other field is skipped by the parser (a 30 MB integer
//! prompt costs no allocation), and the body is forwarded as received, but
//! for `stream_options`, which the proxy may set to ask for the usage chunk.
//! Pure: no I/O.
//!
//! Strict where a lenient reading could be abused: the body must be one
//! JSON object whose known fields appear once (Python's parser takes the
//! last of duplicated keys, so a duplicated `model` could name one model to
//! the proxy and another to the engine), `model` a string, `stream` a bool.

use serde::Deserialize;
use serde_json::value::RawValue;

/// Largest `stream_options` object accepted (it holds two booleans).
pub const MAX_STREAM_OPTIONS_BYTES: usize = 4096;

/// What the proxy reads of a request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fields {
    /// The requested model or adapter.
    pub model: Option<String>,
    /// Whether the answer is streamed.
    pub stream: bool,
    /// Whether the client asked for the usage chunk itself.
    pub include_usage: bool,
    /// Where `stream_options` sits in the body (byte range), if present.
    stream_options: Option<(usize, usize)>,
}

/// Why a request body is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FieldError {
    /// Not a JSON object, or a known field given twice.
    #[error("the body must be one JSON object: {0}")]
    Json(String),
    /// `model` is not a string.
    #[error("`model` must be a string")]
    Model,
    /// `stream` is not a boolean.
    #[error("`stream` must be true or false")]
    Stream,
    /// `stream_options` is not a small object.
    #[error("`stream_options` must be an object of at most {MAX_STREAM_OPTIONS_BYTES} bytes")]
    StreamOptions,
}

#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(borrow, default)]
    stream: Option<&'a RawValue>,
    #[serde(borrow, default)]
    stream_options: Option<&'a RawValue>,
}

/// Byte offset of `part` inside `whole` (`part` borrowed from `whole`).
fn offset_in(whole: &[u8], part: &str) -> Option<usize> {
    let start = (part.as_ptr() as usize).checked_sub(whole.as_ptr() as usize)?;
    (start + part.len() <= whole.len()).then_some(start)
}

/// Reads the fields.
pub fn parse(body: &[u8]) -> Result<Fields, FieldError> {
    // A struct would also read from an array (by position).
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(FieldError::Json("expected an object".into()));
    }
    let head: Head<'_> =
        serde_json::from_slice(body).map_err(|e| FieldError::Json(e.to_string()))?;
    let model = match head.model.map(RawValue::get) {
        None | Some("null") => None,
        Some(raw) => Some(serde_json::from_str::<String>(raw).map_err(|_| FieldError::Model)?),
    };
    let stream = match head.stream.map(RawValue::get) {
        None | Some("null") => false,
        Some(raw) => serde_json::from_str::<bool>(raw).map_err(|_| FieldError::Stream)?,
    };
    let mut include_usage = false;
    let mut span = None;
    if let Some(raw) = head.stream_options.map(RawValue::get)
        && raw != "null"
    {
        if raw.len() > MAX_STREAM_OPTIONS_BYTES {
            return Err(FieldError::StreamOptions);
        }
        let opts: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(raw).map_err(|_| FieldError::StreamOptions)?;
        include_usage = opts.get("include_usage") == Some(&serde_json::Value::Bool(true));
        let start = offset_in(body, raw).ok_or(FieldError::StreamOptions)?;
        span = Some((start, start + raw.len()));
    }
    Ok(Fields {
        model,
        stream,
        include_usage,
        stream_options: span,
    })
}

/// The body with `stream_options.include_usage` set to true (other options
/// kept), or None when the client already asked for it.
pub fn with_usage(body: &[u8], fields: &Fields) -> Option<Vec<u8>> {
    if fields.include_usage {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() + 48);
    match fields.stream_options {
        Some((start, end)) => {
            let mut opts: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(body.get(start..end)?).ok()?;
            opts.insert("include_usage".into(), serde_json::Value::Bool(true));
            out.extend_from_slice(&body[..start]);
            out.extend_from_slice(serde_json::to_string(&opts).ok()?.as_bytes());
            out.extend_from_slice(&body[end..]);
        }
        None => {
            // Insert the member right after the opening brace.
            let open = body.iter().position(|b| *b == b'{')?;
            let rest = &body[open + 1..];
            let empty = rest
                .iter()
                .find(|b| !b.is_ascii_whitespace())
                .is_some_and(|b| *b == b'}');
            out.extend_from_slice(&body[..=open]);
            out.extend_from_slice(br#""stream_options":{"include_usage":true}"#);
            if !empty {
                out.push(b',');
            }
            out.extend_from_slice(rest);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn reads_the_fields_and_skips_the_rest() {
        let f = parse(br#"{"prompt":[1,2,3],"model":"llama","stream":true,"x":{"y":[{}]}}"#)
            .expect("ok");
        assert_eq!(f.model.as_deref(), Some("llama"));
        assert!(f.stream && !f.include_usage);
        let f = parse(br#"{"model":"a\"b","stream_options":{"include_usage":true}}"#).expect("ok");
        assert_eq!(f.model.as_deref(), Some("a\"b"));
        assert!(f.include_usage && !f.stream);
        assert_eq!(parse(b"{}").expect("ok"), Fields::default());
    }

    #[test]
    fn refuses_what_the_engine_could_read_otherwise() {
        for (body, want) in [
            (&br#"{"model":"a","model":"b"}"#[..], "Json"),
            (br#"{"model":1}"#, "Model"),
            (br#"{"stream":"true"}"#, "Stream"),
            (br#"{"stream_options":[1]}"#, "StreamOptions"),
            (br#"[1,2]"#, "Json"),
            (br#"{"model":"a"} trailing"#, "Json"),
            (b"not json", "Json"),
        ] {
            let e = parse(body).expect_err(&String::from_utf8_lossy(body));
            assert!(
                format!("{e:?}").starts_with(want),
                "{}: {e:?}",
                String::from_utf8_lossy(body)
            );
        }
        let big = format!(
            r#"{{"stream_options":{{"x":"{}"}}}}"#,
            "a".repeat(MAX_STREAM_OPTIONS_BYTES)
        );
        assert_eq!(parse(big.as_bytes()), Err(FieldError::StreamOptions));
    }

    #[test]
    fn asks_for_usage_keeping_everything_else() {
        let cases = [
            json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hé"}]}),
            json!({"stream": true, "stream_options": {"continuous_usage_stats": false}, "n": 2}),
            json!({"stream": true, "stream_options": {"include_usage": false}}),
        ];
        for v in cases {
            let body = serde_json::to_vec(&v).expect("json");
            let f = parse(&body).expect("ok");
            let out = with_usage(&body, &f).expect("rewritten");
            let got: Value = serde_json::from_slice(&out).expect("still JSON");
            let mut want = v.clone();
            want["stream_options"]["include_usage"] = json!(true);
            assert_eq!(got, want);
            assert!(parse(&out).expect("ok").include_usage);
        }
        let pretty = b"  {\n  \"stream\" : true }";
        let out = with_usage(pretty, &parse(pretty).expect("ok")).expect("rewritten");
        assert_eq!(
            serde_json::from_slice::<Value>(&out).expect("json"),
            json!({"stream": true, "stream_options": {"include_usage": true}})
        );
        let asked = br#"{"stream":true,"stream_options":{"include_usage":true}}"#;
        assert_eq!(with_usage(asked, &parse(asked).expect("ok")), None);
    }
}
