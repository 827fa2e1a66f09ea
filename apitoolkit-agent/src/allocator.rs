//! The agent's allocator. Payloads are built on the capture thread and freed on the sink
//! threads: glibc malloc handles that cross-thread pattern poorly, mimalloc well, but mimalloc
//! keeps what other threads freed until the allocating thread collects it.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Returns memory freed by other threads to the OS; called about once a second by the capture
/// thread, so an idle agent does not hold on to the peak of its last burst.
pub fn return_freed_memory() {
    // SAFETY: mi_collect only walks the allocator's own structures.
    unsafe { libmimalloc_sys::mi_collect(true) };
}
