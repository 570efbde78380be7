//! Holding the first HTTP/1 request of a connection before pingora sees it.
//!
//! A request held inside pingora's `request_filter` costs about 28 KiB, most of it
//! pingora's request state machine (a DHAT measurement with pingora 0.9.1, summarised in
//! BENCHMARKS.md). Most held
//! requests arrive on new connections, because coldgate closes idle keep-alive connections
//! after 60 s and services go cold only after minutes of idleness. So the connection task
//! reads the first request's head itself, and when its service has no free instance it
//! holds the request here, with only the bytes read so far. Once an instance is leased,
//! the bytes go to pingora as a pipelined prefix and the lease travels with the
//! connection's client address to `request_filter`, which skips its own hold.
//!
//! Requests this code does not understand, requests for unknown hosts, OpenAI-routed
//! hosts, `Expect: 100-continue`, and every later request on the connection take the
//! usual pingora path, so pingora stays the single HTTP parser that answers them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::BytesMut;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, info};

use crate::metrics::Metrics;
use crate::proxy::{error_response, Rejection, MAX_HELD_BODY};
use crate::registry::Registry;
use crate::routing::normalize_host;
use crate::service::{AdmitError, Admission, Lease};

/// Maximum size of a request head that the front door reads; larger heads go to pingora,
/// which rejects them with its own limits.
const MAX_HEAD: usize = 16 * 1024;
/// Time a new connection has to send its first request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(60);
/// The cleartext HTTP/2 connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A lease taken for a request held in the front door, waiting for `request_filter`.
pub struct Admitted {
    pub lease: Lease,
    /// When the request arrived, for its `queue_timeout` deadline.
    pub arrived: Instant,
}

/// Leases handed from the front door to `request_filter`, keyed by client address, which
/// is unique among open connections.
#[derive(Default)]
pub struct AdmittedRequests {
    by_client: Mutex<HashMap<SocketAddr, Admitted>>,
}

impl AdmittedRequests {
    pub fn take(&self, client: SocketAddr) -> Option<Admitted> {
        self.by_client.lock().remove(&client)
    }

    fn put(&self, client: SocketAddr, admitted: Admitted) {
        self.by_client.lock().insert(client, admitted);
    }
}

/// The connection task's next step after the front door.
pub enum Outcome {
    /// Give pingora the connection, with these bytes to parse before reading more.
    Forward(BytesMut),
    /// The connection starts with the HTTP/2 preface; these bytes were read.
    Http2(BytesMut),
    /// Nothing more: the request was answered here, or the client left.
    Done,
}

pub struct FrontDoor {
    registry: Arc<ArcSwap<Registry>>,
    metrics: Arc<Metrics>,
    admitted: Arc<AdmittedRequests>,
}

/// The parts of a request head the front door decides on.
struct Head {
    length: usize,
    host: Option<String>,
    path: String,
    content_length: Option<usize>,
    chunked: bool,
    expect_continue: bool,
}

impl FrontDoor {
    pub fn new(registry: Arc<ArcSwap<Registry>>, metrics: Arc<Metrics>, admitted: Arc<AdmittedRequests>) -> Self {
        FrontDoor { registry, metrics, admitted }
    }

    /// Reads the first request head and holds the request while its service is cold.
    pub async fn first_request<S: AsyncRead + AsyncWrite + Unpin>(&self, stream: &mut S, client: SocketAddr) -> Outcome {
        let arrived = Instant::now();
        let mut buffer = BytesMut::with_capacity(1024);
        let head = loop {
            match tokio::time::timeout(HEAD_TIMEOUT, stream.read_buf(&mut buffer)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) if buffer.is_empty() => return Outcome::Done,
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Outcome::Forward(buffer),
                Ok(Ok(_)) => {}
            }
            if buffer.starts_with(H2_PREFACE) || (buffer.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(&buffer)) {
                if buffer.len() >= H2_PREFACE.len() {
                    return Outcome::Http2(buffer);
                }
                continue;
            }
            match parse_head(&buffer) {
                Ok(Some(head)) => break head,
                Ok(None) if buffer.len() < MAX_HEAD => continue,
                // Too large or malformed: pingora answers it with its own error.
                _ => return Outcome::Forward(buffer),
            }
        };
        if head.expect_continue {
            return Outcome::Forward(buffer);
        }

