//! The Go net/http HTTPS server of the e2e suite (tests/apps/go_tls), built with the machine's
//! Go: crypto/tls probed in the executable, every `ret` of `Read` a single-stepped uprobe.

use std::process::{Command, Stdio};

use anyhow::Context as _;

use super::{Context, Scenario, agent::Sink, bench_dir, load::Load, with_and_without_agent};
use crate::{
    services::{ChildGuard, free_port},
    workspace_root,
};

const FIXED_RATE: u32 = 1_000;

fn start_go_server(port: u16) -> anyhow::Result<ChildGuard> {
    let dir = bench_dir().join("go");
    let binary = dir.join("go_tls");
    crate::run(
        Command::new("go")
            .args(["build", "-o"])
            .arg(&binary)
            .arg(".")
            .current_dir(workspace_root().join("tests/apps/go_tls")),
    )?;
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
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
    let mut server = ChildGuard {
        child: Command::new(&binary)
            .env("PORT", port.to_string())
            .env("TLS_CERT", &cert)
            .env("TLS_KEY", &key)
            .env("HTTP2", "0")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the Go server")?,
        signal: "TERM",
    };
    server.wait_for_port(port, "the Go server")?;
    Ok(server)
}

/// GET /item/1 over HTTPS (HTTP/1.1, keep-alive) at saturation and at a fixed rate.
pub(super) fn go_scenarios(context: &Context) -> anyhow::Result<Vec<Scenario>> {
    let port = free_port()?;
    let url = format!("https://127.0.0.1:{port}/item/1");
    let mut server = start_go_server(port)?;
    let mut scenarios = Vec::new();
    for load in [Load::Saturation, Load::Rate(FIXED_RATE)] {
        scenarios.push(with_and_without_agent(
            format!(
                "Go net/http over HTTPS (crypto/tls), GET /item/1, {}",
                load.describe()
            ),
            server.pid(),
            &[Sink::Stdout],
            context,
            &|| load.run(&url),
        )?);
    }
    server.stop().context("stopping the Go server")?;
    Ok(scenarios)
}
