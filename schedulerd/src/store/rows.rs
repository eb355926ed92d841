//! Rows to records, once for both stores: each store's row type says how
//! to read one column ([`Columns`]); which column is which field is here,
//! with the column lists the queries select.

use super::{GroupRow, JobRow, KeyRow, QueueEntry, WorkerRow, from_json, small_map};
use crate::state::{JobState, WorkerState};

/// Reading one column of a result row, as a store's driver does it.
pub(crate) trait Columns {
    type Error;
    fn text(&self, at: usize) -> Result<String, Self::Error>;
    fn maybe_text(&self, at: usize) -> Result<Option<String>, Self::Error>;
    /// An `INTEGER` of SQLite, a `BIGINT` of PostgreSQL.
    fn int(&self, at: usize) -> Result<i64, Self::Error>;
    /// An `INTEGER` of both.
    fn int32(&self, at: usize) -> Result<i32, Self::Error>;
    fn maybe_int32(&self, at: usize) -> Result<Option<i32>, Self::Error>;
    fn flag(&self, at: usize) -> Result<bool, Self::Error>;
    /// A value no record can hold (a state that does not exist).
    fn unreadable(at: usize, what: String) -> Self::Error;
}

impl Columns for rusqlite::Row<'_> {
    type Error = rusqlite::Error;
    fn text(&self, at: usize) -> rusqlite::Result<String> {
        self.get(at)
    }
    fn maybe_text(&self, at: usize) -> rusqlite::Result<Option<String>> {
        self.get(at)
    }
    fn int(&self, at: usize) -> rusqlite::Result<i64> {
        self.get(at)
    }
    fn int32(&self, at: usize) -> rusqlite::Result<i32> {
        self.get(at)
    }
    fn maybe_int32(&self, at: usize) -> rusqlite::Result<Option<i32>> {
        self.get(at)
    }
    fn flag(&self, at: usize) -> rusqlite::Result<bool> {
        self.get(at)
    }
    fn unreadable(at: usize, what: String) -> rusqlite::Error {
        rusqlite::Error::FromSqlConversionFailure(at, rusqlite::types::Type::Text, what.into())
    }
}

impl Columns for tokio_postgres::Row {
    type Error = super::StoreError;
    fn text(&self, at: usize) -> Result<String, Self::Error> {
        Ok(self.try_get(at)?)
    }
    fn maybe_text(&self, at: usize) -> Result<Option<String>, Self::Error> {
        Ok(self.try_get(at)?)
    }
    fn int(&self, at: usize) -> Result<i64, Self::Error> {
        Ok(self.try_get(at)?)
    }
    fn int32(&self, at: usize) -> Result<i32, Self::Error> {
        Ok(self.try_get(at)?)
    }
    fn maybe_int32(&self, at: usize) -> Result<Option<i32>, Self::Error> {
        Ok(self.try_get(at)?)
    }
    fn flag(&self, at: usize) -> Result<bool, Self::Error> {
        Ok(self.try_get(at)?)
    }
    fn unreadable(at: usize, what: String) -> Self::Error {
        super::StoreError::Corrupt(format!("{what} (column {at})"))
    }
}

fn ms<R: Columns>(r: &R, at: usize) -> Result<u64, R::Error> {
    Ok(r.int(at)? as u64)
}

pub(crate) fn job_state<R: Columns>(r: &R, at: usize) -> Result<JobState, R::Error> {
    let text = r.text(at)?;
    JobState::parse(&text).ok_or_else(|| R::unreadable(at, format!("job state {text:?}")))
}

pub(crate) const WORKER_COLUMNS: &str = "worker_id, name, address, state, plugins, labels,
    registered_at_ms, last_seen_ms, cgroup_limits, extensions, draining, max_jobs, seed";

pub(crate) fn worker_row<R: Columns>(r: &R) -> Result<WorkerRow, R::Error> {
    let state = r.text(3)?;
    Ok(WorkerRow {
        worker_id: r.text(0)?,
        name: r.text(1)?,
        address: r.text(2)?,
        state: WorkerState::parse(&state)
            .ok_or_else(|| R::unreadable(3, format!("worker state {state:?}")))?,
        plugins: from_json(&r.text(4)?),
        labels: small_map(from_json(&r.text(5)?)),
        registered_at_ms: ms(r, 6)?,
        last_seen_ms: ms(r, 7)?,
        cgroup_limits: r.flag(8)?,
        extensions: small_map(from_json(&r.text(9)?)),
        draining: r.flag(10)?,
        max_jobs: u32::try_from(r.int(11)?).unwrap_or(u32::MAX),
        seed: r.flag(12)?,
    })
}

pub(crate) const JOB_COLUMNS: &str =
    "job_id, worker_id, command, path, args, state, error_text, exit_code, signal,
    created_at_ms, started_at_ms, finished_at_ms, output_bytes, group_id, updated_at_ms";

