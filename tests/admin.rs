//! The admin port's status page, the warm-up action with its token check, and keep-warm
//! windows, against the real coldgate binary and the simulated predictor.
//!
//! The status page test renders the page in headless Chromium (Debian package `chromium`).
//! Without it the test is skipped, unless the variable CI is "true", where it fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;

const TOKEN: &str = "test-admin-token-0123456789abcdef";

fn server_section(extra: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndrain_delay = \"0s\"\nshutdown_grace = \"5s\"\n{extra}\n"
    )
}

/// Builds a `[[service]]` table that runs the simulated predictor on host NAME.local.
fn predictor_service(name: &str, settings: &str, predictor_args: &[&str]) -> String {
    format!(
        "[[service]]\nname = \"{name}\"\nhosts = [\"{name}.local\"]\nreadiness_path = \"/v2/models/demo/ready\"\n{settings}\n{}\n",
        predictor_process(predictor_args)
    )
}

async fn admin_request(coldgate: &Coldgate, method: &str, path: &str, token: Option<&str>) -> (StatusCode, serde_json::Value) {
    let mut builder = Request::builder().method(method).uri(path).header("host", "admin");
    if let Some(token) = token {
        builder = builder.header("authorization", format!("Bearer {token}"));
    }
    let response = send(coldgate.admin, builder.body(Full::new(Bytes::new())).unwrap()).await;
    let status = response.status();
    let body = serde_json::from_slice(response.body())
        .unwrap_or_else(|error| panic!("{method} {path}: body is not JSON ({error}): {:?}", response.body()));
    (status, body)
}

