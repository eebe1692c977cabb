//! The pure rooms core: who is in which room, relaying, media state, chat, resume,
//! grace expiry, capacity; plus the per-connection rate limiter and heartbeat. No
//! sockets, no tokio: every call takes `now` and returns the [`Effect`]s (what to send
//! to whom, what to close) for the IO layer to carry out after the lock is released.
//!
//! `H` is the IO layer's handle to a connection (its outgoing queue); tests use plain
//! values.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

use super::persist::SavedRoom;
use super::persist::{SavedPeer, Snapshot, FORMAT, STALE_MARGIN};
use super::proto::{
    normalize_name, Control, ErrorCode, JoinReq, Media, PeerInfo, RelayKind, RelayPayload,
    ServerMsg, Waiter, MAX_CHAT_CHARS, PROTOCOL_MINOR, PROTOCOL_VERSION,
};
use super::room::normalize_room;
use crate::secret::Secret;

/// Identifies one WebSocket connection for the server's lifetime.
pub type ConnId = u64;

/// Messages kept for a peer in its resume grace; beyond this the oldest are dropped.
pub const MAX_QUEUED: usize = 256;
/// Close code of a server going away (its room moved, as at a restart).
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// Close code sent to a socket whose peer was resumed by another socket.
pub const CLOSE_TAKEN_OVER: u16 = 4001;
/// Close code sent to a participant a host removed.
pub const CLOSE_KICKED: u16 = 4002;
/// Close code sent to a joiner turned away from the lobby (denied, timed out).
pub const CLOSE_DENIED: u16 = 4003;
/// Joiners a room's lobby holds at once; more get `lobby_full`.
pub const MAX_WAITING: usize = 20;
/// How long a joiner waits in the lobby before it is turned away.
pub const LOBBY_WAIT: Duration = Duration::from_secs(300);
/// Host actions one participant may take within 10 s; more get `rate_limited`.
pub const MAX_HOST_ACTIONS: u32 = 30;

/// The rules every room follows (from the `[rooms]` config section).
#[derive(Debug, Clone)]
pub struct RoomRules {
    /// Peers per room.
    pub capacity: usize,
    /// Empty = rooms need no password.
    pub password: Secret,
    /// How long a peer whose socket dropped keeps its place; zero = no resume.
    pub resume_grace: Duration,
}

/// Whom an `ice_request` gets credentials for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IceFor {
    /// The peer this connection is joined as (full credential lifetime).
    Peer(Arc<str>),
    /// A connection not joined yet, with the room password if one is set
    /// (short-lived credentials under a throwaway id).
    Anonymous,
}

/// What the IO layer must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect<H> {
    /// Send one message to each of these connections (serialize once).
    Send(Vec<H>, ServerMsg),
    /// Close this connection with this code.
    Close(H, u16),
    /// The peer left its room for good (leave, or grace over).
    PeerGone(Arc<str>),
    /// A host removed this peer: besides [`Effect::PeerGone`], the credentials it was
    /// given must stop working.
    Revoke(Arc<str>),
}

/// A peer as another node's core knew it, for [`Rooms::reattach`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reattach {
    pub id: String,
    pub room: String,
    pub name: String,
    pub media: Option<Media>,
    pub host: bool,
    #[serde(with = "hex_hash")]
    pub token: TokenHash,
}

/// The peers of an evicted room, with their connections (see [`Rooms::evict_room`]).
pub type Evicted<H> = Vec<(Reattach, Option<H>)>;

mod hex_hash {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(h: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(h))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(&text, &mut out).map_err(serde::de::Error::custom)?;
        Ok(out)
    }
}

/// SHA-256 of a resume token: the core keeps (and persists) only this, so a snapshot
/// file does not hold usable tokens, yet a presented token can still be checked.
pub type TokenHash = [u8; 32];

/// The hash under which a resume token is kept.
pub fn token_hash(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

/// Issues peer ids that are never reused, in constant memory: a counter passed through
/// a keyed 64-bit permutation (a four-round Feistel network). Distinct counter values
/// give distinct ids whatever the key, and the random key keeps ids unguessable from
/// one another (they are not secrets: resume tokens are). Keeping the key and the
/// counter across a restart (in the rooms snapshot) keeps new ids distinct from the
/// restored ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdGen {
    key: [u64; 4],
    next: u64,
}

impl IdGen {
    pub fn new(rng: &mut StdRng) -> IdGen {
        IdGen {
            key: rng.gen(),
            next: 0,
        }
    }

    /// Continues a generator saved by [`IdGen::parts`].
    pub fn from_parts(key: [u64; 4], next: u64) -> IdGen {
        IdGen { key, next }
    }

    pub fn parts(&self) -> ([u64; 4], u64) {
        (self.key, self.next)
    }

    /// The next id, as 16 hex digits. After 2^64 ids (never, in practice) the key is
    /// replaced, so ids keep coming though they could then repeat very old ones.
    pub fn next_id(&mut self, rng: &mut StdRng) -> Arc<str> {
        let n = self.next;
        self.next = match self.next.checked_add(1) {
            Some(v) => v,
            None => {
                self.key = rng.gen();
                0
            }
        };
        format!("{:016x}", self.permute(n)).into()
    }

    fn permute(&self, n: u64) -> u64 {
        let (mut l, mut r) = ((n >> 32) as u32, n as u32);
        for k in self.key {
            let f = round(k, r);
            (l, r) = (r, l ^ f);
        }
        (u64::from(l) << 32) | u64::from(r)
    }
}

/// The Feistel round function (splitmix64's finalizer over key and half-block); any
/// function keeps the network a permutation, this one mixes well.
fn round(key: u64, half: u32) -> u32 {
    let mut z = key ^ u64::from(half).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) as u32
}

struct Peer<H> {
    id: Arc<str>,
    name: Arc<str>,
    room: Arc<str>,
    media: Option<Media>,
    conn: Option<(ConnId, H)>,
    token: TokenHash,
    grace_until: Option<Instant>,
    queue: VecDeque<ServerMsg>,
    host: bool,
    /// Host actions in the last 10 s.
    actions: WindowCounter,
}

/// A room password as kept: salted SHA-256 (the password itself is not kept).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomPassword {
    pub salt: [u8; 16],
    pub hash: [u8; 32],
}

impl RoomPassword {
    fn new(password: &str, rng: &mut StdRng) -> RoomPassword {
        let salt: [u8; 16] = rng.gen();
        RoomPassword {
            salt,
            hash: Self::digest(&salt, password),
        }
    }

    fn digest(salt: &[u8; 16], password: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(salt);
        h.update(password.as_bytes());
        h.finalize().into()
    }

    /// Compares in constant time.
    fn matches(&self, given: Option<&str>) -> bool {
        let d = Self::digest(&self.salt, given.unwrap_or(""));
        d.iter()
            .zip(self.hash.iter())
            .fold(0u8, |a, (x, y)| a | (x ^ y))
            == 0
    }
}

/// A joiner held in a room's lobby.
struct Waiting<H> {
    id: Arc<str>,
    name: Arc<str>,
    conn: ConnId,
    handle: H,
    until: Instant,
}

