//! apitoolkit-agent: kernel events -> connection tracker -> HTTP reassembly -> exchange ->
//! payload -> sink.

pub mod allocator;
pub mod bootstrap;
pub mod ciphertext;
pub mod config;
pub mod connections;
pub mod errors;
pub mod events;
pub mod http;
pub mod kubernetes;
pub mod link;
pub mod observability;
pub mod payload;
pub mod pipeline;
pub mod preflight;
pub mod probes;
pub mod redact;
pub mod sinks;

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    io::{BufRead, BufReader, BufWriter, Write},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};

use crate::{
    config::CaptureArgs,
    events::{ConnId, Event},
    kubernetes::SharedPods,
    observability::{Heartbeat, Snapshot},
    payload::{Payload, PayloadSettings, SdkType},
    pipeline::{CaptureScope, Pipeline, ProfileDetector},
    probes::{
        Probes,
        process::{self, ProcessProfile},
        select::{Criteria, Selector},
        sockets,
        tls::TlsWatcher,
    },
    redact::Redactor,
    sinks::PayloadQueue,
};

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

/// Registers the TCP connections `pids` already hold with the kernel side and returns their
/// open events; the kernel's timestamps and generations use CLOCK_MONOTONIC too.
fn register_existing_connections(probes: &mut Probes, pids: &[u32]) -> anyhow::Result<Vec<Event>> {
    let mut events = Vec::new();
    for &pid in pids {
        for existing in sockets::existing_connections(pid) {
            let generation = clock_ns(libc::CLOCK_MONOTONIC) as u64;
            probes.register_connection(pid, existing.fd, generation)?;
            events.push(Event::Open {
                conn: ConnId {
                    tgid: pid,
                    fd: existing.fd,
                    generation,
                },
                timestamp_ns: generation,
                role: existing.role,
                remote: Some(existing.remote),
                midstream: true,
            });
        }
    }
    Ok(events)
}

fn settings(args: &CaptureArgs) -> PayloadSettings {
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

fn scope(args: &CaptureArgs) -> CaptureScope {
    CaptureScope {
        outgoing: args.capture_outgoing,
        errors: args.capture_errors,
    }
}

/// Profiles live processes from /proc, tagged with their pod when running in Kubernetes;
/// `--sdk-type` overrides the detected framework.
fn live_profiles(forced: Option<SdkType>, pods: SharedPods) -> ProfileDetector {
    Box::new(move |tgid| {
        let detected = process::profile(tgid);
        let tags = kubernetes::pod_of_process(tgid)
            .and_then(|pod| pods.read().ok().map(|index| index.tags(&pod)))
            .unwrap_or_default();
        let profile = ProcessProfile {
            sdk_type: forced.unwrap_or(detected.sdk_type),
            tags: tags.into(),
            ..detected
        };
        tracing::info!(
            pid = tgid,
            sdk_type = ?profile.sdk_type,
            thread_per_request = profile.thread_per_request,
            tags = ?profile.tags,
            "detected framework"
        );
        profile
    })
}

/// Replays a recording through the pipeline, writing payloads as NDJSON to `out`.
pub fn replay(file: &Path, args: &CaptureArgs, mut out: impl Write) -> anyhow::Result<u64> {
    let reader = BufReader::new(
        File::open(file).with_context(|| format!("opening recording {}", file.display()))?,
    );
    // The recorded processes are gone: nothing to read from /proc.
    let profile = ProcessProfile {
        sdk_type: args.sdk_type.unwrap_or(SdkType::SDKUnknown),
        thread_per_request: true,
        tags: Arc::default(),
    };
    let mut pipeline = Pipeline::new(
        settings(args),
        scope(args),
        redactor(args)?,
        Box::new(move |_| profile.clone()),
    );
    let mut written = 0;
    for (index, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", file.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let event: Event = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: not a recorded event", file.display(), index + 1))?;
        for payload in pipeline.feed(event).payloads {
            serde_json::to_writer(&mut out, &payload)?;
            out.write_all(b"\n")?;
            written += 1;
        }
    }
    out.flush()?;
    tracing::info!(stats = ?pipeline.stats(), "replay finished");
    Ok(written)
}

const DRAIN_PAUSE: Duration = Duration::from_millis(10);

/// Why capture stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum StopReason {
    Signal,
    TargetsExited,
}

/// Processes a discovery pass set up.
struct Discovered {
    pids: Vec<u32>,
    existing_connections: usize,
}

