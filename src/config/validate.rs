//! Turns the raw schema into [`Config`]: applies defaults and checks every value.

mod kubernetes;

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use toml::Spanned;

use super::duration::format_duration;
use super::error::{key_segment, Diagnostics, ServiceContext};
use super::raw::{
    Count, DurationValue, RawConfig, RawOpenAi, RawTls, RawLog, RawProcess, RawServer, RawService,
    RawServiceKubernetes, RawSettings,
};
use super::{
    Backend, Config, KubernetesConfig, OpenAiConfig, DEFAULT_OPENAI_BODY_PREFIX, MAX_OPENAI_BODY_PREFIX, LogConfig, LogFormat, ProcessConfig, Secret, ServerConfig,
    ServiceConfig, ReadinessProbe, ServiceSettings, TlsConfig, UpstreamProtocol, DEFAULT_STOP_GRACE,
    MIN_ADMIN_TOKEN_LEN,
};
use crate::keep_warm::{KeepWarmSchedule, KeepWarmWindow};

const MAX_NAME_LEN: usize = 63;
const MAX_HOST_LEN: usize = 253;
const MAX_HOST_LABEL_LEN: usize = 63;
const MIN_PROBE_INTERVAL: Duration = Duration::from_millis(1);
const MAX_PROBE_INTERVAL: Duration = Duration::from_secs(10);

/// Builds the configuration and adds a diagnostic for every invalid value. The returned
/// value is meaningful only when no diagnostic was added.
pub(super) fn build(raw: RawConfig, diagnostics: &mut Diagnostics<'_>) -> Config {
    let server = build_server(raw.server, diagnostics);
    let log = build_log(raw.log, diagnostics);

    let raw_defaults = raw.defaults.unwrap_or_default();
    let defaults_idle_span = raw_defaults.idle_timeout.as_ref().map(Spanned::span);
    let mut checker = Checker {
        diagnostics,
        service: None,
        key_prefix: "defaults.",
    };
    let defaults = apply_settings(&ServiceSettings::default(), raw_defaults, &mut checker);

    let cluster = kubernetes::build_cluster(raw.kubernetes, diagnostics);
    let services = build_services(
        raw.service.unwrap_or_default(),
        &defaults,
        defaults_idle_span,
        &cluster,
        diagnostics,
    );
    let openai = raw.openai.map(|table| build_openai(table, &services, diagnostics));
    Config {
        server,
        log,
        defaults,
        services,
        kubernetes: cluster.config,
        openai,
    }
}

fn build_openai(raw: Spanned<RawOpenAi>, services: &[ServiceConfig], diagnostics: &mut Diagnostics<'_>) -> OpenAiConfig {
    let header = raw.span();
    let raw = raw.into_inner();
    let mut checker = Checker { diagnostics, service: None, key_prefix: "openai." };
    let mut hosts = Vec::new();
    match &raw.hosts {
        None => checker.error(
            header.clone(),
            "hosts",
            "missing required key; add hosts = [\"...\"] with the host names that clients use for OpenAI-style requests".to_owned(),
        ),
        Some(list) if list.get_ref().is_empty() => {
            checker.error(list.span(), "hosts", "empty list; add at least one host name".to_owned())
        }
        Some(list) => {
            for host in list.get_ref() {
                match normalize_host(host.get_ref()) {
                    Ok(normalized) => hosts.push(normalized),
                    Err(message) => checker.error(host.span(), "hosts", message),
                }
            }
        }
    }
    let max_body_prefix = checker.count(raw.max_body_prefix.clone(), "max_body_prefix", DEFAULT_OPENAI_BODY_PREFIX, 1);
    if let Some(value) = &raw.max_body_prefix {
        if max_body_prefix > MAX_OPENAI_BODY_PREFIX {
            checker.error(
                value.span(),
                "max_body_prefix",
                format!(
                    "{max_body_prefix} bytes is more than coldgate can replay to the instance: the head and the scanned bytes must fit pingora's request head buffer of 1 MiB; use at most {MAX_OPENAI_BODY_PREFIX}"
                ),
            );
        }
    }
    if !services.iter().any(|s| !s.models.is_empty()) {
        checker.error(header, "openai", "no [[service]] lists models = [...]; add the model names each service serves".to_owned());
    }
    OpenAiConfig { hosts, max_body_prefix: max_body_prefix.min(MAX_OPENAI_BODY_PREFIX) }
}

