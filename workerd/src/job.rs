//! Jobs: spawning, supervising, stopping, recording, and their output log.
//!
//! Each job runs in its own process group with stdout and stderr joined on
//! one pipe, so the output log keeps the exact order the job wrote in. A
//! pump task copies the pipe to `output.log` and publishes the new length on
//! a `watch` channel; followers read the file from their own offset and wake
//! on that channel, so a slow follower never slows the job or anyone else.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jobcluster_plugins::Plugin;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::config::RunAs;
use crate::confine::PathError;

/// Largest piece of output read or sent at once.
pub(crate) const CHUNK: usize = 64 * 1024;
/// After a job's main process is gone and its group killed, how long the
/// pump may still drain the pipe (a process that left the group may hold
/// it open forever).
const STOP_WAIT: Duration = Duration::from_secs(5);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Environment variables passed from the worker to every job.
const INHERITED_ENV: &[&str] = &["PATH", "HOME", "LANG", "LC_ALL", "TZ", "USER", "LOGNAME"];
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum State {
    Running,
    Succeeded,
    Failed,
    Stopped,
    Lost,
}

impl State {
    pub(crate) fn is_done(self) -> bool {
        self != State::Running
    }
}

/// Everything known about a job; also its `job.json` on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct JobRecord {
    pub(crate) id: Uuid,
    pub(crate) command: String,
    pub(crate) path: String,
    pub(crate) args: Vec<String>,
    pub(crate) state: State,
    pub(crate) exit_code: Option<i32>,
    pub(crate) signal: Option<i32>,
    pub(crate) error_text: String,
    pub(crate) created_at_ms: u64,
    pub(crate) started_at_ms: u64,
    pub(crate) finished_at_ms: u64,
    /// Process group while running: what a restarted worker must clean up.
    pub(crate) pgid: Option<i32>,
    pub(crate) output_bytes: u64,
    /// The output log was deleted by the retention limits.
    #[serde(default)]
    pub(crate) output_expired: bool,
}

/// How far the output log has been written, and whether it is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Progress {
    pub(crate) len: u64,
    pub(crate) done: bool,
}

/// Why a job request was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum JobError {
    #[error("invalid path: {0}")]
    Path(#[from] PathError),
    #[error("unknown plugin {name:?}: this worker offers {offered}")]
    UnknownPlugin { name: String, offered: String },
    #[error("no plugin runs {path:?}: name one with `command` (this worker offers {offered})")]
    NoPluginForScript { path: String, offered: String },
    #[error("invalid job id {0:?}: expected a UUID")]
    BadJobId(String),
    #[error("unknown job {0}")]
    UnknownJob(String),
    #[error("job {0} already exists")]
    Exists(Uuid),
    #[error("invalid {what}: {reason}")]
    BadInput { what: &'static str, reason: String },
    #[error("the worker is shutting down and takes no new jobs")]
    ShuttingDown,
    #[error("the worker already runs its maximum of {0} jobs; try later or another worker")]
    Busy(usize),
    #[error("offset {offset} is past the end of the output ({len} bytes)")]
    OffsetPastEnd { offset: u64, len: u64 },
    #[error("the output of job {0} was deleted by the worker's retention limits")]
    OutputExpired(Uuid),
    #[error("worker storage: {0}")]
    Io(#[from] std::io::Error),
}

/// One job known to this worker, running or finished.
#[derive(Debug)]
pub(crate) struct Job {
    record: Mutex<JobRecord>,
    progress: watch::Sender<Progress>,
    stop: CancellationToken,
    log_path: PathBuf,
}

impl Job {
    pub(crate) fn record(&self) -> JobRecord {
        // Poisoning only follows a panic elsewhere; the record is still whole.
        self.record
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }

    pub(crate) fn log_path(&self) -> &Path {
        &self.log_path
    }

    fn update(&self, f: impl FnOnce(&mut JobRecord)) -> JobRecord {
        let mut record = self.record.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut record);
        record.clone()
    }
}

/// What a StartJob asks for, before validation.
#[derive(Debug)]
pub(crate) struct StartRequest {
    pub(crate) job_id: String,
    pub(crate) command: String,
    pub(crate) path: String,
    pub(crate) args: Vec<String>,
    pub(crate) env: BTreeMap<String, String>,
}

/// The jobs of this worker.
#[derive(Debug)]
pub(crate) struct Jobs {
    jobs_dir: PathBuf,
    scripts_dir: PathBuf,
    worker_name: String,
    plugins: BTreeMap<String, Plugin>,
    // std RwLock: lookups are short and never cross an await.
    map: RwLock<HashMap<Uuid, Arc<Job>>>,
    changes: Arc<Changes>,
    accepting: AtomicBool,
    tracker: TaskTracker,
    /// Jobs whose process runs now (for `max_jobs`).
    running: Arc<AtomicUsize>,
    policy: Policy,
}

/// A reserved place among the running jobs, returned on drop unless kept.
struct RunningSlot<'a> {
    running: &'a AtomicUsize,
    kept: bool,
}

