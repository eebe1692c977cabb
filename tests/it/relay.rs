//! The embedded STUN/TURN relay against independent clients: the `turn` crate's
//! client, coturn's `turnutils_uclient` and `turnutils_stunclient`, and a raw STUN
//! client for the protocol edges (403 for denied peers, 401 for expired credentials,
//! multi-peer permissions, retransmissions, quotas, peers leaving).

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use meshmeet::relay::client::{self, Attr, Session};
use meshmeet::Config;
use stun::message::*;
use tokio::net::UdpSocket;
use turn::proto::reqtrans::RequestedTransport;
use turn::proto::PROTO_UDP;

use crate::support::{self, ws, TestServer};

pub const SECRET: &str = "relay-test-secret-0123456789";

fn relay_config(c: &mut Config) {
    c.turn.secret = SECRET.into();
    c.turn.relay_ips = vec!["127.0.0.1".parse().unwrap()];
    // Below the kernel's ephemeral range (32768-60999), where the test's UDP listener
    // gets its port-0 port: a relay port never shares a number with it (the relay
    // refuses the UDP listener's port as a peer).
    c.turn.relay_ports = "20000-20999".parse().unwrap();
}

pub fn loopback_peers(c: &mut Config) {
    relay_config(c);
    c.turn.allowed_peer_ranges = vec!["127.0.0.0/8".parse().unwrap()];
}

fn rest_user(id: &str, expiry: u64) -> (String, String) {
    let user = format!("{expiry}:{id}");
    let pass = meshmeet::ice::rest_password(SECRET, &user);
    (user, pass)
}

fn future() -> u64 {
    meshmeet::clock::unix_secs() + 3600
}

/// A UDP echo peer on 127.0.0.1; returns its address.
pub async fn echo_peer() -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            let _ = sock.send_to(&buf[..n], from).await;
        }
    });
    addr
}

/// A minimal TURN client over UDP that speaks raw STUN, for protocol edge cases.
struct RawClient {
    sock: UdpSocket,
    server: SocketAddr,
    session: Session,
}

impl RawClient {
    async fn new(server: SocketAddr, user: &str, pass: &str) -> RawClient {
        RawClient {
            sock: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            server,
            session: Session::new(user, pass),
        }
    }

    /// Encodes a request; authenticated once a nonce is known.
    fn build(&self, method: Method, attrs: &[&dyn Setter]) -> Vec<u8> {
        self.session.request(method, attrs)
    }

    async fn roundtrip(&self, bytes: &[u8]) -> Message {
        self.sock.send_to(bytes, self.server).await.unwrap();
        let mut buf = vec![0u8; 2048];
        loop {
            let (n, _) =
                tokio::time::timeout(Duration::from_secs(5), self.sock.recv_from(&mut buf))
                    .await
                    .expect("answer within 5 s")
                    .unwrap();
            if let Some(m) = client::parse(&buf[..n]).filter(|m| client::answers(bytes, m)) {
                return m;
            }
        }
    }

    /// Sends a request, answering a 401/438 challenge once.
    async fn request(&mut self, method: Method, attrs: &[&dyn Setter]) -> Message {
        for _ in 0..3 {
            let req = self.build(method, attrs);
            let resp = self.roundtrip(&req).await;
            if self.session.learn(&resp) {
                continue;
            }
            return resp;
        }
        panic!("challenge loop");
    }

    async fn allocate(&mut self) -> Message {
        self.request(
            METHOD_ALLOCATE,
            &[&RequestedTransport {
                protocol: PROTO_UDP,
            }],
        )
        .await
    }

    async fn relayed(&mut self) -> SocketAddr {
        relayed_address(&self.allocate().await)
    }

    async fn permission(&mut self, peers: &[SocketAddr]) -> Message {
        let attrs: Vec<Attr> = peers.iter().map(|p| Attr::Peer(*p)).collect();
        let refs: Vec<&dyn Setter> = attrs.iter().map(|a| a as &dyn Setter).collect();
        self.request(METHOD_CREATE_PERMISSION, &refs).await
    }

    async fn send_indication(&self, peer: SocketAddr, data: &[u8]) {
        let m = client::send_indication(peer, data);
        self.sock.send_to(&m, self.server).await.unwrap();
    }

    /// A Binding round trip: everything sent before it on this 5-tuple is processed.
    async fn sync(&self) {
        let resp = self.roundtrip(&client::binding_request()).await;
        assert_eq!(resp.typ.class, CLASS_SUCCESS_RESPONSE);
    }
}

/// The XOR-RELAYED-ADDRESS of an Allocate answer, which must be a success.
fn relayed_address(resp: &Message) -> SocketAddr {
    assert_eq!(
        resp.typ.class,
        CLASS_SUCCESS_RESPONSE,
        "{:?}",
        error_code(resp)
    );
    client::relayed_address(resp).expect("XOR-RELAYED-ADDRESS")
}

