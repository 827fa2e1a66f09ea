//! The API-key bootstrap the SDKs do: `GET {root_url}/api/client_metadata` names the project,
//! the Pub/Sub topic and the credentials to publish with.

use std::time::Duration;

use serde::Deserialize;
use uuid::Uuid;

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct ClientMetadata {
    pub project_id: Uuid,
    pub topic_id: String,
    pub pubsub_project_id: String,
    /// A Google service-account key (JSON object), or null.
    #[serde(default)]
    pub pubsub_push_service_account: serde_json::Value,
}

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("invalid API key: {root_url} answered {status}")]
    InvalidApiKey { root_url: String, status: u16 },
    #[error("{url} is unreachable: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("unexpected answer from {url}: {reason}")]
    BadResponse { url: String, reason: String },
}

impl BootstrapError {
    /// Worth retrying: the server may come back; a rejected key will not change.
    pub fn is_transient(&self) -> bool {
        matches!(self, BootstrapError::Unreachable { .. })
    }
}

pub async fn client_metadata(
    root_url: &str,
    api_key: &str,
) -> Result<ClientMetadata, BootstrapError> {
    let url = format!("{}/api/client_metadata", root_url.trim_end_matches('/'));
    let unreachable = |reason: String| BootstrapError::Unreachable {
        url: url.clone(),
        reason,
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|error| unreachable(error.to_string()))?;
    let response = client
        .get(&url)
        .bearer_auth(api_key)
        .send()
        .await
        .map_err(|error| unreachable(error.to_string()))?;
    let status = response.status();
    if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
        return Err(BootstrapError::InvalidApiKey {
            root_url: root_url.to_owned(),
            status: status.as_u16(),
        });
    }
    if status.is_server_error() {
        return Err(unreachable(format!("HTTP {status}")));
    }
    let body = response
        .bytes()
        .await
        .map_err(|error| unreachable(error.to_string()))?;
    if !status.is_success() {
        return Err(BootstrapError::BadResponse {
            url,
            reason: format!("HTTP {status}"),
        });
    }
    serde_json::from_slice(&body).map_err(|error| BootstrapError::BadResponse {
        url,
        reason: error.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        net::TcpListener,
    };

    use super::*;

    /// Serves one canned HTTP response and returns the request it received.
    fn serve_once(response: &'static str) -> (String, std::thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let root = format!("http://{}", listener.local_addr().unwrap());
        let handle = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = vec![0; 4096];
            let read = stream.read(&mut request).unwrap();
            stream.write_all(response.as_bytes()).unwrap();
            String::from_utf8_lossy(&request[..read]).into_owned()
        });
        (root, handle)
    }

    #[tokio::test]
    async fn fetches_metadata_with_the_key_as_bearer_token() {
        let body = r#"{"project_id":"00000000-0000-0000-0000-000000000001","topic_id":"apitoolkit-prod-default","pubsub_project_id":"past-3","pubsub_push_service_account":{"type":"service_account"}}"#;
        let response: &'static str = Box::leak(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .into_boxed_str(),
        );
        let (root, server) = serve_once(response);
        let metadata = client_metadata(&root, "key-123").await.unwrap();
        assert_eq!(metadata.topic_id, "apitoolkit-prod-default");
        assert_eq!(metadata.pubsub_project_id, "past-3");
        assert_eq!(metadata.project_id.as_u128(), 1);
        let request = server.join().unwrap();
        assert!(request.starts_with("GET /api/client_metadata HTTP/1.1"));
        assert!(
            request
                .to_ascii_lowercase()
                .contains("authorization: bearer key-123")
        );
    }

    #[tokio::test]
    async fn a_rejected_key_is_not_transient() {
        let (root, _server) = serve_once(
            "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
        let error = client_metadata(&root, "bad").await.unwrap_err();
        assert!(matches!(
            error,
            BootstrapError::InvalidApiKey { status: 401, .. }
        ));
        assert!(!error.is_transient());
        assert!(error.to_string().starts_with("invalid API key"));
    }

    #[tokio::test]
    async fn a_closed_port_is_transient() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let error = client_metadata(&format!("http://127.0.0.1:{port}"), "k")
            .await
            .unwrap_err();
        assert!(error.is_transient(), "{error}");
    }
}
