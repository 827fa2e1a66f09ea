//! Publishes payloads to the APIToolkit Pub/Sub topic: one message per payload, its data the
//! payload's JSON as capture wrote it (a slice of a chunk buffer, see [`super::json`]), a batch
//! in one `Publish` call: the types generated from Google's protos, sent by tonic's client with
//! its prost codec. The shared delivery loop batches, and puts what failed back in the bounded
//! queue and retries with backoff.
//!
//! Not through google-cloud-pubsub's `Publisher`: its per-message futures, batching actor and
//! request conversions cost ~2.4 µs of CPU per payload at 5k req/s (of ~14).

use std::{
    path::PathBuf,
    sync::{Arc, OnceLock},
    time::Duration,
};

use bytes::Bytes;
use google_cloud_auth::credentials::{CacheableResource, Credentials};
use googleapis_tonic_google_pubsub_v1::google::pubsub::v1::{
    PublishRequest, PublishResponse, PubsubMessage,
};
use prost::Message as _;
use tonic::{
    Code, Status,
    codegen::http::{self, HeaderMap},
    metadata::{Ascii, MetadataMap, MetadataValue},
    transport::{Channel, ClientTlsConfig, Endpoint},
};
use uuid::Uuid;

use super::{
    bootstrap::{self, BootstrapError, ClientMetadata},
    delivery::{self, DeliveryStats, Failure, FailureReason, Transport, back_off},
    json::{Message, MessageQueue, carries_project_id, stamp_project_id},
};

/// Messages in one publish request: the most the Pub/Sub API takes.
const BATCH: usize = 1000;
/// Bytes of messages taken from the queue at once. What is being published is held on top of
/// the queue's bound (the chunk buffers its messages are slices of, and the encoded request),
/// so it stays a small fraction of it; still ~12 payloads with 64 KiB bodies a request.
const BATCH_BYTES: usize = 1024 * 1024;
/// The API takes 10 MB per message and per request; a request also carries the topic and
/// a few bytes of framing per message.
const REQUEST_BYTES: usize = 10_000_000 - 64 * 1024;
/// The largest message data sent: alone, with the topic and its framing, it fits a request.
const MAX_MESSAGE_BYTES: usize = REQUEST_BYTES - 1024;
/// How long a batch short of `BATCH` and `BATCH_BYTES` waits for more: the emulator (and the
/// service) cost is mostly per request, and capture hands over a drain's payloads at a time
/// (every 200 ms at low rates). A batch that fills leaves at once, so at 5k req/s a request
/// carries ~1 MiB (50 ms: 4x the requests, and 4% more agent CPU per payload).
const LINGER: Duration = Duration::from_millis(200);
/// One publish call, all of it (token, connection, TLS handshake, request); after that the
/// payloads return to the queue and are retried with the delivery loop's backoff.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection a NAT or firewall dropped silently fails the call in seconds, not at the
/// kernel's TCP timeout (pings only while a call is open, as Google's frontends allow).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
const PUBSUB_ENDPOINT: &str = "https://pubsub.googleapis.com";

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

/// How a failed publish counts: the credentials refused, or a destination that may come back
/// (a missing topic may be created later). An invalid argument is retried too: a whole
/// request of up to 1000 payloads would go with it, for what may be one bad message or a
/// configuration the user can fix (and messages over the size limit never leave the agent).
fn publish_failure(status: &Status) -> FailureReason {
    match status.code() {
        Code::Unauthenticated | Code::PermissionDenied => FailureReason::Rejected,
        _ => FailureReason::Unreachable,
    }
}

/// The channel to Pub/Sub (or the emulator), and the credentials its requests carry: none on
/// the emulator, the fetched or given service account, else the host's default credentials.
fn connect(
    config: &DestinationConfig,
    destination: &Destination,
) -> anyhow::Result<(Channel, Option<Credentials>)> {
    let url = match &config.emulator_host {
        Some(host) => format!("http://{host}"),
        None => PUBSUB_ENDPOINT.to_owned(),
    };
    let mut endpoint = Endpoint::from_shared(url)?
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(false)
        .tcp_keepalive(Some(2 * KEEPALIVE_INTERVAL));
    let credentials = if config.emulator_host.is_some() {
        None
    } else {
        endpoint = endpoint.tls_config(
            ClientTlsConfig::new()
                .with_native_roots()
                .timeout(CONNECT_TIMEOUT),
        )?;
        Some(match &destination.service_account {
            Some(key) => google_cloud_auth::credentials::service_account::Builder::new(key.clone())
                .build()
                .map_err(|error| anyhow::anyhow!("invalid service-account credentials: {error}"))?,
            None => google_cloud_auth::credentials::Builder::default()
                .build()
                .map_err(|error| anyhow::anyhow!("no Google credentials: {error}"))?,
        })
    };
    // Lazy: a destination that is down at start-up is retried like one that goes down later.
    Ok((endpoint.connect_lazy(), credentials))
}

