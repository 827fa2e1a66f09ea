//! Ties what a thread does while it serves an incoming request to that request: outgoing
//! requests it makes get the request's `msg_id` as their `parent_id` (and its span as their
//! parent span), and errors it prints join
//! the request's `errors`. A link is made only when the thread serves exactly one request, so
//! a thread juggling several (pipelining, event loops) gets none rather than a wrong one.
//!
//! Go runs goroutines on any thread, so there the goroutine links instead: an outgoing call
//! made by the goroutine serving a request, or by one it started (directly or through its
//! descendants), belongs to that request. Go reuses the `g` of a goroutine that ended, so each
//! start of a `g` is a separate incarnation, and a chain through a `g` started again since is
//! broken rather than followed.

use std::collections::HashMap;

use uuid::Uuid;

use super::{
    app_errors::CapturedError,
    connections::Serving,
    events::{ConnId, Worker},
    trace::{ParentSpan, TraceParent},
};

/// Ancestors followed from a goroutine looking for the request it works for.
const MAX_GOROUTINE_DEPTH: usize = 64;
/// Goroutines remembered across all processes; Go keeps the `g`s of ended goroutines for
/// reuse, so this bounds the peak goroutine count followed, not the total ever started.
const MAX_GOROUTINES: usize = 1 << 20;

/// A goroutine of a process by its `g`, and which start of that `g` (0: started before
/// capture began).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Goroutine {
    tgid: u32,
    g: u64,
    incarnation: u64,
}

/// An incoming request read and not yet answered.
struct Unanswered {
    msg_id: Uuid,
    /// When its reading completed, on the linker's clock.
    read_at: u64,
    span: ParentSpan,
    tid: u32,
    goroutine: Option<Goroutine>,
    errors: Vec<CapturedError>,
}

/// The incoming request a thread or goroutine works for, as the parent of what it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parent {
    pub msg_id: Uuid,
    pub span: ParentSpan,
}

/// How a `g` was last started: its incarnation (the linker's clock then) and who started it.
struct Started {
    incarnation: u64,
    parent: Option<Goroutine>,
}

impl Unanswered {
    fn parent(&self) -> Parent {
        Parent {
            msg_id: self.msg_id,
            span: self.span,
        }
    }
}

#[derive(Default)]
pub struct Linker {
    // Keyed by kernel ids: foldhash (randomly seeded) instead of std's SipHash, which cost
    // more than it should for an insert and a removal per exchange.
    unanswered: HashMap<(ConnId, u64), Unanswered, foldhash::fast::RandomState>,
    started: HashMap<(u32, u64), Started, foldhash::fast::RandomState>,
    /// Counts requests read and goroutines started, in event order.
    clock: u64,
}

/// What an answered incoming request brings to its payload.
pub struct Answered {
    pub msg_id: Uuid,
    pub errors: Vec<CapturedError>,
}

impl Linker {
    /// `serving.traceparent` must be one the payload may show (not a redacted header).
    pub fn serving(&mut self, serving: Serving) {
        let goroutine = self.goroutine(serving.conn.tgid, serving.worker);
        let msg_id = Uuid::new_v4();
        self.clock += 1;
        let traceparent = serving.traceparent.as_deref().and_then(TraceParent::parse);
        self.unanswered.insert(
            (serving.conn, serving.serial),
            Unanswered {
                msg_id,
                read_at: self.clock,
                span: ParentSpan::incoming(msg_id, traceparent),
                tid: serving.worker.tid,
                goroutine,
                errors: Vec::new(),
            },
        );
    }

    /// The goroutine `worker` names in process `tgid`, as it is now; `None` for threads.
    fn goroutine(&self, tgid: u32, worker: Worker) -> Option<Goroutine> {
        (worker.goroutine != 0).then(|| Goroutine {
            tgid,
            g: worker.goroutine,
            incarnation: self
                .started
                .get(&(tgid, worker.goroutine))
                .map_or(0, |started| started.incarnation),
        })
    }

    /// Goroutine `g` of process `tgid` was started by goroutine `parent`.
    pub fn goroutine_started(&mut self, tgid: u32, g: u64, parent: u64) {
        if self.started.len() >= MAX_GOROUTINES {
            self.started.clear(); // chains through forgotten goroutines break, none go wrong
        }
        let parent = self.goroutine(
            tgid,
            Worker {
                tid: 0,
                goroutine: parent,
            },
        );
        self.clock += 1;
        let started = Started {
            incarnation: self.clock,
            parent,
        };
        self.started.insert((tgid, g), started);
    }

