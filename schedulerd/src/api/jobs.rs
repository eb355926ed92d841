//! `/v1/jobs` routes, and the job operations the original routes share.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body::Frame;
use jobcluster_proto::http::{
    JOB_STATES, JOB_TRAILER, JOB_TRAILER_MAX, JobFilter, JobInfo, JobList, JobStarted, LogsQuery,
    StartJob, StopResult, limits,
};
use jobcluster_proto::pb::{
    self, QueryJobRequest, StartJobRequest, StopJobRequest, StreamJobRequest,
};

use super::extract::{JsonBody, QueryParams};
use super::idempotency::{self, IdempotencyKey};
use super::tap::{Joined, Piece, Reopen, Taps};
use super::{ApiError, AppState, with_deadline};
use crate::convert::{job_info, job_summary, merge_status};
use crate::registry::WorkerEntry;
use crate::state::{JobState, WorkerState};
use crate::store::{JobQuery, JobRow, KeyRow, NewKey, QueueEntry, SharedStore};
use crate::time::{now_ms, rfc3339};

pub(crate) const DEFAULT_PAGE: u32 = 100;
pub(crate) const MAX_PAGE: u32 = 1000;

#[utoipa::path(
    post,
    path = "/v1/jobs",
    operation_id = "start_job",
    tag = "jobs",
    params(("Idempotency-Key" = Option<String>, Header, description = "1 to 255 visible ASCII characters; a request repeating it within 24 h gets the job it started and starts nothing.")),
    request_body = StartJob,
    responses(
        (status = 201, description = "Started.", body = JobStarted, headers(("Idempotent-Replayed" = String, description = "`true` when this repeats an earlier request's outcome (same Idempotency-Key); `state` then says where the job is now."))),
        (status = 202, description = "Queued: no slot is free for it now, or queued jobs wait for the slots it could take (`state: queued`, `position`, `reason`); it starts when its turn comes and a slot is free.", body = JobStarted, headers(("Idempotent-Replayed" = String, description = "`true` when this repeats an earlier request's outcome."))),
        (status = 400, description = "`invalid_json`, `invalid_request` (a field is wrong), `invalid_body`, `invalid_idempotency_key`, `invalid_path`, `invalid_queue_timeout`, or the worker's refusal: `unknown_plugin`, `env_not_allowed`, `invalid_request`.", body = jobcluster_proto::http::ErrorBody),
        (status = 404, description = "`worker_not_found`: the named worker is not known.", body = jobcluster_proto::http::ErrorBody),
        (status = 409, description = "`no_eligible_worker` (no worker has the plugin or matches the selector, or, with `queue: false`, every one is busy), `worker_draining`, `idempotency_key_in_use`, `job_exists`.", body = jobcluster_proto::http::ErrorBody),
        (status = 413, description = "`request_too_large` (args or env over a bound) or `payload_too_large` (body over 1 MiB).", body = jobcluster_proto::http::ErrorBody),
        (status = 422, description = "`idempotency_key_reused`: the key was used for another request within 24 h.", body = jobcluster_proto::http::ErrorBody),
        (status = 429, description = "`queue_full` (`[scheduler] max_queued` jobs wait already), `worker_busy` (with `queue: false`).", body = jobcluster_proto::http::ErrorBody),
        (status = 500, description = "`internal`: the start's task failed (a bug).", body = jobcluster_proto::http::ErrorBody),
        (status = 502, description = "`worker_storage`: the worker failed to write the job's files; `worker_job_id_refused`: a worker of the original design answered with a job id that is not a UUID or names another job.", body = jobcluster_proto::http::ErrorBody),
        (status = 503, description = "`worker_down`, `worker_unavailable`, `worker_unresponsive` (the named worker cannot take it now; `wait_for_worker` queues instead), `job_starting`, `store_unavailable`, or `start_unconfirmed` (the job may be running: `job_id` says which; ask for it later).", body = jobcluster_proto::http::ErrorBody),
        (status = 507, description = "`worker_storage_full`: the worker's disk is full.", body = jobcluster_proto::http::ErrorBody),
    ),
)]
pub(crate) async fn create(
    State(state): State<AppState>,
    IdempotencyKey(key): IdempotencyKey,
    JsonBody(body): JsonBody<StartJob>,
) -> Result<Response, ApiError> {
    start_once(&state, key, "/v1/jobs", body).await
}

/// A start, done at most once per `Idempotency-Key`: `201` with the job
/// it started, or, for a key already bound, that job as it is now.
pub(crate) async fn start_once(
    state: &AppState,
    key: Option<String>,
    route: &'static str,
    body: StartJob,
) -> Result<Response, ApiError> {
    limits::check(&body.args, &body.env).map_err(ApiError::request_too_large)?;
    let Some(key) = key else {
        let started = start_job(state, body, None, None).await?;
        return Ok((started_status(&started), Json(started)).into_response());
    };
    let request = idempotency::Request::new(key, route, &body);
    let claim = match request.claim(&state.claims, &state.store).await? {
        Ok(claim) => claim,
        Err(bound) => return replay_job(state, &bound).await,
    };
    let binding = request.binding();
    // In a task of its own, holding the claim: a client that hangs up must
    // not free the key while the start is still being decided.
    let task = tokio::spawn({
        let state = state.clone();
        async move {
            let _claim = claim;
            start_job(&state, body, Some(binding), None).await
        }
    });
    let started = task.await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("starting the job failed: {e}"),
        )
    })??;
    Ok((started_status(&started), Json(started)).into_response())
}

/// `201` for a job that started, `202` for one that waits in the queue.
pub(crate) fn started_status(started: &JobStarted) -> StatusCode {
    if started.state.as_deref() == Some(JobState::Queued.as_str()) {
        StatusCode::ACCEPTED
    } else {
        StatusCode::CREATED
    }
}

/// The answer to a request that repeats the key of the start that made
/// `bound`'s job: that job as it is now. A start whose outcome is still
/// unknown gets the answer it got first, `503 start_unconfirmed`.
async fn replay_job(state: &AppState, bound: &KeyRow) -> Result<Response, ApiError> {
    let job_id = bound.job_id.as_deref().ok_or_else(|| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            "this Idempotency-Key was used within the last 24 h for a group; use a new key",
        )
    })?;
    let row = state
        .store
        .job(job_id)
        .await?
        .ok_or_else(|| ApiError::job_not_found(job_id))?;
    let row = refresh(state, row).await.row;
    tracing::info!(job_id = %row.job_id, key = %bound.key, state = %row.state, "start repeated with its idempotency key; answering its job");
    if row.state == JobState::Unknown && row.started_at_ms == 0 {
        let worker = state
            .registry
            .get(&row.worker_id)
            .map_or_else(|| row.worker_id.clone(), |w| w.row().name);
        return Ok(idempotency::replayed(start_unconfirmed(
            &row.job_id,
            &worker,
            "its start has not been confirmed yet",
        )));
    }
    let queued = match row.state {
        JobState::Queued => state.store.queue_entry(&row.job_id).await?,
        _ => None,
    };
    let started = JobStarted {
        worker_name: state.registry.get(&row.worker_id).map(|w| w.row().name),
        job_id: row.job_id,
        worker_id: row.worker_id,
        state: Some(row.state.as_str().to_owned()),
        position: queued.as_ref().map(|(_, p)| *p),
        reason: queued.map(|(q, _)| q.reason),
    };
    Ok(idempotency::replayed((
        started_status(&started),
        Json(started),
    )))
}

/// `503 start_unconfirmed`: the job may be running on `worker`.
fn start_unconfirmed(job_id: &str, worker: &str, why: &str) -> ApiError {
    let message = format!(
        "worker {worker} did not confirm the start ({why}); the job may be running there. It reads unknown until the worker's reports settle it: GET /v1/jobs/{job_id}"
    );
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "start_unconfirmed",
        message,
    )
    .with_job(job_id)
}

