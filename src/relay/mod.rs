//! The embedded STUN/TURN relay: a sans-IO state machine ([`core`]) on the `stun`
//! codec and the `turn` crate's attribute types, REST credentials and stateless
//! nonces ([`auth`]), the peer address policy ([`policy`]), STUN/ChannelData framing
//! ([`wire`]), and thin tokio IO for the UDP, TCP and TLS listeners and the relay
//! sockets ([`io`], with batched datagram syscalls in [`batch`]). [`client`] is the
//! client side, for tests, benchmarks and tools.

pub mod auth;
pub mod batch;
pub mod client;
pub mod core;
pub mod io;
pub mod policy;
pub mod wire;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

pub use self::core::{FiveTuple, Transport};
pub use self::io::{Relay, RelayAddrs, RelayHandle, StreamEntry};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabels {
    pub transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirLabels {
    pub transport: &'static str,
    pub direction: &'static str,
}

/// Per-transport counters resolved once, so the packet path does no map lookups.
#[derive(Clone, Default)]
struct PerTransport {
    c: [Counter; 3],
}

impl PerTransport {
    fn from_family<L, F: Fn(&'static str) -> L>(fam: &Family<L, Counter>, label: F) -> Self
    where
        L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug,
    {
        PerTransport {
            c: ["udp", "tcp", "tls"].map(|t| fam.get_or_create(&label(t)).clone()),
        }
    }

    fn get(&self, t: Transport) -> &Counter {
        &self.c[match t {
            Transport::Udp => 0,
            Transport::Tcp => 1,
            Transport::Tls => 2,
        }]
    }
}

/// Relay metrics (`meshmeet_turn_*`).
#[derive(Clone, Default)]
pub struct RelayMetrics {
    active: Gauge,
    created: PerTransport,
    refused: Family<ReasonLabels, Counter>,
    auth_failures: Family<ReasonLabels, Counter>,
    bindings: PerTransport,
    pkts_to_peer: PerTransport,
    bytes_to_peer: PerTransport,
    pkts_to_client: PerTransport,
    bytes_to_client: PerTransport,
    dropped: Family<TransportLabels, Counter>,
    peer_denied: Counter,
    /// TURN over TCP/TLS connection caps (`meshmeet_turn_stream_connections_*`).
    streams: crate::limits::LimitMetrics,
}

impl RelayMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> RelayMetrics {
        let created_f = Family::<TransportLabels, Counter>::default();
        let bindings_f = Family::<TransportLabels, Counter>::default();
        let packets_f = Family::<DirLabels, Counter>::default();
        let bytes_f = Family::<DirLabels, Counter>::default();
        let m = RelayMetrics {
            active: Gauge::default(),
            created: PerTransport::from_family(&created_f, |t| TransportLabels { transport: t }),
            refused: Family::default(),
            auth_failures: Family::default(),
            bindings: PerTransport::from_family(&bindings_f, |t| TransportLabels { transport: t }),
            pkts_to_peer: PerTransport::from_family(&packets_f, |t| DirLabels {
                transport: t,
                direction: "to_peer",
            }),
            bytes_to_peer: PerTransport::from_family(&bytes_f, |t| DirLabels {
                transport: t,
                direction: "to_peer",
            }),
            pkts_to_client: PerTransport::from_family(&packets_f, |t| DirLabels {
                transport: t,
                direction: "to_client",
            }),
            bytes_to_client: PerTransport::from_family(&bytes_f, |t| DirLabels {
                transport: t,
                direction: "to_client",
            }),
            dropped: Family::default(),
            peer_denied: Counter::default(),
            streams: crate::limits::LimitMetrics::register(registry, "turn_stream"),
        };
        registry.register(
            "meshmeet_turn_allocations_active",
            "TURN allocations currently held",
            m.active.clone(),
        );
        registry.register(
            "meshmeet_turn_allocations_created",
            "TURN allocations created, by client transport",
            created_f,
        );
        registry.register(
            "meshmeet_turn_allocations_refused",
            "Allocate requests refused, by error code",
            m.refused.clone(),
        );
        registry.register(
            "meshmeet_turn_auth_failures",
            "Requests that failed authentication, by reason",
            m.auth_failures.clone(),
        );
        registry.register(
            "meshmeet_turn_binding_requests",
            "STUN Binding requests answered, by transport",
            bindings_f,
        );
        registry.register(
            "meshmeet_turn_relayed_packets",
            "Packets relayed, by client transport and direction",
            packets_f,
        );
        registry.register(
            "meshmeet_turn_relayed_bytes",
            "Payload bytes relayed, by client transport and direction",
            bytes_f,
        );
        registry.register(
            "meshmeet_turn_dropped_packets",
            "Packets dropped (no permission or channel, bandwidth cap), by transport",
            m.dropped.clone(),
        );
        registry.register(
            "meshmeet_turn_peer_denied",
            "Permissions or channels refused because the peer address is denied",
            m.peer_denied.clone(),
        );
        m
    }

    fn refused(&self, code: u16) {
        let reason = match code {
            400 => "400",
            401 => "401",
            403 => "403",
            420 => "420",
            437 => "437",
            440 => "440",
            441 => "441",
            442 => "442",
            443 => "443",
            486 => "486",
            508 => "508",
            _ => "other",
        };
        self.refused.get_or_create(&ReasonLabels { reason }).inc();
    }

    fn auth_failure(&self, reason: &'static str) {
        self.auth_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    fn allocation_created(&self, t: Transport) {
        self.created.get(t).inc();
    }

    fn set_active(&self, n: usize) {
        self.active.set(n as i64);
    }

    fn binding(&self, t: Transport) {
        self.bindings.get(t).inc();
    }

    fn peer_denied(&self) {
        self.peer_denied.inc();
    }

    fn dropped(&self, t: Transport, _reason: &'static str) {
        self.dropped
            .get_or_create(&TransportLabels {
                transport: t.label(),
            })
            .inc();
    }

    fn to_peer(&self, t: Transport, len: usize) {
        self.pkts_to_peer.get(t).inc();
        self.bytes_to_peer.get(t).inc_by(len as u64);
    }

    fn to_client(&self, t: Transport, len: usize) {
        self.pkts_to_client.get(t).inc();
        self.bytes_to_client.get(t).inc_by(len as u64);
    }
}
