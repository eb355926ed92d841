//! The worker's membership in the cluster: registering with the scheduler
//! (retrying with backoff while the worker already serves), heartbeating
//! with the jobs whose state changed, registering again when the scheduler
//! no longer knows it, and leaving cleanly on shutdown. The id the
//! scheduler assigns is kept in `state_dir/worker_id` so the worker asks
//! for it back after a restart; `state_dir/reported_until` keeps when the
//! scheduler last acknowledged the job reports, so a restarted worker
//! reports again only the final states that may not have reached it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use jobcluster_proto::pb::scheduler_client::SchedulerClient;
use jobcluster_proto::pb::{DeregisterWorkerRequest, HeartbeatRequest, RegisterWorkerRequest};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::job::{JobRecord, Jobs, REPORTS_PER_CALL, now_ms, write_atomically, write_durably};
use crate::service::to_pb_status;

/// Registration retries: 200 ms, doubled up to 5 s, each pause jittered
/// up to twice its length (so at most 10 s).
const FIRST_RETRY: Duration = Duration::from_millis(200);
const MAX_RETRY: Duration = Duration::from_secs(5);
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);

/// Why a registration attempt did not register.
#[derive(Debug)]
enum Refused {
    /// The scheduler refused or could not be reached: try again.
    Status(tonic::Status),
    /// The worker is shutting down.
    Cancelled,
}

/// A heartbeat the scheduler answered.
struct Beat {
    /// Until the next one.
    interval: Duration,
    /// It carried as many reports as one may: more may wait.
    full: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct Membership {
    /// Every scheduler this worker may talk to (several share one store),
    /// with its address; any of them accepts it.
    schedulers: Arc<[(String, SchedulerClient<Channel>)]>,
    /// The one it talks to now; the next is tried when a call fails.
    current: Arc<std::sync::atomic::AtomicUsize>,
    request: RegisterWorkerRequest,
    id_file: PathBuf,
    reported_file: PathBuf,
    jobs: Arc<Jobs>,
    /// Becomes true at the first registration the scheduler accepts.
    registered: Arc<tokio::sync::watch::Sender<bool>>,
}

/// When the scheduler last acknowledged this worker's job reports, as kept
/// in `state_dir` (0 if never).
pub(crate) async fn reported_until(state_dir: &std::path::Path) -> u64 {
    tokio::fs::read_to_string(state_dir.join("reported_until"))
        .await
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Job reports for the scheduler. They carry no arguments: the scheduler
/// recorded those before the job started, and a report must stay small
/// whatever the job was given.
fn reports(records: Vec<(JobRecord, u64)>) -> Vec<jobcluster_proto::pb::QueryJobResponse> {
    records
        .into_iter()
        .map(|(mut r, len)| {
            r.args = Vec::new();
            to_pb_status(&r, len)
        })
        .collect()
}

fn call<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(CALL_TIMEOUT);
    request
}

impl Membership {
    pub(crate) fn new(
        schedulers: Vec<(String, SchedulerClient<Channel>)>,
        mut request: RegisterWorkerRequest,
        state_dir: &std::path::Path,
        jobs: Arc<Jobs>,
    ) -> Self {
        request.instance_id = uuid::Uuid::new_v4().to_string();
        Membership {
            schedulers: schedulers.into(),
            current: Arc::default(),
            request,
            id_file: state_dir.join("worker_id"),
            reported_file: state_dir.join("reported_until"),
            jobs,
            registered: Arc::new(tokio::sync::watch::Sender::new(false)),
        }
    }

    /// The scheduler to talk to now.
    fn client(&self) -> SchedulerClient<Channel> {
        let at = self.current.load(std::sync::atomic::Ordering::Relaxed);
        self.schedulers[at % self.schedulers.len()].1.clone()
    }

    /// A call to the current scheduler failed with `status`: if it was not
    /// an answer (the scheduler is down, unreachable or too slow), the next
    /// call goes to the next scheduler.
    fn failed(&self, status: &tonic::Status) {
        use tonic::Code::{Cancelled, DeadlineExceeded, Internal, Unavailable, Unknown};
        if self.schedulers.len() < 2
            || !matches!(
                status.code(),
                Unavailable | DeadlineExceeded | Unknown | Cancelled | Internal
            )
        {
            return;
        }
        let at = self
            .current
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let next = &self.schedulers[at % self.schedulers.len()].0;
        tracing::warn!(scheduler = %next, code = ?status.code(), "scheduler failed; moving to the next one");
    }

    /// Becomes true once the scheduler has accepted this worker.
    pub(crate) fn registered(&self) -> tokio::sync::watch::Receiver<bool> {
        self.registered.subscribe()
    }

