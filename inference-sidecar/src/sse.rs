//! Server-sent events, split incrementally: network reads split and merge
//! events, and may split a UTF-8 character; bytes are kept until an event is
//! complete (a blank line), never longer.

/// Splits a byte stream into complete SSE events.
#[derive(Debug, Default)]
pub struct Splitter {
    buf: Vec<u8>,
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

fn separator_end(buf: &[u8]) -> Option<usize> {
    // An event ends with "\n\n", "\r\n\r\n" or "\r\r".
    let mut i = 0;
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
    /// Feeds bytes; returns the events they complete.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(end) = separator_end(&self.buf) {
            let raw: Vec<u8> = self.buf.drain(..end).collect();
            let data = parse_data(&raw);
            out.push(SseEvent { raw, data });
        }
        out
    }

    /// What is left at the end of the stream (an unterminated event).
    pub fn finish(&mut self) -> Option<SseEvent> {
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
            let mut events = s.feed(&stream[..cut]);
            events.extend(s.feed(&stream[cut..]));
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
        let events = s.feed(b": keep-alive\r\n\r\ndata: line1\r\ndata: line2\r\n\r\n");
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].data, None);
        assert_eq!(events[1].data.as_deref(), Some("line1\nline2"));
        assert_eq!(s.feed(b"data: tail").len(), 0);
        assert_eq!(s.finish().and_then(|e| e.data).as_deref(), Some("tail"));
    }
}