/// As [`JOB_COLUMNS`], with `args` read as empty.
pub(crate) const JOB_COLUMNS_WITHOUT_ARGS: &str =
    "job_id, worker_id, command, path, '[]', state, error_text, exit_code, signal,
    created_at_ms, started_at_ms, finished_at_ms, output_bytes, group_id, updated_at_ms";

pub(crate) fn job_row<R: Columns>(r: &R) -> Result<JobRow, R::Error> {
    Ok(JobRow {
        job_id: r.text(0)?,
        worker_id: r.text(1)?,
        command: r.text(2)?,
        path: r.text(3)?,
        args: from_json(&r.text(4)?),
        state: job_state(r, 5)?,
        error_text: r.text(6)?,
        exit_code: r.maybe_int32(7)?,
        signal: r.maybe_int32(8)?,
        created_at_ms: ms(r, 9)?,
        started_at_ms: ms(r, 10)?,
        finished_at_ms: ms(r, 11)?,
        output_bytes: ms(r, 12)?,
        group_id: r.maybe_text(13)?,
        updated_at_ms: ms(r, 14)?,
    })
}

pub(crate) const GROUP_COLUMNS: &str = "group_id, command, path, args, created_at_ms, failed";

/// [`GROUP_COLUMNS`] without the args (read as empty), for listings.
pub(crate) const GROUP_COLUMNS_WITHOUT_ARGS: &str =
    "group_id, command, path, CAST('[]' AS TEXT), created_at_ms, failed";

pub(crate) fn group_row<R: Columns>(r: &R) -> Result<GroupRow, R::Error> {
    Ok(GroupRow {
        group_id: r.text(0)?,
        command: r.text(1)?,
        path: r.text(2)?,
        args: from_json(&r.text(3)?),
        created_at_ms: ms(r, 4)?,
        failed: from_json(&r.text(5)?),
    })
}

pub(crate) const QUEUE_COLUMNS: &str =
    "q.job_id, q.priority, q.queued_at_ms, q.worker_id, q.selector, q.env, q.deadline_ms, q.reason";

pub(crate) fn queue_row<R: Columns>(r: &R) -> Result<QueueEntry, R::Error> {
    queue_row_at(r, 0)
}

fn queue_row_at<R: Columns>(r: &R, at: usize) -> Result<QueueEntry, R::Error> {
    Ok(QueueEntry {
        job_id: r.text(at)?,
        priority: r.int32(at + 1)?,
        queued_at_ms: ms(r, at + 2)?,
        worker_id: r.text(at + 3)?,
        selector: from_json(&r.text(at + 4)?),
        env: from_json(&r.text(at + 5)?),
        deadline_ms: ms(r, at + 6)?,
        reason: r.text(at + 7)?,
    })
}

/// A job and its queue entry, as [`QUEUED_JOB_COLUMNS`] selects them.
pub(crate) const QUEUED_JOB_COLUMNS: &str =
    "j.job_id, j.worker_id, j.command, j.path, j.args, j.state,
    j.error_text, j.exit_code, j.signal, j.created_at_ms, j.started_at_ms, j.finished_at_ms,
    j.output_bytes, j.group_id, j.updated_at_ms, q.job_id, q.priority, q.queued_at_ms,
    q.worker_id, q.selector, q.env, q.deadline_ms, q.reason";

/// [`QUEUED_JOB_COLUMNS`] without the job's `args` and the entry's `env`
/// (read as empty): what orders, places and lists queued jobs, which never
/// needs them. Each may be hundreds of KiB, and these reads take up to a
/// thousand rows (a listing page, a dispatcher pass), some inside a start's
/// write transaction. The dispatcher takes the env of the job it claims
/// ([`crate::store::Store::claim_queued`]).
pub(crate) const QUEUED_JOB_HEAD_COLUMNS: &str =
    "j.job_id, j.worker_id, j.command, j.path, CAST('[]' AS TEXT), j.state,
    j.error_text, j.exit_code, j.signal, j.created_at_ms, j.started_at_ms, j.finished_at_ms,
    j.output_bytes, j.group_id, j.updated_at_ms, q.job_id, q.priority, q.queued_at_ms,
    q.worker_id, q.selector, CAST('{}' AS TEXT), q.deadline_ms, q.reason";

pub(crate) fn queued_job_row<R: Columns>(r: &R) -> Result<(JobRow, QueueEntry), R::Error> {
    Ok((job_row(r)?, queue_row_at(r, 15)?))
}

pub(crate) const KEY_COLUMNS: &str = "key, route, body_sha256, job_id, group_id, created_at_ms";

pub(crate) fn key_row<R: Columns>(r: &R) -> Result<KeyRow, R::Error> {
    Ok(KeyRow {
        key: r.text(0)?,
        route: r.text(1)?,
        body_sha256: r.text(2)?,
        job_id: r.maybe_text(3)?,
        group_id: r.maybe_text(4)?,
        created_at_ms: ms(r, 5)?,
    })
}
