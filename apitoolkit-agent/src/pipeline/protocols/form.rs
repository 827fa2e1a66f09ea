//! Form bodies as the JSON object of their fields, the way the APIToolkit SDKs send them, so
//! JSONPath redaction covers them like any JSON body: `application/x-www-form-urlencoded`
//! (decoded by `form_urlencoded`) and `multipart/form-data` (parsed by `multer`). A multipart
//! file is summarised, never inlined: `{"filename": …, "content_type": …, "size": <bytes>}`.

use std::{
    convert::Infallible,
    pin::pin,
    task::{Context, Poll, Waker},
};

use bytes::Bytes;
use serde_json::{Map, Value};

/// How a field sent more than once appears in the JSON object, as each SDK builds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FormShape {
    /// Each field's first value (apitoolkit-flask: werkzeug's `request.form.to_dict()`).
    FirstValue,
    /// Every field an array of all its values (apitoolkit-django: `dict(request.POST)`).
    ValueLists,
}

#[derive(Debug, thiserror::Error)]
pub enum FormError {
    #[error("multipart form unreadable: {0}")]
    Multipart(#[from] multer::Error),
    #[error("multipart parser waited for more input than the body holds")]
    Pending,
}

/// The fields of a form, in the order they first appear.
#[derive(Debug)]
struct Fields {
    shape: FormShape,
    object: Map<String, Value>,
}

impl Fields {
    fn new(shape: FormShape) -> Self {
        Self {
            shape,
            object: Map::new(),
        }
    }

    fn add(&mut self, name: String, value: Value) {
        match self.shape {
            FormShape::FirstValue => {
                self.object.entry(name).or_insert(value);
            }
            FormShape::ValueLists => {
                if let Value::Array(values) = self
                    .object
                    .entry(name)
                    .or_insert_with(|| Value::Array(Vec::new()))
                {
                    values.push(value);
                }
            }
        }
    }
}

/// The fields of a url-encoded form (`+` and `%XX` decoded; a key without `=` has value `""`).
pub fn url_encoded(body: &[u8], shape: FormShape) -> Map<String, Value> {
    let mut fields = Fields::new(shape);
    for (name, value) in form_urlencoded::parse(body) {
        fields.add(name.into_owned(), Value::String(value.into_owned()));
    }
    fields.object
}

/// A multipart form read as far as it goes: the fields of every whole part, and the error that
/// stopped it, if any (a body cut short ends in one).
#[derive(Debug)]
pub struct Multipart {
    pub fields: Map<String, Value>,
    pub error: Option<FormError>,
}

/// The fields of a `multipart/form-data` body: text parts as strings (decoded by their
/// charset, UTF-8 by default), file parts (those with a filename) as their summary. Parts
/// without a name are skipped, as the frameworks skip them.
pub fn multipart(body: &[u8], boundary: &str, shape: FormShape) -> Multipart {
    let mut fields = Fields::new(shape);
    let chunk = Bytes::copy_from_slice(body);
    let stream = futures_util::stream::iter([Ok::<_, Infallible>(chunk)]);
    let mut parser = multer::Multipart::new(stream, boundary);
    let read = read_parts(&mut parser, &mut fields);
    // The whole body is in memory, so the parser never waits: one poll runs it to the end.
    let error = match pin!(read)
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(Ok(())) => None,
        Poll::Ready(Err(error)) => Some(FormError::Multipart(error)),
        Poll::Pending => Some(FormError::Pending),
    };
    Multipart {
        fields: fields.object,
        error,
    }
}

