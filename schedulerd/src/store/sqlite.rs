//! The store in embedded SQLite: one scheduler, one file.
//!
//! Concurrent writes share one sync of the write-ahead log
//! ([`crate::group_sync`]). SQLite calls block, so they run on the blocking
//! pool: one writer connection (SQLite serializes writers anyway) and a few
//! reader connections, each held only for one statement, never across a
//! network call.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};

use super::rows::{
    GROUP_COLUMNS, GROUP_COLUMNS_WITHOUT_ARGS, JOB_COLUMNS, JOB_COLUMNS_WITHOUT_ARGS, KEY_COLUMNS,
    QUEUE_COLUMNS, QUEUED_JOB_COLUMNS, QUEUED_JOB_HEAD_COLUMNS, WORKER_COLUMNS, group_row, job_row,
    key_row, queue_row, queued_job_row, worker_row,
};
use super::{
    Ahead, GroupRow, JobQuery, JobRow, KeyRow, NewKey, QueueEntry, Store, StoreError, WorkerRow,
    to_json,
};
use crate::group_sync::GroupSync;
use crate::state::{JobState, WorkerState};
use crate::time::now_ms;

const READERS: usize = 4;

#[derive(Debug, Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    writer: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
    path: PathBuf,
    sync: Arc<GroupSync>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.sync.close();
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS workers (
    worker_id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    address TEXT NOT NULL,
    state TEXT NOT NULL,
    plugins TEXT NOT NULL,
    labels TEXT NOT NULL,
    registered_at_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL,
    cgroup_limits INTEGER NOT NULL DEFAULT 0,
    extensions TEXT NOT NULL DEFAULT '{}',
    draining INTEGER NOT NULL DEFAULT 0,
    max_jobs INTEGER NOT NULL DEFAULT 0,
    seed INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL UNIQUE,
    worker_id TEXT NOT NULL,
    command TEXT NOT NULL,
    path TEXT NOT NULL,
    args TEXT NOT NULL,
    state TEXT NOT NULL,
    error_text TEXT NOT NULL,
    exit_code INTEGER,
    signal INTEGER,
    created_at_ms INTEGER NOT NULL,
    started_at_ms INTEGER NOT NULL,
    finished_at_ms INTEGER NOT NULL,
    output_bytes INTEGER NOT NULL,
    group_id TEXT,
    updated_at_ms INTEGER NOT NULL DEFAULT 0
);
-- Workers an operator removed: a worker that comes back under a removed
-- id is given a new one, so nothing it reports lands on the old records.
CREATE TABLE IF NOT EXISTS removed_workers (
    worker_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    removed_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS groups (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    group_id TEXT NOT NULL UNIQUE,
    command TEXT NOT NULL,
    path TEXT NOT NULL,
    args TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL
);
-- Jobs waiting for a slot, and jobs being dispatched (their record is no
-- longer `queued`; the row keeps what a start needs until the worker's
-- answer settles it). Only these rows are ever scanned by the dispatcher.
-- A row with dispatching = 0 is exactly a job recorded `queued` (every
-- change of one changes the other in the same transaction), so queue
-- order is read from the queue's own index, never by sorting jobs.
CREATE TABLE IF NOT EXISTS queue (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL UNIQUE REFERENCES jobs (job_id) ON DELETE CASCADE,
    priority INTEGER NOT NULL,
    queued_at_ms INTEGER NOT NULL,
    worker_id TEXT NOT NULL,
    selector TEXT NOT NULL,
    env TEXT NOT NULL,
    deadline_ms INTEGER NOT NULL,
    reason TEXT NOT NULL,
    -- Taken by the dispatcher, its start not settled: kept apart so that
    -- finding these never reads the waiting jobs.
    dispatching INTEGER NOT NULL DEFAULT 0
);
-- Whoever deletes a job or group (a start refused, pruning) drops its key
-- with it: a key never names a record that is gone.
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key TEXT PRIMARY KEY,
    route TEXT NOT NULL,
    body_sha256 TEXT NOT NULL,
    job_id TEXT REFERENCES jobs (job_id) ON DELETE CASCADE,
    group_id TEXT REFERENCES groups (group_id) ON DELETE CASCADE,
    created_at_ms INTEGER NOT NULL
);
";

/// Columns added since the first schema, for databases made before them:
/// (table, column, declaration).
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("workers", "cgroup_limits", "INTEGER NOT NULL DEFAULT 0"),
    ("workers", "extensions", "TEXT NOT NULL DEFAULT '{}'"),
    ("workers", "draining", "INTEGER NOT NULL DEFAULT 0"),
    ("workers", "max_jobs", "INTEGER NOT NULL DEFAULT 0"),
    ("workers", "seed", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "group_id", "TEXT"),
    ("jobs", "updated_at_ms", "INTEGER NOT NULL DEFAULT 0"),
    ("queue", "dispatching", "INTEGER NOT NULL DEFAULT 0"),
    ("groups", "failed", "TEXT NOT NULL DEFAULT '[]'"),
];

const INDEXES: &str = "
CREATE INDEX IF NOT EXISTS jobs_by_worker ON jobs (worker_id, seq);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, seq);
CREATE INDEX IF NOT EXISTS jobs_by_group ON jobs (group_id, seq);
CREATE INDEX IF NOT EXISTS jobs_by_worker_state ON jobs (worker_id, state);
CREATE INDEX IF NOT EXISTS jobs_by_state_finished ON jobs (state, finished_at_ms);
DROP INDEX IF EXISTS queue_order;
CREATE INDEX IF NOT EXISTS queue_waiting ON queue (priority DESC, seq, worker_id) WHERE dispatching = 0;
CREATE INDEX IF NOT EXISTS queue_dispatching ON queue (seq) WHERE dispatching = 1;
CREATE INDEX IF NOT EXISTS queue_by_deadline ON queue (deadline_ms) WHERE deadline_ms > 0;
CREATE INDEX IF NOT EXISTS queue_named ON queue (worker_id, priority) WHERE dispatching = 0 AND worker_id != '';
CREATE INDEX IF NOT EXISTS idempotency_keys_by_age ON idempotency_keys (created_at_ms);
CREATE INDEX IF NOT EXISTS idempotency_keys_by_job ON idempotency_keys (job_id);
CREATE INDEX IF NOT EXISTS idempotency_keys_by_group ON idempotency_keys (group_id);
";

/// The schema version this scheduler writes, kept in SQLite's
/// `user_version`. Databases from before versions were recorded say 0 and
/// are brought up by the idempotent steps below; a later change to the
/// schema adds a step that runs when the version is lower, and raises this.
/// 2: the index `queue_named`; 3: `groups.failed`.
const SCHEMA_VERSION: i64 = 3;

