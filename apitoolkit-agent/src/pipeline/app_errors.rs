//! Unhandled errors a watched process prints on stderr: Python tracebacks (werkzeug, gunicorn
//! and Flask log them) and JavaScript stacks (`Error: …` followed by `    at …` lines), parsed
//! into the backend's ATError fields. Text is assembled per thread, so the error can be
//! attached to the request that thread is serving.

use std::{collections::HashMap, net::SocketAddr};

use super::protocols::Exchange;

/// Text kept per thread while waiting for the rest of an error; older text is dropped.
const MAX_PENDING_TEXT: usize = 64 * 1024;

const PYTHON_TRACEBACK: &str = "Traceback (most recent call last):";
/// Ends the text of a write that was cut and whose end never came: an error it began is over.
const WRITE_CUT: &str = "[... the rest of this write was not captured ...]";
const PYTHON_CHAIN_SEPARATORS: [&str; 2] = [
    "During handling of the above exception, another exception occurred:",
    "The above exception was the direct cause of the following exception:",
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapturedError {
    /// Kernel time of the write that completed the error.
    pub timestamp_ns: u64,
    pub error_type: String,
    pub message: String,
    /// The first error of a chain (the cause); the error itself when there is no chain.
    pub root_error_type: String,
    pub root_error_message: String,
    pub stack_trace: String,
}

/// gRPC status codes by number (grpc/doc/statuscodes.md).
const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// HTTP/2 error codes by number (RFC 9113 §7).
const HTTP2_ERROR_CODES: [&str; 14] = [
    "NO_ERROR",
    "PROTOCOL_ERROR",
    "INTERNAL_ERROR",
    "FLOW_CONTROL_ERROR",
    "SETTINGS_TIMEOUT",
    "STREAM_CLOSED",
    "FRAME_SIZE_ERROR",
    "REFUSED_STREAM",
    "CANCEL",
    "COMPRESSION_ERROR",
    "CONNECT_ERROR",
    "ENHANCE_YOUR_CALM",
    "INADEQUATE_SECURITY",
    "HTTP_1_1_REQUIRED",
];

impl CapturedError {
    fn named(error_type: String, message: String, timestamp_ns: u64) -> Self {
        Self {
            timestamp_ns,
            root_error_type: error_type.clone(),
            root_error_message: message.clone(),
            error_type,
            message,
            stack_trace: String::new(),
        }
    }

    /// Errors the protocol itself reports on an exchange: a stream reset before its response
    /// ended (RST_STREAM), and a gRPC call's non-zero `grpc-status`, typed by its code name as
    /// grpcio names it (`grpc.StatusCode.NOT_FOUND`), with its `grpc-message`.
    pub fn of_protocol(exchange: &Exchange) -> Vec<Self> {
        let at = exchange.response.last_byte_ns;
        let mut errors = Vec::new();
        if let Some(code) = exchange.reset {
            let name = HTTP2_ERROR_CODES
                .get(code as usize)
                .map_or_else(|| format!("0x{code:x}"), |name| (*name).to_owned());
            errors.push(Self::named(
                "StreamReset".to_owned(),
                format!("HTTP/2 stream reset with {name}"),
                at,
            ));
        }
        let grpc_status = exchange
            .response
            .header("grpc-status")
            .and_then(|status| status.trim().parse::<usize>().ok());
        if let Some(status) = grpc_status.filter(|status| *status != 0) {
            let name = GRPC_CODES.get(status).copied().unwrap_or("UNKNOWN");
            let message = exchange.response.header("grpc-message").unwrap_or_default();
            let message = percent_encoding::percent_decode_str(message).decode_utf8_lossy();
            errors.push(Self::named(
                format!("grpc.StatusCode.{name}"),
                message.into_owned(),
                at,
            ));
        }
        errors
    }

    /// The error of an outgoing call that got no response: `errno` as the kernel reported it,
    /// or none when the connection closed unanswered.
    pub fn failed_call(errno: Option<u32>, remote: Option<SocketAddr>, timestamp_ns: u64) -> Self {
        let (error_type, description) = match errno {
            Some(111) => ("ConnectionRefusedError", "connection refused".to_owned()),
            Some(104) => (
                "ConnectionResetError",
                "connection reset by peer".to_owned(),
            ),
            Some(110) => ("TimeoutError", "connection timed out".to_owned()),
            Some(32) => ("BrokenPipeError", "broken pipe".to_owned()),
            Some(other) => (
                "ConnectionError",
                format!("connection failed (errno {other})"),
            ),
            None => (
                "NoResponseError",
                "the connection closed without a response".to_owned(),
            ),
        };
        let message = match remote {
            Some(remote) => format!("{description} ({remote})"),
            None => description,
        };
        Self::named(error_type.to_owned(), message, timestamp_ns)
    }
}

/// Text assembled for one thread.
#[derive(Default)]
struct ThreadText {
    text: String,
    /// Where the next piece of the current write starts; a piece further on follows lost bytes.
    write_end: u64,
    /// The last text was cut off: the next piece begins mid-line.
    after_cut: bool,
}

/// Part of one stderr write: the kernel sends a long write's first and last chunk and reports
/// the bytes between them as skipped.
#[derive(Clone, Copy, Debug)]
pub struct Piece<'a> {
    /// Offset of `bytes` in the write.
    pub position: u64,
    pub bytes: &'a [u8],
    /// Bytes of the write after these that were not captured.
    pub skipped_len: u64,
}

