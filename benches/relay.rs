//! Relay load generator: meshmeet (release binary, separate process) against coturn
//! (`turnserver` from Debian) configured alike on loopback, in the same run.
//!
//! One way (`oneway`): relayed packets/s (raw ChannelData client -> peer over UDP,
//! TCP and TLS, 100 and 1200 byte payloads, 1 and 100 allocations) counted at the peer,
//! with the loss at that offered rate and the server's CPU time per relayed packet.
//!
//! Closed loop (`closed`, [`closed`]): a UDP echo peer sends every packet back through
//! the relay, each allocation keeps a bounded window of packets in flight, and round
//! trips are counted and timed at the client: relayed packets/s (both directions),
//! loss, p50/p99 round trip, and server CPU per relayed packet, for meshmeet, coturn,
//! and on the UDP and TCP rows a bare forwarder (one `recv` and one `send` per packet,
//! no TURN work; over TCP it parses ChannelData frames and writes one per datagram)
//! as the floor.
//!
//! `rates`: allocations per second, and STUN Binding answers per second.
//!
//! CPU time per packet (utime + stime from `/proc/PID/stat` over the measured window)
//! is the figure to compare on a busy machine: the rates depend on how much CPU the
//! servers get, the cost of a packet much less.
//!
//! TLS rows: meshmeet's TURN over TLS on its shared HTTPS port (no ALPN offered, as
//! browsers do, so each connection is classified by its first decrypted bytes) against
//! coturn's `tls-listening-port`, both with the same self-signed certificate.
//!
//! `cargo bench --bench relay -- [oneway|closed|rates|all]... [--only udp,tcp,tls]
//! [--sizes 100,1200] [--allocs 1,100] [--secs S] [--repeats N] [--window N]
//! [--baseline PATH] [--no-coturn]` (needs `turnserver` on PATH). Without a mode, all
//! three run. The closed loop keeps 16 packets in flight per allocation with one
//! allocation, 2 with 100 (`--window` sets one figure for all). `--secs` (or `MESHMEET_BENCH_SECS`) is the length of each measurement,
//! default 2; each figure is the median of `--repeats` runs (default 3), interleaved
//! between the servers. `--baseline` adds another meshmeet binary (an earlier build)
//! as a column of the same run. `MESHMEET_BENCH_ONLY=udp|tcp|tls|rates` still selects
//! one group.

#[path = "relay/closed.rs"]
mod closed;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use meshmeet::relay::client::{self, Attr, Session};
use meshmeet::relay::wire::{self, Frame};
use stun::message::{
    Message, Method, Setter, METHOD_ALLOCATE, METHOD_CHANNEL_BIND, METHOD_REFRESH,
};

const SECRET: &str = "bench-secret-0123456789abcdef";
const REALM: &str = "meshmeet";
/// Runs per relay figure; the median is reported (the machine may be shared).
const REPEATS: usize = 3;

struct Server {
    name: &'static str,
    /// Speaks TURN (false: the bare forwarder, raw datagrams).
    turn: bool,
    child: Child,
    addr: SocketAddr,
    /// TURN over TLS: meshmeet's HTTPS port, coturn's `tls-listening-port`.
    tls: SocketAddr,
}

/// How a client reaches the relay.
#[derive(Clone, Copy, PartialEq)]
enum Via {
    Udp,
    Tcp,
    Tls,
}

impl Via {
    fn label(self) -> &'static str {
        match self {
            Via::Udp => "UDP",
            Via::Tcp => "TCP",
            Via::Tls => "TLS (meshmeet: shared HTTPS port)",
        }
    }
}

/// What TLS clients trust: the self-signed certificate both servers use.
static TLS_CLIENT: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port free for both UDP and TCP right now.
fn free_port() -> Result<u16> {
    for _ in 0..50 {
        let u = UdpSocket::bind("127.0.0.1:0")?;
        let port = u.local_addr()?.port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port")
}

/// meshmeet from `bin` (this build's, or an earlier one to compare with).
fn start_meshmeet(name: &'static str, bin: &Path, dir: &Path) -> Result<Server> {
    // Outside the relay port range below, which may not hold the listener's port.
    let port = loop {
        let p = free_port()?;
        if !(40000..=49999).contains(&p) {
            break p;
        }
    };
    let https = free_port()?;
    let cfg = format!(
        r#"data_dir = "{dir}"
[http]
listen = "127.0.0.1:{https}"
[log]
level = "warn"
[turn]
listen = "127.0.0.1:{port}"
tls_listen = ""
relay_ips = ["127.0.0.1"]
relay_ports = "40000-49999"
secret = "{SECRET}"
realm = "{REALM}"
allowed_peer_ranges = ["127.0.0.1/32"]
share_https_port = true
user_allocation_quota = 100000
total_allocation_quota = 100000
max_allocation_lifetime_s = 3600
"#,
        dir = dir.display()
    );
    let path = dir.join("meshmeet.toml");
    std::fs::write(&path, cfg)?;
    let mut cmd = Command::new(bin);
    cmd.arg("--config").arg(&path);
    let s = launch(name, &mut cmd, port, https).with_context(|| format!("start {name}"))?;
    let cert = std::fs::read(dir.join("selfsigned-cert.pem"))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &cert[..]) {
        roots.add(c?)?;
    }
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let _ = TLS_CLIENT.set(Arc::new(cfg));
    Ok(s)
}

