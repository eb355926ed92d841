//! Serving the router over mutual TLS with limits a hostile client cannot
//! get around: connections without an identity kept apart from (and
//! unable to crowd out) authenticated ones, a deadline for the first
//! request, an idle timeout that only requests reset, HTTP/2 keepalives and
//! a stream cap, a lingering close, and a graceful shutdown that gives open
//! requests a bounded time.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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
use hyper_util::service::TowerToHyperService;
use jobcluster_proto::transport::{Crowd, Place};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use std::net::SocketAddr;

use axum::serve::Listener;

use super::tls::PeerInfo;

/// Connections of authenticated peers (a cluster certificate, or a request
/// that passed authentication) served at once; more are closed on arrival.
/// At most half of the listener's share of file descriptors.
const MAX_AUTHENTICATED: usize = 4096;
/// Connections without an identity yet (no certificate, and no request
/// that authenticated). A newcomer past it closes the oldest, so a flood
/// neither takes the authenticated peers' slots nor keeps a token holder
/// from getting in. At most a quarter of the listener's share of file
/// descriptors (the TLS handshakes in progress take the last quarter).
const MAX_UNAUTHENTICATED: usize = 512;

/// The file descriptors a listener may use for its connections, split
/// between authenticated and unauthenticated ones (the handshakes before
/// them are bounded by the listener, see [`handshakes`]).
///
/// [`handshakes`]: ConnectionShare::handshakes
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnectionShare(pub(crate) usize);

impl ConnectionShare {
    fn authenticated(self) -> usize {
        (self.0 / 2).clamp(1, MAX_AUTHENTICATED)
    }

    fn unauthenticated(self) -> usize {
        (self.0 / 4).clamp(1, MAX_UNAUTHENTICATED)
    }

    /// TLS handshakes in progress at once.
    pub(crate) fn handshakes(self) -> usize {
        (self.0 / 4).clamp(1, jobcluster_proto::transport::MAX_HANDSHAKES)
    }

    /// What a listener with every default bound uses at most.
    pub(crate) const FULL: ConnectionShare = ConnectionShare(MAX_AUTHENTICATED * 2);
}
/// How long a connection without an identity may stay open at all, however
/// busy it keeps itself (requests refused for bad tokens, pings).
const UNAUTHENTICATED_LIFETIME: Duration = Duration::from_secs(30);
/// A connection must deliver the headers of its first request within this
/// (from the end of its TLS handshake), or it is closed.
const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A client must send each request's headers within this.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 pings keep idle followers' links alive through proxies and
/// detect dead ones.
const H2_KEEPALIVE: Duration = Duration::from_secs(15);
/// Requests in flight on one HTTP/2 connection.
const H2_MAX_STREAMS: u32 = 256;
/// A connection with no request in flight, and none started or finished
/// for this long, is closed, so idle connections cannot hold every slot.
/// Only requests count: pings and other HTTP/2 control frames a client
/// sends would otherwise keep a connection that does nothing open forever.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// What a connection is doing, in requests: how many have their response
/// not fully sent, when one last started or ended, and whether one has
/// passed authentication.
#[derive(Debug)]
struct Activity {
    in_flight: AtomicUsize,
    last_active_ms: AtomicU64,
    requested: AtomicBool,
    admitted: AtomicBool,
    on_admitted: Notify,
    /// Set by a request that leaves the connection unusable (a body that
    /// did not arrive in time).
    close: CancellationToken,
    epoch: Instant,
}

