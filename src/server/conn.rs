//! Connections: the accept loop, HTTP/1.1 and HTTP/2 (prior knowledge) through hyper, the
//! header and idle timeouts, the envelope on hyper's own protocol errors, and a graceful
//! shutdown cut short after a grace period.

use super::routes::{self, ApiError, AppState};
use axum::body::{Body, Bytes, HttpBody};
use axum::http::{Request, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// From the first byte of a request to its last header.
    pub header: Duration,
    /// A connection with no request in progress and no byte received.
    pub idle: Duration,
    /// How long a graceful shutdown waits for in-flight requests.
    pub grace: Duration,
}

/// Serves until `stop` fires, then shuts down gracefully: no new connection, idle ones closed,
/// in-flight requests given `grace` to finish; whatever is left then is dropped.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    t: Timeouts,
    mut stop: oneshot::Receiver<()>,
) {
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    let (closing, closing_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    conns.spawn(connection(
                        stream,
                        builder.clone(),
                        state.clone(),
                        t,
                        closing_rx.clone(),
                    ));
                }
                // Out of file descriptors and the like: wait a little rather than spin.
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    let _ = closing.send(true);
    let drained = tokio::time::timeout(t.grace, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            "{} connection(s) still open after the {} ms grace period: closing them",
            conns.len(),
            t.grace.as_millis()
        );
        conns.shutdown().await;
    }
}

async fn connection(
    stream: TcpStream,
    builder: Arc<auto::Builder<TokioExecutor>>,
    state: Arc<AppState>,
    t: Timeouts,
    mut closing: watch::Receiver<bool>,
) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        inner: stream,
        activity: activity.clone(),
        pending: Vec::new(),
        linger: 0,
    });
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let busy = activity.begin();
            let state = state.clone();
            async move {
                let resp = routes::handle(state, req.map(Body::new)).await;
                // The request counts as in progress until its answer is sent.
                Ok::<_, Infallible>(resp.map(|inner| Body::new(Tracked { inner, _busy: busy })))
            }
        })
    };
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let expired = activity.expired(t);
    tokio::pin!(expired);
    let mut shutting_down = false;
    loop {
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!("connection ended: {e}");
                }
                return;
            }
            why = &mut expired => {
                tracing::debug!("closing connection: {why}");
                return;
            }
            _ = closing.changed(), if !shutting_down => {
                shutting_down = true;
                // Nothing in progress and no request on its way: close now (for HTTP/2 too,
                // where hyper would wait for the client to act on its GOAWAY).
                if activity.quiet() {
                    return;
                }
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// What a connection is doing, for the header and idle timeouts.
struct Activity(Mutex<ActivityState>);

struct ActivityState {
    /// Requests being handled or answered.
    busy: usize,
    /// Since when nothing has been in progress.
    idle_since: Instant,
    /// The first byte received while nothing was in progress: a request head on its way.
    /// HTTP/1 only: on HTTP/2, bytes between requests are control frames (PING, SETTINGS).
    head_since: Option<Instant>,
    /// The first 4 bytes of the connection, to tell HTTP/2's preface (`PRI `) from HTTP/1.
    opening: Vec<u8>,
}

impl Activity {
    fn new() -> Activity {
        Activity(Mutex::new(ActivityState {
            busy: 0,
            idle_since: Instant::now(),
            head_since: None,
            opening: Vec::with_capacity(4),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn received(&self, bytes: &[u8]) {
        let mut s = self.lock();
        if s.opening.len() < 4 {
            let n = bytes.len().min(4 - s.opening.len());
            s.opening.extend_from_slice(&bytes[..n]);
        }
        let http2 = s.opening.as_slice() == b"PRI ";
        if s.busy == 0 && s.head_since.is_none() && !http2 {
            s.head_since = Some(Instant::now());
        }
    }

    /// No request in progress and none begun.
    fn quiet(&self) -> bool {
        let s = self.lock();
        s.busy == 0 && s.head_since.is_none()
    }

    fn begin(self: &Arc<Self>) -> Busy {
        let mut s = self.lock();
        s.busy += 1;
        s.head_since = None;
        Busy(self.clone())
    }

    /// Resolves when the connection has waited too long for a request head, or sat idle.
    async fn expired(&self, t: Timeouts) -> &'static str {
        let tick =
            (t.header.min(t.idle) / 8).clamp(Duration::from_millis(5), Duration::from_secs(1));
        loop {
            tokio::time::sleep(tick).await;
            let s = self.lock();
            if s.busy > 0 {
                continue;
            }
            match s.head_since {
                Some(at) if at.elapsed() > t.header => return "request head timeout",
                None if s.idle_since.elapsed() > t.idle => return "idle timeout",
                _ => {}
            }
        }
    }
}

/// One request in progress, from its head to the end of its answer.
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.busy -= 1;
        if s.busy == 0 {
            s.idle_since = Instant::now();
            s.head_since = None;
        }
    }
}

/// A response body that keeps its request counted as busy until it is sent (or dropped).
struct Tracked {
    inner: Body,
    _busy: Busy,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The socket, watched: bytes received feed the timeouts, and hyper's own answer to a request
/// it cannot parse (400, 414, 431 with an empty body) is replaced by the envelope.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
    /// The envelope answer still to be written in place of hyper's.
    pending: Vec<u8>,
    /// After that answer: request bytes still to read and discard before closing, so that the
    /// close is not a reset that destroys the answer before the client reads it.
    linger: usize,
}

/// What is read and discarded after answering a request hyper could not parse.
const LINGER_BYTES: usize = 4 << 20;

impl Watched {
    /// Writes what is pending; Ready once nothing is.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            let n = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pending.drain(..n);
        }
        Poll::Ready(Ok(()))
    }

    /// Takes `buf` in place of hyper's automatic error answer, if it is one.
    fn replace(&mut self, buf: &[u8]) -> bool {
        match protocol_error(buf) {
            Some(status) => {
                self.pending = envelope_bytes(status);
                self.linger = LINGER_BYTES;
                true
            }
            None => false,
        }
    }
}

