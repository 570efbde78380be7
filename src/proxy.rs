//! The data path: pingora's `ProxyHttp` callbacks for routing, holding, forwarding and
//! turning every failure into one status code.
//!
//! A request goes through these steps:
//! 1. `request_filter` routes it by Host and path (404 if nothing matches, without any
//!    upstream connection), then admits it: forwarded at once, held in the service's queue,
//!    or rejected with 503 when a queue bound is reached.
//! 2. While held, coldgate watches the client connection so a client that hangs up leaves
//!    the queue at once. Small request bodies are read during the wait (see [`MAX_HELD_BODY`]).
//! 3. `upstream_peer` returns the leased endpoint. A connection refused before any byte was
//!    sent comes back through `fail_to_connect` and is retried, with backoff, until the
//!    request's deadline; after bytes were sent nothing is retried.
//! 4. The lease lives in the request context, so a streaming response keeps the service
//!    busy until its last byte, and the idle clock starts only when it ends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use http::header;
use pingora_core::protocols::ALPN;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use tracing::{debug, info, warn};

use crate::config::UpstreamProtocol;
use crate::front_door::Admitted;
use crate::metrics::Metrics;
use crate::openai;
use crate::registry::Registry;
use crate::routing::normalize_host;
use crate::service::{AdmitError, Admission, Lease, Service};

/// Largest request body read into memory while a request is held. Bodies up to this size
/// (by Content-Length) are read during the wait, so a client that hangs up is noticed at
/// once. Larger or chunked bodies stay in the socket until release, and a client that hangs
/// up while sending one is noticed only then. The value is pingora's retry buffer size,
/// which replays the bytes read here to the instance.
pub const MAX_HELD_BODY: usize = 64 * 1024;

/// Backoff between connection attempts to an instance that refused the connection.
const CONNECT_BACKOFF_START: Duration = Duration::from_millis(10);
const CONNECT_BACKOFF_MAX: Duration = Duration::from_millis(250);

/// Concurrent HTTP/2 streams coldgate opens on one h2c connection to an instance before
/// it opens another connection.
const H2C_STREAMS_PER_CONNECTION: usize = 100;

/// How long an idle pooled connection to an instance is kept. Model servers built on
/// uvicorn close idle keep-alive connections after 5 s by default, so stay below that to
/// avoid reusing a connection the server is closing.
const UPSTREAM_POOL_IDLE: Duration = Duration::from_secs(4);

/// Why coldgate answered a request itself. Every such answer is built by
/// [`error_response`], the only place that maps failures to status codes.
#[derive(Debug, Clone)]
pub enum Rejection {
    BadHost,
    NoRoute { host: String, path: String },
    /// The request itself is malformed (a bad body encoding, for example).
    BadRequest { service: Option<Arc<str>>, detail: String },
    Admit { service: Arc<str>, error: AdmitError, retry_after: u64 },
    /// The instance could not be reached before the request's deadline.
    Unreachable { service: Arc<str>, detail: String },
    /// The instance failed after the request was sent (reset, bad response).
    UpstreamFailed { service: Arc<str>, detail: String },
    Internal { service: Option<Arc<str>>, detail: String },
}

