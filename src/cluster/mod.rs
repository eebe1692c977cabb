//! Several nodes sharing rooms through NATS (docs/CLUSTER.md): the NATS connection,
//! room homes claimed with leases in a JetStream key-value bucket, node liveness, and
//! the one ordered, bounded queue of outgoing cluster messages. What the messages
//! mean for rooms and connections is the signaling layer's business
//! (`signaling::ws`, which drives the rooms core); this module only moves them.
//!
//! Nothing here runs when `cluster.nats_url` is empty.

pub mod wire;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures_util::StreamExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use rand::Rng;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ClusterConfig;
use crate::signaling::persist::Snapshot;
use crate::signaling::ws::Signaling;
use wire::{Alive, PeerGone, ToNode, ALIVE_SUBJECT, GONE_SUBJECT};

/// How long a room's home holds it without renewing (the homes bucket's `max_age`).
pub const LEASE: Duration = Duration::from_secs(6);
/// How often a node says it is alive, renews its leases and looks for dead nodes.
pub const TICK: Duration = Duration::from_secs(1);
/// A node unheard for this long is dead.
pub const NODE_TIMEOUT: Duration = Duration::from_secs(4);
/// Outgoing cluster messages waiting to be published; more are dropped and counted.
pub const OUTBOX_LEN: usize = 4096;
/// How long an empty room keeps its lease before the key is deleted.
const LINGER: Duration = Duration::from_secs(10);
/// Key-value bucket of room homes.
pub const HOMES_BUCKET: &str = "meshmeet_homes";
/// Key-value bucket of rooms' replicated state (each room's part of the rooms
/// snapshot), written by the room's home, read by a node taking the room over.
pub const ROOMS_BUCKET: &str = "meshmeet_rooms";
/// A room's state is written at the first tick after it changed, and again at least
/// this often while the room exists (its age tells a node taking it over whether it
/// is still current).
pub const STATE_REFRESH: Duration = Duration::from_secs(5);
/// How long a room's state nobody rewrites stays in the rooms bucket.
const STATE_MAX_AGE: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    pub direction: &'static str,
}

/// Cluster figures for `/metrics`.
#[derive(Clone)]
pub struct ClusterMetrics {
    pub messages: Family<DirectionLabel, Counter>,
    pub dropped: Counter,
    pub forward_latency: Histogram,
    pub rooms_homed: Gauge,
    pub nats_connected: Gauge,
}

impl ClusterMetrics {
    pub fn register(registry: &mut Registry) -> ClusterMetrics {
        let m = ClusterMetrics {
            messages: Family::default(),
            dropped: Counter::default(),
            forward_latency: Histogram::new([
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5,
            ]),
            rooms_homed: Gauge::default(),
            nats_connected: Gauge::default(),
        };
        registry.register(
            "meshmeet_cluster_messages",
            "Cluster messages published (out) and received (in)",
            m.messages.clone(),
        );
        registry.register(
            "meshmeet_cluster_dropped",
            "Cluster messages dropped: NATS unreachable, queue full, or malformed",
            m.dropped.clone(),
        );
        registry.register(
            "meshmeet_cluster_forward_latency_seconds",
            "From a node publishing a frame or delivery to its receiver handling it",
            m.forward_latency.clone(),
        );
        registry.register(
            "meshmeet_cluster_rooms_homed",
            "Rooms this node is home to",
            m.rooms_homed.clone(),
        );
        registry.register(
            "meshmeet_cluster_nats_connected",
            "1 while connected to NATS",
            m.nats_connected.clone(),
        );
        m
    }
}

/// Where a room lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Home {
    Here,
    There(Arc<str>),
}

struct Lease {
    /// The key's revision we hold; `None` = provisional (NATS was unreachable).
    revision: Option<u64>,
    empty_since: Option<Instant>,
    /// The room's state as last written to the rooms bucket (a hash of it without
    /// its time stamp), and when.
    written: Option<(u64, Instant)>,
}

#[derive(Default)]
struct State {
    /// Rooms homed here.
    leases: HashMap<Arc<str>, Lease>,
    /// Rooms known to be homed elsewhere.
    homes: HashMap<Arc<str>, Arc<str>>,
    /// Last heartbeat of each node: (boot, when).
    alive: HashMap<Arc<str>, (u64, Instant)>,
    connected_since: Option<Instant>,
}