/// One room: its peers in join order and its control state.
struct Room<H> {
    peers: Vec<Arc<str>>,
    locked: bool,
    lobby: bool,
    password: Option<RoomPassword>,
    waiting: Vec<Waiting<H>>,
}

impl<H> Room<H> {
    fn new() -> Self {
        Room {
            peers: Vec::new(),
            locked: false,
            lobby: false,
            password: None,
            waiting: Vec::new(),
        }
    }
}

/// All rooms and peers.
pub struct Rooms<H> {
    cfg: RoomRules,
    peers: HashMap<Arc<str>, Peer<H>>,
    /// Room name -> its peers in join order and its control state.
    rooms: HashMap<Arc<str>, Room<H>>,
    conns: HashMap<ConnId, Arc<str>>,
    /// Connections waiting in a lobby -> (room, the id they are known by).
    waiting: HashMap<ConnId, (Arc<str>, Arc<str>)>,
    lobby_deadlines: VecDeque<(Instant, Arc<str>, ConnId)>,
    /// Participants removed by hosts, for the metric.
    kicks: u64,
    tokens: HashMap<TokenHash, Arc<str>>,
    ids: IdGen,
    graces: VecDeque<(Instant, Arc<str>)>,
    rng: StdRng,
    /// Bumped on every change a snapshot would record.
    generation: u64,
}

impl<H: Clone> Rooms<H> {
    pub fn new(cfg: RoomRules, mut rng: StdRng) -> Self {
        Rooms {
            cfg,
            peers: HashMap::new(),
            rooms: HashMap::new(),
            conns: HashMap::new(),
            waiting: HashMap::new(),
            lobby_deadlines: VecDeque::new(),
            kicks: 0,
            tokens: HashMap::new(),
            ids: IdGen::new(&mut rng),
            graces: VecDeque::new(),
            rng,
            generation: 0,
        }
    }

    /// A core with an OS-seeded random generator.
    pub fn with_os_rng(cfg: RoomRules) -> Self {
        Self::new(cfg, StdRng::from_entropy())
    }

    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Rooms that are locked now.
    pub fn locked_rooms(&self) -> usize {
        self.rooms.values().filter(|r| r.locked).count()
    }

    /// Joiners waiting in lobbies now.
    pub fn waiting_count(&self) -> usize {
        self.waiting.len()
    }

    /// Participants removed by hosts so far.
    pub fn kicks(&self) -> u64 {
        self.kicks
    }

    /// The peer this connection is joined as.
    pub fn peer_of(&self, conn: ConnId) -> Option<Arc<str>> {
        self.conns.get(&conn).cloned()
    }

    /// `ice_request`: a joined peer gets credentials as itself; before `join`, only
    /// with the room password when one is set (`bad_password` otherwise).
    pub fn ice_request(&self, conn: ConnId, password: Option<&str>) -> Result<IceFor, ErrorCode> {
        if let Some(id) = self.peer_of(conn) {
            return Ok(IceFor::Peer(id));
        }
        if self.password_ok(password) {
            Ok(IceFor::Anonymous)
        } else {
            Err(ErrorCode::BadPassword)
        }
    }

    /// No room password is set, or `given` is it.
    fn password_ok(&self, given: Option<&str>) -> bool {
        self.cfg.password.is_empty() || self.cfg.password.matches(given.unwrap_or(""))
    }

    /// Changes when anything a snapshot records changes.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Sizes of every table the core keeps (peers, rooms, connections, tokens, grace
    /// entries, waiting joiners, lobby deadlines): all zero once everyone has left and
    /// every grace and lobby wait has run out.
    pub fn table_sizes(&self) -> [usize; 7] {
        [
            self.peers.len(),
            self.rooms.len(),
            self.conns.len(),
            self.tokens.len(),
            self.graces.len(),
            self.waiting.len(),
            self.lobby_deadlines.len(),
        ]
    }

    fn new_id(&mut self) -> Arc<str> {
        self.ids.next_id(&mut self.rng)
    }

    fn new_token(&mut self) -> String {
        let n: u128 = self.rng.gen();
        format!("{n:032x}")
    }

    pub fn join(&mut self, conn: ConnId, handle: H, req: JoinReq, now: Instant) -> Vec<Effect<H>> {
        let err = |code| vec![Effect::Send(vec![handle.clone()], ServerMsg::error(code))];
        if self.conns.contains_key(&conn) || self.waiting.contains_key(&conn) {
            return err(ErrorCode::AlreadyJoined);
        }
        let Ok(room) = normalize_room(&req.room) else {
            return err(ErrorCode::InvalidRoom);
        };
        let Some(name) = normalize_name(req.name.as_deref()) else {
            return err(ErrorCode::InvalidName);
        };
        if !self.password_ok(req.password.as_deref()) {
            return err(ErrorCode::BadPassword);
        }
        if let Some(token) = req.resume.as_deref() {
            if let Some(id) = self.tokens.get(&token_hash(token)).cloned() {
                if self.peers.get(&id).is_some_and(|p| *p.room == *room) {
                    return self.resume(conn, handle, id, now);
                }
            }
        }
        let room: Arc<str> = match self.rooms.get_key_value(room.as_str()) {
            Some((r, _)) => r.clone(),
            None => room.into(),
        };
        let name: Arc<str> = name.into();
        let full = ServerMsg::RoomFull {
            room: room.clone(),
            capacity: self.cfg.capacity,
        };
        if let Some(r) = self.rooms.get(&room) {
            // The room's own rules, in this order: its password, its capacity, then
            // its lobby (which also holds joiners to a locked room), then the lock.
            if r.password
                .is_some_and(|p| !p.matches(req.room_password.as_deref()))
            {
                return vec![Effect::Send(vec![handle], ServerMsg::bad_room_password())];
            }
            if r.peers.len() >= self.cfg.capacity {
                return vec![Effect::Send(vec![handle], full)];
            }
            if r.lobby {
                if r.waiting.len() >= MAX_WAITING {
                    return err(ErrorCode::LobbyFull);
                }
                return self.knock(conn, handle, room, name, now);
            }
            if r.locked {
                return err(ErrorCode::RoomLocked);
            }
        } else if self.cfg.capacity == 0 {
            return vec![Effect::Send(vec![handle], full)];
        }
        let id = self.new_id();
        let mut effects = Vec::new();
        self.enter(conn, handle, room, id, name, now, &mut effects);
        effects
    }