/// tonic's prost codec, encoding into a buffer as large as a batch from the start. The generated
/// `PublisherClient::publish` takes the default one, whose 8 KiB buffer grows by doubling:
/// ~0.5 µs of CPU per payload at 5k req/s in copies and page faults, and ~8 MiB more peak RSS.
struct PublishCodec;

impl tonic::codec::Codec for PublishCodec {
    type Encode = PublishRequest;
    type Decode = PublishResponse;
    type Encoder = tonic_prost::ProstEncoder<PublishRequest>;
    type Decoder = tonic_prost::ProstDecoder<PublishResponse>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstCodec::<PublishRequest, PublishResponse>::raw_encoder(
            tonic::codec::BufferSettings::new(2 * BATCH_BYTES, 32 * 1024),
        )
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstCodec::<PublishRequest, PublishResponse>::raw_decoder(
            tonic::codec::BufferSettings::default(),
        )
    }
}

/// Publish requests for messages with this data, in order: usually one; more only when large
/// payloads would take one over the API's limit.
fn into_requests(topic: &str, data: impl IntoIterator<Item = Bytes>) -> Vec<PublishRequest> {
    let empty = || PublishRequest {
        topic: topic.to_owned(),
        messages: Vec::new(),
    };
    let mut requests = Vec::new();
    let mut current = empty();
    let mut size = current.encoded_len();
    for data in data {
        let message = PubsubMessage {
            data,
            ..Default::default()
        };
        let message_size = prost::encoding::message::encoded_len(2, &message);
        if size + message_size > REQUEST_BYTES && !current.messages.is_empty() {
            // Over the limit with this message: it starts the next request.
            requests.push(std::mem::replace(&mut current, empty()));
            size = current.encoded_len();
        }
        size += message_size;
        current.messages.push(message);
    }
    if !current.messages.is_empty() {
        requests.push(current);
    }
    requests
}

/// A message's data: its JSON, with `project_id` stamped in when it differs from what capture
/// wrote (written before the sink resolved it). A copy then: the chunk is shared with stdout.
fn stamped(message: &Message, project_id: Option<Uuid>) -> Bytes {
    match project_id {
        Some(project_id)
            if !carries_project_id(&message.data, message.project_id_at, project_id) =>
        {
            let mut json = message.data.to_vec();
            stamp_project_id(&mut json, message.project_id_at, project_id);
            Bytes::from(json)
        }
        _ => message.data.clone(),
    }
}

/// One message per payload, its data the payload's JSON.
struct PubsubTransport {
    client: tonic::client::Grpc<Channel>,
    credentials: Option<Credentials>,
    topic_path: String,
    /// Routes the request to the topic's region, as Google's clients do.
    request_params: MetadataValue<Ascii>,
    /// Set when the destination was resolved after capture started: messages capture wrote
    /// before it learned the id carry none.
    late_project_id: Option<Uuid>,
}

impl PubsubTransport {
    fn new(
        channel: Channel,
        credentials: Option<Credentials>,
        topic_path: String,
        late_project_id: Option<Uuid>,
    ) -> Self {
        Self {
            client: tonic::client::Grpc::new(channel),
            credentials,
            request_params: request_params(&topic_path),
            topic_path,
            late_project_id,
        }
    }

    /// The metadata a publish call carries: the access token and the routing. Fetched before
    /// the call: getting a token is async, an interceptor is not.
    async fn metadata(&self) -> Result<MetadataMap, (FailureReason, String)> {
        let headers = match &self.credentials {
            Some(credentials) => match credentials.headers(tonic::Extensions::new()).await {
                Ok(CacheableResource::New { data, .. }) => data,
                // Only ever the answer to an entity tag, which is not passed: never a request
                // without its token.
                Ok(CacheableResource::NotModified) => {
                    return Err((
                        FailureReason::Unreachable,
                        "no access token given (cached answer without a cache)".to_owned(),
                    ));
                }
                Err(error) => {
                    let reason = if error.is_transient() {
                        FailureReason::Unreachable
                    } else {
                        FailureReason::Rejected
                    };
                    return Err((reason, format!("getting an access token: {error}")));
                }
            },
            None => HeaderMap::new(),
        };
        let mut metadata = MetadataMap::from_headers(headers);
        metadata.insert("x-goog-request-params", self.request_params.clone());
        Ok(metadata)
    }

