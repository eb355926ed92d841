//! The store in PostgreSQL: one database shared by any number of
//! schedulers (`[store] url`).
//!
//! Every method is one transaction on a pooled connection; PostgreSQL's
//! commit (`synchronous_commit = on`, its default) makes it durable before
//! it returns. Statements that decide something for the whole cluster (a
//! job taken from the queue, a terminal state written) are single
//! conditional `UPDATE`s, so two schedulers racing for the same row settle
//! on the row lock and exactly one wins.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use super::rows::{
    GROUP_COLUMNS, GROUP_COLUMNS_WITHOUT_ARGS, JOB_COLUMNS, JOB_COLUMNS_WITHOUT_ARGS, KEY_COLUMNS,
    QUEUE_COLUMNS, QUEUED_JOB_COLUMNS, QUEUED_JOB_HEAD_COLUMNS, WORKER_COLUMNS, group_row, job_row,
    job_state, key_row, queue_row, queued_job_row, worker_row,
};
use super::{
    Ahead, GroupRow, JobQuery, JobRow, KeyRow, NewKey, QueueEntry, Store, StoreError, WorkerRow,
    to_json,
};
use crate::metrics::Ended;
use crate::state::{JobState, WorkerState};
use crate::time::now_ms;

/// Connections one scheduler holds at most. Each costs the server a
/// process; a start takes one for a few milliseconds.
const POOL_SIZE: usize = 16;

/// How long a call waits for a connection of the pool, or for a new one
/// to be made, before it fails with an error the API turns into a 503.
const POOL_WAIT: Duration = Duration::from_secs(5);

/// Server-side bounds on every session: a transaction left idle (its
/// scheduler paused) is ended after 2 s, a wait for a lock gives up after
/// 3 s, a statement after 30 s.
const SESSION_LIMITS: &str = "-c idle_in_transaction_session_timeout=2000 \
    -c lock_timeout=3000 -c statement_timeout=30000";

/// Every change to the schema, in order; a database records the last one
/// applied (`schema_version`). Never edit one that shipped: add another.
const MIGRATIONS: &[&str] = &[
    // 1: the schema of the SQLite store, in PostgreSQL's types.
    "
CREATE TABLE workers (
    worker_id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    address TEXT NOT NULL,
    state TEXT NOT NULL,
    plugins TEXT NOT NULL,
    labels TEXT NOT NULL,
    registered_at_ms BIGINT NOT NULL,
    last_seen_ms BIGINT NOT NULL,
    cgroup_limits BOOLEAN NOT NULL DEFAULT false,
    extensions TEXT NOT NULL DEFAULT '{}',
    draining BOOLEAN NOT NULL DEFAULT false,
    max_jobs BIGINT NOT NULL DEFAULT 0,
    seed BOOLEAN NOT NULL DEFAULT false
);
CREATE TABLE jobs (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id TEXT NOT NULL UNIQUE,
    worker_id TEXT NOT NULL,
    command TEXT NOT NULL,
    path TEXT NOT NULL,
    args TEXT NOT NULL,
    state TEXT NOT NULL,
    error_text TEXT NOT NULL,
    exit_code INTEGER,
    signal INTEGER,
    created_at_ms BIGINT NOT NULL,
    started_at_ms BIGINT NOT NULL,
    finished_at_ms BIGINT NOT NULL,
    output_bytes BIGINT NOT NULL,
    group_id TEXT,
    updated_at_ms BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE removed_workers (
    worker_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    removed_at_ms BIGINT NOT NULL
);
CREATE TABLE groups (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    group_id TEXT NOT NULL UNIQUE,
    command TEXT NOT NULL,
    path TEXT NOT NULL,
    args TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL
);
CREATE TABLE queue (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id TEXT NOT NULL UNIQUE REFERENCES jobs (job_id) ON DELETE CASCADE ON UPDATE CASCADE,
    priority INTEGER NOT NULL,
    queued_at_ms BIGINT NOT NULL,
    worker_id TEXT NOT NULL,
    selector TEXT NOT NULL,
    env TEXT NOT NULL,
    deadline_ms BIGINT NOT NULL,
    reason TEXT NOT NULL,
    dispatching BOOLEAN NOT NULL DEFAULT false
);
CREATE TABLE idempotency_keys (
    key TEXT PRIMARY KEY,
    route TEXT NOT NULL,
    body_sha256 TEXT NOT NULL,
    job_id TEXT REFERENCES jobs (job_id) ON DELETE CASCADE ON UPDATE CASCADE,
    group_id TEXT REFERENCES groups (group_id) ON DELETE CASCADE,
    created_at_ms BIGINT NOT NULL
);
CREATE TABLE health_probe (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    at_ms BIGINT NOT NULL
);
CREATE INDEX jobs_by_worker ON jobs (worker_id, seq);
CREATE INDEX jobs_by_state ON jobs (state, seq);
CREATE INDEX jobs_by_group ON jobs (group_id, seq);
CREATE INDEX jobs_by_worker_state ON jobs (worker_id, state);
CREATE INDEX jobs_by_state_finished ON jobs (state, finished_at_ms);
CREATE INDEX queue_waiting ON queue (priority DESC, seq, worker_id) WHERE NOT dispatching;
CREATE INDEX queue_dispatching ON queue (seq) WHERE dispatching;
CREATE INDEX queue_by_deadline ON queue (deadline_ms) WHERE deadline_ms > 0;
CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at_ms);
CREATE INDEX idempotency_keys_by_job ON idempotency_keys (job_id);
CREATE INDEX idempotency_keys_by_group ON idempotency_keys (group_id);
",
    // 2: the leader's lease. One row; `token` (the term) grows whenever
    // the lease changes hands, and fences the leader's writes. Times are
    // the database's own clock, the one clock every scheduler shares.
    "
CREATE TABLE leader (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    holder TEXT NOT NULL,
    token BIGINT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);
",
    // 3: queued jobs named to a worker, found at once by a start naming
    // it, however many placed jobs wait before them.
    "
CREATE INDEX queue_named ON queue (worker_id, priority) WHERE NOT dispatching AND worker_id <> '';
",
    // 4: the workers a group's job could not be started on.
    "
ALTER TABLE groups ADD COLUMN failed TEXT NOT NULL DEFAULT '[]';
",
];

/// The fence every write of a leader's fenced store checks first. `FOR
/// SHARE` holds the lease row until the write commits, so a takeover
/// (which updates the row) waits for it: no write of an old term can
/// commit after a new term began.
const FENCE: &str = "SELECT 1 FROM leader WHERE id = 1 AND holder = $1 AND token = $2
    AND expires_at > clock_timestamp() FOR SHARE";

/// The advisory lock that serializes enqueues ("jobqueue").
const ENQUEUE_LOCK: i64 = 0x6a6f_6271_7565_7565;

