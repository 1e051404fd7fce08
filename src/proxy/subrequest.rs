//! Requests outrider runs through its own proxy path as Pingora subrequests: background work a
//! stage asked for (a stale-while-revalidate refresh), and requests whose buffered body is
//! larger than Pingora's replay buffer. Both therefore get exactly the foreground's target
//! bytes, forwarding headers, request id, timeouts and metrics.

use std::any::Any;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use pingora_error::{Error, ErrorType};
use pingora_proxy::subrequest::pipe::{pipe_subrequest, InputBody, InputBodyType};
use pingora_proxy::subrequest::{BodyMode, Ctx as SubrequestCtx};
use pingora_proxy::Session;
use tokio::sync::OwnedSemaphorePermit;

use crate::config::ActiveConfig;
use crate::pipeline::{Effects, Slot};
use crate::telemetry::metrics::RouteMetrics;

/// Background work for the stage at `stage` of route `route` in `config`.
pub struct BackgroundWork {
    pub config: Arc<ActiveConfig>,
    pub route: usize,
    pub stage: usize,
    pub job: Box<dyn Any + Send + Sync>,
    pub request_id: http::HeaderValue,
    /// The upstream a stage chose for the foreground request, so the work goes there too.
    pub upstream: Option<String>,
    /// Bounds concurrent background requests across all keys; released when the work ends.
    pub permit: OwnedSemaphorePermit,
}

/// A client request already decided on by its stages, to be forwarded with its body.
pub struct Delegation {
    pub config: Arc<ActiveConfig>,
    pub route: usize,
    pub request_id: http::HeaderValue,
    pub slots: Vec<Slot>,
    pub effects: Effects,
    pub buffered_len: Option<usize>,
    pub started: Instant,
    pub metrics: Option<Arc<RouteMetrics>>,
    pub trace: Option<crate::telemetry::trace::RequestTrace>,
}

pub enum Intent {
    Background(BackgroundWork),
    Delegated(Box<Delegation>),
}

/// The intent a subrequest was started with (taken once, in its `request_filter`).
pub fn take_intent(session: &mut Session) -> Option<Intent> {
    let user = session.subrequest_ctx.as_mut()?.user_ctx_mut()?;
    let taken = std::mem::replace(user, Box::new(()));
    taken.downcast::<Intent>().ok().map(|intent| *intent)
}

/// Starts background work as a subrequest of `session`'s request; the work runs on after the
/// client's response. `false` when subrequests are unavailable (the work is dropped).
pub fn spawn_background(session: &Session, work: BackgroundWork) -> bool {
    let Some(spawner) = session.subrequest_spawner.as_ref() else {
        return false;
    };
    let ctx = SubrequestCtx::builder()
        .body_mode(BodyMode::NoBody)
        .user_ctx(Box::new(Intent::Background(work)))
        .build();
    spawner.spawn_background_subrequest(session.as_ref(), ctx);
    true
}

/// Forwards the request through a subrequest that is fed `body` and answers the client.
pub async fn delegate(
    session: &mut Session,
    delegation: Delegation,
    body: Bytes,
) -> pingora_error::Result<()> {
    let Some(spawner) = session.subrequest_spawner.as_ref() else {
        return Err(Error::explain(
            ErrorType::InternalError,
            "cannot forward a large buffered body: subrequests unavailable",
        ));
    };
    let ctx = SubrequestCtx::builder()
        .body_mode(BodyMode::ExpectBody)
        .user_ctx(Box::new(Intent::Delegated(Box::new(delegation))))
        .build();
    let (prepared, handle) = spawner.create_subrequest(session.as_ref(), ctx);
    let input = if body.is_empty() {
        InputBody::NoBody
    } else {
        InputBody::Bytes(vec![body])
    };
    let outcome = pipe_subrequest(
        session,
        prepared,
        handle,
        |task| Ok(Some(task)),
        InputBodyType::Preset(input),
    )
    .await;
    let mut state = match outcome {
        Ok(state) => state,
        Err(failure) => {
            let mut state = failure.state;
            finish_in_background(&mut state);
            if state.header_received {
                // The subrequest answered (an error of its own, already logged and counted).
                return Ok(());
            }
            return Err(failure.error);
        }
    };
    finish_in_background(&mut state);
    Ok(())
}

/// Lets the subrequest finish its own bookkeeping (logging, stores) without holding the client.
fn finish_in_background(state: &mut pingora_proxy::subrequest::pipe::PipeSubrequestState) {
    let rx = state.pipe_rx.take();
    let join = state.join_handle.take();
    if rx.is_none() && join.is_none() {
        return;
    }
    tokio::spawn(async move {
        if let Some(mut rx) = rx {
            while rx.recv().await.is_some() {}
        }
        if let Some(join) = join {
            let _ = join.await;
        }
    });
}