struct Capture {
    ring: RingBuf<MapData>,
    pipeline: Pipeline,
    sinks: Vec<Arc<PayloadQueue>>,
    /// Payloads of the current drain, handed to the sinks as one batch.
    outbox: Vec<Payload>,
    recorder: Option<BufWriter<File>>,
    selector: Selector,
    /// Processes set up so far (existing connections registered, target map entry written).
    watched: HashSet<u32>,
    /// Seconds since the last TLS rescan of every watched process (new ones are scanned at once).
    since_tls_rescan: u32,
    tls: TlsWatcher,
    /// Processes already warned about for TLS the agent cannot read.
    unreadable_tls_reported: HashSet<u32>,
    decode_errors: u64,
    /// Payload bytes the kernel delivered.
    captured_bytes: u64,
    /// Names of watched processes, for metric labels.
    process_names: HashMap<u32, String>,
    heartbeat: Heartbeat,
}

impl Capture {
    fn handle(&mut self, event: Event, probes: &mut Probes) -> anyhow::Result<()> {
        if let Some(recorder) = &mut self.recorder {
            serde_json::to_writer(&mut *recorder, &event)?;
            recorder.write_all(b"\n")?;
        }
        if let Event::Data(data) = &event {
            self.captured_bytes += data.data.len() as u64;
        }
        let output = self.pipeline.feed(event);
        for (conn, source) in output.disable {
            if let Err(error) = probes.disable(conn, source) {
                tracing::warn!(%error, ?conn, ?source, "could not disable connection in the kernel");
            }
        }
        for conn in output.unreadable_tls {
            if self.tls.probes(conn.tgid) {
                // A probed library that produced no plaintext: a custom BIO or a lost mapping.
                tracing::debug!(?conn, "TLS connection without plaintext");
            } else if self.unreadable_tls_reported.insert(conn.tgid) {
                tracing::warn!(
                    pid = conn.tgid,
                    "HTTPS without plaintext: this process uses a TLS library the agent does not \
                     probe (Go crypto/tls, rustls, Java, or a static build without SSL symbols), \
                     so its HTTPS is not captured"
                );
            }
        }
        self.outbox.extend(output.payloads);
        Ok(())
    }

    fn drain(&mut self, probes: &mut Probes) -> anyhow::Result<()> {
        const BATCH: usize = 1024;
        loop {
            // Decode into owned events first: ring items borrow the ring buffer.
            let mut events = Vec::with_capacity(BATCH);
            let mut read = 0;
            while read < BATCH {
                let Some(item) = self.ring.next() else {
                    break;
                };
                read += 1;
                match Event::decode(&item) {
                    Ok(event) => events.push(event),
                    Err(error) => {
                        self.decode_errors += 1;
                        tracing::warn!(%error, "dropped undecodable ring-buffer record");
                    }
                }
            }
            for event in events {
                self.handle(event, probes)?;
            }
            if !self.outbox.is_empty() {
                let batch = std::mem::take(&mut self.outbox);
                if let Some((last, others)) = self.sinks.split_last() {
                    for sink in others {
                        sink.push(batch.iter().cloned());
                    }
                    last.push(batch);
                }
            }
            if read < BATCH {
                return Ok(());
            }
        }
    }

    /// Sets up processes selected since the last call: their existing connections, their
    /// target-map entry and their TLS libraries. Every few seconds all watched processes are
    /// rescanned for TLS libraries loaded since (dlopen).
    fn discover(&mut self, probes: &mut Probes) -> anyhow::Result<Discovered> {
        const TLS_RESCAN_SECONDS: u32 = 5;
        let selected = self.selector.scan();
        let new: Vec<u32> = selected
            .all()
            .filter(|pid| !self.watched.contains(pid))
            .collect();
        let existing = register_existing_connections(probes, &new)?;
        let existing_connections = existing.len();
        let new_by_id: Vec<u32> = selected
            .by_id
            .iter()
            .filter(|pid| !self.watched.contains(pid))
            .copied()
            .collect();
        probes.add_targets(&new_by_id)?;
        for event in existing {
            self.handle(event, probes)?;
        }
        self.watched = selected.all().collect();
        let watched = &self.watched;
        self.tls.retain_processes(|pid| watched.contains(&pid));
        self.since_tls_rescan += 1;
        if self.since_tls_rescan >= TLS_RESCAN_SECONDS {
            self.since_tls_rescan = 0;
            let watched: Vec<u32> = self.watched.iter().copied().collect();
            self.tls.scan(probes, &watched);
        } else {
            self.tls.scan(probes, &new);
        }
        Ok(Discovered {
            pids: new,
            existing_connections,
        })
    }

    fn record_metrics(&mut self, probes: &Probes) -> anyhow::Result<()> {
        let losses = probes.losses()?;
        let watched = &self.watched;
        self.process_names.retain(|pid, _| watched.contains(pid));
        for pid in self.pipeline.payloads_by_process().keys() {
            self.process_names
                .entry(*pid)
                .or_insert_with(|| process::name(*pid));
        }
        let payloads_by_process = self
            .pipeline
            .payloads_by_process()
            .iter()
            .map(|(pid, payloads)| {
                let name = self.process_names.get(pid).map_or("", String::as_str);
                (*pid, name, *payloads)
            })
            .collect();
        observability::record(&Snapshot {
            tracker: self.pipeline.stats(),
            links: self.pipeline.link_stats(),
            losses: &losses,
            decode_errors: self.decode_errors,
            captured_bytes: self.captured_bytes,
            sinks: &self.sinks,
            watched_processes: self.watched.len(),
            payloads_by_process,
        });
        Ok(())
    }

