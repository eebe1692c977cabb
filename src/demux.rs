//! One port for HTTPS and TURN: what a connection on the HTTPS listener speaks, decided
//! from its first bytes.
//!
//! Networks that let out only TCP 443 need TURN there, and browsers send no ALPN on
//! `turns:` connections, so an ALPN split alone cannot tell TURN over TLS from HTTPS.
//! The listener therefore decides twice:
//!
//! 1. **Before TLS**, from the first bytes on the socket, read with `MSG_PEEK` (nothing
//!    is consumed and nothing buffered): a TLS record (0x16) goes on to the TLS
//!    handshake; a STUN message (top two bits 00, magic cookie at offset 4) or a
//!    ChannelData frame (first byte 0x40-0x4F, unless the bytes spell an HTTP method
//!    such as `GET `) is TURN over plain TCP; anything else (plain HTTP on the HTTPS
//!    port, garbage) gets a short 400 answer and is closed.
//! 2. **After the handshake**: ALPN `stun.turn` or `stun.nat-discovery` (RFC 7443) is
//!    TURN over TLS; `h2` or `http/1.1` is HTTP; no ALPN is decided by the first
//!    decrypted bytes (STUN or ChannelData: TURN; anything else: HTTP), which are kept
//!    in a [`Prefixed`] stream (at most [`SNIFF_BYTES`]) and handed on with it.
//!
//! A connection that has not sent enough to decide within [`CLASSIFY_TIMEOUT`] is
//! closed and counted. Each connection is classified in its own task, so a slow one
//! holds up nobody else.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// How long a connection may take to send the bytes that decide what it speaks.
pub const CLASSIFY_TIMEOUT: Duration = Duration::from_secs(5);
/// The most bytes classification needs: a STUN header up to the magic cookie.
pub const SNIFF_BYTES: usize = 8;
/// The STUN magic cookie (RFC 8489 section 5).
const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];

/// ALPN ids offered on the HTTPS listener (the TURN ids first: see `tls`).
pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP11: &[u8] = b"http/1.1";
/// RFC 7443: TURN and STUN over (D)TLS.
pub const ALPN_TURN: &[u8] = b"stun.turn";
pub const ALPN_STUN: &[u8] = b"stun.nat-discovery";
/// RFC 8737: an ACME CA validating a TLS-ALPN-01 challenge. Neither HTTP nor TURN:
/// the HTTPS listener closes such a connection right after its handshake.
pub const ALPN_ACME_TLS: &[u8] = b"acme-tls/1";

/// What the first bytes of a connection (or of its decrypted stream) are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A TLS record: only meaningful before TLS.
    Tls,
    /// STUN or ChannelData: TURN.
    Turn,
    /// Anything else.
    Other,
}

/// HTTP methods whose first byte (0x43-0x50) is also a ChannelData channel number's:
/// a stream that spells one of these, with its space, is HTTP.
const HTTP_METHODS: [&[u8]; 5] = [b"GET ", b"HEAD ", b"DELETE ", b"OPTIONS ", b"CONNECT "];

/// Decides from a prefix of the stream, or `None` when more bytes are needed.
/// `tls_possible` is false for decrypted bytes (a 0x16 there is not a TLS record).
///
/// A first byte of 0x40-0x4F is a ChannelData channel number, but also an ASCII
/// capital (`GET`, `HEAD`, `OPTIONS`, ...): those are HTTP when the prefix spells an
/// HTTP method and its space, TURN otherwise. (A TURN client's first frame on a new
/// connection is a STUN request in practice; plain HTTP sent to the HTTPS port gets
/// its 400 this way.)
pub fn classify(prefix: &[u8], tls_possible: bool) -> Option<Kind> {
    let first = *prefix.first()?;
    if tls_possible && first == 0x16 {
        return Some(Kind::Tls);
    }
    if (0x40..=0x4f).contains(&first) {
        let mut undecided = false;
        for m in HTTP_METHODS {
            let n = prefix.len().min(m.len());
            if prefix[..n] == m[..n] {
                if n == m.len() {
                    return Some(Kind::Other);
                }
                undecided = true;
            }
        }
        return if undecided { None } else { Some(Kind::Turn) };
    }
    if first & 0xc0 != 0 {
        return Some(Kind::Other);
    }
    // Could be STUN: the magic cookie decides.
    for (i, want) in MAGIC_COOKIE.iter().enumerate() {
        match prefix.get(4 + i) {
            None => return None,
            Some(b) if b != want => return Some(Kind::Other),
            Some(_) => {}
        }
    }
    Some(Kind::Turn)
}

