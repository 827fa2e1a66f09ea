//! SSL uprobes: the plaintext of OpenSSL-compatible read/write calls, placed on the connection
//! the call's socket I/O (or, failing that, the thread's last socket I/O) names.

use apitoolkit_common::{ConnState, Counter, Direction, Source, conn_key};
use aya_ebpf::{
    helpers::bpf_probe_read_user,
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};

use crate::{
    emit::{Mover, emit_on_connection},
    maps::{CONNECTIONS, SSL_CONNS, count},
    process::current_target,
    syscalls::{CallKind, Transfer},
    threads::{NO_FD, thread_slot, thread_slot_or_new},
};

/// An SSL read or write in progress on one thread, in its slot (`threads`).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct TlsCall {
    ssl: u64,
    buf: u64,
    /// `size_t *` of the `_ex` variants, where the byte count is returned.
    length_ptr: u64,
    /// The fd of the call's own I/O that moved bytes: the first one (a read/write's is checked
    /// against `CONNECTIONS` at the return), or a later one that names a connection; -1 until
    /// then.
    pub(crate) fd: i32,
    /// A raw `Direction`.
    direction: u8,
    returns_length_via_ptr: u8,
    /// 1 from the call's entry to its return: the thread's socket I/O meanwhile is the
    /// call's ciphertext.
    pub(crate) active: u8,
    _pad: u8,
}

impl TlsCall {
    /// No call: a new thread slot's.
    pub(crate) const NONE: Self = Self {
        ssl: 0,
        buf: 0,
        length_ptr: 0,
        fd: NO_FD,
        direction: 0,
        returns_length_via_ptr: 0,
        active: 0,
        _pad: 0,
    };
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct SslKey {
    ssl: u64,
    tgid: u32,
    _pad: u32,
}

/// The connection an SSL object was last seen on. `nested` marks fds named by a syscall inside
/// an SSL call, which beat the thread's last-fd guess. Entries are never deleted (nothing
/// probes the object's free), so an entry is trusted only while its connection generation is
/// still the one open on the fd: a freed object's address reused for a new connection's object
/// must not send that connection's bytes to the old one's fd number.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct SslConn {
    generation: u64,
    fd: i32,
    nested: u32,
}

#[inline(always)]
fn enter_tls_call(ctx: &ProbeContext, direction: Direction, length_arg: Option<usize>) -> u32 {
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
    if let Some(slot) = thread_slot_or_new(pid_tgid) {
        slot.tls = TlsCall {
            ssl,
            buf,
            length_ptr,
            fd: NO_FD,
            direction: direction as u8,
            returns_length_via_ptr: length_arg.is_some() as u8,
            active: 1,
            _pad: 0,
        };
    }
    0
}

/// The `SSL_CONNS` key of `call`'s SSL object, and what the map says of it.
#[inline(always)]
fn known_ssl_conn(tgid: u32, call: &TlsCall) -> (SslKey, Option<SslConn>) {
    let key = SslKey {
        ssl: call.ssl,
        tgid,
        _pad: 0,
    };
    // SAFETY: copied at once; `SslConn` is plain integers, valid for any bytes.
    let known = unsafe { SSL_CONNS.get(&key) }.copied();
    (key, known)
}

/// Records in `SSL_CONNS` that the SSL object of `call` works on the connection `state` its own
/// socket I/O named, unless that is known already. The connection remembers the object it
/// recorded, so only an object's first call on it (or another object's) pays the map's lookup,
/// a cache miss per request otherwise, and an LRU update costs several more. The entry is not
/// refreshed in the LRU by later calls: evicting it takes that many newer SSL objects while the
/// connection lives, and a call that makes no socket I/O then falls back to the thread's last
/// socket, as for an object never mapped.
#[inline(always)]
fn record_nested_fd(tgid: u32, call: &TlsCall, state: &mut ConnState) {
    if state.tls_object == call.ssl {
        return;
    }
    let (key, known) = known_ssl_conn(tgid, call);
    let recorded = known.is_some_and(|known| {
        known.fd == call.fd && known.nested != 0 && known.generation == state.generation
    }) || SSL_CONNS
        .insert(
            &key,
            &SslConn {
                generation: state.generation,
                fd: call.fd,
                nested: 1,
            },
            0,
        )
        .is_ok();
    if recorded {
        state.tls_object = call.ssl;
    }
}

