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

/// (targets, message) of every Send effect.
fn sends(fx: &[Effect<u64>]) -> Vec<(Vec<u64>, ServerMsg)> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Send(t, m) => Some((t.clone(), m.clone())),
            _ => None,
        })
        .collect()
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
    r.expire(now + GRACE);
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
    join(&mut r, 2, "r", now);
    let fx = r.leave(1, &1);
    assert_eq!(
        fx,
        vec![
            Effect::Send(vec![2], ServerMsg::PeerLeft { id: a.clone() }),
            Effect::PeerGone(a.clone())
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
    join(&mut r, 2, "r", now);
    assert_eq!(r.disconnect(1, now), vec![Effect::ExpireAt(now + GRACE)]);
    // Unknown connection: nothing.
    assert!(r.disconnect(1, now).is_empty());
    assert!(r.expire(now + GRACE - Duration::from_millis(1)).is_empty());
    assert_eq!(r.peer_count(), 2);
    let fx = r.expire(now + GRACE);
    assert_eq!(
        fx,
        vec![
            Effect::Send(vec![2], ServerMsg::PeerLeft { id: a.clone() }),
            Effect::PeerGone(a)
        ]
    );
    assert!(r.expire(now + GRACE * 2).is_empty());
}

#[test]
fn zero_grace_removes_at_once() {
    let now = Instant::now();
    let mut r = core(6, "");
    r.cfg.resume_grace = Duration::ZERO;
    let (a, _) = join(&mut r, 1, "r", now);
    join(&mut r, 2, "r", now);
    assert_eq!(
        r.disconnect(1, now),
        vec![
            Effect::Send(vec![2], ServerMsg::PeerLeft { id: a.clone() }),
            Effect::PeerGone(a)
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
    assert!(r.expire(now + GRACE * 2).is_empty());
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
    let gone = r.expire(now + GRACE);
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
    assert_eq!(r.table_sizes(), [0; 5]);
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
