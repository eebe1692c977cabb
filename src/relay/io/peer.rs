//! One task per relay socket: datagrams from peers, checked by the core
//! ([`Core::from_peer`](crate::relay::core::Core::from_peer)), go to the client as
//! ChannelData or as a Data indication.

use std::sync::Arc;
use std::time::Instant;

use super::{ClientSink, CoreCell, RelaySocket};
use crate::relay::core::{data_indication, AllocationId, ToClient, Transport};

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
    // Four bytes of room in front for the ChannelData header.
    let mut buf = vec![0u8; 65_536 + 8];
    loop {
        let (n, peer) = tokio::select! {
            _ = relay.stop.cancelled() => return,
            r = relay.socket.recv_from(&mut buf[4..65_536]) => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "relay recv");
                    continue;
                }
            },
        };
        let verdict = shared.lock().core.from_peer(id, peer, n, Instant::now());
        // Sends below never wait: a client that cannot keep up loses datagrams, as it
        // would on any congested path.
        match verdict {
            Some(ToClient::Channel(ch)) => {
                buf[0..2].copy_from_slice(&ch.to_be_bytes());
                buf[2..4].copy_from_slice(&(n as u16).to_be_bytes());
                match &sink {
                    ClientSink::Udp(sock, to) => {
                        let _ = sock.try_send_to(&buf[..4 + n], *to);
                    }
                    ClientSink::Stream(tx) => {
                        let padded = if stream { (4 + n + 3) & !3 } else { 4 + n };
                        let mut v = buf[..4 + n].to_vec();
                        v.resize(padded, 0);
                        let _ = tx.try_send(v);
                    }
                }
            }
            Some(ToClient::DataIndication) => {
                let msg = data_indication(peer, &buf[4..4 + n], rand::random());
                match &sink {
                    ClientSink::Udp(sock, to) => {
                        let _ = sock.try_send_to(&msg, *to);
                    }
                    ClientSink::Stream(tx) => {
                        let _ = tx.try_send(msg);
                    }
                }
            }
            None => {
                if !shared.lock().core.alive(id) {
                    return;
                }
            }
        }
    }
}
