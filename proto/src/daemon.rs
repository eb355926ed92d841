//! What both daemons share at their edges: logging set-up, the signals that
//! stop them and reload their certificates, and telling systemd
//! (`Type=notify`) that they serve and that they are stopping (without
//! `$NOTIFY_SOCKET` that does nothing).

use std::time::Duration;

use sd_notify::NotifyState;

/// `READY=1`: call once the daemon accepts requests.
pub fn notify_ready() {
    notify(&[NotifyState::Ready, NotifyState::Status("serving")]);
}

/// `STOPPING=1`: call when a shutdown begins.
pub fn notify_stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("shutting down")]);
}

/// `STATUS=...`: what the daemon is doing, shown by `systemctl status`.
pub fn notify_status(status: &str) {
    notify(&[NotifyState::Status(status)]);
}

fn notify(states: &[NotifyState<'_>]) {
    if let Err(error) = send(states) {
        tracing::warn!(%error, "could not notify systemd");
    }
}

/// Without `$NOTIFY_SOCKET` (not under systemd) this does nothing.
fn send(states: &[NotifyState<'_>]) -> std::io::Result<()> {
    match std::env::var_os("NOTIFY_SOCKET") {
        // sd-notify connects to the path as given; an abstract socket
        // (`@name`, as some systemd versions hand out) is named by a NUL
        // byte instead of the '@'. Kept here so those hosts still work.
        Some(path) if path.as_encoded_bytes().starts_with(b"@") => {
            use std::os::linux::net::SocketAddrExt;
            let name = &path.as_encoded_bytes()[1..];
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            let message: String = states.iter().map(|s| format!("{s}\n")).collect();
            std::os::unix::net::UnixDatagram::unbound()?
                .send_to_addr(message.as_bytes(), &addr)
                .map(|_| ())
        }
        _ => sd_notify::notify(states),
    }
}

/// Keep-alives for systemd's watchdog (`WatchdogSec=`): `WATCHDOG=1` at
/// half the interval systemd gives in `$WATCHDOG_USEC` (meant for this
/// process when `$WATCHDOG_PID` is set), so one late tick is not fatal.
/// `None` when no watchdog is asked for. The keep-alives come from a task
/// of the daemon's own runtime: a runtime that no longer runs its tasks
/// stops them, and systemd restarts the daemon.
pub fn watchdog() -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
    let interval = sd_notify::watchdog_enabled().filter(|d| !d.is_zero())?;
    let period = (interval / 2).max(Duration::from_millis(1));
    Some(async move {
        tracing::debug!(?period, "systemd watchdog keep-alives");
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            if let Err(error) = send(&[NotifyState::Watchdog]) {
                tracing::warn!(%error, "could not send the systemd watchdog keep-alive");
            }
        }
    })
}

/// Raises this process's soft limit on open files to its hard limit: a
/// server facing the network needs a descriptor per connection, and the
/// usual soft limit (1024) would let a thousand idle connections make
/// `accept` fail for everyone. Returns the limit in force.
pub fn raise_open_files_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(error) => {
                tracing::warn!(%error, soft, hard, "could not raise the open files limit");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(error) => {
            tracing::warn!(%error, "could not read the open files limit");
            0
        }
    }
}

/// This process's soft limit on open files now (0 if it cannot be read).
pub fn open_files_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit};
    getrlimit(Resource::RLIMIT_NOFILE).map_or(0, |(soft, _)| soft)
}

/// Starts listening for SIGHUP now, so a hangup that arrives before the
/// reload task runs is not fatal.
pub fn hangups() -> std::io::Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
}

/// Runs `reload` on every SIGHUP. New certificates apply to new
/// connections; running jobs and open streams keep theirs. A failed reload
/// keeps the material in force.
pub async fn reload_on_hangup(
    mut hangups: tokio::signal::unix::Signal,
    reload: impl Fn() -> Result<(), String> + Send + Sync + 'static,
) {
    // Reading and parsing the files blocks: on the blocking pool, so a
    // runtime thread (workerd has one) goes on serving meanwhile. One
    // reload at a time: each is awaited before the next hangup is read.
    let reload = std::sync::Arc::new(reload);
    while hangups.recv().await.is_some() {
        let reload = reload.clone();
        let reloaded = tokio::task::spawn_blocking(move || reload())
            .await
            .unwrap_or_else(|e| Err(format!("the reload task failed: {e}")));
        match reloaded {
            Ok(()) => tracing::info!("SIGHUP: certificates reloaded"),
            Err(error) => {
                tracing::error!(%error, "SIGHUP: reload failed; keeping the certificates in force")
            }
        }
    }
}

