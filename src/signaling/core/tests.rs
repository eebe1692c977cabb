//! The rooms core under a virtual clock: every branch of the protocol.

use super::*;
use serde_json::json;
use std::collections::HashSet;

const GRACE: Duration = Duration::from_secs(20);

fn core(capacity: usize, password: &str) -> Rooms<u64> {
    Rooms::new(
        RoomRules {
            capacity,
            password: password.into(),
            resume_grace: GRACE,
        },
        StdRng::seed_from_u64(7),
    )
}

fn req(room: &str) -> JoinReq {
    JoinReq {
        room: room.into(),
        ..Default::default()
    }
}

/// Joins `conn` (handle = conn id) and returns (id, token).
fn join(r: &mut Rooms<u64>, conn: u64, room: &str, now: Instant) -> (Arc<str>, String) {
    let fx = r.join(conn, conn, req(room), now);
    match &fx[0] {
        Effect::Send(to, ServerMsg::Joined { id, resume, .. }) => {
            assert_eq!(to, &vec![conn]);
            (id.clone(), resume.clone())
        }
        other => panic!("expected joined, got {other:?}"),
    }
}

fn error_of(fx: &[Effect<u64>]) -> ErrorCode {
    match fx {
        [Effect::Send(_, ServerMsg::Error { code, .. })] => *code,
        other => panic!("expected one error, got {other:?}"),
    }
}

/// (targets, message) of every Send effect but `room_state` (protocol 1.1, checked by
/// the room-control tests with [`all_sends`]).
fn sends(fx: &[Effect<u64>]) -> Vec<(Vec<u64>, ServerMsg)> {
    all_sends(fx)
        .into_iter()
        .filter(|(_, m)| !matches!(m, ServerMsg::RoomState { .. }))
        .collect()
}

/// (targets, message) of every Send effect.
fn all_sends(fx: &[Effect<u64>]) -> Vec<(Vec<u64>, ServerMsg)> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Send(t, m) => Some((t.clone(), m.clone())),
            _ => None,
        })
        .collect()
}

/// The `room_state` a room's only remaining participant (connection `to`, now its
/// host) gets when the host before it leaves.
fn handed_over(to: u64, host: &Arc<str>) -> Effect<u64> {
    Effect::Send(
        vec![to],
        ServerMsg::RoomState {
            hosts: vec![host.clone()],
            locked: false,
            password: false,
            lobby: false,
            waiting: Some(Vec::new()),
        },
    )
}

fn offer(r: &mut Rooms<u64>, conn: u64, to: &str, sdp: &str) -> Vec<Effect<u64>> {
    r.relay(
        conn,
        &conn,
        RelayKind::Offer,
        to,
        RelayPayload::Sdp(sdp.into()),
    )
}

#[test]
fn join_lists_peers_and_announces() {
    let now = Instant::now();
    let mut r = core(6, "");
    let (a, _) = join(&mut r, 1, "Room", now);
    let fx = r.join(
        2,
        2,
        JoinReq {
            room: "ROOM".into(),
            name: Some(" Bob ".into()),
            ..Default::default()
        },
        now,
    );
    let s = sends(&fx);
    let ServerMsg::Joined {
        id,
        room,
        peers,
        capacity,
        resumed,
        protocol,
        ..
    } = &s[0].1
    else {
        panic!("{s:?}")
    };
    assert_eq!(&**room, "room");
    assert_eq!(*capacity, 6);
    assert_eq!(*protocol, 1);
    assert!(!resumed);
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].id, a);
    assert_eq!(&*peers[0].name, "Guest");
    assert_eq!(peers[0].media, None);
    assert_eq!(id.len(), 16);
    assert_ne!(*id, a);
    assert_eq!(
        s[1],
        (
            vec![1],
            ServerMsg::PeerJoined {
                id: id.clone(),
                name: "Bob".into()
            }
        )
    );
    assert_eq!(r.room_count(), 1);
    assert_eq!(r.peer_count(), 2);
    assert_eq!(r.peer_of(2), Some(id.clone()));
}

#[test]
fn join_errors() {
    let now = Instant::now();
    let mut r = core(6, "");
    assert_eq!(
        error_of(&r.join(1, 1, req("ws"), now)),
        ErrorCode::InvalidRoom
    );
    assert_eq!(
        error_of(&r.join(1, 1, req("a b"), now)),
        ErrorCode::InvalidRoom
    );
    let bad_name = JoinReq {
        room: "r".into(),
        name: Some("x\ny".into()),
        ..Default::default()
    };
    assert_eq!(
        error_of(&r.join(1, 1, bad_name, now)),
        ErrorCode::InvalidName
    );
    join(&mut r, 1, "r", now);
    assert_eq!(
        error_of(&r.join(1, 1, req("r"), now)),
        ErrorCode::AlreadyJoined
    );
    assert_eq!(
        error_of(&r.join(1, 1, req("other"), now)),
        ErrorCode::AlreadyJoined
    );
}

#[test]
fn password() {
    let now = Instant::now();
    let mut r = core(6, "s3cret");
    assert_eq!(
        error_of(&r.join(1, 1, req("r"), now)),
        ErrorCode::BadPassword
    );
    let wrong = JoinReq {
        room: "r".into(),
        password: Some("s3creT".into()),
        ..Default::default()
    };
    assert_eq!(error_of(&r.join(1, 1, wrong, now)), ErrorCode::BadPassword);
    let right = JoinReq {
        room: "r".into(),
        password: Some("s3cret".into()),
        ..Default::default()
    };
    assert!(matches!(
        &r.join(1, 1, right, now)[0],
        Effect::Send(_, ServerMsg::Joined { .. })
    ));
}

#[test]
fn ice_request_before_and_after_join() {
    let now = Instant::now();
    // No room password: anyone may ask before joining.
    let mut open = core(6, "");
    assert_eq!(open.ice_request(1, None), Ok(IceFor::Anonymous));
    let (id, _) = join(&mut open, 1, "r", now);
    assert_eq!(open.ice_request(1, None), Ok(IceFor::Peer(id)));

    // With a room password: only with it before joining; a joined peer needs none.
    let mut closed = core(6, "s3cret");
    assert_eq!(closed.ice_request(1, None), Err(ErrorCode::BadPassword));
    assert_eq!(
        closed.ice_request(1, Some("s3creT")),
        Err(ErrorCode::BadPassword)
    );
    assert_eq!(closed.ice_request(1, Some("s3cret")), Ok(IceFor::Anonymous));
    let fx = closed.join(
        1,
        1,
        JoinReq {
            room: "r".into(),
            password: Some("s3cret".into()),
            ..Default::default()
        },
        now,
    );
    let Effect::Send(_, ServerMsg::Joined { id, .. }) = &fx[0] else {
        panic!("expected joined, got {fx:?}");
    };
    assert_eq!(closed.ice_request(1, None), Ok(IceFor::Peer(id.clone())));
    // After leave, the connection is anonymous again.
    closed.leave(1, &1);
    assert_eq!(closed.ice_request(1, None), Err(ErrorCode::BadPassword));
}

#[test]
fn capacity_counts_peers_in_grace() {
    let now = Instant::now();
    let mut r = core(2, "");
    join(&mut r, 1, "r", now);
    join(&mut r, 2, "r", now);
    let fx = r.join(3, 3, req("R"), now);
    assert_eq!(
        sends(&fx),
        vec![(
            vec![3],
            ServerMsg::RoomFull {
                room: "r".into(),
                capacity: 2
            }
        )]
    );
    // Still room_full while peer 2 is in its grace.
    r.disconnect(2, now);
    assert!(matches!(
        sends(&r.join(3, 3, req("r"), now))[0].1,
        ServerMsg::RoomFull { .. }
    ));
    r.handle_timeout(now + GRACE);
    join(&mut r, 3, "r", now + GRACE);
    // A refused socket may join elsewhere.
    join(&mut r, 4, "other", now);
}