/// The advisory lock that serializes migrations of schedulers starting
/// at once (an arbitrary constant: "jobclstr" in ASCII).
const MIGRATION_LOCK: i64 = 0x6a6f_6263_6c73_7472;

#[derive(Debug, Clone)]
pub struct PgStore {
    pool: Pool,
    /// For the lease alone (`lead`, `resign`).
    lease: Pool,
    /// Set on the leader's handle: (holder, term) every write checks.
    fence: Option<Arc<(String, i64)>>,
}

/// Where a PostgreSQL store is, from `[store]`.
#[derive(Debug, Clone)]
pub struct PgLocation {
    pub url: String,
    /// Read from `[store] password_file`, so the URL needs none.
    pub password: Option<String>,
    /// `[store] ca_file` (and a client certificate): TLS, required and
    /// verified. `None`: plaintext, for a server on this machine only.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl PgLocation {
    /// The URL without its password, for messages and logs.
    pub fn redacted(&self) -> String {
        redact(&self.url)
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, tail) = match rest.find('/') {
        Some(at) => rest.split_at(at),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

impl PgStore {
    /// Connects, and brings the database's schema up to this version (or
    /// refuses one that is newer).
    pub async fn connect(location: &PgLocation) -> Result<PgStore, StoreError> {
        let connect_err = |source: tokio_postgres::Error| {
            let mut why = source.to_string();
            let mut cause = std::error::Error::source(&source);
            while let Some(inner) = cause {
                why = format!("{why}: {inner}");
                cause = inner.source();
            }
            StoreError::Connect {
                url: location.redacted(),
                why,
            }
        };
        let mut config: tokio_postgres::Config = location.url.parse().map_err(connect_err)?;
        if let Some(password) = &location.password {
            config.password(password);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(POOL_WAIT);
        }
        // A peer that vanished without a word (a dead host) is noticed by
        // the keepalives instead of hanging a call until TCP gives up.
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(10));
        if config.get_application_name().is_none() {
            config.application_name("schedulerd");
        }
        // No session may hold locks for long: a scheduler paused (or cut
        // off) inside a transaction holds the lease row or the queue's
        // lock, and with it every other scheduler's takeover or enqueue.
        // The server ends such a session; a wait for a lock, or a
        // statement, gives up instead of hanging its caller.
        config.options(SESSION_LIMITS);
        if location.tls.is_some() {
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
        }
        let pool = |size: usize| {
            let recycling = ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            };
            let manager = match &location.tls {
                Some(tls) => {
                    let connect = tokio_postgres_rustls::MakeRustlsConnect::new((**tls).clone());
                    Manager::from_config(config.clone(), connect, recycling)
                }
                None => Manager::from_config(config.clone(), NoTls, recycling),
            };
            Pool::builder(manager)
                .max_size(size)
                .runtime(Runtime::Tokio1)
                .wait_timeout(Some(POOL_WAIT))
                .create_timeout(Some(POOL_WAIT))
                .build()
                .map_err(|e| StoreError::Pool(e.to_string()))
        };
        // The lease has connections of its own: a pool busy with a burst
        // of registrations must not cost the leader its lease.
        let store = PgStore {
            pool: pool(POOL_SIZE)?,
            lease: pool(2)?,
            fence: None,
        };
        let mut client = store.client().await.map_err(|e| match e {
            StoreError::Postgres(source) => connect_err(source),
            other => other,
        })?;
        migrate(&mut client).await?;
        Ok(store)
    }

    /// One query on a connection of the pool.
    async fn rows(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        self.client().await?.rows(sql, params).await
    }

    /// One statement, written in a (fenced) transaction of its own; the
    /// rows it changed.
    async fn write_one(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, StoreError> {
        let mut c = self.client().await?;
        let tx = self.begin(&mut c).await?;
        let n = tx.exec(sql, params).await?;
        tx.commit().await?;
        Ok(n)
    }

    /// Records a job and binds `key` to it in one transaction, unless one
    /// of the jobs queued ahead of it holds it back ([`Ahead`]): whether it
    /// was recorded, or [`StoreError::KeyTaken`].
    async fn record_job(
        &self,
        j: &JobRow,
        key: Option<&NewKey>,
        ahead: Option<&Ahead>,
    ) -> Result<bool, StoreError> {
        let mut c = self.client().await?;
        let tx = self.begin(&mut c).await?;
        if let Some(ahead) = ahead {
            if !ahead.worker_id.is_empty()
                && named_waiting(&tx, ahead.priority, &ahead.worker_id).await?
            {
                return Ok(false); // dropping `tx` rolls back
            }
            let queued = waiting_ahead(&tx, ahead.priority, "", ahead.limit).await?;
            if queued.iter().any(|(row, entry)| (ahead.holds)(row, entry)) {
                return Ok(false);
            }
        }
        insert_job(&tx, j).await?;
        if let Some(key) = key
            && !bind_key(&tx, key, Some(&j.job_id), None).await?
        {
            return Err(StoreError::KeyTaken(key.key.clone()));
        }
        tx.commit().await?;
        Ok(true)
    }

    /// A transaction for a write, fenced on the leader's handle.
    async fn begin<'a>(
        &self,
        c: &'a mut Object,
    ) -> Result<deadpool_postgres::Transaction<'a>, StoreError> {
        let tx = c.transaction().await?;
        if let Some(fence) = &self.fence {
            let (holder, term) = &**fence;
            if tx.rows(FENCE, &[holder, term]).await?.is_empty() {
                return Err(StoreError::NotLeader);
            }
        }
        Ok(tx)
    }

    async fn client(&self) -> Result<Object, StoreError> {
        checkout(&self.pool).await
    }
}

async fn checkout(pool: &Pool) -> Result<Object, StoreError> {
    pool.get().await.map_err(|e| match e {
        deadpool_postgres::PoolError::Backend(e) => StoreError::Postgres(e),
        other => StoreError::Pool(other.to_string()),
    })
}

