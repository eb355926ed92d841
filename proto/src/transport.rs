//! How the contract is carried: gRPC over mutual TLS on TCP.
//!
//! The TLS configs come from the pki crate; this module only moves bytes:
//! it accepts and handshakes connections, serves gRPC routes on them
//! ([`serve_grpc`]), and dials channels for tonic clients. It decides
//! nothing about who may do what.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio_rustls::server::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

mod lean_tls;

/// Encrypted bytes a server connection holds unsent (rustls' default is
/// 64 KiB). A written piece of output (a message of up to 256 KiB) is then
/// encrypted and handed to the socket in one `writev` instead of four, with
/// a wake-up of the reader for each. It only fills while the peer reads
/// slower than the server writes; HTTP/2 flow control bounds that too.
pub const TLS_SEND_BUFFER: usize = 256 * 1024;

/// A peer must finish its TLS handshake within this, or be closed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Accepted connections waiting for the server to take them.
const ACCEPT_BACKLOG: usize = 64;
/// TLS handshakes in progress at once. A new connection past it pushes out
/// the oldest one still handshaking: accepting never waits for a slot, so
/// peers that connect and say nothing cannot keep anyone else out (when the
/// accept loop waited for a free slot instead, every connection behind them
/// queued unseen in the kernel's backlog until theirs timed out).
pub const MAX_HANDSHAKES: usize = 512;

/// The server TLS config in force; a new value applies to new connections
/// (certificate reload), established ones keep theirs.
pub type ServerConfigSource = watch::Receiver<Arc<rustls::ServerConfig>>;

/// A bounded crowd of connections that have not proven anything yet: when
/// it is full, a newcomer takes the place of the member that has been in
/// it longest, among those that have not spoken yet (sent a byte, or a
/// request: what counts is the caller's) if there are any. A legitimate
/// peer speaks at once and needs its place for milliseconds, so silent
/// floods never push it out and others would have to turn over the whole
/// crowd within that time; refusing newcomers instead would let any flood
/// keep everyone out for as long as it stays.
#[derive(Debug)]
pub struct Crowd {
    what: &'static str,
    max: usize,
    inner: Mutex<CrowdInner>,
}

#[derive(Debug, Default)]
struct CrowdInner {
    next: u64,
    /// By arrival; dropping a sender tells its member it was pushed out.
    silent: BTreeMap<u64, oneshot::Sender<()>>,
    spoken: BTreeMap<u64, oneshot::Sender<()>>,
    pushed_out: u64,
    last_warned: Option<std::time::Instant>,
}

impl CrowdInner {
    fn len(&self) -> usize {
        self.silent.len() + self.spoken.len()
    }
}

/// A member's place in a [`Crowd`], given up when dropped.
#[derive(Debug)]
pub struct Place {
    speaker: Speaker,
    pushed_out: oneshot::Receiver<()>,
}

/// Marks a [`Place`]'s member as having spoken; cheap to clone.
#[derive(Debug, Clone)]
pub struct Speaker {
    crowd: Arc<Crowd>,
    id: u64,
}

/// How often a crowd that keeps pushing members out says so in the log.
const CROWD_WARN_EVERY: Duration = Duration::from_secs(10);

impl Crowd {
    /// A crowd of at most `max` (at least one); `what` names its members
    /// in the log.
    pub fn new(what: &'static str, max: usize) -> Arc<Crowd> {
        Arc::new(Crowd {
            what,
            max: max.max(1),
            inner: Mutex::new(CrowdInner::default()),
        })
    }

    /// A place for a newcomer, pushing out the oldest silent member, or
    /// else the oldest, if full.
    pub fn enter(self: &Arc<Self>) -> Place {
        let (tx, rx) = oneshot::channel();
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut pushed = 0;
        while inner.len() >= self.max {
            // Dropping the sender wakes the member's `pushed_out`.
            if inner.silent.pop_first().is_none() {
                inner.spoken.pop_first();
            }
            pushed += 1;
        }
        if pushed > 0 {
            inner.pushed_out += pushed;
            let now = std::time::Instant::now();
            if inner
                .last_warned
                .is_none_or(|t| now.duration_since(t) >= CROWD_WARN_EVERY)
            {
                inner.last_warned = Some(now);
                tracing::warn!(
                    limit = self.max,
                    pushed_out = inner.pushed_out,
                    "too many {} at once; closing the oldest (a flood of connections?)",
                    self.what
                );
            }
        }
        let id = inner.next;
        inner.next += 1;
        inner.silent.insert(id, tx);
        Place {
            speaker: Speaker {
                crowd: self.clone(),
                id,
            },
            pushed_out: rx,
        }
    }

