//! Exchange -> the APIToolkit request message (the contract is docs/payload.md).

use std::{collections::BTreeMap, sync::Arc};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{
    app_errors::CapturedError,
    connections::TrackedExchange,
    events::Role,
    link::Parent,
    profile::{ProcessProfile, SdkType},
    protocols::{
        Exchange,
        content::{self, MediaType},
        form::{self, FormShape},
        message::{Body, Fields, Message, StartLine},
    },
    trace::{ParentSpan, SpanContext, TRACEPARENT, TraceParent},
};

/// The backend's ATError; every key is required.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AtError {
    pub when: Timestamp,
    pub error_type: String,
    pub message: String,
    pub root_error_type: String,
    pub root_error_message: String,
    pub stack_trace: String,
}

/// Header fields or query parameters: (name, value) pairs ordered by name (bytewise, as a
/// `BTreeMap` orders keys), values of one name in arrival order. Built by moving the captured
/// fields in: no map nodes, no value lists. In JSON an object `{name: [values]}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(from = "BTreeMap<String, Vec<String>>")]
pub struct HeaderMap {
    fields: Fields,
}

impl HeaderMap {
    /// `fields` in any order; a stable sort keeps each name's values in arrival order.
    pub fn from_fields(mut fields: Fields) -> Self {
        fields.sort_by_name();
        Self { fields }
    }

    /// Each name once, in order, with its values.
    pub fn groups(&self) -> impl Iterator<Item = (&str, impl Iterator<Item = &str> + Clone)> {
        self.fields.runs()
    }

    /// The values of `name` (exact spelling), in arrival order.
    pub fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.fields
            .iter()
            .filter(move |(key, _)| *key == name)
            .map(|(_, value)| value)
    }

    /// Replaces the values of every name `covered` accepts by the one value `marker`.
    pub fn redact(&mut self, covered: impl Fn(&str) -> bool, marker: &str) {
        self.fields.replace_runs(covered, marker);
    }

    /// Heap bytes held (for the sink queues' byte bound).
    pub fn heap_size(&self) -> usize {
        self.fields.heap_size()
    }
}

impl<N: AsRef<str>, V: AsRef<str>> FromIterator<(N, V)> for HeaderMap {
    fn from_iter<I: IntoIterator<Item = (N, V)>>(fields: I) -> Self {
        Self::from_fields(fields.into_iter().collect())
    }
}

impl From<BTreeMap<String, Vec<String>>> for HeaderMap {
    fn from(map: BTreeMap<String, Vec<String>>) -> Self {
        map.iter()
            .flat_map(|(name, values)| values.iter().map(move |value| (name, value)))
            .collect()
    }
}

impl Serialize for HeaderMap {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        /// One name's values, as a JSON array.
        struct Values<I>(I);
        impl<'a, I: Iterator<Item = &'a str> + Clone> Serialize for Values<I> {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_seq(self.0.clone())
            }
        }
        let mut map = serializer.serialize_map(None)?;
        for (name, values) in self.groups() {
            map.serialize_entry(name, &Values(values))?;
        }
        map.end()
    }
}

/// One request message. Written as JSON by [`write_json`]; `Deserialize` reads the same JSON
/// back (test fixtures).
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Payload {
    pub timestamp: Timestamp,
    pub duration: u64,
    pub method: String,
    pub host: String,
    pub raw_url: String,
    pub url_path: String,
    pub path_params: serde_json::Map<String, serde_json::Value>,
    pub query_params: HeaderMap,
    pub request_headers: HeaderMap,
    pub response_headers: HeaderMap,
    /// The bodies' bytes, base64 in JSON.
    #[serde(deserialize_with = "base64_body")]
    pub request_body: Vec<u8>,
    #[serde(deserialize_with = "base64_body")]
    pub response_body: Vec<u8>,
    pub proto_major: u8,
    pub proto_minor: u8,
    pub status_code: u16,
    pub sdk_type: SdkType,
    pub project_id: Uuid,
    pub msg_id: Uuid,
    pub parent_id: Option<Uuid>,
    pub referer: String,
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

fn base64_body<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
    let text = String::deserialize(deserializer)?;
    base64_simd::STANDARD
        .decode_to_vec(text)
        .map_err(serde::de::Error::custom)
}

