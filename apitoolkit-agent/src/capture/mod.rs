//! Loads the kernel object, attaches its programs, and owns the maps userspace talks through:
//! the target set, disabled connections, the event ring buffer and the loss counters.

pub mod preflight;
mod watched;

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd as _, OwnedFd},
    path::Path,
};

use apitoolkit_common::{
    COMM_LEN, ConnState, Counter, Disabled, conn_key, exe_comm, globals, maps,
    programs::{
        GO_CONN_LOOP_ENTER, GO_NEWPROC1_CALL, GO_PROGRAMS, GO_ROUND_TRIP_ENTER, GO_RUNQPUT_CALL,
        GO_TLS_READ_COPY, GO_TLS_READ_ENTER, GO_TLS_READ_RETURN, GO_TLS_WRITE_ENTER,
        SSL_CALL_RETURN, SSL_PROGRAMS, TRACEPOINTS,
    },
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, RingBuf},
    programs::{
        TracePoint, UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeScope},
    },
};

use crate::{
    pipeline::events::{ConnId, Source},
    targets::go::{self, GoTlsPlan, ReadSites},
};
use watched::WatchedFlags;

/// The kernel object, built by build.rs.
static KERNEL_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/apitoolkit"));

const TRACEFS: &str = "/sys/kernel/tracing";

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(
        "not allowed to load eBPF programs: run as root (or with CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN)"
    )]
    PermissionDenied,
    #[error("kernel feature missing: {feature} ({source})")]
    MissingFeature {
        feature: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("could not mount tracefs at {TRACEFS}: {0}")]
    Tracefs(io::Error),
    /// Following forks in the kernel needs the child's pid from the fork event's record.
    #[error("{path}: child_pid at offset {offset}, a layout this agent does not know")]
    UnknownForkLayout { path: String, offset: String },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("TLS uprobes are unavailable on this kernel")]
    TlsUnavailable,
    #[error("uprobe {program} on {function}: {source}")]
    Uprobe {
        program: &'static str,
        function: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
}

fn missing(
    feature: impl Into<String>,
    source: impl std::error::Error + Send + Sync + 'static,
) -> ProbeError {
    ProbeError::MissingFeature {
        feature: feature.into(),
        source: Box::new(source),
    }
}

pub use apitoolkit_common::DEFAULT_RING_BUFFER_BYTES;

/// Capability bits (linux/capability.h) the agent needs when it does not run as root.
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Fails early, with the fix in the message, when the process may not load eBPF programs.
pub fn check_privileges() -> Result<(), ProbeError> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| effective & (1 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        Ok(())
    } else {
        Err(ProbeError::PermissionDenied)
    }
}

/// Where `child_pid` is in this kernel's sched_process_fork records, from the event's format:
/// the kernel object reads it at one of the two offsets kernels have used.
fn fork_child_pid_offset() -> Result<u32, ProbeError> {
    let path = format!("{TRACEFS}/events/sched/sched_process_fork/format");
    let format = std::fs::read_to_string(&path).unwrap_or_default();
    let offset = child_pid_offset(&format);
    offset
        .filter(|offset| KNOWN_FORK_CHILD_PID_OFFSETS.contains(offset))
        .ok_or_else(|| ProbeError::UnknownForkLayout {
            path,
            offset: offset.map_or_else(|| "none".to_owned(), |offset| offset.to_string()),
        })
}

/// `child_pid` after `__data_loc` comm fields (4 bytes each), or after `char[16]` ones.
const KNOWN_FORK_CHILD_PID_OFFSETS: [u32; 2] =
    [apitoolkit_common::DEFAULT_FORK_CHILD_PID_OFFSET, 44];

/// The offset of the `child_pid` field in a tracepoint format description.
fn child_pid_offset(format: &str) -> Option<u32> {
    let line = format.lines().find(|line| line.contains(" child_pid;"))?;
    let offset = line
        .split(';')
        .find_map(|part| part.trim().strip_prefix("offset:"))?;
    offset.trim().parse().ok()
}

