//! Per-connection state keyed by (tgid, fd, generation): byte positions with gap detection, the
//! connection's role, whether its socket carries TLS, and its HTTP reassembly.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
};

use bytes::{Buf, Bytes};

use super::{
    ciphertext::{RecordWalker, looks_like_tls_record},
    events::{ConnId, DataEvent, Direction, Event, Role, Source, Worker},
    protocols::{
        Anomaly, Exchange, Reassembled, Reassembler,
        http1::parser::looks_like_start,
        message::{Message, MessageKind},
    },
};

/// Bytes of unrecognisable data after which a connection of unknown role is given up.
const MAX_UNCLASSIFIED_BYTES: u64 = 64 * 1024;

#[derive(Debug)]
pub struct TrackedExchange {
    pub conn: ConnId,
    pub role: Role,
    pub remote: Option<SocketAddr>,
    /// Who moved the bytes that completed the exchange: the one that wrote a server's
    /// response or read a client's.
    pub worker: Worker,
    pub exchange: Exchange,
}

/// An outgoing call that got no response: its connect failed, the connection broke, or it
/// closed with the request unanswered.
#[derive(Debug)]
pub struct FailedCall {
    pub conn: ConnId,
    pub remote: Option<SocketAddr>,
    /// Who made the call.
    pub worker: Worker,
    pub timestamp_ns: u64,
    /// What the kernel reported; `None` when the connection just closed.
    pub errno: Option<u32>,
    /// The request, when it was sent.
    pub request: Option<Message>,
}

/// A server thread read a whole request and is now serving it (until the exchange with the
/// same connection and serial comes out).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Serving {
    pub conn: ConnId,
    pub serial: u64,
    pub worker: Worker,
    /// The request's `traceparent` header, as sent.
    pub traceparent: Option<String>,
}

/// Counters of what the tracker saw and what it could not use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrackerStats {
    pub connections_opened: u64,
    pub exchanges: u64,
    pub gaps: u64,
    pub gap_bytes: u64,
    pub desyncs: u64,
    pub unpaired_requests: u64,
    pub unpaired_responses: u64,
    pub malformed_messages: u64,
    pub not_http_connections: u64,
    /// Connections whose plaintext came from TLS library probes.
    pub tls_connections: u64,
    /// Connections that carried TLS records but no plaintext: their TLS library is not probed.
    pub unreadable_tls_connections: u64,
    /// HTTP/2 exchanges of connections older than the agent, some header fields unknown.
    pub headers_incomplete: u64,
    /// Connections whose unfinished messages were dropped to keep memory bounded.
    pub evicted_connections: u64,
    pub evicted_bytes: u64,
}

#[derive(Debug, Default)]
pub struct TrackerOutput {
    pub exchanges: Vec<TrackedExchange>,
    /// Byte sources of connections that carry no HTTP (or only ciphertext): the kernel can stop
    /// sending them.
    pub disable: Vec<(ConnId, Source)>,
    /// TLS connections that carried application data and no plaintext.
    pub unreadable_tls: Vec<ConnId>,
    pub serving: Vec<Serving>,
    pub failed_calls: Vec<FailedCall>,
}

/// What the connection's bytes are, as far as the tracker has seen.
#[derive(Debug)]
enum Transport {
    Plain,
    /// The socket carries TLS records and no plaintext has arrived (yet).
    Encrypted {
        ingress: RecordWalker,
        egress: RecordWalker,
    },
    /// Plaintext comes from the TLS library; the socket's ciphertext is ignored.
    Tls,
    /// Too much ciphertext came without plaintext: the TLS library is not probed.
    Unreadable,
}

/// How far each direction of a closing connection went, and when it closed.
struct StreamEnd {
    sent: u64,
    received: u64,
    timestamp_ns: u64,
}

struct Connection {
    role: Role,
    remote: Option<SocketAddr>,
    /// The open was seen, so each stream starts at position 0.
    seen_from_start: bool,
    /// The thread that last moved bytes on the connection.
    last_worker: Worker,
    /// The error a call on this connection failed with, reported with its unanswered request.
    error: Option<u32>,
    transport: Transport,
    /// Next expected stream position per direction; `None` until the first bytes of a
    /// connection whose start was not seen.
    next_ingress: Option<u64>,
    next_egress: Option<u64>,
    unclassified_bytes: u64,
    http: Reassembler,
    ignored: bool,
    /// Heap bytes its reassembly held after its last bytes (counted in the tracker's total).
    retained_bytes: usize,
    last_data_ns: u64,
}

/// Default bound of the bytes all connections may hold for unfinished messages.
pub const DEFAULT_MAX_BUFFERED_BYTES: usize = 128 << 20;

pub struct ConnectionTracker {
    /// Looked up for every record: hashed with foldhash, several times cheaper than SipHash
    /// for these kernel-assigned keys.
    connections: HashMap<ConnId, Connection, foldhash::fast::RandomState>,
    max_body_bytes: usize,
    /// Beyond this many bytes held for unfinished messages, the connections idle longest are
    /// evicted: whatever clients do, the agent's memory stays bounded.
    max_buffered_bytes: usize,
    buffered_bytes: usize,
    /// When eviction was last logged: once a minute at most (the loss report sums it up).
    eviction_logged_ns: Option<u64>,
    /// Processes already told about a connection that speaks neither HTTP/1 nor HTTP/2.
    not_http_reported: HashSet<u32>,
    stats: TrackerStats,
    /// What reassembly of the current event produced; emptied by [`hand_on`] and kept, so
    /// its vectors are not allocated again for every event.
    reassembled: Reassembled,
}

