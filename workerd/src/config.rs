//! workerd's config file (SPEC §4) and its validation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use jobcluster_pki::{Identity, Role, Roots};
use jobcluster_plugins::{Plugin, PluginConfig};
use jobcluster_proto::config::{self, ConfigError};
use serde::Deserialize;

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub grpc_server: GrpcServer,
    #[serde(default)]
    pub scheduler: SchedulerSection,
    pub worker: WorkerSection,
    #[serde(default)]
    pub plugins: BTreeMap<String, PluginConfig>,
    #[serde(default)]
    pub retention: Retention,
    #[serde(default)]
    pub metrics: config::MetricsSection,
}

/// Limits on what is kept of finished jobs: their output (none by
/// default) and their records (30 days by default, like the scheduler's
/// `keep_finished`).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// Delete a finished job's output this long after it finished ("7d").
    #[serde(default, with = "humantime_serde")]
    pub max_age: Option<std::time::Duration>,
    /// Keep at most this much finished output in total (bytes, or "10GiB").
    #[serde(default, deserialize_with = "jobcluster_plugins::byte_size")]
    pub max_bytes: Option<u64>,
    /// Delete a finished job's whole record (and output) this long after
    /// it finished.
    #[serde(default = "default_max_record_age", with = "humantime_serde")]
    pub max_record_age: std::time::Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_age: None,
            max_bytes: None,
            max_record_age: default_max_record_age(),
        }
    }
}

fn default_max_record_age() -> std::time::Duration {
    std::time::Duration::from_secs(30 * 24 * 3600)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcServer {
    #[serde(default = "default_addr")]
    pub addr: String,
    /// What the scheduler dials; default: `addr`.
    pub advertise_addr: Option<String>,
    #[serde(default = "yes")]
    pub use_tls: bool,
    /// With `use_tls = false`: plaintext, no authentication. Development only.
    #[serde(default)]
    pub insecure: bool,
    pub crt_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
}

impl GrpcServer {
    fn tls_keys(&self) -> config::TlsKeys<'_> {
        config::TlsKeys {
            use_tls: self.use_tls,
            insecure: self.insecure,
            crt_file: self.crt_file.as_deref(),
            key_file: self.key_file.as_deref(),
            ca_file: self.ca_file.as_deref(),
        }
    }
}

