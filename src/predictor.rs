//! Simulated model server ("sim predictor") for `coldgate demo` and the integration tests.
//!
//! It serves the KServe v2 readiness, liveness and inference paths, plus endpoints that
//! script the hard cases for a proxy: slow model loads, connections refused right after
//! readiness, streamed events, WebSocket sessions, large bodies, long requests and
//! crashes. Every duration is in milliseconds, counted from the call to [`run`].
//!
//! `--fail-start-ms` and `/crash` end the whole process with `std::process::exit`, so
//! run the predictor as its own process when a test uses them.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{
    HeaderMap, HeaderName, HeaderValue, CACHE_CONTROL, CONNECTION, CONTENT_TYPE, HOST,
};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{watch, Notify};
use tokio::time::{sleep, sleep_until, timeout, Instant};

const LOG_PREFIX: &str = "sim-predictor:";
const LISTEN_BACKLOG: u32 = 1024;
const MAX_INFER_BODY_BYTES: usize = 64 * 1024 * 1024;
const MAX_SSE_EVENTS: u64 = 100_000;
const MAX_SSE_INTERVAL_MS: u64 = 60_000;
const MAX_SSE_EVENT_BYTES: u64 = 16 * 1024 * 1024;
const MAX_SLOW_MS: u64 = 24 * 60 * 60 * 1000;
/// Time a `/crash` connection gets to send its response before the process exits anyway.
const CRASH_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// Options of the simulated model server. Durations are integer milliseconds since start.
#[derive(clap::Args, Debug, Clone)]
pub struct PredictorOptions {
    /// TCP port to listen on.
    #[arg(long)]
    pub port: u16,

    /// IP address to listen on. No other address is bound.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,

    /// Model name served under /v2/models/{model}/.
    #[arg(long, default_value = "demo")]
    pub model: String,

    /// Simulated model load time in ms: the port opens at once, but readiness probes
    /// return 503 until this much time has passed since start.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub load_ms: u64,

    /// Time in ms to wait after start before binding the port at all.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub listen_delay_ms: u64,

    /// Exit with status 3 this many ms after start, like a model that crashes while
    /// loading. With this option the model never becomes ready.
    #[arg(long, value_name = "MS")]
    pub fail_start_ms: Option<u64>,

    /// After the first successful readiness probe, close the listening socket for this
    /// many ms so that new connections are refused, then listen on the same port again.
    /// Open connections keep working.
    #[arg(long, value_name = "MS")]
    pub refuse_after_ready_ms: Option<u64>,

    /// Delay in ms before responding to each request, except probes and /stats.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub latency_ms: u64,

    /// File to append a `start pid=.. port=.. unix_ms=..` line to at start and a
    /// `ready pid=.. unix_ns=..` line to when the model becomes ready.
    #[arg(long, value_name = "PATH")]
    pub start_log: Option<PathBuf>,

    /// Maximum time in ms that in-flight requests get to finish after SIGTERM or
    /// SIGINT before the process exits with status 0.
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    pub drain_ms: u64,

    /// Keep accepting and serving for this many ms after SIGTERM or SIGINT before the
    /// drain starts, like a model server with a slow shutdown.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub term_delay_ms: u64,
}

/// Runs the simulated model server until SIGTERM or SIGINT, then drains and returns.
///
/// Returns an error when a signal handler cannot be registered, the start log cannot be
/// written, or the port cannot be bound. `--fail-start-ms` and `/crash` exit the process
/// without returning.
pub async fn run(options: PredictorOptions) -> io::Result<()> {
    let started = Instant::now();
    let pid = std::process::id();

    // Registered first so that a signal during the listen delay or the load also exits 0.
    let mut signals = ShutdownSignals::register()?;

    if let Some(path) = &options.start_log {
        let line = format!(
            "start pid={pid} port={} unix_ms={}",
            options.port,
            unix_time().as_millis()
        );
        append_line(path, &line).map_err(|error| start_log_error(path, error))?;
    }
    println!(
        "{LOG_PREFIX} starting pid {pid}, model {:?}, load {} ms, listen delay {} ms",
        options.model, options.load_ms, options.listen_delay_ms
    );

    if let Some(fail_ms) = options.fail_start_ms {
        tokio::spawn(exit_after_failed_load(started, fail_ms));
    }

    if options.listen_delay_ms > 0 {
        tokio::select! {
            _ = sleep_until(started + Duration::from_millis(options.listen_delay_ms)) => {}
            name = signals.recv() => {
                println!("{LOG_PREFIX} received {name} before listening; exiting with status 0");
                return Ok(());
            }
        }
    }

    let address = SocketAddr::new(options.host, options.port);
    let listener = bind_listener(address)?;
    // The port may have been 0, so later rebinds and logs use the port the OS chose.
    let address = listener.local_addr()?;
    println!("{LOG_PREFIX} listening on http://{address}");

    let drain = Duration::from_millis(options.drain_ms);
    let predictor = Arc::new(Predictor::new(options, started));
    tokio::spawn(mark_ready_after_load(predictor.clone()));

    let (shutdown, _) = watch::channel(false);
    let signal_name =
        accept_until_signal(listener, address, &predictor, &mut signals, &shutdown).await?;
    drain_connections(signal_name, shutdown, drain).await;
    Ok(())
}

/// State shared by all connections of one predictor process.
struct Predictor {
    options: PredictorOptions,
    started: Instant,
    ready: AtomicBool,
    refuse_window_started: AtomicBool,
    refuse_requested: Notify,
    /// Signalled by the accept loop once the listener is closed for the refusal window.
    listener_closed: Notify,
    requests: AtomicU64,
    probes: AtomicU64,
    /// WebSocket connections whose upgrade completed.
    websockets: AtomicU64,
    echo_checksums: Mutex<Vec<String>>,
    last_request_headers: Mutex<Map<String, Value>>,
}

