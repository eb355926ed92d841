//! `clusterctl bench`: load through the scheduler's HTTPS API, kept in the
//! repository like redis-benchmark is in Redis.
//!
//! - `bench start` starts many trivial jobs from concurrent clients and
//!   reports starts per second and the latency of `POST /v1/jobs`.
//! - `bench follow` starts one job writing a known number of bytes, follows
//!   it with concurrent followers through `GET /v1/jobs/{id}/logs?follow=true`
//!   (counting the bytes, keeping none), checks that each follower got every
//!   byte, and reports MiB/s.
//! - `bench status` reads one job's status over and over.
//! - `bench workers --simulate N` simulates N workers against the
//!   scheduler's gRPC service (see [`workers`]).
//!
//! Only the report goes to stdout (a table for people, or `-o json|yaml`
//! with the same figures); a progress line goes to stderr. Any failed
//! request or follower makes the command exit 1.
//!
//! Every client (or follower) has its own [`Api`], so its own reqwest client
//! and its own HTTPS connection. reqwest multiplexes every request of one
//! client over a single HTTP/2 connection: a shared client would measure one
//! TLS session and one connection task on each side, not N clients. Separate
//! connections spread over the scheduler's threads as N users' would. Each
//! connection is opened (and the worker looked up) before the clock starts,
//! so the handshakes are not in the figures.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use jobcluster_proto::http::{JobInfo, StartJob};
use serde::Serialize;
use tokio::task::JoinSet;

use crate::api::{Api, ConnectOptions};
use crate::cli::{BenchCommand, BenchFollowArgs, BenchStartArgs, BenchStatusArgs, Output};

mod workers;
use crate::follow::{self, JobLogs, Retry};
use crate::output::{self, print_stdout, print_structured};

const MIB: u64 = 1024 * 1024;

/// Runs `clusterctl bench ...`. Needs a multi-thread runtime to be of use.
pub(crate) async fn run(
    opts: ConnectOptions,
    format: Output,
    command: BenchCommand,
) -> anyhow::Result<ExitCode> {
    match command {
        BenchCommand::Start(args) => start(&opts, format, &args).await,
        BenchCommand::Follow(args) => follow(&opts, format, &args).await,
        BenchCommand::Status(args) => status(&opts, format, &args).await,
        BenchCommand::Workers(args) => workers::run(&opts, format, &args).await,
    }
}

