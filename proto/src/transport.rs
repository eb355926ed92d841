//! How the contract is carried: gRPC over mutual TLS on TCP.
//!
//! The TLS configs come from the pki crate; this module only moves bytes:
//! it accepts and handshakes connections for a tonic server, and dials
//! channels for tonic clients. It decides nothing about who may do what.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::server::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

/// A slow or silent peer must not hold a handshake slot for long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Accepted connections waiting for the server to take them.
const ACCEPT_BACKLOG: usize = 64;
/// TLS handshakes in progress at once; past it, accepting waits, so
/// clients that never finish a handshake cannot pile up without bound.
const MAX_HANDSHAKES: usize = 256;

/// The server TLS config in force; a new value applies to new connections
/// (certificate reload), established ones keep theirs.
pub type ServerConfigSource = watch::Receiver<Arc<rustls::ServerConfig>>;

/// Accepts TCP connections on `listener` and completes the TLS handshake of
/// each in its own task, so one slow client never delays the others. The
/// returned stream feeds `tonic::transport::Server::serve_with_incoming*`;
/// when it is dropped the accept loop ends.
pub fn tls_incoming(
    listener: TcpListener,
    config: ServerConfigSource,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(ACCEPT_BACKLOG);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                permit = handshakes.clone().acquire_owned() => permit,
                () = tx.closed() => return,
            };
            let Ok(permit) = permit else { return };
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tx.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(conn) => conn,
                Err(error) => {
                    // Out of file descriptors and the like: back off briefly
                    // instead of spinning on the error.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(config.borrow().clone());
            let tx = tx.clone();
            tokio::spawn(async move {
                let result = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                drop(permit);
                match result {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(error)) => tracing::info!(%peer, %error, "tls handshake refused"),
                    Err(_) => tracing::info!(%peer, "tls handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// A dial target was not a usable `host:port`.
#[derive(Debug, thiserror::Error)]
#[error("invalid address {addr:?}: {reason}")]
pub struct AddressError {
    pub addr: String,
    pub reason: String,
}

/// The client TLS config in force; each new connection takes the current
/// value (certificate reload), established ones keep theirs.
pub type ClientConfigSource = watch::Receiver<Arc<rustls::ClientConfig>>;

/// A lazily connected channel to `addr` (`host:port`) over TLS with
/// `config`. The server's certificate must name `addr`'s host. The channel
/// reconnects by itself after a failure; calls on it fail fast while the
/// peer is unreachable (connect timeout) and keepalives detect dead links.
pub fn tls_channel(
    addr: &str,
    config: Arc<rustls::ClientConfig>,
    connect_timeout: Duration,
) -> Result<Channel, AddressError> {
    // The receiver keeps the value after the sender is gone.
    let (_fixed, source) = watch::channel(config);
    tls_channel_from(addr, source, connect_timeout)
}

/// Like [`tls_channel`], with the config taken from `source` at each dial.
pub fn tls_channel_from(
    addr: &str,
    source: ClientConfigSource,
    connect_timeout: Duration,
) -> Result<Channel, AddressError> {
    let bad = |reason: &str| AddressError {
        addr: addr.to_owned(),
        reason: reason.to_owned(),
    };
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| bad("expected host:port"))?;
    let port: u16 = port.parse().map_err(|_| bad("bad port"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let server_name = ServerName::try_from(host.clone()).map_err(|_| bad("bad host name"))?;
    // The scheme is only a label here: the connector below does the TLS.
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| bad(&e.to_string()))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    let dial = tower::service_fn(move |_uri| {
        let connector = TlsConnector::from(source.borrow().clone());
        let server_name = server_name.clone();
        let host = host.clone();
        async move {
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(server_name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(dial))
}

/// Binds `addr`, returning the listener and the address it actually bound
/// (port 0 picks a free port).
pub async fn bind(addr: &str) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// A lazily connected plaintext channel, for insecure mode only: nothing
/// is authenticated or encrypted.
pub fn plain_channel(addr: &str, connect_timeout: Duration) -> Result<Channel, AddressError> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| AddressError {
            addr: addr.to_owned(),
            reason: e.to_string(),
        })?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    Ok(endpoint.connect_lazy())
}

/// Accepted plaintext connections, for insecure mode only.
pub fn plain_incoming(listener: TcpListener) -> tokio_stream::wrappers::TcpListenerStream {
    tokio_stream::wrappers::TcpListenerStream::new(listener)
}

/// The caller's identity from its client certificate, which must carry
/// `role`; anything else is refused and logged with the caller's name.
pub fn require_role<T>(
    request: &tonic::Request<T>,
    role: jobcluster_pki::Role,
    rpc: &str,
) -> Result<jobcluster_pki::PeerIdentity, tonic::Status> {
    let leaf = request
        .peer_certs()
        .and_then(|certs| certs.first().cloned())
        .ok_or_else(|| tonic::Status::unauthenticated("a client certificate is required"))?;
    let peer = jobcluster_pki::peer_identity(&leaf).map_err(|e| {
        tonic::Status::permission_denied(format!("certificate has no cluster identity: {e}"))
    })?;
    if peer.role != role {
        tracing::warn!(peer = %peer.name, role = %peer.role, rpc, expected = %role, "refused a caller with the wrong role");
        return Err(tonic::Status::permission_denied(format!(
            "{} certificates may not call this service; it is for the {role} role",
            peer.role
        )));
    }
    Ok(peer)
}
