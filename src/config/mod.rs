//! coldgate's configuration file: the TOML schema, its defaults and its checks.
//!
//! [`parse`] works in four stages and stops after the first stage that finds a problem:
//!
//! 1. TOML syntax. The toml parser stops at the first syntax error, so this stage reports
//!    one diagnostic.
//! 2. Unknown keys, in every table. This stage reports all of them.
//! 3. Value types, such as a number where a string belongs. The deserializer stops at the
//!    first mismatch, so this stage reports one diagnostic.
//! 4. Values: ranges, formats, required keys, duplicate names and routes, and limits that
//!    tie one table to another. This stage reports all of them.
//!
//! Every diagnostic carries the line and column of the offending key or value, the key
//! path, and a message that names the problem and its fix.

pub mod duration;
mod error;
mod raw;
mod validate;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use toml::de::DeTable;

pub use duration::{format_duration, parse_duration, DurationError};
pub use error::{ConfigError, Diagnostic};

use crate::keep_warm::KeepWarmSchedule;
use error::Diagnostics;
use raw::RawConfig;

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Config {
    pub server: ServerConfig,
    pub log: LogConfig,
    /// The `[defaults]` table, with built-in values for keys it leaves out. Each service's
    /// `settings` already include these.
    pub defaults: ServiceSettings,
    /// The `[[service]]` entries in file order. May be empty.
    pub services: Vec<ServiceConfig>,
    /// The `[kubernetes]` table, with built-in values for keys it leaves out. It is
    /// accepted even when no service has a `[service.kubernetes]` table.
    pub kubernetes: KubernetesConfig,
    /// The `[openai]` table: routing of OpenAI-style requests by their `model` field.
    pub openai: Option<OpenAiConfig>,
}

/// Routing of OpenAI-compatible requests by the JSON body's `model` field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenAiConfig {
    /// Host names on which `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`
    /// and `/v1/models` are answered by model routing. Lowercased, without ports.
    pub hosts: Vec<String>,
    /// How many bytes of a request body coldgate reads at most to find `model`.
    pub max_body_prefix: usize,
}

/// Default `max_body_prefix`.
pub const DEFAULT_OPENAI_BODY_PREFIX: usize = 1024 * 1024;
/// Largest `max_body_prefix`. coldgate hands the request head and the bytes it scanned to
/// pingora 0.9 as one prefix, which must fit pingora's maximum request head size (1 MiB - 1),
/// so at most 1 MiB minus the head's size is scanned whatever this is set to.
pub const MAX_OPENAI_BODY_PREFIX: usize = 1024 * 1024;

/// The `[server]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Address of the proxy port that clients send inference requests to.
    pub listen: SocketAddr,
    /// Address of the admin port that serves /metrics, /healthz, /readyz, /status, the
    /// status page and the admin actions.
    pub admin_listen: SocketAddr,
    /// Maximum number of requests held across all services, at least 1.
    pub max_total_queued: usize,
    /// Time between /readyz starting to fail and the listener closing on shutdown.
    pub drain_delay: Duration,
    /// Time that held and in-flight requests get to finish on shutdown.
    pub shutdown_grace: Duration,
    /// Number of proxy worker threads, or 0 for one per CPU.
    pub threads: usize,
    /// TLS on the data listener (`[server.tls]`); plain HTTP when absent.
    pub tls: Option<TlsConfig>,
    /// Bearer token for admin actions such as warming a service, written inline. At least
    /// 16 characters. `admin_token_file` wins when both are set.
    pub admin_token: Option<Secret>,
    /// File whose content (without surrounding whitespace) is the admin token, read once at
    /// start-up. Not empty.
    pub admin_token_file: Option<PathBuf>,
}

/// A string that must not appear in logs: `Debug` prints a placeholder instead.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Secret(value)
    }

    /// Returns the secret itself, for comparison.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("Secret(..)")
    }
}

/// Minimum length of an admin token, so that a guessable word is rejected.
pub const MIN_ADMIN_TOKEN_LEN: usize = 16;

