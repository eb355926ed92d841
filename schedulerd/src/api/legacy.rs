//! The original design's routes, kept as they were: every request names
//! its worker, and the job must belong to it.

use axum::Json;
use axum::extract::State;
use axum::response::Response;
use jobcluster_proto::http::{JobInfo, JobRef, StartJob, StopResult};

use super::extract::JsonBody;
use super::idempotency::IdempotencyKey;
use super::jobs::{find_job, refresh, start_once, stop_job, stream_output};
use super::{ApiError, AppState};

pub(crate) async fn start(
    State(state): State<AppState>,
    IdempotencyKey(key): IdempotencyKey,
    JsonBody(body): JsonBody<StartJob>,
) -> Result<Response, ApiError> {
    if body.command.as_deref().unwrap_or_default().is_empty() {
        return Err(ApiError::bad_request(
            "invalid_request",
            "command: must name a plugin (bash, python, ...)",
        ));
    }
    // The original contract has no 202: this route queues only when asked.
    let body = StartJob {
        queue: Some(body.queue.unwrap_or(false)),
        ..body
    };
    start_once(&state, key, "/start", body).await
}

pub(crate) async fn stop(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<JobRef>,
) -> Result<Json<StopResult>, ApiError> {
    let row = find_job(&state, &body.job_id, Some(&body.worker_id)).await?;
    Ok(Json(stop_job(&state, row).await?))
}

pub(crate) async fn query(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<JobRef>,
) -> Result<Json<JobInfo>, ApiError> {
    let row = find_job(&state, &body.job_id, Some(&body.worker_id)).await?;
    Ok(Json(refresh(&state, row).await.info()))
}

pub(crate) async fn stream(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<JobRef>,
) -> Result<Response, ApiError> {
    let row = find_job(&state, &body.job_id, Some(&body.worker_id)).await?;
    stream_output(&state, row, 0, true).await
}
