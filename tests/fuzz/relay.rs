//! The STUN/TURN core fed arbitrary and mutated input, without and with valid
//! credentials, plus the stream framer. Properties: nothing panics; every answer the
//! core sends is a well-formed STUN message; quotas hold; every relay socket the core
//! was given (dual allocations' two included) is freed once everything expires; the
//! framer's verdicts are consistent with its input.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use meshmeet::relay::auth::Credentials;
use meshmeet::relay::client::{self, Attr, Session};
use meshmeet::relay::core::{AllocationId, BindError, Command, Core, Family, RelayRules};
use meshmeet::relay::policy::{Listener, OwnAddrs, PeerPolicy};
use meshmeet::relay::wire::{self, Frame, MAX_FRAME};
use meshmeet::relay::{FiveTuple, RelayMetrics, Transport};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::SeedableRng;
use stun::attributes::AttrType;
use stun::message::*;

const SECRET: &str = "fuzz-secret-0123456789";
const UNIX0: u64 = 1_800_000_000;
const QUOTA: usize = 3;
const TOTAL: usize = 5;

/// The core with fake relay sockets; binds always succeed.
struct Harness {
    core: Core<u32>,
    t0: Instant,
    at: Duration,
    next_handle: u32,
    allocations: Vec<AllocationId>,
    /// Relay sockets handed to the core, and those it freed.
    bound: HashSet<u32>,
    freed: HashSet<u32>,
    /// When set, binds of IPv6 sockets fail with this.
    v6_fails: Option<BindError>,
    /// Answers sent to clients.
    answers: Vec<Vec<u8>>,
}

impl Harness {
    fn new() -> Harness {
        let t0 = Instant::now();
        let rules = RelayRules {
            max_lifetime: Duration::from_secs(600),
            user_quota: QUOTA,
            total_quota: TOTAL,
            max_bps: 1_000_000,
            policy: PeerPolicy::new(vec![
                "192.0.2.0/24".parse().unwrap(),
                "2001:db8::/32".parse().unwrap(),
            ]),
            relay_v4: true,
            relay_v6: true,
            own: OwnAddrs::new(&[Listener::Udp("198.51.100.1:3478".parse().unwrap())], []),
        };
        let mut users = HashMap::new();
        users.insert("static".to_string(), "static-pw".to_string());
        Harness {
            core: Core::new(
                rules,
                Credentials::new(SECRET.into(), "realm".into(), users),
                RelayMetrics::default(),
                &mut StdRng::seed_from_u64(1),
                t0,
            ),
            t0,
            at: Duration::ZERO,
            next_handle: 0,
            allocations: Vec::new(),
            bound: HashSet::new(),
            freed: HashSet::new(),
            v6_fails: None,
            answers: Vec::new(),
        }
    }

    fn now(&self) -> Instant {
        self.t0 + self.at
    }

    fn wall(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(UNIX0) + self.at
    }

    fn advance(&mut self, ms: u32) {
        self.at += Duration::from_millis(u64::from(ms));
        let now = self.now();
        self.core.handle_timeout(now);
        self.drain();
    }

    /// Carries out the queued commands the way the IO layer would.
    fn drain(&mut self) {
        let now = self.now();
        while let Some(c) = self.core.poll_command() {
            match c {
                Command::SendToClient { bytes, .. } => {
                    assert!(
                        client::parse(&bytes).is_some(),
                        "the core sent a malformed STUN message: {}",
                        hex::encode(&bytes)
                    );
                    self.answers.push(bytes);
                }
                Command::BindRelaySocket { token, family, .. } => {
                    if let (Family::V6, Some(e)) = (family, self.v6_fails) {
                        self.core.relay_bound(token, Err(e), now);
                        continue;
                    }
                    self.next_handle += 1;
                    let port = 50_000 + (self.next_handle % 10_000) as u16;
                    let addr = match family {
                        Family::V4 => SocketAddr::from(([127, 0, 0, 1], port)),
                        Family::V6 => SocketAddr::new("2001:db8::10".parse().unwrap(), port),
                    };
                    self.bound.insert(self.next_handle);
                    self.core
                        .relay_bound(token, Ok((addr, self.next_handle)), now);
                }
                Command::StartRelaying { id, .. } => self.allocations.push(id),
                Command::FreeRelaySocket { handle } => {
                    assert!(self.freed.insert(handle), "socket {handle} freed twice");
                }
                Command::SendToPeer { .. } => {}
            }
        }
        assert!(
            self.core.allocation_count() <= TOTAL,
            "total quota exceeded"
        );
    }

