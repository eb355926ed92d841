//! Reading a job's output, resuming where a dropped connection left off,
//! and the exit code a finished job maps to.
//!
//! [`stream_output`] is the only reader of `/v1/jobs/{id}/logs`; `run`,
//! `logs` and `logs -f` all go through it. It counts the bytes it has
//! written, so after a dropped connection it asks again from exactly that
//! offset: no byte is lost and none is written twice.

use std::io::Write;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use jobcluster_proto::http::{GroupInfo, JobInfo, LogsQuery};
use tokio::time::Instant;

use crate::api::{Api, ApiError, GroupFrame, LogFrame};

/// Where output comes from: the scheduler, or a fake in tests.
pub(crate) trait LogSource {
    /// The output from byte `offset`; with `follow`, until the job ended,
    /// and then its record if the stream carries it.
    async fn open(
        &self,
        offset: u64,
        follow: bool,
    ) -> Result<BoxStream<'static, Result<LogFrame, ApiError>>, ApiError>;
    /// The job's record.
    async fn job(&self) -> Result<JobInfo, ApiError>;
}

/// One job's output on the scheduler.
#[derive(Debug)]
pub(crate) struct JobLogs<'a> {
    pub(crate) api: &'a Api,
    pub(crate) job_id: &'a str,
}

impl LogSource for JobLogs<'_> {
    async fn open(
        &self,
        offset: u64,
        follow: bool,
    ) -> Result<BoxStream<'static, Result<LogFrame, ApiError>>, ApiError> {
        self.api
            .logs(self.job_id, &LogsQuery { follow, offset })
            .await
    }

    async fn job(&self) -> Result<JobInfo, ApiError> {
        Ok(self.api.job(self.job_id).await?.parsed)
    }
}

/// How hard to try after a dropped connection.
#[derive(Debug, Clone)]
pub(crate) struct Retry {
    /// Wait before the first reconnect; doubled after each failure.
    pub(crate) first_delay: Duration,
    pub(crate) max_delay: Duration,
    /// Reconnects in a row before giving up.
    pub(crate) attempts: u32,
    /// A connection that delivered bytes or lived this long was healthy:
    /// the count of failures in a row starts again.
    pub(crate) healthy_after: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            first_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
            attempts: 10,
            healthy_after: Duration::from_secs(10),
        }
    }
}

/// Why [`stream_output`] stopped early.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FollowError {
    /// The scheduler could not be reached (again), or refused.
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(
        "{last}; gave up after {attempts} reconnects (resume with: clusterctl logs -f --offset {offset} {job})"
    )]
    GaveUp {
        last: ApiError,
        attempts: u32,
        offset: u64,
        job: String,
    },
    /// Writing the output failed (e.g. stdout was closed).
    #[error("writing the job's output")]
    Write(#[from] std::io::Error),
}

