//! Socket capture for the processes userspace selects: syscall tracepoints stash arguments on
//! entry and emit the bytes actually moved on exit. Only fds known to be TCP connections (seen
//! in accept/connect, registered by userspace from /proc, or used by a socket-only syscall) are
//! captured, so file and pipe I/O costs one map lookup.
//!
//! TLS: uprobes on the TLS library's read/write functions emit the plaintext. The socket
//! syscall that runs inside an SSL call on the same thread names its connection (no struct
//! offsets), and its ciphertext is not emitted.
#![no_std]
#![no_main]

use apitoolkit_common::{
    AF_INET, AF_INET6, CHUNK_SIZE, CONFIG_AGENT_TGID, CONFIG_CAPTURE_STDERR, CONFIG_COUNT,
    CONFIG_SELECT_ALL, CONFIG_SELECT_CGROUPS, COUNTER_CONN_TABLE_FULL, COUNTER_COUNT,
    COUNTER_INFLIGHT_TABLE_FULL, COUNTER_READ_FAILED, COUNTER_RINGBUF_FULL, COUNTER_TLS_UNMAPPED,
    ConnId, ConnRecord, ConnState, DEFAULT_RING_BUFFER_BYTES, DIRECTION_EGRESS, DIRECTION_INGRESS,
    DataHeader, DataRecord, Disabled, MAX_IOVECS, MAX_LOOP_STEPS, ProcessRecord, RECORD_CONN_CLOSE,
    RECORD_CONN_ERROR, RECORD_CONN_OPEN, RECORD_DATA, RECORD_PROCESS_EXIT, ROLE_CLIENT,
    ROLE_SERVER, ROLE_UNKNOWN, SOURCE_STDERR, SOURCE_SYSCALL, SOURCE_TLS, SocketAddress, conn_key,
    source_bit,
};
use core::ffi::c_void;

use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user,
        generated,
    },
    macros::{map, tracepoint, uprobe, uretprobe},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{ProbeContext, RetProbeContext, TracePointContext},
};

/// Offsets in the syscall tracepoint records (see events/syscalls/*/format): arguments are
/// 8-byte slots after the common header and syscall number; the exit record has only `ret`.
const SYSCALL_ARG0: usize = 16;
const SYSCALL_RET: usize = 16;
const EINPROGRESS: i64 = 115;
const EPIPE: i64 = 32;
const ECONNRESET: i64 = 104;
const ETIMEDOUT: i64 = 110;
const ECONNREFUSED: i64 = 111;
const SOL_SOCKET: u64 = 1;
const SO_ERROR: u64 = 4;
const STDERR_FD: i32 = 2;

/// Selected processes (and their threads) by id: `--pid` and what userspace discovers.
#[map]
static TARGETS: HashMap<u32, u8> = HashMap::with_max_entries(16384, 0);

/// Selected cgroups (v2 ids) for `--cgroup`.
#[map]
static CGROUP_TARGETS: HashMap<u64, u8> = HashMap::with_max_entries(256, 0);

#[map]
static CONNECTIONS: LruHashMap<u64, ConnState> = LruHashMap::with_max_entries(65536, 0);

/// Byte sources userspace gave up on per connection (not HTTP, or TLS ciphertext).
#[map]
static DISABLED: LruHashMap<u64, Disabled> = LruHashMap::with_max_entries(16384, 0);

/// LRU so threads killed inside a syscall (no exit event) cannot fill it up.
#[map]
static IN_FLIGHT: LruHashMap<u64, InFlightCall> = LruHashMap::with_max_entries(16384, 0);

#[map]
static SCRATCH: PerCpuArray<DataRecord> = PerCpuArray::with_max_entries(1, 0);

/// Switches userspace sets at start-up (`CONFIG_*`).
#[map]
static CONFIG: Array<u32> = Array::with_max_entries(CONFIG_COUNT, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BUFFER_BYTES, 0);

