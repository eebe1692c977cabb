//! Closed-loop relay load: a UDP echo peer sends every packet back through the relay,
//! so both directions (client to peer, peer to client) are exercised. Each allocation
//! keeps a bounded window of packets in flight; a packet goes out only when an answer
//! came back (or one was given up as lost), and round trips are counted and timed at
//! the client. A bare UDP forwarder (a separate process doing one `recv` and one
//! `send` per packet, no TURN work) runs the same load as the floor.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use meshmeet::relay::wire::{self, Frame};
use meshmeet::relay::{batch, client};

/// The channel every bench allocation binds to the echo peer.
pub const CHANNEL: u16 = 0x4000;
/// Nothing came back for this long with packets in flight: they are lost.
const LOSS_TIMEOUT: Duration = Duration::from_millis(200);
/// After the load stops, how long answers still in flight are waited for.
const DRAIN: Duration = Duration::from_millis(300);

/// A UDP peer that sends every datagram back to where it came from, on its own
/// thread, with batched syscalls (so the peer costs the machine little).
pub struct EchoPeer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EchoPeer {
    pub fn new() -> Result<EchoPeer> {
        let sock = loopback_udp(8 << 20)?;
        let addr = sock.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let fd = sock.as_raw_fd();
            let mut rb = batch::RecvBatch::default();
            let mut items: Vec<(usize, usize, SocketAddr)> = Vec::with_capacity(batch::BATCH);
            while !s.load(Ordering::Relaxed) {
                if !wait_readable(fd, 50) {
                    continue;
                }
                loop {
                    let n = match rb.recv(fd) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        // ICMP errors from a closed client port: not fatal.
                        Err(_) => continue,
                    };
                    items.clear();
                    for i in 0..n {
                        if let Some((p, from)) = rb.packet(i) {
                            items.push((batch::RecvBatch::offset(i), p.len(), from));
                        }
                    }
                    let bytes = rb.bytes();
                    let out: Vec<(&[u8], SocketAddr)> = items
                        .iter()
                        .map(|&(off, len, to)| (&bytes[off..off + len], to))
                        .collect();
                    // Runs of one destination go out together; others one by one.
                    let mut i = 0;
                    while i < out.len() {
                        let mut j = i + 1;
                        while j < out.len() && out[j].1 == out[i].1 {
                            j += 1;
                        }
                        batch::send_batch(fd, &out[i..j]);
                        i = j;
                    }
                }
            }
        });
        Ok(EchoPeer {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for EchoPeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits up to `ms` for `fd` to be readable.
fn wait_readable(fd: RawFd, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut p, 1, ms) > 0 }
}

