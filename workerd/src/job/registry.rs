//! The registry of the worker's jobs, and what changed among them.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use jobcluster_plugins::Plugin;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::kill::kill_leftovers;
use super::record::{Origin, load_record, load_records, now_ms, write_final};
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
    /// Every job's stop token is a child of this one, so a shutdown
    /// reaches jobs started at any moment.
    pub(super) shutdown: CancellationToken,
    /// Job ids whose start is under way.
    pub(super) starting: Mutex<HashSet<Uuid>>,
    /// Jobs whose process runs now (for `max_jobs`).
    pub(super) running: Arc<AtomicUsize>,
    pub(super) policy: Policy,
    /// Job directories made ahead of the starts that take them.
    pub(super) spares: Arc<super::spare::Spares>,
}

/// What the worker must tell others about: jobs whose state changed since
/// the scheduler last acknowledged them, final records not yet on disk,
/// and a wake-up when a job finishes.
#[derive(Debug, Default)]
pub(super) struct Changes {
    pub(super) dirty: Mutex<HashSet<Uuid>>,
    /// Taken for a report not yet acknowledged: given back if it fails.
    pub(super) in_flight: Mutex<HashSet<Uuid>>,
    /// Final states kept in memory because writing them failed; retried.
    pub(super) unwritten: Mutex<HashSet<Uuid>>,
    /// Finished jobs still in memory, oldest first, with when they were
    /// queued: they leave memory once [`FINISHED_IN_MEMORY_MS`] old (and
    /// reported and written); later reads load them from disk.
    pub(super) leaving: Mutex<VecDeque<(Uuid, u64)>>,
    pub(super) finished: Notify,
    /// A job ended: the scheduler should hear of it now, not at the next
    /// heartbeat, as its slot may start a queued job.
    pub(super) report: Notify,
}

impl Changes {
    pub(super) fn mark(&self, ids: impl IntoIterator<Item = Uuid>) {
        self.dirty
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(ids);
    }

    /// Queues a finished job for leaving memory.
    pub(super) fn ended(&self, id: Uuid) {
        self.leaving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back((id, now_ms()));
    }

    pub(super) fn unwritten(&self, id: Uuid) {
        self.unwritten
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id);
    }
}

/// Final states finished this long before the last acknowledged report
/// are reported again after a restart: a job's end is recorded a moment
/// (one synced write) before it is queued for reporting. Small, so what a
/// restart reports stays small however busy the worker was.
const REPORT_MARGIN_MS: u64 = 10_000;
/// How long a finished job stays in memory, for its followers and reports.
const FINISHED_IN_MEMORY_MS: u64 = 5 * 60 * 1000;
/// At most this many finished jobs stay in memory, however recent: about
/// 2 KB each, so a busy worker's memory stays within 2 MB of idle (it was
/// 10,000 and 20 MB). An evicted job is read from its record on disk when
/// asked for, as after a restart.
const MAX_FINISHED_IN_MEMORY: usize = 1_000;
/// Job reports in one heartbeat; the rest follow in the next ones.
pub(crate) const REPORTS_PER_CALL: usize = 1000;