#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    operation_id = "show_job",
    tag = "jobs",
    params(("id" = uuid::Uuid, Path, description = "The job id.")),
    responses(
        (status = 200, description = "The job, asked of its worker first (`stale: true` when the worker could not answer in time).", body = JobInfo),
        (status = 400, description = "`invalid_job_id`: not a UUID.", body = jobcluster_proto::http::ErrorBody),
        (status = 404, description = "`job_not_found`.", body = jobcluster_proto::http::ErrorBody),
        (status = 503, description = "`store_unavailable`.", body = jobcluster_proto::http::ErrorBody),
    ),
)]
pub(crate) async fn show(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<JobInfo>, ApiError> {
    let row = find_job(&state, &id, None).await?;
    let mut info = refresh(&state, row).await.info();
    if info.state == JobState::Queued.as_str()
        && let Some((entry, position)) = state.store.queue_entry(&info.job_id).await?
    {
        with_queue(&mut info, &entry, position);
    }
    Ok(Json(info))
}

fn with_queue(info: &mut JobInfo, entry: &QueueEntry, position: u64) {
    info.position = Some(position);
    info.reason = Some(entry.reason.clone());
    info.queued_at = Some(rfc3339(entry.queued_at_ms));
}

#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/stop",
    operation_id = "stop_job",
    tag = "jobs",
    params(("id" = uuid::Uuid, Path, description = "The job id.")),
    responses(
        (status = 200, description = "The job is stopped, or had ended: its state (a queued job ends `stopped` without starting).", body = StopResult),
        (status = 400, description = "`invalid_job_id`: not a UUID.", body = jobcluster_proto::http::ErrorBody),
        (status = 404, description = "`job_not_found`, `worker_not_found` (its worker was removed).", body = jobcluster_proto::http::ErrorBody),
        (status = 502, description = "The worker failed (`worker_storage`).", body = jobcluster_proto::http::ErrorBody),
        (status = 503, description = "`worker_down`, `worker_unavailable`, `worker_unresponsive`, `job_starting`, `store_unavailable`.", body = jobcluster_proto::http::ErrorBody),
    ),
)]
pub(crate) async fn stop(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<StopResult>, ApiError> {
    let row = find_job(&state, &id, None).await?;
    Ok(Json(stop_job(&state, row).await?))
}

#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/logs",
    operation_id = "job_logs",
    tag = "jobs",
    params(("id" = uuid::Uuid, Path, description = "The job id."), LogsQuery),
    responses(
        (status = 200, description = "The job's output bytes from `offset` (chunked); with `follow`, until the job ends. A stream cut by a failure ends without its last chunk: resume from the bytes received. A stream that ends at the job's end ends with the trailer `x-job`: the job's record as JSON (as `GET /v1/jobs/{id}` answers it, without `args`; left out if the end could not be recorded or the record passes 4 KiB; over HTTP/1.1 only with `TE: trailers`).", content_type = "application/octet-stream", body = String, headers(("X-Job-Id" = String, description = "The job."), ("Trailer" = String, description = "`x-job`: the trailer that may end the stream."))),
        (status = 400, description = "`invalid_job_id`, `invalid_query` (unknown or malformed parameter), `offset_out_of_range`.", body = jobcluster_proto::http::ErrorBody),
        (status = 404, description = "`job_not_found`, `worker_not_found` (its worker was removed).", body = jobcluster_proto::http::ErrorBody),
        (status = 410, description = "`output_expired`: the worker no longer keeps this output.", body = jobcluster_proto::http::ErrorBody),
        (status = 429, description = "`too_many_followers`: the job has as many open output streams as allowed.", body = jobcluster_proto::http::ErrorBody),
        (status = 501, description = "`output_unavailable`: the job runs on a worker of the original design, which keeps no output stream.", body = jobcluster_proto::http::ErrorBody),
        (status = 502, description = "The worker failed (`worker_storage`).", body = jobcluster_proto::http::ErrorBody),
        (status = 409, description = "`job_not_started`: the job is queued, or its start is not settled yet; try again once it runs (`job_id` says which).", body = jobcluster_proto::http::ErrorBody),
        (status = 503, description = "`worker_down`, `worker_unavailable`, `worker_unresponsive`, `store_unavailable`.", body = jobcluster_proto::http::ErrorBody),
    ),
)]
pub(crate) async fn logs(
    State(state): State<AppState>,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<LogsQuery>,
) -> Result<Response, ApiError> {
    let row = find_job(&state, &id, None).await?;
    stream_output(&state, row, q.offset, q.follow, Trailer::Record).await
}

#[utoipa::path(
    get,
    path = "/v1/jobs",
    operation_id = "list_jobs",
    tag = "jobs",
    params(JobFilter),
    responses(
        (status = 200, description = "Jobs, newest first (queued jobs in queue order with `state=queued`), without `args`; `next_cursor` fetches the next page.", body = JobList),
        (status = 400, description = "`invalid_query`: an unknown or malformed parameter, a state that is none of the job states, a cursor this API did not give out.", body = jobcluster_proto::http::ErrorBody),
        (status = 404, description = "`worker_not_found`: `worker_id` names no known worker.", body = jobcluster_proto::http::ErrorBody),
        (status = 503, description = "`store_unavailable`.", body = jobcluster_proto::http::ErrorBody),
    ),
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    QueryParams(filter): QueryParams<JobFilter>,
) -> Result<Json<JobList>, ApiError> {
    let worker_id = match &filter.worker_id {
        Some(w) => Some(
            state
                .registry
                .find(w, &state.store)
                .await
                .ok_or_else(|| ApiError::worker_not_found(w))?
                .id(),
        ),
        None => None,
    };
    let wanted = match &filter.state {
        Some(s) => Some(JobState::parse(s).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_query",
                format!("state must be one of {}", JOB_STATES.join(", ")),
            )
        })?),
        None => None,
    };
    let before = match &filter.cursor {
        Some(c) => Some(c.parse::<i64>().map_err(|_| {
            ApiError::bad_request("invalid_query", "cursor is not one this API gave out")
        })?),
        None => None,
    };
    let limit = filter.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
    if wanted == Some(JobState::Queued) {
        // In queue order; the cursor is how many queued jobs (of this
        // listing) to skip, and positions count within the listing.
        let skip = before.unwrap_or(0).max(0) as u64;
        let rows = state.store.queued(skip, limit + 1, worker_id).await?;
        let more = rows.len() > limit as usize;
        let jobs = rows
            .iter()
            .take(limit as usize)
            .enumerate()
            .map(|(i, (row, entry))| {
                // Without `args`, as every listing (docs/HTTP_API.md).
                let mut info = job_summary(row, false);
                with_queue(&mut info, entry, skip + i as u64);
                info
            })
            .collect();
        return Ok(Json(JobList {
            jobs,
            next_cursor: more.then(|| (skip + u64::from(limit)).to_string()),
        }));
    }
    let (rows, next) = state
        .store
        .jobs(JobQuery {
            worker_id,
            state: wanted,
            before,
            limit,
        })
        .await?;
    // Records are as fresh as the workers' last heartbeat reports; asking
    // every worker on every listing would put up to a page of worker calls
    // on each request (GET /v1/jobs/{id} does ask).
    Ok(Json(JobList {
        jobs: rows.iter().map(|r| job_summary(r, false)).collect(),
        next_cursor: next.map(|n| n.to_string()),
    }))
}