/// Appends `text` as a JSON string escaped exactly as serde_json escapes it: `"` and `\`, and
/// control characters (`\u00xx` where they have no short form). The runs between bytes that
/// need escaping, nearly always the whole string, are found eight bytes at a time and copied
/// whole: header fields and URLs are most of a payload's strings.
fn json_string(out: &mut Vec<u8>, text: &str) {
    out.push(b'"');
    let mut rest = text.as_bytes();
    loop {
        let clean = first_to_escape(rest);
        out.extend_from_slice(&rest[..clean]);
        let Some(&byte) = rest.get(clean) else {
            break;
        };
        let short: &[u8] = match byte {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0x08 => b"\\b",
            0x0c => b"\\f",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            _ => b"",
        };
        if short.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(byte >> 4)]);
            out.push(HEX[usize::from(byte & 0xf)]);
        } else {
            out.extend_from_slice(short);
        }
        rest = &rest[clean + 1..];
    }
    out.push(b'"');
}

fn needs_escape(byte: u8) -> bool {
    byte < 0x20 || byte == b'"' || byte == b'\\'
}

/// Index of the first byte of `bytes` that needs escaping, or its length.
fn first_to_escape(bytes: &[u8]) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH_BITS: u64 = 0x8080_8080_8080_8080;
    // Whether some byte of `word` is below `limit` (at most 0x80): its subtraction borrows
    // into the high bit, which no byte of 0x80 and up had.
    let has_below =
        |word: u64, limit: u8| word.wrapping_sub(ONES * u64::from(limit)) & !word & HIGH_BITS != 0;
    let has_byte = |word: u64, byte: u8| has_below(word ^ (ONES * u64::from(byte)), 1);
    let mut at = 0;
    while let Some(chunk) = bytes.get(at..at + 8) {
        let word = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        if has_below(word, 0x20) || has_byte(word, b'"') || has_byte(word, b'\\') {
            break;
        }
        at += 8;
    }
    at + bytes[at..]
        .iter()
        .position(|&byte| needs_escape(byte))
        .unwrap_or(bytes.len() - at)
}

/// Appends `map` as serde_json writes its `Serialize`: `{"name":["value",...],...}`.
fn json_header_map(out: &mut Vec<u8>, map: &HeaderMap) {
    out.push(b'{');
    for (name, values) in map.groups() {
        json_string(out, name);
        out.extend_from_slice(b":[");
        for value in values {
            json_string(out, value);
            out.push(b',');
        }
        // The last value's comma closes the list instead (a name has at least one value).
        *out.last_mut().expect("the list has a value") = b']';
        out.push(b',');
    }
    if out.last() == Some(&b',') {
        out.pop();
    }
    out.push(b'}');
}

/// Appends `payload` as one JSON object (the contract's keys, in its order). Written by hand
/// so bodies go from their bytes straight to base64 in `out`: base64 needs no escaping, and
/// no intermediate string is made. Strings are escaped by [`json_string`], byte for byte as
/// serde_json does; the rarer structured values go through serde_json. Returns where the
/// project id's text starts in `out`: the Pub/Sub sink stamps one resolved after capture wrote it.
pub fn write_json(payload: &Payload, out: &mut Vec<u8>) -> usize {
    fn key(out: &mut Vec<u8>, name: &str) {
        out.push(b'"');
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\":");
    }
    fn value(out: &mut Vec<u8>, value: &(impl Serialize + ?Sized)) {
        serde_json::to_writer(&mut *out, value).expect("writing to a Vec cannot fail");
        out.push(b',');
    }
    fn string(out: &mut Vec<u8>, text: &str) {
        json_string(out, text);
        out.push(b',');
    }
    fn header_map(out: &mut Vec<u8>, map: &HeaderMap) {
        json_header_map(out, map);
        out.push(b',');
    }
    fn uuid(out: &mut Vec<u8>, id: &Uuid) {
        let mut text = [0; uuid::fmt::Hyphenated::LENGTH];
        out.push(b'"');
        out.extend_from_slice(id.hyphenated().encode_lower(&mut text).as_bytes());
        out.extend_from_slice(b"\",");
    }
    fn base64(out: &mut Vec<u8>, bytes: &[u8]) {
        out.push(b'"');
        // SIMD (AVX2/SSSE3/NEON, picked at run time): bodies are most of the bytes written.
        base64_simd::STANDARD.encode_append(bytes, out);
        out.extend_from_slice(b"\",");
    }
    out.push(b'{');
    key(out, "timestamp");
    string(out, &payload.timestamp);
    key(out, "duration");
    value(out, &payload.duration);
    key(out, "method");
    string(out, &payload.method);
    key(out, "host");
    string(out, &payload.host);
    key(out, "raw_url");
    string(out, &payload.raw_url);
    key(out, "url_path");
    string(out, &payload.url_path);
    key(out, "path_params");
    value(out, &payload.path_params);
    key(out, "query_params");
    header_map(out, &payload.query_params);
    key(out, "request_headers");
    header_map(out, &payload.request_headers);
    key(out, "response_headers");
    header_map(out, &payload.response_headers);
    key(out, "request_body");
    base64(out, &payload.request_body);
    key(out, "response_body");
    base64(out, &payload.response_body);
    key(out, "proto_major");
    value(out, &payload.proto_major);
    key(out, "proto_minor");
    value(out, &payload.proto_minor);
    key(out, "status_code");
    value(out, &payload.status_code);
    key(out, "sdk_type");
    value(out, &payload.sdk_type);
    key(out, "project_id");
    let project_id_at = out.len() + 1;
    uuid(out, &payload.project_id);
    key(out, "msg_id");
    uuid(out, &payload.msg_id);
    key(out, "parent_id");
    match &payload.parent_id {
        Some(id) => uuid(out, id),
        None => out.extend_from_slice(b"null,"),
    }
    key(out, "referer");
    string(out, &payload.referer);
    if let Some(version) = &payload.service_version {
        key(out, "service_version");
        string(out, version);
    }
    key(out, "tags");
    value(out, &payload.tags);
    key(out, "errors");
    value(out, &payload.errors);
    // The last value's comma closes the object instead.
    *out.last_mut().expect("the object has keys") = b'}';
    project_id_at
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
            .groups()
            .find(|(name, _)| name.eq_ignore_ascii_case(TRACEPARENT))
            .and_then(|(_, mut values)| values.next())
            .and_then(TraceParent::parse);
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

