//! Signaling over real WebSockets (TLS) against the in-process server: every message
//! type and error code of PROTOCOL.md, and every misuse it lists.

use std::time::{Duration, Instant};

use meshmeet::signaling::ws::SignalingTimings;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use crate::support::ws::{self, connect, id, try_connect};
use crate::support::TestServer;

async fn metrics(server: &TestServer) -> String {
    server.metrics().await
}

#[tokio::test]
async fn every_message_type() {
    let server = TestServer::start().await;
    let mut a = connect(&server).await;
    let mut b = connect(&server).await;

    // ping works before join; ice_request before join is short-lived.
    a.send(json!({"type": "ping"})).await;
    assert_eq!(a.recv().await, json!({"type": "pong"}));
    a.send(json!({"type": "ice_request"})).await;
    let ice = a.recv().await;
    assert_eq!(ice["type"], "ice");
    let now = meshmeet::clock::unix_secs();
    let exp = ice["ice"]["expiresAt"].as_u64().unwrap();
    assert!(exp <= now + 121 && exp >= now + 119, "{ice}");
    assert_eq!(ice["ice"]["iceTransportPolicy"], "all");

    let ja = a.join("Team.Room").await;
    assert_eq!(ja["protocol"], 1);
    assert_eq!(ja["room"], "team.room");
    assert_eq!(ja["capacity"], 6);
    assert_eq!(ja["peers"], json!([]));
    assert_eq!(ja["resumed"], false);
    assert!(ja["resume"].as_str().unwrap().len() >= 32);
    assert!(ja["ice"]["iceServers"].is_array(), "{ja}");
    assert!(ja["ice"]["expiresAt"].as_u64().unwrap() > now + 120);
    let aid = id(&ja);
    assert_eq!(aid.len(), 16);

    b.send(json!({"type": "join", "room": "TEAM.room", "name": "  Bea "}))
        .await;
    let jb = b.recv().await;
    assert_eq!(jb["type"], "joined");
    assert_eq!(jb["room"], "team.room");
    assert_eq!(
        jb["peers"],
        json!([{"id": aid, "name": "Guest", "media": null}])
    );
    let bid = id(&jb);
    assert_ne!(aid, bid);
    assert_eq!(
        a.recv().await,
        json!({"type": "peer_joined", "id": bid, "name": "Bea"})
    );

    // Relay, with a forged `from` ignored.
    b.send(json!({"type": "offer", "to": aid, "sdp": "v=0 offer", "from": "forged"}))
        .await;
    assert_eq!(
        a.recv().await,
        json!({"type": "offer", "from": bid, "sdp": "v=0 offer"})
    );
    a.send(json!({"type": "answer", "to": bid, "sdp": "v=0 answer"}))
        .await;
    assert_eq!(
        b.recv().await,
        json!({"type": "answer", "from": aid, "sdp": "v=0 answer"})
    );
    let cand = json!({"candidate": "candidate:1 1 udp 2122260223 192.0.2.1 54321 typ host", "sdpMid": "0", "sdpMLineIndex": 0});
    a.send(json!({"type": "candidate", "to": bid, "candidate": cand}))
        .await;
    assert_eq!(
        b.recv().await,
        json!({"type": "candidate", "from": aid, "candidate": cand})
    );
    a.send(json!({"type": "candidate", "to": bid, "candidate": null}))
        .await;
    assert_eq!(
        b.recv().await,
        json!({"type": "candidate", "from": aid, "candidate": null})
    );

    // Media: to the others, not echoed; shown to later joiners.
    a.send(json!({"type": "media", "audio": false, "video": true, "screen": false}))
        .await;
    assert_eq!(
        b.recv().await,
        json!({"type": "media", "from": aid, "audio": false, "video": true, "screen": false, "recording": false})
    );
    // Chat: everyone, sender included, with server time.
    b.send(json!({"type": "chat", "text": "hello <b>"})).await;
    for c in [&mut a, &mut b] {
        let m = c.recv().await;
        assert_eq!(m["type"], "chat");
        assert_eq!(m["from"], bid);
        assert_eq!(m["name"], "Bea");
        assert_eq!(m["text"], "hello <b>");
        let ts = m["ts"].as_u64().unwrap();
        assert!(ts / 1000 >= now && ts / 1000 <= now + 60);
    }
    // Not echoed: a's next message is the pong, not its own media.
    a.send(json!({"type": "ping"})).await;
    assert_eq!(a.recv().await["type"], "pong");

    let mut c = connect(&server).await;
    let jc = c.join("team.room").await;
    let peers = jc["peers"].as_array().unwrap();
    assert_eq!(
        peers[0]["media"],
        json!({"audio": false, "video": true, "screen": false, "recording": false})
    );
    assert_eq!(peers[1]["media"], Value::Null);
    let cid = id(&jc);
    a.recv_type("peer_joined").await;
    b.recv_type("peer_joined").await;

    // ice_request after join: full lifetime, credentials for this peer.
    a.send(json!({"type": "ice_request"})).await;
    let ice = a.recv().await;
    assert_eq!(ice["type"], "ice");
    assert!(ice["ice"]["expiresAt"].as_u64().unwrap() > now + 120);

    // leave: the others are told at once; the socket stays open and may join again.
    c.send(json!({"type": "leave"})).await;
    assert_eq!(a.recv().await, json!({"type": "peer_left", "id": cid}));
    assert_eq!(b.recv().await, json!({"type": "peer_left", "id": cid}));
    let jc2 = c.join("team.room").await;
    assert_ne!(id(&jc2), cid);
    assert_eq!(jc2["peers"].as_array().unwrap().len(), 2);
    assert_eq!(a.recv().await["type"], "peer_joined");

    let m = metrics(&server).await;
    assert!(m.contains("meshmeet_rooms 1"), "{m}");
    assert!(m.contains("meshmeet_peers 3"), "{m}");
    assert!(
        m.contains("meshmeet_signaling_messages_total{type=\"offer\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("meshmeet_signaling_messages_total{type=\"candidate\"} 2"),
        "{m}"
    );
}

/// Protocol 1.2: a peer's `recording` flag reaches the others, latecomers see it in
/// `joined`, it stays while the recorder is in its resume grace, and it goes away
/// when the recorder stops or leaves.
#[tokio::test]
async fn recording_flag_reaches_everyone_and_clears() {
    let server = TestServer::start_with(|c| c.rooms.resume_grace_s = 30).await;
    let mut a = connect(&server).await;
    let mut b = connect(&server).await;
    let ja = a.join("rec").await;
    assert_eq!(ja["minor"], 2);
    let aid = id(&ja);
    let token = ja["resume"].as_str().unwrap().to_string();
    b.join("rec").await;
    a.recv_type("peer_joined").await;

    a.send(
        json!({"type": "media", "audio": true, "video": true, "screen": false, "recording": true}),
    )
    .await;
    assert_eq!(
        b.recv().await,
        json!({"type": "media", "from": aid, "audio": true, "video": true, "screen": false, "recording": true})
    );
    // A latecomer sees it at join.
    let mut c = connect(&server).await;
    let jc = c.join("rec").await;
    assert_eq!(
        jc["peers"][0]["media"],
        json!({"audio": true, "video": true, "screen": false, "recording": true})
    );
    b.recv_type("peer_joined").await;
    a.recv_type("peer_joined").await;

    // The recorder's socket drops: in its grace the flag stays, for a new joiner too.
    a.close_and_wait().await;
    let mut d = connect(&server).await;
    let jd = d.join("rec").await;
    assert_eq!(jd["peers"][0]["id"], aid.as_str());
    assert_eq!(jd["peers"][0]["media"]["recording"], true);
    // It resumes and stops: everyone hears `recording: false`.
    let mut a2 = connect(&server).await;
    a2.send(json!({"type": "join", "room": "rec", "resume": token}))
        .await;
    assert_eq!(a2.recv_type("joined").await["resumed"], true);
    a2.send(json!({"type": "media", "audio": true, "video": true, "screen": false}))
        .await;
    for s in [&mut b, &mut c, &mut d] {
        let m = s.recv_type("media").await;
        assert_eq!(m["from"], aid.as_str());
        assert_eq!(m["recording"], false, "absent means false: {m}");
    }
    // It records again, then leaves for good: the others drop it with peer_left.
    a2.send(
        json!({"type": "media", "audio": true, "video": true, "screen": false, "recording": true}),
    )
    .await;
    for s in [&mut b, &mut c, &mut d] {
        assert_eq!(s.recv_type("media").await["recording"], true);
    }
    a2.send(json!({"type": "leave"})).await;
    for s in [&mut b, &mut c, &mut d] {
        assert_eq!(s.recv_type("peer_left").await["id"], aid.as_str());
    }
    let mut e = connect(&server).await;
    let je = e.join("rec").await;
    assert!(je["peers"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["id"] != aid.as_str() && p["media"]["recording"] != true));
}

#[tokio::test]
async fn error_codes() {
    let server = TestServer::start().await;
    let mut a = connect(&server).await;

    for bad in [
        Message::text("not json"),
        Message::text("{}"),
        Message::text(r#"{"type":"dance"}"#),
        Message::text(r#"{"type":"join","room":7}"#),
        Message::text(r#"{"type":"media","audio":"yes","video":true,"screen":false}"#),
        Message::text(
            r#"{"type":"media","audio":true,"video":true,"screen":false,"recording":"on"}"#,
        ),
    ] {
        a.send_raw(bad).await;
        a.expect_error("bad_message").await;
    }
    a.send(json!({"type": "offer", "to": "0000000000000000", "sdp": "x"}))
        .await;
    a.expect_error("not_joined").await;
    a.send(json!({"type": "chat", "text": "hi"})).await;
    a.expect_error("not_joined").await;
    for room in [
        "ws",
        "Metrics",
        "favicon.ico",
        "-x",
        "a b",
        "",
        &"r".repeat(65),
    ] {
        a.send(json!({"type": "join", "room": room})).await;
        a.expect_error("invalid_room").await;
    }
    for name in ["a\u{0007}", &"n".repeat(65)] {
        a.send(json!({"type": "join", "room": "r", "name": name}))
            .await;
        a.expect_error("invalid_name").await;
    }
    let ja = a.join("r").await;
    a.send(json!({"type": "join", "room": "r"})).await;
    a.expect_error("already_joined").await;
    a.send(json!({"type": "chat", "text": ""})).await;
    a.expect_error("bad_message").await;
    a.send(json!({"type": "chat", "text": "x".repeat(2001)}))
        .await;
    a.expect_error("bad_message").await;

    // A peer of another room is unknown and never gets the message.
    let mut other = connect(&server).await;
    let jo = other.join("elsewhere").await;
    a.send(json!({"type": "offer", "to": id(&jo), "sdp": "x"}))
        .await;
    a.expect_error("unknown_peer").await;
    a.send(json!({"type": "candidate", "to": id(&ja), "candidate": null}))
        .await;
    a.expect_error("unknown_peer").await;
    other.send(json!({"type": "ping"})).await;
    assert_eq!(other.recv().await["type"], "pong");

    let m = metrics(&server).await;
    assert!(
        m.contains("meshmeet_signaling_errors_total{code=\"unknown_peer\"} 2"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everyone_sees_chat_in_the_same_order() {
    let server = TestServer::start().await;
    let mut a = connect(&server).await;
    let mut b = connect(&server).await;
    let mut c = connect(&server).await;
    a.join("chat").await;
    b.join("chat").await;
    c.join("chat").await;
    a.recv_type("peer_joined").await;
    a.recv_type("peer_joined").await;
    b.recv_type("peer_joined").await;
    let send = |mut cl: ws::Client, tag: &'static str| {
        tokio::spawn(async move {
            for i in 0..50 {
                cl.send(json!({"type": "chat", "text": format!("{tag}{i}")}))
                    .await;
            }
            cl
        })
    };
    let (ta, tb) = (send(a, "a"), send(b, "b"));
    let mut a = ta.await.unwrap();
    let mut b = tb.await.unwrap();
    let mut orders = Vec::new();
    for cl in [&mut a, &mut b, &mut c] {
        let mut lines = Vec::new();
        while lines.len() < 100 {
            let m = cl.recv_type("chat").await;
            lines.push((
                m["text"].as_str().unwrap().to_string(),
                m["ts"].as_u64().unwrap(),
            ));
        }
        orders.push(lines);
    }
    assert_eq!(orders[0], orders[1]);
    assert_eq!(orders[0], orders[2]);
    assert!(orders[0].windows(2).all(|w| w[0].1 <= w[1].1));
}

#[tokio::test]
async fn room_password() {
    let server = TestServer::start_with(|c| c.rooms.password = "hunter22".into()).await;
    let mut a = connect(&server).await;
    a.send(json!({"type": "join", "room": "r"})).await;
    a.expect_error("bad_password").await;
    a.send(json!({"type": "join", "room": "r", "password": "nope"}))
        .await;
    a.expect_error("bad_password").await;
    a.send(json!({"type": "ice_request"})).await;
    a.expect_error("bad_password").await;
    a.send(json!({"type": "ice_request", "password": "hunter22"}))
        .await;
    assert_eq!(a.recv().await["type"], "ice");
    a.send(json!({"type": "join", "room": "r", "password": "hunter22"}))
        .await;
    assert_eq!(a.recv().await["type"], "joined");
    a.send(json!({"type": "ice_request"})).await;
    assert_eq!(a.recv().await["type"], "ice");
}

#[tokio::test]
async fn capacity_holds_under_concurrent_joins() {
    let server = TestServer::start().await;
    let mut clients = Vec::new();
    for _ in 0..30 {
        clients.push(connect(&server).await);
    }
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(30));
    let mut tasks = Vec::new();
    for mut c in clients {
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            c.send(json!({"type": "join", "room": "crowd"})).await;
            let v = c.recv().await;
            (v, c)
        }));
    }
    let mut joined = 0;
    let mut full = 0;
    let mut keep = Vec::new();
    for t in tasks {
        let (v, c) = t.await.unwrap();
        match v["type"].as_str().unwrap() {
            "joined" => joined += 1,
            "room_full" => {
                assert_eq!(v["room"], "crowd");
                assert_eq!(v["capacity"], 6);
                full += 1;
            }
            other => panic!("{other}"),
        }
        keep.push(c);
    }
    assert_eq!((joined, full), (6, 24));
}

#[tokio::test]
async fn close_gives_peer_left_only_after_grace() {
    let server = TestServer::start_with(|c| c.rooms.resume_grace_s = 1).await;
    let mut a = connect(&server).await;
    let mut b = connect(&server).await;
    let aid = id(&a.join("g").await);
    b.join("g").await;
    a.recv_type("peer_joined").await;
    let closed = Instant::now();
    a.ws.close(None).await.unwrap();
    drop(a);
    assert_eq!(b.recv().await, json!({"type": "peer_left", "id": aid}));
    assert!(
        closed.elapsed() >= Duration::from_millis(900),
        "{:?}",
        closed.elapsed()
    );
}

#[tokio::test]
async fn heartbeat_timeout_then_grace() {
    let server = TestServer::start_with(|c| c.rooms.resume_grace_s = 1).await;
    server.state.signaling.set_timings(SignalingTimings {
        ping_interval: Duration::from_millis(100),
        timeout: Duration::from_millis(400),
    });
    let mut a = connect(&server).await;
    let mut b = connect(&server).await;
    let aid = id(&a.join("hb").await);
    b.join("hb").await;
    // b keeps reading (and so answering pings); a goes silent.
    let start = Instant::now();
    let left = b.recv_type("peer_left").await;
    assert_eq!(left["id"], aid);
    assert!(
        start.elapsed() >= Duration::from_millis(1300),
        "{:?}",
        start.elapsed()
    );
    // The disconnect is counted before the grace starts, so before this `peer_left`.
    let m = metrics(&server).await;
    assert!(
        m.contains("meshmeet_ws_disconnects_total{reason=\"timeout\"} 1"),
        "{m}"
    );
    drop(a);
}

#[tokio::test]
async fn resume_within_grace_keeps_id_and_queue() {
    let server = TestServer::start_with(|c| c.rooms.resume_grace_s = 30).await;
    let mut a = connect(&server).await;
    let mut b = connect(&server).await;
    let ja = a.join("res").await;
    let aid = id(&ja);
    let token = ja["resume"].as_str().unwrap().to_string();
    let bid = id(&b.join("res").await);
    a.recv_type("peer_joined").await;
    // Once the server answers the close, a is in its grace: what b sends now is kept.
    a.close_and_wait().await;
    assert!(metrics(&server).await.contains("meshmeet_ws_connections 1"));
    b.send(json!({"type": "offer", "to": aid, "sdp": "while away"}))
        .await;
    b.send(json!({"type": "chat", "text": "anyone?"})).await;
    assert_eq!(b.recv().await["type"], "chat");

    let mut a2 = connect(&server).await;
    a2.send(json!({"type": "join", "room": "RES", "resume": token}))
        .await;
    let j = a2.recv().await;
    assert_eq!(j["type"], "joined");
    assert_eq!(j["id"], aid);
    assert_eq!(j["resumed"], true);
    assert_ne!(j["resume"], token);
    assert_eq!(j["peers"][0]["id"], bid);
    assert_eq!(
        a2.recv().await,
        json!({"type": "offer", "from": bid, "sdp": "while away"})
    );
    assert_eq!(a2.recv().await["text"], "anyone?");
    // b heard nothing about it.
    b.send(json!({"type": "ping"})).await;
    assert_eq!(b.recv().await["type"], "pong");
    // And the relay still works both ways.
    a2.send(json!({"type": "answer", "to": bid, "sdp": "back"}))
        .await;
    assert_eq!(
        b.recv().await,
        json!({"type": "answer", "from": aid, "sdp": "back"})
    );
}

#[tokio::test]
async fn resume_takes_over_open_socket() {
    let server = TestServer::start().await;
    let mut a = connect(&server).await;
    let mut b = connect(&server).await;
    let ja = a.join("t").await;
    b.join("t").await;
    a.recv_type("peer_joined").await;
    let mut a2 = connect(&server).await;
    a2.send(json!({"type": "join", "room": "t", "resume": ja["resume"]}))
        .await;
    let j = a2.recv().await;
    assert_eq!(j["id"], ja["id"]);
    assert_eq!(j["resumed"], true);
    assert_eq!(a.close_code().await, 4001);
    b.send(json!({"type": "ping"})).await;
    assert_eq!(b.recv().await["type"], "pong");
    b.send(json!({"type": "chat", "text": "x"})).await;
    assert_eq!(a2.recv().await["type"], "chat");
}

#[tokio::test]
async fn resume_after_grace_is_fresh_join() {
    let server = TestServer::start_with(|c| c.rooms.resume_grace_s = 1).await;
    let mut a = connect(&server).await;
    let mut b = connect(&server).await;
    let ja = a.join("late").await;
    b.join("late").await;
    a.ws.close(None).await.unwrap();
    drop(a);
    b.recv_type("peer_left").await;
    let mut a2 = connect(&server).await;
    a2.send(json!({"type": "join", "room": "late", "resume": ja["resume"]}))
        .await;
    let j = a2.recv().await;
    assert_eq!(j["type"], "joined");
    assert_eq!(j["resumed"], false);
    assert_ne!(j["id"], ja["id"]);
    assert_eq!(b.recv().await["type"], "peer_joined");
}

#[tokio::test]
async fn going_away_close_is_leave() {
    // A grace far longer than any wait here: a `peer_left` can only come from the close.
    let server = TestServer::start_with(|c| c.rooms.resume_grace_s = 600).await;
    let mut a = connect(&server).await;
    let mut b = connect(&server).await;
    let mut c = connect(&server).await;
    let ja = a.join("away").await;
    b.join("away").await;
    let jc = c.join("away").await;
    b.recv_type("peer_joined").await;
    let close = |code: CloseCode| {
        Some(CloseFrame {
            code,
            reason: "".into(),
        })
    };
    // A normal close (1000) is not a leave: c's peer enters its grace, nobody is told.
    c.ws.close(close(CloseCode::Normal)).await.unwrap();
    drop(c);
    // 1001, as a browser sends when the page goes away: a leaves at once.
    a.ws.close(close(CloseCode::Away)).await.unwrap();
    drop(a);
    assert_eq!(b.recv().await, json!({"type": "peer_left", "id": ja["id"]}));
    // c resumes within its grace; a's token was spent by the leave.
    let mut c2 = connect(&server).await;
    c2.send(json!({"type": "join", "room": "away", "resume": jc["resume"]}))
        .await;
    let j = c2.recv_type("joined").await;
    assert_eq!((&j["resumed"], &j["id"]), (&json!(true), &jc["id"]));
    let mut a2 = connect(&server).await;
    a2.send(json!({"type": "join", "room": "away", "resume": ja["resume"]}))
        .await;
    let j = a2.recv_type("joined").await;
    assert_eq!(j["resumed"], false);
    assert_ne!(j["id"], ja["id"]);
    // b heard of a's departure once, of the newcomer, and of c nothing.
    assert_eq!(b.recv().await["type"], "peer_joined");
}

#[tokio::test]
async fn oversize_and_binary_frames_close() {
    let server = TestServer::start().await;
    let mut a = connect(&server).await;
    a.send_raw(Message::text("x".repeat(64 * 1024 + 1))).await;
    assert_eq!(a.close_code().await, 1009);
    let mut b = connect(&server).await;
    // Just under the limit is fine (a bad message, but read).
    b.send_raw(Message::text("x".repeat(64 * 1024 - 10))).await;
    b.expect_error("bad_message").await;
    b.send_raw(Message::binary(vec![1u8, 2, 3])).await;
    assert_eq!(b.close_code().await, 1003);
}

#[tokio::test]
async fn flood_is_rate_limited_then_closed() {
    let server = TestServer::start_with(|c| {
        c.rooms.rate_per_s = 5;
        c.rooms.rate_burst = 10;
    })
    .await;
    let mut a = connect(&server).await;
    for _ in 0..40 {
        a.send(json!({"type": "ping"})).await;
    }
    let mut pongs = 0;
    let mut limited = 0;
    let code = loop {
        match tokio::time::timeout(ws::WAIT, futures_util::StreamExt::next(&mut a.ws))
            .await
            .unwrap()
        {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                match v["type"].as_str().unwrap() {
                    "pong" => pongs += 1,
                    "error" => {
                        assert_eq!(v["code"], "rate_limited");
                        limited += 1
                    }
                    other => panic!("{other}"),
                }
            }
            Some(Ok(Message::Close(Some(f)))) => break u16::from(f.code),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(code, 1008);
    assert!((10..=12).contains(&pongs), "{pongs}");
    assert_eq!(limited, 1);
}

#[tokio::test]
async fn bad_message_flood_closes() {
    let server = TestServer::start().await;
    let mut a = connect(&server).await;
    for _ in 0..21 {
        a.send_raw(Message::text("nope")).await;
    }
    for _ in 0..20 {
        a.expect_error("bad_message").await;
    }
    assert_eq!(a.recv().await["code"], "bad_message");
    assert_eq!(a.close_code().await, 1008);
}

#[tokio::test]
async fn origin_check() {
    let server = TestServer::start_with(|c| {
        c.http.allowed_origins = vec!["https://app.example.org".into()];
    })
    .await;
    for bad in ["https://evil.example", "http://localhost", "null"] {
        match try_connect(&server, Some(bad)).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status(), 403, "{bad}")
            }
            Err(e) => panic!("{bad}: {e}"),
            Ok(_) => panic!("{bad} was accepted"),
        }
    }
    let wrong_port = format!("https://localhost:{}", server.https_addr().port() + 1);
    assert!(try_connect(&server, Some(&wrong_port)).await.is_err());
    for good in [
        Some(server.origin()),
        Some("https://app.example.org".into()),
        None,
    ] {
        let mut c = try_connect(&server, good.as_deref())
            .await
            .expect("allowed");
        c.send(json!({"type": "ping"})).await;
        assert_eq!(c.recv().await["type"], "pong");
    }
}