/// Applies the migrations the database has not seen, in one transaction
/// under an advisory lock, so schedulers starting together migrate once.
async fn migrate(client: &mut Object) -> Result<(), StoreError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
        .await?;
    let found: i64 = tx
        .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_version", &[])
        .await?
        .try_get(0)?;
    let known = MIGRATIONS.len() as i64;
    if found > known {
        return Err(StoreError::TooNew { found, known });
    }
    for (version, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        tx.batch_execute(sql).await?;
        tracing::info!(version = version + 1, "database schema migrated");
    }
    if found < known {
        tx.execute("DELETE FROM schema_version", &[]).await?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES ($1)",
            &[&known],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Times the store method it is called in, under that method's name.
macro_rules! timed {
    () => {{
        fn here() {}
        crate::metrics::StoreTimer::start(std::any::type_name_of_val(&here))
    }};
}

#[async_trait::async_trait]
impl Store for PgStore {
    fn shared(&self) -> bool {
        true
    }

    async fn lead(&self, holder: &str, ttl: Duration) -> Result<Option<i64>, StoreError> {
        let _timer = timed!();
        let c = checkout(&self.lease).await?;
        // Renewed by its holder while live, taken by anyone once expired;
        // a new holder (or the old one after expiry) starts a new term.
        let rows = c
            .rows(
                "INSERT INTO leader AS l (id, holder, token, expires_at)
                 VALUES (1, $1, 1, clock_timestamp() + make_interval(secs => $2))
                 ON CONFLICT (id) DO UPDATE SET
                   token = CASE WHEN l.holder = $1 AND l.expires_at > clock_timestamp()
                           THEN l.token ELSE l.token + 1 END,
                   holder = $1,
                   expires_at = clock_timestamp() + make_interval(secs => $2)
                 WHERE (l.holder = $1 AND l.expires_at > clock_timestamp())
                    OR l.expires_at <= clock_timestamp()
                 RETURNING token",
                &[&holder, &ttl.as_secs_f64()],
            )
            .await?;
        rows.first().map(|r| Ok(r.try_get(0)?)).transpose()
    }

    async fn resign(&self, holder: &str) -> Result<(), StoreError> {
        let c = checkout(&self.lease).await?;
        c.exec(
            "UPDATE leader SET expires_at = clock_timestamp() WHERE id = 1 AND holder = $1",
            &[&holder],
        )
        .await?;
        Ok(())
    }

    fn fenced(&self, holder: &str, term: i64) -> super::SharedStore {
        Arc::new(PgStore {
            pool: self.pool.clone(),
            lease: self.lease.clone(),
            fence: Some(Arc::new((holder.to_owned(), term))),
        })
    }

    async fn touch_workers(&self, ids: Vec<String>, now_ms: u64) -> Result<(), StoreError> {
        let _timer = timed!();
        self.write_one(
            "UPDATE workers SET last_seen_ms = GREATEST(last_seen_ms, $2) WHERE worker_id = ANY($1)",
            &[&ids, &(now_ms as i64)],
        )
        .await?;
        Ok(())
    }

    async fn upsert_worker(&self, w: WorkerRow) -> Result<(), StoreError> {
        let _timer = timed!();
        let mut c = self.client().await?;
        let tx = self.begin(&mut c).await?;
        tx.exec(
            "DELETE FROM workers WHERE name = $1 AND worker_id <> $2",
            &[&w.name, &w.worker_id],
        )
        .await?;
        tx.exec("INSERT INTO workers (worker_id, name, address, state, plugins, labels, registered_at_ms,
               last_seen_ms, cgroup_limits, extensions, draining, max_jobs, seed)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
             ON CONFLICT (worker_id) DO UPDATE SET name = $2, address = $3, state = $4,
               plugins = $5, labels = $6, registered_at_ms = $7, last_seen_ms = $8,
               cgroup_limits = $9, extensions = $10, max_jobs = $12, seed = $13",
            &[
                &w.worker_id,
                &w.name,
                &w.address,
                &w.state.as_str(),
                &to_json(&w.plugins),
                &to_json(&w.labels),
                &(w.registered_at_ms as i64),
                &(w.last_seen_ms as i64),
                &w.cgroup_limits,
                &to_json(&w.extensions),
                &w.draining,
                &i64::from(w.max_jobs),
                &w.seed,
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn delete_worker(
        &self,
        worker_id: &str,
        name: &str,
        now_ms: u64,
    ) -> Result<Vec<String>, StoreError> {
        let _timer = timed!();
        let now = now_ms as i64;
        let mut c = self.client().await?;
        let tx = self.begin(&mut c).await?;
        tx.exec("DELETE FROM workers WHERE worker_id = $1", &[&worker_id])
            .await?;
        tx.exec(
            "INSERT INTO removed_workers (worker_id, name, removed_at_ms) VALUES ($1, $2, $3)
             ON CONFLICT (worker_id) DO UPDATE SET name = $2, removed_at_ms = $3",
            &[&worker_id, &name, &now],
        )
        .await?;
        let rows = tx.rows("UPDATE jobs SET state = 'lost', error_text = 'its worker was removed from the cluster',
               finished_at_ms = $2, updated_at_ms = $2
             WHERE worker_id = $1 AND state IN ('running', 'unknown') RETURNING job_id, command",
            &[&worker_id, &now],
        )
        .await?;
        let mut ended = Ended::default();
        let lost = ended_ids(worker_id, &rows, &mut ended)?;
        tx.exec("UPDATE jobs SET state = 'failed',
               error_text = 'the worker it was queued for was removed from the cluster; it never started',
               finished_at_ms = $2, updated_at_ms = $2
             WHERE state = 'queued' AND job_id IN (SELECT job_id FROM queue WHERE worker_id = $1)",
            &[&worker_id, &now],
        )
        .await?;
        tx.exec(
            "DELETE FROM queue WHERE worker_id = $1
               AND job_id IN (SELECT job_id FROM jobs WHERE state = 'failed')",
            &[&worker_id],
        )
        .await?;
        tx.commit().await?;
        ended.committed();
        Ok(lost)
    }

    async fn removed_worker_ids(&self) -> Result<Vec<String>, StoreError> {
        let _timer = timed!();
        let rows = self
            .rows("SELECT worker_id FROM removed_workers", &[])
            .await?;
        rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
    }

    async fn set_worker_state(
        &self,
        worker_id: &str,
        state: WorkerState,
        last_seen_ms: u64,
        registration: Option<u64>,
    ) -> Result<(), StoreError> {
        let _timer = timed!();
        let registration = registration.map(|ms| ms as i64);
        self.write_one(
            "UPDATE workers SET state = $2, last_seen_ms = $3 WHERE worker_id = $1
               AND ($4::BIGINT IS NULL OR (registered_at_ms = $4 AND state <> 'left'))",
            &[
                &worker_id,
                &state.as_str(),
                &(last_seen_ms as i64),
                &registration,
            ],
        )
        .await?;
        Ok(())
    }

    async fn set_worker_draining(&self, worker_id: &str, draining: bool) -> Result<(), StoreError> {
        let _timer = timed!();
        self.write_one(
            "UPDATE workers SET draining = $2 WHERE worker_id = $1",
            &[&worker_id, &draining],
        )
        .await?;
        Ok(())
    }

    async fn workers(&self) -> Result<Vec<WorkerRow>, StoreError> {
        let _timer = timed!();
        let rows = self
            .rows(
                &format!("SELECT {WORKER_COLUMNS} FROM workers ORDER BY name"),
                &[],
            )
            .await?;
        rows.iter().map(worker_row).collect()
    }

    async fn insert_job(&self, j: JobRow, key: Option<NewKey>) -> Result<(), StoreError> {
        let _timer = timed!();
        self.record_job(&j, key.as_ref(), None).await.map(drop)
    }

    async fn insert_job_unless_ahead(
        &self,
        j: JobRow,
        key: Option<NewKey>,
        ahead: Ahead,
    ) -> Result<bool, StoreError> {
        let _timer = timed!();
        self.record_job(&j, key.as_ref(), Some(&ahead)).await
    }

    async fn update_job(&self, j: JobRow) -> Result<bool, StoreError> {
        let _timer = timed!();
        let mut c = self.client().await?;
        let tx = self.begin(&mut c).await?;
        let mut ended = Ended::default();
        let updated = update_job(&tx, &j, false, j.updated_at_ms, &mut ended).await? > 0;
        tx.commit().await?;
        ended.committed();
        Ok(updated)
    }

    async fn update_started(&self, j: JobRow) -> Result<bool, StoreError> {
        let _timer = timed!();
        let mut c = self.client().await?;
        let tx = self.begin(&mut c).await?;
        // As on SQLite, the answer to a start does not wait for its flush
        // (the job's record, flushed before the worker was asked, is the
        // promise): it commits without waiting for the WAL's sync, and is
        // visible to every scheduler at once.
        tx.exec("SET LOCAL synchronous_commit TO OFF", &[]).await?;
        let mut ended = Ended::default();
        let updated = update_job(&tx, &j, true, j.updated_at_ms, &mut ended).await? > 0;
        tx.commit().await?;
        ended.committed();
        Ok(updated)
    }

    async fn rekey_job(&self, job_id: &str, new_id: &str) -> Result<bool, StoreError> {
        let _timer = timed!();
        let mut c = self.client().await?;
        let tx = self.begin(&mut c).await?;
        let taken = tx
            .rows("SELECT 1 FROM jobs WHERE job_id = $1", &[&new_id])
            .await?;
        if !taken.is_empty() {
            return Ok(false);
        }
        // The queue's and the keys' references follow (ON UPDATE CASCADE).
        let moved = tx
            .exec(
                "UPDATE jobs SET job_id = $2 WHERE job_id = $1",
                &[&job_id, &new_id],
            )
            .await?;
        tx.commit().await?;
        Ok(moved == 1)
    }

    async fn delete_unstarted_job(&self, job_id: &str) -> Result<(), StoreError> {
        let _timer = timed!();
        let mut c = self.client().await?;
        let tx = self.begin(&mut c).await?;
        let deleted = tx
            .exec(
                "DELETE FROM jobs WHERE job_id = $1 AND state = 'unknown' AND started_at_ms = 0",
                &[&job_id],
            )
            .await?;
        if deleted > 0 {
            tx.exec("DELETE FROM idempotency_keys WHERE job_id = $1", &[&job_id])
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn fail_unstarted(&self, job_id: &str, why: &str) -> Result<(), StoreError> {
        let _timer = timed!();
        let now = now_ms() as i64;
        let mut c = self.client().await?;
        let tx = self.begin(&mut c).await?;
        tx.exec(
            "UPDATE jobs SET state = 'failed', error_text = $2, finished_at_ms = $3,
               updated_at_ms = $3
             WHERE job_id = $1 AND state = 'unknown' AND started_at_ms = 0",
            &[&job_id, &text(why), &now],
        )
        .await?;
        tx.exec("DELETE FROM queue WHERE job_id = $1", &[&job_id])
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn apply_reports(
        &self,
        worker_id: &str,
        reports: Vec<JobRow>,
        complete: bool,
        settled_before_ms: u64,
    ) -> Result<Vec<String>, StoreError> {
        let _timer = timed!();
        let mut c = self.client().await?;
        let tx = self.begin(&mut c).await?;
        let mut kill = Vec::new();
        let mut ended = Ended::default();
        for row in &reports {
            if update_job(&tx, row, false, now_ms(), &mut ended).await? > 0 {
                continue;
            }
            let recorded = tx
                .rows(
                    "SELECT state, worker_id FROM jobs WHERE job_id = $1",
                    &[&row.job_id],
                )
                .await?;
            let recorded = match recorded.first() {
                Some(r) => Some((job_state(r, 0)?, r.try_get::<_, String>(1)?)),
                None => None,
            };
            if super::must_kill(worker_id, row, recorded) {
                kill.push(row.job_id.clone());
            }
        }
        if complete {
            let reported: HashSet<&str> = reports.iter().map(|r| r.job_id.as_str()).collect();
            let open = tx
                .rows(
                    "SELECT job_id FROM jobs WHERE worker_id = $1
                   AND state IN ('running', 'unknown') AND created_at_ms < $2
                   AND job_id NOT IN (SELECT job_id FROM queue)",
                    &[&worker_id, &(settled_before_ms as i64)],
                )
                .await?;
            let now = now_ms() as i64;
            for r in &open {
                let job_id: String = r.try_get(0)?;
                if reported.contains(job_id.as_str()) {
                    continue;
                }
                let lost = tx.rows("UPDATE jobs SET state = 'lost', error_text = $2, finished_at_ms = $3, updated_at_ms = $3
                     WHERE job_id = $1 AND state IN ('running', 'unknown') RETURNING job_id, command",
                    &[&job_id, &"its worker came back without the job", &now],
                )
                .await?;
                ended_ids(worker_id, &lost, &mut ended)?;
                tracing::warn!(%job_id, %worker_id, "job lost: its worker came back without it");
            }
        }
        tx.commit().await?;
        ended.committed();
        Ok(kill)
    }

    async fn mark_unknown(&self, worker_id: &str, why: &str) -> Result<Vec<String>, StoreError> {
        let _timer = timed!();
        let mut c = self.client().await?;
        let tx = self.begin(&mut c).await?;
        let rows = tx
            .rows(
                "UPDATE jobs SET state = 'unknown', error_text = $2, updated_at_ms = $3
             WHERE worker_id = $1 AND state = 'running' RETURNING job_id",
                &[&worker_id, &text(why), &(now_ms() as i64)],
            )
            .await?;
        tx.commit().await?;
        rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
    }

    async fn mark_lost(&self, worker_id: &str, why: &str) -> Result<Vec<String>, StoreError> {
        let _timer = timed!();
        let mut c = self.client().await?;
        let tx = self.begin(&mut c).await?;
        // The worker's row is locked first: a registration committing on
        // another scheduler meanwhile is either seen (ready: nothing is
        // lost) or waits for this transaction.
        let ready = tx
            .rows(
                "SELECT 1 FROM workers WHERE worker_id = $1 AND state = 'ready' FOR SHARE",
                &[&worker_id],
            )
            .await?;
        if !ready.is_empty() {
            return Ok(Vec::new());
        }
        let rows = tx.rows("UPDATE jobs SET state = 'lost', error_text = $2, finished_at_ms = $3, updated_at_ms = $3
             WHERE worker_id = $1 AND state IN ('running', 'unknown')
               AND EXISTS (SELECT 1 FROM workers w WHERE w.worker_id = $1 AND w.state <> 'ready')
             RETURNING job_id, command",
            &[&worker_id, &text(why), &(now_ms() as i64)],
        )
        .await?;
        let mut ended = Ended::default();
        let lost = ended_ids(worker_id, &rows, &mut ended)?;
        tx.commit().await?;
        ended.committed();
        Ok(lost)
    }

    async fn mark_job_lost(
        &self,
        job_id: &str,
        worker_id: &str,
        why: &str,
    ) -> Result<(), StoreError> {
        let _timer = timed!();
        let mut c = self.client().await?;
        let tx = self.begin(&mut c).await?;
        let rows = tx.rows("UPDATE jobs SET state = 'lost', error_text = $2, finished_at_ms = $3, updated_at_ms = $3
             WHERE job_id = $1 AND worker_id = $4 AND state IN ('running', 'unknown')
               AND job_id NOT IN (SELECT job_id FROM queue) RETURNING worker_id, command",
            &[&job_id, &text(why), &(now_ms() as i64), &worker_id],
        )
        .await?;
        let mut ended = Ended::default();
        for r in &rows {
            ended.push(JobState::Lost, r.try_get(0)?, r.try_get(1)?);
        }
        tx.commit().await?;
        ended.committed();
        Ok(())
    }

    async fn unknown_jobs(
        &self,
        worker_id: &str,
        before_ms: u64,
        limit: u32,
    ) -> Result<Vec<JobRow>, StoreError> {
        let _timer = timed!();
        let rows = self
            .rows(
                &format!(
                    "SELECT {JOB_COLUMNS} FROM jobs WHERE worker_id = $1 AND state = 'unknown'
                   AND created_at_ms < $2 AND job_id NOT IN (SELECT job_id FROM queue)
                 ORDER BY seq LIMIT $3"
                ),
                &[&worker_id, &(before_ms as i64), &i64::from(limit)],
            )
            .await?;
        rows.iter().map(job_row).collect()
    }

    async fn workers_with_unknown_jobs(&self) -> Result<HashSet<String>, StoreError> {
        let _timer = timed!();
        let rows = self
            .rows(
                "SELECT DISTINCT worker_id FROM jobs WHERE state = 'unknown'",
                &[],
            )
            .await?;
        rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
    }

    async fn insert_group(&self, g: GroupRow, key: Option<NewKey>) -> Result<(), StoreError> {
        let _timer = timed!();
        let mut c = self.client().await?;
        let tx = self.begin(&mut c).await?;
        tx.exec("INSERT INTO groups (group_id, command, path, args, created_at_ms) VALUES ($1, $2, $3, $4, $5)",
            &[&g.group_id, &text(&g.command), &text(&g.path), &to_json(&g.args), &(g.created_at_ms as i64)],
        )
        .await?;
        if let Some(key) = &key
            && !bind_key(&tx, key, None, Some(&g.group_id)).await?
        {
            return Err(StoreError::KeyTaken(key.key.clone()));
        }
        tx.commit().await?;
        Ok(())
    }

    async fn record_group_failures(
        &self,
        group_id: &str,
        failed: Vec<jobcluster_proto::http::GroupFailure>,
    ) -> Result<(), StoreError> {
        let _timer = timed!();
        self.write_one(
            "UPDATE groups SET failed = $2 WHERE group_id = $1",
            &[&group_id, &to_json(&failed)],
        )
        .await?;
        Ok(())
    }

    async fn unbind_group_key(&self, key: &str, group_id: &str) -> Result<(), StoreError> {
        let _timer = timed!();
        self.write_one(
            "DELETE FROM idempotency_keys WHERE key = $1 AND group_id = $2",
            &[&key, &group_id],
        )
        .await?;
        Ok(())
    }

    async fn idempotency_key(
        &self,
        key: &str,
        expired_before_ms: u64,
    ) -> Result<Option<KeyRow>, StoreError> {
        let _timer = timed!();
        let rows = self
            .rows(
                &format!(
                "SELECT {KEY_COLUMNS} FROM idempotency_keys WHERE key = $1 AND created_at_ms >= $2"
            ),
            &[&key, &(expired_before_ms as i64)],
        )
        .await?;
        rows.first().map(key_row).transpose()
    }

    async fn prune_idempotency_keys(
        &self,
        expired_before_ms: u64,
        limit: u32,
    ) -> Result<usize, StoreError> {
        let _timer = timed!();
        let n = self
            .write_one(
                "DELETE FROM idempotency_keys WHERE key IN (
                   SELECT key FROM idempotency_keys WHERE created_at_ms < $1 LIMIT $2)",
                &[&(expired_before_ms as i64), &i64::from(limit)],
            )
            .await?;
        Ok(n as usize)
    }

    async fn group(&self, group_id: &str) -> Result<Option<(GroupRow, Vec<JobRow>)>, StoreError> {
        let _timer = timed!();
        let groups = self
            .rows(
                &format!("SELECT {GROUP_COLUMNS} FROM groups WHERE group_id = $1"),
                &[&group_id],
            )
            .await?;
        let Some(group) = groups.first() else {
            return Ok(None);
        };
        let group = group_row(group)?;
        let jobs = self
            .rows(
                &format!(
                    "SELECT {JOB_COLUMNS_WITHOUT_ARGS} FROM jobs WHERE group_id = $1 ORDER BY seq"
                ),
                &[&group_id],
            )
            .await?;
        let jobs = jobs.iter().map(job_row).collect::<Result<_, _>>()?;
        Ok(Some((group, jobs)))
    }

    async fn groups(&self, limit: u32) -> Result<Vec<GroupRow>, StoreError> {
        let _timer = timed!();
        let rows = self
            .rows(
                &format!(
                    "SELECT {GROUP_COLUMNS_WITHOUT_ARGS} FROM groups ORDER BY seq DESC LIMIT $1"
                ),
                &[&i64::from(limit)],
            )
            .await?;
        rows.iter().map(group_row).collect()
    }

    async fn prune_finished(&self, before_ms: u64, batch: u32) -> Result<usize, StoreError> {
        let _timer = timed!();
        let (before, batch) = (before_ms as i64, i64::from(batch));
        let mut c = self.client().await?;
        let tx = self.begin(&mut c).await?;
        let jobs = tx
            .exec(
                "DELETE FROM jobs WHERE seq IN (
               SELECT seq FROM jobs
               WHERE state IN ('succeeded', 'failed', 'stopped', 'lost')
                 AND finished_at_ms < $1 AND finished_at_ms > 0
               LIMIT $2)",
                &[&before, &batch],
            )
            .await?;
        tx.exec(
            "DELETE FROM groups WHERE seq IN (
               SELECT seq FROM groups g WHERE created_at_ms < $1
                 AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.group_id = g.group_id)
               LIMIT $2)",
            &[&before, &batch],
        )
        .await?;
        tx.commit().await?;
        Ok(jobs as usize)
    }

    async fn close(&self) -> Result<(), StoreError> {
        self.pool.close();
        Ok(())
    }

    async fn probe(&self) -> Result<(), StoreError> {
        let _timer = timed!();
        let stamp = now_ms() as i64;
        let mut c = self.client().await?;
        let tx = self.begin(&mut c).await?;
        tx.exec(
            "INSERT INTO health_probe (id, at_ms) VALUES (1, $1)
             ON CONFLICT (id) DO UPDATE SET at_ms = $1",
            &[&stamp],
        )
        .await?;
        let read: i64 = tx
            .query_one("SELECT at_ms FROM health_probe WHERE id = 1", &[])
            .await?
            .try_get(0)?;
        tx.commit().await?;
        if read != stamp {
            return Err(StoreError::Corrupt(
                "the health probe read back another value than it wrote".into(),
            ));
        }
        Ok(())
    }

    async fn job(&self, job_id: &str) -> Result<Option<JobRow>, StoreError> {
        let _timer = timed!();
        let rows = self
            .rows(
                &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = $1"),
                &[&job_id],
            )
            .await?;
        rows.first().map(job_row).transpose()
    }

    async fn jobs(&self, q: JobQuery) -> Result<(Vec<JobRow>, Option<i64>), StoreError> {
        let _timer = timed!();
        let c = self.client().await?;
        let state = q.state.map(JobState::as_str);
        let rows = c
            .rows(
                &format!(
                    "SELECT {JOB_COLUMNS_WITHOUT_ARGS}, seq FROM jobs
                 WHERE ($1::TEXT IS NULL OR worker_id = $1) AND ($2::TEXT IS NULL OR state = $2)
                   AND ($3::BIGINT IS NULL OR seq < $3)
                 ORDER BY seq DESC LIMIT $4"
                ),
                &[&q.worker_id, &state, &q.before, &(i64::from(q.limit) + 1)],
            )
            .await?;
        let mut rows = rows
            .iter()
            .map(|r| Ok((job_row(r)?, r.try_get::<_, i64>(15)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        let more = rows.len() > q.limit as usize;
        rows.truncate(q.limit as usize);
        let next = if more {
            rows.last().map(|(_, seq)| *seq)
        } else {
            None
        };
        Ok((rows.into_iter().map(|(j, _)| j).collect(), next))
    }

    async fn enqueue_job(
        &self,
        j: JobRow,
        q: QueueEntry,
        key: Option<NewKey>,
        max_queued: u64,
    ) -> Result<Option<u64>, StoreError> {
        let _timer = timed!();
        let mut c = self.client().await?;
        let tx = self.begin(&mut c).await?;
        // Schedulers enqueueing at once would each count the queue before
        // the other's insert and overshoot the bound: one enqueue at a time
        // (a lock of enqueues alone; the queue's other writers go on).
        tx.exec("SELECT pg_advisory_xact_lock($1)", &[&ENQUEUE_LOCK])
            .await?;
        let waiting: i64 = tx
            .rows("SELECT COUNT(*) FROM queue WHERE NOT dispatching", &[])
            .await?
            .first()
            .map(|r| r.try_get(0))
            .transpose()?
            .unwrap_or(0);
        if waiting as u64 >= max_queued {
            return Ok(None);
        }
        insert_job(&tx, &j).await?;
        tx.exec(
            "INSERT INTO queue (job_id, priority, queued_at_ms, worker_id, selector, env,
               deadline_ms, reason) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                &q.job_id,
                &q.priority,
                &(q.queued_at_ms as i64),
                &q.worker_id,
                &to_json(&q.selector),
                &to_json(&q.env),
                &(q.deadline_ms as i64),
                &q.reason,
            ],
        )
        .await?;
        if let Some(key) = &key
            && !bind_key(&tx, key, Some(&j.job_id), None).await?
        {
            return Err(StoreError::KeyTaken(key.key.clone()));
        }
        let position = position(&tx, &q.job_id).await?.unwrap_or(0);
        tx.commit().await?;
        Ok(Some(position))
    }

    async fn waiting_ahead(
        &self,
        priority: i32,
        worker_id: &str,
        limit: u32,
    ) -> Result<Vec<(JobRow, QueueEntry)>, StoreError> {
        let _timer = timed!();
        let c = self.client().await?;
        waiting_ahead(&*c, priority, worker_id, limit).await
    }

    async fn in_queue(&self, job_id: &str) -> Result<bool, StoreError> {
        let _timer = timed!();
        let rows = self
            .rows("SELECT 1 FROM queue WHERE job_id = $1", &[&job_id])
            .await?;
        Ok(!rows.is_empty())
    }

    async fn queue_entry(&self, job_id: &str) -> Result<Option<(QueueEntry, u64)>, StoreError> {
        let _timer = timed!();
        let rows = self
            .rows(
                &format!("SELECT {QUEUE_COLUMNS} FROM queue q WHERE q.job_id = $1"),
                &[&job_id],
            )
            .await?;
        let Some(entry) = rows.first() else {
            return Ok(None);
        };
        let entry = queue_row(entry)?;
        let c = self.client().await?;
        Ok(position(&*c, job_id).await?.map(|p| (entry, p)))
    }

    async fn queued(
        &self,
        skip: u64,
        limit: u32,
        worker_id: Option<String>,
    ) -> Result<Vec<(JobRow, QueueEntry)>, StoreError> {
        let _timer = timed!();
        let rows = self
            .rows(
                &format!(
                    "SELECT {QUEUED_JOB_HEAD_COLUMNS} FROM queue q JOIN jobs j ON j.job_id = q.job_id
                 WHERE NOT q.dispatching AND ($3::TEXT IS NULL OR q.worker_id = $3)
                   AND j.state = 'queued'
                 ORDER BY q.priority DESC, q.seq LIMIT $1 OFFSET $2"
                ),
                &[&i64::from(limit), &(skip as i64), &worker_id],
            )
            .await?;
        rows.iter().map(queued_job_row).collect()
    }

    async fn dispatching(&self) -> Result<Vec<(JobRow, QueueEntry)>, StoreError> {
        let _timer = timed!();
        let rows = self
            .rows(
                &format!(
                    "SELECT {QUEUED_JOB_COLUMNS} FROM queue q JOIN jobs j ON j.job_id = q.job_id
                 WHERE q.dispatching ORDER BY q.seq"
                ),
                &[],
            )
            .await?;
        rows.iter().map(queued_job_row).collect()
    }

    async fn claim_queued(
        &self,
        job_id: &str,
        worker_id: &str,
        why: &str,
    ) -> Result<Option<(JobRow, super::Env)>, StoreError> {
        let _timer = timed!();
        let mut c = self.client().await?;
        let tx = self.begin(&mut c).await?;
        let claimed = tx
            .rows(
                &format!(
                    "UPDATE jobs SET state = 'unknown', worker_id = $2, error_text = $3,
                   created_at_ms = $4, updated_at_ms = $4
                 WHERE job_id = $1 AND state = 'queued' RETURNING {JOB_COLUMNS}"
                ),
                &[&job_id, &worker_id, &text(why), &(now_ms() as i64)],
            )
            .await?;
        let claimed = match claimed.first().map(job_row).transpose()? {
            Some(row) => {
                let rows = tx
                    .rows(
                        "UPDATE queue SET dispatching = true WHERE job_id = $1 RETURNING env",
                        &[&job_id],
                    )
                    .await?;
                let env: String = match rows.first() {
                    Some(r) => r.try_get(0)?,
                    None => String::new(),
                };
                Some((row, super::from_json(&env)))
            }
            None => None,
        };
        tx.commit().await?;
        Ok(claimed)
    }

    async fn requeue(&self, job_id: &str, reason: &str) -> Result<bool, StoreError> {
        let _timer = timed!();
        let mut c = self.client().await?;
        let tx = self.begin(&mut c).await?;
        let n = tx
            .exec(
                "UPDATE jobs SET state = 'queued', error_text = '',
               worker_id = (SELECT worker_id FROM queue WHERE job_id = $1),
               created_at_ms = (SELECT queued_at_ms FROM queue WHERE job_id = $1),
               updated_at_ms = $2
             WHERE job_id = $1 AND state = 'unknown' AND started_at_ms = 0
               AND EXISTS (SELECT 1 FROM queue WHERE job_id = $1)",
                &[&job_id, &(now_ms() as i64)],
            )
            .await?;
        if n > 0 {
            tx.exec(
                "UPDATE queue SET reason = $2, dispatching = false WHERE job_id = $1",
                &[&job_id, &text(reason)],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(n > 0)
    }

    async fn dequeue(&self, job_id: &str) -> Result<(), StoreError> {
        let _timer = timed!();
        let mut c = self.client().await?;
        let tx = self.begin(&mut c).await?;
        tx.exec("DELETE FROM queue WHERE job_id = $1", &[&job_id])
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn set_queue_reason(&self, job_id: &str, reason: &str) -> Result<(), StoreError> {
        let _timer = timed!();
        self.write_one(
            "UPDATE queue SET reason = $2 WHERE job_id = $1",
            &[&job_id, &text(reason)],
        )
        .await?;
        Ok(())
    }

    async fn stop_queued(&self, job_id: &str) -> Result<bool, StoreError> {
        let _timer = timed!();
        let mut c = self.client().await?;
        let tx = self.begin(&mut c).await?;
        let n = tx.exec("UPDATE jobs SET state = 'stopped', error_text = 'stopped while queued; it never started',
               finished_at_ms = $2, updated_at_ms = $2
             WHERE job_id = $1 AND state = 'queued'",
            &[&job_id, &(now_ms() as i64)],
        )
        .await?;
        if n > 0 {
            tx.exec("DELETE FROM queue WHERE job_id = $1", &[&job_id])
                .await?;
        }
        tx.commit().await?;
        Ok(n > 0)
    }

    async fn expire_queued(&self, now: u64) -> Result<Vec<String>, StoreError> {
        let _timer = timed!();
        let now = now as i64;
        let mut c = self.client().await?;
        let tx = self.begin(&mut c).await?;
        let due = tx
            .rows(
                "SELECT q.job_id, q.queued_at_ms, q.deadline_ms FROM queue q
             JOIN jobs j ON j.job_id = q.job_id
             WHERE q.deadline_ms > 0 AND q.deadline_ms <= $1 AND j.state = 'queued'",
                &[&now],
            )
            .await?;
        let mut expired = Vec::with_capacity(due.len());
        for r in &due {
            let (id, queued_at, deadline): (String, i64, i64) =
                (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
            let why = super::queue_timeout_text(queued_at as u64, deadline as u64);
            tx.exec(
                "UPDATE jobs SET state = 'failed', error_text = $2, finished_at_ms = $3,
                   updated_at_ms = $3 WHERE job_id = $1 AND state = 'queued'",
                &[&id, &why, &now],
            )
            .await?;
            tx.exec("DELETE FROM queue WHERE job_id = $1", &[&id])
                .await?;
            expired.push(id);
        }
        tx.commit().await?;
        Ok(expired)
    }

    async fn queue_is_empty(&self) -> Result<bool, StoreError> {
        let _timer = timed!();
        let c = self.client().await?;
        Ok(c.query_one("SELECT NOT EXISTS (SELECT 1 FROM queue)", &[])
            .await?
            .try_get(0)?)
    }

    async fn queue_length(&self) -> Result<u64, StoreError> {
        let _timer = timed!();
        let c = self.client().await?;
        let n: i64 = c
            .query_one(
                "SELECT COUNT(*) FROM queue q JOIN jobs j ON j.job_id = q.job_id
                 WHERE j.state = 'queued'",
                &[],
            )
            .await?
            .try_get(0)?;
        Ok(n as u64)
    }

    async fn running_counts(&self) -> Result<HashMap<String, u64>, StoreError> {
        let _timer = timed!();
        let rows = self.rows("SELECT worker_id, COUNT(*) FROM jobs WHERE state IN ('running', 'unknown') GROUP BY worker_id",
            &[],
        )
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get::<_, i64>(1)? as u64)))
            .collect()
    }
}

/// Statements prepared once per connection (the pool keeps each
/// connection's), on a connection or in a transaction.
trait Cached: Sync {
    fn exec<'a>(
        &'a self,
        sql: &'a str,
        params: &'a [&'a (dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<u64, StoreError>> + Send + 'a;

    fn rows<'a>(
        &'a self,
        sql: &'a str,
        params: &'a [&'a (dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Vec<Row>, StoreError>> + Send + 'a;
}

macro_rules! cached {
    ($type:ty) => {
        impl Cached for $type {
            fn exec<'a>(
                &'a self,
                sql: &'a str,
                params: &'a [&'a (dyn ToSql + Sync)],
            ) -> impl Future<Output = Result<u64, StoreError>> + Send + 'a {
                async move {
                    let statement = self.prepare_cached(sql).await?;
                    Ok(self.execute(&statement, params).await?)
                }
            }

            fn rows<'a>(
                &'a self,
                sql: &'a str,
                params: &'a [&'a (dyn ToSql + Sync)],
            ) -> impl Future<Output = Result<Vec<Row>, StoreError>> + Send + 'a {
                async move {
                    let statement = self.prepare_cached(sql).await?;
                    Ok(self.query(&statement, params).await?)
                }
            }
        }
    };
}

