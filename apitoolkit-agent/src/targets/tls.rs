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

use super::elf::ElfFile;
use crate::capture::Probes;

/// What a file mapped by a target process is, as far as TLS capture goes.
#[derive(Clone, Debug, PartialEq, Eq)]
enum FileKind {
    /// SSL uprobes are attached to it.
    Probed,
    /// It exports the SSL functions but attaching failed (logged when it happened).
    Unprobeable,
    /// A Go executable: its crypto/tls has no SSL symbols to probe.
    Go,
    Other,
}

/// Per process: the probed TLS libraries (paths inside the process), and whether it is Go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct ProcessTls {
    probed: Vec<String>,
    unprobeable: Vec<String>,
    go: bool,
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
            if !found.probed.is_empty() {
                tracing::info!(pid, libraries = ?found.probed, "TLS plaintext probed");
            } else if found.go {
                tracing::warn!(
                    pid,
                    "Go binary: crypto/tls is not supported yet, HTTPS served or called by this \
                     process is not captured (plain HTTP is)"
                );
            } else if found.unprobeable.is_empty() {
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

    /// Whether a TLS library of `pid` is probed (as of the last scan).
    pub fn probes(&self, pid: u32) -> bool {
        self.reported
            .get(&pid)
            .is_some_and(|found| !found.probed.is_empty())
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
                FileKind::Go => found.go = true,
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
    let names: Vec<&str> = SSL_PROGRAMS.iter().map(|(name, _)| *name).collect();
    let Some(points) = probe_points(elf.function_offsets(&names)) else {
        return if elf.is_go() {
            FileKind::Go
        } else {
            FileKind::Other
        };
    };
    match probes.attach_tls(host_path, &points) {
        Ok(()) => {
            tracing::debug!(path, functions = ?points, "attached SSL uprobes");
            FileKind::Probed
        }
        Err(error) => {
            tracing::warn!(path, %error, "could not attach SSL uprobes");
            FileKind::Unprobeable
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
