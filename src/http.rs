//! HTTPS: the axum router (embedded web client, `/healthz`, `/metrics`, and the
//! signaling route `/ws`), security headers, the TLS accept loop with graceful
//! shutdown, and the optional plain-HTTP listener that redirects to HTTPS
//! ([`serve_redirect`], capped like HTTPS).
//!
//! [`router`] needs only an [`HttpState`], no socket, so it is tested request by
//! request (`tower::ServiceExt::oneshot`, in `http/tests.rs`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Extension;
use axum::{Json, Router};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use ipnet::IpNet;
use rust_embed::RustEmbed;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tower_http::compression::CompressionLayer;
use tower_http::limit::RequestBodyLimitLayer;

use crate::acme::challenge::Challenges;
use crate::demux::{self, Kind, Prefixed};
use crate::limits::{AcceptBackoff, Caps, ConnLimiter, ConnPermit, LimitMetrics};
use crate::linger::LingeringTcp;
use crate::metrics::{HttpLabels, HttpMetrics, Metrics};
use crate::net::{canonical_ip, client_host, host_part};
use crate::relay::StreamEntry;
use crate::signaling::room::normalize_room;
use crate::signaling::ws::Signaling;
use crate::tls::{CertKind, Tls};
use crate::tls_stream::ServerTlsStream;

/// The web client, embedded at build time.
#[derive(RustEmbed)]
#[folder = "web/"]
struct Web;

const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
img-src 'self' data: blob:; media-src 'self' blob: mediastream:; connect-src 'self' blob:; \
font-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'";
const PERMISSIONS: &str =
    "camera=(self), microphone=(self), display-capture=(self), geolocation=(), payment=(), usb=()";
const HSTS: &str = "max-age=31536000";

/// Time limits that keep slow or idle clients from pinning resources (the TLS
/// handshake and header limits are [`HttpsLimits::handshake_timeout`]).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_HEADER_BYTES: usize = 32 * 1024;
const GRACEFUL_TIMEOUT: Duration = Duration::from_secs(4);

/// What the HTTPS routes use.
pub struct HttpState {
    /// Where the certificate came from: HSTS is sent only for a configured or ACME one
    /// (a self-signed certificate may change, and HSTS would then lock browsers out).
    pub cert_kind: CertKind,
    /// The whole registry, for `/metrics`.
    pub metrics: Arc<Metrics>,
    pub http_metrics: HttpMetrics,
    /// Networks allowed to read `/metrics`.
    pub metrics_allow: Vec<IpNet>,
    /// For `/healthz`'s uptime.
    pub started: Instant,
    /// Serves `/ws`.
    pub signaling: Arc<Signaling>,
}

/// The whole HTTPS router, ready to serve. Handlers that check the client address
/// (`/metrics`) read it from the request's `ConnectInfo<SocketAddr>` extension, which
/// [`serve_https`] inserts.
pub fn router(state: HttpState) -> Router {
    let hsts = matches!(state.cert_kind, CertKind::Configured | CertKind::Acme);
    let ws = crate::signaling::ws::routes(state.signaling.clone());
    let state = Arc::new(state);
    Router::new()
        .route("/", get(index))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/favicon.ico", get(favicon))
        .route("/robots.txt", get(robots))
        .route("/check", get(check_page))
        .route("/assets/{*path}", get(asset))
        .route("/{room}", get(room_page))
        .with_state(state.clone())
        .merge(ws)
        .fallback(not_found)
        .layer(RequestBodyLimitLayer::new(16 * 1024))
        .layer(CompressionLayer::new())
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .layer(middleware::from_fn_with_state(state, count_requests))
        .layer(middleware::from_fn(move |req, next| {
            security_headers(req, next, hsts)
        }))
}

async fn security_headers(req: Request, next: Next, hsts: bool) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert("permissions-policy", HeaderValue::from_static(PERMISSIONS));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    if hsts {
        h.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static(HSTS),
        );
    }
    res
}

fn route_label(path: &str) -> &'static str {
    match path {
        "/" => "index",
        "/healthz" => "healthz",
        "/metrics" => "metrics",
        "/ws" => "ws",
        "/check" => "check",
        "/favicon.ico" | "/robots.txt" => "static",
        p if p.starts_with("/assets/") => "assets",
        p if p.strip_prefix('/').unwrap_or(p).contains('/') => "other",
        _ => "room",
    }
}

