//! The one place with `unsafe`: code that runs in a job's process between
//! fork and exec, where only async-signal-safe calls are allowed.
#![allow(unsafe_code)]

use std::os::fd::OwnedFd;

use jobcluster_plugins::Limits;
use nix::sys::resource::{Resource, setrlimit};

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
