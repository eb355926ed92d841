//! Ctrl-C in the commands that follow a job: `run` stops what it started
//! and waits for the end (a second Ctrl-C leaves at once), `logs -f` only
//! stops following. Either way the exit code is 130, the shells'
//! 128 + SIGINT, so a script sees the interruption.
//!
//! Only these commands take SIGINT over; every other one keeps the default,
//! which ends clusterctl at once.

use std::fmt;
use std::future::Future;
use std::process::ExitCode;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::watch;

use crate::api::Api;

/// The exit code after Ctrl-C: 128 + SIGINT.
pub(crate) const INTERRUPTED_EXIT_CODE: u8 = 130;

/// SIGINT, taken over from its default from [`Interrupts::listen`] on.
#[derive(Debug)]
pub(crate) struct Interrupts(Signal);

impl Interrupts {
    pub(crate) fn listen() -> anyhow::Result<Interrupts> {
        signal(SignalKind::interrupt())
            .map(Interrupts)
            .map_err(|e| anyhow::anyhow!("cannot listen for Ctrl-C (SIGINT): {e}"))
    }

    /// Resolves at the next SIGINT.
    pub(crate) async fn next(&mut self) {
        if self.0.recv().await.is_none() {
            // The signal driver is gone: no Ctrl-C will ever be seen.
            std::future::pending::<()>().await;
        }
    }
}

/// What a `run` started, once the scheduler has answered its start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Started {
    Job(String),
    Group(String),
}

impl fmt::Display for Started {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Started::Job(id) => write!(f, "job {id}"),
            Started::Group(id) => write!(f, "group {id}"),
        }
    }
}

/// Where a `run` tells what it started, as soon as it knows.
pub(crate) type StartedSender = watch::Sender<Option<Started>>;

fn describe(started: &Option<Started>) -> String {
    match started {
        Some(started) => started.to_string(),
        None => "the job once the scheduler has answered its start".to_owned(),
    }
}

/// Runs `flow` (a `run`, which sends what it started on its sender). The
/// first Ctrl-C stops that job or group through the API and lets `flow`
/// go on following it to its end; the exit code is then 130 whatever the
/// job's. A second Ctrl-C returns 130 at once, leaving the job as it is.
pub(crate) async fn run_stopping_on_interrupt<F>(
    api: &Api,
    flow: impl FnOnce(StartedSender) -> F,
) -> anyhow::Result<ExitCode>
where
    F: Future<Output = anyhow::Result<ExitCode>>,
{
    let mut interrupts = Interrupts::listen()?;
    let (sender, shown) = watch::channel(None);
    let mut known = sender.subscribe();
    let flow = flow(sender);
    let mut flow = std::pin::pin!(flow);
    let stopper = async {
        // Cloned out at once: the watch's read lock must not be held
        // across the stop call.
        let started = known.wait_for(Option::is_some).await.ok()?.clone()?;
        let result = match &started {
            Started::Job(id) => api.stop(id).await.map(|a| a.parsed),
            Started::Group(id) => api.stop_group(id).await.map(|a| a.parsed),
        };
        Some((started, result))
    };
    let mut stopper = std::pin::pin!(stopper);
    let mut interrupted = false;
    let mut stop_sent = false;
    loop {
        tokio::select! {
            result = &mut flow => {
                let code = result?;
                return Ok(if interrupted {
                    ExitCode::from(INTERRUPTED_EXIT_CODE)
                } else {
                    code
                });
            }
            () = interrupts.next() => {
                let what = describe(&shown.borrow());
                if interrupted {
                    eprintln!(
                        "clusterctl: interrupted again: leaving {what} as it is (see: clusterctl \
                         status; stop it with: clusterctl stop)"
                    );
                    return Ok(ExitCode::from(INTERRUPTED_EXIT_CODE));
                }
                interrupted = true;
                eprintln!(
                    "clusterctl: interrupted: stopping {what} and waiting for it to end (Ctrl-C \
                     again to leave it as it is)"
                );
            }
            stopped = &mut stopper, if interrupted && !stop_sent => {
                stop_sent = true;
                match stopped {
                    Some((started, Err(error))) => {
                        eprintln!("clusterctl: could not stop {started}: {error}; it is left as it is");
                        return Ok(ExitCode::from(INTERRUPTED_EXIT_CODE));
                    }
                    Some((started, Ok(result))) if !result.success => {
                        eprintln!(
                            "clusterctl: the scheduler could not stop {started} (state: {}); it is \
                             left as it is",
                            result.state
                        );
                        return Ok(ExitCode::from(INTERRUPTED_EXIT_CODE));
                    }
                    // Stopping: the flow follows the job to its end.
                    Some(_) => {}
                    // The flow ended without starting anything; its own
                    // branch returns.
                    None => {}
                }
            }
        }
    }
}

/// Runs `follow` (a `logs -f`); Ctrl-C leaves at once with 130, the job
/// untouched.
pub(crate) async fn follow_until_interrupt(
    id: &str,
    follow: impl Future<Output = anyhow::Result<ExitCode>>,
) -> anyhow::Result<ExitCode> {
    let mut interrupts = Interrupts::listen()?;
    tokio::select! {
        result = follow => result,
        () = interrupts.next() => {
            eprintln!("clusterctl: interrupted: stopped following {id}; it runs on as it is");
            Ok(ExitCode::from(INTERRUPTED_EXIT_CODE))
        }
    }
}
