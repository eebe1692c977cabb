//! Server-side TLS stream whose buffers are released while the connection is idle.
//!
//! rustls' buffered `ServerConnection` (what `tokio_rustls` wraps) keeps a 4 KiB receive
//! buffer for the whole life of each connection, which makes up a large part of the
//! memory of idle WebSocket connections. [`ServerTlsStream`] drives rustls' unbuffered
//! API instead and owns its buffers: received TLS bytes, decrypted bytes the reader has
//! not taken yet, and TLS bytes not yet written each live in a `Vec` that is freed as
//! soon as it is empty, so an idle connection holds no buffer at all.
//!
//! It behaves like `tokio_rustls::server::TlsStream` where hyper can tell: reading
//! gives EOF after the client's close_notify and `UnexpectedEof` after a TCP close
//! without one; `poll_shutdown` sends close_notify. Reads and writes are meant to be
//! polled from one task, as hyper does. Early data (0-RTT) is not supported: the
//! server config must leave `max_early_data_size` at 0 (the default).

use std::future::poll_fn;
use std::io;
use std::mem;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{
    AppDataRecord, ConnectionState, EncodeError, EncryptError, InsufficientSizeError,
    UnbufferedStatus,
};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes read from the socket at a time when no record is pending.
const READ_CHUNK: usize = 4096;
/// TLS record header: type, version, length.
const RECORD_HEADER: usize = 5;
/// The largest record rustls accepts: 16 KiB of data plus 2 KiB of expansion.
const MAX_RECORD: usize = RECORD_HEADER + 16_384 + 2048;
/// While handshaking, rustls keeps the records of a handshake message (at most 64 KiB)
/// in the receive buffer until the message is complete.
const MAX_HANDSHAKE_BUFFER: usize = 0xffff + MAX_RECORD;
/// Above this many unsent bytes, writes wait for the socket.
const WRITE_HIGH_WATER: usize = 64 * 1024;
/// Above this many unsent bytes, reads wait for the socket too: only replies a client
/// provokes without reading them (key updates) can push `outgoing` this far.
const MAX_UNSENT: usize = 4 * WRITE_HIGH_WATER;
/// Most plaintext bytes encrypted per `poll_write`.
const MAX_WRITE_CHUNK: usize = 64 * 1024;
/// A generous guess of the bytes TLS adds to each record (header, nonce, tag).
const RECORD_OVERHEAD_GUESS: usize = 64;
/// Plaintext bytes per record.
const MAX_FRAGMENT: usize = 16_384;

const UNEXPECTED_EOF: &str = "peer closed connection without sending TLS close_notify";

/// What the reading side has seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadState {
    Open,
    /// close_notify received: clean EOF.
    PeerClosed,
    /// TCP EOF without close_notify.
    Truncated,
}

/// What [`ServerTlsStream::run`] does once rustls allows application data.
#[derive(Debug, Clone, Copy)]
enum Action<'a> {
    Nothing,
    Encrypt(&'a [u8]),
    CloseNotify,
}

enum Step {
    Continue,
    /// rustls needs more input; `true` when application data may be sent.
    Settled(bool),
    Fail(io::Error),
}

