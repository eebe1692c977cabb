//! WebSocket layer for signaling: `/ws` upgrade (filled in by the signaling work).

use std::sync::Arc;

use axum::Router;

use crate::app::AppState;

/// Adds the signaling routes to the HTTPS router.
pub fn routes(app: Router<Arc<AppState>>) -> Router<Arc<AppState>> {
    app
}
