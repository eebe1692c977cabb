//! WebSocket layer for signaling: the `/ws` upgrade (Origin check, frame limits) and
//! one task per connection that feeds the rooms core and writes what it returns.
//!
//! Each connection has a bounded outgoing queue ([`QUEUE_LEN`] messages). Others put
//! messages there without waiting: a full queue means the reader is too
//! slow, and it is closed with 1013 while everyone else carries on. Each message is
//! serialized once however many peers receive it. Relayed `offer`/`answer`/`candidate`
//! (the hot path) are serialized and queued after the rooms lock is released; room
//! events and chat are queued before it is, so every peer sees them in one order.
//!
//! A request without an `Origin` header is allowed: browsers always send one on a
//! WebSocket upgrade, so a missing Origin means a non-browser client, which cross-site
//! WebSocket hijacking cannot involve.
//!
//! [`Signaling`] holds everything this layer uses (its settings, the ICE provider, the
//! relay's peer events, the shutdown token and task tracker), so it depends on no
//! other part of the server; [`routes`] gives the `/ws` route for the HTTPS router.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::SinkExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rand::Rng;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::core::{
    token_hash, Beat, ConnId, Effect, Heartbeat, IceFor, RateLimiter, Reattach, RoomRules, Rooms,
    TokenHash, Verdict, CLOSE_DENIED, CLOSE_KICKED, CLOSE_TAKEN_OVER,
};
use super::persist;
use super::proto::normalize_name;
use super::proto::{ClientMsg, ErrorCode, ServerMsg};
use super::room::normalize_room;
use crate::clock::{unix_millis, unix_secs};
use crate::cluster::wire::{Item, ToNode};
use crate::cluster::{Cluster, Home};
use crate::config::Config;
use crate::ice::{IceProvider, PeerEvents};

/// Outgoing messages a connection may have waiting.
pub const QUEUE_LEN: usize = 1024;
/// Lifetime of ICE credentials handed out before `join`.
pub const PRE_JOIN_ICE_TTL_S: u64 = 120;
/// Messages written per flush.
const WRITE_BATCH: usize = 256;
/// Cluster: how long a connection waits for a remote home's answer to its `join`
/// before reading its next frame.
const JOIN_ANSWER_WAIT: Duration = Duration::from_secs(5);
/// How long a closing socket may take to get its close frame out.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(3);

pub const CLOSE_GOING_AWAY: u16 = super::core::CLOSE_GOING_AWAY;
pub const CLOSE_UNSUPPORTED: u16 = 1003;
pub const CLOSE_POLICY: u16 = 1008;
pub const CLOSE_TOO_BIG: u16 = 1009;
pub const CLOSE_TRY_LATER: u16 = 1013;

/// Heartbeat timings (PROTOCOL.md: ping every 15 s, gone after 45 s of silence);
/// tests shorten them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignalingTimings {
    pub ping_interval: Duration,
    pub timeout: Duration,
}

