//! meshmeet: self-hosted multi-party video calls in one binary.
//!
//! Four jobs, one place each:
//! - [`http`]: the axum router (embedded web client, `/healthz`, `/metrics`, `/ws`),
//!   security headers, the TLS accept loop, and the HTTP-to-HTTPS redirect. The router
//!   is built from an [`http::HttpState`] alone, without sockets.
//! - [`signaling`]: room signaling per `PROTOCOL.md`: wire messages, room names, the
//!   pure rooms core (effects out, `now` in), and the WebSocket layer at `/ws`, which
//!   receives only what it uses ([`signaling::ws::Signaling`]).
//! - [`relay`]: the embedded STUN/TURN server: a pure state machine (allocations,
//!   permissions, channels, REST credentials, stateless nonces, peer address policy,
//!   quotas) and its UDP/TCP/TLS listeners and relay sockets.
//! - [`cluster`]: several nodes sharing rooms through NATS (off unless
//!   `cluster.nats_url` is set): room homes with leases in a JetStream bucket, node
//!   liveness, the bounded queue of cluster messages (docs/CLUSTER.md).
//! - [`app`]: builds each part from the config, binds every socket, runs the
//!   listeners, shuts down in order. It is the only module that knows all the others.
//!
//! What they share:
//! - [`config`]: the one typed [`config::Config`] (defaults, TOML file, environment),
//!   parsed and validated once at start.
//! - [`secret`]: [`secret::Secret`], a string that never prints and compares in
//!   constant time.
//! - [`ice`]: ICE servers and time-limited TURN REST credentials handed to clients; the
//!   TURN shared secret; the peer-left events signaling sends the relay.
//! - [`tls`]: rustls server config from PEM files, an ACME certificate or a persisted
//!   self-signed certificate (rcgen); hot reload on SIGHUP. [`acme`]: certificates
//!   obtained and renewed from an ACME CA (TLS-ALPN-01, HTTP-01), swapped in live. [`tls_stream`]: a server TLS stream on
//!   rustls' unbuffered API that frees its buffers while a connection is idle.
//!   [`linger`]: lingering close for HTTPS connections. [`limits`]: connection caps
//!   per listener and the accept loops' backoff at the file-descriptor limit.
//! - [`metrics`]: the Prometheus registry and process figures.
//! - [`net`] (IP and host-name helpers), [`clock`] (wall-clock Unix time, where the
//!   protocol needs it), [`sys`] (open-files limit, systemd notifications).

pub mod acme;
pub mod app;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod demux;
pub mod http;
pub mod ice;
pub mod limits;
pub mod linger;
pub mod metrics;
pub mod net;
pub mod relay;
pub mod secret;
pub mod signaling;
pub mod sys;
pub mod tls;
pub mod tls_stream;

pub use app::Server;
pub use config::Config;
