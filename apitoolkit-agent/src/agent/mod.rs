//! The runtime: starts the sinks, the Kubernetes pod list and the metrics endpoint, runs the
//! capture loop on its own thread until a signal or the watched processes' exit, then lets the
//! sinks drain what is queued.

mod capture_loop;
mod tls_check;

pub use tls_check::tls_site_checks;
mod discovery;
pub mod recording;

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    task::JoinHandle,
};
use uuid::Uuid;

use crate::{
    capture::{KernelSwitches, Probes, RingWakeups},
    config::{CaptureArgs, Outputs},
    observability::{self, Heartbeat},
    pipeline::{
        CaptureScope, Pipeline,
        payload::PayloadSettings,
        profile::Profiles,
        redact::Redactor,
        routes::{self, RouteTable},
    },
    sinks::{
        self, PayloadQueue, SinkQueue, SinkQueues,
        delivery::DeliveryStats,
        json::{JsonQueues, LineQueue, MessageQueue},
        otlp::{OtlpConfig, OtlpTransport, ResourceSettings},
        pubsub::{Destination, DestinationConfig},
    },
    targets::{
        kubernetes::{self, ApiClient, SharedPods},
        process::Profiler,
        select::{Criteria, Selector},
    },
};
use capture_loop::CaptureLoop;
use discovery::Discovery;
use recording::Recorder;

/// How long a stopping agent keeps trying to deliver what it queued.
const DELIVERY_DEADLINE: Duration = Duration::from_secs(10);

/// Why capture stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum StopReason {
    Signal,
    TargetsExited,
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and out pointer.
    unsafe { libc::clock_gettime(clock, &mut now) };
    now.tv_sec as i128 * 1_000_000_000 + now.tv_nsec as i128
}

/// CLOCK_REALTIME − CLOCK_MONOTONIC, to turn kernel timestamps into wall-clock time.
fn realtime_offset_ns() -> i128 {
    clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_MONOTONIC)
}

/// What every payload shares; the project id is `--project-id` unless the API key named one.
fn payload_settings(args: &CaptureArgs) -> PayloadSettings {
    PayloadSettings {
        project_id: args.project_id.unwrap_or_default(),
        service_version: args.service_version.clone(),
        tags: args.tags.clone(),
        max_body_bytes: args.max_body_bytes,
        realtime_offset_ns: realtime_offset_ns(),
    }
}

fn redactor(args: &CaptureArgs) -> anyhow::Result<Redactor> {
    Ok(Redactor::new(
        &args.redact_headers,
        &args.redact_request_body,
        &args.redact_response_body,
    )?)
}

