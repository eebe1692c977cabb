//! Soak: a bounded run of churn against the release `meshmeet` binary (its own
//! process, so RSS and descriptors are the server's alone).
//!
//! ```text
//! cargo bench --bench soak -- [--secs T] [--clients N] [--turn M]
//! ```
//! N WebSocket clients (default 2000) in rooms of 5 join, relay candidates and chat,
//! drop their socket and resume, leave and join again, over and over; they connect
//! from 127.0.1.1, 127.0.1.2, ... (100 per address), so the server's per-address
//! connection cap sees a crowd, not one abuser. M TURN clients (default 50) allocate,
//! permit a local echo peer, send numbered datagrams through Send indications and
//! count the round trips that come back as Data indications, and free, over and over.
//! Every 5 s it prints the server's RSS, open descriptors (`/proc/PID/fd`), and from
//! `/metrics` the open WebSockets, peers, rooms and active allocations. After T
//! seconds (default 180) everyone leaves; it then waits for rooms and allocations to
//! reach 0 and prints a summary: RSS and descriptors after warm-up (the first third)
//! as min/max, the final counts, and per TURN client whether it relayed.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use meshmeet::relay::client::{self, Attr, Session};
use rand::{Rng, SeedableRng};
use stun::message::{Method, Setter, METHOD_ALLOCATE, METHOD_CREATE_PERMISSION, METHOD_REFRESH};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const ROOM_SIZE: usize = 5;
const GRACE_S: u64 = 3;

struct Args {
    secs: u64,
    clients: usize,
    turn: usize,
}

fn parse_args() -> Args {
    let mut a = Args {
        secs: 180,
        clients: 2000,
        turn: 50,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut num = |name: &str| -> u64 {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} needs a number"))
        };
        match arg.as_str() {
            "--secs" => a.secs = num("--secs"),
            "--clients" => a.clients = num("--clients") as usize,
            "--turn" => a.turn = num("--turn") as usize,
            _ => {} // `--bench` and friends from cargo
        }
    }
    a
}

/// The server process, killed when dropped (on a panic too).
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Server {
    child: Proc,
    addr: SocketAddr,
    turn: SocketAddr,
    secret: String,
    tls: Arc<rustls::ClientConfig>,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
    l.local_addr().expect("addr").port()
}

/// Relay sockets' ports: below the kernel's ephemeral range (32768-60999), where the
/// listeners and the echo peer get theirs, so none shares a number with the TURN
/// listener (`check-config` refuses that) and the relay's ports stay apart.
const RELAY_PORTS: &str = "20000-29999";

/// The source address of WebSocket client `n`: 100 clients per address.
fn ws_source(n: usize) -> IpAddr {
    let k = n / 100;
    IpAddr::V4(Ipv4Addr::new(
        127,
        0,
        1 + (k / 250) as u8,
        1 + (k % 250) as u8,
    ))
}

impl Server {
    async fn start() -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let turn_port = {
            let u = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
            u.local_addr().expect("addr").port()
        };
        let cfg = dir.path().join("soak.toml");
        std::fs::write(
            &cfg,
            format!(
                "data_dir = {:?}\n[http]\nlisten = \"127.0.0.1:{port}\"\n[log]\nlevel = \"warn\"\n\
                 [rooms]\ncapacity = {ROOM_SIZE}\nresume_grace_s = {GRACE_S}\n\
                 rate_per_s = 1000\nrate_burst = 1000\n\
                 [turn]\nlisten = \"127.0.0.1:{turn_port}\"\ntls_listen = \"\"\n\
                 relay_ports = \"{RELAY_PORTS}\"\n\
                 allowed_peer_ranges = [\"127.0.0.0/8\"]\n",
                dir.path().display().to_string()
            ),
        )
        .expect("config");
        let child = Proc(
            Command::new(env!("CARGO_BIN_EXE_meshmeet"))
                .arg("--config")
                .arg(&cfg)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .expect("start meshmeet"),
        );
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let cert = dir.path().join("selfsigned-cert.pem");
        let start = Instant::now();
        loop {
            if cert.exists() && TcpStream::connect(addr).await.is_ok() {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "server did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let pem = std::fs::read(&cert).expect("cert");
        let secret = std::fs::read_to_string(dir.path().join("turn-secret"))
            .expect("turn secret")
            .trim()
            .to_string();
        let http = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("cert"))
            .resolve("localhost", addr)
            .build()
            .expect("client");
        Server {
            child,
            addr,
            turn: SocketAddr::from(([127, 0, 0, 1], turn_port)),
            secret,
            tls: client_config(&pem),
            http,
            _dir: dir,
        }
    }

