//! Relay IO: the UDP, TCP and TLS listeners, one task per relay socket, and the
//! expiry tick. Bytes in, [`Core`] decides, bytes out; the core's lock is never held
//! across an `.await`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use std::os::fd::AsRawFd;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::auth::{Credentials, Nonces, NONCE_TTL_MS};
use super::batch;
use super::core::{
    data_indication, Core, CoreConfig, Family, FiveTuple, Handled, RelaySockets, ToClient,
    Transport,
};
use super::policy::PeerPolicy;
use super::RelayMetrics;
use crate::app::AppState;
use crate::config::Config;

/// Largest frame accepted on a stream (a STUN message or ChannelData).
const MAX_FRAME: usize = 65_535 + 20;
/// Frames queued towards one TCP/TLS client before relayed data is dropped.
const STREAM_QUEUE: usize = 512;
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle TCP connections without an allocation are closed after this long.
const STREAM_IDLE: Duration = Duration::from_secs(120);

/// Unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A bound relay socket. Cancelling `stop` ends its task.
pub struct RelaySocket {
    pub socket: UdpSocket,
    pub stop: CancellationToken,
}

/// Binds UDP relay sockets on the relay addresses, scanning the port range.
struct IoSockets {
    /// (bind address, advertised address) per family.
    v4: Option<(IpAddr, IpAddr)>,
    v6: Option<(IpAddr, IpAddr)>,
    ports: (u16, u16),
}

impl IoSockets {
    fn bind_one(ip: IpAddr, port: u16) -> std::io::Result<std::net::UdpSocket> {
        use socket2::{Domain, Protocol, Socket, Type};
        let addr = SocketAddr::new(ip, port);
        let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        if ip.is_ipv6() {
            s.set_only_v6(true)?;
        }
        s.set_nonblocking(true)?;
        let _ = s.set_recv_buffer_size(1 << 20);
        let _ = s.set_send_buffer_size(1 << 20);
        s.bind(&addr.into())?;
        Ok(s.into())
    }
}

impl RelaySockets for IoSockets {
    type Handle = Arc<RelaySocket>;

    fn has_family(&self, family: Family) -> bool {
        match family {
            Family::V4 => self.v4.is_some(),
            Family::V6 => self.v6.is_some(),
        }
    }

    fn bind(&mut self, family: Family, even_port: bool) -> Option<(SocketAddr, Arc<RelaySocket>)> {
        let (bind_ip, adv_ip) = match family {
            Family::V4 => self.v4?,
            Family::V6 => self.v6?,
        };
        let (lo, hi) = self.ports;
        let span = u32::from(hi - lo) + 1;
        let start = rand::random::<u32>() % span;
        for i in 0..span.min(4096) {
            let port = lo + ((start + i) % span) as u16;
            if even_port && port % 2 == 1 {
                continue;
            }
            let Ok(std_sock) = Self::bind_one(bind_ip, port) else {
                continue;
            };
            let Ok(socket) = UdpSocket::from_std(std_sock) else {
                return None;
            };
            return Some((
                SocketAddr::new(adv_ip, port),
                Arc::new(RelaySocket {
                    socket,
                    stop: CancellationToken::new(),
                }),
            ));
        }
        tracing::warn!("no free relay port in turn.relay_ports");
        None
    }

    fn close(&mut self, handle: &Arc<RelaySocket>) {
        handle.stop.cancel();
    }
}

struct Shared {
    core: Mutex<Core<IoSockets>>,
}

