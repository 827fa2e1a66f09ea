//! Finds the OpenSSL-compatible TLS libraries target processes use — a shared `libssl`, or an
//! executable that links one statically and exports its symbols (node) — and attaches the SSL
//! uprobes once per library file. Rescans pick up libraries loaded later (dlopen) and new
//! processes; each process's TLS visibility is logged whenever it changes.

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use apitoolkit_common::programs::SSL_PROGRAMS;
use iced_x86::Register;

use super::{
    elf::ElfFile,
    go::{self, GoTlsRefusal},
    probe_site::{self, Execution},
};
use crate::capture::Probes;

/// Bytes of a function decoded to find its first call.
const DECODED_BYTES: usize = 256;

/// What a file mapped by a target process is, as far as TLS capture goes.
#[derive(Clone, Debug, PartialEq, Eq)]
enum FileKind {
    /// SSL uprobes are attached to it.
    Probed,
    /// It exports the SSL functions but attaching failed (logged when it happened).
    Unprobeable,
    /// A Go executable: its crypto/tls probed, or why not.
    Go(GoTls),
    Other,
}

/// What became of a Go executable's crypto/tls.
#[derive(Clone, Debug, PartialEq, Eq)]
enum GoTls {
    /// Probed; the Go version.
    Probed(String),
    Refused(GoTlsRefusal),
    /// Attaching failed (logged when it happened).
    Unprobeable,
}

/// Per process: the probed TLS libraries (paths inside the process), and its Go crypto/tls.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct ProcessTls {
    probed: Vec<String>,
    unprobeable: Vec<String>,
    go: Option<GoTls>,
}

#[derive(Default)]
pub struct TlsWatcher {
    /// By (device, inode), so a library shared by many processes is inspected and probed once.
    files: HashMap<(u64, u64), FileKind>,
    reported: HashMap<u32, ProcessTls>,
}

/// Files worth inspecting for `pid`: its executable and every mapped `libssl*`, as paths
/// inside the process's mount namespace.
fn candidate_files(exe: Option<&str>, maps: &str) -> Vec<String> {
    let mut files: Vec<String> = exe.map(str::to_owned).into_iter().collect();
    for path in maps
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
    {
        let name = path.rsplit('/').next().unwrap_or(path);
        if path.starts_with('/') && name.starts_with("libssl") && !files.iter().any(|f| f == path) {
            files.push(path.to_owned());
        }
    }
    files
}

/// The SSL functions of a library that are worth probing, or `None` if it is no TLS library.
fn probe_points(mut functions: Vec<(&'static str, u64)>) -> Option<Vec<(&'static str, u64)>> {
    let has = |functions: &[(&str, u64)], name: &str| functions.iter().any(|(f, _)| *f == name);
    if !has(&functions, "SSL_read") || !has(&functions, "SSL_write") {
        return None;
    }
    if has(&functions, "SSL_write_ex2") {
        functions.retain(|(name, _)| *name != "SSL_write_ex");
    }
    Some(functions)
}

/// Where the SSL functions that move plaintext one way are probed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteReport {
    /// The SSL functions covered, e.g. `SSL_read, SSL_read_ex`.
    pub functions: String,
    /// `None`: at their entries; else the file offset of the internal function they share.
    pub inner: Option<u64>,
    pub execution: Execution,
}

impl std::fmt::Display for SiteReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let execution = match self.execution {
            Execution::Emulated => "emulated",
            Execution::SingleStepped => "single-stepped (a trap per call, ~14 µs on a VM)",
        };
        match self.inner {
            Some(offset) => write!(
                f,
                "{}: the internal function they call (at 0x{offset:x}), {execution}",
                self.functions
            ),
            None => write!(f, "{}: their entries, {execution}", self.functions),
        }
    }
}

