//! The relay core driven like a script: a seeded RNG, requests fed at `t0 + offset`,
//! commands asserted, time moved forward with `handle_timeout`. Relay sockets are
//! numbers; the harness binds them the way the IO layer would.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::SeedableRng;
use stun::attributes::AttrType;
use stun::message::{Message, Setter};

use super::*;
use crate::relay::client::{self, Attr, Session};

const SECRET: &str = "core-test-secret-0123";
/// The wall clock at `t0`, in Unix seconds.
const UNIX0: u64 = 1_800_000_000;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// A core with fake relay sockets (handles 1, 2, 3, ...) and a record of what the IO
/// layer was asked to do.
struct Harness {
    core: Core<u32>,
    t0: Instant,
    /// The wall clock, when a test has stepped it away from `UNIX0 + offset`.
    wall: Option<SystemTime>,
    next_handle: u32,
    /// When set, every bind fails with this.
    bind_fails: Option<BindError>,
    /// When set, every bind of an IPv6 socket fails with this.
    bind_fails_v6: Option<BindError>,
    started: Vec<(AllocationId, u32)>,
    freed: Vec<u32>,
    to_peers: Vec<(u32, SocketAddr, Vec<u8>)>,
}

fn config() -> RelayRules {
    RelayRules {
        max_lifetime: secs(3600),
        user_quota: 10,
        total_quota: 100,
        max_bps: 0,
        policy: PeerPolicy::new(vec![
            "192.0.2.0/24".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ]),
        own: OwnAddrs::default(),
        relay_v4: true,
        relay_v6: true,
    }
}

impl Harness {
    fn new() -> Harness {
        Harness::with(|_| {})
    }

    fn with(edit: impl FnOnce(&mut RelayRules)) -> Harness {
        let mut cfg = config();
        edit(&mut cfg);
        let mut users = HashMap::new();
        users.insert("static".to_string(), "static-pw".to_string());
        let t0 = Instant::now();
        Harness {
            core: Core::new(
                cfg,
                Credentials::new(SECRET.into(), "realm".into(), users),
                RelayMetrics::default(),
                &mut StdRng::seed_from_u64(7),
                t0,
            ),
            t0,
            wall: None,
            next_handle: 0,
            bind_fails: None,
            bind_fails_v6: None,
            started: Vec::new(),
            freed: Vec::new(),
            to_peers: Vec::new(),
        }
    }

    fn at(&self, offset: Duration) -> Instant {
        self.t0 + offset
    }

    fn wall_at(&self, offset: Duration) -> SystemTime {
        self.wall.unwrap_or(UNIX_EPOCH + secs(UNIX0) + offset)
    }

    fn drain(&mut self) -> Vec<Command<u32>> {
        std::iter::from_fn(|| self.core.poll_command()).collect()
    }

    /// Feeds a STUN message and returns the commands, binding nothing.
    fn input_raw(&mut self, bytes: &[u8], five: FiveTuple, at: Duration) -> Vec<Command<u32>> {
        let (now, wall) = (self.at(at), self.wall_at(at));
        self.core.handle_stun(bytes, five, now, wall);
        self.drain()
    }

    /// Feeds a STUN message, carries out the commands as the IO layer would (a bind
    /// succeeds at once unless `bind_fails`), and returns the messages sent to clients.
    fn input(&mut self, bytes: &[u8], five: FiveTuple, at: Duration) -> Vec<(FiveTuple, Message)> {
        let cmds = self.input_raw(bytes, five, at);
        self.run(cmds, at)
    }

    /// The one answer to a request from `five`.
    fn answer(&mut self, bytes: &[u8], five: FiveTuple, at: Duration) -> Message {
        let mut out = self.input(bytes, five, at);
        assert_eq!(out.len(), 1, "one answer expected, got {out:?}");
        let (to, m) = out.remove(0);
        assert_eq!(to, five);
        m
    }

    fn bind(&mut self, family: Family, even_port: bool) -> Result<(SocketAddr, u32), BindError> {
        if let Some(e) = self.bind_fails {
            return Err(e);
        }
        if let (Family::V6, Some(e)) = (family, self.bind_fails_v6) {
            return Err(e);
        }
        self.next_handle += 1;
        let ip: IpAddr = match family {
            Family::V4 => "192.0.2.10".parse().unwrap(),
            Family::V6 => "2001:db8::10".parse().unwrap(),
        };
        let port = 50_000 + 2 * self.next_handle as u16 + u16::from(!even_port);
        Ok((SocketAddr::new(ip, port), self.next_handle))
    }

    fn run(&mut self, cmds: Vec<Command<u32>>, at: Duration) -> Vec<(FiveTuple, Message)> {
        let mut queue: VecDeque<Command<u32>> = cmds.into();
        let mut sent = Vec::new();
        while let Some(cmd) = queue.pop_front() {
            match cmd {
                Command::SendToClient { to, bytes } => {
                    sent.push((to, client::parse(&bytes).expect("a STUN message")))
                }
                Command::BindRelaySocket {
                    token,
                    family,
                    even_port,
                } => {
                    let result = self.bind(family, even_port);
                    self.core.relay_bound(token, result, self.at(at));
                    queue.extend(self.drain());
                }
                Command::StartRelaying { id, handle, .. } => self.started.push((id, handle)),
                Command::SendToPeer { handle, peer, data } => {
                    self.to_peers.push((handle, peer, data))
                }
                Command::FreeRelaySocket { handle } => self.freed.push(handle),
            }
        }
        sent
    }

    /// Moves time to `t0 + at` and carries out what expired.
    fn timeout(&mut self, at: Duration) {
        self.core.handle_timeout(self.at(at));
        let cmds = self.drain();
        let sent = self.run(cmds, at);
        assert!(sent.is_empty(), "timeouts answer nobody: {sent:?}");
    }

    fn poll_offset(&self) -> Option<Duration> {
        self.core.poll_timeout().map(|t| t - self.t0)
    }
}

fn five(port: u16) -> FiveTuple {
    FiveTuple {
        client: SocketAddr::new("203.0.113.5".parse().unwrap(), port),
        server: "198.51.100.1:3478".parse().unwrap(),
        transport: Transport::Udp,
    }
}

/// A test client: a 5-tuple and a session that has been challenged once.
struct Client {
    five: FiveTuple,
    s: Session,
}

impl Client {
    fn new(h: &mut Harness, port: u16, user: &str, pass: &str, at: Duration) -> Client {
        let mut cl = Client {
            five: five(port),
            s: Session::new(user, pass),
        };
        let r = h.answer(&cl.s.request(METHOD_ALLOCATE, &[&Attr::UDP]), cl.five, at);
        assert_eq!(client::error_code(&r), Some(401));
        assert!(cl.s.learn(&r));
        cl
    }

    fn call(
        &self,
        h: &mut Harness,
        method: Method,
        attrs: &[&dyn Setter],
        at: Duration,
    ) -> Message {
        h.answer(&self.s.request(method, attrs), self.five, at)
    }

    /// Like [`Client::call`], learning a fresh nonce on 438 and asking again.
    fn call_fresh(
        &mut self,
        h: &mut Harness,
        method: Method,
        attrs: &[&dyn Setter],
        at: Duration,
    ) -> Message {
        let r = self.call(h, method, attrs, at);
        if self.s.learn(&r) {
            return self.call(h, method, attrs, at);
        }
        r
    }

    fn allocate(&self, h: &mut Harness, at: Duration) -> Message {
        self.call(h, METHOD_ALLOCATE, &[&Attr::UDP], at)
    }
}

fn rest(id: &str, expiry_s: u64) -> (String, String) {
    let s = Session::rest(SECRET, id, expiry_s);
    (s.user().to_string(), s.password().to_string())
}

fn alice(h: &mut Harness, port: u16) -> Client {
    let (u, p) = rest("alice", UNIX0 + 3600);
    Client::new(h, port, &u, &p, Duration::ZERO)
}

fn code(m: &Message) -> Option<u16> {
    client::error_code(m)
}

fn ok(m: &Message) {
    assert!(client::is_success(m), "error {:?}", code(m));
}

fn lifetime_of(m: &Message) -> u32 {
    client::lifetime(m).expect("LIFETIME")
}

