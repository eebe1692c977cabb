//! The STUN/TURN state machine (RFC 8489, RFC 8656, RFC 6156): allocations,
//! permissions, channels, long-term authentication, quotas and the retransmission
//! cache. Pure: no sockets, no clock; `now_ms` (Unix milliseconds) is passed in and
//! answers come back as values. Relay sockets are obtained through [`RelaySockets`],
//! which the IO layer implements with real UDP sockets and tests with fakes.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};

use stun::agent::TransactionId;
use stun::attributes::*;
use stun::error_code::{ErrorCode, ErrorCodeAttribute};
use stun::fingerprint::FINGERPRINT;
use stun::integrity::MessageIntegrity;
use stun::message::*;
use stun::textattrs::TextAttribute;
use stun::xoraddr::XorMappedAddress;

use super::auth::{CredError, Credentials, NonceCheck, Nonces};
use super::policy::PeerPolicy;
use super::RelayMetrics;

pub const DEFAULT_ALLOCATION_LIFETIME_S: u64 = 600;
pub const PERMISSION_LIFETIME_MS: u64 = 300_000;
pub const CHANNEL_LIFETIME_MS: u64 = 600_000;
/// How long answers are kept for retransmitted requests (a UDP client gives up
/// after 39.5 s, RFC 8489 section 6.2.1).
pub const RETRANSMIT_TTL_MS: u64 = 40_000;
const RETRANSMIT_CACHE_MAX: usize = 20_000;
const SOFTWARE: &str = "meshmeet";

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
}

/// Source of relay sockets. `bind` returns the address to advertise in
/// XOR-RELAYED-ADDRESS and a handle the IO layer uses to send; `close` is called
/// once when the allocation ends. `even_port` asks for an even port number.
pub trait RelaySockets {
    type Handle: Clone;
    fn has_family(&self, family: Family) -> bool;
    fn bind(&mut self, family: Family, even_port: bool) -> Option<(SocketAddr, Self::Handle)>;
    fn close(&mut self, handle: &Self::Handle);
}

/// Settings of the core (from `[turn]`).
pub struct CoreConfig {
    pub max_lifetime_s: u64,
    pub user_quota: usize,
    pub total_quota: usize,
    /// Bytes per second per allocation; 0 = unlimited.
    pub max_bps: u64,
    pub policy: PeerPolicy,
}

/// What to do with a STUN message.
#[derive(Debug)]
pub enum Handled<H> {
    /// Send this to the client.
    Reply(Vec<u8>),
    /// A new allocation: send the reply, then start relaying on `handle`.
    Allocated {
        reply: Vec<u8>,
        id: u64,
        relay: SocketAddr,
        handle: H,
    },
    /// A Send indication: send `data` from the relay socket to `peer`.
    Forward {
        handle: H,
        peer: SocketAddr,
        data: Vec<u8>,
    },
    /// Nothing to send (dropped indication, response, garbage).
    Nothing,
}

/// How a datagram from a peer reaches the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToClient {
    Channel(u16),
    DataIndication,
}

struct Bucket {
    tokens: u64,
    last_ms: u64,
}

struct Allocation<H> {
    five: FiveTuple,
    username: String,
    peer_id: Option<String>,
    key: Vec<u8>,
    relay: SocketAddr,
    handle: H,
    expires_ms: u64,
    perms: HashMap<IpAddr, u64>,
    channels: HashMap<u16, (SocketAddr, u64)>,
    peer_channels: HashMap<SocketAddr, u16>,
    bucket: Bucket,
}

/// The relay state machine.
pub struct Core<S: RelaySockets> {
    cfg: CoreConfig,
    creds: Credentials,
    nonces: Nonces,
    sockets: S,
    metrics: RelayMetrics,
    next_id: u64,
    allocs: HashMap<u64, Allocation<S::Handle>>,
    by_five: HashMap<FiveTuple, u64>,
    per_user: HashMap<String, usize>,
    cache: HashMap<(FiveTuple, [u8; 12]), (u64, Vec<u8>)>,
    cache_order: VecDeque<(u64, FiveTuple, [u8; 12])>,
}

/// A request error: code, reason, and whether the answer carries integrity.
struct Fail {
    code: u16,
    reason: &'static str,
    unknown: Vec<AttrType>,
}

fn fail(code: u16, reason: &'static str) -> Fail {
    Fail {
        code,
        reason,
        unknown: Vec::new(),
    }
}

fn peer_family_ok(relay: SocketAddr, peer: SocketAddr) -> bool {
    Family::of(relay.ip()) == Family::of(peer.ip())
}

/// Decodes one XOR-PEER-ADDRESS (or any XOR address) value.
fn decode_xor_addr(v: &[u8], txid: &[u8; 12]) -> Option<SocketAddr> {
    if v.len() < 4 {
        return None;
    }
    let port = u16::from_be_bytes([v[2], v[3]]) ^ 0x2112;
    let cookie = MAGIC_COOKIE.to_be_bytes();
    match v[1] {
        0x01 if v.len() == 8 => {
            let mut ip = [0u8; 4];
            for i in 0..4 {
                ip[i] = v[4 + i] ^ cookie[i];
            }
            Some(SocketAddr::new(IpAddr::from(ip), port))
        }
        0x02 if v.len() == 20 => {
            let mut ip = [0u8; 16];
            for i in 0..16 {
                let k = if i < 4 { cookie[i] } else { txid[i - 4] };
                ip[i] = v[4 + i] ^ k;
            }
            Some(SocketAddr::new(IpAddr::from(ip), port))
        }
        _ => None,
    }
}

fn known_attr(t: AttrType) -> bool {
    t.0 >= 0x8000
        || matches!(
            t,
            ATTR_MAPPED_ADDRESS
                | ATTR_USERNAME
                | ATTR_MESSAGE_INTEGRITY
                | ATTR_ERROR_CODE
                | ATTR_REALM
                | ATTR_NONCE
                | ATTR_XORMAPPED_ADDRESS
                | ATTR_CHANNEL_NUMBER
                | ATTR_LIFETIME
                | ATTR_XOR_PEER_ADDRESS
                | ATTR_DATA
                | ATTR_REQUESTED_TRANSPORT
                | ATTR_DONT_FRAGMENT
                | ATTR_REQUESTED_ADDRESS_FAMILY
                | ATTR_PRIORITY
                | ATTR_USE_CANDIDATE
                | ATTR_MESSAGE_INTEGRITY_SHA256
                | ATTR_PASSWORD_ALGORITHM
                | ATTR_USER_HASH
                | ATTR_PADDING
                | ATTR_EVEN_PORT
        )
}

/// Builds an encoded STUN message; `key` adds MESSAGE-INTEGRITY; FINGERPRINT always.
fn encode(
    method: Method,
    class: MessageClass,
    txid: [u8; 12],
    attrs: &[&dyn Setter],
    key: Option<&[u8]>,
) -> Vec<u8> {
    let mut m = Message::new();
    m.typ = MessageType::new(method, class);
    m.transaction_id = TransactionId(txid);
    m.write_header();
    for a in attrs {
        // Setters only fail on oversized values, which we never build.
        let _ = a.add_to(&mut m);
    }
    let _ = TextAttribute::new(ATTR_SOFTWARE, SOFTWARE.into()).add_to(&mut m);
    if let Some(k) = key {
        let _ = MessageIntegrity(k.to_vec()).add_to(&mut m);
    }
    let _ = FINGERPRINT.add_to(&mut m);
    m.raw
}