async fn count_requests(State(state): State<Arc<HttpState>>, req: Request, next: Next) -> Response {
    let route = route_label(req.uri().path());
    let res = next.run(req).await;
    state
        .http_metrics
        .requests
        .get_or_create(&HttpLabels {
            route,
            status: res.status().as_u16(),
        })
        .inc();
    res
}

async fn index(headers: HeaderMap) -> Response {
    embedded("index.html", &headers)
}

async fn check_page(headers: HeaderMap) -> Response {
    embedded("check.html", &headers)
}

async fn room_page(Path(room): Path<String>, headers: HeaderMap) -> Response {
    match normalize_room(&room) {
        Ok(_) => embedded("room.html", &headers),
        Err(_) => not_found().await,
    }
}

async fn asset(Path(path): Path<String>, headers: HeaderMap) -> Response {
    if path.split('/').any(|seg| seg.is_empty() || seg == "..") {
        return not_found().await;
    }
    embedded(&format!("assets/{path}"), &headers)
}

async fn favicon(headers: HeaderMap) -> Response {
    embedded("assets/favicon.svg", &headers)
}

async fn robots() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "User-agent: *\nDisallow: /\n",
    )
        .into_response()
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "Not found\n",
    )
        .into_response()
}

fn content_type(path: &str) -> String {
    let ext = path.rsplit('.').next().unwrap_or("");
    match ext {
        "html" => "text/html; charset=utf-8".into(),
        "js" | "mjs" => "text/javascript; charset=utf-8".into(),
        "css" => "text/css; charset=utf-8".into(),
        "json" => "application/json".into(),
        "webmanifest" => "application/manifest+json".into(),
        "svg" => "image/svg+xml".into(),
        "txt" => "text/plain; charset=utf-8".into(),
        _ => mime_guess::from_path(path)
            .first_or_octet_stream()
            .to_string(),
    }
}

/// Serves an embedded file with its content type and a content-hash ETag
/// (`If-None-Match` answers 304). Browsers revalidate every load, so a new binary
/// never leaves a stale client behind.
fn embedded(path: &str, headers: &HeaderMap) -> Response {
    let Some(file) = Web::get(path) else {
        return (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "Not found\n",
        )
            .into_response();
    };
    let etag = format!("\"{}\"", hex::encode(&file.metadata.sha256_hash()[..16]));
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut res = if matches {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let mut r = Response::new(Body::from(file.data.into_owned()));
        if let Ok(v) = HeaderValue::from_str(&content_type(path)) {
            r.headers_mut().insert(header::CONTENT_TYPE, v);
        }
        r
    };
    if let Ok(v) = HeaderValue::from_str(&etag) {
        res.headers_mut().insert(header::ETAG, v);
    }
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    res
}

/// Always 200 while the process serves; a cluster node cut off from NATS says
/// `"status": "degraded"` (it still serves rooms homed here) with `"cluster"`.
async fn healthz(State(state): State<Arc<HttpState>>) -> Response {
    let mut body = serde_json::json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": state.started.elapsed().as_secs(),
    });
    if let Some(healthy) = state.signaling.cluster_healthy() {
        body["cluster"] = serde_json::json!(if healthy { "ok" } else { "degraded" });
        if !healthy {
            body["status"] = serde_json::json!("degraded");
        }
    }
    Json(body).into_response()
}

/// Prometheus text, for clients in `http.metrics_allow` only. A request without a
/// client address (none reaches here through [`serve_https`]) is refused too.
async fn metrics(
    State(state): State<Arc<HttpState>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
) -> Response {
    let allowed = peer.is_some_and(|Extension(ConnectInfo(peer))| {
        let ip = canonical_ip(peer.ip());
        state.metrics_allow.iter().any(|net| net.contains(&ip))
    });
    if !allowed {
        return (
            StatusCode::FORBIDDEN,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "Forbidden\n",
        )
            .into_response();
    }
    match state.metrics.encode() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode the metrics");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                "Cannot encode the metrics\n",
            )
                .into_response()
        }
    }
}

/// What bounds the HTTPS listener's connections.
pub struct HttpsLimits {
    pub limiter: Arc<ConnLimiter>,
    /// For the accept loop's backoff (accept errors are counted with the refusals).
    pub metrics: LimitMetrics,
    /// For the TLS handshake, and for each request's headers to arrive whole.
    pub handshake_timeout: Duration,
}

