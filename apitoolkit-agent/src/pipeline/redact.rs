//! Client-side redaction, applied to every payload before anything leaves the agent: header
//! values by name (case-insensitive) and JSON body values by JSONPath. JSON bodies, forms
//! (sent as the JSON object of their fields) and bodies of another or no declared type that
//! look like JSON have fields a rule can cover; the rest of other declared types (text, HTML,
//! XML, images) have none and are sent as they are, as the SDKs send them. Fails closed: a
//! body with fields that has rules but cannot be parsed as JSON, or is not whole, is withheld,
//! never sent as captured; so is one whose Content-Type does not parse, whose encoding could
//! not be undone, or whose headers were partly lost (its type may be among them).

use serde_json::Value;
use serde_json_path::JsonPath;

use super::{
    payload::{
        BodyKind, Payload, TAG_HEADERS_INCOMPLETE, TAG_REQUEST_BODY_INCOMPLETE,
        TAG_REQUEST_BODY_TRUNCATED, TAG_RESPONSE_BODY_INCOMPLETE, TAG_RESPONSE_BODY_TRUNCATED,
    },
    protocols::content::looks_like_json,
};

/// What replaces a redacted value (the SDKs' marker, which the backend recognises).
pub const REDACTED: &str = "[CLIENT_REDACTED]";

/// Tags saying a body was dropped because its redaction rules could not be applied.
pub const TAG_REQUEST_BODY_WITHHELD: &str = "apitoolkit.request_body_withheld";
pub const TAG_RESPONSE_BODY_WITHHELD: &str = "apitoolkit.response_body_withheld";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RuleError {
    #[error("invalid JSONPath {expression:?}: {reason}")]
    InvalidJsonPath { expression: String, reason: String },
}

/// Body rules for one direction.
#[derive(Debug, Default)]
struct BodyRules {
    paths: Vec<JsonPath>,
    withheld_tag: &'static str,
    /// Tags meaning the captured body is not the whole body: its JSON cannot be trusted.
    partial_tags: [&'static str; 2],
}

#[derive(Debug, Default)]
pub struct Redactor {
    /// Header names, lowercased (a handful: compared in turn, with no lowercased copy made).
    headers: Vec<String>,
    request_body: BodyRules,
    response_body: BodyRules,
}

fn compile(expressions: &[String]) -> Result<Vec<JsonPath>, RuleError> {
    expressions
        .iter()
        .map(|expression| {
            JsonPath::parse(expression).map_err(|error| RuleError::InvalidJsonPath {
                expression: expression.clone(),
                reason: error.to_string(),
            })
        })
        .collect()
}

/// Replaces every value the paths select; returns whether anything matched.
fn redact_value(value: &mut Value, paths: &[JsonPath]) -> bool {
    let pointers: Vec<String> = paths
        .iter()
        .flat_map(|path| {
            path.query_located(value)
                .locations()
                .map(|location| location.to_json_pointer())
                .collect::<Vec<_>>()
        })
        .collect();
    for pointer in &pointers {
        // A pointer under an already redacted parent no longer resolves: nothing left to hide.
        if let Some(target) = value.pointer_mut(pointer) {
            *target = Value::String(REDACTED.to_owned());
        }
    }
    !pointers.is_empty()
}

impl BodyRules {
    /// Redacts a body in place; withholds it when it has fields and cannot be redacted
    /// reliably.
    fn apply(&self, body: &mut Vec<u8>, kind: BodyKind, tags: &mut Vec<String>) {
        if self.paths.is_empty() || body.is_empty() {
            return;
        }
        let headers_lost = tags.iter().any(|tag| tag == TAG_HEADERS_INCOMPLETE);
        let has_fields = match kind {
            BodyKind::Other | BodyKind::Undeclared => headers_lost || looks_like_json(body),
            _ => true,
        };
        if !has_fields {
            return;
        }
        let partial = tags
            .iter()
            .any(|tag| self.partial_tags.contains(&tag.as_str()));
        let parsed = match kind {
            BodyKind::UnreadForm | BodyKind::Unparsed | BodyKind::Undecoded => None,
            _ => serde_json::from_slice::<Value>(body).ok(),
        };
        match parsed {
            Some(mut value) if !partial => {
                if redact_value(&mut value, &self.paths) {
                    body.clear();
                    serde_json::to_writer(&mut *body, &value).expect("a JSON value serializes");
                }
            }
            _ => {
                body.clear();
                tags.push(self.withheld_tag.to_owned());
            }
        }
    }
}

impl Redactor {
    /// Compiles the rules once; an invalid JSONPath is an error naming the expression.
    pub fn new(
        headers: &[String],
        request_body: &[String],
        response_body: &[String],
    ) -> Result<Self, RuleError> {
        Ok(Self {
            headers: headers
                .iter()
                .map(|name| name.to_ascii_lowercase())
                .collect(),
            request_body: BodyRules {
                paths: compile(request_body)?,
                withheld_tag: TAG_REQUEST_BODY_WITHHELD,
                partial_tags: [TAG_REQUEST_BODY_TRUNCATED, TAG_REQUEST_BODY_INCOMPLETE],
            },
            response_body: BodyRules {
                paths: compile(response_body)?,
                withheld_tag: TAG_RESPONSE_BODY_WITHHELD,
                partial_tags: [TAG_RESPONSE_BODY_TRUNCATED, TAG_RESPONSE_BODY_INCOMPLETE],
            },
        })
    }

