//! The Scheduler gRPC service (SPEC §5): workers register and deregister.

use std::sync::Arc;
use std::time::Duration;

use jobcluster_pki::{PeerIdentity, Role};
use jobcluster_proto::pb::scheduler_server::Scheduler;
use jobcluster_proto::pb::{
    DeregisterWorkerRequest, DeregisterWorkerResponse, HeartbeatRequest, HeartbeatResponse,
    RegisterWorkerRequest, RegisterWorkerResponse,
};
use tonic::{Request, Response, Status};

use crate::convert::row_from_report;
use crate::registry::{RegisterError, Registration, Registry};
use crate::state::WorkerState;
use crate::store::SharedStore;
use crate::time::{now_ms, rfc3339};

#[derive(Debug, Clone)]
pub(crate) struct SchedulerService {
    pub(crate) queue: Arc<crate::queue::Queue>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) store: SharedStore,
    pub(crate) heartbeat_interval: Duration,
    pub(crate) down_after: Duration,
    /// A registration's full report marks lost only the jobs created
    /// longer ago than this (no start of theirs can still be in flight).
    pub(crate) call_timeout: Duration,
    /// Plaintext mode: callers have no certificates to check.
    pub(crate) insecure: bool,
}

impl SchedulerService {
    /// The calling worker's identity; `None` in insecure mode, where
    /// there is none to check.
    fn caller<T>(&self, request: &Request<T>, rpc: &str) -> Result<Option<PeerIdentity>, Status> {
        if self.insecure {
            return Ok(None);
        }
        jobcluster_proto::transport::require_role(request, Role::Worker, rpc).map(Some)
    }

    /// Applies a worker's reports; returns the jobs it must kill.
    async fn apply_reports(
        &self,
        worker_id: &str,
        reports: &[jobcluster_proto::pb::QueryJobResponse],
        complete: bool,
    ) -> Result<Vec<String>, Status> {
        if reports.len() > MAX_REPORTS {
            return Err(Status::invalid_argument(format!(
                "{} job reports in one message; at most {MAX_REPORTS}",
                reports.len()
            )));
        }
        if reports.is_empty() && !complete {
            return Ok(Vec::new());
        }
        let rows = reports
            .iter()
            .filter(|r| uuid::Uuid::parse_str(&r.job_id).is_ok())
            .map(|r| row_from_report(worker_id, r))
            .collect();
        let settled_before = crate::api::jobs::settled_before(self.call_timeout);
        let kill = self
            .store
            .apply_reports(worker_id, rows, complete, settled_before)
            .await
            .map_err(internal)?;
        if !kill.is_empty() {
            tracing::warn!(%worker_id, jobs = ?kill, "the worker runs jobs already recorded as ended; telling it to kill them");
        }
        Ok(kill)
    }
}

/// Job reports in one registration or heartbeat. Workers send at most
/// this many (their running jobs are bounded by `max_jobs`, and pending
/// final states go in batches), so a message stays far below the size limit.
pub(crate) const MAX_REPORTS: usize = 10_000;

fn internal(error: impl std::fmt::Display) -> Status {
    tracing::error!(%error, "scheduler storage failed");
    Status::internal(format!("scheduler storage: {error}"))
}