/// coturn with meshmeet's self-signed certificate and key (in `cert_dir`).
fn start_coturn(dir: &Path, cert_dir: &Path) -> Result<Server> {
    let port = free_port()?;
    let tls = free_port()?;
    let pem = |f: &str| -> PathBuf { cert_dir.join(f) };
    let mut cmd = Command::new("turnserver");
    cmd.args([
        "-n",
        "--listening-ip=127.0.0.1",
        &format!("--listening-port={port}"),
        "--relay-ip=127.0.0.1",
        "--min-port=50000",
        "--max-port=59999",
        "--use-auth-secret",
        &format!("--static-auth-secret={SECRET}"),
        &format!("--realm={REALM}"),
        &format!("--tls-listening-port={tls}"),
        "--no-dtls",
        "--no-tcp-relay",
        "--no-cli",
        "--no-rfc5780",
        "--allow-loopback-peers",
        "--allowed-peer-ip=127.0.0.1",
        "--no-stdout-log",
        "--simple-log",
        "--max-allocate-lifetime=3600",
    ])
    .arg(format!("--cert={}", pem("selfsigned-cert.pem").display()))
    .arg(format!("--pkey={}", pem("selfsigned-key.pem").display()))
    .arg(format!("--log-file={}", dir.join("coturn.log").display()))
    .arg(format!("--pidfile={}", dir.join("coturn.pid").display()))
    .arg(format!("--db={}", dir.join("turndb").display()));
    launch("coturn", &mut cmd, port, tls).context("start turnserver (apt install coturn)")
}

/// Starts a server on loopback `port` (output discarded) and waits until it answers.
fn launch(name: &'static str, cmd: &mut Command, port: u16, tls: u16) -> Result<Server> {
    let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
    let s = Server {
        name,
        turn: true,
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        tls: SocketAddr::from(([127, 0, 0, 1], tls)),
    };
    wait_ready(s.addr)?;
    Ok(s)
}

/// Ready = answers a STUN Binding request.
fn wait_ready(addr: SocketAddr) -> Result<()> {
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        sock.send_to(&client::binding_request(), addr)?;
        if sock.recv_from(&mut buf).is_ok() {
            return Ok(());
        }
    }
    bail!("server on {addr} did not answer a Binding request")
}

/// REST credentials for `id`, valid for a day.
fn session(id: &str) -> Result<Session> {
    let expiry = meshmeet::clock::unix_secs() + 86_400;
    Ok(Session::rest(SECRET, id, expiry))
}

/// A request/response exchange, answering 401/438 challenges.
fn transact(
    link: &mut Link,
    session: &mut Session,
    method: Method,
    attrs: &[&dyn Setter],
) -> Result<Message> {
    for _ in 0..4 {
        let resp = link.roundtrip(&session.request(method, attrs))?;
        if session.learn(&resp) {
            continue;
        }
        if let Some(c) = client::error_code(&resp) {
            bail!("{method} failed with {c}");
        }
        return Ok(resp);
    }
    bail!("challenge loop")
}