/// A server-side TLS connection over `IO` that allocates buffers only while data is
/// in flight. See the module documentation.
pub struct ServerTlsStream<IO> {
    io: IO,
    conn: UnbufferedServerConnection,
    /// TLS bytes received and not yet consumed by rustls: after the handshake, at most
    /// one partial record.
    incoming: Vec<u8>,
    /// Decrypted bytes the reader has not taken yet.
    plaintext: Vec<u8>,
    /// TLS bytes not yet written to `io`.
    outgoing: Vec<u8>,
    read: ReadState,
    close_notify_queued: bool,
    /// rustls reported a fatal error: it must not be fed again.
    failed: bool,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> ServerTlsStream<IO> {
    /// Runs the TLS handshake on `io` to completion (ready for application data).
    ///
    /// No timeout here: callers bound the time a client may take.
    pub async fn accept(io: IO, config: Arc<ServerConfig>) -> io::Result<Self> {
        let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
        let mut stream = ServerTlsStream {
            io,
            conn,
            incoming: Vec::new(),
            plaintext: Vec::new(),
            outgoing: Vec::new(),
            read: ReadState::Open,
            close_notify_queued: false,
            failed: false,
        };
        poll_fn(|cx| stream.poll_handshake(cx)).await?;
        Ok(stream)
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if let Err(e) = self.run(None, Action::Nothing) {
                return Poll::Ready(Err(self.fail(cx, e)));
            }
            // Our flight goes out before we wait for the client's next one.
            ready!(self.poll_write_out(cx))?;
            if !self.conn.is_handshaking() {
                return Poll::Ready(Ok(()));
            }
            if self.read != ReadState::Open {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "TLS handshake ended by the client",
                )));
            }
            if ready!(self.poll_fill(cx))? == 0 {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "TLS handshake EOF",
                )));
            }
        }
    }

    /// Reads more TLS bytes from `io` into `incoming`; `Ok(0)` is EOF.
    ///
    /// With nothing pending, the read goes to the stack first, so a connection that
    /// wakes up without data allocates nothing.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let limit = if self.conn.is_handshaking() {
            MAX_HANDSHAKE_BUFFER
        } else {
            MAX_RECORD
        };
        let have = self.incoming.len();
        if have >= limit {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "TLS record too large",
            )));
        }
        if have == 0 {
            let mut chunk = [0u8; READ_CHUNK];
            let mut buf = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
            self.incoming.extend_from_slice(buf.filled());
            return Poll::Ready(Ok(buf.filled().len()));
        }
        // Read the rest of the pending record in one go when it is larger than a chunk.
        let rest_of_record = record_len(&self.incoming).map_or(0, |len| len.saturating_sub(have));
        let want = READ_CHUNK.max(rest_of_record).min(limit - have);
        self.incoming.resize(have + want, 0);
        let mut buf = ReadBuf::new(&mut self.incoming[have..]);
        let res = Pin::new(&mut self.io).poll_read(cx, &mut buf);
        let n = match res {
            Poll::Ready(Ok(())) => buf.filled().len(),
            _ => 0,
        };
        self.incoming.truncate(have + n);
        match res {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(n)),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Writes `outgoing` to `io` until it is empty (then frees it) or `io` would block.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.outgoing.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.outgoing))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.outgoing.drain(..n.min(self.outgoing.len()));
        }
        self.outgoing = Vec::new();
        Poll::Ready(Ok(()))
    }

    /// Tries once to send what rustls queued on a fatal error (an alert telling the
    /// client why), then hands the error back.
    fn fail(&mut self, cx: &mut Context<'_>, err: io::Error) -> io::Error {
        let _ = self.poll_write_out(cx);
        err
    }
}

impl<IO> ServerTlsStream<IO> {
    /// The protocol agreed by ALPN, if any.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }

    /// The underlying transport.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// Bytes allocated for this connection's buffers (received, decrypted, unsent);
    /// 0 whenever the connection is idle.
    pub fn buffered_capacity(&self) -> usize {
        self.incoming.capacity() + self.plaintext.capacity() + self.outgoing.capacity()
    }

