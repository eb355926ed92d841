//! JSON bodies of the scheduler's HTTP API (SPEC §6), shared by schedulerd
//! (which serves them) and clusterctl (which reads them). Field names are
//! part of the contract: scripts rely on them.
//!
//! Times are RFC 3339 UTC strings; ids are UUIDs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Every error answer: `{"error": "...", "code": "snake_case"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    pub error: String,
    pub code: String,
    /// The job the request concerned, when the answer leaves it in doubt
    /// (a start whose outcome is not known yet: ask for this job later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
}

/// Labels a worker must carry (all of them) to be chosen.
pub type Selector = BTreeMap<String, String>;

/// A worker as the scheduler knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkerInfo {
    pub worker_id: String,
    pub name: String,
    pub address: String,
    /// `ready`, `draining` (takes no new jobs), `unresponsive` (its calls
    /// time out; not yet down), `down` or `left`.
    pub state: String,
    pub plugins: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub running_jobs: u64,
    pub last_seen: String,
    pub registered_at: String,
    /// Job memory, CPU and process limits are enforced through a delegated
    /// cgroup v2 on this worker (else through setrlimit only).
    #[serde(default)]
    pub cgroup_limits: bool,
    /// Most jobs it runs at once; 0: unlimited.
    #[serde(default)]
    pub max_jobs: u32,
    /// Slots not taken by a running, starting or unknown job; absent when
    /// unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_slots: Option<u64>,
}

/// `GET /v1/workers`: by name; `next_cursor` fetches the next page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkerList {
    pub workers: Vec<WorkerInfo>,
    /// The `cursor` of the next page; absent on the last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// Answer to `DELETE /v1/workers/{id}`: `{"success": true}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Success {
    pub success: bool,
}

/// `POST /v1/jobs` (and `POST /start`, where `worker_id` and `command` are
/// required).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StartJob {
    /// Worker id or name; empty or absent: the scheduler places the job.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub worker_id: String,
    /// With placement: only workers carrying all these labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: Selector,
    /// Plugin name; absent: the worker picks the plugin by the script's
    /// extension.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Script path relative to the worker's scripts_dir.
    #[cfg_attr(feature = "openapi", schema(example = "count.sh"))]
    pub path: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Queue order: higher first, then first come first served.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub priority: i32,
    /// `false`: no waiting; a start that finds no free slot is refused as
    /// it was before the queue (429 `worker_busy`, 409). Absent: `true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<bool>,
    /// Queue even if the named worker is down, unresponsive or draining,
    /// or no worker could run the job now.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub wait_for_worker: bool,
    /// A job still queued this long after it was submitted ends `failed`
    /// (a duration: `90s`, `10m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_timeout: Option<String>,
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

/// Answer to a start: `201 {"job_id", "worker_id"}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobStarted {
    pub job_id: String,
    pub worker_id: String,
    /// The worker's name, where the answer knows it (a job started now, or
    /// queued for a named worker), so a client need not look it up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_name: Option<String>,
    /// The job's current state, in the answer to a request that repeated
    /// an `Idempotency-Key` (header `Idempotent-Replayed: true`), and
    /// `unknown` for a group's member whose start its worker did not
    /// confirm in time; else absent from a first answer, whose job has
    /// just started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// A queued job (`202`): how many queued jobs go before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<u64>,
    /// A queued job: why it waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A job record. Also the answer of `POST /query`, whose original fields
/// (`done`, `error`, `error_text`) are all here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobInfo {
    pub job_id: String,
    pub worker_id: String,
    pub command: String,
    pub path: String,
    /// Present when one job is shown (`GET /v1/jobs/{id}`, `/query`);
    /// left out of listings (`GET /v1/jobs`, a group's jobs), which would
    /// otherwise carry up to 256 KiB per job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    /// `running`, `unknown` (its worker cannot be asked now; not given
    /// up), `succeeded`, `failed`, `stopped` or `lost`. The last four are
    /// terminal and never change.
    pub state: String,
    pub done: bool,
    pub error: bool,
    pub error_text: String,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub output_bytes: u64,
    /// The fan-out group the job belongs to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    /// The worker could not be asked in time: this is the scheduler's
    /// record as of `recorded_at`.
    #[serde(default)]
    pub stale: bool,
    /// When the scheduler last wrote this record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recorded_at: Option<String>,
    /// A queued job: how many queued jobs go before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<u64>,
    /// A queued job: why it waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A queued job: when it was submitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued_at: Option<String>,
}

