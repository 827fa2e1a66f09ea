//! Syscall tracepoints: entries stash their arguments per thread, exits emit what the call
//! actually did (bytes moved, connection opened, broken or closed).

use apitoolkit_common::{
    CHUNK_SIZE, ConfigKey, ConnId, ConnState, Counter, Direction, RecordKind, Role, SocketAddress,
    Source, conn_key,
};
use aya_ebpf::{
    EbpfContext,
    bindings::BPF_RB_AVAIL_DATA,
    helpers::{bpf_ktime_get_ns, bpf_probe_read_user},
    macros::tracepoint,
    programs::TracePointContext,
};

use crate::{
    connections::{connection_of, emit_conn, is_ip, open_conn, read_sockaddr, report_broken},
    emit::{Mover, Skipped, emit_data, emit_on_connection, emit_skipped},
    maps::{CONNECTIONS, EVENTS, config, count, ring_buffer_bytes},
    process::current_target,
    threads::{ThreadSlot, thread_slot, thread_slot_or_new},
};

/// Offsets in the syscall tracepoint records (see events/syscalls/*/format): arguments are
/// 8-byte slots after the common header and syscall number; the exit record has only `ret`.
const SYSCALL_ARG0: usize = 16;
const SYSCALL_RET: usize = 16;
const EINPROGRESS: i64 = 115;
const SOL_SOCKET: u64 = 1;
const SO_ERROR: u64 = 4;
const STDERR_FD: i32 = 2;

#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum CallKind {
    Buffer,
    IoVec,
    SizeOnly,
    Accept,
    Connect,
    /// getsockopt(SO_ERROR): how a non-blocking connect ended.
    SocketError,
}

/// A syscall between its entry and exit, in the thread's slot (`threads`).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct InFlightCall {
    /// Buffer, iovec array or sockaddr, by kind.
    pub(crate) user_ptr: u64,
    /// Iovec count for `IoVec`.
    pub(crate) count: u64,
    pub(crate) fd: i32,
    pub(crate) kind: CallKind,
    /// The syscall only works on sockets (recv*/send*), so an unknown fd is a connection that
    /// predates the agent. read/write may be file I/O: userspace registers older sockets for them.
    pub(crate) socket_only: u8,
    /// 1 between the entry and the exit; the thread's slot keeps the call, no longer
    /// pending, in between calls.
    pub(crate) pending: u8,
    pub(crate) _pad: u8,
}

impl InFlightCall {
    /// No call: a new thread slot's.
    pub(crate) const NONE: Self = Self {
        user_ptr: 0,
        count: 0,
        fd: -1,
        kind: CallKind::SizeOnly,
        socket_only: 0,
        pending: 0,
        _pad: 0,
    };
}

/// Argument `n` of a sys_enter_* record, loaded from the record itself: the verifier checks
/// the offset, so no helper call is needed.
#[inline(always)]
pub(crate) fn arg(ctx: &TracePointContext, n: usize) -> u64 {
    // SAFETY: `ctx` points at the tracepoint's record; its argument slots are aligned 8-byte
    // integers at constant offsets, which the verifier checks against the record size.
    unsafe {
        *ctx.as_ptr()
            .cast::<u8>()
            .add(SYSCALL_ARG0 + 8 * n)
            .cast::<u64>()
    }
}

/// `ret` of a sys_exit_* record, loaded like [`arg`].
#[inline(always)]
fn ret(ctx: &TracePointContext) -> i64 {
    // SAFETY: as in `arg`: an aligned 8-byte integer at a constant offset of the record.
    unsafe { *ctx.as_ptr().cast::<u8>().add(SYSCALL_RET).cast::<i64>() }
}

