//! Body framing of an HTTP/1.x message: a length, chunks, or everything until the close;
//! and the bytes between chunks (size lines, CRLFs, trailers).

use super::parser::{ParseError, Unparsed};

pub(super) const MAX_HEAD_BYTES: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Framing {
    Length(u64),
    Chunked(ChunkState),
    UntilClose,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ChunkState {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

/// What the bytes at a chunk boundary (size line, CRLF after data, trailers) say.
pub(super) enum ChunkStep {
    NeedMore,
    Next(ChunkState),
    BodyEnd,
}

pub(super) fn chunk_boundary(
    buffer: &mut impl Unparsed,
    state: ChunkState,
) -> Result<ChunkStep, ParseError> {
    match state {
        ChunkState::Size => match httparse::parse_chunk_size(buffer) {
            Ok(httparse::Status::Complete((consumed, size))) => {
                buffer.advance(consumed);
                Ok(ChunkStep::Next(if size == 0 {
                    ChunkState::Trailers
                } else {
                    ChunkState::Data(size)
                }))
            }
            Ok(httparse::Status::Partial) if buffer.len() < 1024 => Ok(ChunkStep::NeedMore),
            _ => Err(ParseError::ChunkSize),
        },
        ChunkState::DataEnd => {
            if buffer.len() < 2 {
                return Ok(ChunkStep::NeedMore);
            }
            if &buffer[..2] != b"\r\n" {
                return Err(ParseError::ChunkSize);
            }
            buffer.advance(2);
            Ok(ChunkStep::Next(ChunkState::Size))
        }
        ChunkState::Trailers => {
            // Trailers end at an empty line; without trailers that is the next CRLF.
            if buffer.starts_with(b"\r\n") {
                buffer.advance(2);
                return Ok(ChunkStep::BodyEnd);
            }
            match find(buffer, b"\r\n\r\n") {
                Some(end) => {
                    buffer.advance(end + 4);
                    Ok(ChunkStep::BodyEnd)
                }
                None if buffer.len() > MAX_HEAD_BYTES => Err(ParseError::HeadTooLong),
                None => Ok(ChunkStep::NeedMore),
            }
        }
        // Chunk data is read by `parse_body`, never here.
        ChunkState::Data(_) => Err(ParseError::ChunkSize),
    }
}

pub(super) fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}