/// `GET /v1/jobs`: newest first; `next_cursor` fetches the next page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobList {
    pub jobs: Vec<JobInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// Answer to a stop: `{"success": true, "state"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StopResult {
    pub success: bool,
    pub state: String,
}

/// Body of the original `POST /stop`, `/query` and `/stream`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobRef {
    /// Worker id or name.
    pub worker_id: String,
    #[cfg_attr(feature = "openapi", schema(format = Uuid))]
    pub job_id: String,
}

/// `GET /v1/jobs` query parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
pub struct JobFilter {
    /// Only this worker's jobs (its id or name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<String>,
    /// Only jobs in this state; `queued` lists them in queue order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "openapi",
        param(pattern = "^(queued|running|unknown|succeeded|failed|stopped|lost)$")
    )]
    pub state: Option<String>,
    /// Jobs in a page, 1 to 1000 (smaller or larger values are taken as
    /// the bound); default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// `GET /v1/jobs/{id}/logs` query parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
pub struct LogsQuery {
    /// Keep the stream open, passing new output on, until the job ends.
    #[serde(default)]
    pub follow: bool,
    /// The byte of the job's output to start from.
    #[serde(default)]
    pub offset: u64,
}

/// The trailer that ends a job's output stream (`GET /v1/jobs/{id}/logs`)
/// when the stream ends at the job's end: the job's final record as JSON,
/// as `GET /v1/jobs/{id}` answers it but without `args`, so that a
/// follower learns the outcome without asking again. Left out when the
/// scheduler could not record the end, or when the record is longer than
/// [`JOB_TRAILER_MAX`]; a follower then asks for the record.
pub const JOB_TRAILER: &str = "x-job";

/// The [`JOB_TRAILER`]'s value at most, in bytes: far under the header
/// limits of HTTP clients (hyper's 16 KiB in all, curl's 100 KiB).
pub const JOB_TRAILER_MAX: usize = 4096;

/// The trailer that ends a followed group's merged output (`GET
/// /v1/groups/{id}/logs?follow=true`) once every member is settled: the
/// group as `GET /v1/groups/{id}` answers it but without `args`, so that
/// a follower learns the outcome without asking again. Left out when the
/// output was cut, while a member is not settled, or when the record is
/// longer than [`GROUP_TRAILER_MAX`]; a follower then asks.
pub const GROUP_TRAILER: &str = "x-group";

/// The [`GROUP_TRAILER`]'s value at most, in bytes: about 25 members (a
/// member's summary is about 460 bytes); under hyper's 16 KiB of headers
/// in all.
pub const GROUP_TRAILER_MAX: usize = 12 * 1024;

/// Job states, as they appear in JSON.
pub const JOB_STATES: [&str; 7] = [
    "queued",
    "running",
    "unknown",
    "succeeded",
    "failed",
    "stopped",
    "lost",
];

/// `POST /v1/groups`: one job per matching ready worker.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StartGroup {
    /// Every eligible worker (with `selector`, every eligible one matching it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
    /// Workers carrying all these labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: Selector,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    #[cfg_attr(feature = "openapi", schema(example = "count.sh"))]
    pub path: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

/// A worker of a fan-out that could not start its job. The scheduler's
/// store keeps a group's as this type's JSON: a change of its shape is a
/// change of the stored format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GroupFailure {
    pub worker_id: String,
    pub error: String,
}

/// Answer to `POST /v1/groups`: `201`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GroupStarted {
    pub group_id: String,
    pub jobs: Vec<JobStarted>,
    pub failed: Vec<GroupFailure>,
}

/// `GET /v1/groups/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GroupInfo {
    pub group_id: String,
    /// `running` while any job runs; then `succeeded` only if every job
    /// succeeded, else `failed` (some job failed or was lost) or `stopped`.
    pub state: String,
    pub done: bool,
    pub created_at: String,
    pub command: String,
    pub path: String,
    /// Present when one group is shown (`GET /v1/groups/{id}`); left out
    /// of `GET /v1/groups`. Its jobs never carry them: they are these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    pub jobs: Vec<JobInfo>,
    /// Workers the group's job could not be started on (as `POST
    /// /v1/groups` answered them): the group then never `succeeded`.
    #[serde(default)]
    pub failed: Vec<GroupFailure>,
}

/// `GET /v1/groups`: newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GroupList {
    pub groups: Vec<GroupInfo>,
}

