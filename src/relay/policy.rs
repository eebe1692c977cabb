//! Which peer addresses the relay may send to. Private, loopback, link-local,
//! multicast and reserved ranges are refused unless `turn.allowed_peer_ranges` opens
//! them. An IPv4-mapped address (`::ffff:a.b.c.d`) is the IPv4 host itself and follows
//! the IPv4 rule; other IPv6 encodings that embed an IPv4 address (compatible, NAT64,
//! 6to4, Teredo) name a different host (a gateway): they are refused when the
//! embedded address is, and an allowed IPv4 range does not open them (only an IPv6
//! range does). [`OwnAddrs`] names the server's own UDP listeners, which the relay
//! never sends to.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

/// Peer address policy: a denied-by-default list of special ranges with configured
/// exceptions.
#[derive(Debug, Clone, Default)]
pub struct PeerPolicy {
    allowed: Vec<IpNet>,
}

impl PeerPolicy {
    pub fn new(allowed: Vec<IpNet>) -> Self {
        PeerPolicy { allowed }
    }

    fn opened(&self, ip: IpAddr) -> bool {
        self.allowed.iter().any(|n| n.contains(&ip))
    }

    /// True when relaying to `ip` is allowed.
    pub fn permits(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v4) => self.permits_v4(v4),
            IpAddr::V6(v6) => {
                if let Some(v4) = v6.to_ipv4_mapped() {
                    return self.permits_v4(v4);
                }
                if self.opened(ip) {
                    return true;
                }
                // A translated form is judged on its own: an opened IPv4 range does
                // not open it, a denied embedded address denies it.
                if embedded_v4(v6).is_some_and(denied_v4) {
                    return false;
                }
                !denied_v6_native(v6)
            }
        }
    }

    fn permits_v4(&self, v4: Ipv4Addr) -> bool {
        self.opened(IpAddr::V4(v4)) || !denied_v4(v4)
    }
}

/// A bound listening socket of the server, by protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// STUN/TURN over UDP.
    Udp(SocketAddr),
    /// HTTPS, the HTTP redirect, TURN over TCP and TLS.
    Tcp(SocketAddr),
}

impl Listener {
    fn addr(self) -> SocketAddr {
        match self {
            Listener::Udp(a) | Listener::Tcp(a) => a,
        }
    }
}

/// The server's own addresses: its UDP listeners (STUN/TURN) and the host addresses
/// they can be reached on. A peer address naming one of them is refused whatever the
/// policy allows, so the relay cannot be pointed at the server itself. The relay
/// sends only UDP datagrams, from its relay sockets, so a port the server listens on
/// with TCP alone (HTTPS, the redirect, TURN over TLS) receives nothing from it and
/// is not refused; every listener's address counts as a host address.
#[derive(Debug, Clone, Default)]
pub struct OwnAddrs {
    /// Host addresses (canonical form); loopback and unspecified are always included.
    ips: Vec<IpAddr>,
    /// The ports of the UDP listeners.
    udp_ports: Vec<u16>,
}

impl OwnAddrs {
    /// `listeners` are the bound listeners (a wildcard address listens on every host
    /// address); `host_ips` the machine's and advertised addresses.
    pub fn new(listeners: &[Listener], host_ips: impl IntoIterator<Item = IpAddr>) -> Self {
        let mut ips: Vec<IpAddr> = host_ips
            .into_iter()
            .chain(listeners.iter().map(|l| l.addr().ip()))
            .map(crate::net::canonical_ip)
            .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
            .collect();
        ips.sort_unstable();
        ips.dedup();
        let mut udp_ports: Vec<u16> = listeners
            .iter()
            .filter_map(|l| match l {
                Listener::Udp(a) => Some(a.port()),
                Listener::Tcp(_) => None,
            })
            .collect();
        udp_ports.sort_unstable();
        udp_ports.dedup();
        OwnAddrs { ips, udp_ports }
    }

    /// Whether `ip` reaches this host (loopback, unspecified, or one of its addresses).
    pub fn is_host(&self, ip: IpAddr) -> bool {
        let ip = crate::net::canonical_ip(ip);
        ip.is_loopback() || ip.is_unspecified() || self.ips.contains(&ip)
    }

    /// Whether `addr` is one of the server's UDP listeners (on any host address).
    pub fn is_listener(&self, addr: SocketAddr) -> bool {
        self.udp_ports.contains(&addr.port()) && self.is_host(addr.ip())
    }
}

fn in_v4(ip: Ipv4Addr, net: [u8; 4], prefix: u32) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    (u32::from(ip) & mask) == (u32::from(Ipv4Addr::from(net)) & mask)
}

