//! The pure part of the agent: events in, payloads out. No I/O, so recorded events replay
//! through exactly the code that runs live.

use std::collections::HashMap;

use crate::{
    connections::{ConnectionTracker, TrackerStats},
    events::{ConnId, Event, Role, Source},
    payload::{self, Payload, PayloadSettings, SdkType},
    probes::process::outgoing_sdk_type,
    redact::Redactor,
};

#[derive(Debug, Default)]
pub struct PipelineOutput {
    pub payloads: Vec<Payload>,
    pub disable: Vec<(ConnId, Source)>,
    pub unreadable_tls: Vec<ConnId>,
}

pub struct Pipeline {
    tracker: ConnectionTracker,
    settings: PayloadSettings,
    redactor: Redactor,
    sdk_types: HashMap<u32, SdkType>,
    detect_sdk_type: Box<dyn FnMut(u32) -> SdkType + Send>,
}

impl Pipeline {
    pub fn new(
        settings: PayloadSettings,
        redactor: Redactor,
        detect_sdk_type: Box<dyn FnMut(u32) -> SdkType + Send>,
    ) -> Self {
        Self {
            tracker: ConnectionTracker::new(settings.max_body_bytes),
            settings,
            redactor,
            sdk_types: HashMap::new(),
            detect_sdk_type,
        }
    }

    pub fn stats(&self) -> &TrackerStats {
        self.tracker.stats()
    }

    pub fn feed(&mut self, event: Event) -> PipelineOutput {
        let exited = match event {
            Event::ProcessExit { tgid, .. } => Some(tgid),
            _ => None,
        };
        let tracked = self.tracker.feed(event);
        let mut output = PipelineOutput {
            payloads: Vec::with_capacity(tracked.exchanges.len()),
            disable: tracked.disable,
            unreadable_tls: tracked.unreadable_tls,
        };
        for exchange in tracked.exchanges {
            let tgid = exchange.conn.tgid;
            let detect = &mut self.detect_sdk_type;
            let incoming = *self.sdk_types.entry(tgid).or_insert_with(|| detect(tgid));
            let sdk_type = match exchange.role {
                Role::Client => outgoing_sdk_type(incoming),
                _ => incoming,
            };
            let mut payload = payload::build(&exchange, sdk_type, &self.settings);
            self.redactor.apply(&mut payload);
            output.payloads.push(payload);
        }
        if let Some(tgid) = exited {
            self.sdk_types.remove(&tgid);
        }
        output
    }
}
