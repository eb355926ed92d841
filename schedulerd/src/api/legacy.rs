//! The original design's routes, kept as they were: every request names
//! its worker, and the job must belong to it. Like the original API, they
//! ignore JSON fields they do not know (`/v1` refuses them), and `/query`
//! says `error: true` for every job that ended without succeeding.

use axum::Json;
use axum::extract::State;
use axum::response::Response;
use jobcluster_proto::http::{JobInfo, JobRef, JobStarted, StartJob, StopResult};
use serde::Deserialize;

use super::extract::JsonBody;
use super::idempotency::IdempotencyKey;
use super::jobs::{Trailer, find_job, refresh, start_once, stop_job, stream_output};
use super::{ApiError, AppState};
use crate::state::JobState;

/// A body of the original routes: the fields `T` knows, any others ignored
/// (the original API decoded with Go's `encoding/json`, which skips unknown
/// fields). Flattening hands `T` only the fields it names, so `T` itself
/// stays strict where `/v1` uses it.
#[derive(Debug, Deserialize)]
pub(crate) struct Lenient<T> {
    #[serde(flatten)]
    body: T,
}

#[utoipa::path(
    post,
    path = "/start",
    operation_id = "legacy_start",
    tag = "original",
    params(("Idempotency-Key" = Option<String>, Header, description = "1 to 255 visible ASCII characters; a request repeating it within 24 h gets the job it started and starts nothing.")),
    request_body(content = StartJob, description = "As `POST /v1/jobs`, but `worker_id` and `command` are required, and the job waits in the queue only with `\"queue\": true`."),
    responses(
        (status = 201, description = "Started.", body = JobStarted, headers(("Idempotent-Replayed" = String, description = "`true` when this repeats an earlier request's outcome (same Idempotency-Key)."))),
        (status = 202, description = "Queued (only with `\"queue\": true`): it starts when a slot is free.", body = JobStarted, headers(("Idempotent-Replayed" = String, description = "`true` when this repeats an earlier request's outcome."))),
        (status = 400, description = "`invalid_json`, `invalid_request` (a field is wrong; `command` missing), `invalid_body`, `invalid_idempotency_key`, `invalid_path`, `start_refused` (a worker of the original design refused it), `invalid_queue_timeout`, or the worker's refusal: `unknown_plugin`, `env_not_allowed`, `invalid_request`.", body = jobcluster_proto::http::ErrorBody),
        (status = 404, description = "`worker_not_found`.", body = jobcluster_proto::http::ErrorBody),
        (status = 409, description = "`no_eligible_worker` (the worker does not match the selector), `worker_draining`, `idempotency_key_in_use`, `job_exists`.", body = jobcluster_proto::http::ErrorBody),
        (status = 413, description = "`request_too_large` (args or env over a bound) or `payload_too_large` (body over 1 MiB).", body = jobcluster_proto::http::ErrorBody),
        (status = 422, description = "`idempotency_key_reused`: the key was used for another request within 24 h.", body = jobcluster_proto::http::ErrorBody),
        (status = 429, description = "`worker_busy` (no free slot and `queue` is not true), `queue_full`.", body = jobcluster_proto::http::ErrorBody),
        (status = 500, description = "`internal`: the start's task failed (a bug).", body = jobcluster_proto::http::ErrorBody),
        (status = 502, description = "`worker_storage`: the worker failed to write the job's files; `worker_job_id_refused`: a worker of the original design answered with a job id that is not a UUID or names another job.", body = jobcluster_proto::http::ErrorBody),
        (status = 503, description = "`worker_down`, `worker_unavailable`, `worker_unresponsive`, `job_starting`, `store_unavailable`, or `start_unconfirmed` (the job may be running: `job_id` says which; ask for it later).", body = jobcluster_proto::http::ErrorBody),
        (status = 507, description = "`worker_storage_full`: the worker's disk is full.", body = jobcluster_proto::http::ErrorBody),
    ),
)]
pub(crate) async fn start(
    State(state): State<AppState>,
    IdempotencyKey(key): IdempotencyKey,
    JsonBody(Lenient { body }): JsonBody<Lenient<StartJob>>,
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

#[utoipa::path(
    post,
    path = "/stop",
    operation_id = "legacy_stop",
    tag = "original",
    request_body = JobRef,
    responses(
        (status = 200, description = "The job is stopped, or had ended: its state.", body = StopResult),
        (status = 400, description = "`invalid_json`, `invalid_request`, `invalid_body`, `invalid_job_id` (not a UUID).", body = jobcluster_proto::http::ErrorBody),
        (status = 404, description = "`worker_not_found`, `job_not_found` (also for a job of another worker).", body = jobcluster_proto::http::ErrorBody),
        (status = 502, description = "The worker failed (`worker_storage`).", body = jobcluster_proto::http::ErrorBody),
        (status = 503, description = "`worker_down`, `worker_unavailable`, `worker_unresponsive`, `job_starting`, `store_unavailable`.", body = jobcluster_proto::http::ErrorBody),
    ),
)]
pub(crate) async fn stop(
    State(state): State<AppState>,
    JsonBody(Lenient { body }): JsonBody<Lenient<JobRef>>,
) -> Result<Json<StopResult>, ApiError> {
    let row = find_job(&state, &body.job_id, Some(&body.worker_id)).await?;
    Ok(Json(stop_job(&state, row).await?))
}