impl Default for SignalingTimings {
    fn default() -> Self {
        SignalingTimings {
            ping_interval: Duration::from_secs(15),
            timeout: Duration::from_secs(45),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    pub r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// Signaling figures for `/metrics`.
#[derive(Clone, Default)]
pub struct SignalingMetrics {
    pub rooms: Gauge,
    pub peers: Gauge,
    pub connections: Gauge,
    pub relayed: Family<TypeLabel, Counter>,
    pub errors: Family<CodeLabel, Counter>,
    pub disconnects: Family<ReasonLabel, Counter>,
    pub locked_rooms: Gauge,
    pub lobby_waiting: Gauge,
    pub kicks: Counter,
    /// The `relayed` counters of [`RELAYED_TYPES`], fetched once (hot path).
    relayed_by_type: Vec<Counter>,
}

/// Message types counted in `meshmeet_signaling_messages`.
const RELAYED_TYPES: [&str; 5] = ["offer", "answer", "candidate", "media", "chat"];

impl SignalingMetrics {
    pub fn register(registry: &mut Registry) -> SignalingMetrics {
        let mut m = SignalingMetrics::default();
        m.relayed_by_type = RELAYED_TYPES
            .iter()
            .map(|t| m.relayed.get_or_create(&TypeLabel { r#type: t }).clone())
            .collect();
        registry.register("meshmeet_rooms", "Rooms with peers", m.rooms.clone());
        registry.register(
            "meshmeet_peers",
            "Peers in rooms (including those in their resume grace)",
            m.peers.clone(),
        );
        registry.register(
            "meshmeet_ws_connections",
            "Open signaling WebSockets",
            m.connections.clone(),
        );
        registry.register(
            "meshmeet_signaling_messages",
            "Messages relayed or broadcast, by type",
            m.relayed.clone(),
        );
        registry.register(
            "meshmeet_signaling_errors",
            "Error replies, by code",
            m.errors.clone(),
        );
        registry.register(
            "meshmeet_ws_disconnects",
            "Closed signaling WebSockets, by reason",
            m.disconnects.clone(),
        );
        registry.register(
            "meshmeet_rooms_locked",
            "Rooms a host has locked",
            m.locked_rooms.clone(),
        );
        registry.register(
            "meshmeet_lobby_waiting",
            "Joiners waiting in rooms' lobbies",
            m.lobby_waiting.clone(),
        );
        registry.register(
            "meshmeet_kicks",
            "Participants removed from their room by a host",
            m.kicks.clone(),
        );
        m
    }
}

/// Why a connection ended (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The client closed it or the connection broke.
    Closed,
    /// No answer to pings within the timeout.
    Timeout,
    /// Its outgoing queue overflowed (1013).
    SlowReader,
    /// Refused input: flood, oversize or binary frame (1008, 1009, 1003).
    Policy,
    /// Another socket resumed its peer (4001).
    Replaced,
    /// A host removed its peer (4002).
    Kicked,
    /// Turned away from a lobby (4003).
    Denied,
    /// Server shutdown (1001).
    Shutdown,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Closed => "closed",
            Reason::Timeout => "timeout",
            Reason::SlowReader => "slow_reader",
            Reason::Policy => "policy",
            Reason::Replaced => "replaced",
            Reason::Kicked => "kicked",
            Reason::Denied => "denied",
            Reason::Shutdown => "shutdown",
        }
    }

    fn of_code(code: u16) -> Reason {
        match code {
            CLOSE_TRY_LATER => Reason::SlowReader,
            CLOSE_TAKEN_OVER => Reason::Replaced,
            CLOSE_KICKED => Reason::Kicked,
            CLOSE_DENIED => Reason::Denied,
            CLOSE_GOING_AWAY => Reason::Shutdown,
            _ => Reason::Policy,
        }
    }
}

/// What a connection shares with the others: its outgoing queue and close signal.
///
/// A plain deque under a mutex rather than a channel: it costs nothing while empty
/// (an idle connection holds no queue memory) and is released again once drained.
#[derive(Default)]
struct Outbox {
    /// Close code asked for; 0 while none. The first code wins.
    code: AtomicU16,
    close: Notify,
    queue: Mutex<Outgoing>,
    queued: Notify,
    /// Cluster: the remote home this connection's frames go to (`None`: this node's
    /// own core).
    route: ArcSwapOption<Route>,
    /// Cluster: the remote home answered a forwarded `join` (its status came).
    answered: Notify,
}

/// Where a connection's frames go when its room is homed on another node.
struct Route {
    home: Arc<str>,
    room: Arc<str>,
    name: Arc<str>,
    /// Its peer id and resume-token hash, once the home sent its `joined`.
    peer: Option<(Arc<str>, TokenHash)>,
}

#[derive(Default)]
struct Outgoing {
    msgs: VecDeque<Utf8Bytes>,
    /// Set once the connection ends: later messages are dropped.
    closed: bool,
}

/// The core's handle to a connection: a WebSocket of this node, or (cluster) one of
/// another node, whose messages go there over NATS.
#[derive(Clone)]
pub struct ConnHandle {
    id: ConnId,
    target: Target,
    /// The upgrade request's Host header, for the ICE servers in its `joined`.
    host: Option<Arc<str>>,
}

#[derive(Clone)]
enum Target {
    Local(Arc<Outbox>),
    Remote(Arc<RemoteConn>),
}

/// A participant's connection on another node.
struct RemoteConn {
    node: Arc<str>,
    /// Its connection number on that node.
    conn: u64,
}

impl ConnHandle {
    fn outbox(&self) -> Option<&Arc<Outbox>> {
        match &self.target {
            Target::Local(o) => Some(o),
            Target::Remote(_) => None,
        }
    }

    fn route(&self) -> Option<Arc<Route>> {
        self.outbox().and_then(|o| o.route.load_full())
    }

    fn set_route(&self, r: Option<Route>) {
        if let Some(o) = self.outbox() {
            o.route.store(r.map(Arc::new));
        }
    }

    /// Queues a message; a full queue closes the connection with 1013. (A remote
    /// connection's messages go out through [`apply`].)
    fn send(&self, text: Utf8Bytes) {
        let Some(outbox) = self.outbox() else {
            return;
        };
        let mut q = outbox.outgoing();
        if q.closed {
            return;
        }
        if q.msgs.len() >= QUEUE_LEN {
            drop(q);
            self.close(CLOSE_TRY_LATER);
            return;
        }
        q.msgs.push_back(text);
        let first = q.msgs.len() == 1;
        drop(q);
        if first {
            outbox.queued.notify_one();
        }
    }

    fn close(&self, code: u16) {
        let Some(outbox) = self.outbox() else {
            return;
        };
        if outbox
            .code
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            outbox.close.notify_one();
        }
    }
}

impl Outbox {
    fn outgoing(&self) -> MutexGuard<'_, Outgoing> {
        lock(&self.queue, "connection queue")
    }

    /// Takes the next queued message; frees the queue's memory once it is empty.
    fn pop(&self) -> Option<Utf8Bytes> {
        let mut q = self.outgoing();
        let m = q.msgs.pop_front();
        if q.msgs.is_empty() && q.msgs.capacity() > 0 {
            q.msgs = VecDeque::new();
        }
        m
    }

    /// Stops accepting messages; returns what was still queued.
    fn close_queue(&self) -> VecDeque<Utf8Bytes> {
        let mut q = self.outgoing();
        q.closed = true;
        std::mem::take(&mut q.msgs)
    }
}

/// Locks `m`, taking over a poisoned lock with an error log line.
///
/// A lock is poisoned when a thread panicked while holding it. Neither lock here can
/// be poisoned by the code as written: the queue's sections are single deque
/// operations, and the rooms core does no indexing or unwrapping on input. Should a
/// bug panic inside one anyway, its tables are still well-formed maps (each core
/// method tolerates a missing entry), so serving every other call on is better than
/// failing them all; the log line makes the bug visible. The poison is cleared, so
/// one incident logs once.
fn lock<'a, T>(m: &'a Mutex<T>, what: &'static str) -> MutexGuard<'a, T> {
    match m.lock() {
        Ok(guard) => guard,
        Err(poisoned) => {
            tracing::error!(
                lock = what,
                "a task panicked while holding this lock; continuing with the state it left"
            );
            m.clear_poison();
            poisoned.into_inner()
        }
    }
}

/// What the signaling layer takes from the config.
#[derive(Debug, Clone)]
pub struct SignalingConfig {
    pub rules: RoomRules,
    /// Largest accepted frame and message, in bytes.
    pub max_message_bytes: usize,
    /// Per-connection rate limit: sustained frames per second, and burst.
    pub rate_per_s: u32,
    pub rate_burst: u32,
    /// Origins allowed besides the server's own.
    pub allowed_origins: Vec<String>,
    /// Where the rooms snapshot lives (see [`persist`]); `None` = not kept (resume off).
    pub persist_dir: Option<PathBuf>,
}

impl SignalingConfig {
    pub fn from_config(c: &Config) -> SignalingConfig {
        SignalingConfig {
            rules: RoomRules {
                capacity: c.rooms.capacity,
                password: c.rooms.password.clone(),
                resume_grace: Duration::from_secs(c.rooms.resume_grace_s),
            },
            max_message_bytes: c.rooms.max_message_bytes,
            rate_per_s: c.rooms.rate_per_s,
            rate_burst: c.rooms.rate_burst,
            allowed_origins: c.http.allowed_origins.clone(),
            persist_dir: (c.rooms.resume_grace_s > 0).then(|| c.data_dir.clone()),
        }
    }
}

/// Signaling state, shared by all connections: the rooms core and what the
/// connections need from the rest of the server.
pub struct Signaling {
    core: Mutex<Rooms<ConnHandle>>,
    pub metrics: SignalingMetrics,
    timings: ArcSwap<SignalingTimings>,
    next_conn: AtomicU64,
    max_message_bytes: usize,
    rate_per_s: u32,
    rate_burst: u32,
    allowed_origins: Vec<String>,
    ice: Arc<IceProvider>,
    /// Told when a peer leaves for good (the relay drops its allocations).
    peer_events: Arc<dyn PeerEvents>,
    /// Cancelled when the server stops: connections close with 1001.
    shutdown: CancellationToken,
    /// Connection tasks and the grace timer, which shutdown waits for.
    tasks: TaskTracker,
    /// The deadline the grace timer sleeps towards (`None`: it waits for a wake-up).
    /// Locked after `core` when both are held, and never across an `.await`.
    timer_at: Mutex<Option<Instant>>,
    timer_wake: Notify,
    /// Set once the grace timer task runs (it starts on the first grace).
    timer_started: AtomicBool,
    persist_dir: Option<PathBuf>,
    /// The core generation last written (`None`: nothing written yet). Held while
    /// writing, so writes never overlap and never go back to an older state.
    saved: Mutex<Option<u64>>,
    /// Set by the final write at shutdown: nothing is written after it.
    frozen: AtomicBool,
    /// The last write failed (logged once until one succeeds again).
    save_failing: AtomicBool,
    /// Set when the node is part of a cluster (`cluster.nats_url`).
    cluster: OnceLock<Arc<Cluster>>,
    /// Cluster, as a home: connections of other nodes in rooms homed here, by
    /// (node, their connection number).
    remote: Mutex<HashMap<(Arc<str>, u64), ConnHandle>>,
    /// Cluster, as a participant's node: this node's connections whose room is
    /// homed elsewhere.
    routed: Mutex<HashMap<ConnId, ConnHandle>>,
}

impl Signaling {
    pub fn new(
        cfg: SignalingConfig,
        ice: Arc<IceProvider>,
        peer_events: Arc<dyn PeerEvents>,
        shutdown: CancellationToken,
        tasks: TaskTracker,
        metrics: SignalingMetrics,
    ) -> Signaling {
        Signaling {
            persist_dir: cfg.persist_dir,
            saved: Mutex::new(None),
            frozen: AtomicBool::new(false),
            save_failing: AtomicBool::new(false),
            core: Mutex::new(Rooms::with_os_rng(cfg.rules)),
            metrics,
            timings: ArcSwap::from_pointee(SignalingTimings::default()),
            next_conn: AtomicU64::new(1),
            max_message_bytes: cfg.max_message_bytes,
            rate_per_s: cfg.rate_per_s,
            rate_burst: cfg.rate_burst,
            allowed_origins: cfg.allowed_origins,
            ice,
            peer_events,
            shutdown,
            tasks,
            timer_at: Mutex::new(None),
            timer_wake: Notify::new(),
            timer_started: AtomicBool::new(false),
            cluster: OnceLock::new(),
            remote: Mutex::new(HashMap::new()),
            routed: Mutex::new(HashMap::new()),
        }
    }

