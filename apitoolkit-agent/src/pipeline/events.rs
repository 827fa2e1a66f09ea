//! Typed events decoded from ring-buffer records (the only place that reinterprets kernel
//! bytes), and their recorded form: one JSON object per line, so a capture can be replayed
//! through the pipeline without root.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use apitoolkit_common::{self as abi, RecordKind};
use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ConnId {
    pub tgid: u32,
    pub fd: i32,
    pub generation: u64,
}

impl From<abi::ConnId> for ConnId {
    fn from(id: abi::ConnId) -> Self {
        Self {
            tgid: id.tgid,
            fd: id.fd,
            generation: id.generation,
        }
    }
}

/// The kernel's own enums, shared through the ABI crate (serialized in snake case).
pub use abi::{Direction, Role, Source};

/// Who moved a connection's bytes: the thread, and for Go's crypto/tls the goroutine they
/// were moved for (0 elsewhere). Links follow the goroutine where there is one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Worker {
    pub tid: u32,
    pub goroutine: u64,
}

/// Bytes one syscall moved on a connection (or a piece of them), at a stream position.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataEvent {
    pub conn: ConnId,
    pub tid: u32,
    /// Go's crypto/tls: the goroutine the bytes were moved for (see `GoroutineCreated`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub goroutine: u64,
    pub timestamp_ns: u64,
    pub direction: Direction,
    pub source: Source,
    pub position: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub skipped_len: u64,
    #[serde(with = "payload_bytes")]
    pub data: Bytes,
}

