//! The two Pingora app layers around the proxy: [`ConnectionLimits`] admits or refuses each
//! accepted connection and wraps its stream; [`RequestBoundary`] tells the wrapped stream when
//! Pingora starts reading the next request on it.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::apps::{HttpServerApp, HttpServerOptions, ReusedHttpStream, ServerApp};
use pingora_core::protocols::http::v2::server::H2Options;
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::{Stream, ALPN};
use pingora_core::server::ShutdownWatch;
use tokio::io::AsyncWriteExt;

use super::stream::{GuardedStream, OpenSlot};
use super::LimitMetrics;
use crate::config::LiveConfig;

/// How long a refused connection's `503` may take to write before the socket is just closed.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_millis(500);

const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: 84\r\nconnection: close\r\n\r\n{\"error\":\"too_many_connections\",\"message\":\"limits.max_connections are open already\"}";

/// Counts open connections, refuses those over `limits.max_connections`, and wraps the rest
/// in a [`GuardedStream`] with the limits of the config live at accept.
pub struct ConnectionLimits<A> {
    inner: Arc<A>,
    live: Arc<LiveConfig>,
    metrics: Arc<LimitMetrics>,
    open: Arc<AtomicUsize>,
}

impl<A> ConnectionLimits<A> {
    pub fn new(inner: A, live: Arc<LiveConfig>, metrics: Arc<LimitMetrics>) -> Self {
        ConnectionLimits {
            inner: Arc::new(inner),
            live,
            metrics,
            open: Arc::new(AtomicUsize::new(0)),
        }
    }
}

#[async_trait]
impl<A> ServerApp for ConnectionLimits<A>
where
    A: ServerApp + Send + Sync + 'static,
{
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let limits = self.live.snapshot().config.limits.clone();
        let Some(slot) = OpenSlot::acquire(&self.open, limits.max_connections, &self.metrics)
        else {
            self.metrics.refused.inc();
            // Best effort: the client learns why, and nothing of this connection is kept.
            let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, async {
                let _ = stream.write_all(REFUSAL).await;
                let _ = stream.flush().await;
            })
            .await;
            return None;
        };
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            // HTTP/2 frames are not HTTP/1 heads: count the connection, guard nothing.
            let _slot = slot;
            return self.inner.process_new(stream, shutdown).await;
        }
        let guarded =
            GuardedStream::new(stream, limits.per_connection(), self.metrics.clone(), slot);
        self.inner.process_new(Box::new(guarded), shutdown).await
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}

/// Marks the start of each request on a guarded connection, then lets Pingora handle it.
pub struct RequestBoundary<A> {
    inner: Arc<A>,
}

impl<A> RequestBoundary<A> {
    pub fn new(inner: A) -> Self {
        RequestBoundary {
            inner: Arc::new(inner),
        }
    }
}

#[async_trait]
impl<A> HttpServerApp for RequestBoundary<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    async fn process_new_http(
        self: &Arc<Self>,
        session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        // `**stream`: the concrete stream inside the box, not the box itself.
        if let Some(guarded) = session
            .stream()
            .and_then(|stream| (**stream).as_any().downcast_ref::<GuardedStream>())
        {
            guarded.begin_request();
        }
        self.inner.process_new_http(session, shutdown).await
    }

    fn h2_options(&self) -> Option<H2Options> {
        self.inner.h2_options()
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        self.inner.server_options()
    }

    async fn http_cleanup(&self) {
        self.inner.http_cleanup().await
    }
}

#[cfg(test)]
mod tests {
    use super::REFUSAL;

    #[test]
    fn the_refusal_declares_its_body_length() {
        let text = std::str::from_utf8(REFUSAL).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
        assert!(serde_json::from_str::<serde_json::Value>(body).is_ok());
    }
}
