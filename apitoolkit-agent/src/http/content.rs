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
/// reverse). `identity` and an absent header leave the body as it is.
pub fn decode(
    content_encoding: Option<&str>,
    body: &[u8],
    max_bytes: usize,
) -> Result<Decoded, ContentError> {
    let mut current = Decoded {
        bytes: body.to_vec(),
        truncated: false,
    };
    let encodings = content_encoding.unwrap_or_default();
    for encoding in encodings
        .rsplit(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
    {
        let next = match encoding.to_ascii_lowercase().as_str() {
            "identity" => continue,
            "gzip" | "x-gzip" => {
                read_limited(MultiGzDecoder::new(&current.bytes[..]), max_bytes, "gzip")?
            }
            // Servers disagree on whether "deflate" means zlib-wrapped or raw; try both.
            "deflate" => read_limited(ZlibDecoder::new(&current.bytes[..]), max_bytes, "deflate")
                .or_else(|_| {
                read_limited(
                    DeflateDecoder::new(&current.bytes[..]),
                    max_bytes,
                    "deflate",
                )
            })?,
            other => return Err(ContentError::Unsupported(other.to_owned())),
        };
        current = Decoded {
            bytes: next.bytes,
            truncated: current.truncated || next.truncated,
        };
    }
    Ok(current)
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
            decode(Some("gzip"), &gzip, 100).unwrap().bytes,
            b"{\"ok\":true}"
        );

        let mut zlib = ZlibEncoder::new(Vec::new(), Compression::default());
        zlib.write_all(b"hello").unwrap();
        let zlib = zlib.finish().unwrap();
        assert_eq!(decode(Some("Deflate"), &zlib, 100).unwrap().bytes, b"hello");
    }

    #[test]
    fn decoded_size_is_bounded() {
        let mut gzip = GzEncoder::new(Vec::new(), Compression::default());
        gzip.write_all(&[b'a'; 10_000]).unwrap();
        let decoded = decode(Some("gzip"), &gzip.finish().unwrap(), 100).unwrap();
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
        assert_eq!(decode(None, b"plain", 10).unwrap().bytes, b"plain");
    }
}
