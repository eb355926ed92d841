//! workerd as a child subreaper, and reaping the orphans that come to it.
//!
//! As a subreaper, workerd inherits every orphaned descendant of its jobs
//! (a double fork no longer hands them to init), so they stay findable and
//! their zombies become workerd's to reap.
//!
//! workerd's children are of two kinds, and their exit statuses have two
//! owners. The jobs' main processes are their `Process`'s: it waits for
//! each by its pid, and a status taken from under it would lose the job's
//! exit code. The
//! re-parented orphans are nobody's but ours. So the reaper never calls
//! `waitpid(-1)`: on SIGCHLD (and now and then, as signals coalesce) it scans
//! `/proc` for zombies whose parent is workerd and waits for those pids
//! exactly, with `WNOHANG`, skipping the main processes.
//!
//! The main processes are known by [`OWN`]: pid and start time of every
//! process workerd spawned. [`spawn`] holds its lock across the spawn and the
//! insert, and the reaper holds it while it decides and waits, so the reaper
//! can never see a main process that is not yet recorded. An entry goes stale
//! once its `Process` has reaped it; the start time tells a stale entry from
//! a new process under the same pid, so entries need no removal hook and a
//! main process's status is never taken.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};

use super::kill::{ProcStat, all_processes, children};

/// Pid → start ticks of the processes workerd spawned itself (`None` when
/// its start could not be read: then the pid is never reaped while listed).
static OWN: Mutex<BTreeMap<i32, Option<u64>>> = Mutex::new(BTreeMap::new());

/// A scan now and then, for SIGCHLDs merged into one or missed.
const BACKSTOP: Duration = Duration::from_secs(10);

fn own() -> MutexGuard<'static, BTreeMap<i32, Option<u64>>> {
    // A panic elsewhere cannot leave the map half-written.
    OWN.lock().unwrap_or_else(|e| e.into_inner())
}

/// Set once this process is the reaper of its descendants' orphans.
static SUBREAPER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether every process a job started here stays below this process
/// (orphans come to us, not to init) until it is reaped.
pub(super) fn is_subreaper() -> bool {
    SUBREAPER.load(std::sync::atomic::Ordering::Acquire)
}

/// Makes this process the reaper of its descendants' orphans.
pub(crate) fn become_subreaper() {
    match nix::sys::prctl::set_child_subreaper(true) {
        Ok(()) => {
            SUBREAPER.store(true, std::sync::atomic::Ordering::Release);
            tracing::debug!("workerd is a child subreaper")
        }
        Err(error) => {
            tracing::warn!(%error, "cannot become a child subreaper; orphaned job processes go to init")
        }
    }
}

/// Starts a job's process and records it as workerd's own before the
/// reaper can look again.
pub(super) fn spawn(exec: crate::sys::JobExec) -> std::io::Result<super::process::Process> {
    let mut own = own();
    let pid = crate::sys::spawn_job(exec)?;
    // One small procfs read (no disk behind it), beside the exec that the
    // spawn just waited for.
    own.insert(pid, ProcStat::read(pid).map(|s| s.start_ticks));
    match super::process::Process::new(pid) {
        Ok(process) => Ok(process),
        Err(error) => {
            // Without a handle on it the job could not be supervised: it
            // does not run at all. Reaped under the lock, so the reaper
            // cannot take it first and its pid cannot be reused meanwhile.
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            let _ = crate::sys::waitpid_raw(pid, false);
            own.remove(&pid);
            Err(error)
        }
    }
}

/// Hands a process of workerd's own to the orphan reaper (its owner went
/// without waiting for it).
pub(super) fn disown(pid: i32) {
    own().remove(&pid);
}

/// Reaps orphans re-parented to workerd until the task is dropped.
pub(crate) async fn reap_orphans() {
    let mut children = match signal(SignalKind::child()) {
        Ok(s) => Some(s),
        Err(error) => {
            tracing::warn!(%error, "no SIGCHLD stream; orphans are reaped every {BACKSTOP:?}");
            None
        }
    };
    let mut backstop = tokio::time::interval(BACKSTOP);
    backstop.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            Some(()) = async {
                match children.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            } => {}
            _ = backstop.tick() => {}
        }
        match tokio::task::spawn_blocking(reap_once).await {
            Ok(0) => {}
            Ok(reaped) => tracing::debug!(reaped, "reaped orphaned job processes"),
            Err(error) => tracing::warn!(%error, "orphan reaper failed"),
        }
    }
}

/// One pass: waits for every zombie child of workerd that is not one of its
/// own spawns, and forgets own spawns that are gone. Returns how many
/// orphans were reaped.
fn reap_once() -> usize {
    let me = i32::try_from(std::process::id()).unwrap_or(0);
    // The scan runs unlocked so spawns wait only for the decisions below.
    // Our children alone, where the kernel lists them: a scan of every
    // process on the machine for each SIGCHLD cost a third of the worker's
    // time per job. A child missed by a list read during a reparenting is
    // reaped at the next signal or backstop.
    let zombies: Vec<ProcStat> = children(me)
        .map(|pids| pids.into_iter().filter_map(ProcStat::read).collect())
        .unwrap_or_else(all_processes)
        .into_iter()
        .filter(|s| s.ppid == me && s.is_zombie())
        .collect();
    let mut own = own();
    // What stays names the process now under each pid: an entry whose
    // process its `Process` has reaped (gone, or its pid taken by another process)
    // goes, and a spawn since the scan has replaced its pid's entry.
    own.retain(|pid, start| match (ProcStat::read(*pid), start) {
        (None, _) => false,
        (Some(now), Some(start)) => now.start_ticks == *start,
        (Some(_), None) => true,
    });
    let mut reaped = 0;
    for zombie in zombies {
        if own.contains_key(&zombie.pid) {
            continue;
        }
        match waitpid(
            Pid::from_raw(zombie.pid),
            Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL),
        ) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => {}
            Ok(status) => {
                tracing::debug!(pid = zombie.pid, ?status, "reaped an orphan");
                reaped += 1;
            }
            Err(error) => tracing::debug!(pid = zombie.pid, %error, "waitpid on an orphan failed"),
        }
    }
    reaped
}