impl Shared {
    fn core(&self) -> MutexGuard<'_, Core<IoSockets>> {
        // A panic while holding the lock leaves consistent-enough tables; keep serving.
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Handle to the relay for other modules: drops allocations when peers leave.
#[derive(Clone)]
pub struct RelayHandle {
    shared: Arc<Shared>,
}

impl crate::ice::PeerEvents for RelayHandle {
    fn peer_gone(&self, peer_id: &str) {
        let n = self.shared.core().peer_gone(peer_id);
        if n > 0 {
            tracing::debug!(allocations = n, "peer left; allocations removed");
        }
    }
}

impl RelayHandle {
    /// Number of allocations currently held.
    pub fn allocation_count(&self) -> usize {
        self.shared.core().allocation_count()
    }
}

/// The addresses the relay listens on.
#[derive(Debug, Clone, Copy)]
pub struct RelayAddrs {
    pub udp: SocketAddr,
    pub tcp: SocketAddr,
    pub tls: Option<SocketAddr>,
}

/// The bound relay, ready to run.
pub struct Relay {
    shared: Arc<Shared>,
    udp: Arc<UdpSocket>,
    tcp: TcpListener,
    tls: Option<TcpListener>,
    addrs: RelayAddrs,
}

/// Relay bind/advertise addresses: configured, else derived from `turn.listen` or the
/// machine's first non-loopback address per family.
fn relay_addresses(cfg: &Config, listen: SocketAddr) -> anyhow::Result<Vec<(IpAddr, IpAddr)>> {
    let mut ips = cfg.turn.relay_ips.clone();
    if ips.is_empty() {
        if !listen.ip().is_unspecified() {
            ips.push(listen.ip());
        } else {
            let locals = crate::tls::local_ips();
            for want_v4 in [true, false] {
                if let Some(ip) = locals
                    .iter()
                    .find(|ip| ip.is_ipv4() == want_v4 && !ip.is_loopback())
                {
                    ips.push(*ip);
                }
            }
        }
    }
    let external = &cfg.turn.external_ips;
    Ok(ips
        .into_iter()
        .map(|ip| {
            let adv = external
                .iter()
                .find(|e| e.is_ipv4() == ip.is_ipv4())
                .copied()
                .unwrap_or(ip);
            (ip, adv)
        })
        .collect())
}

fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        let _ = s.set_only_v6(false);
    }
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

/// UDP and TCP on the same port, so one port number serves both. With port 0 the
/// kernel picks the UDP port, which TCP may already hold elsewhere: try again a few
/// times before giving up.
fn bind_udp_and_tcp(listen: SocketAddr) -> anyhow::Result<(UdpSocket, SocketAddr, TcpListener)> {
    let attempts = if listen.port() == 0 { 20 } else { 1 };
    let mut last_err = None;
    for _ in 0..attempts {
        let udp = bind_udp(listen)
            .with_context(|| format!("cannot listen on {listen} (UDP, turn.listen)"))?;
        let udp_addr = udp.local_addr()?;
        let tcp_addr = SocketAddr::new(listen.ip(), udp_addr.port());
        match bind_tcp(tcp_addr) {
            Ok(tcp) => return Ok((udp, udp_addr, tcp)),
            Err(e) => last_err = Some((tcp_addr, e)),
        }
    }
    match last_err {
        Some((addr, e)) => {
            Err(anyhow::Error::new(e)
                .context(format!("cannot listen on {addr} (TCP, turn.listen)")))
        }
        None => Err(anyhow::anyhow!("cannot listen on {listen} (turn.listen)")),
    }
}

