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
use nix::sys::signal::Signal;

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

/// A child of workerd's that has ended, left unreaped (`WNOWAIT`); None
/// when there is none. One at a time: the same one until it is reaped.
pub(crate) fn peek_ended_child() -> std::io::Result<Option<i32>> {
    loop {
        // SAFETY: waitid(2) writes a siginfo_t into our zeroed local.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
        // SAFETY: as above; P_ALL ignores the id.
        match unsafe { libc::waitid(libc::P_ALL, 0, &mut info, flags) } {
            0 => {
                // SAFETY: waitid filled the siginfo of a child (or left it
                // zeroed, pid 0, when none has ended).
                let pid = unsafe { info.si_pid() };
                return Ok((pid > 0).then_some(pid));
            }
            _ => {
                let error = std::io::Error::last_os_error();
                match error.raw_os_error() {
                    Some(libc::ECHILD) => return Ok(None),
                    Some(libc::EINTR) => {}
                    _ => return Err(error),
                }
            }
        }
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

/// Renames `from` to `to` unless `to` exists (`EEXIST` then), atomically:
/// `rename(2)` would replace an empty directory at `to`. Through the raw
/// system call, as glibc wraps it only from 2.28 and nix only for glibc.
pub(crate) fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    let from = CString::new(from.as_os_str().as_bytes())?;
    let to = CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: renameat2(2) reads two NUL-terminated paths that live until
    // it returns, takes the directory descriptors and flags by value and
    // writes no memory of ours.
    let result = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    Errno::result(result)
        .map(drop)
        .map_err(std::io::Error::from)
}

/// A pidfd for `pid`, registered with the runtime for readability (it
/// becomes readable once the process ended).
pub(crate) fn pidfd_async(pid: i32) -> std::io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    let pidfd = pidfd_open(pid)?;
    // SAFETY: an `OwnedFd` returns the one descriptor it owns from
    // `as_raw_fd`, and keeps it open (unchanged) until the `AsyncFd`,
    // which owns it, drops it after deregistering.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE)
    }
    .map_err(std::io::Error::from)
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

/// Where [`pread_spare`] may take a log's bytes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadFrom {
    /// The page cache or, for what it does not hold, the disk.
    Disk,
    /// Only what the page cache already holds: the kernel answers
    /// `WouldBlock` (or a short read) rather than wait for the disk
    /// (`RWF_NOWAIT`), so the call may run on an async thread. Filesystems
    /// that cannot promise that answer `Unsupported`.
    Cache,
}

/// Reads up to `max` bytes from `file` at `offset` into `buf`'s spare
/// capacity, without zeroing it first as std's `read_at` needs (zeroing
/// every piece a follower reads back was 5 % of the worker's CPU while
/// streaming). Returns how many bytes were read; 0 at the end of the file.
pub(crate) fn pread_spare(
    file: &std::fs::File,
    buf: &mut bytes::BytesMut,
    offset: u64,
    max: usize,
    from: ReadFrom,
) -> std::io::Result<usize> {
    let flags = match from {
        ReadFrom::Disk => 0,
        ReadFrom::Cache => libc::RWF_NOWAIT,
    };
    let offset = libc::off64_t::try_from(offset)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    buf.reserve(max);
    let spare = buf.spare_capacity_mut();
    let len = spare.len().min(max);
    let iov = libc::iovec {
        iov_base: spare.as_mut_ptr().cast(),
        iov_len: len,
    };
    // SAFETY: the kernel writes at most `len <= spare.len()` bytes into
    // memory `buf` owns, and does not keep the pointer.
    let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, offset, flags) };
    let n = usize::try_from(n).map_err(|_| std::io::Error::last_os_error())?;
    // SAFETY: the kernel initialized the first `n` bytes of the spare
    // capacity, and `n <= len <= spare.len()`.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// What a job's process is started with. The parent prepares all of it:
/// the child shares the parent's memory until it execs and may not
/// allocate.
pub(crate) struct JobExec {
    /// A path (the plugin resolved it), run without a `PATH` search.
    pub(crate) program: std::path::PathBuf,
    /// `argv[1..]`.
    pub(crate) args: Vec<std::ffi::OsString>,
    /// The whole environment, in order; a later entry of a name wins.
    pub(crate) env: Vec<(std::ffi::OsString, std::ffi::OsString)>,
    pub(crate) cwd: std::path::PathBuf,
    pub(crate) stdin: OwnedFd,
    pub(crate) stdout: OwnedFd,
    pub(crate) stderr: OwnedFd,
    /// User and group to switch to (supplementary groups are dropped).
    pub(crate) identity: Option<(u32, u32)>,
    pub(crate) limits: Limits,
    /// The job cgroup's `cgroup.procs`: the process moves itself in first.
    pub(crate) cgroup_procs: Option<OwnedFd>,
}

