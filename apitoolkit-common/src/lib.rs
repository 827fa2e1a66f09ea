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

/// Iovec entries walked per readv/writev/sendmsg/recvmsg call: the kernel's own limit (UIO_MAXIOV),
/// since node's HTTP/2 writes a large body as hundreds of iovecs (a frame header and its payload
/// each). The loop bound still caps the work per call.
pub const MAX_IOVECS: u64 = 1024;

/// Declares an ABI enum with its derives (serde in snake case for userspace), `ALL`, and a `TryFrom` of its raw type that hands an
/// unknown value back as the error: kernel bytes are validated, never transmuted (an invalid
/// discriminant would be undefined behaviour), so the record structs keep raw fields.
macro_rules! abi_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident: $raw:ty {
            $($(#[$variant_meta:meta])* $variant:ident = $value:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[repr($raw)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[cfg_attr(
            feature = "user",
            derive(serde::Serialize, serde::Deserialize),
            serde(rename_all = "snake_case")
        )]
        pub enum $name {
            $($(#[$variant_meta])* $variant = $value,)+
        }

        impl $name {
            /// Every variant, in declaration (and value) order.
            pub const ALL: [$name; [$($value),+].len()] = [$($name::$variant),+];
        }

        impl TryFrom<$raw> for $name {
            type Error = $raw;

            fn try_from(value: $raw) -> Result<Self, $raw> {
                match value {
                    $($value => Ok($name::$variant),)+
                    _ => Err(value),
                }
            }
        }
    };
}

abi_enum! {
    /// The tag every ring-buffer record starts with (its first `u32`): it says which layout
    /// follows before userspace reinterprets the bytes.
    pub enum RecordKind: u32 {
        /// A [`DataHeader`] and its payload.
        Data = 1,
        /// A [`ConnRecord`] for a connection seen in accept/connect or adopted mid-stream.
        ConnOpen = 2,
        /// A [`ConnRecord`] with the byte totals, so a trailing gap is visible.
        ConnClose = 3,
        /// A [`ProcessRecord`]: the process's connections end with it.
        ProcessExit = 4,
        /// A [`ConnRecord`] for a connect that failed, or a connection a data call found broken
        /// (reset, timed out).
        ConnError = 5,
        /// A [`ProcessRecord`]: the kernel selected a process the moment it bound a `--port` port
        /// or executed an `--exe` program; userspace confirms it from /proc.
        ProcessSelected = 6,
        /// A [`GoroutineRecord`]: a target Go process started a goroutine.
        GoroutineCreated = 7,
    }
}

abi_enum! {
    /// The stream of a connection a data record belongs to: each direction has its own
    /// positions.
    pub enum Direction: u8 {
        Ingress = 0,
        Egress = 1,
    }
}

abi_enum! {
    /// Which end of a connection the target is, as far as the kernel saw it being set up.
    pub enum Role: u8 {
        /// Adopted mid-stream (older than the agent), or not known to the reporting call.
        Unknown = 0,
        Server = 1,
        Client = 2,
    }
}

abi_enum! {
    /// Where a data record's bytes were captured. Each source keeps its own stream positions
    /// and can be disabled per connection (see [`Disabled`]).
    pub enum Source: u8 {
        /// Socket syscalls: the bytes on the wire (ciphertext on a TLS connection).
        Syscall = 0,
        /// Plaintext from the TLS library's read/write functions.
        Tls = 1,
        /// What a target thread wrote to fd 2 (tracebacks become payload errors); the record's
        /// connection is `{tgid, fd: 2, generation: 0}` and its position counts from the start of
        /// the write (a long write comes as its first and last chunk, the middle skipped).
        Stderr = 2,
    }
}

impl Source {
    /// This source's bit in [`Disabled::sources`].
    #[inline(always)]
    pub const fn bit(self) -> u32 {
        1 << self as u8
    }
}

// `ConnState::disabled_sources_at_epoch` keeps a connection's disabled sources in 8 bits.
const _: () = assert!(Source::ALL.len() <= 8);

/// Length of the kernel's task name (`comm`), NUL included.
pub const COMM_LEN: usize = 16;

/// The task name a process executing `program` gets: the file name of the path it executed,
/// cut to 15 bytes, NUL-padded. The key of the exe-target map.
pub fn exe_comm(program: &str) -> [u8; COMM_LEN] {
    let name = program.rsplit('/').next().unwrap_or(program).as_bytes();
    let mut comm = [0; COMM_LEN];
    let len = name.len().min(COMM_LEN - 1);
    comm[..len].copy_from_slice(&name[..len]);
    comm
}

abi_enum! {
    /// Indices of the per-CPU counters the eBPF side keeps for events it could not deliver, so
    /// losses are reported rather than silent.
    pub enum Counter: u32 {
        RingbufFull = 0,
        ConnTableFull = 1,
        /// Threads that got no per-thread slot (`THREADS` full): their TLS calls are not
        /// captured. The name is kept: it is a metric label users may alert on.
        InflightTableFull = 2,
        ReadFailed = 3,
        /// TLS calls whose socket could not be found (no inner syscall, no earlier mapping).
        TlsUnmapped = 4,
        /// Stderr writes dropped because the ring buffer was filling: errors yield to traffic.
        StderrYielded = 5,
    }
}

/// Size of the kernel's counter array.
pub const COUNTER_COUNT: u32 = Counter::ALL.len() as u32;

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
    /// Plaintext bytes the TLS library moved per direction: positions of `Source::Tls` records.
    pub tls_bytes_sent: u64,
    pub tls_bytes_received: u64,
    /// The kernel's copy of this generation's [`Disabled::sources`] (low 8 bits), valid while
    /// the disabled epoch is the high bits minus one; 0 until first looked up. Kept in one
    /// word so CPUs sharing the connection never pair one epoch with another's sources.
    pub disabled_sources_at_epoch: u64,
    /// The SSL object (its address in the process) the kernel last recorded in its SSL object
    /// map as served by this connection generation, 0 before: an SSL call on it then skips
    /// that map's lookup, a cache miss per request.
    pub tls_object: u64,
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

/// The attach cookie of the Go probes: where the socket's fd sits, from a `*tls.Conn`, in the
/// Go version of the probed executable (the byte offsets of the `net.Conn` interface's data word
/// in `tls.Conn`, of the `*netFD` in `net.TCPConn`, and of `Sysfd` in `netFD`), and, for the
/// program at `Read`'s copy of plaintext into the caller's buffer, the offset from RSP of the
/// receiver `Read` spilled to the stack (0 elsewhere). 16 bits each, in that order.
#[inline(always)]
pub const fn go_probe_cookie(offsets: [u16; 4]) -> u64 {
    (offsets[0] as u64)
        | ((offsets[1] as u64) << 16)
        | ((offsets[2] as u64) << 32)
        | ((offsets[3] as u64) << 48)
}

/// The offsets of [`go_probe_cookie`], in its order.
#[inline(always)]
pub const fn go_probe_offsets(cookie: u64) -> [u64; 4] {
    [
        cookie & 0xffff,
        (cookie >> 16) & 0xffff,
        (cookie >> 32) & 0xffff,
        cookie >> 48,
    ]
}

/// Key of a connection in the kernel maps.
#[inline(always)]
pub fn conn_key(tgid: u32, fd: i32) -> u64 {
    ((tgid as u64) << 32) | (fd as u32 as u64)
}

/// Fixed part of a data record; `captured_len` payload bytes follow it. The record may be
/// longer: the kernel reserves it in the ring buffer in one of a few sizes.
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
    /// Go's crypto/tls: the goroutine the bytes were moved for (the caller of an HTTP client
    /// round trip when the connection's read or write loop moved them); 0 elsewhere.
    pub goroutine: u64,
    pub captured_len: u32,
    pub direction: u8,
    pub source: u8,
    pub _pad: [u8; 2],
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
    /// `RecordKind::ConnError`: the errno the call failed with (positive).
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

/// A goroutine and the goroutine whose `go` statement started it (the `g` pointers), so
/// userspace can follow work a request's handler hands to other goroutines.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GoroutineRecord {
    pub kind: u32,
    pub tgid: u32,
    pub timestamp_ns: u64,
    pub goroutine: u64,
    pub parent: u64,
}