    fn rss_kb(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.0.id()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.0.id()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// `/metrics` as text (empty when it cannot be had).
    async fn metrics(&self) -> String {
        let url = format!("https://localhost:{}/metrics", self.addr.port());
        match self.http.get(url).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// (WebSockets, peers, rooms, active allocations) from `/metrics`.
    async fn counts(&self) -> [i64; 4] {
        let text = self.metrics().await;
        let g = |name: &str| metric(&text, name).map_or(-1, |v| v as i64);
        [
            g("meshmeet_ws_connections"),
            g("meshmeet_peers"),
            g("meshmeet_rooms"),
            g("meshmeet_turn_allocations_active"),
        ]
    }

    /// A WebSocket from `source` (a loopback address).
    async fn connect(&self, source: IpAddr) -> Option<Ws> {
        let sock = TcpSocket::new_v4().ok()?;
        sock.bind(SocketAddr::new(source, 0)).ok()?;
        let tcp = sock.connect(self.addr).await.ok()?;
        let mut req = format!("wss://localhost:{}/ws", self.addr.port())
            .into_client_request()
            .ok()?;
        req.headers_mut().insert(
            "origin",
            format!("https://localhost:{}", self.addr.port())
                .parse()
                .ok()?,
        );
        let (ws, _) = tokio_tungstenite::client_async_tls_with_config(
            req,
            tcp,
            None,
            Some(Connector::Rustls(self.tls.clone())),
        )
        .await
        .ok()?;
        Some(ws)
    }
}

fn client_config(pem: &[u8]) -> Arc<rustls::ClientConfig> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(c.expect("pem")).expect("root");
    }
    Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// The value of the metric line `name` (exactly, labels included) in `text`.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[derive(Default)]
struct Stats {
    joins: AtomicU64,
    resumes: AtomicU64,
    sent: AtomicU64,
    /// WebSocket connects or joins that failed.
    failures: AtomicU64,
    /// TURN round trips: datagrams sent to the echo peer through the relay that came
    /// back as Data indications; and datagrams sent.
    relayed: AtomicU64,
    relay_sent: AtomicU64,
    allocations: AtomicU64,
    /// Allocate requests that got no answer, or an error other than a challenge.
    turn_failures: AtomicU64,
    /// Allocates answered 437: an allocation from an earlier attempt whose answer was
    /// lost, deleted and made again.
    turn_recovered: AtomicU64,
}

/// Reads until a `joined`; returns (id, resume token, resumed, peer ids).
async fn joined(ws: &mut Ws) -> Option<(String, String, bool, Vec<String>)> {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .ok()??
            .ok()?;
        let Message::Text(t) = m else { continue };
        let v: serde_json::Value = serde_json::from_str(t.as_str()).ok()?;
        if v["type"] == "joined" {
            let peers = v["peers"]
                .as_array()?
                .iter()
                .filter_map(|p| p["id"].as_str().map(str::to_string))
                .collect();
            return Some((
                v["id"].as_str()?.to_string(),
                v["resume"].as_str()?.to_string(),
                v["resumed"] == true,
                peers,
            ));
        }
        if v["type"] == "room_full" || v["type"] == "error" {
            return None;
        }
    }
}

/// Drains whatever arrived, without waiting.
async fn drain(ws: &mut Ws) -> bool {
    loop {
        match tokio::time::timeout(Duration::from_millis(1), ws.next()).await {
            Err(_) => return true,
            Ok(Some(Ok(_))) => continue,
            Ok(_) => return false,
        }
    }
}