/// Certificate and key for TLS termination on the data listener. coldgate reloads both
/// when either file changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// PEM file with the certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

impl Default for ServerConfig {
    fn default() -> Self {
        // Loopback by default, so that a new install exposes nothing to the network until
        // the operator chooses an address.
        let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
        ServerConfig {
            listen: SocketAddr::new(loopback, 8080),
            admin_listen: SocketAddr::new(loopback, 9090),
            max_total_queued: 10_000,
            drain_delay: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(60),
            threads: 0,
            tls: None,
            admin_token: None,
            admin_token_file: None,
        }
    }
}

/// The `[log]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing_subscriber::EnvFilter` directive string such as "info,coldgate=debug".
    /// Stored as written, so the caller checks its syntax.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            filter: "info".to_owned(),
        }
    }
}

/// Output format of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines, written as `format = "text"`.
    #[default]
    Text,
    /// One JSON object per line, written as `format = "json"`.
    Json,
}

/// Per-service settings: the `[defaults]` table, which each `[[service]]` may override key
/// by key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSettings {
    /// Time a request may be held while the service starts before it gets a 504. Above 0.
    pub queue_timeout: Duration,
    /// Maximum number of requests held for this service, at least 1.
    pub max_queued_requests: usize,
    /// Time with nothing in flight or queued after which the service scales to zero. Above 0.
    pub idle_timeout: Duration,
    /// Maximum number of requests in flight to one instance, or 0 for no limit.
    pub max_concurrency_per_endpoint: usize,
    /// Time an instance may take to become ready before the start counts as failed. Above 0.
    pub startup_timeout: Duration,
    /// Time between readiness probes while an instance starts, from 1ms to 10s.
    pub probe_interval: Duration,
    /// Timeout of one readiness probe. Above 0.
    pub probe_timeout: Duration,
    /// Timeout of a TCP connect to an instance. Above 0.
    pub connect_timeout: Duration,
    /// Weekly windows during which the service is started ahead of traffic and not scaled
    /// to zero. Empty by default.
    pub keep_warm: KeepWarmSchedule,
}

impl Default for ServiceSettings {
    fn default() -> Self {
        ServiceSettings {
            queue_timeout: Duration::from_secs(5 * 60),
            max_queued_requests: 1000,
            idle_timeout: Duration::from_secs(10 * 60),
            max_concurrency_per_endpoint: 0,
            startup_timeout: Duration::from_secs(10 * 60),
            probe_interval: Duration::from_millis(10),
            probe_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(2),
            keep_warm: KeepWarmSchedule::default(),
        }
    }
}

/// One `[[service]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    /// Unique name: 1 to 63 characters of `a-z`, `0-9` and `-`, starting and ending with a
    /// letter or digit, because it is used as a metric label.
    pub name: String,
    /// Host names that route to this service, lowercased, without ports. Never empty.
    pub hosts: Vec<String>,
    /// Path prefix that routes to this service. Starts with "/" and defaults to "/".
    pub path_prefix: String,
    /// Path of the readiness probe. Starts with "/" and defaults to "/".
    pub readiness_path: String,
    /// How coldgate talks to the instances.
    pub protocol: UpstreamProtocol,
    /// How coldgate decides that a new instance is ready.
    pub readiness_probe: ReadinessProbe,
    /// OpenAI model names routed to this service on the `[openai]` hosts.
    pub models: Vec<String>,
    /// The `[defaults]` values with this service's overrides applied.
    pub settings: ServiceSettings,
    pub backend: Backend,
}

/// How a starting instance is probed (`readiness_probe` in `[[service]]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadinessProbe {
    /// `GET readiness_path`, over HTTP/1.1 or, for `protocol = "h2c"`, HTTP/2; 2xx is ready.
    #[default]
    Http,
    /// The standard gRPC health check (`grpc.health.v1.Health/Check` for the whole
    /// server) over h2c; SERVING is ready. For gRPC-only servers.
    Grpc,
}