/// Writes the output of a job from byte `offset` to `out`, flushing each
/// chunk as it arrives. With `follow`, keeps reading until the job has ended
/// and returns its final record; without, returns `None` once the output so
/// far is written.
///
/// Once the first request got an answer, or from the start when the job
/// is `known` to exist (its start was just answered), a broken or refused
/// connection is retried from the last byte written, after a growing
/// delay, with one warning line on stderr each time.
pub(crate) async fn stream_output<S: LogSource>(
    source: &S,
    job_id: &str,
    mut offset: u64,
    follow: bool,
    known: bool,
    out: &mut impl Write,
    retry: &Retry,
) -> Result<Option<JobInfo>, FollowError> {
    let mut connected = known;
    // Counted by hand rather than with a retry crate (backon, as starts
    // use): the count starts again after a healthy connection, and a
    // queued or unknown job is waited for without counting at all, which
    // no retry combinator expresses.
    let mut failures = 0u32;
    let mut delay = retry.first_delay;
    // After the stream ended cleanly for a finished job, at most one more
    // request to pick up bytes the job record says exist.
    let mut tail_checked = false;
    // Said that the job waits in the queue; say so once when it starts.
    let mut was_queued = false;

    loop {
        let opened_at = Instant::now();
        let offset_before = offset;
        let error = match source.open(offset, follow).await {
            Err(e) => e,
            Ok(mut body) => {
                connected = true;
                if std::mem::take(&mut was_queued) {
                    eprintln!("clusterctl: job {job_id} started");
                }
                let mut broke = None;
                let mut ended = None;
                while let Some(item) = body.next().await {
                    match item {
                        Ok(LogFrame::Data(chunk)) => {
                            out.write_all(&chunk)?;
                            out.flush()?;
                            offset += chunk.len() as u64;
                        }
                        Ok(LogFrame::End(job)) => ended = Some(*job),
                        Err(e) => {
                            broke = Some(e);
                            break;
                        }
                    }
                }
                match broke {
                    Some(e) => e,
                    None if !follow => return Ok(None),
                    // The stream's own end says how the job ended; without
                    // it (an older scheduler, an end it could not record),
                    // ask.
                    None => {
                        let answer = match ended {
                            Some(job) => Ok(job),
                            None => source.job().await,
                        };
                        match answer {
                            Ok(job) if job.done && (job.output_bytes <= offset || tail_checked) => {
                                return Ok(Some(job));
                            }
                            Ok(job) => {
                                tail_checked |= job.done;
                                let message = if job.done {
                                    format!(
                                        "the output stream ended at byte {offset} but the job wrote \
                                         {} bytes",
                                        job.output_bytes
                                    )
                                } else {
                                    format!(
                                        "the output stream ended at byte {offset} while the job is \
                                         still {}",
                                        job.state
                                    )
                                };
                                ApiError::Transport {
                                    message,
                                    retryable: true,
                                }
                            }
                            Err(e) => e,
                        }
                    }
                }
            }
        };

        // A job whose worker cannot be asked now is `unknown`, not over:
        // wait for it as long as the scheduler has not given it up, and
        // end with the real outcome.
        // `409 job_not_started`: queued, or its start not settled yet.
        let unavailable = matches!(
            &error,
            ApiError::Status { status, .. } if *status == reqwest::StatusCode::SERVICE_UNAVAILABLE
        ) || error.code() == Some("job_not_started");
        if unavailable && follow {
            let answer = source.job().await;
            // The scheduler knows the job: from now on a connection it
            // refuses (a restart) is ridden out, not taken for a wrong id.
            connected |= answer.is_ok();
            match answer {
                Ok(job) if job.state == "lost" => return Ok(Some(job)),
                // Its end is known; its worker cannot serve the rest of its
                // output now, which may be readable again in a moment (its
                // worker restarting, a blip): asked again below within the
                // reconnect budget, then the outcome, which is what callers
                // wait for, is given alone. One whose start was only not
                // settled when asked (a queued job just dispatched, quick
                // to end) is asked again below too.
                Ok(job)
                    if job.done
                        && error.code() != Some("job_not_started")
                        && (job.output_bytes <= offset || failures >= retry.attempts) =>
                {
                    if job.output_bytes > offset {
                        eprintln!(
                            "clusterctl: job {job_id} is {}, but its output from byte {offset} \
                             (of {}) cannot be read now: {error}; later: clusterctl logs \
                             --offset {offset} {job_id}",
                            job.state, job.output_bytes
                        );
                    }
                    return Ok(Some(job));
                }
                // Not started yet: waits, quietly after one line.
                Ok(job) if job.state == "queued" => {
                    if !was_queued {
                        eprintln!(
                            "clusterctl: job {job_id} is queued (position {}: {}); waiting",
                            job.position.unwrap_or(0),
                            job.reason.as_deref().unwrap_or("waiting for a free slot")
                        );
                    }
                    was_queued = true;
                    failures = 0;
                    tokio::time::sleep(retry.first_delay).await;
                    continue;
                }
                Ok(job) if job.state == "unknown" => {
                    eprintln!(
                        "clusterctl: job {job_id} is unknown ({}); waiting, from byte {offset}",
                        job.error_text
                    );
                    failures = 0;
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(retry.max_delay);
                    continue;
                }
                _ => {}
            }
        }
        // A start still settling when the stream was asked for (a queued
        // job just dispatched) is retried like a broken stream, not given
        // up on because nothing was read yet.
        let starting = follow && matches!(error.code(), Some("job_starting" | "job_not_started"));
        if (!connected && !starting) || !error.is_retryable() {
            return Err(error.into());
        }
        if offset > offset_before || opened_at.elapsed() >= retry.healthy_after {
            failures = 0;
            delay = retry.first_delay;
        }
        failures += 1;
        if failures > retry.attempts {
            return Err(FollowError::GaveUp {
                last: error,
                attempts: retry.attempts,
                offset,
                job: job_id.to_owned(),
            });
        }
        eprintln!(
            "clusterctl: {error}; resuming from byte {offset} in {} (attempt {failures}/{})",
            humantime::format_duration(delay),
            retry.attempts
        );
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(retry.max_delay);
    }
}

