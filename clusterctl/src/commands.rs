//! One function per subcommand: call the API, print, pick the exit code.
//!
//! stdout carries only what a script consumes (ids, tables, JSON/YAML, job
//! output); everything else goes to stderr.

use std::collections::{BTreeMap, HashMap};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::CommandFactory;
use jobcluster_proto::http::{
    GroupFailure, GroupInfo, GroupLogsQuery, GroupStarted, JobFilter, JobInfo, JobStarted,
    StartGroup, StartJob,
};
use serde_json::Value;

use crate::api::{self, Answer, Api, ApiError, ConnectOptions};
use crate::cli::{Cli, Command, Global, Output, PkiCommand, StartArgs, WorkersCommand};
use crate::follow::{self, JobLogs, Retry};
use crate::interrupt;
use crate::output::{self, print_stdout, print_structured};
use crate::progress::Spinner;

/// At most this many jobs are listed; `jobs` says so on stderr when it cuts.
const MAX_LISTED_JOBS: usize = 10_000;

/// Runs a parsed command line.
pub(crate) fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Pki(pki) => self::pki(pki),
        Command::Completion { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "clusterctl",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(bench) => {
            // Many clients at once: their TLS and HTTP work has to spread
            // over every core like that of separate clients would, or the
            // bench measures its own single thread. One client at a time
            // runs on one thread, as this tool's other commands do: on
            // several, its requests and its connection's task would hand
            // each request from thread to thread, a wake-up each way that
            // a one-client program does not pay (12 µs of a status read's
            // 160 here; docs/PERFORMANCE.md).
            let mut builder = if bench.one_client() {
                tokio::runtime::Builder::new_current_thread()
            } else {
                tokio::runtime::Builder::new_multi_thread()
            };
            let runtime = builder
                .enable_all()
                .build()
                .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))?;
            runtime.block_on(crate::bench::run(
                connect_options(&cli.global)?,
                cli.global.output,
                bench,
            ))
        }
        command => {
            // One request at a time: a single-threaded runtime is enough.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))?;
            runtime.block_on(api_command(&cli.global, command))
        }
    }
}

