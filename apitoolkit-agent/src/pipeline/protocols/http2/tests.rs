use super::{
    frames::{flag, kind, tests::frame},
    *,
};
use crate::pipeline::protocols::{Reassembler, message::Body};

impl Reassembler {
    /// Pushes a copy of `data`, as a record of its own.
    fn push_copy(&mut self, kind: MessageKind, data: &[u8], at: u64, output: &mut Reassembled) {
        self.push(kind, bytes::Bytes::copy_from_slice(data), at, output);
    }
}

const MAX_BODY: usize = 1 << 20;

type Encoder = httlib_hpack::Encoder<'static>;

/// A header block as an HTTP/2 peer encodes it: every field indexed (static or dynamic table)
/// where it can be, else a Huffman-coded literal added to the dynamic table.
pub(super) fn encode(encoder: &mut Encoder, headers: &[(&str, &str)]) -> Vec<u8> {
    let flags = Encoder::BEST_FORMAT | Encoder::WITH_INDEXING | Encoder::HUFFMAN_VALUE;
    let mut block = Vec::new();
    for (name, value) in headers {
        encoder
            .encode(
                (name.as_bytes().to_vec(), value.as_bytes().to_vec(), flags),
                &mut block,
            )
            .expect("encodable");
    }
    block
}

/// Both directions of a connection, encoded as a real client and server would (each with its
/// own HPACK table).
struct Wire {
    client: Vec<u8>,
    server: Vec<u8>,
    client_hpack: Encoder,
    server_hpack: Encoder,
}

impl Wire {
    fn new() -> Self {
        let mut client = PREFACE.to_vec();
        client.extend(frame(kind::SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]));
        Self {
            client,
            server: frame(kind::SETTINGS, 0, 0, &[]),
            client_hpack: Encoder::default(),
            server_hpack: Encoder::default(),
        }
    }

    fn block(encoder: &mut Encoder, headers: &[(&str, &str)]) -> Vec<u8> {
        encode(encoder, headers)
    }

    fn request(&mut self, stream: u32, headers: &[(&str, &str)], end_stream: bool) {
        let block = Self::block(&mut self.client_hpack, headers);
        let flags = flag::END_HEADERS | if end_stream { flag::END_STREAM } else { 0 };
        self.client
            .extend(frame(kind::HEADERS, flags, stream, &block));
    }

    fn response(&mut self, stream: u32, headers: &[(&str, &str)], end_stream: bool) {
        let block = Self::block(&mut self.server_hpack, headers);
        let flags = flag::END_HEADERS | if end_stream { flag::END_STREAM } else { 0 };
        self.server
            .extend(frame(kind::HEADERS, flags, stream, &block));
    }

    fn data(bytes: &mut Vec<u8>, stream: u32, payload: &[u8], end_stream: bool) {
        let flags = if end_stream { flag::END_STREAM } else { 0 };
        bytes.extend(frame(kind::DATA, flags, stream, payload));
    }
}

fn get(path: &str) -> Vec<(&str, &str)> {
    vec![
        (":method", "GET"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "api.test"),
        ("user-agent", "curl/8"),
    ]
}

fn ok() -> Vec<(&'static str, &'static str)> {
    vec![(":status", "200"), ("content-type", "application/json")]
}

/// Feeds the client's bytes, then the server's, in pieces of `piece` bytes.
fn reassemble(wire: &Wire, piece: usize) -> Reassembled {
    let mut connection = Http2Connection::new(MAX_BODY);
    let mut output = Reassembled::default();
    for chunk in wire.client.chunks(piece) {
        connection.push(MessageKind::Request, chunk, 1, &mut output);
    }
    for chunk in wire.server.chunks(piece) {
        connection.push(MessageKind::Response, chunk, 2, &mut output);
    }
    output
}

fn target(message: &Message) -> &str {
    match &message.start {
        StartLine::Request { target, .. } => target,
        StartLine::Response { .. } => panic!("a request"),
    }
}

