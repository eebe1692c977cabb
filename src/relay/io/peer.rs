//! One task per relay socket: datagrams from peers, checked by the core
//! ([`Core::from_peer`](crate::relay::core::Core::from_peer)), go to the client as
//! ChannelData or as a Data indication.
//!
//! The hot path works in batches: one `recvmmsg` takes every datagram waiting on the
//! relay socket (up to [`batch::BATCH`]), the core checks them all under one lock,
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
    /// Carry on.
    Relayed,
    /// The allocation is gone: end the task.
    Gone,
}

/// Per-task scratch space, reused from batch to batch.
#[derive(Default)]
struct Scratch {
    verdicts: Vec<(usize, SocketAddr, Option<ToClient>)>,
    ranges: Vec<std::ops::Range<usize>>,
    indications: Vec<Vec<u8>>,
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
    loop {
        let r = tokio::select! {
            _ = relay.stop.cancelled() => return,
            r = relay.socket.async_io(Interest::READABLE, || {
                BATCH.with(|cell| {
                    let mut slot = cell.borrow_mut();
                    let b = slot.get_or_insert_with(Box::default);
                    forward(b, fd, &shared, id, &sink, stream, &mut scratch)
                })
            }) => r,
        };
        match r {
            Ok(Outcome::Relayed) => {}
            Ok(Outcome::Gone) => return,
            Err(e) => tracing::debug!(error = %e, "relay recv"),
        }
    }
}

/// One batch from the relay socket `fd` to the client. `WouldBlock` when nothing
/// waits (the caller then waits for readiness).
fn forward(
    b: &mut RecvBatch,
    fd: std::os::fd::RawFd,
    shared: &CoreCell,
    id: AllocationId,
    sink: &ClientSink,
    stream: bool,
    s: &mut Scratch,
) -> io::Result<Outcome> {
    let n = b.recv(fd)?;
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
    Ok(Outcome::Relayed)
}
