//! TURN over TCP and TLS: one task per connection reads frames (RFC 8656 section 12),
//! routes runs of ChannelData under one lock, and hands STUN messages to the core;
//! a writer task drains the connection's bounded queue.
//!
//! What one connection may hold: a place under the connection caps
//! ([`crate::limits`]); a read buffer that grows with the bytes actually received (4
//! KiB at a time, up to 16 KiB after a read of large frames that filled it, so a
//! partial 64 KiB message pins about its own size) and is released whenever the
//! connection is idle; and time: the TLS handshake, the first message and every later
//! message (from its first byte) must each complete within
//! `turn.stream_message_timeout_s`, however slowly bytes trickle in. Between messages
//! a connection holding an allocation may stay idle; one without closes after
//! [`STREAM_IDLE`].

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

use super::udp::{flush, Forwards};
use super::{free_sockets, ClientSink, Commands, CoreCell, Ctx, StreamTx};
use crate::limits::AcceptBackoff;
use crate::relay::batch;
use crate::relay::core::{FiveTuple, Transport};
use crate::relay::wire::{self, Frame};
use crate::tls::Tls;

/// Entries queued towards one TCP/TLS client (a STUN answer, or a batch of relayed
/// frames); bytes are bounded too ([`super::STREAM_QUEUE_BYTES`]).
const STREAM_QUEUE: usize = 512;
/// Frames that are ready are written together, up to about this many bytes at once.
const WRITE_COALESCE: usize = 64 * 1024;
/// Idle TCP connections without an allocation are closed after this long.
pub(super) const STREAM_IDLE: Duration = Duration::from_secs(120);
/// The read buffer grows by at most this much per read...
const READ_STEP: usize = 4096;
/// ...unless a read filled it with large frames: it then grows by room for this many
/// frames of the last size seen, up to [`BULK_READ_STEP`] (4 KiB holds 40 frames of
/// 100 bytes but only 3 of 1,200: a read, a lock and a send per 3 packets).
const FRAMES_PER_READ: usize = 12;
const BULK_READ_STEP: usize = 16384;
/// An empty read buffer larger than this is released between messages.
const KEEP_IDLE_BUFFER: usize = BULK_READ_STEP + READ_STEP;

/// Accepts connections until shutdown; `tls` makes them TURN over TLS.
pub(super) async fn accept_loop(listener: TcpListener, ctx: Arc<Ctx>, tls: Option<Arc<Tls>>) {
    let local = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "turn listener has no address; not accepting");
            return;
        }
    };
    let what = if tls.is_some() {
        "TURN over TLS"
    } else {
        "TURN over TCP"
    };
    let mut backoff = AcceptBackoff::new(what, ctx.stream_metrics.clone());
    loop {
        let (stream, from) = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: close what waits, pause
                    // rather than spin.
                    let pause = backoff.failed(&e);
                    backoff.shed(&e, &listener);
                    tokio::select! {
                        _ = ctx.shutdown.cancelled() => return,
                        _ = tokio::time::sleep(pause) => continue,
                    }
                }
            },
        };
        backoff.accepted();
        let Ok(permit) = ctx.streams.try_acquire(from.ip()) else {
            // Closed at once; the limiter counts and logs the refusal.
            drop(stream);
            continue;
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        let five = FiveTuple {
            client: from,
            server: local,
            transport: if tls.is_some() {
                Transport::Tls
            } else {
                Transport::Tcp
            },
        };
        let ctx = ctx.clone();
        let tls = tls.clone();
        ctx.tasks.clone().spawn(async move {
            let _permit = permit;
            match tls {
                Some(tls) => {
                    // A fresh clone per connection: a certificate reloaded on SIGHUP
                    // applies to the next connection; ALPN is cleared (TURN over TLS
                    // does not negotiate it).
                    let mut cfg = (*tls.server_config()).clone();
                    cfg.alpn_protocols.clear();
                    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
                    match tokio::time::timeout(ctx.message_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => serve_stream(s, five, ctx).await,
                        _ => tracing::debug!(client = %from, "turn tls handshake failed"),
                    }
                }
                None => serve_stream(stream, five, ctx).await,
            }
        });
    }
}

/// Where [`forward_frames`] stopped.
enum Next {
    /// A STUN message of this length starts at the offset.
    Stun(usize),
    /// The rest is an incomplete frame.
    More,
    /// Not STUN or ChannelData: close the connection.
    Bad,
}

/// Routes consecutive ChannelData frames of a stream under one lock, collecting
/// the payloads to forward; stops at a STUN message, an incomplete frame or garbage.
fn forward_frames(
    shared: &CoreCell,
    five: &FiveTuple,
    buf: &[u8],
    off: &mut usize,
    fwd: &mut Forwards,
) -> Next {
    let now = Instant::now();
    let mut guard = shared.lock();
    loop {
        let rest = &buf[*off..];
        let len = match wire::stream_frame(rest) {
            Frame::Invalid => return Next::Bad,
            Frame::Incomplete => return Next::More,
            Frame::Complete(len) => len,
        };
        let frame = &rest[..len];
        if let Some((ch, dlen)) = wire::channel_header(frame) {
            if let Some((relay, peer)) = guard.core.channel_data(five, ch, dlen, now) {
                fwd.push((relay, peer, *off + 4, dlen));
            }
            *off += len;
        } else if wire::is_stun(frame) {
            return Next::Stun(len);
        } else {
            return Next::Bad;
        }
    }
}