/// Names of the kernel object's maps: userspace finds each map by the name of its `#[map]`
/// static, so both sides spell it once, here.
pub mod maps {
    /// Selected processes (and their threads) by id: a byte per id below `pid_max`, eight to
    /// an element, written by userspace through a memory mapping.
    pub const WATCHED: &str = "WATCHED";
    /// Selected ids beyond [`WATCHED`].
    pub const TARGETS: &str = "TARGETS";
    /// Selected cgroups (v2 ids).
    pub const CGROUP_TARGETS: &str = "CGROUP_TARGETS";
    /// `--port` ports: a process binding one is selected at once.
    pub const PORT_TARGETS: &str = "PORT_TARGETS";
    /// `--exe` program names as the kernel's task name ([`crate::exe_comm`]): a process
    /// executing one is selected at once.
    pub const EXE_TARGETS: &str = "EXE_TARGETS";
    /// Known connections ([`crate::ConnState`] by [`crate::conn_key`]).
    pub const CONNECTIONS: &str = "CONNECTIONS";
    /// Byte sources userspace gave up on ([`crate::Disabled`] by [`crate::conn_key`]).
    pub const DISABLED: &str = "DISABLED";
    /// Bumped by userspace after each update of [`DISABLED`], so the kernel looks a
    /// connection's entry up again only when some entry may have changed (one `u64`).
    pub const DISABLED_EPOCH: &str = "DISABLED_EPOCH";
    /// Per-thread state: the SSL call in progress and the last connection fd the thread moved
    /// bytes on.
    pub const THREADS: &str = "THREADS";
    /// Per-CPU loss counters indexed by [`crate::Counter`].
    pub const COUNTERS: &str = "COUNTERS";
    /// The ring buffer every record goes through; userspace may resize it before loading.
    pub const EVENTS: &str = "EVENTS";
    /// Per-CPU state of the chunk-emitting loop.
    pub const EMIT_STATE: &str = "EMIT_STATE";
    /// The connection each SSL object was last seen on.
    pub const SSL_CONNS: &str = "SSL_CONNS";
    /// Go crypto/tls reads between their entry and return, by goroutine.
    pub const GO_TLS_READS: &str = "GO_TLS_READS";
    /// The goroutine calling `runtime.newproc1`, by thread.
    pub const GO_NEWPROC_CALLERS: &str = "GO_NEWPROC_CALLERS";
    /// The goroutine of each net/http client connection's round trip in progress.
    pub const GO_ROUND_TRIPS: &str = "GO_ROUND_TRIPS";
    /// The connection each net/http read or write loop goroutine serves.
    pub const GO_CONN_LOOPS: &str = "GO_CONN_LOOPS";
}

