//! Held-request benchmark: memory per held request and time to release them all.
//!
//! Starts the release build of coldgate with the simulated predictor behind it, opens N
//! client connections that each send a small POST while the service is cold, measures
//! coldgate's resident memory with 0 and with N requests held (from /proc/PID/status),
//! then measures how long after the predictor turned ready the last response arrived.
//!
//! With `--keep-alive`, each client first sends one request while the service is warm,
//! keeps its connection open until the service has scaled to zero, and then sends the
//! request that is held. The idle figure is then taken with the N idle keep-alive
//! connections open, so the difference is the cost of holding a request on a connection
//! that already served one.
//!
//! Run: `cargo bench --bench held -- [N] [--keep-alive]` (default 1000; GETs instead of
//! POSTs with `HELD_BENCH_GET=1`). Loopback only; bounded by N and by a 120 s limit per
//! wait.

#[path = "support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_coldgate");

async fn admin_get(admin: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(admin).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    out.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default()
}

async fn queue_depth(admin: SocketAddr) -> u64 {
    let body = admin_get(admin, "/status").await;
    let value: serde_json::Value = serde_json::from_str(&body).unwrap();
    value["services"][0]["queue_depth"].as_u64().unwrap()
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` does not, and then this runs
    // as a quick smoke test with fewer requests (its figures are not benchmark results).
    let benchmarking = std::env::args().any(|a| a == "--bench");
    let default_count = if benchmarking { 1000 } else { 100 };
    let count: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(default_count);
    let keep_alive = std::env::args().any(|a| a == "--keep-alive");
    if !benchmarking {
        println!("smoke run with {count} requests (debug build); use `cargo bench --bench held` for figures");
    }
    let fd_limit = support::raise_fd_limit();
    assert!(
        fd_limit as usize > count + 100,
        "the open-file limit {fd_limit} is too low for {count} client sockets; raise the hard limit"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    runtime.block_on(run(count, keep_alive));
}

/// Reads one response with a Content-Length body from a kept-alive connection and
/// returns whether its status was 200.
async fn read_response(stream: &mut TcpStream) -> bool {
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await.expect("read a response");
        assert!(n > 0, "coldgate closed a keep-alive connection before its response ended");
        received.extend_from_slice(&chunk[..n]);
        let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
        let head = String::from_utf8_lossy(&received[..end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length:"))
            .map(|value| value.trim().parse().unwrap())
            .expect("a Content-Length response");
        if received.len() >= end + 4 + length {
            return received.starts_with(b"HTTP/1.1 200");
        }
    }
}

async fn service_state(admin: SocketAddr) -> String {
    let body = admin_get(admin, "/status").await;
    let value: serde_json::Value = serde_json::from_str(&body).unwrap();
    value["services"][0]["state"].as_str().unwrap_or_default().to_string()
}

async fn run(count: usize, keep_alive: bool) {
    let dir = tempfile::tempdir().unwrap();
    let start_log = dir.path().join("starts.log");
    // The model load must outlast queuing all N requests; 2 s plus 1 ms per request.
    let load_ms = 2000 + count as u64;
    // With --keep-alive the service must scale to zero while the connections stay open.
    let idle_timeout = if keep_alive { "1s" } else { "10m" };
    let config = format!(
        r#"[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
max_total_queued = {max}
drain_delay = "0s"
[defaults]
max_queued_requests = {max}
queue_timeout = "120s"
idle_timeout = "{idle_timeout}"
[[service]]
name = "bench"
hosts = ["bench.local"]
readiness_path = "/ready"
[service.process]
command = {BIN:?}
args = ["predictor", "--port", "{{port}}", "--load-ms", "{load_ms}", "--start-log", {log:?}]
"#,
        max = count + 10,
        log = start_log.to_str().unwrap(),
    );
    let config_path = dir.path().join("bench.toml");
    std::fs::write(&config_path, config).unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config_path)
        .args(["--log-format", "json"])
        .env("RUST_LOG", "warn,coldgate::server=info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (data, admin) = loop {
        let line = lines.next().expect("coldgate exited before listening").unwrap();
        let value: serde_json::Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(_) => continue,
        };
        if value["message"] == "listening" {
            break (
                value["data_addr"].as_str().unwrap().parse::<SocketAddr>().unwrap(),
                value["admin_addr"].as_str().unwrap().parse::<SocketAddr>().unwrap(),
            );
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let pid = child.id();

    let body = r#"{"inputs":[{"name":"x","shape":[4],"datatype":"FP32","data":[1,2,3,4]}]}"#;
    let method_get = std::env::var("HELD_BENCH_GET").is_ok();
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let request = if method_get {
        format!("GET /slow?ms=0 HTTP/1.1\r\nHost: bench.local\r\nConnection: {connection}\r\n\r\n")
    } else {
        format!(
            "POST /echo HTTP/1.1\r\nHost: bench.local\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n{body}",
            body.len()
        )
    };

    // Every client waits for `go` before it sends the request that is held. In keep-alive
    // mode it first connects and completes one warm request.
    let (go, _) = tokio::sync::broadcast::channel::<()>(1);
    let (warm_done, mut warm_done_receiver) = tokio::sync::mpsc::channel::<()>(count.max(1));
    let mut tasks = Vec::with_capacity(count);
    for _ in 0..count {
        let request = request.clone();
        let mut go = go.subscribe();
        let warm_done = warm_done.clone();
        tasks.push(tokio::spawn(async move {
            if !keep_alive {
                go.recv().await.unwrap();
            }
            let mut stream = TcpStream::connect(data).await.expect("connect");
            if keep_alive {
                stream.write_all(request.as_bytes()).await.unwrap();
                assert!(read_response(&mut stream).await, "the warm request failed");
                warm_done.send(()).await.unwrap();
                go.recv().await.unwrap();
            }
            stream.write_all(request.as_bytes()).await.unwrap();
            let success = if keep_alive {
                read_response(&mut stream).await
            } else {
                let mut response = Vec::new();
                stream.read_to_end(&mut response).await.unwrap();
                response.starts_with(b"HTTP/1.1 200")
            };
            let arrived = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
            (success, arrived)
        }));
    }
    drop(warm_done);
    if keep_alive {
        for _ in 0..count {
            tokio::time::timeout(Duration::from_secs(120), warm_done_receiver.recv()).await.expect("warm requests in time");
        }
        let waiting = Instant::now();
        while service_state(admin).await != "idle" {
            assert!(waiting.elapsed() < Duration::from_secs(120), "the service did not scale to zero within 120 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = support::rss_kib(pid);
    let started = Instant::now();
    let _ = go.send(());
    while queue_depth(admin).await < count as u64 {
        assert!(started.elapsed() < Duration::from_secs(60), "requests were not all held within 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let queued_in = started.elapsed();
    let rss_held = support::rss_kib(pid);

    let mut ok = 0;
    let mut last = Duration::ZERO;
    for task in tasks {
        let (success, arrived) = tokio::time::timeout(Duration::from_secs(120), task).await.unwrap().unwrap();
        ok += success as usize;
        last = last.max(arrived);
    }
    let log = std::fs::read_to_string(&start_log).unwrap();
    // The start that released the held requests is the last one.
    let ready_ns: u128 = log
        .lines()
        .filter_map(|l| l.strip_prefix("ready ").and_then(|r| r.split("unix_ns=").nth(1)).map(|v| v.trim().parse().unwrap()))
        .next_back()
        .expect("ready line in the start log");
    let release = Duration::from_nanos((last.as_nanos() - ready_ns) as u64);

    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let _ = child.wait();

    let per_request = (rss_held.saturating_sub(rss_before)) as f64 * 1024.0 / count as f64;
    println!("held requests: {count}{}", if keep_alive { ", each on a connection that served one request before" } else { ", each on a new connection" });
    println!("answered 200: {ok}");
    println!("all held after: {queued_in:?}");
    let idle_label = if keep_alive { format!("with {count} idle keep-alive connections") } else { "idle".to_string() };
    println!("coldgate RSS {idle_label}: {rss_before} KiB, with {count} held: {rss_held} KiB");
    println!("memory per held request: {:.0} bytes ({:.2} KiB)", per_request, per_request / 1024.0);
    println!("last response after predictor ready: {release:?}");
}
