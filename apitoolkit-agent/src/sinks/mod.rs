//! Where payloads go. Capture never waits for a sink: each sink has a queue bounded in bytes;
//! when a batch would overflow it, the oldest queued payloads are dropped and counted, so a
//! slow or unreachable destination never grows the agent's memory. Stdout and Pub/Sub queue
//! the payloads' JSON, written on the capture thread (see [`json`]); OTLP queues payloads.

pub mod bootstrap;
pub mod delivery;
pub mod json;
pub mod otlp;
pub mod pubsub;
pub mod stdout;

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::Notify;

use crate::pipeline::payload::Payload;

/// What a sink queue holds: its memory, for the byte bound, and how many payloads it stands
/// for, so drops are counted in payloads whatever one item carries.
pub trait Queued {
    fn queued_size(&self) -> usize;
    fn payloads(&self) -> u64 {
        1
    }
}

impl Queued for Payload {
    /// Approximate memory of a queued payload: the struct, its largest heap parts (bodies,
    /// header and query fields, URL) by capacity, and a flat allowance for the small rest, so
    /// the byte bound tracks real memory rather than just the bodies.
    fn queued_size(&self) -> usize {
        std::mem::size_of::<Payload>()
            + 256
            + self.raw_url.capacity()
            + self.url_path.capacity()
            + self.host.capacity()
            + self.request_body.capacity()
            + self.response_body.capacity()
            + self.request_headers.heap_size()
            + self.response_headers.heap_size()
            + self.query_params.heap_size()
    }
}

/// What /metrics and shutdown need of a sink's queue, whatever it carries.
pub trait SinkQueue: Send + Sync {
    fn name(&self) -> &'static str;
    fn queued_bytes(&self) -> usize;
    /// Payloads dropped because the queue was full.
    fn dropped(&self) -> u64;
    fn close(&self);
}

/// The queues capture fills: the JSON sinks' and the payload sinks'.
#[derive(Clone, Default)]
pub struct SinkQueues {
    pub json: json::JsonQueues,
    pub payloads: Vec<Arc<PayloadQueue>>,
}

impl SinkQueues {
    /// Every queue, stdout first.
    pub fn all(&self) -> impl Iterator<Item = &dyn SinkQueue> {
        let stdout = self
            .json
            .stdout
            .iter()
            .map(|queue| &**queue as &dyn SinkQueue);
        let pubsub = self
            .json
            .pubsub
            .iter()
            .map(|queue| &**queue as &dyn SinkQueue);
        let payloads = self.payloads.iter().map(|queue| &**queue as &dyn SinkQueue);
        stdout.chain(pubsub).chain(payloads)
    }
}

struct Pending<T> {
    /// Each item with its [`Queued::queued_size`], computed once.
    items: VecDeque<(usize, T)>,
    bytes: usize,
    closed: bool,
}

impl<T> Default for Pending<T> {
    fn default() -> Self {
        Self {
            items: VecDeque::new(),
            bytes: 0,
            closed: false,
        }
    }
}

/// A byte-bounded FIFO between capture (sync) and one sink (async).
pub struct Queue<T> {
    name: &'static str,
    max_bytes: usize,
    pending: Mutex<Pending<T>>,
    ready: Notify,
    closed: Notify,
    dropped: AtomicU64,
}

pub type PayloadQueue = Queue<Payload>;