/// The `CONNECTIONS` element of what `known` says, if that connection is still open on its fd.
#[inline(always)]
fn live_connection(tgid: u32, known: &SslConn) -> Option<*mut ConnState> {
    let state = CONNECTIONS.get_ptr_mut(&conn_key(tgid, known.fd))?;
    // SAFETY: a live `CONNECTIONS` element; its generation is a plain integer written when the
    // entry was created.
    (unsafe { (*state).generation } == known.generation).then_some(state)
}

/// The connection (fd and `CONNECTIONS` element) an SSL call that made no socket I/O of its
/// own used: what its SSL object was mapped to by such I/O, else the thread's last connection.
/// `SSL_CONNS` is written only when its answer changes.
#[inline(always)]
fn mapped_connection(
    tgid: u32,
    call: &TlsCall,
    last_socket_fd: i32,
) -> Option<(i32, *mut ConnState)> {
    let (key, mut known) = known_ssl_conn(tgid, call);
    if let Some(entry) = known {
        // Reads of memory-fed TLS stacks follow the socket read on the same thread, so the
        // last fd is fresher than an earlier guess; writes keep the SSL object's connection.
        if entry.nested != 0 || call.direction == Direction::Egress as u8 {
            match live_connection(tgid, &entry) {
                Some(state) => return Some((entry.fd, state)),
                // A stale entry: the object is a new one at a reused address (or, rarely, its
                // connection's entry was evicted and adopted again under a new generation; the
                // object's next socket I/O maps it again).
                None => known = None,
            }
        }
    }
    if last_socket_fd != NO_FD {
        let state = CONNECTIONS.get_ptr_mut(&conn_key(tgid, last_socket_fd))?;
        // SAFETY: as in `live_connection`.
        let generation = unsafe { (*state).generation };
        if known.is_none_or(|known| known.fd != last_socket_fd || known.generation != generation) {
            let guess = SslConn {
                generation,
                fd: last_socket_fd,
                nested: 0,
            };
            let _ = SSL_CONNS.insert(&key, &guess, 0);
        }
        return Some((last_socket_fd, state));
    }
    let known = known?;
    live_connection(tgid, &known).map(|state| (known.fd, state))
}

/// Plaintext bytes the SSL call moved: its return value, or what an `_ex` variant stored
/// through its length pointer when it returned 1 (success).
#[inline(always)]
fn tls_call_length(ctx: &RetProbeContext, call: &TlsCall) -> u64 {
    let ret = ctx.ret::<i32>();
    if call.returns_length_via_ptr != 0 {
        if ret != 1 {
            0
        } else {
            // SAFETY: bpf_probe_read_user copies from the target's memory and fails instead of
            // faulting on a bad address; any u64 is valid.
            match unsafe { bpf_probe_read_user(call.length_ptr as *const u64) } {
                Ok(length) => length,
                Err(_) => {
                    count(Counter::ReadFailed);
                    0
                }
            }
        }
    } else if ret > 0 {
        ret as u64
    } else {
        0
    }
}

