//! Request storm on a cold service: N concurrent requests (default 1,000) arrive at a
//! service that has no instance. Reports errors (target 0), the number of instance starts
//! (target 1), and how long after the instance turned ready each response arrived.
//!
//! The service is coldgate's simulated predictor (`coldgate predictor --load-ms MS
//! --start-log PATH`), which logs a `start` line per process and a `ready ... unix_ns=`
//! line at the instant it turns ready. Each request is a small POST to the KServe v2
//! infer path on its own connection, from one client thread. For a request sent before
//! the instance was ready, its response time minus the part of the cold start it waited
//! for (ready - sent) equals arrival - ready. The table reports the percentiles of that
//! value over those requests. Requests sent after the ready instant are counted but left
//! out of the percentiles.
//!
//! The table also shows the increase of the kernel's `ListenOverflows` counter during the
//! storm: connections whose SYN or handshake was dropped because a listener's accept
//! queue was full. The client then retries after a retransmission timeout (about 1 s at
//! first), which shows up in the tail. The counter covers the whole network namespace, so
//! other programs on the machine can add to it.
//!
//! Rounds run on the same coldgate: after each storm the service scales to zero before
//! the next one. The default `--idle-timeout` of 10 s outlasts three SYN retransmissions
//! (1 + 2 + 4 s). With 1 s, a connection that the full accept queue delayed by 3 s
//! arrived after the instance had stopped and started a second one.
//!
//! Full run (release build): `cargo bench --bench storm -- [--requests 1000] [--rounds 3]
//! [--load-ms 1000] [--idle-timeout 10s]`. Smoke run: `cargo test --bench storm` (debug build, no `--bench`)
//! runs one storm of 100 requests with the same checks. Neither needs nginx or wrk.
//!
//! Loopback only; bounded by the request count and a 120 s limit per request.

#[path = "support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::Coldgate;

const HOST: &str = "storm.local";
const BODY: &str = r#"{"inputs":[{"name":"x","shape":[4],"datatype":"FP32","data":[1,2,3,4]}]}"#;

/// Outcome of one request: status (0 when the connection failed) and Unix ns instants.
struct Outcome {
    status: u16,
    sent: u128,
    /// When the TCP connect finished, or None when it failed.
    connected: Option<u128>,
    arrived: u128,
    error: Option<String>,
}

