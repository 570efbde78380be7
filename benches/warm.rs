//! Warm-path benchmark: the same loopback backend reached directly, through coldgate and
//! through nginx, with small (64-byte) and 1 MiB responses.
//!
//! The backend is an nginx that coldgate itself starts as the service's process (through
//! `/bin/sh`, which writes the `{port}` into its config), so the service is a real
//! coldgate service. It responds to `/small` with a 64-byte body from `return` and to
//! `/big.bin` with a 1 MiB file. The nginx proxy under comparison is a second nginx with
//! `worker_processes` equal to coldgate's `threads`, an upstream with `keepalive 64`,
//! `proxy_http_version 1.1` and `Connection ""`, and no access log. Before any load, each
//! path is checked once for status 200 and the exact body.
//!
//! Load comes from wrk: 64 keep-alive connections, 2 threads, a warm-up run and then a
//! measured run per path, in rounds. Each round runs the paths in a rotated order. The
//! table shows the medians over the rounds, with the range of req/s. A wrk script prints p50, p99 and p99.9
//! (wrk's own `--latency` table leaves out p99.9). CPU per request is the CPU time that
//! the proxy (coldgate's process, or nginx's master and workers) and the backend used
//! during the measured run, divided by the requests wrk completed.
//!
//! NOTE: wrk (4.1, not wrk2) sends the next request on a connection only after the last
//! response, so its latencies leave out the time a request would have waited to be sent
//! at a fixed rate. Compare the percentiles between routes, not against an SLO.
//!
//! Full run (release build): `cargo bench --bench warm -- [--seconds 10] [--warmup 2]
//! [--rounds 3] [--workers 2] [--backend-workers 1] [--connections 64] [--wrk-threads 2]
//! [--pin] [--routes direct,coldgate,nginx] [--sizes small,big] [--nginx-unbuffered]`.
//! `--pin` puts both proxies on CPU 1 and wrk and the backend on CPU 0 (needs
//! `taskset`); without it all processes share every CPU. Needs `nginx` and `wrk`
//! (`scripts/bench-deps.sh`) and fails without them.
//!
//! Smoke run: `cargo test --bench warm` (debug build, no `--bench`) runs one round of
//! 1 s per path with no warm-up. Without nginx it checks coldgate in front of this
//! executable's built-in backend (`support/backend.rs`) instead and prints "skipped" for
//! the comparison. Without wrk it prints "skipped" for the load runs.
//!
//! Loopback only; each wrk run is bounded by `--seconds`.

#[path = "support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use support::{Coldgate, Nginx, Wrk, WrkResult};

const HOST: &str = "bench.local";
const SMALL_BODY: &[u8] = support::backend::BODY;
/// Attempts to start the nginx proxy, each on a newly chosen free port.
const PROXY_START_ATTEMPTS: usize = 5;

struct Options {
    seconds: u64,
    /// Seconds of unmeasured load before each measured run; 0 skips the warm-up.
    warmup: u64,
    rounds: usize,
    workers: usize,
    backend_workers: usize,
    connections: usize,
    wrk_threads: usize,
    pin: bool,
    /// Adds `proxy_buffering off;` to the nginx proxy, so it streams responses like
    /// coldgate instead of buffering them (to disk when they exceed its memory buffers).
    nginx_unbuffered: bool,
    /// Comma-separated subset of direct, coldgate, nginx.
    routes: String,
    /// Comma-separated subset of small, big.
    sizes: String,
}

#[derive(Clone, Copy, PartialEq)]
enum Route {
    Direct,
    Coldgate,
    Nginx,
}

impl Route {
    fn label(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Coldgate => "coldgate",
            Route::Nginx => "nginx",
        }
    }
}

/// A response size under test: its label in the table, its option name and its path.
struct Size {
    label: &'static str,
    name: &'static str,
    path: &'static str,
}

const SIZES: [Size; 2] = [
    Size { label: "small", name: "small", path: "/small" },
    Size { label: "1 MiB", name: "big", path: "/big.bin" },
];

/// Returns the body that the backends send for `path`.
fn expected_body(path: &str) -> Vec<u8> {
    if path == "/big.bin" {
        support::backend::big_body()
    } else {
        SMALL_BODY.to_vec()
    }
}

/// One measured wrk run plus the CPU time the proxy and the backend used during it.
#[derive(Clone, Copy)]
struct Sample {
    wrk: WrkResult,
    proxy_cpu: Duration,
    backend_cpu: Duration,
}