impl<'a> RunningSlot<'a> {
    fn take(running: &'a AtomicUsize, max: Option<usize>) -> Result<Self, JobError> {
        let before = running.fetch_add(1, Ordering::AcqRel);
        let slot = RunningSlot {
            running,
            kept: false,
        };
        match max {
            Some(max) if before >= max => Err(JobError::Busy(max)),
            _ => Ok(slot),
        }
    }

    fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for RunningSlot<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.running.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// How jobs may run on this worker.
#[derive(Debug, Clone, Default)]
pub(crate) struct Policy {
    /// Uid and gid per plugin, when jobs run as another user.
    pub(crate) run_as: BTreeMap<String, RunAs>,
    pub(crate) max_jobs: Option<usize>,
    /// The delegated cgroup v2 jobs get their groups in, if there is one.
    pub(crate) cgroups: Option<crate::cgroup::Cgroups>,
}

/// Why the supervisor ended a job that was still running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Stopped,
    TimedOut(Duration),
    OutputLimit(u64),
}

/// What the worker must tell others about: jobs whose state changed since
/// the scheduler last heard of them, and a wake-up when one finishes.
#[derive(Debug, Default)]
struct Changes {
    dirty: Mutex<HashSet<Uuid>>,
    finished: Notify,
}

impl Changes {
    fn mark(&self, ids: impl IntoIterator<Item = Uuid>) {
        self.dirty
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(ids);
    }
}

impl Jobs {
    /// Opens the job store under `state_dir` and loads the records of
    /// earlier runs. A job recorded as running belonged to a worker that
    /// died: it is recorded `lost`.
    pub(crate) async fn open(
        state_dir: &Path,
        scripts_dir: PathBuf,
        worker_name: String,
        plugins: BTreeMap<String, Plugin>,
        policy: Policy,
    ) -> Result<Self, std::io::Error> {
        let jobs_dir = state_dir.join("jobs");
        let dir = jobs_dir.clone();
        let loaded = tokio::task::spawn_blocking(move || load_records(&dir))
            .await
            .map_err(std::io::Error::other)??;
        let mut map = HashMap::new();
        let mut dirty = HashSet::new();
        for (mut record, len) in loaded {
            if record.state == State::Running {
                // The worker died under this job. Whatever is left of its
                // process group must not live on unsupervised.
                let id = record.id;
                let pgid = record.pgid;
                let killed = tokio::task::spawn_blocking(move || kill_leftovers(id, pgid))
                    .await
                    .unwrap_or(0);
                record.state = State::Lost;
                record.error_text = if killed > 0 {
                    format!(
                        "the worker stopped while the job ran; {killed} leftover process(es) killed"
                    )
                } else {
                    "the worker stopped while the job ran".into()
                };
                record.finished_at_ms = now_ms();
                record.pgid = None;
                record.output_bytes = len;
                write_record(&jobs_dir, &record).await?;
                dirty.insert(record.id);
                tracing::warn!(job_id = %record.id, killed, "job was running when the worker stopped; recorded lost");
            }
            let (progress, _) = watch::channel(Progress { len, done: true });
            let id = record.id;
            map.insert(
                id,
                Arc::new(Job {
                    log_path: jobs_dir.join(id.to_string()).join("output.log"),
                    record: Mutex::new(record),
                    progress,
                    stop: CancellationToken::new(),
                }),
            );
        }
        Ok(Jobs {
            jobs_dir,
            scripts_dir,
            worker_name,
            plugins,
            map: RwLock::new(map),
            changes: Arc::new(Changes {
                dirty: Mutex::new(dirty),
                finished: Notify::new(),
            }),
            accepting: AtomicBool::new(true),
            tracker: TaskTracker::new(),
            running: Arc::new(AtomicUsize::new(0)),
            policy,
        })
    }

