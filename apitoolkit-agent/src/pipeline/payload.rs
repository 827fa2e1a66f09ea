//! Exchange -> the APIToolkit request message (the contract is docs/payload.md).

use std::{collections::BTreeMap, sync::Arc};

use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{
    app_errors::CapturedError,
    connections::TrackedExchange,
    events::Role,
    link::Parent,
    profile::{ProcessProfile, SdkType},
    protocols::{
        content::{self, MediaType},
        form::{self, FormShape},
        message::{Body, Message, StartLine},
    },
    trace::{ParentSpan, SpanContext, TRACEPARENT, TraceParent},
};

/// The backend's ATError; every key is required.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AtError {
    pub when: String,
    pub error_type: String,
    pub message: String,
    pub root_error_type: String,
    pub root_error_message: String,
    pub stack_trace: String,
}

pub type HeaderMap = BTreeMap<String, Vec<String>>;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Payload {
    pub timestamp: String,
    pub duration: u64,
    pub method: String,
    pub host: String,
    pub raw_url: String,
    pub url_path: String,
    pub path_params: serde_json::Map<String, serde_json::Value>,
    pub query_params: HeaderMap,
    pub request_headers: HeaderMap,
    pub response_headers: HeaderMap,
    pub request_body: String,
    pub response_body: String,
    pub proto_major: u8,
    pub proto_minor: u8,
    pub status_code: u16,
    pub sdk_type: SdkType,
    pub project_id: Uuid,
    pub msg_id: Uuid,
    pub parent_id: Option<Uuid>,
    pub referer: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_version: Option<String>,
    pub tags: Vec<String>,
    pub errors: Vec<AtError>,
    /// Not part of the message: what the bodies are, for redaction.
    #[serde(skip)]
    pub request_body_kind: BodyKind,
    #[serde(skip)]
    pub response_body_kind: BodyKind,
    /// Not part of the message: the span this payload becomes (OTLP export).
    #[serde(skip)]
    pub span: SpanContext,
    /// Not part of the message: the service that served or made the request (its Kubernetes
    /// workload, else its command name); empty when unknown.
    #[serde(skip)]
    pub service_name: Arc<str>,
    /// Not part of the message: whether `url_path` is a route template.
    #[serde(skip)]
    pub route: RouteLookup,
}

/// How a payload's `url_path` was found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RouteLookup {
    /// Not looked up: an outgoing request, or a process with no route templates.
    #[default]
    NotLooked,
    /// The path matched a template.
    Matched,
    /// No template matched: `url_path` is the request path.
    Unmatched,
}

impl Payload {
    /// The span this payload becomes. It reads the payload's (redacted) headers: a redacted
    /// `traceparent` names no trace.
    pub fn span_context(&self, role: Role, parent: Option<ParentSpan>) -> SpanContext {
        let traceparent = self
            .request_headers
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(TRACEPARENT))
            .and_then(|(_, values)| values.first())
            .and_then(|value| TraceParent::parse(value));
        match role {
            Role::Client => SpanContext::outgoing(self.msg_id, traceparent, parent),
            _ => SpanContext::incoming(self.msg_id, traceparent),
        }
    }
}

/// What a body in a payload is, from its Content-Type: what redaction can do with it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BodyKind {
    /// Declared JSON.
    Json,
    /// A form, sent as the JSON object of its fields.
    Form,
    /// A form that could not be read (a multipart body without a boundary or malformed, a
    /// content encoding left undone), sent as captured.
    UnreadForm,
    /// Any other declared type (text, HTML, XML, images …).
    Other,
    /// A Content-Type that does not parse.
    Unparsed,
    /// A content encoding the agent could not undo: the body is sent as captured.
    Undecoded,
    /// No Content-Type.
    #[default]
    Undeclared,
}

/// Settings every payload shares.
#[derive(Clone, Debug)]
pub struct PayloadSettings {
    pub project_id: Uuid,
    pub service_version: Option<String>,
    pub tags: Vec<String>,
    pub max_body_bytes: usize,
    /// CLOCK_REALTIME minus CLOCK_MONOTONIC: kernel timestamps are monotonic.
    pub realtime_offset_ns: i128,
}

/// How a payload relates to others: its own id, the incoming request that caused it, and the
/// errors raised while serving it.
#[derive(Debug)]
pub struct Links {
    pub msg_id: Uuid,
    pub parent: Option<Parent>,
    pub errors: Vec<CapturedError>,
}

