//! The job record: what is known about a job, kept as `job.json` in its
//! directory and written atomically.

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum State {
    Running,
    Succeeded,
    Failed,
    Stopped,
    Lost,
}

impl State {
    pub(crate) fn is_done(self) -> bool {
        self != State::Running
    }
}

/// Everything known about a job; also its `job.json` on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct JobRecord {
    pub(crate) id: Uuid,
    pub(crate) command: String,
    pub(crate) path: String,
    pub(crate) args: Vec<String>,
    pub(crate) state: State,
    pub(crate) exit_code: Option<i32>,
    pub(crate) signal: Option<i32>,
    pub(crate) error_text: String,
    pub(crate) created_at_ms: u64,
    pub(crate) started_at_ms: u64,
    pub(crate) finished_at_ms: u64,
    pub(crate) output_bytes: u64,
    /// The output log was deleted by the retention limits.
    #[serde(default)]
    pub(crate) output_expired: bool,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Name of the file that holds disk space for a job's final record.
pub(super) const FINAL: &str = "job.json.final";
/// The file a new job's first record is written into, then renamed.
pub(super) const FIRST_TMP: &str = "job.json.tmp";
/// A job's output.
pub(crate) const LOG: &str = "output.log";
/// A job's record: its first, then its final one renamed over it.
pub(crate) const RECORD: &str = "job.json";

/// Writes `bytes` into `dir/tmp_name` (reusing its blocks if it exists)
/// and renames it over `dir/target`: a crash leaves the old file or the
/// new one, never half of one. With `durable`, file and directory are
/// synced, so a written one also survives a power loss.
fn replace_file(
    dir: &Path,
    tmp_name: &str,
    target: &str,
    bytes: &[u8],
    durable: bool,
) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(tmp_name);
    // No truncation first: a reserved file's blocks are overwritten in
    // place, so a full disk can still take the record.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.set_len(bytes.len() as u64)?;
    if durable {
        file.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(target))?;
    if durable {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Replaces a job's `job.json` in `dir` through `dir/tmp_name`.
pub(super) fn replace(dir: &Path, tmp_name: &str, json: &[u8]) -> std::io::Result<()> {
    replace_file(dir, tmp_name, RECORD, json, true)
}

/// Writes a new job's first record, atomically but not synced. It needs to
/// survive a crash of this process (the job's process lives on, and the
/// restarted worker must find it), not a power loss of this machine: that
/// ends the job's process too, and the scheduler, which recorded the job
/// durably before asking for it, finds it missing and marks it lost. This
/// keeps every sync off the start's path; [`write_final`] syncs the
/// job's directory entry along with its final record. Through a temporary
/// file, so a reader (a query of this id, a sweep) or a restart finds no
/// record or a whole one, never a torn one it would take for a broken
/// disk.
pub(super) fn write_first(dir: &Path, json: &[u8]) -> std::io::Result<()> {
    replace_file(dir, FIRST_TMP, RECORD, json, false)
}

/// Replaces the file at `path` with `bytes` atomically and durably.
pub(crate) fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_whole(path, bytes, true)
}

/// Replaces the file at `path` with `bytes` atomically, not synced: for
/// what may be lost to a power loss (a crash of this process keeps it).
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_whole(path, bytes, false)
}

fn write_whole(path: &Path, bytes: &[u8], durable: bool) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    replace_file(dir, &format!("{name}.tmp"), &name, bytes, durable)
}

/// Makes a rename or a new file in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Makes a new job's directory with what it holds before its first
/// record: an empty log, the empty file the first record is written into
/// ([`write_first`]), and `reserve_bytes` of disk held for the final record,
/// so that a job whose disk fills while it runs can still be recorded as
/// failed (the final record overwrites these blocks instead of asking for
/// new ones). An existing `dir` is `AlreadyExists` and left alone; what was
/// made is removed again on any later error.
pub(super) fn make_job_dir(dir: &Path, reserve_bytes: usize) -> std::io::Result<()> {
    std::fs::create_dir(dir)?;
    let made = [LOG, FIRST_TMP]
        .into_iter()
        .try_for_each(|name| {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(dir.join(name))
                .map(drop)
        })
        .and_then(|()| reserve(&dir.join(FINAL), reserve_bytes, true));
    if made.is_err() {
        let _ = std::fs::remove_dir_all(dir);
    }
    made
}

/// Bytes held for the final record of a job whose first record is
/// `record_len` bytes: the final one adds an error text and counts.
pub(super) fn final_size(record_len: usize) -> usize {
    record_len * 2 + 4096
}

/// Holds `size` bytes of disk in the file at `path` (a new one with
/// `create_new`), written out so the blocks are allocated now.
pub(super) fn reserve(path: &Path, size: usize, create_new: bool) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(create_new)
        .mode(0o600)
        .open(path)?;
    std::os::unix::fs::FileExt::write_all_at(&file, &vec![b' '; size], 0)
}

