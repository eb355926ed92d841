//! Runner plugins: how a script becomes a command line.
//!
//! Owns the `[plugins.NAME]` config tables of workerd, their validation, and
//! the [`Runner`] trait that turns a script path and arguments into a
//! [`CommandLine`]. The set of runners is closed: [`PluginConfig`] has one arm
//! per runner and adding one is one file and one arm.
//!
//! This crate never spawns a process and knows nothing about gRPC, HTTP or
//! job state: workerd does all of that with the [`CommandLine`] it gets here.

#![forbid(unsafe_code)]

mod bash;
mod env;
mod interpreter;
mod python;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use env::{AllowEnv, EnvRefused};
pub use interpreter::InterpreterRunner;

/// How long a stopped job gets between SIGTERM and SIGKILL, unless its
/// plugin says otherwise.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);
/// Output kept per job unless the plugin says otherwise (`0`: no limit):
/// one job must not fill the worker's disk by default.
pub const DEFAULT_MAX_OUTPUT_BYTES: u64 = 1 << 30;
/// Processes per job unless the plugin says otherwise (`0`: no limit): a
/// fork bomb stops here rather than at the machine's limit.
pub const DEFAULT_PROCESSES: u64 = 512;
/// Open files per process unless the plugin says otherwise (`0`: what
/// workerd itself has).
pub const DEFAULT_OPEN_FILES: u64 = 1024;

/// One `[plugins.NAME]` table. The `runner` key picks the arm.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "runner", rename_all = "lowercase")]
pub enum PluginConfig {
    /// Shell scripts through bash.
    Bash(RunnerSettings),
    /// Python scripts, with output unbuffered so it streams live.
    Python(RunnerSettings),
    /// Any interpreter named by `interpreter` (ruby, node, ...).
    Interpreter(RunnerSettings),
}

/// Settings every runner understands.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunnerSettings {
    /// Program that runs the script: a path, or a name looked up in `PATH`.
    pub interpreter: Option<String>,
    /// Arguments put before the script path.
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment variables set for every job of this plugin.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Request `env` variables this plugin's jobs may receive: names, or
    /// `PREFIX_*` patterns. Default: none.
    #[serde(default)]
    pub allow_env: Vec<String>,
    /// File extensions (without the dot) this plugin is chosen for when a
    /// job names no plugin.
    pub extensions: Option<Vec<String>>,
    /// Time between SIGTERM and SIGKILL when a job is stopped ("10s", "500ms").
    #[serde(default, with = "humantime_serde")]
    pub stop_grace: Option<Duration>,
    /// A job running longer is stopped and recorded failed ("30m").
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Output kept per job (bytes, or "100MiB"; default 1 GiB, 0: no
    /// limit); past it the job is stopped and recorded failed, and what it
    /// wrote up to the limit is kept.
    #[serde(default, deserialize_with = "byte_size")]
    pub max_output_bytes: Option<u64>,
    /// Run this plugin's jobs as this user (when workerd runs as root;
    /// default `worker.run_as_user`). Root only when named.
    pub user: Option<String>,
    /// ... and this group (default: the user's primary group).
    pub group: Option<String>,
    /// Resource limits set on each job (cgroup or setrlimit).
    #[serde(default)]
    pub limits: Limits,
}

/// Per-process resource limits (setrlimit), inherited by a job's children.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Memory, bytes or "2GiB": `memory.max` of the job's cgroup where the
    /// worker has a delegated cgroup v2, else the address space (RLIMIT_AS).
    #[serde(default, deserialize_with = "byte_size")]
    pub memory: Option<u64>,
    /// CPU time (RLIMIT_CPU), e.g. "10m"; rounded up to whole seconds.
    #[serde(default, with = "humantime_serde")]
    pub cpu_time: Option<Duration>,
    /// Open file descriptors (RLIMIT_NOFILE). Default 1024; 0: none set.
    pub open_files: Option<u64>,
    /// Processes: `pids.max` of the job's cgroup where the worker has a
    /// delegated cgroup v2, else RLIMIT_NPROC (which counts all the user's
    /// processes). Default 512; 0: none set.
    pub processes: Option<u64>,
    /// CPUs the job may use (`cpu.max`, e.g. 0.5); only with a delegated
    /// cgroup v2.
    pub cpus: Option<f64>,
}