    /// Feeds `incoming` to rustls until it needs more input: decrypted data goes to
    /// `dst` and then to `plaintext`, anything rustls wants to send (handshake,
    /// session tickets, key updates, alerts) to `outgoing`. Once application data may
    /// be sent, performs `action`. Returns whether that point was reached.
    fn run(&mut self, mut dst: Option<&mut ReadBuf<'_>>, action: Action<'_>) -> io::Result<bool> {
        if self.failed {
            return Err(invalid("TLS connection failed earlier"));
        }
        let mut incoming = mem::take(&mut self.incoming);
        let result = loop {
            let UnbufferedStatus { mut discard, state } =
                self.conn.process_tls_records(&mut incoming);
            let step = match state {
                Err(e) => Step::Fail(tls_error(e)),
                Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                    let mut step = Step::Continue;
                    while let Some(record) = traffic.next_record() {
                        match record {
                            Ok(AppDataRecord {
                                discard: more,
                                payload,
                            }) => {
                                discard += more;
                                deliver(dst.as_deref_mut(), &mut self.plaintext, payload);
                            }
                            Err(e) => {
                                step = Step::Fail(tls_error(e));
                                break;
                            }
                        }
                    }
                    step
                }
                Ok(ConnectionState::EncodeTlsData(mut data)) => {
                    match append(&mut self.outgoing, 0, |out| {
                        data.encode(out).map_err(encode_error)
                    }) {
                        Ok(()) => Step::Continue,
                        Err(e) => Step::Fail(e),
                    }
                }
                Ok(ConnectionState::TransmitTlsData(transmit)) => {
                    // The bytes sit in `outgoing`, ahead of anything encrypted later;
                    // whichever poll runs next writes them.
                    transmit.done();
                    Step::Continue
                }
                Ok(ConnectionState::PeerClosed) => {
                    self.read = ReadState::PeerClosed;
                    Step::Continue
                }
                Ok(ConnectionState::Closed) => {
                    self.read = ReadState::PeerClosed;
                    Step::Settled(false)
                }
                Ok(ConnectionState::BlockedHandshake) => Step::Settled(false),
                Ok(ConnectionState::WriteTraffic(mut traffic)) => {
                    let res = match action {
                        Action::Nothing => Ok(()),
                        Action::Encrypt(data) => {
                            let records = data.len().div_ceil(MAX_FRAGMENT);
                            let guess = data.len() + (records + 1) * RECORD_OVERHEAD_GUESS;
                            append(&mut self.outgoing, guess, |out| {
                                traffic.encrypt(data, out).map_err(encrypt_error)
                            })
                        }
                        Action::CloseNotify => {
                            append(&mut self.outgoing, RECORD_OVERHEAD_GUESS, |out| {
                                traffic.queue_close_notify(out).map_err(encrypt_error)
                            })
                        }
                    };
                    match res {
                        Ok(()) => Step::Settled(true),
                        Err(e) => Step::Fail(e),
                    }
                }
                Ok(ConnectionState::ReadEarlyData(_)) => {
                    Step::Fail(invalid("TLS early data is not supported"))
                }
                Ok(_) => Step::Fail(invalid("unexpected TLS connection state")),
            };
            incoming.drain(..discard.min(incoming.len()));
            match step {
                Step::Continue => {}
                Step::Settled(writable) => break Ok(writable),
                Step::Fail(e) => {
                    self.failed = true;
                    self.queue_alert(&mut incoming);
                    break Err(e);
                }
            }
        };
        // rustls reads nothing more after an error or close_notify; otherwise it must
        // see the unconsumed bytes again (an empty buffer is freed here).
        if result.is_ok() && self.read != ReadState::PeerClosed && !incoming.is_empty() {
            self.incoming = incoming;
        }
        result
    }

    /// After a fatal error, moves the alert rustls queued into `outgoing`.
    fn queue_alert(&mut self, incoming: &mut Vec<u8>) {
        // Only while rustls has records queued: it then hands them out before looking
        // at `incoming` again (which would fail anew). The bound guards against surprises.
        for _ in 0..16 {
            if !self.conn.wants_write() {
                break;
            }
            let UnbufferedStatus { discard, state } = self.conn.process_tls_records(incoming);
            let more = match state {
                Ok(ConnectionState::EncodeTlsData(mut data)) => {
                    append(&mut self.outgoing, 0, |out| {
                        data.encode(out).map_err(encode_error)
                    })
                    .is_ok()
                }
                _ => false,
            };
            incoming.drain(..discard.min(incoming.len()));
            if !more {
                break;
            }
        }
    }

    /// Moves pending decrypted bytes to `buf`; frees the buffer once drained.
    fn take_plaintext(&mut self, buf: &mut ReadBuf<'_>) {
        let n = buf.remaining().min(self.plaintext.len());
        buf.put_slice(&self.plaintext[..n]);
        if n == self.plaintext.len() {
            self.plaintext = Vec::new();
        } else {
            self.plaintext.drain(..n);
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for ServerTlsStream<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if !this.plaintext.is_empty() {
            this.take_plaintext(buf);
            return Poll::Ready(Ok(()));
        }
        loop {
            match this.read {
                ReadState::Open => {}
                ReadState::PeerClosed => return Poll::Ready(Ok(())),
                ReadState::Truncated => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        UNEXPECTED_EOF,
                    )))
                }
            }
            let before = buf.filled().len();
            if let Err(e) = this.run(Some(buf), Action::Nothing) {
                return Poll::Ready(Err(this.fail(cx, e)));
            }
            // Replies rustls produced while reading (key updates, alerts) go out now
            // rather than waiting for the caller's next write.
            let write_blocked = match this.poll_write_out(cx) {
                Poll::Ready(Ok(())) => false,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => true,
            };
            if buf.filled().len() > before {
                return Poll::Ready(Ok(()));
            }
            if this.read != ReadState::Open {
                continue;
            }
            if write_blocked && this.outgoing.len() > MAX_UNSENT {
                return Poll::Pending;
            }
            if ready!(this.poll_fill(cx))? == 0 {
                this.read = ReadState::Truncated;
            }
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ServerTlsStream<IO> {
    /// Encrypts up to 64 KiB of `buf` and starts sending it; waits for the socket only
    /// when more than 64 KiB are still unsent.
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.close_notify_queued {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "TLS stream already shut down",
            )));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        match this.poll_write_out(cx) {
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending if this.outgoing.len() >= WRITE_HIGH_WATER => return Poll::Pending,
            _ => {}
        }
        let n = buf.len().min(MAX_WRITE_CHUNK);
        match this.run(None, Action::Encrypt(&buf[..n])) {
            Ok(true) => {}
            Ok(false) => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "TLS connection closed",
                )))
            }
            Err(e) => return Poll::Ready(Err(this.fail(cx, e))),
        }
        if let Poll::Ready(Err(e)) = this.poll_write_out(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_out(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    /// Sends close_notify (once), flushes, then shuts down the transport's sending side.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_notify_queued {
            this.close_notify_queued = true;
            // A connection that already failed has nothing valid to send: just close.
            let _ = this.run(None, Action::CloseNotify);
        }
        ready!(this.poll_write_out(cx))?;
        match ready!(Pin::new(&mut this.io).poll_shutdown(cx)) {
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Poll::Ready(Ok(())),
            res => Poll::Ready(res),
        }
    }
}

