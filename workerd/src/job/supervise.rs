//! Supervision: waiting for a job to end, ending it on stop, timeout or
//! output limit, killing what is left of it, and recording the outcome.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::kill;
use super::output::{Pumped, Writing};
use super::record::{now_ms, write_final};
use super::registry::Changes;
use super::{Job, JobRecord, State};

/// How long a stop request waits for the job to end before answering (a
/// long grace period goes on after the answer).
pub(super) const STOP_WAIT: Duration = Duration::from_secs(5);
/// After a job's main process is gone and its processes killed, how long
/// the pump may still drain the pipe (a process the scan cannot find may
/// hold it open forever).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// A write of the log that takes this long is a disk in trouble, not the
/// quick writes of a pipe's leftover writer.
const STALLED_WRITE: Duration = Duration::from_secs(1);

/// Why the supervisor ended a job that was still running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ending {
    Stopped,
    TimedOut(Duration),
    OutputLimit(u64),
    /// Its output could not be written (the pump says why).
    OutputFailed,
    /// The scheduler recorded it lost while this worker was cut off.
    GivenUp,
}

/// The plugin's limits on one job.
#[derive(Debug)]
pub(super) struct Supervision {
    pub(super) grace: Duration,
    pub(super) timeout: Option<Duration>,
    pub(super) max_output: Option<u64>,
    pub(super) over_limit: CancellationToken,
    /// Fired by the pump when the output log cannot be written.
    pub(super) write_failed: CancellationToken,
    /// Whether the pump waits for a write of the log.
    pub(super) writing: Arc<Writing>,
    /// The job's cgroup, if it has one.
    pub(super) cgroup: Option<PathBuf>,
    /// The worker's shutdown token: a stop it caused says so.
    pub(super) worker_shutdown: CancellationToken,
    pub(super) slot: super::spawn::RunningSlot,
    /// Where the job's directory came from, for its end's syncs.
    pub(super) origin: super::record::Origin,
}

