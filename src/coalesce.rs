//! Sending a response head together with the start of its body.
//!
//! pingora 0.9 writes an HTTP/1 response head and each body chunk with separate writes. Its
//! own listeners give each connection a small write buffer that joins them, but coldgate
//! accepts connections itself and pingora offers no public way to add that buffer. Without
//! it, a small response costs two `send` calls and wakes the client twice. Joining them
//! raised one thread's throughput by about 10 % in the warm benchmark (BENCHMARKS.md).
//!
//! [`CoalescingStream`] keeps a response head back until the first body bytes are written,
//! then sends both in one write. It only does so for heads with `Content-Length`, so
//! streamed responses (chunked, such as SSE, or ended by closing) still send their head at
//! once. A flush, which pingora issues when a response has no body, sends a kept head too.

use std::fmt;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::tls::SslDigest;
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream, TimingDigest, UniqueID,
    UniqueIDType, ALPN,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Largest response head that is kept back; pingora writes a head with one write.
const MAX_KEPT_HEAD: usize = 4096;

/// A client stream that joins each `Content-Length` response head with the first body write.
pub struct CoalescingStream {
    inner: Stream,
    /// A response head accepted from the writer but not sent yet.
    head: Vec<u8>,
}

impl CoalescingStream {
    pub fn new(inner: Stream) -> Self {
        CoalescingStream { inner, head: Vec::new() }
    }

    /// Sends the kept head, if any, until it is gone or the socket is full.
    fn poll_send_head(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while !self.head.is_empty() {
            let written = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.head))?;
            if written == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.head.drain(..written);
        }
        Poll::Ready(Ok(()))
    }
}

/// Returns true for a complete HTTP/1 response head, not 1xx, that declares a
/// `Content-Length` and no `Transfer-Encoding`: a body that is not a stream of events.
// NOTE: when an instance sends such a head well before its body, the client gets the head
// only with the first body bytes.
fn is_fixed_length_head(bytes: &[u8]) -> bool {
    if bytes.len() > MAX_KEPT_HEAD || !bytes.starts_with(b"HTTP/1.") || !bytes.ends_with(b"\r\n\r\n") {
        return false;
    }
    if bytes.get(9) == Some(&b'1') {
        return false;
    }
    let mut content_length = false;
    for line in bytes.split(|&b| b == b'\n').skip(1) {
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        let name = &line[..colon];
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            return false;
        }
        content_length |= name.eq_ignore_ascii_case(b"content-length");
    }
    content_length
}

impl AsyncWrite for CoalescingStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if this.head.is_empty() {
            if is_fixed_length_head(buf) {
                this.head.extend_from_slice(buf);
                return Poll::Ready(Ok(buf.len()));
            }
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        // A head is waiting: send it with these body bytes in one vectored write.
        let head_length = this.head.len();
        let slices = [IoSlice::new(&this.head), IoSlice::new(buf)];
        let written = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, &slices))?;
        if written == 0 {
            return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
        }
        if written < head_length {
            this.head.drain(..written);
            // Part of the head left: the body bytes were not taken, so finish the head
            // first and then offer them again.
            ready!(this.poll_send_head(cx))?;
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        this.head.clear();
        if written > head_length {
            return Poll::Ready(Ok(written - head_length));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(self.poll_send_head(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(self.poll_send_head(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl AsyncRead for CoalescingStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

#[async_trait]
impl Shutdown for CoalescingStream {
    async fn shutdown(&mut self) {
        let head = std::mem::take(&mut self.head);
        if !head.is_empty() {
            let _ = self.inner.write_all(&head).await;
        }
        Shutdown::shutdown(&mut *self.inner).await;
    }
}

impl UniqueID for CoalescingStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for CoalescingStream {
    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for CoalescingStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for CoalescingStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest);
    }
}

impl GetSocketDigest for CoalescingStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest);
    }
}

#[async_trait]
impl Peek for CoalescingStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

impl fmt::Debug for CoalescingStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoalescingStream").field("inner", &self.inner).field("kept_head", &self.head.len()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_fixed_length_heads_are_kept() {
        assert!(is_fixed_length_head(b"HTTP/1.1 200 OK\r\nContent-Length: 64\r\n\r\n"));
        assert!(is_fixed_length_head(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nServer: x\r\n\r\n"));
        assert!(!is_fixed_length_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"), "chunked bodies stream");
        assert!(!is_fixed_length_head(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"), "close-delimited bodies stream");
        assert!(!is_fixed_length_head(b"HTTP/1.1 101 Switching Protocols\r\nContent-Length: 0\r\n\r\n"));
        assert!(!is_fixed_length_head(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nhello\n"), "a head with body bytes");
        assert!(!is_fixed_length_head(b"0123456789abcdef\r\n\r\n"), "body bytes");
    }
}
