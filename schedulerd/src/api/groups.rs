//! `/v1/groups`: one job per matching ready worker under one group id, the
//! group's state, stopping all of it, and its outputs merged line by line.

use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::Bytes;
use http_body::Frame;
use jobcluster_proto::http::{
    GROUP_TRAILER, GROUP_TRAILER_MAX, GroupFailure, GroupInfo, GroupList, GroupLogLine,
    GroupLogsQuery, GroupStarted, JobStarted, StartGroup, StartJob, StopResult, limits,
};
use jobcluster_proto::pb::StreamJobRequest;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::extract::{JsonBody, QueryParams};
use super::idempotency::{self, IdempotencyKey};
use super::jobs::{
    Seen, announce_trailer, json_trailer, record_status, refresh, start_job, started_status,
    stop_job, worker_of,
};
use super::{ApiError, AppState, FollowerSlot, with_deadline};
use crate::state::JobState;
use crate::store::{GroupRow, JobRow, KeyRow};
use crate::time::{now_ms, rfc3339};

/// Merged lines buffered for the reader: a slow reader holds every job's
/// stream back through this bound, never memory.
const MERGE_BUFFER: usize = 64;
const LIST_LIMIT: u32 = 100;

#[utoipa::path(
    post,
    path = "/v1/groups",
    operation_id = "start_group",
    tag = "groups",
    params(("Idempotency-Key" = Option<String>, Header, description = "1 to 255 visible ASCII characters; a request repeating it within 24 h gets the group it started and starts nothing.")),
    request_body = StartGroup,
    responses(
        (status = 201, description = "Started on at least one worker; `failed` lists the workers that could not start it. A member whose worker did not confirm its start in time is listed with `state` `unknown`: its job may be running, and is the group's.", body = GroupStarted, headers(("Idempotent-Replayed" = String, description = "`true` when this repeats an earlier request's outcome (same Idempotency-Key)."))),
        (status = 400, description = "`invalid_json`, `invalid_request` (a field is wrong, or neither `all` nor a `selector`), `invalid_body`, `invalid_idempotency_key`, `invalid_path`, or every worker's same refusal: `invalid_path`, `unknown_plugin`, `env_not_allowed`, `invalid_request`.", body = jobcluster_proto::http::ErrorBody),
        (status = 409, description = "`no_eligible_worker` (no ready worker has the plugin or matches the selector), `idempotency_key_in_use`.", body = jobcluster_proto::http::ErrorBody),
        (status = 413, description = "`request_too_large` (args or env over a bound) or `payload_too_large` (body over 1 MiB).", body = jobcluster_proto::http::ErrorBody),
        (status = 422, description = "`idempotency_key_reused`: the key was used for another request within 24 h.", body = jobcluster_proto::http::ErrorBody),
        (status = 429, description = "`worker_busy`: every worker refused, each running its `max_jobs`.", body = jobcluster_proto::http::ErrorBody),
        (status = 500, description = "`internal`: the fan-out's task failed (a bug).", body = jobcluster_proto::http::ErrorBody),
        (status = 503, description = "`group_failed` (no worker could start the job, not all for the same fault of the request; the message says why for each), `store_unavailable`.", body = jobcluster_proto::http::ErrorBody),
    ),
)]
pub(crate) async fn create(
    State(state): State<AppState>,
    IdempotencyKey(key): IdempotencyKey,
    JsonBody(body): JsonBody<StartGroup>,
) -> Result<Response, ApiError> {
    limits::check(&body.args, &body.env).map_err(ApiError::request_too_large)?;
    let (request, claim) = match key {
        None => (None, None),
        Some(key) => {
            let request = idempotency::Request::new(key, "/v1/groups", &body);
            match request.claim(&state.claims, &state.store).await? {
                Ok(claim) => (Some(request), Some(claim)),
                Err(bound) => return replay_group(&state, &bound).await,
            }
        }
    };
    // In a task of its own, holding the key's claim: a client that hangs
    // up must not cut the fan-out short before its outcome is recorded.
    let task = tokio::spawn(async move {
        let _claim = claim;
        start_group(&state, body, request).await
    });
    let started = task.await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("starting the group failed: {e}"),
        )
    })??;
    Ok((group_status(&started.jobs), Json(started)).into_response())
}

