//! Every map of the kernel object, and the accessor for the counter array.
//!
//! Userspace looks each map up by the name of its static (`apitoolkit_common::maps`), so the
//! statics keep their names.

use apitoolkit_common::{
    COMM_LEN, COUNTER_COUNT, ConnState, Counter, DEFAULT_RING_BUFFER_BYTES, Disabled,
};
use aya_ebpf::{
    Global,
    bindings::{BPF_F_MMAPABLE, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};

use crate::{
    emit::EmitState,
    go_tls::{GoObject, GoTlsRead},
    threads::ThreadSlot,
    tls::{SslConn, SslKey},
};

/// Selected processes (and their threads) by id, `--pid` and what userspace discovers: one
/// byte per id, eight to an element. Every syscall of every process checks it first, so it is
/// one array access into memory that stays in cache (a hash lookup missed it twice, ~200 ns a
/// syscall on a VM). Userspace sizes it to `pid_max` at load and writes it through a memory
/// mapping, a byte at a time as these programs do, so no writer overwrites another's flags.
#[map]
pub(crate) static WATCHED: Array<u64> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Selected ids beyond [`WATCHED`] (`pid_max` raised after the agent started).
#[map]
pub(crate) static TARGETS: HashMap<u32, u8> = HashMap::with_max_entries(1024, 0);

/// Whether process or thread `id` is selected by id.
#[inline(always)]
pub(crate) fn is_watched(id: u32) -> bool {
    match WATCHED.get(id / 8) {
        Some(flags) => (flags >> ((id % 8) * 8)) & 0xff != 0,
        // SAFETY: only the presence of the entry is used; its value is never read.
        None => unsafe { TARGETS.get(&id) }.is_some(),
    }
}

/// Selects (`true`) or unselects process or thread `id`; false if it could not be recorded.
#[inline(always)]
pub(crate) fn set_watched(id: u32, watched: bool) -> bool {
    match WATCHED.get_ptr_mut(id / 8) {
        Some(flags) => {
            // SAFETY: byte `id % 8` of a live 8-byte element; a single-byte store, so a
            // concurrent store to another byte of the element (another id) is not lost.
            unsafe {
                flags
                    .cast::<u8>()
                    .add((id % 8) as usize)
                    .write_volatile(watched as u8)
            };
            true
        }
        None if watched => TARGETS.insert(&id, &1, 0).is_ok(),
        None => {
            let _ = TARGETS.remove(&id);
            true
        }
    }
}

/// Selected cgroups (v2 ids) for `--cgroup`.
#[map]
pub(crate) static CGROUP_TARGETS: HashMap<u64, u8> = HashMap::with_max_entries(256, 0);

/// `--port` ports (host order): binding one selects the process.
#[map]
pub(crate) static PORT_TARGETS: HashMap<u16, u8> = HashMap::with_max_entries(64, 0);

/// `--exe` names as task names (`apitoolkit_common::exe_comm`): executing one selects the
/// process.
#[map]
pub(crate) static EXE_TARGETS: HashMap<[u8; COMM_LEN], u8> = HashMap::with_max_entries(64, 0);

#[map]
pub(crate) static CONNECTIONS: LruHashMap<u64, ConnState> = LruHashMap::with_max_entries(65536, 0);

/// Byte sources userspace gave up on per connection (not HTTP, or TLS ciphertext).
#[map]
pub(crate) static DISABLED: LruHashMap<u64, Disabled> = LruHashMap::with_max_entries(16384, 0);

/// How many times userspace has updated [`DISABLED`]: a connection caches its entry in
/// `ConnState` and looks it up again only when this moved, where a lookup on every emit cost a
/// cold hash lookup per request.
#[map]
pub(crate) static DISABLED_EPOCH: Array<u64> = Array::with_max_entries(1, 0);

/// One slot per watched thread ([`ThreadSlot`]), written in place (not LRU: its list locks
/// cost more than the whole lookup); a thread's slot is freed when it exits.
#[map]
pub(crate) static THREADS: HashMap<u64, ThreadSlot> = HashMap::with_max_entries(16384, 0);

/// Events that could not be delivered, indexed by [`Counter`].
#[map]
pub(crate) static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BUFFER_BYTES, 0);