fn main() {
    if support::backend::run_if_requested() {
        return;
    }
    let benchmarking = support::benchmarking();
    let options = Options {
        seconds: support::arg("seconds", if benchmarking { 10 } else { 1 }),
        warmup: support::arg("warmup", if benchmarking { 2 } else { 0 }),
        rounds: support::arg("rounds", if benchmarking { 3 } else { 1 }),
        workers: support::arg("workers", 2),
        backend_workers: support::arg("backend-workers", 1),
        connections: support::arg("connections", 64),
        wrk_threads: support::arg("wrk-threads", 2),
        pin: support::flag("pin"),
        nginx_unbuffered: support::flag("nginx-unbuffered"),
        routes: support::arg("routes", "direct,coldgate,nginx".to_string()),
        sizes: support::arg("sizes", "small,big".to_string()),
    };
    assert!(options.seconds > 0, "--seconds must be at least 1");
    assert!(options.rounds > 0, "--rounds must be at least 1");

    let has_nginx = support::nginx_path().is_some();
    let has_wrk = support::which("wrk").is_some();
    if options.pin && support::which("taskset").is_none() {
        panic!("--pin needs taskset in PATH; install it with scripts/bench-deps.sh");
    }
    if benchmarking {
        let missing: Vec<&str> = [("nginx", has_nginx), ("wrk", has_wrk)]
            .into_iter()
            .filter_map(|(program, found)| (!found).then_some(program))
            .collect();
        if !missing.is_empty() {
            panic!("the warm benchmark needs {missing:?}; install them with scripts/bench-deps.sh");
        }
    } else {
        println!(
            "smoke run ({} s per path, debug build); use `cargo bench --bench warm` for figures",
            options.seconds
        );
    }
    support::raise_fd_limit();

    if !has_nginx {
        println!("skipped: nginx not found, so no direct or nginx path; checking coldgate in front of the built-in backend instead");
        check_without_nginx(&options, has_wrk);
        return;
    }
    run(&options, benchmarking, has_wrk);
}

/// Smoke check for machines without nginx: coldgate starts this executable's built-in
/// backend, each size is fetched once through it, and with wrk one short load run follows.
fn check_without_nginx(options: &Options, has_wrk: bool) {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let config = format!(
        r#"{server}
[defaults]
idle_timeout = "1h"
[[service]]
name = "bench"
hosts = [{host}]
readiness_path = "/ready"
[service.process]
command = {command}
args = ["backend", "--port", "{{port}}"]
stop_grace = "2s"
"#,
        server = support::server_table(options.workers, 1000),
        host = support::toml_string(HOST),
        command = support::toml_string(exe.to_str().unwrap()),
    );
    let config_path = dir.path().join("coldgate.toml");
    std::fs::write(&config_path, config).unwrap();
    let coldgate = Coldgate::start(&config_path);

    // The first request starts the backend.
    for size in &SIZES {
        check_response(coldgate.data, Route::Coldgate, size.path);
    }
    check_one_activation(&coldgate);
    println!("coldgate answered /small and /big.bin with 200 and the expected bodies after one start");

    if !has_wrk {
        println!("skipped: wrk not found, so no load run");
        return;
    }
    let script = dir.path().join("report.lua");
    std::fs::write(&script, support::WRK_SCRIPT).unwrap();
    let wrk = Wrk {
        url: format!("http://{}/small", coldgate.data),
        host: HOST,
        threads: options.wrk_threads,
        connections: options.connections,
        seconds: options.seconds,
        pin: None,
        script: &script,
    };
    let result = wrk.run();
    assert!(result.requests > 0, "wrk completed no request through coldgate");
    assert_eq!(result.errors, 0, "wrk counted errors through coldgate");
    println!(
        "coldgate in front of the built-in backend: {:.0} req/s, p99 {} (debug build)",
        result.requests_per_second(),
        format_us(result.p99_us)
    );
}

/// Fetches `path` once through `route` and checks the status and the whole body.
fn check_response(addr: SocketAddr, route: Route, path: &str) {
    let expected = expected_body(path);
    let (code, body) = support::http_get(addr, HOST, path)
        .unwrap_or_else(|e| panic!("GET {path} on the {} path ({addr}) failed: {e}", route.label()));
    assert_eq!(
        code,
        200,
        "GET {path} on the {} path returned {code}: {}",
        route.label(),
        String::from_utf8_lossy(&body[..body.len().min(200)])
    );
    assert_eq!(body.len(), expected.len(), "GET {path} on the {} path returned a body of the wrong length", route.label());
    assert!(body == expected, "GET {path} on the {} path returned a body with the wrong content", route.label());
}

