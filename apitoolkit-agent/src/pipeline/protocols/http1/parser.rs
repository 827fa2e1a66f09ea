//! Incremental HTTP/1.x message parser for one direction of one connection.
//!
//! Bytes are pushed as they arrive; `poll` yields complete messages. Gaps inside a body of
//! known length are absorbed (the body is marked incomplete); any other gap drops the partial
//! message and the parser resynchronises at the next message start.

use std::ops::Deref;

use bytes::{Buf, Bytes, BytesMut};

use super::framing::{ChunkState, ChunkStep, Framing, MAX_HEAD_BYTES, chunk_boundary};
use crate::pipeline::protocols::message::{Body, Fields, Message, MessageKind, StartLine, Version};

const MAX_HEADERS: usize = 256;
/// Headers a head is first parsed with room for.
const USUAL_HEADERS: usize = 32;
/// Longest token a resync scan must keep from a buffer it discards, so a message start split
/// across two pushes is still found.
const RESYNC_KEEP: usize = 16;
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"PATCH ",
    b"OPTIONS ",
    b"CONNECT ",
    b"TRACE ",
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("malformed HTTP head: {0}")]
    Head(httparse::Error),
    #[error("HTTP head longer than {MAX_HEAD_BYTES} bytes")]
    HeadTooLong,
    #[error("malformed chunk size line")]
    ChunkSize,
    #[error("invalid Content-Length {0:?}")]
    ContentLength(String),
}

/// What `poll` found.
#[derive(Debug, PartialEq, Eq)]
pub enum Polled {
    Message(Message),
    /// A complete 1xx interim response: nothing to pair, the final response follows.
    Interim,
    /// The bytes are not HTTP; the partial message was dropped and the parser resyncs.
    Malformed(ParseError),
}

#[derive(Debug)]
enum State {
    /// At a message boundary, maybe holding part of the next head.
    Head,
    Body {
        message: Message,
        framing: Framing,
        /// The message was handed out before its body ended (a response answered it early):
        /// the rest of the body is consumed and dropped.
        detached: bool,
    },
    /// Discarding bytes until something that looks like a message start.
    Resync,
    /// After `101 Switching Protocols` nothing on this connection is HTTP/1.
    Upgraded,
}

/// How far `parse_body` got.
enum BodyProgress {
    NeedMore,
    Done(Message),
    /// The body of a detached message ended.
    Dropped,
}

/// Unparsed bytes: the pushed record itself ([`Bytes`]) or the parser's own copy of a partial
/// message ([`BytesMut`]).
pub(super) trait Unparsed: Buf + Deref<Target = [u8]> {}

impl Unparsed for Bytes {}
impl Unparsed for BytesMut {}

pub struct MessageParser {
    kind: MessageKind,
    max_body_bytes: usize,
    /// The bytes pushed last, parsed where they lie (no copy) while `buffer` is empty; what is
    /// left of them after parsing moves to `buffer` ([`MessageParser::settle`]), so no record's
    /// allocation (a shared arena) is held between pushes.
    pushed: Bytes,
    /// A copy of the bytes of a message that did not arrive whole; later pushes append to it.
    buffer: BytesMut,
    state: State,
    /// Time of the first byte of the message being assembled.
    first_byte_ns: Option<u64>,
    last_push_ns: u64,
}

impl MessageParser {
    pub fn new(kind: MessageKind, max_body_bytes: usize) -> Self {
        Self {
            kind,
            max_body_bytes,
            pushed: Bytes::new(),
            buffer: BytesMut::new(),
            state: State::Head,
            first_byte_ns: None,
            last_push_ns: 0,
        }
    }

    /// A parser that joins a stream in the middle (a connection older than the agent).
    pub fn resyncing(kind: MessageKind, max_body_bytes: usize) -> Self {
        let mut parser = Self::new(kind, max_body_bytes);
        parser.state = State::Resync;
        parser
    }

    pub fn push(&mut self, data: Bytes, timestamp_ns: u64) {
        if matches!(self.state, State::Upgraded) {
            return;
        }
        if self.first_byte_ns.is_none() && !data.is_empty() {
            self.first_byte_ns = Some(timestamp_ns);
        }
        self.last_push_ns = timestamp_ns;
        if self.nothing_unparsed() {
            self.pushed = data;
        } else {
            self.settle();
            self.buffer.extend_from_slice(&data);
        }
    }

