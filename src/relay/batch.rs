//! Batched datagram IO for the relay's hot path: `recvmmsg` on the listener and
//! `sendmmsg` per relay socket, so a busy allocation costs a fraction of a system
//! call per packet. Linux only (the product's platform). Failures surface as
//! `io::Error`; UDP sends that would block are dropped like any congested datagram.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// Datagrams per `recvmmsg`/`sendmmsg` call.
pub const BATCH: usize = 32;
/// Largest datagram kept whole (anything larger is dropped as truncated).
pub const SLOT: usize = 65_536;
/// Room in front of every datagram, for a ChannelData header written in place.
pub const HEADROOM: usize = 4;
/// Distance between two slots: the headroom, the datagram, and room behind it for
/// the padding of a ChannelData frame on a stream (at most 3 bytes).
const STRIDE: usize = HEADROOM + SLOT + 4;

/// Receive buffers for one batch, with the `recvmmsg` headers kept between calls (so
/// a call does not clear and rebuild them all: it refreshes the pointers and the
/// name lengths, which the kernel changes).
pub struct RecvBatch {
    bufs: Vec<u8>,
    addrs: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    lens: [usize; BATCH],
    truncated: [bool; BATCH],
}

// SAFETY: the raw pointers in `iovs` and `hdrs` are written afresh by each `recv`
// and point only into `bufs`, `addrs` and `iovs`, heap memory owned by the same value;
// they are not used outside that call, so the value may move to another thread.
unsafe impl Send for RecvBatch {}

impl Default for RecvBatch {
    fn default() -> Self {
        RecvBatch {
            bufs: vec![0u8; BATCH * STRIDE],
            // SAFETY: sockaddr_storage, iovec and mmsghdr are plain C structs; all-zero
            // is a valid value of each.
            addrs: vec![unsafe { zeroed() }; BATCH],
            iovs: vec![unsafe { zeroed() }; BATCH],
            hdrs: vec![unsafe { zeroed() }; BATCH],
            lens: [0; BATCH],
            truncated: [false; BATCH],
        }
    }
}

impl RecvBatch {
    /// One non-blocking `recvmmsg` of up to [`BATCH`] datagrams; returns how many
    /// arrived.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        self.recv_up_to(fd, BATCH)
    }

    /// One non-blocking `recvmmsg` of up to `max` datagrams (at most [`BATCH`]).
    pub fn recv_up_to(&mut self, fd: RawFd, max: usize) -> io::Result<usize> {
        let max = max.clamp(1, BATCH);
        let base = self.bufs.as_mut_ptr();
        let addrs = self.addrs.as_mut_ptr();
        let iovs = self.iovs.as_mut_ptr();
        for (i, h) in self.hdrs.iter_mut().take(max).enumerate() {
            // SAFETY: i < BATCH, the length of `iovs` and `addrs`, and
            // Self::offset(i) + SLOT <= bufs.len(): every pointer stays inside its
            // vector.
            unsafe {
                *iovs.add(i) = libc::iovec {
                    iov_base: base.add(Self::offset(i)) as *mut libc::c_void,
                    iov_len: SLOT,
                };
                h.msg_hdr.msg_name = addrs.add(i) as *mut libc::c_void;
                h.msg_hdr.msg_iov = iovs.add(i);
            }
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every pointer in hdrs was just derived from memory owned by self,
        // alive for the call; the kernel writes at most iov_len bytes per slot and at
        // most msg_namelen bytes of address.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                max as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for (i, h) in self.hdrs.iter().take(n).enumerate() {
            self.lens[i] = h.msg_len as usize;
            self.truncated[i] = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        }
        Ok(n)
    }

    /// Where datagram `i` starts in [`RecvBatch::bytes`].
    pub const fn offset(i: usize) -> usize {
        i * STRIDE + HEADROOM
    }

    /// The whole receive buffer (datagram `i` starts at [`RecvBatch::offset`]).
    pub fn bytes(&self) -> &[u8] {
        &self.bufs
    }

    /// Datagram `i` of the last batch and its source; `None` if truncated or odd.
    pub fn packet(&self, i: usize) -> Option<(&[u8], SocketAddr)> {
        if i >= BATCH || self.truncated[i] {
            return None;
        }
        let from = from_storage(&self.addrs[i])?;
        let start = Self::offset(i);
        Some((&self.bufs[start..start + self.lens[i].min(SLOT)], from))
    }

    /// Turns datagram `i` into a ChannelData frame in place: `channel` and the length
    /// in the headroom in front, and on a stream (`pad`) zeros up to a multiple of
    /// four bytes behind. Returns the frame's range in [`RecvBatch::bytes`].
    pub fn channel_frame(&mut self, i: usize, channel: u16, pad: bool) -> Option<Range<usize>> {
        if i >= BATCH || self.truncated[i] {
            return None;
        }
        let len = self.lens[i].min(SLOT);
        let len16 = u16::try_from(len).ok()?;
        let start = Self::offset(i) - HEADROOM;
        self.bufs[start..start + 2].copy_from_slice(&channel.to_be_bytes());
        self.bufs[start + 2..start + 4].copy_from_slice(&len16.to_be_bytes());
        let mut end = start + HEADROOM + len;
        if pad {
            let padded = start + ((HEADROOM + len + 3) & !3);
            self.bufs[end..padded].fill(0);
            end = padded;
        }
        Some(start..end)
    }
}