impl Predictor {
    fn new(options: PredictorOptions, started: Instant) -> Self {
        Self {
            options,
            started,
            ready: AtomicBool::new(false),
            refuse_window_started: AtomicBool::new(false),
            refuse_requested: Notify::new(),
            listener_closed: Notify::new(),
            requests: AtomicU64::new(0),
            probes: AtomicU64::new(0),
            websockets: AtomicU64::new(0),
            echo_checksums: Mutex::new(Vec::new()),
            last_request_headers: Mutex::new(Map::new()),
        }
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Counts a non-probe request, stores its headers for /stats and returns its number.
    fn record_request(&self, headers: &HeaderMap) -> u64 {
        let number = self.requests.fetch_add(1, Ordering::SeqCst) + 1;
        let mut seen = Map::new();
        for name in headers.keys() {
            if let Some(value) = joined_header(headers, name) {
                seen.insert(
                    name.to_string(),
                    Value::String(String::from_utf8_lossy(value.as_bytes()).into_owned()),
                );
            }
        }
        *lock(&self.last_request_headers) = seen;
        number
    }
}

/// Per-connection state that lets `/crash` end the process once its response is sent and
/// lets `/ws` take over the connection once its 101 response is sent.
#[derive(Default)]
struct ConnectionControl {
    exit_code: OnceLock<i32>,
    exit_requested: Notify,
    websocket: Mutex<Option<websocket::PendingSession>>,
}

/// SIGTERM and SIGINT handlers.
struct ShutdownSignals {
    terminate: Signal,
    interrupt: Signal,
}

impl ShutdownSignals {
    fn register() -> io::Result<Self> {
        let register = |kind: SignalKind, name: &str| {
            signal(kind).map_err(|error| {
                io::Error::new(
                    error.kind(),
                    format!("failed to register a {name} handler: {error}"),
                )
            })
        };
        Ok(Self {
            terminate: register(SignalKind::terminate(), "SIGTERM")?,
            interrupt: register(SignalKind::interrupt(), "SIGINT")?,
        })
    }

    /// Waits for the next SIGTERM or SIGINT and returns its name.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
        }
    }
}

enum AcceptEvent {
    Connection(io::Result<(TcpStream, SocketAddr)>),
    RefuseWindow,
    Shutdown(&'static str),
}

/// Accepts connections until a shutdown signal arrives and returns the signal's name.
/// The listener is closed on return, so new connections are refused from then on.
async fn accept_until_signal(
    mut listener: TcpListener,
    address: SocketAddr,
    predictor: &Arc<Predictor>,
    signals: &mut ShutdownSignals,
    shutdown: &watch::Sender<bool>,
) -> io::Result<&'static str> {
    // Set once a signal arrived while --term-delay-ms keeps the server running.
    let mut lingering: Option<(&'static str, Instant)> = None;
    loop {
        let linger_end = async {
            match lingering {
                Some((_, end)) => sleep_until(end).await,
                None => std::future::pending().await,
            }
        };
        let event = tokio::select! {
            name = signals.recv() => AcceptEvent::Shutdown(name),
            () = linger_end => return Ok(lingering.map(|(name, _)| name).unwrap_or("SIGTERM")),
            _ = predictor.refuse_requested.notified() => AcceptEvent::RefuseWindow,
            accepted = listener.accept() => AcceptEvent::Connection(accepted),
        };

        match event {
            AcceptEvent::Shutdown(name) => {
                let delay = predictor.options.term_delay_ms;
                if delay == 0 || lingering.is_some() {
                    return Ok(name);
                }
                println!("{LOG_PREFIX} received {name}; serving {delay} ms more before draining");
                lingering = Some((name, Instant::now() + Duration::from_millis(delay)));
            }
            AcceptEvent::RefuseWindow => {
                drop(listener);
                predictor.listener_closed.notify_one();
                let window_ms = predictor.options.refuse_after_ready_ms.unwrap_or(0);
                println!("{LOG_PREFIX} closed the listening socket for {window_ms} ms after the first successful readiness probe");
                tokio::select! {
                    _ = sleep(Duration::from_millis(window_ms)) => {}
                    name = signals.recv() => return Ok(name),
                }
                // NOTE: if another process took the port during the window, the bind fails
                // and run returns the error, which also ends the open connections.
                listener = bind_listener(address)?;
                println!("{LOG_PREFIX} listening again on http://{address}");
            }
            AcceptEvent::Connection(Ok((stream, peer))) => {
                tokio::spawn(serve_connection(
                    stream,
                    peer,
                    predictor.clone(),
                    shutdown.subscribe(),
                ));
            }
            AcceptEvent::Connection(Err(error)) => {
                // Errors such as EMFILE persist for a while, so pause instead of spinning.
                eprintln!("{LOG_PREFIX} failed to accept a connection on {address}: {error}; retrying in 100 ms");
                sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Binds `address` with SO_REUSEADDR, which lets the port be bound again while
/// connections of the previous listening socket are still in TIME_WAIT.
fn bind_listener(address: SocketAddr) -> io::Result<TcpListener> {
    let socket = match address {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address).map_err(|error| {
        io::Error::new(
            error.kind(),
            format!("failed to bind {address}: {error}; pick a free port with --port or stop the process using it"),
        )
    })?;
    socket.listen(LISTEN_BACKLOG)
}

/// Tells every connection to finish its in-flight requests and waits up to `drain` for them.
async fn drain_connections(signal_name: &str, shutdown: watch::Sender<bool>, drain: Duration) {
    println!(
        "{LOG_PREFIX} received {signal_name}; stopped accepting connections, waiting up to {} ms for {} open connection(s)",
        drain.as_millis(),
        shutdown.receiver_count()
    );
    shutdown.send_replace(true);

    // Each connection task owns a receiver, so `closed` resolves when the last one ends.
    match timeout(drain, shutdown.closed()).await {
        Ok(()) => println!("{LOG_PREFIX} all connections finished; exiting with status 0"),
        Err(_) => eprintln!(
            "{LOG_PREFIX} {} connection(s) still open after the {} ms drain time; exiting with status 0",
            shutdown.receiver_count(),
            drain.as_millis()
        ),
    }
}

async fn exit_after_failed_load(started: Instant, fail_ms: u64) {
    sleep_until(started + Duration::from_millis(fail_ms)).await;
    eprintln!("{LOG_PREFIX} simulated model load failure after {fail_ms} ms (--fail-start-ms); exiting with status 3");
    std::process::exit(3);
}

/// Marks the model ready once `--load-ms` has passed since start, unless
/// `--fail-start-ms` is set, in which case the load never finishes.
async fn mark_ready_after_load(predictor: Arc<Predictor>) {
    if predictor.options.fail_start_ms.is_some() {
        return;
    }
    let load = Duration::from_millis(predictor.options.load_ms);
    sleep_until(predictor.started + load).await;

    // The line is written before the flag is set, so a client that gets a 200 probe
    // also finds the line. The timestamp is taken first and so never follows the first 200.
    let unix_ns = unix_time().as_nanos();
    if let Some(path) = &predictor.options.start_log {
        let line = format!("ready pid={} unix_ns={unix_ns}", std::process::id());
        if let Err(error) = append_line(path, &line) {
            eprintln!("{LOG_PREFIX} {}", start_log_error(path, error));
        }
    }
    predictor.ready.store(true, Ordering::SeqCst);
    println!(
        "{LOG_PREFIX} model {:?} is ready after {} ms",
        predictor.options.model,
        predictor.started.elapsed().as_millis()
    );
}

/// Serves one connection over HTTP/1.1 or h2c until it closes, the process drains, or a
/// `/crash` request on it requests an exit. A `/ws` upgrade turns the rest of the
/// connection into a WebSocket session, which this task runs too, so the drain at
/// shutdown also waits for open WebSocket sessions.
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    predictor: Arc<Predictor>,
    mut shutdown: watch::Receiver<bool>,
) {
    let control = Arc::new(ConnectionControl::default());
    let service = {
        let control = control.clone();
        let predictor = predictor.clone();
        service_fn(move |request| handle_request(predictor.clone(), control.clone(), request))
    };
    let builder = auto::Builder::new(TokioExecutor::new());
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(connection);

    let mut graceful_shutdown_started = false;
    let mut exit_deadline: Option<Instant> = None;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    eprintln!("{LOG_PREFIX} connection from {peer} ended with an error: {error}");
                }
                break;
            }
            _ = shutdown.changed(), if !graceful_shutdown_started => {
                graceful_shutdown_started = true;
                connection.as_mut().graceful_shutdown();
            }
            _ = control.exit_requested.notified(), if exit_deadline.is_none() => {
                exit_deadline = Some(Instant::now() + CRASH_FLUSH_TIMEOUT);
                if !graceful_shutdown_started {
                    graceful_shutdown_started = true;
                    // Lets the in-flight /crash response finish, then closes the connection.
                    connection.as_mut().graceful_shutdown();
                }
            }
            _ = sleep_until(exit_deadline.unwrap_or_else(Instant::now)), if exit_deadline.is_some() => {
                eprintln!("{LOG_PREFIX} the /crash connection from {peer} did not close within {} ms", CRASH_FLUSH_TIMEOUT.as_millis());
                break;
            }
        }
    }

