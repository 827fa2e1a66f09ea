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

/// Classifies a Content-Type header value (case-insensitive, parameters allowed). The value is
/// read as the `mime` crate 0.3 reads it (a test compares the two on generated values), without
/// its lowercased copy of the whole value.
pub fn media_type(content_type: Option<&str>) -> MediaType {
    let Some(content_type) = content_type else {
        return MediaType::Undeclared;
    };
    let Some(parsed) = ParsedType::parse(content_type.trim()) else {
        return MediaType::Unparsed;
    };
    let is = |text: &str, expected: &str| text.eq_ignore_ascii_case(expected);
    let names_json = parsed
        .subtype
        .as_bytes()
        .windows(4)
        .any(|window| window.eq_ignore_ascii_case(b"json"));
    if names_json || parsed.suffix.is_some_and(|suffix| is(suffix, "json")) {
        MediaType::Json
    } else if is(parsed.essence, "application/x-www-form-urlencoded") {
        MediaType::UrlEncodedForm
    } else if is(parsed.essence, "multipart/form-data") {
        MediaType::MultipartForm {
            boundary: parsed.boundary.map(str::to_owned),
        }
    } else {
        MediaType::Other
    }
}

/// The parts of a Content-Type value [`media_type`] looks at, borrowed from it.
#[derive(Debug, PartialEq, Eq)]
struct ParsedType<'a> {
    /// `type/subtype+suffix`, as written.
    essence: &'a str,
    /// The subtype up to its last `+` (one that is not its first byte).
    subtype: &'a str,
    suffix: Option<&'a str>,
    /// The first `boundary` parameter's value (name in any case), without its quotes.
    boundary: Option<&'a str>,
}

/// RFC 7230 `tchar`: what a type, a subtype and a parameter name are made of.
fn is_token(byte: u8) -> bool {
    const TOKEN: [bool; 256] = {
        let mut table = [false; 256];
        let mut byte = 0;
        while byte < 256 {
            table[byte] = matches!(byte as u8,
                b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z' | b'!' | b'#' | b'$' | b'%' | b'&'
                | b'\'' | b'*' | b'+' | b'-' | b'.' | b'^' | b'_' | b'`' | b'|' | b'~');
            byte += 1;
        }
        table
    };
    TOKEN[usize::from(byte)]
}

impl<'a> ParsedType<'a> {
    /// `type "/" subtype *(";" *" " name "=" (token / quoted))`, with the `mime` crate's
    /// leniencies and strictness: the subtype may be empty, a value may be empty unquoted but
    /// not quoted, a quoted value ends at the next quote (no escapes), only spaces may follow
    /// its closing quote or precede a name, and any other byte out of place is an error.
    fn parse(text: &'a str) -> Option<Self> {
        let bytes = text.as_bytes();
        let slash = bytes.iter().position(|&byte| !is_token(byte))?;
        if slash == 0 || bytes[slash] != b'/' {
            return None;
        }
        let subtype_start = slash + 1;
        let mut plus = None;
        let mut at = subtype_start;
        let essence_end = loop {
            match bytes.get(at) {
                None => break at,
                Some(b'+') if at > subtype_start => plus = Some(at),
                Some(b';') if at > subtype_start => break at,
                Some(&byte) if is_token(byte) => {}
                Some(_) => return None,
            }
            at += 1;
        };
        let boundary = match essence_end < bytes.len() {
            true => Self::boundary(text, essence_end + 1)?,
            false => None,
        };
        Some(Self {
            essence: &text[..essence_end],
            subtype: &text[subtype_start..plus.unwrap_or(essence_end)],
            suffix: plus.map(|plus| &text[plus + 1..essence_end]),
            boundary,
        })
    }