fn query_params(query: &str) -> HeaderMap {
    form_urlencoded::parse(query.as_bytes()).collect()
}

struct BodyTags {
    truncated: &'static str,
    incomplete: &'static str,
    undecoded: &'static str,
}

/// A body as the payload carries it: its bytes, and what they are.
struct PayloadBody {
    bytes: Vec<u8>,
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

/// Decodes the content encoding and turns a form into the JSON object of its fields, tagging
/// what is not whole. A body left as captured is moved, not copied.
fn payload_body(
    message: &Message,
    body: Body,
    max_bytes: usize,
    form_shape: FormShape,
    tags: &BodyTags,
    out_tags: &mut Vec<String>,
) -> PayloadBody {
    let decoded = content::decode(message.header("content-encoding"), &body.bytes, max_bytes);
    let (bytes, truncated, undecoded) = match decoded {
        Ok(Some(decoded)) => (decoded.bytes, body.truncated || decoded.truncated, false),
        Ok(None) => (body.bytes, body.truncated, false),
        Err(error) => {
            tracing::debug!(%error, "body left encoded");
            out_tags.push(tags.undecoded.to_owned());
            (body.bytes, body.truncated, true)
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
        MediaType::UrlEncodedForm if content::looks_like_json(&bytes) => (BodyKind::Json, None),
        // An empty form is no body, as an empty JSON body is.
        MediaType::UrlEncodedForm | MediaType::MultipartForm { .. } if bytes.is_empty() => {
            (BodyKind::Form, None)
        }
        MediaType::UrlEncodedForm | MediaType::MultipartForm { .. } => {
            match form_json(&media, &bytes, truncated || body.incomplete, form_shape) {
                Some(json) => (BodyKind::Form, Some(json)),
                None => (BodyKind::UnreadForm, None),
            }
        }
    };
    PayloadBody {
        bytes: form.unwrap_or(bytes),
        kind,
    }
}

/// A time as chrono's `to_rfc3339_opts(SecondsFormat::Micros, false)` writes it in UTC
/// (`2025-11-24T16:00:00.000009+00:00`, microseconds truncated), held inline: every payload
/// and every error carries one, and a `String` would cost each an allocation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Timestamp {
    text: [u8; Self::CAPACITY],
    len: u8,
}

impl Timestamp {
    /// Room for chrono's longest, a signed six-digit year: `+262142-12-31T23:59:59.999999+00:00`.
    const CAPACITY: usize = 40;