    /// Every job's record, newest first: what a (re-)registration reports.
    pub(crate) fn all_records(&self) -> Vec<(JobRecord, u64)> {
        let mut all: Vec<_> = self
            .map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|j| (j.record(), j.progress.borrow().len))
            .collect();
        all.sort_by_key(|(r, _)| std::cmp::Reverse(r.created_at_ms));
        all
    }

    /// Takes the jobs whose state changed since the last report. Give them
    /// back with [`Jobs::mark_dirty`] if the report fails.
    pub(crate) fn take_dirty(&self) -> Vec<(JobRecord, u64)> {
        let ids: Vec<Uuid> =
            std::mem::take(&mut *self.changes.dirty.lock().unwrap_or_else(|e| e.into_inner()))
                .into_iter()
                .collect();
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        ids.iter()
            .filter_map(|id| map.get(id))
            .map(|j| (j.record(), j.progress.borrow().len))
            .collect()
    }

    pub(crate) fn mark_dirty(&self, ids: impl IntoIterator<Item = Uuid>) {
        self.changes.mark(ids);
    }

    /// Deletes the output of the oldest finished jobs until what is left is
    /// younger than `max_age` and smaller than `max_bytes` in total. Their
    /// records stay; their output reads as expired.
    pub(crate) async fn apply_retention(&self, max_age: Option<Duration>, max_bytes: Option<u64>) {
        let mut finished: Vec<Arc<Job>> = self
            .map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|j| j.progress.borrow().done)
            .filter(|j| !j.record().output_expired)
            .cloned()
            .collect();
        finished.sort_by_key(|j| j.record().finished_at_ms);
        let mut total: u64 = finished.iter().map(|j| j.progress.borrow().len).sum();
        let now = now_ms();
        for job in finished {
            let record = job.record();
            let too_old = max_age.is_some_and(|age| {
                now.saturating_sub(record.finished_at_ms) > age.as_millis() as u64
            });
            let too_big = max_bytes.is_some_and(|max| total > max);
            if !too_old && !too_big {
                continue;
            }
            let len = job.progress.borrow().len;
            match tokio::fs::remove_file(&job.log_path).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => {
                    tracing::warn!(job_id = %record.id, %error, "could not delete expired output");
                    continue;
                }
            }
            total = total.saturating_sub(len);
            let record = job.update(|r| r.output_expired = true);
            if let Err(error) = write_record(&self.jobs_dir, &record).await {
                tracing::warn!(job_id = %record.id, %error, "could not record expired output");
            }
            tracing::info!(job_id = %record.id, bytes = len, reason = if too_old { "age" } else { "size" }, "job output deleted by retention");
        }
    }

    /// Resolves when some job has finished since the last call.
    pub(crate) async fn job_finished(&self) {
        self.changes.finished.notified().await;
    }

    pub(crate) fn get(&self, id: &str) -> Result<Arc<Job>, JobError> {
        let uuid = Uuid::parse_str(id).map_err(|_| JobError::BadJobId(id.to_owned()))?;
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&uuid)
            .cloned()
            .ok_or_else(|| JobError::UnknownJob(id.to_owned()))
    }

    /// Validates the request, spawns the job and returns its first record:
    /// `running`, or `failed` when the process could not be started.
    pub(crate) async fn start(&self, req: StartRequest) -> Result<JobRecord, JobError> {
        if !self.accepting.load(Ordering::Acquire) {
            return Err(JobError::ShuttingDown);
        }
        let id = if req.job_id.is_empty() {
            Uuid::new_v4()
        } else {
            Uuid::parse_str(&req.job_id).map_err(|_| JobError::BadJobId(req.job_id.clone()))?
        };
        let script = crate::confine::resolve_script(&self.scripts_dir, &req.path)?;
        let plugin = self.plugin_for(&req.command, &req.path, &script)?;
        validate_strings(&req.args, &req.env)?;
        // A slot is taken now, before any await, so concurrent starts cannot
        // overshoot max_jobs; it is given back unless a process starts.
        let slot = RunningSlot::take(&self.running, self.policy.max_jobs)?;

        let dir = self.jobs_dir.join(id.to_string());
        match tokio::fs::create_dir(&dir).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(JobError::Exists(id));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tokio::fs::create_dir_all(&dir).await?;
            }
            Err(e) => return Err(e.into()),
        }
        let log_path = dir.join("output.log");
        let log_file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&log_path)
            .await?
            .into_std()
            .await;

        let now = now_ms();
        let mut record = JobRecord {
            id,
            command: plugin.name.clone(),
            path: req.path.clone(),
            args: req.args.clone(),
            state: State::Running,
            exit_code: None,
            signal: None,
            error_text: String::new(),
            created_at_ms: now,
            started_at_ms: now,
            finished_at_ms: 0,
            pgid: None,
            output_bytes: 0,
            output_expired: false,
        };

        // The job's cgroup is made before the job exists, so it can join it
        // before it runs anything.
        let cgroup = match &self.policy.cgroups {
            Some(cgroups) => {
                let (cgroups, limits) = (cgroups.clone(), plugin.limits);
                let created = tokio::task::spawn_blocking(move || {
                    let dir = cgroups.create(id, &limits)?;
                    let procs = crate::cgroup::Cgroups::procs_file(&dir)?;
                    Ok::<_, std::io::Error>((dir, procs))
                })
                .await
                .map_err(std::io::Error::other)??;
                Some(created)
            }
            None => None,
        };
        let (cgroup_dir, cgroup_procs) = cgroup.map_or((None, None), |(d, p)| (Some(d), Some(p)));
        let spawned = self.spawn(plugin, &script, &req, id, cgroup_procs);
        if spawned.is_ok() {
            // Counted from spawn to the end of supervision.
            slot.keep();
        }
        let (progress, _) = watch::channel(Progress {
            len: 0,
            done: false,
        });
        let job = Arc::new(Job {
            record: Mutex::new(record.clone()),
            progress,
            stop: CancellationToken::new(),
            log_path,
        });
        match spawned {
            Ok((child, reader)) => {
                let pgid = child.id().and_then(|p| i32::try_from(p).ok());
                record = job.update(|r| r.pgid = pgid);
                // The process runs now: whatever happens to its record, it
                // must be supervised (the final write tries again).
                if let Err(error) = write_record(&self.jobs_dir, &record).await {
                    tracing::error!(job_id = %id, %error, "could not record the job's start");
                }
                self.insert(&job);
                let over_limit = CancellationToken::new();
                let pump = tokio::spawn(pump(
                    reader,
                    log_file,
                    job.progress.clone(),
                    plugin.max_output_bytes,
                    over_limit.clone(),
                ));
                let limits = Supervision {
                    grace: plugin.stop_grace,
                    timeout: plugin.timeout,
                    max_output: plugin.max_output_bytes,
                    over_limit,
                };
                let jobs_dir = self.jobs_dir.clone();
                let supervised = job.clone();
                let changes = self.changes.clone();
                let running = self.running.clone();
                self.tracker.spawn(async move {
                    supervise(supervised, child, pgid, pump, limits, jobs_dir).await;
                    if let Some(dir) = cgroup_dir {
                        let _ = tokio::task::spawn_blocking(move || {
                            crate::cgroup::Cgroups::remove(&dir)
                        })
                        .await;
                    }
                    running.fetch_sub(1, Ordering::AcqRel);
                    changes.mark([id]);
                    changes.finished.notify_one();
                });
                tracing::info!(job_id = %id, plugin = %record.command, path = %record.path, pgid, "job started");
            }
            Err(error) => {
                record = job.update(|r| {
                    r.state = State::Failed;
                    r.error_text = format!("could not start: {error}");
                    r.finished_at_ms = now_ms();
                });
                if let Some(dir) = cgroup_dir {
                    let _ =
                        tokio::task::spawn_blocking(move || crate::cgroup::Cgroups::remove(&dir))
                            .await;
                }
                job.progress.send_modify(|p| p.done = true);
                self.insert(&job);
                tracing::warn!(job_id = %id, %error, "job could not start");
                write_record(&self.jobs_dir, &record).await?;
            }
        }
        Ok(record)
    }

    fn insert(&self, job: &Arc<Job>) {
        let id = job.record().id;
        self.map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, job.clone());
        // After the insert, so a report taken in between finds the job.
        self.mark_dirty([id]);
    }

    fn plugin_for(&self, command: &str, path: &str, script: &Path) -> Result<&Plugin, JobError> {
        let offered = || self.plugins.keys().cloned().collect::<Vec<_>>().join(", ");
        if !command.is_empty() {
            return self
                .plugins
                .get(command)
                .ok_or_else(|| JobError::UnknownPlugin {
                    name: command.to_owned(),
                    offered: offered(),
                });
        }
        // No plugin named: the one whose extensions match the script.
        let ext = Path::new(path)
            .extension()
            .or_else(|| script.extension())
            .and_then(|e| e.to_str())
            .unwrap_or_default();
        self.plugins
            .values()
            .find(|p| p.extensions.iter().any(|e| e == ext))
            .ok_or_else(|| JobError::NoPluginForScript {
                path: path.to_owned(),
                offered: offered(),
            })
    }

    fn spawn(
        &self,
        plugin: &Plugin,
        script: &Path,
        req: &StartRequest,
        id: Uuid,
        cgroup_procs: Option<std::os::fd::OwnedFd>,
    ) -> std::io::Result<(tokio::process::Child, pipe::Receiver)> {
        let line = plugin.runner.command_line(script, &req.args);
        // One pipe for stdout and stderr keeps their relative order exact.
        let (reader, writer) = std::io::pipe()?;
        let writer_err = writer.try_clone()?;
        let mut cmd = tokio::process::Command::new(&line.program);
        cmd.args(&line.args).env_clear().env("PATH", DEFAULT_PATH);
        for key in INHERITED_ENV {
            if let Some(value) = std::env::var_os(key) {
                cmd.env(key, value);
            }
        }
        cmd.env("JOB_ID", id.to_string())
            .env("WORKER_NAME", &self.worker_name)
            .envs(line.env.iter().map(|(k, v)| (k, v)))
            .envs(&req.env)
            .current_dir(script.parent().unwrap_or(&self.scripts_dir))
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(writer_err)
            .process_group(0)
            .kill_on_drop(false);
        if let Some(run_as) = self.policy.run_as.get(&plugin.name) {
            // std drops supplementary groups too when it switches user.
            cmd.uid(run_as.uid)
                .gid(run_as.gid)
                .env("HOME", &run_as.home)
                .env("USER", &run_as.user)
                .env("LOGNAME", &run_as.user);
        }
        crate::sys::set_limits(&mut cmd, plugin.limits, cgroup_procs);
        let child = cmd.spawn()?;
        // The command holds the parent's copies of the pipe's write end;
        // dropping it lets the pump see EOF once the job's processes close theirs.
        drop(cmd);
        let reader = pipe::Receiver::from_owned_fd(OwnedFd::from(reader))?;
        Ok((child, reader))
    }

    /// Asks a job to stop. Returns its record; a finished job is left as it was.
    pub(crate) async fn stop(&self, id: &str) -> Result<JobRecord, JobError> {
        let job = self.get(id)?;
        let mut progress = job.progress();
        if !progress.borrow().done {
            tracing::info!(job_id = %id, "stop requested");
            job.stop.cancel();
            // The supervisor finishes the job; wait a little for it, so the
            // answer usually carries the final state, but never longer than
            // a caller's deadline can bear (a long grace period goes on).
            let _ = tokio::time::timeout(STOP_WAIT, progress.wait_for(|p| p.done)).await;
        }
        Ok(job.record())
    }

    /// Stops taking jobs, stops every running job with its grace period and
    /// waits for all of them to be recorded.
    pub(crate) async fn shutdown(&self) {
        self.accepting.store(false, Ordering::Release);
        let running: Vec<_> = self
            .map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|j| !j.progress.borrow().done)
            .cloned()
            .collect();
        if !running.is_empty() {
            tracing::info!(jobs = running.len(), "stopping running jobs");
        }
        for job in running {
            job.stop.cancel();
        }
        self.tracker.close();
        self.tracker.wait().await;
    }
}