/// Starts a job on the named worker, or on one the scheduler picks, or,
/// when no slot is free for it, queues it (`state: queued`). With
/// `"queue": false` nothing waits: the answer is as before the queue. The
/// job is a member of `group`, if one is given.
pub(crate) async fn start_job(
    state: &AppState,
    body: StartJob,
    key: Option<NewKey>,
    group: Option<&str>,
) -> Result<JobStarted, ApiError> {
    if body.path.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_path",
            "path: must name a script",
        ));
    }
    let queue_timeout = match &body.queue_timeout {
        Some(text) => Some(
            humantime::parse_duration(text)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_queue_timeout",
                        format!("queue_timeout: {text:?} is not a duration such as 90s or 10m"),
                    )
                })?,
        ),
        None => None,
    };
    if body.queue == Some(false) {
        return start_now(state, body, key, group).await;
    }
    let wait = |body, worker_id, reason| {
        enqueue(
            state,
            body,
            worker_id,
            reason,
            key.clone(),
            queue_timeout,
            group,
        )
    };
    if !body.worker_id.is_empty() {
        let (worker, w, unusable) = named_worker(state, &body).await?;
        if w.seed {
            // A worker of the original design renames the jobs it starts:
            // a queued job's id, already answered, would then name nothing.
            return start_now(state, body, key, group).await;
        }
        if let Some(error) = unusable {
            // A queued job would name an id the store may never hold.
            if !body.wait_for_worker || !worker.recorded() {
                return Err(error);
            }
            let reason = error.message.clone();
            return wait(body, w.worker_id, reason).await;
        }
        // Only a worker with a slot count can be full: no count to read
        // for an unlimited one.
        let full = w.max_jobs > 0 && {
            let taken = state.store.running_counts().await?;
            w.free_slots(taken.get(&w.worker_id).copied().unwrap_or(0)) == Some(0)
        };
        if full {
            let reason = no_slot_on(&w.name, w.max_jobs);
            return wait(body, w.worker_id, reason).await;
        }
        // Whether jobs queued before it hold it back is checked as its
        // record is written.
        let ahead = ahead_of(&w);
        let started = start_on(
            state,
            &worker,
            body.clone(),
            group,
            key.clone(),
            Some(ahead),
        );
        return match started.await {
            Err(e) if e.nothing_started && e.error.code == HELD_BACK => {
                wait(body, w.worker_id, HELD_BACK_REASON.to_owned()).await
            }
            Err(e) if e.nothing_started && e.error.code == "worker_busy" => {
                let reason = no_slot_on(&w.name, w.max_jobs);
                wait(body, w.worker_id, reason).await
            }
            Err(e)
                if e.nothing_started
                    && body.wait_for_worker
                    && PASS_ON.contains(&e.error.code.as_str()) =>
            {
                let reason = e.error.message.clone();
                wait(body, w.worker_id, reason).await
            }
            result => result.map_err(|e| e.error),
        };
    }
    let rows = state.registry.all();
    let eligible = match crate::placement::eligible(
        &rows,
        body.command.as_deref(),
        &body.path,
        &body.selector,
    ) {
        Ok(eligible) => eligible,
        Err(why) if body.wait_for_worker => {
            return wait(body, String::new(), why.0).await;
        }
        Err(why) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "no_eligible_worker",
                why.0,
            ));
        }
    };
    // Read before the slots: a queued job taken meanwhile is counted in
    // them instead.
    let wanted = wanted(state, &eligible).await?;
    let taken = state.store.running_counts().await?;
    let (held_back, free): (Vec<_>, Vec<_>) = eligible
        .into_iter()
        .filter(|w| {
            let slots = w.free_slots(taken.get(&w.worker_id).copied().unwrap_or(0));
            slots != Some(0)
                && state
                    .registry
                    .get(&w.worker_id)
                    .is_some_and(|e| e.unresponsive_since().is_none())
        })
        .partition(|w| wanted.contains(&w.worker_id));
    if free.is_empty() {
        let reason = if !held_back.is_empty() {
            HELD_BACK_REASON.to_owned()
        } else {
            no_slot_matching(&body.selector)
        };
        return wait(body, String::new(), reason).await;
    }
    match try_in_order(state, &body, key.clone(), group, free, Vec::new(), &taken).await {
        Err(Refused::AllPassedOn(passed_on)) => {
            let reason = format!(
                "{} ({})",
                no_slot_matching(&body.selector),
                passed_on.join("; ")
            );
            wait(body, String::new(), reason).await
        }
        Err(Refused::Failed(error)) => Err(error),
        Ok(started) => Ok(started),
    }
}

/// Queued jobs looked at to decide whether a new start must queue behind
/// them: the head of the queue, not all of it, so a start never reads a
/// long queue. A job further back that could take the slot is found by
/// the dispatcher instead.
const AHEAD: u32 = 32;

/// The workers among `workers` that placed jobs at the head of the queue
/// could run on: their free slots are the dispatcher's to hand out, by
/// priority, then arrival, so a new placed start does not take one,
/// whatever its priority. Otherwise it would race the dispatcher for the
/// slot that just freed (the worker refuses one of the two, and a refused
/// queued job falls behind the jobs taken after it), or overtake a job of
/// its own priority. Placed as the queue places them
/// ([`crate::placement::eligible_queued`]). Jobs named to a worker are
/// not read here; they can still race a placed start for their worker's
/// slot, which the worker settles (docs/ARCHITECTURE.md, queue).
async fn wanted(
    state: &AppState,
    workers: &[crate::store::WorkerRow],
) -> Result<std::collections::HashSet<String>, ApiError> {
    let queued = state.store.waiting_ahead(i32::MIN, "", AHEAD).await?;
    let mut wanted = std::collections::HashSet::new();
    for (row, entry) in &queued {
        if let Ok(on) = crate::placement::eligible_queued(workers, row, entry) {
            wanted.extend(on.into_iter().map(|w| w.worker_id));
        }
    }
    Ok(wanted)
}

/// What a start naming one worker asks the store as it records the job:
/// whether a queued job waits for that worker's slot (named to it, or one
/// of the first [`AHEAD`] placed ones able to run there), whatever its
/// priority (see [`wanted`]).
fn ahead_of(worker: &crate::store::WorkerRow) -> crate::store::Ahead {
    let named = worker.worker_id.clone();
    let workers = vec![worker.clone()];
    crate::store::Ahead {
        priority: i32::MIN,
        worker_id: named,
        limit: AHEAD,
        holds: Box::new(move |row, entry| {
            crate::placement::eligible_queued(&workers, row, entry).is_ok_and(|w| !w.is_empty())
        }),
    }
}

/// The code of a start that was not recorded because jobs queued before
/// it hold it back; it never reaches a client (the job queues instead).
const HELD_BACK: &str = "held_back";
const HELD_BACK_REASON: &str = "queued jobs wait for the slots it could take; the queue hands them out by priority, then arrival";

/// A worker's refusals for its storage: it would refuse any job the same
/// way until its disk is freed or repaired.
const STORAGE_REFUSALS: [&str; 2] = ["worker_storage_full", "worker_storage"];

/// Errors of a start that certainly started nothing for a reason of the
/// worker's, not the job's: another worker, or a later try, may take it.
const PASS_ON: [&str; 5] = [
    "worker_busy",
    "worker_unavailable",
    "worker_down",
    "worker_unresponsive",
    "worker_storage_full",
];

