//! Syscall tracepoints: exits emit what the call actually did (bytes moved, connection opened,
//! broken or closed), with the arguments read from the registers it was entered with.

use apitoolkit_common::{
    CHUNK_SIZE, ConnId, ConnState, Counter, Direction, RecordKind, Role, SocketAddress, Source,
    conn_key,
};
use aya_ebpf::{
    EbpfContext, Global,
    bindings::BPF_RB_AVAIL_DATA,
    bindings::pt_regs,
    helpers::{
        bpf_ktime_get_ns, bpf_probe_read_user,
        generated::{bpf_get_current_task_btf, bpf_task_pt_regs},
    },
    macros::tracepoint,
    programs::TracePointContext,
};

use crate::{
    connections::{connection_of, emit_conn, is_ip, open_conn, read_sockaddr, report_broken},
    emit::{Mover, Skipped, emit_data, emit_on_connection, emit_skipped},
    maps::{CONNECTIONS, EVENTS, count, ring_buffer_bytes},
    process::current_target,
    threads::{NO_FD, thread_slot, thread_slot_or_new},
};

/// Offsets in the syscall tracepoint records (see events/syscalls/*/format): the exit record
/// has the syscall number and `ret` after the common header; an entry record's arguments are
/// 8-byte slots after the syscall number.
const SYSCALL_NR: usize = 8;
const SYSCALL_ARG0: usize = 16;
const SYSCALL_RET: usize = 16;
const EINPROGRESS: i64 = 115;
const SOL_SOCKET: u64 = 1;
const SO_ERROR: u64 = 4;
const STDERR_FD: i32 = 2;

/// x86-64 numbers of the syscalls whose exits are traced.
mod nr {
    pub(super) const READ: i32 = 0;
    pub(super) const WRITE: i32 = 1;
    pub(super) const READV: i32 = 19;
    pub(super) const WRITEV: i32 = 20;
    pub(super) const SENDFILE: i32 = 40;
    pub(super) const CONNECT: i32 = 42;
    pub(super) const ACCEPT: i32 = 43;
    pub(super) const SENDTO: i32 = 44;
    pub(super) const RECVFROM: i32 = 45;
    pub(super) const SENDMSG: i32 = 46;
    pub(super) const RECVMSG: i32 = 47;
    pub(super) const ACCEPT4: i32 = 288;
}

/// Where the bytes a call moved are in user memory.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum CallKind {
    Buffer,
    IoVec,
    /// recvmsg/sendmsg: `user_ptr` is the msghdr holding the iovec array (see
    /// `resolve_msghdr`); never emitted as such.
    MsgHdr,
    /// sendfile: the bytes are counted, not captured.
    SizeOnly,
}

/// The bytes one call moved on fd `fd`: a syscall, or an SSL call's plaintext.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Transfer {
    /// Buffer or iovec array, by kind.
    pub(crate) user_ptr: u64,
    /// Iovec count for `IoVec`.
    pub(crate) count: u64,
    pub(crate) fd: i32,
    pub(crate) kind: CallKind,
    /// The syscall only works on sockets (recv*/send*), so an unknown fd is a connection that
    /// predates the agent. read/write may be file I/O: userspace registers older sockets for them.
    pub(crate) socket_only: u8,
    pub(crate) _pad: [u8; 2],
}

/// The integer at constant `offset` of a tracepoint's record, loaded from the record itself:
/// the verifier checks the offset, so no helper call is needed.
#[inline(always)]
pub(crate) fn record_field<T: Copy>(ctx: &TracePointContext, offset: usize) -> T {
    // SAFETY: `ctx` points at the tracepoint's record; callers pass the constant, aligned offset
    // of an integer field of the event's format (the verifier checks it), and read integers,
    // valid for any bytes.
    unsafe { *ctx.as_ptr().cast::<u8>().add(offset).cast::<T>() }
}

/// Argument `n` of a sys_enter_* record.
#[inline(always)]
pub(crate) fn arg(ctx: &TracePointContext, n: usize) -> u64 {
    record_field(ctx, SYSCALL_ARG0 + 8 * n)
}

/// `ret` of a sys_exit_* record.
#[inline(always)]
fn ret(ctx: &TracePointContext) -> i64 {
    record_field(ctx, SYSCALL_RET)
}

/// `__syscall_nr` of a sys_exit_* record: several syscalls share an exit program.
#[inline(always)]
fn syscall_nr(ctx: &TracePointContext) -> i32 {
    record_field(ctx, SYSCALL_NR)
}