/// The protocol between coldgate and a service's instances (`protocol` in `[[service]]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamProtocol {
    /// HTTP/1.1, the default. WebSocket upgrades need it.
    #[default]
    Http1,
    /// Cleartext HTTP/2 with prior knowledge, for gRPC servers such as Triton or KServe's
    /// gRPC port.
    H2c,
}

/// Mechanism that starts and stops a service's instances. Each variant is one table under
/// `[[service]]`, and a service has exactly one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// `[service.process]`: a local child process.
    Process(ProcessConfig),
    /// `[service.kubernetes]`: a Deployment scaled between 0 and its `replicas`.
    Kubernetes(KubernetesServiceConfig),
}

/// The `[service.process]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessConfig {
    /// Program to run, as a path or a bare name to look up in PATH. Not empty.
    pub command: String,
    /// Arguments as written. This module leaves "{port}" placeholders for the caller to replace.
    pub args: Vec<String>,
    /// Environment variables added to the child's environment.
    pub env: BTreeMap<String, String>,
    /// Working directory of the child, or coldgate's own when `None`.
    pub working_dir: Option<PathBuf>,
    /// Time between the stop signal and a forced kill.
    pub stop_grace: Duration,
}

/// Default of `ProcessConfig::stop_grace`.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);

/// The `[kubernetes]` table: access to the cluster, and the Leases that coldgate replicas
/// share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesConfig {
    /// Kubeconfig file to read. `None` leaves the choice to the caller: the in-cluster
    /// config, or the KUBECONFIG and ~/.kube/config lookup outside a cluster.
    pub kubeconfig: Option<PathBuf>,
    /// Namespace of the services that do not set their own, a DNS-1123 label. `None` leaves
    /// it to the caller, such as the client configuration's default namespace.
    pub namespace: Option<String>,
    /// Namespace of coldgate's Leases, a DNS-1123 label: the value written, else
    /// `namespace`. `None` when neither is written.
    pub lease_namespace: Option<String>,
    /// Name of the Lease used to elect a leader among coldgate replicas, a DNS-1123
    /// subdomain.
    pub leader_lease: String,
    /// Time a Lease stays held without renewal, from 2s to 5m.
    pub lease_duration: Duration,
    /// Time between writes of a replica's request activity to the cluster, from 100ms to
    /// 5m. Other replicas see activity up to this late, so the idle_timeout of every
    /// service with a `[service.kubernetes]` table is longer.
    pub activity_interval: Duration,
    /// Name of this replica in Leases: not empty, without whitespace or control characters.
    /// `None` leaves it to the caller, which uses the POD_NAME environment variable, then
    /// the host name.
    pub identity: Option<String>,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            kubeconfig: None,
            namespace: None,
            lease_namespace: None,
            leader_lease: "coldgate-leader".to_owned(),
            lease_duration: Duration::from_secs(15),
            activity_interval: Duration::from_secs(10),
            identity: None,
        }
    }
}

/// The `[service.kubernetes]` table: the Deployment that runs a service's pods, and the
/// Kubernetes Service whose EndpointSlices list the ready ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesServiceConfig {
    /// Namespace of the Deployment and the Service, a DNS-1123 label: the value written,
    /// else `[kubernetes] namespace`. `None` when neither is written.
    pub namespace: Option<String>,
    /// Name of the Deployment to scale, a DNS-1123 subdomain.
    pub deployment: String,
    /// Name of the Kubernetes Service, a DNS-1035 label as Kubernetes requires for Service
    /// names. Its EndpointSlices carry the label `kubernetes.io/service-name=<service>`.
    pub service: String,
    /// Port on the pods that requests go to.
    pub port: PortRef,
    /// Number of replicas requested when the service scales up from zero. From 1 to
    /// 2147483647, the int32 maximum of a Deployment's replicas.
    pub replicas: u32,
}

