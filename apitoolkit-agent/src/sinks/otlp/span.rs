//! Payloads -> an OTLP `ExportTraceServiceRequest`: one span per exchange, shaped like the
//! APIToolkit (Monoscope) SDKs' `monoscope.http` span, plus the standard OpenTelemetry names,
//! grouped by the service that served or made the request. Pure: the payloads arrive
//! redacted, and nothing here looks at anything else.

use std::collections::BTreeMap;

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{AnyValue, ArrayValue, InstrumentationScope, KeyValue, any_value::Value},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span::SpanKind as OtlpKind, status},
};

use crate::pipeline::{
    payload::{HeaderMap, Payload},
    trace::SpanKind,
};

/// The span name the APIToolkit SDKs give an HTTP exchange.
pub const SPAN_NAME: &str = "monoscope.http";

/// What every resource carries besides the service's own attributes.
#[derive(Clone, Debug, Default)]
pub struct ResourceSettings {
    /// `--service-name`: wins over the process's own name.
    pub service_name: Option<String>,
    pub service_version: Option<String>,
    pub host_name: String,
    /// The API key as the `at-project-key` resource attribute: how Monoscope's collector names
    /// the project (its documented `OTEL_RESOURCE_ATTRIBUTES=at-project-key=...`).
    pub project_key: Option<String>,
}

/// `k8s.*` tags the agent adds (`k8s.pod:name`) and their OpenTelemetry resource names.
const K8S_TAGS: [(&str, &str); 4] = [
    ("k8s.namespace:", "k8s.namespace.name"),
    ("k8s.pod:", "k8s.pod.name"),
    ("k8s.container:", "k8s.container.name"),
    ("k8s.node:", "k8s.node.name"),
];

fn string(value: impl Into<String>) -> Option<AnyValue> {
    Some(AnyValue {
        value: Some(Value::StringValue(value.into())),
    })
}

fn strings<'a>(values: impl IntoIterator<Item = &'a String>) -> Option<AnyValue> {
    Some(AnyValue {
        value: Some(Value::ArrayValue(ArrayValue {
            values: values
                .into_iter()
                .map(|value| AnyValue {
                    value: Some(Value::StringValue(value.clone())),
                })
                .collect(),
        })),
    })
}

fn attribute(key: impl Into<String>, value: Option<AnyValue>) -> KeyValue {
    KeyValue {
        key: key.into(),
        value,
        ..Default::default()
    }
}

fn json(value: &impl serde::Serialize) -> Option<AnyValue> {
    string(serde_json::to_string(value).expect("payload fields serialize"))
}

/// `http.request.header.<name>` attributes: names lowercased (as OpenTelemetry asks), values
/// of names differing only in case merged. Built without formatting machinery: this runs for
/// every header of every exchange.
fn headers(prefix: &str, map: &HeaderMap, out: &mut Vec<KeyValue>) {
    let first = out.len();
    for (name, values) in map.groups() {
        let mut key = String::with_capacity(prefix.len() + name.len());
        key.push_str(prefix);
        key.extend(name.chars().map(|c| c.to_ascii_lowercase()));
        let values = values.map(|value| AnyValue {
            value: Some(Value::StringValue(value.to_owned())),
        });
        let merged = out[first..]
            .iter_mut()
            .find(|attribute| attribute.key == key);
        match merged.and_then(|attribute| attribute.value.as_mut()?.value.as_mut()) {
            Some(Value::ArrayValue(array)) => array.values.extend(values),
            _ => out.push(attribute(
                key,
                Some(AnyValue {
                    value: Some(Value::ArrayValue(ArrayValue {
                        values: values.collect(),
                    })),
                }),
            )),
        }
    }
}

/// Unix nanoseconds of the payload's RFC 3339 timestamp (the last response byte).
fn end_time_ns(payload: &Payload) -> u64 {
    chrono::DateTime::parse_from_rfc3339(&payload.timestamp)
        .ok()
        .and_then(|time| time.timestamp_nanos_opt())
        .map_or(0, |ns| ns.max(0) as u64)
}

/// The host without its port, as `server.address` wants it.
fn server_address(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((address, port)) if port.bytes().all(|c| c.is_ascii_digit()) => {
            address.trim_start_matches('[').trim_end_matches(']')
        }
        _ => host,
    }
}