/// The probe points of a TLS library and where each kind of call is probed.
#[derive(Debug, PartialEq, Eq)]
pub struct SitePlan {
    /// (SSL function whose entry program runs there, file offset).
    pub points: Vec<(&'static str, u64)>,
    pub sites: Vec<SiteReport>,
}

/// The address and first bytes of the function at file `offset`.
fn function_code(elf: &ElfFile, offset: u64) -> Option<(u64, &[u8])> {
    let address = elf.address_of(offset)?;
    let (_, code) = elf.code(address, DECODED_BYTES)?;
    Some((address, code))
}

/// How a uprobe at the entry of the function at file `offset` runs; single-stepped when its
/// code cannot be read.
fn entry_execution(elf: &ElfFile, offset: u64) -> Execution {
    function_code(elf, offset)
        .and_then(|(address, code)| probe_site::execution(code, address))
        .unwrap_or(Execution::SingleStepped)
}

/// Where to probe one direction's plain function (`SSL_read`) and `_ex` form (`SSL_read_ex`,
/// whose length pointer is in `length_register`). Their entries if the kernel emulates them.
/// Otherwise, where the code proves it, the internal function both call first: the `_ex` form
/// hands it its own arguments untouched (so it takes the `_ex` contract: object, buffer,
/// length, length pointer), the plain form keeps the object and buffer, and its entry is
/// emulated (a `push`). Otherwise the entries after all, single-stepped.
fn plan_direction(
    elf: &ElfFile,
    (plain, plain_offset): (&'static str, u64),
    (ex, ex_offset): (&'static str, u64),
    length_register: Register,
) -> (Vec<(&'static str, u64)>, SiteReport) {
    let entries = vec![(plain, plain_offset), (ex, ex_offset)];
    let function = |offset| function_code(elf, offset);
    let functions = format!("{plain}, {ex}");
    if entries
        .iter()
        .all(|(_, offset)| entry_execution(elf, *offset) == Execution::Emulated)
    {
        let report = SiteReport {
            functions,
            inner: None,
            execution: Execution::Emulated,
        };
        return (entries, report);
    }
    let inner = (|| {
        let (plain_address, plain_code) = function(plain_offset)?;
        let (ex_address, ex_code) = function(ex_offset)?;
        let plain_call = probe_site::first_call(plain_code, plain_address)?;
        let ex_call = probe_site::first_call(ex_code, ex_address)?;
        let proven = plain_call.target == ex_call.target
            && plain_call.preserves(&[Register::RDI, Register::RSI])
            && ex_call.preserves(&[Register::RDI, Register::RSI, Register::RDX, length_register]);
        let (offset, code) = elf.code(ex_call.target, DECODED_BYTES)?;
        let emulated = probe_site::execution(code, ex_call.target) == Some(Execution::Emulated);
        (proven && emulated).then_some(offset)
    })();
    match inner {
        Some(offset) => (
            vec![(ex, offset)],
            SiteReport {
                functions,
                inner: Some(offset),
                execution: Execution::Emulated,
            },
        ),
        None => (
            entries,
            SiteReport {
                functions,
                inner: None,
                execution: Execution::SingleStepped,
            },
        ),
    }
}

/// Where to probe a TLS library, or `None` if it is none: per direction, the cheapest sites
/// the machine code proves right (see [`plan_direction`]).
pub fn plan_sites(elf: &ElfFile) -> Option<SitePlan> {
    let names: Vec<&str> = SSL_PROGRAMS.iter().map(|(name, _)| *name).collect();
    let functions = probe_points(elf.function_offsets(&names))?;
    let find = |name: &str| functions.iter().copied().find(|(f, _)| *f == name);
    let write_ex = find("SSL_write_ex2")
        .map(|function| (function, Register::R8))
        .or_else(|| find("SSL_write_ex").map(|function| (function, Register::RCX)));
    let directions = [
        (
            find("SSL_read"),
            find("SSL_read_ex").map(|f| (f, Register::RCX)),
        ),
        (find("SSL_write"), write_ex),
    ];
    let mut plan = SitePlan {
        points: Vec::new(),
        sites: Vec::new(),
    };
    for direction in directions {
        match direction {
            (Some(plain), Some((ex, length_register))) => {
                let (points, site) = plan_direction(elf, plain, ex, length_register);
                plan.points.extend(points);
                plan.sites.push(site);
            }
            // No `_ex` form (OpenSSL before 1.1.1, BoringSSL): the plain entry as it is.
            (Some(plain), None) => {
                let execution = entry_execution(elf, plain.1);
                plan.points.push(plain);
                plan.sites.push(SiteReport {
                    functions: plain.0.to_owned(),
                    inner: None,
                    execution,
                });
            }
            (None, _) => {}
        }
    }
    Some(plan)
}

/// Directories where distributions keep the shared libssl.
const LIBRARY_DIRS: [&str; 5] = [
    "/usr/lib/x86_64-linux-gnu",
    "/lib/x86_64-linux-gnu",
    "/usr/lib64",
    "/lib64",
    "/usr/lib",
];

/// The TLS libraries of this host, for `check`: every shared `libssl.so.*` in the usual
/// directories and a `node` on the PATH (which links OpenSSL statically), with where each
/// would be probed.
pub fn host_libraries() -> Vec<(PathBuf, SitePlan)> {
    let mut files: Vec<PathBuf> = LIBRARY_DIRS
        .iter()
        .filter_map(|dir| fs::read_dir(dir).ok())
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("libssl.so."))
        })
        .chain(std::env::var_os("PATH").into_iter().flat_map(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("node"))
                .filter(|node| node.is_file())
                .take(1)
                .collect::<Vec<_>>()
        }))
        .filter_map(|path| fs::canonicalize(path).ok())
        .collect();
    files.sort();
    files.dedup();
    files
        .into_iter()
        .filter_map(|path| {
            let plan = plan_sites(&ElfFile::open(&path).ok()?)?;
            Some((path, plan))
        })
        .collect()
}