fn infer_role(direction: Direction, data: &[u8]) -> Option<Role> {
    if data.len() < 5 {
        return None;
    }
    let request = looks_like_start(MessageKind::Request, data);
    let response = looks_like_start(MessageKind::Response, data);
    match (direction, request, response) {
        (Direction::Ingress, true, _) | (Direction::Egress, _, true) => Some(Role::Server),
        (Direction::Egress, true, _) | (Direction::Ingress, _, true) => Some(Role::Client),
        _ => None,
    }
}

fn message_kind(role: Role, direction: Direction) -> MessageKind {
    match (role, direction) {
        (Role::Client, Direction::Egress) | (Role::Server, Direction::Ingress) => {
            MessageKind::Request
        }
        _ => MessageKind::Response,
    }
}

impl Connection {
    fn new(
        role: Role,
        remote: Option<SocketAddr>,
        seen_from_start: bool,
        max_body_bytes: usize,
    ) -> Self {
        let start = seen_from_start.then_some(0);
        Self {
            role,
            remote,
            seen_from_start,
            last_worker: Worker::default(),
            error: None,
            transport: Transport::Plain,
            next_ingress: start,
            next_egress: start,
            unclassified_bytes: 0,
            http: if role == Role::Unknown {
                Reassembler::joined_midstream(max_body_bytes)
            } else if seen_from_start {
                Reassembler::new(max_body_bytes)
            } else {
                Reassembler::midstream(max_body_bytes)
            },
            ignored: false,
            retained_bytes: 0,
            last_data_ns: 0,
        }
    }

    /// Restarts reassembly on the TLS library's plaintext, which has its own positions.
    fn switch_to_tls(&mut self, max_body_bytes: usize) {
        *self = Self {
            transport: Transport::Tls,
            // Still in the tracker's total until the next update.
            retained_bytes: self.retained_bytes,
            ..Self::new(self.role, self.remote, self.seen_from_start, max_body_bytes)
        };
    }
}

impl ConnectionTracker {
    pub fn new(max_body_bytes: usize, max_buffered_bytes: usize) -> Self {
        Self {
            connections: HashMap::default(),
            max_body_bytes,
            max_buffered_bytes,
            buffered_bytes: 0,
            eviction_logged_ns: None,
            not_http_reported: HashSet::new(),
            stats: TrackerStats::default(),
            reassembled: Reassembled::default(),
        }
    }

    /// Bytes all connections hold for unfinished messages.
    pub fn buffered_bytes(&self) -> usize {
        self.buffered_bytes
    }

    fn remove(&mut self, conn: &ConnId) -> Option<Connection> {
        let connection = self.connections.remove(conn)?;
        self.buffered_bytes -= connection.retained_bytes;
        Some(connection)
    }

    /// Evicts the unfinished messages of the connections idle longest until a quarter of the
    /// bound is free again (so eviction, which sorts, runs rarely).
    fn evict_idle(&mut self, now_ns: u64, output: &mut TrackerOutput) {
        let mut holding: Vec<(u64, ConnId)> = self
            .connections
            .iter()
            .filter(|(_, connection)| connection.retained_bytes > 0)
            .map(|(conn, connection)| (connection.last_data_ns, *conn))
            .collect();
        holding.sort_unstable_by_key(|(last_data_ns, _)| *last_data_ns);
        let target = self.max_buffered_bytes / 4 * 3;
        let (mut evicted, mut freed) = (0u64, 0usize);
        for (_, conn) in holding {
            if self.buffered_bytes <= target {
                break;
            }
            let Some(connection) = self.connections.get_mut(&conn) else {
                continue;
            };
            let mut http_output = Reassembled::default();
            connection.http.evict(&mut http_output);
            let retained = connection.http.retained_bytes();
            freed += connection.retained_bytes - retained;
            self.buffered_bytes -= connection.retained_bytes - retained;
            connection.retained_bytes = retained;
            evicted += 1;
            hand_on(&mut self.stats, conn, connection, &mut http_output, output);
        }
        self.stats.evicted_connections += evicted;
        self.stats.evicted_bytes += freed as u64;
        if self
            .eviction_logged_ns
            .is_some_and(|logged| now_ns.saturating_sub(logged) < 60_000_000_000)
        {
            return;
        }
        self.eviction_logged_ns = Some(now_ns);
        tracing::warn!(
            connections = evicted,
            bytes = freed,
            limit = self.max_buffered_bytes,
            "unfinished messages evicted: connections held more than the buffer limit (logged once a minute, all counted in evicted_connections)"
        );
    }

    pub fn stats(&self) -> &TrackerStats {
        &self.stats
    }

    pub fn open_connections(&self) -> usize {
        self.connections.len()
    }