/// One WebSocket client's life: join, talk, then drop-and-resume or leave-and-join,
/// until `stop`.
async fn ws_client(server: Arc<Server>, n: usize, stop: Arc<AtomicBool>, stats: Arc<Stats>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(n as u64);
    let room = format!("soak-{}", n / ROOM_SIZE);
    let mut token: Option<String> = None;
    while !stop.load(Ordering::Relaxed) {
        let Some(mut ws) = server.connect(ws_source(n)).await else {
            stats.failures.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let join = match &token {
            Some(t) => format!(r#"{{"type":"join","room":"{room}","name":"c{n}","resume":"{t}"}}"#),
            None => format!(r#"{{"type":"join","room":"{room}","name":"c{n}"}}"#),
        };
        if ws.send(Message::text(join)).await.is_err() {
            continue;
        }
        let Some((_id, t, resumed, peers)) = joined(&mut ws).await else {
            stats.failures.fetch_add(1, Ordering::Relaxed);
            token = None;
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        token = Some(t);
        if resumed {
            stats.resumes.fetch_add(1, Ordering::Relaxed);
        } else {
            stats.joins.fetch_add(1, Ordering::Relaxed);
        }
        // Talk for a while: candidates to each peer present, a chat line.
        let rounds = rng.gen_range(2..8);
        for _ in 0..rounds {
            for p in &peers {
                let m = format!(
                    r#"{{"type":"candidate","to":"{p}","candidate":{{"candidate":"candidate:1 1 udp 1 127.0.0.1 9 typ host","sdpMid":"0"}}}}"#
                );
                if ws.send(Message::text(m)).await.is_err() {
                    break;
                }
                stats.sent.fetch_add(1, Ordering::Relaxed);
            }
            let _ = ws
                .send(Message::text(r#"{"type":"chat","text":"soak"}"#))
                .await;
            stats.sent.fetch_add(1, Ordering::Relaxed);
            let wait = Duration::from_millis(rng.gen_range(200..1500));
            let until = tokio::time::Instant::now() + wait;
            while tokio::time::Instant::now() < until {
                if tokio::time::timeout_at(until, ws.next())
                    .await
                    .is_ok_and(|m| m.is_none())
                {
                    break;
                }
            }
            if stop.load(Ordering::Relaxed) {
                break;
            }
        }
        drain(&mut ws).await;
        if stop.load(Ordering::Relaxed) || rng.gen_bool(0.3) {
            // Leave for good, then (unless stopping) join again as a new peer.
            let _ = ws.send(Message::text(r#"{"type":"leave"}"#)).await;
            let _ = ws.close(None).await;
            token = None;
        } else {
            // A network drop: the TCP connection just goes; resume on a new one.
            drop(ws);
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(50..1000))).await;
    }
}

/// A TURN client's requests over UDP, retransmitted like RFC 8489 says (500 ms, then
/// doubling, 7 tries) so that a loaded server's late answers still count, with the
/// 401/438 challenge answered.
struct TurnClient {
    sock: UdpSocket,
    server: SocketAddr,
    session: Session,
    buf: Vec<u8>,
    /// Data indications that arrived while an answer was awaited (late echoes).
    late_data: u64,
}

impl TurnClient {
    /// One transaction: the answer to `req`, or `None` after the last retransmission.
    async fn ask(&mut self, req: &[u8]) -> Option<stun::message::Message> {
        let mut rto = Duration::from_millis(500);
        for _ in 0..7 {
            self.sock.send_to(req, self.server).await.ok()?;
            let deadline = tokio::time::Instant::now() + rto;
            while let Ok(Ok((len, _))) =
                tokio::time::timeout_at(deadline, self.sock.recv_from(&mut self.buf)).await
            {
                let Some(m) = client::parse(&self.buf[..len]) else {
                    continue;
                };
                if client::answers(req, &m) {
                    return Some(m);
                }
                if client::data(&m).is_some() {
                    self.late_data += 1;
                }
            }
            rto = (rto * 2).min(Duration::from_secs(4));
        }
        None
    }

    fn build(&self, method: Method, attrs: &[Attr]) -> Vec<u8> {
        let refs: Vec<&dyn Setter> = attrs.iter().map(|a| a as &dyn Setter).collect();
        self.session.request(method, &refs)
    }

    /// A request, authenticated, learning a new nonce (401 first, 438 later) once.
    async fn request(&mut self, method: Method, attrs: &[Attr]) -> Option<stun::message::Message> {
        let m = self.ask(&self.build(method, attrs)).await?;
        if self.session.learn(&m) {
            return self.ask(&self.build(method, attrs)).await;
        }
        Some(m)
    }

    /// Deletes this 5-tuple's allocation (Refresh with LIFETIME 0).
    async fn free(&mut self) -> bool {
        self.request(METHOD_REFRESH, &[Attr::Lifetime(0)])
            .await
            .is_some_and(|m| client::is_success(&m) || client::error_code(&m) == Some(437))
    }

    /// An allocation for this 5-tuple. A 437 means the server holds one made by an
    /// earlier Allocate whose answer was lost: it is deleted and made again.
    async fn allocate(&mut self, stats: &Stats) -> bool {
        for _ in 0..2 {
            let Some(m) = self.request(METHOD_ALLOCATE, &[Attr::UDP]).await else {
                return false;
            };
            if client::is_success(&m) {
                return true;
            }
            if client::error_code(&m) != Some(437) || !self.free().await {
                return false;
            }
            stats.turn_recovered.fetch_add(1, Ordering::Relaxed);
        }
        false
    }
}

/// Datagrams each TURN client sends per allocation.
const ROUND: u32 = 20;
/// How long a TURN client waits for the last echoes of a round before freeing.
const ECHO_WAIT: Duration = Duration::from_secs(2);

/// One TURN client's life: allocate, permit the echo peer, send [`ROUND`] numbered
/// datagrams to it through the relay (Send indications, 50 ms apart) and count those
/// that come back (Data indications), free; again until `stop`. Returns its round
/// trips.
async fn turn_client(
    server: Arc<Server>,
    n: usize,
    echo: SocketAddr,
    stop: Arc<AtomicBool>,
    stats: Arc<Stats>,
) -> u64 {
    let expiry = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + 86_400;
    let mut c = TurnClient {
        sock: UdpSocket::bind("127.0.0.1:0").await.expect("udp"),
        server: server.turn,
        session: Session::rest(&server.secret, &format!("turn{n}"), expiry),
        buf: vec![0u8; 2048],
        late_data: 0,
    };
    let mut round_trips = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if !c.allocate(&stats).await {
            stats.turn_failures.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        stats.allocations.fetch_add(1, Ordering::Relaxed);
        let permitted = c
            .request(METHOD_CREATE_PERMISSION, &[Attr::Peer(echo)])
            .await
            .is_some_and(|m| client::is_success(&m));
        if permitted {
            let mut back = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            let mut seq = 0u32;
            // Send the round, reading what comes back in between; then wait up to a
            // second for the last ones.
            let end = loop {
                tokio::select! {
                    _ = tick.tick(), if seq < ROUND => {
                        let payload = format!("soak {n} {seq}");
                        let _ = c
                            .sock
                            .send_to(&client::send_indication(echo, payload.as_bytes()), c.server)
                            .await;
                        stats.relay_sent.fetch_add(1, Ordering::Relaxed);
                        seq += 1;
                        if seq == ROUND {
                            break tokio::time::Instant::now() + ECHO_WAIT;
                        }
                    }
                    r = c.sock.recv_from(&mut c.buf) => {
                        if let Ok((len, _)) = r {
                            if client::parse(&c.buf[..len]).and_then(|m| client::data(&m)).is_some() {
                                back += 1;
                            }
                        }
                    }
                }
            };
            while back < u64::from(ROUND) {
                match tokio::time::timeout_at(end, c.sock.recv_from(&mut c.buf)).await {
                    Ok(Ok((len, _))) => {
                        if client::parse(&c.buf[..len])
                            .and_then(|m| client::data(&m))
                            .is_some()
                        {
                            back += 1;
                        }
                    }
                    _ => break,
                }
            }
            round_trips += back;
            stats.relayed.fetch_add(back, Ordering::Relaxed);
        }
        c.late_data = 0;
        if !c.free().await {
            stats.turn_failures.fetch_add(1, Ordering::Relaxed);
        }
        // Echoes that came while the Refresh was answered count too.
        round_trips += c.late_data;
        stats.relayed.fetch_add(c.late_data, Ordering::Relaxed);
    }
    round_trips
}

fn main() {
    let args = parse_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(args));
}

async fn run(args: Args) {
    let server = Arc::new(Server::start().await);
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(Stats::default());
    // A peer that echoes whatever the relay sends it, on a thread of its own (the
    // WebSocket clients keep this process's runtime busy).
    // Its receive buffer is large (the machine may be busy and the thread late).
    let echo = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .expect("echo");
    let _ = echo.set_recv_buffer_size(4 << 20);
    echo.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("echo bind");
    let echo: std::net::UdpSocket = echo.into();
    let echo_addr = echo.local_addr().expect("addr");
    let echoed = Arc::new(AtomicU64::new(0));
    {
        let echoed = echoed.clone();
        std::thread::spawn(move || {
            let mut b = vec![0u8; 2048];
            while let Ok((n, from)) = echo.recv_from(&mut b) {
                if echo.send_to(&b[..n], from).is_ok() {
                    echoed.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    println!(
        "soak: {} WebSocket clients (rooms of {ROOM_SIZE}), {} TURN clients, {} s",
        args.clients, args.turn, args.secs
    );
    let mut tasks = Vec::new();
    for n in 0..args.clients {
        tasks.push(tokio::spawn(ws_client(
            server.clone(),
            n,
            stop.clone(),
            stats.clone(),
        )));
        if n % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // The TURN clients on a runtime and thread of their own, for the same reason.
    let turn_clients = {
        let (server, stop, stats) = (server.clone(), stop.clone(), stats.clone());
        let turns = args.turn;
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let tasks: Vec<_> = (0..turns)
                    .map(|n| {
                        tokio::spawn(turn_client(
                            server.clone(),
                            n,
                            echo_addr,
                            stop.clone(),
                            stats.clone(),
                        ))
                    })
                    .collect();
                let mut per_client = Vec::new();
                for t in tasks {
                    per_client.push(t.await.unwrap_or(0));
                }
                per_client
            })
        })
    };
    println!(
        "{:>6} {:>9} {:>6} {:>6} {:>6} {:>6} {:>6} {:>8} {:>8} {:>7} {:>9} {:>7} {:>8}",
        "t(s)",
        "RSS(KiB)",
        "fds",
        "ws",
        "peers",
        "rooms",
        "allocs",
        "joins",
        "resumes",
        "wsfail",
        "relayed",
        "allocd",
        "turnfail"
    );
    let t0 = Instant::now();
    let mut samples: Vec<(u64, u64, usize)> = Vec::new();
    let row = |server: &Server, counts: [i64; 4], t: u64, stats: &Stats| {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        println!(
            "{:>6} {:>9} {:>6} {:>6} {:>6} {:>6} {:>6} {:>8} {:>8} {:>7} {:>9} {:>7} {:>8}",
            t,
            server.rss_kb(),
            server.fds(),
            counts[0],
            counts[1],
            counts[2],
            counts[3],
            get(&stats.joins),
            get(&stats.resumes),
            get(&stats.failures),
            get(&stats.relayed),
            get(&stats.allocations),
            get(&stats.turn_failures),
        );
    };
    while t0.elapsed() < Duration::from_secs(args.secs) {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let t = t0.elapsed().as_secs();
        let counts = server.counts().await;
        samples.push((t, server.rss_kb(), server.fds()));
        row(&server, counts, t, &stats);
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let per_client = tokio::task::spawn_blocking(move || turn_clients.join().unwrap_or_default())
        .await
        .unwrap_or_default();
    // Everyone left: wait (on the server's own figures) for rooms and allocations
    // to drain; grace periods of dropped sockets end within GRACE_S.
    let end = Instant::now();
    let last = loop {
        let c = server.counts().await;
        if c[2] == 0 && c[3] == 0 && c[1] == 0 || end.elapsed() > Duration::from_secs(GRACE_S + 30)
        {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    row(&server, last, t0.elapsed().as_secs(), &stats);
    let warm: Vec<_> = samples.iter().filter(|s| s.0 * 3 >= args.secs).collect();
    if let (Some(rmin), Some(rmax), Some(fmin), Some(fmax)) = (
        warm.iter().map(|s| s.1).min(),
        warm.iter().map(|s| s.1).max(),
        warm.iter().map(|s| s.2).min(),
        warm.iter().map(|s| s.2).max(),
    ) {
        println!(
            "after warm-up: RSS {rmin}..{rmax} KiB ({:+.1}%), descriptors {fmin}..{fmax}",
            (rmax as f64 - rmin as f64) * 100.0 / rmin.max(1) as f64
        );
    }
    // Drift: the mean of the last third against the mean of the middle third. Single
    // samples swing with how many clients happen to be connected; a leak shows as a
    // rising mean.
    let third = |k: u64| -> Vec<&(u64, u64, usize)> {
        samples
            .iter()
            .filter(|s| s.0 * 3 >= args.secs * k && s.0 * 3 < args.secs * (k + 1))
            .collect()
    };
    let mean = |v: &[&(u64, u64, usize)], f: fn(&(u64, u64, usize)) -> f64| {
        v.iter().map(|s| f(s)).sum::<f64>() / v.len().max(1) as f64
    };
    let (mid, end_third) = (third(1), third(2));
    if !mid.is_empty() && !end_third.is_empty() {
        let rss = |s: &(u64, u64, usize)| s.1 as f64;
        let fds = |s: &(u64, u64, usize)| s.2 as f64;
        let (r1, r2) = (mean(&mid, rss), mean(&end_third, rss));
        let (f1, f2) = (mean(&mid, fds), mean(&end_third, fds));
        println!(
            "drift (mean of the last third against the middle third): RSS {r1:.0} -> {r2:.0} \
             KiB ({:+.1}%), descriptors {f1:.0} -> {f2:.0} ({:+.1}%)",
            (r2 - r1) * 100.0 / r1.max(1.0),
            (f2 - f1) * 100.0 / f1.max(1.0)
        );
    }
    println!(
        "end: peers {} rooms {} allocations {} (want 0 0 0); RSS {} KiB, {} descriptors",
        last[1],
        last[2],
        last[3],
        server.rss_kb(),
        server.fds()
    );
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let (sent, back) = (get(&stats.relay_sent), get(&stats.relayed));
    println!(
        "TURN: {} allocations, {back} of {sent} datagrams came back ({:.2}% lost), {} \
         allocate failures, {} lost answers recovered (437)",
        get(&stats.allocations),
        (sent.saturating_sub(back)) as f64 * 100.0 / sent.max(1) as f64,
        get(&stats.turn_failures),
        get(&stats.turn_recovered),
    );
    if !per_client.is_empty() {
        let relaying = per_client.iter().filter(|n| **n > 0).count();
        println!(
            "TURN clients that relayed: {relaying} of {} (round trips per client: min {}, max {})",
            per_client.len(),
            per_client.iter().min().copied().unwrap_or(0),
            per_client.iter().max().copied().unwrap_or(0),
        );
    }
    let text = server.metrics().await;
    let packets = |dir: &str| {
        metric(
            &text,
            &format!(
                "meshmeet_turn_relayed_packets_total{{transport=\"udp\",direction=\"{dir}\"}}"
            ),
        )
        .unwrap_or(0.0)
    };
    println!(
        "server: relayed packets to peers {}, to clients {}, dropped {}; echo peer: {} \
         echoed",
        packets("to_peer"),
        packets("to_client"),
        metric(
            &text,
            "meshmeet_turn_dropped_packets_total{transport=\"udp\"}"
        )
        .unwrap_or(0.0),
        echoed.load(Ordering::Relaxed),
    );
}