impl Relay {
    /// Binds the listeners (UDP and TCP on `turn.listen`, TLS on `turn.tls_listen`).
    pub async fn bind(
        cfg: &Config,
        secret: String,
        metrics: RelayMetrics,
    ) -> anyhow::Result<Relay> {
        let listen = cfg.turn.listen;
        let (udp, udp_addr, tcp) = bind_udp_and_tcp(listen)?;
        let tls = match cfg.turn.tls_listen {
            Some(a) => Some(
                bind_tcp(a)
                    .with_context(|| format!("cannot listen on {a} (TLS, turn.tls_listen)"))?,
            ),
            None => None,
        };
        let addrs = RelayAddrs {
            udp: udp_addr,
            tcp: tcp.local_addr()?,
            tls: tls.as_ref().map(|l| l.local_addr()).transpose()?,
        };
        let relay_ips = relay_addresses(cfg, listen)?;
        let sockets = IoSockets {
            v4: relay_ips.iter().find(|(b, _)| b.is_ipv4()).copied(),
            v6: relay_ips.iter().find(|(b, _)| b.is_ipv6()).copied(),
            ports: (cfg.turn.relay_ports.first(), cfg.turn.relay_ports.last()),
        };
        let users: HashMap<String, String> = cfg
            .turn
            .users
            .iter()
            .map(|(u, p)| (u.clone(), p.expose().to_owned()))
            .collect();
        let creds = Credentials::new(secret, cfg.turn.realm.clone(), users);
        let nonces = Nonces::new(rand::random(), NONCE_TTL_MS);
        let core_cfg = CoreConfig {
            max_lifetime_s: cfg.turn.max_allocation_lifetime_s,
            user_quota: cfg.turn.user_allocation_quota,
            total_quota: cfg.turn.total_allocation_quota,
            max_bps: cfg.turn.max_bps,
            policy: PeerPolicy::new(cfg.turn.allowed_peer_ranges.clone()),
        };
        let core = Core::new(core_cfg, creds, nonces, sockets, metrics);
        Ok(Relay {
            shared: Arc::new(Shared {
                core: Mutex::new(core),
            }),
            udp: Arc::new(udp),
            tcp,
            tls,
            addrs,
        })
    }

    pub fn addrs(&self) -> RelayAddrs {
        self.addrs
    }

    pub fn handle(&self) -> RelayHandle {
        RelayHandle {
            shared: self.shared.clone(),
        }
    }

    /// Starts the listener and timer tasks on `state.tasks`; they stop on shutdown.
    pub fn spawn(self, state: &Arc<AppState>) {
        let stop = state.shutdown.clone();
        // Two receive loops on the UDP socket let both cores work on client traffic.
        for _ in 0..2 {
            let ctx = UdpCtx {
                shared: self.shared.clone(),
                socket: self.udp.clone(),
                local: self.addrs.udp,
                tasks: state.tasks.clone(),
                stop: stop.clone(),
            };
            state.tasks.spawn(udp_loop(ctx));
        }
        state.tasks.spawn(accept_loop(
            self.tcp,
            self.shared.clone(),
            state.clone(),
            false,
        ));
        if let Some(tls) = self.tls {
            state
                .tasks
                .spawn(accept_loop(tls, self.shared.clone(), state.clone(), true));
        }
        let shared = self.shared.clone();
        state.tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => shared.core().expire(now_ms()),
                }
            }
            // Closing every relay socket ends the relay tasks.
            shared.core().expire(u64::MAX);
        });
    }
}

/// Where a relay task sends what peers send to the client.
#[derive(Clone)]
enum ClientSink {
    Udp(Arc<UdpSocket>, SocketAddr),
    Stream(mpsc::Sender<Vec<u8>>),
}

struct UdpCtx {
    shared: Arc<Shared>,
    socket: Arc<UdpSocket>,
    local: SocketAddr,
    tasks: tokio_util::task::TaskTracker,
    stop: CancellationToken,
}

fn is_channel_data(b: &[u8]) -> bool {
    b.len() >= 4 && (b[0] & 0xC0) == 0x40
}

fn is_stun(b: &[u8]) -> bool {
    b.len() >= 20 && (b[0] & 0xC0) == 0 && b[4..8] == [0x21, 0x12, 0xA4, 0x42]
}

/// Forwards collected ChannelData payloads, one `sendmmsg` per run of packets that
/// leave through the same relay socket.
fn flush(fwd: &mut Vec<(Arc<RelaySocket>, SocketAddr, usize, usize)>, data: &[u8]) {
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
        batch::send_batch(sock.socket.as_raw_fd(), &items);
    }
    fwd.clear();
}