    if let Some(code) = control.exit_code.get() {
        eprintln!("{LOG_PREFIX} exiting with status {code} as requested by /crash");
        std::process::exit(*code);
    }

    let pending_websocket = lock(&control.websocket).take();
    if let Some(pending) = pending_websocket {
        websocket::run_session(pending, &predictor, peer, shutdown).await;
    }
}

type ResponseBody = UnsyncBoxBody<Bytes, Infallible>;

async fn handle_request(
    predictor: Arc<Predictor>,
    control: Arc<ConnectionControl>,
    request: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let seen = seen_forwarding_headers(&request);
    let mut response = route(&predictor, &control, request).await;
    for (name, value) in seen {
        response.headers_mut().insert(name, value);
    }
    Ok(response)
}

/// Request kinds. Probes and /stats are not counted as requests and get no latency.
enum Route {
    Readiness { model: Option<String> },
    Liveness,
    Stats,
    Counted(Endpoint),
}

enum Endpoint {
    Infer { model: String },
    Echo,
    Sse,
    Slow,
    Crash,
    WebSocket,
    NotFound,
}

fn classify(method: &Method, path: &str) -> Route {
    let model_path = path
        .strip_prefix("/v2/models/")
        .and_then(|rest| rest.split_once('/'));

    if method == Method::GET {
        match (path, model_path) {
            ("/v2/health/ready" | "/ready", _) => Route::Readiness { model: None },
            ("/v2/health/live", _) => Route::Liveness,
            ("/stats", _) => Route::Stats,
            (_, Some((model, "ready"))) => Route::Readiness {
                model: Some(model.to_owned()),
            },
            ("/sse", _) => Route::Counted(Endpoint::Sse),
            ("/slow", _) => Route::Counted(Endpoint::Slow),
            ("/crash", _) => Route::Counted(Endpoint::Crash),
            ("/ws", _) => Route::Counted(Endpoint::WebSocket),
            _ => Route::Counted(Endpoint::NotFound),
        }
    } else if method == Method::POST {
        match (path, model_path) {
            ("/crash", _) => Route::Counted(Endpoint::Crash),
            (_, Some((model, "infer"))) => Route::Counted(Endpoint::Infer {
                model: model.to_owned(),
            }),
            _ => Route::Counted(Endpoint::Echo),
        }
    } else {
        Route::Counted(Endpoint::NotFound)
    }
}

async fn route(
    predictor: &Predictor,
    control: &ConnectionControl,
    request: Request<Incoming>,
) -> Response<ResponseBody> {
    let endpoint = match classify(request.method(), request.uri().path()) {
        Route::Readiness { model } => return readiness(predictor, model.as_deref()).await,
        Route::Liveness => return liveness(predictor),
        Route::Stats => return stats(predictor),
        Route::Counted(endpoint) => endpoint,
    };

    let request_number = predictor.record_request(request.headers());
    if predictor.options.latency_ms > 0 {
        sleep(Duration::from_millis(predictor.options.latency_ms)).await;
    }

    let query = request.uri().query().map(str::to_owned);
    let query = query.as_deref();
    match endpoint {
        Endpoint::Infer { model } => infer(predictor, &model, request.into_body()).await,
        Endpoint::Echo => echo(predictor, request.into_body(), request_number).await,
        Endpoint::Sse => sse(query),
        Endpoint::Slow => slow(query).await,
        Endpoint::Crash => crash(control, request.version(), query),
        Endpoint::WebSocket => websocket::accept(predictor, control, request, query),
        Endpoint::NotFound => error_response(
            StatusCode::NOT_FOUND,
            format!(
                "no endpoint for {} {}",
                request.method(),
                request.uri().path()
            ),
        ),
    }
}

async fn readiness(predictor: &Predictor, model: Option<&str>) -> Response<ResponseBody> {
    predictor.probes.fetch_add(1, Ordering::SeqCst);
    if let Some(model) = model {
        if model != predictor.options.model {
            return model_not_found(predictor, model);
        }
    }
    if !predictor.is_ready() {
        return json_response(StatusCode::SERVICE_UNAVAILABLE, &json!({ "ready": false }));
    }

    let refuse_configured = predictor.options.refuse_after_ready_ms.is_some();
    if refuse_configured && !predictor.refuse_window_started.swap(true, Ordering::SeqCst) {
        // Close the listener before answering: a prober that forwards requests as soon as it
        // sees this 200 then meets ECONNREFUSED, never a connection accepted by the kernel
        // and reset when the listener closes. This connection is already accepted, so the
        // 200 still reaches the prober.
        let closed = predictor.listener_closed.notified();
        predictor.refuse_requested.notify_one();
        closed.await;
    }
    json_response(StatusCode::OK, &json!({ "ready": true }))
}

fn liveness(predictor: &Predictor) -> Response<ResponseBody> {
    predictor.probes.fetch_add(1, Ordering::SeqCst);
    json_response(StatusCode::OK, &json!({ "live": true }))
}

fn stats(predictor: &Predictor) -> Response<ResponseBody> {
    let body = json!({
        "pid": std::process::id(),
        "model": predictor.options.model,
        "ready": predictor.is_ready(),
        "requests": predictor.requests.load(Ordering::SeqCst),
        "probes": predictor.probes.load(Ordering::SeqCst),
        "websockets": predictor.websockets.load(Ordering::SeqCst),
        "sha256": *lock(&predictor.echo_checksums),
        "headers_seen": *lock(&predictor.last_request_headers),
    });
    json_response(StatusCode::OK, &body)
}

