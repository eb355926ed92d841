//! The scheduler's durable records: workers, jobs, groups, the queue and
//! idempotency keys, behind one interface ([`Store`]) with two
//! implementations: embedded SQLite ([`sqlite`], the default, one
//! scheduler) and PostgreSQL ([`postgres`], shared by several schedulers).
//!
//! A method returns once what it wrote is durable (committed and synced),
//! so what the API acknowledged survives a crash or a power loss; the one
//! exception, [`Store::update_started`], says so. A store never holds a
//! lock or a connection across anything but its own statements, and knows
//! nothing of HTTP, gRPC or workers' connections.

use std::path::PathBuf;
use std::sync::Arc;

use jobcluster_proto::http::GroupFailure;

use crate::state::{JobState, WorkerState};

pub mod postgres;
mod rows;
pub mod sqlite;
#[cfg(test)]
mod suite;

pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("database: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// A connection could not be made; `why` is the whole chain of causes
    /// (a TLS handshake's, say: which certificate, why refused).
    #[error("database {url}: {why}")]
    Connect {
        /// The URL without its password.
        url: String,
        why: String,
    },
    #[error("database: {0}")]
    Pool(String),
    /// A write of the leader's work from a scheduler that no longer holds
    /// the lease it was made under (fenced off; nothing was written).
    #[error("this scheduler is no longer the leader (its lease was taken over or expired)")]
    NotLeader,
    /// A value in the database this scheduler cannot read.
    #[error("database holds an unreadable {0}")]
    Corrupt(String),
    /// The database was made by a newer scheduler: its schema is one this
    /// one does not know, and writing to it could corrupt it.
    #[error(
        "database schema version {found} is newer than this scheduler understands (up to {known}); run a newer schedulerd"
    )]
    TooNew { found: i64, known: i64 },
    #[error("database: {0}")]
    Io(#[from] std::io::Error),
    #[error("database task failed: {0}")]
    Task(String),
    /// The idempotency key is already bound (by a request that won a race
    /// for it); nothing was written.
    #[error("idempotency key {0:?} is already bound")]
    KeyTaken(String),
}

/// A worker's durable record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerRow {
    pub worker_id: String,
    pub name: String,
    pub address: String,
    pub state: WorkerState,
    pub plugins: Vec<String>,
    pub labels: SmallMap<String>,
    pub registered_at_ms: u64,
    pub last_seen_ms: u64,
    /// Its job limits go through a delegated cgroup v2.
    pub cgroup_limits: bool,
    /// Script extensions each plugin runs (for placement by extension).
    pub extensions: SmallMap<Vec<String>>,
    /// Set by an operator: the worker takes no new jobs.
    pub draining: bool,
    /// Its slots: most jobs it runs at once; 0: unlimited.
    pub max_jobs: u32,
    /// Registered through the original design's contract (no instance id):
    /// it sends no heartbeats, so the scheduler checks on it instead.
    pub seed: bool,
}

/// A worker's few labels or plugins' extensions, as one sorted vector of
/// exactly their number: a `BTreeMap` allocates a node for eleven entries
/// even for one (0.5 KB), held per worker for the scheduler's life. Reads
/// are lookups and walks of a handful of entries; the JSON is the same map.
pub type SmallMap<V> = litemap::LiteMap<String, V>;

/// `map` as a [`SmallMap`] holding no spare room.
pub fn small_map<V>(map: std::collections::BTreeMap<String, V>) -> SmallMap<V> {
    let mut small = SmallMap::with_capacity(map.len());
    for (key, value) in map {
        // In order, so each is appended: none comes back.
        let _ = small.try_append(key, value);
    }
    small
}

impl WorkerRow {
    /// Slots left when `taken` jobs hold one; `None`: unlimited.
    pub fn free_slots(&self, taken: u64) -> Option<u64> {
        (self.max_jobs > 0).then(|| u64::from(self.max_jobs).saturating_sub(taken))
    }
}