    /// Puts a new peer into `room` (which has room for it): `joined` and `room_state`
    /// to it, `peer_joined` to the others. The first into an empty room is its host.
    #[allow(clippy::too_many_arguments)]
    fn enter(
        &mut self,
        conn: ConnId,
        handle: H,
        room: Arc<str>,
        id: Arc<str>,
        name: Arc<str>,
        now: Instant,
        effects: &mut Vec<Effect<H>>,
    ) {
        let token = self.new_token();
        let others = self
            .rooms
            .get(&room)
            .map(|r| r.peers.clone())
            .unwrap_or_default();
        let host = others.is_empty();
        let peers = self.peer_infos(&others);
        self.seat(
            conn,
            Peer {
                id: id.clone(),
                name: name.clone(),
                room: room.clone(),
                media: None,
                conn: Some((conn, handle.clone())),
                token: token_hash(&token),
                grace_until: None,
                queue: VecDeque::new(),
                host,
                actions: WindowCounter::new(now),
            },
        );
        effects.push(Effect::Send(
            vec![handle.clone()],
            ServerMsg::Joined {
                protocol: PROTOCOL_VERSION,
                id: id.clone(),
                room: room.clone(),
                capacity: self.cfg.capacity,
                peers,
                ice: None,
                resume: token,
                resumed: false,
                minor: PROTOCOL_MINOR,
                hosts: self.hosts_of(&room),
            },
        ));
        if let Some(state) = self.room_state(&room, host) {
            effects.push(Effect::Send(vec![handle], state));
        }
        self.deliver(&others, ServerMsg::PeerJoined { id, name }, effects);
    }

    /// Holds a joiner in the room's lobby: `waiting` to it, a `knock` to every host.
    /// Seats a connected peer: its token and connection are known from now on, and it
    /// is last in its room's join order.
    fn seat(&mut self, conn: ConnId, peer: Peer<H>) {
        self.generation += 1;
        self.tokens.insert(peer.token, peer.id.clone());
        self.conns.insert(conn, peer.id.clone());
        self.rooms
            .entry(peer.room.clone())
            .or_insert_with(Room::new)
            .peers
            .push(peer.id.clone());
        self.peers.insert(peer.id.clone(), peer);
    }

    fn knock(
        &mut self,
        conn: ConnId,
        handle: H,
        room: Arc<str>,
        name: Arc<str>,
        now: Instant,
    ) -> Vec<Effect<H>> {
        let id = self.new_id();
        let until = now + LOBBY_WAIT;
        let Some(r) = self.rooms.get_mut(&room) else {
            return Vec::new();
        };
        r.waiting.push(Waiting {
            id: id.clone(),
            name: name.clone(),
            conn,
            handle: handle.clone(),
            until,
        });
        self.waiting.insert(conn, (room.clone(), id.clone()));
        self.lobby_deadlines.push_back((until, id.clone(), conn));
        let mut effects = vec![Effect::Send(
            vec![handle],
            ServerMsg::Waiting {
                room: room.clone(),
                id: id.clone(),
            },
        )];
        let hosts = self.hosts_of(&room);
        self.deliver(&hosts, ServerMsg::Knock { id, name }, &mut effects);
        self.broadcast_state(&room, true, &mut effects);
        effects
    }