/// The cluster side of one node.
pub struct Cluster {
    pub node: Arc<str>,
    boot: u64,
    client: async_nats::Client,
    out: mpsc::Sender<(String, Bytes)>,
    out_rx: Mutex<Option<mpsc::Receiver<(String, Bytes)>>>,
    homes: Mutex<Option<kv::Store>>,
    states: Mutex<Option<kv::Store>>,
    st: Mutex<State>,
    pub metrics: ClusterMetrics,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => {
            tracing::error!("cluster state lock poisoned; continuing");
            m.clear_poison();
            p.into_inner()
        }
    }
}

/// Wall clock in Unix microseconds (forward latency across nodes).
fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

impl Cluster {
    /// Starts connecting to NATS (in the background: a node starts even while NATS is
    /// unreachable, and keeps retrying).
    pub async fn connect(cfg: &ClusterConfig, metrics: ClusterMetrics) -> anyhow::Result<Cluster> {
        let node: Arc<str> = cfg.effective_node_name().into();
        let mut opts = async_nats::ConnectOptions::new()
            .name(format!("meshmeet-{node}"))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((100 * attempts as u64).min(1000))
            })
            .connection_timeout(Duration::from_secs(2))
            .client_capacity(OUTBOX_LEN);
        if !cfg.nats_user.is_empty() {
            opts = opts.user_and_password(
                cfg.nats_user.clone(),
                cfg.nats_password.expose().to_string(),
            );
        }
        if !cfg.nats_token.is_empty() {
            opts = opts.token(cfg.nats_token.expose().to_string());
        }
        if cfg.nats_url.to_ascii_lowercase().starts_with("tls://") {
            opts = opts.require_tls(true);
            if !cfg.nats_ca.is_empty() {
                opts = opts.add_root_certificates(cfg.nats_ca.clone().into());
            }
        }
        let client = opts
            .connect(cfg.nats_url.as_str())
            .await
            .map_err(|e| anyhow::anyhow!("NATS client for {}: {e}", cfg.nats_url))?;
        let (out, rx) = mpsc::channel(OUTBOX_LEN);
        Ok(Cluster {
            node,
            boot: rand::thread_rng().gen(),
            client,
            out,
            out_rx: Mutex::new(Some(rx)),
            homes: Mutex::new(None),
            states: Mutex::new(None),
            st: Mutex::new(State::default()),
            metrics,
        })
    }

    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Connected, with the buckets of room homes and states open: rooms can be
    /// claimed.
    pub fn ready(&self) -> bool {
        self.connected() && lock(&self.homes).is_some() && lock(&self.states).is_some()
    }

    /// Queues a message for `subject`; dropped (and counted) while NATS is
    /// unreachable or the queue is full. Call in the order messages must go out.
    fn publish(&self, subject: String, payload: Option<Bytes>) {
        let Some(payload) = payload else {
            self.metrics.dropped.inc();
            tracing::warn!(subject, "cluster message too large; dropped");
            return;
        };
        if !self.connected() || self.out.try_send((subject, payload)).is_err() {
            self.metrics.dropped.inc();
        }
    }

    /// Sends a message to one node's subject.
    pub fn send(&self, node: &str, msg: &ToNode) {
        self.publish(wire::node_subject(node), wire::encode(msg));
    }

    /// A frame for the room's home.
    pub fn forward(&self, home: &str, conn: u64, text: &str) {
        self.send(
            home,
            &ToNode::Fwd {
                from: self.node.to_string(),
                conn,
                text: text.to_string(),
                sent_us: unix_us(),
            },
        );
    }

    /// What a home sends a participant's node.
    pub fn deliver(&self, node: &str, items: Vec<wire::Item>) {
        self.send(
            node,
            &ToNode::Deliver {
                from: self.node.to_string(),
                items,
                sent_us: unix_us(),
            },
        );
    }

    /// Tells every other node that a peer left for good (their relays drop its
    /// allocations).
    pub fn broadcast_gone(&self, peer: &str, revoked: bool) {
        let m = PeerGone {
            from: self.node.to_string(),
            peer: peer.to_string(),
            revoked,
        };
        self.publish(GONE_SUBJECT.to_string(), wire::encode(&m));
    }

    /// Records the latency of a message stamped `sent_us` by its sender.
    pub fn observe_latency(&self, sent_us: u64) {
        let now = unix_us();
        let d = now.saturating_sub(sent_us) as f64 / 1e6;
        self.metrics.forward_latency.observe(d);
    }

    /// Whether `node` was heard within [`NODE_TIMEOUT`] (or this node has not been
    /// connected long enough to tell).
    pub fn alive(&self, node: &str) -> bool {
        if *node == *self.node {
            return true;
        }
        let st = lock(&self.st);
        let now = Instant::now();
        let settled = st
            .connected_since
            .is_some_and(|t| now.saturating_duration_since(t) >= NODE_TIMEOUT);
        if !settled {
            return true;
        }
        st.alive
            .get(node)
            .is_some_and(|(_, at)| now.saturating_duration_since(*at) < NODE_TIMEOUT)
    }

    fn store(&self) -> Option<kv::Store> {
        lock(&self.homes).clone()
    }

    fn states(&self) -> Option<kv::Store> {
        lock(&self.states).clone()
    }

    /// The state a room's former home replicated, if there is one.
    async fn saved_state(&self, room: &str) -> Option<Snapshot> {
        let store = self.states()?;
        let e = store.entry(wire::room_key(room).as_str()).await.ok()??;
        if e.operation != kv::Operation::Put {
            return None;
        }
        match wire::decode_room_state(&e.value) {
            Ok(s) => Some(s),
            Err(err) => {
                self.metrics.dropped.inc();
                tracing::warn!(error = %err, "unusable room state in the rooms bucket; ignored");
                None
            }
        }
    }

    /// Writes a room's state to the rooms bucket when it changed since the last
    /// write, or that is [`STATE_REFRESH`] old; deletes it when the room is gone.
    async fn replicate(&self, store: &kv::Store, room: &Arc<str>, sig: &Signaling) {
        let now = Instant::now();
        let key = wire::room_key(room);
        let prev = lock(&self.st).leases.get(room).and_then(|l| l.written);
        let written = match sig.room_snapshot(room) {
            None => {
                if prev.is_none() || store.delete(key.as_str()).await.is_err() {
                    return;
                }
                None
            }
            Some(mut snap) => {
                let stamp = std::mem::take(&mut snap.saved_unix_ms);
                let Ok(plain) = serde_json::to_vec(&snap) else {
                    return;
                };
                let mut h = std::collections::hash_map::DefaultHasher::new();
                plain.hash(&mut h);
                let hash = h.finish();
                let due = prev.is_none_or(|(last, at)| {
                    last != hash || now.saturating_duration_since(at) >= STATE_REFRESH
                });
                if !due {
                    return;
                }
                snap.saved_unix_ms = stamp;
                let Some(bytes) = wire::encode(&snap) else {
                    self.metrics.dropped.inc();
                    tracing::warn!(room = %room, "room state too large to replicate");
                    return;
                };
                if let Err(e) = store.put(key.as_str(), bytes).await {
                    tracing::warn!(error = %e, "cannot write a room's state");
                    return;
                }
                Some((hash, now))
            }
        };
        if let Some(l) = lock(&self.st).leases.get_mut(room) {
            l.written = written;
        }
    }

    /// Whether this node holds (or provisionally took) the room.
    pub fn is_home(&self, room: &str) -> bool {
        lock(&self.st).leases.contains_key(room)
    }

    fn take_lease(&self, room: &str, revision: Option<u64>) {
        let mut st = lock(&self.st);
        st.homes.remove(room);
        st.leases.insert(
            room.into(),
            Lease {
                revision,
                empty_since: None,
                written: None,
            },
        );
        self.metrics.rooms_homed.set(st.leases.len() as i64);
    }

    /// Forgets where a room lives (its home died or moved it).
    pub fn forget_home(&self, room: &str) {
        lock(&self.st).homes.remove(room);
    }

    /// Finds the home of a (canonical) room, claiming it when nobody holds it, or
    /// when its holder is dead; a room claimed so gets the state its former home
    /// replicated, if any (`sig`'s core takes it over). Without NATS this node takes
    /// it provisionally.
    pub async fn resolve(&self, room: &str, sig: &Arc<Signaling>) -> Home {
        {
            let st = lock(&self.st);
            if st.leases.contains_key(room) {
                return Home::Here;
            }
            if let Some(n) = st.homes.get(room).cloned() {
                drop(st);
                if self.alive(&n) {
                    return Home::There(n);
                }
            }
        }
        let Some(store) = self.store().filter(|_| self.connected()) else {
            self.take_lease(room, None);
            return Home::Here;
        };
        let key = wire::room_key(room);
        for _ in 0..4 {
            match store.entry(key.as_str()).await {
                Ok(Some(e)) if e.operation == kv::Operation::Put => {
                    let owner = String::from_utf8_lossy(&e.value).to_string();
                    if owner == *self.node {
                        self.take_lease(room, Some(e.revision));
                        return Home::Here;
                    }
                    if self.alive(&owner) {
                        let owner: Arc<str> = owner.into();
                        lock(&self.st).homes.insert(room.into(), owner.clone());
                        return Home::There(owner);
                    }
                    // Its holder is dead: take it over, unless another node is faster.
                    let state = self.saved_state(room).await;
                    let me = Bytes::from(self.node.to_string());
                    if let Ok(rev) = store.update(key.as_str(), me, e.revision).await {
                        tracing::info!(room, from = owner, "took over a room of a dead node");
                        self.take_lease(room, Some(rev));
                        if let Some(state) = state {
                            sig.restore_room(room, state);
                        }
                        return Home::Here;
                    }
                }
                Ok(_) => {
                    // Nobody holds it: a new room, or one whose home's lease lapsed.
                    let state = self.saved_state(room).await;
                    let me = Bytes::from(self.node.to_string());
                    if let Ok(rev) = store.create(key.as_str(), me).await {
                        self.take_lease(room, Some(rev));
                        if let Some(state) = state {
                            sig.restore_room(room, state);
                        }
                        return Home::Here;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read a room's home; serving it here");
                    break;
                }
            }
        }
        self.take_lease(room, None);
        Home::Here
    }

    /// Starts the cluster tasks: publisher, receiver, and the ticker (heartbeats,
    /// leases, dead nodes).
    pub fn spawn(
        self: &Arc<Self>,
        sig: Arc<Signaling>,
        shutdown: CancellationToken,
        tasks: &TaskTracker,
    ) {
        if let Some(rx) = lock(&self.out_rx).take() {
            tasks.spawn(publisher(self.clone(), rx, shutdown.clone()));
        }
        tasks.spawn(receiver(self.clone(), sig.clone(), shutdown.clone()));
        tasks.spawn(ticker(self.clone(), sig, shutdown));
    }

    /// Called every tick: connection state, heartbeat, bucket, leases, dead nodes.
    async fn tick(&self, sig: &Arc<Signaling>) {
        let connected = self.connected();
        self.metrics.nats_connected.set(i64::from(connected));
        let now = Instant::now();
        let reconnected = {
            let mut st = lock(&self.st);
            match (connected, st.connected_since) {
                (true, None) => {
                    st.connected_since = Some(now);
                    // Everyone gets a fresh chance to be heard.
                    for v in st.alive.values_mut() {
                        v.1 = now;
                    }
                    true
                }
                (false, Some(_)) => {
                    st.connected_since = None;
                    false
                }
                _ => false,
            }
        };
        if reconnected {
            tracing::info!("connected to NATS");
        }
        if !connected {
            return;
        }
        if self.store().is_none() || self.states().is_none() {
            let js = async_nats::jetstream::new(self.client.clone());
            for (name, max_age, slot) in [
                (HOMES_BUCKET, LEASE, &self.homes),
                (ROOMS_BUCKET, STATE_MAX_AGE, &self.states),
            ] {
                if lock(slot).is_some() {
                    continue;
                }
                match open_bucket(&js, name, max_age).await {
                    Some(s) => *lock(slot) = Some(s),
                    None => {
                        tracing::warn!(
                            bucket = name,
                            "cannot open a JetStream key-value bucket (is JetStream on?)"
                        );
                        return;
                    }
                }
            }
        }
        let alive = Alive {
            node: self.node.to_string(),
            boot: self.boot,
        };
        self.publish(ALIVE_SUBJECT.into(), wire::encode(&alive));
        if reconnected {
            sig.cluster_reconnected();
        }
        self.renew(sig).await;
        let dead: Vec<Arc<str>> = {
            let st = lock(&self.st);
            let settled = st
                .connected_since
                .is_some_and(|t| now.saturating_duration_since(t) >= NODE_TIMEOUT);
            if !settled {
                Vec::new()
            } else {
                st.alive
                    .iter()
                    .filter(|(_, (_, at))| now.saturating_duration_since(*at) >= NODE_TIMEOUT)
                    .map(|(n, _)| n.clone())
                    .collect()
            }
        };
        for node in dead {
            lock(&self.st).alive.remove(&node);
            tracing::warn!(node = %node, "cluster node unheard; taking it as dead");
            sig.cluster_node_dead(&node);
        }
    }

    /// Renews the leases of rooms homed here; claims provisional ones; lets go of
    /// rooms empty for a while; gives up rooms another node holds now.
    async fn renew(&self, sig: &Arc<Signaling>) {
        let (Some(store), Some(states)) = (self.store(), self.states()) else {
            return;
        };
        let now = Instant::now();
        let present = sig.room_names();
        let work: Vec<(Arc<str>, Option<u64>, bool)> = {
            let mut st = lock(&self.st);
            for r in &present {
                if !st.leases.contains_key(r) {
                    // A room that came into being without a claim.
                    st.leases.insert(
                        r.clone(),
                        Lease {
                            revision: None,
                            empty_since: None,
                            written: None,
                        },
                    );
                }
            }
            st.leases
                .iter_mut()
                .map(|(room, l)| {
                    let here = present.iter().any(|p| p == room);
                    if here {
                        l.empty_since = None;
                    } else if l.empty_since.is_none() {
                        l.empty_since = Some(now);
                    }
                    let expired = l
                        .empty_since
                        .is_some_and(|t| now.saturating_duration_since(t) >= LINGER);
                    (room.clone(), l.revision, expired)
                })
                .collect()
        };
        for (room, revision, expired) in work {
            let key = wire::room_key(&room);
            if expired {
                let _ = store.delete_expect_revision(key.as_str(), revision).await;
                let _ = states.delete(key.as_str()).await;
                let mut st = lock(&self.st);
                if !sig.has_room(&room) {
                    st.leases.remove(&room);
                }
                continue;
            }
            let me = Bytes::from(self.node.to_string());
            let result = match revision {
                Some(rev) => store.update(key.as_str(), me.clone(), rev).await.ok(),
                None => None,
            };
            let result = match result {
                Some(r) => Some(r),
                None => store.create(key.as_str(), me).await.ok(),
            };
            match result {
                Some(rev) => {
                    if let Some(l) = lock(&self.st).leases.get_mut(&room) {
                        l.revision = Some(rev);
                    }
                    self.replicate(&states, &room, sig).await;
                }
                None => {
                    // Someone else holds it now (this node was cut off for longer
                    // than the lease, or two nodes took it while NATS was away).
                    let (owner, rev) = match store.entry(key.as_str()).await {
                        Ok(Some(e)) if e.operation == kv::Operation::Put => {
                            (String::from_utf8_lossy(&e.value).to_string(), e.revision)
                        }
                        _ => continue,
                    };
                    if owner == *self.node {
                        // Ours still, under a revision we did not know: adopt it.
                        if let Some(l) = lock(&self.st).leases.get_mut(&room) {
                            l.revision = Some(rev);
                        }
                        continue;
                    }
                    tracing::warn!(room = %room, owner, "another node holds this room now; moving it there");
                    {
                        let mut st = lock(&self.st);
                        st.leases.remove(&room);
                        st.homes.insert(room.clone(), owner.as_str().into());
                    }
                    sig.cluster_room_lost(&room, owner.into());
                }
            }
        }
        self.metrics
            .rooms_homed
            .set(lock(&self.st).leases.len() as i64);
    }

    fn heard(&self, a: Alive, sig: &Arc<Signaling>) {
        if a.node == *self.node {
            return;
        }
        let restarted = {
            let mut st = lock(&self.st);
            let prev = st
                .alive
                .insert(a.node.as_str().into(), (a.boot, Instant::now()));
            prev.is_some_and(|(boot, _)| boot != a.boot)
        };
        if restarted {
            tracing::info!(node = a.node, "cluster node restarted");
            sig.cluster_node_dead(&a.node);
        }
    }
}

