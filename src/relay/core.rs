//! The STUN/TURN state machine (RFC 8489, RFC 8656, RFC 6156): allocations,
//! permissions, channels, long-term authentication, quotas and the retransmission
//! cache. It is sans-IO, after str0m and firezone's relay:
//!
//! - **Time comes in.** Every input carries `now: Instant`, and every lifetime
//!   (nonce, allocation, permission, channel, cached answer, bandwidth bucket) runs on
//!   that monotonic clock, so a wall-clock step neither expires nor extends anything.
//!   Wall-clock time reaches only [`Core::handle_stun`], for the one thing defined on
//!   it: the Unix-seconds expiry inside a TURN REST username.
//! - **Randomness comes in**: the nonce key is drawn from the RNG given to
//!   [`Core::new`]; allocation ids and bind tokens are counters.
//! - **Effects go out as values**: [`Command`]s, drained with [`Core::poll_command`]
//!   (answers to send, relay sockets to bind and free, Send indications to forward).
//!   The core never opens a socket: a valid Allocate yields
//!   [`Command::BindRelaySocket`]; the IO layer binds, outside any lock, and reports
//!   back with [`Core::relay_bound`], which yields the answer. Relay sockets are opaque
//!   handles `H` the core stores and hands back.
//! - **Timers**: [`Core::poll_timeout`] is the earliest instant the core must act (an
//!   ordered set of deadlines, read in O(log n)); [`Core::handle_timeout`] acts.
//!
//! The packet hot path, [`Core::channel_data`] and [`Core::from_peer`], answers a
//! routing question with a value and queues nothing: relaying a datagram allocates
//! nothing. No method panics on any input; bad input gets its STUN error or is dropped.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use stun::attributes::*;
use stun::error_code::{ErrorCode, ErrorCodeAttribute};
use stun::fingerprint::FINGERPRINT;
use stun::integrity::MessageIntegrity;
use stun::message::*;
use stun::textattrs::TextAttribute;
use stun::xoraddr::XorMappedAddress;

use super::auth::{CredError, Credentials, NonceCheck, Nonces, NONCE_TTL};
use super::policy::{OwnAddrs, PeerPolicy};
use super::wire::XorAddress;
use super::RelayMetrics;

mod deadlines;
mod msg;
#[cfg(test)]
mod tests;

use deadlines::{Deadlines, Timer};
pub use msg::data_indication;
use msg::{attr_bytes, attr_text, decode_xor_addr, encode, error_answer, fail, known_attr, Fail};

/// Allocation lifetime when the client asks for none (RFC 8656 section 3.2).
pub const DEFAULT_ALLOCATION_LIFETIME: Duration = Duration::from_secs(600);
pub const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);
pub const CHANNEL_LIFETIME: Duration = Duration::from_secs(600);
/// How long answers are kept for retransmitted requests (a UDP client gives up
/// after 39.5 s, RFC 8489 section 6.2.1).
pub const RETRANSMIT_TTL: Duration = Duration::from_secs(40);
/// How long the core waits for [`Core::relay_bound`] after asking for a relay socket.
/// The IO answers at once; this only keeps a lost answer from holding quota forever.
pub const BIND_TIMEOUT: Duration = Duration::from_secs(5);
/// Permissions (peer addresses) and channels an allocation may hold at once; beyond
/// that CreatePermission and ChannelBind get 508 (RFC 8656 sections 10.2, 11.2).
pub const MAX_PEERS_PER_ALLOCATION: usize = 512;
const RETRANSMIT_CACHE_MAX: usize = 20_000;
/// Channel numbers a client may bind (RFC 8656 section 12); ChannelData with any
/// other number is dropped.
pub const CHANNELS: std::ops::RangeInclusive<u16> = 0x4000..=0x4FFF;

/// How the client reached the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
}

impl Transport {
    pub fn label(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        }
    }
}

/// The client side of an allocation: client address, server address, transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FiveTuple {
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub transport: Transport,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// The index of this family's relay in [`Allocation::relays`].
    fn index(self) -> usize {
        match self {
            Family::V4 => 0,
            Family::V6 => 1,
        }
    }
}

/// An allocation, as named to the IO layer (peer datagrams on its relay socket are
/// reported with it, see [`Core::from_peer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AllocationId(u64);

/// Names one [`Command::BindRelaySocket`] until [`Core::relay_bound`] answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BindToken(u64);

/// Why the IO layer could not bind a relay socket; the IO logs which limit was hit.
/// An Allocate gets 508 whatever the reason. For the IPv6 socket of a dual
/// allocation the IPv4 allocation stands and ADDRESS-ERROR-CODE says 508 for a full
/// range or the descriptor limit, 440 when the IPv6 relay address cannot be bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindError {
    /// Every port tried in the relay port range was taken.
    NoFreePort,
    /// Out of file descriptors (EMFILE, ENFILE): a limit to raise, not a full range.
    FileLimit,
    /// Any other failure to open or bind a socket.
    Other,
}

/// An effect for the IO layer to carry out, in queue order.
#[derive(Debug)]
pub enum Command<H> {
    /// Send `bytes` (a STUN message) to the client on `to`.
    SendToClient { to: FiveTuple, bytes: Vec<u8> },
    /// Bind a UDP relay socket of `family` (an even port number if `even_port`), then
    /// call [`Core::relay_bound`] with `token` and the outcome.
    BindRelaySocket {
        token: BindToken,
        family: Family,
        even_port: bool,
    },
    /// The relay socket `handle` now serves allocation `id` of `client`: receive
    /// from peers on it and pass each datagram through [`Core::from_peer`]. Queued
    /// before the Allocate answer; a dual allocation has two, one per family.
    StartRelaying {
        id: AllocationId,
        client: FiveTuple,
        relay: SocketAddr,
        handle: H,
    },
    /// Send `data` from the relay socket `handle` to `peer` (a Send indication).
    SendToPeer {
        handle: H,
        peer: SocketAddr,
        data: Vec<u8>,
    },
    /// The allocation using `handle` is gone (or, in a dual allocation, the part of
    /// its family): close the relay socket.
    FreeRelaySocket { handle: H },
}

/// Settings of the core (from `[turn]`).
#[derive(Debug, Clone)]
pub struct RelayRules {
    /// The longest allocation lifetime granted (at most 2^32 - 1 seconds).
    pub max_lifetime: Duration,
    pub user_quota: usize,
    pub total_quota: usize,
    /// Bytes per second per allocation; 0 = unlimited.
    pub max_bps: u64,
    pub policy: PeerPolicy,
    /// The server's own listeners: never a peer, whatever `policy` allows.
    pub own: OwnAddrs,
    /// The address families the IO layer has relay addresses for; others get 440.
    pub relay_v4: bool,
    pub relay_v6: bool,
}

