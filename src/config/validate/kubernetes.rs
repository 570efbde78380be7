//! Checks of the `[kubernetes]` table and of each `[service.kubernetes]` table, and the
//! Kubernetes name formats they use.

use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use toml::Spanned;

use super::super::duration::format_duration;
use super::super::error::Diagnostics;
use super::super::raw::{Count, DurationValue, PortValue, RawKubernetes, RawServiceKubernetes};
use super::super::{KubernetesConfig, KubernetesServiceConfig, PortRef};
use super::{is_dns1123_label, Checker, DurationRange};

const MIN_LEASE_DURATION: Duration = Duration::from_secs(2);
const MAX_LEASE_DURATION: Duration = Duration::from_secs(5 * 60);
const MIN_ACTIVITY_INTERVAL: Duration = Duration::from_millis(100);
const MAX_ACTIVITY_INTERVAL: Duration = Duration::from_secs(5 * 60);
const MAX_DNS_LABEL_LEN: usize = 63;
const MAX_DNS_SUBDOMAIN_LEN: usize = 253;
const MAX_PORT_NAME_LEN: usize = 15;
const DEFAULT_REPLICAS: u32 = 1;
/// A Deployment's `spec.replicas` is an int32.
const MAX_REPLICAS: u64 = i32::MAX as u64;

/// The built `[kubernetes]` table, and what the service checks need to know about it.
pub(super) struct ClusterSettings {
    pub config: KubernetesConfig,
    /// Line of `activity_interval` when the file sets it, for messages.
    pub activity_interval_line: Option<usize>,
    /// False when `activity_interval` is invalid. That value is already reported, so the
    /// checks against it are skipped.
    pub activity_interval_valid: bool,
}

/// Builds the `[kubernetes]` table, reporting every invalid value.
pub(super) fn build_cluster(
    raw: Option<RawKubernetes>,
    diagnostics: &mut Diagnostics<'_>,
) -> ClusterSettings {
    let defaults = KubernetesConfig::default();
    let Some(raw) = raw else {
        return ClusterSettings {
            config: defaults,
            activity_interval_line: None,
            activity_interval_valid: true,
        };
    };
    let mut checker = Checker {
        diagnostics,
        service: None,
        key_prefix: "kubernetes.",
    };

    let kubeconfig = raw
        .kubeconfig
        .and_then(|value| check_kubeconfig(value, &mut checker));
    let namespace = raw
        .namespace
        .and_then(|value| check_namespace(value, "namespace", &mut checker));
    let lease_namespace = raw
        .lease_namespace
        .and_then(|value| check_namespace(value, "lease_namespace", &mut checker))
        .or_else(|| namespace.clone());

    let leader_lease = match raw.leader_lease {
        Some(value) if !is_dns1123_subdomain(value.get_ref()) => {
            let message = format!(
                "invalid Lease name {:?}: {}",
                value.get_ref(),
                subdomain_rule(value.get_ref(), "coldgate-leader")
            );
            checker.error(value.span(), "leader_lease", message);
            defaults.leader_lease
        }
        Some(value) => value.into_inner(),
        None => defaults.leader_lease,
    };

    let lease_duration = checker.duration(
        raw.lease_duration,
        "lease_duration",
        defaults.lease_duration,
        DurationRange::Between(MIN_LEASE_DURATION, MAX_LEASE_DURATION),
    );

    let activity_interval_line = raw
        .activity_interval
        .as_ref()
        .map(|value| checker.diagnostics.line_of(value.span().start));
    let activity_interval_valid = raw.activity_interval.as_ref().is_none_or(|value| {
        (MIN_ACTIVITY_INTERVAL..=MAX_ACTIVITY_INTERVAL).contains(&value.get_ref().0)
    });
    let activity_interval = checker.duration(
        raw.activity_interval,
        "activity_interval",
        defaults.activity_interval,
        DurationRange::Between(MIN_ACTIVITY_INTERVAL, MAX_ACTIVITY_INTERVAL),
    );

    let identity = raw
        .identity
        .and_then(|value| check_identity(value, &mut checker));

    ClusterSettings {
        config: KubernetesConfig {
            kubeconfig,
            namespace,
            lease_namespace,
            leader_lease,
            lease_duration,
            activity_interval,
            identity,
        },
        activity_interval_line,
        activity_interval_valid,
    }
}

fn check_kubeconfig(value: Spanned<String>, checker: &mut Checker<'_, '_>) -> Option<PathBuf> {
    let message = if value.get_ref().is_empty() {
        "empty path; set the kubeconfig file, or remove the key to use the in-cluster config"
    } else if value.get_ref().contains('\0') {
        "contains a NUL character (\\u0000), which no file path can contain; remove it"
    } else {
        return Some(PathBuf::from(value.into_inner()));
    };
    checker.error(value.span(), "kubeconfig", message.to_owned());
    None
}

