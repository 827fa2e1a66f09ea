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
/// agent starts; later forks are followed in the kernel). Runs once a second: it reads the
/// children lists of the processes it walks, so its cost follows the watched tree, not the
/// number of processes on the host.
pub fn with_descendants(roots: &[u32]) -> Vec<u32> {
    let mut selected = roots.to_vec();
    let agent = std::process::id();
    // Every process's parent, read only where the kernel keeps no children lists.
    let mut parents: Option<Vec<(u32, u32)>> = None;
    let mut index = 0;
    while index < selected.len() {
        let parent = selected[index];
        let children = listed_children(parent).unwrap_or_else(|| {
            parents
                .get_or_insert_with(all_parents)
                .iter()
                .filter(|(_, of)| *of == parent)
                .map(|(pid, _)| *pid)
                .collect()
        });
        for child in children {
            // Never the agent, started from a shell it was asked to watch.
            if child != agent && !selected.contains(&child) {
                selected.push(child);
            }
        }
        index += 1;
    }
    selected
}

/// The children of every thread of `pid` (`/proc/<pid>/task/<tid>/children`); `None` when
/// the kernel keeps no such lists (built without `CONFIG_PROC_CHILDREN`).
fn listed_children(pid: u32) -> Option<Vec<u32>> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        // Gone: no children to watch.
        return Some(Vec::new());
    };
    let mut children = Vec::new();
    for task in tasks.flatten() {
        match fs::read_to_string(task.path().join("children")) {
            Ok(list) => children.extend(
                list.split_whitespace()
                    .filter_map(|pid| pid.parse::<u32>().ok()),
            ),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                // A thread that exited meanwhile, or a kernel without the lists.
                if task.path().exists() {
                    return None;
                }
            }
            Err(_) => {}
        }
    }
    Some(children)
}

/// `(pid, parent)` of every process, from each /proc/<pid>/stat.
fn all_parents() -> Vec<(u32, u32)> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse().ok()?;
            Some((pid, parent_pid(pid)?))
        })
        .collect()
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

/// The lowercased text of files, at most 256 KiB of each, for cheap content sniffing.
fn sources_text(sources: &[PathBuf]) -> Vec<u8> {
    let mut text = Vec::new();
    for source in sources {
        text.extend(read_prefix(source, 256 * 1024).to_ascii_lowercase());
    }
    text
}

/// A worker started by Python's `multiprocessing` spawn or forkserver (`uvicorn --workers N`,
/// hypercorn): its command line is `python -c "from multiprocessing.spawn import spawn_main;
/// …" --multiprocessing-fork` and names nothing of the server it runs.
fn spawned_by_multiprocessing(args: &[String]) -> bool {
    args.iter().any(|arg| {
        arg == "--multiprocessing-fork"
            || arg.contains("multiprocessing.spawn")
            || arg.contains("multiprocessing.forkserver")
    })
}

/// Words of a command line or application source that mean requests run on an event loop
/// (ASGI servers, gunicorn's async worker classes, green threads) rather than one per thread.
const PYTHON_EVENT_LOOPS: [&[u8]; 7] = [
    b"uvicorn",
    b"hypercorn",
    b"daphne",
    b"gevent",
    b"eventlet",
    b"asyncio",
    b"asgi",
];

/// Compiled modules of event-loop servers, seen in /proc/<pid>/maps (which lists only shared
/// objects, never `.py` files).
const EVENT_LOOP_MODULES: [&str; 3] = ["/uvloop/", "/gevent/", "/httptools/"];

