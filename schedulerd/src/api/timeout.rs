//! A deadline for every answer's head: tower-http's `TimeoutLayer`, as a
//! backstop behind the bounds each step already has (the body deadline in
//! `body.rs`, `call_timeout` and `refresh_timeout` on every worker call).
//! A handler stuck past them all (a store that hangs, say) answers
//! `504 request_timeout` instead of holding its connection forever.
//!
//! It bounds only the time until the response head: a followed log's body
//! streams for as long as the job runs, and no request timeout may cut it,
//! so the layer fits streaming routes as they are (their handlers answer
//! once the worker's stream is open). Handlers are already safe to drop
//! mid-way: a client may hang up at any time, so starts and fan-outs run
//! in tasks of their own, which a timeout does not cancel.
//!
//! Kept by hand around it: the body deadline (`body.rs`), because a late
//! body must be answered `408` and its connection closed after a lingering
//! drain, which tower-http's body timeout (an error inside the handler's
//! body read) does not do; and the connection timeouts of `serve.rs`
//! (first request, idle, unauthenticated lifetime), which are about
//! connections rather than requests.

use std::time::Duration;

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use tower::Layer;
use tower::util::MapResponse;
use tower_http::timeout::Timeout;

use super::{ApiError, AppState, body::BODY_TIMEOUT};

/// Worker and store calls one request may make in sequence, each within
/// its own deadline (a start: claim, placement, the worker's start, the
/// record; a stop: the worker's stop, then a refresh).
const CALLS_PER_REQUEST: u32 = 4;
/// The deadline is never shorter than this.
const MIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The answer's status when the deadline passes. Nothing else in the API
/// answers 504, so [`explain`] knows the layer's empty answer by it.
const STATUS: StatusCode = StatusCode::GATEWAY_TIMEOUT;

/// How long a request may take to get its response head.
pub(crate) fn request_timeout(call_timeout: Duration, refresh_timeout: Duration) -> Duration {
    (BODY_TIMEOUT + call_timeout.max(refresh_timeout) * CALLS_PER_REQUEST).max(MIN_REQUEST_TIMEOUT)
}

/// The layer: tower-http's timeout, its empty answer given the API's error
/// body.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RequestTimeout(Duration);

impl RequestTimeout {
    pub(crate) fn new(state: &AppState) -> Self {
        RequestTimeout(request_timeout(state.call_timeout, state.refresh_timeout))
    }
}

impl<S> Layer<S> for RequestTimeout {
    type Service = MapResponse<Timeout<S>, fn(Response) -> Response>;

    fn layer(&self, inner: S) -> Self::Service {
        let explain: fn(Response) -> Response = explain;
        MapResponse::new(Timeout::with_status_code(inner, STATUS, self.0), explain)
    }
}

/// Gives the timeout's empty answer the API's `{"error", "code"}` body.
fn explain(response: Response) -> Response {
    if response.status() != STATUS || response.headers().contains_key(header::CONTENT_TYPE) {
        return response;
    }
    tracing::warn!("a request got no answer within its deadline; answered 504");
    ApiError::new(
        STATUS,
        "request_timeout",
        "the scheduler could not answer in time; try again (a start sent with an \
         Idempotency-Key may be sent again with it)",
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use axum::Router;
    use axum::body::Body;
    use axum::http::Request;
    use axum::routing::get;
    use tower::ServiceExt;

    use super::*;

    fn app(deadline: Duration) -> Router {
        Router::new()
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    "late"
                }),
            )
            .route(
                "/stream",
                get(|| async {
                    // The head at once, the body over ten minutes.
                    let body = futures_util::stream::unfold(0u32, |n| async move {
                        if n == 10 {
                            return None;
                        }
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        Some((Ok::<_, std::io::Error>(format!("{n}\n")), n + 1))
                    });
                    Body::from_stream(body)
                }),
            )
            .layer(RequestTimeout(deadline))
    }

    async fn get_path(app: Router, path: &str) -> (StatusCode, String) {
        let response = app
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn a_stuck_handler_answers_504_with_the_error_body_at_the_deadline() {
        let started = tokio::time::Instant::now();
        let (status, body) = get_path(app(Duration::from_secs(70)), "/slow").await;
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(started.elapsed(), Duration::from_secs(70));
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["code"], "request_timeout", "{body}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_streamed_body_outlives_the_deadline() {
        let (status, body) = get_path(app(Duration::from_secs(70)), "/stream").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body.lines().count(), 10, "{body}");
    }

    #[test]
    fn the_deadline_covers_the_body_and_every_call() {
        let s = Duration::from_secs;
        assert_eq!(request_timeout(s(10), s(1)), s(70));
        assert_eq!(request_timeout(s(1), s(1)), MIN_REQUEST_TIMEOUT);
        assert_eq!(request_timeout(s(5), s(30)), s(150));
    }
}