/// The size of [`EVENTS`], set by the loader that sizes it: read from the frozen read-only
/// data, where asking the ring would be a helper call per record.
#[unsafe(no_mangle)]
static RING_BUFFER_BYTES: Global<u32> = Global::new(DEFAULT_RING_BUFFER_BYTES);

#[inline(always)]
pub(crate) fn ring_buffer_bytes() -> u64 {
    RING_BUFFER_BYTES.load() as u64
}

/// Submits `record` to [`EVENTS`]; false if the ring buffer is full.
#[inline(always)]
pub(crate) fn publish<T: ?Sized>(record: &T) -> bool {
    let flag = wake_flag(core::mem::size_of_val(record) as u64);
    EVENTS.output::<T>(record, flag).is_ok()
}

/// The wake-up flag for a record of `size` bytes about to enter [`EVENTS`].
///
/// Userspace is woken only when this record carries the ring past a sixteenth of its size, and
/// otherwise drains it on its own timer (`capture_loop::DRAIN_INTERVAL_MS`): a wake-up per
/// record would cost a context switch per request at low rates, and one per record past the
/// mark an interrupt each at high rates. Two producers racing past the mark can both miss it,
/// so past half of the ring every record wakes.
#[inline(always)]
pub(crate) fn wake_flag(size: u64) -> u64 {
    let filled = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    let ring = ring_buffer_bytes();
    let mark = ring / RING_SHARE_THAT_WAKES;
    let crosses = filled < mark && filled + size >= mark;
    let flag = if crosses || filled >= ring / 2 {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    flag as u64
}

/// One sixteenth: 512 KiB of the default 8 MiB ring, ~100 ms of 1 KiB requests at 5k req/s.
const RING_SHARE_THAT_WAKES: u64 = 16;

/// Loop state of `emit::emit_step`. It lives in a per-CPU map, not on the stack: the verifier
/// tracks stack values exactly and would walk every iteration, but treats map values as
/// unknown, so the callback is verified once.
#[map]
pub(crate) static EMIT_STATE: PerCpuArray<EmitState> = PerCpuArray::with_max_entries(1, 0);

/// Kept after the call returns: an SSL_read served from OpenSSL's buffer makes no syscall.
#[map]
pub(crate) static SSL_CONNS: LruHashMap<SslKey, SslConn> = LruHashMap::with_max_entries(65536, 0);

/// Go crypto/tls reads in progress, by goroutine: LRU, since a goroutine that panics inside
/// `Read` never reaches a `ret`.
#[map]
pub(crate) static GO_TLS_READS: LruHashMap<GoObject, GoTlsRead> =
    LruHashMap::with_max_entries(16384, 0);

/// The goroutine running a `go` statement, by thread, from `newproc1` to `runqput`.
#[map]
pub(crate) static GO_NEWPROC_CALLERS: LruHashMap<u64, u64> = LruHashMap::with_max_entries(4096, 0);

/// net/http client connections (`*persistConn`) to the goroutine of their latest round trip.
#[map]
pub(crate) static GO_ROUND_TRIPS: LruHashMap<GoObject, u64> =
    LruHashMap::with_max_entries(16384, 0);

/// net/http read and write loop goroutines to their connection (`*persistConn`).
#[map]
pub(crate) static GO_CONN_LOOPS: LruHashMap<GoObject, u64> = LruHashMap::with_max_entries(32768, 0);

/// Counts one event that could not be delivered.
#[inline(always)]
pub(crate) fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: the pointer is this CPU's slot of a per-CPU array, non-null and in bounds
        // (checked by the lookup and the verifier); programs do not nest on a CPU, so nothing
        // else writes it meanwhile.
        unsafe { *slot += 1 };
    }
}