/// TURN over TLS on the client side.
type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A client connection to the server: a connected UDP socket or a stream (with the
/// bytes read and not yet framed).
enum Link {
    Udp(UdpSocket),
    Tcp(TcpStream, Vec<u8>),
    Tls(Box<TlsStream>, Vec<u8>),
}

impl Link {
    /// `to` is the server's STUN/TURN address, or for TLS its TLS address.
    fn open(to: SocketAddr, via: Via) -> Result<Link> {
        if via == Via::Udp {
            let s = UdpSocket::bind("127.0.0.1:0")?;
            s.connect(to)?;
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            return Ok(Link::Udp(s));
        }
        let s = TcpStream::connect(to)?;
        s.set_nodelay(true)?;
        // A server may still be relaying the previous run's backlog.
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        if via == Via::Tcp {
            return Ok(Link::Tcp(s, Vec::new()));
        }
        // No ALPN, as browsers' `turns:` connections.
        let cfg = TLS_CLIENT.get().context("no TLS client config")?.clone();
        let name = rustls::pki_types::ServerName::try_from("localhost")?;
        let conn = rustls::ClientConnection::new(cfg, name)?;
        let mut tls = rustls::StreamOwned::new(conn, s);
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock)?;
        }
        Ok(Link::Tls(Box::new(tls), Vec::new()))
    }

    fn roundtrip(&mut self, req: &[u8]) -> Result<Message> {
        let answer = |bytes: &[u8]| client::parse(bytes).filter(|m| client::answers(req, m));
        match self {
            Link::Udp(s) => {
                let mut buf = [0u8; 2048];
                for _ in 0..6 {
                    s.send(req)?;
                    while let Ok(n) = s.recv(&mut buf) {
                        if let Some(m) = answer(&buf[..n]) {
                            return Ok(m);
                        }
                    }
                }
                bail!("no answer")
            }
            Link::Tcp(s, pending) => stream_roundtrip(s, pending, req, answer),
            Link::Tls(s, pending) => stream_roundtrip(&mut **s, pending, req, answer),
        }
    }

    /// The same connection for the closed loop (non-blocking from there on).
    fn into_flow(self) -> Result<closed::Flow> {
        let (wire, leftover) = match self {
            Link::Udp(s) => (closed::Wire::Udp(s), Vec::new()),
            Link::Tcp(s, p) => (closed::Wire::Tcp(s), p),
            Link::Tls(s, p) => {
                let s = *s;
                (closed::Wire::Tls(s.sock, Box::new(s.conn)), p)
            }
        };
        closed::Flow::new(wire, true, leftover)
    }
}

fn stream_roundtrip(
    s: &mut (impl Read + Write),
    pending: &mut Vec<u8>,
    req: &[u8],
    answer: impl Fn(&[u8]) -> Option<Message>,
) -> Result<Message> {
    s.write_all(req)?;
    s.flush()?;
    loop {
        loop {
            let total = match wire::stream_frame(pending) {
                Frame::Complete(total) => total,
                Frame::Incomplete => break,
                Frame::Invalid => bail!("not STUN or ChannelData"),
            };
            let frame: Vec<u8> = pending.drain(..total).collect();
            if let Some(m) = wire::is_stun(&frame).then(|| answer(&frame)).flatten() {
                return Ok(m);
            }
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk)?;
        if n == 0 {
            bail!("connection closed");
        }
        pending.extend_from_slice(&chunk[..n]);
    }
}

fn allocate(link: &mut Link, session: &mut Session) -> Result<SocketAddr> {
    let resp = transact(link, session, METHOD_ALLOCATE, &[&Attr::UDP])?;
    client::relayed_address(&resp).context("no XOR-RELAYED-ADDRESS")
}

fn channel_bind(link: &mut Link, session: &mut Session, ch: u16, peer: SocketAddr) -> Result<()> {
    transact(
        link,
        session,
        METHOD_CHANNEL_BIND,
        &[&Attr::Channel(ch), &Attr::Peer(peer)],
    )?;
    Ok(())
}

