//! Server-sent events, split incrementally: network reads split and merge
//! events, and may split a UTF-8 character; bytes are kept until an event is
//! complete (a blank line), never longer. An event may hold at most
//! `max_event` bytes: a larger one is an engine error, not a reason to grow
//! without bound. Each byte is scanned for the separator once.

use std::borrow::Cow;

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
    // An event ends with "\n\n", "\r\n\r\n" or "\r\r": each starts at a
    // line end.
    let mut i = from;
    while i < buf.len() {
        let j = i + line_end(&buf[i..])?;
        match (buf[j], buf.get(j + 1), buf.get(j + 2), buf.get(j + 3)) {
            (a, Some(b), ..) if a == *b => return Some(j + 2),
            (b'\r', Some(b'\n'), Some(b'\r'), Some(b'\n')) => return Some(j + 4),
            _ => i = j + 1,
        }
    }
    None
}

/// Where the first line end ('\n' or '\r') is.
fn line_end(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|b| *b == b'\n' || *b == b'\r')
}

fn parse_data(raw: &[u8]) -> Option<String> {
    data_of(raw).map(Cow::into_owned)
}

/// The `data:` payload of one raw event (its `data:` lines joined with
/// '\n'; invalid UTF-8 replaced), borrowed from `raw` when the event has
/// one `data:` line and is valid UTF-8 (an engine's chunk always is).
pub fn data_of(raw: &[u8]) -> Option<Cow<'_, str>> {
    Some(match data_bytes(raw)? {
        Cow::Borrowed(b) => String::from_utf8_lossy(b),
        Cow::Owned(v) => Cow::Owned(String::from_utf8_lossy(&v).into_owned()),
    })
}