fn pki(command: PkiCommand) -> anyhow::Result<ExitCode> {
    let written = match command {
        PkiCommand::Init { dir, sans } => jobcluster_pki::init_dir(&dir, &sans)?,
        PkiCommand::Issue {
            dir,
            role,
            name,
            sans,
        } => jobcluster_pki::issue_in_dir(&dir, role, &name, &sans)?,
    };
    for path in written {
        eprintln!("wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn connect_options(global: &Global) -> anyhow::Result<ConnectOptions> {
    Ok(ConnectOptions {
        scheduler: global.scheduler.clone(),
        ca: global.ca.clone(),
        cert: global.cert.clone(),
        key: global.key.clone(),
        token: token(global, |name| std::env::var_os(name))?,
    })
}

/// The bearer token, from the first of `--token` (with a warning: every
/// user of the machine sees it in `ps`), `--token-file`,
/// `CLUSTERCTL_TOKEN_FILE` and `CLUSTERCTL_TOKEN`.
fn token(
    global: &Global,
    env: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> anyhow::Result<Option<String>> {
    if let Some(token) = &global.token {
        eprintln!(
            "clusterctl: warning: a token given with --token is visible to every user of this \
             machine (ps, /proc) and stays in shell history; use --token-file FILE or \
             CLUSTERCTL_TOKEN instead"
        );
        return Ok(Some(token.clone()));
    }
    let env = |name: &str| env(name).filter(|v| !v.is_empty());
    let file = global
        .token_file
        .clone()
        .map(|f| (f, "--token-file"))
        .or_else(|| env("CLUSTERCTL_TOKEN_FILE").map(|f| (f.into(), "CLUSTERCTL_TOKEN_FILE")));
    if let Some((file, given_by)) = file {
        return read_token_file(&file, given_by).map(Some);
    }
    match env("CLUSTERCTL_TOKEN") {
        None => Ok(None),
        Some(token) => token
            .into_string()
            .map(Some)
            .map_err(|_| anyhow::anyhow!("CLUSTERCTL_TOKEN is not valid UTF-8")),
    }
}

/// A token file's content without surrounding whitespace; `-` is stdin.
fn read_token_file(file: &std::path::Path, given_by: &str) -> anyhow::Result<String> {
    use std::io::Read;
    // A token is short; a bound keeps `--token-file /dev/zero` harmless.
    const LIMIT: u64 = 64 << 10;
    let mut text = String::new();
    let read = if file.as_os_str() == "-" {
        std::io::stdin().take(LIMIT).read_to_string(&mut text)
    } else {
        std::fs::File::open(file).and_then(|f| f.take(LIMIT).read_to_string(&mut text))
    };
    read.map_err(|e| {
        anyhow::anyhow!(
            "cannot read the token file {} ({given_by}): {e}",
            file.display()
        )
    })?;
    let token = text.trim();
    if token.is_empty() {
        anyhow::bail!("the token file {} ({given_by}) is empty", file.display());
    }
    Ok(token.to_owned())
}

async fn api_command(global: &Global, command: Command) -> anyhow::Result<ExitCode> {
    let api = Api::new(&connect_options(global)?)?;
    let format = global.output;
    match command {
        Command::Workers(args) => match args.command {
            Some(WorkersCommand::Show { worker }) => workers_show(&api, format, &worker).await,
            Some(WorkersCommand::Drain { worker }) => drain(&api, format, &worker, true).await,
            Some(WorkersCommand::Undrain { worker }) => drain(&api, format, &worker, false).await,
            Some(WorkersCommand::Rm { worker }) => remove_worker(&api, format, &worker).await,
            None => workers(&api, format, args.all).await,
        },
        Command::Start(args) if args.all => start_group(&api, format, &args).await,
        Command::Start(args) => start(&api, format, &args).await,
        Command::Run(args) => {
            let api = &api;
            interrupt::run_stopping_on_interrupt(api, |started| async move {
                if args.all {
                    run_group(api, &args, &started).await
                } else {
                    run_job(api, &args, &started).await
                }
            })
            .await
        }
        Command::Stop { job } => stop(&api, format, &job).await,
        Command::Status { job } => status(&api, format, &job).await,
        Command::Jobs { worker, state } => jobs(&api, format, worker, state).await,
        Command::Groups => groups(&api, format).await,
        Command::Logs {
            follow: true,
            offset,
            job,
        } => interrupt::follow_until_interrupt(&job, logs(&api, &job, offset, true)).await,
        Command::Logs {
            follow: false,
            offset,
            job,
        } => logs(&api, &job, offset, false).await,
        Command::Pki(_) | Command::Completion { .. } | Command::Bench(_) => {
            anyhow::bail!("internal error: not a scheduler command")
        }
    }
}

async fn workers(api: &Api, format: Output, all: bool) -> anyhow::Result<ExitCode> {
    let answer = api.workers(all).await?;
    if !print_structured(format, &answer.raw)? {
        print_stdout(&output::workers_table(SystemTime::now(), &answer.parsed))?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn workers_show(api: &Api, format: Output, worker: &str) -> anyhow::Result<ExitCode> {
    let answer = api.worker(worker).await?;
    if !print_structured(format, &answer.raw)? {
        print_stdout(&output::worker_block(SystemTime::now(), &answer.parsed))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Where a start goes, for messages.
fn target(args: &StartArgs) -> String {
    let labels = || {
        args.selector
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    if args.all {
        return if args.selector.is_empty() {
            "every worker".to_owned()
        } else {
            format!("every worker with {}", labels())
        };
    }
    match &args.worker {
        Some(worker) => worker.clone(),
        None if args.selector.is_empty() => "a worker the scheduler picks".to_owned(),
        None => {
            let labels: Vec<_> = args
                .selector
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            format!("a worker with {}", labels.join(","))
        }
    }
}

async fn drain(
    api: &Api,
    format: Output,
    worker: &str,
    draining: bool,
) -> anyhow::Result<ExitCode> {
    let answer = api.drain(worker, draining).await?;
    if !print_structured(format, &answer.raw)? {
        eprintln!("worker {} is {}", answer.parsed.name, answer.parsed.state);
    }
    Ok(ExitCode::SUCCESS)
}

async fn remove_worker(api: &Api, format: Output, worker: &str) -> anyhow::Result<ExitCode> {
    let answer = api.remove_worker(worker).await?;
    if !print_structured(format, &answer.raw)? {
        eprintln!("worker {worker} removed");
    }
    Ok(ExitCode::SUCCESS)
}

fn start_request(args: &StartArgs) -> StartJob {
    StartJob {
        worker_id: args.worker.clone().unwrap_or_default(),
        selector: args.selector.iter().cloned().collect(),
        // Absent: the worker picks the plugin by the script's extension.
        command: args.command.clone(),
        path: args.script.clone(),
        args: args.args.clone(),
        env: BTreeMap::new(),
        priority: args.priority,
        queue: args.no_queue.then_some(false),
        wait_for_worker: args.wait_for_worker,
        queue_timeout: args.queue_timeout.clone(),
    }
}

/// The exit code of `start` when the scheduler recorded the job but could
/// not confirm that its worker started it: the job may be running, so a
/// blind retry could run it twice. Distinct from a lost job's 75, which a
/// wrapper may retry (sysexits' EX_UNAVAILABLE).
const UNCONFIRMED_EXIT_CODE: u8 = 69;

/// How a start ended: started, or recorded with its outcome in doubt.
enum Started {
    Job(Answer<JobStarted>),
    InDoubt { job_id: String, error: ApiError },
}

/// `POST /v1/jobs` with a fresh idempotency key, sent again with the same
/// key after failures on the way (see [`api::retry_start`]).
async fn start_once(api: &Api, args: &StartArgs) -> Result<Started, ApiError> {
    let _spinner = Spinner::start(format!("starting {} on {}", args.script, target(args)));
    let request = start_request(args);
    let key = api::new_idempotency_key();
    let result = api::retry_start("the start", &api::START_RETRIES, || {
        api.start(&request, Some(&key))
    })
    .await;
    match result {
        Ok(answer) => {
            // Only an answer repeated for our key carries the state: an
            // earlier attempt whose answer was lost had started the job.
            // A queued job's first answer (202) carries it too; a
            // repeated one says no more than that.
            if let Some(state) = answer.parsed.state.as_ref().filter(|s| *s != "queued") {
                eprintln!(
                    "clusterctl: an earlier attempt had started job {}; it is {state}",
                    answer.parsed.job_id
                );
            }
            Ok(Started::Job(answer))
        }
        Err(error) => match error.job_in_doubt().map(str::to_owned) {
            Some(job_id) => Ok(Started::InDoubt { job_id, error }),
            None => Err(error),
        },
    }
}

async fn start(api: &Api, format: Output, args: &StartArgs) -> anyhow::Result<ExitCode> {
    let answer = match start_once(api, args).await? {
        Started::Job(answer) => answer,
        Started::InDoubt { job_id, error } => {
            let raw = serde_json::json!({"job_id": job_id, "state": "unknown"});
            if !print_structured(format, &raw)? {
                print_stdout(&format!("{job_id}\n"))?;
            }
            eprintln!(
                "clusterctl: job {job_id} is unknown: {error}; check it with `clusterctl status \
                 {job_id}` before starting it again"
            );
            return Ok(ExitCode::from(UNCONFIRMED_EXIT_CODE));
        }
    };
    if !print_structured(format, &answer.raw)? {
        // The id alone, so `JOB=$(clusterctl start ...)` works.
        print_stdout(&format!("{}\n", answer.parsed.job_id))?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn run_job(
    api: &Api,
    args: &StartArgs,
    tell: &interrupt::StartedSender,
) -> anyhow::Result<ExitCode> {
    let job_id = match start_once(api, args).await? {
        Started::Job(answer) => {
            let mut started = answer.parsed;
            tell.send_replace(Some(interrupt::Started::Job(started.job_id.clone())));
            if started.state.as_deref() == Some("queued") {
                let line = format!(
                    "queued job {} (position {}: {})",
                    started.job_id,
                    started.position.unwrap_or(0),
                    started
                        .reason
                        .as_deref()
                        .unwrap_or("waiting for a free slot")
                );
                // On a terminal a spinner keeps the position current; in a
                // pipe, one line now and one when it starts.
                let spinner = Spinner::start(line.clone());
                if !spinner.shown() {
                    eprintln!("{line}");
                }
                let job = wait_for_dispatch(api, &started.job_id, &spinner).await?;
                drop(spinner);
                if job.done && job.started_at.is_none() {
                    // Ended while queued (stopped, timed out): nothing ran.
                    eprintln!(
                        "clusterctl: job {} {} without starting: {}",
                        job.job_id, job.state, job.error_text
                    );
                    return Ok(finished(job));
                }
                if started.worker_id != job.worker_id {
                    started.worker_name = None;
                }
                started.worker_id = job.worker_id;
            }
            // A name reads better than the id; the answer carries it unless
            // the job waited in the queue for another worker, or the
            // scheduler predates it: then one best-effort lookup.
            let worker = match started.worker_name.take() {
                Some(name) => name,
                None => match api.worker(&started.worker_id).await {
                    Ok(answer) => answer.parsed.name,
                    Err(_) => started.worker_id.clone(),
                },
            };
            eprintln!("started job {} on {worker}", started.job_id);
            started.job_id
        }
        Started::InDoubt { job_id, error } => {
            tell.send_replace(Some(interrupt::Started::Job(job_id.clone())));
            eprintln!("clusterctl: job {job_id} is unknown: {error}; following it");
            wait_for_start(api, &job_id).await?;
            job_id
        }
    };
    let job = follow_to_stdout(api, &job_id, 0, true, true).await?;
    Ok(job.map_or(ExitCode::SUCCESS, finished))
}

/// Waits until a queued job leaves the queue: dispatched to a worker, or
/// ended without starting. Its record then.
pub(crate) async fn wait_for_dispatch(
    api: &Api,
    job_id: &str,
    spinner: &Spinner,
) -> Result<JobInfo, ApiError> {
    let mut pause = Duration::from_millis(100);
    let mut outage = Outage::default();
    loop {
        match api.job(job_id).await {
            Ok(job) if job.parsed.state != "queued" => return Ok(job.parsed),
            Ok(job) => {
                outage = Outage::default();
                spinner.set_message(format!(
                    "job {job_id} queued: position {} ({})",
                    job.parsed.position.unwrap_or(0),
                    job.parsed
                        .reason
                        .as_deref()
                        .unwrap_or("waiting for a free slot")
                ));
            }
            Err(e) => outage.ride_out(e, job_id).await?,
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

/// Waits until the scheduler knows whether a start in doubt happened: the
/// job has started (or ended, or was given up as lost).
async fn wait_for_start(api: &Api, job_id: &str) -> Result<(), ApiError> {
    let mut pause = Duration::from_millis(250);
    let mut outage = Outage::default();
    loop {
        match api.job(job_id).await {
            Ok(job) if job.parsed.state != "unknown" || job.parsed.started_at.is_some() => {
                return Ok(());
            }
            Ok(_) => outage = Outage::default(),
            Err(e) => outage.ride_out(e, job_id).await?,
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

/// Failed asks in a row about a job that exists (queued, or its start in
/// doubt), while its scheduler is out of reach: ridden out as long as a
/// follower rides out a broken stream ([`Retry::default`], about 30 s,
/// long enough for a scheduler restart), with one line on stderr each.
/// Giving up sooner would leave the job to start with nobody following it.
#[derive(Debug, Default)]
struct Outage {
    failures: u32,
}

impl Outage {
    async fn ride_out(&mut self, error: ApiError, job_id: &str) -> Result<(), ApiError> {
        let retry = Retry::default();
        if !error.is_retryable() || self.failures >= retry.attempts {
            return Err(error);
        }
        let delay = (retry.first_delay * 2u32.pow(self.failures)).min(retry.max_delay);
        self.failures += 1;
        eprintln!(
            "clusterctl: {error}; asking about job {job_id} again in {} (attempt {}/{})",
            humantime::format_duration(delay),
            self.failures,
            retry.attempts
        );
        tokio::time::sleep(delay).await;
        Ok(())
    }
}

async fn logs(api: &Api, id: &str, offset: u64, follow: bool) -> anyhow::Result<ExitCode> {
    let job_error = match follow_to_stdout(api, id, offset, follow, false).await {
        Ok(job) => return Ok(job.map_or(ExitCode::SUCCESS, finished)),
        // Refused before any byte was written: the id may be a group's.
        Err(follow::FollowError::Api(e)) if e.is_job_not_found() => e,
        Err(e) => return Err(e.into()),
    };
    let group = or_group(job_error, api.group(id).await)?.parsed;
    if offset != 0 {
        anyhow::bail!(
            "{id} is a group: --offset applies only to a job's output (a group's output has no \
             offsets)"
        );
    }
    let ended = group_output_to_stdout(api, &group.group_id, follow).await?;
    if !follow {
        return Ok(ExitCode::SUCCESS);
    }
    group_finished(api, &group.group_id, 0, ended, HashMap::new()).await
}

/// After `404 job_not_found` for an id, the answer of the group route for
/// it; if that route knows no such group either (`400`/`404`), the job
/// route's error, which is the one a user of job ids expects.
fn or_group<T>(job_error: ApiError, group: Result<T, ApiError>) -> Result<T, ApiError> {
    match group {
        Err(e) if e.is_unknown_id() => Err(job_error),
        other => other,
    }
}

/// Worker ids to names, for messages and tables; empty if the list cannot
/// be had (ids will do).
async fn worker_names(api: &Api) -> HashMap<String, String> {
    match api.workers(true).await {
        Ok(workers) => workers
            .parsed
            .into_iter()
            .map(|w| (w.worker_id, w.name))
            .collect(),
        Err(_) => HashMap::new(),
    }
}

/// `known` names (from answers that carry them), with the scheduler's
/// list added only if one of `ids` is not among them: a `run --all` whose
/// every worker its start's answer named asks nothing more.
async fn names_covering<'a>(
    api: &Api,
    mut known: HashMap<String, String>,
    ids: impl IntoIterator<Item = &'a str>,
) -> HashMap<String, String> {
    if ids.into_iter().any(|id| !known.contains_key(id)) {
        known.extend(worker_names(api).await);
    }
    known
}

fn name_of(names: &HashMap<String, String>, worker_id: &str) -> String {
    names
        .get(worker_id)
        .cloned()
        .unwrap_or_else(|| worker_id.to_owned())
}

fn group_request(args: &StartArgs) -> StartGroup {
    StartGroup {
        all: true,
        selector: args.selector.iter().cloned().collect(),
        command: args.command.clone(),
        path: args.script.clone(),
        args: args.args.clone(),
        env: BTreeMap::new(),
    }
}

/// `POST /v1/groups` with a fresh idempotency key, sent again with the
/// same key after failures on the way (see [`api::retry_start`]).
async fn post_group(api: &Api, args: &StartArgs) -> Result<Answer<GroupStarted>, ApiError> {
    let _spinner = Spinner::start(format!("starting {} on {}", args.script, target(args)));
    let request = group_request(args);
    let key = api::new_idempotency_key();
    api::retry_start("the group start", &api::START_RETRIES, || {
        api.start_group(&request, Some(&key))
    })
    .await
}

/// One warning line on stderr per worker that could not start its job.
fn warn_failures(failed: &[GroupFailure], names: &HashMap<String, String>) {
    for failure in failed {
        eprintln!(
            "clusterctl: warning: worker {} could not start the job: {}",
            name_of(names, &failure.worker_id),
            failure.error
        );
    }
}

async fn start_group(api: &Api, format: Output, args: &StartArgs) -> anyhow::Result<ExitCode> {
    let answer = post_group(api, args).await?;
    if !print_structured(format, &answer.raw)? {
        // The id alone, so `GROUP=$(clusterctl start --all ...)` works.
        print_stdout(&format!("{}\n", answer.parsed.group_id))?;
    }
    if !answer.parsed.failed.is_empty() {
        warn_failures(&answer.parsed.failed, &worker_names(api).await);
    }
    Ok(ExitCode::SUCCESS)
}

async fn run_group(
    api: &Api,
    args: &StartArgs,
    tell: &interrupt::StartedSender,
) -> anyhow::Result<ExitCode> {
    let started = post_group(api, args).await?.parsed;
    tell.send_replace(Some(interrupt::Started::Group(started.group_id.clone())));
    let named = started
        .jobs
        .iter()
        .filter_map(|j| Some((j.worker_id.clone(), j.worker_name.clone()?)))
        .collect();
    let ids = started.jobs.iter().map(|j| j.worker_id.as_str());
    let failed = started.failed.iter().map(|f| f.worker_id.as_str());
    let names = names_covering(api, named, ids.chain(failed)).await;
    let on: Vec<String> = started
        .jobs
        .iter()
        .map(|j| name_of(&names, &j.worker_id))
        .collect();
    // `unknown`: a start its worker did not confirm in time, followed once
    // settled.
    let waiting: Vec<String> = [
        ("queued", "queued for a free slot"),
        ("unknown", "not confirmed by its worker yet"),
    ]
    .into_iter()
    .filter_map(|(state, what)| {
        let n = started
            .jobs
            .iter()
            .filter(|j| j.state.as_deref() == Some(state))
            .count();
        (n > 0).then(|| format!("{n} {what}"))
    })
    .collect();
    let waiting = if waiting.is_empty() {
        String::new()
    } else {
        format!(" ({})", waiting.join("; "))
    };
    eprintln!(
        "started group {}: {} job(s) on {}{waiting}",
        started.group_id,
        started.jobs.len(),
        on.join(", ")
    );
    warn_failures(&started.failed, &names);
    let ended = group_output_to_stdout(api, &started.group_id, true).await?;
    group_finished(api, &started.group_id, started.failed.len(), ended, names).await
}

/// The group's record if its output ended with it.
async fn group_output_to_stdout(
    api: &Api,
    group_id: &str,
    follow: bool,
) -> anyhow::Result<Option<GroupInfo>> {
    let body = api
        .group_logs(
            group_id,
            &GroupLogsQuery {
                follow,
                format: None,
            },
        )
        .await?;
    let mut stdout = crate::output::raw_stdout()?;
    follow::copy_group_output(body, group_id, &mut stdout).await
}

/// After a followed group's output ended: its record (from the output's
/// trailer, else asked for), a line on stderr per job that did not
/// succeed (its worker named from `names`, else asked), and the exit code
/// of [`follow::group_exit_code`].
async fn group_finished(
    api: &Api,
    group_id: &str,
    start_failures: usize,
    ended: Option<GroupInfo>,
    names: HashMap<String, String>,
) -> anyhow::Result<ExitCode> {
    // Without the trailer (an older scheduler, a record past its bound, a
    // store that failed, a proxy that drops trailers), the record is asked
    // for, and may say the group is done a moment after its output ended.
    let mut group = match ended {
        Some(group) if group.done => group,
        _ => api.group(group_id).await?.parsed,
    };
    for _ in 0..10 {
        if group.done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        group = api.group(group_id).await?.parsed;
    }
    if !group.done {
        anyhow::bail!(
            "the output of group {group_id} ended while the group is still {}",
            group.state
        );
    }
    // The group keeps the workers that could not start its job: `logs -f`
    // of a group started earlier counts them as `run --all` does.
    // (`run --all` warned of its own as they came: they are only counted.)
    let warned = start_failures > 0;
    let start_failures = start_failures.max(group.failed.len());
    report_group_failures(api, &group, start_failures, !warned, names).await;
    Ok(ExitCode::from(follow::group_exit_code(
        &group,
        start_failures,
    )))
}

async fn report_group_failures(
    api: &Api,
    group: &GroupInfo,
    start_failures: usize,
    each_start_failure: bool,
    names: HashMap<String, String>,
) {
    if group.jobs.iter().all(|j| j.state == "succeeded") && start_failures == 0 {
        return;
    }
    let ids = group.jobs.iter().map(|j| j.worker_id.as_str());
    let failed = group.failed.iter().map(|f| f.worker_id.as_str());
    let names = names_covering(api, names, ids.chain(failed)).await;
    for job in &group.jobs {
        if let Some(line) = follow::failure_summary(job) {
            eprintln!("clusterctl: {}: {line}", name_of(&names, &job.worker_id));
        }
    }
    if each_start_failure {
        for failure in &group.failed {
            eprintln!(
                "clusterctl: {}: could not start the job: {}",
                name_of(&names, &failure.worker_id),
                failure.error
            );
        }
    } else if start_failures > 0 {
        eprintln!("clusterctl: {start_failures} worker(s) could not start the job");
    }
}

/// `known`: the job exists (`run` started it), so a first request that
/// cannot reach the scheduler is retried, not taken for a wrong id.
async fn follow_to_stdout(
    api: &Api,
    job_id: &str,
    offset: u64,
    follow: bool,
    known: bool,
) -> Result<Option<JobInfo>, follow::FollowError> {
    let source = JobLogs { api, job_id };
    let mut stdout = crate::output::raw_stdout()?;
    follow::stream_output(
        &source,
        job_id,
        offset,
        follow,
        known,
        &mut stdout,
        &Retry::default(),
    )
    .await
}

/// The exit code of a followed job, with a line on stderr if it failed.
fn finished(job: JobInfo) -> ExitCode {
    if let Some(line) = follow::failure_summary(&job) {
        eprintln!("clusterctl: {line}");
    }
    ExitCode::from(follow::exit_code_of(&job))
}

async fn stop(api: &Api, format: Output, id: &str) -> anyhow::Result<ExitCode> {
    let (kind, answer) = {
        let _spinner = Spinner::start(format!("stopping {id}"));
        match api.stop(id).await {
            Ok(answer) => ("job", answer),
            Err(e) if e.is_job_not_found() => ("group", or_group(e, api.stop_group(id).await)?),
            Err(e) => return Err(e.into()),
        }
    };
    if !print_structured(format, &answer.raw)? {
        print_stdout(&format!("{kind} {id} {}\n", answer.parsed.state))?;
    }
    if !answer.parsed.success {
        anyhow::bail!(
            "the scheduler could not stop {kind} {id} (state: {})",
            answer.parsed.state
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn status(api: &Api, format: Output, id: &str) -> anyhow::Result<ExitCode> {
    let job_error = match api.job(id).await {
        Ok(answer) => {
            if !print_structured(format, &answer.raw)? {
                print_stdout(&output::job_block(SystemTime::now(), &answer.parsed))?;
            }
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) if e.is_job_not_found() => e,
        Err(e) => return Err(e.into()),
    };
    let answer = or_group(job_error, api.group(id).await)?;
    if !print_structured(format, &answer.raw)? {
        let names = worker_names(api).await;
        print_stdout(&output::group_block(
            SystemTime::now(),
            &answer.parsed,
            |id| names.get(id).cloned(),
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn groups(api: &Api, format: Output) -> anyhow::Result<ExitCode> {
    let answer = api.groups().await?;
    if !print_structured(format, &answer.raw)? {
        print_stdout(&output::groups_table(SystemTime::now(), &answer.parsed))?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn jobs(
    api: &Api,
    format: Output,
    worker: Option<String>,
    state: Option<String>,
) -> anyhow::Result<ExitCode> {
    // WORKER may be a name: resolve it, so a typo is an unknown worker
    // rather than an empty list.
    let worker_id = match worker {
        Some(worker) => Some(api.worker(&worker).await?.parsed.worker_id),
        None => None,
    };
    let mut filter = JobFilter {
        worker_id,
        state,
        limit: None,
        cursor: None,
    };
    let mut raw = Vec::new();
    let mut jobs = Vec::new();
    loop {
        let page = api.jobs(&filter).await?;
        if let Some(Value::Array(items)) = page.raw.get("jobs") {
            raw.extend(items.iter().cloned());
        }
        jobs.extend(page.parsed.jobs);
        if jobs.len() >= MAX_LISTED_JOBS {
            if page.parsed.next_cursor.is_some() {
                eprintln!(
                    "clusterctl: listing only the newest {MAX_LISTED_JOBS} jobs; narrow the list \
                     with --worker or --state"
                );
            }
            raw.truncate(MAX_LISTED_JOBS);
            jobs.truncate(MAX_LISTED_JOBS);
            break;
        }
        match page.parsed.next_cursor {
            // A cursor that does not move would loop forever.
            Some(next) if filter.cursor.as_ref() != Some(&next) => filter.cursor = Some(next),
            _ => break,
        }
    }

    if print_structured(format, &Value::Array(raw))? {
        return Ok(ExitCode::SUCCESS);
    }
    // Worker names read better than ids; without them, ids will do.
    let names = worker_names(api).await;
    print_stdout(&output::jobs_table(SystemTime::now(), &jobs, |id| {
        names.get(id).cloned()
    }))?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use jobcluster_proto::http::ErrorBody;
    use reqwest::StatusCode;

    use super::*;

    fn status(status: StatusCode, code: &str) -> ApiError {
        ApiError::Status {
            status,
            body: Some(ErrorBody {
                error: format!("error {code}"),
                code: code.into(),
                job_id: None,
            }),
            text: String::new(),
        }
    }

    #[test]
    fn only_job_not_found_falls_back_to_the_group_route() {
        assert!(status(StatusCode::NOT_FOUND, "job_not_found").is_job_not_found());
        assert!(!status(StatusCode::NOT_FOUND, "worker_not_found").is_job_not_found());
        assert!(!status(StatusCode::BAD_REQUEST, "job_not_found").is_job_not_found());
        assert!(
            !ApiError::Transport {
                message: "refused".into(),
                retryable: true
            }
            .is_job_not_found()
        );
    }

    #[test]
    fn an_unknown_group_reports_the_job_error() {
        let job_error = || status(StatusCode::NOT_FOUND, "job_not_found");
        assert_eq!(or_group(job_error(), Ok::<u8, _>(7)).unwrap(), 7);
        for unknown in [
            status(StatusCode::NOT_FOUND, "group_not_found"),
            status(StatusCode::BAD_REQUEST, "invalid_group_id"),
        ] {
            let err = or_group(job_error(), Err::<u8, _>(unknown)).unwrap_err();
            assert_eq!(err.to_string(), "error job_not_found (job_not_found)");
        }
        // Anything else about the group is the group's error.
        let err = or_group(
            job_error(),
            Err::<u8, _>(status(StatusCode::FORBIDDEN, "forbidden")),
        )
        .unwrap_err();
        assert_eq!(err.code(), Some("forbidden"));
    }

    #[test]
    fn group_requests_fan_out_with_the_selector() {
        let Command::Run(args) = Cli::try_parse_from([
            "clusterctl",
            "run",
            "--all",
            "--selector",
            "zone=a",
            "--command",
            "bash",
            "sync.sh",
            "--",
            "-v",
        ])
        .unwrap()
        .command
        else {
            panic!("not run")
        };
        let request = group_request(&args);
        assert_eq!(
            serde_json::to_value(&request).unwrap(),
            serde_json::json!({
                "all": true,
                "selector": {"zone": "a"},
                "command": "bash",
                "path": "sync.sh",
                "args": ["-v"],
            })
        );
        assert_eq!(target(&args), "every worker with zone=a");
    }

    #[test]
    fn the_token_comes_from_the_flag_the_file_or_the_environment_in_that_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "  from-file\n").unwrap();
        let global = |args: &[&str]| {
            Cli::try_parse_from(["clusterctl"].iter().chain(args).chain(&["workers"]))
                .unwrap()
                .global
        };
        let no_env = |_: &str| None;
        let env = |name: &str| match name {
            "CLUSTERCTL_TOKEN" => Some("from-env".into()),
            "CLUSTERCTL_TOKEN_FILE" => Some(file.clone().into_os_string()),
            _ => None,
        };
        let only_token = |name: &str| (name == "CLUSTERCTL_TOKEN").then(|| "from-env".into());
        let file_arg = file.to_str().unwrap();
        type Env<'a> = &'a dyn Fn(&str) -> Option<std::ffi::OsString>;
        let cases: [(&[&str], Env<'_>, Option<&str>); 5] = [
            (&[], &no_env, None),
            (&["--token", "flag"], &env, Some("flag")),
            (&["--token-file", file_arg], &no_env, Some("from-file")),
            (&[], &env, Some("from-file")),
            (&[], &only_token, Some("from-env")),
        ];
        for (args, env, want) in cases {
            let got = token(&global(args), env).unwrap();
            assert_eq!(got.as_deref(), want, "{args:?}");
        }
        assert!(
            Cli::try_parse_from(["clusterctl", "--token", "a", "--token-file", "f", "workers"])
                .is_err(),
            "--token and --token-file together"
        );

        std::fs::write(&file, "\n").unwrap();
        let err = token(&global(&["--token-file", file_arg]), no_env).unwrap_err();
        assert!(err.to_string().contains("is empty"), "{err}");
        let missing = dir.path().join("missing");
        let err = token(
            &global(&["--token-file", missing.to_str().unwrap()]),
            no_env,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("missing") && err.contains("--token-file"),
            "{err}"
        );
    }
}