/// The answer to a request that repeats the key of the fan-out that made
/// `bound`'s group: the group's jobs as they are now (a member whose start
/// is unconfirmed is listed, `unknown`, as the first answer lists it) and
/// the refusals recorded with it.
async fn replay_group(state: &AppState, bound: &KeyRow) -> Result<Response, ApiError> {
    let group_id = bound.group_id.as_deref().ok_or_else(|| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            "this Idempotency-Key was used within the last 24 h for a job; use a new key",
        )
    })?;
    let (group, jobs) = find_group(state, group_id).await?;
    let jobs = refreshed(state, jobs).await;
    tracing::info!(group_id = %group.group_id, key = %bound.key, jobs = jobs.len(), "group start repeated with its idempotency key; answering its group");
    if jobs.is_empty() {
        return Ok(idempotency::replayed(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "group_failed",
            "no worker could start the job",
        )));
    }
    let jobs: Vec<JobStarted> = jobs
        .into_iter()
        .map(|seen| JobStarted {
            job_id: seen.row.job_id,
            worker_name: state
                .registry
                .get(&seen.row.worker_id)
                .map(|w| w.row().name),
            worker_id: seen.row.worker_id,
            state: Some(seen.row.state.as_str().to_owned()),
            ..Default::default()
        })
        .collect();
    Ok(idempotency::replayed((
        group_status(&jobs),
        Json(GroupStarted {
            group_id: group.group_id,
            jobs,
            failed: group.failed,
        }),
    )))
}

/// `202` while any member waits in the queue, else `201`, as for a job.
fn group_status(jobs: &[JobStarted]) -> StatusCode {
    jobs.iter()
        .map(started_status)
        .max()
        .unwrap_or(StatusCode::CREATED)
}

/// Starts one job per eligible worker under a new group, recorded with
/// `request`'s key bound to it.
async fn start_group(
    state: &AppState,
    body: StartGroup,
    request: Option<idempotency::Request>,
) -> Result<GroupStarted, ApiError> {
    if body.path.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_path",
            "path: must name a script",
        ));
    }
    if !body.all && body.selector.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_request",
            "say which workers: \"all\": true, or a \"selector\"",
        ));
    }
    let rows = state.registry.all();
    let targets =
        crate::placement::eligible(&rows, body.command.as_deref(), &body.path, &body.selector)
            .map_err(|why| ApiError::new(StatusCode::CONFLICT, "no_eligible_worker", why.0))?;
    let group_id = uuid::Uuid::new_v4().to_string();
    state
        .store
        .insert_group(
            GroupRow {
                group_id: group_id.clone(),
                command: body.command.clone().unwrap_or_default(),
                path: body.path.clone(),
                args: body.args.clone(),
                created_at_ms: now_ms(),
                failed: Vec::new(),
            },
            request.as_ref().map(idempotency::Request::binding),
        )
        .await?;
    // Each member is a start on its worker: it starts now, or waits in
    // the queue for a slot there (a full worker queues it, like any job
    // that names its worker).
    let starts = targets.iter().map(|row| {
        let group_id = &group_id;
        let job = StartJob {
            worker_id: row.worker_id.clone(),
            selector: Default::default(),
            command: body.command.clone(),
            path: body.path.clone(),
            args: body.args.clone(),
            env: body.env.clone(),
            ..Default::default()
        };
        async move {
            let result = start_job(state, job, None, Some(group_id)).await;
            (row, result)
        }
    });
    let mut started = GroupStarted {
        group_id: group_id.clone(),
        jobs: Vec::new(),
        failed: Vec::new(),
    };
    let mut refusals = Vec::new();
    // A worker that fails to start does not hide the others.
    for (row, result) in futures_util::future::join_all(starts).await {
        match result {
            Ok(job) => started.jobs.push(job),
            // A start in doubt is no refusal: its job is the group's, may
            // be running, and ends as it ends. It is listed as a replay
            // lists it, so that the answer does not depend on whether the
            // client heard the first one.
            Err(ApiError {
                code,
                job_id: Some(job_id),
                ..
            }) if code == "start_unconfirmed" => started.jobs.push(JobStarted {
                job_id,
                worker_id: row.worker_id.clone(),
                worker_name: Some(row.name.clone()),
                state: Some(JobState::Unknown.as_str().to_owned()),
                ..Default::default()
            }),
            Err(e) => {
                refusals.push((e.status, e.code.clone()));
                started.failed.push(GroupFailure {
                    worker_id: row.worker_id.clone(),
                    error: e.message,
                });
            }
        }
    }
    tracing::info!(group_id = %group_id, jobs = started.jobs.len(), failed = started.failed.len(), path = %body.path, "group started");
    // Kept with the group: a worker that never started its job makes the
    // group fail, for whoever reads or follows it later.
    if !started.failed.is_empty()
        && let Err(error) = state
            .store
            .record_group_failures(&group_id, started.failed.clone())
            .await
    {
        tracing::error!(%group_id, %error, "could not record the workers a group's job could not start on");
    }
    if started.jobs.is_empty() {
        // Nothing started (nor may have): a retry with the key tries again.
        if let Some(request) = request.as_ref()
            && let Err(error) = state.store.unbind_group_key(&request.key, &group_id).await
        {
            tracing::error!(%group_id, %error, "could not unbind the idempotency key of a group that started nothing");
        }
        let why: Vec<_> = started.failed.iter().map(|f| f.error.as_str()).collect();
        // Every worker refused the request alike for what it asks (a
        // script or plugin none has, a bad env, all busy): that is the
        // answer, not a failure of the scheduler's.
        let (status, code) = match refusals.first() {
            Some((status, code))
                if matches!(
                    *status,
                    StatusCode::BAD_REQUEST
                        | StatusCode::PAYLOAD_TOO_LARGE
                        | StatusCode::TOO_MANY_REQUESTS
                ) && refusals.iter().all(|r| r == &refusals[0]) =>
            {
                (*status, code.as_str())
            }
            _ => (StatusCode::SERVICE_UNAVAILABLE, "group_failed"),
        };
        return Err(ApiError::new(
            status,
            code,
            format!("no worker could start the job: {}", why.join("; ")),
        ));
    }
    Ok(started)
}

