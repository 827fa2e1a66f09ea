//! `apitoolkit-agent check`: whether this host can run the agent, each requirement with the
//! fix for it when it fails. The decisive check loads and attaches the real programs (with no
//! process selected, so nothing is captured) and detaches them again.

use std::{fmt, fs, path::Path};

use crate::capture::{self, Probes};

/// Oldest kernel with everything the programs use (ring buffer 5.8, `bpf_loop` 5.17).
const MIN_KERNEL: (u32, u32) = (5, 17);
/// Below 5.11 BPF memory is charged to RLIMIT_MEMLOCK; the agent's maps need about this much.
const MEMLOCK_NEEDED: u64 = 64 * 1024 * 1024;
const MEMCG_ACCOUNTING_KERNEL: (u32, u32) = (5, 11);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Works, with less than everything (e.g. no TLS).
    Warn,
    Fail,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad` keeps the table's column widths.
        f.pad(match self {
            Verdict::Pass => "ok",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
        })
    }
}

#[derive(Debug)]
pub struct Check {
    pub name: &'static str,
    pub verdict: Verdict,
    /// What was found, and for a failure how to fix it.
    pub detail: String,
}

fn check(name: &'static str, verdict: Verdict, detail: impl Into<String>) -> Check {
    Check {
        name,
        verdict,
        detail: detail.into(),
    }
}

/// `6.18.0-1-amd64` -> (6, 18).
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|part| !part.is_empty());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|release| release.trim().to_owned())
        .unwrap_or_default()
}

fn kernel_check(release: &str) -> Check {
    match kernel_version(release) {
        Some(version) if version >= MIN_KERNEL => check("kernel", Verdict::Pass, release),
        Some(_) => check(
            "kernel",
            Verdict::Fail,
            format!(
                "{release}: needs Linux {}.{} or newer (ring buffer, bpf_loop)",
                MIN_KERNEL.0, MIN_KERNEL.1
            ),
        ),
        None => check(
            "kernel",
            Verdict::Fail,
            format!("cannot read the kernel version ({release:?})"),
        ),
    }
}

fn memlock_check(release: &str) -> Check {
    if kernel_version(release).is_some_and(|version| version >= MEMCG_ACCOUNTING_KERNEL) {
        return check(
            "memlock",
            Verdict::Pass,
            "BPF memory is charged to the cgroup (Linux ≥ 5.11): RLIMIT_MEMLOCK does not apply",
        );
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid resource and out pointer.
    unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) };
    if limit.rlim_cur == libc::RLIM_INFINITY || limit.rlim_cur >= MEMLOCK_NEEDED {
        check("memlock", Verdict::Pass, "RLIMIT_MEMLOCK is high enough")
    } else {
        check(
            "memlock",
            Verdict::Fail,
            format!(
                "RLIMIT_MEMLOCK is {} KiB: raise it (`ulimit -l unlimited`, systemd \
                 LimitMEMLOCK=infinity)",
                limit.rlim_cur / 1024
            ),
        )
    }
}

fn file_check(name: &'static str, path: &str, missing: Verdict, fix: &str) -> Check {
    if Path::new(path).exists() {
        check(name, Verdict::Pass, path)
    } else {
        check(name, missing, format!("{path} missing: {fix}"))
    }
}

/// Every check, in the order they are printed.
pub fn run() -> Vec<Check> {
    let release = kernel_release();
    let mut checks = vec![
        kernel_check(&release),
        file_check(
            "BTF",
            "/sys/kernel/btf/vmlinux",
            Verdict::Fail,
            "the syscall exit programs read the registers a syscall was entered with through \
             the kernel's BTF: a kernel built with CONFIG_DEBUG_INFO_BTF",
        ),
        memlock_check(&release),
        match capture::check_privileges() {
            Ok(()) => check("privileges", Verdict::Pass, "CAP_BPF + CAP_PERFMON or root"),
            Err(error) => check("privileges", Verdict::Fail, error.to_string()),
        },
        match capture::ensure_tracefs() {
            Ok(()) => check("tracefs", Verdict::Pass, "/sys/kernel/tracing"),
            Err(error) => check(
                "tracefs",
                Verdict::Fail,
                format!("{error}: mount it (`mount -t tracefs nodev /sys/kernel/tracing`)"),
            ),
        },
        file_check(
            "uprobes",
            "/sys/bus/event_source/devices/uprobe",
            Verdict::Warn,
            "kernel without CONFIG_UPROBE_EVENTS: HTTPS is not captured",
        ),
    ];
    checks.push(match Probes::load(
        capture::DEFAULT_RING_BUFFER_BYTES,
        // The largest programs: the switches are constants the verifier prunes by, so what
        // `check` passes must include every branch the agent may load.
        capture::KernelSwitches {
            capture_stderr: true,
            select_all: false,
            select_cgroups: true,
        },
    ) {
        Ok(probes) if probes.tls_available() => check(
            "eBPF programs",
            Verdict::Pass,
            "loaded and attached (syscall tracepoints, ring buffer, SSL uprobes)",
        ),
        Ok(_) => check(
            "eBPF programs",
            Verdict::Warn,
            "syscall capture works; the SSL uprobe programs do not load, so HTTPS is not captured",
        ),
        Err(error) => check("eBPF programs", Verdict::Fail, error.to_string()),
    });
    checks
}

/// The checks as a table; the agent can run when nothing failed.
pub fn report(checks: &[Check]) -> (String, bool) {
    let mut table = String::new();
    for check in checks {
        table.push_str(&format!(
            "{:<15} {:<5} {}\n",
            check.name, check.verdict, check.detail
        ));
    }
    let ok = checks.iter().all(|check| check.verdict != Verdict::Fail);
    (table, ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_are_read_from_distribution_releases() {
        assert_eq!(kernel_version("6.18.0-1-amd64"), Some((6, 18)));
        assert_eq!(kernel_version("5.15.0-1051-aws"), Some((5, 15)));
        assert_eq!(kernel_version("garbage"), None);
        assert_eq!(kernel_check("5.4.0-150-generic").verdict, Verdict::Fail);
        assert!(kernel_check("5.4.0-150-generic").detail.contains("5.17"));
        assert_eq!(kernel_check("6.1.0").verdict, Verdict::Pass);
    }

    #[test]
    fn the_report_fails_only_on_failures() {
        let checks = vec![
            check("a", Verdict::Pass, "fine"),
            check("b", Verdict::Warn, "partly"),
        ];
        let (table, ok) = report(&checks);
        assert!(ok);
        assert_eq!(table.lines().count(), 2);
        assert!(
            table
                .lines()
                .nth(1)
                .unwrap()
                .starts_with("b               warn  partly")
        );
        let (_, ok) = report(&[check("c", Verdict::Fail, "broken")]);
        assert!(!ok);
    }
}
