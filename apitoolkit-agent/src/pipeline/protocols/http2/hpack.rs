//! HPACK (RFC 7541) for one direction of a connection, ours: the maintained crate
//! (loona-hpack) rebuilds its Huffman table for every string (~10x the agent's whole cost per
//! HTTP/2 request), and the fast one (httlib-hpack, unmaintained) panics on malformed blocks,
//! which peers control. Huffman strings use httlib-huffman (table-driven, a few bits a step).
//!
//! A connection seen from its start has its whole dynamic table known: sizes, evictions and size
//! updates are followed exactly, and an index past the table is an error. A connection joined
//! mid-stream (or after lost frames or a failed block) is decoded **partially**, never guessing:
//! - an index names the entry that many insertions ago on both sides (evictions only drop the
//!   oldest entries), so every entry inserted since joining is known exactly;
//! - an index past those names an entry from before: unknown, and so is an entry inserted with
//!   such a name (its value is known, not its name), kept as a placeholder so that indices stay
//!   aligned; sizes of unknown parts count as zero, so the table may keep entries the peer
//!   evicted, which the peer then never names.

use std::collections::VecDeque;

use httlib_huffman::DecoderSpeed;

use crate::pipeline::protocols::message::Fields;

/// SETTINGS_HEADER_TABLE_SIZE until a SETTINGS frame says otherwise.
const DEFAULT_TABLE_SIZE: usize = 4096;
/// The largest table kept, whatever a peer allows: memory is bounded per direction.
const MAX_TABLE_SIZE: usize = 1 << 20;
/// What an entry costs besides its name and value (RFC 7541 §4.1).
const ENTRY_OVERHEAD: usize = 32;

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

/// The fields of one block: the ones fully known, and whether any was not (partial only).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PartialBlock {
    pub headers: Fields,
    pub incomplete: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Malformed;

struct Entry {
    field: Field,
    /// RFC size of the known parts.
    size: usize,
}

pub struct HpackDecoder {
    /// Newest first, as indices count.
    table: VecDeque<Entry>,
    size: usize,
    max_size: usize,
    /// The sender's limit for `max_size` (SETTINGS_HEADER_TABLE_SIZE of the receiver).
    allowed_size: usize,
    /// The table's history before the agent is unknown.
    partial: bool,
}

impl HpackDecoder {
    /// For a direction seen from its first header block.
    pub fn new() -> Self {
        Self {
            table: VecDeque::new(),
            size: 0,
            max_size: DEFAULT_TABLE_SIZE,
            allowed_size: DEFAULT_TABLE_SIZE,
            partial: false,
        }
    }

    /// For a direction whose earlier blocks were not seen.
    pub fn partial() -> Self {
        Self {
            partial: true,
            allowed_size: MAX_TABLE_SIZE,
            max_size: MAX_TABLE_SIZE,
            ..Self::new()
        }
    }

    /// SETTINGS_HEADER_TABLE_SIZE from the receiving side.
    pub fn allow_table_size(&mut self, size: u32) {
        if !self.partial {
            self.allowed_size = (size as usize).min(MAX_TABLE_SIZE);
        }
    }
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

impl HpackDecoder {
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

    /// The field at `index` (1-based: static, then dynamic); past the table, unknown when
    /// partial, else an error.
    fn field(&self, index: usize) -> Result<Field, Malformed> {
        match index {
            0 => Err(Malformed),
            1..=61 => {
                let (name, value) = STATIC_TABLE[index - 1];
                Ok((Some(name.to_owned()), Some(value.to_owned())))
            }
            _ => match self.table.get(index - 62) {
                Some(entry) => Ok(entry.field.clone()),
                None if self.partial => Ok((None, None)),
                None => Err(Malformed),
            },
        }
    }

    fn evict_to(&mut self, limit: usize) {
        while self.size > limit {
            let Some(oldest) = self.table.pop_back() else {
                break;
            };
            self.size -= oldest.size;
        }
    }

    /// Adds a field as the newest entry, evicting the oldest to make room (RFC 7541 §4.4).
    fn insert(&mut self, field: Field) {
        let known = |part: &Option<String>| part.as_ref().map_or(0, String::len);
        let size = ENTRY_OVERHEAD + known(&field.0) + known(&field.1);
        if size > self.max_size {
            self.evict_to(0);
            return;
        }
        self.evict_to(self.max_size - size);
        self.size += size;
        self.table.push_front(Entry { field, size });
    }

    /// A dynamic table size update (RFC 7541 §6.3).
    fn resize(&mut self, max_size: usize) -> Result<(), Malformed> {
        if max_size > self.allowed_size {
            return Err(Malformed);
        }
        self.max_size = max_size;
        self.evict_to(max_size);
        Ok(())
    }

