//! The connection table: opening entries under a fresh generation, and the open, close and
//! error records userspace builds its connection state from.

use apitoolkit_common::{
    AF_INET, AF_INET6, ConnId, ConnRecord, ConnState, Counter, RecordKind, Role, SocketAddress,
    conn_key,
};
use aya_ebpf::helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user};

use crate::{
    maps::{CONNECTIONS, count, publish},
    syscalls::Transfer,
};

const EPIPE: i64 = 32;
const ECONNRESET: i64 = 104;
const ETIMEDOUT: i64 = 110;
const ECONNREFUSED: i64 = 111;

/// The `sockaddr` a target passed to accept/connect, if it is readable.
#[inline(always)]
pub(crate) fn read_sockaddr(user_ptr: u64) -> Option<SocketAddress> {
    if user_ptr == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_user copies from the target's memory and fails instead of faulting
    // on a bad address; the result (here and below) is an integer or byte array, valid for any
    // bytes.
    let family: u16 = unsafe { bpf_probe_read_user(user_ptr as *const u16) }.ok()?;
    // SAFETY: as above.
    let port_be: u16 = unsafe { bpf_probe_read_user((user_ptr + 2) as *const u16) }.ok()?;
    let mut address = SocketAddress {
        family,
        port: u16::from_be(port_be),
        ..Default::default()
    };
    match family {
        AF_INET => {
            // SAFETY: as above.
            let v4: [u8; 4] =
                unsafe { bpf_probe_read_user((user_ptr + 4) as *const [u8; 4]) }.ok()?;
            address.addr[..4].copy_from_slice(&v4);
        }
        AF_INET6 => {
            // SAFETY: as above.
            address.addr =
                unsafe { bpf_probe_read_user((user_ptr + 8) as *const [u8; 16]) }.ok()?;
        }
        _ => {}
    }
    Some(address)
}

#[inline(always)]
pub(crate) fn is_ip(address: &SocketAddress) -> bool {
    address.family == AF_INET || address.family == AF_INET6
}

#[inline(always)]
pub(crate) fn emit_conn(
    kind: RecordKind,
    role: Role,
    conn: ConnId,
    remote: SocketAddress,
    state: &ConnState,
    error: u32,
) {
    let record = ConnRecord {
        kind: kind as u32,
        role: role as u8,
        _pad: [0; 3],
        tid: bpf_get_current_pid_tgid() as u32,
        error,
        conn,
        // SAFETY: the helper takes no arguments.
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        remote,
        bytes_sent: state.bytes_sent,
        bytes_received: state.bytes_received,
        tls_bytes_sent: state.tls_bytes_sent,
        tls_bytes_received: state.tls_bytes_received,
    };
    if !publish(&record) {
        count(Counter::RingbufFull);
    }
}

/// Starts tracking a connection under a fresh generation and tells userspace about it.
#[inline(always)]
pub(crate) fn open_conn(
    tgid: u32,
    fd: i32,
    role: Role,
    remote: SocketAddress,
) -> Option<*mut ConnState> {
    let key = conn_key(tgid, fd);
    let state = ConnState {
        // SAFETY: the helper takes no arguments.
        generation: unsafe { bpf_ktime_get_ns() },
        ..ConnState::default()
    };
    if CONNECTIONS.insert(&key, &state, 0).is_err() {
        count(Counter::ConnTableFull);
        return None;
    }
    let conn = ConnId {
        tgid,
        fd,
        generation: state.generation,
    };
    emit_conn(RecordKind::ConnOpen, role, conn, remote, &state, 0);
    CONNECTIONS.get_ptr_mut(&key)
}

/// Tells userspace that a call on a known connection failed in a way that breaks it.
#[inline(always)]
pub(crate) fn report_broken(tgid: u32, fd: i32, error: i64) {
    if !matches!(error, EPIPE | ECONNRESET | ETIMEDOUT | ECONNREFUSED) {
        return;
    }
    // SAFETY: `ConnState` is plain integers, so even an entry another CPU updates or the LRU
    // recycles while we read it yields integers (at worst stale counts), never invalid values;
    // the element memory stays mapped while the program runs.
    let Some(state) = (unsafe { CONNECTIONS.get(&conn_key(tgid, fd)) }) else {
        return;
    };
    let conn = ConnId {
        tgid,
        fd,
        generation: state.generation,
    };
    emit_conn(
        RecordKind::ConnError,
        Role::Unknown,
        conn,
        SocketAddress::default(),
        state,
        error as u32,
    );
}

/// The kernel entry of the connection a data call used; recv*/send* on an unknown fd adopt it.
#[inline(always)]
pub(crate) fn connection_of(tgid: u32, call: &Transfer) -> Option<*mut ConnState> {
    match CONNECTIONS.get_ptr_mut(&conn_key(tgid, call.fd)) {
        Some(state) => Some(state),
        None if call.socket_only != 0 => {
            open_conn(tgid, call.fd, Role::Unknown, SocketAddress::default())
        }
        None => None,
    }
}
