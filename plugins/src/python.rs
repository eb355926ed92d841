use crate::{CanRun, InterpreterRunner, PluginError, RunnerSettings};

pub(crate) const EXTENSIONS: &[&str] = &["py"];

/// `-E`: python ignores every `PYTHON*` variable (PYTHONWARNINGS,
/// PYTHONSTARTUP, PYTHONPATH, ...), several of which import or run code
/// before the script does; the plugin's own `env` cannot set them either.
/// `-u` keeps output unbuffered, so it reaches followers as it is printed,
/// not when a 4 KiB buffer fills or the script exits. `PYTHONUNBUFFERED`
/// does the same for pythons the script itself starts without `-E`.
pub(crate) fn build(
    settings: &RunnerSettings,
    can_run: CanRun<'_>,
) -> Result<InterpreterRunner, PluginError> {
    InterpreterRunner::new(
        settings,
        Some("python3"),
        &["-E", "-u"],
        &[("PYTHONUNBUFFERED", "1")],
        can_run,
    )
}
