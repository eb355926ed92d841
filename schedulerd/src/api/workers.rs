//! `/v1/workers` routes.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use jobcluster_proto::http::{Success, WorkerInfo, WorkerList};
use serde::Deserialize;

use super::extract::QueryParams;
use super::{ApiError, AppState};
use crate::registry::RemoveError;
use crate::state::WorkerState;
use crate::store::WorkerRow;
use crate::time::{now_ms, rfc3339};

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// Include workers that have left the cluster.
    #[serde(default)]
    all: bool,
    /// Workers per page: 1 to 1000, default 100.
    limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
}

#[utoipa::path(
    get,
    path = "/v1/workers",
    operation_id = "list_workers",
    tag = "workers",
    params(ListQuery),
    responses(
        (status = 200, description = "The workers by name, a page at a time (without those that left, unless `all`); `next_cursor` fetches the next page.", body = WorkerList),
        (status = 400, description = "`invalid_query`: an unknown or malformed parameter.", body = jobcluster_proto::http::ErrorBody),
        (status = 503, description = "`store_unavailable`.", body = jobcluster_proto::http::ErrorBody),
    ),
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    QueryParams(q): QueryParams<ListQuery>,
) -> Result<Json<WorkerList>, ApiError> {
    let limit = q
        .limit
        .unwrap_or(super::jobs::DEFAULT_PAGE)
        .clamp(1, super::jobs::MAX_PAGE);
    let (page, more) = state
        .registry
        .page(q.cursor.as_deref(), limit as usize, q.all);
    let running = state.store.running_counts().await?;
    let workers: Vec<WorkerInfo> = page
        .into_iter()
        .map(|entry| {
            let w = entry.row();
            let n = running.get(&w.worker_id).copied().unwrap_or(0);
            worker_info(w, n, entry.unresponsive_since().is_some())
        })
        .collect();
    let next_cursor = more
        .then(|| workers.last().map(|w| w.name.clone()))
        .flatten();
    Ok(Json(WorkerList {
        workers,
        next_cursor,
    }))
}

