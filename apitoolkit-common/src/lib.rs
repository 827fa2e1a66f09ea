//! The kernel/user ABI: every record the eBPF programs put in the ring buffer, defined once.
//!
//! Each record starts with a `u32` kind tag, so userspace can tell records apart before it
//! reinterprets the bytes.
#![no_std]

/// Bytes of payload carried by one data record. A power of two so the eBPF side can bound
/// variable-length copies for the verifier.
pub const CHUNK_SIZE: usize = 16 * 1024;
/// Default size of the event ring buffer (userspace may resize it before loading). Its pages
/// are mapped twice into the agent, so they count double in its RSS.
pub const DEFAULT_RING_BUFFER_BYTES: u32 = 8 * 1024 * 1024;

/// Upper bound of loop iterations (chunks plus iovec reads) one syscall may spend; whatever a
/// syscall moves beyond that is reported as skipped bytes, never silently dropped.
pub const MAX_LOOP_STEPS: u32 = 1024;

/// Iovec entries walked per readv/writev/sendmsg/recvmsg call.
pub const MAX_IOVECS: u64 = 64;

pub const RECORD_DATA: u32 = 1;
pub const RECORD_CONN_OPEN: u32 = 2;
pub const RECORD_CONN_CLOSE: u32 = 3;
pub const RECORD_PROCESS_EXIT: u32 = 4;
/// A connect that failed, or a connection a data call found broken (reset, timed out).
pub const RECORD_CONN_ERROR: u32 = 5;

pub const DIRECTION_INGRESS: u8 = 0;
pub const DIRECTION_EGRESS: u8 = 1;

pub const ROLE_UNKNOWN: u8 = 0;
pub const ROLE_SERVER: u8 = 1;
pub const ROLE_CLIENT: u8 = 2;

pub const SOURCE_SYSCALL: u8 = 0;
pub const SOURCE_TLS: u8 = 1;
/// What a target thread wrote to fd 2 (tracebacks become payload errors); the record's
/// connection is `{tgid, fd: 2, generation: 0}` and its position is meaningless.
pub const SOURCE_STDERR: u8 = 2;

/// Indices of the kernel's configuration array, written by userspace before targets are added.
pub const CONFIG_CAPTURE_STDERR: u32 = 0;
/// Every process is a target, except `CONFIG_AGENT_TGID`.
pub const CONFIG_SELECT_ALL: u32 = 1;
/// Processes in the cgroups of the kernel's cgroup-target map are targets.
pub const CONFIG_SELECT_CGROUPS: u32 = 2;
pub const CONFIG_AGENT_TGID: u32 = 3;
pub const CONFIG_COUNT: u32 = 4;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Identity of one connection: fd numbers are reused, the generation (kernel time of first
/// sight) is not, so two connections never merge.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnId {
    pub tgid: u32,
    pub fd: i32,
    pub generation: u64,
}

/// The kernel's per-connection entry, keyed by `conn_key(tgid, fd)`. Userspace writes one for
/// each connection that predates the agent, so read/write on it are captured too.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnState {
    pub generation: u64,
    /// Socket bytes per direction: ciphertext on a TLS connection.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Plaintext bytes the TLS library moved per direction: positions of `SOURCE_TLS` records.
    pub tls_bytes_sent: u64,
    pub tls_bytes_received: u64,
}

/// Bit of `Disabled::sources` for each `SOURCE_*`.
#[inline(always)]
pub const fn source_bit(source: u8) -> u32 {
    1 << source
}

/// An entry of the kernel's disabled-connection map, keyed by `conn_key(tgid, fd)`: the byte
/// sources userspace no longer wants for that connection generation. The socket bytes of a TLS
/// connection are disabled while its plaintext keeps flowing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Disabled {
    pub generation: u64,
    pub sources: u32,
    pub _pad: u32,
}

/// Key of a connection in the kernel maps.
#[inline(always)]
pub fn conn_key(tgid: u32, fd: i32) -> u64 {
    ((tgid as u64) << 32) | (fd as u32 as u64)
}

/// Fixed part of a data record; `captured_len` payload bytes follow it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DataHeader {
    pub kind: u32,
    pub tid: u32,
    pub conn: ConnId,
    pub timestamp_ns: u64,
    /// Offset of the first payload byte in this direction's byte stream.
    pub position: u64,
    /// Bytes that follow this chunk in the stream but were not captured (sendfile, loop bound,
    /// lost records): userspace turns them into a gap.
    pub skipped_len: u64,
    pub captured_len: u32,
    pub direction: u8,
    pub source: u8,
    pub _pad: [u8; 2],
}

/// A data record as the eBPF side assembles it in per-CPU scratch memory before copying
/// `size_of::<DataHeader>() + captured_len` bytes into the ring buffer.
#[repr(C)]
pub struct DataRecord {
    pub header: DataHeader,
    pub data: [u8; CHUNK_SIZE],
}

/// A socket address as the kernel gave it to accept/connect (ports in host order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SocketAddress {
    pub family: u16,
    pub port: u16,
    pub _pad: u32,
    /// IPv4 in the first 4 bytes, or IPv6.
    pub addr: [u8; 16],
}

/// Open, close and error of a connection share one layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnRecord {
    pub kind: u32,
    pub role: u8,
    pub _pad: [u8; 3],
    /// The thread that made the call.
    pub tid: u32,
    /// `RECORD_CONN_ERROR`: the errno the call failed with (positive).
    pub error: u32,
    pub conn: ConnId,
    pub timestamp_ns: u64,
    pub remote: SocketAddress,
    /// On close: total bytes each direction carried, so a trailing gap is visible.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub tls_bytes_sent: u64,
    pub tls_bytes_received: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcessRecord {
    pub kind: u32,
    pub tgid: u32,
    pub timestamp_ns: u64,
}

/// Indices of the per-CPU counters the eBPF side keeps for events it could not deliver.
pub const COUNTER_RINGBUF_FULL: u32 = 0;
pub const COUNTER_CONN_TABLE_FULL: u32 = 1;
pub const COUNTER_INFLIGHT_TABLE_FULL: u32 = 2;
pub const COUNTER_READ_FAILED: u32 = 3;
/// TLS calls whose socket could not be found (no inner syscall, no earlier mapping).
pub const COUNTER_TLS_UNMAPPED: u32 = 4;
pub const COUNTER_COUNT: u32 = 5;

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: plain-old-data, `repr(C)`, every bit pattern valid.
    unsafe impl aya::Pod for ConnState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Disabled {}
}