        let registry = self.registry.load();
        let Some(host) = head.host.as_deref() else { return Outcome::Forward(buffer) };
        if registry.openai_prefix_limit(host).is_some() {
            return Outcome::Forward(buffer);
        }
        let Some(service) = registry.route(host, &head.path) else { return Outcome::Forward(buffer) };
        drop(registry);

        let waiter = match service.admit() {
            Admission::Ready(lease) => {
                self.admitted.put(client, Admitted { lease, arrived });
                return Outcome::Forward(buffer);
            }
            Admission::Rejected(error) => {
                let reason = if error == AdmitError::QueueFull { "queue_full" } else { "global_limit" };
                self.metrics.queue_rejections.with_label_values(&[&service.name, reason]).inc();
                let retry_after = service.retry_after(Duration::ZERO);
                let rejection = Rejection::Admit { service: service.name.clone(), error, retry_after };
                self.reject(stream, &service.name, rejection).await;
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
            Some(Ok(lease)) => {
                self.admitted.put(client, Admitted { lease, arrived });
                Outcome::Forward(buffer)
            }
            Some(Err(error)) => {
                let retry_after = service.retry_after(arrived.elapsed());
                let rejection = Rejection::Admit { service: service.name.clone(), error, retry_after };
                self.reject(stream, &service.name, rejection).await;
                Outcome::Done
            }
            None => {
                debug!(service = %service.name, "client went away while held");
                Outcome::Done
            }
        }
    }

    /// Answers a rejected request and closes the connection.
    async fn reject<S: AsyncWrite + Unpin>(&self, stream: &mut S, service: &str, rejection: Rejection) {
        let (status, retry_after, body) = error_response(&rejection);
        let body = serde_json::to_vec(&body).expect("a JSON value always serialises");
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
        self.metrics.requests.with_label_values(&[service, &status.to_string()]).inc();
        let message = serde_json::from_slice::<serde_json::Value>(&body).ok();
        let code = message.as_ref().and_then(|m| m["error"]["code"].as_str().map(str::to_owned)).unwrap_or_default();
        info!(status, service, code = %code, "request answered by coldgate");
    }
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
    // The whole body is here: a read returns only at end of stream, or with bytes of a
    // pipelined next request, which pingora parses after the hand-over.
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
    let target = request.path.ok_or(())?;
    let mut host = None;
    let mut content_length = None;
    let mut chunked = false;
    let mut expect_continue = false;
    for header in request.headers.iter() {
        let value = std::str::from_utf8(header.value).map_err(|_| ())?;
        match header.name.to_ascii_lowercase().as_str() {
            "host" => host = normalize_host(value),
            "content-length" => content_length = Some(value.trim().parse::<usize>().map_err(|_| ())?),
            "transfer-encoding" => chunked = true,
            "expect" => expect_continue = value.trim().eq_ignore_ascii_case("100-continue"),
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
    Ok(Some(Head { length, host, path, content_length, chunked, expect_continue }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_parsing() {
        let head = parse_head(b"POST /v2/infer?x=1 HTTP/1.1\r\nHost: Iris.Local:8080\r\nContent-Length: 12\r\n\r\n{\"a\"").unwrap().unwrap();
        assert_eq!(head.host.as_deref(), Some("iris.local"));
        assert_eq!(head.path, "/v2/infer");
        assert_eq!(head.content_length, Some(12));
        assert_eq!(head.length, 74, "the head ends after the blank line");
        assert!(!head.chunked);

        let absolute = parse_head(b"GET http://a.local/x HTTP/1.1\r\nHost: b.local\r\n\r\n").unwrap().unwrap();
        assert_eq!(absolute.host.as_deref(), Some("a.local"));
        assert_eq!(absolute.path, "/x");

        assert!(parse_head(b"GET / HTTP/1.1\r\nHost: a").unwrap().is_none(), "partial head");
        assert!(parse_head(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n").is_err());
        assert!(parse_head(b"\x00\x01garbage\r\n\r\n").is_err());
    }
}