/// Brings a database of any earlier version up to this schema, or refuses
/// one a newer scheduler made.
fn migrate(c: &Connection) -> Result<(), StoreError> {
    let found: i64 = c.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            found,
            known: SCHEMA_VERSION,
        });
    }
    if found == SCHEMA_VERSION {
        return Ok(());
    }
    c.execute_batch(SCHEMA)?;
    for (table, column, declaration) in ADDED_COLUMNS {
        let present: bool = c
            .prepare(&format!(
                "SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"
            ))?
            .exists([column])?;
        if !present {
            c.execute_batch(&format!(
                "ALTER TABLE {table} ADD COLUMN {column} {declaration}"
            ))?;
        }
    }
    c.execute_batch(INDEXES)?;
    c.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    Ok(())
}

/// Makes the database file, and its journals if present, readable and
/// writable by this user only: they hold every job's arguments, which may
/// carry secrets. The file is created here, before SQLite opens it,
/// because SQLite creates files by the umask (often 0644) and gives its
/// `-wal` and `-shm` files the database file's mode.
fn owner_only(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        match std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Statements run through SQLite's statement cache: parsing and planning
/// a statement cost more than running most of them (a third of a start's
/// store time when every call prepared its statement afresh).
trait Cached {
    fn exec(&self, sql: &str, params: impl rusqlite::Params) -> rusqlite::Result<usize>;
    fn row<T>(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
        f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T>;
}

impl Cached for Connection {
    fn exec(&self, sql: &str, params: impl rusqlite::Params) -> rusqlite::Result<usize> {
        self.prepare_cached(sql)?.execute(params)
    }

    fn row<T>(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
        f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        self.prepare_cached(sql)?.query_row(params, f)
    }
}

/// Distinct statements the store runs, with room to spare: past it the
/// cache evicts and statements are parsed again.
const STATEMENT_CACHE: usize = 128;

/// When a commit must be durable: before its call returns, or once a
/// later write or read has had the log synced (the instant is the
/// operation's start, for its duration metric).
#[derive(Debug, Clone, Copy)]
enum Durable {
    Now,
    Later(std::time::Instant),
}

fn connect(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    // Plans that never depend on bound values: otherwise SQLite prepares a
    // cached statement again on every new binding of a parameter that it
    // compared against a partial index (the queue's), undoing the cache.
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // Commits write the log without syncing it; the group sync makes them
    // durable before a write returns (see `crate::group_sync`).
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.to_owned(),
            source,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        owner_only(path).map_err(|e| {
            StoreError::Io(std::io::Error::new(
                e.kind(),
                format!("{}: {e}", path.display()),
            ))
        })?;
        let writer = connect(path).map_err(open_err)?;
        migrate(&writer).map_err(|e| match e {
            StoreError::Sql(source) => open_err(source),
            other => other,
        })?;
        // The log's directory entry is ours to sync: SQLite's syncs (which
        // the group sync replaces) would not cover it either.
        if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::File::open(dir)?.sync_all()?;
        }
        let readers = (0..READERS)
            .map(|_| connect(path))
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(open_err)?;
        // The log exists from the migration on, and SQLite keeps it while
        // its connections are open; it is synced through this descriptor.
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        // Synced before anything is answered: it may hold commits no sync
        // covered (the migration's, a crashed predecessor's), and a commit
        // that writes nothing counts as durable once those before it are.
        let wal = std::fs::File::open(&wal)
            .and_then(|file| file.sync_data().map(|()| file))
            .map_err(|e| {
                StoreError::Io(std::io::Error::new(
                    e.kind(),
                    format!("{}: {e}", std::path::Path::new(&wal).display()),
                ))
            })?;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                writer: Mutex::new(writer),
                readers: Mutex::new(readers),
                path: path.to_owned(),
                sync: GroupSync::start(wal)?,
            }),
        })
    }

    /// Runs `f` on the writer connection and returns once what it
    /// committed is durable.
    async fn write<T: Send + 'static, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let started = std::time::Instant::now();
        let (result, seq, synced) = self.commit(f, Durable::Now).await?;
        // Another sync was under way: the sync thread runs the next one.
        let synced = match synced {
            Ok(false) => self.inner.sync.durable(seq).await,
            other => other.map(drop),
        };
        crate::metrics::store_operation::<F>(started);
        let value = result?;
        synced?;
        Ok(value)
    }

    /// Runs `f` on the writer connection; what it commits survives a crash
    /// of this process, and a power loss once the log is synced past it:
    /// by this thread when no sync is under way ([`Durable::Now`], so the
    /// write costs one trip to the blocking pool), or by the sync a later
    /// write or read waits for ([`Durable::Later`], which records the
    /// operation's duration as the commit's from the instant given). Returns `f`'s
    /// result, the commit's number and whether it was synced here.
    async fn commit<T: Send + 'static, F>(
        &self,
        f: F,
        durable: Durable,
    ) -> Result<(Result<T, StoreError>, u64, std::io::Result<bool>), StoreError>
    where
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        let sync_now = matches!(durable, Durable::Now);
        let done = tokio::task::spawn_blocking(move || {
            let (result, seq) = {
                let mut conn = inner.writer.lock().unwrap_or_else(|e| e.into_inner());
                let seq = inner.sync.begin()?;
                // Counts every row an INSERT, UPDATE or DELETE touched, even
                // one rolled back after: unchanged, the commit wrote nothing.
                // A write that changes the database otherwise (DDL alone, a
                // PRAGMA, an `INSERT OR IGNORE` that moves a sequence) would
                // not be counted: only `close`'s checkpoint does today, and
                // a checkpoint syncs what it writes itself; any other must
                // also touch a row, or sync itself.
                let changes = conn.total_changes();
                let result = f(&mut conn).map_err(StoreError::from);
                if conn.total_changes() == changes {
                    inner.sync.ended_unwritten(seq);
                } else {
                    inner.sync.ended(seq);
                }
                crate::metrics::store_write_done(result.is_ok());
                (result, seq)
            };
            // The writer is free again while this thread syncs, so the
            // next commits can ride on the sync after this one.
            let synced = match sync_now {
                true => inner.sync.try_sync_through(seq),
                false => Ok(true),
            };
            Ok::<_, StoreError>((result, seq, synced))
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))??;
        if let Durable::Later(started) = durable {
            crate::metrics::store_operation::<F>(started);
        }
        Ok(done)
    }

    async fn read<T: Send + 'static, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        self.read_then(f, true).await
    }

    /// A read whose result only decides a write of the caller's that
    /// follows: that write's sync covers whatever this read saw, so it
    /// need not wait for one of its own (on a start's path, that wait was
    /// the sync of the previous start's outcome).
    async fn read_unsynced<T: Send + 'static, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        self.read_then(f, false).await
    }

    async fn read_then<T: Send + 'static, F>(&self, f: F, synced: bool) -> Result<T, StoreError>
    where
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        let started = std::time::Instant::now();
        let result = tokio::task::spawn_blocking(move || {
            let pooled = inner
                .readers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop();
            let conn = match pooled {
                Some(conn) => conn,
                None => connect(&inner.path)?,
            };
            let result = f(&conn);
            // Whatever the read saw was begun by now.
            let seen = inner.sync.begun();
            inner
                .readers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(conn);
            result.map(|value| (value, seen)).map_err(StoreError::from)
        })
        .await;
        let result = result.map_err(|e| StoreError::Task(e.to_string()))?;
        // A commit is visible before it is synced: what this read may show
        // is answered only once it cannot be undone.
        let value = match result {
            Ok((value, seen)) => {
                if synced {
                    self.inner.sync.durable(seen).await?;
                }
                Ok(value)
            }
            Err(error) => Err(error),
        };
        crate::metrics::store_operation::<F>(started);
        value
    }
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    /// One scheduler per file: it always leads.
    fn shared(&self) -> bool {
        false
    }

    async fn lead(
        &self,
        _holder: &str,
        _ttl: std::time::Duration,
    ) -> Result<Option<i64>, StoreError> {
        Ok(Some(1))
    }

    async fn resign(&self, _holder: &str) -> Result<(), StoreError> {
        Ok(())
    }

    fn fenced(&self, _holder: &str, _term: i64) -> super::SharedStore {
        Arc::new(self.clone())
    }

    async fn touch_workers(&self, ids: Vec<String>, now_ms: u64) -> Result<(), StoreError> {
        self.write(move |c| {
            let tx = c.transaction()?;
            for id in &ids {
                tx.exec(
                    "UPDATE workers SET last_seen_ms = MAX(last_seen_ms, ?2) WHERE worker_id = ?1",
                    params![id, now_ms as i64],
                )?;
            }
            tx.commit()
        })
        .await
    }

    async fn upsert_worker(&self, w: WorkerRow) -> Result<(), StoreError> {
        self.write(move |c| {
            let tx = c.transaction()?;
            // The registry gave this name to this id; a row left under
            // another id (a removed worker whose deletion is still on its
            // way) must not block it.
            tx.exec(
                "DELETE FROM workers WHERE name = ?1 AND worker_id <> ?2",
                params![w.name, w.worker_id],
            )?;
            tx.exec(
                "INSERT INTO workers (worker_id, name, address, state, plugins, labels, registered_at_ms,
                   last_seen_ms, cgroup_limits, extensions, draining, max_jobs, seed)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
                 ON CONFLICT(worker_id) DO UPDATE SET name = ?2, address = ?3, state = ?4,
                   plugins = ?5, labels = ?6, registered_at_ms = ?7, last_seen_ms = ?8,
                   cgroup_limits = ?9, extensions = ?10, max_jobs = ?12,
                   seed = ?13",
                params![
                    w.worker_id,
                    w.name,
                    w.address,
                    w.state,
                    to_json(&w.plugins),
                    to_json(&w.labels),
                    w.registered_at_ms as i64,
                    w.last_seen_ms as i64,
                    w.cgroup_limits,
                    to_json(&w.extensions),
                    w.draining,
                    w.max_jobs,
                    w.seed
                ],
            )?;
            tx.commit()
        })
        .await
    }

    async fn delete_worker(
        &self,
        worker_id: &str,
        name: &str,
        now_ms: u64,
    ) -> Result<Vec<String>, StoreError> {
        let (id, name) = (worker_id.to_owned(), name.to_owned());
        self.write(move |c| {
            let tx = c.transaction()?;
            tx.exec("DELETE FROM workers WHERE worker_id = ?1", [&id])?;
            tx.exec(
                "INSERT OR REPLACE INTO removed_workers (worker_id, name, removed_at_ms)
                 VALUES (?1, ?2, ?3)",
                params![id, name, now_ms as i64],
            )?;
            let lost = tx
                .prepare_cached(
                    "UPDATE jobs SET state = 'lost', error_text = 'its worker was removed from the cluster',
                       finished_at_ms = ?2, updated_at_ms = ?2
                     WHERE worker_id = ?1 AND state IN ('running', 'unknown') RETURNING job_id, command",
                )?
                .query_map(params![id, now_ms as i64], |r| {
                    lost_metric(&id, r.get(1).ok());
                    r.get(0)
                })?
                .collect::<rusqlite::Result<Vec<String>>>()?;
            // Jobs queued for this worker could never start: its id is gone.
            tx.exec(
                "UPDATE jobs SET state = 'failed',
                   error_text = 'the worker it was queued for was removed from the cluster; it never started',
                   finished_at_ms = ?2, updated_at_ms = ?2
                 WHERE state = 'queued' AND job_id IN (SELECT job_id FROM queue WHERE worker_id = ?1)",
                params![id, now_ms as i64],
            )?;
            tx.exec(
                "DELETE FROM queue WHERE worker_id = ?1
                   AND job_id IN (SELECT job_id FROM jobs WHERE state = 'failed')",
                [&id],
            )?;
            tx.commit()?;
            Ok(lost)
        })
        .await
    }

    async fn removed_worker_ids(&self) -> Result<Vec<String>, StoreError> {
        self.read(|c| {
            c.prepare_cached("SELECT worker_id FROM removed_workers")?
                .query_map([], |r| r.get(0))?
                .collect()
        })
        .await
    }

    async fn set_worker_state(
        &self,
        worker_id: &str,
        state: WorkerState,
        last_seen_ms: u64,
        registration: Option<u64>,
    ) -> Result<(), StoreError> {
        let id = worker_id.to_owned();
        let registration = registration.map(|ms| ms as i64);
        self.write(move |c| {
            c.exec(
                "UPDATE workers SET state = ?2, last_seen_ms = ?3 WHERE worker_id = ?1
                   AND (?4 IS NULL OR (registered_at_ms = ?4 AND state <> 'left'))",
                params![id, state, last_seen_ms as i64, registration],
            )?;
            Ok(())
        })
        .await
    }

    async fn set_worker_draining(&self, worker_id: &str, draining: bool) -> Result<(), StoreError> {
        let id = worker_id.to_owned();
        self.write(move |c| {
            c.exec(
                "UPDATE workers SET draining = ?2 WHERE worker_id = ?1",
                params![id, draining],
            )?;
            Ok(())
        })
        .await
    }

    async fn workers(&self) -> Result<Vec<WorkerRow>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {WORKER_COLUMNS} FROM workers ORDER BY name"
            ))?;
            let rows = stmt.query_map([], |r| worker_row(r))?;
            rows.collect()
        })
        .await
    }

    async fn insert_job(&self, j: JobRow, key: Option<NewKey>) -> Result<(), StoreError> {
        self.write(move |c| record_job(c, &j, key.as_ref(), None))
            .await?
            .recorded()
            .map(drop)
    }

    async fn insert_job_unless_ahead(
        &self,
        j: JobRow,
        key: Option<NewKey>,
        ahead: Ahead,
    ) -> Result<bool, StoreError> {
        self.write(move |c| record_job(c, &j, key.as_ref(), Some(&ahead)))
            .await?
            .recorded()
    }

    async fn update_job(&self, j: JobRow) -> Result<bool, StoreError> {
        self.write(move |c| update_job(c, &j, false, j.updated_at_ms).map(|n| n > 0))
            .await
    }

    async fn update_started(&self, j: JobRow) -> Result<bool, StoreError> {
        let started = std::time::Instant::now();
        let (result, _, _) = self
            .commit(
                move |c| update_job(c, &j, true, j.updated_at_ms).map(|n| n > 0),
                Durable::Later(started),
            )
            .await?;
        result
    }

    async fn rekey_job(&self, job_id: &str, new_id: &str) -> Result<bool, StoreError> {
        let (old, new) = (job_id.to_owned(), new_id.to_owned());
        self.write(move |c| {
            let tx = c.transaction()?;
            let taken = tx
                .prepare_cached("SELECT 1 FROM jobs WHERE job_id = ?1")?
                .exists([&new])?;
            if taken {
                return Ok(false);
            }
            // The queue and key rows reference the job's id without ON
            // UPDATE CASCADE: checking is deferred to the commit, by which
            // time all three point at the new id.
            tx.pragma_update(None, "defer_foreign_keys", "ON")?;
            let moved = tx.exec(
                "UPDATE jobs SET job_id = ?2 WHERE job_id = ?1",
                params![old, new],
            )?;
            tx.exec(
                "UPDATE queue SET job_id = ?2 WHERE job_id = ?1",
                params![old, new],
            )?;
            tx.exec(
                "UPDATE idempotency_keys SET job_id = ?2 WHERE job_id = ?1",
                params![old, new],
            )?;
            tx.commit()?;
            Ok(moved == 1)
        })
        .await
    }

    async fn delete_unstarted_job(&self, job_id: &str) -> Result<(), StoreError> {
        let id = job_id.to_owned();
        self.write(move |c| {
            let tx = c.transaction()?;
            let deleted = tx.exec(
                "DELETE FROM jobs WHERE job_id = ?1 AND state = 'unknown' AND started_at_ms = 0",
                [&id],
            )?;
            // Explicit, not left to the foreign key, so the key goes even
            // on a connection without foreign key enforcement.
            if deleted > 0 {
                tx.exec("DELETE FROM idempotency_keys WHERE job_id = ?1", [&id])?;
            }
            tx.commit()
        })
        .await
    }

    async fn fail_unstarted(&self, job_id: &str, why: &str) -> Result<(), StoreError> {
        let (id, why) = (job_id.to_owned(), why.to_owned());
        self.write(move |c| {
            let tx = c.transaction()?;
            let now = now_ms() as i64;
            tx.exec(
                "UPDATE jobs SET state = 'failed', error_text = ?2, finished_at_ms = ?3,
                   updated_at_ms = ?3
                 WHERE job_id = ?1 AND state = 'unknown' AND started_at_ms = 0",
                params![id, why, now],
            )?;
            tx.exec("DELETE FROM queue WHERE job_id = ?1", [&id])?;
            tx.commit()
        })
        .await
    }

    async fn apply_reports(
        &self,
        worker_id: &str,
        reports: Vec<JobRow>,
        complete: bool,
        settled_before_ms: u64,
    ) -> Result<Vec<String>, StoreError> {
        let worker_id = worker_id.to_owned();
        self.write(move |c| {
            let tx = c.transaction()?;
            let mut kill = Vec::new();
            for row in &reports {
                if update_job(&tx, row, false, now_ms())? > 0 {
                    continue;
                }
                let recorded: Option<(JobState, String)> = tx
                    .query_row(
                        "SELECT state, worker_id FROM jobs WHERE job_id = ?1",
                        [&row.job_id],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                if super::must_kill(&worker_id, row, recorded) {
                    kill.push(row.job_id.clone());
                }
            }
            if complete {
                let reported: std::collections::HashSet<&str> =
                    reports.iter().map(|r| r.job_id.as_str()).collect();
                let open: Vec<String> = tx
                    .prepare_cached(
                        "SELECT job_id FROM jobs WHERE worker_id = ?1
                           AND state IN ('running', 'unknown') AND created_at_ms < ?2
                           AND job_id NOT IN (SELECT job_id FROM queue)",
                    )?
                    .query_map(params![worker_id, settled_before_ms as i64], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?;
                let now = now_ms() as i64;
                for job_id in open.iter().filter(|id| !reported.contains(id.as_str())) {
                    let command: Option<String> = tx.row(
                        "UPDATE jobs SET state = 'lost', error_text = ?2, finished_at_ms = ?3, updated_at_ms = ?3
                         WHERE job_id = ?1 AND state IN ('running', 'unknown') RETURNING command",
                        params![job_id, "its worker came back without the job", now],
                        |r| r.get(0),
                    ).optional()?;
                    lost_metric(&worker_id, command);
                    tracing::warn!(%job_id, %worker_id, "job lost: its worker came back without it");
                }
            }
            tx.commit()?;
            Ok(kill)
        })
        .await
    }

    async fn mark_unknown(&self, worker_id: &str, why: &str) -> Result<Vec<String>, StoreError> {
        let (worker_id, why) = (worker_id.to_owned(), why.to_owned());
        self.write(move |c| {
            let mut stmt = c.prepare_cached(
                "UPDATE jobs SET state = 'unknown', error_text = ?2, updated_at_ms = ?3
                 WHERE worker_id = ?1 AND state = 'running' RETURNING job_id",
            )?;
            let ids = stmt
                .query_map(params![worker_id, why, now_ms() as i64], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<String>>>()?;
            Ok(ids)
        })
        .await
    }

    async fn mark_lost(&self, worker_id: &str, why: &str) -> Result<Vec<String>, StoreError> {
        let (worker_id, why) = (worker_id.to_owned(), why.to_owned());
        self.write(move |c| {
            let mut stmt = c.prepare_cached(
                "UPDATE jobs SET state = 'lost', error_text = ?2, finished_at_ms = ?3, updated_at_ms = ?3
                 WHERE worker_id = ?1 AND state IN ('running', 'unknown')
                   AND EXISTS (SELECT 1 FROM workers w WHERE w.worker_id = ?1 AND w.state != 'ready')
                 RETURNING job_id, command",
            )?;
            let ids = stmt
                .query_map(params![worker_id, why, now_ms() as i64], |r| {
                    lost_metric(&worker_id, r.get(1).ok());
                    r.get(0)
                })?
                .collect::<rusqlite::Result<Vec<String>>>()?;
            Ok(ids)
        })
        .await
    }

    async fn mark_job_lost(
        &self,
        job_id: &str,
        worker_id: &str,
        why: &str,
    ) -> Result<(), StoreError> {
        let (job_id, worker_id, why) = (job_id.to_owned(), worker_id.to_owned(), why.to_owned());
        self.write(move |c| {
            let ended: Option<(String, String)> = c
                .query_row(
                    "UPDATE jobs SET state = 'lost', error_text = ?2, finished_at_ms = ?3, updated_at_ms = ?3
                     WHERE job_id = ?1 AND worker_id = ?4 AND state IN ('running', 'unknown')
                       AND job_id NOT IN (SELECT job_id FROM queue) RETURNING worker_id, command",
                    params![job_id, why, now_ms() as i64, worker_id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            if let Some((worker_id, command)) = ended {
                lost_metric(&worker_id, Some(command));
            }
            Ok(())
        })
        .await
    }

    async fn unknown_jobs(
        &self,
        worker_id: &str,
        before_ms: u64,
        limit: u32,
    ) -> Result<Vec<JobRow>, StoreError> {
        let worker_id = worker_id.to_owned();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE worker_id = ?1 AND state = 'unknown'
                   AND created_at_ms < ?2 AND job_id NOT IN (SELECT job_id FROM queue)
                   ORDER BY seq LIMIT ?3"
            ))?;
            let rows = stmt
                .query_map(params![worker_id, before_ms as i64, limit], |r| job_row(r))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn workers_with_unknown_jobs(
        &self,
    ) -> Result<std::collections::HashSet<String>, StoreError> {
        self.read(|c| {
            let mut stmt =
                c.prepare_cached("SELECT DISTINCT worker_id FROM jobs WHERE state = 'unknown'")?;
            let ids = stmt
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            Ok(ids)
        })
        .await
    }

    async fn insert_group(&self, g: GroupRow, key: Option<NewKey>) -> Result<(), StoreError> {
        let name = key.as_ref().map(|k| k.key.clone()).unwrap_or_default();
        let bound = self
            .write(move |c| {
                let tx = c.transaction()?;
                tx.exec(
                    "INSERT INTO groups (group_id, command, path, args, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![g.group_id, g.command, g.path, to_json(&g.args), g.created_at_ms as i64],
                )?;
                if let Some(key) = &key
                    && !bind_key(&tx, key, None, Some(&g.group_id))?
                {
                    return Ok(false);
                }
                tx.commit()?;
                Ok(true)
            })
            .await?;
        bound_or_taken(bound, name)
    }

    async fn record_group_failures(
        &self,
        group_id: &str,
        failed: Vec<jobcluster_proto::http::GroupFailure>,
    ) -> Result<(), StoreError> {
        let group_id = group_id.to_owned();
        self.write(move |c| {
            c.exec(
                "UPDATE groups SET failed = ?2 WHERE group_id = ?1",
                params![group_id, to_json(&failed)],
            )
            .map(drop)
        })
        .await
    }

    async fn unbind_group_key(&self, key: &str, group_id: &str) -> Result<(), StoreError> {
        let (key, group_id) = (key.to_owned(), group_id.to_owned());
        self.write(move |c| {
            c.exec(
                "DELETE FROM idempotency_keys WHERE key = ?1 AND group_id = ?2",
                [key, group_id],
            )?;
            Ok(())
        })
        .await
    }

    async fn idempotency_key(
        &self,
        key: &str,
        expired_before_ms: u64,
    ) -> Result<Option<KeyRow>, StoreError> {
        let key = key.to_owned();
        self.read(move |c| {
            c.row(
                &format!(
                    "SELECT {KEY_COLUMNS} FROM idempotency_keys WHERE key = ?1 AND created_at_ms >= ?2"
                ),
                params![key, expired_before_ms as i64],
                |r| key_row(r),
            )
            .optional()
        })
        .await
    }

    async fn prune_idempotency_keys(
        &self,
        expired_before_ms: u64,
        limit: u32,
    ) -> Result<usize, StoreError> {
        self.write(move |c| {
            c.exec(
                "DELETE FROM idempotency_keys WHERE rowid IN (
                   SELECT rowid FROM idempotency_keys WHERE created_at_ms < ?1 LIMIT ?2)",
                params![expired_before_ms as i64, limit],
            )
        })
        .await
    }

    async fn group(&self, group_id: &str) -> Result<Option<(GroupRow, Vec<JobRow>)>, StoreError> {
        let id = group_id.to_owned();
        self.read(move |c| {
            let Some(group) = c
                .query_row(
                    &format!("SELECT {GROUP_COLUMNS} FROM groups WHERE group_id = ?1"),
                    [&id],
                    |r| group_row(r),
                )
                .optional()?
            else {
                return Ok(None);
            };
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {JOB_COLUMNS_WITHOUT_ARGS} FROM jobs WHERE group_id = ?1 ORDER BY seq"
            ))?;
            let jobs = stmt
                .query_map([&id], |r| job_row(r))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(Some((group, jobs)))
        })
        .await
    }

    async fn groups(&self, limit: u32) -> Result<Vec<GroupRow>, StoreError> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {GROUP_COLUMNS_WITHOUT_ARGS} FROM groups ORDER BY seq DESC LIMIT ?1"
            ))?;
            let rows = stmt
                .query_map([limit], |r| group_row(r))?
                .collect::<rusqlite::Result<_>>()?;
            Ok(rows)
        })
        .await
    }

    async fn prune_finished(&self, before_ms: u64, batch: u32) -> Result<usize, StoreError> {
        self.write(move |c| {
            let tx = c.transaction()?;
            let jobs = tx.exec(
                "DELETE FROM jobs WHERE seq IN (
                   SELECT seq FROM jobs
                   WHERE state IN ('succeeded', 'failed', 'stopped', 'lost')
                     AND finished_at_ms < ?1 AND finished_at_ms > 0
                   LIMIT ?2)",
                params![before_ms as i64, batch],
            )?;
            tx.exec(
                "DELETE FROM groups WHERE seq IN (
                   SELECT seq FROM groups g WHERE created_at_ms < ?1
                     AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.group_id = g.group_id)
                   LIMIT ?2)",
                params![before_ms as i64, batch],
            )?;
            tx.commit()?;
            Ok(jobs)
        })
        .await
    }

    async fn close(&self) -> Result<(), StoreError> {
        self.write(|c| c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);"))
            .await
    }

    async fn probe(&self) -> Result<(), StoreError> {
        let stamp = crate::time::now_ms() as i64;
        self.write(move |c| {
            let tx = c.transaction()?;
            // Made here rather than in the schema: only readiness uses it.
            tx.execute_batch(
                "CREATE TABLE IF NOT EXISTS health_probe (
                    id INTEGER PRIMARY KEY CHECK (id = 1),
                    at_ms INTEGER NOT NULL
                )",
            )?;
            tx.exec(
                "INSERT INTO health_probe (id, at_ms) VALUES (1, ?1)
                 ON CONFLICT(id) DO UPDATE SET at_ms = ?1",
                [stamp],
            )?;
            let read: i64 = tx.row("SELECT at_ms FROM health_probe WHERE id = 1", [], |r| {
                r.get(0)
            })?;
            tx.commit()?;
            if read != stamp {
                return Err(rusqlite::Error::QueryReturnedNoRows);
            }
            Ok(())
        })
        .await
    }

    async fn job(&self, job_id: &str) -> Result<Option<JobRow>, StoreError> {
        let id = job_id.to_owned();
        self.read(move |c| {
            c.row(
                &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = ?1"),
                [id],
                |r| job_row(r),
            )
            .optional()
        })
        .await
    }

    async fn jobs(&self, q: JobQuery) -> Result<(Vec<JobRow>, Option<i64>), StoreError> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {JOB_COLUMNS_WITHOUT_ARGS}, seq FROM jobs
                 WHERE (?1 IS NULL OR worker_id = ?1) AND (?2 IS NULL OR state = ?2)
                   AND (?3 IS NULL OR seq < ?3)
                 ORDER BY seq DESC LIMIT ?4"
            ))?;
            let limit = i64::from(q.limit) + 1;
            let mut rows = stmt
                .query_map(params![q.worker_id, q.state, q.before, limit], |r| {
                    Ok((job_row(r)?, r.get::<_, i64>(15)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let more = rows.len() > q.limit as usize;
            rows.truncate(q.limit as usize);
            let next = if more {
                rows.last().map(|(_, seq)| *seq)
            } else {
                None
            };
            Ok((rows.into_iter().map(|(j, _)| j).collect(), next))
        })
        .await
    }

    async fn enqueue_job(
        &self,
        j: JobRow,
        q: QueueEntry,
        key: Option<NewKey>,
        max_queued: u64,
    ) -> Result<Option<u64>, StoreError> {
        let name = key.as_ref().map(|k| k.key.clone()).unwrap_or_default();
        let outcome = self
            .write(move |c| {
                let tx = c.transaction()?;
                // Waiting only: a job being dispatched waits no more.
                let waiting: i64 = tx.row(
                    "SELECT COUNT(*) FROM queue WHERE dispatching = 0",
                    [],
                    |r| r.get(0),
                )?;
                if waiting as u64 >= max_queued {
                    return Ok(Err(false));
                }
                insert_job(&tx, &j)?;
                tx.exec(
                    "INSERT INTO queue (job_id, priority, queued_at_ms, worker_id, selector, env,
                       deadline_ms, reason) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    params![
                        q.job_id,
                        q.priority,
                        q.queued_at_ms as i64,
                        q.worker_id,
                        to_json(&q.selector),
                        to_json(&q.env),
                        q.deadline_ms as i64,
                        q.reason
                    ],
                )?;
                if let Some(key) = &key
                    && !bind_key(&tx, key, Some(&j.job_id), None)?
                {
                    return Ok(Err(true));
                }
                let position = position(&tx, &q.job_id)?.unwrap_or(0);
                tx.commit()?;
                Ok(Ok(position))
            })
            .await?;
        match outcome {
            Ok(position) => Ok(Some(position)),
            Err(false) => Ok(None),
            Err(true) => Err(StoreError::KeyTaken(name)),
        }
    }

    async fn waiting_ahead(
        &self,
        priority: i32,
        worker_id: &str,
        limit: u32,
    ) -> Result<Vec<(JobRow, QueueEntry)>, StoreError> {
        let worker_id = worker_id.to_owned();
        self.read_unsynced(move |c| waiting_ahead(c, priority, &worker_id, limit))
            .await
    }

    async fn in_queue(&self, job_id: &str) -> Result<bool, StoreError> {
        let id = job_id.to_owned();
        self.read(move |c| {
            c.prepare_cached("SELECT 1 FROM queue WHERE job_id = ?1")?
                .exists([&id])
        })
        .await
    }

    async fn queue_entry(&self, job_id: &str) -> Result<Option<(QueueEntry, u64)>, StoreError> {
        let id = job_id.to_owned();
        self.read(move |c| {
            let Some(entry) = c
                .query_row(
                    &format!("SELECT {QUEUE_COLUMNS} FROM queue q WHERE q.job_id = ?1"),
                    [&id],
                    |r| queue_row(r),
                )
                .optional()?
            else {
                return Ok(None);
            };
            Ok(position(c, &id)?.map(|p| (entry, p)))
        })
        .await
    }

    async fn queued(
        &self,
        skip: u64,
        limit: u32,
        worker_id: Option<String>,
    ) -> Result<Vec<(JobRow, QueueEntry)>, StoreError> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {QUEUED_JOB_HEAD_COLUMNS} FROM queue q CROSS JOIN jobs j ON j.job_id = q.job_id
                 WHERE q.dispatching = 0 AND (?3 IS NULL OR q.worker_id = ?3)
                   AND j.state = 'queued'
                 ORDER BY q.priority DESC, q.seq LIMIT ?1 OFFSET ?2"
            ))?;
            let rows = stmt
                .query_map(params![limit, skip as i64, worker_id], |r| {
                    queued_job_row(r)
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn dispatching(&self) -> Result<Vec<(JobRow, QueueEntry)>, StoreError> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {QUEUED_JOB_COLUMNS} FROM queue q JOIN jobs j ON j.job_id = q.job_id
                 WHERE q.dispatching = 1 ORDER BY q.seq"
            ))?;
            let rows = stmt
                .query_map([], |r| queued_job_row(r))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn claim_queued(
        &self,
        job_id: &str,
        worker_id: &str,
        why: &str,
    ) -> Result<Option<(JobRow, super::Env)>, StoreError> {
        let (id, worker, why) = (job_id.to_owned(), worker_id.to_owned(), why.to_owned());
        self.write(move |c| {
            let tx = c.transaction()?;
            // created_at_ms becomes the start's time, so the settling of
            // unknown jobs waits for this start like any other.
            let claimed = tx
                .query_row(
                    &format!(
                        "UPDATE jobs SET state = 'unknown', worker_id = ?2, error_text = ?3,
                           created_at_ms = ?4, updated_at_ms = ?4
                         WHERE job_id = ?1 AND state = 'queued' RETURNING {JOB_COLUMNS}"
                    ),
                    params![id, worker, why, now_ms() as i64],
                    |r| job_row(r),
                )
                .optional()?;
            let claimed = match claimed {
                Some(row) => {
                    let env: String = tx.row(
                        "UPDATE queue SET dispatching = 1 WHERE job_id = ?1 RETURNING env",
                        [&id],
                        |r| r.get(0),
                    )?;
                    Some((row, super::from_json(&env)))
                }
                None => None,
            };
            tx.commit()?;
            Ok(claimed)
        })
        .await
    }

    async fn requeue(&self, job_id: &str, reason: &str) -> Result<bool, StoreError> {
        let (id, reason) = (job_id.to_owned(), reason.to_owned());
        self.write(move |c| {
            let tx = c.transaction()?;
            let n = tx.exec(
                "UPDATE jobs SET state = 'queued', error_text = '',
                   worker_id = (SELECT worker_id FROM queue WHERE job_id = ?1),
                   created_at_ms = (SELECT queued_at_ms FROM queue WHERE job_id = ?1),
                   updated_at_ms = ?2
                 WHERE job_id = ?1 AND state = 'unknown' AND started_at_ms = 0
                   AND EXISTS (SELECT 1 FROM queue WHERE job_id = ?1)",
                params![id, now_ms() as i64],
            )?;
            tx.exec(
                "UPDATE queue SET reason = ?2, dispatching = 0 WHERE job_id = ?1 AND ?3",
                params![id, reason, n > 0],
            )?;
            tx.commit()?;
            Ok(n > 0)
        })
        .await
    }

    async fn dequeue(&self, job_id: &str) -> Result<(), StoreError> {
        let id = job_id.to_owned();
        self.write(move |c| {
            c.exec("DELETE FROM queue WHERE job_id = ?1", [&id])?;
            Ok(())
        })
        .await
    }

    async fn set_queue_reason(&self, job_id: &str, reason: &str) -> Result<(), StoreError> {
        let (id, reason) = (job_id.to_owned(), reason.to_owned());
        self.write(move |c| {
            c.exec(
                "UPDATE queue SET reason = ?2 WHERE job_id = ?1",
                params![id, reason],
            )?;
            Ok(())
        })
        .await
    }

    async fn stop_queued(&self, job_id: &str) -> Result<bool, StoreError> {
        let id = job_id.to_owned();
        self.write(move |c| {
            let tx = c.transaction()?;
            let n = tx.exec(
                "UPDATE jobs SET state = 'stopped', error_text = 'stopped while queued; it never started',
                   finished_at_ms = ?2, updated_at_ms = ?2
                 WHERE job_id = ?1 AND state = 'queued'",
                params![id, now_ms() as i64],
            )?;
            if n > 0 {
                tx.exec("DELETE FROM queue WHERE job_id = ?1", [&id])?;
            }
            tx.commit()?;
            Ok(n > 0)
        })
        .await
    }

    async fn expire_queued(&self, now: u64) -> Result<Vec<String>, StoreError> {
        self.write(move |c| {
            let tx = c.transaction()?;
            let due: Vec<(String, u64, u64)> = tx
                .prepare_cached(
                    "SELECT q.job_id, q.queued_at_ms, q.deadline_ms FROM queue q
                     CROSS JOIN jobs j ON j.job_id = q.job_id
                     WHERE q.deadline_ms > 0 AND q.deadline_ms <= ?1 AND j.state = 'queued'",
                )?
                .query_map([now as i64], |r| {
                    Ok((
                        r.get(0)?,
                        r.get::<_, i64>(1)? as u64,
                        r.get::<_, i64>(2)? as u64,
                    ))
                })?
                .collect::<rusqlite::Result<_>>()?;
            for (id, queued_at, deadline) in &due {
                let why = super::queue_timeout_text(*queued_at, *deadline);
                tx.exec(
                    "UPDATE jobs SET state = 'failed', error_text = ?2, finished_at_ms = ?3,
                       updated_at_ms = ?3 WHERE job_id = ?1 AND state = 'queued'",
                    params![id, why, now as i64],
                )?;
                tx.exec("DELETE FROM queue WHERE job_id = ?1", [id])?;
            }
            tx.commit()?;
            Ok(due.into_iter().map(|(id, _, _)| id).collect())
        })
        .await
    }

    async fn queue_is_empty(&self) -> Result<bool, StoreError> {
        // It only decides whether a pass looks further: a row seen before
        // it is durable costs a pass, and one committed just after is
        // woken for by whoever queued it (or found by the next tick).
        self.read_unsynced(|c| c.row("SELECT NOT EXISTS (SELECT 1 FROM queue)", [], |r| r.get(0)))
            .await
    }

    async fn queue_length(&self) -> Result<u64, StoreError> {
        self.read(|c| {
            c.row(
                "SELECT COUNT(*) FROM queue q JOIN jobs j ON j.job_id = q.job_id
                 WHERE j.state = 'queued'",
                [],
                |r| r.get::<_, i64>(0).map(|n| n as u64),
            )
        })
        .await
    }

    async fn running_counts(&self) -> Result<std::collections::HashMap<String, u64>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT worker_id, COUNT(*) FROM jobs WHERE state IN ('running', 'unknown') GROUP BY worker_id",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
            rows.collect()
        })
        .await
    }
}