impl<T: Queued> Queue<T> {
    pub fn new(name: &'static str, max_bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            name,
            max_bytes,
            pending: Mutex::new(Pending::default()),
            ready: Notify::new(),
            closed: Notify::new(),
            dropped: AtomicU64::new(0),
        })
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Appends a batch, evicting the oldest items beyond the byte bound.
    pub fn push(&self, batch: impl IntoIterator<Item = T>) {
        let mut pending = self.pending.lock().expect("queue lock");
        for item in batch {
            let size = item.queued_size();
            pending.bytes += size;
            pending.items.push_back((size, item));
        }
        self.evict_oldest(&mut pending);
        drop(pending);
        self.ready.notify_one();
    }

    /// Puts back items a sink could not deliver, ahead of newer ones (still bounded).
    pub fn requeue(&self, batch: Vec<T>) {
        let mut pending = self.pending.lock().expect("queue lock");
        for item in batch.into_iter().rev() {
            let size = item.queued_size();
            pending.bytes += size;
            pending.items.push_front((size, item));
        }
        self.evict_oldest(&mut pending);
    }

    fn evict_oldest(&self, pending: &mut Pending<T>) {
        let mut dropped = 0;
        while pending.bytes > self.max_bytes {
            let Some((size, item)) = pending.items.pop_front() else {
                break;
            };
            pending.bytes -= size;
            dropped += item.payloads();
        }
        if dropped > 0 {
            self.dropped.fetch_add(dropped, Ordering::Relaxed);
            tracing::debug!(
                sink = self.name,
                dropped,
                "sink queue full: dropped oldest payloads"
            );
        }
    }

    /// Nothing more will come: `pop` drains what is left, then returns `None`.
    pub fn close(&self) {
        self.pending.lock().expect("queue lock").closed = true;
        self.ready.notify_one();
        self.closed.notify_waiters();
    }

    pub fn is_closed(&self) -> bool {
        self.pending.lock().expect("queue lock").closed
    }

    /// Returns once [`Queue::close`] was called.
    pub async fn wait_closed(&self) {
        loop {
            // Made before the check, so a close in between still wakes it.
            let notified = self.closed.notified();
            if self.is_closed() {
                return;
            }
            notified.await;
        }
    }

    /// Like [`Queue::pop`], but a batch short of `max` items and `max_bytes` waits
    /// `linger` after its first item for more (not past [`Queue::close`]): fewer,
    /// larger requests for destinations whose cost is mostly per request. One timer per batch;
    /// while it runs, each push (one per drain of capture) wakes it to see whether the batch
    /// is full.
    pub async fn pop_lingering(
        &self,
        max: usize,
        max_bytes: usize,
        linger: Duration,
    ) -> Option<Vec<T>> {
        let is_full = |pending: &Pending<T>| {
            pending.closed || pending.items.len() >= max || pending.bytes >= max_bytes
        };
        loop {
            let (empty, closed) = {
                let pending = self.pending.lock().expect("queue lock");
                (pending.items.is_empty(), pending.closed)
            };
            if !empty {
                if !linger.is_zero() {
                    self.linger_until_full(linger, is_full).await;
                }
                break;
            }
            if closed {
                break;
            }
            self.ready.notified().await;
        }
        self.pop(max, max_bytes).await
    }

    /// Waits up to `linger`, ending early once `is_full` holds after a push (or a close): a
    /// batch that fills sooner leaves at once.
    async fn linger_until_full(&self, linger: Duration, is_full: impl Fn(&Pending<T>) -> bool) {
        let deadline = tokio::time::Instant::now() + linger;
        loop {
            // A push between the check and the wait is not lost: `notify_one` stores a permit
            // when nobody waits yet, which `pushed` takes when first polled.
            let pushed = self.ready.notified();
            if is_full(&self.pending.lock().expect("queue lock")) {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => return,
                () = pushed => {}
            }
        }
    }

    /// Up to `max` items and (beyond the first) `max_bytes` queued bytes, waiting for at
    /// least one; `None` once closed and empty.
    pub async fn pop(&self, max: usize, max_bytes: usize) -> Option<Vec<T>> {
        let mut batch = Vec::new();
        self.pop_into(&mut batch, max, max_bytes)
            .await
            .then_some(batch)
    }

    /// [`Queue::pop`] into `batch` (appended), so a sink that drains it after each
    /// batch reuses one allocation; false once closed and empty.
    pub async fn pop_into(&self, batch: &mut Vec<T>, max: usize, max_bytes: usize) -> bool {
        loop {
            {
                let mut pending = self.pending.lock().expect("queue lock");
                if !pending.items.is_empty() {
                    let mut count = 0;
                    let mut bytes = 0;
                    for &(size, _) in pending.items.iter().take(max) {
                        if count > 0 && bytes + size > max_bytes {
                            break;
                        }
                        count += 1;
                        bytes += size;
                    }
                    batch.extend(pending.items.drain(..count).map(|(_, item)| item));
                    pending.bytes -= bytes;
                    return true;
                }
                if pending.closed {
                    return false;
                }
            }
            self.ready.notified().await;
        }
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    pub fn queued_len(&self) -> usize {
        self.pending.lock().expect("queue lock").items.len()
    }

    pub fn queued_bytes(&self) -> usize {
        self.pending.lock().expect("queue lock").bytes
    }
}

