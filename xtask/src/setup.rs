//! Idempotent installation of the build and test prerequisites, so a fresh machine needs
//! nothing by hand.

use std::process::Command;

use anyhow::Context as _;

use crate::{run, workspace_root};

/// bpf-linker must load the same LLVM major as the nightly rustc; 0.10.4 dlopens the nightly
/// toolchain's own libLLVM.
const BPF_LINKER_VERSION: &str = "0.10.4";
const CARGO_FUZZ_VERSION: &str = "0.13.2";

fn output(command: &mut Command) -> Option<String> {
    let output = command.output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

pub fn toolchain() -> anyhow::Result<()> {
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))
    .unwrap_or_default();
    if !components.lines().any(|line| line.starts_with("rust-src")) {
        eprintln!("xtask: installing rust-src for the nightly toolchain");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))
        .context("installing rust-src (needed to build the eBPF object)")?;
    }
    cargo_install(
        "bpf-linker",
        BPF_LINKER_VERSION,
        Command::new("bpf-linker").arg("--version"),
    )
}

/// `cargo install`s `krate` at `version` unless `version_command` already reports it.
fn cargo_install(krate: &str, version: &str, version_command: &mut Command) -> anyhow::Result<()> {
    let installed = output(version_command).unwrap_or_default();
    if installed.contains(version) {
        return Ok(());
    }
    eprintln!("xtask: installing {krate} {version} (once)");
    run(Command::new("cargo").args([
        "install",
        krate,
        "--version",
        version,
        "--locked",
        "--force",
    ]))
    .with_context(|| format!("installing {krate} {version}"))
}

pub fn cargo_fuzz() -> anyhow::Result<()> {
    cargo_install(
        "cargo-fuzz",
        CARGO_FUZZ_VERSION,
        Command::new("cargo").args(["fuzz", "--version"]),
    )
}

/// Installs a requirements file unless `modules` already import.
fn pip_install(requirements: &str, modules: &str, what: &str) -> anyhow::Result<()> {
    let satisfied = Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if satisfied {
        return Ok(());
    }
    eprintln!("xtask: installing {what}");
    run(Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
        ])
        .arg(workspace_root().join(requirements)))
    .with_context(|| format!("installing {what}"))
}

/// Programs the end-to-end tests run, with the Debian packages that provide them (the Go
/// toolchain builds the Go test servers).
const TEST_PROGRAMS: [(&str, &str); 4] = [
    ("go", "golang-go"),
    ("nginx", "nginx"),
    ("curl", "curl"),
    ("openssl", "openssl"),
];

/// Installs the Debian packages of whichever `programs` (program, package) are not on the PATH.
pub fn debian_programs(programs: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = programs
        .iter()
        .filter(|(program, _)| {
            !Command::new("which")
                .arg(program)
                .stdout(std::process::Stdio::null())
                .status()
                .is_ok_and(|status| status.success())
        })
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {}", missing.join(", "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .with_context(|| format!("installing {}", missing.join(", ")))
}

pub fn test_programs() -> anyhow::Result<()> {
    debian_programs(&TEST_PROGRAMS)
}

pub fn python_packages() -> anyhow::Result<()> {
    pip_install(
        "tests/requirements.txt",
        "flask, gunicorn, pytest, requests, grpc, opentelemetry.proto, hypercorn, kubernetes_validate, fastapi, uvicorn",
        "Python test packages",
    )
}

/// The apitoolkit-flask SDK the benchmark compares the agent with.
pub fn bench_python_packages() -> anyhow::Result<()> {
    pip_install(
        "tests/bench-requirements.txt",
        "apitoolkit_flask, apitoolkit_python",
        "the apitoolkit-flask SDK",
    )
}
