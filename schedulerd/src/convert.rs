//! Conversions between the worker's job status (gRPC), the scheduler's job
//! record and the API's JSON, in one place.

use jobcluster_proto::http::JobInfo;
use jobcluster_proto::pb;

use crate::state::JobState;
use crate::store::JobRow;
use crate::time::{rfc3339, rfc3339_opt};

/// A job record made from a worker's report of a job the scheduler had not
/// recorded (it crashed between starting the job and recording it).
pub(crate) fn row_from_report(worker_id: &str, s: &pb::QueryJobResponse) -> JobRow {
    let mut row = JobRow {
        job_id: s.job_id.clone(),
        worker_id: worker_id.to_owned(),
        command: s.command.clone(),
        path: s.path.clone(),
        args: s.args.clone(),
        state: JobState::Running,
        error_text: String::new(),
        exit_code: None,
        signal: None,
        created_at_ms: s.created_at_ms,
        started_at_ms: 0,
        finished_at_ms: 0,
        output_bytes: 0,
        group_id: None,
        updated_at_ms: 0,
    };
    merge_status(&mut row, s);
    row
}

pub(crate) fn job_state(state: i32) -> JobState {
    match pb::JobState::try_from(state).unwrap_or(pb::JobState::Unspecified) {
        pb::JobState::Running | pb::JobState::Unspecified => JobState::Running,
        pb::JobState::Succeeded => JobState::Succeeded,
        pb::JobState::Failed => JobState::Failed,
        pb::JobState::Stopped => JobState::Stopped,
        pb::JobState::Lost => JobState::Lost,
    }
}

pub(crate) fn merge_status(row: &mut JobRow, s: &pb::QueryJobResponse) {
    if s.state == pb::JobState::Unspecified as i32 {
        // The original contract's answer: `done`, `error`, `error_text`.
        row.state = match (s.done, s.error) {
            (false, _) => JobState::Running,
            (true, false) => JobState::Succeeded,
            (true, true) => JobState::Failed,
        };
        row.error_text = s.error_text.clone();
        if row.state.is_terminal() && row.finished_at_ms == 0 {
            // It says nothing of when: the scheduler learned it now.
            row.finished_at_ms = crate::time::now_ms();
        }
        return;
    }
    row.state = job_state(s.state);
    row.error_text = s.error_text.clone();
    row.exit_code = s.exit_code;
    row.signal = s.signal;
    if s.started_at_ms != 0 {
        row.started_at_ms = s.started_at_ms;
    }
    row.finished_at_ms = s.finished_at_ms;
    row.output_bytes = s.output_bytes;
    if row.command.is_empty() {
        row.command = s.command.clone();
    }
}

/// The API's view of a job record; `stale` when its worker could not be
/// asked in time and this is the record as it was last written.
pub(crate) fn job_info(r: &JobRow, stale: bool) -> JobInfo {
    JobInfo {
        job_id: r.job_id.clone(),
        worker_id: r.worker_id.clone(),
        command: r.command.clone(),
        path: r.path.clone(),
        args: Some(r.args.clone()),
        state: r.state.as_str().to_owned(),
        done: r.state.is_terminal(),
        error: r.state.is_error(),
        error_text: r.error_text.clone(),
        exit_code: r.exit_code,
        signal: r.signal,
        created_at: rfc3339(r.created_at_ms),
        started_at: rfc3339_opt(r.started_at_ms),
        finished_at: rfc3339_opt(r.finished_at_ms),
        output_bytes: r.output_bytes,
        group_id: r.group_id.clone(),
        stale,
        recorded_at: rfc3339_opt(r.updated_at_ms),
        position: None,
        reason: None,
        queued_at: None,
    }
}

/// A job as listings show it: without `args` (each job may carry 256 KiB
/// of them, so a page of a thousand could take hundreds of MB).
pub(crate) fn job_summary(r: &JobRow, stale: bool) -> JobInfo {
    JobInfo {
        args: None,
        ..job_info(r, stale)
    }
}
