//! End-to-end test with a real KServe model server (predictors/kserve_iris/iris_server.py)
//! started by the process backend: cold-start storms, scale to zero and a second start.
//!
//! The test needs the Python venv that scripts/setup-venv.sh creates. It runs only when
//! COLDGATE_KSERVE_PYTHON names that venv's interpreter, for example
//! `COLDGATE_KSERVE_PYTHON=$PWD/.venv-kserve/bin/python cargo test --test kserve -- --nocapture`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use serde_json::{json, Value};

const HOST: &str = "iris.models.local";
const IDLE_TIMEOUT: Duration = Duration::from_secs(3);
const CLIENTS: usize = 50;
/// Upper bound for one request, so that a stuck request fails the test instead of hanging it.
const REQUEST_LIMIT: Duration = Duration::from_secs(45);

/// v1 predict bodies and the classes the iris tree returns for them (0 setosa,
/// 1 versicolor, 2 virginica). Each row's class does not depend on the other rows.
const V1_CASES: [(&str, &[i64]); 4] = [
    (r#"{"instances": [[5.1, 3.5, 1.4, 0.2], [6.8, 2.8, 4.8, 1.4], [6.3, 3.3, 6.0, 2.5]]}"#, &[0, 1, 2]),
    (r#"{"instances": [[6.8, 2.8, 4.8, 1.4], [6.0, 3.4, 4.5, 1.6]]}"#, &[1, 1]),
    (r#"{"instances": [[6.3, 3.3, 6.0, 2.5], [6.8, 2.8, 4.8, 1.4], [5.1, 3.5, 1.4, 0.2]]}"#, &[2, 1, 0]),
    (r#"{"instances": [[6.0, 3.4, 4.5, 1.6]]}"#, &[1]),
];

const V2_BODY: &str = r#"{"id":"t1","inputs":[{"name":"input-0","shape":[2,4],"datatype":"FP32","data":[[6.8,2.8,4.8,1.4],[6.0,3.4,4.5,1.6]]}]}"#;

fn iris_config(python: &Path) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/predictors/kserve_iris/iris_server.py");
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndrain_delay = \"0s\"\nshutdown_grace = \"10s\"\n\n\
         [[service]]\nname = \"iris\"\nhosts = [\"{HOST}\"]\nreadiness_path = \"/v2/models/iris/ready\"\n\
         idle_timeout = \"{}s\"\nqueue_timeout = \"2m\"\nstartup_timeout = \"2m\"\n\n\
         [service.process]\ncommand = {:?}\nargs = [{script:?}, \"--http_port\", \"{{port}}\", \"--configure_logging\", \"false\"]\n\
         stop_grace = \"5s\"\n",
        IDLE_TIMEOUT.as_secs(),
        python.to_str().expect("interpreter path must be UTF-8 to go into the TOML config"),
    )
}

/// Parses coldgate's JSON log lines whose message is `message`.
fn log_events(coldgate: &Coldgate, message: &str) -> Vec<Value> {
    coldgate
        .logs
        .lock()
        .unwrap()
        .iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|event| event["message"] == message && event["service"] == "iris")
        .collect()
}

/// Returns the pids of the model servers coldgate started, in start order.
fn started_pids(coldgate: &Coldgate) -> Vec<i32> {
    log_events(coldgate, "started process")
        .iter()
        .map(|event| event["pid"].as_i64().expect("started process line has a pid") as i32)
        .collect()
}

/// Returns, per activation, how many requests were held when the instance became ready.
fn held_at_release(coldgate: &Coldgate) -> Vec<u64> {
    log_events(coldgate, "instance ready; releasing held requests")
        .iter()
        .map(|event| event["held"].as_u64().expect("release line has a held count"))
        .collect()
}

/// Sends CLIENTS v1 predicts at once (plus one v2 infer if `with_v2`), checks every
/// response and returns the time from the first send until the last response.
async fn predict_storm(coldgate: &Coldgate, round: usize, with_v2: bool) -> Duration {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        let addr = coldgate.data;
        tasks.push(tokio::spawn(async move {
            let (body, _) = V1_CASES[i % V1_CASES.len()];
            let sent = request("POST", HOST, "/v1/models/iris:predict", body);
            let response = tokio::time::timeout(REQUEST_LIMIT, try_send(addr, sent)).await;
            (response, Instant::now())
        }));
    }
    let v2 = with_v2.then(|| {
        let addr = coldgate.data;
        tokio::spawn(async move {
            let sent = request("POST", HOST, "/v2/models/iris/infer", V2_BODY);
            let response = tokio::time::timeout(REQUEST_LIMIT, try_send(addr, sent)).await;
            (response, Instant::now())
        })
    });

    let mut latest = started;
    for (i, task) in tasks.into_iter().enumerate() {
        let (response, done) = task.await.unwrap();
        let response = response
            .unwrap_or_else(|_| panic!("round {round}: predict {i} timed out after {REQUEST_LIMIT:?}"))
            .unwrap_or_else(|e| panic!("round {round}: predict {i} failed: {e}"));
        let body = String::from_utf8_lossy(response.body()).into_owned();
        assert_eq!(response.status(), StatusCode::OK, "round {round}: predict {i} status; body {body}");
        let value: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("round {round}: predict {i} returned invalid JSON ({e}): {body}"));
        let (_, classes) = V1_CASES[i % V1_CASES.len()];
        assert_eq!(value, json!({"predictions": classes}), "round {round}: predict {i} returned wrong predictions");
        latest = latest.max(done);
    }

    if let Some(task) = v2 {
        let (response, done) = task.await.unwrap();
        let response = response
            .unwrap_or_else(|_| panic!("round {round}: v2 infer timed out after {REQUEST_LIMIT:?}"))
            .unwrap_or_else(|e| panic!("round {round}: v2 infer failed: {e}"));
        let body = String::from_utf8_lossy(response.body()).into_owned();
        assert_eq!(response.status(), StatusCode::OK, "round {round}: v2 infer status; body {body}");
        let value: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("round {round}: v2 infer returned invalid JSON ({e}): {body}"));
        assert_eq!(value["id"], "t1", "round {round}: v2 infer id; body {body}");
        assert_eq!(value["outputs"][0]["data"], json!([1, 1]), "round {round}: v2 infer outputs; body {body}");
        latest = latest.max(done);
    }
    latest - started
}

