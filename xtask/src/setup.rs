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
    let linker = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if !linker.contains(BPF_LINKER_VERSION) {
        eprintln!("xtask: installing bpf-linker {BPF_LINKER_VERSION} (a few minutes, once)");
        run(Command::new("cargo").args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--force",
        ]))
        .context("installing bpf-linker")?;
    }
    Ok(())
}

pub fn cargo_fuzz() -> anyhow::Result<()> {
    let installed = output(Command::new("cargo").args(["fuzz", "--version"])).unwrap_or_default();
    if installed.contains(CARGO_FUZZ_VERSION) {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
    run(Command::new("cargo").args([
        "install",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
        "--locked",
        "--force",
    ]))
    .context("installing cargo-fuzz")
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

pub fn python_packages() -> anyhow::Result<()> {
    pip_install(
        "tests/requirements.txt",
        "flask, gunicorn, pytest, requests, kubernetes_validate",
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