#[test]
fn a_stream_becomes_one_exchange_with_pseudo_headers_out_of_the_headers() {
    let mut wire = Wire::new();
    wire.request(
        1,
        &[
            (":method", "POST"),
            (":scheme", "https"),
            (":path", "/echo?x=1"),
            (":authority", "api.test:8443"),
            ("content-type", "application/json"),
        ],
        false,
    );
    Wire::data(&mut wire.client, 1, br#"{"a":"#, false);
    Wire::data(&mut wire.client, 1, br#"1}"#, true);
    wire.response(1, &ok(), false);
    Wire::data(&mut wire.server, 1, b"{}", true);
    let output = reassemble(&wire, usize::MAX);
    assert_eq!(output.anomalies, vec![]);
    let [exchange] = output.exchanges.as_slice() else {
        panic!("one exchange: {:?}", output.exchanges);
    };
    assert_eq!(exchange.serial, 1);
    assert_eq!(
        exchange.request.start,
        StartLine::Request {
            method: "POST".into(),
            target: "/echo?x=1".into()
        }
    );
    assert_eq!(exchange.request.authority.as_deref(), Some("api.test:8443"));
    assert_eq!(exchange.request.version, Version::HTTP_2);
    assert_eq!(
        exchange.request.headers.to_pairs(),
        vec![("content-type".to_owned(), "application/json".to_owned())]
    );
    assert_eq!(exchange.request.body.bytes, br#"{"a":1}"#);
    assert_eq!(exchange.response.status(), Some(200));
    assert_eq!(
        exchange.response.body,
        Body {
            bytes: b"{}".to_vec(),
            truncated: false,
            incomplete: false
        }
    );
    assert_eq!(
        (
            exchange.request.first_byte_ns,
            exchange.response.last_byte_ns
        ),
        (1, 2)
    );
}

#[test]
fn twenty_interleaved_streams_never_swap_bodies_however_the_bytes_are_split() {
    let mut wire = Wire::new();
    let ids: Vec<u32> = (0..20).map(|n| 1 + 2 * n).collect();
    for &id in &ids {
        wire.request(id, &get(&format!("/item/{id}")), true);
    }
    for &id in &ids {
        wire.response(id, &ok(), false);
    }
    // Bodies arrive in three rounds, every stream's piece in each round.
    for round in 0..3 {
        for &id in ids.iter().rev() {
            let piece = format!("[{id}:{round}]");
            Wire::data(&mut wire.server, id, piece.as_bytes(), round == 2);
        }
    }
    for piece in [usize::MAX, 7, 1] {
        let output = reassemble(&wire, piece);
        assert_eq!(output.exchanges.len(), 20, "pieces of {piece}");
        for exchange in &output.exchanges {
            let id = exchange.serial;
            assert_eq!(target(&exchange.request), format!("/item/{id}"));
            assert_eq!(
                String::from_utf8_lossy(&exchange.response.body.bytes),
                format!("[{id}:0][{id}:1][{id}:2]")
            );
            // The HPACK dynamic table carried the repeated headers after the first stream.
            assert_eq!(
                exchange.request.headers.to_pairs(),
                vec![("user-agent".to_owned(), "curl/8".to_owned())]
            );
        }
    }
}

#[test]
fn continuation_frames_and_grpc_trailers_complete_the_headers() {
    let mut wire = Wire::new();
    let block = Wire::block(
        &mut wire.client_hpack,
        &[
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/shop.Catalog/Get"),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ],
    );
    let (first, rest) = block.split_at(block.len() / 2);
    wire.client.extend(frame(kind::HEADERS, 0, 1, first));
    wire.client
        .extend(frame(kind::CONTINUATION, flag::END_HEADERS, 1, rest));
    let message = [0u8, 0, 0, 0, 2, 8, 7];
    Wire::data(&mut wire.client, 1, &message, true);
    wire.response(
        1,
        &[(":status", "200"), ("content-type", "application/grpc")],
        false,
    );
    let trailers = Wire::block(
        &mut wire.server_hpack,
        &[("grpc-status", "5"), ("grpc-message", "no%20such%20item")],
    );
    wire.server.extend(frame(
        kind::HEADERS,
        flag::END_HEADERS | flag::END_STREAM,
        1,
        &trailers,
    ));
    let output = reassemble(&wire, 5);
    let [exchange] = output.exchanges.as_slice() else {
        panic!("one exchange: {output:?}");
    };
    assert_eq!(target(&exchange.request), "/shop.Catalog/Get");
    assert_eq!(exchange.request.body.bytes, message);
    assert_eq!(exchange.response.header("grpc-status"), Some("5"));
    assert_eq!(
        exchange.response.header("grpc-message"),
        Some("no%20such%20item")
    );
    assert!(exchange.response.body.bytes.is_empty());
}

#[test]
fn a_reset_stream_is_an_exchange_with_its_code_and_other_streams_carry_on() {
    let mut wire = Wire::new();
    wire.request(1, &get("/slow"), true);
    wire.request(3, &get("/fast"), true);
    wire.client
        .extend(frame(kind::RST_STREAM, 0, 1, &8u32.to_be_bytes()));
    wire.response(3, &ok(), true);
    let output = reassemble(&wire, usize::MAX);
    let summary: Vec<_> = output
        .exchanges
        .iter()
        .map(|e| (target(&e.request), e.response.status(), e.reset))
        .collect();
    assert_eq!(
        summary,
        vec![("/slow", Some(0), Some(8)), ("/fast", Some(200), None)]
    );
    assert!(output.exchanges[0].response.body.incomplete);
}

#[test]
fn a_body_of_its_declared_length_is_whole_though_the_stream_never_ended() {
    let mut wire = Wire::new();
    wire.request(1, &get("/a"), true);
    wire.request(3, &get("/b"), true);
    wire.response(1, &[(":status", "200"), ("content-length", "5")], false);
    Wire::data(&mut wire.server, 1, b"hello", false);
    wire.response(3, &[(":status", "200"), ("content-length", "9")], false);
    Wire::data(&mut wire.server, 3, b"cut", false);
    // The client closes before the server's empty END_STREAM frames.
    let mut connection = Http2Connection::new(MAX_BODY);
    let mut output = Reassembled::default();
    connection.push(MessageKind::Request, &wire.client, 1, &mut output);
    connection.push(MessageKind::Response, &wire.server, 2, &mut output);
    connection.close(&mut output);
    let summary: Vec<_> = output
        .exchanges
        .iter()
        .map(|e| (target(&e.request), e.response.body.incomplete))
        .collect();
    assert_eq!(summary, vec![("/a", false), ("/b", true)]);
}

#[test]
fn informational_responses_are_skipped_and_padding_is_not_body() {
    let mut wire = Wire::new();
    wire.request(
        1,
        &[
            (":method", "POST"),
            (":path", "/up"),
            ("expect", "100-continue"),
        ],
        false,
    );
    wire.response(1, &[(":status", "100")], false);
    let mut padded = vec![4u8];
    padded.extend_from_slice(b"data");
    padded.extend_from_slice(&[0; 4]);
    wire.client.extend(frame(
        kind::DATA,
        flag::PADDED | flag::END_STREAM,
        1,
        &padded,
    ));
    wire.response(1, &[(":status", "201")], true);
    let output = reassemble(&wire, usize::MAX);
    assert_eq!(output.exchanges.len(), 1);
    assert_eq!(output.exchanges[0].response.status(), Some(201));
    assert_eq!(output.exchanges[0].request.body.bytes, b"data");
}

#[test]
fn a_gap_inside_data_marks_the_body_and_one_between_frames_loses_only_open_streams() {
    let mut wire = Wire::new();
    wire.request(1, &get("/big"), true);
    wire.response(1, &ok(), false);
    let body_start = wire.server.len() + frames::HEADER_LEN;
    Wire::data(&mut wire.server, 1, &[b'x'; 1000], true);
    let mut connection = Http2Connection::new(MAX_BODY);
    let mut output = Reassembled::default();
    connection.push(MessageKind::Request, &wire.client, 1, &mut output);
    connection.push(
        MessageKind::Response,
        &wire.server[..body_start + 100],
        2,
        &mut output,
    );
    connection.gap(MessageKind::Response, 800, &mut output);
    connection.push(
        MessageKind::Response,
        &wire.server[body_start + 900..],
        3,
        &mut output,
    );
    let [exchange] = output.exchanges.as_slice() else {
        panic!("one exchange: {output:?}");
    };
    assert_eq!(exchange.response.body.bytes.len(), 200);
    assert!(exchange.response.body.incomplete);

    // Lost between frames: the open stream is counted, never completed from later frames;
    // reading resumes at a push of whole frames, with the table from before forgotten.
    let mut wire = Wire::new();
    wire.request(1, &get("/a"), true);
    wire.response(1, &ok(), false);
    let mut connection = Http2Connection::new(MAX_BODY);
    let mut output = Reassembled::default();
    connection.push(MessageKind::Request, &wire.client, 1, &mut output);
    connection.push(MessageKind::Response, &wire.server, 2, &mut output);
    connection.gap(MessageKind::Response, 50, &mut output);
    let mut later = Vec::new();
    Wire::data(&mut later, 1, b"not to be trusted", true);
    connection.push(MessageKind::Response, &later, 3, &mut output);
    assert!(output.exchanges.is_empty());
    assert!(output.anomalies.contains(&Anomaly::Desync));
    assert!(
        output
            .anomalies
            .contains(&Anomaly::Unpaired(MessageKind::Request))
    );
}

#[test]
fn an_undecodable_header_block_loses_its_stream_and_the_table_before_it() {
    let mut wire = Wire::new();
    wire.request(
        1,
        &[
            (":method", "GET"),
            (":path", "/first"),
            ("x-tenant", "acme"),
        ],
        true,
    );
    wire.response(1, &ok(), true);
    // Index 90 is past the table: this block cannot be decoded, so the table may be off.
    wire.client.extend(frame(
        kind::HEADERS,
        flag::END_HEADERS | flag::END_STREAM,
        3,
        &[0x80 | 90],
    ));
    // x-tenant comes from the table as it was before the failure: unknown now, never guessed.
    wire.request(
        5,
        &[
            (":method", "GET"),
            (":path", "/after"),
            ("x-tenant", "acme"),
        ],
        true,
    );
    wire.response(5, &ok(), true);
    let output = reassemble(&wire, usize::MAX);
    let summary: Vec<_> = output
        .exchanges
        .iter()
        .map(|e| {
            (
                target(&e.request),
                e.headers_incomplete,
                e.request.headers.to_pairs(),
            )
        })
        .collect();
    let tenant = vec![("x-tenant".to_owned(), "acme".to_owned())];
    assert_eq!(
        summary,
        vec![("/first", false, tenant), ("/after", true, vec![])]
    );
    assert!(matches!(
        output.anomalies.as_slice(),
        [Anomaly::Malformed(MessageKind::Request, _)]
    ));
}

/// Both directions through the connection-level reassembler, as connections.rs drives it.
fn through_reassembler(client: &[&[u8]], server: &[&[u8]]) -> Reassembled {
    let mut reassembler = Reassembler::new(MAX_BODY);
    let mut output = Reassembled::default();
    for piece in client {
        reassembler.push_copy(MessageKind::Request, piece, 1, &mut output);
    }
    for piece in server {
        reassembler.push_copy(MessageKind::Response, piece, 2, &mut output);
    }
    output
}

#[test]
fn the_preface_switches_a_connection_to_http2_even_split_across_reads() {
    let mut wire = Wire::new();
    wire.request(1, &get("/prior"), true);
    wire.response(1, &ok(), true);
    let (a, rest) = wire.client.split_at(5);
    let (b, c) = rest.split_at(15);
    let output = through_reassembler(&[a, b, c], &[&wire.server]);
    assert_eq!(output.exchanges.len(), 1);
    assert_eq!(target(&output.exchanges[0].request), "/prior");

    // The server's SETTINGS may come first (node sends them on accept).
    let mut reassembler = Reassembler::new(MAX_BODY);
    let mut output = Reassembled::default();
    let (settings, answer) = wire.server.split_at(frames::HEADER_LEN);
    reassembler.push_copy(MessageKind::Response, settings, 1, &mut output);
    reassembler.push_copy(MessageKind::Request, &wire.client, 2, &mut output);
    reassembler.push_copy(MessageKind::Response, answer, 3, &mut output);
    assert_eq!(output.exchanges.len(), 1, "{output:?}");

    // A client that merely starts like the preface stays HTTP/1.
    let output = through_reassembler(
        &[b"P", b"UT /x HTTP/1.1\r\nContent-Length: 0\r\n\r\n"],
        &[b"HTTP/1.1 204 No Content\r\n\r\n"],
    );
    assert_eq!(output.exchanges.len(), 1);
    assert_eq!(output.exchanges[0].request.version, Version::HTTP_1_1);
}

#[test]
fn an_h2c_upgrade_answers_the_upgrading_request_on_stream_one() {
    let request =
        b"GET /up?q=1 HTTP/1.1\r\nHost: api.test\r\nConnection: Upgrade, HTTP2-Settings\r\n\
                    Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n";
    let switching =
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n";
    let mut wire = Wire::new();
    wire.response(1, &ok(), false);
    Wire::data(&mut wire.server, 1, b"{\"upgraded\":true}", true);
    wire.request(3, &get("/next"), true);
    wire.response(3, &ok(), true);
    // As on the wire: the client sends its preface once the 101 arrived.
    let mut reassembler = Reassembler::new(MAX_BODY);
    let mut output = Reassembled::default();
    reassembler.push_copy(MessageKind::Request, request, 1, &mut output);
    reassembler.push_copy(MessageKind::Response, switching, 2, &mut output);
    reassembler.push_copy(MessageKind::Request, &wire.client, 3, &mut output);
    reassembler.push_copy(MessageKind::Response, &wire.server, 4, &mut output);
    let summary: Vec<_> = output
        .exchanges
        .iter()
        .map(|e| (target(&e.request), e.response.status(), e.response.version))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("/up?q=1", Some(200), Version::HTTP_2),
            ("/next", Some(200), Version::HTTP_2)
        ],
        "the 101 is no exchange of its own"
    );
    assert_eq!(
        output.exchanges[0].response.body.bytes,
        b"{\"upgraded\":true}"
    );
    assert_eq!(output.exchanges[0].request.header("host"), Some("api.test"));
}

#[test]
fn a_connection_older_than_the_agent_gives_what_its_headers_allow_and_says_so() {
    let mut wire = Wire::new();
    let request = [
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/repeat"),
        (":authority", "api.test"),
        ("x-tenant", "acme"),
    ];
    wire.request(1, &request, true);
    wire.response(1, &[(":status", "200"), ("x-served-by", "node-1")], true);
    // The agent starts here: later frames refer to table entries made before.
    let (client_seen, server_seen) = (wire.client.len(), wire.server.len());
    wire.request(3, &request, true);
    wire.request(5, &get("/fresh"), true);
    wire.response(3, &[(":status", "200"), ("x-served-by", "node-1")], true);
    wire.response(5, &[(":status", "404"), ("x-served-by", "node-1")], true);

    let mut reassembler = Reassembler::midstream(MAX_BODY);
    let mut output = Reassembled::default();
    reassembler.push_copy(
        MessageKind::Request,
        &wire.client[client_seen..],
        1,
        &mut output,
    );
    reassembler.push_copy(
        MessageKind::Response,
        &wire.server[server_seen..],
        2,
        &mut output,
    );
    let summary: Vec<_> = output
        .exchanges
        .iter()
        .map(|e| {
            (
                target(&e.request),
                e.response.status(),
                e.headers_incomplete,
                e.request.headers.to_pairs(),
                e.response.headers.to_pairs(),
            )
        })
        .collect();
    // Only fields that were really sent, never another's value: :path /repeat, :authority,
    // x-tenant and x-served-by were indexed before the agent joined. Stream 3 has no known
    // path, so it is counted, not sent.
    let user_agent = vec![("user-agent".to_owned(), "curl/8".to_owned())];
    assert_eq!(
        summary,
        vec![("/fresh", Some(404), true, user_agent, vec![])]
    );
    assert_eq!(output.exchanges[0].request.authority, None);
    assert!(
        output
            .anomalies
            .contains(&Anomaly::Unpaired(MessageKind::Response))
    );

    // HTTP/1 on an old connection stays HTTP/1.
    let mut reassembler = Reassembler::midstream(MAX_BODY);
    let mut output = Reassembled::default();
    reassembler.push_copy(
        MessageKind::Request,
        b"GET /old HTTP/1.1\r\n\r\n",
        1,
        &mut output,
    );
    reassembler.push_copy(
        MessageKind::Response,
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        2,
        &mut output,
    );
    assert_eq!(output.exchanges.len(), 1);
    assert!(!frames::looks_like_frames(b"POST /x HTTP/1.1\r\n"));
    assert!(!frames::looks_like_frames(b"HTTP/1.1 200 OK\r\n"));
}

#[test]
fn a_pushed_response_is_an_exchange_of_the_promised_request() {
    let mut wire = Wire::new();
    wire.request(1, &get("/page"), true);
    let mut promise = 2u32.to_be_bytes().to_vec();
    promise.extend(Wire::block(&mut wire.server_hpack, &get("/style.css")));
    wire.server
        .extend(frame(kind::PUSH_PROMISE, flag::END_HEADERS, 1, &promise));
    wire.response(1, &ok(), false);
    Wire::data(&mut wire.server, 1, b"<html>", true);
    wire.response(
        2,
        &[(":status", "200"), ("content-type", "text/css")],
        false,
    );
    Wire::data(&mut wire.server, 2, b"body{}", true);
    let output = reassemble(&wire, 3);
    let summary: Vec<_> = output
        .exchanges
        .iter()
        .map(|e| (e.serial, target(&e.request), e.response.body.bytes.clone()))
        .collect();
    assert_eq!(
        summary,
        vec![
            (1, "/page", b"<html>".to_vec()),
            (2, "/style.css", b"body{}".to_vec())
        ]
    );
}

/// The fuzzer's find (a HEADERS block cut inside a literal, which a crate decoder indexed out
/// of bounds on): reassembled in one piece and in single bytes, without a panic.
#[test]
fn a_header_block_cut_inside_a_literal_is_malformed_not_a_crash() {
    let input = include_bytes!("../../../../../fuzz/seeds/http_reassembly/http2_cut_hpack_literal");
    let streams = &input[1..];
    let at = streams.windows(5).position(|w| w == b"\n~~~\n").unwrap();
    let (client, server) = (&streams[..at], &streams[at + 5..]);
    for piece in [usize::MAX, 1] {
        let mut reassembler = Reassembler::new(MAX_BODY);
        let mut output = Reassembled::default();
        for chunk in client.chunks(piece) {
            reassembler.push_copy(MessageKind::Request, chunk, 1, &mut output);
        }
        for chunk in server.chunks(piece) {
            reassembler.push_copy(MessageKind::Response, chunk, 2, &mut output);
        }
        reassembler.close(&mut output);
        assert!(
            output
                .anomalies
                .iter()
                .any(|anomaly| matches!(anomaly, Anomaly::Malformed(..)))
        );
    }
}