async fn read_parts(parser: &mut multer::Multipart<'_>, fields: &mut Fields) -> multer::Result<()> {
    while let Some(mut field) = parser.next_field().await? {
        let Some(name) = field.name().map(str::to_owned) else {
            continue;
        };
        let value = match field.file_name() {
            Some(filename) => {
                let mut summary = Map::new();
                summary.insert("filename".into(), Value::String(filename.to_owned()));
                summary.insert(
                    "content_type".into(),
                    field
                        .content_type()
                        .map_or(Value::Null, |mime| Value::String(mime.to_string())),
                );
                let mut size = 0u64;
                while let Some(chunk) = field.chunk().await? {
                    size += chunk.len() as u64;
                }
                summary.insert("size".into(), Value::from(size));
                Value::Object(summary)
            }
            None => Value::String(field.text().await?),
        };
        fields.add(name, value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn url_encoded_fields_decode_and_repeat_as_each_sdk_does() {
        let body =
            b"user=bob&password=p%40ss+word&tag=a&tag=b&flag&=empty-name&&caf%C3%A9=%E2%82%AC";
        assert_eq!(
            Value::Object(url_encoded(body, FormShape::FirstValue)),
            json!({"user": "bob", "password": "p@ss word", "tag": "a", "flag": "", "": "empty-name", "café": "€"})
        );
        assert_eq!(
            Value::Object(url_encoded(b"tag=a&user=bob&tag=b", FormShape::ValueLists)),
            json!({"tag": ["a", "b"], "user": ["bob"]})
        );
        let order: Vec<String> = url_encoded(b"z=1&a=2&m=3", FormShape::FirstValue)
            .keys()
            .cloned()
            .collect();
        assert_eq!(order, ["z", "a", "m"], "fields keep their order");
    }

    const BOUNDARY: &str = "----form7MA4YWxkTrZu0gW";

    fn multipart_body() -> Vec<u8> {
        let mut body = Vec::new();
        let part = |body: &mut Vec<u8>, headers: &str, content: &[u8]| {
            body.extend_from_slice(format!("--{BOUNDARY}\r\n{headers}\r\n\r\n").as_bytes());
            body.extend_from_slice(content);
            body.extend_from_slice(b"\r\n");
        };
        part(
            &mut body,
            "Content-Disposition: form-data; name=\"user\"",
            b"bob",
        );
        part(
            &mut body,
            "Content-Disposition: form-data; name=\"password\"",
            b"hunter2",
        );
        part(
            &mut body,
            "Content-Disposition: form-data; name=\"avatar\"; filename=\"me.png\"\r\nContent-Type: image/png",
            &[0x89, b'P', b'N', b'G', 0, 0xff, b'\r', b'\n', 7],
        );
        part(
            &mut body,
            "Content-Disposition: form-data; name=\"note\"\r\nContent-Type: text/plain; charset=iso-8859-1",
            b"caf\xe9",
        );
        part(
            &mut body,
            "Content-Disposition: form-data; name=\"user\"",
            b"alice",
        );
        body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
        body
    }

    #[test]
    fn multipart_text_fields_are_values_and_files_are_summarised() {
        let form = multipart(&multipart_body(), BOUNDARY, FormShape::FirstValue);
        assert!(form.error.is_none(), "{:?}", form.error);
        assert_eq!(
            Value::Object(form.fields),
            json!({
                "user": "bob",
                "password": "hunter2",
                "avatar": {"filename": "me.png", "content_type": "image/png", "size": 9},
                "note": "café",
            })
        );
        let lists = multipart(&multipart_body(), BOUNDARY, FormShape::ValueLists);
        assert_eq!(lists.fields["user"], json!(["bob", "alice"]));
    }

    #[test]
    fn a_cut_multipart_keeps_its_whole_parts_and_says_why_it_stopped() {
        let body = multipart_body();
        let cut = body
            .windows(7)
            .position(|window| window == b"hunter2")
            .unwrap()
            + 3;
        let form = multipart(&body[..cut], BOUNDARY, FormShape::FirstValue);
        assert_eq!(Value::Object(form.fields), json!({"user": "bob"}));
        assert!(matches!(form.error, Some(FormError::Multipart(_))));

        let wrong_boundary = multipart(&body, "not-the-boundary", FormShape::FirstValue);
        assert!(wrong_boundary.fields.is_empty());
        assert!(wrong_boundary.error.is_some());
    }
}
