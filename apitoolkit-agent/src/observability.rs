//! The agent's own health and metrics: Prometheus text on `/metrics` and a liveness answer on
//! `/healthz`, served on a local address. The capture loop publishes its counters here once a
//! second; a loop that stops ticking makes `/healthz` fail.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::{
    capture::KernelLosses,
    pipeline::{LinkStats, RouteStats, connections::TrackerStats},
    sinks::SinkQueues,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

/// `/healthz` fails when the capture loop has not ticked for this long.
const STALL_SECONDS: u64 = 5;
const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Connections held at once; a new one closes the oldest, so a flood of idle clients never
/// keeps a probe from its answer, nor the agent's fds.
const MAX_CONNECTIONS: usize = 256;
/// A client gets this long to send its request and read the answer.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed accept (out of fds, say), so the loop never spins.
const ACCEPT_RETRY: Duration = Duration::from_millis(200);

fn now_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or_default()
}

/// When the capture loop last ran, shared between it and the HTTP endpoint.
#[derive(Clone, Default)]
pub struct Heartbeat(Arc<AtomicU64>);

impl Heartbeat {
    pub fn beat(&self) {
        self.0.store(now_seconds(), Ordering::Relaxed);
    }

    fn healthy(&self) -> bool {
        now_seconds().saturating_sub(self.0.load(Ordering::Relaxed)) < STALL_SECONDS
    }
}

/// What the capture loop itself counts.
#[derive(Clone, Debug, Default)]
pub struct CaptureTotals {
    /// Ring-buffer records that could not be decoded.
    pub decode_errors: u64,
    /// Payload bytes the kernel delivered.
    pub captured_bytes: u64,
}

/// What the capture loop reports once a second; counters are absolute totals.
pub struct Snapshot<'a> {
    pub tracker: &'a TrackerStats,
    pub links: &'a LinkStats,
    pub routes: &'a RouteStats,
    pub losses: KernelLosses,
    pub totals: &'a CaptureTotals,
    pub sinks: &'a SinkQueues,
    pub watched_processes: usize,
    /// Bytes held for messages still arriving.
    pub buffered_bytes: usize,
    /// Payloads per live process, with its name.
    pub payloads_by_process: Vec<(u32, &'a str, u64)>,
}

