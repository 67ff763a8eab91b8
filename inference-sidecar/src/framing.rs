//! HTTP/1.1 message framing of the engine's answers (RFC 9112 §6): where
//! an answer's head ends and how its body is delimited, decoded from the
//! bytes read so far. Pure: no I/O, every limit explicit.
//!
//! The head is parsed by `httparse` (hyper's own parser); this module
//! decides the body's framing from it and takes chunked bodies apart.

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};

/// Most bytes an answer's head may take.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most header fields in an answer's head.
pub const MAX_HEADERS: usize = 100;
/// Most bytes of a chunk's size line (size and extensions).
pub const MAX_CHUNK_LINE_BYTES: usize = 4 * 1024;
/// Most bytes of the trailer section of a chunked body.
pub const MAX_TRAILER_BYTES: usize = 16 * 1024;

/// Why an answer cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    /// The head is not HTTP/1.x.
    #[error("the engine's answer has an invalid head: {0}")]
    Head(String),
    /// The head is larger than allowed.
    #[error("the engine's answer head exceeds {MAX_HEAD_BYTES} bytes or {MAX_HEADERS} fields")]
    HeadTooLarge,
    /// Content-Length values that are not one number.
    #[error("the engine's answer has an invalid Content-Length")]
    Length,
    /// The engine switched protocols, which the proxy never asks for.
    #[error("the engine switched protocols unasked")]
    Upgrade,
    /// A chunked body that is not.
    #[error("the engine's chunked answer is malformed: {0}")]
    Chunk(&'static str),
    /// The connection ended before the body did.
    #[error("the engine closed the connection in the middle of an answer")]
    Truncated,
    /// Bytes after a complete answer, which no request asked for.
    #[error("the engine sent bytes after its answer")]
    Trailing,
}

/// How an answer's body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (an answer to HEAD, 1xx, 204, 304).
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the engine closes the connection.
    Close,
}

/// An answer's head.
#[derive(Debug)]
pub struct Head {
    /// The status.
    pub status: StatusCode,
    /// The header fields, as sent.
    pub headers: HeaderMap,
    /// How the body is delimited.
    pub framing: Framing,
    /// Whether the connection can carry another request afterwards.
    pub keep_alive: bool,
}

/// Parses the final head at the start of `buf` and removes it (interim
/// 1xx answers before it are skipped); None while more bytes are needed.
/// `head_request`: the request was HEAD (its answer has no body).
pub fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Option<Head>, FramingError> {
    loop {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut fields);
        let n = match resp.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
                return Err(FramingError::HeadTooLarge);
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(FramingError::HeadTooLarge),
            Err(e) => return Err(FramingError::Head(e.to_string())),
        };
        if n > MAX_HEAD_BYTES {
            return Err(FramingError::HeadTooLarge);
        }
        let code = resp.code.unwrap_or(0);
        let status =
            StatusCode::from_u16(code).map_err(|_| FramingError::Head(format!("status {code}")))?;
        let http11 = resp.version == Some(1);
        // The fields are read from the head's bytes once they are split
        // off: each value a slice of them, not a copy (one allocation for
        // the head instead of one per field; the body's pieces share the
        // same buffer anyway).
        // httparse's fields are slices of `buf`; where one were not, it is
        // refused, not sliced out of bounds.
        let start = buf.as_ptr() as usize;
        let at = |field: &[u8]| {
            let from = (field.as_ptr() as usize).checked_sub(start)?;
            let to = from.checked_add(field.len()).filter(|&to| to <= n)?;
            Some(from..to)
        };
        let mut spans: [_; MAX_HEADERS] = std::array::from_fn(|_| (0..0, 0..0));
        let count = resp.headers.len();
        for (span, f) in spans.iter_mut().zip(resp.headers.iter()) {
            *span = at(f.name.as_bytes())
                .zip(at(f.value))
                .ok_or_else(|| FramingError::Head("a field outside the head".into()))?;
        }
        let head = buf.split_to(n).freeze();
        // One more than sent: the proxy adds its load header.
        let mut headers = HeaderMap::with_capacity(count + 1);
        for (name, value) in spans.into_iter().take(count) {
            let raw = &head[name];
            let name = HeaderName::from_bytes(raw).map_err(|_| {
                FramingError::Head(format!("field name {:?}", String::from_utf8_lossy(raw)))
            })?;
            let value = HeaderValue::from_maybe_shared(head.slice(value))
                .map_err(|_| FramingError::Head(format!("the value of {name}")))?;
            headers.append(name, value);
        }
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(FramingError::Upgrade);
        }
        if status.is_informational() {
            continue;
        }
        let framing = framing(&headers, status, head_request)?;
        let keep_alive = http11
            && framing != Framing::Close
            && !has_token(&headers, header::CONNECTION, "close");
        return Ok(Some(Head {
            status,
            headers,
            framing,
            keep_alive,
        }));
    }
}