    /// One publish call within `REQUEST_TIMEOUT`, all of it: the channel's own timeout covers
    /// only the request once connected.
    async fn publish(
        &mut self,
        request: PublishRequest,
    ) -> Result<PublishResponse, (FailureReason, String)> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.call(request))
            .await
            .unwrap_or_else(|_| {
                Err((
                    FailureReason::Unreachable,
                    format!("no answer within {REQUEST_TIMEOUT:?}"),
                ))
            })
    }

    async fn call(
        &mut self,
        request: PublishRequest,
    ) -> Result<PublishResponse, (FailureReason, String)> {
        let mut request = tonic::Request::new(request);
        *request.metadata_mut() = self.metadata().await?;
        self.client
            .ready()
            .await
            .map_err(|error| (FailureReason::Unreachable, error.to_string()))?;
        self.client
            .unary(
                request,
                http::uri::PathAndQuery::from_static("/google.pubsub.v1.Publisher/Publish"),
                PublishCodec,
            )
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| (publish_failure(&status), status.to_string()))
    }
}

impl Transport for PubsubTransport {
    type Item = Message;

    fn destination(&self) -> &str {
        &self.topic_path
    }

    async fn send(&mut self, batch: Vec<Message>) -> Result<(), Failure<Message>> {
        let mut refused = 0;
        let mut kept = Vec::with_capacity(batch.len());
        for message in batch {
            let bytes = message.data.len();
            // Never the payload itself: logs go to journald, readable beyond the API's users.
            if bytes > MAX_MESSAGE_BYTES {
                // Sent, it would fail every retry and hold up everything queued behind it.
                tracing::warn!(
                    msg_id = %message.msg_id,
                    bytes,
                    "payload over Pub/Sub's message size limit dropped (lower --max-body-bytes)"
                );
                refused += 1;
            } else {
                tracing::debug!(msg_id = %message.msg_id, bytes, "publishing");
                kept.push(message);
            }
        }
        let data = kept
            .iter()
            .map(|message| stamped(message, self.late_project_id));
        let requests = into_requests(&self.topic_path, data);
        let mut delivered = 0;
        let mut failure = None;
        for request in requests {
            let messages = request.messages.len();
            match self.publish(request).await {
                Ok(response) => {
                    if tracing::enabled!(tracing::Level::DEBUG) {
                        for (message, message_id) in
                            kept[delivered..].iter().zip(&response.message_ids)
                        {
                            tracing::debug!(%message_id, msg_id = %message.msg_id, "published");
                        }
                    }
                    delivered += messages;
                }
                Err((reason, error)) => {
                    failure = Some((reason, error));
                    // The requests after it go back to the queue unsent.
                    break;
                }
            }
        }
        let undelivered = kept.split_off(delivered);
        match failure {
            None if refused == 0 => Ok(()),
            None => Err(Failure {
                undelivered,
                refused,
                reason: FailureReason::Refused,
                error: format!("over the {MAX_MESSAGE_BYTES}-byte message limit"),
            }),
            Some((reason, error)) => Err(Failure {
                undelivered,
                refused,
                reason,
                error,
            }),
        }
    }
}

/// Publishes until the queue is closed and drained. `destination` is the start-up result:
/// when the server was unreachable then, the sink keeps asking (capture keeps queueing).
pub async fn run(
    queue: Arc<MessageQueue>,
    config: DestinationConfig,
    destination: Option<Destination>,
    late_project_id: Arc<OnceLock<Uuid>>,
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
    let (channel, credentials) = loop {
        match connect(&config, &destination) {
            Ok(connection) => break connection,
            Err(error) => {
                tracing::warn!(%error, topic = %destination.topic_path, "cannot create the Pub/Sub publisher; retrying");
                back_off(&mut backoff).await;
            }
        }
    };
    if resolved_late {
        // Capture stamps it into what it writes from now on; the transport into what it wrote
        // before.
        let _ = late_project_id.set(destination.project_id);
    }
    let mut transport = PubsubTransport::new(
        channel,
        credentials,
        destination.topic_path,
        resolved_late.then_some(destination.project_id),
    );
    delivery::run(queue, &mut transport, BATCH, BATCH_BYTES, LINGER).await
}