    /// One datagram or stream frame from `five`, dispatched as the IO layer does.
    fn input(&mut self, bytes: &[u8], five: FiveTuple) {
        let now = self.now();
        if wire::is_channel_data(bytes) {
            if let Some((channel, len)) = wire::channel_header(bytes) {
                let _ = self.core.channel_data(&five, channel, len, now);
            }
        } else if wire::is_stun(bytes) {
            let wall = self.wall();
            self.core.handle_stun(bytes, five, now, wall);
        }
        self.drain();
    }

    /// A peer datagram on one of the allocations made so far (or a stale one).
    fn peer_datagram(&mut self, pick: usize, peer: SocketAddr, len: usize) {
        if self.allocations.is_empty() {
            return;
        }
        let id = self.allocations[pick % self.allocations.len()];
        let now = self.now();
        let _ = self.core.from_peer(id, peer, len, now);
        self.drain();
    }
}

fn five(client: u8, transport: u8) -> FiveTuple {
    FiveTuple {
        client: SocketAddr::from(([192, 0, 2, 100 + client % 4], 40_000)),
        server: SocketAddr::from(([127, 0, 0, 1], 3478)),
        transport: match transport % 3 {
            0 => Transport::Udp,
            1 => Transport::Tcp,
            _ => Transport::Tls,
        },
    }
}

fn peer_addr(n: u8) -> SocketAddr {
    // Allowed (192.0.2.0/24, 2001:db8::/32), loopback and private peers.
    match n % 4 {
        0 => SocketAddr::from(([192, 0, 2, n], 5000)),
        1 => SocketAddr::from(([127, 0, 0, 1], 3478)),
        2 => SocketAddr::from(([10, 0, 0, n], 6000)),
        _ => "[2001:db8::1]:7000".parse().unwrap(),
    }
}

type Edits = Vec<(u8, usize, u8)>;

#[derive(Debug, Clone)]
enum RawOp {
    /// A corpus seed (by index), mutated, from client `c` over transport `t`.
    Seed(usize, Edits, u8, u8),
    /// Arbitrary bytes.
    Bytes(Vec<u8>, u8, u8),
    /// A peer datagram on an allocation.
    Peer(usize, u8, usize),
    /// Time passes (ms).
    Wait(u32),
}

fn edits() -> impl Strategy<Value = Edits> {
    prop::collection::vec((any::<u8>(), any::<usize>(), any::<u8>()), 0..6)
}

fn raw_op() -> impl Strategy<Value = RawOp> {
    prop_oneof![
        4 => (any::<usize>(), edits(), any::<u8>(), any::<u8>())
            .prop_map(|(s, e, c, t)| RawOp::Seed(s, e, c, t)),
        2 => (prop::collection::vec(any::<u8>(), 0..128), any::<u8>(), any::<u8>())
            .prop_map(|(b, c, t)| RawOp::Bytes(b, c, t)),
        1 => (any::<usize>(), any::<u8>(), 0usize..70_000).prop_map(|(a, p, l)| RawOp::Peer(a, p, l)),
        1 => (0u32..700_000).prop_map(RawOp::Wait),
    ]
}

proptest! {
    #![proptest_config(crate::config())]

    /// Unauthenticated: mutated corpus messages and noise.
    #[test]
    fn relay_core_survives_unauthenticated_input(ops in prop::collection::vec(raw_op(), 1..40)) {
        let seeds = crate::corpus("stun");
        let mut h = Harness::new();
        for op in ops {
            match op {
                RawOp::Seed(s, e, c, t) => {
                    let b = crate::mutate(&seeds[s % seeds.len()], &e);
                    h.input(&b, five(c, t));
                }
                RawOp::Bytes(b, c, t) => h.input(&b, five(c, t)),
                RawOp::Peer(a, p, l) => h.peer_datagram(a, peer_addr(p), l),
                RawOp::Wait(ms) => h.advance(ms),
            }
        }
        h.advance(700_000);
        prop_assert_eq!(h.core.allocation_count(), 0);
        prop_assert_eq!(&h.bound, &h.freed);
    }
}

