//! Exports payloads as OpenTelemetry spans over OTLP/gRPC or OTLP/HTTP (protobuf), to the
//! APIToolkit (Monoscope) collector or any OpenTelemetry backend. The API key travels as
//! `x-api-key`; batching, retries and the bounded queue are the shared delivery loop's.

pub mod span;

use std::{sync::Arc, time::Duration};

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, trace_service_client::TraceServiceClient,
};
use prost::Message as _;
use reqwest::Url;
use tonic::{
    Code,
    metadata::{MetadataKey, MetadataMap, MetadataValue},
    transport::{Channel, ClientTlsConfig, Endpoint},
};

use super::{
    PayloadQueue,
    delivery::{self, DeliveryStats, Failure, FailureReason, Transport},
};
use crate::pipeline::payload::Payload;
pub use span::ResourceSettings;

/// Spans per export request (the OpenTelemetry SDKs' default batch).
const BATCH: usize = 512;
/// Bytes of payloads per export request: receivers refuse gRPC messages over 4 MiB by default.
const BATCH_BYTES: usize = 3 * 1024 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// OTLP/gRPC (the collector's port 4317).
    Grpc,
    /// OTLP/HTTP with protobuf bodies, POSTed to <endpoint>/v1/traces (port 4318).
    Http,
}

/// What the command line says about the OTLP destination.
#[derive(Clone, Debug)]
pub struct OtlpConfig {
    pub endpoint: Url,
    pub protocol: Protocol,
    /// Sent with every export: `--otlp-header`s, then the API key as `x-api-key`.
    pub headers: Vec<(String, String)>,
    pub resource: ResourceSettings,
}

#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error("--otlp-header {name:?}: not a valid header name or value")]
    InvalidHeader { name: String },
    #[error("--otlp-endpoint {endpoint}: {reason}")]
    InvalidEndpoint { endpoint: String, reason: String },
}

/// The URL OTLP/HTTP posts to: `<endpoint>/v1/traces`, unless the endpoint names it already.
fn traces_url(endpoint: &Url) -> Url {
    if endpoint.path().ends_with("/v1/traces") {
        return endpoint.clone();
    }
    let mut url = endpoint.clone();
    let path = format!("{}/v1/traces", endpoint.path().trim_end_matches('/'));
    url.set_path(&path);
    url
}

enum Client {
    Grpc {
        client: TraceServiceClient<Channel>,
        metadata: MetadataMap,
    },
    Http {
        client: reqwest::Client,
        url: Url,
        headers: reqwest::header::HeaderMap,
    },
}

pub struct OtlpTransport {
    client: Client,
    destination: String,
    resource: ResourceSettings,
}

fn grpc_client(config: &OtlpConfig) -> Result<Client, OtlpError> {
    let invalid = |reason: String| OtlpError::InvalidEndpoint {
        endpoint: config.endpoint.to_string(),
        reason,
    };
    let mut endpoint = Endpoint::from_shared(config.endpoint.to_string())
        .map_err(|error| invalid(error.to_string()))?
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(CONNECT_TIMEOUT);
    if config.endpoint.scheme() == "https" {
        endpoint = endpoint
            .tls_config(ClientTlsConfig::new().with_native_roots())
            .map_err(|error| invalid(error.to_string()))?;
    }
    let mut metadata = MetadataMap::new();
    for (name, value) in &config.headers {
        let invalid = || OtlpError::InvalidHeader { name: name.clone() };
        let key =
            MetadataKey::from_bytes(name.to_ascii_lowercase().as_bytes()).map_err(|_| invalid())?;
        let value = MetadataValue::try_from(value.as_str()).map_err(|_| invalid())?;
        metadata.insert(key, value);
    }
    Ok(Client::Grpc {
        // Lazy: an endpoint that is down at start-up is retried like one that goes down later.
        client: TraceServiceClient::new(endpoint.connect_lazy()),
        metadata,
    })
}

