//! The worker's membership in the cluster: registering with the scheduler
//! (retrying with backoff while the worker already serves) and
//! deregistering on a clean shutdown. The id the scheduler assigns is kept
//! in `state_dir/worker_id` so the worker asks for it back after a restart.

use std::path::PathBuf;
use std::time::Duration;

use jobcluster_proto::pb::scheduler_client::SchedulerClient;
use jobcluster_proto::pb::{DeregisterWorkerRequest, RegisterWorkerRequest};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

const FIRST_RETRY: Duration = Duration::from_millis(200);
const MAX_RETRY: Duration = Duration::from_secs(10);
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub(crate) struct Membership {
    client: SchedulerClient<Channel>,
    request: RegisterWorkerRequest,
    id_file: PathBuf,
}

impl Membership {
    pub(crate) fn new(
        client: SchedulerClient<Channel>,
        request: RegisterWorkerRequest,
        state_dir: &std::path::Path,
    ) -> Self {
        Membership {
            client,
            request,
            id_file: state_dir.join("worker_id"),
        }
    }

    /// Registers, retrying with exponential backoff until the scheduler
    /// accepts or `cancel` fires. Returns the worker id.
    pub(crate) async fn register(&self, cancel: &CancellationToken) -> Option<String> {
        let mut request = self.request.clone();
        request.previous_worker_id = tokio::fs::read_to_string(&self.id_file)
            .await
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        let mut delay = FIRST_RETRY;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let mut client = self.client.clone();
            let mut call = tonic::Request::new(request.clone());
            call.set_timeout(CALL_TIMEOUT);
            let result = tokio::select! {
                r = client.register_worker(call) => r,
                () = cancel.cancelled() => return None,
            };
            match result {
                Ok(reply) => {
                    let id = reply.into_inner().worker_id;
                    if let Err(error) = tokio::fs::write(&self.id_file, &id).await {
                        tracing::warn!(%error, file = %self.id_file.display(), "could not keep the worker id");
                    }
                    tracing::info!(worker_id = %id, advertised = %self.request.address, "registered with the scheduler");
                    return Some(id);
                }
                Err(status) => {
                    // Say it loudly once, then quietly: a scheduler that
                    // starts after its workers is normal.
                    if attempt == 1 || attempt.is_multiple_of(10) {
                        tracing::warn!(attempt, code = ?status.code(), error = %status.message(), retry_in = ?delay, "scheduler registration failed; retrying");
                    } else {
                        tracing::debug!(attempt, error = %status.message(), "scheduler registration failed");
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = cancel.cancelled() => return None,
            }
            delay = (delay * 2).min(MAX_RETRY);
        }
    }

    pub(crate) async fn deregister(&self, worker_id: String) {
        let mut client = self.client.clone();
        let mut call = tonic::Request::new(DeregisterWorkerRequest {
            worker_id: worker_id.clone(),
        });
        call.set_timeout(CALL_TIMEOUT);
        match tokio::time::timeout(CALL_TIMEOUT, client.deregister_worker(call)).await {
            Ok(Ok(_)) => tracing::info!(%worker_id, "deregistered from the scheduler"),
            Ok(Err(status)) => {
                tracing::warn!(%worker_id, error = %status.message(), "deregistration failed")
            }
            Err(_) => tracing::warn!(%worker_id, "deregistration timed out"),
        }
    }
}