impl DataEvent {
    pub fn worker(&self) -> Worker {
        Worker {
            tid: self.tid,
            goroutine: self.goroutine,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Open {
        conn: ConnId,
        timestamp_ns: u64,
        role: Role,
        remote: Option<SocketAddr>,
        /// The connection existed before capture began: its bytes start mid-stream.
        #[serde(default, skip_serializing_if = "is_false")]
        midstream: bool,
    },
    Data(DataEvent),
    Close {
        conn: ConnId,
        timestamp_ns: u64,
        bytes_sent: u64,
        bytes_received: u64,
        /// Plaintext totals of a TLS connection.
        #[serde(default, skip_serializing_if = "is_zero")]
        tls_bytes_sent: u64,
        #[serde(default, skip_serializing_if = "is_zero")]
        tls_bytes_received: u64,
    },
    ProcessExit {
        tgid: u32,
        timestamp_ns: u64,
    },
    /// The kernel selected a process as it bound a `--port` port or executed an `--exe`
    /// program (selection's business: the pipeline passes it by).
    ProcessSelected {
        tgid: u32,
        timestamp_ns: u64,
    },
    /// A Go process started a goroutine (`g` pointers; Go reuses a `g` once its goroutine
    /// ended).
    GoroutineCreated {
        tgid: u32,
        timestamp_ns: u64,
        goroutine: u64,
        parent: u64,
    },
    /// A connect failed, or a call found the connection broken.
    ConnError {
        conn: ConnId,
        tid: u32,
        timestamp_ns: u64,
        /// Known for a failed connect.
        remote: Option<SocketAddr>,
        errno: u32,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("ring-buffer record of {0} bytes is too short")]
    TooShort(usize),
    #[error("ring-buffer record has unknown kind {0}")]
    UnknownKind(u32),
    #[error("ring-buffer record has unknown {field} value {value}")]
    BadField { field: &'static str, value: u8 },
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

fn is_false(value: &bool) -> bool {
    !*value
}

/// Reads a `repr(C)` record from the front of `bytes`.
fn read_record<T: Copy>(bytes: &[u8]) -> Result<T, DecodeError> {
    if bytes.len() < size_of::<T>() {
        return Err(DecodeError::TooShort(bytes.len()));
    }
    // SAFETY: length checked above; the ABI types are plain-old-data and read unaligned.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

fn remote_address(address: &abi::SocketAddress) -> Option<SocketAddr> {
    let ip = match address.family {
        abi::AF_INET => IpAddr::V4(Ipv4Addr::new(
            address.addr[0],
            address.addr[1],
            address.addr[2],
            address.addr[3],
        )),
        abi::AF_INET6 => IpAddr::V6(Ipv6Addr::from(address.addr)),
        _ => return None,
    };
    Some(SocketAddr::new(ip, address.port))
}

/// A raw `u8` field of a record as its ABI enum.
fn field<T: TryFrom<u8, Error = u8>>(field: &'static str, value: u8) -> Result<T, DecodeError> {
    T::try_from(value).map_err(|value| DecodeError::BadField { field, value })
}

fn decode_data(record: &[u8], arena: &mut BytesMut) -> Result<Event, DecodeError> {
    let header: abi::DataHeader = read_record(record)?;
    let start = size_of::<abi::DataHeader>();
    let end = start + header.captured_len as usize;
    let data = record
        .get(start..end)
        .ok_or(DecodeError::TooShort(record.len()))?;
    Ok(Event::Data(DataEvent {
        conn: header.conn.into(),
        tid: header.tid,
        goroutine: header.goroutine,
        timestamp_ns: header.timestamp_ns,
        direction: field("direction", header.direction)?,
        source: field("source", header.source)?,
        position: header.position,
        skipped_len: header.skipped_len,
        data: {
            arena.extend_from_slice(data);
            arena.split().freeze()
        },
    }))
}

impl Event {
    /// Decodes a ring-buffer record. Captured bytes are copied into `arena`: the events of
    /// many records share one of its allocations (freed once all of them are dropped) instead
    /// of allocating one each.
    pub fn decode(record: &[u8], arena: &mut BytesMut) -> Result<Self, DecodeError> {
        let kind: u32 = read_record(record)?;
        match RecordKind::try_from(kind).map_err(DecodeError::UnknownKind)? {
            RecordKind::Data => decode_data(record, arena),
            RecordKind::ConnOpen => {
                let record: abi::ConnRecord = read_record(record)?;
                let role = Role::try_from(record.role).unwrap_or(Role::Unknown);
                Ok(Event::Open {
                    conn: record.conn.into(),
                    timestamp_ns: record.timestamp_ns,
                    role,
                    remote: remote_address(&record.remote),
                    // The kernel opens with an unknown role only when it adopts an older socket.
                    midstream: role == Role::Unknown,
                })
            }
            RecordKind::ConnClose => {
                let record: abi::ConnRecord = read_record(record)?;
                Ok(Event::Close {
                    conn: record.conn.into(),
                    timestamp_ns: record.timestamp_ns,
                    bytes_sent: record.bytes_sent,
                    bytes_received: record.bytes_received,
                    tls_bytes_sent: record.tls_bytes_sent,
                    tls_bytes_received: record.tls_bytes_received,
                })
            }
            RecordKind::ConnError => {
                let record: abi::ConnRecord = read_record(record)?;
                Ok(Event::ConnError {
                    conn: record.conn.into(),
                    tid: record.tid,
                    timestamp_ns: record.timestamp_ns,
                    remote: remote_address(&record.remote),
                    errno: record.error,
                })
            }
            RecordKind::ProcessExit => {
                let record: abi::ProcessRecord = read_record(record)?;
                Ok(Event::ProcessExit {
                    tgid: record.tgid,
                    timestamp_ns: record.timestamp_ns,
                })
            }
            RecordKind::ProcessSelected => {
                let record: abi::ProcessRecord = read_record(record)?;
                Ok(Event::ProcessSelected {
                    tgid: record.tgid,
                    timestamp_ns: record.timestamp_ns,
                })
            }
            RecordKind::GoroutineCreated => {
                let record: abi::GoroutineRecord = read_record(record)?;
                Ok(Event::GoroutineCreated {
                    tgid: record.tgid,
                    timestamp_ns: record.timestamp_ns,
                    goroutine: record.goroutine,
                    parent: record.parent,
                })
            }
        }
    }

    pub fn timestamp_ns(&self) -> u64 {
        match self {
            Event::Open { timestamp_ns, .. }
            | Event::Close { timestamp_ns, .. }
            | Event::ConnError { timestamp_ns, .. }
            | Event::ProcessExit { timestamp_ns, .. }
            | Event::ProcessSelected { timestamp_ns, .. }
            | Event::GoroutineCreated { timestamp_ns, .. } => *timestamp_ns,
            Event::Data(data) => data.timestamp_ns,
        }
    }
}

/// Captured bytes in a recording: readable text when they are UTF-8, else `b64:` + base64.
mod payload_bytes {
    use super::*;

    const BASE64_PREFIX: &str = "b64:";

    pub fn serialize<S: Serializer>(data: &Bytes, serializer: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(data) {
            Ok(text) if !text.starts_with(BASE64_PREFIX) => serializer.serialize_str(text),
            _ => serializer.serialize_str(&format!(
                "{BASE64_PREFIX}{}",
                base64_simd::STANDARD.encode_to_string(data)
            )),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Bytes, D::Error> {
        let text = String::deserialize(deserializer)?;
        match text.strip_prefix(BASE64_PREFIX) {
            Some(encoded) => base64_simd::STANDARD
                .decode_to_vec(encoded)
                .map(Bytes::from)
                .map_err(serde::de::Error::custom),
            None => Ok(Bytes::from(text)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(captured_len: u32) -> abi::DataHeader {
        abi::DataHeader {
            kind: RecordKind::Data as u32,
            tid: 7,
            goroutine: 0xc000_0001,
            conn: abi::ConnId {
                tgid: 42,
                fd: 5,
                generation: 99,
            },
            timestamp_ns: 1000,
            position: 10,
            skipped_len: 0,
            captured_len,
            direction: Direction::Egress as u8,
            source: Source::Syscall as u8,
            _pad: [0; 2],
        }
    }

    fn record_bytes(header: &abi::DataHeader, payload: &[u8]) -> Vec<u8> {
        let mut bytes = vec![0u8; size_of::<abi::DataHeader>()];
        // SAFETY: the vector is exactly one header long.
        unsafe { std::ptr::write_unaligned(bytes.as_mut_ptr().cast(), *header) };
        bytes.extend_from_slice(payload);
        bytes
    }

    #[test]
    fn decodes_a_data_record() {
        let bytes = record_bytes(&header(5), b"HTTP/");
        let Event::Data(event) = Event::decode(&bytes, &mut BytesMut::new()).unwrap() else {
            panic!("not a data event");
        };
        assert_eq!(event.conn.tgid, 42);
        assert_eq!(event.conn.generation, 99);
        assert_eq!(event.direction, Direction::Egress);
        assert_eq!(event.position, 10);
        assert_eq!(&event.data[..], b"HTTP/");
    }

    #[test]
    fn rejects_a_record_shorter_than_its_captured_length() {
        let bytes = record_bytes(&header(50), b"HTTP/");
        assert!(matches!(
            Event::decode(&bytes, &mut BytesMut::new()),
            Err(DecodeError::TooShort(_))
        ));
    }

    #[test]
    fn rejects_unknown_kinds() {
        assert_eq!(
            Event::decode(&77u32.to_ne_bytes(), &mut BytesMut::new()),
            Err(DecodeError::UnknownKind(77))
        );
    }

    #[test]
    fn recording_round_trips_text_and_binary() {
        for data in [
            &b"GET / HTTP/1.1\r\n"[..],
            &[0xff, 0x00, 0x1f][..],
            b"b64:x",
        ] {
            let event = Event::Data(DataEvent {
                conn: ConnId {
                    tgid: 1,
                    fd: 3,
                    generation: 4,
                },
                tid: 1,
                goroutine: 0,
                timestamp_ns: 5,
                direction: Direction::Ingress,
                source: Source::Syscall,
                position: 0,
                skipped_len: 0,
                data: Bytes::copy_from_slice(data),
            });
            let line = serde_json::to_string(&event).unwrap();
            assert_eq!(serde_json::from_str::<Event>(&line).unwrap(), event);
        }
    }
}
