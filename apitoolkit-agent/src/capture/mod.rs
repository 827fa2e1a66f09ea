//! Loads the kernel object, attaches its programs, and owns the maps userspace talks through:
//! the target set, disabled connections, the event ring buffer and the loss counters.

pub mod preflight;

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, RawFd},
    path::Path,
};

use apitoolkit_common::{
    CONFIG_AGENT_TGID, CONFIG_CAPTURE_STDERR, CONFIG_SELECT_ALL, CONFIG_SELECT_CGROUPS,
    COUNTER_CONN_TABLE_FULL, COUNTER_INFLIGHT_TABLE_FULL, COUNTER_READ_FAILED,
    COUNTER_RINGBUF_FULL, COUNTER_TLS_UNMAPPED, ConnState, Disabled, conn_key, source_bit,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        TracePoint, UProbe,
        uprobe::{UProbeAttachLocation, UProbeScope},
    },
};

use crate::pipeline::events::{ConnId, Source};

/// The return program shared by every SSL function.
const SSL_RETURN_PROGRAM: &str = "ssl_call_return";

const TRACEFS: &str = "/sys/kernel/tracing";

/// Tracepoints by program: (program, category, event names).
const TRACEPOINTS: &[(&str, &str, &[&str])] = &[
    (
        "enter_buffer_call",
        "syscalls",
        &["sys_enter_read", "sys_enter_write"],
    ),
    (
        "enter_socket_buffer_call",
        "syscalls",
        &["sys_enter_recvfrom", "sys_enter_sendto"],
    ),
    (
        "enter_iovec_call",
        "syscalls",
        &["sys_enter_readv", "sys_enter_writev"],
    ),
    (
        "enter_msghdr_call",
        "syscalls",
        &["sys_enter_recvmsg", "sys_enter_sendmsg"],
    ),
    ("enter_sendfile", "syscalls", &["sys_enter_sendfile64"]),
    (
        "enter_accept",
        "syscalls",
        &["sys_enter_accept", "sys_enter_accept4"],
    ),
    ("enter_connect", "syscalls", &["sys_enter_connect"]),
    (
        "exit_ingress_call",
        "syscalls",
        &[
            "sys_exit_read",
            "sys_exit_readv",
            "sys_exit_recvfrom",
            "sys_exit_recvmsg",
        ],
    ),
    (
        "exit_egress_call",
        "syscalls",
        &[
            "sys_exit_write",
            "sys_exit_writev",
            "sys_exit_sendto",
            "sys_exit_sendmsg",
            "sys_exit_sendfile64",
        ],
    ),
    (
        "exit_accept_or_connect",
        "syscalls",
        &["sys_exit_accept", "sys_exit_accept4", "sys_exit_connect"],
    ),
    ("enter_getsockopt", "syscalls", &["sys_enter_getsockopt"]),
    ("exit_getsockopt", "syscalls", &["sys_exit_getsockopt"]),
    ("enter_close", "syscalls", &["sys_enter_close"]),
    ("process_fork", "sched", &["sched_process_fork"]),
    ("process_exit", "sched", &["sched_process_exit"]),
];

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
}

pub struct Probes {
    ebpf: Ebpf,
    /// The SSL uprobe programs passed the verifier and can be attached.
    tls_loaded: bool,
}