async fn warm(coldgate: &Coldgate, service: &str, token: Option<&str>) -> (StatusCode, serde_json::Value) {
    admin_request(coldgate, "POST", &format!("/admin/services/{service}/warm"), token).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_actions_disabled_without_token() {
    let config = format!("{}{}", server_section(""), predictor_service("demo", "", &[]));
    let coldgate = Coldgate::start(&config);

    let (status, body) = warm(&coldgate, "demo", Some(TOKEN)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"]["code"], "admin_disabled");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("admin_token_file"), "the message says how to enable admin actions: {message}");

    let (status, _) = warm(&coldgate, "demo", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let service = coldgate.service_status("demo").await;
    assert_eq!(service["state"], "idle", "a rejected warm-up starts nothing");
    assert_eq!(coldgate.status().await["admin_actions"], "disabled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_served_self_contained() {
    let config = server_section("");
    let coldgate = Coldgate::start(&config);
    for path in ["/", "/status.html"] {
        let response = send(coldgate.admin, request("GET", "admin", path, "")).await;
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let headers = response.headers();
        assert_eq!(headers["content-type"], "text/html; charset=utf-8", "{path}");
        let policy = headers["content-security-policy"].to_str().unwrap();
        assert!(policy.starts_with("default-src 'none'"), "{path}: {policy}");
        let page = String::from_utf8(response.body().to_vec()).unwrap();
        assert!(page.contains("fetch(\"/status\""), "{path}: the page polls /status");
        for external in ["src=\"http", "href=\"http", "@import", "url(", "<link"] {
            assert!(!page.contains(external), "{path}: the page loads something from elsewhere ({external})");
        }
    }
    // Other methods on GET endpoints stay rejected.
    let response = send(coldgate.admin, request("POST", "admin", "/status", "")).await;
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_checks_token_and_starts_service() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let start_log = start_log_path(dir.path());
    let start_log_arg = start_log.to_str().unwrap().to_owned();
    // The inline token is ignored because admin_token_file wins.
    let server = format!(
        "admin_token = \"inline-token-that-loses-0000\"\nadmin_token_file = {:?}",
        token_file.to_str().unwrap()
    );
    let config = format!(
        "{}{}",
        server_section(&server),
        predictor_service("demo", "idle_timeout = \"10m\"", &["--load-ms", "800", "--start-log", &start_log_arg])
    );
    let coldgate = Coldgate::start_in(dir, &config);
    assert_eq!(coldgate.status().await["admin_actions"], "enabled");

    let (status, body) = warm(&coldgate, "demo", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error"]["code"], "unauthorized");
    let (status, _) = warm(&coldgate, "demo", Some("wrong-token-0123456789abcdef")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = warm(&coldgate, "demo", Some("inline-token-that-loses-0000")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "admin_token_file wins over admin_token");
    assert_eq!(coldgate.service_status("demo").await["state"], "idle", "rejected warm-ups start nothing");

    let (status, body) = warm(&coldgate, "missing", Some(TOKEN)).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"]["code"], "unknown_service");
    let (status, _) = admin_request(&coldgate, "GET", "/admin/services/demo/warm", Some(TOKEN)).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let (status, _) = admin_request(&coldgate, "POST", "/admin/services/demo/start", Some(TOKEN)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, body) = warm(&coldgate, "demo", Some(TOKEN)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["result"], "started");
    assert_eq!(body["state"], "activating");

    let (status, body) = warm(&coldgate, "demo", Some(TOKEN)).await;
    assert_eq!(status, StatusCode::OK, "a second warm-up while starting: {body}");
    assert_eq!(body["result"], "already_running");

    let service = coldgate.wait_for_service("demo", Duration::from_secs(15), |s| s["state"] == "serving").await;
    assert_eq!(service["instances"], 1);
    assert_eq!(service["queue_depth"], 0);
    let cold_start = service["last_cold_start_seconds"].as_f64().unwrap();
    assert!(cold_start >= 0.7, "cold start of {cold_start} s is shorter than the 800 ms load");
    let recent = service["recent_cold_starts"].as_array().unwrap();
    assert_eq!(recent.len(), 1, "{service}");
    assert_eq!(recent[0]["seconds"].as_f64(), Some(cold_start));

    // Warmed ahead of traffic: the first request does not wait for the model to load.
    let sent = Instant::now();
    let response = send(coldgate.data, request("GET", "demo.local", "/v2/models/demo/ready", "")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(sent.elapsed() < Duration::from_millis(500), "first request after warm-up took {:?}", sent.elapsed());

    let (status, body) = warm(&coldgate, "demo", Some(TOKEN)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "serving");
    assert_eq!(start_log_counts(&start_log), (1, 1), "exactly one predictor start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_during_scale_down_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let start_log = start_log_path(dir.path());
    let start_log_arg = start_log.to_str().unwrap().to_owned();
    // The predictor takes 1.5 s to exit after SIGTERM, which leaves time to warm it up
    // while the scale-down runs.
    let config = format!(
        "{}{}",
        server_section(&format!("admin_token_file = {:?}", token_file.to_str().unwrap())),
        predictor_service(
            "demo",
            "idle_timeout = \"1s\"",
            &["--load-ms", "200", "--term-delay-ms", "1500", "--start-log", &start_log_arg]
        )
    );
    let coldgate = Coldgate::start_in(dir, &config);
    let (status, _) = warm(&coldgate, "demo", Some(TOKEN)).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    coldgate.wait_for_service("demo", Duration::from_secs(10), |s| s["state"] == "serving").await;
    coldgate.wait_for_service("demo", Duration::from_secs(10), |s| s["state"] == "scaling_down").await;

    let (status, body) = warm(&coldgate, "demo", Some(TOKEN)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["result"], "starts_after_scale_down");
    coldgate.wait_for_service("demo", Duration::from_secs(10), |s| s["state"] == "serving").await;
    assert_eq!(start_log_counts(&start_log).0, 2, "a second predictor start after the scale-down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_warm_window_holds_service_up() {
    // "00:00-24:00 UTC" is open all day, every day.
    let config = format!(
        "{}{}{}",
        server_section(""),
        predictor_service("warm", "idle_timeout = \"1s\"\nkeep_warm = [\"00:00-24:00 UTC\"]", &["--load-ms", "200"]),
        predictor_service("plain", "idle_timeout = \"1s\"", &["--load-ms", "200"]),
    );
    let coldgate = Coldgate::start(&config);

    // Started without any request, because its window is open at start-up.
    let service = coldgate.wait_for_service("warm", Duration::from_secs(10), |s| s["state"] == "serving").await;
    assert_eq!(service["keep_warm"]["open"], true, "{service}");
    assert_eq!(service["keep_warm"]["windows"][0], "00:00-24:00 UTC");

    // Both get traffic, then stay quiet for four idle timeouts.
    for host in ["warm.local", "plain.local"] {
        let response = send(coldgate.data, request("GET", host, "/v2/models/demo/ready", "")).await;
        assert_eq!(response.status(), StatusCode::OK, "{host}");
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(coldgate.service_status("warm").await["state"], "serving", "scaled to zero inside its window");
    coldgate.wait_for_service("plain", Duration::from_secs(10), |s| s["state"] == "idle").await;
}

/// Returns the next UTC minute boundary at least `margin` from now.
fn next_minute_utc(margin: Duration) -> jiff::Zoned {
    let earliest = jiff::Timestamp::now() + jiff::SignedDuration::try_from(margin).unwrap();
    let zoned = earliest.to_zoned(jiff::tz::TimeZone::UTC);
    let floor = zoned.with().second(0).subsec_nanosecond(0).build().unwrap();
    floor.checked_add(jiff::SignedDuration::from_mins(1)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_warm_window_start_and_end() {
    // A one-minute window that starts at the next minute boundary. Windows have minute
    // resolution, so the test lasts up to about two minutes.
    let start = next_minute_utc(Duration::from_secs(4));
    let end = start.checked_add(jiff::SignedDuration::from_mins(1)).unwrap();
    let window = format!("{}-{} UTC", start.strftime("%H:%M"), end.strftime("%H:%M"));
    let config = format!(
        "{}{}",
        server_section(""),
        predictor_service("demo", &format!("idle_timeout = \"1s\"\nkeep_warm = [{window:?}]"), &["--load-ms", "200"]),
    );
    let coldgate = Coldgate::start(&config);
    let until = |instant: &jiff::Zoned| {
        jiff::Timestamp::now().duration_until(instant.timestamp()).unsigned_abs()
    };

    let service = coldgate.service_status("demo").await;
    assert_eq!(service["state"], "idle", "started before its window {window}: {service}");
    assert_eq!(service["keep_warm"]["open"], false);
    assert_eq!(service["keep_warm"]["next_start_unix_ms"].as_i64(), Some(start.timestamp().as_millisecond()));

    tokio::time::sleep(until(&start).saturating_sub(Duration::from_millis(1500))).await;
    assert_eq!(coldgate.service_status("demo").await["state"], "idle", "started before its window {window}");

    coldgate.wait_for_service("demo", Duration::from_secs(8), |s| s["state"] == "serving").await;
    let started_late = jiff::Timestamp::now().duration_since(start.timestamp());
    assert!(started_late.is_positive(), "serving {started_late} before the window {window} opened");

    // Stays up for the window although idle_timeout is 1 s.
    tokio::time::sleep(until(&end).saturating_sub(Duration::from_secs(2))).await;
    let service = coldgate.service_status("demo").await;
    assert_eq!(service["state"], "serving", "scaled to zero inside its window {window}");
    assert_eq!(service["keep_warm"]["open"], true);

    // After the window the ordinary idle timeout applies again.
    coldgate.wait_for_service("demo", Duration::from_secs(10), |s| s["state"] == "idle").await;
    let stopped_late = jiff::Timestamp::now().duration_since(end.timestamp());
    assert!(stopped_late.is_positive(), "scaled to zero {stopped_late} before the window {window} closed");
}

// ---- status page in headless Chromium --------------------------------------------------

/// Returns the Chromium binary, or `None` (after saying why) when the test should skip.
fn chromium() -> Option<PathBuf> {
    for name in ["chromium", "chromium-browser"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output()
            .ok()
            .filter(|output| output.status.success())
            .map(|output| PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()));
        if found.is_some() {
            return found;
        }
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("chromium is not installed, and CI=true requires this test to run; install it with `apt-get install chromium`");
    }
    eprintln!("SKIPPED: status page test: chromium is not installed; install it with `apt-get install chromium` to run this test");
    None
}

/// Runs headless Chromium on `url` with extra flags and returns its stdout. Fails after 90 s.
fn run_chromium(binary: &Path, profile: &Path, url: &str, extra: &[&str]) -> String {
    let mut child = Command::new(binary)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            // Lets the page's 2 s refresh timer run a few times without waiting in real time.
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("failed to start chromium");
    let started = Instant::now();
    loop {
        if child.try_wait().expect("wait for chromium").is_some() {
            break;
        }
        if started.elapsed() > Duration::from_secs(90) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 90 s on {url}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().expect("read chromium output");
    assert!(output.status.success(), "chromium failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).expect("the DOM is UTF-8")
}

/// Returns the `<tr data-service="NAME">` element of the dumped DOM.
fn service_row<'a>(dom: &'a str, name: &str) -> &'a str {
    let marker = format!("data-service=\"{name}\"");
    let start = dom.find(&marker).unwrap_or_else(|| panic!("no row for service {name} in the page:\n{dom}"));
    let end = start + dom[start..].find("</tr>").expect("row end");
    &dom[start..end]
}

/// Returns the text of the cell with `data-field="FIELD"` in `row`, without tags.
fn cell_text(row: &str, field: &str) -> String {
    let marker = format!("data-field=\"{field}\"");
    let start = row.find(&marker).unwrap_or_else(|| panic!("no {field} cell in row {row}"));
    let content = &row[start + row[start..].find('>').unwrap() + 1..];
    let content = &content[..content.find("</td>").expect("cell end")];
    let mut text = String::new();
    let mut in_tag = false;
    for c in content.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    text.replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", "\"")
}

/// Returns the text of the first `<span>` in the cell with `data-field="FIELD"`.
fn first_span(row: &str, field: &str) -> String {
    let marker = format!("data-field=\"{field}\"");
    let start = row.find(&marker).unwrap();
    let rest = &row[start..];
    let span = rest.find("<span").unwrap();
    let text = &rest[span + rest[span..].find('>').unwrap() + 1..];
    text[..text.find('<').unwrap()].to_owned()
}

fn format_seconds(value: &serde_json::Value) -> String {
    match value.as_f64() {
        Some(seconds) => format!("{seconds:.2} s"),
        None => "–".to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_matches_status() {
    let Some(browser) = chromium() else { return };

    // Load times vary with the predictor's pid, so the chart has bars of different heights.
    let varied_load = format!(
        "[service.process]\ncommand = \"/bin/sh\"\nargs = [\"-c\", \"exec {} predictor --port {{port}} --model demo --load-ms $(( ($$ % 9 + 2) * 100 ))\"]\nstop_grace = \"5s\"\n",
        BIN
    );
    let cycled = format!(
        "[[service]]\nname = \"whisper\"\nhosts = [\"whisper.local\"]\nreadiness_path = \"/v2/models/demo/ready\"\nidle_timeout = \"1s\"\n{varied_load}"
    );
    let config = format!(
        "{server}{demo}{slow}{broken}{cycled}",
        server = server_section("max_total_queued = 100"),
        demo = predictor_service("iris", "idle_timeout = \"10m\"", &["--load-ms", "700"]),
        // Never ready during the test, so its held requests stay held.
        slow = predictor_service("llama-70b", "queue_timeout = \"5m\"\nkeep_warm = [\"Mon-Fri 08:00-18:00 Europe/Berlin\"]", &["--load-ms", "600000"]),
        broken = "[[service]]\nname = \"resnet\"\nhosts = [\"resnet.local\"]\n[service.process]\ncommand = \"/nonexistent/model-server\"\n",
    );
    let coldgate = Coldgate::start(&config);

    // iris: one cold start, then serving.
    let response = send(coldgate.data, request("GET", "iris.local", "/v2/models/demo/ready", "")).await;
    assert_eq!(response.status(), StatusCode::OK);
    // resnet: a failed start leaves last_error.
    let response = send(coldgate.data, request("GET", "resnet.local", "/", "")).await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    // llama-70b: three held requests while it loads.
    let mut held = Vec::new();
    for _ in 0..3 {
        let addr = coldgate.data;
        held.push(tokio::spawn(async move { try_send(addr, request("GET", "llama-70b.local", "/", "")).await }));
    }
    // whisper: several cold starts, back to idle in between.
    for _ in 0..5 {
        let response = send(coldgate.data, request("GET", "whisper.local", "/v2/models/demo/ready", "")).await;
        assert_eq!(response.status(), StatusCode::OK);
        coldgate.wait_for_service("whisper", Duration::from_secs(15), |s| s["state"] == "idle").await;
    }
    coldgate.wait_for_service("llama-70b", Duration::from_secs(5), |s| s["queue_depth"] == 3).await;

    let status = coldgate.status().await;
    let url = format!("http://{}/", coldgate.admin);
    let profile = tempfile::tempdir().unwrap();
    let dom = {
        let (browser, profile, url) = (browser.clone(), profile.path().to_owned(), url.clone());
        tokio::task::spawn_blocking(move || run_chromium(&browser, &profile, &url, &["--dump-dom"])).await.unwrap()
    };

    let services = status["services"].as_array().unwrap();
    assert_eq!(services.len(), 4);
    for service in services {
        let name = service["name"].as_str().unwrap();
        let row = service_row(&dom, name);
        assert_eq!(first_span(row, "state"), service["state"].as_str().unwrap(), "{name} state");
        for field in ["instances", "starting_instances", "queue_depth", "in_flight"] {
            assert_eq!(cell_text(row, field), service[field].to_string(), "{name} {field}");
        }
        assert_eq!(cell_text(row, "last_cold_start_seconds"), format_seconds(&service["last_cold_start_seconds"]), "{name} cold start");
        let last_error = service["last_error"].as_str().unwrap_or("–");
        assert_eq!(cell_text(row, "last_error"), last_error, "{name} last error");

        let recent = service["recent_cold_starts"].as_array().unwrap();
        assert!(row.contains(&format!("data-count=\"{}\"", recent.len())), "{name}: chart bar count in {row}");
        assert_eq!(row.matches("<rect class=\"bar").count(), recent.len(), "{name} bars");
        for cold_start in recent {
            let seconds = format!("data-seconds=\"{:.3}\"", cold_start["seconds"].as_f64().unwrap());
            assert!(row.contains(&seconds), "{name}: no bar with {seconds} in {row}");
        }
    }

    // Spot checks against fixed expectations, so a page that mirrors a wrong /status fails.
    let iris = service_row(&dom, "iris");
    assert_eq!(first_span(iris, "state"), "serving");
    assert_eq!(cell_text(iris, "instances"), "1");
    let llama = service_row(&dom, "llama-70b");
    assert_eq!(first_span(llama, "state"), "activating");
    assert_eq!(cell_text(llama, "queue_depth"), "3");
    assert!(cell_text(llama, "name").contains("keep warm: Mon-Fri 08:00-18:00 Europe/Berlin"));
    assert!(cell_text(service_row(&dom, "resnet"), "last_error").contains("/nonexistent/model-server"));
    assert_eq!(service_row(&dom, "whisper").matches("<rect class=\"bar").count(), 5);
    assert!(dom.contains("<div id=\"problem\" role=\"alert\" hidden=\"\">"), "the page reported a failed fetch");

    // A screenshot for the README, written to the path in COLDGATE_STATUS_SCREENSHOT or into
    // a temporary directory. Either way it must be a non-trivial PNG.
    let screenshots = tempfile::tempdir().unwrap();
    let target = std::env::var_os("COLDGATE_STATUS_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| screenshots.path().join("status-page.png"));
    let target = std::path::absolute(&target).unwrap();
    {
        let (browser, profile, url) = (browser.clone(), profile.path().to_owned(), url.clone());
        let flag = format!("--screenshot={}", target.display());
        tokio::task::spawn_blocking(move || run_chromium(&browser, &profile, &url, &[&flag, "--window-size=1200,800"]))
            .await
            .unwrap();
    }
    let png = std::fs::read(&target).expect("chromium wrote no screenshot");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "the screenshot is not a PNG");
    assert!(png.len() > 20_000, "the screenshot is only {} bytes; the page is probably blank", png.len());

    for task in held {
        task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_without_services() {
    let Some(browser) = chromium() else { return };
    let coldgate = Coldgate::start(&server_section(""));
    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://{}/", coldgate.admin);
    let dom = tokio::task::spawn_blocking(move || run_chromium(&browser, profile.path(), &url, &["--dump-dom"]))
        .await
        .unwrap();
    assert!(dom.contains("No services are configured."), "{dom}");
    assert!(dom.contains("id=\"total-services\">0<"), "{dom}");
    assert!(dom.contains("<div id=\"problem\" role=\"alert\" hidden=\"\">"), "the page reported a failed fetch: {dom}");
}
