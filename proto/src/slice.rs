//! The daemons' scheduling slice: both ask the kernel for its shortest
//! (0.1 ms, EEVDF's per-thread slices, Linux 6.12) before their runtime's
//! threads exist, so that every thread inherits it; workerd gives its jobs
//! the default back before their exec.
//!
//! Why: a daemon's thread that is woken (a start's answer, the exec of a
//! job made with `CLONE_VFORK`, a reply from the other daemon) is placed on
//! the CPU that woke it nearly always on the virtual machines measured,
//! even with the other vCPU idle, and a job's process usually runs there.
//! With equal slices the woken thread waits for the job's first burst: for
//! a `bash` script the interpreter's whole start, 1.9 ms at the median in
//! workerd (traced with `perf sched`), most of a start's latency. A slice
//! shorter than the job's lets the kernel preempt the job for it. Its cost,
//! more preemptions of a daemon's own long bursts (copying output), did not
//! show in the output benchmarks (docs/PERFORMANCE.md).
//!
//! The system calls have no safe wrapper in nix or rustix, hence this
//! module's `unsafe`.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering};

use nix::libc;

/// The slice asked for, ns: the kernel's shortest.
pub const SHORT_SLICE_NS: u64 = 100_000;

/// Set once this process's threads run with [`SHORT_SLICE_NS`].
static SHORTENED: AtomicBool = AtomicBool::new(false);

/// What [`shorten`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slice {
    /// Every thread started from here on runs with [`SHORT_SLICE_NS`].
    Shortened,
    /// The policy is not one with slices (real-time, deadline, sched_ext or
    /// SCHED_IDLE): kept.
    NotFair,
    /// Reset on fork is set (`CPUSchedulingResetOnFork=`): threads started
    /// later would not inherit a slice, so none is asked for.
    ResetOnFork,
    /// The kernel keeps one slice for all (Linux before 6.12).
    Unsupported,
}

/// Asks for the shortest slice for the calling thread and so for every
/// thread it starts later: call it before the runtime's threads exist.
/// Policy, nice value and priority stay as they are.
pub fn shorten() -> std::io::Result<Slice> {
    let attr = this_thread().ok_or_else(std::io::Error::last_os_error)?;
    let fair = matches!(
        i32::try_from(attr.sched_policy),
        Ok(libc::SCHED_OTHER | libc::SCHED_BATCH)
    );
    if !fair {
        return Ok(Slice::NotFair);
    }
    if attr.sched_flags & libc::SCHED_FLAG_RESET_ON_FORK as u64 != 0 {
        return Ok(Slice::ResetOnFork);
    }
    if !set_this_thread(attr, SHORT_SLICE_NS) {
        return Err(std::io::Error::last_os_error());
    }
    // Kernels before 6.12 accept the field and ignore it: they read back 0
    // (newer ones read back the slice in force, asked for or not).
    let now = this_thread().ok_or_else(std::io::Error::last_os_error)?;
    if now.sched_runtime != SHORT_SLICE_NS {
        return Ok(Slice::Unsupported);
    }
    SHORTENED.store(true, Ordering::Relaxed);
    Ok(Slice::Shortened)
}

/// Whether [`shorten`] gave this process the short slice.
pub fn shortened() -> bool {
    SHORTENED.load(Ordering::Relaxed)
}

/// Gives the calling thread the kernel's default slice back, keeping the
/// rest. Async-signal-safe (two system calls, nothing allocated): for a
/// child between clone and exec. False if the kernel refused.
pub fn restore_default() -> bool {
    this_thread().is_some_and(|attr| set_this_thread(attr, 0))
}

/// One line for the daemon's log on what [`shorten`] did.
pub fn log(outcome: &std::io::Result<Slice>) {
    match outcome {
        Ok(Slice::Shortened) => {
            tracing::info!(
                slice_us = SHORT_SLICE_NS / 1000,
                "short scheduling slice for every thread"
            );
        }
        Ok(Slice::NotFair) => tracing::info!("scheduling policy without slices: kept"),
        Ok(Slice::ResetOnFork) => {
            tracing::info!("scheduling reset on fork (CPUSchedulingResetOnFork=): slice kept");
        }
        Ok(Slice::Unsupported) => tracing::info!(
            "one scheduling slice for all on this kernel (Linux < 6.12): a woken thread may wait for a job's burst of CPU"
        ),
        Err(error) => tracing::warn!(
            %error,
            "cannot ask for a short scheduling slice; running with the default"
        ),
    }
}

/// The calling thread's scheduling attributes.
fn this_thread() -> Option<libc::sched_attr> {
    // SAFETY: all-zero is a valid `sched_attr` (plain integers).
    let mut attr: libc::sched_attr = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::sched_attr>() as libc::c_uint;
    // SAFETY: sched_getattr(2) writes at most `size` bytes into our local.
    let read = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            0,
            std::ptr::from_mut(&mut attr),
            size,
            0,
        )
    };
    (read == 0).then_some(attr)
}

/// Sets the calling thread's attributes to `attr` (as read) with
/// `runtime` as its slice (0: the default).
fn set_this_thread(mut attr: libc::sched_attr, runtime: u64) -> bool {
    attr.size = std::mem::size_of::<libc::sched_attr>() as u32;
    attr.sched_runtime = runtime;
    // The one flag a read attribute hands back that may be written as is.
    attr.sched_flags &= libc::SCHED_FLAG_RESET_ON_FORK as u64;
    // SAFETY: sched_setattr(2) reads our local and writes nothing of ours.
    unsafe { libc::syscall(libc::SYS_sched_setattr, 0, std::ptr::from_ref(&attr), 0) == 0 }
}