    /// Stays a member until `cancel` fires; returns the worker id if the
    /// worker was registered then.
    pub(crate) async fn run(&self, cancel: CancellationToken) -> Option<String> {
        loop {
            let (worker_id, mut interval) = self.register(&cancel).await?;
            // Answered after the stop: leave now, not after another beat.
            if cancel.is_cancelled() {
                return Some(worker_id);
            }
            // Until the next beat: the interval, or none when more is due
            // (a registration carries one call's worth of changes; a
            // restart after many unreported ends leaves the rest).
            let mut wait = if self.jobs.has_dirty() {
                Duration::ZERO
            } else {
                interval
            };
            // Beats failed in a row; with several schedulers, the next one
            // is tried at once, each once, before the worker waits again.
            let mut failed = 0;
            loop {
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    // A freed slot reaches the scheduler's queue at once.
                    () = self.jobs.report_wanted() => {}
                    () = cancel.cancelled() => return Some(worker_id),
                }
                match self
                    .heartbeat(&worker_id, self.beat_timeout(interval))
                    .await
                {
                    Ok(Some(Beat {
                        interval: next,
                        full,
                    })) => {
                        interval = next;
                        failed = 0;
                        // More changes than one message carries: the rest
                        // now. Anything else that changed meanwhile waits:
                        // an end has notified `report_wanted` (its slot
                        // matters now), and a start's `running` the
                        // scheduler has from the start's answer. Beating
                        // again for it cost every job a second heartbeat
                        // (a store transaction on the scheduler) while
                        // starts came one after another.
                        wait = if full { Duration::ZERO } else { interval };
                    }
                    Ok(None) => {
                        tracing::warn!(%worker_id, "the scheduler no longer knows this worker; registering again");
                        break;
                    }
                    // The scheduler may be restarting: keep beating, and
                    // register again once it answers that it forgot us.
                    Err(status) => {
                        failed += 1;
                        wait = if failed < self.schedulers.len() {
                            Duration::ZERO
                        } else {
                            failed = 0;
                            interval
                        };
                        tracing::warn!(%worker_id, code = ?status.code(), error = %status.message(), "heartbeat failed");
                    }
                }
            }
        }
    }

    /// One heartbeat with the jobs that changed. `Ok(None)`: unknown worker.
    /// How long a heartbeat may take. With several schedulers, about one
    /// interval (1 s to 5 s): a hung scheduler then costs this worker one
    /// missed beat before it moves on, not a silence the leader judges.
    fn beat_timeout(&self, interval: Duration) -> Duration {
        if self.schedulers.len() < 2 {
            return CALL_TIMEOUT;
        }
        interval.clamp(Duration::from_secs(1), CALL_TIMEOUT)
    }

    async fn heartbeat(
        &self,
        worker_id: &str,
        timeout: Duration,
    ) -> Result<Option<Beat>, tonic::Status> {
        let snapshot = now_ms();
        let (changed, ids) = self.jobs.take_dirty();
        let request = HeartbeatRequest {
            worker_id: worker_id.to_owned(),
            instance_id: self.request.instance_id.clone(),
            jobs: reports(changed),
        };
        let mut client = self.client();
        let mut request = tonic::Request::new(request);
        request.set_timeout(timeout);
        match client.heartbeat(request).await {
            Ok(reply) => {
                let reply = reply.into_inner();
                if !reply.known {
                    self.jobs.mark_dirty(ids);
                    return Ok(None);
                }
                self.jobs.acknowledge(&ids);
                self.jobs.give_up(&reply.kill_job_ids);
                // Everything queued before the snapshot has arrived, unless
                // some still waits for the next message.
                if !ids.is_empty() && !self.jobs.has_dirty() {
                    self.acknowledged(snapshot).await;
                }
                Ok(Some(Beat {
                    interval: interval(reply.heartbeat_interval_ms),
                    full: ids.len() >= REPORTS_PER_CALL,
                }))
            }
            Err(status) => {
                self.jobs.mark_dirty(ids);
                self.failed(&status);
                Err(status)
            }
        }
    }

    /// Registers, retrying with exponential backoff until the scheduler
    /// accepts or `cancel` fires. Returns the worker id and heartbeat interval.
    async fn register(&self, cancel: &CancellationToken) -> Option<(String, Duration)> {
        use backon::Retryable;
        // Jittered: after a scheduler restart every worker registers again
        // at once; random pauses (each between d and 2d) spread them out.
        let schedule = backon::ExponentialBuilder::default()
            .with_min_delay(FIRST_RETRY)
            .with_max_delay(MAX_RETRY)
            .with_jitter()
            .without_max_times();
        let mut attempt = 0u32;
        // A pause ends early on `cancel`; the attempt after it then sees
        // `cancel` before it takes anything from the jobs. Cancelling from
        // outside instead could drop an attempt between the scheduler's
        // answer and its bookkeeping.
        let token = cancel.clone();
        let pause = move |d| {
            let token = token.clone();
            async move {
                tokio::select! {
                    () = tokio::time::sleep(d) => {}
                    () = token.cancelled_owned() => {}
                }
            }
        };
        (|| self.register_once(cancel))
            .retry(schedule)
            .sleep(pause)
            .when(|e| matches!(e, Refused::Status(_)))
            .notify(|e, retry_in| {
                attempt += 1;
                let Refused::Status(status) = e else { return };
                // Say it loudly at first, then now and then: a scheduler
                // that starts after its workers is normal.
                if attempt <= 3 || attempt.is_multiple_of(10) {
                    tracing::warn!(attempt, code = ?status.code(), error = %status.message(), ?retry_in, "scheduler registration failed; retrying");
                } else {
                    tracing::debug!(attempt, error = %status.message(), "scheduler registration failed");
                }
            })
            .await
            .ok()
    }