impl<'a> From<&'a [u8]> for Piece<'a> {
    /// A whole write.
    fn from(bytes: &'a [u8]) -> Self {
        Self {
            position: 0,
            bytes,
            skipped_len: 0,
        }
    }
}

/// What a piece of stderr completed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Collected {
    pub errors: Vec<CapturedError>,
    /// Tracebacks cut before their error line, which name no error to report.
    pub cut: u64,
}

#[derive(Default)]
pub struct StderrCollector {
    pending: HashMap<(u32, u32), ThreadText>,
}

impl ThreadText {
    /// Ends the text where bytes were lost: its partial last line goes, and an indented line
    /// says what is missing, so a traceback's frames stay one block and nothing written later
    /// joins a line written before.
    fn cut(&mut self, lost: u64) {
        let whole_lines = self.text.rfind('\n').map_or(0, |end| end + 1);
        self.text.truncate(whole_lines);
        self.text
            .push_str(&format!("    [... {lost} bytes not captured ...]\n"));
        self.after_cut = true;
    }

    fn append(&mut self, piece: Piece<'_>) {
        if piece.position == 0 && self.after_cut {
            self.text.push_str(WRITE_CUT);
            self.text.push('\n');
        }
        if piece.position > self.write_end {
            self.cut(piece.position - self.write_end);
        }
        let mut bytes = piece.bytes;
        if self.after_cut && piece.position > 0 {
            // The piece starts mid-line: that fragment belongs to no complete line.
            bytes = bytes
                .iter()
                .position(|&byte| byte == b'\n')
                .map_or(&[][..], |end| &bytes[end + 1..]);
        }
        self.after_cut = false;
        self.text.push_str(&String::from_utf8_lossy(bytes));
        self.write_end = piece.position + piece.bytes.len() as u64;
        if piece.skipped_len > 0 {
            self.cut(piece.skipped_len);
            self.write_end += piece.skipped_len;
        }
    }
}

/// `ValueError: bad input` -> (`ValueError`, `bad input`); a dotted type keeps its last name,
/// as the SDKs report `type(error).__name__`.
fn split_error_line(line: &str) -> (String, String) {
    let (error_type, message) = line.split_once(": ").unwrap_or((line, ""));
    let name = error_type.rsplit('.').next().unwrap_or(error_type);
    (name.trim().to_owned(), message.trim().to_owned())
}

fn is_error_type(text: &str) -> bool {
    let name = text.rsplit('.').next().unwrap_or(text);
    !name.is_empty()
        && name.chars().next().is_some_and(char::is_alphabetic)
        && text
            .chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '.' || c == '$')
}

/// A JavaScript error line: `Error`, `TypeError: message`, `Uncaught Error: message`.
fn javascript_error_line(line: &str) -> Option<&str> {
    let line = line.strip_prefix("Uncaught ").unwrap_or(line);
    let name = line.split_once(": ").map_or(line, |(name, _)| name);
    (name.ends_with("Error") && is_error_type(name)).then_some(line)
}

/// What follows a `Traceback` line.
enum Traceback {
    /// The chain of (type, message), outermost last, and the index after it.
    Complete(usize, Vec<(String, String)>),
    /// The error line has not arrived yet.
    Incomplete,
    /// The text was cut where the error line should be (another traceback starts there, or
    /// the write ended uncaptured): parsing goes on at the index.
    Cut(usize),
}

