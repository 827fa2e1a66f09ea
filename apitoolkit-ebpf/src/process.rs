//! Target selection: which processes are captured, and the fork/exit tracepoints that keep the
//! target set current.

use apitoolkit_common::{Counter, DEFAULT_FORK_CHILD_PID_OFFSET, ProcessRecord, RecordKind};
use aya_ebpf::{
    Global,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
    },
    macros::tracepoint,
    programs::TracePointContext,
};

use crate::{
    connections::read_sockaddr,
    maps::{
        CGROUP_TARGETS, EXE_TARGETS, PORT_TARGETS, THREADS, count, is_watched, publish, set_watched,
    },
    syscalls::arg,
};

/// `(pid_tgid, tgid)` of the current thread if its process is a target.
#[inline(always)]
pub(crate) fn current_target() -> Option<(u64, u32)> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let selected = is_watched(tgid) || selected_by_config(tgid);
    selected.then_some((pid_tgid, tgid))
}

/// `--all`: every process but the agent is a target. The selection switches are read-only
/// globals the loader sets, not a map: the verifier sees their values and drops the branches
/// they rule out, where a map lookup cost every syscall of every process that is no target.
#[unsafe(no_mangle)]
static SELECT_ALL: Global<u32> = Global::new(0);

/// `--cgroup`: processes in the cgroups of [`CGROUP_TARGETS`] are targets.
#[unsafe(no_mangle)]
static SELECT_CGROUPS: Global<u32> = Global::new(0);

/// The agent's own process, never a target: it would capture its own output.
#[unsafe(no_mangle)]
static AGENT_TGID: Global<u32> = Global::new(0);

/// `--all` and `--cgroup` select in the kernel, so new processes are captured from their first
/// syscall.
#[inline(always)]
fn selected_by_config(tgid: u32) -> bool {
    // The agent is excluded inside each switch, not before them: with both off (the default)
    // the verifier drops every branch, and an unwatched process's syscall pays nothing here.
    if SELECT_ALL.load() != 0 {
        return tgid != AGENT_TGID.load();
    }
    // The agent may run in a cgroup it watches (a session scope, a pod).
    if SELECT_CGROUPS.load() != 0 && tgid != AGENT_TGID.load() {
        // SAFETY: the helper takes no arguments and only reads the current task.
        let cgroup = unsafe { bpf_get_current_cgroup_id() };
        // SAFETY: only the presence of the entry is used; its value is never read.
        return unsafe { CGROUP_TARGETS.get(&cgroup) }.is_some();
    }
    false
}

/// Where `child_pid` is in this kernel's sched_process_fork records, set by the loader from the
/// event's format.
#[unsafe(no_mangle)]
static FORK_CHILD_PID_OFFSET: Global<u32> = Global::new(DEFAULT_FORK_CHILD_PID_OFFSET);

/// sched_process_fork. Children of processes selected by id are selected too; threads are
/// added as well (their tid never names another live process) and removed again by
/// sched_process_exit.
#[tracepoint]
pub fn process_fork(ctx: TracePointContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !is_watched(tgid) {
        return 0;
    }
    // Read through the helper: the offset is only known at load (see
    // `FORK_CHILD_PID_OFFSET`), and a load from the record itself needs a constant one.
    // SAFETY: bpf_probe_read_kernel copies from the record and fails instead of faulting; the
    // loader set the offset of this kernel's `child_pid`, and any u32 is valid.
    let Ok(child) = (unsafe { ctx.read_at::<u32>(FORK_CHILD_PID_OFFSET.load() as usize) }) else {
        return 0;
    };
    set_watched(child, true);
    0
}

/// The current process, when it is neither a target yet nor the agent.
#[inline(always)]
fn unselected_process() -> Option<u32> {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let selected = is_watched(tgid) || selected_by_config(tgid);
    (!selected && tgid != AGENT_TGID.load()).then_some(tgid)
}

/// Makes the current process a target from its next syscall on (its threads and children
/// follow through the fork hook) and tells userspace, which confirms it from /proc.
#[inline(always)]
fn select_now(tgid: u32) {
    if !set_watched(tgid, true) {
        return;
    }
    let record = ProcessRecord {
        kind: RecordKind::ProcessSelected as u32,
        tgid,
        // SAFETY: the helper takes no arguments.
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
    };
    if !publish(&record) {
        count(Counter::RingbufFull);
    }
}

/// bind(fd, addr, len): a server binding a `--port` port is selected before it accepts its
/// first connection, not at the next /proc scan.
#[tracepoint]
pub fn enter_bind(ctx: TracePointContext) -> u32 {
    let Some(tgid) = unselected_process() else {
        return 0;
    };
    let Some(address) = read_sockaddr(arg(&ctx, 1)) else {
        return 0;
    };
    // SAFETY: only the presence of the entry is used; its value is never read.
    if unsafe { PORT_TARGETS.get(&address.port) }.is_some() {
        select_now(tgid);
    }
    0
}

/// sched_process_exec: the task already carries the new program's name, so a process executing
/// an `--exe` program is selected before its first syscall.
#[tracepoint]
pub fn process_exec(_ctx: TracePointContext) -> u32 {
    let Some(tgid) = unselected_process() else {
        return 0;
    };
    let Ok(comm) = bpf_get_current_comm() else {
        return 0;
    };
    // SAFETY: only the presence of the entry is used; its value is never read.
    if unsafe { EXE_TARGETS.get(&comm) }.is_some() {
        select_now(tgid);
    }
    0
}

#[tracepoint]
pub fn process_exit(_ctx: TracePointContext) -> u32 {
    // Per-thread slots go with their thread, even one that is no target any more (not an LRU
    // map). A thread that dies inside an SSL call never returns from it.
    let _ = THREADS.remove(&bpf_get_current_pid_tgid());
    let Some((pid_tgid, tgid)) = current_target() else {
        return 0;
    };
    let tid = pid_tgid as u32;
    set_watched(tid, false);
    if tid == tgid {
        let record = ProcessRecord {
            kind: RecordKind::ProcessExit as u32,
            tgid: tid,
            // SAFETY: the helper takes no arguments.
            timestamp_ns: unsafe { bpf_ktime_get_ns() },
        };
        if !publish(&record) {
            count(Counter::RingbufFull);
        }
    }
    0
}