/// What an encoder that did not fit asks for.
enum Grow {
    To(usize),
    Fail(io::Error),
}

/// Appends what `write` produces to `out`, trying `guess` bytes of room first and then
/// the size `write` reports it needs.
fn append(
    out: &mut Vec<u8>,
    guess: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, Grow>,
) -> io::Result<()> {
    let start = out.len();
    let mut room = guess;
    for _ in 0..3 {
        out.resize(start + room, 0);
        match write(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n.min(room));
                return Ok(());
            }
            Err(Grow::To(required)) if required > room => room = required,
            Err(Grow::To(_)) => break,
            Err(Grow::Fail(e)) => {
                out.truncate(start);
                return Err(e);
            }
        }
    }
    out.truncate(start);
    Err(invalid("TLS output buffer sizing failed"))
}

fn encode_error(e: EncodeError) -> Grow {
    match e {
        EncodeError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Grow::To(required_size)
        }
        EncodeError::AlreadyEncoded => Grow::Fail(invalid("TLS data encoded twice")),
    }
}

fn encrypt_error(e: EncryptError) -> Grow {
    match e {
        EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Grow::To(required_size)
        }
        EncryptError::EncryptExhausted => Grow::Fail(invalid("TLS encryption keys exhausted")),
    }
}

/// Gives `payload` to the reader's buffer as far as it fits, keeps the rest.
fn deliver(dst: Option<&mut ReadBuf<'_>>, pending: &mut Vec<u8>, payload: &[u8]) {
    let mut rest = payload;
    if let Some(dst) = dst {
        let n = dst.remaining().min(rest.len());
        dst.put_slice(&rest[..n]);
        rest = &rest[n..];
    }
    if !rest.is_empty() {
        pending.extend_from_slice(rest);
    }
}