/// How log events are written to stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line and event: `timestamp`, `level`, `target`,
    /// `message` and the event's fields (`job_id`, `worker_id`, ...) at the
    /// top level, for log shippers.
    Json,
}

/// Logs to stderr in `format`, `RUST_LOG` filtering (default `info`),
/// colours only on a terminal so journald and files get plain lines.
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder
            .json()
            .with_ansi(false)
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
}

/// Resolves on the first SIGTERM or SIGINT. The handlers are installed
/// when this is called, not when the future is first polled, so a signal
/// that arrives while the daemon starts is not lost (nor fatal).
pub fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}

/// The flags every daemon takes.
#[derive(Debug, clap::Args)]
pub struct Flags {
    /// TOML config file.
    #[arg(long, value_name = "FILE")]
    pub config: std::path::PathBuf,
    /// Validate the config (and the certificates it names) and exit.
    #[arg(long)]
    pub check_config: bool,
    /// Log format on stderr: `text` lines, or one JSON object per event.
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// What a daemon's serving part returns.
pub type ServeResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// A daemon's `main` around its own parts: logging and the crypto provider;
/// `load` reads the config (`--check-config` stops there); `insecure` says
/// what to warn about at every start in plaintext mode; `threads` how many
/// threads the multi-threaded runtime runs (`None`: one per CPU); `serve`
/// binds and runs on that runtime until the shutdown signal it is given.
/// Any error is printed as one line, `NAME: what went wrong: why`.
pub fn main<C, Fut>(
    name: &str,
    flags: Flags,
    load: impl FnOnce(&std::path::Path) -> Result<C, crate::config::ConfigError>,
    insecure: impl FnOnce(&C) -> Option<&'static str>,
    threads: impl FnOnce(&C) -> Option<usize>,
    serve: impl FnOnce(C, std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> Fut,
) -> std::process::ExitCode
where
    Fut: std::future::Future<Output = ServeResult>,
{
    init_logging(flags.log_format);
    // While this is the only thread (logging starts none).
    crate::alloc::keep_stream_buffers();
    jobcluster_pki::install_crypto_provider();
    let result = (|| -> ServeResult {
        let config = load(&flags.config)?;
        if flags.check_config {
            println!("{}: ok", flags.config.display());
            return Ok(());
        }
        if let Some(what) = insecure(&config) {
            tracing::warn!(
                "INSECURE MODE (grpc_server.use_tls = false): {what}; never use this outside a development machine"
            );
        }
        // Before the runtime, while this is the only thread: every later
        // one inherits it.
        crate::slice::log(&crate::slice::shorten());
        let mut runtime = tokio::runtime::Builder::new_multi_thread();
        if let Some(threads) = threads(&config) {
            runtime.worker_threads(threads);
        }
        let runtime = runtime
            .enable_all()
            .build()
            .map_err(|e| format!("starting the async runtime: {e}"))?;
        // What the runtime took, not what was asked: `0` and an absent key
        // leave it to the CPUs and `TOKIO_WORKER_THREADS`.
        tracing::info!(
            threads = runtime.metrics().num_workers(),
            "async runtime started"
        );
        runtime.block_on(async {
            let shutdown =
                shutdown_signal().map_err(|e| format!("listening for SIGTERM and SIGINT: {e}"))?;
            let watchdog = watchdog().map(tokio::spawn);
            let trimmer = tokio::spawn(crate::alloc::return_free_memory());
            let result = serve(config, Box::pin(shutdown)).await;
            if let Some(watchdog) = watchdog {
                watchdog.abort();
            }
            trimmer.abort();
            result
        })
    })();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            let mut line = error.to_string();
            let mut source = error.source();
            while let Some(cause) = source {
                line.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            match flags.log_format {
                LogFormat::Text => eprintln!("{name}: {line}"),
                // Every line on stderr stays one JSON object.
                LogFormat::Json => tracing::error!(error = %line, "{name} failed"),
            }
            std::process::ExitCode::FAILURE
        }
    }
}