/// A request as a mutated structure: method, attributes (well-formed or raw).
#[derive(Debug, Clone)]
struct Req {
    method: Method,
    attrs: Vec<Attr>,
}

/// The methods the relay knows, plus two it does not (other method numbers come
/// from the byte mutations of [`AuthOp::Tampered`]).
fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        Just(METHOD_ALLOCATE),
        Just(METHOD_REFRESH),
        Just(METHOD_CREATE_PERMISSION),
        Just(METHOD_CHANNEL_BIND),
        Just(METHOD_BINDING),
        Just(METHOD_SEND),
        Just(METHOD_DATA),
        Just(METHOD_CONNECT),
    ]
}

fn attr() -> impl Strategy<Value = Attr> {
    prop_oneof![
        any::<u8>().prop_map(Attr::Transport),
        Just(Attr::UDP),
        prop_oneof![Just(0u32), any::<u32>()].prop_map(Attr::Lifetime),
        prop_oneof![0x3FF0u16..0x5010, any::<u16>()].prop_map(Attr::Channel),
        any::<u8>().prop_map(|p| Attr::Peer(peer_addr(p))),
        prop_oneof![Just(1u8), Just(2), any::<u8>()].prop_map(Attr::Family),
        any::<u8>().prop_map(Attr::EvenPort),
        // ADDITIONAL-ADDRESS-FAMILY IPv6: dual allocations.
        Just(Attr::Raw(AttrType(0x8000), vec![2, 0, 0, 0])),
        (
            prop_oneof![
                Just(0x0012u16),
                Just(0x000C),
                Just(0x000D),
                Just(0x0013),
                Just(0x0017),
                Just(0x0018),
                Just(0x0019),
                Just(0x001A),
                Just(0x0022),
                Just(0x8000),
                Just(0x8001),
                any::<u16>()
            ],
            prop::collection::vec(any::<u8>(), 0..40)
        )
            .prop_map(|(t, v)| Attr::Raw(AttrType(t), v)),
    ]
}

fn req() -> impl Strategy<Value = Req> {
    prop_oneof![
        4 => (method(), prop::collection::vec(attr(), 0..6))
            .prop_map(|(method, attrs)| Req { method, attrs }),
        // Well-formed dual allocations and Refreshes by family, which random
        // attribute lists rarely put together.
        1 => Just(Req {
            method: METHOD_ALLOCATE,
            attrs: vec![Attr::UDP, Attr::Raw(AttrType(0x8000), vec![2, 0, 0, 0])],
        }),
        1 => (prop_oneof![Just(0u32), Just(600), any::<u32>()], 0u8..3).prop_map(
            |(lifetime, family)| {
                let mut attrs = vec![Attr::Lifetime(lifetime)];
                if family > 0 {
                    attrs.push(Attr::Family(family));
                }
                Req {
                    method: METHOD_REFRESH,
                    attrs,
                }
            }
        ),
    ]
}

#[derive(Debug, Clone)]
enum AuthOp {
    /// A signed request from client `c` over transport `t`.
    Signed(Req, u8, u8),
    /// A signed request whose bytes are then mutated (integrity mostly broken).
    Tampered(Req, Edits, u8),
    /// ChannelData on a channel from client `c`.
    Channel(u16, Vec<u8>, u8),
    Peer(usize, u8, usize),
    Wait(u32),
}

fn auth_op() -> impl Strategy<Value = AuthOp> {
    prop_oneof![
        6 => (req(), any::<u8>(), any::<u8>()).prop_map(|(r, c, t)| AuthOp::Signed(r, c, t)),
        1 => (req(), edits(), any::<u8>()).prop_map(|(r, e, c)| AuthOp::Tampered(r, e, c)),
        2 => (0x4000u16..0x4010, prop::collection::vec(any::<u8>(), 0..64), any::<u8>())
            .prop_map(|(n, p, c)| AuthOp::Channel(n, p, c)),
        1 => (any::<usize>(), any::<u8>(), 0usize..2000).prop_map(|(a, p, l)| AuthOp::Peer(a, p, l)),
        1 => (0u32..400_000).prop_map(AuthOp::Wait),
    ]
}

/// Allowed peers of both families.
fn dual_peer(n: u8) -> SocketAddr {
    match n % 4 {
        0 => SocketAddr::from(([192, 0, 2, 7], 5000)),
        1 => SocketAddr::from(([192, 0, 2, 8], 5001)),
        2 => "[2001:db8::7]:6000".parse().unwrap(),
        _ => "[2001:db8::8]:6001".parse().unwrap(),
    }
}

