//! The accepted client stream, wrapped to enforce the head timeout, the keep-alive idle timeout
//! and the head size cap while Pingora reads a request head through it.
//!
//! The wrapper knows where a head ends by watching for its blank line; where the next one begins
//! it is told by [`super::RequestBoundary`] just before Pingora reads it. That is exact because
//! outrider never enables Pingora's HTTP/1.1 pipelining: without it Pingora does not reuse a
//! connection that has bytes past a request, so every head is read through this stream.
//! Between a head's end and the next request, it passes reads and writes through untouched.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::tls::{SslDigest, TlsRef};
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::{CloseReason, ConnLimits, LimitMetrics};

/// How long a refused client gets to read our answer while we discard what it still sends;
/// closing a socket with unread input resets it, and the client would never see the answer.
const LINGER: Duration = Duration::from_secs(2);
/// The most bytes discarded while lingering after a refused head.
const LINGER_BYTES: usize = 1 << 20;
/// The most bytes discarded while lingering after an answered request: enough for the rest of
/// an upload refused with 413 from its `Content-Length` to be read and dropped.
const LINGER_BODY_BYTES: usize = 16 << 20;

/// One open connection in the shared count; leaving it (the stream is dropped) frees the slot.
pub struct OpenSlot {
    open: Arc<AtomicUsize>,
    metrics: Arc<LimitMetrics>,
}

impl OpenSlot {
    /// Takes a slot unless `max` (0: no limit) are taken already.
    pub fn acquire(
        open: &Arc<AtomicUsize>,
        max: usize,
        metrics: &Arc<LimitMetrics>,
    ) -> Option<OpenSlot> {
        let before = open.fetch_add(1, Ordering::AcqRel);
        if max != 0 && before >= max {
            open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        metrics.open.inc();
        Some(OpenSlot {
            open: open.clone(),
            metrics: metrics.clone(),
        })
    }
}

impl Drop for OpenSlot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        self.metrics.open.dec();
    }
}

enum Phase {
    /// Between requests on a keep-alive connection, before the next head's first byte.
    Idle,
    /// Reading a request head; `started` once a byte of it arrived.
    Head { started: bool },
    /// The head is complete: the body and the response are Pingora's business.
    Request,
    /// Answering a violated limit, then closing.
    Refusing(Refusal),
    /// Half-closed after a request, discarding what the client still sends (see
    /// `poll_shutdown`).
    Lingering { discarded: usize },
    /// Closed by a limit without an answer: reads see the end of the stream.
    Closed,
}

struct Refusal {
    response: Bytes,
    written: usize,
    lingering: bool,
    discarded: usize,
}

/// Finds the blank line that ends a request head, across reads. Blank lines before the request
/// line are skipped, as HTTP parsers do (RFC 9112 §2.2).
#[derive(Debug, Default)]
struct HeadScan {
    line_len: usize,
    seen_content: bool,
}

impl HeadScan {
    /// Bytes of `bytes` that belong to the head, and whether the head ended within them.
    fn feed(&mut self, bytes: &[u8]) -> (usize, bool) {
        for (i, &b) in bytes.iter().enumerate() {
            match b {
                b'\n' => {
                    if self.line_len == 0 && self.seen_content {
                        *self = HeadScan::default();
                        return (i + 1, true);
                    }
                    self.line_len = 0;
                }
                b'\r' => {}
                _ => {
                    self.line_len += 1;
                    self.seen_content = true;
                }
            }
        }
        (bytes.len(), false)
    }
}

pub struct GuardedStream {
    inner: Stream,
    limits: ConnLimits,
    phase: Phase,
    head_bytes: usize,
    scan: HeadScan,
    /// The current phase's deadline (head, idle or linger).
    deadline: Pin<Box<Sleep>>,
    /// Set by [`super::RequestBoundary`] before Pingora reads each request head.
    next_request: AtomicBool,
    requests: u64,
    metrics: Arc<LimitMetrics>,
    _slot: OpenSlot,
}

impl fmt::Debug for GuardedStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuardedStream")
            .field("inner", &self.inner)
            .field("limits", &self.limits)
            .field("head_bytes", &self.head_bytes)
            .finish_non_exhaustive()
    }
}

impl GuardedStream {
    /// Wraps a just-accepted stream: the first head's timeout runs from now.
    pub fn new(
        inner: Stream,
        limits: ConnLimits,
        metrics: Arc<LimitMetrics>,
        slot: OpenSlot,
    ) -> Self {
        GuardedStream {
            inner,
            limits,
            phase: Phase::Head { started: false },
            head_bytes: 0,
            scan: HeadScan::default(),
            deadline: Box::pin(tokio::time::sleep(limits.header_timeout)),
            next_request: AtomicBool::new(false),
            requests: 0,
            metrics,
            _slot: slot,
        }
    }

