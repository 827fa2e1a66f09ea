//! The pure part of the agent: kernel records in, payloads out. No I/O, so recorded events
//! replay through exactly the code that runs live.
//!
//! The stages, in order: [`events`] (typed records) -> [`connections`] (byte positions, gaps,
//! roles, TLS) -> [`protocols`] (reassembly into exchanges) -> [`link`] and [`app_errors`]
//! (parent requests, printed errors) -> [`payload`] -> [`redact`].

pub mod app_errors;
pub mod ciphertext;
pub mod connections;
pub mod events;
pub mod link;
pub mod payload;
pub mod profile;
pub mod protocols;
pub mod redact;
pub mod routes;
pub mod trace;

use std::collections::HashMap;

use app_errors::{CapturedError, Piece, StderrCollector};
use connections::{ConnectionTracker, FailedCall, TrackedExchange, TrackerOutput, TrackerStats};
use events::{ConnId, DataEvent, Event, Role, Source, Worker};
use link::{Answered, Linker, Parent};
use payload::{Links, Payload, PayloadSettings, RouteLookup};
use profile::{ProcessProfile, Profiles};
use protocols::{
    Exchange,
    message::{Message, Version},
};
use redact::Redactor;

/// What besides incoming requests becomes part of the payloads.
#[derive(Clone, Copy, Debug)]
pub struct CaptureScope {
    /// Requests the watched processes make, as their own payloads.
    pub outgoing: bool,
    /// Errors the watched processes print, in their requests' `errors`.
    pub errors: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub outgoing_with_parent: u64,
    /// Outgoing calls refused, broken or left unanswered.
    pub failed_calls: u64,
    pub errors_attached: u64,
    /// Errors printed by a thread that was serving no single request.
    pub errors_unattached: u64,
    /// 5xx payloads without errors held for a traceback printed after the response.
    pub held_5xx: u64,
    /// Held 5xx payloads that got their traceback.
    pub held_errors_attached: u64,
    /// Held 5xx payloads released when their wait ended, without an error.
    pub held_released_without_error: u64,
}

/// How long a 5xx payload without errors waits for the traceback of its error: asyncio servers
/// answer first and print it after (uvicorn ~5 ms later, when no request is in flight).
pub const ERROR_HOLD_NS: u64 = 30_000_000;

/// A payload waiting for the traceback that may follow it.
struct Held {
    tgid: u32,
    /// The thread that answered: where a thread serves one request at a time, only its own
    /// traceback is this payload's.
    tid: u32,
    payload: Payload,
    origin: Origin,
    release_at_ns: u64,
}

/// How request paths resolved to route templates.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteStats {
    /// Incoming requests of a process with route templates that matched none of them.
    pub unmatched: u64,
}

/// Where a payload came from: enough to write its exchange back as events (a redacted
/// recording).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Origin {
    pub conn: ConnId,
    pub role: Role,
    pub worker: Worker,
    /// First and last byte of the request.
    pub request_ns: (u64, u64),
    /// First and last byte of the response; none for a call that failed unanswered.
    pub response_ns: Option<(u64, u64)>,
}

impl Origin {
    fn of(tracked: &TrackedExchange) -> Self {
        let Exchange {
            request, response, ..
        } = &tracked.exchange;
        Self {
            conn: tracked.conn,
            role: tracked.role,
            worker: tracked.worker,
            request_ns: (request.first_byte_ns, request.last_byte_ns),
            response_ns: Some((response.first_byte_ns, response.last_byte_ns)),
        }
    }
}

#[derive(Debug, Default)]
pub struct PipelineOutput {
    pub payloads: Vec<Payload>,
    /// `origins[i]` is where `payloads[i]` came from.
    pub origins: Vec<Origin>,
    pub disable: Vec<(ConnId, Source)>,
    pub unreadable_tls: Vec<ConnId>,
}

/// State that ends with a connection or a process.
enum Ended {
    Connection(ConnId),
    Process(u32),
}

/// An event tracked and reassembled, its payloads not built yet: they need the profiles of
/// the processes in `unprofiled`. [`Pipeline::emit`] empties it, keeping its vectors' room for
/// the next event.
#[derive(Default)]
pub struct Tracked {
    output: TrackerOutput,
    ended: Option<Ended>,
    /// Processes that have exchanges here and no profile yet (live capture only).
    pub unprofiled: Vec<u32>,
}