/// How a datagram from a peer reaches the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToClient {
    Channel(u16),
    DataIndication,
}

struct Bucket {
    tokens: u64,
    /// Tokens are added for the whole milliseconds elapsed since `last`.
    last: Instant,
}

/// One relay socket of an allocation, with its own lifetime: a dual allocation
/// (RFC 8656 section 7.2) has an IPv4 and an IPv6 one, refreshed together or, with
/// REQUESTED-ADDRESS-FAMILY, one at a time.
struct RelayPart<H> {
    addr: SocketAddr,
    handle: H,
    expires: Instant,
}

struct Allocation<H> {
    five: FiveTuple,
    username: String,
    peer_id: Option<String>,
    key: Vec<u8>,
    /// By [`Family::index`]: IPv4, IPv6. At least one is present while the
    /// allocation exists.
    relays: [Option<RelayPart<H>>; 2],
    perms: HashMap<IpAddr, Instant>,
    channels: HashMap<u16, (SocketAddr, Instant)>,
    peer_channels: HashMap<SocketAddr, u16>,
    bucket: Bucket,
}

impl<H> Allocation<H> {
    fn relay(&self, family: Family) -> Option<&RelayPart<H>> {
        self.relays[family.index()].as_ref()
    }

    /// The relay addresses, IPv4 first.
    fn relay_addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.relays.iter().flatten().map(|r| r.addr)
    }
}

