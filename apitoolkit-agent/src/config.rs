//! Settings from the command line, `APITOOLKIT_*` environment variables and a `--config` file
//! (TOML or YAML, keys named like the flags), in that order of precedence.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
};

use clap::{
    ArgAction, Args, CommandFactory as _, FromArgMatches as _, Parser, Subcommand, ValueEnum,
    parser::ValueSource,
};
use serde::{Serialize, Serializer};
use uuid::Uuid;

use crate::{pipeline::profile::SdkType, sinks::otlp::Protocol as OtlpProtocol};

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
    /// Checks that this host can run the agent (kernel, privileges, tracefs, eBPF, uprobes)
    /// and prints the fix for what fails; exits 1 when something required fails.
    Check,
    /// Prints the settings merged from flags, environment and config file (secrets masked).
    Config {
        #[arg(long, required = true)]
        print: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Output {
    /// One JSON payload per line on standard output.
    Stdout,
    /// Publish to the APIToolkit Pub/Sub topic.
    Pubsub,
    /// Export OpenTelemetry spans to --otlp-endpoint.
    Otlp,
    /// Stdout and Pub/Sub (the same as stdout,pubsub).
    Both,
}

/// The sinks payloads go to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outputs {
    pub stdout: bool,
    pub pubsub: bool,
    pub otlp: bool,
}

/// A `KEY=VALUE` header for the OTLP endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderArg {
    pub name: String,
    pub value: String,
}

fn parse_header(text: &str) -> Result<HeaderArg, String> {
    match text.split_once('=') {
        Some((name, value)) if !name.trim().is_empty() => Ok(HeaderArg {
            name: name.trim().to_owned(),
            value: value.trim().to_owned(),
        }),
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

/// Header values often are credentials: `config --print` shows only the names.
impl Serialize for HeaderArg {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&format_args!("{}=****", self.name))
    }
}

fn parse_otlp_endpoint(text: &str) -> Result<reqwest::Url, String> {
    let url: reqwest::Url = text
        .parse()
        .map_err(|error| format!("{text:?} is not a URL: {error}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!(
            "{text:?} is not an http:// or https:// URL with a host, e.g. http://localhost:4317"
        ));
    }
    Ok(url)
}