/// Returns the status, the `Retry-After` seconds (for 503) and the JSON body for a
/// rejection.
pub fn error_response(rejection: &Rejection) -> (u16, Option<u64>, serde_json::Value) {
    use serde_json::json;
    let body = |code: &str, service: Option<&str>, message: String| {
        json!({ "error": { "code": code, "service": service, "message": message } })
    };
    match rejection {
        Rejection::BadHost => (
            400,
            None,
            body("invalid_host", None, "the Host header is missing or not a valid host name".into()),
        ),
        Rejection::NoRoute { host, path } => (
            404,
            None,
            body(
                "no_route",
                None,
                format!("no service is configured for host {host:?} and path {path:?}; check the Host header"),
            ),
        ),
        Rejection::BadRequest { service, detail } => (
            400,
            None,
            body("bad_request", service.as_deref(), format!("the request could not be read: {detail}")),
        ),
        Rejection::Admit { service, error, retry_after } => match error {
            AdmitError::QueueFull => (
                503,
                Some(*retry_after),
                body("queue_full", Some(service), format!("the queue of service {service} is full; retry later")),
            ),
            AdmitError::GlobalQueueFull => (
                503,
                Some(*retry_after),
                body("overloaded", Some(service), "coldgate holds its maximum number of requests; retry later".into()),
            ),
            AdmitError::Timeout => (
                504,
                None,
                body(
                    "queue_timeout",
                    Some(service),
                    format!("service {service} did not become ready within its queue_timeout"),
                ),
            ),
            AdmitError::ActivationFailed(reason) => (
                502,
                None,
                body("activation_failed", Some(service), format!("service {service} failed to start: {reason}")),
            ),
            AdmitError::Unavailable(reason) => (
                503,
                Some(*retry_after),
                body("backend_unavailable", Some(service), format!("service {service} could not be started: {reason}")),
            ),
        },
        Rejection::Unreachable { service, detail } => (
            502,
            None,
            body("upstream_unreachable", Some(service), format!("could not connect to service {service}: {detail}")),
        ),
        Rejection::UpstreamFailed { service, detail } => (
            502,
            None,
            body("upstream_failed", Some(service), format!("service {service} failed while answering: {detail}")),
        ),
        Rejection::Internal { service, detail } => {
            (500, None, body("internal", service.as_deref(), format!("internal error: {detail}")))
        }
    }
}

/// Per-request state, kept for the whole life of the request.
pub struct RequestCtx {
    service: Option<Arc<Service>>,
    lease: Option<Lease>,
    arrived: Instant,
    deadline: Option<Instant>,
    connect_failures: u32,
    upstream_sent: Option<Instant>,
    held: bool,
    /// Body bytes read while held, counted in `coldgate_buffered_bytes` until forwarded.
    buffered: usize,
    rejected: bool,
    /// Set when a retry had to queue again and was rejected; `fail_to_proxy` answers it.
    pending_rejection: Option<Rejection>,
    /// The lease the front door took for this request, until `request_filter` takes it.
    admitted: Option<Admitted>,
}

impl RequestCtx {
    fn service_name(&self) -> Option<Arc<str>> {
        self.service.as_ref().map(|s| s.name.clone())
    }

    /// The service name for log fields, or "-" before routing.
    fn service_label(&self) -> &str {
        self.service.as_ref().map_or("-", |s| &s.name)
    }
}

/// The pingora application: routes, holds and forwards.
pub struct Activator {
    registry: Arc<ArcSwap<Registry>>,
    metrics: Arc<Metrics>,
}

impl Activator {
    pub fn new(registry: Arc<ArcSwap<Registry>>, metrics: Arc<Metrics>) -> Self {
        Activator { registry, metrics }
    }

    /// Writes coldgate's own answer for a rejection.
    async fn reject(&self, session: &mut Session, ctx: &mut RequestCtx, rejection: Rejection) -> Result<bool> {
        let (status, retry_after, body) = error_response(&rejection);
        ctx.rejected = true;
        let code = body["error"]["code"].as_str().unwrap_or_default();
        let message = body["error"]["message"].as_str().unwrap_or_default();
        match &rejection {
            Rejection::BadHost | Rejection::NoRoute { .. } => {
                debug!(status, code, path = %session.req_header().uri.path(), "request rejected")
            }
            _ => info!(status, service = ctx.service_label(), code, message, "request answered by coldgate"),
        }
        write_rejection(session, status, retry_after, &body).await?;
        Ok(true)
    }