/// Whether a queued job of `priority` or higher named to `worker_id` waits
/// (through the partial index `queue_named`).
fn named_waiting(c: &Connection, priority: i32, worker_id: &str) -> rusqlite::Result<bool> {
    c.prepare_cached(
        "SELECT 1 FROM queue WHERE dispatching = 0 AND worker_id != '' AND worker_id = ?1
           AND priority >= ?2 LIMIT 1",
    )?
    .exists(params![worker_id, priority])
}

/// The queued jobs a new job of `priority` for `worker_id` may wait behind
/// ([`Ahead`]).
fn waiting_ahead(
    c: &Connection,
    priority: i32,
    worker_id: &str,
    limit: u32,
) -> rusqlite::Result<Vec<(JobRow, QueueEntry)>> {
    let mut stmt = c.prepare_cached(&format!(
        "SELECT {QUEUED_JOB_HEAD_COLUMNS} FROM queue q CROSS JOIN jobs j ON j.job_id = q.job_id
         WHERE q.dispatching = 0 AND q.priority >= ?1 AND j.state = 'queued'
           AND (q.worker_id = '' OR q.worker_id = ?2)
         ORDER BY q.priority DESC, q.seq LIMIT ?3"
    ))?;
    stmt.query_map(params![priority, worker_id, limit], |r| queued_job_row(r))?
        .collect()
}