/// `GET /v1/groups/{id}/logs` query parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
pub struct GroupLogsQuery {
    /// Keep the stream open until every member has ended.
    #[serde(default)]
    pub follow: bool,
    /// `text` (default): `[worker] line`; `ndjson`: one [`GroupLogLine`] a line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", param(pattern = "^(text|ndjson)$"))]
    pub format: Option<String>,
}

/// One line of `GET /v1/groups/{id}/logs?format=ndjson`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GroupLogLine {
    /// The worker's name.
    pub worker: String,
    pub job_id: String,
    /// Byte offset of the line in the job's output.
    pub offset: u64,
    /// The line without its newline, when it is UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<String>,
    /// The line, base64, when it is not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line_base64: Option<String>,
}

/// Bounds on the `args` and `env` of a start (`POST /v1/jobs`, `/start`,
/// `/v1/groups`, and the gRPC `StartJob`). They keep every request
/// runnable (Linux refuses a longer single argument or variable in
/// `execve`) and every job record small, so neither the worker's reports
/// nor the scheduler's listings grow with what a client sends.
pub mod limits {
    /// One argument, or one environment entry as `NAME=value`: Linux's
    /// limit for one string (128 KiB) with its terminating NUL.
    pub const MAX_ITEM_BYTES: usize = 128 * 1024 - 1;
    /// All arguments and all `NAME=value` entries together.
    pub const MAX_TOTAL_BYTES: usize = 256 * 1024;
    /// Arguments in one request.
    pub const MAX_ARGS: usize = 1024;
    /// Environment entries in one request.
    pub const MAX_ENV: usize = 256;

    /// Why `args` and `env` are over a bound, naming it, or `Ok`.
    pub fn check<'a>(
        args: &[String],
        env: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Result<(), String> {
        if args.len() > MAX_ARGS {
            return Err(format!(
                "{} arguments; the limit is {MAX_ARGS} arguments",
                args.len()
            ));
        }
        let mut total = 0usize;
        for (i, arg) in args.iter().enumerate() {
            if arg.len() > MAX_ITEM_BYTES {
                return Err(format!(
                    "args[{i}] is {} bytes; the limit for one argument is {MAX_ITEM_BYTES} bytes (128 KiB with its terminating NUL)",
                    arg.len()
                ));
            }
            total += arg.len();
        }
        let mut entries = 0usize;
        for (name, value) in env {
            entries += 1;
            if entries > MAX_ENV {
                return Err(format!(
                    "more than {MAX_ENV} environment variables; the limit is {MAX_ENV}"
                ));
            }
            let len = name.len() + 1 + value.len();
            if len > MAX_ITEM_BYTES {
                return Err(format!(
                    "env {name:.64} is {len} bytes as NAME=value; the limit for one variable is {MAX_ITEM_BYTES} bytes (128 KiB with its terminating NUL)"
                ));
            }
            total += len;
        }
        if total > MAX_TOTAL_BYTES {
            return Err(format!(
                "args and env are {total} bytes together; the limit is {MAX_TOTAL_BYTES} bytes (256 KiB)"
            ));
        }
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        #![allow(clippy::unwrap_used)]
        use super::*;
        use std::collections::BTreeMap;

        #[test]
        fn each_bound_is_enforced_at_its_edge_and_named() {
            let env = BTreeMap::<String, String>::new();
            let big = "x".repeat(MAX_ITEM_BYTES);
            assert_eq!(check(std::slice::from_ref(&big), &env), Ok(()));
            let over = "x".repeat(MAX_ITEM_BYTES + 1);
            let why = check(&[over], &env).unwrap_err();
            assert!(why.contains("131071"), "{why}");

            let many = vec![String::new(); MAX_ARGS];
            assert_eq!(check(&many, &env), Ok(()));
            let too_many = vec![String::new(); MAX_ARGS + 1];
            assert!(check(&too_many, &env).unwrap_err().contains("1024"));

            let two = vec![big.clone(), big.clone()];
            assert_eq!(check(&two, &env), Ok(()));
            let three = vec![big.clone(), big.clone(), "xxx".into()];
            assert!(check(&three, &env).unwrap_err().contains("262144"));

            let vars: BTreeMap<String, String> = (0..=MAX_ENV)
                .map(|i| (format!("V{i}"), String::new()))
                .collect();
            assert!(check(&[], &vars).unwrap_err().contains("256"));
            let fat: BTreeMap<String, String> =
                [("A".to_owned(), "x".repeat(MAX_ITEM_BYTES - 1))].into();
            assert!(check(&[], &fat).unwrap_err().contains("env A"));
        }
    }
}