/// Every counter the agent keeps, listed once: its field in the shutdown log, its Prometheus
/// name (and label), and its value in `$snapshot`. `$use` receives the list.
macro_rules! counters {
    ($snapshot:ident, $use:ident) => {
        $use! {
            exchanges: "apitoolkit_agent_exchanges_total" = $snapshot.tracker.exchanges;
            connections: "apitoolkit_agent_connections_total" = $snapshot.tracker.connections_opened;
            captured_bytes: "apitoolkit_agent_captured_bytes_total" = $snapshot.totals.captured_bytes;
            gaps: "apitoolkit_agent_gaps_total" = $snapshot.tracker.gaps;
            gap_bytes: "apitoolkit_agent_gap_bytes_total" = $snapshot.tracker.gap_bytes;
            desyncs: "apitoolkit_agent_parse_failures_total" {"kind" => "desync"} = $snapshot.tracker.desyncs;
            unpaired_requests: "apitoolkit_agent_parse_failures_total" {"kind" => "unpaired_request"} = $snapshot.tracker.unpaired_requests;
            unpaired_responses: "apitoolkit_agent_parse_failures_total" {"kind" => "unpaired_response"} = $snapshot.tracker.unpaired_responses;
            malformed_messages: "apitoolkit_agent_parse_failures_total" {"kind" => "malformed"} = $snapshot.tracker.malformed_messages;
            not_http_connections: "apitoolkit_agent_not_http_connections_total" = $snapshot.tracker.not_http_connections;
            outgoing_with_parent: "apitoolkit_agent_outgoing_with_parent_total" = $snapshot.links.outgoing_with_parent;
            failed_calls: "apitoolkit_agent_failed_calls_total" = $snapshot.links.failed_calls;
            errors_attached: "apitoolkit_agent_errors_attached_total" = $snapshot.links.errors_attached;
            errors_unattached: "apitoolkit_agent_errors_unattached_total" = $snapshot.links.errors_unattached;
            unmatched_paths: "apitoolkit_agent_unmatched_paths_total" = $snapshot.routes.unmatched;
            held_5xx: "apitoolkit_agent_held_5xx_total" {"outcome" => "held"} = $snapshot.links.held_5xx;
            held_errors_attached: "apitoolkit_agent_held_5xx_total" {"outcome" => "error_attached"} = $snapshot.links.held_errors_attached;
            held_released_without_error: "apitoolkit_agent_held_5xx_total" {"outcome" => "released_without_error"} = $snapshot.links.held_released_without_error;
            tls_connections: "apitoolkit_agent_tls_connections_total" = $snapshot.tracker.tls_connections;
            unreadable_tls_connections: "apitoolkit_agent_unreadable_tls_connections_total" = $snapshot.tracker.unreadable_tls_connections;
            headers_incomplete: "apitoolkit_agent_headers_incomplete_total" = $snapshot.tracker.headers_incomplete;
            evicted_connections: "apitoolkit_agent_evicted_connections_total" = $snapshot.tracker.evicted_connections;
            evicted_bytes: "apitoolkit_agent_evicted_bytes_total" = $snapshot.tracker.evicted_bytes;
            tls_unmapped: "apitoolkit_agent_dropped_events_total" {"cause" => "tls_unmapped"} = $snapshot.losses.tls_unmapped;
            ringbuf_full: "apitoolkit_agent_dropped_events_total" {"cause" => "ringbuf_full"} = $snapshot.losses.ringbuf_full;
            conn_table_full: "apitoolkit_agent_dropped_events_total" {"cause" => "conn_table_full"} = $snapshot.losses.conn_table_full;
            inflight_table_full: "apitoolkit_agent_dropped_events_total" {"cause" => "inflight_table_full"} = $snapshot.losses.inflight_table_full;
            user_read_failed: "apitoolkit_agent_dropped_events_total" {"cause" => "user_read_failed"} = $snapshot.losses.user_read_failed;
            decode_errors: "apitoolkit_agent_dropped_events_total" {"cause" => "decode_error"} = $snapshot.totals.decode_errors;
            stderr_yielded: "apitoolkit_agent_dropped_events_total" {"cause" => "stderr_yielded"} = $snapshot.losses.stderr_yielded;
        }
    };
}

macro_rules! export_counters {
    ($($field:ident: $name:literal $({$label:literal => $label_value:literal})? = $value:expr;)*) => {
        $(metrics::counter!($name $(, $label => $label_value)?).absolute($value);)*
    };
}

/// The shutdown log line: every counter, and what the sinks dropped (per sink on /metrics).
macro_rules! log_counters {
    ($($field:ident: $name:literal $({$label:literal => $label_value:literal})? = $value:expr;)*) => {
        |sink_dropped: u64| tracing::info!($($field = $value,)* sink_dropped, "capture stopped")
    };
}

/// Publishes a snapshot to the metrics recorder (a no-op without one).
pub fn export(snapshot: &Snapshot<'_>) {
    use metrics::gauge;
    counters!(snapshot, export_counters);
    for sink in snapshot.sinks.all() {
        let name = sink.name();
        gauge!("apitoolkit_agent_sink_queued_bytes", "sink" => name)
            .set(sink.queued_bytes() as f64);
        metrics::counter!("apitoolkit_agent_sink_dropped_payloads_total", "sink" => name)
            .absolute(sink.dropped());
    }
    gauge!("apitoolkit_agent_watched_processes").set(snapshot.watched_processes as f64);
    gauge!("apitoolkit_agent_buffered_bytes").set(snapshot.buffered_bytes as f64);
    for (pid, name, payloads) in &snapshot.payloads_by_process {
        metrics::counter!("apitoolkit_agent_payloads_total", "pid" => pid.to_string(), "process" => name.to_string())
            .absolute(*payloads);
    }
}