/// A byte count: an integer, or a string with a unit (B, KB, MB, GB, TB,
/// KiB, MiB, GiB, TiB). For `#[serde(deserialize_with)]` on `Option<u64>`.
pub fn byte_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Text(String),
    }
    match Option::<Raw>::deserialize(d)? {
        None => Ok(None),
        Some(Raw::Int(n)) => Ok(Some(n)),
        Some(Raw::Text(text)) => parse_bytes(&text)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

/// Parses "512", "10GiB", "3 MB".
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size: expected e.g. 500MiB or 10GB"))?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        other => {
            return Err(format!(
                "unknown size unit {other:?}: use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB"
            ));
        }
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// A plugin's config was rejected. `key` is relative to the plugin's table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct PluginError {
    pub key: String,
    pub message: String,
}

impl PluginError {
    fn new(key: &str, message: impl Into<String>) -> Self {
        PluginError {
            key: key.to_owned(),
            message: message.into(),
        }
    }
}

/// What workerd executes for a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandLine {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// Set on top of the job's base environment.
    pub env: Vec<(String, String)>,
}

/// Whether the user a plugin's jobs run as may run a program; an error
/// says why not. Interpreters are looked up with it, so a name in `PATH`
/// finds one the jobs can run.
pub type CanRun<'a> = &'a dyn Fn(&Path) -> Result<(), String>;

/// Turns a script and its arguments into a command line.
pub trait Runner: fmt::Debug + Send + Sync {
    fn command_line(&self, script: &Path, args: &[String]) -> CommandLine;
}

/// A validated plugin, ready to run jobs.
#[derive(Debug)]
pub struct Plugin {
    pub name: String,
    pub extensions: Vec<String>,
    pub stop_grace: Duration,
    pub timeout: Option<Duration>,
    /// `None`: no limit (set with 0).
    pub max_output_bytes: Option<u64>,
    pub user: Option<String>,
    pub group: Option<String>,
    /// With the defaults filled in; `None` where no limit is set.
    pub limits: Limits,
    pub allow_env: AllowEnv,
    pub runner: Box<dyn Runner>,
}

impl PluginConfig {
    /// The table's settings, whichever the runner.
    pub fn settings(&self) -> &RunnerSettings {
        match self {
            PluginConfig::Bash(s) | PluginConfig::Python(s) | PluginConfig::Interpreter(s) => s,
        }
    }

    /// Validates the table and builds the plugin. Fails if the interpreter
    /// cannot be found or a value is out of range.
    pub fn build(&self, name: &str) -> Result<Plugin, PluginError> {
        self.build_with(name, &|_| Ok(()))
    }

