//! Holding HTTP/1 requests before pingora sees them.
//!
//! A request held inside pingora's `request_filter` costs about 28 KiB, most of it
//! pingora's request state machine (a DHAT measurement with pingora 0.9.1, summarised in
//! BENCHMARKS.md). So the connection task reads each HTTP/1 request head itself, and when
//! the request's service has no free instance it holds the request here, with only the
//! bytes read so far. Once an instance is leased, the bytes go to pingora as a pipelined
//! prefix and the lease rides on the session's connection user context to
//! `request_filter`, which skips its own routing and hold.
//!
//! On the `[openai]` hosts the front door also reads the body up to `max_body_prefix` to
//! find the `model` field. Those bytes go to pingora with the head, so the body reaches the
//! instance intact however much of it was read.
//!
//! Requests this code does not understand, requests for unknown hosts, `Expect:
//! 100-continue` (except on model-routed paths) and chunked model-routed requests take the
//! usual pingora path, so pingora stays the single HTTP parser that answers them.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tracing::{debug, info};

use crate::metrics::Metrics;
use crate::openai::{self, ModelScan};
use crate::proxy::{error_response, Rejection, MAX_HELD_BODY};
use crate::registry::Registry;
use crate::routing::normalize_host;
use crate::service::{AdmitError, Admission, Lease, Service};

/// Maximum size of a request head that the front door reads; larger heads go to pingora,
/// which rejects them with its own limits.
const MAX_HEAD: usize = 16 * 1024;
/// Time a client has to send the rest of a request head once it started one, and the
/// time an idle keep-alive connection waits for its next request (pingora's default).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(60);
/// The cleartext HTTP/2 connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Largest read while scanning an OpenAI body for `model`.
const BODY_READ_CHUNK: usize = 64 * 1024;
/// Largest number of bytes handed to pingora as a pipelined prefix: pingora 0.9 rejects a
/// prefix longer than its maximum request head size (1 MiB - 1) with a 400.
pub const MAX_PREFIX: usize = 1024 * 1024 - 1;

/// A lease the front door took for a request, handed to `request_filter` through the
/// session's connection user context.
pub struct Admitted {
    pub lease: Lease,
    /// When the request arrived, for its `queue_timeout` deadline.
    pub arrived: Instant,
}

/// The connection task's next step after the front door.
pub enum Outcome {
    /// Give pingora the connection, with these bytes to parse before reading more, and
    /// the lease for the request when the front door took one.
    Forward(BytesMut, Option<Admitted>),
    /// The connection starts with the HTTP/2 preface; these bytes were read.
    Http2(BytesMut),
    /// Nothing more: the request was answered here, the client left, or coldgate is
    /// shutting down and the connection was idle.
    Done,
}

pub struct FrontDoor {
    registry: Arc<ArcSwap<Registry>>,
    metrics: Arc<Metrics>,
}

/// The parts of a request head the front door decides on.
struct Head {
    length: usize,
    method: http::Method,
    host: Option<String>,
    path: String,
    content_length: Option<usize>,
    chunked: bool,
    /// Byte range of the `Expect: 100-continue` header line, line end included.
    expect_continue: Option<Range<usize>>,
}

impl FrontDoor {
    pub fn new(registry: Arc<ArcSwap<Registry>>, metrics: Arc<Metrics>) -> Self {
        FrontDoor { registry, metrics }
    }

