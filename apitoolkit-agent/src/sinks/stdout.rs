//! NDJSON on standard output: one payload per line. The lines are written on the capture
//! thread when it hands payloads over, while their memory is still in its cache, and the
//! payloads are freed by the thread that allocated them; this sink only copies bytes out.

use std::{
    io::{self, Write as _},
    sync::{Arc, Mutex},
};

use tokio::runtime::Handle;

use super::{Queue, Queued, SinkQueue};
use crate::pipeline::payload::{Payload, write_json};

/// Size at which capture closes a chunk of lines and queues it: the unit the sink writes,
/// the queue drops when full, and whose buffer is reused.
const CHUNK_BYTES: usize = 1024 * 1024;
/// A chunk's buffer, allocated once: the queue counts capacity, and this headroom lets a
/// chunk close before its buffer doubles (half of it counted, unused), unless its last line
/// is bigger than the headroom.
const CHUNK_CAPACITY: usize = CHUNK_BYTES + CHUNK_BYTES / 4;
/// Emptied chunk buffers kept for capture to fill again; beyond these, or once regrown past
/// `CHUNK_CAPACITY` (one payload far bigger than the rest), a buffer is freed.
const SPARE_CHUNKS: usize = 4;

/// The JSON lines of consecutive payloads.
pub struct Lines {
    json: Vec<u8>,
    payloads: u64,
}

impl Queued for Lines {
    fn queued_size(&self) -> usize {
        std::mem::size_of::<Self>() + self.json.capacity()
    }

    fn payloads(&self) -> u64 {
        self.payloads
    }
}

/// The stdout sink's queue: lines in chunks, and the emptied buffers the sink hands back.
pub struct LineQueue {
    chunks: Arc<Queue<Lines>>,
    spare: Mutex<Vec<Vec<u8>>>,
}

impl LineQueue {
    pub fn new(name: &'static str, max_bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            chunks: Queue::new(name, max_bytes),
            spare: Mutex::new(Vec::with_capacity(SPARE_CHUNKS)),
        })
    }

    /// Queues the JSON lines of `payloads`, in order.
    pub fn push<'a>(&self, payloads: impl IntoIterator<Item = &'a Payload>) {
        let mut json = self.spare_buffer();
        let mut count = 0;
        for payload in payloads {
            write_json(payload, &mut json);
            json.push(b'\n');
            count += 1;
            if json.len() >= CHUNK_BYTES {
                let full = std::mem::replace(&mut json, self.spare_buffer());
                self.chunks.push([Lines {
                    json: full,
                    payloads: std::mem::take(&mut count),
                }]);
            }
        }
        if count == 0 {
            self.recycle(json);
        } else if json.len() < CHUNK_BYTES / 2 {
            // A drain's last chunk, short: queued in a buffer of its size, since the queue's
            // bound counts capacity (a few lines at a low rate would count as a whole chunk).
            let lines = Lines {
                json: json.to_vec(),
                payloads: count,
            };
            self.recycle(json);
            self.chunks.push([lines]);
        } else {
            self.chunks.push([Lines {
                json,
                payloads: count,
            }]);
        }
    }

    fn spare_buffer(&self) -> Vec<u8> {
        let spare = self.spare.lock().expect("spare lock").pop();
        spare.unwrap_or_else(|| Vec::with_capacity(CHUNK_CAPACITY))
    }

    /// Keeps an emptied chunk buffer for capture to fill again, unless it is a short chunk's or
    /// one regrown past `CHUNK_CAPACITY`.
    fn recycle(&self, mut json: Vec<u8>) {
        json.clear();
        let mut spare = self.spare.lock().expect("spare lock");
        if spare.len() < SPARE_CHUNKS && (CHUNK_BYTES..=CHUNK_CAPACITY).contains(&json.capacity()) {
            spare.push(json);
        }
    }
}

