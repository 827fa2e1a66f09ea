//! HPACK (RFC 7541) for a connection joined mid-stream, whose dynamic table began before the
//! agent saw it. No crate decodes with an unknown table: httlib-hpack (used for connections
//! seen from their start) stops at the first unknown index. Here an unknown entry is reported
//! as unknown and decoding goes on, never guessing:
//! - an index names the entry that many insertions ago on both sides (evictions only drop the
//!   oldest entries), so every entry inserted since the agent joined is known exactly;
//! - an index past those names an entry from before: unknown, and so is an entry inserted
//!   with such a name (its value is known, not its name), kept as a placeholder so that the
//!   indices stay aligned;
//! - table size updates and evictions cannot be followed without the older entries' sizes,
//!   so the table keeps at most [`MAX_ENTRIES`] (the most any peer's table could reference is
//!   bounded by its size; a size update to 0 empties it).
//!
//! Strings use httlib-huffman, the Huffman decoder of httlib-hpack.

use std::collections::VecDeque;

use httlib_huffman::DecoderSpeed;

/// Entries kept: a 64 KiB table of the smallest possible entries (32 bytes of overhead each).
const MAX_ENTRIES: usize = 2048;

/// RFC 7541 Appendix A.
const STATIC_TABLE: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// A header field as far as it can be known.
type Field = (Option<String>, Option<String>);

/// The fields of one block: the ones fully known, and whether any was not.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PartialBlock {
    pub headers: Vec<(String, String)>,
    pub incomplete: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Malformed;

#[derive(Default)]
pub struct PartialDecoder {
    /// Newest first, as indices count.
    table: VecDeque<Field>,
}

/// An HPACK integer with an `prefix`-bit prefix (RFC 7541 §5.1).
fn integer(block: &[u8], at: &mut usize, prefix: u8) -> Result<usize, Malformed> {
    let mask = (1u16 << prefix) as u8 - 1;
    let first = *block.get(*at).ok_or(Malformed)? & mask;
    *at += 1;
    if first < mask {
        return Ok(usize::from(first));
    }
    let mut value = usize::from(mask);
    for shift in (0..28).step_by(7) {
        let byte = *block.get(*at).ok_or(Malformed)?;
        *at += 1;
        value += usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(Malformed)
}

impl PartialDecoder {
    fn string(&self, block: &[u8], at: &mut usize) -> Result<String, Malformed> {
        let huffman = *block.get(*at).ok_or(Malformed)? & 0x80 != 0;
        let len = integer(block, at, 7)?;
        let bytes = block.get(*at..*at + len).ok_or(Malformed)?;
        *at += len;
        let decoded = if huffman {
            let mut decoded = Vec::with_capacity(bytes.len() * 2);
            httlib_huffman::decode(bytes, &mut decoded, DecoderSpeed::FiveBits)
                .map_err(|_| Malformed)?;
            decoded
        } else {
            bytes.to_vec()
        };
        Ok(String::from_utf8_lossy(&decoded).into_owned())
    }

    /// The field at `index` (1-based: static, then dynamic); unknown past what was seen.
    fn field(&self, index: usize) -> Result<Field, Malformed> {
        match index {
            0 => Err(Malformed),
            1..=61 => {
                let (name, value) = STATIC_TABLE[index - 1];
                Ok((Some(name.to_owned()), Some(value.to_owned())))
            }
            _ => Ok(self.table.get(index - 62).cloned().unwrap_or((None, None))),
        }
    }

    fn insert(&mut self, field: Field) {
        self.table.push_front(field);
        self.table.truncate(MAX_ENTRIES);
    }

    pub fn decode(&mut self, block: &[u8]) -> Result<PartialBlock, Malformed> {
        let mut decoded = PartialBlock::default();
        let mut at = 0;
        while let Some(&first) = block.get(at) {
            let field = if first & 0x80 != 0 {
                // Indexed field.
                self.field(integer(block, &mut at, 7)?)?
            } else if first & 0xe0 == 0x20 {
                // Dynamic table size update: only an empty table is certain.
                if integer(block, &mut at, 5)? == 0 {
                    self.table.clear();
                }
                continue;
            } else {
                // Literal: with incremental indexing (6-bit index prefix), or without / never
                // indexed (4-bit).
                let indexing = first & 0xc0 == 0x40;
                let index = integer(block, &mut at, if indexing { 6 } else { 4 })?;
                let name = match index {
                    0 => Some(self.string(block, &mut at)?),
                    index => self.field(index)?.0,
                };
                let field = (name, Some(self.string(block, &mut at)?));
                if indexing {
                    self.insert(field.clone());
                }
                field
            };
            match field {
                (Some(name), Some(value)) => decoded.headers.push((name, value)),
                _ => decoded.incomplete = true,
            }
        }
        Ok(decoded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::protocols::http2::tests::encode;

    #[test]
    fn entries_from_before_are_unknown_and_never_misread() {
        // The peer's encoder has been at work for a while: its table holds entries we never saw.
        let mut encoder = httlib_hpack::Encoder::default();
        encode(
            &mut encoder,
            &[
                (":path", "/old"),
                ("user-agent", "client/1"),
                ("x-tenant", "acme"),
            ],
        );
        // What the agent sees: static entries, literals, old and new dynamic entries.
        let block = encode(
            &mut encoder,
            &[
                (":method", "GET"),
                (":path", "/new"),
                ("user-agent", "client/1"),
                ("x-tenant", "acme"),
                ("x-request", "r1"),
            ],
        );
        let mut decoder = PartialDecoder::default();
        let decoded = decoder.decode(&block).unwrap();
        assert!(decoded.incomplete);
        assert_eq!(
            decoded.headers,
            vec![
                (":method".to_owned(), "GET".to_owned()),
                (":path".to_owned(), "/new".to_owned()),
                ("x-request".to_owned(), "r1".to_owned()),
            ]
        );
        // Entries inserted since joining are known exactly in later blocks, the old ones not.
        let next = encode(
            &mut encoder,
            &[(":path", "/new"), ("x-request", "r1"), ("x-tenant", "acme")],
        );
        assert_eq!(
            decoder.decode(&next).unwrap(),
            PartialBlock {
                headers: vec![
                    (":path".to_owned(), "/new".to_owned()),
                    ("x-request".to_owned(), "r1".to_owned())
                ],
                incomplete: true
            }
        );
        assert_eq!(decoder.decode(&[0xff]), Err(Malformed), "a cut integer");
    }

    #[test]
    fn huffman_strings_and_the_rfc_examples_decode() {
        // RFC 7541 C.4.1: a request with Huffman-coded literals.
        let block = [
            0x82, 0x86, 0x84, 0x41, 0x8c, 0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab,
            0x90, 0xf4, 0xff,
        ];
        let decoded = PartialDecoder::default().decode(&block).unwrap();
        assert_eq!(
            decoded.headers,
            vec![
                (":method".to_owned(), "GET".to_owned()),
                (":scheme".to_owned(), "http".to_owned()),
                (":path".to_owned(), "/".to_owned()),
                (":authority".to_owned(), "www.example.com".to_owned()),
            ]
        );
        assert!(!decoded.incomplete);
    }
}
