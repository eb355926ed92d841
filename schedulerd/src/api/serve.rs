//! Serving the router over mutual TLS with limits a hostile client cannot
//! get around: a bounded number of connections, a deadline for request
//! headers (no slowloris), an idle timeout, HTTP/2 keepalives and a stream
//! cap, a lingering close, and a graceful shutdown that gives open requests
//! a bounded time.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::Request;
use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
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
/// A connection with no request in flight and nothing received for this
/// long is closed, so idle connections cannot hold every slot.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// What a connection is doing: requests whose response is not fully sent,
/// and when it last received bytes.
#[derive(Debug)]
struct Activity {
    in_flight: AtomicUsize,
    last_read_ms: AtomicU64,
    epoch: Instant,
}

impl Activity {
    fn new() -> Self {
        Activity {
            in_flight: AtomicUsize::new(0),
            last_read_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Resolves once the connection has been idle for `limit`.
    async fn idle(&self, limit: Duration) {
        let limit_ms = limit.as_millis() as u64;
        loop {
            let quiet = self
                .now_ms()
                .saturating_sub(self.last_read_ms.load(Ordering::Acquire));
            if self.in_flight.load(Ordering::Acquire) == 0 && quiet >= limit_ms {
                return;
            }
            // Wakes at the earliest moment the connection could be idle.
            let wait = limit_ms.saturating_sub(quiet).max(1000);
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
    }
}

/// Holds a request's place in `in_flight` until dropped.
#[derive(Debug)]
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted while it is sent.
struct Guarded {
    body: Body,
    _guard: InFlight,
}

impl http_body::Body for Guarded {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The connection's stream, noting when bytes arrive.
struct Tracked<IO> {
    io: IO,
    activity: Arc<Activity>,
    /// Set once our side is shut down.
    linger: Option<Linger>,
}

/// A lingering close: after shutting down our side, the client's late
/// bytes (the rest of a body we answered without reading it all) are read
/// and dropped for a while. Closing a socket with unread bytes makes the
/// kernel send a reset, which can destroy our answer before the client has
/// read it.
struct Linger {
    until: Pin<Box<tokio::time::Sleep>>,
    left: usize,
}

/// How long, and how many bytes, a closed connection keeps reading.
const LINGER_TIMEOUT: Duration = Duration::from_secs(5);
const LINGER_LIMIT: usize = 16 << 20;

impl<IO: AsyncRead + Unpin> AsyncRead for Tracked<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity
                .last_read_ms
                .store(this.activity.now_ms(), Ordering::Release);
        }
        polled
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Tracked<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.linger.is_none() {
            std::task::ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
        }
        let linger = this.linger.get_or_insert_with(|| Linger {
            until: Box::pin(tokio::time::sleep(LINGER_TIMEOUT)),
            left: LINGER_LIMIT,
        });
        let mut scratch = [0u8; 8192];
        loop {
            if linger.left == 0 || linger.until.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.io).poll_read(cx, &mut buf) {
                Poll::Pending => return Poll::Pending,
                // The client has closed too (or the connection broke):
                // nothing more can arrive.
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => {
                    linger.left = linger.left.saturating_sub(buf.filled().len());
                }
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

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
        let activity = Arc::new(Activity::new());
        let (on_request, on_response) = (activity.clone(), activity.clone());
        let service = tower::ServiceExt::map_response(
            tower::ServiceExt::map_request(
                router.clone(),
                move |mut request: Request<Incoming>| {
                    on_request.in_flight.fetch_add(1, Ordering::AcqRel);
                    request.extensions_mut().insert(ConnectInfo(peer.clone()));
                    request
                },
            ),
            move |response: Response| {
                // Counted until the whole body (a followed log, say) is sent.
                let guard = InFlight(on_response.clone());
                response.map(|body| {
                    Body::new(Guarded {
                        body,
                        _guard: guard,
                    })
                })
            },
        );
        let io = Tracked {
            io: stream,
            activity: activity.clone(),
            linger: None,
        };
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(service))
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            tokio::select! {
                result = connection => {
                    if let Err(error) = result {
                        tracing::debug!(%addr, %error, "connection ended with an error");
                    }
                }
                () = activity.idle(IDLE_TIMEOUT) => {
                    tracing::debug!(%addr, "closing an idle connection");
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_only_without_requests_and_reads() {
        let activity = Arc::new(Activity::new());
        // A request in flight (a followed log of a quiet job) is not idle.
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        let idle =
            tokio::time::timeout(Duration::from_secs(600), activity.idle(IDLE_TIMEOUT)).await;
        assert!(
            idle.is_err(),
            "a connection with a request in flight was called idle"
        );
        // Once the response is sent, a minute of silence makes it idle.
        drop(InFlight(activity.clone()));
        let started = tokio::time::Instant::now();
        activity.idle(IDLE_TIMEOUT).await;
        assert!(started.elapsed() <= IDLE_TIMEOUT + Duration::from_secs(1));
    }
}
