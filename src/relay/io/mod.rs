//! Relay IO: the UDP, TCP and TLS listeners ([`udp`], [`stream`]), one receive task
//! per relay socket ([`peer`]), the sockets themselves ([`sockets`]) and the timer.
//! Bytes in, [`Core`] decides, commands out: every core call happens in one short
//! lock section that also drains the commands it queued, which are then carried out
//! (syscalls, sends, binds) after the lock is released. The lock is never held across
//! an `.await`.

mod peer;
mod sockets;
mod stream;
mod udp;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::auth::Credentials;
use super::core::{Command, Core, Family, FiveTuple, RelayRules, Transport};
use super::policy::{Listener, OwnAddrs, PeerPolicy};
use super::RelayMetrics;
use crate::config::Config;
use crate::limits::{Caps, ConnLimiter, LimitMetrics};
use crate::tls::Tls;

use sockets::RelayPorts;
pub use sockets::RelaySocket;

/// The core as the IO layer holds it: relay sockets are `Arc<RelaySocket>`.
type RelayCore = Core<Arc<RelaySocket>>;
type Commands = VecDeque<Command<Arc<RelaySocket>>>;

/// The shortest pause between two timer runs: deadlines closer together than this
/// (cached answers expire one by one under load) are handled in one run.
const TIMER_GRANULARITY: Duration = Duration::from_millis(100);

struct Locked {
    core: RelayCore,
    /// The deadline the timer task sleeps towards (`None`: it waits for a wake-up).
    timer_at: Option<Instant>,
}

/// The core behind its lock, and the timer task's wake-up.
struct CoreCell {
    state: Mutex<Locked>,
    wake: Notify,
}

impl CoreCell {
    fn new(core: RelayCore) -> CoreCell {
        CoreCell {
            state: Mutex::new(Locked {
                core,
                timer_at: None,
            }),
            wake: Notify::new(),
        }
    }

    /// Locks the core. A panic in a core method while it held the lock (a bug: the
    /// core is written not to panic) may have left its tables half-changed, so the
    /// poisoned lock is not simply taken over: the core is reset (every allocation
    /// dropped and its socket closed), the poison cleared, and the relay carries on
    /// with consistent, empty tables; clients allocate again.
    fn lock(&self) -> MutexGuard<'_, Locked> {
        match self.state.lock() {
            Ok(guard) => guard,
            Err(poisoned) => {
                let mut guard = poisoned.into_inner();
                tracing::error!(
                    "the relay core panicked while locked; every allocation is dropped and \
                     the relay continues with empty tables"
                );
                guard.core.reset();
                let mut freed = 0;
                while let Some(cmd) = guard.core.poll_command() {
                    if let Command::FreeRelaySocket { handle } = cmd {
                        handle.stop.cancel();
                        freed += 1;
                    }
                }
                tracing::error!(sockets = freed, "relay sockets closed after the reset");
                self.state.clear_poison();
                guard
            }
        }
    }

    /// Runs `f` on the core, moves every command it queued to `out` (in the same lock
    /// section, so `out` gets exactly this call's commands), and wakes the timer when
    /// the core's next deadline moved earlier than the one it sleeps towards.
    fn with<R>(&self, out: &mut Commands, f: impl FnOnce(&mut RelayCore) -> R) -> R {
        let mut guard = self.lock();
        let r = f(&mut guard.core);
        out.extend(std::iter::from_fn(|| guard.core.poll_command()));
        if let Some(next) = guard.core.poll_timeout() {
            if guard.timer_at.is_none_or(|at| next < at) {
                guard.timer_at = Some(next);
                self.wake.notify_one();
            }
        }
        r
    }
}

/// Bytes queued towards one TCP/TLS client before relayed data is dropped (about
/// 850 full-size media packets).
const STREAM_QUEUE_BYTES: usize = 1 << 20;

/// The queue towards a TCP/TLS client's writer task: bounded in entries (the
/// channel) and in bytes (relayed data beyond [`STREAM_QUEUE_BYTES`] is dropped).
/// Relayed data arrives in batches, one entry per batch.
#[derive(Clone)]
struct StreamTx {
    tx: mpsc::Sender<Vec<u8>>,
    queued: Arc<AtomicUsize>,
}