pub struct Pipeline {
    tracker: ConnectionTracker,
    settings: PayloadSettings,
    scope: CaptureScope,
    redactor: Redactor,
    linker: Linker,
    stderr: StderrCollector,
    link_stats: LinkStats,
    route_stats: RouteStats,
    profiles: Profiles,
    /// Payloads per live process, for the agent's metrics (a count per payload: foldhash).
    payloads_by_process: HashMap<u32, u64, foldhash::fast::RandomState>,
    /// 5xx payloads waiting for a traceback, in release order.
    held: Vec<Held>,
    /// Held payloads released while tracking an event, emitted with its output.
    released: Vec<Held>,
}

impl Pipeline {
    pub fn new(
        settings: PayloadSettings,
        scope: CaptureScope,
        redactor: Redactor,
        profiles: Profiles,
    ) -> Self {
        Self {
            tracker: ConnectionTracker::new(
                settings.max_body_bytes,
                connections::DEFAULT_MAX_BUFFERED_BYTES,
            ),
            settings,
            scope,
            redactor,
            linker: Linker::default(),
            stderr: StderrCollector::default(),
            link_stats: LinkStats::default(),
            route_stats: RouteStats::default(),
            profiles,
            payloads_by_process: HashMap::default(),
            held: Vec::new(),
            released: Vec::new(),
        }
    }

    /// Bounds the bytes all connections may hold for unfinished messages.
    pub fn with_max_buffered_bytes(mut self, bytes: usize) -> Self {
        self.tracker = ConnectionTracker::new(self.settings.max_body_bytes, bytes);
        self
    }

    pub fn stats(&self) -> &TrackerStats {
        self.tracker.stats()
    }

    /// Bytes held for messages still arriving.
    pub fn buffered_bytes(&self) -> usize {
        self.tracker.buffered_bytes()
    }

    pub fn link_stats(&self) -> &LinkStats {
        &self.link_stats
    }

    pub fn route_stats(&self) -> &RouteStats {
        &self.route_stats
    }

    /// Payloads emitted so far for each live watched process.
    pub fn payloads_by_process(&self) -> &HashMap<u32, u64, foldhash::fast::RandomState> {
        &self.payloads_by_process
    }

    /// Hands in the profile of a process [`Tracked::unprofiled`] named.
    pub fn add_profile(&mut self, tgid: u32, profile: ProcessProfile) {
        self.profiles.insert(tgid, profile);
    }

    fn on_stderr(&mut self, data: &DataEvent) {
        if !self.scope.errors {
            return;
        }
        let piece = Piece {
            position: data.position,
            bytes: &data.data,
            skipped_len: data.skipped_len,
        };
        let collected = self
            .stderr
            .feed(data.conn.tgid, data.tid, data.timestamp_ns, piece);
        // A traceback cut before its error line names nothing to attach.
        self.link_stats.errors_unattached += collected.cut;
        for error in collected.errors {
            if self.attach_printed_error(data.conn.tgid, data.tid, error) {
                self.link_stats.errors_attached += 1;
            } else {
                self.link_stats.errors_unattached += 1;
            }
        }
    }

    /// Attaches an error thread `tid` printed to the request it belongs to; false when that
    /// is not known for sure. On an event loop, a traceback that follows a held 5xx is that
    /// 5xx's (the server answered, then printed), and with two 5xx held it is neither's. Where
    /// a thread serves one request at a time, the thread's own request comes first, then the
    /// 5xx it answered last, never another thread's.
    fn attach_printed_error(&mut self, tgid: u32, tid: u32, error: CapturedError) -> bool {
        let waiting = self.held.iter().filter(|held| held.tgid == tgid).count();
        let event_loop = !self.profiles.get(tgid).thread_per_request;
        if event_loop && waiting > 0 {
            return waiting == 1 && self.attach_to_held(|held| held.tgid == tgid, error);
        }
        match self.linker.attach_error(tid, error) {
            None => true,
            Some(error) => {
                tracing::debug!(
                    tid,
                    error_type = error.error_type,
                    "error printed outside a request"
                );
                let own = |held: &Held| held.tgid == tgid && held.tid == tid;
                self.held.iter().filter(|held| own(held)).count() == 1
                    && self.attach_to_held(own, error)
            }
        }
    }

    /// Adds the error to the held payload `which` selects, and releases it.
    fn attach_to_held(&mut self, which: impl Fn(&Held) -> bool, error: CapturedError) -> bool {
        let Some(index) = self.held.iter().position(which) else {
            return false;
        };
        let mut held = self.held.remove(index);
        held.payload
            .errors
            .push(payload::at_error(error, &self.settings));
        self.link_stats.held_errors_attached += 1;
        self.released.push(held);
        true
    }