/// Stack of the child between clone and exec: it runs a few system calls.
const CHILD_STACK: usize = 64 << 10;

// The 32-bit ABIs' plain set*id calls take 16-bit ids.
#[cfg(not(any(target_arch = "x86", target_arch = "arm")))]
use libc::{SYS_setgid as SYS_SETGID, SYS_setgroups as SYS_SETGROUPS, SYS_setuid as SYS_SETUID};
#[cfg(any(target_arch = "x86", target_arch = "arm"))]
use libc::{
    SYS_setgid32 as SYS_SETGID, SYS_setgroups32 as SYS_SETGROUPS, SYS_setuid32 as SYS_SETUID,
};

/// What the child was doing when a step failed, for the error's message.
const STEPS: [&str; 6] = [
    "setting up its standard descriptors",
    "switching to its user",
    "entering its directory",
    "joining its cgroup",
    "setting its limits",
    "executing its interpreter",
];

/// `ChildArgs::errno` until the child reaches exec: a child that never
/// gets there (killed by a signal) leaves it.
const NOT_REACHED: i32 = -1;

/// What the child reads; the parent owns every pointer and keeps it alive
/// until the child has exec'd or exited (the clone returns no earlier).
#[repr(C)]
struct ChildArgs {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    cwd: *const libc::c_char,
    fds: [RawFd; 3],
    cgroup_procs: RawFd,
    identity: Option<(libc::uid_t, libc::gid_t)>,
    /// Drop supplementary groups (root only may, as std does).
    drop_groups: bool,
    limits: [(libc::c_int, Option<u64>); 4],
    /// Give the job the kernel's default scheduling slice back
    /// (`jobcluster_proto::slice`).
    default_slice: bool,
    /// [`NOT_REACHED`], 0 once the child calls exec, or the errno of the
    /// step that failed.
    errno: std::sync::atomic::AtomicI32,
    /// Index into [`STEPS`] of the step under way.
    step: std::sync::atomic::AtomicUsize,
}