/// Checks the model server, the held count and /status after a storm, then prints the figures.
async fn check_after_storm(coldgate: &Coldgate, round: usize, elapsed: Duration, requests: usize) {
    let pids = started_pids(coldgate);
    assert_eq!(pids.len(), round, "round {round}: model server starts so far: {pids:?}");
    let pid = pids[round - 1];
    assert!(process_alive(pid), "round {round}: model server {pid} is not running after the storm");

    let held = held_at_release(coldgate);
    assert_eq!(held.len(), round, "round {round}: activations that released held requests: {held:?}");
    assert_eq!(held[round - 1], requests as u64, "round {round}: requests held until the model server was ready");

    let status = coldgate.service_status("iris").await;
    assert_eq!(status["state"], "serving", "round {round}: {status}");
    assert_eq!(status["queue_depth"], 0, "round {round}: {status}");
    let cold_start = status["last_cold_start_seconds"]
        .as_f64()
        .unwrap_or_else(|| panic!("round {round}: /status has no last_cold_start_seconds: {status}"));
    assert!(cold_start > 0.0, "round {round}: last_cold_start_seconds is {cold_start}");
    // The start began after the first request was sent and ended before any response.
    assert!(
        cold_start < elapsed.as_secs_f64(),
        "round {round}: cold start {cold_start} s is longer than the storm ({elapsed:?})"
    );
    assert!(elapsed < Duration::from_secs(40), "round {round}: storm took {elapsed:?}");

    eprintln!(
        "kserve round {round}: {requests} requests answered {:.2} s after the first was sent; \
         cold start {cold_start:.2} s (/status last_cold_start_seconds); model server pid {pid}",
        elapsed.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iris_cold_starts_scale_to_zero_and_restart() {
    let Some(python) = kserve_python() else {
        return report_kserve_skip("iris_cold_starts_scale_to_zero_and_restart");
    };
    let coldgate = Coldgate::start_in(tempfile::tempdir().unwrap(), &iris_config(&python));
    assert_eq!(coldgate.service_status("iris").await["state"], "idle");

    // Round 1: a storm from zero starts exactly one model server.
    let elapsed = predict_storm(&coldgate, 1, false).await;
    let round_one_done = Instant::now();
    check_after_storm(&coldgate, 1, elapsed, CLIENTS).await;
    let first_pid = started_pids(&coldgate)[0];

    // With nothing in flight, the service scales to zero after idle_timeout.
    coldgate.wait_for_service("iris", IDLE_TIMEOUT + Duration::from_secs(15), |s| s["state"] == "idle").await;
    let quiet = round_one_done.elapsed();
    assert!(
        quiet >= IDLE_TIMEOUT - Duration::from_millis(500),
        "scaled to zero {quiet:?} after the last response, before idle_timeout ({IDLE_TIMEOUT:?})"
    );
    assert!(!process_alive(first_pid), "model server {first_pid} still running after scale to zero");
    eprintln!("kserve: scaled to zero {:.2} s after the last response", quiet.as_secs_f64());

    // Round 2: the next storm from zero starts a second model server. It includes a v2 infer.
    let elapsed = predict_storm(&coldgate, 2, true).await;
    check_after_storm(&coldgate, 2, elapsed, CLIENTS + 1).await;

    let metrics = coldgate.metrics().await;
    assert!(
        metrics.contains("coldgate_activations_total{outcome=\"success\",service=\"iris\"} 2"),
        "expected 2 successful activations in /metrics:\n{metrics}"
    );
    assert!(
        metrics.contains("coldgate_scale_events_total{direction=\"down\",service=\"iris\"} 1"),
        "expected 1 scale-down in /metrics:\n{metrics}"
    );
}
