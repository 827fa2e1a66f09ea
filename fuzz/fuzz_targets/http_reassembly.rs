//! HTTP reassembly (HTTP/1, and HTTP/2 when the request stream opens with its preface) under
//! arbitrary bytes and arbitrary chunking.
//!
//! Input: one byte seeding the chunk sizes, then the request stream, the separator `\n~~~\n`,
//! and the response stream (so seeds and findings stay readable text). Properties:
//! - nothing panics, whatever the bytes, the chunking, the gaps or the close;
//! - each exchange is a request paired with a response, bodies within the limit, HTTP/1
//!   exchanges in serial order, HTTP/2 ones never two of a stream; every exchange builds a
//!   payload written as valid JSON;
//! - a stream that reassembles cleanly in one piece gives the same exchanges in any chunking.
#![no_main]

use apitoolkit_agent::pipeline::{
    connections::TrackedExchange,
    events::{ConnId, Role},
    payload::{self, Links, PayloadSettings},
    profile::{ProcessProfile, SdkType},
    protocols::{
        Exchange, Reassembled, Reassembler,
        message::{MessageKind, StartLine},
    },
};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

const SEPARATOR: &[u8] = b"\n~~~\n";
const MAX_BODY_BYTES: usize = 256;

/// Deterministic chunk sizes from the seed byte (xorshift), 1 to 64 bytes.
struct Chunker(u32);

impl Chunker {
    fn next(&mut self) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        (self.0 % 64) as usize + 1
    }
}

enum Feed {
    Whole,
    Chunked(u8),
    /// Chunked, with a lost stretch of bytes wherever the seed says.
    WithGaps(u8),
}

fn reassemble(requests: &[u8], responses: &[u8], feed: &Feed) -> Reassembled {
    let mut connection = Reassembler::new(MAX_BODY_BYTES);
    let mut output = Reassembled::default();
    for (kind, stream) in [
        (MessageKind::Request, requests),
        (MessageKind::Response, responses),
    ] {
        // One allocation per stream, pushed in slices, as records share the capture arena.
        let mut rest = Bytes::copy_from_slice(stream);
        let (mut chunker, gaps) = match feed {
            Feed::Whole => {
                connection.push(kind, rest, 0, &mut output);
                continue;
            }
            Feed::Chunked(seed) => (Chunker(u32::from(*seed) | 0x100), false),
            Feed::WithGaps(seed) => (Chunker(u32::from(*seed) | 0x200), true),
        };
        while !rest.is_empty() {
            let chunk = rest.split_to(chunker.next().min(rest.len()));
            if gaps && chunker.next() > 56 {
                connection.gap(kind, chunk.len() as u64, &mut output);
            } else {
                connection.push(kind, chunk, 0, &mut output);
            }
        }
    }
    connection.close(&mut output);
    output
}

fn check(exchanges: &[Exchange]) {
    let settings = PayloadSettings {
        project_id: uuid::Uuid::nil(),
        service_version: None,
        tags: Vec::new(),
        max_body_bytes: MAX_BODY_BYTES,
        realtime_offset_ns: 0,
    };
    let (http1, http2): (Vec<&Exchange>, Vec<&Exchange>) = exchanges
        .iter()
        .partition(|exchange| exchange.request.version.major == 1);
    for pair in http1.windows(2) {
        assert!(pair[0].serial < pair[1].serial, "exchanges out of order");
    }
    let mut streams: Vec<u64> = http2.iter().map(|exchange| exchange.serial).collect();
    streams.sort_unstable();
    let count = streams.len();
    streams.dedup();
    assert_eq!(streams.len(), count, "one exchange per stream");
    for exchange in exchanges {
        assert!(matches!(exchange.request.start, StartLine::Request { .. }));
        assert!(matches!(
            exchange.response.start,
            StartLine::Response { .. }
        ));
        for body in [&exchange.request.body, &exchange.response.body] {
            assert!(body.bytes.len() <= MAX_BODY_BYTES);
        }
        let tracked = TrackedExchange {
            conn: ConnId {
                tgid: 1,
                fd: 3,
                generation: 1,
            },
            role: Role::Server,
            remote: None,
            worker: Default::default(),
            exchange: exchange.clone(),
        };
        let built = payload::build(
            tracked,
            &ProcessProfile::new(SdkType::PythonFlask, true),
            Links::incoming(uuid::Uuid::nil(), Vec::new()),
            &settings,
        );
        assert_eq!(built.method, exchange.request.method().unwrap_or_default());
        let mut json = Vec::new();
        payload::write_json(&built, &mut json);
        serde_json::from_slice::<serde_json::Value>(&json).expect("every payload is JSON");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, streams)) = data.split_first() else {
        return;
    };
    let (requests, responses) = match streams
        .windows(SEPARATOR.len())
        .position(|window| window == SEPARATOR)
    {
        Some(at) => (&streams[..at], &streams[at + SEPARATOR.len()..]),
        None => (streams, &[][..]),
    };
    let whole = reassemble(requests, responses, &Feed::Whole);
    check(&whole.exchanges);
    let chunked = reassemble(requests, responses, &Feed::Chunked(seed));
    check(&chunked.exchanges);
    if whole.anomalies.is_empty() {
        assert_eq!(
            whole.exchanges, chunked.exchanges,
            "chunking changed the exchanges"
        );
        assert_eq!(whole.requests_read, chunked.requests_read);
    }
    check(&reassemble(requests, responses, &Feed::WithGaps(seed)).exchanges);
});
