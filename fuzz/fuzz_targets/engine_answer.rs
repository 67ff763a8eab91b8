//! The engine's answers as the proxy reads them (`framing.rs`): any bytes,
//! read in any pieces.
//!
//! Input: byte 0 picks the piece size (1..=64 bytes), bit 0 of byte 1 says
//! whether the request was HEAD, the rest is what the engine sent. Checked:
//! no panic; reading in pieces gives what reading in one piece gives (the
//! head, the body, whether it ended, or the same error); no piece of the
//! body is empty; the body is never longer than the input, and a complete
//! body of declared length is exactly that long.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use strata_sidecar::framing::{Decoder, Framing, FramingError, Step, parse_head};

type Read = Result<(u16, Framing, Vec<u8>, bool), FramingError>;

fn read(wire: &[u8], cut: usize, head_request: bool) -> Read {
    let mut buf = BytesMut::new();
    let mut pieces = wire.chunks(cut.max(1));
    let head = loop {
        if let Some(h) = parse_head(&mut buf, head_request)? {
            break h;
        }
        match pieces.next() {
            Some(p) => buf.extend_from_slice(p),
            None => return Err(FramingError::Truncated),
        }
    };
    let mut d = Decoder::new(head.framing);
    let mut body = Vec::new();
    loop {
        match d.decode(&mut buf)? {
            Step::Data(b) => {
                assert!(!b.is_empty(), "an empty piece");
                body.extend_from_slice(&b);
            }
            Step::End => return Ok((head.status.as_u16(), head.framing, body, true)),
            Step::More => match pieces.next() {
                Some(p) => buf.extend_from_slice(p),
                None => {
                    let ended = d.eof().is_ok();
                    return Ok((head.status.as_u16(), head.framing, body, ended));
                }
            },
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let [cut, flags, wire @ ..] = data else {
        return;
    };
    let cut = 1 + usize::from(*cut % 64);
    let head_request = flags & 1 == 1;
    let whole = read(wire, wire.len(), head_request);
    let pieces = read(wire, cut, head_request);
    assert_eq!(pieces, whole, "reading in pieces changed the answer");
    if let Ok((_, framing, body, ended)) = whole {
        assert!(body.len() <= wire.len());
        if let (Framing::Length(n), true) = (framing, ended) {
            assert_eq!(body.len() as u64, n);
        }
    }
});
