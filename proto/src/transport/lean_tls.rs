//! A server's TLS stream that holds no buffer while its connection idles.
//!
//! tokio-rustls drives rustls's buffered connection, which keeps a 4 KiB
//! read buffer for the connection's whole life (rustls allocates it before
//! every read and frees nothing after a read that finds nothing). A
//! scheduler holds one connection per worker, idle between heartbeats, so
//! that buffer was the largest single piece of what a worker costs it
//! (docs/PERFORMANCE.md, "Memory per worker"). This stream drives rustls's
//! unbuffered connection instead, whose buffers are ours: ciphertext read
//! but not yet processed, plaintext not yet read, ciphertext not yet sent.
//! Each is freed once empty. All TLS is still rustls's: this only moves
//! bytes between the socket, rustls and the caller.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Ciphertext asked of the socket at once: a whole TLS record at most
/// (16 KiB of plaintext and its overhead), as HTTP/2 frames of 16 KiB come.
const READ_SIZE: usize = 16 * 1024 + 256;
/// The most plaintext one TLS record carries; vectored writes are
/// gathered up to it.
const RECORD_SIZE: usize = 16 * 1024;
/// Ciphertext received and not yet processed: a handshake message may
/// span records (a client's certificate chain), which rustls joins inside
/// this buffer; 64 KiB for it, as rustls's own buffered connection allows,
/// and a read's worth more.
const MAX_INCOMING: usize = 64 * 1024 + READ_SIZE;

/// A TLS server connection over TCP, handshaken by [`accept`].
pub(crate) struct LeanTls {
    io: TcpStream,
    conn: UnbufferedServerConnection,
    /// Received ciphertext rustls has not consumed.
    incoming: Vec<u8>,
    /// Decrypted application data the caller has not read, from `read_at`.
    plain: Vec<u8>,
    read_at: usize,
    /// Ciphertext to send, from `sent`.
    outgoing: Vec<u8>,
    sent: usize,
    /// Unsent ciphertext past which writes wait for the socket.
    send_limit: usize,
    /// The peer's close_notify arrived: no more data will.
    peer_closed: bool,
    /// Our close_notify is queued.
    close_queued: bool,
    /// rustls failed (its fatal alert, if any, queued after everything
    /// else): nothing more is read or written.
    failed: bool,
}

impl std::fmt::Debug for LeanTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeanTls")
            .field("io", &self.io)
            .field("incoming", &self.incoming.len())
            .field("plain", &(self.plain.len() - self.read_at))
            .field("outgoing", &(self.outgoing.len() - self.sent))
            .finish_non_exhaustive()
    }
}

/// What [`LeanTls::drive`] should do once rustls lets it write.
enum Want<'a> {
    Nothing,
    Write(&'a [u8]),
    CloseNotify,
}

/// Where [`LeanTls::drive`] stopped.
enum Driven {
    /// rustls needs more ciphertext (the handshake goes on).
    Blocked,
    /// Every received record is processed; with [`Want::Write`], this
    /// much of the data was encrypted.
    Writable(usize),
    /// Both sides sent close_notify.
    Closed,
}

fn invalid(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error)
}

/// Completes a TLS handshake as the server on `io`. The caller bounds its
/// time.
pub(crate) async fn accept(
    config: Arc<rustls::ServerConfig>,
    io: TcpStream,
    send_limit: usize,
) -> io::Result<LeanTls> {
    let conn = UnbufferedServerConnection::new(config).map_err(invalid)?;
    let mut tls = LeanTls {
        io,
        conn,
        incoming: Vec::new(),
        plain: Vec::new(),
        read_at: 0,
        outgoing: Vec::new(),
        sent: 0,
        send_limit,
        peer_closed: false,
        close_queued: false,
        failed: false,
    };
    if let Err(error) = std::future::poll_fn(|cx| tls.poll_handshake(cx)).await {
        // Tell the client why (the alert rustls queued) if the socket
        // takes it at once; the caller closes the connection either way.
        let _ = std::future::poll_fn(|cx| Poll::Ready(tls.poll_send(cx))).await;
        return Err(error);
    }
    Ok(tls)
}

impl LeanTls {
    pub(crate) fn get_ref(&self) -> &TcpStream {
        &self.io
    }

