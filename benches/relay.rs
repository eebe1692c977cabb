//! Relay load generator: meshmeet (release binary, separate process) against coturn
//! (`turnserver` from Debian) configured alike on loopback, in the same run.
//!
//! Measures relayed packets/s (raw ChannelData client -> peer over UDP, TCP and TLS,
//! 100 and 1200 byte payloads, 1 and 100 allocations) with the loss at that offered
//! rate and the server's CPU time per relayed packet, allocations per second, and STUN
//! Binding answers per second, and prints a table with both servers and their ratio.
//! CPU time per packet is the figure to compare on a busy machine: the rates depend on
//! how much CPU the servers get, the cost of a packet much less.
//!
//! TLS rows: meshmeet's TURN over TLS on its shared HTTPS port (no ALPN offered, as
//! browsers do, so each connection is classified by its first decrypted bytes) against
//! coturn's `tls-listening-port`, both with the same self-signed certificate.
//!
//! `cargo bench --bench relay` (needs `turnserver` on PATH; `MESHMEET_BENCH_SECS`
//! sets the length of each measurement, default 2; `MESHMEET_BENCH_ONLY=udp|tcp|tls|rates`
//! one group of rows).

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
    /// The group name `MESHMEET_BENCH_ONLY` selects.
    fn key(self) -> &'static str {
        match self {
            Via::Udp => "udp",
            Via::Tcp => "tcp",
            Via::Tls => "tls",
        }
    }

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

fn start_meshmeet(dir: &Path) -> Result<Server> {
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
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshmeet"));
    cmd.arg("--config").arg(&path);
    let s = launch("meshmeet", &mut cmd, port, https).context("start meshmeet")?;
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

/// A byte stream to the server: TCP, or TLS over TCP.
trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// A client connection to the server: a connected UDP socket or a stream.
enum Link {
    Udp(UdpSocket),
    Tcp(Box<dyn Stream>, Vec<u8>),
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
            return Ok(Link::Tcp(Box::new(s), Vec::new()));
        }
        // No ALPN, as browsers' `turns:` connections.
        let cfg = TLS_CLIENT.get().context("no TLS client config")?.clone();
        let name = rustls::pki_types::ServerName::try_from("localhost")?;
        let conn = rustls::ClientConnection::new(cfg, name)?;
        let mut tls = rustls::StreamOwned::new(conn, s);
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock)?;
        }
        Ok(Link::Tcp(Box::new(tls), Vec::new()))
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
            Link::Tcp(s, pending) => {
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
        }
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