fn peer(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn p(a: SocketAddr) -> Attr {
    Attr::Peer(a)
}

#[test]
fn binding_answers_without_state() {
    let mut h = Harness::new();
    let f = five(1000);
    let r = h.answer(&client::binding_request(), f, ms(0));
    ok(&r);
    assert_eq!(client::mapped_address(&r), Some(f.client));
    assert_eq!(h.core.cache.len(), 0);
    assert_eq!(h.core.poll_timeout(), None);
    // Unknown comprehension-required attribute: 420 with UNKNOWN-ATTRIBUTES.
    let unknown = Attr::Raw(AttrType(0x0031), vec![1, 2, 3, 4]);
    let r = h.answer(&client::request(METHOD_BINDING, &[&unknown]), f, ms(0));
    assert_eq!(code(&r), Some(420));
    assert!(r.contains(ATTR_UNKNOWN_ATTRIBUTES));
}

#[test]
fn unauthenticated_requests_cost_no_state() {
    let mut h = Harness::new();
    for port in 1..200 {
        let r = h.answer(
            &client::request(METHOD_ALLOCATE, &[&Attr::UDP]),
            five(port),
            ms(0),
        );
        assert_eq!(code(&r), Some(401));
        assert!(r.contains(ATTR_REALM) && r.contains(ATTR_NONCE));
        assert!(!r.contains(ATTR_MESSAGE_INTEGRITY));
    }
    assert_eq!(h.core.cache.len(), 0);
    assert_eq!(h.core.allocation_count(), 0);
    assert!(h.core.pending.is_empty());
    assert_eq!(h.core.poll_timeout(), None);
}

#[test]
fn allocation_lifetime_default_cap_and_expiry() {
    let mut h = Harness::new();
    let a = alice(&mut h, 1);
    let r = a.allocate(&mut h, ms(0));
    ok(&r);
    assert_eq!(lifetime_of(&r), 600);
    assert!(r.contains(ATTR_XOR_RELAYED_ADDRESS) && r.contains(ATTR_XORMAPPED_ADDRESS));
    assert!(r.contains(ATTR_MESSAGE_INTEGRITY) && r.contains(ATTR_FINGERPRINT));
    assert_eq!(client::mapped_address(&r), Some(a.five.client));
    let (id, relay) = h.core.allocation_of(&a.five).unwrap();
    assert_eq!(client::relayed_address(&r), Some(relay));
    assert_eq!(h.started, vec![(id, 1)]);
    h.timeout(ms(599_999));
    assert_eq!(h.core.allocation_count(), 1);
    assert!(h.freed.is_empty());
    h.timeout(ms(600_000));
    assert_eq!(h.core.allocation_count(), 0);
    assert_eq!(h.freed, vec![1]);
    // Requested lifetimes are capped by the configured maximum, never below default.
    let b = alice(&mut h, 2);
    let r = b.call(
        &mut h,
        METHOD_ALLOCATE,
        &[&Attr::UDP, &Attr::Lifetime(100_000)],
        ms(0),
    );
    assert_eq!(lifetime_of(&r), 3600);
    let b = alice(&mut h, 3);
    let r = b.call(
        &mut h,
        METHOD_ALLOCATE,
        &[&Attr::UDP, &Attr::Lifetime(30)],
        ms(0),
    );
    assert_eq!(lifetime_of(&r), 600);
    let mut h = Harness::with(|cfg| cfg.max_lifetime = secs(300));
    let a = alice(&mut h, 1);
    assert_eq!(lifetime_of(&a.allocate(&mut h, ms(0))), 300);
    // An unbounded maximum is cut to what LIFETIME can say; the deadline stays sound.
    let mut h = Harness::with(|cfg| cfg.max_lifetime = Duration::MAX);
    let a = alice(&mut h, 1);
    let r = a.call(
        &mut h,
        METHOD_ALLOCATE,
        &[&Attr::UDP, &Attr::Lifetime(u32::MAX)],
        ms(0),
    );
    assert_eq!(lifetime_of(&r), u32::MAX);
    assert_eq!(h.poll_offset(), Some(RETRANSMIT_TTL));
    h.timeout(RETRANSMIT_TTL);
    assert_eq!(h.poll_offset(), Some(secs(u64::from(u32::MAX))));
}

#[test]
fn refresh_extends_and_zero_deletes() {
    let mut h = Harness::new();
    let a = alice(&mut h, 1);
    ok(&a.allocate(&mut h, ms(0)));
    let r = a.call(
        &mut h,
        METHOD_REFRESH,
        &[&Attr::Lifetime(1200)],
        ms(500_000),
    );
    ok(&r);
    assert_eq!(lifetime_of(&r), 1200);
    h.timeout(ms(1_000_000));
    assert_eq!(h.core.allocation_count(), 1);
    h.timeout(ms(500_000 + 1_200_000));
    assert_eq!(h.core.allocation_count(), 0);
    assert_eq!(h.freed, vec![1]);
    // Lifetime 0 deletes at once and answers LIFETIME 0.
    let b = alice(&mut h, 2);
    ok(&b.allocate(&mut h, ms(0)));
    let r = b.call(&mut h, METHOD_REFRESH, &[&Attr::Lifetime(0)], ms(1));
    ok(&r);
    assert_eq!(lifetime_of(&r), 0);
    assert_eq!(h.core.allocation_count(), 0);
    assert_eq!(h.freed, vec![1, 2]);
    // Without an allocation: 437.
    let r = b.call(&mut h, METHOD_REFRESH, &[&Attr::Lifetime(600)], ms(2));
    assert_eq!(code(&r), Some(437));
}

#[test]
fn permissions_expire_after_300_s() {
    let mut h = Harness::new();
    let a = alice(&mut h, 1);
    ok(&a.allocate(&mut h, ms(0)));
    let (id, _) = h.core.allocation_of(&a.five).unwrap();
    let pa = peer("192.0.2.77:9000");
    let t = |n| h.at(ms(n));
    let (t0, t1, t299_999, t300_000) = (t(0), t(1), t(299_999), t(300_000));
    assert_eq!(h.core.from_peer(id, pa, 10, t0), None);
    ok(&a.call(&mut h, METHOD_CREATE_PERMISSION, &[&p(pa)], ms(0)));
    assert_eq!(
        h.core.from_peer(id, pa, 10, t1),
        Some(ToClient::DataIndication)
    );
    // Permissions are per IP: another port of the same host is allowed.
    assert_eq!(
        h.core.from_peer(id, peer("192.0.2.77:1"), 10, t1),
        Some(ToClient::DataIndication)
    );
    assert_eq!(
        h.core.from_peer(id, pa, 10, t299_999),
        Some(ToClient::DataIndication)
    );
    assert_eq!(h.core.from_peer(id, pa, 10, t300_000), None);
    // Send indications need the permission too.
    let send = client::send_indication(pa, b"hi");
    assert!(h.input(&send, a.five, ms(300_000)).is_empty());
    assert!(h.to_peers.is_empty());
    ok(&a.call(&mut h, METHOD_CREATE_PERMISSION, &[&p(pa)], ms(300_001)));
    assert!(h.input(&send, a.five, ms(300_002)).is_empty());
    assert_eq!(h.to_peers, vec![(1, pa, b"hi".to_vec())]);
    h.timeout(ms(700_000));
    assert!(h.core.allocs.values().all(|a| a.perms.is_empty()));
}

#[test]
fn multi_address_permission_installs_all_or_none() {
    let mut h = Harness::new();
    let a = alice(&mut h, 1);
    ok(&a.allocate(&mut h, ms(0)));
    let (id, _) = h.core.allocation_of(&a.five).unwrap();
    let now = h.at(ms(0));
    let (p1, p2, p3) = (peer("192.0.2.1:1"), peer("192.0.2.2:2"), peer("8.8.8.8:53"));
    ok(&a.call(
        &mut h,
        METHOD_CREATE_PERMISSION,
        &[&p(p1), &p(p2), &p(p3)],
        ms(0),
    ));
    for x in [p1, p2, p3] {
        assert!(h.core.from_peer(id, x, 1, now).is_some(), "{x}");
    }
    let denied = peer("127.0.0.1:5");
    let other = peer("9.9.9.9:5");
    let r = a.call(
        &mut h,
        METHOD_CREATE_PERMISSION,
        &[&p(other), &p(denied)],
        ms(0),
    );
    assert_eq!(code(&r), Some(403));
    assert!(h.core.from_peer(id, other, 1, now).is_none());
    assert!(h.core.from_peer(id, denied, 1, now).is_none());
    let r = a.call(&mut h, METHOD_CREATE_PERMISSION, &[], ms(0));
    assert_eq!(code(&r), Some(400));
}

#[test]
fn channels_bind_rules_and_expiry() {
    let mut h = Harness::new();
    let mut a = alice(&mut h, 1);
    ok(&a.allocate(&mut h, ms(0)));
    let (id, _) = h.core.allocation_of(&a.five).unwrap();
    let (p1, p2) = (peer("192.0.2.1:1000"), peer("192.0.2.2:2000"));
    let bind = |n: u16, x: SocketAddr| [Attr::Channel(n), Attr::Peer(x)];
    for bad in [0x3FFF, 0x8000, 0xFFFF] {
        let [c, x] = bind(bad, p1);
        let r = a.call(&mut h, METHOD_CHANNEL_BIND, &[&c, &x], ms(0));
        assert_eq!(code(&r), Some(400), "{bad:#x}");
    }
    let [c, x] = bind(0x4000, p1);
    ok(&a.call(&mut h, METHOD_CHANNEL_BIND, &[&c, &x], ms(0)));
    // The bind installs the permission too.
    let t0 = h.at(ms(0));
    assert_eq!(
        h.core.from_peer(id, p1, 8, t0),
        Some(ToClient::Channel(0x4000))
    );
    assert_eq!(h.core.channel_data(&a.five, 0x4000, 8, t0), Some((1, p1)));
    // Rebinding the same pair refreshes; a different peer or number is refused.
    ok(&a.call(&mut h, METHOD_CHANNEL_BIND, &[&c, &x], ms(1)));
    let [c2, x2] = bind(0x4000, p2);
    assert_eq!(
        code(&a.call(&mut h, METHOD_CHANNEL_BIND, &[&c2, &x2], ms(0))),
        Some(400)
    );
    let [c3, x3] = bind(0x4001, p1);
    assert_eq!(
        code(&a.call(&mut h, METHOD_CHANNEL_BIND, &[&c3, &x3], ms(0))),
        Some(400)
    );
    assert_eq!(
        code(&a.call(&mut h, METHOD_CHANNEL_BIND, &[&c3], ms(0))),
        Some(400)
    );
    assert_eq!(
        code(&a.call(&mut h, METHOD_CHANNEL_BIND, &[&x3], ms(0))),
        Some(400)
    );
    let [c4, x4] = bind(0x4FFF, p2);
    ok(&a.call(&mut h, METHOD_CHANNEL_BIND, &[&c4, &x4], ms(0)));
    // Unknown channel numbers go nowhere.
    assert_eq!(h.core.channel_data(&a.five, 0x4002, 8, t0), None);
    // Keep the permission alive without the channel: the channel lapses at 600 s.
    ok(&a.call(
        &mut h,
        METHOD_REFRESH,
        &[&Attr::Lifetime(3600)],
        ms(250_000),
    ));
    ok(&a.call(&mut h, METHOD_CREATE_PERMISSION, &[&p(p1)], ms(250_000)));
    ok(&a.call(&mut h, METHOD_CREATE_PERMISSION, &[&p(p1)], ms(500_000)));
    let (t600_000, t600_001) = (h.at(ms(600_000)), h.at(ms(600_001)));
    assert_eq!(
        h.core.channel_data(&a.five, 0x4000, 8, t600_000),
        Some((1, p1))
    );
    assert_eq!(h.core.channel_data(&a.five, 0x4000, 8, t600_001), None);
    assert_eq!(
        h.core.from_peer(id, p1, 8, t600_001),
        Some(ToClient::DataIndication)
    );
    h.timeout(ms(600_002));
    assert!(!h.core.allocs[&id].channels.contains_key(&0x4000));
    assert!(!h.core.allocs[&id].peer_channels.contains_key(&p1));
    // After expiry the number may be bound to another peer (with a fresh nonce).
    let r = a.call(&mut h, METHOD_CHANNEL_BIND, &[&c2, &x2], ms(600_003));
    assert_eq!(code(&r), Some(438));
    assert!(a.s.learn(&r));
    ok(&a.call(&mut h, METHOD_CHANNEL_BIND, &[&c2, &x2], ms(600_004)));
}

#[test]
fn stale_nonce_gets_438_with_a_fresh_one() {
    let mut h = Harness::new();
    let mut a = alice(&mut h, 1);
    ok(&a.allocate(&mut h, ms(0)));
    let r = a.call(&mut h, METHOD_REFRESH, &[&Attr::Lifetime(600)], ms(600_001));
    assert_eq!(code(&r), Some(438));
    assert!(a.s.learn(&r));
    ok(&a.call(&mut h, METHOD_REFRESH, &[&Attr::Lifetime(600)], ms(600_002)));
    // A forged nonce is refused the same way.
    a.s.nonce = Some("0".repeat(40));
    assert_eq!(
        code(&a.call(&mut h, METHOD_REFRESH, &[], ms(600_003))),
        Some(438)
    );
}

#[test]
fn credentials_expiry_and_wrong_user() {
    let mut h = Harness::new();
    let (u, pw) = rest("old", UNIX0 - 1);
    let old = Client::new(&mut h, 1, &u, &pw, ms(0));
    assert_eq!(code(&old.allocate(&mut h, ms(0))), Some(401));
    // Wrong password: 401.
    let (u, _) = rest("bob", UNIX0 + 10);
    let bad = Client::new(&mut h, 2, &u, "nope", ms(0));
    assert_eq!(code(&bad.allocate(&mut h, ms(0))), Some(401));
    // A username that expires later keeps refreshing its allocation.
    let (u, pw) = rest("bob", UNIX0 + 10);
    let bob = Client::new(&mut h, 3, &u, &pw, ms(0));
    ok(&bob.allocate(&mut h, ms(0)));
    ok(&bob.call(&mut h, METHOD_REFRESH, &[&Attr::Lifetime(600)], ms(500_000)));
    // Another valid user on the same 5-tuple: 441.
    let mut carol = alice(&mut h, 3);
    carol.s.nonce = bob.s.nonce.clone();
    assert_eq!(
        code(&carol.call(&mut h, METHOD_REFRESH, &[], ms(1))),
        Some(441)
    );
    // Static users.
    let s = Client::new(&mut h, 4, "static", "static-pw", ms(0));
    ok(&s.allocate(&mut h, ms(0)));
}

#[test]
fn allocate_error_codes() {
    let mut h = Harness::new();
    let a = alice(&mut h, 1);
    let t = ms(0);
    assert_eq!(code(&a.call(&mut h, METHOD_ALLOCATE, &[], t)), Some(400));
    let tcp = Attr::Transport(6);
    assert_eq!(
        code(&a.call(&mut h, METHOD_ALLOCATE, &[&tcp], t)),
        Some(442)
    );
    assert_eq!(
        code(&a.call(&mut h, METHOD_ALLOCATE, &[&Attr::UDP, &Attr::Family(3)], t)),
        Some(440)
    );
    let r = a.call(
        &mut h,
        METHOD_ALLOCATE,
        &[&Attr::UDP, &Attr::EvenPort(0x80)],
        t,
    );
    assert_eq!(code(&r), Some(420));
    let token = Attr::Raw(ATTR_RESERVATION_TOKEN, vec![0; 8]);
    assert_eq!(
        code(&a.call(&mut h, METHOD_ALLOCATE, &[&Attr::UDP, &token], t)),
        Some(420)
    );
    let unknown = Attr::Raw(AttrType(0x0031), vec![0; 4]);
    assert_eq!(
        code(&a.call(&mut h, METHOD_ALLOCATE, &[&Attr::UDP, &unknown], t)),
        Some(420)
    );
    // Error answers to authenticated requests carry integrity.
    let r = a.call(&mut h, METHOD_ALLOCATE, &[&tcp], t);
    assert!(r.contains(ATTR_MESSAGE_INTEGRITY));
    // None of these asked for a relay socket.
    assert!(h.started.is_empty() && h.core.pending.is_empty());
    // EVEN-PORT without reservation is honoured.
    let r = a.call(
        &mut h,
        METHOD_ALLOCATE,
        &[&Attr::UDP, &Attr::EvenPort(0)],
        t,
    );
    ok(&r);
    assert_eq!(client::relayed_address(&r).unwrap().port() % 2, 0);
    // IPv6 relay on request; an IPv4 peer then mismatches (443).
    let b = alice(&mut h, 2);
    let r = b.call(&mut h, METHOD_ALLOCATE, &[&Attr::UDP, &Attr::Family(2)], t);
    ok(&r);
    assert!(client::relayed_address(&r).unwrap().is_ipv6());
    let r = b.call(
        &mut h,
        METHOD_CREATE_PERMISSION,
        &[&p(peer("192.0.2.1:1"))],
        t,
    );
    assert_eq!(code(&r), Some(443));
    ok(&b.call(
        &mut h,
        METHOD_CREATE_PERMISSION,
        &[&p(peer("[2001:db8::1]:1"))],
        t,
    ));
    assert_eq!(
        code(&b.call(&mut h, METHOD_CREATE_PERMISSION, &[&p(peer("[::1]:1"))], t)),
        Some(403)
    );
    // Refresh checks REQUESTED-ADDRESS-FAMILY like Allocate: the allocation's own
    // family is fine, the other one mismatches (443), a malformed one is 440.
    ok(&b.call(&mut h, METHOD_REFRESH, &[&Attr::Family(2)], t));
    assert_eq!(
        code(&b.call(&mut h, METHOD_REFRESH, &[&Attr::Family(1)], t)),
        Some(443)
    );
    let short = Attr::Raw(ATTR_REQUESTED_ADDRESS_FAMILY, vec![2]);
    assert_eq!(
        code(&b.call(&mut h, METHOD_REFRESH, &[&short], t)),
        Some(440)
    );
    // No IPv6 relay address: 440.
    let mut h = Harness::with(|cfg| cfg.relay_v6 = false);
    let a = alice(&mut h, 1);
    assert_eq!(
        code(&a.call(&mut h, METHOD_ALLOCATE, &[&Attr::UDP, &Attr::Family(2)], t)),
        Some(440)
    );
    // No free port: 508.
    h.bind_fails = Some(BindError::NoFreePort);
    assert_eq!(code(&a.allocate(&mut h, t)), Some(508));
    // Requests other than Allocate without an allocation: 437.
    assert_eq!(
        code(&a.call(
            &mut h,
            METHOD_CREATE_PERMISSION,
            &[&p(peer("192.0.2.1:1"))],
            t
        )),
        Some(437)
    );
    assert_eq!(
        code(&a.call(
            &mut h,
            METHOD_CHANNEL_BIND,
            &[&Attr::Channel(0x4000), &p(peer("192.0.2.1:1"))],
            t
        )),
        Some(437)
    );
}

#[test]
fn quotas() {
    let mut h = Harness::with(|cfg| {
        cfg.user_quota = 2;
        cfg.total_quota = 3;
    });
    for port in 1..=2 {
        let c = alice(&mut h, port);
        ok(&c.allocate(&mut h, ms(0)));
    }
    let c = alice(&mut h, 3);
    assert_eq!(code(&c.allocate(&mut h, ms(0))), Some(486));
    let (u, pw) = rest("bob", UNIX0 + 100);
    let bob = Client::new(&mut h, 4, &u, &pw, ms(0));
    ok(&bob.allocate(&mut h, ms(0)));
    let bob2 = Client::new(&mut h, 5, &u, &pw, ms(0));
    assert_eq!(code(&bob2.allocate(&mut h, ms(0))), Some(508));
    // Freed allocations free the quota.
    let a = alice(&mut h, 1);
    ok(&a.call(&mut h, METHOD_REFRESH, &[&Attr::Lifetime(0)], ms(0)));
    let c = alice(&mut h, 6);
    ok(&c.allocate(&mut h, ms(0)));
}

#[test]
fn retransmissions_get_the_same_answer() {
    let mut h = Harness::new();
    let a = alice(&mut h, 1);
    let req = a.s.request(METHOD_ALLOCATE, &[&Attr::UDP]);
    let first = h.answer(&req, a.five, ms(0));
    ok(&first);
    let again = h.answer(&req, a.five, ms(5_000));
    assert_eq!(first.raw, again.raw);
    assert_eq!(h.core.allocation_count(), 1);
    assert_eq!(h.started.len(), 1);
    // Errors are repeated as well (a retransmitted Refresh 0 stays a success).
    let refresh = a.s.request(METHOD_REFRESH, &[&Attr::Lifetime(0)]);
    let r1 = h.answer(&refresh, a.five, ms(6_000));
    let r2 = h.answer(&refresh, a.five, ms(6_500));
    ok(&r1);
    assert_eq!(r1.raw, r2.raw);
    // After the cache lifetime a replay is a new request.
    h.timeout(ms(6_000) + RETRANSMIT_TTL);
    let r3 = h.answer(&refresh, a.five, ms(6_001) + RETRANSMIT_TTL);
    assert_eq!(code(&r3), Some(437));
    // A new Allocate transaction on a 5-tuple that has an allocation: 437.
    ok(&a.allocate(&mut h, ms(50_000)));
    assert_eq!(code(&a.allocate(&mut h, ms(50_001))), Some(437));
}

#[test]
fn bandwidth_cap_is_a_token_bucket() {
    let mut h = Harness::with(|cfg| cfg.max_bps = 1000);
    let a = alice(&mut h, 1);
    ok(&a.allocate(&mut h, ms(0)));
    let (id, _) = h.core.allocation_of(&a.five).unwrap();
    let pa = peer("192.0.2.1:1");
    ok(&a.call(
        &mut h,
        METHOD_CHANNEL_BIND,
        &[&Attr::Channel(0x4000), &p(pa)],
        ms(0),
    ));
    let at = |n| h.at(ms(n));
    let (t0, t499, t500) = (at(0), at(499), at(500));
    assert!(h.core.channel_data(&a.five, 0x4000, 600, t0).is_some());
    assert!(h.core.from_peer(id, pa, 400, t0).is_some());
    assert!(h.core.channel_data(&a.five, 0x4000, 1, t0).is_none());
    assert!(h.core.channel_data(&a.five, 0x4000, 500, t499).is_none());
    assert!(h.core.channel_data(&a.five, 0x4000, 500, t500).is_some());
    // A clock reading older than the last one (another task took the lock first)
    // adds nothing and breaks nothing.
    assert!(h.core.channel_data(&a.five, 0x4000, 1, t0).is_none());
}

#[test]
fn peer_gone_and_client_gone_remove_allocations() {
    let mut h = Harness::new();
    for port in [1, 2] {
        let c = alice(&mut h, port);
        ok(&c.allocate(&mut h, ms(0)));
    }
    let (u, pw) = rest("bob", UNIX0 + 100);
    let bob = Client::new(&mut h, 3, &u, &pw, ms(0));
    ok(&bob.allocate(&mut h, ms(0)));
    assert_eq!(h.core.peer_gone("alice"), 2);
    assert_eq!(h.core.allocation_count(), 1);
    assert_eq!(h.core.peer_gone("nobody"), 0);
    h.core.client_gone(&bob.five);
    assert_eq!(h.core.allocation_count(), 0);
    let cmds = h.drain();
    h.run(cmds, ms(0));
    h.freed.sort_unstable();
    assert_eq!(h.freed, vec![1, 2, 3]);
    // Their deadlines went with them.
    assert_eq!(h.core.deadlines.len(), 0);
    assert!(h.core.per_user.is_empty());
}

// The contract: binding is the IO layer's, in two phases.

/// The token of the one bind command in `cmds`, which must hold nothing else.
fn only_bind(cmds: &[Command<u32>]) -> BindToken {
    match cmds {
        [Command::BindRelaySocket { token, .. }] => *token,
        other => panic!("one BindRelaySocket expected, got {other:?}"),
    }
}

#[test]
fn allocate_waits_for_its_socket_and_binds_once() {
    let mut h = Harness::with(|cfg| cfg.user_quota = 1);
    let a = alice(&mut h, 1);
    let req =
        a.s.request(METHOD_ALLOCATE, &[&Attr::UDP, &Attr::EvenPort(0)]);
    let cmds = h.input_raw(&req, a.five, ms(0));
    match cmds[..] {
        [Command::BindRelaySocket {
            family: Family::V4,
            even_port: true,
            ..
        }] => {}
        ref other => panic!("{other:?}"),
    }
    let token = only_bind(&cmds);
    // Retransmissions while the bind is pending: no second bind, no answer yet.
    for t in [500, 1_500] {
        assert!(h.input_raw(&req, a.five, ms(t)).is_empty());
    }
    // The pending Allocate holds the 5-tuple and the user's quota.
    let other_txid = a.s.request(METHOD_ALLOCATE, &[&Attr::UDP]);
    let r = h.answer(&other_txid, a.five, ms(1_600));
    assert_eq!(code(&r), Some(437));
    let b = alice(&mut h, 2);
    assert_eq!(code(&b.allocate(&mut h, ms(1_700))), Some(486));
    // The IO reports the socket: relaying starts, then the answer goes out.
    let relay = peer("192.0.2.10:50002");
    h.core.relay_bound(token, Ok((relay, 42)), h.at(ms(2_000)));
    let cmds = h.drain();
    let (id, reply) = match &cmds[..] {
        [Command::StartRelaying {
            id,
            client: c,
            relay: r,
            handle: 42,
        }, Command::SendToClient { to, bytes }]
            if *c == a.five && *r == relay && *to == a.five =>
        {
            (*id, client::parse(bytes).unwrap())
        }
        other => panic!("{other:?}"),
    };
    ok(&reply);
    assert!(client::answers(&req, &reply));
    assert_eq!(client::relayed_address(&reply), Some(relay));
    assert_eq!(h.core.allocation_of(&a.five), Some((id, relay)));
    // A later retransmission gets the cached answer and binds nothing.
    let again = h.answer(&req, a.five, ms(3_000));
    assert_eq!(again.raw, reply.raw);
    // The lifetime runs from the moment the socket was bound.
    h.timeout(ms(2_000) + secs(600) - ms(1));
    assert!(h.core.alive(id));
    h.timeout(ms(2_000) + secs(600));
    assert!(!h.core.alive(id));
    assert_eq!(h.freed, vec![42]);
}

#[test]
fn bind_failure_answers_508_and_frees_the_quota() {
    for error in [
        BindError::NoFreePort,
        BindError::FileLimit,
        BindError::Other,
    ] {
        let mut h = Harness::with(|cfg| cfg.user_quota = 1);
        let a = alice(&mut h, 1);
        let req = a.s.request(METHOD_ALLOCATE, &[&Attr::UDP]);
        let token = only_bind(&h.input_raw(&req, a.five, ms(0)));
        h.core.relay_bound(token, Err(error), h.at(ms(1)));
        let cmds = h.drain();
        let sent = h.run(cmds, ms(1));
        assert_eq!(sent.len(), 1, "{error:?}");
        let (to, r) = &sent[0];
        assert_eq!(*to, a.five);
        assert_eq!(code(r), Some(508));
        assert!(r.contains(ATTR_MESSAGE_INTEGRITY));
        // A retransmission gets the same 508 without another bind.
        let again = h.answer(&req, a.five, ms(2));
        assert_eq!(again.raw, r.raw);
        assert!(h.started.is_empty() && h.freed.is_empty());
        // The quota is free again.
        ok(&alice(&mut h, 2).allocate(&mut h, ms(3)));
    }
}

#[test]
fn sockets_nobody_waits_for_are_freed() {
    let mut h = Harness::new();
    let relay = peer("192.0.2.10:50002");
    // An unknown token.
    h.core
        .relay_bound(BindToken(99), Ok((relay, 7)), h.at(ms(0)));
    assert!(matches!(
        h.drain()[..],
        [Command::FreeRelaySocket { handle: 7 }]
    ));
    // The client's connection closed while the socket was being bound.
    let a = alice(&mut h, 1);
    let token =
        only_bind(&h.input_raw(&a.s.request(METHOD_ALLOCATE, &[&Attr::UDP]), a.five, ms(0)));
    h.core.client_gone(&a.five);
    assert!(h.drain().is_empty());
    h.core.relay_bound(token, Ok((relay, 8)), h.at(ms(1)));
    assert!(matches!(
        h.drain()[..],
        [Command::FreeRelaySocket { handle: 8 }]
    ));
    assert_eq!(h.core.allocation_count(), 0);
    // The peer left while the socket was being bound.
    let b = alice(&mut h, 2);
    let token =
        only_bind(&h.input_raw(&b.s.request(METHOD_ALLOCATE, &[&Attr::UDP]), b.five, ms(0)));
    assert_eq!(h.core.peer_gone("alice"), 1);
    h.core.relay_bound(token, Ok((relay, 9)), h.at(ms(1)));
    assert!(matches!(
        h.drain()[..],
        [Command::FreeRelaySocket { handle: 9 }]
    ));
    // A socket of the other family than asked for: freed, and the client gets 508.
    let c = alice(&mut h, 3);
    let token =
        only_bind(&h.input_raw(&c.s.request(METHOD_ALLOCATE, &[&Attr::UDP]), c.five, ms(0)));
    h.core
        .relay_bound(token, Ok((peer("[2001:db8::10]:50000"), 10)), h.at(ms(1)));
    let cmds = h.drain();
    assert!(matches!(cmds[0], Command::FreeRelaySocket { handle: 10 }));
    let sent = h.run(cmds, ms(1));
    assert_eq!(code(&sent[0].1), Some(508));
    assert_eq!(h.core.allocation_count(), 0);
    assert!(h.core.per_user.is_empty());
}

#[test]
fn an_unanswered_bind_gives_its_quota_back() {
    let mut h = Harness::with(|cfg| cfg.user_quota = 1);
    let a = alice(&mut h, 1);
    let token =
        only_bind(&h.input_raw(&a.s.request(METHOD_ALLOCATE, &[&Attr::UDP]), a.five, ms(0)));
    assert_eq!(h.poll_offset(), Some(BIND_TIMEOUT));
    h.timeout(BIND_TIMEOUT - ms(1));
    assert_eq!(h.core.pending.len(), 1);
    h.timeout(BIND_TIMEOUT);
    assert!(h.core.pending.is_empty());
    assert!(h.core.per_user.is_empty());
    // The answer that finally comes finds nobody waiting.
    h.core
        .relay_bound(token, Ok((peer("192.0.2.10:50002"), 5)), h.at(secs(6)));
    assert!(matches!(
        h.drain()[..],
        [Command::FreeRelaySocket { handle: 5 }]
    ));
    let b = alice(&mut h, 2);
    ok(&b.allocate(&mut h, secs(7)));
}

#[test]
fn poll_timeout_names_the_earliest_deadline() {
    let mut h = Harness::new();
    assert_eq!(h.poll_offset(), None);
    let a = alice(&mut h, 1);
    // A challenge keeps nothing.
    assert_eq!(h.poll_offset(), None);
    ok(&a.allocate(&mut h, ms(0)));
    // The cached Allocate answer (40 s) comes before the allocation (600 s).
    assert_eq!(h.poll_offset(), Some(RETRANSMIT_TTL));
    h.timeout(RETRANSMIT_TTL);
    assert_eq!(h.core.cache.len(), 0);
    assert_eq!(h.poll_offset(), Some(secs(600)));
    // A permission at 100 s: its answer is cached until 140 s, it lapses at 400 s.
    let pa = peer("192.0.2.1:1");
    ok(&a.call(&mut h, METHOD_CREATE_PERMISSION, &[&p(pa)], secs(100)));
    assert_eq!(h.poll_offset(), Some(secs(140)));
    h.timeout(secs(140));
    assert_eq!(h.poll_offset(), Some(secs(400)));
    h.timeout(secs(400));
    assert!(h.core.allocs.values().all(|a| a.perms.is_empty()));
    assert_eq!(h.poll_offset(), Some(secs(600)));
    // Refreshes move the allocation's deadline instead of adding one.
    for i in 0..100 {
        ok(&a.call(
            &mut h,
            METHOD_REFRESH,
            &[&Attr::Lifetime(600)],
            secs(500) + ms(i),
        ));
    }
    assert_eq!(h.core.deadlines.len(), 1);
    h.timeout(secs(500) + ms(99) + RETRANSMIT_TTL);
    assert_eq!(h.poll_offset(), Some(secs(1100) + ms(99)));
    h.timeout(secs(1100) + ms(99));
    assert_eq!(h.freed, vec![1]);
    assert_eq!(h.poll_offset(), None);
}

#[test]
fn a_wall_clock_step_does_not_touch_lifetimes() {
    let mut h = Harness::new();
    let a = alice(&mut h, 1);
    ok(&a.allocate(&mut h, ms(0)));
    let (id, _) = h.core.allocation_of(&a.five).unwrap();
    // NTP steps the clock ten days forward: the allocation, its nonce and its
    // refreshes carry on; only the REST username's own expiry is wall-clock time.
    h.wall = Some(UNIX_EPOCH + secs(UNIX0) + secs(10 * 86_400));
    h.timeout(secs(1));
    assert!(h.core.alive(id));
    ok(&a.call(&mut h, METHOD_REFRESH, &[&Attr::Lifetime(600)], secs(1)));
    let b = alice(&mut h, 2);
    assert_eq!(code(&b.allocate(&mut h, secs(2))), Some(401));
    // Then a day back: nothing is extended either.
    h.wall = Some(UNIX_EPOCH + secs(UNIX0) - secs(86_400));
    h.timeout(secs(601) - ms(1));
    assert!(h.core.alive(id));
    h.timeout(secs(601));
    assert!(!h.core.alive(id));
    assert_eq!(h.freed, vec![1]);
}

#[test]
fn permissions_and_channels_are_bounded_per_allocation() {
    let mut h = Harness::new();
    let a = alice(&mut h, 1);
    ok(&a.allocate(&mut h, ms(0)));
    let public = |i: usize| SocketAddr::from(([11, 0, (i / 256) as u8, (i % 256) as u8], 9));
    // 500 in one request, 12 more one by one: the limit exactly.
    let first: Vec<Attr> = (0..500).map(|i| p(public(i))).collect();
    let refs: Vec<&dyn Setter> = first.iter().map(|x| x as &dyn Setter).collect();
    ok(&a.call(&mut h, METHOD_CREATE_PERMISSION, &refs, ms(1)));
    for i in 500..MAX_PEERS_PER_ALLOCATION {
        ok(&a.call(&mut h, METHOD_CREATE_PERMISSION, &[&p(public(i))], ms(1)));
    }
    let one_more = p(public(MAX_PEERS_PER_ALLOCATION));
    let r = a.call(&mut h, METHOD_CREATE_PERMISSION, &[&one_more], ms(2));
    assert_eq!(code(&r), Some(508));
    // All or nothing: a known peer with a new one is refused as a whole.
    let r = a.call(
        &mut h,
        METHOD_CREATE_PERMISSION,
        &[&p(public(0)), &one_more],
        ms(2),
    );
    assert_eq!(code(&r), Some(508));
    // Refreshing existing permissions is fine, and so is a channel to a known peer.
    ok(&a.call(&mut h, METHOD_CREATE_PERMISSION, &[&p(public(0))], ms(3)));
    ok(&a.call(
        &mut h,
        METHOD_CHANNEL_BIND,
        &[&Attr::Channel(0x4000), &p(public(1))],
        ms(3),
    ));
    // A channel to a new peer needs a new permission: 508.
    let r = a.call(
        &mut h,
        METHOD_CHANNEL_BIND,
        &[&Attr::Channel(0x4001), &one_more],
        ms(3),
    );
    assert_eq!(code(&r), Some(508));
    let id = h.core.allocation_of(&a.five).unwrap().0;
    assert_eq!(h.core.allocs[&id].perms.len(), MAX_PEERS_PER_ALLOCATION);
    // Channels: the limit counts them too.
    let mut h = Harness::new();
    let a = alice(&mut h, 1);
    ok(&a.allocate(&mut h, ms(0)));
    ok(&a.call(&mut h, METHOD_REFRESH, &[&Attr::Lifetime(3600)], ms(1)));
    for i in 0..MAX_PEERS_PER_ALLOCATION {
        let n = 0x4000 + i as u16;
        ok(&a.call(
            &mut h,
            METHOD_CHANNEL_BIND,
            &[&Attr::Channel(n), &p(public(i))],
            ms(1),
        ));
    }
    // A new channel to another port of a known host (no new permission): 508.
    let n = 0x4000 + MAX_PEERS_PER_ALLOCATION as u16;
    let other_port = SocketAddr::new(public(0).ip(), 10);
    let r = a.call(
        &mut h,
        METHOD_CHANNEL_BIND,
        &[&Attr::Channel(n), &p(other_port)],
        ms(2),
    );
    assert_eq!(code(&r), Some(508));
    // Rebinding an existing channel refreshes it.
    ok(&a.call(
        &mut h,
        METHOD_CHANNEL_BIND,
        &[&Attr::Channel(0x4000), &p(public(0))],
        ms(2),
    ));
    // Every one of them lapses on time, and the deadlines with them.
    h.timeout(CHANNEL_LIFETIME + ms(2));
    let id = h.core.allocation_of(&a.five).unwrap().0;
    assert!(h.core.allocs[&id].channels.is_empty());
    assert!(h.core.allocs[&id].perms.is_empty());
    assert_eq!(h.core.deadlines.len(), 1);
}

#[test]
fn reset_forgets_everything_and_frees_every_socket() {
    let mut h = Harness::new();
    for port in [1, 2] {
        let c = alice(&mut h, port);
        ok(&c.allocate(&mut h, ms(0)));
    }
    let c = alice(&mut h, 3);
    let token =
        only_bind(&h.input_raw(&c.s.request(METHOD_ALLOCATE, &[&Attr::UDP]), c.five, ms(0)));
    // A half-done call left a command behind: reset drops it.
    h.core.send(c.five, vec![1, 2, 3]);
    h.core.reset();
    let cmds = h.drain();
    assert_eq!(cmds.len(), 2);
    assert!(cmds
        .iter()
        .all(|c| matches!(c, Command::FreeRelaySocket { .. })));
    assert_eq!(h.core.allocation_count(), 0);
    assert_eq!(h.core.poll_timeout(), None);
    assert!(h.core.per_user.is_empty() && h.core.by_five.is_empty());
    // The bind in flight finds nobody waiting; the clients start over.
    h.core
        .relay_bound(token, Ok((peer("192.0.2.10:50002"), 77)), h.at(ms(1)));
    assert!(matches!(
        h.drain()[..],
        [Command::FreeRelaySocket { handle: 77 }]
    ));
    ok(&c.allocate(&mut h, ms(2)));
}

#[test]
fn data_indications_carry_peer_and_payload() {
    let from = peer("[2001:db8::7]:5000");
    let m = client::parse(&data_indication(from, b"payload", [9; 12])).unwrap();
    assert_eq!(m.typ, MessageType::new(METHOD_DATA, CLASS_INDICATION));
    assert_eq!(m.transaction_id.0, [9; 12]);
    assert_eq!(client::peer_address(&m), Some(from));
    assert_eq!(client::data(&m).as_deref(), Some(&b"payload"[..]));
}

#[test]
fn garbage_and_responses_are_dropped_quietly() {
    let mut h = Harness::new();
    let f = five(1);
    for bytes in [
        vec![],
        vec![0; 19],
        vec![0xFF; 64],
        client::channel_data(0x4000, b"x", false),
    ] {
        assert!(h.input_raw(&bytes, f, ms(0)).is_empty());
    }
    // A success response sent to the server is not answered.
    let a = alice(&mut h, 2);
    let r = a.allocate(&mut h, ms(0));
    assert!(h.input_raw(&r.raw, f, ms(0)).is_empty());
    // A Send indication without an allocation goes nowhere.
    let send = client::send_indication(peer("192.0.2.1:1"), b"x");
    assert!(h.input_raw(&send, f, ms(0)).is_empty());
    // A corrupted FINGERPRINT is dropped.
    let mut bad = client::binding_request();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert!(h.input_raw(&bad, f, ms(0)).is_empty());
    // Unknown methods get 400.
    let r = h.answer(&client::request(METHOD_SEND, &[]), f, ms(0));
    assert_eq!(code(&r), Some(400));
}

#[test]
fn channel_numbers_beyond_0x4fff_get_400_and_their_data_is_dropped() {
    let mut h = Harness::new();
    let a = alice(&mut h, 1);
    ok(&a.allocate(&mut h, ms(0)));
    let (p1, p2) = (peer("192.0.2.1:1000"), peer("192.0.2.2:2000"));
    for (n, x) in [(0x5000, p1), (0x6ABC, p1), (0x7FFF, p2)] {
        let r = a.call(
            &mut h,
            METHOD_CHANNEL_BIND,
            &[&Attr::Channel(n), &Attr::Peer(x)],
            ms(0),
        );
        assert_eq!(code(&r), Some(400), "{n:#x}");
        assert_eq!(h.core.channel_data(&a.five, n, 8, h.at(ms(1))), None);
    }
    // The RFC 8656 range still works, up to its last number.
    ok(&a.call(
        &mut h,
        METHOD_CHANNEL_BIND,
        &[&Attr::Channel(0x4FFF), &Attr::Peer(p1)],
        ms(0),
    ));
    assert_eq!(
        h.core.channel_data(&a.five, 0x4FFF, 8, h.at(ms(1))),
        Some((1, p1))
    );
}

/// A harness whose server listens on 192.0.2.10 (UDP and TCP 3478, TLS 5349) and on
/// every address for HTTPS (443) and the redirect (8080): the relay addresses share
/// that host.
fn own_harness() -> Harness {
    Harness::with(|c| {
        use crate::relay::policy::Listener::{Tcp, Udp};
        c.own = OwnAddrs::new(
            &[
                Udp(peer("192.0.2.10:3478")),
                Tcp(peer("192.0.2.10:3478")),
                Tcp(peer("192.0.2.10:5349")),
                Tcp(peer("0.0.0.0:443")),
                Tcp(peer("[::]:8080")),
            ],
            [
                "192.0.2.10".parse().unwrap(),
                "2001:db8::10".parse().unwrap(),
            ],
        )
    })
}

#[test]
fn the_server_itself_is_never_a_peer() {
    let mut h = own_harness();
    let a = alice(&mut h, 1);
    let relay_a = client::relayed_address(&a.allocate(&mut h, ms(0))).unwrap();
    let (u, pw) = rest("bob", UNIX0 + 3600);
    let b = Client::new(&mut h, 2, &u, &pw, ms(0));
    let relay_b = client::relayed_address(&b.allocate(&mut h, ms(0))).unwrap();
    assert_eq!(relay_a.ip(), relay_b.ip());
    // The UDP listener.
    let listener = peer("192.0.2.10:3478");
    let r = a.call(&mut h, METHOD_CREATE_PERMISSION, &[&p(listener)], ms(1));
    assert_eq!(code(&r), Some(403));
    let r = a.call(
        &mut h,
        METHOD_CHANNEL_BIND,
        &[&Attr::Channel(0x4000), &p(listener)],
        ms(1),
    );
    assert_eq!(code(&r), Some(403));
    // Ports the server listens on with TCP only get no datagram from it: ordinary
    // peer ports.
    for (i, target) in ["192.0.2.10:5349", "192.0.2.10:443", "192.0.2.10:8080"]
        .into_iter()
        .enumerate()
    {
        ok(&a.call(&mut h, METHOD_CREATE_PERMISSION, &[&p(peer(target))], ms(1)));
        ok(&a.call(
            &mut h,
            METHOD_CHANNEL_BIND,
            &[&Attr::Channel(0x4010 + i as u16), &p(peer(target))],
            ms(1),
        ));
    }
    // Its own relay address: a loop.
    let r = a.call(&mut h, METHOD_CREATE_PERMISSION, &[&p(relay_a)], ms(1));
    assert_eq!(code(&r), Some(403));
    let r = a.call(
        &mut h,
        METHOD_CHANNEL_BIND,
        &[&Attr::Channel(0x4001), &p(relay_a)],
        ms(1),
    );
    assert_eq!(code(&r), Some(403));
    // Another allocation's relay address is an ordinary peer.
    ok(&a.call(&mut h, METHOD_CREATE_PERMISSION, &[&p(relay_b)], ms(2)));
    ok(&a.call(
        &mut h,
        METHOD_CHANNEL_BIND,
        &[&Attr::Channel(0x4002), &p(relay_b)],
        ms(2),
    ));
    assert_eq!(
        h.core.channel_data(&a.five, 0x4002, 8, h.at(ms(3))),
        Some((1, relay_b))
    );
    // The permission for the host's address covers every port, so Send
    // indications are checked by port: the UDP listener and the own relay get
    // nothing, a TCP-only port and another relay do.
    for target in [peer("192.0.2.10:3478"), relay_a] {
        let out = h.input(&client::send_indication(target, b"x"), a.five, ms(3));
        assert!(out.is_empty());
    }
    for target in [peer("192.0.2.10:443"), relay_b] {
        let out = h.input(&client::send_indication(target, b"y"), a.five, ms(3));
        assert!(out.is_empty());
    }
    let sent: Vec<SocketAddr> = h.to_peers.iter().map(|(_, to, _)| *to).collect();
    assert_eq!(sent, vec![peer("192.0.2.10:443"), relay_b]);
}

#[test]
fn an_allowed_ipv4_peer_does_not_open_its_ipv6_translations() {
    let mut h =
        Harness::with(|c| c.policy = PeerPolicy::new(vec!["127.0.0.1/32".parse().unwrap()]));
    let a = alice(&mut h, 1);
    let r = a.call(
        &mut h,
        METHOD_ALLOCATE,
        &[&Attr::UDP, &Attr::Family(2)],
        ms(0),
    );
    assert!(client::relayed_address(&r).unwrap().is_ipv6());
    for target in [
        "[::127.0.0.1]:5000",
        "[64:ff9b::127.0.0.1]:5000",
        "[2002:7f00:1::1]:5000",
        "[2001:0:4136:e378:8000:63bf:80ff:fffe]:5000",
    ] {
        let r = a.call(&mut h, METHOD_CREATE_PERMISSION, &[&p(peer(target))], ms(1));
        assert_eq!(code(&r), Some(403), "permission to {target}");
        let r = a.call(
            &mut h,
            METHOD_CHANNEL_BIND,
            &[&Attr::Channel(0x4000), &p(peer(target))],
            ms(1),
        );
        assert_eq!(code(&r), Some(403), "channel to {target}");
    }
    // The mapped form is the allowed host itself.
    ok(&a.call(
        &mut h,
        METHOD_CREATE_PERMISSION,
        &[&p(peer("[::ffff:127.0.0.1]:5000"))],
        ms(2),
    ));
}

fn aaf(v: u8) -> Attr {
    Attr::Raw(ATTR_ADDITIONAL_ADDRESS_FAMILY, vec![v, 0, 0, 0])
}

/// A dual allocation for `c`: its IPv4 and IPv6 relay addresses.
fn dual(h: &mut Harness, c: &Client, at: Duration) -> (SocketAddr, SocketAddr) {
    let r = c.call(h, METHOD_ALLOCATE, &[&Attr::UDP, &aaf(2)], at);
    ok(&r);
    assert_eq!(client::address_error(&r), None);
    match client::relayed_addresses(&r)[..] {
        [v4, v6] if v4.is_ipv4() && v6.is_ipv6() => (v4, v6),
        ref other => panic!("two relayed addresses expected: {other:?}"),
    }
}

#[test]
fn additional_address_family_errors() {
    // With REQUESTED-ADDRESS-FAMILY: 400. Any value but IPv6: 400.
    let mut h = Harness::new();
    let b = alice(&mut h, 2);
    for attrs in [
        vec![Attr::UDP, aaf(2), Attr::Family(1)],
        vec![Attr::UDP, aaf(2), Attr::Family(2)],
        vec![Attr::UDP, aaf(1)],
        vec![
            Attr::UDP,
            Attr::Raw(ATTR_ADDITIONAL_ADDRESS_FAMILY, vec![2]),
        ],
    ] {
        let refs: Vec<&dyn Setter> = attrs.iter().map(|x| x as &dyn Setter).collect();
        let r = b.call(&mut h, METHOD_ALLOCATE, &refs, ms(1));
        assert_eq!(code(&r), Some(400), "{attrs:?}");
    }
    assert_eq!(h.core.allocation_count(), 0);
    // No IPv6 relay address: the IPv4 allocation with ADDRESS-ERROR-CODE 440 for
    // IPv6, and no IPv6 socket asked for.
    let mut h = Harness::with(|c| c.relay_v6 = false);
    let a = alice(&mut h, 1);
    let req = a.s.request(METHOD_ALLOCATE, &[&Attr::UDP, &aaf(2)]);
    let cmds = h.input_raw(&req, a.five, ms(0));
    assert!(matches!(
        cmds[..],
        [Command::BindRelaySocket {
            family: Family::V4,
            ..
        }]
    ));
    let sent = h.run(cmds, ms(0));
    let r = &sent[0].1;
    ok(r);
    assert_eq!(client::relayed_addresses(r).len(), 1);
    assert!(client::relayed_address(r).unwrap().is_ipv4());
    assert_eq!(client::address_error(r), Some((2, 440)));
    let e = r.get(ATTR_ADDRESS_ERROR_CODE).unwrap();
    assert_eq!(&e[..4], &[0x02, 0, 4, 40]);
    // No IPv4 relay: the allocation fails with 440.
    let mut h = Harness::with(|c| c.relay_v4 = false);
    let a = alice(&mut h, 1);
    let r = a.call(&mut h, METHOD_ALLOCATE, &[&Attr::UDP, &aaf(2)], ms(0));
    assert_eq!(code(&r), Some(440));
    // Without the attribute, one relay and no ADDRESS-ERROR-CODE.
    let mut h = Harness::new();
    let a = alice(&mut h, 1);
    let r = a.allocate(&mut h, ms(0));
    assert_eq!(client::relayed_addresses(&r).len(), 1);
    assert!(client::address_error(&r).is_none());
}

#[test]
fn dual_allocation_relays_each_family_through_its_own_socket() {
    let mut h = Harness::new();
    let a = alice(&mut h, 1);
    let (v4, v6) = dual(&mut h, &a, ms(0));
    // One allocation, two relay sockets, both serving it.
    assert_eq!(h.core.allocation_count(), 1);
    let (id, first) = h.core.allocation_of(&a.five).unwrap();
    assert_eq!(first, v4);
    assert_eq!(h.started, vec![(id, 1), (id, 2)]);
    let (p4, p6) = (peer("192.0.2.50:5000"), peer("[2001:db8::50]:5000"));
    // Permissions for both families in one request.
    ok(&a.call(&mut h, METHOD_CREATE_PERMISSION, &[&p(p4), &p(p6)], ms(1)));
    // Send indications leave through the socket of the peer's family.
    h.input(&client::send_indication(p4, b"four"), a.five, ms(2));
    h.input(&client::send_indication(p6, b"six"), a.five, ms(2));
    assert_eq!(
        h.to_peers,
        vec![(1, p4, b"four".to_vec()), (2, p6, b"six".to_vec())]
    );
    // Channels too.
    ok(&a.call(
        &mut h,
        METHOD_CHANNEL_BIND,
        &[&Attr::Channel(0x4000), &p(p4)],
        ms(3),
    ));
    ok(&a.call(
        &mut h,
        METHOD_CHANNEL_BIND,
        &[&Attr::Channel(0x4001), &p(p6)],
        ms(3),
    ));
    assert_eq!(
        h.core.channel_data(&a.five, 0x4000, 8, h.at(ms(4))),
        Some((1, p4))
    );
    assert_eq!(
        h.core.channel_data(&a.five, 0x4001, 8, h.at(ms(4))),
        Some((2, p6))
    );
    // Peers of both families reach the client.
    assert_eq!(
        h.core.from_peer(id, p4, 8, h.at(ms(5))),
        Some(ToClient::Channel(0x4000))
    );
    assert_eq!(
        h.core.from_peer(id, p6, 8, h.at(ms(5))),
        Some(ToClient::Channel(0x4001))
    );
    // Either of its own relay addresses is a loop: 403.
    for own in [v4, v6] {
        let r = a.call(&mut h, METHOD_CREATE_PERMISSION, &[&p(own)], ms(6));
        assert_eq!(code(&r), Some(403), "{own}");
    }
    // Another client's dual allocation is an ordinary peer in both families.
    let (ub, pb) = rest("bob", UNIX0 + 3600);
    let b = Client::new(&mut h, 2, &ub, &pb, ms(7));
    let (b4, b6) = dual(&mut h, &b, ms(7));
    ok(&a.call(&mut h, METHOD_CREATE_PERMISSION, &[&p(b4), &p(b6)], ms(8)));
}

#[test]
fn dual_allocation_counts_once_against_the_quotas() {
    let mut h = Harness::with(|c| {
        c.user_quota = 1;
        c.total_quota = 2;
    });
    let a = alice(&mut h, 1);
    dual(&mut h, &a, ms(0));
    assert_eq!(h.core.per_user.values().copied().collect::<Vec<_>>(), [1]);
    // The user's one allocation is used.
    let a2 = alice(&mut h, 2);
    assert_eq!(code(&a2.allocate(&mut h, ms(1))), Some(486));
    // The total counts allocations, not sockets: a second user still gets one.
    let (ub, pb) = rest("bob", UNIX0 + 3600);
    let b = Client::new(&mut h, 3, &ub, &pb, ms(2));
    dual(&mut h, &b, ms(2));
    let (uc, pc) = rest("carol", UNIX0 + 3600);
    let c = Client::new(&mut h, 4, &uc, &pc, ms(3));
    assert_eq!(code(&c.allocate(&mut h, ms(3))), Some(508));
    // Freeing the dual allocation frees both sockets and the user's place.
    ok(&a.call(&mut h, METHOD_REFRESH, &[&Attr::Lifetime(0)], ms(4)));
    assert_eq!(h.freed, vec![1, 2]);
    ok(&a2.allocate(&mut h, ms(5)));
}

#[test]
fn dual_allocation_refresh_by_family_and_expiry() {
    let mut h = Harness::new();
    let mut a = alice(&mut h, 1);
    dual(&mut h, &a, ms(0));
    let (p4, p6) = (peer("192.0.2.50:5000"), peer("[2001:db8::50]:5000"));
    ok(&a.call_fresh(&mut h, METHOD_CREATE_PERMISSION, &[&p(p4), &p(p6)], ms(1)));
    ok(&a.call_fresh(
        &mut h,
        METHOD_CHANNEL_BIND,
        &[&Attr::Channel(0x4001), &p(p6)],
        ms(1),
    ));
    // Without REQUESTED-ADDRESS-FAMILY a Refresh extends both.
    let r = a.call_fresh(&mut h, METHOD_REFRESH, &[&Attr::Lifetime(1200)], secs(100));
    assert_eq!(lifetime_of(&r), 1200);
    // With it, only that family: IPv4 runs to 1300 s, IPv6 to 100 + 1800 s.
    let r = a.call_fresh(
        &mut h,
        METHOD_REFRESH,
        &[&Attr::Lifetime(1800), &Attr::Family(2)],
        secs(100),
    );
    assert_eq!(lifetime_of(&r), 1800);
    // Permissions are kept alive meanwhile.
    for t in [250, 500, 750, 1000, 1250] {
        ok(&a.call_fresh(&mut h, METHOD_CREATE_PERMISSION, &[&p(p4), &p(p6)], secs(t)));
        ok(&a.call_fresh(
            &mut h,
            METHOD_CHANNEL_BIND,
            &[&Attr::Channel(0x4001), &p(p6)],
            secs(t),
        ));
    }
    h.timeout(secs(1300) - ms(1));
    assert!(h.freed.is_empty());
    // The IPv4 relay expires alone; the allocation goes on with IPv6.
    h.timeout(secs(1300));
    assert_eq!(h.freed, vec![1]);
    assert_eq!(h.core.allocation_count(), 1);
    let (id, only) = h.core.allocation_of(&a.five).unwrap();
    assert!(only.is_ipv6());
    // IPv4 peers are now a family mismatch; IPv6 ones still work.
    let r = a.call_fresh(&mut h, METHOD_CREATE_PERMISSION, &[&p(p4)], secs(1301));
    assert_eq!(code(&r), Some(443));
    assert_eq!(h.core.from_peer(id, p4, 8, h.at(secs(1301))), None);
    h.input(&client::send_indication(p4, b"x"), a.five, secs(1301));
    assert!(h.to_peers.is_empty());
    assert_eq!(
        h.core.channel_data(&a.five, 0x4001, 8, h.at(secs(1301))),
        Some((2, p6))
    );
    let r = a.call_fresh(
        &mut h,
        METHOD_REFRESH,
        &[&Attr::Lifetime(600), &Attr::Family(1)],
        secs(1302),
    );
    assert_eq!(code(&r), Some(443));
    // The last relay's expiry ends the allocation.
    h.timeout(secs(1900));
    assert_eq!(h.freed, vec![1, 2]);
    assert_eq!(h.core.allocation_count(), 0);
    assert!(h.core.per_user.is_empty());
    // Nothing of it is left among the deadlines but cached answers.
    h.timeout(secs(2000));
    assert_eq!(h.core.deadlines.len(), 0);
}

#[test]
fn dual_allocation_deletes_one_family_or_both() {
    let mut h = Harness::new();
    let a = alice(&mut h, 1);
    dual(&mut h, &a, ms(0));
    let (p4, p6) = (peer("192.0.2.50:5000"), peer("[2001:db8::50]:5000"));
    ok(&a.call(&mut h, METHOD_CREATE_PERMISSION, &[&p(p4), &p(p6)], ms(1)));
    ok(&a.call(
        &mut h,
        METHOD_CHANNEL_BIND,
        &[&Attr::Channel(0x4001), &p(p6)],
        ms(1),
    ));
    // Lifetime 0 for IPv6: its socket, permissions and channels go; IPv4 stays.
    let r = a.call(
        &mut h,
        METHOD_REFRESH,
        &[&Attr::Lifetime(0), &Attr::Family(2)],
        ms(2),
    );
    assert_eq!(lifetime_of(&r), 0);
    assert_eq!(h.freed, vec![2]);
    assert_eq!(h.core.allocation_count(), 1);
    assert_eq!(h.core.channel_data(&a.five, 0x4001, 8, h.at(ms(3))), None);
    let (id, _) = h.core.allocation_of(&a.five).unwrap();
    assert_eq!(h.core.from_peer(id, p6, 8, h.at(ms(3))), None);
    assert!(h.core.from_peer(id, p4, 8, h.at(ms(3))).is_some());
    // The IPv6 permission's and channel's deadlines went with it: the next
    // deadlines are the IPv4 permission (300 s), then the allocation (600 s).
    h.timeout(RETRANSMIT_TTL + ms(10));
    assert_eq!(h.poll_offset(), Some(ms(1) + PERMISSION_LIFETIME));
    h.timeout(ms(1) + PERMISSION_LIFETIME);
    assert_eq!(h.poll_offset(), Some(secs(600)));
    // Lifetime 0 without a family deletes what is left.
    let r = a.call(&mut h, METHOD_REFRESH, &[&Attr::Lifetime(0)], secs(400));
    assert_eq!(lifetime_of(&r), 0);
    assert_eq!(h.freed, vec![2, 1]);
    assert_eq!(h.core.allocation_count(), 0);
    // Both at once, and a dual allocation ended by its client or its peer leaving.
    let b = alice(&mut h, 2);
    dual(&mut h, &b, secs(500));
    ok(&b.call(&mut h, METHOD_REFRESH, &[&Attr::Lifetime(0)], secs(501)));
    assert_eq!(h.freed, vec![2, 1, 3, 4]);
    let c = alice(&mut h, 3);
    dual(&mut h, &c, secs(502));
    h.core.client_gone(&c.five);
    let d = alice(&mut h, 4);
    dual(&mut h, &d, secs(503));
    assert_eq!(h.core.peer_gone("alice"), 1);
    let cmds = h.drain();
    h.run(cmds, secs(503));
    assert_eq!(h.freed, vec![2, 1, 3, 4, 5, 6, 7, 8]);
    assert_eq!(h.core.allocation_count(), 0);
    assert!(h.core.per_user.is_empty());
}

#[test]
fn dual_allocation_without_an_ipv6_socket_keeps_the_ipv4_one() {
    // The IPv6 bind fails: the IPv4 allocation alone, and ADDRESS-ERROR-CODE says
    // why (440: the address cannot be used; 508: out of ports or descriptors).
    for (error, expected) in [
        (BindError::Other, 440),
        (BindError::NoFreePort, 508),
        (BindError::FileLimit, 508),
    ] {
        let mut h = Harness::new();
        h.bind_fails_v6 = Some(error);
        let a = alice(&mut h, 1);
        let r = a.call(&mut h, METHOD_ALLOCATE, &[&Attr::UDP, &aaf(2)], ms(0));
        ok(&r);
        let relays = client::relayed_addresses(&r);
        assert!(matches!(relays[..], [v4] if v4.is_ipv4()), "{relays:?}");
        assert_eq!(client::address_error(&r), Some((2, expected)), "{error:?}");
        assert_eq!(h.started.len(), 1);
        assert_eq!(h.core.allocation_count(), 1);
        // An IPv6 peer is a family mismatch.
        let r = a.call(
            &mut h,
            METHOD_CREATE_PERMISSION,
            &[&p(peer("[2001:db8::50]:5000"))],
            ms(1),
        );
        assert_eq!(code(&r), Some(443));
    }
    // The IPv4 bind fails: 508 and no IPv6 bind at all.
    let mut h = Harness::new();
    let a = alice(&mut h, 1);
    let req = a.s.request(METHOD_ALLOCATE, &[&Attr::UDP, &aaf(2)]);
    let token = only_bind(&h.input_raw(&req, a.five, ms(0)));
    h.core
        .relay_bound(token, Err(BindError::NoFreePort), h.at(ms(1)));
    let cmds = h.drain();
    assert!(cmds
        .iter()
        .all(|c| !matches!(c, Command::BindRelaySocket { .. })));
    let sent = h.run(cmds, ms(1));
    assert_eq!(code(&sent[0].1), Some(508));
    assert!(h.core.per_user.is_empty());
}

#[test]
fn a_pending_dual_allocation_frees_its_first_socket() {
    let v4 = peer("192.0.2.10:50002");
    let v6 = peer("[2001:db8::10]:50002");
    let start = |h: &mut Harness, port: u16| -> (Client, Vec<u8>, BindToken) {
        let a = alice(h, port);
        let req = a.s.request(METHOD_ALLOCATE, &[&Attr::UDP, &aaf(2)]);
        let cmds = h.input_raw(&req, a.five, ms(0));
        assert!(matches!(
            cmds[..],
            [Command::BindRelaySocket {
                family: Family::V4,
                ..
            }]
        ));
        let token = only_bind(&cmds);
        h.core
            .relay_bound(token, Ok((v4, 10 + port as u32)), h.at(ms(1)));
        let cmds = h.drain();
        let token = match cmds[..] {
            [Command::BindRelaySocket {
                token,
                family: Family::V6,
                ..
            }] => token,
            ref other => panic!("the IPv6 bind expected: {other:?}"),
        };
        (a, req, token)
    };
    // Retransmissions while the IPv6 socket is bound get nothing yet; then one
    // answer with both addresses.
    let mut h = Harness::new();
    let (a, req, token) = start(&mut h, 1);
    assert!(h.input_raw(&req, a.five, ms(2)).is_empty());
    h.core.relay_bound(token, Ok((v6, 20)), h.at(ms(3)));
    let cmds = h.drain();
    let sent = h.run(cmds, ms(3));
    assert_eq!(sent.len(), 1);
    assert_eq!(client::relayed_addresses(&sent[0].1), vec![v4, v6]);
    assert_eq!(h.started.iter().map(|s| s.1).collect::<Vec<_>>(), [11, 20]);
    // The client leaves meanwhile: the IPv4 socket is freed, and so is the IPv6 one
    // when it comes.
    let mut h = Harness::new();
    let (a, _, token) = start(&mut h, 2);
    h.core.client_gone(&a.five);
    assert!(matches!(
        h.drain()[..],
        [Command::FreeRelaySocket { handle: 12 }]
    ));
    h.core.relay_bound(token, Ok((v6, 21)), h.at(ms(3)));
    assert!(matches!(
        h.drain()[..],
        [Command::FreeRelaySocket { handle: 21 }]
    ));
    assert!(h.core.per_user.is_empty() && h.core.pending.is_empty());
    // The IPv6 bind is never answered: the IPv4 socket is freed at the deadline.
    let mut h = Harness::new();
    let (_, _, _) = start(&mut h, 3);
    assert_eq!(h.poll_offset(), Some(ms(1) + BIND_TIMEOUT));
    h.timeout(ms(1) + BIND_TIMEOUT);
    assert_eq!(h.freed, vec![13]);
    assert!(h.core.per_user.is_empty() && h.core.pending.is_empty());
    // A reset frees it too.
    let mut h = Harness::new();
    let (_, _, _) = start(&mut h, 4);
    h.core.reset();
    assert!(matches!(
        h.drain()[..],
        [Command::FreeRelaySocket { handle: 14 }]
    ));
}