#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum CallKind {
    Buffer,
    IoVec,
    SizeOnly,
    Accept,
    Connect,
    /// getsockopt(SO_ERROR): how a non-blocking connect ended.
    SocketError,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct InFlightCall {
    /// Buffer, iovec array or sockaddr, by kind.
    user_ptr: u64,
    /// Iovec count for `IoVec`.
    count: u64,
    fd: i32,
    kind: CallKind,
    /// The syscall only works on sockets (recv*/send*), so an unknown fd is a connection that
    /// predates the agent. read/write may be file I/O: userspace registers older sockets for them.
    socket_only: u8,
    _pad: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct IoVec {
    base: u64,
    len: u64,
}

#[inline(always)]
fn count(index: u32) {
    if let Some(counter) = COUNTERS.get_ptr_mut(index) {
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
fn current_target() -> Option<(u64, u32)> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let selected = unsafe { TARGETS.get(&tgid) }.is_some() || selected_by_config(tgid);
    selected.then_some((pid_tgid, tgid))
}

#[inline(always)]
fn config(index: u32) -> u32 {
    CONFIG.get(index).copied().unwrap_or(0)
}

/// `--all` and `--cgroup` select in the kernel, so new processes are captured from their first
/// syscall.
#[inline(always)]
fn selected_by_config(tgid: u32) -> bool {
    if config(CONFIG_SELECT_ALL) != 0 {
        return tgid != config(CONFIG_AGENT_TGID);
    }
    if config(CONFIG_SELECT_CGROUPS) != 0 {
        let cgroup = unsafe { bpf_get_current_cgroup_id() };
        return unsafe { CGROUP_TARGETS.get(&cgroup) }.is_some();
    }
    false
}

#[inline(always)]
fn arg<T>(ctx: &TracePointContext, n: usize) -> Option<T> {
    unsafe { ctx.read_at::<T>(SYSCALL_ARG0 + 8 * n) }.ok()
}

#[inline(always)]
fn ret(ctx: &TracePointContext) -> i64 {
    unsafe { ctx.read_at::<i64>(SYSCALL_RET) }.unwrap_or(-1)
}

#[inline(always)]
fn stash(
    pid_tgid: u64,
    kind: CallKind,
    fd: u64,
    user_ptr: u64,
    iovec_count: u64,
    socket_only: bool,
) {
    let call = InFlightCall {
        user_ptr,
        count: iovec_count,
        fd: fd as i32,
        kind,
        socket_only: socket_only as u8,
        _pad: [0; 2],
    };
    if IN_FLIGHT.insert(&pid_tgid, &call, 0).is_err() {
        count(COUNTER_INFLIGHT_TABLE_FULL);
    }
}

#[inline(always)]
fn take_call(pid_tgid: u64) -> Option<InFlightCall> {
    let call = unsafe { IN_FLIGHT.get(&pid_tgid) }.copied();
    if call.is_some() {
        let _ = IN_FLIGHT.remove(&pid_tgid);
    }
    call
}

#[inline(always)]
fn stash_call(ctx: &TracePointContext, kind: CallKind, socket_only: bool) -> u32 {
    let Some((pid_tgid, _)) = current_target() else {
        return 0;
    };
    let (Some(fd), Some(user_ptr), Some(count)) = (arg::<u64>(ctx, 0), arg(ctx, 1), arg(ctx, 2))
    else {
        return 0;
    };
    stash(pid_tgid, kind, fd, user_ptr, count, socket_only);
    0
}

#[inline(always)]
fn read_sockaddr(user_ptr: u64) -> Option<SocketAddress> {
    if user_ptr == 0 {
        return None;
    }
    let family: u16 = unsafe { bpf_probe_read_user(user_ptr as *const u16) }.ok()?;
    let port_be: u16 = unsafe { bpf_probe_read_user((user_ptr + 2) as *const u16) }.ok()?;
    let mut address = SocketAddress {
        family,
        port: u16::from_be(port_be),
        ..Default::default()
    };
    match family {
        AF_INET => {
            let v4: [u8; 4] =
                unsafe { bpf_probe_read_user((user_ptr + 4) as *const [u8; 4]) }.ok()?;
            address.addr[..4].copy_from_slice(&v4);
        }
        AF_INET6 => {
            address.addr =
                unsafe { bpf_probe_read_user((user_ptr + 8) as *const [u8; 16]) }.ok()?;
        }
        _ => {}
    }
    Some(address)
}

#[inline(always)]
fn emit_conn(
    kind: u32,
    role: u8,
    conn: ConnId,
    remote: SocketAddress,
    state: &ConnState,
    error: u32,
) {
    let record = ConnRecord {
        kind,
        role,
        _pad: [0; 3],
        tid: bpf_get_current_pid_tgid() as u32,
        error,
        conn,
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        remote,
        bytes_sent: state.bytes_sent,
        bytes_received: state.bytes_received,
        tls_bytes_sent: state.tls_bytes_sent,
        tls_bytes_received: state.tls_bytes_received,
    };
    if EVENTS.output::<ConnRecord>(&record, 0).is_err() {
        count(COUNTER_RINGBUF_FULL);
    }
}

/// Starts tracking a connection under a fresh generation and tells userspace about it.
#[inline(always)]
fn open_conn(tgid: u32, fd: i32, role: u8, remote: SocketAddress) -> Option<*mut ConnState> {
    let key = conn_key(tgid, fd);
    let state = ConnState {
        generation: unsafe { bpf_ktime_get_ns() },
        ..ConnState::default()
    };
    if CONNECTIONS.insert(&key, &state, 0).is_err() {
        count(COUNTER_CONN_TABLE_FULL);
        return None;
    }
    let conn = ConnId {
        tgid,
        fd,
        generation: state.generation,
    };
    emit_conn(RECORD_CONN_OPEN, role, conn, remote, &state, 0);
    CONNECTIONS.get_ptr_mut(&key)
}

#[inline(always)]
fn is_ip(address: &SocketAddress) -> bool {
    address.family == AF_INET || address.family == AF_INET6
}

/// Tells userspace that a call on a known connection failed in a way that breaks it.
#[inline(always)]
fn report_broken(tgid: u32, fd: i32, error: i64) {
    if !matches!(error, EPIPE | ECONNRESET | ETIMEDOUT | ECONNREFUSED) {
        return;
    }
    let Some(state) = (unsafe { CONNECTIONS.get(&conn_key(tgid, fd)) }) else {
        return;
    };
    let conn = ConnId {
        tgid,
        fd,
        generation: state.generation,
    };
    emit_conn(
        RECORD_CONN_ERROR,
        ROLE_UNKNOWN,
        conn,
        SocketAddress::default(),
        state,
        error as u32,
    );
}

#[inline(always)]
fn on_accept_or_connect_exit(ctx: &TracePointContext) -> u32 {
    let Some((pid_tgid, tgid)) = current_target() else {
        return 0;
    };
    let Some(call) = take_call(pid_tgid) else {
        return 0;
    };
    let ret = ret(ctx);
    let remote = read_sockaddr(call.user_ptr).unwrap_or_default();
    let (fd, role) = match call.kind {
        CallKind::Accept if ret >= 0 => (ret as i32, ROLE_SERVER),
        CallKind::Connect if ret == 0 || ret == -EINPROGRESS => (call.fd, ROLE_CLIENT),
        CallKind::Connect if is_ip(&remote) => {
            let conn = ConnId {
                tgid,
                fd: call.fd,
                generation: unsafe { bpf_ktime_get_ns() },
            };
            let state = ConnState::default();
            emit_conn(
                RECORD_CONN_ERROR,
                ROLE_CLIENT,
                conn,
                remote,
                &state,
                -ret as u32,
            );
            return 0;
        }
        _ => return 0,
    };
    // A null address (accept without peer buffer) is resolved by userspace; a known non-IP family
    // (unix sockets) is not HTTP over TCP.
    if call.user_ptr != 0 && !is_ip(&remote) {
        return 0;
    }
    if open_conn(tgid, fd, role, remote).is_some() {
        let _ = LAST_SOCKET_FD.insert(&pid_tgid, &fd, 0);
    }
    0
}

/// Loop state of `emit_step`. It lives in a per-CPU map, not on the stack: the verifier tracks
/// stack values exactly and would walk every iteration, but treats map values as unknown, so
/// the callback is verified once.
#[map]
static EMIT_STATE: PerCpuArray<EmitState> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
struct EmitState {
    conn: ConnId,
    timestamp_ns: u64,
    /// Stream position of the syscall's first byte.
    start: u64,
    total: u64,
    done: u64,
    user_ptr: u64,
    iovec_count: u64,
    next_iovec: u64,
    segment_ptr: u64,
    segment_left: u64,
    tid: u32,
    direction: u8,
    walks_iovecs: u8,
    source: u8,
    _pad: u8,
}

/// One `bpf_loop` step: load the next iovec, or copy one chunk of the current segment into a
/// data record. A callback is verified once, where an open-coded loop over chunks and iovecs
/// exceeds the verifier's instruction budget. Returns 1 to stop the loop.
unsafe extern "C" fn emit_step(_index: u64, _context: *mut c_void) -> i64 {
    let Some(state) = EMIT_STATE.get_ptr_mut(0) else {
        return 1;
    };
    let state = unsafe { &mut *state };
    if state.done >= state.total {
        return 1;
    }
    if state.segment_left == 0 {
        if state.walks_iovecs == 0
            || state.next_iovec >= state.iovec_count
            || state.next_iovec >= MAX_IOVECS
        {
            return 1;
        }
        let entry = (state.user_ptr + state.next_iovec * 16) as *const IoVec;
        state.next_iovec += 1;
        let Ok(iovec) = (unsafe { bpf_probe_read_user(entry) }) else {
            count(COUNTER_READ_FAILED);
            return 1;
        };
        state.segment_ptr = iovec.base;
        state.segment_left = iovec.len;
        return 0;
    }
    let Some(record) = SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    let record = unsafe { &mut *record };
    let mut len = state.total - state.done;
    if len > state.segment_left {
        len = state.segment_left;
    }
    if len > CHUNK_SIZE as u64 {
        len = CHUNK_SIZE as u64;
    }
    let read = unsafe {
        generated::bpf_probe_read_user(
            record.data.as_mut_ptr().cast(),
            len as u32,
            state.segment_ptr as *const c_void,
        )
    };
    if read < 0 {
        count(COUNTER_READ_FAILED);
        return 1;
    }
    record.header = DataHeader {
        kind: RECORD_DATA,
        tid: state.tid,
        conn: state.conn,
        timestamp_ns: state.timestamp_ns,
        position: state.start + state.done,
        skipped_len: 0,
        captured_len: len as u32,
        direction: state.direction,
        source: state.source,
        _pad: [0; 2],
    };
    let size = size_of::<DataHeader>() + len as usize;
    let bytes =
        unsafe { core::slice::from_raw_parts((record as *const DataRecord).cast::<u8>(), size) };
    if EVENTS.output::<[u8]>(bytes, 0).is_err() {
        count(COUNTER_RINGBUF_FULL);
    }
    state.done += len;
    state.segment_ptr += len;
    state.segment_left -= len;
    0
}

/// Copies what one syscall moved into data records, chunk by chunk and iovec by iovec, and
/// reports whatever the loop bound leaves behind as skipped bytes.
#[inline(always)]
fn emit_data(
    call: &InFlightCall,
    conn: ConnId,
    tid: u32,
    direction: u8,
    source: u8,
    total: u64,
    start: u64,
) {
    let Some(state) = EMIT_STATE.get_ptr_mut(0) else {
        return;
    };
    let state = unsafe { &mut *state };
    *state = EmitState {
        conn,
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        start,
        total,
        done: 0,
        user_ptr: call.user_ptr,
        iovec_count: call.count,
        next_iovec: 0,
        segment_ptr: 0,
        segment_left: 0,
        tid,
        direction,
        walks_iovecs: (call.kind == CallKind::IoVec) as u8,
        source,
        _pad: 0,
    };
    if call.kind == CallKind::Buffer {
        state.segment_ptr = call.user_ptr;
        state.segment_left = total;
    }
    if call.kind != CallKind::SizeOnly {
        unsafe {
            generated::bpf_loop(
                MAX_LOOP_STEPS,
                emit_step as *mut c_void,
                core::ptr::null_mut(),
                0,
            )
        };
    }
    if state.done < total {
        let marker = DataHeader {
            kind: RECORD_DATA,
            tid,
            conn,
            timestamp_ns: state.timestamp_ns,
            position: start + state.done,
            skipped_len: total - state.done,
            captured_len: 0,
            direction,
            source,
            _pad: [0; 2],
        };
        if EVENTS.output::<DataHeader>(&marker, 0).is_err() {
            count(COUNTER_RINGBUF_FULL);
        }
    }
}

/// The kernel entry of the connection a data call used; recv*/send* on an unknown fd adopt it.
#[inline(always)]
fn connection_of(tgid: u32, call: &InFlightCall) -> Option<*mut ConnState> {
    match CONNECTIONS.get_ptr_mut(&conn_key(tgid, call.fd)) {
        Some(state) => Some(state),
        None if call.socket_only != 0 => {
            open_conn(tgid, call.fd, ROLE_UNKNOWN, SocketAddress::default())
        }
        None => None,
    }
}

#[inline(always)]
fn captures_stderr() -> bool {
    config(CONFIG_CAPTURE_STDERR) != 0
}

#[inline(always)]
fn is_disabled(key: u64, generation: u64, source: u8) -> bool {
    match unsafe { DISABLED.get(&key) } {
        Some(disabled) => {
            disabled.generation == generation && disabled.sources & source_bit(source) != 0
        }
        None => false,
    }
}

/// Places `total` bytes of `call` in the connection's stream for that source and direction,
/// and emits them unless userspace disabled the source. Syscall bytes and TLS plaintext keep
/// separate positions.
#[inline(always)]
fn emit_on_connection(
    state: &mut ConnState,
    tgid: u32,
    call: &InFlightCall,
    tid: u32,
    direction: u8,
    source: u8,
    total: u64,
) {
    let counter = match (source == SOURCE_TLS, direction == DIRECTION_EGRESS) {
        (false, true) => &mut state.bytes_sent,
        (false, false) => &mut state.bytes_received,
        (true, true) => &mut state.tls_bytes_sent,
        (true, false) => &mut state.tls_bytes_received,
    };
    let start = *counter;
    *counter += total;
    if is_disabled(conn_key(tgid, call.fd), state.generation, source) {
        return;
    }
    let conn = ConnId {
        tgid,
        fd: call.fd,
        generation: state.generation,
    };
    emit_data(call, conn, tid, direction, source, total, start);
}

#[inline(always)]
fn on_data_exit(ctx: &TracePointContext, direction: u8) -> u32 {
    let Some((pid_tgid, tgid)) = current_target() else {
        return 0;
    };
    let Some(call) = take_call(pid_tgid) else {
        return 0;
    };
    let ret = ret(ctx);
    if ret < 0 {
        report_broken(tgid, call.fd, -ret);
    }
    // Socket I/O inside an SSL call names the TLS connection; its bytes are ciphertext.
    if let Some(tls) = TLS_CALLS.get_ptr_mut(&pid_tgid) {
        if connection_of(tgid, &call).is_some() {
            unsafe { (*tls).fd = call.fd };
        }
        return 0;
    }
    if ret <= 0 {
        return 0;
    }
    let total = ret as u64;
    let Some(state) = connection_of(tgid, &call) else {
        if direction == DIRECTION_EGRESS && call.fd == STDERR_FD && captures_stderr() {
            let stderr = ConnId {
                tgid,
                fd: STDERR_FD,
                generation: 0,
            };
            // One chunk is enough for an error report; the rest of a huge write is not needed.
            let captured = total.min(CHUNK_SIZE as u64);
            emit_data(
                &call,
                stderr,
                pid_tgid as u32,
                direction,
                SOURCE_STDERR,
                captured,
                0,
            );
        }
        return 0;
    };
    // TLS libraries with their own buffers (node) read and write the socket outside SSL calls.
    let _ = LAST_SOCKET_FD.insert(&pid_tgid, &call.fd, 0);
    emit_on_connection(
        unsafe { &mut *state },
        tgid,
        &call,
        pid_tgid as u32,
        direction,
        SOURCE_SYSCALL,
        total,
    );
    0
}

/// An SSL read or write in progress on one thread.
#[repr(C)]
#[derive(Clone, Copy)]
struct TlsCall {
    ssl: u64,
    buf: u64,
    /// `size_t *` of the `_ex` variants, where the byte count is returned.
    length_ptr: u64,
    /// Set by the socket syscall that runs inside the call; -1 until then.
    fd: i32,
    direction: u8,
    returns_length_via_ptr: u8,
    _pad: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct SslKey {
    ssl: u64,
    tgid: u32,
    _pad: u32,
}

/// The connection an SSL object was last seen on. `nested` marks fds named by a syscall inside
/// an SSL call, which beat the thread's last-fd guess.
#[repr(C)]
#[derive(Clone, Copy)]
struct SslConn {
    fd: i32,
    nested: u32,
}

#[map]
static TLS_CALLS: LruHashMap<u64, TlsCall> = LruHashMap::with_max_entries(16384, 0);

/// Kept after the call returns: an SSL_read served from OpenSSL's buffer makes no syscall.
#[map]
static SSL_CONNS: LruHashMap<SslKey, SslConn> = LruHashMap::with_max_entries(65536, 0);

/// The last connection fd each thread moved bytes on: the fallback for TLS stacks that do
/// socket I/O outside the SSL call (node feeds OpenSSL from memory buffers).
#[map]
static LAST_SOCKET_FD: LruHashMap<u64, i32> = LruHashMap::with_max_entries(16384, 0);

#[inline(always)]
fn enter_tls_call(ctx: &ProbeContext, direction: u8, length_arg: Option<usize>) -> u32 {
    let Some((pid_tgid, _)) = current_target() else {
        return 0;
    };
    let (Some(ssl), Some(buf)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) else {
        return 0;
    };
    let length_ptr = match length_arg {
        Some(index) => match ctx.arg::<u64>(index) {
            Some(pointer) => pointer,
            None => return 0,
        },
        None => 0,
    };
    let call = TlsCall {
        ssl,
        buf,
        length_ptr,
        fd: -1,
        direction,
        returns_length_via_ptr: length_arg.is_some() as u8,
        _pad: [0; 2],
    };
    if TLS_CALLS.insert(&pid_tgid, &call, 0).is_err() {
        count(COUNTER_INFLIGHT_TABLE_FULL);
    }
    0
}

/// The fd of the connection an SSL call used: the syscall inside it, else what this SSL object
/// was mapped to by such a syscall, else the thread's last connection.
#[inline(always)]
fn tls_fd(pid_tgid: u64, tgid: u32, call: &TlsCall) -> Option<i32> {
    let key = SslKey {
        ssl: call.ssl,
        tgid,
        _pad: 0,
    };
    if call.fd >= 0 {
        let nested = SslConn {
            fd: call.fd,
            nested: 1,
        };
        let _ = SSL_CONNS.insert(&key, &nested, 0);
        return Some(call.fd);
    }
    let known = unsafe { SSL_CONNS.get(&key) }.copied();
    if let Some(known) = known {
        // Reads of memory-fed TLS stacks follow the socket read on the same thread, so the
        // last fd is fresher than an earlier guess; writes keep the SSL object's connection.
        if known.nested != 0 || call.direction == DIRECTION_EGRESS {
            return Some(known.fd);
        }
    }
    if let Some(last) = unsafe { LAST_SOCKET_FD.get(&pid_tgid) }.copied() {
        let guess = SslConn {
            fd: last,
            nested: 0,
        };
        let _ = SSL_CONNS.insert(&key, &guess, 0);
        return Some(last);
    }
    known.map(|known| known.fd)
}

#[inline(always)]
fn exit_tls_call(ctx: &RetProbeContext) -> u32 {
    let Some((pid_tgid, tgid)) = current_target() else {
        return 0;
    };
    let Some(call) = unsafe { TLS_CALLS.get(&pid_tgid) }.copied() else {
        return 0;
    };
    let _ = TLS_CALLS.remove(&pid_tgid);
    let ret = ctx.ret::<i32>();
    let total = if call.returns_length_via_ptr != 0 {
        if ret != 1 {
            0
        } else {
            match unsafe { bpf_probe_read_user(call.length_ptr as *const u64) } {
                Ok(length) => length,
                Err(_) => {
                    count(COUNTER_READ_FAILED);
                    0
                }
            }
        }
    } else if ret > 0 {
        ret as u64
    } else {
        0
    };
    let fd = tls_fd(pid_tgid, tgid, &call);
    if total == 0 {
        return 0;
    }
    let Some(fd) = fd else {
        count(COUNTER_TLS_UNMAPPED);
        return 0;
    };
    let Some(state) = CONNECTIONS.get_ptr_mut(&conn_key(tgid, fd)) else {
        count(COUNTER_TLS_UNMAPPED);
        return 0;
    };
    let buffer = InFlightCall {
        user_ptr: call.buf,
        count: 0,
        fd,
        kind: CallKind::Buffer,
        socket_only: 0,
        _pad: [0; 2],
    };
    emit_on_connection(
        unsafe { &mut *state },
        tgid,
        &buffer,
        pid_tgid as u32,
        call.direction,
        SOURCE_TLS,
        total,
    );
    0
}

/// SSL_read(ssl, buf, num) -> bytes read.
#[uprobe]
pub fn ssl_read_enter(ctx: ProbeContext) -> u32 {
    enter_tls_call(&ctx, DIRECTION_INGRESS, None)
}

/// SSL_read_ex(ssl, buf, num, *readbytes) -> 1 on success.
#[uprobe]
pub fn ssl_read_ex_enter(ctx: ProbeContext) -> u32 {
    enter_tls_call(&ctx, DIRECTION_INGRESS, Some(3))
}

/// SSL_write(ssl, buf, num) -> bytes written.
#[uprobe]
pub fn ssl_write_enter(ctx: ProbeContext) -> u32 {
    enter_tls_call(&ctx, DIRECTION_EGRESS, None)
}

/// SSL_write_ex(ssl, buf, num, *written) -> 1 on success.
#[uprobe]
pub fn ssl_write_ex_enter(ctx: ProbeContext) -> u32 {
    enter_tls_call(&ctx, DIRECTION_EGRESS, Some(3))
}

/// SSL_write_ex2(ssl, buf, num, flags, *written) -> 1 on success.
#[uprobe]
pub fn ssl_write_ex2_enter(ctx: ProbeContext) -> u32 {
    enter_tls_call(&ctx, DIRECTION_EGRESS, Some(4))
}

#[uretprobe]
pub fn ssl_call_return(ctx: RetProbeContext) -> u32 {
    exit_tls_call(&ctx)
}

/// read/write: the fd may be a file or pipe, so only connections already known are captured.
#[tracepoint]
pub fn enter_buffer_call(ctx: TracePointContext) -> u32 {
    stash_call(&ctx, CallKind::Buffer, false)
}

/// recvfrom/sendto only work on sockets: an unknown fd is a connection older than the agent.
#[tracepoint]
pub fn enter_socket_buffer_call(ctx: TracePointContext) -> u32 {
    stash_call(&ctx, CallKind::Buffer, true)
}

#[tracepoint]
pub fn enter_iovec_call(ctx: TracePointContext) -> u32 {
    stash_call(&ctx, CallKind::IoVec, false)
}

/// recvmsg/sendmsg: the iovec array sits inside the user's msghdr (msg_iov at 16, msg_iovlen at 24).
#[tracepoint]
pub fn enter_msghdr_call(ctx: TracePointContext) -> u32 {
    let Some((pid_tgid, _)) = current_target() else {
        return 0;
    };
    let (Some(fd), Some(msghdr)) = (arg::<u64>(&ctx, 0), arg::<u64>(&ctx, 1)) else {
        return 0;
    };
    let (Ok(iov), Ok(iovlen)) = (unsafe {
        (
            bpf_probe_read_user((msghdr + 16) as *const u64),
            bpf_probe_read_user((msghdr + 24) as *const u64),
        )
    }) else {
        count(COUNTER_READ_FAILED);
        return 0;
    };
    stash(pid_tgid, CallKind::IoVec, fd, iov, iovlen, true);
    0
}

#[tracepoint]
pub fn enter_sendfile(ctx: TracePointContext) -> u32 {
    stash_call(&ctx, CallKind::SizeOnly, false)
}

#[tracepoint]
pub fn enter_accept(ctx: TracePointContext) -> u32 {
    stash_call(&ctx, CallKind::Accept, true)
}

#[tracepoint]
pub fn enter_connect(ctx: TracePointContext) -> u32 {
    stash_call(&ctx, CallKind::Connect, true)
}

#[tracepoint]
pub fn exit_ingress_call(ctx: TracePointContext) -> u32 {
    on_data_exit(&ctx, DIRECTION_INGRESS)
}

#[tracepoint]
pub fn exit_egress_call(ctx: TracePointContext) -> u32 {
    on_data_exit(&ctx, DIRECTION_EGRESS)
}

#[tracepoint]
pub fn exit_accept_or_connect(ctx: TracePointContext) -> u32 {
    on_accept_or_connect_exit(&ctx)
}

/// getsockopt(fd, level, optname, optval, optlen): only SO_ERROR matters, the way a
/// non-blocking connect reports refusal.
#[tracepoint]
pub fn enter_getsockopt(ctx: TracePointContext) -> u32 {
    let Some((pid_tgid, _)) = current_target() else {
        return 0;
    };
    let (Some(fd), Some(level), Some(name), Some(value)) = (
        arg::<u64>(&ctx, 0),
        arg::<u64>(&ctx, 1),
        arg::<u64>(&ctx, 2),
        arg::<u64>(&ctx, 3),
    ) else {
        return 0;
    };
    if level == SOL_SOCKET && name == SO_ERROR {
        stash(pid_tgid, CallKind::SocketError, fd, value, 0, false);
    }
    0
}

#[tracepoint]
pub fn exit_getsockopt(ctx: TracePointContext) -> u32 {
    let Some((pid_tgid, tgid)) = current_target() else {
        return 0;
    };
    let Some(call) = take_call(pid_tgid) else {
        return 0;
    };
    if call.kind != CallKind::SocketError || ret(&ctx) != 0 {
        return 0;
    }
    if let Ok(error) = unsafe { bpf_probe_read_user(call.user_ptr as *const i32) }
        && error > 0
    {
        report_broken(tgid, call.fd, error as i64);
    }
    0
}

#[tracepoint]
pub fn enter_close(ctx: TracePointContext) -> u32 {
    let Some((_, tgid)) = current_target() else {
        return 0;
    };
    let Some(fd) = arg::<u64>(&ctx, 0) else {
        return 0;
    };
    let key = conn_key(tgid, fd as i32);
    let Some(state) = (unsafe { CONNECTIONS.get(&key) }).copied() else {
        return 0;
    };
    let _ = CONNECTIONS.remove(&key);
    let conn = ConnId {
        tgid,
        fd: fd as i32,
        generation: state.generation,
    };
    emit_conn(
        RECORD_CONN_CLOSE,
        ROLE_UNKNOWN,
        conn,
        SocketAddress::default(),
        &state,
        0,
    );
    0
}

/// sched_process_fork: `child_pid` at offset 20. Children of processes selected by id are
/// selected too; threads are added as well (their tid never names another live process) and
/// removed again by sched_process_exit.
#[tracepoint]
pub fn process_fork(ctx: TracePointContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if unsafe { TARGETS.get(&tgid) }.is_none() {
        return 0;
    }
    if let Ok(child) = unsafe { ctx.read_at::<i32>(20) } {
        let _ = TARGETS.insert(&(child as u32), &1, 0);
    }
    0
}

#[tracepoint]
pub fn process_exit(_ctx: TracePointContext) -> u32 {
    let Some((pid_tgid, tgid)) = current_target() else {
        return 0;
    };
    // A thread that dies inside an SSL call never returns from it.
    let _ = TLS_CALLS.remove(&pid_tgid);
    let _ = LAST_SOCKET_FD.remove(&pid_tgid);
    let tid = pid_tgid as u32;
    let _ = TARGETS.remove(&tid);
    if tid == tgid {
        let record = ProcessRecord {
            kind: RECORD_PROCESS_EXIT,
            tgid: tid,
            timestamp_ns: unsafe { bpf_ktime_get_ns() },
        };
        if EVENTS.output::<ProcessRecord>(&record, 0).is_err() {
            count(COUNTER_RINGBUF_FULL);
        }
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