fn validate_strings(args: &[String], env: &BTreeMap<String, String>) -> Result<(), JobError> {
    if args.iter().any(|a| a.contains('\0')) {
        return Err(JobError::BadInput {
            what: "args",
            reason: "an argument contains a NUL byte".into(),
        });
    }
    for (key, value) in env {
        if key.is_empty() || key.contains(['=', '\0']) || value.contains('\0') {
            return Err(JobError::BadInput {
                what: "env",
                reason: format!("{key:?} is not a valid variable"),
            });
        }
        if reserved_variable(key) {
            return Err(JobError::BadInput {
                what: "env",
                reason: format!(
                    "{key} may not be set by a request: it would let a job load code from outside the scripts directory or change what the worker relies on"
                ),
            });
        }
    }
    Ok(())
}

/// Variables a request may not set: the worker's own (`JOB_ID` finds a
/// job's processes after a crash), and those that make an interpreter or
/// the dynamic linker load code from elsewhere, which would get around the
/// scripts directory. Plugins' own `env` may still set them.
fn reserved_variable(key: &str) -> bool {
    const EXACT: &[&str] = &[
        "JOB_ID",
        "WORKER_NAME",
        "PATH",
        "IFS",
        "ENV",
        "BASH_ENV",
        "SHELLOPTS",
        "BASHOPTS",
        "PS4",
        "PROMPT_COMMAND",
        "PYTHONPATH",
        "PYTHONHOME",
        "PYTHONSTARTUP",
        "PYTHONINSPECT",
        "PERL5LIB",
        "PERL5OPT",
        "PERLLIB",
        "RUBYLIB",
        "RUBYOPT",
        "NODE_OPTIONS",
        "NODE_PATH",
        "GCONV_PATH",
        "HOSTALIASES",
        "LOCPATH",
        "TMPDIR",
    ];
    const PREFIXES: &[&str] = &["LD_", "DYLD_", "BASH_FUNC_"];
    EXACT.contains(&key) || PREFIXES.iter().any(|p| key.starts_with(p))
}