/// Whether a comma-separated field holds `token` (case-insensitive).
fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The body's framing from the head (RFC 9112 §6.3).
fn framing(
    headers: &HeaderMap,
    status: StatusCode,
    head_request: bool,
) -> Result<Framing, FramingError> {
    if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok(Framing::Empty);
    }
    let codings: Vec<&str> = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .map(|v| v.to_str().unwrap_or(""))
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    if let Some(last) = codings.last() {
        // Transfer-Encoding wins over Content-Length; a final coding other
        // than chunked runs to the end of the connection.
        return Ok(if last.eq_ignore_ascii_case("chunked") {
            Framing::Chunked
        } else {
            Framing::Close
        });
    }
    let mut length = None;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        let s = v.to_str().map_err(|_| FramingError::Length)?;
        for part in s.split(',') {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(FramingError::Length);
            }
            let n: u64 = part.parse().map_err(|_| FramingError::Length)?;
            if length.is_some_and(|l| l != n) {
                return Err(FramingError::Length);
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(0) => Framing::Empty,
        Some(n) => Framing::Length(n),
        None => Framing::Close,
    })
}

/// What decoding the bytes read so far gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// A piece of the body.
    Data(Bytes),
    /// More bytes are needed.
    More,
    /// The body is complete.
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Expecting a size line.
    Size,
    /// Inside a chunk's data: bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: expecting trailers or the final CRLF.
    Trailers,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length(u64),
    Chunked(Chunk),
    Close,
    Done,
}

/// Takes an answer's body out of the bytes read from the connection.
#[derive(Debug)]
pub struct Decoder {
    state: State,
}

impl Decoder {
    /// A decoder for a body of this framing.
    pub fn new(framing: Framing) -> Self {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Chunked(Chunk::Size),
            Framing::Close => State::Close,
        };
        Self { state }
    }

    /// Whether the whole body has been decoded.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// The next piece of the body from `buf` (the bytes read and not yet
    /// decoded), removed from it.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Step, FramingError> {
        loop {
            match self.state {
                State::Done => return Ok(Step::End),
                State::Close if buf.is_empty() => return Ok(Step::More),
                State::Close => return Ok(Step::Data(buf.split().freeze())),
                State::Length(_) | State::Chunked(Chunk::Data(_)) if buf.is_empty() => {
                    return Ok(Step::More);
                }
                State::Length(left) => {
                    let (data, left) = take(buf, left);
                    self.state = if left == 0 {
                        State::Done
                    } else {
                        State::Length(left)
                    };
                    return Ok(Step::Data(data));
                }
                State::Chunked(Chunk::Data(left)) => {
                    let (data, left) = take(buf, left);
                    self.state = State::Chunked(if left == 0 {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left)
                    });
                    return Ok(Step::Data(data));
                }
                State::Chunked(Chunk::Size) => {
                    let line_end = buf
                        .iter()
                        .take(MAX_CHUNK_LINE_BYTES)
                        .position(|&b| b == b'\n');
                    let Some(end) = line_end else {
                        if buf.len() >= MAX_CHUNK_LINE_BYTES {
                            return Err(FramingError::Chunk("a size line too long"));
                        }
                        return Ok(Step::More);
                    };
                    let size = match httparse::parse_chunk_size(&buf[..=end]) {
                        Ok(httparse::Status::Complete((n, size))) if n == end + 1 => size,
                        _ => return Err(FramingError::Chunk("an invalid size line")),
                    };
                    buf.advance(end + 1);
                    self.state = State::Chunked(if size == 0 {
                        Chunk::Trailers
                    } else {
                        Chunk::Data(size)
                    });
                }
                State::Chunked(Chunk::DataEnd) => {
                    if buf.len() < 2 {
                        return Ok(Step::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(FramingError::Chunk("no CRLF after a chunk's data"));
                    }
                    buf.advance(2);
                    self.state = State::Chunked(Chunk::Size);
                }
                State::Chunked(Chunk::Trailers) => {
                    // Trailer fields are read past, not kept: the proxy
                    // forwards none.
                    let end = if buf.starts_with(b"\r\n") {
                        Some(2)
                    } else {
                        buf.windows(4)
                            .take(MAX_TRAILER_BYTES)
                            .position(|w| w == b"\r\n\r\n")
                            .map(|p| p + 4)
                    };
                    match end {
                        Some(n) => {
                            buf.advance(n);
                            self.state = State::Done;
                        }
                        None if buf.len() >= MAX_TRAILER_BYTES => {
                            return Err(FramingError::Chunk("trailers too long"));
                        }
                        None => return Ok(Step::More),
                    }
                }
            }
        }
    }

    /// The connection ended: the end of a body delimited by it, an error
    /// for any other unfinished body.
    pub fn eof(&mut self) -> Result<Step, FramingError> {
        match self.state {
            State::Close | State::Done => {
                self.state = State::Done;
                Ok(Step::End)
            }
            _ => Err(FramingError::Truncated),
        }
    }
}