async fn find_group(state: &AppState, id: &str) -> Result<(GroupRow, Vec<JobRow>), ApiError> {
    if uuid::Uuid::parse_str(id).is_err() {
        return Err(ApiError::bad_request(
            "invalid_group_id",
            format!("{id:?} is not a group id (a UUID)"),
        ));
    }
    state.store.group(id).await?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "group_not_found",
            format!("unknown group {id}"),
        )
    })
}

/// `running` while any job runs (or may: `unknown`) or waits to
/// (`queued`); then `succeeded` only if all succeeded and every worker
/// started its job, else `failed` (a job failed or was lost, or a worker
/// could not start it) or `stopped`.
fn group_state<'a>(
    jobs: impl IntoIterator<Item = &'a JobRow>,
    start_failures: usize,
) -> &'static str {
    let states: Vec<JobState> = jobs.into_iter().map(|j| j.state).collect();
    let any = |s: &[JobState]| states.iter().any(|j| s.contains(j));
    if any(&[JobState::Running, JobState::Unknown, JobState::Queued]) {
        "running"
    } else if any(&[JobState::Failed, JobState::Lost]) || states.is_empty() || start_failures > 0 {
        "failed"
    } else if any(&[JobState::Stopped]) {
        "stopped"
    } else {
        "succeeded"
    }
}

/// A group as its store rows say, without `args`: what a refresh gives
/// for settled jobs, as no worker is asked.
fn recorded_group_info(group: GroupRow, jobs: Vec<JobRow>) -> GroupInfo {
    let jobs: Vec<Seen> = jobs
        .into_iter()
        .map(|row| Seen { row, stale: false })
        .collect();
    group_info(group, &jobs, false)
}

/// A group, with its `args` when `with_args` (one group shown) and never
/// its jobs' (they are the group's).
fn group_info(group: GroupRow, jobs: &[Seen], with_args: bool) -> GroupInfo {
    let state = group_state(jobs.iter().map(|s| &s.row), group.failed.len());
    GroupInfo {
        group_id: group.group_id,
        state: state.to_owned(),
        done: state != "running",
        created_at: rfc3339(group.created_at_ms),
        command: group.command,
        path: group.path,
        args: with_args.then_some(group.args),
        jobs: jobs.iter().map(Seen::summary).collect(),
        failed: group.failed,
    }
}

async fn refreshed(state: &AppState, jobs: Vec<JobRow>) -> Vec<Seen> {
    futures_util::future::join_all(jobs.into_iter().map(|j| refresh(state, j))).await
}

