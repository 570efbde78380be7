//! End-to-end gRPC through coldgate with grpcio on both sides: KServe v2 ModelInfer and a
//! bidirectional echo stream from zero, and the gRPC statuses that coldgate itself returns.
//!
//! The Python servers and clients live in predictors/kserve_iris and predictors/grpc_echo.
//! They need the venv that scripts/setup-venv.sh creates (it has grpcio and KServe's v2
//! gRPC stubs), so the tests run only when COLDGATE_KSERVE_PYTHON names its interpreter:
//! `COLDGATE_KSERVE_PYTHON=$PWD/.venv-kserve/bin/python cargo test --test grpc -- --nocapture`.
//!
//! Both servers are probed with `readiness_probe = "grpc"`, the standard gRPC health check,
//! because grpcio servers speak HTTP/2 only and close HTTP/1.1 connections. KServe 0.21
//! has no health service of its own, so predictors/kserve_iris/iris_grpc_server.py adds
//! one that reports its v2 ModelReady.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Upper bound for one client script run, so that a stuck call fails the test instead of
/// hanging it. Each call also has its own gRPC deadline below this.
const CLIENT_LIMIT: Duration = Duration::from_secs(150);

const IRIS_HOST: &str = "iris-grpc.models.local";
const ECHO_HOST: &str = "echo.grpc.local";
const INFER_CALLS: usize = 20;
const CHAT_MESSAGES: usize = 5;
/// Copied from predictors/grpc_echo/server.py.
const ECHO_FAIL_MESSAGE: &str = "quota 100% used – retry in 2 s";

fn predictor_script(relative: &str) -> String {
    format!("{}/predictors/{relative}", env!("CARGO_MANIFEST_DIR"))
}

fn toml_string(path: &Path) -> String {
    format!("{:?}", path.to_str().expect("interpreter path must be UTF-8 to go into the TOML config"))
}

/// Returns a config with a loopback [server] table and the given services.
fn config_with(services: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndrain_delay = \"0s\"\nshutdown_grace = \"10s\"\n\n{services}"
    )
}