impl TlsWatcher {
    /// Inspects the processes' mapped files, probes new TLS libraries, and logs each process
    /// whose TLS visibility changed.
    pub fn scan(&mut self, probes: &mut Probes, pids: &[u32]) {
        for &pid in pids {
            let Some(found) = self.scan_process(probes, pid) else {
                continue;
            };
            if self.reported.get(&pid) == Some(&found) {
                continue;
            }
            match &found.go {
                Some(GoTls::Probed(version)) => {
                    tracing::info!(pid, go = %version, "Go crypto/tls probed");
                }
                Some(GoTls::Refused(GoTlsRefusal::NoTls)) => {
                    tracing::info!(pid, "Go binary without crypto/tls: plain HTTP is captured");
                }
                Some(GoTls::Refused(reason)) => {
                    tracing::warn!(
                        pid,
                        %reason,
                        "Go crypto/tls not probed: HTTPS served or called by this process is \
                         not captured (plain HTTP is)"
                    );
                }
                Some(GoTls::Unprobeable) | None => {}
            }
            if !found.probed.is_empty() {
                tracing::info!(pid, libraries = ?found.probed, "TLS plaintext probed");
            } else if found.go.is_none() && found.unprobeable.is_empty() {
                tracing::info!(
                    pid,
                    "no TLS library mapped: plain HTTP is captured; a TLS library loaded later \
                     is picked up"
                );
            }
            if !found.unprobeable.is_empty() {
                tracing::warn!(
                    pid,
                    libraries = ?found.unprobeable,
                    "TLS libraries that could not be probed: their HTTPS is not captured"
                );
            }
            self.reported.insert(pid, found);
        }
    }

    /// Forgets processes no longer watched; a scan of only some processes keeps the others.
    pub fn retain_processes(&mut self, watched: impl Fn(u32) -> bool) {
        self.reported.retain(|pid, _| watched(*pid));
    }

    /// Whether a TLS library of `pid`, or its Go crypto/tls, is probed (as of the last scan).
    pub fn probes(&self, pid: u32) -> bool {
        self.reported.get(&pid).is_some_and(|found| {
            !found.probed.is_empty() || matches!(found.go, Some(GoTls::Probed(_)))
        })
    }

    fn scan_process(&mut self, probes: &mut Probes, pid: u32) -> Option<ProcessTls> {
        let maps = fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
        let exe = fs::read_link(format!("/proc/{pid}/exe")).ok();
        let exe = exe.as_deref().and_then(Path::to_str);
        let root = PathBuf::from(format!("/proc/{pid}/root"));
        let mut found = ProcessTls::default();
        for path in candidate_files(exe, &maps) {
            let host_path = root.join(path.trim_start_matches('/'));
            let Ok(metadata) = fs::metadata(&host_path) else {
                continue;
            };
            let key = (metadata.dev(), metadata.ino());
            let kind = match self.files.get(&key) {
                Some(kind) => kind.clone(),
                None => {
                    let kind = inspect_and_probe(probes, &path, &host_path);
                    self.files.insert(key, kind.clone());
                    kind
                }
            };
            match kind {
                FileKind::Probed => found.probed.push(path),
                FileKind::Unprobeable => found.unprobeable.push(path),
                FileKind::Go(go) => found.go = Some(go),
                FileKind::Other => {}
            }
        }
        Some(found)
    }
}

fn inspect_and_probe(probes: &mut Probes, path: &str, host_path: &Path) -> FileKind {
    let elf = match ElfFile::open(host_path) {
        Ok(elf) => elf,
        Err(error) => {
            tracing::debug!(path, %error, "not inspected for TLS");
            return FileKind::Other;
        }
    };
    if elf.is_go() {
        return FileKind::Go(probe_go(probes, path, host_path, &elf));
    }
    let Some(plan) = plan_sites(&elf) else {
        return FileKind::Other;
    };
    match probes.attach_tls(host_path, &plan.points) {
        Ok(()) => {
            let sites: Vec<String> = plan.sites.iter().map(ToString::to_string).collect();
            tracing::info!(path, sites = ?sites, "SSL probe sites");
            FileKind::Probed
        }
        Err(error) => {
            tracing::warn!(path, %error, "could not attach SSL uprobes");
            FileKind::Unprobeable
        }
    }
}