/// Mounts tracefs when nothing is mounted there yet (fresh machines and minimal containers).
pub fn ensure_tracefs() -> Result<(), ProbeError> {
    if Path::new(TRACEFS).join("events").exists() {
        return Ok(());
    }
    let target = CString::new(TRACEFS).expect("static path has no NUL");
    let fstype = CString::new("tracefs").expect("static string has no NUL");
    // SAFETY: plain mount(2) with valid NUL-terminated strings and no data argument.
    let result = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if result != 0 {
        return Err(ProbeError::Tracefs(io::Error::last_os_error()));
    }
    tracing::info!(path = TRACEFS, "mounted tracefs");
    Ok(())
}

/// Per-cause counts of events the kernel side could not deliver.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelLosses {
    pub ringbuf_full: u64,
    pub conn_table_full: u64,
    pub inflight_table_full: u64,
    pub user_read_failed: u64,
    pub tls_unmapped: u64,
    pub stderr_yielded: u64,
}

/// What the kernel programs select and capture on their own. Fixed at load: they are read-only
/// globals of the programs, which the verifier sees as constants.
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelSwitches {
    /// Send what target threads write to stderr (for error reports).
    pub capture_stderr: bool,
    /// Every process but the agent is a target.
    pub select_all: bool,
    /// The processes of the cgroups given to [`Probes::select_cgroups`] are targets.
    pub select_cgroups: bool,
}

pub struct Probes {
    ebpf: Ebpf,
    watched: WatchedFlags,
    /// The value of [`maps::DISABLED_EPOCH`]: updates of [`maps::DISABLED`] so far.
    disabled_epoch: u64,
    /// The SSL uprobe programs passed the verifier and can be attached.
    tls_loaded: bool,
    /// So did the Go programs (loaded apart: a verifier refusing them costs OpenSSL nothing).
    go_loaded: bool,
}

