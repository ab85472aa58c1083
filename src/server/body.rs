//! Request bodies, read under a size bound and an idle timeout. A body the answer does not need
//! (an early rejection) is drained before the answer goes out: a client still uploading would
//! otherwise meet a closed connection (EPIPE, reset) and never read the 4xx.

use super::routes::ApiError;
use crate::api::limits;
use axum::body::{Body, Bytes, HttpBody};
use axum::http::{header, HeaderMap};
use http_body_util::BodyExt;
use std::time::Duration;

/// The most a drain reads and discards (request bytes in all) before giving up and closing the
/// connection: the API's own body limit, so any request the API could accept is drained.
pub const DRAIN_LIMIT: u64 = limits::MAX_BULK_BODY_BYTES as u64;

pub struct ReqBody {
    body: Body,
    /// Bytes received so far, read or drained.
    received: u64,
    /// `Content-Length`, when the client sent one.
    pub declared: Option<u64>,
    /// The client waits for `100 Continue` before sending: a rejection needs no drain, as no
    /// body bytes are on the way until the server reads.
    expect_continue: bool,
    ended: bool,
    /// Timed out or broke: not worth waiting for again.
    failed: bool,
}

impl ReqBody {
    pub fn new(body: Body, headers: &HeaderMap) -> ReqBody {
        let declared = body.size_hint().exact();
        let expect_continue = headers
            .get(header::EXPECT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
        let ended = body.is_end_stream();
        ReqBody {
            body,
            received: 0,
            declared,
            expect_continue,
            ended,
            failed: false,
        }
    }

    /// The next chunk of data, or None at the end. Fails when the client sends nothing for
    /// `idle`, or when the connection breaks.
    pub async fn chunk(&mut self, idle: Duration) -> Result<Option<Bytes>, ApiError> {
        while !self.ended {
            let frame = match tokio::time::timeout(idle, self.body.frame()).await {
                Err(_) => {
                    self.failed = true;
                    return Err(ApiError::body_timeout(idle));
                }
                Ok(None) => {
                    self.ended = true;
                    break;
                }
                Ok(Some(Err(e))) => {
                    self.failed = true;
                    return Err(ApiError::body(e));
                }
                Ok(Some(Ok(frame))) => frame,
            };
            if let Ok(data) = frame.into_data() {
                self.received += data.len() as u64;
                if !data.is_empty() {
                    return Ok(Some(data));
                }
            }
        }
        Ok(None)
    }

    /// The whole body, at most `limit` bytes (more is the gateway's 413). `grow(n)` is called
    /// with the running total before each chunk is kept, to account for the memory it takes.
    pub async fn read(
        &mut self,
        limit: usize,
        idle: Duration,
        mut grow: impl FnMut(usize) -> Result<(), ApiError>,
    ) -> Result<Vec<u8>, ApiError> {
        if self.declared.is_some_and(|n| n > limit as u64) {
            return Err(ApiError::gateway_too_large());
        }
        let mut out = Vec::with_capacity(self.declared.unwrap_or(0) as usize);
        while let Some(chunk) = self.chunk(idle).await? {
            let total = out.len() + chunk.len();
            if total > limit {
                return Err(ApiError::gateway_too_large());
            }
            grow(total)?;
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    /// Reads and discards what is left, so the client can read the answer. Returns false when
    /// the connection should be closed instead: the body is over `DRAIN_LIMIT`, stalls, or
    /// breaks, or the client still waits for `100 Continue`.
    pub async fn finish(&mut self, idle: Duration) -> bool {
        if self.ended {
            return true;
        }
        if self.failed || (self.expect_continue && self.received == 0) {
            return false;
        }
        if self.declared.is_some_and(|n| n > DRAIN_LIMIT) {
            return false;
        }
        loop {
            match self.chunk(idle).await {
                Ok(None) => return true,
                Ok(Some(_)) if self.received <= DRAIN_LIMIT => {}
                _ => return false,
            }
        }
    }
}
