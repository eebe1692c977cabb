//! meshmeet: self-hosted multi-party video calls in one binary.
//!
//! Modules, one per job:
//! - [`config`]: the one typed [`config::Config`] (defaults, TOML file, environment),
//!   validated once at start.
//! - [`tls`]: rustls server config from PEM files or a persisted self-signed
//!   certificate (rcgen); hot reload on SIGHUP.
//! - [`tls_stream`]: a server TLS stream on rustls' unbuffered API that frees its
//!   buffers while a connection is idle.
//! - [`http`]: the axum router (embedded web client, `/healthz`, `/metrics`), security
//!   headers, the TLS accept loop, and the HTTP-to-HTTPS redirect.
//! - [`signaling`]: room signaling per `PROTOCOL.md`: room names, the pure rooms core,
//!   and the WebSocket layer at `/ws`.
//! - [`ice`]: ICE servers and time-limited TURN REST credentials handed to clients; the
//!   TURN shared secret.
//! - [`metrics`]: the Prometheus registry and process figures.
//! - [`relay`]: the embedded STUN/TURN server: a pure state machine (allocations,
//!   permissions, channels, REST credentials, stateless nonces, peer address policy,
//!   quotas) and its UDP/TCP/TLS listeners and relay sockets.
//! - [`app`]: binds every socket, runs the listeners, shuts down in order.

pub mod app;
pub mod config;
pub mod http;
pub mod ice;
pub mod linger;
pub mod metrics;
pub mod relay;
pub mod signaling;
pub mod tls;
pub mod tls_stream;

pub use app::Server;
pub use config::Config;
