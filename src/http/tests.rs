//! The router request by request, without sockets (`tower::ServiceExt::oneshot`), and
//! the redirect and content-type helpers.

use super::*;

use axum::http::Request as HttpRequest;
use http_body_util::BodyExt;
use prometheus_client::registry::Registry;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::ice::{IceProvider, NoPeerEvents};
use crate::secret::Secret;
use crate::signaling::ws::{SignalingConfig, SignalingMetrics};

fn state(cert_kind: CertKind) -> HttpState {
    let cfg = Config::default();
    let mut registry = Registry::default();
    let http_metrics = HttpMetrics::register(&mut registry);
    let signaling_metrics = SignalingMetrics::register(&mut registry);
    let ice = Arc::new(IceProvider::new(
        &cfg,
        Secret::from("0123456789abcdef"),
        crate::ice::TurnPorts {
            main: 3478,
            extra_udp: Vec::new(),
            https: Some(8443),
            tls: None,
        },
    ));
    let signaling = Arc::new(Signaling::new(
        SignalingConfig::from_config(&cfg),
        ice,
        Arc::new(NoPeerEvents),
        CancellationToken::new(),
        TaskTracker::new(),
        signaling_metrics,
    ));
    HttpState {
        cert_kind,
        metrics: Arc::new(Metrics::new(registry)),
        http_metrics,
        metrics_allow: cfg.http.metrics_allow.clone(),
        started: Instant::now(),
        signaling,
    }
}

fn app() -> Router {
    router(state(CertKind::SelfSigned))
}

fn get(path: &str) -> HttpRequest<Body> {
    HttpRequest::get(path).body(Body::empty()).unwrap()
}

/// A request as [`serve_https`] passes it on: with the client's address.
fn get_from(path: &str, peer: &str) -> HttpRequest<Body> {
    let mut req = get(path);
    let peer: SocketAddr = peer.parse().unwrap();
    req.extensions_mut().insert(ConnectInfo(peer));
    req
}

async fn send(app: &Router, req: HttpRequest<Body>) -> Response {
    app.clone().oneshot(req).await.unwrap()
}

async fn body_text(res: Response) -> String {
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

fn assert_security_headers(res: &Response) {
    let h = res.headers();
    let csp = h[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    assert_eq!(h[header::REFERRER_POLICY], "no-referrer");
    assert_eq!(h[header::X_FRAME_OPTIONS], "DENY");
    assert_eq!(h["cross-origin-opener-policy"], "same-origin");
    let pp = h["permissions-policy"].to_str().unwrap();
    assert!(pp.contains("camera=(self)") && pp.contains("microphone=(self)"));
    assert!(pp.contains("display-capture=(self)"));
}

#[tokio::test]
async fn index_is_html_with_security_headers() {
    let res = send(&app(), get("/")).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.headers()[header::CONTENT_TYPE],
        "text/html; charset=utf-8"
    );
    assert_eq!(res.headers()[header::CACHE_CONTROL], "no-cache");
    assert_security_headers(&res);
    // A self-signed certificate: no HSTS.
    assert!(res
        .headers()
        .get(header::STRICT_TRANSPORT_SECURITY)
        .is_none());
    assert!(body_text(res).await.contains("<!doctype html>"));
}

#[tokio::test]
async fn hsts_only_with_a_configured_certificate() {
    let app = router(state(CertKind::Configured));
    for path in ["/", "/nope/nope"] {
        let res = send(&app, get(path)).await;
        assert_eq!(
            res.headers()[header::STRICT_TRANSPORT_SECURITY],
            "max-age=31536000",
            "{path}"
        );
    }
}

#[tokio::test]
async fn room_pages_and_names_that_are_not_rooms() {
    let app = app();
    for path in ["/team-standup", "/Team.Room", "/%ED%9A%8C%EC%9D%98"] {
        let res = send(&app, get(path)).await;
        assert_eq!(res.status(), StatusCode::OK, "{path}");
        assert_eq!(
            res.headers()[header::CONTENT_TYPE],
            "text/html; charset=utf-8"
        );
        assert_security_headers(&res);
        assert!(body_text(res).await.contains("<!doctype html>"), "{path}");
    }
    let too_long = format!("/{}", "r".repeat(65));
    for path in [
        "/api",
        "/-bad",
        "/a%20b",
        "/x/y",
        "/assets",
        too_long.as_str(),
    ] {
        let res = send(&app, get(path)).await;
        assert_eq!(res.status(), StatusCode::NOT_FOUND, "{path}");
        assert_security_headers(&res);
    }
    let res = send(&app, get("/check")).await;
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test]
async fn assets_have_types_and_etags() {
    let app = app();
    let res = send(&app, get("/assets/style.css")).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.headers()[header::CONTENT_TYPE],
        "text/css; charset=utf-8"
    );
    let etag = res.headers()[header::ETAG].to_str().unwrap().to_string();
    assert!(
        etag.starts_with('"') && etag.ends_with('"') && etag.len() == 34,
        "{etag}"
    );

    for matching in [etag.clone(), format!("\"x\", {etag}"), "*".to_string()] {
        let req = HttpRequest::get("/assets/style.css")
            .header(header::IF_NONE_MATCH, &matching)
            .body(Body::empty())
            .unwrap();
        let res = send(&app, req).await;
        assert_eq!(res.status(), StatusCode::NOT_MODIFIED, "{matching}");
        assert_eq!(res.headers()[header::ETAG], etag.as_str());
        assert!(body_text(res).await.is_empty());
    }
    let req = HttpRequest::get("/assets/style.css")
        .header(header::IF_NONE_MATCH, "\"stale\"")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&app, req).await.status(), StatusCode::OK);

    let res = send(&app, get("/favicon.ico")).await;
    assert_eq!(res.headers()[header::CONTENT_TYPE], "image/svg+xml");
    let res = send(&app, get("/robots.txt")).await;
    assert_eq!(body_text(res).await, "User-agent: *\nDisallow: /\n");

    for missing in [
        "/assets/nope.js",
        "/assets/a//b",
        "/assets/../Cargo.toml",
        "/assets/%2E%2E/Cargo.toml",
        "/assets/%2F..%2FCargo.toml",
    ] {
        let res = send(&app, get(missing)).await;
        assert_eq!(res.status(), StatusCode::NOT_FOUND, "{missing}");
        assert_eq!(body_text(res).await, "Not found\n", "{missing}");
    }
}