/// Counts a job recorded `lost` (a final state) for the metrics.
fn lost_metric(worker_id: &str, command: Option<String>) {
    if let Some(command) = command {
        crate::metrics::job_finished(JobState::Lost, worker_id, &command);
    }
}

/// What became of a new job's record ([`record_job`]).
enum Recorded {
    Yes,
    /// A job queued ahead of it holds it back: nothing was written.
    HeldBack,
    /// A live binding holds the key: nothing was written.
    KeyTaken(String),
}

impl Recorded {
    /// Whether the job was recorded; a taken key is an error.
    fn recorded(self) -> Result<bool, StoreError> {
        match self {
            Recorded::Yes => Ok(true),
            Recorded::HeldBack => Ok(false),
            Recorded::KeyTaken(key) => Err(StoreError::KeyTaken(key)),
        }
    }
}

/// Records a job and binds `key` to it in one transaction, unless one of
/// the jobs queued ahead of it holds it back ([`Ahead`]). A job with
/// neither is one statement, without a transaction around it.
fn record_job(
    c: &mut Connection,
    j: &JobRow,
    key: Option<&NewKey>,
    ahead: Option<&Ahead>,
) -> rusqlite::Result<Recorded> {
    if key.is_none() && ahead.is_none() {
        insert_job(c, j)?;
        return Ok(Recorded::Yes);
    }
    let tx = c.transaction()?;
    if let Some(ahead) = ahead {
        if !ahead.worker_id.is_empty() && named_waiting(&tx, ahead.priority, &ahead.worker_id)? {
            return Ok(Recorded::HeldBack);
        }
        let queued = waiting_ahead(&tx, ahead.priority, "", ahead.limit)?;
        if queued.iter().any(|(row, entry)| (ahead.holds)(row, entry)) {
            return Ok(Recorded::HeldBack);
        }
    }
    insert_job(&tx, j)?;
    if let Some(key) = key
        && !bind_key(&tx, key, Some(&j.job_id), None)?
    {
        return Ok(Recorded::KeyTaken(key.key.clone())); // dropping `tx` rolls back
    }
    tx.commit()?;
    Ok(Recorded::Yes)
}