    /// The request the goroutine `worker` names works for: the one request served by it, or by
    /// its nearest ancestor that serves any. An ancestor's request counts only if it was read
    /// before the descendant on the way down was started: a keep-alive connection's goroutine
    /// serves one request after another, and a goroutine started for an earlier one does not
    /// work for the one served now.
    fn goroutine_parent(&self, tgid: u32, worker: Worker) -> Option<Parent> {
        let mut goroutine = self.goroutine(tgid, worker)?;
        let mut child_started = u64::MAX;
        for _ in 0..MAX_GOROUTINE_DEPTH {
            let serving: Vec<&Unanswered> = self
                .unanswered
                .values()
                .filter(|request| request.goroutine == Some(goroutine))
                .collect();
            if !serving.is_empty() {
                return match serving[..] {
                    [only] if only.read_at < child_started => Some(only.parent()),
                    _ => None,
                };
            }
            let started = self.started.get(&(tgid, goroutine.g))?;
            if started.incarnation != goroutine.incarnation {
                return None;
            }
            let parent = started.parent?;
            let parent_now = self.goroutine(
                tgid,
                Worker {
                    tid: 0,
                    goroutine: parent.g,
                },
            )?;
            if parent_now != parent {
                return None; // the parent's `g` was started again: its request is over
            }
            child_started = started.incarnation;
            goroutine = parent;
        }
        None
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

    /// The request `worker` works for: by goroutine where there is one, else by thread when
    /// `by_thread` (the runtime serves one request per thread).
    pub fn parent(&mut self, tgid: u32, worker: Worker, by_thread: bool) -> Option<Parent> {
        if worker.goroutine != 0 {
            return self.goroutine_parent(tgid, worker);
        }
        if !by_thread {
            return None;
        }
        self.only_request_of(worker.tid)
            .map(|request| request.parent())
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
        self.started.retain(|(process, _), _| *process != tgid);
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

    fn thread(tid: u32) -> Worker {
        Worker { tid, goroutine: 0 }
    }

    fn goroutine(g: u64) -> Worker {
        Worker {
            tid: 7,
            goroutine: g,
        }
    }

    fn serve_on_goroutine(linker: &mut Linker, fd: i32, g: u64) {
        linker.serving(Serving {
            conn: conn(fd),
            serial: 0,
            worker: goroutine(g),
            traceparent: None,
        });
    }

    #[test]
    fn goroutines_link_to_the_request_their_ancestor_serves() {
        let mut linker = Linker::default();
        // Two connection goroutines (0x100, 0x200) started before capture, each serving a
        // request; 0x100's handler starts 0x110, which starts 0x111.
        serve_on_goroutine(&mut linker, 5, 0x100);
        serve_on_goroutine(&mut linker, 6, 0x200);
        linker.goroutine_started(1, 0x110, 0x100);
        linker.goroutine_started(1, 0x111, 0x110);
        let first = linker.parent(1, goroutine(0x100), false).unwrap();
        assert_eq!(linker.parent(1, goroutine(0x111), false), Some(first));
        let second = linker.parent(1, goroutine(0x200), true).unwrap();
        assert_ne!(first, second);
        // Another process's goroutine with the same `g` is not related.
        assert_eq!(linker.parent(2, goroutine(0x111), false), None);
        // An unknown goroutine (no ancestry) serves nothing.
        assert_eq!(linker.parent(1, goroutine(0x999), false), None);
        assert_eq!(linker.answered(conn(5), 0).msg_id, first.msg_id);
        assert_eq!(linker.parent(1, goroutine(0x111), false), None, "answered");
    }

    #[test]
    fn a_goroutine_started_for_an_earlier_request_on_a_connection_links_to_none_later() {
        let mut linker = Linker::default();
        // The connection goroutine 0x100 serves R1, whose handler starts 0x110 (fire and
        // forget); R1 is answered, and 0x100 reads R2 on the same connection.
        linker.serving(Serving {
            conn: conn(5),
            serial: 0,
            worker: goroutine(0x100),
            traceparent: None,
        });
        linker.goroutine_started(1, 0x110, 0x100);
        let first = linker.parent(1, goroutine(0x110), false).unwrap();
        assert_eq!(linker.answered(conn(5), 0).msg_id, first.msg_id);
        linker.serving(Serving {
            conn: conn(5),
            serial: 1,
            worker: goroutine(0x100),
            traceparent: None,
        });
        assert_eq!(linker.parent(1, goroutine(0x110), false), None, "not R2's");
        // A goroutine R2's handler starts links to R2.
        linker.goroutine_started(1, 0x120, 0x100);
        let second = linker.parent(1, goroutine(0x120), false).unwrap();
        assert_eq!(linker.answered(conn(5), 1).msg_id, second.msg_id);
    }

    #[test]
    fn a_reused_g_breaks_the_chain_instead_of_linking_elsewhere() {
        let mut linker = Linker::default();
        linker.goroutine_started(1, 0x100, 0x1);
        serve_on_goroutine(&mut linker, 5, 0x100);
        linker.goroutine_started(1, 0x110, 0x100);
        // 0x100 ends and Go starts its `g` again for a goroutine serving another request.
        linker.goroutine_started(1, 0x100, 0x1);
        serve_on_goroutine(&mut linker, 6, 0x100);
        let reused = linker.parent(1, goroutine(0x100), false).unwrap();
        assert_eq!(linker.answered(conn(6), 0).msg_id, reused.msg_id);
        // 0x110 was started by the earlier 0x100, whose request (conn 5) is still unanswered
        // but no longer reachable through the reused `g`.
        assert_eq!(linker.parent(1, goroutine(0x110), false), None);
        linker.forget_process(1);
        assert!(linker.started.is_empty() && linker.unanswered.is_empty());
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
                worker: thread(tid),
                traceparent: (tid == 60).then(|| traceparent.to_owned()),
            });
        }
        assert_eq!(
            linker.parent(1, thread(60), false),
            None,
            "not thread per request"
        );
        let parent = linker.parent(1, thread(60), true).unwrap();
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
        assert_eq!(linker.parent(1, thread(60), true), None);
        assert_eq!(linker.attach_error(60, error("late")), Some(error("late")));
    }

    #[test]
    fn a_thread_serving_two_requests_links_to_neither() {
        let mut linker = Linker::default();
        for serial in 0..2 {
            linker.serving(Serving {
                conn: conn(5),
                serial,
                worker: thread(50),
                traceparent: None,
            });
        }
        assert_eq!(linker.parent(1, thread(50), true), None);
        linker.forget_connection(conn(5));
        assert!(linker.unanswered.is_empty());
    }
}