impl Jobs {
    /// Opens the job store under `state_dir` and loads the records of
    /// earlier runs. A job recorded as running belonged to a worker that
    /// died: what is left of it is killed and it is recorded `lost`. Final
    /// states the scheduler may not have acknowledged (finished after
    /// `reported_until_ms`, less a margin) are queued for reporting.
    pub(crate) async fn open(
        state_dir: &Path,
        scripts_dir: PathBuf,
        worker_name: String,
        plugins: BTreeMap<String, Plugin>,
        policy: Policy,
        reported_until_ms: u64,
    ) -> Result<Self, std::io::Error> {
        let jobs_dir = state_dir.join("jobs");
        let dir = jobs_dir.clone();
        // Never acknowledged (a new worker, or one from before this file
        // was kept): only the latest ends can be news to the scheduler.
        let reported_until_ms = match reported_until_ms {
            0 => now_ms(),
            ms => ms,
        };
        let report_from = reported_until_ms.saturating_sub(REPORT_MARGIN_MS);
        // Only what must be acted on or reported is kept in memory: jobs
        // that were running, and final states the scheduler may not have.
        let (loaded, on_disk) = tokio::task::spawn_blocking(move || {
            load_records(&dir, |r| {
                r.state == State::Running || r.finished_at_ms >= report_from
            })
        })
        .await
        .map_err(std::io::Error::other)??;
        tracing::info!(on_disk, kept = loaded.len(), "job records read");
        let mut map = HashMap::new();
        let mut dirty = HashSet::new();
        let mut unwritten = HashSet::new();
        let mut finished = VecDeque::new();
        let now = now_ms();
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
                record.output_bytes = len;
                if let Err(error) = write_final(&jobs_dir, &record, &Origin::default()).await {
                    tracing::error!(job_id = %record.id, %error, "could not record a job lost; kept in memory and retried");
                    unwritten.insert(record.id);
                }
                dirty.insert(record.id);
                tracing::warn!(job_id = %record.id, killed, "job was running when the worker stopped; recorded lost");
            } else {
                dirty.insert(record.id);
            }
            finished.push_back((record.id, now));
            // The record says how much output the job has: a log may be
            // longer (a write that landed after its pump was given up on)
            // or shorter (emptied by retention, read as expired).
            let (progress, _) = watch::channel(Progress {
                len: record.output_bytes,
                done: true,
                ..Progress::default()
            });
            let id = record.id;
            map.insert(
                id,
                Arc::new(Job {
                    log_path: jobs_dir.join(id.to_string()).join(super::record::LOG),
                    record: Mutex::new(record),
                    progress,
                    stop: CancellationToken::new(),
                    given_up: CancellationToken::new(),
                }),
            );
        }
        let tracker = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let spares = Arc::new(super::spare::Spares::new(state_dir));
        tracker.spawn(spares.clone().refill(shutdown.clone()));
        Ok(Jobs {
            jobs_dir,
            scripts_dir,
            worker_name,
            plugins,
            map: RwLock::new(map),
            changes: Arc::new(Changes {
                dirty: Mutex::new(dirty),
                in_flight: Mutex::new(HashSet::new()),
                unwritten: Mutex::new(unwritten),
                leaving: Mutex::new(finished),
                finished: Notify::new(),
                report: Notify::new(),
            }),
            accepting: AtomicBool::new(true),
            tracker,
            shutdown,
            starting: Mutex::new(HashSet::new()),
            running: Arc::new(AtomicUsize::new(0)),
            policy,
            spares,
        })
    }

    /// Jobs whose process runs now (each holds a `max_jobs` slot).
    pub(crate) fn running_count(&self) -> usize {
        self.running.load(Ordering::Acquire)
    }

    fn status(job: &Job) -> (JobRecord, u64) {
        (job.record(), job.progress.borrow().len)
    }

    /// What a (re-)registration reports: every running job, and up to
    /// [`REPORTS_PER_CALL`] jobs whose change the scheduler has not
    /// acknowledged (taken: give them back with [`Jobs::mark_dirty`] if the
    /// registration fails, or [`Jobs::acknowledge`] them). Never the whole
    /// history. The flag says whether more changes wait (the report is then
    /// partial, and heartbeats carry the rest).
    pub(crate) fn registration_report(&self) -> (Vec<(JobRecord, u64)>, Vec<Uuid>, bool) {
        let taken = self.take_dirty_ids(REPORTS_PER_CALL);
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        let mut ids: HashSet<Uuid> = taken.iter().copied().collect();
        ids.extend(
            map.iter()
                .filter(|(_, j)| !j.progress.borrow().done)
                .map(|(id, _)| *id),
        );
        let report = ids
            .iter()
            .filter_map(|id| map.get(id))
            .map(|j| Self::status(j))
            .collect();
        drop(map);
        (report, taken, self.has_dirty())
    }

    fn take_dirty_ids(&self, max: usize) -> Vec<Uuid> {
        let mut dirty = self.changes.dirty.lock().unwrap_or_else(|e| e.into_inner());
        let ids: Vec<Uuid> = if dirty.len() <= max {
            std::mem::take(&mut *dirty).into_iter().collect()
        } else {
            let ids: Vec<Uuid> = dirty.iter().take(max).copied().collect();
            for id in &ids {
                dirty.remove(id);
            }
            ids
        };
        // Still pending until acknowledged: such a job stays in memory.
        self.changes
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(ids.iter().copied());
        ids
    }

    /// The scheduler acknowledged the reports of these jobs.
    pub(crate) fn acknowledge(&self, ids: &[Uuid]) {
        let mut in_flight = self
            .changes
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for id in ids {
            in_flight.remove(id);
        }
    }

    /// Takes up to [`REPORTS_PER_CALL`] jobs whose state changed since the
    /// last acknowledged report. Give them back with [`Jobs::mark_dirty`]
    /// if the report fails.
    pub(crate) fn take_dirty(&self) -> (Vec<(JobRecord, u64)>, Vec<Uuid>) {
        let ids = self.take_dirty_ids(REPORTS_PER_CALL);
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        let records = ids
            .iter()
            .filter_map(|id| map.get(id))
            .map(|j| Self::status(j))
            .collect();
        (records, ids)
    }

    /// Gives back reports that failed (or marks new changes).
    pub(crate) fn mark_dirty(&self, ids: impl IntoIterator<Item = Uuid> + Clone) {
        self.acknowledge(&ids.clone().into_iter().collect::<Vec<_>>());
        self.changes.mark(ids);
    }

    /// Whether changes wait to be reported.
    pub(crate) fn has_dirty(&self) -> bool {
        !self
            .changes
            .dirty
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// The scheduler gave these jobs up as lost while this worker was cut
    /// off: what is left of them is killed and they are recorded lost, so
    /// worker and scheduler agree. Jobs already ended are left as they are.
    pub(crate) fn give_up(&self, ids: &[String]) {
        for id in ids {
            // A running job is always in memory.
            let job = Uuid::parse_str(id).ok().and_then(|id| self.find(id));
            match job {
                Some(job) if !job.progress.borrow().done => {
                    tracing::warn!(job_id = %id, "the scheduler recorded this job lost; killing what is left of it");
                    job.given_up.cancel();
                }
                _ => {}
            }
        }
    }

    /// Writes the final records that could not be written before (a full
    /// or failing disk); those that fail again stay queued.
    pub(crate) async fn write_pending(&self) {
        let ids: Vec<Uuid> = std::mem::take(
            &mut *self
                .changes
                .unwritten
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        )
        .into_iter()
        .collect();
        // Whether the job's directory came from a spare is not kept: the
        // spares' directory is synced for every one (a sync shared among
        // them), so a removal from it whose sync failed is made durable
        // before the spares are cleared at the next start.
        let origin = Origin {
            spares: Some(self.spares.dir().to_owned()),
            files_synced: false,
        };
        for id in ids {
            let Some(job) = self.find(id) else { continue };
            match write_final(&self.jobs_dir, &job.record(), &origin).await {
                Ok(()) => tracing::info!(job_id = %id, "final state written at last"),
                Err(error) => {
                    tracing::debug!(job_id = %id, %error, "final state still cannot be written");
                    self.changes.unwritten(id);
                }
            }
        }
    }

    /// Applies the retention limits to finished jobs on disk: their output
    /// is deleted, oldest first, once older than `max_age` or while the
    /// total passes `max_bytes` (their records stay; output reads as
    /// expired); their whole record goes once older than `max_record_age`.
    /// Ages come from file times (the log's last write, the record's last
    /// write), so the sweep reads no record it does not change.
    pub(crate) async fn apply_retention(&self, limits: crate::config::Retention) {
        let running: HashSet<Uuid> = self
            .map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, j)| !j.progress.borrow().done)
            .map(|(id, _)| *id)
            .collect();
        // Jobs whose end the scheduler has not acknowledged, or whose final
        // record is not on disk yet: deleting one's record would make the
        // scheduler record it `lost` (a registration without it, or a query
        // the worker answers "unknown job") when it ended in a known state.
        // Their output may still go: the record stays.
        let mut unreported = HashSet::new();
        for set in [
            &self.changes.dirty,
            &self.changes.in_flight,
            &self.changes.unwritten,
        ] {
            unreported.extend(set.lock().unwrap_or_else(|e| e.into_inner()).iter());
        }
        let jobs_dir = self.jobs_dir.clone();
        let swept = tokio::task::spawn_blocking(move || {
            crate::retention::sweep(&jobs_dir, &running, &unreported, limits, now_ms())
        })
        .await;
        let swept = match swept {
            Ok(Ok(swept)) => swept,
            Ok(Err(error)) => {
                tracing::warn!(%error, "retention sweep failed");
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "retention sweep failed");
                return;
            }
        };
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        for id in &swept.expired {
            if let Some(job) = map.get(id) {
                job.update(|r| r.output_expired = true);
            }
        }
        drop(map);
        if !swept.removed.is_empty() {
            let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
            for id in &swept.removed {
                map.remove(id);
            }
        }
    }

    /// Resolves when a job has ended since the last call (for reporting).
    pub(crate) async fn report_wanted(&self) {
        self.changes.report.notified().await;
    }

    /// Resolves when some job has finished since the last call.
    pub(crate) async fn job_finished(&self) {
        self.changes.finished.notified().await;
    }

    /// A job by id: from memory, or (a finished job) from its record on disk.
    pub(crate) async fn get(&self, id: &str) -> Result<Arc<Job>, JobError> {
        let uuid = Uuid::parse_str(id).map_err(|_| JobError::BadJobId(id.to_owned()))?;
        if let Some(job) = self.find(uuid) {
            return Ok(job);
        }
        if self
            .starting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&uuid)
        {
            return Err(JobError::Starting(uuid));
        }
        let dir = self.jobs_dir.join(uuid.to_string());
        let loaded = tokio::task::spawn_blocking(move || load_record(&dir))
            .await
            .map_err(|e| JobError::Io(std::io::Error::other(e)))?;
        match loaded {
            // A record on disk that says running belongs to a start under
            // way: not a job yet.
            Ok((record, _)) if record.state != State::Running => {
                // The record says how much output the job has: a log that
                // retention emptied on a full disk, before it could say so
                // in the record, does not shrink what the job wrote (its
                // output reads as expired, `output_cut`), and bytes of a
                // write that landed after the job's end was recorded (a
                // stalled disk) were never the job's output.
                let len = record.output_bytes;
                let (progress, _) = watch::channel(Progress {
                    len,
                    done: true,
                    ..Progress::default()
                });
                Ok(Arc::new(Job {
                    log_path: self.jobs_dir.join(id).join(super::record::LOG),
                    record: Mutex::new(record),
                    progress,
                    stop: CancellationToken::new(),
                    given_up: CancellationToken::new(),
                }))
            }
            Ok(_) => Err(JobError::UnknownJob(id.to_owned())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(JobError::UnknownJob(id.to_owned()))
            }
            // Not "unknown": the scheduler would give the job up.
            Err(e) => Err(JobError::Io(e)),
        }
    }

    /// Lets finished jobs leave memory once they are old enough (or too
    /// many), reported and written: memory follows the running jobs, not
    /// the history. Readers holding one keep it until they are done.
    pub(crate) fn evict_finished(&self) {
        let now = now_ms();
        let mut queue = self
            .changes
            .leaving
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut evict = Vec::new();
        let mut busy = Vec::new();
        while let Some(&(id, at)) = queue.front() {
            let old = now.saturating_sub(at) > FINISHED_IN_MEMORY_MS;
            if !old && queue.len() <= MAX_FINISHED_IN_MEMORY {
                break;
            }
            queue.pop_front();
            let pending = self
                .changes
                .dirty
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&id)
                || self
                    .changes
                    .in_flight
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains(&id)
                || self
                    .changes
                    .unwritten
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains(&id);
            if pending {
                busy.push((id, now));
            } else {
                evict.push(id);
            }
        }
        queue.extend(busy);
        drop(queue);
        if !evict.is_empty() {
            let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
            for id in &evict {
                map.remove(id);
            }
        }
    }

    pub(super) fn find(&self, id: Uuid) -> Option<Arc<Job>> {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
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
        let job = self.get(id).await?;
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
        let running = self.running.load(Ordering::Acquire);
        if running > 0 {
            tracing::info!(jobs = running, "stopping running jobs");
        }
        // Every job's stop token descends from this one, including a job
        // whose start is under way right now.
        self.shutdown.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}