fn from_storage(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match s.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let a: &libc::sockaddr_in = unsafe { &*(s as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let a: &libc::sockaddr_in6 = unsafe { &*(s as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

fn to_storage(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: zero is a valid sockaddr_storage.
    let mut s: libc::sockaddr_storage = unsafe { zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
            let sin = unsafe { &mut *(&mut s as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from(*a.ip()).to_be();
            (s, size_of::<libc::sockaddr_in>() as libc::socklen_t)
        }
        SocketAddr::V6(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in6.
            let sin6 = unsafe { &mut *(&mut s as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_scope_id = a.scope_id();
            (s, size_of::<libc::sockaddr_in6>() as libc::socklen_t)
        }
    }
}

/// `setsockopt`/cmsg type of UDP segmentation offload (linux/udp.h), which the libc
/// crate does not name for glibc targets.
const UDP_SEGMENT: libc::c_int = 103;
/// Largest datagram sent as a segment of one larger send (UDP GSO): one that fits a
/// 1,500-byte path over IPv6 (a larger segment than the route's MTU allows is
/// refused by the kernel, which is handled, but should not be the usual case).
const GSO_MAX_SEGMENT: usize = 1452;
/// Set when the kernel refuses segmentation offload outright (no support): plain
/// batches from then on.
static GSO_OFF: AtomicBool = AtomicBool::new(false);

/// Whether this kernel knows UDP segmentation offload (Linux 4.18 and later), asked
/// once. A kernel without it would not refuse the control message but ignore it and
/// send a run as one large datagram, so it is never used unasked.
fn gso_supported() -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        let Ok(probe) = std::net::UdpSocket::bind("127.0.0.1:0")
            .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))
        else {
            return false;
        };
        let off: libc::c_int = 0;
        // SAFETY: `off` is a c_int alive for the call, and its size is passed.
        let r = unsafe {
            libc::setsockopt(
                probe.as_raw_fd(),
                libc::SOL_UDP,
                UDP_SEGMENT,
                &off as *const _ as *const libc::c_void,
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        r == 0
    })
}

/// How many datagrams the next read of a socket asks for: [`Ramp::FIRST`] after a
/// read that emptied the socket, twice as many after each read that came back full,
/// up to [`BATCH`].
///
/// A burst (a client's or a peer's packets sent together) is relayed in growing
/// parts: the first datagrams are on their way to the next hop, which starts on them,
/// while the rest are still being read. Taking the whole burst in one read would make
/// every hop wait for all of it; in a closed loop the packets in flight then travel
/// as one clump, and each hop idles while another works. A socket that stays busy
/// soon reads whole batches again.
#[derive(Clone, Copy, Debug)]
pub struct Ramp {
    next: usize,
}

impl Ramp {
    pub const FIRST: usize = 4;

    /// How many datagrams to ask for now.
    pub fn next(&self) -> usize {
        self.next
    }

    /// The last read asked for [`Ramp::next`] and got `got` datagrams; true if it
    /// came back full (more may be waiting).
    pub fn got(&mut self, got: usize) -> bool {
        let full = got >= self.next;
        self.filled(full);
        full
    }

    /// The last read came back full (`true`), or it emptied the socket.
    pub fn filled(&mut self, full: bool) {
        self.next = if full {
            (self.next * 2).min(BATCH)
        } else {
            Self::FIRST
        };
    }
}

impl Default for Ramp {
    fn default() -> Self {
        Ramp { next: Self::FIRST }
    }
}

/// Room for one cmsg carrying a u16 (CMSG_SPACE(2) on 64-bit Linux is 24 bytes).
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct SegmentCmsg([u8; 32]);

/// One message of a batch: datagrams `start..end` of the items, to one address;
/// more than one datagram makes it a segmented send of `seg`-byte segments.
#[derive(Clone, Copy, Default)]
struct Group {
    start: usize,
    end: usize,
    seg: usize,
}

/// Sends up to [`BATCH`] datagrams from one socket, non-blocking. Consecutive
/// datagrams to one address of one size (the last of a run may be shorter) leave as
/// one segmented send (UDP GSO): one trip through the kernel's send path for the
/// run; the rest in the same `sendmmsg`. Returns how many datagrams the kernel
/// took; the rest are dropped (congestion).
pub fn send_batch(fd: RawFd, items: &[(&[u8], SocketAddr)]) -> usize {
    let items = &items[..items.len().min(BATCH)];
    match items {
        [] => return 0,
        // One datagram (the usual case when packets leave through many relay sockets):
        // a plain sendto, without setting up the batch arrays.
        [(data, to)] => return usize::from(send_one(fd, data, *to)),
        _ => {}
    }
    let gso = gso_supported() && !GSO_OFF.load(Ordering::Relaxed);
    let mut groups = [Group::default(); BATCH];
    let mut m = 0;
    let mut i = 0;
    while i < items.len() {
        let (first, to) = items[i];
        let mut end = i + 1;
        let seg = first.len();
        if gso && seg > 0 && seg <= GSO_MAX_SEGMENT {
            while end < items.len() && items[end].1 == to && items[end].0.len() == seg {
                end += 1;
            }
            if end < items.len()
                && items[end].1 == to
                && !items[end].0.is_empty()
                && items[end].0.len() < seg
            {
                end += 1;
            }
        }
        groups[m] = Group { start: i, end, seg };
        m += 1;
        i = end;
    }
    // SAFETY: plain C structs (and bytes); zero is valid.
    let mut names: [libc::sockaddr_storage; BATCH] = unsafe { zeroed() };
    let mut iovs: [libc::iovec; BATCH] = unsafe { zeroed() };
    let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
    let mut cmsgs = [SegmentCmsg([0; 32]); BATCH];
    for (k, (data, _)) in items.iter().enumerate() {
        iovs[k] = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
    }
    for (k, g) in groups[..m].iter().enumerate() {
        let (s, len) = to_storage(items[g.start].1);
        names[k] = s;
        let h = &mut hdrs[k].msg_hdr;
        h.msg_name = &mut names[k] as *mut _ as *mut libc::c_void;
        h.msg_namelen = len;
        h.msg_iov = &mut iovs[g.start];
        h.msg_iovlen = (g.end - g.start) as _;
        if g.end - g.start > 1 {
            let buf = cmsgs[k].0.as_mut_ptr();
            // SAFETY: the buffer is 8-byte aligned and holds CMSG_SPACE(2) bytes, so
            // the header and its 2 bytes of data fit; the u16 is written unaligned.
            unsafe {
                let c = buf as *mut libc::cmsghdr;
                (*c).cmsg_len = libc::CMSG_LEN(2) as _;
                (*c).cmsg_level = libc::SOL_UDP;
                (*c).cmsg_type = UDP_SEGMENT;
                std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, g.seg as u16);
                h.msg_control = buf as *mut libc::c_void;
                h.msg_controllen = libc::CMSG_SPACE(2) as _;
            }
        }
    }
    let mut sent = 0usize;
    let mut done = 0usize;
    while done < m {
        // SAFETY: hdrs[done..m] point into names/iovs/cmsgs of this frame and into
        // `items`, all alive for the call; the kernel only reads them.
        let n = unsafe {
            libc::sendmmsg(
                fd,
                hdrs.as_mut_ptr().add(done),
                (m - done) as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if n > 0 {
            for g in &groups[done..done + n as usize] {
                sent += g.end - g.start;
            }
            done += n as usize;
            continue;
        }
        let err = io::Error::last_os_error();
        if n == 0 || err.kind() == io::ErrorKind::WouldBlock {
            break;
        }
        let g = groups[done];
        if g.end - g.start > 1 {
            // The segmented send was refused: not supported here (from now on, plain
            // batches), or a segment larger than the route allows. Its datagrams go
            // one by one.
            if matches!(
                err.raw_os_error(),
                Some(libc::ENOPROTOOPT | libc::EOPNOTSUPP | libc::EIO)
            ) {
                GSO_OFF.store(true, Ordering::Relaxed);
            }
            for (data, to) in &items[g.start..g.end] {
                sent += usize::from(send_one(fd, data, *to));
            }
        }
        // Otherwise one bad datagram (e.g. ICMP error pending) must not drop the rest.
        done += 1;
    }
    sent
}

/// One datagram with `sendto`, non-blocking; whether the kernel took it.
fn send_one(fd: RawFd, data: &[u8], to: SocketAddr) -> bool {
    let (name, len) = to_storage(to);
    // SAFETY: `data` and `name` are alive for the call; the kernel only reads them.
    let n = unsafe {
        libc::sendto(
            fd,
            data.as_ptr() as *const libc::c_void,
            data.len(),
            libc::MSG_DONTWAIT,
            &name as *const _ as *const libc::sockaddr,
            len,
        )
    };
    n >= 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Receives `n` datagrams on `rx`, with their sources.
    fn recv_n(rx: &std::net::UdpSocket, n: usize) -> Vec<(Vec<u8>, SocketAddr)> {
        let mut b = RecvBatch::default();
        let mut got = Vec::new();
        let start = std::time::Instant::now();
        while got.len() < n {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(5),
                "{got:?}"
            );
            match b.recv(rx.as_raw_fd()) {
                Ok(k) => {
                    for i in 0..k {
                        let (p, from) = b.packet(i).unwrap();
                        got.push((p.to_vec(), from));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        got
    }

    #[test]
    fn batched_round_trip_v4_and_v6() {
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(rx) = std::net::UdpSocket::bind(bind) else {
                continue;
            };
            let tx = std::net::UdpSocket::bind(bind).unwrap();
            let to = rx.local_addr().unwrap();
            let payloads: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 10 + i as usize]).collect();
            let items: Vec<(&[u8], SocketAddr)> =
                payloads.iter().map(|p| (p.as_slice(), to)).collect();
            assert_eq!(send_batch(tx.as_raw_fd(), &items), 5);
            let got = recv_n(&rx, 5);
            assert!(got
                .iter()
                .all(|(_, from)| *from == tx.local_addr().unwrap()));
            assert_eq!(
                got.into_iter().map(|(p, _)| p).collect::<Vec<_>>(),
                payloads
            );
            let mut b = RecvBatch::default();
            // A single datagram takes the sendto path.
            assert_eq!(send_batch(tx.as_raw_fd(), &items[..1]), 1);
            loop {
                match b.recv(rx.as_raw_fd()) {
                    Ok(n) => {
                        assert_eq!(n, 1);
                        assert_eq!(b.packet(0).unwrap().0, &payloads[0][..]);
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                    Err(e) => panic!("{e}"),
                }
            }
        }
    }

    #[test]
    fn runs_of_one_size_to_one_address_arrive_as_separate_datagrams() {
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(a) = std::net::UdpSocket::bind(bind) else {
                continue;
            };
            let b = std::net::UdpSocket::bind(bind).unwrap();
            let tx = std::net::UdpSocket::bind(bind).unwrap();
            let (to_a, to_b) = (a.local_addr().unwrap(), b.local_addr().unwrap());
            let me = tx.local_addr().unwrap();
            // To a: a run of five 1,200-byte datagrams with a shorter last one (one
            // segmented send), two of other sizes, one too large to be a segment
            // (sent as is), one empty; to b: a run of three; then a again.
            let mut want_a: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 1200]).collect();
            want_a.push(vec![5; 700]);
            want_a.push(vec![6; 90]);
            want_a.push(vec![7; 91]);
            want_a.push(vec![8; 3000]);
            want_a.push(vec![8; 3000]);
            want_a.push(Vec::new());
            let want_b: Vec<Vec<u8>> = (0..3u8).map(|i| vec![20 + i; 100]).collect();
            let tail_a: Vec<Vec<u8>> = (0..2u8).map(|i| vec![30 + i; 100]).collect();
            let mut items: Vec<(&[u8], SocketAddr)> = Vec::new();
            items.extend(want_a.iter().map(|p| (p.as_slice(), to_a)));
            items.extend(want_b.iter().map(|p| (p.as_slice(), to_b)));
            items.extend(tail_a.iter().map(|p| (p.as_slice(), to_a)));
            assert_eq!(send_batch(tx.as_raw_fd(), &items), items.len());
            want_a.extend(tail_a);
            let got_a = recv_n(&a, want_a.len());
            assert_eq!(
                got_a.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>(),
                want_a
            );
            assert!(got_a.iter().all(|(_, from)| *from == me));
            let got_b = recv_n(&b, want_b.len());
            assert_eq!(
                got_b.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>(),
                want_b
            );
            // The runs went as segmented sends (Debian 12's kernel has them).
            assert!(gso_supported(), "no segmentation offload");
            assert!(
                !GSO_OFF.load(Ordering::Relaxed),
                "segmentation offload refused"
            );
        }
    }

    #[test]
    fn a_run_of_segments_larger_than_the_route_allows_goes_one_by_one() {
        // On a thread in a network namespace of its own, loopback with a 1,280-byte
        // MTU: a segmented send of 1,400-byte segments is refused (EMSGSIZE: the
        // segments would not fit the route), and the run goes one datagram at a time,
        // fragmented and reassembled by IP. Segmented sends stay on for later runs
        // that fit.
        let r = std::thread::spawn(|| -> Result<(), String> {
            // SAFETY: plain syscall; a new network namespace for this thread only.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(format!(
                    "no network namespace: {}",
                    io::Error::last_os_error()
                ));
            }
            let up = std::process::Command::new("ip")
                .args(["link", "set", "lo", "mtu", "1280", "up"])
                .status()
                .map_err(|e| format!("ip: {e}"))?;
            if !up.success() {
                return Err(format!("ip link set lo: {up}"));
            }
            let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let to = rx.local_addr().unwrap();
            let big: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 1400]).collect();
            let items: Vec<(&[u8], SocketAddr)> = big.iter().map(|p| (p.as_slice(), to)).collect();
            assert_eq!(send_batch(tx.as_raw_fd(), &items), 4);
            let got: Vec<Vec<u8>> = recv_n(&rx, 4).into_iter().map(|(p, _)| p).collect();
            assert_eq!(got, big);
            assert!(
                !GSO_OFF.load(Ordering::Relaxed),
                "a refusal for size turned segmented sends off"
            );
            // A run that fits still goes (as a segmented send).
            let small: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 1000]).collect();
            let items: Vec<(&[u8], SocketAddr)> =
                small.iter().map(|p| (p.as_slice(), to)).collect();
            assert_eq!(send_batch(tx.as_raw_fd(), &items), 3);
            let got: Vec<Vec<u8>> = recv_n(&rx, 3).into_iter().map(|(p, _)| p).collect();
            assert_eq!(got, small);
            Ok(())
        })
        .join()
        .expect("the namespace thread");
        match r {
            Ok(()) => {}
            // Needs root (CAP_NET_ADMIN) and `ip`; the CI run requires them.
            Err(e) if std::env::var_os("MESHMEET_REQUIRE_TOOLS").is_none() => {
                eprintln!("skipped: {e}")
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn a_read_takes_no_more_than_it_asks_for() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        for i in 0..10u8 {
            tx.send_to(&[i; 20], to).unwrap();
        }
        // All ten are queued once a plain read sees the first (loopback delivers in
        // order, at send time).
        let mut b = RecvBatch::default();
        let mut got = Vec::new();
        for max in [3, 0, 4, BATCH] {
            let n = b.recv_up_to(rx.as_raw_fd(), max).unwrap();
            assert_eq!(n, max.clamp(1, BATCH).min(10 - got.len()), "max {max}");
            got.extend((0..n).map(|i| b.packet(i).unwrap().0[0]));
        }
        assert_eq!(got, (0..10).collect::<Vec<u8>>());
        let e = b.recv_up_to(rx.as_raw_fd(), 4).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn the_ramp_grows_on_full_reads_and_starts_over_when_emptied() {
        let mut r = Ramp::default();
        assert_eq!(r.next(), Ramp::FIRST);
        // A socket that stays busy: 4, 8, 16, 32, and no further.
        let mut asked = Vec::new();
        for _ in 0..6 {
            asked.push(r.next());
            assert!(r.got(r.next()));
        }
        assert_eq!(asked, [4, 8, 16, 32, 32, 32]);
        // A read that empties the socket (or found nothing) starts over.
        assert!(!r.got(5));
        assert_eq!(r.next(), Ramp::FIRST);
        r.filled(true);
        assert_eq!(r.next(), 2 * Ramp::FIRST);
        r.filled(false);
        assert_eq!(r.next(), Ramp::FIRST);
    }

    #[test]
    fn channel_frames_are_written_in_place() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        let payloads: [&[u8]; 3] = [&[7; 5], &[9; 8], &[]];
        for p in payloads {
            tx.send_to(p, to).unwrap();
        }
        let mut b = RecvBatch::default();
        let mut seen = 0;
        while seen < payloads.len() {
            let n = match b.recv(rx.as_raw_fd()) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::yield_now();
                    continue;
                }
                Err(e) => panic!("{e}"),
            };
            for i in 0..n {
                let p = payloads[seen];
                let len = p.len();
                // A UDP client gets the header and the payload, nothing more.
                let r = b.channel_frame(i, 0x4001, false).unwrap();
                let mut want = vec![0x40, 0x01, 0, len as u8];
                want.extend_from_slice(p);
                assert_eq!(&b.bytes()[r.clone()], &want[..]);
                assert_eq!(r.start + 4, RecvBatch::offset(i));
                // A stream client gets it padded with zeros to a multiple of four.
                let r = b.channel_frame(i, 0x4001, true).unwrap();
                want.resize((4 + len + 3) & !3, 0);
                assert_eq!(&b.bytes()[r], &want[..]);
                seen += 1;
            }
        }
        assert!(b.channel_frame(BATCH, 0x4000, false).is_none());
    }
}
