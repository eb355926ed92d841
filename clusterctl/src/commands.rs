//! One function per subcommand: call the API, print, pick the exit code.
//!
//! stdout carries only what a script consumes (ids, tables, JSON/YAML, job
//! output); everything else goes to stderr.

use std::collections::{BTreeMap, HashMap};
use std::process::ExitCode;
use std::time::SystemTime;

use clap::CommandFactory;
use jobcluster_proto::http::{JobFilter, JobInfo, StartJob};
use serde_json::Value;

use crate::api::{Api, ConnectOptions};
use crate::cli::{Cli, Command, Global, Output, PkiCommand, StartArgs, WorkersCommand};
use crate::follow::{self, JobLogs, Retry};
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
            // bench measures its own single thread.
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))?;
            runtime.block_on(crate::bench::run(
                connect_options(&cli.global),
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

fn connect_options(global: &Global) -> ConnectOptions {
    ConnectOptions {
        scheduler: global.scheduler.clone(),
        ca: global.ca.clone(),
        cert: global.cert.clone(),
        key: global.key.clone(),
        token: global.token.clone(),
    }
}

async fn api_command(global: &Global, command: Command) -> anyhow::Result<ExitCode> {
    let api = Api::new(&connect_options(global))?;
    let format = global.output;
    match command {
        Command::Workers(args) => match args.command {
            Some(WorkersCommand::Show { worker }) => workers_show(&api, format, &worker).await,
            Some(WorkersCommand::Drain { worker }) => drain(&api, format, &worker, true).await,
            Some(WorkersCommand::Undrain { worker }) => drain(&api, format, &worker, false).await,
            None => workers(&api, format, args.all).await,
        },
        Command::Start(args) => start(&api, format, &args).await,
        Command::Run(args) => run_job(&api, &args).await,
        Command::Stop { job } => stop(&api, format, &job).await,
        Command::Status { job } => status(&api, format, &job).await,
        Command::Jobs { worker, state } => jobs(&api, format, worker, state).await,
        Command::Logs {
            follow,
            offset,
            job,
        } => logs(&api, &job, offset, follow).await,
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

fn start_request(args: &StartArgs) -> StartJob {
    StartJob {
        worker_id: args.worker.clone().unwrap_or_default(),
        selector: args.selector.iter().cloned().collect(),
        // Absent: the worker picks the plugin by the script's extension.
        command: args.command.clone(),
        path: args.script.clone(),
        args: args.args.clone(),
        env: BTreeMap::new(),
    }
}

async fn start(api: &Api, format: Output, args: &StartArgs) -> anyhow::Result<ExitCode> {
    let answer = {
        let _spinner = Spinner::start(format!("starting {} on {}", args.script, target(args)));
        api.start(&start_request(args)).await?
    };
    if !print_structured(format, &answer.raw)? {
        // The id alone, so `JOB=$(clusterctl start ...)` works.
        print_stdout(&format!("{}\n", answer.parsed.job_id))?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn run_job(api: &Api, args: &StartArgs) -> anyhow::Result<ExitCode> {
    let started = {
        let _spinner = Spinner::start(format!("starting {} on {}", args.script, target(args)));
        api.start(&start_request(args)).await?.parsed
    };
    eprintln!("started job {} on {}", started.job_id, started.worker_id);
    let job = follow_to_stdout(api, &started.job_id, 0, true).await?;
    Ok(job.map_or(ExitCode::SUCCESS, finished))
}

async fn logs(api: &Api, job: &str, offset: u64, follow: bool) -> anyhow::Result<ExitCode> {
    let job = follow_to_stdout(api, job, offset, follow).await?;
    Ok(job.map_or(ExitCode::SUCCESS, finished))
}

async fn follow_to_stdout(
    api: &Api,
    job_id: &str,
    offset: u64,
    follow: bool,
) -> anyhow::Result<Option<JobInfo>> {
    let source = JobLogs { api, job_id };
    let mut stdout = std::io::stdout().lock();
    let job = follow::stream_output(
        &source,
        job_id,
        offset,
        follow,
        &mut stdout,
        &Retry::default(),
    )
    .await?;
    Ok(job)
}

/// The exit code of a followed job, with a line on stderr if it failed.
fn finished(job: JobInfo) -> ExitCode {
    if let Some(line) = follow::failure_summary(&job) {
        eprintln!("clusterctl: {line}");
    }
    ExitCode::from(follow::exit_code_of(&job))
}

async fn stop(api: &Api, format: Output, job: &str) -> anyhow::Result<ExitCode> {
    let answer = {
        let _spinner = Spinner::start(format!("stopping job {job}"));
        api.stop(job).await?
    };
    if !print_structured(format, &answer.raw)? {
        print_stdout(&format!("job {job} {}\n", answer.parsed.state))?;
    }
    if !answer.parsed.success {
        anyhow::bail!(
            "the scheduler could not stop job {job} (state: {})",
            answer.parsed.state
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn status(api: &Api, format: Output, job: &str) -> anyhow::Result<ExitCode> {
    let answer = api.job(job).await?;
    if !print_structured(format, &answer.raw)? {
        print_stdout(&output::job_block(SystemTime::now(), &answer.parsed))?;
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
    let names: HashMap<String, String> = match api.workers(true).await {
        Ok(workers) => workers
            .parsed
            .into_iter()
            .map(|w| (w.worker_id, w.name))
            .collect(),
        Err(_) => HashMap::new(),
    };
    print_stdout(&output::jobs_table(SystemTime::now(), &jobs, |id| {
        names.get(id).cloned()
    }))?;
    Ok(ExitCode::SUCCESS)
}
