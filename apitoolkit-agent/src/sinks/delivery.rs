//! The loop every remote sink runs: take a batch from the bounded queue, hand it to the
//! transport, and when delivery fails put what was not delivered back in the queue (where
//! the byte bound decides what is kept) and wait, doubling the pause each time. A failure is
//! logged once when it starts and once when delivery resumes, and counted every time, so an
//! outage or a rejected key is neither silent nor a flood of log lines nor a hot loop. When
//! the agent stops (the queue closes) a pause ends at once, so what is queued gets flushed;
//! a destination that rejects the key then gets no more tries.

use std::{future::Future, sync::Arc, time::Duration};

use super::{Queue, Queued};

const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest pause between attempts while the destination is unreachable.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The pause after the destination refused the credentials: they will not change by
/// themselves, so asking often only floods the server.
const REJECTED_BACKOFF: Duration = Duration::from_secs(30);

/// Why a batch was not delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureReason {
    /// No answer, a timeout or a server error: the destination may come back.
    Unreachable,
    /// The destination refused the credentials (401/403, UNAUTHENTICATED, PERMISSION_DENIED).
    Rejected,
    /// The destination refused the data itself (a 400, INVALID_ARGUMENT): sending it again
    /// would fail again, so it is dropped (counted) and delivery goes on.
    Refused,
}

impl FailureReason {
    fn label(self) -> &'static str {
        match self {
            FailureReason::Unreachable => "unreachable",
            FailureReason::Rejected => "rejected",
            FailureReason::Refused => "refused",
        }
    }
}

/// A delivery attempt that did not deliver everything.
#[derive(Debug)]
pub struct Failure<T> {
    /// What goes back to the queue.
    pub undelivered: Vec<T>,
    /// Payloads the destination will never take (a refused batch, a message over its size
    /// limit): dropped, counted as refused. The rest of the batch was delivered.
    pub refused: u64,
    pub reason: FailureReason,
    pub error: String,
}

/// How a sink talks to its destination; the batching, retries and accounting are the loop's.
pub trait Transport {
    /// What its queue holds: one payload each (a payload, or its JSON).
    type Item: Queued + Send;

    /// Names the destination in log lines (a topic, an endpoint).
    fn destination(&self) -> &str;

    /// Delivers a batch, or says which payloads were not delivered and why.
    fn send(
        &mut self,
        batch: Vec<Self::Item>,
    ) -> impl Future<Output = Result<(), Failure<Self::Item>>> + Send;
}

/// Counts for the final summary.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryStats {
    pub delivered: u64,
    pub failed_attempts: u64,
}

/// The pause now: `delay`, doubled up to `MAX_BACKOFF` for the next one.
fn back_off_delay(delay: &mut Duration) -> Duration {
    let now = *delay;
    *delay = (*delay * 2).min(MAX_BACKOFF);
    now
}

/// Waits `delay`, then doubles it up to `MAX_BACKOFF` for the next wait.
pub async fn back_off(delay: &mut Duration) {
    tokio::time::sleep(back_off_delay(delay)).await;
}