/// Logs the final totals when capture stops.
pub fn log_totals(snapshot: &Snapshot<'_>) {
    let sink_dropped = snapshot.sinks.all().map(|sink| sink.dropped()).sum();
    (counters!(snapshot, log_counters))(sink_dropped);
}

/// How often [`LossReport`] sums up.
pub const LOSS_REPORT_INTERVAL: Duration = Duration::from_secs(60);

/// Counters meaning traffic went uncaptured, by the name the shutdown log gives them; the
/// second part says whether the kernel dropped it (a warning) or reassembly could not use it.
fn uncaptured(snapshot: &Snapshot<'_>) -> [(&'static str, u64, bool); 14] {
    let (tracker, losses) = (snapshot.tracker, &snapshot.losses);
    [
        ("unpaired_requests", tracker.unpaired_requests, false),
        ("unpaired_responses", tracker.unpaired_responses, false),
        ("malformed_messages", tracker.malformed_messages, false),
        ("desyncs", tracker.desyncs, false),
        ("gap_bytes", tracker.gap_bytes, false),
        ("evicted_connections", tracker.evicted_connections, true),
        ("ringbuf_full", losses.ringbuf_full, true),
        ("conn_table_full", losses.conn_table_full, true),
        ("inflight_table_full", losses.inflight_table_full, true),
        ("user_read_failed", losses.user_read_failed, true),
        ("tls_unmapped", losses.tls_unmapped, true),
        ("stderr_yielded", losses.stderr_yielded, true),
        ("decode_errors", snapshot.totals.decode_errors, true),
        (
            "sink_dropped",
            snapshot.sinks.all().map(|sink| sink.dropped()).sum(),
            true,
        ),
    ]
}

/// Once an interval, one log line with what went uncaptured in it, if anything did: counters
/// on /metrics alone go unnoticed. Requests answered but unparsable (invalid chunking, cut by
/// their client) show up here as unpaired or malformed.
#[derive(Default)]
pub struct LossReport {
    previous: Vec<u64>,
    ticks: u32,
}

impl LossReport {
    /// Called once a second; every `interval` ticks, returns the growth of each uncaptured
    /// counter since the last report (`name=growth ...`, nothing when none grew) and whether
    /// the kernel or the agent dropped any of it.
    pub fn tick(&mut self, snapshot: &Snapshot<'_>, interval: u32) -> Option<(String, bool)> {
        self.ticks += 1;
        if self.ticks < interval {
            return None;
        }
        self.ticks = 0;
        let now = uncaptured(snapshot);
        let previous = std::mem::replace(&mut self.previous, now.iter().map(|c| c.1).collect());
        let mut dropped = false;
        let grown: Vec<String> = now
            .iter()
            .enumerate()
            .filter_map(|(index, &(name, value, drop))| {
                let growth = value - previous.get(index).copied().unwrap_or(0);
                dropped |= drop && growth > 0;
                (growth > 0).then(|| format!("{name}={growth}"))
            })
            .collect();
        (!grown.is_empty()).then(|| (grown.join(" "), dropped))
    }
}

/// Logs what [`LossReport::tick`] found.
pub fn report_losses(report: &mut LossReport, snapshot: &Snapshot<'_>) {
    let interval = LOSS_REPORT_INTERVAL.as_secs() as u32;
    match report.tick(snapshot, interval) {
        Some((lost, true)) => tracing::warn!(%lost, seconds = interval, "not captured recently"),
        Some((lost, false)) => tracing::info!(%lost, seconds = interval, "not captured recently"),
        None => {}
    }
}

/// Installs the process-wide metrics recorder.
pub fn install_recorder() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    PrometheusBuilder::new().install_recorder()
}

fn response(status: &str, content_type: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
}