#[tokio::test]
async fn slow_reader_is_cut_off_others_unaffected() {
    let server = TestServer::start_with(|c| {
        c.rooms.rate_per_s = 1_000_000;
        c.rooms.rate_burst = 1_000_000;
    })
    .await;
    let mut slow = connect(&server).await;
    let mut sender = connect(&server).await;
    let mut bystander = connect(&server).await;
    let slow_id = id(&slow.join("s").await);
    let sender_id = id(&sender.join("s").await);
    let by_id = id(&bystander.join("s").await);
    let sdp = "a".repeat(4000);
    // The slow reader never reads: its kernel buffers fill, then its queue overflows.
    let mut sent = 0u32;
    loop {
        sender
            .send(json!({"type": "offer", "to": slow_id, "sdp": sdp}))
            .await;
        sent += 1;
        if sent % 100 == 0 {
            let m = metrics(&server).await;
            if m.contains("meshmeet_ws_disconnects_total{reason=\"slow_reader\"} 1") {
                break;
            }
            assert!(sent < 200_000, "slow reader never cut off");
        }
    }
    // The others carry on: the bystander gets every message meant for it, in order.
    for i in 0..50 {
        sender
            .send(json!({"type": "offer", "to": by_id, "sdp": format!("o{i}")}))
            .await;
    }
    for i in 0..50 {
        assert_eq!(
            bystander.recv().await,
            json!({"type": "offer", "from": sender_id, "sdp": format!("o{i}")})
        );
    }
    // The slow reader finds its close code after its backlog.
    assert_eq!(slow.close_code().await, 1013);
}

#[tokio::test]
async fn shutdown_closes_with_1001() {
    let server = TestServer::start().await;
    let mut a = connect(&server).await;
    a.join("bye").await;
    let stop = tokio::spawn(server.shutdown());
    assert_eq!(a.close_code().await, 1001);
    stop.await.unwrap().unwrap();
}
