//! The job record: what is known about a job, kept as `job.json` in its
//! directory and written atomically.

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
    /// Process group while running: what a restarted worker must clean up.
    pub(crate) pgid: Option<i32>,
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

/// Writes `job.json` atomically: a crash leaves the old record or the new
/// one, never half of one.
pub(super) async fn write_record(jobs_dir: &Path, record: &JobRecord) -> std::io::Result<()> {
    let dir = jobs_dir.join(record.id.to_string());
    let json = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
    tokio::task::spawn_blocking(move || {
        let tmp = dir.join("job.json.tmp");
        std::fs::write(&tmp, &json)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, dir.join("job.json"))
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Loads every `jobs/<id>/job.json`, with the length of its output log.
/// Unreadable records are skipped with a warning rather than stopping the
/// worker.
pub(super) fn load_records(jobs_dir: &Path) -> std::io::Result<Vec<(JobRecord, u64)>> {
    let entries = match std::fs::read_dir(jobs_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut records = Vec::new();
    for entry in entries {
        let dir = entry?.path();
        let loaded = std::fs::read(dir.join("job.json"))
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                serde_json::from_slice::<JobRecord>(&bytes).map_err(|e| e.to_string())
            });
        match loaded {
            Ok(record) => {
                let len = std::fs::metadata(dir.join("output.log"))
                    .map(|m| m.len())
                    .unwrap_or(0);
                records.push((record, len));
            }
            Err(error) => {
                tracing::warn!(dir = %dir.display(), %error, "skipping unreadable job record")
            }
        }
    }
    Ok(records)
}
