//! The payloads' JSON for the sinks that send it as it is: stdout (a line each) and Pub/Sub (a
//! message each). It is written on the capture thread when it hands payloads over, while their
//! memory is still in its cache, once for both sinks, into reused chunk buffers; the payloads are
//! freed by the thread that allocated them, and the sinks only move bytes.

use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use uuid::Uuid;

use super::{Queue, Queued};
use crate::pipeline::payload::{Payload, write_json};

/// Size at which capture closes a chunk of JSON lines and queues it: the unit stdout writes and
/// drops when full, and whose buffer is reused.
const CHUNK_BYTES: usize = 1024 * 1024;
/// A chunk's buffer, allocated once: queues count what it holds, and this headroom lets a chunk
/// close before its buffer doubles (half of it counted, unused), unless its last line is bigger
/// than the headroom.
const CHUNK_CAPACITY: usize = CHUNK_BYTES + CHUNK_BYTES / 4;
/// Emptied chunk buffers kept for capture to fill again; beyond these, or once regrown past
/// `CHUNK_CAPACITY` (one payload far bigger than the rest), a buffer is freed.
const SPARE_CHUNKS: usize = 4;

/// Emptied chunk buffers, back from the sinks for capture to fill again.
#[derive(Default)]
struct SpareBuffers(Mutex<Vec<Vec<u8>>>);

impl SpareBuffers {
    fn take(&self) -> Vec<u8> {
        let spare = self.0.lock().expect("spare lock").pop();
        spare.unwrap_or_else(|| Vec::with_capacity(CHUNK_CAPACITY))
    }

    /// Keeps an emptied chunk buffer, unless it is a short chunk's or one regrown past
    /// `CHUNK_CAPACITY`.
    fn recycle(&self, mut json: Vec<u8>) {
        json.clear();
        let mut spare = self.0.lock().expect("spare lock");
        if spare.len() < SPARE_CHUNKS && (CHUNK_BYTES..=CHUNK_CAPACITY).contains(&json.capacity()) {
            spare.push(json);
        }
    }
}

/// A chunk's buffer as the owner of the `Bytes` the sinks hold: it goes back to the spare
/// buffers once the last of them is dropped, on whichever sink's thread that is.
struct ChunkBuffer {
    json: Vec<u8>,
    spare: Arc<SpareBuffers>,
}

impl AsRef<[u8]> for ChunkBuffer {
    fn as_ref(&self) -> &[u8] {
        &self.json
    }
}

impl Drop for ChunkBuffer {
    fn drop(&mut self) {
        self.spare.recycle(std::mem::take(&mut self.json));
    }
}

/// The JSON lines of consecutive payloads: what the stdout sink writes.
pub struct Lines {
    pub json: Bytes,
    /// Of the chunk's buffer, which the lines hold.
    capacity: usize,
    pub payloads: u64,
}

impl Queued for Lines {
    fn queued_size(&self) -> usize {
        std::mem::size_of::<Self>() + self.capacity
    }

    fn payloads(&self) -> u64 {
        self.payloads
    }
}

/// One payload's JSON, without its newline: what the Pub/Sub sink publishes as one message.
pub struct Message {
    /// A slice of its chunk's buffer.
    pub data: Bytes,
    pub msg_id: Uuid,
    /// Where the project id's text starts in `data`.
    pub project_id_at: usize,
    /// Bytes of its chunk's buffer it stands for: its line, and with a chunk's last message
    /// the buffer's unused rest (freed with the last message: the oldest are dropped first).
    held: usize,
}

impl Queued for Message {
    fn queued_size(&self) -> usize {
        std::mem::size_of::<Self>() + self.held
    }
}

pub type LineQueue = Queue<Lines>;
pub type MessageQueue = Queue<Message>;

/// Where one payload's JSON is in a chunk being written.
struct Written {
    start: usize,
    end: usize,
    msg_id: Uuid,
    project_id_at: usize,
}

/// The queues of the sinks that take JSON, and the buffers it is written into.
#[derive(Clone, Default)]
pub struct JsonQueues {
    pub stdout: Option<Arc<LineQueue>>,
    pub pubsub: Option<Arc<MessageQueue>>,
    spare: Arc<SpareBuffers>,
    /// The project id, once the Pub/Sub sink has resolved it after capture started (the server
    /// was unreachable then, and payloads carry none): stamped into the JSON from then on.
    late_project_id: Arc<OnceLock<Uuid>>,
}

impl JsonQueues {
    pub fn new(stdout: Option<Arc<LineQueue>>, pubsub: Option<Arc<MessageQueue>>) -> Self {
        Self {
            stdout,
            pubsub,
            spare: Arc::default(),
            late_project_id: Arc::default(),
        }
    }

    /// Where the Pub/Sub sink puts a project id it resolves after capture started.
    pub fn late_project_id(&self) -> Arc<OnceLock<Uuid>> {
        Arc::clone(&self.late_project_id)
    }