    pub(crate) fn peer_certificates(
        &self,
    ) -> Option<&[rustls::pki_types::CertificateDer<'static>]> {
        self.conn.peer_certificates()
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let driven = self.drive(Want::Nothing)?;
            // The connection is the caller's only once the handshake, and
            // with it the check of the client's certificate, has ended,
            // whatever rustls would let a server write before.
            let done = !self.conn.is_handshaking();
            ready!(self.poll_send(cx))?;
            match driven {
                Driven::Writable(_) if done => return Poll::Ready(Ok(())),
                Driven::Closed => {
                    return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                }
                Driven::Writable(_) | Driven::Blocked => {}
            }
            if ready!(self.poll_fill(cx))? == 0 {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed during the TLS handshake",
                )));
            }
        }
    }

    /// Lets rustls process every whole record received, keeping the
    /// application data and queueing what rustls sends (handshake, key
    /// updates, tickets, alerts), until it needs more ciphertext or lets
    /// us write; then does what `want` asks.
    fn drive(&mut self, want: Want<'_>) -> io::Result<Driven> {
        if self.failed {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the TLS connection failed",
            ));
        }
        let driven = self.process(want);
        if driven.is_err() {
            self.failed = true;
            self.queue_alert();
        }
        driven
    }

    /// After a failure: encodes what rustls queued for the peer (the
    /// fatal alert), to go out with the next send, as tokio-rustls does.
    fn queue_alert(&mut self) {
        for _ in 0..4 {
            let UnbufferedStatus { discard, state } =
                self.conn.process_tls_records(&mut self.incoming);
            let more = match state {
                Ok(ConnectionState::EncodeTlsData(mut data)) => {
                    append(&mut self.outgoing, 64, |buf| encoded(data.encode(buf))).is_ok()
                }
                Ok(ConnectionState::TransmitTlsData(data)) => {
                    data.done();
                    true
                }
                _ => false,
            };
            self.incoming.drain(..discard);
            if !more {
                break;
            }
        }
    }

    fn process(&mut self, mut want: Want<'_>) -> io::Result<Driven> {
        loop {
            let UnbufferedStatus { discard, state } =
                self.conn.process_tls_records(&mut self.incoming);
            let step = match state {
                Err(error) => Err(invalid(error)),
                Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                    let mut step = Ok(None);
                    while let Some(record) = traffic.next_record() {
                        match record {
                            Ok(record) => {
                                // rustls 0.23 decrypts into its own buffer;
                                // a version decrypting in place would ask
                                // for more to be discarded here.
                                debug_assert_eq!(record.discard, 0);
                                if self.read_at == self.plain.len() {
                                    self.plain.clear();
                                    self.read_at = 0;
                                }
                                self.plain.extend_from_slice(record.payload);
                            }
                            Err(error) => {
                                step = Err(invalid(error));
                                break;
                            }
                        }
                    }
                    step
                }
                Ok(ConnectionState::EncodeTlsData(mut data)) => {
                    append(&mut self.outgoing, 1024, |buf| encoded(data.encode(buf))).map(|_| None)
                }
                // Sent by the next `poll_send`, before any later bytes.
                Ok(ConnectionState::TransmitTlsData(data)) => {
                    data.done();
                    Ok(None)
                }
                Ok(ConnectionState::BlockedHandshake) => Ok(Some(Driven::Blocked)),
                Ok(ConnectionState::PeerClosed) => {
                    self.peer_closed = true;
                    Ok(None)
                }
                Ok(ConnectionState::Closed) => {
                    self.peer_closed = true;
                    Ok(Some(Driven::Closed))
                }
                Ok(ConnectionState::WriteTraffic(mut traffic)) => {
                    match std::mem::replace(&mut want, Want::Nothing) {
                        Want::Nothing => Ok(Some(Driven::Writable(0))),
                        Want::Write(data) => {
                            // Bounded by what may wait unsent, so one
                            // large write cannot grow `outgoing` past it.
                            let room = self
                                .send_limit
                                .saturating_sub(self.outgoing.len() - self.sent)
                                .max(READ_SIZE);
                            let data = &data[..data.len().min(room)];
                            append(&mut self.outgoing, sealed_len(data.len()), |buf| {
                                encrypted(traffic.encrypt(data, buf))
                            })
                            .map(|_| Some(Driven::Writable(data.len())))
                        }
                        Want::CloseNotify => append(&mut self.outgoing, 64, |buf| {
                            encrypted(traffic.queue_close_notify(buf))
                        })
                        .map(|_| Some(Driven::Writable(0))),
                    }
                }
                // This server accepts no early data (rustls's default).
                Ok(ConnectionState::ReadEarlyData(_)) => Err(invalid("unexpected early data")),
                Ok(other) => Err(invalid(format!("unexpected TLS state {other:?}"))),
            };
            self.incoming.drain(..discard);
            if let Some(driven) = step? {
                return Ok(driven);
            }
        }
    }

    /// Reads ciphertext into `incoming`; the bytes read (0 at the end).
    /// Waits for the socket first, so a wake-up that finds nothing (an
    /// HTTP/2 ping timer's) allocates nothing.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.incoming.len() >= MAX_INCOMING {
            return Poll::Ready(Err(invalid("TLS message too large")));
        }
        loop {
            ready!(self.io.poll_read_ready(cx))?;
            self.incoming.reserve(READ_SIZE);
            match self.io.try_read_buf(&mut self.incoming) {
                Ok(read) => return Poll::Ready(Ok(read)),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    if self.incoming.is_empty() {
                        // The point of this stream: nothing held while idle.
                        self.incoming = Vec::new();
                    }
                }
                Err(error) => return Poll::Ready(Err(error)),
            }
        }
    }

    /// Sends all queued ciphertext, then frees its buffer.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.outgoing[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.outgoing = Vec::new();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