#[test]
fn relay_stamps_sender_and_stays_in_room() {
    let now = Instant::now();
    let mut r = core(6, "");
    let (a, _) = join(&mut r, 1, "r", now);
    let (b, _) = join(&mut r, 2, "r", now);
    let (c, _) = join(&mut r, 3, "other", now);
    assert_eq!(
        sends(&offer(&mut r, 1, &b, "v=0")),
        vec![(
            vec![2],
            ServerMsg::Offer {
                from: a.clone(),
                sdp: "v=0".into()
            }
        )]
    );
    let fx = r.relay(
        2,
        &2,
        RelayKind::Answer,
        &a,
        RelayPayload::Sdp("ans".into()),
    );
    assert_eq!(
        sends(&fx),
        vec![(
            vec![1],
            ServerMsg::Answer {
                from: b.clone(),
                sdp: "ans".into()
            }
        )]
    );
    let fx = r.relay(
        2,
        &2,
        RelayKind::Candidate,
        &a,
        RelayPayload::Candidate(json!({"candidate":"x"})),
    );
    assert_eq!(
        sends(&fx),
        vec![(
            vec![1],
            ServerMsg::Candidate {
                from: b.clone(),
                candidate: Arc::new(json!({"candidate":"x"}))
            }
        )]
    );
    // Other room, unknown id, self: refused, nothing delivered.
    assert_eq!(error_of(&offer(&mut r, 1, &c, "x")), ErrorCode::UnknownPeer);
    assert_eq!(error_of(&offer(&mut r, 3, &a, "x")), ErrorCode::UnknownPeer);
    assert_eq!(
        error_of(&offer(&mut r, 1, "nobody", "x")),
        ErrorCode::UnknownPeer
    );
    assert_eq!(error_of(&offer(&mut r, 1, &a, "x")), ErrorCode::UnknownPeer);
    // Mismatched payload is a bad message.
    let fx = r.relay(
        1,
        &1,
        RelayKind::Offer,
        &b,
        RelayPayload::Candidate(json!(null)),
    );
    assert_eq!(error_of(&fx), ErrorCode::BadMessage);
    // Before join.
    assert_eq!(error_of(&offer(&mut r, 9, &a, "x")), ErrorCode::NotJoined);
}

#[test]
fn media_is_stored_and_not_echoed() {
    let now = Instant::now();
    let mut r = core(6, "");
    let (a, _) = join(&mut r, 1, "r", now);
    join(&mut r, 2, "r", now);
    let m = Media {
        audio: true,
        video: false,
        screen: true,
        recording: false,
    };
    assert_eq!(
        sends(&r.media(1, &1, m)),
        vec![(
            vec![2],
            ServerMsg::Media {
                from: a.clone(),
                audio: true,
                video: false,
                screen: true,
                recording: false,
            }
        )]
    );
    let fx = r.join(3, 3, req("r"), now);
    let ServerMsg::Joined { peers, .. } = &sends(&fx)[0].1 else {
        panic!()
    };
    assert_eq!(peers[0].media, Some(m));
    assert_eq!(peers[1].media, None);
    assert_eq!(error_of(&r.media(9, &9, m)), ErrorCode::NotJoined);
    // Alone in a room: stored, sent to nobody.
    join(&mut r, 4, "solo", now);
    assert!(r.media(4, &4, m).is_empty());
}

#[test]
fn recording_flag_is_stored_relayed_shown_to_latecomers_and_cleared() {
    let now = Instant::now();
    let mut r = core(6, "");
    let (a, _) = join(&mut r, 1, "r", now);
    join(&mut r, 2, "r", now);
    let rec = Media {
        audio: true,
        video: true,
        screen: false,
        recording: true,
    };
    assert_eq!(
        sends(&r.media(1, &1, rec)),
        vec![(
            vec![2],
            ServerMsg::Media {
                from: a.clone(),
                audio: true,
                video: true,
                screen: false,
                recording: true,
            }
        )]
    );
    let latecomer_sees = |r: &mut Rooms<u64>, conn: u64| {
        let fx = r.join(conn, conn, req("r"), now);
        let ServerMsg::Joined { peers, .. } = &sends(&fx)[0].1 else {
            panic!("{fx:?}")
        };
        let seen = peers.iter().find(|p| p.id == a).and_then(|p| p.media);
        r.leave(conn, &conn);
        seen
    };
    assert_eq!(latecomer_sees(&mut r, 3), Some(rec));
    // In its resume grace the recorder's page may still record: the flag stays.
    assert!(r.disconnect(1, now).is_empty());
    assert_eq!(latecomer_sees(&mut r, 4), Some(rec));
    // Stopping clears it for everyone.
    let (a2, _) = join(&mut r, 6, "s", now);
    join(&mut r, 7, "s", now);
    let s = sends(&r.media(6, &6, rec));
    assert!(matches!(
        &s[0].1,
        ServerMsg::Media {
            recording: true,
            ..
        }
    ));
    let stopped = Media {
        recording: false,
        ..rec
    };
    assert_eq!(
        sends(&r.media(6, &6, stopped)),
        vec![(
            vec![7],
            ServerMsg::Media {
                from: a2.clone(),
                audio: true,
                video: true,
                screen: false,
                recording: false,
            }
        )]
    );
    let fx = r.join(8, 8, req("s"), now);
    let ServerMsg::Joined { peers, .. } = &sends(&fx)[0].1 else {
        panic!("{fx:?}")
    };
    assert_eq!(peers[0].media, Some(stopped));
    // Leaving for good removes the recorder and its state: others get peer_left.
    let fx = r.handle_timeout(now + GRACE);
    assert!(sends(&fx)
        .iter()
        .any(|(to, m)| to == &vec![2] && matches!(m, ServerMsg::PeerLeft { id } if *id == a)));
    let fx = r.join(9, 9, req("r"), now + GRACE);
    let ServerMsg::Joined { peers, .. } = &sends(&fx)[0].1 else {
        panic!("{fx:?}")
    };
    assert!(peers.iter().all(|p| p.id != a));
}

#[test]
fn chat_to_everyone_in_order() {
    let now = Instant::now();
    let mut r = core(6, "");
    let (a, _) = join(&mut r, 1, "r", now);
    join(&mut r, 2, "r", now);
    join(&mut r, 3, "x", now);
    assert_eq!(
        sends(&r.chat(1, &1, "hello", 1234)),
        vec![(
            vec![1, 2],
            ServerMsg::Chat {
                from: a,
                name: "Guest".into(),
                text: "hello".into(),
                ts: 1234
            }
        )]
    );
    assert_eq!(error_of(&r.chat(1, &1, "", 1)), ErrorCode::BadMessage);
    assert_eq!(
        error_of(&r.chat(1, &1, &"é".repeat(2001), 1)),
        ErrorCode::BadMessage
    );
    assert_eq!(sends(&r.chat(1, &1, &"é".repeat(2000), 1)).len(), 1);
    assert_eq!(error_of(&r.chat(9, &9, "x", 1)), ErrorCode::NotJoined);
}

#[test]
fn leave_tells_others_at_once_and_allows_rejoin() {
    let now = Instant::now();
    let mut r = core(6, "");
    let (a, _) = join(&mut r, 1, "r", now);
    let (b, _) = join(&mut r, 2, "r", now);
    let fx = r.leave(1, &1);
    assert_eq!(
        fx,
        vec![
            Effect::Send(vec![2], ServerMsg::PeerLeft { id: a.clone() }),
            Effect::PeerGone(a.clone()),
            handed_over(2, &b),
        ]
    );
    assert_eq!(error_of(&r.leave(1, &1)), ErrorCode::NotJoined);
    let (a2, _) = join(&mut r, 1, "r", now);
    assert_ne!(a, a2);
    // Last one out deletes the room.
    r.leave(1, &1);
    r.leave(2, &2);
    assert_eq!(r.room_count(), 0);
    assert_eq!(r.peer_count(), 0);
}

#[test]
fn disconnect_grace_then_peer_left() {
    let now = Instant::now();
    let mut r = core(6, "");
    let (a, _) = join(&mut r, 1, "r", now);
    let (b, _) = join(&mut r, 2, "r", now);
    assert_eq!(r.poll_timeout(), None);
    assert!(r.disconnect(1, now).is_empty());
    assert_eq!(r.poll_timeout(), Some(now + GRACE));
    // Unknown connection: nothing.
    assert!(r.disconnect(1, now).is_empty());
    assert!(r
        .handle_timeout(now + GRACE - Duration::from_millis(1))
        .is_empty());
    assert_eq!(r.peer_count(), 2);
    let fx = r.handle_timeout(now + GRACE);
    assert_eq!(
        fx,
        vec![
            Effect::Send(vec![2], ServerMsg::PeerLeft { id: a.clone() }),
            Effect::PeerGone(a),
            handed_over(2, &b),
        ]
    );
    assert_eq!(r.poll_timeout(), None, "no grace left to wait for");
    assert!(r.handle_timeout(now + GRACE * 2).is_empty());
}

#[test]
fn zero_grace_removes_at_once() {
    let now = Instant::now();
    let mut r = core(6, "");
    r.cfg.resume_grace = Duration::ZERO;
    let (a, _) = join(&mut r, 1, "r", now);
    let (b, _) = join(&mut r, 2, "r", now);
    assert_eq!(
        r.disconnect(1, now),
        vec![
            Effect::Send(vec![2], ServerMsg::PeerLeft { id: a.clone() }),
            Effect::PeerGone(a),
            handed_over(2, &b),
        ]
    );
}

