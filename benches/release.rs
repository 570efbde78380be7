//! Cold-start release overhead: how long after an instance turns ready the first held
//! request reaches it.
//!
//! coldgate starts this benchmark's own executable as the service's process, in backend
//! mode (see `support/backend.rs`). The backend responds to `/ready` with 503 until
//! `--load-ms` plus a random 0 to `--load-jitter-ms` has passed, and logs, in wall-clock
//! nanoseconds, when it started (`start`), when it turned ready (`ready`), when the first
//! 200 probe arrived (`probe_ok`) and when the first request that is not a probe arrived
//! (`first_request`). The jitter spreads the ready instant over the probe interval.
//!
//! Overhead = `first_request` - `ready`. It splits into the probe lag (`probe_ok` -
//! `ready`, bounded by `probe_interval` plus one probe) and the release (`first_request` -
//! `probe_ok`: coldgate's handling of the probe answer, the queue release and the upstream
//! connection). The client also records when the response arrived.
//!
//! Each cycle waits until the service is idle (scaled to zero), sends one request and
//! reads the response; `idle_timeout` is short, so the service stops soon after. A cycle
//! whose backend process started before its request was sent is rejected, because then
//! the request did not wait for a cold start. Percentiles are nearest-rank, so with
//! fewer than 100 starts the p99 is the maximum.
//!
//! The backend prints `ready` when it turns ready, as model servers log that they have
//! loaded, and coldgate probes at once when an instance writes output. With `--silent` the
//! backend prints nothing, so the figures show the periodic probe alone.
//!
//! Full run (release build): `cargo bench --bench release -- [--starts 50] [--load-ms 100]
//! [--load-jitter-ms 20] [--probe-interval 10ms] [--idle-timeout 300ms] [--silent]`. It prints the
//! table and whether the median (target 5 ms or less) and the p99 (target 20 ms or less)
//! of the overhead meet their targets.
//!
//! Smoke run: `cargo test --bench release` (debug build, no `--bench`) runs 3 cold starts
//! with the same checks. It needs no nginx or wrk.
//!
//! Loopback only; bounded by `--starts` and a 60 s limit per cycle.

#[path = "support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use support::Coldgate;

const HOST: &str = "release.local";