    /// Makes this node part of a cluster (once, before serving).
    pub fn set_cluster(&self, cluster: Arc<Cluster>) {
        let _ = self.cluster.set(cluster);
    }

    /// `None` on a single node; else whether NATS is reachable.
    pub fn cluster_healthy(&self) -> Option<bool> {
        self.cluster.get().map(|c| c.ready())
    }

    pub fn timings(&self) -> SignalingTimings {
        **self.timings.load()
    }

    /// Changes the heartbeat timings for connections opened from now on.
    pub fn set_timings(&self, t: SignalingTimings) {
        self.timings.store(Arc::new(t));
    }

    fn core(&self) -> MutexGuard<'_, Rooms<ConnHandle>> {
        lock(&self.core, "rooms core")
    }

    /// Runs one core call and updates the room and peer gauges, all under the lock.
    fn with_core<T>(&self, f: impl FnOnce(&mut Rooms<ConnHandle>) -> T) -> T {
        let mut core = self.core();
        let out = f(&mut core);
        self.metrics.rooms.set(core.room_count() as i64);
        self.metrics.peers.set(core.peer_count() as i64);
        self.metrics.locked_rooms.set(core.locked_rooms() as i64);
        self.metrics.lobby_waiting.set(core.waiting_count() as i64);
        let kicks = core.kicks();
        let counted = self.metrics.kicks.get();
        if kicks > counted {
            self.metrics.kicks.inc_by(kicks - counted);
        }
        out
    }
}

/// Keeping the rooms across restarts (see [`persist`]).
impl Signaling {
    /// Restores the rooms snapshot, if there is a usable one: its peers wait in their
    /// resume grace. Anything unusable is logged and ignored (the server starts with
    /// no rooms, and the next write replaces the file).
    pub fn restore_saved(self: &Arc<Self>) {
        let Some(dir) = &self.persist_dir else {
            return;
        };
        let snap = match persist::load(dir) {
            Ok(Some(s)) => s,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "rooms snapshot ignored; starting with no rooms");
                return;
            }
        };
        let outcome = self.with_core(|core| {
            let fx = core.restore(snap, Instant::now(), unix_millis())?;
            Ok::<_, super::core::RestoreError>((
                fx,
                core.peer_count(),
                core.room_count(),
                core.poll_timeout(),
            ))
        });
        match outcome {
            Ok((fx, peers, rooms, next)) => {
                tracing::info!(peers, rooms, "rooms restored; their peers may resume");
                let gone = apply(self, None, fx);
                if let Some(next) = next {
                    arm_timer(self, next);
                }
                finish(self, gone);
            }
            Err(e) => {
                tracing::warn!(error = %e, path = %dir.join(persist::FILE).display(),
                    "rooms snapshot ignored; starting with no rooms");
            }
        }
    }

    /// Writes the snapshot when the rooms changed since the last write (`force`: even
    /// if not). Blocking file IO: call it off the async threads.
    fn save_if_changed(&self, last: bool) {
        let Some(dir) = &self.persist_dir else {
            return;
        };
        let mut saved = lock(&self.saved, "snapshot writer");
        if self.frozen.load(Ordering::Acquire) {
            return;
        }
        let (generation, snap) = {
            let core = self.core();
            if *saved == Some(core.generation()) && !last {
                return;
            }
            (core.generation(), core.snapshot(unix_millis()))
        };
        if last {
            self.frozen.store(true, Ordering::Release);
        }
        match persist::save(dir, &snap) {
            Ok(()) => {
                *saved = Some(generation);
                if self.save_failing.swap(false, Ordering::AcqRel) {
                    tracing::info!("rooms snapshot written again");
                }
            }
            Err(e) => {
                if !self.save_failing.swap(true, Ordering::AcqRel) {
                    tracing::warn!(error = %e, dir = %dir.display(),
                        "cannot write the rooms snapshot; a restart will lose the rooms");
                }
            }
        }
    }

    /// Writes the snapshot every [`persist::SAVE_EVERY`] when it changed, until
    /// shutdown.
    pub fn spawn_saver(self: &Arc<Self>) {
        if self.persist_dir.is_none() {
            return;
        }
        let sig = self.clone();
        self.tasks.spawn(async move {
            let mut tick = tokio::time::interval(persist::SAVE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = sig.shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let s = sig.clone();
                let _ = tokio::task::spawn_blocking(move || s.save_if_changed(false)).await;
            }
        });
    }

    /// The final write, before connections are closed at shutdown; later changes
    /// (connections closing) are not written.
    pub async fn save_for_shutdown(self: &Arc<Self>) {
        if self.persist_dir.is_none() {
            return;
        }
        let s = self.clone();
        let _ = tokio::task::spawn_blocking(move || s.save_if_changed(true)).await;
    }
}

/// The cluster side of signaling (docs/CLUSTER.md): frames forwarded to rooms homed
/// here, deliveries for this node's participants of rooms homed elsewhere, nodes
/// dying, rooms moving.
impl Signaling {
    fn cl(&self) -> Option<&Arc<Cluster>> {
        self.cluster.get()
    }

    /// Names of the rooms in this node's core (all homed here).
    pub fn room_names(&self) -> Vec<Arc<str>> {
        self.core().room_names()
    }

    pub fn has_room(&self, room: &str) -> bool {
        self.core().has_room(room)
    }

    /// A room's part of the rooms snapshot, for its replication to other nodes.
    pub fn room_snapshot(&self, room: &str) -> Option<persist::Snapshot> {
        self.core().room_snapshot(room, unix_millis())
    }

    /// Takes a room over from the state its former home replicated: its peers not
    /// reattached yet wait in their resume grace.
    pub fn restore_room(self: &Arc<Self>, room: &str, snap: persist::Snapshot) {
        let peers = snap.peers.len();
        let mut failed = None;
        ordered(self, None, |core| {
            match core.restore_room(room, snap, Instant::now(), unix_millis()) {
                Ok(fx) => fx,
                Err(e) => {
                    failed = Some(e);
                    Vec::new()
                }
            }
        });
        match failed {
            None => tracing::info!(room, peers, "took over a room's replicated state"),
            Some(e) => tracing::warn!(room, error = %e, "a room's replicated state was not used"),
        }
    }

    /// The handle of another node's connection, made on its first frame here.
    fn remote_handle(&self, node: &str, conn: u64) -> ConnHandle {
        let mut map = lock(&self.remote, "remote connections");
        if let Some(h) = map.get(&(Arc::<str>::from(node), conn)) {
            return h.clone();
        }
        let node: Arc<str> = node.into();
        let h = ConnHandle {
            id: self.next_conn.fetch_add(1, Ordering::Relaxed),
            target: Target::Remote(Arc::new(RemoteConn {
                node: node.clone(),
                conn,
            })),
            host: None,
        };
        map.insert((node, conn), h.clone());
        h
    }

