//! Telling systemd (`Type=notify`) that a daemon really serves, and that it
//! is stopping. Without `$NOTIFY_SOCKET` (not under systemd) these do nothing.

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
