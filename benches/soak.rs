//! Soak: a bounded run of churn against the release `meshmeet` binary (its own
//! process, so RSS and descriptors are the server's alone).
//!
//! ```text
//! cargo bench --bench soak -- [--secs T] [--clients N] [--turn M]
//! ```
//! N WebSocket clients (default 2000) in rooms of 5 join, relay candidates and chat,
//! drop their socket and resume, leave and join again, over and over; M TURN clients
//! (default 50) allocate, permit a local echo peer, relay through Send/Data
//! indications and free, over and over. Every 5 s it prints the server's RSS, open
//! descriptors (`/proc/PID/fd`), and from `/metrics` the open WebSockets, peers, rooms
//! and active allocations. After T seconds (default 180) everyone leaves; it then
//! waits for rooms and allocations to reach 0 and prints a summary: RSS and
//! descriptors after warm-up (the first third) as min/max, and the final counts.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use meshmeet::relay::client::{self, Attr, Session};
use rand::{Rng, SeedableRng};
use stun::message::{METHOD_ALLOCATE, METHOD_CREATE_PERMISSION, METHOD_REFRESH};
use tokio::net::{TcpStream, UdpSocket};
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

    /// (WebSockets, peers, rooms, active allocations) from `/metrics`.
    async fn counts(&self) -> [i64; 4] {
        let url = format!("https://localhost:{}/metrics", self.addr.port());
        let text = match self.http.get(url).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        let g = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
                .unwrap_or(-1)
        };
        [
            g("meshmeet_ws_connections"),
            g("meshmeet_peers"),
            g("meshmeet_rooms"),
            g("meshmeet_turn_allocations_active"),
        ]
    }

    async fn connect(&self) -> Option<Ws> {
        let tcp = TcpStream::connect(self.addr).await.ok()?;
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

#[derive(Default)]
struct Stats {
    joins: AtomicU64,
    resumes: AtomicU64,
    sent: AtomicU64,
    failures: AtomicU64,
    relayed: AtomicU64,
    allocations: AtomicU64,
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
        let Some(mut ws) = server.connect().await else {
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

/// One TURN client's life: allocate, permit the echo peer, relay a few datagrams,
/// free; again until `stop`.
async fn turn_client(
    server: Arc<Server>,
    n: usize,
    echo: SocketAddr,
    stop: Arc<AtomicBool>,
    stats: Arc<Stats>,
) {
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("udp");
    let mut buf = vec![0u8; 2048];
    let expiry = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + 86_400;
    let mut s = Session::rest(&server.secret, &format!("turn{n}"), expiry);
    async fn ask(
        sock: &UdpSocket,
        to: SocketAddr,
        req: &[u8],
        buf: &mut [u8],
    ) -> Option<stun::message::Message> {
        for _ in 0..3 {
            sock.send_to(req, to).await.ok()?;
            let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
            while let Ok(Ok((len, _))) =
                tokio::time::timeout_at(deadline, sock.recv_from(buf)).await
            {
                if let Some(m) = client::parse(&buf[..len]).filter(|m| client::answers(req, m)) {
                    return Some(m);
                }
            }
        }
        None
    }
    while !stop.load(Ordering::Relaxed) {
        let mut req = s.request(METHOD_ALLOCATE, &[&Attr::UDP]);
        let mut ans = ask(&sock, server.turn, &req, &mut buf).await;
        if ans.as_ref().is_some_and(|m| s.learn(m)) {
            req = s.request(METHOD_ALLOCATE, &[&Attr::UDP]);
            ans = ask(&sock, server.turn, &req, &mut buf).await;
        }
        if !ans.as_ref().is_some_and(client::is_success) {
            stats.failures.fetch_add(1, Ordering::Relaxed);
            s.nonce = None;
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        stats.allocations.fetch_add(1, Ordering::Relaxed);
        let perm = s.request(METHOD_CREATE_PERMISSION, &[&Attr::Peer(echo)]);
        if let Some(m) = ask(&sock, server.turn, &perm, &mut buf).await {
            // A stale nonce (after 10 minutes): learn the new one and ask again.
            if s.learn(&m) {
                let perm = s.request(METHOD_CREATE_PERMISSION, &[&Attr::Peer(echo)]);
                let _ = ask(&sock, server.turn, &perm, &mut buf).await;
            }
        }
        for _ in 0..20 {
            let _ = sock
                .send_to(&client::send_indication(echo, b"soak data"), server.turn)
                .await;
            if let Ok(Ok((len, _))) =
                tokio::time::timeout(Duration::from_millis(300), sock.recv_from(&mut buf)).await
            {
                if client::parse(&buf[..len])
                    .and_then(|m| client::data(&m))
                    .is_some()
                {
                    stats.relayed.fetch_add(1, Ordering::Relaxed);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let free = s.request(METHOD_REFRESH, &[&Attr::Lifetime(0)]);
        if let Some(m) = ask(&sock, server.turn, &free, &mut buf).await {
            if s.learn(&m) {
                let free = s.request(METHOD_REFRESH, &[&Attr::Lifetime(0)]);
                let _ = ask(&sock, server.turn, &free, &mut buf).await;
            }
        }
    }
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
    // A peer that echoes whatever the relay sends it.
    let echo = UdpSocket::bind("127.0.0.1:0").await.expect("echo");
    let echo_addr = echo.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut b = vec![0u8; 2048];
        while let Ok((n, from)) = echo.recv_from(&mut b).await {
            let _ = echo.send_to(&b[..n], from).await;
        }
    });
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
    for n in 0..args.turn {
        tasks.push(tokio::spawn(turn_client(
            server.clone(),
            n,
            echo_addr,
            stop.clone(),
            stats.clone(),
        )));
    }
    println!(
        "{:>6} {:>9} {:>6} {:>6} {:>6} {:>6} {:>6} {:>8} {:>8} {:>9} {:>7}",
        "t(s)",
        "RSS(KiB)",
        "fds",
        "ws",
        "peers",
        "rooms",
        "allocs",
        "joins",
        "resumes",
        "relayed",
        "fails"
    );
    let t0 = Instant::now();
    let mut samples: Vec<(u64, u64, usize)> = Vec::new();
    let row = |server: &Server, counts: [i64; 4], t: u64, stats: &Stats| {
        println!(
            "{:>6} {:>9} {:>6} {:>6} {:>6} {:>6} {:>6} {:>8} {:>8} {:>9} {:>7}",
            t,
            server.rss_kb(),
            server.fds(),
            counts[0],
            counts[1],
            counts[2],
            counts[3],
            stats.joins.load(Ordering::Relaxed),
            stats.resumes.load(Ordering::Relaxed),
            stats.relayed.load(Ordering::Relaxed),
            stats.failures.load(Ordering::Relaxed),
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
    println!(
        "end: peers {} rooms {} allocations {} (want 0 0 0); RSS {} KiB, {} descriptors",
        last[1],
        last[2],
        last[3],
        server.rss_kb(),
        server.fds()
    );
}
