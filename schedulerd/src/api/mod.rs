//! The HTTPS API (SPEC §6): the original routes and `/v1`. Each handler
//! resolves the worker, calls it over its shared channel with a deadline,
//! records what changed, and answers JSON (or streams output bytes).

mod error;
mod extract;
mod jobs;
mod legacy;
pub(crate) mod tls;
mod workers;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use jobcluster_pki::Role;

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
        .layer(middleware::from_fn(require_client))
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

/// The API is for `client` certificates; the TLS layer has already checked
/// that the certificate chains to the cluster CA.
async fn require_client(
    ConnectInfo(peer): ConnectInfo<tls::PeerInfo>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    match &peer.identity {
        Some(id) if id.role == Role::Client => Ok(next.run(request).await),
        Some(id) => {
            tracing::warn!(peer = %id.name, role = %id.role, addr = %peer.addr, "refused an API caller without the client role");
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "{} certificates may not use the API; use a client certificate",
                    id.role
                ),
            ))
        }
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "a client certificate from the cluster CA is required",
        )),
    }
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
