//! nginx serving fixed bodies over HTTP and HTTPS, and the nginx scenarios.

use std::{
    fs,
    process::{Command, Stdio},
};

use anyhow::Context as _;

use super::{
    Context, Scenario, agent::Sink, bench_dir, load::Load, self_signed_certificate,
    service_cpu_scenario, with_and_without_agent,
};
use crate::services::{ChildGuard, free_port};

pub(super) const FIXED_RATES: [u32; 2] = [1_000, 5_000];
/// The fixed rate at which every sink is measured, not only stdout.
const SINK_COMPARISON_RATE: u32 = 5_000;
/// The fixed rate at which the service's own CPU per request is compared, plain and HTTPS.
pub(super) const SERVICE_CPU_RATE: u32 = 4_000;
/// The agent's memory with many open connections: this rate over this many connections.
pub(super) const MANY_CONNECTIONS: (u32, u32) = (5_000, 1_000);

/// A scenario's title: the body's label and the load.
pub(super) fn title(body_label: &str, load: Load) -> String {
    format!("nginx, {body_label}, {}", load.describe())
}

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

const KIB_HTTP2: Body = Body {
    path: "1k",
    label: "1 KiB HTTP/2 over TLS",
    bytes: 1024,
    https: true,
};

/// The ports nginx listens on.
#[derive(Clone, Copy)]
struct Ports {
    http: u16,
    https: u16,
    /// TLS with ALPN h2.
    http2: u16,
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
    let (cert, key) = self_signed_certificate(&prefix)?;
    let config = format!(
        "daemon off;\nmaster_process on;\nworker_processes 1;\npid {pid};\nerror_log {log} warn;\n\
         worker_rlimit_nofile 8192;\nevents {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  sendfile off;\n  keepalive_requests 1000000;\n  \
         default_type application/octet-stream;\n  \
         server {{ listen 127.0.0.1:{http}; root {root}; }}\n  \
         server {{ listen 127.0.0.1:{https} ssl; ssl_certificate {cert}; \
         ssl_certificate_key {key}; root {root}; }}\n  \
         server {{ listen 127.0.0.1:{http2} ssl http2; ssl_certificate {cert}; \
         ssl_certificate_key {key}; http2_max_requests 1000000; root {root}; }}\n}}\n",
        pid = prefix.join("nginx.pid").display(),
        log = prefix.join("logs/error.log").display(),
        root = html.display(),
        http = ports.http,
        https = ports.https,
        http2 = ports.http2,
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

pub(super) fn nginx_scenarios(context: &Context) -> anyhow::Result<Vec<Scenario>> {
    let ports = Ports {
        http: free_port()?,
        https: free_port()?,
        http2: free_port()?,
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
            title(body.label, Load::Saturation),
            pid,
            sinks,
            context,
            &|| Load::Saturation.run(&url),
        )?);
    }
    let url = format!("https://127.0.0.1:{}/{}", ports.http2, KIB_HTTP2.path);
    scenarios.push(with_and_without_agent(
        title(KIB_HTTP2.label, Load::Http2Saturation),
        pid,
        &[Sink::Stdout],
        context,
        &|| Load::Http2Saturation.run(&url),
    )?);
    for body in [&KIB, &KIB_HTTPS] {
        let (load, url) = (Load::Rate(SERVICE_CPU_RATE), ports.url(body));
        scenarios.push(service_cpu_scenario(
            title(body.label, load),
            pid,
            context,
            &|| load.run(&url),
        )?);
    }
    let url = ports.url(&KIB);
    let (rate, connections) = MANY_CONNECTIONS;
    let load = Load::RateOverConnections(rate, connections);
    scenarios.push(with_and_without_agent(
        title(KIB.label, load),
        pid,
        &[Sink::Stdout],
        context,
        &|| load.run(&url),
    )?);
    for rate in FIXED_RATES {
        let load = Load::Rate(rate);
        // The sinks' own cost shows where the agent's CPU per payload is held to its target.
        let sinks: &[Sink] = if rate == SINK_COMPARISON_RATE {
            &[Sink::Stdout, Sink::PubSub, Sink::Otlp]
        } else {
            &[Sink::Stdout]
        };
        scenarios.push(with_and_without_agent(
            title(KIB.label, load),
            pid,
            sinks,
            context,
            &|| load.run(&url),
        )?);
    }
    nginx.stop().context("stopping nginx")?;
    Ok(scenarios)
}
