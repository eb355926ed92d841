//! The one place with `unsafe`: code that runs in a job's process between
//! fork and exec, where only async-signal-safe calls are allowed.
#![allow(unsafe_code)]

use jobcluster_plugins::Limits;
use nix::sys::resource::{Resource, setrlimit};

/// Sets the plugin's resource limits on the job process just before it
/// execs the interpreter; its children inherit them.
pub(crate) fn set_limits(cmd: &mut tokio::process::Command, limits: Limits) {
    if limits == Limits::default() {
        return;
    }
    let cpu_seconds = limits
        .cpu_time
        .map(|d| d.as_secs() + u64::from(d.subsec_nanos() > 0));
    let wanted = [
        (Resource::RLIMIT_AS, limits.memory),
        (Resource::RLIMIT_CPU, cpu_seconds),
        (Resource::RLIMIT_NOFILE, limits.open_files),
        (Resource::RLIMIT_NPROC, limits.processes),
    ];
    // SAFETY: the closure runs in the forked child before exec. It only
    // calls setrlimit(2), which is async-signal-safe, on values computed
    // above; it allocates nothing and touches no lock.
    unsafe {
        cmd.pre_exec(move || {
            for (resource, value) in wanted {
                if let Some(value) = value {
                    setrlimit(resource, value, value).map_err(std::io::Error::from)?;
                }
            }
            Ok(())
        });
    }
}