/// The worker a start names: it must exist and carry the selector's
/// labels; the third value says why it cannot take a job now (not ready,
/// draining, unresponsive), if it cannot.
async fn named_worker(
    state: &AppState,
    body: &StartJob,
) -> Result<(Arc<WorkerEntry>, crate::store::WorkerRow, Option<ApiError>), ApiError> {
    let worker = state
        .registry
        .find(&body.worker_id, &state.store)
        .await
        .ok_or_else(|| ApiError::worker_not_found(&body.worker_id))?;
    let w = worker.row();
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
    if w.plugins.is_empty() {
        original_start_shape(&w.name, body)?;
    }
    let unusable = if w.state != WorkerState::Ready {
        Some(ApiError::worker_not_ready(&w))
    } else if w.draining {
        Some(draining(&w.name))
    } else if !worker.wait_recorded(state.call_timeout).await {
        Some(ApiError::worker_registering(&w.name))
    } else {
        worker
            .unresponsive_since()
            .map(|since| ApiError::worker_unresponsive(&w.name, since))
    };
    Ok((worker, w, unusable))
}

/// A worker that names no plugins (one of the original design) is sent
/// the request's `command` as it is, with `path`, and nothing else: the
/// original `StartJob` has no arguments or environment, so a start that
/// needs them, or names no command, is refused rather than run without.
fn original_start_shape(worker: &str, body: &StartJob) -> Result<(), ApiError> {
    let why = if body.command.as_deref().unwrap_or_default().is_empty() {
        "names no plugins: the command to run it with (bash, python3, ...) is required"
    } else if !body.args.is_empty() || !body.env.is_empty() {
        "runs the original design's jobs, which take no args or env"
    } else {
        return Ok(());
    };
    Err(ApiError::bad_request(
        "invalid_request",
        format!("worker {worker} {why}"),
    ))
}

fn draining(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "worker_draining",
        format!("worker {name} is draining and takes no new jobs"),
    )
}

pub(crate) fn no_slot_on(name: &str, max_jobs: u32) -> String {
    format!("no free slot on worker {name} ({max_jobs} of {max_jobs} taken)")
}

pub(crate) fn no_slot_matching(selector: &jobcluster_proto::http::Selector) -> String {
    if selector.is_empty() {
        return "no free slot on any eligible worker".to_owned();
    }
    let labels: Vec<String> = selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("no free slot on workers matching {}", labels.join(","))
}

/// Records a job in the queue and wakes the dispatcher: `202 queued`, or
/// `429 queue_full` when `[scheduler] max_queued` jobs wait already.
async fn enqueue(
    state: &AppState,
    body: StartJob,
    worker_id: String,
    reason: String,
    key: Option<NewKey>,
    queue_timeout: Option<std::time::Duration>,
    group: Option<&str>,
) -> Result<JobStarted, ApiError> {
    let job_id = uuid::Uuid::new_v4().to_string();
    let now = now_ms();
    let row = JobRow {
        job_id: job_id.clone(),
        worker_id: worker_id.clone(),
        command: body.command.clone().unwrap_or_default(),
        path: body.path.clone(),
        args: body.args.clone(),
        state: JobState::Queued,
        error_text: String::new(),
        exit_code: None,
        signal: None,
        created_at_ms: now,
        started_at_ms: 0,
        finished_at_ms: 0,
        output_bytes: 0,
        group_id: group.map(str::to_owned),
        updated_at_ms: 0,
    };
    let entry = QueueEntry {
        job_id: job_id.clone(),
        priority: body.priority,
        queued_at_ms: now,
        worker_id: worker_id.clone(),
        selector: body.selector.clone(),
        env: body.env.clone(),
        deadline_ms: queue_timeout.map_or(0, |t| now.saturating_add(t.as_millis() as u64)),
        reason: reason.clone(),
    };
    let max = state.queue.max_queued;
    let Some(position) = state.store.enqueue_job(row, entry, key, max).await? else {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "queue_full",
            format!("{max} jobs are queued already ([scheduler] max_queued); try later"),
        ));
    };
    state.queue.wake();
    tracing::info!(%job_id, %worker_id, priority = body.priority, position, %reason, "job queued");
    Ok(JobStarted {
        worker_name: state.registry.get(&worker_id).map(|w| w.row().name),
        job_id,
        worker_id,
        state: Some(JobState::Queued.as_str().to_owned()),
        position: Some(position),
        reason: Some(reason),
    })
}

/// How placement over several workers ended without a start.
enum Refused {
    /// Each worker certainly started nothing (busy, unreachable, ...).
    AllPassedOn(Vec<String>),
    Failed(ApiError),
}

/// Tries `workers` in placement order. One that certainly started nothing
/// (busy, full, unreachable, unresponsive before the call) passes the job
/// on to the next; one whose answer is in doubt does not, or the job could
/// run twice.
async fn try_in_order(
    state: &AppState,
    body: &StartJob,
    key: Option<NewKey>,
    group: Option<&str>,
    workers: Vec<crate::store::WorkerRow>,
    mut passed_on: Vec<String>,
    running: &std::collections::HashMap<String, u64>,
) -> Result<JobStarted, Refused> {
    let turn = state
        .placement_turn
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    for row in crate::placement::order(workers, running, turn) {
        let Some(worker) = state.registry.get(&row.worker_id) else {
            continue;
        };
        match start_on(state, &worker, body.clone(), group, key.clone(), None).await {
            Err(e) if e.nothing_started && PASS_ON.contains(&e.error.code.as_str()) => {
                passed_on.push(format!("{}: {}", row.name, e.error.message));
            }
            result => return result.map_err(|e| Refused::Failed(e.error)),
        }
    }
    Err(Refused::AllPassedOn(passed_on))
}

/// A start that never waits: refused at once when no worker can take the
/// job now (the answers from before the queue).
async fn start_now(
    state: &AppState,
    body: StartJob,
    key: Option<NewKey>,
    group: Option<&str>,
) -> Result<JobStarted, ApiError> {
    if !body.worker_id.is_empty() {
        let (worker, _, unusable) = named_worker(state, &body).await?;
        if let Some(error) = unusable {
            return Err(error);
        }
        return start_on(state, &worker, body, group, key, None)
            .await
            .map_err(|e| e.error);
    }
    let rows = state.registry.all();
    let eligible =
        crate::placement::eligible(&rows, body.command.as_deref(), &body.path, &body.selector)
            .map_err(|why| ApiError::new(StatusCode::CONFLICT, "no_eligible_worker", why.0))?;
    // A worker whose calls time out is skipped at once, not waited for.
    let mut skipped = Vec::new();
    let eligible: Vec<_> = eligible
        .into_iter()
        .filter(|w| {
            let since = state
                .registry
                .get(&w.worker_id)
                .and_then(|e| e.unresponsive_since());
            if let Some(since) = since {
                skipped.push(format!("{}: unresponsive since {}", w.name, rfc3339(since)));
            }
            since.is_none()
        })
        .collect();
    let running = state.store.running_counts().await?;
    match try_in_order(state, &body, key, group, eligible, skipped, &running).await {
        Ok(started) => Ok(started),
        Err(Refused::Failed(error)) => Err(error),
        Err(Refused::AllPassedOn(passed_on)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "no_eligible_worker",
            format!(
                "every eligible worker is busy or unreachable ({})",
                passed_on.join("; ")
            ),
        )),
    }
}

/// Why a start failed, and whether the job's process certainly did not
/// start (then it is safe to try another worker).
#[derive(Debug)]
pub(crate) struct StartError {
    pub(crate) error: ApiError,
    pub(crate) nothing_started: bool,
}

impl StartError {
    fn nothing_started(error: ApiError) -> Self {
        StartError {
            error,
            nothing_started: true,
        }
    }
}