impl Links {
    pub fn incoming(msg_id: Uuid, errors: Vec<CapturedError>) -> Self {
        Self {
            msg_id,
            parent: None,
            errors,
        }
    }

    /// An outgoing request gets its own id, as the Go SDK gives it.
    pub fn outgoing(parent: Option<Parent>) -> Self {
        Self {
            msg_id: Uuid::new_v4(),
            parent,
            errors: Vec::new(),
        }
    }
}

/// Tags that say a body in this payload is not the whole body.
pub const TAG_REQUEST_BODY_TRUNCATED: &str = "apitoolkit.request_body_truncated";
pub const TAG_RESPONSE_BODY_TRUNCATED: &str = "apitoolkit.response_body_truncated";
pub const TAG_REQUEST_BODY_INCOMPLETE: &str = "apitoolkit.request_body_incomplete";
pub const TAG_RESPONSE_BODY_INCOMPLETE: &str = "apitoolkit.response_body_incomplete";
pub const TAG_REQUEST_BODY_ENCODED: &str = "apitoolkit.request_body_undecoded";
pub const TAG_RESPONSE_BODY_ENCODED: &str = "apitoolkit.response_body_undecoded";
/// HTTP/2 on a connection older than the agent: header fields from HPACK state the agent never
/// saw are missing.
pub const TAG_HEADERS_INCOMPLETE: &str = "apitoolkit.headers_incomplete";

fn header_map(message: &Message) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in &message.headers {
        map.entry(name.clone()).or_default().push(value.clone());
    }
    map
}

fn query_params(query: &str) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        map.entry(key.into_owned())
            .or_default()
            .push(value.into_owned());
    }
    map
}

struct BodyTags {
    truncated: &'static str,
    incomplete: &'static str,
    undecoded: &'static str,
}

/// A body as the payload carries it: base64 of its bytes, and what it is.
struct EncodedBody {
    base64: String,
    kind: BodyKind,
}

/// How repeated form fields look in the JSON object, as the framework's own SDK sends them.
fn form_shape(sdk_type: SdkType) -> FormShape {
    match sdk_type {
        SdkType::PythonDjango => FormShape::ValueLists,
        _ => FormShape::FirstValue,
    }
}

fn json_bytes(fields: serde_json::Map<String, serde_json::Value>) -> Vec<u8> {
    serde_json::to_vec(&fields).expect("a JSON object serializes")
}

/// A form's bytes turned into the JSON object of its fields, or `None` (with the reason
/// logged) when they cannot be read as the form they declare. `partial`: the bytes are not the
/// whole body, so a multipart body stops early and keeps its whole parts.
fn form_json(media: &MediaType, bytes: &[u8], partial: bool, shape: FormShape) -> Option<Vec<u8>> {
    match media {
        MediaType::UrlEncodedForm => Some(json_bytes(form::url_encoded(bytes, shape))),
        MediaType::MultipartForm {
            boundary: Some(boundary),
        } => {
            let form = form::multipart(bytes, boundary, shape);
            match form.error {
                Some(error) if !partial => {
                    tracing::debug!(%error, "multipart body sent as captured");
                    None
                }
                _ => Some(json_bytes(form.fields)),
            }
        }
        _ => {
            tracing::debug!("multipart body without a boundary sent as captured");
            None
        }
    }
}

