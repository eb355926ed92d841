//! Retention: finished jobs' output is deleted, oldest first, once it is
//! older than `[retention] max_age` or their total passes `max_bytes`
//! (records stay, so status is still served; output reads as expired), and
//! whole records go once older than `max_record_age`.
//!
//! The sweep walks the jobs directory on the blocking pool and judges by
//! file times and sizes, so a worker with a long history sweeps without
//! reading it into memory.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::Retention;
use crate::job::Jobs;

/// Limits are checked this often.
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// With a size limit, also after a job ends, but not more often than this.
const MIN_GAP: Duration = Duration::from_secs(5);

pub(crate) async fn run(jobs: Arc<Jobs>, limits: Retention, cancel: CancellationToken) {
    loop {
        jobs.apply_retention(limits).await;
        let next = tokio::time::sleep(SWEEP_EVERY);
        tokio::pin!(next);
        if limits.max_bytes.is_some() {
            tokio::select! {
                () = &mut next => continue,
                () = jobs.job_finished() => {}
                () = cancel.cancelled() => return,
            }
            tokio::select! {
                () = tokio::time::sleep(MIN_GAP) => {}
                () = cancel.cancelled() => return,
            }
        } else {
            tokio::select! {
                () = &mut next => {}
                () = cancel.cancelled() => return,
            }
        }
    }
}

/// What a sweep did.
#[derive(Debug, Default)]
pub(crate) struct Swept {
    /// Jobs whose output was deleted.
    pub(crate) expired: Vec<Uuid>,
    /// Jobs whose whole record was deleted.
    pub(crate) removed: Vec<Uuid>,
}

/// Age in ms of a file's last write, and its length.
fn age_and_len(path: &Path, now_ms: u64) -> Option<(u64, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    let modified = meta
        .modified()
        .ok()?
        .duration_since(UNIX_EPOCH)
        .ok()?
        .as_millis() as u64;
    Some((now_ms.saturating_sub(modified), meta.len()))
}

/// Applies `limits` to the finished jobs under `jobs_dir` (blocking),
/// leaving alone the `running` jobs, and the records (not the output) of
/// the `unreported` ones.
pub(crate) fn sweep(
    jobs_dir: &Path,
    running: &HashSet<Uuid>,
    unreported: &HashSet<Uuid>,
    limits: Retention,
    now_ms: u64,
) -> std::io::Result<Swept> {
    let mut swept = Swept::default();
    let entries = match std::fs::read_dir(jobs_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(swept),
        Err(e) => return Err(e),
    };
    let record_limit = limits.max_record_age.as_millis() as u64;
    // Without output limits (the default) no log needs looking at.
    let output_limits = limits.max_age.is_some() || limits.max_bytes.is_some();
    // (time since the job ended, its output's length, the job), for the
    // output limits.
    let mut outputs = Vec::new();
    for entry in entries {
        let dir = entry?.path();
        let Some(id) = dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| Uuid::parse_str(n).ok())
        else {
            continue;
        };
        if running.contains(&id) {
            continue;
        }
        let Some((record_age, _)) = age_and_len(&dir.join(crate::job::RECORD), now_ms) else {
            continue; // a start under way, or not a job's directory
        };
        if record_age > record_limit && !unreported.contains(&id) {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {
                    tracing::info!(job_id = %id, "job record deleted by retention");
                    swept.removed.push(id);
                }
                Err(error) => {
                    tracing::warn!(job_id = %id, %error, "could not delete an old job record")
                }
            }
            continue;
        }
        if !output_limits {
            continue;
        }
        // Its age is the job's end (its final record's time), not its
        // log's last write: a job quiet for hours before it ended would
        // otherwise lose its output as soon as it ended.
        if let Some((_, len)) = age_and_len(&dir.join(crate::job::LOG), now_ms) {
            outputs.push((record_age, len, id));
        }
    }
    if !output_limits {
        return Ok(swept);
    }
    // Oldest first.
    outputs.sort_by_key(|(age, _, _)| std::cmp::Reverse(*age));
    let mut total: u64 = outputs.iter().map(|(_, len, _)| len).sum();
    for (age, len, id) in outputs {
        let too_old = limits
            .max_age
            .is_some_and(|max| age > max.as_millis() as u64);
        let too_big = limits.max_bytes.is_some_and(|max| total > max);
        if !too_old && !too_big {
            continue;
        }
        let dir = jobs_dir.join(id.to_string());
        match crate::job::expire_output(&dir) {
            Ok(false) => {}
            Ok(true) => {
                total = total.saturating_sub(len);
                tracing::info!(job_id = %id, bytes = len, reason = if too_old { "age" } else { "size" }, "job output deleted by retention");
                swept.expired.push(id);
            }
            Err(error) => {
                tracing::warn!(job_id = %id, %error, "could not delete expired output")
            }
        }
    }
    Ok(swept)
}
