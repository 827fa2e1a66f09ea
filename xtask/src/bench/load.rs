//! Load generators: wrk at saturation and, paced, at a fixed rate; hey at a fixed rate over many
//! connections; h2load for HTTP/2 at saturation. All on keep-alive connections.

use std::process::Command;

use anyhow::{Context as _, bail};

pub const SECONDS: u32 = 8;
/// Connections wrk keeps busy at saturation.
pub const CONNECTIONS: u32 = 8;
/// A fixed rate is paced per connection: it uses as many connections as it needs at this rate.
const RATE_PER_CONNECTION: u32 = 100;

/// Streams h2load keeps in flight per connection.
const HTTP2_STREAMS: u32 = 10;

#[derive(Clone, Copy)]
pub enum Load {
    Saturation,
    /// Saturation over HTTP/2, many streams per connection.
    Http2Saturation,
    /// About this many requests per second, over as many connections as the pacing needs.
    Rate(u32),
    /// Requests per second over this many connections (most of them idle at any moment).
    RateOverConnections(u32, u32),
}

#[derive(Default)]
pub struct LoadResult {
    pub requests: u64,
    pub requests_per_second: f64,
    /// Latency percentiles, where the tool reports them (h2load does not).
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    /// Connect, read, write and timeout errors the load tool saw.
    pub errors: u64,
}

impl Load {
    pub fn describe(self) -> String {
        match self {
            Load::Saturation => {
                format!("saturation (wrk -t1 -c{CONNECTIONS} -d{SECONDS}s)")
            }
            Load::Http2Saturation => {
                format!("saturation (h2load -c{CONNECTIONS} -m{HTTP2_STREAMS} -D{SECONDS})")
            }
            Load::Rate(rate) => format!("{rate} req/s (paced wrk, {SECONDS} s)"),
            Load::RateOverConnections(rate, connections) => {
                format!("{rate} req/s over {connections} connections (hey, {SECONDS} s)")
            }
        }
    }

    pub fn run(self, url: &str) -> anyhow::Result<LoadResult> {
        match self {
            Load::Saturation => wrk(url),
            Load::Http2Saturation => h2load(url),
            Load::Rate(rate) => paced_wrk(url, rate, rate.div_ceil(RATE_PER_CONNECTION)),
            Load::RateOverConnections(rate, connections) => hey(url, rate, connections),
        }
    }
}

fn output(command: &mut Command) -> anyhow::Result<String> {
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!(
            "{command:?} failed with {}:\n{text}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(text)
}

/// wrk prints latencies as `456.00us`, `1.23ms` or `1.02s`.
fn wrk_microseconds(value: &str) -> anyhow::Result<f64> {
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

fn wrk(url: &str) -> anyhow::Result<LoadResult> {
    let text = output(Command::new("wrk").args([
        "-t1",
        &format!("-c{CONNECTIONS}"),
        &format!("-d{SECONDS}s"),
        "--latency",
        url,
    ]))?;
    parse_wrk(&text)
}

/// wrk keeping `connections` open, each pausing after every response for a random 0 to 2x the
/// mean pause that makes `rate` together (less the response times, a few percent). hey paces
/// too, but over TLS its client closes and redials thousands of connections a run (dials
/// racing the idle pool), so the service's CPU per request measured handshakes. Random pauses
/// keep the connections out of lockstep, which would queue them in bursts.
fn paced_wrk(url: &str, rate: u32, connections: u32) -> anyhow::Result<LoadResult> {
    let mean_pause_ms = 1000 * connections / rate.max(1);
    let script = super::bench_dir().join(format!("pace-{mean_pause_ms}ms.lua"));
    std::fs::write(
        &script,
        format!(
            "function delay()\n  return math.random(0, {})\nend\n",
            2 * mean_pause_ms
        ),
    )
    .with_context(|| format!("writing {}", script.display()))?;
    let text = output(
        Command::new("wrk")
            .args([
                "-t1",
                &format!("-c{connections}"),
                &format!("-d{SECONDS}s"),
                "--latency",
                "-s",
            ])
            .arg(&script)
            .arg(url),
    )?;
    parse_wrk(&text)
}

fn parse_wrk(text: &str) -> anyhow::Result<LoadResult> {
    let mut result = LoadResult::default();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["Requests/sec:", value] => result.requests_per_second = value.parse()?,
            [count, "requests", "in", ..] => result.requests = count.parse()?,
            ["50%", value] => result.p50_us = Some(wrk_microseconds(value)?),
            ["99%", value] => result.p99_us = Some(wrk_microseconds(value)?),
            ["Socket", "errors:", counts @ ..] => {
                result.errors = counts
                    .iter()
                    .filter_map(|count| count.trim_end_matches(',').parse::<u64>().ok())
                    .sum();
            }
            // Error responses mean the server is misconfigured, not that the agent is slow.
            ["Non-2xx", ..] => bail!("the server answered with errors:\n{text}"),
            _ => {}
        }
    }
    if result.requests == 0 {
        bail!("wrk reported no requests:\n{text}");
    }
    Ok(result)
}

/// hey paces each connection (`-q` is per connection), so `rate` should be a multiple of
/// `connections`.
fn hey(url: &str, rate: u32, connections: u32) -> anyhow::Result<LoadResult> {
    let text = output(Command::new("hey").args([
        "-z",
        &format!("{SECONDS}s"),
        "-c",
        &connections.to_string(),
        "-q",
        &(rate / connections).max(1).to_string(),
        url,
    ]))?;
    parse_hey(&text)
}