/// Runs a fake KServe v2 inference: the response has one FP32 output whose element `i`
/// is the sum of input `i`'s data. Returns 503 while the model is still loading.
async fn infer(predictor: &Predictor, model: &str, body: Incoming) -> Response<ResponseBody> {
    if model != predictor.options.model {
        return model_not_found(predictor, model);
    }
    if !predictor.is_ready() {
        let message =
            format!("model {model:?} is still loading; retry after /v2/health/ready returns 200");
        return error_response(StatusCode::SERVICE_UNAVAILABLE, message);
    }

    let body = match Limited::new(body, MAX_INFER_BODY_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.is::<LengthLimitError>() => {
            let message =
                format!("inference request body exceeds the limit of {MAX_INFER_BODY_BYTES} bytes");
            return error_response(StatusCode::PAYLOAD_TOO_LARGE, message);
        }
        Err(error) => {
            // The client may be gone by now, so the log is the only place this shows up.
            let message = format!("failed to read the inference request body: {error}");
            eprintln!("{LOG_PREFIX} {message}");
            return error_response(StatusCode::BAD_REQUEST, message);
        }
    };
    let request: Value = match serde_json::from_slice(&body) {
        Ok(value) => value,
        Err(error) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                format!("invalid JSON in inference request: {error}"),
            );
        }
    };
    let sums = match sum_inputs(&request) {
        Ok(sums) => sums,
        Err(message) => return error_response(StatusCode::BAD_REQUEST, message),
    };

    let mut response = json!({
        "model_name": model,
        "outputs": [{ "name": "output-0", "datatype": "FP32", "shape": [sums.len()], "data": sums }],
    });
    if let Some(id) = request.get("id") {
        response["id"] = id.clone();
    }
    json_response(StatusCode::OK, &response)
}

/// Returns the sum of each input's `data`, which may be flat or nested arrays of numbers.
fn sum_inputs(request: &Value) -> Result<Vec<f64>, String> {
    let Some(inputs) = request.get("inputs").and_then(Value::as_array) else {
        return Err("invalid inference request: missing \"inputs\" array".to_owned());
    };
    let mut sums = Vec::with_capacity(inputs.len());
    for (index, input) in inputs.iter().enumerate() {
        let name = input.get("name").and_then(Value::as_str).unwrap_or("");
        let Some(data) = input.get("data") else {
            return Err(format!(
                "invalid inference request: input {index} ({name:?}) has no \"data\" field"
            ));
        };
        let Some(sum) = sum_numbers(data) else {
            return Err(format!("invalid inference request: input {index} ({name:?}) data contains a value that is not a number"));
        };
        sums.push(sum);
    }
    Ok(sums)
}

/// Sums a number or nested arrays of numbers. serde_json's default nesting limit of 128
/// bounds the recursion depth.
fn sum_numbers(value: &Value) -> Option<f64> {
    match value {
        Value::Number(number) => number.as_f64(),
        Value::Array(items) => items
            .iter()
            .try_fold(0.0, |total, item| Some(total + sum_numbers(item)?)),
        _ => None,
    }
}

/// Hashes the body as it streams in, so bodies of any size use constant memory.
async fn echo(
    predictor: &Predictor,
    mut body: Incoming,
    request_number: u64,
) -> Response<ResponseBody> {
    let mut hasher = Sha256::new();
    let mut length: u64 = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    hasher.update(data);
                    length += data.len() as u64;
                }
            }
            Err(error) => {
                let message =
                    format!("failed to read the request body after {length} bytes: {error}");
                eprintln!("{LOG_PREFIX} /echo request {request_number}: {message}");
                return error_response(StatusCode::BAD_REQUEST, message);
            }
        }
    }

    let checksum = hex(&hasher.finalize());
    lock(&predictor.echo_checksums).push(checksum.clone());
    let body = json!({ "bytes": length, "sha256": checksum, "request": request_number });
    json_response(StatusCode::OK, &body)
}

