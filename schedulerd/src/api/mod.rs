//! The HTTPS API (SPEC §6): the original routes and `/v1`. Each handler
//! resolves the worker, calls it over its shared channel with a deadline,
//! records what changed, and answers JSON (or streams output bytes).

pub(crate) mod auth;
mod error;
mod extract;
mod jobs;
mod legacy;
pub(crate) mod tls;
mod workers;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::middleware;
use axum::routing::{get, post};

pub(crate) use error::ApiError;

use crate::registry::Registry;
use crate::store::Store;

/// Request bodies are small JSON objects; anything bigger is refused.
const BODY_LIMIT: usize = 1 << 20;

#[derive(Debug, Clone)]
pub(crate) struct AppState {
    pub(crate) registry: Arc<Registry>,
    pub(crate) store: Store,
    pub(crate) call_timeout: Duration,
    pub(crate) tokens: Arc<auth::Tokens>,
}

pub(crate) fn router(state: AppState) -> Router {
    Router::new()
        .route("/start", post(legacy::start))
        .route("/stop", post(legacy::stop))
        .route("/query", post(legacy::query))
        .route("/stream", post(legacy::stream))
        .route("/v1/workers", get(workers::list))
        .route("/v1/workers/{id}", get(workers::show))
        .route("/v1/jobs", post(jobs::create).get(jobs::list))
        .route("/v1/jobs/{id}", get(jobs::show))
        .route("/v1/jobs/{id}/stop", post(jobs::stop))
        .route("/v1/jobs/{id}/logs", get(jobs::logs))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
}

/// Runs a worker call with the configured deadline.
pub(crate) async fn with_deadline<T>(
    timeout: Duration,
    call: impl Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result,
        Err(_) => Err(tonic::Status::deadline_exceeded("deadline exceeded")),
    }
}
