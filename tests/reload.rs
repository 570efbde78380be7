//! Configuration hot reload under load: the real binary, real child processes, and the
//! config file rewritten while requests flow and others are held.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;

/// One service table running the simulated predictor.
fn service(name: &str, extra: &str, predictor_args: &[&str]) -> String {
    format!(
        "[[service]]\nname = \"{name}\"\nhosts = [\"{name}.local\"]\nreadiness_path = \"/ready\"\n{extra}\n{}\n",
        predictor_process(predictor_args)
    )
}

fn config(max_queued: usize, services: &[String]) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndrain_delay = \"0s\"\nshutdown_grace = \"10s\"\n\n\
         [defaults]\nqueue_timeout = \"60s\"\nmax_queued_requests = {max_queued}\n\n{}",
        services.concat()
    )
}

/// Replaces the file atomically, as a ConfigMap update or an editor's save does.
fn rewrite(path: &Path, text: &str) {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, text).unwrap();
    std::fs::rename(&temporary, path).unwrap();
}

fn metric_value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("series {series} missing from /metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_fail_no_request() {
    let steady = service("steady", "", &["--load-ms", "100"]);
    let held = service("held", "", &["--load-ms", "6000"]);
    let doomed = service("doomed", "", &["--load-ms", "100"]);
    let added = service("added", "", &["--load-ms", "100"]);
    let coldgate = Coldgate::start(&config(1000, &[steady.clone(), held.clone(), doomed.clone()]));
    let path = coldgate.dir.path().join("coldgate.toml");

    // Warm the steady and doomed services.
    for name in ["steady", "doomed"] {
        let response = send(coldgate.data, request("GET", &format!("{name}.local"), "/slow?ms=1", "")).await;
        assert_eq!(response.status(), StatusCode::OK, "{name}");
    }

    // 20 requests held by the slow service for the whole run.
    let mut held_requests = Vec::new();
    for _ in 0..20 {
        let addr = coldgate.data;
        held_requests.push(tokio::spawn(async move { send(addr, request("GET", "held.local", "/slow?ms=1", "")).await }));
    }
    coldgate.wait_for_service("held", Duration::from_secs(5), |s| s["queue_depth"] == 20).await;

    // 100 requests per second to the steady service for about 11 s.
    let load = {
        let addr = coldgate.data;
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(Duration::from_millis(10));
            let mut tasks = Vec::new();
            for _ in 0..1100 {
                interval.tick().await;
                tasks.push(tokio::spawn(async move {
                    try_send(addr, request("GET", "steady.local", "/slow?ms=1", "")).await.map(|r| r.status())
                }));
            }
            let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
            for task in tasks {
                let status = match task.await.unwrap() {
                    Ok(status) => status.as_u16().to_string(),
                    Err(error) => format!("error: {error}"),
                };
                *statuses.entry(status).or_default() += 1;
            }
            statuses
        })
    };

    // Ten rewrites: limits change each time, a service is added at the 3rd, one removed
    // at the 5th. An invalid file in between must change nothing.
    let started = Instant::now();
    let mut doomed_pid = None;
    for round in 1..=10 {
        let mut services = vec![steady.clone(), held.clone()];
        if round < 5 {
            services.push(doomed.clone());
        }
        if round >= 3 {
            services.push(added.clone());
        }
        rewrite(&path, &config(1000 - round, &services));
        tokio::time::sleep(Duration::from_millis(1100)).await;

        if round == 3 {
            let response = send(coldgate.data, request("GET", "added.local", "/slow?ms=1", "")).await;
            assert_eq!(response.status(), StatusCode::OK, "the added service must serve after the reload");
        }
        if round == 4 {
            let stats = get(coldgate.data, "doomed.local", "/stats").await;
            let stats: serde_json::Value = serde_json::from_slice(&stats.1).unwrap();
            doomed_pid = stats["pid"].as_i64().map(|p| p as i32);
            rewrite(&path, "[server\nthis is not TOML");
            tokio::time::sleep(Duration::from_millis(1100)).await;
            let (status, _) = get(coldgate.data, "steady.local", "/slow?ms=1").await;
            assert_eq!(status, StatusCode::OK, "an invalid file must keep the running configuration");
        }
        if round == 5 {
            let (status, _) = get(coldgate.data, "doomed.local", "/slow?ms=1").await;
            assert_eq!(status, StatusCode::NOT_FOUND, "the removed service must no longer be routed");
        }
    }
    let reload_time = started.elapsed();

    let statuses = load.await.unwrap();
    assert_eq!(statuses.len(), 1, "requests to the steady service must all succeed: {statuses:?}");
    assert_eq!(statuses.get("200"), Some(&1100), "{statuses:?}");

    for task in held_requests {
        let response = task.await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "held requests must survive the reloads");
    }

    let pid = doomed_pid.expect("pid of the removed service's predictor");
    let deadline = Instant::now() + Duration::from_secs(10);
    while process_alive(pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!process_alive(pid), "the removed service's process {pid} is still running");

    let metrics = coldgate.metrics().await;
    assert_eq!(metric_value(&metrics, "coldgate_config_reloads_total{outcome=\"success\"}"), 10.0, "{metrics}");
    assert_eq!(metric_value(&metrics, "coldgate_config_reloads_total{outcome=\"failure\"}"), 1.0);
    assert!(coldgate.log_text().contains("invalid configuration; keeping the running configuration"));
    eprintln!("reload: 11 rewrites in {reload_time:?}, 1100 requests at 100/s all 200, 20 held requests all 200");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloaded_limit_applies_within_a_second() {
    let slow = service("slow", "", &["--load-ms", "5000"]);
    let coldgate = Coldgate::start(&config(50, std::slice::from_ref(&slow)));
    let path = coldgate.dir.path().join("coldgate.toml");

    let mut held = Vec::new();
    for _ in 0..3 {
        let addr = coldgate.data;
        held.push(tokio::spawn(async move { try_send(addr, request("GET", "slow.local", "/slow?ms=1", "")).await }));
    }
    coldgate.wait_for_service("slow", Duration::from_secs(5), |s| s["queue_depth"] == 3).await;

    rewrite(&path, &config(3, &[slow]));
    let changed = Instant::now();
    loop {
        let metrics = coldgate.metrics().await;
        if metric_value(&metrics, "coldgate_config_reloads_total{outcome=\"success\"}") >= 1.0 {
            break;
        }
        assert!(changed.elapsed() < Duration::from_millis(1500), "the new file was not applied within 1.5 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("reload applied {:?} after the file changed", changed.elapsed());
    let response = send(coldgate.data, request("GET", "slow.local", "/slow?ms=1", "")).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE, "the lowered queue limit must apply");
    for task in held {
        let _ = task.await;
    }
}

#[test]
fn sighup_reloads_immediately() {
    // Covered by the file watch in the tests above; SIGHUP forces a reload of an unchanged
    // file, which shows up as one more successful reload.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let coldgate = Coldgate::start(&config(10, &[service("a", "", &[])]));
        unsafe { libc::kill(coldgate.pid(), libc::SIGHUP) };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let metrics = coldgate.metrics().await;
            if metric_value(&metrics, "coldgate_config_reloads_total{outcome=\"success\"}") >= 1.0 {
                break;
            }
            assert!(Instant::now() < deadline, "SIGHUP did not trigger a reload");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}
