//! Jobs: spawning, supervising, stopping, recording, and their output log.
//!
//! Each job runs in its own process group with stdout and stderr joined on
//! one pipe, so the output log keeps the exact order the job wrote in. A
//! pump task copies the pipe to `output.log` and publishes the new length on
//! a `watch` channel; followers read the file from their own offset and wake
//! on that channel, so a slow follower never slows the job or anyone else.
//!
//! - `record`: the job record (`job.json`), its states, writing and loading.
//! - `spawn`: validating a start and spawning the process.
//! - `output`: the pump from the job's pipe to its log, and reads of the log.
//! - `supervise`: waiting for the end, stopping, killing what is left.
//! - `kill`: finding every process of a job, escaped ones too, and killing them.
//! - `reap`: workerd as a child subreaper, reaping orphaned job processes.
//! - `registry`: [`Jobs`], the worker's jobs and what changed among them.

mod dirsync;
mod kill;
mod output;
mod process;
mod reap;
mod record;
mod registry;
mod spare;
mod spawn;
mod supervise;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::RunAs;
use crate::confine::PathError;

pub(crate) use output::{open_log, read_at};
pub(crate) use reap::{become_subreaper, reap_orphans};
pub(crate) use record::{
    JobRecord, State, expire_output, now_ms, output_cut, write_atomically, write_durably,
};
pub(crate) use record::{LOG, RECORD};
pub(crate) use registry::{Jobs, REPORTS_PER_CALL};

/// Largest piece of output sent to a follower in one message. Each piece
/// costs a read on the blocking pool, a channel hand-over and a wake-up of
/// the connection's task at both ends of each hop, so pieces are large; a
/// follower holds at most `STREAM_BUFFER` of them (service.rs) besides what
/// HTTP/2 flow control lets through.
pub(crate) const CHUNK: usize = 256 * 1024;

/// Largest piece the pump reads from a job's pipe and writes to its log at
/// once, and the pipe's capacity it asks for once the job's output filled
/// the default 64 KiB pipe (within the kernel's `fs.pipe-max-size`, 1 MiB
/// by default). With the default pipe a job writing fast blocks and is
/// woken every 64 KiB, and every piece costs a write on the blocking pool.
/// Unfollowed, a job's buffer is allocated once and only the pages its
/// output reaches are ever touched; while it is followed, the piece last
/// published (`Progress::tail`) holds the buffer it came from, so the
/// pump takes a new one whenever a quarter is left: at most two per job.
pub(crate) const PUMP_BUFFER: usize = 1024 * 1024;

/// How far the output log has been written, and whether it is complete.
#[derive(Debug, Clone, Default)]
pub(crate) struct Progress {
    pub(crate) len: u64,
    pub(crate) done: bool,
    /// The pump's last piece, the log's bytes up to `len`, while the job
    /// runs and someone may follow it: a follower that has everything
    /// before it copies it from here instead of reading it back from the
    /// log (a trip to the blocking pool and a system call per piece).
    /// Empty once the job is done.
    pub(crate) tail: bytes::Bytes,
}

impl Progress {
    /// Up to `max` bytes from `pos` out of [`Progress::tail`], if `pos`
    /// lies in it: a slice, which keeps the pump's whole buffer (1 MiB)
    /// alive while held, so a follower copies it before sending.
    pub(crate) fn tail_at(&self, pos: u64, max: usize) -> Option<bytes::Bytes> {
        let start = self.len.checked_sub(self.tail.len() as u64)?;
        let from = usize::try_from(pos.checked_sub(start)?).ok()?;
        if from >= self.tail.len() {
            return None;
        }
        Some(
            self.tail
                .slice(from..self.tail.len().min(from.saturating_add(max))),
        )
    }
}