    /// Pingora is about to read a request head on this connection.
    pub fn begin_request(&self) {
        self.next_request.store(true, Ordering::Release);
    }

    fn start_request(&mut self) {
        self.requests += 1;
        self.head_bytes = 0;
        self.scan = HeadScan::default();
        if self.requests > 1 {
            self.phase = Phase::Idle;
            self.reset_deadline(self.limits.keepalive_timeout);
        }
        // The first request keeps the deadline set at accept.
    }

    fn reset_deadline(&mut self, after: Duration) {
        self.deadline.as_mut().reset(Instant::now() + after);
    }

    fn refuse(&mut self, reason: CloseReason) {
        self.metrics.closed(reason);
        let (status, code, message) = match reason {
            CloseReason::HeaderTooLarge => (
                "431 Request Header Fields Too Large",
                "header_too_large",
                format!(
                    "request head larger than {} bytes",
                    self.limits.max_header_size
                ),
            ),
            CloseReason::HeaderTimeout | CloseReason::IdleTimeout => (
                "408 Request Timeout",
                "request_timeout",
                format!(
                    "request head not received within {}",
                    humantime::format_duration(self.limits.header_timeout)
                ),
            ),
        };
        let body = serde_json::json!({ "error": code, "message": message }).to_string();
        let response = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        self.phase = Phase::Refusing(Refusal {
            response: Bytes::from(response),
            written: 0,
            lingering: false,
            discarded: 0,
        });
        self.reset_deadline(LINGER);
    }

    fn close_silently(&mut self, reason: CloseReason) {
        self.metrics.closed(reason);
        self.phase = Phase::Closed;
    }