/// What a routing parameter's value escapes: all but letters, digits and `-._~`, as Google's
/// Go client does (topic names may hold `-._~`).
const ROUTING_PARAM_ESCAPED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `topic=<topic path>`, percent-encoded as Google's clients send it.
fn request_params(topic_path: &str) -> MetadataValue<Ascii> {
    let encoded = percent_encoding::utf8_percent_encode(topic_path, ROUTING_PARAM_ESCAPED);
    MetadataValue::try_from(format!("topic={encoded}")).expect("percent-encoding leaves only ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        pipeline::payload::{Payload, write_json},
        sinks::json::JsonQueues,
    };

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

    /// The requests built for messages of these sizes: each message's data length, per request.
    fn built(topic: &str, sizes: &[usize]) -> Vec<Vec<usize>> {
        let data = sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| Bytes::from(vec![i as u8; size]));
        let requests = into_requests(topic, data);
        let mut i = 0;
        requests
            .iter()
            .map(|request| {
                assert_eq!(request.topic, topic);
                assert!(!request.messages.is_empty());
                assert!(request.encoded_len() <= REQUEST_BYTES);
                request
                    .messages
                    .iter()
                    .map(|message| {
                        assert!(message.data.iter().all(|&byte| byte == i as u8), "in order");
                        assert!(message.attributes.is_empty() && message.ordering_key.is_empty());
                        i += 1;
                        message.data.len()
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn requests_carry_every_message_within_the_api_limit() {
        let topic = "projects/p/topics/t";
        assert_eq!(
            built(topic, &[0, 1, 127, 128, 20_000]),
            [vec![0, 1, 127, 128, 20_000]]
        );
        let (mb, small) = (1_000_000, 2_000);
        let sizes = [
            small,
            6 * mb,
            3 * mb,
            2 * mb,
            small,
            MAX_MESSAGE_BYTES,
            small,
        ];
        assert_eq!(
            built(topic, &sizes),
            [
                vec![small, 6 * mb, 3 * mb],
                vec![2 * mb, small],
                vec![MAX_MESSAGE_BYTES],
                vec![small],
            ]
        );
        assert_eq!(built(topic, &[small; BATCH]), [vec![small; BATCH]]);
    }

    /// The Pub/Sub sink's messages for these payloads, as capture queues them.
    async fn messages(payloads: &[Payload]) -> Vec<Message> {
        let queue = MessageQueue::new("pubsub", usize::MAX);
        JsonQueues::new(None, Some(Arc::clone(&queue))).push(payloads);
        queue.pop(usize::MAX, usize::MAX).await.unwrap()
    }

    #[tokio::test]
    async fn a_project_id_resolved_late_is_stamped_into_the_json() {
        let payload = crate::sinks::tests::payload("/1");
        let [message] = messages(std::slice::from_ref(&payload))
            .await
            .try_into()
            .ok()
            .unwrap();
        let written = payload.project_id;
        assert!(stamped(&message, None).as_ptr() == message.data.as_ptr());
        assert!(
            stamped(&message, Some(written)).as_ptr() == message.data.as_ptr(),
            "the id capture wrote needs no copy"
        );
        let late = Uuid::from_u128(0x1234);
        assert_ne!(late, written);
        let data = stamped(&message, Some(late));
        let mut expected = payload;
        expected.project_id = late;
        let mut json = Vec::new();
        write_json(&expected, &mut json);
        assert_eq!(data, json);
    }

    #[test]
    fn failures_are_classified_as_pubsub_answers() {
        for (code, reason) in [
            (Code::Unauthenticated, FailureReason::Rejected),
            (Code::PermissionDenied, FailureReason::Rejected),
            (Code::InvalidArgument, FailureReason::Unreachable),
            (Code::Unavailable, FailureReason::Unreachable),
            (Code::NotFound, FailureReason::Unreachable),
            (Code::DeadlineExceeded, FailureReason::Unreachable),
        ] {
            assert_eq!(publish_failure(&Status::new(code, "")), reason, "{code:?}");
        }
    }

    #[tokio::test]
    async fn an_unreachable_emulator_keeps_the_batch_for_a_retry() {
        // Bound and closed at once: nothing listens on the port.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = DestinationConfig {
            topic: Some("t".into()),
            pubsub_project: Some("p".into()),
            emulator_host: Some(format!("127.0.0.1:{port}")),
            ..Default::default()
        };
        let destination = config.merge(None).unwrap();
        let (channel, credentials) = connect(&config, &destination).unwrap();
        assert!(credentials.is_none(), "the emulator takes no credentials");
        let mut transport =
            PubsubTransport::new(channel, credentials, destination.topic_path, None);
        let mut too_big = crate::sinks::tests::payload("/too-big");
        // Base64 makes it ~10.7 MB of JSON.
        too_big.response_body = vec![b'x'; 8_000_000];
        let batch = messages(&[
            crate::sinks::tests::payload("/1"),
            too_big,
            crate::sinks::tests::payload("/2"),
        ])
        .await;
        let sent: Vec<Bytes> = [&batch[0], &batch[2]]
            .map(|message| message.data.clone())
            .into();
        let failure = transport.send(batch).await.unwrap_err();
        assert_eq!(failure.reason, FailureReason::Unreachable);
        assert_eq!(
            failure.refused, 1,
            "the message over the limit is never sent"
        );
        let undelivered: Vec<Bytes> = failure
            .undelivered
            .into_iter()
            .map(|message| message.data)
            .collect();
        assert_eq!(undelivered, sent);
    }

    #[test]
    fn the_topic_routes_the_request() {
        assert_eq!(
            request_params("projects/p-1/topics/t.x"),
            "topic=projects%2Fp-1%2Ftopics%2Ft.x"
        );
    }
}
