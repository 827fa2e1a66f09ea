//! The kernel's flags of the processes selected by id (the `WATCHED` map), written through a
//! memory mapping: a byte per id, stored one byte at a time, so a flag the kernel sets for a
//! forked child at the same moment is never overwritten (a map update would write all eight
//! ids of an element).

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU8, Ordering},
};

/// Ids the map covers when `/proc/sys/kernel/pid_max` cannot be read: the kernel's limit.
const PID_MAX_LIMIT: u32 = 4 * 1024 * 1024;

/// How many ids the map covers: all the kernel hands out now. A higher `pid_max` set later
/// spills into the `TARGETS` hash map.
pub fn capacity() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(PID_MAX_LIMIT)
        .clamp(8, PID_MAX_LIMIT)
}

/// Elements of the map (eight ids each) for `capacity` ids.
pub fn entries(capacity: u32) -> u32 {
    capacity.div_ceil(8)
}

pub struct WatchedFlags {
    bytes: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is shared memory written only through atomic byte stores; the pointer
// is valid until drop wherever the owner lives.
unsafe impl Send for WatchedFlags {}

impl WatchedFlags {
    /// Maps the `WATCHED` array of `entries` elements.
    pub fn map(map: &impl AsFd, entries: u32) -> io::Result<Self> {
        let len = entries as usize * 8;
        // SAFETY: a shared read-write mapping of a BPF_F_MMAPABLE array, no larger than the
        // array; the kernel rounds it to pages and checks the size.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.as_fd().as_raw_fd(),
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let bytes = NonNull::new(address.cast()).ok_or_else(io::Error::last_os_error)?;
        Ok(Self { bytes, len })
    }

    /// Sets or clears the flag of `id`; false when `id` is beyond the map.
    pub fn set(&self, id: u32, watched: bool) -> bool {
        let index = id as usize;
        if index >= self.len {
            return false;
        }
        // SAFETY: `index` is inside the mapping, which lives as long as `self`; the kernel
        // programs also store single bytes, so an atomic byte store is the whole protocol.
        let flag = unsafe { AtomicU8::from_ptr(self.bytes.as_ptr().add(index)) };
        flag.store(watched as u8, Ordering::Relaxed);
        true
    }
}

impl Drop for WatchedFlags {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `map` made, which nothing uses after drop.
        unsafe { libc::munmap(self.bytes.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eight_ids_per_element() {
        assert_eq!(entries(32768), 4096);
        assert_eq!(entries(9), 2);
        assert!((8..=PID_MAX_LIMIT).contains(&capacity()));
    }
}