/// A job's durable record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRow {
    pub job_id: String,
    pub worker_id: String,
    pub command: String,
    pub path: String,
    pub args: Vec<String>,
    pub state: JobState,
    pub error_text: String,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub created_at_ms: u64,
    pub started_at_ms: u64,
    pub finished_at_ms: u64,
    pub output_bytes: u64,
    /// The fan-out group the job belongs to.
    pub group_id: Option<String>,
    /// When the scheduler last wrote this record (what a stale answer is as of).
    pub updated_at_ms: u64,
}

/// A fan-out group's durable record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRow {
    pub group_id: String,
    pub command: String,
    pub path: String,
    pub args: Vec<String>,
    pub created_at_ms: u64,
    /// Workers the group's job could not be started on, written once its
    /// starts are settled ([`Store::record_group_failures`]), as the API
    /// answers them (kept as that type's JSON).
    pub failed: Vec<GroupFailure>,
}

/// An idempotency key to bind to the job or group being recorded, in the
/// same transaction, so neither can exist without the other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewKey {
    pub key: String,
    /// The route it was used on (`/v1/jobs`, `/start`, `/v1/groups`).
    pub route: String,
    /// Hex SHA-256 of the route and the canonical request body.
    pub body_sha256: String,
    pub created_at_ms: u64,
    /// A binding of the same key created before this has expired and is
    /// replaced; a younger one makes the write fail with
    /// [`StoreError::KeyTaken`].
    pub expired_before_ms: u64,
}

/// An idempotency key and what it is bound to (a job or a group).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRow {
    pub key: String,
    pub route: String,
    pub body_sha256: String,
    pub job_id: Option<String>,
    pub group_id: Option<String>,
    pub created_at_ms: u64,
}

/// A job's environment as its start request gave it.
pub type Env = std::collections::BTreeMap<String, String>;

/// What a queued job needs to be started later, beside its job record
/// (which holds path, arguments and plugin, with state `queued`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct QueueEntry {
    pub job_id: String,
    pub priority: i32,
    pub queued_at_ms: u64,
    /// The worker the request named; empty: any eligible worker.
    pub worker_id: String,
    pub selector: std::collections::BTreeMap<String, String>,
    /// The request's environment, kept only until the job is dispatched.
    pub env: Env,
    /// Still queued then: `failed`. 0: no timeout.
    pub deadline_ms: u64,
    /// Why it waits, as last seen by whoever queued or skipped it.
    pub reason: String,
}

/// Which jobs to list.
#[derive(Debug, Clone, Default)]
pub struct JobQuery {
    pub worker_id: Option<String>,
    pub state: Option<JobState>,
    /// Only jobs older (in insertion order) than this cursor.
    pub before: Option<i64>,
    pub limit: u32,
}

