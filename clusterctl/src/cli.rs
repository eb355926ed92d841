//! The command line (SPEC §8) as clap types. No behaviour lives here.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use jobcluster_pki::Role;

/// The default scheduler URL (SPEC §3).
pub(crate) const DEFAULT_SCHEDULER: &str = "https://127.0.0.1:3000";

#[derive(Debug, Parser)]
#[command(
    name = "clusterctl",
    version,
    about = "Client of the job cluster",
    propagate_version = true,
    after_long_help = INTERRUPT_HELP
)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) global: Global,
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Flags every API command takes, before or after the subcommand.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Global options")]
pub(crate) struct Global {
    /// Base URL of the scheduler's HTTPS API; several, separated by commas,
    /// when schedulers share a store: a request that cannot reach one goes
    /// to the next.
    #[arg(
        long,
        global = true,
        value_name = "URL",
        env = "CLUSTERCTL_SCHEDULER",
        default_value = DEFAULT_SCHEDULER
    )]
    pub(crate) scheduler: String,
    /// CA certificate the scheduler's certificate must chain to (ca.pem).
    #[arg(long, global = true, value_name = "FILE", env = "CLUSTERCTL_CA")]
    pub(crate) ca: Option<PathBuf>,
    /// Client certificate (client.pem).
    #[arg(long, global = true, value_name = "FILE", env = "CLUSTERCTL_CERT")]
    pub(crate) cert: Option<PathBuf>,
    /// Private key of the client certificate (client-key.pem).
    #[arg(long, global = true, value_name = "FILE", env = "CLUSTERCTL_KEY")]
    pub(crate) key: Option<PathBuf>,
    /// Bearer token; with it, --cert and --key are optional. Any user of
    /// the machine can read it in `ps`: prefer --token-file, or the
    /// environment (CLUSTERCTL_TOKEN_FILE, or CLUSTERCTL_TOKEN).
    #[arg(long, global = true, value_name = "TOKEN")]
    pub(crate) token: Option<String>,
    /// File whose content is the bearer token (surrounding whitespace is
    /// ignored; `-` reads standard input). Also CLUSTERCTL_TOKEN_FILE.
    #[arg(long, global = true, value_name = "FILE", conflicts_with = "token")]
    pub(crate) token_file: Option<PathBuf>,
    /// Output format: tables for people, or the API's objects as JSON or YAML.
    #[arg(
        short,
        long,
        global = true,
        value_enum,
        value_name = "FORMAT",
        default_value_t = Output::Table
    )]
    pub(crate) output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
    // No doc comments: they would turn `--help` into a page per value.
    Table,
    Json,
    Yaml,
}

/// What Ctrl-C does (`--help`, and the manual page).
const INTERRUPT_HELP: &str = "\
Ctrl-C during `run` stops the job (or the group) it started, waits until it has ended and exits \
130; a second Ctrl-C leaves at once (exit 130 too) and leaves the job as it is. Ctrl-C during \
`logs -f` only stops following: the job runs on (exit 130).";

