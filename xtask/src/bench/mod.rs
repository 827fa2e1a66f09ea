//! `cargo xtask bench`: the agent's cost, measured on loopback in one run on this machine.
//!
//! - nginx (1 KiB, 64 KiB, 1 KiB over HTTPS) under wrk at saturation: without the agent, with
//!   the agent writing to stdout, and with the agent publishing to the Pub/Sub emulator;
//! - a Flask app under gunicorn the same way, plus the same app instrumented with the
//!   apitoolkit-flask SDK publishing to the emulator (what Flask users run today);
//! - nginx at fixed rates (paced wrk) with and without the agent: plain and HTTPS at 4000 req/s
//!   for the service's own CPU per request, in three interleaved rounds; 1000 and 5000 req/s, at 5000 also publishing to
//!   Pub/Sub and exporting OTLP spans to the test suite's receiver; 5000 req/s over 1000
//!   connections for the agent's memory;
//! - a Go net/http HTTPS server (crypto/tls probed in the executable) at saturation and at a
//!   fixed rate;
//! - per run, the CPU the service's own threads spend per request (schedstat);
//! - the cost of write(2) in a process the agent does not watch.
//!
//! Prints one table per scenario and each target of the cost issue as met / NOT met, and
//! writes everything to target/bench/capture.json. Numbers are reported, not asserted: only
//! setup failures fail.

mod agent;
mod flask;
mod go;
mod load;
mod nginx;
mod otlp;
mod pubsub;
mod service;
mod writes;

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use serde_json::{Value, json};

use crate::{build_agent, setup, workspace_root};
use agent::{Agent, AgentCost, Sink};
use load::{Load, LoadResult};
use pubsub::Emulator;

const TOPIC: &str = "bench";
/// The Pub/Sub project the metadata stub hands out (tests/apps/metadata_stub.py).
const PUBSUB_PROJECT: &str = "apitoolkit-test";

fn ensure_tools() -> anyhow::Result<()> {
    crate::setup::debian_programs(&[
        ("go", "golang-go"),
        ("nginx", "nginx"),
        ("wrk", "wrk"),
        ("hey", "hey"),
        ("h2load", "nghttp2-client"),
        ("curl", "curl"),
        ("openssl", "openssl"),
    ])
}

fn bench_dir() -> PathBuf {
    workspace_root().join("target/bench")
}