#[utoipa::path(
    post,
    path = "/query",
    operation_id = "legacy_query",
    tag = "original",
    request_body = JobRef,
    responses(
        (status = 200, description = "The job (`done`, `error`, `error_text` are the original fields).", body = JobInfo),
        (status = 400, description = "`invalid_json`, `invalid_request`, `invalid_body`, `invalid_job_id` (not a UUID).", body = jobcluster_proto::http::ErrorBody),
        (status = 404, description = "`worker_not_found`, `job_not_found` (also for a job of another worker).", body = jobcluster_proto::http::ErrorBody),
        (status = 503, description = "`store_unavailable`.", body = jobcluster_proto::http::ErrorBody),
    ),
)]
pub(crate) async fn query(
    State(state): State<AppState>,
    JsonBody(Lenient { body }): JsonBody<Lenient<JobRef>>,
) -> Result<Json<JobInfo>, ApiError> {
    let row = find_job(&state, &body.job_id, Some(&body.worker_id)).await?;
    let mut info = refresh(&state, row).await.info();
    // As the original did: an error is any end but success (a stopped job
    // was killed), and nothing while the job runs.
    info.error = info.done && info.state != JobState::Succeeded.as_str();
    Ok(Json(info))
}

#[utoipa::path(
    post,
    path = "/stream",
    operation_id = "legacy_stream",
    tag = "original",
    request_body = JobRef,
    responses(
        (status = 200, description = "The job's output from its start, followed until the job ends (chunked; a cut stream ends without its last chunk).", content_type = "application/octet-stream", body = String, headers(("X-Job-Id" = String, description = "The job."))),
        (status = 400, description = "`invalid_json`, `invalid_request`, `invalid_body`, `invalid_job_id` (not a UUID).", body = jobcluster_proto::http::ErrorBody),
        (status = 404, description = "`worker_not_found`, `job_not_found` (also for a job of another worker).", body = jobcluster_proto::http::ErrorBody),
        (status = 410, description = "`output_expired`: the worker no longer keeps this output.", body = jobcluster_proto::http::ErrorBody),
        (status = 429, description = "`too_many_followers`: the job has as many open output streams as allowed.", body = jobcluster_proto::http::ErrorBody),
        (status = 501, description = "`output_unavailable`: the job runs on a worker of the original design, which keeps no output stream.", body = jobcluster_proto::http::ErrorBody),
        (status = 502, description = "The worker failed (`worker_storage`).", body = jobcluster_proto::http::ErrorBody),
        (status = 409, description = "`job_not_started`: the job is queued, or its start is not settled yet; try again once it runs (`job_id` says which).", body = jobcluster_proto::http::ErrorBody),
        (status = 503, description = "`worker_down`, `worker_unavailable`, `worker_unresponsive`, `store_unavailable`.", body = jobcluster_proto::http::ErrorBody),
    ),
)]
pub(crate) async fn stream(
    State(state): State<AppState>,
    JsonBody(Lenient { body }): JsonBody<Lenient<JobRef>>,
) -> Result<Response, ApiError> {
    let row = find_job(&state, &body.job_id, Some(&body.worker_id)).await?;
    stream_output(&state, row, 0, true, Trailer::None).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::extract::parse_json;

    #[test]
    fn the_original_routes_ignore_unknown_fields_and_v1_does_not() {
        let text = br#"{"worker_id": "w", "command": "bash", "path": "x.sh", "timeout": 5, "job": {"a": 1}}"#;
        let Lenient { body } = parse_json::<Lenient<StartJob>>(text).unwrap();
        assert_eq!(
            (
                body.worker_id.as_str(),
                body.command.as_deref(),
                body.path.as_str()
            ),
            ("w", Some("bash"), "x.sh")
        );
        let error = parse_json::<StartJob>(text).unwrap_err();
        assert_eq!(error.code, "invalid_request");

        let text = br#"{"worker_id": "w", "job_id": "j", "verbose": true}"#;
        let Lenient { body } = parse_json::<Lenient<JobRef>>(text).unwrap();
        assert_eq!((body.worker_id.as_str(), body.job_id.as_str()), ("w", "j"));
        assert!(parse_json::<JobRef>(text).is_err());
        // What the original required is still required.
        let error = parse_json::<Lenient<JobRef>>(br#"{"worker_id": "w"}"#).unwrap_err();
        assert!(error.message.contains("job_id"), "{}", error.message);
    }
}