    /// After a join or reattach of another node's connection (`report`), or its
    /// leave: forgets it when it is in no room here; tells its node whether it is.
    /// (A node takes a `leave` as the end of its route at once, so a leave needs no
    /// answer, and each answer belongs to the one join or reattach before it.)
    fn report_status(&self, cl: &Cluster, node: &str, conn: u64, h: &ConnHandle, report: bool) {
        let joined = {
            let core = self.core();
            core.is_joined(h.id) || core.is_waiting(h.id)
        };
        if !joined {
            lock(&self.remote, "remote connections").remove(&(Arc::<str>::from(node), conn));
        }
        if report {
            cl.deliver(node, vec![Item::Status { conn, joined }]);
        }
    }

    /// One message from another node.
    pub fn cluster_message(self: &Arc<Self>, msg: ToNode) {
        let Some(cl) = self.cl().cloned() else {
            return;
        };
        match msg {
            ToNode::Fwd {
                from, conn, text, ..
            } => self.remote_frame(&cl, &from, conn, &text),
            ToNode::Gone { from, conn } => {
                let h = lock(&self.remote, "remote connections")
                    .remove(&(Arc::<str>::from(from.as_str()), conn));
                if let Some(h) = h {
                    ordered(self, None, |core| core.disconnect(h.id, Instant::now()));
                }
            }
            ToNode::Reattach { from, conn, peer } => {
                let h = self.remote_handle(&from, conn);
                ordered(self, None, |core| {
                    core.reattach(h.id, h.clone(), &peer, Instant::now())
                });
                self.report_status(&cl, &from, conn, &h, true);
            }
            ToNode::Deliver { from, items, .. } => self.delivered(&cl, &from, items),
        }
    }

    /// A frame of another node's participant, for a room homed here: handled like a
    /// local frame (the sending node checked its size and rate already).
    fn remote_frame(self: &Arc<Self>, cl: &Cluster, from: &str, conn: u64, text: &str) {
        let h = self.remote_handle(from, conn);
        let id = h.id;
        let now = Instant::now();
        let msg = match ClientMsg::parse(text) {
            Ok(m) => m,
            Err(_) => {
                let fx = vec![Effect::Send(
                    vec![h.clone()],
                    ServerMsg::error(ErrorCode::BadMessage),
                )];
                finish(self, apply(self, None, fx));
                return;
            }
        };
        match msg {
            ClientMsg::Ping | ClientMsg::IceRequest { .. } => {}
            ClientMsg::Relay { kind, to, payload } => {
                let fx = self.with_core(|c| c.relay(id, &h, kind, &to, payload));
                finish(self, apply(self, None, fx));
            }
            ClientMsg::Join(req) => {
                ordered(self, None, |c| c.join(id, h.clone(), req, now));
                self.report_status(cl, from, conn, &h, true);
            }
            ClientMsg::Leave => {
                ordered(self, None, |c| c.leave(id, &h));
                self.report_status(cl, from, conn, &h, false);
            }
            ClientMsg::Media(m) => {
                ordered(self, None, |c| c.media(id, &h, m));
            }
            ClientMsg::Chat { text } => {
                ordered(self, None, |c| c.chat(id, &h, &text, unix_millis()));
            }
            ClientMsg::Control(c) => {
                ordered(self, None, |core| core.control(id, &h, c, now));
            }
        }
    }

    /// What a home sends for this node's participants.
    fn delivered(self: &Arc<Self>, cl: &Arc<Cluster>, from: &str, items: Vec<Item>) {
        let routed = |conn: u64| lock(&self.routed, "routed connections").get(&conn).cloned();
        for item in items {
            match item {
                Item::Send { conns, text } => {
                    let text = Utf8Bytes::from(text);
                    for c in conns {
                        if let Some(h) = routed(c) {
                            h.send(text.clone());
                        }
                    }
                }
                Item::Joined { conn, text } => {
                    let Some(h) = routed(conn) else { continue };
                    let Some((text, peer)) = self.with_own_ice(&text, h.host.as_deref()) else {
                        tracing::warn!(node = from, "malformed joined from a home; dropped");
                        continue;
                    };
                    if let Some(r) = h.route() {
                        h.set_route(Some(Route {
                            home: r.home.clone(),
                            room: r.room.clone(),
                            name: r.name.clone(),
                            peer: Some(peer),
                        }));
                    }
                    h.send(Utf8Bytes::from(text));
                }
                Item::Close { conn, code } => {
                    if let Some(h) = routed(conn) {
                        h.close(code);
                    }
                }
                Item::Status { conn, joined } => {
                    let h = if joined {
                        routed(conn)
                    } else {
                        let h = lock(&self.routed, "routed connections").remove(&conn);
                        if let Some(h) = &h {
                            h.set_route(None);
                        }
                        h
                    };
                    if let Some(o) = h.as_ref().and_then(|h| h.outbox()) {
                        o.answered.notify_waiters();
                    }
                }
                Item::Rehome { conn } => {
                    let sig = self.clone();
                    let cl = cl.clone();
                    self.tasks.spawn(async move { sig.rehome(&cl, conn).await });
                }
            }
        }
    }

    /// A home's `joined` with this node's ICE servers in it; with the peer's id and
    /// resume-token hash.
    fn with_own_ice(
        &self,
        text: &str,
        host: Option<&str>,
    ) -> Option<(String, (Arc<str>, TokenHash))> {
        let mut v: serde_json::Value = serde_json::from_str(text).ok()?;
        let id: Arc<str> = v.get("id")?.as_str()?.into();
        let token = token_hash(v.get("resume")?.as_str()?);
        let ice = self.ice.for_peer(&id, host, unix_secs());
        v["ice"] = serde_json::to_value(ice).ok()?;
        Some((v.to_string(), (id, token)))
    }

    /// Finds the room of a routed connection again (its home died or moved it) and
    /// reattaches its peer there. A connection not joined yet is closed (1001): its
    /// client joins again.
    async fn rehome(self: &Arc<Self>, cl: &Arc<Cluster>, conn: ConnId) {
        let Some(h) = lock(&self.routed, "routed connections").get(&conn).cloned() else {
            return;
        };
        let Some(route) = h.route() else {
            return;
        };
        cl.forget_home(&route.room);
        let Some((id, token)) = route.peer.clone() else {
            h.close(CLOSE_GOING_AWAY);
            return;
        };
        let info = Reattach {
            id: id.to_string(),
            room: route.room.to_string(),
            name: route.name.to_string(),
            media: None,
            host: false,
            token,
        };
        match Box::pin(cl.resolve(&route.room, self)).await {
            Home::Here => {
                lock(&self.routed, "routed connections").remove(&conn);
                h.set_route(None);
                ordered(self, None, |core| {
                    core.reattach(conn, h.clone(), &info, Instant::now())
                });
            }
            Home::There(node) => {
                h.set_route(Some(Route {
                    home: node.clone(),
                    room: route.room.clone(),
                    name: route.name.clone(),
                    peer: route.peer.clone(),
                }));
                cl.send(
                    &node,
                    &ToNode::Reattach {
                        from: cl.node.to_string(),
                        conn,
                        peer: info,
                    },
                );
            }
        }
    }