/// Every field serializes under its flag's name, so `config --print` output is a config file.
#[derive(Debug, Args, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CaptureArgs {
    /// Settings file (TOML, or YAML for .yaml/.yml); flags and environment override it.
    #[arg(long, value_name = "FILE", env = "APITOOLKIT_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Process to watch, with its descendants (repeatable).
    #[arg(
        long = "pid",
        value_name = "PID",
        env = "APITOOLKIT_PIDS",
        value_delimiter = ','
    )]
    #[serde(rename = "pid")]
    pub pids: Vec<u32>,

    /// Watch processes whose executable has this path or file name, or whose argv[0] has
    /// this file name (repeatable); processes started later are picked up.
    #[arg(
        long = "exe",
        value_name = "PATH|NAME",
        env = "APITOOLKIT_EXES",
        value_delimiter = ','
    )]
    #[serde(rename = "exe")]
    pub exes: Vec<String>,

    /// Watch processes listening on this TCP port (repeatable); picked up when they start.
    #[arg(
        long = "port",
        value_name = "PORT",
        env = "APITOOLKIT_PORTS",
        value_delimiter = ','
    )]
    #[serde(rename = "port")]
    pub ports: Vec<u16>,

    /// Watch every process in this cgroup v2 (a container, a systemd unit), e.g.
    /// /system.slice/app.service (repeatable); selected in the kernel.
    #[arg(
        long = "cgroup",
        value_name = "PATH",
        env = "APITOOLKIT_CGROUPS",
        value_delimiter = ','
    )]
    #[serde(rename = "cgroup")]
    pub cgroups: Vec<String>,

    /// Watch the pods of this Kubernetes namespace (repeatable; the agent runs in a pod of
    /// the DaemonSet and asks the API server).
    #[arg(
        long = "k8s-namespace",
        value_name = "NAMESPACE",
        env = "APITOOLKIT_K8S_NAMESPACES",
        value_delimiter = ','
    )]
    #[serde(rename = "k8s-namespace")]
    pub k8s_namespaces: Vec<String>,

    /// Watch the pods with this label (repeatable; all given labels must match).
    #[arg(
        long = "k8s-label",
        value_name = "KEY=VALUE",
        env = "APITOOLKIT_K8S_LABELS",
        value_delimiter = ','
    )]
    #[serde(rename = "k8s-label")]
    pub k8s_labels: Vec<String>,

    /// The Kubernetes node the agent runs on: only its pods are listed (the DaemonSet sets it).
    #[arg(long, env = "APITOOLKIT_NODE_NAME")]
    pub node_name: Option<String>,

    /// Watch every process on the host except the agent; selected in the kernel.
    #[arg(long, env = "APITOOLKIT_ALL")]
    pub all: bool,

    /// Where payloads go, one or several (stdout,otlp) [default: otlp when --otlp-endpoint is
    /// set, else pubsub when --api-key or --topic is set, else stdout].
    #[arg(long, value_enum, env = "APITOOLKIT_OUTPUT", value_delimiter = ',')]
    pub output: Vec<Output>,

    /// OpenTelemetry collector to export spans to, e.g. http://localhost:4317 (gRPC) or
    /// https://collector:4318 (HTTP; spans are POSTed to <URL>/v1/traces). https uses the
    /// system's root certificates.
    #[arg(long, value_name = "URL", value_parser = parse_otlp_endpoint, env = "APITOOLKIT_OTLP_ENDPOINT")]
    #[serde(serialize_with = "display")]
    pub otlp_endpoint: Option<reqwest::Url>,

    /// OTLP transport: gRPC or HTTP with protobuf bodies.
    #[arg(long, value_enum, default_value_t = OtlpProtocol::Grpc, env = "APITOOLKIT_OTLP_PROTOCOL")]
    pub otlp_protocol: OtlpProtocol,

    /// Header sent with every OTLP export (repeatable), e.g. Authorization=Bearer TOKEN; the
    /// API key, when given, is sent as x-api-key.
    #[arg(
        long = "otlp-header",
        value_name = "KEY=VALUE",
        value_parser = parse_header,
        env = "APITOOLKIT_OTLP_HEADERS",
        value_delimiter = ','
    )]
    #[serde(rename = "otlp-header")]
    pub otlp_headers: Vec<HeaderArg>,

    /// The OpenTelemetry service.name of every span [default: the Kubernetes workload, else
    /// the process's command name].
    #[arg(long, env = "APITOOLKIT_SERVICE_NAME")]
    pub service_name: Option<String>,

    /// APIToolkit API key: project id, topic and Pub/Sub credentials are fetched with it.
    /// Every local user sees a flag's value in `ps`: prefer APITOOLKIT_API_KEY or
    /// --api-key-file.
    #[arg(long, env = "APITOOLKIT_API_KEY", hide_env_values = true)]
    #[serde(serialize_with = "masked")]
    pub api_key: Option<String>,

    /// File holding the API key (surrounding whitespace ignored), e.g. a mounted secret.
    #[arg(
        long,
        value_name = "FILE",
        env = "APITOOLKIT_API_KEY_FILE",
        conflicts_with = "api_key"
    )]
    pub api_key_file: Option<PathBuf>,

    /// The API key was given as a command-line flag, visible to other users.
    #[arg(skip)]
    #[serde(skip)]
    pub api_key_on_command_line: bool,

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

    /// Debug logging on standard error (payloads are named there, never logged).
    #[arg(long, env = "APITOOLKIT_DEBUG")]
    pub debug: bool,

    /// Log line format on standard error.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "APITOOLKIT_LOG_FORMAT")]
    pub log_format: LogFormat,

    /// Address serving the agent's Prometheus /metrics and /healthz, or `off`.
    #[arg(
        long,
        value_name = "ADDR|off",
        default_value = "127.0.0.1:9464",
        value_parser = parse_endpoint,
        env = "APITOOLKIT_METRICS_ADDRESS"
    )]
    pub metrics_address: Endpoint,

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

    /// Bytes all connections together may hold for messages still arriving (heads, bodies,
    /// unanswered requests). Beyond it the connections idle longest lose their unfinished
    /// messages (counted, logged), so clients that never finish cannot grow the agent.
    #[arg(
        long,
        default_value_t = crate::pipeline::connections::DEFAULT_MAX_BUFFERED_BYTES,
        env = "APITOOLKIT_MAX_BUFFERED_BYTES"
    )]
    pub max_buffered_bytes: usize,

    /// Route templates for `url_path` and `path_params`: one template a line, a JSON or YAML
    /// list, or an OpenAPI 3 document (JSON or YAML). They take precedence over the routes
    /// read from the watched applications' source.
    #[arg(long, value_name = "FILE", env = "APITOOLKIT_ROUTES")]
    pub routes: Option<PathBuf>,

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
    #[arg(
        long = "tag",
        value_name = "TAG",
        env = "APITOOLKIT_TAGS",
        value_delimiter = ','
    )]
    #[serde(rename = "tag")]
    pub tags: Vec<String>,

    /// Header whose value is replaced by [CLIENT_REDACTED], matched case-insensitively, in
    /// requests and responses (repeatable).
    #[arg(
        long = "redact-header",
        value_name = "NAME",
        env = "APITOOLKIT_REDACT_HEADERS",
        value_delimiter = ','
    )]
    #[serde(rename = "redact-header")]
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

    /// Also write the captured events to this file (NDJSON), for `replay` and bug reports.
    /// The redaction rules apply: each exchange is written as rebuilt from its redacted
    /// payload. The file is created readable by its owner only, never over an existing file.
    #[arg(long, value_name = "FILE", env = "APITOOLKIT_RECORD")]
    pub record: Option<PathBuf>,

    /// With --record: write the raw kernel events instead, redaction rules NOT applied
    /// (Authorization headers, cookies, passwords), byte for byte as captured.
    #[arg(long, requires = "record", env = "APITOOLKIT_RECORD_RAW")]
    pub record_raw: bool,

    /// Size of the kernel-to-agent ring buffer (a power of two, at least 4096): more absorbs
    /// longer bursts, at the cost of locked kernel memory. Overflow is counted, never blocking.
    #[arg(
        long,
        default_value_t = crate::capture::DEFAULT_RING_BUFFER_BYTES,
        value_parser = parse_ring_buffer_bytes,
        env = "APITOOLKIT_RING_BUFFER_BYTES"
    )]
    pub ring_buffer_bytes: u32,

    /// Bytes of payloads that may wait for each sink; beyond that the oldest are dropped and
    /// counted, so a slow sink never grows the agent's memory.
    #[arg(long, default_value_t = 16 * 1024 * 1024, env = "APITOOLKIT_QUEUE_BYTES")]
    pub queue_bytes: usize,
}