fn client_command(python: &Path, script_path: &str, args: &[String]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(python);
    command
        .arg(script_path)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Runs a client script to completion and returns the JSON object it printed. Panics with
/// the script's output when it fails, prints no JSON or runs longer than CLIENT_LIMIT.
async fn run_client(python: &Path, script_path: &str, args: &[String]) -> Value {
    let child = client_command(python, script_path, args).spawn().expect("spawn the client script");
    let output = tokio::time::timeout(CLIENT_LIMIT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{script_path} {args:?} did not finish within {CLIENT_LIMIT:?}"))
        .expect("wait for the client script");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{script_path} {args:?} exited with {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|error| panic!("{script_path} printed no JSON object ({error})\nstdout:\n{stdout}\nstderr:\n{stderr}"))
}

/// Returns the arguments that point a client at coldgate's data port with `host` as :authority.
fn target_args(coldgate: &Coldgate, host: &str) -> Vec<String> {
    vec!["--target".into(), coldgate.data.to_string(), "--authority".into(), host.into()]
}

/// Parses coldgate's JSON log lines with this message and service.
fn log_events(coldgate: &Coldgate, message: &str, service: &str) -> Vec<Value> {
    coldgate
        .logs
        .lock()
        .unwrap()
        .iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|event| event["message"] == message && event["service"] == service)
        .collect()
}

/// Asserts that the service was started exactly once and returns how many requests were
/// held when its instance became ready.
fn assert_one_start(coldgate: &Coldgate, service: &str) -> u64 {
    let starts = log_events(coldgate, "started process", service);
    assert_eq!(starts.len(), 1, "service {service} should start exactly once; started: {starts:?}");
    let releases = log_events(coldgate, "instance ready; releasing held requests", service);
    assert_eq!(releases.len(), 1, "service {service} should become ready once; releases: {releases:?}");
    releases[0]["held"].as_u64().expect("release line has a held count")
}

fn iris_service(python: &Path) -> String {
    // The load delay keeps the health check at NOT_SERVING for 2 s after the port opens.
    format!(
        "[[service]]\nname = \"iris\"\nhosts = [\"{IRIS_HOST}\"]\nprotocol = \"h2c\"\nreadiness_probe = \"grpc\"\n\
         queue_timeout = \"2m\"\nstartup_timeout = \"90s\"\n\n\
         [service.process]\ncommand = {}\n\
         args = [{:?}, \"--enable_grpc\", \"true\", \"--grpc_port\", \"{{port}}\", \"--http_port\", \"0\", \
         \"--load_delay_seconds\", \"2\", \"--configure_logging\", \"false\"]\n\
         stop_grace = \"5s\"\n",
        toml_string(python),
        predictor_script("kserve_iris/iris_grpc_server.py"),
    )
}

fn echo_service(python: &Path) -> String {
    // The echo server's health check returns NOT_SERVING for 3 s after the port opens.
    format!(
        "[[service]]\nname = \"echo\"\nhosts = [\"{ECHO_HOST}\"]\nprotocol = \"h2c\"\nreadiness_probe = \"grpc\"\n\
         queue_timeout = \"2m\"\nstartup_timeout = \"60s\"\n\n\
         [service.process]\ncommand = {}\n\
         args = [{:?}, \"--port\", \"{{port}}\", \"--startup_delay_seconds\", \"3\"]\n\
         stop_grace = \"5s\"\n",
        toml_string(python),
        predictor_script("grpc_echo/server.py"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kserve_model_infer_from_zero() {
    let Some(python) = kserve_python() else {
        return report_kserve_skip("kserve_model_infer_from_zero");
    };
    let coldgate = Coldgate::start(&config_with(&iris_service(&python)));
    assert_eq!(coldgate.service_status("iris").await["state"], "idle");

    // The client starts all calls before it waits for any, so they are held together.
    let mut args = target_args(&coldgate, IRIS_HOST);
    args.extend(["--calls".into(), INFER_CALLS.to_string(), "--channels".into(), "4".into(), "--timeout".into(), "120".into()]);
    let started = Instant::now();
    let report = run_client(&python, &predictor_script("kserve_iris/grpc_infer_client.py"), &args).await;
    let elapsed = started.elapsed();

    // KServe 0.21 loads a model that is not ready yet on the first infer call, so correct
    // predictions do not show that the calls waited for SERVING. The echo test checks that.
    let calls = report["calls"].as_array().expect("the client report has a calls list");
    assert_eq!(calls.len(), INFER_CALLS, "report: {report}");
    for call in calls {
        let index = &call["index"];
        assert_eq!(call["code"], "OK", "call {index} failed: {call}");
        assert_eq!(call["model_name"], "iris", "call {index}: {call}");
        assert_eq!(call["predictions"], call["expected"], "call {index} got wrong classes: {call}");
    }

    let held = assert_one_start(&coldgate, "iris");
    assert_eq!(held, INFER_CALLS as u64, "every call should have been held during the cold start");
    let status = coldgate.service_status("iris").await;
    assert_eq!(status["state"], "serving", "{status}");
    assert_eq!(status["queue_depth"], 0, "{status}");
    let metrics = coldgate.metrics().await;
    assert!(
        metrics.contains("coldgate_activations_total{outcome=\"success\",service=\"iris\"} 1"),
        "expected 1 successful activation in /metrics:\n{metrics}"
    );
    eprintln!(
        "kserve grpc: {INFER_CALLS} ModelInfer calls answered {:.2} s after the client started (client: {} ms); cold start {} s",
        elapsed.as_secs_f64(),
        report["elapsed_ms"],
        status["last_cold_start_seconds"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_stream_and_error_trailers_from_zero() {
    let Some(python) = kserve_python() else {
        return report_kserve_skip("echo_stream_and_error_trailers_from_zero");
    };
    let coldgate = Coldgate::start(&config_with(&echo_service(&python)));
    assert_eq!(coldgate.service_status("echo").await["state"], "idle");

    // Both calls start from zero and are held together.
    let client = predictor_script("grpc_echo/client.py");
    let mut chat_args = target_args(&coldgate, ECHO_HOST);
    chat_args.extend(["--timeout".into(), "90".into(), "chat".into(), "--messages".into(), CHAT_MESSAGES.to_string()]);
    chat_args.extend(["--interval_ms".into(), "100".into()]);
    let mut fail_args = target_args(&coldgate, ECHO_HOST);
    fail_args.extend(["--timeout".into(), "90".into(), "unary".into(), "--method".into(), "/echo.Echo/Fail".into()]);
    let (chat, fail) = tokio::join!(run_client(&python, &client, &chat_args), run_client(&python, &client, &fail_args));

    // Ping-pong: the client sends message i + 1 only after the echo of message i arrived,
    // so a proxy that buffers either direction makes the call run into its deadline.
    assert_eq!(chat["code"], "OK", "Chat failed: {chat}");
    let echoes = chat["echoes"].as_array().expect("the chat report has an echoes list");
    assert_eq!(echoes.len(), CHAT_MESSAGES, "{chat}");
    for (index, echo) in echoes.iter().enumerate() {
        assert_eq!(echo["size"], chat["sent_sizes"][index], "echo {index} has the wrong size: {chat}");
        assert_eq!(echo["matches_sent"], true, "echo {index} differs from message {index}: {chat}");
        assert_eq!(echo["before_half_close"], true, "echo {index} arrived after the client ended its stream: {chat}");
    }
    let trailers = &chat["trailing_metadata"];
    assert_eq!(trailers["x-echo-count"], CHAT_MESSAGES.to_string(), "Chat trailers: {chat}");
    assert_eq!(trailers["x-echo-sha256-bin"], chat["sent_sha256"], "binary Chat trailer: {chat}");

    // The server's error status, its percent-encoded message and its trailers pass through.
    assert_eq!(fail["code"], "RESOURCE_EXHAUSTED", "Fail: {fail}");
    assert_eq!(fail["code_number"], 8, "Fail: {fail}");
    assert_eq!(fail["details"], ECHO_FAIL_MESSAGE, "Fail: {fail}");
    assert_eq!(fail["trailing_metadata"]["x-echo-retry-after-ms"], "2000", "Fail: {fail}");

    let held = assert_one_start(&coldgate, "echo");
    assert_eq!(held, 2, "both calls should have been held during the cold start");
    eprintln!(
        "grpc echo: Chat took {} ms (echo round trips in ms: {:?}), Fail took {} ms",
        chat["elapsed_ms"],
        echoes.iter().map(|echo| echo["round_trip_ms"].clone()).collect::<Vec<_>>(),
        fail["elapsed_ms"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_client_sees_coldgate_statuses() {
    let Some(python) = kserve_python() else {
        return report_kserve_skip("grpc_client_sees_coldgate_statuses");
    };
    // Both services run the simulated predictor with a load time far beyond the test, so
    // no call ever reaches an instance and every status comes from coldgate.
    let never_ready = predictor_process(&["--load-ms", "600000"]);
    let services = format!(
        "[[service]]\nname = \"stuck\"\nhosts = [\"stuck.grpc.local\"]\nprotocol = \"h2c\"\n\
         readiness_path = \"/v2/models/demo/ready\"\nqueue_timeout = \"1s\"\n\n{never_ready}\n\
         [[service]]\nname = \"full\"\nhosts = [\"full.grpc.local\"]\nprotocol = \"h2c\"\n\
         readiness_path = \"/v2/models/demo/ready\"\nqueue_timeout = \"60s\"\nmax_queued_requests = 1\n\n{never_ready}"
    );
    let coldgate = Coldgate::start(&config_with(&services));
    let client = predictor_script("grpc_echo/client.py");

    // A call held for the whole queue_timeout ends with DEADLINE_EXCEEDED and coldgate's
    // message, long before the client's own 30 s deadline.
    let mut args = target_args(&coldgate, "stuck.grpc.local");
    args.extend(["--timeout".into(), "30".into(), "unary".into()]);
    let timed_out = run_client(&python, &client, &args).await;
    assert_eq!(timed_out["code"], "DEADLINE_EXCEEDED", "{timed_out}");
    assert_eq!(timed_out["code_number"], 4, "{timed_out}");
    assert_eq!(timed_out["details"], "service stuck did not become ready within its queue_timeout", "{timed_out}");
    let elapsed_ms = timed_out["elapsed_ms"].as_f64().expect("the report has elapsed_ms");
    assert!(elapsed_ms >= 900.0, "the call ended after {elapsed_ms} ms, before queue_timeout (1 s)");
    assert!(elapsed_ms < 20_000.0, "the call ended after {elapsed_ms} ms, long after queue_timeout (1 s)");

    // With one call held, the queue of "full" is full: the next call gets UNAVAILABLE at once.
    let mut held_args = target_args(&coldgate, "full.grpc.local");
    held_args.extend(["--timeout".into(), "60".into(), "unary".into()]);
    let mut held_client = client_command(&python, &client, &held_args).spawn().expect("spawn the held client");
    coldgate.wait_for_service("full", Duration::from_secs(30), |s| s["queue_depth"] == 1).await;

    let rejected = run_client(&python, &client, &held_args).await;
    assert_eq!(rejected["code"], "UNAVAILABLE", "{rejected}");
    assert_eq!(rejected["code_number"], 14, "{rejected}");
    assert_eq!(rejected["details"], "the queue of service full is full; retry later", "{rejected}");
    // A trailers-only response carries its headers, retry-after included, as trailing metadata.
    assert!(rejected["trailing_metadata"]["retry-after"].is_string(), "no retry-after in {rejected}");
    let elapsed_ms = rejected["elapsed_ms"].as_f64().expect("the report has elapsed_ms");
    assert!(elapsed_ms < 10_000.0, "the rejection took {elapsed_ms} ms");

    // The held call is still waiting. When its client goes away, coldgate drops it.
    assert!(held_client.try_wait().expect("poll the held client").is_none(), "the held call ended early");
    held_client.kill().await.expect("kill the held client");
    coldgate.wait_for_service("full", Duration::from_secs(15), |s| s["queue_depth"] == 0).await;
    eprintln!("grpc statuses: DEADLINE_EXCEEDED after {} ms, UNAVAILABLE after {elapsed_ms} ms", timed_out["elapsed_ms"]);
}