    /// Copies what parsing left of the pushed bytes into the parser's own buffer: a partial
    /// message must not hold the allocation its record shares with others. Called once the
    /// pushed bytes are parsed as far as they go.
    pub fn settle(&mut self) {
        if !self.pushed.is_empty() {
            self.buffer.extend_from_slice(&self.pushed);
        }
        self.pushed = Bytes::new();
    }

    fn nothing_unparsed(&self) -> bool {
        self.buffer.is_empty() && self.pushed.is_empty()
    }

    /// True when no message is in progress and no bytes wait: the stream is between messages
    /// (or waiting to resync with nothing buffered).
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Head | State::Resync) && self.nothing_unparsed()
    }

    pub fn is_resyncing(&self) -> bool {
        matches!(self.state, State::Resync)
    }

    /// Method of a request whose head is parsed but whose body is still arriving.
    pub fn request_in_progress_method(&self) -> Option<&str> {
        match &self.state {
            State::Body {
                message,
                detached: false,
                ..
            } => message.method(),
            _ => None,
        }
    }

    /// Hands out the message whose body is still arriving, marked incomplete: its peer
    /// answered before reading it all (a 404 or 401 to a large upload). The rest of its body
    /// is still consumed, and dropped, so it never reads as the next message.
    pub fn detach_in_progress(&mut self) -> Option<Message> {
        let State::Body {
            message, detached, ..
        } = &mut self.state
        else {
            return None;
        };
        if *detached {
            return None;
        }
        *detached = true;
        let mut early = message.clone();
        early.body.incomplete = true;
        early.last_byte_ns = self.last_push_ns;
        Some(early)
    }

    /// Heap bytes buffered for the message in progress.
    pub fn retained_bytes(&self) -> usize {
        let message = match &self.state {
            State::Body { message, .. } => message.retained_bytes(),
            _ => 0,
        };
        self.buffer.capacity() + self.pushed.len() + message
    }

    /// Drops the message in progress and frees its memory (the agent needs it back); the
    /// parser resyncs on the next message start.
    pub fn abandon(&mut self) {
        if matches!(self.state, State::Upgraded) {
            return;
        }
        self.pushed = Bytes::new();
        self.buffer = BytesMut::new();
        self.first_byte_ns = None;
        self.state = State::Resync;
    }

    /// After a 101 nothing more is HTTP/1: returns the bytes buffered past the message, the
    /// start of the new protocol.
    pub fn upgrade(&mut self) -> BytesMut {
        self.state = State::Upgraded;
        self.settle();
        std::mem::take(&mut self.buffer)
    }

    /// `len` bytes of the stream were lost. Returns false when the message in progress had to
    /// be dropped (the caller must treat pairing as unreliable).
    pub fn gap(&mut self, len: u64) -> bool {
        if let State::Body {
            message, framing, ..
        } = &mut self.state
            && self.buffer.is_empty()
            && self.pushed.is_empty()
        {
            let absorbed = match framing {
                Framing::Length(remaining) if len <= *remaining => {
                    *remaining -= len;
                    true
                }
                Framing::Chunked(ChunkState::Data(remaining)) if len <= *remaining => {
                    *remaining -= len;
                    true
                }
                Framing::UntilClose => true,
                _ => false,
            };
            if absorbed {
                message.body.incomplete = true;
                return true;
            }
        }
        match self.state {
            State::Upgraded => true,
            State::Head if self.nothing_unparsed() => {
                // Whole messages may be missing; the next bytes may start anywhere.
                self.state = State::Resync;
                false
            }
            _ => {
                self.pushed = Bytes::new();
                self.buffer.clear();
                self.first_byte_ns = None;
                self.state = State::Resync;
                false
            }
        }
    }

    /// The connection closed: a body delimited by the close is complete now.
    pub fn close(&mut self) -> Option<Message> {
        match std::mem::replace(&mut self.state, State::Head) {
            State::Body {
                mut message,
                framing: Framing::UntilClose,
                detached: false,
            } => {
                self.settle();
                message.body.append(&self.buffer, self.max_body_bytes);
                self.buffer.clear();
                message.last_byte_ns = self.last_push_ns;
                Some(message)
            }
            _ => None,
        }
    }

    /// Parses as far as the buffered bytes allow. `request_method` is the method of the request
    /// the next response answers (it decides whether a body follows).
    pub fn poll(&mut self, request_method: Option<&str>) -> Option<Polled> {
        // The unparsed bytes are taken out while parsing (so the parser's state can change
        // beside them) and put back after.
        if self.buffer.is_empty() {
            let mut pushed = std::mem::take(&mut self.pushed);
            let polled = self.poll_from(&mut pushed, request_method);
            self.pushed = pushed;
            polled
        } else {
            let mut buffer = std::mem::take(&mut self.buffer);
            let polled = self.poll_from(&mut buffer, request_method);
            self.buffer = buffer;
            polled
        }
    }

    fn poll_from(
        &mut self,
        input: &mut impl Unparsed,
        request_method: Option<&str>,
    ) -> Option<Polled> {
        loop {
            match &mut self.state {
                State::Upgraded => return None,
                State::Resync => {
                    if !self.resync(input) {
                        return None;
                    }
                }
                State::Head => {
                    if input.is_empty() {
                        self.first_byte_ns = None;
                        return None;
                    }
                    match self.parse_head(input, request_method) {
                        Ok(Some(polled)) => return Some(polled),
                        Ok(None) if matches!(self.state, State::Head) => return None,
                        Ok(None) => {}
                        Err(error) => return Some(self.malformed(input, error)),
                    }
                }
                State::Body { .. } => match self.parse_body(input) {
                    Ok(BodyProgress::Done(message)) => return Some(Polled::Message(message)),
                    Ok(BodyProgress::Dropped) => {}
                    Ok(BodyProgress::NeedMore) => return None,
                    Err(error) => return Some(self.malformed(input, error)),
                },
            }
        }
    }

    /// Drops the message in progress and resyncs past its first byte: the bytes that failed may
    /// themselves look like a message start, and resyncing on them would fail forever.
    fn malformed(&mut self, input: &mut impl Unparsed, error: ParseError) -> Polled {
        if !input.is_empty() {
            input.advance(1);
        }
        self.state = State::Resync;
        self.first_byte_ns = None;
        Polled::Malformed(error)
    }

    /// Drops bytes up to the next plausible message start. Returns true when one was found.
    fn resync(&mut self, input: &mut impl Unparsed) -> bool {
        let found = (0..input.len()).find(|&index| {
            (index == 0 || input[index - 1] == b'\n')
                && looks_like_start(self.kind, &input[index..])
        });
        match found {
            Some(index) => {
                input.advance(index);
                self.state = State::Head;
                self.first_byte_ns = Some(self.last_push_ns);
                true
            }
            None => {
                let keep = input.len().min(RESYNC_KEEP);
                input.advance(input.len() - keep);
                false
            }
        }
    }

    /// Parses a head from the buffer. `Ok(None)` with the state still `Head` means more bytes are
    /// needed; with the state moved to `Body` it means the body follows.
    fn parse_head(
        &mut self,
        input: &mut impl Unparsed,
        request_method: Option<&str>,
    ) -> Result<Option<Polled>, ParseError> {
        // Most heads fit the storage on the stack; the rare larger one is parsed again with
        // room for all the headers a head may have.
        let mut usual_storage = [httparse::EMPTY_HEADER; USUAL_HEADERS];
        let mut large_storage;
        let mut header_storage: &mut [httparse::Header<'_>] = &mut usual_storage;
        loop {
            let parsed = match self.kind {
                MessageKind::Request => parse_request_head(input, header_storage),
                MessageKind::Response => parse_response_head(input, header_storage),
            };
            match parsed {
                Err(ParseError::Head(httparse::Error::TooManyHeaders))
                    if header_storage.len() < MAX_HEADERS =>
                {
                    large_storage = vec![httparse::EMPTY_HEADER; MAX_HEADERS];
                    header_storage = &mut large_storage;
                }
                Err(error) => return Err(error),
                Ok(None) if input.len() > MAX_HEAD_BYTES => {
                    return Err(ParseError::HeadTooLong);
                }
                Ok(None) => return Ok(None),
                Ok(Some((head_len, start, version_minor, headers))) => {
                    input.advance(head_len);
                    let first_byte_ns = self.first_byte_ns.take().unwrap_or(self.last_push_ns);
                    let message = Message {
                        start,
                        version: Version::http1(version_minor),
                        authority: None,
                        headers,
                        body: Body::default(),
                        first_byte_ns,
                        last_byte_ns: self.last_push_ns,
                    };
                    return self.begin_body(message, request_method);
                }
            }
        }
    }

    fn begin_body(
        &mut self,
        message: Message,
        request_method: Option<&str>,
    ) -> Result<Option<Polled>, ParseError> {
        if let Some(status) = message.status() {
            if (100..200).contains(&status) && status != 101 {
                return Ok(Some(Polled::Interim));
            }
            let bodiless = status == 101
                || status == 204
                || status == 304
                || request_method.is_some_and(|method| method.eq_ignore_ascii_case("HEAD"))
                || (request_method.is_some_and(|method| method.eq_ignore_ascii_case("CONNECT"))
                    && (200..300).contains(&status));
            if bodiless {
                return Ok(Some(Polled::Message(message)));
            }
        }
        let chunked = message
            .header("transfer-encoding")
            .is_some_and(|value| value.to_ascii_lowercase().contains("chunked"));
        let framing = if chunked {
            Framing::Chunked(ChunkState::Size)
        } else if let Some(length) = message.header("content-length") {
            let length = length
                .trim()
                .parse::<u64>()
                .map_err(|_| ParseError::ContentLength(length.to_owned()))?;
            if length == 0 {
                return Ok(Some(Polled::Message(message)));
            }
            Framing::Length(length)
        } else if message.status().is_some() {
            Framing::UntilClose
        } else {
            return Ok(Some(Polled::Message(message)));
        };
        self.state = State::Body {
            message,
            framing,
            detached: false,
        };
        Ok(None)
    }

    fn parse_body(&mut self, input: &mut impl Unparsed) -> Result<BodyProgress, ParseError> {
        let State::Body {
            message,
            framing,
            detached,
        } = &mut self.state
        else {
            return Ok(BodyProgress::NeedMore);
        };
        // A detached message's body is consumed, not kept.
        let limit = if *detached { 0 } else { self.max_body_bytes };
        loop {
            match framing {
                Framing::UntilClose => {
                    message.body.append(input, limit);
                    input.advance(input.len());
                    return Ok(BodyProgress::NeedMore);
                }
                Framing::Length(remaining) | Framing::Chunked(ChunkState::Data(remaining)) => {
                    let take = (*remaining).min(input.len() as u64) as usize;
                    message.body.append(&input[..take], limit);
                    input.advance(take);
                    *remaining -= take as u64;
                    if *remaining > 0 {
                        return Ok(BodyProgress::NeedMore);
                    }
                    match framing {
                        Framing::Length(_) => break,
                        _ => *framing = Framing::Chunked(ChunkState::DataEnd),
                    }
                }
                Framing::Chunked(boundary) => match chunk_boundary(input, *boundary)? {
                    ChunkStep::NeedMore => return Ok(BodyProgress::NeedMore),
                    ChunkStep::Next(next) => *framing = Framing::Chunked(next),
                    ChunkStep::BodyEnd => break,
                },
            }
        }
        let State::Body {
            mut message,
            detached,
            ..
        } = std::mem::replace(&mut self.state, State::Head)
        else {
            unreachable!("state checked at the top of parse_body");
        };
        message.last_byte_ns = self.last_push_ns;
        self.first_byte_ns = (!input.is_empty()).then_some(self.last_push_ns);
        Ok(if detached {
            BodyProgress::Dropped
        } else {
            BodyProgress::Done(message)
        })
    }
}

