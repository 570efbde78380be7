//! Active readiness probing of a new instance.
//!
//! An open port is not a ready model server: KServe, Triton and vLLM all accept connections
//! long before the model is loaded. coldgate therefore sends `GET readiness_path` to each
//! new address and releases held requests only after a 2xx answer. The probe speaks
//! minimal HTTP/1.1 over a fresh connection each time, so a half-started server cannot
//! leave a pooled connection in a bad state.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::trace;

/// What to probe and how often.
#[derive(Debug, Clone)]
pub struct ProbePlan {
    pub addr: SocketAddr,
    pub path: String,
    /// Pause between two probes. Small, because it bounds how late held requests are
    /// released after the instance turns ready.
    pub interval: Duration,
    /// Time allowed for one probe, from connect to the status line.
    pub timeout: Duration,
}

/// Probes until the instance answers 2xx. It never gives up by itself: the caller races it
/// against the instance's exit and the start-up timeout.
pub async fn wait_until_ready(plan: &ProbePlan) {
    let mut attempts: u64 = 0;
    loop {
        attempts += 1;
        match tokio::time::timeout(plan.timeout, probe_once(plan)).await {
            Ok(Ok(status)) if (200..300).contains(&status) => return,
            Ok(Ok(status)) => trace!(addr = %plan.addr, status, attempts, "not ready yet"),
            Ok(Err(error)) => trace!(addr = %plan.addr, %error, attempts, "probe failed"),
            Err(_) => trace!(addr = %plan.addr, attempts, "probe timed out"),
        }
        tokio::time::sleep(plan.interval).await;
    }
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
            path: "/ready".into(),
            interval: Duration::from_millis(5),
            timeout: Duration::from_secs(1),
        };
        assert_eq!(probe_once(&plan).await.unwrap(), 503);
    }
}