impl CaptureArgs {
    /// Which sinks to feed: `--output`, else the destination configured.
    pub fn outputs(&self) -> Outputs {
        let default = if self.otlp_endpoint.is_some() {
            Output::Otlp
        } else if self.api_key.is_some() || self.topic.is_some() {
            Output::Pubsub
        } else {
            Output::Stdout
        };
        let chosen = if self.output.is_empty() {
            &[default][..]
        } else {
            &self.output
        };
        let mut outputs = Outputs::default();
        for output in chosen {
            match output {
                Output::Stdout => outputs.stdout = true,
                Output::Pubsub => outputs.pubsub = true,
                Output::Otlp => outputs.otlp = true,
                Output::Both => {
                    outputs.stdout = true;
                    outputs.pubsub = true;
                }
            }
        }
        outputs
    }
}

fn parse_ring_buffer_bytes(text: &str) -> Result<u32, String> {
    match text.parse::<u32>() {
        Ok(bytes) if bytes >= 4096 && bytes.is_power_of_two() => Ok(bytes),
        _ => Err(format!("{text:?} is not a power of two of at least 4096")),
    }
}

/// A local address to serve on, or none (`off`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint(pub Option<std::net::SocketAddr>);

fn parse_endpoint(text: &str) -> Result<Endpoint, String> {
    if text == "off" {
        return Ok(Endpoint(None));
    }
    text.parse()
        .map(|address| Endpoint(Some(address)))
        .map_err(|_| format!("{text:?} is not an address such as 127.0.0.1:9464 (or off)"))
}

