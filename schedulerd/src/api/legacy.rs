//! The original design's routes, kept as they were: every request names
//! its worker, and the job must belong to it. Like the original API, they
//! ignore JSON fields they do not know (`/v1` refuses them), and `/query`
//! says `error: true` for every job that ended without succeeding.

use axum::Json;
use axum::extract::State;
use axum::response::Response;
use jobcluster_proto::http::{JobInfo, JobRef, StartJob, StopResult};
use serde::Deserialize;

use super::extract::JsonBody;
use super::idempotency::IdempotencyKey;
use super::jobs::{find_job, refresh, start_once, stop_job, stream_output};
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

pub(crate) async fn stop(
    State(state): State<AppState>,
    JsonBody(Lenient { body }): JsonBody<Lenient<JobRef>>,
) -> Result<Json<StopResult>, ApiError> {
    let row = find_job(&state, &body.job_id, Some(&body.worker_id)).await?;
    Ok(Json(stop_job(&state, row).await?))
}

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

pub(crate) async fn stream(
    State(state): State<AppState>,
    JsonBody(Lenient { body }): JsonBody<Lenient<JobRef>>,
) -> Result<Response, ApiError> {
    let row = find_job(&state, &body.job_id, Some(&body.worker_id)).await?;
    stream_output(&state, row, 0, true).await
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
