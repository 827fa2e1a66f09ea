//! The agent's allocator. Payloads are built on the capture thread and freed on the sink
//! threads: glibc malloc handles that cross-thread pattern poorly, mimalloc well, but mimalloc
//! keeps what other threads freed until the allocating thread collects it.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Collects memory freed by other threads; called about once a second by the capture thread.
/// `idle` (nothing captured since the last call) also returns it to the OS at once, so an idle
/// agent does not hold on to the peak of its last burst. While traffic flows it is kept for
/// reuse: returned, it came straight back as page faults, each zeroing a 2 MiB huge page.
pub fn return_freed_memory(idle: bool) {
    // SAFETY: mi_collect only walks the allocator's own structures.
    unsafe { libmimalloc_sys::mi_collect(idle) };
}
