//! Socket capture for the processes userspace selects: syscall exit tracepoints emit the bytes
//! actually moved, reading the call's arguments from the registers it was entered with. Only
//! fds known to be TCP connections (seen in accept/connect, registered by userspace from /proc,
//! or used by a socket-only syscall) are captured, so file and pipe I/O costs one map lookup.
//!
//! TLS: uprobes on the TLS library's read/write functions emit the plaintext. The socket
//! syscall that runs inside an SSL call on the same thread names its connection (no struct
//! offsets), and its ciphertext is not emitted. Go's crypto/tls is probed in the executable,
//! keyed by goroutine, its socket read from the `tls.Conn` (`go_tls`).
//!
//! Programs are the `#[tracepoint]`/`#[uprobe]`/`#[uretprobe]` functions of the modules below,
//! named by their function names; maps are the `#[map]` statics of [`maps`], named by their
//! static names. Userspace finds both by name (`apitoolkit_common::{maps, programs}`).
#![no_std]
#![no_main]

mod connections;
mod emit;
mod go_tls;
mod maps;
mod process;
mod syscalls;
mod threads;
mod tls;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// SAFETY: the loader reads the license from this section, and no other symbol is named
// `LICENSE`.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