/// Starts a job's process with `clone(CLONE_VM | CLONE_VFORK)`, as glibc's
/// `posix_spawn` does, and returns its pid once it exec'd.
///
/// Why not std's `Command`: with a user to switch to or limits to set it
/// forks, and a fork of workerd (tens of MB resident, many threads) cost
/// 1–3 ms on the virtual machines measured, most of a start, in page table
/// copies, copy-on-write faults and the teardown at exec; std's own
/// vfork path (`posix_spawn`) cannot switch users or set limits. Here the
/// child borrows the parent's memory for the few system calls before exec,
/// in std's order: standard descriptors, user, directory, process group,
/// then (what std's `pre_exec` hook did) cgroup and limits.
///
/// The child runs with every signal blocked, resets every handled signal
/// (and SIGPIPE, which std ignores) to its default, and unblocks them only
/// right before exec, so no handler of workerd's ever runs in it. It calls
/// the kernel directly for setgroups/setgid/setuid: glibc's wrappers would
/// signal workerd's threads to change theirs too. Its change of user clears
/// the "dumpable" flag of the memory it shares with workerd, which the
/// parent sets back.
///
/// Call with the reaper's lock held (`reap::spawn`), so the reaper never
/// sees the pid before it is listed as workerd's own.
pub(crate) fn spawn_job(exec: JobExec) -> std::io::Result<i32> {
    use std::sync::atomic::Ordering;
    let c = |bytes: &[u8]| {
        CString::new(bytes).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a NUL byte in the command",
            )
        })
    };
    let program = c(exec.program.as_os_str().as_bytes())?;
    let cwd = c(exec.cwd.as_os_str().as_bytes())?;
    let mut argv_owned = vec![program.clone()];
    for arg in &exec.args {
        argv_owned.push(c(arg.as_bytes())?);
    }
    // Later entries win, as with Command::env; the order of first sight stays.
    let mut env: Vec<(&std::ffi::OsStr, &std::ffi::OsStr)> = Vec::new();
    for (key, value) in &exec.env {
        match env.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value,
            None => env.push((key, value)),
        }
    }
    let mut envp_owned = Vec::with_capacity(env.len());
    for (key, value) in env {
        let mut pair = key.as_bytes().to_vec();
        pair.push(b'=');
        pair.extend_from_slice(value.as_bytes());
        envp_owned.push(c(&pair)?);
    }
    let argv: Vec<*const libc::c_char> = argv_owned
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp: Vec<*const libc::c_char> = envp_owned
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    // A source among 0–2 could be overwritten by an earlier dup2 onto it
    // (a workerd started with those closed): such a one moves up first.
    let above_stdio = |fd: OwnedFd| -> std::io::Result<OwnedFd> {
        if fd.as_raw_fd() > 2 {
            Ok(fd)
        } else {
            fd.try_clone() // F_DUPFD_CLOEXEC from 3 up
        }
    };
    let stdio = [
        above_stdio(exec.stdin)?,
        above_stdio(exec.stdout)?,
        above_stdio(exec.stderr)?,
    ];
    let in_cgroup = exec.cgroup_procs.is_some();
    let cpu_seconds = exec
        .limits
        .cpu_time
        .map(|d| d.as_secs() + u64::from(d.subsec_nanos() > 0));
    let args = ChildArgs {
        program: program.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        cwd: cwd.as_ptr(),
        fds: stdio.each_ref().map(|fd| fd.as_raw_fd()),
        cgroup_procs: exec.cgroup_procs.as_ref().map_or(-1, |fd| fd.as_raw_fd()),
        identity: exec.identity,
        // SAFETY: getuid(2) cannot fail and touches no memory.
        drop_groups: unsafe { libc::getuid() } == 0,
        limits: [
            (
                libc::RLIMIT_AS as libc::c_int,
                exec.limits.memory.filter(|_| !in_cgroup),
            ),
            (libc::RLIMIT_CPU as libc::c_int, cpu_seconds),
            (libc::RLIMIT_NOFILE as libc::c_int, exec.limits.open_files),
            (
                libc::RLIMIT_NPROC as libc::c_int,
                exec.limits.processes.filter(|_| !in_cgroup),
            ),
        ],
        default_slice: jobcluster_proto::slice::shortened(),
        errno: std::sync::atomic::AtomicI32::new(NOT_REACHED),
        step: std::sync::atomic::AtomicUsize::new(0),
    };

    let stack = ChildStack::new()?;
    // SAFETY: prctl(PR_GET_DUMPABLE) reads a flag of this process.
    let dumpable = unsafe { libc::prctl(libc::PR_GET_DUMPABLE) };
    // SAFETY: sigfillset/pthread_sigmask write only the sets we pass.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    // SAFETY: the child runs `child_main` on its own stack (mapped above,
    // with a guard page) in our address space; with CLONE_VFORK this
    // thread is suspended until the child exec'd or exited, so `args` and
    // everything it points to outlive the child's use of them. The child
    // only makes system calls (see `child_main`).
    let pid = unsafe {
        libc::clone(
            child_main,
            stack.top(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            std::ptr::from_ref(&args).cast_mut().cast(),
        )
    };
    let clone_error = std::io::Error::last_os_error();
    // SAFETY: restores this thread's own mask, saved above, and this
    // process's dumpable flag, which the child's setuid cleared on the
    // memory it shared (only 0 and 1 can be set; 2 is never changed).
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        if dumpable == 1 {
            libc::prctl(libc::PR_SET_DUMPABLE, 1);
        }
    }
    drop(stack);
    drop(stdio); // the parent's copies: the job holds the pipe's write end alone
    if pid < 0 {
        return Err(clone_error);
    }
    let errno = args.errno.load(Ordering::Acquire);
    if errno == 0 {
        return Ok(pid);
    }
    // The child exited without exec (the clone returned at its exit): reap
    // it, or it stays a zombie the reaper skips.
    let _ = waitpid_raw(pid, false);
    let step = STEPS
        .get(args.step.load(Ordering::Acquire))
        .copied()
        .unwrap_or("starting");
    Err(if errno == NOT_REACHED {
        std::io::Error::other(format!("the job's process ended while {step}"))
    } else {
        let cause = std::io::Error::from_raw_os_error(errno);
        std::io::Error::new(cause.kind(), format!("{step}: {cause}"))
    })
}

/// `waitpid(pid)` with the raw status (`WNOHANG` when `nohang`): `None`
/// while it runs. nix's `waitpid` fails on a real-time signal it has no
/// name for, after the kernel has already reaped the process.
pub(crate) fn waitpid_raw(pid: i32, nohang: bool) -> std::io::Result<Option<i32>> {
    let mut status = 0;
    let flags = if nohang { libc::WNOHANG } else { 0 };
    loop {
        // SAFETY: waitpid(2) writes the status into our local.
        match unsafe { libc::waitpid(pid, &mut status, flags) } {
            0 => return Ok(None),
            -1 => {
                let error = std::io::Error::last_os_error();
                if error.kind() != std::io::ErrorKind::Interrupted {
                    return Err(error);
                }
            }
            _ => return Ok(Some(status)),
        }
    }
}