/// Everything the scheduler stores. Implementations must give every
/// method's effect atomically (one transaction) and durably before it
/// returns, unless the method says otherwise.
#[async_trait::async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Whether several schedulers may share this store: then one of them
    /// leads (holds the lease) and runs what must run once.
    fn shared(&self) -> bool;

    /// Takes the leader lease for `holder`, or renews it, for `ttl`;
    /// returns its term (a fencing token that grows with every change of
    /// hands), or `None` while another holder's lease is live. A store
    /// that is not shared answers every caller with the same term.
    async fn lead(&self, holder: &str, ttl: std::time::Duration)
    -> Result<Option<i64>, StoreError>;

    /// Gives the lease up if `holder` has it, so another takes over at once.
    async fn resign(&self, holder: &str) -> Result<(), StoreError>;

    /// This store as the leader of `term` writes to it: every write checks,
    /// in its own transaction, that `holder` still holds that term's live
    /// lease, and fails with [`StoreError::NotLeader`] (writing nothing)
    /// once it does not. A leader paused past its lease (or cut off) can
    /// then do no harm when it resumes.
    fn fenced(&self, holder: &str, term: i64) -> SharedStore;

    /// Records that the workers `ids` were heard from at `now_ms` (their
    /// heartbeats may reach any scheduler; the leader judges liveness from
    /// the store). A later time recorded already stays.
    async fn touch_workers(&self, ids: Vec<String>, now_ms: u64) -> Result<(), StoreError>;

    /// Records a worker as it registered. The drain flag of a worker
    /// already recorded stays as it is: only [`Store::set_worker_draining`]
    /// changes it (a registration racing an undrain would put it back).
    async fn upsert_worker(&self, w: WorkerRow) -> Result<(), StoreError>;

    /// Forgets a worker (its jobs' records stay) and remembers its id as
    /// removed. Jobs still recorded running on it can never be settled by
    /// it now, so they are recorded `lost`; returns their ids.
    async fn delete_worker(
        &self,
        worker_id: &str,
        name: &str,
        now_ms: u64,
    ) -> Result<Vec<String>, StoreError>;

    /// The ids of removed workers.
    async fn removed_worker_ids(&self) -> Result<Vec<String>, StoreError>;

    /// Records a worker's state. With `registration` (its
    /// `registered_at_ms`), only while the record is still of that
    /// registration and the worker has not left: a judgement of liveness
    /// (`down`, `ready` again) made before a deregistration or a new
    /// registration whose write landed first must not overwrite it.
    async fn set_worker_state(
        &self,
        worker_id: &str,
        state: WorkerState,
        last_seen_ms: u64,
        registration: Option<u64>,
    ) -> Result<(), StoreError>;

    /// Sets only the drain flag, leaving the state the liveness check owns.
    async fn set_worker_draining(&self, worker_id: &str, draining: bool) -> Result<(), StoreError>;

    async fn workers(&self) -> Result<Vec<WorkerRow>, StoreError>;

    /// Records a job, and binds `key` to it in the same transaction: if
    /// the key is taken, nothing is written ([`StoreError::KeyTaken`]).
    async fn insert_job(&self, j: JobRow, key: Option<NewKey>) -> Result<(), StoreError>;

    /// Records a job as [`Store::insert_job`] does, unless a job queued
    /// ahead of it holds it back ([`Ahead`]), checked in the same
    /// transaction: one trip to the store for a start. On SQLite (one
    /// writer) nothing can be queued between the check and the record; on
    /// PostgreSQL another scheduler's enqueue may commit in between, as
    /// with a separate check, and the dispatcher then serves the queue in
    /// its order. Returns whether the job was recorded.
    async fn insert_job_unless_ahead(
        &self,
        j: JobRow,
        key: Option<NewKey>,
        ahead: Ahead,
    ) -> Result<bool, StoreError>;

    /// Records a job's latest status, as its worker reported it, as of
    /// `j.updated_at_ms` (so that the caller's row is the record written).
    /// A terminal state never changes: returns false if the record kept
    /// its own.
    async fn update_job(&self, j: JobRow) -> Result<bool, StoreError>;

    /// [`Store::update_job`] (as of `j.updated_at_ms` too) for the answer
    /// to a start, returning without
    /// waiting for the sync: the job's record, written and synced before
    /// its worker was asked, is the durable promise. Lost to a power loss,
    /// this update leaves that record awaiting its start's outcome, which
    /// the worker's reports settle as they settle any start in doubt. It
    /// changes only a record that heard nothing since it was written
    /// (`unknown`, never started): the answer may land after a report of
    /// the job or a mark of its worker, which are newer.
    async fn update_started(&self, j: JobRow) -> Result<bool, StoreError>;

    /// Gives a job the id its worker chose (a worker of the original
    /// contract names its jobs itself): the record, its queue entry and its
    /// idempotency key move to `new_id` in one transaction. False, changing
    /// nothing, when `new_id` already names another job.
    async fn rekey_job(&self, job_id: &str, new_id: &str) -> Result<bool, StoreError>;

    /// Forgets a job whose start certainly started nothing (the worker
    /// refused it), if it is still waiting for that outcome, and the
    /// idempotency key bound to it: a retry with that key tries again.
    async fn delete_unstarted_job(&self, job_id: &str) -> Result<(), StoreError>;

    /// Ends a job whose start its worker refused for the job's own sake
    /// `failed`, with `why`, and drops its queue entry; a job that started
    /// or ended meanwhile is left alone.
    async fn fail_unstarted(&self, job_id: &str, why: &str) -> Result<(), StoreError>;

    /// Applies a worker's reports about its jobs in one transaction: the
    /// worker is the authority on its running jobs, but a terminal state
    /// the scheduler recorded wins over any report that disagrees. Jobs the
    /// scheduler never recorded are added. With `complete` (a registration,
    /// which reports every running job and every final state not yet
    /// acknowledged), this worker's jobs that are running or unknown, were
    /// created before `settled_before_ms` (so no start is still in flight)
    /// and were not reported are recorded `lost`.
    ///
    /// Returns the jobs the worker reported running that the scheduler has
    /// already recorded as ended: the worker must kill what is left of them.
    async fn apply_reports(
        &self,
        worker_id: &str,
        reports: Vec<JobRow>,
        complete: bool,
        settled_before_ms: u64,
    ) -> Result<Vec<String>, StoreError>;

    /// Records the running jobs of a worker that cannot be asked now as
    /// `unknown` (with `why`, which says since when); returns their ids.
    async fn mark_unknown(&self, worker_id: &str, why: &str) -> Result<Vec<String>, StoreError>;

    /// Gives up on a worker's running and unknown jobs: they become `lost`
    /// with `why`; returns their ids. Only while the stored worker is not
    /// `ready`: a registration that came in meanwhile wins.
    async fn mark_lost(&self, worker_id: &str, why: &str) -> Result<Vec<String>, StoreError>;

    /// Gives up on one job on `worker_id` (that worker answered that it
    /// does not know it). A job since put on another worker (handed back
    /// and taken again from the queue) is left alone: the answer was about
    /// a start that never reached the worker asked.
    async fn mark_job_lost(
        &self,
        job_id: &str,
        worker_id: &str,
        why: &str,
    ) -> Result<(), StoreError>;

    /// A worker's `unknown` jobs created before `before_ms`, at most `limit`.
    async fn unknown_jobs(
        &self,
        worker_id: &str,
        before_ms: u64,
        limit: u32,
    ) -> Result<Vec<JobRow>, StoreError>;

    /// The workers that have jobs in state `unknown` (one indexed query,
    /// instead of one per worker: the settling pass runs every second).
    async fn workers_with_unknown_jobs(
        &self,
    ) -> Result<std::collections::HashSet<String>, StoreError>;

    /// Records a group, and binds `key` to it in the same transaction: if
    /// the key is taken, nothing is written ([`StoreError::KeyTaken`]).
    async fn insert_group(&self, g: GroupRow, key: Option<NewKey>) -> Result<(), StoreError>;

    /// Unbinds `key` from a group none of whose jobs started (the group's
    /// record stays), so a retry with the key tries again.
    async fn unbind_group_key(&self, key: &str, group_id: &str) -> Result<(), StoreError>;

    /// The binding of `key`, unless it was created before `expired_before_ms`.
    async fn idempotency_key(
        &self,
        key: &str,
        expired_before_ms: u64,
    ) -> Result<Option<KeyRow>, StoreError>;

    /// Deletes at most `limit` keys created before `expired_before_ms`;
    /// returns how many. Small batches keep the writer free for starts.
    async fn prune_idempotency_keys(
        &self,
        expired_before_ms: u64,
        limit: u32,
    ) -> Result<usize, StoreError>;

    /// A group and its jobs (in worker order of the fan-out), the jobs
    /// without their `args` (they are the group's).
    async fn group(&self, group_id: &str) -> Result<Option<(GroupRow, Vec<JobRow>)>, StoreError>;

    /// Records the workers a group's job could not be started on (it then
    /// never reads `succeeded`, and `logs -f` of it exits non-zero).
    async fn record_group_failures(
        &self,
        group_id: &str,
        failed: Vec<GroupFailure>,
    ) -> Result<(), StoreError>;

    /// Groups newest first, at most `limit`, without their `args`.
    async fn groups(&self, limit: u32) -> Result<Vec<GroupRow>, StoreError>;

    /// Forgets up to `batch` jobs that ended before `before_ms`, and groups
    /// created before then that have no jobs left. One short transaction
    /// per call, so other writers wait little; returns how many jobs went.
    async fn prune_finished(&self, before_ms: u64, batch: u32) -> Result<usize, StoreError>;

    /// Flushes the write-ahead log into the database file; call at shutdown.
    async fn close(&self) -> Result<(), StoreError>;

    /// A real write and its read-back, for readiness: the database file
    /// takes a synced write (not full, not read-only, not locked for long).
    async fn probe(&self) -> Result<(), StoreError>;

    async fn job(&self, job_id: &str) -> Result<Option<JobRow>, StoreError>;

    /// Jobs newest first, without their `args` (a page of them would hold
    /// up to 256 KiB per job in memory), and the cursor of the page after,
    /// if any.
    async fn jobs(&self, q: JobQuery) -> Result<(Vec<JobRow>, Option<i64>), StoreError>;

    /// Records a queued job with what starting it later needs (and binds
    /// `key` to it), unless `max_queued` jobs wait already: then nothing is
    /// written and the answer is `None`. Otherwise its position.
    async fn enqueue_job(
        &self,
        j: JobRow,
        q: QueueEntry,
        key: Option<NewKey>,
        max_queued: u64,
    ) -> Result<Option<u64>, StoreError>;

    /// The first `limit` queued jobs of `priority` or higher, in queue
    /// order, that a new job of `priority` might compete with: those named
    /// to `worker_id` (when given) and the placed ones. Which of them
    /// really compete (could run where the new job would) is the caller's
    /// to judge. Without their `args` and `env`, as [`Store::queued`].
    /// It may show commits not yet durable: the caller only
    /// decides by it which record of the new job to write, and that
    /// write's sync covers whatever this read saw.
    async fn waiting_ahead(
        &self,
        priority: i32,
        worker_id: &str,
        limit: u32,
    ) -> Result<Vec<(JobRow, QueueEntry)>, StoreError>;

    /// Whether the job has a queue entry (waiting, or being dispatched).
    async fn in_queue(&self, job_id: &str) -> Result<bool, StoreError>;

    /// A queued job's entry and position (how many queued jobs go first).
    async fn queue_entry(&self, job_id: &str) -> Result<Option<(QueueEntry, u64)>, StoreError>;

    /// Queued jobs in queue order (priority, then arrival), skipping the
    /// first `skip`, at most `limit`; without their `args` and `env`
    /// (read as empty: see `rows::QUEUED_JOB_HEAD_COLUMNS`).
    async fn queued(
        &self,
        skip: u64,
        limit: u32,
        worker_id: Option<String>,
    ) -> Result<Vec<(JobRow, QueueEntry)>, StoreError>;

    /// Jobs taken from the queue whose start has not been settled (a start
    /// in flight, or one cut off by a scheduler restart).
    async fn dispatching(&self) -> Result<Vec<(JobRow, QueueEntry)>, StoreError>;

    /// Takes a queued job for `worker_id`: the one step that makes dispatch
    /// exactly once. Only a job still `queued` is taken (a stop or a
    /// timeout may have ended it); it becomes `unknown` on that worker, as
    /// any job whose start is in flight, and its record is returned with
    /// its env (which the reads of the queue leave out).
    async fn claim_queued(
        &self,
        job_id: &str,
        worker_id: &str,
        why: &str,
    ) -> Result<Option<(JobRow, Env)>, StoreError>;

    /// Puts a job whose start certainly started nothing back in the queue,
    /// in the place it had; returns false if it was settled otherwise.
    async fn requeue(&self, job_id: &str, reason: &str) -> Result<bool, StoreError>;

    /// Forgets a job's queue entry (and with it the request's environment)
    /// once its start is settled or in doubt: it is never dispatched again.
    async fn dequeue(&self, job_id: &str) -> Result<(), StoreError>;

    /// Records why a queued job still waits.
    async fn set_queue_reason(&self, job_id: &str, reason: &str) -> Result<(), StoreError>;

    /// Ends a job that is still queued `stopped`, without it ever starting;
    /// false if it is not queued (any more).
    async fn stop_queued(&self, job_id: &str) -> Result<bool, StoreError>;

    /// Fails the queued jobs whose queue timeout passed by `now`; returns
    /// their ids.
    async fn expire_queued(&self, now: u64) -> Result<Vec<String>, StoreError>;

    /// Jobs waiting in the queue (not those being dispatched).
    async fn queue_length(&self) -> Result<u64, StoreError>;

    /// True when no job waits in the queue or is being dispatched: a
    /// dispatcher pass then has nothing to do.
    async fn queue_is_empty(&self) -> Result<bool, StoreError>;

    /// Number of jobs recorded as running (or unknown, which may be running), per worker id.
    async fn running_counts(&self) -> Result<std::collections::HashMap<String, u64>, StoreError>;
}