impl Default for GrpcServer {
    fn default() -> Self {
        GrpcServer {
            addr: default_addr(),
            advertise_addr: None,
            use_tls: true,
            insecure: false,
            crt_file: None,
            key_file: None,
            ca_file: None,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerSection {
    /// The scheduler (one); not with `addrs`.
    pub addr: Option<String>,
    /// Several schedulers sharing one store: the worker heartbeats one of
    /// them and moves to the next when it fails.
    pub addrs: Option<Vec<String>>,
}

/// Schedulers a worker may be given at most.
pub const MAX_SCHEDULERS: usize = 16;

impl SchedulerSection {
    fn addrs(&self, path: &Path) -> Result<Vec<String>, ConfigError> {
        let err = |key: &str, msg: String| ConfigError::new(path, key, msg);
        match (&self.addr, &self.addrs) {
            (Some(_), Some(_)) => Err(err(
                "scheduler.addrs",
                "set one of scheduler.addr and scheduler.addrs, not both".into(),
            )),
            (Some(addr), None) => Ok(vec![addr.clone()]),
            (None, None) => Ok(vec![default_scheduler_addr()]),
            (None, Some(addrs)) if addrs.is_empty() || addrs.len() > MAX_SCHEDULERS => Err(err(
                "scheduler.addrs",
                format!("must list 1 to {MAX_SCHEDULERS} schedulers (host:port)"),
            )),
            (None, Some(addrs)) => Ok(addrs.clone()),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSection {
    pub name: String,
    pub scripts_dir: PathBuf,
    pub state_dir: PathBuf,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Most jobs running at once; past it a start is refused (429 worker_busy).
    /// Absent: the host's CPU count; `0`: unlimited.
    pub max_jobs: Option<usize>,
    /// When workerd runs as root, jobs run as this user unless their plugin
    /// names another; default `nobody`. Root only when named.
    pub run_as_user: Option<String>,
    /// ... and this group (default: the user's primary group).
    pub run_as_group: Option<String>,
    /// Threads of workerd's async runtime; absent: [`DEFAULT_RUNTIME_THREADS`];
    /// `0`: one per CPU.
    pub runtime_threads: Option<usize>,
}

/// workerd's async runtime threads unless `[worker] runtime_threads` says
/// otherwise. One: what they run is mostly serial anyway (one HTTP/2
/// connection per scheduler carries every stream, jobs are processes of
/// their own, file work and spawns go to the blocking pool), and a second
/// thread mostly hands that work back and forth between CPUs and takes one
/// from the jobs: on two CPUs it cost 10–12 % more CPU per output replayed
/// and made starts no faster (docs/PERFORMANCE.md, "The worker on one
/// runtime thread").
pub const DEFAULT_RUNTIME_THREADS: usize = 1;

/// The most `[worker] runtime_threads` may ask for.
pub const MAX_RUNTIME_THREADS: usize = 1024;

/// Whom jobs run as when workerd is root and the config names nobody else.
pub const DEFAULT_RUN_AS_USER: &str = "nobody";

fn default_addr() -> String {
    "127.0.0.1:30000".to_owned()
}
fn default_scheduler_addr() -> String {
    "127.0.0.1:50000".to_owned()
}
fn yes() -> bool {
    true
}

/// A validated config: every path resolved, every plugin built, the TLS
/// material loaded.
#[derive(Debug)]
pub struct Config {
    pub file: PathBuf,
    pub listen_addr: String,
    pub advertise_addr: Option<String>,
    /// `[scheduler] addr`, or `addrs`: tried in turn.
    pub scheduler_addrs: Vec<String>,
    pub name: String,
    /// Canonical: symlinks resolved, so confinement compares real paths.
    pub scripts_dir: PathBuf,
    pub state_dir: PathBuf,
    pub labels: BTreeMap<String, String>,
    pub plugins: BTreeMap<String, Plugin>,
    /// Uid and gid each plugin's jobs run as, when not the worker's own
    /// (always, when workerd runs as root).
    pub run_as: BTreeMap<String, RunAs>,
    pub max_jobs: Option<usize>,
    /// Threads of the async runtime; `None`: one per CPU.
    pub runtime_threads: Option<usize>,
    pub retention: Retention,
    /// `[metrics] addr`.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// `None` in insecure (plaintext) mode.
    pub tls: Option<TlsMaterial>,
    pub tls_files: Option<TlsFiles>,
}

/// A user and group jobs run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
    /// The user's name and home, for the job's USER, LOGNAME and HOME.
    pub user: String,
    pub home: PathBuf,
}

/// Looks up `user` (and `group`, else the user's primary group).
fn resolve_run_as(user: &str, group: Option<&str>) -> Result<RunAs, String> {
    let user_entry = nix::unistd::User::from_name(user)
        .map_err(|e| format!("looking up user {user:?}: {e}"))?
        .ok_or_else(|| format!("no such user {user:?}"))?;
    let gid = match group {
        Some(group) => {
            nix::unistd::Group::from_name(group)
                .map_err(|e| format!("looking up group {group:?}: {e}"))?
                .ok_or_else(|| format!("no such group {group:?}"))?
                .gid
        }
        None => user_entry.gid,
    };
    Ok(RunAs {
        uid: user_entry.uid.as_raw(),
        gid: gid.as_raw(),
        user: user_entry.name,
        home: user_entry.dir,
    })
}

/// Whom a plugin's jobs run as, or `None` for workerd's own user.
fn job_user(
    name: &str,
    settings: &jobcluster_plugins::RunnerSettings,
    w: &WorkerSection,
    own: (u32, u32),
) -> Result<Option<RunAs>, (String, String)> {
    let root = own.0 == 0;
    let (user, group, key) = match (&settings.user, &w.run_as_user) {
        (Some(user), _) => (
            user.as_str(),
            settings.group.as_deref(),
            format!("plugins.{name}.user"),
        ),
        (None, Some(user)) => (
            user.as_str(),
            w.run_as_group.as_deref(),
            "worker.run_as_user".to_owned(),
        ),
        // Root's jobs could do anything to the machine and to the worker:
        // they run as root only where a config says so.
        (None, None) if root => (DEFAULT_RUN_AS_USER, None, "worker.run_as_user".to_owned()),
        // Not root: jobs can only run as workerd's own user.
        (None, None) => return Ok(None),
    };
    let resolved = resolve_run_as(user, group).map_err(|m| {
        let default = if settings.user.is_none() && w.run_as_user.is_none() {
            format!(
                " (jobs run as {DEFAULT_RUN_AS_USER} when workerd is root and no user is named)"
            )
        } else {
            String::new()
        };
        (key.clone(), format!("{m}{default}"))
    })?;
    if !root && resolved.uid != own.0 {
        return Err((
            key,
            "workerd is not root, so it cannot run jobs as another user".into(),
        ));
    }
    Ok(Some(resolved))
}

/// Checks that each plugin's job user can read `scripts_dir` (and pass
/// through every parent), so that a worker that starts can run its jobs.
/// Errors name the key that chose the user.
fn check_scripts_access(
    scripts_dir: &Path,
    plugins: &BTreeMap<String, Plugin>,
    run_as: &BTreeMap<String, RunAs>,
    no_worker_user: bool,
) -> Result<(), (String, String)> {
    use crate::sys::{Access, access_as};
    let own = (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    // Each check runs once per user, however many plugins share it.
    let mut seen = std::collections::HashSet::new();
    for (name, plugin) in plugins {
        let job = run_as.get(name);
        let identity = job.map(|r| (r.uid, r.gid)).filter(|ids| *ids != own);
        let (who, key, fix) = match (job, &plugin.user) {
            (None, _) => (
                "workerd's own user".to_owned(),
                "worker.scripts_dir".to_owned(),
                "give workerd's user access to it".to_owned(),
            ),
            (Some(r), Some(_)) => (
                format!("user {}", r.user),
                format!("plugins.{name}.user"),
                format!("give {} access to it, or name another user", r.user),
            ),
            (Some(r), None) => (
                if no_worker_user {
                    format!("user {} (the default when workerd is root)", r.user)
                } else {
                    format!("user {}", r.user)
                },
                "worker.run_as_user".to_owned(),
                format!("give {} access to it, or name another user", r.user),
            ),
        };
        let fail = |m: String| {
            (
                key.clone(),
                format!("plugin {name}: jobs run as {who}, who {m}; {fix}"),
            )
        };
        if seen.insert(identity)
            && let Err(error) = access_as(identity, scripts_dir, Access::ReadDir)
        {
            // Name the directory in the way, the first from the root.
            let parents: Vec<&Path> = scripts_dir.ancestors().skip(1).collect();
            let blocked = parents
                .into_iter()
                .rev()
                .find(|dir| access_as(identity, dir, Access::Search).is_err());
            let why = match blocked {
                Some(dir) => format!("may not pass through {} ({})", dir.display(), describe(dir)),
                None => format!("{error} ({})", describe(scripts_dir)),
            };
            return Err(fail(format!(
                "cannot read scripts_dir {}: {why}",
                scripts_dir.display()
            )));
        }
    }
    Ok(())
}

/// "mode 0700, owner root:root", for messages about permissions.
fn describe(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(path) {
        Ok(m) => {
            let name = |uid: u32| {
                nix::unistd::User::from_uid(uid.into())
                    .ok()
                    .flatten()
                    .map_or_else(|| uid.to_string(), |u| u.name)
            };
            let group = nix::unistd::Group::from_gid(m.gid().into())
                .ok()
                .flatten()
                .map_or_else(|| m.gid().to_string(), |g| g.name);
            format!(
                "mode {:04o}, owner {}:{group}",
                m.mode() & 0o7777,
                name(m.uid())
            )
        }
        Err(e) => e.to_string(),
    }
}

/// A job cannot raise a hard limit (its rlimits are set after it left
/// root), so a limit above workerd's own would fail every job: refused
/// here instead. Only open files: processes may be a cgroup's `pids.max`.
fn check_hard_limits(
    name: &str,
    plugin: &Plugin,
    table: &PluginConfig,
) -> Result<(), (String, String)> {
    use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit};
    let Some(wanted) = plugin.limits.open_files else {
        return Ok(());
    };
    let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return Ok(());
    };
    if hard == RLIM_INFINITY || wanted <= hard {
        return Ok(());
    }
    let default = if table.settings().limits.open_files.is_none() {
        " (the default)"
    } else {
        ""
    };
    Err((
        format!("plugins.{name}.limits.open_files"),
        format!(
            "{wanted}{default} is above workerd's own hard limit of {hard} open files, which a job cannot raise; set a lower value (0 for workerd's own) or raise workerd's limit (LimitNOFILE=)"
        ),
    ))
}

/// What the worker presents and trusts.
#[derive(Debug, Clone)]
pub struct TlsMaterial {
    pub identity: Identity,
    pub roots: Roots,
}

/// Where the TLS material comes from, for reloading it.
pub use jobcluster_proto::config::TlsPaths as TlsFiles;

impl TlsMaterial {
    /// Loads the files and checks the certificate is a worker's, for `name`.
    pub fn load(file: &Path, files: &TlsFiles, name: &str) -> Result<TlsMaterial, ConfigError> {
        let err = |key: &str, msg: String| ConfigError::new(file, key, msg);
        let roots =
            Roots::load(&files.ca).map_err(|e| err("grpc_server.ca_file", e.to_string()))?;
        let identity = Identity::load(&files.crt, &files.key)
            .map_err(|e| err("grpc_server.crt_file", e.to_string()))?;
        let peer = identity
            .peer_identity()
            .map_err(|e| err("grpc_server.crt_file", e.to_string()))?;
        if peer.role != Role::Worker {
            return Err(err(
                "grpc_server.crt_file",
                format!(
                    "certificate is for role {}, a worker needs role worker",
                    peer.role
                ),
            ));
        }
        if peer.name != name {
            return Err(err(
                "worker.name",
                format!(
                    "{name:?} differs from the certificate's name {:?}; issue one with `clusterctl pki issue DIR --role worker {name}`",
                    peer.name
                ),
            ));
        }
        Ok(TlsMaterial { identity, roots })
    }
}

impl Config {
    /// Reads and validates `path`. Relative paths in the file are relative
    /// to the file's own directory, so a config works from any working
    /// directory (systemd units included).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file: ConfigFile = config::load(path)?;
        Self::validate(path, file)
    }

    fn validate(path: &Path, file: ConfigFile) -> Result<Config, ConfigError> {
        let err = |key: &str, msg: String| ConfigError::new(path, key, msg);
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &Path| base.join(p);

        let g = &file.grpc_server;
        let tls_paths = config::tls_paths(path, g.tls_keys())?;
        let w = &file.worker;
        if !jobcluster_pki::valid_name(&w.name) {
            return Err(err(
                "worker.name",
                format!(
                    "{:?} is not a valid name: use letters, digits, '.', '-' and '_'",
                    w.name
                ),
            ));
        }
        let (tls, tls_files) = match tls_paths {
            Some(files) => (Some(TlsMaterial::load(path, &files, &w.name)?), Some(files)),
            None => (None, None),
        };
        let scripts_dir = resolve(&w.scripts_dir);
        let scripts_dir = scripts_dir.canonicalize().map_err(|e| {
            err(
                "worker.scripts_dir",
                format!("{}: {e}", scripts_dir.display()),
            )
        })?;
        if !scripts_dir.is_dir() {
            return Err(err(
                "worker.scripts_dir",
                format!("{} is not a directory", scripts_dir.display()),
            ));
        }
        if file.plugins.is_empty() {
            return Err(err(
                "plugins",
                "no [plugins.NAME] table: the worker would offer nothing to run".into(),
            ));
        }
        if w.run_as_group.is_some() && w.run_as_user.is_none() {
            return Err(err(
                "worker.run_as_group",
                "needs worker.run_as_user too".into(),
            ));
        }
        let own = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        let mut run_as = BTreeMap::new();
        let mut plugins = BTreeMap::new();
        for (name, table) in &file.plugins {
            let job = job_user(name, table.settings(), w, own).map_err(|(key, m)| err(&key, m))?;
            // The interpreter is one the job's user can run (a name is
            // looked up in PATH as that user would need it).
            let identity = job
                .as_ref()
                .map(|r| (r.uid, r.gid))
                .filter(|ids| *ids != own);
            let who = job
                .as_ref()
                .map_or_else(|| "workerd's user".to_owned(), |r| r.user.clone());
            let can_run = |program: &Path| {
                crate::sys::access_as(identity, program, crate::sys::Access::Execute)
                    .map_err(|e| format!("{who} cannot run it: {e}"))
            };
            let built = table.build_with(name, &can_run).map_err(|e| {
                let key = if e.key.is_empty() {
                    format!("plugins.{name}")
                } else {
                    format!("plugins.{name}.{}", e.key)
                };
                err(&key, e.message)
            })?;
            check_hard_limits(name, &built, table).map_err(|(key, m)| err(&key, m))?;
            plugins.insert(name.clone(), built);
            if let Some(job) = job {
                run_as.insert(name.clone(), job);
            }
        }
        check_scripts_access(&scripts_dir, &plugins, &run_as, w.run_as_user.is_none())
            .map_err(|(key, m)| err(&key, m))?;
        // One job per CPU unless told otherwise: the scheduler queues the
        // rest instead of overloading the host.
        let max_jobs = match w.max_jobs {
            Some(0) => None,
            Some(n) => Some(n),
            None => Some(std::thread::available_parallelism().map_or(1, usize::from)),
        };
        let runtime_threads = match w.runtime_threads {
            None => Some(DEFAULT_RUNTIME_THREADS),
            Some(0) => None,
            Some(n) if n <= MAX_RUNTIME_THREADS => Some(n),
            Some(n) => {
                return Err(err(
                    "worker.runtime_threads",
                    format!("{n} is too many: at most {MAX_RUNTIME_THREADS} (0: one per CPU)"),
                ));
            }
        };
        let metrics_addr = file.metrics.socket_addr(path)?;
        Ok(Config {
            metrics_addr,
            run_as,
            max_jobs,
            runtime_threads,
            file: path.to_owned(),
            listen_addr: g.addr.clone(),
            advertise_addr: g.advertise_addr.clone(),
            scheduler_addrs: file.scheduler.addrs(path)?,
            name: w.name.clone(),
            scripts_dir,
            state_dir: resolve(&w.state_dir),
            labels: w.labels.clone(),
            plugins,
            retention: file.retention,
            tls,
            tls_files,
        })
    }
}

#[cfg(test)]
mod tests {
    use jobcluster_plugins::parse_bytes;

    #[test]
    fn sizes_take_units() {
        assert_eq!(parse_bytes("512"), Ok(512));
        assert_eq!(parse_bytes("10GiB"), Ok(10 << 30));
        assert_eq!(parse_bytes("3 MB"), Ok(3_000_000));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("5 parsecs").is_err());
        assert!(parse_bytes("99999999999TiB").is_err());
    }
}