fn main() {
    let benchmarking = support::benchmarking();
    let requests: usize = support::arg("requests", if benchmarking { 1000 } else { 100 });
    let rounds: usize = support::arg("rounds", if benchmarking { 3 } else { 1 });
    let load_ms: u64 = support::arg("load-ms", 1000);
    let idle_timeout: String = support::arg("idle-timeout", "10s".to_string());
    if !benchmarking {
        println!("smoke run with {requests} requests (debug build); use `cargo bench --bench storm` for figures");
    }
    let fd_limit = support::raise_fd_limit();
    assert!(
        fd_limit > requests as u64 + 100,
        "the open-file limit {fd_limit} is too low for {requests} client sockets; raise it with ulimit -n"
    );

    let dir = tempfile::tempdir().unwrap();
    let start_log = dir.path().join("starts.log");
    let config = format!(
        r#"{server}
[defaults]
idle_timeout = {idle_timeout}
queue_timeout = "120s"
max_queued_requests = {max}
[[service]]
name = "storm"
hosts = [{host}]
readiness_path = "/v2/models/demo/ready"
[service.process]
command = {command}
args = ["predictor", "--port", "{{port}}", "--load-ms", "{load_ms}", "--start-log", {log}]
stop_grace = "5s"
"#,
        server = support::server_table(0, requests * 2),
        max = requests * 2,
        idle_timeout = support::toml_string(&idle_timeout),
        host = support::toml_string(HOST),
        command = support::toml_string(support::COLDGATE),
        log = support::toml_string(start_log.to_str().unwrap()),
    );
    let config_path = dir.path().join("coldgate.toml");
    std::fs::write(&config_path, config).unwrap();
    let coldgate = Coldgate::start(&config_path);

    println!("machine: {}", support::machine_summary());
    println!("{rounds} storms of {requests} concurrent requests; predictor load {load_ms} ms; idle_timeout {idle_timeout}");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    println!(
        "| round | requests | 200 | errors | starts | activations | upstream connect retries | listen overflows | connect p50 | connect p99 | connected after ready | after ready p50 | p99 | max |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut total_errors = 0;
    for round in 1..=rounds {
        coldgate.wait_for_state(0, "idle", Duration::from_secs(60));
        let starts_before = count_lines(&start_log, "start ");
        let activations_before = support::metric_sum(coldgate.admin, "coldgate_activations_total");
        let retries_before = support::metric_sum(coldgate.admin, "coldgate_connect_retries_total");
        let overflows_before = support::listen_overflows();
        let outcomes = runtime.block_on(storm(coldgate.data, requests));
        let overflows = support::listen_overflows()
            .zip(overflows_before)
            .map_or("-".to_string(), |(after, before)| (after - before).to_string());
        let starts = count_lines(&start_log, "start ") - starts_before;
        let activations = support::metric_sum(coldgate.admin, "coldgate_activations_total") - activations_before;
        let retries = support::metric_sum(coldgate.admin, "coldgate_connect_retries_total") - retries_before;

        let ok = outcomes.iter().filter(|o| o.status == 200).count();
        let errors = outcomes.len() - ok;
        total_errors += errors;
        for outcome in outcomes.iter().filter(|o| o.status != 200).take(5) {
            eprintln!("round {round}: status {} error {:?}", outcome.status, outcome.error);
        }
        // With more than one start, the figures below refer to the last instance.
        let ready = ready_ns_of_last_start(&start_log);
        let first_sent = outcomes.iter().map(|o| o.sent).min().unwrap();
        assert!(ready > first_sent, "round {round}: the predictor turned ready before the storm began, so no request waited");

        let sent_after_ready = outcomes.iter().filter(|o| o.sent >= ready).count();
        if sent_after_ready > 0 {
            println!("round {round}: {sent_after_ready} requests were sent after the ready instant and are left out of the after-ready percentiles; raise --load-ms");
        }
        let connected_after_ready = outcomes.iter().filter(|o| o.connected.is_some_and(|c| c >= ready)).count();
        let mut connect: Vec<i128> = outcomes
            .iter()
            .filter_map(|o| o.connected.map(|connected| connected as i128 - o.sent as i128))
            .collect();
        connect.sort();
        let mut after_ready: Vec<i128> = outcomes
            .iter()
            .filter(|o| o.status == 200 && o.sent < ready)
            .map(|o| o.arrived as i128 - ready as i128)
            .collect();
        after_ready.sort();
        println!(
            "| {round} | {requests} | {ok} | {errors} | {starts} | {activations} | {retries} | {overflows} | {} | {} | {connected_after_ready} | {} | {} | {} |",
            percentile_ms(&connect, 0.5),
            percentile_ms(&connect, 0.99),
            percentile_ms(&after_ready, 0.5),
            percentile_ms(&after_ready, 0.99),
            percentile_ms(&after_ready, 1.0)
        );
        if starts != 1 {
            let log = std::fs::read_to_string(&start_log).unwrap_or_default();
            panic!("round {round}: the storm started {starts} instances; expected exactly one. Predictor start log:\n{log}");
        }
    }
    drop(coldgate);
    println!("percentiles are nearest-rank; \"after ready\" is response arrival minus the predictor's ready instant");
    assert_eq!(total_errors, 0, "requests failed during the storms; see the errors above");
    if !benchmarking {
        println!("smoke run finished; the figures above are from a debug build");
    }
}

/// Formats the nearest-rank percentile `q` of sorted nanosecond values in milliseconds, or
/// "-" when there are none.
fn percentile_ms(sorted: &[i128], q: f64) -> String {
    if sorted.is_empty() {
        return "-".to_string();
    }
    format!("{:.1} ms", support::percentile(sorted, q) as f64 / 1e6)
}

/// Sends `count` POSTs at once, each on its own connection, and waits for all responses.
async fn storm(data: SocketAddr, count: usize) -> Vec<Outcome> {
    let request = format!(
        "POST /v2/models/demo/infer HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    let mut tasks = Vec::with_capacity(count);
    for _ in 0..count {
        let request = request.clone();
        tasks.push(tokio::spawn(async move {
            let sent = support::unix_ns();
            let mut connected = None;
            let result = tokio::time::timeout(Duration::from_secs(120), exchange(data, &request, &mut connected)).await;
            let arrived = support::unix_ns();
            let (status, error) = match result {
                Ok(Ok(status)) => (status, None),
                Ok(Err(error)) => (0, Some(error.to_string())),
                Err(_) => (0, Some("no response within 120 s".to_string())),
            };
            Outcome { status, sent, connected, arrived, error }
        }));
    }
    let mut outcomes = Vec::with_capacity(count);
    for task in tasks {
        outcomes.push(task.await.unwrap());
    }
    outcomes
}

async fn exchange(data: SocketAddr, request: &str, connected: &mut Option<u128>) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect(data).await?;
    *connected = Some(support::unix_ns());
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    support::parse_response(&response).map(|(status, _)| status)
}

fn count_lines(path: &Path, prefix: &str) -> usize {
    std::fs::read_to_string(path).unwrap_or_default().lines().filter(|l| l.starts_with(prefix)).count()
}

/// Returns the `unix_ns` of the `ready` line of the most recently started predictor. The
/// start log has `start pid=PID ...` and `ready pid=PID unix_ns=NS` lines.
fn ready_ns_of_last_start(path: &Path) -> u128 {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let pid_of = |line: &str| line.split_whitespace().nth(1).map(str::to_string);
    let last_pid = log
        .lines()
        .filter(|line| line.starts_with("start "))
        .filter_map(pid_of)
        .next_back()
        .expect("a start line in the predictor's start log");
    log.lines()
        .filter(|line| line.starts_with("ready ") && pid_of(line).as_deref() == Some(last_pid.as_str()))
        .filter_map(|line| line.split("unix_ns=").nth(1))
        .filter_map(|value| value.trim().parse().ok())
        .next_back()
        .unwrap_or_else(|| panic!("no ready line for the predictor with {last_pid} in its start log"))
}