#[utoipa::path(
    get,
    path = "/v1/workers/{id}",
    operation_id = "show_worker",
    tag = "workers",
    params(("id" = String, Path, description = "The worker's id or name.")),
    responses(
        (status = 200, description = "The worker.", body = WorkerInfo),
        (status = 404, description = "`worker_not_found`.", body = jobcluster_proto::http::ErrorBody),
        (status = 503, description = "`store_unavailable`.", body = jobcluster_proto::http::ErrorBody),
    ),
)]
pub(crate) async fn show(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<WorkerInfo>, ApiError> {
    let worker = state
        .registry
        .get(&id)
        .ok_or_else(|| ApiError::worker_not_found(&id))?;
    let row = worker.row();
    let running = state.store.running_counts().await?;
    let n = running.get(&row.worker_id).copied().unwrap_or(0);
    Ok(Json(worker_info(
        row,
        n,
        worker.unresponsive_since().is_some(),
    )))
}

#[utoipa::path(
    post,
    path = "/v1/workers/{id}/drain",
    operation_id = "drain_worker",
    tag = "workers",
    params(("id" = String, Path, description = "The worker's id or name.")),
    responses(
        (status = 200, description = "The worker, draining: it takes no new jobs; its running jobs finish.", body = WorkerInfo),
        (status = 404, description = "`worker_not_found`.", body = jobcluster_proto::http::ErrorBody),
        (status = 503, description = "`store_unavailable`, or `worker_unavailable` (a worker new here whose registration could not be recorded in time; try again).", body = jobcluster_proto::http::ErrorBody),
    ),
)]
pub(crate) async fn drain(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<WorkerInfo>, ApiError> {
    set_draining(&state, &id, true).await
}

#[utoipa::path(
    post,
    path = "/v1/workers/{id}/undrain",
    operation_id = "undrain_worker",
    tag = "workers",
    params(("id" = String, Path, description = "The worker's id or name.")),
    responses(
        (status = 200, description = "The worker, taking jobs again.", body = WorkerInfo),
        (status = 404, description = "`worker_not_found`.", body = jobcluster_proto::http::ErrorBody),
        (status = 503, description = "`store_unavailable`, or `worker_unavailable` (a worker new here whose registration could not be recorded in time; try again).", body = jobcluster_proto::http::ErrorBody),
    ),
)]
pub(crate) async fn undrain(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<WorkerInfo>, ApiError> {
    set_draining(&state, &id, false).await
}

/// Forgets a worker that is `down` or `left`; its jobs' records stay. A
/// live worker is refused: its record is the truth about a running
/// process. If the worker comes back, it registers with a new id.
#[utoipa::path(
    delete,
    path = "/v1/workers/{id}",
    operation_id = "remove_worker",
    tag = "workers",
    params(("id" = String, Path, description = "The worker's id or name.")),
    responses(
        (status = 200, description = "Forgotten (it was `down` or `left`); its jobs' records stay.", body = Success),
        (status = 404, description = "`worker_not_found`.", body = jobcluster_proto::http::ErrorBody),
        (status = 409, description = "`worker_alive`: a ready worker, or one whose registration is being recorded, cannot be removed.", body = jobcluster_proto::http::ErrorBody),
        (status = 503, description = "`store_unavailable`.", body = jobcluster_proto::http::ErrorBody),
    ),
)]
pub(crate) async fn remove(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Success>, ApiError> {
    let entry = state.registry.remove(&id).map_err(|e| match e {
        RemoveError::NotFound => ApiError::worker_not_found(&id),
        RemoveError::Registering(name) => ApiError::new(
            StatusCode::CONFLICT,
            "worker_alive",
            format!(
                "worker {name} is registering right now, so it cannot be removed: stop it \
                 (it then leaves), then remove it"
            ),
        ),
        RemoveError::Alive(name) => ApiError::new(
            StatusCode::CONFLICT,
            "worker_alive",
            format!(
                "worker {name} is ready, so it cannot be removed: stop it (it then leaves) \
                 or wait until it is down, then remove it"
            ),
        ),
    })?;
    let row = entry.row();
    match state
        .store
        .delete_worker(&row.worker_id, &row.name, now_ms())
        .await
    {
        Ok(lost) => {
            // Its queued jobs ended: readers waiting for them move on.
            state.queue.left();
            tracing::info!(worker_id = %row.worker_id, worker = %row.name, state = %row.state, lost_jobs = lost.len(), "worker removed");
            Ok(Json(Success { success: true }))
        }
        Err(error) => {
            // Still recorded: keep it known, so that a retry can remove it.
            state.registry.restore(entry);
            Err(error.into())
        }
    }
}

/// A draining worker takes no new jobs (placement and fan-out skip it, a
/// start naming it gets 409); its running jobs finish. It stays draining
/// across its restarts until undrained.
async fn set_draining(
    state: &AppState,
    id: &str,
    draining: bool,
) -> Result<Json<WorkerInfo>, ApiError> {
    let entry = state
        .registry
        .get(id)
        .ok_or_else(|| ApiError::worker_not_found(id))?;
    // Its record's write would not carry the flag, and its undo would drop
    // it: a drain answered now could be lost.
    if !entry.wait_recorded(state.call_timeout).await {
        return Err(ApiError::worker_registering(
            &entry.with_row(|r| r.name.clone()),
        ));
    }
    let worker_id = entry.id();
    // The store first, then the registry: a sync of the registry with a
    // shared store that read the old record before this write cannot put
    // it back over the change below (it skips entries changed since its
    // reads began), and a failed write changes nothing.
    state
        .store
        .set_worker_draining(&worker_id, draining)
        .await?;
    let (worker, row) = state
        .registry
        .set_draining(&worker_id, draining)
        .ok_or_else(|| ApiError::worker_not_found(id))?;
    tracing::info!(worker_id = %row.worker_id, worker = %row.name, draining, "worker drain changed");
    if !draining {
        state.queue.wake();
    }
    let running = state.store.running_counts().await?;
    let n = running.get(&row.worker_id).copied().unwrap_or(0);
    Ok(Json(worker_info(
        row,
        n,
        worker.unresponsive_since().is_some(),
    )))
}

/// A ready worker shows as `unresponsive` while its calls time out, and as
/// `draining` while it takes no new jobs.
fn worker_info(w: WorkerRow, running_jobs: u64, unresponsive: bool) -> WorkerInfo {
    let state = match w.state {
        WorkerState::Ready if unresponsive => "unresponsive".to_owned(),
        WorkerState::Ready if w.draining => "draining".to_owned(),
        other => other.as_str().to_owned(),
    };
    let free_slots = w.free_slots(running_jobs);
    WorkerInfo {
        state,
        worker_id: w.worker_id,
        name: w.name,
        address: w.address,
        plugins: w.plugins,
        labels: w.labels.into_iter().collect(),
        running_jobs,
        last_seen: rfc3339(w.last_seen_ms),
        registered_at: rfc3339(w.registered_at_ms),
        cgroup_limits: w.cgroup_limits,
        max_jobs: w.max_jobs,
        free_slots,
    }
}