impl StreamTx {
    fn new(entries: usize) -> (StreamTx, StreamRx) {
        let (tx, rx) = mpsc::channel(entries);
        let queued = Arc::new(AtomicUsize::new(0));
        (
            StreamTx {
                tx,
                queued: queued.clone(),
            },
            StreamRx { rx, queued },
        )
    }

    /// Queues relayed data without waiting; dropped (false) when the queue is full.
    fn try_send_data(&self, bytes: Vec<u8>) -> bool {
        let len = bytes.len();
        if self.queued.load(Ordering::Relaxed) + len > STREAM_QUEUE_BYTES {
            return false;
        }
        self.queued.fetch_add(len, Ordering::Relaxed);
        if self.tx.try_send(bytes).is_err() {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Queues a STUN answer, waiting for an entry (answers are few and must not be
    /// lost). Fails only when the writer is gone: nothing to send to.
    async fn send_answer(&self, bytes: Vec<u8>) {
        let len = bytes.len();
        self.queued.fetch_add(len, Ordering::Relaxed);
        if self.tx.send(bytes).await.is_err() {
            self.queued.fetch_sub(len, Ordering::Relaxed);
        }
    }
}

/// The writer's end of a [`StreamTx`].
struct StreamRx {
    rx: mpsc::Receiver<Vec<u8>>,
    queued: Arc<AtomicUsize>,
}

impl StreamRx {
    /// The next entry, with every entry already waiting behind it appended (up to
    /// about `coalesce` bytes): one write for all frames that are ready.
    async fn recv(&mut self, coalesce: usize) -> Option<Vec<u8>> {
        let mut out = self.rx.recv().await?;
        let mut taken = out.len();
        while out.len() < coalesce {
            match self.rx.try_recv() {
                Ok(more) => {
                    taken += more.len();
                    out.extend_from_slice(&more);
                }
                Err(_) => break,
            }
        }
        self.queued.fetch_sub(taken, Ordering::Relaxed);
        Some(out)
    }
}

/// Where answers for the client of the current input go.
#[derive(Clone)]
enum ClientSink {
    Udp(Arc<UdpSocket>, SocketAddr),
    Stream(StreamTx),
}

impl ClientSink {
    /// Sends a STUN answer; over a stream it waits for queue space (answers are
    /// few and must not be lost), unlike relayed data.
    async fn answer(&self, bytes: Vec<u8>) {
        match self {
            ClientSink::Udp(sock, to) => {
                // A failed UDP send is a lost datagram; the client retransmits.
                if let Err(e) = sock.send_to(&bytes, *to).await {
                    tracing::debug!(error = %e, client = %to, "turn answer not sent");
                }
            }
            ClientSink::Stream(tx) => tx.send_answer(bytes).await,
        }
    }
}

/// What every relay task shares.
struct Ctx {
    shared: Arc<CoreCell>,
    ports: RelayPorts,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    /// Caps on TURN over TCP and TLS connections (together).
    streams: Arc<ConnLimiter>,
    stream_metrics: LimitMetrics,
    /// For the TLS handshake, the first message and each later one.
    message_timeout: Duration,
}

impl Ctx {
    /// Carries out the commands of one client input, in order. A relay socket is
    /// bound here, outside the core's lock, and the outcome goes back to the core,
    /// whose commands (the Allocate answer) join the queue.
    async fn execute(&self, cmds: &mut Commands, five: FiveTuple, sink: &ClientSink) {
        while let Some(cmd) = cmds.pop_front() {
            match cmd {
                Command::SendToClient { to, bytes } => {
                    if to == five {
                        sink.answer(bytes).await;
                    } else {
                        // The core answers the client whose input it handles; anything
                        // else is a bug, and this task has no way to reach that client.
                        tracing::error!(client = %to.client, "relay answer for another client dropped");
                    }
                }
                Command::BindRelaySocket {
                    token,
                    family,
                    even_port,
                } => {
                    let result = self
                        .ports
                        .bind(family, even_port, self.shutdown.child_token())
                        .map_err(|(kind, err)| {
                            sockets::log_bind_failure(kind, err.as_ref());
                            kind
                        });
                    self.shared
                        .with(cmds, |core| core.relay_bound(token, result, Instant::now()));
                }
                Command::StartRelaying {
                    id,
                    client,
                    relay,
                    handle,
                } => {
                    tracing::debug!(client = %client.client, relay = %relay, transport = client.transport.label(), "allocation created");
                    self.tasks.spawn(peer::relay_loop(
                        self.shared.clone(),
                        id,
                        handle,
                        sink.clone(),
                        client.transport,
                    ));
                }
                Command::SendToPeer { handle, peer, data } => {
                    // Like any UDP datagram, one that does not fit is dropped.
                    if let Err(e) = handle.socket.try_send_to(&data, peer) {
                        tracing::debug!(error = %e, %peer, "send indication not relayed");
                    }
                }
                Command::FreeRelaySocket { handle } => handle.stop.cancel(),
            }
        }
    }
}

/// Carries out commands queued without a client input (timeouts, peers leaving,
/// connections closing): those only free relay sockets.
fn free_sockets(cmds: &mut Commands) {
    for cmd in cmds.drain(..) {
        match cmd {
            Command::FreeRelaySocket { handle } => handle.stop.cancel(),
            other => tracing::error!(
                command = ?std::mem::discriminant(&other),
                "relay command without a client to carry it out; dropped"
            ),
        }
    }
}

/// Sleeps until the core's next deadline and lets it act; wakes early when a new
/// deadline comes before the one it sleeps towards.
async fn timer_loop(shared: Arc<CoreCell>, stop: CancellationToken) {
    let mut cmds = Commands::new();
    let mut last_run = Instant::now();
    loop {
        let next = {
            let mut guard = shared.lock();
            let next = guard.core.poll_timeout();
            guard.timer_at = next;
            next
        };
        let sleep = async {
            match next {
                Some(at) => {
                    let at = at.max(last_run + TIMER_GRANULARITY);
                    tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = shared.wake.notified() => continue,
            _ = sleep => {}
        }
        last_run = Instant::now();
        shared.with(&mut cmds, |core| core.handle_timeout(last_run));
        free_sockets(&mut cmds);
    }
}

/// Handle to the relay for other modules: drops allocations when peers leave.
#[derive(Clone)]
pub struct RelayHandle {
    shared: Arc<CoreCell>,
}

impl crate::ice::PeerEvents for RelayHandle {
    fn peer_gone(&self, peer_id: &str) {
        let mut cmds = Commands::new();
        let n = self.shared.with(&mut cmds, |core| core.peer_gone(peer_id));
        free_sockets(&mut cmds);
        if n > 0 {
            tracing::debug!(allocations = n, "peer left; allocations removed");
        }
    }

    fn peer_revoked(&self, peer_id: &str) {
        let mut cmds = Commands::new();
        let now = Instant::now();
        let n = self
            .shared
            .with(&mut cmds, |core| core.peer_revoked(peer_id, now));
        free_sockets(&mut cmds);
        tracing::debug!(
            allocations = n,
            "peer removed by a host; credentials revoked"
        );
    }
}

impl RelayHandle {
    /// Number of allocations currently held.
    pub fn allocation_count(&self) -> usize {
        self.shared.lock().core.allocation_count()
    }
}

/// The addresses the relay listens on.
#[derive(Debug, Clone)]
pub struct RelayAddrs {
    pub udp: SocketAddr,
    pub tcp: SocketAddr,
    pub tls: Option<SocketAddr>,
    /// `turn.extra_udp_listen`, as bound.
    pub extra_udp: Vec<SocketAddr>,
}

/// The bound relay, ready to run.
pub struct Relay {
    shared: Arc<CoreCell>,
    ports: RelayPorts,
    streams: Arc<ConnLimiter>,
    stream_metrics: LimitMetrics,
    message_timeout: Duration,
    udp: Arc<UdpSocket>,
    extra_udp: Vec<Arc<UdpSocket>>,
    tcp: TcpListener,
    tls: Option<TcpListener>,
    addrs: RelayAddrs,
}

impl Relay {
    /// Binds the listeners (UDP and TCP on `turn.listen`, TLS on `turn.tls_listen`)
    /// and builds the core from `[turn]`. `other_listeners` are the server's other
    /// listeners (HTTPS, the redirect): their addresses are the host's, and a UDP one
    /// would be refused as a peer like the relay's own UDP listener.
    pub async fn bind(
        cfg: &Config,
        secret: String,
        metrics: RelayMetrics,
        other_listeners: &[Listener],
    ) -> anyhow::Result<Relay> {
        let listen = cfg.turn.listen;
        let (udp, udp_addr, tcp) = sockets::bind_udp_and_tcp(listen)?;
        let tls = match cfg.turn.tls_listen {
            Some(a) => Some(
                sockets::bind_tcp(a)
                    .with_context(|| format!("cannot listen on {a} (TLS, turn.tls_listen)"))?,
            ),
            None => None,
        };
        let mut extra_udp = Vec::new();
        for a in &cfg.turn.extra_udp_listen {
            let sock = sockets::bind_udp(*a)
                .with_context(|| format!("cannot listen on {a} (UDP, turn.extra_udp_listen)"))?;
            extra_udp.push(sock);
        }
        let addrs = RelayAddrs {
            udp: udp_addr,
            tcp: tcp.local_addr()?,
            tls: tls.as_ref().map(|l| l.local_addr()).transpose()?,
            extra_udp: extra_udp
                .iter()
                .map(|s| s.local_addr())
                .collect::<Result<_, _>>()?,
        };
        let range = cfg.turn.relay_ports.first()..=cfg.turn.relay_ports.last();
        let relay_ips = sockets::relay_addresses(cfg, listen);
        let ports = RelayPorts::new(&relay_ips, range);
        let mut listeners = vec![Listener::Udp(addrs.udp), Listener::Tcp(addrs.tcp)];
        listeners.extend(addrs.tls.map(Listener::Tcp));
        listeners.extend(addrs.extra_udp.iter().copied().map(Listener::Udp));
        listeners.extend_from_slice(other_listeners);
        let host_ips = crate::net::local_ips()
            .into_iter()
            .chain(relay_ips.iter().flat_map(|(bind, adv)| [*bind, *adv]))
            .chain(cfg.turn.external_ips.iter().copied());
        let own = OwnAddrs::new(&listeners, host_ips);
        let users: HashMap<String, String> = cfg
            .turn
            .users
            .iter()
            .map(|(u, p)| (u.clone(), p.expose().to_owned()))
            .collect();
        let creds = Credentials::new(secret, cfg.turn.realm.clone(), users);
        let core_cfg = RelayRules {
            max_lifetime: Duration::from_secs(cfg.turn.max_allocation_lifetime_s),
            user_quota: cfg.user_allocation_quota(),
            total_quota: cfg.turn.total_allocation_quota,
            max_bps: cfg.turn.max_bps,
            policy: PeerPolicy::new(cfg.turn.allowed_peer_ranges.clone()),
            own,
            relay_v4: ports.has(Family::V4),
            relay_v6: ports.has(Family::V6),
        };
        let stream_metrics = metrics.streams.clone();
        let streams = ConnLimiter::new(
            "TURN over TCP/TLS",
            Caps {
                total: cfg.turn.max_stream_connections,
                per_ip: cfg.turn.max_stream_connections_per_ip,
                total_key: "turn.max_stream_connections",
                per_ip_key: "turn.max_stream_connections_per_ip",
            },
            stream_metrics.clone(),
        );
        let core = Core::new(
            core_cfg,
            creds,
            metrics,
            &mut StdRng::from_entropy(),
            Instant::now(),
        );
        Ok(Relay {
            shared: Arc::new(CoreCell::new(core)),
            ports,
            streams,
            stream_metrics,
            message_timeout: Duration::from_secs(cfg.turn.stream_message_timeout_s),
            udp: Arc::new(udp),
            extra_udp: extra_udp.into_iter().map(Arc::new).collect(),
            tcp,
            tls,
            addrs,
        })
    }

    pub fn addrs(&self) -> RelayAddrs {
        self.addrs.clone()
    }

    pub fn handle(&self) -> RelayHandle {
        RelayHandle {
            shared: self.shared.clone(),
        }
    }

    /// Starts the listener, relay and timer tasks on `tasks`; they end when
    /// `shutdown` is cancelled (relay sockets' tokens are its children). TURN over
    /// TLS uses `tls`'s current certificate for each new connection.
    /// Returns the entry for TURN streams accepted elsewhere (the HTTPS listener).
    pub fn spawn(
        self,
        shutdown: CancellationToken,
        tasks: TaskTracker,
        tls: Arc<Tls>,
    ) -> StreamEntry {
        let ctx = Arc::new(Ctx {
            shared: self.shared.clone(),
            ports: self.ports,
            tasks: tasks.clone(),
            shutdown: shutdown.clone(),
            streams: self.streams,
            stream_metrics: self.stream_metrics,
            message_timeout: self.message_timeout,
        });
        // Two receive loops on the UDP socket let both cores work on client traffic.
        for _ in 0..2 {
            tasks.spawn(udp::udp_loop(ctx.clone(), self.udp.clone(), self.addrs.udp));
        }
        for (sock, addr) in self.extra_udp.iter().zip(&self.addrs.extra_udp) {
            tasks.spawn(udp::udp_loop(ctx.clone(), sock.clone(), *addr));
        }
        tasks.spawn(stream::accept_loop(self.tcp, ctx.clone(), None));
        if let Some(listener) = self.tls {
            tasks.spawn(stream::accept_loop(listener, ctx.clone(), Some(tls)));
        }
        tasks.spawn(timer_loop(self.shared, shutdown));
        StreamEntry { ctx }
    }
}

/// Serves TURN on a stream that another listener accepted and classified: the HTTPS
/// listener hands over connections that speak STUN or ChannelData (TURN over TCP)
/// or negotiated `stun.turn` or sent STUN after TLS (TURN over TLS).
#[derive(Clone)]
pub struct StreamEntry {
    ctx: Arc<Ctx>,
}

impl StreamEntry {
    /// Serves the connection until it closes, as the relay's own TCP/TLS listeners do,
    /// under the same stream caps (a connection beyond them is closed at once).
    /// `client` and `local` are the TCP connection's addresses.
    pub async fn serve<T>(&self, stream: T, client: SocketAddr, local: SocketAddr, tls: bool)
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let Ok(_permit) = self.ctx.streams.try_acquire(client.ip()) else {
            // Closed at once; the limiter counts and logs the refusal.
            return;
        };
        let five = FiveTuple {
            client,
            server: local,
            transport: if tls { Transport::Tls } else { Transport::Tcp },
        };
        stream::serve_stream(stream, five, self.ctx.clone()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::client::{self, Attr, Session};
    use stun::message::METHOD_ALLOCATE;

    fn core(max_lifetime: Duration) -> RelayCore {
        let cfg = RelayRules {
            max_lifetime,
            user_quota: 10,
            total_quota: 10,
            max_bps: 0,
            policy: PeerPolicy::default(),
            own: OwnAddrs::default(),
            relay_v4: true,
            relay_v6: false,
        };
        Core::new(
            cfg,
            Credentials::new(String::new(), "r".into(), [("u".into(), "p".into())].into()),
            RelayMetrics::default(),
            &mut StdRng::seed_from_u64(1),
            Instant::now(),
        )
    }

    /// Allocates through the core with a real relay socket; returns the socket.
    async fn allocate(shared: &CoreCell) -> Arc<RelaySocket> {
        let five = FiveTuple {
            client: "127.0.0.1:9".parse().unwrap(),
            server: "127.0.0.1:3478".parse().unwrap(),
            transport: Transport::Udp,
        };
        let mut s = Session::new("u", "p");
        let mut cmds = Commands::new();
        for _ in 0..2 {
            let req = s.request(METHOD_ALLOCATE, &[&Attr::UDP]);
            shared.with(&mut cmds, |c| {
                c.handle_stun(&req, five, Instant::now(), std::time::SystemTime::now())
            });
            if let Some(Command::SendToClient { bytes, .. }) = cmds.front() {
                let answer = client::parse(bytes).unwrap();
                if s.learn(&answer) {
                    cmds.clear();
                    continue;
                }
            }
        }
        let Some(Command::BindRelaySocket { token, .. }) = cmds.pop_front() else {
            panic!("a bind was expected: {cmds:?}");
        };
        let socket = Arc::new(RelaySocket {
            socket: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            stop: CancellationToken::new(),
        });
        let addr = socket.socket.local_addr().unwrap();
        shared.with(&mut cmds, |c| {
            c.relay_bound(token, Ok((addr, socket.clone())), Instant::now())
        });
        assert!(matches!(cmds.front(), Some(Command::StartRelaying { .. })));
        socket
    }

    #[tokio::test]
    async fn a_poisoned_lock_resets_the_core_and_closes_its_sockets() {
        let shared = Arc::new(CoreCell::new(core(Duration::from_secs(3600))));
        let socket = allocate(&shared).await;
        assert_eq!(shared.lock().core.allocation_count(), 1);
        let s = shared.clone();
        let panicked = std::thread::spawn(move || {
            let _guard = s.lock();
            panic!("a bug while the core is locked");
        })
        .join();
        assert!(panicked.is_err());
        assert!(shared.state.is_poisoned());
        // The next lock resets the core and clears the poison.
        assert_eq!(shared.lock().core.allocation_count(), 0);
        assert!(!shared.state.is_poisoned());
        assert!(socket.stop.is_cancelled());
        assert_eq!(shared.lock().core.poll_timeout(), None);
    }

    #[tokio::test]
    async fn new_deadlines_wake_the_timer() {
        let shared = CoreCell::new(core(Duration::from_secs(3600)));
        // The timer sleeps towards nothing; the first allocation brings a deadline.
        allocate(&shared).await;
        let at = shared.lock().timer_at;
        assert!(at.is_some());
        // The permit is stored: the timer task's next `notified()` returns at once.
        tokio::time::timeout(Duration::from_secs(5), shared.wake.notified())
            .await
            .unwrap();
        // A later deadline does not wake it again.
        let mut cmds = Commands::new();
        shared.with(&mut cmds, |_| ());
        assert_eq!(shared.lock().timer_at, at);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), shared.wake.notified())
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn the_timer_frees_expired_allocations() {
        // A one-second maximum lifetime makes the default lifetime one second too.
        let shared = Arc::new(CoreCell::new(core(Duration::from_secs(1))));
        let stop = CancellationToken::new();
        let timer = tokio::spawn(timer_loop(shared.clone(), stop.clone()));
        // The allocation comes after the timer went to sleep with nothing to wait for.
        let socket = allocate(&shared).await;
        tokio::time::timeout(Duration::from_secs(10), socket.stop.cancelled())
            .await
            .expect("the timer frees the allocation when it expires");
        assert_eq!(shared.lock().core.allocation_count(), 0);
        stop.cancel();
        timer.await.unwrap();
    }

    #[tokio::test]
    async fn the_stream_queue_is_bounded_in_bytes_and_entries_and_coalesces() {
        let (tx, mut rx) = StreamTx::new(8);
        let quarter = STREAM_QUEUE_BYTES / 4;
        for _ in 0..4 {
            assert!(tx.try_send_data(vec![1; quarter]));
        }
        // Full in bytes: relayed data is dropped.
        assert!(!tx.try_send_data(vec![1]));
        // The writer takes everything waiting in one go.
        let got = rx.recv(usize::MAX).await.unwrap();
        assert_eq!(got.len(), STREAM_QUEUE_BYTES);
        assert_eq!(tx.queued.load(Ordering::Relaxed), 0);
        // Full in entries: dropped too, however small.
        for _ in 0..8 {
            assert!(tx.try_send_data(vec![2; 10]));
        }
        assert!(!tx.try_send_data(vec![3; 10]));
        // Entries are appended until the coalescing size is reached.
        assert_eq!(rx.recv(25).await.unwrap().len(), 30);
        assert_eq!(tx.queued.load(Ordering::Relaxed), 50);
        // An answer waits for an entry instead of being dropped; order is kept.
        let answer = tokio::spawn({
            let tx = tx.clone();
            async move {
                for _ in 0..4 {
                    tx.send_answer(vec![4; 3]).await;
                }
            }
        });
        let mut all = Vec::new();
        while all.len() < 50 + 12 {
            all.extend(rx.recv(usize::MAX).await.unwrap());
        }
        answer.await.unwrap();
        assert_eq!(&all[..50], &[2; 50][..]);
        assert_eq!(&all[50..], &[4; 12][..]);
        assert_eq!(tx.queued.load(Ordering::Relaxed), 0);
    }
}