#[tokio::test]
async fn compression_when_asked_for() {
    let req = HttpRequest::get("/")
        .header(header::ACCEPT_ENCODING, "gzip")
        .body(Body::empty())
        .unwrap();
    let res = send(&app(), req).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()[header::CONTENT_ENCODING], "gzip");
}

#[tokio::test]
async fn large_bodies_are_refused() {
    let req = HttpRequest::post("/")
        .header(header::CONTENT_LENGTH, "20000")
        .body(Body::from(vec![b'x'; 20_000]))
        .unwrap();
    let res = send(&app(), req).await;
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_security_headers(&res);
}

#[tokio::test]
async fn healthz_reports_version_and_uptime() {
    let res = send(&app(), get("/healthz")).await;
    assert_eq!(res.status(), StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&body_text(res).await).unwrap();
    assert_eq!(v["status"], "ok");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert!(v["uptime_s"].is_u64());
}

#[tokio::test]
async fn metrics_by_client_address() {
    let app = app();
    send(&app, get("/healthz")).await;
    for allowed in ["127.0.0.1:5000", "[::1]:5000", "[::ffff:127.0.0.1]:5000"] {
        let res = send(&app, get_from("/metrics", allowed)).await;
        assert_eq!(res.status(), StatusCode::OK, "{allowed}");
        assert!(res.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text"));
        let text = body_text(res).await;
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
        assert!(
            text.contains("meshmeet_http_requests_total{route=\"healthz\",status=\"200\"} 1"),
            "{text}"
        );
    }
    for denied in ["10.1.2.3:5000", "[2001:db8::1]:443", "[::ffff:10.0.0.1]:1"] {
        let res = send(&app, get_from("/metrics", denied)).await;
        assert_eq!(res.status(), StatusCode::FORBIDDEN, "{denied}");
        assert_security_headers(&res);
    }
    // Without a client address (not through serve_https): refused, not an error.
    assert_eq!(
        send(&app, get("/metrics")).await.status(),
        StatusCode::FORBIDDEN
    );
    // Refusals are counted like any answer.
    let text = body_text(send(&app, get_from("/metrics", "127.0.0.1:1")).await).await;
    assert!(
        text.contains("meshmeet_http_requests_total{route=\"metrics\",status=\"403\"} 4"),
        "{text}"
    );
}

fn upgrade_request(origin: Option<&str>) -> HttpRequest<Body> {
    let mut b = HttpRequest::get("/ws")
        .header(header::HOST, "localhost:8443")
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_VERSION, "13")
        .header(header::SEC_WEBSOCKET_KEY, "dGhlIHNhbXBsZSBub25jZQ==");
    if let Some(o) = origin {
        b = b.header(header::ORIGIN, o);
    }
    b.body(Body::empty()).unwrap()
}