/// Writes a job's final record into the space [`reserve_final`] held (or
/// like any record if there is none), durably.
///
/// Three syncs make it durable: the record, the job's directory (the
/// record's rename), and the jobs directory (the job's own entry, made
/// unsynced at its start, see [`write_first`]). The last needs nothing of
/// the first two, so it runs beside them on another blocking thread: a
/// job's end (and `clusterctl run`'s exit) waits for two syncs, not three.
pub(super) async fn write_final(jobs_dir: &Path, record: &JobRecord) -> std::io::Result<()> {
    let dir = jobs_dir.join(record.id.to_string());
    let json = serde_json::to_vec(record).map_err(std::io::Error::other)?;
    let entry = tokio::task::spawn_blocking({
        let jobs_dir = jobs_dir.to_owned();
        move || sync_dir(&jobs_dir)
    });
    let written = tokio::task::spawn_blocking(move || {
        if dir.join(FINAL).exists() {
            replace(&dir, FINAL, &json)
        } else {
            replace(&dir, FIRST_TMP, &json)
        }
    });
    let (entry, written) = tokio::join!(entry, written);
    written.map_err(std::io::Error::other)??;
    entry.map_err(std::io::Error::other)?
}

/// Deletes a finished job's output and records that it is gone (record
/// first: a crash in between leaves a log that the next sweep deletes,
/// never a record that points at a missing log). A job that runs (one
/// started after the sweep looked) keeps its output: returns false.
///
/// On a disk too full for the new record, the log is emptied first, which
/// frees its blocks: retention is how a worker whose disk filled gets
/// back into service. A crash (or a record still not written) after that
/// leaves a finished job whose log is shorter than its record says, which
/// readers take as expired ([`output_cut`]).
pub(crate) fn expire_output(dir: &Path) -> std::io::Result<bool> {
    let (mut record, _) = load_record(dir)?;
    if record.state == State::Running {
        return Ok(false);
    }
    if !record.output_expired {
        record.output_expired = true;
        let json = serde_json::to_vec(&record).map_err(std::io::Error::other)?;
        // The record's age (what `max_record_age` counts) is when the job
        // ended, not when its output went: keep its time.
        let written = std::fs::metadata(dir.join(RECORD))?.modified()?;
        match replace(dir, FIRST_TMP, &json) {
            Err(e) if storage_full(&e) => {
                std::fs::File::options()
                    .write(true)
                    .open(dir.join(LOG))?
                    .set_len(0)?;
                replace(dir, FIRST_TMP, &json)?;
            }
            other => other?,
        }
        std::fs::File::options()
            .write(true)
            .open(dir.join(RECORD))?
            .set_modified(written)?;
    }
    match std::fs::remove_file(dir.join(LOG)) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(e),
    }
}

/// Whether `error` says the disk (or the user's quota) is full.
pub(crate) fn storage_full(error: &std::io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(code) if code == nix::libc::ENOSPC || code == nix::libc::EDQUOT
    )
}

/// Whether a finished job's log of `log_len` bytes lost output its record
/// counts: retention emptied it on a full disk and the record saying so
/// was not written ([`expire_output`]). Its output reads as expired.
pub(crate) fn output_cut(record: &JobRecord, log_len: u64) -> bool {
    record.state.is_done() && log_len < record.output_bytes
}

/// Reads one job's record and the length of its output log.
pub(super) fn load_record(dir: &Path) -> std::io::Result<(JobRecord, u64)> {
    let bytes = std::fs::read(dir.join(RECORD))?;
    let record = serde_json::from_slice::<JobRecord>(&bytes)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let len = std::fs::metadata(dir.join(LOG))
        .map(|m| m.len())
        .unwrap_or(0);
    Ok((record, len))
}

/// Reads every `jobs/<id>/job.json` one at a time and keeps those `keep`
/// wants, so memory follows what is kept, not the history on disk.
/// Unreadable records are skipped with a warning rather than stopping the
/// worker.
pub(super) fn load_records(
    jobs_dir: &Path,
    mut keep: impl FnMut(&JobRecord) -> bool,
) -> std::io::Result<(Vec<(JobRecord, u64)>, usize)> {
    let entries = match std::fs::read_dir(jobs_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(e),
    };
    let mut kept = Vec::new();
    let mut seen = 0;
    for entry in entries {
        let dir = entry?.path();
        match load_record(&dir) {
            Ok((record, len)) => {
                seen += 1;
                if keep(&record) {
                    kept.push((record, len));
                }
            }
            Err(error) => {
                tracing::warn!(dir = %dir.display(), %error, "skipping unreadable job record")
            }
        }
    }
    Ok((kept, seen))
}
