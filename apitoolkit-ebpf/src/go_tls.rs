//! Go crypto/tls uprobes: the plaintext of `crypto/tls.(*Conn).Read` and `Write` in Go
//! executables (register ABI, Go 1.17+).
//!
//! Go runs goroutines on any thread and moves them between calls, so a read in progress is
//! keyed by its goroutine (the `g` pointer Go keeps in R14), not by thread. There are no
//! uretprobes on Go code (a rewritten return address breaks Go's stack copying and unwinding):
//! `Read` is probed where it copies the plaintext into the caller's buffer, or else userspace
//! puts the return program on every `ret` of `Read`. The socket is read from the
//! `tls.Conn` itself, along the offsets the attach cookie carries for the executable's Go
//! version.
//!
//! Links: goroutine creation is reported to userspace (who started whom), and bytes a net/http
//! client connection's read or write loop moves are attributed to the goroutine whose round
//! trip is in progress on that connection, so an outgoing call made under a request's handler
//! can be traced back to it.

use core::ptr::{addr_of, read_volatile};

use apitoolkit_common::{Counter, Direction, GoroutineRecord, RecordKind, go_probe_offsets};
use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_ktime_get_ns, bpf_probe_read_user, generated::bpf_get_attach_cookie},
    macros::uprobe,
    programs::ProbeContext,
};

