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
    };
    assert_eq!(
        sends(&r.media(1, &1, m)),
        vec![(
            vec![2],
            ServerMsg::Media {
                from: a.clone(),
                audio: true,
                video: false,
                screen: true
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
        },
    );
    assert!(r.generation() > g2);
}
