use std::{
    io::IsTerminal as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::Context as _;
use apitoolkit_agent::{
    StopReason, capture,
    config::{Cli, Command},
    replay, sinks,
    sinks::PayloadQueue,
};
use clap::Parser as _;
use tokio::signal::unix::{SignalKind, signal};

/// Payloads are built on the capture thread and freed on the sink thread: glibc malloc handles
/// that cross-thread pattern poorly.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn init_logging(debug: bool) {
    let default = if debug { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("APITOOLKIT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    init_logging(cli.capture.debug);
    if let Err(error) = run(cli).await {
        eprintln!("apitoolkit-agent: {error:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(Command::Replay { file }) = &cli.command {
        replay(file, &cli.capture, std::io::stdout().lock())?;
        return Ok(());
    }
    let stdout_queue = PayloadQueue::new("stdout", cli.capture.queue_bytes);
    let stdout_sink = tokio::spawn(sinks::stdout::run(stdout_queue.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let args = Arc::new(cli.capture);
    let mut capture_task = tokio::task::spawn_blocking({
        let stop = stop.clone();
        let args = args.clone();
        let queues = vec![stdout_queue.clone()];
        move || capture(&args, queues, stop)
    });
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let reason = tokio::select! {
        result = &mut capture_task => result.context("capture thread panicked")??,
        _ = tokio::signal::ctrl_c() => {
            stop.store(true, Ordering::Relaxed);
            capture_task.await.context("capture thread panicked")??
        }
        _ = terminate.recv() => {
            stop.store(true, Ordering::Relaxed);
            capture_task.await.context("capture thread panicked")??
        }
    };
    // Capture is over: the sink drains what is queued and ends.
    stdout_queue.close();
    let written = stdout_sink
        .await
        .context("stdout sink panicked")?
        .context("writing payloads to stdout")?;
    match reason {
        StopReason::Signal => tracing::info!(payloads = written, "stopped by signal"),
        StopReason::TargetsExited => tracing::info!(payloads = written, "no watched process left"),
    }
    Ok(())
}