cached!(deadpool_postgres::ClientWrapper);
cached!(deadpool_postgres::Transaction<'_>);

/// Whether a queued job of `priority` or higher named to `worker_id` waits
/// (through the partial index `queue_named`).
async fn named_waiting(
    c: &impl Cached,
    priority: i32,
    worker_id: &str,
) -> Result<bool, StoreError> {
    let rows = c
        .rows(
            "SELECT 1 FROM queue WHERE NOT dispatching AND worker_id <> '' AND worker_id = $1
               AND priority >= $2 LIMIT 1",
            &[&worker_id, &priority],
        )
        .await?;
    Ok(!rows.is_empty())
}

/// The queued jobs a new job of `priority` for `worker_id` may wait behind
/// ([`Ahead`]).
async fn waiting_ahead(
    c: &impl Cached,
    priority: i32,
    worker_id: &str,
    limit: u32,
) -> Result<Vec<(JobRow, QueueEntry)>, StoreError> {
    let rows = c
        .rows(
            &format!(
                "SELECT {QUEUED_JOB_HEAD_COLUMNS} FROM queue q JOIN jobs j ON j.job_id = q.job_id
                 WHERE NOT q.dispatching AND q.priority >= $1 AND j.state = 'queued'
                   AND (q.worker_id = '' OR q.worker_id = $2)
                 ORDER BY q.priority DESC, q.seq LIMIT $3"
            ),
            &[&priority, &worker_id, &i64::from(limit)],
        )
        .await?;
    rows.iter().map(queued_job_row).collect()
}

/// See the SQLite store's `insert_job`: a report that arrived first keeps
/// its state, and the request's fields fill in.
async fn insert_job(c: &impl Cached, j: &JobRow) -> Result<(), StoreError> {
    c.exec(
        "INSERT INTO jobs (job_id, worker_id, command, path, args, state, error_text, exit_code,
           signal, created_at_ms, started_at_ms, finished_at_ms, output_bytes, group_id,
           updated_at_ms)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
         ON CONFLICT (job_id) DO UPDATE SET command = excluded.command,
           path = excluded.path, args = excluded.args,
           created_at_ms = excluded.created_at_ms,
           group_id = COALESCE(excluded.group_id, jobs.group_id)",
        &[
            &j.job_id,
            &j.worker_id,
            &text(&j.command),
            &text(&j.path),
            &to_json(&j.args),
            &j.state.as_str(),
            &text(&j.error_text),
            &j.exit_code,
            &j.signal,
            &(j.created_at_ms as i64),
            &(j.started_at_ms as i64),
            &(j.finished_at_ms as i64),
            &(j.output_bytes as i64),
            &j.group_id,
            &(now_ms() as i64),
        ],
    )
    .await?;
    Ok(())
}

