//! Room control (protocol 1.1) over real WebSockets against the in-process server:
//! hosts, lock, room password, lobby (knock, admit, deny, leave, lock on the way
//! out, bound), kick (close 4002, TURN allocation gone and credentials refused, resume
//! token void), mute requests, and every refusal (`not_host`, `unknown_peer`,
//! `room_locked`, `bad_password` with its scope, `lobby_full`, `bad_message`,
//! `not_joined`). These tests read every message, `room_state` included
//! ([`Client::recv_any`]).

use std::net::SocketAddr;
use std::time::Duration;

use meshmeet::relay::client::{self, Attr, Session};
use meshmeet::Config;
use serde_json::{json, Value};
use stun::message::{Method, Setter, METHOD_ALLOCATE, METHOD_REFRESH};
use tokio::net::UdpSocket;
use turn::proto::reqtrans::RequestedTransport;
use turn::proto::PROTO_UDP;

use crate::support::ws::{connect, id, Client};
use crate::support::TestServer;

/// Joins `room` as `name`; returns `joined` after checking the `room_state` that
/// follows it.
async fn join_as(c: &mut Client, room: &str, name: &str) -> (Value, Value) {
    c.send(json!({"type": "join", "room": room, "name": name}))
        .await;
    let joined = c.recv_any().await;
    assert_eq!(joined["type"], "joined", "{joined}");
    let state = c.recv_any().await;
    assert_eq!(state["type"], "room_state", "{state}");
    (joined, state)
}

/// The next message, which must be a `room_state`.
async fn state(c: &mut Client) -> Value {
    let m = c.recv_any().await;
    assert_eq!(m["type"], "room_state", "{m}");
    m
}

/// Reads up to and including the next `room_state`; returns it.
async fn state_after(c: &mut Client) -> Value {
    loop {
        let m = c.recv_any().await;
        if m["type"] == "room_state" {
            return m;
        }
    }
}