fn check_namespace(
    value: Spanned<String>,
    key: &str,
    checker: &mut Checker<'_, '_>,
) -> Option<String> {
    if is_dns1123_label(value.get_ref()) {
        return Some(value.into_inner());
    }
    let message = format!(
        "invalid namespace {:?}: a namespace is a DNS-1123 label of 1 to {MAX_DNS_LABEL_LEN} characters of a-z, 0-9 and '-', starting and ending with a letter or digit, such as {:?}",
        value.get_ref(),
        suggest_name(value.get_ref(), false, is_dns1123_label, "models"),
    );
    checker.error(value.span(), key, message);
    None
}

fn check_identity(value: Spanned<String>, checker: &mut Checker<'_, '_>) -> Option<String> {
    let message = if value.get_ref().is_empty() {
        "empty identity; set a name such as \"coldgate-0\", or remove the key to use the POD_NAME environment variable or the host name".to_owned()
    } else if value
        .get_ref()
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        format!(
            "invalid identity {:?}: contains whitespace or a control character; use a name such as the pod name",
            value.get_ref()
        )
    } else {
        return Some(value.into_inner());
    };
    checker.error(value.span(), "identity", message);
    None
}

/// Builds one `[service.kubernetes]` table. Returns `None` when a required key is missing
/// or invalid. `cluster` supplies the namespace when the table leaves it out.
pub(super) fn build_service(
    table: Spanned<RawServiceKubernetes>,
    cluster: &KubernetesConfig,
    checker: &mut Checker<'_, '_>,
) -> Option<KubernetesServiceConfig> {
    let header_span = table.span();
    let raw = table.into_inner();
    let saved_prefix = checker.key_prefix;
    checker.key_prefix = "kubernetes.";

    let namespace = match raw.namespace {
        Some(value) => check_namespace(value, "namespace", checker),
        None => cluster.namespace.clone(),
    };

    let deployment = match raw.deployment {
        None => {
            checker.error(
                header_span.clone(),
                "deployment",
                "missing required key; add deployment = \"...\" with the name of the Deployment to scale".to_owned(),
            );
            None
        }
        Some(value) if !is_dns1123_subdomain(value.get_ref()) => {
            let message = format!(
                "invalid Deployment name {:?}: {}",
                value.get_ref(),
                subdomain_rule(value.get_ref(), "iris-predictor")
            );
            checker.error(value.span(), "deployment", message);
            None
        }
        Some(value) => Some(value.into_inner()),
    };

    let service = match raw.service {
        None => {
            checker.error(
                header_span.clone(),
                "service",
                "missing required key; add service = \"...\" with the name of the Kubernetes Service whose EndpointSlices list the Deployment's pods".to_owned(),
            );
            None
        }
        Some(value) if !is_dns1035_label(value.get_ref()) => {
            let message = format!(
                "invalid Service name {:?}: Kubernetes Service names are DNS-1035 labels of 1 to {MAX_DNS_LABEL_LEN} characters of a-z, 0-9 and '-', starting with a letter and ending with a letter or digit, such as {:?}",
                value.get_ref(),
                suggest_name(value.get_ref(), false, is_dns1035_label, "iris-predictor"),
            );
            checker.error(value.span(), "service", message);
            None
        }
        Some(value) => Some(value.into_inner()),
    };

    let port = match raw.port {
        None => {
            checker.error(
                header_span,
                "port",
                "missing required key; add port = 8080 with the pods' port number, or port = \"http\" with the name of a port of the Service".to_owned(),
            );
            None
        }
        Some(value) => check_port(value, checker),
    };

    let replicas = check_replicas(raw.replicas, checker);

    checker.key_prefix = saved_prefix;
    Some(KubernetesServiceConfig {
        namespace,
        deployment: deployment?,
        service: service?,
        port: port?,
        replicas,
    })
}

fn check_port(value: Spanned<PortValue>, checker: &mut Checker<'_, '_>) -> Option<PortRef> {
    let span = value.span();
    let message = match value.into_inner() {
        PortValue::Number(number) => match u16::try_from(number) {
            Ok(port) if port > 0 => return Some(PortRef::Number(port)),
            _ => format!(
                "invalid port {number}: a port number is from 1 to 65535; write the pods' port, such as 8080, or a port name such as \"http\""
            ),
        },
        PortValue::Name(name) if is_iana_port_name(&name) => return Some(PortRef::Name(name)),
        PortValue::Name(name) if !name.is_empty() && name.bytes().all(|c| c.is_ascii_digit()) => {
            format!(
                "invalid port name {name:?}: a port name needs at least one letter; for a port number, write it without quotes, such as port = {name}"
            )
        }
        PortValue::Name(name) => format!(
            "invalid port name {name:?}: a port name has 1 to {MAX_PORT_NAME_LEN} characters of a-z, 0-9 and '-', at least one letter, and no '-' at either end or next to another '-', such as \"http\""
        ),
    };
    checker.error(span, "port", message);
    None
}