/// Binds `key`, replacing an expired binding; false if a live one holds it.
async fn bind_key(
    c: &impl Cached,
    key: &NewKey,
    job_id: Option<&str>,
    group_id: Option<&str>,
) -> Result<bool, StoreError> {
    let written = c
        .exec(
            "INSERT INTO idempotency_keys (key, route, body_sha256, job_id, group_id, created_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (key) DO UPDATE SET route = excluded.route,
               body_sha256 = excluded.body_sha256, job_id = excluded.job_id,
               group_id = excluded.group_id, created_at_ms = excluded.created_at_ms
             WHERE idempotency_keys.created_at_ms < $7",
            &[
                &key.key,
                &key.route,
                &key.body_sha256,
                &job_id,
                &group_id,
                &(key.created_at_ms as i64),
                &(key.expired_before_ms as i64),
            ],
        )
        .await?;
    Ok(written > 0)
}

/// See the SQLite store's `update_job`: only the reporting worker's job,
/// and never a terminal state; `at` is the record's new `updated_at_ms`.
async fn update_job(
    c: &impl Cached,
    j: &JobRow,
    first: bool,
    at: u64,
    ended: &mut Ended,
) -> Result<u64, StoreError> {
    let n = c
        .exec(
            "UPDATE jobs SET state = $2, error_text = $3, exit_code = $4, signal = $5,
               started_at_ms = $6, finished_at_ms = $7, output_bytes = $8, updated_at_ms = $10,
               command = CASE WHEN command = '' THEN $11 ELSE command END
             WHERE job_id = $1 AND worker_id = $9
               AND state NOT IN ('queued', 'succeeded', 'failed', 'stopped', 'lost')
               AND (NOT $12 OR (state = 'unknown' AND started_at_ms = 0))",
            &[
                &j.job_id,
                &j.state.as_str(),
                &text(&j.error_text),
                &j.exit_code,
                &j.signal,
                &(j.started_at_ms as i64),
                &(j.finished_at_ms as i64),
                &(j.output_bytes as i64),
                &j.worker_id,
                &(at as i64),
                &text(&j.command),
                &first,
            ],
        )
        .await?;
    if n > 0 && j.state.is_terminal() {
        ended.push(j.state, &j.worker_id, &j.command);
    }
    Ok(n)
}