    /// Tracks one event, appending what it completed to `output` (a buffer the caller reuses,
    /// so no event allocates vectors of its own).
    pub fn feed(&mut self, event: Event, output: &mut TrackerOutput) {
        match event {
            Event::Open {
                conn,
                role,
                remote,
                midstream,
                ..
            } => {
                self.stats.connections_opened += 1;
                // Kernel positions count from the first byte the kernel saw, which for a
                // midstream connection is not the start of a message.
                let connection = Connection::new(role, remote, !midstream, self.max_body_bytes);
                if let Some(replaced) = self.connections.insert(conn, connection) {
                    self.buffered_bytes -= replaced.retained_bytes;
                }
            }
            Event::Data(data) => self.on_data(data, output),
            Event::Close {
                conn,
                timestamp_ns,
                bytes_sent,
                bytes_received,
                tls_bytes_sent,
                tls_bytes_received,
            } => {
                if let Some(connection) = self.remove(&conn) {
                    let (sent, received) = match &connection.transport {
                        Transport::Tls => (tls_bytes_sent, tls_bytes_received),
                        _ => (bytes_sent, bytes_received),
                    };
                    let end = StreamEnd {
                        sent,
                        received,
                        timestamp_ns,
                    };
                    self.close(conn, connection, end, output);
                }
            }
            Event::ConnError {
                conn,
                tid,
                timestamp_ns,
                remote,
                errno,
            } => self.on_error(conn, tid, timestamp_ns, remote, errno, output),
            Event::ProcessSelected { .. } | Event::GoroutineCreated { .. } => {}
            Event::ProcessExit { tgid, timestamp_ns } => {
                self.not_http_reported.remove(&tgid);
                let exited: Vec<ConnId> = self
                    .connections
                    .keys()
                    .filter(|conn| conn.tgid == tgid)
                    .copied()
                    .collect();
                for conn in exited {
                    if let Some(connection) = self.remove(&conn) {
                        // The kernel sends no close for fds a dying process leaves open.
                        let end = StreamEnd {
                            sent: 0,
                            received: 0,
                            timestamp_ns,
                        };
                        self.close(conn, connection, end, output);
                    }
                }
            }
        }
    }

    /// A connect failed (the connection may never have been opened) or a call found the
    /// connection broken: a client's call fails now if nothing was sent, else when it closes.
    fn on_error(
        &mut self,
        conn: ConnId,
        tid: u32,
        timestamp_ns: u64,
        remote: Option<SocketAddr>,
        errno: u32,
        output: &mut TrackerOutput,
    ) {
        let failed_connect = FailedCall {
            conn,
            remote,
            worker: Worker { tid, goroutine: 0 },
            timestamp_ns,
            errno: Some(errno),
            request: None,
        };
        let Some(connection) = self.connections.get_mut(&conn) else {
            output.failed_calls.push(failed_connect);
            return;
        };
        if connection.role != Role::Client {
            return;
        }
        if connection.http.awaits_response() {
            connection.error = Some(errno);
        } else if connection.next_egress.is_none_or(|next| next == 0) {
            output.failed_calls.push(FailedCall {
                remote: connection.remote,
                ..failed_connect
            });
        }
    }

    /// Flushes what the connection still holds (a trailing gap, a close-delimited body, requests
    /// that will never be answered).
    fn close(
        &mut self,
        conn: ConnId,
        mut connection: Connection,
        end: StreamEnd,
        output: &mut TrackerOutput,
    ) {
        match &connection.transport {
            Transport::Encrypted { ingress, egress } => {
                if ingress.application_data || egress.application_data {
                    report_unreadable(&mut self.stats, conn, output);
                }
                return;
            }
            Transport::Unreadable => return,
            Transport::Plain | Transport::Tls => {}
        }
        if connection.ignored || connection.role == Role::Unknown {
            return;
        }
        let mut http_output = Reassembled::default();
        for (direction, end) in [
            (Direction::Egress, end.sent),
            (Direction::Ingress, end.received),
        ] {
            let next = match direction {
                Direction::Egress => connection.next_egress,
                Direction::Ingress => connection.next_ingress,
            };
            if let Some(next) = next
                && end > next
            {
                self.stats.gaps += 1;
                self.stats.gap_bytes += end - next;
                connection.http.gap(
                    message_kind(connection.role, direction),
                    end - next,
                    &mut http_output,
                );
            }
        }
        connection.http.close(&mut http_output);
        let unanswered = std::mem::take(&mut http_output.unanswered);
        hand_on(&mut self.stats, conn, &connection, &mut http_output, output);
        if connection.role == Role::Client {
            output
                .failed_calls
                .extend(unanswered.into_iter().map(|request| FailedCall {
                    conn,
                    remote: connection.remote,
                    worker: connection.last_worker,
                    timestamp_ns: end.timestamp_ns,
                    errno: connection.error,
                    request: Some(request),
                }));
        } else {
            self.stats.unpaired_requests += unanswered.len() as u64;
        }
    }

    fn on_data(&mut self, data: DataEvent, output: &mut TrackerOutput) {
        let conn = data.conn;
        let max_body_bytes = self.max_body_bytes;
        let stats = &mut self.stats;
        let reassembled = &mut self.reassembled;
        // Data for a connection whose open record was lost (or that predates a recording).
        let connection = self
            .connections
            .entry(conn)
            .or_insert_with(|| Connection::new(Role::Unknown, None, false, max_body_bytes));
        if !connection.admit(&data, stats, max_body_bytes, output) || connection.ignored {
            return;
        }
        let (bytes, gap) = connection.place(&data);
        if connection.role == Role::Unknown && !connection.learn_role(&data, &bytes, stats, output)
        {
            return;
        }
        let not_http_before = stats.not_http_connections;
        connection.reassemble(&data, bytes, gap, reassembled, stats, output);
        if stats.not_http_connections > not_http_before && self.not_http_reported.insert(conn.tgid)
        {
            tracing::info!(
                pid = conn.tgid,
                "a connection of this process speaks neither HTTP/1 nor HTTP/2: not captured \
                 (said once per process; all are counted in not_http_connections)"
            );
        }
        let retained = connection.http.retained_bytes();
        self.buffered_bytes = self.buffered_bytes - connection.retained_bytes + retained;
        connection.retained_bytes = retained;
        connection.last_data_ns = data.timestamp_ns;
        if self.buffered_bytes > self.max_buffered_bytes {
            self.evict_idle(data.timestamp_ns, output);
        }
    }
}