/// Error for a failed call (no status), a 5xx, or a client's 4xx, as OpenTelemetry's HTTP
/// conventions say; unset otherwise.
fn status(payload: &Payload) -> Option<Status> {
    let failed = match payload.span.kind {
        SpanKind::Client => payload.status_code == 0 || payload.status_code >= 400,
        SpanKind::Server => payload.status_code == 0 || payload.status_code >= 500,
    };
    failed.then(|| Status {
        code: status::StatusCode::Error as i32,
        message: String::new(),
    })
}

/// The span of one exchange.
pub fn span(payload: &Payload) -> Span {
    let end = end_time_ns(payload);
    let mut attributes = vec![
        attribute("http.request.method", string(&payload.method)),
        attribute(
            "http.response.status_code",
            Some(AnyValue {
                value: Some(Value::IntValue(payload.status_code.into())),
            }),
        ),
        attribute("http.route", string(&payload.url_path)),
        attribute("url.path", string(&payload.url_path)),
        attribute("http.target", string(&payload.raw_url)),
        attribute("net.host.name", string(&payload.host)),
        attribute("server.address", string(server_address(&payload.host))),
        attribute(
            "network.protocol.version",
            string(match (payload.proto_major, payload.proto_minor) {
                (2, _) => "2".to_owned(),
                (major, minor) => format!("{major}.{minor}"),
            }),
        ),
        attribute("http.request.query_params", json(&payload.query_params)),
        attribute("http.request.path_params", json(&payload.path_params)),
        attribute(
            "http.request.body",
            string(base64_simd::STANDARD.encode_to_string(&payload.request_body)),
        ),
        attribute(
            "http.response.body",
            string(base64_simd::STANDARD.encode_to_string(&payload.response_body)),
        ),
        attribute(
            "apitoolkit.sdk_type",
            string(match serde_json::to_value(payload.sdk_type) {
                Ok(serde_json::Value::String(name)) => name,
                _ => String::new(),
            }),
        ),
        attribute("apitoolkit.msg_id", string(payload.msg_id.to_string())),
        attribute("apitoolkit.errors", json(&payload.errors)),
        attribute("apitoolkit.tags", strings(&payload.tags)),
        attribute(
            "apitoolkit.service_version",
            string(payload.service_version.clone().unwrap_or_default()),
        ),
    ];
    if let Some(parent_id) = payload.parent_id {
        attributes.push(attribute(
            "apitoolkit.parent_id",
            string(parent_id.to_string()),
        ));
    }
    headers(
        "http.request.header.",
        &payload.request_headers,
        &mut attributes,
    );
    headers(
        "http.response.header.",
        &payload.response_headers,
        &mut attributes,
    );
    Span {
        trace_id: payload.span.trace_id.0.to_vec(),
        span_id: payload.span.span_id.0.to_vec(),
        parent_span_id: payload
            .span
            .parent_span_id
            .map(|id| id.0.to_vec())
            .unwrap_or_default(),
        name: SPAN_NAME.to_owned(),
        kind: match payload.span.kind {
            SpanKind::Server => OtlpKind::Server,
            SpanKind::Client => OtlpKind::Client,
        } as i32,
        start_time_unix_nano: end.saturating_sub(payload.duration),
        end_time_unix_nano: end,
        attributes,
        status: status(payload),
        ..Default::default()
    }
}

/// What tells a payload's resource apart: its service and its `k8s.*` tags (borrowed, so
/// grouping a batch allocates nothing per payload).
fn resource_key(payload: &Payload) -> (&str, Vec<&str>) {
    let k8s_tags = payload
        .tags
        .iter()
        .filter(|tag| K8S_TAGS.iter().any(|(prefix, _)| tag.starts_with(prefix)))
        .map(String::as_str)
        .collect();
    (&payload.service_name, k8s_tags)
}

/// The resource of a service: name, version, host and pod.
fn resource(service_name: &str, k8s_tags: &[&str], settings: &ResourceSettings) -> Resource {
    let service_name = match &settings.service_name {
        Some(name) => name.as_str(),
        None if !service_name.is_empty() => service_name,
        None => "unknown_service",
    };
    let mut attributes = vec![attribute("service.name", string(service_name))];
    if let Some(version) = &settings.service_version {
        attributes.push(attribute("service.version", string(version)));
    }
    attributes.push(attribute("host.name", string(&settings.host_name)));
    if let Some(key) = &settings.project_key {
        attributes.push(attribute("at-project-key", string(key)));
    }
    for tag in k8s_tags {
        for (prefix, key) in K8S_TAGS {
            if let Some(value) = tag.strip_prefix(prefix) {
                attributes.push(attribute(key, string(value)));
            }
        }
    }
    Resource {
        attributes,
        ..Default::default()
    }
}