/// How many queued jobs go before `job_id` (None: it is not queued).
async fn position(c: &impl Cached, job_id: &str) -> Result<Option<u64>, StoreError> {
    let rows = c
        .rows(
            "SELECT (SELECT COUNT(*) FROM queue q2 WHERE NOT q2.dispatching AND q2.priority > q.priority)
                  + (SELECT COUNT(*) FROM queue q3
                     WHERE NOT q3.dispatching AND q3.priority = q.priority AND q3.seq < q.seq)
             FROM queue q JOIN jobs j ON j.job_id = q.job_id
             WHERE q.job_id = $1 AND NOT q.dispatching AND j.state = 'queued'",
            &[&job_id],
        )
        .await?;
    rows.first()
        .map(|r| Ok(r.try_get::<_, i64>(0)? as u64))
        .transpose()
}

/// The ids of jobs an `UPDATE ... RETURNING job_id, command` ended `lost`,
/// counted for the metrics.
fn ended_ids(worker_id: &str, rows: &[Row], ended: &mut Ended) -> Result<Vec<String>, StoreError> {
    rows.iter()
        .map(|r| {
            ended.push(JobState::Lost, worker_id, r.try_get(1)?);
            Ok(r.try_get(0)?)
        })
        .collect()
}

/// Free text as PostgreSQL's `TEXT` takes it: it refuses NUL, which SQLite
/// keeps, and a report or a request carrying one must not fail its whole
/// write (a path with one is refused by its worker afterwards).
fn text(value: &str) -> std::borrow::Cow<'_, str> {
    if value.contains('\0') {
        value.replace('\0', "\u{fffd}").into()
    } else {
        value.into()
    }
}