#[derive(Clone, Copy)]
enum DurationRange {
    Any,
    Positive,
    Between(Duration, Duration),
}

/// Adds diagnostics for the keys of one table.
struct Checker<'d, 'a> {
    diagnostics: &'d mut Diagnostics<'a>,
    service: Option<ServiceContext>,
    /// Prepended to key names: the table's path, such as "server." or "process.".
    key_prefix: &'static str,
}

impl Checker<'_, '_> {
    fn error(&mut self, span: Range<usize>, key: &str, message: String) {
        let key = format!("{}{}", self.key_prefix, key);
        self.diagnostics
            .push(span, self.service.as_ref(), key, message);
    }

    /// Returns the duration, or `default` when the key is absent. A value outside `range`
    /// is reported and replaced by `default`.
    fn duration(
        &mut self,
        value: Option<Spanned<DurationValue>>,
        key: &str,
        default: Duration,
        range: DurationRange,
    ) -> Duration {
        let Some(value) = value else {
            return default;
        };
        let duration = value.get_ref().0;
        let text = format_duration(duration);
        let reason = match range {
            DurationRange::Any => return duration,
            DurationRange::Positive if duration.is_zero() => {
                format!(
                    "must be greater than 0, such as {:?}",
                    format_duration(default)
                )
            }
            DurationRange::Between(min, max) if duration < min || duration > max => {
                format!(
                    "must be from {} to {}",
                    format_duration(min),
                    format_duration(max)
                )
            }
            _ => return duration,
        };
        self.error(
            value.span(),
            key,
            format!("invalid duration {text:?}: {reason}"),
        );
        default
    }

    /// Returns the count, or `default` when the key is absent. A value below `min` is
    /// reported and replaced by `default`.
    fn count(
        &mut self,
        value: Option<Spanned<Count>>,
        key: &str,
        default: usize,
        min: u64,
    ) -> usize {
        let Some(value) = value else {
            return default;
        };
        let count = value.get_ref().0;
        if count < min {
            let message =
                format!("invalid value {count}: must be at least {min}, such as {default}");
            self.error(value.span(), key, message);
            return default;
        }
        match usize::try_from(count) {
            Ok(count) => count,
            Err(_) => {
                let message = format!("invalid value {count}: too large for this platform");
                self.error(value.span(), key, message);
                default
            }
        }
    }

    fn socket_addr(&mut self, value: &Spanned<String>, key: &str) -> Option<SocketAddr> {
        match value.get_ref().parse() {
            Ok(address) => Some(address),
            Err(_) => {
                let message = format!(
                    "invalid socket address {:?}: expected an IP address and a port, such as \"127.0.0.1:8080\" or \"[::1]:8080\" (host names are not accepted)",
                    value.get_ref()
                );
                self.error(value.span(), key, message);
                None
            }
        }
    }
}

fn build_server(raw: Option<RawServer>, diagnostics: &mut Diagnostics<'_>) -> ServerConfig {
    let defaults = ServerConfig::default();
    let Some(raw) = raw else {
        return defaults;
    };
    let mut checker = Checker {
        diagnostics,
        service: None,
        key_prefix: "server.",
    };

    let listen = raw
        .listen
        .as_ref()
        .and_then(|value| checker.socket_addr(value, "listen"))
        .unwrap_or(defaults.listen);
    let admin_listen = raw
        .admin_listen
        .as_ref()
        .and_then(|value| checker.socket_addr(value, "admin_listen"))
        .unwrap_or(defaults.admin_listen);

    // With port 0 the OS picks a free port, so two such addresses never collide.
    if listen == admin_listen && listen.port() != 0 {
        let message = format!(
            "admin_listen and listen are both {listen}; give the admin port its own address"
        );
        match (&raw.admin_listen, &raw.listen) {
            (Some(value), _) => checker.error(value.span(), "admin_listen", message),
            (None, Some(value)) => checker.error(value.span(), "listen", message),
            // Unreachable with the built-in defaults, which differ.
            (None, None) => {}
        }
    }

    ServerConfig {
        listen,
        admin_listen,
        max_total_queued: checker.count(
            raw.max_total_queued,
            "max_total_queued",
            defaults.max_total_queued,
            1,
        ),
        drain_delay: checker.duration(
            raw.drain_delay,
            "drain_delay",
            defaults.drain_delay,
            DurationRange::Any,
        ),
        shutdown_grace: checker.duration(
            raw.shutdown_grace,
            "shutdown_grace",
            defaults.shutdown_grace,
            DurationRange::Any,
        ),
        threads: checker.count(raw.threads, "threads", defaults.threads, 0),
        tls: raw.tls.and_then(|tls| build_tls(tls, &mut checker)),
        admin_token: raw.admin_token.and_then(|token| check_admin_token(token, &mut checker)),
        admin_token_file: raw.admin_token_file.and_then(|path| {
            if path.get_ref().trim().is_empty() {
                checker.error(
                    path.span(),
                    "admin_token_file",
                    "empty path; give the path of a file that contains the token, or remove the key".to_owned(),
                );
                return None;
            }
            Some(PathBuf::from(path.into_inner()))
        }),
    }
}