/// The bare forwarder (this bench binary run with `--forwarder`), sending to `echo`.
fn start_forwarder(echo: SocketAddr) -> Result<Server> {
    let mut child = Command::new(std::env::current_exe()?)
        .arg("--forwarder")
        .arg(echo.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let port = match child.stdout.as_mut() {
        Some(out) => closed::read_port(out),
        None => Err(anyhow!("no forwarder output")),
    };
    let port = match port {
        Ok(p) => p,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    Ok(Server {
        name: "bare forwarder",
        turn: false,
        child,
        addr,
        tls: addr,
    })
}

/// A UDP sink counting datagrams on its own thread.
struct Sink {
    addr: SocketAddr,
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sink {
    fn new() -> Result<Sink> {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
        let _ = sock.set_recv_buffer_size(8 << 20);
        sock.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
        let sock: UdpSocket = sock.into();
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let addr = sock.local_addr()?;
        let count = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (count.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                if sock.recv_from(&mut buf).is_ok() {
                    c.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Ok(Sink {
            addr,
            count,
            stop,
            thread: Some(thread),
        })
    }

    /// Waits until no datagram arrived for 150 ms, then returns the count.
    fn settle(&self) -> u64 {
        let mut last = self.count.load(Ordering::Relaxed);
        loop {
            std::thread::sleep(Duration::from_millis(150));
            let now = self.count.load(Ordering::Relaxed);
            if now == last {
                return now;
            }
            last = now;
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// CPU time (user and system) a process has used so far, in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces): state is the first,
    // utime and stime the 12th and 13th.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("unexpected /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        Ok(fields.get(i).context("short /proc stat")?.parse::<f64>()?)
    };
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((ticks(11)? + ticks(12)?) / hz)
}

/// Relayed ChannelData rate client -> peer: (packets/s delivered, loss fraction,
/// server CPU microseconds per delivered packet).
fn relay_rate(
    server: &Server,
    via: Via,
    allocs: usize,
    size: usize,
    secs: Duration,
) -> Result<(f64, f64, f64)> {
    let tcp = via != Via::Udp;
    let sink = Sink::new()?;
    let mut links = Vec::new();
    for i in 0..allocs {
        let to = if via == Via::Tls {
            server.tls
        } else {
            server.addr
        };
        let mut link = Link::open(to, via)?;
        let mut session = session(&format!("bench{i}"))?;
        allocate(&mut link, &mut session)?;
        channel_bind(&mut link, &mut session, 0x4000, sink.addr)?;
        links.push((link, session));
    }
    let frame = client::channel_data(0x4000, &vec![0u8; size], tcp);
    // Warm-up: one packet per allocation must arrive (readiness of every path).
    for (l, _) in &mut links {
        send_frames(l, &frame, 1)?;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while sink.count.load(Ordering::Relaxed) < allocs as u64 {
        if Instant::now() > deadline {
            bail!("warm-up packets not relayed by {}", server.name);
        }
        std::thread::yield_now();
    }
    sink.settle();
    sink.count.store(0, Ordering::Relaxed);
    // Two sender threads share the allocations and offer as much as they can. The
    // rate is counted at the peer over a window while the load is on (after a short
    // ramp), so data still queued in buffers when the senders stop does not count.
    let stop = Arc::new(AtomicBool::new(false));
    let mut groups: Vec<Vec<(Link, Session)>> = vec![Vec::new(), Vec::new()];
    for (i, l) in links.into_iter().enumerate() {
        groups[i % 2].push(l);
    }
    let mut handles = Vec::new();
    for mut group in groups.into_iter().filter(|g| !g.is_empty()) {
        let frame = frame.clone();
        let stop = stop.clone();
        handles.push(std::thread::spawn(
            move || -> Result<(u64, Vec<(Link, Session)>)> {
                let mut sent = 0u64;
                let batch = if tcp { 16 } else { 1 };
                while !stop.load(Ordering::Relaxed) {
                    for (l, _) in group.iter_mut() {
                        sent += send_frames(l, &frame, batch)?;
                    }
                }
                Ok((sent, group))
            },
        ));
    }
    std::thread::sleep(Duration::from_millis(250));
    let c0 = sink.count.load(Ordering::Relaxed);
    let cpu0 = cpu_seconds(server.child.id())?;
    let t0 = Instant::now();
    std::thread::sleep(secs);
    let c1 = sink.count.load(Ordering::Relaxed);
    let cpu1 = cpu_seconds(server.child.id())?;
    let window = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut sent = 0;
    let mut done = Vec::new();
    for h in handles {
        let (n, group) = h.join().map_err(|_| anyhow!("sender panicked"))??;
        sent += n;
        done.extend(group);
    }
    let got = sink.settle();
    // Free the allocations so later runs do not meet their 5-tuples again.
    for (mut link, mut session) in done {
        if !tcp {
            let _ = transact(
                &mut link,
                &mut session,
                METHOD_REFRESH,
                &[&Attr::Lifetime(0)],
            );
        }
    }
    let loss = if sent == 0 {
        0.0
    } else {
        1.0 - (got as f64 / sent as f64).min(1.0)
    };
    let delivered = (c1 - c0).max(1) as f64;
    Ok((
        (c1 - c0) as f64 / window,
        loss,
        (cpu1 - cpu0) * 1e6 / delivered,
    ))
}

fn send_frames(link: &mut Link, frame: &[u8], n: usize) -> Result<u64> {
    match link {
        Link::Udp(s) => {
            let mut sent = 0;
            for _ in 0..n {
                // A full socket buffer (ENOBUFS/EAGAIN) is an offered-but-lost packet.
                let _ = s.send(frame);
                sent += 1;
            }
            Ok(sent)
        }
        Link::Tcp(s, _) => write_frames(s, frame, n),
        Link::Tls(s, _) => write_frames(&mut **s, frame, n),
    }
}

fn write_frames(s: &mut impl Write, frame: &[u8], n: usize) -> Result<u64> {
    let mut buf = Vec::with_capacity(frame.len() * n);
    for _ in 0..n {
        buf.extend_from_slice(frame);
    }
    s.write_all(&buf)?;
    s.flush()?;
    Ok(n as u64)
}

/// Complete allocations per second (challenge, Allocate, Refresh 0), 4 clients.
fn allocation_rate(server: &Server, dur: Duration) -> Result<f64> {
    let start = Instant::now();
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let addr = server.addr;
            std::thread::spawn(move || -> Result<u64> {
                let mut n = 0u64;
                while start.elapsed() < dur {
                    let mut link = Link::open(addr, Via::Udp)?;
                    let mut session = session(&format!("alloc{t}"))?;
                    // A fresh socket may reuse the port of a 5-tuple the server still
                    // remembers (437); only completed allocations count.
                    if allocate(&mut link, &mut session).is_ok() {
                        n += 1;
                        let _ = transact(
                            &mut link,
                            &mut session,
                            METHOD_REFRESH,
                            &[&Attr::Lifetime(0)],
                        );
                    }
                }
                Ok(n)
            })
        })
        .collect();
    let mut total = 0;
    for h in handles {
        total += h.join().map_err(|_| anyhow!("client panicked"))??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// Binding answers per second: 4 clients with 16 requests in flight each.
fn binding_rate(server: &Server, dur: Duration) -> Result<f64> {
    let start = Instant::now();
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let addr = server.addr;
            std::thread::spawn(move || -> Result<u64> {
                let s = UdpSocket::bind("127.0.0.1:0")?;
                s.connect(addr)?;
                s.set_read_timeout(Some(Duration::from_millis(100)))?;
                let req = client::binding_request();
                let mut buf = [0u8; 512];
                for _ in 0..16 {
                    s.send(&req)?;
                }
                let mut n = 0u64;
                while start.elapsed() < dur {
                    match s.recv(&mut buf) {
                        Ok(_) => {
                            n += 1;
                            s.send(&req)?;
                        }
                        Err(_) => {
                            // Lost in flight: refill the window.
                            for _ in 0..16 {
                                s.send(&req)?;
                            }
                        }
                    }
                }
                Ok(n)
            })
        })
        .collect();
    let mut total = 0;
    for h in handles {
        total += h.join().map_err(|_| anyhow!("client panicked"))??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// One closed-loop run: `allocs` allocations (or bare-forwarder flows) with `window`
/// packets in flight each, echoed by `echo`.
fn closed_rate(
    server: &Server,
    via: Via,
    allocs: usize,
    size: usize,
    echo: SocketAddr,
    opts: &Opts,
) -> Result<closed::Closed> {
    let mut flows = Vec::new();
    let mut sessions = Vec::new();
    for i in 0..allocs {
        if !server.turn {
            flows.push(closed::forwarder_flow(server.addr, via == Via::Tcp)?);
            continue;
        }
        let to = if via == Via::Tls {
            server.tls
        } else {
            server.addr
        };
        // A fresh socket may reuse the port of a 5-tuple the server still remembers
        // (437), and a loaded machine may time a request out: a few attempts.
        let mut attempt = 0;
        let (link, session) = loop {
            let mut link = Link::open(to, via)?;
            let mut session = session(&format!("loop{i}"))?;
            let r = allocate(&mut link, &mut session)
                .and_then(|_| channel_bind(&mut link, &mut session, closed::CHANNEL, echo));
            match r {
                Ok(()) => break (link, session),
                Err(e) if attempt >= 3 => return Err(e),
                Err(_) => attempt += 1,
            }
        };
        flows.push(link.into_flow()?);
        sessions.push(session);
    }
    let (figures, flows) = closed::measure(
        flows,
        server.child.id(),
        opts.window.unwrap_or_else(|| default_window(allocs)),
        size,
        opts.secs,
        cpu_seconds,
    )?;
    // Free UDP allocations so later runs do not meet their 5-tuples again (a stream's
    // allocation ends with its connection).
    if server.turn && via == Via::Udp {
        for (flow, mut session) in flows.into_iter().zip(sessions) {
            if let Some(s) = flow.into_udp() {
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(Duration::from_millis(200)))?;
                let mut link = Link::Udp(s);
                let _ = transact(
                    &mut link,
                    &mut session,
                    METHOD_REFRESH,
                    &[&Attr::Lifetime(0)],
                );
            }
        }
    }
    Ok(figures)
}

/// Packets in flight per allocation unless `--window` says: 16 for one allocation,
/// fewer for many (200 in all), so that the load fits the sockets' default receive
/// buffers (`net.core.rmem_max`, about 200 KiB) on every server and on the echo peer:
/// a larger window measures buffer overflow (losses, 200 ms stalls), not the relay.
fn default_window(allocs: usize) -> usize {
    (200 / allocs.max(1)).clamp(2, 16)
}

/// What to run: `cargo bench --bench relay -- [oneway|closed|rates|all]... [--only
/// udp,tcp,tls] [--sizes 100,1200] [--allocs 1,100] [--secs S] [--repeats N]
/// [--window N] [--baseline PATH] [--no-coturn]`.
struct Opts {
    oneway: bool,
    closed: bool,
    rates: bool,
    vias: Vec<Via>,
    sizes: Vec<usize>,
    allocs: Vec<usize>,
    secs: Duration,
    repeats: usize,
    /// Packets in flight per allocation (closed loop); `None`: [`default_window`].
    window: Option<usize>,
    /// An earlier meshmeet binary measured in the same run, as "meshmeet-before".
    baseline: Option<PathBuf>,
    coturn: bool,
}

impl Opts {
    fn parse(args: &[String]) -> Result<Opts> {
        let list = |v: &str| -> Result<Vec<usize>> {
            v.split(',')
                .map(|x| x.trim().parse().context("a list of numbers"))
                .collect()
        };
        let env_secs: Option<f64> = std::env::var("MESHMEET_BENCH_SECS")
            .ok()
            .and_then(|v| v.parse().ok());
        let mut o = Opts {
            oneway: false,
            closed: false,
            rates: false,
            vias: vec![Via::Udp, Via::Tcp, Via::Tls],
            sizes: vec![100, 1200],
            allocs: vec![1, 100],
            secs: Duration::from_secs_f64(env_secs.unwrap_or(2.0)),
            repeats: REPEATS,
            window: None,
            baseline: None,
            coturn: true,
        };
        let mut only = std::env::var("MESHMEET_BENCH_ONLY").unwrap_or_default();
        let mut modes = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = || {
                it.next()
                    .cloned()
                    .with_context(|| format!("{a} needs a value"))
            };
            match a.as_str() {
                "--bench" => {}
                "--only" => only = value()?,
                "--sizes" => o.sizes = list(&value()?)?,
                "--allocs" => o.allocs = list(&value()?)?,
                "--secs" => o.secs = Duration::from_secs_f64(value()?.parse()?),
                "--repeats" => o.repeats = value()?.parse::<usize>()?.max(1),
                "--window" => o.window = Some(value()?.parse::<usize>()?.clamp(1, 4096)),
                "--baseline" => o.baseline = Some(PathBuf::from(value()?)),
                "--no-coturn" => o.coturn = false,
                m @ ("oneway" | "closed" | "rates" | "all") => modes.push(m.to_owned()),
                other => bail!("unknown argument {other}"),
            }
        }
        // The old group selector: `rates` alone, or one transport.
        if only.eq_ignore_ascii_case("rates") {
            modes.push("rates".into());
            only.clear();
        }
        if !only.is_empty() {
            o.vias = only
                .split(',')
                .map(|k| match k.trim().to_ascii_lowercase().as_str() {
                    "udp" => Ok(Via::Udp),
                    "tcp" => Ok(Via::Tcp),
                    "tls" => Ok(Via::Tls),
                    other => Err(anyhow!("unknown transport {other}")),
                })
                .collect::<Result<_>>()?;
        }
        let all = modes.is_empty() || modes.iter().any(|m| m == "all");
        o.oneway = all || modes.iter().any(|m| m == "oneway");
        o.closed = all || modes.iter().any(|m| m == "closed");
        // Allocation and Binding rates: with everything, or asked for.
        o.rates = (all && only.is_empty()) || modes.iter().any(|m| m == "rates");
        Ok(o)
    }
}

struct Row {
    name: String,
    /// One figure per server, in the servers' order (NaN: not measured).
    figures: Vec<f64>,
    unit: &'static str,
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "--forwarder") {
        let echo: SocketAddr = args
            .get(i + 1)
            .context("--forwarder needs the echo address")?
            .parse()?;
        return closed::forwarder_main(echo);
    }
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary
    // without it, and a load test has no place in the test suite.
    if !args.iter().any(|a| a == "--bench") {
        println!("relay benchmark: run with `cargo bench --bench relay`");
        return Ok(());
    }
    let opts = Opts::parse(&args)?;
    meshmeet::tls::install_crypto_provider();
    let dir = tempfile::tempdir()?;
    let mdir = dir.path().join("meshmeet");
    let cdir = dir.path().join("coturn");
    std::fs::create_dir_all(&mdir)?;
    std::fs::create_dir_all(&cdir)?;
    let mut servers = vec![start_meshmeet(
        "meshmeet",
        Path::new(env!("CARGO_BIN_EXE_meshmeet")),
        &mdir,
    )?];
    if let Some(bin) = &opts.baseline {
        let bdir = dir.path().join("before");
        std::fs::create_dir_all(&bdir)?;
        // The same self-signed certificate (it is reused when present), which is the
        // one TLS clients trust.
        for f in ["selfsigned-cert.pem", "selfsigned-key.pem"] {
            std::fs::copy(mdir.join(f), bdir.join(f))?;
        }
        servers.push(start_meshmeet("meshmeet-before", bin, &bdir)?);
    }
    if opts.coturn {
        servers.push(start_coturn(&cdir, &mdir)?);
    }
    let started = Instant::now();
    if opts.oneway {
        let rows = oneway_rows(&servers, &opts)?;
        println!("\nOne way (client to peer, counted at the peer):");
        print_table(&servers, &rows);
    }
    if opts.closed {
        let echo = closed::EchoPeer::new()?;
        let forwarder = if opts.vias.contains(&Via::Udp) || opts.vias.contains(&Via::Tcp) {
            Some(start_forwarder(echo.addr)?)
        } else {
            None
        };
        let rows = closed_rows(&servers, forwarder.as_ref(), echo.addr, &opts)?;
        let mut names: Vec<&Server> = servers.iter().collect();
        names.extend(forwarder.as_ref());
        let window = match opts.window {
            Some(w) => w.to_string(),
            None => opts
                .allocs
                .iter()
                .map(|&a| format!("{} with {a} allocations", default_window(a)))
                .collect::<Vec<_>>()
                .join(", "),
        };
        println!(
            "\nClosed loop (echo peer; packets in flight per allocation: {window}; pkt/s \
             counts both directions, two relayed packets per round trip):"
        );
        print_table_of(&names, &rows);
    }
    if opts.rates {
        let rows = rate_rows(&servers, &opts)?;
        println!("\nAllocations and Binding answers:");
        print_table(&servers, &rows);
    }
    eprintln!("(bench ran {:.0} s)", started.elapsed().as_secs_f64());
    Ok(())
}

/// The median of `repeats` runs of `f` per server, runs interleaved between the
/// servers so all see the same background.
fn interleaved<T: Copy>(
    servers: &[&Server],
    repeats: usize,
    mut f: impl FnMut(&Server) -> Result<T>,
) -> Result<Vec<Vec<T>>> {
    let mut runs: Vec<Vec<T>> = servers.iter().map(|_| Vec::new()).collect();
    for _ in 0..repeats {
        for (i, s) in servers.iter().enumerate() {
            runs[i].push(f(s)?);
        }
    }
    Ok(runs)
}

/// Each server's lowest and highest figure over its runs, for the log: a median
/// difference smaller than these spreads is noise.
fn spreads<T>(servers: &[&Server], runs: &[Vec<T>], f: impl Fn(&T) -> f64) -> String {
    servers
        .iter()
        .zip(runs)
        .map(|(s, r)| {
            let v = r.iter().map(&f);
            let lo = v.clone().fold(f64::INFINITY, f64::min);
            let hi = v.fold(f64::NEG_INFINITY, f64::max);
            format!("{} {lo:.0}-{hi:.0}", s.name)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn oneway_rows(servers: &[Server], opts: &Opts) -> Result<Vec<Row>> {
    let refs: Vec<&Server> = servers.iter().collect();
    let mut rows = Vec::new();
    for &via in &opts.vias {
        let label = via.label();
        for &size in &opts.sizes {
            for &allocs in &opts.allocs {
                let runs = interleaved(&refs, opts.repeats, |s| {
                    relay_rate(s, via, allocs, size, opts.secs)
                        .with_context(|| format!("{} {label} {size} B x{allocs}", s.name))
                })?;
                let spread = spreads(&refs, &runs, |r| r.0);
                let mut pps = Vec::new();
                let mut loss = Vec::new();
                let mut cpu = Vec::new();
                for mut r in runs {
                    // The median run by rate, with its loss; the median CPU cost alone.
                    r.sort_by(|a, b| a.0.total_cmp(&b.0));
                    let (p, l, _) = r[r.len() / 2];
                    pps.push(p);
                    loss.push(l * 100.0);
                    let mut c: Vec<f64> = r.iter().map(|x| x.2).collect();
                    cpu.push(closed::median(&mut c));
                }
                let tag = format!("{label}, {size} B, {allocs} alloc");
                eprintln!(
                    "one way {tag}: pkt/s {pps:.0?}, CPU µs/pkt {cpu:.2?}; pkt/s of single runs: {spread}"
                );
                rows.push(Row {
                    name: format!("relayed pkt/s, {tag}"),
                    figures: pps,
                    unit: "pkt/s",
                });
                rows.push(Row {
                    name: format!("loss at that rate, {tag}"),
                    figures: loss,
                    unit: "%",
                });
                rows.push(Row {
                    name: format!("server CPU per packet (lower is better), {tag}"),
                    figures: cpu,
                    unit: "µs",
                });
            }
        }
    }
    Ok(rows)
}

fn closed_rows(
    servers: &[Server],
    forwarder: Option<&Server>,
    echo: SocketAddr,
    opts: &Opts,
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &via in &opts.vias {
        let label = via.label();
        let mut targets: Vec<&Server> = servers.iter().collect();
        // The floor forwards UDP and TCP (ChannelData frames); not TLS.
        let floor = via != Via::Tls && forwarder.is_some();
        targets.extend(forwarder.filter(|_| floor));
        for &size in &opts.sizes {
            for &allocs in &opts.allocs {
                let runs = interleaved(&targets, opts.repeats, |s| {
                    closed_rate(s, via, allocs, size, echo, opts)
                        .with_context(|| format!("{} {label} {size} B x{allocs}", s.name))
                })?;
                let med = |f: fn(&closed::Closed) -> f64| -> Vec<f64> {
                    let mut v: Vec<f64> = runs
                        .iter()
                        .map(|r| {
                            let mut x: Vec<f64> = r.iter().map(f).collect();
                            closed::median(&mut x)
                        })
                        .collect();
                    if !floor {
                        v.push(f64::NAN);
                    }
                    v
                };
                let tag = format!("{label}, {size} B, {allocs} alloc");
                let pps = med(|c| c.pps);
                let cpu = med(|c| c.cpu);
                let spread = spreads(&targets, &runs, |c| c.pps);
                eprintln!(
                    "closed loop {tag}: pkt/s {pps:.0?}, CPU µs/pkt {cpu:.2?}; pkt/s of single runs: {spread}"
                );
                rows.push(Row {
                    name: format!("relayed pkt/s, {tag}"),
                    figures: pps,
                    unit: "pkt/s",
                });
                rows.push(Row {
                    name: format!("loss, {tag}"),
                    figures: med(|c| c.loss * 100.0),
                    unit: "%",
                });
                rows.push(Row {
                    name: format!("round trip p50, {tag}"),
                    figures: med(|c| c.p50),
                    unit: "µs rtt",
                });
                rows.push(Row {
                    name: format!("round trip p99, {tag}"),
                    figures: med(|c| c.p99),
                    unit: "µs rtt",
                });
                rows.push(Row {
                    name: format!("server CPU per packet (lower is better), {tag}"),
                    figures: cpu,
                    unit: "µs",
                });
            }
        }
    }
    Ok(rows)
}

fn rate_rows(servers: &[Server], opts: &Opts) -> Result<Vec<Row>> {
    let refs: Vec<&Server> = servers.iter().collect();
    let runs = interleaved(&refs, opts.repeats, |s| {
        Ok((
            allocation_rate(s, opts.secs).with_context(|| format!("{} allocations", s.name))?,
            binding_rate(s, opts.secs).with_context(|| format!("{} bindings", s.name))?,
        ))
    })?;
    let med = |f: fn(&(f64, f64)) -> f64| -> Vec<f64> {
        runs.iter()
            .map(|r| {
                let mut x: Vec<f64> = r.iter().map(f).collect();
                closed::median(&mut x)
            })
            .collect()
    };
    Ok(vec![
        Row {
            name: "allocations/s (401, Allocate, Refresh 0)".into(),
            figures: med(|r| r.0),
            unit: "/s",
        },
        Row {
            name: "STUN Binding answers/s".into(),
            figures: med(|r| r.1),
            unit: "/s",
        },
    ])
}

fn print_table(servers: &[Server], rows: &[Row]) {
    let refs: Vec<&Server> = servers.iter().collect();
    print_table_of(&refs, rows);
}

/// A Markdown table: one column per server, then the ratios of meshmeet to each
/// other server (for pkt/s and rates: higher is better for meshmeet; for CPU and
/// latency: lower is; loss: the difference in points).
fn print_table_of(servers: &[&Server], rows: &[Row]) {
    println!();
    let mut head = String::from("| figure |");
    let mut rule = String::from("|---|");
    for s in servers {
        head += &format!(" {} |", column_name(s));
        rule += "---:|";
    }
    for s in servers.iter().skip(1) {
        head += &format!(" meshmeet / {} |", column_name(s));
        rule += "---:|";
    }
    println!("{head}");
    println!("{rule}");
    for r in rows {
        let fmt = |v: f64| {
            if v.is_nan() {
                "".to_string()
            } else if r.unit == "%" {
                format!("{v:.1} %")
            } else if r.unit == "µs" {
                format!("{v:.2} µs")
            } else if r.unit == "µs rtt" {
                format!("{v:.0} µs")
            } else {
                format!("{v:.0}")
            }
        };
        let mut line = format!("| {} |", r.name);
        for v in &r.figures {
            line += &format!(" {} |", fmt(*v));
        }
        let m = r.figures.first().copied().unwrap_or(f64::NAN);
        for v in r.figures.iter().skip(1) {
            let cell = if v.is_nan() || m.is_nan() {
                String::new()
            } else if r.unit == "%" {
                format!("{:+.1} pt", m - v)
            } else if *v > 0.0 {
                format!("{:.2}x", m / v)
            } else {
                "n/a".into()
            };
            line += &format!(" {cell} |");
        }
        println!("{line}");
    }
}

fn column_name(s: &Server) -> &'static str {
    match s.name {
        "coturn" => "coturn 4.6",
        n => n,
    }
}
