//! `--record` and `replay`: the events of a live capture, one JSON object per line (redacted
//! unless `--record-raw`), and the same events fed back through the pipeline without root.

use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    io::{self, BufRead, BufReader, BufWriter, Write},
    os::unix::fs::OpenOptionsExt as _,
    path::Path,
};

use anyhow::Context as _;
use bytes::Bytes;

use crate::{
    config::CaptureArgs,
    pipeline::{
        Origin, Pipeline, PipelineOutput,
        events::{ConnId, DataEvent, Direction, Event, Role, Source},
        payload::{
            BodyKind, HeaderMap, Payload, TAG_REQUEST_BODY_ENCODED, TAG_RESPONSE_BODY_ENCODED,
            write_json,
        },
        profile::{ProcessProfile, Profiles, SdkType},
        redact::{TAG_REQUEST_BODY_WITHHELD, TAG_RESPONSE_BODY_WITHHELD},
    },
};

/// Writes the events of a live capture to the `--record` file.
pub struct Recorder {
    out: BufWriter<File>,
    /// None for `--record-raw`: every event as the kernel sent it.
    redacted: Option<RedactedEvents>,
}

impl Recorder {
    /// Creates the file readable by its owner only. An existing file or symlink at `path` is
    /// refused, never truncated or followed.
    pub fn create(path: &Path, raw: bool) -> anyhow::Result<Self> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .with_context(|| {
                format!(
                    "creating recording {} (an existing file is never overwritten)",
                    path.display()
                )
            })?;
        Ok(Self {
            out: BufWriter::new(file),
            redacted: (!raw).then(RedactedEvents::default),
        })
    }

    /// Records `event`, given what the pipeline made of it.
    pub fn write(&mut self, event: Event, output: &PipelineOutput) -> anyhow::Result<()> {
        let events = match &mut self.redacted {
            Some(redacted) => redacted.events(event, output),
            None => vec![event],
        };
        for event in &events {
            serde_json::to_writer(&mut self.out, event)?;
            self.out.write_all(b"\n")?;
        }
        Ok(())
    }

    /// Records payloads the pipeline released outside an event (held 5xx payloads): a raw
    /// recording already holds their events.
    pub fn write_released(&mut self, output: &PipelineOutput) -> anyhow::Result<()> {
        let Some(redacted) = &mut self.redacted else {
            return Ok(());
        };
        for event in &redacted.released(output) {
            serde_json::to_writer(&mut self.out, event)?;
            self.out.write_all(b"\n")?;
        }
        Ok(())
    }

    pub fn flush(&mut self) -> anyhow::Result<()> {
        self.out.flush().context("writing the recording")
    }
}

/// The events of a redacted recording: the traffic's bytes are never written; each exchange
/// is written back as HTTP/1.1 messages built from its payload after redaction, at its
/// connection, thread and timestamps, so a replay yields the same payloads with the same
/// values redacted. Everything else (opens, closes, errors, stderr) is kept as it came.
///
/// What a replay of it cannot reproduce: parent links (a request is written once answered,
/// after the calls it made), original framing and content encodings (HTTP/2 exchanges come
/// back as HTTP/1.1), form bodies (written as the JSON the payload carries, with
/// `Content-Type: application/json`), and bytes of exchanges that never completed.
#[derive(Debug, Default)]
pub struct RedactedEvents {
    /// Bytes written so far per connection and direction: the stream positions.
    positions: HashMap<(ConnId, Direction), u64>,
}

impl RedactedEvents {
    /// The exchanges of payloads released outside an event.
    pub fn released(&mut self, output: &PipelineOutput) -> Vec<Event> {
        let mut events = Vec::new();
        for (origin, payload) in output.origins.iter().zip(&output.payloads) {
            self.exchange(origin, payload, &mut events);
        }
        events
    }

    pub fn events(&mut self, event: Event, output: &PipelineOutput) -> Vec<Event> {
        let mut events = self.released(output);
        match event {
            Event::Data(data) if data.source != Source::Stderr => {}
            Event::Close {
                conn, timestamp_ns, ..
            } => {
                let mut written =
                    |direction| self.positions.remove(&(conn, direction)).unwrap_or(0);
                events.push(Event::Close {
                    conn,
                    timestamp_ns,
                    bytes_sent: written(Direction::Egress),
                    bytes_received: written(Direction::Ingress),
                    tls_bytes_sent: 0,
                    tls_bytes_received: 0,
                });
            }
            Event::ProcessExit { tgid, .. } => {
                self.positions.retain(|(conn, _), _| conn.tgid != tgid);
                events.push(event);
            }
            event => events.push(event),
        }
        events
    }

    fn exchange(&mut self, origin: &Origin, payload: &Payload, events: &mut Vec<Event>) {
        let (request_direction, response_direction) = match origin.role {
            Role::Client => (Direction::Egress, Direction::Ingress),
            _ => (Direction::Ingress, Direction::Egress),
        };
        let request = request_bytes(payload);
        self.message(
            origin,
            request_direction,
            request,
            origin.request_ns,
            events,
        );
        if let Some(response_ns) = origin.response_ns {
            let response = response_bytes(payload);
            self.message(origin, response_direction, response, response_ns, events);
        }
    }

    /// One message as two data events: all but its last byte at its first byte's time, the
    /// last byte at its last byte's time, so a replay measures the same duration.
    fn message(
        &mut self,
        origin: &Origin,
        direction: Direction,
        bytes: Vec<u8>,
        (first_ns, last_ns): (u64, u64),
        events: &mut Vec<Event>,
    ) {
        let position = self.positions.entry((origin.conn, direction)).or_default();
        let mut bytes = Bytes::from(bytes);
        let last = bytes.split_off(bytes.len() - 1);
        for (data, timestamp_ns) in [(bytes, first_ns), (last, last_ns)] {
            if data.is_empty() {
                continue;
            }
            let len = data.len() as u64;
            events.push(Event::Data(DataEvent {
                conn: origin.conn,
                tid: origin.worker.tid,
                goroutine: origin.worker.goroutine,
                timestamp_ns,
                direction,
                source: Source::Syscall,
                position: *position,
                skipped_len: 0,
                data,
            }));
            *position += len;
        }
    }
}