/// hey prints `Requests/sec:\t999.8`, `50% in 0.0005 secs`, `[200]\t7998 responses` and, under
/// `Error distribution:`, `[3]\tGet ...: connection refused`.
fn parse_hey(text: &str) -> anyhow::Result<LoadResult> {
    let mut result = LoadResult::default();
    let mut in_errors = false;
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["Requests/sec:", value] => result.requests_per_second = value.parse()?,
            ["50%", "in", value, "secs"] => result.p50_us = Some(value.parse::<f64>()? * 1e6),
            ["99%", "in", value, "secs"] => result.p99_us = Some(value.parse::<f64>()? * 1e6),
            ["Error", "distribution:"] => in_errors = true,
            [code, count, "responses"] if !in_errors => {
                if *code != "[200]" {
                    bail!("the server answered with errors:\n{text}");
                }
                result.requests += count.parse::<u64>()?;
            }
            [count, ..] if in_errors && count.starts_with('[') => {
                result.errors += count.trim_matches(['[', ']']).parse::<u64>()?;
            }
            _ => {}
        }
    }
    if result.requests == 0 {
        bail!("hey reported no requests:\n{text}");
    }
    Ok(result)
}

fn h2load(url: &str) -> anyhow::Result<LoadResult> {
    let text = output(Command::new("h2load").args([
        &format!("-c{CONNECTIONS}"),
        &format!("-m{HTTP2_STREAMS}"),
        "-t1",
        &format!("-D{SECONDS}"),
        url,
    ]))?;
    parse_h2load(&text)
}

/// h2load prints `finished in 8.00s, 12345.67 req/s, 1.23MB/s`, `requests: 98775 total, 98785
/// started, 98775 done, 98775 succeeded, 0 failed, 0 errored, 0 timeout` and `status codes:
/// 98775 2xx, 0 3xx, 0 4xx, 0 5xx`.
fn parse_h2load(text: &str) -> anyhow::Result<LoadResult> {
    let mut result = LoadResult::default();
    for line in text.lines() {
        let fields: Vec<&str> = line
            .split([' ', ','])
            .filter(|field| !field.is_empty())
            .collect();
        match fields.as_slice() {
            ["finished", "in", _, rate, "req/s", ..] => {
                result.requests_per_second = rate.parse()?
            }
            [
                "requests:",
                ..,
                succeeded,
                "succeeded",
                failed,
                "failed",
                errored,
                "errored",
                timeout,
                "timeout",
            ] => {
                result.requests = succeeded.parse()?;
                result.errors =
                    failed.parse::<u64>()? + errored.parse::<u64>()? + timeout.parse::<u64>()?;
            }
            ["status", "codes:", _, "2xx", rest @ ..]
                if rest.chunks(2).any(|pair| pair[0] != "0") =>
            {
                bail!("the server answered with errors:\n{text}");
            }
            _ => {}
        }
    }
    if result.requests == 0 {
        bail!("h2load reported no requests:\n{text}");
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_output() {
        let text = "Running 8s test @ http://127.0.0.1:1/1k\n  Latency Distribution\n     50%   52.00us\n     99%    1.07ms\n  677387 requests in 8.00s, 786.19MB read\n  Socket errors: connect 0, read 2, write 1, timeout 0\nRequests/sec:  84667.12\n";
        let result = parse_wrk(text).unwrap();
        assert_eq!(result.requests, 677_387);
        assert_eq!(result.p50_us, Some(52.0));
        assert_eq!(result.p99_us, Some(1070.0));
        assert_eq!(result.errors, 3);
        assert_eq!(result.requests_per_second, 84_667.12);
    }

    #[test]
    fn reads_hey_output() {
        let text = "Summary:\n  Requests/sec:\t999.8\n\nLatency distribution:\n  50% in 0.0005 secs\n  99% in 0.0012 secs\n\nStatus code distribution:\n  [200]\t7998 responses\n\nError distribution:\n  [2]\tGet \"http://127.0.0.1:1/1k\": connection refused\n";
        let result = parse_hey(text).unwrap();
        assert_eq!(result.requests, 7998);
        assert_eq!(result.errors, 2);
        assert!((result.p50_us.unwrap() - 500.0).abs() < 1e-6);
        assert!((result.p99_us.unwrap() - 1200.0).abs() < 1e-6);
        assert!(parse_hey("Status code distribution:\n  [502]\t3 responses\n").is_err());
    }

    #[test]
    fn reads_h2load_output() {
        let text = "starting benchmark...\nfinished in 8.00s, 12345.67 req/s, 1.23MB/s\nrequests: 98775 total, 98785 started, 98770 done, 98765 succeeded, 5 failed, 4 errored, 1 timeout\nstatus codes: 98765 2xx, 0 3xx, 0 4xx, 0 5xx\n";
        let result = parse_h2load(text).unwrap();
        assert_eq!(result.requests, 98_765);
        assert_eq!(result.errors, 10);
        assert_eq!(result.requests_per_second, 12_345.67);
        assert_eq!(result.p50_us, None);
        assert!(parse_h2load(&text.replace("0 4xx", "7 4xx")).is_err());
    }
}
