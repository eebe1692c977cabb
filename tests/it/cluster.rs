//! Several nodes sharing rooms through a real NATS server (`nats-server -js` on
//! loopback): participants on different nodes in one room, capacity under concurrent
//! joins spread over the nodes, resume on another node, a node killed with SIGKILL,
//! NATS stopped and started again. Without `nats-server` these tests print a skip
//! reason (and fail under `MESHMEET_REQUIRE_TOOLS=1`).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde_json::{json, Value};

use crate::lifecycle::{write_config, Proc};
use crate::support::have_tool;
use crate::support::ws::{connect, connect_child, id, Client, WAIT};
use crate::support::TestServer;

const SECRET: &str = "a-shared-turn-secret-for-tests";

/// A `nats-server -js` on a free loopback port, with its store in a temporary
/// directory; killed on drop.
struct Nats {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Nats {
    fn start() -> Nats {
        let port = crate::support::fixed_port(|p| TcpListener::bind(("127.0.0.1", p)).is_ok());
        let mut n = Nats {
            port,
            dir: tempfile::tempdir().expect("tempdir"),
            child: None,
        };
        n.run();
        n
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn run(&mut self) {
        let child = Command::new("nats-server")
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn node(nats: &Nats, name: &str, grace_s: u64, capacity: usize) -> TestServer {
    let url = nats.url();
    let name = name.to_string();
    TestServer::start_with(move |c| {
        c.turn.secret = SECRET.into();
        c.rooms.resume_grace_s = grace_s;
        c.rooms.capacity = capacity;
        c.cluster.nats_url = url;
        c.cluster.node_name = name;
    })
    .await
}

/// Waits until `cond` holds, checking every 20 ms, for at most `within`.
async fn until(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn ready(nodes: &[&TestServer]) {
    until(WAIT, "every node on NATS", || {
        nodes
            .iter()
            .all(|n| n.state.signaling.cluster_healthy() == Some(true))
    })
    .await;
}

async fn join_as(c: &mut Client, room: &str, name: &str) -> Value {
    c.send(json!({"type": "join", "room": room, "name": name}))
        .await;
    c.recv_type("joined").await
}

/// The port of the first `turn:` URL of a `joined`.
fn turn_port(joined: &Value) -> u16 {
    joined["ice"]["iceServers"]
        .as_array()
        .expect("iceServers")
        .iter()
        .filter_map(|s| s["urls"].as_array())
        .flatten()
        .filter_map(Value::as_str)
        .find(|u| u.starts_with("turn:"))
        .and_then(|u| u.rsplit(':').next())
        .and_then(|p| p.split('?').next())
        .and_then(|p| p.parse().ok())
        .expect("a turn: URL with a port")
}

/// Nothing else is queued for `c`: a ping's pong is the next message.
async fn nothing_pending(c: &mut Client) {
    c.send(json!({"type": "ping"})).await;
    let v = c.recv().await;
    assert_eq!(v["type"], "pong", "unexpected message {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participants_on_different_nodes_share_a_room() {
    if !have_tool("nats-server", "nats-server") {
        return;
    }
    let nats = Nats::start();
    let n1 = node(&nats, "n1", 20, 6).await;
    let n2 = node(&nats, "n2", 20, 6).await;
    let n3 = node(&nats, "n3", 20, 6).await;
    ready(&[&n1, &n2, &n3]).await;

    let mut a = connect(&n1).await;
    let ja = join_as(&mut a, "Cross", "alice").await;
    let a_id = id(&ja);
    let mut b = connect(&n2).await;
    let jb = join_as(&mut b, "cross", "bob").await;
    let b_id = id(&jb);
    assert_eq!(jb["peers"][0]["id"], a_id.as_str());
    // Each participant gets its own node's TURN URLs.
    assert_eq!(turn_port(&ja), n1.addrs.turn_udp.unwrap().port());
    assert_eq!(turn_port(&jb), n2.addrs.turn_udp.unwrap().port());
    let pj = a.recv_type("peer_joined").await;
    assert_eq!(pj["id"], b_id.as_str());
    assert_eq!(pj["name"], "bob");
    // Someone in another room, on a third node.
    let mut c = connect(&n3).await;
    let jc = join_as(&mut c, "other", "carol").await;
    assert_eq!(jc["peers"].as_array().unwrap().len(), 0);

    // Negotiation, stamped with the sender by the home.
    b.send(json!({"type": "offer", "to": a_id, "sdp": "v=0 b", "from": "forged"}))
        .await;
    let o = a.recv().await;
    assert_eq!(o, json!({"type": "offer", "from": b_id, "sdp": "v=0 b"}));
    a.send(json!({"type": "answer", "to": b_id, "sdp": "v=0 a"}))
        .await;
    let an = b.recv().await;
    assert_eq!(an, json!({"type": "answer", "from": a_id, "sdp": "v=0 a"}));
    for i in 0..20 {
        b.send(
            json!({"type": "candidate", "to": a_id, "candidate": {"candidate": format!("c{i}")}}),
        )
        .await;
    }
    b.send(json!({"type": "candidate", "to": a_id, "candidate": null}))
        .await;
    for i in 0..20 {
        let m = a.recv().await;
        assert_eq!(m["from"], b_id.as_str());
        assert_eq!(m["candidate"]["candidate"], format!("c{i}"), "in order");
    }
    assert_eq!(a.recv().await["candidate"], Value::Null);

    // Media state, and chat in one order for both.
    b.send(
        json!({"type": "media", "audio": true, "video": false, "screen": true, "recording": true}),
    )
    .await;
    let m = a.recv().await;
    assert_eq!(
        m,
        json!({"type": "media", "from": b_id, "audio": true, "video": false, "screen": true, "recording": true})
    );
    for i in 0..5 {
        a.send(json!({"type": "chat", "text": format!("a{i}")}))
            .await;
        b.send(json!({"type": "chat", "text": format!("b{i}")}))
            .await;
    }
    let mut seen_a = Vec::new();
    let mut seen_b = Vec::new();
    for _ in 0..10 {
        seen_a.push(
            a.recv_type("chat").await["text"]
                .as_str()
                .unwrap()
                .to_string(),
        );
        seen_b.push(
            b.recv_type("chat").await["text"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(seen_a, seen_b, "one chat order for everyone");

    // A later joiner on the third node sees both, with b's media state.
    let mut d = connect(&n3).await;
    let jd = join_as(&mut d, "cross", "dave").await;
    let peers = jd["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 2);
    assert_eq!(
        peers[1]["media"],
        json!({"audio": true, "video": false, "screen": true, "recording": true})
    );

    // Relaying across rooms is refused, and nothing leaks into the other room.
    c.send(json!({"type": "offer", "to": a_id, "sdp": "v=0 c"}))
        .await;
    c.expect_error("unknown_peer").await;
    a.send(json!({"type": "offer", "to": id(&jc), "sdp": "v=0 a"}))
        .await;
    // (a also hears of dave first.)
    assert_eq!(a.recv_type("error").await["code"], "unknown_peer");
    nothing_pending(&mut c).await;

    // Leave: the others learn at once.
    b.send(json!({"type": "leave"})).await;
    assert_eq!(a.recv_type("peer_left").await["id"], b_id.as_str());
    assert_eq!(d.recv_type("peer_left").await["id"], b_id.as_str());
    // After leaving, b may join another room (homed elsewhere) on the same socket.
    let jb2 = join_as(&mut b, "other", "bob").await;
    assert_eq!(jb2["peers"][0]["id"], id(&jc).as_str());
    let metrics = n2.metrics().await;
    assert!(
        metrics.contains("meshmeet_cluster_messages_total{direction=\"out\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("meshmeet_cluster_nats_connected 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_holds_under_joins_spread_over_nodes() {
    if !have_tool("nats-server", "nats-server") {
        return;
    }
    let nats = Nats::start();
    let nodes = [
        node(&nats, "c1", 20, 6).await,
        node(&nats, "c2", 20, 6).await,
        node(&nats, "c3", 20, 6).await,
    ];
    ready(&[&nodes[0], &nodes[1], &nodes[2]]).await;
    let mut clients = Vec::new();
    for i in 0..30 {
        clients.push(connect(&nodes[i % 3]).await);
    }
    let answers = join_all(clients.iter_mut().map(|c| async move {
        c.send(json!({"type": "join", "room": "full"})).await;
        let v = c.recv().await;
        v["type"].as_str().unwrap().to_string()
    }))
    .await;
    let joined = answers.iter().filter(|t| *t == "joined").count();
    let full = answers.iter().filter(|t| *t == "room_full").count();
    assert_eq!((joined, full), (6, 24), "{answers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_on_another_node_keeps_the_id_and_the_queue() {
    if !have_tool("nats-server", "nats-server") {
        return;
    }
    let nats = Nats::start();
    let n1 = node(&nats, "r1", 20, 6).await;
    let n2 = node(&nats, "r2", 20, 6).await;
    let n3 = node(&nats, "r3", 20, 6).await;
    ready(&[&n1, &n2, &n3]).await;
    let mut a = connect(&n1).await;
    let a_id = id(&join_as(&mut a, "resume", "a").await);
    let mut b = connect(&n2).await;
    let jb = join_as(&mut b, "resume", "b").await;
    let b_id = id(&jb);
    a.recv_type("peer_joined").await;
    // e, on b's node too.
    let mut e = connect(&n2).await;
    join_as(&mut e, "resume", "e").await;
    a.recv_type("peer_joined").await;
    // b's socket drops without leave: its peer waits in its grace at the home.
    b.close_and_wait().await;
    // Wait until the home knows: b's node told it before it forwarded e's next
    // frame (one subject, in order). That chat is queued for b.
    e.send(json!({"type": "chat", "text": "sync"})).await;
    assert_eq!(a.recv_type("chat").await["text"], "sync");
    a.send(json!({"type": "chat", "text": "while you were away"}))
        .await;
    a.recv_type("chat").await;
    a.send(json!({"type": "offer", "to": b_id, "sdp": "v=0 queued"}))
        .await;
    nothing_pending(&mut a).await;
    // b comes back on the third node.
    let mut b2 = connect(&n3).await;
    b2.send(json!({"type": "join", "room": "resume", "name": "b", "resume": jb["resume"]}))
        .await;
    let j = b2.recv_type("joined").await;
    assert_eq!(j["resumed"], true, "{j}");
    assert_eq!(id(&j), b_id);
    assert_eq!(turn_port(&j), n3.addrs.turn_udp.unwrap().port());
    for text in ["sync", "while you were away"] {
        let chat = b2.recv().await;
        assert_eq!(chat["type"], "chat", "{chat}");
        assert_eq!(chat["text"], text);
    }
    let offer = b2.recv().await;
    assert_eq!(
        offer,
        json!({"type": "offer", "from": a_id, "sdp": "v=0 queued"})
    );
    // Nobody saw b leave.
    nothing_pending(&mut a).await;
    // And b2 talks to a through its new node.
    b2.send(json!({"type": "answer", "to": a_id, "sdp": "v=0 back"}))
        .await;
    assert_eq!(a.recv().await["from"], b_id.as_str());
}

/// Waits until the node at `addr` (a child process with its files in `dir`) says it
/// is on NATS with its buckets open.
async fn on_nats(dir: &Path, addr: SocketAddr) {
    let pem = std::fs::read(dir.join("data/selfsigned-cert.pem")).expect("cert");
    let http = crate::support::https_client(&[&pem], addr).build().unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let h: Value = http
            .get(format!("https://localhost:{}/healthz", addr.port()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if h["cluster"] == "ok" {
            return;
        }
        assert!(Instant::now() < deadline, "the node never got on NATS: {h}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn child_config(dir: &Path, nats: &Nats, name: &str, grace_s: u64) -> PathBuf {
    write_config(
        dir,
        &format!(
            "secret = \"{SECRET}\"\n[rooms]\nresume_grace_s = {grace_s}\n[cluster]\nnats_url = \"{}\"\nnode_name = \"{name}\"\n",
            nats.url()
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_leaves_after_the_grace_and_its_rooms_go_on() {
    if !have_tool("nats-server", "nats-server") {
        return;
    }
    let nats = Nats::start();
    let grace = 3;
    let survivor1 = node(&nats, "s1", grace, 6).await;
    let survivor2 = node(&nats, "s2", grace, 6).await;
    let dir = tempfile::tempdir().unwrap();
    let (mut victim, addr) = Proc::start(&child_config(dir.path(), &nats, "victim", grace));
    victim.wait_for("cluster node");
    ready(&[&survivor1, &survivor2]).await;

    // Room "home-elsewhere" is homed on a survivor; the victim has a participant in it.
    let mut x = connect(&survivor1).await;
    let x_id = id(&join_as(&mut x, "home-elsewhere", "x").await);
    // Room "home-victim" is homed on the victim (its participant joins first).
    let mut v1 = connect_child(dir.path(), addr).await;
    // The victim's node must be on NATS (its bucket open) before its participant joins.
    on_nats(dir.path(), addr).await;
    join_as(&mut v1, "home-victim", "v1").await;
    let mut y = connect(&survivor1).await;
    let y_id = id(&join_as(&mut y, "home-victim", "y").await);
    let mut z = connect(&survivor2).await;
    let jz = join_as(&mut z, "home-victim", "z").await;
    assert_eq!(jz["peers"].as_array().unwrap().len(), 2, "{jz}");
    let mut v2 = connect_child(dir.path(), addr).await;
    let v2_id = id(&join_as(&mut v2, "home-elsewhere", "v2").await);
    assert_eq!(x.recv_type("peer_joined").await["id"], v2_id.as_str());
    y.recv_type("peer_joined").await;
    let killed = Instant::now();
    victim.signal(libc::SIGKILL);
    victim.wait_exit(WAIT);

    // Its participant of a room homed elsewhere leaves for the others after the
    // grace (the home first has to notice the node is gone).
    let left = x.recv_type("peer_left").await;
    assert_eq!(left["id"], v2_id.as_str());
    assert!(
        killed.elapsed() >= Duration::from_secs(grace),
        "not before the grace"
    );
    // The room the victim was home to goes on: y and z still reach each other.
    let deadline = Instant::now() + WAIT;
    loop {
        y.send(json!({"type": "chat", "text": "still here"})).await;
        let got = tokio::time::timeout(Duration::from_secs(2), z.recv_type("chat")).await;
        if let Ok(m) = got {
            assert_eq!(m["from"], y_id.as_str());
            break;
        }
        assert!(Instant::now() < deadline, "the room never came back");
    }
    z.send(json!({"type": "offer", "to": y_id, "sdp": "v=0 after"}))
        .await;
    let o = y.recv_type("offer").await;
    assert_eq!(o["from"], id(&jz).as_str());
    let _ = x_id;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_going_away_keeps_local_rooms_and_cross_node_rooms_recover() {
    if !have_tool("nats-server", "nats-server") {
        return;
    }
    let mut nats = Nats::start();
    let n1 = node(&nats, "o1", 30, 6).await;
    let n2 = node(&nats, "o2", 30, 6).await;
    ready(&[&n1, &n2]).await;
    // A local room on n1, and a room spread over both nodes.
    let mut l1 = connect(&n1).await;
    join_as(&mut l1, "local", "l1").await;
    let mut l2 = connect(&n1).await;
    let l2_id = id(&join_as(&mut l2, "local", "l2").await);
    let mut a = connect(&n1).await;
    let a_id = id(&join_as(&mut a, "spread", "a").await);
    let mut b = connect(&n2).await;
    let b_id = id(&join_as(&mut b, "spread", "b").await);
    a.recv_type("peer_joined").await;

    nats.stop();
    until(WAIT, "degraded health", || {
        n1.state.signaling.cluster_healthy() == Some(false)
    })
    .await;
    let health: Value = n1
        .http_client()
        .get(format!("{}/healthz", n1.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "degraded");
    assert_eq!(health["cluster"], "degraded");
    // The local room works throughout.
    l1.send(json!({"type": "offer", "to": l2_id, "sdp": "v=0 local"}))
        .await;
    assert_eq!(l2.recv().await["sdp"], "v=0 local");
    l1.send(json!({"type": "chat", "text": "no nats"})).await;
    assert_eq!(l2.recv_type("chat").await["text"], "no nats");

    nats.run();
    ready(&[&n1, &n2]).await;
    // The spread room recovers: b reaches a again, and the other way round.
    let deadline = Instant::now() + WAIT;
    loop {
        b.send(json!({"type": "offer", "to": a_id, "sdp": "v=0 again"}))
            .await;
        match tokio::time::timeout(Duration::from_secs(2), a.recv_type("offer")).await {
            Ok(o) => {
                assert_eq!(o["from"], b_id.as_str());
                break;
            }
            Err(_) => assert!(Instant::now() < deadline, "the spread room never recovered"),
        }
    }
    a.send(json!({"type": "answer", "to": b_id, "sdp": "v=0 a"}))
        .await;
    assert_eq!(b.recv_type("answer").await["from"], a_id.as_str());
}

/// The next `room_state` for `c`.
async fn room_state(c: &mut Client) -> Value {
    loop {
        let v = c.recv_any().await;
        if v["type"] == "room_state" {
            return v;
        }
    }
}

/// Waits until the rooms bucket holds a state of `room` that satisfies `cond`.
async fn replicated(
    nats: &Nats,
    room: &str,
    cond: impl Fn(&meshmeet::signaling::persist::Snapshot) -> bool,
) {
    let client = async_nats::connect(nats.url()).await.expect("NATS client");
    let js = async_nats::jetstream::new(client);
    let deadline = Instant::now() + WAIT;
    loop {
        let state = match js.get_key_value(meshmeet::cluster::ROOMS_BUCKET).await {
            Ok(kv) => kv
                .get(meshmeet::cluster::wire::room_key(room))
                .await
                .ok()
                .flatten()
                .and_then(|b| meshmeet::cluster::wire::decode_room_state(&b).ok()),
            Err(_) => None,
        };
        if state.as_ref().is_some_and(&cond) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{room}'s state never replicated: {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_home_s_participants_leave_and_its_room_keeps_hosts_lock_and_media() {
    if !have_tool("nats-server", "nats-server") {
        return;
    }
    let nats = Nats::start();
    let grace = 3;
    let s1 = node(&nats, "k1", grace, 6).await;
    let s2 = node(&nats, "k2", grace, 6).await;
    let dir = tempfile::tempdir().unwrap();
    let (mut home, addr) = Proc::start(&child_config(dir.path(), &nats, "khome", grace));
    home.wait_for("cluster node");
    ready(&[&s1, &s2]).await;
    on_nats(dir.path(), addr).await;

    // The room is homed on the node to be killed: its participant joins first and is
    // host. Two more participants of it there, one on each other node.
    let mut h1 = connect_child(dir.path(), addr).await;
    let h1_id = id(&join_as(&mut h1, "kept", "h1").await);
    let mut h2 = connect_child(dir.path(), addr).await;
    let h2_id = id(&join_as(&mut h2, "kept", "h2").await);
    let mut y = connect(&s1).await;
    let y_id = id(&join_as(&mut y, "kept", "y").await);
    let mut z = connect(&s2).await;
    let jz = join_as(&mut z, "kept", "z").await;
    let z_id = id(&jz);
    assert_eq!(jz["hosts"], json!([h1_id]));
    // h1 makes y a host too and locks the room; y turns its camera off.
    h1.send(json!({"type": "host", "id": y_id})).await;
    h1.send(json!({"type": "lock", "locked": true})).await;
    loop {
        let st = room_state(&mut z).await;
        if st["locked"] == true {
            assert_eq!(st["hosts"], json!([h1_id, y_id]));
            break;
        }
    }
    let media = json!({"audio": true, "video": false, "screen": false, "recording": true});
    let mut m = media.clone();
    m["type"] = json!("media");
    y.send(m).await;
    assert_eq!(z.recv_type("media").await["from"], y_id.as_str());
    // Once that much is replicated (the home writes changes at its next tick):
    let y2 = y_id.clone();
    replicated(&nats, "kept", |s| {
        s.rooms.first().is_some_and(|r| r.locked)
            && s.peers
                .iter()
                .any(|p| p.id == y2 && p.host && p.media.is_some_and(|m| !m.video && m.recording))
    })
    .await;

    let killed = Instant::now();
    home.signal(libc::SIGKILL);
    home.wait_exit(WAIT);

    // The others learn that the dead node's participants left, after the grace.
    for c in [&mut y, &mut z] {
        let mut left = Vec::new();
        while left.len() < 2 {
            left.push(
                c.recv_type("peer_left").await["id"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
        }
        left.sort();
        let mut want = vec![h1_id.clone(), h2_id.clone()];
        want.sort();
        assert_eq!(left, want);
    }
    assert!(
        killed.elapsed() >= Duration::from_secs(grace),
        "not before the grace"
    );
    // The room is still locked, and y is still its host (z is not).
    let mut w = connect(&s2).await;
    w.send(json!({"type": "join", "room": "kept", "name": "w"}))
        .await;
    w.expect_error("room_locked").await;
    z.send(json!({"type": "lock", "locked": false})).await;
    z.expect_error("not_host").await;
    y.send(json!({"type": "lock", "locked": false})).await;
    loop {
        let st = room_state(&mut y).await;
        if st["locked"] == false {
            assert_eq!(st["hosts"], json!([y_id]));
            break;
        }
    }
    // A newcomer sees y's media state as it was set before the home died.
    let jw = join_as(&mut w, "kept", "w").await;
    let peers = jw["peers"].as_array().unwrap();
    let py = peers.iter().find(|p| p["id"] == y_id.as_str()).expect("y");
    assert_eq!(py["media"], media);
    assert!(peers.iter().any(|p| p["id"] == z_id.as_str()));
    assert_eq!(peers.len(), 2, "{jw}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_refused_at_a_remote_home_blocks_no_retry() {
    if !have_tool("nats-server", "nats-server") {
        return;
    }
    let nats = Nats::start();
    let n1 = node(&nats, "j1", 20, 2).await;
    let n2 = node(&nats, "j2", 20, 2).await;
    ready(&[&n1, &n2]).await;
    let mut a = connect(&n1).await;
    join_as(&mut a, "tiny", "a").await;
    let mut a2 = connect(&n1).await;
    join_as(&mut a2, "tiny", "a2").await;
    // b, on the other node, sends a second join before the first is answered: the
    // first is refused (the room is full), so the second is a join of its own.
    let mut b = connect(&n2).await;
    b.send(json!({"type": "join", "room": "tiny", "name": "b"}))
        .await;
    b.send(json!({"type": "join", "room": "tiny", "name": "b"}))
        .await;
    b.send(json!({"type": "join", "room": "roomy", "name": "b"}))
        .await;
    assert_eq!(b.recv().await["type"], "room_full");
    assert_eq!(b.recv().await["type"], "room_full");
    let jb = b.recv().await;
    assert_eq!(jb["type"], "joined", "{jb}");
    assert_eq!(jb["room"], "roomy");
    // Two joins in a row that both could succeed: the second is `already_joined`.
    let mut c = connect(&n2).await;
    join_as(&mut c, "third", "c").await;
    let mut d = connect(&n1).await;
    d.send(json!({"type": "join", "room": "third", "name": "d"}))
        .await;
    d.send(json!({"type": "join", "room": "third", "name": "d"}))
        .await;
    assert_eq!(d.recv().await["type"], "joined");
    d.expect_error("already_joined").await;
}