#[utoipa::path(
    get,
    path = "/v1/groups/{id}",
    operation_id = "show_group",
    tag = "groups",
    params(("id" = uuid::Uuid, Path, description = "The group id.")),
    responses(
        (status = 200, description = "The group and its jobs, asked of their workers first.", body = GroupInfo),
        (status = 400, description = "`invalid_group_id`: not a UUID.", body = jobcluster_proto::http::ErrorBody),
        (status = 404, description = "`group_not_found`.", body = jobcluster_proto::http::ErrorBody),
        (status = 503, description = "`store_unavailable`.", body = jobcluster_proto::http::ErrorBody),
    ),
)]
pub(crate) async fn show(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<GroupInfo>, ApiError> {
    let (group, jobs) = find_group(&state, &id).await?;
    let jobs = refreshed(&state, jobs).await;
    Ok(Json(group_info(group, &jobs, true)))
}

#[utoipa::path(
    get,
    path = "/v1/groups",
    operation_id = "list_groups",
    tag = "groups",
    responses(
        (status = 200, description = "The newest 100 groups, without `args`.", body = GroupList),
        (status = 503, description = "`store_unavailable`.", body = jobcluster_proto::http::ErrorBody),
    ),
)]
pub(crate) async fn list(State(state): State<AppState>) -> Result<Json<GroupList>, ApiError> {
    let mut groups = Vec::new();
    for group in state.store.groups(LIST_LIMIT).await? {
        if let Some((group, jobs)) = state.store.group(&group.group_id).await? {
            groups.push(recorded_group_info(group, jobs));
        }
    }
    Ok(Json(GroupList { groups }))
}

#[utoipa::path(
    post,
    path = "/v1/groups/{id}/stop",
    operation_id = "stop_group",
    tag = "groups",
    params(("id" = uuid::Uuid, Path, description = "The group id.")),
    responses(
        (status = 200, description = "Every member that could be stopped is; `state` is the group's.", body = StopResult),
        (status = 400, description = "`invalid_group_id`: not a UUID.", body = jobcluster_proto::http::ErrorBody),
        (status = 404, description = "`group_not_found`.", body = jobcluster_proto::http::ErrorBody),
        (status = 503, description = "`store_unavailable`.", body = jobcluster_proto::http::ErrorBody),
    ),
)]
pub(crate) async fn stop(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<StopResult>, ApiError> {
    let (_, jobs) = find_group(&state, &id).await?;
    let stops = jobs.into_iter().map(|job| stop_settled(&state, job));
    for result in futures_util::future::join_all(stops).await {
        // A member on a worker that is gone is lost, not stoppable; the
        // others are stopped regardless.
        if let Err(error) = result {
            tracing::warn!(group_id = %id, error = %error.message, "could not stop a group member");
        }
    }
    let (group, jobs) = find_group(&state, &id).await?;
    let jobs = refreshed(&state, jobs).await;
    Ok(Json(StopResult {
        success: true,
        state: group_state(jobs.iter().map(|s| &s.row), group.failed.len()).to_owned(),
    }))
}

/// Stops a member; one whose start has not reached its worker yet (just
/// dispatched: `job_starting`) is asked again until it has, for as long
/// as a start may take.
async fn stop_settled(state: &AppState, mut job: JobRow) -> Result<StopResult, ApiError> {
    let until = tokio::time::Instant::now() + state.call_timeout;
    let mut pause = Duration::from_millis(50);
    loop {
        match stop_job(state, job.clone()).await {
            Err(e) if e.code == "job_starting" && tokio::time::Instant::now() < until => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(500));
                if let Some(row) = state.store.job(&job.job_id).await? {
                    job = row;
                }
            }
            other => return other,
        }
    }
}