    /// Holds the request in its service's queue until it gets an endpoint, the deadline
    /// passes, the start fails or the client goes away.
    async fn hold(&self, session: &mut Session, ctx: &mut RequestCtx, service: Arc<Service>) -> Result<Option<Rejection>> {
        let waiter = match service.admit() {
            Admission::Ready(lease) => {
                ctx.lease = Some(lease);
                return Ok(None);
            }
            Admission::Rejected(error) => {
                let reason = if error == AdmitError::QueueFull { "queue_full" } else { "global_limit" };
                self.metrics.queue_rejections.with_label_values(&[&service.name, reason]).inc();
                let retry_after = service.retry_after(Duration::ZERO);
                return Ok(Some(Rejection::Admit { service: service.name.clone(), error, retry_after }));
            }
            Admission::Queued(waiter) => waiter,
        };
        ctx.held = true;
        let deadline = ctx.deadline.unwrap_or_else(|| Instant::now() + service.settings().queue_timeout);
        debug!(service = %service.name, "request held");

        let buffered_gauge = self.metrics.buffered_bytes.with_label_values(&[&service.name]);
        let outcome = {
            let wait = waiter.wait(deadline);
            let watch = watch_client(session, &mut ctx.buffered, &buffered_gauge);
            tokio::pin!(wait);
            tokio::select! {
                result = &mut wait => Some(result),
                () = watch => None,
            }
        };
        match outcome {
            Some(Ok(lease)) => {
                ctx.lease = Some(lease);
                Ok(None)
            }
            Some(Err(error)) => {
                let retry_after = service.retry_after(ctx.arrived.elapsed());
                Ok(Some(Rejection::Admit { service: service.name.clone(), error, retry_after }))
            }
            None => {
                debug!(service = %service.name, "client went away while held");
                Error::e_explain(ErrorType::ConnectionClosed, "client closed the connection while its request was held")
                    .map_err(|mut e| {
                        e.esource = ErrorSource::Downstream;
                        e
                    })
            }
        }
    }

    /// Reads the body until its top-level `model` field shows up (at most `limit` bytes,
    /// and at most [`MAX_HELD_BODY`]), and returns the service for that model, or the
    /// OpenAI-style error to answer. The bytes read stay in pingora's retry buffer, which
    /// replays them to the instance. Only HTTP/2 and chunked HTTP/1 requests get here: the
    /// front door routes the others with the whole `limit`.
    async fn route_by_model(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        registry: &Registry,
        limit: usize,
    ) -> Result<std::result::Result<Arc<Service>, (u16, serde_json::Value)>> {
        session.enable_retry_buffering();
        let scan_limit = limit.min(MAX_HELD_BODY);
        let mut prefix: Vec<u8> = Vec::new();
        let model = loop {
            let done = session.is_body_done();
            let scan = openai::find_model(&prefix, done);
            // Body chunks come in the client's sizes, so the bytes read can pass the replay
            // buffer's size in one step. Such a request cannot reach the instance intact.
            let replayable = prefix.len() <= MAX_HELD_BODY;
            match scan {
                openai::ModelScan::Missing => return Ok(Err(openai::missing_model())),
                openai::ModelScan::Found(model) if replayable => break model,
                _ if !replayable || prefix.len() >= scan_limit => {
                    let scope = if scan_limit < limit { " (the limit for HTTP/2 and chunked requests)" } else { "" };
                    return Ok(Err(openai::model_not_in_prefix(scan_limit, scope)));
                }
                _ => {}
            }
            match session.read_request_body().await? {
                Some(chunk) => {
                    ctx.buffered += chunk.len();
                    prefix.extend_from_slice(&chunk);
                }
                // The body ended: the next scan is final.
                None if !done => continue,
                None => return Ok(Err(openai::missing_model())),
            }
        };
        match registry.route_model(&model) {
            Some(service) => {
                self.metrics.buffered_bytes.with_label_values(&[&service.name]).add(ctx.buffered as i64);
                Ok(Ok(service))
            }
            None => {
                ctx.buffered = 0;
                Ok(Err(openai::unknown_model(&model)))
            }
        }
    }

    fn release_buffered(&self, ctx: &mut RequestCtx) {
        if ctx.buffered > 0 {
            if let Some(service) = &ctx.service {
                self.metrics.buffered_bytes.with_label_values(&[&service.name]).sub(ctx.buffered as i64);
            }
            ctx.buffered = 0;
        }
    }
}