/// [`data_of`] as bytes, not checked for UTF-8 (lines end at '\n' or '\r',
/// which no UTF-8 sequence holds, so replacing invalid UTF-8 in the result
/// gives [`data_of`]); borrowed when the event has one `data:` line.
pub fn data_bytes(raw: &[u8]) -> Option<Cow<'_, [u8]>> {
    let mut data: Option<Cow<'_, [u8]>> = None;
    let mut rest = raw;
    loop {
        let end = line_end(rest).unwrap_or(rest.len());
        if let Some(payload) = rest[..end].strip_prefix(b"data:") {
            let payload = payload.strip_prefix(b" ").unwrap_or(payload);
            data = Some(match data {
                None => Cow::Borrowed(payload),
                Some(d) => {
                    let mut joined = d.into_owned();
                    joined.push(b'\n');
                    joined.extend_from_slice(payload);
                    Cow::Owned(joined)
                }
            });
        }
        if end == rest.len() {
            return data;
        }
        rest = &rest[end + 1..];
    }
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
        let mut out = Vec::new();
        self.feed_each(bytes, |raw| {
            out.push(SseEvent {
                raw: raw.to_vec(),
                data: parse_data(raw),
            });
        })?;
        Ok(out)
    }

    /// Feeds bytes and calls `each` with the raw bytes (separator
    /// included) of every event they complete, in order, without copying
    /// them out: what [`Splitter::feed`] returns, without an allocation per
    /// event. The bytes are buffered only when they end in an incomplete
    /// event (its part is kept, nothing else). Errors as `feed`; events
    /// complete before the one over the cap are still visited.
    pub fn feed_each(
        &mut self,
        bytes: &[u8],
        mut each: impl FnMut(&[u8]),
    ) -> Result<(), EventTooLarge> {
        if self.buf.is_empty() {
            // Nothing held: the events are visited in `bytes` itself.
            let mut from = 0;
            let mut scan = 0;
            while let Some(end) = separator_end(bytes, scan) {
                if end - from > self.max_event {
                    return Err(EventTooLarge(self.max_event));
                }
                each(&bytes[from..end]);
                from = end;
                scan = end;
            }
            let rest = &bytes[from..];
            if rest.len() > self.max_event {
                return Err(EventTooLarge(self.max_event));
            }
            self.buf.extend_from_slice(rest);
            self.scanned = self.buf.len();
            return Ok(());
        }
        self.buf.extend_from_slice(bytes);
        // A separator may straddle the previous read: look 3 bytes back.
        let mut from = 0;
        let mut scan = self.scanned.saturating_sub(3);
        let mut result = Ok(());
        while let Some(end) = separator_end(&self.buf, scan) {
            if end - from > self.max_event {
                result = Err(EventTooLarge(self.max_event));
                break;
            }
            each(&self.buf[from..end]);
            from = end;
            scan = end;
        }
        if result.is_err() {
            self.buf = Vec::new();
            self.scanned = 0;
            return result;
        }
        self.buf.drain(..from);
        self.scanned = self.buf.len();
        if self.buf.len() > self.max_event {
            self.buf = Vec::new();
            self.scanned = 0;
            return Err(EventTooLarge(self.max_event));
        }
        if self.buf.is_empty() && self.buf.capacity() > 4096 {
            // A long event passed: do not keep its room for the whole stream.
            self.buf = Vec::new();
        }
        Ok(())
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
mod in_place_tests {
    use super::*;

    #[test]
    fn events_are_visited_in_place_and_their_data_borrowed() {
        let mut s = Splitter::default();
        let mut seen: Vec<Vec<u8>> = Vec::new();
        s.feed_each(b"data: {\"a\":1}\n\n: c\r\n\r\ndata: x", |raw| {
            seen.push(raw.to_vec())
        })
        .expect("small");
        assert_eq!(seen, [&b"data: {\"a\":1}\n\n"[..], b": c\r\n\r\n"]);
        assert!(matches!(
            data_of(&seen[0]),
            Some(Cow::Borrowed("{\"a\":1}"))
        ));
        assert_eq!(data_of(&seen[1]), None);
        // The tail was kept; the rest of it completes it.
        s.feed_each(b"yz\n\n", |raw| seen.push(raw.to_vec()))
            .expect("small");
        assert_eq!(seen[2], b"data: xyz\n\n");
        assert!(s.finish().is_none());
    }

    #[test]
    fn data_lines_are_joined_and_bad_utf8_replaced() {
        for (raw, want) in [
            (&b"data: a\ndata:b\r\ndata:  c\n\n"[..], Some("a\nb\n c")),
            (b"event: x\nid: 1\n\n", None),
            (b"data:\n\n", Some("")),
            (b"data: caf\xc3\n\n", Some("caf\u{fffd}")),
            (b"datum: x\n\n", None),
            (b"data: [DONE]\r\r", Some("[DONE]")),
        ] {
            assert_eq!(data_of(raw).as_deref(), want, "{raw:?}");
            assert_eq!(data_of(raw).map(Cow::into_owned), reference_data(raw));
        }
    }

    #[test]
    fn an_event_over_the_cap_in_one_read_is_an_error() {
        let mut s = Splitter::new(16);
        let mut n = 0;
        let r = s.feed_each(b"data: 1\n\ndata: 0123456789abcdef\n\n", |_| n += 1);
        assert_eq!(r, Err(EventTooLarge(16)));
        assert_eq!(n, 1, "the event before it was visited");
        let mut s = Splitter::new(16);
        assert_eq!(s.feed_each(&[b'a'; 17], |_| {}), Err(EventTooLarge(16)));
    }

    /// The former `data:` parser: the event as (lossy) text, split into
    /// lines.
    pub(super) fn reference_data(raw: &[u8]) -> Option<String> {
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

    /// The former separator search: byte by byte.
    pub(super) fn reference_separator_end(buf: &[u8], from: usize) -> Option<usize> {
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
        fn the_in_place_parts_agree_with_the_former_ones(
            stream in stream(),
            from in 0usize..64,
        ) {
            let from = from.min(stream.len());
            prop_assert_eq!(
                separator_end(&stream, from),
                super::in_place_tests::reference_separator_end(&stream, from)
            );
            prop_assert_eq!(
                data_of(&stream).map(Cow::into_owned),
                super::in_place_tests::reference_data(&stream)
            );
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
