//! Redaction under arbitrary JSON bodies, JSONPath rules and headers: a value a rule selects
//! never leaves the agent.
//!
//! Every string leaf of the generated body is a unique marker `<<n>>`, and keys come from a
//! small set that includes JSON-pointer and JSONPath escapes (`/`, `~`, quotes). After
//! redaction:
//! - no marker inside a selected subtree appears anywhere in the serialized payload;
//! - every rule, queried again on the redacted body, selects only the redaction marker;
//! - a body whose JSON cannot be trusted (truncated or unparsable) is withheld entirely;
//! - a redacted header's values never appear.
#![no_main]

use apitoolkit_agent::pipeline::{
    payload::{BodyKind, Payload, TAG_REQUEST_BODY_TRUNCATED, write_json},
    redact::{REDACTED, Redactor},
};
use arbitrary::Arbitrary;
use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use serde_json_path::JsonPath;

const KEYS: [&str; 10] = [
    "a",
    "b",
    "secret",
    "x/y",
    "t~1",
    "~0",
    "",
    "it's",
    "пароль",
    "a b",
];
const MAX_DEPTH: usize = 6;

#[derive(Arbitrary, Debug)]
enum Node {
    Null,
    Bool(bool),
    Number(i16),
    Text,
    Array(Vec<Node>),
    Object(Vec<(u8, Node)>),
}

#[derive(Arbitrary, Debug)]
enum Segment {
    Child(u8),
    Wildcard,
    Index(i8),
    Slice(Option<i8>, Option<i8>, Option<i8>),
    Descendant(u8),
    DescendantWildcard,
    DescendantIndex(i8),
}

#[derive(Arbitrary, Debug)]
struct Input {
    body: Node,
    rules: Vec<Vec<Segment>>,
    truncated: bool,
    /// Appends a byte that makes the body invalid JSON.
    garbled: bool,
    headers: Vec<(u8, bool)>,
    header_rules: Vec<(u8, bool)>,
}

fn key(index: u8) -> &'static str {
    KEYS[usize::from(index) % KEYS.len()]
}

/// A JSONPath name selector: single-quoted, with RFC 9535 escapes.
fn quoted(name: &str) -> String {
    format!("'{}'", name.replace('\\', "\\\\").replace('\'', "\\'"))
}

fn optional(bound: Option<i8>) -> String {
    bound.map(|value| value.to_string()).unwrap_or_default()
}

fn render(rule: &[Segment]) -> String {
    let mut path = String::from("$");
    for segment in rule {
        path += &match segment {
            Segment::Child(name) => format!("[{}]", quoted(key(*name))),
            Segment::Wildcard => "[*]".to_owned(),
            Segment::Index(index) => format!("[{index}]"),
            Segment::Slice(start, end, step) => {
                let step = step.filter(|step| *step != 0);
                format!(
                    "[{}:{}:{}]",
                    optional(*start),
                    optional(*end),
                    optional(step)
                )
            }
            Segment::Descendant(name) => format!("..[{}]", quoted(key(*name))),
            Segment::DescendantWildcard => "..[*]".to_owned(),
            Segment::DescendantIndex(index) => format!("..[{index}]"),
        };
    }
    path
}

fn build(node: &Node, depth: usize, markers: &mut usize) -> Value {
    let mut marker = || {
        *markers += 1;
        Value::String(format!("<<{markers}>>"))
    };
    match node {
        Node::Null => Value::Null,
        Node::Bool(value) => Value::Bool(*value),
        Node::Number(value) => Value::from(*value),
        Node::Text => marker(),
        _ if depth >= MAX_DEPTH => marker(),
        Node::Array(items) => Value::Array(
            items
                .iter()
                .map(|item| build(item, depth + 1, markers))
                .collect(),
        ),
        Node::Object(entries) => Value::Object(
            entries
                .iter()
                .map(|(name, item)| (key(*name).to_owned(), build(item, depth + 1, markers)))
                .collect(),
        ),
    }
}

fn markers_in(value: &Value, found: &mut Vec<String>) {
    match value {
        Value::String(text) if text.starts_with("<<") => found.push(text.clone()),
        Value::Array(items) => items.iter().for_each(|item| markers_in(item, found)),
        Value::Object(entries) => entries.values().for_each(|item| markers_in(item, found)),
        _ => {}
    }
}

fn header_name(index: u8, upper: bool) -> String {
    let name = ["authorization", "x-api-key", "cookie", "accept"][usize::from(index) % 4];
    if upper {
        name.to_ascii_uppercase()
    } else {
        name.to_owned()
    }
}

fuzz_target!(|input: Input| {
    let body = build(&input.body, 0, &mut 0);
    let rules: Vec<String> = input
        .rules
        .iter()
        .take(4)
        .map(|rule| render(rule))
        .collect();
    let paths: Vec<JsonPath> = match rules.iter().map(|rule| JsonPath::parse(rule)).collect() {
        Ok(paths) => paths,
        // Rules the agent would refuse at start-up; every rendered rule is meant to be valid.
        Err(error) => panic!("rendered an invalid rule {rules:?}: {error}"),
    };
    let header_rules: Vec<String> = input
        .header_rules
        .iter()
        .map(|(index, upper)| header_name(*index, *upper))
        .collect();
    let redactor = Redactor::new(&header_rules, &rules, &[]).expect("valid rules");

    let mut payload: Payload =
        serde_json::from_str(include_str!("../../tests/fixtures/payload.json")).unwrap();
    let mut bytes = serde_json::to_vec(&body).unwrap();
    if input.garbled {
        bytes.push(b'}');
    }
    payload.request_body = bytes;
    payload.request_body_kind = BodyKind::Json;
    if input.truncated {
        payload.tags.push(TAG_REQUEST_BODY_TRUNCATED.to_owned());
    }
    payload.request_headers = input
        .headers
        .iter()
        .enumerate()
        .map(|(number, (index, upper))| {
            (header_name(*index, *upper), format!("[[header {number}]]"))
        })
        .collect();
    let headers_before = payload.request_headers.clone();

    redactor.apply(&mut payload);
    let mut published = Vec::new();
    write_json(&payload, &mut published);
    let published = String::from_utf8(published).unwrap();
    let written: Value = serde_json::from_str(&published).expect("the payload is JSON");
    let published_body = written["request_body"].as_str().expect("a base64 string");
    let published_body = String::from_utf8(BASE64.decode(published_body).unwrap()).unwrap();

    for (name, values) in headers_before.groups() {
        if header_rules
            .iter()
            .any(|rule| rule.eq_ignore_ascii_case(name))
        {
            for value in values {
                assert!(!published.contains(value), "header {name} leaked");
            }
        }
    }
    if rules.is_empty() {
        return;
    }
    if input.truncated || input.garbled {
        assert!(published_body.is_empty(), "an untrusted body was sent");
        return;
    }
    let mut hidden = Vec::new();
    for path in &paths {
        for selected in path.query(&body).all() {
            markers_in(selected, &mut hidden);
        }
    }
    for marker in &hidden {
        assert!(
            !published_body.contains(marker.as_str()) && !published.contains(marker.as_str()),
            "{marker} leaked through {rules:?}"
        );
    }
    let redacted: Value = serde_json::from_str(&published_body).expect("the body stays JSON");
    for path in &paths {
        for selected in path.query(&redacted).all() {
            assert_eq!(selected, REDACTED, "{path} still selects a value");
        }
    }
});
