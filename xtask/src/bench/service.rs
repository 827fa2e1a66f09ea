//! CPU time the watched service itself spends, from `/proc/<pid>/task/<tid>/schedstat` of the
//! process and its descendants: it includes the eBPF programs that run in its syscalls and
//! uprobes, which is what the agent costs the service.

use std::fs;

/// `pid` and its descendants (nginx's workers, gunicorn's).
fn process_tree(pid: u32) -> Vec<u32> {
    let mut tree = vec![pid];
    let mut next = 0;
    while next < tree.len() {
        let parent = tree[next];
        next += 1;
        let Ok(tasks) = fs::read_dir(format!("/proc/{parent}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let children = fs::read_to_string(task.path().join("children")).unwrap_or_default();
            tree.extend(
                children
                    .split_whitespace()
                    .filter_map(|child| child.parse::<u32>().ok()),
            );
        }
    }
    tree
}

/// Nanoseconds on CPU of every thread of `pid` and its descendants so far.
fn cpu_ns(pid: u32) -> u64 {
    process_tree(pid)
        .into_iter()
        .filter_map(|process| fs::read_dir(format!("/proc/{process}/task")).ok())
        .flatten()
        .flatten()
        .filter_map(|task| fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|schedstat| schedstat.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Runs `work` and returns its result with the CPU nanoseconds the service (`pid` and its
/// descendants) spent meanwhile. Threads that exit during the run take their time with them;
/// the services measured keep theirs.
pub(super) fn cpu_during<T>(
    pid: u32,
    work: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(T, u64)> {
    let before = cpu_ns(pid);
    let result = work()?;
    Ok((result, cpu_ns(pid).saturating_sub(before)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn this_thread_cpu_ns() -> u64 {
        let schedstat = fs::read_to_string("/proc/thread-self/schedstat").unwrap();
        schedstat
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }

    #[test]
    fn this_process_spends_what_it_burns() {
        // Burns 50 ms of this thread's CPU, however long a crowded machine takes to give it.
        let pid = std::process::id();
        let (burned, spent) = cpu_during(pid, || {
            let (start, deadline) = (this_thread_cpu_ns(), std::time::Instant::now());
            let mut x = 0u64;
            while this_thread_cpu_ns() - start < 50_000_000 && deadline.elapsed().as_secs() < 10 {
                x = std::hint::black_box(x.wrapping_add(1));
            }
            Ok(this_thread_cpu_ns() - start)
        })
        .unwrap();
        assert!(burned >= 50_000_000, "burned only {burned} ns in 10 s");
        // Other test threads of this process may exit meanwhile and take their few
        // microseconds with them, so the sum may fall a little short of what was burned.
        let exited_allowance = 5_000_000;
        assert!(
            spent + exited_allowance >= burned,
            "{spent} ns spent, {burned} ns burned"
        );
        assert!(process_tree(pid).contains(&pid));
    }
}
