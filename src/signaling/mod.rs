//! Room signaling (PROTOCOL.md): wire messages ([`proto`]), room names ([`room`]), the
//! pure rooms core ([`core`]) and the WebSocket layer at `/ws` ([`ws`]).

pub mod core;
pub mod persist;
pub mod proto;
pub mod room;
pub mod ws;
