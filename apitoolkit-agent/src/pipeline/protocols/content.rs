//! Content-Encoding decoding of captured bodies (gzip, deflate).

use std::io::Read;

use flate2::read::{DeflateDecoder, MultiGzDecoder, ZlibDecoder};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ContentError {
    #[error("unsupported Content-Encoding {0:?}")]
    Unsupported(String),
    #[error("corrupt {0} body")]
    Corrupt(&'static str),
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
