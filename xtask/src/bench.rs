//! `cargo xtask bench`: nginx under wrk with and without the agent, in one run, on loopback,
//! over plain HTTP and over HTTPS (the agent reading plaintext from nginx's OpenSSL).
//! Prints throughput, latency, capture completeness, agent CPU per payload, peak RSS and drops,
//! plus the agent's cost to syscalls of processes it does not watch, and writes them to
//! target/bench/capture.json. Numbers are reported, not asserted: only setup failures fail.

use std::{
    fs,
    io::{BufRead, BufReader},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};

use crate::{agent_binary, build_agent, workspace_root};

const WRK_SECONDS: u32 = 8;
const WRK_CONNECTIONS: u32 = 8;
const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest wait for the agent to work off the backlog a load run leaves behind.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
const WRITES_PER_ROUND: u32 = 200_000;
const WRITE_ROUNDS: u32 = 5;

/// A response body nginx serves, under `/<path>`, over HTTP or HTTPS.
struct Body {
    path: &'static str,
    label: &'static str,
    bytes: usize,
    https: bool,
}

const BODIES: [Body; 3] = [
    Body {
        path: "1k",
        label: "1 KiB",
        bytes: 1024,
        https: false,
    },
    Body {
        path: "64k",
        label: "64 KiB",
        bytes: 64 * 1024,
        https: false,
    },
    Body {
        path: "1k",
        label: "1 KiB HTTPS",
        bytes: 1024,
        https: true,
    },
];

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

/// A child process stopped with `signal` (SIGKILL if that fails) when dropped, so that a failed
/// run leaves no server or agent behind.
struct ChildGuard {
    child: Child,
    signal: &'static str,
}