    /// Reads the next request head of a connection and holds the request while its
    /// service is cold. `first` is true for a connection's first request, which may also
    /// be the start of an HTTP/2 connection. While no byte of the request has arrived,
    /// `stop` turning true ends the wait.
    pub async fn next_request<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        first: bool,
        stop: &mut watch::Receiver<bool>,
    ) -> Outcome {
        // Room for a typical inference request head; a larger head grows the buffer.
        let mut buffer = BytesMut::with_capacity(512);
        if !wait_for_bytes(stream, &mut buffer, stop).await {
            return Outcome::Done;
        }
        let arrived = Instant::now();
        let mut head = loop {
            if first && (buffer.starts_with(H2_PREFACE) || H2_PREFACE.starts_with(&buffer)) {
                if buffer.len() >= H2_PREFACE.len() {
                    return Outcome::Http2(buffer);
                }
            } else {
                match parse_head(&buffer) {
                    Ok(Some(head)) => break head,
                    Ok(None) if buffer.len() < MAX_HEAD => {}
                    // Too large or malformed: pingora answers it with its own error.
                    _ => return Outcome::Forward(buffer, None),
                }
            }
            match tokio::time::timeout(HEAD_TIMEOUT, stream.read_buf(&mut buffer)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return Outcome::Forward(buffer, None),
            }
        };

        let registry = self.registry.load();
        let Some(host) = head.host.as_deref() else { return Outcome::Forward(buffer, None) };
        let service = match registry.openai_prefix_limit(host) {
            Some(limit) if openai::is_model_routed(&head.method, &head.path) => {
                // Boxed, so connections that never get here do not carry its state.
                match Box::pin(self.route_by_model(stream, &mut buffer, &mut head, &registry, limit)).await {
                    ModelRoute::Service(service) => service,
                    ModelRoute::Pingora => return Outcome::Forward(buffer, None),
                    ModelRoute::Answered => return Outcome::Done,
                }
            }
            // GET /v1/models and every other path of an OpenAI host: pingora answers.
            Some(_) => return Outcome::Forward(buffer, None),
            None if head.expect_continue.is_some() => return Outcome::Forward(buffer, None),
            None => match registry.route(host, &head.path) {
                Some(service) => service,
                None => return Outcome::Forward(buffer, None),
            },
        };
        drop(registry);
        self.hold(stream, buffer, &head, service, arrived).await
    }

    /// Admits the request to its service and, when no instance is free, waits for one.
    async fn hold<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        mut buffer: BytesMut,
        head: &Head,
        service: Arc<Service>,
        arrived: Instant,
    ) -> Outcome {
        let waiter = match service.admit() {
            Admission::Ready(lease) => return Outcome::Forward(buffer, Some(Admitted { lease, arrived })),
            Admission::Rejected(error) => {
                let reason = if error == AdmitError::QueueFull { "queue_full" } else { "global_limit" };
                self.metrics.queue_rejections.with_label_values(&[&service.name, reason]).inc();
                let retry_after = service.retry_after(Duration::ZERO);
                let rejection = Rejection::Admit { service: service.name.clone(), error, retry_after };
                Box::pin(self.reject(stream, &service.name, rejection)).await;
                return Outcome::Done;
            }
            Admission::Queued(waiter) => waiter,
        };
        debug!(service = %service.name, "request held in the front door");

        // Read a small body while waiting, so that a client that hangs up is seen at once.
        let body_limit = match (head.content_length, head.chunked) {
            (Some(length), false) if length <= MAX_HELD_BODY => head.length + length,
            _ => head.length,
        };
        let deadline = arrived + service.settings().queue_timeout;
        let outcome = {
            let wait = waiter.wait(deadline);
            tokio::pin!(wait);
            tokio::select! {
                result = &mut wait => Some(result),
                () = watch_client(stream, &mut buffer, body_limit) => None,
            }
        };
        match outcome {
            Some(Ok(lease)) => Outcome::Forward(buffer, Some(Admitted { lease, arrived })),
            Some(Err(error)) => {
                let retry_after = service.retry_after(arrived.elapsed());
                let rejection = Rejection::Admit { service: service.name.clone(), error, retry_after };
                Box::pin(self.reject(stream, &service.name, rejection)).await;
                Outcome::Done
            }
            None => {
                debug!(service = %service.name, "client went away while held");
                Outcome::Done
            }
        }
    }

    /// Reads the body of a model-routed request until its top-level `model` field shows
    /// up, at most `limit` bytes, and returns the service that serves the model. Errors
    /// are answered here in the OpenAI format, and the connection is closed after them.
    async fn route_by_model<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        buffer: &mut BytesMut,
        head: &mut Head,
        registry: &Registry,
        limit: usize,
    ) -> ModelRoute {
        // A chunked body would have to be decoded to be scanned; pingora reads it instead.
        let Some(length) = head.content_length.filter(|_| !head.chunked) else { return ModelRoute::Pingora };
        if let Some(line) = head.expect_continue.clone().filter(|_| buffer.len() == head.length) {
            // The client waits for the interim response before it sends the body. The
            // header line is removed, so neither pingora nor the instance sends a second one.
            if stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.is_err() {
                return ModelRoute::Answered;
            }
            let tail = buffer.split_off(line.end);
            buffer.truncate(line.start);
            buffer.unsplit(tail);
            head.length -= line.len();
            head.expect_continue = None;
        }
        // The head and the scanned bytes go to pingora as one prefix.
        let scan_limit = limit.min(length).min(MAX_PREFIX - head.length);
        let model = loop {
            let body = &buffer[head.length..];
            let complete = body.len() >= length;
            match openai::find_model(body, complete) {
                ModelScan::Found(model) => break model,
                ModelScan::Missing => return self.answer_openai(stream, openai::missing_model()).await,
                ModelScan::NeedMore if body.len() >= scan_limit => {
                    return self.answer_openai(stream, openai::model_not_in_prefix(scan_limit, "")).await;
                }
                ModelScan::NeedMore => {}
            }
            // Never read past the scan limit: the prefix must stay within MAX_PREFIX.
            let to_read = (scan_limit - body.len()).min(BODY_READ_CHUNK);
            buffer.reserve(to_read);
            let mut limited = (&mut *stream).take(to_read as u64);
            match tokio::time::timeout(HEAD_TIMEOUT, limited.read_buf(buffer)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return ModelRoute::Answered,
            }
        };
        match registry.route_model(&model) {
            Some(service) => ModelRoute::Service(service),
            None => self.answer_openai(stream, openai::unknown_model(&model)).await,
        }
    }

    async fn answer_openai<S: AsyncRead + AsyncWrite + Unpin>(&self, stream: &mut S, (status, body): (u16, serde_json::Value)) -> ModelRoute {
        crate::proxy::log_model_rejection(status, &body);
        write_response(stream, status, None, &body).await;
        ModelRoute::Answered
    }

    /// Answers a rejected request and closes the connection.
    async fn reject<S: AsyncRead + AsyncWrite + Unpin>(&self, stream: &mut S, service: &str, rejection: Rejection) {
        let (status, retry_after, body) = error_response(&rejection);
        write_response(stream, status, retry_after, &body).await;
        self.metrics.requests.with_label_values(&[service, &status.to_string()]).inc();
        let code = body["error"]["code"].as_str().unwrap_or_default();
        info!(status, service, code, "request answered by coldgate");
    }
}

