//! Printing: JSON and YAML of the API's objects, tables, key: value blocks
//! and relative times. Pure functions build strings; only `print_*` write.

use std::io::Write;
use std::time::{Duration, SystemTime};

use jobcluster_proto::http::{GroupInfo, JobInfo, WorkerInfo};
use serde_json::Value;

use crate::cli::Output;

/// Prints an API object (or list) as JSON or YAML. Returns false for
/// [`Output::Table`], which the caller renders itself.
pub(crate) fn print_structured(format: Output, value: &Value) -> anyhow::Result<bool> {
    let text = match format {
        Output::Table => return Ok(false),
        Output::Json => {
            let mut text = serde_json::to_string_pretty(value)?;
            text.push('\n');
            text
        }
        Output::Yaml => serde_norway::to_string(value)?,
    };
    print_stdout(&text)?;
    Ok(true)
}

/// Writes `text` to stdout and flushes it.
pub(crate) fn print_stdout(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

/// Standard output without std's line buffer, for a job's output: it
/// comes in large pieces, often without newlines, each written and flushed
/// at once anyway, and `Stdout`'s `LineWriter` searched every piece for its
/// last newline first (11 % of `clusterctl logs`'s CPU on such output,
/// docs/PERFORMANCE.md). A duplicate of the descriptor, written directly;
/// what std's buffer held goes out first.
pub(crate) fn raw_stdout() -> std::io::Result<std::fs::File> {
    use std::os::fd::AsFd;
    let stdout = std::io::stdout();
    stdout.lock().flush()?;
    Ok(std::fs::File::from(stdout.as_fd().try_clone_to_owned()?))
}

/// Columns separated by two spaces, each as wide as its widest cell; no
/// trailing spaces.
pub(crate) fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let header_row: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header_row).chain(rows) {
        let mut line = String::new();
        for (i, (cell, width)) in row.iter().zip(&widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            let pad = width.saturating_sub(cell.chars().count());
            line.extend(std::iter::repeat_n(' ', pad));
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

/// `key: value` lines with the values aligned.
pub(crate) fn key_values(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    let mut text = String::new();
    for (key, value) in pairs {
        let line = format!("{:<width$} {value}", format!("{key}:"));
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

/// "3s ago", "5m ago", "2h ago", "4d ago"; "now" for a time ahead of our
/// clock (clock skew).
pub(crate) fn ago(elapsed: Option<Duration>) -> String {
    let Some(elapsed) = elapsed else {
        return "now".to_owned();
    };
    let secs = elapsed.as_secs();
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

/// An RFC 3339 time of the API relative to `now`; the text itself if it
/// cannot be read.
pub(crate) fn relative(now: SystemTime, rfc3339: &str) -> String {
    match parse_time(rfc3339) {
        Some(then) => ago(now.duration_since(then).ok()),
        None => rfc3339.to_owned(),
    }
}

/// An RFC 3339 time followed by its relative form: `2025-01-02T03:04:05Z (3s ago)`.
fn absolute_and_relative(now: SystemTime, rfc3339: &str) -> String {
    match parse_time(rfc3339) {
        Some(_) => format!("{rfc3339} ({})", relative(now, rfc3339)),
        None => rfc3339.to_owned(),
    }
}

fn parse_time(rfc3339: &str) -> Option<SystemTime> {
    let utc = match rfc3339.strip_suffix("+00:00") {
        Some(base) => format!("{base}Z"),
        None => rfc3339.to_owned(),
    };
    humantime::parse_rfc3339(&utc).ok()
}

fn dash_if_empty(s: String) -> String {
    if s.is_empty() { "-".to_owned() } else { s }
}

/// The EXIT column: the exit code, the signal, or `-`.
fn exit_cell(job: &JobInfo) -> String {
    match (job.exit_code, job.signal) {
        (Some(code), _) => code.to_string(),
        (None, Some(signal)) => format!("sig {signal}"),
        (None, None) => "-".to_owned(),
    }
}

/// Free and total slots (`3/4`); `unlimited` without a `max_jobs`.
fn slots(w: &WorkerInfo) -> String {
    match w.free_slots {
        Some(free) if w.max_jobs > 0 => format!("{free}/{}", w.max_jobs),
        _ => "unlimited".to_owned(),
    }
}

/// The `workers` table.
pub(crate) fn workers_table(now: SystemTime, workers: &[WorkerInfo]) -> String {
    let rows: Vec<Vec<String>> = workers
        .iter()
        .map(|w| {
            vec![
                w.name.clone(),
                w.worker_id.clone(),
                w.state.clone(),
                w.address.clone(),
                dash_if_empty(w.plugins.join(",")),
                w.running_jobs.to_string(),
                slots(w),
                relative(now, &w.last_seen),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "ID",
            "STATE",
            "ADDRESS",
            "PLUGINS",
            "RUNNING",
            "FREE/SLOTS",
            "LAST SEEN",
        ],
        &rows,
    )
}

/// The `jobs` table; `worker_name` maps a worker id to its name if known.
pub(crate) fn jobs_table(
    now: SystemTime,
    jobs: &[JobInfo],
    worker_name: impl Fn(&str) -> Option<String>,
) -> String {
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j.job_id.clone(),
                worker_name(&j.worker_id).unwrap_or_else(|| j.worker_id.clone()),
                j.state.clone(),
                exit_cell(j),
                j.command.clone(),
                j.path.clone(),
                relative(now, &j.created_at),
            ]
        })
        .collect();
    table(
        &[
            "JOB", "WORKER", "STATE", "EXIT", "COMMAND", "PATH", "CREATED",
        ],
        &rows,
    )
}

/// The JOBS cell of a group: `3`, or `3 (2 running)` while some run.
fn group_jobs_cell(g: &GroupInfo) -> String {
    let running = g.jobs.iter().filter(|j| j.state == "running").count();
    if running == 0 {
        g.jobs.len().to_string()
    } else {
        format!("{} ({running} running)", g.jobs.len())
    }
}

/// The `groups` table.
pub(crate) fn groups_table(now: SystemTime, groups: &[GroupInfo]) -> String {
    let rows: Vec<Vec<String>> = groups
        .iter()
        .map(|g| {
            vec![
                g.group_id.clone(),
                g.state.clone(),
                group_jobs_cell(g),
                g.path.clone(),
                relative(now, &g.created_at),
            ]
        })
        .collect();
    table(&["GROUP", "STATE", "JOBS", "PATH", "CREATED"], &rows)
}

/// `status GROUP`: a key: value block, a blank line, and a table of the
/// group's jobs; `worker_name` maps a worker id to its name if known.
pub(crate) fn group_block(
    now: SystemTime,
    g: &GroupInfo,
    worker_name: impl Fn(&str) -> Option<String>,
) -> String {
    let mut text = key_values(&[
        ("group_id", g.group_id.clone()),
        ("state", g.state.clone()),
        ("command", g.command.clone()),
        ("path", g.path.clone()),
        (
            "args",
            dash_if_empty(g.args.as_deref().unwrap_or_default().join(" ")),
        ),
        ("jobs", group_jobs_cell(g)),
        ("created_at", absolute_and_relative(now, &g.created_at)),
    ]);
    let rows: Vec<Vec<String>> = g
        .jobs
        .iter()
        .map(|j| {
            vec![
                j.job_id.clone(),
                worker_name(&j.worker_id).unwrap_or_else(|| j.worker_id.clone()),
                j.state.clone(),
                exit_cell(j),
            ]
        })
        .collect();
    text.push('\n');
    text.push_str(&table(&["JOB", "WORKER", "STATE", "EXIT"], &rows));
    text
}

/// `workers show`.
pub(crate) fn worker_block(now: SystemTime, w: &WorkerInfo) -> String {
    let labels = w
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    key_values(&[
        ("name", w.name.clone()),
        ("worker_id", w.worker_id.clone()),
        ("state", w.state.clone()),
        ("address", w.address.clone()),
        ("plugins", dash_if_empty(w.plugins.join(","))),
        ("labels", dash_if_empty(labels)),
        ("running_jobs", w.running_jobs.to_string()),
        ("slots", slots(w)),
        ("last_seen", absolute_and_relative(now, &w.last_seen)),
        (
            "registered_at",
            absolute_and_relative(now, &w.registered_at),
        ),
    ])
}

/// `status`.
pub(crate) fn job_block(now: SystemTime, j: &JobInfo) -> String {
    let opt_time = |t: &Option<String>| match t {
        Some(t) => absolute_and_relative(now, t),
        None => "-".to_owned(),
    };
    let opt_num = |n: Option<i32>| n.map_or_else(|| "-".to_owned(), |n| n.to_string());
    let mut pairs = vec![
        ("job_id", j.job_id.clone()),
        ("worker_id", j.worker_id.clone()),
        ("state", j.state.clone()),
        ("command", j.command.clone()),
        ("path", j.path.clone()),
        (
            "args",
            dash_if_empty(j.args.as_deref().unwrap_or_default().join(" ")),
        ),
        ("exit_code", opt_num(j.exit_code)),
        ("signal", opt_num(j.signal)),
    ];
    if j.error || !j.error_text.is_empty() {
        pairs.push(("error_text", dash_if_empty(j.error_text.clone())));
    }
    pairs.extend([
        ("created_at", absolute_and_relative(now, &j.created_at)),
        ("started_at", opt_time(&j.started_at)),
        ("finished_at", opt_time(&j.finished_at)),
        ("output_bytes", j.output_bytes.to_string()),
    ]);
    if let Some(group_id) = &j.group_id {
        pairs.push(("group_id", group_id.clone()));
    }
    key_values(&pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> JobInfo {
        JobInfo {
            job_id: "6f1c".into(),
            worker_id: "w-id".into(),
            command: "bash".into(),
            path: "count.sh".into(),
            args: Some(vec![]),
            state: "failed".into(),
            done: true,
            error: false,
            error_text: String::new(),
            exit_code: Some(3),
            signal: None,
            created_at: "2025-01-01T00:00:00Z".into(),
            started_at: Some("2025-01-01T00:00:00.250Z".into()),
            finished_at: None,
            output_bytes: 12,
            group_id: None,
            stale: false,
            recorded_at: None,
            position: None,
            reason: None,
            queued_at: None,
        }
    }

    #[test]
    fn relative_times() {
        let s = Duration::from_secs;
        assert_eq!(ago(Some(s(0))), "0s ago");
        assert_eq!(ago(Some(s(3))), "3s ago");
        assert_eq!(ago(Some(s(59))), "59s ago");
        assert_eq!(ago(Some(s(60))), "1m ago");
        assert_eq!(ago(Some(s(5 * 60 + 59))), "5m ago");
        assert_eq!(ago(Some(s(2 * 3600 + 10))), "2h ago");
        assert_eq!(ago(Some(s(4 * 86400 + 3600))), "4d ago");
        assert_eq!(ago(None), "now");

        let now = humantime::parse_rfc3339("2025-01-01T00:05:00Z").unwrap();
        assert_eq!(relative(now, "2025-01-01T00:00:00Z"), "5m ago");
        assert_eq!(relative(now, "2025-01-01T00:04:57.123Z"), "2s ago");
        assert_eq!(relative(now, "2025-01-01T00:04:57+00:00"), "3s ago");
        assert_eq!(relative(now, "2025-01-01T00:06:00Z"), "now");
        assert_eq!(relative(now, "yesterday"), "yesterday");
    }

    #[test]
    fn table_columns_align_without_trailing_spaces() {
        let text = table(
            &["NAME", "STATE", "X"],
            &[
                vec!["w1".into(), "ready".into(), "".into()],
                vec!["worker-long".into(), "down".into(), "1".into()],
            ],
        );
        assert_eq!(
            text,
            "NAME         STATE  X\n\
             w1           ready\n\
             worker-long  down   1\n"
        );
    }

    #[test]
    fn key_value_blocks_align_values() {
        let text = key_values(&[("a", "1".into()), ("long_key", "2".into())]);
        assert_eq!(text, "a:        1\nlong_key: 2\n");
    }

    #[test]
    fn jobs_table_uses_worker_names_and_exit_cells() {
        let now = humantime::parse_rfc3339("2025-01-01T02:00:00Z").unwrap();
        let mut killed = job();
        killed.exit_code = None;
        killed.signal = Some(9);
        let text = jobs_table(now, &[job(), killed], |id| {
            (id == "w-id").then(|| "w1".to_owned())
        });
        assert_eq!(
            text,
            "JOB   WORKER  STATE   EXIT   COMMAND  PATH      CREATED\n\
             6f1c  w1      failed  3      bash     count.sh  2h ago\n\
             6f1c  w1      failed  sig 9  bash     count.sh  2h ago\n"
        );
    }

    fn group(jobs: Vec<JobInfo>) -> GroupInfo {
        GroupInfo {
            group_id: "g-1".into(),
            state: "running".into(),
            done: false,
            created_at: "2025-01-01T00:00:00Z".into(),
            command: "bash".into(),
            path: "count.sh".into(),
            args: Some(vec!["-n".into(), "3".into()]),
            jobs,
            failed: Vec::new(),
        }
    }

    #[test]
    fn groups_table_counts_running_jobs() {
        let now = humantime::parse_rfc3339("2025-01-01T00:03:00Z").unwrap();
        let mut running = job();
        running.state = "running".into();
        running.exit_code = None;
        let mut done = group(vec![job()]);
        done.group_id = "g-22".into();
        done.state = "failed".into();
        done.path = "sync.sh".into();
        let text = groups_table(now, &[group(vec![running.clone(), running, job()]), done]);
        assert_eq!(
            text,
            "GROUP  STATE    JOBS           PATH      CREATED\n\
             g-1    running  3 (2 running)  count.sh  3m ago\n\
             g-22   failed   1              sync.sh   3m ago\n"
        );
        assert_eq!(
            groups_table(now, &[]),
            "GROUP  STATE  JOBS  PATH  CREATED\n"
        );
    }

    #[test]
    fn group_status_block_lists_jobs_with_worker_names() {
        let now = humantime::parse_rfc3339("2025-01-01T00:00:10Z").unwrap();
        let mut other = job();
        other.job_id = "7a2d".into();
        other.worker_id = "w-other".into();
        other.state = "running".into();
        other.exit_code = None;
        let text = group_block(now, &group(vec![job(), other]), |id| {
            (id == "w-id").then(|| "w1".to_owned())
        });
        assert_eq!(
            text,
            "group_id:   g-1\n\
             state:      running\n\
             command:    bash\n\
             path:       count.sh\n\
             args:       -n 3\n\
             jobs:       2 (1 running)\n\
             created_at: 2025-01-01T00:00:00Z (10s ago)\n\
             \n\
             JOB   WORKER   STATE    EXIT\n\
             6f1c  w1       failed   3\n\
             7a2d  w-other  running  -\n"
        );
    }

    #[test]
    fn status_block() {
        let now = humantime::parse_rfc3339("2025-01-01T00:00:10Z").unwrap();
        let text = job_block(now, &job());
        assert!(text.contains("exit_code:    3\n"), "{text}");
        assert!(
            text.contains("created_at:   2025-01-01T00:00:00Z (10s ago)\n"),
            "{text}"
        );
        assert!(text.contains("finished_at:  -\n"), "{text}");
        assert!(!text.contains("error_text"), "{text}");
    }
}
