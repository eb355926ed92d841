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