#[test]
fn resume_in_grace_keeps_id_and_delivers_queue() {
    let now = Instant::now();
    let mut r = core(6, "");
    let (a, token) = join(&mut r, 1, "r", now);
    let (b, _) = join(&mut r, 2, "r", now);
    r.disconnect(1, now);
    // Messages for a meanwhile: queued, at most MAX_QUEUED, oldest dropped.
    for i in 0..(MAX_QUEUED + 5) {
        assert!(offer(&mut r, 2, &a, &format!("o{i}")).is_empty());
    }
    let fx = r.join(
        7,
        7,
        JoinReq {
            room: "R".into(),
            resume: Some(token.clone()),
            ..Default::default()
        },
        now + Duration::from_secs(5),
    );
    let s = sends(&fx);
    let ServerMsg::Joined {
        id,
        resumed,
        peers,
        resume,
        ..
    } = &s[0].1
    else {
        panic!()
    };
    assert_eq!(*id, a);
    assert!(*resumed);
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].id, b);
    assert_ne!(*resume, token);
    assert_eq!(s.len(), 1 + MAX_QUEUED);
    assert_eq!(
        s[1].1,
        ServerMsg::Offer {
            from: b.clone(),
            sdp: "o5".into()
        }
    );
    assert!(s.iter().all(|(t, _)| t == &vec![7]));
    // Nobody got peer_joined; the grace no longer expires it.
    assert!(r.handle_timeout(now + GRACE * 2).is_empty());
    assert_eq!(r.peer_of(7), Some(a.clone()));
    // The old token is spent.
    r.leave(7, &7);
    let fx = r.join(
        8,
        8,
        JoinReq {
            room: "r".into(),
            resume: Some(token),
            ..Default::default()
        },
        now,
    );
    let ServerMsg::Joined { id, resumed, .. } = &sends(&fx)[0].1 else {
        panic!()
    };
    assert_ne!(*id, a);
    assert!(!resumed);
}

#[test]
fn resume_takes_over_open_socket() {
    let now = Instant::now();
    let mut r = core(6, "");
    let (a, token) = join(&mut r, 1, "r", now);
    let fx = r.join(
        2,
        2,
        JoinReq {
            room: "r".into(),
            resume: Some(token),
            ..Default::default()
        },
        now,
    );
    assert_eq!(fx[0], Effect::Close(1, CLOSE_TAKEN_OVER));
    assert!(
        matches!(&fx[1], Effect::Send(t, ServerMsg::Joined { id, resumed: true, .. }) if t == &vec![2] && *id == a)
    );
    // The old socket's close changes nothing.
    assert!(r.disconnect(1, now).is_empty());
    assert_eq!(r.peer_of(2), Some(a));
    assert_eq!(r.peer_count(), 1);
}

#[test]
fn resume_after_grace_or_wrong_room_is_fresh() {
    let now = Instant::now();
    let mut r = core(6, "");
    let (a, token) = join(&mut r, 1, "r", now);
    r.disconnect(1, now);
    // Another room: fresh join, the old peer stays in its grace.
    let fx = r.join(
        2,
        2,
        JoinReq {
            room: "other".into(),
            resume: Some(token.clone()),
            ..Default::default()
        },
        now,
    );
    let ServerMsg::Joined { id, resumed, .. } = &sends(&fx)[0].1 else {
        panic!()
    };
    assert!(!resumed);
    assert_ne!(*id, a);
    let gone = r.handle_timeout(now + GRACE);
    assert_eq!(gone, vec![Effect::PeerGone(a.clone())]);
    let fx = r.join(
        3,
        3,
        JoinReq {
            room: "r".into(),
            resume: Some(token),
            ..Default::default()
        },
        now + GRACE,
    );
    let ServerMsg::Joined { id, resumed, .. } = &sends(&fx)[0].1 else {
        panic!()
    };
    assert!(!resumed);
    assert_ne!(*id, a);
}

#[test]
fn grace_peer_gets_peer_events_queued() {
    let now = Instant::now();
    let mut r = core(6, "");
    let (a, token) = join(&mut r, 1, "r", now);
    r.disconnect(1, now);
    let (b, _) = join(&mut r, 2, "r", now);
    r.leave(2, &2);
    let fx = r.join(
        3,
        3,
        JoinReq {
            room: "r".into(),
            resume: Some(token),
            ..Default::default()
        },
        now,
    );
    let msgs: Vec<ServerMsg> = sends(&fx).into_iter().map(|(_, m)| m).collect();
    assert!(matches!(&msgs[0], ServerMsg::Joined { id, .. } if *id == a));
    assert_eq!(
        msgs[1],
        ServerMsg::PeerJoined {
            id: b.clone(),
            name: "Guest".into()
        }
    );
    assert_eq!(msgs[2], ServerMsg::PeerLeft { id: b });
}

#[test]
fn ids_and_tokens_are_unique_and_shaped() {
    let now = Instant::now();
    let mut r = core(50, "");
    let mut ids = HashSet::new();
    let mut tokens = HashSet::new();
    for c in 0..500u64 {
        let (id, token) = join(&mut r, c, &format!("r{}", c % 10), now);
        assert!(id.chars().all(|ch| ch.is_ascii_hexdigit()) && id.len() == 16);
        assert!(token.chars().all(|ch| ch.is_ascii_hexdigit()) && token.len() == 32);
        assert!(ids.insert(id));
        assert!(tokens.insert(token));
        r.leave(c, &c);
    }
}

#[test]
fn rate_limiter_bucket_notice_and_close() {
    let t0 = Instant::now();
    let mut l = RateLimiter::new(10, 5, t0);
    for _ in 0..5 {
        assert_eq!(l.frame(t0), Verdict::Allow);
    }
    assert_eq!(l.frame(t0), Verdict::Drop { notify: true });
    assert_eq!(l.frame(t0), Verdict::Drop { notify: false });
    // 100 ms later one token is back.
    let t1 = t0 + Duration::from_millis(100);
    assert_eq!(l.frame(t1), Verdict::Allow);
    assert_eq!(l.frame(t1), Verdict::Drop { notify: false });
    // A second after the first notice, another notice.
    let t2 = t0 + Duration::from_millis(1000);
    for _ in 0..5 {
        assert_eq!(l.frame(t2), Verdict::Allow);
    }
    assert_eq!(l.frame(t2), Verdict::Drop { notify: true });
    // Drops so far: 4 (<= burst). The 6th within 10 s closes.
    assert_eq!(l.frame(t2), Verdict::Drop { notify: false });
    assert_eq!(l.frame(t2), Verdict::Close);
}

#[test]
fn rate_limiter_drops_age_out() {
    let t0 = Instant::now();
    let mut l = RateLimiter::new(1, 2, t0);
    l.frame(t0);
    l.frame(t0);
    assert!(matches!(l.frame(t0), Verdict::Drop { .. }));
    assert!(matches!(l.frame(t0), Verdict::Drop { .. }));
    // 11 s later the old drops no longer count.
    let t1 = t0 + Duration::from_secs(11);
    l.frame(t1);
    l.frame(t1);
    assert!(matches!(l.frame(t1), Verdict::Drop { .. }));
    assert!(matches!(l.frame(t1), Verdict::Drop { .. }));
    assert_eq!(l.frame(t1), Verdict::Close);
}

#[test]
fn bad_messages_close_after_twenty() {
    let t0 = Instant::now();
    let mut l = RateLimiter::new(10, 10, t0);
    for i in 0..MAX_BAD_MESSAGES {
        assert!(!l.bad_message(t0 + Duration::from_millis(u64::from(i))));
    }
    assert!(l.bad_message(t0 + Duration::from_secs(9)));
    let mut l = RateLimiter::new(10, 10, t0);
    for _ in 0..MAX_BAD_MESSAGES {
        assert!(!l.bad_message(t0));
    }
    assert!(!l.bad_message(t0 + Duration::from_secs(10)));
}

#[test]
fn heartbeat_pings_and_times_out() {
    let t0 = Instant::now();
    let s = Duration::from_secs(1);
    let mut h = Heartbeat::new(15 * s, 45 * s, t0);
    assert_eq!(h.deadline(), t0 + 15 * s);
    assert_eq!(h.poll(t0 + 14 * s), Beat::Wait);
    assert_eq!(h.poll(t0 + 15 * s), Beat::Ping);
    assert_eq!(h.deadline(), t0 + 30 * s);
    h.seen(t0 + 20 * s);
    assert_eq!(h.poll(t0 + 30 * s), Beat::Ping);
    assert_eq!(h.poll(t0 + 45 * s), Beat::Ping);
    assert_eq!(h.poll(t0 + 59 * s), Beat::Wait);
    assert_eq!(h.deadline(), t0 + 60 * s);
    assert_eq!(h.poll(t0 + 65 * s), Beat::TimedOut);
}

#[test]
fn window_counter_slides() {
    let t0 = Instant::now();
    let mut w = WindowCounter::new(t0);
    assert_eq!(w.add(t0), 1);
    assert_eq!(w.add(t0 + Duration::from_secs(5)), 2);
    assert_eq!(w.add(t0 + Duration::from_secs(9)), 3);
    assert_eq!(w.add(t0 + Duration::from_secs(10)), 3);
    assert_eq!(w.add(t0 + Duration::from_secs(100)), 1);
}

