//! Signaling load generator. Starts the release `meshmeet` binary as its own process
//! (so its RSS is the server's alone) and speaks PROTOCOL.md to it over TLS.
//!
//! ```text
//! cargo bench --bench signaling -- [throughput|rate|idle|all|cluster] [--rooms N]
//!                                  [--secs T] [--rate MSGS_PER_S] [--conns C]
//! ```
//! - `throughput`: N rooms of 4 (default 50); every client relays `candidate`s to its
//!   room peers as fast as the server takes them, for T seconds (default 10). Prints
//!   relayed messages/s, p50/p99/max relay latency and the server's RSS.
//! - `rate`: the same rooms at a fixed offered rate (default 20,000 msgs/s): latency.
//! - `idle`: C joined, idle connections (default 10,000) on a fresh server: its RSS,
//!   and how fast they were opened (TCP, TLS, WebSocket upgrade, join).
//!
//! Each mode runs twice in the same command: with the HTTPS port serving HTTPS only
//! (`turn.share_https_port = false`), then shared with TURN (the default), whose
//! listener first tells TURN from TLS by the first bytes of each connection.
//!
//! - `cluster` (not part of `all`; needs `nats-server`): `throughput` and `rate` on
//!   one node, then on two nodes sharing their rooms through a `nats-server -js` on
//!   loopback (docs/CLUSTER.md), in the same run. Each room's first and third clients
//!   connect to the first node (the room's home), the second and fourth to the other,
//!   so half the relayed messages arrive from, and half go to, the node that is not
//!   the home. CPU and RSS are the two nodes' sum (NATS' own not counted).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Messages in flight (sent, not yet received) across all clients in `throughput`
/// mode: enough to keep the server busy, far below any connection's queue.
const WINDOW: i64 = 2048;

struct Args {
    mode: String,
    rooms: usize,
    secs: u64,
    rate: u64,
    conns: usize,
}