/// Why a job request was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum JobError {
    #[error("invalid path: {0}")]
    Path(#[from] PathError),
    #[error("unknown plugin {name:?}: this worker offers {offered}")]
    UnknownPlugin { name: String, offered: String },
    #[error("no plugin runs {path:?}: name one with `command` (this worker offers {offered})")]
    NoPluginForScript { path: String, offered: String },
    #[error("invalid job id {0:?}: expected a UUID")]
    BadJobId(String),
    #[error("unknown job {0}")]
    UnknownJob(String),
    #[error("job {0} already exists")]
    Exists(Uuid),
    #[error("job {0} is being started by another request; ask for it in a moment")]
    Starting(Uuid),
    #[error("invalid {what}: {reason}")]
    BadInput { what: &'static str, reason: String },
    #[error("plugin {plugin} refuses these request env variables: {refused}")]
    EnvNotAllowed {
        plugin: String,
        refused: jobcluster_plugins::EnvRefused,
    },
    #[error("request too large: {0}")]
    TooLarge(String),
    #[error("the worker is shutting down and takes no new jobs")]
    ShuttingDown,
    #[error("the worker already runs its maximum of {0} jobs; try later or another worker")]
    Busy(usize),
    #[error("offset {offset} is past the end of the output ({len} bytes)")]
    OffsetPastEnd { offset: u64, len: u64 },
    #[error("the output of job {0} was deleted by the worker's retention limits")]
    OutputExpired(Uuid),
    #[error(
        "the worker's storage is full; nothing was started ({0}). Free space in its state_dir or use another worker"
    )]
    StorageFull(#[source] std::io::Error),
    #[error("worker storage: {0}")]
    Io(#[from] std::io::Error),
}

/// One job known to this worker, running or finished.
#[derive(Debug)]
pub(crate) struct Job {
    record: Mutex<JobRecord>,
    progress: watch::Sender<Progress>,
    /// Ends the job as stopped; a child of the worker's shutdown token.
    stop: CancellationToken,
    /// Ends the job as lost: the scheduler gave it up while this worker
    /// was cut off.
    given_up: CancellationToken,
    log_path: PathBuf,
}

impl Job {
    pub(crate) fn record(&self) -> JobRecord {
        // Poisoning only follows a panic elsewhere; the record is still whole.
        self.record
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }

    /// The log's length now and whether it is complete, read without
    /// subscribing: a subscriber counts as a possible follower, for whom
    /// the pump keeps its last piece (`Progress::tail`).
    pub(crate) fn progress_now(&self) -> (u64, bool) {
        let now = self.progress.borrow();
        (now.len, now.done)
    }

    pub(crate) fn log_path(&self) -> &Path {
        &self.log_path
    }

    fn update(&self, f: impl FnOnce(&mut JobRecord)) -> JobRecord {
        let mut record = self.record.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut record);
        record.clone()
    }
}

impl JobError {
    /// A storage error while creating a job's files: "full" when the disk
    /// or quota is, so the caller knows to go elsewhere.
    fn storage(error: std::io::Error) -> JobError {
        match record::storage_full(&error) {
            true => JobError::StorageFull(error),
            false => JobError::Io(error),
        }
    }
}

/// What a StartJob asks for, before validation.
#[derive(Debug)]
pub(crate) struct StartRequest {
    pub(crate) job_id: String,
    pub(crate) command: String,
    pub(crate) path: String,
    pub(crate) args: Vec<String>,
    pub(crate) env: BTreeMap<String, String>,
}

/// How jobs may run on this worker.
#[derive(Debug, Clone, Default)]
pub(crate) struct Policy {
    /// Uid and gid per plugin, when jobs run as another user.
    pub(crate) run_as: BTreeMap<String, RunAs>,
    pub(crate) max_jobs: Option<usize>,
    /// The delegated cgroup v2 jobs get their groups in, if there is one.
    pub(crate) cgroups: Option<crate::cgroup::Cgroups>,
}

#[cfg(test)]
mod tests {
    use super::Progress;

    #[test]
    fn a_follower_takes_from_the_tail_only_what_lies_in_it() {
        let p = Progress {
            len: 110,
            done: false,
            tail: bytes::Bytes::from_static(b"0123456789"),
        };
        // The tail is bytes 100..110 of the log.
        assert_eq!(p.tail_at(99, 64), None, "before the tail: read the log");
        assert_eq!(p.tail_at(100, 64).as_deref(), Some(&b"0123456789"[..]));
        assert_eq!(p.tail_at(104, 3).as_deref(), Some(&b"456"[..]));
        assert_eq!(p.tail_at(110, 64), None, "nothing past len");
        let empty = Progress {
            len: 5,
            ..Progress::default()
        };
        assert_eq!(empty.tail_at(0, 64), None);
        assert_eq!(empty.tail_at(5, 64), None);
    }
}