impl Activity {
    fn new() -> Self {
        Activity {
            in_flight: AtomicUsize::new(0),
            last_active_ms: AtomicU64::new(0),
            requested: AtomicBool::new(false),
            admitted: AtomicBool::new(false),
            on_admitted: Notify::new(),
            close: CancellationToken::new(),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn touch(&self) {
        self.last_active_ms.store(self.now_ms(), Ordering::Release);
    }

    /// Counts a request in; whether it is the connection's first.
    fn request_started(&self) -> bool {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.touch();
        !self.requested.swap(true, Ordering::AcqRel)
    }

    /// Resolves once the connection has been idle for `limit`.
    async fn idle(&self, limit: Duration) {
        let limit_ms = limit.as_millis() as u64;
        loop {
            let quiet = self
                .now_ms()
                .saturating_sub(self.last_active_ms.load(Ordering::Acquire));
            if self.in_flight.load(Ordering::Acquire) == 0 && quiet >= limit_ms {
                return;
            }
            // Wakes at the earliest moment the connection could be idle.
            let wait = limit_ms.saturating_sub(quiet).max(1000);
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
    }

    /// Resolves if no request has arrived within `limit`; never otherwise.
    async fn no_request_within(&self, limit: Duration) {
        tokio::time::sleep(limit).await;
        if self.requested.load(Ordering::Acquire) {
            std::future::pending::<()>().await;
        }
    }

    async fn close_requested(&self) {
        self.close.cancelled().await;
    }

    /// Resolves once a request on the connection passed authentication.
    async fn admitted(&self) {
        if !self.admitted.load(Ordering::Acquire) {
            // `notify_one` keeps a permit when nobody waits yet, so an
            // admission between the check and the wait is not lost.
            self.on_admitted.notified().await;
        }
    }
}

/// Put in every request's extensions, for what a request learns about its
/// connection: authentication calls [`admit`] when it lets a request
/// through, which moves the connection among the authenticated ones, and
/// [`close`] ends a connection that cannot carry another request.
///
/// [`admit`]: ConnectionControl::admit
/// [`close`]: ConnectionControl::close
#[derive(Debug, Clone)]
pub(crate) struct ConnectionControl(Arc<Activity>);

impl ConnectionControl {
    pub(crate) fn admit(&self) {
        if !self.0.admitted.swap(true, Ordering::AcqRel) {
            self.0.on_admitted.notify_one();
        }
    }

    /// Closes the connection once the requests on it are answered.
    pub(crate) fn close(&self) {
        self.0.close.cancel();
    }
}

/// Where a connection stands: counted among the authenticated, or in the
/// crowd without an identity (from which a newcomer may push it out).
enum Standing {
    Authenticated(#[allow(dead_code)] OwnedSemaphorePermit),
    Unauthenticated(Place),
}

impl Standing {
    fn is_authenticated(&self) -> bool {
        matches!(self, Standing::Authenticated(_))
    }

    /// Resolves when a newer unauthenticated connection took this one's
    /// place; never for an authenticated one.
    async fn pushed_out(&mut self) {
        match self {
            Standing::Unauthenticated(place) => place.pushed_out().await,
            Standing::Authenticated(_) => std::future::pending().await,
        }
    }
}

/// What ended a connection's wait.
enum Event {
    Ended,
    /// Closed at once.
    Close(&'static str),
    /// Closed once its open requests are answered.
    Finish,
    Admitted,
}

/// Holds a request's place in `in_flight` until dropped.
#[derive(Debug)]
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
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

/// The connection's stream, closing with a linger.
struct Lingering<IO> {
    io: IO,
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

impl<IO: AsyncRead + Unpin> AsyncRead for Lingering<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Lingering<IO> {
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
    share: ConnectionShare,
) {
    let (max_authenticated, max_unauthenticated) = (share.authenticated(), share.unauthenticated());
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
        .max_concurrent_streams(H2_MAX_STREAMS)
        .max_pending_accept_reset_streams(jobcluster_proto::transport::H2_MAX_PENDING_RESETS)
        .max_local_error_reset_streams(jobcluster_proto::transport::H2_MAX_ERROR_RESETS);
    let connections = TaskTracker::new();
    let authenticated = Arc::new(Semaphore::new(max_authenticated));
    let unauthenticated = Crowd::new("API connections without an identity", max_unauthenticated);
    loop {
        let (stream, addr) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        let peer = peer_of(&stream, addr);
        let mut speaker = None;
        let standing = if peer.identity.is_some() {
            // The TLS layer checked the certificate chains to the cluster CA.
            let Ok(permit) = authenticated.clone().try_acquire_owned() else {
                tracing::warn!(%addr, limit = max_authenticated, "connection limit reached; closing a new connection");
                continue;
            };
            Standing::Authenticated(permit)
        } else {
            let place = unauthenticated.enter();
            speaker = Some(place.speaker());
            Standing::Unauthenticated(place)
        };
        let activity = Arc::new(Activity::new());
        let control = ConnectionControl(activity.clone());
        let (on_request, on_response) = (activity.clone(), activity.clone());
        let service = tower::ServiceExt::map_response(
            tower::ServiceExt::map_request(
                router.clone(),
                move |mut request: Request<Incoming>| {
                    if on_request.request_started()
                        && let Some(speaker) = &speaker
                    {
                        // Connections that never ask are pushed out first.
                        speaker.spoke();
                    }
                    request.extensions_mut().insert(ConnectInfo(peer.clone()));
                    request.extensions_mut().insert(control.clone());
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
        let io = Lingering {
            io: stream,
            linger: None,
        };
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(service))
            .into_owned();
        let authenticated = authenticated.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let mut standing = standing;
            let mut closing = false;
            let first_request = activity.no_request_within(FIRST_REQUEST_TIMEOUT);
            let mut first_request = std::pin::pin!(first_request);
            let lifetime = tokio::time::sleep(UNAUTHENTICATED_LIFETIME);
            let mut lifetime = std::pin::pin!(lifetime);
            loop {
                let unknown = !standing.is_authenticated();
                let event = tokio::select! {
                    result = connection.as_mut() => {
                        if let Err(error) = result {
                            tracing::debug!(%addr, %error, "connection ended with an error");
                        }
                        Event::Ended
                    }
                    () = stop.cancelled(), if !closing => Event::Finish,
                    () = activity.close_requested(), if !closing => Event::Finish,
                    () = activity.idle(IDLE_TIMEOUT) => Event::Close("idle"),
                    () = &mut first_request => Event::Close("no request in time"),
                    () = &mut lifetime, if unknown => Event::Close("unauthenticated for too long"),
                    () = standing.pushed_out(), if unknown => Event::Close("pushed out by newer unauthenticated connections"),
                    () = activity.admitted(), if unknown => Event::Admitted,
                };
                match event {
                    Event::Ended => break,
                    Event::Close(why) => {
                        tracing::debug!(%addr, why, "closing a connection");
                        break;
                    }
                    Event::Finish => {
                        // Open requests finish; nothing new is taken.
                        connection.as_mut().graceful_shutdown();
                        closing = true;
                    }
                    Event::Admitted => match authenticated.clone().try_acquire_owned() {
                        Ok(permit) => standing = Standing::Authenticated(permit),
                        Err(_) => {
                            // Stays among the unauthenticated, with their
                            // limits, rather than exceed the bound.
                            tracing::warn!(%addr, limit = max_authenticated, "connection limit reached; an authenticated connection keeps the limits of unauthenticated ones");
                            activity.admitted.store(false, Ordering::Release);
                        }
                    },
                }
            }
        });
    }
    connections.close();
    if tokio::time::timeout(grace, connections.wait())
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
    async fn a_connection_is_idle_only_without_requests() {
        let activity = Arc::new(Activity::new());
        // A request in flight (a followed log of a quiet job) is not idle.
        activity.request_started();
        let idle =
            tokio::time::timeout(Duration::from_secs(600), activity.idle(IDLE_TIMEOUT)).await;
        assert!(
            idle.is_err(),
            "a connection with a request in flight was called idle"
        );
        // Once the response is sent, a minute without requests makes it
        // idle, whatever else the client sends (nothing else is counted).
        drop(InFlight(activity.clone()));
        let started = tokio::time::Instant::now();
        activity.idle(IDLE_TIMEOUT).await;
        let waited = started.elapsed();
        assert!(
            waited >= IDLE_TIMEOUT && waited <= IDLE_TIMEOUT + Duration::from_secs(1),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_a_request_in_time_is_closed_and_one_with_it_is_not() {
        let silent = Activity::new();
        let started = tokio::time::Instant::now();
        silent.no_request_within(FIRST_REQUEST_TIMEOUT).await;
        assert_eq!(started.elapsed(), FIRST_REQUEST_TIMEOUT);

        let asking = Activity::new();
        asking.request_started();
        let closed = tokio::time::timeout(
            Duration::from_secs(600),
            asking.no_request_within(FIRST_REQUEST_TIMEOUT),
        )
        .await;
        assert!(
            closed.is_err(),
            "a connection that asked in time was closed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_admission_is_seen_whether_it_comes_before_or_during_the_wait() {
        let early = Arc::new(Activity::new());
        ConnectionControl(early.clone()).admit();
        tokio::time::timeout(Duration::from_secs(1), early.admitted())
            .await
            .unwrap();

        let late = Arc::new(Activity::new());
        let admission = ConnectionControl(late.clone());
        let waiter = tokio::spawn({
            let late = late.clone();
            async move { late.admitted().await }
        });
        tokio::task::yield_now().await;
        admission.admit();
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}