/// The exit code of a lost job: its outcome is not known (its worker
/// vanished), so a retry may succeed; sysexits' EX_TEMPFAIL.
pub(crate) const LOST_EXIT_CODE: u8 = 75;

/// The exit code `run` and `logs -f` end with: the job's own exit code,
/// 128+N when a signal N killed it, [`LOST_EXIT_CODE`] when it was lost,
/// 1 when it was stopped or failed without a code. A job that did not
/// succeed never maps to 0.
pub(crate) fn exit_code_of(job: &JobInfo) -> u8 {
    match job.state.as_str() {
        "succeeded" => 0,
        "lost" => LOST_EXIT_CODE,
        "stopped" => 1,
        _ => match (job.exit_code, job.signal) {
            (Some(code), _) if code != 0 => u8::try_from(code).unwrap_or(1),
            (_, Some(signal)) if signal > 0 => u8::try_from(128 + signal).unwrap_or(255),
            _ => 1,
        },
    }
}

/// Writes a group's merged output (`GET /v1/groups/{id}/logs`) to `out`,
/// flushing each chunk as it arrives; the group's record if the output
/// ended with it. Group output has no offsets, so a broken stream is not
/// resumed: it is an error that says so.
pub(crate) async fn copy_group_output(
    mut body: BoxStream<'static, Result<GroupFrame, ApiError>>,
    group_id: &str,
    out: &mut impl Write,
) -> anyhow::Result<Option<GroupInfo>> {
    let mut end = None;
    while let Some(item) = body.next().await {
        match item {
            Ok(GroupFrame::Data(chunk)) => {
                out.write_all(&chunk)?;
                out.flush()?;
            }
            Ok(GroupFrame::End(group)) => end = Some(*group),
            Err(e) => anyhow::bail!(
                "{e}; a group's output cannot be resumed (see: clusterctl status {group_id})"
            ),
        }
    }
    Ok(end)
}

/// The exit code `run --all` and `logs -f GROUP` end with: 0 only if every
/// job succeeded and no worker failed to start its job (`start_failures`);
/// else the [`exit_code_of`] the first job (in the group's order) that did
/// not succeed, or 1. A group without jobs never maps to 0.
pub(crate) fn group_exit_code(group: &GroupInfo, start_failures: usize) -> u8 {
    match group.jobs.iter().find(|j| j.state != "succeeded") {
        Some(job) => exit_code_of(job),
        None if group.jobs.is_empty() || start_failures > 0 => 1,
        None => 0,
    }
}

