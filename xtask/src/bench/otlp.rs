//! The test suite's OTLP receiver (tests/apps/otlp_receiver.py) on OTLP/gRPC, counting spans
//! without keeping them, so it costs what receiving costs.

use std::process::{Command, Stdio};

use anyhow::Context as _;

use crate::{
    services::{ChildGuard, free_port},
    workspace_root,
};

pub(super) struct Receiver {
    /// Held for its drop, which stops the receiver.
    _process: ChildGuard,
    pub(super) endpoint: String,
}

impl Receiver {
    pub(super) fn start() -> anyhow::Result<Self> {
        let port = free_port()?;
        eprintln!("bench: starting the OTLP receiver");
        let script = workspace_root().join("tests/apps/otlp_receiver.py");
        let mut process = ChildGuard {
            child: Command::new("python3")
                .arg(&script)
                .args(["--protocol", "grpc", "--port", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {}", script.display()))?,
            signal: "KILL",
        };
        process.wait_for_port(port, "the OTLP receiver")?;
        Ok(Self {
            _process: process,
            endpoint: format!("http://127.0.0.1:{port}"),
        })
    }
}
