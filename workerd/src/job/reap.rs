//! workerd as a child subreaper, and reaping the orphans that come to it.
//!
//! As a subreaper, workerd inherits every orphaned descendant of its jobs
//! (a double fork no longer hands them to init), so they stay findable and
//! their zombies become workerd's to reap.
//!
//! workerd's children are of two kinds, and their exit statuses have two
//! owners. The jobs' main processes are their `Process`'s: it waits for
//! each by its pid, and a status taken from under it would lose the job's
//! exit code. The re-parented orphans are nobody's but ours. So the
//! reaper never reaps whatever `waitpid(-1)` would. On SIGCHLD it looks
//! at the ended child `waitid` shows without reaping it (`WNOWAIT`),
//! reaps it by pid if it is an orphan, and looks again; when nothing else
//! has ended (the job's `Process` reaped its own first), that pass costs
//! one system call. When `waitid` shows a main process not yet reaped (it
//! would show that one again and again, and nothing behind it), and now
//! and then as a backstop (signals coalesce), the reaper reads workerd's
//! children lists for zombies (the main thread's, where orphans go; every
//! thread's in the backstop, for the zombies of released main processes
//! and of processes cloned as their siblings) and waits for those pids
//! exactly, with `WNOHANG`, skipping the main processes.
//!
//! The main processes are known by [`OWN`]: the pid of every process
//! workerd spawned, with a flag its `Process` sets once it has reaped it (or
//! gave it up). [`spawn`] holds the lock across the spawn and the insert,
//! and the reaper holds it while it decides and waits, so the reaper can
//! never see a main process that is not yet recorded. An entry whose flag
//! is set is stale and goes at the next pass; a new spawn under the same pid
//! replaces it with a fresh flag, so a main process's status is never taken.
//!
//! The flag replaced the process's start time (`/proc/<pid>/stat`), which
//! told a stale entry from a new process under the same pid: that read
//! waits for the child's `execve` to finish (the kernel's
//! `exec_update_lock`), and so held every start's answer for the whole
//! exec of the job's interpreter (1–2 ms on the development VM).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};

use super::kill::{ProcStat, all_processes, children, orphans};

/// Pid → the released flag of each process workerd spawned itself: set by
/// its `Process` once the status is taken or no longer wanted.
static OWN: Mutex<BTreeMap<i32, Released>> = Mutex::new(BTreeMap::new());

/// Set by a main process's owner once the reaper may forget it (reaped by
/// the owner) or take it (the owner went without waiting). Lock-free, so
/// an owner on a runtime thread never waits for a spawn holding [`OWN`].
#[derive(Debug, Clone, Default)]
pub(super) struct Released(Arc<AtomicBool>);

impl Released {
    pub(super) fn set(&self) {
        self.0.store(true, Ordering::Release);
    }

    fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// A scan now and then, for SIGCHLDs merged into one or missed.
const BACKSTOP: Duration = Duration::from_secs(10);

fn own() -> MutexGuard<'static, BTreeMap<i32, Released>> {
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

/// The jobs' main processes that workerd spawned and has not reaped yet
/// (so each pid still names the process spawned), as of now.
pub(super) fn running_spawns() -> std::collections::BTreeSet<i32> {
    own()
        .iter()
        .filter(|(_, released)| !released.is_set())
        .map(|(pid, _)| *pid)
        .collect()
}

/// Whether `pid` is a main process workerd spawned and has not reaped yet.
pub(super) fn is_running_spawn(pid: i32) -> bool {
    own().get(&pid).is_some_and(|released| !released.is_set())
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
    let released = Released::default();
    own.insert(pid, released.clone());
    // The child's parent is this thread (not workerd's main one).
    let spawner = nix::unistd::gettid().as_raw();
    match super::process::Process::new(pid, spawner, released) {
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
        let pass = tokio::select! {
            Some(()) = async {
                match children.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            } => reap_signalled as fn() -> usize,
            _ = backstop.tick() => reap_backstop,
        };
        match tokio::task::spawn_blocking(pass).await {
            Ok(0) => {}
            Ok(reaped) => tracing::debug!(reaped, "reaped orphaned job processes"),
            Err(error) => tracing::warn!(%error, "orphan reaper failed"),
        }
    }
}

/// The pass after a SIGCHLD: reaps the ended children `waitid` shows, one
/// by one, until none is left; hands over to [`reap_listed`] at the first
/// that is a main process still owned (`waitid` would show it again and
/// again, and nothing behind it). Returns how many orphans were reaped.
fn reap_signalled() -> usize {
    let mut reaped = 0;
    let mut own = own();
    own.retain(|_, released| !released.is_set());
    loop {
        let pid = match crate::sys::peek_ended_child() {
            Ok(Some(pid)) => pid,
            Ok(None) => return reaped,
            Err(error) => {
                tracing::debug!(%error, "waitid on workerd's children failed");
                break;
            }
        };
        if own.get(&pid).is_some_and(|released| !released.is_set()) {
            break;
        }
        match crate::sys::waitpid_raw(pid, true) {
            Ok(Some(status)) => {
                tracing::debug!(pid, status, "reaped an orphan");
                reaped += 1;
            }
            // Shown as ended, so never still running; anything else would
            // show it again: the scan takes over.
            Ok(None) | Err(_) => break,
        }
    }
    drop(own);
    reaped + reap_listed(orphans(me()))
}

/// The pass every [`BACKSTOP`]: [`reap_listed`] over the children of every
/// thread of workerd. Besides orphans (its main thread's), a thread holds
/// the main processes it spawned, a released one's zombie (its `Process`
/// gave it up unreaped), and a process a job's main process cloned as its
/// sibling (`CLONE_PARENT`); `waitid` shows those after a SIGCHLD, but
/// not past a main process still owned.
fn reap_backstop() -> usize {
    reap_listed(children(me()))
}

fn me() -> i32 {
    i32::try_from(std::process::id()).unwrap_or(0)
}

/// One pass: waits for every zombie among `listed` (workerd's children;
/// every process on the machine where the kernel does not list children)
/// that is not one of its own spawns. Returns how many were reaped.
fn reap_listed(listed: Option<Vec<i32>>) -> usize {
    let me = me();
    // The scan runs unlocked so spawns wait only for the decisions below.
    // Children lists where the kernel has them: a scan of every process
    // on the machine for each SIGCHLD cost a third of the worker's time per
    // job. A child missed by a list read during a reparenting is reaped at
    // the next signal or backstop.
    let zombies: Vec<ProcStat> = listed
        .map(|pids| pids.into_iter().filter_map(ProcStat::read).collect())
        .unwrap_or_else(all_processes)
        .into_iter()
        .filter(|s| s.ppid == me && s.is_zombie())
        .collect();
    let mut own = own();
    // What stays are the main processes still owned: a spawn since the scan
    // has replaced its pid's entry with an unset flag.
    own.retain(|_, released| !released.is_set());
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
