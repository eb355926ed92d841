//! The Scheduler gRPC service (SPEC §5): workers register and deregister.

use std::sync::Arc;
use std::time::Duration;

use jobcluster_pki::{PeerIdentity, Role};
use jobcluster_proto::pb::scheduler_server::Scheduler;
use jobcluster_proto::pb::{
    DeregisterWorkerRequest, DeregisterWorkerResponse, RegisterWorkerRequest,
    RegisterWorkerResponse,
};
use tonic::{Request, Response, Status};

use crate::registry::{Registration, Registry};
use crate::store::Store;
use crate::time::now_ms;

/// How often workers should heartbeat (used from the next issue on).
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub(crate) struct SchedulerService {
    pub(crate) registry: Arc<Registry>,
    pub(crate) store: Store,
}

/// Only workers may call the scheduler; returns the caller's identity.
fn authorize<T>(request: &Request<T>, rpc: &str) -> Result<PeerIdentity, Status> {
    let leaf = request
        .peer_certs()
        .and_then(|certs| certs.first().cloned())
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    let peer = jobcluster_pki::peer_identity(&leaf).map_err(|e| {
        Status::permission_denied(format!("certificate has no cluster identity: {e}"))
    })?;
    if peer.role != Role::Worker {
        tracing::warn!(peer = %peer.name, role = %peer.role, rpc, "refused a caller without the worker role");
        return Err(Status::permission_denied(format!(
            "{} certificates may not call the scheduler's worker service",
            peer.role
        )));
    }
    Ok(peer)
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
        let peer = authorize(&request, "RegisterWorker")?;
        let r = request.into_inner();
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
        };
        let row = self
            .registry
            .register(registration, now_ms())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.store
            .upsert_worker(row.clone())
            .await
            .map_err(internal)?;
        tracing::info!(worker_id = %row.worker_id, worker = %row.name, address = %row.address, plugins = ?row.plugins, "worker registered");
        Ok(Response::new(RegisterWorkerResponse {
            success: true,
            worker_id: row.worker_id,
            heartbeat_interval_ms: HEARTBEAT_INTERVAL.as_millis() as u64,
        }))
    }

    async fn deregister_worker(
        &self,
        request: Request<DeregisterWorkerRequest>,
    ) -> Result<Response<DeregisterWorkerResponse>, Status> {
        let peer = authorize(&request, "DeregisterWorker")?;
        let id = &request.get_ref().worker_id;
        let entry = self
            .registry
            .get(id)
            .filter(|e| e.id() == *id)
            .ok_or_else(|| Status::not_found(format!("unknown worker {id}")))?;
        if entry.row().name != peer.name {
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