/// The answer to one request, from its bytes.
fn answer(request: &[u8], metrics: &PrometheusHandle, heartbeat: &Heartbeat) -> Option<String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut parsed = httparse::Request::new(&mut headers);
    if !parsed.parse(request).ok()?.is_complete() {
        return None;
    }
    Some(match (parsed.method, parsed.path) {
        (Some("GET"), Some("/metrics")) => {
            response("200 OK", "text/plain; version=0.0.4", &metrics.render())
        }
        (Some("GET"), Some("/healthz")) if heartbeat.healthy() => {
            response("200 OK", "text/plain", "ok\n")
        }
        (Some("GET"), Some("/healthz")) => response(
            "503 Service Unavailable",
            "text/plain",
            "capture loop stalled\n",
        ),
        _ => response("404 Not Found", "text/plain", "try /metrics or /healthz\n"),
    })
}

async fn handle(mut stream: TcpStream, metrics: PrometheusHandle, heartbeat: Heartbeat) {
    let mut request = Vec::new();
    let mut buffer = [0u8; 1024];
    while request.len() < MAX_REQUEST_BYTES {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => request.extend_from_slice(&buffer[..read]),
        }
        if let Some(answer) = answer(&request, &metrics, &heartbeat) {
            let _ = stream.write_all(answer.as_bytes()).await;
            return;
        }
    }
}

/// Serves `/metrics` and `/healthz` until the runtime stops. Each client gets
/// `CONNECTION_TIMEOUT`, at most `MAX_CONNECTIONS` are held (the oldest is closed for a new
/// one), and a failing accept is retried after a pause and logged once per failing spell.
pub async fn serve(listener: TcpListener, metrics: PrometheusHandle, heartbeat: Heartbeat) {
    let mut held: VecDeque<JoinHandle<()>> = VecDeque::new();
    let mut failing = false;
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                failing = false;
                held.retain(|connection| !connection.is_finished());
                if held.len() >= MAX_CONNECTIONS
                    && let Some(oldest) = held.pop_front()
                {
                    oldest.abort();
                }
                let answer = handle(stream, metrics.clone(), heartbeat.clone());
                held.push_back(tokio::spawn(async move {
                    let _ = tokio::time::timeout(CONNECTION_TIMEOUT, answer).await;
                }));
            }
            Err(error) => {
                if !failing {
                    tracing::warn!(%error, "metrics endpoint cannot accept connections; retrying");
                    failing = true;
                }
                tokio::time::sleep(ACCEPT_RETRY).await;
            }
        }
    }
}

