//! Test support: runs the real `coldgate` binary on loopback ports and talks to it over
//! real sockets. The simulated predictor is the same binary's `predictor` subcommand.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::net::TcpStream;

pub const BIN: &str = env!("CARGO_BIN_EXE_coldgate");

/// A running coldgate process with its log lines.
pub struct Coldgate {
    child: Option<Child>,
    pub data: SocketAddr,
    pub admin: SocketAddr,
    pub logs: Arc<Mutex<Vec<String>>>,
    pub dir: tempfile::TempDir,
}

impl Coldgate {
    /// Starts `coldgate serve` with the given TOML (its [server] listen addresses should be
    /// 127.0.0.1:0) and waits until it logs its bound addresses.
    pub fn start(config: &str) -> Coldgate {
        let dir = tempfile::tempdir().expect("create temp dir");
        Self::start_in(dir, config)
    }

    pub fn start_in(dir: tempfile::TempDir, config: &str) -> Coldgate {
        let path = dir.path().join("coldgate.toml");
        std::fs::write(&path, config).expect("write config");
        let mut child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&path)
            .args(["--log-format", "json"])
            .env("RUST_LOG", "info,coldgate=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn coldgate");

        let logs = Arc::new(Mutex::new(Vec::new()));
        let (sender, receiver) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        for (stream, is_stdout) in [(Box::new(stdout) as Box<dyn std::io::Read + Send>, true), (Box::new(stderr), false)] {
            let logs = logs.clone();
            let sender = sender.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { return };
                    if is_stdout {
                        if let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) {
                            if value["message"] == "listening" {
                                let _ = sender.send((
                                    value["data_addr"].as_str().unwrap().parse::<SocketAddr>().unwrap(),
                                    value["admin_addr"].as_str().unwrap().parse::<SocketAddr>().unwrap(),
                                ));
                            }
                        }
                    }
                    logs.lock().unwrap().push(line);
                }
            });
        }
        let (data, admin) = match receiver.recv_timeout(Duration::from_secs(30)) {
            Ok(addrs) => addrs,
            Err(_) => {
                let _ = child.kill();
                panic!("coldgate did not start; logs:\n{}", logs.lock().unwrap().join("\n"));
            }
        };
        Coldgate { child: Some(child), data, admin, logs, dir }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// Sends SIGTERM and returns the exit status, waiting at most `limit`.
    pub fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    pub fn log_text(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    pub async fn status(&self) -> serde_json::Value {
        let response = get(self.admin, "admin", "/status").await;
        assert_eq!(response.0, StatusCode::OK);
        serde_json::from_slice(&response.1).expect("status is JSON")
    }

    pub async fn service_status(&self, name: &str) -> serde_json::Value {
        let status = self.status().await;
        status["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("service {name} missing from /status"))
    }

    /// Polls /status until `predicate` holds for the service, or panics after `limit`.
    pub async fn wait_for_service(&self, name: &str, limit: Duration, predicate: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let start = Instant::now();
        loop {
            let status = self.service_status(name).await;
            if predicate(&status) {
                return status;
            }
            if start.elapsed() > limit {
                panic!("service {name} did not reach the expected state within {limit:?}; last status: {status}\nlogs:\n{}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn metrics(&self) -> String {
        let response = get(self.admin, "admin", "/metrics").await;
        String::from_utf8(response.1.to_vec()).unwrap()
    }
}

impl Drop for Coldgate {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(15) {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- coldgate logs ----\n{}", self.log_text());
        }
    }
}

/// The `[[service]]` process table that runs the simulated predictor with extra flags.
pub fn predictor_process(extra_args: &[&str]) -> String {
    let mut args = vec!["predictor", "--port", "{port}", "--model", "demo"];
    args.extend_from_slice(extra_args);
    let args: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
    format!("[service.process]\ncommand = {BIN:?}\nargs = [{}]\nstop_grace = \"5s\"\n", args.join(", "))
}

/// A config with one service "demo" on host demo.local, the given [defaults] lines and
/// predictor flags.
pub fn one_service_config(defaults: &str, predictor_args: &[&str]) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndrain_delay = \"0s\"\nshutdown_grace = \"10s\"\n\n\
         [defaults]\n{defaults}\n\n\
         [[service]]\nname = \"demo\"\nhosts = [\"demo.local\"]\nreadiness_path = \"/v2/models/demo/ready\"\n\n{}",
        predictor_process(predictor_args)
    )
}

/// Counts the `start` and `ready` lines of a predictor start log.
pub fn start_log_counts(path: &Path) -> (usize, usize) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let starts = text.lines().filter(|l| l.starts_with("start ")).count();
    let readies = text.lines().filter(|l| l.starts_with("ready ")).count();
    (starts, readies)
}

pub fn start_log_path(dir: &Path) -> PathBuf {
    dir.join("starts.log")
}

/// Sends one request on a fresh HTTP/1.1 connection and returns the full response.
pub async fn send(addr: SocketAddr, request: Request<Full<Bytes>>) -> Response<Bytes> {
    try_send(addr, request).await.expect("request failed")
}

pub async fn try_send(addr: SocketAddr, request: Request<Full<Bytes>>) -> Result<Response<Bytes>, String> {
    let response = open(addr, request).await?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map_err(|e| format!("body: {e}"))?.to_bytes();
    Ok(Response::from_parts(parts, body))
}

/// Sends a request and returns the response with its body still streaming.
pub async fn open(addr: SocketAddr, request: Request<Full<Bytes>>) -> Result<Response<hyper::body::Incoming>, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(connection);
    sender.send_request(request).await.map_err(|e| format!("send: {e}"))
}

pub fn request(method: &str, host: &str, path: &str, body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
        .header("content-type", "application/json")
        .body(Full::new(body.into()))
        .unwrap()
}

/// GET with the given Host; returns status and body.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> (StatusCode, Bytes) {
    let response = send(addr, request("GET", host, path, Bytes::new())).await;
    (response.status(), response.into_body())
}

/// True while the process exists and is not a zombie (an exited child that nobody has
/// reaped yet still answers kill(pid, 0)).
pub fn process_alive(pid: i32) -> bool {
    if unsafe { libc::kill(pid, 0) } != 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state letter follows the parenthesised command name.
        Ok(stat) => stat.rsplit_once(')').is_none_or(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// The variable that names the Python interpreter of the KServe venv.
pub const KSERVE_PYTHON_VAR: &str = "COLDGATE_KSERVE_PYTHON";

/// Returns the interpreter named by COLDGATE_KSERVE_PYTHON, or None when the variable is
/// unset. Panics when it names a file that does not exist.
pub fn kserve_python() -> Option<PathBuf> {
    let value = std::env::var_os(KSERVE_PYTHON_VAR)?;
    // A relative path is taken from the repository root, where `cargo test` runs.
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(&value);
    assert!(
        path.is_file(),
        "{KSERVE_PYTHON_VAR} is set to {:?}, but {} does not exist. Run scripts/setup-venv.sh to create \
         .venv-kserve, or unset {KSERVE_PYTHON_VAR} to skip this test.",
        value,
        path.display()
    );
    Some(path)
}

/// Reports a test skipped for want of the KServe venv.
pub fn report_kserve_skip(test: &str) {
    use std::io::Write;
    // Written to the stderr handle, which libtest does not capture, so that the skip shows
    // in a plain `cargo test` run.
    let _ = writeln!(
        std::io::stderr(),
        "{test} skipped: {KSERVE_PYTHON_VAR} is not set. Run scripts/setup-venv.sh and set it to .venv-kserve/bin/python to run it."
    );
}