/// How `start` and `run` survive a broken connection (`--help`).
const START_RETRY_HELP: &str = "\
Each invocation sends its start with a fresh Idempotency-Key. A start that fails on the way \
(connection refused or reset, a timeout, 502/503/504 from a proxy or a restarting scheduler, \
the scheduler's own request deadline) is \
sent again with the same key, up to 5 times with growing pauses, with one line on stderr each: \
the scheduler answers a start it already made with that job (or group) instead of starting a \
second one. If the scheduler recorded the job but its worker did not confirm the start \
(start_unconfirmed), `start` prints the job id and exits 69 (its state is unknown: check \
`clusterctl status JOB` before starting it again), and `run` waits for that job and follows it.";

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// List workers; show, drain, undrain or remove one.
    Workers(WorkersArgs),
    /// Start a job (or, with --all, a fan-out group) and print its id.
    #[command(after_long_help = START_RETRY_HELP)]
    Start(StartArgs),
    /// Start a job (or, with --all, a fan-out group), follow its output and
    /// exit with its exit code.
    ///
    /// Ctrl-C stops the job (every job of the group), waits until it has
    /// ended and exits 130; a second Ctrl-C leaves at once, exit 130, and
    /// leaves the job as it is.
    #[command(after_long_help = START_RETRY_HELP)]
    Run(StartArgs),
    /// Stop a job (its whole process group), or every job of a group.
    Stop {
        /// Job id or group id.
        #[arg(value_name = "ID")]
        job: String,
    },
    /// Show a job or a group.
    Status {
        /// Job id or group id.
        #[arg(value_name = "ID")]
        job: String,
    },
    /// List jobs, newest first.
    Jobs {
        /// Only jobs of this worker (id or name).
        #[arg(long, value_name = "WORKER")]
        worker: Option<String>,
        /// Only jobs in this state.
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(
            jobcluster_proto::http::JOB_STATES
        ))]
        state: Option<String>,
    },
    /// Print a job's (or a group's) output; with -f, follow it and exit
    /// with the job's exit code.
    ///
    /// Ctrl-C while following only stops following (exit 130): the job
    /// runs on.
    Logs {
        /// Follow the output until the job (every job of the group) has ended.
        #[arg(short, long)]
        follow: bool,
        /// Start at this byte of the output (jobs only).
        #[arg(long, value_name = "N", default_value_t = 0)]
        offset: u64,
        /// Job id or group id.
        #[arg(value_name = "ID")]
        job: String,
    },
    /// List fan-out groups, newest first.
    Groups,
    /// Measure the cluster through the scheduler: job starts, output streaming.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Create and issue the cluster's certificates.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish or
    /// powershell), e.g. `clusterctl completion bash >
    /// /etc/bash_completion.d/clusterctl`.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct WorkersArgs {
    /// Include workers that have left the cluster.
    #[arg(long)]
    pub(crate) all: bool,
    #[command(subcommand)]
    pub(crate) command: Option<WorkersCommand>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum WorkersCommand {
    /// Show one worker.
    Show {
        /// Worker id or name.
        worker: String,
    },
    /// Stop giving the worker new jobs; its running jobs finish.
    Drain {
        /// Worker id or name.
        worker: String,
    },
    /// Give the worker new jobs again.
    Undrain {
        /// Worker id or name.
        worker: String,
    },
    /// Forget a worker that is down or has left; its jobs' records stay.
    /// A live worker is refused: stop it first. If it starts again, it
    /// registers with a new id.
    Rm {
        /// Worker id or name.
        worker: String,
    },
}