/// The bare forwarder, run as `relay --forwarder ECHO_ADDR` (a process of its own, so
/// its CPU time is measured like a server's). It prints its client-facing port on
/// stdout (the same number for UDP and TCP), then forwards, one thread, epoll:
///
/// - UDP: a datagram from a client goes to the echo peer from a socket of that
///   client's own (created on its first datagram, like an allocation's relay
///   socket), and what comes back on that socket goes to the client. One `recv` and
///   one `send` per packet: no TURN parsing, no permissions, no channels, no
///   batching.
/// - TCP: a client's stream carries ChannelData frames (the least a TURN relay over
///   TCP must parse); each frame's payload goes to the echo peer from the
///   connection's own UDP socket, and each datagram that comes back goes to the
///   client as a frame, one `write` each. No permissions, no channel table, no
///   batching of the datagrams.
pub fn forwarder_main(echo: SocketAddr) -> Result<()> {
    /// Clients served at most, per transport (a bench tool; bounded all the same).
    const MAX_CLIENTS: usize = 10_000;
    const FRONT: u64 = u64::MAX;
    const LISTEN: u64 = u64::MAX - 1;
    /// Tokens of TCP connections (`CONN + i`) and of their UDP sockets (`BACK + i`).
    const CONN: u64 = 1 << 32;
    const BACK: u64 = 2 << 32;
    let (front, listener) = bind_udp_and_tcp()?;
    println!("{}", front.local_addr()?.port());
    io::stdout().flush()?;
    // SAFETY: plain syscall; the result is checked.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err(io::Error::last_os_error().into());
    }
    let add = |fd: RawFd, token: u64| -> Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: `ev` is valid for the call; `fd` is an open socket.
        if unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error().into());
        }
        Ok(())
    };
    add(front.as_raw_fd(), FRONT)?;
    add(listener.as_raw_fd(), LISTEN)?;
    let mut backs: Vec<(UdpSocket, SocketAddr)> = Vec::new();
    let mut by_client: HashMap<SocketAddr, usize> = HashMap::new();
    // TCP connections: the stream, its UDP socket towards the echo peer, and the
    // bytes read and not yet framed. A closed one stays as `None`.
    let mut conns: Vec<Option<(TcpStream, UdpSocket, Vec<u8>)>> = Vec::new();
    let mut buf = vec![0u8; 65_536];
    let mut frame = Vec::with_capacity(65_536 + 8);
    // SAFETY: zero is a valid epoll_event.
    let mut events: Vec<libc::epoll_event> = vec![unsafe { std::mem::zeroed() }; 64];
    loop {
        // SAFETY: `events` holds 64 entries for the kernel to fill.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), 64, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        for ev in &events[..n as usize] {
            let token = ev.u64;
            if token == FRONT {
                loop {
                    let (len, from) = match front.recv_from(&mut buf) {
                        Ok(x) => x,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(_) => continue,
                    };
                    let idx = match by_client.get(&from) {
                        Some(&i) => i,
                        None if backs.len() < MAX_CLIENTS => {
                            let b = UdpSocket::bind("127.0.0.1:0")?;
                            b.connect(echo)?;
                            b.set_nonblocking(true)?;
                            add(b.as_raw_fd(), backs.len() as u64)?;
                            backs.push((b, from));
                            by_client.insert(from, backs.len() - 1);
                            backs.len() - 1
                        }
                        None => continue,
                    };
                    let _ = backs[idx].0.send(&buf[..len]);
                }
            } else if token == LISTEN {
                while let Ok((s, _)) = listener.accept() {
                    if conns.len() >= MAX_CLIENTS {
                        continue;
                    }
                    s.set_nodelay(true)?;
                    s.set_nonblocking(true)?;
                    let b = UdpSocket::bind("127.0.0.1:0")?;
                    b.connect(echo)?;
                    b.set_nonblocking(true)?;
                    let i = conns.len() as u64;
                    add(s.as_raw_fd(), CONN + i)?;
                    add(b.as_raw_fd(), BACK + i)?;
                    conns.push(Some((s, b, Vec::new())));
                }
            } else if token >= BACK {
                let Some(Some((s, b, _))) = conns.get_mut((token - BACK) as usize) else {
                    continue;
                };
                loop {
                    let len = match b.recv(&mut buf) {
                        Ok(x) => x,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(_) => continue,
                    };
                    client::channel_data_into(&mut frame, CHANNEL, &buf[..len], true);
                    write_all_now(s, &frame)?;
                }
            } else if token >= CONN {
                let i = (token - CONN) as usize;
                let Some(Some((s, b, inbuf))) = conns.get_mut(i) else {
                    continue;
                };
                let mut closed = false;
                loop {
                    match s.read(&mut buf) {
                        Ok(0) => {
                            closed = true;
                            break;
                        }
                        Ok(n) => inbuf.extend_from_slice(&buf[..n]),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(_) => {
                            closed = true;
                            break;
                        }
                    }
                }
                let mut off = 0;
                while let Frame::Complete(total) = wire::stream_frame(&inbuf[off..]) {
                    let frame = &inbuf[off..off + total];
                    if let Some((_, len)) = wire::channel_header(frame) {
                        let _ = b.send(&frame[4..4 + len]);
                    }
                    off += total;
                }
                inbuf.drain(..off);
                if closed {
                    // Dropping the sockets takes them out of the epoll set.
                    conns[i] = None;
                }
            } else if let Some((b, client)) = backs.get(token as usize) {
                loop {
                    let len = match b.recv(&mut buf) {
                        Ok(x) => x,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(_) => continue,
                    };
                    let _ = front.send_to(&buf[..len], *client);
                }
            }
        }
    }
}

