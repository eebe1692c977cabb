//! Connection caps and time limits on the TCP listeners, against the real server:
//! each refusal is shown together with a normal client served meanwhile.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use meshmeet::relay::client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::support::TestServer;

/// A TCP connection from `local` (any 127.0.0.0/8 address) to `to`.
async fn connect_from(local: &str, to: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(local.parse::<IpAddr>().unwrap(), 0))
        .unwrap();
    sock.connect(to).await.unwrap()
}

/// Whether the server closes `s` (EOF or reset) within `within`, reading and
/// discarding whatever it sends first.
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// Waits until the server counts `n` open TURN stream connections.
async fn open_reaches(s: &TestServer, n: f64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while metric(s, "meshmeet_turn_stream_connections_open") != n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "open TURN stream connections never reached {n}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The value of a metric line of the server's registry (0 when absent).
fn metric(s: &TestServer, line_prefix: &str) -> f64 {
    s.state
        .metrics
        .encode()
        .unwrap()
        .lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// A STUN Binding over TCP from `local`: true when answered.
async fn stun_over_tcp(local: &str, to: SocketAddr) -> bool {
    let mut s = connect_from(local, to).await;
    let req = client::binding_request();
    if s.write_all(&req).await.is_err() {
        return false;
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        while got.len() < 20 || got.len() < 20 + u16::from_be_bytes([got[2], got[3]]) as usize {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        true
    })
    .await;
    read.unwrap_or(false) && client::parse(&got).is_some_and(|m| client::answers(&req, &m))
}

/// An HTTPS client bound to `local`, trusting the test server.
fn https_from(s: &TestServer, local: &str) -> reqwest::Client {
    crate::support::https_client(&[&s.cert_pem()], s.https_addr())
        .local_address(local.parse::<IpAddr>().unwrap())
        .build()
        .unwrap()
}

async fn healthz_from(s: &TestServer, local: &str) -> bool {
    https_from(s, local)
        .get(format!("{}/healthz", s.base_url()))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_connection_caps_per_address_and_in_total() {
    let s = TestServer::start_with(|c| {
        c.http.max_connections = 3;
        c.http.max_connections_per_ip = 2;
        // Idle handshakes end sooner, so freed places show up sooner.
        c.http.handshake_timeout_s = 2;
    })
    .await;
    let addr = s.https_addr();
    // Two idle connections from 127.0.0.2 (in their TLS handshake) fill its share.
    let _a1 = connect_from("127.0.0.2", addr).await;
    let _a2 = connect_from("127.0.0.2", addr).await;
    let mut a3 = connect_from("127.0.0.2", addr).await;
    assert!(closed_within(&mut a3, Duration::from_secs(5)).await);
    assert_eq!(
        metric(
            &s,
            "meshmeet_https_connections_refused_total{reason=\"per_ip\"}"
        ),
        1.0
    );
    // Another address is served meanwhile (and its pooled connection stays open).
    let client = https_from(&s, "127.0.0.3");
    let res = client
        .get(format!("{}/healthz", s.base_url()))
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success());
    // Three open: the total cap refuses a fourth address too.
    let mut b = connect_from("127.0.0.4", addr).await;
    assert!(closed_within(&mut b, Duration::from_secs(5)).await);
    assert_eq!(
        metric(
            &s,
            "meshmeet_https_connections_refused_total{reason=\"total\"}"
        ),
        1.0
    );
    assert_eq!(metric(&s, "meshmeet_https_connections_open"), 3.0);
    // Places come back when connections close.
    drop(client);
    drop(_a1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while metric(&s, "meshmeet_https_connections_open") > 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "places not freed: {} open",
            metric(&s, "meshmeet_https_connections_open")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        healthz_from(&s, "127.0.0.4").await,
        "a freed place is used again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_trickled_handshakes_and_headers_are_cut_off() {
    let s = TestServer::start_with(|c| c.http.handshake_timeout_s = 1).await;
    let addr = s.https_addr();
    // Silence after connecting: the TLS handshake deadline closes it.
    let mut idle = connect_from("127.0.0.2", addr).await;
    assert!(closed_within(&mut idle, Duration::from_secs(5)).await);
    // Request headers trickled a byte at a time: the deadline is for the whole
    // headers, not between bytes.
    let mut cfg = (*s.rustls_client_config()).clone();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = connect_from("127.0.0.2", addr).await;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let request = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut cut_off = false;
    for byte in request.iter().take(request.len() - 2) {
        if tls.write_all(&[*byte]).await.is_err() || tls.flush().await.is_err() {
            cut_off = true;
            break;
        }
        let mut b = [0u8; 256];
        // Each wait is also the pause between two bytes.
        match tokio::time::timeout(Duration::from_millis(100), tls.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                cut_off = true;
                break;
            }
            // An error status (408) before closing counts as cut off too.
            Ok(Ok(_)) => {
                cut_off = true;
                break;
            }
            Err(_) => {}
        }
    }
    assert!(cut_off, "the trickled request was never cut off");
    assert!(started.elapsed() < Duration::from_secs(6));
    // A normal client is served meanwhile.
    assert!(healthz_from(&s, "127.0.0.3").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turn_stream_connection_caps_per_address_and_in_total() {
    let s = TestServer::start_with(|c| {
        c.turn.max_stream_connections = 3;
        c.turn.max_stream_connections_per_ip = 2;
    })
    .await;
    let tcp = s.addrs.turn_tcp.unwrap();
    let tls = s.addrs.turn_tls.unwrap();
    // TCP and TLS share the caps. Each connection is counted before the next one
    // comes (the two listeners accept in their own tasks).
    let _a1 = connect_from("127.0.0.2", tcp).await;
    open_reaches(&s, 1.0).await;
    let _a2 = connect_from("127.0.0.2", tls).await;
    open_reaches(&s, 2.0).await;
    let mut a3 = connect_from("127.0.0.2", tcp).await;
    assert!(closed_within(&mut a3, Duration::from_secs(5)).await);
    assert_eq!(
        metric(
            &s,
            "meshmeet_turn_stream_connections_refused_total{reason=\"per_ip\"}"
        ),
        1.0
    );
    // Another address is served meanwhile; UDP is not capped.
    assert!(stun_over_tcp("127.0.0.3", tcp).await);
    // That connection is closed; its place comes back before the next one.
    open_reaches(&s, 2.0).await;
    let _b1 = connect_from("127.0.0.3", tcp).await;
    open_reaches(&s, 3.0).await;
    let mut c1 = connect_from("127.0.0.4", tcp).await;
    assert!(closed_within(&mut c1, Duration::from_secs(5)).await);
    assert_eq!(
        metric(
            &s,
            "meshmeet_turn_stream_connections_refused_total{reason=\"total\"}"
        ),
        1.0
    );
    let udp = tokio::net::UdpSocket::bind("127.0.0.4:0").await.unwrap();
    let req = client::binding_request();
    udp.send_to(&req, s.addrs.turn_udp.unwrap()).await.unwrap();
    let mut buf = [0u8; 512];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), udp.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(client::parse(&buf[..n]).is_some_and(|m| client::answers(&req, &m)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turn_stream_messages_must_complete_in_time() {
    let s = TestServer::start_with(|c| c.turn.stream_message_timeout_s = 1).await;
    let tcp = s.addrs.turn_tcp.unwrap();
    // Nothing sent: the first message is due from the start.
    let mut silent = connect_from("127.0.0.2", tcp).await;
    assert!(closed_within(&mut silent, Duration::from_secs(5)).await);
    // A first message trickled a byte at a time is cut off.
    let req = client::binding_request();
    let mut slow = connect_from("127.0.0.2", tcp).await;
    let started = tokio::time::Instant::now();
    let mut cut_off = false;
    for byte in &req[..req.len() - 1] {
        if slow.write_all(&[*byte]).await.is_err() {
            cut_off = true;
            break;
        }
        let mut b = [0u8; 64];
        // Each wait is also the pause between two bytes.
        if tokio::time::timeout(Duration::from_millis(100), slow.read(&mut b))
            .await
            .is_ok()
        {
            cut_off = true;
            break;
        }
    }
    assert!(cut_off, "the trickled message was never cut off");
    assert!(started.elapsed() < Duration::from_secs(5));
    // A later message is timed from its first byte too: one good message, then a
    // partial one that never completes.
    let mut later = connect_from("127.0.0.3", tcp).await;
    later.write_all(&req).await.unwrap();
    let mut b = [0u8; 512];
    let n = later.read(&mut b).await.unwrap();
    assert!(n >= 20);
    later.write_all(&req[..10]).await.unwrap();
    assert!(closed_within(&mut later, Duration::from_secs(5)).await);
    // Normal clients are served meanwhile.
    assert!(stun_over_tcp("127.0.0.4", tcp).await);
}

/// Waits until the server counts `n` open connections on the redirect listener.
async fn redirect_open_reaches(s: &TestServer, n: f64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while metric(s, "meshmeet_http_redirect_connections_open") != n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "open redirect connections never reached {n} (now {})",
            metric(s, "meshmeet_http_redirect_connections_open")
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A plain-HTTP request from `local` to the redirect listener: its status.
async fn redirect_from(local: &str, to: SocketAddr) -> Option<u16> {
    let c = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .local_address(local.parse::<IpAddr>().unwrap())
        .build()
        .unwrap();
    let res = c.get(format!("http://{to}/room")).send().await.ok()?;
    Some(res.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_connection_caps_per_address_and_in_total() {
    let s = TestServer::start_with(|c| {
        c.http.redirect_listen = Some("127.0.0.1:0".parse().unwrap());
        c.http.max_connections = 3;
        c.http.max_connections_per_ip = 2;
        // Long enough that the idle connections below outlive the checks.
        c.http.handshake_timeout_s = 30;
    })
    .await;
    let addr = s.addrs.redirect.unwrap();
    // Two idle connections from 127.0.0.2 fill its share.
    let a1 = connect_from("127.0.0.2", addr).await;
    redirect_open_reaches(&s, 1.0).await;
    let _a2 = connect_from("127.0.0.2", addr).await;
    redirect_open_reaches(&s, 2.0).await;
    let mut a3 = connect_from("127.0.0.2", addr).await;
    assert!(closed_within(&mut a3, Duration::from_secs(5)).await);
    assert_eq!(
        metric(
            &s,
            "meshmeet_http_redirect_connections_refused_total{reason=\"per_ip\"}"
        ),
        1.0
    );
    // Another address is served meanwhile, and its connection closes after the
    // answer (one request per connection), so its place comes back.
    assert_eq!(redirect_from("127.0.0.3", addr).await, Some(301));
    redirect_open_reaches(&s, 2.0).await;
    // A third connection fills the total; a fourth address is refused.
    let _b = connect_from("127.0.0.4", addr).await;
    redirect_open_reaches(&s, 3.0).await;
    let mut c = connect_from("127.0.0.5", addr).await;
    assert!(closed_within(&mut c, Duration::from_secs(5)).await);
    assert_eq!(
        metric(
            &s,
            "meshmeet_http_redirect_connections_refused_total{reason=\"total\"}"
        ),
        1.0
    );
    // HTTPS has caps of its own: it is served while the redirect listener is full.
    assert!(healthz_from(&s, "127.0.0.5").await);
    // A place freed is used again.
    drop(a1);
    redirect_open_reaches(&s, 2.0).await;
    assert_eq!(redirect_from("127.0.0.5", addr).await, Some(301));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_idle_and_trickled_requests_are_cut_off() {
    let s = TestServer::start_with(|c| {
        c.http.redirect_listen = Some("127.0.0.1:0".parse().unwrap());
        c.http.handshake_timeout_s = 1;
    })
    .await;
    let addr = s.addrs.redirect.unwrap();
    // Silence after connecting: closed by the header deadline.
    let mut idle = connect_from("127.0.0.2", addr).await;
    redirect_open_reaches(&s, 1.0).await;
    assert!(closed_within(&mut idle, Duration::from_secs(5)).await);
    redirect_open_reaches(&s, 0.0).await;
    // Headers trickled a byte at a time: the deadline is for the whole headers.
    let request = b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut slow = connect_from("127.0.0.2", addr).await;
    let started = tokio::time::Instant::now();
    let mut cut_off = false;
    for byte in request.iter().take(request.len() - 2) {
        if slow.write_all(&[*byte]).await.is_err() {
            cut_off = true;
            break;
        }
        let mut b = [0u8; 256];
        // Each wait is also the pause between two bytes; an answer (408) or a close
        // both end it.
        if tokio::time::timeout(Duration::from_millis(100), slow.read(&mut b))
            .await
            .is_ok()
        {
            cut_off = true;
            break;
        }
    }
    assert!(cut_off, "the trickled request was never cut off");
    assert!(started.elapsed() < Duration::from_secs(6));
    // A whole request is answered, and the connection is then closed, not kept
    // open idle.
    let mut one = connect_from("127.0.0.3", addr).await;
    one.write_all(b"GET /x HTTP/1.1\r\nHost: meet.example.org\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), one.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the connection stayed open after the answer");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 301"), "{text}");
    assert!(text.contains("https://meet.example.org:"), "{text}");
}