#[derive(Debug, Args)]
pub(crate) struct StartArgs {
    /// Worker id or name; without it the scheduler picks a worker.
    #[arg(long, value_name = "WORKER")]
    pub(crate) worker: Option<String>,
    /// One job on every eligible worker (with --selector: every one carrying
    /// the labels), as a fan-out group.
    #[arg(long, conflicts_with = "worker")]
    pub(crate) all: bool,
    /// Only workers with this label (repeatable); the scheduler picks one
    /// (with --all: every one).
    #[arg(long = "selector", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub(crate) selector: Vec<(String, String)>,
    /// Runner plugin; default: the plugin whose extensions match SCRIPT.
    #[arg(long, value_name = "PLUGIN")]
    pub(crate) command: Option<String>,
    /// Queue priority: higher starts first when jobs wait for slots.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    pub(crate) priority: i32,
    /// Never wait in the queue: without a free slot now, the start is
    /// refused (429 worker_busy or 409).
    #[arg(long)]
    pub(crate) no_queue: bool,
    /// Give up on the job (it ends failed) if it is still queued after
    /// this long (e.g. 90s, 10m).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) queue_timeout: Option<String>,
    /// Queue even if the named worker is down, unresponsive or draining,
    /// or no worker could run the job now.
    #[arg(long)]
    pub(crate) wait_for_worker: bool,
    /// Script path, relative to the worker's scripts_dir.
    #[arg(value_name = "SCRIPT")]
    pub(crate) script: String,
    /// Arguments for the script, after `--`.
    #[arg(last = true, value_name = "ARGS")]
    pub(crate) args: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum BenchCommand {
    /// Start many trivial jobs from concurrent clients; report starts per
    /// second and request latency.
    Start(BenchStartArgs),
    /// Start one job writing S MiB and follow it with concurrent followers;
    /// report MiB/s.
    Follow(BenchFollowArgs),
    /// Read one job's status over and over on one kept connection; report
    /// the latency of `GET /v1/jobs/{id}`.
    Status(BenchStatusArgs),
    /// Simulate N workers (real certificates, registrations and heartbeats,
    /// one connection each) against a live scheduler; report registrations
    /// per second, the scheduler's CPU share and memory per worker, and API
    /// latency without and with them.
    Workers(BenchWorkersArgs),
}

impl BenchCommand {
    /// Whether the bench is one client making one request at a time.
    pub(crate) fn one_client(&self) -> bool {
        match self {
            BenchCommand::Status(_) => true,
            BenchCommand::Start(args) => args.clients == 1,
            BenchCommand::Follow(_) | BenchCommand::Workers(_) => false,
        }
    }
}

/// Most simulated workers in one run: each holds a connection (a file
/// descriptor here and in the scheduler) and a certificate in memory.
pub(crate) const MAX_SIMULATED_WORKERS: u32 = 20_000;

#[derive(Debug, Args)]
pub(crate) struct BenchWorkersArgs {
    /// Workers to simulate, 1 to 20000.
    #[arg(
        long,
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_SIMULATED_WORKERS))
    )]
    pub(crate) simulate: u32,
    /// Directory with the cluster CA (ca.pem and ca-key.pem, as written by
    /// `clusterctl pki init`): each simulated worker gets a worker
    /// certificate from it, in memory only.
    #[arg(long, value_name = "DIR")]
    pub(crate) pki: PathBuf,
    /// The scheduler's gRPC address (host:port), where workers register.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:50000")]
    pub(crate) grpc: String,
    /// The scheduler's process id, for its CPU time and memory
    /// (/proc/PID/stat and status). Default: the only process named
    /// schedulerd; without one, those figures are left out.
    #[arg(long, value_name = "PID")]
    pub(crate) scheduler_pid: Option<u32>,
    /// Seconds of steady heartbeats over which the scheduler's CPU share
    /// is measured (after one heartbeat interval to settle).
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 30,
        value_parser = clap::value_parser!(u32).range(1..=86_400)
    )]
    pub(crate) steady: u32,
    /// Also sample the scheduler's RSS every SECONDS during the steady window.
    #[arg(
        long,
        value_name = "SECONDS",
        value_parser = clap::value_parser!(u32).range(1..=3_600)
    )]
    pub(crate) sample_every: Option<u32>,
    /// Requests per API route for each latency measurement.
    #[arg(
        long,
        value_name = "R",
        default_value_t = 200,
        value_parser = clap::value_parser!(u32).range(1..=100_000)
    )]
    pub(crate) requests: u32,
    /// Registrations in flight at once.
    #[arg(
        long,
        value_name = "C",
        default_value_t = 64,
        value_parser = clap::value_parser!(u32).range(1..=4_096)
    )]
    pub(crate) concurrency: u32,
    /// Simulated workers are named PREFIX-00001, PREFIX-00002, ...
    #[arg(long, value_name = "PREFIX", default_value = "sim")]
    pub(crate) prefix: String,
}

#[derive(Debug, Args)]
pub(crate) struct BenchStatusArgs {
    /// The job to read (a finished one measures the scheduler alone).
    #[arg(long, value_name = "JOB")]
    pub(crate) job: String,
    /// Requests to send, one after the other.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 2000,
        value_parser = clap::value_parser!(u32).range(1..=10_000_000)
    )]
    pub(crate) requests: u32,
}

