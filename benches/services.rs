//! Many configured services: start-up time, memory, idle CPU and warm-path throughput of
//! coldgate with N services (default 10,000) against the same figures with one service.
//!
//! Every service has its own host name (`svc-I.local`) and a process backend: this
//! benchmark's own executable in backend mode (see `support/backend.rs`). Only the last
//! service is ever started, so the N-service run forwards to the same single backend as
//! the one-service run.
//!
//! For each config and round, the benchmark starts coldgate and takes the time from
//! spawning it to its "listening" log line. It reads RSS (VmRSS) 1 s later and the CPU
//! time used over the next `--idle-seconds` (idle). Then one request starts the last
//! service and is checked for status 200 and the backend's body, and wrk measures the
//! warm path (64 connections, 2 threads, a warm-up run and then a timed run). Rounds
//! alternate the two configs. The table shows the medians over the rounds, followed by
//! whether the targets are met: start to listening under 1 s, and warm throughput within
//! 5 % of one service's.
//!
//! Full run (release build): `cargo bench --bench services -- [--services 10000]
//! [--rounds 3] [--seconds 10] [--warmup 2] [--idle-seconds 3]`. Needs wrk
//! (`scripts/bench-deps.sh`) and fails without it.
//!
//! Smoke run: `cargo test --bench services` (debug build, no `--bench`) uses 200 services,
//! one round, a 1 s idle window and 1 s wrk runs without warm-up. Without wrk it prints
//! "skipped" for the throughput part and still checks the start and the first request.
//!
//! Loopback only; each wrk run is bounded by `--seconds`.

#[path = "support/mod.rs"]
mod support;

use std::path::Path;
use std::time::Duration;

use support::{Coldgate, Wrk};

struct Figures {
    listening_after: Duration,
    rss_kib: u64,
    idle_cpu_per_second: Duration,
    requests_per_second: Option<f64>,
    p99_us: Option<f64>,
}

fn main() {
    if support::backend::run_if_requested() {
        return;
    }
    let benchmarking = support::benchmarking();
    let services: usize = support::arg("services", if benchmarking { 10_000 } else { 200 });
    let rounds: usize = support::arg("rounds", if benchmarking { 3 } else { 1 });
    let seconds: u64 = support::arg("seconds", if benchmarking { 10 } else { 1 });
    let warmup: u64 = support::arg("warmup", if benchmarking { 2 } else { 0 });
    let idle_seconds: u64 = support::arg("idle-seconds", if benchmarking { 3 } else { 1 });
    let has_wrk = support::which("wrk").is_some();
    if !has_wrk && benchmarking {
        panic!("the services benchmark needs wrk in PATH; install it with scripts/bench-deps.sh");
    }
    if !benchmarking {
        println!("smoke run with {services} services (debug build); use `cargo bench --bench services` for figures");
        if !has_wrk {
            println!("skipped: wrk not found, so no throughput runs");
        }
    }
    assert!(services >= 1, "--services must be at least 1");
    assert!(seconds >= 1, "--seconds must be at least 1");
    assert!(idle_seconds >= 1, "--idle-seconds must be at least 1");

    let dir = tempfile::tempdir().unwrap();
    let many = dir.path().join("many.toml");
    let one = dir.path().join("one.toml");
    std::fs::write(&many, config(services)).unwrap();
    std::fs::write(&one, config(1)).unwrap();
    let script = dir.path().join("report.lua");
    std::fs::write(&script, support::WRK_SCRIPT).unwrap();
    let options = MeasureOptions { script: has_wrk.then_some(script.as_path()), seconds, warmup, idle_seconds };

    println!("machine: {}", support::machine_summary());
    println!(
        "{services} services against 1; config sizes {} and {} bytes; {rounds} rounds; idle CPU over {idle_seconds} s; wrk 2 threads, 64 connections, {seconds} s after {warmup} s warm-up",
        std::fs::metadata(&many).unwrap().len(),
        std::fs::metadata(&one).unwrap().len()
    );
    // /proc counts CPU time in clock ticks, so smaller idle CPU figures read as 0.
    println!(
        "idle CPU resolution: one clock tick ({:.0} ms) per {idle_seconds} s",
        support::clock_tick().as_secs_f64() * 1e3
    );
    let mut results: [Vec<Figures>; 2] = [Vec::new(), Vec::new()];
    for round in 1..=rounds {
        for (index, (path, count)) in [(&one, 1), (&many, services)].into_iter().enumerate() {
            let figures = measure(path, count, &options);
            println!(
                "round {round} {count:>6} services: listening after {:.1} ms, RSS {} KiB, idle CPU {:.2} ms/s, {}",
                figures.listening_after.as_secs_f64() * 1e3,
                figures.rss_kib,
                figures.idle_cpu_per_second.as_secs_f64() * 1e3,
                figures
                    .requests_per_second
                    .map_or("no throughput run".to_string(), |rps| format!("{rps:.0} req/s, p99 {:.0} us", figures.p99_us.unwrap()))
            );
            results[index].push(figures);
        }
    }

    println!();
    println!("medians over {rounds} rounds, with the range over the rounds for req/s:");
    println!("| services | start to listening | RSS after start | idle CPU | warm req/s | warm p99 |");
    println!("|---|---|---|---|---|---|");
    let mut throughput = [0.0; 2];
    let mut listening_ms = [0.0; 2];
    let mut rss_kib = [0.0; 2];
    for (index, count) in [1, services].into_iter().enumerate() {
        let runs = &results[index];
        let median = |f: &dyn Fn(&Figures) -> f64| support::median_f64(&runs.iter().map(f).collect::<Vec<_>>());
        let listening = median(&|f| f.listening_after.as_secs_f64() * 1e3);
        let rss = median(&|f| f.rss_kib as f64);
        let idle = median(&|f| f.idle_cpu_per_second.as_secs_f64() * 1e3);
        let (rps, p99) = if has_wrk {
            let values: Vec<f64> = runs.iter().map(|f| f.requests_per_second.unwrap()).collect();
            (
                support::median_with_range(&values, 0),
                format!("{:.0} us", median(&|f| f.p99_us.unwrap())),
            )
        } else {
            ("-".into(), "-".into())
        };
        if has_wrk {
            throughput[index] = median(&|f| f.requests_per_second.unwrap());
        }
        listening_ms[index] = listening;
        rss_kib[index] = rss;
        println!("| {count} | {listening:.1} ms | {rss:.0} KiB | {idle:.2} ms CPU per s | {rps} | {p99} |");
    }
    let verdict = |met: bool| if met { "met" } else { "not met" };
    println!(
        "start to listening with {services} services: {:.1} ms (target < 1 s: {})",
        listening_ms[1],
        verdict(listening_ms[1] < 1000.0)
    );
    if services > 1 {
        println!(
            "RSS added per extra service: {:.2} KiB",
            (rss_kib[1] - rss_kib[0]) / (services - 1) as f64
        );
    }
    if has_wrk {
        let ratio = throughput[1] / throughput[0];
        println!(
            "warm throughput with {services} services / with 1: {ratio:.3} (target within 5 %: {})",
            verdict((ratio - 1.0).abs() <= 0.05)
        );
    }
    if !benchmarking {
        println!("smoke run finished; the figures above are from a debug build");
    }
}

