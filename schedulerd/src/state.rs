//! Job and worker states as the scheduler keeps them: closed enums from the
//! store to the API edge, so a state that does not exist cannot be written.
//! The database and the API carry their lowercase names.

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};

/// A job's state (SPEC §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobState {
    /// Waiting in the scheduler's queue for a free slot; no worker has
    /// been asked to start it.
    Queued,
    Running,
    /// Its worker is down or unresponsive, or the outcome of its start is
    /// not known yet; not given up.
    Unknown,
    Succeeded,
    Failed,
    Stopped,
    Lost,
}

impl JobState {
    pub const ALL: [JobState; 7] = [
        JobState::Queued,
        JobState::Running,
        JobState::Unknown,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Stopped,
        JobState::Lost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Unknown => "unknown",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Stopped => "stopped",
            JobState::Lost => "lost",
        }
    }

    pub fn parse(text: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// Terminal states are promises: once shown, they never change.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Stopped | JobState::Lost
        )
    }

    pub fn is_error(self) -> bool {
        matches!(self, JobState::Failed | JobState::Lost)
    }
}

/// A worker's membership state. Whether a `ready` worker answers in time
/// is kept beside it, in memory (see `registry`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WorkerState {
    Ready,
    /// No heartbeat for `down_after`.
    Down,
    /// Deregistered on a clean shutdown.
    Left,
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Ready => "ready",
            WorkerState::Down => "down",
            WorkerState::Left => "left",
        }
    }

    pub fn parse(text: &str) -> Option<WorkerState> {
        [WorkerState::Ready, WorkerState::Down, WorkerState::Left]
            .into_iter()
            .find(|s| s.as_str() == text)
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for WorkerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl ToSql for JobState {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.as_str()))
    }
}

impl FromSql for JobState {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let text = value.as_str()?;
        JobState::parse(text)
            .ok_or_else(|| FromSqlError::Other(format!("job state {text:?}").into()))
    }
}

impl ToSql for WorkerState {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.as_str()))
    }
}

impl FromSql for WorkerState {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let text = value.as_str()?;
        WorkerState::parse(text)
            .ok_or_else(|| FromSqlError::Other(format!("worker state {text:?}").into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_only_the_four_ends_are_terminal() {
        for s in JobState::ALL {
            assert_eq!(JobState::parse(s.as_str()), Some(s));
        }
        assert_eq!(JobState::parse("dispatching"), None);
        let terminal: Vec<_> = JobState::ALL
            .into_iter()
            .filter(|s| s.is_terminal())
            .collect();
        assert_eq!(
            terminal,
            [
                JobState::Succeeded,
                JobState::Failed,
                JobState::Stopped,
                JobState::Lost
            ]
        );
        for s in [WorkerState::Ready, WorkerState::Down, WorkerState::Left] {
            assert_eq!(WorkerState::parse(s.as_str()), Some(s));
        }
    }
}
