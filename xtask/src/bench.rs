//! `cargo xtask bench`: nginx under wrk with and without the agent, in one run, on loopback.
//! Prints throughput, latency, capture completeness, agent CPU per request, peak RSS and
//! kernel-side drops, and writes them to target/bench/capture.json. Numbers, not assertions.

use std::{
    fs,
    io::{BufRead, BufReader},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{agent_binary, build_agent, workspace_root};

const WRK_SECONDS: u32 = 8;
const WRK_CONNECTIONS: u32 = 8;
const SYSCALL_LOOP: u32 = 200_000;

/// Kills the child when dropped, so a failed run leaves no server or agent behind.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
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

/// nginx with one worker (the other core runs wrk and the agent) and `sendfile off`, so every
/// response body goes through write(2) and is captured: the agent's most expensive path.
fn start_nginx(port: u16) -> anyhow::Result<Guard> {
    let prefix = bench_dir().join("nginx");
    let html = prefix.join("html");
    fs::create_dir_all(&html)?;
    fs::create_dir_all(prefix.join("logs"))?;
    fs::write(html.join("1k"), vec![b'a'; 1024])?;
    fs::write(html.join("64k"), vec![b'b'; 64 * 1024])?;
    let config = format!(
        "daemon off;\nmaster_process on;\nworker_processes 1;\npid {pid};\nerror_log {log} warn;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n  access_log off;\n  sendfile off;\n  keepalive_requests 1000000;\n  default_type application/octet-stream;\n\
         \n  server {{ listen 127.0.0.1:{port}; root {root}; }}\n}}\n",
        pid = prefix.join("nginx.pid").display(),
        log = prefix.join("logs/error.log").display(),
        root = html.display(),
    );
    let config_path = prefix.join("nginx.conf");
    fs::write(&config_path, config)?;
    let nginx = Guard(
        Command::new("nginx")
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&config_path)
            .stdout(Stdio::null())
            .spawn()
            .context("starting nginx")?,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
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
    p50_ms: f64,
    p99_ms: f64,
}

/// wrk prints latencies as `1.23ms`, `456.00us` or `1.02s`.
fn milliseconds(value: &str) -> f64 {
    let (number, scale) = if let Some(us) = value.strip_suffix("us") {
        (us, 0.001)
    } else if let Some(ms) = value.strip_suffix("ms") {
        (ms, 1.0)
    } else if let Some(s) = value.strip_suffix('s') {
        (s, 1000.0)
    } else {
        (value, 1.0)
    };
    number.parse::<f64>().unwrap_or(f64::NAN) * scale
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
    let mut result = WrkResult::default();
    for line in text.lines().map(str::trim) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["Requests/sec:", value] => result.requests_per_second = value.parse()?,
            [count, "requests", "in", ..] => result.requests = count.parse()?,
            ["50%", value] => result.p50_ms = milliseconds(value),
            ["99%", value] => result.p99_ms = milliseconds(value),
            _ => {}
        }
    }
    if result.requests == 0 {
        bail!("wrk reported no requests:\n{text}");
    }
    Ok(result)
}

struct Agent {
    process: Guard,
    log: Arc<Mutex<Vec<String>>>,
    payloads_path: PathBuf,
}

