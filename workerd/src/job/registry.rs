//! The registry of the worker's jobs, and what changed among them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use jobcluster_plugins::Plugin;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::kill::kill_leftovers;
use super::record::{load_records, now_ms, write_record};
use super::supervise::STOP_WAIT;
use super::{Job, JobError, JobRecord, Policy, Progress, State};

/// The jobs of this worker.
#[derive(Debug)]
pub(crate) struct Jobs {
    pub(super) jobs_dir: PathBuf,
    pub(super) scripts_dir: PathBuf,
    pub(super) worker_name: String,
    pub(super) plugins: BTreeMap<String, Plugin>,
    // std RwLock: lookups are short and never cross an await.
    pub(super) map: RwLock<HashMap<Uuid, Arc<Job>>>,
    pub(super) changes: Arc<Changes>,
    pub(super) accepting: AtomicBool,
    pub(super) tracker: TaskTracker,
    /// Jobs whose process runs now (for `max_jobs`).
    pub(super) running: Arc<AtomicUsize>,
    pub(super) policy: Policy,
}

/// What the worker must tell others about: jobs whose state changed since
/// the scheduler last heard of them, and a wake-up when one finishes.
#[derive(Debug, Default)]
pub(super) struct Changes {
    pub(super) dirty: Mutex<HashSet<Uuid>>,
    pub(super) finished: Notify,
}

impl Changes {
    pub(super) fn mark(&self, ids: impl IntoIterator<Item = Uuid>) {
        self.dirty
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(ids);
    }
}

impl Jobs {
    /// Opens the job store under `state_dir` and loads the records of
    /// earlier runs. A job recorded as running belonged to a worker that
    /// died: it is recorded `lost`.
    pub(crate) async fn open(
        state_dir: &Path,
        scripts_dir: PathBuf,
        worker_name: String,
        plugins: BTreeMap<String, Plugin>,
        policy: Policy,
    ) -> Result<Self, std::io::Error> {
        let jobs_dir = state_dir.join("jobs");
        let dir = jobs_dir.clone();
        let loaded = tokio::task::spawn_blocking(move || load_records(&dir))
            .await
            .map_err(std::io::Error::other)??;
        let mut map = HashMap::new();
        let mut dirty = HashSet::new();
        for (mut record, len) in loaded {
            if record.state == State::Running {
                // The worker died under this job. Whatever is left of it
                // must not live on unsupervised.
                let killed = kill_leftovers(&record, policy.cgroups.as_ref()).await;
                record.state = State::Lost;
                record.error_text = if killed > 0 {
                    format!(
                        "the worker stopped while the job ran; {killed} leftover process(es) killed"
                    )
                } else {
                    "the worker stopped while the job ran".into()
                };
                record.finished_at_ms = now_ms();
                record.pgid = None;
                record.output_bytes = len;
                write_record(&jobs_dir, &record).await?;
                dirty.insert(record.id);
                tracing::warn!(job_id = %record.id, killed, "job was running when the worker stopped; recorded lost");
            }
            let (progress, _) = watch::channel(Progress { len, done: true });
            let id = record.id;
            map.insert(
                id,
                Arc::new(Job {
                    log_path: jobs_dir.join(id.to_string()).join("output.log"),
                    record: Mutex::new(record),
                    progress,
                    stop: CancellationToken::new(),
                }),
            );
        }
        Ok(Jobs {
            jobs_dir,
            scripts_dir,
            worker_name,
            plugins,
            map: RwLock::new(map),
            changes: Arc::new(Changes {
                dirty: Mutex::new(dirty),
                finished: Notify::new(),
            }),
            accepting: AtomicBool::new(true),
            tracker: TaskTracker::new(),
            running: Arc::new(AtomicUsize::new(0)),
            policy,
        })
    }