    /// Reads the parameters from `start` (after the `;`): `None` when they do not parse,
    /// `Some(None)` when they do and name no boundary.
    fn boundary(text: &'a str, mut start: usize) -> Option<Option<&'a str>> {
        let bytes = text.as_bytes();
        let mut boundary = None;
        while start < bytes.len() {
            if bytes[start] == b' ' {
                start += 1;
                continue;
            }
            let equals = start + bytes[start..].iter().position(|&byte| !is_token(byte))?;
            if equals == start || bytes[equals] != b'=' {
                return None;
            }
            let name = &text[start..equals];
            let value_start = equals + 1;
            let value;
            if bytes.get(value_start) == Some(&b'"') {
                // The byte after the opening quote is part of the value even if it is a quote.
                let first = value_start + 1;
                let quoted = |byte: u8| byte > 31 && byte != 127;
                let close = bytes
                    .get(first + 1..)?
                    .iter()
                    .position(|&byte| byte == b'"' || !quoted(byte))
                    .map(|offset| first + 1 + offset)?;
                if !quoted(bytes[first]) || bytes[close] != b'"' {
                    return None;
                }
                value = &text[first..close];
                start = close + 1;
                // Only spaces, then `;` or the end.
                loop {
                    match bytes.get(start) {
                        None => break,
                        Some(b' ') => start += 1,
                        Some(b';') => {
                            start += 1;
                            break;
                        }
                        Some(_) => return None,
                    }
                }
            } else {
                let end = bytes[value_start..]
                    .iter()
                    .position(|&byte| !is_token(byte))
                    .map_or(bytes.len(), |offset| value_start + offset);
                match bytes.get(end) {
                    None => start = end,
                    Some(b';') if end > value_start => start = end + 1,
                    Some(_) => return None,
                }
                value = &text[value_start..end];
            }
            if boundary.is_none() && name.eq_ignore_ascii_case("boundary") {
                boundary = Some(value);
            }
        }
        Some(boundary)
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
    let mut encodings = content_encoding
        .unwrap_or_default()
        .rsplit(',')
        .map(str::trim)
        .filter(|encoding| !encoding.is_empty() && !encoding.eq_ignore_ascii_case("identity"))
        .peekable();
    if encodings.peek().is_none() {
        return Ok(None);
    }
    let mut current = Decoded {
        bytes: body.to_vec(),
        truncated: false,
    };
    for encoding in encodings {
        let input = &current.bytes[..];
        let is = |name: &str| encoding.eq_ignore_ascii_case(name);
        let next = if is("gzip") || is("x-gzip") {
            read_limited(MultiGzDecoder::new(input), max_bytes, "gzip")?
        } else if is("deflate") {
            // Servers disagree on whether "deflate" means zlib-wrapped or raw; try both.
            read_limited(ZlibDecoder::new(input), max_bytes, "deflate")
                .or_else(|_| read_limited(DeflateDecoder::new(input), max_bytes, "deflate"))?
        } else {
            return Err(ContentError::Unsupported(encoding.to_ascii_lowercase()));
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
    fn content_types_parse_with_the_mime_crates_leniencies_and_strictness() {
        let parsed = |text| ParsedType::parse(text);
        let boundary = |text| parsed(text).expect(text).boundary;
        assert_eq!(
            parsed("Image/SVG+xml; q=1"),
            Some(ParsedType {
                essence: "Image/SVG+xml",
                subtype: "SVG",
                suffix: Some("xml"),
                boundary: None,
            })
        );
        // The suffix follows the last `+`, not a leading one.
        assert_eq!(parsed("a/+b+c").unwrap().subtype, "+b");
        assert_eq!(parsed("a/+b").unwrap().suffix, None);
        assert_eq!(
            boundary("multipart/form-data;BOUNDARY=Ab;boundary=z"),
            Some("Ab")
        );
        assert_eq!(
            boundary("multipart/form-data; boundary=\"a\"  ; x=1"),
            Some("a")
        );
        // The byte after an opening quote belongs to the value, even a quote.
        assert_eq!(boundary("m/f; boundary=\"\"\""), Some("\""));
        assert_eq!(boundary("m/f; boundary="), Some(""));
        for valid in ["text/", "a/b;", "a/b; ", "a/b;x=1;", "a/b;  x=1"] {
            assert!(parsed(valid).is_some(), "{valid}");
        }
        for invalid in [
            "",
            "/b",
            "text",
            "a/;x=1",
            "a b/c",
            "text/html ; x=1",
            "a/b;x",
            "a/b;=x",
            "a/b;x =1",
            "a/b;x=;y=1",
            "a/b;x=\"\"",
            "a/b;x=\"abc",
            "a/b;x=\"a\"b",
            "a/b;x=a b",
            "a/b;x=\"a\x7fb\"",
            "tëxt/plain",
        ] {
            assert_eq!(parsed(invalid), None, "{invalid}");
        }
    }

    /// What `media_type` was before it had its own parser: the `mime` crate's reading.
    fn media_type_by_mime(content_type: &str) -> MediaType {
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

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(20_000))]
        #[test]
        fn media_types_are_read_as_the_mime_crate_reads_them(
            text in "(multipart/form-data|Multipart/Form-Data|application/x-www-form-urlencoded|\
                application/|text/|\\+json|JSON|[; ]{1,2}boundary=|; BOUNDARY=\"|charset=utf-8|\
                [a-z+/;= \"\t\x01\x7f*é])*",
        ) {
            proptest::prop_assert_eq!(media_type(Some(&text)), media_type_by_mime(&text), "{:?}", text);
        }
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
