//! The agent's allocator. Payloads are built on the capture thread and freed on the sink
//! threads: glibc malloc handles that cross-thread pattern poorly, mimalloc well, but mimalloc
//! keeps what other threads freed until the allocating thread collects it.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Backs this process's memory with base pages only. mimalloc asks for transparent huge pages
/// for its arenas: every first touch zeroed 2 MiB, and memory returned inside a huge page still
/// counted, so 30 of the 50 MiB the agent held at start-up were huge pages it barely used.
pub fn use_base_pages() -> std::io::Result<()> {
    // SAFETY: prctl with PR_SET_THP_DISABLE only sets a flag of this process's memory map; it
    // takes effect at the next fault, for existing mappings too.
    match unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// Collects memory freed by other threads; called about once a second by the capture thread.
/// `idle` (nothing captured since the last call) also returns it to the OS at once, so an idle
/// agent does not hold on to the peak of its last burst. While traffic flows it is kept for
/// reuse: returned, it came straight back as page faults.
pub fn return_freed_memory(idle: bool) {
    // SAFETY: mi_collect only walks the allocator's own structures.
    unsafe { libmimalloc_sys::mi_collect(idle) };
}