/// Checks that coldgate activated the service exactly once.
fn check_one_activation(coldgate: &Coldgate) {
    let activations = support::metric_sum(coldgate.admin, "coldgate_activations_total");
    assert_eq!(activations, 1.0, "expected one activation of the service, /metrics counts {activations}");
}

fn run(options: &Options, benchmarking: bool, has_wrk: bool) {
    let dir = tempfile::tempdir().unwrap();
    // nginx workers run as an unprivileged user when started by root; they must be able to
    // reach the files and config in this directory.
    set_mode(dir.path(), 0o755);
    let www = dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    set_mode(&www, 0o755);
    std::fs::write(www.join("big.bin"), support::backend::big_body()).unwrap();
    set_mode(&www.join("big.bin"), 0o644);

    let nginx = support::nginx_path().unwrap();
    let (proxy_cpus, client_cpus) = if options.pin { (Some("1"), Some("0")) } else { (None, None) };

    // The backend: an nginx started by coldgate through sh, which writes the port into
    // its config first.
    std::fs::write(dir.path().join("backend.conf.in"), backend_config(dir.path(), options.backend_workers)).unwrap();
    let pin_backend = client_cpus.map(|cpus| format!("taskset -c {cpus} ")).unwrap_or_default();
    let script = format!(
        "sed \"s/@PORT@/$1/\" {dir}/backend.conf.in > {dir}/backend.conf && exec {pin_backend}{nginx} -p {dir} -e stderr -c {dir}/backend.conf",
        dir = dir.path().display(),
        nginx = nginx.display(),
    );
    let config = format!(
        r#"{server}
[defaults]
idle_timeout = "1h"
[[service]]
name = "bench"
hosts = [{host}]
readiness_path = "/ready"
[service.process]
command = "/bin/sh"
args = ["-c", {script}, "backend", "{{port}}"]
stop_grace = "5s"
"#,
        server = support::server_table(options.workers, 1000),
        host = support::toml_string(HOST),
        script = support::toml_string(&script),
    );
    let config_path = dir.path().join("coldgate.toml");
    std::fs::write(&config_path, config).unwrap();
    let coldgate_prefix: Vec<&str> = match proxy_cpus {
        Some(cpus) => vec!["taskset", "-c", cpus],
        None => vec![],
    };
    let coldgate = Coldgate::start_with(&config_path, &coldgate_prefix);

    // The first request starts the backend.
    check_response(coldgate.data, Route::Coldgate, "/small");
    check_one_activation(&coldgate);
    let status = support::status(coldgate.admin);
    let backend: SocketAddr = status["services"][0]["endpoints"][0]["address"]
        .as_str()
        .expect("the warm service lists its endpoint in /status")
        .parse()
        .unwrap();
    let backend_pid: u32 = std::fs::read_to_string(dir.path().join("backend.pid")).unwrap().trim().parse().unwrap();

    let (proxy, proxy_addr) = start_proxy(dir.path(), options, backend, proxy_cpus);

    let routes: Vec<Route> = [Route::Direct, Route::Coldgate, Route::Nginx]
        .into_iter()
        .filter(|route| options.routes.split(',').any(|name| name == route.label()))
        .collect();
    let sizes: Vec<&Size> = SIZES
        .iter()
        .filter(|size| options.sizes.split(',').any(|name| name == size.name))
        .collect();
    assert!(!routes.is_empty(), "--routes {:?} names none of direct, coldgate, nginx", options.routes);
    assert!(!sizes.is_empty(), "--sizes {:?} names none of small, big", options.sizes);
    let address = |route: Route| match route {
        Route::Direct => backend,
        Route::Coldgate => coldgate.data,
        Route::Nginx => proxy_addr,
    };
    for size in &sizes {
        for route in &routes {
            check_response(address(*route), *route, size.path);
        }
    }
    println!("every path answered with 200 and the expected body");
    if !has_wrk {
        println!("skipped: wrk not found, so no load runs");
        return;
    }

    let script_path = dir.path().join("report.lua");
    std::fs::write(&script_path, support::WRK_SCRIPT).unwrap();

    println!("machine: {}", support::machine_summary());
    println!(
        "coldgate threads = nginx worker_processes = {}; backend nginx workers = {}; wrk {} threads, {} connections, {} s per run after {} s warm-up, {} rounds; {}",
        options.workers,
        options.backend_workers,
        options.wrk_threads,
        options.connections,
        options.seconds,
        options.warmup,
        options.rounds,
        if options.pin { "proxies on CPU 1, wrk and backend on CPU 0" } else { "no CPU pinning: all processes share every CPU" }
    );
    if options.nginx_unbuffered {
        println!("nginx proxy with proxy_buffering off");
    }

    let mut samples: Vec<Vec<Vec<Sample>>> = vec![vec![Vec::new(); routes.len()]; sizes.len()];
    for round in 0..options.rounds {
        for (size_index, size) in sizes.iter().enumerate() {
            // Each round starts with another route, so a slow drift of the machine (other
            // load, CPU frequency) does not always fall on the same route.
            for offset in 0..routes.len() {
                let route_index = (round + offset) % routes.len();
                let route = routes[route_index];
                // coldgate is one process and its only children are the backends it
                // started, so its own CPU time is the proxy's. nginx's proxy is a master
                // with worker children.
                let proxy_cpu_time = || match route {
                    Route::Direct => Duration::ZERO,
                    Route::Coldgate => support::cpu_time(coldgate.pid),
                    Route::Nginx => support::cpu_time_with_children(proxy.pid),
                };
                let mut wrk = Wrk {
                    url: format!("http://{}{}", address(route), size.path),
                    host: HOST,
                    threads: options.wrk_threads,
                    connections: options.connections,
                    seconds: options.warmup,
                    pin: client_cpus,
                    script: &script_path,
                };
                if options.warmup > 0 {
                    wrk.run();
                }
                wrk.seconds = options.seconds;
                let proxy_before = proxy_cpu_time();
                let backend_before = support::cpu_time_with_children(backend_pid);
                let result = wrk.run();
                let proxy_cpu = proxy_cpu_time() - proxy_before;
                let backend_cpu = support::cpu_time_with_children(backend_pid) - backend_before;
                println!(
                    "round {} {:>5} {:>8}: {:>9.0} req/s  p50 {:>6.0} us  p99 {:>6.0} us  p99.9 {:>6.0} us  errors {}",
                    round + 1,
                    size.label,
                    route.label(),
                    result.requests_per_second(),
                    result.p50_us,
                    result.p99_us,
                    result.p999_us,
                    result.errors
                );
                assert!(result.requests > 0, "wrk completed no request on the {} path", route.label());
                assert_eq!(result.errors, 0, "wrk counted errors on the {} path for {}", route.label(), size.label);
                samples[size_index][route_index].push(Sample { wrk: result, proxy_cpu, backend_cpu });
            }
        }
    }
    drop(proxy);
    drop(coldgate);

    println!();
    println!("medians over {} rounds, with the range over the rounds for req/s:", options.rounds);
    println!("| response | path | req/s | MiB/s | p50 | p99 | p99.9 | proxy CPU per request | backend CPU per request |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (size_index, size) in sizes.iter().enumerate() {
        let mut medians = Vec::new();
        for (route_index, route) in routes.iter().enumerate() {
            let runs = &samples[size_index][route_index];
            let pick = |f: &dyn Fn(&Sample) -> f64| support::median_f64(&runs.iter().map(f).collect::<Vec<_>>());
            let rps = pick(&|s| s.wrk.requests_per_second());
            let rps_cell = support::median_with_range(&runs.iter().map(|s| s.wrk.requests_per_second()).collect::<Vec<_>>(), 0);
            let mib = pick(&|s| s.wrk.mib_per_second());
            let p50 = pick(&|s| s.wrk.p50_us);
            let p99 = pick(&|s| s.wrk.p99_us);
            let p999 = pick(&|s| s.wrk.p999_us);
            let proxy_us = pick(&|s| s.proxy_cpu.as_secs_f64() * 1e6 / s.wrk.requests as f64);
            let backend_us = pick(&|s| s.backend_cpu.as_secs_f64() * 1e6 / s.wrk.requests as f64);
            let proxy_cell = if *route == Route::Direct { "-".to_string() } else { format!("{proxy_us:.1} us") };
            println!(
                "| {} | {} | {rps_cell} | {mib:.1} | {} | {} | {} | {proxy_cell} | {backend_us:.1} us |",
                size.label,
                route.label(),
                format_us(p50),
                format_us(p99),
                format_us(p999)
            );
            medians.push((*route, rps, p99));
        }
        let find = |wanted: Route| medians.iter().find(|(route, _, _)| *route == wanted).map(|&(_, rps, p99)| (rps, p99));
        if let (Some(coldgate), Some(nginx)) = (find(Route::Coldgate), find(Route::Nginx)) {
            println!("{}: throughput coldgate/nginx {:.3}", size.label, coldgate.0 / nginx.0);
        }
        if let Some(direct) = find(Route::Direct) {
            for route in [Route::Coldgate, Route::Nginx] {
                if let Some((_, p99)) = find(route) {
                    println!("{}: p99 added by {} over direct {}", size.label, route.label(), format_us(p99 - direct.1));
                }
            }
        }
    }
    println!("MiB/s counts every byte wrk read, headers included.");
    if !benchmarking {
        println!("smoke run finished; the figures above are from a debug build");
    }
}