/// The child's stack: mapped, with a guard page below it, and unmapped
/// once the child no longer runs on it.
struct ChildStack {
    base: *mut libc::c_void,
    len: usize,
}

impl ChildStack {
    fn new() -> std::io::Result<Self> {
        // SAFETY: sysconf reads a constant of the system.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .ok()
            .filter(|p| p.is_power_of_two())
            .unwrap_or(4096);
        let len = CHILD_STACK.div_ceil(page) * page + page;
        // SAFETY: a fresh anonymous private mapping; nothing else refers
        // to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let stack = ChildStack { base, len };
        // SAFETY: the lowest page of our own mapping becomes the guard: an
        // overflow faults instead of writing into other memory.
        if unsafe { libc::mprotect(base, page, libc::PROT_NONE) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stack)
    }

    /// The highest address, 16-byte aligned: the stack grows down.
    fn top(&self) -> *mut libc::c_void {
        let top = (self.base as usize + self.len) & !15;
        top as *mut libc::c_void
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: our own mapping, no longer used (the child exec'd or
        // exited before the clone returned).
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// The child between clone and exec. It shares workerd's memory and the
/// calling thread's TLS, so it makes system calls only: no allocation, no
/// lock, no panic (no indexing), nothing that could touch workerd's state.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    use std::sync::atomic::Ordering;
    // SAFETY: `arg` is the parent's `ChildArgs`, alive and unchanged until
    // this child execs or exits (CLONE_VFORK).
    let a = unsafe { &*arg.cast::<ChildArgs>() };
    let step = |n: usize| a.step.store(n, Ordering::Release);
    let fail = |errno: Option<i32>| -> ! {
        let errno = errno
            .or_else(|| std::io::Error::last_os_error().raw_os_error())
            .unwrap_or(libc::EIO);
        a.errno.store(errno.max(1), Ordering::Release);
        // SAFETY: ends this child at once, without exit handlers.
        unsafe { libc::syscall(libc::SYS_exit, 127) };
        // SAFETY: unreachable, exit does not return; `_exit` as a backstop.
        unsafe { libc::_exit(127) }
    };
    // SAFETY (whole block): plain system calls on descriptors, paths and
    // arrays the parent prepared; none allocates or takes a lock.
    unsafe {
        // Handlers of workerd's must not run here, in its memory.
        for sig in 1..=libc::SIGRTMAX() {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            let mut action: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut action) != 0 {
                continue; // glibc's own signals, never sent to this child
            }
            if sig == libc::SIGPIPE
                || (action.sa_sigaction != libc::SIG_DFL && action.sa_sigaction != libc::SIG_IGN)
            {
                let mut default: libc::sigaction = std::mem::zeroed();
                default.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &default, std::ptr::null_mut());
            }
        }
        // A job is not workerd: it gets the slice any process gets. Where
        // that fails it keeps workerd's shorter one, which makes it
        // preempted sooner, never wrong: not worth refusing the job for.
        if a.default_slice {
            jobcluster_proto::slice::restore_default();
        }
        step(0);
        // The sources are all above 2 (the parent saw to it).
        for (target, fd) in (0..).zip(a.fds) {
            if libc::dup2(fd, target) < 0 {
                fail(None);
            }
        }
        step(1);
        if let Some((uid, gid)) = a.identity
            && (libc::syscall(SYS_SETGID, gid) != 0
                || (a.drop_groups
                    && libc::syscall(SYS_SETGROUPS, 0, std::ptr::null::<libc::gid_t>()) != 0)
                || libc::syscall(SYS_SETUID, uid) != 0)
        {
            fail(None);
        }
        step(2);
        if libc::chdir(a.cwd) != 0 || libc::setpgid(0, 0) != 0 {
            fail(None);
        }
        step(3);
        // "0" moves the writing process: the job joins its cgroup before
        // it can start anything.
        if a.cgroup_procs >= 0 {
            match libc::write(a.cgroup_procs, b"0".as_ptr().cast(), 1) {
                1 => {}
                -1 => fail(None),
                _ => fail(Some(libc::EIO)),
            }
        }
        step(4);
        for (resource, value) in a.limits {
            if let Some(value) = value {
                let limit = libc::rlimit64 {
                    rlim_cur: value,
                    rlim_max: value,
                };
                if libc::syscall(
                    libc::SYS_prlimit64,
                    0,
                    resource,
                    &limit,
                    std::ptr::null_mut::<libc::rlimit64>(),
                ) != 0
                {
                    fail(None);
                }
            }
        }
        step(5);
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        // Reached exec: from here the parent counts the job as started
        // unless exec says otherwise below.
        a.errno.store(0, Ordering::Release);
        libc::execve(a.program, a.argv, a.envp);
    }
    fail(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::wait::{WaitStatus, waitpid};
    use nix::unistd::Pid;

    fn exec(program: &str, args: &[&str], cwd: &Path) -> (JobExec, std::fs::File) {
        let (reader, writer) = std::io::pipe().unwrap();
        let err = writer.try_clone().unwrap();
        let exec = JobExec {
            program: program.into(),
            args: args.iter().map(Into::into).collect(),
            env: vec![
                ("A".into(), "first".into()),
                ("B".into(), "kept".into()),
                ("A".into(), "second".into()),
            ],
            cwd: cwd.to_owned(),
            stdin: std::fs::File::open("/dev/null").unwrap().into(),
            stdout: writer.into(),
            stderr: err.into(),
            identity: None,
            limits: Limits {
                open_files: Some(77),
                ..Limits::default()
            },
            cgroup_procs: None,
        };
        (exec, std::fs::File::from(OwnedFd::from(reader)))
    }

    #[test]
    fn a_spawned_job_gets_its_environment_directory_group_limits_and_default_signals() {
        let dir = tempfile::tempdir().unwrap();
        // The masks are read by a process the shell execs: a shell blocks
        // signals of its own around the forks of its commands.
        let script = "echo \"$A $B $(pwd)\"; ulimit -n; \
                      cut -d' ' -f5 /proc/$$/stat; echo $$; \
                      exec sh -c \"grep -E '^Sig(Blk|Ign)' /proc/self/status; exit 7\"";
        let (job, mut out) = exec("/bin/sh", &["-c", script], dir.path());
        let pid = spawn_job(job).unwrap();
        let status = waitpid(Pid::from_raw(pid), None).unwrap();
        assert_eq!(status, WaitStatus::Exited(Pid::from_raw(pid), 7));
        let mut text = String::new();
        std::io::Read::read_to_string(&mut out, &mut text).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let cwd = dir.path().canonicalize().unwrap();
        assert_eq!(lines[0], format!("second kept {}", cwd.display()), "{text}");
        assert_eq!(lines[1], "77", "the open files limit: {text}");
        assert_eq!(lines[2], lines[3], "leads its own process group: {text}");
        assert_eq!(lines[4], "SigBlk:\t0000000000000000", "{text}");
        // What the parent ignores stays ignored, as with std, but SIGPIPE
        // (std ignores it in Rust programs) is back to its default.
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let ignored = status
            .lines()
            .find_map(|l| l.strip_prefix("SigIgn:\t"))
            .map(|hex| u64::from_str_radix(hex, 16).unwrap())
            .unwrap();
        let sigpipe = 1u64 << (libc::SIGPIPE - 1);
        assert_ne!(ignored & sigpipe, 0, "the test itself ignores SIGPIPE");
        assert_eq!(
            lines[5],
            format!("SigIgn:\t{:016x}", ignored & !sigpipe),
            "{text}"
        );
    }

    #[test]
    fn a_job_switching_user_leaves_workerd_dumpable() {
        // SAFETY: getuid(2) cannot fail and touches no memory.
        if unsafe { libc::getuid() } != 0 {
            eprintln!("skipped: switching to another user needs root");
            return;
        }
        let (mut job, _) = exec("/bin/true", &[], Path::new("/"));
        job.identity = Some((65534, 65534));
        // SAFETY: reads a flag of this process.
        assert_eq!(unsafe { libc::prctl(libc::PR_GET_DUMPABLE) }, 1);
        let pid = spawn_job(job).unwrap();
        // The child's setuid cleared the flag on the memory it shared.
        // SAFETY: as above.
        assert_eq!(unsafe { libc::prctl(libc::PR_GET_DUMPABLE) }, 1);
        let status = waitpid(Pid::from_raw(pid), None).unwrap();
        assert_eq!(status, WaitStatus::Exited(Pid::from_raw(pid), 0));
    }

    #[test]
    fn a_spawn_that_cannot_exec_or_enter_its_directory_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let (job, _) = exec("/nonexistent/program", &[], dir.path());
        let error = spawn_job(job).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::NotFound, "{error}");
        let (job, _) = exec("/bin/sh", &["-c", "true"], &dir.path().join("gone"));
        let error = spawn_job(job).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::NotFound, "{error}");
    }
}
