//! The pure part of the agent: events in, payloads out. No I/O, so recorded events replay
//! through exactly the code that runs live.

use std::collections::HashMap;

use crate::{
    connections::{ConnectionTracker, FailedCall, TrackedExchange, TrackerStats},
    errors::{CapturedError, StderrCollector},
    events::{ConnId, DataEvent, Event, Role, Source},
    http::{Exchange, parser::Message},
    link::{Answered, Linker},
    payload::{self, Links, Payload, PayloadSettings},
    probes::process::{ProcessProfile, outgoing_sdk_type},
    redact::Redactor,
};

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
}

#[derive(Debug, Default)]
pub struct PipelineOutput {
    pub payloads: Vec<Payload>,
    pub disable: Vec<(ConnId, Source)>,
    pub unreadable_tls: Vec<ConnId>,
}

/// State that ends with a connection or a process.
enum Ended {
    Connection(ConnId),
    Process(u32),
}

pub type ProfileDetector = Box<dyn FnMut(u32) -> ProcessProfile + Send>;

pub struct Pipeline {
    tracker: ConnectionTracker,
    settings: PayloadSettings,
    scope: CaptureScope,
    redactor: Redactor,
    linker: Linker,
    stderr: StderrCollector,
    link_stats: LinkStats,
    profiles: HashMap<u32, ProcessProfile>,
    detect_profile: ProfileDetector,
    /// Payloads per live process, for the agent's metrics.
    payloads_by_process: HashMap<u32, u64>,
}

impl Pipeline {
    pub fn new(
        settings: PayloadSettings,
        scope: CaptureScope,
        redactor: Redactor,
        detect_profile: ProfileDetector,
    ) -> Self {
        Self {
            tracker: ConnectionTracker::new(settings.max_body_bytes),
            settings,
            scope,
            redactor,
            linker: Linker::default(),
            stderr: StderrCollector::default(),
            link_stats: LinkStats::default(),
            profiles: HashMap::new(),
            detect_profile,
            payloads_by_process: HashMap::new(),
        }
    }

    pub fn stats(&self) -> &TrackerStats {
        self.tracker.stats()
    }

    pub fn link_stats(&self) -> &LinkStats {
        &self.link_stats
    }

    /// Payloads emitted so far for each live watched process.
    pub fn payloads_by_process(&self) -> &HashMap<u32, u64> {
        &self.payloads_by_process
    }

    fn profile(&mut self, tgid: u32) -> ProcessProfile {
        let detect = &mut self.detect_profile;
        self.profiles
            .entry(tgid)
            .or_insert_with(|| detect(tgid))
            .clone()
    }

    fn on_stderr(&mut self, data: &DataEvent) {
        if !self.scope.errors {
            return;
        }
        let errors = self
            .stderr
            .feed(data.conn.tgid, data.tid, data.timestamp_ns, &data.data);
        for error in errors {
            match self.linker.attach_error(data.tid, error) {
                None => self.link_stats.errors_attached += 1,
                Some(error) => {
                    self.link_stats.errors_unattached += 1;
                    tracing::debug!(
                        tid = data.tid,
                        error_type = error.error_type,
                        "error printed outside a request"
                    );
                }
            }
        }
    }

    /// The request thread `tid` serves, where the runtime makes that a reliable parent.
    fn parent(&mut self, tid: u32, thread_per_request: bool) -> Option<uuid::Uuid> {
        let parent_id = if thread_per_request {
            self.linker.parent(tid)
        } else {
            None
        };
        self.link_stats.outgoing_with_parent += u64::from(parent_id.is_some());
        parent_id
    }

    /// A failed call is an error of the request being served, and, when its request was
    /// sent, an outgoing payload of its own with status 0, as the Go SDK reports it.
    fn on_failed_call(&mut self, call: FailedCall, output: &mut PipelineOutput) {
        self.link_stats.failed_calls += 1;
        let profile = self.profile(call.conn.tgid);
        let error = CapturedError::failed_call(call.errno, call.remote, call.timestamp_ns);
        if self.scope.errors && profile.thread_per_request {
            let attached = self.linker.attach_error(call.tid, error.clone()).is_none();
            self.link_stats.errors_attached += u64::from(attached);
        }
        let Some(request) = call.request else {
            return;
        };
        if !self.scope.outgoing {
            return;
        }
        let exchange = TrackedExchange {
            conn: call.conn,
            role: Role::Client,
            remote: call.remote,
            tid: call.tid,
            exchange: Exchange {
                serial: 0,
                request,
                response: Message::missing_response(call.timestamp_ns),
            },
        };
        let links = Links {
            errors: vec![error],
            ..Links::outgoing(self.parent(call.tid, profile.thread_per_request))
        };
        self.emit(&exchange, &profile, links, output);
    }

    /// Builds, tags (with the process's own tags, e.g. its pod) and redacts one payload; the
    /// `sdk_type` is the process's, or its runtime's outgoing one for a client exchange.
    fn emit(
        &mut self,
        exchange: &TrackedExchange,
        profile: &ProcessProfile,
        links: Links,
        output: &mut PipelineOutput,
    ) {
        let sdk_type = match exchange.role {
            Role::Client => outgoing_sdk_type(profile.sdk_type),
            _ => profile.sdk_type,
        };
        let mut payload = payload::build(exchange, sdk_type, links, &self.settings);
        payload.tags.extend(profile.tags.iter().cloned());
        self.redactor.apply(&mut payload);
        output.payloads.push(payload);
        *self
            .payloads_by_process
            .entry(exchange.conn.tgid)
            .or_default() += 1;
    }

    fn links(&mut self, exchange: &TrackedExchange, thread_per_request: bool) -> Links {
        match exchange.role {
            Role::Client => Links::outgoing(self.parent(exchange.tid, thread_per_request)),
            _ => {
                let Answered { msg_id, errors } = self
                    .linker
                    .answered(exchange.conn, exchange.exchange.serial);
                Links::incoming(msg_id, errors)
            }
        }
    }

    pub fn feed(&mut self, event: Event) -> PipelineOutput {
        let ended = match &event {
            Event::Data(data) if data.source == Source::Stderr => {
                self.on_stderr(data);
                return PipelineOutput::default();
            }
            Event::Close { conn, .. } => Some(Ended::Connection(*conn)),
            Event::ProcessExit { tgid, .. } => Some(Ended::Process(*tgid)),
            _ => None,
        };
        let tracked = self.tracker.feed(event);
        let mut output = PipelineOutput {
            payloads: Vec::with_capacity(tracked.exchanges.len()),
            disable: tracked.disable,
            unreadable_tls: tracked.unreadable_tls,
        };
        for serving in tracked.serving {
            self.linker.serving(serving);
        }
        for exchange in tracked.exchanges {
            if exchange.role == Role::Client && !self.scope.outgoing {
                continue;
            }
            let profile = self.profile(exchange.conn.tgid);
            let links = self.links(&exchange, profile.thread_per_request);
            self.emit(&exchange, &profile, links, &mut output);
        }
        for call in tracked.failed_calls {
            self.on_failed_call(call, &mut output);
        }
        match ended {
            Some(Ended::Connection(conn)) => self.linker.forget_connection(conn),
            Some(Ended::Process(tgid)) => {
                self.linker.forget_process(tgid);
                self.stderr.forget_process(tgid);
                self.profiles.remove(&tgid);
                self.payloads_by_process.remove(&tgid);
            }
            None => {}
        }
        output
    }
}