/// Appends what `write` puts into a buffer to `out`, growing the space
/// offered to the size rustls asks for (`Ok(Err(required))`).
fn append(
    out: &mut Vec<u8>,
    mut room: usize,
    mut write: impl FnMut(&mut [u8]) -> io::Result<Result<usize, usize>>,
) -> io::Result<usize> {
    let start = out.len();
    loop {
        out.resize(start + room, 0);
        match write(&mut out[start..]) {
            Ok(Ok(n)) => {
                out.truncate(start + n);
                return Ok(n);
            }
            Ok(Err(required)) if required > room => room = required,
            Ok(Err(_)) => {
                out.truncate(start);
                return Err(invalid("rustls asked for less room than it was given"));
            }
            Err(error) => {
                out.truncate(start);
                return Err(error);
            }
        }
    }
}

/// Room for `len` bytes of application data once encrypted: each record of
/// up to 16 KiB adds its header and tag, and its content type (TLS 1.3) or
/// explicit nonce (TLS 1.2), under 64 bytes.
fn sealed_len(len: usize) -> usize {
    len + (len / (16 * 1024) + 1) * 64
}

fn encoded(result: Result<usize, EncodeError>) -> io::Result<Result<usize, usize>> {
    match result {
        Ok(n) => Ok(Ok(n)),
        Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
            Ok(Err(required_size))
        }
        Err(error) => Err(invalid(error)),
    }
}

fn encrypted(result: Result<usize, EncryptError>) -> io::Result<Result<usize, usize>> {
    match result {
        Ok(n) => Ok(Ok(n)),
        Err(EncryptError::InsufficientSize(InsufficientSizeError { required_size })) => {
            Ok(Err(required_size))
        }
        Err(error) => Err(io::Error::other(error)),
    }
}

impl AsyncRead for LeanTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.read_at < this.plain.len() {
                let n = buf.remaining().min(this.plain.len() - this.read_at);
                buf.put_slice(&this.plain[this.read_at..this.read_at + n]);
                this.read_at += n;
                if this.read_at == this.plain.len() {
                    this.plain = Vec::new();
                    this.read_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.peer_closed {
                // Whatever follows a close_notify is not data.
                this.incoming = Vec::new();
                return Poll::Ready(Ok(()));
            }
            let driven = match this.drive(Want::Nothing) {
                Ok(driven) => driven,
                Err(error) => {
                    // The alert rustls queued, if the socket takes it now.
                    let _ = this.poll_send(cx);
                    return Poll::Ready(Err(error));
                }
            };
            if this.read_at < this.plain.len() || this.peer_closed {
                continue;
            }
            if matches!(driven, Driven::Closed) {
                continue;
            }
            // What reading made rustls queue (a warning) goes out even if
            // the caller never writes; a full socket only waits. That
            // registers this task for the socket's writability, which is
            // right while one task drives both directions, as hyper does.
            if let Poll::Ready(Err(error)) = this.poll_send(cx) {
                return Poll::Ready(Err(error));
            }
            if ready!(this.poll_fill(cx))? == 0 {
                // As rustls's own stream: an end without close_notify may
                // be a truncation.
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed connection without sending TLS close_notify",
                )));
            }
        }
    }
}

impl AsyncWrite for LeanTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.close_queued {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if this.outgoing.len() - this.sent >= this.send_limit {
            ready!(this.poll_send(cx))?;
        }
        match this.drive(Want::Write(data))? {
            Driven::Writable(n) => Poll::Ready(Ok(n)),
            Driven::Blocked | Driven::Closed => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
    }