    /// `unix_ns`, written digit by digit into place: chrono formats through `fmt::Write`, a call
    /// per part. Years outside 0000-9999, which chrono writes with a sign, and times it cannot
    /// represent (written as the Unix epoch) are left to chrono.
    pub fn from_unix_ns(unix_ns: i128) -> Self {
        /// 0000-01-01T00:00:00 and 9999-12-31T23:59:59, in Unix seconds.
        const FOUR_DIGIT_YEARS: std::ops::RangeInclusive<i128> = -62_167_219_200..=253_402_300_799;
        let seconds = unix_ns.div_euclid(1_000_000_000);
        let nanos = unix_ns.rem_euclid(1_000_000_000) as u32;
        if !FOUR_DIGIT_YEARS.contains(&seconds) {
            let text = chrono::DateTime::from_timestamp(seconds as i64, nanos)
                .unwrap_or_default()
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, false);
            return text.parse().expect("chrono's RFC 3339 fits the capacity");
        }
        let seconds = seconds as i64;
        let (year, month, day) = civil_date(seconds.div_euclid(86_400));
        let second_of_day = seconds.rem_euclid(86_400) as u32;
        const LAYOUT: &[u8; 32] = b"0000-00-00T00:00:00.000000+00:00";
        let mut text = [0; Self::CAPACITY];
        text[..LAYOUT.len()].copy_from_slice(LAYOUT);
        let mut digits = |at: usize, width: usize, mut value: u32| {
            for slot in text[at..at + width].iter_mut().rev() {
                *slot = b'0' + (value % 10) as u8;
                value /= 10;
            }
        };
        digits(0, 4, year);
        digits(5, 2, month);
        digits(8, 2, day);
        digits(11, 2, second_of_day / 3600);
        digits(14, 2, second_of_day / 60 % 60);
        digits(17, 2, second_of_day % 60);
        digits(20, 6, nanos / 1000);
        Self {
            text,
            len: LAYOUT.len() as u8,
        }
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.text[..usize::from(self.len)])
            .expect("built from a str, cut at its end")
    }
}

impl std::ops::Deref for Timestamp {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

/// Any text that fits (test fixtures, payloads read back); not checked to be a time.
impl std::str::FromStr for Timestamp {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let mut stored = [0; Self::CAPACITY];
        stored
            .get_mut(..text.len())
            .ok_or_else(|| format!("timestamp longer than {} bytes: {text:?}", Self::CAPACITY))?
            .copy_from_slice(text.as_bytes());
        Ok(Self {
            text: stored,
            len: text.len() as u8,
        })
    }
}

impl PartialEq<&str> for Timestamp {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl std::fmt::Debug for Timestamp {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), formatter)
    }
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.as_str())
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// (year, month, day) of the proleptic Gregorian calendar `days` after 1970-01-01: Howard
/// Hinnant's `civil_from_days`, over 400-year eras that start on March 1st.
fn civil_date(days: i64) -> (u32, u32, u32) {
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year as u32, month as u32, day as u32)
}

/// A captured error as the backend's ATError.
pub fn at_error(error: CapturedError, settings: &PayloadSettings) -> AtError {
    AtError {
        when: Timestamp::from_unix_ns(error.timestamp_ns as i128 + settings.realtime_offset_ns),
        error_type: error.error_type,
        message: error.message,
        root_error_type: error.root_error_type,
        root_error_message: error.root_error_message,
        stack_trace: error.stack_trace,
    }
}