/// Proves `c` got nothing else: a ping's pong is its next message.
async fn nothing_more(c: &mut Client) {
    c.send(json!({"type": "ping"})).await;
    assert_eq!(c.recv_any().await, json!({"type": "pong"}));
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

#[tokio::test]
async fn hosts_lock_and_every_refusal() {
    let server = TestServer::start().await;
    let mut a = connect(&server).await;
    // Host actions before joining.
    a.send(json!({"type": "lock", "locked": true})).await;
    a.expect_error("not_joined").await;

    let (ja, sa) = join_as(&mut a, "ctl", "Ada").await;
    let aid = id(&ja);
    assert_eq!(ja["protocol"], 1);
    assert_eq!(ja["minor"], 2);
    assert_eq!(ja["hosts"], json!([aid]));
    // A host's copy carries the waiting list.
    assert_eq!(
        sa,
        json!({"type": "room_state", "hosts": [aid], "locked": false, "password": false,
               "lobby": false, "waiting": []})
    );

    let mut b = connect(&server).await;
    let (jb, sb) = join_as(&mut b, "ctl", "Bo").await;
    let bid = id(&jb);
    assert_eq!(jb["hosts"], json!([aid]));
    // Everyone else's has none.
    assert_eq!(
        sb,
        json!({"type": "room_state", "hosts": [aid], "locked": false, "password": false,
               "lobby": false})
    );
    assert_eq!(a.recv_type("peer_joined").await["id"], bid.as_str());

    // Not a host: every action is refused and changes nothing.
    for m in [
        json!({"type": "host", "id": bid}),
        json!({"type": "lock", "locked": true}),
        json!({"type": "room_password", "password": "x"}),
        json!({"type": "lobby", "on": true}),
        json!({"type": "admit", "id": aid}),
        json!({"type": "deny", "id": aid}),
        json!({"type": "kick", "id": aid}),
        json!({"type": "mute_request", "id": aid, "audio": true}),
    ] {
        b.send(m).await;
        b.expect_error("not_host").await;
    }
    nothing_more(&mut a).await;

    // Malformed host actions.
    for bad in [
        json!({"type": "lock"}),
        json!({"type": "lock", "locked": "yes"}),
        json!({"type": "lobby", "on": 1}),
        json!({"type": "kick"}),
        json!({"type": "host", "id": 5}),
        json!({"type": "mute_request", "id": bid}),
        json!({"type": "mute_request", "id": bid, "audio": false, "video": false}),
        json!({"type": "room_password"}),
        json!({"type": "room_password", "password": "p".repeat(129)}),
        json!({"type": "room_password", "password": "a\u{1}b"}),
    ] {
        a.send(bad.clone()).await;
        let e = a.recv_any().await;
        assert_eq!(e["code"], "bad_message", "{bad} -> {e}");
    }

    // Unknown ids, ids of another room, and oneself.
    let mut other = connect(&server).await;
    let (jo, _) = join_as(&mut other, "elsewhere", "Oz").await;
    for target in ["0000000000000000", id(&jo).as_str(), aid.as_str()] {
        for m in [
            json!({"type": "host", "id": target}),
            json!({"type": "kick", "id": target}),
            json!({"type": "admit", "id": target}),
            json!({"type": "deny", "id": target}),
            json!({"type": "mute_request", "id": target, "video": true}),
        ] {
            a.send(m).await;
            a.expect_error("unknown_peer").await;
        }
    }
    nothing_more(&mut other).await;

    // Lock: everyone gets the state; a join is refused; the room stays as it was.
    a.send(json!({"type": "lock", "locked": true})).await;
    assert_eq!(state(&mut a).await["locked"], true);
    let sb = state(&mut b).await;
    assert_eq!(sb["locked"], true);
    assert!(sb.get("waiting").is_none(), "{sb}");
    assert_eq!(metric(&server, "meshmeet_rooms_locked ").await, 1.0);
    let mut c = connect(&server).await;
    c.send(json!({"type": "join", "room": "CTL"})).await;
    c.expect_error("room_locked").await;
    nothing_more(&mut a).await;
    // Unlocked, the same socket joins.
    a.send(json!({"type": "lock", "locked": false})).await;
    assert_eq!(state(&mut a).await["locked"], false);
    assert_eq!(state(&mut b).await["locked"], false);
    assert_eq!(metric(&server, "meshmeet_rooms_locked ").await, 0.0);
    let (jc, _) = join_as(&mut c, "ctl", "Cy").await;
    let cid = id(&jc);
    a.recv_type("peer_joined").await;
    b.recv_type("peer_joined").await;

    // Make host: everyone sees two hosts, and the new one may act.
    a.send(json!({"type": "host", "id": bid})).await;
    for p in [&mut a, &mut b, &mut c] {
        assert_eq!(state(p).await["hosts"], json!([aid, bid]));
    }
    b.send(json!({"type": "lock", "locked": true})).await;
    for p in [&mut a, &mut b, &mut c] {
        assert_eq!(state(p).await["locked"], true);
    }
    b.send(json!({"type": "lock", "locked": false})).await;
    for p in [&mut a, &mut b, &mut c] {
        state(p).await;
    }

    // Mute request: to the one named only, with who asked; never to anyone else.
    a.send(json!({"type": "mute_request", "id": cid, "audio": true}))
        .await;
    assert_eq!(
        c.recv_any().await,
        json!({"type": "mute_request", "from": aid, "name": "Ada", "audio": true, "video": false})
    );
    b.send(json!({"type": "mute_request", "id": cid, "video": true, "audio": null}))
        .await;
    assert_eq!(
        c.recv_any().await,
        json!({"type": "mute_request", "from": bid, "name": "Bo", "audio": false, "video": true})
    );
    nothing_more(&mut a).await;
    nothing_more(&mut b).await;

    // Host rights survive a resume, and the last host leaving hands them on.
    let token = ja["resume"].as_str().unwrap().to_string();
    a.close_and_wait().await;
    let mut a2 = connect(&server).await;
    a2.send(json!({"type": "join", "room": "ctl", "resume": token}))
        .await;
    let ja2 = a2.recv_any().await;
    assert_eq!(ja2["resumed"], true);
    assert_eq!(ja2["hosts"], json!([aid, bid]));
    assert_eq!(state_after(&mut a2).await["hosts"], json!([aid, bid]));
    b.send(json!({"type": "leave"})).await;
    a2.recv_type("peer_left").await;
    assert_eq!(state(&mut a2).await["hosts"], json!([aid]));
    assert_eq!(c.recv_type("peer_left").await["id"], bid.as_str());
    assert_eq!(state(&mut c).await["hosts"], json!([aid]));
    a2.send(json!({"type": "leave"})).await;
    c.recv_type("peer_left").await;
    // The one present longest (the only one) is host now, with the host's copy.
    let sc = state(&mut c).await;
    assert_eq!(sc["hosts"], json!([cid]));
    assert_eq!(sc["waiting"], json!([]));
}

#[tokio::test]
async fn room_password_after_the_servers() {
    const SERVER_PW: &str = "server gate 1";
    const ROOM_PW: &str = "Room-Secret-42";
    let server = TestServer::start_with(|c| c.rooms.password = SERVER_PW.into()).await;
    let mut a = connect(&server).await;
    a.send(json!({"type": "join", "room": "pw", "password": SERVER_PW}))
        .await;
    assert_eq!(a.recv_any().await["type"], "joined");
    state(&mut a).await;
    a.send(json!({"type": "room_password", "password": ROOM_PW}))
        .await;
    let raw = a.recv_any().await;
    assert_eq!(raw["password"], true);
    assert!(!raw.to_string().contains(ROOM_PW), "{raw}");

    let mut b = connect(&server).await;
    let join = |server_pw: Option<&str>, room_pw: Option<&str>| {
        json!({"type": "join", "room": "pw", "name": "Bo", "password": server_pw,
               "room_password": room_pw})
    };
    // The server's password is checked first: no scope.
    for (spw, rpw) in [(None, Some(ROOM_PW)), (Some("nope"), Some(ROOM_PW))] {
        b.send(join(spw, rpw)).await;
        let e = b.recv_any().await;
        assert_eq!(e["code"], "bad_password", "{e}");
        assert!(e.get("scope").is_none(), "{e}");
    }
    // Then the room's: scope "room".
    for rpw in [None, Some(""), Some("room-secret-42")] {
        b.send(join(Some(SERVER_PW), rpw)).await;
        let e = b.recv_any().await;
        assert_eq!(e["code"], "bad_password", "{e}");
        assert_eq!(e["scope"], "room", "{e}");
    }
    nothing_more(&mut a).await;
    b.send(join(Some(SERVER_PW), Some(ROOM_PW))).await;
    assert_eq!(b.recv_any().await["type"], "joined");
    assert_eq!(state(&mut b).await["password"], true);
    a.recv_type("peer_joined").await;

    // Cleared: joins need only the server's password again.
    a.send(json!({"type": "room_password", "password": ""}))
        .await;
    assert_eq!(state(&mut a).await["password"], false);
    assert_eq!(state(&mut b).await["password"], false);
    let mut c = connect(&server).await;
    c.send(join(Some(SERVER_PW), None)).await;
    assert_eq!(c.recv_any().await["type"], "joined");
}

#[tokio::test]
async fn lobby_knock_admit_deny_leave_and_lock() {
    let server = TestServer::start().await;
    let mut a = connect(&server).await;
    let (ja, _) = join_as(&mut a, "lobby", "Ada").await;
    let aid = id(&ja);
    let mut b = connect(&server).await;
    join_as(&mut b, "lobby", "Bo").await;
    a.recv_type("peer_joined").await;

    a.send(json!({"type": "lobby", "on": true})).await;
    assert_eq!(state(&mut a).await["lobby"], true);
    assert_eq!(state(&mut b).await["lobby"], true);

    // A joiner waits: `waiting` to it, `knock` and the list to hosts only.
    let mut c = connect(&server).await;
    c.send(json!({"type": "join", "room": "lobby", "name": "Cy"}))
        .await;
    let w = c.recv_any().await;
    assert_eq!(w["type"], "waiting", "{w}");
    assert_eq!(w["room"], "lobby");
    let cid = id(&w);
    assert_eq!(
        a.recv_any().await,
        json!({"type": "knock", "id": cid, "name": "Cy"})
    );
    assert_eq!(
        state(&mut a).await["waiting"],
        json!([{"id": cid, "name": "Cy"}])
    );
    nothing_more(&mut b).await;
    assert_eq!(metric(&server, "meshmeet_lobby_waiting ").await, 1.0);
    // A waiting socket takes no part in the room and receives nothing from it.
    c.send(json!({"type": "chat", "text": "let me in"})).await;
    c.expect_error("not_joined").await;
    c.send(json!({"type": "join", "room": "lobby"})).await;
    c.expect_error("already_joined").await;
    a.send(json!({"type": "chat", "text": "inside"})).await;
    a.recv_type("chat").await;
    b.recv_type("chat").await;
    nothing_more(&mut c).await;

    // Admitted: a normal join under the id it knocked with.
    a.send(json!({"type": "admit", "id": cid})).await;
    let jc = c.recv_any().await;
    assert_eq!(jc["type"], "joined", "{jc}");
    assert_eq!(jc["id"], cid.as_str());
    assert_eq!(jc["resumed"], false);
    assert!(jc["ice"]["iceServers"].is_array(), "{jc}");
    assert_eq!(state(&mut c).await["lobby"], true);
    assert_eq!(
        a.recv_any().await,
        json!({"type": "peer_joined", "id": cid, "name": "Cy"})
    );
    assert_eq!(state(&mut a).await["waiting"], json!([]));
    assert_eq!(b.recv_type("peer_joined").await["id"], cid.as_str());
    assert_eq!(metric(&server, "meshmeet_lobby_waiting ").await, 0.0);
    // The admitted id is gone from the lobby.
    a.send(json!({"type": "admit", "id": cid})).await;
    a.expect_error("unknown_peer").await;

    // Denied: `denied`, then 4003.
    let mut d = connect(&server).await;
    d.send(json!({"type": "join", "room": "lobby", "name": "Di"}))
        .await;
    let did = id(&d.recv_type("waiting").await);
    a.recv_type("knock").await;
    state(&mut a).await;
    a.send(json!({"type": "deny", "id": did})).await;
    assert_eq!(
        d.recv_any().await,
        json!({"type": "denied", "room": "lobby", "reason": "denied"})
    );
    assert_eq!(d.close_code().await, 4003);
    assert_eq!(state(&mut a).await["waiting"], json!([]));

    // Gave up waiting: `leave` takes it out of the list; the socket may join again.
    let mut e = connect(&server).await;
    e.send(json!({"type": "join", "room": "lobby", "name": "Ed"}))
        .await;
    e.recv_type("waiting").await;
    a.recv_type("knock").await;
    assert_eq!(state(&mut a).await["waiting"].as_array().unwrap().len(), 1);
    e.send(json!({"type": "leave"})).await;
    assert_eq!(state(&mut a).await["waiting"], json!([]));

    // The lobby turned off while the room is locked turns everyone away ("locked").
    e.send(json!({"type": "join", "room": "lobby", "name": "Ed"}))
        .await;
    e.recv_type("waiting").await;
    a.recv_type("knock").await;
    state(&mut a).await;
    a.send(json!({"type": "lock", "locked": true})).await;
    state(&mut a).await;
    a.send(json!({"type": "lobby", "on": false})).await;
    assert_eq!(
        e.recv_any().await,
        json!({"type": "denied", "room": "lobby", "reason": "locked"})
    );
    assert_eq!(e.close_code().await, 4003);
    let s = state(&mut a).await;
    assert_eq!(
        (s["lobby"].clone(), s["waiting"].clone()),
        (json!(false), json!([]))
    );

    // Turned off while unlocked: everyone waiting comes in, in order.
    a.send(json!({"type": "lock", "locked": false})).await;
    state(&mut a).await;
    a.send(json!({"type": "lobby", "on": true})).await;
    state(&mut a).await;
    let mut f = connect(&server).await;
    f.send(json!({"type": "join", "room": "lobby", "name": "Fay"}))
        .await;
    let fid = id(&f.recv_type("waiting").await);
    a.send(json!({"type": "lobby", "on": false})).await;
    let jf = f.recv_any().await;
    assert_eq!(
        (jf["type"].clone(), jf["id"].clone()),
        (json!("joined"), json!(fid))
    );
    assert_eq!(jf["hosts"], json!([aid]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lobby_holds_twenty() {
    let server = TestServer::start().await;
    let mut a = connect(&server).await;
    join_as(&mut a, "busy", "Ada").await;
    a.send(json!({"type": "lobby", "on": true})).await;
    state(&mut a).await;
    let mut waiting = Vec::new();
    for i in 0..20 {
        let mut w = connect(&server).await;
        w.send(json!({"type": "join", "room": "busy", "name": format!("W{i}")}))
            .await;
        assert_eq!(w.recv_any().await["type"], "waiting");
        waiting.push(w);
    }
    let mut over = connect(&server).await;
    over.send(json!({"type": "join", "room": "busy"})).await;
    over.expect_error("lobby_full").await;
    assert_eq!(metric(&server, "meshmeet_lobby_waiting ").await, 20.0);
    // The host saw each knock and each new list; the last lists all twenty, oldest first.
    let mut last = Value::Null;
    for _ in 0..20 {
        a.recv_type("knock").await;
        last = state(&mut a).await;
    }
    let names: Vec<&str> = last["waiting"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    let want: Vec<String> = (0..20).map(|i| format!("W{i}")).collect();
    assert_eq!(names, want);
    // One leaves: there is a place again.
    waiting.pop().unwrap().close_and_wait().await;
    over.send(json!({"type": "join", "room": "busy"})).await;
    assert_eq!(over.recv_any().await["type"], "waiting");
}

const SECRET: &str = "room-control-secret-0123456789";

fn relay_config(c: &mut Config) {
    c.turn.secret = SECRET.into();
    c.turn.relay_ips = vec!["127.0.0.1".parse().unwrap()];
    // Below the kernel's ephemeral range, apart from the other relay tests' range.
    c.turn.relay_ports = "21000-21999".parse().unwrap();
}

/// A TURN client over UDP with one peer's credentials.
struct Turn {
    sock: UdpSocket,
    server: SocketAddr,
    session: Session,
}

impl Turn {
    async fn new(server: SocketAddr, user: &str, pass: &str) -> Turn {
        Turn {
            sock: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            server,
            session: Session::new(user, pass),
        }
    }

    /// Sends a request and returns the answer, answering one 401 challenge (and
    /// 438 Stale Nonce) with credentials.
    async fn request(&mut self, method: Method, attrs: &[&dyn Setter]) -> stun::message::Message {
        for _ in 0..3 {
            let req = self.session.request(method, attrs);
            self.sock.send_to(&req, self.server).await.unwrap();
            let mut buf = vec![0u8; 2048];
            let answer = loop {
                let (n, _) =
                    tokio::time::timeout(Duration::from_secs(5), self.sock.recv_from(&mut buf))
                        .await
                        .expect("answer within 5 s")
                        .unwrap();
                if let Some(m) = client::parse(&buf[..n]).filter(|m| client::answers(&req, m)) {
                    break m;
                }
            };
            if self.session.learn(&answer) {
                continue;
            }
            return answer;
        }
        panic!("challenge loop");
    }

    async fn allocate(&mut self) -> stun::message::Message {
        let udp = RequestedTransport {
            protocol: PROTO_UDP,
        };
        self.request(METHOD_ALLOCATE, &[&udp]).await
    }

    async fn refresh(&mut self) -> stun::message::Message {
        self.request(METHOD_REFRESH, &[&Attr::Lifetime(600)]).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kick_closes_4002_revokes_turn_and_voids_the_token() {
    let server = TestServer::start_with(relay_config).await;
    let turn_addr = server.addrs.turn_udp.expect("turn enabled");
    let mut a = connect(&server).await;
    let (ja, _) = join_as(&mut a, "kick", "Ada").await;
    let aid = id(&ja);
    let mut b = connect(&server).await;
    let (jb, _) = join_as(&mut b, "kick", "Bo").await;
    let bid = id(&jb);
    a.recv_type("peer_joined").await;
    let mut c = connect(&server).await;
    join_as(&mut c, "kick", "Cy").await;
    a.recv_type("peer_joined").await;
    b.recv_type("peer_joined").await;

    // Bo's credentials from `joined.ice` (its one TURN entry) hold an allocation on the relay.
    let ice = &jb["ice"]["iceServers"][0];
    let user = ice["username"].as_str().unwrap();
    let pass = ice["credential"].as_str().unwrap();
    assert!(user.ends_with(&format!(":{bid}")), "{user}");
    let mut t = Turn::new(turn_addr, user, pass).await;
    assert!(client::is_success(&t.allocate().await));
    assert!(client::is_success(&t.refresh().await));
    assert_eq!(
        metric(&server, "meshmeet_turn_allocations_active ").await,
        1.0
    );

    a.send(json!({"type": "kick", "id": bid})).await;
    assert_eq!(
        b.recv_any().await,
        json!({"type": "kicked", "by": aid, "name": "Ada"})
    );
    assert_eq!(b.close_code().await, 4002);
    // Everyone else, the host included: `peer_left`, nothing more. The host's pong
    // also says its kick, and the revocation that follows it, are done.
    for p in [&mut a, &mut c] {
        assert_eq!(p.recv_any().await, json!({"type": "peer_left", "id": bid}));
        nothing_more(p).await;
    }
    assert_eq!(metric(&server, "meshmeet_kicks_total ").await, 1.0);
    assert_eq!(metric(&server, "meshmeet_peers ").await, 2.0);

    // Its allocation is gone and its credentials are refused.
    assert_eq!(
        metric(&server, "meshmeet_turn_allocations_active ").await,
        0.0
    );
    let refresh = t.refresh().await;
    let code = client::error_code(&refresh);
    assert!(matches!(code, Some(437) | Some(401)), "{code:?}");
    let mut fresh = Turn::new(turn_addr, user, pass).await;
    assert_eq!(client::error_code(&fresh.allocate().await), Some(401));
    // Others' credentials still work.
    let other = &ja["ice"]["iceServers"][0];
    let mut ta = Turn::new(
        turn_addr,
        other["username"].as_str().unwrap(),
        other["credential"].as_str().unwrap(),
    )
    .await;
    assert!(client::is_success(&ta.allocate().await));

    // The resume token is void: a join with it is a fresh join, under a new id.
    let mut back = connect(&server).await;
    back.send(json!({"type": "join", "room": "kick", "resume": jb["resume"]}))
        .await;
    let j = back.recv_any().await;
    assert_eq!(j["type"], "joined", "{j}");
    assert_eq!(j["resumed"], false);
    assert_ne!(j["id"], bid.as_str());

    // A peer in its resume grace can be kicked too; its token is void afterwards.
    let jc2 = j;
    let cid2 = id(&jc2);
    a.recv_type("peer_joined").await;
    state_after(&mut back).await;
    back.close_and_wait().await;
    a.send(json!({"type": "kick", "id": cid2})).await;
    assert_eq!(a.recv_any().await, json!({"type": "peer_left", "id": cid2}));
    let mut again = connect(&server).await;
    again
        .send(json!({"type": "join", "room": "kick", "resume": jc2["resume"]}))
        .await;
    let j = again.recv_any().await;
    assert_eq!(j["resumed"], false, "{j}");
}