impl Agent {
    fn start(pid: u32, payloads_path: &Path) -> anyhow::Result<Self> {
        let mut process = Guard(
            Command::new(agent_binary())
                .args(["--pid", &pid.to_string()])
                .stdout(fs::File::create(payloads_path)?)
                .stderr(Stdio::piped())
                .spawn()
                .context("starting the agent")?,
        );
        let log = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let stderr = process.0.stderr.take().expect("stderr is piped");
        let lines = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("watching processes") {
                    let _ = ready_tx.send(());
                }
                lines.lock().expect("log lock").push(line);
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(60))
            .context("the agent did not attach")?;
        Ok(Self {
            process,
            log,
            payloads_path: payloads_path.to_owned(),
        })
    }

    fn pid(&self) -> u32 {
        self.process.0.id()
    }

    /// CPU seconds (user + system) the agent used so far.
    fn cpu_seconds(&self) -> anyhow::Result<f64> {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid()))?;
        let fields: Vec<&str> = stat[stat.rfind(')').context("malformed stat")? + 2..]
            .split_whitespace()
            .collect();
        // utime and stime are fields 14 and 15 of stat, 12 and 13 after the command name.
        let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
        Ok(ticks / clock_ticks_per_second())
    }

    fn peak_rss_mib(&self) -> anyhow::Result<f64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let kib: f64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|value| value.split_whitespace().next())
            .context("no VmHWM")?
            .parse()?;
        Ok(kib / 1024.0)
    }

    /// Stops the agent and returns (payloads written, the `capture stopped` log line).
    fn stop(mut self) -> anyhow::Result<(u64, String)> {
        crate::run(Command::new("kill").args(["-INT", &self.pid().to_string()]))?;
        self.process.0.wait()?;
        thread::sleep(Duration::from_millis(100));
        let payloads = BufReader::new(fs::File::open(&self.payloads_path)?)
            .lines()
            .count() as u64;
        let summary = self
            .log
            .lock()
            .expect("log lock")
            .iter()
            .find(|line| line.contains("capture stopped"))
            .cloned()
            .unwrap_or_default();
        Ok((payloads, summary))
    }
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|output| String::from_utf8_lossy(&output.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

fn log_field(summary: &str, key: &str) -> u64 {
    summary
        .split_whitespace()
        .find_map(|token| token.strip_prefix(key)?.strip_prefix('='))
        .and_then(|value| value.parse().ok())
        .unwrap_or(0)
}

struct SizeResult {
    path: &'static str,
    without: WrkResult,
    with: WrkResult,
    payloads: u64,
    cpu_us_per_request: f64,
    peak_rss_mib: f64,
    ringbuf_drops: u64,
    sink_drops: u64,
}

fn bench_size(port: u16, nginx_pid: u32, path: &'static str) -> anyhow::Result<SizeResult> {
    let url = format!("http://127.0.0.1:{port}/{path}");
    eprintln!("bench: {path} without the agent");
    let without = wrk(&url)?;
    eprintln!("bench: {path} with the agent");
    let agent = Agent::start(
        nginx_pid,
        &bench_dir().join(format!("payloads-{path}.ndjson")),
    )?;
    let cpu_before = agent.cpu_seconds()?;
    let with = wrk(&url)?;
    // Let the agent finish what the load left in the ring buffer before reading its CPU time.
    thread::sleep(Duration::from_millis(500));
    let cpu = agent.cpu_seconds()? - cpu_before;
    let peak_rss_mib = agent.peak_rss_mib()?;
    let (payloads, summary) = agent.stop()?;
    Ok(SizeResult {
        path,
        without,
        with,
        payloads,
        cpu_us_per_request: cpu * 1e6 / payloads.max(1) as f64,
        peak_rss_mib,
        ringbuf_drops: log_field(&summary, "ringbuf_full"),
        sink_drops: log_field(&summary, "sink_dropped"),
    })
}

/// Nanoseconds per 64-byte write(2) to /dev/null in a process the agent does not watch.
fn syscall_ns() -> anyhow::Result<f64> {
    let script = format!(
        "import os, time\nfd = os.open('/dev/null', os.O_WRONLY)\nbuf = b'x' * 64\n\
         start = time.perf_counter_ns()\nfor _ in range({SYSCALL_LOOP}): os.write(fd, buf)\n\
         print((time.perf_counter_ns() - start) / {SYSCALL_LOOP})"
    );
    let output = Command::new("python3").args(["-c", &script]).output()?;
    Ok(String::from_utf8_lossy(&output.stdout).trim().parse()?)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub fn run() -> anyhow::Result<()> {
    ensure_tools()?;
    build_agent(true)?;
    fs::create_dir_all(bench_dir())?;
    let port = free_port()?;
    let nginx = start_nginx(port)?;
    let nginx_pid = nginx.0.id();

    let sizes = [
        bench_size(port, nginx_pid, "1k")?,
        bench_size(port, nginx_pid, "64k")?,
    ];
    let syscall_without = syscall_ns()?;
    let agent = Agent::start(nginx_pid, &bench_dir().join("payloads-idle.ndjson"))?;
    let syscall_with = syscall_ns()?;
    agent.stop()?;
    drop(nginx);

    println!(
        "nginx keep-alive, wrk -t1 -c{WRK_CONNECTIONS} -d{WRK_SECONDS}s, 1 nginx worker, sendfile off"
    );
    println!(
        "{:<6} {:>10} {:>10} {:>7} {:>15} {:>15} {:>9} {:>9} {:>8} {:>10} {:>9} {:>9} {:>9}",
        "body",
        "rps off",
        "rps on",
        "ratio",
        "p50 ms off/on",
        "p99 ms off/on",
        "requests",
        "payloads",
        "capture",
        "cpu us/req",
        "rss MiB",
        "rb drops",
        "q drops"
    );
    let mut json_sizes = Vec::new();
    for size in &sizes {
        let ratio = size.with.requests_per_second / size.without.requests_per_second;
        let capture = size.payloads as f64 / size.with.requests as f64;
        println!(
            "{:<6} {:>10.0} {:>10.0} {:>7.3} {:>7.2}/{:<7.2} {:>7.2}/{:<7.2} {:>9} {:>9} {:>8.4} {:>10.1} {:>9.1} {:>9} {:>9}",
            size.path,
            size.without.requests_per_second,
            size.with.requests_per_second,
            ratio,
            size.without.p50_ms,
            size.with.p50_ms,
            size.without.p99_ms,
            size.with.p99_ms,
            size.with.requests,
            size.payloads,
            capture,
            size.cpu_us_per_request,
            size.peak_rss_mib,
            size.ringbuf_drops,
            size.sink_drops,
        );
        json_sizes.push(format!(
            "{{\"body\": \"{}\", \"rps_without\": {:.1}, \"rps_with\": {:.1}, \"throughput_ratio\": {ratio:.4}, \
             \"p50_ms_without\": {:.3}, \"p50_ms_with\": {:.3}, \"p99_ms_without\": {:.3}, \"p99_ms_with\": {:.3}, \
             \"requests\": {}, \"payloads\": {}, \"capture_ratio\": {capture:.4}, \"cpu_us_per_request\": {:.2}, \
             \"peak_rss_mib\": {:.1}, \"ringbuf_drops\": {}, \"sink_drops\": {}}}",
            size.path,
            size.without.requests_per_second,
            size.with.requests_per_second,
            size.without.p50_ms,
            size.with.p50_ms,
            size.without.p99_ms,
            size.with.p99_ms,
            size.with.requests,
            size.payloads,
            size.cpu_us_per_request,
            size.peak_rss_mib,
            size.ringbuf_drops,
            size.sink_drops,
        ));
    }
    println!(
        "write(2) in an unwatched process: {syscall_without:.0} ns without the agent, {syscall_with:.0} ns with it"
    );
    let json = format!(
        "{{\"sizes\": [{}], \"unwatched_write_ns_without\": {syscall_without:.1}, \"unwatched_write_ns_with\": {syscall_with:.1}}}\n",
        json_sizes.join(", ")
    );
    let json_path = bench_dir().join("capture.json");
    fs::write(&json_path, json)?;
    println!("written to {}", json_path.display());
    Ok(())
}