impl<T: Queued + Send> SinkQueue for Queue<T> {
    fn name(&self) -> &'static str {
        Queue::name(self)
    }

    fn queued_bytes(&self) -> usize {
        Queue::queued_bytes(self)
    }

    fn dropped(&self) -> u64 {
        Queue::dropped(self)
    }

    fn close(&self) {
        Queue::close(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fixture payload, told apart by its `raw_url`.
    pub(super) fn payload(path: &str) -> Payload {
        let mut payload: Payload =
            serde_json::from_str(include_str!("../../../tests/fixtures/payload.json")).unwrap();
        payload.raw_url = path.to_owned();
        payload
    }

    fn paths(batch: Option<Vec<Payload>>) -> Vec<String> {
        batch
            .unwrap_or_default()
            .into_iter()
            .map(|payload| payload.raw_url)
            .collect()
    }

    #[tokio::test]
    async fn a_full_queue_drops_the_oldest_and_counts() {
        let one = payload("/0").queued_size();
        let queue = PayloadQueue::new("test", one * 2);
        queue.push(["/1", "/2", "/3"].map(payload));
        assert_eq!(queue.dropped(), 1);
        assert_eq!(paths(queue.pop(10, usize::MAX).await), vec!["/2", "/3"]);
        assert_eq!(queue.queued_bytes(), 0);
    }

    #[tokio::test]
    async fn requeued_payloads_come_back_first_and_close_drains() {
        let queue = PayloadQueue::new("test", 1 << 20);
        queue.push(["/1", "/2", "/3"].map(payload));
        let first = queue.pop(2, usize::MAX).await.unwrap();
        queue.requeue(first);
        queue.close();
        assert_eq!(
            paths(queue.pop(10, usize::MAX).await),
            vec!["/1", "/2", "/3"]
        );
        assert!(queue.pop(10, usize::MAX).await.is_none());
    }

    #[tokio::test]
    async fn batches_stop_at_the_byte_bound_but_take_at_least_one() {
        let one = payload("/0").queued_size();
        let queue = PayloadQueue::new("test", 1 << 20);
        queue.push(["/1", "/2", "/3"].map(payload));
        assert_eq!(paths(queue.pop(10, one * 2).await), vec!["/1", "/2"]);
        assert_eq!(paths(queue.pop(10, 1).await), vec!["/3"]);
    }

    const LINGER: std::time::Duration = std::time::Duration::from_millis(50);

    /// `pop_lingering(max, max_bytes, LINGER)` on a queue holding `first`, while `second` is
    /// pushed `after` it starts: the paths it returns and how long it took.
    async fn linger_with_a_push(
        queue: &Arc<PayloadQueue>,
        (first, second): (&str, &str),
        after: std::time::Duration,
        (max, max_bytes): (usize, usize),
    ) -> (Vec<String>, std::time::Duration) {
        queue.push([payload(first)]);
        let (producer, second) = (queue.clone(), payload(second));
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            producer.push([second]);
        });
        let started = tokio::time::Instant::now();
        let batch = queue.pop_lingering(max, max_bytes, LINGER).await;
        (paths(batch), started.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_batch_lingers_for_more_until_it_fills_or_the_queue_closes() {
        let ms = std::time::Duration::from_millis;
        let queue = PayloadQueue::new("test", 1 << 20);
        let unbounded = (10, usize::MAX);
        assert_eq!(
            linger_with_a_push(&queue, ("/1", "/2"), ms(25), unbounded).await,
            (vec!["/1".into(), "/2".into()], LINGER),
            "short: it waits the whole linger"
        );

        queue.push(["/3", "/4"].map(payload));
        let started = tokio::time::Instant::now();
        let batch = queue.pop_lingering(2, usize::MAX, LINGER).await;
        assert_eq!(paths(batch), vec!["/3", "/4"]);
        assert_eq!(started.elapsed(), std::time::Duration::ZERO);

        assert_eq!(
            linger_with_a_push(&queue, ("/5", "/6"), ms(10), (2, usize::MAX)).await,
            (vec!["/5".into(), "/6".into()], ms(10)),
            "full by its count once the push comes: it leaves then"
        );
        let two = payload("/7").queued_size() + payload("/8").queued_size();
        assert_eq!(
            linger_with_a_push(&queue, ("/7", "/8"), ms(10), (10, two)).await,
            (vec!["/7".into(), "/8".into()], ms(10)),
            "full by its bytes"
        );

        queue.push([payload("/9")]);
        let closer = queue.clone();
        tokio::spawn(async move {
            tokio::time::sleep(ms(10)).await;
            closer.close();
        });
        let started = tokio::time::Instant::now();
        let batch = queue.pop_lingering(10, usize::MAX, LINGER).await;
        assert_eq!(paths(batch), vec!["/9"]);
        assert_eq!(started.elapsed(), ms(10));
        assert!(queue.pop_lingering(10, usize::MAX, LINGER).await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_queue_lingers_from_its_first_push_and_no_linger_takes_what_is_there() {
        let ms = std::time::Duration::from_millis;
        let queue = PayloadQueue::new("test", 1 << 20);
        let producer = queue.clone();
        tokio::spawn(async move {
            tokio::time::sleep(ms(30)).await;
            producer.push([payload("/1")]);
        });
        let started = tokio::time::Instant::now();
        let batch = queue.pop_lingering(10, usize::MAX, LINGER).await;
        assert_eq!(paths(batch), vec!["/1"]);
        assert_eq!(started.elapsed(), ms(30) + LINGER);

        queue.push([payload("/2")]);
        let started = tokio::time::Instant::now();
        let batch = queue
            .pop_lingering(10, usize::MAX, std::time::Duration::ZERO)
            .await;
        assert_eq!(paths(batch), vec!["/2"]);
        assert_eq!(started.elapsed(), std::time::Duration::ZERO);
    }

    #[tokio::test]
    async fn pop_waits_for_a_push_from_another_thread() {
        let queue = PayloadQueue::new("test", 1 << 20);
        let producer = queue.clone();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            producer.push([payload("/late")]);
        });
        assert_eq!(paths(queue.pop(10, usize::MAX).await), vec!["/late"]);
    }
}
