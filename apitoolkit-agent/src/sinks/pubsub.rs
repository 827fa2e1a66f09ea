//! Publishes payloads to the APIToolkit Pub/Sub topic: one message per payload, its data the
//! payload's JSON. The client library batches (count, bytes, delay); the shared delivery loop
//! puts what failed back in the bounded queue and retries with backoff.

use std::{path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;

use google_cloud_gax::{
    exponential_backoff::ExponentialBackoffBuilder,
    retry_policy::{Aip194Strict, RetryPolicyExt as _},
};
use google_cloud_pubsub::{client::Publisher, model::Message};
use uuid::Uuid;

use super::{
    PayloadQueue,
    bootstrap::{self, BootstrapError, ClientMetadata},
    delivery::{self, DeliveryStats, Failure, FailureReason, Transport, back_off},
};
use crate::pipeline::payload::{Payload, write_json};

/// Messages in one publish request: the most the Pub/Sub API takes.
const BATCH: usize = 1000;
/// Bytes of payloads taken from the queue at once. What is being published is held on top of
/// the queue's bound about three times over (the payloads, their JSON, the library's encoded
/// request), so it stays a small fraction of it: with 64 KiB bodies at saturation a 4 MiB
/// batch peaked at ~130 MiB of RSS, this at ~96. Still ~12 such payloads a request.
const BATCH_BYTES: usize = 1024 * 1024;
/// The library's own byte bound on a request, above what one batch's JSON reaches, so a batch
/// is one request. The API takes 10 MB; the library counts only the messages' data.
const REQUEST_BYTES: u32 = 9_000_000;
/// The largest message data sent: the API takes 10 MB per message and per request, and the
/// request also carries the topic and framing.
const MAX_MESSAGE_BYTES: usize = 10_000_000 - 64 * 1024;
/// How long a batch short of `BATCH` waits for more: the emulator (and the service) cost is
/// mostly per request, and capture hands over a few payloads at a time.
const LINGER: Duration = Duration::from_millis(50);
/// How long the client library itself retries one batch; after that the payloads return to
/// the queue, where the bound (not the library's buffer) decides what is kept.
const LIBRARY_RETRY_LIMIT: Duration = Duration::from_secs(10);

/// What the agent was told about the destination on the command line.
#[derive(Clone, Debug, Default)]
pub struct DestinationConfig {
    pub api_key: Option<String>,
    pub root_url: String,
    pub project_id: Option<Uuid>,
    pub pubsub_project: Option<String>,
    pub topic: Option<String>,
    pub credentials: Option<PathBuf>,
    /// `PUBSUB_EMULATOR_HOST`: publish there, without credentials.
    pub emulator_host: Option<String>,
}

/// A topic to publish to and the project every payload is stamped with.
#[derive(Clone, Debug, PartialEq)]
pub struct Destination {
    pub topic_path: String,
    pub project_id: Uuid,
    pub service_account: Option<serde_json::Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    #[error(transparent)]
    Bootstrap(#[from] BootstrapError),
    #[error("no Pub/Sub destination: pass --api-key, or --pubsub-project and --topic")]
    Missing,
    #[error("reading credentials {path}: {reason}")]
    Credentials { path: PathBuf, reason: String },
}

impl DestinationError {
    pub fn is_transient(&self) -> bool {
        matches!(self, DestinationError::Bootstrap(error) if error.is_transient())
    }
}

impl DestinationConfig {
    /// Explicit flags win over what the API key fetches.
    fn merge(&self, fetched: Option<ClientMetadata>) -> Result<Destination, DestinationError> {
        let pubsub_project = self
            .pubsub_project
            .clone()
            .or_else(|| fetched.as_ref().map(|m| m.pubsub_project_id.clone()))
            .ok_or(DestinationError::Missing)?;
        let topic = self
            .topic
            .clone()
            .or_else(|| fetched.as_ref().map(|m| m.topic_id.clone()))
            .ok_or(DestinationError::Missing)?;
        let service_account = match &self.credentials {
            Some(path) => Some(
                std::fs::read(path)
                    .map_err(|error| error.to_string())
                    .and_then(|bytes| {
                        serde_json::from_slice(&bytes).map_err(|error| error.to_string())
                    })
                    .map_err(|reason| DestinationError::Credentials {
                        path: path.clone(),
                        reason,
                    })?,
            ),
            None => fetched
                .as_ref()
                .map(|m| m.pubsub_push_service_account.clone())
                .filter(serde_json::Value::is_object),
        };
        Ok(Destination {
            topic_path: format!("projects/{pubsub_project}/topics/{topic}"),
            project_id: self
                .project_id
                .or(fetched.map(|m| m.project_id))
                .unwrap_or_default(),
            service_account,
        })
    }

    /// Resolves the destination once: with an API key that means asking the server.
    pub async fn resolve(&self) -> Result<Destination, DestinationError> {
        let fetched = match &self.api_key {
            Some(key) => Some(bootstrap::client_metadata(&self.root_url, key).await?),
            None => None,
        };
        self.merge(fetched)
    }
}

async fn connect(
    config: &DestinationConfig,
    destination: &Destination,
) -> anyhow::Result<Publisher> {
    let backoff = ExponentialBackoffBuilder::new()
        .with_initial_delay(Duration::from_millis(200))
        .with_maximum_delay(Duration::from_secs(2))
        .build()?;
    let mut builder = Publisher::builder(destination.topic_path.clone())
        .with_retry_policy(Aip194Strict.with_time_limit(LIBRARY_RETRY_LIMIT))
        .with_backoff_policy(backoff)
        .set_message_count_threshold(BATCH as u32)
        .set_byte_threshold(REQUEST_BYTES)
        // `send` flushes each batch itself; this only bounds a batch the flush missed.
        .set_delay_threshold(LINGER);
    if let Some(host) = &config.emulator_host {
        builder = builder
            .with_endpoint(format!("http://{host}"))
            .with_credentials(google_cloud_auth::credentials::anonymous::Builder::new().build());
    } else if let Some(key) = &destination.service_account {
        let credentials =
            google_cloud_auth::credentials::service_account::Builder::new(key.clone())
                .build()
                .map_err(|error| anyhow::anyhow!("invalid service-account credentials: {error}"))?;
        builder = builder.with_credentials(credentials);
    }
    Ok(builder.build().await?)
}

/// One message per payload, its data the payload's JSON.
struct PubsubTransport {
    publisher: Publisher,
    topic_path: String,
    /// Set when the destination was resolved after capture started: payloads carry the
    /// project id resolved before capture, which was none then.
    late_project_id: Option<Uuid>,
    /// The last batch's JSON buffer, reused.
    json: Vec<u8>,
}

/// A batch's JSON as the owner of the messages' data.
struct SharedJson(Arc<Vec<u8>>);

impl AsRef<[u8]> for SharedJson {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Transport for PubsubTransport {
    fn destination(&self) -> &str {
        &self.topic_path
    }

    async fn send(&mut self, mut batch: Vec<Payload>) -> Result<(), Failure> {
        if let Some(project_id) = self.late_project_id {
            for payload in &mut batch {
                payload.project_id = project_id;
            }
        }
        // One buffer for the batch's JSON, each message's data a slice of it: no allocation
        // per payload, and no copy between the encoding and the request. It is taken back
        // once the library has let go of it, so the next batch faults in no new pages.
        let mut json = std::mem::take(&mut self.json);
        json.clear();
        let ends: Vec<usize> = batch
            .iter()
            .map(|payload| {
                write_json(payload, &mut json);
                json.len()
            })
            .collect();
        let json = Arc::new(json);
        let data = Bytes::from_owner(SharedJson(Arc::clone(&json)));
        let mut start = 0;
        let mut refused = 0;
        let mut published = Vec::with_capacity(batch.len());
        for (payload, end) in batch.into_iter().zip(ends) {
            let data = data.slice(start..end);
            start = end;
            // Never the payload itself: logs go to journald, readable beyond the API's users.
            if data.len() > MAX_MESSAGE_BYTES {
                // Sent, it would fail every retry and hold up everything queued behind it.
                tracing::warn!(
                    msg_id = %payload.msg_id,
                    bytes = data.len(),
                    "payload over Pub/Sub's message size limit dropped (lower --max-body-bytes)"
                );
                refused += 1;
                continue;
            }
            tracing::debug!(msg_id = %payload.msg_id, bytes = data.len(), "publishing");
            let future = self.publisher.publish(Message::new().set_data(data));
            published.push((payload, future));
        }
        drop(data);
        // The batch is one request now, not one after the library's delay.
        self.publisher.flush().await;
        let mut undelivered = Vec::new();
        let mut last_error = None;
        for (payload, future) in published {
            match future.await {
                Ok(message_id) => {
                    tracing::debug!(%message_id, msg_id = %payload.msg_id, "published");
                }
                Err(error) => {
                    last_error = Some(error.to_string());
                    undelivered.push(payload);
                }
            }
        }
        if let Ok(mut json) = Arc::try_unwrap(json) {
            // One payload far bigger than the rest does not keep its buffer.
            json.shrink_to(2 * BATCH_BYTES);
            self.json = json;
        }
        match (last_error, refused) {
            (None, 0) => Ok(()),
            (None, _) => Err(Failure {
                undelivered,
                refused,
                reason: FailureReason::Refused,
                error: format!("over the {MAX_MESSAGE_BYTES}-byte message limit"),
            }),
            (Some(error), _) => Err(Failure {
                undelivered,
                refused,
                // The library retried what it could; credentials it cannot use fail earlier.
                reason: FailureReason::Unreachable,
                error,
            }),
        }
    }
}

/// Publishes until the queue is closed and drained. `destination` is the start-up result:
/// when the server was unreachable then, the sink keeps asking (capture keeps queueing).
pub async fn run(
    queue: Arc<PayloadQueue>,
    config: DestinationConfig,
    destination: Option<Destination>,
) -> DeliveryStats {
    let mut backoff = Duration::from_secs(1);
    let resolved_late = destination.is_none();
    let destination = match destination {
        Some(destination) => destination,
        None => loop {
            back_off(&mut backoff).await;
            match config.resolve().await {
                Ok(destination) => {
                    tracing::info!(topic = %destination.topic_path, "Pub/Sub destination resolved");
                    break destination;
                }
                Err(error) => tracing::debug!(%error, "still resolving the Pub/Sub destination"),
            }
        },
    };
    let publisher = loop {
        match connect(&config, &destination).await {
            Ok(publisher) => break publisher,
            Err(error) => {
                tracing::warn!(%error, topic = %destination.topic_path, "cannot create the Pub/Sub publisher; retrying");
                back_off(&mut backoff).await;
            }
        }
    };
    let mut transport = PubsubTransport {
        publisher,
        topic_path: destination.topic_path,
        late_project_id: resolved_late.then_some(destination.project_id),
        json: Vec::new(),
    };
    let stats = delivery::run(queue, &mut transport, BATCH, BATCH_BYTES, LINGER).await;
    transport.publisher.flush().await;
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata() -> ClientMetadata {
        ClientMetadata {
            project_id: Uuid::from_u128(7),
            topic_id: "apitoolkit-prod-default".into(),
            pubsub_project_id: "past-3".into(),
            pubsub_push_service_account: serde_json::json!({"type": "service_account"}),
        }
    }

    #[test]
    fn fetched_values_fill_what_flags_leave_open() {
        let config = DestinationConfig {
            topic: Some("my-topic".into()),
            ..Default::default()
        };
        let destination = config.merge(Some(metadata())).unwrap();
        assert_eq!(destination.topic_path, "projects/past-3/topics/my-topic");
        assert_eq!(destination.project_id, Uuid::from_u128(7));
        assert!(destination.service_account.is_some());
    }

    #[test]
    fn without_a_key_both_project_and_topic_are_needed() {
        let config = DestinationConfig {
            topic: Some("t".into()),
            ..Default::default()
        };
        assert!(matches!(config.merge(None), Err(DestinationError::Missing)));
        let config = DestinationConfig {
            topic: Some("topic-1".into()),
            pubsub_project: Some("test-project".into()),
            project_id: Some(Uuid::from_u128(9)),
            ..Default::default()
        };
        let destination = config.merge(None).unwrap();
        assert_eq!(
            destination.topic_path,
            "projects/test-project/topics/topic-1"
        );
        assert_eq!(destination.project_id, Uuid::from_u128(9));
        assert_eq!(destination.service_account, None);
    }

    #[test]
    fn unreadable_credentials_name_the_file() {
        let config = DestinationConfig {
            topic: Some("t".into()),
            pubsub_project: Some("p".into()),
            credentials: Some("/nonexistent/key.json".into()),
            ..Default::default()
        };
        let error = config.merge(None).unwrap_err();
        assert!(error.to_string().contains("/nonexistent/key.json"));
    }
}
