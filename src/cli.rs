//! The command line: `serve`, `check-config`, `demo` and the simulated `predictor`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

use crate::config::{self, Config, LogFormat};
use crate::predictor::{self, PredictorOptions};
use crate::server::{self, Listeners};

#[derive(Parser, Debug)]
#[command(name = "coldgate", version, about = "A request-buffering activator for scale-to-zero inference services")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run coldgate with a configuration file.
    Serve {
        /// Path of the TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// Log format, overriding [log] format: "text" or "json".
        #[arg(long, value_parser = parse_log_format)]
        log_format: Option<LogFormat>,
    },
    /// Validate a configuration file and exit: 0 if valid, 1 with the errors otherwise.
    CheckConfig {
        /// Path of the TOML configuration file (also accepted as --config FILE).
        #[arg(required_unless_present = "config")]
        file: Option<PathBuf>,
        /// Path of the TOML configuration file, as for `serve`.
        #[arg(long, short, conflicts_with = "file")]
        config: Option<PathBuf>,
    },
    /// Run coldgate in front of the built-in simulated model server, which starts on the
    /// first request and stops after it has been idle.
    Demo {
        /// Data address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Admin address to listen on (/metrics, /status, /healthz, /readyz).
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin_listen: String,
        /// Simulated model load time of the demo model server, in milliseconds.
        #[arg(long, default_value_t = 3000)]
        load_ms: u64,
        /// How long the demo service may be idle before it is stopped, such as "30s".
        #[arg(long, default_value = "30s")]
        idle_timeout: String,
        /// Log format: "text" or "json".
        #[arg(long, value_parser = parse_log_format)]
        log_format: Option<LogFormat>,
    },
    /// Run the simulated model server used by `demo` and by the tests.
    Predictor(PredictorOptions),
}

fn parse_log_format(value: &str) -> Result<LogFormat, String> {
    match value {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        other => Err(format!("invalid log format {other:?}: expected \"text\" or \"json\"")),
    }
}

/// Entry point of the `coldgate` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file, config } => {
            let path = file.or(config).expect("clap requires one of the two");
            check_config(&path)
        }
        Command::Serve { config: path, log_format } => match config::load(&path) {
            Ok(loaded) => {
                for warning in environment_warnings(&loaded) {
                    eprintln!("warning: {warning}");
                }
                serve(loaded, Some(path), log_format)
            }
            Err(error) => {
                eprintln!("{error}");
                ExitCode::FAILURE
            }
        },
        Command::Demo { listen, admin_listen, load_ms, idle_timeout, log_format } => {
            match demo_config(&listen, &admin_listen, load_ms, &idle_timeout) {
                Ok(loaded) => {
                    print_demo_help(&loaded);
                    serve(loaded, None, log_format)
                }
                Err(message) => {
                    eprintln!("{message}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Predictor(options) => {
            init_logging(LogFormat::Text, "info");
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("failed to build the tokio runtime");
            match runtime.block_on(predictor::run(options)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("predictor failed: {error}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn check_config(file: &Path) -> ExitCode {
    match config::load(file) {
        Ok(loaded) => {
            for warning in environment_warnings(&loaded) {
                println!("warning: {warning}");
            }
            println!("{}: valid, {} service(s)", file.display(), loaded.services.len());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{error}");
            ExitCode::FAILURE
        }
    }
}

/// Problems with this machine rather than with the file: a process command that is not
/// found. They are warnings because the file may be meant for another machine.
fn environment_warnings(config: &Config) -> Vec<String> {
    let mut warnings = Vec::new();
    for service in &config.services {
        let config::Backend::Process(process) = &service.backend else { continue };
        if !command_exists(&process.command, process.working_dir.as_deref()) {
            warnings.push(format!(
                "service {:?}: process command {:?} was not found (looked in {}); its first request will fail with 502",
                service.name,
                process.command,
                if process.command.contains('/') { "the working directory" } else { "PATH" }
            ));
        }
    }
    warnings
}

fn command_exists(command: &str, working_dir: Option<&Path>) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let executable = |path: &Path| path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if command.contains('/') {
        let path = Path::new(command);
        return match (path.is_relative(), working_dir) {
            (true, Some(dir)) => executable(&dir.join(path)),
            _ => executable(path),
        };
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| executable(&dir.join(command))))
        .unwrap_or(false)
}

fn init_logging(format: LogFormat, filter: &str) {
    // RUST_LOG, when set, wins over the configuration so operators can debug without edits.
    // kube's client logs every failed API request at ERROR, several per second while the
    // API is unreachable; coldgate logs those failures itself, once per distinct error.
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(format!("{filter},kube_client::client::builder=off")))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only make sense on a terminal, not in a file or a log collector.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

fn serve(config: Config, config_path: Option<PathBuf>, log_format: Option<LogFormat>) -> ExitCode {
    init_logging(log_format.unwrap_or(config.log.format), &config.log.filter);
    raise_open_file_limit();
    let threads = server::worker_threads(config.server.threads);
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            error!(%error, "failed to build the tokio runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let listeners = Listeners::bind(config.server.listen, config.server.admin_listen)?;
        server::run(config, config_path, listeners, shutdown_signal()).await
    });
    // Everything is stopped by now; do not wait for idle pooled connections to wind down.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            error!(%error, "coldgate failed");
            ExitCode::FAILURE
        }
    }
}