async fn udp_loop(ctx: UdpCtx) {
    let mut rb = batch::RecvBatch::default();
    let fd = ctx.socket.as_raw_fd();
    // (relay socket, peer, offset, length) of ChannelData payloads to forward; offsets
    // index the receive batch's buffer.
    let mut fwd: Vec<(Arc<RelaySocket>, SocketAddr, usize, usize)> =
        Vec::with_capacity(batch::BATCH);
    let mut stun: Vec<usize> = Vec::with_capacity(batch::BATCH);
    loop {
        let n = tokio::select! {
            _ = ctx.stop.cancelled() => return,
            r = ctx.socket.async_io(Interest::READABLE, || rb.recv(fd)) => match r {
                Ok(n) => n,
                Err(e) => {
                    // ICMP errors surface here on Linux; they are not fatal.
                    tracing::debug!(error = %e, "turn udp recv");
                    continue;
                }
            },
        };
        let now = now_ms();
        {
            let mut core = ctx.shared.core();
            for i in 0..n {
                let Some((pkt, from)) = rb.packet(i) else {
                    continue;
                };
                if is_channel_data(pkt) {
                    let five = FiveTuple {
                        client: from,
                        server: ctx.local,
                        transport: Transport::Udp,
                    };
                    let ch = u16::from_be_bytes([pkt[0], pkt[1]]);
                    let len = u16::from_be_bytes([pkt[2], pkt[3]]) as usize;
                    if 4 + len > pkt.len() {
                        continue;
                    }
                    if let Some((relay, peer)) = core.channel_data(&five, ch, len, now) {
                        fwd.push((relay, peer, i * batch::SLOT + 4, len));
                    }
                } else if is_stun(pkt) {
                    stun.push(i);
                }
            }
        }
        flush(&mut fwd, rb.bytes());
        for &i in &stun {
            let Some((pkt, from)) = rb.packet(i) else {
                continue;
            };
            let five = FiveTuple {
                client: from,
                server: ctx.local,
                transport: Transport::Udp,
            };
            let out = ctx.shared.core().handle_stun(pkt, five, now);
            let sink = ClientSink::Udp(ctx.socket.clone(), from);
            act(out, &sink, &ctx.shared, &ctx.tasks, five).await;
        }
        stun.clear();
    }
}

/// Carries out what the core decided for a STUN message.
async fn act(
    out: Handled<Arc<RelaySocket>>,
    sink: &ClientSink,
    shared: &Arc<Shared>,
    tasks: &tokio_util::task::TaskTracker,
    five: FiveTuple,
) {
    match out {
        Handled::Reply(bytes) => send_client(sink, bytes, true).await,
        Handled::Allocated {
            reply,
            id,
            relay,
            handle,
        } => {
            tracing::debug!(client = %five.client, relay = %relay, transport = five.transport.label(), "allocation created");
            tasks.spawn(relay_loop(
                shared.clone(),
                id,
                handle,
                sink.clone(),
                five.transport,
            ));
            send_client(sink, reply, true).await;
        }
        Handled::Forward { handle, peer, data } => {
            let _ = handle.socket.try_send_to(&data, peer);
        }
        Handled::Nothing => {}
    }
}

async fn send_client(sink: &ClientSink, bytes: Vec<u8>, control: bool) {
    match sink {
        ClientSink::Udp(sock, to) => {
            let _ = sock.send_to(&bytes, *to).await;
        }
        ClientSink::Stream(tx) => {
            if control {
                let _ = tx.send(bytes).await;
            } else {
                let _ = tx.try_send(bytes);
            }
        }
    }
}

/// Receives from peers on one relay socket and forwards to the client.
async fn relay_loop(
    shared: Arc<Shared>,
    id: u64,
    relay: Arc<RelaySocket>,
    sink: ClientSink,
    transport: Transport,
) {
    let stream = transport != Transport::Udp;
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
        let verdict = shared.core().from_peer(id, peer, n, now_ms());
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
                let msg = data_indication(peer, &buf[4..4 + n]);
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
                if !shared.core().alive(id) {
                    return;
                }
            }
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, state: Arc<AppState>, tls: bool) {
    let local = match listener.local_addr() {
        Ok(a) => a,
        Err(_) => return,
    };
    loop {
        let (stream, from) = tokio::select! {
            _ = state.shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "turn accept");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let st = state.clone();
        let five = FiveTuple {
            client: from,
            server: local,
            transport: if tls { Transport::Tls } else { Transport::Tcp },
        };
        state.tasks.spawn(async move {
            if tls {
                // A fresh clone per connection: a certificate reloaded on SIGHUP applies to
                // the next connection; ALPN is cleared (TURN over TLS does not negotiate it).
                let mut cfg = (*st.tls.server_config()).clone();
                cfg.alpn_protocols.clear();
                let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => serve_stream(s, five, shared, st).await,
                    _ => tracing::debug!(client = %from, "turn tls handshake failed"),
                }
            } else {
                serve_stream(stream, five, shared, st).await;
            }
        });
    }
}

