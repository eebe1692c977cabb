//! Sockets: the listeners (UDP and TCP on one port, TLS), and relay sockets bound on
//! the core's request, on a random port of the configured range.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::Arc;

use anyhow::Context;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::relay::core::{BindError, Family};

/// Ports tried for one relay socket before the range counts as full.
const MAX_PROBES: u32 = 4096;

/// A bound relay socket. Cancelling `stop` ends its receive task.
#[derive(Debug)]
pub struct RelaySocket {
    pub socket: UdpSocket,
    pub stop: CancellationToken,
}

/// Where relay sockets are bound: per family, the address to bind and the address to
/// advertise (they differ behind 1:1 NAT), and the port range.
#[derive(Debug, Clone)]
pub struct RelayPorts {
    v4: Option<(IpAddr, IpAddr)>,
    v6: Option<(IpAddr, IpAddr)>,
    range: RangeInclusive<u16>,
}

/// What one failed bind means for the port scan.
#[derive(Debug, PartialEq, Eq)]
enum Probe {
    /// This port is taken (or not ours to use): try the next.
    NextPort,
    /// No port will do: stop.
    Stop(BindError),
}

fn classify(e: &io::Error) -> Probe {
    match e.raw_os_error() {
        Some(libc::EADDRINUSE) | Some(libc::EACCES) => Probe::NextPort,
        Some(libc::EMFILE) | Some(libc::ENFILE) => Probe::Stop(BindError::FileLimit),
        _ => Probe::Stop(BindError::Other),
    }
}

impl RelayPorts {
    /// `addrs` are (bind, advertised) pairs; the first of each family is used.
    pub fn new(addrs: &[(IpAddr, IpAddr)], range: RangeInclusive<u16>) -> RelayPorts {
        RelayPorts {
            v4: addrs.iter().find(|(b, _)| b.is_ipv4()).copied(),
            v6: addrs.iter().find(|(b, _)| b.is_ipv6()).copied(),
            range,
        }
    }

    pub fn has(&self, family: Family) -> bool {
        match family {
            Family::V4 => self.v4.is_some(),
            Family::V6 => self.v6.is_some(),
        }
    }

    /// Binds a relay socket of `family` on a port of the range (an even one if
    /// `even_port`), starting at a random port; returns the address to advertise.
    /// Must run inside the tokio runtime (the socket joins its reactor).
    pub fn bind(
        &self,
        family: Family,
        even_port: bool,
        stop: CancellationToken,
    ) -> Result<(SocketAddr, Arc<RelaySocket>), (BindError, Option<io::Error>)> {
        let (bind_ip, adv_ip) = match family {
            Family::V4 => self.v4,
            Family::V6 => self.v6,
        }
        .ok_or((BindError::Other, None))?;
        let (lo, hi) = (*self.range.start(), *self.range.end());
        let span = u32::from(hi.saturating_sub(lo)) + 1;
        let start = rand::random::<u32>() % span;
        for i in 0..span.min(MAX_PROBES) {
            let Ok(port) = u16::try_from(u32::from(lo) + (start + i) % span) else {
                continue;
            };
            if even_port && port % 2 == 1 {
                continue;
            }
            match bind_relay(SocketAddr::new(bind_ip, port)) {
                Ok(socket) => {
                    return Ok((
                        SocketAddr::new(adv_ip, port),
                        Arc::new(RelaySocket { socket, stop }),
                    ))
                }
                Err(e) => match classify(&e) {
                    Probe::NextPort => continue,
                    Probe::Stop(kind) => return Err((kind, Some(e))),
                },
            }
        }
        Err((BindError::NoFreePort, None))
    }
}

/// Logs why a relay socket could not be bound, naming the limit to raise.
pub fn log_bind_failure(kind: BindError, err: Option<&io::Error>) {
    match (kind, err.and_then(io::Error::raw_os_error)) {
        (BindError::NoFreePort, _) => tracing::warn!(
            "no free relay port in turn.relay_ports ({MAX_PROBES} ports tried); widen the range"
        ),
        (BindError::FileLimit, Some(libc::ENFILE)) => tracing::warn!(
            "cannot open a relay socket: the system is out of file descriptors (ENFILE); \
             raise fs.file-max (sysctl), not turn.relay_ports"
        ),
        (BindError::FileLimit, _) => tracing::warn!(
            "cannot open a relay socket: this process is out of file descriptors (EMFILE); \
             raise its open-files limit (LimitNOFILE= in the systemd unit, or ulimit -n), \
             not turn.relay_ports"
        ),
        (BindError::Other, _) => match err {
            Some(e) => tracing::warn!(error = %e, "cannot bind a relay socket"),
            None => tracing::warn!("cannot bind a relay socket: no relay address of that family"),
        },
    }
}

fn bind_relay(addr: SocketAddr) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    buffer_sizes(&s, 1 << 20);
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

/// Asks for larger socket buffers; the kernel may grant less (`net.core.rmem_max`),
/// which only costs burst tolerance, so a refusal is logged and not fatal.
fn buffer_sizes(s: &Socket, bytes: usize) {
    if let Err(e) = s.set_recv_buffer_size(bytes) {
        tracing::debug!(error = %e, "socket receive buffer size not set");
    }
    if let Err(e) = s.set_send_buffer_size(bytes) {
        tracing::debug!(error = %e, "socket send buffer size not set");
    }
}