/// A Python traceback chain starting at `lines[start]`.
fn python_traceback(lines: &[&str], start: usize) -> Traceback {
    let mut chain = Vec::new();
    let mut index = start;
    loop {
        // lines[index] is a "Traceback" line: frames are indented, the error line is not.
        index += 1;
        while index < lines.len() && (lines[index].starts_with(' ') || lines[index].is_empty()) {
            index += 1;
        }
        let Some(error_line) = lines.get(index) else {
            return Traceback::Incomplete;
        };
        if error_line.trim() == PYTHON_TRACEBACK || *error_line == WRITE_CUT {
            return Traceback::Cut(index);
        }
        chain.push(split_error_line(error_line));
        index += 1;
        let mut next = index;
        while next < lines.len() && lines[next].trim().is_empty() {
            next += 1;
        }
        let chained = lines
            .get(next)
            .is_some_and(|line| PYTHON_CHAIN_SEPARATORS.contains(&line.trim()));
        if !chained {
            return Traceback::Complete(index, chain);
        }
        next += 1;
        while next < lines.len() && lines[next].trim().is_empty() {
            next += 1;
        }
        match lines.get(next) {
            Some(line) if line.trim() == PYTHON_TRACEBACK => index = next,
            Some(_) => return Traceback::Complete(index, chain),
            None => return Traceback::Incomplete,
        }
    }
}

/// A JavaScript stack starting at `lines[start]`: the error line and its `    at` frames.
fn javascript_stack(lines: &[&str], start: usize) -> Option<usize> {
    javascript_error_line(lines[start])?;
    let mut end = start + 1;
    while end < lines.len() && lines[end].trim_start().starts_with("at ") {
        end += 1;
    }
    (end > start + 1).then_some(end)
}

/// Every complete error in `lines`, and the index of the first line still needed.
fn parse_errors(lines: &[&str], timestamp_ns: u64) -> (Collected, usize) {
    let mut collected = Collected::default();
    let mut index = 0;
    while index < lines.len() {
        if lines[index].trim() == PYTHON_TRACEBACK {
            let (end, chain) = match python_traceback(lines, index) {
                Traceback::Complete(end, chain) => (end, chain),
                Traceback::Incomplete => return (collected, index),
                Traceback::Cut(next) => {
                    collected.cut += 1;
                    index = next;
                    continue;
                }
            };
            let (error_type, message) = chain.last().cloned().unwrap_or_default();
            let (root_error_type, root_error_message) = chain[0].clone();
            collected.errors.push(CapturedError {
                timestamp_ns,
                error_type,
                message,
                root_error_type,
                root_error_message,
                stack_trace: lines[index..end].join("\n"),
            });
            index = end;
        } else if let Some(end) = javascript_stack(lines, index) {
            let (error_type, message) = split_error_line(
                javascript_error_line(lines[index]).expect("checked by javascript_stack"),
            );
            collected.errors.push(CapturedError {
                timestamp_ns,
                root_error_type: error_type.clone(),
                root_error_message: message.clone(),
                error_type,
                message,
                stack_trace: lines[index..end].join("\n"),
            });
            index = end;
        } else {
            index += 1;
        }
    }
    (collected, index)
}

impl StderrCollector {
    /// Adds a piece of what thread `tid` of process `tgid` wrote to stderr; returns the errors
    /// it completed.
    pub fn feed(&mut self, tgid: u32, tid: u32, timestamp_ns: u64, piece: Piece<'_>) -> Collected {
        let thread = self.pending.entry((tgid, tid)).or_default();
        thread.append(piece);
        let text = &mut thread.text;
        // Only complete lines are parsed; a partial last line waits for the next write.
        let complete = text.rfind('\n').map_or(0, |end| end + 1);
        let lines: Vec<&str> = text[..complete].lines().collect();
        let (collected, needed_from) = parse_errors(&lines, timestamp_ns);
        let keep_from = lines[..needed_from]
            .iter()
            .map(|line| line.len() + 1)
            .sum::<usize>()
            .min(complete);
        text.drain(..keep_from);
        if text.len() > MAX_PENDING_TEXT {
            let cut = text.len() - MAX_PENDING_TEXT;
            let cut = (cut..text.len())
                .find(|index| text.is_char_boundary(*index))
                .unwrap_or(text.len());
            text.drain(..cut);
        }
        if text.is_empty() && !thread.after_cut {
            self.pending.remove(&(tgid, tid));
        }
        collected
    }