use crate::{
    emit::Mover,
    maps::{GO_CONN_LOOPS, GO_NEWPROC_CALLERS, GO_ROUND_TRIPS, GO_TLS_READS, count, publish},
    process::current_target,
    threads::{NO_FD, thread_slot},
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

/// The registers the Go programs use, at the probed instruction.
#[derive(Clone, Copy)]
struct Registers {
    rax: u64,
    rbx: u64,
    rcx: u64,
    rsp: u64,
    r14: u64,
    eflags: u64,
}

/// The registers at the probed instruction, each read with its own load: the verifier allows
/// only loads at a constant offset from the unmodified context pointer.
#[inline(always)]
fn registers(ctx: &ProbeContext) -> Registers {
    let regs = ctx.regs;
    // SAFETY: the kernel hands a uprobe program the user registers of the probed thread; the
    // pointer is valid for the whole run of the program, and each field is a plain integer.
    unsafe {
        Registers {
            rax: read_volatile(addr_of!((*regs).rax)),
            rbx: read_volatile(addr_of!((*regs).rbx)),
            rcx: read_volatile(addr_of!((*regs).rcx)),
            rsp: read_volatile(addr_of!((*regs).rsp)),
            r14: read_volatile(addr_of!((*regs).r14)),
            eflags: read_volatile(addr_of!((*regs).eflags)),
        }
    }
}

/// Carry and zero flags of RFLAGS: Go's stack-check `jbe` jumps when either is set.
const CARRY_OR_ZERO: u64 = 1 | 1 << 6;

/// The registers at an entry site (the `jbe` of Go's stack check), or `None` when the jump is
/// taken: the stack grows and the function starts over, so the site is hit again.
#[inline(always)]
fn entry_registers(ctx: &ProbeContext) -> Option<Registers> {
    let registers = registers(ctx);
    (registers.eflags & CARRY_OR_ZERO == 0).then_some(registers)
}

/// The running goroutine: Go's register ABI keeps its `g` in R14.
#[inline(always)]
fn goroutine(registers: &Registers, tgid: u32) -> GoObject {
    GoObject::new(registers.r14, tgid)
}

/// The thread, and the goroutine the bytes are moved for: a net/http client connection's read
/// and write loops move them for the goroutine whose round trip is in progress there, and for
/// none (0) when that is unknown: the loop's own ancestry names whichever call dialed.
#[inline(always)]
fn mover(pid_tgid: u64, running: GoObject) -> Mover {
    // SAFETY: copied at once; plain integers, valid for any bytes.
    let goroutine = match unsafe { GO_CONN_LOOPS.get(&running) }.copied() {
        // SAFETY: as above.
        Some(connection) => unsafe { GO_ROUND_TRIPS.get(&GoObject::new(connection, running.tgid)) }
            .copied()
            .unwrap_or(0),
        None => running.address,
    };
    Mover {
        tid: pid_tgid as u32,
        goroutine,
    }
}

/// The socket fd of the `*tls.Conn` at `conn`: its `net.Conn`'s data word (a `*net.TCPConn`),
/// that connection's `*netFD`, and its `pfd.Sysfd`, at the offsets of the cookie.
#[inline(always)]
fn socket_fd(ctx: &ProbeContext, conn: u64) -> Option<i32> {
    // SAFETY: the helper only reads the cookie of the attachment that fired.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let [conn_data, net_fd, sysfd, _] = go_probe_offsets(cookie);
    // SAFETY: bpf_probe_read_user copies from the target's memory and fails instead of faulting
    // on a bad address; integers are valid for any bytes.
    let tcp_conn: u64 = unsafe { bpf_probe_read_user((conn + conn_data) as *const u64) }.ok()?;
    // SAFETY: as above.
    let netfd: u64 = unsafe { bpf_probe_read_user((tcp_conn + net_fd) as *const u64) }.ok()?;
    // SAFETY: as above.
    let fd: i64 = unsafe { bpf_probe_read_user((netfd + sysfd) as *const i64) }.ok()?;
    i32::try_from(fd).ok().filter(|fd| *fd >= 0)
}

/// In `(c *Conn) Read(b []byte)`, at `call runtime.memmove(to, from, n)`: the decrypted bytes
/// `Read` returns (RBX, length RCX) are copied into `b`. `c` is in the stack slot `Read` spilled
/// it to, at the cookie's offset from RSP. No `ret` probe, so no trap, and a `Read` that was
/// already waiting when the probe was attached is seen too.
#[uprobe]
pub fn go_tls_read_copy(ctx: ProbeContext) -> u32 {
    let Some((pid_tgid, tgid)) = current_target() else {
        return 0;
    };
    let registers = registers(&ctx);
    if registers.rcx == 0 {
        return 0;
    }
    // SAFETY: the helper only reads the cookie of the attachment that fired.
    let [_, _, _, receiver_slot] = go_probe_offsets(unsafe { bpf_get_attach_cookie(ctx.as_ptr()) });
    // SAFETY: bpf_probe_read_user copies from the target's stack and fails instead of faulting
    // on a bad address; a u64 is valid for any bytes.
    let Ok(conn) = (unsafe { bpf_probe_read_user((registers.rsp + receiver_slot) as *const u64) })
    else {
        count(Counter::TlsUnmapped);
        return 0;
    };
    let Some(fd) = socket_fd(&ctx, conn) else {
        count(Counter::TlsUnmapped);
        return 0;
    };
    let mover = mover(pid_tgid, goroutine(&registers, tgid));
    emit_plaintext(
        tgid,
        mover,
        fd,
        Some(registers.rbx),
        Direction::Ingress,
        registers.rcx,
    );
    0
}

/// `(c *Conn) Read(b []byte) (int, error)`: c in RAX, b's pointer in RBX.
#[uprobe]
pub fn go_tls_read_enter(ctx: ProbeContext) -> u32 {
    let Some((_, tgid)) = current_target() else {
        return 0;
    };
    let Some(registers) = entry_registers(&ctx) else {
        return 0;
    };
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
        if let Some(fd) = thread_slot(pid_tgid)
            .map(|slot| slot.last_socket_fd)
            .filter(|fd| *fd != NO_FD)
        {
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
/// connection, which ends its exchange anyway. A hit that grows the stack first is skipped (it
/// would send the bytes twice).
#[uprobe]
pub fn go_tls_write_enter(ctx: ProbeContext) -> u32 {
    let Some((pid_tgid, tgid)) = current_target() else {
        return 0;
    };
    let Some(registers) = entry_registers(&ctx) else {
        return 0;
    };
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
    let goroutine = registers(&ctx).rbx;
    // Go reuses `g`s of goroutines that ended: whatever loop an earlier one ran is over.
    let _ = GO_CONN_LOOPS.remove(&GoObject::new(goroutine, tgid));
    // SAFETY: copied at once; a u64 is valid for any bytes.
    let Some(parent) = unsafe { GO_NEWPROC_CALLERS.get(&pid_tgid) }.copied() else {
        return 0;
    };
    let _ = GO_NEWPROC_CALLERS.remove(&pid_tgid);
    let record = GoroutineRecord {
        kind: RecordKind::GoroutineCreated as u32,
        tgid,
        // SAFETY: the helper takes no arguments.
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        goroutine,
        parent,
    };
    if !publish(&record) {
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
    let Some(registers) = entry_registers(&ctx) else {
        return 0;
    };
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
    let Some(registers) = entry_registers(&ctx) else {
        return 0;
    };
    if GO_CONN_LOOPS
        .insert(&goroutine(&registers, tgid), &registers.rax, 0)
        .is_err()
    {
        count(Counter::InflightTableFull);
    }
    0
}