/// The framework and serving model of a Python process, from what /proc shows: `text` is the
/// lowercased command line that started the server (for a `multiprocessing` worker, its
/// parent's) and the application sources it names; `maps` is the process's
/// /proc/<pid>/maps.
fn python_profile(server_args: &[String], text: &[u8], maps: &str) -> ProcessProfile {
    let server = server_args
        .iter()
        .take(3)
        .map(|arg| file_name(arg).to_ascii_lowercase())
        .find(|name| ["uvicorn", "hypercorn", "daphne"].contains(&name.as_str()));
    // FastAPI needs pydantic, whose core is compiled: mapped even when the app module is not
    // found.
    let pydantic = maps.contains("/pydantic_core/");
    let sdk_type = if contains(text, b"fastapi") || contains(text, b"starlette") {
        SdkType::PythonFastApi
    } else if contains(text, b"django") || contains(text, b"manage.py") {
        SdkType::PythonDjango
    } else if contains(text, b"pyramid") {
        SdkType::PythonPyramid
    } else if contains(text, b"flask") {
        SdkType::PythonFlask
    } else {
        match server.as_deref() {
            Some("uvicorn") => SdkType::PythonFastApi,
            Some("daphne") => SdkType::PythonDjango, // Django Channels' server
            _ if pydantic => SdkType::PythonFastApi,
            _ => SdkType::SDKUnknown,
        }
    };
    let event_loop = sdk_type == SdkType::PythonFastApi
        || server.is_some()
        || PYTHON_EVENT_LOOPS.iter().any(|word| contains(text, word))
        || EVENT_LOOP_MODULES
            .iter()
            .any(|module| maps.contains(module));
    ProcessProfile::new(sdk_type, !event_loop)
}

