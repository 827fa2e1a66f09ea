//! What every protocol's reassembly produces: messages (a request or a response with its
//! headers, body and timing), independent of the wire format they came in.

/// An HTTP version as the payload reports it (`proto_major`, `proto_minor`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Version {
    pub major: u8,
    pub minor: u8,
}

impl Version {
    pub const HTTP_1_1: Self = Self { major: 1, minor: 1 };
    pub const HTTP_2: Self = Self { major: 2, minor: 0 };

    pub fn http1(minor: u8) -> Self {
        Self { major: 1, minor }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageKind {
    Request,
    Response,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Body {
    pub bytes: Vec<u8>,
    /// More bytes arrived than the configured maximum; the rest was dropped.
    pub truncated: bool,
    /// Part of the body was never captured (a gap inside it).
    pub incomplete: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartLine {
    Request { method: String, target: String },
    Response { status: u16 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub start: StartLine,
    pub version: Version,
    /// HTTP/2's `:authority` (the Host of HTTP/1 is a header).
    pub authority: Option<String>,
    pub headers: Vec<(String, String)>,
    pub body: Body,
    pub first_byte_ns: u64,
    pub last_byte_ns: u64,
}

impl Message {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    pub fn method(&self) -> Option<&str> {
        match &self.start {
            StartLine::Request { method, .. } => Some(method),
            StartLine::Response { .. } => None,
        }
    }

    /// Stands for the response an outgoing request never got: status 0, no headers, no body,
    /// as the SDKs report a failed call.
    pub fn missing_response(at_ns: u64) -> Self {
        Self {
            start: StartLine::Response { status: 0 },
            version: Version::HTTP_1_1,
            authority: None,
            headers: Vec::new(),
            body: Body::default(),
            first_byte_ns: at_ns,
            last_byte_ns: at_ns,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self.start {
            StartLine::Response { status } => Some(status),
            StartLine::Request { .. } => None,
        }
    }

    /// Heap bytes the message holds.
    pub fn retained_bytes(&self) -> usize {
        let start = match &self.start {
            StartLine::Request { method, target } => method.capacity() + target.capacity(),
            StartLine::Response { .. } => 0,
        };
        let headers: usize = self
            .headers
            .iter()
            .map(|(name, value)| name.capacity() + value.capacity())
            .sum();
        start + headers + self.body.bytes.capacity()
    }
}

impl Body {
    /// Appends `data`, keeping at most `max_body_bytes` in all (the rest marks it truncated).
    pub fn append(&mut self, data: &[u8], max_body_bytes: usize) {
        let room = max_body_bytes.saturating_sub(self.bytes.len());
        if data.len() > room {
            self.truncated = true;
        }
        self.bytes.extend_from_slice(&data[..data.len().min(room)]);
    }
}
