//! Ties what a thread does while it serves an incoming request to that request: outgoing
//! requests it makes get the request's `msg_id` as their `parent_id` (and its span as their
//! parent span), and errors it prints join
//! the request's `errors`. A link is made only when the thread serves exactly one request, so
//! a thread juggling several (pipelining, event loops) gets none rather than a wrong one.

use std::collections::HashMap;

use uuid::Uuid;

use super::{
    app_errors::CapturedError,
    connections::Serving,
    events::ConnId,
    trace::{ParentSpan, TraceParent},
};

/// An incoming request read and not yet answered.
struct Unanswered {
    msg_id: Uuid,
    span: ParentSpan,
    tid: u32,
    errors: Vec<CapturedError>,
}

/// The incoming request a thread is serving, as the parent of what it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parent {
    pub msg_id: Uuid,
    pub span: ParentSpan,
}

#[derive(Default)]
pub struct Linker {
    unanswered: HashMap<(ConnId, u64), Unanswered>,
}

/// What an answered incoming request brings to its payload.
pub struct Answered {
    pub msg_id: Uuid,
    pub errors: Vec<CapturedError>,
}

impl Linker {
    /// `serving.traceparent` must be one the payload may show (not a redacted header).
    pub fn serving(&mut self, serving: Serving) {
        let msg_id = Uuid::new_v4();
        let traceparent = serving.traceparent.as_deref().and_then(TraceParent::parse);
        self.unanswered.insert(
            (serving.conn, serving.serial),
            Unanswered {
                msg_id,
                span: ParentSpan::incoming(msg_id, traceparent),
                tid: serving.tid,
                errors: Vec::new(),
            },
        );
    }

    /// The identity and errors of the request an exchange answered (a fresh id if its reading
    /// was never seen).
    pub fn answered(&mut self, conn: ConnId, serial: u64) -> Answered {
        match self.unanswered.remove(&(conn, serial)) {
            Some(request) => Answered {
                msg_id: request.msg_id,
                errors: request.errors,
            },
            None => Answered {
                msg_id: Uuid::new_v4(),
                errors: Vec::new(),
            },
        }
    }

    fn only_request_of(&mut self, tid: u32) -> Option<&mut Unanswered> {
        let mut serving = self
            .unanswered
            .values_mut()
            .filter(|request| request.tid == tid);
        let only = serving.next()?;
        serving.next().is_none().then_some(only)
    }

    /// The request thread `tid` is serving.
    pub fn parent(&mut self, tid: u32) -> Option<Parent> {
        self.only_request_of(tid).map(|request| Parent {
            msg_id: request.msg_id,
            span: request.span,
        })
    }

    /// Adds an error to the request thread `tid` is serving; gives it back when there is none.
    pub fn attach_error(&mut self, tid: u32, error: CapturedError) -> Option<CapturedError> {
        match self.only_request_of(tid) {
            Some(request) => {
                request.errors.push(error);
                None
            }
            None => Some(error),
        }
    }

    /// The connection closed: its unanswered requests never will be.
    pub fn forget_connection(&mut self, conn: ConnId) {
        self.unanswered
            .retain(|(request_conn, _), _| *request_conn != conn);
    }

    pub fn forget_process(&mut self, tgid: u32) {
        self.unanswered
            .retain(|(request_conn, _), _| request_conn.tgid != tgid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(fd: i32) -> ConnId {
        ConnId {
            tgid: 1,
            fd,
            generation: 1,
        }
    }

    fn error(message: &str) -> CapturedError {
        CapturedError {
            timestamp_ns: 1,
            error_type: "ValueError".into(),
            message: message.into(),
            root_error_type: "ValueError".into(),
            root_error_message: message.into(),
            stack_trace: String::new(),
        }
    }

    #[test]
    fn threads_link_to_their_own_request() {
        let mut linker = Linker::default();
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        for (fd, tid) in [(5, 50), (6, 60)] {
            linker.serving(Serving {
                conn: conn(fd),
                serial: 0,
                tid,
                traceparent: (tid == 60).then(|| traceparent.to_owned()),
            });
        }
        let parent = linker.parent(60).unwrap();
        assert_eq!(
            Some(parent.span.trace_id),
            TraceParent::parse(traceparent).map(|header| header.trace_id)
        );
        let parent_of_60 = parent.msg_id;
        assert_eq!(linker.attach_error(50, error("on 50")), None);
        let first = linker.answered(conn(5), 0);
        let second = linker.answered(conn(6), 0);
        assert_eq!(second.msg_id, parent_of_60);
        assert_ne!(first.msg_id, parent_of_60);
        assert_eq!(first.errors, vec![error("on 50")]);
        assert!(second.errors.is_empty());
        // Answered: the thread serves nothing now.
        assert_eq!(linker.parent(60), None);
        assert_eq!(linker.attach_error(60, error("late")), Some(error("late")));
    }

    #[test]
    fn a_thread_serving_two_requests_links_to_neither() {
        let mut linker = Linker::default();
        for serial in 0..2 {
            linker.serving(Serving {
                conn: conn(5),
                serial,
                tid: 50,
                traceparent: None,
            });
        }
        assert_eq!(linker.parent(50), None);
        linker.forget_connection(conn(5));
        assert!(linker.unanswered.is_empty());
    }
}