/// Opens a key-value bucket, creating it when it does not exist yet: the client's
/// own bucket creation first reads the account's limits, in a form nats-server 2.9
/// does not answer, so the stream behind a bucket is created here, as the client
/// would.
async fn open_bucket(
    js: &async_nats::jetstream::Context,
    name: &str,
    max_age: Duration,
) -> Option<kv::Store> {
    if let Ok(s) = js.get_key_value(name).await {
        return Some(s);
    }
    let stream = async_nats::jetstream::stream::Config {
        name: format!("KV_{name}"),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: 1,
        max_age,
        max_message_size: wire::MAX_ENVELOPE as i32,
        storage: async_nats::jetstream::stream::StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        num_replicas: 1,
        discard: async_nats::jetstream::stream::DiscardPolicy::New,
        ..Default::default()
    };
    if let Err(e) = js.get_or_create_stream(stream).await {
        tracing::warn!(bucket = name, error = %e, "cannot create a key-value bucket");
    }
    js.get_key_value(name).await.ok()
}

async fn publisher(
    cl: Arc<Cluster>,
    mut rx: mpsc::Receiver<(String, Bytes)>,
    shutdown: CancellationToken,
) {
    let out = cl
        .metrics
        .messages
        .get_or_create(&DirectionLabel { direction: "out" })
        .clone();
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return,
            m = rx.recv() => m,
        };
        let Some((subject, payload)) = next else {
            return;
        };
        if !cl.connected() {
            cl.metrics.dropped.inc();
            continue;
        }
        match cl.client.publish(subject, payload).await {
            Ok(()) => {
                out.inc();
            }
            Err(_) => {
                cl.metrics.dropped.inc();
            }
        }
    }
}