/// How a payload's body is written back.
struct WrittenBody<'a> {
    bytes: &'a [u8],
    withheld: bool,
    undecoded: bool,
    /// A form the payload carries as JSON: it is written as JSON.
    form_as_json: bool,
}

/// Headers of a payload as HTTP/1 header lines, framed for `body`: the body is written
/// whole and (unless it could not be decoded) without its content encoding.
fn head_lines(headers: &HeaderMap, body: WrittenBody<'_>, head: &mut Vec<u8>) {
    let WrittenBody {
        bytes: body,
        withheld,
        undecoded,
        form_as_json,
    } = body;
    let framing = |name: &str| name.eq_ignore_ascii_case("content-length");
    let chunked = headers
        .groups()
        .any(|(name, _)| name.eq_ignore_ascii_case("transfer-encoding"));
    for (name, values) in headers.groups() {
        let dropped = name.eq_ignore_ascii_case("transfer-encoding")
            || (name.eq_ignore_ascii_case("content-encoding") && !undecoded)
            // An empty body keeps its declared length (a response to HEAD), unless emptied.
            || (framing(name) && (!body.is_empty() || withheld || chunked))
            || (form_as_json && name.eq_ignore_ascii_case("content-type"));
        if dropped {
            continue;
        }
        for value in values {
            head.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
    }
    if form_as_json {
        head.extend_from_slice(b"Content-Type: application/json\r\n");
    }
    if !body.is_empty() || withheld || chunked {
        head.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    head.extend_from_slice(body);
}

/// The HTTP/1 minor version an exchange is written back in (HTTP/2 exchanges as HTTP/1.1).
fn http1_minor(payload: &Payload) -> u8 {
    if payload.proto_major == 1 {
        payload.proto_minor
    } else {
        1
    }
}

fn has_tag(payload: &Payload, tag: &str) -> bool {
    payload.tags.iter().any(|t| t == tag)
}

fn request_bytes(payload: &Payload) -> Vec<u8> {
    let body = &payload.request_body;
    let mut bytes = format!(
        "{} {} HTTP/1.{}\r\n",
        payload.method,
        payload.raw_url,
        http1_minor(payload)
    )
    .into_bytes();
    head_lines(
        &payload.request_headers,
        WrittenBody {
            bytes: body,
            withheld: has_tag(payload, TAG_REQUEST_BODY_WITHHELD),
            undecoded: has_tag(payload, TAG_REQUEST_BODY_ENCODED),
            form_as_json: payload.request_body_kind == BodyKind::Form && !body.is_empty(),
        },
        &mut bytes,
    );
    bytes
}

fn response_bytes(payload: &Payload) -> Vec<u8> {
    let body = &payload.response_body;
    let mut bytes = format!(
        "HTTP/1.{} {} \r\n",
        http1_minor(payload),
        payload.status_code
    )
    .into_bytes();
    head_lines(
        &payload.response_headers,
        WrittenBody {
            bytes: body,
            withheld: has_tag(payload, TAG_RESPONSE_BODY_WITHHELD),
            undecoded: has_tag(payload, TAG_RESPONSE_BODY_ENCODED),
            form_as_json: payload.response_body_kind == BodyKind::Form && !body.is_empty(),
        },
        &mut bytes,
    );
    bytes
}

/// `payload` as one NDJSON line, made in `json`.
fn write_line(payload: &Payload, json: &mut Vec<u8>, out: &mut impl Write) -> io::Result<()> {
    json.clear();
    write_json(payload, json);
    json.push(b'\n');
    out.write_all(json)
}

/// Replays a recording through the pipeline, writing payloads as NDJSON to `out`.
pub fn replay(file: &Path, args: &CaptureArgs, mut out: impl Write) -> anyhow::Result<u64> {
    let reader = BufReader::new(
        File::open(file).with_context(|| format!("opening recording {}", file.display()))?,
    );
    // The recorded processes are gone: nothing to read from /proc.
    let mut profile = ProcessProfile::new(args.sdk_type.unwrap_or(SdkType::SDKUnknown), true);
    profile.routes.configured = super::configured_routes(args)?;
    let mut pipeline = Pipeline::new(
        super::payload_settings(args),
        super::capture_scope(args),
        super::redactor(args)?,
        Profiles::Everyone(profile),
    );
    let mut written = 0;
    let mut json = Vec::new();
    for (index, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", file.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let event: Event = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: not a recorded event", file.display(), index + 1))?;
        for payload in pipeline.feed(event).payloads {
            write_line(&payload, &mut json, &mut out)?;
            written += 1;
        }
    }
    for payload in pipeline.flush().payloads {
        write_line(&payload, &mut json, &mut out)?;
        written += 1;
    }
    out.flush()?;
    tracing::info!(stats = ?pipeline.stats(), "replay finished");
    Ok(written)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn a_recording_is_private_and_never_replaces_a_file_or_follows_a_link() {
        let dir = std::env::temp_dir().join(format!("apitoolkit-record-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("events.ndjson");
        Recorder::create(&path, false).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(
            Recorder::create(&path, true).is_err(),
            "an existing file is kept"
        );
        let target = dir.join("target");
        std::fs::write(&target, "keep me").unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(Recorder::create(&link, false).is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep me");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