fn check_replicas(value: Option<Spanned<Count>>, checker: &mut Checker<'_, '_>) -> u32 {
    let Some(value) = value else {
        return DEFAULT_REPLICAS;
    };
    let count = value.get_ref().0;
    let message = if count == 0 {
        format!(
            "invalid value 0: must be at least 1, such as {DEFAULT_REPLICAS}, because replicas is the number of pods to start when a request arrives"
        )
    } else if count > MAX_REPLICAS {
        format!(
            "invalid value {count}: too large, the maximum is {MAX_REPLICAS} because a Deployment stores replicas as a 32-bit signed integer"
        )
    } else {
        // Cannot fail, because count is at most MAX_REPLICAS.
        return u32::try_from(count).unwrap_or(DEFAULT_REPLICAS);
    };
    checker.error(value.span(), "replicas", message);
    DEFAULT_REPLICAS
}

/// Checks that a service with a `[service.kubernetes]` table idles longer than
/// `activity_interval`, because other coldgate replicas see its requests up to one
/// `activity_interval` late and could otherwise scale it to zero while it is in use.
///
/// `idle_override` is the service's own idle_timeout and `idle_timeout` the value in
/// effect. Returns true when the service inherits a too-short idle_timeout from
/// `[defaults]`, which the caller reports once for all services with
/// [`report_short_default_idle_timeout`].
pub(super) fn check_idle_timeout(
    idle_override: Option<&Spanned<DurationValue>>,
    idle_timeout: Duration,
    defaults_sets_idle_timeout: bool,
    header_span: &Range<usize>,
    cluster: &ClusterSettings,
    checker: &mut Checker<'_, '_>,
) -> bool {
    if !cluster.activity_interval_valid || idle_timeout > cluster.config.activity_interval {
        return false;
    }
    let interval = activity_interval_text(cluster);
    match idle_override {
        // A zero idle_timeout is already reported as invalid.
        Some(value) if value.get_ref().0.is_zero() => false,
        Some(value) => {
            let message = format!(
                "idle_timeout {} must be longer than {interval}, because other coldgate replicas see this service's requests up to one activity_interval late; raise idle_timeout or lower activity_interval",
                format_duration(idle_timeout)
            );
            checker.error(value.span(), "idle_timeout", message);
            false
        }
        None if defaults_sets_idle_timeout => true,
        // Unreachable with the built-in values, because the built-in idle_timeout (10m) is
        // above the maximum activity_interval (5m).
        None => {
            let message = format!(
                "the built-in idle_timeout {} must be longer than {interval}, because other coldgate replicas see this service's requests up to one activity_interval late; set a longer idle_timeout here or in [defaults], or lower activity_interval",
                format_duration(idle_timeout)
            );
            checker.error(header_span.clone(), "idle_timeout", message);
            false
        }
    }
}

/// Reports a `[defaults]` idle_timeout that is not longer than `activity_interval`, once,
/// naming the services that inherit it. Does nothing when `services` is empty.
pub(super) fn report_short_default_idle_timeout(
    services: &[String],
    idle_timeout: Duration,
    span: Range<usize>,
    cluster: &ClusterSettings,
    diagnostics: &mut Diagnostics<'_>,
) {
    if services.is_empty() {
        return;
    }
    let message = format!(
        "idle_timeout {} must be longer than {}, because other coldgate replicas see requests up to one activity_interval late, and {} with [service.kubernetes] {} this value; raise idle_timeout, set a longer one in {}, or lower activity_interval",
        format_duration(idle_timeout),
        activity_interval_text(cluster),
        services.join(", "),
        if services.len() == 1 { "inherits" } else { "inherit" },
        if services.len() == 1 { "that service" } else { "those services" },
    );
    diagnostics.push(span, None, "defaults.idle_timeout", message);
}

/// Names `activity_interval` and its value for messages, with the line it is set on.
fn activity_interval_text(cluster: &ClusterSettings) -> String {
    let value = format_duration(cluster.config.activity_interval);
    match cluster.activity_interval_line {
        Some(line) => format!("[kubernetes] activity_interval {value} (line {line})"),
        None => format!("[kubernetes] activity_interval {value} (the default)"),
    }
}

