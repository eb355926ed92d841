use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::{CanRun, CommandLine, PluginError, Runner, RunnerSettings, resolve_program};

/// Runs `interpreter [args...] SCRIPT [job args...]`. The built-in runners
/// are this with different defaults.
#[derive(Debug, Clone)]
pub struct InterpreterRunner {
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl InterpreterRunner {
    pub(crate) fn new(
        settings: &RunnerSettings,
        default_interpreter: Option<&str>,
        extra_args: &[&str],
        extra_env: &[(&str, &str)],
        can_run: CanRun<'_>,
    ) -> Result<Self, PluginError> {
        let interpreter = settings
            .interpreter
            .as_deref()
            .or(default_interpreter)
            .ok_or_else(|| PluginError::new("interpreter", "missing: this runner needs one"))?;
        let program = resolve_program(interpreter, can_run)
            .map_err(|m| PluginError::new("interpreter", m))?;
        let args = extra_args
            .iter()
            .map(|a| (*a).to_owned())
            .chain(settings.args.iter().cloned())
            .collect();
        // The plugin's own env wins over the runner's defaults.
        let mut env: Vec<(String, String)> = extra_env
            .iter()
            .filter(|(k, _)| !settings.env.contains_key(*k))
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        env.extend(settings.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        Ok(InterpreterRunner { program, args, env })
    }
}

impl Runner for InterpreterRunner {
    fn command_line(&self, script: &Path, args: &[String]) -> CommandLine {
        let mut argv: Vec<OsString> = self.args.iter().map(OsString::from).collect();
        argv.push(script.as_os_str().to_owned());
        argv.extend(args.iter().map(OsString::from));
        CommandLine {
            program: self.program.clone(),
            args: argv,
            env: self.env.clone(),
        }
    }
}

pub(crate) fn build(
    settings: &RunnerSettings,
    can_run: CanRun<'_>,
) -> Result<InterpreterRunner, PluginError> {
    InterpreterRunner::new(settings, None, &[], &[], can_run)
}