/// Starts the job on `worker` and records it (as a member of `group_id`,
/// with `key` bound to it).
pub(crate) async fn start_on(
    state: &AppState,
    worker: &Arc<WorkerEntry>,
    body: StartJob,
    group_id: Option<&str>,
    key: Option<NewKey>,
    ahead: Option<crate::store::Ahead>,
) -> Result<JobStarted, StartError> {
    // In a task of its own: a client that hangs up must not cancel this
    // between recording the job, the worker starting it, and the outcome
    // being recorded.
    let task = tokio::spawn(start_and_record(
        state.clone(),
        worker.clone(),
        body,
        group_id.map(str::to_owned),
        key,
        ahead,
    ));
    task.await.map_err(|e| StartError {
        error: ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("starting the job failed: {e}"),
        ),
        nothing_started: false,
    })?
}

async fn start_and_record(
    state: AppState,
    worker: Arc<WorkerEntry>,
    body: StartJob,
    group_id: Option<String>,
    key: Option<NewKey>,
    ahead: Option<crate::store::Ahead>,
) -> Result<JobStarted, StartError> {
    let state = &state;
    let w = worker.row();
    if let Some(since) = worker.unresponsive_since() {
        return Err(StartError::nothing_started(ApiError::worker_unresponsive(
            &w.name, since,
        )));
    }
    // Checked before the job is recorded: once true it stays true, so the
    // worker id the record names is one the store holds.
    if !worker.wait_recorded(state.call_timeout).await {
        return Err(StartError::nothing_started(ApiError::worker_registering(
            &w.name,
        )));
    }
    let job_id = uuid::Uuid::new_v4().to_string();
    let row = JobRow {
        job_id: job_id.clone(),
        worker_id: w.worker_id.clone(),
        command: body.command.clone().unwrap_or_default(),
        path: body.path.clone(),
        args: body.args.clone(),
        state: JobState::Unknown,
        error_text: format!("starting on worker {}; its answer is awaited", w.name),
        exit_code: None,
        signal: None,
        created_at_ms: now_ms(),
        started_at_ms: 0,
        finished_at_ms: 0,
        output_bytes: 0,
        group_id,
        updated_at_ms: 0,
    };
    // Recorded first (with its key): if the record cannot be written,
    // nothing starts.
    let recorded = match ahead {
        None => state
            .store
            .insert_job(row.clone(), key)
            .await
            .map(|()| true),
        Some(ahead) => {
            (state.store)
                .insert_job_unless_ahead(row.clone(), key, ahead)
                .await
        }
    }
    .map_err(|e| StartError::nothing_started(e.into()))?;
    if !recorded {
        return Err(StartError::nothing_started(ApiError::new(
            StatusCode::CONFLICT,
            HELD_BACK,
            HELD_BACK_REASON,
        )));
    }
    call_start(state, &worker, row, body.env, Refusal::Forget).await
}

/// What becomes of a recorded job whose start certainly started nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Its record goes (with its key): the caller may try elsewhere.
    Forget,
    /// It goes back to its place in the queue.
    Requeue,
    /// It stays taken for this worker and is asked about again: it was
    /// taken from the queue under an earlier leader, whose own start of it
    /// may still reach the worker, so it may not go to another.
    Retry,
}

/// Asks `worker` to start the job `row` records (`unknown` on that worker,
/// written before this call) and records the outcome. The worker's start
/// is idempotent by job id, so asking again about the same job is safe.
pub(crate) async fn call_start(
    state: &AppState,
    worker: &Arc<WorkerEntry>,
    mut row: JobRow,
    env: std::collections::BTreeMap<String, String>,
    refusal: Refusal,
) -> Result<JobStarted, StartError> {
    let w = worker.row();
    let job_id = row.job_id.clone();
    let request = StartJobRequest {
        command: row.command.clone(),
        path: row.path.clone(),
        args: row.args.clone(),
        env: env.into_iter().collect(),
        job_id: job_id.clone(),
    };
    let mut client = worker.client();
    // A worker of the original contract refuses with a plain error of its
    // own (its start failed to spawn anything).
    let seed_refused = |status: &tonic::Status| w.seed && crate::seed::from_peer(status);
    let reply = match with_deadline(state.call_timeout, client.start_job(request)).await {
        Ok(reply) => reply.into_inner(),
        // A worker still starting this very job (asked again after a
        // restart) is no refusal: the start is in doubt, settled below.
        Err(status)
            if (answered(&status) || nothing_sent(&status) || seed_refused(&status))
                && !worker_says(&status, "job_starting") =>
        {
            // The worker refused, or was never reached: nothing started.
            if unreachable(&status) {
                worker_unreachable(state, worker).await;
            }
            let error = if seed_refused(&status) {
                ApiError::bad_request(
                    "start_refused",
                    format!("worker {} refused the start: {}", w.name, status.message()),
                )
            } else {
                ApiError::from_worker(status, &w.name)
            };
            if STORAGE_REFUSALS.contains(&error.code.as_str()) {
                worker.refused_for_storage(now_ms());
                tracing::warn!(%job_id, worker_id = %w.worker_id, worker = %w.name, code = %error.code, "worker refused a start for its storage; queued jobs go to other workers for a while");
            }
            let undone = match refusal {
                Refusal::Forget => state.store.delete_unstarted_job(&job_id).await,
                // A refusal of the job itself (a script, plugin or env the
                // worker will not take) would be refused again on every
                // try: the job ends `failed` with it, as a direct start
                // would have answered it.
                Refusal::Requeue | Refusal::Retry
                    if !PASS_ON.contains(&error.code.as_str())
                        && error.code != "worker_storage" =>
                {
                    let why = format!("worker {} refused the job: {}", w.name, error.message);
                    tracing::info!(%job_id, worker = %w.name, code = %error.code, "queued job refused by its worker; it fails");
                    state.store.fail_unstarted(&job_id, &why).await
                }
                Refusal::Requeue => {
                    let reason = format!("worker {}: {}", w.name, error.message);
                    state.store.requeue(&job_id, &reason).await.map(|_| ())
                }
                Refusal::Retry => Ok(()),
            };
            if let Err(error) = undone {
                tracing::error!(%job_id, %error, ?refusal, "could not undo the record of a job that did not start");
            }
            return Err(StartError::nothing_started(error));
        }
        Err(status) => {
            // The worker may have started it. The job stays `unknown`
            // until the worker's reports settle it; it is never tried on
            // another worker.
            if status.code() == tonic::Code::DeadlineExceeded {
                worker_unreachable(state, worker).await;
            }
            tracing::warn!(%job_id, worker = %w.name, %status, "start outcome unknown");
            // A worker still starting this very job (a start from before a
            // restart or a leader change) has the outcome: the job keeps
            // its queue row, so a later pass asks that worker again (as
            // for any cut-off dispatch) rather than leaving the job with
            // no start, to be given up as lost.
            if refusal != Refusal::Forget && !worker_says(&status, "job_starting") {
                dequeue(state, &job_id).await;
            }
            return Err(StartError {
                error: start_unconfirmed(&job_id, &w.name, status.message()),
                nothing_started: false,
            });
        }
    };
    match &reply.status {
        Some(status) => merge_status(&mut row, status),
        None => {
            // The original contract's answer is the job id alone: the
            // process was spawned.
            row.state = JobState::Running;
            row.error_text.clear();
            row.started_at_ms = now_ms();
        }
    }
    let job_id = if reply.job_id.is_empty() || reply.job_id == job_id {
        job_id
    } else {
        match adopt_job_id(state, &w, &mut row, &reply.job_id, refusal).await {
            Ok(()) => row.job_id.clone(),
            Err(error) => {
                return Err(StartError {
                    error,
                    nothing_started: false,
                });
            }
        }
    };
    row.updated_at_ms = now_ms();
    // The record written before the call is the durable promise; this
    // update need not wait for a sync of its own.
    let recorded = {
        let (store, row, job_id, worker) = (
            state.store.clone(),
            row.clone(),
            job_id.clone(),
            w.name.clone(),
        );
        async move {
            match store.update_started(row).await {
                Ok(true) => {}
                // Reported or marked since (running, ended, given up
                // for lost_after): what came later stands (a worker still
                // running a given-up job is told to kill it).
                Ok(false) => {
                    tracing::debug!(%job_id, %worker, "the record heard of the job before its start's answer; that stands")
                }
                // The process runs: the answer says so; the worker's
                // reports will bring the record up to date.
                Err(error) => tracing::error!(%job_id, %error, "could not record the job's start"),
            }
        }
    };
    if refusal == Refusal::Forget {
        // A direct start's answer does not wait for it either: until it
        // lands the record says `unknown` on this worker, which a read of
        // the job settles by asking the worker, as after a crash here.
        // Saves a store round trip (0.3 ms) on every start's answer.
        tokio::spawn(recorded);
    } else {
        recorded.await;
        dequeue(state, &job_id).await;
    }
    tracing::info!(job_id = %job_id, worker_id = %w.worker_id, worker = %w.name, path = %row.path, state = %row.state, "job started");
    crate::metrics::job_started(
        &w.worker_id,
        &row.command,
        row.created_at_ms,
        refusal != Refusal::Forget,
    );
    Ok(JobStarted {
        job_id,
        worker_id: w.worker_id,
        worker_name: Some(w.name),
        ..Default::default()
    })
}