    /// A node is dead (unheard, or restarted): its connections in rooms homed here
    /// drop into their resume grace; this node's participants of rooms it was home
    /// to move to a new home.
    pub fn cluster_node_dead(self: &Arc<Self>, node: &str) {
        let gone: Vec<ConnHandle> = {
            let mut map = lock(&self.remote, "remote connections");
            let keys: Vec<(Arc<str>, u64)> =
                map.keys().filter(|(n, _)| **n == *node).cloned().collect();
            keys.iter().filter_map(|k| map.remove(k)).collect()
        };
        let now = Instant::now();
        for h in gone {
            ordered(self, None, |core| core.disconnect(h.id, now));
        }
        self.rehome_where(|r| *r.home == *node);
    }

    /// Reattaches every routed connection whose route matches.
    fn rehome_where(self: &Arc<Self>, pick: impl Fn(&Route) -> bool) {
        let Some(cl) = self.cl().cloned() else {
            return;
        };
        let conns: Vec<ConnId> = lock(&self.routed, "routed connections")
            .iter()
            .filter(|(_, h)| h.route().is_some_and(|r| pick(&r)))
            .map(|(c, _)| *c)
            .collect();
        for conn in conns {
            let sig = self.clone();
            let cl = cl.clone();
            self.tasks.spawn(async move { sig.rehome(&cl, conn).await });
        }
    }

    /// NATS is back: this node's participants of remote rooms reattach (their homes
    /// may have taken them for gone meanwhile; a reattach of a connected peer changes
    /// nothing).
    pub fn cluster_reconnected(self: &Arc<Self>) {
        self.rehome_where(|_| true);
    }

    /// Another node holds a room this node served: its peers go there.
    pub fn cluster_room_lost(self: &Arc<Self>, room: &str, owner: Arc<str>) {
        let Some(cl) = self.cl().cloned() else {
            return;
        };
        let (moved, fx) = self.with_core(|core| core.evict_room(room));
        finish(self, apply(self, None, fx));
        let mut batches: Vec<(Arc<str>, Vec<Item>)> = Vec::new();
        for (info, handle) in moved {
            let Some(h) = handle else {
                continue;
            };
            match &h.target {
                Target::Local(_) => {
                    h.set_route(Some(Route {
                        home: owner.clone(),
                        room: info.room.as_str().into(),
                        name: info.name.as_str().into(),
                        peer: Some((info.id.as_str().into(), info.token)),
                    }));
                    lock(&self.routed, "routed connections").insert(h.id, h.clone());
                    cl.send(
                        &owner,
                        &ToNode::Reattach {
                            from: cl.node.to_string(),
                            conn: h.id,
                            peer: info,
                        },
                    );
                }
                Target::Remote(r) => {
                    lock(&self.remote, "remote connections").remove(&(r.node.clone(), r.conn));
                    match batches.iter_mut().find(|(n, _)| *n == r.node) {
                        Some((_, items)) => items.push(Item::Rehome { conn: r.conn }),
                        None => batches.push((r.node.clone(), vec![Item::Rehome { conn: r.conn }])),
                    }
                }
            }
        }
        for (node, items) in batches {
            cl.deliver(&node, items);
        }
    }

    /// Another node's peer left for good: this node's relay drops its allocations.
    pub fn cluster_peer_gone(&self, peer: &str, revoked: bool) {
        if revoked {
            self.peer_events.peer_revoked(peer);
        } else {
            self.peer_events.peer_gone(peer);
        }
    }
}

/// The `/ws` route, for the HTTPS router.
pub fn routes(signaling: Arc<Signaling>) -> Router {
    Router::new()
        .route("/ws", get(upgrade))
        .with_state(signaling)
}

/// The request's `Host` header, or the `:authority` of an HTTP/2 request.
fn host_of(headers: &HeaderMap, uri: &Uri) -> Option<String> {
    headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| uri.authority().map(|a| a.as_str().to_string()))
}

/// Checks the Origin first (a refused origin gets 403 whatever else the request
/// holds), then upgrades.
async fn upgrade(
    State(sig): State<Arc<Signaling>>,
    headers: HeaderMap,
    uri: Uri,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let host = host_of(&headers, &uri);
    let origin = headers
        .get(header::ORIGIN)
        .map(|o| o.to_str().unwrap_or(""));
    if !origin_allowed(origin, host.as_deref(), &sig.allowed_origins) {
        sig.metrics
            .disconnects
            .get_or_create(&ReasonLabel { reason: "origin" })
            .inc();
        return (StatusCode::FORBIDDEN, "Origin not allowed\n").into_response();
    }
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => return rejection.into_response(),
    };
    let max = sig.max_message_bytes;
    let tasks = sig.tasks.clone();
    ws.max_message_size(max)
        .max_frame_size(max)
        // Small buffers: signaling messages are small, and an idle connection should
        // cost little (the read buffer grows for a larger frame when one comes).
        .read_buffer_size(256)
        .write_buffer_size(8192)
        .max_write_buffer_size(max.saturating_mul(4).max(1 << 20))
        .on_upgrade(move |socket| tasks.track_future(connection(socket, sig, host)))
}

/// True when a WebSocket upgrade with this `Origin` may proceed: no Origin (not a
/// browser), the server's own origin (`https://` + the request's Host, default port
/// 443), or one of `allowed`.
pub fn origin_allowed(origin: Option<&str>, host: Option<&str>, allowed: &[String]) -> bool {
    let Some(origin) = origin else {
        return true;
    };
    let origin = origin.trim_end_matches('/');
    if allowed
        .iter()
        .any(|a| a.trim_end_matches('/').eq_ignore_ascii_case(origin))
    {
        return true;
    }
    let lower = origin.to_ascii_lowercase();
    let (Some(rest), Some(host)) = (lower.strip_prefix("https://"), host) else {
        return false;
    };
    !rest.is_empty() && with_port(rest) == with_port(&host.to_ascii_lowercase())
}

/// `host[:port]` with the default HTTPS port made explicit.
fn with_port(hp: &str) -> String {
    let has_port = match hp.rfind(']') {
        Some(i) => hp[i..].contains(':'),
        None => hp.contains(':'),
    };
    if has_port {
        hp.to_string()
    } else {
        format!("{hp}:443")
    }
}

/// How a connection ends.
enum Ending {
    /// Send a close frame with this code.
    Close(u16, Reason),
    /// The connection is already gone (or unresponsive): just drop it.
    Gone(Reason),
}

fn close_reason(code: u16) -> &'static str {
    match code {
        CLOSE_GOING_AWAY => "server shutting down",
        CLOSE_UNSUPPORTED => "binary frames are not accepted",
        CLOSE_POLICY => "policy violation",
        CLOSE_TOO_BIG => "message too big",
        CLOSE_TRY_LATER => "too slow to read messages",
        CLOSE_TAKEN_OVER => "resumed on another connection",
        CLOSE_KICKED => "removed by a host",
        CLOSE_DENIED => "not admitted",
        _ => "closing",
    }
}

/// Per-connection context for handling frames.
struct Conn {
    id: ConnId,
    handle: ConnHandle,
    limiter: RateLimiter,
}

