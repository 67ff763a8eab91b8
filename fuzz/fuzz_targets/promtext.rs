//! The sidecar's Prometheus text parser and the engine stats read from it.
//!
//! Checked: `parse` never panics and yields only named samples; for every
//! engine kind, the sanitized stats hold only finite, non-negative values,
//! queue and batch at most `MAX_PLAUSIBLE_REQUESTS`, KV-cache use within
//! 0..=1, and every value dropped is reported once.

#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_sidecar::engine::{EngineKind, EngineStats, MAX_PLAUSIBLE_REQUESTS};
use strata_sidecar::promtext;

fn check(raw: EngineStats) {
    let (s, why) = raw.sanitized();
    for (v, max) in [
        (s.queue, MAX_PLAUSIBLE_REQUESTS),
        (s.running, MAX_PLAUSIBLE_REQUESTS),
        (s.kv_cache, 1.0),
    ] {
        if let Some(v) = v {
            assert!(v.is_finite() && v >= 0.0 && v <= max, "{v} kept");
        }
    }
    let some = |e: &EngineStats| [e.queue, e.running, e.kv_cache].iter().flatten().count();
    assert_eq!(
        some(&raw),
        some(&s) + why.len(),
        "each dropped value has a reason"
    );
    assert_eq!(s.sanitized(), (s, Vec::new()), "sanitizing is idempotent");
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let samples = promtext::parse(&text);
    for s in &samples {
        assert!(!s.name.is_empty());
        let _ = promtext::sum(&samples, &s.name);
        let _ = promtext::mean(&samples, &s.name);
    }
    for kind in [
        EngineKind::Vllm,
        EngineKind::Sglang,
        EngineKind::Tgi,
        EngineKind::Llamacpp,
        EngineKind::Custom,
    ] {
        let raw = kind.raw_stats(&samples);
        check(raw);
        assert_eq!(kind.stats(&samples), raw.sanitized().0);
    }
});
