//! Sessions recorded live by the agent (`--record`) replayed without root: gunicorn gthread
//! serving the Flask test app over one keep-alive connection plus one pipelined connection, and
//! node serving HTTPS (handshake ciphertext from the socket, plaintext from OpenSSL uprobes).

use std::path::PathBuf;

use apitoolkit_agent::agent::recording::RedactedEvents;
use apitoolkit_agent::pipeline::{
    CaptureScope, ERROR_HOLD_NS, Pipeline, PipelineOutput, Tracked,
    events::{ConnId, DataEvent, Direction, Event, Role, Source},
    payload::{BodyKind, HeaderMap, Payload, PayloadSettings},
    profile::{ProcessProfile, Profiles, SdkType},
    redact::{REDACTED, Redactor, TAG_REQUEST_BODY_WITHHELD},
    trace::SpanKind,
};
use bytes::Bytes;
use uuid::Uuid;

fn fixture_events(name: &str) -> Vec<Event> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name);
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

fn recorded_events() -> Vec<Event> {
    fixture_events("gunicorn_keepalive_session.ndjson")
}

fn settings() -> PayloadSettings {
    PayloadSettings {
        project_id: Uuid::parse_str("6a1c2f8e-8d6f-4c1f-9a57-0b1b7b2a9c11").unwrap(),
        service_version: Some("2.1.0".into()),
        tags: vec!["env:test".into()],
        max_body_bytes: 1 << 20,
        realtime_offset_ns: 1_700_000_000_000_000_000,
    }
}

fn pipeline(sdk_type: SdkType, redactor: Redactor) -> Pipeline {
    // As a pod in Kubernetes would be tagged.
    let profile = ProcessProfile {
        tags: vec!["k8s.pod:shop-1".to_owned()].into(),
        service_name: "shop".into(),
        ..ProcessProfile::new(sdk_type, true)
    };
    let scope = CaptureScope {
        outgoing: true,
        errors: true,
    };
    Pipeline::new(settings(), scope, redactor, Profiles::Everyone(profile))
}

/// Every payload of the events, as `apitoolkit-agent replay` gives them (held ones at the end).
fn replay_with(events: Vec<Event>, redactor: Redactor) -> Vec<Payload> {
    let mut pipeline = pipeline(SdkType::PythonFlask, redactor);
    let mut payloads = feed_all(&mut pipeline, events);
    payloads.extend(pipeline.flush().payloads);
    payloads
}

fn replay(events: Vec<Event>) -> Vec<Payload> {
    replay_with(events, Redactor::default())
}

/// Replays a fixture, returning its payloads and the pipeline (for its counters).
fn replay_fixture(name: &str, sdk_type: SdkType) -> (Vec<Payload>, Pipeline) {
    let mut pipeline = pipeline(sdk_type, Redactor::default());
    let mut payloads = feed_all(&mut pipeline, fixture_events(name));
    payloads.extend(pipeline.flush().payloads);
    (payloads, pipeline)
}

fn summary(payloads: &[Payload]) -> Vec<(&str, &str, u16)> {
    payloads
        .iter()
        .map(|p| (p.method.as_str(), p.raw_url.as_str(), p.status_code))
        .collect()
}

/// The capture loop hands every event the same `Tracked` and `PipelineOutput`: each event
/// must leave them as it found them, or payloads repeat or mix.
#[test]
fn reused_stage_buffers_give_the_payloads_of_fresh_ones() {
    let mut pipeline = pipeline(SdkType::PythonFlask, Redactor::default());
    let (mut tracked, mut output) = (Tracked::default(), PipelineOutput::default());
    let mut payloads = Vec::new();
    for event in recorded_events() {
        pipeline.track(event, &mut tracked);
        pipeline.emit(&mut tracked, &mut output);
        assert_eq!(output.payloads.len(), output.origins.len());
        payloads.append(&mut output.payloads);
        output.origins.clear();
    }
    payloads.extend(pipeline.flush().payloads);
    // Ids are random: what must match is everything else.
    let without_ids = |payloads: Vec<Payload>| -> Vec<Payload> {
        payloads
            .into_iter()
            .map(|payload| Payload {
                msg_id: Uuid::nil(),
                parent_id: payload.parent_id.map(|_| Uuid::nil()),
                span: Default::default(),
                ..payload
            })
            .collect()
    };
    let fresh = replay(recorded_events());
    assert_eq!(payloads.len(), 7);
    assert_eq!(without_ids(payloads), without_ids(fresh));
}