    /// Consumes events until `stop` is set or every watched root process has exited.
    fn run(&mut self, probes: &mut Probes, stop: &AtomicBool) -> anyhow::Result<StopReason> {
        let mut last_liveness_check = Instant::now();
        loop {
            if stop.load(Ordering::Relaxed) {
                self.drain(probes)?;
                return Ok(StopReason::Signal);
            }
            if probes::wait_readable(&self.ring, 100).context("polling the ring buffer")? {
                self.drain(probes)?;
                // A pause lets records accumulate so that one wake-up drains many of them: at
                // 5k req/s that is ~50 exchanges per wake-up instead of ~10, for at most this
                // much latency. The ring buffer must hold this long of traffic.
                std::thread::sleep(DRAIN_PAUSE);
            }
            if last_liveness_check.elapsed() > Duration::from_secs(1) {
                last_liveness_check = Instant::now();
                self.heartbeat.beat();
                allocator::return_freed_memory();
                self.record_metrics(probes)?;
                // Exit records can be lost when the ring buffer is full: /proc decides.
                if !self.selector.is_open_ended() && self.selector.live_roots().is_empty() {
                    self.drain(probes)?;
                    return Ok(StopReason::TargetsExited);
                }
                let discovered = self.discover(probes)?;
                if !discovered.pids.is_empty() {
                    tracing::info!(
                        pids = ?discovered.pids,
                        existing_connections = discovered.existing_connections,
                        "watching new processes"
                    );
                }
            }
        }
    }
}

/// Attaches to the processes in `args`, streams payloads to the sinks' queues until a signal
/// sets `stop` or the watched processes exit.
pub fn capture(
    args: &CaptureArgs,
    sinks: Vec<Arc<PayloadQueue>>,
    stop: Arc<AtomicBool>,
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
    let redactor = redactor(args)?;
    let mut probes = Probes::load(args.ring_buffer_bytes)?;
    probes.capture_stderr(args.capture_errors)?;
    if selector.all() {
        probes.select_all()?;
    }
    if !selector.cgroups().is_empty() {
        let ids: Vec<u64> = selector.cgroups().iter().map(|cgroup| cgroup.id).collect();
        probes.select_cgroups(&ids)?;
    }
    let recorder = match &args.record {
        Some(path) => {
            Some(BufWriter::new(File::create(path).with_context(|| {
                format!("creating recording {}", path.display())
            })?))
        }
        None => None,
    };
    let mut capture = Capture {
        ring: probes.take_ring_buffer()?,
        pipeline: Pipeline::new(
            settings(args),
            scope(args),
            redactor,
            live_profiles(args.sdk_type, pods),
        ),
        sinks,
        outbox: Vec::new(),
        recorder,
        selector,
        watched: HashSet::new(),
        since_tls_rescan: 0,
        tls: TlsWatcher::default(),
        unreadable_tls_reported: HashSet::new(),
        decode_errors: 0,
        captured_bytes: 0,
        process_names: HashMap::new(),
        heartbeat,
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
    let reason = capture.run(&mut probes, &stop);
    capture.record_metrics(&probes)?;
    if let Some(recorder) = &mut capture.recorder {
        recorder.flush().context("writing the recording")?;
    }
    let losses = probes.losses()?;
    let stats = capture.pipeline.stats();
    let links = capture.pipeline.link_stats();
    tracing::info!(
        exchanges = stats.exchanges,
        connections = stats.connections_opened,
        gaps = stats.gaps,
        gap_bytes = stats.gap_bytes,
        desyncs = stats.desyncs,
        unpaired_requests = stats.unpaired_requests,
        unpaired_responses = stats.unpaired_responses,
        malformed_messages = stats.malformed_messages,
        not_http_connections = stats.not_http_connections,
        outgoing_with_parent = links.outgoing_with_parent,
        failed_calls = links.failed_calls,
        errors_attached = links.errors_attached,
        errors_unattached = links.errors_unattached,
        tls_connections = stats.tls_connections,
        unreadable_tls_connections = stats.unreadable_tls_connections,
        tls_unmapped = losses.tls_unmapped,
        ringbuf_full = losses.ringbuf_full,
        conn_table_full = losses.conn_table_full,
        inflight_table_full = losses.inflight_table_full,
        user_read_failed = losses.user_read_failed,
        decode_errors = capture.decode_errors,
        sink_dropped = capture.sinks.iter().map(|sink| sink.dropped()).sum::<u64>(),
        "capture stopped"
    );
    reason
}