    /// Queues the JSON of `payloads`, in order, for each JSON sink.
    pub fn push<'a>(&self, payloads: impl IntoIterator<Item = &'a Payload>) {
        if self.stdout.is_none() && self.pubsub.is_none() {
            return;
        }
        let late_project_id = self.late_project_id.get();
        let mut json = self.spare.take();
        let mut written = Vec::new();
        for payload in payloads {
            let start = json.len();
            let project_id_at = write_json(payload, &mut json) - start;
            if let Some(&project_id) = late_project_id
                && project_id != payload.project_id
            {
                stamp_project_id(&mut json[start..], project_id_at, project_id);
            }
            written.push(Written {
                start,
                end: json.len(),
                msg_id: payload.msg_id,
                project_id_at,
            });
            json.push(b'\n');
            if json.len() >= CHUNK_BYTES {
                let full = std::mem::replace(&mut json, self.spare.take());
                self.queue_chunk(full, &mut written);
            }
        }
        if written.is_empty() {
            self.spare.recycle(json);
        } else {
            self.queue_chunk(json, &mut written);
        }
    }

    /// Queues a chunk's lines and messages, and empties `written`.
    fn queue_chunk(&self, mut json: Vec<u8>, written: &mut Vec<Written>) {
        // Queues count the buffer a chunk holds: one far bigger than the chunk is swapped for
        // one of its size. That is a drain's short last chunk (a few lines at a low rate would
        // count as a whole chunk buffer), or one a large payload regrew (doubling: up to twice
        // its size, which may alone be over the queue's bound).
        if json.len() < CHUNK_BYTES / 2 || json.capacity() > CHUNK_CAPACITY {
            let exact = json.to_vec();
            self.spare.recycle(std::mem::replace(&mut json, exact));
        }
        let capacity = json.capacity();
        let unused = capacity - json.len();
        let chunk = Bytes::from_owner(ChunkBuffer {
            json,
            spare: Arc::clone(&self.spare),
        });
        if let Some(pubsub) = &self.pubsub {
            let last = written.len() - 1;
            pubsub.push(written.iter().enumerate().map(|(i, message)| Message {
                data: chunk.slice(message.start..message.end),
                msg_id: message.msg_id,
                project_id_at: message.project_id_at,
                held: message.end + 1 - message.start + if i == last { unused } else { 0 },
            }));
        }
        if let Some(stdout) = &self.stdout {
            stdout.push([Lines {
                json: chunk,
                capacity,
                payloads: written.len() as u64,
            }]);
        }
        written.clear();
    }
}

/// `project_id` as the JSON of a payload carries it: hyphenated, lower case.
fn project_id_text(project_id: Uuid) -> [u8; uuid::fmt::Hyphenated::LENGTH] {
    let mut text = [0; uuid::fmt::Hyphenated::LENGTH];
    project_id.hyphenated().encode_lower(&mut text);
    text
}

/// Whether the JSON of a payload carries `project_id` at `at` (see `write_json`).
pub(super) fn carries_project_id(json: &[u8], at: usize, project_id: Uuid) -> bool {
    let text = project_id_text(project_id);
    json.get(at..at + text.len()) == Some(&text[..])
}