#[tokio::test]
async fn ws_without_upgrade_headers_is_a_bad_request() {
    let res = send(&app(), get("/ws")).await;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert_security_headers(&res);
}

#[tokio::test]
async fn ws_origin_is_checked_before_upgrading() {
    let app = app();
    for bad in [
        "https://evil.example",
        "http://localhost:8443",
        "null",
        "https://localhost:8444",
    ] {
        let res = send(&app, upgrade_request(Some(bad))).await;
        assert_eq!(res.status(), StatusCode::FORBIDDEN, "{bad}");
        assert_eq!(body_text(res).await, "Origin not allowed\n");
    }
    // An allowed origin (or none) gets past the check to the upgrade itself, which
    // needs a real connection: 426 here, without one.
    for good in [Some("https://localhost:8443"), None] {
        let res = send(&app, upgrade_request(good)).await;
        assert_eq!(res.status(), StatusCode::UPGRADE_REQUIRED, "{good:?}");
    }
    let text = body_text(send(&app, get_from("/metrics", "127.0.0.1:1")).await).await;
    assert!(
        text.contains("meshmeet_ws_disconnects_total{reason=\"origin\"} 4"),
        "{text}"
    );
}

#[test]
fn labels() {
    assert_eq!(route_label("/"), "index");
    assert_eq!(route_label("/abc"), "room");
    assert_eq!(route_label("/assets/app.js"), "assets");
    assert_eq!(route_label("/a/b"), "other");
    assert_eq!(route_label(""), "room");
}

#[test]
fn redirect_keeps_path_and_swaps_port() {
    let mut h = HeaderMap::new();
    h.insert(
        header::HOST,
        HeaderValue::from_static("meet.example.org:80"),
    );
    let uri: Uri = "/room-1?x=1".parse().unwrap();
    let res = redirect_to_https("", 443, &h, &uri);
    assert_eq!(res.status(), StatusCode::MOVED_PERMANENTLY);
    assert_eq!(
        res.headers()[header::LOCATION],
        "https://meet.example.org/room-1?x=1"
    );
    let res = redirect_to_https("", 8443, &h, &uri);
    assert_eq!(
        res.headers()[header::LOCATION],
        "https://meet.example.org:8443/room-1?x=1"
    );
    let res = redirect_to_https("", 443, &HeaderMap::new(), &uri);
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let res = redirect_to_https("meet.example.org", 443, &HeaderMap::new(), &uri);
    assert_eq!(
        res.headers()[header::LOCATION],
        "https://meet.example.org/room-1?x=1"
    );
}

#[test]
fn content_types() {
    assert_eq!(content_type("a.js"), "text/javascript; charset=utf-8");
    assert_eq!(content_type("a.css"), "text/css; charset=utf-8");
    assert_eq!(content_type("a.png"), "image/png");
}

#[tokio::test]
async fn redirect_listener_answers_pending_http01_challenges() {
    let challenges = crate::acme::challenge::Challenges::new();
    challenges.add_http01("tok-1", "tok-1.thumbprint");
    let app = redirect_router("meet.example.org".into(), 443, Some(challenges.clone()));
    let res = app
        .clone()
        .oneshot(get("/.well-known/acme-challenge/tok-1"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.headers()[header::CONTENT_TYPE],
        "application/octet-stream"
    );
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"tok-1.thumbprint");
    // Not pending (or once the order is over): 404, not a redirect.
    for path in [
        "/.well-known/acme-challenge/other",
        "/.well-known/acme-challenge/..%2Fetc",
    ] {
        let res = app.clone().oneshot(get(path)).await.unwrap();
        assert_eq!(res.status(), StatusCode::NOT_FOUND, "{path}");
    }
    challenges.clear();
    let res = app
        .clone()
        .oneshot(get("/.well-known/acme-challenge/tok-1"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    // Everything else is redirected as before; without ACME the path is too.
    let res = app.oneshot(get("/room")).await.unwrap();
    assert_eq!(res.status(), StatusCode::MOVED_PERMANENTLY);
    let plain = redirect_router("meet.example.org".into(), 443, None);
    let res = plain
        .oneshot(get("/.well-known/acme-challenge/tok-1"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::MOVED_PERMANENTLY);
}