/// `bench status`: one client reading one job's status `requests` times
/// on one kept connection (the first read opens it and is not counted).
async fn status(
    opts: &ConnectOptions,
    format: Output,
    args: &BenchStatusArgs,
) -> anyhow::Result<ExitCode> {
    let api = Api::new(opts)?;
    let job = api
        .job(&args.job)
        .await
        .map_err(|e| anyhow::anyhow!("cannot read job {}: {e}", args.job))?
        .parsed;
    eprintln!(
        "clusterctl: reading the status of job {} ({}) {} times",
        job.job_id, job.state, args.requests
    );
    let mut latencies = Vec::with_capacity(usize::try_from(args.requests).unwrap_or(0));
    let mut failed = 0u64;
    let mut first_error = None;
    let began = Instant::now();
    for _ in 0..args.requests {
        let sent = Instant::now();
        match api.job(&job.job_id).await {
            Ok(_) => latencies.push(sent.elapsed()),
            Err(e) => {
                failed += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    let total = began.elapsed();
    let report = StatusReport {
        mode: "status",
        job: job.job_id,
        state: job.state,
        requests: args.requests,
        failed,
        first_error,
        total_seconds: round(total.as_secs_f64(), 3),
        requests_per_second: round(per_second(latencies.len() as f64, total), 1),
        latency_ms: LatencySummary::of(latencies).map(|s| s.in_ms()),
    };
    if !print_structured(format, &serde_json::to_value(&report)?)? {
        let mut failed = report.failed.to_string();
        if let Some(error) = &report.first_error {
            failed.push_str(&format!(" (first: {error})"));
        }
        print_stdout(&format!(
            "bench status: job {} ({}), {} on one connection\n{}",
            report.job,
            report.state,
            plural(u64::from(report.requests), "request"),
            output::key_values(&[
                ("total", format!("{:.3} s", report.total_seconds)),
                ("requests/s", format!("{:.1}", report.requests_per_second)),
                ("latency", LatencyMs::text(report.latency_ms.as_ref())),
                ("failed", failed),
            ])
        ))?;
    }
    Ok(if report.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The figures of `bench status`.
#[derive(Debug, Serialize)]
struct StatusReport {
    mode: &'static str,
    job: String,
    state: String,
    requests: u32,
    failed: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_error: Option<String>,
    total_seconds: f64,
    requests_per_second: f64,
    latency_ms: Option<LatencyMs>,
}

/// Connections opened at once. The scheduler admits at most 512 connections
/// that have not yet shown who they are (in their handshake or before their
/// first request), so a thousand followers connect in waves.
const CONNECTING_AT_ONCE: usize = 64;

/// `count` clients, each connected and having looked up `worker` once.
async fn connect(opts: &ConnectOptions, count: u32, worker: &str) -> anyhow::Result<Vec<Api>> {
    let mut tasks = JoinSet::new();
    let connecting = Arc::new(tokio::sync::Semaphore::new(CONNECTING_AT_ONCE));
    for _ in 0..count {
        let api = Api::new(opts)?;
        let worker = worker.to_owned();
        let connecting = connecting.clone();
        tasks.spawn(async move {
            let _turn = connecting.acquire_owned().await;
            api.worker(&worker).await.map(|_| api)
        });
    }
    let mut clients = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let api = joined
            .map_err(|e| anyhow::anyhow!("a bench client failed: {e}"))?
            .map_err(|e| anyhow::anyhow!("cannot look up worker {worker}: {e}"))?;
        clients.push(api);
    }
    Ok(clients)
}

/// Prints a bench's figures as `format` asks (JSON/YAML, or `text` for
/// people); the exit code says whether every request succeeded.
pub(super) fn print_report<R: Serialize>(
    format: Output,
    report: &R,
    text: String,
    succeeded: bool,
) -> anyhow::Result<ExitCode> {
    if !print_structured(format, &serde_json::to_value(report)?)? {
        print_stdout(&text)?;
    }
    Ok(if succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// What one `bench start` client saw.
#[derive(Debug, Default)]
struct ClientOutcome {
    /// Latency of each successful start.
    latencies: Vec<Duration>,
    failed: u64,
    /// When the client's first failed request was sent, and its error.
    first_error: Option<(Instant, String)>,
}

async fn start(
    opts: &ConnectOptions,
    format: Output,
    args: &BenchStartArgs,
) -> anyhow::Result<ExitCode> {
    let clients = connect(opts, args.clients, &args.worker).await?;
    let floor = match args.floor {
        true => Some(floor(args.jobs, args.clients).await?),
        false => None,
    };
    eprintln!(
        "clusterctl: starting {} ({}) on {} from {}",
        plural(u64::from(args.jobs), "job"),
        args.script,
        args.worker,
        plural(u64::from(args.clients), "client")
    );
    let request = Arc::new(StartJob {
        worker_id: args.worker.clone(),
        selector: Default::default(),
        command: args.command.clone(),
        path: args.script.clone(),
        args: Vec::new(),
        env: BTreeMap::new(),
        ..Default::default()
    });
    // Clients take the next job number until all are taken: a slow client
    // starts fewer jobs instead of holding the others back.
    let next = Arc::new(AtomicU32::new(0));
    let jobs = args.jobs;
    let pause = Duration::from_millis(args.pause);

    let began = Instant::now();
    let mut tasks = JoinSet::new();
    for api in clients {
        let request = Arc::clone(&request);
        let next = Arc::clone(&next);
        tasks.spawn(async move {
            let mut outcome = ClientOutcome::default();
            let mut first = true;
            while next.fetch_add(1, Ordering::Relaxed) < jobs {
                // Between this client's starts only: not after its last.
                if !std::mem::take(&mut first) && !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
                let sent = Instant::now();
                match api.start(&request, None).await {
                    Ok(_) => outcome.latencies.push(sent.elapsed()),
                    Err(e) => {
                        outcome.failed += 1;
                        if outcome.first_error.is_none() {
                            outcome.first_error = Some((sent, e.to_string()));
                        }
                    }
                }
            }
            outcome
        });
    }
    let mut latencies = Vec::with_capacity(usize::try_from(jobs).unwrap_or(0));
    let mut failed = 0;
    let mut first_error: Option<(Instant, String)> = None;
    while let Some(joined) = tasks.join_next().await {
        let outcome = joined.map_err(|e| anyhow::anyhow!("a bench client failed: {e}"))?;
        latencies.extend(outcome.latencies);
        failed += outcome.failed;
        if let Some((at, error)) = outcome.first_error
            && first_error.as_ref().is_none_or(|(first, _)| at < *first)
        {
            first_error = Some((at, error));
        }
    }
    let total = began.elapsed();

    let report = StartReport {
        mode: "start",
        worker: args.worker.clone(),
        script: args.script.clone(),
        clients: args.clients,
        jobs: args.jobs,
        pause_ms: args.pause,
        started: latencies.len() as u64,
        failed,
        first_error: first_error.map(|(_, error)| error),
        total_seconds: round(total.as_secs_f64(), 3),
        starts_per_second: round(per_second(latencies.len() as f64, total), 1),
        floor_per_second: floor.map(|f| round(f, 1)),
        share_of_floor: floor
            .filter(|f| *f > 0.0)
            .map(|f| round(per_second(latencies.len() as f64, total) / f, 3)),
        latency_ms: LatencySummary::of(latencies).map(|s| s.in_ms()),
    };
    print_report(format, &report, report.text(), report.failed == 0)
}

/// Processes per second this machine spawns and reaps running a no-op
/// bash script, `at_once` at a time: what no scheduler on it can beat.
async fn floor(jobs: u32, at_once: u32) -> anyhow::Result<f64> {
    let dir = std::env::temp_dir().join(format!("clusterctl-floor-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    let script = dir.join("noop.sh");
    std::fs::write(&script, ":\n")
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", script.display()))?;
    eprintln!(
        "clusterctl: measuring the floor: {} of local `bash noop.sh`, {at_once} at a time",
        plural(u64::from(jobs), "run")
    );
    let next = Arc::new(AtomicU32::new(0));
    let began = Instant::now();
    let result = all_at_once(at_once, move || {
        let (next, script) = (Arc::clone(&next), script.clone());
        async move {
            while next.fetch_add(1, Ordering::Relaxed) < jobs {
                let status = tokio::process::Command::new("bash")
                    .arg(&script)
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    // A task dropped after another's error ends its bash.
                    .kill_on_drop(true)
                    .status()
                    .await
                    .map_err(|e| std::io::Error::new(e.kind(), format!("cannot run bash: {e}")))?;
                if !status.success() {
                    return Err(std::io::Error::other(format!("bash noop.sh: {status}")));
                }
            }
            Ok(())
        }
    })
    .await;
    let elapsed = began.elapsed();
    let _ = std::fs::remove_dir_all(&dir);
    result.map_err(|e| anyhow::anyhow!("measuring the floor failed: {e}"))?;
    Ok(per_second(f64::from(jobs), elapsed))
}

/// At most this many pipes measure the floor of `bench follow` at once:
/// each costs a `head` and a 1 MiB buffer here. Linux's default pipe quota
/// for a user without CAP_SYS_RESOURCE (`fs.pipe-user-pages-soft`, 16,384
/// pages) is 64 pipes of 1 MiB in all, counting the user's other pipes:
/// one it keeps small is reported (`floor_small_pipes`).
const FLOOR_PIPES: u32 = 64;

/// The floor of `bench follow`.
#[derive(Debug, Clone, Copy)]
struct FollowFloor {
    pipes: u32,
    mib_per_second: f64,
    /// Pipes the user's pipe quota kept at their default size.
    small_pipes: u32,
}

/// What each floor pipe is enlarged to: workerd's job pipes once full.
const FLOOR_PIPE_SIZE: i32 = 1 << 20;

/// MiB per second this machine moves from local `head -c BYTES /dev/zero`
/// (what blast.sh runs) through pipes into this process, `at_once` pipes
/// at a time, in total: what no follower through the cluster can beat.
/// Each pipe is enlarged to 1 MiB and read 1 MiB at a time, as workerd
/// does with a job's output; a pipe the user's pipe quota
/// (`fs.pipe-user-pages-soft`) keeps small is counted and reported.
async fn follow_floor(bytes: u64, at_once: u32) -> anyhow::Result<FollowFloor> {
    eprintln!(
        "clusterctl: measuring the floor: {} MiB from local `head -c {bytes} /dev/zero` \
         through a pipe, {at_once} at a time",
        bytes / MIB
    );
    let small = Arc::new(AtomicU32::new(0));
    let began = Instant::now();
    let counted = Arc::clone(&small);
    all_at_once(at_once, move || {
        let small = Arc::clone(&counted);
        async move {
            use tokio::io::AsyncReadExt;
            let mut child = tokio::process::Command::new("head")
                .arg("-c")
                .arg(bytes.to_string())
                .arg("/dev/zero")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot run head: {e}")))?;
            let mut out = child
                .stdout
                .take()
                .ok_or_else(|| std::io::Error::other("head has no stdout"))?;
            match nix::fcntl::fcntl(&out, nix::fcntl::FcntlArg::F_SETPIPE_SZ(FLOOR_PIPE_SIZE)) {
                Ok(_) => {}
                // The quota's answer; anything else is not a floor.
                Err(nix::errno::Errno::EPERM) => {
                    small.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    return Err(std::io::Error::other(format!(
                        "cannot enlarge a pipe to {FLOOR_PIPE_SIZE} bytes: {e}"
                    )));
                }
            }
            let mut buf = vec![0; MIB as usize];
            let mut read = 0;
            loop {
                match out.read(&mut buf).await? {
                    0 => break,
                    n => read += n as u64,
                }
            }
            let status = child.wait().await?;
            if !status.success() || read != bytes {
                return Err(std::io::Error::other(format!(
                    "head -c {bytes} /dev/zero: {status}, {read} bytes read"
                )));
            }
            Ok(())
        }
    })
    .await
    .map_err(|e| anyhow::anyhow!("measuring the floor failed: {e}"))?;
    let elapsed = began.elapsed();
    let small = small.load(Ordering::Relaxed);
    if small > 0 {
        eprintln!(
            "clusterctl: {small} of {at_once} floor pipes could not be enlarged (the user's \
             pipe quota, fs.pipe-user-pages-soft): the floor is below what this machine moves"
        );
    }
    let total = bytes as f64 * f64::from(at_once) / MIB as f64;
    Ok(FollowFloor {
        pipes: at_once,
        mib_per_second: per_second(total, elapsed),
        small_pipes: small,
    })
}

/// Runs `at_once` tasks made by `task` together and waits for all of
/// them; on the first error the others are dropped (which ends them) and
/// that error returned.
async fn all_at_once<F, T>(at_once: u32, task: F) -> std::io::Result<()>
where
    F: Fn() -> T,
    T: std::future::Future<Output = std::io::Result<()>> + Send + 'static,
{
    let mut tasks = JoinSet::new();
    for _ in 0..at_once {
        tasks.spawn(task());
    }
    while let Some(joined) = tasks.join_next().await {
        joined.map_err(std::io::Error::other).and_then(|r| r)?;
    }
    Ok(())
}

/// The figures of `bench start`.
#[derive(Debug, Serialize)]
struct StartReport {
    mode: &'static str,
    worker: String,
    script: String,
    clients: u32,
    jobs: u32,
    /// `--pause`: what each client waited after each answer.
    pause_ms: u64,
    /// Jobs the scheduler answered 201 for.
    started: u64,
    failed: u64,
    first_error: Option<String>,
    /// From the first request sent to the last answer received.
    total_seconds: f64,
    /// Successful starts per second of `total_seconds`.
    starts_per_second: f64,
    /// With `--floor`: local no-op bash runs per second, as many at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    floor_per_second: Option<f64>,
    /// With `--floor`: `starts_per_second` as a share of the floor.
    #[serde(skip_serializing_if = "Option::is_none")]
    share_of_floor: Option<f64>,
    /// Over the successful starts; absent if there was none.
    latency_ms: Option<LatencyMs>,
}

impl StartReport {
    fn text(&self) -> String {
        let latency = LatencyMs::text(self.latency_ms.as_ref());
        let mut failed = self.failed.to_string();
        if let Some(error) = &self.first_error {
            failed.push_str(&format!(" (first: {error})"));
        }
        let apart = match self.pause_ms {
            0 => String::new(),
            ms => format!(", {ms} ms after each answer"),
        };
        let head = format!(
            "bench start: {} ({}) on {} from {}{apart}\n",
            plural(u64::from(self.jobs), "job"),
            self.script,
            self.worker,
            plural(u64::from(self.clients), "client")
        );
        let mut rows = vec![
            ("total", format!("{:.3} s", self.total_seconds)),
            ("started", self.started.to_string()),
            ("starts/s", format!("{:.1}", self.starts_per_second)),
        ];
        if let (Some(floor), Some(share)) = (self.floor_per_second, self.share_of_floor) {
            rows.push(("floor/s", format!("{floor:.1} (local bash noop.sh)")));
            rows.push(("of floor", format!("{:.0} %", share * 100.0)));
        }
        rows.push(("latency", latency));
        rows.push(("failed", failed));
        head + &output::key_values(&rows)
    }
}

/// Counts the bytes written to it and remembers when the last ones came.
#[derive(Debug, Default)]
struct CountingSink {
    bytes: u64,
    last_write: Option<Instant>,
}

impl Write for CountingSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.bytes += buf.len() as u64;
        self.last_write = Some(Instant::now());
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Whether a follower got the whole output of a job that succeeded.
fn verify(outcome: Option<JobInfo>, received: u64, expected: u64) -> Result<(), String> {
    let Some(job) = outcome else {
        return Err("the output ended without the job's final state".to_owned());
    };
    if let Some(line) = follow::failure_summary(&job) {
        return Err(line);
    }
    if received != expected {
        return Err(format!(
            "received {received} bytes, expected {expected} (the job wrote {})",
            job.output_bytes
        ));
    }
    Ok(())
}

async fn follow(
    opts: &ConnectOptions,
    format: Output,
    args: &BenchFollowArgs,
) -> anyhow::Result<ExitCode> {
    let expected = args
        .mib
        .checked_mul(MIB)
        .ok_or_else(|| anyhow::anyhow!("--mib {} is too large", args.mib))?;
    // Before the connections: a long floor must not leave them idle past
    // the scheduler's idle timeout.
    let floor = if args.floor {
        Some(follow_floor(expected, args.followers.min(FLOOR_PIPES)).await?)
    } else {
        None
    };
    let clients: Vec<Arc<Api>> = connect(opts, args.followers, &args.worker)
        .await?
        .into_iter()
        .map(Arc::new)
        .collect();
    let Some(first) = clients.first() else {
        anyhow::bail!("no followers");
    };
    let floor_rate = floor.map(|f| f.mib_per_second);

    let began = Instant::now();
    let job_id = first
        .start(
            &StartJob {
                worker_id: args.worker.clone(),
                selector: Default::default(),
                command: None,
                path: args.script.clone(),
                args: vec![expected.to_string()],
                env: BTreeMap::new(),
                ..Default::default()
            },
            None,
        )
        .await
        .map_err(|e| anyhow::anyhow!("cannot start {} on {}: {e}", args.script, args.worker))?
        .parsed
        .job_id;
    eprintln!(
        "clusterctl: started job {job_id} ({} writing {} MiB) on {}; following it with {}",
        args.script,
        args.mib,
        args.worker,
        plural(u64::from(args.followers), "follower")
    );

    let live = read_all(&clients, &job_id, true, expected, began, floor_rate).await?;
    let replay = if args.replay {
        // Every live follower returned once the job had ended, so its log
        // is complete: this reads a finished job's log, without follow.
        eprintln!("clusterctl: reading job {job_id}'s output back from byte 0");
        let began = Instant::now();
        Some(read_all(&clients, &job_id, false, expected, began, floor_rate).await?)
    } else {
        None
    };

    let failed = live.failed() + replay.as_ref().map_or(0, Pass::failed);
    let first_error = live
        .first_error()
        .or_else(|| replay.as_ref().and_then(Pass::first_error));
    let report = FollowReport {
        mode: "follow",
        worker: args.worker.clone(),
        script: args.script.clone(),
        job_id,
        mib: args.mib,
        bytes_per_follower: expected,
        failed,
        first_error,
        total_seconds: live.total_seconds,
        total_mib_per_second: live.total_mib_per_second,
        floor_pipes: floor.map(|f| f.pipes),
        floor_small_pipes: floor.map(|f| f.small_pipes),
        floor_mib_per_second: floor.map(|f| round(f.mib_per_second, 1)),
        share_of_floor: live.share_of_floor,
        followers: live.followers,
        replay,
    };
    print_report(format, &report, report.text(), report.failed == 0)
}

/// Reads the job's output from byte 0 with every client at once, counting
/// the bytes; times run from `began` to each client's last byte. With
/// `follow`, each waits for the job's end and checks it succeeded; without,
/// it reads what the log holds (all of it, for a finished job). With a
/// `floor` (MiB/s), the total is given as a share of it too.
async fn read_all(
    clients: &[Arc<Api>],
    job_id: &str,
    follow: bool,
    expected: u64,
    began: Instant,
    floor: Option<f64>,
) -> anyhow::Result<Pass> {
    let mut tasks = JoinSet::new();
    for (index, api) in clients.iter().enumerate() {
        let api = api.clone();
        let job_id = job_id.to_owned();
        tasks.spawn(async move {
            let source = JobLogs {
                api: &api,
                job_id: &job_id,
            };
            let mut sink = CountingSink::default();
            let outcome = follow::stream_output(
                &source,
                &job_id,
                0,
                follow,
                true,
                &mut sink,
                &Retry::default(),
            )
            .await
            .map_err(|e| e.to_string());
            let ended = sink.last_write.unwrap_or_else(Instant::now);
            let verdict = outcome.and_then(|job| {
                if follow {
                    verify(job, sink.bytes, expected)
                } else {
                    verify_replay(sink.bytes, expected)
                }
            });
            (index, sink.bytes, ended, verdict)
        });
    }
    let mut followers = Vec::new();
    let mut last_byte = began;
    while let Some(joined) = tasks.join_next().await {
        let (index, bytes, ended, verdict) =
            joined.map_err(|e| anyhow::anyhow!("a follower failed: {e}"))?;
        last_byte = last_byte.max(ended);
        let seconds = ended.duration_since(began);
        followers.push(FollowerReport {
            follower: index + 1,
            bytes,
            seconds: round(seconds.as_secs_f64(), 3),
            mib_per_second: round(per_second(bytes as f64 / MIB as f64, seconds), 1),
            error: verdict.err(),
        });
    }
    followers.sort_by_key(|f| f.follower);
    let total = last_byte.duration_since(began);
    let received: u64 = followers.iter().map(|f| f.bytes).sum();
    let rate = per_second(received as f64 / MIB as f64, total);
    Ok(Pass {
        total_seconds: round(total.as_secs_f64(), 3),
        total_mib_per_second: round(rate, 1),
        share_of_floor: floor.filter(|f| *f > 0.0).map(|f| round(rate / f, 3)),
        followers,
    })
}

/// Whether a replay of the finished job's log got every byte of it.
fn verify_replay(received: u64, expected: u64) -> Result<(), String> {
    if received == expected {
        Ok(())
    } else {
        Err(format!(
            "read back {received} bytes of the finished job's log, expected {expected}"
        ))
    }
}

/// One pass of reading the output by every follower.
#[derive(Debug, Serialize)]
struct Pass {
    /// Until the last byte of the last follower.
    total_seconds: f64,
    /// Bytes received by all followers over `total_seconds`.
    total_mib_per_second: f64,
    /// With `--floor`: `total_mib_per_second` as a share of the floor.
    #[serde(skip_serializing_if = "Option::is_none")]
    share_of_floor: Option<f64>,
    followers: Vec<FollowerReport>,
}

impl Pass {
    fn failed(&self) -> usize {
        self.followers.iter().filter(|f| f.error.is_some()).count()
    }

    fn first_error(&self) -> Option<String> {
        self.followers.iter().find_map(|f| f.error.clone())
    }
}

/// The figures of `bench follow`. Times run from the start request to the
/// last byte received.
#[derive(Debug, Serialize)]
struct FollowReport {
    mode: &'static str,
    worker: String,
    script: String,
    job_id: String,
    mib: u64,
    bytes_per_follower: u64,
    failed: usize,
    first_error: Option<String>,
    /// Until the last byte of the last follower.
    total_seconds: f64,
    /// Bytes received by all followers over `total_seconds`.
    total_mib_per_second: f64,
    /// With `--floor`: how many local pipes were read at once (as many as
    /// there are followers, at most 64).
    #[serde(skip_serializing_if = "Option::is_none")]
    floor_pipes: Option<u32>,
    /// With `--floor`: how many of them stayed small (the user's pipe
    /// quota); more than 0 means the floor is below what the machine moves.
    #[serde(skip_serializing_if = "Option::is_none")]
    floor_small_pipes: Option<u32>,
    /// With `--floor`: those pipes' MiB/s in total.
    #[serde(skip_serializing_if = "Option::is_none")]
    floor_mib_per_second: Option<f64>,
    /// With `--floor`: `total_mib_per_second` as a share of the floor.
    #[serde(skip_serializing_if = "Option::is_none")]
    share_of_floor: Option<f64>,
    followers: Vec<FollowerReport>,
    /// With `--replay`: the finished job's log read back by every follower
    /// at once, timed from the requests to the last byte.
    #[serde(skip_serializing_if = "Option::is_none")]
    replay: Option<Pass>,
}

#[derive(Debug, Serialize)]
struct FollowerReport {
    /// 1, 2, ...
    follower: usize,
    bytes: u64,
    seconds: f64,
    mib_per_second: f64,
    /// Why this follower did not get the whole output of a successful job.
    error: Option<String>,
}

impl FollowReport {
    fn text(&self) -> String {
        let head = format!(
            "bench follow: {} MiB ({}) on {}, job {}, {}\n",
            self.mib,
            self.script,
            self.worker,
            self.job_id,
            plural(self.followers.len() as u64, "follower")
        );
        let columns = ["FOLLOWER", "MiB", "SECONDS", "MiB/s", "RESULT"];
        let live = pass_rows(
            &self.followers,
            self.total_seconds,
            self.total_mib_per_second,
        );
        let mut text = head + &output::table(&columns, &live);
        let of_floor =
            |share: Option<f64>| share.map_or("-".to_owned(), |s| format!("{:.0} %", s * 100.0));
        if let (Some(floor), Some(pipes)) = (self.floor_mib_per_second, self.floor_pipes) {
            let small = match self.floor_small_pipes {
                Some(n) if n > 0 => format!(", {n} kept small by the pipe quota"),
                _ => String::new(),
            };
            text.push_str(&format!(
                "floor: {floor:.1} MiB/s (local head -c through {} at once{small}); live: {} of the floor\n",
                plural(u64::from(pipes), "pipe"),
                of_floor(self.share_of_floor)
            ));
        }
        if let Some(replay) = &self.replay {
            text.push_str("replay of the finished job's log:\n");
            let rows = pass_rows(
                &replay.followers,
                replay.total_seconds,
                replay.total_mib_per_second,
            );
            text.push_str(&output::table(&columns, &rows));
            if self.floor_mib_per_second.is_some() {
                text.push_str(&format!(
                    "replay: {} of the floor\n",
                    of_floor(replay.share_of_floor)
                ));
            }
        }
        text
    }
}

/// A row per follower and one for the total.
fn pass_rows(
    followers: &[FollowerReport],
    total_seconds: f64,
    total_mib_per_second: f64,
) -> Vec<Vec<String>> {
    let result = |error: &Option<String>| error.clone().unwrap_or_else(|| "ok".to_owned());
    let mut rows: Vec<Vec<String>> = followers
        .iter()
        .map(|f| {
            vec![
                f.follower.to_string(),
                format!("{:.1}", f.bytes as f64 / MIB as f64),
                format!("{:.3}", f.seconds),
                format!("{:.1}", f.mib_per_second),
                result(&f.error),
            ]
        })
        .collect();
    let received: u64 = followers.iter().map(|f| f.bytes).sum();
    let failed = followers.iter().filter(|f| f.error.is_some()).count();
    rows.push(vec![
        "total".to_owned(),
        format!("{:.1}", received as f64 / MIB as f64),
        format!("{total_seconds:.3}"),
        format!("{total_mib_per_second:.1}"),
        if failed == 0 {
            "ok".to_owned()
        } else {
            format!("{failed} failed")
        },
    ]);
    rows
}

/// "1 client", "8 clients".
fn plural(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// `count` per second of `elapsed`; 0 for no time at all.
fn per_second(count: f64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 { count / secs } else { 0.0 }
}

fn round(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

/// The value at `percent` (1..=100) of sorted samples, by nearest rank: the
/// smallest sample with at least `percent`% of all samples at or below it.
/// `None` for no samples.
fn percentile(sorted: &[Duration], percent: u32) -> Option<Duration> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    let percent = usize::try_from(percent.clamp(1, 100)).unwrap_or(100);
    let rank = (n.saturating_mul(percent)).div_ceil(100).clamp(1, n);
    sorted.get(rank - 1).copied()
}

/// p50, p90, p99 and max of a set of latencies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LatencySummary {
    p50: Duration,
    p90: Duration,
    p99: Duration,
    max: Duration,
}

impl LatencySummary {
    fn of(mut samples: Vec<Duration>) -> Option<LatencySummary> {
        samples.sort_unstable();
        Some(LatencySummary {
            p50: percentile(&samples, 50)?,
            p90: percentile(&samples, 90)?,
            p99: percentile(&samples, 99)?,
            max: *samples.last()?,
        })
    }

    fn in_ms(self) -> LatencyMs {
        let ms = |d: Duration| round(d.as_secs_f64() * 1000.0, 3);
        LatencyMs {
            p50: ms(self.p50),
            p90: ms(self.p90),
            p99: ms(self.p99),
            max: ms(self.max),
        }
    }
}

#[derive(Debug, Serialize)]
struct LatencyMs {
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

impl LatencyMs {
    /// One line for people; `-` when nothing succeeded.
    fn text(latency: Option<&LatencyMs>) -> String {
        match latency {
            Some(l) => format!(
                "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                l.p50, l.p90, l.p99, l.max
            ),
            None => "-".to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(values: impl IntoIterator<Item = u64>) -> Vec<Duration> {
        values.into_iter().map(Duration::from_millis).collect()
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let samples = ms(1..=100);
        assert_eq!(percentile(&samples, 50), Some(Duration::from_millis(50)));
        assert_eq!(percentile(&samples, 90), Some(Duration::from_millis(90)));
        assert_eq!(percentile(&samples, 99), Some(Duration::from_millis(99)));
        assert_eq!(percentile(&samples, 100), Some(Duration::from_millis(100)));
        assert_eq!(percentile(&samples, 1), Some(Duration::from_millis(1)));

        // 500 samples: p99 is the 495th.
        let samples = ms(1..=500);
        assert_eq!(percentile(&samples, 99), Some(Duration::from_millis(495)));
        assert_eq!(percentile(&samples, 50), Some(Duration::from_millis(250)));

        // Ranks round up: of 10 samples, p99 is the 10th, p50 the 5th.
        let samples = ms(1..=10);
        assert_eq!(percentile(&samples, 99), Some(Duration::from_millis(10)));
        assert_eq!(percentile(&samples, 50), Some(Duration::from_millis(5)));
        assert_eq!(percentile(&samples, 51), Some(Duration::from_millis(6)));
    }

    #[test]
    fn percentiles_of_few_or_no_samples() {
        assert_eq!(percentile(&[], 50), None);
        let one = ms([7]);
        for p in [1, 50, 90, 99, 100] {
            assert_eq!(percentile(&one, p), Some(Duration::from_millis(7)));
        }
        let two = ms([3, 9]);
        assert_eq!(percentile(&two, 50), Some(Duration::from_millis(3)));
        assert_eq!(percentile(&two, 51), Some(Duration::from_millis(9)));
        // Out-of-range percents are clamped, never out of bounds.
        assert_eq!(percentile(&two, 0), Some(Duration::from_millis(3)));
        assert_eq!(percentile(&two, 250), Some(Duration::from_millis(9)));
    }

    #[test]
    fn the_summary_sorts_its_samples() {
        let mut samples = ms(1..=200);
        samples.reverse();
        samples.swap(3, 150);
        let summary = LatencySummary::of(samples).unwrap();
        assert_eq!(
            summary,
            LatencySummary {
                p50: Duration::from_millis(100),
                p90: Duration::from_millis(180),
                p99: Duration::from_millis(198),
                max: Duration::from_millis(200),
            }
        );
        assert_eq!(LatencySummary::of(Vec::new()), None);

        let in_ms = LatencySummary::of(vec![Duration::from_micros(1_234_567)])
            .unwrap()
            .in_ms();
        assert_eq!((in_ms.p50, in_ms.max), (1234.567, 1234.567));
    }

    #[test]
    fn followers_must_get_every_byte_of_a_successful_job() {
        let job = |state: &str, exit_code: i32| JobInfo {
            job_id: "j1".into(),
            worker_id: "w1".into(),
            command: "bash".into(),
            path: "blast.sh".into(),
            args: Some(vec![]),
            state: state.into(),
            done: true,
            error: state == "failed",
            error_text: String::new(),
            exit_code: Some(exit_code),
            signal: None,
            created_at: "2025-01-01T00:00:00Z".into(),
            started_at: None,
            finished_at: None,
            output_bytes: 10,
            group_id: None,
            stale: false,
            recorded_at: None,
            position: None,
            reason: None,
            queued_at: None,
        };
        assert_eq!(verify(Some(job("succeeded", 0)), 10, 10), Ok(()));
        assert_eq!(
            verify(Some(job("succeeded", 0)), 9, 10).unwrap_err(),
            "received 9 bytes, expected 10 (the job wrote 10)"
        );
        assert_eq!(
            verify(Some(job("failed", 127)), 10, 10).unwrap_err(),
            "job j1 failed with exit code 127"
        );
        assert!(verify(None, 10, 10).is_err());
    }

    #[test]
    fn sink_counts_and_rates_divide_safely() {
        let mut sink = CountingSink::default();
        sink.write_all(b"hello").unwrap();
        sink.write_all(&[0; 1000]).unwrap();
        assert_eq!(sink.bytes, 1005);
        assert!(sink.last_write.is_some());
        assert_eq!(per_second(10.0, Duration::ZERO), 0.0);
        assert_eq!(per_second(10.0, Duration::from_millis(500)), 20.0);
        assert_eq!(round(2.34567, 3), 2.346);
        assert_eq!(plural(1, "follower"), "1 follower");
        assert_eq!(plural(4, "follower"), "4 followers");
    }

    #[test]
    fn reports_read_well() {
        let report = StartReport {
            mode: "start",
            worker: "w1".into(),
            script: "true.sh".into(),
            clients: 8,
            jobs: 500,
            pause_ms: 0,
            started: 499,
            failed: 1,
            first_error: Some("worker w1 is not ready (worker_unavailable)".into()),
            total_seconds: 1.5,
            starts_per_second: 332.7,
            floor_per_second: None,
            share_of_floor: None,
            latency_ms: Some(LatencyMs {
                p50: 20.0,
                p90: 30.5,
                p99: 41.25,
                max: 50.0,
            }),
        };
        assert_eq!(
            report.text(),
            "bench start: 500 jobs (true.sh) on w1 from 8 clients\n\
             total:    1.500 s\n\
             started:  499\n\
             starts/s: 332.7\n\
             latency:  p50 20.00 ms, p90 30.50 ms, p99 41.25 ms, max 50.00 ms\n\
             failed:   1 (first: worker w1 is not ready (worker_unavailable))\n"
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["latency_ms"]["p99"], 41.25);
        assert_eq!(json["starts_per_second"], 332.7);

        let report = FollowReport {
            mode: "follow",
            worker: "w1".into(),
            script: "blast.sh".into(),
            job_id: "j1".into(),
            mib: 2,
            bytes_per_follower: 2 * MIB,
            failed: 0,
            first_error: None,
            total_seconds: 0.5,
            total_mib_per_second: 8.0,
            floor_pipes: None,
            floor_small_pipes: None,
            floor_mib_per_second: None,
            share_of_floor: None,
            followers: vec![
                FollowerReport {
                    follower: 1,
                    bytes: 2 * MIB,
                    seconds: 0.25,
                    mib_per_second: 8.0,
                    error: None,
                },
                FollowerReport {
                    follower: 2,
                    bytes: 2 * MIB,
                    seconds: 0.5,
                    mib_per_second: 4.0,
                    error: None,
                },
            ],
            replay: None,
        };
        assert_eq!(
            report.text(),
            "bench follow: 2 MiB (blast.sh) on w1, job j1, 2 followers\n\
             FOLLOWER  MiB  SECONDS  MiB/s  RESULT\n\
             1         2.0  0.250    8.0    ok\n\
             2         2.0  0.500    4.0    ok\n\
             total     4.0  0.500    8.0    ok\n"
        );
        assert!(
            serde_json::to_value(&report)
                .unwrap()
                .get("replay")
                .is_none()
        );

        let report = FollowReport {
            followers: vec![FollowerReport {
                follower: 1,
                bytes: 2 * MIB,
                seconds: 0.5,
                mib_per_second: 4.0,
                error: None,
            }],
            failed: 1,
            floor_pipes: Some(1),
            floor_small_pipes: Some(0),
            floor_mib_per_second: Some(16.0),
            share_of_floor: Some(0.5),
            replay: Some(Pass {
                total_seconds: 0.25,
                total_mib_per_second: 4.0,
                share_of_floor: Some(0.25),
                followers: vec![FollowerReport {
                    follower: 1,
                    bytes: MIB,
                    seconds: 0.25,
                    mib_per_second: 4.0,
                    error: Some("short".into()),
                }],
            }),
            ..report
        };
        assert_eq!(
            report.text(),
            "bench follow: 2 MiB (blast.sh) on w1, job j1, 1 follower\n\
             FOLLOWER  MiB  SECONDS  MiB/s  RESULT\n\
             1         2.0  0.500    4.0    ok\n\
             total     2.0  0.500    8.0    ok\n\
             floor: 16.0 MiB/s (local head -c through 1 pipe at once); live: 50 % of the floor\n\
             replay of the finished job's log:\n\
             FOLLOWER  MiB  SECONDS  MiB/s  RESULT\n\
             1         1.0  0.250    4.0    short\n\
             total     1.0  0.250    4.0    1 failed\n\
             replay: 25 % of the floor\n"
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["share_of_floor"], 0.5);
        assert_eq!(json["replay"]["share_of_floor"], 0.25);
        assert_eq!(json["replay"]["total_mib_per_second"], 4.0);
        assert_eq!(json["replay"]["followers"][0]["error"], "short");
    }

    #[test]
    fn a_replay_must_get_the_whole_log() {
        assert_eq!(verify_replay(10, 10), Ok(()));
        assert_eq!(
            verify_replay(9, 10).unwrap_err(),
            "read back 9 bytes of the finished job's log, expected 10"
        );
    }
}