fn attr_bytes(m: &Message, t: AttrType) -> Option<&[u8]> {
    m.attributes
        .0
        .iter()
        .find(|a| a.typ == t)
        .map(|a| a.value.as_slice())
}

fn attr_text(m: &Message, t: AttrType, max: usize) -> Option<Result<String, ()>> {
    let v = attr_bytes(m, t)?;
    if v.len() > max {
        return Some(Err(()));
    }
    Some(String::from_utf8(v.to_vec()).map_err(|_| ()))
}

/// A request that passed authentication.
struct Authed {
    username: String,
    key: Vec<u8>,
    expiry: Option<u64>,
    peer_id: Option<String>,
}

impl<S: RelaySockets> Core<S> {
    pub fn new(
        cfg: CoreConfig,
        creds: Credentials,
        nonces: Nonces,
        sockets: S,
        metrics: RelayMetrics,
    ) -> Self {
        Core {
            cfg,
            creds,
            nonces,
            sockets,
            metrics,
            next_id: 1,
            allocs: HashMap::new(),
            by_five: HashMap::new(),
            per_user: HashMap::new(),
            cache: HashMap::new(),
            cache_order: VecDeque::new(),
        }
    }

    pub fn allocation_count(&self) -> usize {
        self.allocs.len()
    }

    /// The allocation made from `five`, if any: its id and relayed address.
    pub fn allocation_of(&self, five: &FiveTuple) -> Option<(u64, SocketAddr)> {
        let id = *self.by_five.get(five)?;
        self.allocs.get(&id).map(|a| (id, a.relay))
    }

    /// Handles a STUN message from the client side.
    pub fn handle_stun(&mut self, buf: &[u8], five: FiveTuple, now_ms: u64) -> Handled<S::Handle> {
        let mut m = Message::new();
        if m.unmarshal_binary(buf).is_err() {
            return Handled::Nothing;
        }
        if m.contains(ATTR_FINGERPRINT) && FINGERPRINT.check(&m).is_err() {
            return Handled::Nothing;
        }
        let txid = m.transaction_id.0;
        match m.typ.class {
            CLASS_REQUEST => {}
            CLASS_INDICATION => {
                if m.typ.method == METHOD_SEND {
                    return self.send_indication(&m, five, now_ms);
                }
                return Handled::Nothing;
            }
            _ => return Handled::Nothing,
        }
        let method = m.typ.method;
        if method == METHOD_BINDING {
            return self.binding(&m, five);
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
            return Handled::Reply(e);
        }
        // A retransmission gets the very same answer.
        if let Some((exp, bytes)) = self.cache.get(&(five, txid)) {
            if *exp > now_ms {
                return Handled::Reply(bytes.clone());
            }
        }
        let auth = match self.authenticate(&mut m, five, now_ms) {
            Ok(a) => a,
            Err(reply) => return Handled::Reply(reply),
        };
        let result = match method {
            METHOD_ALLOCATE => self.allocate(&m, five, &auth, now_ms),
            METHOD_REFRESH => self.refresh(&m, five, &auth, now_ms).map(|r| (r, None)),
            METHOD_CREATE_PERMISSION => self
                .create_permission(&m, five, &auth, now_ms)
                .map(|r| (r, None)),
            _ => self
                .channel_bind(&m, five, &auth, now_ms)
                .map(|r| (r, None)),
        };
        let (reply, alloc) = match result {
            Ok(r) => r,
            Err(f) if f.code == 401 => {
                // Expired REST credentials: challenge again, like any bad credential.
                self.metrics.refused(401);
                return Handled::Reply(self.challenge(&m, five, 401, "Unauthorized", now_ms));
            }
            Err(f) => {
                if method == METHOD_ALLOCATE {
                    self.metrics.refused(f.code);
                }
                let mut attrs: Vec<&dyn Setter> = Vec::new();
                let ec = ErrorCodeAttribute {
                    code: ErrorCode(f.code),
                    reason: f.reason.as_bytes().to_vec(),
                };
                attrs.push(&ec);
                let unknown = stun::uattrs::UnknownAttributes(f.unknown.clone());
                if !f.unknown.is_empty() {
                    attrs.push(&unknown);
                }
                (
                    encode(method, CLASS_ERROR_RESPONSE, txid, &attrs, Some(&auth.key)),
                    None,
                )
            }
        };
        self.remember(five, txid, &reply, now_ms);
        match alloc {
            Some((id, relay, handle)) => Handled::Allocated {
                reply,
                id,
                relay,
                handle,
            },
            None => Handled::Reply(reply),
        }
    }

    fn remember(&mut self, five: FiveTuple, txid: [u8; 12], reply: &[u8], now_ms: u64) {
        while self.cache.len() >= RETRANSMIT_CACHE_MAX {
            match self.cache_order.pop_front() {
                Some((_, f, t)) => {
                    self.cache.remove(&(f, t));
                }
                None => break,
            }
        }
        let exp = now_ms + RETRANSMIT_TTL_MS;
        self.cache.insert((five, txid), (exp, reply.to_vec()));
        self.cache_order.push_back((exp, five, txid));
    }

    fn binding(&mut self, m: &Message, five: FiveTuple) -> Handled<S::Handle> {
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
            return Handled::Reply(encode(
                METHOD_BINDING,
                CLASS_ERROR_RESPONSE,
                m.transaction_id.0,
                &[&ec, &ua],
                None,
            ));
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
        Handled::Reply(encode(
            METHOD_BINDING,
            CLASS_SUCCESS_RESPONSE,
            m.transaction_id.0,
            &[&xor, &mapped],
            None,
        ))
    }