async fn receiver(cl: Arc<Cluster>, sig: Arc<Signaling>, shutdown: CancellationToken) {
    let subs = async {
        let mine = cl.client.subscribe(wire::node_subject(&cl.node)).await?;
        let alive = cl.client.subscribe(ALIVE_SUBJECT).await?;
        let gone = cl.client.subscribe(GONE_SUBJECT).await?;
        Ok::<_, async_nats::SubscribeError>((mine, alive, gone))
    };
    let (mut mine, mut alive, mut gone) = match subs.await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot subscribe to the cluster subjects; cluster off");
            return;
        }
    };
    let inc = cl
        .metrics
        .messages
        .get_or_create(&DirectionLabel { direction: "in" })
        .clone();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            Some(m) = mine.next() => {
                inc.inc();
                match wire::decode_to_node(&m.payload) {
                    Ok(msg) => {
                        match &msg {
                            ToNode::Fwd { sent_us, .. } | ToNode::Deliver { sent_us, .. } => {
                                cl.observe_latency(*sent_us)
                            }
                            _ => {}
                        }
                        sig.cluster_message(msg);
                    }
                    Err(e) => {
                        cl.metrics.dropped.inc();
                        tracing::warn!(error = %e, "malformed cluster message dropped");
                    }
                }
            }
            Some(m) = alive.next() => {
                if let Ok(a) = wire::decode_alive(&m.payload) {
                    cl.heard(a, &sig);
                }
            }
            Some(m) = gone.next() => {
                if let Ok(g) = wire::decode_gone(&m.payload) {
                    if g.from != *cl.node {
                        sig.cluster_peer_gone(&g.peer, g.revoked);
                    }
                }
            }
            else => return,
        }
    }
}

async fn ticker(cl: Arc<Cluster>, sig: Arc<Signaling>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        cl.tick(&sig).await;
    }
}