/// Every member's output, line by line as lines complete, each line marked
/// with its worker: `[w1] line` (text) or a [`GroupLogLine`] (ndjson). A
/// member's partial last line is completed when its job ends.
#[utoipa::path(
    get,
    path = "/v1/groups/{id}/logs",
    operation_id = "group_logs",
    tag = "groups",
    params(("id" = uuid::Uuid, Path, description = "The group id."), GroupLogsQuery),
    responses(
        (status = 200, description = "Every member's output merged line by line as lines complete (chunked): `[worker] line` (text), or one GroupLogLine a line (`format=ndjson`). A followed output that ends whole ends with the trailer `x-group`: the group as JSON (as `GET /v1/groups/{id}` answers it, without `args`; left out while a member is unsettled or past 12 KiB; over HTTP/1.1 only with `TE: trailers`).", content(
            (String = "text/plain"),
            (GroupLogLine = "application/x-ndjson"),
        ), headers(("Trailer" = String, description = "`x-group` (with `follow`): the trailer that may end the output."))),
        (status = 400, description = "`invalid_group_id`, `invalid_query` (an unknown or malformed parameter, a format other than text or ndjson).", body = jobcluster_proto::http::ErrorBody),
        (status = 404, description = "`group_not_found`.", body = jobcluster_proto::http::ErrorBody),
        (status = 429, description = "`too_many_followers`: a member has as many open output streams as allowed.", body = jobcluster_proto::http::ErrorBody),
        (status = 503, description = "`store_unavailable`.", body = jobcluster_proto::http::ErrorBody),
    ),
)]
pub(crate) async fn logs(
    State(state): State<AppState>,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<GroupLogsQuery>,
) -> Result<Response, ApiError> {
    let ndjson = match q.format.as_deref() {
        None | Some("text") => false,
        Some("ndjson") => true,
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("format {other:?}: use text or ndjson"),
            ));
        }
    };
    let (_, jobs) = find_group(&state, &id).await?;
    let (tx, rx) = mpsc::channel(MERGE_BUFFER);
    let missing = Missing::default();
    let mut opening = Vec::new();
    for job in jobs {
        // A member still queued has no output yet: a follower waits for
        // it to start; a reader of what there is now skips it.
        if job.state == JobState::Queued && !q.follow {
            continue;
        }
        let slot = state.followers.enter(&job.job_id)?;
        opening.push((job, slot));
    }
    // All members' streams open at once: one slow worker, or a member
    // waiting for a slot, does not hold back the others' lines.
    for (job, slot) in opening {
        let member = Member {
            worker: String::new(),
            ndjson,
            follow: q.follow,
            tx: tx.clone(),
            missing: missing.clone(),
            state: state.clone(),
            _slot: slot,
        };
        tokio::spawn(member.open_and_forward(job));
    }
    drop(tx);
    let content_type = if ndjson {
        "application/x-ndjson"
    } else {
        "text/plain; charset=utf-8"
    };
    // Once every member is done: cut short if a member's output could not
    // be read whole, after everything the others had; else, for a
    // follower, the group's record.
    use futures_util::StreamExt as _;
    let store = state.store.clone();
    let follow = q.follow;
    let end = futures_util::stream::once(async move {
        match missing.take() {
            Some(why) => Some(Err(std::io::Error::other(why))),
            None if follow => end_trailer(&store, &id)
                .await
                .map(|end| Ok(Frame::trailers(end))),
            None => None,
        }
    })
    .filter_map(std::future::ready);
    let lines = ReceiverStream::new(rx).map(|line| line.map(Frame::data));
    let mut response = (
        [(header::CONTENT_TYPE, content_type)],
        Body::new(http_body_util::StreamBody::new(lines.chain(end))),
    )
        .into_response();
    if follow {
        announce_trailer(&mut response, GROUP_TRAILER);
    }
    Ok(response)
}

/// The [`GROUP_TRAILER`] of a followed output that ended whole: the group
/// as `GET /v1/groups/{id}` answers it (without `args`), once every member
/// is settled. Only a follower's output qualifies: each of its members'
/// streams ran to the job's recorded end (or to its worker's answer that
/// there is none), where a reader of what there is stops at what there
/// was. None for a group without members yet (its starts under way).
async fn end_trailer(store: &crate::store::SharedStore, id: &str) -> Option<HeaderMap> {
    let (group, jobs) = match store.group(id).await {
        Ok(found) => found?,
        Err(error) => {
            tracing::warn!(group_id = %id, %error, "could not read the group for its output's trailer");
            return None;
        }
    };
    if jobs.is_empty() || !jobs.iter().all(|job| job.state.is_terminal()) {
        return None;
    }
    json_trailer(
        GROUP_TRAILER,
        &recorded_group_info(group, jobs),
        GROUP_TRAILER_MAX,
    )
}

type Chunk = Result<Bytes, std::io::Error>;

/// The first member whose output a merged stream without `follow` could
/// not read whole: the body ends with it, cut short, after all the other
/// members' lines.
#[derive(Debug, Clone, Default)]
struct Missing(std::sync::Arc<std::sync::Mutex<Option<String>>>);

impl Missing {
    fn note(&self, why: String) {
        let mut first = self.0.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert(why);
    }

