//! One task per relay socket: datagrams from peers, checked by the core
//! ([`Core::from_peer`](crate::relay::core::Core::from_peer)), go to the client as
//! ChannelData or as a Data indication.
//!
//! The hot path works in batches: one `recvmmsg` takes the datagrams waiting on the
//! relay socket (for a UDP client, as many as [`batch::Ramp`] says: a burst goes on
//! in growing parts; for a TCP/TLS client, up to [`batch::BATCH`], one write each),
//! the core checks them all under one lock,
//! ChannelData headers are written in place in front of the payloads, and the batch
//! leaves in one `sendmmsg` to a UDP client or as one queued buffer to a TCP/TLS
//! client's writer. The receive buffers belong to the worker thread, not to the
//! task, and are only used between two awaits: an allocation's task holds no buffer.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::Interest;

use super::{ClientSink, CoreCell, RelaySocket};
use crate::relay::batch::{self, RecvBatch};
use crate::relay::core::{data_indication, AllocationId, ToClient, Transport};

thread_local! {
    /// This worker thread's receive batch, shared by the relay tasks it runs (one
    /// at a time: it is borrowed only inside a synchronous section).
    static BATCH: RefCell<Option<Box<RecvBatch>>> = const { RefCell::new(None) };
}

/// What became of one batch.
enum Outcome {
    /// Read again at once: the batch was full, or more has often arrived by the
    /// time a batch is relayed (see [`Eager`]).
    Again,
    /// The allocation is gone: end the task.
    Gone,
}

/// Per-task scratch space, reused from batch to batch.
#[derive(Default)]
struct Scratch {
    verdicts: Vec<(usize, SocketAddr, Option<ToClient>)>,
    ranges: Vec<std::ops::Range<usize>>,
    indications: Vec<Vec<u8>>,
    eager: Eager,
    ramp: batch::Ramp,
}

/// Whether to read a relay socket again at once after a batch that was not full.
///
/// Such a batch emptied the socket. On a busy allocation more has often arrived by
/// the time the batch is relayed, and reading again at once takes it without waiting
/// for the runtime to report readiness. On a quiet one (the usual case: one
/// participant's media, a packet at a time) the second read finds nothing and is a
/// wasted system call; there the batch is reported as `WouldBlock`, which clears the
/// readiness without it. The score follows which kind of socket this is: a read
/// again that found datagrams counts +2, one that found none -1, so reading again
/// goes on while at least a third of them find something; while it is off, every
/// 16th batch tries it.
#[derive(Default)]
struct Eager {
    score: i8,
    /// The last read was a read again after a batch that was not full.
    again: bool,
    batches: u8,
}

impl Eager {
    const MAX: i8 = 8;
    const PROBE: u8 = 16;

    /// The outcome of a read: `Some(n)` datagrams, `None` for nothing.
    fn read(&mut self, got: Option<usize>) {
        if std::mem::take(&mut self.again) {
            self.score = match got {
                Some(_) => (self.score + 2).min(Self::MAX),
                None => (self.score - 1).max(-Self::MAX),
            };
        }
    }

    /// After a batch that was not full: read again at once?
    fn again(&mut self) -> bool {
        self.batches = self.batches.wrapping_add(1);
        self.again = self.score > 0 || self.batches % Self::PROBE == 0;
        self.again
    }
}

/// Receives from peers on `relay` until its `stop` token is cancelled (the
/// allocation ended, or shutdown).
pub(super) async fn relay_loop(
    shared: Arc<CoreCell>,
    id: AllocationId,
    relay: Arc<RelaySocket>,
    sink: ClientSink,
    transport: Transport,
) {
    let stream = transport != Transport::Udp;
    let fd = relay.socket.as_raw_fd();
    let mut scratch = Scratch::default();
    // One wait for the stop token for the task's whole life: a new one per batch
    // would register and unregister with the token each time.
    let stopped = relay.stop.cancelled();
    tokio::pin!(stopped);
    loop {
        let r = tokio::select! {
            _ = &mut stopped => return,
            r = relay.socket.async_io(Interest::READABLE, || {
                BATCH.with(|cell| {
                    let mut slot = cell.borrow_mut();
                    let b = slot.get_or_insert_with(Box::default);
                    forward(b, fd, &shared, id, &sink, stream, &mut scratch)
                })
            }) => r,
        };
        match r {
            Ok(Outcome::Gone) => return,
            Ok(Outcome::Again) => {}
            Err(e) => tracing::debug!(error = %e, "relay recv"),
        }
    }
}

