//! Final job records kept in memory. A final state never changes (the
//! store refuses to update one), so reading a finished job's status, its
//! output or stopping it needs no store read once it has been read once:
//! the commonest read of all (a CI pipeline polling a job it ran) costs a
//! map lookup.
//!
//! Bounded by count and by size: at most [`MAX_JOBS`] records, none whose
//! arguments are over [`MAX_ARGS_BYTES`] (those are read from the store
//! each time). Oldest first out; a bounded FIFO of our own rather than an
//! LRU crate, as a map and a queue are all it needs. A job pruned from the
//! store may be answered from here until it is pushed out (the leader
//! empties its own copy after pruning); its final state was true.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use crate::store::JobRow;

/// Finished jobs kept at most.
const MAX_JOBS: usize = 1_000;

/// A record with more bytes of arguments than this is not kept.
const MAX_ARGS_BYTES: usize = 1024;

#[derive(Debug, Default)]
pub(crate) struct FinishedJobs {
    /// Held for map operations only, never across an await.
    kept: Mutex<Kept>,
}

#[derive(Debug, Default)]
struct Kept {
    by_id: HashMap<String, JobRow>,
    order: VecDeque<String>,
}

impl FinishedJobs {
    pub(crate) fn get(&self, job_id: &str) -> Option<JobRow> {
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        kept.by_id.get(job_id).cloned()
    }

    /// Keeps `row` if it is final and small.
    pub(crate) fn keep(&self, row: &JobRow) {
        let args: usize = row.args.iter().map(String::len).sum();
        if !row.state.is_terminal() || args > MAX_ARGS_BYTES {
            return;
        }
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        if kept.by_id.insert(row.job_id.clone(), row.clone()).is_none() {
            kept.order.push_back(row.job_id.clone());
        }
        while kept.order.len() > MAX_JOBS {
            if let Some(oldest) = kept.order.pop_front() {
                kept.by_id.remove(&oldest);
            }
        }
    }

    /// Forgets everything (after pruning, so no pruned job is shown).
    pub(crate) fn clear(&self) {
        *self.kept.lock().unwrap_or_else(|e| e.into_inner()) = Kept::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::JobState;

    fn row(id: usize, state: JobState, args: usize) -> JobRow {
        JobRow {
            job_id: id.to_string(),
            worker_id: "w".into(),
            command: "bash".into(),
            path: "x.sh".into(),
            args: vec!["a".repeat(args)],
            state,
            error_text: String::new(),
            exit_code: Some(0),
            signal: None,
            created_at_ms: 1,
            started_at_ms: 1,
            finished_at_ms: 2,
            output_bytes: 0,
            group_id: None,
            updated_at_ms: 2,
        }
    }

    #[test]
    fn only_final_small_records_are_kept_and_the_oldest_go_first() {
        let finished = FinishedJobs::default();
        finished.keep(&row(0, JobState::Running, 1));
        finished.keep(&row(1, JobState::Succeeded, MAX_ARGS_BYTES + 1));
        assert!(finished.get("0").is_none() && finished.get("1").is_none());
        for id in 2..MAX_JOBS + 3 {
            finished.keep(&row(id, JobState::Failed, 1));
        }
        assert!(finished.get("2").is_none(), "the oldest went");
        assert_eq!(
            finished.get(&(MAX_JOBS + 2).to_string()).map(|r| r.state),
            Some(JobState::Failed)
        );
        finished.clear();
        assert!(finished.get(&(MAX_JOBS + 2).to_string()).is_none());
    }
}