/// Special-purpose IPv4 ranges (RFC 6890 and friends) that are never relayed to.
fn denied_v4(ip: Ipv4Addr) -> bool {
    const DENIED: &[([u8; 4], u32)] = &[
        ([0, 0, 0, 0], 8),       // "this network", unspecified
        ([10, 0, 0, 0], 8),      // private
        ([100, 64, 0, 0], 10),   // CGNAT shared space
        ([127, 0, 0, 0], 8),     // loopback
        ([169, 254, 0, 0], 16),  // link-local (cloud metadata)
        ([172, 16, 0, 0], 12),   // private
        ([192, 0, 0, 0], 24),    // IETF protocol assignments
        ([192, 0, 2, 0], 24),    // TEST-NET-1
        ([192, 88, 99, 0], 24),  // 6to4 relay anycast
        ([192, 168, 0, 0], 16),  // private
        ([198, 18, 0, 0], 15),   // benchmarking
        ([198, 51, 100, 0], 24), // TEST-NET-2
        ([203, 0, 113, 0], 24),  // TEST-NET-3
        ([224, 0, 0, 0], 4),     // multicast
        ([240, 0, 0, 0], 4),     // reserved, incl. broadcast 255.255.255.255
    ];
    DENIED.iter().any(|(net, p)| in_v4(ip, *net, *p))
}

fn in_v6(ip: Ipv6Addr, net: [u16; 8], prefix: u32) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - prefix)
    };
    (u128::from(ip) & mask) == (u128::from(Ipv6Addr::from(net)) & mask)
}

