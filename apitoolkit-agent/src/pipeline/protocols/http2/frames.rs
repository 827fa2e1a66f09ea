//! The HTTP/2 frame layer of one direction (RFC 9113 §4): a 9-byte header (24-bit length,
//! type, flags, 31-bit stream id) and its payload. No crate reads frames passively, so this is
//! ours; it only splits and strips, HPACK and streams are the caller's.

use bytes::{Buf, Bytes, BytesMut};

use super::Http2Error;

pub const HEADER_LEN: usize = 9;
/// The protocol's largest frame (SETTINGS_MAX_FRAME_SIZE can be at most 2^24 - 1).
const MAX_FRAME_LEN: u32 = (1 << 24) - 1;

/// Frame types (RFC 9113 §6).
pub mod kind {
    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PUSH_PROMISE: u8 = 0x5;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const WINDOW_UPDATE: u8 = 0x8;
    pub const CONTINUATION: u8 = 0x9;
}

/// Frame flags (RFC 9113 §6).
pub mod flag {
    pub const END_STREAM: u8 = 0x1;
    /// On SETTINGS and PING.
    pub const ACK: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const PADDED: u8 = 0x8;
    pub const PRIORITY: u8 = 0x20;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub len: u32,
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
}

impl FrameHeader {
    fn parse(bytes: &[u8; HEADER_LEN]) -> Self {
        Self {
            len: u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]),
            kind: bytes[3],
            flags: bytes[4],
            stream: u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) & 0x7fff_ffff,
        }
    }

    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub header: FrameHeader,
    /// The payload as captured: shorter than `header.len` by `lost` bytes.
    pub payload: Bytes,
    /// Payload bytes lost to gaps (only a DATA frame absorbs gaps).
    pub lost: u32,
}

impl Frame {
    /// The payload without padding (and without `skip` more leading bytes, for the priority
    /// or promised-stream fields), or an error when the padding does not fit.
    pub fn content(&self, skip: usize) -> Result<Bytes, Http2Error> {
        let mut payload = self.payload.clone();
        let mut pad = 0;
        if self.header.has(flag::PADDED) {
            if payload.is_empty() {
                return Err(Http2Error::Frame("padded"));
            }
            pad = usize::from(payload.get_u8());
        }
        if skip > payload.len() {
            return Err(Http2Error::Frame("short"));
        }
        payload.advance(skip);
        if self.lost > 0 {
            // The padding sat at the end of a payload that lost bytes: where exactly the data
            // ends is unknown, so keep what arrived (the caller marks the body incomplete).
            return Ok(payload);
        }
        if pad > payload.len() {
            return Err(Http2Error::Frame("padded"));
        }
        payload.truncate(payload.len() - pad);
        Ok(payload)
    }
}

/// Walks the frame headers `bytes` would hold if they started at a frame boundary: how many
/// plausible frames, and whether the last one ends exactly where `bytes` do. `None` as soon as
/// a header is implausible (an unknown type, or a stream id its type forbids).
fn frame_chain(mut bytes: &[u8]) -> Option<(usize, bool)> {
    let mut frames = 0;
    while let Some(header) = bytes.get(..HEADER_LEN) {
        let header = FrameHeader::parse(header.try_into().expect("sliced"));
        let connection_level = matches!(header.kind, kind::SETTINGS | kind::PING | kind::GOAWAY);
        let known = header.kind <= kind::CONTINUATION;
        if !known || connection_level != (header.stream == 0) && header.kind != kind::WINDOW_UPDATE
        {
            return None;
        }
        frames += 1;
        match bytes.get(HEADER_LEN + header.len as usize..) {
            Some(rest) => bytes = rest,
            None => return Some((frames, false)),
        }
    }
    Some((frames, bytes.is_empty()))
}

/// Whether `bytes` (the first a connection older than the agent showed) are HTTP/2 frames.
/// HTTP/1 never passes: a method or `HTTP/1.` puts a letter or a space where the type goes.
pub fn looks_like_frames(bytes: &[u8]) -> bool {
    frame_chain(bytes).is_some_and(|(frames, _)| frames > 0)
}

/// Splits one direction's bytes into whole frames. A gap inside a DATA frame's payload is
/// absorbed (the frame reports it as lost); any other gap loses the frame boundaries. Then the
/// reader waits for a push (one read or write) that is whole frames from its first byte to its
/// last, as a writer's call is, and goes on from there.
#[derive(Default)]
pub struct FrameReader {
    buffer: BytesMut,
    current: Option<FrameHeader>,
    /// Payload bytes of the current frame lost to gaps.
    lost: u32,
    resyncing: bool,
}

/// What a push did.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    Appended,
    /// The reader found frame boundaries again: what came before is unknown.
    Resynced,
    /// Dropped while looking for frame boundaries.
    Skipped,
}

impl FrameReader {
    pub fn push(&mut self, data: &[u8]) -> Pushed {
        if !self.resyncing {
            self.buffer.extend_from_slice(data);
            return Pushed::Appended;
        }
        if frame_chain(data).is_some_and(|(frames, whole)| frames > 0 && whole) {
            self.resyncing = false;
            self.buffer.extend_from_slice(data);
            return Pushed::Resynced;
        }
        Pushed::Skipped
    }

    /// The frame boundaries are lost: drops what is held and resyncs on later pushes.
    pub fn abandon(&mut self) {
        self.resyncing = true;
        self.buffer = BytesMut::new();
        self.current = None;
        self.lost = 0;
    }

    pub fn retained_bytes(&self) -> usize {
        self.buffer.capacity()
    }

