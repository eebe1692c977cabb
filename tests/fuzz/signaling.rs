//! The signaling message parser on arbitrary text and mutated corpus messages, and
//! the per-frame path it feeds: rate limiter, then parser, then the rooms core (as the
//! WebSocket layer does). Properties: nothing panics; the rate limiter never lets more
//! frames through than its burst plus its rate allows; parsed messages stay within
//! the bounds the core relies on.

use std::time::{Duration, Instant};

use meshmeet::signaling::core::{Effect, RateLimiter, RoomRules, Rooms, Verdict};
use meshmeet::signaling::proto::{ClientMsg, JoinReq, ServerMsg, MAX_CHAT_CHARS};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::SeedableRng;

const RATE: u32 = 20;
const BURST: u32 = 40;

/// Feeds one frame from `conn` through the limiter, parser and core.
fn frame(
    core: &mut Rooms<u64>,
    lim: &mut RateLimiter,
    conn: u64,
    text: &str,
    now: Instant,
) -> bool {
    match lim.frame(now) {
        Verdict::Allow => {}
        Verdict::Drop { .. } => return false,
        Verdict::Close => return false,
    }
    let Ok(msg) = ClientMsg::parse(text) else {
        lim.bad_message(now);
        return true;
    };
    match msg {
        ClientMsg::Join(req) => {
            core.join(conn, conn, req, now);
        }
        ClientMsg::Relay { kind, to, payload } => {
            core.relay(conn, &conn, kind, &to, payload);
        }
        ClientMsg::Media(m) => {
            core.media(conn, &conn, m);
        }
        ClientMsg::Chat { text } => {
            core.chat(conn, &conn, &text, 0);
        }
        ClientMsg::Leave => {
            core.leave(conn, &conn);
        }
        ClientMsg::IceRequest { password } => {
            let _ = core.ice_request(conn, password.as_deref());
        }
        ClientMsg::Ping => {}
        ClientMsg::Control(c) => {
            core.control(conn, &conn, c, now);
        }
    }
    true
}

fn text_input() -> impl Strategy<Value = (usize, Vec<(u8, usize, u8)>, String)> {
    (
        any::<usize>(),
        prop::collection::vec((any::<u8>(), any::<usize>(), any::<u8>()), 0..8),
        ".{0,64}",
    )
}

proptest! {
    #![proptest_config(crate::config())]

    #[test]
    fn parser_survives_anything(s in ".{0,300}") {
        let _ = ClientMsg::parse(&s);
    }

    #[test]
    fn frames_through_limiter_parser_and_core(
        frames in prop::collection::vec((0u64..3, 0u64..400, text_input()), 1..60)
    ) {
        let seeds = crate::corpus("signaling");
        let mut core = Rooms::new(
            RoomRules { capacity: 4, password: "pw".into(), resume_grace: Duration::from_secs(5) },
            StdRng::seed_from_u64(9),
        );
        let t0 = Instant::now();
        let mut now = t0;
        let mut limiters: Vec<RateLimiter> = (0..3).map(|_| RateLimiter::new(RATE, BURST, t0)).collect();
        let mut allowed = [0u32; 3];
        for (conn, dt, (seed, edits, noise)) in frames {
            now += Duration::from_millis(dt);
            let base = &seeds[seed % seeds.len()];
            let bytes = if edits.is_empty() && !noise.is_empty() {
                noise.into_bytes()
            } else {
                crate::mutate(base, &edits)
            };
            let text = String::from_utf8_lossy(&bytes);
            // A chat line the core accepts is within the limit (the parser passes any
            // length on; the core must refuse longer ones).
            if let Ok(ClientMsg::Chat { text: line }) = ClientMsg::parse(&text) {
                let over = line.chars().count() > MAX_CHAT_CHARS || line.is_empty();
                let mut probe = Rooms::<u64>::new(
                    RoomRules { capacity: 4, password: "".into(), resume_grace: Duration::from_secs(5) },
                    StdRng::seed_from_u64(1),
                );
                probe.join(99, 99, JoinReq { room: "p".into(), ..Default::default() }, now);
                let fx = probe.chat(99, &99, &line, 0);
                let refused = matches!(fx.as_slice(), [Effect::Send(_, ServerMsg::Error { .. })]);
                prop_assert_eq!(refused, over);
            }
            let i = conn as usize;
            if frame(&mut core, &mut limiters[i], conn, &text, now) {
                allowed[i] += 1;
            }
            let secs = now.duration_since(t0).as_secs_f64();
            let most = f64::from(BURST) + secs * f64::from(RATE) + 1.0;
            prop_assert!(f64::from(allowed[i]) <= most, "limiter let {} through in {secs}s", allowed[i]);
        }
    }
}