#[test]
fn recorded_session_yields_one_payload_per_request() {
    let payloads = replay(recorded_events());
    assert_eq!(
        summary(&payloads),
        vec![
            ("GET", "/hello?name=bob&tag=a&tag=b", 200),
            ("POST", "/echo", 200),
            ("POST", "/upload", 200),
            ("HEAD", "/item/7", 200),
            ("GET", "/item/0", 200),
            ("GET", "/item/1", 200),
            ("GET", "/item/2", 200),
        ]
    );

    let get = &payloads[0];
    assert_eq!(get.url_path, "/hello");
    assert_eq!(get.host, "127.0.0.1:5079");
    assert_eq!(get.referer, "http://example.com/p");
    assert_eq!(
        get.query_params.values("tag").collect::<Vec<_>>(),
        vec!["a", "b"]
    );
    assert_eq!(
        get.request_headers.values("Connection").collect::<Vec<_>>(),
        vec!["keep-alive"]
    );
    assert_eq!(
        get.response_headers
            .values("Content-Type")
            .collect::<Vec<_>>(),
        vec!["application/json"]
    );
    let body: serde_json::Value = serde_json::from_slice(&get.response_body).unwrap();
    assert_eq!(body["args"]["name"], serde_json::json!(["bob"]));
    assert_eq!(get.sdk_type, SdkType::PythonFlask);
    assert_eq!(get.service_version.as_deref(), Some("2.1.0"));
    assert_eq!(get.tags, vec!["env:test", "k8s.pod:shop-1"]);
    assert!(get.duration > 0);
    assert!(
        get.timestamp.starts_with("2023-11-14T"),
        "{}",
        get.timestamp
    );

    assert_eq!(
        payloads[1].request_body,
        br#"{"user": "bob", "password": "hunter2"}"#
    );
    assert_eq!(payloads[2].request_body, b"{\"part\": 1}\ntail");
    assert_eq!(
        payloads[2]
            .request_headers
            .values("Transfer-Encoding")
            .collect::<Vec<_>>(),
        vec!["chunked"]
    );
    assert!(payloads[3].response_body.is_empty(), "HEAD has no body");
    for (index, payload) in payloads[4..].iter().enumerate() {
        let body: serde_json::Value = serde_json::from_slice(&payload.response_body).unwrap();
        assert_eq!(body["item"], index, "pipelined responses pair in order");
    }
    let ids: std::collections::HashSet<Uuid> = payloads.iter().map(|p| p.msg_id).collect();
    assert_eq!(ids.len(), payloads.len());
}

#[test]
fn redaction_rules_apply_to_the_replayed_session() {
    let redactor = Redactor::new(&["user-agent".into()], &["$.password".into()], &[]).unwrap();
    let payloads = replay_with(recorded_events(), redactor);
    let login: serde_json::Value = serde_json::from_slice(&payloads[1].request_body).unwrap();
    assert_eq!(
        login,
        serde_json::json!({"user": "bob", "password": REDACTED})
    );
    // The first four requests came from python-requests, which sends a User-Agent.
    assert!(
        payloads[..4]
            .iter()
            .all(|p| p.request_headers.values("User-Agent").collect::<Vec<_>>() == vec![REDACTED])
    );
    // The chunked upload is not JSON: with request-body rules it is withheld, not sent.
    assert!(payloads[2].request_body.is_empty());
    assert!(
        payloads[2]
            .tags
            .contains(&TAG_REQUEST_BODY_WITHHELD.to_owned())
    );
    // Bodiless requests have nothing to withhold.
    assert!(
        !payloads[0]
            .tags
            .contains(&TAG_REQUEST_BODY_WITHHELD.to_owned())
    );
}

/// Every data event cut into one-byte events at their own positions.
fn one_byte_per_event(events: Vec<Event>) -> Vec<Event> {
    let mut split = Vec::new();
    for event in events {
        match event {
            Event::Data(data) if data.data.len() > 1 => {
                for (offset, byte) in data.data.iter().enumerate() {
                    let mut piece = data.clone();
                    piece.position += offset as u64;
                    piece.data = Bytes::copy_from_slice(&[*byte]);
                    split.push(Event::Data(piece));
                }
            }
            other => split.push(other),
        }
    }
    split
}

