//! Emitting the bytes a call moved: placing them in the connection's stream, and copying them
//! into data records chunk by chunk (and iovec by iovec) from a `bpf_loop` callback.

use apitoolkit_common::{
    CHUNK_SIZE, ConnId, ConnState, Counter, DataHeader, Direction, MAX_IOVECS, MAX_LOOP_STEPS,
    RecordKind, Source, conn_key,
};
use aya_ebpf::{
    bindings::BPF_RB_NO_WAKEUP,
    helpers::{bpf_ktime_get_ns, bpf_probe_read_user, generated},
};
use core::ffi::c_void;

use crate::{
    maps::{DISABLED, DISABLED_EPOCH, EMIT_STATE, EVENTS, count, publish, wake_flag},
    syscalls::{CallKind, Transfer},
};

/// One entry of a user iovec array (`struct iovec`).
#[repr(C)]
#[derive(Clone, Copy)]
struct IoVec {
    base: u64,
    len: u64,
}

/// Who moved bytes: the thread, and for Go's crypto/tls the goroutine they were moved for
/// (0 elsewhere).
#[derive(Clone, Copy)]
pub(crate) struct Mover {
    pub(crate) tid: u32,
    pub(crate) goroutine: u64,
}

impl Mover {
    #[inline(always)]
    pub(crate) fn thread(tid: u32) -> Self {
        Self { tid, goroutine: 0 }
    }
}

/// What `emit_step` works through, in `EMIT_STATE`. Fields that are often 0 at the start
/// (`done`, `next_iovec`, `iovec_count` and `goroutine` of a plaintext call) are kept apart:
/// LLVM turns 16 adjacent zero bytes of the initialisation into a call to a byte-by-byte memset.
#[repr(C)]
pub(crate) struct EmitState {
    conn: ConnId,
    timestamp_ns: u64,
    done: u64,
    /// Stream position of the syscall's first byte.
    start: u64,
    next_iovec: u64,
    total: u64,
    iovec_count: u64,
    user_ptr: u64,
    goroutine: u64,
    segment_ptr: u64,
    segment_left: u64,
    tid: u32,
    direction: u8,
    walks_iovecs: u8,
    source: u8,
    _pad: u8,
}

/// One `bpf_loop` step: load the next iovec if the current segment is used up, and copy one
/// chunk of the segment into a data record. A callback is verified once, where an open-coded
/// loop over chunks and iovecs exceeds the verifier's instruction budget. Returns 1 to stop
/// the loop: a step that finishes the call says so itself, not the next.
extern "C" fn emit_step(_index: u64, _context: *mut c_void) -> i64 {
    let Some(state) = EMIT_STATE.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's slot of a per-CPU array, non-null, aligned and in bounds. Programs do
    // not nest on a CPU, and `emit_data`, which runs this loop, holds no reference to the slot
    // while it runs, so this is the only live reference.
    let state = unsafe { &mut *state };
    if state.done >= state.total {
        return 1;
    }
    if state.segment_left == 0 {
        if next_segment(state) != 0 {
            return 1;
        }
        if state.segment_left == 0 {
            // An empty iovec: the next step loads the one after it.
            return 0;
        }
    }
    if emit_chunk(state) != 0 {
        return 1;
    }
    (state.done >= state.total) as i64
}

/// Loads the next iovec of an iovec call as the current segment (0), or stops the loop (1).
#[inline(always)]
fn next_segment(state: &mut EmitState) -> i64 {
    if state.walks_iovecs == 0
        || state.next_iovec >= state.iovec_count
        || state.next_iovec >= MAX_IOVECS
    {
        return 1;
    }
    let entry = (state.user_ptr + state.next_iovec * 16) as *const IoVec;
    state.next_iovec += 1;
    // SAFETY: bpf_probe_read_user copies from the target's memory and fails instead of faulting
    // on a bad address; `IoVec` is two integers, valid for any bytes.
    let Ok(iovec) = (unsafe { bpf_probe_read_user(entry) }) else {
        count(Counter::ReadFailed);
        return 1;
    };
    state.segment_ptr = iovec.base;
    state.segment_left = iovec.len;
    0
}

/// A data record reserved in the ring buffer with room for `N` bytes of data, of which the
/// header's `captured_len` are used (userspace reads no further).
#[repr(C)]
struct SizedRecord<const N: usize> {
    header: DataHeader,
    data: [u8; N],
}