    /// The fields of one header block, as far as they can be known.
    pub fn decode(&mut self, block: &[u8]) -> Result<PartialBlock, Malformed> {
        let mut decoded = PartialBlock::default();
        let mut at = 0;
        while let Some(&first) = block.get(at) {
            let field = if first & 0x80 != 0 {
                // Indexed field.
                self.field(integer(block, &mut at, 7)?)?
            } else if first & 0xe0 == 0x20 {
                let max_size = integer(block, &mut at, 5)?;
                self.resize(max_size)?;
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
                (Some(name), Some(value)) => decoded.headers.push(&name, &value),
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

    fn fields(pairs: &[(&str, &str)]) -> Fields {
        pairs.iter().copied().collect()
    }

    /// RFC 7541 C.3: three requests on one connection, the table carried between them.
    #[test]
    fn the_rfc_request_examples_decode_with_their_dynamic_table() {
        let mut decoder = HpackDecoder::new();
        let first = [
            0x82, 0x86, 0x84, 0x41, 0x0f, 0x77, 0x77, 0x77, 0x2e, 0x65, 0x78, 0x61, 0x6d, 0x70,
            0x6c, 0x65, 0x2e, 0x63, 0x6f, 0x6d,
        ];
        let second = [
            0x82, 0x86, 0x84, 0xbe, 0x58, 0x08, 0x6e, 0x6f, 0x2d, 0x63, 0x61, 0x63, 0x68, 0x65,
        ];
        let third = [
            0x82, 0x87, 0x85, 0xbf, 0x40, 0x0a, 0x63, 0x75, 0x73, 0x74, 0x6f, 0x6d, 0x2d, 0x6b,
            0x65, 0x79, 0x0c, 0x63, 0x75, 0x73, 0x74, 0x6f, 0x6d, 0x2d, 0x76, 0x61, 0x6c, 0x75,
            0x65,
        ];
        let base = [(":method", "GET"), (":scheme", "http"), (":path", "/")];
        let with = |extra: &[(&str, &str)]| {
            let mut all = fields(&base);
            all.append(&fields(extra));
            all
        };
        assert_eq!(
            decoder.decode(&first).unwrap().headers,
            with(&[(":authority", "www.example.com")])
        );
        assert_eq!(
            decoder.decode(&second).unwrap().headers,
            with(&[
                (":authority", "www.example.com"),
                ("cache-control", "no-cache")
            ])
        );
        let third_fields = decoder.decode(&third).unwrap();
        assert_eq!(
            third_fields.headers.iter().nth(1),
            Some((":scheme", "https"))
        );
        assert_eq!(
            third_fields.headers.iter().skip(3).collect::<Fields>(),
            fields(&[
                (":authority", "www.example.com"),
                ("custom-key", "custom-value")
            ])
        );
        assert!(!third_fields.incomplete);
        assert_eq!(decoder.size, 164, "the RFC's table size after C.3.3");
    }

    #[test]
    fn sizes_evict_the_oldest_and_size_updates_are_bounded_by_the_settings() {
        let mut decoder = HpackDecoder::new();
        decoder.allow_table_size(100);
        // A size update to 100 (0x3f 0x45), then two 42-byte entries: the first is evicted.
        let mut block = vec![0x3f, 0x45];
        block.extend([
            0x40, 4, b'a', b'-', b'o', b'n', 6, b'v', b'a', b'l', b'u', b'e', b'1',
        ]);
        block.extend([
            0x40, 4, b'b', b'-', b't', b'w', 6, b'v', b'a', b'l', b'u', b'e', b'2',
        ]);
        block.extend([
            0x40, 4, b'c', b'-', b't', b'h', 6, b'v', b'a', b'l', b'u', b'e', b'3',
        ]);
        decoder.decode(&block).unwrap();
        assert_eq!(decoder.table.len(), 2);
        assert_eq!(
            decoder.decode(&[0xc0]),
            Err(Malformed),
            "index 64, a-on, was evicted"
        );
        assert_eq!(
            decoder.decode(&[0xbf]).unwrap().headers,
            fields(&[("b-tw", "value2")])
        );
        assert_eq!(
            decoder.decode(&[0xbe]).unwrap().headers,
            fields(&[("c-th", "value3")])
        );
        // 200 is more than SETTINGS allowed: malformed, never a silently bigger table.
        assert_eq!(decoder.decode(&[0x3f, 0xa9, 0x01]), Err(Malformed));
        assert_eq!(
            HpackDecoder::new().decode(&[0x0f]),
            Err(Malformed),
            "a cut literal"
        );
    }

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
        let mut decoder = HpackDecoder::partial();
        let decoded = decoder.decode(&block).unwrap();
        assert!(decoded.incomplete);
        assert_eq!(
            decoded.headers,
            fields(&[(":method", "GET"), (":path", "/new"), ("x-request", "r1")])
        );
        // Entries inserted since joining are known exactly in later blocks, the old ones not.
        let next = encode(
            &mut encoder,
            &[(":path", "/new"), ("x-request", "r1"), ("x-tenant", "acme")],
        );
        assert_eq!(
            decoder.decode(&next).unwrap(),
            PartialBlock {
                headers: fields(&[(":path", "/new"), ("x-request", "r1")]),
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
        let decoded = HpackDecoder::new().decode(&block).unwrap();
        assert_eq!(
            decoded.headers,
            fields(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
            ])
        );
        assert!(!decoded.incomplete);
    }
}