/// Special IPv6 ranges, judged on the IPv6 address itself.
fn denied_v6_native(ip: Ipv6Addr) -> bool {
    const DENIED: &[([u16; 8], u32)] = &[
        ([0, 0, 0, 0, 0, 0, 0, 0], 96), // ::/96 unspecified, loopback, compat
        ([0, 0, 0, 0, 0, 0xffff, 0, 0], 96), // IPv4-mapped
        ([0, 0, 0, 0, 0xffff, 0, 0, 0], 96), // IPv4-translated (RFC 2765)
        ([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48), // NAT64 local use
        ([0x100, 0, 0, 0, 0, 0, 0, 0], 64), // discard-only
        ([0x2001, 0, 0, 0, 0, 0, 0, 0], 23), // IETF protocol assignments (incl. Teredo)
        ([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32), // documentation
        ([0x2002, 0, 0, 0, 0, 0, 0, 0], 16), // 6to4 (judged by embedded v4 too)
        ([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20), // documentation (RFC 9637)
        ([0x5f00, 0, 0, 0, 0, 0, 0, 0], 16), // segment routing SIDs
        ([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7), // unique local
        ([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), // link-local
        ([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10), // site-local (deprecated)
        ([0xff00, 0, 0, 0, 0, 0, 0, 0], 8), // multicast
    ];
    DENIED.iter().any(|(net, p)| in_v6(ip, *net, *p))
}

/// The IPv4 address an IPv6 address stands for, in the encodings a relay could be
/// tricked with: IPv4-mapped, IPv4-compatible, SIIT-translated, NAT64 (well-known
/// and local-use prefixes), 6to4 and Teredo (both server and client addresses are
/// checked by the caller through `teredo_v4s`).
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let low = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    if s[..5] == [0, 0, 0, 0, 0] && (s[5] == 0 || s[5] == 0xffff) {
        return Some(low);
    }
    if s[..4] == [0, 0, 0, 0] && s[4] == 0xffff && s[5] == 0 {
        return Some(low);
    }
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        return Some(low);
    }
    if s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1 {
        return Some(low);
    }
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ));
    }
    if s[0] == 0x2001 && s[1] == 0 {
        // Teredo: the client's public IPv4 address is stored inverted in the last
        // 32 bits; a denied one there (or in the server field) denies the address.
        let client = Ipv4Addr::from(!u32::from(low));
        let server = Ipv4Addr::new((s[2] >> 8) as u8, s[2] as u8, (s[3] >> 8) as u8, s[3] as u8);
        if denied_v4(server) {
            return Some(server);
        }
        return Some(client);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(allowed: &[&str]) -> PeerPolicy {
        PeerPolicy::new(allowed.iter().map(|s| s.parse().unwrap()).collect())
    }

    fn ok(pol: &PeerPolicy, ip: &str) -> bool {
        pol.permits(ip.parse().unwrap())
    }

    #[test]
    fn denies_special_ranges_by_default() {
        let pol = p(&[]);
        for ip in [
            "127.0.0.1",
            "127.8.9.10",
            "0.0.0.0",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.254",
            "169.254.169.254",
            "224.0.0.1",
            "239.255.255.250",
            "255.255.255.255",
            "240.0.0.1",
            "192.0.2.1",
            "198.18.0.1",
            "::",
            "::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "2001:db8::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "::10.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::1",
            "2002:a9fe:a9fe::1",
            "2002:c0a8:101::",
            "2001:0:4136:e378:8000:63bf:80ff:fffe", // Teredo client 127.0.0.1
            "2001::1",
        ] {
            assert!(!ok(&pol, ip), "{ip} must be denied");
        }
    }

    #[test]
    fn allows_public_addresses() {
        let pol = p(&[]);
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "2a00:1450::1",
            "2606:4700::1111",
        ] {
            assert!(ok(&pol, ip), "{ip} must be allowed");
        }
    }

    #[test]
    fn configured_ranges_open_exactly_themselves() {
        let pol = p(&["127.0.0.0/8", "192.168.1.0/24"]);
        assert!(ok(&pol, "127.0.0.1"));
        assert!(ok(&pol, "192.168.1.77"));
        assert!(ok(&pol, "::ffff:127.0.0.1"));
        assert!(!ok(&pol, "192.168.2.1"));
        assert!(!ok(&pol, "169.254.169.254"));
        assert!(!ok(&pol, "::1"));
        assert!(!ok(&pol, "10.0.0.1"));
    }

    #[test]
    fn an_allowed_ipv4_range_does_not_open_its_translations() {
        let pol = p(&["127.0.0.1/32", "192.168.1.0/24"]);
        // Mapped: the same host, the IPv4 rule.
        assert!(ok(&pol, "::ffff:127.0.0.1"));
        assert!(ok(&pol, "::ffff:192.168.1.9"));
        assert!(!ok(&pol, "::ffff:127.0.0.2"));
        // Every other encoding names another host (a translator, a tunnel relay).
        for ip in [
            "::127.0.0.1",                          // IPv4-compatible
            "64:ff9b::127.0.0.1",                   // NAT64 well-known prefix
            "64:ff9b:1::7f00:1",                    // NAT64 local-use prefix
            "::ffff:0:127.0.0.1",                   // SIIT translated
            "2002:7f00:1::1",                       // 6to4
            "2002:c0a8:109::1",                     // 6to4 of 192.168.1.9
            "2001:0:4136:e378:8000:63bf:80ff:fffe", // Teredo, client 127.0.0.1
            "::192.168.1.9",
            "64:ff9b::c0a8:109",
        ] {
            assert!(!ok(&pol, ip), "{ip} must be refused");
        }
        // An IPv6 range opens them explicitly.
        let pol = p(&["127.0.0.1/32", "64:ff9b::/96"]);
        assert!(ok(&pol, "64:ff9b::127.0.0.1"));
        assert!(!ok(&pol, "::127.0.0.1"));
        // A NAT64 address of a public host stays allowed by default.
        assert!(ok(&p(&[]), "64:ff9b::808:808"));
    }

    #[test]
    fn own_udp_listeners_on_every_host_address() {
        let a = |s: &str| -> SocketAddr { s.parse().unwrap() };
        let own = OwnAddrs::new(
            &[
                Listener::Udp(a("0.0.0.0:3478")),
                Listener::Tcp(a("0.0.0.0:3478")),
                Listener::Udp(a("[::]:3479")),
                Listener::Tcp(a("127.0.0.1:443")),
                Listener::Tcp(a("[::]:5349")),
                // A TCP listener's address is a host address.
                Listener::Tcp(a("203.0.113.4:80")),
            ],
            [
                "198.51.100.7".parse().unwrap(),
                "2001:db8::7".parse().unwrap(),
            ],
        );
        for s in [
            "127.0.0.1:3478",
            "127.0.0.2:3478",
            "0.0.0.0:3479",
            "198.51.100.7:3478",
            "[::ffff:198.51.100.7]:3478",
            "[2001:db8::7]:3479",
            "[::1]:3478",
            "203.0.113.4:3478",
        ] {
            assert!(own.is_listener(a(s)), "{s}");
        }
        // Ports the server listens on with TCP only receive no datagram from the
        // relay; other hosts' addresses are not the server's.
        for s in [
            "127.0.0.1:443",
            "198.51.100.7:5349",
            "[2001:db8::7]:80",
            "198.51.100.8:3478",
            "198.51.100.7:3480",
            "[2001:db8::8]:3479",
        ] {
            assert!(!own.is_listener(a(s)), "{s}");
        }
        assert!(own.is_host("198.51.100.7".parse().unwrap()));
        assert!(own.is_host("203.0.113.4".parse().unwrap()));
        assert!(!own.is_host("198.51.100.8".parse().unwrap()));
    }
}