fn report_unreadable(stats: &mut TrackerStats, conn: ConnId, output: &mut TrackerOutput) {
    stats.unreadable_tls_connections += 1;
    output.unreadable_tls.push(conn);
}

impl Connection {
    /// Follows what the connection's bytes are (plain, ciphertext, TLS plaintext) and says
    /// whether this event's bytes are plaintext to reassemble.
    fn admit(
        &mut self,
        data: &DataEvent,
        stats: &mut TrackerStats,
        max_body_bytes: usize,
        output: &mut TrackerOutput,
    ) -> bool {
        let conn = data.conn;
        let starts_stream = match data.direction {
            Direction::Ingress => self.next_ingress,
            Direction::Egress => self.next_egress,
        }
        .is_none_or(|next| next == 0);
        if data.source == Source::Syscall
            && matches!(self.transport, Transport::Plain)
            && !self.ignored
            && starts_stream
            && looks_like_tls_record(&data.data)
        {
            // Ciphertext: the plaintext, if this process's TLS library is probed, comes as TLS
            // events on the same connection.
            self.transport = Transport::Encrypted {
                ingress: RecordWalker::default(),
                egress: RecordWalker::default(),
            };
        }
        match (data.source, &mut self.transport) {
            (Source::Tls, Transport::Tls) | (Source::Syscall, Transport::Plain) => true,
            (Source::Tls, previous) => {
                if !matches!(previous, Transport::Unreadable) {
                    output.disable.push((conn, Source::Syscall));
                }
                self.switch_to_tls(max_body_bytes);
                stats.tls_connections += 1;
                true
            }
            (Source::Syscall, Transport::Encrypted { ingress, egress }) => {
                match data.direction {
                    Direction::Ingress => ingress.feed(&data.data),
                    Direction::Egress => egress.feed(&data.data),
                }
                // A probed library's plaintext comes within the first exchange; this much
                // ciphertext without any is a connection the agent cannot read.
                self.unclassified_bytes += data.data.len() as u64 + data.skipped_len;
                if self.unclassified_bytes > MAX_UNCLASSIFIED_BYTES {
                    self.transport = Transport::Unreadable;
                    output.disable.push((conn, Source::Syscall));
                    report_unreadable(stats, conn, output);
                }
                false
            }
            (Source::Syscall, Transport::Tls | Transport::Unreadable) | (Source::Stderr, _) => {
                false
            }
        }
    }

    /// Places the event in its direction's stream: the bytes not seen before, and how many
    /// bytes were lost before them.
    fn place(&mut self, data: &DataEvent) -> (Bytes, u64) {
        let next = match data.direction {
            Direction::Ingress => self.next_ingress.get_or_insert(data.position),
            Direction::Egress => self.next_egress.get_or_insert(data.position),
        };
        let mut bytes = data.data.clone();
        let mut gap = 0;
        if data.position > *next {
            gap = data.position - *next;
        } else if data.position < *next {
            // Overlap with bytes already seen (concurrent calls on one fd): keep only the new tail.
            let seen = (*next - data.position).min(bytes.len() as u64) as usize;
            bytes.advance(seen);
        }
        *next = (*next).max(data.position + data.data.len() as u64 + data.skipped_len);
        (bytes, gap)
    }

    /// Learns the role of a connection whose start was not seen from its first message start;
    /// too many bytes without one and the connection is given up as not HTTP.
    fn learn_role(
        &mut self,
        data: &DataEvent,
        bytes: &[u8],
        stats: &mut TrackerStats,
        output: &mut TrackerOutput,
    ) -> bool {
        if let Some(role) = infer_role(data.direction, bytes) {
            self.role = role;
            return true;
        }
        self.unclassified_bytes += bytes.len() as u64 + data.skipped_len;
        if self.unclassified_bytes > MAX_UNCLASSIFIED_BYTES {
            self.ignored = true;
            stats.not_http_connections += 1;
            output.disable.push((data.conn, data.source));
        }
        false
    }

    /// Feeds new bytes (after a gap of `gap` lost ones) to HTTP reassembly; a connection that
    /// turns out not to be HTTP, or is upgraded to another protocol, is given up.
    fn reassemble(
        &mut self,
        data: &DataEvent,
        bytes: Bytes,
        gap: u64,
        http_output: &mut Reassembled,
        stats: &mut TrackerStats,
        output: &mut TrackerOutput,
    ) {
        let kind = message_kind(self.role, data.direction);
        if gap > 0 {
            stats.gaps += 1;
            stats.gap_bytes += gap;
            self.http.gap(kind, gap, http_output);
        }
        self.http.push(kind, bytes, data.timestamp_ns, http_output);
        if data.skipped_len > 0 {
            stats.gaps += 1;
            stats.gap_bytes += data.skipped_len;
            self.http.gap(kind, data.skipped_len, http_output);
        }
        if self.http.is_not_http(http_output) || self.http.is_upgraded() {
            self.ignored = true;
            if !self.http.is_upgraded() {
                stats.not_http_connections += 1;
            }
            output.disable.push((data.conn, data.source));
        }
        self.last_worker = data.worker();
        hand_on(stats, data.conn, self, http_output, output);
    }
}