#[test]
fn peer_ids_never_repeat_and_leave_nothing_behind() {
    let now = Instant::now();
    let mut r = core(6, "");
    let mut seen = HashSet::new();
    for conn in 0..50_000u64 {
        let (id, _) = join(&mut r, conn, "r", now);
        assert_eq!(id.len(), 16);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
        assert!(seen.insert(id), "an id was issued twice");
        r.leave(conn, &conn);
    }
    // No table keeps anything per id ever issued.
    assert_eq!(r.table_sizes(), [0; 7]);
}

#[test]
fn id_generator_continues_where_it_stopped() {
    let mut rng = StdRng::seed_from_u64(1);
    let mut a = IdGen::new(&mut rng);
    let first: HashSet<Arc<str>> = (0..1000).map(|_| a.next_id(&mut rng)).collect();
    assert_eq!(first.len(), 1000);
    let (key, next) = a.parts();
    assert_eq!(next, 1000);
    let mut b = IdGen::from_parts(key, next);
    for _ in 0..1000 {
        assert!(!first.contains(&b.next_id(&mut rng)));
    }
    // Another key orders ids differently.
    let mut c = IdGen::new(&mut StdRng::seed_from_u64(2));
    let mut d = IdGen::from_parts(key, 0);
    assert_ne!(c.next_id(&mut rng), d.next_id(&mut rng));
}

#[test]
fn id_generator_rekeys_instead_of_overflowing() {
    let mut rng = StdRng::seed_from_u64(3);
    let mut g = IdGen::from_parts([1, 2, 3, 4], u64::MAX);
    let last = g.next_id(&mut rng);
    let (key, next) = g.parts();
    assert_eq!(next, 0);
    assert_ne!(key, [1, 2, 3, 4]);
    assert_ne!(g.next_id(&mut rng), last);
}

#[test]
fn resume_tokens_are_kept_only_as_hashes() {
    let now = Instant::now();
    let mut r = core(6, "");
    let (_, token) = join(&mut r, 1, "r", now);
    assert!(r.tokens.contains_key(&token_hash(&token)));
    assert!(r.peers.values().all(|p| p.token == token_hash(&token)));
}

fn resume_req(room: &str, token: &str) -> JoinReq {
    JoinReq {
        room: room.into(),
        resume: Some(token.into()),
        ..Default::default()
    }
}

const UNIX_MS: u64 = 1_800_000_000_000;

#[test]
fn snapshot_round_trip_resumes_everyone_with_their_ids() {
    let t0 = Instant::now();
    let mut r = core(6, "");
    let (a, ta) = join(&mut r, 1, "r", t0);
    let (b, tb) = join(&mut r, 2, "r", t0);
    let (c, _) = join(&mut r, 3, "s", t0);
    let media = Media {
        audio: true,
        video: false,
        screen: true,
        recording: true,
    };
    r.media(2, &2, media);
    let snap = r.snapshot(UNIX_MS);
    // Tokens are stored only as hashes.
    let text = serde_json::to_string(&snap).unwrap();
    assert!(!text.contains(&ta) && !text.contains(&tb));
    assert!(text.contains(&hex::encode(token_hash(&ta))));

    // The new process: another RNG, the same snapshot read back a few seconds later.
    let t1 = t0 + Duration::from_secs(100);
    let mut r2 = Rooms::new(r.cfg.clone(), StdRng::seed_from_u64(99));
    let fx = r2
        .restore(snap.clone(), t1, UNIX_MS + 3_000)
        .expect("restored");
    assert!(fx.is_empty());
    assert_eq!(r2.poll_timeout(), Some(t1 + GRACE));
    assert_eq!((r2.peer_count(), r2.room_count()), (3, 2));
    let again = r2.snapshot(UNIX_MS);
    assert_eq!(again.peers, snap.peers);
    assert_eq!(again.id_next, snap.id_next + RESTORE_ID_GAP);

    // a resumes on a new connection: same id, b listed with its media, nobody told.
    let fx = r2.join(10, 10, resume_req("r", &ta), t1);
    let s = sends(&fx);
    assert_eq!(s.len(), 1, "{fx:?}");
    match &s[0] {
        (
            to,
            ServerMsg::Joined {
                id, peers, resumed, ..
            },
        ) => {
            assert_eq!(to, &vec![10]);
            assert_eq!(id, &a);
            assert!(resumed);
            assert_eq!(peers.len(), 1);
            assert_eq!(peers[0].id, b);
            assert_eq!(peers[0].media, Some(media));
        }
        other => panic!("{other:?}"),
    }
    // b resumes too, and a new peer gets an id never issued before.
    let fx = r2.join(11, 11, resume_req("R", &tb), t1);
    assert!(matches!(&sends(&fx)[0].1, ServerMsg::Joined { id, resumed: true, .. } if *id == b));
    let (d, _) = join(&mut r2, 12, "r", t1);
    assert!(d != a && d != b && d != c);
    // Ids issued after the snapshot was taken (then a crash) are not issued again.
    let (after, _) = join(&mut r, 20, "t", t0);
    assert_ne!(d, after);

    // c never comes back: it leaves when the grace ends, announced to nobody (alone).
    assert!(r2
        .handle_timeout(t1 + GRACE - Duration::from_millis(1))
        .is_empty());
    let fx = r2.handle_timeout(t1 + GRACE);
    assert_eq!(fx, vec![Effect::PeerGone(c)]);
    assert_eq!(r2.room_count(), 1);
}

#[test]
fn restored_peers_that_do_not_return_leave_and_are_announced_once() {
    let t0 = Instant::now();
    let mut r = core(6, "");
    let (_, ta) = join(&mut r, 1, "r", t0);
    let (b, _) = join(&mut r, 2, "r", t0);
    let snap = r.snapshot(UNIX_MS);
    let mut r2 = Rooms::new(r.cfg.clone(), StdRng::seed_from_u64(5));
    r2.restore(snap, t0, UNIX_MS).unwrap();
    r2.join(7, 7, resume_req("r", &ta), t0);
    let fx = r2.handle_timeout(t0 + GRACE);
    assert_eq!(
        sends(&fx),
        vec![(vec![7], ServerMsg::PeerLeft { id: b.clone() })]
    );
    assert!(fx.contains(&Effect::PeerGone(b)));
    assert!(r2.handle_timeout(t0 + GRACE * 3).is_empty());
    assert_eq!(r2.peer_count(), 1);
}

#[test]
fn stale_or_invalid_snapshots_are_refused_and_change_nothing() {
    let t0 = Instant::now();
    let mut r = core(6, "");
    join(&mut r, 1, "r", t0);
    let snap = r.snapshot(UNIX_MS);
    let fresh = || Rooms::<u64>::new(r.cfg.clone(), StdRng::seed_from_u64(5));
    let limit = (GRACE + STALE_MARGIN).as_millis() as u64;

    // Just within the bound, either way (a clock stepped back counts too).
    assert!(fresh().restore(snap.clone(), t0, UNIX_MS + limit).is_ok());
    assert!(fresh().restore(snap.clone(), t0, UNIX_MS - limit).is_ok());
    for now in [UNIX_MS + limit + 1, UNIX_MS - limit - 1, 0, u64::MAX] {
        let mut c = fresh();
        let e = c.restore(snap.clone(), t0, now).unwrap_err();
        assert!(matches!(e, RestoreError::Stale { .. }), "{e}");
        assert_eq!(c.table_sizes(), [0; 7]);
    }

    let bad = |edit: &dyn Fn(&mut Snapshot)| {
        let mut s = snap.clone();
        edit(&mut s);
        let mut c = fresh();
        let e = c.restore(s, t0, UNIX_MS).unwrap_err();
        assert_eq!(c.table_sizes(), [0; 7]);
        e
    };
    assert_eq!(bad(&|s| s.format = 2), RestoreError::Format(2));
    assert_eq!(
        bad(&|s| s.peers[0].id = "xyz".into()),
        RestoreError::Invalid("peer id")
    );
    assert_eq!(
        bad(&|s| s.peers[0].room = "Upper".into()),
        RestoreError::Invalid("room name")
    );
    assert_eq!(
        bad(&|s| s.peers[0].room = "ws".into()),
        RestoreError::Invalid("room name")
    );
    assert_eq!(
        bad(&|s| s.peers[0].name = "a\u{7}".into()),
        RestoreError::Invalid("peer name")
    );
    assert_eq!(
        bad(&|s| s.peers[0].token_sha256 = "abc".into()),
        RestoreError::Invalid("token hash")
    );
    assert_eq!(
        bad(&|s| {
            let mut p = s.peers[0].clone();
            p.token_sha256 = "11".repeat(32);
            s.peers.push(p);
        }),
        RestoreError::Invalid("duplicate peer id")
    );
    assert_eq!(
        bad(&|s| {
            let mut p = s.peers[0].clone();
            p.id = "ffffffffffffffff".into();
            s.peers.push(p);
        }),
        RestoreError::Invalid("duplicate token")
    );

    // Resume off: nothing to restore into.
    let mut off = Rooms::<u64>::new(
        RoomRules {
            resume_grace: Duration::ZERO,
            ..r.cfg.clone()
        },
        StdRng::seed_from_u64(1),
    );
    assert_eq!(
        off.restore(snap.clone(), t0, UNIX_MS),
        Err(RestoreError::ResumeOff)
    );
    // A core with peers is not overwritten.
    assert_eq!(r.restore(snap, t0, UNIX_MS), Err(RestoreError::NotEmpty));
}