fn check_admin_token(token: Spanned<String>, checker: &mut Checker<'_, '_>) -> Option<Secret> {
    // The message never repeats the token, because diagnostics end up in logs.
    let length = token.get_ref().chars().count();
    let problem = if token.get_ref().trim() != token.get_ref() || token.get_ref().chars().any(char::is_control) {
        Some("contains leading or trailing whitespace or a control character; remove it".to_owned())
    } else if length < MIN_ADMIN_TOKEN_LEN {
        Some(format!(
            "too short ({length} characters); use at least {MIN_ADMIN_TOKEN_LEN}, such as the output of `openssl rand -hex 32`"
        ))
    } else {
        None
    };
    match problem {
        Some(problem) => {
            checker.error(token.span(), "admin_token", format!("invalid admin token: {problem}"));
            None
        }
        None => Some(Secret::new(token.into_inner())),
    }
}

/// Parses the `keep_warm` windows, reporting each invalid one at its own array element.
fn check_keep_warm(
    value: Option<Spanned<Vec<Spanned<String>>>>,
    base: &KeepWarmSchedule,
    checker: &mut Checker<'_, '_>,
) -> KeepWarmSchedule {
    let Some(value) = value else {
        return base.clone();
    };
    let mut windows = Vec::with_capacity(value.get_ref().len());
    for (index, text) in value.into_inner().into_iter().enumerate() {
        match KeepWarmWindow::parse(text.get_ref()) {
            Ok(window) => windows.push(window),
            Err(problem) => checker.error(
                text.span(),
                &format!("keep_warm[{index}]"),
                format!("invalid keep_warm window {:?}: {problem}", text.get_ref()),
            ),
        }
    }
    KeepWarmSchedule::new(windows)
}

fn build_tls(raw: Spanned<RawTls>, checker: &mut Checker<'_, '_>) -> Option<TlsConfig> {
    let header = raw.span();
    let raw = raw.into_inner();
    let mut file = |value: Option<Spanned<String>>, key: &str| match value {
        Some(value) if value.get_ref().trim().is_empty() => {
            checker.error(value.span(), &format!("tls.{key}"), "empty path; give the PEM file's path".to_owned());
            None
        }
        Some(value) => Some(PathBuf::from(value.into_inner())),
        None => {
            checker.error(
                header.clone(),
                &format!("tls.{key}"),
                format!("missing required key; [server.tls] needs {key} = \"/path/to/file.pem\""),
            );
            None
        }
    };
    let cert_file = file(raw.cert_file, "cert_file");
    let key_file = file(raw.key_file, "key_file");
    Some(TlsConfig { cert_file: cert_file?, key_file: key_file? })
}

fn build_log(raw: Option<RawLog>, diagnostics: &mut Diagnostics<'_>) -> LogConfig {
    let defaults = LogConfig::default();
    let Some(raw) = raw else {
        return defaults;
    };

    let format = match raw.format {
        None => defaults.format,
        Some(value) => match value.get_ref().as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                let message =
                    format!("invalid log format {other:?}: expected \"text\" or \"json\"");
                diagnostics.push(value.span(), None, "log.format", message);
                defaults.format
            }
        },
    };

    let filter = match raw.filter {
        None => defaults.filter,
        Some(value) => {
            // Checked here because tracing would otherwise fall back to "info" silently.
            if let Err(error) = tracing_subscriber::EnvFilter::try_new(value.get_ref()) {
                let message = format!(
                    "invalid filter {:?}: {error}; use directives such as \"info\" or \"info,coldgate=debug\"",
                    value.get_ref()
                );
                diagnostics.push(value.span(), None, "log.filter", message);
            }
            value.into_inner()
        }
    };

    LogConfig { format, filter }
}

