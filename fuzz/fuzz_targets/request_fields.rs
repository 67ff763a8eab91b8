//! The request-field parser and the `include_usage` rewrite, on any bytes.
//!
//! Checked: `parse` never panics; when it accepts a body and the client did
//! not ask for usage, `with_usage` rewrites it, and the result is accepted
//! by `parse` with the same model and stream and `include_usage` set, and
//! (when the input is JSON serde_json can hold as a value) is the input
//! object with `stream_options.include_usage` = true and nothing else
//! changed (`stream_options` itself goes through serde_json once more).

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use strata_sidecar::request::{parse, with_usage};

fuzz_target!(|data: &[u8]| {
    let Ok(fields) = parse(data) else {
        return;
    };
    let Some(out) = with_usage(data, &fields) else {
        assert!(
            fields.include_usage,
            "with_usage refused a body parse accepted"
        );
        return;
    };
    assert!(
        !fields.include_usage,
        "rewrote a body that already asks for usage"
    );
    let again = parse(&out).expect("the rewritten body is accepted");
    assert!(again.include_usage);
    assert_eq!(again.model, fields.model);
    assert_eq!(again.stream, fields.stream);
    assert_eq!(with_usage(&out, &again), None, "the rewrite is idempotent");

    if let Ok(mut want) = serde_json::from_slice::<Value>(data) {
        let got: Value = serde_json::from_slice(&out).expect("the rewritten body is JSON");
        let obj = want.as_object_mut().expect("parse accepted an object");
        let opts = obj.entry("stream_options").or_insert(Value::Null);
        if opts.is_null() {
            *opts = Value::Object(serde_json::Map::new());
        }
        opts.as_object_mut()
            .expect("parse accepted stream_options as an object")
            .insert("include_usage".into(), Value::Bool(true));
        // `stream_options` is re-serialized, and serde_json's float parsing
        // is best-effort (without its `float_roundtrip` feature): a float in
        // it may come back one unit in the last place apart. The rest of the
        // body is forwarded byte for byte.
        *opts = serde_json::from_str(&opts.to_string()).expect("JSON");
        assert_eq!(got, want, "the rewrite changed more than include_usage");
    }
});
