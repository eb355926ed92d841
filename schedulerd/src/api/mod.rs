//! The HTTPS API (SPEC §6): the original routes and `/v1`. Each handler
//! resolves the worker, calls it over its shared channel with a deadline,
//! records what changed, and answers JSON (or streams output bytes).

pub(crate) mod auth;
mod body;
pub(crate) mod dispatch;
mod error;
mod extract;
pub(crate) mod finished;
mod groups;
pub(crate) mod health;
pub(crate) mod idempotency;
pub(crate) mod jobs;
mod legacy;
pub(crate) mod openapi;
pub(crate) mod serve;
pub(crate) mod tap;
pub(crate) mod timeout;
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
use crate::store::SharedStore;

/// Request bodies are small JSON objects; anything bigger is refused.
const BODY_LIMIT: usize = 1 << 20;

#[derive(Debug, Clone)]
pub(crate) struct AppState {
    pub(crate) registry: Arc<Registry>,
    pub(crate) store: SharedStore,
    pub(crate) call_timeout: Duration,
    /// Reading a job's status waits this long for its worker.
    pub(crate) refresh_timeout: Duration,
    pub(crate) tokens: Arc<auth::Tokens>,
    pub(crate) followers: Arc<Followers>,
    /// Worker streams of output open for followers to share.
    pub(crate) taps: Arc<tap::Taps>,
    /// Plaintext mode: no identities to check.
    pub(crate) insecure: bool,
    /// Round-robin position among equally loaded workers.
    pub(crate) placement_turn: Arc<std::sync::atomic::AtomicUsize>,
    /// Idempotency keys of starts in flight.
    pub(crate) claims: Arc<idempotency::Claims>,
    pub(crate) queue: Arc<crate::queue::Queue>,
    /// What `/readyz` answers.
    pub(crate) readiness: Arc<health::Readiness>,
    /// In the leader's work: whether it may still act (always, elsewhere).
    pub(crate) acting: crate::leader::Acting,
    /// Final job records read before.
    pub(crate) finished: Arc<finished::FinishedJobs>,
}

/// Output streams open per job, bounded so one job's audience cannot take
/// every connection slot.
#[derive(Debug)]
pub(crate) struct Followers {
    max_per_job: usize,
    open: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

/// One open output stream; counted until dropped.
#[derive(Debug)]
pub(crate) struct FollowerSlot {
    followers: Arc<Followers>,
    job_id: String,
}

impl Followers {
    pub(crate) fn new(max_per_job: usize) -> Self {
        Followers {
            max_per_job,
            open: Default::default(),
        }
    }

    pub(crate) fn enter(self: &Arc<Self>, job_id: &str) -> Result<FollowerSlot, ApiError> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(job_id.to_owned()).or_default();
        if *n >= self.max_per_job {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_followers",
                format!(
                    "job {job_id} already has {} open output streams; try later",
                    self.max_per_job
                ),
            ));
        }
        *n += 1;
        crate::metrics::follower_opened();
        Ok(FollowerSlot {
            followers: self.clone(),
            job_id: job_id.to_owned(),
        })
    }
}

impl Drop for FollowerSlot {
    fn drop(&mut self) {
        crate::metrics::follower_closed();
        let mut open = self
            .followers
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.job_id) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.job_id);
            }
        }
    }
}

pub(crate) fn router(state: AppState) -> Router {
    Router::new()
        .route("/start", post(legacy::start))
        .route("/stop", post(legacy::stop))
        .route("/query", post(legacy::query))
        .route("/stream", post(legacy::stream))
        .route("/v1/workers", get(workers::list))
        .route(
            "/v1/workers/{id}",
            get(workers::show).delete(workers::remove),
        )
        .route("/v1/workers/{id}/drain", post(workers::drain))
        .route("/v1/workers/{id}/undrain", post(workers::undrain))
        .route("/v1/jobs", post(jobs::create).get(jobs::list))
        .route("/v1/jobs/{id}", get(jobs::show))
        .route("/v1/jobs/{id}/stop", post(jobs::stop))
        .route("/v1/jobs/{id}/logs", get(jobs::logs))
        .route("/v1/groups", post(groups::create).get(groups::list))
        .route("/v1/groups/{id}", get(groups::show))
        .route("/v1/groups/{id}/stop", post(groups::stop))
        .route("/v1/groups/{id}/logs", get(groups::logs))
        .route("/metrics", get(crate::metrics::scrape))
        .route("/v1/openapi.json", get(openapi::openapi_json))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(timeout::RequestTimeout::new(&state))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ))
        // After the authentication layer, so it does not wrap them: probes
        // need no credentials (and say nothing but ok or not ok).
        .route("/healthz", get(health::alive))
        .route("/readyz", get(health::ready))
        // Outermost, so that a request refused anywhere (authentication
        // included) still has its body received before the answer goes out.
        .layer(middleware::from_fn(body::answer_after_body))
        .layer(middleware::from_fn(crate::metrics::track_http))
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
