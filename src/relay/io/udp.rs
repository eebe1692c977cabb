//! The UDP listener: client datagrams in batches (`recvmmsg`, sized by
//! [`batch::Ramp`]: a burst goes on to the peers in growing parts). ChannelData is routed
//! under one lock per batch and forwarded with one `sendmmsg` per relay socket; STUN
//! messages go through the core one by one, their commands carried out after.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio::io::Interest;
use tokio::net::UdpSocket;

use super::{ClientSink, Commands, Ctx, RelaySocket};
use crate::relay::batch;
use crate::relay::core::{FiveTuple, Transport};
use crate::relay::wire;

/// ChannelData payloads to forward: relay socket, peer, offset and length in a buffer.
pub(super) type Forwards = Vec<(Arc<RelaySocket>, SocketAddr, usize, usize)>;

/// Forwards collected ChannelData payloads, one `sendmmsg` per run of packets that
/// leave through the same relay socket.
pub(super) fn flush(fwd: &mut Forwards, data: &[u8]) {
    let mut i = 0;
    let mut items: Vec<(&[u8], SocketAddr)> = Vec::with_capacity(batch::BATCH);
    while i < fwd.len() {
        let sock = &fwd[i].0;
        items.clear();
        while i < fwd.len() && Arc::ptr_eq(&fwd[i].0, sock) && items.len() < batch::BATCH {
            let (_, peer, off, len) = fwd[i];
            items.push((&data[off..off + len], peer));
            i += 1;
        }
        // Datagrams the kernel does not take are dropped, like on any congested link.
        batch::send_batch(sock.socket.as_raw_fd(), &items);
    }
    fwd.clear();
}

pub(super) async fn udp_loop(ctx: Arc<Ctx>, socket: Arc<UdpSocket>, local: SocketAddr) {
    let mut rb = batch::RecvBatch::default();
    let mut ramp = batch::Ramp::default();
    let fd = socket.as_raw_fd();
    let mut fwd: Forwards = Vec::with_capacity(batch::BATCH);
    let mut stun: Vec<usize> = Vec::with_capacity(batch::BATCH);
    let mut cmds = Commands::new();
    let shutdown = ctx.shutdown.cancelled();
    tokio::pin!(shutdown);
    loop {
        // The listener carries every UDP client: after a batch, it is read again at
        // once (more has often arrived meanwhile) until a read finds nothing; each
        // read asks for what the ramp says.
        let n = tokio::select! {
            _ = &mut shutdown => return,
            r = socket.async_io(Interest::READABLE, || {
                let r = rb.recv_up_to(fd, ramp.next());
                ramp.got(*r.as_ref().unwrap_or(&0));
                r
            }) => match r {
                Ok(n) => n,
                Err(e) => {
                    tracing::debug!(error = %e, "turn udp recv");
                    continue;
                }
            },
        };
        let now = Instant::now();
        {
            let mut guard = ctx.shared.lock();
            for i in 0..n {
                let Some((pkt, from)) = rb.packet(i) else {
                    continue;
                };
                if let Some((ch, len)) = wire::channel_header(pkt) {
                    if 4 + len > pkt.len() {
                        continue;
                    }
                    let five = FiveTuple {
                        client: from,
                        server: local,
                        transport: Transport::Udp,
                    };
                    if let Some((relay, peer)) = guard.core.channel_data(&five, ch, len, now) {
                        fwd.push((relay, peer, batch::RecvBatch::offset(i) + 4, len));
                    }
                } else if wire::is_stun(pkt) {
                    stun.push(i);
                }
            }
        }
        flush(&mut fwd, rb.bytes());
        if stun.is_empty() {
            continue;
        }
        let wall = SystemTime::now();
        for &i in &stun {
            let Some((pkt, from)) = rb.packet(i) else {
                continue;
            };
            let five = FiveTuple {
                client: from,
                server: local,
                transport: Transport::Udp,
            };
            ctx.shared
                .with(&mut cmds, |core| core.handle_stun(pkt, five, now, wall));
            let sink = ClientSink::Udp(socket.clone(), from);
            ctx.execute(&mut cmds, five, &sink).await;
        }
        stun.clear();
    }
}
