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
    /// A `null` is kept (as Some("null")): `with_usage` must replace it.
    #[serde(borrow, default, deserialize_with = "present")]
    stream_options: Option<&'a RawValue>,
}

/// A member that is present, `null` included (an `Option` reads `null` as
/// absent).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
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
    // A null `stream_options` has a span too: `with_usage` replaces it (a
    // second member would be a duplicate key, the last of which, the null,
    // the engine would read).
    if let Some(raw) = head.stream_options.map(RawValue::get) {
        if raw != "null" {
            if raw.len() > MAX_STREAM_OPTIONS_BYTES {
                return Err(FieldError::StreamOptions);
            }
            let opts: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(raw).map_err(|_| FieldError::StreamOptions)?;
            include_usage = opts.get("include_usage") == Some(&serde_json::Value::Bool(true));
        }
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
            let mut opts = match serde_json::from_slice(body.get(start..end)?).ok()? {
                serde_json::Value::Object(opts) => opts,
                serde_json::Value::Null => serde_json::Map::new(),
                _ => return None,
            };
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

    #[test]
    fn a_null_stream_options_is_replaced_not_duplicated() {
        // Found by the property tests: a second `stream_options` member was
        // inserted before the null one; the engine (Python's parser takes
        // the last of duplicated keys) read the null and sent no usage
        // chunk, and `parse` refused the rewritten body.
        for body in [
            &br#"{"stream":true,"stream_options":null}"#[..],
            br#"{ "stream_options" : null }"#,
        ] {
            let f = parse(body).expect("ok");
            assert!(!f.include_usage);
            let out = with_usage(body, &f).expect("rewritten");
            let got: Value = serde_json::from_slice(&out).expect("still JSON");
            assert_eq!(got["stream_options"], json!({"include_usage": true}));
            assert!(parse(&out).expect("one stream_options").include_usage);
        }
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::collection::{btree_map, vec};
    use proptest::prelude::*;
    use serde_json::{Map, Value, json};

    /// A JSON scalar (a float may be NaN or infinite: null).
    fn leaf() -> impl Strategy<Value = Value> + Clone {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            any::<String>().prop_map(Value::String),
        ]
    }

    /// Any JSON value, a few levels deep.
    fn value() -> impl Strategy<Value = Value> {
        leaf().prop_recursive(3, 32, 4, |inner| {
            prop_oneof![
                vec(inner.clone(), 0..4).prop_map(Value::Array),
                btree_map(any::<String>(), inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Members other than the three the parser reads.
    fn extra() -> impl Strategy<Value = Vec<(String, Value)>> {
        btree_map(
            any::<String>().prop_filter("unknown field", |k| {
                !matches!(k.as_str(), "model" | "stream" | "stream_options")
            }),
            value(),
            0..5,
        )
        .prop_map(|m| m.into_iter().collect())
    }

    /// A request: its members (in any order) and the fields it holds.
    fn request() -> impl Strategy<Value = (Vec<(String, Value)>, Option<String>, bool, bool)> {
        let model = prop_oneof![
            Just(None),
            Just(Some(Value::Null)),
            any::<String>().prop_map(|s| Some(Value::String(s))),
        ];
        let stream = prop_oneof![
            Just(None),
            Just(Some(Value::Null)),
            any::<bool>().prop_map(|b| Some(Value::Bool(b))),
        ];
        let include = prop_oneof![
            Just(None),
            any::<bool>().prop_map(|b| Some(Value::Bool(b))),
            leaf().prop_map(Some),
        ];
        // Small: `stream_options` is capped.
        let members = btree_map("[a-z_]{0,12}", leaf(), 0..4);
        let options = prop_oneof![
            Just(None),
            Just(Some(Value::Null)),
            (members, include).prop_map(|(members, include)| {
                let mut m: Map<String, Value> = members.into_iter().collect();
                if let Some(v) = include {
                    m.insert("include_usage".into(), v);
                }
                Some(Value::Object(m))
            }),
        ];
        (model, stream, options, extra()).prop_flat_map(|(model, stream, options, extra)| {
            let want_model = model.as_ref().and_then(|m| m.as_str().map(str::to_string));
            let want_stream = stream.as_ref().and_then(Value::as_bool).unwrap_or(false);
            let want_usage = options
                .as_ref()
                .and_then(|o| o.get("include_usage"))
                .is_some_and(|u| *u == Value::Bool(true));
            let mut members = extra;
            for (k, v) in [
                ("model", model),
                ("stream", stream),
                ("stream_options", options),
            ] {
                if let Some(v) = v {
                    members.push((k.to_string(), v));
                }
            }
            (
                Just(members).prop_shuffle(),
                Just(want_model),
                Just(want_stream),
                Just(want_usage),
            )
        })
    }

    /// The members as a JSON object, in their order, compact or spaced.
    fn render(members: &[(String, Value)], spaced: bool) -> Vec<u8> {
        let sep = if spaced { " \n\t" } else { "" };
        let parts: Vec<String> = members
            .iter()
            .map(|(k, v)| format!("{}{sep}:{sep}{v}", Value::String(k.clone())))
            .collect();
        format!("{sep}{{{sep}{}{sep}}}{sep}", parts.join(&format!(",{sep}"))).into_bytes()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn reads_the_fields_of_any_object(
            (members, model, stream, usage) in request(),
            spaced in any::<bool>(),
        ) {
            let body = render(&members, spaced);
            let f = parse(&body).expect("a valid request");
            prop_assert_eq!(&f.model, &model);
            prop_assert_eq!(f.stream, stream);
            prop_assert_eq!(f.include_usage, usage);

            let out = with_usage(&body, &f);
            prop_assert_eq!(out.is_some(), !usage, "rewritten unless asked already");
            let Some(out) = out else { return Ok(()) };
            let got: Value = serde_json::from_slice(&out).expect("the rewrite is JSON");
            let mut want: Value = serde_json::from_slice(&body).expect("JSON");
            let opts = &mut want["stream_options"];
            if opts.is_null() {
                *opts = json!({});
            }
            opts["include_usage"] = json!(true);
            // `stream_options` is re-serialized: its floats go through one
            // more (best-effort) parse.
            *opts = serde_json::from_str(&opts.to_string()).expect("JSON");
            prop_assert_eq!(got, want);
            let again = parse(&out).expect("the rewrite is a valid request");
            prop_assert!(again.include_usage);
            prop_assert_eq!((again.model, again.stream), (model, stream));
        }

        #[test]
        fn never_panics_on_bytes(body in vec(any::<u8>(), 0..256)) {
            if let Ok(f) = parse(&body) {
                let _ = with_usage(&body, &f);
            }
        }

        #[test]
        fn never_panics_on_damaged_requests(
            (members, ..) in request(),
            cut in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let mut body = render(&members, false);
            let at = cut.index(body.len());
            body[at] = byte;
            for b in [&body[..], &body[..at]] {
                if let Ok(f) = parse(b)
                    && let Some(out) = with_usage(b, &f)
                {
                    prop_assert!(parse(&out).expect("rewrite accepted").include_usage);
                }
            }
        }
    }
}