/// The `--routes` file's templates; none without the flag.
fn configured_routes(args: &CaptureArgs) -> anyhow::Result<Arc<RouteTable>> {
    let Some(path) = &args.routes else {
        return Ok(Arc::default());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--routes {}: cannot read it", path.display()))?;
    let table =
        routes::parse_routes_file(&text).with_context(|| format!("--routes {}", path.display()))?;
    tracing::info!(file = %path.display(), templates = table.len(), "route templates loaded");
    Ok(Arc::new(table))
}

fn capture_scope(args: &CaptureArgs) -> CaptureScope {
    CaptureScope {
        outgoing: args.capture_outgoing,
        errors: args.capture_errors,
    }
}

fn pod_selector(args: &CaptureArgs) -> anyhow::Result<kubernetes::PodSelector> {
    let labels = args
        .k8s_labels
        .iter()
        .map(|label| {
            label
                .split_once('=')
                .map(|(key, value)| (key.to_owned(), value.to_owned()))
                .with_context(|| format!("--k8s-label {label:?}: expected KEY=VALUE"))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(kubernetes::PodSelector {
        namespaces: args.k8s_namespaces.clone(),
        labels,
    })
}

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

/// The OTLP destination: the endpoint, the headers with the API key as `x-api-key`, and what
/// every span's resource says about this host (and, for APIToolkit's own collector, the API
/// key as `at-project-key`).
fn otlp_config(args: &CaptureArgs) -> anyhow::Result<OtlpConfig> {
    let endpoint = args.otlp_endpoint.clone().context(
        "--output otlp needs --otlp-endpoint URL (e.g. http://localhost:4317 for a local \
         collector's OTLP/gRPC port)",
    )?;
    let mut headers: Vec<(String, String)> = args
        .otlp_headers
        .iter()
        .map(|header| (header.name.clone(), header.value.clone()))
        .collect();
    if let Some(key) = &args.api_key {
        headers.push(("x-api-key".to_owned(), key.clone()));
    }
    let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_default();
    Ok(OtlpConfig {
        protocol: args.otlp_protocol,
        headers,
        resource: ResourceSettings {
            service_name: args.service_name.clone(),
            service_version: args.service_version.clone(),
            host_name,
            project_key: args
                .api_key
                .clone()
                .filter(|_| monoscope_collector(&endpoint)),
        },
        endpoint,
    })
}

/// Whether OTLP goes to APIToolkit/Monoscope itself: only then does the API key become a
/// resource attribute, which other backends would store and show.
fn monoscope_collector(endpoint: &reqwest::Url) -> bool {
    endpoint.host_str().is_some_and(|host| {
        ["apitoolkit.io", "monoscope.tech"]
            .iter()
            .any(|domain| host == *domain || host.ends_with(&format!(".{domain}")))
    })
}

/// The Pub/Sub destination, and with an API key the project id, resolved before capture. An
/// unreachable server is retried by the Pub/Sub sink while capture queues; without Pub/Sub
/// output a failed lookup only costs the stdout payloads their project id (OTLP spans carry
/// none: the key itself names the project there).
async fn resolve_destination(
    config: &DestinationConfig,
    outputs: Outputs,
) -> anyhow::Result<Option<Destination>> {
    let to_pubsub = outputs.pubsub;
    let stamps_project_id = outputs.stdout && config.api_key.is_some();
    if !to_pubsub && !stamps_project_id {
        return Ok(None);
    }
    match config.resolve().await {
        Ok(destination) => {
            if to_pubsub {
                tracing::info!(topic = %destination.topic_path, project_id = %destination.project_id, "publishing to Pub/Sub");
            }
            Ok(Some(destination))
        }
        Err(error) if error.is_transient() && to_pubsub => {
            tracing::warn!(%error, "capture starts anyway; payloads are queued while the destination is retried");
            Ok(None)
        }
        Err(error) if to_pubsub => Err(error.into()),
        Err(error) => {
            tracing::warn!(%error, "API-key lookup failed: payloads carry no project id");
            Ok(None)
        }
    }
}

/// A sink that delivers over the network, and its queue.
struct RemoteSink {
    queue: Arc<dyn SinkQueue>,
    task: JoinHandle<DeliveryStats>,
}

/// The sinks' queues and tasks.
struct Sinks {
    queues: SinkQueues,
    stdout: Option<JoinHandle<std::io::Result<u64>>>,
    remote: Vec<RemoteSink>,
}

/// Starts the chosen sinks; returns them and the project id payloads carry. Bad OTLP
/// settings (endpoint, headers) are start-up errors; an unreachable endpoint is not.
async fn start_sinks(args: &CaptureArgs) -> anyhow::Result<(Sinks, Option<Uuid>)> {
    let outputs = args.outputs();
    let otlp = outputs
        .otlp
        .then(|| otlp_config(args).and_then(|config| Ok(OtlpTransport::new(&config)?)))
        .transpose()?;
    let config = destination_config(args);
    let destination = resolve_destination(&config, outputs).await?;
    let project_id = destination
        .as_ref()
        .map(|destination| destination.project_id);
    let json = JsonQueues::new(
        outputs
            .stdout
            .then(|| LineQueue::new("stdout", args.queue_bytes)),
        outputs
            .pubsub
            .then(|| MessageQueue::new("pubsub", args.queue_bytes)),
    );
    let stdout = json.stdout.clone().map(|queue| {
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || sinks::stdout::run(queue, &runtime))
    });
    let mut remote = Vec::new();
    if let Some(queue) = json.pubsub.clone() {
        let task = tokio::spawn(sinks::pubsub::run(
            queue.clone(),
            config,
            destination,
            json.late_project_id(),
        ));
        remote.push(RemoteSink { queue, task });
    }
    let mut queues = SinkQueues {
        json,
        payloads: Vec::new(),
    };
    if let Some(transport) = otlp {
        tracing::info!(endpoint = %args.otlp_endpoint.as_ref().map_or("", |url| url.as_str()),
            protocol = ?args.otlp_protocol, "exporting OpenTelemetry spans");
        let queue = PayloadQueue::new("otlp", args.queue_bytes);
        queues.payloads.push(queue.clone());
        let task = tokio::spawn(sinks::otlp::run(queue.clone(), transport));
        remote.push(RemoteSink { queue, task });
    }
    let sinks = Sinks {
        queues,
        stdout,
        remote,
    };
    Ok((sinks, project_id))
}

/// Closes the queues and waits for each sink to drain them; returns the payloads written to
/// stdout.
async fn drain_sinks(sinks: Sinks) -> anyhow::Result<u64> {
    for queue in sinks.queues.all() {
        queue.close();
    }
    let mut written = 0;
    if let Some(sink) = sinks.stdout {
        written = sink
            .await
            .context("stdout sink panicked")?
            .context("writing payloads to stdout")?;
    }
    let deadline = tokio::time::Instant::now() + DELIVERY_DEADLINE;
    for RemoteSink { queue, task } in sinks.remote {
        let sink = queue.name();
        match tokio::time::timeout_at(deadline, task).await {
            Ok(stats) => {
                let stats = stats.with_context(|| format!("{sink} sink panicked"))?;
                tracing::info!(
                    sink,
                    delivered = stats.delivered,
                    failed_attempts = stats.failed_attempts,
                    "sink stopped"
                );
            }
            Err(_) => tracing::warn!(
                sink,
                undelivered_bytes = queue.queued_bytes(),
                "destination unreachable at shutdown: queued payloads were not delivered"
            ),
        }
    }
    Ok(written)
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
async fn start_observability(args: &CaptureArgs, heartbeat: Heartbeat) {
    let Some(address) = args.metrics_address.0 else {
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

/// Loads the probes and selects processes in the kernel where the selection lives there.
fn load_probes(args: &CaptureArgs, selector: &Selector) -> anyhow::Result<Probes> {
    let switches = KernelSwitches {
        capture_stderr: args.capture_errors,
        select_all: selector.all(),
        select_cgroups: !selector.cgroups().is_empty(),
    };
    let mut probes = Probes::load(args.ring_buffer_bytes, switches)?;
    if switches.select_cgroups {
        let ids: Vec<u64> = selector.cgroups().iter().map(|cgroup| cgroup.id).collect();
        probes.select_cgroups(&ids)?;
    }
    probes.select_ports(&args.ports)?;
    probes.select_exes(&args.exes)?;
    Ok(probes)
}

/// The capture thread: attaches to the processes in `args` and streams payloads to the
/// sinks' queues until a signal sets `stop` or the watched processes exit.
fn capture(
    args: &CaptureArgs,
    settings: PayloadSettings,
    queues: SinkQueues,
    stop: &AtomicBool,
    heartbeat: Heartbeat,
    pods: SharedPods,
) -> anyhow::Result<StopReason> {
    let criteria = Criteria {
        pids: args.pids.clone(),
        exes: args.exes.clone(),
        ports: args.ports.clone(),
        cgroups: args.cgroups.clone(),
        all: args.all,
        pods: pod_selector(args)?,
    };
    let selector = Selector::new(criteria, pods.clone())?;
    let pipeline = Pipeline::new(
        settings,
        capture_scope(args),
        redactor(args)?,
        Profiles::per_process(),
    )
    .with_max_buffered_bytes(args.max_buffered_bytes);
    let mut probes = load_probes(args, &selector)?;
    let recorder = args
        .record
        .as_deref()
        .map(|path| Recorder::create(path, args.record_raw))
        .transpose()?;
    if args.record_raw {
        tracing::warn!(
            "--record-raw: the recording holds the traffic unredacted (credentials, cookies, bodies)"
        );
    }
    let ring = probes.take_ring_buffer()?;
    let mut capture = CaptureLoop {
        wakeups: RingWakeups::new(&ring).context("watching the ring buffer's wake-ups")?,
        ring,
        pipeline,
        profiler: Profiler {
            forced_sdk_type: args.sdk_type,
            configured_routes: configured_routes(args)?,
            pods,
        },
        discovery: Discovery::new(selector),
        sinks: queues,
        outbox: Vec::new(),
        tracked: Default::default(),
        output: Default::default(),
        decoded: Vec::with_capacity(capture_loop::DRAIN_BATCH),
        arena: bytes::BytesMut::with_capacity(capture_loop::ARENA_BYTES),
        recorder,
        totals: Default::default(),
        process_names: HashMap::new(),
        heartbeat,
        losses: Default::default(),
    };
    let discovered = capture.discover(&mut probes)?;
    tracing::info!(
        pids = ?discovered.pids,
        existing_connections = discovered.existing_connections,
        all = args.all,
        cgroups = ?args.cgroups,
        exes = ?args.exes,
        ports = ?args.ports,
        "watching processes"
    );
    capture.heartbeat.beat();
    let reason = capture.run(&mut probes, stop);
    let snapshot = capture.snapshot(&mut probes)?;
    observability::export(&snapshot);
    observability::log_totals(&snapshot);
    if let Some(recorder) = &mut capture.recorder {
        recorder.flush()?;
    }
    reason
}

/// Raises the soft limit of open files to the hard one (systemd's default soft limit is
/// 1024): the agent's fds are its own maps, probed libraries and metrics clients, all bounded.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid resource and out pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0
        || limit.rlim_cur >= limit.rlim_max
    {
        return;
    }
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: a valid resource and a limit read just now, raised only up to its hard bound.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "open-file limit not raised");
    }
}

/// Runs the agent until a signal or until every watched process has exited.
pub async fn run(args: CaptureArgs) -> anyhow::Result<()> {
    raise_open_file_limit();
    if args.api_key_on_command_line {
        tracing::warn!(
            "--api-key on the command line is visible to every local user (ps): pass it in \
             APITOOLKIT_API_KEY or --api-key-file instead"
        );
    }
    let (sinks, project_id) = start_sinks(&args).await?;
    let pods = start_kubernetes(&args).await?;
    let heartbeat = Heartbeat::default();
    start_observability(&args, heartbeat.clone()).await;
    let mut settings = payload_settings(&args);
    settings.project_id = project_id.unwrap_or(settings.project_id);
    let stop = Arc::new(AtomicBool::new(false));
    let mut capture_task = tokio::task::spawn_blocking({
        let stop = stop.clone();
        let queues = sinks.queues.clone();
        move || capture(&args, settings, queues, &stop, heartbeat, pods)
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
    let written = drain_sinks(sinks).await?;
    match reason {
        StopReason::Signal => tracing::info!(payloads = written, "stopped by signal"),
        StopReason::TargetsExited => tracing::info!(payloads = written, "no watched process left"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_key_joins_the_resource_only_for_apitoolkit_s_own_collector() {
        let collector = |url: &str| monoscope_collector(&reqwest::Url::parse(url).unwrap());
        assert!(collector("http://otelcol.apitoolkit.io:4317"));
        assert!(collector("https://otel.monoscope.tech"));
        assert!(!collector("http://localhost:4317"));
        assert!(!collector("https://apitoolkit.io.example.com:4318"));
        assert!(!collector("https://notapitoolkit.io"));
    }
}
