//! `cargo xtask bench`: the agent's cost, measured on loopback in one run on this machine.
//!
//! - nginx (1 KiB, 64 KiB, 1 KiB over HTTPS) under wrk at saturation: without the agent, with
//!   the agent writing to stdout, and with the agent publishing to the Pub/Sub emulator;
//! - a Flask app under gunicorn the same way, plus the same app instrumented with the
//!   apitoolkit-flask SDK publishing to the emulator (what Flask users run today);
//! - nginx at fixed rates (hey) with and without the agent;
//! - the cost of write(2) in a process the agent does not watch.
//!
//! Prints one table per scenario and which targets were met, and writes everything to
//! target/bench/capture.json. Numbers are reported, not asserted: only setup failures fail.

mod load;

use std::{
    fs,
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use serde_json::{Value, json};

use crate::{
    agent_binary, build_agent,
    services::{ChildGuard, free_port},
    setup, workspace_root,
};
use load::{Load, LoadResult};

const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for the agent to work off the backlog a load run leaves behind.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The agent publishes what is queued before it exits (at most 10 s), then stops.
const AGENT_STOP_TIMEOUT: Duration = Duration::from_secs(30);
const WRITES_PER_ROUND: u32 = 200_000;
const WRITE_ROUNDS: u32 = 5;
const FIXED_RATES: [u32; 2] = [1_000, 5_000];
const GUNICORN_WORKERS: u32 = 2;
const TOPIC: &str = "bench";
/// The Pub/Sub project the metadata stub hands out (tests/apps/metadata_stub.py).
const PUBSUB_PROJECT: &str = "apitoolkit-test";

/// The targets the agent is held to.
const TARGET_THROUGHPUT_RATIO: f64 = 0.97;
const TARGET_CPU_US_PER_REQUEST: f64 = 15.0;
const TARGET_RSS_MIB: f64 = 64.0;

/// A response body nginx serves, under `/<path>`, over HTTP or HTTPS.
struct Body {
    path: &'static str,
    label: &'static str,
    bytes: usize,
    https: bool,
}

const KIB: Body = Body {
    path: "1k",
    label: "1 KiB",
    bytes: 1024,
    https: false,
};
const SIXTY_FOUR_KIB: Body = Body {
    path: "64k",
    label: "64 KiB",
    bytes: 64 * 1024,
    https: false,
};
const KIB_HTTPS: Body = Body {
    path: "1k",
    label: "1 KiB HTTPS",
    bytes: 1024,
    https: true,
};

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

fn installed(tool: &str) -> bool {
    Command::new("which")
        .arg(tool)
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

fn ensure_tools() -> anyhow::Result<()> {
    if ["nginx", "wrk", "hey", "curl", "openssl"]
        .iter()
        .all(|tool| installed(tool))
    {
        return Ok(());
    }
    eprintln!("bench: installing nginx, wrk, hey, curl and openssl");
    crate::run(Command::new("apt-get").args(["update", "-qq"]))?;
    crate::run(Command::new("apt-get").args([
        "install", "-y", "-qq", "nginx", "wrk", "hey", "curl", "openssl",
    ]))
}

fn bench_dir() -> PathBuf {
    workspace_root().join("target/bench")
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

/// nginx with one worker (the other core runs the load and the agent) and `sendfile off`, so
/// every response body goes through write(2) and is captured: the agent's most expensive path.
/// The HTTPS server uses a self-signed certificate made here.
fn start_nginx(ports: Ports) -> anyhow::Result<ChildGuard> {
    let prefix = bench_dir().join("nginx");
    let html = prefix.join("html");
    fs::create_dir_all(&html).with_context(|| format!("creating {}", html.display()))?;
    fs::create_dir_all(prefix.join("logs"))?;
    for body in [&KIB, &SIXTY_FOUR_KIB] {
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
    nginx.wait_for_port(ports.https, "nginx")?;
    Ok(nginx)
}

/// The Pub/Sub emulator with the bench topic (no subscription: published messages are
/// acknowledged and discarded, so the emulator costs what publishing costs).
struct Emulator {
    /// Held for its drop, which kills the emulator.
    _process: ChildGuard,
    host: String,
}

impl Emulator {
    fn start() -> anyhow::Result<Self> {
        const EMULATOR: &str =
            "/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator";
        let port = free_port()?;
        eprintln!("bench: starting the Pub/Sub emulator");
        let mut process = ChildGuard {
            child: Command::new(EMULATOR)
                .args(["--host=127.0.0.1", &format!("--port={port}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {EMULATOR}"))?,
            signal: "KILL",
        };
        process.wait_for_port(port, "the Pub/Sub emulator")?;
        let host = format!("127.0.0.1:{port}");
        crate::run(Command::new("curl").args([
            "-sf",
            "-X",
            "PUT",
            "-o",
            "/dev/null",
            &format!("http://{host}/v1/projects/{PUBSUB_PROJECT}/topics/{TOPIC}"),
        ]))
        .context("creating the bench topic")?;
        Ok(Self {
            _process: process,
            host,
        })
    }
}

/// Where the agent under test sends payloads.
#[derive(Clone, Copy, PartialEq)]
enum Sink {
    Stdout,
    PubSub,
}

/// The agent, watching one process; its payloads are counted, not stored (gigabytes at
/// saturation).
struct Agent {
    process: ChildGuard,
    sink: Sink,
    /// Collects the agent's stderr lines until it exits.
    log_reader: thread::JoinHandle<Vec<String>>,
    /// Counts payload lines on the agent's stdout until it exits.
    payload_counter: thread::JoinHandle<u64>,
}

/// What the agent cost during one load run and what it reported.
struct AgentCost {
    cpu_seconds: f64,
    peak_rss_mib: f64,
    /// Payloads written to stdout, or acknowledged by Pub/Sub.
    payloads: u64,
    ringbuf_full: u64,
    sink_dropped: u64,
}

impl Agent {
    /// Starts the agent and returns once its probes are attached.
    fn start(watched_pid: u32, sink: Sink, emulator: &Emulator) -> anyhow::Result<Self> {
        let mut command = Command::new(agent_binary());
        command.args(["--pid", &watched_pid.to_string()]);
        if sink == Sink::PubSub {
            command
                .args(["--pubsub-project", PUBSUB_PROJECT, "--topic", TOPIC])
                .env("PUBSUB_EMULATOR_HOST", &emulator.host);
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
    /// ring buffer and payloads still queued for its sink.
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
    /// payloads it wrote to stdout.
    fn shut_down(mut self) -> anyhow::Result<(ExitStatus, Vec<String>, u64)> {
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
    fn measure(
        self,
        ticks_per_second: f64,
        load: impl FnOnce() -> anyhow::Result<LoadResult>,
    ) -> anyhow::Result<(LoadResult, AgentCost)> {
        // Attaching costs CPU too: count only what the load costs.
        let ticks_before = self.cpu_ticks()?;
        let result = load()?;
        self.wait_until_idle()?;
        let cpu_seconds = (self.cpu_ticks()? - ticks_before) as f64 / ticks_per_second;
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
            Sink::PubSub => log_field(line("Pub/Sub sink stopped")?, "published")?,
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

/// One load run: the first of a scenario runs without any instrumentation, and is the
/// baseline of the others.
struct Run {
    label: &'static str,
    load: LoadResult,
    agent: Option<AgentCost>,
}

struct Scenario {
    title: String,
    runs: Vec<Run>,
}

impl Run {
    fn capture_ratio(&self) -> Option<f64> {
        // Load tools count only completed requests: up to one in flight per connection is
        // captured but not counted, so this can exceed 1 slightly.
        let agent = self.agent.as_ref()?;
        Some(agent.payloads as f64 / self.load.requests as f64)
    }

    fn cpu_us_per_payload(&self) -> Option<f64> {
        let agent = self.agent.as_ref()?;
        Some(agent.cpu_seconds * 1e6 / agent.payloads as f64)
    }
}

impl Scenario {
    fn baseline(&self) -> &LoadResult {
        &self.runs[0].load
    }

    fn throughput_ratio(&self, run: &Run) -> f64 {
        run.load.requests_per_second / self.baseline().requests_per_second
    }

    fn print(&self) {
        println!("\n{}", self.title);
        let row = |name: &str, cell: &dyn Fn(&Run) -> Option<String>| {
            let cells: String = self
                .runs
                .iter()
                .map(|run| format!("{:>24}", cell(run).unwrap_or_else(|| "-".into())))
                .collect();
            println!("  {name:<34}{cells}");
        };
        row("", &|run| Some(run.label.to_string()));
        row("req/s", &|run| {
            Some(format!("{:.0}", run.load.requests_per_second))
        });
        row("throughput ratio", &|run| {
            Some(format!("{:.3}", self.throughput_ratio(run)))
        });
        row("p50 / p99 latency µs", &|run| {
            Some(format!("{:.0} / {:.0}", run.load.p50_us, run.load.p99_us))
        });
        row("requests completed / failed", &|run| {
            Some(format!("{} / {}", run.load.requests, run.load.errors))
        });
        row("payloads (stdout / published)", &|run| {
            Some(run.agent.as_ref()?.payloads.to_string())
        });
        row("capture ratio", &|run| {
            Some(format!("{:.4}", run.capture_ratio()?))
        });
        row("agent CPU µs per payload", &|run| {
            Some(format!("{:.1}", run.cpu_us_per_payload()?))
        });
        row("agent peak RSS MiB", &|run| {
            Some(format!("{:.1}", run.agent.as_ref()?.peak_rss_mib))
        });
        row("ring-buffer / sink drops", &|run| {
            let agent = run.agent.as_ref()?;
            Some(format!("{} / {}", agent.ringbuf_full, agent.sink_dropped))
        });
    }

    fn to_json(&self) -> Value {
        let runs: Vec<Value> = self
            .runs
            .iter()
            .map(|run| {
                json!({
                    "label": run.label,
                    "requests": run.load.requests,
                    "request_errors": run.load.errors,
                    "requests_per_second": run.load.requests_per_second,
                    "throughput_ratio": self.throughput_ratio(run),
                    "p50_us": run.load.p50_us,
                    "p99_us": run.load.p99_us,
                    "payloads": run.agent.as_ref().map(|agent| agent.payloads),
                    "capture_ratio": run.capture_ratio(),
                    "agent_cpu_seconds": run.agent.as_ref().map(|agent| agent.cpu_seconds),
                    "agent_cpu_us_per_payload": run.cpu_us_per_payload(),
                    "agent_peak_rss_mib": run.agent.as_ref().map(|agent| agent.peak_rss_mib),
                    "ringbuf_drops": run.agent.as_ref().map(|agent| agent.ringbuf_full),
                    "sink_drops": run.agent.as_ref().map(|agent| agent.sink_dropped),
                })
            })
            .collect();
        json!({"title": self.title, "runs": runs})
    }
}

/// Runs `load` bare, then once per sink with the agent watching `pid`.
fn with_and_without_agent(
    title: String,
    pid: u32,
    sinks: &[Sink],
    context: &Context,
    load: &dyn Fn() -> anyhow::Result<LoadResult>,
) -> anyhow::Result<Scenario> {
    eprintln!("bench: {title}: without the agent");
    let mut runs = vec![Run {
        label: "no agent",
        load: load()?,
        agent: None,
    }];
    for &sink in sinks {
        let label = match sink {
            Sink::Stdout => "agent → stdout",
            Sink::PubSub => "agent → Pub/Sub",
        };
        eprintln!("bench: {title}: {label}");
        let agent = Agent::start(pid, sink, &context.emulator)?;
        let (load, cost) = agent.measure(context.ticks_per_second, load)?;
        runs.push(Run {
            label,
            load,
            agent: Some(cost),
        });
    }
    Ok(Scenario { title, runs })
}

struct Context {
    emulator: Emulator,
    ticks_per_second: f64,
}

fn nginx_scenarios(context: &Context) -> anyhow::Result<Vec<Scenario>> {
    let ports = Ports {
        http: free_port()?,
        https: free_port()?,
    };
    let mut nginx = start_nginx(ports)?;
    let pid = nginx.pid();
    let mut scenarios = Vec::new();
    for (body, sinks) in [
        (&KIB, &[Sink::Stdout, Sink::PubSub][..]),
        (&SIXTY_FOUR_KIB, &[Sink::Stdout, Sink::PubSub][..]),
        (&KIB_HTTPS, &[Sink::Stdout][..]),
    ] {
        let url = ports.url(body);
        scenarios.push(with_and_without_agent(
            format!("nginx, {}, {}", body.label, Load::Saturation.describe()),
            pid,
            sinks,
            context,
            &|| Load::Saturation.run(&url),
        )?);
    }
    let url = ports.url(&KIB);
    for rate in FIXED_RATES {
        let load = Load::Rate(rate);
        scenarios.push(with_and_without_agent(
            format!("nginx, 1 KiB, {}", load.describe()),
            pid,
            &[Sink::Stdout],
            context,
            &|| load.run(&url),
        )?);
    }
    nginx.stop().context("stopping nginx")?;
    Ok(scenarios)
}

fn start_gunicorn(module: &str, port: u16, env: &[(&str, &str)]) -> anyhow::Result<ChildGuard> {
    let mut gunicorn = ChildGuard {
        child: Command::new("python3")
            .args(["-m", "gunicorn", "--workers", &GUNICORN_WORKERS.to_string()])
            .args(["--bind", &format!("127.0.0.1:{port}"), "--chdir"])
            .arg(workspace_root().join("tests/apps"))
            .arg(module)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting gunicorn")?,
        signal: "TERM",
    };
    gunicorn.wait_for_port(port, "gunicorn")?;
    Ok(gunicorn)
}

/// A service account with a real RSA key: the SDK parses it before it sees the emulator.
fn service_account_file() -> anyhow::Result<PathBuf> {
    let output = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ])
        .output()
        .context("running openssl genpkey")?;
    if !output.status.success() {
        bail!("openssl genpkey failed with {}", output.status);
    }
    let account = json!({
        "type": "service_account",
        "project_id": PUBSUB_PROJECT,
        "private_key_id": "bench",
        "private_key": String::from_utf8(output.stdout)?,
        "client_email": format!("bench@{PUBSUB_PROJECT}.iam.gserviceaccount.com"),
        "client_id": "1",
        "token_uri": "https://oauth2.googleapis.com/token",
    });
    let path = bench_dir().join("service-account.json");
    fs::write(&path, account.to_string())?;
    Ok(path)
}

/// The Flask app of the tests under gunicorn: bare, watched by the agent, and instrumented with
/// the apitoolkit-flask SDK (the SDK publishes each request before answering it).
fn flask_scenario(context: &Context) -> anyhow::Result<Scenario> {
    let port = free_port()?;
    let url = format!("http://127.0.0.1:{port}/item/1");
    let load = || Load::Saturation.run(&url);
    let title = format!(
        "Flask under gunicorn ({GUNICORN_WORKERS} sync workers), GET /item/1, {}",
        Load::Saturation.describe()
    );
    let mut gunicorn = start_gunicorn("flask_app:app", port, &[])?;
    let mut scenario = with_and_without_agent(
        title.clone(),
        gunicorn.pid(),
        &[Sink::Stdout, Sink::PubSub],
        context,
        &load,
    )?;
    gunicorn.stop().context("stopping gunicorn")?;

    let stub_port = free_port()?;
    let mut stub = ChildGuard {
        child: Command::new("python3")
            .arg(workspace_root().join("tests/apps/metadata_stub.py"))
            .args([&stub_port.to_string(), TOPIC])
            .arg(service_account_file()?)
            .spawn()
            .context("starting the metadata stub")?,
        signal: "TERM",
    };
    stub.wait_for_port(stub_port, "the metadata stub")?;
    eprintln!("bench: {title}: apitoolkit-flask SDK → Pub/Sub");
    let root_url = format!("http://127.0.0.1:{stub_port}");
    let mut instrumented = start_gunicorn(
        "flask_sdk_app:app",
        port,
        &[
            ("APITOOLKIT_KEY", "test-api-key"),
            ("APITOOLKIT_ROOT_URL", &root_url),
            ("PUBSUB_EMULATOR_HOST", &context.emulator.host),
        ],
    )?;
    scenario.runs.push(Run {
        label: "apitoolkit-flask SDK",
        load: load()?,
        agent: None,
    });
    instrumented.stop().context("stopping gunicorn")?;
    stub.stop()?;
    Ok(scenario)
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

/// Nanoseconds per write(2) in a process the agent does not watch, without and with the agent:
/// its syscall tracepoints fire for every process and filter in the kernel.
fn unwatched_write_ns(context: &Context) -> anyhow::Result<(f64, f64)> {
    eprintln!("bench: write(2) in an unwatched process");
    let without = write_ns()?;
    // The agent needs something to watch: a process that only sleeps.
    let sleeper = ChildGuard {
        child: Command::new("sleep").arg("600").spawn()?,
        signal: "TERM",
    };
    let agent = Agent::start(sleeper.pid(), Sink::Stdout, &context.emulator)?;
    let with = write_ns()?;
    let (status, log, _) = agent.shut_down()?;
    if !status.success() {
        bail!("the agent exited with {status}:\n{}", log.join("\n"));
    }
    Ok((without, with))
}

/// One line per target: the value measured and whether it is met.
fn targets(scenarios: &[Scenario]) -> Vec<(String, String, bool)> {
    let stdout_run = |title_start: &str| {
        scenarios
            .iter()
            .find(|scenario| scenario.title.starts_with(title_start))
            .and_then(|scenario| {
                let run = scenario
                    .runs
                    .iter()
                    .find(|run| run.label == "agent → stdout")?;
                Some((scenario, run))
            })
    };
    let mut lines = Vec::new();
    if let Some((scenario, run)) = stdout_run("nginx, 1 KiB, saturation") {
        let ratio = scenario.throughput_ratio(run);
        lines.push((
            format!("throughput ratio ≥ {TARGET_THROUGHPUT_RATIO} (nginx 1 KiB, saturation)"),
            format!("{ratio:.3}"),
            ratio >= TARGET_THROUGHPUT_RATIO,
        ));
    }
    for title in ["nginx, 1 KiB, saturation", "nginx, 1 KiB, 5000 req/s"] {
        if let Some(cpu) = stdout_run(title).and_then(|(_, run)| run.cpu_us_per_payload()) {
            lines.push((
                format!("agent CPU ≤ {TARGET_CPU_US_PER_REQUEST} µs per request ({title})"),
                format!("{cpu:.1} µs"),
                cpu <= TARGET_CPU_US_PER_REQUEST,
            ));
        }
    }
    let peak_rss = scenarios
        .iter()
        .flat_map(|scenario| &scenario.runs)
        .filter_map(|run| Some(run.agent.as_ref()?.peak_rss_mib))
        .fold(0.0, f64::max);
    lines.push((
        format!("agent RSS ≤ {TARGET_RSS_MIB} MiB (highest of all runs)"),
        format!("{peak_rss:.1} MiB"),
        peak_rss <= TARGET_RSS_MIB,
    ));
    if let Some((_, run)) = stdout_run("nginx, 1 KiB, 5000 req/s")
        && let Some(agent) = &run.agent
    {
        let complete = agent.payloads >= run.load.requests && agent.ringbuf_full == 0;
        lines.push((
            "100% capture at 5000 req/s".to_string(),
            format!(
                "{} payloads / {} requests",
                agent.payloads, run.load.requests
            ),
            complete,
        ));
    }
    lines
}

pub fn run() -> anyhow::Result<()> {
    ensure_tools()?;
    setup::python_packages()?;
    setup::bench_python_packages()?;
    build_agent(true)?;
    fs::create_dir_all(bench_dir())?;
    let context = Context {
        emulator: Emulator::start()?,
        ticks_per_second: clock_ticks_per_second()?,
    };
    let mut scenarios = nginx_scenarios(&context)?;
    scenarios.push(flask_scenario(&context)?);
    let (write_without_ns, write_with_ns) = unwatched_write_ns(&context)?;

    for scenario in &scenarios {
        scenario.print();
    }
    println!(
        "\nwrite(2) of 64 bytes in an unwatched process: {write_without_ns:.0} ns without the agent, \
         {write_with_ns:.0} ns with it"
    );
    let targets = targets(&scenarios);
    println!("\ntargets");
    for (target, value, met) in &targets {
        let verdict = if *met { "met" } else { "NOT met" };
        println!("  {target:<64} {value:>28}  {verdict}");
    }

    let report = json!({
        "load": {"tool_saturation": "wrk", "tool_fixed_rate": "hey", "seconds": load::SECONDS,
                 "connections": load::CONNECTIONS},
        "scenarios": scenarios.iter().map(Scenario::to_json).collect::<Vec<_>>(),
        "unwatched_write_ns_without_agent": write_without_ns,
        "unwatched_write_ns_with_agent": write_with_ns,
        "targets": targets.iter().map(|(target, value, met)| {
            json!({"target": target, "value": value, "met": met})
        }).collect::<Vec<_>>(),
    });
    let json_path = bench_dir().join("capture.json");
    fs::write(&json_path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    println!("written to {}", json_path.display());
    drop(context);
    Ok(())
}
