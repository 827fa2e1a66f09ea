//! HTTP/2 reassembly for one connection (RFC 9113): frames per direction, HPACK per direction
//! (dynamic table, size updates, partial decoding where the table's history is unknown), and
//! streams into exchanges, one per stream, never mixing two streams' frames.

mod frames;
mod hpack;

use std::collections::BTreeMap;

use frames::{Frame, FrameReader, Pushed, flag, kind};
use hpack::{HpackDecoder, PartialBlock};

use super::{
    Anomaly, Exchange, Reassembled,
    message::{Body, Fields, Message, MessageKind, StartLine, Version},
};

pub use frames::{HEADER_LEN as FRAME_HEADER_LEN, looks_like_frames};

/// What a client sends first on an HTTP/2 connection.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// SETTINGS_HEADER_TABLE_SIZE.
const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;
/// A header block larger than this (HEADERS plus CONTINUATIONs) is dropped with its stream.
const MAX_HEADER_BLOCK_BYTES: usize = 256 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Http2Error {
    #[error("malformed HTTP/2 {0} frame")]
    Frame(&'static str),
    #[error(
        "HTTP/2 bytes lost between frames: open streams are lost, reading resumes at a frame boundary"
    )]
    LostSync,
    #[error("HTTP/2 header block cannot be decoded: older table entries are forgotten")]
    Hpack,
    #[error("HTTP/2 header block larger than {MAX_HEADER_BLOCK_BYTES} bytes")]
    HeaderBlockTooLarge,
    #[error("HTTP/2 client did not start with the connection preface")]
    Preface,
}

/// One direction of the connection: the frames its endpoint sends and the HPACK state they
/// build.
struct Endpoint {
    frames: FrameReader,
    hpack: HpackDecoder,
    /// A header block waiting for its CONTINUATION frames.
    block: Option<PendingBlock>,
    /// Preface bytes still expected (the client's only).
    preface_left: usize,
    last_push_ns: u64,
}

struct PendingBlock {
    stream: u32,
    end_stream: bool,
    /// The stream a PUSH_PROMISE announces.
    promised: Option<u32>,
    bytes: Vec<u8>,
}

/// One side of a stream: the request, or the response.
#[derive(Default)]
struct Half {
    /// Pseudo-headers (`:method`, `:path`, `:status`, ...) and the rest, in order.
    headers: Option<Fields>,
    trailers: Fields,
    body: Body,
    first_ns: u64,
    last_ns: u64,
    ended: bool,
    /// DATA payload bytes received, kept or not.
    received: u64,
    /// Some header or trailer field referred to HPACK state from before the agent joined.
    headers_incomplete: bool,
}

#[derive(Default)]
struct Stream {
    request: Half,
    response: Half,
}

impl Stream {
    fn half(&mut self, kind: MessageKind) -> &mut Half {
        match kind {
            MessageKind::Request => &mut self.request,
            MessageKind::Response => &mut self.response,
        }
    }
}

pub struct Http2Connection {
    client: Endpoint,
    server: Endpoint,
    streams: BTreeMap<u32, Stream>,
    max_body_bytes: usize,
}

impl Endpoint {
    fn new(kind: MessageKind) -> Self {
        Self {
            frames: FrameReader::default(),
            hpack: HpackDecoder::new(),
            block: None,
            preface_left: match kind {
                MessageKind::Request => PREFACE.len(),
                MessageKind::Response => 0,
            },
            last_push_ns: 0,
        }
    }

    /// Strips the preface from the client's first bytes; false if they are not the preface.
    fn skip_preface(&mut self, data: &mut &[u8]) -> bool {
        if self.preface_left == 0 {
            return true;
        }
        let offset = PREFACE.len() - self.preface_left;
        let len = self.preface_left.min(data.len());
        if data[..len] != PREFACE[offset..offset + len] {
            self.preface_left = 0;
            return false;
        }
        self.preface_left -= len;
        *data = &data[len..];
        true
    }

    /// One direction of a connection joined mid-stream: no preface, HPACK state unknown.
    fn midstream() -> Self {
        Self {
            hpack: HpackDecoder::partial(),
            preface_left: 0,
            ..Self::new(MessageKind::Response)
        }
    }

    /// The dynamic table may no longer match the peer's (a block failed, or frames were lost):
    /// from here on only entries inserted later are known, the older ones never guessed.
    fn forget_table(&mut self) {
        self.hpack = HpackDecoder::partial();
        self.block = None;
    }

    fn decode(&mut self, block: &[u8]) -> Result<PartialBlock, Http2Error> {
        self.hpack.decode(block).map_err(|_| {
            self.forget_table();
            Http2Error::Hpack
        })
    }
}