/// The payload of one exchange, made of its strings and bytes (moved, not copied). Its
/// `sdk_type` is the process's framework, or its runtime's outgoing type for a request the
/// process made; its tags are the agent's, then what the body encoding noticed, then the
/// process's own (e.g. its pod).
pub fn build(
    tracked: TrackedExchange,
    profile: &ProcessProfile,
    links: Links,
    settings: &PayloadSettings,
) -> Payload {
    let sdk_type = match tracked.role {
        Role::Client => profile.outgoing_sdk_type(),
        _ => profile.sdk_type,
    };
    let Exchange {
        mut request,
        mut response,
        headers_incomplete,
        ..
    } = tracked.exchange;
    let (method, target) =
        match std::mem::replace(&mut request.start, StartLine::Response { status: 0 }) {
            StartLine::Request { method, target } => (method, target),
            StartLine::Response { .. } => unreachable!("requests carry a request line"),
        };
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path.to_owned(), query),
        None => (target.clone(), ""),
    };
    let mut tags = settings.tags.clone();
    let form_shape = form_shape(sdk_type);
    let body = std::mem::take(&mut request.body);
    let request_body = payload_body(
        &request,
        body,
        settings.max_body_bytes,
        form_shape,
        &BodyTags {
            truncated: TAG_REQUEST_BODY_TRUNCATED,
            incomplete: TAG_REQUEST_BODY_INCOMPLETE,
            undecoded: TAG_REQUEST_BODY_ENCODED,
        },
        &mut tags,
    );
    let body = std::mem::take(&mut response.body);
    let response_body = payload_body(
        &response,
        body,
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
    if headers_incomplete {
        tags.push(TAG_HEADERS_INCOMPLETE.to_owned());
    }
    tags.extend(profile.tags.iter().cloned());
    let host = match request.authority.take() {
        Some(authority) => authority,
        None => request.header("host").unwrap_or_default().to_owned(),
    };
    let referer = request.header("referer").unwrap_or_default().to_owned();
    Payload {
        timestamp: Timestamp::from_unix_ns(
            response.last_byte_ns as i128 + settings.realtime_offset_ns,
        ),
        duration: response.last_byte_ns.saturating_sub(request.first_byte_ns),
        method,
        host,
        query_params: query_params(query),
        raw_url: target,
        url_path,
        path_params,
        request_headers: HeaderMap::from_fields(request.headers),
        status_code: response.status().unwrap_or_default(),
        response_headers: HeaderMap::from_fields(response.headers),
        request_body: request_body.bytes,
        response_body: response_body.bytes,
        proto_major: request.version.major,
        proto_minor: request.version.minor,
        sdk_type,
        project_id: settings.project_id,
        msg_id: links.msg_id,
        parent_id: links.parent.map(|parent| parent.msg_id),
        referer,
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
                ("Accept", "a/b\"c"),
                ("X-Multi", "3"),
            ],
            b"",
            (1_000, 2_000),
        );
        let response = message(
            StartLine::Response { status: 201 },
            &[
                ("Set-Cookie", "b=2"),
                ("Content-Type", "application/json"),
                ("Set-Cookie", "a=1"),
            ],
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
            exchange(request, response),
            &ProcessProfile::new(SdkType::PythonFlask, true),
            Links::incoming(msg_id, vec![error]),
            &settings(),
        );
        assert_eq!(payload.msg_id, msg_id);
        assert_eq!(
            payload.errors,
            vec![AtError {
                when: "2025-11-24T16:00:00.000008+00:00".parse().unwrap(),
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
        assert_eq!(
            payload.query_params.values("tag").collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(
            payload.query_params.values("q").collect::<Vec<_>>(),
            ["a b"]
        );
        assert_eq!(payload.host, "api.local:8080");
        assert_eq!(
            payload
                .request_headers
                .values("X-Multi")
                .collect::<Vec<_>>(),
            ["1", "3"]
        );
        assert_eq!(payload.status_code, 201);
        assert_eq!(payload.response_body, b"{}");
        assert_eq!(payload.tags, vec!["team:api"]);

        let mut written = Vec::new();
        write_json(&payload, &mut written);
        let json: serde_json::Value = serde_json::from_slice(&written).unwrap();
        let expected = serde_json::json!({
            "timestamp": "2025-11-24T16:00:00.000009+00:00",
            "duration": 8_000,
            "method": "GET",
            "host": "api.local:8080",
            "raw_url": "/users/42?page=2&tag=a&tag=b&q=a%20b",
            "url_path": "/users/42",
            "path_params": {},
            "query_params": {"page": ["2"], "q": ["a b"], "tag": ["a", "b"]},
            // Names as sent, sorted bytewise (uppercase first); each name's values in order.
            "request_headers": {
                "Accept": ["a/b\"c"],
                "Host": ["api.local:8080"],
                "X-Multi": ["1", "3"],
                "x-multi": ["2"],
            },
            "response_headers": {
                "Content-Type": ["application/json"],
                "Set-Cookie": ["b=2", "a=1"],
            },
            "request_body": "",
            "response_body": "e30=",
            "proto_major": 1,
            "proto_minor": 1,
            "status_code": 201,
            "sdk_type": "PythonFlask",
            "project_id": "00000000-0000-0000-0000-000000000000",
            "msg_id": msg_id.to_string(),
            "parent_id": null,
            "referer": "",
            "tags": ["team:api"],
            "errors": [{
                "when": "2025-11-24T16:00:00.000008+00:00",
                "error_type": "ValueError",
                "message": "bad",
                "root_error_type": "KeyError",
                "root_error_message": "'id'",
                "stack_trace": "Traceback (most recent call last):\nValueError: bad",
            }],
        });
        assert_eq!(json, expected);
        // Objects compare regardless of order: the order written is checked on its own.
        let keys = |value: &serde_json::Value| -> Vec<String> {
            value.as_object().unwrap().keys().cloned().collect()
        };
        assert_eq!(keys(&json), keys(&expected));
        for map in ["query_params", "request_headers", "response_headers"] {
            assert_eq!(keys(&json[map]), keys(&expected[map]), "{map}");
        }
        let read_back: Payload = serde_json::from_slice(&written).unwrap();
        assert_eq!(read_back.request_headers, payload.request_headers);
        assert_eq!(read_back.response_body, payload.response_body);

        let mut versioned = payload.clone();
        versioned.service_version = Some("1.2".into());
        versioned.parent_id = Some(msg_id);
        versioned.request_body = vec![0xff, 0, b'"'];
        let mut written = Vec::new();
        write_json(&versioned, &mut written);
        let json: serde_json::Value = serde_json::from_slice(&written).unwrap();
        assert_eq!(json["service_version"], "1.2");
        assert_eq!(json["parent_id"], msg_id.to_string());
        assert_eq!(json["request_body"], "/wAi");
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
            build(tracked, &profile, links, &settings())
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
            exchange(request, response),
            &ProcessProfile::unknown(),
            Links::outgoing(None),
            &settings(),
        );
        assert_eq!(payload.response_body, b"{\"ok\":true}");
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
            exchange(request, ok()),
            &ProcessProfile::new(sdk_type, true),
            Links::incoming(Uuid::new_v4(), Vec::new()),
            &settings(),
        )
    }

    fn body_json(body: &[u8]) -> serde_json::Value {
        serde_json::from_slice(body).unwrap()
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
        assert!(empty.request_body.is_empty());
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
            let raw = request.body.bytes.clone();
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

    fn rfc3339_by_chrono(unix_ns: i128) -> String {
        let seconds = unix_ns.div_euclid(1_000_000_000) as i64;
        let nanos = unix_ns.rem_euclid(1_000_000_000) as u32;
        chrono::DateTime::from_timestamp(seconds, nanos)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, false)
    }

    #[test]
    fn timestamps_are_written_as_chrono_writes_them_at_every_edge() {
        let second = 1_000_000_000_i128;
        assert_eq!(
            Timestamp::from_unix_ns(0),
            "1970-01-01T00:00:00.000000+00:00"
        );
        assert_eq!(
            Timestamp::from_unix_ns(-1),
            "1969-12-31T23:59:59.999999+00:00"
        );
        assert_eq!(
            Timestamp::from_unix_ns(951_782_400 * second + 999),
            "2000-02-29T00:00:00.000000+00:00",
            "a leap day; nanoseconds below a microsecond are cut, not rounded"
        );
        for unix_ns in [
            -62_167_219_200 * second,
            -62_167_219_200 * second - 1,
            253_402_300_799 * second + second - 1,
            253_402_300_800 * second,
            4_107_542_400 * second,
            i128::from(i64::MAX) * second,
            i128::MIN / 2,
        ] {
            assert_eq!(
                Timestamp::from_unix_ns(unix_ns).as_str(),
                rfc3339_by_chrono(unix_ns),
                "{unix_ns}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn timestamps_are_written_as_chrono_writes_them(
            seconds in -62_167_219_200_i64..=253_402_300_799,
            nanos in 0..1_000_000_000_i64,
        ) {
            let unix_ns = i128::from(seconds) * 1_000_000_000 + i128::from(nanos);
            let written = Timestamp::from_unix_ns(unix_ns);
            proptest::prop_assert_eq!(written.as_str(), rfc3339_by_chrono(unix_ns));
        }

        /// The hand-written JSON is byte for byte what serde_json writes, whatever the text:
        /// control characters, quotes and backslashes at any offset of the eight-byte scan.
        #[test]
        fn strings_are_escaped_as_serde_json_escapes_them(
            text in "[\\x00-\\x7f\"\\\\é€]{0,40}",
        ) {
            let mut written = Vec::new();
            json_string(&mut written, &text);
            proptest::prop_assert_eq!(written, serde_json::to_vec(&text).unwrap());
        }

        #[test]
        fn header_maps_are_written_as_serde_json_writes_them(
            pairs in proptest::collection::vec(("[a-cA\\x01\"]{0,3}", "[a\\n\\\\\"\\x7f]{0,12}"), 0..6),
        ) {
            let map: HeaderMap = pairs.iter().map(|(name, value)| (name, value)).collect();
            let mut written = Vec::new();
            json_header_map(&mut written, &map);
            proptest::prop_assert_eq!(written, serde_json::to_vec(&map).unwrap());
        }
    }
}