    /// The room's hosts, in join order.
    fn hosts_of(&self, room: &Arc<str>) -> Vec<Arc<str>> {
        self.rooms
            .get(room)
            .map(|r| {
                r.peers
                    .iter()
                    .filter(|id| self.peers.get(*id).is_some_and(|p| p.host))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The room's `room_state`; with the lobby's waiting list for a host.
    fn room_state(&self, room: &Arc<str>, for_host: bool) -> Option<ServerMsg> {
        let r = self.rooms.get(room)?;
        Some(ServerMsg::RoomState {
            hosts: self.hosts_of(room),
            locked: r.locked,
            password: r.password.is_some(),
            lobby: r.lobby,
            waiting: for_host.then(|| {
                r.waiting
                    .iter()
                    .map(|w| Waiter {
                        id: w.id.clone(),
                        name: w.name.clone(),
                    })
                    .collect()
            }),
        })
    }

    /// Sends the room's state to its hosts (with the waiting list) and, unless
    /// `hosts_only`, to everyone else.
    fn broadcast_state(&mut self, room: &Arc<str>, hosts_only: bool, effects: &mut Vec<Effect<H>>) {
        let Some(r) = self.rooms.get(room) else {
            return;
        };
        let (hosts, others): (Vec<Arc<str>>, Vec<Arc<str>>) = r
            .peers
            .iter()
            .cloned()
            .partition(|id| self.peers.get(id).is_some_and(|p| p.host));
        if let Some(m) = self.room_state(room, true) {
            self.deliver(&hosts, m, effects);
        }
        if !hosts_only {
            if let Some(m) = self.room_state(room, false) {
                self.deliver(&others, m, effects);
            }
        }
    }

    fn peer_infos(&self, ids: &[Arc<str>]) -> Vec<PeerInfo> {
        ids.iter()
            .filter_map(|i| self.peers.get(i))
            .map(|p| PeerInfo {
                id: p.id.clone(),
                name: p.name.clone(),
                media: p.media,
            })
            .collect()
    }

    fn resume(&mut self, conn: ConnId, handle: H, id: Arc<str>, now: Instant) -> Vec<Effect<H>> {
        let _ = now;
        let token = self.new_token();
        let mut effects = Vec::new();
        let Some(peer) = self.peers.get_mut(&id) else {
            return effects;
        };
        if let Some((old, old_handle)) = peer.conn.take() {
            self.conns.remove(&old);
            effects.push(Effect::Close(old_handle, CLOSE_TAKEN_OVER));
        }
        self.tokens.remove(&peer.token);
        peer.token = token_hash(&token);
        peer.grace_until = None;
        peer.conn = Some((conn, handle.clone()));
        let queued: Vec<ServerMsg> = peer.queue.drain(..).collect();
        let room = peer.room.clone();
        let room_name = room.clone();
        let id_kept = id.clone();
        self.tokens.insert(token_hash(&token), id.clone());
        self.conns.insert(conn, id.clone());
        self.generation += 1;
        let others: Vec<Arc<str>> = self
            .rooms
            .get(&room)
            .map(|r| r.peers.iter().filter(|p| **p != id).cloned().collect())
            .unwrap_or_default();
        effects.push(Effect::Send(
            vec![handle.clone()],
            ServerMsg::Joined {
                protocol: PROTOCOL_VERSION,
                id,
                room,
                capacity: self.cfg.capacity,
                peers: self.peer_infos(&others),
                ice: None,
                resume: token,
                resumed: true,
                minor: PROTOCOL_MINOR,
                hosts: self.hosts_of(&room_name),
            },
        ));
        for m in queued {
            effects.push(Effect::Send(vec![handle.clone()], m));
        }
        // The current state last: it supersedes any queued one.
        let host = self.peers.get(&id_kept).is_some_and(|p| p.host);
        if let Some(state) = self.room_state(&room_name, host) {
            effects.push(Effect::Send(vec![handle], state));
        }
        effects
    }

    /// Sends `msg` to these peers: now if connected, else into their resume queue.
    fn deliver(&mut self, to: &[Arc<str>], msg: ServerMsg, effects: &mut Vec<Effect<H>>) {
        let mut targets = Vec::with_capacity(to.len());
        for id in to {
            let Some(p) = self.peers.get_mut(id) else {
                continue;
            };
            match &p.conn {
                Some((_, h)) => targets.push(h.clone()),
                None => {
                    if p.queue.len() >= MAX_QUEUED {
                        p.queue.pop_front();
                    }
                    p.queue.push_back(msg.clone());
                }
            }
        }
        if !targets.is_empty() {
            effects.push(Effect::Send(targets, msg));
        }
    }

    fn sender(&self, conn: ConnId, handle: &H) -> Result<Arc<str>, Vec<Effect<H>>> {
        self.conns.get(&conn).cloned().ok_or_else(|| {
            vec![Effect::Send(
                vec![handle.clone()],
                ServerMsg::error(ErrorCode::NotJoined),
            )]
        })
    }

    /// `offer`, `answer`, `candidate`: only to a peer of the sender's own room.
    pub fn relay(
        &mut self,
        conn: ConnId,
        handle: &H,
        kind: RelayKind,
        to: &str,
        payload: RelayPayload,
    ) -> Vec<Effect<H>> {
        let from = match self.sender(conn, handle) {
            Ok(f) => f,
            Err(e) => return e,
        };
        let same_room = match (self.peers.get(&from), self.peers.get(to)) {
            (Some(a), Some(b)) => a.room == b.room && a.id != b.id,
            _ => false,
        };
        if !same_room {
            return vec![Effect::Send(
                vec![handle.clone()],
                ServerMsg::error(ErrorCode::UnknownPeer),
            )];
        }
        let msg = match (kind, payload) {
            (RelayKind::Offer, RelayPayload::Sdp(s)) => ServerMsg::Offer {
                from,
                sdp: s.into(),
            },
            (RelayKind::Answer, RelayPayload::Sdp(s)) => ServerMsg::Answer {
                from,
                sdp: s.into(),
            },
            (RelayKind::Candidate, RelayPayload::Candidate(c)) => ServerMsg::Candidate {
                from,
                candidate: Arc::new(c),
            },
            _ => {
                return vec![Effect::Send(
                    vec![handle.clone()],
                    ServerMsg::error(ErrorCode::BadMessage),
                )]
            }
        };
        let mut effects = Vec::with_capacity(1);
        let to: Arc<str> = match self.peers.get(to) {
            Some(p) => p.id.clone(),
            None => return effects,
        };
        self.deliver(&[to], msg, &mut effects);
        effects
    }

    /// Others of the sender's room (join order).
    fn room_others(&self, id: &Arc<str>) -> Vec<Arc<str>> {
        self.peers
            .get(id)
            .and_then(|p| self.rooms.get(&p.room))
            .map(|r| r.peers.iter().filter(|p| *p != id).cloned().collect())
            .unwrap_or_default()
    }

    pub fn media(&mut self, conn: ConnId, handle: &H, media: Media) -> Vec<Effect<H>> {
        let from = match self.sender(conn, handle) {
            Ok(f) => f,
            Err(e) => return e,
        };
        if let Some(p) = self.peers.get_mut(&from) {
            p.media = Some(media);
            self.generation += 1;
        }
        let others = self.room_others(&from);
        let mut effects = Vec::new();
        let msg = ServerMsg::Media {
            from,
            audio: media.audio,
            video: media.video,
            screen: media.screen,
            recording: media.recording,
        };
        self.deliver(&others, msg, &mut effects);
        effects
    }

    pub fn chat(&mut self, conn: ConnId, handle: &H, text: &str, ts_ms: u64) -> Vec<Effect<H>> {
        let from = match self.sender(conn, handle) {
            Ok(f) => f,
            Err(e) => return e,
        };
        let n = text.chars().count();
        if n == 0 || n > MAX_CHAT_CHARS {
            return vec![Effect::Send(
                vec![handle.clone()],
                ServerMsg::error(ErrorCode::BadMessage),
            )];
        }
        let Some(p) = self.peers.get(&from) else {
            return Vec::new();
        };
        let everyone = self
            .rooms
            .get(&p.room)
            .map(|r| r.peers.clone())
            .unwrap_or_default();
        let msg = ServerMsg::Chat {
            from: from.clone(),
            name: p.name.clone(),
            text: text.into(),
            ts: ts_ms,
        };
        let mut effects = Vec::new();
        self.deliver(&everyone, msg, &mut effects);
        effects
    }

    /// `leave`: out of the room at once, the others told now.
    pub fn leave(&mut self, conn: ConnId, handle: &H) -> Vec<Effect<H>> {
        if self.waiting.contains_key(&conn) {
            // Gave up waiting in a lobby.
            return self.unwait(conn);
        }
        let id = match self.sender(conn, handle) {
            Ok(f) => f,
            Err(e) => return e,
        };
        self.conns.remove(&conn);
        self.remove_peer(&id)
    }

    /// Whether this connection is joined to a room (its peer is connected through it).
    pub fn is_joined(&self, conn: ConnId) -> bool {
        self.conns.contains_key(&conn)
    }

    /// Whether this connection waits in a room's lobby.
    pub fn is_waiting(&self, conn: ConnId) -> bool {
        self.waiting.contains_key(&conn)
    }

    /// Whether a room of this (canonical) name exists.
    pub fn has_room(&self, room: &str) -> bool {
        self.rooms.contains_key(room)
    }

    /// Names of the rooms that exist now.
    pub fn room_names(&self) -> Vec<Arc<str>> {
        self.rooms.keys().cloned().collect()
    }

    /// Connects a peer known to another instance of the core again through `conn`,
    /// silently (cluster: its room moved to this node, or its node lost touch for a
    /// while). A peer this core holds in `room` gets `conn` as its connection, out of
    /// any grace, with the messages kept for it; an old connection of it is closed
    /// with 4001. A peer unknown here joins `room` as it was (same id, name and token
    /// hash; capacity is not checked: it held its place already) and the others get
    /// `peer_joined`. Invalid fields or a peer of another room change nothing.
    pub fn reattach(
        &mut self,
        conn: ConnId,
        handle: H,
        peer: &Reattach,
        now: Instant,
    ) -> Vec<Effect<H>> {
        let mut effects = Vec::new();
        if self.conns.contains_key(&conn) || self.waiting.contains_key(&conn) {
            return effects;
        }
        let valid_id = peer.id.len() == 16 && peer.id.bytes().all(|b| b.is_ascii_hexdigit());
        let Ok(room) = normalize_room(&peer.room) else {
            return effects;
        };
        let Some(name) = normalize_name(Some(&peer.name)) else {
            return effects;
        };
        if !valid_id {
            return effects;
        }
        if let Some(p) = self.peers.get_mut(peer.id.as_str()) {
            if *p.room != *room {
                return effects;
            }
            let id = p.id.clone();
            if let Some((old, old_handle)) = p.conn.take() {
                self.conns.remove(&old);
                effects.push(Effect::Close(old_handle, CLOSE_TAKEN_OVER));
            }
            p.grace_until = None;
            p.conn = Some((conn, handle.clone()));
            let queued: Vec<ServerMsg> = p.queue.drain(..).collect();
            self.conns.insert(conn, id);
            self.generation += 1;
            for m in queued {
                effects.push(Effect::Send(vec![handle.clone()], m));
            }
            return effects;
        }
        if self.tokens.contains_key(&peer.token) {
            return effects;
        }
        let room: Arc<str> = match self.rooms.get_key_value(room.as_str()) {
            Some((r, _)) => r.clone(),
            None => room.into(),
        };
        let id: Arc<str> = peer.id.as_str().into();
        let name: Arc<str> = name.into();
        let others = self
            .rooms
            .get(&room)
            .map(|r| r.peers.clone())
            .unwrap_or_default();
        let host = peer.host || self.hosts_of(&room).is_empty();
        self.seat(
            conn,
            Peer {
                id: id.clone(),
                name: name.clone(),
                room: room.clone(),
                media: peer.media,
                conn: Some((conn, handle)),
                token: peer.token,
                grace_until: None,
                queue: VecDeque::new(),
                host,
                actions: WindowCounter::new(now),
            },
        );
        self.deliver(&others, ServerMsg::PeerJoined { id, name }, &mut effects);
        effects
    }

    /// What [`Rooms::reattach`] needs to know of a peer.
    pub fn reattach_info(&self, id: &str) -> Option<Reattach> {
        let p = self.peers.get(id)?;
        Some(Reattach {
            id: p.id.to_string(),
            room: p.room.to_string(),
            name: p.name.to_string(),
            media: p.media,
            host: p.host,
            token: p.token,
        })
    }

    /// Takes a room out of this core without telling anyone (cluster: another node is
    /// its home now): returns its peers with their connections, for them to be
    /// reattached there. Lobby waiters are closed with 1001, as at a restart: they
    /// knock again.
    pub fn evict_room(&mut self, room: &str) -> (Evicted<H>, Vec<Effect<H>>) {
        let mut effects = Vec::new();
        let Some(r) = self.rooms.remove(room) else {
            return (Vec::new(), effects);
        };
        self.generation += 1;
        for w in r.waiting {
            self.waiting.remove(&w.conn);
            effects.push(Effect::Close(w.handle, CLOSE_GOING_AWAY));
        }
        let mut out = Vec::new();
        for id in r.peers {
            let Some(p) = self.peers.remove(&id) else {
                continue;
            };
            self.tokens.remove(&p.token);
            let handle = p.conn.map(|(c, h)| {
                self.conns.remove(&c);
                h
            });
            out.push((
                Reattach {
                    id: p.id.to_string(),
                    room: p.room.to_string(),
                    name: p.name.to_string(),
                    media: p.media,
                    host: p.host,
                    token: p.token,
                },
                handle,
            ));
        }
        (out, effects)
    }

    /// The socket closed or timed out: its peer (if any) enters the resume grace.
    pub fn disconnect(&mut self, conn: ConnId, now: Instant) -> Vec<Effect<H>> {
        if self.waiting.contains_key(&conn) {
            return self.unwait(conn);
        }
        let Some(id) = self.conns.remove(&conn) else {
            return Vec::new();
        };
        if self.cfg.resume_grace.is_zero() {
            return self.remove_peer(&id);
        }
        let deadline = now + self.cfg.resume_grace;
        match self.peers.get_mut(&id) {
            Some(p) if p.conn.as_ref().is_some_and(|(c, _)| *c == conn) => {
                p.conn = None;
                p.grace_until = Some(deadline);
                self.graces.push_back((deadline, id));
                Vec::new()
            }
            _ => Vec::new(),
        }
    }

    /// Takes a waiting connection out of its lobby (it left or dropped); hosts get
    /// the new waiting list.
    fn unwait(&mut self, conn: ConnId) -> Vec<Effect<H>> {
        let mut effects = Vec::new();
        if let Some((room, _)) = self.take_waiter(conn) {
            self.broadcast_state(&room, true, &mut effects);
        }
        effects
    }

    /// Removes a waiting joiner from every table; returns its room and entry.
    fn take_waiter(&mut self, conn: ConnId) -> Option<(Arc<str>, Waiting<H>)> {
        let (room, _) = self.waiting.remove(&conn)?;
        let r = self.rooms.get_mut(&room)?;
        let i = r.waiting.iter().position(|w| w.conn == conn)?;
        Some((room, r.waiting.remove(i)))
    }

    /// The earliest instant at which [`Rooms::handle_timeout`] has work (a resume
    /// grace or a lobby wait ends), or `None` while there is none. May be one that
    /// has since ended otherwise: acting on it then does nothing.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let grace = self.graces.front().map(|(at, _)| *at);
        let lobby = self.lobby_deadlines.front().map(|(at, _, _)| *at);
        match (grace, lobby) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Removes every peer whose grace has ended by `now`, and turns away every joiner
    /// whose lobby wait has.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<Effect<H>> {
        let mut effects = Vec::new();
        while let Some((deadline, _, _)) = self.lobby_deadlines.front() {
            if *deadline > now {
                break;
            }
            let Some((_, id, conn)) = self.lobby_deadlines.pop_front() else {
                break;
            };
            if self.waiting.get(&conn).is_some_and(|(_, w)| *w == id) {
                if let Some((room, w)) = self.take_waiter(conn) {
                    self.turn_away(&room, w, "timeout", &mut effects);
                    self.broadcast_state(&room, true, &mut effects);
                }
            }
        }
        while let Some((deadline, _)) = self.graces.front() {
            if *deadline > now {
                break;
            }
            let Some((deadline, id)) = self.graces.pop_front() else {
                break;
            };
            let due = self
                .peers
                .get(&id)
                .is_some_and(|p| p.conn.is_none() && p.grace_until == Some(deadline));
            if due {
                effects.extend(self.remove_peer(&id));
            }
        }
        effects
    }

    /// Sends a turned-away joiner its `denied` and closes it (4003).
    fn turn_away(
        &mut self,
        room: &Arc<str>,
        w: Waiting<H>,
        reason: &'static str,
        effects: &mut Vec<Effect<H>>,
    ) {
        effects.push(Effect::Send(
            vec![w.handle.clone()],
            ServerMsg::Denied {
                room: room.clone(),
                reason,
            },
        ));
        effects.push(Effect::Close(w.handle, CLOSE_DENIED));
    }

    /// Admits a waiting joiner: a normal join if the room still has a place.
    fn admit_waiter(&mut self, room: &Arc<str>, w: Waiting<H>, effects: &mut Vec<Effect<H>>) {
        let full = self
            .rooms
            .get(room)
            .is_some_and(|r| r.peers.len() >= self.cfg.capacity);
        if full {
            effects.push(Effect::Send(
                vec![w.handle],
                ServerMsg::RoomFull {
                    room: room.clone(),
                    capacity: self.cfg.capacity,
                },
            ));
            return;
        }
        let now = w.until - LOBBY_WAIT;
        self.enter(w.conn, w.handle, room.clone(), w.id, w.name, now, effects);
    }

    /// A host action (protocol 1.1): checked (joined, a host, within the rate, ids of
    /// this room only), then done; every change of the room's state is sent to all.
    pub fn control(
        &mut self,
        conn: ConnId,
        handle: &H,
        c: Control,
        now: Instant,
    ) -> Vec<Effect<H>> {
        let from = match self.sender(conn, handle) {
            Ok(f) => f,
            Err(e) => return e,
        };
        let err = |code| vec![Effect::Send(vec![handle.clone()], ServerMsg::error(code))];
        let Some(me) = self.peers.get_mut(&from) else {
            return Vec::new();
        };
        if !me.host {
            return err(ErrorCode::NotHost);
        }
        if me.actions.add(now) > MAX_HOST_ACTIONS {
            return err(ErrorCode::RateLimited);
        }
        let room = me.room.clone();
        let my_name = me.name.clone();
        // A participant of this room other than the sender.
        let member = |rooms: &Self, id: &str| -> Option<Arc<str>> {
            rooms
                .peers
                .get(id)
                .filter(|p| p.room == room && p.id != from)
                .map(|p| p.id.clone())
        };
        // A joiner waiting in this room's lobby.
        let waiter = |rooms: &Self, id: &str| -> Option<ConnId> {
            rooms
                .rooms
                .get(&room)?
                .waiting
                .iter()
                .find(|w| &*w.id == id)
                .map(|w| w.conn)
        };
        let mut effects = Vec::new();
        match c {
            Control::MakeHost { id } => {
                let Some(id) = member(self, &id) else {
                    return err(ErrorCode::UnknownPeer);
                };
                if let Some(p) = self.peers.get_mut(&id) {
                    p.host = true;
                }
                self.generation += 1;
                self.broadcast_state(&room, false, &mut effects);
            }
            Control::Lock { locked } => {
                if let Some(r) = self.rooms.get_mut(&room) {
                    r.locked = locked;
                }
                self.generation += 1;
                self.broadcast_state(&room, false, &mut effects);
            }
            Control::RoomPassword { password } => {
                let new =
                    (!password.is_empty()).then(|| RoomPassword::new(&password, &mut self.rng));
                if let Some(r) = self.rooms.get_mut(&room) {
                    r.password = new;
                }
                self.generation += 1;
                self.broadcast_state(&room, false, &mut effects);
            }
            Control::Lobby { on } => {
                let mut released = Vec::new();
                let mut locked = false;
                if let Some(r) = self.rooms.get_mut(&room) {
                    r.lobby = on;
                    locked = r.locked;
                    if !on {
                        released = std::mem::take(&mut r.waiting);
                    }
                }
                self.generation += 1;
                // Turned off: who waited comes in, unless the room is locked.
                for w in released {
                    self.waiting.remove(&w.conn);
                    if locked {
                        self.turn_away(&room, w, "locked", &mut effects);
                    } else {
                        self.admit_waiter(&room, w, &mut effects);
                    }
                }
                self.broadcast_state(&room, false, &mut effects);
            }
            Control::Admit { id } => {
                let Some((_, w)) = waiter(self, &id).and_then(|c| self.take_waiter(c)) else {
                    return err(ErrorCode::UnknownPeer);
                };
                self.admit_waiter(&room, w, &mut effects);
                self.broadcast_state(&room, true, &mut effects);
            }
            Control::Deny { id } => {
                let Some((_, w)) = waiter(self, &id).and_then(|c| self.take_waiter(c)) else {
                    return err(ErrorCode::UnknownPeer);
                };
                self.turn_away(&room, w, "denied", &mut effects);
                self.broadcast_state(&room, true, &mut effects);
            }
            Control::Kick { id } => {
                let Some(id) = member(self, &id) else {
                    return err(ErrorCode::UnknownPeer);
                };
                self.kicks += 1;
                if let Some((c, h)) = self.peers.get_mut(&id).and_then(|p| p.conn.take()) {
                    self.conns.remove(&c);
                    effects.push(Effect::Send(
                        vec![h.clone()],
                        ServerMsg::Kicked {
                            by: from.clone(),
                            name: my_name,
                        },
                    ));
                    effects.push(Effect::Close(h, CLOSE_KICKED));
                }
                effects.extend(self.remove_peer(&id));
                effects.push(Effect::Revoke(id));
            }
            Control::MuteRequest { id, audio, video } => {
                let Some(id) = member(self, &id) else {
                    return err(ErrorCode::UnknownPeer);
                };
                let msg = ServerMsg::MuteRequest {
                    from: from.clone(),
                    name: my_name,
                    audio,
                    video,
                };
                self.deliver(&[id], msg, &mut effects);
            }
        }
        effects
    }

    fn remove_peer(&mut self, id: &Arc<str>) -> Vec<Effect<H>> {
        let mut effects = Vec::new();
        let Some(peer) = self.peers.remove(id) else {
            return effects;
        };
        self.generation += 1;
        self.tokens.remove(&peer.token);
        if let Some((c, _)) = &peer.conn {
            self.conns.remove(c);
        }
        let mut others = Vec::new();
        let mut orphans = Vec::new();
        if let Some(r) = self.rooms.get_mut(&peer.room) {
            r.peers.retain(|p| p != id);
            others = r.peers.clone();
            if r.peers.is_empty() {
                if let Some(r) = self.rooms.remove(&peer.room) {
                    orphans = r.waiting;
                }
            }
        }
        self.deliver(
            &others,
            ServerMsg::PeerLeft { id: id.clone() },
            &mut effects,
        );
        effects.push(Effect::PeerGone(id.clone()));
        if peer.host && !others.is_empty() {
            // A room is never left without a host: the longest present takes over.
            if self.hosts_of(&peer.room).is_empty() {
                if let Some(p) = others.first().and_then(|o| self.peers.get_mut(o)) {
                    p.host = true;
                }
            }
            self.broadcast_state(&peer.room, false, &mut effects);
        }
        // Joiners still waiting for a room that emptied: nobody is left to admit
        // them, and the room's rules went with it, so they come in as to a new room.
        for w in orphans {
            self.waiting.remove(&w.conn);
            let room = peer.room.clone();
            let full = self
                .rooms
                .get(&room)
                .is_some_and(|r| r.peers.len() >= self.cfg.capacity);
            if full {
                effects.push(Effect::Send(
                    vec![w.handle],
                    ServerMsg::RoomFull {
                        room,
                        capacity: self.cfg.capacity,
                    },
                ));
                continue;
            }
            let now = w.until - LOBBY_WAIT;
            self.enter(w.conn, w.handle, room, w.id, w.name, now, &mut effects);
        }
        effects
    }
}

/// How far the id counter jumps on restore: more ids than could ever be issued
/// between two snapshot writes, and still room for 2^32 restarts.
pub const RESTORE_ID_GAP: u64 = 1 << 32;

/// Why a snapshot was not restored (the server then starts with no rooms).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    #[error("resume is off (rooms.resume_grace_s = 0)")]
    ResumeOff,
    #[error("the core already holds peers")]
    NotEmpty,
    #[error("format {0} is not the one this version writes")]
    Format(u32),
    #[error("taken {age_s} s away from now, beyond the resume grace plus margin")]
    Stale { age_s: u64 },
    #[error("invalid entry: {0}")]
    Invalid(&'static str),
}

impl<H: Clone> Rooms<H> {
    /// What a restart needs to resume every peer: rooms in join order, ids, names,
    /// media, token hashes, and the id generator.
    pub fn snapshot(&self, now_unix_ms: u64) -> Snapshot {
        let mut rooms: Vec<&Arc<str>> = self.rooms.keys().collect();
        rooms.sort();
        self.snapshot_of(&rooms, now_unix_ms)
    }

    /// One room's part of [`Rooms::snapshot`] (cluster: what its home replicates, so
    /// that another node can take the room over), without the id generator (zeros:
    /// ids stay the new home's own); `None` when the room does not exist.
    pub fn room_snapshot(&self, room: &str, now_unix_ms: u64) -> Option<Snapshot> {
        let (name, _) = self.rooms.get_key_value(room)?;
        let mut snap = self.snapshot_of(&[name], now_unix_ms);
        snap.id_key = [0; 4];
        snap.id_next = 0;
        Some(snap)
    }

    fn snapshot_of(&self, rooms: &[&Arc<str>], now_unix_ms: u64) -> Snapshot {
        let peers = rooms
            .iter()
            .filter_map(|r| self.rooms.get(*r))
            .flat_map(|r| r.peers.iter())
            .filter_map(|id| self.peers.get(id))
            .map(|p| SavedPeer {
                id: p.id.to_string(),
                room: p.room.to_string(),
                name: p.name.to_string(),
                media: p.media,
                token_sha256: hex::encode(p.token),
                host: p.host,
            })
            .collect();
        let saved_rooms = rooms
            .iter()
            .filter_map(|name| self.rooms.get(*name).map(|r| (name, r)))
            .filter(|(_, r)| r.locked || r.lobby || r.password.is_some())
            .map(|(name, r)| SavedRoom {
                name: name.to_string(),
                locked: r.locked,
                lobby: r.lobby,
                password: r
                    .password
                    .map(|p| (hex::encode(p.salt), hex::encode(p.hash))),
            })
            .collect();
        let (id_key, id_next) = self.ids.parts();
        Snapshot {
            format: FORMAT,
            saved_unix_ms: now_unix_ms,
            id_key,
            id_next,
            peers,
            rooms: saved_rooms,
        }
    }

    /// The checks every snapshot passes before anything of it is used.
    fn check_snapshot(&self, snap: &Snapshot, now_unix_ms: u64) -> Result<(), RestoreError> {
        if self.cfg.resume_grace.is_zero() {
            return Err(RestoreError::ResumeOff);
        }
        if snap.format != FORMAT {
            return Err(RestoreError::Format(snap.format));
        }
        let age_ms = now_unix_ms.abs_diff(snap.saved_unix_ms);
        let limit = self.cfg.resume_grace.saturating_add(STALE_MARGIN);
        if u128::from(age_ms) > limit.as_millis() {
            return Err(RestoreError::Stale {
                age_s: age_ms / 1000,
            });
        }
        Ok(())
    }

    /// Restores a snapshot into an empty core. Every peer comes back disconnected, in
    /// a fresh resume grace from `now`: those that resume keep their ids, the others
    /// leave as usual when it ends. Nothing is changed when an error is returned.
    pub fn restore(
        &mut self,
        snap: Snapshot,
        now: Instant,
        now_unix_ms: u64,
    ) -> Result<Vec<Effect<H>>, RestoreError> {
        if self.cfg.resume_grace.is_zero() {
            return Err(RestoreError::ResumeOff);
        }
        if !self.peers.is_empty() {
            return Err(RestoreError::NotEmpty);
        }
        self.check_snapshot(&snap, now_unix_ms)?;
        let mut peers: HashMap<Arc<str>, Peer<H>> = HashMap::with_capacity(snap.peers.len());
        let mut rooms: HashMap<Arc<str>, Room<H>> = HashMap::new();
        let mut tokens = HashMap::with_capacity(snap.peers.len());
        let grace_until = now + self.cfg.resume_grace;
        for p in snap.peers {
            let c = CheckedPeer::new(p)?;
            let room: Arc<str> = match rooms.get_key_value(c.room.as_str()) {
                Some((r, _)) => r.clone(),
                None => c.room.into(),
            };
            if tokens.insert(c.token, c.id.clone()).is_some() {
                return Err(RestoreError::Invalid("duplicate token"));
            }
            rooms
                .entry(room.clone())
                .or_insert_with(Room::new)
                .peers
                .push(c.id.clone());
            let peer = Peer {
                id: c.id.clone(),
                name: c.name,
                room,
                media: c.media,
                conn: None,
                token: c.token,
                grace_until: Some(grace_until),
                queue: VecDeque::new(),
                host: c.host,
                actions: WindowCounter::new(now),
            };
            if peers.insert(c.id, peer).is_some() {
                return Err(RestoreError::Invalid("duplicate peer id"));
            }
        }
        for saved in snap.rooms {
            let Some(r) = rooms.get_mut(saved.name.as_str()) else {
                continue;
            };
            r.locked = saved.locked;
            r.lobby = saved.lobby;
            r.password = checked_password(&saved)?;
        }
        // A room saved without a host (an older file) gets its longest present.
        for r in rooms.values() {
            if !r
                .peers
                .iter()
                .any(|id| peers.get(id).is_some_and(|p| p.host))
            {
                if let Some(p) = r.peers.first().and_then(|id| peers.get_mut(id)) {
                    p.host = true;
                }
            }
        }
        self.graces = peers.keys().map(|id| (grace_until, id.clone())).collect();
        self.peers = peers;
        self.rooms = rooms;
        self.tokens = tokens;
        // After a crash the snapshot may be up to a save interval old, and ids issued
        // since then exist in clients' hands: skip far past them.
        self.ids = IdGen::from_parts(snap.id_key, snap.id_next.saturating_add(RESTORE_ID_GAP));
        self.generation += 1;
        // Their graces end at `poll_timeout()`.
        Ok(Vec::new())
    }

    /// Cluster: takes over one room from the snapshot its former home replicated
    /// ([`Rooms::room_snapshot`]), into a core that may hold other rooms, and this
    /// room's peers reattached already. A saved peer this core holds in the room gets
    /// its saved host right, and its saved media state if it has none; any other
    /// saved peer comes back disconnected, in a fresh resume grace from `now` (it
    /// leaves with the usual `peer_left` unless it resumes). A saved peer whose id or
    /// token this core holds elsewhere is left out. The room's lock, lobby and
    /// password are restored; connected peers get the room's state. Nothing is
    /// changed when an error is returned.
    pub fn restore_room(
        &mut self,
        room: &str,
        snap: Snapshot,
        now: Instant,
        now_unix_ms: u64,
    ) -> Result<Vec<Effect<H>>, RestoreError> {
        self.check_snapshot(&snap, now_unix_ms)?;
        let mut checked = Vec::with_capacity(snap.peers.len());
        for p in snap.peers {
            let c = CheckedPeer::new(p)?;
            if c.room != room {
                return Err(RestoreError::Invalid("peer of another room"));
            }
            checked.push(c);
        }
        let mut control = None;
        for saved in &snap.rooms {
            if saved.name != room {
                return Err(RestoreError::Invalid("another room"));
            }
            control = Some((saved.locked, saved.lobby, checked_password(saved)?));
        }
        let Ok(room) = normalize_room(room) else {
            return Err(RestoreError::Invalid("room name"));
        };
        if checked.is_empty() {
            return Ok(Vec::new());
        }
        let room: Arc<str> = match self.rooms.get_key_value(room.as_str()) {
            Some((r, _)) => r.clone(),
            None => room.into(),
        };
        let grace_until = now + self.cfg.resume_grace;
        let mut added = Vec::new();
        for c in checked {
            if let Some(p) = self.peers.get_mut(&c.id) {
                if p.room == room {
                    p.host = c.host;
                    if p.media.is_none() {
                        p.media = c.media;
                    }
                }
                continue;
            }
            if self.tokens.contains_key(&c.token) {
                continue;
            }
            self.tokens.insert(c.token, c.id.clone());
            self.peers.insert(
                c.id.clone(),
                Peer {
                    id: c.id.clone(),
                    name: c.name,
                    room: room.clone(),
                    media: c.media,
                    conn: None,
                    token: c.token,
                    grace_until: Some(grace_until),
                    queue: VecDeque::new(),
                    host: c.host,
                    actions: WindowCounter::new(now),
                },
            );
            added.push(c.id);
        }
        let r = self.rooms.entry(room.clone()).or_insert_with(Room::new);
        for id in &added {
            r.peers.push(id.clone());
        }
        if let Some((locked, lobby, password)) = control {
            r.locked = locked;
            r.lobby = lobby;
            r.password = password;
        }
        if r.peers.is_empty() {
            self.rooms.remove(&room);
            return Ok(Vec::new());
        }
        if self.hosts_of(&room).is_empty() {
            let first = self.rooms.get(&room).and_then(|r| r.peers.first().cloned());
            if let Some(p) = first.and_then(|id| self.peers.get_mut(&id)) {
                p.host = true;
            }
        }
        for id in added {
            self.graces.push_back((grace_until, id));
        }
        self.generation += 1;
        let mut effects = Vec::new();
        self.broadcast_state(&room, false, &mut effects);
        Ok(effects)
    }
}

/// A saved peer whose fields passed the checks.
struct CheckedPeer {
    id: Arc<str>,
    room: String,
    name: Arc<str>,
    media: Option<Media>,
    token: TokenHash,
    host: bool,
}

impl CheckedPeer {
    fn new(p: SavedPeer) -> Result<CheckedPeer, RestoreError> {
        let valid_id = p.id.len() == 16 && p.id.bytes().all(|b| b.is_ascii_hexdigit());
        if !valid_id {
            return Err(RestoreError::Invalid("peer id"));
        }
        if normalize_room(&p.room).ok().as_deref() != Some(p.room.as_str()) {
            return Err(RestoreError::Invalid("room name"));
        }
        if normalize_name(Some(&p.name)).as_deref() != Some(p.name.as_str()) {
            return Err(RestoreError::Invalid("peer name"));
        }
        let mut token: TokenHash = [0; 32];
        if hex::decode_to_slice(&p.token_sha256, &mut token).is_err() {
            return Err(RestoreError::Invalid("token hash"));
        }
        Ok(CheckedPeer {
            id: p.id.into(),
            room: p.room,
            name: p.name.into(),
            media: p.media,
            token,
            host: p.host,
        })
    }
}

/// A saved room password, decoded.
fn checked_password(saved: &SavedRoom) -> Result<Option<RoomPassword>, RestoreError> {
    let Some((salt_hex, hash_hex)) = &saved.password else {
        return Ok(None);
    };
    let mut salt = [0u8; 16];
    let mut hash = [0u8; 32];
    if hex::decode_to_slice(salt_hex, &mut salt).is_err()
        || hex::decode_to_slice(hash_hex, &mut hash).is_err()
    {
        return Err(RestoreError::Invalid("room password"));
    }
    Ok(Some(RoomPassword { salt, hash }))
}

/// Counts events in a sliding window of 10 one-second slots.
#[derive(Debug, Clone)]
pub struct WindowCounter {
    start: Instant,
    slots: [u32; 10],
    last: u64,
}

impl WindowCounter {
    pub fn new(start: Instant) -> Self {
        WindowCounter {
            start,
            slots: [0; 10],
            last: 0,
        }
    }

    /// Records one event; returns how many fell in the last 10 s, this one included.
    pub fn add(&mut self, now: Instant) -> u32 {
        let idx = now.saturating_duration_since(self.start).as_secs();
        if idx > self.last {
            let gap = (idx - self.last).min(10);
            for k in 1..=gap {
                self.slots[((self.last + k) % 10) as usize] = 0;
            }
            self.last = idx;
        }
        let slot = &mut self.slots[(self.last % 10) as usize];
        *slot = slot.saturating_add(1);
        self.slots.iter().fold(0u32, |a, b| a.saturating_add(*b))
    }
}

/// What to do with an incoming frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Drop it; `notify` says whether to send `rate_limited` (at most once a second).
    Drop {
        notify: bool,
    },
    /// Close the socket with 1008.
    Close,
}

/// Max `bad_message` errors in 10 s before the socket is closed with 1008.
pub const MAX_BAD_MESSAGES: u32 = 20;

/// The per-connection token bucket and abuse counters of PROTOCOL.md.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    max_drops: u32,
    tokens: f64,
    last: Instant,
    last_notice: Option<Instant>,
    drops: WindowCounter,
    bad: WindowCounter,
}