/// Names of the kernel object's read-only globals, which the loader sets.
pub mod globals {
    /// The event ring buffer's size in bytes (`u32`).
    pub const RING_BUFFER_BYTES: &str = "RING_BUFFER_BYTES";
    /// Where `child_pid` is in a sched_process_fork record (`u32`): its comm fields became
    /// `__data_loc` strings in later kernels, which moved it.
    pub const FORK_CHILD_PID_OFFSET: &str = "FORK_CHILD_PID_OFFSET";
    /// Non-zero: capture what target threads write to stderr (`u32`).
    pub const CAPTURE_STDERR: &str = "CAPTURE_STDERR";
    /// Non-zero (`--all`): every process but the agent is a target (`u32`).
    pub const SELECT_ALL: &str = "SELECT_ALL";
    /// Non-zero (`--cgroup`): processes in the cgroups of the cgroup-target map are targets
    /// (`u32`).
    pub const SELECT_CGROUPS: &str = "SELECT_CGROUPS";
    /// The agent's own process, never a target: it would capture its own output (`u32`).
    pub const AGENT_TGID: &str = "AGENT_TGID";
}

/// `child_pid`'s offset in sched_process_fork records with `__data_loc` comm fields (newer
/// kernels, and the default until the loader reads the format).
pub const DEFAULT_FORK_CHILD_PID_OFFSET: u32 = 20;
/// `child_pid`'s offset in sched_process_fork records with `char[16]` comm fields.
pub const CHAR_COMM_FORK_CHILD_PID_OFFSET: u32 = 44;

