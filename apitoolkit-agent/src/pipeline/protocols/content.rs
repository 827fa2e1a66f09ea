//! What a captured body is: its Content-Type (JSON, a form, something else) and its
//! Content-Encoding undone (gzip, deflate).

use std::io::Read;

use flate2::read::{DeflateDecoder, MultiGzDecoder, ZlibDecoder};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ContentError {
    #[error("unsupported Content-Encoding {0:?}")]
    Unsupported(String),
    #[error("corrupt {0} body")]
    Corrupt(&'static str),
}

/// What a Content-Type header declares, as far as the payload cares.
#[derive(Debug, PartialEq, Eq)]
pub enum MediaType {
    /// `application/json`, `…+json`, or any type naming JSON (`application/x-ndjson`).
    Json,
    UrlEncodedForm,
    /// `multipart/form-data`; `None` when it names no boundary.
    MultipartForm {
        boundary: Option<String>,
    },
    /// Any other declared type (text, HTML, XML, images …).
    Other,
    /// A Content-Type that does not parse: the service may still read it as a form (Werkzeug
    /// is lenient), so nothing can be assumed about the body.
    Unparsed,
    /// No Content-Type.
    Undeclared,
}

/// Whether a body starts like a JSON object or array (after white space): one with no type,
/// or another declared type (browsers send `fetch()` JSON as `text/plain`), is taken for JSON.
pub fn looks_like_json(bytes: &[u8]) -> bool {
    matches!(
        bytes.iter().find(|byte| !byte.is_ascii_whitespace()),
        Some(b'{' | b'[')
    )
}

/// Classifies a Content-Type header value (case-insensitive, parameters allowed).
pub fn media_type(content_type: Option<&str>) -> MediaType {
    let Some(content_type) = content_type else {
        return MediaType::Undeclared;
    };
    let Ok(mime) = content_type.trim().parse::<mime::Mime>() else {
        return MediaType::Unparsed;
    };
    if mime.subtype().as_str().contains("json") || mime.suffix() == Some(mime::JSON) {
        MediaType::Json
    } else if mime.essence_str() == mime::APPLICATION_WWW_FORM_URLENCODED.essence_str() {
        MediaType::UrlEncodedForm
    } else if mime.essence_str() == mime::MULTIPART_FORM_DATA.essence_str() {
        MediaType::MultipartForm {
            boundary: mime
                .get_param(mime::BOUNDARY)
                .map(|boundary| boundary.as_str().to_owned()),
        }
    } else {
        MediaType::Other
    }
}

/// The decoded body and whether the decoded form was cut at `max_bytes`.
#[derive(Debug, PartialEq, Eq)]
pub struct Decoded {
    pub bytes: Vec<u8>,
    pub truncated: bool,
}

fn read_limited(
    reader: impl Read,
    max_bytes: usize,
    name: &'static str,
) -> Result<Decoded, ContentError> {
    let mut bytes = Vec::new();
    reader
        .take(max_bytes as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|_| ContentError::Corrupt(name))?;
    let truncated = bytes.len() > max_bytes;
    bytes.truncate(max_bytes);
    Ok(Decoded { bytes, truncated })
}

/// Undoes `content_encoding` (the header value; encodings applied in order, so undone in
/// reverse). `None` when there is nothing to undo (`identity` or no header), so the caller can
/// use the body as it is without a copy.
pub fn decode(
    content_encoding: Option<&str>,
    body: &[u8],
    max_bytes: usize,
) -> Result<Option<Decoded>, ContentError> {
    let encodings: Vec<String> = content_encoding
        .unwrap_or_default()
        .rsplit(',')
        .map(|encoding| encoding.trim().to_ascii_lowercase())
        .filter(|encoding| !encoding.is_empty() && encoding != "identity")
        .collect();
    if encodings.is_empty() {
        return Ok(None);
    }
    let mut current = Decoded {
        bytes: body.to_vec(),
        truncated: false,
    };
    for encoding in encodings {
        let input = &current.bytes[..];
        let next = match encoding.as_str() {
            "gzip" | "x-gzip" => read_limited(MultiGzDecoder::new(input), max_bytes, "gzip")?,
            // Servers disagree on whether "deflate" means zlib-wrapped or raw; try both.
            "deflate" => read_limited(ZlibDecoder::new(input), max_bytes, "deflate")
                .or_else(|_| read_limited(DeflateDecoder::new(input), max_bytes, "deflate"))?,
            _ => return Err(ContentError::Unsupported(encoding)),
        };
        current = Decoded {
            bytes: next.bytes,
            truncated: current.truncated || next.truncated,
        };
    }
    Ok(Some(current))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use flate2::{
        Compression,
        write::{GzEncoder, ZlibEncoder},
    };

    use super::*;

    #[test]
    fn media_types_are_classified_by_essence_and_parameters() {
        for json in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/problem+json",
            "application/x-ndjson",
            "text/json",
        ] {
            assert_eq!(media_type(Some(json)), MediaType::Json, "{json}");
        }
        assert_eq!(
            media_type(Some("application/x-www-form-urlencoded; charset=UTF-8")),
            MediaType::UrlEncodedForm
        );
        assert_eq!(
            media_type(Some("multipart/form-data; boundary=\"a b;c\"")),
            MediaType::MultipartForm {
                boundary: Some("a b;c".into())
            }
        );
        assert_eq!(
            media_type(Some("multipart/form-data")),
            MediaType::MultipartForm { boundary: None }
        );
        for other in [
            "text/plain",
            "text/html; charset=utf-8",
            "application/xml",
            "image/png",
        ] {
            assert_eq!(media_type(Some(other)), MediaType::Other, "{other}");
        }
        assert_eq!(media_type(None), MediaType::Undeclared);
        assert_eq!(media_type(Some("not a type")), MediaType::Unparsed);
    }

    #[test]
    fn gzip_and_deflate_round_trip() {
        let mut gzip = GzEncoder::new(Vec::new(), Compression::default());
        gzip.write_all(b"{\"ok\":true}").unwrap();
        let gzip = gzip.finish().unwrap();
        assert_eq!(
            decode(Some("gzip"), &gzip, 100).unwrap().unwrap().bytes,
            b"{\"ok\":true}"
        );

        let mut zlib = ZlibEncoder::new(Vec::new(), Compression::default());
        zlib.write_all(b"hello").unwrap();
        let zlib = zlib.finish().unwrap();
        assert_eq!(
            decode(Some("Deflate"), &zlib, 100).unwrap().unwrap().bytes,
            b"hello"
        );
    }

    #[test]
    fn decoded_size_is_bounded() {
        let mut gzip = GzEncoder::new(Vec::new(), Compression::default());
        gzip.write_all(&[b'a'; 10_000]).unwrap();
        let decoded = decode(Some("gzip"), &gzip.finish().unwrap(), 100)
            .unwrap()
            .unwrap();
        assert_eq!(decoded.bytes.len(), 100);
        assert!(decoded.truncated);
    }

    #[test]
    fn unknown_and_corrupt_encodings_are_errors() {
        assert_eq!(
            decode(Some("br"), b"x", 10),
            Err(ContentError::Unsupported("br".into()))
        );
        assert_eq!(
            decode(Some("gzip"), b"not gzip", 10),
            Err(ContentError::Corrupt("gzip"))
        );
        assert_eq!(decode(None, b"plain", 10), Ok(None));
        assert_eq!(decode(Some("identity"), b"plain", 10), Ok(None));
    }
}
