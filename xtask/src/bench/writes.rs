//! The cost of write(2) in a process the agent does not watch, without and with the agent.

use std::process::Command;

use anyhow::{Context as _, bail};

use super::{
    Context,
    agent::{Agent, Sink},
};
use crate::services::ChildGuard;

const WRITES_PER_ROUND: u32 = 200_000;
const WRITE_ROUNDS: u32 = 5;

/// Best of several rounds, to keep scheduler noise out of a ~50 ms measurement: nanoseconds
/// per 64-byte write(2) to /dev/null (the Python loop's own cost included).
const WRITE_LOOP: &str = "\
import os, sys, time
count, rounds = int(sys.argv[1]), int(sys.argv[2])
fd = os.open('/dev/null', os.O_WRONLY)
buf = b'x' * 64
best = None
for _ in range(rounds):
    start = time.perf_counter_ns()
    for _ in range(count):
        os.write(fd, buf)
    elapsed = time.perf_counter_ns() - start
    best = elapsed if best is None else min(best, elapsed)
print(best / count)
";

fn write_ns() -> anyhow::Result<f64> {
    let output = Command::new("python3")
        .args([
            "-c",
            WRITE_LOOP,
            &WRITES_PER_ROUND.to_string(),
            &WRITE_ROUNDS.to_string(),
        ])
        .output()
        .context("running python3")?;
    if !output.status.success() {
        bail!(
            "the write loop failed with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .context("parsing the write loop's output")
}

/// Nanoseconds per write(2) in a process the agent does not watch, without and with the agent:
/// its syscall tracepoints fire for every process and filter in the kernel.
pub(super) fn unwatched_write_ns(context: &Context) -> anyhow::Result<(f64, f64)> {
    eprintln!("bench: write(2) in an unwatched process");
    let without = write_ns()?;
    // The agent needs something to watch: a process that only sleeps.
    let sleeper = ChildGuard {
        child: Command::new("sleep").arg("600").spawn()?,
        signal: "TERM",
    };
    let agent = Agent::start(sleeper.pid(), Sink::Stdout, context)?;
    let with = write_ns()?;
    let (status, log, _) = agent.shut_down()?;
    if !status.success() {
        bail!("the agent exited with {status}:\n{}", log.join("\n"));
    }
    Ok((without, with))
}
