//! Job limits through a delegated cgroup v2, where the worker has one.
//!
//! A worker can use cgroups when its own cgroup (from `/proc/self/cgroup`,
//! under the cgroup2 mount) is writable and offers the `memory`, `cpu` and
//! `pids` controllers, as under systemd with `Delegate=yes`. The worker then
//! moves itself into a `workerd` leaf (cgroup v2 allows controllers only on
//! groups without processes of their own), enables the controllers for its
//! children, and gives each job a `job-<id>` group with `memory.max`,
//! `cpu.max` and `pids.max`. Without such a cgroup, the same limits are set
//! with setrlimit (see `sys`), and the API says which is in force.

use std::path::{Path, PathBuf};

use jobcluster_plugins::Limits;
use uuid::Uuid;

const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];
/// The period `cpu.max` quotas are expressed in, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;

/// The worker's delegated cgroup, set up for jobs.
#[derive(Debug, Clone)]
pub(crate) struct Cgroups {
    root: PathBuf,
}

/// The cgroup2 directory of this process, from the text of
/// `/proc/self/mountinfo` and `/proc/self/cgroup`.
pub(crate) fn own_cgroup_dir(mountinfo: &str, cgroup: &str) -> Option<PathBuf> {
    let mount = mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
    })?;
    let relative = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(mount.join(relative.trim_start_matches('/')))
}

impl Cgroups {
    /// Sets up job cgroups if this worker has a usable delegated cgroup.
    /// Says why not otherwise (logged once at start).
    pub(crate) fn setup() -> Result<Cgroups, String> {
        let read = |p: &str| std::fs::read_to_string(p).map_err(|e| format!("{p}: {e}"));
        let dir = own_cgroup_dir(&read("/proc/self/mountinfo")?, &read("/proc/self/cgroup")?)
            .ok_or("no cgroup v2 hierarchy for this process")?;
        let available = std::fs::read_to_string(dir.join("cgroup.controllers"))
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        let missing: Vec<_> = CONTROLLERS
            .iter()
            .filter(|c| !available.split_whitespace().any(|a| a == **c))
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "{} does not offer the {missing:?} controller(s) (delegate them, e.g. systemd Delegate=yes)",
                dir.display()
            ));
        }
        let leaf = dir.join("workerd");
        let write = |path: &Path, text: &str| {
            std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
        };
        std::fs::create_dir_all(&leaf).map_err(|e| format!("{}: {e}", leaf.display()))?;
        write(&leaf.join("cgroup.procs"), &std::process::id().to_string())?;
        let enable: Vec<String> = CONTROLLERS.iter().map(|c| format!("+{c}")).collect();
        write(&dir.join("cgroup.subtree_control"), &enable.join(" "))?;
        Ok(Cgroups { root: dir })
    }

    /// The directory of the job's group (which may not exist).
    pub(crate) fn group(&self, job: Uuid) -> PathBuf {
        self.root.join(format!("job-{job}"))
    }

    /// Creates the job's group with its limits; call before the job runs.
    pub(crate) fn create(&self, job: Uuid, limits: &Limits) -> std::io::Result<PathBuf> {
        let dir = self.group(job);
        std::fs::create_dir_all(&dir)?;
        if let Some(bytes) = limits.memory {
            std::fs::write(dir.join("memory.max"), bytes.to_string())?;
        }
        if let Some(cpus) = limits.cpus {
            let quota = ((cpus * CPU_PERIOD_US as f64) as u64).max(1000);
            std::fs::write(dir.join("cpu.max"), format!("{quota} {CPU_PERIOD_US}"))?;
        }
        if let Some(n) = limits.processes {
            std::fs::write(dir.join("pids.max"), n.to_string())?;
        }
        Ok(dir)
    }

    /// The group's `cgroup.procs`, opened for the job's process to write
    /// itself into before it execs (see `sys::set_limits`).
    pub(crate) fn procs_file(group: &Path) -> std::io::Result<std::os::fd::OwnedFd> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(group.join("cgroup.procs"))?;
        Ok(file.into())
    }

    /// Removes a job's group once its processes are gone.
    pub(crate) fn remove(group: &Path) {
        if let Err(error) = std::fs::remove_dir(group) {
            tracing::debug!(group = %group.display(), %error, "could not remove a job cgroup");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_own_cgroup_under_the_cgroup2_mount() {
        let mountinfo = "22 1 0:21 / /proc rw - proc proc rw\n\
                         41 31 0:38 / /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw\n";
        let cgroup = "0::/system.slice/workerd.service\n";
        assert_eq!(
            own_cgroup_dir(mountinfo, cgroup),
            Some(PathBuf::from("/sys/fs/cgroup/system.slice/workerd.service"))
        );
        // A v1-only hierarchy has no "0::" line.
        assert_eq!(own_cgroup_dir(mountinfo, "4:memory:/x\n"), None);
        assert_eq!(
            own_cgroup_dir("22 1 0:21 / /proc rw - proc proc rw\n", cgroup),
            None
        );
    }
}
