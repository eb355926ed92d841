//! A spinner on stderr while waiting for the scheduler, only when stderr
//! is a terminal (never in pipes or CI).

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::ProgressBar;

/// A spinner that clears itself when dropped.
#[derive(Debug)]
pub(crate) struct Spinner(Option<ProgressBar>);

impl Spinner {
    /// Starts a spinner with `message` if stderr is a terminal.
    pub(crate) fn start(message: String) -> Spinner {
        if !std::io::stderr().is_terminal() {
            return Spinner(None);
        }
        let bar = ProgressBar::new_spinner();
        bar.set_message(message);
        bar.enable_steady_tick(Duration::from_millis(100));
        Spinner(Some(bar))
    }

    /// Whether it shows (stderr is a terminal).
    pub(crate) fn shown(&self) -> bool {
        self.0.is_some()
    }

    pub(crate) fn set_message(&self, message: String) {
        if let Some(bar) = &self.0 {
            bar.set_message(message);
        }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}