fn parse_args() -> Args {
    let mut a = Args {
        mode: "all".into(),
        rooms: 50,
        secs: 10,
        rate: 20_000,
        conns: 10_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut num = |name: &str| -> u64 {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} needs a number"))
        };
        match arg.as_str() {
            "--rooms" => a.rooms = num("--rooms") as usize,
            "--secs" => a.secs = num("--secs"),
            "--rate" => a.rate = num("--rate"),
            "--conns" => a.conns = num("--conns") as usize,
            "--bench" => {}
            m @ ("throughput" | "rate" | "idle" | "all" | "cluster") => a.mode = m.into(),
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// The server process and what clients need to reach it.
struct Server {
    child: Child,
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    /// Set when the server runs under a tool: its config path, to stop it by.
    wrapped: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(cfg) = &self.wrapped {
            // Stop the server itself (not the tool) so the tool can write its report.
            let _ = Command::new("pkill")
                .arg("-TERM")
                .arg("-f")
                .arg(cfg)
                .status();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(60) {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    async fn start(shared: bool) -> Server {
        Server::start_with(shared, "").await
    }

    /// With `extra` appended to the config (after its `[turn]` section).
    async fn start_with(shared: bool, extra: &str) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            l.local_addr().expect("addr").port()
        };
        let cfg = dir.path().join("bench.toml");
        std::fs::write(
            &cfg,
            format!(
                "data_dir = {:?}\n[http]\nlisten = \"127.0.0.1:{port}\"\n[log]\nlevel = \"warn\"\n\
                 [rooms]\nrate_per_s = 10000000\nrate_burst = 10000000\n\
                 [turn]\nlisten = \"127.0.0.1:0\"\ntls_listen = \"\"\nshare_https_port = {shared}\n{extra}",
                dir.path().display().to_string()
            ),
        )
        .expect("config");
        // MESHMEET_BENCH_WRAP runs the server under a tool (e.g. `heaptrack`); the RSS
        // figures are then the tool's, not the server's.
        let bin = env!("CARGO_BIN_EXE_meshmeet");
        let (mut cmd, wrapped) = match std::env::var("MESHMEET_BENCH_WRAP") {
            Ok(tool) if !tool.is_empty() => {
                let mut c = Command::new(tool);
                c.arg(bin);
                (c, Some(cfg.clone()))
            }
            _ => (Command::new(bin), None),
        };
        let child = cmd
            .arg("--config")
            .arg(&cfg)
            .stdin(Stdio::null())
            .spawn()
            .expect("start meshmeet");
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
        let tls = client_config(&cert);
        Server {
            child,
            addr,
            tls,
            wrapped,
            _dir: dir,
        }
    }

    /// Waits until the node says it is on NATS with its buckets open.
    async fn cluster_ready(&self) {
        let http = reqwest::Client::builder()
            .danger_accept_invalid_certs(true)
            .build()
            .expect("http client");
        let url = format!("https://localhost:{}/healthz", self.addr.port());
        let start = Instant::now();
        loop {
            let h: Option<serde_json::Value> = match http.get(&url).send().await {
                Ok(r) => r.json().await.ok(),
                Err(_) => None,
            };
            if h.as_ref().is_some_and(|h| h["cluster"] == "ok") {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "node never got on NATS: {h:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn rss_kb(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// The server process's CPU time (user + system) so far, in microseconds.
    fn cpu_us(&self) -> u64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command name in parentheses: state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        ticks * 1_000_000 / hz
    }

    async fn connect(&self) -> Ws {
        let tcp = TcpStream::connect(self.addr).await.expect("tcp connect");
        let _ = tcp.set_nodelay(true);
        let mut req = format!("wss://localhost:{}/ws", self.addr.port())
            .into_client_request()
            .expect("request");
        req.headers_mut().insert(
            "origin",
            format!("https://localhost:{}", self.addr.port())
                .parse()
                .expect("origin"),
        );
        let (ws, _) = tokio_tungstenite::client_async_tls_with_config(
            req,
            tcp,
            None,
            Some(Connector::Rustls(self.tls.clone())),
        )
        .await
        .expect("websocket handshake");
        ws
    }
}

fn client_config(cert: &Path) -> Arc<rustls::ClientConfig> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let pem = std::fs::read(cert).expect("cert");
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(c.expect("pem")).expect("root");
    }
    Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// Sends `join` and returns (own id, ids of the peers present).
async fn join(ws: &mut Ws, room: &str) -> (String, Vec<String>) {
    ws.send(Message::text(format!(
        "{{\"type\":\"join\",\"room\":\"{room}\"}}"
    )))
    .await
    .expect("send join");
    loop {
        let m = ws.next().await.expect("open").expect("ok");
        if let Message::Text(t) = m {
            let v: serde_json::Value = serde_json::from_str(t.as_str()).expect("json");
            assert_eq!(v["type"], "joined", "{v}");
            let me = v["id"].as_str().expect("id").to_string();
            let peers = v["peers"]
                .as_array()
                .expect("peers")
                .iter()
                .filter_map(|p| p["id"].as_str().map(str::to_string))
                .collect();
            return (me, peers);
        }
    }
}

/// Numbers the loads run by this process.
static RUN: AtomicU64 = AtomicU64::new(0);

/// Connects `rooms` × 4 clients, joined; returns each with its room peers' ids. A
/// room's clients go to the servers in turn (the first to the first server).
async fn room_clients(servers: &[Arc<Server>], rooms: usize) -> Vec<(Ws, Vec<String>)> {
    let mut joined: Vec<(Ws, String, String, Vec<String>)> = Vec::new();
    for r in 0..rooms {
        for i in 0..4 {
            let mut ws = servers[i % servers.len()].connect().await;
            // Fresh names in every run (a cluster's buckets outlive its nodes).
            let room = format!("bench-{}-{r}", RUN.load(Ordering::Relaxed));
            let (me, _) = join(&mut ws, &room).await;
            joined.push((ws, room, me, Vec::new()));
        }
    }
    // Everyone's room peers (in the order they joined).
    let ids: Vec<(String, String)> = joined
        .iter()
        .map(|(_, room, me, _)| (room.clone(), me.clone()))
        .collect();
    joined
        .into_iter()
        .map(|(ws, room, me, _)| {
            let peers = ids
                .iter()
                .filter(|(r, id)| *r == room && *id != me)
                .map(|(_, id)| id.clone())
                .collect();
            (ws, peers)
        })
        .collect()
}

struct Stats {
    received: AtomicU64,
    in_flight: AtomicI64,
}

/// Parses the `"t":NANOS` stamp out of a relayed candidate without a JSON parse.
fn stamp(text: &str) -> Option<u64> {
    let i = text.find("\"t\":")? + 4;
    let rest = &text[i..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Runs the room load: paced at `rate` msgs/s in total, or (None) as fast as the
/// server takes them within the in-flight window. Returns (msgs/s, latencies in µs).
async fn run_load(
    servers: &[Arc<Server>],
    rooms: usize,
    secs: u64,
    rate: Option<u64>,
) -> (f64, Vec<u32>, f64) {
    RUN.fetch_add(1, Ordering::Relaxed);
    let clients = room_clients(servers, rooms).await;
    let n = clients.len();
    let stats = Arc::new(Stats {
        received: AtomicU64::new(0),
        in_flight: AtomicI64::new(0),
    });
    let epoch = Instant::now();
    let warmup = Duration::from_secs(1);
    let measure_start = epoch + warmup;
    let end = measure_start + Duration::from_secs(secs);
    // The server's CPU time over the measured window (it holds on a busy machine,
    // where the message rate does not).
    let cpu = {
        let servers = servers.to_vec();
        tokio::spawn(async move {
            let total = |s: &[Arc<Server>]| s.iter().map(|s| s.cpu_us()).sum::<u64>();
            tokio::time::sleep_until(measure_start.into()).await;
            let c0 = total(&servers);
            tokio::time::sleep_until(end.into()).await;
            total(&servers).saturating_sub(c0)
        })
    };
    let mut readers = Vec::new();
    let mut writers = Vec::new();
    for (ws, peers) in clients {
        let (mut sink, mut stream) = ws.split();
        let st = stats.clone();
        readers.push(tokio::spawn(async move {
            let mut lat: Vec<u32> = Vec::new();
            while let Some(Ok(m)) = stream.next().await {
                let Message::Text(t) = m else { continue };
                let Some(sent) = stamp(t.as_str()) else {
                    continue;
                };
                st.in_flight.fetch_sub(1, Ordering::Relaxed);
                let now = Instant::now();
                if now >= measure_start && now < end {
                    st.received.fetch_add(1, Ordering::Relaxed);
                    let us =
                        (now.duration_since(epoch).as_nanos() as u64).saturating_sub(sent) / 1000;
                    lat.push(us.min(u64::from(u32::MAX)) as u32);
                }
                if now >= end + Duration::from_secs(2) {
                    break;
                }
            }
            lat
        }));
        let st = stats.clone();
        writers.push(tokio::spawn(async move {
            let mut k = 0usize;
            let mut tick = rate.map(|r| {
                let per_client = (r as f64 / n as f64).max(0.001);
                let mut i = tokio::time::interval(Duration::from_secs_f64(1.0 / per_client));
                i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                i
            });
            loop {
                if Instant::now() >= end {
                    break;
                }
                match &mut tick {
                    Some(i) => {
                        i.tick().await;
                    }
                    None => {
                        if st.in_flight.load(Ordering::Relaxed) >= WINDOW {
                            tokio::task::yield_now().await;
                            continue;
                        }
                    }
                }
                let to = &peers[k % peers.len()];
                k += 1;
                let t = epoch.elapsed().as_nanos() as u64;
                let msg = format!(
                    "{{\"type\":\"candidate\",\"to\":\"{to}\",\"candidate\":{{\"candidate\":\"candidate:1 1 udp 2122260223 192.0.2.1 5{:04} typ host\",\"sdpMid\":\"0\",\"sdpMLineIndex\":0,\"t\":{t}}}}}",
                    k % 10000
                );
                st.in_flight.fetch_add(1, Ordering::Relaxed);
                if sink.send(Message::text(msg)).await.is_err() {
                    break;
                }
            }
            sink
        }));
    }
    let mut sinks = Vec::new();
    for w in writers {
        sinks.push(w.await.expect("writer"));
    }
    // Let stragglers arrive, then close so the readers end.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for mut s in sinks {
        let _ = s.close().await;
    }
    let mut lat = Vec::new();
    for r in readers {
        lat.extend(r.await.expect("reader"));
    }
    let received = stats.received.load(Ordering::Relaxed);
    let per_s = received as f64 / secs as f64;
    let cpu_per_msg = cpu.await.unwrap_or(0) as f64 / received.max(1) as f64;
    (per_s, lat, cpu_per_msg)
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

fn report(label: &str, per_s: f64, mut lat: Vec<u32>, rss_kb: u64, cpu_per_msg: f64) {
    lat.sort_unstable();
    println!(
        "{label}: {per_s:.0} relayed msgs/s; latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; server RSS {:.1} MB; server CPU {cpu_per_msg:.2} µs per relayed message",
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        lat.last().map_or(f64::NAN, |m| f64::from(*m) / 1000.0),
        rss_kb as f64 / 1024.0
    );
}

async fn idle(conns: usize, shared: bool, port: &str) {
    let server = Arc::new(Server::start(shared).await);
    let base = server.rss_kb();
    let opened = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::new();
    for i in 0..conns {
        let server = server.clone();
        let sem = sem.clone();
        tasks.push(tokio::spawn(async move {
            let permit = sem.acquire().await.expect("semaphore");
            let mut ws = server.connect().await;
            join(&mut ws, &format!("idle-{}", i / 4)).await;
            drop(permit);
            ws
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.push(t.await.expect("client"));
    }
    let per_s = all.len() as f64 / opened.elapsed().as_secs_f64();
    // Let the server settle (joined messages written, buffers released).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = server.rss_kb();
    println!(
        "{port}: idle: {} joined connections, opened at {per_s:.0}/s (64 at a time); server RSS {:.1} MB (fresh server {:.1} MB)",
        all.len(),
        rss as f64 / 1024.0,
        base as f64 / 1024.0
    );
}

/// A `nats-server -js` on a free loopback port; killed on drop.
struct Nats {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Nats {
    async fn start() -> Nats {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            l.local_addr().expect("addr").port()
        };
        let child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server (Debian package nats-server) starts");
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "nats-server did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Nats {
            child,
            port,
            _dir: dir,
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `n` fresh nodes; with more than one, on NATS (and ready) under names from `tag`.
async fn nodes(n: usize, nats: &Nats, tag: &str) -> Vec<Arc<Server>> {
    let mut servers = Vec::new();
    for i in 0..n {
        let extra = if n == 1 {
            String::new()
        } else {
            format!(
                "secret = \"bench-shared-turn-secret\"\n[cluster]\nnats_url = \"nats://127.0.0.1:{}\"\nnode_name = \"{tag}-{i}\"\n",
                nats.port
            )
        };
        servers.push(Arc::new(Server::start_with(true, &extra).await));
    }
    if n > 1 {
        for s in &servers {
            s.cluster_ready().await;
        }
    }
    servers
}

/// One node, then two nodes sharing rooms through NATS: throughput and fixed rate.
async fn cluster(args: &Args) {
    let nats = Nats::start().await;
    let rss = |s: &[Arc<Server>]| s.iter().map(|s| s.rss_kb()).sum::<u64>();
    for n in [1, 2] {
        let what = if n == 1 {
            "one node"
        } else {
            "two nodes + NATS"
        };
        let servers = nodes(n, &nats, "bench").await;
        let (per_s, lat, cpu) = run_load(&servers, args.rooms, args.secs, None).await;
        assert!(per_s > 0.0 && !lat.is_empty(), "nothing was relayed");
        report(
            &format!(
                "cluster: {what}: throughput ({} rooms of 4, {} s)",
                args.rooms, args.secs
            ),
            per_s,
            lat,
            rss(&servers),
            cpu,
        );
        drop(servers);
        let servers = nodes(n, &nats, "bench-rate").await;
        let (per_s, lat, cpu) = run_load(&servers, args.rooms, args.secs, Some(args.rate)).await;
        report(
            &format!(
                "cluster: {what}: fixed rate {} msgs/s ({} rooms of 4)",
                args.rate, args.rooms
            ),
            per_s,
            lat,
            rss(&servers),
            cpu,
        );
    }
}

fn main() {
    let mut args = parse_args();
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary
    // without it (and against the debug server): then a short smoke run only.
    let smoke = !std::env::args().any(|a| a == "--bench");
    if smoke {
        args = Args {
            mode: "all".into(),
            rooms: 2,
            secs: 1,
            rate: 200,
            conns: 40,
        };
    }
    match meshmeet::sys::raise_nofile_limit() {
        Ok(n) if (n as usize) < args.conns + 100 => {
            eprintln!("open-files limit {n} is low for {} connections", args.conns)
        }
        Err(e) => eprintln!("cannot raise the open-files limit: {e}"),
        _ => {}
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        if args.mode == "cluster" {
            cluster(&args).await;
            return;
        }
        for shared in [false, true] {
            let port = if shared {
                "HTTPS port shared with TURN"
            } else {
                "HTTPS port alone"
            };
            if matches!(args.mode.as_str(), "throughput" | "all") {
                let server = Arc::new(Server::start(shared).await);
                let (per_s, lat, cpu) =
                    run_load(std::slice::from_ref(&server), args.rooms, args.secs, None).await;
                assert!(per_s > 0.0 && !lat.is_empty(), "nothing was relayed");
                report(
                    &format!(
                        "{port}: throughput ({} rooms of 4, {} s)",
                        args.rooms, args.secs
                    ),
                    per_s,
                    lat,
                    server.rss_kb(),
                    cpu,
                );
            }
            if matches!(args.mode.as_str(), "rate" | "all") {
                let server = Arc::new(Server::start(shared).await);
                let (per_s, lat, cpu) = run_load(
                    std::slice::from_ref(&server),
                    args.rooms,
                    args.secs,
                    Some(args.rate),
                )
                .await;
                report(
                    &format!(
                        "{port}: fixed rate {} msgs/s ({} rooms of 4)",
                        args.rate, args.rooms
                    ),
                    per_s,
                    lat,
                    server.rss_kb(),
                    cpu,
                );
            }
            if matches!(args.mode.as_str(), "idle" | "all") {
                idle(args.conns, shared, port).await;
            }
        }
    });
}