/// Tells whether `name` is a DNS-1123 subdomain as Kubernetes checks object names: at most
/// 253 characters of `a-z`, `0-9`, `-` and `.`, where each part between dots is non-empty
/// and starts and ends with a letter or digit. Unlike a DNS-1123 label, a part may be
/// longer than 63 characters.
fn is_dns1123_subdomain(name: &str) -> bool {
    let alphanumeric = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let is_part = |part: &str| {
        let bytes = part.as_bytes();
        !bytes.is_empty()
            && bytes.iter().all(|&c| alphanumeric(c) || c == b'-')
            && alphanumeric(bytes[0])
            && alphanumeric(bytes[bytes.len() - 1])
    };
    name.len() <= MAX_DNS_SUBDOMAIN_LEN && name.split('.').all(is_part)
}

/// Tells whether `name` is a DNS-1035 label: a DNS-1123 label that starts with a letter.
fn is_dns1035_label(name: &str) -> bool {
    is_dns1123_label(name) && name.starts_with(|c: char| c.is_ascii_lowercase())
}

/// Tells whether `name` is an IANA_SVC_NAME as Kubernetes checks port names: 1 to 15
/// characters of `a-z`, `0-9` and `-`, with at least one letter, and no `-` at either end
/// or next to another `-`.
fn is_iana_port_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_PORT_NAME_LEN
        && bytes
            .iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && bytes.iter().any(u8::is_ascii_lowercase)
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
}

/// Describes the DNS-1123 subdomain format for an error message about `name`.
fn subdomain_rule(name: &str, example: &str) -> String {
    format!(
        "Kubernetes object names are DNS-1123 subdomains of at most {MAX_DNS_SUBDOMAIN_LEN} characters of a-z, 0-9, '-' and '.', where each part between dots starts and ends with a letter or digit, such as {:?}",
        suggest_name(name, true, is_dns1123_subdomain, example)
    )
}

/// Returns `name` lowercased, with other characters replaced by '-' and the ends trimmed,
/// when that result passes `is_valid`. Returns `example` otherwise.
fn suggest_name(name: &str, keep_dots: bool, is_valid: fn(&str) -> bool, example: &str) -> String {
    let replaced: String = name
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || (keep_dots && c == '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = replaced.trim_matches(|c| c == '-' || c == '.');
    if is_valid(trimmed) {
        trimmed.to_owned()
    } else {
        example.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns1123_subdomain_rules() {
        let long_valid = [
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61),
        ]
        .join(".");
        assert_eq!(long_valid.len(), 253);
        for valid in [
            "iris",
            "iris-predictor",
            "iris.v1",
            "0iris",
            &"a".repeat(64),
            long_valid.as_str(),
        ] {
            assert!(is_dns1123_subdomain(valid), "{valid:?} should be valid");
        }
        let too_long = format!("{long_valid}a");
        for invalid in [
            "",
            "Iris",
            "iris_predictor",
            "iris.",
            ".iris",
            "iris..v1",
            "iris-.v1",
            "iris.-v1",
            too_long.as_str(),
        ] {
            assert!(
                !is_dns1123_subdomain(invalid),
                "{invalid:?} should be invalid"
            );
        }
    }

    #[test]
    fn dns1035_label_rules() {
        for valid in ["iris", "iris-predictor", "a1", "a"] {
            assert!(is_dns1035_label(valid), "{valid:?} should be valid");
        }
        for invalid in [
            "",
            "1iris",
            "-iris",
            "iris-",
            "iris.v1",
            "Iris",
            &"a".repeat(64),
        ] {
            assert!(!is_dns1035_label(invalid), "{invalid:?} should be invalid");
        }
    }

    #[test]
    fn iana_port_name_rules() {
        for valid in ["http", "h2c", "grpc-web", "a", "1a", "metrics-port-01"] {
            assert!(is_iana_port_name(valid), "{valid:?} should be valid");
        }
        for invalid in [
            "",
            "8080",
            "-http",
            "http-",
            "grpc--web",
            "HTTP",
            "http_web",
            "metrics-port-012",
        ] {
            assert!(!is_iana_port_name(invalid), "{invalid:?} should be invalid");
        }
    }

    #[test]
    fn suggest_name_repairs_or_falls_back() {
        assert_eq!(
            suggest_name("Iris_Predictor", true, is_dns1123_subdomain, "x"),
            "iris-predictor"
        );
        assert_eq!(
            suggest_name("iris.V1", true, is_dns1123_subdomain, "x"),
            "iris.v1"
        );
        assert_eq!(
            suggest_name("iris.v1", false, is_dns1035_label, "x"),
            "iris-v1"
        );
        assert_eq!(suggest_name("1iris", false, is_dns1035_label, "x"), "x");
        assert_eq!(suggest_name("__", false, is_dns1123_label, "x"), "x");
    }
}
