//! Serving the router over mutual TLS with limits a hostile client cannot
//! get around: a bounded number of connections, a deadline for request
//! headers (no slowloris), HTTP/2 keepalives and a stream cap, and a
//! graceful shutdown that gives open requests a bounded time.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use std::net::SocketAddr;

use axum::serve::Listener;

use super::tls::PeerInfo;

/// Connections served at once; more are closed on arrival.
const MAX_CONNECTIONS: usize = 4096;
/// A client must send its request headers within this.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 pings keep idle followers' links alive through proxies and
/// detect dead ones.
const H2_KEEPALIVE: Duration = Duration::from_secs(15);
/// Requests in flight on one HTTP/2 connection.
const H2_MAX_STREAMS: u32 = 256;

/// Serves until `stop` fires, then lets open connections finish for up to
/// `grace`.
pub(crate) async fn serve<L: Listener<Addr = SocketAddr>>(
    mut listener: L,
    peer_of: impl Fn(&L::Io, SocketAddr) -> PeerInfo,
    router: Router,
    stop: CancellationToken,
    grace: Duration,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_KEEPALIVE)
        .keep_alive_timeout(H2_KEEPALIVE * 2)
        .max_concurrent_streams(H2_MAX_STREAMS);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, addr) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%addr, limit = MAX_CONNECTIONS, "connection limit reached; closing a new connection");
            continue;
        };
        let peer = peer_of(&stream, addr);
        let service = tower::ServiceExt::map_request(
            router.clone(),
            move |mut request: Request<Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer.clone()));
                request
            },
        );
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(service))
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%addr, %error, "connection ended with an error");
            }
            drop(slot);
        });
    }
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still open after the shutdown grace; closing them");
    }
}
