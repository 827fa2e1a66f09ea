//! Protocol reassembly: each protocol turns one connection's byte streams into exchanges of
//! [`message::Message`]s. A connection starts as HTTP/1 and switches to HTTP/2 when its client
//! opens with the HTTP/2 preface (prior knowledge, or TLS with ALPN h2) or upgrades to h2c.

pub mod content;
pub mod form;
pub mod http1;
pub mod http2;
pub mod message;

use bytes::Bytes;
use http1::HttpConnection;
use http2::{Http2Connection, PREFACE};
use message::{Message, MessageKind};

/// Why bytes could not be read as the connection's protocol.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Malformed {
    #[error(transparent)]
    Http1(#[from] http1::parser::ParseError),
    #[error(transparent)]
    Http2(#[from] http2::Http2Error),
}

/// A request and the response that answered it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exchange {
    /// The request's number on its connection (see `Reassembled::requests_read`).
    pub serial: u64,
    pub request: Message,
    pub response: Message,
    /// HTTP/2: the RST_STREAM error code that ended the stream.
    pub reset: Option<u32>,
    /// HTTP/2 on a connection older than the agent: some header fields referred to HPACK
    /// state from before, so they are missing (never guessed).
    pub headers_incomplete: bool,
}

/// Things reassembly noticed that cost an exchange or a connection; the caller counts them.
#[derive(Debug, PartialEq, Eq)]
pub enum Anomaly {
    /// Bytes were lost where no message boundary could absorb them.
    Desync,
    /// A request or response dropped because pairing could not be trusted.
    Unpaired(MessageKind),
    Malformed(MessageKind, Malformed),
}

/// A request read completely, before its response: what linking needs of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRead {
    pub serial: u64,
    /// Its `traceparent` header, as sent.
    pub traceparent: Option<String>,
}

/// What the bytes pushed into one connection's reassembly produced.
#[derive(Default, Debug, PartialEq, Eq)]
pub struct Reassembled {
    pub exchanges: Vec<Exchange>,
    pub anomalies: Vec<Anomaly>,
    /// Requests read completely and now awaiting their response; the exchange that answers
    /// one carries the same serial.
    pub requests_read: Vec<RequestRead>,
    /// Requests still awaiting a response when the connection closed.
    pub unanswered: Vec<Message>,
}

/// One connection's reassembly: HTTP/1 until the connection shows it speaks HTTP/2.
#[allow(
    clippy::large_enum_variant,
    reason = "HTTP/1 is the common case: it stays inline, the rarer HTTP/2 state is boxed"
)]
pub enum Reassembler {
    Http1 {
        http: HttpConnection,
        /// The first bytes, held while the client's may still be the HTTP/2 preface; `None`
        /// once decided (or for a connection joined mid-stream).
        opening: Option<Opening>,
        max_body_bytes: usize,
    },
    Http2(Box<Http2Connection>),
}

/// Bytes held until the client's first bytes tell the protocol. An HTTP/2 server may send its
/// SETTINGS before reading the preface; an HTTP/1 server never speaks first.
#[derive(Default)]
pub struct Opening {
    client: Vec<u8>,
    server: Vec<u8>,
    /// The connection is older than the agent: no preface to expect, but frames may show it
    /// is HTTP/2 all the same.
    midstream: bool,
}

/// A server sending more than this before its client said anything is no HTTP server.
const MAX_OPENING_SERVER_BYTES: usize = 64 * 1024;

impl Reassembler {
    pub fn new(max_body_bytes: usize) -> Self {
        Self::Http1 {
            http: HttpConnection::new(max_body_bytes),
            opening: Some(Opening::default()),
            max_body_bytes,
        }
    }

    /// For a connection older than the agent whose role is known: HTTP/2 if its client's first
    /// bytes are HTTP/2 frames, else HTTP/1.
    pub fn midstream(max_body_bytes: usize) -> Self {
        Self::Http1 {
            http: HttpConnection::new(max_body_bytes),
            opening: Some(Opening {
                midstream: true,
                ..Opening::default()
            }),
            max_body_bytes,
        }
    }

    /// For a connection older than the agent, of unknown role: HTTP/1, resynchronising on a
    /// message start.
    pub fn joined_midstream(max_body_bytes: usize) -> Self {
        Self::Http1 {
            http: HttpConnection::joined_midstream(max_body_bytes),
            opening: None,
            max_body_bytes,
        }
    }

