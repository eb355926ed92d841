use crate::{InterpreterRunner, PluginError, RunnerSettings};

pub(crate) const EXTENSIONS: &[&str] = &["py"];

/// `-u` and `PYTHONUNBUFFERED` so output reaches followers as it is
/// printed, not when a 4 KiB buffer fills or the script exits.
pub(crate) fn build(settings: &RunnerSettings) -> Result<InterpreterRunner, PluginError> {
    InterpreterRunner::new(
        settings,
        Some("python3"),
        &["-u"],
        &[("PYTHONUNBUFFERED", "1")],
    )
}
