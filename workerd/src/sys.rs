//! The one place with `unsafe`: code that runs in a child process between
//! fork and exec, where only async-signal-safe calls are allowed, and the
//! system calls nix does not wrap (or wraps only behind features we do not
//! otherwise need).
#![allow(unsafe_code)]

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;

use jobcluster_plugins::Limits;
use nix::errno::Errno;
use nix::libc;
use nix::sys::resource::{Resource, setrlimit};
use nix::sys::signal::Signal;

/// Sets the plugin's resource limits on the job process just before it
/// execs the interpreter; its children inherit them. With `cgroup_procs`
/// (the job cgroup's `cgroup.procs`, opened by the parent) the process
/// first moves itself into the job's cgroup, which then holds the memory
/// and process limits; setrlimit holds the rest.
pub(crate) fn set_limits(
    cmd: &mut tokio::process::Command,
    limits: Limits,
    cgroup_procs: Option<OwnedFd>,
) {
    if limits == Limits::default() && cgroup_procs.is_none() {
        return;
    }
    let in_cgroup = cgroup_procs.is_some();
    let cpu_seconds = limits
        .cpu_time
        .map(|d| d.as_secs() + u64::from(d.subsec_nanos() > 0));
    let wanted = [
        (Resource::RLIMIT_AS, limits.memory.filter(|_| !in_cgroup)),
        (Resource::RLIMIT_CPU, cpu_seconds),
        (Resource::RLIMIT_NOFILE, limits.open_files),
        (
            Resource::RLIMIT_NPROC,
            limits.processes.filter(|_| !in_cgroup),
        ),
    ];
    // SAFETY: the closure runs in the forked child before exec. It only
    // calls write(2) on an fd opened by the parent and setrlimit(2), both
    // async-signal-safe, on values computed above; it allocates nothing and
    // touches no lock. The fd is close-on-exec, so the job never sees it.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(procs) = &cgroup_procs {
                // "0" moves the writing process: the job joins its cgroup
                // before it can start anything.
                nix::unistd::write(procs, b"0").map_err(std::io::Error::from)?;
            }
            for (resource, value) in wanted {
                if let Some(value) = value {
                    setrlimit(resource, value, value).map_err(std::io::Error::from)?;
                }
            }
            Ok(())
        });
    }
}

/// What [`access_as`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Access {
    /// List and pass through a directory.
    ReadDir,
    /// Pass through a directory.
    Search,
    /// Run a program.
    Execute,
}

/// Asks the kernel whether a job running as `uid`/`gid` could `access`
/// `path`; `None` asks for workerd's own user.
///
/// Another user's permissions cannot be asked for in-process (access(2)
/// answers for our own real ids), and a model of them from mode bits would
/// miss ACLs, `noexec` mounts and security modules: a wrong "yes" fails
/// every job later, a wrong "no" refuses a working setup with no way
/// around it. So a short-lived child takes the job's credentials exactly
/// as a job does (std's `uid`/`gid`: supplementary groups dropped, then
/// setgid, setuid), calls access(2) and exits without exec; its errno comes
/// back through std's spawn error pipe. Used at start only, a few times per
/// job user.
pub(crate) fn access_as(
    identity: Option<(u32, u32)>,
    path: &Path,
    access: Access,
) -> std::io::Result<()> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mode = match access {
        Access::ReadDir => libc::R_OK | libc::X_OK,
        Access::Search | Access::Execute => libc::X_OK,
    };
    let Some((uid, gid)) = identity else {
        // SAFETY: access(2) reads a NUL-terminated path we own for the
        // duration of the call and writes nothing of ours.
        return match unsafe { libc::access(c_path.as_ptr(), mode) } {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        };
    };
    // The program is never executed: the hook ends the child first.
    let mut cmd = std::process::Command::new("/");
    cmd.uid(uid)
        .gid(gid)
        .env_clear()
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: the closure runs in the forked child after std switched its
    // user. It calls access(2) on a path allocated before the fork, reads
    // errno, and _exit(2)s, all async-signal-safe; it allocates nothing
    // and touches no lock.
    unsafe {
        cmd.pre_exec(move || {
            if libc::access(c_path.as_ptr(), mode) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::_exit(0)
        });
    }
    let status = cmd.spawn()?.wait()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "the access check ended with {status}"
        )))
    }
}

/// A pidfd for `pid`: a handle on that one process, which a later reuse of
/// the pid cannot redirect. `ENOSYS` before Linux 5.3.
pub(crate) fn pidfd_open(pid: i32) -> nix::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) takes a pid and flags by value and touches no
    // memory of ours; it returns a new descriptor or -1 with errno set.
    let fd = Errno::result(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0u32) })?;
    let fd = RawFd::try_from(fd).map_err(|_| Errno::EBADF)?;
    // SAFETY: the kernel just created this descriptor for us and nothing
    // else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends `signal` to the process behind a pidfd.
pub(crate) fn pidfd_send_signal(pidfd: &OwnedFd, signal: Signal) -> nix::Result<()> {
    // SAFETY: pidfd_send_signal(2) gets a descriptor we own, a signal
    // number, a null siginfo (the kernel then fills one as kill(2) does) and
    // no flags; it writes no memory of ours.
    let result = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal as libc::c_int,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        )
    };
    Errno::result(result).map(drop)
}

/// Free memory glibc's allocator may keep; past it, it goes back to the
/// system.
const KEEP_FREE_BYTES: usize = 16 << 20;

/// Gives memory that glibc's allocator holds free back to the system when
/// there is more than [`KEEP_FREE_BYTES`] of it; returns how much was free
/// if it did. glibc keeps what a burst freed inside its heaps for reuse:
/// after a thousand followers of one job (about 1 MiB of output in flight
/// each) the worker stayed at 1.2 GB resident. mimalloc as the global
/// allocator gave the pages back but doubled the idle worker (22 MB), so
/// the allocator stays and is trimmed.
#[cfg(target_env = "gnu")]
pub(crate) fn trim_free_memory() -> Option<usize> {
    // SAFETY: plain glibc calls without pointer arguments; they take the
    // allocator's own locks.
    let free = unsafe { libc::mallinfo2() }.fordblks;
    if free <= KEEP_FREE_BYTES {
        return None;
    }
    // SAFETY: as above.
    unsafe { libc::malloc_trim(0) };
    Some(free)
}

#[cfg(not(target_env = "gnu"))]
pub(crate) fn trim_free_memory() -> Option<usize> {
    None
}
