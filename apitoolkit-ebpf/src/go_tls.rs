//! Go crypto/tls uprobes: the plaintext of `crypto/tls.(*Conn).Read` and `Write` in Go
//! executables (register ABI, Go 1.17+).
//!
//! Go runs goroutines on any thread and moves them between calls, so a read in progress is
//! keyed by its goroutine (the `g` pointer Go keeps in R14), not by thread. There are no
//! uretprobes on Go code (a rewritten return address breaks Go's stack copying and unwinding):
//! userspace puts the return program on every `ret` of `Read`. The socket is read from the
//! `tls.Conn` itself, along the offsets the attach cookie carries for the executable's Go
//! version.
//!
//! Links: goroutine creation is reported to userspace (who started whom), and bytes a net/http
//! client connection's read or write loop moves are attributed to the goroutine whose round
//! trip is in progress on that connection, so an outgoing call made under a request's handler
//! can be traced back to it.

use apitoolkit_common::{Counter, Direction, GoroutineRecord, RecordKind, go_layout_offsets};
use aya_ebpf::{
    EbpfContext,
    bindings::pt_regs,
    helpers::{bpf_ktime_get_ns, bpf_probe_read_user, generated::bpf_get_attach_cookie},
    macros::uprobe,
    programs::ProbeContext,
};

use crate::{
    emit::Mover,
    maps::{
        EVENTS, GO_CONN_LOOPS, GO_NEWPROC_CALLERS, GO_ROUND_TRIPS, GO_TLS_READS, LAST_SOCKET_FD,
        count,
    },
    process::current_target,
    tls::emit_plaintext,
};

/// A Go object (a goroutine's `g`, a `persistConn`) of one process: addresses repeat across
/// processes.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct GoObject {
    address: u64,
    tgid: u32,
    _pad: u32,
}

impl GoObject {
    #[inline(always)]
    fn new(address: u64, tgid: u32) -> Self {
        Self {
            address,
            tgid,
            _pad: 0,
        }
    }
}

/// A `Read` in progress: the `*tls.Conn` and the buffer it fills.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct GoTlsRead {
    conn: u64,
    buf: u64,
}

/// The registers at the probed instruction.
#[inline(always)]
fn registers(ctx: &ProbeContext) -> pt_regs {
    // SAFETY: the kernel hands a uprobe program the user registers of the probed thread; the
    // pointer is valid for the whole run of the program and copied at once.
    unsafe { *ctx.regs }
}

/// The running goroutine: Go's register ABI keeps its `g` in R14.
#[inline(always)]
fn goroutine(registers: &pt_regs, tgid: u32) -> GoObject {
    GoObject::new(registers.r14, tgid)
}

/// The thread, and the goroutine the bytes are moved for: a net/http client connection's read
/// and write loops move them for the goroutine whose round trip is in progress there.
#[inline(always)]
fn mover(pid_tgid: u64, running: GoObject) -> Mover {
    // SAFETY: copied at once; plain integers, valid for any bytes.
    let connection = unsafe { GO_CONN_LOOPS.get(&running) }.copied();
    let caller = connection.and_then(|connection| {
        // SAFETY: as above.
        unsafe { GO_ROUND_TRIPS.get(&GoObject::new(connection, running.tgid)) }.copied()
    });
    Mover {
        tid: pid_tgid as u32,
        goroutine: caller.unwrap_or(running.address),
    }
}

/// The socket fd of the `*tls.Conn` at `conn`: its `net.Conn`'s data word (a `*net.TCPConn`),
/// that connection's `*netFD`, and its `pfd.Sysfd`, at the offsets of the cookie.
#[inline(always)]
fn socket_fd(ctx: &ProbeContext, conn: u64) -> Option<i32> {
    // SAFETY: the helper only reads the cookie of the attachment that fired.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let [conn_data, net_fd, sysfd] = go_layout_offsets(cookie);
    // SAFETY: bpf_probe_read_user copies from the target's memory and fails instead of faulting
    // on a bad address; integers are valid for any bytes.
    let tcp_conn: u64 = unsafe { bpf_probe_read_user((conn + conn_data) as *const u64) }.ok()?;
    // SAFETY: as above.
    let netfd: u64 = unsafe { bpf_probe_read_user((tcp_conn + net_fd) as *const u64) }.ok()?;
    // SAFETY: as above.
    let fd: i64 = unsafe { bpf_probe_read_user((netfd + sysfd) as *const i64) }.ok()?;
    i32::try_from(fd).ok().filter(|fd| *fd >= 0)
}

/// `(c *Conn) Read(b []byte) (int, error)`: c in RAX, b's pointer in RBX.
#[uprobe]
pub fn go_tls_read_enter(ctx: ProbeContext) -> u32 {
    let Some((_, tgid)) = current_target() else {
        return 0;
    };
    let registers = registers(&ctx);
    let read = GoTlsRead {
        conn: registers.rax,
        buf: registers.rbx,
    };
    if GO_TLS_READS
        .insert(&goroutine(&registers, tgid), &read, 0)
        .is_err()
    {
        count(Counter::InflightTableFull);
    }
    0
}