/// Raises the soft limit on open files to the hard limit: every held request keeps a client
/// socket open, and the default soft limit (often 1024) would cap held requests well below
/// `max_total_queued`.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 || limit.rlim_cur >= limit.rlim_max {
            return;
        }
        let previous = limit.rlim_cur;
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
            info!(from = previous, to = limit.rlim_max, "raised the open file limit");
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).expect("failed to install the SIGTERM handler");
    let mut interrupt = signal(SignalKind::interrupt()).expect("failed to install the SIGINT handler");
    let name = tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    };
    info!(signal = name, "received shutdown signal");
}

/// Builds the demo configuration: one service backed by this binary's `predictor`
/// subcommand, reachable as localhost, 127.0.0.1 or demo.local.
fn demo_config(listen: &str, admin_listen: &str, load_ms: u64, idle_timeout: &str) -> Result<Config, String> {
    let exe = std::env::current_exe().map_err(|e| format!("failed to find the coldgate executable: {e}"))?;
    let quote = |s: &str| toml::Value::String(s.to_string()).to_string();
    let text = format!(
        r#"
[server]
listen = {listen}
admin_listen = {admin_listen}
drain_delay = "0s"
shutdown_grace = "10s"

[defaults]
idle_timeout = {idle_timeout}
queue_timeout = "2m"

[[service]]
name = "demo"
hosts = ["localhost", "127.0.0.1", "demo.local"]
readiness_path = "/v2/models/demo/ready"

[service.process]
command = {exe}
args = ["predictor", "--port", "{{port}}", "--model", "demo", "--load-ms", "{load_ms}"]
stop_grace = "5s"
"#,
        listen = quote(listen),
        admin_listen = quote(admin_listen),
        idle_timeout = quote(idle_timeout),
        exe = quote(&exe.to_string_lossy()),
    );
    config::parse(&text, "demo configuration").map_err(|e| e.to_string())
}

fn print_demo_help(config: &Config) {
    let data = config.server.listen;
    let admin = config.server.admin_listen;
    println!(
        r#"coldgate demo: the "demo" model server starts on the first request and stops when idle.

  Send a prediction (the first one waits for the simulated model load):
    curl -s http://{data}/v2/models/demo/infer -H 'content-type: application/json' \
      -d '{{"inputs":[{{"name":"x","shape":[3],"datatype":"FP32","data":[1,2,3]}}]}}'
  Watch a streamed response:
    curl -N 'http://{data}/sse?events=5&interval_ms=300&size=40'
  Service state and metrics:
    curl -s http://{admin}/status
    curl -s http://{admin}/metrics | grep coldgate_
"#
    );
}