/// Copies up to one chunk of the current segment into a data record and emits it (0), or stops
/// the loop (1). The record is reserved in the ring buffer and the bytes are read straight into
/// it: a reservation needs a constant size, so the chunk takes the smallest of a few sizes
/// that holds it, where assembling it in per-CPU memory and copying it into the ring cost a
/// second copy of every byte.
#[inline(always)]
fn emit_chunk(state: &mut EmitState) -> i64 {
    let mut len = state.total - state.done;
    if len > state.segment_left {
        len = state.segment_left;
    }
    if len > CHUNK_SIZE as u64 {
        len = CHUNK_SIZE as u64;
    }
    // Sizes a power of two, and from 512 up also one and a half times one: above 512 bytes at
    // most a third of a record's data room is unused ring space, at most half from 64 to 512.
    let emitted = if len <= 32 {
        emit_sized::<32>(state, len)
    } else if len <= 64 {
        emit_sized::<64>(state, len)
    } else if len <= 128 {
        emit_sized::<128>(state, len)
    } else if len <= 256 {
        emit_sized::<256>(state, len)
    } else if len <= 512 {
        emit_sized::<512>(state, len)
    } else if len <= 768 {
        emit_sized::<768>(state, len)
    } else if len <= 1024 {
        emit_sized::<1024>(state, len)
    } else if len <= 1536 {
        emit_sized::<1536>(state, len)
    } else if len <= 2048 {
        emit_sized::<2048>(state, len)
    } else if len <= 3072 {
        emit_sized::<3072>(state, len)
    } else if len <= 4096 {
        emit_sized::<4096>(state, len)
    } else if len <= 6144 {
        emit_sized::<6144>(state, len)
    } else if len <= 8192 {
        emit_sized::<8192>(state, len)
    } else if len <= 12288 {
        emit_sized::<12288>(state, len)
    } else {
        emit_sized::<CHUNK_SIZE>(state, len)
    };
    if !emitted {
        return 1;
    }
    state.done += len;
    state.segment_ptr += len;
    state.segment_left -= len;
    0
}

/// Emits `len <= N` bytes of the current segment as one record reserved with room for `N`;
/// false if they could not be read (counted). A full ring buffer is counted and the bytes
/// pass as emitted: userspace sees the gap in the positions.
#[inline(always)]
fn emit_sized<const N: usize>(state: &EmitState, len: u64) -> bool {
    // Asked before the reservation, which the ring's fill level would then include.
    let wake = wake_flag(size_of::<SizedRecord<N>>() as u64);
    let Some(mut entry) = EVENTS.reserve::<SizedRecord<N>>(0) else {
        count(Counter::RingbufFull);
        return true;
    };
    let record = entry.as_mut_ptr();
    // The caller's class check is what bounds the read for the verifier (LLVM folds this away
    // and the verifier follows that comparison through register copies); kept so the bound
    // holds here whatever the caller.
    let len = len.min(N as u64);
    // SAFETY: writes `len <= N` bytes into the reserved record's `data`, which holds N; the
    // helper reads the target's memory and fails instead of faulting on a bad address.
    let read = unsafe {
        generated::bpf_probe_read_user(
            (&raw mut (*record).data).cast(),
            len as u32,
            state.segment_ptr as *const c_void,
        )
    };
    if read < 0 {
        // No wake-up: the consumer is woken by the fill level, never for a record it skips.
        entry.discard(BPF_RB_NO_WAKEUP as u64);
        count(Counter::ReadFailed);
        return false;
    }
    // SAFETY: the header lies inside the reservation, which is this program's alone until it
    // is submitted.
    unsafe {
        (&raw mut (*record).header).write(DataHeader {
            kind: RecordKind::Data as u32,
            tid: state.tid,
            conn: state.conn,
            timestamp_ns: state.timestamp_ns,
            position: state.start + state.done,
            skipped_len: 0,
            goroutine: state.goroutine,
            captured_len: len as u32,
            direction: state.direction,
            source: state.source,
            _pad: [0; 2],
        })
    };
    entry.submit(wake);
    true
}

/// Copies what one syscall moved into data records, chunk by chunk and iovec by iovec, and
/// reports whatever the loop bound leaves behind as skipped bytes.
#[inline(always)]
pub(crate) fn emit_data(
    call: &Transfer,
    conn: ConnId,
    mover: Mover,
    direction: Direction,
    source: Source,
    total: u64,
    start: u64,
) {
    let Some(state) = EMIT_STATE.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: the helper takes no arguments.
    let timestamp_ns = unsafe { bpf_ktime_get_ns() };
    // SAFETY: this CPU's slot of a per-CPU array, non-null, aligned and in bounds, and programs
    // do not nest on a CPU. It is accessed through the raw pointer only (no reference), since
    // `emit_step` makes its own reference to it while `bpf_loop` runs.
    // A buffer call is one segment; an iovec call loads its segments as it goes. (Both set
    // here, so no run of zeroed fields becomes a call to a byte-by-byte memset.)
    let (segment_ptr, segment_left) = if call.kind == CallKind::Buffer {
        (call.user_ptr, total)
    } else {
        (0, 0)
    };
    unsafe {
        *state = EmitState {
            conn,
            timestamp_ns,
            start,
            total,
            done: 0,
            user_ptr: call.user_ptr,
            iovec_count: call.count,
            next_iovec: 0,
            segment_ptr,
            segment_left,
            goroutine: mover.goroutine,
            tid: mover.tid,
            direction: direction as u8,
            walks_iovecs: (call.kind == CallKind::IoVec) as u8,
            source: source as u8,
            _pad: 0,
        };
    }
    // The first step is called directly: most calls fit one chunk of one segment, and a
    // bpf_loop helper call and an indirect call per step cost more than the step itself.
    if call.kind != CallKind::SizeOnly && emit_step(0, core::ptr::null_mut()) == 0 {
        // SAFETY: `emit_step` has the callback signature bpf_loop expects and ignores its
        // context, so a null context is fine; flags must be 0.
        unsafe {
            generated::bpf_loop(
                MAX_LOOP_STEPS - 1,
                emit_step as *mut c_void,
                core::ptr::null_mut(),
                0,
            )
        };
    }
    // SAFETY: as for the writes above; the loop is over.
    let done = unsafe { (*state).done };
    if done < total {
        let skipped = Skipped {
            conn,
            mover,
            timestamp_ns,
            position: start + done,
            len: total - done,
        };
        emit_skipped(&skipped, direction, source);
    }
}

