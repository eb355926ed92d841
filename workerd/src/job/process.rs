//! A job's main process, as started by `sys::spawn_job`: its pid, what
//! says when it ended (a pidfd, or SIGCHLD before Linux 5.3), and its exit
//! status once reaped.

use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{Signal, SignalKind, signal};

/// A process workerd spawned and alone reaps (the orphan reaper skips it).
#[derive(Debug)]
pub(crate) struct Process {
    pid: i32,
    /// The thread of workerd that spawned it (see [`Process::spawner`]).
    spawner: i32,
    ended: Ended,
    status: Option<ExitStatus>,
    /// Tells the orphan reaper the pid is no longer ours to skip.
    released: super::reap::Released,
}

#[derive(Debug)]
enum Ended {
    /// Readable once the process ended.
    Pidfd(AsyncFd<OwnedFd>),
    /// Kernels without pidfd_open: every SIGCHLD since this was made is
    /// kept until received, so none between a look and a wait is lost.
    Sigchld(Signal),
}

impl Process {
    /// Takes charge of `pid`, a child of workerd not yet reaped (so the
    /// pid still names it).
    pub(super) fn new(
        pid: i32,
        spawner: i32,
        released: super::reap::Released,
    ) -> std::io::Result<Self> {
        let ended = match crate::sys::pidfd_async(pid) {
            Ok(pidfd) => Ended::Pidfd(pidfd),
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOSYS) => {
                Ended::Sigchld(signal(SignalKind::child())?)
            }
            Err(e) => return Err(e),
        };
        Ok(Process {
            pid,
            spawner,
            ended,
            status: None,
            released,
        })
    }

    /// The thread of workerd that spawned this process, whose child it is
    /// (not the main thread's) while that thread lives: so is a process
    /// it clones as its sibling (`CLONE_PARENT`).
    pub(crate) fn spawner(&self) -> i32 {
        self.spawner
    }

    pub(crate) fn id(&self) -> Option<u32> {
        if self.status.is_some() {
            return None; // reaped: the pid may name another process now
        }
        u32::try_from(self.pid).ok()
    }

    /// The exit status, if the process has ended (reaping it).
    pub(crate) fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        let Some(raw) = crate::sys::waitpid_raw(self.pid, true)? else {
            return Ok(None);
        };
        let status = ExitStatus::from_raw(raw);
        self.status = Some(status);
        // Only after the reap: set before, the reaper could take the status.
        self.released.set();
        Ok(Some(status))
    }

    /// Waits for the process to end and reaps it. Cancel-safe: nothing is
    /// lost if the future is dropped.
    pub(crate) async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            match &mut self.ended {
                Ended::Pidfd(pidfd) => pidfd.readable().await?.clear_ready(),
                Ended::Sigchld(signals) => {
                    signals.recv().await;
                }
            }
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // Reaped here if it has ended; if not, the orphan reaper takes it
        // when it ends, as it would any other child of workerd's.
        let _ = self.try_wait();
        self.released.set();
    }
}
