use crate::{CanRun, InterpreterRunner, PluginError, RunnerSettings};

pub(crate) const EXTENSIONS: &[&str] = &["sh", "bash"];

/// bash has no switch to ignore its environment: a script's bash reads no
/// profile or rc file anyway, and `--noprofile --norc` keep it so should
/// it ever start as a login or interactive shell. What it does read at
/// start (`BASH_ENV`, exported functions, `SHELLOPTS`, ...) is kept out by
/// the job's environment being built from nothing and by the deny list.
pub(crate) fn build(
    settings: &RunnerSettings,
    can_run: CanRun<'_>,
) -> Result<InterpreterRunner, PluginError> {
    InterpreterRunner::new(
        settings,
        Some("bash"),
        &["--noprofile", "--norc"],
        &[],
        can_run,
    )
}
