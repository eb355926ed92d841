//! A daemon's life under an init system: telling systemd (`Type=notify`)
//! that it really serves and that it is stopping (without `$NOTIFY_SOCKET`
//! these do nothing), and reloading certificates on SIGHUP.

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