    /// [`build`](Self::build), with the interpreter one that `can_run`
    /// accepts.
    pub fn build_with(&self, name: &str, can_run: CanRun<'_>) -> Result<Plugin, PluginError> {
        if !valid_plugin_name(name) {
            return Err(PluginError::new(
                "",
                "plugin names use lowercase letters, digits, '-' and '_'",
            ));
        }
        let (settings, runner, default_extensions): (_, Box<dyn Runner>, &[&str]) = match self {
            PluginConfig::Bash(s) => (s, Box::new(bash::build(s, can_run)?), bash::EXTENSIONS),
            PluginConfig::Python(s) => {
                (s, Box::new(python::build(s, can_run)?), python::EXTENSIONS)
            }
            PluginConfig::Interpreter(s) => (s, Box::new(interpreter::build(s, can_run)?), &[]),
        };
        for key in settings.env.keys() {
            if key.is_empty() || key.contains(['=', '\0']) {
                return Err(PluginError::new(
                    "env",
                    format!("invalid variable name {key:?}"),
                ));
            }
        }
        let allow_env =
            AllowEnv::parse(&settings.allow_env).map_err(|m| PluginError::new("allow_env", m))?;
        let extensions = match &settings.extensions {
            Some(exts) => exts
                .iter()
                .map(|e| {
                    let e = e.trim_start_matches('.');
                    if e.is_empty() || e.contains(['/', '\0']) {
                        Err(PluginError::new(
                            "extensions",
                            format!("invalid extension {e:?}"),
                        ))
                    } else {
                        Ok(e.to_owned())
                    }
                })
                .collect::<Result<_, _>>()?,
            None => default_extensions.iter().map(|e| (*e).to_owned()).collect(),
        };
        let stop_grace = settings.stop_grace.unwrap_or(DEFAULT_STOP_GRACE);
        if stop_grace > Duration::from_secs(3600) {
            return Err(PluginError::new("stop_grace", "must be at most 1h"));
        }
        if settings.timeout.is_some_and(|t| t.is_zero()) {
            return Err(PluginError::new("timeout", "must be more than 0"));
        }
        if settings
            .limits
            .cpus
            .is_some_and(|c| !(c > 0.0 && c.is_finite()))
        {
            return Err(PluginError::new(
                "limits.cpus",
                "must be a positive number of CPUs",
            ));
        }
        if settings.group.is_some() && settings.user.is_none() {
            return Err(PluginError::new("group", "needs `user` too"));
        }
        Ok(Plugin {
            name: name.to_owned(),
            extensions,
            stop_grace,
            timeout: settings.timeout,
            max_output_bytes: or_default(settings.max_output_bytes, DEFAULT_MAX_OUTPUT_BYTES),
            user: settings.user.clone(),
            group: settings.group.clone(),
            limits: Limits {
                processes: or_default(settings.limits.processes, DEFAULT_PROCESSES),
                open_files: or_default(settings.limits.open_files, DEFAULT_OPEN_FILES),
                ..settings.limits
            },
            allow_env,
            runner,
        })
    }
}

/// A bound with a default, where 0 says "no limit" explicitly.
fn or_default(value: Option<u64>, default: u64) -> Option<u64> {
    match value {
        None => Some(default),
        Some(0) => None,
        Some(n) => Some(n),
    }
}

fn valid_plugin_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_'))
}