impl Serialize for Endpoint {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Some(address) => serializer.collect_str(&address),
            None => serializer.serialize_str("off"),
        }
    }
}

fn display<S: Serializer>(
    value: &Option<impl std::fmt::Display>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match value {
        Some(value) => serializer.collect_str(value),
        None => serializer.serialize_none(),
    }
}

fn masked<S: Serializer>(secret: &Option<String>, serializer: S) -> Result<S::Ok, S::Error> {
    match secret {
        Some(_) => serializer.serialize_some("****"),
        None => serializer.serialize_none(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(
        "config file {path}: unknown key {key:?} (keys are the flag names, e.g. redact-header)"
    )]
    UnknownKey { path: PathBuf, key: String },
    #[error("config file {path}: {key} must be a string, number or boolean (or a list of them)")]
    BadValue { path: PathBuf, key: String },
    #[error("reading the API key from {path}: {source}")]
    ApiKeyFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the API key file {0} is empty")]
    EmptyApiKeyFile(PathBuf),
    #[error(transparent)]
    Cli(#[from] clap::Error),
}

/// The file's settings as a JSON object, whatever its format.
fn read_config_file(
    path: &PathBuf,
) -> Result<serde_json::Map<String, serde_json::Value>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let parse_error = |message: String| ConfigError::Parse {
        path: path.to_path_buf(),
        message,
    };
    let yaml = path
        .extension()
        .is_some_and(|extension| extension == "yaml" || extension == "yml");
    let value: serde_json::Value = if yaml {
        serde_yaml_ng::from_str(&text).map_err(|error| parse_error(error.to_string()))?
    } else {
        toml::from_str(&text).map_err(|error| parse_error(error.to_string()))?
    };
    match value {
        serde_json::Value::Object(map) => Ok(map),
        serde_json::Value::Null => Ok(serde_json::Map::new()),
        _ => Err(parse_error("expected a table of settings".into())),
    }
}

fn scalar(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(text) => Some(text.clone()),
        serde_json::Value::Number(number) => Some(number.to_string()),
        serde_json::Value::Bool(flag) => Some(flag.to_string()),
        _ => None,
    }
}