#[test]
fn rechunking_every_record_into_single_bytes_changes_nothing() {
    let whole = replay(recorded_events());
    let rechunked = replay(one_byte_per_event(recorded_events()));
    assert_eq!(rechunked.len(), whole.len());
    for (a, b) in whole.iter().zip(&rechunked) {
        let mut b = b.clone();
        // Fresh ids each run (and the span ids made from them).
        b.msg_id = a.msg_id;
        b.span = a.span;
        assert_eq!(*a, b);
    }
}

#[test]
fn the_recording_format_round_trips() {
    for event in recorded_events() {
        let line = serde_json::to_string(&event).unwrap();
        assert_eq!(serde_json::from_str::<Event>(&line).unwrap(), event);
    }
}

#[test]
fn recorded_node_https_session_yields_the_plaintext_exchanges() {
    let (payloads, pipeline) = replay_fixture("node_https_session.ndjson", SdkType::SDKUnknown);
    assert_eq!(
        summary(&payloads),
        vec![
            ("GET", "/hello?name=bob", 200),
            ("POST", "/echo", 200),
            ("POST", "/echo", 200)
        ]
    );
    assert_eq!(payloads[0].host, "127.0.0.1:5443");
    assert_eq!(
        payloads[0]
            .request_headers
            .values("X-Request-Tag")
            .collect::<Vec<_>>(),
        vec!["t1"]
    );
    assert_eq!(payloads[1].request_body, br#"{"name": "bob"}"#);
    let big = "x".repeat(40000);
    assert_eq!(payloads[2].request_body, big.as_bytes());
    let response: serde_json::Value = serde_json::from_slice(&payloads[2].response_body).unwrap();
    assert_eq!(response["received"], big);
    let stats = pipeline.stats();
    assert_eq!(stats.tls_connections, 1);
    assert_eq!(
        (stats.malformed_messages, stats.not_http_connections),
        (0, 0)
    );
}

/// werkzeug serving 4 concurrent `/proxy` requests, each calling node over plain HTTP from its
/// own thread, then `/boom` printing a traceback.
#[test]
fn recorded_outgoing_calls_and_errors_link_to_their_requests() {
    let (payloads, pipeline) =
        replay_fixture("flask_outgoing_session.ndjson", SdkType::PythonFlask);
    let incoming: Vec<&Payload> = payloads
        .iter()
        .filter(|p| p.sdk_type == SdkType::PythonFlask)
        .collect();
    let outgoing: Vec<&Payload> = payloads
        .iter()
        .filter(|p| p.sdk_type == SdkType::PythonOutgoing)
        .collect();
    assert_eq!((incoming.len(), outgoing.len()), (5, 4));
    for call in &outgoing {
        let parent = incoming
            .iter()
            .find(|p| Some(p.msg_id) == call.parent_id)
            .expect("every outgoing call has its parent");
        // Its span is the child of the parent's span, in the parent's trace.
        assert_eq!(call.span.kind, SpanKind::Client);
        assert_eq!(parent.span.kind, SpanKind::Server);
        assert_eq!(call.span.trace_id, parent.span.trace_id);
        assert_eq!(call.span.parent_span_id, Some(parent.span.span_id));
        assert_eq!(parent.span.parent_span_id, None);
        assert_eq!(&*call.service_name, "shop");
        // The parent proxied exactly this call: its URL names the upstream path.
        let upstream_path = call.raw_url.replace('/', "%2F");
        assert!(
            parent.raw_url.ends_with(&upstream_path),
            "{}",
            parent.raw_url
        );
        let proxied: serde_json::Value = serde_json::from_slice(&parent.response_body).unwrap();
        assert_eq!(
            proxied["upstream_body"].as_str().unwrap().as_bytes(),
            call.response_body
        );
    }
    let boom = incoming.iter().find(|p| p.url_path == "/boom").unwrap();
    assert_eq!(boom.errors.len(), 1);
    assert_eq!(boom.errors[0].error_type, "ValueError");
    assert_eq!(boom.errors[0].message, "boom on purpose");
    assert!(
        incoming
            .iter()
            .filter(|p| p.url_path != "/boom")
            .all(|p| p.errors.is_empty())
    );
    assert_eq!(pipeline.link_stats().outgoing_with_parent, 4);
}

/// A redacted `--record` of the session, as the live capture writes it: each event after the
/// pipeline handled it.
fn redacted_recording(events: Vec<Event>, redactor: Redactor) -> Vec<Event> {
    let mut pipeline = pipeline(SdkType::PythonFlask, redactor);
    let mut recording = RedactedEvents::default();
    let mut recorded: Vec<Event> = events
        .into_iter()
        .flat_map(|event| {
            let output = pipeline.feed(event.clone());
            recording.events(event, &output)
        })
        .collect();
    recorded.extend(recording.released(&pipeline.flush()));
    recorded
}

fn recorded_bytes(events: &[Event]) -> Vec<u8> {
    events
        .iter()
        .filter_map(|event| match event {
            Event::Data(data) => Some(data.data.to_vec()),
            _ => None,
        })
        .flatten()
        .collect()
}

#[test]
fn a_redacted_recording_holds_no_redacted_value_and_replays_to_the_same_payloads() {
    // `/echo` answers with the request's JSON: its password is in both bodies.
    let rules = || {
        Redactor::new(
            &["user-agent".into()],
            &["$.password".into()],
            &["$..password".into()],
        )
        .unwrap()
    };
    let live = replay_with(recorded_events(), rules());
    let raw = recorded_bytes(&recorded_events());
    let recording = redacted_recording(recorded_events(), rules());
    let written = recorded_bytes(&recording);
    for secret in ["hunter2", "python-requests", "tail"] {
        let found = |bytes: &[u8]| bytes.windows(secret.len()).any(|w| w == secret.as_bytes());
        assert!(found(&raw), "the raw session holds {secret}");
        assert!(!found(&written), "the redacted recording holds {secret}");
    }

    let replayed = replay(recording);
    assert_eq!(summary(&replayed), summary(&live));
    let framing = ["content-length", "transfer-encoding"];
    let without_framing = |headers: &HeaderMap| -> Vec<(String, Vec<String>)> {
        headers
            .groups()
            .filter(|(name, _)| !framing.contains(&name.to_ascii_lowercase().as_str()))
            .map(|(name, values)| (name.to_owned(), values.map(str::to_owned).collect()))
            .collect()
    };
    for (live, replayed) in live.iter().zip(&replayed) {
        assert_eq!(
            without_framing(&replayed.request_headers),
            without_framing(&live.request_headers)
        );
        assert_eq!(
            without_framing(&replayed.response_headers),
            without_framing(&live.response_headers)
        );
        assert_eq!(replayed.request_body, live.request_body);
        assert_eq!(replayed.response_body, live.response_body);
        assert_eq!(
            (replayed.timestamp.as_str(), replayed.duration),
            (live.timestamp.as_str(), live.duration)
        );
    }
    let login: serde_json::Value = serde_json::from_slice(&replayed[1].request_body).unwrap();
    assert_eq!(login["password"], REDACTED);
    assert_eq!(
        replayed[3].response_headers, live[3].response_headers,
        "HEAD keeps its length"
    );
}

/// Outgoing calls, their failures and the streams of other connections replay from a redacted
/// recording too (their links to parents do not: see `RedactedEvents`).
#[test]
fn a_redacted_recording_keeps_outgoing_calls() {
    let events = fixture_events("flask_outgoing_session.ndjson");
    let (live, _) = replay_fixture("flask_outgoing_session.ndjson", SdkType::PythonFlask);
    let replayed = replay(redacted_recording(events, Redactor::default()));
    let sorted = |payloads: &[Payload]| {
        let mut summary: Vec<_> = payloads
            .iter()
            .map(|p| {
                (
                    format!("{:?}", p.sdk_type),
                    p.method.clone(),
                    p.raw_url.clone(),
                    p.status_code,
                    p.response_body.clone(),
                )
            })
            .collect();
        summary.sort();
        summary
    };
    assert_eq!(sorted(&replayed), sorted(&live));
}

/// node's http2 server over h2c: curl's GET, then a node client's 3 concurrent POSTs and a
/// stream it reset, all on one connection each.
#[test]
fn recorded_h2c_session_yields_one_payload_per_stream() {
    let (payloads, pipeline) = replay_fixture("node_h2c_session.ndjson", SdkType::SDKUnknown);
    assert_eq!(
        summary(&payloads),
        vec![
            ("GET", "/hello?name=bob", 200),
            ("POST", "/echo/0?n=0", 200),
            ("POST", "/echo/1?n=1", 200),
            ("POST", "/echo/2?n=2", 200),
            ("GET", "/slow", 0),
        ]
    );
    for payload in &payloads {
        assert_eq!((payload.proto_major, payload.proto_minor), (2, 0));
        assert!(payload.host.starts_with("127.0.0.1:"));
        assert!(
            payload
                .request_headers
                .groups()
                .all(|(name, _)| !name.starts_with(':'))
        );
    }
    assert_eq!(
        payloads[0]
            .request_headers
            .values("x-request-tag")
            .collect::<Vec<_>>(),
        vec!["t1"]
    );
    for (n, payload) in payloads[1..4].iter().enumerate() {
        let sent: serde_json::Value = serde_json::from_slice(&payload.request_body).unwrap();
        assert_eq!(sent["stream"], n);
        let answer: serde_json::Value = serde_json::from_slice(&payload.response_body).unwrap();
        let received: serde_json::Value =
            serde_json::from_str(answer["received"].as_str().unwrap()).unwrap();
        assert_eq!(received, sent);
    }
    assert_eq!(payloads[4].errors[0].error_type, "StreamReset");
    assert_eq!(pipeline.stats().malformed_messages, 0);

    // One byte per event changes nothing: frames split anywhere reassemble the same.
    let split = one_byte_per_event(fixture_events("node_h2c_session.ndjson"));
    assert_eq!(summary(&replay(split)), summary(&payloads));
}

const SERVER_TGID: u32 = 40;
const LOOP_TID: u32 = 41;

fn server_conn(fd: i32) -> ConnId {
    ConnId {
        tgid: SERVER_TGID,
        fd,
        generation: 1,
    }
}

fn opened(fd: i32, at: u64) -> Event {
    Event::Open {
        conn: server_conn(fd),
        timestamp_ns: at,
        role: Role::Server,
        remote: None,
        midstream: false,
    }
}

/// Bytes at the start of a direction of a connection (or of stderr, fd 2), by the loop thread.
fn moved(fd: i32, direction: Direction, bytes: &[u8], at: u64) -> Event {
    Event::Data(DataEvent {
        conn: server_conn(fd),
        tid: LOOP_TID,
        goroutine: 0,
        timestamp_ns: at,
        direction,
        source: if fd == 2 {
            Source::Stderr
        } else {
            Source::Syscall
        },
        position: 0,
        skipped_len: 0,
        data: Bytes::copy_from_slice(bytes),
    })
}

/// One exchange served on a fresh connection, as the kernel would report it.
fn served(fd: i32, request: &[u8], response: &[u8], at: u64) -> Vec<Event> {
    vec![
        opened(fd, at),
        moved(fd, Direction::Ingress, request, at + 1_000),
        moved(fd, Direction::Egress, response, at + 2_000),
        Event::Close {
            conn: server_conn(fd),
            timestamp_ns: at + 3_000,
            bytes_sent: response.len() as u64,
            bytes_received: request.len() as u64,
            tls_bytes_sent: 0,
            tls_bytes_received: 0,
        },
    ]
}

/// A url-encoded login and a multipart upload, each answered in plain text.
fn form_session() -> Vec<Event> {
    let login = "POST /login HTTP/1.1\r\nHost: shop\r\n\
Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 34\r\n\r\n\
user=bob&password=hunter2&remember";
    let multipart = "--b0undary\r\nContent-Disposition: form-data; name=\"password\"\r\n\r\nhunter2\r\n\
--b0undary\r\nContent-Disposition: form-data; name=\"doc\"; filename=\"a.pdf\"\r\n\
Content-Type: application/pdf\r\n\r\n%PDF-1.7 hunter2\r\n--b0undary--\r\n";
    let upload = format!(
        "POST /upload HTTP/1.1\r\nHost: shop\r\nContent-Type: multipart/form-data; boundary=b0undary\r\n\
Content-Length: {}\r\n\r\n{multipart}",
        multipart.len()
    );
    let text = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 16\r\n\r\npassword=hunter2";
    let mut events = served(5, login.as_bytes(), text, 1_000_000);
    events.extend(served(6, upload.as_bytes(), text, 2_000_000));
    events
}

#[test]
fn form_bodies_are_redacted_as_json_and_a_text_body_is_sent_as_it_is() {
    let rules = || Redactor::new(&[], &["$.password".into()], &["$.password".into()]).unwrap();
    let live = replay_with(form_session(), rules());
    assert_eq!(live.len(), 2);
    let json = |body: &[u8]| serde_json::from_slice::<serde_json::Value>(body).unwrap();
    assert_eq!(
        json(&live[0].request_body),
        serde_json::json!({"user": "bob", "password": REDACTED, "remember": ""})
    );
    assert_eq!(
        json(&live[1].request_body),
        serde_json::json!({
            "password": REDACTED,
            "doc": {"filename": "a.pdf", "content_type": "application/pdf", "size": 16}
        })
    );
    for payload in &live {
        assert_eq!(payload.request_body_kind, BodyKind::Form);
        assert_eq!(payload.response_body, b"password=hunter2");
        assert!(payload.tags.iter().all(|tag| !tag.contains("withheld")));
    }

    // The redacted recording writes the forms as the JSON they became, and replays to them.
    let recording = redacted_recording(form_session(), rules());
    let written = String::from_utf8_lossy(&recorded_bytes(&recording)).into_owned();
    assert_eq!(
        written.matches("hunter2").count(),
        2,
        "only the text bodies"
    );
    let replayed = replay(recording);
    for (live, replayed) in live.iter().zip(&replayed) {
        assert_eq!(replayed.request_body, live.request_body);
        assert_eq!(
            replayed
                .request_headers
                .values("Content-Type")
                .collect::<Vec<_>>(),
            ["application/json"]
        );
    }
}

/// uvicorn serving FastAPI: one event-loop thread answers a failing route with a 500, then
/// logs the traceback a few milliseconds later.
fn event_loop_pipeline() -> Pipeline {
    let scope = CaptureScope {
        outgoing: true,
        errors: true,
    };
    let profile = ProcessProfile::new(SdkType::PythonFastApi, false);
    Pipeline::new(
        settings(),
        scope,
        Redactor::default(),
        Profiles::Everyone(profile),
    )
}

const GET_BOOM: &[u8] = b"GET /boom HTTP/1.1\r\nHost: api\r\n\r\n";
const GET_SLOW: &[u8] = b"GET /slow HTTP/1.1\r\nHost: api\r\n\r\n";
const SERVER_ERROR: &[u8] =
    b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain\r\ncontent-length: 21\r\n\r\nInternal Server Error";
const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
const ASGI_TRACEBACK: &str = "ERROR:    Exception in ASGI application
Traceback (most recent call last):
  File \"/srv/fastapi_app.py\", line 33, in boom
    raise ValueError(\"fastapi boom on purpose\")
ValueError: fastapi boom on purpose
";
const MS: u64 = 1_000_000;

fn traceback(at: u64) -> Event {
    moved(2, Direction::Egress, ASGI_TRACEBACK.as_bytes(), at)
}

fn feed_all(pipeline: &mut Pipeline, events: Vec<Event>) -> Vec<Payload> {
    events
        .into_iter()
        .flat_map(|event| pipeline.feed(event).payloads)
        .collect()
}

#[test]
fn a_traceback_printed_after_a_500_joins_it_and_not_the_request_in_flight() {
    let mut pipeline = event_loop_pipeline();
    let start = 1_000 * MS;
    // /slow is read and in flight on the loop; /boom is answered 500; the traceback follows.
    let mut events = vec![
        opened(7, start),
        moved(7, Direction::Ingress, GET_SLOW, start + MS),
    ];
    events.extend(served(8, GET_BOOM, SERVER_ERROR, start + 2 * MS));
    let before_traceback = feed_all(&mut pipeline, events);
    assert!(
        before_traceback.is_empty(),
        "the 500 waits for its traceback"
    );
    assert_eq!(
        pipeline.next_release_ns(),
        Some(start + 2 * MS + 2_000 + ERROR_HOLD_NS)
    );
    let with_traceback = feed_all(&mut pipeline, vec![traceback(start + 7 * MS)]);
    let slow = feed_all(
        &mut pipeline,
        vec![moved(7, Direction::Egress, OK, start + 9 * MS)],
    );

    let [boom] = &with_traceback[..] else {
        panic!("{with_traceback:?}")
    };
    assert_eq!(boom.status_code, 500);
    assert_eq!(boom.errors.len(), 1);
    assert_eq!(
        (
            boom.errors[0].error_type.as_str(),
            boom.errors[0].message.as_str()
        ),
        ("ValueError", "fastapi boom on purpose")
    );
    let [slow] = &slow[..] else {
        panic!("{slow:?}")
    };
    assert_eq!((slow.url_path.as_str(), slow.errors.len()), ("/slow", 0));
    let stats = pipeline.link_stats();
    assert_eq!(
        (
            stats.held_5xx,
            stats.held_errors_attached,
            stats.held_released_without_error
        ),
        (1, 1, 0)
    );
    assert_eq!(pipeline.next_release_ns(), None);
}

#[test]
fn a_held_500_is_released_on_time_without_an_error_it_cannot_be_sure_of() {
    let mut pipeline = event_loop_pipeline();
    let start = 1_000 * MS;
    // Two 500s wait at once: the traceback is neither's.
    let mut events = served(8, GET_BOOM, SERVER_ERROR, start);
    events.extend(served(9, GET_BOOM, SERVER_ERROR, start + MS));
    events.push(traceback(start + 5 * MS));
    assert!(feed_all(&mut pipeline, events).is_empty());
    assert!(
        pipeline.tick(start + ERROR_HOLD_NS).payloads.is_empty(),
        "not due yet"
    );
    let released = pipeline.tick(start + MS + ERROR_HOLD_NS + 3_000).payloads;
    assert_eq!(released.len(), 2);
    assert!(
        released
            .iter()
            .all(|p| p.status_code == 500 && p.errors.is_empty())
    );

    // Any later event ends a wait that is over: a traceback after it joins nothing.
    let late = start + 100 * MS;
    assert!(feed_all(&mut pipeline, served(10, GET_BOOM, SERVER_ERROR, late)).is_empty());
    let released = feed_all(
        &mut pipeline,
        vec![opened(11, late + ERROR_HOLD_NS + 3_000)],
    );
    assert_eq!(released.len(), 1);
    assert!(released[0].errors.is_empty());
    assert!(feed_all(&mut pipeline, vec![traceback(late + ERROR_HOLD_NS + 4_000)]).is_empty());

    // A process that ends, or a shutdown, releases what waits.
    assert!(
        feed_all(
            &mut pipeline,
            served(12, GET_BOOM, SERVER_ERROR, late + 200 * MS)
        )
        .is_empty()
    );
    assert_eq!(pipeline.flush().payloads.len(), 1);
    let stats = pipeline.link_stats();
    assert_eq!(
        (
            stats.held_5xx,
            stats.held_errors_attached,
            stats.held_released_without_error
        ),
        (4, 0, 4)
    );
    assert_eq!(stats.errors_unattached, 2);
}

#[test]
fn where_a_thread_serves_one_request_its_traceback_still_joins_it_first() {
    // gunicorn sync: the worker prints the traceback while serving, then answers 500.
    let mut pipeline = pipeline(SdkType::PythonFlask, Redactor::default());
    let start = 1_000 * MS;
    let mut events = vec![
        opened(8, start),
        moved(8, Direction::Ingress, GET_BOOM, start + MS),
        traceback(start + 2 * MS),
        moved(8, Direction::Egress, SERVER_ERROR, start + 3 * MS),
    ];
    events.extend(served(9, GET_BOOM, SERVER_ERROR, start + 4 * MS));
    let payloads = feed_all(&mut pipeline, events);
    let [boom] = &payloads[..] else {
        panic!("{payloads:?}")
    };
    assert_eq!(boom.errors.len(), 1, "not held: it has its error");
    // The second 500 had none and waits. Another thread's traceback (a scheduler's) is not
    // its: it stays held.
    let mut elsewhere = traceback(start + 5 * MS);
    if let Event::Data(data) = &mut elsewhere {
        data.tid = LOOP_TID + 1;
    }
    assert!(feed_all(&mut pipeline, vec![elsewhere]).is_empty());
    // A traceback the serving thread prints outside any request joins it.
    let payloads = feed_all(&mut pipeline, vec![traceback(start + 6 * MS)]);
    assert_eq!(payloads.len(), 1);
    assert_eq!(payloads[0].errors.len(), 1);
}