type ParsedHead = (usize, StartLine, u8, Fields);

/// The fields of a head parsed from `buffer`, copied in one piece when they are UTF-8 (nearly
/// always), else field by field with invalid values made lossy.
fn collect_headers<'b>(buffer: &'b [u8], headers: &[httparse::Header<'b>]) -> Fields {
    let parts = headers
        .iter()
        .map(|header| (header.name.as_bytes(), header.value));
    if let Some(fields) = Fields::from_buffer(buffer, parts) {
        return fields;
    }
    let text_bytes = headers
        .iter()
        .map(|header| header.name.len() + header.value.len())
        .sum();
    let mut fields = Fields::with_capacity(text_bytes, headers.len());
    for header in headers {
        match std::str::from_utf8(header.value) {
            Ok(value) => fields.push(header.name, value),
            Err(_) => fields.push(header.name, &String::from_utf8_lossy(header.value)),
        }
    }
    fields
}

fn parse_request_head<'b>(
    buffer: &'b [u8],
    storage: &mut [httparse::Header<'b>],
) -> Result<Option<ParsedHead>, ParseError> {
    let mut request = httparse::Request::new(storage);
    match request.parse(buffer).map_err(ParseError::Head)? {
        httparse::Status::Partial => Ok(None),
        httparse::Status::Complete(len) => Ok(Some((
            len,
            StartLine::Request {
                method: request.method.unwrap_or_default().to_owned(),
                target: request.path.unwrap_or_default().to_owned(),
            },
            request.version.unwrap_or(1),
            collect_headers(buffer, request.headers),
        ))),
    }
}