/// The front door's decision for a model-routed request.
enum ModelRoute {
    Service(Arc<Service>),
    /// pingora reads the body and routes the request.
    Pingora,
    /// The request was answered here, or the client left.
    Answered,
}

/// Waits until the first bytes of a request arrive in `buffer`. Returns false when the
/// client closes, sends nothing within [`HEAD_TIMEOUT`], or `stop` turns true first.
async fn wait_for_bytes<S: AsyncRead + Unpin>(stream: &mut S, buffer: &mut BytesMut, stop: &mut watch::Receiver<bool>) -> bool {
    if *stop.borrow() {
        return false;
    }
    let read = tokio::time::timeout(HEAD_TIMEOUT, stream.read_buf(buffer));
    tokio::select! {
        result = read => matches!(result, Ok(Ok(n)) if n > 0),
        _ = stop.wait_for(|stopping| *stopping) => false,
    }
}

/// Writes a JSON response with `Connection: close`, then closes the connection.
async fn write_response<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, status: u16, retry_after: Option<u64>, body: &serde_json::Value) {
    let body = serde_json::to_vec(body).expect("a JSON value always serialises");
    let reason = http::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("");
    let mut response = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    if let Some(seconds) = retry_after {
        response.push_str(&format!("retry-after: {seconds}\r\n"));
    }
    response.push_str("\r\n");
    let mut bytes = response.into_bytes();
    bytes.extend_from_slice(&body);
    let _ = stream.write_all(&bytes).await;
    let _ = stream.flush().await;
    linger(stream).await;
}