/// A non-blocking UDP socket on a free loopback port, with send and receive buffers
/// of `buffer` bytes asked for (the kernel may cap them).
fn loopback_udp(buffer: usize) -> Result<UdpSocket> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    let _ = sock.set_recv_buffer_size(buffer);
    let _ = sock.set_send_buffer_size(buffer);
    sock.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

/// A UDP socket and a TCP listener on one loopback port number.
fn bind_udp_and_tcp() -> Result<(UdpSocket, std::net::TcpListener)> {
    for _ in 0..100 {
        let front = loopback_udp(4 << 20)?;
        let port = front.local_addr()?.port();
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            l.set_nonblocking(true)?;
            return Ok((front, l));
        }
    }
    bail!("no loopback port free for both UDP and TCP")
}

/// Writes all of `data` to a non-blocking stream, waiting for room if it must (the
/// closed loop's window keeps that rare).
fn write_all_now(s: &mut TcpStream, mut data: &[u8]) -> Result<()> {
    while !data.is_empty() {
        match s.write(data) {
            Ok(0) => bail!("connection closed"),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut p = libc::pollfd {
                    fd: s.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the duration of the call.
                unsafe { libc::poll(&mut p, 1, 100) };
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// A client's connection for the closed loop, non-blocking.
pub enum Wire {
    Udp(UdpSocket),
    Tcp(TcpStream),
    Tls(TcpStream, Box<rustls::ClientConnection>),
}

impl Wire {
    fn fd(&self) -> RawFd {
        match self {
            Wire::Udp(s) => s.as_raw_fd(),
            Wire::Tcp(s) | Wire::Tls(s, _) => s.as_raw_fd(),
        }
    }
}

/// One allocation's loop state.
pub struct Flow {
    wire: Wire,
    /// ChannelData framing (false: raw payloads to the bare forwarder).
    turn: bool,
    /// Stream bytes not yet written (plain TCP); for UDP, the datagrams not yet sent,
    /// one after another, with their lengths in `out_lens`.
    out: Vec<u8>,
    out_lens: Vec<usize>,
    /// Where a UDP flow's datagrams go (its socket is connected there).
    to: Option<SocketAddr>,
    /// Stream bytes read and not yet framed.
    inbuf: Vec<u8>,
    next_seq: u64,
    /// Sequence numbers in flight, oldest first.
    outstanding: VecDeque<u64>,
    last_rx: Instant,
    sent: u64,
    lost: u64,
}

impl Flow {
    pub fn new(wire: Wire, turn: bool, leftover: Vec<u8>) -> Result<Flow> {
        let to = match &wire {
            Wire::Udp(s) => {
                s.set_nonblocking(true)?;
                Some(s.peer_addr().context("a connected UDP socket")?)
            }
            Wire::Tcp(s) | Wire::Tls(s, _) => {
                s.set_nonblocking(true)?;
                None
            }
        };
        Ok(Flow {
            wire,
            turn,
            out: Vec::new(),
            out_lens: Vec::new(),
            to,
            inbuf: leftover,
            next_seq: 0,
            outstanding: VecDeque::new(),
            last_rx: Instant::now(),
            sent: 0,
            lost: 0,
        })
    }

    /// The UDP socket back, for tearing the allocation down.
    pub fn into_udp(self) -> Option<UdpSocket> {
        match self.wire {
            Wire::Udp(s) => Some(s),
            _ => None,
        }
    }

    fn wants_write(&self) -> bool {
        match &self.wire {
            Wire::Udp(_) => false,
            Wire::Tcp(_) => !self.out.is_empty(),
            Wire::Tls(_, c) => c.wants_write(),
        }
    }

    /// Sends one packet of `size` payload bytes: sequence number and send time first.
    fn send(&mut self, size: usize, epoch: Instant, scratch: &mut Vec<u8>) -> Result<()> {
        scratch.clear();
        let stream = !matches!(self.wire, Wire::Udp(_));
        if self.turn {
            scratch.extend_from_slice(&CHANNEL.to_be_bytes());
            scratch.extend_from_slice(&(size as u16).to_be_bytes());
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        scratch.extend_from_slice(&seq.to_be_bytes());
        scratch.extend_from_slice(&(epoch.elapsed().as_nanos() as u64).to_be_bytes());
        let header = if self.turn { 4 } else { 0 };
        let mut total = header + size.max(16);
        if self.turn && stream {
            total = (total + 3) & !3;
        }
        scratch.resize(total, 0);
        self.sent += 1;
        match &mut self.wire {
            // Sent with the others of this round by `flush`.
            Wire::Udp(_) => {
                self.out.extend_from_slice(scratch);
                self.out_lens.push(scratch.len());
            }
            Wire::Tcp(_) => self.out.extend_from_slice(scratch),
            Wire::Tls(_, c) => c.writer().write_all(scratch)?,
        }
        self.outstanding.push_back(seq);
        Ok(())
    }

    /// Writes what the stream can take now; sends the datagrams waiting, up to
    /// [`batch::BATCH`] per `sendmmsg` (what the kernel does not take is lost).
    fn flush(&mut self) -> Result<()> {
        match &mut self.wire {
            Wire::Udp(s) => {
                let to = self.to.context("a connected UDP socket")?;
                let mut off = 0;
                let mut untaken = 0;
                for lens in self.out_lens.chunks(batch::BATCH) {
                    let mut items = Vec::with_capacity(lens.len());
                    for &len in lens {
                        items.push((&self.out[off..off + len], to));
                        off += len;
                    }
                    untaken += items.len() - batch::send_batch(s.as_raw_fd(), &items);
                }
                self.out.clear();
                self.out_lens.clear();
                // Not taken by the kernel (buffer full, ICMP error): the last sent are
                // lost. Taken datagrams are consecutive from the first of the batch.
                for _ in 0..untaken {
                    if self.outstanding.pop_back().is_some() {
                        self.lost += 1;
                    }
                }
            }
            Wire::Tcp(s) => {
                while !self.out.is_empty() {
                    match s.write(&self.out) {
                        Ok(0) => bail!("connection closed"),
                        Ok(n) => {
                            self.out.drain(..n);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            Wire::Tls(s, c) => {
                while c.wants_write() {
                    match c.write_tls(s) {
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads everything available; calls `answer(seq, sent_ns)` per echoed packet.
    fn read(
        &mut self,
        buf: &mut [u8],
        rb: &mut batch::RecvBatch,
        mut answer: impl FnMut(&mut Flow, u64, u64),
    ) -> Result<()> {
        let payload = |p: &[u8]| -> Option<(u64, u64)> {
            let seq = u64::from_be_bytes(p.get(0..8)?.try_into().ok()?);
            let ts = u64::from_be_bytes(p.get(8..16)?.try_into().ok()?);
            Some((seq, ts))
        };
        let mut got = Vec::new();
        match &mut self.wire {
            // Until nothing more waits (or an ICMP error: a port closed), a batch
            // per `recvmmsg`.
            Wire::Udp(s) => {
                while let Ok(n) = rb.recv(s.as_raw_fd()) {
                    for i in 0..n {
                        let Some((p, _)) = rb.packet(i) else { continue };
                        let p = if self.turn {
                            match wire::channel_header(p) {
                                Some((_, len)) if 4 + len <= p.len() => &p[4..4 + len],
                                _ => continue,
                            }
                        } else {
                            p
                        };
                        got.extend(payload(p));
                    }
                }
            }
            Wire::Tcp(s) => loop {
                match s.read(buf) {
                    Ok(0) => bail!("connection closed"),
                    Ok(n) => self.inbuf.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e.into()),
                }
            },
            Wire::Tls(s, c) => loop {
                match c.read_tls(s) {
                    Ok(0) => bail!("connection closed"),
                    Ok(_) => {
                        c.process_new_packets()?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e.into()),
                }
                // Plaintext out after every record read (rustls bounds what it holds).
                loop {
                    match c.reader().read(buf) {
                        Ok(0) => bail!("connection closed"),
                        Ok(n) => self.inbuf.extend_from_slice(&buf[..n]),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e.into()),
                    }
                }
            },
        }
        // Stream: whole frames out of the buffer.
        let mut off = 0;
        loop {
            let rest = &self.inbuf[off..];
            let total = match wire::stream_frame(rest) {
                Frame::Complete(t) => t,
                Frame::Incomplete => break,
                Frame::Invalid => bail!("not STUN or ChannelData from the server"),
            };
            if let Some((_, len)) = wire::channel_header(rest) {
                if let Some(x) = payload(&rest[4..4 + len]) {
                    got.push(x);
                }
            }
            off += total;
        }
        self.inbuf.drain(..off);
        for (seq, ts) in got {
            answer(self, seq, ts);
        }
        Ok(())
    }

    /// An answer for `seq` came back: true if it was in flight (not given up on).
    /// Packets `window` or more older than an answer are given up on as lost.
    fn settle(&mut self, seq: u64, window: usize) -> bool {
        let Some(pos) = self.outstanding.iter().position(|&s| s == seq) else {
            return false;
        };
        self.outstanding.remove(pos);
        while self
            .outstanding
            .front()
            .is_some_and(|&s| s + window as u64 <= seq)
        {
            self.outstanding.pop_front();
            self.lost += 1;
        }
        true
    }
}

/// What the driving threads share with the one measuring.
#[derive(Default)]
pub struct Control {
    /// Round trips completed (all time).
    pub round_trips: AtomicU64,
    /// Record round-trip times now.
    pub measuring: AtomicBool,
    /// Stop sending; drain and return.
    pub stop: AtomicBool,
}

/// What one driving thread saw.
pub struct Tally {
    pub sent: u64,
    pub lost: u64,
    /// Round-trip times (ns) while measuring.
    pub rtts: Vec<u64>,
    pub flows: Vec<Flow>,
}

/// Runs the closed loop over `flows` until `ctl.stop`, then waits for what is in
/// flight (up to [`DRAIN`]); what never came back is lost.
pub fn drive(
    mut flows: Vec<Flow>,
    ctl: &Control,
    window: usize,
    size: usize,
    epoch: Instant,
) -> Result<Tally> {
    let mut scratch = Vec::with_capacity(size + 8);
    let mut buf = vec![0u8; 65_536];
    let mut rb = batch::RecvBatch::default();
    let mut rtts = Vec::new();
    for f in &mut flows {
        for _ in 0..window {
            f.send(size, epoch, &mut scratch)?;
        }
        f.last_rx = Instant::now();
        f.flush()?;
    }
    let mut fds: Vec<libc::pollfd> = flows
        .iter()
        .map(|f| libc::pollfd {
            fd: f.wire.fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let mut drain_until: Option<Instant> = None;
    loop {
        let stopping = ctl.stop.load(Ordering::Relaxed);
        if stopping && drain_until.is_none() {
            drain_until = Some(Instant::now() + DRAIN);
        }
        if let Some(d) = drain_until {
            if Instant::now() > d || flows.iter().all(|f| f.outstanding.is_empty()) {
                break;
            }
        }
        for (p, f) in fds.iter_mut().zip(&flows) {
            p.events = libc::POLLIN | if f.wants_write() { libc::POLLOUT } else { 0 };
            p.revents = 0;
        }
        // SAFETY: `fds` is a valid array of pollfd for the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 20) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        let measuring = ctl.measuring.load(Ordering::Relaxed);
        let mut done = 0u64;
        for (p, f) in fds.iter().zip(flows.iter_mut()) {
            if p.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0 {
                let mut answered = 0usize;
                f.read(&mut buf, &mut rb, |f, seq, ts| {
                    if f.settle(seq, window) {
                        answered += 1;
                        if measuring {
                            let now = epoch.elapsed().as_nanos() as u64;
                            rtts.push(now.saturating_sub(ts));
                        }
                    }
                })?;
                if answered > 0 {
                    f.last_rx = Instant::now();
                    done += answered as u64;
                }
            }
            if !stopping {
                if !f.outstanding.is_empty() && f.last_rx.elapsed() > LOSS_TIMEOUT {
                    // Nothing came back for a while: all of it is lost.
                    f.lost += f.outstanding.len() as u64;
                    f.outstanding.clear();
                    f.last_rx = Instant::now();
                }
                while f.outstanding.len() < window {
                    f.send(size, epoch, &mut scratch)?;
                }
            }
            f.flush()?;
        }
        if done > 0 {
            ctl.round_trips.fetch_add(done, Ordering::Relaxed);
        }
    }
    let mut sent = 0;
    let mut lost = 0;
    for f in &mut flows {
        f.lost += f.outstanding.len() as u64;
        f.outstanding.clear();
        sent += f.sent;
        lost += f.lost;
    }
    Ok(Tally {
        sent,
        lost,
        rtts,
        flows,
    })
}

/// The result of one closed-loop run.
#[derive(Clone, Copy, Debug, Default)]
pub struct Closed {
    /// Relayed packets per second, both directions (two per round trip).
    pub pps: f64,
    /// Fraction of packets sent that did not come back.
    pub loss: f64,
    /// Round-trip time percentiles, µs.
    pub p50: f64,
    pub p99: f64,
    /// Server CPU per relayed packet, µs.
    pub cpu: f64,
}

/// Runs `flows` in `threads` driving threads: ramp, measure over `secs` (round trips,
/// their times, and process `pid`'s CPU time), stop, drain. Returns the figures and
/// the flows (for tearing the allocations down).
pub fn measure(
    flows: Vec<Flow>,
    pid: u32,
    window: usize,
    size: usize,
    secs: Duration,
    cpu_seconds: impl Fn(u32) -> Result<f64>,
) -> Result<(Closed, Vec<Flow>)> {
    let threads = if flows.len() > 1 { 2 } else { 1 };
    let mut groups: Vec<Vec<Flow>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, f) in flows.into_iter().enumerate() {
        groups[i % threads].push(f);
    }
    let ctl = Arc::new(Control::default());
    let epoch = Instant::now();
    let handles: Vec<_> = groups
        .into_iter()
        .map(|g| {
            let ctl = ctl.clone();
            std::thread::spawn(move || drive(g, &ctl, window, size, epoch))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    ctl.measuring.store(true, Ordering::Relaxed);
    let c0 = ctl.round_trips.load(Ordering::Relaxed);
    let cpu0 = cpu_seconds(pid)?;
    let t0 = Instant::now();
    std::thread::sleep(secs);
    let c1 = ctl.round_trips.load(Ordering::Relaxed);
    let cpu1 = cpu_seconds(pid)?;
    let window_s = t0.elapsed().as_secs_f64();
    ctl.measuring.store(false, Ordering::Relaxed);
    ctl.stop.store(true, Ordering::Relaxed);
    let mut sent = 0;
    let mut lost = 0;
    let mut rtts = Vec::new();
    let mut flows = Vec::new();
    let mut failure = None;
    for h in handles {
        match h.join().map_err(|_| anyhow!("driver panicked"))? {
            Ok(t) => {
                sent += t.sent;
                lost += t.lost;
                rtts.extend(t.rtts);
                flows.extend(t.flows);
            }
            Err(e) => failure = Some(e),
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    if c1 == c0 {
        bail!("no round trip completed while measuring");
    }
    rtts.sort_unstable();
    let pct = |q: f64| -> f64 {
        let i = ((rtts.len() as f64 * q) as usize).min(rtts.len().saturating_sub(1));
        rtts.get(i).map_or(0.0, |&ns| ns as f64 / 1000.0)
    };
    let relayed = 2 * (c1 - c0);
    Ok((
        Closed {
            pps: relayed as f64 / window_s,
            loss: if sent == 0 {
                0.0
            } else {
                lost as f64 / sent as f64
            },
            p50: pct(0.5),
            p99: pct(0.99),
            cpu: (cpu1 - cpu0) * 1e6 / relayed as f64,
        },
        flows,
    ))
}

/// The middle value of `v` (sorted in place); 0 for none.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// A bare-forwarder flow: a connected UDP socket sending raw payloads, or a TCP
/// connection carrying ChannelData frames.
pub fn forwarder_flow(front: SocketAddr, tcp: bool) -> Result<Flow> {
    if tcp {
        let s = TcpStream::connect(front)?;
        s.set_nodelay(true)?;
        return Flow::new(Wire::Tcp(s), true, Vec::new());
    }
    let s = UdpSocket::bind("127.0.0.1:0")?;
    s.connect(front)?;
    Flow::new(Wire::Udp(s), false, Vec::new())
}

/// Reads the forwarder's port from its first line of output.
pub fn read_port(out: &mut impl Read) -> Result<u16> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while out.read(&mut b)? == 1 && b[0] != b'\n' {
        line.push(b[0]);
        if line.len() > 16 {
            break;
        }
    }
    String::from_utf8(line)?
        .trim()
        .parse()
        .context("forwarder port")
}