#[inline(always)]
fn exit_tls_call(ctx: &RetProbeContext) -> u32 {
    let Some((pid_tgid, tgid)) = current_target() else {
        return 0;
    };
    let Some(slot) = thread_slot(pid_tgid) else {
        return 0;
    };
    if slot.tls.active == 0 {
        return 0;
    }
    slot.tls.active = 0;
    let call = slot.tls;
    let total = tls_call_length(ctx, &call);
    // A call that moved no plaintext (the read that finds no more) maps nothing: the
    // library's buffer is empty, so the object's next call does socket I/O of its own.
    if total == 0 {
        return 0;
    }
    let direction = if call.direction == Direction::Egress as u8 {
        Direction::Egress
    } else {
        Direction::Ingress
    };
    let nested = if call.fd >= 0 {
        // The call's own I/O may have named no connection (a file): then it is placed as if
        // it made none.
        CONNECTIONS
            .get_ptr_mut(&conn_key(tgid, call.fd))
            .map(|state| {
                // SAFETY: as in `emit_plaintext`; the reference ends with the call.
                record_nested_fd(tgid, &call, unsafe { &mut *state });
                (call.fd, state)
            })
    } else {
        None
    };
    let Some((fd, state)) = nested.or_else(|| mapped_connection(tgid, &call, slot.last_socket_fd))
    else {
        count(Counter::TlsUnmapped);
        return 0;
    };
    emit_on_connection(
        // SAFETY: as in `emit_plaintext`.
        unsafe { &mut *state },
        tgid,
        &plaintext_buffer(fd, Some(call.buf)),
        Mover::thread(pid_tgid as u32),
        direction,
        Source::Tls,
        total,
    );
    0
}

/// The bytes of a TLS call on `fd`: the plaintext at `buf`, or, without it, their count only.
#[inline(always)]
fn plaintext_buffer(fd: i32, buf: Option<u64>) -> Transfer {
    Transfer {
        user_ptr: buf.unwrap_or(0),
        count: 0,
        fd,
        kind: if buf.is_some() {
            CallKind::Buffer
        } else {
            CallKind::SizeOnly
        },
        socket_only: 0,
        _pad: [0; 2],
    }
}

/// Emits `total` plaintext bytes at `buf` of a TLS call on connection `fd` of process `tgid`,
/// or, without `buf`, tells userspace they were moved but not captured; counted as unmapped
/// when the fd is no known connection.
#[inline(always)]
pub(crate) fn emit_plaintext(
    tgid: u32,
    mover: Mover,
    fd: i32,
    buf: Option<u64>,
    direction: Direction,
    total: u64,
) {
    let Some(state) = CONNECTIONS.get_ptr_mut(&conn_key(tgid, fd)) else {
        count(Counter::TlsUnmapped);
        return;
    };
    emit_on_connection(
        // SAFETY: a live `CONNECTIONS` element (memory stays valid while the program runs),
        // `ConnState` is plain integers. Another thread of the process on another CPU may
        // update the same connection at the same time, which can lose a byte count but not
        // fault; the kernel maps offer no atomic read-modify-write of a struct.
        unsafe { &mut *state },
        tgid,
        &plaintext_buffer(fd, buf),
        mover,
        direction,
        Source::Tls,
        total,
    );
}

/// SSL_read(ssl, buf, num) -> bytes read.
#[uprobe]
pub fn ssl_read_enter(ctx: ProbeContext) -> u32 {
    enter_tls_call(&ctx, Direction::Ingress, None)
}

/// SSL_read_ex(ssl, buf, num, *readbytes) -> 1 on success.
#[uprobe]
pub fn ssl_read_ex_enter(ctx: ProbeContext) -> u32 {
    enter_tls_call(&ctx, Direction::Ingress, Some(3))
}

/// SSL_write(ssl, buf, num) -> bytes written.
#[uprobe]
pub fn ssl_write_enter(ctx: ProbeContext) -> u32 {
    enter_tls_call(&ctx, Direction::Egress, None)
}

/// SSL_write_ex(ssl, buf, num, *written) -> 1 on success.
#[uprobe]
pub fn ssl_write_ex_enter(ctx: ProbeContext) -> u32 {
    enter_tls_call(&ctx, Direction::Egress, Some(3))
}

/// SSL_write_ex2(ssl, buf, num, flags, *written) -> 1 on success.
#[uprobe]
pub fn ssl_write_ex2_enter(ctx: ProbeContext) -> u32 {
    enter_tls_call(&ctx, Direction::Egress, Some(4))
}

/// The return of every SSL function above.
#[uretprobe]
pub fn ssl_call_return(ctx: RetProbeContext) -> u32 {
    exit_tls_call(&ctx)
}