/// Relay bind/advertise addresses: configured, else derived from `turn.listen` or the
/// machine's first non-loopback address per family.
pub fn relay_addresses(cfg: &Config, listen: SocketAddr) -> Vec<(IpAddr, IpAddr)> {
    let mut ips = cfg.turn.relay_ips.clone();
    if ips.is_empty() {
        if !listen.ip().is_unspecified() {
            ips.push(listen.ip());
        } else {
            let locals = crate::net::local_ips();
            for want_v4 in [true, false] {
                if let Some(ip) = locals
                    .iter()
                    .find(|ip| ip.is_ipv4() == want_v4 && !ip.is_loopback())
                {
                    ips.push(*ip);
                }
            }
        }
    }
    let external = &cfg.turn.external_ips;
    ips.into_iter()
        .map(|ip| {
            // Behind 1:1 NAT the public address of the same family is advertised.
            let adv = external
                .iter()
                .find(|e| e.is_ipv4() == ip.is_ipv4())
                .copied()
                .unwrap_or(ip);
            (ip, adv)
        })
        .collect()
}

pub fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Dual stack where the system allows it; IPv6-only otherwise.
        if let Err(e) = s.set_only_v6(false) {
            tracing::debug!(error = %e, "turn.listen stays IPv6-only");
        }
    }
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    buffer_sizes(&s, 4 << 20);
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

pub fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

/// UDP and TCP on the same port, so one port number serves both. With port 0 the
/// kernel picks the UDP port, which TCP may already hold elsewhere: try again a few
/// times before giving up.
pub fn bind_udp_and_tcp(
    listen: SocketAddr,
) -> anyhow::Result<(UdpSocket, SocketAddr, TcpListener)> {
    let attempts = if listen.port() == 0 { 20 } else { 1 };
    let mut last_err = None;
    for _ in 0..attempts {
        let udp = bind_udp(listen)
            .with_context(|| format!("cannot listen on {listen} (UDP, turn.listen)"))?;
        let udp_addr = udp.local_addr()?;
        let tcp_addr = SocketAddr::new(listen.ip(), udp_addr.port());
        match bind_tcp(tcp_addr) {
            Ok(tcp) => return Ok((udp, udp_addr, tcp)),
            Err(e) => last_err = Some((tcp_addr, e)),
        }
    }
    match last_err {
        Some((addr, e)) => {
            Err(anyhow::Error::new(e)
                .context(format!("cannot listen on {addr} (TCP, turn.listen)")))
        }
        None => Err(anyhow::anyhow!("cannot listen on {listen} (turn.listen)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback(range: RangeInclusive<u16>) -> RelayPorts {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let adv: IpAddr = "203.0.113.9".parse().unwrap();
        RelayPorts::new(&[(lo, adv)], range)
    }

    /// A free span of `n` loopback UDP ports, probed by binding them.
    fn free_span(n: u16) -> RangeInclusive<u16> {
        for base in (41_000u16..48_000).step_by(97) {
            let held: Vec<_> = (base..base + n)
                .map_while(|p| std::net::UdpSocket::bind(("127.0.0.1", p)).ok())
                .collect();
            if held.len() == usize::from(n) {
                return base..=base + n - 1;
            }
        }
        panic!("no free span of {n} ports");
    }

    #[tokio::test]
    async fn binds_in_the_range_and_advertises_the_public_address() {
        let range = free_span(8);
        let ports = loopback(range.clone());
        assert!(ports.has(Family::V4) && !ports.has(Family::V6));
        let mut held = Vec::new();
        for even in [false, true] {
            let (adv, sock) = ports
                .bind(Family::V4, even, CancellationToken::new())
                .unwrap();
            let local = sock.socket.local_addr().unwrap();
            assert_eq!(
                adv,
                SocketAddr::new("203.0.113.9".parse().unwrap(), local.port())
            );
            assert!(range.contains(&local.port()));
            if even {
                assert_eq!(local.port() % 2, 0);
            }
            held.push(sock);
        }
        // The whole range taken: NoFreePort, not an error about something else.
        while let Ok((_, s)) = ports.bind(Family::V4, false, CancellationToken::new()) {
            held.push(s);
        }
        // (Another process may hold a port of the span by now; the rest were ours.)
        assert!((2..=8).contains(&held.len()), "{}", held.len());
        let err = ports
            .bind(Family::V4, false, CancellationToken::new())
            .map(|_| ())
            .unwrap_err();
        assert_eq!(err.0, BindError::NoFreePort);
        // No IPv6 relay address.
        let err = ports
            .bind(Family::V6, false, CancellationToken::new())
            .map(|_| ())
            .unwrap_err();
        assert_eq!(err.0, BindError::Other);
    }

    #[test]
    fn file_descriptor_limits_stop_the_scan() {
        let e = |n| io::Error::from_raw_os_error(n);
        assert_eq!(
            classify(&e(libc::EMFILE)),
            Probe::Stop(BindError::FileLimit)
        );
        assert_eq!(
            classify(&e(libc::ENFILE)),
            Probe::Stop(BindError::FileLimit)
        );
        assert_eq!(classify(&e(libc::EADDRINUSE)), Probe::NextPort);
        assert_eq!(classify(&e(libc::EACCES)), Probe::NextPort);
        assert_eq!(
            classify(&e(libc::EADDRNOTAVAIL)),
            Probe::Stop(BindError::Other)
        );
    }
}
