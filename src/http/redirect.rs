//! The plain-HTTP listener (`http.redirect_listen`) that answers every request with
//! a redirect to HTTPS, bounded like the HTTPS listener: the same connection caps
//! (`http.max_connections` in total, `http.max_connections_per_ip` per address,
//! counted apart from HTTPS's), accept errors paced the same way, and one request per
//! connection whose headers must arrive whole within `http.handshake_timeout_s`; the
//! connection closes after its answer, so nothing stays open idle.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{HttpsLimits, GRACEFUL_TIMEOUT, MAX_HEADER_BYTES};
use crate::limits::{AcceptBackoff, Caps, ConnLimiter, LimitMetrics};
use crate::linger::LingeringTcp;

/// What the redirect listener's log lines call it.
const WHAT: &str = "HTTP redirect";

/// The redirect listener's limits: `[http]`'s caps and header deadline, in a limiter
/// of its own (so redirects never take places from HTTPS), counted in `metrics`.
pub fn redirect_limits(cfg: &crate::config::HttpConfig, metrics: LimitMetrics) -> HttpsLimits {
    HttpsLimits {
        limiter: ConnLimiter::new(
            WHAT,
            Caps {
                total: cfg.max_connections,
                per_ip: cfg.max_connections_per_ip,
                total_key: "http.max_connections",
                per_ip_key: "http.max_connections_per_ip",
            },
            metrics.clone(),
        ),
        metrics,
        handshake_timeout: Duration::from_secs(cfg.handshake_timeout_s),
    }
}

/// Serves `app` (the [`redirect_router`](super::redirect_router)) over plain HTTP/1.1
/// until `shutdown`, then lets answers in flight finish for a few seconds.
/// Connections beyond the caps in `limits` are closed at once; a connection gets one
/// request, whose headers must arrive whole within `limits.handshake_timeout`, and
/// the whole connection ends by then plus a grace for the answer.
pub async fn serve_redirect(
    listener: TcpListener,
    app: Router,
    shutdown: CancellationToken,
    limits: HttpsLimits,
) {
    let graceful = GracefulShutdown::new();
    let deadline = limits.handshake_timeout;
    let mut backoff = AcceptBackoff::new(WHAT, limits.metrics.clone());
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(deadline)
        .max_buf_size(MAX_HEADER_BYTES.max(8192))
        .keep_alive(false);
    let builder = Arc::new(builder);
    loop {
        let (tcp, peer) = tokio::select! {
            res = listener.accept() => match res {
                Ok(x) => x,
                Err(e) => {
                    let pause = backoff.failed(&e);
                    backoff.shed(&e, &listener);
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => continue,
                        _ = shutdown.cancelled() => break,
                    }
                }
            },
            _ = shutdown.cancelled() => break,
        };
        backoff.accepted();
        let Ok(permit) = limits.limiter.try_acquire(peer.ip()) else {
            // Closed at once: the refusal is counted and logged by the limiter.
            drop(tcp);
            continue;
        };
        let app = app.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            serve_one(tcp, peer, app, &builder, watcher, deadline).await;
        });
    }
    drop(listener);
    if tokio::time::timeout(GRACEFUL_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("some redirect connections did not finish in time");
    }
}

/// One connection: its request and the answer, within `deadline` for the headers
/// and as long again for the rest (a client that does not read its answer).
async fn serve_one(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    app: Router,
    builder: &hyper::server::conn::http1::Builder,
    watcher: hyper_util::server::graceful::Watcher,
    deadline: Duration,
) {
    let svc = TowerToHyperService::new(app);
    let conn = builder.serve_connection(TokioIo::new(LingeringTcp::new(tcp)), svc);
    match tokio::time::timeout(deadline * 2, watcher.watch(conn)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "redirect connection ended with an error"),
        Err(_) => tracing::debug!(%peer, "redirect connection timed out"),
    }
}