#[test]
fn generation_moves_with_what_a_snapshot_records() {
    let t0 = Instant::now();
    let mut r = core(6, "");
    let g0 = r.generation();
    let (_, ta) = join(&mut r, 1, "r", t0);
    let g1 = r.generation();
    assert!(g1 > g0);
    r.relay(
        1,
        &1,
        RelayKind::Offer,
        "nobody",
        RelayPayload::Sdp("x".into()),
    );
    r.disconnect(1, t0);
    assert_eq!(
        r.generation(),
        g1,
        "relaying and dropping change no snapshot"
    );
    r.join(2, 2, resume_req("r", &ta), t0);
    let g2 = r.generation();
    assert!(g2 > g1, "a resume changes the token");
    r.media(
        2,
        &2,
        Media {
            audio: false,
            video: false,
            screen: false,
            recording: false,
        },
    );
    assert!(r.generation() > g2);
}

// Room control (protocol 1.1).

fn ctl(r: &mut Rooms<u64>, conn: u64, c: Control, now: Instant) -> Vec<Effect<u64>> {
    r.control(conn, &conn, c, now)
}

/// The latest `room_state` sent to `conn` in `fx`.
fn state_for(fx: &[Effect<u64>], conn: u64) -> Option<ServerMsg> {
    all_sends(fx)
        .into_iter()
        .filter(|(t, m)| t.contains(&conn) && matches!(m, ServerMsg::RoomState { .. }))
        .map(|(_, m)| m)
        .next_back()
}

fn hosts_in(m: &ServerMsg) -> Vec<Arc<str>> {
    match m {
        ServerMsg::RoomState { hosts, .. } => hosts.clone(),
        other => panic!("not a room_state: {other:?}"),
    }
}

/// Joins with a room password; returns the effects.
fn join_with(
    r: &mut Rooms<u64>,
    conn: u64,
    room: &str,
    pw: Option<&str>,
    now: Instant,
) -> Vec<Effect<u64>> {
    r.join(
        conn,
        conn,
        JoinReq {
            room: room.into(),
            room_password: pw.map(str::to_owned),
            ..Default::default()
        },
        now,
    )
}

#[test]
fn first_in_is_host_and_everyone_is_told() {
    let now = Instant::now();
    let mut r = core(6, "");
    let fx = r.join(1, 1, req("r"), now);
    let ServerMsg::Joined {
        hosts, minor, id, ..
    } = &all_sends(&fx)[0].1
    else {
        panic!("{fx:?}")
    };
    assert_eq!(*minor, PROTOCOL_MINOR);
    assert_eq!(hosts, &vec![id.clone()]);
    let a = id.clone();
    assert_eq!(
        state_for(&fx, 1),
        Some(ServerMsg::RoomState {
            hosts: vec![a.clone()],
            locked: false,
            password: false,
            lobby: false,
            waiting: Some(Vec::new()),
        })
    );
    // A second participant is not a host, and its room_state has no waiting list.
    let fx = r.join(2, 2, req("r"), now);
    let ServerMsg::Joined { hosts, .. } = &all_sends(&fx)[0].1 else {
        panic!()
    };
    assert_eq!(hosts, &vec![a.clone()]);
    assert!(matches!(
        state_for(&fx, 2),
        Some(ServerMsg::RoomState { waiting: None, .. })
    ));
}

#[test]
fn non_hosts_get_not_host_for_every_action() {
    let now = Instant::now();
    let mut r = core(6, "");
    let (a, _) = join(&mut r, 1, "r", now);
    join(&mut r, 2, "r", now);
    let id = a.to_string();
    for c in [
        Control::MakeHost { id: id.clone() },
        Control::Lock { locked: true },
        Control::RoomPassword {
            password: "x".into(),
        },
        Control::Lobby { on: true },
        Control::Admit { id: id.clone() },
        Control::Deny { id: id.clone() },
        Control::Kick { id: id.clone() },
        Control::MuteRequest {
            id: id.clone(),
            audio: true,
            video: false,
        },
    ] {
        assert_eq!(error_of(&ctl(&mut r, 2, c, now)), ErrorCode::NotHost);
    }
    // Not joined at all.
    assert_eq!(
        error_of(&ctl(&mut r, 9, Control::Lock { locked: true }, now)),
        ErrorCode::NotJoined
    );
    assert_eq!(r.locked_rooms(), 0);
}

#[test]
fn ids_of_other_rooms_and_unknown_ids_are_unknown_peer() {
    let now = Instant::now();
    let mut r = core(6, "");
    let (a, _) = join(&mut r, 1, "r", now);
    let (x, _) = join(&mut r, 2, "other", now);
    for id in [x.to_string(), "nobody".to_string(), a.to_string()] {
        for c in [
            Control::MakeHost { id: id.clone() },
            Control::Kick { id: id.clone() },
            Control::MuteRequest {
                id: id.clone(),
                audio: false,
                video: true,
            },
            Control::Admit { id: id.clone() },
            Control::Deny { id: id.clone() },
        ] {
            assert_eq!(error_of(&ctl(&mut r, 1, c, now)), ErrorCode::UnknownPeer);
        }
    }
    // The other room's participant is untouched.
    assert_eq!(r.peer_count(), 2);
}

#[test]
fn lock_refuses_joins_but_not_resume() {
    let now = Instant::now();
    let mut r = core(6, "");
    let (a, _) = join(&mut r, 1, "r", now);
    let (_, tok) = join(&mut r, 2, "r", now);
    let fx = ctl(&mut r, 1, Control::Lock { locked: true }, now);
    for conn in [1, 2] {
        assert!(matches!(
            state_for(&fx, conn),
            Some(ServerMsg::RoomState { locked: true, .. })
        ));
    }
    assert_eq!(r.locked_rooms(), 1);
    assert_eq!(
        error_of(&r.join(3, 3, req("r"), now)),
        ErrorCode::RoomLocked
    );
    // A participant who dropped comes back in.
    r.disconnect(2, now);
    let fx = r.join(
        4,
        4,
        JoinReq {
            room: "r".into(),
            resume: Some(tok),
            ..Default::default()
        },
        now,
    );
    assert!(matches!(
        &all_sends(&fx)[0].1,
        ServerMsg::Joined { resumed: true, .. }
    ));
    ctl(&mut r, 1, Control::Lock { locked: false }, now);
    assert!(matches!(
        &all_sends(&r.join(5, 5, req("r"), now))[0].1,
        ServerMsg::Joined { .. }
    ));
    let _ = a;
}

#[test]
fn room_password_is_checked_after_the_server_password() {
    let now = Instant::now();
    let mut r = core(6, "server-pw");
    let j = |r: &mut Rooms<u64>, conn: u64, server: &str, room: Option<&str>| {
        r.join(
            conn,
            conn,
            JoinReq {
                room: "r".into(),
                password: Some(server.into()),
                room_password: room.map(str::to_owned),
                ..Default::default()
            },
            now,
        )
    };
    assert!(matches!(
        &all_sends(&j(&mut r, 1, "server-pw", None))[0].1,
        ServerMsg::Joined { .. }
    ));
    let fx = ctl(
        &mut r,
        1,
        Control::RoomPassword {
            password: "room-pw".into(),
        },
        now,
    );
    assert!(matches!(
        state_for(&fx, 1),
        Some(ServerMsg::RoomState { password: true, .. })
    ));
    // The server's password still comes first, without scope.
    let fx = j(&mut r, 2, "wrong", Some("room-pw"));
    assert_eq!(
        all_sends(&fx)[0].1,
        ServerMsg::error(ErrorCode::BadPassword)
    );
    for wrong in [None, Some(""), Some("room-p"), Some("room-pw ")] {
        let fx = j(&mut r, 2, "server-pw", wrong);
        assert_eq!(all_sends(&fx)[0].1, ServerMsg::bad_room_password());
    }
    assert!(matches!(
        &all_sends(&j(&mut r, 2, "server-pw", Some("room-pw")))[0].1,
        ServerMsg::Joined { .. }
    ));
    // Cleared: joins need none again.
    ctl(
        &mut r,
        1,
        Control::RoomPassword {
            password: String::new(),
        },
        now,
    );
    assert!(matches!(
        &all_sends(&j(&mut r, 3, "server-pw", None))[0].1,
        ServerMsg::Joined { .. }
    ));
}