fn node_framework(pid: u32, args: &[String]) -> SdkType {
    let haystack = sources_text(&named_sources(pid, args));
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

/// The process that names the application: a worker started by `multiprocessing` spawn runs
/// `python -c "from multiprocessing.spawn import spawn_main; …"`, so its parent's: pid and
/// command line.
fn server_process(pid: u32, args: Vec<String>) -> (u32, Vec<String>) {
    spawned_by_multiprocessing(&args)
        .then(|| parent_pid(pid).map(|parent| (parent, cmdline(parent))))
        .flatten()
        .unwrap_or((pid, args))
}

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
        let (server_pid, server_args) = server_process(pid, args);
        let mut text = server_args.join(" ").to_ascii_lowercase().into_bytes();
        text.extend(sources_text(&named_sources(server_pid, &server_args)));
        let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
        return python_profile(&server_args, &text, &maps);
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
        let (server_pid, server_args) = server_process(tgid, cmdline(tgid));
        // The scan reads the application's own source: whatever it meets there must not stop
        // capture (a panic would end the capture thread).
        let scan = || super::routes::scan_process(server_pid, sdk_type, &server_args);
        let scanned =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(scan)).unwrap_or_else(|_| {
                tracing::error!(
                    pid = tgid,
                    "route scan failed: its paths are sent as they are"
                );
                RouteTable::default()
            });
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

    fn args(line: &str) -> Vec<String> {
        line.split(' ').map(str::to_owned).collect()
    }

    /// The Python detection on a server command line, its application source and maps.
    fn python(server: &str, source: &str, maps: &str) -> (SdkType, bool) {
        let server_args = args(server);
        let mut text = server.to_ascii_lowercase().into_bytes();
        text.extend(source.to_ascii_lowercase().bytes());
        let profile = python_profile(&server_args, &text, maps);
        (profile.sdk_type, profile.thread_per_request)
    }

    const FASTAPI_APP: &str = "from fastapi import FastAPI\napp = FastAPI()\n";
    const DJANGO_ASGI: &str = "import os\nfrom django.core.asgi import get_asgi_application\n\
application = get_asgi_application()\n";
    const FLASK_APP: &str = "from flask import Flask\napp = Flask(__name__)\n";
    const UVLOOP_MAPS: &str = "7f0c1000-7f0c2000 r-xp 00000000 08:01 1234 \
/usr/lib/python3/dist-packages/uvloop/loop.cpython-311-x86_64-linux-gnu.so\n";

    #[test]
    fn a_multiprocessing_worker_is_recognised_by_its_command_line() {
        let worker = args(
            "/usr/bin/python3 -c from multiprocessing.spawn import spawn_main; \
spawn_main(tracker_fd=5, pipe_handle=7) --multiprocessing-fork",
        );
        assert!(spawned_by_multiprocessing(&worker));
        assert!(spawned_by_multiprocessing(&args(
            "python3 -c from multiprocessing.forkserver import main; main(4, 5, [], **{})"
        )));
        assert!(!spawned_by_multiprocessing(&args(
            "/usr/bin/python3 -m uvicorn app:app --workers 2"
        )));
    }

    #[test]
    fn asgi_servers_are_event_loops_and_name_the_framework_of_their_app() {
        use SdkType::*;
        // uvicorn --workers 2: the worker is judged by its parent's command line and app.
        assert_eq!(
            python(
                "/usr/bin/python3 /usr/local/bin/uvicorn app:app --workers 2",
                FASTAPI_APP,
                UVLOOP_MAPS
            ),
            (PythonFastApi, false)
        );
        assert_eq!(
            python(
                "/usr/bin/python3 -m hypercorn shop.main:app --bind 0.0.0.0:8000",
                "from starlette.applications import Starlette\n",
                ""
            ),
            (PythonFastApi, false)
        );
        assert_eq!(
            python(
                "/usr/bin/python3 -m uvicorn mysite.asgi:application",
                DJANGO_ASGI,
                ""
            ),
            (PythonDjango, false)
        );
        assert_eq!(
            python(
                "/usr/local/bin/daphne mysite.asgi:application",
                DJANGO_ASGI,
                ""
            ),
            (PythonDjango, false)
        );
        assert_eq!(
            python(
                "/usr/local/bin/daphne -b 0.0.0.0 project.routing:app",
                "",
                ""
            ),
            (PythonDjango, false),
            "daphne is Django Channels' server"
        );
        // The app module was not found: FastAPI's compiled pydantic core gives it away.
        assert_eq!(
            python(
                "python3 run.py",
                "",
                "7f00-7f01 r-xp 0 08:01 9 /srv/venv/lib/python3.12/site-packages/pydantic_core/_pydantic_core.cpython-312-x86_64-linux-gnu.so\n"
            ),
            (PythonFastApi, false)
        );
        assert_eq!(
            python(
                "/usr/bin/python3 -m hypercorn asgi_app:app",
                "async def app(scope, receive, send):",
                ""
            ),
            (SDKUnknown, false)
        );
    }

    #[test]
    fn wsgi_servers_serve_a_request_per_thread_unless_their_workers_are_green() {
        use SdkType::*;
        assert_eq!(
            python(
                "/usr/bin/python3 -m gunicorn --workers 2 flask_app:app",
                FLASK_APP,
                ""
            ),
            (PythonFlask, true)
        );
        assert_eq!(
            python(
                "/usr/bin/python3 manage.py runserver",
                "os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'mysite.settings')",
                ""
            ),
            (PythonDjango, true)
        );
        assert_eq!(
            python(
                "/usr/bin/python3 -m gunicorn -k gevent flask_app:app",
                FLASK_APP,
                ""
            ),
            (PythonFlask, false)
        );
        assert_eq!(
            python("/usr/bin/python3 worker.py", "print('hi')", ""),
            (SDKUnknown, true)
        );
    }

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

    #[test]
    fn a_child_and_its_child_are_descendants_from_the_lists_and_from_the_parent_scan() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & wait"])
            .spawn()
            .unwrap();
        let shell = child.id();
        let grandchild = (0..200)
            .find_map(|_| {
                std::thread::sleep(std::time::Duration::from_millis(10));
                listed_children(shell).and_then(|children| children.first().copied())
            })
            .expect("the shell started its sleep");
        let me = std::process::id();
        let descendants = with_descendants(&[me]);
        let scanned: Vec<u32> = all_parents()
            .iter()
            .filter(|(_, parent)| *parent == shell)
            .map(|(pid, _)| *pid)
            .collect();
        let _ = std::process::Command::new("kill")
            .arg(grandchild.to_string())
            .status();
        child.wait().unwrap();
        assert!(descendants.contains(&shell) && descendants.contains(&grandchild));
        assert_eq!(scanned, vec![grandchild]);
    }
}