/// Counts what reassembly noticed and hands on its exchanges and served requests, leaving
/// `http` empty (requests never answered are the caller's to take first).
fn hand_on(
    stats: &mut TrackerStats,
    conn: ConnId,
    connection: &Connection,
    http: &mut Reassembled,
    output: &mut TrackerOutput,
) {
    debug_assert!(
        http.unanswered.is_empty(),
        "unanswered requests are taken first"
    );
    let (role, remote, worker) = (connection.role, connection.remote, connection.last_worker);
    if role == Role::Server {
        output
            .serving
            .extend(http.requests_read.drain(..).map(|read| Serving {
                conn,
                serial: read.serial,
                worker,
                traceparent: read.traceparent,
            }));
    } else {
        http.requests_read.clear();
    }
    for anomaly in http.anomalies.drain(..) {
        match anomaly {
            Anomaly::Desync => stats.desyncs += 1,
            Anomaly::Unpaired(MessageKind::Request) => stats.unpaired_requests += 1,
            Anomaly::Unpaired(MessageKind::Response) => stats.unpaired_responses += 1,
            Anomaly::Malformed(kind, error) => {
                stats.malformed_messages += 1;
                tracing::debug!(?conn, ?kind, %error, "malformed HTTP message");
            }
        }
    }
    stats.exchanges += http.exchanges.len() as u64;
    stats.headers_incomplete += http
        .exchanges
        .iter()
        .filter(|exchange| exchange.headers_incomplete)
        .count() as u64;
    output
        .exchanges
        .extend(http.exchanges.drain(..).map(|exchange| TrackedExchange {
            conn,
            role,
            remote,
            worker,
            exchange,
        }));
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    const TGID: u32 = 100;

    impl ConnectionTracker {
        /// What one event completes, on its own.
        fn feed_one(&mut self, event: Event) -> TrackerOutput {
            let mut output = TrackerOutput::default();
            self.feed(event, &mut output);
            output
        }
    }

    fn conn(fd: i32, generation: u64) -> ConnId {
        ConnId {
            tgid: TGID,
            fd,
            generation,
        }
    }

    fn open(conn: ConnId, role: Role) -> Event {
        Event::Open {
            conn,
            timestamp_ns: conn.generation,
            role,
            remote: None,
            midstream: false,
        }
    }

    fn data(conn: ConnId, direction: Direction, position: u64, bytes: &[u8], at: u64) -> Event {
        Event::Data(DataEvent {
            conn,
            tid: 1,
            goroutine: 0,
            timestamp_ns: at,
            direction,
            source: Source::Syscall,
            position,
            skipped_len: 0,
            data: Bytes::copy_from_slice(bytes),
        })
    }

    fn tls(event: Event) -> Event {
        match event {
            Event::Data(data) => Event::Data(DataEvent {
                source: Source::Tls,
                ..data
            }),
            other => other,
        }
    }

    fn close(conn: ConnId, bytes_sent: u64, bytes_received: u64) -> Event {
        Event::Close {
            conn,
            timestamp_ns: 0,
            bytes_sent,
            bytes_received,
            tls_bytes_sent: 0,
            tls_bytes_received: 0,
        }
    }

    /// Feeds events, returning (target, status, response body) per exchange.
    fn run(tracker: &mut ConnectionTracker, events: Vec<Event>) -> Vec<(String, u16, Vec<u8>)> {
        events
            .into_iter()
            .flat_map(|event| tracker.feed_one(event).exchanges)
            .map(|tracked| {
                let exchange = tracked.exchange;
                let crate::pipeline::protocols::message::StartLine::Request { target, .. } =
                    exchange.request.start
                else {
                    panic!("request expected");
                };
                (
                    target,
                    exchange.response.status().unwrap(),
                    exchange.response.body.bytes,
                )
            })
            .collect()
    }

    const REQUEST: &[u8] = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
    const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";

    #[test]
    fn messages_split_across_many_events_are_reassembled() {
        let c = conn(5, 1);
        let mut events = vec![open(c, Role::Server)];
        for (index, byte) in REQUEST.iter().enumerate() {
            events.push(data(
                c,
                Direction::Ingress,
                index as u64,
                &[*byte],
                10 + index as u64,
            ));
        }
        for (index, piece) in RESPONSE.chunks(7).enumerate() {
            events.push(data(
                c,
                Direction::Egress,
                index as u64 * 7,
                piece,
                100 + index as u64,
            ));
        }
        let mut tracker = ConnectionTracker::new(1 << 20, DEFAULT_MAX_BUFFERED_BYTES);
        assert_eq!(
            run(&mut tracker, events),
            vec![("/a".to_owned(), 200, b"hello".to_vec())]
        );
    }

    #[test]
    fn unfinished_heads_beyond_the_buffer_bound_are_evicted_oldest_first() {
        const LIMIT: usize = 1 << 20;
        let mut tracker = ConnectionTracker::new(1 << 20, LIMIT);
        // 40 clients each send 40 KiB of a head that never ends: 1.6 MiB without a bound.
        let unfinished = [
            b"GET /slow HTTP/1.1\r\nX-Filler: ".as_slice(),
            &[b'a'; 40 << 10],
        ]
        .concat();
        let conns: Vec<ConnId> = (0..40).map(|fd| conn(fd, 1)).collect();
        for (at, &c) in conns.iter().enumerate() {
            run(&mut tracker, vec![open(c, Role::Server)]);
            run(
                &mut tracker,
                vec![data(c, Direction::Ingress, 0, &unfinished, at as u64)],
            );
            assert!(
                tracker.buffered_bytes() <= LIMIT,
                "{}",
                tracker.buffered_bytes()
            );
        }
        let stats = tracker.stats().clone();
        assert!(stats.evicted_connections >= 10, "{stats:?}");
        assert!(stats.evicted_bytes as usize >= stats.evicted_connections as usize * (40 << 10));

        // The newest client was not evicted: its head completes and pairs.
        let newest = conns[39];
        let end = unfinished.len() as u64;
        assert_eq!(
            run(
                &mut tracker,
                vec![
                    data(newest, Direction::Ingress, end, b"\r\n\r\n", 100),
                    data(newest, Direction::Egress, 0, RESPONSE, 101),
                ]
            ),
            vec![("/slow".to_owned(), 200, b"hello".to_vec())]
        );
        // The oldest was: its next request starts a new exchange, paired with its own response.
        let oldest = conns[0];
        assert_eq!(
            run(
                &mut tracker,
                vec![
                    data(oldest, Direction::Ingress, end, REQUEST, 102),
                    data(oldest, Direction::Egress, 0, RESPONSE, 103),
                ]
            ),
            vec![("/a".to_owned(), 200, b"hello".to_vec())]
        );
        for c in conns {
            tracker.feed_one(close(c, 0, 0));
        }
        assert_eq!(tracker.buffered_bytes(), 0, "closing releases every count");
    }

    #[test]
    fn fd_reuse_never_merges_two_connections() {
        let (first, second) = (conn(5, 1), conn(5, 2));
        let mut tracker = ConnectionTracker::new(1 << 20, DEFAULT_MAX_BUFFERED_BYTES);
        let exchanges = run(
            &mut tracker,
            vec![
                open(first, Role::Server),
                data(
                    first,
                    Direction::Ingress,
                    0,
                    b"GET /first HTTP/1.1\r\n\r\n",
                    1,
                ),
                close(first, 0, 24),
                open(second, Role::Server),
                data(
                    second,
                    Direction::Ingress,
                    0,
                    b"GET /second HTTP/1.1\r\n\r\n",
                    2,
                ),
                data(second, Direction::Egress, 0, RESPONSE, 3),
            ],
        );
        assert_eq!(
            exchanges,
            vec![("/second".to_owned(), 200, b"hello".to_vec())]
        );
        assert_eq!(tracker.stats().unpaired_requests, 1);
        assert_eq!(tracker.open_connections(), 1);
    }

    #[test]
    fn skipped_bytes_inside_a_body_keep_the_exchange_and_mark_it() {
        let c = conn(6, 1);
        let mut tracker = ConnectionTracker::new(1 << 20, DEFAULT_MAX_BUFFERED_BYTES);
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n";
        let mut sendfile_marker = data(c, Direction::Egress, head.len() as u64, b"", 3);
        if let Event::Data(marker) = &mut sendfile_marker {
            marker.skipped_len = 1000;
        }
        let mut exchanges = Vec::new();
        for event in [
            open(c, Role::Server),
            data(c, Direction::Ingress, 0, REQUEST, 1),
            data(c, Direction::Egress, 0, head, 2),
        ] {
            exchanges.extend(tracker.feed_one(event).exchanges);
        }
        // The skipped bytes finish the body: the exchange is out before anything else arrives.
        exchanges.extend(tracker.feed_one(sendfile_marker).exchanges);
        assert_eq!(exchanges.len(), 1);
        for event in [
            data(c, Direction::Ingress, REQUEST.len() as u64, REQUEST, 4),
            data(c, Direction::Egress, head.len() as u64 + 1000, RESPONSE, 5),
        ] {
            exchanges.extend(tracker.feed_one(event).exchanges);
        }
        assert_eq!(exchanges.len(), 2);
        assert!(exchanges[0].exchange.response.body.incomplete);
        assert!(exchanges[0].exchange.response.body.bytes.is_empty());
        assert_eq!(exchanges[1].exchange.response.body.bytes, b"hello");
        assert_eq!(tracker.stats().gap_bytes, 1000);
    }

    #[test]
    fn lost_bytes_in_a_head_never_pair_the_wrong_response() {
        let c = conn(7, 1);
        let mut tracker = ConnectionTracker::new(1 << 20, DEFAULT_MAX_BUFFERED_BYTES);
        let second = b"GET /second HTTP/1.1\r\n\r\n";
        let third = b"GET /third HTTP/1.1\r\n\r\n";
        let exchanges = run(
            &mut tracker,
            vec![
                open(c, Role::Server),
                data(c, Direction::Ingress, 0, REQUEST, 1),
                data(c, Direction::Egress, 0, RESPONSE, 2),
                // The record holding the whole second request was lost: the third request's
                // position jumps past it, but its response is still to come.
                data(
                    c,
                    Direction::Egress,
                    RESPONSE.len() as u64,
                    b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
                    4,
                ),
                data(
                    c,
                    Direction::Ingress,
                    (REQUEST.len() + second.len()) as u64,
                    third,
                    5,
                ),
                data(
                    c,
                    Direction::Egress,
                    RESPONSE.len() as u64 + 43,
                    b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n",
                    6,
                ),
            ],
        );
        let targets: Vec<_> = exchanges.iter().map(|(t, s, _)| (t.as_str(), *s)).collect();
        assert!(!targets.contains(&("/third", 201)), "{targets:?}");
        assert_eq!(targets[0], ("/a", 200));
        assert_eq!(tracker.stats().gaps, 1);
    }

    #[test]
    fn close_completes_a_close_delimited_response() {
        let c = conn(8, 1);
        let mut tracker = ConnectionTracker::new(1 << 20, DEFAULT_MAX_BUFFERED_BYTES);
        let body = b"HTTP/1.0 200 OK\r\n\r\nuntil-close";
        let exchanges = run(
            &mut tracker,
            vec![
                open(c, Role::Server),
                data(c, Direction::Ingress, 0, REQUEST, 1),
                data(c, Direction::Egress, 0, body, 2),
                close(c, body.len() as u64, REQUEST.len() as u64),
            ],
        );
        assert_eq!(
            exchanges,
            vec![("/a".to_owned(), 200, b"until-close".to_vec())]
        );
    }

    #[test]
    fn unknown_role_is_inferred_from_the_first_bytes() {
        let c = conn(9, 1);
        let mut tracker = ConnectionTracker::new(1 << 20, DEFAULT_MAX_BUFFERED_BYTES);
        let mut events = vec![Event::Open {
            conn: c,
            timestamp_ns: 0,
            role: Role::Unknown,
            remote: None,
            midstream: true,
        }];
        // The process writes a request and reads a response: it is the client.
        events.push(data(c, Direction::Egress, 0, REQUEST, 1));
        events.push(data(c, Direction::Ingress, 0, RESPONSE, 2));
        let mut exchanges = Vec::new();
        for event in events {
            exchanges.extend(tracker.feed_one(event).exchanges);
        }
        assert_eq!(exchanges.len(), 1);
        assert_eq!(exchanges[0].role, Role::Client);
    }

    #[test]
    fn a_connection_that_is_not_http_is_disabled() {
        let c = conn(10, 1);
        let mut tracker = ConnectionTracker::new(1 << 20, DEFAULT_MAX_BUFFERED_BYTES);
        tracker.feed_one(open(c, Role::Client));
        let output = tracker.feed_one(data(
            c,
            Direction::Egress,
            0,
            b"\x00\x00\x00\x54\x00\x03\x00\x00user\x00postgres\r\n\r\n",
            1,
        ));
        assert_eq!(output.disable, vec![(c, Source::Syscall)]);
        assert_eq!(tracker.stats().not_http_connections, 1);
        let later = tracker.feed_one(data(c, Direction::Egress, 30, REQUEST, 2));
        assert!(later.exchanges.is_empty() && later.disable.is_empty());
    }

    #[test]
    fn overlapping_bytes_are_not_parsed_twice() {
        let c = conn(11, 1);
        let mut tracker = ConnectionTracker::new(1 << 20, DEFAULT_MAX_BUFFERED_BYTES);
        let exchanges = run(
            &mut tracker,
            vec![
                open(c, Role::Server),
                data(c, Direction::Ingress, 0, &REQUEST[..10], 1),
                data(c, Direction::Ingress, 5, &REQUEST[5..], 2),
                data(c, Direction::Egress, 0, RESPONSE, 3),
            ],
        );
        assert_eq!(exchanges, vec![("/a".to_owned(), 200, b"hello".to_vec())]);
    }

    #[test]
    fn process_exit_flushes_its_connections() {
        let c = conn(12, 1);
        let mut tracker = ConnectionTracker::new(1 << 20, DEFAULT_MAX_BUFFERED_BYTES);
        let exchanges = run(
            &mut tracker,
            vec![
                open(c, Role::Server),
                data(c, Direction::Ingress, 0, REQUEST, 1),
                data(
                    c,
                    Direction::Egress,
                    0,
                    b"HTTP/1.1 200 OK\r\n\r\npartial",
                    2,
                ),
                Event::ProcessExit {
                    tgid: TGID,
                    timestamp_ns: 3,
                },
            ],
        );
        assert_eq!(exchanges, vec![("/a".to_owned(), 200, b"partial".to_vec())]);
        assert_eq!(tracker.open_connections(), 0);
    }

    const CLIENT_HELLO: &[u8] = b"\x16\x03\x01\x00\xf4\x01\x00\x00\xf0\x03\x03";

    #[test]
    fn tls_plaintext_is_parsed_and_the_ciphertext_never_is() {
        let c = conn(13, 1);
        let mut tracker = ConnectionTracker::new(1 << 20, DEFAULT_MAX_BUFFERED_BYTES);
        tracker.feed_one(open(c, Role::Server));
        let handshake = tracker.feed_one(data(c, Direction::Ingress, 0, CLIENT_HELLO, 1));
        assert!(handshake.disable.is_empty() && handshake.exchanges.is_empty());
        let plaintext = tracker.feed_one(tls(data(c, Direction::Ingress, 0, REQUEST, 2)));
        assert_eq!(plaintext.disable, vec![(c, Source::Syscall)]);
        let mut exchanges = Vec::new();
        for event in [
            // Ciphertext that raced the disable: never parsed, even if it looked like HTTP.
            data(c, Direction::Ingress, 500, REQUEST, 3),
            tls(data(c, Direction::Egress, 0, RESPONSE, 4)),
        ] {
            let output = tracker.feed_one(event);
            assert!(output.disable.is_empty());
            exchanges.extend(output.exchanges);
        }
        assert_eq!(exchanges.len(), 1);
        assert_eq!(exchanges[0].exchange.response.body.bytes, b"hello");
        let stats = tracker.stats();
        assert_eq!(stats.tls_connections, 1);
        assert_eq!(
            (stats.malformed_messages, stats.not_http_connections),
            (0, 0)
        );
    }

    #[test]
    fn plaintext_arriving_first_disables_the_socket_bytes() {
        let c = conn(14, 1);
        let mut tracker = ConnectionTracker::new(1 << 20, DEFAULT_MAX_BUFFERED_BYTES);
        tracker.feed_one(open(c, Role::Client));
        let output = tracker.feed_one(tls(data(c, Direction::Egress, 0, REQUEST, 1)));
        assert_eq!(output.disable, vec![(c, Source::Syscall)]);
        let exchanges: Vec<_> = [
            data(c, Direction::Ingress, 0, RESPONSE, 2),
            tls(data(c, Direction::Ingress, 0, RESPONSE, 3)),
        ]
        .into_iter()
        .flat_map(|event| tracker.feed_one(event).exchanges)
        .collect();
        assert_eq!(exchanges.len(), 1);
        assert_eq!(exchanges[0].role, Role::Client);
    }

    #[test]
    fn tls_application_data_without_plaintext_is_reported_and_a_bare_handshake_is_not() {
        let mut tracker = ConnectionTracker::new(1 << 20, DEFAULT_MAX_BUFFERED_BYTES);
        let handshake_only = conn(15, 1);
        tracker.feed_one(open(handshake_only, Role::Server));
        tracker.feed_one(data(handshake_only, Direction::Ingress, 0, CLIENT_HELLO, 1));
        tracker.feed_one(close(handshake_only, 0, CLIENT_HELLO.len() as u64));
        assert_eq!(tracker.stats().unreadable_tls_connections, 0);

        let unreadable = conn(16, 1);
        let application_data = b"\x17\x03\x03\x00\x02ab";
        tracker.feed_one(open(unreadable, Role::Server));
        let events = [
            data(
                unreadable,
                Direction::Ingress,
                0,
                b"\x16\x03\x01\x00\x01x",
                1,
            ),
            data(unreadable, Direction::Ingress, 6, application_data, 2),
            data(unreadable, Direction::Egress, 0, application_data, 3),
        ];
        for event in events {
            let output = tracker.feed_one(event);
            assert!(output.disable.is_empty() && output.unreadable_tls.is_empty());
        }
        let closed = tracker.feed_one(close(unreadable, 7, 13));
        assert_eq!(closed.unreadable_tls, vec![unreadable]);
        assert_eq!(tracker.stats().unreadable_tls_connections, 1);
        assert_eq!(tracker.stats().tls_connections, 0);
    }

    #[test]
    fn tls_totals_at_close_reveal_lost_plaintext() {
        let c = conn(17, 1);
        let mut tracker = ConnectionTracker::new(1 << 20, DEFAULT_MAX_BUFFERED_BYTES);
        tracker.feed_one(open(c, Role::Server));
        tracker.feed_one(tls(data(c, Direction::Ingress, 0, REQUEST, 1)));
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n";
        tracker.feed_one(tls(data(c, Direction::Egress, 0, head, 2)));
        let output = tracker.feed_one(Event::Close {
            conn: c,
            timestamp_ns: 3,
            bytes_sent: 9000,
            bytes_received: 9000,
            tls_bytes_sent: head.len() as u64 + 100,
            tls_bytes_received: REQUEST.len() as u64,
        });
        assert_eq!(output.exchanges.len(), 1);
        assert!(output.exchanges[0].exchange.response.body.incomplete);
        assert_eq!(tracker.stats().gap_bytes, 100);
    }

    #[test]
    fn endless_ciphertext_without_plaintext_is_given_up() {
        let c = conn(18, 1);
        let mut tracker = ConnectionTracker::new(1 << 20, DEFAULT_MAX_BUFFERED_BYTES);
        tracker.feed_one(open(c, Role::Client));
        tracker.feed_one(data(c, Direction::Egress, 0, CLIENT_HELLO, 1));
        let record = [&b"\x17\x03\x03\x3f\xfb"[..], &[0u8; 0x3ffb]].concat();
        let mut position = 0;
        let mut outputs = Vec::new();
        for at in 0..5 {
            outputs.push(tracker.feed_one(data(c, Direction::Ingress, position, &record, at)));
            position += record.len() as u64;
        }
        let disabled: Vec<_> = outputs.iter().flat_map(|o| o.disable.clone()).collect();
        let unreadable: Vec<_> = outputs
            .iter()
            .flat_map(|o| o.unreadable_tls.clone())
            .collect();
        assert_eq!(disabled, vec![(c, Source::Syscall)]);
        assert_eq!(unreadable, vec![c]);
        assert!(
            tracker
                .feed_one(close(c, 11, position))
                .unreadable_tls
                .is_empty()
        );
        assert_eq!(tracker.stats().unreadable_tls_connections, 1);
    }
}
