//! Where payloads go. Capture never waits for a sink: payloads cross a queue bounded in bytes,
//! in batches (one wake-up of the sink per batch, not per payload), and a payload that would
//! overflow the bound is dropped and counted.

pub mod stdout;

use std::sync::{
    Arc,
    atomic::{AtomicU64, AtomicUsize, Ordering},
    mpsc::{Receiver, Sender, channel},
};

use crate::payload::Payload;

/// Rough in-memory size of a queued payload: its bodies dominate.
fn queued_size(payload: &Payload) -> usize {
    1024 + payload.request_body.len() + payload.response_body.len()
}

struct QueueState {
    max_bytes: usize,
    queued_bytes: AtomicUsize,
    dropped: AtomicU64,
}

/// The capture side of a sink queue.
#[derive(Clone)]
pub struct SinkSender {
    queue: Sender<Vec<Payload>>,
    state: Arc<QueueState>,
}

/// The sink side: yields payloads and releases their room in the queue.
pub struct SinkReceiver {
    queue: Receiver<Vec<Payload>>,
    state: Arc<QueueState>,
}

impl SinkSender {
    /// Queues the payloads that fit in the byte bound and drops (and counts) the rest.
    pub fn send(&self, payloads: Vec<Payload>) {
        let mut batch = Vec::with_capacity(payloads.len());
        let mut batch_bytes = 0;
        for payload in payloads {
            let size = queued_size(&payload);
            let reserved = self.state.queued_bytes.fetch_update(
                Ordering::AcqRel,
                Ordering::Acquire,
                |queued| (queued + size <= self.state.max_bytes).then_some(queued + size),
            );
            if reserved.is_ok() {
                batch_bytes += size;
                batch.push(payload);
            } else {
                self.state.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        if batch.is_empty() {
            return;
        }
        let count = batch.len() as u64;
        if self.queue.send(batch).is_err() {
            self.state
                .queued_bytes
                .fetch_sub(batch_bytes, Ordering::AcqRel);
            self.state.dropped.fetch_add(count, Ordering::Relaxed);
        }
    }

    pub fn dropped(&self) -> u64 {
        self.state.dropped.load(Ordering::Relaxed)
    }
}

impl SinkReceiver {
    /// Blocks for the next batch; `None` once every sender is gone and the queue is empty.
    pub fn recv(&self) -> Option<Vec<Payload>> {
        let batch = self.queue.recv().ok()?;
        let bytes: usize = batch.iter().map(queued_size).sum();
        self.state.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
        Some(batch)
    }
}

pub fn queue(max_bytes: usize) -> (SinkSender, SinkReceiver) {
    let (sender, receiver) = channel();
    let state = Arc::new(QueueState {
        max_bytes,
        queued_bytes: AtomicUsize::new(0),
        dropped: AtomicU64::new(0),
    });
    (
        SinkSender {
            queue: sender,
            state: state.clone(),
        },
        SinkReceiver {
            queue: receiver,
            state,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload() -> Payload {
        serde_json::from_str(include_str!("../../../tests/fixtures/payload.json")).unwrap()
    }

    #[test]
    fn a_full_queue_drops_and_counts_until_the_sink_catches_up() {
        let one = queued_size(&payload());
        let (sender, receiver) = queue(one * 2);
        sender.send(vec![payload(), payload(), payload()]);
        assert_eq!(sender.dropped(), 1);
        assert_eq!(receiver.recv().map(|batch| batch.len()), Some(2));
        sender.send(vec![payload()]);
        assert_eq!(sender.dropped(), 1);
        assert_eq!(receiver.recv().map(|batch| batch.len()), Some(1));
        drop(sender);
        assert!(receiver.recv().is_none());
    }
}