/// One request for a batch: a `ResourceSpans` per distinct service (and pod).
pub fn export_request(
    payloads: &[Payload],
    settings: &ResourceSettings,
) -> ExportTraceServiceRequest {
    let mut by_resource: BTreeMap<(&str, Vec<&str>), Vec<Span>> = BTreeMap::new();
    for payload in payloads {
        by_resource
            .entry(resource_key(payload))
            .or_default()
            .push(span(payload));
    }
    let scope = InstrumentationScope {
        name: env!("CARGO_PKG_NAME").to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        ..Default::default()
    };
    ExportTraceServiceRequest {
        resource_spans: by_resource
            .into_iter()
            .map(|((service_name, k8s_tags), spans)| ResourceSpans {
                resource: Some(resource(service_name, &k8s_tags, settings)),
                scope_spans: vec![ScopeSpans {
                    scope: Some(scope.clone()),
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;
    use crate::pipeline::{
        events::Role,
        payload::AtError,
        trace::{ParentSpan, SpanId},
    };

    fn payload() -> Payload {
        payload_with_header(None)
    }

    /// The fixture with its usual request headers, and `extra`.
    fn payload_with_header(extra: Option<(&str, &str)>) -> Payload {
        let mut payload: Payload =
            serde_json::from_str(include_str!("../../../../tests/fixtures/payload.json")).unwrap();
        payload.request_headers = [
            ("Authorization", "[CLIENT_REDACTED]"),
            ("X-Multi", "1"),
            ("x-multi", "2"),
        ]
        .into_iter()
        .chain(extra)
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect();
        payload.span = payload.span_context(Role::Server, None);
        payload
    }

    fn value<'a>(span: &'a Span, key: &str) -> &'a Value {
        let found = span
            .attributes
            .iter()
            .find(|attribute| attribute.key == key);
        found
            .and_then(|attribute| attribute.value.as_ref())
            .and_then(|value| value.value.as_ref())
            .unwrap_or_else(|| panic!("no attribute {key}"))
    }

    fn text<'a>(span: &'a Span, key: &str) -> &'a str {
        match value(span, key) {
            Value::StringValue(text) => text,
            other => panic!("{key} is {other:?}"),
        }
    }

    fn texts(span: &Span, key: &str) -> Vec<String> {
        match value(span, key) {
            Value::ArrayValue(array) => array
                .values
                .iter()
                .map(|value| match &value.value {
                    Some(Value::StringValue(text)) => text.clone(),
                    other => panic!("{key} holds {other:?}"),
                })
                .collect(),
            other => panic!("{key} is {other:?}"),
        }
    }

    #[test]
    fn attributes_follow_the_sdk_span() {
        let mut payload = payload();
        payload.errors = vec![AtError {
            when: "2026-11-25T01:57:22.393941+00:00".parse().unwrap(),
            error_type: "ValueError".into(),
            message: "bad".into(),
            root_error_type: "ValueError".into(),
            root_error_message: "bad".into(),
            stack_trace: "trace".into(),
        }];
        let span = span(&payload);
        assert_eq!(span.name, "monoscope.http");
        assert_eq!(span.kind, OtlpKind::Server as i32);
        assert_eq!(text(&span, "http.request.method"), payload.method);
        assert_eq!(
            value(&span, "http.response.status_code"),
            &Value::IntValue(payload.status_code.into())
        );
        assert_eq!(text(&span, "http.route"), payload.url_path);
        assert_eq!(text(&span, "url.path"), payload.url_path);
        assert_eq!(text(&span, "http.target"), payload.raw_url);
        assert_eq!(text(&span, "net.host.name"), payload.host);
        assert_eq!(text(&span, "network.protocol.version"), "1.1");
        let query: serde_json::Value =
            serde_json::from_str(text(&span, "http.request.query_params")).unwrap();
        assert_eq!(query, serde_json::to_value(&payload.query_params).unwrap());
        assert_eq!(text(&span, "http.request.path_params"), "{}");
        assert_eq!(
            base64_simd::STANDARD
                .decode_to_vec(text(&span, "http.request.body"))
                .unwrap(),
            payload.request_body
        );
        assert_eq!(text(&span, "http.response.body"), "e30=");
        assert_eq!(text(&span, "apitoolkit.sdk_type"), "PythonFlask");
        assert_eq!(text(&span, "apitoolkit.msg_id"), payload.msg_id.to_string());
        let errors: Vec<AtError> = serde_json::from_str(text(&span, "apitoolkit.errors")).unwrap();
        assert_eq!(errors, payload.errors);
        assert_eq!(texts(&span, "apitoolkit.tags"), payload.tags);
        assert_eq!(
            texts(&span, "http.request.header.authorization"),
            ["[CLIENT_REDACTED]"]
        );
        assert_eq!(texts(&span, "http.request.header.x-multi"), ["1", "2"]);
        assert_eq!(
            span.end_time_unix_nano - span.start_time_unix_nano,
            payload.duration
        );
        assert_eq!(span.trace_id, payload.msg_id.into_bytes());
        assert!(span.parent_span_id.is_empty());
        assert_eq!(span.status, None);
    }

    #[test]
    fn an_outgoing_span_is_a_child_of_its_incoming_span() {
        let incoming = payload();
        let mut outgoing = payload();
        outgoing.msg_id = Uuid::new_v4();
        outgoing.parent_id = Some(incoming.msg_id);
        outgoing.status_code = 0;
        outgoing.span = outgoing.span_context(
            Role::Client,
            Some(ParentSpan::incoming(incoming.msg_id, None)),
        );
        let (parent, child) = (span(&incoming), span(&outgoing));
        assert_eq!(child.kind, OtlpKind::Client as i32);
        assert_eq!(child.trace_id, parent.trace_id);
        assert_eq!(child.parent_span_id, parent.span_id);
        assert_eq!(child.span_id, SpanId::of_msg_id(outgoing.msg_id).0);
        assert_eq!(
            text(&child, "apitoolkit.parent_id"),
            incoming.msg_id.to_string()
        );
        assert_eq!(
            child.status.map(|status| status.code),
            Some(status::StatusCode::Error as i32)
        );
    }

    /// The span of a served request that carried `traceparent` under this name.
    fn served_with(name: &str, traceparent: &str) -> Span {
        span(&payload_with_header(Some((name, traceparent))))
    }

    #[test]
    fn a_request_traceparent_is_joined_and_a_malformed_one_ignored() {
        let joined = served_with(
            "Traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        );
        assert_eq!(
            joined.trace_id,
            [
                0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e,
                0x47, 0x36
            ]
        );
        assert_eq!(
            joined.parent_span_id,
            [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
        );
        let malformed = served_with("traceparent", "00-xyz-00f067aa0ba902b7-01");
        assert_eq!(malformed.trace_id, payload().msg_id.into_bytes());
        assert!(malformed.parent_span_id.is_empty());
    }

    #[test]
    fn resources_group_spans_by_service_and_pod() {
        let mut web = payload();
        web.service_name = "gunicorn".into();
        web.tags = vec!["k8s.namespace:prod".into(), "k8s.pod:web-1".into()];
        let mut other = payload();
        other.service_name = "node".into();
        let settings = ResourceSettings {
            service_name: None,
            service_version: Some("1.2".into()),
            host_name: "host-a".into(),
            project_key: Some("key-1".into()),
        };
        let request = export_request(&[web.clone(), other, web], &settings);
        assert_eq!(request.resource_spans.len(), 2);
        let attributes = |index: usize| -> Vec<(String, String)> {
            request.resource_spans[index]
                .resource
                .as_ref()
                .unwrap()
                .attributes
                .iter()
                .map(
                    |kv| match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                        Some(Value::StringValue(text)) => (kv.key.clone(), text.clone()),
                        other => panic!("{other:?}"),
                    },
                )
                .collect()
        };
        let web_resource = attributes(0);
        assert!(web_resource.contains(&("service.name".into(), "gunicorn".into())));
        assert!(web_resource.contains(&("k8s.pod.name".into(), "web-1".into())));
        assert!(web_resource.contains(&("k8s.namespace.name".into(), "prod".into())));
        assert!(web_resource.contains(&("service.version".into(), "1.2".into())));
        assert!(web_resource.contains(&("host.name".into(), "host-a".into())));
        assert!(web_resource.contains(&("at-project-key".into(), "key-1".into())));
        assert_eq!(request.resource_spans[0].scope_spans[0].spans.len(), 2);
        assert!(attributes(1).contains(&("service.name".into(), "node".into())));

        let named = ResourceSettings {
            service_name: Some("checkout".into()),
            ..settings
        };
        let request = export_request(&[payload()], &named);
        let resource = request.resource_spans[0].resource.as_ref().unwrap();
        assert_eq!(resource.attributes[0].key, "service.name");
        assert_eq!(resource.attributes[0].value, string("checkout"));
    }
}
