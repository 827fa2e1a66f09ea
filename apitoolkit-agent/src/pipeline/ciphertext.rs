//! TLS records seen on a socket whose plaintext has not (yet) come from the TLS library: just
//! enough framing to tell a handshake from application data, so that a connection the agent
//! cannot read is reported and one that only shook hands is not.

const APPLICATION_DATA: u8 = 0x17;
const HEADER_LEN: usize = 5;

/// A TLS record header: content type (change-cipher-spec, alert, handshake, application
/// data) and major version 3 (SSL 3.0 to TLS 1.3). No HTTP message starts with these bytes.
pub fn looks_like_tls_record(data: &[u8]) -> bool {
    matches!(data, [0x14..=0x17, 0x03, 0x00..=0x04, ..])
}

/// Follows record boundaries in one direction of a ciphertext stream.
#[derive(Clone, Debug, Default)]
pub struct RecordWalker {
    header: [u8; HEADER_LEN],
    header_len: usize,
    body_left: u64,
    /// An application-data record went by: this direction carried a request or response.
    pub application_data: bool,
}

impl RecordWalker {
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.body_left > 0 {
                let skip = self.body_left.min(data.len() as u64);
                self.body_left -= skip;
                data = &data[skip as usize..];
                continue;
            }
            let take = (HEADER_LEN - self.header_len).min(data.len());
            self.header[self.header_len..self.header_len + take].copy_from_slice(&data[..take]);
            self.header_len += take;
            data = &data[take..];
            if self.header_len == HEADER_LEN {
                self.application_data |= self.header[0] == APPLICATION_DATA;
                self.body_left = u16::from_be_bytes([self.header[3], self.header[4]]) as u64;
                self.header_len = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(content_type: u8, body_len: u16) -> Vec<u8> {
        let mut bytes = vec![content_type, 0x03, 0x03];
        bytes.extend_from_slice(&body_len.to_be_bytes());
        bytes.extend(std::iter::repeat_n(0x17, body_len as usize));
        bytes
    }

    #[test]
    fn recognises_record_headers_and_never_http() {
        assert!(looks_like_tls_record(&record(0x16, 4)));
        assert!(looks_like_tls_record(b"\x17\x03\x03\x00\x10"));
        assert!(!looks_like_tls_record(b"GET / HTTP/1.1\r\n"));
        assert!(!looks_like_tls_record(b"HTTP/1.1 200 OK\r\n"));
        assert!(!looks_like_tls_record(b"\x16\x02"));
    }

    #[test]
    fn a_handshake_is_not_application_data_however_it_is_split() {
        // Handshake bodies full of 0x17 bytes must not be mistaken for record headers.
        let stream = [record(0x16, 300), record(0x14, 1), record(0x16, 40)].concat();
        for split in [1, 2, 5, 7, 64, stream.len()] {
            let mut walker = RecordWalker::default();
            stream.chunks(split).for_each(|piece| walker.feed(piece));
            assert!(!walker.application_data, "split {split}");
        }
        let mut walker = RecordWalker::default();
        let with_data = [stream.clone(), record(APPLICATION_DATA, 100)].concat();
        with_data.chunks(3).for_each(|piece| walker.feed(piece));
        assert!(walker.application_data);
    }
}
