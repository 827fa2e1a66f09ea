//! Which trace a payload's span belongs to and which span is its parent: a W3C `traceparent`
//! the request carried when there is a valid one, else ids derived from the APIToolkit
//! `msg_id`s, so an outgoing call's span is the child of the incoming request's span.

use std::fmt;

use uuid::Uuid;

/// The W3C header that carries a trace context.
pub const TRACEPARENT: &str = "traceparent";

#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct TraceId(pub [u8; 16]);

#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct SpanId(pub [u8; 8]);

fn write_hex(bytes: &[u8], f: &mut fmt::Formatter<'_>) -> fmt::Result {
    bytes.iter().try_for_each(|byte| write!(f, "{byte:02x}"))
}

impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(&self.0, f)
    }
}

impl fmt::Debug for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(&self.0, f)
    }
}

impl TraceId {
    /// The trace a request with no trace context starts: its `msg_id`'s 128 bits.
    pub fn of_msg_id(msg_id: Uuid) -> Self {
        Self(msg_id.into_bytes())
    }
}

impl SpanId {
    /// A payload's span id: the low 64 bits of its `msg_id` (random in a UUIDv4, and never
    /// zero since the variant bits are set), so a child can name it from `parent_id` alone.
    pub fn of_msg_id(msg_id: Uuid) -> Self {
        let bytes = msg_id.into_bytes();
        let mut id = [0; 8];
        id.copy_from_slice(&bytes[8..]);
        Self(id)
    }
}

/// A valid `traceparent` header: the trace, and the span that sent the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: TraceId,
    pub span_id: SpanId,
}

fn hex_bytes<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N || !text.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut bytes = [0; N];
    for (byte, pair) in bytes.iter_mut().zip(text.as_bytes().chunks_exact(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(bytes)
}

impl TraceParent {
    /// Parses `version-traceid-parentid-flags` as W3C Trace Context level 1 says: lowercase
    /// hex, all-zero ids invalid, version `ff` invalid, a future version may append fields.
    /// Anything else is `None`: a malformed header is ignored, never trusted.
    pub fn parse(value: &str) -> Option<Self> {
        let value = value.trim_matches([' ', '\t']);
        let mut fields = value.split('-');
        let version = hex_bytes::<1>(fields.next()?)?[0];
        let trace_id = hex_bytes::<16>(fields.next()?)?;
        let span_id = hex_bytes::<8>(fields.next()?)?;
        hex_bytes::<1>(fields.next()?)?;
        let more = fields.next().is_some();
        if version == 0xff || (version == 0 && more) {
            return None;
        }
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id: TraceId(trace_id),
            span_id: SpanId(span_id),
        })
    }
}

/// Whether the watched process served the request or made it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SpanKind {
    #[default]
    Server,
    Client,
}

/// The identity of the span a payload becomes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpanContext {
    pub kind: SpanKind,
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_span_id: Option<SpanId>,
}

/// The incoming request an outgoing call was made for: its span and trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParentSpan {
    pub trace_id: TraceId,
    pub span_id: SpanId,
}

impl ParentSpan {
    /// The span of the incoming request `msg_id`, which carried `traceparent`.
    pub fn incoming(msg_id: Uuid, traceparent: Option<TraceParent>) -> Self {
        Self {
            trace_id: traceparent.map_or(TraceId::of_msg_id(msg_id), |parent| parent.trace_id),
            span_id: SpanId::of_msg_id(msg_id),
        }
    }
}

impl SpanContext {
    /// An incoming request joins the trace its `traceparent` names, as a child of the span
    /// that sent it; without one it starts a trace of its own.
    pub fn incoming(msg_id: Uuid, traceparent: Option<TraceParent>) -> Self {
        let own = ParentSpan::incoming(msg_id, traceparent);
        Self {
            kind: SpanKind::Server,
            trace_id: own.trace_id,
            span_id: own.span_id,
            parent_span_id: traceparent.map(|parent| parent.span_id),
        }
    }

    /// An outgoing call that carries a `traceparent` hangs under the span it names (the
    /// service's own client span, or what it propagated); otherwise under the incoming
    /// request being served; otherwise it is a root.
    pub fn outgoing(
        msg_id: Uuid,
        traceparent: Option<TraceParent>,
        parent: Option<ParentSpan>,
    ) -> Self {
        let parent = traceparent
            .map(|header| ParentSpan {
                trace_id: header.trace_id,
                span_id: header.span_id,
            })
            .or(parent);
        Self {
            kind: SpanKind::Client,
            trace_id: parent.map_or(TraceId::of_msg_id(msg_id), |parent| parent.trace_id),
            span_id: SpanId::of_msg_id(msg_id),
            parent_span_id: parent.map(|parent| parent.span_id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_parses() {
        let parsed = TraceParent::parse(VALID).unwrap();
        assert_eq!(
            format!("{:?}", parsed.trace_id),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(format!("{:?}", parsed.span_id), "00f067aa0ba902b7");
        // A later version may add fields after the flags.
        assert!(TraceParent::parse(&format!("01{}-extra", &VALID[2..])).is_some());
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        for bad in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "[CLIENT_REDACTED]",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn an_outgoing_call_is_the_child_of_the_request_being_served() {
        let incoming_id = Uuid::new_v4();
        let incoming = SpanContext::incoming(incoming_id, None);
        assert_eq!(incoming.trace_id.0, incoming_id.into_bytes());
        assert_eq!(incoming.parent_span_id, None);
        let outgoing = SpanContext::outgoing(
            Uuid::new_v4(),
            None,
            Some(ParentSpan::incoming(incoming_id, None)),
        );
        assert_eq!(outgoing.kind, SpanKind::Client);
        assert_eq!(outgoing.trace_id, incoming.trace_id);
        assert_eq!(outgoing.parent_span_id, Some(incoming.span_id));
        assert_ne!(outgoing.span_id, incoming.span_id);
    }

    #[test]
    fn traceparent_headers_put_spans_in_the_callers_trace() {
        let header = TraceParent::parse(VALID).unwrap();
        let incoming_id = Uuid::new_v4();
        let incoming = SpanContext::incoming(incoming_id, Some(header));
        assert_eq!(incoming.trace_id, header.trace_id);
        assert_eq!(incoming.parent_span_id, Some(header.span_id));
        assert_eq!(incoming.span_id, SpanId::of_msg_id(incoming_id));

        // Not propagated by the service: still the child of the request, in its trace.
        let parent = ParentSpan::incoming(incoming_id, Some(header));
        let plain = SpanContext::outgoing(Uuid::new_v4(), None, Some(parent));
        assert_eq!(plain.trace_id, header.trace_id);
        assert_eq!(plain.parent_span_id, Some(incoming.span_id));

        // Propagated: under the span the outgoing header names.
        let named =
            TraceParent::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").unwrap();
        let joined = SpanContext::outgoing(Uuid::new_v4(), Some(named), Some(parent));
        assert_eq!(joined.trace_id, named.trace_id);
        assert_eq!(joined.parent_span_id, Some(named.span_id));
    }
}
