//! Held-request benchmark: memory per held request and time to release them all.
//!
//! Starts the release build of coldgate with the simulated predictor behind it, opens N
//! client connections that each send a small POST while the service is cold, measures
//! coldgate's resident memory with 0 and with N requests held (from /proc/PID/status),
//! then measures how long after the predictor turned ready the last response arrived.
//!
//! Run: `cargo bench --bench held -- [N]` (default 1000). Loopback only; bounded by N and
//! by a 120 s overall limit.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_coldgate");

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

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
    if !benchmarking {
        println!("smoke run with {count} requests (debug build); use `cargo bench --bench held` for figures");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    runtime.block_on(run(count));
}

async fn run(count: usize) {
    let dir = tempfile::tempdir().unwrap();
    let start_log = dir.path().join("starts.log");
    // The model load must outlast queuing all N requests; 2 s plus 1 ms per request.
    let load_ms = 2000 + count as u64;
    let config = format!(
        r#"[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
max_total_queued = {max}
drain_delay = "0s"
[defaults]
max_queued_requests = {max}
queue_timeout = "120s"
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

    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = rss_kib(pid);

    let body = r#"{"inputs":[{"name":"x","shape":[4],"datatype":"FP32","data":[1,2,3,4]}]}"#;
    let method_get = std::env::var("HELD_BENCH_GET").is_ok();
    let request = if method_get {
        "GET /slow?ms=0 HTTP/1.1\r\nHost: bench.local\r\nConnection: close\r\n\r\n".to_string()
    } else {
        format!(
        "POST /echo HTTP/1.1\r\nHost: bench.local\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    };
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(count);
    for _ in 0..count {
        let request = request.clone();
        tasks.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(data).await.expect("connect");
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut response = Vec::new();
            stream.read_to_end(&mut response).await.unwrap();
            let arrived = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
            (response.starts_with(b"HTTP/1.1 200"), arrived)
        }));
    }
    while queue_depth(admin).await < count as u64 {
        assert!(started.elapsed() < Duration::from_secs(60), "requests were not all held within 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let queued_in = started.elapsed();
    let rss_held = rss_kib(pid);

    let mut ok = 0;
    let mut last = Duration::ZERO;
    for task in tasks {
        let (success, arrived) = tokio::time::timeout(Duration::from_secs(120), task).await.unwrap().unwrap();
        ok += success as usize;
        last = last.max(arrived);
    }
    let log = std::fs::read_to_string(&start_log).unwrap();
    let ready_ns: u128 = log
        .lines()
        .find_map(|l| l.strip_prefix("ready ").and_then(|r| r.split("unix_ns=").nth(1)).map(|v| v.trim().parse().unwrap()))
        .expect("ready line in the start log");
    let release = Duration::from_nanos((last.as_nanos() - ready_ns) as u64);

    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let _ = child.wait();

    let per_request = (rss_held.saturating_sub(rss_before)) as f64 * 1024.0 / count as f64;
    println!("held requests: {count}");
    println!("answered 200: {ok}");
    println!("all held after: {queued_in:?}");
    println!("coldgate RSS idle: {rss_before} KiB, with {count} held: {rss_held} KiB");
    println!("memory per held request: {:.0} bytes ({:.2} KiB)", per_request, per_request / 1024.0);
    println!("last response after predictor ready: {release:?}");
}