    /// One registration attempt.
    async fn register_once(
        &self,
        cancel: &CancellationToken,
    ) -> Result<(String, Duration), Refused> {
        if cancel.is_cancelled() {
            return Err(Refused::Cancelled);
        }
        let mut request = self.request.clone();
        request.previous_worker_id = tokio::fs::read_to_string(&self.id_file)
            .await
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        // A registration reports every running job and the changes
        // not yet acknowledged (in pages), never the whole history.
        let snapshot = now_ms();
        let (report, pending, partial) = self.jobs.registration_report();
        request.jobs = reports(report);
        request.partial_report = partial;
        let mut client = self.client();
        let registering = client.register_worker(call(request));
        tokio::pin!(registering);
        let result = tokio::select! {
            r = &mut registering => r,
            // Stopping while the scheduler may already have recorded this
            // registration: its answer is waited for, so that the worker
            // leaves under the id it was given. Dropped, it left the name
            // registered and alive on the scheduler until `down_after`,
            // which refused the worker's own restart meanwhile. The call's
            // own deadline (`CALL_TIMEOUT`, which tonic's client keeps)
            // bounds the wait; past it, or refused, the worker stops
            // unregistered, as before.
            () = cancel.cancelled() => match registering.await {
                Ok(reply) => Ok(reply),
                Err(_) => {
                    self.jobs.mark_dirty(pending);
                    return Err(Refused::Cancelled);
                }
            },
        };
        let reply = match result {
            Ok(reply) => reply.into_inner(),
            Err(status) => {
                self.jobs.mark_dirty(pending);
                self.failed(&status);
                return Err(Refused::Status(status));
            }
        };
        let (file, id) = (self.id_file.clone(), reply.worker_id.clone());
        let kept = tokio::task::spawn_blocking(move || write_durably(&file, id.as_bytes()))
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r);
        if let Err(error) = kept {
            tracing::warn!(%error, file = %self.id_file.display(), "could not keep the worker id");
        }
        self.jobs.acknowledge(&pending);
        self.jobs.give_up(&reply.kill_job_ids);
        if !partial {
            self.acknowledged(snapshot).await;
        }
        tracing::info!(worker_id = %reply.worker_id, advertised = %self.request.address, "registered with the scheduler");
        self.registered.send_replace(true);
        Ok((reply.worker_id, interval(reply.heartbeat_interval_ms)))
    }

    /// Keeps that every change queued before `snapshot_ms` reached the
    /// scheduler (best effort: without it, a restart reports more; so it is
    /// not synced, which kept a sync on every report's path).
    async fn acknowledged(&self, snapshot_ms: u64) {
        let file = self.reported_file.clone();
        let text = snapshot_ms.to_string();
        let kept = tokio::task::spawn_blocking(move || write_atomically(&file, text.as_bytes()))
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r);
        if let Err(error) = kept {
            tracing::debug!(%error, "could not keep when reports were acknowledged");
        }
    }

    /// Reports the final states of the jobs stopped at shutdown, then
    /// deregisters.
    pub(crate) async fn leave(&self, worker_id: String) {
        if let Err(status) = self.heartbeat(&worker_id, CALL_TIMEOUT).await {
            tracing::warn!(%worker_id, error = %status.message(), "could not report final job states");
        }
        let mut client = self.client();
        let request = DeregisterWorkerRequest {
            worker_id: worker_id.clone(),
        };
        match tokio::time::timeout(CALL_TIMEOUT, client.deregister_worker(call(request))).await {
            Ok(Ok(_)) => tracing::info!(%worker_id, "deregistered from the scheduler"),
            Ok(Err(status)) => {
                tracing::warn!(%worker_id, error = %status.message(), "deregistration failed")
            }
            Err(_) => tracing::warn!(%worker_id, "deregistration timed out"),
        }
    }
}

fn interval(ms: u64) -> Duration {
    if ms == 0 {
        DEFAULT_HEARTBEAT
    } else {
        Duration::from_millis(ms).max(Duration::from_millis(100))
    }
}