pub(super) async fn serve_stream<T>(stream: T, five: FiveTuple, ctx: Arc<Ctx>)
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (tx, mut rx) = StreamTx::new(STREAM_QUEUE);
    let writer = tokio::spawn(async move {
        while let Some(frames) = rx.recv(WRITE_COALESCE).await {
            // Flushed every time: a TLS stream may hold encrypted bytes the socket did
            // not take, and nothing else would send them while the queue is empty.
            if wr.write_all(&frames).await.is_err() || wr.flush().await.is_err() {
                break;
            }
        }
        // The peer may be gone already; there is nothing left to tell it.
        let _ = wr.shutdown().await;
    });
    let sink = ClientSink::Stream(tx);
    let mut buf: Vec<u8> = Vec::new();
    let mut fwd: Forwards = Vec::with_capacity(batch::BATCH);
    let mut cmds = Commands::new();
    // The first message is due from the start; later ones from their first byte.
    let mut message_due = Some(tokio::time::Instant::now() + ctx.message_timeout);
    // Without a message under way, the connection is idle from its last byte.
    let mut idle_from = tokio::time::Instant::now();
    // One timer and one wait for shutdown for the connection's life, not one of each
    // per read. The timer is never later than the deadline that applies (a message's
    // or idleness's); it may be earlier, and then it is set again when it fires.
    let shutdown = ctx.shutdown.cancelled();
    tokio::pin!(shutdown);
    let timer = tokio::time::sleep_until(message_due.unwrap_or(idle_from + STREAM_IDLE));
    tokio::pin!(timer);
    let mut step = READ_STEP;
    // The size of the last ChannelData frame relayed.
    let mut frame = 0;
    'conn: loop {
        if buf.capacity() - buf.len() < step / 2 {
            // Grows with what arrives, never by a fixed large chunk up front.
            buf.reserve_exact(step);
        }
        let room = buf.capacity() - buf.len();
        let read = tokio::select! {
            _ = &mut shutdown => break,
            r = rd.read_buf(&mut buf) => Some(r),
            _ = &mut timer => None,
        };
        match read {
            Some(Ok(0)) | Some(Err(_)) => break,
            Some(Ok(n)) => {
                step = if n == room {
                    (FRAMES_PER_READ * frame).clamp(READ_STEP, BULK_READ_STEP)
                } else {
                    READ_STEP
                };
            }
            None => {
                let now = tokio::time::Instant::now();
                let due = message_due.unwrap_or(idle_from + STREAM_IDLE);
                if now < due {
                    timer.as_mut().reset(due);
                    continue;
                }
                if message_due.is_some() {
                    tracing::debug!(client = %five.client, "turn stream message not complete in time; closed");
                    break;
                }
                // Idle: keep connections that hold an allocation.
                if ctx.shared.lock().core.allocation_of(&five).is_some() {
                    idle_from = now;
                    timer.as_mut().reset(now + STREAM_IDLE);
                    continue;
                }
                break;
            }
        }
        let mut off = 0;
        loop {
            match forward_frames(&ctx.shared, &five, &buf, &mut off, &mut fwd) {
                Next::More => break,
                Next::Bad => {
                    flush(&mut fwd, &buf);
                    break 'conn;
                }
                Next::Stun(len) => {
                    // Keep order: data before a request goes out before it is handled.
                    flush(&mut fwd, &buf);
                    let msg = &buf[off..off + len];
                    let (now, wall) = (Instant::now(), SystemTime::now());
                    ctx.shared
                        .with(&mut cmds, |core| core.handle_stun(msg, five, now, wall));
                    ctx.execute(&mut cmds, five, &sink).await;
                    off += len;
                }
            }
        }
        if let Some(&(_, _, _, len)) = fwd.last() {
            frame = len + 4;
        }
        flush(&mut fwd, &buf);
        buf.drain(..off);
        if buf.is_empty() {
            // Between messages: nothing is due, and a large buffer is given back.
            message_due = None;
            idle_from = tokio::time::Instant::now();
            if buf.capacity() > KEEP_IDLE_BUFFER {
                buf = Vec::new();
            }
        } else if off > 0 || message_due.is_none() {
            // A new partial message starts now; its whole must arrive in time. (The
            // same message still incomplete keeps its deadline, the first message
            // included: trickling bytes does not extend it.)
            let due = tokio::time::Instant::now() + ctx.message_timeout;
            message_due = Some(due);
            if due < timer.deadline() {
                timer.as_mut().reset(due);
            }
        }
    }
    ctx.shared.with(&mut cmds, |core| core.client_gone(&five));
    free_sockets(&mut cmds);
    drop(sink);
    // The writer ends once every sender (this task's, relay tasks') is gone; how it
    // ended changes nothing for a connection that is over.
    let _ = writer.await;
}