    /// The header of the frame being assembled, read from the buffer if it is there.
    fn current_header(&mut self) -> Option<Result<FrameHeader, Http2Error>> {
        if let Some(header) = self.current {
            return Some(Ok(header));
        }
        let bytes: &[u8; HEADER_LEN] = self.buffer.get(..HEADER_LEN)?.try_into().ok()?;
        let header = FrameHeader::parse(bytes);
        if header.len > MAX_FRAME_LEN {
            self.abandon();
            return Some(Err(Http2Error::Frame("oversized")));
        }
        self.buffer.advance(HEADER_LEN);
        self.current = Some(header);
        Some(Ok(header))
    }

    /// The next complete frame, if the buffered bytes hold one.
    pub fn next_frame(&mut self) -> Option<Result<Frame, Http2Error>> {
        if self.resyncing {
            return None;
        }
        let header = match self.current_header()? {
            Ok(header) => header,
            Err(error) => return Some(Err(error)),
        };
        let captured = (header.len - self.lost) as usize;
        if self.buffer.len() < captured {
            return None;
        }
        let payload = self.buffer.split_to(captured).freeze();
        self.current = None;
        let lost = std::mem::take(&mut self.lost);
        Some(Ok(Frame {
            header,
            payload,
            lost,
        }))
    }

    /// `len` bytes of this direction were lost after the ones pushed so far.
    pub fn gap(&mut self, len: u64) -> Result<(), Http2Error> {
        if self.resyncing {
            return Ok(());
        }
        let inside_data = match self.current_header() {
            Some(Ok(header)) => {
                let unread =
                    u64::from(header.len - self.lost).saturating_sub(self.buffer.len() as u64);
                (header.kind == kind::DATA && len <= unread).then_some(())
            }
            _ => None,
        };
        match inside_data {
            Some(()) => {
                self.lost += len as u32;
                Ok(())
            }
            None => {
                self.abandon();
                Err(Http2Error::LostSync)
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// One frame's bytes.
    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut bytes = vec![len[1], len[2], len[3], kind, flags];
        bytes.extend_from_slice(&stream.to_be_bytes());
        bytes.extend_from_slice(payload);
        bytes
    }

    fn frames(reader: &mut FrameReader) -> Vec<Frame> {
        std::iter::from_fn(|| reader.next_frame())
            .map(Result::unwrap)
            .collect()
    }

    #[test]
    fn frames_split_anywhere_and_many_per_push_come_out_whole() {
        let bytes = [
            frame(kind::HEADERS, flag::END_HEADERS, 1, b"head"),
            frame(kind::DATA, flag::END_STREAM, 1, b"body bytes"),
            frame(kind::SETTINGS, flag::ACK, 0, b""),
        ]
        .concat();
        for split in 0..bytes.len() {
            let mut reader = FrameReader::default();
            reader.push(&bytes[..split]);
            let mut got = frames(&mut reader);
            reader.push(&bytes[split..]);
            got.extend(frames(&mut reader));
            let summary: Vec<_> = got
                .iter()
                .map(|f| (f.header.kind, f.header.stream, f.payload.clone()))
                .collect();
            assert_eq!(
                summary,
                vec![
                    (kind::HEADERS, 1, Bytes::from_static(b"head")),
                    (kind::DATA, 1, Bytes::from_static(b"body bytes")),
                    (kind::SETTINGS, 0, Bytes::new()),
                ],
                "split at {split}"
            );
        }
    }

    #[test]
    fn padding_and_priority_fields_are_stripped() {
        let mut payload = vec![3u8];
        payload.extend_from_slice(&[0, 0, 0, 1, 16]); // priority: dependency and weight
        payload.extend_from_slice(b"block");
        payload.extend_from_slice(&[0, 0, 0]);
        let mut reader = FrameReader::default();
        reader.push(&frame(
            kind::HEADERS,
            flag::PADDED | flag::PRIORITY,
            3,
            &payload,
        ));
        let frame = reader.next_frame().unwrap().unwrap();
        assert_eq!(frame.content(5).unwrap(), Bytes::from_static(b"block"));
        let mut bad = FrameReader::default();
        bad.push(&super::tests::frame(
            kind::DATA,
            flag::PADDED,
            1,
            &[9, b'x'],
        ));
        assert!(bad.next_frame().unwrap().unwrap().content(0).is_err());
    }

    #[test]
    fn a_gap_inside_data_is_absorbed_and_any_other_loses_sync() {
        let data = frame(kind::DATA, 0, 1, &[7u8; 100]);
        let next = frame(kind::DATA, flag::END_STREAM, 1, b"end");
        let mut reader = FrameReader::default();
        reader.push(&data[..HEADER_LEN + 10]);
        assert_eq!(reader.gap(80), Ok(()));
        reader.push(&data[HEADER_LEN + 90..]);
        reader.push(&next);
        let got = frames(&mut reader);
        assert_eq!((got[0].payload.len(), got[0].lost), (20, 80));
        assert_eq!(got[1].payload, Bytes::from_static(b"end"));

        let mut reader = FrameReader::default();
        reader.push(&data[..HEADER_LEN + 10]);
        assert_eq!(reader.gap(200), Err(Http2Error::LostSync), "past the frame");
        // The rest of a frame is skipped; a push of whole frames is a boundary again.
        assert_eq!(reader.push(&data[HEADER_LEN + 50..]), Pushed::Skipped);
        assert!(reader.next_frame().is_none());
        assert_eq!(reader.push(&next), Pushed::Resynced);
        assert_eq!(frames(&mut reader)[0].payload, Bytes::from_static(b"end"));
        let mut reader = FrameReader::default();
        reader.push(&data);
        assert_eq!(reader.gap(1), Err(Http2Error::LostSync), "at a boundary");
    }
}