/// What a TLS connection is after the handshake, from its negotiated ALPN id;
/// `None`: no ALPN (or an unknown one), so the first decrypted bytes decide.
pub fn by_alpn(alpn: Option<&[u8]>) -> Option<Kind> {
    match alpn? {
        ALPN_TURN | ALPN_STUN => Some(Kind::Turn),
        ALPN_H2 | ALPN_HTTP11 => Some(Kind::Other),
        _ => None,
    }
}

/// Why a connection was not classified.
#[derive(Debug)]
pub enum SniffError {
    /// The peer closed before sending enough.
    Closed,
    /// Not enough bytes within [`CLASSIFY_TIMEOUT`].
    TimedOut,
    Io(io::Error),
}

/// Classifies a fresh TCP connection by peeking at its first bytes, without
/// consuming them. Waits for readiness between peeks (no polling loop), and gives up
/// after `limit` ([`CLASSIFY_TIMEOUT`] on the listener).
pub async fn sniff_tcp(tcp: &TcpStream, limit: Duration) -> Result<Kind, SniffError> {
    let peek = async {
        loop {
            tcp.readable().await.map_err(SniffError::Io)?;
            let mut buf = [MaybeUninit::<u8>::uninit(); SNIFF_BYTES];
            let got = tcp.try_io(Interest::READABLE, || {
                let n = socket2::SockRef::from(tcp).peek(&mut buf)?;
                if n == 0 {
                    return Ok(None);
                }
                let mut bytes = [0u8; SNIFF_BYTES];
                for (dst, src) in bytes.iter_mut().zip(&buf[..n]) {
                    // SAFETY: `peek` initialised the first `n` bytes of `buf`.
                    *dst = unsafe { src.assume_init() };
                }
                match classify(&bytes[..n], true) {
                    Some(k) => Ok(Some(k)),
                    // Not enough yet: report "would block" so the readiness is
                    // cleared and the next wait ends only when more bytes arrive.
                    None if n < SNIFF_BYTES => Err(io::ErrorKind::WouldBlock.into()),
                    None => Ok(Some(Kind::Other)),
                }
            });
            match got {
                Ok(Some(kind)) => return Ok(kind),
                Ok(None) => return Err(SniffError::Closed),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(SniffError::Io(e)),
            }
        }
    };
    tokio::time::timeout(limit, peek)
        .await
        .unwrap_or(Err(SniffError::TimedOut))
}

/// Reads up to [`SNIFF_BYTES`] from a decrypted stream until they decide, and returns
/// the decision with the stream and those bytes put back in front of it.
pub async fn sniff_stream<S: AsyncRead + Unpin>(
    mut stream: S,
    limit: Duration,
) -> Result<(Kind, Prefixed<S>), SniffError> {
    let mut buf = [0u8; SNIFF_BYTES];
    let mut len = 0;
    let read = async {
        loop {
            let n = stream.read(&mut buf[len..]).await.map_err(SniffError::Io)?;
            if n == 0 {
                return Err(SniffError::Closed);
            }
            len += n;
            if let Some(kind) = classify(&buf[..len], false) {
                return Ok(kind);
            }
        }
    };
    let kind = tokio::time::timeout(limit, read)
        .await
        .unwrap_or(Err(SniffError::TimedOut))?;
    Ok((kind, Prefixed::new(buf, len, stream)))
}

/// A stream with a few bytes already read from it put back in front.
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: [u8; SNIFF_BYTES],
    start: usize,
    end: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    /// `prefix[..len]` is served before the stream's own bytes.
    pub fn new(prefix: [u8; SNIFF_BYTES], len: usize, inner: S) -> Self {
        Prefixed {
            prefix,
            start: 0,
            end: len.min(SNIFF_BYTES),
            inner,
        }
    }

    /// Nothing in front.
    pub fn plain(inner: S) -> Self {
        Self::new([0; SNIFF_BYTES], 0, inner)
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.start < this.end {
            let n = (this.end - this.start).min(buf.remaining());
            buf.put_slice(&this.prefix[this.start..this.start + n]);
            this.start += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The answer to plain HTTP (or anything unclassifiable) on the HTTPS port.
pub fn not_tls_answer() -> Vec<u8> {
    const BODY: &str = "This port speaks HTTPS: use https:// in the address.\n";
    format!(
        "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{BODY}",
        BODY.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests;