impl HttpsLimits {
    /// The limits `[http]` sets, counted in `metrics`.
    pub fn from_config(cfg: &crate::config::HttpConfig, metrics: LimitMetrics) -> HttpsLimits {
        HttpsLimits {
            limiter: ConnLimiter::new(
                "HTTPS",
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
}

/// Accepts TLS connections until `shutdown`, then lets in-flight requests finish (for
/// at most a few seconds). Upgraded WebSockets are closed by their own handlers. Each
/// connection gets the certificate current when it is accepted. Connections beyond
/// the caps in `limits` are closed at once; accept errors (out of file descriptors)
/// pause the loop, doubling up to a second, and are logged once a minute at most.
///
/// With `turn` set, the port is shared with the relay ([`crate::demux`]): TURN over
/// plain TCP and TURN over TLS are told from HTTPS per connection and handed to it
/// (under the relay's own stream caps from then on).
pub async fn serve_https(
    listener: TcpListener,
    tls: Arc<Tls>,
    metrics: HttpMetrics,
    shutdown: CancellationToken,
    app: Router,
    limits: HttpsLimits,
    turn: Option<StreamEntry>,
) {
    let graceful = GracefulShutdown::new();
    let handshake_timeout = limits.handshake_timeout;
    let mut backoff = AcceptBackoff::new("HTTPS", limits.metrics.clone());
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(handshake_timeout)
        .max_buf_size(MAX_HEADER_BYTES.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let builder = Arc::new(builder);
    let local = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "HTTPS listener has no address; not accepting");
            return;
        }
    };
    loop {
        let (tcp, peer) = tokio::select! {
            res = listener.accept() => match res {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: close what waits, back off instead of spinning.
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
        let _ = tcp.set_nodelay(true);
        metrics.connections.inc();
        let conn = Connection {
            config: tls.server_config(),
            app: app.clone(),
            builder: builder.clone(),
            metrics: metrics.clone(),
            watcher: graceful.watcher(),
            turn: turn.clone(),
            handshake_timeout,
            peer,
            local,
        };
        tokio::spawn(conn.serve(tcp, permit));
    }
    drop(listener);
    if tokio::time::timeout(GRACEFUL_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("some HTTPS connections did not finish in time");
    }
}

/// One accepted connection on the HTTPS port and what serving it needs.
struct Connection {
    config: Arc<rustls::ServerConfig>,
    app: Router,
    builder: Arc<auto::Builder<TokioExecutor>>,
    metrics: HttpMetrics,
    watcher: hyper_util::server::graceful::Watcher,
    turn: Option<StreamEntry>,
    handshake_timeout: Duration,
    peer: SocketAddr,
    local: SocketAddr,
}

impl Connection {
    /// Classifies the connection (plain TURN, TLS, or neither), completes TLS, then
    /// classifies again (TURN over TLS or HTTP) and serves it.
    async fn serve(self, tcp: TcpStream, permit: ConnPermit) {
        let peer = self.peer;
        // Classification is part of the handshake: `http.handshake_timeout_s` bounds
        // it too when it is the shorter.
        let classify = demux::CLASSIFY_TIMEOUT.min(self.handshake_timeout);
        let kind = match demux::sniff_tcp(&tcp, classify).await {
            Ok(k) => k,
            Err(e) => return self.unclassified(e),
        };
        match kind {
            Kind::Tls => {}
            Kind::Turn => {
                if let Some(turn) = &self.turn {
                    self.metrics.classified("turn-tcp");
                    // From here on the relay's stream caps hold it, not HTTPS's.
                    drop(permit);
                    turn.serve(tcp, peer, self.local, false).await;
                } else {
                    self.metrics.classified("rejected");
                    tracing::debug!(%peer, "TURN on the HTTPS port while the relay is off; closed");
                }
                return;
            }
            Kind::Other => {
                self.metrics.classified("rejected");
                tracing::debug!(%peer, "neither TLS nor TURN on the HTTPS port; answered 400");
                let mut tcp = LingeringTcp::new(tcp);
                let answer = demux::not_tls_answer();
                let _ = tokio::time::timeout(self.handshake_timeout, tcp.write_all(&answer)).await;
                return;
            }
        }
        let stream = match tokio::time::timeout(
            self.handshake_timeout,
            ServerTlsStream::accept(LingeringTcp::new(tcp), self.config.clone()),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.metrics.tls_handshake_failures.inc();
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                self.metrics.tls_handshake_failures.inc();
                tracing::debug!(%peer, "TLS handshake timed out");
                return;
            }
        };
        if stream.alpn_protocol() == Some(demux::ALPN_ACME_TLS) {
            // An ACME CA validating TLS-ALPN-01: the handshake was the answer.
            self.metrics.classified("acme-tls");
            tracing::debug!(%peer, "TLS-ALPN-01 validation handshake; closed");
            let mut stream = stream;
            let _ = tokio::time::timeout(self.handshake_timeout, stream.shutdown()).await;
            return;
        }
        let (kind, stream) = match demux::by_alpn(stream.alpn_protocol()) {
            Some(k) => (k, Prefixed::plain(stream)),
            // No ALPN: browsers' `turns:` connections, and `curl --no-alpn`.
            None => match demux::sniff_stream(stream, classify).await {
                Ok(x) => x,
                Err(e) => return self.unclassified(e),
            },
        };
        if kind == Kind::Turn {
            if let Some(turn) = &self.turn {
                self.metrics.classified("turn-tls");
                drop(permit);
                turn.serve(stream, peer, self.local, true).await;
            } else {
                self.metrics.classified("rejected");
                tracing::debug!(%peer, "TURN over TLS on the HTTPS port while the relay is off; closed");
            }
            return;
        }
        self.metrics.classified("http");
        // Held until the connection (or its WebSocket) ends.
        let _permit = permit;
        let svc = self
            .app
            .map_request(move |mut req: Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                req
            });
        let conn = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(svc));
        let conn = self.watcher.watch(conn.into_owned());
        if let Err(e) = conn.await {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
    }

    fn unclassified(&self, e: demux::SniffError) {
        let peer = self.peer;
        match e {
            demux::SniffError::TimedOut => {
                self.metrics.classified("timed-out");
                tracing::debug!(%peer, "too few bytes to tell HTTPS from TURN in time; closed");
            }
            demux::SniffError::Closed => {}
            demux::SniffError::Io(e) => tracing::debug!(%peer, error = %e, "connection failed"),
        }
    }
}

/// Plain HTTP: every request is redirected (301) to the same path over HTTPS, except
/// pending ACME HTTP-01 challenges (`challenges`, with ACME on), which are answered.
pub fn redirect_router(
    public_host: String,
    https_port: u16,
    challenges: Option<Arc<Challenges>>,
) -> Router {
    let redirect = Router::new().fallback(move |headers: HeaderMap, uri: Uri| {
        let public_host = public_host.clone();
        async move { redirect_to_https(&public_host, https_port, &headers, &uri) }
    });
    match challenges {
        Some(challenges) => redirect.route(
            "/.well-known/acme-challenge/{token}",
            get(move |Path(token): Path<String>| async move { http01(&challenges, &token) }),
        ),
        None => redirect,
    }
}

/// The key authorization for a pending HTTP-01 token (RFC 8555 section 8.3), or 404.
fn http01(challenges: &Challenges, token: &str) -> Response {
    match challenges.http01(token) {
        Some(key_authorization) => (
            [(header::CONTENT_TYPE, "application/octet-stream")],
            key_authorization,
        )
            .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "No such ACME challenge\n",
        )
            .into_response(),
    }
}

fn redirect_to_https(
    public_host: &str,
    https_port: u16,
    headers: &HeaderMap,
    uri: &Uri,
) -> Response {
    let from_header = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .and_then(host_part);
    let host = if !public_host.is_empty() {
        client_host(public_host, None)
    } else if let Some(h) = from_header {
        h
    } else {
        return (StatusCode::BAD_REQUEST, "Missing or invalid Host header\n").into_response();
    };
    let port = if https_port == 443 {
        String::new()
    } else {
        format!(":{https_port}")
    };
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let target = format!("https://{host}{port}{path}");
    let mut res = Redirect::permanent(&target).into_response();
    *res.status_mut() = StatusCode::MOVED_PERMANENTLY;
    res
}

mod redirect;
pub use redirect::{redirect_limits, serve_redirect};

#[cfg(test)]
mod tests;