fn http_client(config: &OtlpConfig) -> Result<Client, OtlpError> {
    let mut headers = reqwest::header::HeaderMap::new();
    for (name, value) in &config.headers {
        let invalid = || OtlpError::InvalidHeader { name: name.clone() };
        headers.insert(
            reqwest::header::HeaderName::from_bytes(name.as_bytes()).map_err(|_| invalid())?,
            reqwest::header::HeaderValue::from_str(value).map_err(|_| invalid())?,
        );
    }
    headers.insert(
        reqwest::header::CONTENT_TYPE,
        reqwest::header::HeaderValue::from_static("application/x-protobuf"),
    );
    let client = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(CONNECT_TIMEOUT)
        .build()
        .map_err(|error| OtlpError::InvalidEndpoint {
            endpoint: config.endpoint.to_string(),
            reason: error.to_string(),
        })?;
    Ok(Client::Http {
        client,
        url: traces_url(&config.endpoint),
        headers,
    })
}

/// How a gRPC status counts: OTLP says which codes are worth retrying. RESOURCE_EXHAUSTED is
/// retryable only with the server's RetryInfo; collectors also answer it for a message over
/// their size limit, which no retry fixes, so it is refused (dropped and counted).
fn grpc_failure(status: &tonic::Status) -> FailureReason {
    match status.code() {
        Code::Unauthenticated | Code::PermissionDenied => FailureReason::Rejected,
        Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::OutOfRange
        | Code::Unavailable
        | Code::DataLoss
        | Code::Unknown
        | Code::Internal => FailureReason::Unreachable,
        _ => FailureReason::Refused,
    }
}

/// How an HTTP status counts, as OTLP/HTTP says.
fn http_failure(status: reqwest::StatusCode) -> FailureReason {
    match status.as_u16() {
        401 | 403 => FailureReason::Rejected,
        408 | 429 | 500..=599 => FailureReason::Unreachable,
        _ => FailureReason::Refused,
    }
}

impl OtlpTransport {
    /// Checks the headers and endpoint once; connecting happens on the first export.
    pub fn new(config: &OtlpConfig) -> Result<Self, OtlpError> {
        let client = match config.protocol {
            Protocol::Grpc => grpc_client(config)?,
            Protocol::Http => http_client(config)?,
        };
        let destination = match &client {
            Client::Grpc { .. } => config.endpoint.to_string(),
            Client::Http { url, .. } => url.to_string(),
        };
        Ok(Self {
            client,
            destination,
            resource: config.resource.clone(),
        })
    }

    /// Sends one request; the error says how it failed.
    async fn export(
        &mut self,
        request: ExportTraceServiceRequest,
    ) -> Result<(), (FailureReason, String)> {
        match &mut self.client {
            Client::Grpc { client, metadata } => {
                let mut call = tonic::Request::new(request);
                *call.metadata_mut() = metadata.clone();
                let response = client
                    .export(call)
                    .await
                    .map_err(|status| (grpc_failure(&status), status.to_string()))?;
                log_partial_success(response.into_inner().partial_success);
                Ok(())
            }
            Client::Http {
                client,
                url,
                headers,
            } => {
                let response = client
                    .post(url.clone())
                    .headers(headers.clone())
                    .body(request.encode_to_vec())
                    .send()
                    .await
                    .map_err(|error| (FailureReason::Unreachable, with_causes(&error)))?;
                let status = response.status();
                if status.is_success() {
                    Ok(())
                } else {
                    Err((http_failure(status), format!("HTTP {status}")))
                }
            }
        }
    }
}

/// An error and what caused it (reqwest's own text leaves out why a request failed, e.g. a
/// refused connection or an untrusted certificate).
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(error) = cause {
        text.push_str(": ");
        text.push_str(&error.to_string());
        cause = error.source();
    }
    text
}