/// The worker started the job under an id of its own (a worker of the
/// original design chooses its job ids and ignores ours): from now on that
/// id is the job's, in the record, the queue and the idempotency key,
/// moved in one transaction; the id proposed to the worker names nothing
/// any more. An id the API could not take (not a UUID, or one that already
/// names another job) leaves the job unreachable on its worker: it is
/// recorded `lost`, saying why, and the start is answered with an error.
async fn adopt_job_id(
    state: &AppState,
    w: &crate::store::WorkerRow,
    row: &mut JobRow,
    theirs: &str,
    refusal: Refusal,
) -> Result<(), ApiError> {
    let ours = row.job_id.clone();
    let refused = if uuid::Uuid::parse_str(theirs).is_err() || theirs.len() > 64 {
        format!(
            "worker {} named the job {theirs:?}, which is not a UUID",
            w.name
        )
    } else {
        match state.store.rekey_job(&ours, theirs).await {
            Ok(true) => {
                tracing::info!(job_id = %theirs, proposed = %ours, worker_id = %w.worker_id, worker = %w.name, "the worker named the job itself; its id is the job's id");
                row.job_id = theirs.to_owned();
                return Ok(());
            }
            Ok(false) => format!(
                "worker {} named the job {theirs}, which already names another job",
                w.name
            ),
            Err(error) => {
                format!("the scheduler could not record the worker's job id {theirs}: {error}")
            }
        }
    };
    tracing::error!(job_id = %ours, worker_id = %w.worker_id, why = %refused, "the job runs under an id the scheduler cannot take; recorded lost");
    if refusal != Refusal::Forget {
        dequeue(state, &ours).await;
    }
    let why = format!("{refused}; it may run there, but cannot be followed");
    if let Err(error) = state.store.mark_job_lost(&ours, &w.worker_id, &why).await {
        tracing::error!(job_id = %ours, %error, "could not record a job lost");
    }
    Err(ApiError::new(StatusCode::BAD_GATEWAY, "worker_job_id_refused", why).with_job(&ours))
}

/// A dispatched job's start is settled (or in doubt, then the worker's
/// reports settle it): it leaves the queue, and its environment with it.
async fn dequeue(state: &AppState, job_id: &str) {
    if let Err(error) = state.store.dequeue(job_id).await {
        // The row only keeps the environment longer; a dispatch pass
        // retries the removal.
        tracing::error!(%job_id, %error, "could not remove a dispatched job from the queue");
    }
}

/// Jobs created before this time have no start in flight any more: the
/// record was written (the store may wait up to 5 s for its writer), then
/// the worker was called with `call_timeout`. Only such jobs may be given
/// up when their worker does not know them.
pub(crate) fn settled_before(call_timeout: std::time::Duration) -> u64 {
    const MARGIN: std::time::Duration = std::time::Duration::from_secs(10);
    now_ms().saturating_sub((call_timeout + MARGIN).as_millis() as u64)
}

/// Whether the worker answered with the API error `code`.
fn worker_says(status: &tonic::Status, code: &str) -> bool {
    status
        .metadata()
        .get(jobcluster_proto::ERROR_CODE_METADATA)
        .is_some_and(|v| v.as_bytes() == code.as_bytes())
}

/// The worker itself answered with an error (it carries the API code).
pub(crate) fn answered(status: &tonic::Status) -> bool {
    status
        .metadata()
        .contains_key(jobcluster_proto::ERROR_CODE_METADATA)
}

/// The call failed before any request reached the worker: the connection
/// was refused or its TLS handshake failed. Anything else (a reset or a
/// timeout mid-call) leaves the outcome in doubt.
fn nothing_sent(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            // Connecting failed (refused, timed out, no route) or the TLS
            // handshake did: no request was sent.
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::HostUnreachable
                    | std::io::ErrorKind::NetworkUnreachable
                    | std::io::ErrorKind::AddrNotAvailable
                    | std::io::ErrorKind::InvalidData
            );
        }
        source = error.source();
    }
    false
}

/// Whether a failed call says the worker cannot answer now: it timed out,
/// or nothing is listening at its address.
pub(crate) fn unreachable(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::DeadlineExceeded || (!answered(status) && nothing_sent(status))
}

/// A call to `worker` timed out or found nobody: from now on it is
/// unresponsive until it is heard from, and its running jobs read `unknown`.
pub(crate) async fn worker_unreachable(state: &AppState, worker: &WorkerEntry) {
    let now = now_ms();
    if worker.mark_unresponsive(now) {
        let row = worker.row();
        tracing::warn!(worker_id = %row.worker_id, worker = %row.name, "worker did not answer; marked unresponsive");
        let why = format!(
            "worker {} has not answered since {}; not yet given up",
            row.name,
            rfc3339(now)
        );
        crate::grpc::record_unknown(&state.store, &row, &why).await;
    }
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
    let row = match state.finished.get(job_id) {
        Some(row) => row,
        None => {
            let row = state
                .store
                .job(job_id)
                .await?
                .ok_or_else(|| ApiError::job_not_found(job_id))?;
            state.finished.keep(&row);
            row
        }
    };
    if let Some(worker) = worker {
        let entry = state
            .registry
            .find(worker, &state.store)
            .await
            .ok_or_else(|| ApiError::worker_not_found(worker))?;
        if entry.id() != row.worker_id {
            return Err(ApiError::job_not_found(job_id));
        }
    }
    Ok(row)
}

/// The worker that owns a job, if it can be asked now. A worker that is
/// down, gone or unresponsive is answered for at once (503) instead of
/// after a timeout.
pub(crate) async fn worker_of(
    state: &AppState,
    row: &JobRow,
) -> Result<Arc<WorkerEntry>, ApiError> {
    let worker = state
        .registry
        .find(&row.worker_id, &state.store)
        .await
        .ok_or_else(|| ApiError::worker_not_found(&row.worker_id))?;
    let w = worker.row();
    if w.state != WorkerState::Ready {
        return Err(ApiError::worker_not_ready(&w));
    }
    if let Some(since) = worker.unresponsive_since() {
        return Err(ApiError::worker_unresponsive(&w.name, since));
    }
    Ok(worker)
}

/// A job as the API shows it: its record, and whether that record could
/// not be checked with the worker just now.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub(crate) row: JobRow,
    pub(crate) stale: bool,
}

