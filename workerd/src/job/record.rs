//! The job record: what is known about a job, kept as `job.json` in its
//! directory and written atomically.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
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
/// keeps every sync off the start's path; [`write_final`] makes the
/// job's files durable along with its final record. Through a temporary
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
    // NUL, not spaces: a byte no JSON text holds, so a final record
    // written over it in place that a power loss tore (a sector of it not
    // written) never parses (`overwrite_final`).
    std::os::unix::fs::FileExt::write_all_at(&file, &vec![0; size], 0)
}

/// Makes what a spare job directory holds durable, off every job's path
/// ([`super::spare`] calls it while no start comes): the space held for
/// the final record, with its blocks, and the names in `dir`. A job that
/// takes it needs fewer syncs at its end ([`write_final`]).
pub(super) fn sync_held(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir.join(FINAL))?.sync_all()?;
    sync_dir(dir)
}

/// Where a job's directory came from: what its end syncs besides its
/// record ([`write_final`]).
#[derive(Debug, Clone, Default)]
pub(super) struct Origin {
    /// The spares' directory it was moved out of. Its end syncs that
    /// removal too: without a journal a power loss could leave the job's
    /// directory under both names, and the spares are cleared at start.
    pub(super) spares: Option<PathBuf>,
    /// Its files were synced while it was a spare ([`sync_held`]).
    pub(super) files_synced: bool,
}

/// Writes a job's final record durably.
///
/// With `origin.files_synced` (the job's directory is a spare whose files were
/// synced before it was taken, [`sync_held`]), the record is written into
/// the space held for it in place and synced: the file's name and blocks
/// are durable already, so nothing else needs a sync but the jobs
/// directory, for the job's own entry (the spare's rename at its start),
/// synced beside it. Only then is the record renamed over the first one,
/// unsynced: a crash that undoes the rename (or the first record's) leaves
/// the final record in [`FINAL`], where [`load_record`] finds it, and a
/// torn write leaves a NUL byte in that file, which is then not JSON, and
/// the first record standing, as if the job had not ended (nor been
/// reported). Two syncs side by side (three with the spares' directory,
/// see [`Origin`]).
///
/// Otherwise (a directory made by its start, a job started before this
/// worker restarted, a start that failed, a record that does not fit the
/// space), the record is synced, renamed and the rename synced, and the
/// job's own entry in `jobs_dir` synced beside them: two syncs in a row.
pub(super) async fn write_final(
    jobs_dir: &Path,
    record: &JobRecord,
    origin: &Origin,
) -> std::io::Result<()> {
    let dir = jobs_dir.join(record.id.to_string());
    let json = serde_json::to_vec(record).map_err(std::io::Error::other)?;
    let files_synced = origin.files_synced;
    // Shared with the other jobs ending meanwhile (`dirsync`).
    let entry = super::dirsync::sync_dir_shared(jobs_dir);
    let moved_out = async {
        match &origin.spares {
            Some(spares) => super::dirsync::sync_dir_shared(spares).await,
            None => Ok(()),
        }
    };
    let written = tokio::task::spawn_blocking(move || {
        if files_synced && overwrite_final(&dir, &json)? {
            return Ok(());
        }
        replace_final(&dir, &json)
    });
    let (entry, moved_out, written) = tokio::join!(entry, moved_out, written);
    written.map_err(std::io::Error::other)??;
    moved_out?;
    entry
}

/// Replaces a job's record with its final one through the space held for
/// it (or like any record if there is none), synced with its rename.
fn replace_final(dir: &Path, json: &[u8]) -> std::io::Result<()> {
    if dir.join(FINAL).exists() {
        replace(dir, FINAL, json)
    } else {
        replace(dir, FIRST_TMP, json)
    }
}

/// Writes `json` over the space held for the final record in `dir`,
/// syncs it and renames it over the first record; false, with nothing
/// written, when there is no such space or `json` does not fit it.
fn overwrite_final(dir: &Path, json: &[u8]) -> std::io::Result<bool> {
    let path = dir.join(FINAL);
    let file = match std::fs::OpenOptions::new().write(true).open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if file.metadata()?.len() < json.len() as u64 {
        return Ok(false);
    }
    // Over the synced NUL bytes the space holds (`reserve`): whatever part
    // of this write a power loss leaves unwritten leaves a NUL inside or
    // after the record, which is then not JSON. Cut to the record and
    // synced with its length and time (retention reads the time).
    std::os::unix::fs::FileExt::write_all_at(&file, json, 0)?;
    file.set_len(json.len() as u64)?;
    file.sync_all()?;
    std::fs::rename(&path, dir.join(RECORD))?;
    Ok(true)
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

/// Reads one job's record and the length of its output log. A record
/// that says the job runs (or none) gives way to a final one synced in
/// place whose rename a crash undid ([`write_final`]).
pub(super) fn load_record(dir: &Path) -> std::io::Result<(JobRecord, u64)> {
    let (record, _) = read_either(dir)?;
    Ok((record, log_len(dir)))
}

fn log_len(dir: &Path) -> u64 {
    std::fs::metadata(dir.join(LOG))
        .map(|m| m.len())
        .unwrap_or(0)
}

/// A job's record, and whether it is the final one in [`FINAL`]. Either
/// must be of the job its directory names: a name a crash left unsynced
/// may lead to a file the disk gave to another job since.
fn read_either(dir: &Path) -> std::io::Result<(JobRecord, bool)> {
    let id = dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| Uuid::parse_str(n).ok());
    let read = |name: &str| {
        read_record(&dir.join(name)).and_then(|record| match id {
            Some(id) if id != record.id => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{name} holds job {}'s record", record.id),
            )),
            _ => Ok(record),
        })
    };
    match read(RECORD) {
        Ok(record) if record.state.is_done() => Ok((record, false)),
        first => match read(FINAL) {
            Ok(last) if last.state.is_done() => Ok((last, true)),
            _ => Ok((first?, false)),
        },
    }
}

fn read_record(path: &Path) -> std::io::Result<JobRecord> {
    let bytes = std::fs::read(path)?;
    serde_json::from_slice::<JobRecord>(&bytes)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
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
        match read_either(&dir) {
            Ok((record, from_final)) => {
                // A final record a crash left in its space is renamed as
                // its end would have: retention finds records by name.
                if from_final && let Err(error) = std::fs::rename(dir.join(FINAL), dir.join(RECORD))
                {
                    tracing::warn!(dir = %dir.display(), %error, "could not rename a final job record left by a crash");
                }
                let len = log_len(&dir);
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