/// Decodes the content encoding, turns a form into the JSON object of its fields, and
/// base64-encodes the body, tagging what is not whole.
fn encode_body(
    message: &Message,
    body: &Body,
    max_bytes: usize,
    form_shape: FormShape,
    tags: &BodyTags,
    out_tags: &mut Vec<String>,
) -> EncodedBody {
    let decoded = content::decode(message.header("content-encoding"), &body.bytes, max_bytes);
    let (bytes, truncated, undecoded) = match &decoded {
        Ok(Some(decoded)) => (
            &decoded.bytes[..],
            body.truncated || decoded.truncated,
            false,
        ),
        Ok(None) => (&body.bytes[..], body.truncated, false),
        Err(error) => {
            tracing::debug!(%error, "body left encoded");
            out_tags.push(tags.undecoded.to_owned());
            (&body.bytes[..], body.truncated, true)
        }
    };
    if truncated {
        out_tags.push(tags.truncated.to_owned());
    }
    if body.incomplete {
        out_tags.push(tags.incomplete.to_owned());
    }
    let media = content::media_type(message.header("content-type"));
    let (kind, form) = match media {
        _ if undecoded && !bytes.is_empty() => (BodyKind::Undecoded, None),
        MediaType::Json => (BodyKind::Json, None),
        MediaType::Other => (BodyKind::Other, None),
        MediaType::Unparsed => (BodyKind::Unparsed, None),
        MediaType::Undeclared => (BodyKind::Undeclared, None),
        // JSON sent with a form's type (`curl -d '{…}'`) would become one key holding the whole
        // text, out of every rule's reach: it stays JSON.
        MediaType::UrlEncodedForm if content::looks_like_json(bytes) => (BodyKind::Json, None),
        // An empty form is no body, as an empty JSON body is.
        MediaType::UrlEncodedForm | MediaType::MultipartForm { .. } if bytes.is_empty() => {
            (BodyKind::Form, None)
        }
        MediaType::UrlEncodedForm | MediaType::MultipartForm { .. } => {
            match form_json(&media, bytes, truncated || body.incomplete, form_shape) {
                Some(json) => (BodyKind::Form, Some(json)),
                None => (BodyKind::UnreadForm, None),
            }
        }
    };
    EncodedBody {
        base64: BASE64.encode(form.as_deref().unwrap_or(bytes)),
        kind,
    }
}

fn rfc3339(unix_ns: i128) -> String {
    let seconds = unix_ns.div_euclid(1_000_000_000) as i64;
    let nanos = unix_ns.rem_euclid(1_000_000_000) as u32;
    chrono::DateTime::from_timestamp(seconds, nanos)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, false)
}

/// A captured error as the backend's ATError.
pub fn at_error(error: CapturedError, settings: &PayloadSettings) -> AtError {
    AtError {
        when: rfc3339(error.timestamp_ns as i128 + settings.realtime_offset_ns),
        error_type: error.error_type,
        message: error.message,
        root_error_type: error.root_error_type,
        root_error_message: error.root_error_message,
        stack_trace: error.stack_trace,
    }
}