/// The status of hyper's automatic answer to an unparsable request: `HTTP/1.1 400|414|431`
/// with `content-length: 0`. Handlers never answer these statuses without a body.
fn protocol_error(buf: &[u8]) -> Option<StatusCode> {
    let status = match buf.get(..13)? {
        b"HTTP/1.1 400 " => StatusCode::BAD_REQUEST,
        b"HTTP/1.1 414 " => StatusCode::URI_TOO_LONG,
        b"HTTP/1.1 431 " => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        _ => return None,
    };
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = &buf[..end + 2];
    let empty = head
        .windows(19)
        .any(|w| w.eq_ignore_ascii_case(b"\r\ncontent-length: 0"));
    (empty && end + 4 == buf.len()).then_some(status)
}

/// A whole HTTP/1.1 response carrying the envelope for `status`; the connection then closes.
fn envelope_bytes(status: StatusCode) -> Vec<u8> {
    let body = ApiError::protocol(status).envelope_json();
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.received(&buf.filled()[before..]);
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.poll_pending(cx))?;
        if self.replace(buf) {
            // hyper's bytes count as written; ours go out on this call or on the flush.
            let _ = self.poll_pending(cx)?;
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.poll_pending(cx))?;
        // hyper's automatic answer is a head alone, in one buffer.
        if let [only] = bufs {
            if self.replace(only) {
                let _ = self.poll_pending(cx)?;
                return Poll::Ready(Ok(only.len()));
            }
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_pending(cx))?;
        std::task::ready!(Pin::new(&mut self.inner).poll_shutdown(cx))?;
        // Our answer and FIN are out; read until the client closes (bounded in bytes here, and
        // in time by the header timeout).
        let mut scratch = [0u8; 16 << 10];
        while self.linger > 0 {
            let mut buf = ReadBuf::new(&mut scratch);
            match std::task::ready!(Pin::new(&mut self.inner).poll_read(cx, &mut buf)) {
                Ok(()) if !buf.filled().is_empty() => {
                    self.linger = self.linger.saturating_sub(buf.filled().len());
                }
                _ => self.linger = 0,
            }
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hyper_automatic_answers_are_replaced() {
        let auto = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Thu, 26 Nov 2026 07:50:03 GMT\r\n\r\n";
        assert_eq!(
            protocol_error(auto),
            Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        );
        let bad = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(protocol_error(bad), Some(StatusCode::BAD_REQUEST));
        // A handler's 400 or 414 always carries its envelope.
        let handler = b"HTTP/1.1 414 URI Too Long\r\ncontent-type: application/json\r\ncontent-length: 105\r\n\r\n";
        assert_eq!(protocol_error(handler), None);
        let with_body = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n{}";
        assert_eq!(protocol_error(with_body), None);
        assert_eq!(
            protocol_error(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"),
            None
        );
        let env = envelope_bytes(StatusCode::URI_TOO_LONG);
        let text = String::from_utf8(env).unwrap();
        assert!(text.starts_with("HTTP/1.1 414 URI Too Long\r\n"), "{text}");
        assert!(
            text.ends_with(
                r#""errors":[{"code":6003,"message":"Request URI too long"}],"messages":[]}"#
            ),
            "{text}"
        );
    }
}