    /// Members now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Place {
    /// Resolves when a newcomer has pushed this member out.
    pub async fn pushed_out(&mut self) {
        let _ = (&mut self.pushed_out).await;
    }

    pub fn speaker(&self) -> Speaker {
        self.speaker.clone()
    }
}

impl Speaker {
    /// The member has spoken: silent members are pushed out before it.
    pub fn spoke(&self) {
        let mut inner = self.crowd.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = inner.silent.remove(&self.id) {
            inner.spoken.insert(self.id, tx);
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut inner = self
            .speaker
            .crowd
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let id = self.speaker.id;
        if inner.silent.remove(&id).is_none() {
            inner.spoken.remove(&id);
        }
    }
}

/// How many connections one listener may hold, so that one kind of peer
/// can never take the file descriptors another needs (the workers' gRPC
/// connections must leave room for the HTTPS API, and the other way round).
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// TLS handshakes in progress at once (a newcomer past it closes the
    /// oldest silent one).
    pub handshakes: usize,
    /// Connections accepted and not yet closed, handshaking or served.
    /// Once they are all taken the listener stops accepting, and newcomers
    /// wait in the kernel's backlog (costing this process nothing) until a
    /// connection closes. `None`: no bound here (the server bounds them).
    pub connections: Option<Arc<Semaphore>>,
    /// Drive TLS with buffers that are freed while the connection idles
    /// (`lean_tls`, over rustls's unbuffered API) instead of tokio-rustls,
    /// whose rustls connection keeps a 4 KiB read buffer for life: for a
    /// listener whose many connections idle most of the time (the
    /// scheduler's, one per worker).
    pub lean: bool,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            handshakes: MAX_HANDSHAKES,
            connections: None,
            lean: false,
        }
    }
}

/// An accepted TLS connection; holds its place among the listener's
/// connections until dropped.
#[derive(Debug)]
pub struct Accepted {
    tls: Tls,
    _place: Option<OwnedSemaphorePermit>,
}

#[derive(Debug)]
enum Tls {
    Buffered(TlsStream<TcpStream>),
    Lean(lean_tls::LeanTls),
}

impl Accepted {
    pub fn peer_addr(&self) -> std::io::Result<SocketAddr> {
        match &self.tls {
            Tls::Buffered(tls) => tls.get_ref().0.peer_addr(),
            Tls::Lean(tls) => tls.get_ref().peer_addr(),
        }
    }

    /// The client's certificate chain, leaf first, if it sent one.
    pub fn peer_certificates(&self) -> Option<&[rustls::pki_types::CertificateDer<'static>]> {
        match &self.tls {
            Tls::Buffered(tls) => tls.get_ref().1.peer_certificates(),
            Tls::Lean(tls) => tls.peer_certificates(),
        }
    }
}

/// Forwards each call to whichever TLS stream the connection has.
macro_rules! on_tls {
    ($self:ident, $tls:ident => $call:expr) => {
        match &mut $self.get_mut().tls {
            Tls::Buffered($tls) => {
                let $tls = std::pin::Pin::new($tls);
                $call
            }
            Tls::Lean($tls) => {
                let $tls = std::pin::Pin::new($tls);
                $call
            }
        }
    };
}

impl AsyncRead for Accepted {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        on_tls!(self, tls => tls.poll_read(cx, buf))
    }
}