/// A port of a Kubernetes service, written as a number or as a port name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortRef {
    /// A port number from 1 to 65535.
    Number(u16),
    /// The name of a port in the Service's EndpointSlices, an IANA_SVC_NAME: 1 to 15
    /// characters of a-z, 0-9 and '-', with at least one letter.
    Name(String),
}

impl fmt::Display for PortRef {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortRef::Number(number) => write!(formatter, "{number}"),
            PortRef::Name(name) => formatter.write_str(name),
        }
    }
}

/// Parses and checks a configuration document. `source` names the document in diagnostics,
/// usually the file name.
///
/// Returns every problem of the first failing stage (see the module documentation), each
/// with its line and column. A document without services is valid here, and the caller
/// decides whether that is an error.
pub fn parse(text: &str, source: &str) -> Result<Config, ConfigError> {
    let mut diagnostics = Diagnostics::new(source, text);

    let document = match DeTable::parse(text) {
        Ok(document) => document,
        Err(error) => {
            report_syntax_error(text, &error, &mut diagnostics);
            return Err(diagnostics.into_error());
        }
    };

    raw::check_unknown_keys(document.get_ref(), &mut diagnostics);
    if !diagnostics.is_empty() {
        return Err(diagnostics.into_error());
    }

    let deserializer = toml::de::Deserializer::from(document.clone());
    let raw = match RawConfig::deserialize(deserializer) {
        Ok(raw) => raw,
        Err(error) => {
            report_type_error(document.get_ref(), &error, &mut diagnostics);
            return Err(diagnostics.into_error());
        }
    };

    let config = validate::build(raw, &mut diagnostics);
    if !diagnostics.is_empty() {
        return Err(diagnostics.into_error());
    }
    Ok(config)
}

/// Reads and parses a configuration file. Diagnostics name the file by `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source: Arc::new(source),
    })?;
    parse(&text, &path.display().to_string())
}

fn report_syntax_error(text: &str, error: &toml::de::Error, diagnostics: &mut Diagnostics<'_>) {
    let mut span = error.span().unwrap_or(0..0);
    let key = error::guess_syntax_error_key(text, span.start);

    let message = if error.message() == "duplicate key" {
        "duplicate key; a key may appear once per table, so remove or rename one of them".to_owned()
    } else if let Some(value_start) = unquoted_value_start(text, span.start) {
        // toml points inside the value, where parsing it as a number or date failed, but
        // the fix goes at its start.
        span.start = value_start;
        format!(
            "invalid TOML: {}; if this value is a string, put it in double quotes",
            error.message()
        )
    } else {
        format!("invalid TOML: {}", error.message())
    };
    diagnostics.push(span, None, key, message);
}

/// Returns the start of the value when the syntax error at `offset` lies in a bare word
/// right of `=`, such as `listen = 0.0.0.0:8080` or `format = json`, which is most often a
/// string without quotes.
fn unquoted_value_start(text: &str, offset: usize) -> Option<usize> {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |newline| newline + 1);
    let equals = line_start + text[line_start..offset].find('=')?;
    let after_equals = &text[equals + 1..];
    let value_start =
        equals + 1 + (after_equals.len() - after_equals.trim_start_matches([' ', '\t']).len());

    if value_start > offset {
        return None;
    }

    let first = text[value_start..].chars().next()?;
    let bare_word = text[value_start..offset]
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || ".:-_+".contains(c));
    (first.is_ascii_alphanumeric() && bare_word).then_some(value_start)
}

fn report_type_error(
    root: &DeTable<'_>,
    error: &toml::de::Error,
    diagnostics: &mut Diagnostics<'_>,
) {
    let span = error.span().unwrap_or(0..0);
    let (service, key) = error::locate(root, &span);

    // serde words types after Rust; TOML calls them arrays and tables.
    let mut message = error
        .message()
        .replace("expected a sequence", "expected an array")
        .replace("expected a map", "expected a table");
    if service.is_none() && key == "service" {
        message.push_str("; write each service as a [[service]] table, with double brackets");
    }
    diagnostics.push(span, service.as_ref(), key, message);
}