fn log_partial_success(
    partial: Option<opentelemetry_proto::tonic::collector::trace::v1::ExportTracePartialSuccess>,
) {
    if let Some(partial) = partial.filter(|partial| partial.rejected_spans > 0) {
        metrics::counter!("apitoolkit_agent_otlp_rejected_spans_total")
            .increment(partial.rejected_spans.max(0) as u64);
        tracing::debug!(
            rejected_spans = partial.rejected_spans,
            message = partial.error_message,
            "the OTLP endpoint accepted only part of a batch"
        );
    }
}

impl Transport for OtlpTransport {
    type Item = Payload;

    fn destination(&self) -> &str {
        &self.destination
    }

    async fn send(&mut self, batch: Vec<Payload>) -> Result<(), Failure<Payload>> {
        let request = span::export_request(&batch, &self.resource);
        self.export(request).await.map_err(|(reason, error)| {
            // A batch the endpoint refuses would be refused again.
            let (undelivered, refused) = if reason == FailureReason::Refused {
                (Vec::new(), batch.len() as u64)
            } else {
                (batch, 0)
            };
            Failure {
                undelivered,
                refused,
                reason,
                error,
            }
        })
    }
}

/// Exports until the queue is closed and drained.
pub async fn run(queue: Arc<PayloadQueue>, mut transport: OtlpTransport) -> DeliveryStats {
    delivery::run(queue, &mut transport, BATCH, BATCH_BYTES, Duration::ZERO).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(endpoint: &str, protocol: Protocol) -> OtlpConfig {
        OtlpConfig {
            endpoint: endpoint.parse().unwrap(),
            protocol,
            headers: vec![("x-api-key".into(), "k".into())],
            resource: ResourceSettings::default(),
        }
    }

    #[test]
    fn http_posts_to_the_traces_path() {
        for (endpoint, expected) in [
            ("http://collector:4318", "http://collector:4318/v1/traces"),
            (
                "http://collector:4318/otlp/",
                "http://collector:4318/otlp/v1/traces",
            ),
            ("https://c.example/v1/traces", "https://c.example/v1/traces"),
        ] {
            assert_eq!(traces_url(&endpoint.parse().unwrap()).as_str(), expected);
        }
    }

    #[test]
    fn bad_headers_are_named() {
        let mut bad = config("http://127.0.0.1:4318", Protocol::Http);
        bad.headers.push(("bad header".into(), "v".into()));
        let error = OtlpTransport::new(&bad).err().unwrap();
        assert!(error.to_string().contains("\"bad header\""), "{error}");
        bad.protocol = Protocol::Grpc;
        assert!(OtlpTransport::new(&bad).is_err());
    }

    #[test]
    fn failures_are_classified_as_otlp_says() {
        assert_eq!(
            grpc_failure(&tonic::Status::unauthenticated("key")),
            FailureReason::Rejected
        );
        assert_eq!(
            grpc_failure(&tonic::Status::unavailable("down")),
            FailureReason::Unreachable
        );
        assert_eq!(
            grpc_failure(&tonic::Status::invalid_argument("bad")),
            FailureReason::Refused
        );
        assert_eq!(
            http_failure(reqwest::StatusCode::UNAUTHORIZED),
            FailureReason::Rejected
        );
        assert_eq!(
            http_failure(reqwest::StatusCode::SERVICE_UNAVAILABLE),
            FailureReason::Unreachable
        );
        assert_eq!(
            http_failure(reqwest::StatusCode::BAD_REQUEST),
            FailureReason::Refused
        );
    }

    /// An endpoint that is down is a retryable failure, not a start-up error.
    #[tokio::test]
    async fn an_unreachable_endpoint_is_retryable() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        for protocol in [Protocol::Grpc, Protocol::Http] {
            let mut transport =
                OtlpTransport::new(&config(&format!("http://127.0.0.1:{port}"), protocol)).unwrap();
            let error = transport
                .export(ExportTraceServiceRequest::default())
                .await
                .unwrap_err();
            assert_eq!(
                error.0,
                FailureReason::Unreachable,
                "{protocol:?}: {}",
                error.1
            );
        }
    }
}