    /// h2 hands a frame's header and its data as separate slices; written
    /// one by one, each header would be a TLS record of its own.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut gathered = Vec::new();
        for buf in bufs {
            let room = RECORD_SIZE - gathered.len();
            if room == 0 {
                break;
            }
            if gathered.is_empty() && buf.len() >= RECORD_SIZE {
                return self.poll_write(cx, buf);
            }
            gathered.extend_from_slice(&buf[..buf.len().min(room)]);
        }
        self.poll_write(cx, &gathered)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_queued {
            this.close_queued = true;
            // A connection already closed both ways has nothing to send.
            if let Err(error) = this.drive(Want::CloseNotify) {
                tracing::debug!(%error, "tls close_notify not queued");
            }
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use jobcluster_pki::{CertificateAuthority, Identity, Role, Roots};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio_rustls::client::TlsStream as ClientStream;

    struct Pki {
        server: Arc<rustls::ServerConfig>,
        client: Arc<rustls::ClientConfig>,
        anonymous: Arc<rustls::ClientConfig>,
    }

    fn pki() -> Pki {
        let ca = CertificateAuthority::generate("test ca").unwrap();
        let roots = Roots::from_pem(ca.cert_pem().as_bytes()).unwrap();
        let identity = |role, name| {
            let issued = ca.issue(role, name, &[]).unwrap();
            Identity::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap()
        };
        let server = identity(Role::Scheduler, "scheduler");
        let worker = identity(Role::Worker, "w1");
        Pki {
            server: jobcluster_pki::server_config(&server, &roots, &[b"h2"]).unwrap(),
            client: jobcluster_pki::client_config(&roots, Some(&worker), &[b"h2"]).unwrap(),
            anonymous: jobcluster_pki::client_config(&roots, None, &[b"h2"]).unwrap(),
        }
    }

    /// A listener and a client connected to it through TLS; the server's
    /// side is handshaken by `accept` in a task.
    async fn connect(
        pki: &Pki,
        client: Arc<rustls::ClientConfig>,
        send_limit: usize,
    ) -> (
        io::Result<ClientStream<TcpStream>>,
        tokio::task::JoinHandle<io::Result<LeanTls>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = pki.server.clone();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await?;
            accept(config, tcp, send_limit).await
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let client = tokio_rustls::TlsConnector::from(client)
            .connect(name, tcp)
            .await;
        (client, server)
    }

    /// A client with a worker's certificate and the server's stream,
    /// both handshaken.
    async fn pair(pki: &Pki, send_limit: usize) -> (ClientStream<TcpStream>, LeanTls) {
        let (client, server) = connect(pki, pki.client.clone(), send_limit).await;
        (client.unwrap(), server.await.unwrap().unwrap())
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Polls a read once; what it gave, if it was ready.
    async fn poll_read_once(tls: &mut LeanTls) -> Poll<io::Result<Vec<u8>>> {
        std::future::poll_fn(|cx| {
            let mut space = [0u8; 64];
            let mut buf = ReadBuf::new(&mut space);
            Poll::Ready(
                Pin::new(&mut *tls)
                    .poll_read(cx, &mut buf)
                    .map_ok(|()| buf.filled().to_vec()),
            )
        })
        .await
    }

    /// Data goes both ways in pieces of every size, through a key update
    /// the client asks for (which the server must answer with its own,
    /// queued by rustls and sent by this stream), and ends with
    /// close_notify both ways; a server waiting for more holds no buffer.
    #[tokio::test]
    async fn carries_data_both_ways_through_a_key_update_and_idles_without_buffers() {
        let pki = pki();
        // A small send limit, so writes wait for the socket.
        let (mut client, mut server) = pair(&pki, 20_000).await;
        let leaf = server.peer_certificates().unwrap()[0].clone();
        assert_eq!(jobcluster_pki::peer_identity(&leaf).unwrap().name, "w1");

        let echo = tokio::spawn(async move {
            let mut total = 0;
            let mut buf = vec![0u8; 7_001];
            loop {
                let n = server.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                server.write_all(&buf[..n]).await.unwrap();
                server.flush().await.unwrap();
                total += n;
            }
            server.shutdown().await.unwrap();
            (server, total)
        });

        let mut sent = Vec::new();
        for (round, len) in [1, 100, 16_384, 16_385, 300_000].into_iter().enumerate() {
            if round == 3 {
                client.get_mut().1.refresh_traffic_keys().unwrap();
            }
            let data = pattern(len, round as u8);
            let (mut reader, mut writer) = tokio::io::split(&mut client);
            let mut back = vec![0u8; len];
            let write = async {
                writer.write_all(&data).await.unwrap();
                writer.flush().await.unwrap();
            };
            let read = reader.read_exact(&mut back);
            let ((), read) = tokio::join!(write, read);
            read.unwrap();
            assert!(back == data, "round {round}: the echo differs");
            sent.extend_from_slice(&data);
        }
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        // A clean end: close_notify arrived, so no error.
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        let (mut server, total) = echo.await.unwrap();
        assert_eq!(total, sent.len());

        // After the end: nothing held.
        assert!(
            matches!(poll_read_once(&mut server).await, Poll::Ready(Ok(ref v)) if v.is_empty())
        );
        assert_eq!(
            (
                server.incoming.capacity(),
                server.plain.capacity(),
                server.outgoing.capacity()
            ),
            (0, 0, 0)
        );
    }

    #[tokio::test]
    async fn an_idle_connection_holds_no_buffer() {
        let pki = pki();
        let (mut client, mut server) = pair(&pki, 1 << 20).await;
        client.write_all(&pattern(50_000, 7)).await.unwrap();
        client.flush().await.unwrap();
        let mut got = vec![0u8; 50_000];
        server.read_exact(&mut got).await.unwrap();
        server.write_all(b"ok").await.unwrap();
        server.flush().await.unwrap();
        let mut ok = [0u8; 2];
        client.read_exact(&mut ok).await.unwrap();
        // Nothing more has come: the read waits, holding nothing.
        assert!(poll_read_once(&mut server).await.is_pending());
        assert_eq!(
            (
                server.incoming.capacity(),
                server.plain.capacity(),
                server.outgoing.capacity()
            ),
            (0, 0, 0)
        );
        // And still works after.
        client.write_all(b"again").await.unwrap();
        client.flush().await.unwrap();
        let mut again = [0u8; 5];
        server.read_exact(&mut again).await.unwrap();
        assert_eq!(&again, b"again");
    }

    /// Slices written together (an HTTP/2 frame's header and its data)
    /// arrive whole and in order, whatever their sizes.
    #[tokio::test]
    async fn vectored_writes_arrive_in_order() {
        let pki = pki();
        let (mut client, mut server) = pair(&pki, 1 << 20).await;
        let pieces = [
            pattern(9, 1),
            pattern(20_000, 2),
            pattern(9, 3),
            pattern(1_000, 4),
        ];
        let expected: Vec<u8> = pieces.concat();
        let writer = tokio::spawn(async move {
            let mut done = 0;
            while done < expected.len() {
                // The slices not yet written, the first one cut where the
                // last write stopped.
                let mut skip = done;
                let mut slices = Vec::new();
                for piece in &pieces {
                    if skip >= piece.len() {
                        skip -= piece.len();
                        continue;
                    }
                    slices.push(io::IoSlice::new(&piece[skip..]));
                    skip = 0;
                }
                done += server.write_vectored(&slices).await.unwrap();
            }
            server.flush().await.unwrap();
            (server, expected)
        });
        let mut got = vec![0u8; 21_018];
        client.read_exact(&mut got).await.unwrap();
        let (_server, expected) = writer.await.unwrap();
        assert!(got == expected, "the bytes differ");
    }

    /// A connection cut without close_notify is an error for the reader
    /// (a possible truncation), after the data that did arrive.
    #[tokio::test]
    async fn a_cut_connection_is_an_error_after_its_data() {
        let pki = pki();
        let (mut client, mut server) = pair(&pki, 1 << 20).await;
        client.write_all(b"last words").await.unwrap();
        client.flush().await.unwrap();
        let (mut tcp, _) = client.into_inner();
        tcp.shutdown().await.unwrap();
        let mut got = Vec::new();
        let error = server.read_to_end(&mut got).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof, "{error}");
        assert_eq!(got, b"last words");
    }

    /// A client without a certificate is refused by `accept`, and gets
    /// rustls's alert saying so before the connection closes.
    #[tokio::test]
    async fn a_client_without_a_certificate_is_refused() {
        let pki = pki();
        let (client, server) = connect(&pki, pki.anonymous.clone(), 1 << 20).await;
        let server = server.await.unwrap();
        assert!(server.is_err(), "accepted a client without a certificate");
        // The client is told why (rustls's alert), at its first read at
        // the latest.
        let error = match client {
            Err(error) => error,
            Ok(mut client) => client.read(&mut [0u8; 1]).await.unwrap_err(),
        };
        assert!(
            error.to_string().contains("CertificateRequired"),
            "the client was not told why: {error}"
        );
    }
}