    /// Whether header `name`'s values are replaced by the marker.
    pub fn redacts_header(&self, name: &str) -> bool {
        self.headers
            .iter()
            .any(|rule| rule.eq_ignore_ascii_case(name))
    }

    pub fn apply(&self, payload: &mut Payload) {
        if !self.headers.is_empty() {
            let covered = |name: &str| self.redacts_header(name);
            payload.request_headers.redact(covered, REDACTED);
            payload.response_headers.redact(covered, REDACTED);
            // `host` and `referer` are copies of request headers: a rule on one covers its copy.
            for (name, copy) in [
                ("host", &mut payload.host),
                ("referer", &mut payload.referer),
            ] {
                if !copy.is_empty() && self.redacts_header(name) {
                    *copy = REDACTED.to_owned();
                }
            }
        }
        self.request_body.apply(
            &mut payload.request_body,
            payload.request_body_kind,
            &mut payload.tags,
        );
        self.response_body.apply(
            &mut payload.response_body,
            payload.response_body_kind,
            &mut payload.tags,
        );
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::pipeline::payload::{HeaderMap, write_json};

    fn payload(request_body: &Value, response_body: &[u8]) -> Payload {
        let mut payload: Payload =
            serde_json::from_str(include_str!("../../../tests/fixtures/payload.json")).unwrap();
        payload.request_body = serde_json::to_vec(request_body).unwrap();
        payload.response_body = response_body.to_vec();
        payload.request_headers = fields(&[
            ("Authorization", "Bearer secret"),
            ("X-Api-Key", "k1"),
            ("Accept", "*/*"),
            ("X-Api-Key", "k2"),
        ]);
        payload.response_headers = fields(&[("set-cookie", "session=1")]);
        payload
    }

    fn fields(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect()
    }

    fn decoded(body: &[u8]) -> Value {
        serde_json::from_slice(body).unwrap()
    }

    fn values<'a>(headers: &'a HeaderMap, name: &'a str) -> Vec<&'a str> {
        headers.values(name).collect()
    }

    fn strings(values: &[&str]) -> Vec<String> {
        values.iter().map(|value| value.to_string()).collect()
    }

    #[test]
    fn a_header_rule_covers_the_fields_copied_from_that_header() {
        let redactor = Redactor::new(&strings(&["Referer", "HOST"]), &[], &[]).unwrap();
        let mut payload = payload(&json!({}), b"");
        payload.host = "internal.example:8443".to_owned();
        payload.referer = "https://example.com/?token=abc".to_owned();
        redactor.apply(&mut payload);
        let mut json = Vec::new();
        write_json(&payload, &mut json);
        let json: Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(json["host"], REDACTED);
        assert_eq!(json["referer"], REDACTED);
        let text = json.to_string();
        assert!(!text.contains("token=abc") && !text.contains("internal.example"));

        // An absent header has no copy to hide.
        let mut absent = self::payload(&json!({}), b"");
        absent.referer.clear();
        redactor.apply(&mut absent);
        assert_eq!(absent.referer, "");
    }

    #[test]
    fn headers_are_matched_case_insensitively_in_both_directions() {
        let redactor = Redactor::new(
            &strings(&["authorization", "X-API-KEY", "Set-Cookie"]),
            &[],
            &[],
        )
        .unwrap();
        let mut payload = payload(&json!({}), b"");
        redactor.apply(&mut payload);
        assert_eq!(
            values(&payload.request_headers, "Authorization"),
            [REDACTED]
        );
        assert_eq!(values(&payload.request_headers, "X-Api-Key"), [REDACTED]);
        assert_eq!(values(&payload.request_headers, "Accept"), ["*/*"]);
        assert_eq!(values(&payload.response_headers, "set-cookie"), [REDACTED]);
        // The rest keep their order and every value; a redacted name keeps one marker.
        assert_eq!(
            values(
                &fields(&[("Z", "1"), ("A", "2"), ("Z", "3"), ("a", "4")]),
                "Z"
            ),
            ["1", "3"]
        );
        let mut json = Vec::new();
        write_json(&payload, &mut json);
        let json: Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(
            json["request_headers"],
            json!({"Accept": ["*/*"], "Authorization": [REDACTED], "X-Api-Key": [REDACTED]})
        );
        assert_eq!(json["response_headers"], json!({"set-cookie": [REDACTED]}));
        let text = json.to_string();
        assert!(!text.contains("secret") && !text.contains("k1") && !text.contains("k2"));
    }

    #[test]
    fn nested_array_and_recursive_paths_redact_every_match_and_nothing_else() {
        let redactor = Redactor::new(
            &[],
            &strings(&["$.user.password", "$.items[*].secret", "$..token"]),
            &strings(&["$.missing.path"]),
        )
        .unwrap();
        let body = json!({
            "user": {"name": "bob", "password": "p@ss", "пароль": "keep"},
            "items": [{"secret": 1, "id": 1}, {"secret": {"deep": true}, "id": 2}],
            "a": {"b": {"token": "t1", "c": [{"token": "t2"}]}},
            "token": "t0"
        });
        let mut payload = payload(&body, br#"{"ok": true}"#);
        let response_before = payload.response_body.clone();
        redactor.apply(&mut payload);
        assert_eq!(
            decoded(&payload.request_body),
            json!({
                "user": {"name": "bob", "password": REDACTED, "пароль": "keep"},
                "items": [{"secret": REDACTED, "id": 1}, {"secret": REDACTED, "id": 2}],
                "a": {"b": {"token": REDACTED, "c": [{"token": REDACTED}]}},
                "token": REDACTED
            })
        );
        assert_eq!(
            payload.response_body, response_before,
            "no match leaves the bytes alone"
        );
        assert!(payload.tags.iter().all(|tag| !tag.contains("withheld")));
    }

    #[test]
    fn unparsable_or_partial_bodies_with_fields_and_rules_are_withheld() {
        let redactor =
            Redactor::new(&[], &strings(&["$.password"]), &strings(&["$..token"])).unwrap();
        let mut payload = payload(&json!({"password": "x"}), b"{\"token\": \"abc\"");
        payload.request_body_kind = BodyKind::Json;
        payload.response_body_kind = BodyKind::Json;
        payload.tags.push(TAG_REQUEST_BODY_TRUNCATED.to_owned());
        redactor.apply(&mut payload);
        assert!(payload.request_body.is_empty());
        assert!(payload.response_body.is_empty());
        assert!(payload.tags.contains(&TAG_REQUEST_BODY_WITHHELD.to_owned()));
        assert!(
            payload
                .tags
                .contains(&TAG_RESPONSE_BODY_WITHHELD.to_owned())
        );
    }

    /// (kind, body, partial) -> whether a body under rules is sent (redacted or as it is).
    fn sent_under_rules(kind: BodyKind, body: &[u8], partial: bool) -> Option<Vec<u8>> {
        let redactor = Redactor::new(&[], &[], &strings(&["$.password"])).unwrap();
        let mut payload = payload(&json!({}), body);
        payload.response_body_kind = kind;
        if partial {
            payload.tags.push(TAG_RESPONSE_BODY_INCOMPLETE.to_owned());
        }
        redactor.apply(&mut payload);
        let withheld = payload
            .tags
            .contains(&TAG_RESPONSE_BODY_WITHHELD.to_owned());
        assert_eq!(withheld, payload.response_body.is_empty());
        (!withheld).then_some(payload.response_body)
    }

    #[test]
    fn a_body_is_redacted_withheld_or_sent_by_what_it_declares() {
        use BodyKind::*;
        let secret = br#"{"user": "bob", "password": "hunter2"}"#;
        let redacted = br#"{"user":"bob","password":"[CLIENT_REDACTED]"}"#.to_vec();
        // Fields a rule can cover: JSON, forms turned into JSON, JSON-looking bodies of another
        // or no declared type (browsers send fetch() JSON as text/plain).
        for kind in [Json, Form, Undeclared, Other] {
            assert_eq!(
                sent_under_rules(kind, secret, false),
                Some(redacted.clone()),
                "{kind:?}"
            );
            assert_eq!(sent_under_rules(kind, secret, true), None, "{kind:?} cut");
        }
        for broken in [&b"{\"password\": \"hunt"[..], b"  [1, 2", b"not json"] {
            assert_eq!(sent_under_rules(Json, broken, false), None);
        }
        assert_eq!(
            sent_under_rules(Undeclared, b"\n {\"password\": ", false),
            None
        );
        // Nothing can be assumed of a form that was not read, a Content-Type that does not
        // parse (the service may read a form), or an encoding left undone (compressed JSON).
        for kind in [UnreadForm, Unparsed, Undecoded] {
            assert_eq!(sent_under_rules(kind, b"password=hunter2", false), None);
        }
        // No field a JSONPath could name: sent as it is, even cut.
        let opaque: [&[u8]; 4] = [
            b"password=hunter2 in plain text",
            b"<html><body>password</body></html>",
            b"<?xml version=\"1.0\"?><password>x</password>",
            &[0x89, b'P', b'N', b'G', 0, 0xff],
        ];
        for body in opaque {
            assert_eq!(sent_under_rules(Other, body, true), Some(body.to_vec()));
        }
        assert_eq!(
            sent_under_rules(Undeclared, b"plain words", true),
            Some(b"plain words".to_vec())
        );
    }

    /// HTTP/2 headers lost to a gap may have held the Content-Type or Content-Encoding: a
    /// body that does not parse as JSON is withheld whatever type is left.
    #[test]
    fn a_body_whose_headers_were_partly_lost_must_parse_as_json() {
        let redactor = Redactor::new(&[], &[], &strings(&["$.password"])).unwrap();
        for (body, sent) in [
            (&b"password=hunter2"[..], false),
            (br#"{"password": "hunter2"}"#, true),
        ] {
            let mut payload = payload(&json!({}), body);
            payload.response_body_kind = BodyKind::Undeclared;
            payload.tags.push(TAG_HEADERS_INCOMPLETE.to_owned());
            redactor.apply(&mut payload);
            assert_eq!(!payload.response_body.is_empty(), sent);
            assert!(!String::from_utf8_lossy(&payload.response_body).contains("hunter2"));
        }
    }

    #[test]
    fn invalid_jsonpath_names_the_expression() {
        let error = Redactor::new(&[], &strings(&["$.ok", "$[?bad"]), &[]).unwrap_err();
        assert!(
            matches!(&error, RuleError::InvalidJsonPath { expression, .. } if expression == "$[?bad")
        );
        assert!(error.to_string().contains("$[?bad"));
    }

    #[test]
    fn huge_arrays_and_deep_nesting() {
        let redactor = Redactor::new(&[], &strings(&["$..secret"]), &[]).unwrap();
        let mut deep = json!({"secret": "bottom"});
        for _ in 0..60 {
            deep = json!({"level": deep});
        }
        let items: Vec<Value> = (0..20_000).map(|i| json!({"secret": i, "n": i})).collect();
        let mut payload = payload(&json!({"deep": deep, "items": items}), b"");
        redactor.apply(&mut payload);
        let text = String::from_utf8(payload.request_body).unwrap();
        assert!(!text.contains("bottom"));
        assert_eq!(text.matches(REDACTED).count(), 20_001);
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            any::<i64>().prop_map(Value::from),
            "[a-z]{0,8}".prop_map(Value::from),
            Just(Value::Null),
        ];
        leaf.prop_recursive(4, 64, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map("[a-z]{1,6}", inner, 0..6)
                    .prop_map(|map| Value::Object(map.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Wherever a `secret` key sits, its value never reaches the published bytes.
        #[test]
        fn a_redacted_value_never_appears_in_the_payload(
            base in json_value(),
            pointer_depth in 0usize..4,
        ) {
            let marker = "S3CR3T-VALUE-71";
            let mut body = base;
            let mut slot = &mut body;
            for _ in 0..pointer_depth {
                if !slot.is_object() {
                    break;
                }
                let object = slot.as_object_mut().unwrap();
                let key = object.keys().next().cloned().unwrap_or_else(|| "k".to_owned());
                let entry = object.entry(key).or_insert_with(|| json!({}));
                if !entry.is_object() {
                    *entry = json!({});
                }
                slot = entry;
            }
            if !slot.is_object() {
                *slot = json!({});
            }
            slot.as_object_mut().unwrap().insert("secret".into(), json!(marker));
            let redactor = Redactor::new(&[], &strings(&["$..secret"]), &[]).unwrap();
            let mut payload = payload(&body, b"");
            redactor.apply(&mut payload);
            let mut published = Vec::new();
            write_json(&payload, &mut published);
            let published: Value = serde_json::from_slice(&published).unwrap();
            let sent_body = base64_simd::STANDARD
                .decode_to_vec(published["request_body"].as_str().unwrap())
                .unwrap();
            prop_assert!(!String::from_utf8_lossy(&sent_body).contains(marker));
            prop_assert!(!published.to_string().contains(marker));
        }
    }
}
