//! What /proc says about target processes: their descendants, and which runtime and framework
//! serve HTTP in them (the payload's `sdk_type`).

use std::{
    fs,
    io::Read,
    path::{Path, PathBuf},
    sync::Arc,
};

use super::elf::ElfFile;
use super::kubernetes::{self, SharedPods};
use crate::pipeline::{
    profile::{ProcessProfile, SdkType},
    routes::{RouteTable, Routes},
};

/// The process runs: it has a /proc entry and is neither a zombie (exited, not yet reaped by
/// its parent) nor dead.
pub fn exists(pid: u32) -> bool {
    state(pid).is_some_and(|state| !matches!(state, 'Z' | 'X' | 'x'))
}

/// The fields of /proc/<pid>/stat after the parenthesised command name (which may hold
/// spaces and parentheses itself).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    Some(after_name.split_whitespace().map(str::to_owned).collect())
}

/// The process state letter (`R`, `S`, `Z` …).
fn state(pid: u32) -> Option<char> {
    stat_fields(pid)?.first()?.chars().next()
}

/// The process's command name (`comm`), empty when it is gone.
pub fn name(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|comm| comm.trim_end().to_owned())
        .unwrap_or_default()
}

/// The parent pid from /proc/<pid>/stat.
fn parent_pid(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

/// `roots` plus every live process descending from them (gunicorn forks workers before the
/// agent starts; later forks are followed in the kernel).
pub fn with_descendants(roots: &[u32]) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            if let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|name| name.parse().ok())
                && let Some(parent) = parent_pid(pid)
            {
                parents.push((pid, parent));
            }
        }
    }
    let mut selected = roots.to_vec();
    let mut index = 0;
    while index < selected.len() {
        let parent = selected[index];
        for (pid, _) in parents.iter().filter(|(_, p)| *p == parent) {
            if !selected.contains(pid) {
                selected.push(*pid);
            }
        }
        index += 1;
    }
    selected
}