#[tonic::async_trait]
impl Scheduler for SchedulerService {
    async fn register_worker(
        &self,
        request: Request<RegisterWorkerRequest>,
    ) -> Result<Response<RegisterWorkerResponse>, Status> {
        let caller = self.caller(&request, "RegisterWorker")?;
        let r = request.into_inner();
        // The original contract's registration carries only an address:
        // such a worker (no instance id either) is named after its address
        // and checked on instead of heartbeating (see `seed`).
        let seed = caller.is_none() && r.instance_id.is_empty();
        let peer = match caller {
            Some(peer) => peer,
            None if jobcluster_pki::valid_name(&r.name) => PeerIdentity {
                role: Role::Worker,
                name: r.name.clone(),
            },
            None if r.name.is_empty() && !r.address.is_empty() => PeerIdentity {
                role: Role::Worker,
                name: crate::seed::name_for(&r.address),
            },
            None => {
                return Err(Status::invalid_argument(
                    "name is required (a valid worker name)",
                ));
            }
        };
        // The certificate is the worker's identity: a worker registers
        // under the name its certificate carries, or not at all.
        if !r.name.is_empty() && r.name != peer.name {
            return Err(Status::permission_denied(format!(
                "certificate is for worker {:?}, not {:?}",
                peer.name, r.name
            )));
        }
        if r.address.is_empty() {
            return Err(Status::invalid_argument("address is required (host:port)"));
        }
        let registration = Registration {
            name: peer.name.clone(),
            address: r.address,
            plugins: r.plugins,
            labels: r.labels.into_iter().collect(),
            previous_worker_id: r.previous_worker_id,
            instance_id: r.instance_id,
            cgroup_limits: r.cgroup_limits,
            max_jobs: r.max_jobs,
            extensions: r
                .plugin_info
                .into_iter()
                .map(|p| (p.name, p.extensions))
                .collect(),
            seed,
        };
        let (row, writing, undo) = self
            .registry
            .register(registration, now_ms(), self.down_after)
            .map_err(|e| match e {
                RegisterError::Duplicate { .. } => {
                    tracing::warn!(worker = %peer.name, error = %e, "refused a second worker with a taken name");
                    Status::already_exists(e.to_string())
                }
                RegisterError::Address(e) => Status::invalid_argument(e.to_string()),
                // Not UNAVAILABLE: this scheduler answered, and a worker
                // moves to its next scheduler on that code.
                RegisterError::InFlight { .. } => Status::aborted(e.to_string()),
            })?;
        let (store, registry, record) = (self.store.clone(), self.registry.clone(), row.clone());
        writing
            .until(async move {
                let written = store.upsert_worker(record.clone()).await;
                // Not kept, so not shown: the API goes on showing what it
                // showed before, and the worker tries again. Here, in the
                // write's own task: a caller that gave up (the worker's
                // deadline) must not leave it shown. `undo` drops at the
                // end either way, letting the worker's next attempt in.
                match &written {
                    Ok(()) => undo.recorded(),
                    Err(_) => {
                        let undone = registry.undo_registration(&record, undo);
                        tracing::warn!(worker = %record.name, address = %record.address, undone, "a registration the store could not record was undone");
                    }
                }
                written
            })
            .await
            .map_err(internal)?;
        let kill_job_ids = self
            .apply_reports(&row.worker_id, &r.jobs, !r.partial_report)
            .await?;
        tracing::info!(worker_id = %row.worker_id, worker = %row.name, address = %row.address, plugins = ?row.plugins, max_jobs = row.max_jobs, jobs = r.jobs.len(), seed = row.seed, "worker registered");
        // New or returning slots, and reports that may have ended jobs.
        self.queue.wake();
        Ok(Response::new(RegisterWorkerResponse {
            success: true,
            worker_id: row.worker_id,
            heartbeat_interval_ms: self.heartbeat_interval.as_millis() as u64,
            kill_job_ids,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let caller = self.caller(&request, "Heartbeat")?;
        let r = request.into_inner();
        // Every worker, every interval: nothing here copies the worker's
        // record, and nothing is written to the store unless the worker
        // reports a job whose state changed.
        let known = self
            .registry
            .get(&r.worker_id)
            .filter(|e| e.has_id(&r.worker_id));
        if let (Some(entry), Some(peer)) = (&known, &caller)
            && !entry.named(&peer.name)
        {
            tracing::warn!(peer = %peer.name, worker_id = %r.worker_id, "refused a heartbeat for another worker's id");
            return Err(Status::permission_denied(
                "a worker may only heartbeat for itself",
            ));
        }
        let Some((entry, came_back)) =
            self.registry
                .heartbeat(&r.worker_id, &r.instance_id, now_ms())
        else {
            return Ok(Response::new(HeartbeatResponse {
                known: false,
                heartbeat_interval_ms: self.heartbeat_interval.as_millis() as u64,
                kill_job_ids: Vec::new(),
            }));
        };
        if came_back {
            // Its jobs read `unknown` while it was silent; a fresh
            // registration reports every running job's true state and
            // settles them.
            let name = entry.with_row(|row| row.name.clone());
            tracing::info!(worker_id = %r.worker_id, worker = %name, "worker is back; asking it to register again");
            return Ok(Response::new(HeartbeatResponse {
                known: false,
                heartbeat_interval_ms: self.heartbeat_interval.as_millis() as u64,
                kill_job_ids: Vec::new(),
            }));
        }
        let kill_job_ids = self.apply_reports(&r.worker_id, &r.jobs, false).await?;
        // A report may say a job ended, freeing its slot.
        if !r.jobs.is_empty() {
            self.queue.wake();
        }
        Ok(Response::new(HeartbeatResponse {
            known: true,
            heartbeat_interval_ms: self.heartbeat_interval.as_millis() as u64,
            kill_job_ids,
        }))
    }

    async fn deregister_worker(
        &self,
        request: Request<DeregisterWorkerRequest>,
    ) -> Result<Response<DeregisterWorkerResponse>, Status> {
        let caller = self.caller(&request, "DeregisterWorker")?;
        let id = &request.get_ref().worker_id;
        let entry = self
            .registry
            .get(id)
            .filter(|e| e.id() == *id)
            .ok_or_else(|| Status::not_found(format!("unknown worker {id}")))?;
        if caller.is_some_and(|peer| entry.row().name != peer.name) {
            return Err(Status::permission_denied(
                "a worker may only deregister itself",
            ));
        }
        let writing = entry.writing();
        let row = entry.update(|r| {
            r.state = WorkerState::Left;
            r.last_seen_ms = now_ms();
        });
        // A leave stands whatever was judged of the worker meanwhile.
        writing
            .record_state(
                &self.store,
                &row.worker_id,
                row.state,
                row.last_seen_ms,
                None,
            )
            .await
            .map_err(internal)?;
        tracing::info!(worker_id = %row.worker_id, worker = %row.name, "worker deregistered");
        Ok(Response::new(DeregisterWorkerResponse { success: true }))
    }
}

/// The liveness rules, applied until `stop` fires:
/// - a ready worker whose heartbeats are two intervals late is marked
///   unresponsive (placement skips it; its running jobs read `unknown`)
///   before it is declared down;
/// - one not heard from for `down_after` is `down`;
/// - one not heard from for `lost_after` has its running and unknown jobs
///   recorded `lost` (then a final state: if it comes back, it kills them).
pub(crate) async fn watch_liveness(
    registry: Arc<Registry>,
    store: SharedStore,
    timing: Liveness,
    stop: tokio_util::sync::CancellationToken,
) {
    // Checking four times per timeout keeps detection within timeout + 25%.
    let every = (timing.down_after / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    // Late enough that a busy but healthy worker is not suspected.
    let late =
        (timing.heartbeat_interval * 2 + Duration::from_secs(1) + timing.lag).as_millis() as u64;
    // Workers whose jobs were given up during their current absence.
    let mut given_up = std::collections::HashSet::new();
    let mut last_tick = (std::time::Instant::now(), now_ms());
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
        let now = now_ms();
        // This scheduler was paused (or its clock stepped): the silence it
        // would see is its own. Every worker gets a fresh start instead.
        let (mono, wall) = (last_tick.0.elapsed(), now.saturating_sub(last_tick.1));
        last_tick = (std::time::Instant::now(), now);
        let slack = every + timing.heartbeat_interval;
        if mono > slack || Duration::from_millis(wall) > mono + slack {
            tracing::warn!(
                ?mono,
                wall_ms = wall,
                "the liveness check ran late or the clock jumped; every worker gets a fresh down_after"
            );
            registry.touch_all(now);
            continue;
        }
        // These passes run every second over every worker: a record is
        // copied only for a worker whose state changes.
        for entry in registry.entries() {
            let silent = entry.with_row(|row| {
                row.state == WorkerState::Ready && now.saturating_sub(row.last_seen_ms) > late
            });
            if silent && entry.mark_unresponsive(now) {
                let row = entry.row();
                let why = format!(
                    "worker {} has sent no heartbeat since {}; not yet given up",
                    row.name,
                    rfc3339(row.last_seen_ms)
                );
                record_unknown(&store, &row, &why).await;
            }
        }
        for (row, writing) in registry.sweep(now, timing.down_after + timing.lag) {
            // It may have checked in since the sweep; then it is not down.
            let still_down = registry
                .get(&row.worker_id)
                .is_some_and(|e| e.row().state == WorkerState::Down);
            if !still_down {
                continue;
            }
            if let Err(error) = writing
                .record_state(
                    &store,
                    &row.worker_id,
                    WorkerState::Down,
                    row.last_seen_ms,
                    Some(row.registered_at_ms),
                )
                .await
            {
                tracing::error!(worker_id = %row.worker_id, %error, "could not record worker down");
            }
            tracing::warn!(worker_id = %row.worker_id, worker = %row.name, "worker is down: no heartbeat");
            let why = format!(
                "worker {} is down: no heartbeat since {}; not yet given up",
                row.name,
                rfc3339(row.last_seen_ms)
            );
            record_unknown(&store, &row, &why).await;
        }
        let lost_after = (timing.lost_after + timing.lag).as_millis() as u64;
        for entry in registry.entries() {
            let Some(row) = entry.with_row(|row| {
                if row.state == WorkerState::Ready {
                    given_up.remove(&row.worker_id);
                    return None;
                }
                let recent = now.saturating_sub(row.last_seen_ms) <= lost_after;
                (!recent && !given_up.contains(&row.worker_id)).then(|| row.clone())
            }) else {
                continue;
            };
            let why = format!(
                "no news from worker {} since {} (lost_after {})",
                row.name,
                rfc3339(row.last_seen_ms),
                humantime::format_duration(timing.lost_after)
            );
            match store.mark_lost(&row.worker_id, &why).await {
                Ok(lost) => {
                    given_up.insert(row.worker_id.clone());
                    if !lost.is_empty() {
                        tracing::warn!(worker_id = %row.worker_id, worker = %row.name, jobs = ?lost, "jobs lost: no news from their worker");
                    }
                }
                Err(error) => {
                    tracing::error!(worker_id = %row.worker_id, %error, "could not record lost jobs")
                }
            }
        }
    }
}

/// How the liveness rules are timed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Liveness {
    pub(crate) heartbeat_interval: Duration,
    pub(crate) down_after: Duration,
    pub(crate) lost_after: Duration,
    /// How late news of a worker may reach this scheduler (from other
    /// schedulers, through the store): added to every silence it judges.
    pub(crate) lag: Duration,
}

/// Records a worker's running jobs `unknown`, saying why.
pub(crate) async fn record_unknown(store: &SharedStore, row: &crate::store::WorkerRow, why: &str) {
    match store.mark_unknown(&row.worker_id, why).await {
        Ok(ids) if !ids.is_empty() => {
            tracing::warn!(worker_id = %row.worker_id, worker = %row.name, jobs = ?ids, why, "jobs unknown until their worker answers")
        }
        Ok(_) => {}
        Err(error) => {
            tracing::error!(worker_id = %row.worker_id, %error, "could not record jobs unknown")
        }
    }
}