#[derive(Debug, Args)]
pub(crate) struct BenchStartArgs {
    /// Worker id or name to start the jobs on.
    #[arg(long, value_name = "WORKER")]
    pub(crate) worker: String,
    /// Concurrent clients, each with its own HTTPS connection.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 8,
        value_parser = clap::value_parser!(u32).range(1..=10_000)
    )]
    pub(crate) clients: u32,
    /// Jobs to start in all.
    #[arg(
        long,
        value_name = "M",
        default_value_t = 500,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub(crate) jobs: u32,
    /// Script to start, relative to the worker's scripts_dir.
    #[arg(long, value_name = "PATH", default_value = "true.sh")]
    pub(crate) script: String,
    /// Runner plugin; default: the plugin whose extensions match the script.
    #[arg(long, value_name = "PLUGIN")]
    pub(crate) command: Option<String>,
    /// First measure the floor on this machine: as many local `bash
    /// noop.sh` spawned and reaped, as many at a time as there are
    /// clients; then report the cluster's rate as a share of it.
    #[arg(long)]
    pub(crate) floor: bool,
    /// Each client waits MS milliseconds after each answer before its next
    /// start, so that a start does not share the machine with the end of
    /// the job before it (a no-op job ends within milliseconds); the rate
    /// then counts the pauses too.
    #[arg(
        long,
        value_name = "MS",
        default_value_t = 0,
        value_parser = clap::value_parser!(u64).range(0..=60_000)
    )]
    pub(crate) pause: u64,
}

#[derive(Debug, Args)]
pub(crate) struct BenchFollowArgs {
    /// Worker id or name to run the job on.
    #[arg(long, value_name = "WORKER")]
    pub(crate) worker: String,
    /// MiB of output the job writes.
    #[arg(
        long,
        value_name = "S",
        default_value_t = 256,
        value_parser = clap::value_parser!(u64).range(1..=1_048_576)
    )]
    pub(crate) mib: u64,
    /// Concurrent followers, each with its own HTTPS connection.
    #[arg(
        long,
        value_name = "F",
        default_value_t = 1,
        value_parser = clap::value_parser!(u32).range(1..=1_000)
    )]
    pub(crate) followers: u32,
    /// Script that writes as many bytes as its first argument says.
    #[arg(long, value_name = "PATH", default_value = "blast.sh")]
    pub(crate) script: String,
    /// Then read the finished job's output back from its first byte, with
    /// every follower at once, and report that replay too.
    #[arg(long)]
    pub(crate) replay: bool,
    /// First measure the floor on this machine: as many local `head -c
    /// BYTES /dev/zero` (what blast.sh runs) read through pipes by this
    /// process as there are followers (at most 64), all at once; then
    /// report each pass as a share of it.
    #[arg(long)]
    pub(crate) floor: bool,
}