#[derive(Debug, Clone)]
enum DualOp {
    /// A signed request from one of two clients.
    Request(Req, u8),
    /// A Send indication and ChannelData towards a peer.
    Data(u8, u8),
    Peer(usize, u8, usize),
    /// From now on IPv6 binds fail with this (or succeed).
    V6Binds(Option<BindError>),
    Wait(u32),
}

fn dual_req() -> impl Strategy<Value = Req> {
    let family = prop_oneof![
        Just(None),
        Just(Some(1u8)),
        Just(Some(2)),
        any::<u8>().prop_map(Some)
    ];
    prop_oneof![
        3 => (family.clone(), any::<bool>()).prop_map(|(f, additional)| {
            let mut attrs = vec![Attr::UDP];
            if additional {
                attrs.push(Attr::Raw(AttrType(0x8000), vec![2, 0, 0, 0]));
            }
            attrs.extend(f.map(Attr::Family));
            Req { method: METHOD_ALLOCATE, attrs }
        }),
        3 => (prop_oneof![Just(0u32), Just(600), Just(3000), any::<u32>()], family).prop_map(
            |(lifetime, f)| {
                let mut attrs = vec![Attr::Lifetime(lifetime)];
                attrs.extend(f.map(Attr::Family));
                Req { method: METHOD_REFRESH, attrs }
            }
        ),
        2 => prop::collection::vec(any::<u8>(), 1..3).prop_map(|peers| Req {
            method: METHOD_CREATE_PERMISSION,
            attrs: peers.into_iter().map(|p| Attr::Peer(dual_peer(p))).collect(),
        }),
        2 => (0u16..4, any::<u8>()).prop_map(|(n, p)| Req {
            method: METHOD_CHANNEL_BIND,
            attrs: vec![Attr::Channel(0x4000 + n), Attr::Peer(dual_peer(p))],
        }),
    ]
}

fn dual_op() -> impl Strategy<Value = DualOp> {
    prop_oneof![
        8 => (dual_req(), any::<u8>()).prop_map(|(r, c)| DualOp::Request(r, c)),
        2 => (any::<u8>(), any::<u8>()).prop_map(|(p, c)| DualOp::Data(p, c)),
        2 => (any::<usize>(), any::<u8>(), 0usize..2000).prop_map(|(a, p, l)| DualOp::Peer(a, p, l)),
        1 => prop_oneof![
            Just(None),
            Just(Some(BindError::Other)),
            Just(Some(BindError::NoFreePort)),
            Just(Some(BindError::FileLimit)),
        ]
        .prop_map(DualOp::V6Binds),
        2 => prop_oneof![0u32..2000, 100_000u32..700_000].prop_map(DualOp::Wait),
    ]
}

/// Gets a nonce for `s` the way a client does: an unauthenticated Allocate, then the
/// 401's realm and nonce.
fn challenge(h: &mut Harness, s: &mut Session, five: FiveTuple) {
    let first = s.request(METHOD_ALLOCATE, &[&Attr::UDP]);
    h.input(&first, five);
    let answer = h
        .answers
        .last()
        .and_then(|b| client::parse(b))
        .expect("a 401");
    assert!(s.learn(&answer), "challenge learned");
}

fn build(s: &Session, r: &Req) -> Vec<u8> {
    let attrs: Vec<&dyn Setter> = r.attrs.iter().map(|a| a as &dyn Setter).collect();
    s.request(r.method, &attrs)
}