fn error_code(m: &Message) -> Option<u16> {
    client::error_code(m)
}

fn turn_udp(s: &TestServer) -> SocketAddr {
    s.addrs.turn_udp.expect("turn enabled")
}

#[tokio::test]
async fn turn_crate_client_relays_over_udp() {
    let server = TestServer::start_with(loopback_peers).await;
    let client = turn_crate_relays(turn_udp(&server)).await;
    let metrics = server.state.metrics.encode().unwrap();
    assert!(
        metrics.contains("meshmeet_turn_allocations_active 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "meshmeet_turn_relayed_packets_total{transport=\"udp\",direction=\"to_peer\"} 5"
        ),
        "{metrics}"
    );
    client.close().await.unwrap();
}

/// The `turn` crate's client allocates on `turn` (UDP), relays five datagrams to a
/// peer and five back; returns the client, its allocation still open.
pub async fn turn_crate_relays(turn: SocketAddr) -> turn::client::Client {
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let (user, pass) = rest_user("alice", future());
    let conn = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let cfg = turn::client::ClientConfig {
        stun_serv_addr: turn.to_string(),
        turn_serv_addr: turn.to_string(),
        username: user,
        password: pass,
        realm: "meshmeet".into(),
        software: String::new(),
        rto_in_ms: 0,
        conn: Arc::new(conn),
        vnet: None,
    };
    let client = turn::client::Client::new(cfg).await.unwrap();
    client.listen().await.unwrap();
    let relay = client.allocate().await.unwrap();
    use webrtc_util::Conn;
    let relay_addr = relay.local_addr().unwrap();
    assert_eq!(relay_addr.ip().to_string(), "127.0.0.1");
    let mapped = client.send_binding_request().await.unwrap();
    assert_eq!(mapped.ip().to_string(), "127.0.0.1");

    // Client -> peer through the relay, then peer -> client back.
    let mut buf = vec![0u8; 1500];
    for i in 0..5u8 {
        relay.send_to(&[i; 100], peer_addr).await.unwrap();
        let (n, from) = tokio::time::timeout(Duration::from_secs(5), peer.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(from, relay_addr);
        assert_eq!(&buf[..n], &[i; 100]);
        peer.send_to(&[i + 100; 60], relay_addr).await.unwrap();
        let (n, from) = tokio::time::timeout(Duration::from_secs(5), relay.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(from, peer_addr);
        assert_eq!(&buf[..n], &[i + 100; 60]);
    }
    client
}

/// Runs turnutils_uclient and returns its output; asserts zero loss.
pub fn uclient(args: &[&str], port: u16, peer: SocketAddr) -> String {
    let out = Command::new("turnutils_uclient")
        .args(args)
        .args(["-u", "uclient", "-W", SECRET, "-e"])
        .arg(peer.ip().to_string())
        .arg("-r")
        .arg(peer.port().to_string())
        .args([
            "-p",
            &port.to_string(),
            "-n",
            "20",
            "-m",
            "3",
            "-l",
            "200",
            "-c",
            "127.0.0.1",
        ])
        .output()
        .expect("turnutils_uclient runs (apt install coturn)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "uclient failed:\n{text}");
    let lost = text
        .lines()
        .find(|l| l.contains("Total lost packets"))
        .unwrap_or_else(|| panic!("no loss summary:\n{text}"));
    assert!(lost.contains("Total lost packets 0 ("), "{lost}");
    let sent = text
        .lines()
        .find(|l| l.contains("tot_send_msgs=") && !l.contains("msz="))
        .unwrap_or_else(|| panic!("no totals:\n{text}"));
    assert!(
        sent.contains("tot_send_msgs=60, tot_recv_msgs=60"),
        "{sent}"
    );
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coturn_uclient_udp_tcp_tls_without_loss() {
    if !support::have_tool("turnutils_uclient", "coturn") {
        return;
    }
    let server = TestServer::start_with(loopback_peers).await;
    let peer = echo_peer().await;
    let udp = turn_udp(&server).port();
    let tls = server.addrs.turn_tls.expect("tls listener").port();
    assert_eq!(server.addrs.turn_tcp.unwrap().port(), udp);
    // `-s`: Send indications. uclient picks channel numbers at random from the old
    // RFC 5766 range (up to 0x7FFF), which RFC 8656 refuses above 0x4FFF; ChannelData
    // is covered by the `turn` crate's client and the raw-client tests.
    tokio::task::spawn_blocking(move || {
        uclient(&["-s"], udp, peer);
        uclient(&["-s", "-t"], udp, peer);
        uclient(&["-s", "-t", "-S"], tls, peer);
    })
    .await
    .unwrap();
    let metrics = server.state.metrics.encode().unwrap();
    for t in ["udp", "tcp", "tls"] {
        assert!(
            metrics.contains(&format!(
                "meshmeet_turn_allocations_created_total{{transport=\"{t}\"}}"
            )),
            "{metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coturn_stunclient_gets_mapped_address() {
    if !support::have_tool("turnutils_stunclient", "coturn") {
        return;
    }
    let server = TestServer::start_with(relay_config).await;
    let port = turn_udp(&server).port();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("turnutils_stunclient")
            .args(["-p", &port.to_string(), "127.0.0.1"])
            .output()
            .expect("turnutils_stunclient runs")
    })
    .await
    .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("UDP reflexive addr: 127.0.0.1:"), "{text}");
}

#[tokio::test]
async fn denied_peers_get_403_and_no_packet() {
    let server = TestServer::start_with(relay_config).await;
    let target = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let target_addr = target.local_addr().unwrap();
    let (user, pass) = rest_user("mallory", future());
    let mut c = RawClient::new(turn_udp(&server), &user, &pass).await;
    c.relayed().await;
    for peer in [
        target_addr,
        "169.254.169.254:80".parse().unwrap(),
        "10.0.0.1:5000".parse().unwrap(),
    ] {
        let resp = c.permission(&[peer]).await;
        assert_eq!(error_code(&resp), Some(403), "{peer}");
    }
    // A public address alongside a denied one refuses the whole request.
    let resp = c
        .permission(&["8.8.8.8:53".parse().unwrap(), target_addr])
        .await;
    assert_eq!(error_code(&resp), Some(403));
    let bind = c
        .request(
            METHOD_CHANNEL_BIND,
            &[&Attr::Channel(0x4000), &Attr::Peer(target_addr)],
        )
        .await;
    assert_eq!(error_code(&bind), Some(403));
    // Data towards the denied peer by every path is dropped.
    c.send_indication(target_addr, b"leak").await;
    c.sock
        .send_to(&[0x40, 0x00, 0x00, 0x04, b'l', b'e', b'a', b'k'], c.server)
        .await
        .unwrap();
    c.sync().await;
    let mut buf = [0u8; 64];
    assert!(
        target.try_recv_from(&mut buf).is_err(),
        "a packet reached the denied peer"
    );
}

#[tokio::test]
async fn expired_credentials_get_401() {
    let server = TestServer::start_with(relay_config).await;
    let (user, pass) = rest_user("late", meshmeet::clock::unix_secs() - 10);
    let mut c = RawClient::new(turn_udp(&server), &user, &pass).await;
    let resp = c.allocate().await;
    assert_eq!(error_code(&resp), Some(401));
    // A wrong password is refused the same way.
    let (user, _) = rest_user("bob", future());
    let mut c = RawClient::new(turn_udp(&server), &user, "not-the-password").await;
    assert_eq!(error_code(&c.allocate().await), Some(401));
    // Static users from [turn.users] work.
    drop(server);
    let server = TestServer::start_with(|c| {
        relay_config(c);
        c.turn.users.insert("tool".into(), "tool-password".into());
    })
    .await;
    let mut c = RawClient::new(turn_udp(&server), "tool", "tool-password").await;
    c.relayed().await;
}

#[tokio::test]
async fn multi_address_permission_installs_every_peer() {
    let server = TestServer::start_with(loopback_peers).await;
    let p1 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let p2 = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    let (a1, a2) = (p1.local_addr().unwrap(), p2.local_addr().unwrap());
    let (user, pass) = rest_user("carol", future());
    let mut c = RawClient::new(turn_udp(&server), &user, &pass).await;
    let relay = c.relayed().await;
    let resp = c.permission(&[a1, a2]).await;
    assert_eq!(
        resp.typ.class,
        CLASS_SUCCESS_RESPONSE,
        "{:?}",
        error_code(&resp)
    );
    c.send_indication(a1, b"one").await;
    c.send_indication(a2, b"two").await;
    let mut buf = [0u8; 64];
    let (n, from) = tokio::time::timeout(Duration::from_secs(5), p1.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((&buf[..n], from), (&b"one"[..], relay));
    let (n, from) = tokio::time::timeout(Duration::from_secs(5), p2.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((&buf[..n], from), (&b"two"[..], relay));
    // Both peers can answer: Data indications reach the client.
    p2.send_to(b"back", relay).await.unwrap();
    let mut b = vec![0u8; 2048];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), c.sock.recv_from(&mut b))
        .await
        .unwrap()
        .unwrap();
    let m = client::parse(&b[..n]).unwrap();
    assert_eq!(m.typ, MessageType::new(METHOD_DATA, CLASS_INDICATION));
    assert_eq!(client::data(&m).unwrap(), b"back");
}

#[tokio::test]
async fn retransmitted_allocate_gets_the_same_success() {
    let server = TestServer::start_with(relay_config).await;
    let (user, pass) = rest_user("dave", future());
    let mut c2 = RawClient::new(turn_udp(&server), &user, &pass).await;
    // Learn this 5-tuple's nonce from the 401 challenge (nonces are per client address).
    let challenge = c2.roundtrip(&c2.build(METHOD_ALLOCATE, &[])).await;
    assert_eq!(error_code(&challenge), Some(401));
    assert!(c2.session.learn(&challenge));
    assert_eq!(c2.session.realm, "meshmeet");
    // An Allocate sent twice with one transaction id.
    let req = c2.build(
        METHOD_ALLOCATE,
        &[&RequestedTransport {
            protocol: PROTO_UDP,
        }],
    );
    let a = c2.roundtrip(&req).await;
    let b = c2.roundtrip(&req).await;
    assert_eq!(a.typ.class, CLASS_SUCCESS_RESPONSE, "{:?}", error_code(&a));
    assert_eq!(a.raw, b.raw);
    // A new transaction for the same 5-tuple is a mismatch.
    let again = c2.allocate().await;
    assert_eq!(error_code(&again), Some(437));
    let metrics = server.state.metrics.encode().unwrap();
    assert!(
        metrics.contains("meshmeet_turn_allocations_active 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn user_quota_answers_486() {
    let server = TestServer::start_with(|c| {
        relay_config(c);
        c.turn.user_allocation_quota = 2;
    })
    .await;
    let (user, pass) = rest_user("erin", future());
    for _ in 0..2 {
        RawClient::new(turn_udp(&server), &user, &pass)
            .await
            .relayed()
            .await;
    }
    let mut c = RawClient::new(turn_udp(&server), &user, &pass).await;
    assert_eq!(error_code(&c.allocate().await), Some(486));
    // Another user is not affected.
    let (other, opass) = rest_user("frank", future());
    RawClient::new(turn_udp(&server), &other, &opass)
        .await
        .relayed()
        .await;
}

#[tokio::test]
async fn peer_leaving_loses_its_allocation() {
    let server = TestServer::start_with(relay_config).await;
    let (user, pass) = rest_user("gina", future());
    let mut c = RawClient::new(turn_udp(&server), &user, &pass).await;
    c.relayed().await;
    let (other, opass) = rest_user("hank", future());
    let mut keep = RawClient::new(turn_udp(&server), &other, &opass).await;
    keep.relayed().await;
    server.state.peer_events.peer_gone("gina");
    let resp = c.request(METHOD_REFRESH, &[&Attr::Lifetime(600)]).await;
    assert_eq!(error_code(&resp), Some(437));
    let resp = keep.request(METHOD_REFRESH, &[&Attr::Lifetime(600)]).await;
    assert_eq!(resp.typ.class, CLASS_SUCCESS_RESPONSE);
}

/// End to end: the credentials a peer gets in `joined.ice` allocate on the embedded
/// relay, and the allocation goes when the peer leaves its room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_credentials_allocate_until_the_peer_leaves() {
    let server = TestServer::start_with(relay_config).await;
    let mut ws = ws::connect(&server).await;
    let joined = ws.join("relay-room").await;
    let turn = &joined["ice"]["iceServers"][0];
    let urls: Vec<&str> = turn["urls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap())
        .collect();
    let port = turn_udp(&server).port();
    assert!(
        urls.contains(&format!("turn:localhost:{port}?transport=udp").as_str()),
        "{urls:?}"
    );
    let user = turn["username"].as_str().unwrap();
    let pass = turn["credential"].as_str().unwrap();
    assert!(user.ends_with(&format!(":{}", ws::id(&joined))), "{user}");

    let mut c = RawClient::new(turn_udp(&server), user, pass).await;
    c.relayed().await;
    let lifetime = Attr::Lifetime(600);
    let resp = c.request(METHOD_REFRESH, &[&lifetime]).await;
    assert_eq!(resp.typ.class, CLASS_SUCCESS_RESPONSE);

    // `leave`, then a ping: its pong proves the leave was handled.
    ws.send(serde_json::json!({"type": "leave"})).await;
    ws.send(serde_json::json!({"type": "ping"})).await;
    assert_eq!(ws.recv().await["type"], "pong");
    let resp = c.request(METHOD_REFRESH, &[&lifetime]).await;
    assert_eq!(error_code(&resp), Some(437));
}

#[tokio::test]
async fn bare_expiry_username_is_accepted_like_coturn() {
    let server = TestServer::start_with(relay_config).await;
    let user = future().to_string();
    let pass = meshmeet::ice::rest_password(SECRET, &user);
    RawClient::new(turn_udp(&server), &user, &pass)
        .await
        .relayed()
        .await;
    let wrong = meshmeet::ice::rest_password("another-secret-0123456789", &user);
    let mut c = RawClient::new(turn_udp(&server), &user, &wrong).await;
    assert_eq!(error_code(&c.allocate().await), Some(401));
}

#[tokio::test]
async fn disabled_relay_binds_nothing() {
    let server = TestServer::start_with(|c| c.turn.enabled = false).await;
    assert!(server.addrs.turn_udp.is_none());
    assert!(server.addrs.turn_tcp.is_none());
    assert!(server.addrs.turn_tls.is_none());
}

#[tokio::test]
async fn taken_turn_port_fails_with_address_and_key() {
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = support::test_config(dir.path());
    cfg.turn.listen = addr;
    let err = match meshmeet::Server::bind(cfg).await {
        Ok(_) => panic!("bind must fail"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains(&format!("cannot listen on {addr} (UDP, turn.listen)")),
        "{err}"
    );
}

#[tokio::test]
async fn ipv6_relay_on_request() {
    let server = TestServer::start_with(|c| {
        relay_config(c);
        c.turn.relay_ips = vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()];
        c.turn.allowed_peer_ranges = vec!["::1/128".parse().unwrap()];
    })
    .await;
    let peer = match UdpSocket::bind("[::1]:0").await {
        Ok(p) => p,
        Err(e) => panic!("IPv6 loopback unavailable: {e}"),
    };
    let peer_addr = peer.local_addr().unwrap();
    let (user, pass) = rest_user("v6", future());
    let mut c = RawClient::new(turn_udp(&server), &user, &pass).await;
    let resp = c
        .request(
            METHOD_ALLOCATE,
            &[
                &RequestedTransport {
                    protocol: PROTO_UDP,
                },
                &Attr::Family(2),
            ],
        )
        .await;
    let relay = relayed_address(&resp);
    assert!(relay.is_ipv6(), "{relay}");
    // An IPv4 peer on an IPv6 allocation: 443.
    let resp = c.permission(&["8.8.8.8:53".parse().unwrap()]).await;
    assert_eq!(error_code(&resp), Some(443));
    let resp = c.permission(&[peer_addr]).await;
    assert_eq!(
        resp.typ.class,
        CLASS_SUCCESS_RESPONSE,
        "{:?}",
        error_code(&resp)
    );
    c.send_indication(peer_addr, b"six").await;
    let mut buf = [0u8; 16];
    let (n, from) = tokio::time::timeout(Duration::from_secs(5), peer.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((&buf[..n], from), (&b"six"[..], relay));
}

/// The value of the metric line starting with `prefix` (0 when absent).
async fn metric(server: &TestServer, prefix: &str) -> f64 {
    server
        .metrics()
        .await
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// The next Data indication `c` receives: (peer, payload).
async fn data_indication(c: &RawClient) -> (SocketAddr, Vec<u8>) {
    let mut b = vec![0u8; 2048];
    loop {
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), c.sock.recv_from(&mut b))
            .await
            .expect("a Data indication within 5 s")
            .unwrap();
        if let Some(m) = client::parse(&b[..n]) {
            if m.typ == MessageType::new(METHOD_DATA, CLASS_INDICATION) {
                return (client::peer_address(&m).unwrap(), client::data(&m).unwrap());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_refuses_the_server_itself_and_reaches_other_allocations() {
    // Loopback peers allowed: the server's own address is an allowed peer, as its
    // public address is in production.
    let server = TestServer::start_with(|c| {
        loopback_peers(c);
        c.http.redirect_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let (ua, pa) = rest_user("relay-a", future());
    let (ub, pb) = rest_user("relay-b", future());
    let mut a = RawClient::new(turn_udp(&server), &ua, &pa).await;
    let mut b = RawClient::new(turn_udp(&server), &ub, &pb).await;
    let relay_a = a.relayed().await;
    let relay_b = b.relayed().await;
    let addrs = server.addrs;
    // The UDP listener (TURN over TCP shares its port number), on any loopback
    // address, and A's own relay address.
    let own = [
        addrs.turn_udp.unwrap(),
        addrs.turn_tcp.unwrap(),
        SocketAddr::new("127.0.0.2".parse().unwrap(), addrs.turn_udp.unwrap().port()),
        relay_a,
    ];
    for (i, target) in own.iter().enumerate() {
        let resp = a.permission(&[*target]).await;
        assert_eq!(error_code(&resp), Some(403), "permission to {target}");
        let resp = a
            .request(
                METHOD_CHANNEL_BIND,
                &[&Attr::Channel(0x4000 + i as u16), &Attr::Peer(*target)],
            )
            .await;
        assert_eq!(error_code(&resp), Some(403), "channel to {target}");
    }
    // Ports the server listens on with TCP alone get no datagram from the relay:
    // ordinary peers.
    let tcp_only = [
        addrs.https,
        addrs.redirect.unwrap(),
        addrs.turn_tls.unwrap(),
        SocketAddr::new("127.0.0.2".parse().unwrap(), addrs.https.port()),
    ];
    for (i, target) in tcp_only.iter().enumerate() {
        let resp = a.permission(&[*target]).await;
        assert_eq!(
            resp.typ.class,
            CLASS_SUCCESS_RESPONSE,
            "permission to {target}: {:?}",
            error_code(&resp)
        );
        let resp = a
            .request(
                METHOD_CHANNEL_BIND,
                &[&Attr::Channel(0x4200 + i as u16), &Attr::Peer(*target)],
            )
            .await;
        assert_eq!(
            resp.typ.class,
            CLASS_SUCCESS_RESPONSE,
            "channel to {target}: {:?}",
            error_code(&resp)
        );
    }
    // A permission for the server's IP (through B's relay address) covers every
    // port; a Send indication carrying a Binding request to the STUN listener is
    // still dropped: the listener answers no Binding from the relay.
    let resp = a.permission(&[relay_b]).await;
    assert_eq!(resp.typ.class, CLASS_SUCCESS_RESPONSE);
    let denied = metric(&server, "meshmeet_turn_peer_denied_total").await;
    a.send_indication(turn_udp(&server), &client::binding_request())
        .await;
    // Two receive loops share the UDP socket: wait for the refusal to be counted.
    let mut counted = false;
    for _ in 0..50 {
        a.sync().await;
        if metric(&server, "meshmeet_turn_peer_denied_total").await == denied + 1.0 {
            counted = true;
            break;
        }
    }
    assert!(
        counted,
        "the Send indication to the listener was not refused"
    );
    // Relay to relay on one server: A and B reach each other.
    let resp = b.permission(&[relay_a]).await;
    assert_eq!(resp.typ.class, CLASS_SUCCESS_RESPONSE);
    a.send_indication(relay_b, b"a to b").await;
    assert_eq!(data_indication(&b).await, (relay_a, b"a to b".to_vec()));
    b.send_indication(relay_a, b"b to a").await;
    assert_eq!(data_indication(&a).await, (relay_b, b"b to a".to_vec()));
    let resp = a
        .request(
            METHOD_CHANNEL_BIND,
            &[&Attr::Channel(0x4100), &Attr::Peer(relay_b)],
        )
        .await;
    assert_eq!(resp.typ.class, CLASS_SUCCESS_RESPONSE);
    a.sock
        .send_to(
            &client::channel_data(0x4100, b"via channel", false),
            a.server,
        )
        .await
        .unwrap();
    assert_eq!(
        data_indication(&b).await,
        (relay_a, b"via channel".to_vec())
    );
}

#[tokio::test]
async fn an_allowed_ipv4_peer_does_not_open_its_ipv6_translations() {
    let server = TestServer::start_with(|c| {
        relay_config(c);
        c.turn.relay_ips = vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()];
        c.turn.allowed_peer_ranges = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let (user, pass) = rest_user("nat64", future());
    let mut c = RawClient::new(turn_udp(&server), &user, &pass).await;
    let resp = c
        .request(METHOD_ALLOCATE, &[&Attr::UDP, &Attr::Family(2)])
        .await;
    assert!(relayed_address(&resp).is_ipv6());
    for (i, target) in [
        "[::127.0.0.1]:5000",
        "[64:ff9b::127.0.0.1]:5000",
        "[64:ff9b:1::7f00:1]:5000",
        "[2002:7f00:1::1]:5000",
        "[2001:0:4136:e378:8000:63bf:80ff:fffe]:5000",
    ]
    .iter()
    .enumerate()
    {
        let target: SocketAddr = target.parse().unwrap();
        let resp = c.permission(&[target]).await;
        assert_eq!(error_code(&resp), Some(403), "permission to {target}");
        let resp = c
            .request(
                METHOD_CHANNEL_BIND,
                &[&Attr::Channel(0x4000 + i as u16), &Attr::Peer(target)],
            )
            .await;
        assert_eq!(error_code(&resp), Some(403), "channel to {target}");
    }
    // IPv4-mapped names the allowed host itself.
    let resp = c
        .permission(&["[::ffff:127.0.0.1]:5000".parse().unwrap()])
        .await;
    assert_eq!(
        resp.typ.class,
        CLASS_SUCCESS_RESPONSE,
        "{:?}",
        error_code(&resp)
    );
}

#[tokio::test]
async fn channel_numbers_beyond_0x4fff_get_400() {
    let server = TestServer::start_with(loopback_peers).await;
    let peer = echo_peer().await;
    let (user, pass) = rest_user("channels", future());
    let mut c = RawClient::new(turn_udp(&server), &user, &pass).await;
    c.relayed().await;
    for n in [0x5000, 0x7FFF] {
        let resp = c
            .request(METHOD_CHANNEL_BIND, &[&Attr::Channel(n), &Attr::Peer(peer)])
            .await;
        assert_eq!(error_code(&resp), Some(400), "{n:#x}");
    }
    let resp = c
        .request(
            METHOD_CHANNEL_BIND,
            &[&Attr::Channel(0x4FFF), &Attr::Peer(peer)],
        )
        .await;
    assert_eq!(resp.typ.class, CLASS_SUCCESS_RESPONSE);
}

#[tokio::test]
async fn additional_address_family_over_udp() {
    use meshmeet::relay::core::{ATTR_ADDITIONAL_ADDRESS_FAMILY, ATTR_ADDRESS_ERROR_CODE};
    let aaf = |v: u8| Attr::Raw(ATTR_ADDITIONAL_ADDRESS_FAMILY, vec![v, 0, 0, 0]);
    // IPv4 only: the IPv4 allocation, and 440 for the IPv6 one.
    let server = TestServer::start_with(relay_config).await;
    let (user, pass) = rest_user("aaf", future());
    let mut c = RawClient::new(turn_udp(&server), &user, &pass).await;
    let resp = c
        .request(METHOD_ALLOCATE, &[&Attr::UDP, &aaf(2), &Attr::Family(1)])
        .await;
    assert_eq!(error_code(&resp), Some(400));
    let resp = c.request(METHOD_ALLOCATE, &[&Attr::UDP, &aaf(2)]).await;
    assert!(relayed_address(&resp).is_ipv4());
    let e = resp
        .get(ATTR_ADDRESS_ERROR_CODE)
        .expect("ADDRESS-ERROR-CODE");
    assert_eq!(&e[..4], &[0x02, 0, 4, 40]);
}

/// Waits until `addr` can be bound again: its relay socket was closed.
async fn port_freed(addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while std::net::UdpSocket::bind(addr).is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "relay socket {addr} still open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The next datagram `sock` receives: (payload, sender).
async fn recv_on(sock: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut b = vec![0u8; 2048];
    let (n, from) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut b))
        .await
        .expect("a datagram within 5 s")
        .unwrap();
    (b[..n].to_vec(), from)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_allocation_over_ipv4_and_ipv6_loopback() {
    use meshmeet::relay::core::ATTR_ADDITIONAL_ADDRESS_FAMILY;
    if !support::have_ipv6_loopback() {
        return;
    }
    let server = TestServer::start_with(|c| {
        relay_config(c);
        c.turn.relay_ips = vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()];
        c.turn.allowed_peer_ranges =
            vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
        c.turn.user_allocation_quota = 1;
    })
    .await;
    let peer4 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let peer6 = UdpSocket::bind("[::1]:0").await.unwrap();
    let (p4, p6) = (peer4.local_addr().unwrap(), peer6.local_addr().unwrap());
    let (user, pass) = rest_user("dual", future());
    let mut c = RawClient::new(turn_udp(&server), &user, &pass).await;
    let aaf = Attr::Raw(ATTR_ADDITIONAL_ADDRESS_FAMILY, vec![2, 0, 0, 0]);
    let resp = c.request(METHOD_ALLOCATE, &[&Attr::UDP, &aaf]).await;
    assert_eq!(
        resp.typ.class,
        CLASS_SUCCESS_RESPONSE,
        "{:?}",
        error_code(&resp)
    );
    assert_eq!(client::address_error(&resp), None);
    let (r4, r6) = match client::relayed_addresses(&resp)[..] {
        [a, b] => (a, b),
        ref other => panic!("two relayed addresses expected: {other:?}"),
    };
    assert_eq!(r4.ip(), "127.0.0.1".parse::<std::net::IpAddr>().unwrap());
    assert_eq!(r6.ip(), "::1".parse::<std::net::IpAddr>().unwrap());
    // One allocation, and the user's quota of one is used by it.
    assert_eq!(
        metric(&server, "meshmeet_turn_allocations_active").await,
        1.0
    );
    let mut other = RawClient::new(turn_udp(&server), &user, &pass).await;
    assert_eq!(error_code(&other.allocate().await), Some(486));
    // Permissions for both families; each peer is reached from the relay address of
    // its own family, and answers the same way.
    let resp = c.permission(&[p4, p6]).await;
    assert_eq!(
        resp.typ.class,
        CLASS_SUCCESS_RESPONSE,
        "{:?}",
        error_code(&resp)
    );
    c.send_indication(p4, b"to four").await;
    assert_eq!(recv_on(&peer4).await, (b"to four".to_vec(), r4));
    c.send_indication(p6, b"to six").await;
    assert_eq!(recv_on(&peer6).await, (b"to six".to_vec(), r6));
    peer6.send_to(b"from six", r6).await.unwrap();
    assert_eq!(data_indication(&c).await, (p6, b"from six".to_vec()));
    peer4.send_to(b"from four", r4).await.unwrap();
    assert_eq!(data_indication(&c).await, (p4, b"from four".to_vec()));
    // Channels to both.
    for (n, p) in [(0x4000u16, p4), (0x4001, p6)] {
        let resp = c
            .request(METHOD_CHANNEL_BIND, &[&Attr::Channel(n), &Attr::Peer(p)])
            .await;
        assert_eq!(
            resp.typ.class,
            CLASS_SUCCESS_RESPONSE,
            "{:?}",
            error_code(&resp)
        );
    }
    c.sock
        .send_to(&client::channel_data(0x4001, b"ch six", false), c.server)
        .await
        .unwrap();
    assert_eq!(recv_on(&peer6).await, (b"ch six".to_vec(), r6));
    c.sock
        .send_to(&client::channel_data(0x4000, b"ch four", false), c.server)
        .await
        .unwrap();
    assert_eq!(recv_on(&peer4).await, (b"ch four".to_vec(), r4));
    // Deleting the IPv6 part closes its socket only; IPv4 relays on.
    let resp = c
        .request(METHOD_REFRESH, &[&Attr::Lifetime(0), &Attr::Family(2)])
        .await;
    assert_eq!(
        resp.typ.class,
        CLASS_SUCCESS_RESPONSE,
        "{:?}",
        error_code(&resp)
    );
    port_freed(r6).await;
    assert_eq!(error_code(&c.permission(&[p6]).await), Some(443));
    c.send_indication(p4, b"still four").await;
    assert_eq!(recv_on(&peer4).await, (b"still four".to_vec(), r4));
    assert!(
        std::net::UdpSocket::bind(r4).is_err(),
        "the IPv4 relay stays"
    );
    // A full delete frees the rest and the quota.
    let resp = c.request(METHOD_REFRESH, &[&Attr::Lifetime(0)]).await;
    assert_eq!(resp.typ.class, CLASS_SUCCESS_RESPONSE);
    port_freed(r4).await;
    assert_eq!(
        metric(&server, "meshmeet_turn_allocations_active").await,
        0.0
    );
    let resp = other.allocate().await;
    assert_eq!(
        resp.typ.class,
        CLASS_SUCCESS_RESPONSE,
        "{:?}",
        error_code(&resp)
    );
    // The peer leaving its room frees both sockets of its dual allocation (expiry
    // is driven by hand in the core's tests).
    let (user2, pass2) = rest_user("dual2", future());
    let mut d = RawClient::new(turn_udp(&server), &user2, &pass2).await;
    let resp = d.request(METHOD_ALLOCATE, &[&Attr::UDP, &aaf]).await;
    let both = client::relayed_addresses(&resp);
    assert_eq!(both.len(), 2);
    server.state.peer_events.peer_gone("dual2");
    for a in both {
        port_freed(a).await;
    }
}

/// A burst from peers reaches a TCP client whole and in order: ChannelData frames
/// padded to four bytes (more than one receive batch of them), then a Data indication
/// for a peer of the same address without a channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_from_peers_reaches_a_tcp_client_framed_and_in_order() {
    use meshmeet::relay::wire::{self, Frame};
    use tokio::io::AsyncReadExt;

    let server = TestServer::start_with(loopback_peers).await;
    let to = server.addrs.turn_tcp.expect("turn over tcp");
    let mut tcp = tokio::net::TcpStream::connect(to).await.unwrap();
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let other = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (user, pass) = rest_user("burst", future());
    let mut session = Session::new(&user, &pass);
    let mut request = async |attrs: &[&dyn Setter], method: Method| {
        for _ in 0..3 {
            let req = session.request(method, attrs);
            let answer = crate::oneport::roundtrip(&mut tcp, &req).await;
            if session.learn(&answer) {
                continue;
            }
            assert!(client::is_success(&answer), "{answer}");
            return answer;
        }
        panic!("challenge loop");
    };
    let relay = relayed_address(&request(&[&Attr::UDP], METHOD_ALLOCATE).await);
    let peer_addr = peer.local_addr().unwrap();
    request(
        &[&Attr::Channel(0x4000), &Attr::Peer(peer_addr)],
        METHOD_CHANNEL_BIND,
    )
    .await;
    const BURST: usize = 100;
    for i in 1..=BURST {
        peer.send_to(&vec![i as u8; i], relay).await.unwrap();
    }
    // Same address, another port: permitted, but no channel.
    other.send_to(b"no channel", relay).await.unwrap();

    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 65536];
    let mut next = 1usize;
    loop {
        while let Frame::Complete(total) = wire::stream_frame(&buf) {
            let frame: Vec<u8> = buf.drain(..total).collect();
            if next <= BURST {
                let (ch, len) = wire::channel_header(&frame).expect("ChannelData");
                assert_eq!((ch, len), (0x4000, next));
                assert_eq!(total, (4 + next + 3) & !3, "padded to four bytes");
                assert!(frame[4..4 + len].iter().all(|&b| b == next as u8));
                assert!(frame[4 + len..].iter().all(|&b| b == 0));
                next += 1;
            } else {
                let m = client::parse(&frame).expect("a Data indication");
                assert_eq!(m.typ, MessageType::new(METHOD_DATA, CLASS_INDICATION));
                assert_eq!(
                    client::peer_address(&m).unwrap(),
                    other.local_addr().unwrap()
                );
                assert_eq!(client::data(&m).unwrap(), b"no channel");
                return;
            }
        }
        let n = tokio::time::timeout(ws::WAIT, tcp.read(&mut chunk))
            .await
            .expect("relayed data in time")
            .unwrap();
        assert!(n > 0, "connection closed");
        buf.extend_from_slice(&chunk[..n]);
    }
}
