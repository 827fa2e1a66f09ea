//! Command line (and `APITOOLKIT_*` environment), validated once into the settings `run` uses.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use uuid::Uuid;

use crate::payload::SdkType;

#[derive(Debug, Parser)]
#[command(
    name = "apitoolkit-agent",
    version,
    about = "Captures the HTTP traffic of running processes with eBPF and emits APIToolkit payloads"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub capture: CaptureArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Runs recorded events (from --record) through the pipeline and prints the payloads.
    Replay {
        /// NDJSON file of recorded events.
        file: PathBuf,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// One JSON payload per line on standard output.
    Stdout,
    /// Publish to the APIToolkit Pub/Sub topic.
    Pubsub,
    /// Both.
    Both,
}

#[derive(Debug, Args)]
pub struct CaptureArgs {
    /// Process to watch, with its descendants (repeatable).
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,

    /// Where payloads go [default: pubsub when --api-key or --topic is set, else stdout].
    #[arg(long, value_enum, env = "APITOOLKIT_OUTPUT")]
    pub output: Option<Output>,

    /// APIToolkit API key: project id, topic and Pub/Sub credentials are fetched with it.
    #[arg(long, env = "APITOOLKIT_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// APIToolkit server the API key is checked against.
    #[arg(
        long,
        default_value = "https://app.apitoolkit.io",
        env = "APITOOLKIT_ROOT_URL"
    )]
    pub root_url: String,

    /// Google Cloud project of the Pub/Sub topic (overrides the fetched one).
    #[arg(long, env = "APITOOLKIT_PUBSUB_PROJECT")]
    pub pubsub_project: Option<String>,

    /// Pub/Sub topic id (overrides the fetched one).
    #[arg(long, env = "APITOOLKIT_TOPIC")]
    pub topic: Option<String>,

    /// Service-account JSON for Pub/Sub (else the fetched one, else Application Default
    /// Credentials). With PUBSUB_EMULATOR_HOST set, no credentials are used.
    #[arg(long, value_name = "FILE", env = "APITOOLKIT_CREDENTIALS")]
    pub credentials: Option<PathBuf>,

    /// Debug logging on standard error.
    #[arg(long, env = "APITOOLKIT_DEBUG")]
    pub debug: bool,

    /// Publish the requests watched processes make (client side) as their own payloads,
    /// linked to the incoming request being served.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL",
          env = "APITOOLKIT_CAPTURE_OUTGOING")]
    pub capture_outgoing: bool,

    /// Attach the errors watched processes print on stderr (Python tracebacks, JavaScript
    /// stacks) to the request being served.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL",
          env = "APITOOLKIT_CAPTURE_ERRORS")]
    pub capture_errors: bool,

    /// Largest body kept per message; longer bodies are cut and tagged as truncated.
    #[arg(long, default_value_t = 1024 * 1024, env = "APITOOLKIT_MAX_BODY_BYTES")]
    pub max_body_bytes: usize,

    /// Override the detected framework (a backend sdk_type name such as PythonFlask).
    #[arg(long, env = "APITOOLKIT_SDK_TYPE")]
    pub sdk_type: Option<SdkType>,

    /// APIToolkit project the payloads belong to (overrides the fetched one; nil UUID when
    /// neither is known).
    #[arg(long, env = "APITOOLKIT_PROJECT_ID")]
    pub project_id: Option<Uuid>,

    /// Service version stamped on every payload.
    #[arg(long, env = "APITOOLKIT_SERVICE_VERSION")]
    pub service_version: Option<String>,

    /// Tag added to every payload (repeatable).
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,

    /// Header whose value is replaced by [CLIENT_REDACTED], matched case-insensitively, in
    /// requests and responses (repeatable).
    #[arg(
        long = "redact-header",
        value_name = "NAME",
        env = "APITOOLKIT_REDACT_HEADERS",
        value_delimiter = ','
    )]
    pub redact_headers: Vec<String>,

    /// JSONPath into JSON request bodies whose matches are redacted (repeatable). A body that
    /// cannot be parsed is withheld.
    #[arg(
        long = "redact-request-body",
        value_name = "JSONPATH",
        env = "APITOOLKIT_REDACT_REQUEST_BODY",
        value_delimiter = ','
    )]
    pub redact_request_body: Vec<String>,

    /// JSONPath into JSON response bodies whose matches are redacted (repeatable).
    #[arg(
        long = "redact-response-body",
        value_name = "JSONPATH",
        env = "APITOOLKIT_REDACT_RESPONSE_BODY",
        value_delimiter = ','
    )]
    pub redact_response_body: Vec<String>,

    /// Also write every captured event to this file (NDJSON), for `replay` and bug reports.
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,

    /// Bytes of payloads that may wait for each sink; beyond that the oldest are dropped and
    /// counted, so a slow sink never grows the agent's memory.
    #[arg(long, default_value_t = 64 * 1024 * 1024, env = "APITOOLKIT_QUEUE_BYTES")]
    pub queue_bytes: usize,
}

impl CaptureArgs {
    /// Which sinks to feed, as (stdout, pubsub): `--output`, else Pub/Sub when a destination
    /// is configured.
    pub fn outputs(&self) -> (bool, bool) {
        let output = self
            .output
            .unwrap_or(if self.api_key.is_some() || self.topic.is_some() {
                Output::Pubsub
            } else {
                Output::Stdout
            });
        (
            matches!(output, Output::Stdout | Output::Both),
            matches!(output, Output::Pubsub | Output::Both),
        )
    }
}