impl Probes {
    /// Loads and attaches everything; the event ring buffer gets `ring_buffer_bytes` (a power
    /// of two, at least a page).
    pub fn load(ring_buffer_bytes: u32) -> Result<Self, ProbeError> {
        check_privileges()?;
        ensure_tracefs()?;
        // No kernel BTF: the programs read no kernel structs (no CO-RE relocations), and parsing
        // vmlinux's 5 MiB of BTF would cost the agent tens of MiB of memory at every start.
        let mut ebpf = EbpfLoader::new()
            .btf(None)
            .map_max_entries("EVENTS", ring_buffer_bytes)
            .load(aya::include_bytes_aligned!(concat!(
                env!("OUT_DIR"),
                "/apitoolkit"
            )))
            .map_err(|error| missing("BPF maps and programs (bpf syscall, ring buffer)", error))?;
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
        let tls_loaded = match load_tls_programs(&mut ebpf) {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(%error, "TLS uprobes cannot be loaded: HTTPS is not captured");
                false
            }
        };
        Ok(Self { ebpf, tls_loaded })
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
        for &(function, offset) in functions {
            let entry = crate::targets::tls::SSL_FUNCTIONS
                .iter()
                .find(|(name, _)| *name == function)
                .map(|(_, program)| *program)
                .expect("offsets are only looked up for SSL_FUNCTIONS");
            for program in [entry, SSL_RETURN_PROGRAM] {
                self.uprobe(program)
                    .attach(
                        UProbeAttachLocation::AbsoluteOffset(offset),
                        path,
                        UProbeScope::AllProcesses,
                    )
                    .map_err(|source| ProbeError::Uprobe {
                        program,
                        function,
                        source,
                    })?;
            }
        }
        Ok(())
    }

    fn map_mut(&mut self, name: &'static str) -> &mut aya::maps::Map {
        self.ebpf
            .map_mut(name)
            .expect("map is defined in the kernel object")
    }

    fn set_config(&mut self, index: u32, value: u32) -> Result<(), ProbeError> {
        let map_error = |source| ProbeError::Map {
            name: "CONFIG",
            source,
        };
        let mut config: Array<_, u32> =
            Array::try_from(self.map_mut("CONFIG")).map_err(map_error)?;
        config.set(index, value, 0).map_err(map_error)
    }

    /// Makes the kernel send what target threads write to stderr (for error reports).
    pub fn capture_stderr(&mut self, enabled: bool) -> Result<(), ProbeError> {
        self.set_config(CONFIG_CAPTURE_STDERR, u32::from(enabled))
    }

    /// Makes every process but the agent a target, in the kernel.
    pub fn select_all(&mut self) -> Result<(), ProbeError> {
        self.set_config(CONFIG_AGENT_TGID, std::process::id())?;
        self.set_config(CONFIG_SELECT_ALL, 1)
    }

    /// Makes the processes of these cgroups (v2 ids) targets, in the kernel.
    pub fn select_cgroups(&mut self, ids: &[u64]) -> Result<(), ProbeError> {
        let map_error = |source| ProbeError::Map {
            name: "CGROUP_TARGETS",
            source,
        };
        let mut cgroups: HashMap<_, u64, u8> =
            HashMap::try_from(self.map_mut("CGROUP_TARGETS")).map_err(map_error)?;
        for id in ids {
            cgroups.insert(id, 1, 0).map_err(map_error)?;
        }
        self.set_config(CONFIG_SELECT_CGROUPS, 1)
    }

    pub fn add_targets(&mut self, pids: &[u32]) -> Result<(), ProbeError> {
        let mut targets: HashMap<_, u32, u8> =
            HashMap::try_from(self.map_mut("TARGETS")).map_err(|source| ProbeError::Map {
                name: "TARGETS",
                source,
            })?;
        for pid in pids {
            targets
                .insert(pid, 1, 0)
                .map_err(|source| ProbeError::Map {
                    name: "TARGETS",
                    source,
                })?;
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
    ) -> Result<(), ProbeError> {
        let mut connections: HashMap<_, u64, ConnState> =
            HashMap::try_from(self.map_mut("CONNECTIONS")).map_err(|source| ProbeError::Map {
                name: "CONNECTIONS",
                source,
            })?;
        let state = ConnState {
            generation,
            ..ConnState::default()
        };
        connections
            .insert(conn_key(tgid, fd), state, 0)
            .map_err(|source| ProbeError::Map {
                name: "CONNECTIONS",
                source,
            })
    }

    /// Stops the kernel from sending this connection generation's bytes from `source`.
    pub fn disable(&mut self, conn: ConnId, source: Source) -> Result<(), ProbeError> {
        let map_error = |source| ProbeError::Map {
            name: "DISABLED",
            source,
        };
        let mut disabled: HashMap<_, u64, Disabled> =
            HashMap::try_from(self.map_mut("DISABLED")).map_err(map_error)?;
        let key = conn_key(conn.tgid, conn.fd);
        let sources = match disabled.get(&key, 0) {
            Ok(entry) if entry.generation == conn.generation => entry.sources,
            _ => 0,
        };
        let source = match source {
            Source::Syscall => apitoolkit_common::SOURCE_SYSCALL,
            Source::Tls => apitoolkit_common::SOURCE_TLS,
            Source::Stderr => apitoolkit_common::SOURCE_STDERR,
        };
        let entry = Disabled {
            generation: conn.generation,
            sources: sources | source_bit(source),
            _pad: 0,
        };
        disabled.insert(key, entry, 0).map_err(map_error)
    }

    pub fn take_ring_buffer(&mut self) -> Result<RingBuf<MapData>, ProbeError> {
        let map = self
            .ebpf
            .take_map("EVENTS")
            .expect("map is defined in the kernel object");
        RingBuf::try_from(map).map_err(|source| ProbeError::Map {
            name: "EVENTS",
            source,
        })
    }

    pub fn losses(&self) -> Result<KernelLosses, ProbeError> {
        let counters: PerCpuArray<_, u64> = PerCpuArray::try_from(
            self.ebpf
                .map("COUNTERS")
                .expect("map is defined in the kernel object"),
        )
        .map_err(|source| ProbeError::Map {
            name: "COUNTERS",
            source,
        })?;
        let total = |index: u32| -> Result<u64, ProbeError> {
            let values = counters.get(&index, 0).map_err(|source| ProbeError::Map {
                name: "COUNTERS",
                source,
            })?;
            Ok(values.iter().sum())
        };
        Ok(KernelLosses {
            ringbuf_full: total(COUNTER_RINGBUF_FULL)?,
            conn_table_full: total(COUNTER_CONN_TABLE_FULL)?,
            inflight_table_full: total(COUNTER_INFLIGHT_TABLE_FULL)?,
            user_read_failed: total(COUNTER_READ_FAILED)?,
            tls_unmapped: total(COUNTER_TLS_UNMAPPED)?,
        })
    }
}

fn uprobe<'a>(ebpf: &'a mut Ebpf, program: &str) -> &'a mut UProbe {
    ebpf.program_mut(program)
        .expect("program is defined in the kernel object")
        .try_into()
        .expect("program is a uprobe")
}

fn load_tls_programs(ebpf: &mut Ebpf) -> Result<(), ProbeError> {
    let programs = crate::targets::tls::SSL_FUNCTIONS
        .iter()
        .map(|(_, program)| *program)
        .chain([SSL_RETURN_PROGRAM]);
    for program in programs {
        uprobe(ebpf, program)
            .load()
            .map_err(|error| missing(format!("uprobe program {program}"), error))?;
    }
    Ok(())
}

/// Waits until the ring buffer has data or `timeout_ms` passes.
pub fn wait_readable(ring: &RingBuf<MapData>, timeout_ms: i32) -> io::Result<bool> {
    let fd: RawFd = ring.as_raw_fd();
    let mut poll_fd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let ready = unsafe { libc::poll(&mut poll_fd, 1, timeout_ms) };
    match ready {
        -1 => {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(error)
            }
        }
        0 => Ok(false),
        _ => Ok(true),
    }
}
