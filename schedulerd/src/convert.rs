//! Conversions between the worker's job status (gRPC), the scheduler's job
//! record and the API's JSON, in one place.

use jobcluster_proto::http::JobInfo;
use jobcluster_proto::pb;

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
        state: String::new(),
        error_text: String::new(),
        exit_code: None,
        signal: None,
        created_at_ms: s.created_at_ms,
        started_at_ms: 0,
        finished_at_ms: 0,
        output_bytes: 0,
        group_id: None,
    };
    merge_status(&mut row, s);
    row
}

pub(crate) fn state_name(state: i32) -> &'static str {
    match pb::JobState::try_from(state).unwrap_or(pb::JobState::Unspecified) {
        pb::JobState::Running | pb::JobState::Unspecified => "running",
        pb::JobState::Succeeded => "succeeded",
        pb::JobState::Failed => "failed",
        pb::JobState::Stopped => "stopped",
        pb::JobState::Lost => "lost",
    }
}

pub(crate) fn merge_status(row: &mut JobRow, s: &pb::QueryJobResponse) {
    row.state = state_name(s.state).to_owned();
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

pub(crate) fn job_info(r: &JobRow) -> JobInfo {
    JobInfo {
        job_id: r.job_id.clone(),
        worker_id: r.worker_id.clone(),
        command: r.command.clone(),
        path: r.path.clone(),
        args: r.args.clone(),
        state: r.state.clone(),
        done: r.state != "running",
        error: matches!(r.state.as_str(), "failed" | "lost"),
        error_text: r.error_text.clone(),
        exit_code: r.exit_code,
        signal: r.signal,
        created_at: rfc3339(r.created_at_ms),
        started_at: rfc3339_opt(r.started_at_ms),
        finished_at: rfc3339_opt(r.finished_at_ms),
        output_bytes: r.output_bytes,
        group_id: r.group_id.clone(),
    }
}