/// Returns `base` with the keys present in `raw` replaced, checking each present value.
fn apply_settings(
    base: &ServiceSettings,
    raw: RawSettings,
    checker: &mut Checker<'_, '_>,
) -> ServiceSettings {
    ServiceSettings {
        queue_timeout: checker.duration(
            raw.queue_timeout,
            "queue_timeout",
            base.queue_timeout,
            DurationRange::Positive,
        ),
        max_queued_requests: checker.count(
            raw.max_queued_requests,
            "max_queued_requests",
            base.max_queued_requests,
            1,
        ),
        idle_timeout: checker.duration(
            raw.idle_timeout,
            "idle_timeout",
            base.idle_timeout,
            DurationRange::Positive,
        ),
        max_concurrency_per_endpoint: checker.count(
            raw.max_concurrency_per_endpoint,
            "max_concurrency_per_endpoint",
            base.max_concurrency_per_endpoint,
            0,
        ),
        startup_timeout: checker.duration(
            raw.startup_timeout,
            "startup_timeout",
            base.startup_timeout,
            DurationRange::Positive,
        ),
        probe_interval: checker.duration(
            raw.probe_interval,
            "probe_interval",
            base.probe_interval,
            DurationRange::Between(MIN_PROBE_INTERVAL, MAX_PROBE_INTERVAL),
        ),
        probe_timeout: checker.duration(
            raw.probe_timeout,
            "probe_timeout",
            base.probe_timeout,
            DurationRange::Positive,
        ),
        connect_timeout: checker.duration(
            raw.connect_timeout,
            "connect_timeout",
            base.connect_timeout,
            DurationRange::Positive,
        ),
        keep_warm: check_keep_warm(raw.keep_warm, &base.keep_warm, checker),
    }
}

/// A (host, path_prefix) pair already claimed by a service.
struct RouteOwner {
    service_index: usize,
    service_label: String,
    line: usize,
}

