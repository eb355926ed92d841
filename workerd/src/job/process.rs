//! A job's main process, as started by `sys::spawn_job`: its pid, a pidfd
//! that says when it ended, and its exit status once reaped.

use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;

/// A process workerd spawned and alone reaps (the orphan reaper skips it).
#[derive(Debug)]
pub(crate) struct Process {
    pid: i32,
    pidfd: AsyncFd<OwnedFd>,
    status: Option<ExitStatus>,
}

impl Process {
    /// Takes charge of `pid`, a child of workerd not yet reaped (so the
    /// pid still names it).
    pub(super) fn new(pid: i32) -> std::io::Result<Self> {
        let pidfd = crate::sys::pidfd_async(pid)?;
        Ok(Process {
            pid,
            pidfd,
            status: None,
        })
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
        let status = match waitpid(Pid::from_raw(self.pid), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => ExitStatus::from_raw((code & 0xff) << 8),
            Ok(WaitStatus::Signaled(_, signal, core)) => {
                ExitStatus::from_raw(signal as i32 | if core { 0x80 } else { 0 })
            }
            Ok(_) => return Ok(None),
            Err(errno) => return Err(errno.into()),
        };
        self.status = Some(status);
        Ok(Some(status))
    }

    /// Waits for the process to end (its pidfd becomes readable) and reaps
    /// it. Cancel-safe: nothing is lost if the future is dropped.
    pub(crate) async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            let mut ready = self.pidfd.readable().await?;
            ready.clear_ready();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // Not waited for: the orphan reaper takes it when it ends, as it
        // would any other child of workerd's.
        if matches!(self.try_wait(), Ok(None)) {
            super::reap::disown(self.pid);
        }
    }
}