/// Settings of one measurement that are the same for both configs.
struct MeasureOptions<'a> {
    /// The wrk script, or None to skip the throughput runs.
    script: Option<&'a Path>,
    seconds: u64,
    /// Seconds of unmeasured load before the timed run; 0 skips the warm-up.
    warmup: u64,
    idle_seconds: u64,
}

/// Returns a config with `count` services. Only the last one gets traffic.
fn config(count: usize) -> String {
    let exe = std::env::current_exe().unwrap();
    let command = support::toml_string(exe.to_str().unwrap());
    let mut text = support::server_table(2, 10_000);
    text.push_str("[defaults]\nidle_timeout = \"1h\"\n");
    for index in 0..count {
        text.push_str(&format!(
            "[[service]]\nname = \"svc-{index}\"\nhosts = [\"svc-{index}.local\"]\nreadiness_path = \"/ready\"\n[service.process]\ncommand = {command}\nargs = [\"backend\", \"--port\", \"{{port}}\"]\nstop_grace = \"2s\"\n"
        ));
    }
    text
}

fn measure(config: &Path, count: usize, options: &MeasureOptions) -> Figures {
    let coldgate = Coldgate::start(config);
    let listening_after = coldgate.listening_after;
    std::thread::sleep(Duration::from_secs(1));
    let rss_kib = support::rss_kib(coldgate.pid);
    let cpu_before = support::cpu_time(coldgate.pid);
    std::thread::sleep(Duration::from_secs(options.idle_seconds));
    let idle_cpu_per_second = (support::cpu_time(coldgate.pid) - cpu_before) / options.idle_seconds as u32;

    let host = format!("svc-{}.local", count - 1);
    let (code, body) = support::http_get(coldgate.data, &host, "/small").expect("first request to the last service");
    assert_eq!(code, 200, "first request to {host} returned {code}: {}", String::from_utf8_lossy(&body));
    assert_eq!(body, support::backend::BODY, "unexpected body from {host}");

    let (requests_per_second, p99_us) = match options.script {
        None => (None, None),
        Some(script) => {
            let mut wrk = Wrk {
                url: format!("http://{}/small", coldgate.data),
                host: &host,
                threads: 2,
                connections: 64,
                seconds: options.warmup,
                pin: None,
                script,
            };
            if options.warmup > 0 {
                wrk.run();
            }
            wrk.seconds = options.seconds;
            let result = wrk.run();
            assert_eq!(result.errors, 0, "wrk counted errors against {host} with {count} services");
            assert!(result.requests > 0, "wrk completed no request against {host}");
            (Some(result.requests_per_second()), Some(result.p99_us))
        }
    };
    Figures { listening_after, rss_kib, idle_cpu_per_second, requests_per_second, p99_us }
}