impl Seen {
    pub(crate) fn info(&self) -> JobInfo {
        job_info(&self.row, self.stale)
    }

    /// As listings show it, without `args`.
    pub(crate) fn summary(&self) -> JobInfo {
        job_summary(&self.row, self.stale)
    }
}

/// A job that has not ended, brought up to date from its worker within
/// `refresh_timeout`. If the worker cannot answer in time, the record is
/// what we know, marked stale. A terminal record is final and not asked about.
pub(crate) async fn refresh(state: &AppState, row: JobRow) -> Seen {
    // A queued job is on no worker yet: the record is all there is.
    if row.state.is_terminal() || row.state == JobState::Queued {
        return Seen { row, stale: false };
    }
    let Ok(worker) = worker_of(state, &row).await else {
        return Seen { row, stale: true };
    };
    let mut client = worker.client();
    let request = QueryJobRequest {
        job_id: row.job_id.clone(),
    };
    // A worker of the original contract answers a query with an error only
    // when it does not know the job.
    let seed = worker.row().seed;
    match with_deadline(state.refresh_timeout, client.query_job(request)).await {
        Ok(reply) => record_status(&state.store, row, &reply.into_inner()).await,
        Err(status)
            if (status.code() == tonic::Code::NotFound && answered(&status))
                || (seed && crate::seed::from_peer(&status)) =>
        {
            // A start still in flight may not have reached the worker yet.
            if row.created_at_ms >= settled_before(state.call_timeout) {
                return Seen { row, stale: false };
            }
            let why =
                "its worker does not know the job (it never started there, or its record was lost)";
            if let Err(error) = state
                .store
                .mark_job_lost(&row.job_id, &row.worker_id, why)
                .await
            {
                tracing::error!(job_id = %row.job_id, %error, "could not record a job lost");
            }
            tracing::warn!(job_id = %row.job_id, worker_id = %row.worker_id, "job lost: its worker does not know it");
            let row = state
                .store
                .job(&row.job_id)
                .await
                .ok()
                .flatten()
                .unwrap_or(row);
            Seen { row, stale: false }
        }
        Err(status) => {
            tracing::debug!(job_id = %row.job_id, %status, "could not refresh job from its worker");
            if unreachable(&status) {
                worker_unreachable(state, &worker).await;
            }
            let row = match state.store.job(&row.job_id).await {
                Ok(Some(latest)) => latest,
                _ => row,
            };
            Seen { row, stale: true }
        }
    }
}

/// Records a worker's answer about a job and returns what the API may
/// show: what was stored. A state that could not be stored is not shown
/// (it could not be kept as a promise): the stored record is, marked stale.
pub(crate) async fn record_status(
    store: &SharedStore,
    mut row: JobRow,
    status: &pb::QueryJobResponse,
) -> Seen {
    let before = row.clone();
    merge_status(&mut row, status);
    if row == before {
        return Seen { row, stale: false };
    }
    // Written as of now: the row shown is then the record as stored.
    row.updated_at_ms = now_ms();
    match store.update_job(row.clone()).await {
        Ok(true) => Seen { row, stale: false },
        // The record holds a final state that wins; show that.
        Ok(false) => match store.job(&row.job_id).await {
            Ok(Some(kept)) => Seen {
                row: kept,
                stale: false,
            },
            _ => Seen {
                row: before,
                stale: true,
            },
        },
        Err(error) => {
            tracing::error!(job_id = %row.job_id, %error, "could not record job status");
            Seen {
                row: before,
                stale: true,
            }
        }
    }
}

/// How often a stop tries to end a queued job the dispatcher keeps taking
/// and putting back before it answers `job_starting`.
const STOP_QUEUED_TRIES: usize = 3;

/// `503 job_starting`: the job's start is not settled (just dispatched);
/// a stop is asked again shortly.
fn job_starting(row: &JobRow) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "job_starting",
        format!(
            "job {} is not running yet (its start is not settled); stop it again shortly",
            row.job_id
        ),
    )
    .with_job(&row.job_id)
}

pub(crate) async fn stop_job(state: &AppState, mut row: JobRow) -> Result<StopResult, ApiError> {
    // Unless the dispatcher took it meanwhile, it ends without starting.
    // Taken, it may be put back at once (its worker busy): then it is
    // queued again, and stopped as such.
    for _ in 0..STOP_QUEUED_TRIES {
        if row.state != JobState::Queued {
            break;
        }
        if state.store.stop_queued(&row.job_id).await? {
            tracing::info!(job_id = %row.job_id, "queued job stopped; it never started");
            state.queue.left();
            return Ok(StopResult {
                success: true,
                state: JobState::Stopped.as_str().to_owned(),
            });
        }
        row = state
            .store
            .job(&row.job_id)
            .await?
            .ok_or_else(|| ApiError::job_not_found(&row.job_id))?;
    }
    if row.state == JobState::Queued {
        // Taken and put back each time: a worker of it is not asked (it
        // has nothing to stop), the caller asks again.
        return Err(job_starting(&row));
    }
    let seen = refresh(state, row).await;
    let row = seen.row;
    if row.state.is_terminal() {
        return Ok(StopResult {
            success: true,
            state: row.state.as_str().to_owned(),
        });
    }
    let worker = worker_of(state, &row).await?;
    let name = worker.row().name;
    let mut client = worker.client();
    let request = StopJobRequest {
        job_id: row.job_id.clone(),
    };
    if let Err(status) = with_deadline(state.call_timeout, client.stop_job(request)).await {
        if unreachable(&status) {
            worker_unreachable(state, &worker).await;
        }
        // A job whose start has not reached its worker yet (one the
        // dispatcher just took) is not unknown to us: the caller may stop
        // it again shortly, not give up on it as missing.
        if status.code() == tonic::Code::NotFound
            && row.state == JobState::Unknown
            && row.started_at_ms == 0
        {
            return Err(job_starting(&row));
        }
        return Err(ApiError::from_worker(status, &name));
    }
    tracing::info!(job_id = %row.job_id, worker = %name, "job stop requested");
    if worker.row().seed {
        // A worker of the original contract kills the process and then
        // only says it ended with an error; the stop is what ended it.
        let now = now_ms();
        let stopped = JobRow {
            state: JobState::Stopped,
            error_text: "stopped by a request".to_owned(),
            finished_at_ms: now,
            updated_at_ms: now,
            ..row.clone()
        };
        if let Err(error) = state.store.update_job(stopped).await {
            tracing::error!(job_id = %row.job_id, %error, "could not record a job stopped");
        }
        let row = state.store.job(&row.job_id).await?.unwrap_or(row);
        return Ok(StopResult {
            success: true,
            state: row.state.as_str().to_owned(),
        });
    }
    let row = refresh(state, row).await.row;
    Ok(StopResult {
        success: true,
        state: row.state.as_str().to_owned(),
    })
}

/// Settles jobs left `unknown` on workers that answer again (a start whose
/// outcome was in doubt, a scheduler restart mid-start): each is asked
/// about once a second until its worker's answer makes it running or
/// final. Runs until `stop` fires.
pub(crate) async fn settle_unknown(state: AppState, stop: tokio_util::sync::CancellationToken) {
    const BATCH: u32 = 100;
    loop {
        tokio::select! {
            () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            () = stop.cancelled() => return,
        }
        let before = settled_before(state.call_timeout);
        // One query for the whole cluster, not one per worker: with
        // thousands of workers, a query each per second was most of what
        // the scheduler spent.
        let workers = match state.store.workers_with_unknown_jobs().await {
            Ok(workers) => workers,
            Err(error) => {
                tracing::error!(%error, "could not read unknown jobs");
                continue;
            }
        };
        for id in workers {
            let Some(entry) = state.registry.get(&id).filter(|e| e.has_id(&id)) else {
                continue;
            };
            if !entry.usable() {
                continue;
            }
            let rows = match state.store.unknown_jobs(&entry.id(), before, BATCH).await {
                Ok(rows) => rows,
                Err(error) => {
                    tracing::error!(%error, "could not read unknown jobs");
                    continue;
                }
            };
            for row in rows {
                if refresh(&state, row).await.stale {
                    break; // its worker stopped answering; try later
                }
            }
        }
    }
}

