//! Where payloads go. Capture never waits for a sink: payloads cross a bounded queue, and
//! when it is full the payload is dropped and counted.

pub mod stdout;

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
    mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
};

use crate::payload::Payload;

/// The capture side of a sink queue.
#[derive(Clone)]
pub struct SinkSender {
    queue: SyncSender<Payload>,
    dropped: Arc<AtomicU64>,
}

impl SinkSender {
    pub fn send(&self, payload: Payload) {
        match self.queue.try_send(payload) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

pub fn queue(capacity: usize) -> (SinkSender, Receiver<Payload>) {
    let (queue, receiver) = sync_channel(capacity);
    (
        SinkSender {
            queue,
            dropped: Arc::new(AtomicU64::new(0)),
        },
        receiver,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_and_counts() {
        let (sender, receiver) = queue(1);
        let payload: Payload =
            serde_json::from_str(include_str!("../../../tests/fixtures/payload.json")).unwrap();
        sender.send(payload.clone());
        sender.send(payload);
        assert_eq!(sender.dropped(), 1);
        assert_eq!(receiver.try_iter().count(), 1);
    }
}
