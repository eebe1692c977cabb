//! Room signaling (PROTOCOL.md): room names here; the pure rooms core and the
//! WebSocket layer live in submodules.

pub mod room;
pub mod ws;