proptest! {
    #![proptest_config(crate::config())]

    /// Authenticated: every request carries valid MESSAGE-INTEGRITY for REST
    /// credentials (two users), so mutated methods and attributes reach the
    /// allocation, permission and channel logic; quotas must hold throughout.
    #[test]
    fn relay_core_survives_authenticated_input(ops in prop::collection::vec(auth_op(), 1..40)) {
        let mut h = Harness::new();
        let expiry = UNIX0 + 3600;
        let mut sessions = [
            Session::rest(SECRET, "alice", expiry),
            Session::rest(SECRET, "bob", expiry),
        ];
        for (i, s) in sessions.iter_mut().enumerate() {
            challenge(&mut h, s, five(i as u8, 0));
            // The harness's signatures pass: a signed Allocate succeeds.
            let before = h.core.allocation_count();
            h.input(&s.request(METHOD_ALLOCATE, &[&Attr::UDP]), five(i as u8, 0));
            prop_assert_eq!(h.core.allocation_count(), before + 1);
        }
        for op in ops {
            match op {
                AuthOp::Signed(r, c, t) => {
                    let b = build(&sessions[usize::from(c % 2)], &r);
                    h.input(&b, five(c, t));
                }
                AuthOp::Tampered(r, e, c) => {
                    let b = crate::mutate(&build(&sessions[usize::from(c % 2)], &r), &e);
                    h.input(&b, five(c, 0));
                }
                AuthOp::Channel(n, p, c) => {
                    let b = client::channel_data(n, &p, false);
                    h.input(&b, five(c, 0));
                }
                AuthOp::Peer(a, p, l) => h.peer_datagram(a, peer_addr(p), l),
                AuthOp::Wait(ms) => h.advance(ms),
            }
            for s in &mut sessions {
                // A stale nonce after a long wait: learn the new one, as clients do.
                if let Some(m) = h.answers.last().and_then(|b| client::parse(b)) {
                    if client::error_code(&m) == Some(438) {
                        s.learn(&m);
                    }
                }
            }
        }
        // Allocations end with their lifetimes, and every socket is freed.
        h.advance(700_000);
        prop_assert_eq!(h.core.allocation_count(), 0);
        prop_assert_eq!(&h.bound, &h.freed);
    }

    /// Dual allocations (and single ones) from one client, refreshed and deleted by
    /// family, with permissions, channels and data of both families and IPv6 binds
    /// that fail: the sockets the core holds never outnumber two per allocation, and
    /// every one is freed once everything expires.
    #[test]
    fn dual_allocations_free_every_socket(ops in prop::collection::vec(dual_op(), 1..40)) {
        let mut h = Harness::new();
        let mut s = Session::rest(SECRET, "dual", UNIX0 + 3600);
        let clients = [five(0, 0), five(1, 1)];
        challenge(&mut h, &mut s, clients[0]);
        for op in ops {
            match op {
                DualOp::Request(r, c) => {
                    let five = clients[usize::from(c % 2)];
                    h.input(&build(&s, &r), five);
                    if let Some(m) = h.answers.last().and_then(|b| client::parse(b)) {
                        if client::error_code(&m) == Some(438) {
                            s.learn(&m);
                            h.input(&build(&s, &r), five);
                        }
                    }
                }
                DualOp::Data(peer, c) => {
                    let five = clients[usize::from(c % 2)];
                    h.input(&client::send_indication(dual_peer(peer), b"data"), five);
                    h.input(&client::channel_data(0x4000 + u16::from(peer % 4), b"cd", false), five);
                }
                DualOp::Peer(a, p, l) => h.peer_datagram(a, dual_peer(p), l),
                DualOp::V6Binds(e) => h.v6_fails = e,
                DualOp::Wait(ms) => h.advance(ms),
            }
            let live = h.bound.difference(&h.freed).count();
            prop_assert!(live <= 2 * h.core.allocation_count(), "{} sockets for {} allocations", live, h.core.allocation_count());
            prop_assert!(live >= h.core.allocation_count());
        }
        h.advance(4_000_000);
        prop_assert_eq!(h.core.allocation_count(), 0);
        prop_assert_eq!(&h.bound, &h.freed);
    }

    /// The stream framer: never panics; a complete frame fits the buffer and the
    /// limit; every shorter prefix of it is incomplete; invalid stays invalid when more
    /// bytes come.
    #[test]
    fn stream_framer_is_consistent(
        seed in any::<usize>(),
        e in edits(),
        tail in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let seeds = crate::corpus("stream");
        let mut b = crate::mutate(&seeds[seed % seeds.len()], &e);
        match wire::stream_frame(&b) {
            Frame::Complete(n) => {
                prop_assert!(n >= 4 && n <= b.len() && n <= MAX_FRAME);
                for k in 0..n {
                    prop_assert_eq!(wire::stream_frame(&b[..k]), Frame::Incomplete);
                }
            }
            Frame::Invalid => {
                b.extend_from_slice(&tail);
                prop_assert_eq!(wire::stream_frame(&b), Frame::Invalid);
            }
            Frame::Incomplete => {}
        }
    }
}