    pub fn push(
        &mut self,
        kind: MessageKind,
        data: Bytes,
        timestamp_ns: u64,
        output: &mut Reassembled,
    ) {
        let Self::Http1 {
            http,
            opening,
            max_body_bytes,
        } = self
        else {
            let Self::Http2(http2) = self else {
                unreachable!("two variants")
            };
            http2.push(kind, &data, timestamp_ns, output);
            return;
        };
        let max_body_bytes = *max_body_bytes;
        let Some(held) = opening else {
            http.push(kind, data, timestamp_ns, output);
            self.follow_h2c_upgrade(timestamp_ns, output);
            return;
        };
        match kind {
            MessageKind::Request => held.client.extend_from_slice(&data),
            MessageKind::Response => held.server.extend_from_slice(&data),
        }
        let client = &held.client;
        let undecided = if held.midstream {
            client.len() < http2::FRAME_HEADER_LEN
        } else {
            client.len() < PREFACE.len() && PREFACE.starts_with(client)
        };
        if undecided && held.server.len() <= MAX_OPENING_SERVER_BYTES {
            return;
        }
        let held = opening.take().expect("matched");
        if held.midstream && http2::looks_like_frames(&held.client) {
            *self = Self::Http2(Box::new(Http2Connection::midstream(max_body_bytes)));
        } else if held.client.starts_with(PREFACE) {
            *self = Self::Http2(Box::new(Http2Connection::new(max_body_bytes)));
        }
        for (kind, bytes) in [
            (MessageKind::Request, held.client),
            (MessageKind::Response, held.server),
        ] {
            if !bytes.is_empty() {
                self.push(kind, Bytes::from(bytes), timestamp_ns, output);
            }
        }
    }

    /// An HTTP/1 connection that switched to HTTP/2 by `Upgrade: h2c` continues as HTTP/2.
    fn follow_h2c_upgrade(&mut self, timestamp_ns: u64, output: &mut Reassembled) {
        let Self::Http1 {
            http,
            max_body_bytes,
            ..
        } = self
        else {
            return;
        };
        let Some(upgrade) = http.take_h2c_upgrade() else {
            return;
        };
        let mut http2 = Http2Connection::upgraded(upgrade.request, *max_body_bytes);
        http2.push(
            MessageKind::Request,
            &upgrade.client_bytes,
            timestamp_ns,
            output,
        );
        http2.push(
            MessageKind::Response,
            &upgrade.server_bytes,
            timestamp_ns,
            output,
        );
        *self = Self::Http2(Box::new(http2));
    }

    pub fn gap(&mut self, kind: MessageKind, len: u64, output: &mut Reassembled) {
        match self {
            Self::Http1 { http, opening, .. } => {
                *opening = None;
                http.gap(kind, len, output);
            }
            Self::Http2(http2) => http2.gap(kind, len, output),
        }
    }

    pub fn close(&mut self, output: &mut Reassembled) {
        match self {
            Self::Http1 { http, opening, .. } => {
                // A client that sent less than a preface and closed: whatever it was, HTTP/1.
                if let Some(held) = opening.take() {
                    http.push(MessageKind::Request, held.client.into(), 0, output);
                    http.push(MessageKind::Response, held.server.into(), 0, output);
                }
                http.close(output);
            }
            Self::Http2(http2) => http2.close(output),
        }
    }

    /// True once the first bytes failed to parse as HTTP: the caller can stop capturing.
    pub fn is_not_http(&self, output: &Reassembled) -> bool {
        match self {
            Self::Http1 { http, .. } => http.is_not_http(output),
            Self::Http2(_) => false,
        }
    }

    /// Switched to a protocol other than HTTP (a WebSocket, say).
    pub fn is_upgraded(&self) -> bool {
        match self {
            Self::Http1 { http, .. } => http.is_upgraded(),
            Self::Http2(_) => false,
        }
    }

    pub fn awaits_response(&self) -> bool {
        match self {
            Self::Http1 { http, .. } => http.awaits_response(),
            Self::Http2(http2) => http2.awaits_response(),
        }
    }

    pub fn retained_bytes(&self) -> usize {
        match self {
            Self::Http1 { http, opening, .. } => {
                let held = opening
                    .as_ref()
                    .map_or(0, |held| held.client.capacity() + held.server.capacity());
                http.retained_bytes() + held
            }
            Self::Http2(http2) => http2.retained_bytes(),
        }
    }

    pub fn evict(&mut self, output: &mut Reassembled) {
        match self {
            Self::Http1 { http, opening, .. } => {
                *opening = None;
                http.evict(output);
            }
            Self::Http2(http2) => http2.evict(output),
        }
    }
}