    /// Releases the held payloads `due` selects (as they are: without an error).
    fn release(&mut self, due: impl Fn(&Held) -> bool) {
        if self.held.is_empty() {
            return;
        }
        let (released, kept): (Vec<Held>, Vec<Held>) =
            std::mem::take(&mut self.held).into_iter().partition(due);
        self.held = kept;
        self.link_stats.held_released_without_error += released.len() as u64;
        self.released.extend(released);
    }

    fn emit_released(&mut self, output: &mut PipelineOutput) {
        for held in self.released.drain(..) {
            output.payloads.push(held.payload);
            output.origins.push(held.origin);
        }
    }

    /// Releases held payloads whose wait ended before `now_ns` (CLOCK_MONOTONIC, as kernel
    /// timestamps): the capture loop calls it with a time taken before its last drain of the
    /// ring buffer, so every event up to then was seen.
    pub fn tick(&mut self, now_ns: u64) -> PipelineOutput {
        self.release(|held| held.release_at_ns < now_ns);
        let mut output = PipelineOutput::default();
        self.emit_released(&mut output);
        output
    }

    /// When the next held payload is due, if any.
    pub fn next_release_ns(&self) -> Option<u64> {
        self.held.iter().map(|held| held.release_at_ns).min()
    }

    /// Releases every held payload (shutdown, the end of a replay).
    pub fn flush(&mut self) -> PipelineOutput {
        self.release(|_| true);
        let mut output = PipelineOutput::default();
        self.emit_released(&mut output);
        output
    }

    /// The request `worker` works for: by goroutine (Go), or by thread where the runtime
    /// serves one request per thread.
    fn parent(&mut self, tgid: u32, worker: Worker, thread_per_request: bool) -> Option<Parent> {
        let parent = self.linker.parent(tgid, worker, thread_per_request);
        self.link_stats.outgoing_with_parent += u64::from(parent.is_some());
        parent
    }

    /// A failed call is an error of the request being served, and, when its request was
    /// sent, an outgoing payload of its own with status 0, as the Go SDK reports it.
    fn on_failed_call(&mut self, call: FailedCall, output: &mut PipelineOutput) {
        self.link_stats.failed_calls += 1;
        let thread_per_request = self.profiles.get(call.conn.tgid).thread_per_request;
        let error = CapturedError::failed_call(call.errno, call.remote, call.timestamp_ns);
        if self.scope.errors && thread_per_request {
            let attached = self
                .linker
                .attach_error(call.worker.tid, error.clone())
                .is_none();
            self.link_stats.errors_attached += u64::from(attached);
        }
        let Some(request) = call.request else {
            return;
        };
        if !self.scope.outgoing {
            return;
        }
        let request_ns = (request.first_byte_ns, request.last_byte_ns);
        let exchange = TrackedExchange {
            conn: call.conn,
            role: Role::Client,
            remote: call.remote,
            worker: call.worker,
            exchange: Exchange {
                serial: 0,
                request,
                response: Message::missing_response(call.timestamp_ns),
                reset: None,
                headers_incomplete: false,
            },
        };
        let links = Links {
            errors: vec![error],
            ..Links::outgoing(self.parent(call.conn.tgid, call.worker, thread_per_request))
        };
        let origin = Origin {
            response_ns: None,
            request_ns,
            ..Origin::of(&exchange)
        };
        self.emit_payload(exchange, origin, links, output);
    }

    /// Builds and redacts one payload with its process's profile; the exchange's strings and
    /// bytes move into it.
    fn emit_payload(
        &mut self,
        exchange: TrackedExchange,
        origin: Origin,
        links: Links,
        output: &mut PipelineOutput,
    ) {
        let (role, conn, worker) = (exchange.role, exchange.conn, exchange.worker);
        let parent_span = links.parent.map(|parent| parent.span);
        let profile = self.profiles.get(conn.tgid);
        let mut payload = payload::build(exchange, profile, links, &self.settings);
        self.route_stats.unmatched += u64::from(payload.route == RouteLookup::Unmatched);
        self.redactor.apply(&mut payload);
        payload.span = payload.span_context(role, parent_span);
        *self.payloads_by_process.entry(conn.tgid).or_default() += 1;
        let answered_at = origin.response_ns.map(|(_, last)| last);
        if let Some(answered_at) = answered_at
            && self.scope.errors
            && role != Role::Client
            && payload.status_code >= 500
            && payload.errors.is_empty()
        {
            self.link_stats.held_5xx += 1;
            self.held.push(Held {
                tgid: conn.tgid,
                tid: worker.tid,
                payload,
                origin,
                release_at_ns: answered_at + ERROR_HOLD_NS,
            });
            return;
        }
        output.payloads.push(payload);
        output.origins.push(origin);
    }

