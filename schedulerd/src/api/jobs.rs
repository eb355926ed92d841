//! `/v1/jobs` routes, and the job operations the original routes share.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use jobcluster_proto::http::{
    JOB_STATES, JobFilter, JobInfo, JobList, JobStarted, LogsQuery, StartJob, StopResult,
};
use jobcluster_proto::pb::{
    self, QueryJobRequest, StartJobRequest, StopJobRequest, StreamJobRequest,
};

use super::extract::{JsonBody, QueryParams};
use super::{ApiError, AppState, with_deadline};
use crate::convert::{job_info, merge_status};
use crate::registry::WorkerEntry;
use crate::store::{JobQuery, JobRow, Store};
use crate::time::now_ms;

const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;

pub(crate) async fn create(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<StartJob>,
) -> Result<(StatusCode, Json<JobStarted>), ApiError> {
    let started = start_job(&state, body).await?;
    Ok((StatusCode::CREATED, Json(started)))
}

pub(crate) async fn show(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<JobInfo>, ApiError> {
    let row = find_job(&state, &id, None).await?;
    Ok(Json(job_info(&refresh(&state, row).await)))
}

pub(crate) async fn stop(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<StopResult>, ApiError> {
    let row = find_job(&state, &id, None).await?;
    Ok(Json(stop_job(&state, row).await?))
}

pub(crate) async fn logs(
    State(state): State<AppState>,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<LogsQuery>,
) -> Result<Response, ApiError> {
    let row = find_job(&state, &id, None).await?;
    stream_output(&state, row, q.offset, q.follow).await
}

pub(crate) async fn list(
    State(state): State<AppState>,
    QueryParams(filter): QueryParams<JobFilter>,
) -> Result<Json<JobList>, ApiError> {
    let worker_id = match &filter.worker_id {
        Some(w) => Some(
            state
                .registry
                .get(w)
                .ok_or_else(|| ApiError::worker_not_found(w))?
                .id(),
        ),
        None => None,
    };
    if let Some(s) = &filter.state
        && !JOB_STATES.contains(&s.as_str())
    {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("state must be one of {}", JOB_STATES.join(", ")),
        ));
    }
    let before = match &filter.cursor {
        Some(c) => Some(c.parse::<i64>().map_err(|_| {
            ApiError::bad_request("invalid_query", "cursor is not one this API gave out")
        })?),
        None => None,
    };
    let limit = filter.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
    let (rows, next) = state
        .store
        .jobs(JobQuery {
            worker_id,
            state: filter.state.clone(),
            before,
            limit,
        })
        .await?;
    // Records are as fresh as the workers' last heartbeat reports; asking
    // every worker on every listing would put up to a page of worker calls
    // on each request (GET /v1/jobs/{id} does ask).
    Ok(Json(JobList {
        jobs: rows.iter().map(job_info).collect(),
        next_cursor: next.map(|n| n.to_string()),
    }))
}

/// Starts a job on the named worker and records it before answering.
/// Starts a job on the named worker, or on one the scheduler picks, and
/// records it before answering.
pub(crate) async fn start_job(state: &AppState, body: StartJob) -> Result<JobStarted, ApiError> {
    if body.path.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_path",
            "path: must name a script",
        ));
    }
    if !body.worker_id.is_empty() {
        let worker = state
            .registry
            .get(&body.worker_id)
            .ok_or_else(|| ApiError::worker_not_found(&body.worker_id))?;
        let w = worker.row();
        if w.state != "ready" {
            return Err(ApiError::worker_not_ready(&w));
        }
        if w.draining {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "worker_draining",
                format!("worker {} is draining and takes no new jobs", w.name),
            ));
        }
        if body
            .selector
            .iter()
            .any(|(k, v)| w.labels.get(k) != Some(v))
        {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "no_eligible_worker",
                format!("worker {} does not match the selector", w.name),
            ));
        }
        return start_on(state, &worker, body, None).await;
    }
    // Placement: try the eligible workers in order; one that is busy or
    // unreachable passes the job on to the next.
    let rows = state.registry.all();
    let eligible =
        crate::placement::eligible(&rows, body.command.as_deref(), &body.path, &body.selector)
            .map_err(|why| ApiError::new(StatusCode::CONFLICT, "no_eligible_worker", why.0))?;
    let running = state.store.running_counts().await?;
    let turn = state
        .placement_turn
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut passed_on = Vec::new();
    for row in crate::placement::order(eligible, &running, turn) {
        let Some(worker) = state.registry.get(&row.worker_id) else {
            continue;
        };
        match start_on(state, &worker, body.clone(), None).await {
            Err(e)
                if matches!(
                    e.code.as_str(),
                    "worker_busy" | "worker_unavailable" | "worker_down"
                ) =>
            {
                passed_on.push(format!("{}: {}", row.name, e.message));
            }
            result => return result,
        }
    }
    Err(ApiError::new(
        StatusCode::CONFLICT,
        "no_eligible_worker",
        format!(
            "every eligible worker is busy or unreachable ({})",
            passed_on.join("; ")
        ),
    ))
}