fn probe_go(probes: &mut Probes, path: &str, host_path: &Path, elf: &ElfFile) -> GoTls {
    let plan = match go::plan(elf) {
        Ok(plan) => plan,
        Err(reason) => return GoTls::Refused(reason),
    };
    match probes.attach_go(host_path, &plan) {
        Ok(()) => {
            tracing::info!(
                path,
                go = %plan.version.text,
                read_entry = format_args!("0x{:x}", plan.read_entry),
                read_returns = plan.read_returns.len(),
                write_entry = format_args!("0x{:x}", plan.write_entry),
                "Go crypto/tls probe sites: entries emulated, returns of Read single-stepped"
            );
            match &plan.links {
                Ok(links) => tracing::info!(
                    path,
                    http_client = links.client.is_some(),
                    "Go goroutine links probed: outgoing calls get the parent_id of the request \
                     whose handler (or a goroutine it started) made them"
                ),
                Err(reason) => tracing::warn!(
                    path,
                    %reason,
                    "Go goroutine links not probed: outgoing calls get no parent_id"
                ),
            }
            GoTls::Probed(plan.version.text)
        }
        Err(error) => {
            tracing::warn!(path, %error, "could not attach the Go crypto/tls uprobes");
            GoTls::Unprobeable
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Debian 12's OpenSSL 3.0 starts SSL_read and friends with `sub $n,%rsp` (single-stepped),
    /// and each calls an internal function that starts with `push`. So does OpenSSL 1.1.1:
    /// `APITOOLKIT_TEST_LIBSSL=/path/to/libssl.so.1.1` checks such a file too (psycopg2-binary's
    /// wheel bundles one).
    #[test]
    fn openssl_is_probed_at_its_internal_functions_and_never_single_stepped() {
        let extra = std::env::var_os("APITOOLKIT_TEST_LIBSSL").map(PathBuf::from);
        let paths = [PathBuf::from("/usr/lib/x86_64-linux-gnu/libssl.so.3")];
        for path in paths.into_iter().chain(extra) {
            let Ok(elf) = ElfFile::open(&path) else {
                continue; // another distribution: the e2e TLS tests cover what it has
            };
            assert_inner_sites(&elf);
        }
    }

    fn assert_inner_sites(elf: &ElfFile) {
        let plan = plan_sites(elf).unwrap();
        assert_eq!(plan.sites.len(), 2);
        for site in &plan.sites {
            assert_eq!(site.execution, Execution::Emulated, "{site}");
            assert!(site.inner.is_some(), "{site}");
        }
        let programs: Vec<&str> = plan.points.iter().map(|(function, _)| *function).collect();
        assert_eq!(programs, ["SSL_read_ex", "SSL_write_ex"]);
        for (_, offset) in &plan.points {
            let address = elf.address_of(*offset).unwrap();
            let (_, code) = elf.code(address, 16).unwrap();
            assert_eq!(
                probe_site::execution(code, address),
                Some(Execution::Emulated)
            );
        }
    }

    #[test]
    fn candidates_are_the_executable_and_mapped_libssl_once_each() {
        let maps = "\
7f0000000000-7f0000001000 r--p 00000000 08:01 11 /usr/lib/x86_64-linux-gnu/libssl.so.3
7f0000001000-7f0000002000 r-xp 00001000 08:01 11 /usr/lib/x86_64-linux-gnu/libssl.so.3
7f0000002000-7f0000003000 r-xp 00001000 08:01 12 /usr/lib/x86_64-linux-gnu/libcrypto.so.3
7f0000003000-7f0000004000 rw-p 00000000 00:00 0 [heap]
7f0000004000-7f0000005000 rw-p 00000000 00:00 0
7f0000005000-7f0000006000 r-xp 00001000 08:01 13 /opt/app/lib/libssl.so.1.1";
        assert_eq!(
            candidate_files(Some("/usr/bin/python3.11"), maps),
            [
                "/usr/bin/python3.11",
                "/usr/lib/x86_64-linux-gnu/libssl.so.3",
                "/opt/app/lib/libssl.so.1.1"
            ]
        );
    }

    #[test]
    fn a_library_needs_both_read_and_write_and_ex2_replaces_write_ex() {
        assert_eq!(probe_points(vec![("SSL_read", 1)]), None);
        assert_eq!(
            probe_points(vec![
                ("SSL_read", 1),
                ("SSL_write", 2),
                ("SSL_write_ex", 3),
                ("SSL_write_ex2", 4)
            ]),
            Some(vec![
                ("SSL_read", 1),
                ("SSL_write", 2),
                ("SSL_write_ex2", 4)
            ])
        );
    }
}