/// The file's settings as flags, leaving out those the command line or environment set.
fn file_flags(
    path: &Path,
    file: serde_json::Map<String, serde_json::Value>,
    given: &clap::ArgMatches,
) -> Result<Vec<OsString>, ConfigError> {
    let command = Cli::command();
    let mut flags = Vec::new();
    for (key, value) in file {
        let long = key.replace('_', "-");
        let arg = command
            .get_arguments()
            .find(|arg| arg.get_long() == Some(long.as_str()) && long != "config")
            .ok_or_else(|| ConfigError::UnknownKey {
                path: path.to_path_buf(),
                key: key.clone(),
            })?;
        if matches!(
            given.value_source(arg.get_id().as_str()),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        let bad_value = || ConfigError::BadValue {
            path: path.to_path_buf(),
            key: key.clone(),
        };
        let items = match &value {
            serde_json::Value::Array(items) => items.iter().collect(),
            single => vec![single],
        };
        for item in items {
            let text = scalar(item).ok_or_else(bad_value)?;
            if matches!(arg.get_action(), ArgAction::SetTrue) {
                // A switch: present or not.
                if text == "true" {
                    flags.push(OsString::from(format!("--{long}")));
                }
            } else {
                flags.push(OsString::from(format!("--{long}={text}")));
            }
        }
    }
    Ok(flags)
}

/// Parses `argv` with the environment and the `--config` file it names.
pub fn parse(argv: Vec<OsString>) -> Result<Cli, ConfigError> {
    let given = Cli::command().try_get_matches_from(&argv)?;
    let mut cli = match given.get_one::<PathBuf>("config").cloned() {
        None => Cli::from_arg_matches(&given)?,
        Some(path) => {
            let file = read_config_file(&path)?;
            let mut merged: Vec<OsString> = argv.iter().take(1).cloned().collect();
            merged.extend(file_flags(&path, file, &given)?);
            merged.extend(argv.into_iter().skip(1));
            Cli::try_parse_from(merged)?
        }
    };
    cli.capture.api_key_on_command_line =
        given.value_source("api_key") == Some(ValueSource::CommandLine);
    if let Some(path) = &cli.capture.api_key_file {
        let key = std::fs::read_to_string(path).map_err(|source| ConfigError::ApiKeyFile {
            path: path.clone(),
            source,
        })?;
        let key = key.trim();
        if key.is_empty() {
            return Err(ConfigError::EmptyApiKeyFile(path.clone()));
        }
        cli.capture.api_key = Some(key.to_owned());
    }
    Ok(cli)
}

impl CaptureArgs {
    /// The settings as a TOML config file, secrets masked.
    pub fn to_toml(&self) -> String {
        let mut value = serde_json::to_value(self).expect("settings serialize to JSON");
        if let serde_json::Value::Object(map) = &mut value {
            map.retain(|_, value| !value.is_null());
        }
        toml::to_string(&value).expect("a JSON object without nulls is valid TOML")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config file removed when dropped.
    struct ConfigFile(PathBuf);

    impl ConfigFile {
        fn new(extension: &str, text: &str) -> Self {
            let path = std::env::temp_dir()
                .join(format!("apitoolkit-config-{}.{extension}", Uuid::new_v4()));
            std::fs::write(&path, text).unwrap();
            Self(path)
        }

        fn path(&self) -> &str {
            self.0.to_str().unwrap()
        }
    }

    impl Drop for ConfigFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn parse_args(args: &[&str]) -> Result<CaptureArgs, ConfigError> {
        let argv = std::iter::once("apitoolkit-agent")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect();
        parse(argv).map(|cli| cli.capture)
    }

    #[test]
    fn flags_override_the_file_and_the_file_fills_the_rest() {
        let file = ConfigFile::new(
            "toml",
            "pid = [10, 11]\ntopic = \"from-file\"\nredact_header = [\"Authorization\", \"Cookie\"]\n\
             debug = true\ncapture-outgoing = false\nmax-body-bytes = 2048\n",
        );
        let args = parse_args(&["--config", file.path(), "--topic", "from-flag"]).unwrap();
        assert_eq!(args.pids, vec![10, 11]);
        assert_eq!(args.topic.as_deref(), Some("from-flag"));
        assert_eq!(args.redact_headers, vec!["Authorization", "Cookie"]);
        assert!(args.debug);
        assert!(!args.capture_outgoing);
        assert_eq!(args.max_body_bytes, 2048);
    }

    #[test]
    fn yaml_files_work_and_unknown_keys_are_errors() {
        let file = ConfigFile::new("yaml", "tag: [\"env:prod\"]\nservice-version: \"1.2\"\n");
        let args = parse_args(&["--config", file.path()]).unwrap();
        assert_eq!(args.tags, vec!["env:prod"]);
        assert_eq!(args.service_version.as_deref(), Some("1.2"));

        let bad = ConfigFile::new("toml", "pids = [1]\n");
        let error = parse_args(&["--config", bad.path()]).unwrap_err();
        assert!(
            error.to_string().contains("unknown key \"pids\""),
            "{error}"
        );
        assert!(matches!(
            parse_args(&["--config", "/nonexistent/agent.toml"]),
            Err(ConfigError::Read { .. })
        ));
        assert!(Path::new(file.path()).exists());
    }

    #[test]
    fn printed_settings_mask_secrets_and_read_back() {
        let args = parse_args(&[
            "--pid",
            "7",
            "--api-key",
            "secret-key",
            "--tag",
            "a",
            "--output",
            "both",
        ])
        .unwrap();
        let printed = args.to_toml();
        assert!(printed.contains("api-key = \"****\""), "{printed}");
        assert!(!printed.contains("secret-key"));
        let file = ConfigFile::new("toml", &printed.replace("api-key = \"****\"\n", ""));
        let reread = parse_args(&["--config", file.path()]).unwrap();
        assert_eq!(reread.pids, vec![7]);
        assert_eq!(reread.tags, vec!["a"]);
        assert_eq!(reread.output, vec![Output::Both]);
        assert_eq!(reread.api_key, None);
    }

    #[test]
    fn outputs_combine_and_otlp_flags_are_checked() {
        let args = parse_args(&[
            "--output",
            "pubsub,otlp",
            "--otlp-endpoint",
            "https://collector.example:4317",
            "--otlp-header",
            "Authorization=Bearer t0ken",
        ])
        .unwrap();
        assert_eq!(
            args.outputs(),
            Outputs {
                stdout: false,
                pubsub: true,
                otlp: true
            }
        );
        assert_eq!(
            args.otlp_headers,
            [HeaderArg {
                name: "Authorization".into(),
                value: "Bearer t0ken".into()
            }]
        );
        let printed = args.to_toml();
        assert!(printed.contains("Authorization=****"), "{printed}");
        assert!(!printed.contains("t0ken"));
        assert!(printed.contains("otlp-endpoint = \"https://collector.example:4317/\""));
        let endpoint_only =
            parse_args(&["--otlp-endpoint", "http://localhost:4318", "--api-key", "k"]).unwrap();
        assert!(endpoint_only.outputs().otlp && !endpoint_only.outputs().pubsub);
        for bad in ["localhost:4317", "ftp://host", "http://"] {
            let error = parse_args(&["--otlp-endpoint", bad]).unwrap_err();
            assert!(
                error.to_string().contains("otlp-endpoint"),
                "{bad}: {error}"
            );
        }
        assert!(parse_args(&["--otlp-header", "novalue"]).is_err());
    }

    #[test]
    fn the_api_key_comes_from_a_file_and_only_a_flag_is_flagged_as_visible() {
        let file = ConfigFile::new("key", "  secret-from-file\n");
        let from_file = parse_args(&["--pid", "7", "--api-key-file", file.path()]).unwrap();
        assert_eq!(from_file.api_key.as_deref(), Some("secret-from-file"));
        assert!(!from_file.api_key_on_command_line);
        let from_flag = parse_args(&["--pid", "7", "--api-key", "k"]).unwrap();
        assert!(from_flag.api_key_on_command_line);
        let empty = ConfigFile::new("key", "\n");
        assert!(matches!(
            parse_args(&["--pid", "7", "--api-key-file", empty.path()]),
            Err(ConfigError::EmptyApiKeyFile(_))
        ));
        assert!(matches!(
            parse_args(&["--api-key-file", "/nonexistent/key"]),
            Err(ConfigError::ApiKeyFile { .. })
        ));
        assert!(parse_args(&["--api-key", "k", "--api-key-file", file.path()]).is_err());
    }
}
