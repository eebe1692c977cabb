//! Integration tests, one crate: the real server in-process on port 0 (or the real
//! binary), driven by real clients.
//!
//! - [`http`]: HTTPS with a real client (TLS, HTTP/1 and HTTP/2, certificates).
//! - [`lifecycle`]: the binary: command line, SIGTERM, SIGHUP.
//! - [`deploy`]: the systemd unit and `deploy/install.sh`.
//! - [`signaling`]: every message, error and close code over real WebSockets.
//! - [`signaling_scale`]: 1000 clients negotiating at once.
//! - [`room_control`]: hosts, lock, room password, lobby, kick (TURN credentials
//!   revoked), mute requests, and their refusals.
//! - [`restart`]: the binary restarted (SIGTERM, `kill -9`) in the middle of a call:
//!   peers resume with their ids, nobody is left behind.
//! - [`relay`]: STUN/TURN against independent clients (the `turn` crate, coturn's
//!   tools, raw STUN).
//! - [`oneport`]: TURN over TLS and TCP on the HTTPS port, beside HTTP/1.1, HTTP/2
//!   and WebSockets (coturn's `turnutils_uclient`, curl, the project's client).
//! - [`acme`]: certificates from a real ACME CA (Pebble): TLS-ALPN-01 and HTTP-01,
//!   restart without a new order, renewal under open calls, refusals and outages.
//! - [`cluster`]: several nodes and a real `nats-server -js`: rooms across nodes,
//!   capacity, resume on another node, SIGKILL of a node, NATS restarted.
//! - [`support`]: the test server, the WebSocket client, TLS client configs, and the
//!   check for external tools (tests needing coturn's tools or systemd skip with a
//!   printed reason without them, and fail instead under `MESHMEET_REQUIRE_TOOLS=1`).
//!
//! Run one module with `cargo test --test it relay::`.

mod acme;
mod cluster;
mod deploy;
mod http;
mod lifecycle;
mod limits;
mod oneport;
mod relay;
mod restart;
mod room_control;
mod signaling;
mod signaling_scale;
mod support;