/// One batch from the relay socket `fd` to the client. `WouldBlock` when the socket
/// is empty after it (the caller then waits for readiness).
fn forward(
    b: &mut RecvBatch,
    fd: std::os::fd::RawFd,
    shared: &CoreCell,
    id: AllocationId,
    sink: &ClientSink,
    stream: bool,
    s: &mut Scratch,
) -> io::Result<Outcome> {
    // A stream client gets one write per batch: whole batches suit it better.
    let max = if stream { batch::BATCH } else { s.ramp.next() };
    let n = match b.recv_up_to(fd, max) {
        Ok(n) => n,
        Err(e) => {
            s.eager.read(None);
            s.ramp.filled(false);
            return Err(e);
        }
    };
    s.eager.read(Some(n));
    let full = n >= max;
    s.ramp.filled(full);
    let now = Instant::now();
    s.verdicts.clear();
    {
        let mut guard = shared.lock();
        for i in 0..n {
            let Some((pkt, peer)) = b.packet(i) else {
                continue;
            };
            let v = guard.core.from_peer(id, peer, pkt.len(), now);
            s.verdicts.push((i, peer, v));
        }
        if s.verdicts.iter().all(|v| v.2.is_none()) && !guard.core.alive(id) {
            return Ok(Outcome::Gone);
        }
    }
    // Frames in place (ChannelData), or built (a Data indication, for a peer without
    // a channel: the uncommon case).
    s.ranges.clear();
    s.indications.clear();
    for &(i, peer, v) in &s.verdicts {
        match v {
            Some(ToClient::Channel(ch)) => {
                if let Some(r) = b.channel_frame(i, ch, stream) {
                    s.ranges.push(r);
                }
            }
            Some(ToClient::DataIndication) => {
                if let Some((pkt, _)) = b.packet(i) {
                    s.indications
                        .push(data_indication(peer, pkt, rand::random()));
                }
            }
            None => {}
        }
    }
    // Sends below never wait: a client that cannot keep up loses datagrams, as it
    // would on any congested path.
    let bytes = b.bytes();
    match sink {
        ClientSink::Udp(sock, to) => {
            let mut items: Vec<(&[u8], SocketAddr)> = Vec::with_capacity(s.ranges.len());
            items.extend(s.ranges.iter().map(|r| (&bytes[r.clone()], *to)));
            batch::send_batch(sock.as_raw_fd(), &items);
            for m in &s.indications {
                let _ = sock.try_send_to(m, *to);
            }
        }
        ClientSink::Stream(tx) => {
            let total: usize = s.ranges.iter().map(|r| r.len()).sum::<usize>()
                + s.indications.iter().map(Vec::len).sum::<usize>();
            if total > 0 {
                // One buffer for the whole batch: one queue entry, one write.
                let mut out = Vec::with_capacity(total);
                for r in &s.ranges {
                    out.extend_from_slice(&bytes[r.clone()]);
                }
                for m in &s.indications {
                    out.extend_from_slice(m);
                }
                tx.try_send_data(out);
            }
        }
    }
    if !full && !s.eager.again() {
        // recvmmsg stops early only when the queue is empty (relay sockets are not
        // connected and do not ask for ICMP errors, so no error ends a batch early).
        return Err(io::ErrorKind::WouldBlock.into());
    }
    Ok(Outcome::Again)
}

#[cfg(test)]
mod tests {
    use super::Eager;

    #[test]
    fn reads_again_only_where_it_finds_datagrams() {
        // A quiet socket: every read again finds nothing, so it is tried only every
        // 16th batch.
        let mut e = Eager::default();
        let mut tried = 0;
        for _ in 0..64 {
            if e.again() {
                tried += 1;
            }
            e.read(None);
        }
        assert_eq!(tried, 4);
        // A busy one: a probe that finds datagrams turns reading again on, and it
        // stays on while at least a third of the reads again find something.
        let mut e = Eager::default();
        while !e.again() {}
        e.read(Some(3));
        for i in 0..60 {
            assert!(e.again(), "batch {i}");
            e.read(if i % 3 == 0 { Some(1) } else { None });
        }
        // Then the socket goes quiet: reading again stops after a few misses.
        let mut misses = 0;
        while e.again() {
            e.read(None);
            misses += 1;
            assert!(misses <= Eager::MAX as usize + 1);
        }
        // A read that was not a read again does not move the score.
        let before = e.score;
        e.read(Some(5));
        e.read(None);
        assert_eq!(e.score, before);
    }
}
