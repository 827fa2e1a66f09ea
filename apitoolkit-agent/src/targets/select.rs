//! Which processes the agent watches: `--pid` (with descendants), `--exe`, `--port`, `--cgroup`
//! and `--all`. Pids, executables and ports are matched in /proc and written to the kernel's
//! target map; `--all` and `--cgroup` are evaluated in the kernel itself. Rescans pick up
//! processes that start later.

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use super::kubernetes::{self, PodSelector, SharedPods};
use super::{process, sockets};

/// Where cgroup v2 is mounted: `/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on hybrid hosts.
fn cgroup2_root() -> PathBuf {
    fs::read_to_string("/proc/mounts")
        .ok()
        .and_then(|mounts| {
            mounts.lines().find_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                (fields.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(fields[1]))
            })
        })
        .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup"))
}

#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    #[error(
        "no process to watch: pass --pid, --exe, --port, --cgroup, --k8s-namespace, --k8s-label or --all"
    )]
    Nothing,
    #[error("no process with pid {0}")]
    NoSuchPid(u32),
    #[error("cgroup {path}: {source} (give a cgroup v2 path such as /system.slice/app.service)")]
    Cgroup {
        path: String,
        source: std::io::Error,
    },
}

/// A cgroup to watch: its path below the v2 hierarchy root, and its id (the directory's inode,
/// what `bpf_get_current_cgroup_id` returns).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup {
    pub path: String,
    pub id: u64,
}

/// What to select, as the flags give it.
#[derive(Debug, Default)]
pub struct Criteria {
    pub pids: Vec<u32>,
    pub exes: Vec<String>,
    pub ports: Vec<u16>,
    pub cgroups: Vec<String>,
    pub all: bool,
    pub pods: PodSelector,
}

pub struct Selector {
    roots: Vec<u32>,
    exes: Vec<String>,
    ports: Vec<u16>,
    cgroups: Vec<Cgroup>,
    all: bool,
    pods: PodSelector,
    pod_index: SharedPods,
}

/// `<cgroup2 mount>/a/b`, `/a/b` and `a/b` all name the cgroup `/a/b`.
fn cgroup_path(root: &Path, given: &str) -> String {
    let relative = Path::new(given)
        .strip_prefix(root)
        .map(|rest| rest.to_string_lossy().into_owned())
        .unwrap_or_else(|_| given.to_owned());
    format!("/{}", relative.trim_matches('/'))
}

/// The cgroup v2 path of `pid` (the `0::` line of /proc/<pid>/cgroup).
fn cgroup_of(pid: u32) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(str::to_owned)
}

fn within(path: &str, cgroup: &str) -> bool {
    cgroup == "/"
        || path == cgroup
        || path
            .strip_prefix(cgroup)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// `--exe` matches the executable's path, its file name, or the file name of `argv[0]`
/// (`gunicorn`, whose executable is python).
fn exe_matches(pid: u32, wanted: &[String]) -> bool {
    let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
    let argv0 = fs::read(format!("/proc/{pid}/cmdline"))
        .ok()
        .and_then(|raw| {
            raw.split(|byte| *byte == 0)
                .next()
                .map(|arg| String::from_utf8_lossy(arg).into_owned())
        })
        .unwrap_or_default();
    let names = [
        exe.to_string_lossy().into_owned(),
        file_name(&exe),
        file_name(Path::new(&argv0)),
    ];
    wanted
        .iter()
        .any(|want| names.iter().any(|name| name == want))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn all_pids() -> Vec<u32> {
    let me = std::process::id();
    fs::read_dir("/proc")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
                .filter(|pid| *pid != me)
                .collect()
        })
        .unwrap_or_default()
}

impl Selector {
    pub fn new(criteria: Criteria, pod_index: SharedPods) -> Result<Self, SelectError> {
        let Criteria {
            pids,
            exes,
            ports,
            cgroups,
            all,
            pods,
        } = criteria;
        if pids.is_empty()
            && exes.is_empty()
            && ports.is_empty()
            && cgroups.is_empty()
            && pods.is_empty()
            && !all
        {
            return Err(SelectError::Nothing);
        }
        if let Some(missing) = pids.iter().find(|pid| !process::exists(**pid)) {
            return Err(SelectError::NoSuchPid(*missing));
        }
        let root = cgroup2_root();
        let cgroups = cgroups
            .iter()
            .map(|given| {
                let path = cgroup_path(&root, given);
                let directory = root.join(path.trim_start_matches('/'));
                let id = fs::metadata(&directory)
                    .map_err(|source| SelectError::Cgroup {
                        path: path.clone(),
                        source,
                    })?
                    .ino();
                Ok(Cgroup { path, id })
            })
            .collect::<Result<_, SelectError>>()?;
        Ok(Self {
            roots: pids,
            exes,
            ports,
            cgroups,
            all,
            pods,
            pod_index,
        })
    }