    /// The process exited: what it left half-written is dropped.
    pub fn forget_process(&mut self, tgid: u32) {
        self.pending.retain(|(owner, _), _| *owner != tgid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLASK_LOG: &str = "[2026-11-25 06:00:00,000] ERROR in app: Exception on /boom [GET]
Traceback (most recent call last):
  File \"/usr/lib/python3/flask/app.py\", line 1511, in wsgi_app
    response = self.full_dispatch_request()
               ^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  File \"/srv/app.py\", line 70, in boom
    raise ValueError(\"boom on purpose\")
ValueError: boom on purpose
127.0.0.1 - - [25/Nov/2026 06:00:00] \"GET /boom HTTP/1.1\" 500 -
";

    #[test]
    fn parses_a_flask_traceback_in_one_write() {
        let mut collector = StderrCollector::default();
        let errors = collector.feed(1, 7, 42, FLASK_LOG.as_bytes().into()).errors;
        assert_eq!(errors.len(), 1);
        let error = &errors[0];
        assert_eq!(error.timestamp_ns, 42);
        assert_eq!(
            (error.error_type.as_str(), error.message.as_str()),
            ("ValueError", "boom on purpose")
        );
        assert_eq!(error.root_error_type, "ValueError");
        assert!(
            error
                .stack_trace
                .starts_with("Traceback (most recent call last):")
        );
        assert!(error.stack_trace.ends_with("ValueError: boom on purpose"));
        assert!(error.stack_trace.contains("in boom"));
        assert!(collector.pending.is_empty());
    }

    #[test]
    fn a_traceback_written_line_by_line_completes_once() {
        let mut collector = StderrCollector::default();
        let mut errors = Vec::new();
        for (index, line) in FLASK_LOG.split_inclusive('\n').enumerate() {
            // Split inside lines too.
            let (head, tail) = line.split_at(line.len() / 2);
            errors.extend(
                collector
                    .feed(1, 7, index as u64, head.as_bytes().into())
                    .errors,
            );
            errors.extend(
                collector
                    .feed(1, 7, index as u64, tail.as_bytes().into())
                    .errors,
            );
        }
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].message, "boom on purpose");
        // The write that completed the error line (line 7) dates it.
        assert_eq!(errors[0].timestamp_ns, 7);
    }

    #[test]
    fn threads_do_not_mix() {
        let mut collector = StderrCollector::default();
        let lines: Vec<&str> = FLASK_LOG.split_inclusive('\n').collect();
        let mut errors = Vec::new();
        for line in &lines {
            errors.extend(collector.feed(1, 1, 1, line.as_bytes().into()).errors);
            errors.extend(
                collector
                    .feed(1, 2, 2, b"noise from another thread\n".as_slice().into())
                    .errors,
            );
        }
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].timestamp_ns, 1);
    }

    #[test]
    fn a_chain_reports_its_root_cause() {
        let text = "Traceback (most recent call last):
  File \"a.py\", line 3, in lookup
    return table[key]
KeyError: 'user'

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File \"a.py\", line 5, in handler
    raise requests.exceptions.ConnectionError(\"refused\")
requests.exceptions.ConnectionError: refused
";
        let errors = StderrCollector::default()
            .feed(1, 1, 1, text.as_bytes().into())
            .errors;
        assert_eq!(errors.len(), 1);
        assert_eq!(
            (errors[0].error_type.as_str(), errors[0].message.as_str()),
            ("ConnectionError", "refused")
        );
        assert_eq!(
            (
                errors[0].root_error_type.as_str(),
                errors[0].root_error_message.as_str()
            ),
            ("KeyError", "'user'")
        );
        assert!(errors[0].stack_trace.contains("During handling"));
    }

    #[test]
    fn a_traceback_without_its_error_line_waits() {
        let mut collector = StderrCollector::default();
        let (head, tail) = FLASK_LOG.split_at(FLASK_LOG.find("ValueError").unwrap());
        assert!(
            collector
                .feed(1, 3, 1, head.as_bytes().into())
                .errors
                .is_empty()
        );
        assert_eq!(
            collector.feed(1, 3, 2, tail.as_bytes().into()).errors.len(),
            1
        );
    }

    #[test]
    fn parses_a_node_stack() {
        let text = "TypeError: Cannot read properties of undefined (reading 'id')
    at handler (/srv/server.js:10:20)
    at Server.<anonymous> (/srv/server.js:30:5)
GET /next 200
";
        let errors = StderrCollector::default()
            .feed(1, 1, 5, text.as_bytes().into())
            .errors;
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].error_type, "TypeError");
        assert_eq!(
            errors[0].message,
            "Cannot read properties of undefined (reading 'id')"
        );
        assert_eq!(errors[0].stack_trace.lines().count(), 3);
    }

    fn deep_traceback(frames: usize, error_line: &str) -> String {
        let mut text = String::from("Traceback (most recent call last):\n");
        for line in 0..frames {
            text.push_str(&format!(
                "  File \"/srv/deep.py\", line {line}, in recurse\n    return recurse(n - 1)\n"
            ));
        }
        text + error_line + "\n"
    }

    const CHUNK: usize = apitoolkit_common::CHUNK_SIZE;

    #[test]
    fn a_traceback_longer_than_a_chunk_keeps_its_error_and_leaks_into_nothing() {
        let write = deep_traceback(10_000, "RecursionError: maximum recursion depth exceeded");
        let tail_start = write.len() - CHUNK;
        let mut collector = StderrCollector::default();
        // As the kernel sends it: the first chunk, the skipped middle, the last chunk.
        let pieces = [
            Piece::from(&write.as_bytes()[..CHUNK]),
            Piece {
                position: CHUNK as u64,
                bytes: b"",
                skipped_len: (tail_start - CHUNK) as u64,
            },
            Piece {
                position: tail_start as u64,
                bytes: &write.as_bytes()[tail_start..],
                skipped_len: 0,
            },
        ];
        let mut errors = Vec::new();
        for piece in pieces {
            errors.extend(collector.feed(1, 3, 1, piece).errors);
        }
        assert_eq!(errors.len(), 1);
        assert_eq!(
            (errors[0].error_type.as_str(), errors[0].message.as_str()),
            ("RecursionError", "maximum recursion depth exceeded")
        );
        let missing = format!("[... {} bytes not captured ...]", tail_start - CHUNK);
        assert!(errors[0].stack_trace.contains(&missing));
        assert!(errors[0].stack_trace.len() < 2 * CHUNK + 100);

        let next = collector.feed(1, 3, 2, FLASK_LOG.as_bytes().into()).errors;
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].error_type, "ValueError");
        assert!(
            !next[0].stack_trace.contains("deep.py"),
            "{}",
            next[0].stack_trace
        );
    }

    #[test]
    fn a_traceback_cut_before_its_error_line_is_counted_and_leaks_into_nothing() {
        let write = deep_traceback(10_000, "RecursionError: maximum recursion depth exceeded");
        let mut collector = StderrCollector::default();
        let head = Piece {
            position: 0,
            bytes: &write.as_bytes()[..CHUNK],
            skipped_len: (write.len() - CHUNK) as u64,
        };
        assert_eq!(collector.feed(1, 3, 1, head), Collected::default());
        let next = collector.feed(1, 3, 2, FLASK_LOG.as_bytes().into());
        assert_eq!(next.cut, 1);
        assert_eq!(next.errors.len(), 1);
        assert_eq!(next.errors[0].message, "boom on purpose");
        assert!(!next.errors[0].stack_trace.contains("deep.py"));
        assert!(collector.pending.is_empty());
    }

    #[test]
    fn ordinary_log_lines_are_not_errors() {
        let text = "INFO: started\nError handling is configured\nValueError: but no traceback\n";
        assert!(
            StderrCollector::default()
                .feed(1, 1, 1, text.as_bytes().into())
                .errors
                .is_empty()
        );
    }

    #[test]
    fn failed_calls_name_their_cause() {
        let refused =
            CapturedError::failed_call(Some(111), Some("127.0.0.1:9".parse().unwrap()), 5);
        assert_eq!(refused.error_type, "ConnectionRefusedError");
        assert_eq!(refused.message, "connection refused (127.0.0.1:9)");
        assert_eq!(refused.root_error_message, refused.message);
        let unanswered = CapturedError::failed_call(None, None, 5);
        assert_eq!(unanswered.error_type, "NoResponseError");
    }
}