    fn take(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// The pauses before each new try at a member's stream: backon's schedule
/// as an iterator, as its retry combinator does not fit (each pause also
/// ends early when the reader left).
fn pauses() -> impl Iterator<Item = Duration> {
    backon::BackoffBuilder::build(
        backon::ExponentialBuilder::default()
            .with_min_delay(FIRST_PAUSE)
            .with_max_delay(Duration::from_secs(3))
            .with_max_times(RECONNECTS as usize),
    )
}

/// One member's share of a merged group stream.
struct Member {
    worker: String,
    ndjson: bool,
    follow: bool,
    tx: mpsc::Sender<Chunk>,
    missing: Missing,
    state: AppState,
    _slot: FollowerSlot,
}

/// How often a member's broken stream is reopened (a restarting worker
/// serves its logs again within seconds), and the first pause.
const RECONNECTS: u32 = 8;
/// The longest line passed on whole; longer runs are split.
const MAX_LINE: usize = 64 * 1024;
const FIRST_PAUSE: Duration = Duration::from_millis(200);
/// How often a follower waiting for a member to leave the queue reads its
/// record again without being told.
const RECHECK: Duration = Duration::from_secs(1);

/// A member's output cut into lines as it comes.
#[derive(Debug, Default)]
struct Lines {
    /// The line being completed.
    pending: Vec<u8>,
    /// Its offset in the job's output.
    line_start: u64,
    /// Bytes of the job's output taken so far: where a reopened stream
    /// goes on.
    pos: u64,
}

/// Why a member's stream did not open.
enum Unopened {
    /// Its worker cannot be asked now: unresponsive, down, left (a
    /// restart looks like any of them), or the call failed without an
    /// answer.
    ForNow,
    /// As `ForNow`, for a job already given up as lost: not waited for.
    OutOfReach,
    /// Its worker answered without it (no such job, its output expired),
    /// or was removed, and its output with it.
    Answered,
}

impl Member {
    /// Waits for a queued member to start, opens its stream and forwards
    /// it. A member whose worker answers that it has no output for it adds
    /// nothing; one whose worker cannot be asked is asked again, and the
    /// reader told if its output stays out of reach.
    async fn open_and_forward(mut self, job: JobRow) {
        // Only a follower waits: a reader of what there is now reads an
        // unsettled member as it is (a queued one was left out).
        let job = match job.state {
            JobState::Queued | JobState::Unknown if self.follow => match self.started(job).await {
                Some(job) => job,
                None => return,
            },
            _ => job,
        };
        // A start in doubt (its worker did not confirm it in time) may not
        // have reached its worker yet, and that worker may not answer for
        // a while: it is asked again as a broken stream is, not dropped
        // from the group's output at the first refusal.
        let in_doubt = job.state == JobState::Unknown && job.started_at_ms == 0;
        let opened = match self.open(&job, 0).await {
            Ok(stream) => Some((stream, job)),
            Err(_) if in_doubt && self.follow => self.settle_and_open(job).await,
            // A started member's output is on its worker, which may be
            // restarting: it is asked again as a broken stream is (unless
            // its job was given up as lost). Left out, its lines would be
            // missing from an output that ends cleanly.
            Err(Unopened::ForNow) if job.started_at_ms != 0 => match self.open_again(&job, 0).await
            {
                Ok(stream) => Some((stream, job)),
                Err(Unopened::Answered) => None,
                Err(Unopened::ForNow | Unopened::OutOfReach) => return self.lost(&job).await,
            },
            Err(Unopened::OutOfReach) if job.started_at_ms != 0 => return self.lost(&job).await,
            Err(_) => None,
        };
        if let Some((stream, job)) = opened {
            self.forward(stream, job).await;
        }
    }

    /// A member in doubt, asked about (as `GET /v1/jobs/{id}` asks its
    /// worker) and opened again with backoff: its stream once it started;
    /// `None` once it is known never to have started, or its worker stays
    /// out of reach.
    async fn settle_and_open(
        &mut self,
        mut job: JobRow,
    ) -> Option<(crate::output_stream::Output, JobRow)> {
        for pause in pauses() {
            if !self.pause(pause).await {
                return None;
            }
            job = refresh(&self.state, job).await.row;
            if job.state.is_terminal() && job.started_at_ms == 0 {
                return None;
            }
            if let Ok(stream) = self.open(&job, 0).await {
                return Some((stream, job));
            }
        }
        tracing::warn!(job_id = %job.job_id, "gave up on a group member whose start stays in doubt");
        None
    }

    /// The member's stream from `offset`, if its worker can be asked now;
    /// its lines are then that worker's.
    async fn open(
        &mut self,
        job: &JobRow,
        offset: u64,
    ) -> Result<crate::output_stream::Output, Unopened> {
        let worker = match worker_of(&self.state, job).await {
            Ok(worker) => worker,
            Err(error) => {
                tracing::info!(job_id = %job.job_id, error = %error.message, "group member's worker cannot be asked now");
                // Removed: its output went with it.
                let Some(worker) = self.state.registry.get(&job.worker_id) else {
                    return Err(Unopened::Answered);
                };
                self.worker = worker.row().name;
                return Err(match job.state {
                    JobState::Lost => Unopened::OutOfReach,
                    _ => Unopened::ForNow,
                });
            }
        };
        self.worker = worker.row().name;
        // Followed if the reader follows: a reader of what there is now
        // gets the rest of it, not a follow until the job ends.
        let request = StreamJobRequest {
            job_id: job.job_id.clone(),
            offset,
            follow: Some(self.follow),
        };
        let opening = crate::output_stream::open(worker.channel(), request);
        match with_deadline(self.state.call_timeout, opening).await {
            Ok(stream) => Ok(stream),
            Err(status) => {
                tracing::info!(job_id = %job.job_id, %status, "group member's output unavailable");
                if super::jobs::unreachable(&status) {
                    super::jobs::worker_unreachable(&self.state, &worker).await;
                }
                // Only the worker's own answer says there is nothing to
                // read; a call that broke says nothing.
                match super::jobs::answered(&status) {
                    true => Err(Unopened::Answered),
                    false => Err(Unopened::ForNow),
                }
            }
        }
    }

    /// A started member's stream from `offset`, asked for again with
    /// backoff while its worker cannot be asked now (a restarting worker
    /// serves its logs again within seconds); each try asks the registry
    /// first, so a worker known unresponsive or down costs no call.
    /// `Answered` also when the reader left.
    async fn open_again(
        &mut self,
        job: &JobRow,
        offset: u64,
    ) -> Result<crate::output_stream::Output, Unopened> {
        for pause in pauses() {
            if !self.pause(pause).await {
                return Err(Unopened::Answered);
            }
            match self.open(job, offset).await {
                Err(Unopened::ForNow) => {}
                other => return other,
            }
        }
        tracing::warn!(job_id = %job.job_id, "gave up on a group member's output stream");
        Err(Unopened::ForNow)
    }

    /// This member's output could not be read whole: a follower is told
    /// at once (the output is cut now, as it watches); a reader of what
    /// there is gets every other member's lines first, then the cut.
    async fn lost(&self, job: &JobRow) {
        let why = format!(
            "lost the output stream of job {} on {}",
            job.job_id, self.worker
        );
        if self.follow {
            let _ = self.tx.send(Err(std::io::Error::other(why))).await;
        } else {
            self.missing.note(why);
        }
    }

    /// Waits `pause`; false if the reader left first.
    async fn pause(&self, pause: Duration) -> bool {
        tokio::select! {
            () = tokio::time::sleep(pause) => true,
            () = self.tx.closed() => false,
        }
    }

    /// The member's record once it left the queue; `None` if it ended
    /// without starting, or the reader left first.
    async fn started(&self, job: JobRow) -> Option<JobRow> {
        loop {
            let leaving = self.state.queue.leaving();
            tokio::pin!(leaving);
            leaving.as_mut().enable();
            let row = match self.state.store.job(&job.job_id).await {
                Ok(Some(row)) => row,
                Ok(None) => return None,
                Err(error) => {
                    tracing::warn!(job_id = %job.job_id, %error, "could not read a queued group member");
                    return None;
                }
            };
            match row.state {
                JobState::Queued => {}
                state if state.is_terminal() && row.started_at_ms == 0 => return None,
                // Taken by the dispatcher, its start not settled: the
                // worker may not know it yet. The dispatcher says when
                // the queue entry is gone.
                JobState::Unknown
                    if self
                        .state
                        .store
                        .in_queue(&row.job_id)
                        .await
                        .unwrap_or(false) => {}
                _ => return Some(row),
            }
            tokio::select! {
                () = &mut leaving => {}
                // Only this scheduler's dispatcher says when; another
                // one's (the leader's, sharing the store) says nothing
                // here, so the record is read again now and then.
                () = tokio::time::sleep(RECHECK) => {}
                () = self.tx.closed() => return None,
            }
        }
    }

    async fn forward(mut self, mut stream: crate::output_stream::Output, job: JobRow) {
        let mut lines = Lines::default();
        let mut finished = false;
        loop {
            let next = tokio::select! {
                next = stream.message() => next,
                // The reader left: stop now, not at the next line, so its
                // follower slot and the worker stream are freed at once.
                () = self.tx.closed() => return,
            };
            let msg = match next {
                Ok(Some(msg)) => msg,
                Ok(None) if !self.follow => break,
                // A followed stream that ends without the final status, or
                // any stream that breaks, is reopened at the byte where it
                // stopped, so no line is lost or repeated.
                ended => {
                    let why = ended.err().map(|s| s.to_string()).unwrap_or_default();
                    tracing::info!(job_id = %job.job_id, error = %why, offset = lines.pos, "group member's stream broke; reopening");
                    match self.open_again(&job, lines.pos).await {
                        Ok(reopened) => {
                            stream = reopened;
                            continue;
                        }
                        Err(_) => return self.lost(&job).await,
                    }
                }
            };
            crate::metrics::output_streamed(msg.output_len());
            // Chunk by chunk is as one: a line spans chunks as it spans
            // messages.
            for chunk in &msg.output {
                if !self.pass_on(&mut lines, chunk, &job.job_id).await {
                    return;
                }
            }
            if let Some(status) = &msg.final_status {
                record_status(&self.state.store, job.clone(), status).await;
                finished = true;
                break;
            }
        }
        // The partial last line of an ended job is completed; that of a
        // job still running (without follow) is not a line yet.
        if finished && !lines.pending.is_empty() {
            self.emit(&lines.pending, lines.line_start, &job.job_id)
                .await;
        }
    }

    /// Splits `chunk` into lines with what came before it and passes on
    /// the lines it completes; false once the reader left.
    async fn pass_on(&self, lines: &mut Lines, chunk: &[u8], job_id: &str) -> bool {
        let mut rest = chunk;
        while !rest.is_empty() {
            // A line of up to MAX_LINE bytes goes out whole; a job that
            // writes no newlines must not grow `pending` without bound,
            // so a longer run goes out in pieces of exactly MAX_LINE
            // bytes. Where the pieces fall never depends on how the
            // worker chunked the output.
            let room = MAX_LINE - lines.pending.len();
            let window = &rest[..rest.len().min(room + 1)];
            if let Some(nl) = window.iter().position(|b| *b == b'\n') {
                lines.pending.extend_from_slice(&rest[..nl]);
                if !self.emit(&lines.pending, lines.line_start, job_id).await {
                    return false;
                }
                lines.pos += nl as u64 + 1;
                lines.line_start = lines.pos;
                lines.pending.clear();
                rest = &rest[nl + 1..];
                continue;
            }
            let take = rest.len().min(room);
            lines.pending.extend_from_slice(&rest[..take]);
            lines.pos += take as u64;
            rest = &rest[take..];
            // A full piece waits for the next byte: a newline there
            // makes it a whole line of exactly MAX_LINE bytes.
            if lines.pending.len() >= MAX_LINE && !rest.is_empty() {
                if !self.emit(&lines.pending, lines.line_start, job_id).await {
                    return false;
                }
                lines.line_start = lines.pos;
                lines.pending.clear();
            }
        }
        true
    }

    /// Sends one line (without its newline). False once the reader is gone.
    async fn emit(&self, line: &[u8], offset: u64, job_id: &str) -> bool {
        let bytes = if self.ndjson {
            let (text, base64) = match std::str::from_utf8(line) {
                Ok(text) => (Some(text.to_owned()), None),
                Err(_) => (
                    None,
                    Some(base64::engine::general_purpose::STANDARD.encode(line)),
                ),
            };
            let record = GroupLogLine {
                worker: self.worker.clone(),
                job_id: job_id.to_owned(),
                offset,
                line: text,
                line_base64: base64,
            };
            let mut out = serde_json::to_vec(&record).unwrap_or_default();
            out.push(b'\n');
            out
        } else {
            let mut out = Vec::with_capacity(line.len() + self.worker.len() + 4);
            out.push(b'[');
            out.extend_from_slice(self.worker.as_bytes());
            out.extend_from_slice(b"] ");
            out.extend_from_slice(line);
            out.push(b'\n');
            out
        };
        self.tx.send(Ok(Bytes::from(bytes))).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(state: &str) -> JobRow {
        JobRow {
            job_id: String::new(),
            worker_id: String::new(),
            command: String::new(),
            path: String::new(),
            args: Vec::new(),
            state: JobState::parse(state).unwrap_or(JobState::Running),
            error_text: String::new(),
            exit_code: None,
            signal: None,
            created_at_ms: 0,
            started_at_ms: 0,
            finished_at_ms: 0,
            output_bytes: 0,
            group_id: None,
            updated_at_ms: 0,
        }
    }

    #[test]
    fn a_group_succeeds_only_if_every_job_did() {
        let states = |s: &[&str]| group_state(&s.iter().map(|s| job(s)).collect::<Vec<_>>(), 0);
        assert_eq!(states(&["succeeded", "running"]), "running");
        assert_eq!(states(&["succeeded", "unknown"]), "running");
        assert_eq!(states(&["succeeded", "queued"]), "running");
        assert_eq!(states(&["succeeded", "succeeded"]), "succeeded");
        assert_eq!(states(&["succeeded", "lost"]), "failed");
        assert_eq!(states(&["stopped", "failed"]), "failed");
        assert_eq!(states(&["stopped", "succeeded"]), "stopped");
        // A worker that could not start its job fails the group.
        let ended = [job("succeeded")];
        assert_eq!(group_state(&ended, 1), "failed");
        assert_eq!(group_state(&[job("running")], 1), "running");
    }
}