/// Streams `events` server-sent events, the first at once and then one every
/// `interval_ms`. Each event is its own body frame, so hyper writes it out immediately.
fn sse(query: Option<&str>) -> Response<ResponseBody> {
    let (events, interval_ms, size) = match sse_parameters(query) {
        Ok(values) => values,
        Err(message) => return error_response(StatusCode::BAD_REQUEST, message),
    };

    let first_event_at = Instant::now();
    let stream = futures::stream::unfold(0_u64, move |index| async move {
        if index >= events {
            return None;
        }
        // Deadlines from a fixed start keep the spacing free of accumulated drift.
        sleep_until(first_event_at + Duration::from_millis(interval_ms * index)).await;
        let frame = Frame::data(format_sse_event(index, size as usize));
        Some((Ok::<_, Infallible>(frame), index + 1))
    });

    let mut response = Response::new(StreamBody::new(stream).boxed_unsync());
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// Returns `events`, `interval_ms` and `size` from the /sse query, defaulting to 5, 100 and 0.
fn sse_parameters(query: Option<&str>) -> Result<(u64, u64, u64), String> {
    let events = query_u64(query, "events", 5, MAX_SSE_EVENTS)?;
    let interval_ms = query_u64(query, "interval_ms", 100, MAX_SSE_INTERVAL_MS)?;
    let size = query_u64(query, "size", 0, MAX_SSE_EVENT_BYTES)?;
    Ok((events, interval_ms, size))
}

/// Formats one event whose data is JSON with the index and send time, padded with `x`
/// so the whole event is `target_bytes` long. Smaller targets get the unpadded event.
fn format_sse_event(index: u64, target_bytes: usize) -> Bytes {
    let head = format!(
        "id: {index}\ndata: {{\"index\":{index},\"unix_ms\":{},\"pad\":\"",
        unix_time().as_millis()
    );
    let tail = "\"}\n\n";
    let padding = target_bytes.saturating_sub(head.len() + tail.len());

    let mut event = String::with_capacity(head.len() + padding + tail.len());
    event.push_str(&head);
    event.extend(std::iter::repeat_n('x', padding));
    event.push_str(tail);
    Bytes::from(event)
}

async fn slow(query: Option<&str>) -> Response<ResponseBody> {
    let delay_ms = match query_u64(query, "ms", 1000, MAX_SLOW_MS) {
        Ok(value) => value,
        Err(message) => return error_response(StatusCode::BAD_REQUEST, message),
    };
    sleep(Duration::from_millis(delay_ms)).await;
    json_response(StatusCode::OK, &json!({ "slept_ms": delay_ms }))
}

/// Returns 200 and stores `code` for the connection task, which exits the process
/// with it once the response is sent.
fn crash(
    control: &ConnectionControl,
    version: Version,
    query: Option<&str>,
) -> Response<ResponseBody> {
    let code = match query_u64(query, "code", 1, 255) {
        Ok(value) => value as i32,
        Err(message) => return error_response(StatusCode::BAD_REQUEST, message),
    };
    // A repeated /crash on the same connection keeps the first code.
    let _ = control.exit_code.set(code);
    control.exit_requested.notify_one();

    let mut response = json_response(StatusCode::OK, &json!({ "exiting": true, "code": code }));
    // HTTP/2 forbids the Connection header. There the connection closes with GOAWAY.
    if version <= Version::HTTP_11 {
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

fn model_not_found(predictor: &Predictor, model: &str) -> Response<ResponseBody> {
    let message = format!(
        "model {model:?} not found; this server serves model {:?}",
        predictor.options.model
    );
    error_response(StatusCode::NOT_FOUND, message)
}

/// Parses query parameter `name` as an integer in `0..=max`, or returns `default` when absent.
fn query_u64(query: Option<&str>, name: &str, default: u64, max: u64) -> Result<u64, String> {
    let value = query
        .unwrap_or("")
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value);
    let Some(value) = value else {
        return Ok(default);
    };
    match value.parse::<u64>() {
        Ok(number) if number <= max => Ok(number),
        _ => Err(format!(
            "invalid query parameter {name}={value:?}: expected an integer from 0 to {max}"
        )),
    }
}

/// Returns the request's Host, X-Forwarded-For, X-Forwarded-Proto and HTTP version as the
/// `x-seen-*` response headers that tests read.
fn seen_forwarding_headers(request: &Request<Incoming>) -> Vec<(HeaderName, HeaderValue)> {
    let headers = request.headers();
    // HTTP/2 requests carry the host in the :authority pseudo-header instead.
    let host = joined_header(headers, &HOST).or_else(|| {
        let authority = request.uri().authority()?;
        HeaderValue::from_str(authority.as_str()).ok()
    });
    let forwarded_for = joined_header(headers, &HeaderName::from_static("x-forwarded-for"));
    let forwarded_proto = joined_header(headers, &HeaderName::from_static("x-forwarded-proto"));

    let version = HeaderValue::from_str(&format!("{:?}", request.version())).ok();

    let mut seen = Vec::with_capacity(4);
    for (name, value) in [
        ("x-seen-version", version),
        ("x-seen-host", host),
        ("x-seen-forwarded-for", forwarded_for),
        ("x-seen-forwarded-proto", forwarded_proto),
    ] {
        if let Some(value) = value {
            seen.push((HeaderName::from_static(name), value));
        }
    }
    seen
}

/// Returns all values of header `name` joined with ", ", which HTTP defines as
/// equivalent to the repeated header lines.
fn joined_header(headers: &HeaderMap, name: &HeaderName) -> Option<HeaderValue> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    let mut joined = first.as_bytes().to_vec();
    for value in values {
        joined.extend_from_slice(b", ");
        joined.extend_from_slice(value.as_bytes());
    }
    HeaderValue::from_bytes(&joined).ok()
}

fn json_response(status: StatusCode, body: &Value) -> Response<ResponseBody> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())).boxed_unsync());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error_response(status: StatusCode, message: String) -> Response<ResponseBody> {
    json_response(status, &json!({ "error": message }))
}

fn append_line(path: &Path, line: &str) -> io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    // One write per line keeps lines from concurrent predictor processes whole (O_APPEND).
    file.write_all(format!("{line}\n").as_bytes())?;
    file.flush()
}

fn start_log_error(path: &Path, error: io::Error) -> io::Error {
    let message = format!(
        "failed to append to start log {}: {error}; check that its directory exists and is writable",
        path.display()
    );
    io::Error::new(error.kind(), message)
}

fn unix_time() -> Duration {
    // A clock set before 1970 reads as 0 rather than failing.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

fn hex(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(text, "{byte:02x}");
    }
    text
}

