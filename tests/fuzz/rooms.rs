//! Random operation sequences on the rooms core (join, resume with good, spent and
//! foreign tokens, relay, media, chat, leave, socket drops, time passing), checked
//! after every step:
//!
//! - capacity is never exceeded;
//! - no message crosses rooms;
//! - nothing is delivered to a socket whose peer has left (or been taken over);
//! - when a peer leaves, every peer of its room that is connected is told in the same
//!   step, and nobody is ever told twice;
//! - a resume with the current token keeps the id;
//! - with host actions mixed in (lock, lobby, admit, deny, kick, make host): every room
//!   with participants has a host, and a kicked or denied socket gets nothing more.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshmeet::signaling::core::LOBBY_WAIT;
use meshmeet::signaling::core::{Effect, RoomRules, Rooms};
use meshmeet::signaling::proto::{Control, JoinReq, Media, RelayKind, RelayPayload, ServerMsg};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::SeedableRng;

const CAPACITY: usize = 3;
const GRACE: Duration = Duration::from_secs(20);
const ROOMS: [&str; 3] = ["a", "b", "c"];

#[derive(Debug, Clone)]
pub enum Op {
    Join(usize),
    /// Resume with the n-th token issued (current, spent, or of a departed peer), in
    /// its own room or another.
    Resume(usize, bool),
    Relay(usize, usize),
    Media(usize, bool),
    Chat(usize),
    Leave(usize),
    Drop(usize),
    Wait(u64),
    /// A host action by the a-th socket (kind k) naming the b-th known id.
    Control(usize, u8, usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..ROOMS.len()).prop_map(Op::Join),
        3 => (any::<usize>(), prop::bool::weighted(0.85)).prop_map(|(t, same)| Op::Resume(t, same)),
        2 => (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Op::Relay(a, b)),
        1 => (any::<usize>(), any::<bool>()).prop_map(|(a, v)| Op::Media(a, v)),
        1 => any::<usize>().prop_map(Op::Chat),
        1 => any::<usize>().prop_map(Op::Leave),
        2 => any::<usize>().prop_map(Op::Drop),
        1 => (0u64..30_000).prop_map(Op::Wait),
        3 => (any::<usize>(), 0u8..8, any::<usize>()).prop_map(|(a, k, b)| Op::Control(a, k, b)),
    ]
}

struct Model {
    core: Rooms<u64>,
    now: Instant,
    next_conn: u64,
    /// Open sockets joined as a peer.
    attached: BTreeMap<u64, Arc<str>>,
    /// Every token issued: (token, peer id, room).
    tokens: Vec<(String, Arc<str>, String)>,
    /// The current token of each peer.
    current: HashMap<Arc<str>, String>,
    /// (told, who left) -> times told.
    told_left: HashMap<(Arc<str>, Arc<str>), u32>,
    /// The room of every peer ever seen (ids are never reused): messages queued for a
    /// peer in its grace may be about peers gone since.
    ever: HashMap<Arc<str>, String>,
    /// Sockets waiting in a lobby, with the id they knocked as.
    waiting: BTreeMap<u64, Arc<str>>,
    /// Sockets closed by the server (kicked, denied, taken over): nothing more for them.
    closed: std::collections::HashSet<u64>,
}

/// Peer id -> room, from a snapshot.
fn rooms_of(core: &Rooms<u64>) -> HashMap<Arc<str>, String> {
    core.snapshot(0)
        .peers
        .into_iter()
        .map(|p| (Arc::from(p.id), p.room))
        .collect()
}

/// Whom a room message is about.
fn subject(m: &ServerMsg) -> Option<&Arc<str>> {
    match m {
        ServerMsg::PeerJoined { id, .. } | ServerMsg::PeerLeft { id } => Some(id),
        ServerMsg::Offer { from, .. }
        | ServerMsg::Answer { from, .. }
        | ServerMsg::Candidate { from, .. }
        | ServerMsg::Media { from, .. }
        | ServerMsg::Chat { from, .. } => Some(from),
        _ => None,
    }
}

impl Model {
    fn new() -> Model {
        Model {
            core: Rooms::new(
                RoomRules {
                    capacity: CAPACITY,
                    password: "".into(),
                    resume_grace: GRACE,
                },
                StdRng::seed_from_u64(3),
            ),
            now: Instant::now(),
            next_conn: 1,
            attached: BTreeMap::new(),
            tokens: Vec::new(),
            current: HashMap::new(),
            told_left: HashMap::new(),
            ever: HashMap::new(),
            waiting: BTreeMap::new(),
            closed: std::collections::HashSet::new(),
        }
    }

