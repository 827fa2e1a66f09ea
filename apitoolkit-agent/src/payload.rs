//! Exchange -> the APIToolkit request message (the contract in shared/payload-format.md).

use std::collections::BTreeMap;

use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{
    connections::TrackedExchange,
    http::{
        content,
        parser::{Body, Message, StartLine},
    },
};

/// The backend's `sdk_type` enum; serialized as the variant name, which must match exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SdkType {
    GoGin,
    GoBuiltIn,
    GoGorillaMux,
    GoFiber,
    GoDefault,
    GoOutgoing,
    PhpLaravel,
    PhpSymfony,
    JsExpress,
    JsNest,
    JsFastify,
    JsAdonis,
    JsNext,
    JavaSpringBoot,
    JsAxiosOutgoing,
    JsOutgoing,
    DotNet,
    PythonFastApi,
    PythonFlask,
    PythonDjango,
    PythonOutgoing,
    PhpSlim,
    GuzzleOutgoing,
    ElixirPhoenix,
    PythonPyramid,
    DotNetOutgoing,
    TestkitOutgoing,
    JavaSpring,
    JavaApacheOutgoing,
    JavaVertx,
    SDKUnknown,
}

impl std::str::FromStr for SdkType {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        serde_json::from_value(serde_json::Value::String(name.to_owned())).map_err(|_| {
            format!("unknown sdk_type {name:?} (use a backend enum name such as PythonFlask)")
        })
    }
}

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

/// Tags that say a body in this payload is not the whole body.
pub const TAG_REQUEST_BODY_TRUNCATED: &str = "apitoolkit.request_body_truncated";
pub const TAG_RESPONSE_BODY_TRUNCATED: &str = "apitoolkit.response_body_truncated";
pub const TAG_REQUEST_BODY_INCOMPLETE: &str = "apitoolkit.request_body_incomplete";
pub const TAG_RESPONSE_BODY_INCOMPLETE: &str = "apitoolkit.response_body_incomplete";
pub const TAG_REQUEST_BODY_ENCODED: &str = "apitoolkit.request_body_undecoded";
pub const TAG_RESPONSE_BODY_ENCODED: &str = "apitoolkit.response_body_undecoded";

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

/// Decodes the content encoding and base64-encodes the body, tagging what is not whole.
fn encode_body(
    message: &Message,
    body: &Body,
    max_bytes: usize,
    tags: &BodyTags,
    out_tags: &mut Vec<String>,
) -> String {
    let mut truncated = body.truncated;
    let bytes = match content::decode(message.header("content-encoding"), &body.bytes, max_bytes) {
        Ok(decoded) => {
            truncated |= decoded.truncated;
            decoded.bytes
        }
        Err(error) => {
            tracing::debug!(%error, "body left encoded");
            out_tags.push(tags.undecoded.to_owned());
            body.bytes.clone()
        }
    };
    if truncated {
        out_tags.push(tags.truncated.to_owned());
    }
    if body.incomplete {
        out_tags.push(tags.incomplete.to_owned());
    }
    BASE64.encode(bytes)
}

fn rfc3339(unix_ns: i128) -> String {
    let seconds = unix_ns.div_euclid(1_000_000_000) as i64;
    let nanos = unix_ns.rem_euclid(1_000_000_000) as u32;
    chrono::DateTime::from_timestamp(seconds, nanos)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, false)
}

pub fn build(tracked: &TrackedExchange, sdk_type: SdkType, settings: &PayloadSettings) -> Payload {
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
    let request_body = encode_body(
        request,
        &request.body,
        settings.max_body_bytes,
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
        &BodyTags {
            truncated: TAG_RESPONSE_BODY_TRUNCATED,
            incomplete: TAG_RESPONSE_BODY_INCOMPLETE,
            undecoded: TAG_RESPONSE_BODY_ENCODED,
        },
        &mut tags,
    );
    Payload {
        timestamp: rfc3339(response.last_byte_ns as i128 + settings.realtime_offset_ns),
        duration: response.last_byte_ns.saturating_sub(request.first_byte_ns),
        method,
        host: request.header("host").unwrap_or_default().to_owned(),
        raw_url: target.clone(),
        url_path: path,
        path_params: serde_json::Map::new(),
        query_params: query_params(query),
        request_headers: header_map(request),
        response_headers: header_map(response),
        request_body,
        response_body,
        proto_major: 1,
        proto_minor: request.version_minor,
        status_code: response.status().unwrap_or_default(),
        sdk_type,
        project_id: settings.project_id,
        msg_id: Uuid::new_v4(),
        parent_id: None,
        referer: request.header("referer").unwrap_or_default().to_owned(),
        service_version: settings.service_version.clone(),
        tags,
        errors: Vec::new(),
    }
}
