//! The Pub/Sub emulator with the bench topic, and the service account the Flask SDK reads.

use std::{
    fs,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};
use serde_json::json;

use super::{PUBSUB_PROJECT, TOPIC, bench_dir};
use crate::services::{ChildGuard, free_port};

/// The Pub/Sub emulator with the bench topic (no subscription: published messages are
/// acknowledged and discarded, so the emulator costs what publishing costs).
pub(super) struct Emulator {
    /// Held for its drop, which kills the emulator.
    _process: ChildGuard,
    pub(super) host: String,
}

impl Emulator {
    pub(super) fn start() -> anyhow::Result<Self> {
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

/// A service account with a real RSA key: the SDK parses it before it sees the emulator.
pub(super) fn service_account_file() -> anyhow::Result<PathBuf> {
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
