//! Address and host-name helpers shared by the HTTP layer, signaling, ICE and config:
//! one canonical form for IP addresses, and host names as clients send and see them.

use std::net::{IpAddr, Ipv6Addr};

/// An IPv4-mapped IPv6 address as plain IPv4, so allow-lists match either form.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// A bare host name or IP address (IPv6 with or without brackets).
pub fn valid_host(s: &str) -> bool {
    if s.is_empty() || s.len() > 253 {
        return false;
    }
    let bare = s.trim_start_matches('[').trim_end_matches(']');
    if bare.parse::<IpAddr>().is_ok() {
        return true;
    }
    s.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            && !label.starts_with('-')
    })
}

/// Host part of a `Host` header value, validated and lower-cased (port removed, IPv6
/// kept in brackets); `None` if malformed.
pub fn host_part(header: &str) -> Option<String> {
    let header = header.trim();
    let host = if let Some(rest) = header.strip_prefix('[') {
        let end = rest.find(']')?;
        let inner = &rest[..end];
        inner.parse::<Ipv6Addr>().ok()?;
        format!("[{inner}]")
    } else {
        header.split(':').next()?.to_string()
    };
    valid_host(&host).then(|| host.to_ascii_lowercase())
}

/// The host clients should use: `public_host` if set, else the Host header's host part,
/// else `localhost`.
pub fn client_host(public_host: &str, host_header: Option<&str>) -> String {
    if !public_host.is_empty() {
        return bracket_v6(public_host);
    }
    match host_header.and_then(host_part) {
        Some(h) => h,
        None => "localhost".into(),
    }
}

/// An IPv6 literal in brackets, as URLs need it; anything else unchanged.
fn bracket_v6(h: &str) -> String {
    if h.contains(':') && !h.starts_with('[') {
        format!("[{h}]")
    } else {
        h.to_string()
    }
}

/// Every address on a local interface (loopback included).
pub fn local_ips() -> Vec<IpAddr> {
    let mut ips = vec![
        IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
    ];
    if let Ok(ifaces) = if_addrs::get_if_addrs() {
        for iface in ifaces {
            let ip = iface.ip();
            if let IpAddr::V6(v6) = ip {
                // Link-local addresses need a scope and cannot go in a certificate usefully.
                if (v6.segments()[0] & 0xffc0) == 0xfe80 {
                    continue;
                }
            }
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
    }
    ips
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_ips() {
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(canonical_ip(mapped), "127.0.0.1".parse::<IpAddr>().unwrap());
        let v6: IpAddr = "::1".parse().unwrap();
        assert_eq!(canonical_ip(v6), v6);
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(canonical_ip(v4), v4);
    }

    #[test]
    fn hosts() {
        assert!(valid_host("example.org"));
        assert!(valid_host("[::1]"));
        assert!(valid_host("10.0.0.1"));
        assert!(!valid_host("https://x"));
        assert!(!valid_host("a:443"));
        assert!(!valid_host(""));
        assert!(!valid_host("-a.example"));
        assert!(!valid_host(&"a".repeat(254)));
    }

    #[test]
    fn host_parts() {
        assert_eq!(
            host_part("example.org:8443").as_deref(),
            Some("example.org")
        );
        assert_eq!(host_part("Example.ORG").as_deref(), Some("example.org"));
        assert_eq!(host_part("[::1]:8443").as_deref(), Some("[::1]"));
        assert_eq!(host_part("[::1]").as_deref(), Some("[::1]"));
        assert_eq!(host_part("10.1.2.3").as_deref(), Some("10.1.2.3"));
        assert_eq!(host_part("evil.org/x"), None);
        assert_eq!(host_part("[zz]:1"), None);
        assert_eq!(host_part("[::1"), None);
    }

    #[test]
    fn client_hosts() {
        assert_eq!(
            client_host("meet.example.org", Some("x:1")),
            "meet.example.org"
        );
        assert_eq!(client_host("2001:db8::1", None), "[2001:db8::1]");
        assert_eq!(client_host("", Some("a.example:8443")), "a.example");
        assert_eq!(client_host("", Some("bad/host")), "localhost");
        assert_eq!(client_host("", None), "localhost");
    }
}
