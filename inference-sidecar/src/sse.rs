//! Server-sent events, split incrementally: network reads split and merge
//! events, and may split a UTF-8 character; bytes are kept until an event is
//! complete (a blank line), never longer. An event may hold at most
//! `max_event` bytes: a larger one is an engine error, not a reason to grow
//! without bound. Each byte is scanned for the separator once.

/// Default cap of one event (an OpenAI chunk is well under 1 KiB; with
/// logprobs a few KiB).
pub const DEFAULT_MAX_EVENT_BYTES: usize = 256 * 1024;

/// Splits a byte stream into complete SSE events.
#[derive(Debug)]
pub struct Splitter {
    buf: Vec<u8>,
    /// Bytes of `buf` already searched for a separator.
    scanned: usize,
    max_event: usize,
}

impl Default for Splitter {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_EVENT_BYTES)
    }
}

/// One complete event: its raw bytes (separator included, to forward
/// unchanged) and the joined `data:` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The event exactly as received, including the blank-line separator.
    pub raw: Vec<u8>,
    /// The `data:` lines joined with '\n' (None if the event has none).
    pub data: Option<String>,
}

/// An event longer than the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a server-sent event is longer than {0} bytes")]
pub struct EventTooLarge(pub usize);

/// Where the first separator ends, searching from `from`.
fn separator_end(buf: &[u8], from: usize) -> Option<usize> {
    // An event ends with "\n\n", "\r\n\r\n" or "\r\r".
    let mut i = from;
    while i + 1 < buf.len() {
        if buf[i] == b'\n' && buf[i + 1] == b'\n' {
            return Some(i + 2);
        }
        if buf[i] == b'\r' && buf[i + 1] == b'\r' {
            return Some(i + 2);
        }
        if i + 3 < buf.len() && &buf[i..i + 4] == b"\r\n\r\n" {
            return Some(i + 4);
        }
        i += 1;
    }
    None
}

fn parse_data(raw: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(raw);
    let mut data: Option<String> = None;
    for line in text.split(['\n', '\r']) {
        if let Some(rest) = line.strip_prefix("data:") {
            let rest = rest.strip_prefix(' ').unwrap_or(rest);
            match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(rest);
                }
                None => data = Some(rest.to_string()),
            }
        }
    }
    data
}

impl Splitter {
    /// A splitter whose events may hold at most `max_event` bytes.
    pub fn new(max_event: usize) -> Self {
        Self {
            buf: Vec::new(),
            scanned: 0,
            max_event: max_event.max(4),
        }
    }