/// The payload of one exchange. Its `sdk_type` is the process's framework, or its runtime's
/// outgoing type for a request the process made; its tags are the agent's, then what the body
/// encoding noticed, then the process's own (e.g. its pod).
pub fn build(
    tracked: &TrackedExchange,
    profile: &ProcessProfile,
    links: Links,
    settings: &PayloadSettings,
) -> Payload {
    let sdk_type = match tracked.role {
        Role::Client => profile.outgoing_sdk_type(),
        _ => profile.sdk_type,
    };
    let request = &tracked.exchange.request;
    let response = &tracked.exchange.response;
    let (method, target) = match &request.start {
        StartLine::Request { method, target } => (method.clone(), target.clone()),
        StartLine::Response { .. } => unreachable!("requests carry a request line"),
    };
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path.to_owned(), query),
        None => (target.clone(), ""),
    };
    let mut tags = settings.tags.clone();
    let form_shape = form_shape(sdk_type);
    let request_body = encode_body(
        request,
        &request.body,
        settings.max_body_bytes,
        form_shape,
        &BodyTags {
            truncated: TAG_REQUEST_BODY_TRUNCATED,
            incomplete: TAG_REQUEST_BODY_INCOMPLETE,
            undecoded: TAG_REQUEST_BODY_ENCODED,
        },
        &mut tags,
    );
    let response_body = encode_body(
        response,
        &response.body,
        settings.max_body_bytes,
        form_shape,
        &BodyTags {
            truncated: TAG_RESPONSE_BODY_TRUNCATED,
            incomplete: TAG_RESPONSE_BODY_INCOMPLETE,
            undecoded: TAG_RESPONSE_BODY_ENCODED,
        },
        &mut tags,
    );
    let (url_path, path_params, route) = match tracked.role {
        Role::Client => (path, serde_json::Map::new(), RouteLookup::NotLooked),
        _ if profile.routes.is_empty() => (path, serde_json::Map::new(), RouteLookup::NotLooked),
        _ => match profile.routes.resolve(&path) {
            Some(found) => (found.url_path, found.path_params, RouteLookup::Matched),
            None => (path, serde_json::Map::new(), RouteLookup::Unmatched),
        },
    };
    if tracked.exchange.headers_incomplete {
        tags.push(TAG_HEADERS_INCOMPLETE.to_owned());
    }
    tags.extend(profile.tags.iter().cloned());
    Payload {
        timestamp: rfc3339(response.last_byte_ns as i128 + settings.realtime_offset_ns),
        duration: response.last_byte_ns.saturating_sub(request.first_byte_ns),
        method,
        host: request
            .authority
            .as_deref()
            .or_else(|| request.header("host"))
            .unwrap_or_default()
            .to_owned(),
        raw_url: target.clone(),
        url_path,
        path_params,
        query_params: query_params(query),
        request_headers: header_map(request),
        response_headers: header_map(response),
        request_body: request_body.base64,
        response_body: response_body.base64,
        proto_major: request.version.major,
        proto_minor: request.version.minor,
        status_code: response.status().unwrap_or_default(),
        sdk_type,
        project_id: settings.project_id,
        msg_id: links.msg_id,
        parent_id: links.parent.map(|parent| parent.msg_id),
        referer: request.header("referer").unwrap_or_default().to_owned(),
        service_version: settings.service_version.clone(),
        tags,
        errors: links
            .errors
            .into_iter()
            .map(|error| at_error(error, settings))
            .collect(),
        request_body_kind: request_body.kind,
        response_body_kind: response_body.kind,
        span: SpanContext::default(),
        service_name: profile.service_name.clone(),
        route,
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use flate2::{Compression, write::GzEncoder};

    use super::*;
    use crate::pipeline::{
        events::{ConnId, Worker},
        protocols::{Exchange, message::Version},
    };

    fn message(start: StartLine, headers: &[(&str, &str)], body: &[u8], at: (u64, u64)) -> Message {
        Message {
            start,
            version: Version::HTTP_1_1,
            authority: None,
            headers: headers
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_string()))
                .collect(),
            body: Body {
                bytes: body.to_vec(),
                truncated: false,
                incomplete: false,
            },
            first_byte_ns: at.0,
            last_byte_ns: at.1,
        }
    }

    fn settings() -> PayloadSettings {
        PayloadSettings {
            project_id: Uuid::nil(),
            service_version: None,
            tags: vec!["team:api".into()],
            max_body_bytes: 1 << 20,
            realtime_offset_ns: 1_764_000_000_000_000_000,
        }
    }

    fn exchange(request: Message, response: Message) -> TrackedExchange {
        TrackedExchange {
            conn: ConnId {
                tgid: 1,
                fd: 3,
                generation: 1,
            },
            role: Role::Server,
            remote: None,
            worker: Worker::default(),
            exchange: Exchange {
                serial: 0,
                request,
                response,
                reset: None,
                headers_incomplete: false,
            },
        }
    }

    #[test]
    fn fields_follow_the_contract() {
        let request = message(
            StartLine::Request {
                method: "GET".into(),
                target: "/users/42?page=2&tag=a&tag=b&q=a%20b".into(),
            },
            &[
                ("Host", "api.local:8080"),
                ("X-Multi", "1"),
                ("x-multi", "2"),
            ],
            b"",
            (1_000, 2_000),
        );
        let response = message(
            StartLine::Response { status: 201 },
            &[],
            b"{}",
            (5_000, 9_000),
        );
        let error = CapturedError {
            timestamp_ns: 8_500,
            error_type: "ValueError".into(),
            message: "bad".into(),
            root_error_type: "KeyError".into(),
            root_error_message: "'id'".into(),
            stack_trace: "Traceback (most recent call last):\nValueError: bad".into(),
        };
        let msg_id = Uuid::new_v4();
        let payload = build(
            &exchange(request, response),
            &ProcessProfile::new(SdkType::PythonFlask, true),
            Links::incoming(msg_id, vec![error]),
            &settings(),
        );
        assert_eq!(payload.msg_id, msg_id);
        assert_eq!(
            payload.errors,
            vec![AtError {
                when: "2025-11-24T16:00:00.000008+00:00".into(),
                error_type: "ValueError".into(),
                message: "bad".into(),
                root_error_type: "KeyError".into(),
                root_error_message: "'id'".into(),
                stack_trace: "Traceback (most recent call last):\nValueError: bad".into(),
            }]
        );
        assert_eq!(
            payload.duration, 8_000,
            "first request byte to last response byte"
        );
        assert_eq!(payload.timestamp, "2025-11-24T16:00:00.000009+00:00");
        assert_eq!(payload.url_path, "/users/42");
        assert_eq!(payload.raw_url, "/users/42?page=2&tag=a&tag=b&q=a%20b");
        assert_eq!(payload.query_params["tag"], vec!["a", "b"]);
        assert_eq!(payload.query_params["q"], vec!["a b"]);
        assert_eq!(payload.host, "api.local:8080");
        assert_eq!(payload.request_headers["X-Multi"], vec!["1"]);
        assert_eq!(payload.status_code, 201);
        assert_eq!(payload.response_body, "e30=");
        assert_eq!(payload.tags, vec!["team:api"]);

        let json: serde_json::Value = serde_json::to_value(&payload).unwrap();
        assert_eq!(json["sdk_type"], "PythonFlask");
        assert_eq!(json["parent_id"], serde_json::Value::Null);
        assert_eq!(json["path_params"], serde_json::json!({}));
        assert!(json.get("service_version").is_none());
    }

    #[test]
    fn incoming_paths_resolve_to_their_route_template() {
        use crate::pipeline::routes::{RouteTable, Template};
        let mut profile = ProcessProfile::new(SdkType::PythonFlask, true);
        profile.routes.scanned = Arc::new(RouteTable::new(vec![
            Template::parse("/accounts/<int:account_id>").unwrap(),
        ]));
        let get = |target: &str, role: Role| {
            let request = message(
                StartLine::Request {
                    method: "GET".into(),
                    target: target.into(),
                },
                &[],
                b"",
                (0, 1),
            );
            let response = message(StartLine::Response { status: 200 }, &[], b"", (2, 3));
            let mut tracked = exchange(request, response);
            tracked.role = role;
            let links = match role {
                Role::Client => Links::outgoing(None),
                _ => Links::incoming(Uuid::new_v4(), Vec::new()),
            };
            build(&tracked, &profile, links, &settings())
        };
        let matched = get("/accounts/7?full=1", Role::Server);
        assert_eq!(matched.url_path, "/accounts/<int:account_id>");
        assert_eq!(matched.raw_url, "/accounts/7?full=1");
        assert_eq!(
            serde_json::Value::Object(matched.path_params.clone()),
            serde_json::json!({"account_id": 7})
        );
        assert_eq!(matched.route, RouteLookup::Matched);
        let unmatched = get("/health", Role::Server);
        assert_eq!(unmatched.url_path, "/health");
        assert!(unmatched.path_params.is_empty());
        assert_eq!(unmatched.route, RouteLookup::Unmatched);
        let outgoing = get("/accounts/7", Role::Client);
        assert_eq!(outgoing.url_path, "/accounts/7", "another service's path");
        assert_eq!(outgoing.route, RouteLookup::NotLooked);
    }

    #[test]
    fn gzip_bodies_are_decoded_and_cut_bodies_tagged() {
        let mut gzip = GzEncoder::new(Vec::new(), Compression::default());
        gzip.write_all(b"{\"ok\":true}").unwrap();
        let mut request = message(
            StartLine::Request {
                method: "POST".into(),
                target: "/".into(),
            },
            &[],
            b"partial",
            (0, 1),
        );
        request.body.truncated = true;
        let response = message(
            StartLine::Response { status: 200 },
            &[("Content-Encoding", "gzip")],
            &gzip.finish().unwrap(),
            (2, 3),
        );
        let payload = build(
            &exchange(request, response),
            &ProcessProfile::unknown(),
            Links::outgoing(None),
            &settings(),
        );
        assert_eq!(
            BASE64.decode(&payload.response_body).unwrap(),
            b"{\"ok\":true}"
        );
        assert!(
            payload
                .tags
                .contains(&TAG_REQUEST_BODY_TRUNCATED.to_owned())
        );
        assert!(
            !payload
                .tags
                .contains(&TAG_RESPONSE_BODY_TRUNCATED.to_owned())
        );
    }

    fn post(headers: &[(&str, &str)], body: &[u8]) -> Message {
        message(
            StartLine::Request {
                method: "POST".into(),
                target: "/login".into(),
            },
            headers,
            body,
            (0, 1),
        )
    }

    fn ok() -> Message {
        message(StartLine::Response { status: 200 }, &[], b"", (2, 3))
    }

    fn built(request: Message, sdk_type: SdkType) -> Payload {
        build(
            &exchange(request, ok()),
            &ProcessProfile::new(sdk_type, true),
            Links::incoming(Uuid::new_v4(), Vec::new()),
            &settings(),
        )
    }

    fn body_json(body: &str) -> serde_json::Value {
        serde_json::from_slice(&BASE64.decode(body).unwrap()).unwrap()
    }

    const FORM: (&str, &str) = ("Content-Type", "application/x-www-form-urlencoded");

    #[test]
    fn a_url_encoded_form_is_sent_as_the_json_object_of_its_fields() {
        let body = b"user=bob&password=hunter2&tag=a&tag=b";
        let flask = built(post(&[FORM], body), SdkType::PythonFlask);
        assert_eq!(flask.request_body_kind, BodyKind::Form);
        assert_eq!(
            body_json(&flask.request_body),
            serde_json::json!({"user": "bob", "password": "hunter2", "tag": "a"})
        );
        let django = built(post(&[FORM], body), SdkType::PythonDjango);
        assert_eq!(
            body_json(&django.request_body),
            serde_json::json!({"user": ["bob"], "password": ["hunter2"], "tag": ["a", "b"]})
        );
        let empty = built(post(&[FORM], b""), SdkType::PythonFlask);
        assert_eq!(empty.request_body, "");
    }

    #[test]
    fn a_multipart_form_sends_text_fields_and_summarises_files() {
        let body = b"--XyZ\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\nQ3\r\n\
--XyZ\r\nContent-Disposition: form-data; name=\"report\"; filename=\"q3.csv\"\r\n\
Content-Type: text/csv\r\n\r\na,b\n1,2\n\r\n--XyZ--\r\n";
        let content_type = ("Content-Type", "multipart/form-data; boundary=XyZ");
        let payload = built(post(&[content_type], body), SdkType::PythonFlask);
        assert_eq!(payload.request_body_kind, BodyKind::Form);
        assert_eq!(
            body_json(&payload.request_body),
            serde_json::json!({
                "title": "Q3",
                "report": {"filename": "q3.csv", "content_type": "text/csv", "size": 8}
            })
        );

        // Cut inside the file: the whole parts before it are kept, and the body tagged.
        let mut cut = post(&[content_type], &body[..body.len() - 20]);
        cut.body.truncated = true;
        let payload = built(cut, SdkType::PythonFlask);
        assert_eq!(payload.request_body_kind, BodyKind::Form);
        assert_eq!(
            body_json(&payload.request_body),
            serde_json::json!({"title": "Q3"})
        );
        assert!(
            payload
                .tags
                .contains(&TAG_REQUEST_BODY_TRUNCATED.to_owned())
        );
    }

    #[test]
    fn a_form_that_cannot_be_read_is_sent_as_captured_and_marked_unread() {
        let unreadable = [
            // No boundary.
            post(&[("Content-Type", "multipart/form-data")], b"--a\r\n"),
            // Whole but malformed: its boundary never appears.
            post(
                &[("Content-Type", "multipart/form-data; boundary=zz")],
                b"password=hunter2",
            ),
        ];
        for request in unreadable {
            let raw = BASE64.encode(&request.body.bytes);
            let payload = built(request, SdkType::PythonFlask);
            assert_eq!(payload.request_body_kind, BodyKind::UnreadForm);
            assert_eq!(payload.request_body, raw);
        }
        let kind = |headers: &[(&str, &str)], body: &[u8]| {
            built(post(headers, body), SdkType::PythonFlask).request_body_kind
        };
        // A content encoding the agent cannot undo: nothing is known of the bytes.
        let compressed = [FORM, ("Content-Encoding", "br")];
        assert_eq!(kind(&compressed, b"password=hunter2"), BodyKind::Undecoded);
        // `curl -d '{…}'` declares a form: the body stays JSON, not one key holding the text.
        assert_eq!(kind(&[FORM], br#" {"password":"x"}"#), BodyKind::Json);
        let unparsable = ("Content-Type", "application/x-www-form-urlencoded;charset");
        assert_eq!(kind(&[unparsable], b"password=x"), BodyKind::Unparsed);
        assert_eq!(
            kind(&[("content-type", "text/plain")], b"hi"),
            BodyKind::Other
        );
        let json = built(
            post(&[("Content-Type", "application/json")], b"{}"),
            SdkType::PythonFlask,
        );
        assert_eq!(json.request_body_kind, BodyKind::Json);
    }

    #[test]
    fn sdk_type_names_parse_and_serialize_exactly() {
        assert_eq!("SDKUnknown".parse::<SdkType>(), Ok(SdkType::SDKUnknown));
        assert!("Flask".parse::<SdkType>().is_err());
        assert_eq!(
            serde_json::to_string(&SdkType::JsExpress).unwrap(),
            "\"JsExpress\""
        );
    }
}
