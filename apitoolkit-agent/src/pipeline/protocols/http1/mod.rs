//! HTTP/1.x reassembly for one connection: a parser per direction and FIFO pairing of
//! requests with responses into exchanges.

mod framing;
pub mod parser;

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use parser::{MessageParser, Polled};

use super::{
    Anomaly, Exchange, Reassembled, RequestRead,
    message::{Message, MessageKind},
};
use crate::pipeline::trace::TRACEPARENT;

/// Requests waiting for a response on one connection; beyond this the oldest is dropped (a
/// client that pipelines this deep, or a response stream we cannot see).
const MAX_PENDING_REQUESTS: usize = 128;

pub struct HttpConnection {
    requests: MessageParser,
    responses: MessageParser,
    /// Requests awaiting a response, with their serials.
    pending: VecDeque<(u64, Message)>,
    next_serial: u64,
    /// Set by a gap that dropped a message: responses are discarded until a request starts while
    /// the response stream is between messages, so no request ever gets another's response.
    desynced: bool,
    /// Nothing valid has been parsed yet; a malformed start means the protocol is not HTTP.
    seen_message: bool,
    upgraded: bool,
    h2c: Option<H2cUpgrade>,
}

/// A switch to HTTP/2 by `Upgrade: h2c`: the request that asked for it and what each side
/// sent after the 101.
pub struct H2cUpgrade {
    pub request: Message,
    pub client_bytes: BytesMut,
    pub server_bytes: BytesMut,
}

fn upgrades_to_h2c(response: &Message) -> bool {
    response
        .header("upgrade")
        .is_some_and(|protocol| protocol.trim().eq_ignore_ascii_case("h2c"))
}

impl HttpConnection {
    pub fn new(max_body_bytes: usize) -> Self {
        Self {
            requests: MessageParser::new(MessageKind::Request, max_body_bytes),
            responses: MessageParser::new(MessageKind::Response, max_body_bytes),
            pending: VecDeque::new(),
            next_serial: 0,
            desynced: false,
            seen_message: false,
            upgraded: false,
            h2c: None,
        }
    }

    /// For a connection joined mid-stream: both directions wait for a message start, and
    /// responses to requests sent before the agent started are dropped.
    pub fn joined_midstream(max_body_bytes: usize) -> Self {
        Self {
            requests: MessageParser::resyncing(MessageKind::Request, max_body_bytes),
            responses: MessageParser::resyncing(MessageKind::Response, max_body_bytes),
            desynced: true,
            ..Self::new(max_body_bytes)
        }
    }

    /// True once the first bytes of the connection failed to parse as HTTP: the caller can stop
    /// capturing it.
    pub fn is_not_http(&self, output: &Reassembled) -> bool {
        !self.seen_message
            && output
                .anomalies
                .iter()
                .any(|anomaly| matches!(anomaly, Anomaly::Malformed(..)))
    }

    pub fn is_upgraded(&self) -> bool {
        self.upgraded
    }

    /// The connection switched to HTTP/2 by `Upgrade: h2c`.
    pub fn take_h2c_upgrade(&mut self) -> Option<H2cUpgrade> {
        self.h2c.take()
    }

    pub fn push(
        &mut self,
        kind: MessageKind,
        data: Bytes,
        timestamp_ns: u64,
        output: &mut Reassembled,
    ) {
        let parser = match kind {
            MessageKind::Request => &mut self.requests,
            MessageKind::Response => &mut self.responses,
        };
        parser.push(data, timestamp_ns);
        self.drain(output);
        match kind {
            MessageKind::Request => self.requests.settle(),
            MessageKind::Response => self.responses.settle(),
        }
    }

    pub fn gap(&mut self, kind: MessageKind, len: u64, output: &mut Reassembled) {
        let absorbed = match kind {
            MessageKind::Request => self.requests.gap(len),
            MessageKind::Response => self.responses.gap(len),
        };
        if absorbed {
            // The gap may have been the rest of a body: that message is complete now.
            self.drain(output);
        } else {
            output.anomalies.push(Anomaly::Desync);
            self.drop_pending(output);
            self.desynced = true;
        }
    }