/// Starts the job on `worker` and records it (as a member of `group_id`).
pub(crate) async fn start_on(
    state: &AppState,
    worker: &Arc<WorkerEntry>,
    body: StartJob,
    group_id: Option<&str>,
) -> Result<JobStarted, ApiError> {
    // In a task of its own: a client that hangs up must not cancel this
    // between the worker starting the job and the job being recorded.
    let task = tokio::spawn(start_and_record(
        state.clone(),
        worker.clone(),
        body,
        group_id.map(str::to_owned),
    ));
    task.await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("starting the job failed: {e}"),
        )
    })?
}

async fn start_and_record(
    state: AppState,
    worker: Arc<WorkerEntry>,
    body: StartJob,
    group_id: Option<String>,
) -> Result<JobStarted, ApiError> {
    let state = &state;
    let w = worker.row();
    let job_id = uuid::Uuid::new_v4().to_string();
    let created_at_ms = now_ms();
    let request = StartJobRequest {
        command: body.command.clone().unwrap_or_default(),
        path: body.path.clone(),
        args: body.args.clone(),
        env: body.env.clone().into_iter().collect(),
        job_id: job_id.clone(),
    };
    let mut client = worker.client();
    let reply = with_deadline(state.call_timeout, client.start_job(request))
        .await
        .map_err(|s| {
            if s.code() == tonic::Code::DeadlineExceeded {
                // The worker may have started it: say so, and never let
                // placement try another worker (the job would run twice).
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "worker_timeout",
                    format!(
                        "worker {} did not answer in time; job {job_id} may have started there (see GET /v1/jobs?worker_id={})",
                        w.name, w.name
                    ),
                )
            } else {
                ApiError::from_worker(s, &w.name)
            }
        })?
        .into_inner();
    let mut row = JobRow {
        job_id: job_id.clone(),
        worker_id: w.worker_id.clone(),
        command: body.command.unwrap_or_default(),
        path: body.path,
        args: body.args,
        state: "running".into(),
        error_text: String::new(),
        exit_code: None,
        signal: None,
        created_at_ms,
        started_at_ms: 0,
        finished_at_ms: 0,
        output_bytes: 0,
        group_id,
    };
    if let Some(status) = &reply.status {
        merge_status(&mut row, status);
    }
    state.store.insert_job(row.clone()).await?;
    tracing::info!(job_id = %job_id, worker_id = %w.worker_id, worker = %w.name, path = %row.path, state = %row.state, "job started");
    Ok(JobStarted {
        job_id,
        worker_id: w.worker_id,
    })
}

/// The job's record; with `worker`, the job must belong to that worker.
pub(crate) async fn find_job(
    state: &AppState,
    job_id: &str,
    worker: Option<&str>,
) -> Result<JobRow, ApiError> {
    if uuid::Uuid::parse_str(job_id).is_err() {
        return Err(ApiError::bad_request(
            "invalid_job_id",
            format!("{job_id:?} is not a job id (a UUID)"),
        ));
    }
    let row = state
        .store
        .job(job_id)
        .await?
        .ok_or_else(|| ApiError::job_not_found(job_id))?;
    if let Some(worker) = worker {
        let entry = state
            .registry
            .get(worker)
            .ok_or_else(|| ApiError::worker_not_found(worker))?;
        if entry.id() != row.worker_id {
            return Err(ApiError::job_not_found(job_id));
        }
    }
    Ok(row)
}

/// The worker that owns a job, if it can be asked now. A `down` worker is
/// answered for at once (503 `worker_down`) instead of after a timeout.
pub(crate) fn worker_of(state: &AppState, row: &JobRow) -> Result<Arc<WorkerEntry>, ApiError> {
    let worker = state
        .registry
        .get(&row.worker_id)
        .ok_or_else(|| ApiError::worker_not_found(&row.worker_id))?;
    let w = worker.row();
    if w.state == "down" {
        return Err(ApiError::worker_not_ready(&w));
    }
    Ok(worker)
}