impl SinkQueue for LineQueue {
    fn name(&self) -> &'static str {
        self.chunks.name()
    }

    fn queued_bytes(&self) -> usize {
        self.chunks.queued_bytes()
    }

    fn dropped(&self) -> u64 {
        self.chunks.dropped()
    }

    fn close(&self) {
        self.chunks.close();
    }
}

/// Writes lines until the queue is closed and empty; returns how many payloads were written.
/// It runs on a thread of its own and writes with blocking calls: tokio's stdout would hand
/// every write to its blocking pool, one more thread switch per chunk.
pub fn run(queue: Arc<LineQueue>, runtime: &Handle) -> io::Result<u64> {
    become_batch_thread();
    let mut stdout = io::stdout().lock();
    let mut written = 0;
    // Reused: one allocation for every batch.
    let mut batch = Vec::new();
    while runtime.block_on(queue.chunks.pop_into(&mut batch, usize::MAX, CHUNK_BYTES)) {
        for lines in batch.drain(..) {
            stdout.write_all(&lines.json)?;
            written += lines.payloads;
            queue.recycle(lines.json);
        }
        stdout.flush()?;
    }
    Ok(written)
}

/// Makes this thread a batch thread, which the scheduler never lets preempt the thread that
/// wakes it: capture queues lines at every drain, and this thread, woken then, would stop it
/// mid-drain (about one drain in two at 1k req/s, with its caches lost). Woken as a batch
/// thread it runs on an idle core, or once capture sleeps or its time slice ends.
fn become_batch_thread() {
    let normal_priority = libc::sched_param { sched_priority: 0 };
    // SAFETY: `normal_priority` is a valid sched_param for the call; pid 0 is this thread, and
    // moving between the normal and batch policies needs no privilege.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &normal_priority) } != 0 {
        let error = io::Error::last_os_error();
        tracing::debug!(%error, "stdout thread stays a normal thread");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::tests::payload;

    fn json_lines(payloads: &[Payload]) -> Vec<u8> {
        let mut expected = Vec::new();
        for payload in payloads {
            write_json(payload, &mut expected);
            expected.push(b'\n');
        }
        expected
    }

    #[tokio::test]
    async fn lines_come_out_in_order_in_chunks_and_buffers_are_reused() {
        let payloads: Vec<Payload> = (0..5000).map(|i| payload(&format!("/{i}"))).collect();
        let expected = json_lines(&payloads);
        let queue = LineQueue::new("stdout", usize::MAX);
        queue.push(&payloads);
        assert!(queue.chunks.queued_len() >= 3, "the test spans chunks");
        queue.chunks.close();
        let mut out = Vec::new();
        let mut payloads_out = 0;
        while let Some(batch) = queue.chunks.pop(usize::MAX, CHUNK_BYTES).await {
            for lines in batch {
                out.extend_from_slice(&lines.json);
                payloads_out += lines.payloads;
                queue.recycle(lines.json);
            }
        }
        assert_eq!(out, expected);
        assert_eq!(payloads_out, 5000);
        let spare = queue.spare.lock().unwrap();
        assert!(!spare.is_empty());
        assert!(spare.iter().all(|json| json.capacity() == CHUNK_CAPACITY));
    }

    #[test]
    fn a_full_queue_counts_every_payload_of_the_chunks_it_drops() {
        let payloads: Vec<Payload> = (0..3).map(|i| payload(&format!("/{i}"))).collect();
        let probe = LineQueue::new("stdout", usize::MAX);
        probe.push(&payloads);
        let one_chunk = probe.queued_bytes();
        // A short chunk counts its lines, not a whole chunk buffer.
        assert!(one_chunk < 4096, "{one_chunk} bytes queued for 3 lines");
        let queue = LineQueue::new("stdout", one_chunk * 3 / 2);
        queue.push(&payloads);
        assert_eq!(queue.dropped(), 0);
        queue.push(&payloads);
        assert_eq!(queue.dropped(), 3);
        assert_eq!(queue.queued_bytes(), one_chunk);
    }
}
