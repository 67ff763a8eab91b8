//! The SSE splitter: any byte stream, read in any chunks, under any cap.
//!
//! Input: byte 0 picks the cap (4..=514 bytes), byte 1 seeds the chunk
//! sizes, the rest is the stream. Checked: the events of one unbounded read
//! obey the spec (each ends at its first blank line, the unterminated rest
//! comes from `finish`) and concatenate to the input; a capped, chunked read
//! gives the same events, never one over the cap, and fails exactly when
//! some event is over the cap.

#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_sidecar::sse::{EventTooLarge, Splitter, SseEvent};

/// Whether `s` holds an event separator ("\n\n", "\r\r" or "\r\n\r\n").
fn has_separator(s: &[u8]) -> bool {
    s.windows(2).any(|w| w == b"\n\n" || w == b"\r\r") || s.windows(4).any(|w| w == b"\r\n\r\n")
}

/// Chunk sizes from a seed: mostly tiny (to split separators and UTF-8),
/// sometimes large, zero included.
struct Chunks(u32);

impl Chunks {
    fn next(&mut self, cap: usize) -> usize {
        // xorshift32
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.0 = x;
        if x & 3 == 0 {
            (x >> 2) as usize % (2 * cap + 1)
        } else {
            (x >> 2) as usize % 5
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let [cap_byte, seed, stream @ ..] = data else {
        return;
    };
    let cap = 4 + 2 * usize::from(*cap_byte);

    // Reference: one read, no cap.
    let mut whole = Splitter::new(usize::MAX);
    let mut reference: Vec<SseEvent> = whole.feed(stream).expect("no cap, no error");
    for e in &reference {
        assert!(
            has_separator(&e.raw),
            "a complete event ends with a separator"
        );
        assert!(
            !has_separator(&e.raw[..e.raw.len() - 1]),
            "an event ends at its first separator"
        );
    }
    if let Some(tail) = whole.finish() {
        assert!(!tail.raw.is_empty() && !has_separator(&tail.raw));
        reference.push(tail);
    }
    assert!(whole.finish().is_none(), "finish drains");
    let joined: Vec<u8> = reference
        .iter()
        .flat_map(|e| e.raw.iter().copied())
        .collect();
    assert_eq!(joined, stream, "bytes pass unchanged");
    let too_large = reference.iter().any(|e| e.raw.len() > cap);

    // Capped, in chunks.
    let mut s = Splitter::new(cap);
    let mut chunks = Chunks(u32::from(*seed) * 0x9E37 + 1);
    let mut got = Vec::new();
    let mut rest = stream;
    let mut failed = None;
    while !rest.is_empty() {
        let n = chunks.next(cap).min(rest.len());
        let (chunk, after) = rest.split_at(n);
        rest = after;
        match s.feed(chunk) {
            Ok(events) => got.extend(events),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    if failed.is_none() {
        got.extend(s.finish());
    }
    for e in &got {
        assert!(e.raw.len() <= cap, "an event over the cap was returned");
    }
    assert_eq!(
        got[..],
        reference[..got.len()],
        "chunking changed the events"
    );
    match failed {
        Some(e) => {
            assert_eq!(e, EventTooLarge(cap));
            assert!(too_large, "error without an event over the cap");
        }
        None => {
            assert!(!too_large, "an event over the cap went through");
            assert_eq!(got, reference);
        }
    }
});