/// Length on the wire of the record starting `buf`, once its header is complete.
fn record_len(buf: &[u8]) -> Option<usize> {
    match buf.get(3..RECORD_HEADER) {
        Some(&[hi, lo]) => Some(RECORD_HEADER + usize::from(u16::from_be_bytes([hi, lo]))),
        _ => None,
    }
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn invalid(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use rustls::version::{TLS12, TLS13};
    use rustls::{ClientConfig, RootCertStore, SupportedProtocolVersion};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::watch;
    use tokio::time::timeout;
    use tokio_rustls::client::TlsStream as ClientTls;
    use tokio_rustls::TlsConnector;

    use super::*;

    const LIMIT: Duration = Duration::from_secs(30);

    struct Certs {
        cert: CertificateDer<'static>,
        server: Arc<ServerConfig>,
    }

    fn certs() -> Certs {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let cert = ck.cert.der().clone();
        let key = PrivateKeyDer::from(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut sc = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        sc.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Certs {
            cert,
            server: Arc::new(sc),
        }
    }

    fn client_config(
        certs: &Certs,
        version: &'static SupportedProtocolVersion,
        alpn: &[&[u8]],
    ) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(certs.cert.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cc = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cc.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(cc)
    }

    /// A handshaken server stream and a tokio-rustls client over loopback TCP.
    async fn pair(
        certs: &Certs,
        client: Arc<ClientConfig>,
    ) -> (ServerTlsStream<TcpStream>, ClientTls<TcpStream>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server_config = certs.server.clone();
        let server = async move {
            let (tcp, _) = listener.accept().await.unwrap();
            ServerTlsStream::accept(tcp, server_config).await.unwrap()
        };
        let client = async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = ServerName::try_from("localhost").unwrap();
            TlsConnector::from(client).connect(name, tcp).await.unwrap()
        };
        timeout(LIMIT, async { tokio::join!(server, client) })
            .await
            .unwrap()
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// Echoes until EOF, shuts down, and reports the buffers left allocated.
    async fn echo(mut server: ServerTlsStream<TcpStream>) -> io::Result<usize> {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = server.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            server.write_all(&buf[..n]).await?;
            server.flush().await?;
        }
        server.shutdown().await?;
        Ok(server.buffered_capacity())
    }

    async fn echo_both_ways(version: &'static SupportedProtocolVersion) {
        let certs = certs();
        let (server, mut client) = pair(&certs, client_config(&certs, version, &[])).await;
        assert_eq!(client.get_ref().1.protocol_version(), Some(version.version));
        let echo = tokio::spawn(echo(server));
        timeout(LIMIT, async {
            client.write_all(b"hello").await.unwrap();
            client.flush().await.unwrap();
            let mut small = [0u8; 5];
            client.read_exact(&mut small).await.unwrap();
            assert_eq!(&small, b"hello");

            // 1 MiB (many records) written while the echo comes back.
            let big = pattern(1 << 20);
            let (mut rd, mut wr) = tokio::io::split(client);
            let sent = big.clone();
            let writer = tokio::spawn(async move {
                wr.write_all(&sent).await.unwrap();
                wr.flush().await.unwrap();
                wr
            });
            let mut got = vec![0u8; big.len()];
            rd.read_exact(&mut got).await.unwrap();
            assert!(got == big, "1 MiB echo differs");
            let mut client = rd.unsplit(writer.await.unwrap());

            if version.version == rustls::ProtocolVersion::TLSv1_3 {
                // A key update from the client: the server answers with its own.
                client.get_mut().1.refresh_traffic_keys().unwrap();
                let msg = pattern(40_000);
                client.write_all(&msg).await.unwrap();
                client.flush().await.unwrap();
                let mut got = vec![0u8; msg.len()];
                client.read_exact(&mut got).await.unwrap();
                assert!(got == msg, "echo after key update differs");
            }

            client.shutdown().await.unwrap();
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
            assert_eq!(echo.await.unwrap().unwrap(), 0);
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn echo_tls13() {
        echo_both_ways(&TLS13).await;
    }

    #[tokio::test]
    async fn echo_tls12() {
        echo_both_ways(&TLS12).await;
    }

    #[tokio::test]
    async fn alpn_picks_h2_when_offered() {
        let certs = certs();
        let cc = client_config(&certs, &TLS13, &[b"h2", b"http/1.1"]);
        let (server, client) = pair(&certs, cc).await;
        assert_eq!(server.alpn_protocol(), Some(&b"h2"[..]));
        assert_eq!(client.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (server, _client) = pair(&certs, client_config(&certs, &TLS12, &[b"http/1.1"])).await;
        assert_eq!(server.alpn_protocol(), Some(&b"http/1.1"[..]));
        let (server, _client) = pair(&certs, client_config(&certs, &TLS13, &[])).await;
        assert_eq!(server.alpn_protocol(), None);
    }

    #[tokio::test]
    async fn close_notify_gives_eof_both_ways() {
        let certs = certs();
        let (mut server, mut client) = pair(&certs, client_config(&certs, &TLS13, &[])).await;
        timeout(LIMIT, async {
            client.write_all(b"bye").await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"bye");
            // EOF stays EOF.
            assert_eq!(server.read(&mut [0u8; 8]).await.unwrap(), 0);

            // Half-closed: the server can still answer, then close.
            server.write_all(b"still here").await.unwrap();
            server.shutdown().await.unwrap();
            assert!(server.write_all(b"late").await.is_err());
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"still here");
            assert_eq!(server.buffered_capacity(), 0);
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn tcp_eof_without_close_notify_is_unexpected_eof() {
        let certs = certs();
        let (mut server, mut client) = pair(&certs, client_config(&certs, &TLS13, &[])).await;
        timeout(LIMIT, async {
            client.write_all(b"partial").await.unwrap();
            client.flush().await.unwrap();
            // FIN on the TCP stream, no close_notify.
            client.get_mut().0.shutdown().await.unwrap();
            let mut buf = [0u8; 7];
            server.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"partial");
            let err = server.read(&mut buf).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn garbage_instead_of_client_hello_fails_with_an_alert() {
        let certs = certs();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let res = timeout(LIMIT, ServerTlsStream::accept(tcp, certs.server.clone()))
            .await
            .unwrap();
        let err = res.err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        // The client is told why: a plaintext alert record.
        let mut alert = Vec::new();
        timeout(LIMIT, client.read_to_end(&mut alert))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(alert.first(), Some(&0x15), "{alert:?}");

        // A client that goes away mid-handshake.
        let client = TcpStream::connect(addr).await.unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        drop(client);
        let res = timeout(LIMIT, ServerTlsStream::accept(tcp, certs.server.clone()))
            .await
            .unwrap();
        assert!(res.is_err());
    }

    #[tokio::test]
    async fn idle_connection_holds_no_buffers() {
        let certs = certs();
        let (mut server, mut client) = pair(&certs, client_config(&certs, &TLS13, &[])).await;
        timeout(LIMIT, async {
            assert_eq!(server.buffered_capacity(), 0);

            // What the reader cannot take yet waits in the plaintext buffer...
            let msg = pattern(1000);
            client.write_all(&msg).await.unwrap();
            client.flush().await.unwrap();
            let mut first = [0u8; 100];
            let n = server.read(&mut first).await.unwrap();
            assert_eq!(n, 100);
            assert!(server.buffered_capacity() >= 900);
            let mut rest = vec![0u8; 900];
            server.read_exact(&mut rest).await.unwrap();
            assert_eq!([&first[..], &rest[..]].concat(), msg);
            // ...and is freed once taken.
            assert_eq!(server.buffered_capacity(), 0);

            // Large exchange both ways, then idle again.
            let big = pattern(300_000);
            let sent = big.clone();
            let client_side = async {
                client.write_all(&sent).await.unwrap();
                client.flush().await.unwrap();
                let mut got = vec![0u8; 300_000];
                client.read_exact(&mut got).await.unwrap();
                got
            };
            let server_side = async {
                let mut got = vec![0u8; 300_000];
                server.read_exact(&mut got).await.unwrap();
                server.write_all(&got).await.unwrap();
                server.flush().await.unwrap();
                got
            };
            let (at_client, at_server) = tokio::join!(client_side, server_side);
            assert!(at_client == big && at_server == big);
            assert_eq!(server.buffered_capacity(), 0);
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn writes_wait_for_a_slow_reader() {
        let certs = certs();
        let (mut server, mut client) = pair(&certs, client_config(&certs, &TLS13, &[])).await;
        timeout(LIMIT, async {
            let total = 8 << 20;
            // Told when a write first has to wait (the socket buffers are full).
            let (blocked_tx, blocked) = tokio::sync::oneshot::channel::<()>();
            let writer = tokio::spawn(async move {
                let chunk = pattern(100_000);
                let mut blocked_tx = Some(blocked_tx);
                let mut sent = 0;
                let mut peak = 0;
                while sent < total {
                    let write = server.write(&chunk[..chunk.len().min(total - sent)]);
                    let mut write = std::pin::pin!(write);
                    let n = match futures_util::poll!(write.as_mut()) {
                        std::task::Poll::Ready(n) => n.unwrap(),
                        std::task::Poll::Pending => {
                            if let Some(tx) = blocked_tx.take() {
                                let _ = tx.send(());
                            }
                            write.await.unwrap()
                        }
                    };
                    sent += n;
                    peak = peak.max(server.buffered_capacity());
                }
                server.shutdown().await.unwrap();
                (peak, server.buffered_capacity())
            });
            // 8 MiB do not fit in the socket buffers of a reader that has not read yet:
            // a write must wait. Read only from then on.
            blocked.await.expect("a write waited for the reader");
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            assert_eq!(got.len(), total);
            let (peak, left) = writer.await.unwrap();
            // High water plus one chunk, with room for the Vec's growth; not 8 MiB.
            assert!(
                peak <= 2 * (WRITE_HIGH_WATER + MAX_WRITE_CHUNK) + 4096,
                "peak {peak}"
            );
            assert_eq!(left, 0);
        })
        .await
        .unwrap();
    }

    /// A TCP relay that passes client bytes on `step` at a time and stops once it has
    /// passed `allowed` of them (server bytes pass freely). Returns its address, the
    /// allowance and the count passed so far (to wait on).
    async fn trickle_proxy(
        server: SocketAddr,
        step: usize,
    ) -> (SocketAddr, watch::Sender<usize>, watch::Receiver<usize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (allow_tx, mut allow_rx) = watch::channel(usize::MAX);
        let (counter, passed) = watch::channel(0usize);
        tokio::spawn(async move {
            let (client, _) = listener.accept().await.unwrap();
            let upstream = TcpStream::connect(server).await.unwrap();
            client.set_nodelay(true).unwrap();
            upstream.set_nodelay(true).unwrap();
            let (mut from_client, mut to_client) = client.into_split();
            let (mut from_server, mut to_server) = upstream.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
            });
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match from_client.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let mut rest = &buf[..n];
                while !rest.is_empty() {
                    let done = *counter.borrow();
                    let allowed = match allow_rx.wait_for(|allowed| *allowed > done).await {
                        Ok(allowed) => *allowed,
                        Err(_) => return,
                    };
                    let len = step.min(allowed - done).min(rest.len());
                    to_server.write_all(&rest[..len]).await.unwrap();
                    counter.send_modify(|n| *n += len);
                    rest = &rest[len..];
                }
            }
            let _ = to_server.shutdown().await;
        });
        (addr, allow_tx, passed)
    }

    #[tokio::test]
    async fn records_in_small_pieces_and_a_partial_record() {
        let certs = certs();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server_addr = listener.local_addr().unwrap();
        let (proxy, allow, mut passed) = trickle_proxy(server_addr, 3).await;
        let config = certs.server.clone();
        let cc = client_config(&certs, &TLS13, &[]);
        timeout(LIMIT, async {
            let server = async {
                let (tcp, _) = listener.accept().await.unwrap();
                ServerTlsStream::accept(tcp, config).await.unwrap()
            };
            let client = async {
                let tcp = TcpStream::connect(proxy).await.unwrap();
                let name = ServerName::try_from("localhost").unwrap();
                TlsConnector::from(cc).connect(name, tcp).await.unwrap()
            };
            let (mut server, mut client) = tokio::join!(server, client);

            // Two records (16 KiB and the rest), the first held back after 100 bytes.
            let stop = *passed.borrow() + 100;
            allow.send(stop).unwrap();
            let msg = pattern(20_000);
            client.write_all(&msg).await.unwrap();
            client.flush().await.unwrap();
            passed.wait_for(|n| *n >= stop).await.unwrap();
            let mut got = vec![0u8; msg.len()];
            let early = timeout(Duration::from_millis(200), server.read(&mut got)).await;
            assert!(early.is_err(), "no complete record yet: {early:?}");
            let held = server.buffered_capacity();
            assert!((100..=MAX_RECORD).contains(&held), "held {held}");

            allow.send(usize::MAX).unwrap();
            server.read_exact(&mut got).await.unwrap();
            assert!(got == msg);
            assert_eq!(server.buffered_capacity(), 0);
            server.write_all(b"ok").await.unwrap();
            server.flush().await.unwrap();
            let mut ok = [0u8; 2];
            client.read_exact(&mut ok).await.unwrap();
            assert_eq!(&ok, b"ok");
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn websocket_upgrade_through_hyper() {
        use axum::extract::ws::{Message as AxMessage, WebSocketUpgrade};
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;

        let certs = certs();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = certs.server.clone();
        let app = axum::Router::new().route(
            "/ws",
            axum::routing::any(|ws: WebSocketUpgrade| async move {
                ws.on_upgrade(|mut socket| async move {
                    while let Some(Ok(msg)) = socket.recv().await {
                        if matches!(msg, AxMessage::Close(_)) || socket.send(msg).await.is_err() {
                            break;
                        }
                    }
                })
            }),
        );
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let tls = ServerTlsStream::accept(tcp, config).await.unwrap();
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(
                    TokioIo::new(tls),
                    hyper_util::service::TowerToHyperService::new(app),
                )
                .await;
        });
        timeout(LIMIT, async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let connector =
                tokio_tungstenite::Connector::Rustls(client_config(&certs, &TLS13, &[b"http/1.1"]));
            let url = format!("wss://localhost:{}/ws", addr.port());
            let (mut ws, _) =
                tokio_tungstenite::client_async_tls_with_config(url, tcp, None, Some(connector))
                    .await
                    .unwrap();
            ws.send(Message::Text("hello".into())).await.unwrap();
            assert_eq!(
                ws.next().await.unwrap().unwrap(),
                Message::Text("hello".into())
            );
            let big = Bytes::from(pattern(200_000));
            ws.send(Message::Binary(big.clone())).await.unwrap();
            assert_eq!(ws.next().await.unwrap().unwrap(), Message::Binary(big));
            ws.close(None).await.unwrap();
        })
        .await
        .unwrap();
    }

    /// Serves each connection with hyper (HTTP/1.1 or HTTP/2 by ALPN); the answer names
    /// the version and the size of the request body.
    async fn hyper_server(certs: &Certs) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = certs.server.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let config = config.clone();
                tokio::spawn(async move {
                    let tls = ServerTlsStream::accept(tcp, config).await.unwrap();
                    let service = hyper::service::service_fn(
                        |req: hyper::Request<hyper::body::Incoming>| async move {
                            let version = req.version();
                            let body = req.into_body().collect().await?.to_bytes();
                            let answer = format!("{version:?} {}", body.len());
                            Ok::<_, hyper::Error>(hyper::Response::new(Full::new(Bytes::from(
                                answer,
                            ))))
                        },
                    );
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        addr
    }

    async fn fetch_over_hyper(http1_only: bool) {
        let certs = certs();
        let addr = hyper_server(&certs).await;
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_der(certs.cert.as_ref()).unwrap())
            .resolve("localhost", addr);
        if http1_only {
            builder = builder.http1_only();
        }
        let client = builder.build().unwrap();
        let (version, name) = if http1_only {
            (reqwest::Version::HTTP_11, "HTTP/1.1")
        } else {
            (reqwest::Version::HTTP_2, "HTTP/2.0")
        };
        let url = format!("https://localhost:{}/", addr.port());
        timeout(LIMIT, async {
            for body_len in [0, 300_000] {
                let resp = client
                    .post(&url)
                    .body(pattern(body_len))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.version(), version);
                assert_eq!(resp.text().await.unwrap(), format!("{name} {body_len}"));
            }
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn hyper_http1() {
        fetch_over_hyper(true).await;
    }

    #[tokio::test]
    async fn hyper_http2() {
        fetch_over_hyper(false).await;
    }
}