fn cmdline(pid: u32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            raw.split(|byte| *byte == 0)
                .filter(|part| !part.is_empty())
                .map(|part| String::from_utf8_lossy(part).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Reads at most `limit` bytes of a file, for cheap content sniffing.
fn read_prefix(path: &Path, limit: u64) -> Vec<u8> {
    let mut bytes = Vec::new();
    if let Ok(file) = fs::File::open(path) {
        let _ = file.take(limit).read_to_end(&mut bytes);
    }
    bytes
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// Source files the command line names: scripts (`app.py`, `server.js`) and WSGI/ASGI
/// `module:app` targets, resolved against the process's working directory.
fn named_sources(pid: u32, args: &[String]) -> Vec<PathBuf> {
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let cwd = fs::read_link(format!("/proc/{pid}/cwd")).unwrap_or_default();
    let resolve = |path: &str| {
        let path = Path::new(path);
        let absolute = if path.is_absolute() {
            path.to_path_buf()
        } else {
            cwd.join(path)
        };
        root.join(absolute.strip_prefix("/").unwrap_or(&absolute))
    };
    let mut sources = Vec::new();
    for arg in args.iter().skip(1) {
        if arg.ends_with(".py") || arg.ends_with(".js") || arg.ends_with(".mjs") {
            sources.push(resolve(arg));
        } else if let Some((module, _)) = arg.split_once(':')
            && !module.is_empty()
            && module
                .chars()
                .all(|c| c.is_alphanumeric() || c == '_' || c == '.')
        {
            let file = module.replace('.', "/");
            sources.push(resolve(&format!("{file}.py")));
            sources.push(resolve(&format!("{file}/__init__.py")));
        }
    }
    sources
}

fn python_framework(pid: u32, args: &[String]) -> SdkType {
    let joined = args.join(" ").to_ascii_lowercase();
    let mut haystack = joined.into_bytes();
    for source in named_sources(pid, args) {
        haystack.extend(read_prefix(&source, 256 * 1024).to_ascii_lowercase());
    }
    if contains(&haystack, b"fastapi") || contains(&haystack, b"uvicorn") {
        SdkType::PythonFastApi
    } else if contains(&haystack, b"django") || contains(&haystack, b"manage.py") {
        SdkType::PythonDjango
    } else if contains(&haystack, b"pyramid") {
        SdkType::PythonPyramid
    } else if contains(&haystack, b"flask") {
        SdkType::PythonFlask
    } else {
        SdkType::SDKUnknown
    }
}

fn node_framework(pid: u32, args: &[String]) -> SdkType {
    let mut haystack = Vec::new();
    for source in named_sources(pid, args) {
        haystack.extend(read_prefix(&source, 256 * 1024));
    }
    if contains(&haystack, b"@nestjs") {
        SdkType::JsNest
    } else if contains(&haystack, b"fastify") {
        SdkType::JsFastify
    } else if contains(&haystack, b"express") {
        SdkType::JsExpress
    } else {
        SdkType::SDKUnknown
    }
}

fn go_framework(exe: &Path) -> SdkType {
    let binary = fs::read(exe).unwrap_or_default();
    if contains(&binary, b"github.com/gin-gonic/gin") {
        SdkType::GoGin
    } else if contains(&binary, b"github.com/gofiber/fiber") {
        SdkType::GoFiber
    } else if contains(&binary, b"github.com/gorilla/mux") {
        SdkType::GoGorillaMux
    } else {
        SdkType::GoBuiltIn
    }
}

/// Python servers that run requests on an event loop rather than one per thread.
const PYTHON_EVENT_LOOPS: [&str; 5] = ["uvicorn", "hypercorn", "gevent", "eventlet", "asyncio"];

/// What /proc says of the process's runtime and framework.
fn detect(pid: u32) -> ProcessProfile {
    let args = cmdline(pid);
    let exe_link = fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
    let exe_name = file_name(exe_link.to_str().unwrap_or_default()).to_owned();
    let first_arg = args
        .first()
        .map(|arg| file_name(arg).to_owned())
        .unwrap_or_default();
    let is_python = exe_name.starts_with("python")
        || [
            "gunicorn",
            "uvicorn",
            "flask",
            "hypercorn",
            "waitress-serve",
        ]
        .contains(&first_arg.as_str());
    if is_python {
        let sdk_type = python_framework(pid, &args);
        let event_loop = sdk_type == SdkType::PythonFastApi
            || args
                .iter()
                .any(|arg| PYTHON_EVENT_LOOPS.iter().any(|name| arg.contains(name)));
        return ProcessProfile::new(sdk_type, !event_loop);
    }
    if exe_name == "node" || exe_name == "nodejs" || exe_name == "bun" {
        return ProcessProfile::new(node_framework(pid, &args), false);
    }
    let exe = PathBuf::from(format!("/proc/{pid}/exe"));
    if ElfFile::open(&exe).is_ok_and(|elf| elf.is_go()) {
        return ProcessProfile::new(go_framework(&exe), false);
    }
    ProcessProfile::new(SdkType::SDKUnknown, true)
}

/// Profiles live processes from /proc, tagged with their pod when running in Kubernetes;
/// `--sdk-type` overrides the detected framework.
pub struct Profiler {
    pub forced_sdk_type: Option<SdkType>,
    /// The `--routes` templates, for every process.
    pub configured_routes: Arc<RouteTable>,
    pub pods: SharedPods,
}

impl Profiler {
    pub fn profile(&self, tgid: u32) -> ProcessProfile {
        let detected = detect(tgid);
        let pod = kubernetes::pod_of_process(tgid).and_then(|pod| {
            let index = self.pods.read().ok()?;
            Some((index.tags(&pod), index.pod(&pod)?.workload.clone()))
        });
        let (tags, workload) = pod.unwrap_or_default();
        let service_name = if workload.is_empty() {
            name(tgid)
        } else {
            workload
        };
        let sdk_type = self.forced_sdk_type.unwrap_or(detected.sdk_type);
        let scanned = super::routes::scan_process(tgid, sdk_type, &cmdline(tgid));
        let profile = ProcessProfile {
            sdk_type,
            tags: tags.into(),
            service_name: service_name.into(),
            routes: Routes {
                configured: self.configured_routes.clone(),
                scanned: Arc::new(scanned),
            },
            ..detected
        };
        tracing::info!(
            pid = tgid,
            sdk_type = ?profile.sdk_type,
            thread_per_request = profile.thread_per_request,
            tags = ?profile.tags,
            "detected framework"
        );
        profile
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zombie_does_not_exist() {
        // An exited child that nobody reaped yet.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while state(pid) != Some('Z') && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(state(pid), Some('Z'));
        assert!(!exists(pid));
        child.wait().unwrap();
    }

    #[test]
    fn this_process_is_found_with_itself_as_root() {
        let me = std::process::id();
        assert!(exists(me));
        assert_eq!(with_descendants(&[me])[0], me);
        assert!(parent_pid(me).is_some());
    }
}