/// At most `left` bytes from the front of `buf`; what is left after.
fn take(buf: &mut BytesMut, left: u64) -> (Bytes, u64) {
    let n = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
    let data = buf.split_to(n).freeze();
    (data, left - n as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn head(text: &str, head_request: bool) -> Result<Option<Head>, FramingError> {
        parse_head(&mut BytesMut::from(text), head_request)
    }

    fn framing_of(text: &str) -> Result<(Framing, bool), FramingError> {
        let h = head(text, false)?.expect("a complete head");
        Ok((h.framing, h.keep_alive))
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let ok = [
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n",
                Framing::Length(12),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                Framing::Chunked,
                true,
            ),
            // Transfer-Encoding wins over Content-Length.
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
                Framing::Chunked,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
                Framing::Close,
                false,
            ),
            ("HTTP/1.1 200 OK\r\n\r\n", Framing::Close, false),
            ("HTTP/1.1 204 No Content\r\n\r\n", Framing::Empty, true),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
                Framing::Empty,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\ncontent-length: 5\r\n\r\n",
                Framing::Length(5),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: keep-alive, Close\r\n\r\n",
                Framing::Length(5),
                false,
            ),
            // HTTP/1.0: not kept.
            (
                "HTTP/1.0 200 OK\r\ncontent-length: 5\r\n\r\n",
                Framing::Length(5),
                false,
            ),
            // Interim answers are skipped.
            (
                "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n",
                Framing::Length(2),
                true,
            ),
        ];
        for (text, framing, keep) in ok {
            assert_eq!(framing_of(text), Ok((framing, keep)), "{text:?}");
        }
        let h = head("HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n", true)
            .expect("head")
            .expect("complete");
        assert_eq!(h.framing, Framing::Empty, "an answer to HEAD has no body");

        for (text, err) in [
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\n",
                FramingError::Length,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
                FramingError::Length,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\n",
                FramingError::Length,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999999\r\n\r\n",
                FramingError::Length,
            ),
            (
                "HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\n\r\n",
                FramingError::Upgrade,
            ),
        ] {
            assert_eq!(framing_of(text), Err(err), "{text:?}");
        }
        assert!(matches!(
            head("HTTP/2 200 OK\r\n\r\n", false),
            Err(FramingError::Head(_))
        ));
        assert!(matches!(
            head("HTTP/1.1 200 OK\r\nbad header\r\n\r\n", false),
            Err(FramingError::Head(_))
        ));
    }

    #[test]
    fn heads_are_bounded_and_may_come_in_pieces() {
        let text = "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 4\r\n\r\nbody";
        let mut buf = BytesMut::new();
        for (i, b) in text.bytes().enumerate() {
            buf.extend_from_slice(&[b]);
            let parsed = parse_head(&mut buf, false).expect("valid so far");
            if i + 1 < text.len() - 4 {
                assert!(parsed.is_none(), "complete after {} bytes", i + 1);
            } else {
                let h = parsed.expect("complete");
                assert_eq!(h.status, StatusCode::OK);
                assert_eq!(h.headers["content-type"], "text/plain");
                assert_eq!(&buf[..], b"");
                break;
            }
        }
        let mut many = String::from("HTTP/1.1 200 OK\r\n");
        for i in 0..=MAX_HEADERS {
            many.push_str(&format!("x-{i}: 1\r\n"));
        }
        many.push_str("\r\n");
        assert_eq!(head(&many, false).err(), Some(FramingError::HeadTooLarge));
        let endless = format!("HTTP/1.1 200 OK\r\nx: {}", "a".repeat(MAX_HEAD_BYTES));
        assert_eq!(
            head(&endless, false).err(),
            Some(FramingError::HeadTooLarge)
        );
    }

    #[test]
    fn fields_are_kept_as_sent_and_the_body_left_in_the_buffer() {
        let text = "HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n\
                    HTTP/1.1 200 OK\r\nx-empty:\r\nset-cookie: a=1\r\n\
                    Set-Cookie:  b=2 \t\r\nX-Custom-Name: v\r\ncontent-length: 2\r\n\r\nok";
        let mut buf = BytesMut::from(text);
        let h = parse_head(&mut buf, false)
            .expect("valid")
            .expect("complete");
        assert_eq!(h.status, StatusCode::OK);
        assert_eq!(h.headers["x-empty"], "");
        let cookies: Vec<_> = h.headers.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"]);
        assert_eq!(h.headers["x-custom-name"], "v");
        assert!(
            !h.headers.contains_key("link"),
            "the interim answer's fields are not kept"
        );
        assert_eq!(h.headers.len(), 5);
        assert_eq!(h.framing, Framing::Length(2));
        assert_eq!(&buf[..], b"ok");
        let bad = "HTTP/1.1 200 OK\r\nx: a\x7fb\r\n\r\n";
        assert!(matches!(head(bad, false), Err(FramingError::Head(_))));
    }

    /// Decodes `wire` fed in pieces of `cut` bytes; the body and whether
    /// it ended.
    fn decode_in_pieces(
        framing: Framing,
        wire: &[u8],
        cut: usize,
    ) -> Result<Vec<u8>, FramingError> {
        let mut d = Decoder::new(framing);
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        for piece in wire.chunks(cut.max(1)) {
            buf.extend_from_slice(piece);
            loop {
                match d.decode(&mut buf)? {
                    Step::Data(b) => body.extend_from_slice(&b),
                    Step::More => break,
                    Step::End => {
                        if !buf.is_empty() {
                            return Err(FramingError::Trailing);
                        }
                        return Ok(body);
                    }
                }
            }
        }
        match d.eof()? {
            Step::End => Ok(body),
            other => panic!("eof gave {other:?}"),
        }
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_reads() {
        let wire = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nx-trailer: 1\r\n\r\n";
        for cut in 1..wire.len() {
            assert_eq!(
                decode_in_pieces(Framing::Chunked, wire, cut),
                Ok(b"hello, world".to_vec()),
                "cut {cut}"
            );
        }
        for (wire, why) in [
            (
                &b"5\r\nhelloXX0\r\n\r\n"[..],
                "no CRLF after a chunk's data",
            ),
            (&b"zz\r\nhello\r\n0\r\n\r\n"[..], "an invalid size line"),
            (&b"5 5\r\nhello\r\n0\r\n\r\n"[..], "an invalid size line"),
        ] {
            assert_eq!(
                decode_in_pieces(Framing::Chunked, wire, 64),
                Err(FramingError::Chunk(why)),
                "{wire:?}"
            );
        }
        let long = format!(
            "5;{}\r\nhello\r\n0\r\n\r\n",
            "e".repeat(MAX_CHUNK_LINE_BYTES)
        );
        assert_eq!(
            decode_in_pieces(Framing::Chunked, long.as_bytes(), 512),
            Err(FramingError::Chunk("a size line too long"))
        );
        assert_eq!(
            decode_in_pieces(Framing::Chunked, b"5\r\nhel", 64),
            Err(FramingError::Truncated)
        );
        assert_eq!(
            decode_in_pieces(Framing::Chunked, b"0\r\n\r\nextra", 64),
            Err(FramingError::Trailing)
        );
    }

    #[test]
    fn length_and_close_bodies() {
        assert_eq!(
            decode_in_pieces(Framing::Length(5), b"hello", 2),
            Ok(b"hello".to_vec())
        );
        assert_eq!(
            decode_in_pieces(Framing::Length(5), b"hel", 2),
            Err(FramingError::Truncated)
        );
        assert_eq!(
            decode_in_pieces(Framing::Length(5), b"hello!", 64),
            Err(FramingError::Trailing)
        );
        assert_eq!(
            decode_in_pieces(Framing::Close, b"until the end", 3),
            Ok(b"until the end".to_vec())
        );
        assert_eq!(decode_in_pieces(Framing::Empty, b"", 3), Ok(Vec::new()));
        let mut d = Decoder::new(Framing::Length(3));
        assert!(!d.is_done());
        let mut buf = BytesMut::from(&b"abc"[..]);
        assert_eq!(
            d.decode(&mut buf),
            Ok(Step::Data(Bytes::from_static(b"abc")))
        );
        assert!(d.is_done(), "done as soon as the length is reached");
    }

    /// What reading `wire` in pieces of `cut` bytes gives: the answer's
    /// status and framing, its body, whether the body ended; or the error.
    type Read = Result<(StatusCode, Framing, Vec<u8>, bool), FramingError>;

    fn read_answer(wire: &[u8], cut: usize, head_request: bool) -> Read {
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
                    assert!(!b.is_empty(), "no empty pieces");
                    body.extend_from_slice(&b);
                }
                Step::End => return Ok((head.status, head.framing, body, true)),
                Step::More => match pieces.next() {
                    Some(p) => buf.extend_from_slice(p),
                    None => {
                        let ended = d.eof().is_ok();
                        return Ok((head.status, head.framing, body, ended));
                    }
                },
            }
        }
    }

    proptest! {
        #[test]
        fn any_chunking_of_any_body_decodes_to_it(
            body in proptest::collection::vec(any::<u8>(), 0..2048),
            sizes in proptest::collection::vec(1usize..300, 1..20),
            cut in 1usize..512,
            upper in any::<bool>(),
        ) {
            let mut wire = Vec::new();
            let mut rest = &body[..];
            let mut i = 0;
            while !rest.is_empty() {
                let n = sizes[i % sizes.len()].min(rest.len());
                let size = if upper { format!("{n:X}") } else { format!("{n:x}") };
                wire.extend_from_slice(size.as_bytes());
                wire.extend_from_slice(b"\r\n");
                wire.extend_from_slice(&rest[..n]);
                wire.extend_from_slice(b"\r\n");
                rest = &rest[n..];
                i += 1;
            }
            wire.extend_from_slice(b"0\r\n\r\n");
            prop_assert_eq!(decode_in_pieces(Framing::Chunked, &wire, cut), Ok(body.clone()));
            let length = u64::try_from(body.len()).expect("small");
            prop_assert_eq!(decode_in_pieces(Framing::Length(length), &body, cut), Ok(body));
        }
    }

    proptest! {
        #[test]
        fn any_bytes_read_in_any_pieces_read_as_in_one(
            head in prop_oneof![
                Just(&b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"[..]),
                Just(&b"HTTP/1.1 200 OK\r\ncontent-length: 40\r\n\r\n"[..]),
                Just(&b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 200 OK\r\n\r\n"[..]),
                Just(&b"HTTP/1.1 "[..]),
                Just(&b""[..]),
            ],
            tail in proptest::collection::vec(
                prop_oneof![
                    Just(b'\r'), Just(b'\n'), Just(b'0'), Just(b'5'), Just(b'a'),
                    Just(b';'), Just(b':'), Just(b' '), any::<u8>()
                ],
                0..600,
            ),
            cut in 1usize..40,
            head_request in any::<bool>(),
        ) {
            let mut wire = head.to_vec();
            wire.extend_from_slice(&tail);
            let whole = read_answer(&wire, wire.len(), head_request);
            let pieces = read_answer(&wire, cut, head_request);
            prop_assert_eq!(&pieces, &whole);
            if let Ok((_, framing, body, ended)) = whole {
                prop_assert!(body.len() <= wire.len());
                if let (Framing::Length(n), true) = (framing, ended) {
                    prop_assert_eq!(body.len() as u64, n);
                }
            }
        }
    }
}
