//! Active readiness probing of a new instance.
//!
//! An open port is not a ready model server: KServe, Triton and vLLM all accept connections
//! long before the model is loaded. coldgate therefore sends `GET readiness_path` to each
//! new address and releases held requests only after a 2xx answer. The probe speaks
//! minimal HTTP/1.1 over a fresh connection each time, so a half-started server cannot
//! leave a pooled connection in a bad state.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tracing::trace;

/// How a probe talks to the instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    /// `GET path` over HTTP/1.1; 2xx is ready.
    Http1,
    /// `GET path` over HTTP/2 with prior knowledge, for h2c-only servers; 2xx is ready.
    H2c,
    /// `grpc.health.v1.Health/Check` for the whole server over h2c; SERVING is ready.
    Grpc,
}

/// What to probe and how often.
#[derive(Debug, Clone)]
pub struct ProbePlan {
    pub addr: SocketAddr,
    pub kind: ProbeKind,
    pub path: String,
    /// Time from the start of one probe to the start of the next. Small, because it bounds
    /// how late held requests are released after the instance turns ready.
    pub interval: Duration,
    /// Time allowed for one probe, from connect to the status line.
    pub timeout: Duration,
}

/// Shortest pause between two probes when `wake` fires.
const MIN_PROBE_GAP: Duration = Duration::from_millis(1);

/// Probes until the instance is ready. It never gives up by itself: the caller races it
/// against the instance's exit and the start-up timeout. After a failed probe it waits
/// `plan.interval`, or less when `wake` is notified (the instance wrote output, which model
/// servers do when they finish loading). At most one probe per interval comes early, so
/// a server that logs a line for every probe cannot make the probes run back to back.
/// `last_failure` gets a short description of the latest failed probe, for the error that
/// a timed-out start reports.
pub async fn wait_until_ready(plan: &ProbePlan, wake: &Notify, last_failure: impl Fn(String)) {
    let mut attempts: u64 = 0;
    let mut last_early: Option<tokio::time::Instant> = None;
    loop {
        attempts += 1;
        let started = tokio::time::Instant::now();
        let failure = match tokio::time::timeout(plan.timeout, probe_ready(plan)).await {
            Ok(Ok(Ok(()))) => return,
            Ok(Ok(Err(status))) => format!("the last readiness probe of {} got status {status}", plan.addr),
            Ok(Err(error)) => format!("the last readiness probe of {} failed: {error}", plan.addr),
            Err(_) => format!("the last readiness probe of {} timed out after {:?}", plan.addr, plan.timeout),
        };
        trace!(addr = %plan.addr, attempts, failure = %failure, "not ready yet");
        last_failure(failure);
        let next = tokio::time::sleep_until(started + plan.interval);
        tokio::pin!(next);
        loop {
            tokio::select! {
                () = &mut next => break,
                () = wake.notified() => {
                    let now = tokio::time::Instant::now();
                    if last_early.is_none_or(|early| now - early >= plan.interval) {
                        last_early = Some(now);
                        tokio::time::sleep_until(started + MIN_PROBE_GAP).await;
                        break;
                    }
                }
            }
        }
    }
}

/// Runs one probe of the plan's kind: `Ok(Ok(()))` when ready, `Ok(Err(status))` with
/// the status seen when not (503 for a gRPC server that is not SERVING).
async fn probe_ready(plan: &ProbePlan) -> std::io::Result<Result<(), u16>> {
    let ready_status = |status: u16| if (200..300).contains(&status) { Ok(()) } else { Err(status) };
    match plan.kind {
        ProbeKind::Http1 => probe_once(plan).await.map(ready_status),
        ProbeKind::H2c => probe_h2c(plan).await.map(ready_status),
        ProbeKind::Grpc => probe_grpc_health(plan).await.map(|serving| if serving { Ok(()) } else { Err(503) }),
    }
}

/// Opens a fresh HTTP/2 connection with prior knowledge.
async fn h2c_sender(addr: SocketAddr) -> std::io::Result<hyper::client::conn::http2::SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(connection);
    Ok(sender)
}

/// Sends one `GET` over h2c and returns the response status code.
pub async fn probe_h2c(plan: &ProbePlan) -> std::io::Result<u16> {
    let mut sender = h2c_sender(plan.addr).await?;
    let request = http::Request::get(format!("http://{}{}", plan.addr, plan.path))
        .header(http::header::USER_AGENT, "coldgate-probe")
        .body(Full::new(Bytes::new()))
        .map_err(std::io::Error::other)?;
    let response = sender.send_request(request).await.map_err(std::io::Error::other)?;
    Ok(response.status().as_u16())
}