/// One line for stderr about a job that did not succeed, or `None`.
pub(crate) fn failure_summary(job: &JobInfo) -> Option<String> {
    if job.state == "succeeded" {
        return None;
    }
    let mut line = format!("job {} {}", job.job_id, job.state);
    match (job.exit_code, job.signal) {
        (Some(code), _) => line.push_str(&format!(" with exit code {code}")),
        (None, Some(signal)) => line.push_str(&format!(" by signal {signal}")),
        (None, None) => {}
    }
    // error_text says why a job could not run; with a code or signal it
    // only repeats them.
    if job.exit_code.is_none() && job.signal.is_none() && !job.error_text.is_empty() {
        line.push_str(": ");
        line.push_str(&job.error_text);
    }
    Some(line)
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::VecDeque;

    use super::*;
    use bytes::Bytes;

    fn job(state: &str, exit_code: Option<i32>, signal: Option<i32>) -> JobInfo {
        JobInfo {
            job_id: "j1".into(),
            worker_id: "w1".into(),
            command: "bash".into(),
            path: "count.sh".into(),
            args: Some(vec![]),
            state: state.into(),
            done: state != "running",
            error: state == "failed",
            error_text: String::new(),
            exit_code,
            signal,
            created_at: "2025-01-01T00:00:00Z".into(),
            started_at: None,
            finished_at: None,
            output_bytes: 0,
            group_id: None,
            stale: false,
            recorded_at: None,
            position: None,
            reason: None,
            queued_at: None,
        }
    }

    #[test]
    fn exit_codes() {
        assert_eq!(exit_code_of(&job("succeeded", Some(0), None)), 0);
        assert_eq!(exit_code_of(&job("failed", Some(3), None)), 3);
        assert_eq!(exit_code_of(&job("failed", None, Some(9))), 137);
        assert_eq!(exit_code_of(&job("failed", None, None)), 1);
        assert_eq!(exit_code_of(&job("failed", Some(0), None)), 1);
        assert_eq!(exit_code_of(&job("failed", Some(300), None)), 1);
        assert_eq!(exit_code_of(&job("stopped", None, Some(15))), 1);
        assert_eq!(exit_code_of(&job("stopped", Some(0), None)), 1);
        assert_eq!(exit_code_of(&job("lost", None, None)), LOST_EXIT_CODE);
        assert_eq!(exit_code_of(&job("running", None, None)), 1);
    }

    fn group(jobs: Vec<JobInfo>) -> GroupInfo {
        GroupInfo {
            group_id: "g1".into(),
            state: "failed".into(),
            done: true,
            created_at: "2025-01-01T00:00:00Z".into(),
            command: "bash".into(),
            path: "count.sh".into(),
            args: Some(vec![]),
            jobs,
            failed: Vec::new(),
        }
    }

    #[test]
    fn group_exit_codes() {
        let ok = || job("succeeded", Some(0), None);
        assert_eq!(group_exit_code(&group(vec![ok(), ok()]), 0), 0);
        // The first job that did not succeed, in the group's order.
        let jobs = vec![
            ok(),
            job("failed", Some(3), None),
            job("failed", None, Some(9)),
        ];
        assert_eq!(group_exit_code(&group(jobs), 0), 3);
        let jobs = vec![job("failed", None, Some(9)), job("failed", Some(3), None)];
        assert_eq!(group_exit_code(&group(jobs), 0), 137);
        assert_eq!(
            group_exit_code(&group(vec![ok(), job("stopped", None, Some(15))]), 0),
            1
        );
        assert_eq!(
            group_exit_code(&group(vec![job("lost", None, None)]), 0),
            LOST_EXIT_CODE
        );
        // A worker that could not start its job fails the run.
        assert_eq!(group_exit_code(&group(vec![ok()]), 1), 1);
        assert_eq!(
            group_exit_code(&group(vec![job("failed", Some(4), None)]), 2),
            4
        );
        assert_eq!(group_exit_code(&group(vec![]), 0), 1);
    }

    /// What [`copy_group_output`] wrote of `frames`, and what it returned.
    fn copy_group(
        frames: Vec<Result<GroupFrame, ApiError>>,
    ) -> (Vec<u8>, anyhow::Result<Option<GroupInfo>>) {
        let mut out = Vec::new();
        let ended = rt().block_on(copy_group_output(
            futures_util::stream::iter(frames).boxed(),
            "g1",
            &mut out,
        ));
        (out, ended)
    }

    #[test]
    fn group_output_is_copied_and_a_break_is_an_error() {
        let data = |line: &'static [u8]| Ok(GroupFrame::Data(Bytes::from_static(line)));
        let (out, ended) = copy_group(vec![data(b"[w1] a\n"), data(b"[w2] b\n")]);
        assert_eq!(out, b"[w1] a\n[w2] b\n");
        assert!(ended.unwrap().is_none());

        // The record in the trailer is the group's outcome.
        let record = group(vec![job("succeeded", Some(0), None)]);
        let (out, ended) = copy_group(vec![
            data(b"[w1] a\n"),
            Ok(GroupFrame::End(Box::new(record))),
        ]);
        assert_eq!(out, b"[w1] a\n");
        assert_eq!(ended.unwrap().map(|g| g.jobs.len()), Some(1));

        let (out, ended) = copy_group(vec![data(b"[w1] a\n"), Err(dropped())]);
        assert_eq!(
            ended.unwrap_err().to_string(),
            "connection reset; a group's output cannot be resumed (see: clusterctl status g1)"
        );
        assert_eq!(out, b"[w1] a\n");
    }

    #[test]
    fn summaries() {
        assert_eq!(failure_summary(&job("succeeded", Some(0), None)), None);
        assert_eq!(
            failure_summary(&job("failed", Some(3), None)).unwrap(),
            "job j1 failed with exit code 3"
        );
        let mut cannot_run = job("failed", None, None);
        cannot_run.error_text = "no plugin for .rb".into();
        assert_eq!(
            failure_summary(&cannot_run).unwrap(),
            "job j1 failed: no plugin for .rb"
        );
    }

    /// What one `open` answers: chunks, then maybe a break.
    enum Answer {
        Refuse(bool),
        /// `503 worker_down`: the scheduler cannot reach the job's worker.
        WorkerDown,
        /// `409 job_not_started`: the job's start was not settled yet.
        NotStarted,
        Body(Vec<&'static [u8]>, bool),
        /// The rest of the output, then the job's record (the trailer).
        Ended,
    }

    /// The whole output is `OUTPUT`; each answer serves from the offset it
    /// was asked for, so a wrong offset shows up as lost or doubled bytes.
    struct Fake {
        answers: RefCell<VecDeque<Answer>>,
        offsets: RefCell<Vec<u64>>,
        final_job: JobInfo,
        /// Times the job's record was asked for.
        asked: std::cell::Cell<u32>,
    }

    const OUTPUT: &[u8] = b"line 1\nline 2\nline 3\n";

    fn dropped() -> ApiError {
        ApiError::Transport {
            message: "connection reset".into(),
            retryable: true,
        }
    }

    impl Fake {
        fn new<const N: usize>(answers: [Answer; N], final_job: JobInfo) -> Fake {
            Fake {
                answers: RefCell::new(VecDeque::from(answers)),
                offsets: RefCell::new(vec![]),
                final_job,
                asked: std::cell::Cell::new(0),
            }
        }

        /// Follows the whole output from byte 0, with fast retries.
        fn follow(&self) -> (Vec<u8>, Result<Option<JobInfo>, FollowError>) {
            let mut out = Vec::new();
            let result =
                rt().block_on(stream_output(self, "j1", 0, true, false, &mut out, &fast()));
            (out, result)
        }
    }

    impl LogSource for Fake {
        async fn open(
            &self,
            offset: u64,
            _follow: bool,
        ) -> Result<BoxStream<'static, Result<LogFrame, ApiError>>, ApiError> {
            self.offsets.borrow_mut().push(offset);
            match self.answers.borrow_mut().pop_front() {
                Some(Answer::Refuse(retryable)) => Err(ApiError::Transport {
                    message: "connection refused".into(),
                    retryable,
                }),
                Some(Answer::WorkerDown) => Err(ApiError::Status {
                    status: reqwest::StatusCode::SERVICE_UNAVAILABLE,
                    body: Some(jobcluster_proto::http::ErrorBody {
                        error: "worker w1 is down".into(),
                        code: "worker_down".into(),
                        job_id: None,
                    }),
                    text: String::new(),
                }),
                Some(Answer::NotStarted) => Err(ApiError::Status {
                    status: reqwest::StatusCode::CONFLICT,
                    body: Some(jobcluster_proto::http::ErrorBody {
                        error: "job j1 is not running on worker w1 yet".into(),
                        code: "job_not_started".into(),
                        job_id: Some("j1".into()),
                    }),
                    text: String::new(),
                }),
                Some(Answer::Body(sizes, breaks)) => {
                    // Each element's length says how many bytes to serve.
                    let mut at = offset as usize;
                    let mut items = Vec::new();
                    for size in sizes {
                        let end = (at + size.len()).min(OUTPUT.len());
                        items.push(Ok(LogFrame::Data(Bytes::from_static(&OUTPUT[at..end]))));
                        at = end;
                    }
                    if breaks {
                        items.push(Err(dropped()));
                    }
                    Ok(futures_util::stream::iter(items).boxed())
                }
                Some(Answer::Ended) => Ok(futures_util::stream::iter([
                    Ok(LogFrame::Data(Bytes::from_static(
                        &OUTPUT[offset as usize..],
                    ))),
                    Ok(LogFrame::End(Box::new(self.final_job.clone()))),
                ])
                .boxed()),
                None => Ok(
                    futures_util::stream::iter([Ok(LogFrame::Data(Bytes::from_static(
                        &OUTPUT[offset as usize..],
                    )))])
                    .boxed(),
                ),
            }
        }

        async fn job(&self) -> Result<JobInfo, ApiError> {
            self.asked.set(self.asked.get() + 1);
            Ok(self.final_job.clone())
        }
    }

    fn fast() -> Retry {
        Retry {
            first_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
            attempts: 3,
            healthy_after: Duration::from_secs(60),
        }
    }

    fn finished() -> JobInfo {
        let mut j = job("succeeded", Some(0), None);
        j.output_bytes = OUTPUT.len() as u64;
        j
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    }

    #[test]
    fn a_stream_that_ends_with_the_jobs_record_needs_no_other_request() {
        let fake = Fake::new([Answer::Ended], finished());
        let (out, result) = fake.follow();
        assert_eq!(out, OUTPUT);
        assert_eq!(result.unwrap().unwrap(), finished());
        assert_eq!(fake.asked.get(), 0);

        // Without the record (an older scheduler), it is asked for.
        let fake = Fake::new([], finished());
        let (out, result) = fake.follow();
        assert_eq!(out, OUTPUT);
        assert_eq!(result.unwrap().unwrap(), finished());
        assert_eq!(fake.asked.get(), 1);
    }

    #[test]
    fn a_record_that_says_more_output_exists_resumes_the_stream() {
        let mut job = finished();
        job.output_bytes += 5;
        let fake = Fake::new([Answer::Ended, Answer::Ended], job.clone());
        let (out, result) = fake.follow();
        assert_eq!(out, OUTPUT);
        // Asked once more from where it stopped; the second record, still
        // longer than what came, is taken as the end (the bytes are gone).
        assert_eq!(*fake.offsets.borrow(), [0, OUTPUT.len() as u64]);
        assert_eq!(result.unwrap().unwrap(), job);
    }

    #[test]
    fn resumes_after_drops_without_losing_or_repeating_bytes() {
        let fake = Fake::new(
            [
                Answer::Body(vec![b"1234567"], true),
                Answer::Refuse(true),
                Answer::Body(vec![b"12", b"12345"], true),
                Answer::Body(vec![], true),
            ],
            finished(),
        );
        let (out, job) = fake.follow();
        let job = job.unwrap().unwrap();
        assert_eq!(out, OUTPUT);
        assert_eq!(job.state, "succeeded");
        assert_eq!(*fake.offsets.borrow(), [0, 7, 7, 14, 14]);
    }

    #[test]
    fn starts_at_the_given_offset_and_without_follow_ends_with_the_body() {
        let fake = Fake::new([], job("running", None, None));
        let mut out = Vec::new();
        let job = rt()
            .block_on(stream_output(
                &fake,
                "j1",
                14,
                false,
                false,
                &mut out,
                &fast(),
            ))
            .unwrap();
        assert!(job.is_none());
        assert_eq!(out, b"line 3\n");
    }

    #[test]
    fn gives_up_after_the_attempts_and_says_how_to_resume() {
        let fake = Fake::new(
            [
                Answer::Body(vec![b"1234567"], true),
                Answer::Refuse(true),
                Answer::Refuse(true),
                Answer::Refuse(true),
            ],
            finished(),
        );
        let (out, err) = fake.follow();
        let err = err.unwrap_err();
        assert!(
            matches!(err, FollowError::GaveUp { offset: 7, .. }),
            "{err}"
        );
        assert!(
            err.to_string()
                .ends_with("(resume with: clusterctl logs -f --offset 7 j1)"),
            "{err}"
        );
        assert_eq!(out, b"line 1\n");
    }

    #[test]
    fn the_first_request_and_lasting_errors_are_not_retried() {
        let refused_first = Fake::new([Answer::Refuse(true)], finished());
        let err = refused_first.follow().1.unwrap_err();
        assert!(matches!(err, FollowError::Api(_)), "{err}");
        // Unless the job is known to exist (`run` just started it).
        let known = Fake::new([Answer::Refuse(true)], finished());
        let mut out = Vec::new();
        let job = rt()
            .block_on(stream_output(
                &known,
                "j1",
                0,
                true,
                true,
                &mut out,
                &fast(),
            ))
            .unwrap()
            .unwrap();
        assert_eq!((out.as_slice(), job.state.as_str()), (OUTPUT, "succeeded"));

        let lasting = Fake::new(
            [Answer::Body(vec![b"1"], true), Answer::Refuse(false)],
            finished(),
        );
        let err = lasting.follow().1.unwrap_err();
        assert!(matches!(err, FollowError::Api(_)), "{err}");
        assert_eq!(*lasting.offsets.borrow(), [0, 1]);
    }

    /// A queued job just dispatched can end before its start is settled
    /// at the scheduler: its output is still there to read.
    #[test]
    fn a_job_that_ended_before_its_start_settled_is_asked_again() {
        let fake = Fake::new([Answer::NotStarted], finished());
        let (out, job) = fake.follow();
        let job = job.unwrap().unwrap();
        assert_eq!((out.as_slice(), job.state.as_str()), (OUTPUT, "succeeded"));
        assert_eq!(*fake.offsets.borrow(), [0, 0]);
    }

    /// A finished job whose worker cannot serve the rest of its output for
    /// a moment: the rest is asked for again, not given up at once with
    /// the job's exit code and the output cut short.
    #[test]
    fn the_rest_of_a_finished_jobs_output_is_asked_for_again() {
        let fake = Fake::new(
            [
                Answer::Body(vec![b"1234567"], true),
                Answer::WorkerDown,
                Answer::WorkerDown,
            ],
            finished(),
        );
        let (out, job) = fake.follow();
        assert_eq!(job.unwrap().unwrap().state, "succeeded");
        assert_eq!(out, OUTPUT);
        assert_eq!(*fake.offsets.borrow(), [0, 7, 7, 7]);

        // Past the budget, the outcome alone.
        let fake = Fake::new(
            [
                Answer::Body(vec![b"1234567"], true),
                Answer::WorkerDown,
                Answer::WorkerDown,
                Answer::WorkerDown,
                Answer::WorkerDown,
            ],
            finished(),
        );
        let (out, job) = fake.follow();
        assert_eq!(job.unwrap().unwrap().state, "succeeded");
        assert_eq!(out, b"line 1\n");
    }

    /// Once the scheduler answered about the job (here: its start is not
    /// settled yet), a connection it then refuses (a restart) is ridden
    /// out, not taken for a wrong id.
    #[test]
    fn a_refusal_after_the_scheduler_knew_the_job_is_ridden_out() {
        let fake = Fake::new([Answer::NotStarted, Answer::Refuse(true)], finished());
        let (out, job) = fake.follow();
        assert_eq!(job.unwrap().unwrap().state, "succeeded");
        assert_eq!(out, OUTPUT);
        assert_eq!(*fake.offsets.borrow(), [0, 0, 0]);
    }

    #[test]
    fn a_clean_end_before_the_job_ended_is_resumed() {
        let fake = Fake::new([Answer::Body(vec![b"1234567"], false)], finished());
        let (out, result) = fake.follow();
        result.unwrap();
        // The job says 21 bytes exist; the second request fetched the rest.
        assert_eq!(out, OUTPUT);
        assert_eq!(*fake.offsets.borrow(), [0, 7]);
    }
}