fn parse_response_head<'b>(
    buffer: &'b [u8],
    storage: &mut [httparse::Header<'b>],
) -> Result<Option<ParsedHead>, ParseError> {
    let mut response = httparse::Response::new(storage);
    let parsed = httparse::ParserConfig::default()
        .allow_spaces_after_header_name_in_responses(true)
        .allow_obsolete_multiline_headers_in_responses(true)
        .parse_response(&mut response, buffer)
        .map_err(ParseError::Head)?;
    match parsed {
        httparse::Status::Partial => Ok(None),
        httparse::Status::Complete(len) => Ok(Some((
            len,
            StartLine::Response {
                status: response.code.unwrap_or_default(),
            },
            response.version.unwrap_or(1),
            collect_headers(buffer, response.headers),
        ))),
    }
}

/// Whether `bytes` can be the start of a message of `kind`; a prefix too short to tell counts.
pub fn looks_like_start(kind: MessageKind, bytes: &[u8]) -> bool {
    let prefix_matches = |token: &[u8]| {
        let len = token.len().min(bytes.len());
        !bytes.is_empty() && bytes[..len] == token[..len]
    };
    match kind {
        MessageKind::Request => METHODS.iter().any(|method| prefix_matches(method)),
        MessageKind::Response => prefix_matches(b"HTTP/1."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(parser: &mut MessageParser, method: Option<&str>) -> Vec<Polled> {
        std::iter::from_fn(|| parser.poll(method)).collect()
    }

    impl MessageParser {
        /// Pushes a copy of `data`, as a record of its own.
        fn push_copy(&mut self, data: &[u8], timestamp_ns: u64) {
            self.push(Bytes::copy_from_slice(data), timestamp_ns);
        }
    }

    fn only_message(polled: Vec<Polled>) -> Message {
        match <[Polled; 1]>::try_from(polled) {
            Ok([Polled::Message(message)]) => message,
            Ok([other]) => panic!("expected a message, got {other:?}"),
            Err(polled) => panic!("expected one message, got {polled:?}"),
        }
    }

    #[test]
    fn request_split_at_every_byte() {
        let raw =
            b"POST /users?id=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n{\"a\": true}";
        let mut parser = MessageParser::new(MessageKind::Request, 1 << 20);
        let mut messages = Vec::new();
        for (index, byte) in raw.iter().enumerate() {
            parser.push_copy(&[*byte], index as u64 + 1);
            messages.extend(parse_all(&mut parser, None));
        }
        let message = only_message(messages);
        assert_eq!(
            message.start,
            StartLine::Request {
                method: "POST".into(),
                target: "/users?id=1".into()
            }
        );
        assert_eq!(message.body.bytes, b"{\"a\": true}");
        assert_eq!(message.first_byte_ns, 1);
        assert_eq!(message.last_byte_ns, raw.len() as u64);
        assert!(parser.is_idle());
    }

    /// Records share one arena allocation: a parser may read a pushed record in place, but
    /// must not keep it once the push is parsed, or one partial message pins the whole arena.
    #[test]
    fn parses_in_place_and_keeps_only_a_copy_of_the_partial_message() {
        let record = Bytes::from(
            b"GET /a HTTP/1.1\r\n\r\nPOST /b HTTP/1.1\r\nContent-Length: 4\r\n\r\nab".to_vec(),
        );
        let mut parser = MessageParser::new(MessageKind::Request, 1 << 20);
        parser.push(record.slice(..), 1);
        let message = only_message(parse_all(&mut parser, None));
        assert_eq!(message.method(), Some("GET"));
        parser.settle();
        assert!(record.is_unique(), "the partial POST holds the record");
        assert!(parser.retained_bytes() >= 2);
        parser.push(Bytes::from_static(b"cd"), 2);
        let message = only_message(parse_all(&mut parser, None));
        assert_eq!(message.body.bytes, b"abcd");
        assert_eq!(message.first_byte_ns, 1);
        assert!(parser.is_idle());
    }

    #[test]
    fn chunked_body_is_decoded_with_trailers() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n";
        let mut parser = MessageParser::new(MessageKind::Response, 1 << 20);
        parser.push_copy(raw, 1);
        let message = only_message(parse_all(&mut parser, Some("GET")));
        assert_eq!(message.body.bytes, b"hello world");
        assert!(parser.is_idle());
    }

    #[test]
    fn head_response_has_no_body_despite_content_length() {
        let mut parser = MessageParser::new(MessageKind::Response, 1 << 20);
        parser.push_copy(b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n", 1);
        let message = only_message(parse_all(&mut parser, Some("HEAD")));
        assert_eq!(message.status(), Some(200));
        assert!(message.body.bytes.is_empty());
        assert!(parser.is_idle());
    }

    #[test]
    fn interim_response_is_reported_then_final_response() {
        let mut parser = MessageParser::new(MessageKind::Response, 1 << 20);
        parser.push_copy(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
            1,
        );
        let polled = parse_all(&mut parser, Some("POST"));
        assert_eq!(polled.len(), 2);
        assert_eq!(polled[0], Polled::Interim);
        let Polled::Message(message) = &polled[1] else {
            panic!("{polled:?}");
        };
        assert_eq!(message.status(), Some(204));
    }

    #[test]
    fn close_delimited_body_completes_on_close() {
        let mut parser = MessageParser::new(MessageKind::Response, 1 << 20);
        parser.push_copy(b"HTTP/1.0 200 OK\r\n\r\nabc", 1);
        assert!(parse_all(&mut parser, Some("GET")).is_empty());
        parser.push_copy(b"def", 2);
        assert!(parse_all(&mut parser, Some("GET")).is_empty());
        let message = parser.close().expect("message completes at close");
        assert_eq!(message.body.bytes, b"abcdef");
        assert_eq!(message.version, Version::http1(0));
        assert_eq!(message.last_byte_ns, 2);
    }

    #[test]
    fn body_over_the_limit_is_truncated_and_marked() {
        let mut parser = MessageParser::new(MessageKind::Request, 4);
        parser.push_copy(b"PUT / HTTP/1.1\r\nContent-Length: 10\r\n\r\n0123456789", 1);
        let message = only_message(parse_all(&mut parser, None));
        assert_eq!(message.body.bytes, b"0123");
        assert!(message.body.truncated);
    }

    #[test]
    fn gap_inside_known_length_body_is_absorbed() {
        let mut parser = MessageParser::new(MessageKind::Response, 1 << 20);
        parser.push_copy(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab", 1);
        assert!(parse_all(&mut parser, Some("GET")).is_empty());
        assert!(parser.gap(5));
        parser.push_copy(b"xyz", 2);
        let message = only_message(parse_all(&mut parser, Some("GET")));
        assert_eq!(message.body.bytes, b"abxyz");
        assert!(message.body.incomplete);
    }

    #[test]
    fn gap_in_a_head_resyncs_at_the_next_message() {
        let mut parser = MessageParser::new(MessageKind::Request, 1 << 20);
        parser.push_copy(b"GET /lost HTTP/1.1\r\nHo", 1);
        assert!(parse_all(&mut parser, None).is_empty());
        assert!(!parser.gap(100));
        parser.push_copy(b"st: a\r\n\r\nGET /next HTTP/1.1\r\n\r\n", 2);
        let message = only_message(parse_all(&mut parser, None));
        assert_eq!(
            message.start,
            StartLine::Request {
                method: "GET".into(),
                target: "/next".into()
            }
        );
    }

    #[test]
    fn garbage_is_malformed_and_followed_by_resync() {
        let mut parser = MessageParser::new(MessageKind::Request, 1 << 20);
        parser.push_copy(b"\x16\x03\x01 binary\r\n\r\nGET /ok HTTP/1.1\r\n\r\n", 1);
        let polled = parse_all(&mut parser, None);
        assert!(matches!(polled[0], Polled::Malformed(_)), "{polled:?}");
        let Polled::Message(message) = &polled[1] else {
            panic!("{polled:?}");
        };
        assert_eq!(message.method(), Some("GET"));
    }

    /// Found by fuzzing: a bad head that starts like a message used to resync onto itself and
    /// report it as malformed forever.
    #[test]
    fn a_malformed_head_that_looks_like_a_start_is_reported_once() {
        let mut responses = MessageParser::new(MessageKind::Response, 1 << 20);
        responses.push_copy(b"HTTP/1.1 200 OK\r\x10Content-Length: 0\r\n\r\n", 1);
        responses.push_copy(b"HTTP/1.1 204 No Content\r\n\r\n", 2);
        let polled = parse_all(&mut responses, None);
        assert!(matches!(polled[0], Polled::Malformed(_)), "{polled:?}");
        assert!(
            matches!(&polled[1..], [Polled::Message(message)] if message.status() == Some(204))
        );

        let mut requests = MessageParser::new(MessageKind::Request, 1 << 20);
        requests.push_copy(
            b"GET / HTTP/1.1\r\nBad Header\r\n\r\nGET /ok HTTP/1.1\r\n\r\n",
            1,
        );
        let polled = parse_all(&mut requests, None);
        assert!(matches!(polled[0], Polled::Malformed(_)), "{polled:?}");
        assert!(
            matches!(&polled[1..], [Polled::Message(message)] if message.method() == Some("GET"))
        );
    }

    #[test]
    fn header_values_keep_valid_utf8_and_replace_invalid_bytes() {
        let mut parser = MessageParser::new(MessageKind::Request, 1 << 20);
        parser.push_copy(
            b"GET / HTTP/1.1\r\nX-Name: Zo\xc3\xab\r\nX-Raw: a\xffb\r\n\r\n",
            1,
        );
        let message = only_message(parse_all(&mut parser, None));
        assert_eq!(message.header("x-name"), Some("Zo\u{eb}"));
        assert_eq!(message.header("x-raw"), Some("a\u{fffd}b"));
    }

    #[test]
    fn fields_copied_in_one_piece_are_the_fields_parsed() {
        let head = b"HTTP/1.1 200 OK\r\nEmpty:\r\nX-Folded: a\r\n  b\r\nServer:  nginx \r\n\
            Set-Cookie: a=1\r\nset-cookie: b=\xc3\xab\r\n\r\n";
        let mut storage = [httparse::EMPTY_HEADER; USUAL_HEADERS];
        let Ok(Some((_, _, _, fields))) = parse_response_head(head, &mut storage) else {
            panic!("a complete head");
        };
        let parsed = &storage[..fields.len()];
        let in_one_piece = parsed
            .iter()
            .map(|header| (header.name.as_bytes(), header.value));
        assert!(
            Fields::from_buffer(head, in_one_piece).is_some(),
            "the head's fields are copied in one piece"
        );
        let one_by_one: Fields = parsed
            .iter()
            .map(|header| (header.name, std::str::from_utf8(header.value).unwrap()))
            .collect();
        assert_eq!(fields, one_by_one);
        assert_eq!(fields.get("empty"), Some(""));
        assert_eq!(fields.get("server"), Some("nginx"));
        assert_eq!(fields.get("SET-COOKIE"), Some("a=1"));
        assert_eq!(fields.iter().last(), Some(("set-cookie", "b=\u{eb}")));
    }

    #[test]
    fn many_headers_retry_with_a_larger_table() {
        let mut raw = b"GET / HTTP/1.1\r\n".to_vec();
        for index in 0..100 {
            raw.extend_from_slice(format!("X-H{index}: v\r\n").as_bytes());
        }
        raw.extend_from_slice(b"\r\n");
        let mut parser = MessageParser::new(MessageKind::Request, 1 << 20);
        parser.push_copy(&raw, 1);
        let message = only_message(parse_all(&mut parser, None));
        assert_eq!(message.headers.len(), 100);
    }

    #[test]
    fn upgrade_stops_parsing() {
        let mut parser = MessageParser::new(MessageKind::Response, 1 << 20);
        parser.push_copy(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
            1,
        );
        let message = only_message(parse_all(&mut parser, Some("GET")));
        assert_eq!(message.status(), Some(101));
        parser.upgrade();
        parser.push_copy(b"\x81\x05hello", 2);
        assert!(parse_all(&mut parser, Some("GET")).is_empty());
    }
}