    pub fn all(&self) -> bool {
        self.all
    }

    pub fn cgroups(&self) -> &[Cgroup] {
        &self.cgroups
    }

    /// Whether processes that appear later can be selected: then the agent keeps running
    /// when none is left.
    pub fn is_open_ended(&self) -> bool {
        self.all
            || !self.cgroups.is_empty()
            || !self.exes.is_empty()
            || !self.ports.is_empty()
            || !self.pods.is_empty()
    }

    fn pod_matches(&self, pid: u32) -> bool {
        let Some(pod) = kubernetes::pod_of_process(pid) else {
            return false;
        };
        self.pod_index
            .read()
            .ok()
            .and_then(|index| index.pod(&pod).map(|info| self.pods.matches(info)))
            .unwrap_or(false)
    }

    /// `--pid` processes still alive.
    pub fn live_roots(&mut self) -> &[u32] {
        self.roots.retain(|pid| {
            let alive = process::exists(*pid);
            if !alive {
                tracing::info!(pid, "watched process exited");
            }
            alive
        });
        &self.roots
    }

    /// Processes selected now, and which of them the kernel must be told about by id (the
    /// others it selects itself).
    pub fn scan(&self) -> Selected {
        let mut by_id = process::with_descendants(&self.roots);
        let needs_proc_scan = self.is_open_ended();
        let mut in_kernel = Vec::new();
        if needs_proc_scan {
            for pid in all_pids() {
                if by_id.contains(&pid) {
                    continue;
                }
                if (!self.exes.is_empty() && exe_matches(pid, &self.exes))
                    || (!self.ports.is_empty() && sockets::listens_on(pid, &self.ports))
                    || (!self.pods.is_empty() && self.pod_matches(pid))
                {
                    by_id.push(pid);
                } else if self.all
                    || cgroup_of(pid).is_some_and(|path| {
                        self.cgroups
                            .iter()
                            .any(|cgroup| within(&path, &cgroup.path))
                    })
                {
                    in_kernel.push(pid);
                }
            }
        }
        Selected { by_id, in_kernel }
    }
}

#[derive(Debug, Default)]
pub struct Selected {
    /// Selected by pid, executable or port: the kernel's target map needs them.
    pub by_id: Vec<u32>,
    /// Selected by `--all` or `--cgroup`, which the kernel evaluates itself.
    pub in_kernel: Vec<u32>,
}

impl Selected {
    pub fn all(&self) -> impl Iterator<Item = u32> + '_ {
        self.by_id.iter().chain(&self.in_kernel).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selector(pids: &[u32], cgroups: &[String]) -> Result<Selector, SelectError> {
        let criteria = Criteria {
            pids: pids.to_vec(),
            cgroups: cgroups.to_vec(),
            ..Criteria::default()
        };
        Selector::new(criteria, SharedPods::default())
    }

    #[test]
    fn cgroup_paths_are_normalised_and_nest() {
        let root = Path::new("/sys/fs/cgroup");
        assert_eq!(
            cgroup_path(root, "/sys/fs/cgroup/system.slice/a.service"),
            "/system.slice/a.service"
        );
        assert_eq!(cgroup_path(root, "system.slice/"), "/system.slice");
        assert_eq!(cgroup_path(root, "/"), "/");
        assert!(within("/system.slice/a.service", "/system.slice"));
        assert!(!within("/system.slice2", "/system.slice"));
        assert!(within("/anything", "/"));
    }

    #[test]
    fn this_test_process_is_found_by_its_executable_and_cgroup() {
        let me = std::process::id();
        let exe = fs::read_link("/proc/self/exe").unwrap();
        assert!(exe_matches(me, &[exe.to_string_lossy().into_owned()]));
        assert!(!exe_matches(me, &["no-such-program".to_owned()]));
        let own = cgroup_of(me).expect("cgroup v2 is mounted");
        let selector = selector(&[], &[own]).unwrap();
        assert!(selector.is_open_ended());
        // The agent never selects itself, and this test is the agent's process.
        assert!(!selector.scan().all().any(|pid| pid == me));
    }

    #[test]
    fn selecting_nothing_or_a_missing_process_is_an_error() {
        assert!(matches!(selector(&[], &[]), Err(SelectError::Nothing)));
        assert!(matches!(
            selector(&[u32::MAX], &[]),
            Err(SelectError::NoSuchPid(_))
        ));
        assert!(matches!(
            selector(&[], &["/no/such/cgroup".into()]),
            Err(SelectError::Cgroup { .. })
        ));
    }
}
