use crate::{InterpreterRunner, PluginError, RunnerSettings};

pub(crate) const EXTENSIONS: &[&str] = &["sh", "bash"];

pub(crate) fn build(settings: &RunnerSettings) -> Result<InterpreterRunner, PluginError> {
    InterpreterRunner::new(settings, Some("bash"), &[], &[])
}