    /// The connection closed: a close-delimited response completes; what is still pending
    /// never got an answer.
    pub fn close(&mut self, output: &mut Reassembled) {
        if let Some(response) = self.responses.close() {
            self.on_response(response, output);
        }
        output
            .unanswered
            .extend(self.pending.drain(..).map(|(_, request)| request));
    }

    /// Heap bytes held for unfinished and unanswered messages.
    pub fn retained_bytes(&self) -> usize {
        let pending: usize = self
            .pending
            .iter()
            .map(|(_, request)| request.retained_bytes())
            .sum();
        self.requests.retained_bytes() + self.responses.retained_bytes() + pending
    }

    /// Drops every unfinished and unanswered message to free memory, as a gap in both
    /// directions would: pairing restarts at the next request.
    pub fn evict(&mut self, output: &mut Reassembled) {
        self.requests.abandon();
        self.responses.abandon();
        self.drop_pending(output);
        self.pending = VecDeque::new();
        self.desynced = true;
    }

    pub fn awaits_response(&self) -> bool {
        !self.pending.is_empty()
    }

    fn drop_pending(&mut self, output: &mut Reassembled) {
        for _ in self.pending.drain(..) {
            output
                .anomalies
                .push(Anomaly::Unpaired(MessageKind::Request));
        }
    }

    fn drain(&mut self, output: &mut Reassembled) {
        loop {
            let mut progressed = false;
            while let Some(polled) = self.requests.poll(None) {
                progressed = true;
                match polled {
                    Polled::Message(request) => self.on_request(request, output),
                    Polled::Interim => {}
                    Polled::Malformed(error) => output
                        .anomalies
                        .push(Anomaly::Malformed(MessageKind::Request, error.into())),
                }
            }
            // Borrows disjoint fields, so no per-poll copy of the method.
            let method = self
                .pending
                .front()
                .and_then(|(_, request)| request.method())
                .or_else(|| self.requests.request_in_progress_method());
            if let Some(polled) = self.responses.poll(method) {
                progressed = true;
                match polled {
                    Polled::Message(response) => self.on_response(response, output),
                    Polled::Interim => {}
                    Polled::Malformed(error) => output
                        .anomalies
                        .push(Anomaly::Malformed(MessageKind::Response, error.into())),
                }
            }
            if !progressed || self.upgraded {
                return;
            }
        }
    }

    fn on_request(&mut self, request: Message, output: &mut Reassembled) {
        if self.desynced {
            // In sync again only if no response is half-way: then the next response answers
            // this request.
            if self.responses.is_idle() {
                self.desynced = false;
            } else {
                output
                    .anomalies
                    .push(Anomaly::Unpaired(MessageKind::Request));
                return;
            }
        }
        self.seen_message = true;
        if self.pending.len() >= MAX_PENDING_REQUESTS {
            self.pending.pop_front();
            output
                .anomalies
                .push(Anomaly::Unpaired(MessageKind::Request));
        }
        let serial = self.next_serial;
        self.next_serial += 1;
        output.requests_read.push(RequestRead {
            serial,
            traceparent: request.header(TRACEPARENT).map(str::to_owned),
        });
        self.pending.push_back((serial, request));
    }

    fn on_response(&mut self, response: Message, output: &mut Reassembled) {
        self.seen_message = true;
        if !self.desynced && self.pending.is_empty() {
            // Answered before its body was read: the request still in progress gets this
            // response, so it is never paired with the next request.
            if let Some(request) = self.requests.detach_in_progress() {
                self.on_request(request, output);
            }
        }
        let request = if self.desynced {
            None
        } else {
            self.pending.pop_front()
        };
        let Some((serial, request)) = request else {
            output
                .anomalies
                .push(Anomaly::Unpaired(MessageKind::Response));
            return;
        };
        if response.status() == Some(101) {
            self.upgraded = true;
            let client_bytes = self.requests.upgrade();
            let server_bytes = self.responses.upgrade();
            if upgrades_to_h2c(&response) {
                // Not an exchange: HTTP/2 answers the request on stream 1.
                self.h2c = Some(H2cUpgrade {
                    request,
                    client_bytes,
                    server_bytes,
                });
                return;
            }
        }
        output.exchanges.push(Exchange {
            serial,
            request,
            response,
            reset: None,
            headers_incomplete: false,
        });
    }
}

