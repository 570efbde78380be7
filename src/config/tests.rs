use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::*;

// The example file sits at the crate root, next to Cargo.toml.
const EXAMPLE_FILE: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/config/coldgate.example.toml"
));

const FULL_EXAMPLE: &str = r#"[server]
listen = "127.0.0.1:8080"
admin_listen = "127.0.0.1:9090"
max_total_queued = 10000
drain_delay = "5s"
shutdown_grace = "60s"
threads = 0

[log]
format = "text"
filter = "info"

[defaults]
queue_timeout = "5m"
max_queued_requests = 1000
idle_timeout = "10m"
max_concurrency_per_endpoint = 0
startup_timeout = "10m"
probe_interval = "10ms"
probe_timeout = "1s"
connect_timeout = "2s"

[[service]]
name = "iris"
hosts = ["iris.models.local"]
path_prefix = "/"
readiness_path = "/v2/models/iris/ready"
queue_timeout = "1m"

[service.process]
command = "python3"
args = ["predictor.py", "--port", "{port}"]
env = { MODEL = "iris" }
working_dir = "/srv/models"
stop_grace = "10s"
"#;

/// Parses `text` and returns its only diagnostic, failing if it parses or has several.
fn single_diagnostic(text: &str) -> Diagnostic {
    let error = match parse(text, "config.toml") {
        Ok(config) => panic!("expected an error, parsed {config:?}"),
        Err(error) => error,
    };
    let diagnostics = error.diagnostics();
    assert_eq!(diagnostics.len(), 1, "diagnostics: {error}");
    diagnostics[0].clone()
}

/// Checks position, key and message of the only diagnostic of `text`.
#[track_caller]
fn assert_rejected(
    text: &str,
    line: usize,
    column: usize,
    key: &str,
    message_part: &str,
) -> Diagnostic {
    let diagnostic = single_diagnostic(text);
    assert_eq!(diagnostic.line, line, "line of: {diagnostic}");
    assert_eq!(diagnostic.column, column, "column of: {diagnostic}");
    assert_eq!(diagnostic.key, key, "key of: {diagnostic}");
    assert!(
        diagnostic.message.contains(message_part),
        "message lacks {message_part:?}: {diagnostic}"
    );
    assert!(
        diagnostic.to_string().contains(key),
        "display lacks key {key:?}: {diagnostic}"
    );
    diagnostic
}