/// Finds `program`: a path is checked as it is, a bare name is looked up in
/// `PATH`, skipping what `can_run` refuses (a `PATH` entry under a private
/// home that the job user cannot reach, say). The result must be an
/// executable file.
pub fn resolve_program(program: &str, can_run: CanRun<'_>) -> Result<PathBuf, String> {
    if program.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if program.contains('/') {
        let path = PathBuf::from(program);
        if !is_executable(&path) {
            return Err(format!("{program} is not an executable file"));
        }
        return can_run(&path)
            .map(|()| path)
            .map_err(|why| format!("{program}: {why}"));
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let mut refused = None;
    for candidate in std::env::split_paths(&path_var).map(|dir| dir.join(program)) {
        if !is_executable(&candidate) {
            continue;
        }
        match can_run(&candidate) {
            Ok(()) => return Ok(candidate),
            Err(why) => {
                refused.get_or_insert((candidate, why));
            }
        }
    }
    Err(match refused {
        Some((first, why)) => format!(
            "no {program} in PATH that the jobs' user can run ({}: {why}); name one by its path",
            first.display()
        ),
        None => format!("{program} not found in PATH"),
    })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(table: &str) -> Result<PluginConfig, toml::de::Error> {
        toml::from_str(table)
    }

    #[test]
    fn python_runs_unbuffered() {
        let plugin = parse("runner = \"python\"")
            .unwrap()
            .build("python")
            .unwrap();
        let line = plugin
            .runner
            .command_line(Path::new("/s/count.py"), &["3".into()]);
        assert_eq!(line.args[..2], ["-E", "-u"], "{line:?}");
        assert_eq!(line.args.last().unwrap(), "3");
        assert!(line.env.contains(&("PYTHONUNBUFFERED".into(), "1".into())));
        assert_eq!(plugin.extensions, vec!["py"]);
    }

    #[test]
    fn interpreter_needs_an_interpreter() {
        let err = parse("runner = \"interpreter\"")
            .unwrap()
            .build("ruby")
            .unwrap_err();
        assert_eq!(err.key, "interpreter");
        let err = parse("runner = \"interpreter\"\ninterpreter = \"/nonexistent/ruby\"")
            .unwrap()
            .build("ruby")
            .unwrap_err();
        assert_eq!(err.key, "interpreter");
        assert!(err.message.contains("/nonexistent/ruby"), "{err}");
    }

    #[test]
    fn unknown_runner_and_unknown_keys_are_refused() {
        let err = parse("runner = \"cobol\"").unwrap_err().to_string();
        assert!(err.contains("cobol"), "{err}");
        let err = parse("runner = \"bash\"\ninterpeter = \"/bin/sh\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("interpeter"), "{err}");
    }

    #[test]
    fn bash_passes_args_after_the_script() {
        let plugin = parse("runner = \"bash\"\nargs = [\"-e\"]\nstop_grace = \"2s\"")
            .unwrap()
            .build("bash")
            .unwrap();
        let line = plugin
            .runner
            .command_line(Path::new("/s/a.sh"), &["x".into()]);
        assert_eq!(
            line.args,
            vec![
                OsString::from("--noprofile"),
                "--norc".into(),
                "-e".into(),
                "/s/a.sh".into(),
                "x".into()
            ]
        );
        assert_eq!(plugin.stop_grace, Duration::from_secs(2));
    }

    #[test]
    fn limits_have_defaults_and_zero_means_none() {
        let plugin = parse("runner = \"bash\"").unwrap().build("bash").unwrap();
        assert_eq!(plugin.max_output_bytes, Some(DEFAULT_MAX_OUTPUT_BYTES));
        assert_eq!(plugin.limits.processes, Some(DEFAULT_PROCESSES));
        assert_eq!(plugin.limits.open_files, Some(DEFAULT_OPEN_FILES));
        assert!(plugin.allow_env.is_empty());
        let plugin = parse(
            "runner = \"bash\"\nmax_output_bytes = 0\nlimits = { processes = 0, open_files = 0 }",
        )
        .unwrap()
        .build("bash")
        .unwrap();
        assert_eq!(plugin.max_output_bytes, None);
        assert_eq!(plugin.limits, Limits::default());
        let plugin =
            parse("runner = \"bash\"\nmax_output_bytes = \"5MiB\"\nlimits = { processes = 9 }")
                .unwrap()
                .build("bash")
                .unwrap();
        assert_eq!(plugin.max_output_bytes, Some(5 << 20));
        assert_eq!(plugin.limits.processes, Some(9));
    }

    #[test]
    fn allow_env_is_checked_at_load() {
        let plugin = parse("runner = \"bash\"\nallow_env = [\"GREETING\", \"APP_*\"]")
            .unwrap()
            .build("bash")
            .unwrap();
        assert!(plugin.allow_env.allows("APP_MODE"));
        let err = parse("runner = \"python\"\nallow_env = [\"PYTHON*\"]")
            .unwrap()
            .build("python")
            .unwrap_err();
        assert_eq!(err.key, "allow_env");
        let err = parse("runner = \"python\"\nallow_env = [\"PYTHONWARNINGS\"]")
            .unwrap()
            .build("python")
            .unwrap_err();
        assert!(err.message.contains("no request may set"), "{err}");
    }
}