/// A write that had to bind an idempotency key: done, or refused because a
/// live binding holds the key.
fn bound_or_taken(bound: bool, key: String) -> Result<(), StoreError> {
    if bound {
        Ok(())
    } else {
        Err(StoreError::KeyTaken(key))
    }
}

/// Inserts a job. Its worker's first report may have arrived before the
/// API recorded the start (after a scheduler crash between the two): then
/// the report's state stays and the API's request fields fill in.
fn insert_job(c: &Connection, j: &JobRow) -> rusqlite::Result<()> {
    c.exec(
        "INSERT INTO jobs (job_id, worker_id, command, path, args, state, error_text, exit_code,
                   signal, created_at_ms, started_at_ms, finished_at_ms, output_bytes, group_id,
                   updated_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)
                 ON CONFLICT(job_id) DO UPDATE SET command = excluded.command,
                   path = excluded.path, args = excluded.args,
                   created_at_ms = excluded.created_at_ms,
                   group_id = COALESCE(excluded.group_id, group_id)",
        params![
            j.job_id,
            j.worker_id,
            j.command,
            j.path,
            to_json(&j.args),
            j.state,
            j.error_text,
            j.exit_code,
            j.signal,
            j.created_at_ms as i64,
            j.started_at_ms as i64,
            j.finished_at_ms as i64,
            j.output_bytes as i64,
            j.group_id,
            now_ms() as i64
        ],
    )?;
    Ok(())
}

