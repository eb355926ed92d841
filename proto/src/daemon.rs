//! What both daemons share at their edges: logging set-up, the signals that
//! stop them and reload their certificates, and telling systemd
//! (`Type=notify`) that they serve and that they are stopping (without
//! `$NOTIFY_SOCKET` that does nothing).

use std::os::unix::net::UnixDatagram;

/// `READY=1`: call once the daemon accepts requests.
pub fn notify_ready() {
    notify("READY=1");
}

/// `STOPPING=1`: call when a shutdown begins.
pub fn notify_stopping() {
    notify("STOPPING=1");
}

fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let result = UnixDatagram::unbound().and_then(|socket| {
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            // An abstract socket: its name starts with a NUL, not '@'.
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(state.as_bytes(), &addr)
        } else {
            socket.send_to(state.as_bytes(), &path)
        }
    });
    if let Err(error) = result {
        tracing::warn!(%error, state, "could not notify systemd");
    }
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
    mut reload: impl FnMut() -> Result<(), String>,
) {
    while hangups.recv().await.is_some() {
        match reload() {
            Ok(()) => tracing::info!("SIGHUP: certificates reloaded"),
            Err(error) => {
                tracing::error!(%error, "SIGHUP: reload failed; keeping the certificates in force")
            }
        }
    }
}

/// Logs to stderr, `RUST_LOG` filtering (default `info`), colours only on
/// a terminal so journald and files get plain lines.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
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
}

/// What a daemon's serving part returns.
pub type ServeResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// A daemon's `main` around its own parts: logging and the crypto provider;
/// `load` reads the config (`--check-config` stops there); `insecure` says
/// what to warn about at every start in plaintext mode; `serve` binds and
/// runs on a multi-threaded runtime until the shutdown signal it is given.
/// Any error is printed as one line, `NAME: what went wrong: why`.
pub fn main<C, Fut>(
    name: &str,
    flags: Flags,
    load: impl FnOnce(&std::path::Path) -> Result<C, crate::config::ConfigError>,
    insecure: impl FnOnce(&C) -> Option<&'static str>,
    serve: impl FnOnce(C, std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> Fut,
) -> std::process::ExitCode
where
    Fut: std::future::Future<Output = ServeResult>,
{
    init_logging();
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
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("starting the async runtime: {e}"))?;
        runtime.block_on(async {
            let shutdown =
                shutdown_signal().map_err(|e| format!("listening for SIGTERM and SIGINT: {e}"))?;
            serve(config, Box::pin(shutdown)).await
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
            eprintln!("{name}: {line}");
            std::process::ExitCode::FAILURE
        }
    }
}