/// Copies the job's output pipe to its log and publishes each new length.
/// Ends at EOF, that is when every process of the job has closed the pipe.
/// With `limit`, at most that many bytes are kept; reaching it fires
/// `over_limit` and the rest is drained and dropped until the job is gone.
async fn pump(
    mut reader: pipe::Receiver,
    file: std::fs::File,
    progress: watch::Sender<Progress>,
    limit: Option<u64>,
    over_limit: CancellationToken,
) -> u64 {
    let file = Arc::new(file);
    let mut buf = Vec::with_capacity(CHUNK);
    let mut len = 0u64;
    let mut write_failed = false;
    loop {
        buf.clear();
        match reader.read_buf(&mut buf).await {
            Ok(0) => break,
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(%error, "reading job output failed");
                break;
            }
        }
        if write_failed || over_limit.is_cancelled() {
            // Keep draining so the job never blocks on a full pipe.
            continue;
        }
        if let Some(limit) = limit
            && len + buf.len() as u64 > limit
        {
            buf.truncate((limit - len) as usize);
            over_limit.cancel();
        }
        let f = file.clone();
        let b = std::mem::take(&mut buf);
        let offset = len;
        // File writes block; they go to the blocking pool, one chunk at a time.
        let result = tokio::task::spawn_blocking(move || {
            let r = f.write_all_at(&b, offset);
            (b, r)
        })
        .await;
        match result {
            Ok((b, Ok(()))) => {
                len += b.len() as u64;
                buf = b;
                progress.send_modify(|p| p.len = len);
            }
            Ok((b, Err(error))) => {
                tracing::error!(%error, "writing job output failed; dropping further output");
                buf = b;
                write_failed = true;
            }
            Err(error) => {
                tracing::error!(%error, "output writer task failed");
                write_failed = true;
            }
        }
    }
    len
}