/// A certificate and key for 127.0.0.1 made with the openssl CLI in `dir`: (cert, key) paths.
fn self_signed_certificate(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    crate::run(
        std::process::Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args(["-subj", "/CN=127.0.0.1", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(std::process::Stdio::null()),
    )?;
    Ok((cert, key))
}

/// One load run: the first of a scenario runs without any instrumentation, and is the
/// baseline of the others.
struct Run {
    label: &'static str,
    load: LoadResult,
    /// CPU nanoseconds the service's own threads spent during the load.
    service_cpu_ns: u64,
    agent: Option<AgentCost>,
}

struct Scenario {
    title: String,
    runs: Vec<Run>,
    /// The service CPU µs the agent (→ stdout) added per request, per interleaved round (see
    /// [`service_cpu_scenario`]); empty for the other scenarios.
    service_cpu_added_us: Vec<f64>,
}

impl Run {
    fn capture_ratio(&self) -> Option<f64> {
        // Load tools count only completed requests: up to one in flight per connection is
        // captured but not counted, so this can exceed 1 slightly.
        let agent = self.agent.as_ref()?;
        Some(agent.payloads as f64 / self.load.requests as f64)
    }

    fn service_cpu_us_per_request(&self) -> f64 {
        self.service_cpu_ns as f64 / 1e3 / self.load.requests.max(1) as f64
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
            let (p50, p99) = (run.load.p50_us?, run.load.p99_us?);
            Some(format!("{p50:.0} / {p99:.0}"))
        });
        row("requests completed / failed", &|run| {
            Some(format!("{} / {}", run.load.requests, run.load.errors))
        });
        row("payloads (stdout / delivered)", &|run| {
            Some(run.agent.as_ref()?.payloads.to_string())
        });
        row("capture ratio", &|run| {
            Some(format!("{:.4}", run.capture_ratio()?))
        });
        row("service CPU µs per request", &|run| {
            Some(format!("{:.1}", run.service_cpu_us_per_request()))
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
        if let Some(median) = median(&self.service_cpu_added_us) {
            let rounds: Vec<String> = self
                .service_cpu_added_us
                .iter()
                .map(|added| format!("{added:+.1}"))
                .collect();
            println!(
                "  service CPU µs added per request, per round: {} (median {median:+.1})",
                rounds.join(" / ")
            );
        }
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
                    "service_cpu_us_per_request": run.service_cpu_us_per_request(),
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
        json!({"title": self.title, "runs": runs,
               "service_cpu_added_us_per_round": self.service_cpu_added_us})
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
    let (bare, service_cpu_ns) = service::cpu_during(pid, load)?;
    let mut runs = vec![Run {
        label: "no agent",
        load: bare,
        service_cpu_ns,
        agent: None,
    }];
    for &sink in sinks {
        let label = match sink {
            Sink::Stdout => "agent → stdout",
            Sink::PubSub => "agent → Pub/Sub",
            Sink::Otlp => "agent → OTLP",
        };
        eprintln!("bench: {title}: {label}");
        let agent = Agent::start(pid, sink, context)?;
        let ((load, service_cpu_ns), cost) = agent.measure(|| service::cpu_during(pid, load))?;
        runs.push(Run {
            label,
            load,
            service_cpu_ns,
            agent: Some(cost),
        });
    }
    Ok(Scenario {
        title,
        runs,
        service_cpu_added_us: Vec::new(),
    })
}

/// Interleaved rounds of the service-CPU comparison: from one run to the next, the service's
/// own CPU per request drifts on this shared machine by more than the agent adds.
const SERVICE_CPU_ROUNDS: usize = 3;

/// [`with_and_without_agent`] with the agent → stdout, `SERVICE_CPU_ROUNDS` times in a row:
/// the first round's runs make the scenario's table, and each round's difference in the
/// service's CPU per request is kept, so a drift of the machine between rounds cancels out
/// (one within a round does not: each runs bare first).
fn service_cpu_scenario(
    title: String,
    pid: u32,
    context: &Context,
    load: &dyn Fn() -> anyhow::Result<LoadResult>,
) -> anyhow::Result<Scenario> {
    let added = |scenario: &Scenario| {
        scenario.runs[1].service_cpu_us_per_request()
            - scenario.runs[0].service_cpu_us_per_request()
    };
    let mut scenario = with_and_without_agent(title, pid, &[Sink::Stdout], context, load)?;
    scenario.service_cpu_added_us.push(added(&scenario));
    for round in 2..=SERVICE_CPU_ROUNDS {
        let again = with_and_without_agent(
            format!("{}, round {round}", scenario.title),
            pid,
            &[Sink::Stdout],
            context,
            load,
        )?;
        scenario.service_cpu_added_us.push(added(&again));
    }
    Ok(scenario)
}

/// The middle value (the mean of the middle two for an even count); `None` when empty.
fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    match sorted.len() {
        0 => None,
        len if len % 2 == 1 => Some(sorted[middle]),
        _ => Some((sorted[middle - 1] + sorted[middle]) / 2.0),
    }
}

struct Context {
    emulator: Emulator,
    otlp_receiver: otlp::Receiver,
}

/// One target of the agent's cost: what is measured, its value, and whether it is met.
struct Target {
    what: String,
    value: String,
    met: bool,
}

/// A measured value held to a bound; NOT met when it was not measured (its scenario did not
/// run, or is named differently).
fn bounded(what: &str, value: Option<f64>, unit: &str, bound: Bound) -> Target {
    let (sign, met) = match bound {
        Bound::AtMost(limit) => (
            format!("≤ {limit}"),
            value.is_some_and(|value| value <= limit),
        ),
        Bound::AtLeast(limit) => (
            format!("≥ {limit}"),
            value.is_some_and(|value| value >= limit),
        ),
    };
    Target {
        what: format!("{what} {sign}{unit}"),
        value: value.map_or("not measured".to_owned(), |value| {
            format!("{value:.3}{unit}")
        }),
        met,
    }
}

#[derive(Clone, Copy)]
enum Bound {
    AtMost(f64),
    AtLeast(f64),
}

/// The targets of the cost issue (#16), measured in this run.
fn targets(scenarios: &[Scenario], unwatched_write_ns: (f64, f64)) -> Vec<Target> {
    use Bound::{AtLeast, AtMost};
    let run = |title: &str, label: &str| {
        let scenario = scenarios.iter().find(|scenario| scenario.title == title)?;
        let run = scenario.runs.iter().find(|run| run.label == label)?;
        Some((scenario, run))
    };
    let (stdout, pubsub) = ("agent → stdout", "agent → Pub/Sub");
    let service_cpu_added = |title: &str| {
        let scenario = scenarios.iter().find(|scenario| scenario.title == title)?;
        median(&scenario.service_cpu_added_us)
    };
    let agent_cpu = |title: &str, label: &str| run(title, label)?.1.cpu_us_per_payload();
    let ratio = |title: &str, label: &str| {
        let (scenario, run) = run(title, label)?;
        Some(scenario.throughput_ratio(run))
    };
    let nginx = |label: &str, load: Load| nginx::title(label, load);
    let service_rate = Load::Rate(nginx::SERVICE_CPU_RATE);
    let (rate, connections) = nginx::MANY_CONNECTIONS;
    let (kib, https) = ("1 KiB", "1 KiB HTTPS");
    let flask = flask::title();
    let mut lines: Vec<Target> = [
        bounded(
            &format!(
                "service CPU added per plain 1 KiB request (median of {SERVICE_CPU_ROUNDS} rounds), nginx {}",
                service_rate.describe()
            ),
            service_cpu_added(&nginx(kib, service_rate)),
            " µs",
            AtMost(1.0),
        ),
        bounded(
            &format!(
                "service CPU added per HTTPS 1 KiB request (median of {SERVICE_CPU_ROUNDS} rounds), nginx {}",
                service_rate.describe()
            ),
            service_cpu_added(&nginx(https, service_rate)),
            " µs",
            AtMost(3.0),
        ),
        bounded(
            "agent CPU per payload, nginx 5000 req/s → stdout",
            agent_cpu(&nginx(kib, Load::Rate(5_000)), stdout),
            " µs",
            AtMost(4.0),
        ),
        bounded(
            "agent CPU per payload, nginx 5000 req/s → Pub/Sub",
            agent_cpu(&nginx(kib, Load::Rate(5_000)), pubsub),
            " µs",
            AtMost(6.0),
        ),
        bounded(
            "agent CPU per payload, nginx 1000 req/s → stdout",
            agent_cpu(&nginx(kib, Load::Rate(1_000)), stdout),
            " µs",
            AtMost(8.0),
        ),
        bounded(
            "agent CPU per payload, nginx 1 KiB saturation → stdout",
            agent_cpu(&nginx(kib, Load::Saturation), stdout),
            " µs",
            AtMost(3.0),
        ),
        bounded(
            "write(2) added in an unwatched process",
            Some(unwatched_write_ns.1 - unwatched_write_ns.0),
            " ns",
            AtMost(30.0),
        ),
        bounded(
            "throughput ratio, nginx 1 KiB saturation → stdout",
            ratio(&nginx(kib, Load::Saturation), stdout),
            "",
            AtLeast(0.80),
        ),
        bounded(
            "throughput ratio, nginx 1 KiB saturation → Pub/Sub",
            ratio(&nginx(kib, Load::Saturation), pubsub),
            "",
            AtLeast(0.70),
        ),
        bounded(
            "throughput ratio, nginx 1 KiB HTTPS saturation → stdout",
            ratio(&nginx(https, Load::Saturation), stdout),
            "",
            AtLeast(0.75),
        ),
        bounded(
            "throughput ratio, Flask/gunicorn → stdout",
            ratio(&flask, stdout),
            "",
            AtLeast(0.97),
        ),
        bounded(
            "throughput ratio, Flask/gunicorn → Pub/Sub",
            ratio(&flask, pubsub),
            "",
            AtLeast(0.95),
        ),
        bounded(
            &format!("agent peak RSS, nginx {rate} req/s over {connections} connections"),
            run(
                &nginx(kib, Load::RateOverConnections(rate, connections)),
                stdout,
            )
            .and_then(|(_, run)| Some(run.agent.as_ref()?.peak_rss_mib)),
            " MiB",
            AtMost(64.0),
        ),
        bounded(
            "agent peak RSS, highest of the saturation runs",
            scenarios
                .iter()
                .filter(|scenario| scenario.title.contains("saturation"))
                .flat_map(|scenario| &scenario.runs)
                .filter_map(|run| Some(run.agent.as_ref()?.peak_rss_mib))
                .reduce(f64::max),
            " MiB",
            AtMost(96.0),
        ),
    ]
    .into();
    // Speed is never bought with capture: every request at a fixed rate becomes a payload.
    for rate in nginx::FIXED_RATES {
        let title = nginx(kib, Load::Rate(rate));
        let Some(scenario) = scenarios.iter().find(|scenario| scenario.title == title) else {
            continue;
        };
        for run in &scenario.runs[1..] {
            let Some(agent) = &run.agent else { continue };
            lines.push(Target {
                what: format!("complete capture, nginx {rate} req/s, {}", run.label),
                value: format!(
                    "{} payloads / {} requests",
                    agent.payloads, run.load.requests
                ),
                met: agent.payloads >= run.load.requests && agent.ringbuf_full == 0,
            });
        }
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
        otlp_receiver: otlp::Receiver::start()?,
    };
    let mut scenarios = nginx::nginx_scenarios(&context)?;
    scenarios.push(flask::flask_scenario(&context)?);
    scenarios.extend(go::go_scenarios(&context)?);
    let (write_without_ns, write_with_ns) = writes::unwatched_write_ns(&context)?;

    for scenario in &scenarios {
        scenario.print();
    }
    println!(
        "\nwrite(2) of 64 bytes in an unwatched process: {write_without_ns:.0} ns without the agent, \
         {write_with_ns:.0} ns with it"
    );
    let targets = targets(&scenarios, (write_without_ns, write_with_ns));
    println!("\ntargets");
    for Target { what, value, met } in &targets {
        let verdict = if *met { "met" } else { "NOT met" };
        println!("  {what:<84} {value:>28}  {verdict}");
    }

    let report = json!({
        "load": {"tool_saturation": "wrk", "tool_fixed_rate": "wrk with a pacing script", "tool_many_connections": "hey", "seconds": load::SECONDS,
                 "connections": load::CONNECTIONS},
        "scenarios": scenarios.iter().map(Scenario::to_json).collect::<Vec<_>>(),
        "unwatched_write_ns_without_agent": write_without_ns,
        "unwatched_write_ns_with_agent": write_with_ns,
        "targets": targets.iter().map(|Target { what, value, met }| {
            json!({"target": what, "value": value, "met": met})
        }).collect::<Vec<_>>(),
    });
    let json_path = bench_dir().join("capture.json");
    fs::write(&json_path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    println!("written to {}", json_path.display());
    drop(context);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_is_the_middle_value_or_the_mean_of_the_middle_two() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[6.1]), Some(6.1));
        assert_eq!(median(&[9.0, -1.0, 2.5]), Some(2.5));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }
}
