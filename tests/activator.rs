//! End-to-end behaviour of the activator with the process backend: the real coldgate
//! binary, the simulated predictor as a real child process, and real sockets.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::StatusCode;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HOST: &str = "demo.local";

fn infer_body(values: &[f64]) -> String {
    serde_json::json!({"inputs": [{"name": "x", "shape": [values.len()], "datatype": "FP32", "data": values}]}).to_string()
}

/// Builds a config whose predictor logs its starts into the test's temp dir.
fn start_with(defaults: &str, predictor_args: &[&str]) -> Coldgate {
    let dir = tempfile::tempdir().unwrap();
    let log = start_log_path(dir.path());
    let mut args: Vec<&str> = predictor_args.to_vec();
    let log_str = log.to_str().unwrap().to_string();
    args.extend_from_slice(&["--start-log", &log_str]);
    Coldgate::start_in(dir, &one_service_config(defaults, &args))
}

fn starts(coldgate: &Coldgate) -> (usize, usize) {
    start_log_counts(&start_log_path(coldgate.dir.path()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_start_storm_holds_all_requests_and_starts_once() {
    let coldgate = start_with("", &["--load-ms", "1500"]);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let addr = coldgate.data;
        tasks.push(tokio::spawn(async move {
            let body = infer_body(&[i as f64, 1.0]);
            let response = try_send(addr, request("POST", HOST, "/v2/models/demo/infer", body)).await;
            (i, response, Instant::now())
        }));
    }
    let mut latest = started;
    for task in tasks {
        let (i, response, done) = task.await.unwrap();
        let response = response.unwrap_or_else(|e| panic!("request {i} failed: {e}"));
        assert_eq!(response.status(), StatusCode::OK, "request {i}: {:?}", response.body());
        let value: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(value["outputs"][0]["data"][0].as_f64(), Some(i as f64 + 1.0), "request {i} got a wrong result");
        latest = latest.max(done);
    }
    let elapsed = latest - started;
    assert!(elapsed >= Duration::from_millis(1400), "answered before the model could have loaded: {elapsed:?}");
    assert!(elapsed < Duration::from_secs(15), "storm took {elapsed:?}");
    assert_eq!(starts(&coldgate), (1, 1), "exactly one predictor start");
    let status = coldgate.service_status("demo").await;
    assert_eq!(status["state"], "serving");
    assert_eq!(status["queue_depth"], 0);
    eprintln!("storm: 200 requests answered {elapsed:?} after the first was sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overflow_gets_503_with_retry_after_at_once() {
    let coldgate = start_with("max_queued_requests = 5", &["--load-ms", "3000"]);
    let mut held = Vec::new();
    for _ in 0..5 {
        let addr = coldgate.data;
        held.push(tokio::spawn(async move { try_send(addr, request("GET", HOST, "/slow?ms=1", "")).await }));
    }
    coldgate.wait_for_service("demo", Duration::from_secs(5), |s| s["queue_depth"] == 5).await;

    let sent = Instant::now();
    let response = send(coldgate.data, request("GET", HOST, "/slow?ms=1", "")).await;
    let elapsed = sent.elapsed();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"), "503 without Retry-After");
    assert!(elapsed < Duration::from_millis(500), "overflow answer took {elapsed:?}");
    let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
    assert_eq!(body["error"]["code"], "queue_full");
    assert_eq!(body["error"]["service"], "demo");

    for task in held {
        assert_eq!(task.await.unwrap().unwrap().status(), StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_past_queue_timeout_gets_504() {
    let coldgate = start_with("queue_timeout = \"700ms\"", &["--load-ms", "10000"]);
    let sent = Instant::now();
    let response = send(coldgate.data, request("GET", HOST, "/slow?ms=1", "")).await;
    let elapsed = sent.elapsed();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(elapsed >= Duration::from_millis(650), "timed out early: {elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "timed out late: {elapsed:?}");
    let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
    assert_eq!(body["error"]["code"], "queue_timeout");
    let status = coldgate.service_status("demo").await;
    assert_eq!(status["queue_depth"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_hang_up_while_held_frees_its_place() {
    let coldgate = start_with("", &["--load-ms", "2500"]);

    // One GET and one POST with a small body, both abandoned while held.
    let mut held_get = TcpStream::connect(coldgate.data).await.unwrap();
    held_get.write_all(b"GET /echo-get HTTP/1.1\r\nHost: demo.local\r\n\r\n").await.unwrap();
    let mut post = TcpStream::connect(coldgate.data).await.unwrap();
    post.write_all(b"POST /echo HTTP/1.1\r\nHost: demo.local\r\nContent-Length: 5\r\n\r\nhello").await.unwrap();
    coldgate.wait_for_service("demo", Duration::from_secs(5), |s| s["queue_depth"] == 2).await;

    drop(held_get);
    drop(post);
    let left = Instant::now();
    coldgate.wait_for_service("demo", Duration::from_secs(1), |s| s["queue_depth"] == 0).await;
    let freed = left.elapsed();
    let metrics = coldgate.metrics().await;
    assert!(metrics.contains("coldgate_queue_depth{service=\"demo\"} 0"), "queue depth metric not back to 0");

    // Once the predictor is ready, it must have seen neither request.
    coldgate.wait_for_service("demo", Duration::from_secs(10), |s| s["state"] == "serving").await;
    let stats = get(coldgate.data, HOST, "/stats").await;
    let stats: serde_json::Value = serde_json::from_slice(&stats.1).unwrap();
    assert_eq!(stats["requests"], 0, "an abandoned request was forwarded: {stats}");
    eprintln!("hang-up: queue place freed {freed:?} after the clients closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_during_start_fails_held_requests_fast() {
    let coldgate = start_with("queue_timeout = \"60s\"", &["--fail-start-ms", "400"]);
    let sent = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let addr = coldgate.data;
        tasks.push(tokio::spawn(async move { send(addr, request("GET", HOST, "/slow?ms=1", "")).await }));
    }
    for task in tasks {
        let response = task.await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(body["error"]["code"], "activation_failed");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("exit status: 3"), "reason missing from {message:?}");
    }
    let elapsed = sent.elapsed();
    assert!(elapsed < Duration::from_secs(5), "held requests failed after {elapsed:?}, not at once");
    assert_eq!(starts(&coldgate).0, 1);

    // The next request starts the service again.
    let response = send(coldgate.data, request("GET", HOST, "/slow?ms=1", "")).await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(starts(&coldgate).0, 2, "the next request did not start a new instance");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_during_stop_grace_is_held_and_served() {
    let coldgate = start_with("idle_timeout = \"500ms\"", &["--load-ms", "200", "--term-delay-ms", "1500"]);
    let first = send(coldgate.data, request("GET", HOST, "/slow?ms=1", "")).await;
    assert_eq!(first.status(), StatusCode::OK);
    coldgate.wait_for_service("demo", Duration::from_secs(5), |s| s["state"] == "scaling_down").await;

    let response = send(coldgate.data, request("GET", HOST, "/slow?ms=1", "")).await;
    assert_eq!(response.status(), StatusCode::OK, "body: {:?}", response.body());
    assert_eq!(starts(&coldgate).0, 2, "a new instance should serve the request");
}

async fn assert_sse_timing(coldgate: &Coldgate, label: &str) {
    let response = open(coldgate.data, request("GET", HOST, "/sse?events=6&interval_ms=200&size=20", ""))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut arrivals = Vec::new();
    let mut received = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.unwrap();
        if let Some(data) = frame.data_ref() {
            received.extend_from_slice(data);
            let events = received.windows(2).filter(|w| w == b"\n\n").count();
            while arrivals.len() < events {
                arrivals.push(Instant::now());
            }
        }
    }
    assert_eq!(arrivals.len(), 6, "{label}: expected 6 events, got {:?}", String::from_utf8_lossy(&received));
    for pair in arrivals.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(120) && gap <= Duration::from_millis(450),
            "{label}: events arrived {gap:?} apart instead of about 200 ms"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_events_stream_unbuffered_cold_and_warm() {
    let coldgate = start_with("", &["--load-ms", "800"]);
    assert_sse_timing(&coldgate, "after a cold start").await;
    assert_sse_timing(&coldgate, "warm").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_post_bodies_arrive_once_even_with_refused_connections() {
    let coldgate = start_with("", &["--load-ms", "300", "--refuse-after-ready-ms", "400"]);
    let bodies: Vec<Vec<u8>> = (0..3u8)
        .map(|seed| (0..8 * 1024 * 1024).map(|i: usize| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect())
        .collect();
    let mut expected = Vec::new();
    let mut tasks = Vec::new();
    for body in bodies {
        expected.push(sha256_hex(&body));
        let addr = coldgate.data;
        tasks.push(tokio::spawn(async move { send(addr, request("POST", HOST, "/echo", Bytes::from(body))).await }));
    }
    let mut answered = Vec::new();
    for task in tasks {
        let response = task.await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "body: {:?}", response.body());
        let value: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(value["bytes"], 8 * 1024 * 1024);
        answered.push(value["sha256"].as_str().unwrap().to_string());
    }
    let stats = get(coldgate.data, HOST, "/stats").await;
    let stats: serde_json::Value = serde_json::from_slice(&stats.1).unwrap();
    let mut seen: Vec<String> = stats["sha256"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    seen.sort();
    expected.sort();
    answered.sort();
    assert_eq!(answered, expected, "checksums returned to clients");
    assert_eq!(seen, expected, "the predictor must see each body exactly once");
    let metrics = coldgate.metrics().await;
    assert!(
        metrics.lines().any(|l| l.starts_with("coldgate_connect_retries_total{service=\"demo\"}") && !l.ends_with(" 0")),
        "no connect retry was recorded, so the refusal window was not exercised:\n{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_host_gets_404_without_upstream_contact() {
    let coldgate = start_with("", &[]);
    for host in ["other.local", "demo.local.evil", "169.254.169.254"] {
        let (status, body) = get(coldgate.data, host, "/v2/models/demo/ready").await;
        assert_eq!(status, StatusCode::NOT_FOUND, "host {host}");
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["code"], "no_route");
    }
    // X-Forwarded-Host must not route either.
    let mut forwarded = request("GET", "other.local", "/", "");
    forwarded.headers_mut().insert("x-forwarded-host", "demo.local".parse().unwrap());
    assert_eq!(send(coldgate.data, forwarded).await.status(), StatusCode::NOT_FOUND);

    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(starts(&coldgate).0, 0, "an unrouted request started the predictor");
    assert_eq!(coldgate.service_status("demo").await["state"], "idle");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_request_gets_400() {
    let coldgate = start_with("", &[]);
    let mut stream = TcpStream::connect(coldgate.data).await.unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\nHost demo.local\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "got {answer:?}");

    let (status, _) = get(coldgate.data, "bad host!", "/").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(starts(&coldgate).0, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_and_host_reach_the_predictor() {
    let coldgate = start_with("", &[]);
    let response = send(coldgate.data, request("GET", "Demo.Local:8080", "/slow?ms=1", "")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-seen-host"], "Demo.Local:8080");
    assert_eq!(response.headers()["x-seen-forwarded-for"], "127.0.0.1");
    assert_eq!(response.headers()["x-seen-forwarded-proto"], "http");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_service_scales_to_zero_and_starts_again() {
    let coldgate = start_with("idle_timeout = \"600ms\"", &["--load-ms", "200"]);
    for round in 1..=2 {
        let response = send(coldgate.data, request("POST", HOST, "/v2/models/demo/infer", infer_body(&[2.0, 3.0]))).await;
        assert_eq!(response.status(), StatusCode::OK, "round {round}");
        let stats: serde_json::Value = serde_json::from_slice(&get(coldgate.data, HOST, "/stats").await.1).unwrap();
        let pid = stats["pid"].as_i64().unwrap() as i32;
        assert!(process_alive(pid));
        coldgate.wait_for_service("demo", Duration::from_secs(5), |s| s["state"] == "idle").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!process_alive(pid), "round {round}: predictor {pid} still running after scale to zero");
        assert_eq!(starts(&coldgate).0, round);
    }
    let metrics = coldgate.metrics().await;
    assert!(metrics.contains("coldgate_scale_events_total{direction=\"down\",service=\"demo\"} 2"), "{metrics}");
    assert!(metrics.contains("coldgate_activations_total{outcome=\"success\",service=\"demo\"} 2"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_stream_keeps_service_busy() {
    let coldgate = start_with("idle_timeout = \"300ms\"", &["--load-ms", "100"]);
    let started = Instant::now();
    // A stream of 8 events 150 ms apart lasts about 1 s, longer than idle_timeout.
    let response = send(coldgate.data, request("GET", HOST, "/sse?events=8&interval_ms=150&size=20", "")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(1000));
    assert_eq!(response.body().windows(2).filter(|w| w == b"\n\n").count(), 8, "stream cut short");
    assert_eq!(starts(&coldgate).0, 1, "the service was stopped during the stream");
    coldgate.wait_for_service("demo", Duration::from_secs(5), |s| s["state"] == "idle").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limit_caps_requests_per_instance() {
    let coldgate = start_with("max_concurrency_per_endpoint = 2", &["--load-ms", "100"]);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let addr = coldgate.data;
        tasks.push(tokio::spawn(async move { send(addr, request("GET", HOST, "/slow?ms=400", "")).await }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap().status(), StatusCode::OK);
    }
    // 6 requests, 2 at a time, 400 ms each: at least three rounds.
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(1150), "limit not enforced: {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_held_requests_and_stops_children() {
    let config = one_service_config("", &["--load-ms", "1500"]).replace("drain_delay = \"0s\"", "drain_delay = \"500ms\"");
    let mut coldgate = Coldgate::start(&config);
    let addr = coldgate.data;
    let held = tokio::spawn(async move { send(addr, request("GET", HOST, "/slow?ms=1", "")).await });
    coldgate.wait_for_service("demo", Duration::from_secs(5), |s| s["queue_depth"] == 1).await;
    let status = coldgate.service_status("demo").await;
    assert_eq!(status["state"], "activating");

    unsafe { libc::kill(coldgate.pid(), libc::SIGTERM) };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (ready, _) = get(coldgate.admin, "admin", "/readyz").await;
    assert_eq!(ready, StatusCode::SERVICE_UNAVAILABLE, "/readyz must fail while draining");

    let response = held.await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "the held request must be served during shutdown");
    let status = coldgate.terminate(Duration::from_secs(15)).expect("coldgate did not exit");
    assert!(status.success(), "exit status {status:?}");
    let logs = coldgate.log_text();
    let pid: i32 = logs
        .lines()
        .find(|l| l.contains("started process"))
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .and_then(|v| v["pid"].as_i64())
        .expect("started process log line") as i32;
    assert!(!process_alive(pid), "predictor {pid} left running after coldgate exited");
}

#[test]
fn check_config_names_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[[service]]\nname = \"iris\"\nhosts = [\"iris.local\"]\nqueue_timeout = \"5 minutes\"\n[service.process]\ncommand = \"python3\"\n",
    )
    .unwrap();
    let output = std::process::Command::new(BIN).arg("check-config").arg(&path).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("bad.toml:7:"), "line missing: {stderr}");
    assert!(stderr.contains("queue_timeout"), "key missing: {stderr}");

    std::fs::write(&path, "[server]\nlisten = \"127.0.0.1:0\"\nbogus = 1\n").unwrap();
    let output = std::process::Command::new(BIN).arg("check-config").arg(&path).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(":3:1:") && stderr.contains("bogus"), "unknown key not reported: {stderr}");

    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/coldgate.example.toml");
    let output = std::process::Command::new(BIN).arg("check-config").arg(example).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_coldgate_leaves_no_children() {
    let mut coldgate = start_with("", &["--load-ms", "100"]);
    let response = send(coldgate.data, request("GET", HOST, "/slow?ms=1", "")).await;
    assert_eq!(response.status(), StatusCode::OK);
    let stats: serde_json::Value = serde_json::from_slice(&get(coldgate.data, HOST, "/stats").await.1).unwrap();
    let child = stats["pid"].as_i64().unwrap() as i32;
    assert!(process_alive(child));

    // SIGKILL gives coldgate no chance to stop the child itself; the kernel must.
    unsafe { libc::kill(coldgate.pid(), libc::SIGKILL) };
    coldgate.terminate(Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(5);
    while process_alive(child) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!process_alive(child), "predictor {child} outlived a killed coldgate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_request_is_held_after_scale_down() {
    // The front door holds every request of a connection, the first and the later ones.
    let coldgate = start_with("idle_timeout = \"400ms\"", &["--load-ms", "300"]);
    let stream = TcpStream::connect(coldgate.data).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);

    let first = sender.send_request(request("GET", HOST, "/slow?ms=1", "")).await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let _ = first.into_body().collect().await.unwrap();
    coldgate.wait_for_service("demo", Duration::from_secs(5), |s| s["state"] == "idle").await;

    let second = sender.send_request(request("POST", HOST, "/echo", "kept alive")).await.unwrap();
    assert_eq!(second.status(), StatusCode::OK);
    let body = second.into_body().collect().await.unwrap().to_bytes();
    let echo: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo["sha256"], sha256_hex(b"kept alive"));
    assert_eq!(starts(&coldgate).0, 2, "the second request must have started the service again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hang_up_on_kept_alive_connection() {
    let coldgate = start_with("idle_timeout = \"300ms\"", &["--load-ms", "1500"]);
    let mut stream = TcpStream::connect(coldgate.data).await.unwrap();
    let request = b"GET /slow?ms=1 HTTP/1.1\r\nHost: demo.local\r\n\r\n";

    // The first request starts the service and completes; the connection stays open.
    stream.write_all(request).await.unwrap();
    let mut response = Vec::new();
    while !response.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk)).await.unwrap().unwrap();
        assert!(n > 0, "coldgate closed the kept-alive connection");
        response.extend_from_slice(&chunk[..n]);
    }
    assert!(response.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&response));
    coldgate.wait_for_service("demo", Duration::from_secs(5), |s| s["state"] == "idle").await;

    // The second request on the same connection is held, and the client gives up.
    stream.write_all(request).await.unwrap();
    coldgate.wait_for_service("demo", Duration::from_secs(5), |s| s["queue_depth"] == 1).await;
    drop(stream);
    coldgate.wait_for_service("demo", Duration::from_secs(1), |s| s["queue_depth"] == 0).await;

    // The instance it started must not see the abandoned request.
    coldgate.wait_for_service("demo", Duration::from_secs(10), |s| s["state"] == "serving").await;
    let stats = get(coldgate.data, HOST, "/stats").await;
    let stats: serde_json::Value = serde_json::from_slice(&stats.1).unwrap();
    assert_eq!(stats["requests"], 0, "an abandoned request was forwarded: {stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_timeout_reports_the_probe_failure() {
    let coldgate = start_with("startup_timeout = \"1s\"\nqueue_timeout = \"30s\"", &["--load-ms", "60000"]);
    let response = send(coldgate.data, request("GET", HOST, "/slow?ms=1", "")).await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("startup_timeout"), "{message}");
    assert!(message.contains("got status 503"), "the probe's last answer must be named: {message}");
}