impl AsyncWrite for Accepted {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        on_tls!(self, tls => tls.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        on_tls!(self, tls => tls.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.tls {
            Tls::Buffered(tls) => tls.is_write_vectored(),
            Tls::Lean(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        on_tls!(self, tls => tls.poll_flush(cx))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        on_tls!(self, tls => tls.poll_shutdown(cx))
    }
}

/// Who is at the other end of a gRPC connection, read from its client
/// certificate once when the connection is served; every request on it
/// carries a clone. Keeping the certificate instead (tonic's own
/// `TlsConnectInfo`) cost a copy of it per connection, beside rustls' own,
/// and a parse of it on every call.
#[derive(Clone, Debug)]
pub struct Caller(Arc<CallerIdentity>);

#[derive(Debug)]
enum CallerIdentity {
    NoCertificate,
    Unreadable(String),
    Known(jobcluster_pki::PeerIdentity),
}

impl tonic::transport::server::Connected for Accepted {
    type ConnectInfo = Caller;

    fn connect_info(&self) -> Caller {
        let leaf = self.peer_certificates().and_then(|certs| certs.first());
        let identity = match leaf {
            None => CallerIdentity::NoCertificate,
            Some(leaf) => match jobcluster_pki::peer_identity(leaf) {
                Ok(peer) => CallerIdentity::Known(peer),
                Err(e) => CallerIdentity::Unreadable(e.to_string()),
            },
        };
        Caller(Arc::new(identity))
    }
}

/// How often a failing `accept` (out of file descriptors) is logged.
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(10);
/// Pauses after a failed `accept`: doubled from the first up to the last,
/// so an exhausted descriptor table is not polled in a hot loop.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));

/// The failures of one listener's `accept` in a row (out of file
/// descriptors and the like), so that the loop backs off, longer each
/// time, instead of spinning on the error, and says so now and then rather
/// than at every attempt.
#[derive(Debug, Default)]
struct AcceptFailures {
    in_a_row: u32,
    total: u64,
    last_warned: Option<std::time::Instant>,
}

impl AcceptFailures {
    /// The next accepted connection; failures wait and are retried.
    async fn accept(&mut self, listener: &TcpListener) -> (TcpStream, SocketAddr) {
        loop {
            match listener.accept().await {
                Ok(accepted) => {
                    self.in_a_row = 0;
                    return accepted;
                }
                Err(error) => {
                    self.total += 1;
                    let now = std::time::Instant::now();
                    if self
                        .last_warned
                        .is_none_or(|t| now.duration_since(t) >= ACCEPT_WARN_EVERY)
                    {
                        self.last_warned = Some(now);
                        tracing::warn!(%error, failures = self.total, "accept failed; backing off");
                    }
                    let pause = ACCEPT_BACKOFF.0 * 2u32.saturating_pow(self.in_a_row.min(16));
                    self.in_a_row += 1;
                    tokio::time::sleep(pause.min(ACCEPT_BACKOFF.1)).await;
                }
            }
        }
    }
}

/// Accepts TCP connections on `listener` and completes the TLS handshake of
/// each in its own task, so one slow client never delays the others: the
/// loop only accepts, whatever the handshakes in progress do. A handshake
/// ends within [`HANDSHAKE_TIMEOUT`], and at most [`MAX_HANDSHAKES`] are in
/// progress (a newcomer closes the oldest). The returned stream feeds
/// [`serve_grpc`]; when it is dropped the accept loop ends.
pub fn tls_incoming(
    listener: TcpListener,
    config: ServerConfigSource,
) -> ReceiverStream<Result<Accepted, std::io::Error>> {
    tls_incoming_with(listener, config, ConnectionLimits::default())
}

/// Like [`tls_incoming`], within `limits`.
pub fn tls_incoming_with(
    listener: TcpListener,
    config: ServerConfigSource,
    limits: ConnectionLimits,
) -> ReceiverStream<Result<Accepted, std::io::Error>> {
    let (tx, rx) = mpsc::channel(ACCEPT_BACKLOG);
    let handshaking = Crowd::new("unfinished TLS handshakes", limits.handshakes);
    tokio::spawn(async move {
        let mut failing = AcceptFailures::default();
        loop {
            let place = match &limits.connections {
                Some(places) => tokio::select! {
                    place = places.clone().acquire_owned() => match place {
                        Ok(place) => Some(place),
                        Err(_) => return,
                    },
                    () = tx.closed() => return,
                },
                None => None,
            };
            let (tcp, peer) = tokio::select! {
                accepted = failing.accept(&listener) => accepted,
                () = tx.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let server_config = config.borrow().clone();
            let lean = limits.lean;
            let tx = tx.clone();
            let mut crowd_place = handshaking.enter();
            tokio::spawn(async move {
                let speaker = crowd_place.speaker();
                let handshake = async move {
                    // A peer that connects and sends nothing is the first
                    // to go when the crowd is full.
                    tcp.readable().await?;
                    speaker.spoke();
                    if lean {
                        lean_tls::accept(server_config, tcp, TLS_SEND_BUFFER)
                            .await
                            .map(Tls::Lean)
                    } else {
                        let mut tls = TlsAcceptor::from(server_config).accept(tcp).await?;
                        tls.get_mut().1.set_buffer_limit(Some(TLS_SEND_BUFFER));
                        Ok(Tls::Buffered(tls))
                    }
                };
                let result = tokio::select! {
                    result = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake) => result,
                    () = crowd_place.pushed_out() => {
                        tracing::debug!(%peer, "unfinished tls handshake closed for a newer connection");
                        return;
                    }
                };
                drop(crowd_place);
                match result {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(Accepted { tls, _place: place })).await;
                    }
                    Ok(Err(error)) => tracing::info!(%peer, %error, "tls handshake refused"),
                    Err(_) => tracing::debug!(%peer, "tls handshake timed out"),
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

/// The largest HTTP/2 frame a peer may send on a channel (HTTP/2's default
/// is 16 KiB). A worker's output comes in messages of up to 256 KiB; in
/// 16 KiB frames each message wakes the reading task sixteen times and is
/// copied into tonic's buffer piece by piece. The receiver buffers at most
/// one frame per connection, so this bounds that buffer too.
pub const MAX_FRAME_SIZE: u32 = 512 * 1024;

/// Streams an HTTP/2 peer may reset before the server has taken them up,
/// after which the connection is sent away (`GOAWAY`
/// `ENHANCE_YOUR_CALM`): the rapid-reset attack (CVE-2023-44487) makes a
/// server start work for requests nobody waits for. h2's own default,
/// written here so an upgrade cannot loosen it unseen; every HTTP/2 server
/// of both daemons sets it.
pub const H2_MAX_PENDING_RESETS: usize = 20;
/// Streams an HTTP/2 server may reset for the peer's errors before it
/// sends the peer away (the "MadeYouReset" attack, CVE-2025-8671): h2's
/// default, written here for the same reason.
pub const H2_MAX_ERROR_RESETS: usize = 1024;

/// The HPACK table a channel lets its peer fill with the headers it
/// answers with, and [`serve_grpc`] with the headers of requests (HTTP/2's
/// default is 4,096 bytes): none. hyper's server
/// (tonic's) sends a `date` header with every response, a new value each
/// second, and h2's HPACK encoder indexes each one: on a connection that
/// lives for days, as a worker's to its scheduler does, both ends' tables
/// fill to their limit with dates no one reads again (10-11 KB of heap
/// per connection, in the scheduler for each worker, measured;
/// docs/PERFORMANCE.md, "Steady heartbeats"). Without the table a
/// response carries its few header bytes literally. A worker's heartbeat
/// headers, the same every time, would keep 0.5 KB per worker in the
/// scheduler for a few bytes saved on each call.
pub const HEADER_TABLE_SIZE: u32 = 0;

/// gRPC's message prefix: a compression flag and the message's length.
pub const GRPC_PREFIX: usize = 5;

/// The largest gRPC message the daemons' own encoders and decoders of
/// `StreamJob` take (tonic's default for its decoders): 16 times the
/// largest piece of output a worker sends.
pub const GRPC_MAX_MESSAGE: usize = 4 * 1024 * 1024;

/// The prefix of an uncompressed gRPC message of `len` bytes; `None` past
/// what its 4-byte length can say.
pub fn grpc_prefix(len: usize) -> Option<[u8; GRPC_PREFIX]> {
    let [a, b, c, d] = u32::try_from(len).ok()?.to_be_bytes();
    Some([0, a, b, c, d])
}

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
        .max_frame_size(MAX_FRAME_SIZE)
        .http2_header_table_size(HEADER_TABLE_SIZE)
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

/// Connections the kernel completes and queues for `accept` (capped by
/// `net.core.somaxconn`). The default of 128 fills in an instant under a
/// burst of connections, and every client past it retransmits its SYN for
/// seconds, however fast the accept loop is.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds `addr`, returning the listener and the address it actually bound
/// (port 0 picks a free port).
pub async fn bind(addr: &str) -> std::io::Result<(TcpListener, SocketAddr)> {
    let mut last = None;
    for candidate in tokio::net::lookup_host(addr).await? {
        let bound = (|| {
            let socket = if candidate.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            // As std and tokio do: a restarted daemon rebinds its port at
            // once.
            socket.set_reuseaddr(true)?;
            socket.bind(candidate)?;
            socket.listen(LISTEN_BACKLOG)
        })();
        match bound {
            Ok(listener) => {
                let local = listener.local_addr()?;
                return Ok((listener, local));
            }
            Err(error) => last = Some(error),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{addr} names no address"),
        )
    }))
}

/// A channel whose every call fails with `reason` (as if its peer could
/// not be reached): for a target that cannot be dialled at all, where a
/// caller needs a channel anyway.
pub fn failing_channel(reason: String) -> Channel {
    let reason = Arc::new(reason);
    let dial = tower::service_fn(move |_uri| {
        let reason = reason.clone();
        async move {
            Err::<TokioIo<TcpStream>, _>(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                reason.as_str().to_owned(),
            ))
        }
    });
    Endpoint::from_static("http://unreachable.invalid:9").connect_with_connector_lazy(dial)
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
        .max_frame_size(MAX_FRAME_SIZE)
        .http2_header_table_size(HEADER_TABLE_SIZE)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    Ok(endpoint.connect_lazy())
}

/// HTTP/2 pings on a served gRPC connection find a peer that went away
/// without closing (a paused or cut-off worker).
const GRPC_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// A ping unanswered this long closes the connection.
const GRPC_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Serves gRPC `routes` on every connection `incoming` yields, HTTP/2
/// only, until `stop` resolves; then accepts no more, asks every open
/// connection to finish (GOAWAY) and returns once all have closed (the
/// caller bounds that wait). Each request carries its connection's
/// [`tonic::transport::server::Connected::connect_info`] (for TLS, the
/// [`Caller`]) in its extensions, as tonic's own server puts it.
///
/// Kept instead of `tonic::transport::Server` for what a connection holds
/// while idle, which with thousands of workers is the scheduler's memory:
/// tonic spawns each connection in a task that also keeps what the
/// connection was made from, around an HTTP/1-or-2 connection, and gives
/// no way to refuse the peer an HPACK table (the headers of a worker's
/// heartbeat, indexed and kept for the connection's life). Here a
/// connection's task is the HTTP/2 connection and its shutdown watch, and
/// the header table size is [`HEADER_TABLE_SIZE`]. The rest is as tonic's
/// server has it (hyper's windows and frame size, no stream limit, pings
/// every 10 s) but for one bound tonic lifts: after 1,024 streams this
/// end reset for the peer's errors, hyper's default, the connection is
/// closed (GOAWAY). A request's `grpc-timeout` is enforced by the
/// caller's channel (tonic's client), which resets the stream, and a reset
/// drops the handler, so tonic's server-side copy of that check is not
/// missed. Errors of one connection are its own (logged at debug, as
/// tonic does).
pub async fn serve_grpc<I, IO>(
    incoming: I,
    routes: tonic::service::Routes,
    stop: impl std::future::Future<Output = ()>,
) where
    I: tokio_stream::Stream<Item = std::io::Result<IO>>,
    IO: AsyncRead + AsyncWrite + tonic::transport::server::Connected + Unpin + Send + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
{
    use futures_util::FutureExt as _;
    use tokio_stream::StreamExt as _;
    use tower::ServiceExt as _;

    let mut http2 = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    http2
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(GRPC_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(GRPC_KEEPALIVE_TIMEOUT)
        .header_table_size(HEADER_TABLE_SIZE)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
        .max_local_error_reset_streams(H2_MAX_ERROR_RESETS)
        // As tonic's server: a scheduler relays every follower of a job on
        // its one connection to the worker (`max_followers_per_job`), and
        // a peer here holds a cluster certificate.
        .max_concurrent_streams(None);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let routes = routes.prepare();
    {
        let mut incoming = std::pin::pin!(incoming);
        let mut stop = std::pin::pin!(stop);
        loop {
            let io = tokio::select! {
                () = &mut stop => break,
                io = incoming.next() => match io {
                    Some(Ok(io)) => io,
                    Some(Err(error)) => {
                        tracing::debug!(%error, "grpc connection not accepted");
                        continue;
                    }
                    None => break,
                },
            };
            let info = io.connect_info();
            let service = routes.clone().map_request(
                move |mut request: hyper::Request<hyper::body::Incoming>| {
                    request.extensions_mut().insert(info.clone());
                    request
                },
            );
            let connection = http2.serve_connection(
                TokioIo::new(io),
                hyper_util::service::TowerToHyperService::new(service),
            );
            // Combinators, not an async block, so the task holds the
            // connection once.
            tokio::spawn(graceful.watch(connection).map(|served| {
                if let Err(error) = served {
                    tracing::debug!(%error, "grpc connection failed");
                }
            }));
        }
        // `incoming` is dropped here, which ends its accept loop.
    }
    graceful.shutdown().await;
}

/// Accepted plaintext connections, for insecure mode only.
pub type PlainIncoming =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = std::io::Result<TcpStream>> + Send>>;

/// Accepted plaintext connections, for insecure mode only; a failing
/// `accept` backs off as [`tls_incoming`]'s does.
pub fn plain_incoming(listener: TcpListener) -> PlainIncoming {
    Box::pin(futures_util::stream::unfold(
        (listener, AcceptFailures::default()),
        |(listener, mut failing)| async move {
            let (tcp, _) = failing.accept(&listener).await;
            Some((Ok(tcp), (listener, failing)))
        },
    ))
}

/// The caller's identity from its client certificate, which must carry
/// `role`; anything else is refused and logged with the caller's name.
pub fn require_role<T>(
    request: &tonic::Request<T>,
    role: jobcluster_pki::Role,
    rpc: &str,
) -> Result<jobcluster_pki::PeerIdentity, tonic::Status> {
    let caller = request
        .extensions()
        .get::<Caller>()
        .map(|caller| &*caller.0);
    let peer = match caller {
        None | Some(CallerIdentity::NoCertificate) => {
            return Err(tonic::Status::unauthenticated(
                "a client certificate is required",
            ));
        }
        Some(CallerIdentity::Unreadable(e)) => {
            return Err(tonic::Status::permission_denied(format!(
                "certificate has no cluster identity: {e}"
            )));
        }
        Some(CallerIdentity::Known(peer)) => peer,
    };
    if peer.role != role {
        tracing::warn!(peer = %peer.name, role = %peer.role, rpc, expected = %role, "refused a caller with the wrong role");
        return Err(tonic::Status::permission_denied(format!(
            "{} certificates may not call this service; it is for the {role} role",
            peer.role
        )));
    }
    Ok(peer.clone())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_full_crowd_pushes_out_its_oldest_silent_member_for_a_newcomer() {
        let pushed = |place: &mut Place| {
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            std::pin::pin!(place.pushed_out()).poll(&mut cx).is_ready()
        };
        let crowd = Crowd::new("test members", 3);
        let mut first = crowd.enter();
        let mut second = crowd.enter();
        let mut third = crowd.enter();
        first.speaker().spoke();
        // Full: the oldest silent member (second) goes, not the first.
        let mut fourth = crowd.enter();
        assert_eq!(crowd.len(), 3);
        assert!(!pushed(&mut first));
        assert!(pushed(&mut second));
        assert!(!pushed(&mut third));
        // With everyone speaking, the oldest goes.
        third.speaker().spoke();
        fourth.speaker().spoke();
        let _fifth = crowd.enter();
        assert!(pushed(&mut first));
        assert!(!pushed(&mut third));
        // A member that leaves makes room: nobody is pushed out for the next.
        drop(third);
        let _sixth = crowd.enter();
        assert!(!pushed(&mut fourth));
        assert_eq!(crowd.len(), 3);
    }
}