/// The user registers the current syscall was entered with. Its arguments are still there at
/// its exit (the kernel reads them, never writes them back), so no entry program has to stash
/// them: every traced syscall, of a target or not, costs one tracepoint instead of two.
#[derive(Clone, Copy)]
struct EntryRegisters(*const pt_regs);

impl EntryRegisters {
    #[inline(always)]
    fn current() -> Self {
        // SAFETY: the helpers take the current task, which the verifier knows as a trusted
        // BTF pointer, and return its saved user registers as one.
        Self(unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as *const pt_regs)
    }

    /// Syscall argument `n` (x86-64: rdi, rsi, rdx, r10).
    #[inline(always)]
    fn arg(self, n: usize) -> u64 {
        let regs = self.0;
        // SAFETY: `regs` is the BTF pointer the helper returned; the verifier checks each field
        // offset against `struct pt_regs` and turns the load into one that cannot fault.
        unsafe {
            match n {
                0 => (*regs).rdi,
                1 => (*regs).rsi,
                2 => (*regs).rdx,
                _ => (*regs).r10,
            }
        }
    }
}

/// The data syscall that just returned, from its number and entry registers; `None` for a
/// syscall that moves no bytes of its own.
#[inline(always)]
fn data_call(nr: i32, regs: EntryRegisters) -> Option<Transfer> {
    let (kind, user_ptr, count, socket_only) = match nr {
        nr::READ | nr::WRITE => (CallKind::Buffer, regs.arg(1), 0, false),
        nr::RECVFROM | nr::SENDTO => (CallKind::Buffer, regs.arg(1), 0, true),
        nr::READV | nr::WRITEV => (CallKind::IoVec, regs.arg(1), regs.arg(2), false),
        nr::RECVMSG | nr::SENDMSG => (CallKind::MsgHdr, regs.arg(1), 0, true),
        nr::SENDFILE => (CallKind::SizeOnly, 0, 0, false),
        _ => return None,
    };
    Some(Transfer {
        user_ptr,
        count,
        fd: regs.arg(0) as i32,
        kind,
        socket_only: socket_only as u8,
        _pad: [0; 2],
    })
}

/// Turns a recvmsg/sendmsg into the iovec walk of its msghdr (msg_iov at 16, msg_iovlen at 24,
/// which the call does not change), read only for a call whose bytes are emitted. When the
/// msghdr cannot be read, the bytes are reported as moved but not captured: a gap, never a
/// silent splice.
#[inline(always)]
fn resolve_msghdr(call: &mut Transfer) {
    if call.kind != CallKind::MsgHdr {
        return;
    }
    let msghdr = call.user_ptr;
    // SAFETY: bpf_probe_read_user copies from the target's memory and fails instead of
    // faulting on a bad address; the results are integers, valid for any bytes.
    let read = unsafe {
        (
            bpf_probe_read_user((msghdr + 16) as *const u64),
            bpf_probe_read_user((msghdr + 24) as *const u64),
        )
    };
    match read {
        (Ok(iov), Ok(iovlen)) => {
            call.kind = CallKind::IoVec;
            call.user_ptr = iov;
            call.count = iovlen;
        }
        _ => {
            count(Counter::ReadFailed);
            call.kind = CallKind::SizeOnly;
        }
    }
}

/// Whether a connect that returned `-errno` failed to reach its peer. Interrupted, repeated or
/// already-connected calls (EINTR, ERESTART*, EALREADY, EISCONN, EAGAIN) are no error of the
/// service: reporting them would attach a connection error to the request being served.
#[inline(always)]
fn connect_failed(errno: i64) -> bool {
    // Refused by a firewall or policy.
    const EPERM: i64 = 1;
    const EACCES: i64 = 13;
    const EADDRNOTAVAIL: i64 = 99;
    const ENETDOWN: i64 = 100;
    const ENETUNREACH: i64 = 101;
    const ECONNABORTED: i64 = 103;
    const ECONNRESET: i64 = 104;
    const ETIMEDOUT: i64 = 110;
    const ECONNREFUSED: i64 = 111;
    const EHOSTDOWN: i64 = 112;
    const EHOSTUNREACH: i64 = 113;
    matches!(
        errno,
        EPERM
            | EACCES
            | EADDRNOTAVAIL
            | ENETDOWN
            | ENETUNREACH
            | ECONNABORTED
            | ECONNRESET
            | ETIMEDOUT
            | ECONNREFUSED
            | EHOSTDOWN
            | EHOSTUNREACH
    )
}