/// Length of the first complete frame in `b`, `Some(0)` if more bytes are needed,
/// `None` if the stream is not STUN/ChannelData.
fn frame_len(b: &[u8]) -> Option<usize> {
    if b.len() < 4 {
        return Some(0);
    }
    let len = u16::from_be_bytes([b[2], b[3]]) as usize;
    let total = match b[0] & 0xC0 {
        0x40 => (4 + len + 3) & !3,
        0x00 => 20 + len,
        _ => return None,
    };
    if total > MAX_FRAME {
        return None;
    }
    Some(if b.len() >= total { total } else { 0 })
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

/// Looks up consecutive ChannelData frames of a stream under one lock, collecting
/// the payloads to forward; stops at a STUN message, an incomplete frame or garbage.
fn forward_frames(
    shared: &Shared,
    five: &FiveTuple,
    buf: &[u8],
    off: &mut usize,
    fwd: &mut Vec<(Arc<RelaySocket>, SocketAddr, usize, usize)>,
) -> Next {
    let now = now_ms();
    let mut core = shared.core();
    loop {
        let rest = &buf[*off..];
        let len = match frame_len(rest) {
            None => return Next::Bad,
            Some(0) => return Next::More,
            Some(len) => len,
        };
        let frame = &rest[..len];
        if is_channel_data(frame) {
            let ch = u16::from_be_bytes([frame[0], frame[1]]);
            let dlen = u16::from_be_bytes([frame[2], frame[3]]) as usize;
            if let Some((relay, peer)) = core.channel_data(five, ch, dlen, now) {
                fwd.push((relay, peer, *off + 4, dlen));
            }
            *off += len;
        } else if is_stun(frame) {
            return Next::Stun(len);
        } else {
            return Next::Bad;
        }
    }
}

async fn serve_stream<T>(stream: T, five: FiveTuple, shared: Arc<Shared>, state: Arc<AppState>)
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(STREAM_QUEUE);
    let writer = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            if wr.write_all(&frame).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    let sink = ClientSink::Stream(tx);
    let mut buf: Vec<u8> = Vec::with_capacity(8192);
    let mut chunk = vec![0u8; 65_536];
    let mut fwd: Vec<(Arc<RelaySocket>, SocketAddr, usize, usize)> =
        Vec::with_capacity(batch::BATCH);
    'conn: loop {
        let read = tokio::select! {
            _ = state.shutdown.cancelled() => break,
            r = tokio::time::timeout(STREAM_IDLE, rd.read(&mut chunk)) => r,
        };
        let n = match read {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => n,
            Err(_) => {
                // Idle: keep connections that hold an allocation.
                if shared.core().allocation_of(&five).is_some() {
                    continue;
                }
                break;
            }
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut off = 0;
        loop {
            match forward_frames(&shared, &five, &buf, &mut off, &mut fwd) {
                Next::More => break,
                Next::Bad => {
                    flush(&mut fwd, &buf);
                    break 'conn;
                }
                Next::Stun(len) => {
                    // Keep order: data before a request goes out before it is handled.
                    flush(&mut fwd, &buf);
                    let out = shared
                        .core()
                        .handle_stun(&buf[off..off + len], five, now_ms());
                    act(out, &sink, &shared, &state.tasks, five).await;
                    off += len;
                }
            }
        }
        flush(&mut fwd, &buf);
        buf.drain(..off);
    }
    shared.core().client_gone(&five);
    drop(sink);
    let _ = writer.await;
}
