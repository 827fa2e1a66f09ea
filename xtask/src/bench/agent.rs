//! The agent under test as a child process: start, CPU and memory cost, log parsing.

use std::{
    fs,
    io::{BufRead, BufReader},
    process::{Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};

use super::{Context, PUBSUB_PROJECT, TOPIC};
use crate::{agent_binary, services::ChildGuard};

const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for the agent to work off the backlog a load run leaves behind.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The agent publishes what is queued before it exits (at most 10 s), then stops.
const AGENT_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the agent under test sends payloads.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Sink {
    Stdout,
    PubSub,
    /// OTLP/gRPC to the test suite's receiver.
    Otlp,
}

/// The agent, watching one process; its payloads are counted, not stored (gigabytes at
/// saturation).
pub(super) struct Agent {
    process: ChildGuard,
    sink: Sink,
    /// Collects the agent's stderr lines until it exits.
    log_reader: thread::JoinHandle<Vec<String>>,
    /// Counts payload lines on the agent's stdout until it exits.
    payload_counter: thread::JoinHandle<u64>,
}

/// What the agent cost during one load run and what it reported.
pub(super) struct AgentCost {
    pub(super) cpu_seconds: f64,
    pub(super) peak_rss_mib: f64,
    /// Payloads written to stdout, or acknowledged by Pub/Sub or the OTLP receiver.
    pub(super) payloads: u64,
    pub(super) ringbuf_full: u64,
    pub(super) sink_dropped: u64,
}

impl Agent {
    /// Starts the agent and returns once its probes are attached.
    pub(super) fn start(watched_pid: u32, sink: Sink, context: &Context) -> anyhow::Result<Self> {
        let mut command = Command::new(agent_binary());
        command.args(["--pid", &watched_pid.to_string()]);
        match sink {
            Sink::Stdout => {}
            Sink::PubSub => {
                command
                    .args(["--pubsub-project", PUBSUB_PROJECT, "--topic", TOPIC])
                    .env("PUBSUB_EMULATOR_HOST", &context.emulator.host);
            }
            Sink::Otlp => {
                command.args(["--otlp-endpoint", &context.otlp_receiver.endpoint]);
            }
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", agent_binary().display()))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let payload_counter = thread::spawn(move || {
            BufReader::with_capacity(1 << 20, stdout)
                .split(b'\n')
                .map_while(Result::ok)
                .count() as u64
        });
        let stderr = child.stderr.take().expect("stderr is piped");
        let process = ChildGuard {
            child,
            signal: "INT",
        };
        let (attached_tx, attached_rx) = mpsc::channel();
        let log_reader = thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("watching processes") {
                    let _ = attached_tx.send(());
                }
                lines.push(line);
            }
            lines
        });
        let agent = Self {
            process,
            sink,
            log_reader,
            payload_counter,
        };
        // The channel also ends early when the agent exits before attaching.
        if attached_rx.recv_timeout(ATTACH_TIMEOUT).is_err() {
            let (_, log, _) = agent.shut_down()?;
            bail!(
                "the agent did not attach to pid {watched_pid}:\n{}",
                log.join("\n")
            );
        }
        Ok(agent)
    }

    /// CPU time the agent's process has used, all its threads, exited ones included. Read from
    /// its process CPU clock, in nanoseconds: /proc's utime and stime count 10 ms ticks, which
    /// at 1k req/s is more than a microsecond per payload.
    fn cpu_ns(&self) -> anyhow::Result<u64> {
        let pid = self.process.pid() as libc::pid_t;
        let mut clock: libc::clockid_t = 0;
        // SAFETY: `clock` is a valid place for the clock id; the call only writes it.
        let error = unsafe { libc::clock_getcpuclockid(pid, &mut clock) };
        if error != 0 {
            bail!(
                "no CPU clock for the agent (pid {pid}): {}",
                std::io::Error::from_raw_os_error(error)
            );
        }
        let mut time = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `time` is a valid timespec for the call to fill.
        if unsafe { libc::clock_gettime(clock, &mut time) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("reading the agent's CPU clock (pid {pid})"));
        }
        Ok(time.tv_sec as u64 * 1_000_000_000 + time.tv_nsec as u64)
    }

    /// Waits until the agent has worked off the backlog of a load run: records still in the
    /// ring buffer and payloads still queued for its sink.
    fn wait_until_idle(&self) -> anyhow::Result<()> {
        const INTERVAL: Duration = Duration::from_millis(500);
        // Under 20 ms of CPU in 500 ms is idle polling, not backlog.
        const IDLE_NS: u64 = 20_000_000;
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        let mut used = self.cpu_ns()?;
        while Instant::now() < deadline {
            thread::sleep(INTERVAL);
            let now = self.cpu_ns()?;
            if now - used < IDLE_NS {
                return Ok(());
            }
            used = now;
        }
        eprintln!("bench: the agent is still busy {SETTLE_TIMEOUT:?} after the load");
        Ok(())
    }

    fn peak_rss_mib(&self) -> anyhow::Result<f64> {
        let path = format!("/proc/{}/status", self.process.pid());
        let status = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let kib: f64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|value| value.split_whitespace().next())
            .context("no VmHWM")?
            .parse()?;
        Ok(kib / 1024.0)
    }

    /// Stops the agent with SIGINT and returns its exit status, stderr lines and the number of
    /// payloads it wrote to stdout.
    pub(super) fn shut_down(mut self) -> anyhow::Result<(ExitStatus, Vec<String>, u64)> {
        let status = self.process.stop_within(AGENT_STOP_TIMEOUT)?;
        let log = self
            .log_reader
            .join()
            .map_err(|_| anyhow!("the agent's log reader panicked"))?;
        let payloads = self
            .payload_counter
            .join()
            .map_err(|_| anyhow!("the payload counter panicked"))?;
        Ok((status, log, payloads))
    }

    /// Runs `load` while the agent watches, then stops the agent and reads what it reported.
    pub(super) fn measure<T>(
        self,
        load: impl FnOnce() -> anyhow::Result<T>,
    ) -> anyhow::Result<(T, AgentCost)> {
        // Attaching costs CPU too: count only what the load costs.
        let used_before = self.cpu_ns()?;
        let result = load()?;
        self.wait_until_idle()?;
        let cpu_seconds = (self.cpu_ns()? - used_before) as f64 / 1e9;
        let peak_rss_mib = self.peak_rss_mib()?;
        let sink = self.sink;
        let (status, log, stdout_payloads) = self.shut_down()?;
        if !status.success() {
            bail!("the agent exited with {status}:\n{}", log.join("\n"));
        }
        let line = |fragment: &str| {
            log.iter()
                .find(|line| line.contains(fragment))
                .with_context(|| format!("no {fragment:?} in the agent's log:\n{}", log.join("\n")))
        };
        let summary = line("capture stopped")?;
        let payloads = match sink {
            Sink::Stdout => stdout_payloads,
            Sink::PubSub => log_field(line("sink stopped sink=\"pubsub\"")?, "delivered")?,
            Sink::Otlp => log_field(line("sink stopped sink=\"otlp\"")?, "delivered")?,
        };
        Ok((
            result,
            AgentCost {
                cpu_seconds,
                peak_rss_mib,
                payloads,
                ringbuf_full: log_field(summary, "ringbuf_full")?,
                sink_dropped: log_field(summary, "sink_dropped")?,
            },
        ))
    }
}

/// The value of `key=value` in a log line.
fn log_field(line: &str, key: &str) -> anyhow::Result<u64> {
    line.split_whitespace()
        .find_map(|token| token.strip_prefix(key)?.strip_prefix('='))
        .with_context(|| format!("no {key}= in {line:?}"))?
        .parse()
        .with_context(|| format!("parsing {key}= in {line:?}"))
}
