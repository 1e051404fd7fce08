//! Reading a whole request body for stages that decide on it, bounded by the route's
//! `max_body`, and forwarding it byte-exact afterwards.
//!
//! Pingora replays a body read in `request_filter` to the upstream by itself only up to its
//! retry buffer (64 KiB); past that it would send the header and no body. Such requests are
//! therefore handed, with their buffered body and the stages' state, to a subrequest that runs
//! the same proxy path (see `proxy::subrequest`).

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use pingora_proxy::Session;

use crate::store::{InflightBudget, Reservation};

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body larger than this route's max_body ({limit} bytes)")]
    TooLarge { limit: usize },
    #[error("reading the request body failed: {0}")]
    Read(Box<pingora_error::Error>),
    /// All requests together hold `limits.max_buffered_bodies` already.
    #[error("request bodies held by outrider are at limits.max_buffered_bodies; retry later")]
    OverBudget,
}

/// Reads the whole body, or refuses it as soon as it is known to exceed `limit` (from
/// `Content-Length` before reading anything, else while reading a chunked body) or to not fit
/// in the process-wide `budget`. The reservation holds the body's bytes in the budget.
pub async fn read_bounded(
    session: &mut Session,
    limit: usize,
    budget: &Arc<InflightBudget>,
) -> Result<(Bytes, Reservation), BodyError> {
    let declared = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(BodyError::TooLarge { limit });
    }
    // Within `limit`, so it fits in usize. A body that cannot fit now is refused before a byte
    // is read; the bytes are taken as they arrive, so a slow sender holds only what it sent.
    let declared_len = declared.map_or(0, |l| l as usize);
    if !budget.has_room_for(declared_len) {
        return Err(BodyError::OverBudget);
    }
    let mut reservation = budget.reserve(0).ok_or(BodyError::OverBudget)?;
    // A client that asked to be told to go on sends nothing until it is (Pingora does not
    // answer `Expect` by itself); the upstream gets the body without the expectation.
    let expects_continue = session
        .req_header()
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue {
        session
            .as_mut()
            .write_continue_response()
            .await
            .map_err(BodyError::Read)?;
    }
    // Pingora keeps a copy of what is read here and replays it to the upstream when it fits.
    session.as_mut().enable_retry_buffering();
    // Grown as bytes arrive rather than allocated up front from a length anyone can claim.
    let mut body = BytesMut::with_capacity(declared_len.min(64 * 1024));
    while let Some(chunk) = session.read_request_body().await.map_err(BodyError::Read)? {
        if body.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge { limit });
        }
        let beyond = (body.len() + chunk.len()).saturating_sub(reservation.bytes());
        if beyond > 0 && !reservation.grow(beyond) {
            return Err(BodyError::OverBudget);
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body.freeze(), reservation))
}

/// What to send upstream for one piece of the client's body when a stage replaced the body:
/// nothing until the client's body ends, then the replacement. Pingora skips empty pieces.
pub fn substitute(piece: &mut Option<Bytes>, end_of_stream: bool, replacement: &Bytes) {
    *piece = if end_of_stream {
        Some(replacement.clone())
    } else {
        Some(Bytes::new())
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replacement_goes_out_once_at_the_end() {
        let replacement = Bytes::from_static(b"{\"query\":\"{ a }\"}");
        let mut sent = Vec::new();
        for (piece, end) in [(b"one".as_slice(), false), (b"two", false), (b"", true)] {
            let mut p = Some(Bytes::copy_from_slice(piece));
            substitute(&mut p, end, &replacement);
            sent.extend_from_slice(&p.unwrap_or_default());
        }
        assert_eq!(sent, replacement);
    }
}
