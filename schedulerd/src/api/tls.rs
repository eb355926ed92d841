//! Serving axum over mutual TLS: a [`Listener`] fed by the shared
//! handshaking acceptor, and the peer's identity as connect info.

use std::net::SocketAddr;

use axum::serve::Listener;
use jobcluster_pki::PeerIdentity;
use jobcluster_proto::transport::{self, Accepted, ConnectionLimits, ServerConfigSource};
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

/// Accepted, handshaken TLS connections.
#[derive(Debug)]
pub(crate) struct TlsListener {
    incoming: ReceiverStream<Result<Accepted, std::io::Error>>,
    local: SocketAddr,
}

impl TlsListener {
    pub(crate) fn new(
        listener: TcpListener,
        config: ServerConfigSource,
        limits: ConnectionLimits,
    ) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        Ok(TlsListener {
            incoming: transport::tls_incoming_with(listener, config, limits),
            local,
        })
    }
}

impl Listener for TlsListener {
    type Io = Accepted;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.incoming.next().await {
                Some(Ok(stream)) => {
                    let addr = stream
                        .peer_addr()
                        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
                    return (stream, addr);
                }
                Some(Err(error)) => tracing::debug!(%error, "connection failed before serving"),
                // The acceptor only ends when its listener is gone; axum
                // keeps asking, so wait for shutdown instead of spinning.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Who is on the other end of an API connection.
#[derive(Debug, Clone)]
pub(crate) struct PeerInfo {
    pub(crate) addr: SocketAddr,
    pub(crate) identity: Option<PeerIdentity>,
}

impl PeerInfo {
    /// The identity in the connection's client certificate, if any.
    pub(crate) fn of(stream: &Accepted, addr: SocketAddr) -> Self {
        let identity = stream
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|leaf| jobcluster_pki::peer_identity(leaf).ok());
        PeerInfo { addr, identity }
    }
}
