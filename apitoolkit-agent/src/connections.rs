//! Per-connection state keyed by (tgid, fd, generation): byte positions with gap detection, the
//! connection's role, and its HTTP reassembly.

use std::{collections::HashMap, net::SocketAddr};

use crate::{
    events::{ConnId, DataEvent, Direction, Event, Role},
    http::{
        Anomaly, Exchange, HttpConnection, Output,
        parser::{MessageKind, looks_like_start},
    },
};

/// Bytes of unrecognisable data after which a connection of unknown role is given up.
const MAX_UNCLASSIFIED_BYTES: u64 = 64 * 1024;

#[derive(Debug)]
pub struct TrackedExchange {
    pub conn: ConnId,
    pub role: Role,
    pub remote: Option<SocketAddr>,
    pub exchange: Exchange,
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
}

#[derive(Debug, Default)]
pub struct TrackerOutput {
    pub exchanges: Vec<TrackedExchange>,
    /// Connections that carry no HTTP: the kernel can stop sending their bytes.
    pub disable: Vec<ConnId>,
}

struct Connection {
    role: Role,
    remote: Option<SocketAddr>,
    /// Next expected stream position per direction; `None` until the first bytes of a
    /// connection whose start was not seen.
    next_ingress: Option<u64>,
    next_egress: Option<u64>,
    unclassified_bytes: u64,
    http: HttpConnection,
    ignored: bool,
}

pub struct ConnectionTracker {
    connections: HashMap<ConnId, Connection>,
    max_body_bytes: usize,
    stats: TrackerStats,
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

impl ConnectionTracker {
    pub fn new(max_body_bytes: usize) -> Self {
        Self {
            connections: HashMap::new(),
            max_body_bytes,
            stats: TrackerStats::default(),
        }
    }

    pub fn stats(&self) -> &TrackerStats {
        &self.stats
    }

    pub fn open_connections(&self) -> usize {
        self.connections.len()
    }

    pub fn feed(&mut self, event: Event) -> TrackerOutput {
        let mut output = TrackerOutput::default();
        match event {
            Event::Open {
                conn, role, remote, ..
            } => {
                self.stats.connections_opened += 1;
                let http = match role {
                    Role::Unknown => HttpConnection::joined_midstream(self.max_body_bytes),
                    _ => HttpConnection::new(self.max_body_bytes),
                };
                self.connections.insert(
                    conn,
                    Connection {
                        role,
                        remote,
                        next_ingress: Some(0),
                        next_egress: Some(0),
                        unclassified_bytes: 0,
                        http,
                        ignored: false,
                    },
                );
            }
            Event::Data(data) => self.on_data(data, &mut output),
            Event::Close {
                conn,
                bytes_sent,
                bytes_received,
                ..
            } => {
                if let Some(mut connection) = self.connections.remove(&conn) {
                    let mut http_output = Output::default();
                    self.close(
                        &mut connection,
                        bytes_sent,
                        bytes_received,
                        &mut http_output,
                    );
                    self.record(
                        conn,
                        connection.role,
                        connection.remote,
                        http_output,
                        &mut output,
                    );
                }
            }
            Event::ProcessExit { tgid, .. } => {
                let exited: Vec<ConnId> = self
                    .connections
                    .keys()
                    .filter(|conn| conn.tgid == tgid)
                    .copied()
                    .collect();
                for conn in exited {
                    if let Some(mut connection) = self.connections.remove(&conn) {
                        let mut http_output = Output::default();
                        // The kernel sends no close for fds a dying process leaves open.
                        self.close(&mut connection, 0, 0, &mut http_output);
                        self.record(
                            conn,
                            connection.role,
                            connection.remote,
                            http_output,
                            &mut output,
                        );
                    }
                }
            }
        }
        output
    }