#[test]
fn lobby_knock_admit_and_deny() {
    let now = Instant::now();
    let mut r = core(6, "");
    let (a, _) = join(&mut r, 1, "r", now);
    let (b, _) = join(&mut r, 2, "r", now);
    ctl(&mut r, 1, Control::MakeHost { id: b.to_string() }, now);
    ctl(&mut r, 1, Control::Lobby { on: true }, now);
    // A knock: the joiner waits, both hosts hear it.
    let fx = r.join(
        3,
        3,
        JoinReq {
            room: "r".into(),
            name: Some("Cat".into()),
            ..Default::default()
        },
        now,
    );
    let s = all_sends(&fx);
    let ServerMsg::Waiting { id: c, room } = &s[0].1 else {
        panic!("{s:?}")
    };
    assert_eq!(&**room, "r");
    let c = c.clone();
    assert!(s.iter().any(|(t, m)| t.contains(&1)
        && t.contains(&2)
        && *m
            == ServerMsg::Knock {
                id: c.clone(),
                name: "Cat".into()
            }));
    assert_eq!(r.waiting_count(), 1);
    assert_eq!(r.peer_count(), 2, "a waiting joiner is not in the room");
    // It receives nothing from the room meanwhile, and cannot act in it.
    let fx = r.chat(1, &1, "hi", 0);
    assert!(all_sends(&fx).iter().all(|(t, _)| !t.contains(&3)));
    assert_eq!(error_of(&r.chat(3, &3, "hi", 0)), ErrorCode::NotJoined);
    assert_eq!(
        error_of(&r.join(3, 3, req("r"), now)),
        ErrorCode::AlreadyJoined
    );
    // Admitted by the second host: a normal join under the id it knocked with.
    let fx = ctl(&mut r, 2, Control::Admit { id: c.to_string() }, now);
    let s = all_sends(&fx);
    assert!(s
        .iter()
        .any(|(t, m)| *t == vec![3] && matches!(m, ServerMsg::Joined { id, .. } if *id == c)));
    assert!(s.iter().any(|(t, m)| t.contains(&1)
        && *m
            == ServerMsg::PeerJoined {
                id: c.clone(),
                name: "Cat".into()
            }));
    assert_eq!(r.waiting_count(), 0);
    assert_eq!(r.peer_count(), 3);
    // Denied: told, then closed with 4003.
    let fx = r.join(4, 4, req("r"), now);
    let ServerMsg::Waiting { id: d, .. } = &all_sends(&fx)[0].1 else {
        panic!()
    };
    let d = d.clone();
    let fx = ctl(&mut r, 1, Control::Deny { id: d.to_string() }, now);
    assert!(fx.contains(&Effect::Send(
        vec![4],
        ServerMsg::Denied {
            room: "r".into(),
            reason: "denied"
        }
    )));
    assert!(fx.contains(&Effect::Close(4, CLOSE_DENIED)));
    assert_eq!(r.waiting_count(), 0);
    // Admitting it afterwards: unknown.
    assert_eq!(
        error_of(&ctl(&mut r, 1, Control::Admit { id: d.to_string() }, now)),
        ErrorCode::UnknownPeer
    );
    let _ = a;
}

#[test]
fn lobby_times_out_is_bounded_and_drops_leavers() {
    let now = Instant::now();
    let mut r = core(64, "");
    join(&mut r, 1, "r", now);
    ctl(&mut r, 1, Control::Lobby { on: true }, now);
    for conn in 10..10 + MAX_WAITING as u64 {
        assert!(matches!(
            &all_sends(&r.join(conn, conn, req("r"), now))[0].1,
            ServerMsg::Waiting { .. }
        ));
    }
    assert_eq!(
        error_of(&r.join(99, 99, req("r"), now)),
        ErrorCode::LobbyFull
    );
    // One gives up (its socket drops), one leaves: hosts get the shorter list.
    let fx = r.disconnect(10, now);
    match state_for(&fx, 1) {
        Some(ServerMsg::RoomState {
            waiting: Some(w), ..
        }) => assert_eq!(w.len(), MAX_WAITING - 1),
        other => panic!("{other:?}"),
    }
    r.leave(11, &11);
    assert_eq!(r.waiting_count(), MAX_WAITING - 2);
    // The rest time out at once, when their wait ends.
    assert_eq!(r.poll_timeout(), Some(now + LOBBY_WAIT));
    assert!(r
        .handle_timeout(now + LOBBY_WAIT - Duration::from_millis(1))
        .is_empty());
    let fx = r.handle_timeout(now + LOBBY_WAIT);
    for conn in 12..10 + MAX_WAITING as u64 {
        assert!(fx.contains(&Effect::Send(
            vec![conn],
            ServerMsg::Denied {
                room: "r".into(),
                reason: "timeout"
            }
        )));
        assert!(fx.contains(&Effect::Close(conn, CLOSE_DENIED)));
    }
    assert_eq!(r.waiting_count(), 0);
    assert_eq!(r.poll_timeout(), None);
}

#[test]
fn lobby_off_lets_waiters_in_or_turns_them_away_when_locked() {
    let now = Instant::now();
    let mut r = core(3, "");
    join(&mut r, 1, "r", now);
    ctl(&mut r, 1, Control::Lobby { on: true }, now);
    for conn in [2, 3, 4] {
        r.join(conn, conn, req("r"), now);
    }
    // Off: the first two come in, the third finds the room full.
    let fx = ctl(&mut r, 1, Control::Lobby { on: false }, now);
    let s = all_sends(&fx);
    assert!(s
        .iter()
        .any(|(t, m)| *t == vec![2] && matches!(m, ServerMsg::Joined { .. })));
    assert!(s
        .iter()
        .any(|(t, m)| *t == vec![3] && matches!(m, ServerMsg::Joined { .. })));
    assert!(s
        .iter()
        .any(|(t, m)| *t == vec![4] && matches!(m, ServerMsg::RoomFull { .. })));
    assert_eq!(r.peer_count(), 3);
    assert_eq!(r.waiting_count(), 0);
    // Locked with the lobby on, then the lobby off: the waiting are turned away.
    let mut r = core(6, "");
    join(&mut r, 1, "r", now);
    ctl(&mut r, 1, Control::Lock { locked: true }, now);
    ctl(&mut r, 1, Control::Lobby { on: true }, now);
    assert!(matches!(
        &all_sends(&r.join(2, 2, req("r"), now))[0].1,
        ServerMsg::Waiting { .. }
    ));
    let fx = ctl(&mut r, 1, Control::Lobby { on: false }, now);
    assert!(fx.contains(&Effect::Send(
        vec![2],
        ServerMsg::Denied {
            room: "r".into(),
            reason: "locked"
        }
    )));
}

#[test]
fn capacity_holds_through_the_lobby() {
    let now = Instant::now();
    let mut r = core(2, "");
    join(&mut r, 1, "r", now);
    ctl(&mut r, 1, Control::Lobby { on: true }, now);
    let w1 = match &all_sends(&r.join(2, 2, req("r"), now))[0].1 {
        ServerMsg::Waiting { id, .. } => id.clone(),
        m => panic!("{m:?}"),
    };
    let w2 = match &all_sends(&r.join(3, 3, req("r"), now))[0].1 {
        ServerMsg::Waiting { id, .. } => id.clone(),
        m => panic!("{m:?}"),
    };
    ctl(&mut r, 1, Control::Admit { id: w1.to_string() }, now);
    let fx = ctl(&mut r, 1, Control::Admit { id: w2.to_string() }, now);
    assert!(all_sends(&fx)
        .iter()
        .any(|(t, m)| *t == vec![3] && matches!(m, ServerMsg::RoomFull { .. })));
    assert_eq!(r.peer_count(), 2);
    // A full room does not even queue a knock.
    assert!(matches!(
        &all_sends(&r.join(4, 4, req("r"), now))[0].1,
        ServerMsg::RoomFull { .. }
    ));
}