/// One connection's task. A plain function returning an `async move` block: the
/// block uses the captured values in place, where an `async fn` would keep a second
/// copy of its arguments (the WebSocket alone is a few hundred bytes per connection).
#[allow(clippy::manual_async_fn)]
fn connection(
    mut ws: WebSocket,
    sig: Arc<Signaling>,
    host: Option<String>,
) -> impl Future<Output = ()> + Send {
    async move {
        let outbox = Arc::new(Outbox::default());
        let now = Instant::now();
        let timings = sig.timings();
        let id = sig.next_conn.fetch_add(1, Ordering::Relaxed);
        let mut conn = Conn {
            id,
            handle: ConnHandle {
                id,
                target: Target::Local(outbox.clone()),
                host: host.map(Arc::from),
            },
            limiter: RateLimiter::new(sig.rate_per_s, sig.rate_burst, now),
        };
        let mut heartbeat = Heartbeat::new(timings.ping_interval, timings.timeout, now);
        sig.metrics.connections.inc();
        let shutdown = sig.shutdown.clone();

        let mut deadline = heartbeat.deadline();
        let timer = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline));
        tokio::pin!(timer);
        let ending = loop {
            if heartbeat.deadline() != deadline {
                deadline = heartbeat.deadline();
                timer
                    .as_mut()
                    .reset(tokio::time::Instant::from_std(deadline));
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Ending::Close(CLOSE_GOING_AWAY, Reason::Shutdown),
                _ = outbox.close.notified() => {
                    let code = outbox.code.load(Ordering::Acquire);
                    break Ending::Close(code, Reason::of_code(code));
                }
                _ = &mut timer => {
                    let now = Instant::now();
                    let beat = heartbeat.poll(now);
                    // Re-arm now: a finished timer would fire again at once.
                    deadline = heartbeat.deadline();
                    timer.as_mut().reset(tokio::time::Instant::from_std(
                        deadline.max(now + Duration::from_millis(1)),
                    ));
                    match beat {
                        Beat::Wait => {}
                        Beat::TimedOut => break Ending::Gone(Reason::Timeout),
                        Beat::Ping => {
                            let send = ws.send(Message::Ping(bytes::Bytes::new()));
                            match Box::pin(guarded(send, &outbox, &shutdown)).await {
                                Ok(Ok(())) => {}
                                Ok(Err(_)) => break Ending::Gone(Reason::Closed),
                                Err(e) => break e,
                            }
                        }
                    }
                }
                _ = outbox.queued.notified() => {
                    let write = write_batch(&mut ws, &outbox);
                    match guarded(write, &outbox, &shutdown).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => break Ending::Gone(Reason::Closed),
                        Err(e) => break e,
                    }
                }
                incoming = ws.recv() => {
                    heartbeat.seen(Instant::now());
                    match incoming {
                        None => break Ending::Gone(Reason::Closed),
                        Some(Err(e)) => {
                            if is_too_big(e) {
                                break Ending::Close(CLOSE_TOO_BIG, Reason::Policy);
                            }
                            break Ending::Gone(Reason::Closed);
                        }
                        Some(Ok(Message::Text(text))) => {
                            if let Some(end) = on_text(&sig, &mut conn, text.as_str()).await {
                                break end;
                            }
                        }
                        Some(Ok(Message::Binary(_))) => {
                            break Ending::Close(CLOSE_UNSUPPORTED, Reason::Policy)
                        }
                        Some(Ok(Message::Close(frame))) => {
                            if frame.is_some_and(|f| f.code == CLOSE_GOING_AWAY) {
                                leave_on_going_away(&sig, &conn);
                            }
                            break Ending::Gone(Reason::Closed);
                        }
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    }
                }
            }
        };

        let reason = match &ending {
            Ending::Close(_, r) | Ending::Gone(r) => *r,
        };
        // Counted before the core hears of it, so whatever the core then sends (such
        // as `peer_left` once the grace ends) comes after the figures changed.
        sig.metrics.connections.dec();
        sig.metrics
            .disconnects
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            })
            .inc();
        // Out of the core first, so messages for this peer go to its resume queue while
        // the close handshake below takes its time.
        ordered(&sig, None, |core| core.disconnect(conn.id, Instant::now()));
        if let Some(cl) = sig.cluster.get() {
            if let Some(r) = outbox.route.swap(None) {
                lock(&sig.routed, "routed connections").remove(&conn.id);
                cl.send(
                    &r.home,
                    &ToNode::Gone {
                        from: cl.node.to_string(),
                        conn: conn.id,
                    },
                );
            }
        }
        let left = outbox.close_queue();
        match ending {
            Ending::Close(code, _) => {
                let frame = Message::Close(Some(CloseFrame {
                    code,
                    reason: Utf8Bytes::from_static(close_reason(code)),
                }));
                let finish = async {
                    // What was queued before the decision to close (e.g. the last error)
                    // still goes out, except to a reader already too slow for its queue.
                    if code != CLOSE_TRY_LATER {
                        for m in left {
                            ws.feed(Message::Text(m)).await?;
                        }
                    }
                    ws.send(frame).await
                };
                let _ = Box::pin(tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, finish)).await;
            }
            Ending::Gone(Reason::Closed) => {
                // Completes the closing handshake the client may have started.
                let _ = Box::pin(tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, ws.close())).await;
            }
            Ending::Gone(_) => {}
        }
    }
}