    fn close(
        &mut self,
        connection: &mut Connection,
        sent: u64,
        received: u64,
        output: &mut Output,
    ) {
        if connection.ignored || connection.role == Role::Unknown {
            return;
        }
        for (direction, end) in [(Direction::Egress, sent), (Direction::Ingress, received)] {
            let next = match direction {
                Direction::Egress => connection.next_egress,
                Direction::Ingress => connection.next_ingress,
            };
            if let Some(next) = next
                && end > next
            {
                self.stats.gaps += 1;
                self.stats.gap_bytes += end - next;
                connection
                    .http
                    .gap(message_kind(connection.role, direction), end - next, output);
            }
        }
        connection.http.close(output);
    }

    fn on_data(&mut self, data: DataEvent, output: &mut TrackerOutput) {
        let conn = data.conn;
        let max_body_bytes = self.max_body_bytes;
        // Data for a connection whose open record was lost (or that predates a recording).
        let connection = self.connections.entry(conn).or_insert_with(|| Connection {
            role: Role::Unknown,
            remote: None,
            next_ingress: None,
            next_egress: None,
            unclassified_bytes: 0,
            http: HttpConnection::joined_midstream(max_body_bytes),
            ignored: false,
        });
        if connection.ignored {
            return;
        }
        let next = match data.direction {
            Direction::Ingress => connection.next_ingress.get_or_insert(data.position),
            Direction::Egress => connection.next_egress.get_or_insert(data.position),
        };
        let mut payload = &data.data[..];
        let mut gap = 0;
        if data.position > *next {
            gap = data.position - *next;
        } else if data.position < *next {
            // Overlap with bytes already seen (concurrent calls on one fd): keep only the new tail.
            let seen = (*next - data.position).min(payload.len() as u64) as usize;
            payload = &payload[seen..];
        }
        *next = (*next).max(data.position + data.data.len() as u64 + data.skipped_len);

        if connection.role == Role::Unknown {
            match infer_role(data.direction, payload) {
                Some(role) => connection.role = role,
                None => {
                    connection.unclassified_bytes += payload.len() as u64 + data.skipped_len;
                    if connection.unclassified_bytes > MAX_UNCLASSIFIED_BYTES {
                        connection.ignored = true;
                        self.stats.not_http_connections += 1;
                        output.disable.push(conn);
                    }
                    return;
                }
            }
        }
        let kind = message_kind(connection.role, data.direction);
        let mut http_output = Output::default();
        if gap > 0 {
            self.stats.gaps += 1;
            self.stats.gap_bytes += gap;
            connection.http.gap(kind, gap, &mut http_output);
        }
        connection
            .http
            .push(kind, payload, data.timestamp_ns, &mut http_output);
        if data.skipped_len > 0 {
            self.stats.gaps += 1;
            self.stats.gap_bytes += data.skipped_len;
            connection
                .http
                .gap(kind, data.skipped_len, &mut http_output);
        }
        if connection.http.is_not_http(&http_output) || connection.http.is_upgraded() {
            connection.ignored = true;
            if !connection.http.is_upgraded() {
                self.stats.not_http_connections += 1;
            }
            output.disable.push(conn);
        }
        let connection = &self.connections[&conn];
        let (role, remote) = (connection.role, connection.remote);
        self.record(conn, role, remote, http_output, output);
    }

    fn record(
        &mut self,
        conn: ConnId,
        role: Role,
        remote: Option<SocketAddr>,
        http: Output,
        output: &mut TrackerOutput,
    ) {
        for anomaly in http.anomalies {
            match anomaly {
                Anomaly::Desync => self.stats.desyncs += 1,
                Anomaly::Unpaired(MessageKind::Request) => self.stats.unpaired_requests += 1,
                Anomaly::Unpaired(MessageKind::Response) => self.stats.unpaired_responses += 1,
                Anomaly::Malformed(kind, error) => {
                    self.stats.malformed_messages += 1;
                    tracing::debug!(?conn, ?kind, %error, "malformed HTTP message");
                }
            }
        }
        self.stats.exchanges += http.exchanges.len() as u64;
        output
            .exchanges
            .extend(http.exchanges.into_iter().map(|exchange| TrackedExchange {
                conn,
                role,
                remote,
                exchange,
            }));
    }
}