    fn links(&mut self, exchange: &TrackedExchange, thread_per_request: bool) -> Links {
        match exchange.role {
            // A Go HTTP/2 client's streams share one connection whose frames are read by a
            // goroutine of its own, started for whichever call dialed: its ancestry says
            // nothing about the call a stream belongs to.
            Role::Client
                if exchange.worker.goroutine != 0
                    && exchange.exchange.request.version == Version::HTTP_2 =>
            {
                Links::outgoing(None)
            }
            Role::Client => Links::outgoing(self.parent(
                exchange.conn.tgid,
                exchange.worker,
                thread_per_request,
            )),
            _ => {
                let Answered { msg_id, errors } = self
                    .linker
                    .answered(exchange.conn, exchange.exchange.serial);
                Links::incoming(msg_id, errors)
            }
        }
    }

    /// Stage one of an event: connection tracking and reassembly, into `tracked` (empty, as
    /// [`Pipeline::emit`] leaves it). Payloads come from [`Pipeline::emit`] once the processes
    /// in [`Tracked::unprofiled`] have profiles.
    pub fn track(&mut self, event: Event, tracked: &mut Tracked) {
        // A held payload whose wait ended before this event missed its traceback.
        let now_ns = event.timestamp_ns();
        self.release(|held| held.release_at_ns < now_ns);
        tracked.ended = match &event {
            Event::Data(data) if data.source == Source::Stderr => {
                self.on_stderr(data);
                return;
            }
            Event::GoroutineCreated {
                tgid,
                goroutine,
                parent,
                ..
            } => {
                self.linker.goroutine_started(*tgid, *goroutine, *parent);
                return;
            }
            Event::Close { conn, .. } => Some(Ended::Connection(*conn)),
            Event::ProcessExit { tgid, .. } => Some(Ended::Process(*tgid)),
            _ => None,
        };
        let output = &mut tracked.output;
        self.tracker.feed(event, output);
        let unprofiled = &mut tracked.unprofiled;
        unprofiled.extend(
            output
                .exchanges
                .iter()
                .filter(|exchange| exchange.role != Role::Client || self.scope.outgoing)
                .map(|exchange| exchange.conn.tgid)
                .chain(output.failed_calls.iter().map(|call| call.conn.tgid))
                .filter(|tgid| !self.profiles.knows(*tgid)),
        );
        unprofiled.sort_unstable();
        unprofiled.dedup();
    }

    /// Stage two: links, payloads and redaction for what [`Pipeline::track`] produced,
    /// appended to `output`; `tracked` is left empty.
    pub fn emit(&mut self, tracked: &mut Tracked, output: &mut PipelineOutput) {
        let Tracked {
            output: tracked_output,
            ended,
            unprofiled,
        } = tracked;
        unprofiled.clear();
        output.disable.append(&mut tracked_output.disable);
        output
            .unreadable_tls
            .append(&mut tracked_output.unreadable_tls);
        self.emit_released(output);
        for mut serving in tracked_output.serving.drain(..) {
            // Its payload will not show a redacted traceparent, so neither may its children.
            if self.redactor.redacts_header(trace::TRACEPARENT) {
                serving.traceparent = None;
            }
            self.linker.serving(serving);
        }
        for exchange in tracked_output.exchanges.drain(..) {
            if exchange.role == Role::Client && !self.scope.outgoing {
                continue;
            }
            let thread_per_request = self.profiles.get(exchange.conn.tgid).thread_per_request;
            let mut links = self.links(&exchange, thread_per_request);
            links
                .errors
                .extend(CapturedError::of_protocol(&exchange.exchange));
            let origin = Origin::of(&exchange);
            self.emit_payload(exchange, origin, links, output);
        }
        for call in tracked_output.failed_calls.drain(..) {
            self.on_failed_call(call, output);
        }
        match ended.take() {
            Some(Ended::Connection(conn)) => self.linker.forget_connection(conn),
            Some(Ended::Process(tgid)) => {
                self.release(|held| held.tgid == tgid);
                self.emit_released(output);
                self.linker.forget_process(tgid);
                self.stderr.forget_process(tgid);
                self.profiles.forget(tgid);
                self.payloads_by_process.remove(&tgid);
            }
            None => {}
        }
    }

    /// Both stages, for a pipeline that needs no profile handed in (a replay).
    pub fn feed(&mut self, event: Event) -> PipelineOutput {
        let mut tracked = Tracked::default();
        let mut output = PipelineOutput::default();
        self.track(event, &mut tracked);
        self.emit(&mut tracked, &mut output);
        output
    }
}