/// Names of the kernel object's programs (the names of their functions) and where userspace
/// attaches them, so the loader and the object cannot drift apart.
pub mod programs {
    pub const EXIT_INGRESS_CALL: &str = "exit_ingress_call";
    pub const EXIT_EGRESS_CALL: &str = "exit_egress_call";
    pub const EXIT_ACCEPT_OR_CONNECT: &str = "exit_accept_or_connect";
    pub const EXIT_GETSOCKOPT: &str = "exit_getsockopt";
    pub const ENTER_CLOSE: &str = "enter_close";
    pub const PROCESS_FORK: &str = "process_fork";
    pub const PROCESS_EXIT: &str = "process_exit";
    /// bind: selects a process binding a `--port` port.
    pub const ENTER_BIND: &str = "enter_bind";
    /// exec: selects a process executing an `--exe` program.
    pub const PROCESS_EXEC: &str = "process_exec";

    pub const SSL_READ_ENTER: &str = "ssl_read_enter";
    pub const SSL_READ_EX_ENTER: &str = "ssl_read_ex_enter";
    pub const SSL_WRITE_ENTER: &str = "ssl_write_enter";
    pub const SSL_WRITE_EX_ENTER: &str = "ssl_write_ex_enter";
    pub const SSL_WRITE_EX2_ENTER: &str = "ssl_write_ex2_enter";
    /// The uretprobe every SSL function shares: the entry program stashed what it needs.
    pub const SSL_CALL_RETURN: &str = "ssl_call_return";

    /// Go `crypto/tls.(*Conn).Read`, at its one call of `runtime.memmove` (the plaintext copied
    /// into the caller's buffer) where the code proves the receiver's stack slot; else at its
    /// entry and (a uprobe each) at every `ret`.
    pub const GO_TLS_READ_COPY: &str = "go_tls_read_copy";
    pub const GO_TLS_READ_ENTER: &str = "go_tls_read_enter";
    pub const GO_TLS_READ_RETURN: &str = "go_tls_read_return";
    /// Go `crypto/tls.(*Conn).Write`, at its entry only: the bytes are all there.
    pub const GO_TLS_WRITE_ENTER: &str = "go_tls_write_enter";
    /// Goroutine creation: the calls of `runtime.newproc1` and `runtime.runqput` in the
    /// closure `runtime.newproc` runs on the system stack.
    pub const GO_NEWPROC1_CALL: &str = "go_newproc1_call";
    pub const GO_RUNQPUT_CALL: &str = "go_runqput_call";
    /// net/http's client: `(*persistConn).roundTrip` (the caller's goroutine) and the entries
    /// of the connection's `readLoop` and `writeLoop`.
    pub const GO_ROUND_TRIP_ENTER: &str = "go_round_trip_enter";
    pub const GO_CONN_LOOP_ENTER: &str = "go_conn_loop_enter";
    pub const GO_PROGRAMS: [&str; 8] = [
        GO_TLS_READ_COPY,
        GO_TLS_READ_ENTER,
        GO_TLS_READ_RETURN,
        GO_TLS_WRITE_ENTER,
        GO_NEWPROC1_CALL,
        GO_RUNQPUT_CALL,
        GO_ROUND_TRIP_ENTER,
        GO_CONN_LOOP_ENTER,
    ];

    /// Tracepoints by program: (program, category, event names).
    pub const TRACEPOINTS: &[(&str, &str, &[&str])] = &[
        (
            EXIT_INGRESS_CALL,
            "syscalls",
            &[
                "sys_exit_read",
                "sys_exit_readv",
                "sys_exit_recvfrom",
                "sys_exit_recvmsg",
            ],
        ),
        (
            EXIT_EGRESS_CALL,
            "syscalls",
            &[
                "sys_exit_write",
                "sys_exit_writev",
                "sys_exit_sendto",
                "sys_exit_sendmsg",
                "sys_exit_sendfile64",
            ],
        ),
        (
            EXIT_ACCEPT_OR_CONNECT,
            "syscalls",
            &["sys_exit_accept", "sys_exit_accept4", "sys_exit_connect"],
        ),
        (EXIT_GETSOCKOPT, "syscalls", &["sys_exit_getsockopt"]),
        (ENTER_CLOSE, "syscalls", &["sys_enter_close"]),
        (PROCESS_FORK, "sched", &["sched_process_fork"]),
        (PROCESS_EXIT, "sched", &["sched_process_exit"]),
        (ENTER_BIND, "syscalls", &["sys_enter_bind"]),
        (PROCESS_EXEC, "sched", &["sched_process_exec"]),
    ];