impl RateLimiter {
    pub fn new(rate_per_s: u32, burst: u32, now: Instant) -> Self {
        RateLimiter {
            rate: f64::from(rate_per_s),
            burst: f64::from(burst.max(1)),
            max_drops: burst,
            tokens: f64::from(burst.max(1)),
            last: now,
            last_notice: None,
            drops: WindowCounter::new(now),
            bad: WindowCounter::new(now),
        }
    }

    /// Every text frame goes through here.
    pub fn frame(&mut self, now: Instant) -> Verdict {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Verdict::Allow;
        }
        if self.drops.add(now) > self.max_drops {
            return Verdict::Close;
        }
        let notify = self
            .last_notice
            .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1));
        if notify {
            self.last_notice = Some(now);
        }
        Verdict::Drop { notify }
    }

    /// A `bad_message` was answered; true when the socket must now be closed (1008).
    pub fn bad_message(&mut self, now: Instant) -> bool {
        self.bad.add(now) > MAX_BAD_MESSAGES
    }
}

/// What the heartbeat wants done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    /// Nothing before [`Heartbeat::deadline`].
    Wait,
    /// Send a WebSocket Ping now.
    Ping,
    /// Nothing heard for the timeout: the connection is gone.
    TimedOut,
}

/// Ping every `interval`; gone after `timeout` without any frame from the client.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    interval: Duration,
    timeout: Duration,
    last_seen: Instant,
    next_ping: Instant,
}

impl Heartbeat {
    pub fn new(interval: Duration, timeout: Duration, now: Instant) -> Self {
        Heartbeat {
            interval,
            timeout,
            last_seen: now,
            next_ping: now + interval,
        }
    }

    /// Any frame (pong included) from the client.
    pub fn seen(&mut self, now: Instant) {
        self.last_seen = self.last_seen.max(now);
    }

    pub fn poll(&mut self, now: Instant) -> Beat {
        if now >= self.last_seen + self.timeout {
            return Beat::TimedOut;
        }
        if now >= self.next_ping {
            self.next_ping = now + self.interval;
            return Beat::Ping;
        }
        Beat::Wait
    }

    /// When [`Heartbeat::poll`] next has something to do.
    pub fn deadline(&self) -> Instant {
        self.next_ping.min(self.last_seen + self.timeout)
    }
}

#[cfg(test)]
mod tests;
