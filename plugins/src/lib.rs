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
mod interpreter;
mod python;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use interpreter::InterpreterRunner;

/// How long a stopped job gets between SIGTERM and SIGKILL, unless its
/// plugin says otherwise.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);

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
    /// File extensions (without the dot) this plugin is chosen for when a
    /// job names no plugin.
    pub extensions: Option<Vec<String>>,
    /// Time between SIGTERM and SIGKILL when a job is stopped ("10s", "500ms").
    #[serde(default, with = "humantime_serde")]
    pub stop_grace: Option<Duration>,
    /// A job running longer is stopped and recorded failed ("30m").
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Output kept per job (bytes, or "100MiB"); past it the job is stopped
    /// and recorded failed, and what it wrote up to the limit is kept.
    #[serde(default, deserialize_with = "byte_size")]
    pub max_output_bytes: Option<u64>,
    /// Run this plugin's jobs as this user (when workerd runs as root).
    pub user: Option<String>,
    /// ... and this group (default: the user's primary group).
    pub group: Option<String>,
    /// Resource limits set on each job process (setrlimit).
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
    /// Open file descriptors (RLIMIT_NOFILE).
    pub open_files: Option<u64>,
    /// Processes: `pids.max` of the job's cgroup where the worker has a
    /// delegated cgroup v2, else RLIMIT_NPROC (which counts all the user's
    /// processes).
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
    pub max_output_bytes: Option<u64>,
    pub user: Option<String>,
    pub group: Option<String>,
    pub limits: Limits,
    pub runner: Box<dyn Runner>,
}

impl PluginConfig {
    /// Validates the table and builds the plugin. Fails if the interpreter
    /// cannot be found or a value is out of range.
    pub fn build(&self, name: &str) -> Result<Plugin, PluginError> {
        if !valid_plugin_name(name) {
            return Err(PluginError::new(
                "",
                "plugin names use lowercase letters, digits, '-' and '_'",
            ));
        }
        let (settings, runner, default_extensions): (_, Box<dyn Runner>, &[&str]) = match self {
            PluginConfig::Bash(s) => (s, Box::new(bash::build(s)?), bash::EXTENSIONS),
            PluginConfig::Python(s) => (s, Box::new(python::build(s)?), python::EXTENSIONS),
            PluginConfig::Interpreter(s) => (s, Box::new(interpreter::build(s)?), &[]),
        };
        for key in settings.env.keys() {
            if key.is_empty() || key.contains(['=', '\0']) {
                return Err(PluginError::new(
                    "env",
                    format!("invalid variable name {key:?}"),
                ));
            }
        }
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
        if settings.max_output_bytes == Some(0) {
            return Err(PluginError::new("max_output_bytes", "must be more than 0"));
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
            max_output_bytes: settings.max_output_bytes,
            user: settings.user.clone(),
            group: settings.group.clone(),
            limits: settings.limits,
            runner,
        })
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
/// `PATH`. The result must be an executable file.
pub fn resolve_program(program: &str) -> Result<PathBuf, String> {
    if program.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if program.contains('/') {
        let path = PathBuf::from(program);
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(format!("{program} is not an executable file"))
        };
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_var)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| format!("{program} not found in PATH"))
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
        assert!(line.args.contains(&"-u".into()), "{line:?}");
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
            vec![OsString::from("-e"), "/s/a.sh".into(), "x".into()]
        );
        assert_eq!(plugin.stop_grace, Duration::from_secs(2));
    }
}