/// The plugin's limits on one job.
#[derive(Debug)]
struct Supervision {
    grace: Duration,
    timeout: Option<Duration>,
    max_output: Option<u64>,
    over_limit: CancellationToken,
}

async fn supervise(
    job: Arc<Job>,
    mut child: tokio::process::Child,
    pgid: Option<i32>,
    mut pump: JoinHandle<u64>,
    limits: Supervision,
    jobs_dir: PathBuf,
) {
    let id = job.record().id;
    let timeout = async {
        match limits.timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    let ending = tokio::select! {
        status = child.wait() => Err(status),
        () = job.stop.cancelled() => Ok(Ending::Stopped),
        () = timeout => Ok(Ending::TimedOut(limits.timeout.unwrap_or_default())),
        () = limits.over_limit.cancelled() => Ok(Ending::OutputLimit(limits.max_output.unwrap_or_default())),
    };
    let (status, ending) = match ending {
        Err(status) => (status, None),
        Ok(ending) => {
            tracing::info!(job_id = %id, ?ending, "ending the job");
            signal_group(pgid, Signal::SIGTERM);
            let grace = limits.grace;
            let status = match tokio::time::timeout(grace, child.wait()).await {
                Ok(status) => status,
                Err(_) => {
                    tracing::info!(job_id = %id, ?grace, "grace period over; killing the job's process group");
                    signal_group(pgid, Signal::SIGKILL);
                    child.wait().await
                }
            };
            (status, Some(ending))
        }
    };
    // Nothing of the job outlives it: whatever stayed in its group goes now.
    signal_group(pgid, Signal::SIGKILL);
    let len = match tokio::time::timeout(DRAIN_TIMEOUT, &mut pump).await {
        Ok(Ok(len)) => len,
        Ok(Err(error)) => {
            tracing::error!(job_id = %id, %error, "output pump failed");
            job.progress.borrow().len
        }
        Err(_) => {
            tracing::warn!(job_id = %id, "output pipe still open after the job ended; closing it");
            pump.abort();
            job.progress.borrow().len
        }
    };
    let record = job.update(|r| {
        r.finished_at_ms = now_ms();
        r.output_bytes = len;
        r.pgid = None;
        finish(r, status, ending);
    });
    if let Err(error) = write_record(&jobs_dir, &record).await {
        tracing::error!(job_id = %id, %error, "could not record the job's final state");
    }
    job.progress.send_modify(|p| {
        p.len = len;
        p.done = true;
    });
    tracing::info!(job_id = %id, state = ?record.state, exit_code = record.exit_code, signal = record.signal, "job finished");
}

fn finish(r: &mut JobRecord, status: std::io::Result<ExitStatus>, ending: Option<Ending>) {
    match status {
        Ok(status) => {
            r.exit_code = status.code();
            r.signal = status.signal();
            r.state = if let Some(ending) = ending {
                match ending {
                    Ending::Stopped => {
                        r.error_text = "stopped by request".into();
                        State::Stopped
                    }
                    Ending::TimedOut(after) => {
                        r.error_text =
                            format!("timed out after {}", humantime::format_duration(after));
                        State::Failed
                    }
                    Ending::OutputLimit(limit) => {
                        r.error_text = format!(
                            "output limit of {limit} bytes exceeded; the job was stopped and its output kept up to the limit"
                        );
                        State::Failed
                    }
                }
            } else {
                match (status.code(), status.signal()) {
                    (Some(0), _) => State::Succeeded,
                    (Some(code), _) => {
                        r.error_text = format!("exited with code {code}");
                        State::Failed
                    }
                    (None, Some(sig)) => {
                        r.error_text = format!("killed by signal {sig} ({})", signal_name(sig));
                        State::Failed
                    }
                    (None, None) => {
                        r.error_text = "ended without an exit status".into();
                        State::Failed
                    }
                }
            };
        }
        Err(error) => {
            r.state = State::Failed;
            r.error_text = format!("lost track of the process: {error}");
        }
    }
}

fn signal_name(sig: i32) -> &'static str {
    Signal::try_from(sig)
        .map(|s| s.as_str())
        .unwrap_or("unknown")
}

