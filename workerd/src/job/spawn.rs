//! Starting a job: validating the request, taking a slot, creating its
//! files and spawning its process.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use jobcluster_plugins::Plugin;
use tokio::net::unix::pipe;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::output::{Writing, pump};
use super::record::{
    LOG, Origin, final_size, load_record, make_job_dir, now_ms, write_final, write_first,
};
use super::spare::Spares;
use super::supervise::{Supervision, supervise};
use super::{Job, JobError, JobRecord, Jobs, Progress, StartRequest, State};

/// Environment variables passed from the worker to every job.
const INHERITED_ENV: &[&str] = &["PATH", "HOME", "LANG", "LC_ALL", "TZ", "USER", "LOGNAME"];
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// A job id being started: a second start of the same id meanwhile is
/// refused (the first one's outcome is the job's).
struct Starting<'a> {
    set: &'a Mutex<std::collections::HashSet<Uuid>>,
    id: Uuid,
}

impl<'a> Starting<'a> {
    fn claim(set: &'a Mutex<std::collections::HashSet<Uuid>>, id: Uuid) -> Result<Self, JobError> {
        if set.lock().unwrap_or_else(|e| e.into_inner()).insert(id) {
            Ok(Starting { set, id })
        } else {
            Err(JobError::Starting(id))
        }
    }
}

impl Drop for Starting<'_> {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

/// A place among the running jobs (`max_jobs`), taken before a start's
/// files and held by its supervisor until the job's processes have been
/// killed and its output drained; returned on drop.
#[derive(Debug)]
pub(super) struct RunningSlot {
    running: Arc<AtomicUsize>,
}

impl RunningSlot {
    fn take(running: &Arc<AtomicUsize>, max: Option<usize>) -> Result<Self, JobError> {
        let before = running.fetch_add(1, Ordering::AcqRel);
        let slot = RunningSlot {
            running: running.clone(),
        };
        match max {
            Some(max) if before >= max => Err(JobError::Busy(max)),
            _ => Ok(slot),
        }
    }
}