/// Starts the nginx proxy on a free port. Another process may take that port before nginx
/// binds it, so a failed start is retried on a new port.
fn start_proxy(dir: &Path, options: &Options, backend: SocketAddr, pin: Option<&str>) -> (Nginx, SocketAddr) {
    let config = dir.join("proxy.conf");
    for attempt in 1..=PROXY_START_ATTEMPTS {
        let port = support::free_port();
        std::fs::write(&config, proxy_config_text(dir, options.workers, port, backend, options.nginx_unbuffered)).unwrap();
        let mut proxy = Nginx::start(&config, dir, pin);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        match proxy.wait_ready(addr, "/small", SMALL_BODY) {
            Ok(()) => return (proxy, addr),
            Err(error) => eprintln!("nginx proxy on port {port}, attempt {attempt} of {PROXY_START_ATTEMPTS}: {error}"),
        }
    }
    panic!("the nginx proxy failed to start {PROXY_START_ATTEMPTS} times; see the errors above");
}

fn format_us(us: f64) -> String {
    if us.abs() >= 10_000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else {
        format!("{us:.0} us")
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Paths that nginx would otherwise take from its compiled-in defaults under /var.
fn private_paths(dir: &Path, name: &str) -> String {
    let dir = dir.display();
    format!(
        "    client_body_temp_path {dir}/{name}-temp/client;\n    proxy_temp_path {dir}/{name}-temp/proxy;\n    fastcgi_temp_path {dir}/{name}-temp/fastcgi;\n    uwsgi_temp_path {dir}/{name}-temp/uwsgi;\n    scgi_temp_path {dir}/{name}-temp/scgi;\n"
    )
}

/// Config template of the backend nginx; `@PORT@` is replaced by the service's port.
fn backend_config(dir: &Path, workers: usize) -> String {
    std::fs::create_dir_all(dir.join("backend-temp")).unwrap();
    format!(
        r#"daemon off;
worker_processes {workers};
pid {path}/backend.pid;
error_log stderr warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
{private}    keepalive_requests 1000000;
    sendfile on;
    server {{
        listen 127.0.0.1:@PORT@ backlog=4096;
        location = /ready {{
            return 200 "ready\n";
        }}
        location = /small {{
            default_type text/plain;
            return 200 "{SMALL}";
        }}
        location / {{
            root {path}/www;
        }}
    }}
}}
"#,
        path = dir.display(),
        private = private_paths(dir, "backend"),
        SMALL = std::str::from_utf8(SMALL_BODY).unwrap().replace('\n', "\\n"),
    )
}

/// Config of the nginx reverse proxy under comparison.
fn proxy_config_text(dir: &Path, workers: usize, port: u16, backend: SocketAddr, unbuffered: bool) -> String {
    std::fs::create_dir_all(dir.join("proxy-temp")).unwrap();
    format!(
        r#"daemon off;
master_process on;
worker_processes {workers};
pid {path}/proxy.pid;
error_log stderr warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
{private}    keepalive_requests 1000000;
    upstream backend {{
        server {backend};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
{buffering}        }}
    }}
}}
"#,
        path = dir.display(),
        private = private_paths(dir, "proxy"),
        buffering = if unbuffered { "            proxy_buffering off;\n" } else { "" },
    )
}