/// A pseudo-header's value.
fn pseudo<'a>(headers: &'a Fields, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// The regular headers, without pseudo-headers.
fn regular(mut headers: Fields) -> Fields {
    headers.retain_names(|name| !name.starts_with(':'));
    headers
}

/// A request's start line (`:path`, or `:authority` for CONNECT) and authority, from its
/// pseudo-headers.
fn request_start(request: &Half) -> Option<(StartLine, Option<String>)> {
    let headers = request.headers.as_ref()?;
    let authority = pseudo(headers, ":authority").map(str::to_owned);
    let start = StartLine::Request {
        method: pseudo(headers, ":method")?.to_owned(),
        target: pseudo(headers, ":path")
            .or(authority.as_deref())?
            .to_owned(),
    };
    Some((start, authority))
}

impl Half {
    fn into_message(self, start: StartLine, authority: Option<String>) -> Message {
        let mut headers = regular(self.headers.unwrap_or_default());
        // Trailers (gRPC's grpc-status and grpc-message) belong with the headers.
        headers.append(&self.trailers);
        // A stream cut before its END_STREAM is still whole if its declared length arrived (a
        // client that has all of a Content-Length body may close before the empty last frame).
        let declared = headers
            .get("content-length")
            .and_then(|length| length.trim().parse::<u64>().ok());
        let mut body = self.body;
        body.incomplete |= !self.ended && declared != Some(self.received);
        Message {
            start,
            version: Version::HTTP_2,
            authority,
            headers,
            body,
            first_byte_ns: self.first_ns,
            last_byte_ns: self.last_ns,
        }
    }
}

impl Http2Connection {
    /// A connection whose client opens with the preface (prior knowledge, or TLS with ALPN h2).
    pub fn new(max_body_bytes: usize) -> Self {
        Self {
            client: Endpoint::new(MessageKind::Request),
            server: Endpoint::new(MessageKind::Response),
            streams: BTreeMap::new(),
            max_body_bytes,
        }
    }

    /// A connection older than the agent: the client's preface and both HPACK tables' history
    /// are gone; streams already under way are not followed (their frames are skipped).
    pub fn midstream(max_body_bytes: usize) -> Self {
        Self {
            client: Endpoint::midstream(),
            server: Endpoint::midstream(),
            ..Self::new(max_body_bytes)
        }
    }

    /// A connection upgraded from HTTP/1.1 (`Upgrade: h2c`): the upgrading request is stream
    /// 1, answered in HTTP/2.
    pub fn upgraded(request: Message, max_body_bytes: usize) -> Self {
        let mut connection = Self::new(max_body_bytes);
        let mut headers = Fields::default();
        if let StartLine::Request { method, target } = &request.start {
            headers.push(":method", method);
            headers.push(":path", target);
        }
        headers.append(&request.headers);
        let half = Half {
            headers: Some(headers),
            body: request.body,
            first_ns: request.first_byte_ns,
            last_ns: request.last_byte_ns,
            ended: true,
            ..Half::default()
        };
        connection.streams.insert(
            1,
            Stream {
                request: half,
                response: Half::default(),
            },
        );
        connection
    }

    fn endpoint(&mut self, kind: MessageKind) -> &mut Endpoint {
        match kind {
            MessageKind::Request => &mut self.client,
            MessageKind::Response => &mut self.server,
        }
    }

    pub fn push(
        &mut self,
        kind: MessageKind,
        mut data: &[u8],
        timestamp_ns: u64,
        output: &mut Reassembled,
    ) {
        let endpoint = self.endpoint(kind);
        if !endpoint.skip_preface(&mut data) {
            endpoint.frames.abandon();
            output
                .anomalies
                .push(Anomaly::Malformed(kind, Http2Error::Preface.into()));
            return;
        }
        endpoint.last_push_ns = timestamp_ns;
        if endpoint.frames.push(data) == Pushed::Resynced {
            endpoint.forget_table();
        }
        while let Some(frame) = self.endpoint(kind).frames.next_frame() {
            let handled = frame.and_then(|frame| self.on_frame(kind, frame, timestamp_ns, output));
            if let Err(error) = handled {
                output
                    .anomalies
                    .push(Anomaly::Malformed(kind, error.into()));
            }
        }
    }

    /// `len` bytes of one direction were lost.
    pub fn gap(&mut self, kind: MessageKind, len: u64, output: &mut Reassembled) {
        if let Err(error) = self.endpoint(kind).frames.gap(len) {
            output
                .anomalies
                .push(Anomaly::Malformed(kind, error.into()));
            output.anomalies.push(Anomaly::Desync);
            // Frames of this direction are gone: its open streams cannot end.
            self.drop_open_streams(output);
        }
    }

