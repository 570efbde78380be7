//! A small HTTP/1.1 backend that coldgate can start as a service's process: the benchmark
//! executables run it when their first argument is `backend`
//! (`BENCH backend --port N [--load-ms MS] [--load-jitter-ms MS] [--log PATH] [--silent]`).
//!
//! It opens its port at once and answers `/ready` with 503 until `--load-ms` plus a
//! random 0 to `--load-jitter-ms` has passed, like a model server that is loading. The
//! jitter keeps the ready instant out of step with coldgate's probe timer, which otherwise
//! starts at the same moment as the load and ticks in step with it. `/big.bin` gets 200
//! with the 1 MiB [`big_body`], and every other path gets 200 with the 64-byte [`BODY`].
//! With `--log`, it appends lines `NAME pid=PID unix_ns=NS` for these instants:
//! - `start`: the process started;
//! - `ready`: it turned ready (taken before the readiness flag is set, so no 200 probe can
//!   precede it);
//! - `probe_ok`: the first `/ready` request it answered with 200 arrived;
//! - `first_request`: the first request that is not a probe arrived.
//!
//! When it turns ready it prints `ready` to stdout, as model servers log that they have
//! loaded (coldgate probes at once when an instance writes output); `--silent` leaves the
//! line out, so readiness is found by the periodic probe alone.
//!
//! SIGTERM ends it at once.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

pub const BODY: &[u8] = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde\n";

/// Size of the large response body.
pub const BIG_BYTES: usize = 1024 * 1024;

/// Returns the large response body: `BIG_BYTES` bytes cycling through `a` to `z`.
pub fn big_body() -> Vec<u8> {
    (0..BIG_BYTES).map(|i| b'a' + (i % 26) as u8).collect()
}

struct State {
    log: Option<PathBuf>,
    /// No `ready` line on stdout.
    silent: bool,
    ready: AtomicBool,
    big: Bytes,
    probe_ok: OnceLock<()>,
    first_request: OnceLock<()>,
}

impl State {
    /// Appends one `NAME pid=PID unix_ns=NS` line with a single write.
    fn record(&self, name: &str, unix_ns: u128) {
        let Some(log) = &self.log else { return };
        let line = format!("{name} pid={} unix_ns={unix_ns}\n", std::process::id());
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("backend: failed to open the log {}: {e}", log.display()));
        file.write_all(line.as_bytes()).unwrap();
    }
}

/// Runs the backend if the first argument is `backend`, and then returns true.
pub fn run_if_requested() -> bool {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) != Some("backend") {
        return false;
    }
    let value = |flag: &str| args.iter().position(|a| a == flag).map(|index| args[index + 1].clone());
    let port: u16 = value("--port")
        .expect("backend: missing --port")
        .parse()
        .expect("backend: --port expects a port number");
    let load_ms: u64 = value("--load-ms").map_or(0, |v| v.parse().expect("backend: --load-ms expects milliseconds"));
    let jitter_ms: u64 =
        value("--load-jitter-ms").map_or(0, |v| v.parse().expect("backend: --load-jitter-ms expects milliseconds"));
    // Uniform enough for spreading ready instants: the clock's nanoseconds at start.
    let jitter = Duration::from_nanos((super::unix_ns() % (u128::from(jitter_ms) * 1_000_000).max(1)) as u64);
    let silent = args.iter().any(|a| a == "--silent");
    let state = Arc::new(State {
        log: value("--log").map(PathBuf::from),
        silent,
        ready: AtomicBool::new(false),
        big: Bytes::from(big_body()),
        probe_ok: OnceLock::new(),
        first_request: OnceLock::new(),
    });
    state.record("start", super::unix_ns());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(serve(port, Duration::from_millis(load_ms) + jitter, state));
    true
}

async fn serve(port: u16, load: Duration, state: Arc<State>) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| panic!("backend: failed to bind 127.0.0.1:{port}: {e}"));
    let loading = state.clone();
    tokio::spawn(async move {
        tokio::time::sleep(load).await;
        loading.record("ready", super::unix_ns());
        loading.ready.store(true, Ordering::SeqCst);
        if !loading.silent {
            println!("ready");
        }
    });
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
            _ = terminate.recv() => return,
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                let state = state.clone();
                async move { Ok::<_, std::convert::Infallible>(respond(&state, request.uri().path())) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn respond(state: &State, path: &str) -> hyper::Response<Full<Bytes>> {
    let arrived = super::unix_ns();
    let status = if path == "/ready" {
        if !state.ready.load(Ordering::SeqCst) {
            503
        } else {
            if state.probe_ok.set(()).is_ok() {
                state.record("probe_ok", arrived);
            }
            200
        }
    } else {
        if state.first_request.set(()).is_ok() {
            state.record("first_request", arrived);
        }
        200
    };
    let body = if path == "/big.bin" { state.big.clone() } else { Bytes::from_static(BODY) };
    hyper::Response::builder().status(status).body(Full::new(body)).unwrap()
}
