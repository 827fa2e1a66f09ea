use std::{
    io::IsTerminal as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use apitoolkit_agent::{
    StopReason, capture,
    config::{self, CaptureArgs, Cli, Command, ConfigError, Endpoint, LogFormat},
    kubernetes::{ApiClient, SharedPods},
    observability::{self, Heartbeat},
    preflight, replay,
    sinks::{self, PayloadQueue, pubsub::DestinationConfig},
};
use tokio::signal::unix::{SignalKind, signal};

/// How long a stopping agent keeps trying to publish what it queued.
const PUBLISH_DEADLINE: Duration = Duration::from_secs(10);

fn destination_config(args: &CaptureArgs) -> DestinationConfig {
    DestinationConfig {
        api_key: args.api_key.clone(),
        root_url: args.root_url.clone(),
        project_id: args.project_id,
        pubsub_project: args.pubsub_project.clone(),
        topic: args.topic.clone(),
        credentials: args.credentials.clone(),
        emulator_host: std::env::var("PUBSUB_EMULATOR_HOST")
            .ok()
            .filter(|host| !host.is_empty()),
    }
}

fn init_logging(debug: bool, format: LogFormat) {
    let default = if debug { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("APITOOLKIT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let logger = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logger.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logger.json().init(),
    }
}

/// In a Kubernetes pod: the node's pods, listed now and kept fresh, give pod tags and
/// `--k8s-*` selection. Outside Kubernetes those flags are an error.
async fn start_kubernetes(args: &CaptureArgs) -> anyhow::Result<SharedPods> {
    let pods = SharedPods::default();
    let selects_pods = !args.k8s_namespaces.is_empty() || !args.k8s_labels.is_empty();
    let client = match ApiClient::in_cluster() {
        Some(Ok(client)) => client,
        Some(Err(error)) if !selects_pods => {
            tracing::warn!(%error, "no Kubernetes metadata: payloads carry no pod tags");
            return Ok(pods);
        }
        Some(Err(error)) => return Err(error.into()),
        None if selects_pods => anyhow::bail!(
            "--k8s-namespace and --k8s-label need the agent to run in a Kubernetes pod (its \
             service account and KUBERNETES_SERVICE_HOST)"
        ),
        None => return Ok(pods),
    };
    // The first list must be there before processes are selected.
    match client.pods(args.node_name.as_deref()).await {
        Ok(index) => *pods.write().expect("not poisoned before any reader") = index,
        Err(error) => tracing::warn!(%error, "could not list pods yet"),
    }
    tokio::spawn(client.keep_fresh(args.node_name.clone(), pods.clone()));
    Ok(pods)
}

/// Serves /metrics and /healthz in the background; failures cost the endpoint, not capture.
async fn start_observability(endpoint: Endpoint, heartbeat: Heartbeat) {
    let Endpoint(Some(address)) = endpoint else {
        return;
    };
    let metrics = match observability::install_recorder() {
        Ok(metrics) => metrics,
        Err(error) => {
            tracing::warn!(%error, "metrics recorder not installed");
            return;
        }
    };
    if let Some(listener) = observability::bind(address).await {
        tokio::spawn(observability::serve(listener, metrics, heartbeat));
    }
}

#[tokio::main]
async fn main() {
    let cli = match config::parse(std::env::args_os().collect()) {
        Ok(cli) => cli,
        // Usage errors, --help and --version print themselves.
        Err(ConfigError::Cli(error)) => error.exit(),
        Err(error) => {
            eprintln!("apitoolkit-agent: {error}");
            std::process::exit(1);
        }
    };
    init_logging(cli.capture.debug, cli.capture.log_format);
    if let Err(error) = run(cli).await {
        eprintln!("apitoolkit-agent: {error:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Some(Command::Replay { file }) => {
            replay(file, &cli.capture, std::io::stdout().lock())?;
            return Ok(());
        }
        Some(Command::Config { .. }) => {
            print!("{}", cli.capture.to_toml());
            return Ok(());
        }
        Some(Command::Check) => {
            let (table, ok) = preflight::report(&preflight::run());
            print!("{table}");
            if !ok {
                anyhow::bail!("this host cannot run the agent: fix the FAIL lines above");
            }
            return Ok(());
        }
        None => {}
    }
    let (to_stdout, to_pubsub) = cli.capture.outputs();
    let mut queues = Vec::new();
    let stdout_sink = to_stdout.then(|| {
        let queue = PayloadQueue::new("stdout", cli.capture.queue_bytes);
        queues.push(queue.clone());
        tokio::spawn(sinks::stdout::run(queue))
    });
    let pubsub_sink = if to_pubsub {
        let config = destination_config(&cli.capture);
        let destination = match config.resolve().await {
            Ok(destination) => {
                tracing::info!(topic = %destination.topic_path, project_id = %destination.project_id, "publishing to Pub/Sub");
                Some(destination)
            }
            Err(error) if error.is_transient() => {
                tracing::warn!(%error, "capture starts anyway; payloads are queued while the destination is retried");
                None
            }
            Err(error) => return Err(error.into()),
        };
        let queue = PayloadQueue::new("pubsub", cli.capture.queue_bytes);
        queues.push(queue.clone());
        Some((
            queue.clone(),
            tokio::spawn(sinks::pubsub::run(queue, config, destination)),
        ))
    } else {
        None
    };
    let pods = start_kubernetes(&cli.capture).await?;
    let heartbeat = Heartbeat::default();
    start_observability(cli.capture.metrics_address, heartbeat.clone()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let args = Arc::new(cli.capture);
    let mut capture_task = tokio::task::spawn_blocking({
        let stop = stop.clone();
        let args = args.clone();
        let queues = queues.clone();
        move || capture(&args, queues, stop, heartbeat, pods)
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
    // Capture is over: each sink drains what is queued and ends.
    for queue in &queues {
        queue.close();
    }
    let mut written = 0;
    if let Some(sink) = stdout_sink {
        written = sink
            .await
            .context("stdout sink panicked")?
            .context("writing payloads to stdout")?;
    }
    if let Some((queue, sink)) = pubsub_sink {
        match tokio::time::timeout(PUBLISH_DEADLINE, sink).await {
            Ok(stats) => {
                let stats = stats.context("Pub/Sub sink panicked")?;
                tracing::info!(
                    published = stats.published,
                    failed_attempts = stats.failed_attempts,
                    "Pub/Sub sink stopped"
                );
            }
            Err(_) => tracing::warn!(
                undelivered_bytes = queue.queued_bytes(),
                "Pub/Sub unreachable at shutdown: queued payloads were not published"
            ),
        }
    }
    match reason {
        StopReason::Signal => tracing::info!(payloads = written, "stopped by signal"),
        StopReason::TargetsExited => tracing::info!(payloads = written, "no watched process left"),
    }
    Ok(())
}