/// Builds the `[[service]]` entries. `defaults_idle_span` locates `[defaults]
/// idle_timeout` when the file sets it.
fn build_services(
    entries: Vec<Spanned<RawService>>,
    defaults: &ServiceSettings,
    defaults_idle_span: Option<Range<usize>>,
    cluster: &kubernetes::ClusterSettings,
    diagnostics: &mut Diagnostics<'_>,
) -> Vec<ServiceConfig> {
    // Name to the line of its first use.
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut routes: HashMap<(String, String), RouteOwner> = HashMap::new();
    let mut model_owners: HashMap<String, String> = HashMap::new();
    let mut services = Vec::with_capacity(entries.len());
    // Services with [service.kubernetes] whose idle_timeout, inherited from [defaults], is
    // too short. They get one diagnostic together at [defaults] idle_timeout.
    let mut short_default_idle: Vec<String> = Vec::new();

    for (index, entry) in entries.into_iter().enumerate() {
        let header_span = entry.span();
        let raw = entry.into_inner();
        let service = ServiceContext {
            index,
            name: raw.name.as_ref().map(|name| name.get_ref().clone()),
        };
        let service_label = match &service.name {
            Some(name) => format!("service {name:?}"),
            None => format!("service #{}", index + 1),
        };
        let mut checker = Checker {
            diagnostics: &mut *diagnostics,
            service: Some(service),
            key_prefix: "",
        };

        let name = check_service_name(&raw, &header_span, &mut names, &mut checker);
        let path_prefix = match &raw.path_prefix {
            Some(value) => check_path(value, "path_prefix", false, &mut checker),
            None => "/".to_owned(),
        };
        let readiness_path = match &raw.readiness_path {
            Some(value) => check_path(value, "readiness_path", true, &mut checker),
            None => "/".to_owned(),
        };
        let hosts = check_hosts(&raw, &header_span, &mut checker);
        let protocol = match &raw.protocol {
            None => UpstreamProtocol::Http1,
            Some(value) => match value.get_ref().as_str() {
                "http1" => UpstreamProtocol::Http1,
                "h2c" => UpstreamProtocol::H2c,
                other => {
                    checker.error(
                        value.span(),
                        "protocol",
                        format!("invalid protocol {other:?}: expected \"http1\" or \"h2c\" (cleartext HTTP/2, for gRPC)"),
                    );
                    UpstreamProtocol::Http1
                }
            },
        };
        let readiness_probe = match &raw.readiness_probe {
            None => ReadinessProbe::Http,
            Some(value) => match value.get_ref().as_str() {
                "http" => ReadinessProbe::Http,
                "grpc" if protocol == UpstreamProtocol::H2c => ReadinessProbe::Grpc,
                "grpc" => {
                    checker.error(
                        value.span(),
                        "readiness_probe",
                        "the gRPC health probe needs protocol = \"h2c\"; add it to this service".to_owned(),
                    );
                    ReadinessProbe::Http
                }
                other => {
                    checker.error(
                        value.span(),
                        "readiness_probe",
                        format!("invalid readiness_probe {other:?}: expected \"http\" (GET readiness_path) or \"grpc\" (grpc.health.v1 Check)"),
                    );
                    ReadinessProbe::Http
                }
            },
        };
        let mut models: Vec<String> = Vec::new();
        if let Some(list) = &raw.models {
            if list.get_ref().is_empty() {
                checker.error(list.span(), "models", "empty list; add model names or remove the key".to_owned());
            }
            for model in list.get_ref() {
                let name = model.get_ref().trim();
                if name.is_empty() || name.len() > 256 || name.chars().any(char::is_control) {
                    checker.error(model.span(), "models", format!("invalid model name {:?}: expected 1 to 256 printable characters", model.get_ref()));
                } else if let Some(owner) = model_owners.get(name) {
                    checker.error(model.span(), "models", format!("model {name:?} is already served by {owner}; each model routes to one service"));
                } else {
                    model_owners.insert(name.to_owned(), service_label.clone());
                    models.push(name.to_owned());
                }
            }
        }

        for (host, span) in &hosts {
            let route = (host.clone(), path_prefix.clone());
            if let Some(owner) = routes.get(&route) {
                let message = if owner.service_index == index {
                    format!(
                        "host {host:?} is listed twice in this service (first at line {}); remove one",
                        owner.line
                    )
                } else {
                    format!(
                        "host {host:?} with path_prefix {path_prefix:?} is already routed to {} (line {}); give one of them a different host or path_prefix",
                        owner.service_label, owner.line
                    )
                };
                checker.error(span.clone(), "hosts", message);
            } else {
                let line = checker.diagnostics.line_of(span.start);
                routes.insert(
                    route,
                    RouteOwner {
                        service_index: index,
                        service_label: service_label.clone(),
                        line,
                    },
                );
            }
        }

        let settings = apply_settings(defaults, raw.overrides(), &mut checker);

        if raw.kubernetes.is_some() && raw.process.is_none() {
            let inherits_short = kubernetes::check_idle_timeout(
                raw.idle_timeout.as_ref(),
                settings.idle_timeout,
                defaults_idle_span.is_some(),
                &header_span,
                cluster,
                &mut checker,
            );
            if inherits_short {
                short_default_idle.push(service_label.clone());
            }
        }

        let backend = build_backend(
            raw.process,
            raw.kubernetes,
            &header_span,
            &cluster.config,
            &mut checker,
        );

        if let (Some(name), Some(backend)) = (name, backend) {
            services.push(ServiceConfig {
                name,
                hosts: hosts.into_iter().map(|(host, _)| host).collect(),
                path_prefix,
                readiness_path,
                protocol,
                readiness_probe,
                models: models.clone(),
                settings,
                backend,
            });
        }
    }

    if let Some(span) = defaults_idle_span {
        kubernetes::report_short_default_idle_timeout(
            &short_default_idle,
            defaults.idle_timeout,
            span,
            cluster,
            diagnostics,
        );
    }
    services
}