/// An authenticated Allocate waiting for its relay socket. It counts against the
/// quotas like an allocation. A dual allocation binds its IPv4 socket, then its
/// IPv6 one; `first` holds the IPv4 socket meanwhile.
struct Pending<H> {
    five: FiveTuple,
    txid: [u8; 12],
    username: String,
    peer_id: Option<String>,
    key: Vec<u8>,
    /// The family of the socket being bound now.
    family: Family,
    even_port: bool,
    lifetime: Duration,
    deadline: Instant,
    /// ADDITIONAL-ADDRESS-FAMILY: an IPv6 socket is to be bound after this one.
    then_v6: bool,
    /// The IPv4 relay socket of a dual allocation, bound while the IPv6 one is.
    first: Option<(SocketAddr, H)>,
    /// ADDRESS-ERROR-CODE for the success answer: the additional family (RFC 8656
    /// section 7.2) that could not be allocated, and why.
    address_error: Option<(Family, u16, &'static str)>,
}

/// ADDITIONAL-ADDRESS-FAMILY and ADDRESS-ERROR-CODE (RFC 8656 sections 18.12, 18.13).
pub const ATTR_ADDITIONAL_ADDRESS_FAMILY: AttrType = AttrType(0x8000);
pub const ATTR_ADDRESS_ERROR_CODE: AttrType = AttrType(0x8001);

/// ADDRESS-ERROR-CODE: family, error class and number, reason.
struct AddressError(Family, u16, &'static str);

impl Setter for AddressError {
    fn add_to(&self, m: &mut Message) -> Result<(), stun::Error> {
        let family = match self.0 {
            Family::V4 => 0x01,
            Family::V6 => 0x02,
        };
        let mut v = vec![family, 0, (self.1 / 100) as u8, (self.1 % 100) as u8];
        v.extend_from_slice(self.2.as_bytes());
        m.add(ATTR_ADDRESS_ERROR_CODE, &v);
        Ok(())
    }
}

/// The relay state machine. `H` is the IO layer's relay socket handle.
pub struct Core<H> {
    cfg: RelayRules,
    creds: Credentials,
    nonces: Nonces,
    metrics: RelayMetrics,
    next_id: u64,
    next_token: u64,
    allocs: HashMap<AllocationId, Allocation<H>>,
    by_five: HashMap<FiveTuple, AllocationId>,
    pending: HashMap<BindToken, Pending<H>>,
    pending_by_five: HashMap<FiveTuple, BindToken>,
    /// Allocations and pending Allocates per username.
    per_user: HashMap<String, usize>,
    cache: HashMap<(FiveTuple, [u8; 12]), (Instant, Vec<u8>)>,
    cache_order: VecDeque<(Instant, FiveTuple, [u8; 12])>,
    deadlines: Deadlines,
    commands: VecDeque<Command<H>>,
    /// Peer ids whose REST credentials are refused (a host removed the peer), oldest
    /// first, each with when it may be forgotten.
    revoked: VecDeque<(Instant, String)>,
}

/// How long a revoked peer id is remembered: the longest credential lifetime
/// `turn.credential_ttl_s` allows, after which its credentials have expired anyway.
pub const REVOKED_KEEP: Duration = Duration::from_secs(7 * 86_400);
/// Revoked peer ids remembered at most; beyond, the oldest are forgotten.
pub const MAX_REVOKED: usize = 10_000;

/// Whether a REST username's expiry (Unix seconds) has passed at wall-clock `wall`.
fn rest_expired(expiry: u64, wall: SystemTime) -> bool {
    match UNIX_EPOCH.checked_add(Duration::from_secs(expiry)) {
        Some(at) => at <= wall,
        // Beyond what the clock can represent: not in any reachable past.
        None => false,
    }
}

/// A request that passed authentication.
struct Authed {
    username: String,
    key: Vec<u8>,
    /// REST expiry in Unix seconds; `None` for static users and for the user of the
    /// allocation on this 5-tuple (checked when it allocated).
    expiry: Option<u64>,
    peer_id: Option<String>,
}

impl<H: Clone> Core<H> {
    /// A core with no allocations; `rng` keys the nonces, `now` is their epoch.
    pub fn new(
        cfg: RelayRules,
        creds: Credentials,
        metrics: RelayMetrics,
        rng: &mut impl rand::RngCore,
        now: Instant,
    ) -> Self {
        let mut key = [0u8; 64];
        rng.fill_bytes(&mut key);
        // LIFETIME is 32-bit seconds: a longer maximum could not be told to a client,
        // and this one keeps every deadline (`now` plus at most this) representable.
        let mut cfg = cfg;
        cfg.max_lifetime = cfg
            .max_lifetime
            .min(Duration::from_secs(u64::from(u32::MAX)));
        Core {
            cfg,
            creds,
            nonces: Nonces::new(key, NONCE_TTL, now),
            metrics,
            next_id: 1,
            next_token: 1,
            allocs: HashMap::new(),
            by_five: HashMap::new(),
            pending: HashMap::new(),
            pending_by_five: HashMap::new(),
            per_user: HashMap::new(),
            cache: HashMap::new(),
            cache_order: VecDeque::new(),
            deadlines: Deadlines::default(),
            commands: VecDeque::new(),
            revoked: VecDeque::new(),
        }
    }

    pub fn allocation_count(&self) -> usize {
        self.allocs.len()
    }

    /// The allocation made from `five`, if any: its id and relayed address (the
    /// IPv4 one of a dual allocation).
    pub fn allocation_of(&self, five: &FiveTuple) -> Option<(AllocationId, SocketAddr)> {
        let id = *self.by_five.get(five)?;
        let a = self.allocs.get(&id)?;
        a.relay_addrs().next().map(|addr| (id, addr))
    }

    /// Whether allocation `id` still exists.
    pub fn alive(&self, id: AllocationId) -> bool {
        self.allocs.contains_key(&id)
    }

    /// The next effect to carry out.
    pub fn poll_command(&mut self) -> Option<Command<H>> {
        self.commands.pop_front()
    }

    /// The earliest instant at which [`Core::handle_timeout`] has work (an
    /// allocation, permission or channel expiring, a cached answer to drop, a bind to
    /// give up on); `None` when there is nothing to wait for.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let cache = self.cache_order.front().map(|(at, _, _)| *at);
        match (self.deadlines.first(), cache) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Drops everything that expired at `now`: allocations (queuing
    /// [`Command::FreeRelaySocket`]), permissions, channels, cached answers, and
    /// pending binds that were never answered.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(timer) = self.deadlines.pop_due(now) {
            match timer {
                Timer::Relay(id, family) => self.remove_relay(id, family),
                Timer::Permission(id, ip) => {
                    if let Some(a) = self.allocs.get_mut(&id) {
                        a.perms.remove(&ip);
                    }
                }
                Timer::Channel(id, number) => {
                    if let Some(a) = self.allocs.get_mut(&id) {
                        if let Some((peer, _)) = a.channels.remove(&number) {
                            a.peer_channels.remove(&peer);
                        }
                    }
                }
                Timer::Bind(token) => {
                    if let Some(p) = self.pending.remove(&token) {
                        tracing::warn!(
                            client = %p.five.client,
                            "relay socket bind not answered in time; the Allocate is dropped"
                        );
                        self.pending_by_five.remove(&p.five);
                        self.release_user(&p.username);
                        self.free_first(p);
                    }
                }
            }
        }
        while let Some((at, five, txid)) = self.cache_order.front().copied() {
            if at > now {
                break;
            }
            self.cache_order.pop_front();
            if self
                .cache
                .get(&(five, txid))
                .is_some_and(|(e, _)| *e <= now)
            {
                self.cache.remove(&(five, txid));
            }
        }
    }

    fn send(&mut self, to: FiveTuple, bytes: Vec<u8>) {
        self.commands.push_back(Command::SendToClient { to, bytes });
    }

    /// Handles a STUN message from the client side. `wall` is the wall-clock time,
    /// used only for the expiry of TURN REST usernames.
    pub fn handle_stun(&mut self, buf: &[u8], five: FiveTuple, now: Instant, wall: SystemTime) {
        let mut m = Message::new();
        if m.unmarshal_binary(buf).is_err() {
            return;
        }
        if m.contains(ATTR_FINGERPRINT) && FINGERPRINT.check(&m).is_err() {
            return;
        }
        let txid = m.transaction_id.0;
        match m.typ.class {
            CLASS_REQUEST => {}
            CLASS_INDICATION => {
                if m.typ.method == METHOD_SEND {
                    self.send_indication(&m, five, now);
                }
                return;
            }
            _ => return,
        }
        let method = m.typ.method;
        if method == METHOD_BINDING {
            self.binding(&m, five);
            return;
        }
        if ![
            METHOD_ALLOCATE,
            METHOD_REFRESH,
            METHOD_CREATE_PERMISSION,
            METHOD_CHANNEL_BIND,
        ]
        .contains(&method)
        {
            let e = encode(
                method,
                CLASS_ERROR_RESPONSE,
                txid,
                &[&ErrorCodeAttribute {
                    code: ErrorCode(400),
                    reason: b"Unsupported method".to_vec(),
                }],
                None,
            );
            self.send(five, e);
            return;
        }
        // A retransmission gets the very same answer.
        if let Some((exp, bytes)) = self.cache.get(&(five, txid)) {
            if *exp > now {
                let bytes = bytes.clone();
                self.send(five, bytes);
                return;
            }
        }
        // A retransmitted Allocate whose relay socket is being bound: the answer to the
        // first copy is on its way.
        if let Some(token) = self.pending_by_five.get(&five) {
            if self.pending.get(token).is_some_and(|p| p.txid == txid) {
                return;
            }
        }
        let auth = match self.authenticate(&mut m, five, now) {
            Ok(a) => a,
            Err(reply) => {
                self.send(five, reply);
                return;
            }
        };
        let result = match method {
            METHOD_ALLOCATE => match self.allocate(&m, five, &auth, now, wall) {
                // Answered in `relay_bound`.
                Ok(()) => return,
                Err(f) => Err(f),
            },
            METHOD_REFRESH => self.refresh(&m, five, &auth, now),
            METHOD_CREATE_PERMISSION => self.create_permission(&m, five, &auth, now),
            _ => self.channel_bind(&m, five, &auth, now),
        };
        let reply = match result {
            Ok(r) => r,
            Err(f) if f.code == 401 => {
                // Expired REST credentials: challenge again, like any bad credential.
                self.metrics.refused(401);
                let reply = self.challenge(&m, five, 401, "Unauthorized", now);
                self.send(five, reply);
                return;
            }
            Err(f) => {
                if method == METHOD_ALLOCATE {
                    self.metrics.refused(f.code);
                }
                error_answer(method, txid, &f, &auth.key)
            }
        };
        self.remember(five, txid, &reply, now);
        self.send(five, reply);
    }

    fn remember(&mut self, five: FiveTuple, txid: [u8; 12], reply: &[u8], now: Instant) {
        while self.cache.len() >= RETRANSMIT_CACHE_MAX {
            match self.cache_order.pop_front() {
                Some((_, f, t)) => {
                    self.cache.remove(&(f, t));
                }
                None => break,
            }
        }
        let exp = now + RETRANSMIT_TTL;
        self.cache.insert((five, txid), (exp, reply.to_vec()));
        self.cache_order.push_back((exp, five, txid));
    }

    fn binding(&mut self, m: &Message, five: FiveTuple) {
        let unknown: Vec<AttrType> = m
            .attributes
            .0
            .iter()
            .map(|a| a.typ)
            .filter(|t| !known_attr(*t))
            .collect();
        if !unknown.is_empty() {
            let ec = ErrorCodeAttribute {
                code: ErrorCode(420),
                reason: b"Unknown Attribute".to_vec(),
            };
            let ua = stun::uattrs::UnknownAttributes(unknown);
            let reply = encode(
                METHOD_BINDING,
                CLASS_ERROR_RESPONSE,
                m.transaction_id.0,
                &[&ec, &ua],
                None,
            );
            self.send(five, reply);
            return;
        }
        let xor = XorMappedAddress {
            ip: five.client.ip(),
            port: five.client.port(),
        };
        let mapped = stun::addr::MappedAddress {
            ip: five.client.ip(),
            port: five.client.port(),
        };
        self.metrics.binding(five.transport);
        let reply = encode(
            METHOD_BINDING,
            CLASS_SUCCESS_RESPONSE,
            m.transaction_id.0,
            &[&xor, &mapped],
            None,
        );
        self.send(five, reply);
    }

    fn challenge(
        &self,
        m: &Message,
        five: FiveTuple,
        code: u16,
        reason: &str,
        now: Instant,
    ) -> Vec<u8> {
        let ec = ErrorCodeAttribute {
            code: ErrorCode(code),
            reason: reason.as_bytes().to_vec(),
        };
        let realm = TextAttribute::new(ATTR_REALM, self.creds.realm().to_string());
        let nonce = TextAttribute::new(ATTR_NONCE, self.nonces.issue(now, five.client));
        encode(
            m.typ.method,
            CLASS_ERROR_RESPONSE,
            m.transaction_id.0,
            &[&ec, &realm, &nonce],
            None,
        )
    }

    fn bad_request(&self, m: &Message) -> Vec<u8> {
        let ec = ErrorCodeAttribute {
            code: ErrorCode(400),
            reason: b"Bad Request".to_vec(),
        };
        encode(
            m.typ.method,
            CLASS_ERROR_RESPONSE,
            m.transaction_id.0,
            &[&ec],
            None,
        )
    }

    /// Long-term credential check (RFC 8489 section 9.2.4); no state is kept for
    /// requests that fail it.
    fn authenticate(
        &mut self,
        m: &mut Message,
        five: FiveTuple,
        now: Instant,
    ) -> Result<Authed, Vec<u8>> {
        if !m.contains(ATTR_MESSAGE_INTEGRITY) {
            return Err(self.challenge(m, five, 401, "Unauthorized", now));
        }
        let username = attr_text(m, ATTR_USERNAME, 513);
        let realm = attr_text(m, ATTR_REALM, 763);
        let nonce = attr_text(m, ATTR_NONCE, 763);
        let (Some(Ok(username)), Some(Ok(_realm)), Some(Ok(nonce))) = (username, realm, nonce)
        else {
            self.metrics.auth_failure("bad_request");
            return Err(self.bad_request(m));
        };
        match self.nonces.check(&nonce, now, five.client) {
            NonceCheck::Fresh => {}
            NonceCheck::Stale | NonceCheck::Invalid => {
                self.metrics.auth_failure("stale_nonce");
                return Err(self.challenge(m, five, 438, "Stale Nonce", now));
            }
        }
        // An existing allocation's user reuses its cached key.
        let existing = self
            .by_five
            .get(&five)
            .and_then(|id| self.allocs.get(id))
            .filter(|a| a.username == username)
            .map(|a| (a.key.clone(), a.peer_id.clone()));
        let (key, expiry, peer_id) = match existing {
            Some((k, p)) => (k, None, p),
            None => match self.creds.resolve(&username) {
                Ok(r) => (r.key, r.expiry, r.peer_id),
                Err(CredError::UnknownUser) | Err(CredError::Expired) => {
                    self.metrics.auth_failure("unknown_user");
                    return Err(self.challenge(m, five, 401, "Unauthorized", now));
                }
            },
        };
        if let Some(p) = peer_id.as_deref() {
            if self.revoked.iter().any(|(_, r)| r == p) {
                self.metrics.auth_failure("revoked");
                return Err(self.challenge(m, five, 401, "Unauthorized", now));
            }
        }
        if MessageIntegrity(key.clone()).check(m).is_err() {
            self.metrics.auth_failure("bad_integrity");
            return Err(self.challenge(m, five, 401, "Unauthorized", now));
        }
        Ok(Authed {
            username,
            key,
            expiry,
            peer_id,
        })
    }

    /// 420 for comprehension-required attributes we do not implement.
    fn check_unknown(m: &Message) -> Result<(), Fail> {
        let unknown: Vec<AttrType> = m
            .attributes
            .0
            .iter()
            .map(|a| a.typ)
            .filter(|t| !known_attr(*t))
            .collect();
        if unknown.is_empty() {
            Ok(())
        } else {
            tracing::debug!(?unknown, "unknown comprehension-required attributes");
            Err(Fail {
                code: 420,
                reason: "Unknown Attribute",
                unknown,
            })
        }
    }

    /// The LIFETIME attribute, if present.
    fn requested_lifetime(m: &Message) -> Result<Option<Duration>, Fail> {
        let Some(v) = attr_bytes(m, ATTR_LIFETIME) else {
            return Ok(None);
        };
        let Ok(secs) = <[u8; 4]>::try_from(v) else {
            return Err(fail(400, "Bad LIFETIME"));
        };
        Ok(Some(Duration::from_secs(u64::from(u32::from_be_bytes(
            secs,
        )))))
    }

    /// REQUESTED-ADDRESS-FAMILY (RFC 8656 section 18.11), if present; 440 when it is
    /// malformed or names neither IPv4 nor IPv6.
    fn requested_family(m: &Message) -> Result<Option<Family>, Fail> {
        match attr_bytes(m, ATTR_REQUESTED_ADDRESS_FAMILY) {
            None => Ok(None),
            Some(v) if v.len() == 4 && v[0] == 0x01 => Ok(Some(Family::V4)),
            Some(v) if v.len() == 4 && v[0] == 0x02 => Ok(Some(Family::V6)),
            Some(_) => Err(fail(440, "Address Family not Supported")),
        }
    }

    /// RFC 8656 section 7.2: min(requested, max), but not below the default.
    fn granted_lifetime(&self, requested: Option<Duration>) -> Duration {
        let max = self.cfg.max_lifetime;
        let default = DEFAULT_ALLOCATION_LIFETIME.min(max);
        match requested {
            Some(r) => r.min(max).max(default),
            None => default,
        }
    }

    fn has_family(&self, family: Family) -> bool {
        match family {
            Family::V4 => self.cfg.relay_v4,
            Family::V6 => self.cfg.relay_v6,
        }
    }

    fn allocation_mut(&mut self, five: &FiveTuple, auth: &Authed) -> Result<AllocationId, Fail> {
        let id = *self
            .by_five
            .get(five)
            .ok_or(fail(437, "Allocation Mismatch"))?;
        let a = self
            .allocs
            .get(&id)
            .ok_or(fail(437, "Allocation Mismatch"))?;
        if a.username != auth.username {
            return Err(fail(441, "Wrong Credentials"));
        }
        Ok(id)
    }

    /// Checks an Allocate; when it may proceed, asks the IO for a relay socket
    /// ([`Command::BindRelaySocket`]) and waits for [`Core::relay_bound`].
    fn allocate(
        &mut self,
        m: &Message,
        five: FiveTuple,
        auth: &Authed,
        now: Instant,
        wall: SystemTime,
    ) -> Result<(), Fail> {
        if self.by_five.contains_key(&five) || self.pending_by_five.contains_key(&five) {
            // The same transaction id was answered from the cache (or is being
            // answered); a new one is a mismatch.
            return Err(fail(437, "Allocation Mismatch"));
        }
        if let Some(exp) = auth.expiry {
            if rest_expired(exp, wall) {
                self.metrics.auth_failure("expired");
                return Err(fail(401, "Unauthorized"));
            }
        }
        Self::check_unknown(m)?;
        // EVEN-PORT without reservation is honoured (some clients send it at random);
        // reservations (R bit, RESERVATION-TOKEN) are not implemented: 420.
        let even_port = match attr_bytes(m, ATTR_EVEN_PORT) {
            None => false,
            Some([flags, ..]) if flags & 0x80 == 0 => true,
            Some(_) => {
                return Err(Fail {
                    code: 420,
                    reason: "Unknown Attribute",
                    unknown: vec![ATTR_EVEN_PORT],
                })
            }
        };
        if m.contains(ATTR_RESERVATION_TOKEN) {
            return Err(Fail {
                code: 420,
                reason: "Unknown Attribute",
                unknown: vec![ATTR_RESERVATION_TOKEN],
            });
        }
        let Some(rt) = attr_bytes(m, ATTR_REQUESTED_TRANSPORT) else {
            return Err(fail(400, "Missing REQUESTED-TRANSPORT"));
        };
        if rt.len() != 4 {
            return Err(fail(400, "Bad REQUESTED-TRANSPORT"));
        }
        if rt[0] != 17 {
            return Err(fail(442, "Unsupported Transport Protocol"));
        }
        let requested = Self::requested_family(m)?;
        // ADDITIONAL-ADDRESS-FAMILY asks for an IPv6 relay address besides the IPv4
        // one; only 0x02 is valid, and never with REQUESTED-ADDRESS-FAMILY.
        let additional = match attr_bytes(m, ATTR_ADDITIONAL_ADDRESS_FAMILY) {
            None => false,
            Some(_) if requested.is_some() => {
                return Err(fail(
                    400,
                    "REQUESTED-ADDRESS-FAMILY and ADDITIONAL-ADDRESS-FAMILY together",
                ))
            }
            Some([0x02, 0, 0, 0]) => true,
            Some(_) => return Err(fail(400, "Bad ADDITIONAL-ADDRESS-FAMILY")),
        };
        let family = requested.unwrap_or(Family::V4);
        if !self.has_family(family) {
            return Err(fail(440, "Address Family not Supported"));
        }
        // A dual allocation: the IPv4 socket first, then the IPv6 one. Without an
        // IPv6 relay address the IPv4 allocation alone succeeds, and the answer says
        // why there is no IPv6 one.
        let then_v6 = additional && self.has_family(Family::V6);
        let address_error =
            (additional && !then_v6).then_some((Family::V6, 440, "Address Family not Supported"));
        let lifetime = self.granted_lifetime(Self::requested_lifetime(m)?);
        let used = self.per_user.get(&auth.username).copied().unwrap_or(0);
        if used >= self.cfg.user_quota {
            return Err(fail(486, "Allocation Quota Reached"));
        }
        if self.allocs.len() + self.pending.len() >= self.cfg.total_quota {
            return Err(fail(508, "Insufficient Capacity"));
        }
        *self.per_user.entry(auth.username.clone()).or_insert(0) += 1;
        let p = Pending {
            five,
            txid: m.transaction_id.0,
            username: auth.username.clone(),
            peer_id: auth.peer_id.clone(),
            key: auth.key.clone(),
            family,
            even_port,
            lifetime,
            deadline: now,
            then_v6,
            first: None,
            address_error,
        };
        self.await_bind(p, now);
        Ok(())
    }

    /// The IO layer's answer to [`Command::BindRelaySocket`]: the relayed address to
    /// advertise and the socket's handle, or why there is none. Queues the Allocate
    /// answer (after [`Command::StartRelaying`] on success; 508 or 440 on failure),
    /// or, for the IPv4 socket of a dual allocation, the bind of its IPv6 socket. A
    /// socket nobody waits for any more (the client left meanwhile) is freed at once.
    pub fn relay_bound(
        &mut self,
        token: BindToken,
        result: Result<(SocketAddr, H), BindError>,
        now: Instant,
    ) {
        let Some(mut p) = self.pending.remove(&token) else {
            if let Ok((_, handle)) = result {
                self.commands.push_back(Command::FreeRelaySocket { handle });
            }
            return;
        };
        self.pending_by_five.remove(&p.five);
        self.deadlines.clear(p.deadline, Timer::Bind(token));
        let result = match result {
            Ok((relay, handle)) if Family::of(relay.ip()) == p.family => Ok((relay, handle)),
            Ok((relay, handle)) => {
                tracing::error!(%relay, family = ?p.family, "relay socket of the wrong address family; refused");
                self.commands.push_back(Command::FreeRelaySocket { handle });
                Err(BindError::Other)
            }
            Err(e) => {
                tracing::debug!(client = %p.five.client, family = ?p.family, error = ?e, "no relay socket");
                Err(e)
            }
        };
        let mut parts = Vec::with_capacity(2);
        parts.extend(p.first.take());
        match result {
            Ok(part) if p.then_v6 => {
                // The IPv4 socket of a dual allocation: now the IPv6 one.
                p.first = Some(part);
                p.then_v6 = false;
                p.family = Family::V6;
                return self.await_bind(p, now);
            }
            Ok(part) => parts.push(part),
            Err(_) if parts.is_empty() => return self.refuse_pending(p, now),
            // The IPv6 socket of a dual allocation: the IPv4 one stands alone, and the
            // answer says why (RFC 8656 sections 7.2, 18.13).
            Err(BindError::Other) => {
                p.address_error = Some((Family::V6, 440, "Address Family not Supported"))
            }
            Err(BindError::NoFreePort | BindError::FileLimit) => {
                p.address_error = Some((Family::V6, 508, "Insufficient Capacity"))
            }
        }
        self.create_allocation(p, parts, now);
    }

    /// Queues the bind of `p`'s relay socket and waits for its answer.
    fn await_bind(&mut self, mut p: Pending<H>, now: Instant) {
        let token = BindToken(self.next_token);
        self.next_token += 1;
        p.deadline = now + BIND_TIMEOUT;
        self.deadlines.set(None, p.deadline, Timer::Bind(token));
        self.pending_by_five.insert(p.five, token);
        self.commands.push_back(Command::BindRelaySocket {
            token,
            family: p.family,
            even_port: p.even_port,
        });
        self.pending.insert(token, p);
    }

    /// Makes the allocation of `p` with its bound relay sockets `parts` (one or one
    /// per family) and queues the success answer.
    fn create_allocation(&mut self, p: Pending<H>, parts: Vec<(SocketAddr, H)>, now: Instant) {
        let id = AllocationId(self.next_id);
        self.next_id += 1;
        let expires = now + p.lifetime;
        let mut relays: [Option<RelayPart<H>>; 2] = [None, None];
        for (addr, handle) in parts {
            let family = Family::of(addr.ip());
            self.deadlines.set(None, expires, Timer::Relay(id, family));
            self.commands.push_back(Command::StartRelaying {
                id,
                client: p.five,
                relay: addr,
                handle: handle.clone(),
            });
            relays[family.index()] = Some(RelayPart {
                addr,
                handle,
                expires,
            });
        }
        let relayed: Vec<XorAddress> = relays
            .iter()
            .flatten()
            .map(|r| XorAddress(ATTR_XOR_RELAYED_ADDRESS, r.addr))
            .collect();
        self.allocs.insert(
            id,
            Allocation {
                five: p.five,
                username: p.username,
                peer_id: p.peer_id,
                key: p.key,
                relays,
                perms: HashMap::new(),
                channels: HashMap::new(),
                peer_channels: HashMap::new(),
                bucket: Bucket {
                    tokens: self.cfg.max_bps,
                    last: now,
                },
            },
        );
        self.by_five.insert(p.five, id);
        self.metrics.allocation_created(p.five.transport);
        self.metrics.set_active(self.allocs.len());
        let mapped = XorMappedAddress {
            ip: p.five.client.ip(),
            port: p.five.client.port(),
        };
        let lifetime = turn::proto::lifetime::Lifetime(p.lifetime);
        let key = self.allocs.get(&id).map(|a| a.key.as_slice());
        let address_error = p.address_error.map(|(f, c, r)| AddressError(f, c, r));
        let mut attrs: Vec<&dyn Setter> = relayed.iter().map(|r| r as &dyn Setter).collect();
        attrs.push(&lifetime);
        attrs.push(&mapped);
        if let Some(e) = &address_error {
            attrs.push(e);
        }
        let reply = encode(METHOD_ALLOCATE, CLASS_SUCCESS_RESPONSE, p.txid, &attrs, key);
        self.remember(p.five, p.txid, &reply, now);
        self.send(p.five, reply);
    }

    /// Answers a pending Allocate with 508 and gives its quota back.
    fn refuse_pending(&mut self, p: Pending<H>, now: Instant) {
        self.release_user(&p.username);
        self.metrics.refused(508);
        let reply = error_answer(
            METHOD_ALLOCATE,
            p.txid,
            &fail(508, "Insufficient Capacity"),
            &p.key,
        );
        self.remember(p.five, p.txid, &reply, now);
        self.send(p.five, reply);
    }

    fn release_user(&mut self, username: &str) {
        if let Some(n) = self.per_user.get_mut(username) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_user.remove(username);
            }
        }
    }

    /// Refresh (RFC 8656 section 8): every relay of the allocation, or with
    /// REQUESTED-ADDRESS-FAMILY the one of that family (443 if it has none); a
    /// LIFETIME of 0 deletes what it names, and the allocation goes with its last
    /// relay.
    fn refresh(
        &mut self,
        m: &Message,
        five: FiveTuple,
        auth: &Authed,
        now: Instant,
    ) -> Result<Vec<u8>, Fail> {
        let id = self.allocation_mut(&five, auth)?;
        Self::check_unknown(m)?;
        let families: Vec<Family> = {
            let a = self
                .allocs
                .get(&id)
                .ok_or(fail(437, "Allocation Mismatch"))?;
            match Self::requested_family(m)? {
                Some(f) if a.relay(f).is_some() => vec![f],
                Some(_) => return Err(fail(443, "Peer Address Family Mismatch")),
                None => [Family::V4, Family::V6]
                    .into_iter()
                    .filter(|f| a.relay(*f).is_some())
                    .collect(),
            }
        };
        let requested = Self::requested_lifetime(m)?;
        let lifetime = if requested == Some(Duration::ZERO) {
            for f in families {
                self.remove_relay(id, f);
            }
            Duration::ZERO
        } else {
            let lifetime = self.granted_lifetime(requested);
            let expires = now + lifetime;
            if let Some(a) = self.allocs.get_mut(&id) {
                for f in families {
                    if let Some(r) = a.relays[f.index()].as_mut() {
                        self.deadlines
                            .set(Some(r.expires), expires, Timer::Relay(id, f));
                        r.expires = expires;
                    }
                }
            }
            lifetime
        };
        let lifetime = turn::proto::lifetime::Lifetime(lifetime);
        Ok(encode(
            METHOD_REFRESH,
            CLASS_SUCCESS_RESPONSE,
            m.transaction_id.0,
            &[&lifetime],
            Some(&auth.key),
        ))
    }

    fn peers(m: &Message) -> Result<Vec<SocketAddr>, Fail> {
        let mut out = Vec::new();
        for a in m
            .attributes
            .0
            .iter()
            .filter(|a| a.typ == ATTR_XOR_PEER_ADDRESS)
        {
            out.push(
                decode_xor_addr(&a.value, &m.transaction_id.0)
                    .ok_or(fail(400, "Bad XOR-PEER-ADDRESS"))?,
            );
        }
        if out.is_empty() {
            return Err(fail(400, "Missing XOR-PEER-ADDRESS"));
        }
        Ok(out)
    }

    /// Whether allocation `id` may have `peer`: 443 when it has no relay of the
    /// peer's address family, 403 when the policy denies the peer or it is the
    /// server itself.
    fn check_peer(&self, id: AllocationId, peer: SocketAddr) -> Result<(), Fail> {
        let a = self
            .allocs
            .get(&id)
            .ok_or(fail(437, "Allocation Mismatch"))?;
        if a.relay(Family::of(peer.ip())).is_none() {
            return Err(fail(443, "Peer Address Family Mismatch"));
        }
        if !self.cfg.policy.permits(peer.ip()) || self.is_own(a, peer) {
            self.metrics.peer_denied();
            return Err(fail(403, "Forbidden"));
        }
        Ok(())
    }

    /// Whether `peer` is the server itself: one of its UDP listeners, or a relay
    /// address of the allocation `a` asking (a loop; either family's of a dual
    /// allocation). Another allocation's relay address is a peer like any other:
    /// that is how two relayed clients of this server reach each other.
    fn is_own(&self, a: &Allocation<H>, peer: SocketAddr) -> bool {
        self.cfg.own.is_listener(peer)
            || a.relay_addrs().any(|relay| {
                peer.port() == relay.port()
                    && (crate::net::canonical_ip(peer.ip()) == relay.ip()
                        || self.cfg.own.is_host(peer.ip()))
            })
    }

    fn create_permission(
        &mut self,
        m: &Message,
        five: FiveTuple,
        auth: &Authed,
        now: Instant,
    ) -> Result<Vec<u8>, Fail> {
        let id = self.allocation_mut(&five, auth)?;
        Self::check_unknown(m)?;
        let peers = Self::peers(m)?;
        // All or nothing: any refused peer refuses the request.
        for p in &peers {
            self.check_peer(id, *p)?;
        }
        let a = self
            .allocs
            .get_mut(&id)
            .ok_or(fail(437, "Allocation Mismatch"))?;
        let mut new_ips: Vec<IpAddr> = peers
            .iter()
            .map(|p| p.ip())
            .filter(|ip| !a.perms.contains_key(ip))
            .collect();
        new_ips.sort_unstable();
        new_ips.dedup();
        if a.perms.len() + new_ips.len() > MAX_PEERS_PER_ALLOCATION {
            return Err(fail(508, "Insufficient Capacity"));
        }
        let expires = now + PERMISSION_LIFETIME;
        for p in peers {
            let old = a.perms.insert(p.ip(), expires);
            self.deadlines
                .set(old, expires, Timer::Permission(id, p.ip()));
        }
        Ok(encode(
            METHOD_CREATE_PERMISSION,
            CLASS_SUCCESS_RESPONSE,
            m.transaction_id.0,
            &[],
            Some(&auth.key),
        ))
    }

    fn channel_bind(
        &mut self,
        m: &Message,
        five: FiveTuple,
        auth: &Authed,
        now: Instant,
    ) -> Result<Vec<u8>, Fail> {
        let id = self.allocation_mut(&five, auth)?;
        Self::check_unknown(m)?;
        let Some(cn) = attr_bytes(m, ATTR_CHANNEL_NUMBER) else {
            return Err(fail(400, "Missing CHANNEL-NUMBER"));
        };
        if cn.len() != 4 {
            return Err(fail(400, "Bad CHANNEL-NUMBER"));
        }
        let number = u16::from_be_bytes([cn[0], cn[1]]);
        if !CHANNELS.contains(&number) {
            return Err(fail(400, "Channel Number out of range"));
        }
        let peers = Self::peers(m)?;
        let &[peer] = peers.as_slice() else {
            return Err(fail(400, "One XOR-PEER-ADDRESS expected"));
        };
        self.check_peer(id, peer)?;
        let a = self
            .allocs
            .get_mut(&id)
            .ok_or(fail(437, "Allocation Mismatch"))?;
        let rebind = match a.channels.get(&number) {
            Some((bound, _)) if *bound != peer => {
                return Err(fail(400, "Channel bound to another peer"))
            }
            Some(_) => true,
            None => false,
        };
        if let Some(n) = a.peer_channels.get(&peer) {
            if *n != number {
                return Err(fail(400, "Peer bound to another channel"));
            }
        }
        let new_perm = !a.perms.contains_key(&peer.ip());
        if (!rebind && a.channels.len() >= MAX_PEERS_PER_ALLOCATION)
            || (new_perm && a.perms.len() >= MAX_PEERS_PER_ALLOCATION)
        {
            return Err(fail(508, "Insufficient Capacity"));
        }
        let channel_expires = now + CHANNEL_LIFETIME;
        let old = a.channels.insert(number, (peer, channel_expires));
        self.deadlines.set(
            old.map(|(_, at)| at),
            channel_expires,
            Timer::Channel(id, number),
        );
        a.peer_channels.insert(peer, number);
        let perm_expires = now + PERMISSION_LIFETIME;
        let old = a.perms.insert(peer.ip(), perm_expires);
        self.deadlines
            .set(old, perm_expires, Timer::Permission(id, peer.ip()));
        Ok(encode(
            METHOD_CHANNEL_BIND,
            CLASS_SUCCESS_RESPONSE,
            m.transaction_id.0,
            &[],
            Some(&auth.key),
        ))
    }

    fn send_indication(&mut self, m: &Message, five: FiveTuple, now: Instant) {
        let Some(&id) = self.by_five.get(&five) else {
            return;
        };
        let Some(peer) = attr_bytes(m, ATTR_XOR_PEER_ADDRESS)
            .and_then(|v| decode_xor_addr(v, &m.transaction_id.0))
        else {
            return;
        };
        let Some(data) = attr_bytes(m, ATTR_DATA) else {
            return;
        };
        // Permissions are per IP address; the port is checked here.
        let own = self.allocs.get(&id).is_some_and(|a| self.is_own(a, peer));
        if own {
            self.metrics.peer_denied();
            return;
        }
        let max_bps = self.cfg.max_bps;
        let Some(a) = self.allocs.get_mut(&id) else {
            return;
        };
        // Out through the relay of the peer's family (a permission implies one).
        let Some(handle) = a.relay(Family::of(peer.ip())).map(|r| r.handle.clone()) else {
            return;
        };
        if !permitted(a, peer.ip(), now) || !take(&mut a.bucket, max_bps, data.len(), now) {
            self.metrics
                .dropped(five.transport, "no_permission_or_rate");
            return;
        }
        self.metrics.to_peer(five.transport, data.len());
        self.commands.push_back(Command::SendToPeer {
            handle,
            peer,
            data: data.to_vec(),
        });
    }

    /// ChannelData from the client: where to send `len` payload bytes, if anywhere.
    /// The hot path: lookups only, nothing queued, nothing allocated.
    pub fn channel_data(
        &mut self,
        five: &FiveTuple,
        channel: u16,
        len: usize,
        now: Instant,
    ) -> Option<(H, SocketAddr)> {
        if !CHANNELS.contains(&channel) {
            return None;
        }
        let max_bps = self.cfg.max_bps;
        let id = *self.by_five.get(five)?;
        let a = self.allocs.get_mut(&id)?;
        let (peer, exp) = *a.channels.get(&channel)?;
        if exp <= now || !permitted(a, peer.ip(), now) || !take(&mut a.bucket, max_bps, len, now) {
            self.metrics
                .dropped(five.transport, "no_permission_or_rate");
            return None;
        }
        // Out through the relay of the peer's family; a channel exists only while
        // that relay does.
        let handle = a.relay(Family::of(peer.ip()))?.handle.clone();
        self.metrics.to_peer(five.transport, len);
        Some((handle, peer))
    }

    /// A datagram of `len` bytes from `peer` arrived on allocation `id`'s relay
    /// socket: how it reaches the client, if at all. The hot path, like
    /// [`Core::channel_data`].
    pub fn from_peer(
        &mut self,
        id: AllocationId,
        peer: SocketAddr,
        len: usize,
        now: Instant,
    ) -> Option<ToClient> {
        let max_bps = self.cfg.max_bps;
        let a = self.allocs.get_mut(&id)?;
        let transport = a.five.transport;
        if !permitted(a, peer.ip(), now) || !take(&mut a.bucket, max_bps, len, now) {
            self.metrics.dropped(transport, "no_permission_or_rate");
            return None;
        }
        let via = match a.peer_channels.get(&peer) {
            Some(n) if a.channels.get(n).is_some_and(|(_, exp)| *exp > now) => {
                ToClient::Channel(*n)
            }
            _ => ToClient::DataIndication,
        };
        self.metrics.to_client(transport, len);
        Some(via)
    }

    /// Removes allocation `id` with its deadlines; queues the freeing of its
    /// sockets.
    fn remove(&mut self, id: AllocationId) {
        let Some(a) = self.allocs.remove(&id) else {
            return;
        };
        self.by_five.remove(&a.five);
        self.release_user(&a.username);
        for (i, r) in a.relays.into_iter().enumerate() {
            let Some(r) = r else { continue };
            let family = if i == 0 { Family::V4 } else { Family::V6 };
            self.deadlines.clear(r.expires, Timer::Relay(id, family));
            self.commands
                .push_back(Command::FreeRelaySocket { handle: r.handle });
        }
        for (ip, at) in &a.perms {
            self.deadlines.clear(*at, Timer::Permission(id, *ip));
        }
        for (number, (_, at)) in &a.channels {
            self.deadlines.clear(*at, Timer::Channel(id, *number));
        }
        self.metrics.set_active(self.allocs.len());
    }

    /// Removes the relay of `family` from allocation `id` (expired, or deleted by a
    /// Refresh naming its family), with the permissions and channels only it could
    /// serve; the allocation goes with its last relay.
    fn remove_relay(&mut self, id: AllocationId, family: Family) {
        let Some(a) = self.allocs.get_mut(&id) else {
            return;
        };
        let others = a
            .relays
            .iter()
            .enumerate()
            .any(|(i, r)| i != family.index() && r.is_some());
        if !others {
            return self.remove(id);
        }
        let Some(r) = a.relays[family.index()].take() else {
            return;
        };
        self.deadlines.clear(r.expires, Timer::Relay(id, family));
        self.commands
            .push_back(Command::FreeRelaySocket { handle: r.handle });
        let deadlines = &mut self.deadlines;
        a.perms.retain(|ip, at| {
            let keep = Family::of(*ip) != family;
            if !keep {
                deadlines.clear(*at, Timer::Permission(id, *ip));
            }
            keep
        });
        a.channels.retain(|number, (peer, at)| {
            let keep = Family::of(peer.ip()) != family;
            if !keep {
                deadlines.clear(*at, Timer::Channel(id, *number));
            }
            keep
        });
        a.peer_channels
            .retain(|peer, _| Family::of(peer.ip()) != family);
    }

    /// Frees the relay socket a pending dual allocation had bound already.
    fn free_first(&mut self, p: Pending<H>) {
        if let Some((_, handle)) = p.first {
            self.commands.push_back(Command::FreeRelaySocket { handle });
        }
    }

    fn cancel_pending(&mut self, token: BindToken) {
        if let Some(p) = self.pending.remove(&token) {
            self.pending_by_five.remove(&p.five);
            self.deadlines.clear(p.deadline, Timer::Bind(token));
            self.release_user(&p.username);
            self.free_first(p);
        }
    }

    /// Ends the allocation (or pending Allocate) of a client connection that closed
    /// (TCP/TLS).
    pub fn client_gone(&mut self, five: &FiveTuple) {
        if let Some(id) = self.by_five.get(five).copied() {
            self.remove(id);
        }
        if let Some(token) = self.pending_by_five.get(five).copied() {
            self.cancel_pending(token);
        }
    }

    /// Like [`Core::peer_gone`], and from now on refuses (401) REST credentials that
    /// carry `peer_id`: a host removed the peer.
    pub fn peer_revoked(&mut self, peer_id: &str, now: Instant) -> usize {
        while self.revoked.front().is_some_and(|(until, _)| *until <= now)
            || self.revoked.len() >= MAX_REVOKED
        {
            self.revoked.pop_front();
        }
        self.revoked
            .push_back((now + REVOKED_KEEP, peer_id.to_owned()));
        self.peer_gone(peer_id)
    }

    /// Removes every allocation (and pending Allocate) made with a REST username
    /// carrying `peer_id`; returns how many.
    pub fn peer_gone(&mut self, peer_id: &str) -> usize {
        let ids: Vec<AllocationId> = self
            .allocs
            .iter()
            .filter(|(_, a)| a.peer_id.as_deref() == Some(peer_id))
            .map(|(id, _)| *id)
            .collect();
        let tokens: Vec<BindToken> = self
            .pending
            .iter()
            .filter(|(_, p)| p.peer_id.as_deref() == Some(peer_id))
            .map(|(t, _)| *t)
            .collect();
        for id in &ids {
            self.remove(*id);
        }
        for t in &tokens {
            self.cancel_pending(*t);
        }
        ids.len() + tokens.len()
    }

    /// Forgets every allocation, pending Allocate and cached answer, dropping queued
    /// commands and queuing [`Command::FreeRelaySocket`] for every relay socket. The
    /// way back to consistent tables after a panic interrupted a change to them.
    pub fn reset(&mut self) {
        self.commands.clear();
        let ids: Vec<AllocationId> = self.allocs.keys().copied().collect();
        for id in ids {
            self.remove(id);
        }
        self.allocs.clear();
        self.by_five.clear();
        let pending: Vec<Pending<H>> = self.pending.drain().map(|(_, p)| p).collect();
        for p in pending {
            self.free_first(p);
        }
        self.pending_by_five.clear();
        self.per_user.clear();
        self.cache.clear();
        self.cache_order.clear();
        self.deadlines = Deadlines::default();
        self.metrics.set_active(0);
    }
}

fn permitted<H>(a: &Allocation<H>, ip: IpAddr, now: Instant) -> bool {
    a.perms.get(&ip).is_some_and(|exp| *exp > now)
}

/// Token bucket: `max_bps` bytes per second with one second of burst.
fn take(b: &mut Bucket, max_bps: u64, len: usize, now: Instant) -> bool {
    if max_bps == 0 {
        return true;
    }
    let elapsed = now.saturating_duration_since(b.last);
    let ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
    if ms > 0 {
        b.tokens = b
            .tokens
            .saturating_add(ms.saturating_mul(max_bps) / 1000)
            .min(max_bps);
        // Whole milliseconds only, so no fraction of a token is lost.
        b.last += Duration::from_millis(ms);
    }
    let len = len as u64;
    if b.tokens >= len {
        b.tokens -= len;
        true
    } else {
        false
    }
}