/// Writes `project_id` over the one the JSON of a payload carries at `at`.
pub(super) fn stamp_project_id(json: &mut [u8], at: usize, project_id: Uuid) {
    let text = project_id_text(project_id);
    json[at..at + text.len()].copy_from_slice(&text);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::tests::payload;

    fn payloads(count: usize) -> Vec<Payload> {
        (0..count).map(|i| payload(&format!("/{i}"))).collect()
    }

    fn json(payload: &Payload) -> Vec<u8> {
        let mut json = Vec::new();
        write_json(payload, &mut json);
        json
    }

    fn both() -> JsonQueues {
        JsonQueues::new(
            Some(LineQueue::new("stdout", usize::MAX)),
            Some(MessageQueue::new("pubsub", usize::MAX)),
        )
    }

    #[tokio::test]
    async fn a_late_project_id_is_written_into_both_sinks_json_once_resolved() {
        let queues = both();
        let before = payloads(1);
        queues.push(&before);
        let late = Uuid::from_u128(0x1234);
        assert_ne!(before[0].project_id, late);
        queues.late_project_id().set(late).unwrap();
        let after = payloads(2);
        queues.push(&after);
        let (stdout, pubsub) = (
            queues.stdout.clone().unwrap(),
            queues.pubsub.clone().unwrap(),
        );
        stdout.close();
        pubsub.close();

        let mut expected = json(&before[0]);
        expected.push(b'\n');
        for payload in &after {
            let mut stamped = payload.clone();
            stamped.project_id = late;
            expected.extend(json(&stamped));
            expected.push(b'\n');
        }
        let mut lines = Vec::new();
        while let Some(batch) = stdout.pop(usize::MAX, CHUNK_BYTES).await {
            batch
                .iter()
                .for_each(|chunk| lines.extend_from_slice(&chunk.json));
        }
        assert_eq!(lines, expected);
        let messages = pubsub.pop(usize::MAX, usize::MAX).await.unwrap();
        let carried: Vec<bool> = messages
            .iter()
            .map(|message| carries_project_id(&message.data, message.project_id_at, late))
            .collect();
        assert_eq!(carried, [false, true, true]);
    }

    #[tokio::test]
    async fn both_sinks_get_every_payload_s_json_in_order_from_reused_buffers() {
        let payloads = payloads(5000);
        let queues = both();
        queues.push(&payloads);
        let (stdout, pubsub) = (
            queues.stdout.clone().unwrap(),
            queues.pubsub.clone().unwrap(),
        );
        assert!(stdout.queued_len() >= 3, "the test spans chunks");
        stdout.close();
        pubsub.close();

        let mut lines = Vec::new();
        let mut lines_payloads = 0;
        while let Some(batch) = stdout.pop(usize::MAX, CHUNK_BYTES).await {
            for chunk in batch {
                lines.extend_from_slice(&chunk.json);
                lines_payloads += chunk.payloads;
            }
        }
        let expected_lines: Vec<u8> = payloads
            .iter()
            .flat_map(|payload| [json(payload), b"\n".to_vec()].concat())
            .collect();
        assert_eq!(lines, expected_lines);
        assert_eq!(lines_payloads, 5000);

        let messages = pubsub.pop(usize::MAX, usize::MAX).await.unwrap();
        assert_eq!(messages.len(), 5000);
        for (message, payload) in messages.iter().zip(&payloads) {
            assert_eq!(message.data, json(payload));
            assert_eq!(message.msg_id, payload.msg_id);
            let at = message.project_id_at;
            assert_eq!(
                &message.data[at..at + uuid::fmt::Hyphenated::LENGTH],
                payload.project_id.hyphenated().to_string().as_bytes()
            );
        }
        let spare_before = queues.spare.0.lock().unwrap().len();
        drop(messages);
        let spare = queues.spare.0.lock().unwrap();
        assert!(
            spare.len() > spare_before,
            "buffers come back once both sinks are done"
        );
        assert!(spare.iter().all(|json| json.capacity() == CHUNK_CAPACITY));
    }

    #[test]
    fn a_queue_s_bound_counts_the_buffers_its_items_hold() {
        let queues = both();
        queues.push(&payloads(3));
        let lines = queues.stdout.as_ref().unwrap().queued_bytes();
        let messages = queues.pubsub.as_ref().unwrap().queued_bytes();
        // A short chunk is held in a buffer of its size.
        let json_bytes: usize = payloads(3)
            .iter()
            .map(|payload| json(payload).len() + 1)
            .sum();
        assert_eq!(lines, std::mem::size_of::<Lines>() + json_bytes);
        assert_eq!(messages, 3 * std::mem::size_of::<Message>() + json_bytes);

        // A full chunk's unused rest counts with its last message.
        let queues = both();
        let many = payloads(1000);
        queues.push(&many);
        let pubsub = queues.pubsub.as_ref().unwrap();
        let json_bytes: usize = many.iter().map(|payload| json(payload).len() + 1).sum();
        let chunks = queues.stdout.as_ref().unwrap().queued_bytes() / CHUNK_BYTES;
        assert!(chunks >= 1);
        assert!(
            pubsub.queued_bytes() > 1000 * std::mem::size_of::<Message>() + json_bytes,
            "the unused rest of {chunks} full chunk buffers counts"
        );

        // A payload that regrew its buffer counts its JSON, not the doubled buffer.
        let mut large = payload("/large");
        large.response_body = vec![b'x'; 3 << 20];
        let queues = both();
        queues.push([&large]);
        let json_bytes = json(&large).len() + 1;
        let stdout = queues.stdout.as_ref().unwrap();
        assert_eq!(
            stdout.queued_bytes(),
            std::mem::size_of::<Lines>() + json_bytes
        );
        let pubsub = queues.pubsub.as_ref().unwrap();
        assert_eq!(
            pubsub.queued_bytes(),
            std::mem::size_of::<Message>() + json_bytes
        );
    }

    #[test]
    fn a_full_queue_counts_every_payload_it_drops() {
        let three = payloads(3);
        let probe = both();
        probe.push(&three);
        let lines = probe.stdout.as_ref().unwrap().queued_bytes();
        let messages = probe.pubsub.as_ref().unwrap().queued_bytes();
        let queues = JsonQueues::new(
            Some(LineQueue::new("stdout", lines * 3 / 2)),
            Some(MessageQueue::new("pubsub", messages * 3 / 2)),
        );
        queues.push(&three);
        queues.push(&three);
        let (stdout, pubsub) = (queues.stdout.unwrap(), queues.pubsub.unwrap());
        // Stdout drops whole chunks; Pub/Sub single messages, oldest first.
        assert_eq!(stdout.dropped(), 3);
        assert_eq!(stdout.queued_bytes(), lines);
        assert_eq!(pubsub.dropped(), 2);
        assert_eq!(pubsub.queued_len(), 4);
    }

    #[test]
    fn without_json_sinks_nothing_is_written() {
        let queues = JsonQueues::default();
        queues.push(&payloads(3));
        assert!(queues.spare.0.lock().unwrap().is_empty());
    }
}
