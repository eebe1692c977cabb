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

fn attr_bytes<'a>(m: &'a Message, t: AttrType) -> Option<&'a [u8]> {
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
        let family = match attr_bytes(m, ATTR_REQUESTED_ADDRESS_FAMILY) {
            None => Family::V4,
            Some(v) if v.len() == 4 && v[0] == 0x01 => Family::V4,
            Some(v) if v.len() == 4 && v[0] == 0x02 => Family::V6,
            Some(_) => return Err(fail(440, "Address Family not Supported")),
        };
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
        if let Some(v) = attr_bytes(m, ATTR_REQUESTED_ADDRESS_FAMILY) {
            let fam = match v.first() {
                Some(1) => Family::V4,
                Some(2) => Family::V6,
                _ => return Err(fail(440, "Address Family not Supported")),
            };
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