/// Builds the service's one backend table, reporting a missing table or a second one.
fn build_backend(
    process: Option<Spanned<RawProcess>>,
    kubernetes: Option<Spanned<RawServiceKubernetes>>,
    header_span: &Range<usize>,
    cluster: &KubernetesConfig,
    checker: &mut Checker<'_, '_>,
) -> Option<Backend> {
    match (process, kubernetes) {
        (Some(process), None) => build_process(process, checker).map(Backend::Process),
        (None, Some(table)) => {
            kubernetes::build_service(table, cluster, checker).map(Backend::Kubernetes)
        }
        (Some(process), Some(table)) => {
            let process_span = process.span();
            let kubernetes_span = table.span();
            // Check both tables, so that one run reports their mistakes too.
            build_process(process, checker);
            kubernetes::build_service(table, cluster, checker);

            // The later table is the extra one, whichever kind it is.
            if kubernetes_span.start > process_span.start {
                let first_line = checker.diagnostics.line_of(process_span.start);
                let message = second_backend_message("[service.process]", first_line);
                checker.error(kubernetes_span, "kubernetes", message);
            } else {
                let first_line = checker.diagnostics.line_of(kubernetes_span.start);
                let message = second_backend_message("[service.kubernetes]", first_line);
                checker.error(process_span, "process", message);
            }
            None
        }
        (None, None) => {
            checker.error(
                header_span.clone(),
                "process",
                "missing backend table; add [service.process] with command = \"...\" to run a local process, or [service.kubernetes] with deployment, service and port to scale a Kubernetes Deployment, after this [[service]] header".to_owned(),
            );
            None
        }
    }
}

fn second_backend_message(first_table: &str, first_line: usize) -> String {
    format!(
        "second backend table; this service already has {first_table} at line {first_line}, and a service has exactly one backend, so keep one of the two tables"
    )
}

fn check_service_name(
    raw: &RawService,
    header_span: &Range<usize>,
    names: &mut HashMap<String, usize>,
    checker: &mut Checker<'_, '_>,
) -> Option<String> {
    let Some(value) = &raw.name else {
        checker.error(
            header_span.clone(),
            "name",
            "missing required key; add name = \"...\" with 1 to 63 characters of a-z, 0-9 and '-'"
                .to_owned(),
        );
        return None;
    };
    let name = value.get_ref();

    if !is_dns1123_label(name) {
        let message = format!(
            "invalid service name {name:?}: use 1 to {MAX_NAME_LEN} characters of a-z, 0-9 and '-', starting and ending with a letter or digit, such as {:?}",
            suggest_service_name(name)
        );
        checker.error(value.span(), "name", message);
        return None;
    }

    if let Some(first_line) = names.get(name) {
        let message = format!(
            "duplicate service name {name:?}: the service at line {first_line} already uses it; service names must be unique"
        );
        checker.error(value.span(), "name", message);
        return None;
    }
    let line = checker.diagnostics.line_of(value.span().start);
    names.insert(name.clone(), line);
    Some(name.clone())
}

/// Tells whether `name` is a DNS-1123 label: 1 to 63 characters of `a-z`, `0-9` and `-`,
/// starting and ending with a letter or digit.
fn is_dns1123_label(name: &str) -> bool {
    let alphanumeric = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_NAME_LEN
        && bytes.iter().all(|&c| alphanumeric(c) || c == b'-')
        && alphanumeric(bytes[0])
        && alphanumeric(bytes[bytes.len() - 1])
}

/// Returns a valid name close to `name`, for the error message.
fn suggest_service_name(name: &str) -> String {
    let replaced: String = name
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(MAX_NAME_LEN)
        .collect();
    let trimmed = replaced.trim_matches('-');
    if trimmed.is_empty() {
        "my-model".to_owned()
    } else {
        trimmed.to_owned()
    }
}

/// Returns the lowercased hosts with their spans, leaving out invalid ones.
fn check_hosts(
    raw: &RawService,
    header_span: &Range<usize>,
    checker: &mut Checker<'_, '_>,
) -> Vec<(String, Range<usize>)> {
    let Some(value) = &raw.hosts else {
        if raw.models.is_some() {
            return Vec::new(); // Routed by model name on the [openai] hosts only.
        }
        checker.error(
            header_span.clone(),
            "hosts",
            "missing required key; add hosts = [\"...\"] with the host names that route to this service".to_owned(),
        );
        return Vec::new();
    };
    if value.get_ref().is_empty() {
        checker.error(
            value.span(),
            "hosts",
            "empty list; add at least one host name, such as hosts = [\"iris.models.local\"]"
                .to_owned(),
        );
        return Vec::new();
    }

    let mut hosts = Vec::with_capacity(value.get_ref().len());
    for host in value.get_ref() {
        match normalize_host(host.get_ref()) {
            Ok(normalized) => hosts.push((normalized, host.span())),
            Err(message) => checker.error(host.span(), "hosts", message),
        }
    }
    hosts
}