/// Runs the standard gRPC health check for the whole server (empty service name) and
/// returns whether the server reported SERVING.
pub async fn probe_grpc_health(plan: &ProbePlan) -> std::io::Result<bool> {
    let mut sender = h2c_sender(plan.addr).await?;
    // A gRPC message is a 5-byte prefix (not compressed, length 0) and the protobuf of
    // HealthCheckRequest { service: "" }, which encodes to nothing.
    let request = http::Request::post(format!("http://{}/grpc.health.v1.Health/Check", plan.addr))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .header(http::header::USER_AGENT, "coldgate-probe")
        .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
        .map_err(std::io::Error::other)?;
    let response = sender.send_request(request).await.map_err(std::io::Error::other)?;
    if response.status() != http::StatusCode::OK || grpc_status(response.headers()).is_some_and(|s| s != "0") {
        return Ok(false);
    }
    let collected = response.into_body().collect().await.map_err(std::io::Error::other)?;
    let trailers_ok = collected.trailers().is_some_and(|t| grpc_status(t) == Some("0"));
    Ok(trailers_ok && health_says_serving(&collected.to_bytes()))
}

fn grpc_status(headers: &http::HeaderMap) -> Option<&str> {
    headers.get("grpc-status").and_then(|v| v.to_str().ok())
}

/// Reads HealthCheckResponse from one gRPC message: field 1 (`status`, varint) must be 1,
/// SERVING.
fn health_says_serving(message: &[u8]) -> bool {
    let Some(payload) = message.get(5..) else { return false };
    let mut index = 0;
    while index + 1 < payload.len() {
        let (tag, value) = (payload[index], payload[index + 1]);
        if tag == 0x08 {
            return value == 1;
        }
        index += 2;
    }
    false
}

/// Sends one `GET` and returns the response status code.
pub async fn probe_once(plan: &ProbePlan) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect(plan.addr).await?;
    stream.set_nodelay(true)?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: coldgate-probe\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        plan.path, plan.addr
    );
    stream.write_all(request.as_bytes()).await?;

    // The status line fits in the first read for any real server; read until it is whole.
    let mut head = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !head.contains(&b'\n') {
        let read = stream.read(&mut chunk).await?;
        if read == 0 || head.len() > 4096 {
            break;
        }
        head.extend_from_slice(&chunk[..read]);
    }
    parse_status_line(&head).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, "the readiness probe got no valid HTTP status line")
    })
}

fn parse_status_line(head: &[u8]) -> Option<u16> {
    let line = head.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_response_parsing() {
        assert!(health_says_serving(&[0, 0, 0, 0, 2, 0x08, 0x01]));
        assert!(!health_says_serving(&[0, 0, 0, 0, 2, 0x08, 0x02]), "NOT_SERVING");
        assert!(!health_says_serving(&[0, 0, 0, 0, 0]), "UNKNOWN is the default of an empty message");
        assert!(!health_says_serving(&[]));
    }

    #[test]
    fn status_line_parsing() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(parse_status_line(b"HTTP/1.0 503 Service Unavailable\r\nx: y"), Some(503));
        assert_eq!(parse_status_line(b"garbage\r\n"), None);
        assert_eq!(parse_status_line(b""), None);
    }

    #[tokio::test]
    async fn probe_reads_status_from_real_socket() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = socket.read(&mut buf).await.unwrap();
            socket.write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n").await.unwrap();
        });
        let plan = ProbePlan {
            addr,
            kind: ProbeKind::Http1,
            path: "/ready".into(),
            interval: Duration::from_millis(5),
            timeout: Duration::from_secs(1),
        };
        assert_eq!(probe_once(&plan).await.unwrap(), 503);
    }

    /// Serves `statuses` in order, one per connection, then 200 for every later one.
    async fn status_server(statuses: Vec<u16>) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut statuses = statuses.into_iter();
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                let status = statuses.next().unwrap_or(200);
                let mut buf = [0u8; 1024];
                let _ = socket.read(&mut buf).await.unwrap();
                let response = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n");
                socket.write_all(response.as_bytes()).await.unwrap();
            }
        });
        addr
    }

    fn slow_plan(addr: SocketAddr) -> ProbePlan {
        ProbePlan { addr, kind: ProbeKind::Http1, path: "/ready".into(), interval: Duration::from_secs(30), timeout: Duration::from_secs(1) }
    }

    #[tokio::test]
    async fn wake_probes_before_the_interval() {
        let plan = slow_plan(status_server(vec![503]).await);
        let wake = Notify::new();
        let started = std::time::Instant::now();
        let waiting = wait_until_ready(&plan, &wake, |_| wake.notify_one());
        tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("the wake makes the second probe run at once");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn one_early_probe_per_interval() {
        // Every failed probe wakes the next one, as a server that logs each probe would.
        let plan = slow_plan(status_server(vec![503, 503]).await);
        let wake = Notify::new();
        let waiting = wait_until_ready(&plan, &wake, |_| wake.notify_one());
        let result = tokio::time::timeout(Duration::from_millis(500), waiting).await;
        assert!(result.is_err(), "the third probe must wait for the 30 s interval, not for another wake");
    }
}