fn signal_group(pgid: Option<i32>, signal: Signal) {
    let Some(pgid) = pgid else { return };
    match killpg(Pid::from_raw(pgid), signal) {
        // ESRCH: the group is already empty, which is what we want.
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(error) => {
            tracing::warn!(pgid, %error, ?signal, "signalling the job's process group failed")
        }
    }
}

/// Kills what is left of a job whose worker died: every process in its
/// recorded process group that still carries the job's id in its
/// environment (a pid may have been reused by something else since).
/// Returns how many processes were signalled.
fn kill_leftovers(id: Uuid, pgid: Option<i32>) -> usize {
    let Some(pgid) = pgid else { return 0 };
    let needle = format!("JOB_ID={id}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut killed = 0;
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Fields after the parenthesised command: state ppid pgrp ...
        let in_group = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(2))
            .and_then(|g| g.parse::<i32>().ok())
            == Some(pgid);
        if !in_group {
            continue;
        }
        let ours = std::fs::read(entry.path().join("environ"))
            .map(|env| env.split(|b| *b == 0).any(|v| v == needle.as_bytes()))
            .unwrap_or(false);
        if ours && nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
            killed += 1;
        }
    }
    killed
}

/// Reads up to `max` bytes of a log at `offset` on the blocking pool.
pub(crate) async fn read_at(
    file: Arc<std::fs::File>,
    offset: u64,
    max: usize,
) -> std::io::Result<Vec<u8>> {
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0; max];
        let mut filled = 0;
        while filled < max {
            match file.read_at(&mut buf[filled..], offset + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf.truncate(filled);
        Ok(buf)
    })
    .await
    .map_err(std::io::Error::other)?
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Writes `job.json` atomically: a crash leaves the old record or the new
/// one, never half of one.
async fn write_record(jobs_dir: &Path, record: &JobRecord) -> std::io::Result<()> {
    let dir = jobs_dir.join(record.id.to_string());
    let json = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
    tokio::task::spawn_blocking(move || {
        let tmp = dir.join("job.json.tmp");
        std::fs::write(&tmp, &json)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, dir.join("job.json"))
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Loads every `jobs/<id>/job.json`, with the length of its output log.
/// Unreadable records are skipped with a warning rather than stopping the
/// worker.
fn load_records(jobs_dir: &Path) -> std::io::Result<Vec<(JobRecord, u64)>> {
    let entries = match std::fs::read_dir(jobs_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut records = Vec::new();
    for entry in entries {
        let dir = entry?.path();
        let loaded = std::fs::read(dir.join("job.json"))
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                serde_json::from_slice::<JobRecord>(&bytes).map_err(|e| e.to_string())
            });
        match loaded {
            Ok(record) => {
                let len = std::fs::metadata(dir.join("output.log"))
                    .map(|m| m.len())
                    .unwrap_or(0);
                records.push((record, len));
            }
            Err(error) => {
                tracing::warn!(dir = %dir.display(), %error, "skipping unreadable job record")
            }
        }
    }
    Ok(records)
}
