//! HTTPS behaviour against the real server in-process, with a real HTTPS client.

use meshmeet::Server;
use reqwest::StatusCode;

use crate::support::{https_client, test_config, TestServer};

fn assert_security_headers(res: &reqwest::Response) {
    let h = res.headers();
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["referrer-policy"], "no-referrer");
    let pp = h["permissions-policy"].to_str().unwrap();
    assert!(pp.contains("camera=(self)") && pp.contains("microphone=(self)"));
    assert!(pp.contains("display-capture=(self)"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_and_room_pages_have_security_headers() {
    let s = TestServer::start().await;
    let c = s.http_client();
    for path in ["/", "/team-standup", "/%ED%9A%8C%EC%9D%98"] {
        let res = c
            .get(format!("{}{path}", s.base_url()))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{path}");
        assert_eq!(res.headers()["content-type"], "text/html; charset=utf-8");
        assert_security_headers(&res);
        // Self-signed certificate: no HSTS (it would lock browsers out after a change).
        assert!(res.headers().get("strict-transport-security").is_none());
        let body = res.text().await.unwrap();
        assert!(body.contains("<!doctype html>"), "{path}");
    }
    // Reserved and invalid room names are not rooms.
    for path in ["/api", "/-bad", "/a%20b", "/x/y", "/assets"] {
        let res = c
            .get(format!("{}{path}", s.base_url()))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::NOT_FOUND, "{path}");
        assert_security_headers(&res);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assets_types_etags_and_compression() {
    let s = TestServer::start().await;
    let c = s.http_client();
    let url = format!("{}/assets/style.css", s.base_url());
    let res = c.get(&url).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["content-type"], "text/css; charset=utf-8");
    let etag = res.headers()["etag"].to_str().unwrap().to_string();
    assert!(etag.starts_with('"') && etag.len() > 10);
    let res = c
        .get(&url)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NOT_MODIFIED);

    let res = c
        .get(format!("{}/assets/favicon.svg", s.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["content-type"], "image/svg+xml");

    for missing in [
        "/assets/nope.js",
        "/assets/a//b",
        "/assets/%2F..%2FCargo.toml",
    ] {
        let res = c
            .get(format!("{}{missing}", s.base_url()))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::NOT_FOUND, "{missing}");
    }

    // Compression when asked for (the client does not decode; we look at the header).
    let res = c
        .get(format!("{}/", s.base_url()))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["content-encoding"], "gzip");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_metrics() {
    let s = TestServer::start().await;
    let c = s.http_client();
    let v: serde_json::Value = c
        .get(format!("{}/healthz", s.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["status"], "ok");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert!(v["uptime_s"].is_u64());

    let res = c
        .get(format!("{}/metrics", s.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let text = res.text().await.unwrap();
    assert!(text.contains("process_resident_memory_bytes"), "{text}");
    assert!(
        text.contains("meshmeet_http_requests_total{route=\"healthz\",status=\"200\"} 1"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_refused_outside_allowed_networks() {
    let s = TestServer::start_with(|c| c.http.metrics_allow = vec!["10.0.0.0/8".parse().unwrap()])
        .await;
    let res = s
        .http_client()
        .get(format!("{}/metrics", s.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_listener_sends_301_to_https() {
    let s =
        TestServer::start_with(|c| c.http.redirect_listen = Some("127.0.0.1:0".parse().unwrap()))
            .await;
    let addr = s.addrs.redirect.expect("redirect bound");
    let c = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let res = c
        .get(format!("http://{addr}/my-room?x=1"))
        .header("host", "meet.example.org")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::MOVED_PERMANENTLY);
    assert_eq!(
        res.headers()["location"],
        format!(
            "https://meet.example.org:{}/my-room?x=1",
            s.https_addr().port()
        )
        .as_str()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.http.listen = addr;
    let err = Server::bind(cfg).await.err().expect("bind fails");
    let msg = format!("{err:#}");
    assert!(msg.contains(&addr.to_string()), "{msg}");
    assert!(msg.contains("http.listen"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_signed_certificate_is_reused_across_starts() {
    let dir = tempfile::tempdir().unwrap();
    let mut fps = Vec::new();
    for _ in 0..2 {
        let server = Server::bind(test_config(dir.path())).await.unwrap();
        fps.push(server.state().tls.fingerprint());
        let state = server.state();
        let run = tokio::spawn(server.run(async {}));
        run.await.unwrap().unwrap();
        assert!(state.shutdown.is_cancelled());
    }
    assert_eq!(fps[0], fps[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_certificate_is_served_with_hsts() {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = dir.path().join("chain.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let s = TestServer::start_with(|c| {
        c.tls.cert = cert.display().to_string();
        c.tls.key = key.display().to_string();
    })
    .await;
    assert_eq!(s.cert_path(), cert);
    let res = s
        .http_client()
        .get(format!("{}/", s.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.headers()["strict-transport-security"],
        "max-age=31536000"
    );
    // No self-signed pair was generated.
    assert!(!s.data_dir.path().join("selfsigned-cert.pem").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configured_pem_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("broken-chain.pem");
    std::fs::write(
        &cert,
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let mut cfg = test_config(dir.path());
    cfg.tls.cert = cert.display().to_string();
    cfg.tls.key = cert.display().to_string();
    let err = Server::bind(cfg).await.err().expect("bind fails");
    let msg = format!("{err:#}");
    assert!(msg.contains("broken-chain.pem"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_headers_are_refused_and_server_keeps_serving() {
    let s = TestServer::start().await;
    for http1 in [true, false] {
        let mut b = https_client(&[&s.cert_pem()], s.https_addr());
        if http1 {
            b = b.http1_only();
        }
        let c = b.build().unwrap();
        let res = c
            .get(format!("{}/", s.base_url()))
            .header("x-filler", "a".repeat(1_000_000))
            .send()
            .await;
        match res {
            Ok(r) => assert_eq!(
                r.status(),
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "http1={http1}"
            ),
            // HTTP/2 may reset the stream instead of answering.
            Err(e) => assert!(!http1, "http1 should answer 431, got {e}"),
        }
    }
    let res = s
        .http_client()
        .get(format!("{}/healthz", s.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

/// A raw TLS connection to the HTTPS listener, offering `alpn`.
async fn tls_connect(
    s: &TestServer,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut cfg = (*s.rustls_client_config()).clone();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    let tcp = tokio::net::TcpStream::connect(s.https_addr())
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap()
}

/// The status line of an HTTP/1.1 answer to `request` sent over a fresh connection.
async fn http1_status_line(s: &TestServer, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = tls_connect(s, b"http/1.1").await;
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(2).any(|w| w == b"\r\n") {
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), tls.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap_or(0);
        assert!(n > 0, "connection closed without an answer: {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got).to_string();
    text.lines().next().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_in_authority_form_gets_an_answer_over_http1() {
    let s = TestServer::start().await;
    for req in [
        "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
        "CONNECT [::1]:443 HTTP/1.1\r\nHost: [::1]:443\r\n\r\n",
        "OPTIONS * HTTP/1.1\r\nHost: localhost\r\n\r\n",
    ] {
        let line = http1_status_line(&s, req).await;
        assert!(
            line.starts_with("HTTP/1.1 4"),
            "{req:?} must get a client error, got {line:?}"
        );
    }
    // Still serving, and the requests were counted.
    let res = s
        .http_client()
        .get(format!("{}/healthz", s.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let metrics = s.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("meshmeet_http_requests_total{") && l.contains("status=\"4")),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_gets_an_answer_over_http2() {
    let s = TestServer::start().await;
    let tls = tls_connect(&s, b"h2").await;
    let (client, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut client = client.ready().await.unwrap();
    // Plain CONNECT: authority only, no path (RFC 9113 section 8.5).
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri("example.com:443")
        .body(())
        .unwrap();
    let (res, _send) = client.send_request(req, false).unwrap();
    let res = tokio::time::timeout(std::time::Duration::from_secs(10), res)
        .await
        .expect("an answer")
        .expect("an HTTP/2 response, not a reset stream");
    assert!(
        res.status().is_client_error(),
        "CONNECT must get a client error, got {}",
        res.status()
    );
    // The same connection still serves ordinary requests.
    let mut client = client.ready().await.unwrap();
    let req = http::Request::builder()
        .uri(format!(
            "https://localhost:{}/healthz",
            s.https_addr().port()
        ))
        .body(())
        .unwrap();
    let (res, _send) = client.send_request(req, true).unwrap();
    let res = res.await.unwrap();
    assert_eq!(res.status(), http::StatusCode::OK);
}