/// Returns the host lowercased, or a message saying what is wrong with it.
///
/// A host is a name of letters, digits, '-', '_' and dots, an IPv4 address, or an IPv6
/// address in brackets. Ports, schemes, paths, wildcards and whitespace are rejected.
fn normalize_host(host: &str) -> Result<String, String> {
    let invalid = |reason: &str| format!("invalid host {host:?}: {reason}");

    if host.is_empty() {
        return Err(
            "empty host; remove it or write a host name such as \"iris.models.local\"".to_owned(),
        );
    }
    if host.chars().any(char::is_whitespace) {
        return Err(invalid("contains whitespace; remove it"));
    }
    if let Some((scheme, _)) = host.split_once("://") {
        return Err(invalid(&format!(
            "remove the scheme \"{scheme}://\" and list the host name only"
        )));
    }
    if host.contains('/') {
        return Err(invalid(
            "remove the path and list the host name only; route by path with path_prefix",
        ));
    }
    if host.contains('*') {
        return Err(invalid("wildcards are not supported; list each host name"));
    }

    let host = host.to_ascii_lowercase();

    if let Some(inner) = host.strip_prefix('[') {
        return match inner.split_once(']') {
            Some((address, "")) if address.parse::<Ipv6Addr>().is_ok() => Ok(host),
            Some((_, rest)) if rest.starts_with(':') => Err(invalid(&format!(
                "remove the port \"{rest}\" and list the host only"
            ))),
            _ => Err(invalid(
                "expected an IPv6 address in brackets, such as \"[::1]\"",
            )),
        };
    }
    if let Some((_, port)) = host.rsplit_once(':') {
        return if host.matches(':').count() == 1 {
            Err(invalid(&format!(
                "remove the port \":{port}\" and list the host name only"
            )))
        } else {
            Err(invalid(
                "write an IPv6 address in brackets, such as \"[::1]\"",
            ))
        };
    }

    if let Some(bad) = host
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'))
    {
        return Err(invalid(&format!(
            "contains {bad:?}; a host name uses letters, digits, '-', '_' and '.'"
        )));
    }
    if host.len() > MAX_HOST_LEN {
        return Err(invalid(&format!("longer than {MAX_HOST_LEN} characters")));
    }
    if host.split('.').any(str::is_empty) {
        return Err(invalid(
            "empty label; remove the leading, trailing or doubled dot",
        ));
    }
    if host
        .split('.')
        .any(|label| label.len() > MAX_HOST_LABEL_LEN)
    {
        return Err(invalid(&format!(
            "a label between dots is longer than {MAX_HOST_LABEL_LEN} characters"
        )));
    }
    Ok(host)
}

/// Returns the path, or "/" after reporting why it is invalid. A readiness path may carry
/// a query string, a path prefix may not.
fn check_path(
    value: &Spanned<String>,
    key: &str,
    allow_query: bool,
    checker: &mut Checker<'_, '_>,
) -> String {
    let path = value.get_ref();
    let reason = if !path.starts_with('/') {
        Some(format!("must start with \"/\", such as \"/{path}\""))
    } else if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("contains whitespace or a control character; percent-encode it".to_owned())
    } else if path.contains('#') {
        Some("contains '#'; a fragment is never sent to the server, so remove it".to_owned())
    } else if !allow_query && path.contains('?') {
        Some("contains '?'; a path prefix matches the path only, so remove the query".to_owned())
    } else {
        None
    };

    match reason {
        Some(reason) => {
            checker.error(
                value.span(),
                key,
                format!("invalid {key} {path:?}: {reason}"),
            );
            "/".to_owned()
        }
        None => path.clone(),
    }
}