/// Delivers batches of up to `batch_size` payloads and `batch_bytes` queued bytes until the
/// queue is closed and drained; a batch short of them waits `linger` for more.
pub async fn run<T: Transport>(
    queue: Arc<Queue<T::Item>>,
    transport: &mut T,
    batch_size: usize,
    batch_bytes: usize,
    linger: Duration,
) -> DeliveryStats {
    let sink = queue.name();
    let mut stats = DeliveryStats::default();
    let mut backoff = FIRST_BACKOFF;
    let mut failing: Option<FailureReason> = None;
    while let Some(batch) = queue.pop_lingering(batch_size, batch_bytes, linger).await {
        let sent = batch.len() as u64;
        match transport.send(batch).await {
            Ok(()) => {
                stats.delivered += sent;
                metrics::counter!("apitoolkit_agent_sink_delivered_payloads_total", "sink" => sink)
                    .increment(sent);
                if failing.take().is_some() {
                    tracing::info!(
                        sink,
                        destination = transport.destination(),
                        "delivering again"
                    );
                }
                backoff = FIRST_BACKOFF;
            }
            Err(Failure {
                undelivered,
                refused,
                reason,
                error,
            }) => {
                let delivered = sent - undelivered.len() as u64 - refused;
                stats.delivered += delivered;
                stats.failed_attempts += 1;
                metrics::counter!("apitoolkit_agent_sink_delivered_payloads_total", "sink" => sink)
                    .increment(delivered);
                metrics::counter!("apitoolkit_agent_sink_failures_total", "sink" => sink, "reason" => reason.label())
                    .increment(1);
                metrics::counter!("apitoolkit_agent_sink_refused_payloads_total", "sink" => sink)
                    .increment(refused);
                if failing != Some(reason) {
                    let destination = transport.destination();
                    match reason {
                        FailureReason::Unreachable => tracing::warn!(
                            sink, destination, %error, undelivered = undelivered.len(),
                            "delivery failed; payloads stay queued and are retried"
                        ),
                        FailureReason::Refused => tracing::warn!(
                            sink, destination, %error, refused,
                            "the destination refused payloads; they are dropped"
                        ),
                        FailureReason::Rejected => tracing::error!(
                            sink, destination, %error,
                            "the destination rejected the API key or credentials; payloads stay \
                             queued (oldest dropped beyond --queue-bytes) and delivery is retried \
                             every {}s",
                            REJECTED_BACKOFF.as_secs()
                        ),
                    }
                    failing = Some(reason);
                }
                let closed = queue.is_closed();
                if closed && reason == FailureReason::Rejected {
                    tracing::warn!(
                        sink,
                        undelivered = undelivered.len() + queue.queued_len(),
                        "stopping: queued payloads not delivered (the key was rejected)"
                    );
                    break;
                }
                queue.requeue(undelivered);
                let pause = match reason {
                    FailureReason::Unreachable => back_off_delay(&mut backoff),
                    FailureReason::Rejected => REJECTED_BACKOFF,
                    FailureReason::Refused => Duration::ZERO,
                };
                if closed {
                    tokio::time::sleep(pause).await;
                } else {
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        () = queue.wait_closed() => {}
                    }
                }
            }
        }
    }
    stats
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::{
        pipeline::payload::Payload,
        sinks::{PayloadQueue, tests::payload},
    };

    /// A queue holding `/1` that closes after `seconds` (of paused test time).
    fn queue_closing_after(seconds: u64) -> Arc<PayloadQueue> {
        let queue = PayloadQueue::new("test", 1 << 20);
        queue.push([payload("/1")]);
        let closer = Arc::clone(&queue);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(seconds)).await;
            closer.close();
        });
        queue
    }

    /// Fails the first `failures` attempts with `reason`, then records what it receives.
    struct Scripted {
        failures: usize,
        reason: FailureReason,
        received: Arc<Mutex<Vec<String>>>,
    }

    impl Transport for Scripted {
        type Item = Payload;

        fn destination(&self) -> &str {
            "scripted"
        }

        async fn send(&mut self, batch: Vec<Payload>) -> Result<(), Failure<Payload>> {
            if self.failures > 0 {
                self.failures -= 1;
                return Err(Failure {
                    undelivered: batch,
                    refused: 0,
                    reason: self.reason,
                    error: "refused".into(),
                });
            }
            let mut received = self.received.lock().unwrap();
            received.extend(batch.into_iter().map(|payload| payload.raw_url));
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failed_batches_are_retried_in_order_with_backoff() {
        let queue = PayloadQueue::new("test", 1 << 20);
        queue.push(["/1", "/2", "/3"].map(payload));
        queue.close();
        let received = Arc::default();
        let started = tokio::time::Instant::now();
        let mut transport = Scripted {
            failures: 2,
            reason: FailureReason::Unreachable,
            received: Arc::clone(&received),
        };
        let stats = run(queue, &mut transport, 2, usize::MAX, Duration::ZERO).await;
        assert_eq!(*received.lock().unwrap(), vec!["/1", "/2", "/3"]);
        assert_eq!(
            stats,
            DeliveryStats {
                delivered: 3,
                failed_attempts: 2
            }
        );
        // 1 s, then 2 s.
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }

    /// Delivers every payload but `/big`, which it can never take.
    struct RefusesBig {
        received: Vec<String>,
    }

    impl Transport for RefusesBig {
        type Item = Payload;

        fn destination(&self) -> &str {
            "refuses-big"
        }

        async fn send(&mut self, batch: Vec<Payload>) -> Result<(), Failure<Payload>> {
            let before = self.received.len();
            self.received.extend(
                batch
                    .iter()
                    .map(|payload| payload.raw_url.clone())
                    .filter(|url| url != "/big"),
            );
            let refused = (batch.len() - (self.received.len() - before)) as u64;
            if refused == 0 {
                return Ok(());
            }
            Err(Failure {
                undelivered: Vec::new(),
                refused,
                reason: FailureReason::Refused,
                error: "too big".into(),
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_payload_is_dropped_and_the_rest_of_its_batch_counts_as_delivered() {
        let queue = PayloadQueue::new("test", 1 << 20);
        queue.push(["/1", "/big", "/2", "/3"].map(payload));
        queue.close();
        let mut transport = RefusesBig {
            received: Vec::new(),
        };
        let stats = run(queue, &mut transport, 3, usize::MAX, Duration::ZERO).await;
        assert_eq!(transport.received, ["/1", "/2", "/3"]);
        assert_eq!(
            stats,
            DeliveryStats {
                delivered: 3,
                failed_attempts: 1
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn closing_the_queue_ends_the_pause_and_a_rejected_key_is_not_retried_then() {
        let queue = queue_closing_after(2);
        let started = tokio::time::Instant::now();
        let mut transport = Scripted {
            failures: 5,
            reason: FailureReason::Rejected,
            received: Arc::default(),
        };
        let stats = run(queue, &mut transport, 10, usize::MAX, Duration::ZERO).await;
        assert_eq!(stats.failed_attempts, 2);
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_rejected_key_is_retried_slowly() {
        let queue = queue_closing_after(100);
        let received = Arc::default();
        let mut transport = Scripted {
            failures: 3,
            reason: FailureReason::Rejected,
            received: Arc::clone(&received),
        };
        let stats = run(queue, &mut transport, 10, usize::MAX, Duration::ZERO).await;
        assert_eq!(
            stats.failed_attempts, 3,
            "at 0, 30 and 60 s; delivered at 90 s"
        );
        assert_eq!(*received.lock().unwrap(), vec!["/1"]);
    }
}