/// At each `ret` of `Read`: the byte count is in RAX.
#[uprobe]
pub fn go_tls_read_return(ctx: ProbeContext) -> u32 {
    let Some((pid_tgid, tgid)) = current_target() else {
        return 0;
    };
    let registers = registers(&ctx);
    let key = goroutine(&registers, tgid);
    let total = registers.rax as i64;
    // SAFETY: copied at once. Only these programs write `GO_TLS_READS`, and the entry is keyed
    // by this goroutine; `GoTlsRead` is plain integers, valid for any bytes.
    let read = unsafe { GO_TLS_READS.get(&key) }.copied();
    let _ = GO_TLS_READS.remove(&key);
    if total <= 0 {
        return 0;
    }
    let mover = mover(pid_tgid, key);
    let Some(read) = read else {
        // A read that was already waiting when the probes were attached: its bytes are gone,
        // but the stream must not silently close over them (the next response would pair with
        // this one's request). The socket read that woke it ran on this thread just now.
        // SAFETY: copied at once; any i32 is valid.
        if let Some(fd) = unsafe { LAST_SOCKET_FD.get(&pid_tgid) }.copied() {
            emit_plaintext(tgid, mover, fd, None, Direction::Ingress, total as u64);
        }
        return 0;
    };
    let Some(fd) = socket_fd(&ctx, read.conn) else {
        count(Counter::TlsUnmapped);
        return 0;
    };
    emit_plaintext(
        tgid,
        mover,
        fd,
        Some(read.buf),
        Direction::Ingress,
        total as u64,
    );
    0
}

/// `(c *Conn) Write(b []byte) (int, error)`: the bytes to encrypt are `b` (RBX, length RCX) in
/// full, so they are taken at the entry: no trap at a `ret`. A write that fails breaks the
/// connection, which ends its exchange anyway.
#[uprobe]
pub fn go_tls_write_enter(ctx: ProbeContext) -> u32 {
    let Some((pid_tgid, tgid)) = current_target() else {
        return 0;
    };
    let registers = registers(&ctx);
    if registers.rcx == 0 {
        return 0;
    }
    let Some(fd) = socket_fd(&ctx, registers.rax) else {
        count(Counter::TlsUnmapped);
        return 0;
    };
    emit_plaintext(
        tgid,
        mover(pid_tgid, goroutine(&registers, tgid)),
        fd,
        Some(registers.rbx),
        Direction::Egress,
        registers.rcx,
    );
    0
}

/// At `call runtime.newproc1` in the closure `runtime.newproc` runs on the system stack:
/// `newproc1(fn, callergp, ...)`, so RBX is the goroutine executing the `go` statement. The
/// closure runs on one thread without switching, so the thread keys it until `runqput`.
#[uprobe]
pub fn go_newproc1_call(ctx: ProbeContext) -> u32 {
    let Some((pid_tgid, _)) = current_target() else {
        return 0;
    };
    let registers = registers(&ctx);
    if GO_NEWPROC_CALLERS
        .insert(&pid_tgid, &registers.rbx, 0)
        .is_err()
    {
        count(Counter::InflightTableFull);
    }
    0
}

/// At `call runtime.runqput` in the same closure: `runqput(pp, newg, next)`, RBX is the new
/// goroutine.
#[uprobe]
pub fn go_runqput_call(ctx: ProbeContext) -> u32 {
    let Some((pid_tgid, tgid)) = current_target() else {
        return 0;
    };
    // SAFETY: copied at once; a u64 is valid for any bytes.
    let Some(parent) = unsafe { GO_NEWPROC_CALLERS.get(&pid_tgid) }.copied() else {
        return 0;
    };
    let _ = GO_NEWPROC_CALLERS.remove(&pid_tgid);
    let goroutine = registers(&ctx).rbx;
    // Go reuses `g`s of goroutines that ended: whatever loop an earlier one ran is over.
    let _ = GO_CONN_LOOPS.remove(&GoObject::new(goroutine, tgid));
    let record = GoroutineRecord {
        kind: RecordKind::GoroutineCreated as u32,
        tgid,
        // SAFETY: the helper takes no arguments.
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        goroutine,
        parent,
    };
    if EVENTS.output::<GoroutineRecord>(&record, 0).is_err() {
        count(Counter::RingbufFull);
    }
    0
}

/// `(pc *persistConn) roundTrip(req)` runs on the goroutine making the request: until the next
/// one on this connection (HTTP/1 connections carry one request at a time), its read and
/// write loops work for that goroutine.
#[uprobe]
pub fn go_round_trip_enter(ctx: ProbeContext) -> u32 {
    let Some((_, tgid)) = current_target() else {
        return 0;
    };
    let registers = registers(&ctx);
    let connection = GoObject::new(registers.rax, tgid);
    if GO_ROUND_TRIPS
        .insert(&connection, &registers.r14, 0)
        .is_err()
    {
        count(Counter::InflightTableFull);
    }
    0
}

/// `(pc *persistConn) readLoop()` and `writeLoop()`: each runs on its own goroutine for the
/// life of the connection.
#[uprobe]
pub fn go_conn_loop_enter(ctx: ProbeContext) -> u32 {
    let Some((_, tgid)) = current_target() else {
        return 0;
    };
    let registers = registers(&ctx);
    if GO_CONN_LOOPS
        .insert(&goroutine(&registers, tgid), &registers.rax, 0)
        .is_err()
    {
        count(Counter::InflightTableFull);
    }
    0
}