/// A client's close frame with 1001 (Going Away) counts as `leave`: browsers send it
/// when the page is closed, reloaded or navigated away, and that page's resume token
/// is gone with it. Firefox may lose the `leave` the page sent while unloading (the
/// frame was still queued when the tab was torn down) and closes the socket with
/// 1001 all the same. A network drop sends no close frame at all, so it
/// still gets the resume grace.
fn leave_on_going_away(sig: &Arc<Signaling>, conn: &Conn) {
    if let (Some(cl), Some(r)) = (sig.cluster.get(), conn.handle.route()) {
        cl.forward(&r.home, conn.id, r#"{"type":"leave"}"#);
        conn.handle.set_route(None);
        lock(&sig.routed, "routed connections").remove(&conn.id);
        return;
    }
    let id = conn.id;
    let h = &conn.handle;
    ordered(sig, conn.handle.host.as_deref(), |c| {
        if c.is_joined(id) {
            c.leave(id, h)
        } else {
            Vec::new()
        }
    });
}

/// Runs a socket write unless the connection is told to close or the server stops
/// meanwhile (a write to a reader that stopped reading may never finish).
async fn guarded<F: Future>(
    fut: F,
    outbox: &Outbox,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<F::Output, Ending> {
    tokio::select! {
        out = fut => Ok(out),
        _ = outbox.close.notified() => {
            let code = outbox.code.load(Ordering::Acquire);
            Err(Ending::Close(code, Reason::of_code(code)))
        }
        _ = shutdown.cancelled() => Err(Ending::Close(CLOSE_GOING_AWAY, Reason::Shutdown)),
    }
}

/// Writes what is queued (up to a batch), then flushes once. If more is left, the
/// connection is woken again for the next batch.
async fn write_batch(ws: &mut WebSocket, outbox: &Outbox) -> Result<(), axum::Error> {
    let mut sent = 0;
    while sent < WRITE_BATCH {
        let Some(m) = outbox.pop() else { break };
        ws.feed(Message::Text(m)).await?;
        sent += 1;
    }
    if sent == WRITE_BATCH && !outbox.outgoing().msgs.is_empty() {
        outbox.queued.notify_one();
    }
    ws.flush().await
}

/// True when a read failed because a frame or message exceeded the size limit.
fn is_too_big(e: axum::Error) -> bool {
    matches!(
        e.into_inner().downcast::<tungstenite::Error>().map(|b| *b),
        Ok(tungstenite::Error::Capacity(_))
    )
}

/// Cluster: sends the frame to the room's home when that is another node; returns
/// whether it was handled so (forwarded, or answered here).
async fn route_frame(
    sig: &Arc<Signaling>,
    cl: &Cluster,
    conn: &Conn,
    msg: &ClientMsg,
    text: &str,
) -> bool {
    let route = conn.handle.route();
    match msg {
        ClientMsg::Ping | ClientMsg::IceRequest { .. } => false,
        ClientMsg::Join(req) => {
            if route.is_some() {
                reply(sig, conn, &ServerMsg::error(ErrorCode::AlreadyJoined));
                return true;
            }
            {
                let core = sig.core();
                if core.is_joined(conn.id) || core.is_waiting(conn.id) {
                    return false;
                }
            }
            // Invalid names are refused by this node's core, which creates nothing.
            let (Ok(room), Some(name)) = (
                normalize_room(&req.room),
                normalize_name(req.name.as_deref()),
            ) else {
                return false;
            };
            match Box::pin(cl.resolve(&room, sig)).await {
                Home::Here => false,
                Home::There(node) => {
                    conn.handle.set_route(Some(Route {
                        home: node.clone(),
                        room: room.into(),
                        name: name.into(),
                        peer: None,
                    }));
                    lock(&sig.routed, "routed connections").insert(conn.id, conn.handle.clone());
                    // This connection's next frame waits for the home's answer, as on
                    // one node: a second `join` is `already_joined` only if this one
                    // got in, and a failed one (`room_full`, ...) blocks no retry.
                    let Some(outbox) = conn.handle.outbox() else {
                        return true;
                    };
                    let answered = outbox.answered.notified();
                    tokio::pin!(answered);
                    answered.as_mut().enable();
                    cl.forward(&node, conn.id, text);
                    if tokio::time::timeout(JOIN_ANSWER_WAIT, answered)
                        .await
                        .is_err()
                    {
                        tracing::debug!(node = %node, "no answer to a forwarded join yet");
                    }
                    true
                }
            }
        }
        _ => match route {
            Some(r) => {
                cl.forward(&r.home, conn.id, text);
                if matches!(msg, ClientMsg::Leave) {
                    // Out of the room at its home whatever happens there: the next
                    // join may go anywhere.
                    conn.handle.set_route(None);
                    lock(&sig.routed, "routed connections").remove(&conn.id);
                }
                true
            }
            None => false,
        },
    }
}

/// Handles one text frame; returns how the connection must end, if it must.
async fn on_text(sig: &Arc<Signaling>, conn: &mut Conn, text: &str) -> Option<Ending> {
    let now = Instant::now();
    match conn.limiter.frame(now) {
        Verdict::Allow => {}
        Verdict::Drop { notify } => {
            if notify {
                reply(sig, conn, &ServerMsg::error(ErrorCode::RateLimited));
            }
            return None;
        }
        Verdict::Close => return Some(Ending::Close(CLOSE_POLICY, Reason::Policy)),
    }
    let msg = match ClientMsg::parse(text) {
        Ok(m) => m,
        Err(_) => return bad_message(sig, conn, now),
    };
    if let Some(cl) = sig.cluster.get() {
        if route_frame(sig, cl, conn, &msg, text).await {
            return None;
        }
    }
    let id = conn.id;
    let h = &conn.handle;
    let host = conn.handle.host.as_deref();
    let bad = match msg {
        ClientMsg::Ping => {
            reply(sig, conn, &ServerMsg::Pong);
            return None;
        }
        ClientMsg::IceRequest { password } => {
            let unix = unix_secs();
            let remote_peer = h.route().and_then(|r| r.peer.as_ref().map(|p| p.0.clone()));
            let answer = match remote_peer {
                Some(peer) => Ok(IceFor::Peer(peer)),
                None => sig.core().ice_request(id, password.as_deref()),
            };
            let msg = match answer {
                Ok(IceFor::Peer(peer)) => ServerMsg::Ice {
                    ice: sig.ice.for_peer(&peer, host, unix),
                },
                Ok(IceFor::Anonymous) => {
                    let token = format!("{:016x}", rand::thread_rng().gen::<u64>());
                    ServerMsg::Ice {
                        ice: sig.ice.build(&token, host, unix, PRE_JOIN_ICE_TTL_S),
                    }
                }
                Err(code) => ServerMsg::error(code),
            };
            reply(sig, conn, &msg);
            return None;
        }
        ClientMsg::Relay { kind, to, payload } => {
            // Relays are the hot path: serialized and queued after the lock. Each
            // sender's relays stay in order (this task handles its frames one by one).
            let fx = sig.with_core(|c| c.relay(id, h, kind, &to, payload));
            let bad = has_bad_message(&fx);
            finish(sig, apply(sig, host, fx));
            bad
        }
        ClientMsg::Join(req) => ordered(sig, host, |c| c.join(id, h.clone(), req, now)),
        ClientMsg::Media(m) => ordered(sig, host, |c| c.media(id, h, m)),
        ClientMsg::Chat { text } => ordered(sig, host, |c| c.chat(id, h, &text, unix_millis())),
        ClientMsg::Leave => ordered(sig, host, |c| c.leave(id, h)),
        ClientMsg::Control(c) => ordered(sig, host, |core| core.control(id, h, c, now)),
    };
    if bad && conn.limiter.bad_message(now) {
        return Some(Ending::Close(CLOSE_POLICY, Reason::Policy));
    }
    None
}

fn bad_message(sig: &Signaling, conn: &mut Conn, now: Instant) -> Option<Ending> {
    reply(sig, conn, &ServerMsg::error(ErrorCode::BadMessage));
    if conn.limiter.bad_message(now) {
        return Some(Ending::Close(CLOSE_POLICY, Reason::Policy));
    }
    None
}

fn count(sig: &Signaling, msg: &ServerMsg) {
    let m = &sig.metrics;
    let kind = match msg {
        ServerMsg::Offer { .. } => 0,
        ServerMsg::Answer { .. } => 1,
        ServerMsg::Candidate { .. } => 2,
        ServerMsg::Media { .. } => 3,
        ServerMsg::Chat { .. } => 4,
        ServerMsg::Error { code, .. } => {
            m.errors
                .get_or_create(&CodeLabel {
                    code: code.as_str(),
                })
                .inc();
            return;
        }
        _ => return,
    };
    match m.relayed_by_type.get(kind) {
        Some(c) => {
            c.inc();
        }
        None => {
            m.relayed
                .get_or_create(&TypeLabel {
                    r#type: RELAYED_TYPES[kind],
                })
                .inc();
        }
    }
}

/// The message's JSON text, or `None` (with an error log line) if it cannot be
/// serialized; the message is then not sent to anyone.
fn encode(msg: &ServerMsg) -> Option<Utf8Bytes> {
    match msg.to_json() {
        Ok(text) => Some(Utf8Bytes::from(text)),
        Err(e) => {
            tracing::error!(r#type = msg.type_name(), error = %e, "cannot serialize a server message; not sent");
            None
        }
    }
}

/// A message to this connection only.
fn reply(sig: &Signaling, conn: &Conn, msg: &ServerMsg) {
    count(sig, msg);
    if let Some(text) = encode(msg) {
        conn.handle.send(text);
    }
}

fn has_bad_message(fx: &[Effect<ConnHandle>]) -> bool {
    fx.iter().any(|e| {
        matches!(
            e,
            Effect::Send(
                _,
                ServerMsg::Error {
                    code: ErrorCode::BadMessage,
                    ..
                }
            )
        )
    })
}

/// Runs a core call and queues its messages before releasing the lock, so that every
/// peer sees joins, leaves, media and chat in the core's order (and `joined` before
/// any `peer_joined`). Returns whether the caller got a `bad_message`.
fn ordered(
    sig: &Arc<Signaling>,
    host: Option<&str>,
    f: impl FnOnce(&mut Rooms<ConnHandle>) -> Vec<Effect<ConnHandle>>,
) -> bool {
    let (bad, gone, next) = sig.with_core(|core| {
        let fx = f(core);
        (
            has_bad_message(&fx),
            apply(sig, host, fx),
            core.poll_timeout(),
        )
    });
    if let Some(next) = next {
        arm_timer(sig, next);
    }
    finish(sig, gone);
    bad
}

/// A peer the relay must hear about.
enum Gone {
    /// Gone for good: its allocations go.
    Left(Arc<str>),
    /// Removed by a host: its credentials stop working too.
    Revoked(Arc<str>),
}

/// Tells the relay about peers gone for good (outside the rooms lock).
fn finish(sig: &Signaling, gone: Vec<Gone>) {
    for g in gone {
        let (id, revoked) = match g {
            Gone::Left(id) => {
                sig.peer_events.peer_gone(&id);
                (id, false)
            }
            Gone::Revoked(id) => {
                sig.peer_events.peer_revoked(&id);
                (id, true)
            }
        };
        if let Some(cl) = sig.cluster.get() {
            cl.broadcast_gone(&id, revoked);
        }
    }
}

/// Carries out the core's effects: serializes each message once and queues it for its
/// recipients. `host` is the Host header of the connection that caused them, for the
/// ICE config in `joined`. Returns the peers gone for good, for [`finish`].
fn apply(sig: &Arc<Signaling>, host: Option<&str>, effects: Vec<Effect<ConnHandle>>) -> Vec<Gone> {
    let mut gone = Vec::new();
    // Cluster: what goes to other nodes, per node in the core's order.
    let mut batches: Vec<(Arc<str>, Vec<Item>)> = Vec::new();
    let mut to_node =
        |node: &Arc<str>, item: Item| match batches.iter_mut().find(|(n, _)| n == node) {
            Some((_, items)) => items.push(item),
            None => batches.push((node.clone(), vec![item])),
        };
    for effect in effects {
        match effect {
            Effect::Send(targets, mut msg) => {
                count(sig, &msg);
                if let (ServerMsg::Joined { .. }, [t]) = (&msg, targets.as_slice()) {
                    if let Target::Remote(r) = &t.target {
                        // Its own node adds the ICE servers (its TURN URLs).
                        if let Some(text) = encode(&msg) {
                            to_node(
                                &r.node,
                                Item::Joined {
                                    conn: r.conn,
                                    text: text.to_string(),
                                },
                            );
                        }
                        continue;
                    }
                }
                if let ServerMsg::Joined { id, ice, .. } = &mut msg {
                    // The joiner's own Host header (a lobby admission is caused by a
                    // host's message, from a connection that may name the server
                    // otherwise).
                    let host = targets.first().and_then(|t| t.host.as_deref()).or(host);
                    *ice = Some(sig.ice.for_peer(id, host, unix_secs()));
                }
                let Some(text) = encode(&msg) else {
                    continue;
                };
                let mut remote: Vec<(Arc<str>, Vec<u64>)> = Vec::new();
                for t in &targets {
                    match &t.target {
                        Target::Local(_) => t.send(text.clone()),
                        Target::Remote(r) => match remote.iter_mut().find(|(n, _)| *n == r.node) {
                            Some((_, conns)) => conns.push(r.conn),
                            None => remote.push((r.node.clone(), vec![r.conn])),
                        },
                    }
                }
                for (node, conns) in remote {
                    to_node(
                        &node,
                        Item::Send {
                            conns,
                            text: text.to_string(),
                        },
                    );
                }
            }
            Effect::Close(h, code) => match &h.target {
                Target::Local(_) => h.close(code),
                Target::Remote(r) => to_node(&r.node, Item::Close { conn: r.conn, code }),
            },
            Effect::PeerGone(id) => gone.push(Gone::Left(id)),
            Effect::Revoke(id) => gone.push(Gone::Revoked(id)),
        }
    }
    if let Some(cl) = sig.cluster.get() {
        for (node, items) in batches {
            cl.deliver(&node, items);
        }
    }
    gone
}

/// Makes the grace timer wake by `next`: starts it on the first grace, and wakes it
/// when `next` comes before the deadline it sleeps towards.
fn arm_timer(sig: &Arc<Signaling>, next: Instant) {
    let mut at = lock(&sig.timer_at, "grace timer");
    if at.is_some_and(|a| a <= next) {
        return;
    }
    *at = Some(next);
    drop(at);
    if sig.timer_started.swap(true, Ordering::AcqRel) {
        sig.timer_wake.notify_one();
    } else {
        sig.tasks.spawn(timer_loop(sig.clone()));
    }
}

/// The rooms core's timer: sleeps until [`Rooms::poll_timeout`] and lets the core act
/// ([`Rooms::handle_timeout`]: graces that ended); wakes early when a new grace ends
/// before the one it sleeps towards; stops with the server.
async fn timer_loop(sig: Arc<Signaling>) {
    loop {
        let next = {
            let core = sig.core();
            let next = core.poll_timeout();
            *lock(&sig.timer_at, "grace timer") = next;
            next
        };
        let sleep = async {
            match next {
                Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sig.shutdown.cancelled() => return,
            _ = sig.timer_wake.notified() => continue,
            _ = sleep => {}
        }
        ordered(&sig, None, |c| c.handle_timeout(Instant::now()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        let none: Vec<String> = Vec::new();
        assert!(origin_allowed(None, Some("x.org"), &none));
        assert!(origin_allowed(Some("https://x.org"), Some("x.org"), &none));
        assert!(origin_allowed(
            Some("https://X.org:443"),
            Some("x.org"),
            &none
        ));
        assert!(origin_allowed(
            Some("https://localhost:8443"),
            Some("localhost:8443"),
            &none
        ));
        assert!(origin_allowed(
            Some("https://[::1]:8443"),
            Some("[::1]:8443"),
            &none
        ));
        assert!(!origin_allowed(
            Some("https://localhost:8444"),
            Some("localhost:8443"),
            &none
        ));
        assert!(!origin_allowed(
            Some("http://localhost:8443"),
            Some("localhost:8443"),
            &none
        ));
        assert!(!origin_allowed(
            Some("https://evil.org"),
            Some("x.org"),
            &none
        ));
        assert!(!origin_allowed(Some("null"), Some("x.org"), &none));
        assert!(!origin_allowed(Some("https://x.org"), None, &none));
        let allowed = vec!["https://app.example.org".to_string()];
        assert!(origin_allowed(
            Some("https://app.example.org"),
            Some("x.org"),
            &allowed
        ));
    }

    #[test]
    fn a_poisoned_lock_is_taken_over_once() {
        let m = Arc::new(Mutex::new(vec![1]));
        let m2 = m.clone();
        let panicked = std::thread::spawn(move || {
            let mut g = m2.lock().unwrap();
            g.push(2);
            panic!("a bug while holding the lock");
        })
        .join();
        assert!(panicked.is_err());
        assert!(m.is_poisoned());
        assert_eq!(*lock(&m, "test"), vec![1, 2]);
        assert!(!m.is_poisoned());
    }

    #[test]
    fn metrics_encode() {
        let mut reg = Registry::default();
        let m = SignalingMetrics::register(&mut reg);
        m.relayed
            .get_or_create(&TypeLabel { r#type: "offer" })
            .inc();
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        assert!(
            out.contains("meshmeet_signaling_messages_total{type=\"offer\"} 1"),
            "{out}"
        );
    }
}