/// Binds `key` to a job or a group, replacing a binding that has expired
/// (one not yet pruned). False if a live binding holds the key.
fn bind_key(
    c: &Connection,
    key: &NewKey,
    job_id: Option<&str>,
    group_id: Option<&str>,
) -> rusqlite::Result<bool> {
    let written = c.exec(
        "INSERT INTO idempotency_keys (key, route, body_sha256, job_id, group_id, created_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT(key) DO UPDATE SET route = excluded.route,
           body_sha256 = excluded.body_sha256, job_id = excluded.job_id,
           group_id = excluded.group_id, created_at_ms = excluded.created_at_ms
         WHERE idempotency_keys.created_at_ms < ?7",
        params![
            key.key,
            key.route,
            key.body_sha256,
            job_id,
            group_id,
            key.created_at_ms as i64,
            key.expired_before_ms as i64
        ],
    )?;
    Ok(written > 0)
}

/// Updates a job from its worker's status; only that worker's job (a
/// worker reporting another worker's job id changes nothing). A terminal
/// state is a promise and never changes; `unknown` turns back into what
/// the worker says. With `first` (the answer to its start), only a record
/// that has heard nothing since it was written: a report or a mark that
/// came meanwhile is newer than that answer.
/// `at`: the record's new `updated_at_ms`.
fn update_job(c: &Connection, j: &JobRow, first: bool, at: u64) -> rusqlite::Result<usize> {
    let n = c.exec(
        "UPDATE jobs SET state = ?2, error_text = ?3, exit_code = ?4, signal = ?5,
           started_at_ms = ?6, finished_at_ms = ?7, output_bytes = ?8, updated_at_ms = ?10,
           command = CASE WHEN command = '' THEN ?11 ELSE command END
         WHERE job_id = ?1 AND worker_id = ?9
           AND state NOT IN ('queued', 'succeeded', 'failed', 'stopped', 'lost')
           AND (NOT ?12 OR (state = 'unknown' AND started_at_ms = 0))",
        params![
            j.job_id,
            j.state,
            j.error_text,
            j.exit_code,
            j.signal,
            j.started_at_ms as i64,
            j.finished_at_ms as i64,
            j.output_bytes as i64,
            j.worker_id,
            at as i64,
            j.command,
            first
        ],
    )?;
    // Final records are never updated: this one just ended.
    if n > 0 && j.state.is_terminal() {
        crate::metrics::job_finished(j.state, &j.worker_id, &j.command);
    }
    Ok(n)
}