/// Locks `mutex`, recovering the data if a panicking thread poisoned it.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The `/ws` endpoint: the RFC 6455 handshake, a small frame codec and the echo session.
///
/// The codec covers what an echo server needs: masked client frames, 7-, 16- and 64-bit
/// payload lengths, ping, pong and close. Fragmented messages get close code 1003.
/// Extensions such as permessage-deflate are never negotiated, so frames with reserved
/// bits set get close code 1002.
mod websocket {
    use std::net::SocketAddr;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use base64::engine::general_purpose::STANDARD as BASE64;
    use base64::Engine as _;
    use bytes::{Buf, Bytes, BytesMut};
    use http::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, UPGRADE};
    use http::{Request, Response, StatusCode, Version};
    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use hyper::upgrade::OnUpgrade;
    use hyper_util::rt::TokioIo;
    use sha1::{Digest, Sha1};
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    use tokio::sync::watch;
    use tokio::time::{sleep_until, Instant};

    use super::{
        error_response, lock, query_u64, ConnectionControl, Predictor, ResponseBody, LOG_PREFIX,
    };

    /// Appended to the client's key before hashing (RFC 6455, section 1.3).
    const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    const MAX_MESSAGE_BYTES: u64 = 16 * 1024 * 1024;
    const MAX_CONTROL_PAYLOAD: usize = 125;
    const MAX_TICKS: u64 = 100_000;
    const MAX_TICK_INTERVAL_MS: u64 = 60_000;
    const READ_CHUNK_BYTES: usize = 64 * 1024;

    const OPCODE_CONTINUATION: u8 = 0x0;
    const OPCODE_TEXT: u8 = 0x1;
    const OPCODE_BINARY: u8 = 0x2;
    const OPCODE_CLOSE: u8 = 0x8;
    const OPCODE_PING: u8 = 0x9;
    const OPCODE_PONG: u8 = 0xA;

    const CLOSE_NORMAL: u16 = 1000;
    const CLOSE_GOING_AWAY: u16 = 1001;
    const CLOSE_PROTOCOL_ERROR: u16 = 1002;
    const CLOSE_UNSUPPORTED_DATA: u16 = 1003;
    const CLOSE_INVALID_PAYLOAD: u16 = 1007;
    const CLOSE_MESSAGE_TOO_BIG: u16 = 1009;

    /// A `/ws` request whose 101 response is being sent. The connection task runs the
    /// session once hyper hands over the connection.
    pub(super) struct PendingSession {
        upgrade: OnUpgrade,
        ticks: u64,
        tick_interval_ms: u64,
    }

    /// Validates the handshake request and returns 101 Switching Protocols, or an error
    /// response whose message names what the client must fix. Returns 503 while the model
    /// is loading.
    pub(super) fn accept(
        predictor: &Predictor,
        control: &ConnectionControl,
        request: Request<Incoming>,
        query: Option<&str>,
    ) -> Response<ResponseBody> {
        if !predictor.is_ready() {
            let message = "model is still loading; retry /ws after /v2/health/ready returns 200";
            return error_response(StatusCode::SERVICE_UNAVAILABLE, message.to_owned());
        }
        let (ticks, interval_ms) = match tick_parameters(query) {
            Ok(values) => values,
            Err(message) => return error_response(StatusCode::BAD_REQUEST, message),
        };
        let accept_key = match validate_handshake(&request) {
            Ok(key) => key,
            Err(response) => return *response,
        };

        *lock(&control.websocket) = Some(PendingSession {
            upgrade: hyper::upgrade::on(request),
            ticks,
            tick_interval_ms: interval_ms,
        });
        let mut response = Response::new(Full::new(Bytes::new()).boxed_unsync());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(
            HeaderName::from_static("sec-websocket-accept"),
            HeaderValue::from_str(&accept_key).expect("base64 text is a valid header value"),
        );
        response
    }

    /// Returns `ticks` and `interval_ms` from the /ws query, defaulting to 0 and 100.
    fn tick_parameters(query: Option<&str>) -> Result<(u64, u64), String> {
        let ticks = query_u64(query, "ticks", 0, MAX_TICKS)?;
        let interval_ms = query_u64(query, "interval_ms", 100, MAX_TICK_INTERVAL_MS)?;
        Ok((ticks, interval_ms))
    }

    /// Checks the opening handshake of RFC 6455, section 4.2.1, and returns the
    /// Sec-WebSocket-Accept value for the client's key.
    fn validate_handshake(
        request: &Request<Incoming>,
    ) -> Result<String, Box<Response<ResponseBody>>> {
        let bad_request =
            |message: &str| Box::new(error_response(StatusCode::BAD_REQUEST, message.to_owned()));
        // WebSocket over HTTP/2 needs extended CONNECT (RFC 8441), which this server lacks.
        if request.version() != Version::HTTP_11 {
            return Err(bad_request(
                "WebSocket requires HTTP/1.1; this server does not support WebSocket over HTTP/2",
            ));
        }

        let headers = request.headers();
        if !has_token(headers, &UPGRADE, "websocket") || !has_token(headers, &CONNECTION, "upgrade")
        {
            let mut response = error_response(
                StatusCode::UPGRADE_REQUIRED,
                "/ws expects a WebSocket handshake: send Upgrade: websocket and Connection: Upgrade".to_owned(),
            );
            response
                .headers_mut()
                .insert(UPGRADE, HeaderValue::from_static("websocket"));
            return Err(Box::new(response));
        }

        let version = headers
            .get("sec-websocket-version")
            .map(HeaderValue::as_bytes);
        if version != Some(b"13".as_slice()) {
            let message = match version {
                None => "missing Sec-WebSocket-Version header; send Sec-WebSocket-Version: 13"
                    .to_owned(),
                Some(value) => format!(
                    "unsupported Sec-WebSocket-Version {:?}; this server supports version 13 only",
                    String::from_utf8_lossy(value)
                ),
            };
            let mut response = error_response(StatusCode::UPGRADE_REQUIRED, message);
            response
                .headers_mut()
                .insert("sec-websocket-version", HeaderValue::from_static("13"));
            return Err(Box::new(response));
        }

        let Some(key) = headers.get("sec-websocket-key") else {
            return Err(bad_request("missing Sec-WebSocket-Key header"));
        };
        let key_is_valid = BASE64
            .decode(key.as_bytes())
            .is_ok_and(|nonce| nonce.len() == 16);
        if !key_is_valid {
            return Err(bad_request(
                "invalid Sec-WebSocket-Key: expected 16 random bytes in base64",
            ));
        }
        Ok(accept_key(key.as_bytes()))
    }

    /// Returns base64(SHA-1(key + GUID)), the value that proves the server read the key.
    fn accept_key(key: &[u8]) -> String {
        let mut hasher = Sha1::new();
        hasher.update(key);
        hasher.update(ACCEPT_GUID.as_bytes());
        BASE64.encode(hasher.finalize())
    }

    /// True when a comma-separated header such as Connection lists `token`, in any case.
    fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
        headers
            .get_all(name)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .any(|item| item.trim().eq_ignore_ascii_case(token))
    }

    /// Runs one WebSocket session on the upgraded connection until either side closes it
    /// or the process drains.
    pub(super) async fn run_session(
        pending: PendingSession,
        predictor: &Predictor,
        peer: SocketAddr,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let upgraded = match pending.upgrade.await {
            Ok(upgraded) => upgraded,
            Err(error) => {
                eprintln!(
                    "{LOG_PREFIX} WebSocket upgrade of the connection from {peer} failed: {error}"
                );
                return;
            }
        };
        predictor.websockets.fetch_add(1, Ordering::SeqCst);
        let mut session = Session {
            io: TokioIo::new(upgraded),
            buffer: BytesMut::with_capacity(READ_CHUNK_BYTES),
            ticks: pending.ticks,
            tick_interval_ms: pending.tick_interval_ms,
            messages_echoed: 0,
        };
        // The receiver is dropped only after the log line below, so the drain's
        // "all connections finished" line comes last.
        match session.run(&mut shutdown).await {
            Ok(reason) => println!(
                "{LOG_PREFIX} WebSocket from {peer} closed ({reason}) after {} echoed message(s)",
                session.messages_echoed
            ),
            Err(error) => eprintln!(
                "{LOG_PREFIX} WebSocket from {peer} failed after {} echoed message(s): {error}",
                session.messages_echoed
            ),
        }
    }

    /// One decoded frame with its payload unmasked.
    struct Frame {
        fin: bool,
        opcode: u8,
        payload: Bytes,
    }

    /// A protocol violation by the client: the session sends a close frame with this
    /// code and reason, then ends.
    struct Violation {
        code: u16,
        reason: String,
    }

    impl Violation {
        fn new(code: u16, reason: impl Into<String>) -> Self {
            Self {
                code,
                reason: reason.into(),
            }
        }
    }

    struct Session<T> {
        io: T,
        /// Bytes read but not yet decoded. Reading into it with `read_buf` keeps partial
        /// frames across the `select!` in [`Session::run`], which a `read_exact` would lose.
        buffer: BytesMut,
        ticks: u64,
        tick_interval_ms: u64,
        messages_echoed: u64,
    }

    impl<T: AsyncRead + AsyncWrite + Unpin> Session<T> {
        /// Echoes messages and sends the scheduled ticks. Returns why the session ended,
        /// or the I/O error that ended it.
        async fn run(&mut self, shutdown: &mut watch::Receiver<bool>) -> std::io::Result<String> {
            let first_tick_at = Instant::now();
            let mut next_tick: u64 = 0;
            loop {
                loop {
                    match decode_frame(&mut self.buffer) {
                        Ok(Some(frame)) => {
                            if let Some(reason) = self.handle_frame(frame).await? {
                                return Ok(reason);
                            }
                        }
                        Ok(None) => break,
                        Err(violation) => return self.close_for(violation).await,
                    }
                }

                // Deadlines from a fixed start keep the tick spacing free of accumulated drift.
                let tick_due =
                    first_tick_at + Duration::from_millis(self.tick_interval_ms * next_tick);
                self.buffer.reserve(READ_CHUNK_BYTES);
                tokio::select! {
                    read = self.io.read_buf(&mut self.buffer) => {
                        if read? == 0 {
                            return Ok("the client closed the connection without a close frame".to_owned());
                        }
                    }
                    () = sleep_until(tick_due), if next_tick < self.ticks => {
                        let text = format!("tick {next_tick}");
                        self.send(OPCODE_TEXT, text.as_bytes()).await?;
                        next_tick += 1;
                    }
                    () = wait_for_drain(shutdown) => {
                        // NOTE: the server closes the TCP connection right after its close
                        // frame instead of waiting for the client's close frame.
                        self.send_close(CLOSE_GOING_AWAY, "server is shutting down").await?;
                        return Ok("the server is shutting down".to_owned());
                    }
                }
            }
        }

        /// Echoes a data frame, replies to a ping with a pong, or ends the session for a close
        /// frame or a protocol violation. Returns the reason when the session ends.
        async fn handle_frame(&mut self, frame: Frame) -> std::io::Result<Option<String>> {
            let is_control = frame.opcode & 0x8 != 0;
            if is_control && (!frame.fin || frame.payload.len() > MAX_CONTROL_PAYLOAD) {
                let violation = Violation::new(
                    CLOSE_PROTOCOL_ERROR,
                    "control frames must be unfragmented with at most 125 payload bytes",
                );
                return self.close_for(violation).await.map(Some);
            }
            if frame.opcode == OPCODE_CONTINUATION || (!is_control && !frame.fin) {
                let violation = Violation::new(
                    CLOSE_UNSUPPORTED_DATA,
                    "fragmented messages are not supported; send each message in one frame",
                );
                return self.close_for(violation).await.map(Some);
            }

            match frame.opcode {
                OPCODE_TEXT => {
                    if std::str::from_utf8(&frame.payload).is_err() {
                        let violation = Violation::new(
                            CLOSE_INVALID_PAYLOAD,
                            "text message is not valid UTF-8",
                        );
                        return self.close_for(violation).await.map(Some);
                    }
                    self.send(OPCODE_TEXT, &frame.payload).await?;
                    self.messages_echoed += 1;
                }
                OPCODE_BINARY => {
                    self.send(OPCODE_BINARY, &frame.payload).await?;
                    self.messages_echoed += 1;
                }
                OPCODE_PING => self.send(OPCODE_PONG, &frame.payload).await?,
                OPCODE_PONG => {}
                OPCODE_CLOSE => return self.answer_close(&frame.payload).await.map(Some),
                other => {
                    let violation =
                        Violation::new(CLOSE_PROTOCOL_ERROR, format!("unknown opcode {other:#x}"));
                    return self.close_for(violation).await.map(Some);
                }
            }
            Ok(None)
        }

        /// Replies to the client's close frame with the same status code, as RFC 6455 section
        /// 5.5.1 suggests, and closes the connection.
        async fn answer_close(&mut self, payload: &[u8]) -> std::io::Result<String> {
            match payload {
                [] => {
                    self.send(OPCODE_CLOSE, &[]).await?;
                    self.io.shutdown().await?;
                    Ok("the client closed without a status code".to_owned())
                }
                [_] => {
                    let violation = Violation::new(
                        CLOSE_PROTOCOL_ERROR,
                        "close frame payload of 1 byte has no valid status code",
                    );
                    self.close_for(violation).await
                }
                [high, low, reason @ ..] => {
                    let code = u16::from_be_bytes([*high, *low]);
                    if !is_valid_close_code(code) {
                        let violation = Violation::new(
                            CLOSE_PROTOCOL_ERROR,
                            format!("close code {code} is reserved or undefined"),
                        );
                        return self.close_for(violation).await;
                    }
                    self.send(OPCODE_CLOSE, &code.to_be_bytes()).await?;
                    self.io.shutdown().await?;
                    let reason = String::from_utf8_lossy(reason);
                    let kind = if code == CLOSE_NORMAL {
                        "normal closure"
                    } else {
                        "close"
                    };
                    Ok(format!("client sent {kind} {code} {reason:?}"))
                }
            }
        }

        async fn close_for(&mut self, violation: Violation) -> std::io::Result<String> {
            self.send_close(violation.code, &violation.reason).await?;
            Ok(format!(
                "closed with code {} because {}",
                violation.code, violation.reason
            ))
        }

        /// Sends a close frame and ends the connection. The reason is cut to fit the
        /// 125-byte control frame limit.
        async fn send_close(&mut self, code: u16, reason: &str) -> std::io::Result<()> {
            let mut payload = code.to_be_bytes().to_vec();
            let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            payload.extend_from_slice(&reason.as_bytes()[..end]);
            self.send(OPCODE_CLOSE, &payload).await?;
            self.io.shutdown().await
        }

        async fn send(&mut self, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
            self.io.write_all(&encode_frame(opcode, payload)).await?;
            self.io.flush().await
        }
    }

    /// Resolves once the process drains, at once if it already does. The `watch::Ref`
    /// stays inside, so callers' futures remain `Send`.
    async fn wait_for_drain(shutdown: &mut watch::Receiver<bool>) {
        // An error means the sender is gone, which happens only when the process exits.
        let _ = shutdown.wait_for(|&draining| draining).await;
    }

    /// True for the close codes a peer may send: those RFC 6455 (section 7.4) and the IANA
    /// registry define, and 3000 to 4999. 1004 is reserved, 1005, 1006 and 1015 must never
    /// be sent, and 1016 to 2999 are kept for future revisions of the protocol.
    fn is_valid_close_code(code: u16) -> bool {
        matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }

    /// Decodes one frame from the front of `buffer`. Returns `Ok(None)` until the whole
    /// frame has arrived.
    fn decode_frame(buffer: &mut BytesMut) -> Result<Option<Frame>, Violation> {
        let [first, second, ..] = buffer[..] else {
            return Ok(None);
        };
        if first & 0x70 != 0 {
            return Err(Violation::new(
                CLOSE_PROTOCOL_ERROR,
                "reserved bits are set but no extension was negotiated",
            ));
        }
        if second & 0x80 == 0 {
            return Err(Violation::new(
                CLOSE_PROTOCOL_ERROR,
                "client frames must be masked",
            ));
        }

        let (length, length_bytes) = match second & 0x7f {
            126 => match buffer.get(2..4) {
                Some(bytes) => (u64::from(u16::from_be_bytes([bytes[0], bytes[1]])), 2),
                None => return Ok(None),
            },
            127 => match buffer.get(2..10) {
                Some(bytes) => (
                    u64::from_be_bytes(bytes.try_into().expect("slice of 8 bytes")),
                    8,
                ),
                None => return Ok(None),
            },
            short => (u64::from(short), 0),
        };
        // Checked before waiting for the payload, so a huge declared length is never buffered.
        if length > MAX_MESSAGE_BYTES {
            return Err(Violation::new(
                CLOSE_MESSAGE_TOO_BIG,
                format!("message of {length} bytes exceeds the limit of {MAX_MESSAGE_BYTES} bytes"),
            ));
        }
        let header_length = 2 + length_bytes + 4;
        let length = length as usize;
        if buffer.len() < header_length + length {
            return Ok(None);
        }

        let mask: [u8; 4] = buffer[header_length - 4..header_length]
            .try_into()
            .expect("slice of 4 bytes");
        buffer.advance(header_length);
        let mut payload = buffer.split_to(length);
        for (index, byte) in payload.iter_mut().enumerate() {
            *byte ^= mask[index % 4];
        }
        Ok(Some(Frame {
            fin: first & 0x80 != 0,
            opcode: first & 0x0f,
            payload: payload.freeze(),
        }))
    }

    /// Encodes one unmasked, unfragmented server frame.
    fn encode_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut frame = Vec::with_capacity(payload.len() + 10);
        frame.push(0x80 | opcode);
        match payload.len() {
            length if length < 126 => frame.push(length as u8),
            length if length <= usize::from(u16::MAX) => {
                frame.push(126);
                frame.extend_from_slice(&(length as u16).to_be_bytes());
            }
            length => {
                frame.push(127);
                frame.extend_from_slice(&(length as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(payload);
        frame
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// Builds a masked client frame the way a browser would send it.
        fn client_frame(first_byte: u8, payload: &[u8]) -> BytesMut {
            let mask = [0x37, 0xfa, 0x21, 0x3d];
            let mut frame = BytesMut::new();
            frame.extend_from_slice(&[first_byte]);
            match payload.len() {
                length if length < 126 => frame.extend_from_slice(&[0x80 | length as u8]),
                length if length <= usize::from(u16::MAX) => {
                    frame.extend_from_slice(&[0x80 | 126]);
                    frame.extend_from_slice(&(length as u16).to_be_bytes());
                }
                length => {
                    frame.extend_from_slice(&[0x80 | 127]);
                    frame.extend_from_slice(&(length as u64).to_be_bytes());
                }
            }
            frame.extend_from_slice(&mask);
            frame.extend(
                payload
                    .iter()
                    .enumerate()
                    .map(|(index, byte)| byte ^ mask[index % 4]),
            );
            frame
        }

        #[test]
        fn accept_key_matches_rfc_example() {
            // The sample handshake of RFC 6455, section 1.3.
            assert_eq!(
                accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
                "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
            );
        }

        #[test]
        fn decode_unmasks_all_length_forms() {
            for length in [0, 5, 125, 126, 300, 65_535, 65_536, 70_000] {
                let payload: Vec<u8> = (0..length).map(|index| (index % 251) as u8).collect();
                let mut buffer = client_frame(0x80 | OPCODE_BINARY, &payload);
                buffer.extend_from_slice(&client_frame(0x80 | OPCODE_PING, b"next"));

                let frame = decode_frame(&mut buffer)
                    .ok()
                    .flatten()
                    .expect("a complete frame");
                assert_eq!(frame.opcode, OPCODE_BINARY, "length {length}");
                assert!(frame.fin, "length {length}");
                assert_eq!(frame.payload, payload, "length {length}");
                let next = decode_frame(&mut buffer)
                    .ok()
                    .flatten()
                    .expect("the second frame");
                assert_eq!(next.payload, b"next".as_slice(), "length {length}");
                assert!(buffer.is_empty(), "length {length}");
            }
        }

        #[test]
        fn decode_waits_for_partial_frames() {
            let whole = client_frame(0x80 | OPCODE_TEXT, &[b'a'; 300]);
            for cut in [0, 1, 3, 7, whole.len() - 1] {
                let mut partial = BytesMut::from(&whole[..cut]);
                assert!(
                    matches!(decode_frame(&mut partial), Ok(None)),
                    "cut at {cut}"
                );
                assert_eq!(partial.len(), cut, "cut at {cut} consumed bytes");
            }
        }

        #[test]
        fn decode_rejects_unmasked_oversized_and_reserved_bits() {
            let mut unmasked = BytesMut::from(&encode_frame(OPCODE_TEXT, b"hi")[..]);
            assert_eq!(
                decode_frame(&mut unmasked).err().map(|v| v.code),
                Some(CLOSE_PROTOCOL_ERROR)
            );

            let mut reserved = client_frame(0x80 | 0x40 | OPCODE_TEXT, b"hi");
            assert_eq!(
                decode_frame(&mut reserved).err().map(|v| v.code),
                Some(CLOSE_PROTOCOL_ERROR)
            );

            let mut huge = BytesMut::from(&[0x80 | OPCODE_BINARY, 0x80 | 127][..]);
            huge.extend_from_slice(&(MAX_MESSAGE_BYTES + 1).to_be_bytes());
            assert_eq!(
                decode_frame(&mut huge).err().map(|v| v.code),
                Some(CLOSE_MESSAGE_TOO_BIG)
            );
        }

        #[test]
        fn encode_uses_shortest_length_form() {
            assert_eq!(encode_frame(OPCODE_TEXT, b"hi"), [0x81, 2, b'h', b'i']);
            assert_eq!(
                encode_frame(OPCODE_BINARY, &[0; 126])[..4],
                [0x82, 126, 0, 126]
            );
            assert_eq!(
                encode_frame(OPCODE_BINARY, &[0; 65_536])[..10],
                [0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]
            );
        }

        #[tokio::test]
        async fn session_rejects_fragments_with_1003() {
            let (client, server) = tokio::io::duplex(1024);
            let mut session = Session {
                io: server,
                buffer: BytesMut::new(),
                ticks: 0,
                tick_interval_ms: 100,
                messages_echoed: 0,
            };
            let (_keep_open, mut shutdown) = watch::channel(false);
            let (mut client_read, mut client_write) = tokio::io::split(client);
            client_write
                .write_all(&client_frame(OPCODE_TEXT, b"first half"))
                .await
                .unwrap();

            let reason = session.run(&mut shutdown).await.unwrap();
            assert!(reason.contains("1003"), "{reason}");
            let mut answer = Vec::new();
            client_read.read_to_end(&mut answer).await.unwrap();
            assert_eq!(answer[..4], [0x80 | OPCODE_CLOSE, answer[1], 0x03, 0xeb]);
        }
    }
}
