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

use super::persist::{SavedPeer, Snapshot, FORMAT, STALE_MARGIN};
use super::proto::{
    normalize_name, ErrorCode, JoinReq, Media, PeerInfo, RelayKind, RelayPayload, ServerMsg,
    MAX_CHAT_CHARS, PROTOCOL_VERSION,
};
use super::room::normalize_room;
use crate::secret::Secret;

/// Identifies one WebSocket connection for the server's lifetime.
pub type ConnId = u64;

/// Messages kept for a peer in its resume grace; beyond this the oldest are dropped.
pub const MAX_QUEUED: usize = 256;
/// Close code sent to a socket whose peer was resumed by another socket.
pub const CLOSE_TAKEN_OVER: u16 = 4001;

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
}

/// All rooms and peers.
pub struct Rooms<H> {
    cfg: RoomRules,
    peers: HashMap<Arc<str>, Peer<H>>,
    /// Room name -> its peers in join order.
    rooms: HashMap<Arc<str>, Vec<Arc<str>>>,
    conns: HashMap<ConnId, Arc<str>>,
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
    /// entries): all zero once everyone has left and every grace has run out.
    pub fn table_sizes(&self) -> [usize; 5] {
        [
            self.peers.len(),
            self.rooms.len(),
            self.conns.len(),
            self.tokens.len(),
            self.graces.len(),
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
        if self.conns.contains_key(&conn) {
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
        let room: Arc<str> = room.into();
        let present = self.rooms.get(&room).map_or(0, Vec::len);
        if present >= self.cfg.capacity {
            return vec![Effect::Send(
                vec![handle],
                ServerMsg::RoomFull {
                    room,
                    capacity: self.cfg.capacity,
                },
            )];
        }
        let id = self.new_id();
        let token = self.new_token();
        let name: Arc<str> = name.into();
        let others = self.rooms.get(&room).cloned().unwrap_or_default();
        let peers = self.peer_infos(&others);
        let mut effects = vec![Effect::Send(
            vec![handle.clone()],
            ServerMsg::Joined {
                protocol: PROTOCOL_VERSION,
                id: id.clone(),
                room: room.clone(),
                capacity: self.cfg.capacity,
                peers,
                ice: None,
                resume: token.clone(),
                resumed: false,
            },
        )];
        self.generation += 1;
        self.tokens.insert(token_hash(&token), id.clone());
        self.conns.insert(conn, id.clone());
        self.peers.insert(
            id.clone(),
            Peer {
                id: id.clone(),
                name: name.clone(),
                room: room.clone(),
                media: None,
                conn: Some((conn, handle)),
                token: token_hash(&token),
                grace_until: None,
                queue: VecDeque::new(),
            },
        );
        self.rooms.entry(room).or_default().push(id.clone());
        self.deliver(&others, ServerMsg::PeerJoined { id, name }, &mut effects);
        effects
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
        self.tokens.insert(token_hash(&token), id.clone());
        self.conns.insert(conn, id.clone());
        self.generation += 1;
        let others: Vec<Arc<str>> = self
            .rooms
            .get(&room)
            .map(|r| r.iter().filter(|p| **p != id).cloned().collect())
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
            },
        ));
        for m in queued {
            effects.push(Effect::Send(vec![handle.clone()], m));
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
            .map(|r| r.iter().filter(|p| *p != id).cloned().collect())
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
        let everyone = self.rooms.get(&p.room).cloned().unwrap_or_default();
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

    /// The socket closed or timed out: its peer (if any) enters the resume grace.
    pub fn disconnect(&mut self, conn: ConnId, now: Instant) -> Vec<Effect<H>> {
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

    /// The earliest instant at which [`Rooms::handle_timeout`] has work (a resume
    /// grace ends), or `None` while nobody is in a grace. May be a grace that a
    /// resume has since ended: acting on it then does nothing.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.graces.front().map(|(at, _)| *at)
    }

    /// Removes every peer whose grace has ended by `now`.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<Effect<H>> {
        let mut effects = Vec::new();
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
        if let Some(r) = self.rooms.get_mut(&peer.room) {
            r.retain(|p| p != id);
            others = r.clone();
            if r.is_empty() {
                self.rooms.remove(&peer.room);
            }
        }
        self.deliver(
            &others,
            ServerMsg::PeerLeft { id: id.clone() },
            &mut effects,
        );
        effects.push(Effect::PeerGone(id.clone()));
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
        let peers = rooms
            .into_iter()
            .filter_map(|r| self.rooms.get(r))
            .flatten()
            .filter_map(|id| self.peers.get(id))
            .map(|p| SavedPeer {
                id: p.id.to_string(),
                room: p.room.to_string(),
                name: p.name.to_string(),
                media: p.media,
                token_sha256: hex::encode(p.token),
            })
            .collect();
        let (id_key, id_next) = self.ids.parts();
        Snapshot {
            format: FORMAT,
            saved_unix_ms: now_unix_ms,
            id_key,
            id_next,
            peers,
        }
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
        let mut peers: HashMap<Arc<str>, Peer<H>> = HashMap::with_capacity(snap.peers.len());
        let mut rooms: HashMap<Arc<str>, Vec<Arc<str>>> = HashMap::new();
        let mut tokens = HashMap::with_capacity(snap.peers.len());
        let grace_until = now + self.cfg.resume_grace;
        for p in snap.peers {
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
            let id: Arc<str> = p.id.into();
            let room: Arc<str> = match rooms.get_key_value(p.room.as_str()) {
                Some((r, _)) => r.clone(),
                None => p.room.into(),
            };
            if tokens.insert(token, id.clone()).is_some() {
                return Err(RestoreError::Invalid("duplicate token"));
            }
            rooms.entry(room.clone()).or_default().push(id.clone());
            let peer = Peer {
                id: id.clone(),
                name: p.name.into(),
                room,
                media: p.media,
                conn: None,
                token,
                grace_until: Some(grace_until),
                queue: VecDeque::new(),
            };
            if peers.insert(id, peer).is_some() {
                return Err(RestoreError::Invalid("duplicate peer id"));
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