/// Resolves when the client has gone away. It reads a small request body while waiting, so
/// the end of the connection becomes visible; it never resolves for a client that is still
/// sending a large body.
async fn watch_client(session: &mut Session, buffered: &mut usize, gauge: &prometheus::IntGauge) {
    let small_body = session
        .req_header()
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok())
        .is_some_and(|length| length <= MAX_HELD_BODY);
    let chunked = session.req_header().headers.contains_key(header::TRANSFER_ENCODING);

    if !session.is_body_done() {
        if !small_body || chunked {
            // An HTTP/2 stream (every gRPC call, which has no content-length) reports a
            // client's RST_STREAM or a lost connection without its body being read.
            if let pingora_core::protocols::http::ServerSession::H2(h2) = session.downstream_session.as_mut() {
                let _ = h2.idle().await;
                return;
            }
            return std::future::pending().await;
        }
        session.enable_retry_buffering();
        loop {
            match session.read_request_body().await {
                Ok(Some(chunk)) => {
                    *buffered += chunk.len();
                    gauge.add(chunk.len() as i64);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    // The body is complete: any read now ends only if the client closes or misbehaves.
    loop {
        match session.downstream_session.read_body_or_idle(true).await {
            Ok(_) => continue,
            Err(_) => return,
        }
    }
}

/// Writes a rejection in the form the client understands: a trailers-only gRPC response
/// for gRPC calls (so a gRPC client sees UNAVAILABLE or DEADLINE_EXCEEDED rather than a
/// bare HTTP error), JSON otherwise.
async fn write_rejection(
    session: &mut Session,
    status: u16,
    retry_after: Option<u64>,
    body: &serde_json::Value,
) -> Result<()> {
    let is_grpc = session
        .req_header()
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if !is_grpc {
        return write_json(session, status, retry_after, body).await;
    }
    let code = body["error"]["code"].as_str().unwrap_or_default();
    let message = body["error"]["message"].as_str().unwrap_or_default();
    let mut response = ResponseHeader::build(200, Some(4))?;
    response.insert_header(header::CONTENT_TYPE, "application/grpc")?;
    response.insert_header("grpc-status", grpc_status(code).to_string())?;
    response.insert_header("grpc-message", percent_encode_grpc(message))?;
    if let Some(seconds) = retry_after {
        response.insert_header(header::RETRY_AFTER, seconds.to_string())?;
    }
    // Headers with end of stream and no body: the trailers-only form of a gRPC error. It
    // must be one HEADERS frame with END_STREAM, but pingora's Session::write_response_header
    // ignores its end flag on HTTP/2 and ends the stream with an empty DATA frame, which
    // gRPC clients report as UNKNOWN or INTERNAL. So an HTTP/2 stream is ended here.
    match session.downstream_session.as_mut() {
        pingora_core::protocols::http::ServerSession::H2(h2) => h2.write_response_header(Box::new(response), true)?,
        _ => session.write_response_header(Box::new(response), true).await?,
    }
    Ok(())
}

/// Maps coldgate's error code to a gRPC status code (grpc/doc/statuscodes.md numbering).
pub fn grpc_status(code: &str) -> u32 {
    match code {
        "queue_timeout" => 4,                    // DEADLINE_EXCEEDED
        "no_route" => 12,                        // UNIMPLEMENTED
        "invalid_host" | "bad_request" => 3,     // INVALID_ARGUMENT
        "internal" => 13,                        // INTERNAL
        _ => 14,                                 // UNAVAILABLE: queue full, start failed, upstream down
    }
}

/// Percent-encodes a grpc-message value as the gRPC HTTP/2 protocol requires: bytes
/// outside printable ASCII, and '%' itself.
fn percent_encode_grpc(message: &str) -> String {
    let mut encoded = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// Logs a rejected model-routed request: 404s (unknown models) at DEBUG, like other 404s,
/// and the rest at INFO.
pub fn log_model_rejection(status: u16, body: &serde_json::Value) {
    let code = body["error"]["code"].as_str().unwrap_or_default();
    let message = body["error"]["message"].as_str().unwrap_or_default();
    if status == 404 {
        debug!(status, code, message, "model-routed request rejected");
    } else {
        info!(status, code, message, "model-routed request rejected");
    }
}

/// Reads and discards the rest of the request body, for at most 2 s and 16 MiB.
async fn drain_body(session: &mut Session) {
    const DRAIN_TIME: Duration = Duration::from_secs(2);
    const DRAIN_BYTES: usize = 16 * 1024 * 1024;
    let drain = async {
        let mut total = 0;
        while total < DRAIN_BYTES && !session.is_body_done() {
            match session.read_request_body().await {
                Ok(Some(chunk)) => total += chunk.len(),
                Ok(None) | Err(_) => return,
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
}

async fn write_json(
    session: &mut Session,
    status: u16,
    retry_after: Option<u64>,
    body: &serde_json::Value,
) -> Result<()> {
    let body = Bytes::from(serde_json::to_vec(body).expect("a JSON value always serialises"));
    let mut response = ResponseHeader::build(status, Some(4))?;
    response.insert_header(header::CONTENT_TYPE, "application/json")?;
    response.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
    if let Some(seconds) = retry_after {
        response.insert_header(header::RETRY_AFTER, seconds.to_string())?;
    }
    session.write_response_header(Box::new(response), false).await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
}

fn is_connect_error(error: &Error) -> bool {
    matches!(
        error.etype(),
        ErrorType::ConnectTimedout
            | ErrorType::ConnectRefused
            | ErrorType::ConnectNoRoute
            | ErrorType::ConnectError
            | ErrorType::SocketError
    )
}

/// Maps a pingora error to coldgate's answer, or `None` when the client is gone and there
/// is nobody to answer.
fn classify_failure(error: &Error, service: Option<Arc<str>>) -> Option<Rejection> {
    let detail = error.to_string();
    match (error.esource(), service) {
        (ErrorSource::Downstream, _)
            if matches!(
                error.etype(),
                ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
            ) =>
        {
            None
        }
        (ErrorSource::Downstream, service) => Some(Rejection::BadRequest { service, detail }),
        (ErrorSource::Upstream, Some(service)) if is_connect_error(error) => {
            Some(Rejection::Unreachable { service, detail })
        }
        (ErrorSource::Upstream, Some(service)) => Some(Rejection::UpstreamFailed { service, detail }),
        (_, service) => Some(Rejection::Internal { service, detail }),
    }
}

#[async_trait]
impl ProxyHttp for Activator {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> Self::CTX {
        RequestCtx {
            service: None,
            lease: None,
            arrived: Instant::now(),
            deadline: None,
            connect_failures: 0,
            upstream_sent: None,
            held: false,
            buffered: 0,
            rejected: false,
            pending_rejection: None,
            admitted: None,
        }
    }

    fn on_connection_reuse(&self, _session: &mut Session, ctx: &mut Self::CTX, previous: Box<dyn std::any::Any + Send + Sync>) {
        // The front door passes its lease as the connection's user context.
        if let Ok(admitted) = previous.downcast::<Admitted>() {
            ctx.admitted = Some(*admitted);
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        // A request the front door already routed and leased: no routing or holding left.
        if let Some(admitted) = ctx.admitted.take() {
            let service = admitted.lease.service().clone();
            ctx.arrived = admitted.arrived;
            ctx.deadline = Some(admitted.arrived + service.settings().queue_timeout);
            ctx.held = true;
            ctx.lease = Some(admitted.lease);
            ctx.service = Some(service);
            return Ok(false);
        }

        let header = session.req_header();
        let raw_host = header
            .uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| header.headers.get(header::HOST).and_then(|h| h.to_str().ok()));
        let Some(host) = raw_host.and_then(normalize_host) else {
            return self.reject(session, ctx, Rejection::BadHost).await;
        };

        let registry = self.registry.load_full();
        let method = header.method.clone();
        let path = header.uri.path().to_string();
        let model_limit = registry.openai_prefix_limit(&host);
        let service = match model_limit {
            Some(_) if openai::is_model_list(&method, &path) => {
                write_json(session, 200, None, &openai::model_list(&registry.models())).await?;
                return Ok(true);
            }
            Some(limit) if openai::is_model_routed(&method, &path) => {
                match self.route_by_model(session, ctx, &registry, limit).await? {
                    Ok(service) => service,
                    Err((status, body)) => {
                        ctx.rejected = true;
                        log_model_rejection(status, &body);
                        // An HTTP/2 client that is still sending gets a reset rather than
                        // the answer if the stream ends with its body unread.
                        drain_body(session).await;
                        write_json(session, status, None, &body).await?;
                        return Ok(true);
                    }
                }
            }
            _ => match registry.route(&host, &path) {
                Some(service) => service,
                None => {
                    self.metrics.unrouted_requests.inc();
                    let path = path.chars().take(200).collect();
                    return self.reject(session, ctx, Rejection::NoRoute { host, path }).await;
                }
            },
        };
        ctx.service = Some(service.clone());
        ctx.deadline = Some(ctx.arrived + service.settings().queue_timeout);

        match self.hold(session, ctx, service).await? {
            None => Ok(false),
            Some(rejection) => self.reject(session, ctx, rejection).await,
        }
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<Box<HttpPeer>> {
        self.release_buffered(ctx);
        let Some(service) = ctx.service.clone() else {
            return Error::e_explain(ErrorType::InternalError, "no service chosen before upstream_peer");
        };

        if ctx.connect_failures > 0 {
            // A retry after a refused connection: wait a little, and if the instance went
            // away meanwhile, go back to the queue for another one.
            let deadline = ctx.deadline.unwrap_or_else(Instant::now);
            let backoff = CONNECT_BACKOFF_START
                .saturating_mul(1 << ctx.connect_failures.min(8))
                .min(CONNECT_BACKOFF_MAX);
            let now = Instant::now();
            if now + backoff >= deadline {
                ctx.pending_rejection = Some(Rejection::Unreachable {
                    service: service.name.clone(),
                    detail: format!("connection attempts kept failing until the deadline ({} attempts)", ctx.connect_failures),
                });
                return Error::e_explain(ErrorType::ConnectTimedout, "the request's deadline passed while connecting");
            }
            tokio::time::sleep(backoff).await;
            if !ctx.lease.as_ref().is_some_and(Lease::is_current) {
                ctx.lease = None;
                if let Some(rejection) = self.hold(session, ctx, service.clone()).await? {
                    ctx.pending_rejection = Some(rejection);
                    return Error::e_explain(ErrorType::InternalError, "no instance available for the retry");
                }
            }
        }

        let Some(lease) = ctx.lease.as_ref() else {
            return Error::e_explain(ErrorType::InternalError, "no endpoint leased before upstream_peer");
        };
        let (connect_timeout, protocol) = service.upstream_options();
        let mut peer = HttpPeer::new(lease.addr(), false, String::new());
        peer.options.connection_timeout = Some(connect_timeout);
        peer.options.idle_timeout = Some(UPSTREAM_POOL_IDLE);
        if protocol == UpstreamProtocol::H2c {
            // HTTP/2 only, without TLS: pingora then speaks h2c with prior knowledge.
            peer.options.alpn = ALPN::H2;
            peer.options.max_h2_streams = H2C_STREAMS_PER_CONNECTION;
        }
        ctx.upstream_sent = Some(Instant::now());
        Ok(Box::new(peer))
    }

    fn fail_to_connect(&self, _session: &mut Session, peer: &HttpPeer, ctx: &mut Self::CTX, mut e: Box<Error>) -> Box<Error> {
        // Nothing was sent yet, so retrying cannot duplicate the request.
        let before_deadline = ctx.deadline.is_some_and(|d| Instant::now() < d);
        let retry = is_connect_error(&e) && before_deadline;
        e.set_retry(retry);
        if retry {
            ctx.connect_failures += 1;
            if let Some(name) = ctx.service_name() {
                self.metrics.connect_retries.with_label_values(&[&name]).inc();
                debug!(service = %name, peer = %peer, attempt = ctx.connect_failures, error = %e, "connect failed; retrying");
            }
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        _ctx: &mut Self::CTX,
    ) -> Result<()> {
        if let Some(client) = session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip().to_string()) {
            let forwarded_for = match upstream_request.headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
                Some(previous) => format!("{previous}, {client}"),
                None => client,
            };
            upstream_request.insert_header("x-forwarded-for", forwarded_for)?;
        }
        let over_tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        upstream_request.insert_header("x-forwarded-proto", if over_tls { "https" } else { "http" })?;
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        _upstream_response: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        if let (Some(sent), Some(name)) = (ctx.upstream_sent, ctx.service_name()) {
            self.metrics.upstream_latency.with_label_values(&[&name]).observe(sent.elapsed().as_secs_f64());
        }
        Ok(())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Self::CTX) -> FailToProxy {
        self.release_buffered(ctx);
        let rejection = match ctx.pending_rejection.take() {
            Some(rejection) => rejection,
            None => match classify_failure(e, ctx.service_name()) {
                Some(rejection) => rejection,
                None => {
                    debug!(service = ctx.service_label(), error = %e, "client connection ended");
                    return FailToProxy { error_code: 0, can_reuse_downstream: false };
                }
            },
        };
        let (status, retry_after, body) = error_response(&rejection);
        if session.response_written().is_some() {
            // The response had started, so the client sees it cut short; nothing is retried.
            warn!(service = ctx.service_label(), error = %e, "request failed after the response started");
            return FailToProxy { error_code: 0, can_reuse_downstream: false };
        }
        match status {
            400..=499 => debug!(service = ctx.service_label(), status, error = %e, "bad request"),
            _ => warn!(service = ctx.service_label(), status, error = %e, "request failed"),
        }
        ctx.rejected = true;
        let written = write_rejection(session, status, retry_after, &body).await.is_ok();
        FailToProxy { error_code: if written { status } else { 0 }, can_reuse_downstream: false }
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &Self::CTX, _error: &Error) -> bool {
        // coldgate logs failures itself in fail_to_proxy, once per request.
        true
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Self::CTX) {
        self.release_buffered(ctx);
        let status = session.response_written().map(|r| r.status.as_u16()).unwrap_or(0);
        if let Some(service) = &ctx.service {
            let status_label = if status == 0 { "none".to_string() } else { status.to_string() };
            self.metrics.requests.with_label_values(&[service.name.as_ref(), status_label.as_str()]).inc();
        }
        debug!(
            service = ctx.service_label(),
            status,
            held = ctx.held,
            rejected = ctx.rejected,
            elapsed_ms = ctx.arrived.elapsed().as_millis() as u64,
            "request finished"
        );
        // The lease is released when the context drops, right after this callback.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_of(rejection: Rejection) -> (u16, Option<u64>, String) {
        let (status, retry_after, body) = error_response(&rejection);
        (status, retry_after, body["error"]["code"].as_str().unwrap().to_string())
    }

    #[test]
    fn each_failure_maps_to_one_status() {
        let service: Arc<str> = Arc::from("iris");
        let admit = |error| Rejection::Admit { service: service.clone(), error, retry_after: 7 };
        let cases = [
            (Rejection::BadHost, 400, None, "invalid_host"),
            (Rejection::NoRoute { host: "x.local".into(), path: "/".into() }, 404, None, "no_route"),
            (admit(AdmitError::QueueFull), 503, Some(7), "queue_full"),
            (admit(AdmitError::GlobalQueueFull), 503, Some(7), "overloaded"),
            (admit(AdmitError::Timeout), 504, None, "queue_timeout"),
            (admit(AdmitError::ActivationFailed("exit status: 3".into())), 502, None, "activation_failed"),
            (admit(AdmitError::Unavailable("forbidden".into())), 503, Some(7), "backend_unavailable"),
            (Rejection::Unreachable { service: service.clone(), detail: "refused".into() }, 502, None, "upstream_unreachable"),
            (Rejection::UpstreamFailed { service: service.clone(), detail: "reset".into() }, 502, None, "upstream_failed"),
            (Rejection::BadRequest { service: None, detail: "bad chunk".into() }, 400, None, "bad_request"),
        ];
        for (rejection, status, retry_after, code) in cases {
            let label = format!("{rejection:?}");
            assert_eq!(status_of(rejection), (status, retry_after, code.to_string()), "{label}");
        }
    }

    #[test]
    fn grpc_codes_and_message_encoding() {
        assert_eq!(grpc_status("queue_timeout"), 4);
        assert_eq!(grpc_status("queue_full"), 14);
        assert_eq!(grpc_status("activation_failed"), 14);
        assert_eq!(grpc_status("no_route"), 12);
        assert_eq!(percent_encode_grpc("a 100% é"), "a 100%25 %C3%A9");
    }

    #[test]
    fn client_gone_gets_no_answer() {
        let mut error = Error::new(ErrorType::ConnectionClosed);
        error.esource = ErrorSource::Downstream;
        assert!(classify_failure(&error, Some("iris".into())).is_none());
    }

    #[test]
    fn upstream_connect_failure_is_unreachable() {
        let mut error = Error::new(ErrorType::ConnectRefused);
        error.esource = ErrorSource::Upstream;
        assert!(matches!(classify_failure(&error, Some("iris".into())), Some(Rejection::Unreachable { .. })));
        let mut reset = Error::new(ErrorType::ConnectionClosed);
        reset.esource = ErrorSource::Upstream;
        assert!(matches!(classify_failure(&reset, Some("iris".into())), Some(Rejection::UpstreamFailed { .. })));
    }
}