    /// Feeds bytes; returns the events they complete, or an error when an
    /// event outgrows the cap (the stream cannot go on).
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<SseEvent>, EventTooLarge> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        // A separator may straddle the previous read: look 3 bytes back.
        while let Some(end) = separator_end(&self.buf, self.scanned.saturating_sub(3)) {
            if end > self.max_event {
                return Err(EventTooLarge(self.max_event));
            }
            let raw: Vec<u8> = self.buf.drain(..end).collect();
            self.scanned = 0;
            let data = parse_data(&raw);
            out.push(SseEvent { raw, data });
        }
        self.scanned = self.buf.len();
        if self.buf.len() > self.max_event {
            self.buf = Vec::new();
            self.scanned = 0;
            return Err(EventTooLarge(self.max_event));
        }
        Ok(out)
    }

    /// What is left at the end of the stream (an unterminated event).
    pub fn finish(&mut self) -> Option<SseEvent> {
        self.scanned = 0;
        if self.buf.is_empty() {
            return None;
        }
        let raw = std::mem::take(&mut self.buf);
        let data = parse_data(&raw);
        Some(SseEvent { raw, data })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_merged_and_fragmented_events() {
        let stream = "data: {\"a\":1}\n\ndata: {\"b\":\"é\"}\n\ndata: [DONE]\n\n".as_bytes();
        // Every split point, including inside the two-byte 'é'.
        for cut in 0..stream.len() {
            let mut s = Splitter::default();
            let mut events = s.feed(&stream[..cut]).expect("small");
            events.extend(s.feed(&stream[cut..]).expect("small"));
            let data: Vec<String> = events.iter().filter_map(|e| e.data.clone()).collect();
            assert_eq!(
                data,
                ["{\"a\":1}", "{\"b\":\"é\"}", "[DONE]"],
                "cut at {cut}"
            );
            let raw: Vec<u8> = events.iter().flat_map(|e| e.raw.clone()).collect();
            assert_eq!(raw, stream, "bytes pass unchanged");
            assert!(s.finish().is_none());
        }
    }

    #[test]
    fn handles_crlf_multiline_data_and_comments() {
        let mut s = Splitter::default();
        let events = s
            .feed(b": keep-alive\r\n\r\ndata: line1\r\ndata: line2\r\n\r\n")
            .expect("small");
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].data, None);
        assert_eq!(events[1].data.as_deref(), Some("line1\nline2"));
        assert_eq!(s.feed(b"data: tail").expect("small").len(), 0);
        assert_eq!(s.finish().and_then(|e| e.data).as_deref(), Some("tail"));
    }

    #[test]
    fn an_event_over_the_cap_is_an_error_not_growth() {
        let mut s = Splitter::new(64);
        assert!(s.feed(&[b'a'; 60]).expect("under the cap").is_empty());
        assert_eq!(s.feed(&[b'a'; 10]), Err(EventTooLarge(64)));
        // Complete events under the cap still pass, byte by byte too.
        let mut s = Splitter::new(64);
        let mut got = Vec::new();
        for b in b"data: x\r\n\r\ndata: y\n\n" {
            got.extend(s.feed(&[*b]).expect("small"));
        }
        let data: Vec<_> = got.iter().filter_map(|e| e.data.clone()).collect();
        assert_eq!(data, ["x", "y"]);
        // A separator that arrives in the same read as the overflow.
        let mut s = Splitter::new(8);
        assert_eq!(s.feed(b"data: 0123456789\n\n"), Err(EventTooLarge(8)));
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    /// Whether `s` holds a separator (the spec, written independently).
    fn has_separator(s: &[u8]) -> bool {
        s.windows(2).any(|w| w == b"\n\n" || w == b"\r\r") || s.windows(4).any(|w| w == b"\r\n\r\n")
    }

    /// Streams made mostly of what matters: line ends, `data:` lines,
    /// comments, a two-byte character, and arbitrary bytes.
    fn stream() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            Just(b"\n".to_vec()),
            Just(b"\r".to_vec()),
            Just(b"\r\n".to_vec()),
            Just(b"data:".to_vec()),
            Just(b"data: {\"x\":1}".to_vec()),
            Just(b": keep-alive".to_vec()),
            Just("é".as_bytes().to_vec()),
            vec(any::<u8>(), 0..12),
        ];
        vec(piece, 0..48).prop_map(|pieces| pieces.concat())
    }

    /// Reads `stream` in chunks of the given sizes (cycled; 0 included, but
    /// not alone: at least one byte at a time).
    fn read(stream: &[u8], cap: usize, sizes: &[usize]) -> (Vec<SseEvent>, Option<EventTooLarge>) {
        let mut s = Splitter::new(cap);
        let mut got = Vec::new();
        let mut rest = stream;
        // Empty reads too, but never only those.
        let sizes = if sizes.iter().any(|s| *s > 0) {
            sizes
        } else {
            &[1]
        };
        for size in sizes.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (chunk, after) = rest.split_at((*size).min(rest.len()));
            rest = after;
            match s.feed(chunk) {
                Ok(events) => got.extend(events),
                Err(e) => return (got, Some(e)),
            }
        }
        got.extend(s.finish());
        (got, None)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn any_chunking_gives_the_same_events_and_bytes(
            stream in stream(),
            sizes in vec(0usize..24, 1..12),
            cap in 4usize..160,
        ) {
            // One read, no cap: the reference.
            let (reference, err) = read(&stream, usize::MAX, &[stream.len().max(1)]);
            prop_assert!(err.is_none());
            let joined: Vec<u8> = reference.iter().flat_map(|e| e.raw.clone()).collect();
            prop_assert_eq!(&joined, &stream, "bytes pass unchanged");
            for (i, e) in reference.iter().enumerate() {
                let complete = has_separator(&e.raw);
                prop_assert!(complete || i + 1 == reference.len(), "only the tail is unterminated");
                prop_assert!(!has_separator(&e.raw[..e.raw.len() - 1]), "ends at the first separator");
            }
            let too_large = reference.iter().any(|e| e.raw.len() > cap);

            let (got, err) = read(&stream, cap, &sizes);
            prop_assert!(got.iter().all(|e| e.raw.len() <= cap), "an event over the cap");
            prop_assert_eq!(&got[..], &reference[..got.len()], "chunking changed the events");
            match err {
                Some(e) => {
                    prop_assert_eq!(e, EventTooLarge(cap));
                    prop_assert!(too_large, "an error without an event over the cap");
                }
                None => {
                    prop_assert!(!too_large, "an event over the cap went through");
                    prop_assert_eq!(got, reference);
                }
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..512), size in 1usize..64) {
            let (got, err) = read(&bytes, 64, &[size]);
            if err.is_none() {
                let joined: Vec<u8> = got.iter().flat_map(|e| e.raw.clone()).collect();
                prop_assert_eq!(joined, bytes);
            }
        }
    }
}