    fn pick(&self, n: usize) -> Option<u64> {
        if self.attached.is_empty() {
            return None;
        }
        self.attached.keys().nth(n % self.attached.len()).copied()
    }

    fn join(&mut self, room: &str, resume: Option<String>) -> (u64, Vec<Effect<u64>>) {
        let conn = self.next_conn;
        self.next_conn += 1;
        let req = JoinReq {
            room: room.into(),
            name: Some(format!("n{conn}")),
            password: None,
            resume,
            room_password: None,
        };
        (conn, self.core.join(conn, conn, req, self.now))
    }

    fn step(&mut self, op: Op) -> Result<(), TestCaseError> {
        let before = rooms_of(&self.core);
        let attached_before = self.attached.clone();
        let mut resumed_as: Option<Arc<str>> = None;
        let fx = match op {
            Op::Join(r) => self.join(ROOMS[r], None).1,
            Op::Resume(t, same) => {
                if self.tokens.is_empty() {
                    return Ok(());
                }
                let (token, id, room) = self.tokens[t % self.tokens.len()].clone();
                let room = if same { room } else { "c".to_string() };
                if same && self.current.get(&id) == Some(&token) && before.contains_key(&id) {
                    resumed_as = Some(id);
                }
                self.join(&room, Some(token)).1
            }
            Op::Relay(a, b) => {
                let Some(conn) = self.pick(a) else {
                    return Ok(());
                };
                let ids: Vec<&Arc<str>> = before.keys().collect();
                if ids.is_empty() {
                    return Ok(());
                }
                let to = ids[b % ids.len()].clone();
                self.core.relay(
                    conn,
                    &conn,
                    RelayKind::Offer,
                    &to,
                    RelayPayload::Sdp("v=0".into()),
                )
            }
            Op::Media(a, v) => {
                let Some(conn) = self.pick(a) else {
                    return Ok(());
                };
                let m = Media {
                    audio: v,
                    video: !v,
                    screen: false,
                    recording: v,
                };
                self.core.media(conn, &conn, m)
            }
            Op::Chat(a) => {
                let Some(conn) = self.pick(a) else {
                    return Ok(());
                };
                self.core.chat(conn, &conn, "hi", 0)
            }
            Op::Leave(a) => {
                let Some(conn) = self.pick(a) else {
                    return Ok(());
                };
                self.attached.remove(&conn);
                self.core.leave(conn, &conn)
            }
            Op::Drop(a) => {
                let Some(conn) = self.pick(a) else {
                    return Ok(());
                };
                self.attached.remove(&conn);
                self.core.disconnect(conn, self.now)
            }
            Op::Wait(ms) => {
                self.now += Duration::from_millis(ms);
                self.core.handle_timeout(self.now)
            }
            Op::Control(a, k, b) => {
                let Some(conn) = self.pick(a) else {
                    return Ok(());
                };
                // Any id seen: peers of this room or others, gone ones, waiting joiners.
                let mut ids: Vec<Arc<str>> = self.ever.keys().cloned().collect();
                ids.extend(self.waiting.values().cloned());
                ids.sort();
                let id = if ids.is_empty() {
                    "nobody".to_string()
                } else {
                    ids[b % ids.len()].to_string()
                };
                let c = match k {
                    0 => Control::Lock { locked: b % 2 == 0 },
                    1 => Control::Lobby { on: b % 3 != 0 },
                    2 => Control::Admit { id },
                    3 => Control::Deny { id },
                    4 => Control::Kick { id },
                    5 => Control::MakeHost { id },
                    6 => Control::RoomPassword {
                        password: if b % 2 == 0 {
                            String::new()
                        } else {
                            "pw".into()
                        },
                    },
                    _ => Control::MuteRequest {
                        id,
                        audio: true,
                        video: false,
                    },
                };
                self.core.control(conn, &conn, c, self.now)
            }
        };
        let after = rooms_of(&self.core);

        let closed_before = self.closed.clone();
        // Sockets first: joins, takeovers.
        for e in &fx {
            match e {
                Effect::Send(
                    to,
                    ServerMsg::Joined {
                        id,
                        room,
                        resume,
                        resumed,
                        ..
                    },
                ) => {
                    let conn = to[0];
                    if let Some(want) = &resumed_as {
                        prop_assert!(*resumed && id == want, "resume kept the id");
                    }
                    self.attached.insert(conn, id.clone());
                    self.current.insert(id.clone(), resume.clone());
                    self.tokens
                        .push((resume.clone(), id.clone(), room.to_string()));
                }
                Effect::Close(h, _) => {
                    self.attached.remove(h);
                    self.waiting.remove(h);
                    self.closed.insert(*h);
                }
                Effect::Send(to, ServerMsg::Waiting { id, .. }) => {
                    self.waiting.insert(to[0], id.clone());
                }
                _ => {}
            }
        }
        // An admitted (or re-joined) socket is no longer waiting.
        for conn in self.attached.keys() {
            self.waiting.remove(conn);
        }
        // Nothing reaches a socket the server closed, after its close.
        let mut closing = std::collections::HashSet::new();
        for e in &fx {
            match e {
                Effect::Close(h, _) => {
                    closing.insert(*h);
                }
                Effect::Send(to, m) => {
                    for t in to {
                        prop_assert!(
                            !closed_before.contains(t),
                            "{m:?} sent to closed socket {t}"
                        );
                        prop_assert!(!closing.contains(t), "{m:?} sent to {t} after its close");
                    }
                }
                _ => {}
            }
        }
        // Every room with participants has a host.
        let snap = self.core.snapshot(0);
        let mut hosted: HashMap<String, bool> = HashMap::new();
        for p in &snap.peers {
            *hosted.entry(p.room.clone()).or_default() |= p.host;
        }
        prop_assert!(
            hosted.values().all(|h| *h),
            "a room without a host: {hosted:?}"
        );
        if let Some(want) = &resumed_as {
            prop_assert!(self.attached.values().any(|v| v == want), "resume answered");
        }

        // Capacity.
        let mut per_room: HashMap<&str, usize> = HashMap::new();
        for r in after.values() {
            *per_room.entry(r).or_default() += 1;
        }
        prop_assert!(
            per_room.values().all(|n| *n <= CAPACITY),
            "capacity: {per_room:?}"
        );

        for (id, room) in before.iter().chain(after.iter()) {
            self.ever.insert(id.clone(), room.clone());
        }
        let ever = &self.ever;
        let room_of = |id: &Arc<str>| ever.get(id).cloned();
        let mut left_now: Vec<&Arc<str>> = Vec::new();
        for e in &fx {
            match e {
                Effect::Send(targets, msg) => {
                    let Some(about) = subject(msg) else { continue };
                    for t in targets {
                        // Delivered only to a socket still joined as a live peer ...
                        let Some(peer) = self.attached.get(t) else {
                            return Err(TestCaseError::fail(format!(
                                "{msg:?} delivered to socket {t} with no peer"
                            )));
                        };
                        prop_assert!(after.contains_key(peer), "delivered to departed {peer}");
                        // ... of the same room.
                        prop_assert_eq!(room_of(peer), room_of(about), "crossed rooms: {:?}", msg);
                        if let ServerMsg::PeerLeft { id } = msg {
                            let n = self
                                .told_left
                                .entry((peer.clone(), id.clone()))
                                .or_default();
                            *n += 1;
                            prop_assert_eq!(*n, 1, "{} told twice that {} left", peer, id);
                        }
                    }
                }
                Effect::PeerGone(id) => left_now.push(id),
                _ => {}
            }
        }
        // Every connected peer of the room is told in the same step.
        for gone in left_now {
            prop_assert!(!after.contains_key(gone));
            let room = before.get(gone).cloned();
            for (conn, peer) in &attached_before {
                let still = self.attached.get(conn) == Some(peer);
                if still && peer != gone && before.get(peer) == room.as_ref() {
                    prop_assert_eq!(
                        self.told_left.get(&(peer.clone(), gone.clone())).copied(),
                        Some(1),
                        "{} was not told that {} left",
                        peer,
                        gone
                    );
                }
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(crate::config())]

    #[test]
    fn rooms_core_keeps_its_invariants(ops in prop::collection::vec(op(), 1..80)) {
        let mut m = Model::new();
        for op in ops {
            m.step(op)?;
        }
        // Everyone drops and the grace runs out: nothing is left behind.
        for conn in m.attached.keys().copied().collect::<Vec<_>>() {
            m.step(Op::Drop(0))?;
            let _ = conn;
        }
        for conn in m.waiting.keys().copied().collect::<Vec<_>>() {
            m.core.disconnect(conn, m.now);
        }
        m.step(Op::Wait(GRACE.as_millis() as u64 + 1))?;
        m.step(Op::Wait(LOBBY_WAIT.as_millis() as u64 + 1))?;
        prop_assert_eq!(m.core.table_sizes(), [0; 7]);
    }
}