fn build_process(
    process: Spanned<RawProcess>,
    checker: &mut Checker<'_, '_>,
) -> Option<ProcessConfig> {
    let header_span = process.span();
    let raw = process.into_inner();
    let saved_prefix = checker.key_prefix;
    checker.key_prefix = "process.";

    let command = match &raw.command {
        None => {
            checker.error(
                header_span,
                "command",
                "missing required key; add command = \"...\" with the program to run".to_owned(),
            );
            None
        }
        Some(value) if value.get_ref().trim().is_empty() => {
            checker.error(
                value.span(),
                "command",
                "empty command; set the program to run, such as command = \"python3\"".to_owned(),
            );
            None
        }
        Some(value) => {
            reject_nul(value, "command", checker);
            Some(value.get_ref().clone())
        }
    };

    let args = raw.args.unwrap_or_default();
    for (index, arg) in args.iter().enumerate() {
        reject_nul(arg, &format!("args[{index}]"), checker);
    }

    let mut env = BTreeMap::new();
    for (name, value) in raw.env.unwrap_or_default() {
        let key = format!("env.{}", key_segment(name.get_ref()));
        if name.get_ref().is_empty() {
            checker.error(
                name.span(),
                &key,
                "empty environment variable name; remove it or give it a name".to_owned(),
            );
        } else if name.get_ref().contains('=') {
            checker.error(
                name.span(),
                &key,
                format!(
                    "invalid environment variable name {:?}: must not contain '='",
                    name.get_ref()
                ),
            );
        }
        reject_nul(&name, &key, checker);
        reject_nul(&value, &key, checker);
        env.insert(name.into_inner(), value.into_inner());
    }

    let working_dir = match raw.working_dir {
        Some(value) if value.get_ref().is_empty() => {
            checker.error(
                value.span(),
                "working_dir",
                "empty path; set a directory or remove the key to use coldgate's working directory"
                    .to_owned(),
            );
            None
        }
        Some(value) => {
            reject_nul(&value, "working_dir", checker);
            Some(PathBuf::from(value.into_inner()))
        }
        None => None,
    };

    let stop_grace = checker.duration(
        raw.stop_grace,
        "stop_grace",
        DEFAULT_STOP_GRACE,
        DurationRange::Any,
    );

    checker.key_prefix = saved_prefix;
    Some(ProcessConfig {
        command: command?,
        args: args.into_iter().map(Spanned::into_inner).collect(),
        env,
        working_dir,
        stop_grace,
    })
}

/// Reports a NUL character, which no program name, argument or environment entry can
/// contain.
fn reject_nul(value: &Spanned<String>, key: &str, checker: &mut Checker<'_, '_>) {
    if value.get_ref().contains('\0') {
        checker.error(
            value.span(),
            key,
            "contains a NUL character (\\u0000), which a process cannot receive; remove it"
                .to_owned(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_name_rules() {
        for valid in ["iris", "a", "llama-3-8b", "0model", &"a".repeat(63)] {
            assert!(is_dns1123_label(valid), "{valid:?} should be valid");
        }
        for invalid in [
            "",
            "Iris",
            "iris_1",
            "-iris",
            "iris-",
            "iris.v1",
            &"a".repeat(64),
        ] {
            assert!(!is_dns1123_label(invalid), "{invalid:?} should be invalid");
        }
        assert_eq!(suggest_service_name("Iris_Model"), "iris-model");
        assert_eq!(suggest_service_name("__"), "my-model");
    }

    #[test]
    fn host_rules() {
        assert_eq!(
            normalize_host("Iris.Models.LOCAL"),
            Ok("iris.models.local".to_owned())
        );
        assert_eq!(normalize_host("10.0.0.7"), Ok("10.0.0.7".to_owned()));
        assert_eq!(normalize_host("[::1]"), Ok("[::1]".to_owned()));
        assert_eq!(normalize_host("my_model"), Ok("my_model".to_owned()));

        for (host, expected) in [
            ("", "empty host"),
            ("a b", "whitespace"),
            ("http://iris", "scheme \"http://\""),
            ("iris/v1", "remove the path"),
            ("*.local", "wildcards"),
            ("iris:8080", "port \":8080\""),
            ("[::1]:8080", "port \":8080\""),
            ("::1", "in brackets"),
            ("[nope]", "in brackets"),
            ("iris!", "contains '!'"),
            ("iris..local", "empty label"),
            ("iris.", "empty label"),
        ] {
            let message = normalize_host(host).unwrap_err();
            assert!(message.contains(expected), "{host:?}: {message}");
        }
    }
}