/// Passes the worker's output stream through as a chunked body, on a
/// worker stream shared with the job's other followers where one holds
/// the bytes it starts from (`api::tap`). The body pulls from the stream
/// only as the client reads: a lone slow reader holds the worker back
/// through flow control, and one sharing a stream holds at most
/// `tap::WINDOW` before it goes on alone. When the last reader of a
/// stream leaves, the stream is dropped, which cancels it on the worker.
pub(crate) async fn stream_output(
    state: &AppState,
    row: JobRow,
    offset: u64,
    follow: bool,
    trailer: Trailer,
) -> Result<Response, ApiError> {
    // 409, not 503: the job's state, not the scheduler, is why there is
    // no output yet.
    if row.state == JobState::Queued {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "job_not_started",
            format!(
                "job {} is queued: no worker runs it yet; try again once it started",
                row.job_id
            ),
        )
        .with_job(&row.job_id));
    }
    let slot = state.followers.enter(&row.job_id)?;
    // Followers of one job, and readers of a finished job's log, share a
    // worker stream where one already holds their bytes (`tap`); a read of
    // a running job without `follow` stops at what there was when it
    // asked, so it reads on its own.
    let shared = follow || row.state.is_terminal();
    let joined = match shared {
        true => state.taps.join(&row.job_id, follow, offset).await,
        false => Joined::Alone,
    };
    let tap = match joined {
        Joined::Tap(tap) => tap,
        joined => {
            let output = open_stream(state, &row, offset, follow).await?;
            let reopen = reopener(state, &row, follow);
            match joined {
                Joined::Open(opener) => opener.opened(offset, output, reopen),
                _ => Taps::alone(&row.job_id, follow, offset, output, reopen),
            }
        }
    };
    let store = state.store.clone();
    let job_id = row.job_id.clone();
    let relay = Relay {
        tap,
        row: Some(row),
        trailer,
        store,
        _slot: slot,
    };
    let frames = futures_util::stream::unfold(relay, |mut relay| async move {
        let frame = relay.next().await?;
        Some((frame, relay))
    });
    let mut response = (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::HeaderName::from_static("x-job-id"), job_id),
        ],
        Body::new(http_body_util::StreamBody::new(frames)),
    )
        .into_response();
    if trailer == Trailer::Record {
        announce_trailer(&mut response, JOB_TRAILER);
    }
    Ok(response)
}

/// Opens a worker stream of `row`'s output from `offset`.
async fn open_stream(
    state: &AppState,
    row: &JobRow,
    offset: u64,
    follow: bool,
) -> Result<crate::output_stream::Output, ApiError> {
    let worker = worker_of(state, row).await?;
    let name = worker.row().name;
    if worker.row().seed {
        return Err(ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "output_unavailable",
            format!(
                "worker {name} speaks the original design's contract, which has no output stream"
            ),
        )
        .with_job(&row.job_id));
    }
    let request = StreamJobRequest {
        job_id: row.job_id.clone(),
        offset,
        follow: Some(follow),
    };
    let opening = crate::output_stream::open(worker.channel(), request);
    let stream = match with_deadline(state.call_timeout, opening).await {
        Ok(stream) => stream,
        Err(status) => {
            if unreachable(&status) {
                worker_unreachable(state, &worker).await;
            }
            // A job whose start is not settled yet is not unknown to us:
            // the caller may wait for it (503), not give up on it (404).
            if status.code() == tonic::Code::NotFound && row.state == JobState::Unknown {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "job_not_started",
                    format!(
                        "job {} is not running on worker {name} yet (its start is not settled); try again shortly",
                        row.job_id
                    ),
                )
                .with_job(&row.job_id));
            }
            return Err(ApiError::from_worker(status, &name));
        }
    };
    Ok(stream)
}

/// [`open_stream`] again from another offset, for a follower that falls
/// behind a shared stream: the same checks, deadline and news of a worker
/// that cannot be reached; a failure cuts that follower's body.
fn reopener(state: &AppState, row: &JobRow, follow: bool) -> Reopen {
    let (state, row) = (state.clone(), row.clone());
    Arc::new(move |offset| {
        let (state, row) = (state.clone(), row.clone());
        Box::pin(async move {
            open_stream(&state, &row, offset, follow)
                .await
                .map_err(|error| tonic::Status::unavailable(error.message))
        })
    })
}

/// Announces the trailer `name` that may end `response`'s body: HTTP/1.1
/// sends only the trailers announced (to a client that accepts them);
/// HTTP/2 always sends them.
pub(crate) fn announce_trailer(response: &mut Response, name: &'static str) {
    response
        .headers_mut()
        .insert(header::TRAILER, HeaderValue::from_static(name));
}

/// Whether an output stream ends with the job's record ([`JOB_TRAILER`]):
/// `/v1` streams do; the original design's `/stream` keeps its own
/// contract, which has none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trailer {
    Record,
    None,
}

/// One output stream passed from its worker to an API client.
struct Relay {
    tap: super::tap::Tap,
    /// The job's record until its end came (or the stream broke).
    row: Option<JobRow>,
    trailer: Trailer,
    store: SharedStore,
    /// Held while the stream is open (the job's count of followers).
    _slot: super::FollowerSlot,
}

impl Relay {
    async fn next(&mut self) -> Option<Result<Frame<Bytes>, std::io::Error>> {
        let current = self.row.take()?;
        match self.tap.next().await {
            Ok(Piece::Data(data)) => {
                crate::metrics::output_streamed(data.len());
                self.row = Some(current);
                Some(Ok(Frame::data(data)))
            }
            Ok(Piece::Final(status)) => {
                // Record the final state before the body ends, so a client
                // that asks right after sees it.
                let seen = record_status(&self.store, current, &status).await;
                match self.trailer {
                    Trailer::Record => end_trailer(&seen).map(|end| Ok(Frame::trailers(end))),
                    Trailer::None => None,
                }
            }
            Ok(Piece::Ended) => None,
            Err(status) => {
                tracing::info!(job_id = %current.job_id, %status, "output stream from worker broke");
                // An error ends the body without its last chunk, so the
                // client sees a cut stream and can resume from its offset.
                Some(Err(std::io::Error::other(status.message().to_owned())))
            }
        }
    }
}

/// The [`JOB_TRAILER`] for a job's recorded end; none when it could not be
/// recorded (the client then asks, and sees what the store holds).
fn end_trailer(seen: &Seen) -> Option<HeaderMap> {
    if seen.stale || !seen.row.state.is_terminal() {
        return None;
    }
    json_trailer(JOB_TRAILER, &job_summary(&seen.row, false), JOB_TRAILER_MAX)
}

/// One trailer whose value is `value` as JSON; none past `max` bytes (the
/// client then asks for the record instead).
pub(crate) fn json_trailer(
    name: &'static str,
    value: &impl serde::Serialize,
    max: usize,
) -> Option<HeaderMap> {
    let json = serde_json::to_vec(value).ok()?;
    if json.len() > max {
        return None;
    }
    let value = HeaderValue::from_bytes(&json).ok()?;
    let mut trailers = HeaderMap::with_capacity(1);
    trailers.insert(name, value);
    Some(trailers)
}