fn socket(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

#[test]
fn full_example_parses() {
    let config = parse(FULL_EXAMPLE, "config.toml").unwrap();

    assert_eq!(
        config.server,
        ServerConfig {
            listen: socket("127.0.0.1:8080"),
            admin_listen: socket("127.0.0.1:9090"),
            max_total_queued: 10_000,
            drain_delay: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(60),
            threads: 0,
            tls: None,
            admin_token: None,
            admin_token_file: None,
        }
    );
    assert_eq!(
        config.log,
        LogConfig {
            format: LogFormat::Text,
            filter: "info".to_owned(),
        }
    );
    assert_eq!(config.defaults, ServiceSettings::default());

    let expected_settings = ServiceSettings {
        queue_timeout: Duration::from_secs(60),
        ..ServiceSettings::default()
    };
    let expected_service = ServiceConfig {
        name: "iris".to_owned(),
        hosts: vec!["iris.models.local".to_owned()],
        path_prefix: "/".to_owned(),
        readiness_path: "/v2/models/iris/ready".to_owned(),
        protocol: UpstreamProtocol::Http1,
        readiness_probe: ReadinessProbe::Http,
        models: Vec::new(),
        settings: expected_settings,
        backend: Backend::Process(ProcessConfig {
            command: "python3".to_owned(),
            args: vec!["predictor.py".into(), "--port".into(), "{port}".into()],
            env: BTreeMap::from([("MODEL".to_owned(), "iris".to_owned())]),
            working_dir: Some(PathBuf::from("/srv/models")),
            stop_grace: Duration::from_secs(10),
        }),
    };
    assert_eq!(config.services, vec![expected_service]);
}

#[test]
fn empty_file_gives_defaults() {
    let config = parse("", "config.toml").unwrap();
    assert_eq!(config, Config::default());
    assert!(config.services.is_empty());
    assert_eq!(config.server.listen, socket("127.0.0.1:8080"));
    assert_eq!(config.server.admin_listen, socket("127.0.0.1:9090"));
    assert_eq!(config.server.max_total_queued, 10_000);
    assert_eq!(config.log.format, LogFormat::Text);
    assert_eq!(config.defaults.queue_timeout, Duration::from_secs(300));
    assert_eq!(config.defaults.probe_interval, Duration::from_millis(10));
}

#[test]
fn comments_only_file_gives_defaults() {
    let config = parse("# nothing here\n\n", "config.toml").unwrap();
    assert_eq!(config, Config::default());
}

#[test]
fn example_file_parses() {
    let config = parse(EXAMPLE_FILE, "coldgate.example.toml").unwrap();
    assert_eq!(config.services.len(), 1);
    assert_eq!(config.services[0].name, "iris");
    assert_eq!(
        config.services[0].settings.queue_timeout,
        Duration::from_secs(60)
    );
    assert_eq!(config.server, ServerConfig::default());
    assert_eq!(config.defaults, ServiceSettings::default());
    assert!(matches!(config.services[0].backend, Backend::Process(_)));
    assert_eq!(config.kubernetes, KubernetesConfig::default());
}

/// Removes the "# " in front of commented-out TOML lines: table headers and `key = value`
/// lines. Prose comments stay.
fn uncomment_settings(text: &str) -> String {
    let mut output = String::with_capacity(text.len());
    for line in text.lines() {
        let setting = line.strip_prefix("# ").filter(|rest| {
            let is_header = rest.starts_with('[');
            let is_key_value = rest.split_once(" = ").is_some_and(|(key, _)| {
                !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            });
            is_header || is_key_value
        });
        output.push_str(setting.unwrap_or(line));
        output.push('\n');
    }
    output
}

#[test]
fn example_file_uncommented_parses() {
    let text = uncomment_settings(EXAMPLE_FILE);
    assert!(text.contains("\n[kubernetes]\n"), "{text}");
    assert!(text.contains("\n[service.kubernetes]\n"), "{text}");

    let config = parse(&text, "coldgate.example.toml").unwrap();
    assert_eq!(config.services.len(), 2);
    assert!(matches!(config.services[0].backend, Backend::Process(_)));
    assert_eq!(config.services[1].name, "iris-k8s");
    assert_eq!(
        config.services[1].backend,
        Backend::Kubernetes(KubernetesServiceConfig {
            namespace: Some("models".to_owned()),
            deployment: "iris-predictor".to_owned(),
            service: "iris-predictor".to_owned(),
            port: PortRef::Number(8080),
            replicas: 1,
        })
    );
    // The example shows the default of every [kubernetes] key that has one.
    let kubernetes = &config.kubernetes;
    assert_eq!(
        kubernetes.leader_lease,
        KubernetesConfig::default().leader_lease
    );
    assert_eq!(
        kubernetes.lease_duration,
        KubernetesConfig::default().lease_duration
    );
    assert_eq!(
        kubernetes.activity_interval,
        KubernetesConfig::default().activity_interval
    );
    assert_eq!(kubernetes.lease_namespace.as_deref(), Some("coldgate"));
    assert_eq!(kubernetes.identity.as_deref(), Some("coldgate-0"));
}

#[test]
fn service_overrides_defaults() {
    let text = r#"[defaults]
idle_timeout = "30m"
max_queued_requests = 50

[[service]]
name = "iris"
hosts = ["iris.models.local"]
idle_timeout = "1h"
max_concurrency_per_endpoint = 4
probe_interval = "100ms"
[service.process]
command = "python3"

[[service]]
name = "resnet"
hosts = ["resnet.models.local"]
[service.process]
command = "python3"
"#;
    let config = parse(text, "config.toml").unwrap();

    assert_eq!(config.defaults.idle_timeout, Duration::from_secs(30 * 60));
    assert_eq!(config.defaults.max_queued_requests, 50);

    let iris = &config.services[0].settings;
    assert_eq!(iris.idle_timeout, Duration::from_secs(3600));
    assert_eq!(iris.max_concurrency_per_endpoint, 4);
    assert_eq!(iris.probe_interval, Duration::from_millis(100));
    // Keys the service leaves out come from [defaults], then from the built-in defaults.
    assert_eq!(iris.max_queued_requests, 50);
    assert_eq!(iris.queue_timeout, Duration::from_secs(300));

    let resnet = &config.services[1].settings;
    assert_eq!(resnet.idle_timeout, Duration::from_secs(30 * 60));
    assert_eq!(resnet.max_concurrency_per_endpoint, 0);
    assert_eq!(resnet.max_queued_requests, 50);
}

#[test]
fn process_optional_keys_default() {
    let text = r#"[[service]]
name = "iris"
hosts = ["Iris.Models.Local", "10.0.0.7", "[::1]"]
[service.process]
command = "python3"
"#;
    let config = parse(text, "config.toml").unwrap();
    let service = &config.services[0];
    assert_eq!(service.hosts, ["iris.models.local", "10.0.0.7", "[::1]"]);
    assert_eq!(service.path_prefix, "/");
    assert_eq!(service.readiness_path, "/");
    let Backend::Process(process) = &service.backend else {
        panic!("expected a process backend, got {:?}", service.backend);
    };
    assert!(process.args.is_empty());
    assert!(process.env.is_empty());
    assert_eq!(process.working_dir, None);
    assert_eq!(process.stop_grace, Duration::from_secs(10));
}

#[test]
fn shared_host_with_other_prefix_is_valid() {
    let text = r#"[[service]]
name = "iris-v1"
hosts = ["models.local"]
path_prefix = "/v1"
[service.process]
command = "python3"

[[service]]
name = "iris-v2"
hosts = ["models.local"]
path_prefix = "/v2"
[service.process]
command = "python3"
"#;
    let config = parse(text, "config.toml").unwrap();
    assert_eq!(config.services.len(), 2);
    assert_eq!(config.services[1].path_prefix, "/v2");
}

#[test]
fn ipv6_addresses_parse() {
    let text = "[server]\nlisten = \"[::1]:8080\"\nadmin_listen = \"[::1]:0\"\n";
    let config = parse(text, "config.toml").unwrap();
    assert_eq!(config.server.listen, socket("[::1]:8080"));
    assert_eq!(config.server.admin_listen, socket("[::1]:0"));
}

#[test]
fn log_json_and_filter_parse() {
    let text = "[log]\nformat = \"json\"\nfilter = \"warn,coldgate=debug\"\n";
    let config = parse(text, "config.toml").unwrap();
    assert_eq!(config.log.format, LogFormat::Json);
    assert_eq!(config.log.filter, "warn,coldgate=debug");
}

#[test]
fn unknown_top_level_key() {
    let diagnostic = assert_rejected(
        "listen = \"127.0.0.1:8080\"\n",
        1,
        1,
        "listen",
        "the top level accepts server, log, defaults, service",
    );
    assert!(
        diagnostic.message.contains("belongs in [server]"),
        "{diagnostic}"
    );
    assert_eq!(diagnostic.service_index, None);
}

#[test]
fn unknown_top_level_table_suggests_spelling() {
    let diagnostic = assert_rejected("[servr]\nthreads = 2\n", 1, 2, "servr", "unknown key");
    assert!(
        diagnostic.message.contains("did you mean \"server\""),
        "{diagnostic}"
    );
}

#[test]
fn unknown_key_in_server() {
    let text = "[server]\nlisten = \"127.0.0.1:8080\"\nmax_queued = 5\n";
    assert_rejected(
        text,
        3,
        1,
        "server.max_queued",
        "[server] accepts listen, admin_listen, max_total_queued, drain_delay, shutdown_grace, threads",
    );
}

#[test]
fn unknown_key_in_service() {
    let text = r#"[[service]]
name = "iris"
hosts = ["iris.models.local"]
  queue_timout = "1m"
[service.process]
command = "python3"
"#;
    let diagnostic = assert_rejected(
        text,
        4,
        3,
        "queue_timout",
        "[[service]] accepts name, hosts",
    );
    assert!(
        diagnostic
            .message
            .contains("did you mean \"queue_timeout\""),
        "{diagnostic}"
    );
    assert_eq!(diagnostic.service_index, Some(0));
    assert_eq!(diagnostic.service_name.as_deref(), Some("iris"));
}

#[test]
fn unknown_table_in_service() {
    let text = r#"[[service]]
name = "iris"
hosts = ["iris.models.local"]
[service.container]
image = "iris:1"
"#;
    assert_rejected(text, 4, 10, "container", "[[service]] accepts");
}

#[test]
fn unknown_key_in_process() {
    let text = r#"[[service]]
name = "iris"
hosts = ["iris.models.local"]
[service.process]
command = "python3"
arg = ["predictor.py"]
"#;
    let diagnostic = assert_rejected(
        text,
        6,
        1,
        "process.arg",
        "[service.process] accepts command, args, env, working_dir, stop_grace",
    );
    assert!(
        diagnostic.message.contains("did you mean \"args\""),
        "{diagnostic}"
    );
    assert_eq!(diagnostic.service_name.as_deref(), Some("iris"));
}

#[test]
fn unknown_keys_all_reported_in_order() {
    let text = "zeta = 1\n[server]\nbogus = 2\n[log]\nlevel = \"info\"\n";
    let error = parse(text, "config.toml").unwrap_err();
    let keys: Vec<(usize, &str)> = error
        .diagnostics()
        .iter()
        .map(|diagnostic| (diagnostic.line, diagnostic.key.as_str()))
        .collect();
    assert_eq!(keys, [(1, "zeta"), (3, "server.bogus"), (5, "log.level")]);
}

#[test]
fn bad_duration() {
    let text = r#"[[service]]
name = "iris"
hosts = ["iris.models.local"]
queue_timeout = "5 minutes"
[service.process]
command = "python3"
"#;
    let diagnostic = assert_rejected(
        text,
        4,
        17,
        "queue_timeout",
        "invalid duration \"5 minutes\"",
    );
    assert_eq!(
        diagnostic.to_string(),
        "config.toml:4:17: service \"iris\": queue_timeout: invalid duration \"5 minutes\": expected an integer followed by ms, s, m or h, such as \"30s\""
    );
}

#[test]
fn duration_as_integer_rejected() {
    let text = "[server]\ndrain_delay = 5\n";
    assert_rejected(
        text,
        2,
        15,
        "server.drain_delay",
        "expected a duration string such as \"30s\"",
    );
}

#[test]
fn zero_max_queued_requests() {
    let text = "[defaults]\nmax_queued_requests = 0\n";
    assert_rejected(
        text,
        2,
        23,
        "defaults.max_queued_requests",
        "invalid value 0: must be at least 1",
    );
}

#[test]
fn zero_max_total_queued() {
    let text = "[server]\nmax_total_queued = 0\n";
    assert_rejected(text, 2, 20, "server.max_total_queued", "must be at least 1");
}

#[test]
fn negative_count_rejected() {
    let text = "[server]\nthreads = -1\n";
    assert_rejected(
        text,
        2,
        11,
        "server.threads",
        "expected a non-negative integer",
    );
}

#[test]
fn zero_idle_timeout() {
    let text = r#"[[service]]
name = "iris"
hosts = ["iris.models.local"]
idle_timeout = "0s"
[service.process]
command = "python3"
"#;
    let diagnostic = assert_rejected(
        text,
        4,
        16,
        "idle_timeout",
        "invalid duration \"0s\": must be greater than 0",
    );
    assert_eq!(diagnostic.service_name.as_deref(), Some("iris"));
}

#[test]
fn probe_interval_out_of_range() {
    assert_rejected(
        "[defaults]\nprobe_interval = \"20s\"\n",
        2,
        18,
        "defaults.probe_interval",
        "invalid duration \"20s\": must be from 1ms to 10s",
    );
    assert_rejected(
        "[defaults]\nprobe_interval = \"0ms\"\n",
        2,
        18,
        "defaults.probe_interval",
        "must be from 1ms to 10s",
    );
}

#[test]
fn probe_interval_bounds_accepted() {
    for value in ["1ms", "10s"] {
        let text = format!("[defaults]\nprobe_interval = \"{value}\"\n");
        let config = parse(&text, "config.toml").unwrap();
        assert_eq!(
            config.defaults.probe_interval,
            parse_duration(value).unwrap()
        );
    }
}

#[test]
fn bad_listen_address() {
    let text = "[server]\nlisten = \"localhost:8080\"\n";
    assert_rejected(
        text,
        2,
        10,
        "server.listen",
        "invalid socket address \"localhost:8080\"",
    );
}

#[test]
fn admin_listen_same_as_listen() {
    let text = "[server]\nlisten = \"127.0.0.1:7000\"\nadmin_listen = \"127.0.0.1:7000\"\n";
    assert_rejected(text, 3, 16, "server.admin_listen", "both 127.0.0.1:7000");
}

#[test]
fn unquoted_listen_is_syntax_error() {
    let text = "[server]\nlisten = 127.0.0.1:8080\n";
    let diagnostic = assert_rejected(text, 2, 10, "server.listen", "invalid TOML");
    assert!(diagnostic.message.contains("double quotes"), "{diagnostic}");
}

#[test]
fn unquoted_word_is_syntax_error() {
    let text = "[log]\nformat = json\n";
    let diagnostic = assert_rejected(text, 2, 10, "log.format", "invalid TOML");
    assert!(diagnostic.message.contains("double quotes"), "{diagnostic}");
}

#[test]
fn unclosed_header_is_syntax_error() {
    assert_rejected("[server\nthreads = 1\n", 1, 8, "server", "invalid TOML");
}

#[test]
fn duplicate_key_is_syntax_error() {
    let text = "[server]\nthreads = 1\nthreads = 2\n";
    assert_rejected(text, 3, 1, "server.threads", "duplicate key");
}

#[test]
fn missing_name() {
    let text = r#"[[service]]
name = "iris"
hosts = ["iris.models.local"]
[service.process]
command = "python3"

[[service]]
hosts = ["resnet.models.local"]
[service.process]
command = "python3"
"#;
    let diagnostic = assert_rejected(text, 7, 1, "name", "missing required key");
    assert_eq!(diagnostic.service_index, Some(1));
    assert_eq!(diagnostic.service_name, None);
    assert!(
        diagnostic
            .to_string()
            .starts_with("config.toml:7:1: service #2: name: "),
        "{diagnostic}"
    );
}

#[test]
fn bad_name_characters() {
    let text = r#"[[service]]
name = "Iris_1"
hosts = ["iris.models.local"]
[service.process]
command = "python3"
"#;
    let diagnostic = assert_rejected(text, 2, 8, "name", "invalid service name \"Iris_1\"");
    assert!(
        diagnostic.message.contains("such as \"iris-1\""),
        "{diagnostic}"
    );
}

#[test]
fn name_too_long() {
    let name = "a".repeat(64);
    let text = format!(
        "[[service]]\nname = \"{name}\"\nhosts = [\"a.local\"]\n[service.process]\ncommand = \"x\"\n"
    );
    assert_rejected(&text, 2, 8, "name", "1 to 63 characters");
}

#[test]
fn duplicate_names() {
    let text = r#"[[service]]
name = "iris"
hosts = ["iris.models.local"]
[service.process]
command = "python3"

[[service]]
name = "iris"
hosts = ["iris2.models.local"]
[service.process]
command = "python3"
"#;
    let diagnostic = assert_rejected(text, 8, 8, "name", "duplicate service name \"iris\"");
    assert!(diagnostic.message.contains("at line 2"), "{diagnostic}");
    assert_eq!(diagnostic.service_index, Some(1));
}

#[test]
fn empty_hosts() {
    let text = r#"[[service]]
name = "iris"
hosts = []
[service.process]
command = "python3"
"#;
    assert_rejected(text, 3, 9, "hosts", "empty list");
}

#[test]
fn missing_hosts() {
    let text = "[[service]]\nname = \"iris\"\n[service.process]\ncommand = \"python3\"\n";
    assert_rejected(text, 1, 1, "hosts", "missing required key");
}

#[test]
fn host_with_port() {
    let text = r#"[[service]]
name = "iris"
hosts = ["iris.models.local", "iris.models.local:8080"]
[service.process]
command = "python3"
"#;
    assert_rejected(text, 3, 31, "hosts", "remove the port \":8080\"");
}

#[test]
fn host_with_scheme() {
    let text = r#"[[service]]
name = "iris"
hosts = ["http://iris.models.local"]
[service.process]
command = "python3"
"#;
    assert_rejected(text, 3, 10, "hosts", "remove the scheme \"http://\"");
}

#[test]
fn host_wrong_type_in_list() {
    let text = r#"[[service]]
name = "iris"
hosts = ["iris.models.local", 7]
[service.process]
command = "python3"
"#;
    assert_rejected(text, 3, 31, "hosts[1]", "expected a string");
}

#[test]
fn duplicate_host_and_prefix() {
    let text = r#"[[service]]
name = "iris"
hosts = ["iris.models.local"]
[service.process]
command = "python3"

[[service]]
name = "iris-v2"
hosts = ["IRIS.models.local"]
[service.process]
command = "python3"
"#;
    let diagnostic = assert_rejected(
        text,
        9,
        10,
        "hosts",
        "host \"iris.models.local\" with path_prefix \"/\" is already routed to service \"iris\" (line 3)",
    );
    assert_eq!(diagnostic.service_name.as_deref(), Some("iris-v2"));
    assert!(
        diagnostic
            .to_string()
            .contains("service \"iris-v2\": hosts: "),
        "{diagnostic}"
    );
}

#[test]
fn host_listed_twice_in_one_service() {
    let text = r#"[[service]]
name = "iris"
hosts = ["iris.local", "Iris.local"]
[service.process]
command = "python3"
"#;
    assert_rejected(text, 3, 24, "hosts", "listed twice in this service");
}

#[test]
fn path_prefix_without_slash() {
    let text = r#"[[service]]
name = "iris"
hosts = ["iris.models.local"]
path_prefix = "v1"
[service.process]
command = "python3"
"#;
    assert_rejected(
        text,
        4,
        15,
        "path_prefix",
        "invalid path_prefix \"v1\": must start with \"/\", such as \"/v1\"",
    );
}

#[test]
fn readiness_path_without_slash() {
    let text = r#"[[service]]
name = "iris"
hosts = ["iris.models.local"]
readiness_path = "ready"
[service.process]
command = "python3"
"#;
    assert_rejected(text, 4, 18, "readiness_path", "must start with \"/\"");
}

#[test]
fn missing_backend_table() {
    let text = r#"[server]
threads = 2

[[service]]
name = "iris"
hosts = ["iris.models.local"]
"#;
    let diagnostic = assert_rejected(text, 4, 1, "process", "missing backend table");
    assert!(
        diagnostic.message.contains("[service.process]"),
        "{diagnostic}"
    );
}

#[test]
fn empty_command() {
    let text = r#"[[service]]
name = "iris"
hosts = ["iris.models.local"]
[service.process]
command = ""
"#;
    assert_rejected(text, 5, 11, "process.command", "empty command");
}

#[test]
fn missing_command() {
    let text = r#"[[service]]
name = "iris"
hosts = ["iris.models.local"]
[service.process]
args = ["x"]
"#;
    assert_rejected(text, 4, 1, "process.command", "missing required key");
}

#[test]
fn env_value_must_be_string() {
    let text = r#"[[service]]
name = "iris"
hosts = ["iris.models.local"]
[service.process]
command = "python3"
env = { PORT = 8080 }
"#;
    assert_rejected(text, 6, 16, "process.env.PORT", "expected a string");
}

#[test]
fn env_name_with_equals_sign() {
    let text = r#"[[service]]
name = "iris"
hosts = ["iris.models.local"]
[service.process]
command = "python3"
env = { "A=B" = "x" }
"#;
    assert_rejected(text, 6, 9, "process.env.\"A=B\"", "must not contain '='");
}

#[test]
fn invalid_log_format() {
    let text = "[log]\nformat = \"xml\"\n";
    assert_rejected(
        text,
        2,
        10,
        "log.format",
        "invalid log format \"xml\": expected \"text\" or \"json\"",
    );
}

#[test]
fn single_bracket_service_gets_hint() {
    let text = "[service]\nname = \"iris\"\n";
    assert_rejected(text, 1, 1, "service", "double brackets");
}

#[test]
fn several_value_errors_reported_in_order() {
    let text = r#"[server]
listen = "nowhere"

[[service]]
name = "iris"
hosts = []
idle_timeout = "0s"
"#;
    let error = parse(text, "config.toml").unwrap_err();
    let found: Vec<(usize, &str)> = error
        .diagnostics()
        .iter()
        .map(|diagnostic| (diagnostic.line, diagnostic.key.as_str()))
        .collect();
    assert_eq!(
        found,
        [
            (2, "server.listen"),
            (4, "process"),
            (6, "hosts"),
            (7, "idle_timeout")
        ]
    );
    assert_eq!(error.to_string().lines().count(), 4);
}

#[test]
fn load_reads_file() {
    let path =
        std::env::temp_dir().join(format!("coldgate-config-test-{}.toml", std::process::id()));
    std::fs::write(&path, "[log]\nformat = \"yaml\"\n").unwrap();
    let result = load(&path);
    std::fs::remove_file(&path).unwrap();

    let error = result.unwrap_err();
    let diagnostic = &error.diagnostics()[0];
    assert_eq!(diagnostic.source, path.display().to_string());
    assert!(
        error
            .to_string()
            .starts_with(&format!("{}:2:10: log.format: ", path.display())),
        "{error}"
    );
}

#[test]
fn load_missing_file_names_path() {
    let path = std::env::temp_dir().join("coldgate-config-test-does-not-exist.toml");
    let error = load(&path).unwrap_err();
    assert!(matches!(error, ConfigError::Read { .. }), "{error:?}");
    assert!(error.diagnostics().is_empty());
    assert!(
        error.to_string().contains(&path.display().to_string()),
        "{error}"
    );
    assert!(std::error::Error::source(&error).is_some());
}

#[test]
fn count_beyond_u64_rejected() {
    let text = "[server]\nmax_total_queued = 99999999999999999999\n";
    assert_rejected(text, 2, 20, "server.max_total_queued", "too large");
}

const KUBERNETES_EXAMPLE: &str = r#"[kubernetes]
kubeconfig = "/etc/coldgate/kubeconfig"
namespace = "models"
lease_namespace = "coldgate"
leader_lease = "coldgate-leader.v1"
lease_duration = "30s"
activity_interval = "500ms"
identity = "coldgate-0"

[[service]]
name = "iris"
hosts = ["iris.models.local"]
idle_timeout = "1m"
[service.kubernetes]
namespace = "iris-ns"
deployment = "iris-predictor.v1"
service = "iris-predictor"
port = 8080
replicas = 3

[[service]]
name = "bert"
hosts = ["bert.models.local"]
[service.kubernetes]
deployment = "bert"
service = "bert"
port = "http"
"#;

#[test]
fn kubernetes_example_parses() {
    let config = parse(KUBERNETES_EXAMPLE, "config.toml").unwrap();

    assert_eq!(
        config.kubernetes,
        KubernetesConfig {
            kubeconfig: Some(PathBuf::from("/etc/coldgate/kubeconfig")),
            namespace: Some("models".to_owned()),
            lease_namespace: Some("coldgate".to_owned()),
            leader_lease: "coldgate-leader.v1".to_owned(),
            lease_duration: Duration::from_secs(30),
            activity_interval: Duration::from_millis(500),
            identity: Some("coldgate-0".to_owned()),
        }
    );

    let iris = &config.services[0];
    assert_eq!(iris.settings.idle_timeout, Duration::from_secs(60));
    assert_eq!(
        iris.backend,
        Backend::Kubernetes(KubernetesServiceConfig {
            namespace: Some("iris-ns".to_owned()),
            deployment: "iris-predictor.v1".to_owned(),
            service: "iris-predictor".to_owned(),
            port: PortRef::Number(8080),
            replicas: 3,
        })
    );

    // bert leaves out namespace and replicas: [kubernetes] namespace and 1 apply.
    let bert = &config.services[1];
    assert_eq!(bert.settings, ServiceSettings::default());
    assert_eq!(
        bert.backend,
        Backend::Kubernetes(KubernetesServiceConfig {
            namespace: Some("models".to_owned()),
            deployment: "bert".to_owned(),
            service: "bert".to_owned(),
            port: PortRef::Name("http".to_owned()),
            replicas: 1,
        })
    );
}

#[test]
fn kubernetes_service_without_cluster_table() {
    let text = r#"[[service]]
name = "iris"
hosts = ["iris.models.local"]
[service.kubernetes]
deployment = "iris"
service = "iris"
port = 8080
"#;
    let config = parse(text, "config.toml").unwrap();
    assert_eq!(config.kubernetes, KubernetesConfig::default());
    assert_eq!(config.kubernetes.leader_lease, "coldgate-leader");
    assert_eq!(config.kubernetes.lease_duration, Duration::from_secs(15));
    assert_eq!(config.kubernetes.activity_interval, Duration::from_secs(10));
    let Backend::Kubernetes(backend) = &config.services[0].backend else {
        panic!(
            "expected a kubernetes backend, got {:?}",
            config.services[0].backend
        );
    };
    assert_eq!(backend.namespace, None);
    assert_eq!(backend.replicas, 1);
}

#[test]
fn lease_namespace_defaults_to_namespace() {
    let config = parse("[kubernetes]\nnamespace = \"models\"\n", "config.toml").unwrap();
    assert_eq!(config.kubernetes.namespace.as_deref(), Some("models"));
    assert_eq!(config.kubernetes.lease_namespace.as_deref(), Some("models"));
}

#[test]
fn kubernetes_table_without_services() {
    let text = "[kubernetes]\nidentity = \"coldgate-0\"\n";
    let config = parse(text, "config.toml").unwrap();
    assert!(config.services.is_empty());
    assert_eq!(config.kubernetes.identity.as_deref(), Some("coldgate-0"));
}

#[test]
fn port_ref_displays_number_or_name() {
    assert_eq!(PortRef::Number(8080).to_string(), "8080");
    assert_eq!(PortRef::Name("http".to_owned()).to_string(), "http");
}

#[test]
fn both_backend_tables() {
    let text = r#"[[service]]
name = "iris"
hosts = ["iris.models.local"]
[service.process]
command = "python3"
[service.kubernetes]
deployment = "iris"
service = "iris"
port = 8080
"#;
    let diagnostic = assert_rejected(text, 6, 1, "kubernetes", "second backend table");
    assert!(
        diagnostic
            .message
            .contains("already has [service.process] at line 4"),
        "{diagnostic}"
    );
    assert!(diagnostic.message.contains("keep one"), "{diagnostic}");
    assert_eq!(diagnostic.service_name.as_deref(), Some("iris"));
}

#[test]
fn both_backend_tables_process_second() {
    let text = r#"[[service]]
name = "iris"
hosts = ["iris.models.local"]
[service.kubernetes]
deployment = "iris"
service = "iris"
port = 8080
[service.process]
command = "python3"
"#;
    let diagnostic = assert_rejected(text, 8, 1, "process", "second backend table");
    assert!(
        diagnostic
            .message
            .contains("already has [service.kubernetes] at line 4"),
        "{diagnostic}"
    );
}

#[test]
fn missing_backend_offers_both_tables() {
    let text = "[[service]]\nname = \"iris\"\nhosts = [\"iris.models.local\"]\n";
    let diagnostic = assert_rejected(text, 1, 1, "process", "missing backend table");
    assert!(
        diagnostic.message.contains("[service.process]"),
        "{diagnostic}"
    );
    assert!(
        diagnostic.message.contains("[service.kubernetes]"),
        "{diagnostic}"
    );
}

/// Returns a service with a `[service.kubernetes]` table whose `key` line is replaced by
/// `line`, or added when the table lacks `key`. The table's keys start at line 5.
fn kubernetes_service(key: &str, line: &str) -> String {
    let mut keys = vec![
        "deployment = \"iris-predictor\"",
        "service = \"iris-predictor\"",
        "port = 8080",
    ];
    match keys.iter().position(|existing| existing.starts_with(key)) {
        Some(index) => keys[index] = line,
        None => keys.insert(0, line),
    }
    format!(
        "[[service]]\nname = \"iris\"\nhosts = [\"iris.models.local\"]\n[service.kubernetes]\n{}\n",
        keys.join("\n")
    )
}

#[test]
fn deployment_name_invalid() {
    let text = kubernetes_service("deployment", "deployment = \"Iris_Predictor\"");
    let diagnostic = assert_rejected(
        &text,
        5,
        14,
        "kubernetes.deployment",
        "invalid Deployment name \"Iris_Predictor\"",
    );
    assert!(
        diagnostic.message.contains("DNS-1123 subdomain"),
        "{diagnostic}"
    );
    assert!(
        diagnostic.message.contains("such as \"iris-predictor\""),
        "{diagnostic}"
    );
    assert_eq!(diagnostic.service_name.as_deref(), Some("iris"));
}

#[test]
fn service_name_invalid() {
    let text = kubernetes_service("service", "service = \"iris.predictor\"");
    let diagnostic = assert_rejected(
        &text,
        6,
        11,
        "kubernetes.service",
        "invalid Service name \"iris.predictor\"",
    );
    assert!(
        diagnostic.message.contains("such as \"iris-predictor\""),
        "{diagnostic}"
    );
}

#[test]
fn service_name_starting_with_digit() {
    let text = kubernetes_service("service", "service = \"1iris\"");
    let diagnostic = assert_rejected(
        &text,
        6,
        11,
        "kubernetes.service",
        "invalid Service name \"1iris\"",
    );
    assert!(
        diagnostic.message.contains("starting with a letter"),
        "{diagnostic}"
    );
}

#[test]
fn port_zero() {
    let text = kubernetes_service("port", "port = 0");
    assert_rejected(
        &text,
        7,
        8,
        "kubernetes.port",
        "invalid port 0: a port number is from 1 to 65535",
    );
}

#[test]
fn port_above_65535() {
    let text = kubernetes_service("port", "port = 70000");
    assert_rejected(
        &text,
        7,
        8,
        "kubernetes.port",
        "invalid port 70000: a port number is from 1 to 65535",
    );
}

#[test]
fn port_name_invalid() {
    let text = kubernetes_service("port", "port = \"http_web\"");
    let diagnostic = assert_rejected(
        &text,
        7,
        8,
        "kubernetes.port",
        "invalid port name \"http_web\"",
    );
    assert!(
        diagnostic.message.contains("1 to 15 characters"),
        "{diagnostic}"
    );
}

#[test]
fn port_number_in_quotes() {
    let text = kubernetes_service("port", "port = \"8080\"");
    let diagnostic = assert_rejected(&text, 7, 8, "kubernetes.port", "invalid port name \"8080\"");
    assert!(
        diagnostic
            .message
            .contains("without quotes, such as port = 8080"),
        "{diagnostic}"
    );
}

#[test]
fn port_wrong_type() {
    let text = kubernetes_service("port", "port = true");
    assert_rejected(
        &text,
        7,
        8,
        "kubernetes.port",
        "expected a port number such as 8080 or a port name such as \"http\"",
    );
}

#[test]
fn replicas_zero() {
    let text = kubernetes_service("replicas", "replicas = 0");
    assert_rejected(
        &text,
        5,
        12,
        "kubernetes.replicas",
        "invalid value 0: must be at least 1",
    );
}

#[test]
fn replicas_above_int32() {
    let text = kubernetes_service("replicas", "replicas = 2147483648");
    assert_rejected(
        &text,
        5,
        12,
        "kubernetes.replicas",
        "invalid value 2147483648: too large, the maximum is 2147483647",
    );
}

#[test]
fn service_namespace_invalid() {
    let text = kubernetes_service("namespace", "namespace = \"Models\"");
    let diagnostic = assert_rejected(
        &text,
        5,
        13,
        "kubernetes.namespace",
        "invalid namespace \"Models\"",
    );
    assert!(
        diagnostic.message.contains("such as \"models\""),
        "{diagnostic}"
    );
    assert_eq!(diagnostic.service_index, Some(0));
}

#[test]
fn missing_kubernetes_keys_all_reported() {
    let text = "[[service]]\nname = \"iris\"\nhosts = [\"iris.models.local\"]\n[service.kubernetes]\nreplicas = 2\n";
    let error = parse(text, "config.toml").unwrap_err();
    let found: Vec<(usize, usize, &str)> = error
        .diagnostics()
        .iter()
        .map(|diagnostic| (diagnostic.line, diagnostic.column, diagnostic.key.as_str()))
        .collect();
    assert_eq!(
        found,
        [
            (4, 1, "kubernetes.deployment"),
            (4, 1, "kubernetes.service"),
            (4, 1, "kubernetes.port")
        ]
    );
    for diagnostic in error.diagnostics() {
        assert!(
            diagnostic.message.starts_with("missing required key; add "),
            "{diagnostic}"
        );
    }
}

#[test]
fn lease_duration_too_short() {
    let text = "[kubernetes]\nlease_duration = \"1s\"\n";
    assert_rejected(
        text,
        2,
        18,
        "kubernetes.lease_duration",
        "invalid duration \"1s\": must be from 2s to 5m",
    );
}

#[test]
fn activity_interval_out_of_range() {
    assert_rejected(
        "[kubernetes]\nactivity_interval = \"50ms\"\n",
        2,
        21,
        "kubernetes.activity_interval",
        "invalid duration \"50ms\": must be from 100ms to 5m",
    );
    assert_rejected(
        "[kubernetes]\nactivity_interval = \"6m\"\n",
        2,
        21,
        "kubernetes.activity_interval",
        "must be from 100ms to 5m",
    );
}

#[test]
fn cluster_namespace_invalid() {
    let text = "[kubernetes]\nnamespace = \"models.prod\"\n";
    let diagnostic = assert_rejected(
        text,
        2,
        13,
        "kubernetes.namespace",
        "invalid namespace \"models.prod\"",
    );
    assert_eq!(diagnostic.service_index, None);
    assert!(
        diagnostic.message.contains("such as \"models-prod\""),
        "{diagnostic}"
    );
}

#[test]
fn lease_namespace_invalid() {
    let text = "[kubernetes]\nlease_namespace = \"-coldgate\"\n";
    assert_rejected(
        text,
        2,
        19,
        "kubernetes.lease_namespace",
        "invalid namespace \"-coldgate\"",
    );
}

#[test]
fn leader_lease_invalid() {
    let text = "[kubernetes]\nleader_lease = \"Coldgate_Leader\"\n";
    let diagnostic = assert_rejected(
        text,
        2,
        16,
        "kubernetes.leader_lease",
        "invalid Lease name \"Coldgate_Leader\"",
    );
    assert!(
        diagnostic.message.contains("such as \"coldgate-leader\""),
        "{diagnostic}"
    );
}

#[test]
fn identity_with_whitespace() {
    let text = "[kubernetes]\nidentity = \"coldgate 0\"\n";
    assert_rejected(
        text,
        2,
        12,
        "kubernetes.identity",
        "invalid identity \"coldgate 0\": contains whitespace",
    );
}

#[test]
fn identity_empty() {
    let text = "[kubernetes]\nidentity = \"\"\n";
    assert_rejected(text, 2, 12, "kubernetes.identity", "empty identity");
}

#[test]
fn kubeconfig_empty() {
    let text = "[kubernetes]\nkubeconfig = \"\"\n";
    assert_rejected(text, 2, 14, "kubernetes.kubeconfig", "empty path");
}

#[test]
fn unknown_key_in_kubernetes() {
    let text = "[kubernetes]\nnamespace = \"models\"\nlease_duraton = \"15s\"\n";
    let diagnostic = assert_rejected(
        text,
        3,
        1,
        "kubernetes.lease_duraton",
        "[kubernetes] accepts kubeconfig, namespace, lease_namespace, leader_lease, lease_duration, activity_interval, identity",
    );
    assert!(
        diagnostic
            .message
            .contains("did you mean \"lease_duration\""),
        "{diagnostic}"
    );
    assert_eq!(diagnostic.service_index, None);
}

#[test]
fn unknown_key_in_service_kubernetes() {
    let text = kubernetes_service("deploymnet", "deploymnet = \"iris\"");
    let error = parse(&text, "config.toml").unwrap_err();
    let diagnostics = error.diagnostics();
    // Only the unknown key is reported, because value checks, such as the one for a
    // missing deployment, run only once every key is known.
    assert_eq!(diagnostics.len(), 1, "{error}");
    let diagnostic = &diagnostics[0];
    assert_eq!((diagnostic.line, diagnostic.column), (5, 1), "{diagnostic}");
    assert_eq!(diagnostic.key, "kubernetes.deploymnet");
    assert!(
        diagnostic.message.contains(
            "[service.kubernetes] accepts namespace, deployment, service, port, replicas"
        ),
        "{diagnostic}"
    );
    assert!(
        diagnostic.message.contains("did you mean \"deployment\""),
        "{diagnostic}"
    );
    assert_eq!(diagnostic.service_name.as_deref(), Some("iris"));
}

#[test]
fn cluster_key_in_service_table() {
    let text = kubernetes_service("lease_duration", "lease_duration = \"15s\"");
    let diagnostic = assert_rejected(
        &text,
        5,
        1,
        "kubernetes.lease_duration",
        "\"lease_duration\" belongs in [kubernetes]",
    );
    assert_eq!(diagnostic.service_index, Some(0));
}

#[test]
fn namespace_key_in_service_entry() {
    let text = r#"[[service]]
name = "iris"
hosts = ["iris.models.local"]
namespace = "models"
[service.kubernetes]
deployment = "iris"
service = "iris"
port = 8080
"#;
    assert_rejected(
        text,
        4,
        1,
        "namespace",
        "\"namespace\" belongs in [service.kubernetes]",
    );
}

#[test]
fn service_idle_timeout_too_short() {
    let text = r#"[kubernetes]
activity_interval = "30s"

[[service]]
name = "iris"
hosts = ["iris.models.local"]
idle_timeout = "30s"
[service.kubernetes]
deployment = "iris"
service = "iris"
port = 8080
"#;
    let diagnostic = assert_rejected(
        text,
        7,
        16,
        "idle_timeout",
        "idle_timeout 30s must be longer than [kubernetes] activity_interval 30s (line 2)",
    );
    assert!(
        diagnostic
            .message
            .contains("raise idle_timeout or lower activity_interval"),
        "{diagnostic}"
    );
    assert_eq!(diagnostic.service_name.as_deref(), Some("iris"));
}

#[test]
fn default_idle_timeout_too_short() {
    let text = r#"[defaults]
idle_timeout = "5s"

[[service]]
name = "iris"
hosts = ["iris.models.local"]
[service.kubernetes]
deployment = "iris"
service = "iris"
port = 8080

[[service]]
name = "local"
hosts = ["local.models.local"]
[service.process]
command = "python3"

[[service]]
name = "bert"
hosts = ["bert.models.local"]
[service.kubernetes]
deployment = "bert"
service = "bert"
port = 8080
"#;
    // One diagnostic for both kubernetes services; the process service may idle briefly.
    let diagnostic = assert_rejected(
        text,
        2,
        16,
        "defaults.idle_timeout",
        "idle_timeout 5s must be longer than [kubernetes] activity_interval 10s (the default)",
    );
    assert!(
        diagnostic.message.contains(
            "service \"iris\", service \"bert\" with [service.kubernetes] inherit this value"
        ),
        "{diagnostic}"
    );
    assert_eq!(diagnostic.service_index, None);
}

#[test]
fn idle_timeout_above_interval_accepted() {
    let text = r#"[defaults]
idle_timeout = "5s"

[kubernetes]
activity_interval = "10s"

[[service]]
name = "iris"
hosts = ["iris.models.local"]
idle_timeout = "10s1ms"
[service.kubernetes]
deployment = "iris"
service = "iris"
port = 8080
"#;
    let config = parse(text, "config.toml").unwrap();
    assert_eq!(
        config.services[0].settings.idle_timeout,
        Duration::from_millis(10_001)
    );
}

#[test]
fn invalid_activity_interval_skips_idle_check() {
    // Only the out-of-range activity_interval is reported, not a comparison of idle_timeout
    // against a value the file does not contain.
    let text = r#"[kubernetes]
activity_interval = "1h"

[[service]]
name = "iris"
hosts = ["iris.models.local"]
idle_timeout = "5s"
[service.kubernetes]
deployment = "iris"
service = "iris"
port = 8080
"#;
    assert_rejected(
        text,
        2,
        21,
        "kubernetes.activity_interval",
        "must be from 100ms to 5m",
    );
}

#[test]
fn invalid_log_filter_is_rejected() {
    let error = parse("[log]\nfilter = \"info,,=[=\"\n", "config.toml").unwrap_err();
    let diagnostic = &error.diagnostics()[0];
    assert_eq!((diagnostic.line, diagnostic.column), (2, 10));
    assert_eq!(diagnostic.key, "log.filter");
    assert!(diagnostic.message.contains("invalid filter"), "{}", diagnostic.message);
}

#[test]
fn protocol_is_validated() {
    let base = "[[service]]\nname = \"g\"\nhosts = [\"g.local\"]\n";
    let config = parse(&format!("{base}protocol = \"h2c\"\n[service.process]\ncommand = \"x\"\n"), "c.toml").unwrap();
    assert_eq!(config.services[0].protocol, UpstreamProtocol::H2c);
    let error = parse(&format!("{base}protocol = \"grpc\"\n[service.process]\ncommand = \"x\"\n"), "c.toml").unwrap_err();
    let diagnostic = &error.diagnostics()[0];
    assert_eq!((diagnostic.line, diagnostic.column, diagnostic.key.as_str()), (4, 12, "protocol"));
}

#[test]
fn server_tls_table_is_checked() {
    let config = parse("[server.tls]\ncert_file = \"/etc/tls/tls.crt\"\nkey_file = \"/etc/tls/tls.key\"\n", "c.toml").unwrap();
    let tls = config.server.tls.expect("tls configured");
    assert_eq!(tls.cert_file, PathBuf::from("/etc/tls/tls.crt"));

    let error = parse("[server.tls]\ncert_file = \"/etc/tls/tls.crt\"\n", "c.toml").unwrap_err();
    let diagnostic = &error.diagnostics()[0];
    assert_eq!(diagnostic.key, "server.tls.key_file");
    assert_eq!(diagnostic.line, 1);

    let error = parse("[server.tls]\ncert_file = \"a\"\nkey_file = \"b\"\nca_file = \"c\"\n", "c.toml").unwrap_err();
    let diagnostic = &error.diagnostics()[0];
    assert_eq!((diagnostic.line, diagnostic.column), (4, 1));
    assert!(diagnostic.message.contains("[server.tls] accepts cert_file, key_file"), "{}", diagnostic.message);
}

#[test]
fn keep_warm_windows_parse_and_inherit() {
    let text = r#"[defaults]
keep_warm = ["Mon-Fri 08:00-18:00 Europe/Berlin"]

[[service]]
name = "iris"
hosts = ["iris.models.local"]
[service.process]
command = "python3"

[[service]]
name = "night"
hosts = ["night.models.local"]
keep_warm = ["Fri 22:00-02:00 UTC", "Sat, Sun 10:00-12:00 UTC"]
[service.process]
command = "python3"

[[service]]
name = "never"
hosts = ["never.models.local"]
keep_warm = []
[service.process]
command = "python3"
"#;
    let config = parse(text, "config.toml").unwrap();
    let texts = |settings: &ServiceSettings| -> Vec<String> {
        settings.keep_warm.windows().iter().map(|w| w.as_str().to_owned()).collect()
    };
    assert_eq!(texts(&config.defaults), ["Mon-Fri 08:00-18:00 Europe/Berlin"]);
    assert_eq!(texts(&config.services[0].settings), ["Mon-Fri 08:00-18:00 Europe/Berlin"], "inherited");
    assert_eq!(
        texts(&config.services[1].settings),
        ["Fri 22:00-02:00 UTC", "Sat, Sun 10:00-12:00 UTC"],
        "a service's list replaces the defaults"
    );
    assert!(config.services[2].settings.keep_warm.is_empty(), "an empty list turns keep_warm off");
}

#[test]
fn keep_warm_invalid_window_located() {
    let text = r#"[[service]]
name = "iris"
hosts = ["iris.models.local"]
keep_warm = ["Mon-Fri 08:00-18:00 UTC", "Mon-Fry 08:00-18:00 UTC"]
[service.process]
command = "python3"
"#;
    let diagnostic = assert_rejected(text, 4, 41, "keep_warm[1]", "unknown day \"Fry\"");
    assert!(diagnostic.to_string().starts_with("config.toml:4:41: service \"iris\": keep_warm[1]: invalid keep_warm window"), "{diagnostic}");
}

#[test]
fn keep_warm_every_invalid_window_reported() {
    let text = r#"[defaults]
keep_warm = ["Mon-Fri 08:00-18:00 Mars/Olympus", "Mon 08:00-18:00", "Mon 09:00-09:00 UTC"]
"#;
    let error = parse(text, "config.toml").unwrap_err();
    let diagnostics = error.diagnostics();
    assert_eq!(diagnostics.len(), 3, "{error}");
    assert_eq!(diagnostics[0].key, "defaults.keep_warm[0]");
    assert!(diagnostics[0].message.contains("unknown time zone \"Mars/Olympus\""), "{error}");
    assert_eq!((diagnostics[1].line, diagnostics[1].column), (2, 50));
    assert!(diagnostics[1].message.contains("missing time zone"), "{error}");
    assert!(diagnostics[2].message.contains("for a whole day write \"00:00-24:00\""), "{error}");
}

#[test]
fn keep_warm_must_be_list_of_strings() {
    let text = "[defaults]\nkeep_warm = \"Mon-Fri 08:00-18:00 UTC\"\n";
    let diagnostic = single_diagnostic(text);
    assert_eq!(diagnostic.key, "defaults.keep_warm");
    assert!(diagnostic.message.contains("expected an array"), "{diagnostic}");
}

#[test]
fn admin_token_keys_parse() {
    let text = r#"[server]
admin_token = "0123456789abcdef0123"
admin_token_file = "/run/secrets/coldgate-admin-token"
"#;
    let config = parse(text, "config.toml").unwrap();
    assert_eq!(config.server.admin_token.as_ref().map(Secret::expose), Some("0123456789abcdef0123"));
    assert_eq!(config.server.admin_token_file, Some(PathBuf::from("/run/secrets/coldgate-admin-token")));
    let debug = format!("{config:?}");
    assert!(!debug.contains("0123456789abcdef0123"), "Debug output shows the token: {debug}");
}

#[test]
fn admin_token_too_short() {
    let diagnostic = assert_rejected(
        "[server]\nadmin_token = \"secret\"\n",
        2,
        15,
        "server.admin_token",
        "too short (6 characters); use at least 16",
    );
    assert!(!diagnostic.to_string().contains("\"secret\""), "the message repeats the token: {diagnostic}");
}

#[test]
fn admin_token_with_whitespace() {
    assert_rejected(
        "[server]\nadmin_token = \"0123456789abcdef0123\\n\"\n",
        2,
        15,
        "server.admin_token",
        "trailing whitespace",
    );
}

#[test]
fn admin_token_file_empty_path() {
    assert_rejected(
        "[server]\nadmin_token_file = \" \"\n",
        2,
        20,
        "server.admin_token_file",
        "empty path",
    );
}

#[test]
fn grpc_probe_needs_h2c() {
    let base = "[[service]]\nname = \"g\"\nhosts = [\"g.local\"]\n";
    let ok = parse(&format!("{base}protocol = \"h2c\"\nreadiness_probe = \"grpc\"\n[service.process]\ncommand = \"x\"\n"), "c.toml").unwrap();
    assert_eq!(ok.services[0].readiness_probe, ReadinessProbe::Grpc);
    let error = parse(&format!("{base}readiness_probe = \"grpc\"\n[service.process]\ncommand = \"x\"\n"), "c.toml").unwrap_err();
    let diagnostic = &error.diagnostics()[0];
    assert_eq!((diagnostic.line, diagnostic.key.as_str()), (4, "readiness_probe"));
    assert!(diagnostic.message.contains("protocol = \"h2c\""), "{}", diagnostic.message);
}

#[test]
fn openai_routing_is_checked() {
    let text = "[openai]\nhosts = [\"LLM.local\"]\n\n[[service]]\nname = \"llama\"\nmodels = [\"llama-3-8b\", \"llama3\"]\n[service.process]\ncommand = \"x\"\n";
    let config = parse(text, "c.toml").unwrap();
    let openai = config.openai.expect("[openai] table");
    assert_eq!(openai.hosts, vec!["llm.local".to_owned()]);
    assert_eq!(openai.max_body_prefix, DEFAULT_OPENAI_BODY_PREFIX);
    assert_eq!(config.services[0].models, vec!["llama-3-8b".to_owned(), "llama3".to_owned()]);
    assert!(config.services[0].hosts.is_empty(), "a model-routed service needs no hosts");

    let duplicate = "[openai]\nhosts = [\"llm.local\"]\n[[service]]\nname = \"a\"\nmodels = [\"m\"]\n[service.process]\ncommand = \"x\"\n[[service]]\nname = \"b\"\nmodels = [\"m\"]\n[service.process]\ncommand = \"x\"\n";
    let error = parse(duplicate, "c.toml").unwrap_err();
    let diagnostic = &error.diagnostics()[0];
    assert_eq!((diagnostic.line, diagnostic.key.as_str()), (10, "models"));
    assert!(diagnostic.message.contains("already served by"), "{}", diagnostic.message);

    let too_big = "[openai]\nhosts = [\"llm.local\"]\nmax_body_prefix = 1048577\n[[service]]\nname = \"a\"\nmodels = [\"m\"]\n[service.process]\ncommand = \"x\"\n";
    let error = parse(too_big, "c.toml").unwrap_err();
    let diagnostic = &error.diagnostics()[0];
    assert_eq!((diagnostic.line, diagnostic.key.as_str()), (3, "openai.max_body_prefix"));
}
