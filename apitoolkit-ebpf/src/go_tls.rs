//! Go crypto/tls uprobes: the plaintext of `crypto/tls.(*Conn).Read` and `Write` in Go
//! executables (register ABI, Go 1.17+).
//!
//! Go runs goroutines on any thread and moves them between calls, so a read in progress is
//! keyed by its goroutine (the `g` pointer Go keeps in R14), not by thread. There are no
//! uretprobes on Go code (a rewritten return address breaks Go's stack copying and unwinding):
//! userspace puts the return program on every `ret` of `Read`. The socket is read from the
//! `tls.Conn` itself, along the offsets the attach cookie carries for the executable's Go
//! version.

use apitoolkit_common::{Counter, Direction, go_layout_offsets};
use aya_ebpf::{
    EbpfContext,
    bindings::pt_regs,
    helpers::{bpf_probe_read_user, generated::bpf_get_attach_cookie},
    macros::uprobe,
    programs::ProbeContext,
};

use crate::{
    maps::{GO_TLS_READS, count},
    process::current_target,
    tls::emit_plaintext,
};

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct GoroutineKey {
    goroutine: u64,
    tgid: u32,
    _pad: u32,
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

#[inline(always)]
fn goroutine_key(registers: &pt_regs, tgid: u32) -> GoroutineKey {
    GoroutineKey {
        goroutine: registers.r14,
        tgid,
        _pad: 0,
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
        .insert(&goroutine_key(&registers, tgid), &read, 0)
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
    let key = goroutine_key(&registers, tgid);
    // SAFETY: copied at once. Only these programs write `GO_TLS_READS`, and the entry is keyed
    // by this goroutine; `GoTlsRead` is plain integers, valid for any bytes.
    let Some(read) = unsafe { GO_TLS_READS.get(&key) }.copied() else {
        return 0;
    };
    let _ = GO_TLS_READS.remove(&key);
    let total = registers.rax as i64;
    if total <= 0 {
        return 0;
    }
    let Some(fd) = socket_fd(&ctx, read.conn) else {
        count(Counter::TlsUnmapped);
        return 0;
    };
    emit_plaintext(pid_tgid, fd, read.buf, Direction::Ingress, total as u64);
    0
}

/// `(c *Conn) Write(b []byte) (int, error)`: the bytes to encrypt are `b` (RBX, length RCX) in
/// full, so they are taken at the entry: no trap at a `ret`. A write that fails breaks the
/// connection, which ends its exchange anyway.
#[uprobe]
pub fn go_tls_write_enter(ctx: ProbeContext) -> u32 {
    let Some((pid_tgid, _)) = current_target() else {
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
        pid_tgid,
        fd,
        registers.rbx,
        Direction::Egress,
        registers.rcx,
    );
    0
}