/// How many queued jobs go before `job_id` (None: it is not queued).
fn position(c: &Connection, job_id: &str) -> rusqlite::Result<Option<u64>> {
    c.row(
        // Two range counts on the queue's index, not one scan with an OR.
        "SELECT (SELECT COUNT(*) FROM queue q2 WHERE q2.dispatching = 0 AND q2.priority > q.priority)
              + (SELECT COUNT(*) FROM queue q3
                 WHERE q3.dispatching = 0 AND q3.priority = q.priority AND q3.seq < q.seq)
         FROM queue q CROSS JOIN jobs j ON j.job_id = q.job_id
         WHERE q.job_id = ?1 AND q.dispatching = 0 AND j.state = 'queued'",
        [job_id],
        |r| r.get::<_, i64>(0).map(|n| n as u64),
    )
    .optional()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::store::suite::job;

    #[tokio::test]
    async fn a_write_that_changes_nothing_costs_no_sync() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.db")).unwrap();
        let syncs = || store.inner.sync.syncs.load(Ordering::Relaxed);
        store
            .insert_job(job("j1", JobState::Running, 0), None)
            .await
            .unwrap();
        let after_insert = syncs();
        assert!(after_insert >= 1, "the insert was synced");
        // Nothing queued to expire: no row changes, no sync.
        assert!(store.expire_queued(u64::MAX).await.unwrap().is_empty());
        // An update that matches no row (no such worker).
        store.set_worker_draining("w", true).await.unwrap();
        assert_eq!(syncs(), after_insert);
        // A write that does change a row is synced as before.
        store
            .insert_job(job("j2", JobState::Running, 0), None)
            .await
            .unwrap();
        assert!(syncs() > after_insert);
    }

    #[tokio::test]
    async fn the_database_and_its_journals_are_the_owners_alone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mode = |name: &str| {
            std::fs::metadata(dir.path().join(name))
                .map(|m| m.permissions().mode() & 0o777)
                .ok()
        };
        // A new database.
        let store = SqliteStore::open(&dir.path().join("new.db")).unwrap();
        store
            .insert_job(job("j1", JobState::Running, 0), None)
            .await
            .unwrap();
        for name in ["new.db", "new.db-wal", "new.db-shm"] {
            assert_eq!(mode(name), Some(0o600), "{name}");
        }
        // One an earlier version left readable by everyone.
        let old = dir.path().join("old.db");
        drop(SqliteStore::open(&old).unwrap());
        for suffix in ["", "-wal"] {
            let file = format!("{}{suffix}", old.display());
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(&file)
                .unwrap();
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let store = SqliteStore::open(&old).unwrap();
        store
            .insert_job(job("j2", JobState::Running, 0), None)
            .await
            .unwrap();
        for name in ["old.db", "old.db-wal", "old.db-shm"] {
            assert_eq!(mode(name), Some(0o600), "{name}");
        }
    }
}