/// Binds the endpoint; a busy address costs the endpoint, never the capture.
pub async fn bind(address: SocketAddr) -> Option<TcpListener> {
    match TcpListener::bind(address).await {
        Ok(listener) => {
            tracing::info!(%address, "serving /metrics and /healthz");
            Some(listener)
        }
        Err(error) => {
            tracing::warn!(%address, %error, "metrics endpoint not served");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle() -> PrometheusHandle {
        PrometheusBuilder::new().build_recorder().handle()
    }

    #[test]
    fn healthz_follows_the_heartbeat_and_unknown_paths_are_404() {
        let heartbeat = Heartbeat::default();
        let get = |path: &str| {
            answer(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
                &handle(),
                &heartbeat,
            )
            .unwrap()
        };
        assert!(get("/healthz").starts_with("HTTP/1.1 503"));
        heartbeat.beat();
        assert!(get("/healthz").starts_with("HTTP/1.1 200"));
        assert!(get("/metrics").starts_with("HTTP/1.1 200"));
        assert!(get("/other").starts_with("HTTP/1.1 404"));
        assert!(answer(b"GET /metr", &handle(), &heartbeat).is_none());
    }

    /// Every counter gets a distinct value: the shutdown log and /metrics must both show all.
    fn distinct_counters() -> (TrackerStats, LinkStats, KernelLosses, CaptureTotals) {
        let tracker = TrackerStats {
            connections_opened: 1,
            exchanges: 2,
            gaps: 3,
            gap_bytes: 4,
            desyncs: 5,
            unpaired_requests: 6,
            unpaired_responses: 7,
            malformed_messages: 8,
            not_http_connections: 9,
            tls_connections: 10,
            unreadable_tls_connections: 11,
            evicted_connections: 23,
            headers_incomplete: 26,
            evicted_bytes: 24,
        };
        let links = LinkStats {
            outgoing_with_parent: 12,
            failed_calls: 13,
            errors_attached: 14,
            errors_unattached: 15,
            held_5xx: 27,
            held_errors_attached: 28,
            held_released_without_error: 29,
        };
        let losses = KernelLosses {
            ringbuf_full: 16,
            conn_table_full: 17,
            inflight_table_full: 18,
            user_read_failed: 19,
            tls_unmapped: 20,
            stderr_yielded: 25,
        };
        let totals = CaptureTotals {
            decode_errors: 21,
            captured_bytes: 22,
        };
        (tracker, links, losses, totals)
    }

    #[test]
    fn the_shutdown_log_and_metrics_carry_every_counter() {
        let (tracker, links, losses, totals) = distinct_counters();
        let snapshot = Snapshot {
            tracker: &tracker,
            links: &links,
            routes: &RouteStats { unmatched: 30 },
            losses,
            totals: &totals,
            sinks: &SinkQueues::default(),
            watched_processes: 0,
            buffered_bytes: 0,
            payloads_by_process: Vec::new(),
        };
        let recorder = PrometheusBuilder::new().build_recorder();
        let metrics = recorder.handle();
        metrics::with_local_recorder(&recorder, || export(&snapshot));
        let mut exported: Vec<u64> = metrics
            .render()
            .lines()
            .filter(|line| line.starts_with("apitoolkit_agent_"))
            .filter(|line| !line.starts_with("apitoolkit_agent_watched_processes"))
            .filter(|line| !line.starts_with("apitoolkit_agent_buffered_bytes"))
            .filter_map(|line| line.rsplit(' ').next()?.parse().ok())
            .collect();
        exported.sort_unstable();
        assert_eq!(exported, (1..=30).collect::<Vec<u64>>());

        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let writer = {
            let log = log.clone();
            move || LogWriter(log.clone())
        };
        let subscriber = tracing_subscriber::fmt()
            .with_writer(writer)
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || log_totals(&snapshot));
        let line = String::from_utf8(log.lock().unwrap().clone()).unwrap();
        assert!(line.contains("capture stopped"), "{line}");
        let mut logged: Vec<u64> = line
            .split_whitespace()
            .filter_map(|token| token.split_once('='))
            .filter(|(key, _)| *key != "sink_dropped")
            .filter_map(|(_, value)| value.parse().ok())
            .collect();
        logged.sort_unstable();
        assert_eq!(logged, (1..=30).collect::<Vec<u64>>());
        assert!(line.contains("not_http_connections=9 ") && line.contains("errors_unattached=15 "));
    }

    #[test]
    fn the_loss_report_says_what_grew_in_each_interval_and_nothing_when_nothing_did() {
        let (mut tracker, links, mut losses, totals) = distinct_counters();
        let mut report = LossReport::default();
        let mut tick = |tracker: &TrackerStats, losses: &KernelLosses| {
            let snapshot = Snapshot {
                tracker,
                links: &links,
                routes: &RouteStats::default(),
                losses: losses.clone(),
                totals: &totals,
                sinks: &SinkQueues::default(),
                watched_processes: 0,
                buffered_bytes: 0,
                payloads_by_process: Vec::new(),
            };
            (0..3)
                .filter_map(|_| report.tick(&snapshot, 3))
                .collect::<Vec<_>>()
        };
        let first = tick(&tracker, &losses);
        assert_eq!(first.len(), 1, "one report per interval");
        assert!(
            first[0]
                .0
                .starts_with("unpaired_requests=6 unpaired_responses=7")
        );
        assert!(first[0].1);
        assert_eq!(tick(&tracker, &losses), vec![], "nothing grew");
        tracker.malformed_messages += 2;
        assert_eq!(
            tick(&tracker, &losses),
            vec![("malformed_messages=2".to_owned(), false)]
        );
        losses.stderr_yielded += 1;
        tracker.unpaired_requests += 4;
        assert_eq!(
            tick(&tracker, &losses),
            vec![("unpaired_requests=4 stderr_yielded=1".to_owned(), true)]
        );
    }

    struct LogWriter(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for LogWriter {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
