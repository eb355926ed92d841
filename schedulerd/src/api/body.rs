//! Request bodies: the deadline for the whole body, and bodies nobody read
//! to the end (one over the limit, or one sent with a request refused
//! before its handler read it).
//!
//! A body must arrive within [`BODY_TIMEOUT`] of its headers: a client
//! that announces a body and sends it slowly (or not at all) would
//! otherwise hold its connection, and a handler waiting for it, forever.
//! Past the deadline the request is answered `408 body_timeout` and the
//! connection is closed once that answer is out.
//!
//! Answering while the client is still sending loses the answer: over
//! HTTP/2 the server then resets the stream (`RST_STREAM(NO_ERROR)`, which
//! RFC 9113 §8.1 lets clients ignore but curl 7.x reports as a stream error
//! with no status), and over HTTP/1.1 it closes a socket with unread bytes,
//! which the kernel turns into a TCP reset that can destroy the answer in
//! the client's receive buffer. So the rest of such a body is read and
//! discarded, up to a bound, before the answer goes out.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, Version, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;

use super::serve::ConnectionControl;
use super::{ApiError, BODY_LIMIT};

/// A request's whole body must arrive within this of its headers.
pub(crate) const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// How much of an unwanted body is read and thrown away so that the client
/// hears the answer; past it the connection (HTTP/1.1) or the stream
/// (HTTP/2) is closed instead.
const DRAIN_LIMIT: u64 = 16 << 20;
/// How long a client may take to send the rest of an unwanted body.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Answers every request only after its body has been received in full
/// (within the bounds above), refuses a body announced as over the limit
/// before reading any of it, and one that is late with 408.
pub(crate) async fn answer_after_body(request: Request, next: Next) -> Response {
    // Most requests (GETs, log streams) have no body: nothing to watch.
    if http_body::Body::is_end_stream(request.body()) {
        return next.run(request).await;
    }
    let deadline = Instant::now() + BODY_TIMEOUT;
    let (parts, body) = request.into_parts();
    let control = parts.extensions.get::<ConnectionControl>().cloned();
    let http1 = parts.version <= Version::HTTP_11;
    let expects_continue = parts
        .headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let announced = http_body::Body::size_hint(&body).lower();
    let (mut response, rest) = if announced > BODY_LIMIT as u64 {
        let refusal = ApiError::payload_too_large(Some(announced)).into_response();
        (
            refusal,
            Some(Unread {
                body,
                polled: false,
            }),
        )
    } else {
        let slot = Arc::new(Mutex::new(None));
        let late = Arc::new(AtomicBool::new(false));
        let watched = Watched {
            body: Some(body),
            polled: false,
            ended: false,
            slot: slot.clone(),
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            late: late.clone(),
        };
        let response = next
            .run(Request::from_parts(parts, Body::new(watched)))
            .await;
        let rest = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        if late.load(Ordering::Acquire) {
            tracing::info!(
                timeout = ?BODY_TIMEOUT,
                "a request body did not arrive in time; closing its connection"
            );
            let mut response = ApiError::body_timeout(BODY_TIMEOUT).into_response();
            if http1 {
                // HTTP/2 has no such header; its connection ends with GOAWAY.
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            if let Some(control) = control {
                control.close();
            }
            return response;
        }
        (response, rest)
    };
    let Some(rest) = rest else {
        return response;
    };
    let drained = if http1 && expects_continue && !rest.polled {
        // The client waits for `100 Continue` before sending the body and
        // will send nothing once it reads the final answer instead.
        false
    } else {
        drain(rest.body, deadline).await
    };
    if !drained && http1 {
        // Unread bytes may follow, so the connection cannot carry another
        // request; say so rather than leave the client to find out.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Reads and discards the rest of a body; whether it ended within the
/// bounds (and before the body's `deadline`).
async fn drain(body: Body, deadline: Instant) -> bool {
    if http_body::Body::size_hint(&body).lower() > DRAIN_LIMIT {
        return false;
    }
    let read = async {
        let mut stream = body.into_data_stream();
        let mut total = 0u64;
        while let Some(chunk) = stream.next().await {
            let Ok(chunk) = chunk else {
                return false;
            };
            total += chunk.len() as u64;
            if total > DRAIN_LIMIT {
                return false;
            }
        }
        true
    };
    let until = deadline.min(Instant::now() + DRAIN_TIMEOUT);
    let drained = tokio::time::timeout_at(until, read).await.unwrap_or(false);
    if !drained {
        tracing::debug!(
            limit = DRAIN_LIMIT,
            "an unread request body was too long or too slow to drain; closing"
        );
    }
    drained
}

/// What was left of a body when its request was answered.
struct Unread {
    body: Body,
    /// Whether anyone asked for the body (for HTTP/1.1 that sends
    /// `100 Continue` to a client waiting for it).
    polled: bool,
}

/// A request body that, dropped before its end, leaves the rest in `slot`,
/// and that fails (setting `late`) if it has not ended by `deadline`.
struct Watched {
    body: Option<Body>,
    polled: bool,
    ended: bool,
    slot: Arc<Mutex<Option<Unread>>>,
    deadline: Pin<Box<Sleep>>,
    late: Arc<AtomicBool>,
}

impl http_body::Body for Watched {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        this.polled = true;
        let Some(body) = this.body.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.ended = true;
        }
        if polled.is_pending() && this.deadline.as_mut().poll(cx).is_ready() {
            this.late.store(true, Ordering::Release);
            return Poll::Ready(Some(Err(axum::Error::new(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the request body did not arrive in time",
            )))));
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body
            .as_ref()
            .is_none_or(http_body::Body::is_end_stream)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body
            .as_ref()
            .map(http_body::Body::size_hint)
            .unwrap_or_else(|| http_body::SizeHint::with_exact(0))
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if let Some(body) = self.body.take()
            && !self.ended
            && !http_body::Body::is_end_stream(&body)
        {
            *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(Unread {
                body,
                polled: self.polled,
            });
        }
    }
}