pub(super) async fn supervise(
    job: Arc<Job>,
    mut child: super::process::Process,
    pgid: Option<i32>,
    mut pump: JoinHandle<Pumped>,
    limits: Supervision,
    jobs_dir: PathBuf,
    changes: &Changes,
) {
    let id = job.record().id;
    let main = child.id().and_then(|pid| i32::try_from(pid).ok());
    let procs =
        kill::JobProcs::spawned_here(&job.record(), limits.cgroup.clone(), main, child.spawner());
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
        () = limits.write_failed.cancelled() => Ok(Ending::OutputFailed),
        () = job.given_up.cancelled() => Ok(Ending::GivenUp),
    };
    // When an exit and a stop (or the timeout) race, what really happened
    // is recorded: a job that had already exited was not ended by them.
    let ending = match ending {
        Ok(Ending::Stopped | Ending::TimedOut(_)) if matches!(child.try_wait(), Ok(Some(_))) => {
            Err(child.wait().await)
        }
        other => other,
    };
    // The pump's end, if it came while the job was given its grace period.
    let mut drained_in_grace = None;
    let (status, ending) = match ending {
        Err(status) => (status, None),
        Ok(ending) => {
            tracing::info!(job_id = %id, ?ending, "ending the job");
            let asked = tokio::time::Instant::now();
            signal_group(pgid, Signal::SIGTERM);
            kill::signal_job(&procs, Signal::SIGTERM, pgid).await;
            let grace = limits.grace;
            let status = match tokio::time::timeout(grace, child.wait()).await {
                Ok(status) => status,
                Err(_) => {
                    tracing::info!(job_id = %id, ?grace, "grace period over; killing the job's process group");
                    signal_group(pgid, Signal::SIGKILL);
                    child.wait().await
                }
            };
            // The grace period is the whole job's, not only its main
            // process's (a shell without a trap ends at once, while the
            // program it ran cleans up): what is left of it is waited out
            // until the last holder of the output pipe is gone, which the
            // pump's end tells without polling the processes.
            let left = grace.saturating_sub(asked.elapsed());
            if !left.is_zero()
                && let Ok(pumped) = tokio::time::timeout(left, &mut pump).await
            {
                drained_in_grace = Some(pumped);
            }
            (status, Some(ending))
        }
    };
    // Nothing of the job outlives it: whatever stayed in its group, or left
    // it, goes now, and with it every holder of the pipe's write end.
    signal_group(pgid, Signal::SIGKILL);
    let killed = kill::kill_job(&procs).await;
    if killed > 0 {
        tracing::info!(job_id = %id, killed, "killed processes the job left behind");
    }
    let drained = match drained_in_grace {
        Some(pumped) => Ok(pumped),
        None => tokio::time::timeout(DRAIN_TIMEOUT, &mut pump).await,
    };
    let pumped = match drained {
        Ok(Ok(pumped)) => pumped,
        Ok(Err(error)) => {
            tracing::error!(job_id = %id, %error, "output pump failed");
            Pumped {
                len: job.progress.borrow().len,
                write_error: Some(format!("the output pump failed: {error}")),
            }
        }
        Err(_) => {
            pump.abort();
            // The pump may be running on another thread: once its task is
            // over (ended meanwhile, or dropped at an await), its length
            // and its write under way change no more.
            match (&mut pump).await {
                Ok(pumped) => pumped,
                Err(_) => {
                    let len = job.progress.borrow().len;
                    // A write under way for long is output the log does not
                    // have: the disk stalled (or crawls). Without one,
                    // everything the pipe gave was kept, and what holds it
                    // open is a process the kill could not find (whose
                    // writes go on, each quick).
                    match limits.writing.under_way_for() {
                        Some(took) if took >= STALLED_WRITE => {
                            tracing::error!(job_id = %id, kept = len, ?took, "writing the job's output stalled after it ended; the job fails with the output kept");
                            Pumped {
                                len,
                                write_error: Some(format!(
                                    "writing it stalled: {} after the job ended, the disk had not taken the rest",
                                    humantime::format_duration(DRAIN_TIMEOUT)
                                )),
                            }
                        }
                        _ => {
                            tracing::warn!(job_id = %id, "output pipe still open after the job ended; closing it");
                            Pumped {
                                len,
                                write_error: None,
                            }
                        }
                    }
                }
            }
        }
    };
    let len = pumped.len;
    // Output cut at the limit fails the job even if it exited first.
    let ending = match ending {
        None if limits.over_limit.is_cancelled() => {
            Some(Ending::OutputLimit(limits.max_output.unwrap_or_default()))
        }
        other => other,
    };
    // The job is over (its processes killed, its output drained): its slot
    // is free before its final state can be read, so a start sent on that
    // news (the scheduler's queue) finds the slot free instead of being
    // refused busy and requeued behind later jobs.
    drop(limits.slot);
    let record = job.update(|r| {
        r.finished_at_ms = now_ms();
        r.output_bytes = len;
        finish(r, status, ending);
        if ending == Some(Ending::Stopped) && limits.worker_shutdown.is_cancelled() {
            r.error_text = "stopped: the worker was shut down".into();
        }
        // Output that could not be kept fails the job, however it ended
        // (unless the scheduler had already given it up).
        if let Some(error) = &pumped.write_error
            && ending != Some(Ending::GivenUp)
        {
            r.state = State::Failed;
            // Stopped for it, or it had ended (a last write failed or
            // stalled).
            let stopped = match ending {
                Some(Ending::OutputFailed) => "the job was stopped and ",
                _ => "",
            };
            r.error_text = format!(
                "the worker could not write the job's output ({error}); {stopped}the first {len} bytes of its output were kept"
            );
        }
    });
    if let Err(error) = write_final(&jobs_dir, &record, &limits.origin).await {
        // The state stands: it is served and reported from memory, and
        // written when the disk allows.
        tracing::error!(job_id = %id, %error, "could not record the job's final state; kept in memory and retried");
        changes.unwritten(id);
    }
    job.progress.send_modify(|p| {
        p.len = len;
        p.done = true;
        p.tail = bytes::Bytes::new();
    });
    tracing::info!(job_id = %id, state = ?record.state, exit_code = record.exit_code, signal = record.signal, "job finished");
    crate::metrics::job_finished(record.state, &record.command);
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
                    // The pump's error is filled in by the caller.
                    Ending::OutputFailed => State::Failed,
                    Ending::GivenUp => {
                        r.error_text = "the scheduler recorded the job lost while this worker was cut off; what was left of it was killed".into();
                        State::Lost
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
