//! Build, demo, test and benchmark glue: `cargo xtask <command>`.

mod bench;
mod demo;
mod fuzz;
mod services;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "xtask",
    about = "apitoolkit-agent build, demo, test and benchmark commands"
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Installs what building and testing need (rust-src, bpf-linker, cargo-fuzz, Python test
    /// packages).
    Setup,
    /// Builds the agent with its embedded eBPF object.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Builds, starts a demo Flask app, attaches the agent, sends requests and shows the payloads.
    Demo,
    /// Runs every test: unit tests, a bounded fuzzing run, then the end-to-end suite with real
    /// eBPF (needs root).
    Test {
        /// Extra arguments for pytest (e.g. -k keepalive).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        pytest_args: Vec<String>,
    },
    /// Measures the agent's overhead under load and prints a table.
    Bench,
    /// Runs the fuzz targets (HTTP reassembly, redaction); by default as long as the test suite.
    Fuzz {
        /// Executions per target.
        #[arg(long, conflicts_with = "seconds")]
        runs: Option<u64>,
        /// Seconds per target instead of an execution count.
        #[arg(long)]
        seconds: Option<u64>,
    },
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("starting {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}

pub fn agent_binary() -> PathBuf {
    workspace_root().join("target/release/apitoolkit-agent")
}

pub fn build_agent(release: bool) -> anyhow::Result<()> {
    setup::toolchain()?;
    let mut command = Command::new("cargo");
    command
        .current_dir(workspace_root())
        .args(["build", "--package", "apitoolkit-agent"]);
    if release {
        command.arg("--release");
    }
    run(&mut command)
}

fn test(pytest_args: &[String]) -> anyhow::Result<()> {
    setup::toolchain()?;
    setup::python_packages()?;
    setup::test_programs()?;
    setup::node_packages()?;
    // Default members only: the eBPF crate builds for the BPF target, never for the host.
    run(Command::new("cargo")
        .current_dir(workspace_root())
        .arg("test"))?;
    fuzz::run_all(fuzz::TEST_BUDGET)?;
    build_agent(true)?;
    run(Command::new("python3")
        .current_dir(workspace_root())
        .env("APITOOLKIT_AGENT_BIN", agent_binary())
        .args(["-m", "pytest", "tests/e2e", "-v", "-rs"])
        .args(pytest_args))
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Setup => {
            setup::toolchain()?;
            setup::cargo_fuzz()?;
            setup::python_packages()?;
            setup::test_programs()?;
            setup::node_packages()
        }
        Task::Build { release } => build_agent(release),
        Task::Demo => demo::run(),
        Task::Test { pytest_args } => test(&pytest_args),
        Task::Bench => bench::run(),
        Task::Fuzz { runs, seconds } => fuzz::run_all(match (runs, seconds) {
            (_, Some(seconds)) => fuzz::Budget::Seconds(seconds),
            (Some(runs), None) => fuzz::Budget::Runs(runs),
            (None, None) => fuzz::TEST_BUDGET,
        }),
    }
}