/// Closes the sending side and discards what the client still sends, for a bounded time.
/// Closing a socket with unread request bytes makes the kernel send a reset, which can
/// destroy the response before the client reads it.
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) {
    const LINGER_TIME: Duration = Duration::from_secs(2);
    const LINGER_BYTES: usize = 16 * 1024 * 1024;
    if stream.shutdown().await.is_err() {
        return;
    }
    let drain = async {
        // Part of the boxed future that answers: small, because a burst of rejections
        // (held requests timing out together) holds one per connection at once.
        let mut discard = [0u8; 2048];
        let mut total = 0;
        while total < LINGER_BYTES {
            match stream.read(&mut discard).await {
                Ok(0) | Err(_) => return,
                Ok(n) => total += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_TIME, drain).await;
}

/// Resolves when the client closes its connection. Reads body bytes into `buffer` until it
/// holds `limit` bytes, then reads nothing more, so a large body waits in the socket.
async fn watch_client<S: AsyncRead + Unpin>(stream: &mut S, buffer: &mut BytesMut, limit: usize) {
    while buffer.len() < limit {
        buffer.reserve((limit - buffer.len()).min(16 * 1024));
        match stream.read_buf(buffer).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
    // Either the whole body is here, and a read returns only at end of stream or with
    // bytes of a pipelined next request, or a large body is partly here, and a read
    // returns more of it. Both kinds of bytes go to pingora after the hand-over.
    if buffer.len() >= MAX_PREFIX {
        // One more byte would make the prefix too long for pingora.
        return std::future::pending().await;
    }
    let mut probe = [0u8; 1];
    match stream.read(&mut probe).await {
        Ok(0) | Err(_) => {}
        Ok(_) => {
            buffer.extend_from_slice(&probe);
            std::future::pending::<()>().await;
        }
    }
}

/// Parses a complete request head, or returns `Ok(None)` when more bytes are needed.
fn parse_head(buffer: &[u8]) -> Result<Option<Head>, ()> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    let length = match request.parse(buffer) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(()),
    };
    let method = http::Method::from_bytes(request.method.ok_or(())?.as_bytes()).map_err(|_| ())?;
    let target = request.path.ok_or(())?;
    let mut host = None;
    let mut content_length = None;
    let mut chunked = false;
    let mut expect_continue = None;
    for header in request.headers.iter() {
        let value = std::str::from_utf8(header.value).map_err(|_| ())?;
        match header.name.to_ascii_lowercase().as_str() {
            "host" => host = normalize_host(value),
            "content-length" => content_length = Some(value.trim().parse::<usize>().map_err(|_| ())?),
            "transfer-encoding" => chunked = true,
            "expect" if value.trim().eq_ignore_ascii_case("100-continue") => {
                expect_continue = Some(header_line(buffer, header.name, header.value)?);
            }
            _ => {}
        }
    }
    // An absolute-form target carries the host itself.
    let path = match target.strip_prefix("http://").or_else(|| target.strip_prefix("https://")) {
        Some(rest) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            host = normalize_host(authority).or(host);
            if path.is_empty() { "/" } else { path }
        }
        None => target,
    };
    let path = path.split('?').next().unwrap_or("/").to_string();
    Ok(Some(Head { length, method, host, path, content_length, chunked, expect_continue }))
}

/// Returns the byte range in `buffer` of the header line whose name and value httparse
/// returned as slices of `buffer`, from the name to the end of the line break.
fn header_line(buffer: &[u8], name: &str, value: &[u8]) -> Result<Range<usize>, ()> {
    let base = buffer.as_ptr() as usize;
    let start = (name.as_ptr() as usize).checked_sub(base).ok_or(())?;
    let value_end = (value.as_ptr() as usize).checked_sub(base).ok_or(())? + value.len();
    let line_break = buffer[value_end..].iter().position(|&b| b == b'\n').ok_or(())?;
    Ok(start..value_end + line_break + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_parsing() {
        let head = parse_head(b"POST /v2/infer?x=1 HTTP/1.1\r\nHost: Iris.Local:8080\r\nContent-Length: 12\r\n\r\n{\"a\"").unwrap().unwrap();
        assert_eq!(head.host.as_deref(), Some("iris.local"));
        assert_eq!(head.path, "/v2/infer");
        assert_eq!(head.method, http::Method::POST);
        assert_eq!(head.content_length, Some(12));
        assert_eq!(head.length, 74, "the head ends after the blank line");
        assert!(!head.chunked);
        assert!(head.expect_continue.is_none());

        let absolute = parse_head(b"GET http://a.local/x HTTP/1.1\r\nHost: b.local\r\n\r\n").unwrap().unwrap();
        assert_eq!(absolute.host.as_deref(), Some("a.local"));
        assert_eq!(absolute.path, "/x");

        assert!(parse_head(b"GET / HTTP/1.1\r\nHost: a").unwrap().is_none(), "partial head");
        assert!(parse_head(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n").is_err());
        assert!(parse_head(b"\x00\x01garbage\r\n\r\n").is_err());
    }

    #[test]
    fn expect_header_line_range() {
        let text = b"POST /v1/embeddings HTTP/1.1\r\nHost: llm\r\nExpect:  100-Continue \r\nContent-Length: 2\r\n\r\n";
        let head = parse_head(text).unwrap().unwrap();
        let line = head.expect_continue.expect("the Expect line is found");
        assert_eq!(&text[line.clone()], b"Expect:  100-Continue \r\n");
        let mut without = text[..line.start].to_vec();
        without.extend_from_slice(&text[line.end..]);
        assert!(parse_head(&without).unwrap().unwrap().expect_continue.is_none());
    }
}