impl ChildGuard {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` and waits for the exit. nginx needs a catchable signal: a SIGKILLed
    /// master leaves its workers running.
    fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        crate::run(
            Command::new("kill").args([format!("-{}", self.signal), self.pid().to_string()]),
        )?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "pid {} still runs {STOP_TIMEOUT:?} after SIG{}",
                    self.pid(),
                    self.signal
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.stop().is_err() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn installed(tool: &str) -> bool {
    Command::new("which")
        .arg(tool)
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

fn ensure_tools() -> anyhow::Result<()> {
    if installed("nginx") && installed("wrk") {
        return Ok(());
    }
    eprintln!("bench: installing nginx and wrk");
    crate::run(Command::new("apt-get").args(["update", "-qq"]))?;
    crate::run(Command::new("apt-get").args(["install", "-y", "-qq", "nginx", "wrk"]))
}

fn bench_dir() -> PathBuf {
    workspace_root().join("target/bench")
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The ports nginx listens on.
#[derive(Clone, Copy)]
struct Ports {
    http: u16,
    https: u16,
}

impl Ports {
    fn url(self, body: &Body) -> String {
        if body.https {
            format!("https://127.0.0.1:{}/{}", self.https, body.path)
        } else {
            format!("http://127.0.0.1:{}/{}", self.http, body.path)
        }
    }
}

/// nginx with one worker (the other core runs wrk and the agent) and `sendfile off`, so every
/// response body goes through write(2) and is captured: the agent's most expensive path. The
/// HTTPS server uses a self-signed certificate made here.
fn start_nginx(ports: Ports) -> anyhow::Result<ChildGuard> {
    let prefix = bench_dir().join("nginx");
    let html = prefix.join("html");
    fs::create_dir_all(&html).with_context(|| format!("creating {}", html.display()))?;
    fs::create_dir_all(prefix.join("logs"))?;
    for body in &BODIES {
        fs::write(html.join(body.path), vec![b'a'; body.bytes])?;
    }
    let (cert, key) = (prefix.join("cert.pem"), prefix.join("key.pem"));
    crate::run(
        Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args(["-subj", "/CN=127.0.0.1", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(Stdio::null()),
    )?;
    let config = format!(
        "daemon off;\nmaster_process on;\nworker_processes 1;\npid {pid};\nerror_log {log} warn;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n  access_log off;\n  sendfile off;\n  keepalive_requests 1000000;\n  \
         default_type application/octet-stream;\n  \
         server {{ listen 127.0.0.1:{http}; root {root}; }}\n  \
         server {{ listen 127.0.0.1:{https} ssl; ssl_certificate {cert}; \
         ssl_certificate_key {key}; root {root}; }}\n}}\n",
        pid = prefix.join("nginx.pid").display(),
        log = prefix.join("logs/error.log").display(),
        root = html.display(),
        http = ports.http,
        https = ports.https,
        cert = cert.display(),
        key = key.display(),
    );
    let config_path = prefix.join("nginx.conf");
    fs::write(&config_path, config)?;
    let mut nginx = ChildGuard {
        child: Command::new("nginx")
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&config_path)
            .stdout(Stdio::null())
            .spawn()
            .context("starting nginx")?,
        signal: "TERM",
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let port = ports.https;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = nginx.child.try_wait()? {
            bail!(
                "nginx exited with {status} (see {})",
                prefix.join("logs/error.log").display()
            );
        }
        if Instant::now() > deadline {
            bail!("nginx did not listen on port {port}");
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(nginx)
}

#[derive(Default)]
struct WrkResult {
    requests: u64,
    requests_per_second: f64,
    p50_us: f64,
    p99_us: f64,
}

/// wrk prints latencies as `456.00us`, `1.23ms` or `1.02s`.
fn microseconds(value: &str) -> anyhow::Result<f64> {
    let (number, scale) = if let Some(us) = value.strip_suffix("us") {
        (us, 1.0)
    } else if let Some(ms) = value.strip_suffix("ms") {
        (ms, 1e3)
    } else if let Some(s) = value.strip_suffix('s') {
        (s, 1e6)
    } else {
        bail!("unknown latency unit in {value:?}");
    };
    Ok(number.parse::<f64>()? * scale)
}

fn wrk(url: &str) -> anyhow::Result<WrkResult> {
    let output = Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{WRK_CONNECTIONS}"),
            &format!("-d{WRK_SECONDS}s"),
            "--latency",
            url,
        ])
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "wrk failed with {}:\n{text}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let mut result = WrkResult::default();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["Requests/sec:", value] => result.requests_per_second = value.parse()?,
            [count, "requests", "in", ..] => result.requests = count.parse()?,
            ["50%", value] => result.p50_us = microseconds(value)?,
            ["99%", value] => result.p99_us = microseconds(value)?,
            // Error responses mean nginx is misconfigured, not that the agent is slow.
            ["Non-2xx", ..] => bail!("nginx answered with errors:\n{text}"),
            _ => {}
        }
    }
    if result.requests == 0 {
        bail!("wrk reported no requests:\n{text}");
    }
    Ok(result)
}

fn clock_ticks_per_second() -> anyhow::Result<f64> {
    let output = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .context("running getconf CLK_TCK")?;
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .context("parsing getconf CLK_TCK")
}

/// The agent, watching one process; its payloads are counted, not stored (gigabytes at
/// saturation).
struct Agent {
    process: ChildGuard,
    /// Collects the agent's stderr lines until it exits.
    log_reader: thread::JoinHandle<Vec<String>>,
    /// Counts payload lines on the agent's stdout until it exits.
    payload_counter: thread::JoinHandle<u64>,
}

/// What the agent reports when it stops.
struct AgentSummary {
    payloads: u64,
    ringbuf_full: u64,
    sink_dropped: u64,
}

impl Agent {
    /// Starts the agent and returns once its probes are attached.
    fn start(watched_pid: u32) -> anyhow::Result<Self> {
        let mut child = Command::new(agent_binary())
            .args(["--pid", &watched_pid.to_string()])
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

    fn cpu_ticks(&self) -> anyhow::Result<u64> {
        let path = format!("/proc/{}/stat", self.process.pid());
        let stat = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        // The command name may contain spaces: count fields after its closing parenthesis.
        let after_name = &stat[stat.rfind(')').context("malformed stat")? + 1..];
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        // utime and stime, fields 14 and 15 of stat, are 12th and 13th after the name.
        let utime: u64 = fields.get(11).context("no utime")?.parse()?;
        let stime: u64 = fields.get(12).context("no stime")?.parse()?;
        Ok(utime + stime)
    }

    /// Waits until the agent has worked off the backlog of a load run: records still in the
    /// ring buffer and payloads still queued for stdout.
    fn wait_until_idle(&self) -> anyhow::Result<()> {
        const INTERVAL: Duration = Duration::from_millis(500);
        // Under 2 ticks (20 ms at 100 Hz) in 500 ms is idle polling, not backlog.
        const IDLE_TICKS: u64 = 2;
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        let mut ticks = self.cpu_ticks()?;
        while Instant::now() < deadline {
            thread::sleep(INTERVAL);
            let now = self.cpu_ticks()?;
            if now - ticks < IDLE_TICKS {
                return Ok(());
            }
            ticks = now;
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
    /// payloads it wrote.
    fn shut_down(mut self) -> anyhow::Result<(ExitStatus, Vec<String>, u64)> {
        let status = self.process.stop()?;
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

    /// Stops the agent and reads what it wrote.
    fn stop(self) -> anyhow::Result<AgentSummary> {
        let (status, log, payloads) = self.shut_down()?;
        if !status.success() {
            bail!("the agent exited with {status}:\n{}", log.join("\n"));
        }
        let summary = log
            .iter()
            .find(|line| line.contains("capture stopped"))
            .with_context(|| format!("no final summary in the agent's log:\n{}", log.join("\n")))?;
        Ok(AgentSummary {
            payloads,
            ringbuf_full: log_field(summary, "ringbuf_full")?,
            sink_dropped: log_field(summary, "sink_dropped")?,
        })
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

struct BodyResult {
    body: &'static Body,
    without_agent: WrkResult,
    with_agent: WrkResult,
    agent_cpu_seconds: f64,
    agent_peak_rss_mib: f64,
    agent: AgentSummary,
}

impl BodyResult {
    fn throughput_ratio(&self) -> f64 {
        self.with_agent.requests_per_second / self.without_agent.requests_per_second
    }

    /// wrk counts only completed requests: up to one in flight per connection is captured
    /// but not counted, so this can exceed 1 slightly.
    fn capture_ratio(&self) -> f64 {
        self.agent.payloads as f64 / self.with_agent.requests as f64
    }

    fn agent_cpu_us_per_payload(&self) -> f64 {
        self.agent_cpu_seconds * 1e6 / self.agent.payloads as f64
    }
}

fn measure_body(
    ports: Ports,
    nginx_pid: u32,
    ticks_per_second: f64,
    body: &'static Body,
) -> anyhow::Result<BodyResult> {
    let url = ports.url(body);
    eprintln!("bench: {} without the agent", body.label);
    let without_agent = wrk(&url)?;
    eprintln!("bench: {} with the agent", body.label);
    let agent = Agent::start(nginx_pid)?;
    // Attaching costs CPU too: count only what the load costs.
    let ticks_before = agent.cpu_ticks()?;
    let with_agent = wrk(&url)?;
    agent.wait_until_idle()?;
    let agent_cpu_seconds = (agent.cpu_ticks()? - ticks_before) as f64 / ticks_per_second;
    let agent_peak_rss_mib = agent.peak_rss_mib()?;
    Ok(BodyResult {
        body,
        without_agent,
        with_agent,
        agent_cpu_seconds,
        agent_peak_rss_mib,
        agent: agent.stop()?,
    })
}

/// Nanoseconds per write(2) in a process the agent does not watch: its syscall tracepoints fire
/// for every process, and filter in the kernel.
struct UnwatchedWriteCost {
    without_agent_ns: f64,
    with_agent_ns: f64,
}

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

fn measure_unwatched_writes(watched_pid: u32) -> anyhow::Result<UnwatchedWriteCost> {
    eprintln!("bench: write(2) in an unwatched process");
    let without_agent_ns = write_ns()?;
    let agent = Agent::start(watched_pid)?;
    let with_agent_ns = write_ns()?;
    agent.stop()?;
    Ok(UnwatchedWriteCost {
        without_agent_ns,
        with_agent_ns,
    })
}

fn print_table(results: &[BodyResult], writes: &UnwatchedWriteCost) {
    let row = |name: &str, cell: &dyn Fn(&BodyResult) -> String| {
        let cells: String = results
            .iter()
            .map(|result| format!("{:>16}", cell(result)))
            .collect();
        println!("{name:<36}{cells}");
    };
    println!(
        "nginx (1 worker, keep-alive, sendfile off; HTTPS: TLS 1.3 via OpenSSL) under wrk -t1 -c{WRK_CONNECTIONS} \
         -d{WRK_SECONDS}s on 127.0.0.1"
    );
    row("response body", &|r| r.body.label.to_string());
    row("req/s without agent", &|r| {
        format!("{:.0}", r.without_agent.requests_per_second)
    });
    row("req/s with agent", &|r| {
        format!("{:.0}", r.with_agent.requests_per_second)
    });
    row("throughput ratio (with/without)", &|r| {
        format!("{:.3}", r.throughput_ratio())
    });
    row("p50 latency µs (without / with)", &|r| {
        format!("{:.0} / {:.0}", r.without_agent.p50_us, r.with_agent.p50_us)
    });
    row("p99 latency µs (without / with)", &|r| {
        format!("{:.0} / {:.0}", r.without_agent.p99_us, r.with_agent.p99_us)
    });
    row("requests sent (with agent)", &|r| {
        r.with_agent.requests.to_string()
    });
    row("payloads emitted", &|r| r.agent.payloads.to_string());
    row("capture ratio (payloads/requests)", &|r| {
        format!("{:.4}", r.capture_ratio())
    });
    row("agent CPU seconds", &|r| {
        format!("{:.2}", r.agent_cpu_seconds)
    });
    row("agent CPU µs per payload", &|r| {
        format!("{:.1}", r.agent_cpu_us_per_payload())
    });
    row("agent peak RSS MiB", &|r| {
        format!("{:.1}", r.agent_peak_rss_mib)
    });
    row("ring-buffer drops (records)", &|r| {
        r.agent.ringbuf_full.to_string()
    });
    row("sink queue drops (payloads)", &|r| {
        r.agent.sink_dropped.to_string()
    });
    println!(
        "write(2) of 64 bytes in an unwatched process: {:.0} ns without the agent, {:.0} ns with it",
        writes.without_agent_ns, writes.with_agent_ns
    );
}

/// A JSON number, or null for NaN and infinities (e.g. CPU per payload with no payload).
fn json_number(value: f64, decimals: usize) -> String {
    if value.is_finite() {
        format!("{value:.decimals$}")
    } else {
        "null".to_string()
    }
}

fn to_json(results: &[BodyResult], writes: &UnwatchedWriteCost) -> String {
    let bodies: Vec<String> = results
        .iter()
        .map(|r| {
            format!(
                "    {{\"body\": \"{}\", \"https\": {}, \"body_bytes\": {}, \
                 \"rps_without_agent\": {}, \"rps_with_agent\": {}, \"throughput_ratio\": {}, \
                 \"p50_us_without_agent\": {}, \"p50_us_with_agent\": {}, \
                 \"p99_us_without_agent\": {}, \"p99_us_with_agent\": {}, \
                 \"requests\": {}, \"payloads\": {}, \"capture_ratio\": {}, \
                 \"agent_cpu_seconds\": {}, \"agent_cpu_us_per_payload\": {}, \
                 \"agent_peak_rss_mib\": {}, \"ringbuf_drops\": {}, \"sink_drops\": {}}}",
                r.body.path,
                r.body.https,
                r.body.bytes,
                json_number(r.without_agent.requests_per_second, 1),
                json_number(r.with_agent.requests_per_second, 1),
                json_number(r.throughput_ratio(), 4),
                json_number(r.without_agent.p50_us, 1),
                json_number(r.with_agent.p50_us, 1),
                json_number(r.without_agent.p99_us, 1),
                json_number(r.with_agent.p99_us, 1),
                r.with_agent.requests,
                r.agent.payloads,
                json_number(r.capture_ratio(), 4),
                json_number(r.agent_cpu_seconds, 3),
                json_number(r.agent_cpu_us_per_payload(), 2),
                json_number(r.agent_peak_rss_mib, 1),
                r.agent.ringbuf_full,
                r.agent.sink_dropped,
            )
        })
        .collect();
    format!(
        "{{\n  \"wrk\": {{\"threads\": 1, \"connections\": {WRK_CONNECTIONS}, \"seconds\": {WRK_SECONDS}}},\n  \
         \"bodies\": [\n{}\n  ],\n  \
         \"unwatched_write_ns_without_agent\": {},\n  \"unwatched_write_ns_with_agent\": {}\n}}\n",
        bodies.join(",\n"),
        json_number(writes.without_agent_ns, 1),
        json_number(writes.with_agent_ns, 1),
    )
}

pub fn run() -> anyhow::Result<()> {
    ensure_tools()?;
    build_agent(true)?;
    fs::create_dir_all(bench_dir())?;
    let ticks_per_second = clock_ticks_per_second()?;
    let ports = Ports {
        http: free_port()?,
        https: free_port()?,
    };
    let mut nginx = start_nginx(ports)?;
    let results = BODIES
        .iter()
        .map(|body| measure_body(ports, nginx.pid(), ticks_per_second, body))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let writes = measure_unwatched_writes(nginx.pid())?;
    nginx.stop().context("stopping nginx")?;

    print_table(&results, &writes);
    let json_path = bench_dir().join("capture.json");
    fs::write(&json_path, to_json(&results, &writes))
        .with_context(|| format!("writing {}", json_path.display()))?;
    println!("written to {}", json_path.display());
    Ok(())
}