fn secs() -> Duration {
    let s: f64 = std::env::var("MESHMEET_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2.0);
    Duration::from_secs_f64(s)
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
fn relay_rate(server: &Server, via: Via, allocs: usize, size: usize) -> Result<(f64, f64, f64)> {
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
    std::thread::sleep(secs());
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
        Link::Tcp(s, _) => {
            let mut buf = Vec::with_capacity(frame.len() * n);
            for _ in 0..n {
                buf.extend_from_slice(frame);
            }
            s.write_all(&buf)?;
            s.flush()?;
            Ok(n as u64)
        }
    }
}

/// Complete allocations per second (challenge, Allocate, Refresh 0), 4 clients.
fn allocation_rate(server: &Server) -> Result<f64> {
    let dur = secs();
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
fn binding_rate(server: &Server) -> Result<f64> {
    let dur = secs();
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

struct Row {
    name: String,
    figures: [f64; 2],
    unit: &'static str,
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary
    // without it, and a load test has no place in the test suite.
    if !std::env::args().any(|a| a == "--bench") {
        println!("relay benchmark: run with `cargo bench --bench relay`");
        return Ok(());
    }
    meshmeet::tls::install_crypto_provider();
    let dir = tempfile::tempdir()?;
    let mdir = dir.path().join("meshmeet");
    let cdir = dir.path().join("coturn");
    std::fs::create_dir_all(&mdir)?;
    std::fs::create_dir_all(&cdir)?;
    let meshmeet = start_meshmeet(&mdir)?;
    let servers = [meshmeet, start_coturn(&cdir, &mdir)?];
    let mut rows: Vec<Row> = Vec::new();
    // MESHMEET_BENCH_ONLY=udp|tcp|tls|rates limits the run to one group of rows.
    let only = std::env::var("MESHMEET_BENCH_ONLY").unwrap_or_default();
    for via in [Via::Udp, Via::Tcp, Via::Tls] {
        let label = via.label();
        if !only.is_empty() && !only.eq_ignore_ascii_case(via.key()) {
            continue;
        }
        for size in [100usize, 1200] {
            for allocs in [1usize, 100] {
                let mut pps = [0.0; 2];
                let mut loss = [0.0; 2];
                let mut cpu = [0.0; 2];
                // Runs alternate between the servers so both see the same background.
                let mut runs: [Vec<(f64, f64, f64)>; 2] = [Vec::new(), Vec::new()];
                for _ in 0..REPEATS {
                    for (i, s) in servers.iter().enumerate() {
                        runs[i].push(
                            relay_rate(s, via, allocs, size).with_context(|| {
                                format!("{} {label} {size} B x{allocs}", s.name)
                            })?,
                        );
                    }
                }
                for i in 0..2 {
                    // The median run by rate, with its loss.
                    runs[i].sort_by(|a, b| a.0.total_cmp(&b.0));
                    let (p, l, _) = runs[i][runs[i].len() / 2];
                    pps[i] = p;
                    loss[i] = l * 100.0;
                    // The median CPU cost, on its own.
                    let mut c: Vec<f64> = runs[i].iter().map(|r| r.2).collect();
                    c.sort_by(f64::total_cmp);
                    cpu[i] = c[c.len() / 2];
                }
                let name = format!("relayed pkt/s, {label}, {size} B, {allocs} alloc");
                eprintln!("{name}: meshmeet {:.0}, coturn {:.0}", pps[0], pps[1]);
                rows.push(Row {
                    name: name.clone(),
                    figures: pps,
                    unit: "pkt/s",
                });
                rows.push(Row {
                    name: format!("loss at that rate, {label}, {size} B, {allocs} alloc"),
                    figures: loss,
                    unit: "%",
                });
                rows.push(Row {
                    name: format!(
                        "server CPU per packet (lower is better), {label}, {size} B, {allocs} alloc"
                    ),
                    figures: cpu,
                    unit: "µs",
                });
            }
        }
    }
    let mut a = [0.0; 2];
    let mut b = [0.0; 2];
    if !only.is_empty() && only != "rates" {
        print_table(&rows);
        return Ok(());
    }
    let mut ra: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut rb: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..REPEATS {
        for (i, s) in servers.iter().enumerate() {
            ra[i].push(allocation_rate(s).with_context(|| format!("{} allocations", s.name))?);
            rb[i].push(binding_rate(s).with_context(|| format!("{} bindings", s.name))?);
        }
    }
    for i in 0..2 {
        ra[i].sort_by(f64::total_cmp);
        rb[i].sort_by(f64::total_cmp);
        a[i] = ra[i][REPEATS / 2];
        b[i] = rb[i][REPEATS / 2];
        eprintln!(
            "{}: allocations/s {:.0}, bindings/s {:.0}",
            servers[i].name, a[i], b[i]
        );
    }
    rows.push(Row {
        name: "allocations/s (401, Allocate, Refresh 0)".into(),
        figures: a,
        unit: "/s",
    });
    rows.push(Row {
        name: "STUN Binding answers/s".into(),
        figures: b,
        unit: "/s",
    });
    print_table(&rows);
    Ok(())
}

fn print_table(rows: &[Row]) {
    println!();
    println!("| figure | meshmeet | coturn 4.6 | ratio |");
    println!("|---|---:|---:|---:|");
    for r in rows {
        let ratio = if r.unit == "%" {
            format!("{:+.1} pt", r.figures[0] - r.figures[1])
        } else if r.figures[1] > 0.0 {
            format!("{:.2}x", r.figures[0] / r.figures[1])
        } else {
            "n/a".into()
        };
        let fmt = |v: f64| {
            if r.unit == "%" {
                format!("{v:.1} %")
            } else if r.unit == "µs" {
                format!("{v:.2} µs")
            } else {
                format!("{v:.0}")
            }
        };
        println!(
            "| {} | {} | {} | {} |",
            r.name,
            fmt(r.figures[0]),
            fmt(r.figures[1]),
            ratio
        );
    }
}