    /// Reads head bytes, never more than one past the cap, so Pingora's buffer stays bounded.
    fn poll_head_read(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let allowance = (self.limits.max_header_size + 1)
            .saturating_sub(self.head_bytes)
            .max(1);
        if buf.remaining() <= allowance {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let slice = buf.initialize_unfilled_to(allowance);
        let mut limited = ReadBuf::new(slice);
        match Pin::new(&mut self.inner).poll_read(cx, &mut limited) {
            Poll::Ready(Ok(())) => {
                let n = limited.filled().len();
                buf.advance(n);
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }

    /// Writes the refusal, half-closes, then discards input until the client closes or the
    /// linger time is over. Always ends in an error: this connection serves nothing more.
    fn poll_refusing(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Phase::Refusing(refusal) = &mut self.phase else {
            return Poll::Ready(Ok(()));
        };
        let refused = || io::Error::new(io::ErrorKind::ConnectionAborted, "closed by a limit");
        while !refusal.lingering {
            if refusal.written < refusal.response.len() {
                let rest = refusal.response.slice(refusal.written..);
                match Pin::new(&mut self.inner).poll_write(cx, &rest) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Err(refused())),
                    Poll::Ready(Ok(n)) => refusal.written += n,
                    Poll::Pending => {
                        return match self.deadline.as_mut().poll(cx) {
                            Poll::Ready(()) => Poll::Ready(Err(refused())),
                            Poll::Pending => Poll::Pending,
                        }
                    }
                }
                continue;
            }
            match Pin::new(&mut self.inner).poll_shutdown(cx) {
                Poll::Ready(Ok(())) => refusal.lingering = true,
                Poll::Ready(Err(_)) => return Poll::Ready(Err(refused())),
                Poll::Pending => {
                    return match self.deadline.as_mut().poll(cx) {
                        Poll::Ready(()) => Poll::Ready(Err(refused())),
                        Poll::Pending => Poll::Pending,
                    }
                }
            }
        }
        let mut scratch = [0u8; 4096];
        loop {
            if refusal.discarded > LINGER_BYTES || self.deadline.is_elapsed() {
                return Poll::Ready(Err(refused()));
            }
            let mut sink = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.inner).poll_read(cx, &mut sink) {
                Poll::Ready(Ok(())) if sink.filled().is_empty() => {
                    return Poll::Ready(Err(refused()))
                }
                Poll::Ready(Ok(())) => refusal.discarded += sink.filled().len(),
                Poll::Ready(Err(_)) => return Poll::Ready(Err(refused())),
                Poll::Pending => {
                    return match self.deadline.as_mut().poll(cx) {
                        Poll::Ready(()) => Poll::Ready(Err(refused())),
                        Poll::Pending => Poll::Pending,
                    }
                }
            }
        }
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.next_request.swap(false, Ordering::AcqRel) {
            this.start_request();
        }
        loop {
            match this.phase {
                Phase::Request => return Pin::new(&mut this.inner).poll_read(cx, buf),
                Phase::Closed | Phase::Lingering { .. } => return Poll::Ready(Ok(())),
                Phase::Refusing(_) => return this.poll_refusing(cx),
                Phase::Idle | Phase::Head { .. } => {}
            }
            let before = buf.filled().len();
            match this.poll_head_read(cx, buf) {
                Poll::Ready(Ok(())) => {
                    let read = buf.filled().len() - before;
                    if read == 0 {
                        return Poll::Ready(Ok(()));
                    }
                    if matches!(this.phase, Phase::Idle) {
                        // The next request's head runs on its own clock from its first byte.
                        this.reset_deadline(this.limits.header_timeout);
                    }
                    this.phase = Phase::Head { started: true };
                    let (head, complete) = this.scan.feed(&buf.filled()[before..]);
                    this.head_bytes += head;
                    if this.head_bytes > this.limits.max_header_size {
                        // Pingora never sees these bytes; the client gets 431.
                        buf.set_filled(before);
                        this.refuse(CloseReason::HeaderTooLarge);
                        continue;
                    }
                    if complete {
                        this.phase = Phase::Request;
                    }
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    if this.deadline.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    match this.phase {
                        Phase::Idle => this.close_silently(CloseReason::IdleTimeout),
                        // Nothing sent at all: nobody to answer (nginx closes silently too).
                        Phase::Head { started: false } => {
                            this.close_silently(CloseReason::HeaderTimeout)
                        }
                        _ => this.refuse(CloseReason::HeaderTimeout),
                    }
                }
            }
        }
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    /// Half-closes, then (after a request) lingers: discards what the client still sends until
    /// it closes, for at most [`LINGER`] and [`LINGER_BODY_BYTES`]. Closing a socket with unread
    /// input resets it, and the reset can destroy our last answer before the client reads it:
    /// a `413` to an upload still in flight, a shed POST. nginx's `lingering_close` does the
    /// same. The client sees the end of the stream at once; only this connection's task waits.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if matches!(this.phase, Phase::Request) {
            match Pin::new(&mut this.inner).poll_shutdown(cx) {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
            this.phase = Phase::Lingering { discarded: 0 };
            this.reset_deadline(LINGER);
        }
        let Phase::Lingering { discarded } = &mut this.phase else {
            return Pin::new(&mut this.inner).poll_shutdown(cx);
        };
        let mut scratch = [0u8; 4096];
        while *discarded <= LINGER_BODY_BYTES && !this.deadline.is_elapsed() {
            let mut sink = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut sink) {
                Poll::Ready(Ok(())) if !sink.filled().is_empty() => {
                    *discarded += sink.filled().len();
                }
                Poll::Ready(_) => break,
                Poll::Pending => match this.deadline.as_mut().poll(cx) {
                    Poll::Ready(()) => break,
                    Poll::Pending => return Poll::Pending,
                },
            }
        }
        this.phase = Phase::Closed;
        Poll::Ready(Ok(()))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for GuardedStream {
    /// The same close as `AsyncWrite::poll_shutdown`, lingering included.
    async fn shutdown(&mut self) {
        let _ = tokio::io::AsyncWriteExt::shutdown(self).await;
    }
}

impl UniqueID for GuardedStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for GuardedStream {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for GuardedStream {
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

impl GetProxyDigest for GuardedStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for GuardedStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for GuardedStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_ends_at_its_first_blank_line_across_reads() {
        let mut scan = HeadScan::default();
        assert_eq!(scan.feed(b"GET / HTTP/1.1\r\nHost: a\r"), (24, false));
        assert_eq!(scan.feed(b"\n\r"), (2, false));
        assert_eq!(scan.feed(b"\nbody"), (1, true));
        // Bare LF line ends, as parsers accept them.
        let mut scan = HeadScan::default();
        assert_eq!(scan.feed(b"GET / HTTP/1.1\nHost: a\n\nrest"), (24, true));
    }

    #[test]
    fn leading_blank_lines_do_not_end_a_head() {
        let mut scan = HeadScan::default();
        assert_eq!(scan.feed(b"\r\n\r\n\n"), (5, false));
        assert_eq!(scan.feed(b"GET / HTTP/1.1\r\n\r\n"), (18, true));
    }
}