/// A running job's record brought up to date from its worker. If the
/// worker cannot answer, the recorded state is what we know.
pub(crate) async fn refresh(state: &AppState, row: JobRow) -> JobRow {
    if row.state != "running" {
        return row;
    }
    let Ok(worker) = worker_of(state, &row) else {
        return row;
    };
    let mut client = worker.client();
    let request = QueryJobRequest {
        job_id: row.job_id.clone(),
    };
    match with_deadline(state.call_timeout, client.query_job(request)).await {
        Ok(reply) => record_status(&state.store, row, &reply.into_inner()).await,
        Err(status) => {
            tracing::debug!(job_id = %row.job_id, %status, "could not refresh job from its worker");
            row
        }
    }
}

pub(crate) async fn record_status(
    store: &Store,
    mut row: JobRow,
    status: &pb::QueryJobResponse,
) -> JobRow {
    let before = row.clone();
    merge_status(&mut row, status);
    if row != before
        && let Err(error) = store.update_job(row.clone()).await
    {
        tracing::error!(job_id = %row.job_id, %error, "could not record job status");
    }
    row
}

pub(crate) async fn stop_job(state: &AppState, row: JobRow) -> Result<StopResult, ApiError> {
    let row = refresh(state, row).await;
    if row.state != "running" {
        return Ok(StopResult {
            success: true,
            state: row.state,
        });
    }
    let worker = worker_of(state, &row)?;
    let name = worker.row().name;
    let mut client = worker.client();
    let request = StopJobRequest {
        job_id: row.job_id.clone(),
    };
    with_deadline(state.call_timeout, client.stop_job(request))
        .await
        .map_err(|s| ApiError::from_worker(s, &name))?;
    tracing::info!(job_id = %row.job_id, worker = %name, "job stop requested");
    let row = refresh(state, row).await;
    Ok(StopResult {
        success: true,
        state: row.state,
    })
}

/// Passes the worker's output stream through as a chunked body. The body
/// pulls from the gRPC stream only as the client reads, so a slow reader
/// holds the worker back through flow control instead of filling memory,
/// and a reader that leaves drops the stream, which cancels it on the worker.
pub(crate) async fn stream_output(
    state: &AppState,
    row: JobRow,
    offset: u64,
    follow: bool,
) -> Result<Response, ApiError> {
    let slot = state.followers.enter(&row.job_id)?;
    let worker = worker_of(state, &row)?;
    let name = worker.row().name;
    let mut client = worker.client();
    let request = StreamJobRequest {
        job_id: row.job_id.clone(),
        offset,
        follow: Some(follow),
    };
    let stream = with_deadline(state.call_timeout, client.stream_job(request))
        .await
        .map_err(|s| ApiError::from_worker(s, &name))?
        .into_inner();
    let store = state.store.clone();
    let job_id = row.job_id.clone();
    let body = futures_util::stream::unfold(
        (stream, Some(row), store, slot),
        move |(mut stream, mut row, store, slot)| async move {
            let current = row.take()?;
            loop {
                match stream.message().await {
                    Ok(Some(msg)) => {
                        if let Some(status) = &msg.final_status {
                            // Record the final state before the body ends, so a
                            // client that asks right after sees it.
                            record_status(&store, current.clone(), status).await;
                            return (!msg.output.is_empty()).then(|| {
                                (
                                    Ok::<_, std::io::Error>(Bytes::from(msg.output)),
                                    (stream, None, store, slot),
                                )
                            });
                        }
                        if msg.output.is_empty() {
                            continue; // keepalive
                        }
                        return Some((
                            Ok(Bytes::from(msg.output)),
                            (stream, Some(current), store, slot),
                        ));
                    }
                    Ok(None) => return None,
                    Err(status) => {
                        tracing::info!(job_id = %current.job_id, %status, "output stream from worker broke");
                        // An error ends the body without its last chunk, so the
                        // client sees a cut stream and can resume from its offset.
                        return Some((
                            Err(std::io::Error::other(status.message().to_owned())),
                            (stream, None, store, slot),
                        ));
                    }
                }
            }
        },
    );
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::HeaderName::from_static("x-job-id"), job_id),
        ],
        Body::from_stream(body),
    )
        .into_response())
}