/// Tests push each record as a copy of its own.
#[cfg(test)]
impl HttpConnection {
    fn push_copy(&mut self, kind: MessageKind, data: &[u8], at: u64, output: &mut Reassembled) {
        self.push(kind, Bytes::copy_from_slice(data), at, output);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::protocols::message::StartLine;

    fn targets(output: &Reassembled) -> Vec<(String, u16)> {
        output
            .exchanges
            .iter()
            .map(|exchange| {
                let StartLine::Request { target, .. } = &exchange.request.start else {
                    panic!("request expected");
                };
                (target.clone(), exchange.response.status().unwrap())
            })
            .collect()
    }

    fn response(status: u16, body: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 {status} X\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    /// A POST whose body is larger than the server's first read, answered (404) before the
    /// server read the rest, then discarded by the server, then a GET on the same connection.
    fn early_answered_upload(connection: &mut HttpConnection, output: &mut Reassembled) {
        let head = "POST /nonexistent HTTP/1.1\r\nContent-Length: 20000\r\n\r\n";
        let body = vec![b'x'; 20_000];
        let mut first_read = head.as_bytes().to_vec();
        first_read.extend_from_slice(&body[..8_000]);
        connection.push_copy(MessageKind::Request, &first_read, 1, output);
        connection.push_copy(MessageKind::Response, &response(404, "missing"), 2, output);
        connection.push_copy(MessageKind::Request, &body[8_000..], 3, output);
    }

    #[test]
    fn a_response_before_the_request_body_ends_answers_that_request() {
        let mut connection = HttpConnection::new(1 << 20);
        let mut output = Reassembled::default();
        early_answered_upload(&mut connection, &mut output);
        connection.push_copy(
            MessageKind::Request,
            b"GET /next HTTP/1.1\r\n\r\n",
            4,
            &mut output,
        );
        connection.push_copy(
            MessageKind::Response,
            &response(200, "next"),
            5,
            &mut output,
        );
        assert_eq!(
            targets(&output),
            vec![("/nonexistent".to_owned(), 404), ("/next".to_owned(), 200)]
        );
        let upload = &output.exchanges[0];
        assert!(upload.request.body.incomplete);
        assert_eq!(upload.request.body.bytes.len(), 8_000);
        assert_eq!(upload.response.body.bytes, b"missing");
        assert_eq!(output.exchanges[1].response.body.bytes, b"next");
        let serials: Vec<u64> = output
            .requests_read
            .iter()
            .map(|read| read.serial)
            .collect();
        assert_eq!(serials, vec![0, 1]);
        assert!(output.anomalies.is_empty(), "{:?}", output.anomalies);
    }

    #[test]
    fn an_early_response_on_a_closing_connection_is_not_lost() {
        let mut connection = HttpConnection::new(1 << 20);
        let mut output = Reassembled::default();
        let head = b"POST /upload HTTP/1.1\r\nContent-Length: 50000\r\nConnection: close\r\n\r\n";
        connection.push_copy(MessageKind::Request, head, 1, &mut output);
        connection.push_copy(
            MessageKind::Response,
            &response(401, "who?"),
            2,
            &mut output,
        );
        connection.close(&mut output);
        assert_eq!(targets(&output), vec![("/upload".to_owned(), 401)]);
        assert!(output.unanswered.is_empty() && output.anomalies.is_empty());
    }

    #[test]
    fn pipelined_requests_pair_in_order() {
        let mut connection = HttpConnection::new(1 << 20);
        let mut output = Reassembled::default();
        let requests: String = (0..5)
            .map(|i| format!("GET /{i} HTTP/1.1\r\n\r\n"))
            .collect();
        connection.push_copy(MessageKind::Request, requests.as_bytes(), 1, &mut output);
        // Distinct statuses with bodies (204 would have none) tell the pairs apart.
        let statuses = [200, 201, 202, 203, 404];
        let responses: Vec<u8> = statuses.iter().flat_map(|s| response(*s, "ok")).collect();
        connection.push_copy(MessageKind::Response, &responses, 2, &mut output);
        assert_eq!(
            targets(&output),
            (0..5)
                .map(|i| (format!("/{i}"), statuses[i]))
                .collect::<Vec<_>>()
        );
        assert!(output.anomalies.is_empty());
    }

    #[test]
    fn head_request_in_a_pipeline_frames_its_response_without_body() {
        let mut connection = HttpConnection::new(1 << 20);
        let mut output = Reassembled::default();
        connection.push_copy(
            MessageKind::Request,
            b"HEAD /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n",
            1,
            &mut output,
        );
        let mut responses = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n".to_vec();
        responses.extend(response(201, "hello"));
        connection.push_copy(MessageKind::Response, &responses, 2, &mut output);
        assert_eq!(
            targets(&output),
            vec![("/a".to_owned(), 200), ("/b".to_owned(), 201)]
        );
        assert!(output.exchanges[0].response.body.bytes.is_empty());
        assert_eq!(output.exchanges[1].response.body.bytes, b"hello");
    }

    #[test]
    fn expect_continue_pairs_the_final_response() {
        let mut connection = HttpConnection::new(1 << 20);
        let mut output = Reassembled::default();
        connection.push_copy(
            MessageKind::Request,
            b"POST /up HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n",
            1,
            &mut output,
        );
        connection.push_copy(
            MessageKind::Response,
            b"HTTP/1.1 100 Continue\r\n\r\n",
            2,
            &mut output,
        );
        connection.push_copy(MessageKind::Request, b"data", 3, &mut output);
        connection.push_copy(MessageKind::Response, &response(201, "{}"), 4, &mut output);
        assert_eq!(targets(&output), vec![("/up".to_owned(), 201)]);
        assert_eq!(output.exchanges[0].request.body.bytes, b"data");
    }

    #[test]
    fn a_lost_request_never_takes_the_next_response() {
        let mut connection = HttpConnection::new(1 << 20);
        let mut output = Reassembled::default();
        connection.push_copy(
            MessageKind::Request,
            b"GET /1 HTTP/1.1\r\n\r\n",
            1,
            &mut output,
        );
        connection.push_copy(MessageKind::Response, &response(200, "one"), 2, &mut output);
        // Request /2 is lost in the middle of its head.
        connection.push_copy(MessageKind::Request, b"GET /2 HT", 3, &mut output);
        connection.gap(MessageKind::Request, 30, &mut output);
        connection.push_copy(MessageKind::Response, &response(202, "two"), 4, &mut output);
        connection.push_copy(
            MessageKind::Request,
            b"GET /3 HTTP/1.1\r\n\r\n",
            5,
            &mut output,
        );
        connection.push_copy(
            MessageKind::Response,
            &response(203, "three"),
            6,
            &mut output,
        );
        assert_eq!(
            targets(&output),
            vec![("/1".to_owned(), 200), ("/3".to_owned(), 203)]
        );
        assert!(output.anomalies.contains(&Anomaly::Desync));
        assert!(
            output
                .anomalies
                .contains(&Anomaly::Unpaired(MessageKind::Response))
        );
    }

    #[test]
    fn non_http_start_is_reported() {
        let mut connection = HttpConnection::new(1 << 20);
        let mut output = Reassembled::default();
        connection.push_copy(
            MessageKind::Request,
            b"\x00\x00\x00\x08\x04\xd2\x16\x2f\r\n\r\n",
            1,
            &mut output,
        );
        assert!(connection.is_not_http(&output));
    }

    #[test]
    fn upgrade_pairs_and_then_ignores_the_stream() {
        let mut connection = HttpConnection::new(1 << 20);
        let mut output = Reassembled::default();
        connection.push_copy(
            MessageKind::Request,
            b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            1,
            &mut output,
        );
        connection.push_copy(
            MessageKind::Response,
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n\x81\x02hi",
            2,
            &mut output,
        );
        connection.push_copy(MessageKind::Request, b"\x81\x82garbage", 3, &mut output);
        assert_eq!(targets(&output), vec![("/ws".to_owned(), 101)]);
        assert!(connection.is_upgraded());
        assert!(output.anomalies.is_empty());
    }
}