#[derive(Debug, Subcommand)]
pub(crate) enum PkiCommand {
    /// Create DIR with a new CA and the scheduler and client certificates.
    Init {
        dir: PathBuf,
        /// Extra host name or IP address for the certificates (repeatable).
        #[arg(long = "san", value_name = "HOST")]
        sans: Vec<String>,
    },
    /// Issue NAME.pem and NAME-key.pem in DIR, signed by DIR's CA.
    Issue {
        dir: PathBuf,
        /// scheduler, worker or client.
        #[arg(long, value_parser = parse_role)]
        role: Role,
        name: String,
        /// Extra host name or IP address for the certificate (repeatable).
        #[arg(long = "san", value_name = "HOST")]
        sans: Vec<String>,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    s.parse()
        .map_err(|e: jobcluster_pki::PkiError| e.to_string())
}

/// `KEY=VALUE`, for `--selector`.
fn parse_duration(s: &str) -> Result<String, String> {
    humantime::parse_duration(s)
        .map(|_| s.to_owned())
        .map_err(|e| format!("{s:?} is not a duration such as 90s or 10m: {e}"))
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("clusterctl").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_work_before_and_after_the_subcommand() {
        let before = parse(&["-o", "json", "--ca", "ca.pem", "status", "j1"]).unwrap();
        let after = parse(&["status", "j1", "--ca", "ca.pem", "-o", "json"]).unwrap();
        for cli in [before, after] {
            assert_eq!(cli.global.output, Output::Json);
            assert_eq!(cli.global.ca, Some(PathBuf::from("ca.pem")));
        }
    }

    #[test]
    fn start_takes_script_args_after_double_dash() {
        let cli = parse(&["start", "--worker", "w1", "count.sh", "--", "-n", "3"]).unwrap();
        let Command::Start(start) = cli.command else {
            panic!("not start")
        };
        assert_eq!(start.worker.as_deref(), Some("w1"));
        assert_eq!(start.command, None);
        assert_eq!(start.script, "count.sh");
        assert_eq!(start.args, ["-n", "3"]);
    }

    #[test]
    fn workers_show_and_list() {
        let cli = parse(&["workers", "--all"]).unwrap();
        let Command::Workers(w) = cli.command else {
            panic!("not workers")
        };
        assert!(w.all && w.command.is_none());
        let cli = parse(&["workers", "show", "w1"]).unwrap();
        let Command::Workers(w) = cli.command else {
            panic!("not workers")
        };
        assert!(matches!(w.command, Some(WorkersCommand::Show { worker }) if worker == "w1"));
        let cli = parse(&["workers", "rm", "w2"]).unwrap();
        let Command::Workers(w) = cli.command else {
            panic!("not workers")
        };
        assert!(matches!(w.command, Some(WorkersCommand::Rm { worker }) if worker == "w2"));
    }

    #[test]
    fn bench_defaults_and_limits() {
        let cli = parse(&["bench", "start", "--worker", "w1"]).unwrap();
        let Command::Bench(BenchCommand::Start(start)) = cli.command else {
            panic!("not bench start")
        };
        assert_eq!((start.clients, start.jobs), (8, 500));
        assert_eq!(start.script, "true.sh");
        assert_eq!(start.command, None);

        let cli = parse(&["-o", "json", "bench", "follow", "--worker", "w2"]).unwrap();
        assert_eq!(cli.global.output, Output::Json);
        let Command::Bench(BenchCommand::Follow(follow)) = cli.command else {
            panic!("not bench follow")
        };
        assert_eq!((follow.mib, follow.followers), (256, 1));
        assert_eq!(follow.script, "blast.sh");

        for bad in [
            &["bench", "start", "--worker", "w1", "--clients", "0"][..],
            &["bench", "start", "--worker", "w1", "--jobs", "0"],
            &["bench", "follow", "--worker", "w1", "--followers", "0"],
            &["bench", "follow", "--worker", "w1", "--mib", "0"],
            &["bench", "follow"],
        ] {
            assert_eq!(parse(bad).unwrap_err().exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn bad_state_and_bad_selector_are_usage_errors() {
        let err = parse(&["jobs", "--state", "sleeping"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let err = parse(&["start", "--selector", "zone", "count.sh"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let Command::Start(start) = parse(&["start", "--selector", "zone=a", "count.sh"])
            .unwrap()
            .command
        else {
            panic!("not a start");
        };
        assert_eq!(start.worker, None);
        assert_eq!(start.selector, [("zone".to_owned(), "a".to_owned())]);
    }

    #[test]
    fn all_fans_out_and_conflicts_with_worker() {
        for cmd in ["start", "run"] {
            let err = parse(&[cmd, "--all", "--worker", "w1", "count.sh"]).unwrap_err();
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::ArgumentConflict,
                "{cmd}"
            );
            assert_eq!(err.exit_code(), 2);
        }
        let cli = parse(&[
            "run",
            "--all",
            "--selector",
            "zone=a",
            "count.sh",
            "--",
            "x",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert!(run.all);
        assert_eq!(run.worker, None);
        assert_eq!(run.selector, [("zone".to_owned(), "a".to_owned())]);
        assert_eq!(run.args, ["x"]);
        let Command::Start(start) = parse(&["start", "--worker", "w1", "count.sh"])
            .unwrap()
            .command
        else {
            panic!("not start")
        };
        assert!(!start.all);
        assert!(matches!(
            parse(&["groups"]).unwrap().command,
            Command::Groups
        ));
        assert_eq!(parse(&["groups", "x"]).unwrap_err().exit_code(), 2);
    }
}