#[test]
fn kick_closes_announces_voids_the_token_and_revokes() {
    let now = Instant::now();
    let mut r = core(6, "");
    let (a, _) = join(&mut r, 1, "r", now);
    let (b, tok) = join(&mut r, 2, "r", now);
    join(&mut r, 3, "r", now);
    let fx = ctl(&mut r, 1, Control::Kick { id: b.to_string() }, now);
    assert!(fx.contains(&Effect::Send(
        vec![2],
        ServerMsg::Kicked {
            by: a.clone(),
            name: "Guest".into()
        }
    )));
    assert!(fx.contains(&Effect::Close(2, CLOSE_KICKED)));
    assert!(fx.contains(&Effect::PeerGone(b.clone())));
    assert!(fx.contains(&Effect::Revoke(b.clone())));
    let left: Vec<_> = all_sends(&fx)
        .into_iter()
        .filter(|(_, m)| *m == ServerMsg::PeerLeft { id: b.clone() })
        .collect();
    assert_eq!(
        left,
        vec![(vec![1, 3], ServerMsg::PeerLeft { id: b.clone() })],
        "announced once, to the others"
    );
    assert_eq!(r.kicks(), 1);
    // The kicked socket's close changes nothing; its token is void.
    assert!(r.disconnect(2, now).is_empty());
    let fx = r.join(
        4,
        4,
        JoinReq {
            room: "r".into(),
            resume: Some(tok),
            ..Default::default()
        },
        now,
    );
    match &all_sends(&fx)[0].1 {
        ServerMsg::Joined { id, resumed, .. } => {
            assert!(!resumed);
            assert_ne!(*id, b);
        }
        m => panic!("{m:?}"),
    }
    // A host cannot kick itself.
    assert_eq!(
        error_of(&ctl(&mut r, 1, Control::Kick { id: a.to_string() }, now)),
        ErrorCode::UnknownPeer
    );
}

#[test]
fn kick_during_resume_grace_removes_at_once() {
    let now = Instant::now();
    let mut r = core(6, "");
    join(&mut r, 1, "r", now);
    let (b, tok) = join(&mut r, 2, "r", now);
    r.disconnect(2, now);
    let fx = ctl(&mut r, 1, Control::Kick { id: b.to_string() }, now);
    assert!(
        !fx.iter().any(|e| matches!(e, Effect::Close(..))),
        "no socket to close"
    );
    assert!(fx.contains(&Effect::Send(
        vec![1],
        ServerMsg::PeerLeft { id: b.clone() }
    )));
    assert!(fx.contains(&Effect::Revoke(b.clone())));
    assert_eq!(r.peer_count(), 1);
    // Its grace ending later does nothing.
    assert!(r.handle_timeout(now + GRACE).is_empty());
    let fx = r.join(
        3,
        3,
        JoinReq {
            room: "r".into(),
            resume: Some(tok),
            ..Default::default()
        },
        now,
    );
    assert!(matches!(
        &all_sends(&fx)[0].1,
        ServerMsg::Joined { resumed: false, .. }
    ));
}

#[test]
fn host_survives_resume_and_hands_over_only_after_the_grace() {
    let now = Instant::now();
    let mut r = core(6, "");
    let (a, tok) = join(&mut r, 1, "r", now);
    let (b, _) = join(&mut r, 2, "r", now);
    let (c, _) = join(&mut r, 3, "r", now);
    // Resumed: still the host.
    r.disconnect(1, now);
    let fx = r.join(
        4,
        4,
        JoinReq {
            room: "r".into(),
            resume: Some(tok),
            ..Default::default()
        },
        now,
    );
    assert!(
        matches!(&all_sends(&fx)[0].1, ServerMsg::Joined { hosts, .. } if *hosts == vec![a.clone()])
    );
    assert!(ctl(&mut r, 4, Control::Lock { locked: false }, now)
        .iter()
        .all(|e| !matches!(e, Effect::Send(_, ServerMsg::Error { .. }))));
    // Dropped: during the grace nobody else is host.
    r.disconnect(4, now);
    assert_eq!(
        error_of(&ctl(&mut r, 2, Control::Lock { locked: true }, now)),
        ErrorCode::NotHost
    );
    // After it: the longest present (b) takes over, and everyone is told.
    let fx = r.handle_timeout(now + GRACE);
    for conn in [2, 3] {
        assert_eq!(
            hosts_in(&state_for(&fx, conn).expect("room_state")),
            vec![b.clone()]
        );
    }
    assert!(ctl(&mut r, 2, Control::Lock { locked: true }, now + GRACE)
        .iter()
        .all(|e| !matches!(e, Effect::Send(_, ServerMsg::Error { .. }))));
    // Made host by a host: two hosts; the first leaving hands nothing over.
    ctl(
        &mut r,
        2,
        Control::MakeHost { id: c.to_string() },
        now + GRACE,
    );
    let fx = r.leave(2, &2);
    assert_eq!(
        hosts_in(&state_for(&fx, 3).expect("room_state")),
        vec![c.clone()]
    );
}

#[test]
fn mute_request_reaches_only_its_target() {
    let now = Instant::now();
    let mut r = core(6, "");
    let (a, _) = join(&mut r, 1, "r", now);
    let (b, _) = join(&mut r, 2, "r", now);
    join(&mut r, 3, "r", now);
    let fx = ctl(
        &mut r,
        1,
        Control::MuteRequest {
            id: b.to_string(),
            audio: true,
            video: false,
        },
        now,
    );
    assert_eq!(
        all_sends(&fx),
        vec![(
            vec![2],
            ServerMsg::MuteRequest {
                from: a,
                name: "Guest".into(),
                audio: true,
                video: false
            }
        )]
    );
}

#[test]
fn host_actions_are_rate_limited() {
    let now = Instant::now();
    let mut r = core(6, "");
    join(&mut r, 1, "r", now);
    for _ in 0..MAX_HOST_ACTIONS {
        assert!(!matches!(
            &all_sends(&ctl(&mut r, 1, Control::Lock { locked: true }, now))[..],
            [(_, ServerMsg::Error { .. })]
        ));
    }
    assert_eq!(
        error_of(&ctl(&mut r, 1, Control::Lock { locked: false }, now)),
        ErrorCode::RateLimited
    );
    // Ten seconds on, allowed again.
    assert!(!matches!(
        &all_sends(&ctl(
            &mut r,
            1,
            Control::Lock { locked: false },
            now + Duration::from_secs(11)
        ))[..],
        [(_, ServerMsg::Error { .. })]
    ));
}

#[test]
fn waiters_of_a_room_that_empties_come_in_as_to_a_new_room() {
    let now = Instant::now();
    let mut r = core(6, "");
    join(&mut r, 1, "r", now);
    ctl(&mut r, 1, Control::Lobby { on: true }, now);
    ctl(&mut r, 1, Control::Lock { locked: true }, now);
    r.join(2, 2, req("r"), now);
    let fx = r.leave(1, &1);
    let s = all_sends(&fx);
    let Some(ServerMsg::Joined { id, hosts, .. }) =
        s.iter().find(|(t, _)| *t == vec![2]).map(|(_, m)| m)
    else {
        panic!("{s:?}")
    };
    assert_eq!(hosts, &vec![id.clone()], "the first in is the host");
    assert_eq!(r.locked_rooms(), 0, "the room's rules went with it");
    assert_eq!(r.waiting_count(), 0);
}

#[test]
fn room_control_state_survives_a_snapshot() {
    let now = Instant::now();
    let mut r = core(6, "");
    let (a, ta) = join(&mut r, 1, "r", now);
    let (b, _) = join(&mut r, 2, "r", now);
    ctl(&mut r, 1, Control::Lock { locked: true }, now);
    ctl(
        &mut r,
        1,
        Control::RoomPassword {
            password: "pw".into(),
        },
        now,
    );
    ctl(&mut r, 1, Control::MakeHost { id: b.to_string() }, now);
    let snap = r.snapshot(1_000);
    let mut back = core(6, "");
    back.restore(snap, now, 1_000).expect("restored");
    assert_eq!(back.locked_rooms(), 1);
    let fx = back.join(
        5,
        5,
        JoinReq {
            room: "r".into(),
            resume: Some(ta),
            ..Default::default()
        },
        now,
    );
    let s = all_sends(&fx);
    assert!(
        matches!(&s[0].1, ServerMsg::Joined { hosts, .. } if *hosts == vec![a.clone(), b.clone()])
    );
    assert!(matches!(
        state_for(&fx, 5),
        Some(ServerMsg::RoomState {
            locked: true,
            password: true,
            ..
        })
    ));
    // The password still holds (and is not in the file in clear).
    let fx = join_with(&mut back, 6, "r", Some("pw"), now);
    assert_eq!(error_of(&fx), ErrorCode::RoomLocked);
    ctl(&mut back, 5, Control::Lock { locked: false }, now);
    assert_eq!(
        all_sends(&join_with(&mut back, 7, "r", Some("nope"), now))[0].1,
        ServerMsg::bad_room_password()
    );
    assert!(matches!(
        &all_sends(&join_with(&mut back, 8, "r", Some("pw"), now))[0].1,
        ServerMsg::Joined { .. }
    ));
    let text = serde_json::to_string(&back.snapshot(2_000)).unwrap();
    assert!(!text.contains("\"pw\""));
}