impl Probes {
    /// Loads and attaches everything; the event ring buffer gets `ring_buffer_bytes` (a power
    /// of two, at least a page).
    pub fn load(ring_buffer_bytes: u32, switches: KernelSwitches) -> Result<Self, ProbeError> {
        check_privileges()?;
        ensure_tracefs()?;
        // No kernel BTF in the agent: the programs need no CO-RE relocations (the verifier uses
        // the kernel's own BTF for the one BTF pointer they follow, the entry registers), and
        // parsing vmlinux's 5 MiB of BTF would cost the agent tens of MiB at every start.
        let watched_entries = watched::entries(watched::capacity());
        let mut ebpf = EbpfLoader::new()
            .btf(None)
            .map_max_entries(maps::EVENTS, ring_buffer_bytes)
            .override_global(globals::RING_BUFFER_BYTES, &ring_buffer_bytes, true)
            .override_global(
                globals::FORK_CHILD_PID_OFFSET,
                &fork_child_pid_offset()?,
                true,
            )
            .override_global(
                globals::CAPTURE_STDERR,
                &u32::from(switches.capture_stderr),
                true,
            )
            .override_global(globals::SELECT_ALL, &u32::from(switches.select_all), true)
            .override_global(
                globals::SELECT_CGROUPS,
                &u32::from(switches.select_cgroups),
                true,
            )
            .override_global(globals::AGENT_TGID, &std::process::id(), true)
            .map_max_entries(maps::WATCHED, watched_entries)
            .load(KERNEL_OBJECT)
            .map_err(|error| missing("BPF maps and programs (bpf syscall, ring buffer)", error))?;
        let watched = match ebpf.map(maps::WATCHED) {
            Some(aya::maps::Map::Array(data)) => WatchedFlags::map(data.fd(), watched_entries)
                .map_err(|error| missing("a memory-mapped BPF array (Linux 5.5)", error))?,
            _ => unreachable!("WATCHED is an array of the kernel object"),
        };
        for (program, category, events) in TRACEPOINTS {
            let tracepoint: &mut TracePoint = ebpf
                .program_mut(program)
                .expect("program is defined in the kernel object")
                .try_into()
                .expect("program is a tracepoint");
            tracepoint
                .load()
                .map_err(|error| missing(format!("tracepoint program {program}"), error))?;
            for event in *events {
                tracepoint
                    .attach(category, event)
                    .map_err(|error| missing(format!("tracepoint {category}:{event}"), error))?;
            }
        }
        let ssl_programs = SSL_PROGRAMS
            .iter()
            .map(|(_, program)| *program)
            .chain([SSL_CALL_RETURN]);
        let tls_loaded = match load_uprobes(&mut ebpf, ssl_programs) {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(%error, "TLS uprobes cannot be loaded: HTTPS is not captured");
                false
            }
        };
        let go_loaded = match load_uprobes(&mut ebpf, GO_PROGRAMS) {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(%error, "Go uprobes cannot be loaded: Go's crypto/tls is not captured");
                false
            }
        };
        Ok(Self {
            ebpf,
            watched,
            disabled_epoch: 0,
            tls_loaded,
            go_loaded,
        })
    }

    /// The SSL uprobe programs loaded, so TLS libraries can be probed.
    pub fn tls_available(&self) -> bool {
        self.tls_loaded
    }

    fn uprobe(&mut self, program: &str) -> &mut UProbe {
        uprobe(&mut self.ebpf, program)
    }

    /// Attaches the SSL entry and return programs at `functions` (name, file offset) of the
    /// library at `path`, for every process: the programs filter on the target set, so one
    /// attachment serves all processes that share the file.
    pub fn attach_tls(
        &mut self,
        path: &Path,
        functions: &[(&'static str, u64)],
    ) -> Result<(), ProbeError> {
        if !self.tls_loaded {
            return Err(ProbeError::TlsUnavailable);
        }
        let sites = functions.iter().flat_map(|&(function, offset)| {
            let entry = SSL_PROGRAMS
                .iter()
                .find(|(name, _)| *name == function)
                .map(|(_, program)| *program)
                .expect("offsets are only looked up for SSL_PROGRAMS");
            [entry, SSL_CALL_RETURN].map(|program| {
                let location = UProbeAttachLocation::AbsoluteOffset(offset);
                (program, function, location.into())
            })
        });
        self.attach_all_or_none(sites.collect(), path)
    }

    /// Attaches the Go programs to the executable at `path` where `plan` says: crypto/tls, and
    /// goroutine creation and net/http client round trips where the plan has them. Each gets
    /// the executable's struct layout as its cookie.
    pub fn attach_go(&mut self, path: &Path, plan: &GoTlsPlan) -> Result<(), ProbeError> {
        if !self.go_loaded {
            return Err(ProbeError::TlsUnavailable);
        }
        let mut sites = vec![(GO_TLS_WRITE_ENTER, go::TLS_WRITE, plan.write_entry, 0)];
        match &plan.read {
            ReadSites::Copy {
                call,
                receiver_slot,
            } => sites.push((GO_TLS_READ_COPY, go::TLS_READ, *call, *receiver_slot)),
            ReadSites::EntryAndReturns { entry, returns } => {
                sites.push((GO_TLS_READ_ENTER, go::TLS_READ, *entry, 0));
                sites.extend(
                    returns
                        .iter()
                        .map(|offset| (GO_TLS_READ_RETURN, go::TLS_READ, *offset, 0)),
                );
            }
        }
        if let Ok(links) = &plan.links {
            sites.push((
                GO_NEWPROC1_CALL,
                go::NEWPROC_CLOSURE,
                links.newproc1_call,
                0,
            ));
            sites.push((GO_RUNQPUT_CALL, go::NEWPROC_CLOSURE, links.runqput_call, 0));
            if let Some(client) = &links.client {
                sites.push((GO_ROUND_TRIP_ENTER, go::ROUND_TRIP, client.round_trip, 0));
                let [read_loop, write_loop] = client.loops;
                sites.push((GO_CONN_LOOP_ENTER, go::READ_LOOP, read_loop, 0));
                sites.push((GO_CONN_LOOP_ENTER, go::WRITE_LOOP, write_loop, 0));
            }
        }
        let sites = sites
            .into_iter()
            .map(|(program, function, offset, receiver_slot)| {
                let point = UProbeAttachPoint {
                    location: UProbeAttachLocation::AbsoluteOffset(offset),
                    cookie: Some(plan.layout.cookie(receiver_slot)),
                };
                (program, function, point)
            })
            .collect();
        self.attach_all_or_none(sites, path)
    }

    /// Attaches each `(program, function, point)` to the file at `path`, for every process (the
    /// programs filter on the target set, so one attachment serves all processes that share
    /// the file). All or none: an entry probed without its return, or a `Read` at its entry but
    /// not at every `ret`, would lose bytes without a gap.
    fn attach_all_or_none(
        &mut self,
        sites: Vec<(&'static str, &'static str, UProbeAttachPoint<'_>)>,
        path: &Path,
    ) -> Result<(), ProbeError> {
        let mut attached = Vec::new();
        for (program, function, point) in sites {
            match self
                .uprobe(program)
                .attach(point, path, UProbeScope::AllProcesses)
            {
                Ok(link) => attached.push((program, link)),
                Err(source) => {
                    for (program, link) in attached {
                        let _ = self.uprobe(program).detach(link);
                    }
                    return Err(ProbeError::Uprobe {
                        program,
                        function,
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    /// The map `name` of the kernel object as the typed map `T`.
    fn map<'a, T>(&'a mut self, name: &'static str) -> Result<T, ProbeError>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
    {
        let map = self
            .ebpf
            .map_mut(name)
            .expect("map is defined in the kernel object");
        T::try_from(map).map_err(in_map(name))
    }

    /// Makes the processes of these cgroups (v2 ids) targets, in the kernel (loaded with
    /// [`KernelSwitches::select_cgroups`]).
    pub fn select_cgroups(&mut self, ids: &[u64]) -> Result<(), ProbeError> {
        let mut cgroups: HashMap<_, u64, u8> = self.map(maps::CGROUP_TARGETS)?;
        for id in ids {
            cgroups
                .insert(id, 1, 0)
                .map_err(in_map(maps::CGROUP_TARGETS))?;
        }
        Ok(())
    }

    /// Makes a process that binds one of these ports a target at once, in the kernel.
    pub fn select_ports(&mut self, ports: &[u16]) -> Result<(), ProbeError> {
        let mut targets: HashMap<_, u16, u8> = self.map(maps::PORT_TARGETS)?;
        for port in ports {
            targets
                .insert(port, 1, 0)
                .map_err(in_map(maps::PORT_TARGETS))?;
        }
        Ok(())
    }

    /// Makes a process that executes one of these programs (by file name) a target at once,
    /// in the kernel.
    pub fn select_exes(&mut self, exes: &[String]) -> Result<(), ProbeError> {
        let mut targets: HashMap<_, [u8; COMM_LEN], u8> = self.map(maps::EXE_TARGETS)?;
        for exe in exes {
            targets
                .insert(exe_comm(exe), 1, 0)
                .map_err(in_map(maps::EXE_TARGETS))?;
        }
        Ok(())
    }

    /// Stops capturing processes the kernel selected that /proc did not confirm.
    pub fn remove_targets(&mut self, pids: &[u32]) -> Result<(), ProbeError> {
        for &pid in pids {
            if self.watched.set(pid, false) {
                continue;
            }
            let mut targets: HashMap<_, u32, u8> = self.map(maps::TARGETS)?;
            // The process may have exited meanwhile, and the kernel removed it already.
            match targets.remove(&pid) {
                Err(MapError::SyscallError(error))
                    if error.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                result => result.map_err(in_map(maps::TARGETS))?,
            }
        }
        Ok(())
    }

    pub fn add_targets(&mut self, pids: &[u32]) -> Result<(), ProbeError> {
        for &pid in pids {
            if !self.watched.set(pid, true) {
                let mut targets: HashMap<_, u32, u8> = self.map(maps::TARGETS)?;
                targets.insert(pid, 1, 0).map_err(in_map(maps::TARGETS))?;
            }
        }
        Ok(())
    }

    /// Makes the kernel capture a connection that predates the agent (read/write on an fd it
    /// never saw accepted or connected are otherwise ignored as possible file I/O).
    pub fn register_connection(
        &mut self,
        tgid: u32,
        fd: i32,
        generation: u64,
    ) -> Result<bool, ProbeError> {
        /// Insert only if absent (`BPF_NOEXIST`).
        const NO_EXIST: u64 = 1;
        let mut connections: HashMap<_, u64, ConnState> = self.map(maps::CONNECTIONS)?;
        let state = ConnState {
            generation,
            ..ConnState::default()
        };
        // A connection the kernel already follows (accepted after a kernel-side selection)
        // keeps its state: returns false.
        match connections.insert(conn_key(tgid, fd), state, NO_EXIST) {
            Ok(()) => Ok(true),
            Err(MapError::SyscallError(error))
                if error.io_error.raw_os_error() == Some(libc::EEXIST) =>
            {
                Ok(false)
            }
            Err(error) => Err(in_map(maps::CONNECTIONS)(error)),
        }
    }

    /// Stops the kernel from sending this connection generation's bytes from `source`.
    pub fn disable(&mut self, conn: ConnId, source: Source) -> Result<(), ProbeError> {
        let mut disabled: HashMap<_, u64, Disabled> = self.map(maps::DISABLED)?;
        let key = conn_key(conn.tgid, conn.fd);
        let sources = match disabled.get(&key, 0) {
            Ok(entry) if entry.generation == conn.generation => entry.sources,
            _ => 0,
        };
        let entry = Disabled {
            generation: conn.generation,
            sources: sources | source.bit(),
            _pad: 0,
        };
        disabled
            .insert(key, entry, 0)
            .map_err(in_map(maps::DISABLED))?;
        // After the entry: a program that read the old epoch may have missed the entry, and
        // looks again at its next call because the epoch moved.
        self.disabled_epoch += 1;
        let value = self.disabled_epoch;
        let mut epoch: Array<_, u64> = self.map(maps::DISABLED_EPOCH)?;
        epoch.set(0, value, 0).map_err(in_map(maps::DISABLED_EPOCH))
    }

    pub fn take_ring_buffer(&mut self) -> Result<RingBuf<MapData>, ProbeError> {
        let map = self
            .ebpf
            .take_map(maps::EVENTS)
            .expect("map is defined in the kernel object");
        RingBuf::try_from(map).map_err(in_map(maps::EVENTS))
    }

    pub fn losses(&mut self) -> Result<KernelLosses, ProbeError> {
        let counters: PerCpuArray<_, u64> = self.map(maps::COUNTERS)?;
        let total = |counter: Counter| -> Result<u64, ProbeError> {
            let values = counters
                .get(&(counter as u32), 0)
                .map_err(in_map(maps::COUNTERS))?;
            Ok(values.iter().sum())
        };
        Ok(KernelLosses {
            ringbuf_full: total(Counter::RingbufFull)?,
            conn_table_full: total(Counter::ConnTableFull)?,
            inflight_table_full: total(Counter::InflightTableFull)?,
            user_read_failed: total(Counter::ReadFailed)?,
            tls_unmapped: total(Counter::TlsUnmapped)?,
            stderr_yielded: total(Counter::StderrYielded)?,
        })
    }
}

/// How an operation on the map `name` failed.
fn in_map(name: &'static str) -> impl Fn(MapError) -> ProbeError {
    move |source| ProbeError::Map { name, source }
}

fn uprobe<'a>(ebpf: &'a mut Ebpf, program: &str) -> &'a mut UProbe {
    ebpf.program_mut(program)
        .expect("program is defined in the kernel object")
        .try_into()
        .expect("program is a uprobe")
}

fn load_uprobes(
    ebpf: &mut Ebpf,
    programs: impl IntoIterator<Item = &'static str>,
) -> Result<(), ProbeError> {
    for program in programs {
        uprobe(ebpf, program)
            .load()
            .map_err(|error| missing(format!("uprobe program {program}"), error))?;
    }
    Ok(())
}

/// The kernel's wake-ups of the ring buffer, watched edge-triggered: records already in the
/// ring do not end a wait, so they accumulate between drains until the kernel wakes the agent
/// (it does so only once the ring is filling) or the timeout passes.
pub struct RingWakeups {
    epoll: OwnedFd,
}

impl RingWakeups {
    pub fn new(ring: &RingBuf<MapData>) -> io::Result<Self> {
        // SAFETY: epoll_create1 takes no pointers; a non-negative result is a new fd we own.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epoll < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `epoll` was just created and is owned by nothing else.
        let epoll = unsafe { OwnedFd::from_raw_fd(epoll) };
        let mut interest = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLET) as u32,
            u64: 0,
        };
        // SAFETY: both fds are open for the call and `interest` is a valid epoll_event.
        let added = unsafe {
            libc::epoll_ctl(
                epoll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                ring.as_raw_fd(),
                &mut interest,
            )
        };
        if added != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { epoll })
    }

    /// Waits for a wake-up or `timeout_ms`; a signal ends the wait early.
    pub fn wait(&self, timeout_ms: i32) -> io::Result<()> {
        let mut ready = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: room for exactly one event, valid for the duration of the call.
        let result = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), &mut ready, 1, timeout_ms) };
        if result < 0 {
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(error);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use object::{Object as _, ObjectSymbol as _};

    use super::*;

    #[test]
    fn child_pid_is_found_in_both_fork_formats() {
        let data_loc = "\tfield:__data_loc char[] child_comm;\toffset:16;\tsize:4;\tsigned:0;\n\
                        \tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;\n";
        let fixed = "\tfield:char child_comm[16];\toffset:28;\tsize:16;\tsigned:0;\n\
                     \tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;\n";
        assert_eq!(child_pid_offset(data_loc), Some(20));
        assert_eq!(child_pid_offset(fixed), Some(44));
        assert_eq!(
            child_pid_offset("\tfield:pid_t parent_pid;\toffset:12;\n"),
            None
        );
        for offset in [child_pid_offset(data_loc), child_pid_offset(fixed)] {
            assert!(KNOWN_FORK_CHILD_PID_OFFSETS.contains(&offset.unwrap()));
        }
        // This kernel's own format names an offset the kernel object reads.
        assert!(fork_child_pid_offset().is_ok() || !Path::new(TRACEFS).join("events").exists());
    }

    #[test]
    fn the_kernel_object_defines_every_map_program_and_global_userspace_names() {
        let object = object::File::parse(KERNEL_OBJECT).unwrap();
        let symbols: HashSet<&str> = object
            .symbols()
            .filter_map(|symbol| symbol.name().ok())
            .collect();
        let programs = TRACEPOINTS
            .iter()
            .map(|(program, ..)| *program)
            .chain(SSL_PROGRAMS.iter().map(|(_, program)| *program))
            .chain([SSL_CALL_RETURN])
            .chain(GO_PROGRAMS);
        let used_maps = [
            maps::EVENTS,
            maps::CGROUP_TARGETS,
            maps::PORT_TARGETS,
            maps::EXE_TARGETS,
            maps::WATCHED,
            maps::TARGETS,
            maps::CONNECTIONS,
            maps::DISABLED,
            maps::DISABLED_EPOCH,
            maps::COUNTERS,
        ];
        let set_globals = [
            globals::RING_BUFFER_BYTES,
            globals::FORK_CHILD_PID_OFFSET,
            globals::CAPTURE_STDERR,
            globals::SELECT_ALL,
            globals::SELECT_CGROUPS,
            globals::AGENT_TGID,
        ];
        for name in programs.chain(used_maps).chain(set_globals) {
            assert!(symbols.contains(name), "{name} is not in the kernel object");
        }
    }
}