    /// SSL functions to probe, with their entry programs: (function, program). Each also gets
    /// [`SSL_CALL_RETURN`]. `SSL_write_ex` calls `SSL_write_ex2` where the latter exists (OpenSSL
    /// 3.3+), so userspace probes only one of the two.
    pub const SSL_PROGRAMS: &[(&str, &str)] = &[
        ("SSL_read", SSL_READ_ENTER),
        ("SSL_read_ex", SSL_READ_EX_ENTER),
        ("SSL_write", SSL_WRITE_ENTER),
        ("SSL_write_ex", SSL_WRITE_EX_ENTER),
        ("SSL_write_ex2", SSL_WRITE_EX2_ENTER),
    ];
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: plain-old-data, `repr(C)`, every bit pattern valid.
    unsafe impl aya::Pod for ConnState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Disabled {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exe_comm_is_the_file_name_as_the_kernel_names_the_task() {
        assert_eq!(&exe_comm("/usr/bin/node"), b"node\0\0\0\0\0\0\0\0\0\0\0\0");
        assert_eq!(&exe_comm("gunicorn"), b"gunicorn\0\0\0\0\0\0\0\0");
        // Task names hold 15 bytes and a NUL.
        assert_eq!(
            &exe_comm("/opt/a-very-long-server-name"),
            b"a-very-long-ser\0"
        );
    }

    /// Every variant survives raw -> enum -> raw, and the value just past the last is rejected.
    macro_rules! round_trips {
        ($name:ident, $raw:ty) => {{
            for (index, variant) in $name::ALL.into_iter().enumerate() {
                let raw = variant as $raw;
                assert_eq!($name::try_from(raw), Ok(variant));
                if index > 0 {
                    assert!(raw > $name::ALL[index - 1] as $raw, "ALL is in value order");
                }
            }
            let past = $name::ALL[$name::ALL.len() - 1] as $raw + 1;
            assert_eq!($name::try_from(past), Err(past));
            assert_eq!($name::try_from(<$raw>::MAX), Err(<$raw>::MAX));
        }};
    }

    #[test]
    fn go_probe_offsets_unpack_what_the_cookie_packs() {
        assert_eq!(
            go_probe_offsets(go_probe_cookie([8, 0, 16, 0x70])),
            [8, 0, 16, 0x70]
        );
        assert_eq!(
            go_probe_offsets(go_probe_cookie([u16::MAX, 1, u16::MAX, u16::MAX])),
            [65535, 1, 65535, 65535]
        );
    }

    #[test]
    fn enums_round_trip_and_reject_unknown_values() {
        round_trips!(RecordKind, u32);
        round_trips!(Direction, u8);
        round_trips!(Role, u8);
        round_trips!(Source, u8);
        round_trips!(Counter, u32);
        assert_eq!(RecordKind::try_from(0), Err(0));
    }

    #[test]
    fn every_program_has_one_attachment() {
        use programs::*;
        let all = [
            EXIT_INGRESS_CALL,
            EXIT_EGRESS_CALL,
            EXIT_ACCEPT_OR_CONNECT,
            EXIT_GETSOCKOPT,
            ENTER_CLOSE,
            PROCESS_FORK,
            PROCESS_EXIT,
            ENTER_BIND,
            PROCESS_EXEC,
            SSL_READ_ENTER,
            SSL_READ_EX_ENTER,
            SSL_WRITE_ENTER,
            SSL_WRITE_EX_ENTER,
            SSL_WRITE_EX2_ENTER,
            SSL_CALL_RETURN,
            GO_TLS_READ_COPY,
            GO_TLS_READ_ENTER,
            GO_TLS_READ_RETURN,
            GO_TLS_WRITE_ENTER,
            GO_NEWPROC1_CALL,
            GO_RUNQPUT_CALL,
            GO_ROUND_TRIP_ENTER,
            GO_CONN_LOOP_ENTER,
        ];
        for program in all {
            let uses = TRACEPOINTS.iter().filter(|(p, ..)| *p == program).count()
                + SSL_PROGRAMS.iter().filter(|(_, p)| *p == program).count()
                + usize::from(SSL_CALL_RETURN == program)
                + GO_PROGRAMS.iter().filter(|p| **p == program).count();
            assert_eq!(uses, 1, "{program}");
        }
        assert_eq!(
            TRACEPOINTS.len() + SSL_PROGRAMS.len() + 1 + GO_PROGRAMS.len(),
            all.len()
        );
    }
}
