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
use crate::store::Store;
use crate::time::now_ms;

#[derive(Debug, Clone)]
pub(crate) struct SchedulerService {
    pub(crate) registry: Arc<Registry>,
    pub(crate) store: Store,
    pub(crate) heartbeat_interval: Duration,
    pub(crate) down_after: Duration,
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

    async fn apply_reports(
        &self,
        worker_id: &str,
        reports: &[jobcluster_proto::pb::QueryJobResponse],
        complete: bool,
    ) -> Result<(), Status> {
        if reports.is_empty() && !complete {
            return Ok(());
        }
        let rows = reports
            .iter()
            .filter(|r| uuid::Uuid::parse_str(&r.job_id).is_ok())
            .map(|r| row_from_report(worker_id, r))
            .collect();
        self.store
            .apply_reports(worker_id, rows, complete, now_ms())
            .await
            .map_err(internal)
    }
}

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
        let peer = match caller {
            Some(peer) => peer,
            None if jobcluster_pki::valid_name(&r.name) => PeerIdentity {
                role: Role::Worker,
                name: r.name.clone(),
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
            extensions: r
                .plugin_info
                .into_iter()
                .map(|p| (p.name, p.extensions))
                .collect(),
        };
        let row = self
            .registry
            .register(registration, now_ms(), self.down_after)
            .map_err(|e| match e {
                RegisterError::Duplicate { .. } => {
                    tracing::warn!(worker = %peer.name, error = %e, "refused a second worker with a taken name");
                    Status::already_exists(e.to_string())
                }
                RegisterError::Address(e) => Status::invalid_argument(e.to_string()),
            })?;
        self.store
            .upsert_worker(row.clone())
            .await
            .map_err(internal)?;
        self.apply_reports(&row.worker_id, &r.jobs, true).await?;
        tracing::info!(worker_id = %row.worker_id, worker = %row.name, address = %row.address, plugins = ?row.plugins, "worker registered");
        Ok(Response::new(RegisterWorkerResponse {
            success: true,
            worker_id: row.worker_id,
            heartbeat_interval_ms: self.heartbeat_interval.as_millis() as u64,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let caller = self.caller(&request, "Heartbeat")?;
        let r = request.into_inner();
        let known = self
            .registry
            .get(&r.worker_id)
            .filter(|e| e.id() == r.worker_id)
            .map(|e| e.row().name);
        if let (Some(name), Some(peer)) = (&known, &caller)
            && *name != peer.name
        {
            tracing::warn!(peer = %peer.name, worker_id = %r.worker_id, "refused a heartbeat for another worker's id");
            return Err(Status::permission_denied(
                "a worker may only heartbeat for itself",
            ));
        }
        let Some((row, came_back)) =
            self.registry
                .heartbeat(&r.worker_id, &r.instance_id, now_ms())
        else {
            return Ok(Response::new(HeartbeatResponse {
                known: false,
                heartbeat_interval_ms: self.heartbeat_interval.as_millis() as u64,
            }));
        };
        if came_back {
            // Its jobs were recorded lost while it was silent; a fresh
            // registration reports every job's true state and brings them back.
            tracing::info!(worker_id = %row.worker_id, worker = %row.name, "worker is back; asking it to register again");
            return Ok(Response::new(HeartbeatResponse {
                known: false,
                heartbeat_interval_ms: self.heartbeat_interval.as_millis() as u64,
            }));
        }
        self.apply_reports(&row.worker_id, &r.jobs, false).await?;
        Ok(Response::new(HeartbeatResponse {
            known: true,
            heartbeat_interval_ms: self.heartbeat_interval.as_millis() as u64,
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
        let row = entry.update(|r| {
            r.state = "left".to_owned();
            r.last_seen_ms = now_ms();
        });
        self.store
            .set_worker_state(&row.worker_id, &row.state, row.last_seen_ms)
            .await
            .map_err(internal)?;
        tracing::info!(worker_id = %row.worker_id, worker = %row.name, "worker deregistered");
        Ok(Response::new(DeregisterWorkerResponse { success: true }))
    }
}

/// Marks workers that stopped heartbeating `down` and their running jobs
/// `lost`, until `stop` fires.
pub(crate) async fn watch_liveness(
    registry: Arc<Registry>,
    store: Store,
    down_after: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    // Checking four times per timeout keeps detection within timeout + 25%.
    let every = (down_after / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
        let now = now_ms();
        for row in registry.sweep(now, down_after) {
            // It may have checked in since the sweep; then it is not down.
            let still_down = registry
                .get(&row.worker_id)
                .is_some_and(|e| e.row().state == "down");
            if !still_down {
                continue;
            }
            if let Err(error) = store
                .set_worker_state(&row.worker_id, "down", row.last_seen_ms)
                .await
            {
                tracing::error!(worker_id = %row.worker_id, %error, "could not record worker down");
            }
            match store.mark_lost(&row.worker_id, now).await {
                Ok(lost) => {
                    tracing::warn!(worker_id = %row.worker_id, worker = %row.name, lost_jobs = lost.len(), "worker is down: no heartbeat")
                }
                Err(error) => {
                    tracing::error!(worker_id = %row.worker_id, %error, "could not record lost jobs")
                }
            }
        }
    }
}