#[inline(always)]
fn on_accept_or_connect_exit(ctx: &TracePointContext) -> u32 {
    let Some((pid_tgid, tgid)) = current_target() else {
        return 0;
    };
    let regs = EntryRegisters::current();
    let (call_fd, address_ptr) = (regs.arg(0) as i32, regs.arg(1));
    let ret = ret(ctx);
    let remote = read_sockaddr(address_ptr).unwrap_or_default();
    let (fd, role) = match syscall_nr(ctx) {
        nr::ACCEPT | nr::ACCEPT4 if ret >= 0 => (ret as i32, Role::Server),
        nr::CONNECT if ret == 0 || ret == -EINPROGRESS => (call_fd, Role::Client),
        nr::CONNECT if is_ip(&remote) && connect_failed(-ret) => {
            let conn = ConnId {
                tgid,
                fd: call_fd,
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
    if address_ptr != 0 && !is_ip(&remote) {
        return 0;
    }
    if open_conn(tgid, fd, role, remote).is_some()
        && let Some(slot) = thread_slot_or_new(pid_tgid)
    {
        slot.last_socket_fd = fd;
    }
    0
}

#[inline(always)]
fn on_data_exit(ctx: &TracePointContext, direction: Direction) -> u32 {
    let Some((pid_tgid, tgid)) = current_target() else {
        return 0;
    };
    let Some(mut call) = data_call(syscall_nr(ctx), EntryRegisters::current()) else {
        return 0;
    };
    let ret = ret(ctx);
    if ret < 0 {
        report_broken(tgid, call.fd, -ret);
    }
    // A call that moved nothing needs no thread slot, and the would-block read that ends most
    // requests then costs no hash lookup. Inside an SSL call it names no connection either: an
    // SSL call that returns plaintext without moving socket bytes of its own gives out what an
    // earlier call of its object buffered, and that call is mapped in `SSL_CONNS` (if it
    // returned plaintext) or the object's next one with socket I/O is.
    if ret <= 0 {
        return 0;
    }
    let mut slot = thread_slot(pid_tgid);
    // Socket I/O inside an SSL call names the TLS connection; its bytes are ciphertext. The
    // call's first fd is kept unchecked (the return looks its connection up anyway, and only if
    // the call moved plaintext); another fd replaces it only if it names a connection, so a log
    // line the call writes does not hide its socket. recv*/send* adopt an unknown socket here.
    if let Some(slot) = slot.as_deref_mut()
        && slot.tls.active != 0
    {
        let first = slot.tls.fd == NO_FD || slot.tls.fd == call.fd;
        if (first && call.socket_only == 0) || connection_of(tgid, &call).is_some() {
            slot.tls.fd = call.fd;
        }
        return 0;
    }
    let total = ret as u64;
    let Some(state) = connection_of(tgid, &call) else {
        if direction == Direction::Egress && call.fd == STDERR_FD && captures_stderr() {
            resolve_msghdr(&mut call);
            emit_stderr(&call, pid_tgid, tgid, total);
        }
        return 0;
    };
    resolve_msghdr(&mut call);
    // TLS libraries with their own buffers (node) read and write the socket outside SSL calls.
    if let Some(slot) = slot.or_else(|| thread_slot_or_new(pid_tgid)) {
        slot.last_socket_fd = call.fd;
    }
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

/// Non-zero: capture what target threads write to stderr. Set by the loader.
#[unsafe(no_mangle)]
static CAPTURE_STDERR: Global<u32> = Global::new(0);

#[inline(always)]
fn captures_stderr() -> bool {
    CAPTURE_STDERR.load() != 0
}

/// A target's write to fd 2, which is no connection: userspace turns tracebacks into payload
/// errors. Positions count from the write's first byte. A write longer than a chunk sends its
/// first and its last chunk (a Python traceback ends with its error type and message) and
/// reports the middle as skipped; a longer writev sends its first chunk and reports the rest.
///
/// Error text yields to traffic: while the ring buffer is more than a quarter full, stderr
/// writes are dropped and counted, so a process flooding its stderr cannot cost HTTP capture.
#[inline(always)]
fn emit_stderr(call: &Transfer, pid_tgid: u64, tgid: u32, total: u64) {
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
        let tail = Transfer {
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
pub fn exit_getsockopt(ctx: TracePointContext) -> u32 {
    let Some((_, tgid)) = current_target() else {
        return 0;
    };
    let regs = EntryRegisters::current();
    if regs.arg(1) != SOL_SOCKET || regs.arg(2) != SO_ERROR || ret(&ctx) != 0 {
        return 0;
    }
    // SAFETY: bpf_probe_read_user copies from the target's memory and fails instead of faulting
    // on a bad address; any i32 is valid.
    if let Ok(error) = unsafe { bpf_probe_read_user(regs.arg(3) as *const i32) }
        && error > 0
    {
        report_broken(tgid, regs.arg(0) as i32, error as i64);
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