/// Bytes of a stream that were moved but not captured.
pub(crate) struct Skipped {
    pub(crate) conn: ConnId,
    pub(crate) mover: Mover,
    pub(crate) timestamp_ns: u64,
    pub(crate) position: u64,
    pub(crate) len: u64,
}

/// Tells userspace about bytes it will not get, as a data record without data, so it sees
/// the gap instead of joining what came before and after.
#[inline(always)]
pub(crate) fn emit_skipped(skipped: &Skipped, direction: Direction, source: Source) {
    let marker = DataHeader {
        kind: RecordKind::Data as u32,
        tid: skipped.mover.tid,
        conn: skipped.conn,
        timestamp_ns: skipped.timestamp_ns,
        position: skipped.position,
        skipped_len: skipped.len,
        goroutine: skipped.mover.goroutine,
        captured_len: 0,
        direction: direction as u8,
        source: source as u8,
        _pad: [0; 2],
    };
    if !publish(&marker) {
        count(Counter::RingbufFull);
    }
}

/// Whether userspace disabled `source` of this connection generation. The DISABLED entry is
/// looked up only when the disabled epoch moved since this connection last looked: userspace
/// bumps the epoch after each update of the map, and the epoch is read before the lookup, so
/// an update the lookup missed has moved the epoch past the cached one and the next call looks
/// again. That order holds on x86-64 (the only target of these programs); a weaker memory
/// model would need a barrier between the two reads.
#[inline(always)]
fn is_disabled(state: &mut ConnState, key: u64, source: Source) -> bool {
    let epoch = DISABLED_EPOCH.get(0).copied().unwrap_or(0);
    // One read and one write of the word: another CPU may update it meanwhile, and a torn
    // pair of epoch and sources could hide a disable.
    let cached_at = &raw mut state.disabled_sources_at_epoch;
    // SAFETY: a field of the live map value `state` refers to; any u64 is valid.
    let cached = unsafe { cached_at.read_volatile() };
    let tag = (epoch + 1) << 8;
    let sources = if cached & !0xff == tag {
        cached & 0xff
    } else {
        // SAFETY: `Disabled` is plain integers, so a concurrently updated or recycled entry
        // yields integers (at worst a stale answer), never invalid values; the reference is
        // dropped at once.
        let sources = match unsafe { DISABLED.get(&key) } {
            Some(disabled) if disabled.generation == state.generation => disabled.sources & 0xff,
            _ => 0,
        } as u64;
        // SAFETY: as for the read.
        unsafe { cached_at.write_volatile(tag | sources) };
        sources
    };
    sources & source.bit() as u64 != 0
}

/// Places `total` bytes of `call` in the connection's stream for that source and direction,
/// and emits them unless userspace disabled the source. Syscall bytes and TLS plaintext keep
/// separate positions.
#[inline(always)]
pub(crate) fn emit_on_connection(
    state: &mut ConnState,
    tgid: u32,
    call: &Transfer,
    mover: Mover,
    direction: Direction,
    source: Source,
    total: u64,
) {
    let counter = match (source == Source::Tls, direction == Direction::Egress) {
        (false, true) => &mut state.bytes_sent,
        (false, false) => &mut state.bytes_received,
        (true, true) => &mut state.tls_bytes_sent,
        (true, false) => &mut state.tls_bytes_received,
    };
    let start = *counter;
    *counter += total;
    if is_disabled(state, conn_key(tgid, call.fd), source) {
        return;
    }
    let conn = ConnId {
        tgid,
        fd: call.fd,
        generation: state.generation,
    };
    emit_data(call, conn, mover, direction, source, total, start);
}
