//! Per-thread state of a watched thread's programs, in one map slot: the SSL call in progress
//! and the last connection fd the thread moved bytes on. One slot makes a syscall exit one
//! hash lookup where two maps were two.

use apitoolkit_common::Counter;

use crate::{
    maps::{THREADS, count},
    tls::TlsCall,
};

/// No fd: `ThreadSlot::last_socket_fd` before the thread moved bytes on a connection.
pub(crate) const NO_FD: i32 = -1;

/// A watched thread's slot in `THREADS`.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct ThreadSlot {
    pub(crate) tls: TlsCall,
    /// The fallback for TLS stacks that do socket I/O outside the SSL call (node feeds
    /// OpenSSL from memory buffers); [`NO_FD`] until the thread moved bytes on a connection.
    pub(crate) last_socket_fd: i32,
    pub(crate) _pad: u32,
}

/// The thread's slot, if it has one.
#[inline(always)]
pub(crate) fn thread_slot(pid_tgid: u64) -> Option<&'static mut ThreadSlot> {
    let slot = THREADS.get_ptr_mut(&pid_tgid)?;
    // SAFETY: a live element of `THREADS` keyed by this thread: only this thread's programs
    // touch it (never userspace), one at a time, so this is the only reference; they write
    // whole valid values, so its one-byte enums hold valid discriminants.
    Some(unsafe { &mut *slot })
}

/// The thread's slot, created empty when the thread first needs one. Written in place from
/// then on: a hash-map update or delete per call costs ~0.5 µs on a VM (an LRU map's list locks
/// even more), a lookup a fraction of that. The slot is freed when the thread exits
/// (`process::process_exit`).
#[inline(always)]
pub(crate) fn thread_slot_or_new(pid_tgid: u64) -> Option<&'static mut ThreadSlot> {
    if let Some(slot) = thread_slot(pid_tgid) {
        return Some(slot);
    }
    let empty = ThreadSlot {
        tls: TlsCall::NONE,
        last_socket_fd: NO_FD,
        _pad: 0,
    };
    if THREADS.insert(&pid_tgid, &empty, 0).is_err() {
        count(Counter::InflightTableFull);
        return None;
    }
    thread_slot(pid_tgid)
}