/// Records the call in the thread's slot.
#[inline(always)]
fn stash(
    pid_tgid: u64,
    kind: CallKind,
    fd: u64,
    user_ptr: u64,
    iovec_count: u64,
    socket_only: bool,
) {
    if let Some(slot) = thread_slot_or_new(pid_tgid) {
        slot.call = InFlightCall {
            user_ptr,
            count: iovec_count,
            fd: fd as i32,
            kind,
            socket_only: socket_only as u8,
            pending: 1,
            _pad: 0,
        };
    }
}

/// The call the thread's slot holds since its entry, now taken out of it.
#[inline(always)]
fn take_call(slot: &mut ThreadSlot) -> Option<InFlightCall> {
    if slot.call.pending == 0 {
        return None;
    }
    slot.call.pending = 0;
    Some(slot.call)
}

#[inline(always)]
fn stash_call(ctx: &TracePointContext, kind: CallKind, socket_only: bool) -> u32 {
    let Some((pid_tgid, _)) = current_target() else {
        return 0;
    };
    stash(
        pid_tgid,
        kind,
        arg(ctx, 0),
        arg(ctx, 1),
        arg(ctx, 2),
        socket_only,
    );
    0
}

#[inline(always)]
fn on_accept_or_connect_exit(ctx: &TracePointContext) -> u32 {
    let Some((pid_tgid, tgid)) = current_target() else {
        return 0;
    };
    let Some(slot) = thread_slot(pid_tgid) else {
        return 0;
    };
    let Some(call) = take_call(slot) else {
        return 0;
    };
    let ret = ret(ctx);
    let remote = read_sockaddr(call.user_ptr).unwrap_or_default();
    let (fd, role) = match call.kind {
        CallKind::Accept if ret >= 0 => (ret as i32, Role::Server),
        CallKind::Connect if ret == 0 || ret == -EINPROGRESS => (call.fd, Role::Client),
        CallKind::Connect if is_ip(&remote) => {
            let conn = ConnId {
                tgid,
                fd: call.fd,
                // SAFETY: the helper takes no arguments.
                generation: unsafe { bpf_ktime_get_ns() },
            };
            let state = ConnState::default();
            emit_conn(
                RecordKind::ConnError,
                Role::Client,
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
        slot.last_socket_fd = fd;
    }
    0
}

#[inline(always)]
fn on_data_exit(ctx: &TracePointContext, direction: Direction) -> u32 {
    let Some((pid_tgid, tgid)) = current_target() else {
        return 0;
    };
    let Some(slot) = thread_slot(pid_tgid) else {
        return 0;
    };
    let Some(call) = take_call(slot) else {
        return 0;
    };
    let ret = ret(ctx);
    if ret < 0 {
        report_broken(tgid, call.fd, -ret);
    }
    // Socket I/O inside an SSL call names the TLS connection; its bytes are ciphertext.
    if slot.tls.active != 0 {
        if connection_of(tgid, &call).is_some() {
            slot.tls.fd = call.fd;
        }
        return 0;
    }
    if ret <= 0 {
        return 0;
    }
    let total = ret as u64;
    let Some(state) = connection_of(tgid, &call) else {
        if direction == Direction::Egress && call.fd == STDERR_FD && captures_stderr() {
            emit_stderr(&call, pid_tgid, tgid, total);
        }
        return 0;
    };
    // TLS libraries with their own buffers (node) read and write the socket outside SSL calls.
    slot.last_socket_fd = call.fd;
    emit_on_connection(
        // SAFETY: a live `CONNECTIONS` element (memory stays valid while the program runs),
        // `ConnState` is plain integers. Another thread of the process on another CPU may
        // update the same connection at the same time, which can lose a byte count but not
        // fault; the kernel maps offer no atomic read-modify-write of a struct.
        unsafe { &mut *state },
        tgid,
        &call,
        Mover::thread(pid_tgid as u32),
        direction,
        Source::Syscall,
        total,
    );
    0
}

#[inline(always)]
fn captures_stderr() -> bool {
    config(ConfigKey::CaptureStderr) != 0
}

/// A target's write to fd 2, which is no connection: userspace turns tracebacks into payload
/// errors. Positions count from the write's first byte. A write longer than a chunk sends its
/// first and its last chunk (a Python traceback ends with its error type and message) and
/// reports the middle as skipped; a longer writev sends its first chunk and reports the rest.
///
/// Error text yields to traffic: while the ring buffer is more than a quarter full, stderr
/// writes are dropped and counted, so a process flooding its stderr cannot cost HTTP capture.
#[inline(always)]
fn emit_stderr(call: &InFlightCall, pid_tgid: u64, tgid: u32, total: u64) {
    if EVENTS.query(BPF_RB_AVAIL_DATA as u64) > ring_buffer_bytes() / 4 {
        count(Counter::StderrYielded);
        return;
    }
    let stderr = ConnId {
        tgid,
        fd: STDERR_FD,
        generation: 0,
    };
    let mover = Mover::thread(pid_tgid as u32);
    let chunk = CHUNK_SIZE as u64;
    let head = total.min(chunk);
    emit_data(
        call,
        stderr,
        mover,
        Direction::Egress,
        Source::Stderr,
        head,
        0,
    );
    if total <= chunk {
        return;
    }
    let tail_start = if call.kind == CallKind::Buffer {
        (total - chunk).max(chunk)
    } else {
        total
    };
    if tail_start > chunk {
        let skipped = Skipped {
            conn: stderr,
            mover,
            // SAFETY: the helper takes no arguments.
            timestamp_ns: unsafe { bpf_ktime_get_ns() },
            position: chunk,
            len: tail_start - chunk,
        };
        emit_skipped(&skipped, Direction::Egress, Source::Stderr);
    }
    if tail_start < total {
        let tail = InFlightCall {
            user_ptr: call.user_ptr + tail_start,
            ..*call
        };
        emit_data(
            &tail,
            stderr,
            mover,
            Direction::Egress,
            Source::Stderr,
            total - tail_start,
            tail_start,
        );
    }
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
    let (fd, msghdr) = (arg(&ctx, 0), arg(&ctx, 1));
    // SAFETY: bpf_probe_read_user copies from the target's memory and fails instead of faulting
    // on a bad address; the results are integers, valid for any bytes.
    let (Ok(iov), Ok(iovlen)) = (unsafe {
        (
            bpf_probe_read_user((msghdr + 16) as *const u64),
            bpf_probe_read_user((msghdr + 24) as *const u64),
        )
    }) else {
        count(Counter::ReadFailed);
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
    on_data_exit(&ctx, Direction::Ingress)
}

#[tracepoint]
pub fn exit_egress_call(ctx: TracePointContext) -> u32 {
    on_data_exit(&ctx, Direction::Egress)
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
    if arg(&ctx, 1) == SOL_SOCKET && arg(&ctx, 2) == SO_ERROR {
        stash(
            pid_tgid,
            CallKind::SocketError,
            arg(&ctx, 0),
            arg(&ctx, 3),
            0,
            false,
        );
    }
    0
}

#[tracepoint]
pub fn exit_getsockopt(ctx: TracePointContext) -> u32 {
    let Some((pid_tgid, tgid)) = current_target() else {
        return 0;
    };
    let Some(call) = thread_slot(pid_tgid).and_then(take_call) else {
        return 0;
    };
    if call.kind != CallKind::SocketError || ret(&ctx) != 0 {
        return 0;
    }
    // SAFETY: bpf_probe_read_user copies from the target's memory and fails instead of faulting
    // on a bad address; any i32 is valid.
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
    let fd = arg(&ctx, 0);
    let key = conn_key(tgid, fd as i32);
    // SAFETY: copied at once; `ConnState` is plain integers, valid for any bytes.
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
        RecordKind::ConnClose,
        Role::Unknown,
        conn,
        SocketAddress::default(),
        &state,
        0,
    );
    0
}