    /// Every job's record, newest first: what a (re-)registration reports.
    pub(crate) fn all_records(&self) -> Vec<(JobRecord, u64)> {
        let mut all: Vec<_> = self
            .map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|j| (j.record(), j.progress.borrow().len))
            .collect();
        all.sort_by_key(|(r, _)| std::cmp::Reverse(r.created_at_ms));
        all
    }

    /// Takes the jobs whose state changed since the last report. Give them
    /// back with [`Jobs::mark_dirty`] if the report fails.
    pub(crate) fn take_dirty(&self) -> Vec<(JobRecord, u64)> {
        let ids: Vec<Uuid> =
            std::mem::take(&mut *self.changes.dirty.lock().unwrap_or_else(|e| e.into_inner()))
                .into_iter()
                .collect();
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        ids.iter()
            .filter_map(|id| map.get(id))
            .map(|j| (j.record(), j.progress.borrow().len))
            .collect()
    }

    pub(crate) fn mark_dirty(&self, ids: impl IntoIterator<Item = Uuid>) {
        self.changes.mark(ids);
    }

    /// Deletes the output of the oldest finished jobs until what is left is
    /// younger than `max_age` and smaller than `max_bytes` in total. Their
    /// records stay; their output reads as expired.
    pub(crate) async fn apply_retention(&self, max_age: Option<Duration>, max_bytes: Option<u64>) {
        let mut finished: Vec<Arc<Job>> = self
            .map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|j| j.progress.borrow().done)
            .filter(|j| !j.record().output_expired)
            .cloned()
            .collect();
        finished.sort_by_key(|j| j.record().finished_at_ms);
        let mut total: u64 = finished.iter().map(|j| j.progress.borrow().len).sum();
        let now = now_ms();
        for job in finished {
            let record = job.record();
            let too_old = max_age.is_some_and(|age| {
                now.saturating_sub(record.finished_at_ms) > age.as_millis() as u64
            });
            let too_big = max_bytes.is_some_and(|max| total > max);
            if !too_old && !too_big {
                continue;
            }
            let len = job.progress.borrow().len;
            match tokio::fs::remove_file(&job.log_path).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => {
                    tracing::warn!(job_id = %record.id, %error, "could not delete expired output");
                    continue;
                }
            }
            total = total.saturating_sub(len);
            let record = job.update(|r| r.output_expired = true);
            if let Err(error) = write_record(&self.jobs_dir, &record).await {
                tracing::warn!(job_id = %record.id, %error, "could not record expired output");
            }
            tracing::info!(job_id = %record.id, bytes = len, reason = if too_old { "age" } else { "size" }, "job output deleted by retention");
        }
    }

    /// Resolves when some job has finished since the last call.
    pub(crate) async fn job_finished(&self) {
        self.changes.finished.notified().await;
    }

    pub(crate) fn get(&self, id: &str) -> Result<Arc<Job>, JobError> {
        let uuid = Uuid::parse_str(id).map_err(|_| JobError::BadJobId(id.to_owned()))?;
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&uuid)
            .cloned()
            .ok_or_else(|| JobError::UnknownJob(id.to_owned()))
    }

    pub(super) fn insert(&self, job: &Arc<Job>) {
        let id = job.record().id;
        self.map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, job.clone());
        // After the insert, so a report taken in between finds the job.
        self.mark_dirty([id]);
    }

    /// Asks a job to stop. Returns its record; a finished job is left as it was.
    pub(crate) async fn stop(&self, id: &str) -> Result<JobRecord, JobError> {
        let job = self.get(id)?;
        let mut progress = job.progress();
        if !progress.borrow().done {
            tracing::info!(job_id = %id, "stop requested");
            job.stop.cancel();
            // The supervisor finishes the job; wait a little for it, so the
            // answer usually carries the final state, but never longer than
            // a caller's deadline can bear (a long grace period goes on).
            let _ = tokio::time::timeout(STOP_WAIT, progress.wait_for(|p| p.done)).await;
        }
        Ok(job.record())
    }

    /// Stops taking jobs, stops every running job with its grace period and
    /// waits for all of them to be recorded.
    pub(crate) async fn shutdown(&self) {
        self.accepting.store(false, Ordering::Release);
        let running: Vec<_> = self
            .map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|j| !j.progress.borrow().done)
            .cloned()
            .collect();
        if !running.is_empty() {
            tracing::info!(jobs = running.len(), "stopping running jobs");
        }
        for job in running {
            job.stop.cancel();
        }
        self.tracker.close();
        self.tracker.wait().await;
    }
}