/// The store every part of the scheduler shares.
pub type SharedStore = Arc<dyn Store>;

/// The queued jobs a new job may have to wait behind, of `priority` or
/// higher and not being dispatched: any job named to `worker_id` (when
/// given) holds it back, however far back it waits (a separate, indexed
/// check: placed jobs before it do not hide it); of the placed jobs, the
/// first `limit` in queue order are read and `holds` says whether one of
/// them holds the new job back.
pub struct Ahead {
    pub priority: i32,
    pub worker_id: String,
    pub limit: u32,
    pub holds: Holds,
}

/// Whether a queued job (its record and queue entry) holds a new one back.
pub type Holds = Box<dyn Fn(&JobRow, &QueueEntry) -> bool + Send + Sync>;

impl std::fmt::Debug for Ahead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ahead")
            .field("priority", &self.priority)
            .field("worker_id", &self.worker_id)
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

/// Whether a worker's report about a job it runs, which did not update the
/// job's record, means the worker must kill what is left of it; `recorded`
/// is the job's stored state and owner, if any.
fn must_kill(worker_id: &str, row: &JobRow, recorded: Option<(JobState, String)>) -> bool {
    match recorded {
        // Every job is recorded before it starts: one the scheduler has no
        // record of was pruned (or its database replaced), and nobody
        // could stop it.
        None if row.state == JobState::Running => {
            tracing::warn!(job_id = %row.job_id, %worker_id, "a worker runs a job the scheduler has no record of; telling it to kill it");
            true
        }
        None => false,
        // A final state wins over any report. A job ended here that the
        // worker still runs (lost while it was cut off, or its worker
        // removed and back under a new id) is killed.
        Some((state, owner)) if state.is_terminal() && state != row.state => {
            tracing::warn!(job_id = %row.job_id, %worker_id, %owner, recorded = %state, reported = %row.state, "a report disagrees with the job's final state; the final state stays");
            row.state == JobState::Running
        }
        Some(_) => false,
    }
}

/// Why a queued job failed when its queue timeout passed.
fn queue_timeout_text(queued_at_ms: u64, deadline_ms: u64) -> String {
    let waited = std::time::Duration::from_millis(deadline_ms.saturating_sub(queued_at_ms));
    format!(
        "still queued after its queue_timeout of {}; it never started",
        humantime::format_duration(waited)
    )
}

pub(crate) fn to_json<T: serde::Serialize>(value: &T) -> String {
    // Vec<String> and BTreeMap<String, String> always serialize.
    serde_json::to_string(value).unwrap_or_default()
}

pub(crate) fn from_json<T: serde::de::DeserializeOwned + Default>(text: &str) -> T {
    serde_json::from_str(text).unwrap_or_default()
}