impl Drop for RunningSlot {
    fn drop(&mut self) {
        self.running.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the blocking part of a start made of it.
enum Prepared {
    /// The job exists already (on disk, finished): its record is the answer.
    Exists(JobRecord),
    /// Its files exist and its process was spawned, or could not be.
    Made(Box<Made>),
}

struct Made {
    record: JobRecord,
    stop_grace: std::time::Duration,
    timeout: Option<std::time::Duration>,
    max_output: Option<u64>,
    log_file: std::fs::File,
    log_path: std::path::PathBuf,
    cgroup_dir: Option<std::path::PathBuf>,
    spawned: std::io::Result<(super::process::Process, pipe::Receiver)>,
    slot: RunningSlot,
    /// Where its directory came from, for its end's syncs.
    origin: Origin,
}

impl Jobs {
    /// Starts a job and returns its first record: `running`, or `failed`
    /// when the process could not be started. Idempotent by job id: a
    /// repeated start returns the existing job and starts nothing.
    ///
    /// The work runs in a task of its own: the caller's future may be
    /// dropped (a deadline, a hang-up), but between spawning a process and
    /// handing it to its supervisor nothing may be cancelled.
    pub(crate) async fn start(self: &Arc<Self>, req: StartRequest) -> Result<JobRecord, JobError> {
        let jobs = self.clone();
        self.tracker
            .spawn(async move { jobs.start_now(req).await })
            .await
            .map_err(|e| JobError::Io(std::io::Error::other(e)))?
    }

    async fn start_now(self: Arc<Self>, req: StartRequest) -> Result<JobRecord, JobError> {
        if !self.accepting.load(Ordering::Acquire) {
            return Err(JobError::ShuttingDown);
        }
        // The scheduler checks these too; a worker holds to them whoever calls.
        jobcluster_proto::http::limits::check(&req.args, &req.env).map_err(JobError::TooLarge)?;
        let id = if req.job_id.is_empty() {
            Uuid::new_v4()
        } else {
            Uuid::parse_str(&req.job_id).map_err(|_| JobError::BadJobId(req.job_id.clone()))?
        };
        if let Some(job) = self.find(id) {
            tracing::info!(job_id = %id, "repeated start; the job exists");
            return Ok(job.record());
        }
        let _starting = Starting::claim(&self.starting, id)?;
        // A start of the same id may have ended between the look above and
        // the claim.
        if let Some(job) = self.find(id) {
            return Ok(job.record());
        }
        // Everything else touches the disk or forks: one trip to the
        // blocking pool for all of it, as each trip costs a start more
        // than the work it carries (thread hand-offs on a busy machine),
        // and a fork and exec must not hold up a runtime thread.
        let jobs = self.clone();
        let made = match tokio::task::spawn_blocking(move || jobs.prepare(id, &req))
            .await
            .map_err(|e| JobError::Io(std::io::Error::other(e)))??
        {
            Prepared::Exists(record) => return Ok(record),
            Prepared::Made(made) => *made,
        };
        let Made {
            mut record,
            stop_grace,
            timeout,
            max_output,
            log_file,
            log_path,
            cgroup_dir,
            spawned,
            slot,
            origin,
        } = made;
        let (progress, _) = watch::channel(Progress::default());
        let job = Arc::new(Job {
            record: Mutex::new(record.clone()),
            progress,
            stop: self.shutdown.child_token(),
            given_up: CancellationToken::new(),
            log_path,
        });
        match spawned {
            Ok((child, reader)) => {
                let pgid = child.id().and_then(|p| i32::try_from(p).ok());
                self.insert(&job);
                let over_limit = CancellationToken::new();
                let write_failed = CancellationToken::new();
                let writing = Arc::new(Writing::default());
                let pump = tokio::spawn(pump(
                    reader,
                    log_file,
                    job.progress.clone(),
                    max_output,
                    over_limit.clone(),
                    write_failed.clone(),
                    writing.clone(),
                ));
                let limits = Supervision {
                    grace: stop_grace,
                    timeout,
                    max_output,
                    over_limit,
                    write_failed,
                    writing,
                    cgroup: cgroup_dir.clone(),
                    worker_shutdown: self.shutdown.clone(),
                    slot,
                    origin,
                };
                let jobs_dir = self.jobs_dir.clone();
                let supervised = job.clone();
                let changes = self.changes.clone();
                self.tracker.spawn(async move {
                    supervise(supervised, child, pgid, pump, limits, jobs_dir, &changes).await;
                    if let Some(dir) = cgroup_dir {
                        let _ = tokio::task::spawn_blocking(move || {
                            crate::cgroup::Cgroups::remove(&dir)
                        })
                        .await;
                    }
                    changes.mark([id]);
                    changes.ended(id);
                    changes.finished.notify_one();
                    changes.report.notify_one();
                });
                tracing::info!(job_id = %id, plugin = %record.command, path = %record.path, pgid, "job started");
                crate::metrics::job_started(&record.command);
            }
            Err(error) => {
                // No process: the slot is free before the failure can be read.
                drop(slot);
                record = job.update(|r| {
                    r.state = State::Failed;
                    r.error_text = format!("could not start: {error}");
                    r.finished_at_ms = now_ms();
                });
                job.progress.send_modify(|p| p.done = true);
                self.insert(&job);
                self.changes.ended(id);
                // An end like any other: reported at once, not with the
                // next beat.
                self.changes.report.notify_one();
                tracing::warn!(job_id = %id, %error, "job could not start");
                if let Err(error) = write_final(&self.jobs_dir, &record, &origin).await {
                    tracing::error!(job_id = %id, %error, "could not record the job's final state; kept in memory and retried");
                    self.changes.unwritten(id);
                }
            }
        }
        Ok(record)
    }

    /// The blocking part of a start, in order: a job this id names on
    /// disk, the request's checks, a slot, the job's files and cgroup, and
    /// its process. Whatever fails before the process is spawned leaves
    /// nothing behind.
    fn prepare(&self, id: Uuid, req: &StartRequest) -> Result<Prepared, JobError> {
        // A job that ended long ago is on disk only; a record that says
        // running belongs to a start under way, not a job yet.
        let dir = self.jobs_dir.join(id.to_string());
        match load_record(&dir) {
            Ok((record, _)) if record.state != State::Running => {
                tracing::info!(job_id = %id, "repeated start; the job exists");
                return Ok(Prepared::Exists(record));
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            // Not "unknown": the scheduler would give the job up.
            Err(e) => return Err(JobError::Io(e)),
        }
        let script = crate::confine::resolve_script(&self.scripts_dir, &req.path)?;
        let plugin = self.plugin_for(&req.command, &req.path, &script)?;
        validate_strings(&req.args, &req.env)?;
        // The plugin's allow list, with the deny list under it: a refused
        // variable refuses the whole request, so nothing runs half-configured.
        if let Err(refused) = plugin.allow_env.check(req.env.keys().map(String::as_str)) {
            tracing::info!(job_id = %id, plugin = %plugin.name, %refused, "start refused: request env");
            return Err(JobError::EnvNotAllowed {
                plugin: plugin.name.clone(),
                refused,
            });
        }
        // A slot is taken now, before the files, so concurrent starts
        // cannot overshoot max_jobs; it is given back unless a process starts.
        let slot = RunningSlot::take(&self.running, self.policy.max_jobs).inspect_err(|_| {
            tracing::info!(job_id = %id, max_jobs = ?self.policy.max_jobs, "start refused: every slot is taken");
        })?;

        let now = now_ms();
        let record = JobRecord {
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
            output_bytes: 0,
            output_expired: false,
        };
        // The job's files and its record exist before its process does: a
        // worker that cannot write them refuses the job and leaves nothing.
        let (log_file, origin) = match create_files(&self.spares, &dir, &record) {
            Ok(made) => made,
            // A start of the same id may have finished since we looked.
            Err(JobError::Exists(id)) => {
                return match self.find(id) {
                    Some(job) => Ok(Prepared::Exists(job.record())),
                    None => Err(JobError::Exists(id)),
                };
            }
            Err(error) => {
                let _ = std::fs::remove_dir_all(&dir);
                tracing::warn!(job_id = %id, %error, "job refused: its files could not be created");
                return Err(error);
            }
        };
        // The job's cgroup is made before the job exists, so it can join it
        // before it runs anything.
        let cgroup = match &self.policy.cgroups {
            Some(cgroups) => {
                let created = cgroups.create(id, &plugin.limits).and_then(|dir| {
                    let procs = crate::cgroup::Cgroups::procs_file(&dir)?;
                    Ok((dir, procs))
                });
                match created {
                    Ok(created) => Some(created),
                    Err(error) => {
                        // Refused: nothing of the job may stay behind.
                        let _ = std::fs::remove_dir_all(&dir);
                        tracing::warn!(job_id = %id, %error, "job refused: its cgroup could not be made");
                        return Err(JobError::Io(error));
                    }
                }
            }
            None => None,
        };
        let (cgroup_dir, cgroup_procs) = cgroup.map_or((None, None), |(d, p)| (Some(d), Some(p)));
        let spawned = self.spawn(plugin, &script, req, id, cgroup_procs);
        self.spares.refill_if_low();
        // A job that did not start leaves no cgroup; removed here, already
        // on the blocking pool.
        let cgroup_dir = match (&spawned, cgroup_dir) {
            (Err(_), Some(dir)) => {
                crate::cgroup::Cgroups::remove(&dir);
                None
            }
            (_, dir) => dir,
        };
        Ok(Prepared::Made(Box::new(Made {
            record,
            stop_grace: plugin.stop_grace,
            timeout: plugin.timeout,
            max_output: plugin.max_output_bytes,
            log_file,
            log_path: dir.join(LOG),
            cgroup_dir,
            spawned,
            slot,
            origin,
        })))
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
    ) -> std::io::Result<(super::process::Process, pipe::Receiver)> {
        let line = plugin.runner.command_line(script, &req.args);
        // One pipe for stdout and stderr keeps their relative order exact.
        let (reader, writer) = std::io::pipe()?;
        let writer_err = writer.try_clone()?;
        // Registered before the spawn: a failure after it would leave the
        // job running with nobody reading its output.
        let reader = pipe::Receiver::from_owned_fd(OwnedFd::from(reader))?;
        let mut env: Vec<(OsString, OsString)> = vec![("PATH".into(), DEFAULT_PATH.into())];
        for key in INHERITED_ENV {
            if let Some(value) = std::env::var_os(key) {
                env.push((key.into(), value));
            }
        }
        env.push(("JOB_ID".into(), id.to_string().into()));
        env.push(("WORKER_NAME".into(), self.worker_name.clone().into()));
        env.extend(line.env.iter().map(|(k, v)| (k.into(), v.into())));
        env.extend(req.env.iter().map(|(k, v)| (k.into(), v.into())));
        let run_as = self.policy.run_as.get(&plugin.name);
        if let Some(run_as) = run_as {
            env.push(("HOME".into(), run_as.home.clone().into()));
            env.push(("USER".into(), run_as.user.clone().into()));
            env.push(("LOGNAME".into(), run_as.user.clone().into()));
        }
        let process = super::reap::spawn(crate::sys::JobExec {
            program: line.program,
            args: line.args,
            env,
            cwd: script.parent().unwrap_or(&self.scripts_dir).to_owned(),
            stdin: std::fs::File::open("/dev/null")?.into(),
            stdout: writer.into(),
            stderr: writer_err.into(),
            identity: run_as.map(|r| (r.uid, r.gid)),
            limits: plugin.limits,
            cgroup_procs,
        })?;
        // The spawn closed the parent's copies of the pipe's write end, so
        // the pump sees EOF once the job's processes close theirs.
        Ok((process, reader))
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
    }
    Ok(())
}

/// Creates the job's directory, its empty output log, its first record and
/// the space for its final record; returns the log for writing.
fn create_files(
    spares: &Spares,
    dir: &Path,
    record: &JobRecord,
) -> Result<(std::fs::File, Origin), JobError> {
    let json = serde_json::to_vec(record).map_err(std::io::Error::other)?;
    let exists = |e: &std::io::Error| e.kind() == std::io::ErrorKind::AlreadyExists;
    let spare = match spares.take(dir, json.len()) {
        Some(Ok(spare)) => Some(spare),
        Some(Err(e)) if exists(&e) => return Err(JobError::Exists(record.id)),
        Some(Err(e)) => return Err(JobError::storage(e)),
        None => {
            let size = final_size(json.len());
            let made = match make_job_dir(dir, size) {
                // The first job of a new state directory makes `jobs/`.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => dir
                    .parent()
                    .map_or(Err(e), std::fs::create_dir_all)
                    .and_then(|()| make_job_dir(dir, size)),
                made => made,
            };
            match made {
                Ok(()) => None,
                Err(e) if exists(&e) => return Err(JobError::Exists(record.id)),
                Err(e) => return Err(JobError::storage(e)),
            }
        }
    };
    let written = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(LOG))
        .and_then(|log| {
            // A spare was made a while ago: retention judges a log's age
            // by its time.
            if spare.is_some() {
                log.set_modified(std::time::SystemTime::now())?;
            }
            write_first(dir, &json)?;
            let origin = Origin {
                spares: spare.as_ref().map(|_| spares.dir().to_owned()),
                files_synced: spare.as_ref().is_some_and(|taken| taken.synced),
            };
            Ok((log, origin))
        })
        .map_err(JobError::storage);
    if let (Err(_), Some(taken)) = (&written, spare) {
        spares.put_back(dir, taken.spare);
    }
    written
}