fn main() {
    if support::backend::run_if_requested() {
        return;
    }
    let benchmarking = support::benchmarking();
    let starts: usize = support::arg("starts", if benchmarking { 50 } else { 3 });
    let load_ms: u64 = support::arg("load-ms", 100);
    let jitter_ms: u64 = support::arg("load-jitter-ms", 20);
    let probe_interval: String = support::arg("probe-interval", "10ms".to_string());
    let idle_timeout: String = support::arg("idle-timeout", "300ms".to_string());
    let silent = support::flag("silent");
    if !benchmarking {
        println!("smoke run with {starts} cold starts (debug build); use `cargo bench --bench release` for figures");
    }

    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("backend.log");
    let exe = std::env::current_exe().unwrap();
    let config = format!(
        r#"{server}
[defaults]
idle_timeout = {idle_timeout}
probe_interval = {probe_interval}
queue_timeout = "60s"
[[service]]
name = "release"
hosts = [{host}]
readiness_path = "/ready"
[service.process]
command = {command}
args = ["backend", "--port", "{{port}}", "--load-ms", "{load_ms}", "--load-jitter-ms", "{jitter_ms}", "--log", {log}{silent}]
stop_grace = "2s"
"#,
        server = support::server_table(0, 100),
        idle_timeout = support::toml_string(&idle_timeout),
        probe_interval = support::toml_string(&probe_interval),
        host = support::toml_string(HOST),
        command = support::toml_string(exe.to_str().unwrap()),
        log = support::toml_string(log.to_str().unwrap()),
        silent = if silent { ", \"--silent\"" } else { "" },
    );
    let config_path = dir.path().join("coldgate.toml");
    std::fs::write(&config_path, config).unwrap();
    let coldgate = Coldgate::start(&config_path);

    println!("machine: {}", support::machine_summary());
    println!("{starts} cold starts; backend load {load_ms} ms plus 0 to {jitter_ms} ms; probe_interval {probe_interval}; idle_timeout {idle_timeout}");
    println!(
        "{}",
        if silent { "the backend writes no output: readiness is found by the periodic probe alone" } else { "the backend prints \"ready\" when ready, which makes coldgate probe at once" }
    );
    let mut cycles = Vec::with_capacity(starts);
    for index in 0..starts {
        let number = index + 1;
        coldgate.wait_for_state(0, "idle", Duration::from_secs(60));
        let sent = support::unix_ns();
        let started = Instant::now();
        let (code, body) = support::http_get(coldgate.data, HOST, "/infer").expect("request to the cold service");
        let responded = support::unix_ns();
        assert_eq!(code, 200, "cold start {number} returned {code}: {}", String::from_utf8_lossy(&body));
        assert_eq!(body, support::backend::BODY, "cold start {number} returned an unexpected body");
        assert!(started.elapsed() < Duration::from_secs(60), "cold start {number} took over 60 s");
        let events = last_process_events(&log);
        let cycle = Cycle::from_events(&events, sent, responded)
            .unwrap_or_else(|| panic!("backend log lacks start, ready, probe_ok or first_request for cold start {number}: {events:?}"));
        assert!(
            cycle.start >= cycle.sent,
            "cold start {number}: the backend process started {} before the request was sent, so the request did not wait for a cold start",
            format_ns(cycle.sent - cycle.start)
        );
        cycles.push(cycle);
    }
    let activations = support::metric_sum(coldgate.admin, "coldgate_activations_total");
    assert_eq!(activations, starts as f64, "expected one activation per cold start, /metrics counts {activations}");
    drop(coldgate);

    let column = |f: fn(&Cycle) -> i128| {
        let mut values: Vec<i128> = cycles.iter().map(f).collect();
        values.sort();
        values
    };
    let overhead = column(|c| c.first_request - c.ready);
    let probe_lag = column(|c| c.probe_ok - c.ready);
    let release = column(|c| c.first_request - c.probe_ok);
    let response = column(|c| c.responded - c.ready);
    let whole = column(|c| c.responded - c.sent);
    println!();
    println!("| measure | median | p99 | max |");
    println!("|---|---|---|---|");
    for (name, values) in [
        ("overhead: first request at the backend - ready", &overhead),
        ("probe lag: first 200 probe - ready", &probe_lag),
        ("release: first request - first 200 probe", &release),
        ("response at the client - ready", &response),
        ("whole cold request (client)", &whole),
    ] {
        println!(
            "| {name} | {} | {} | {} |",
            format_ns(support::percentile(values, 0.5)),
            format_ns(support::percentile(values, 0.99)),
            format_ns(*values.last().unwrap())
        );
    }
    println!("cold starts measured: {}; percentiles are nearest-rank, so below 100 starts the p99 is the maximum", cycles.len());
    let median = support::percentile(&overhead, 0.5);
    let p99 = support::percentile(&overhead, 0.99);
    println!(
        "overhead median {} (target <= 5 ms: {}), p99 {} (target <= 20 ms: {})",
        format_ns(median),
        if median <= 5_000_000 { "met" } else { "not met" },
        format_ns(p99),
        if p99 <= 20_000_000 { "met" } else { "not met" }
    );
    if !benchmarking {
        println!("smoke run finished; the figures above are from a debug build");
    }
}

fn format_ns(ns: i128) -> String {
    format!("{:.2} ms", ns as f64 / 1e6)
}

/// Instants of one cold start, in Unix nanoseconds.
#[derive(Debug)]
struct Cycle {
    sent: i128,
    start: i128,
    ready: i128,
    probe_ok: i128,
    first_request: i128,
    responded: i128,
}

impl Cycle {
    fn from_events(events: &HashMap<String, i128>, sent: u128, responded: u128) -> Option<Cycle> {
        Some(Cycle {
            sent: sent as i128,
            start: *events.get("start")?,
            ready: *events.get("ready")?,
            probe_ok: *events.get("probe_ok")?,
            first_request: *events.get("first_request")?,
            responded: responded as i128,
        })
    }
}

/// Returns the events (`name` -> unix_ns) that the most recently started backend process
/// logged. Lines look like `NAME pid=PID unix_ns=NS`.
fn last_process_events(log: &Path) -> HashMap<String, i128> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut last_pid = None;
    let mut events = HashMap::new();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let (Some(name), Some(pid), Some(ns)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let pid = pid.strip_prefix("pid=").unwrap_or_default().to_string();
        let ns: i128 = ns.strip_prefix("unix_ns=").and_then(|v| v.parse().ok()).unwrap_or_default();
        if name == "start" {
            last_pid = Some(pid.clone());
            events.clear();
        }
        if last_pid.as_deref() == Some(pid.as_str()) {
            events.insert(name.to_string(), ns);
        }
    }
    events
}