    /// Counts every open stream as lost and forgets it.
    fn drop_open_streams(&mut self, output: &mut Reassembled) {
        let open = std::mem::take(&mut self.streams);
        output.anomalies.extend(
            open.into_values()
                .map(|_| Anomaly::Unpaired(MessageKind::Request)),
        );
    }

    /// The connection closed: streams with a response so far become exchanges (their bodies
    /// incomplete), the others were never answered.
    pub fn close(&mut self, output: &mut Reassembled) {
        let streams = std::mem::take(&mut self.streams);
        for (id, stream) in streams {
            if stream.response.headers.is_some() {
                self.complete(id, stream, None, output);
            } else if let Some((start, authority)) = request_start(&stream.request) {
                output
                    .unanswered
                    .push(stream.request.into_message(start, authority));
            }
        }
    }

    pub fn awaits_response(&self) -> bool {
        self.streams
            .values()
            .any(|stream| stream.request.headers.is_some() && !stream.response.ended)
    }

    pub fn retained_bytes(&self) -> usize {
        let bodies: usize = self
            .streams
            .values()
            .map(|stream| {
                stream.request.body.bytes.capacity() + stream.response.body.bytes.capacity()
            })
            .sum();
        self.client.frames.retained_bytes() + self.server.frames.retained_bytes() + bodies
    }

    /// Drops everything held to free memory; both directions resync at their next push of whole
    /// frames.
    pub fn evict(&mut self, output: &mut Reassembled) {
        self.client.frames.abandon();
        self.server.frames.abandon();
        self.drop_open_streams(output);
    }