#[test]
fn a_room_moves_to_another_core_silently() {
    let t0 = Instant::now();
    let mut a = core(6, "");
    let (x, _) = join(&mut a, 1, "moving", t0);
    let (y, _) = join(&mut a, 2, "moving", t0);
    a.media(
        2,
        &2,
        Media {
            audio: true,
            video: false,
            screen: false,
            recording: true,
        },
    );
    // Connection 2 drops: its messages wait for it.
    a.disconnect(2, t0);
    a.chat(1, &1, "while away", 5);
    let info_y = a.reattach_info(&y).unwrap();
    assert!(!info_y.host);
    let (moved, fx) = a.evict_room("moving");
    assert!(fx.is_empty());
    assert_eq!(moved.len(), 2);
    assert_eq!(moved[0].1, Some(1));
    assert_eq!(moved[1].1, None);
    assert_eq!(a.table_sizes()[..4], [0, 0, 0, 0]);
    // The other core knows nobody yet: the first reattach brings the room back with
    // its host, the second tells the first of a newcomer it did not know.
    let mut b = core(6, "");
    let fx = b.reattach(10, 10, &moved[0].0, t0);
    assert!(fx.is_empty(), "{fx:?}");
    let fx = b.reattach(20, 20, &moved[1].0, t0);
    assert_eq!(
        sends(&fx),
        vec![(
            vec![10],
            ServerMsg::PeerJoined {
                id: y.clone(),
                name: "Guest".into()
            }
        )]
    );
    assert_eq!(b.peer_of(10), Some(x.clone()));
    assert_eq!(b.peer_of(20), Some(y.clone()));
    // Relaying works between them, stamped with the same ids.
    let fx = offer(&mut b, 20, &x, "v=0");
    assert_eq!(
        sends(&fx),
        vec![(
            vec![10],
            ServerMsg::Offer {
                from: y.clone(),
                sdp: "v=0".into()
            }
        )]
    );
    // Reattaching again through another connection takes over (4001 to the old one).
    let fx = b.reattach(21, 21, &moved[1].0, t0);
    assert_eq!(fx, vec![Effect::Close(20, CLOSE_TAKEN_OVER)]);
    // A peer of another room, a bad id or a connection already joined change nothing.
    let mut other = moved[1].0.clone();
    other.room = "elsewhere".into();
    assert!(b.reattach(30, 30, &other, t0).is_empty());
    assert_eq!(b.peer_of(30), None);
    let mut bad = moved[1].0.clone();
    bad.id = "zz".into();
    assert!(b.reattach(31, 31, &bad, t0).is_empty());
    assert!(b.reattach(10, 10, &moved[1].0, t0).is_empty());
    assert_eq!(b.peer_count(), 2);
}

#[test]
fn a_reattached_peer_in_its_grace_gets_its_queue() {
    let t0 = Instant::now();
    let mut a = core(6, "");
    let (x, _) = join(&mut a, 1, "r", t0);
    let (y, _) = join(&mut a, 2, "r", t0);
    a.disconnect(2, t0);
    a.chat(1, &1, "kept", 5);
    let info = a.reattach_info(&y).unwrap();
    let fx = a.reattach(3, 3, &info, t0 + Duration::from_secs(1));
    match &sends(&fx)[..] {
        [(to, ServerMsg::Chat { from, text, .. })] => {
            assert_eq!(to, &vec![3]);
            assert_eq!(from, &x);
            assert_eq!(&**text, "kept");
        }
        other => panic!("{other:?}"),
    }
    // Out of its grace: nothing happens when it would have ended.
    assert!(a.handle_timeout(t0 + GRACE * 2).is_empty());
    assert_eq!(a.peer_of(3), Some(y));
    assert!(a.has_room("r"));
    assert!(!a.is_waiting(3));
}

#[test]
fn a_room_taken_over_from_its_snapshot_keeps_hosts_media_and_lock() {
    let t0 = Instant::now();
    // The former home: x (host), y (made host), z; y's media; the room locked.
    let mut a = core(6, "");
    let (x, _) = join(&mut a, 1, "r", t0);
    let (y, _) = join(&mut a, 2, "r", t0);
    let (z, _) = join(&mut a, 3, "r", t0);
    join(&mut a, 4, "other", t0);
    ctl(&mut a, 1, Control::MakeHost { id: y.to_string() }, t0);
    ctl(&mut a, 1, Control::Lock { locked: true }, t0);
    let media = Media {
        audio: false,
        video: true,
        screen: true,
        recording: true,
    };
    a.media(2, &2, media);
    let snap = a.room_snapshot("r", UNIX_MS).unwrap();
    assert_eq!(snap.peers.len(), 3, "only the room's peers");
    assert!(a.room_snapshot("nowhere", UNIX_MS).is_none());

    // The new home holds a room of its own, and z reattached before the takeover:
    // into an empty room, so it became host for the time being.
    let mut b = Rooms::new(a.cfg.clone(), StdRng::seed_from_u64(5));
    join(&mut b, 10, "mine", t0);
    let z_info = Reattach {
        host: false,
        media: None,
        ..a.reattach_info(&z).unwrap()
    };
    b.reattach(13, 13, &z_info, t0);
    assert_eq!(b.hosts_of(&"r".into()), vec![z.clone()]);
    let fx = b.restore_room("r", snap.clone(), t0, UNIX_MS).unwrap();
    // The saved hosts are the hosts; z (connected) hears the room's state.
    assert_eq!(b.hosts_of(&"r".into()), vec![x.clone(), y.clone()]);
    match state_for(&fx, 13) {
        Some(ServerMsg::RoomState { hosts, locked, .. }) => {
            assert_eq!(hosts, vec![x.clone(), y.clone()]);
            assert!(locked);
        }
        other => panic!("{other:?}"),
    }
    // y reattaches: silently, with its media state as saved.
    let y_info = Reattach {
        host: false,
        media: None,
        ..a.reattach_info(&y).unwrap()
    };
    assert!(sends(&b.reattach(12, 12, &y_info, t0)).is_empty());
    // The room is still locked for newcomers.
    assert_eq!(
        error_of(&b.join(20, 20, req("r"), t0)),
        ErrorCode::RoomLocked
    );
    // A later joiner would see y's media: check it through the snapshot.
    let again = b.room_snapshot("r", UNIX_MS).unwrap();
    let saved_y = again.peers.iter().find(|p| *p.id == *y).unwrap();
    assert_eq!(saved_y.media, Some(media));
    // x never comes back: it leaves for y and z when its grace ends, and y stays host.
    let fx = b.handle_timeout(t0 + GRACE);
    let left: Vec<_> = sends(&fx)
        .into_iter()
        .filter(|(_, m)| matches!(m, ServerMsg::PeerLeft { id } if *id == x))
        .map(|(to, _)| to)
        .collect();
    assert_eq!(left.len(), 1);
    let mut to = left[0].clone();
    to.sort();
    assert_eq!(to, vec![12, 13]);
    assert!(fx.contains(&Effect::PeerGone(x.clone())));
    assert_eq!(b.hosts_of(&"r".into()), vec![y.clone()]);
    // The other room of the new home was not touched.
    assert!(b.has_room("mine"));
}

#[test]
fn a_bad_room_snapshot_is_refused_and_changes_nothing() {
    let t0 = Instant::now();
    let mut a = core(6, "");
    join(&mut a, 1, "r", t0);
    join(&mut a, 2, "s", t0);
    let snap = a.room_snapshot("r", UNIX_MS).unwrap();
    let mut b = Rooms::<u64>::new(a.cfg.clone(), StdRng::seed_from_u64(5));
    join(&mut b, 10, "mine", t0);
    let before = b.table_sizes();
    // Another room's snapshot, a stale one, a damaged one.
    let e = b.restore_room("s", snap.clone(), t0, UNIX_MS).unwrap_err();
    assert_eq!(e, RestoreError::Invalid("peer of another room"));
    let late = UNIX_MS + (GRACE + STALE_MARGIN).as_millis() as u64 + 1;
    let e = b.restore_room("r", snap.clone(), t0, late).unwrap_err();
    assert!(matches!(e, RestoreError::Stale { .. }), "{e}");
    let mut bad = snap.clone();
    bad.peers[0].token_sha256 = "zz".into();
    let e = b.restore_room("r", bad, t0, UNIX_MS).unwrap_err();
    assert_eq!(e, RestoreError::Invalid("token hash"));
    assert_eq!(b.table_sizes(), before);
    // A peer this core holds already in another room is left out.
    let mut c = Rooms::<u64>::new(a.cfg.clone(), StdRng::seed_from_u64(5));
    let mut clash = snap.clone();
    clash.peers[0].room = "mine".into();
    c.restore_room("mine", clash, t0, UNIX_MS).unwrap();
    assert_eq!(
        c.restore_room("r", snap, t0, UNIX_MS).unwrap(),
        Vec::new(),
        "nothing new"
    );
    assert!(!c.has_room("r"));
}