    fn challenge(
        &self,
        m: &Message,
        five: FiveTuple,
        code: u16,
        reason: &str,
        now_ms: u64,
    ) -> Vec<u8> {
        let ec = ErrorCodeAttribute {
            code: ErrorCode(code),
            reason: reason.as_bytes().to_vec(),
        };
        let realm = TextAttribute::new(ATTR_REALM, self.creds.realm().to_string());
        let nonce = TextAttribute::new(ATTR_NONCE, self.nonces.issue(now_ms, five.client));
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
        now_ms: u64,
    ) -> Result<Authed, Vec<u8>> {
        if !m.contains(ATTR_MESSAGE_INTEGRITY) {
            return Err(self.challenge(m, five, 401, "Unauthorized", now_ms));
        }
        let username = attr_text(m, ATTR_USERNAME, 513);
        let realm = attr_text(m, ATTR_REALM, 763);
        let nonce = attr_text(m, ATTR_NONCE, 763);
        let (Some(Ok(username)), Some(Ok(_realm)), Some(Ok(nonce))) = (username, realm, nonce)
        else {
            self.metrics.auth_failure("bad_request");
            return Err(self.bad_request(m));
        };
        match self.nonces.check(&nonce, now_ms, five.client) {
            NonceCheck::Fresh => {}
            NonceCheck::Stale | NonceCheck::Invalid => {
                self.metrics.auth_failure("stale_nonce");
                return Err(self.challenge(m, five, 438, "Stale Nonce", now_ms));
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
                    return Err(self.challenge(m, five, 401, "Unauthorized", now_ms));
                }
            },
        };
        if MessageIntegrity(key.clone()).check(m).is_err() {
            self.metrics.auth_failure("bad_integrity");
            return Err(self.challenge(m, five, 401, "Unauthorized", now_ms));
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

    fn lifetime_ms(&self, m: &Message) -> Result<Option<u64>, Fail> {
        let Some(v) = attr_bytes(m, ATTR_LIFETIME) else {
            return Ok(None);
        };
        if v.len() != 4 {
            return Err(fail(400, "Bad LIFETIME"));
        }
        let req = u32::from_be_bytes([v[0], v[1], v[2], v[3]]) as u64;
        Ok(Some(req))
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
    fn granted_lifetime_s(&self, requested: Option<u64>) -> u64 {
        let max = self.cfg.max_lifetime_s;
        let default = DEFAULT_ALLOCATION_LIFETIME_S.min(max);
        match requested {
            Some(r) => r.min(max).max(default),
            None => default,
        }
    }

    fn allocation_mut(&mut self, five: &FiveTuple, auth: &Authed) -> Result<u64, Fail> {
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

    #[allow(clippy::type_complexity)]
    fn allocate(
        &mut self,
        m: &Message,
        five: FiveTuple,
        auth: &Authed,
        now_ms: u64,
    ) -> Result<(Vec<u8>, Option<(u64, SocketAddr, S::Handle)>), Fail> {
        let txid = m.transaction_id.0;
        if self.by_five.contains_key(&five) {
            // Same transaction id was answered from the cache; a new one is a mismatch.
            return Err(fail(437, "Allocation Mismatch"));
        }
        if let Some(exp) = auth.expiry {
            if exp.saturating_mul(1000) <= now_ms {
                self.metrics.auth_failure("expired");
                return Err(fail(401, "Unauthorized"));
            }
        }
        Self::check_unknown(m)?;
        // EVEN-PORT without reservation is honoured (some clients send it at random);
        // reservations (R bit, RESERVATION-TOKEN) are not implemented: 420.
        let even = match attr_bytes(m, ATTR_EVEN_PORT) {
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
        let family = Self::requested_family(m)?.unwrap_or(Family::V4);
        if !self.sockets.has_family(family) {
            return Err(fail(440, "Address Family not Supported"));
        }
        let lifetime_s = self.granted_lifetime_s(self.lifetime_ms(m)?);
        let used = self.per_user.get(&auth.username).copied().unwrap_or(0);
        if used >= self.cfg.user_quota {
            return Err(fail(486, "Allocation Quota Reached"));
        }
        if self.allocs.len() >= self.cfg.total_quota {
            return Err(fail(508, "Insufficient Capacity"));
        }
        let Some((relay, handle)) = self.sockets.bind(family, even) else {
            return Err(fail(508, "Insufficient Capacity"));
        };
        let id = self.next_id;
        self.next_id += 1;
        self.allocs.insert(
            id,
            Allocation {
                five,
                username: auth.username.clone(),
                peer_id: auth.peer_id.clone(),
                key: auth.key.clone(),
                relay,
                handle: handle.clone(),
                expires_ms: now_ms + lifetime_s * 1000,
                perms: HashMap::new(),
                channels: HashMap::new(),
                peer_channels: HashMap::new(),
                bucket: Bucket {
                    tokens: self.cfg.max_bps,
                    last_ms: now_ms,
                },
            },
        );
        self.by_five.insert(five, id);
        *self.per_user.entry(auth.username.clone()).or_insert(0) += 1;
        self.metrics.allocation_created(five.transport);
        self.metrics.set_active(self.allocs.len());
        let relayed = XorMappedAddress {
            ip: relay.ip(),
            port: relay.port(),
        };
        let mapped = XorMappedAddress {
            ip: five.client.ip(),
            port: five.client.port(),
        };
        let lifetime = turn::proto::lifetime::Lifetime(std::time::Duration::from_secs(lifetime_s));
        let relayed_attr = RelayedSetter(relayed);
        let reply = encode(
            METHOD_ALLOCATE,
            CLASS_SUCCESS_RESPONSE,
            txid,
            &[&relayed_attr, &lifetime, &mapped],
            Some(&auth.key),
        );
        Ok((reply, Some((id, relay, handle))))
    }

    fn refresh(
        &mut self,
        m: &Message,
        five: FiveTuple,
        auth: &Authed,
        now_ms: u64,
    ) -> Result<Vec<u8>, Fail> {
        let id = self.allocation_mut(&five, auth)?;
        Self::check_unknown(m)?;
        if let Some(fam) = Self::requested_family(m)? {
            let relay = self.allocs.get(&id).map(|a| a.relay);
            if relay.map(|r| Family::of(r.ip())) != Some(fam) {
                return Err(fail(443, "Peer Address Family Mismatch"));
            }
        }
        let requested = self.lifetime_ms(m)?;
        let lifetime_s = if requested == Some(0) {
            self.remove(id);
            0
        } else {
            let s = self.granted_lifetime_s(requested);
            if let Some(a) = self.allocs.get_mut(&id) {
                a.expires_ms = now_ms + s * 1000;
            }
            s
        };
        let lifetime = turn::proto::lifetime::Lifetime(std::time::Duration::from_secs(lifetime_s));
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

    fn check_peer(&self, relay: SocketAddr, peer: SocketAddr) -> Result<(), Fail> {
        if !peer_family_ok(relay, peer) {
            return Err(fail(443, "Peer Address Family Mismatch"));
        }
        if !self.cfg.policy.permits(peer.ip()) {
            self.metrics.peer_denied();
            return Err(fail(403, "Forbidden"));
        }
        Ok(())
    }

    fn create_permission(
        &mut self,
        m: &Message,
        five: FiveTuple,
        auth: &Authed,
        now_ms: u64,
    ) -> Result<Vec<u8>, Fail> {
        let id = self.allocation_mut(&five, auth)?;
        Self::check_unknown(m)?;
        let peers = Self::peers(m)?;
        let relay = self
            .allocs
            .get(&id)
            .map(|a| a.relay)
            .ok_or(fail(437, "Allocation Mismatch"))?;
        // All or nothing: any refused peer refuses the request.
        for p in &peers {
            self.check_peer(relay, *p)?;
        }
        if let Some(a) = self.allocs.get_mut(&id) {
            for p in peers {
                a.perms.insert(p.ip(), now_ms + PERMISSION_LIFETIME_MS);
            }
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
        now_ms: u64,
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
        // RFC 5766 range: RFC 8656 narrowed it to 0x4FFF, but deployed clients (coturn's
        // included) still pick numbers up to 0x7FFF.
        if !(0x4000..=0x7FFF).contains(&number) {
            return Err(fail(400, "Channel Number out of range"));
        }
        let peers = Self::peers(m)?;
        if peers.len() != 1 {
            return Err(fail(400, "One XOR-PEER-ADDRESS expected"));
        }
        let peer = peers[0];
        let relay = self
            .allocs
            .get(&id)
            .map(|a| a.relay)
            .ok_or(fail(437, "Allocation Mismatch"))?;
        self.check_peer(relay, peer)?;
        let a = self
            .allocs
            .get_mut(&id)
            .ok_or(fail(437, "Allocation Mismatch"))?;
        if let Some((bound, _)) = a.channels.get(&number) {
            if *bound != peer {
                return Err(fail(400, "Channel bound to another peer"));
            }
        }
        if let Some(n) = a.peer_channels.get(&peer) {
            if *n != number {
                return Err(fail(400, "Peer bound to another channel"));
            }
        }
        a.channels
            .insert(number, (peer, now_ms + CHANNEL_LIFETIME_MS));
        a.peer_channels.insert(peer, number);
        a.perms.insert(peer.ip(), now_ms + PERMISSION_LIFETIME_MS);
        Ok(encode(
            METHOD_CHANNEL_BIND,
            CLASS_SUCCESS_RESPONSE,
            m.transaction_id.0,
            &[],
            Some(&auth.key),
        ))
    }

    fn send_indication(&mut self, m: &Message, five: FiveTuple, now_ms: u64) -> Handled<S::Handle> {
        let Some(&id) = self.by_five.get(&five) else {
            return Handled::Nothing;
        };
        let Some(peer) = attr_bytes(m, ATTR_XOR_PEER_ADDRESS)
            .and_then(|v| decode_xor_addr(v, &m.transaction_id.0))
        else {
            return Handled::Nothing;
        };
        let Some(data) = attr_bytes(m, ATTR_DATA) else {
            return Handled::Nothing;
        };
        let max_bps = self.cfg.max_bps;
        let Some(a) = self.allocs.get_mut(&id) else {
            return Handled::Nothing;
        };
        if !permitted(a, peer.ip(), now_ms) || !take(&mut a.bucket, max_bps, data.len(), now_ms) {
            self.metrics
                .dropped(five.transport, "no_permission_or_rate");
            return Handled::Nothing;
        }
        self.metrics.to_peer(five.transport, data.len());
        Handled::Forward {
            handle: a.handle.clone(),
            peer,
            data: data.to_vec(),
        }
    }

    /// ChannelData from the client: where to send `len` payload bytes, if anywhere.
    pub fn channel_data(
        &mut self,
        five: &FiveTuple,
        channel: u16,
        len: usize,
        now_ms: u64,
    ) -> Option<(S::Handle, SocketAddr)> {
        let max_bps = self.cfg.max_bps;
        let id = *self.by_five.get(five)?;
        let a = self.allocs.get_mut(&id)?;
        let (peer, exp) = *a.channels.get(&channel)?;
        if exp <= now_ms
            || !permitted(a, peer.ip(), now_ms)
            || !take(&mut a.bucket, max_bps, len, now_ms)
        {
            self.metrics
                .dropped(five.transport, "no_permission_or_rate");
            return None;
        }
        self.metrics.to_peer(five.transport, len);
        Some((a.handle.clone(), peer))
    }

    /// A datagram from `peer` arrived on allocation `id`'s relay socket.
    pub fn from_peer(
        &mut self,
        id: u64,
        peer: SocketAddr,
        len: usize,
        now_ms: u64,
    ) -> Option<ToClient> {
        let max_bps = self.cfg.max_bps;
        let a = self.allocs.get_mut(&id)?;
        let transport = a.five.transport;
        if !permitted(a, peer.ip(), now_ms) || !take(&mut a.bucket, max_bps, len, now_ms) {
            self.metrics.dropped(transport, "no_permission_or_rate");
            return None;
        }
        let via = match a.peer_channels.get(&peer) {
            Some(n) if a.channels.get(n).is_some_and(|(_, exp)| *exp > now_ms) => {
                ToClient::Channel(*n)
            }
            _ => ToClient::DataIndication,
        };
        self.metrics.to_client(transport, len);
        Some(via)
    }

    /// Whether allocation `id` still exists.
    pub fn alive(&self, id: u64) -> bool {
        self.allocs.contains_key(&id)
    }

    fn remove(&mut self, id: u64) {
        if let Some(a) = self.allocs.remove(&id) {
            self.by_five.remove(&a.five);
            if let Some(n) = self.per_user.get_mut(&a.username) {
                *n -= 1;
                if *n == 0 {
                    self.per_user.remove(&a.username);
                }
            }
            self.sockets.close(&a.handle);
            self.metrics.set_active(self.allocs.len());
        }
    }

    /// Ends the allocation of a client connection that closed (TCP/TLS).
    pub fn client_gone(&mut self, five: &FiveTuple) {
        if let Some(id) = self.by_five.get(five).copied() {
            self.remove(id);
        }
    }

    /// Removes every allocation made with a REST username carrying `peer_id`.
    pub fn peer_gone(&mut self, peer_id: &str) -> usize {
        let ids: Vec<u64> = self
            .allocs
            .iter()
            .filter(|(_, a)| a.peer_id.as_deref() == Some(peer_id))
            .map(|(id, _)| *id)
            .collect();
        for id in &ids {
            self.remove(*id);
        }
        ids.len()
    }

    /// Drops expired allocations, permissions, channels and cached answers.
    pub fn expire(&mut self, now_ms: u64) {
        let dead: Vec<u64> = self
            .allocs
            .iter()
            .filter(|(_, a)| a.expires_ms <= now_ms)
            .map(|(id, _)| *id)
            .collect();
        for id in dead {
            self.remove(id);
        }
        for a in self.allocs.values_mut() {
            a.perms.retain(|_, exp| *exp > now_ms);
            a.channels.retain(|_, (_, exp)| *exp > now_ms);
            let channels = &a.channels;
            a.peer_channels.retain(|_, n| channels.contains_key(n));
        }
        while let Some((exp, f, t)) = self.cache_order.front().copied() {
            if exp > now_ms {
                break;
            }
            self.cache_order.pop_front();
            if self.cache.get(&(f, t)).is_some_and(|(e, _)| *e <= now_ms) {
                self.cache.remove(&(f, t));
            }
        }
    }

    #[cfg(test)]
    fn cache_len(&self) -> usize {
        self.cache.len()
    }
}

fn permitted<H>(a: &Allocation<H>, ip: IpAddr, now_ms: u64) -> bool {
    a.perms.get(&ip).is_some_and(|exp| *exp > now_ms)
}

/// Token bucket: `max_bps` bytes per second with one second of burst.
fn take(b: &mut Bucket, max_bps: u64, len: usize, now_ms: u64) -> bool {
    if max_bps == 0 {
        return true;
    }
    let elapsed = now_ms.saturating_sub(b.last_ms);
    if elapsed > 0 {
        b.tokens = (b.tokens + elapsed * max_bps / 1000).min(max_bps);
        b.last_ms = now_ms;
    }
    let len = len as u64;
    if b.tokens >= len {
        b.tokens -= len;
        true
    } else {
        false
    }
}

/// XOR-RELAYED-ADDRESS setter.
struct RelayedSetter(XorMappedAddress);

impl Setter for RelayedSetter {
    fn add_to(&self, m: &mut Message) -> Result<(), stun::Error> {
        self.0.add_to_as(m, ATTR_XOR_RELAYED_ADDRESS)
    }
}

/// Builds a Data indication carrying `data` from `peer`.
pub fn data_indication(peer: SocketAddr, data: &[u8]) -> Vec<u8> {
    let mut txid = [0u8; 12];
    rand::Rng::fill(&mut rand::thread_rng(), &mut txid);
    let mut m = Message::new();
    m.typ = MessageType::new(METHOD_DATA, CLASS_INDICATION);
    m.transaction_id = TransactionId(txid);
    m.write_header();
    let _ = XorMappedAddress {
        ip: peer.ip(),
        port: peer.port(),
    }
    .add_to_as(&mut m, ATTR_XOR_PEER_ADDRESS);
    m.add(ATTR_DATA, data);
    m.raw
}

#[cfg(test)]
mod tests {
    use super::super::auth::long_term_key;
    use super::*;
    use stun::agent::TransactionId;

    const SECRET: &str = "core-test-secret-0123";
    const T0: u64 = 1_800_000_000_000; // a virtual "now" in Unix ms

    #[derive(Default)]
    struct FakeSockets {
        next: u16,
        closed: Vec<u32>,
        no_v6: bool,
        exhausted: bool,
    }

    impl RelaySockets for FakeSockets {
        type Handle = u32;
        fn has_family(&self, family: Family) -> bool {
            !(family == Family::V6 && self.no_v6)
        }
        fn bind(&mut self, family: Family, even: bool) -> Option<(SocketAddr, u32)> {
            if self.exhausted {
                return None;
            }
            self.next += if even { 2 } else { 1 };
            let ip: IpAddr = match family {
                Family::V4 => "192.0.2.10".parse().unwrap(),
                Family::V6 => "2001:db8::10".parse().unwrap(),
            };
            let port = 50_000 + self.next * 2;
            Some((SocketAddr::new(ip, port), u32::from(self.next)))
        }
        fn close(&mut self, h: &u32) {
            self.closed.push(*h);
        }
    }

    fn core_with(edit: impl FnOnce(&mut CoreConfig)) -> Core<FakeSockets> {
        let mut cfg = CoreConfig {
            max_lifetime_s: 3600,
            user_quota: 10,
            total_quota: 100,
            max_bps: 0,
            policy: PeerPolicy::new(vec![
                "192.0.2.0/24".parse().unwrap(),
                "2001:db8::/32".parse().unwrap(),
            ]),
        };
        edit(&mut cfg);
        let mut users = HashMap::new();
        users.insert("static".to_string(), "static-pw".to_string());
        Core::new(
            cfg,
            Credentials::new(SECRET.into(), "realm".into(), users),
            Nonces::new([1; 32], 600_000),
            FakeSockets::default(),
            RelayMetrics::default(),
        )
    }

    fn core() -> Core<FakeSockets> {
        core_with(|_| {})
    }

    fn five(port: u16) -> FiveTuple {
        FiveTuple {
            client: SocketAddr::new("203.0.113.5".parse().unwrap(), port),
            server: "198.51.100.1:3478".parse().unwrap(),
            transport: Transport::Udp,
        }
    }

    fn rest(id: &str, expiry_s: u64) -> (String, String) {
        let u = format!("{expiry_s}:{id}");
        let p = crate::ice::rest_password(SECRET, &u);
        (u, p)
    }

    struct Peer(SocketAddr);
    impl Setter for Peer {
        fn add_to(&self, m: &mut Message) -> Result<(), stun::Error> {
            XorMappedAddress {
                ip: self.0.ip(),
                port: self.0.port(),
            }
            .add_to_as(m, ATTR_XOR_PEER_ADDRESS)
        }
    }

    struct Raw(AttrType, Vec<u8>);
    impl Setter for Raw {
        fn add_to(&self, m: &mut Message) -> Result<(), stun::Error> {
            m.add(self.0, &self.1);
            Ok(())
        }
    }

    fn transport_udp() -> Raw {
        Raw(ATTR_REQUESTED_TRANSPORT, vec![17, 0, 0, 0])
    }

    fn lifetime(s: u32) -> Raw {
        Raw(ATTR_LIFETIME, s.to_be_bytes().to_vec())
    }

    fn channel(n: u16) -> Raw {
        let b = n.to_be_bytes();
        Raw(ATTR_CHANNEL_NUMBER, vec![b[0], b[1], 0, 0])
    }

    /// A test client: a 5-tuple, credentials and the current nonce.
    struct Client {
        five: FiveTuple,
        user: String,
        pass: String,
        nonce: String,
    }

    impl Client {
        fn new(c: &mut Core<FakeSockets>, port: u16, user: &str, pass: &str, now: u64) -> Client {
            let five = five(port);
            let mut cl = Client {
                five,
                user: user.into(),
                pass: pass.into(),
                nonce: String::new(),
            };
            let r =
                reply(c.handle_stun(&cl.unauth(METHOD_ALLOCATE, &[&transport_udp()]), five, now));
            assert_eq!(code(&r), Some(401));
            cl.nonce = TextAttribute::get_from_as(&r, ATTR_NONCE).unwrap().text;
            cl
        }

        /// A request with a fresh transaction id and `attrs`, not yet authenticated.
        fn request(method: Method, attrs: &[&dyn Setter]) -> Message {
            let mut m = Message::new();
            m.build(&[
                Box::new(TransactionId::new()),
                Box::new(MessageType::new(method, CLASS_REQUEST)),
            ])
            .unwrap();
            for a in attrs {
                a.add_to(&mut m).unwrap();
            }
            m
        }

        fn unauth(&self, method: Method, attrs: &[&dyn Setter]) -> Vec<u8> {
            Self::request(method, attrs).raw
        }

        fn req(&self, method: Method, attrs: &[&dyn Setter]) -> Vec<u8> {
            let mut m = Self::request(method, attrs);
            TextAttribute::new(ATTR_USERNAME, self.user.clone())
                .add_to(&mut m)
                .unwrap();
            TextAttribute::new(ATTR_REALM, "realm".into())
                .add_to(&mut m)
                .unwrap();
            TextAttribute::new(ATTR_NONCE, self.nonce.clone())
                .add_to(&mut m)
                .unwrap();
            MessageIntegrity(long_term_key(&self.user, "realm", &self.pass))
                .add_to(&mut m)
                .unwrap();
            FINGERPRINT.add_to(&mut m).unwrap();
            m.raw
        }

        fn call(
            &self,
            c: &mut Core<FakeSockets>,
            method: Method,
            attrs: &[&dyn Setter],
            now: u64,
        ) -> Message {
            reply(c.handle_stun(&self.req(method, attrs), self.five, now))
        }

        fn allocate(&self, c: &mut Core<FakeSockets>, now: u64) -> Message {
            self.call(c, METHOD_ALLOCATE, &[&transport_udp()], now)
        }
    }

    fn reply(h: Handled<u32>) -> Message {
        let bytes = match h {
            Handled::Reply(b) => b,
            Handled::Allocated { reply, .. } => reply,
            other => panic!("expected a reply, got {other:?}"),
        };
        let mut m = Message::new();
        m.unmarshal_binary(&bytes).unwrap();
        m
    }

    fn code(m: &Message) -> Option<u16> {
        if m.typ.class != CLASS_ERROR_RESPONSE {
            return None;
        }
        let mut e = ErrorCodeAttribute::default();
        e.get_from(m).unwrap();
        Some(e.code.0)
    }

    fn ok(m: &Message) {
        assert_eq!(m.typ.class, CLASS_SUCCESS_RESPONSE, "error {:?}", code(m));
    }

    fn lifetime_of(m: &Message) -> u32 {
        let v = m.get(ATTR_LIFETIME).unwrap();
        u32::from_be_bytes([v[0], v[1], v[2], v[3]])
    }

    fn alice(c: &mut Core<FakeSockets>, port: u16) -> Client {
        let (u, p) = rest("alice", T0 / 1000 + 3600);
        Client::new(c, port, &u, &p, T0)
    }

    fn peer(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn binding_answers_without_state() {
        let mut c = core();
        let cl = Client {
            five: five(1000),
            user: String::new(),
            pass: String::new(),
            nonce: String::new(),
        };
        let r = reply(c.handle_stun(&cl.unauth(METHOD_BINDING, &[]), cl.five, T0));
        ok(&r);
        let mut x = XorMappedAddress::default();
        x.get_from_as(&r, ATTR_XORMAPPED_ADDRESS).unwrap();
        assert_eq!(SocketAddr::new(x.ip, x.port), cl.five.client);
        assert_eq!(c.cache_len(), 0);
        // Unknown comprehension-required attribute: 420 with UNKNOWN-ATTRIBUTES.
        let r = reply(c.handle_stun(
            &cl.unauth(METHOD_BINDING, &[&Raw(AttrType(0x0031), vec![1, 2, 3, 4])]),
            cl.five,
            T0,
        ));
        assert_eq!(code(&r), Some(420));
        assert!(r.contains(ATTR_UNKNOWN_ATTRIBUTES));
    }

    #[test]
    fn unauthenticated_requests_cost_no_state() {
        let mut c = core();
        for port in 1..200 {
            let cl = Client {
                five: five(port),
                user: String::new(),
                pass: String::new(),
                nonce: String::new(),
            };
            let r = reply(c.handle_stun(
                &cl.unauth(METHOD_ALLOCATE, &[&transport_udp()]),
                cl.five,
                T0,
            ));
            assert_eq!(code(&r), Some(401));
            assert!(r.contains(ATTR_REALM) && r.contains(ATTR_NONCE));
            assert!(!r.contains(ATTR_MESSAGE_INTEGRITY));
        }
        assert_eq!(c.cache_len(), 0);
        assert_eq!(c.allocation_count(), 0);
    }

    #[test]
    fn allocation_lifetime_default_cap_and_expiry() {
        let mut c = core();
        let a = alice(&mut c, 1);
        let r = a.allocate(&mut c, T0);
        ok(&r);
        assert_eq!(lifetime_of(&r), 600);
        assert!(r.contains(ATTR_XOR_RELAYED_ADDRESS) && r.contains(ATTR_XORMAPPED_ADDRESS));
        assert!(r.contains(ATTR_MESSAGE_INTEGRITY) && r.contains(ATTR_FINGERPRINT));
        c.expire(T0 + 599_999);
        assert_eq!(c.allocation_count(), 1);
        c.expire(T0 + 600_000);
        assert_eq!(c.allocation_count(), 0);
        assert_eq!(c.sockets.closed.len(), 1);
        // Requested lifetimes are capped by the configured maximum, never below default.
        let b = alice(&mut c, 2);
        let r = b.call(
            &mut c,
            METHOD_ALLOCATE,
            &[&transport_udp(), &lifetime(100_000)],
            T0,
        );
        assert_eq!(lifetime_of(&r), 3600);
        let b = alice(&mut c, 3);
        let r = b.call(
            &mut c,
            METHOD_ALLOCATE,
            &[&transport_udp(), &lifetime(30)],
            T0,
        );
        assert_eq!(lifetime_of(&r), 600);
        let mut c = core_with(|cfg| cfg.max_lifetime_s = 300);
        let a = alice(&mut c, 1);
        assert_eq!(lifetime_of(&a.allocate(&mut c, T0)), 300);
    }

    #[test]
    fn refresh_extends_and_zero_deletes() {
        let mut c = core();
        let a = alice(&mut c, 1);
        ok(&a.allocate(&mut c, T0));
        let r = a.call(&mut c, METHOD_REFRESH, &[&lifetime(1200)], T0 + 500_000);
        ok(&r);
        assert_eq!(lifetime_of(&r), 1200);
        c.expire(T0 + 1_000_000);
        assert_eq!(c.allocation_count(), 1);
        c.expire(T0 + 500_000 + 1_200_000);
        assert_eq!(c.allocation_count(), 0);
        // Lifetime 0 deletes at once and answers LIFETIME 0.
        let b = alice(&mut c, 2);
        ok(&b.allocate(&mut c, T0));
        let r = b.call(&mut c, METHOD_REFRESH, &[&lifetime(0)], T0 + 1);
        ok(&r);
        assert_eq!(lifetime_of(&r), 0);
        assert_eq!(c.allocation_count(), 0);
        // Without an allocation: 437.
        let r = b.call(&mut c, METHOD_REFRESH, &[&lifetime(600)], T0 + 2);
        assert_eq!(code(&r), Some(437));
    }

    #[test]
    fn permissions_expire_after_300_s() {
        let mut c = core();
        let a = alice(&mut c, 1);
        ok(&a.allocate(&mut c, T0));
        let (id, _) = c.allocation_of(&a.five).unwrap();
        let p = peer("192.0.2.77:9000");
        assert_eq!(c.from_peer(id, p, 10, T0), None);
        ok(&a.call(&mut c, METHOD_CREATE_PERMISSION, &[&Peer(p)], T0));
        assert_eq!(
            c.from_peer(id, p, 10, T0 + 1),
            Some(ToClient::DataIndication)
        );
        // Permissions are per IP: another port of the same host is allowed.
        assert_eq!(
            c.from_peer(id, peer("192.0.2.77:1"), 10, T0 + 1),
            Some(ToClient::DataIndication)
        );
        assert_eq!(
            c.from_peer(id, p, 10, T0 + 299_999),
            Some(ToClient::DataIndication)
        );
        assert_eq!(c.from_peer(id, p, 10, T0 + 300_000), None);
        // Send indications need the permission too.
        let send = {
            let mut m = Message::new();
            m.build(&[
                Box::new(TransactionId::new()),
                Box::new(MessageType::new(METHOD_SEND, CLASS_INDICATION)),
            ])
            .unwrap();
            Peer(p).add_to(&mut m).unwrap();
            m.add(ATTR_DATA, b"hi");
            m.raw
        };
        assert!(matches!(
            c.handle_stun(&send, a.five, T0 + 300_000),
            Handled::Nothing
        ));
        ok(&a.call(&mut c, METHOD_CREATE_PERMISSION, &[&Peer(p)], T0 + 300_001));
        match c.handle_stun(&send, a.five, T0 + 300_002) {
            Handled::Forward { peer: to, data, .. } => assert_eq!((to, data), (p, b"hi".to_vec())),
            other => panic!("{other:?}"),
        }
        c.expire(T0 + 700_000);
        assert!(c.allocs.values().all(|a| a.perms.is_empty()));
    }

    #[test]
    fn multi_address_permission_installs_all_or_none() {
        let mut c = core();
        let a = alice(&mut c, 1);
        ok(&a.allocate(&mut c, T0));
        let (id, _) = c.allocation_of(&a.five).unwrap();
        let (p1, p2, p3) = (peer("192.0.2.1:1"), peer("192.0.2.2:2"), peer("8.8.8.8:53"));
        ok(&a.call(
            &mut c,
            METHOD_CREATE_PERMISSION,
            &[&Peer(p1), &Peer(p2), &Peer(p3)],
            T0,
        ));
        for p in [p1, p2, p3] {
            assert!(c.from_peer(id, p, 1, T0).is_some(), "{p}");
        }
        let denied = peer("127.0.0.1:5");
        let other = peer("9.9.9.9:5");
        let r = a.call(
            &mut c,
            METHOD_CREATE_PERMISSION,
            &[&Peer(other), &Peer(denied)],
            T0,
        );
        assert_eq!(code(&r), Some(403));
        assert!(c.from_peer(id, other, 1, T0).is_none());
        assert!(c.from_peer(id, denied, 1, T0).is_none());
        let r = a.call(&mut c, METHOD_CREATE_PERMISSION, &[], T0);
        assert_eq!(code(&r), Some(400));
    }

    #[test]
    fn channels_bind_rules_and_expiry() {
        let mut c = core();
        let mut a = alice(&mut c, 1);
        ok(&a.allocate(&mut c, T0));
        let (id, _) = c.allocation_of(&a.five).unwrap();
        let (p1, p2) = (peer("192.0.2.1:1000"), peer("192.0.2.2:2000"));
        for bad in [0x3FFF, 0x8000, 0xFFFF] {
            let r = a.call(&mut c, METHOD_CHANNEL_BIND, &[&channel(bad), &Peer(p1)], T0);
            assert_eq!(code(&r), Some(400), "{bad:#x}");
        }
        ok(&a.call(
            &mut c,
            METHOD_CHANNEL_BIND,
            &[&channel(0x4000), &Peer(p1)],
            T0,
        ));
        // The bind installs the permission too.
        assert_eq!(c.from_peer(id, p1, 8, T0), Some(ToClient::Channel(0x4000)));
        assert_eq!(c.channel_data(&a.five, 0x4000, 8, T0), Some((1, p1)));
        // Rebinding the same pair refreshes; a different peer or number is refused.
        ok(&a.call(
            &mut c,
            METHOD_CHANNEL_BIND,
            &[&channel(0x4000), &Peer(p1)],
            T0 + 1,
        ));
        assert_eq!(
            code(&a.call(
                &mut c,
                METHOD_CHANNEL_BIND,
                &[&channel(0x4000), &Peer(p2)],
                T0
            )),
            Some(400)
        );
        assert_eq!(
            code(&a.call(
                &mut c,
                METHOD_CHANNEL_BIND,
                &[&channel(0x4001), &Peer(p1)],
                T0
            )),
            Some(400)
        );
        assert_eq!(
            code(&a.call(&mut c, METHOD_CHANNEL_BIND, &[&channel(0x4001)], T0)),
            Some(400)
        );
        assert_eq!(
            code(&a.call(&mut c, METHOD_CHANNEL_BIND, &[&Peer(p1)], T0)),
            Some(400)
        );
        ok(&a.call(
            &mut c,
            METHOD_CHANNEL_BIND,
            &[&channel(0x7FFF), &Peer(p2)],
            T0,
        ));
        // Unknown channel numbers go nowhere.
        assert_eq!(c.channel_data(&a.five, 0x4002, 8, T0), None);
        // Keep the permission alive without the channel: the channel lapses at 600 s.
        ok(&a.call(&mut c, METHOD_REFRESH, &[&lifetime(3600)], T0 + 250_000));
        ok(&a.call(&mut c, METHOD_CREATE_PERMISSION, &[&Peer(p1)], T0 + 250_000));
        ok(&a.call(&mut c, METHOD_CREATE_PERMISSION, &[&Peer(p1)], T0 + 500_000));
        assert_eq!(
            c.channel_data(&a.five, 0x4000, 8, T0 + 600_000),
            Some((1, p1))
        );
        assert_eq!(c.channel_data(&a.five, 0x4000, 8, T0 + 600_001), None);
        assert_eq!(
            c.from_peer(id, p1, 8, T0 + 600_001),
            Some(ToClient::DataIndication)
        );
        c.expire(T0 + 600_002);
        // After expiry the number may be bound to another peer (with a fresh nonce).
        let r = a.call(
            &mut c,
            METHOD_CHANNEL_BIND,
            &[&channel(0x4000), &Peer(p2)],
            T0 + 600_003,
        );
        assert_eq!(code(&r), Some(438));
        a.nonce = TextAttribute::get_from_as(&r, ATTR_NONCE).unwrap().text;
        ok(&a.call(
            &mut c,
            METHOD_CHANNEL_BIND,
            &[&channel(0x4000), &Peer(p2)],
            T0 + 600_004,
        ));
    }

    #[test]
    fn stale_nonce_gets_438_with_a_fresh_one() {
        let mut c = core();
        let mut a = alice(&mut c, 1);
        ok(&a.allocate(&mut c, T0));
        let r = a.call(&mut c, METHOD_REFRESH, &[&lifetime(600)], T0 + 600_001);
        assert_eq!(code(&r), Some(438));
        a.nonce = TextAttribute::get_from_as(&r, ATTR_NONCE).unwrap().text;
        ok(&a.call(&mut c, METHOD_REFRESH, &[&lifetime(600)], T0 + 600_002));
        // A forged nonce is refused the same way.
        a.nonce = "0".repeat(40);
        assert_eq!(
            code(&a.call(&mut c, METHOD_REFRESH, &[], T0 + 600_003)),
            Some(438)
        );
    }

    #[test]
    fn credentials_expiry_and_wrong_user() {
        let mut c = core();
        let (u, p) = rest("old", T0 / 1000 - 1);
        let old = Client::new(&mut c, 1, &u, &p, T0);
        let r = old.allocate(&mut c, T0);
        assert_eq!(code(&r), Some(401));
        // Wrong password: 401.
        let (u, _) = rest("bob", T0 / 1000 + 10);
        let bad = Client::new(&mut c, 2, &u, "nope", T0);
        assert_eq!(code(&bad.allocate(&mut c, T0)), Some(401));
        // A username that expires later keeps refreshing its allocation.
        let (u, p) = rest("bob", T0 / 1000 + 10);
        let bob = Client::new(&mut c, 3, &u, &p, T0);
        ok(&bob.allocate(&mut c, T0));
        ok(&bob.call(&mut c, METHOD_REFRESH, &[&lifetime(600)], T0 + 500_000));
        // Another valid user on the same 5-tuple: 441.
        let mut carol = alice(&mut c, 3);
        carol.nonce = bob.nonce.clone();
        assert_eq!(
            code(&carol.call(&mut c, METHOD_REFRESH, &[], T0 + 1)),
            Some(441)
        );
        // Static users.
        let s = Client::new(&mut c, 4, "static", "static-pw", T0);
        ok(&s.allocate(&mut c, T0));
    }

    #[test]
    fn allocate_error_codes() {
        let mut c = core();
        let a = alice(&mut c, 1);
        assert_eq!(code(&a.call(&mut c, METHOD_ALLOCATE, &[], T0)), Some(400));
        let tcp = Raw(ATTR_REQUESTED_TRANSPORT, vec![6, 0, 0, 0]);
        assert_eq!(
            code(&a.call(&mut c, METHOD_ALLOCATE, &[&tcp], T0)),
            Some(442)
        );
        let fam = |f: u8| Raw(ATTR_REQUESTED_ADDRESS_FAMILY, vec![f, 0, 0, 0]);
        assert_eq!(
            code(&a.call(&mut c, METHOD_ALLOCATE, &[&transport_udp(), &fam(3)], T0)),
            Some(440)
        );
        let even_reserve = Raw(ATTR_EVEN_PORT, vec![0x80]);
        let r = a.call(
            &mut c,
            METHOD_ALLOCATE,
            &[&transport_udp(), &even_reserve],
            T0,
        );
        assert_eq!(code(&r), Some(420));
        let token = Raw(ATTR_RESERVATION_TOKEN, vec![0; 8]);
        assert_eq!(
            code(&a.call(&mut c, METHOD_ALLOCATE, &[&transport_udp(), &token], T0)),
            Some(420)
        );
        let unknown = Raw(AttrType(0x0031), vec![0; 4]);
        assert_eq!(
            code(&a.call(&mut c, METHOD_ALLOCATE, &[&transport_udp(), &unknown], T0)),
            Some(420)
        );
        // Error answers to authenticated requests carry integrity.
        let r = a.call(&mut c, METHOD_ALLOCATE, &[&tcp], T0);
        assert!(r.contains(ATTR_MESSAGE_INTEGRITY));
        // EVEN-PORT without reservation is honoured.
        let r = a.call(
            &mut c,
            METHOD_ALLOCATE,
            &[&transport_udp(), &Raw(ATTR_EVEN_PORT, vec![0])],
            T0,
        );
        ok(&r);
        let mut x = XorMappedAddress::default();
        x.get_from_as(&r, ATTR_XOR_RELAYED_ADDRESS).unwrap();
        assert_eq!(x.port % 2, 0);
        // IPv6 relay on request; an IPv4 peer then mismatches (443).
        let b = alice(&mut c, 2);
        ok(&b.call(&mut c, METHOD_ALLOCATE, &[&transport_udp(), &fam(2)], T0));
        let r = b.call(
            &mut c,
            METHOD_CREATE_PERMISSION,
            &[&Peer(peer("192.0.2.1:1"))],
            T0,
        );
        assert_eq!(code(&r), Some(443));
        ok(&b.call(
            &mut c,
            METHOD_CREATE_PERMISSION,
            &[&Peer(peer("[2001:db8::1]:1"))],
            T0,
        ));
        assert_eq!(
            code(&b.call(
                &mut c,
                METHOD_CREATE_PERMISSION,
                &[&Peer(peer("[::1]:1"))],
                T0
            )),
            Some(403)
        );
        // Refresh checks REQUESTED-ADDRESS-FAMILY like Allocate: the allocation's own
        // family is fine, the other one mismatches (443), a malformed one is 440.
        ok(&b.call(&mut c, METHOD_REFRESH, &[&fam(2)], T0));
        assert_eq!(
            code(&b.call(&mut c, METHOD_REFRESH, &[&fam(1)], T0)),
            Some(443)
        );
        let short = Raw(ATTR_REQUESTED_ADDRESS_FAMILY, vec![2]);
        assert_eq!(
            code(&b.call(&mut c, METHOD_REFRESH, &[&short], T0)),
            Some(440)
        );
        // No IPv6 relay address: 440.
        let mut c = core();
        c.sockets.no_v6 = true;
        let a = alice(&mut c, 1);
        assert_eq!(
            code(&a.call(&mut c, METHOD_ALLOCATE, &[&transport_udp(), &fam(2)], T0)),
            Some(440)
        );
        // No free port: 508.
        c.sockets.exhausted = true;
        assert_eq!(code(&a.allocate(&mut c, T0)), Some(508));
        // Requests other than Allocate without an allocation: 437.
        assert_eq!(
            code(&a.call(
                &mut c,
                METHOD_CREATE_PERMISSION,
                &[&Peer(peer("192.0.2.1:1"))],
                T0
            )),
            Some(437)
        );
        assert_eq!(
            code(&a.call(
                &mut c,
                METHOD_CHANNEL_BIND,
                &[&channel(0x4000), &Peer(peer("192.0.2.1:1"))],
                T0
            )),
            Some(437)
        );
    }

    #[test]
    fn quotas() {
        let mut c = core_with(|cfg| {
            cfg.user_quota = 2;
            cfg.total_quota = 3;
        });
        for port in 1..=2 {
            ok(&alice(&mut c, port).allocate(&mut c, T0));
        }
        assert_eq!(code(&alice(&mut c, 3).allocate(&mut c, T0)), Some(486));
        let (u, p) = rest("bob", T0 / 1000 + 100);
        ok(&Client::new(&mut c, 4, &u, &p, T0).allocate(&mut c, T0));
        assert_eq!(
            code(&Client::new(&mut c, 5, &u, &p, T0).allocate(&mut c, T0)),
            Some(508)
        );
        // Freed allocations free the quota.
        let a = alice(&mut c, 1);
        ok(&a.call(&mut c, METHOD_REFRESH, &[&lifetime(0)], T0));
        ok(&alice(&mut c, 6).allocate(&mut c, T0));
    }

    #[test]
    fn retransmissions_get_the_same_answer() {
        let mut c = core();
        let a = alice(&mut c, 1);
        let req = a.req(METHOD_ALLOCATE, &[&transport_udp()]);
        let first = reply(c.handle_stun(&req, a.five, T0));
        ok(&first);
        let again = reply(c.handle_stun(&req, a.five, T0 + 5_000));
        assert_eq!(first.raw, again.raw);
        assert_eq!(c.allocation_count(), 1);
        // Errors are repeated as well (a retransmitted Refresh 0 stays a success).
        let refresh = a.req(METHOD_REFRESH, &[&lifetime(0)]);
        let r1 = reply(c.handle_stun(&refresh, a.five, T0 + 6_000));
        let r2 = reply(c.handle_stun(&refresh, a.five, T0 + 6_500));
        ok(&r1);
        assert_eq!(r1.raw, r2.raw);
        // After the cache lifetime a replay is a new request.
        c.expire(T0 + 6_000 + RETRANSMIT_TTL_MS);
        let r3 = reply(c.handle_stun(&refresh, a.five, T0 + 6_000 + RETRANSMIT_TTL_MS + 1));
        assert_eq!(code(&r3), Some(437));
        // A new Allocate transaction on a 5-tuple that has an allocation: 437.
        ok(&a.allocate(&mut c, T0 + 50_000));
        assert_eq!(code(&a.allocate(&mut c, T0 + 50_001)), Some(437));
    }

    #[test]
    fn bandwidth_cap_is_a_token_bucket() {
        let mut c = core_with(|cfg| cfg.max_bps = 1000);
        let a = alice(&mut c, 1);
        ok(&a.allocate(&mut c, T0));
        let (id, _) = c.allocation_of(&a.five).unwrap();
        let p = peer("192.0.2.1:1");
        ok(&a.call(
            &mut c,
            METHOD_CHANNEL_BIND,
            &[&channel(0x4000), &Peer(p)],
            T0,
        ));
        assert!(c.channel_data(&a.five, 0x4000, 600, T0).is_some());
        assert!(c.from_peer(id, p, 400, T0).is_some());
        assert!(c.channel_data(&a.five, 0x4000, 1, T0).is_none());
        assert!(c.channel_data(&a.five, 0x4000, 500, T0 + 499).is_none());
        assert!(c.channel_data(&a.five, 0x4000, 500, T0 + 500).is_some());
    }

    #[test]
    fn peer_gone_and_client_gone_remove_allocations() {
        let mut c = core();
        ok(&alice(&mut c, 1).allocate(&mut c, T0));
        ok(&alice(&mut c, 2).allocate(&mut c, T0));
        let (u, p) = rest("bob", T0 / 1000 + 100);
        let bob = Client::new(&mut c, 3, &u, &p, T0);
        ok(&bob.allocate(&mut c, T0));
        assert_eq!(c.peer_gone("alice"), 2);
        assert_eq!(c.allocation_count(), 1);
        assert_eq!(c.peer_gone("nobody"), 0);
        c.client_gone(&bob.five);
        assert_eq!(c.allocation_count(), 0);
        assert_eq!(c.sockets.closed.len(), 3);
    }
}