    fn on_frame(
        &mut self,
        kind: MessageKind,
        frame: Frame,
        timestamp_ns: u64,
        output: &mut Reassembled,
    ) -> Result<(), Http2Error> {
        let header = frame.header;
        let endpoint = self.endpoint(kind);
        if endpoint.block.is_some() && header.kind != kind::CONTINUATION {
            // RFC 9113 §6.10: nothing may interleave a header block. Its stream is lost.
            let block = endpoint.block.take().expect("checked");
            self.streams.remove(&block.stream);
            return Err(Http2Error::Frame("interrupted header block"));
        }
        let fragment = match header.kind {
            kind::DATA => {
                self.on_data(kind, &frame, timestamp_ns, output)?;
                None
            }
            kind::HEADERS => {
                let skip = if header.has(flag::PRIORITY) { 5 } else { 0 };
                Some(PendingBlock {
                    stream: header.stream,
                    end_stream: header.has(flag::END_STREAM),
                    promised: None,
                    bytes: frame.content(skip)?.to_vec(),
                })
            }
            kind::PUSH_PROMISE => {
                let content = frame.content(0)?;
                let promised = content
                    .get(..4)
                    .map(|id| u32::from_be_bytes([id[0], id[1], id[2], id[3]]) & 0x7fff_ffff)
                    .ok_or(Http2Error::Frame("PUSH_PROMISE"))?;
                Some(PendingBlock {
                    stream: header.stream,
                    end_stream: false,
                    promised: Some(promised),
                    bytes: content[4..].to_vec(),
                })
            }
            kind::CONTINUATION => {
                let endpoint = self.endpoint(kind);
                let Some(mut block) = endpoint.block.take() else {
                    return Err(Http2Error::Frame("CONTINUATION without HEADERS"));
                };
                if block.stream != header.stream {
                    self.streams.remove(&block.stream);
                    return Err(Http2Error::Frame("CONTINUATION of another stream"));
                }
                block.bytes.extend_from_slice(&frame.payload);
                Some(block)
            }
            kind::RST_STREAM => {
                let code = frame
                    .payload
                    .get(..4)
                    .map(|code| u32::from_be_bytes([code[0], code[1], code[2], code[3]]))
                    .ok_or(Http2Error::Frame("RST_STREAM"))?;
                if let Some(stream) = self.streams.remove(&header.stream)
                    && stream.request.headers.is_some()
                {
                    self.complete(header.stream, stream, Some(code), output);
                }
                None
            }
            kind::SETTINGS if !header.has(flag::ACK) => {
                // The sender's decoder allows the peer's encoder this large a table.
                let peer = match kind {
                    MessageKind::Request => &mut self.server,
                    MessageKind::Response => &mut self.client,
                };
                for setting in frame.payload.chunks_exact(6) {
                    let id = u16::from_be_bytes([setting[0], setting[1]]);
                    let value =
                        u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]);
                    if id == SETTINGS_HEADER_TABLE_SIZE {
                        peer.hpack.allow_table_size(value);
                    }
                }
                None
            }
            // GOAWAY, PING, PRIORITY, WINDOW_UPDATE, SETTINGS acks and unknown (extension)
            // frames carry nothing an exchange needs.
            _ => None,
        };
        match fragment {
            Some(block) => self.on_block_fragment(
                kind,
                block,
                header.has(flag::END_HEADERS),
                timestamp_ns,
                output,
            ),
            None => Ok(()),
        }
    }

    fn on_data(
        &mut self,
        kind: MessageKind,
        frame: &Frame,
        timestamp_ns: u64,
        output: &mut Reassembled,
    ) -> Result<(), Http2Error> {
        let header = frame.header;
        let content = frame.content(0)?;
        let max_body_bytes = self.max_body_bytes;
        let Some(stream) = self.streams.get_mut(&header.stream) else {
            return Ok(());
        };
        let half = stream.half(kind);
        half.body.append(&content, max_body_bytes);
        half.received += content.len() as u64;
        half.body.incomplete |= frame.lost > 0;
        half.last_ns = timestamp_ns;
        if header.has(flag::END_STREAM) {
            half.ended = true;
            self.maybe_complete(header.stream, output);
        }
        Ok(())
    }

    /// A HEADERS, PUSH_PROMISE or CONTINUATION fragment: decoded once the block is whole.
    fn on_block_fragment(
        &mut self,
        kind: MessageKind,
        block: PendingBlock,
        end_headers: bool,
        timestamp_ns: u64,
        output: &mut Reassembled,
    ) -> Result<(), Http2Error> {
        if block.bytes.len() > MAX_HEADER_BLOCK_BYTES {
            self.streams.remove(&block.stream);
            // Undecoded, the block's table updates are lost with it.
            self.endpoint(kind).forget_table();
            return Err(Http2Error::HeaderBlockTooLarge);
        }
        if !end_headers {
            self.endpoint(kind).block = Some(block);
            return Ok(());
        }
        let decoded = self.endpoint(kind).decode(&block.bytes);
        let PartialBlock {
            headers,
            incomplete,
        } = match decoded {
            Ok(fields) => fields,
            Err(error) => {
                self.streams.remove(&block.stream);
                return Err(error);
            }
        };
        if let Some(promised) = block.promised {
            // A server push: the promise carries the request the server answers on `promised`.
            let stream = self.streams.entry(promised).or_default();
            stream.request = Half {
                headers: Some(headers),
                first_ns: timestamp_ns,
                last_ns: timestamp_ns,
                ended: true,
                headers_incomplete: incomplete,
                ..Half::default()
            };
            return Ok(());
        }
        if kind == MessageKind::Response && !self.streams.contains_key(&block.stream) {
            // A response on a stream whose request was not seen (opened before the agent).
            return Ok(());
        }
        let stream = self.streams.entry(block.stream).or_default();
        let half = stream.half(kind);
        half.headers_incomplete |= incomplete;
        let informational =
            pseudo(&headers, ":status").is_some_and(|status| status.starts_with('1'));
        if half.headers.is_none() {
            if informational {
                // 100 Continue and friends: the final response follows on the same stream.
                return Ok(());
            }
            half.headers = Some(headers);
            half.first_ns = timestamp_ns;
        } else {
            half.trailers.append(&regular(headers));
        }
        half.last_ns = timestamp_ns;
        if block.end_stream {
            stream.half(kind).ended = true;
            self.maybe_complete(block.stream, output);
        }
        Ok(())
    }

    /// A stream is an exchange once its response ended.
    fn maybe_complete(&mut self, id: u32, output: &mut Reassembled) {
        if self
            .streams
            .get(&id)
            .is_some_and(|stream| stream.response.ended)
        {
            let stream = self.streams.remove(&id).expect("checked");
            self.complete(id, stream, None, output);
        }
    }

    fn complete(&mut self, id: u32, stream: Stream, reset: Option<u32>, output: &mut Reassembled) {
        let Some((start, authority)) = request_start(&stream.request) else {
            output
                .anomalies
                .push(Anomaly::Unpaired(MessageKind::Response));
            return;
        };
        let status = stream
            .response
            .headers
            .as_ref()
            .and_then(|headers| pseudo(headers, ":status"))
            .and_then(|status| status.parse().ok())
            .unwrap_or(0);
        let mut response = stream.response;
        if response.headers.is_none() {
            response.first_ns = self.server.last_push_ns.max(self.client.last_push_ns);
            response.last_ns = response.first_ns;
        }
        output.exchanges.push(Exchange {
            serial: u64::from(id),
            headers_incomplete: stream.request.headers_incomplete || response.headers_incomplete,
            request: stream.request.into_message(start, authority),
            response: response.into_message(StartLine::Response { status }, None),
            reset,
        });
    }
}

#[cfg(test)]
pub(super) mod tests;
