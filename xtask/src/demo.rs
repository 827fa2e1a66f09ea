//! `cargo xtask demo`: a real Flask app, the agent attached to its pid, a few requests, and the
//! payloads the agent emitted.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{
    agent_binary, build_agent,
    services::{ChildGuard, free_port},
    setup, workspace_root,
};

/// One HTTP/1.1 request on its own connection; returns the status line.
fn send(port: u16, request: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response.lines().next().unwrap_or_default().to_owned())
}

pub fn run() -> anyhow::Result<()> {
    setup::python_packages()?;
    build_agent(true)?;
    let port = free_port()?;
    let mut app = ChildGuard {
        child: Command::new("python3")
            .arg(workspace_root().join("tests/apps/flask_app.py"))
            .env("PORT", port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the demo Flask app")?,
        signal: "TERM",
    };
    app.wait_for_port(port, "the demo Flask app")?;
    let flask_pid = app.pid();
    eprintln!("demo: Flask app pid {flask_pid} on 127.0.0.1:{port}; attaching the agent");

    let mut agent = ChildGuard {
        child: Command::new(agent_binary())
            .args(["--pid", &flask_pid.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the agent (run as root)")?,
        signal: "INT",
    };
    let (ready_tx, ready_rx) = mpsc::channel();
    let stderr = agent.child.stderr.take().expect("stderr is piped");
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("agent: {line}");
            if line.contains("watching processes") {
                let _ = ready_tx.send(());
            }
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(60))
        .context("the agent did not attach (see its log above)")?;

    let host = format!("127.0.0.1:{port}");
    let body = r#"{"name":"bob","password":"hunter2"}"#;
    let requests = [
        format!(
            "GET /hello?name=bob&tag=a&tag=b HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        ),
        format!(
            "POST /echo HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
        format!("GET /nowhere HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
    ];
    for request in &requests {
        let status = send(port, request)?;
        eprintln!(
            "demo: {} -> {status}",
            request.lines().next().unwrap_or_default()
        );
    }
    thread::sleep(Duration::from_secs(1));
    let mut stdout = agent.child.stdout.take().expect("stdout is piped");
    agent.stop()?;
    let mut payloads = String::new();
    stdout.read_to_string(&mut payloads)?;
    println!("{payloads}");
    let count = payloads.lines().count();
    eprintln!(
        "demo: {count} payloads for {} requests (one JSON object per line above)",
        requests.len()
    );
    if count != requests.len() {
        bail!("expected {} payloads, got {count}", requests.len());
    }
    Ok(())
}
