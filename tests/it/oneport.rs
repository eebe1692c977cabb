//! One port for HTTPS and TURN: TURN over TLS (with and without ALPN) and over plain
//! TCP on the HTTPS listener, next to HTTP/1.1, HTTP/2 and a WebSocket session, with
//! independent clients (coturn's `turnutils_uclient`, curl) and the project's own.

use std::net::SocketAddr;
use std::sync::Arc;

use meshmeet::relay::client::{self, Attr, Session};
use meshmeet::relay::wire::{self, Frame};
use meshmeet::Config;
use stun::message::{Message, METHOD_ALLOCATE, METHOD_BINDING};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::relay::{echo_peer, uclient, SECRET};
use crate::support::{self, ws, TestServer};

fn shared(c: &mut Config) {
    crate::relay::loopback_peers(c);
    c.turn.share_https_port = true;
}

/// One STUN request/answer over a stream (RFC 8656 section 12 framing).
pub async fn roundtrip<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, req: &[u8]) -> Message {
    s.write_all(req).await.unwrap();
    s.flush().await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 2048];
    loop {
        if let Frame::Complete(len) = wire::stream_frame(&buf) {
            let m = client::parse(&buf[..len]).expect("a STUN answer");
            assert!(client::answers(req, &m), "answers the request");
            return m;
        }
        let n = tokio::time::timeout(ws::WAIT, s.read(&mut chunk))
            .await
            .expect("an answer in time")
            .unwrap();
        assert!(n > 0, "connection closed before the answer");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Allocates over `s` with REST credentials; returns the relayed address.
async fn allocate<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, id: &str) -> SocketAddr {
    let mut session = Session::rest(SECRET, id, meshmeet::clock::unix_secs() + 3600);
    for _ in 0..3 {
        let req = session.request(METHOD_ALLOCATE, &[&Attr::UDP]);
        let answer = roundtrip(s, &req).await;
        if session.learn(&answer) {
            continue;
        }
        assert!(client::is_success(&answer), "{answer}");
        return client::relayed_address(&answer).expect("XOR-RELAYED-ADDRESS");
    }
    panic!("challenge loop");
}

async fn tls_to(server: &TestServer, alpn: &[&[u8]]) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut cfg = (*server.rustls_client_config()).clone();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let tcp = TcpStream::connect(server.https_addr()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .expect("TLS handshake")
}

#[tokio::test]
async fn turn_over_tls_and_tcp_on_the_https_port() {
    let server = TestServer::start_with(shared).await;
    // TLS without ALPN, as browsers connect to `turns:` URLs.
    let mut s = tls_to(&server, &[]).await;
    assert_eq!(s.get_ref().1.alpn_protocol(), None);
    allocate(&mut s, "no-alpn").await;
    // TLS with the RFC 7443 ids.
    for id in [&b"stun.turn"[..], b"stun.nat-discovery"] {
        let mut s = tls_to(&server, &[id]).await;
        assert_eq!(s.get_ref().1.alpn_protocol(), Some(id));
        let answer = roundtrip(&mut s, &client::binding_request()).await;
        assert!(client::is_success(&answer));
    }
    // Plain TCP: STUN straight on the HTTPS port.
    let mut tcp = TcpStream::connect(server.https_addr()).await.unwrap();
    allocate(&mut tcp, "plain-tcp").await;
    // ChannelData as the first frame is TURN too (dropped: no channel bound).
    let mut tcp = TcpStream::connect(server.https_addr()).await.unwrap();
    tcp.write_all(&client::channel_data(0x4000, b"x", true))
        .await
        .unwrap();
    let answer = roundtrip(&mut tcp, &client::binding_request()).await;
    assert!(client::is_success(&answer));

    let metrics = server.metrics().await;
    for kind in ["turn-tls", "turn-tcp"] {
        assert!(
            metrics.contains(&format!(
                "meshmeet_https_port_connections_total{{kind=\"{kind}\"}}"
            )),
            "{metrics}"
        );
    }
    let created = |t: &str| {
        metrics.contains(&format!(
            "meshmeet_turn_allocations_created_total{{transport=\"{t}\"}} "
        ))
    };
    assert!(created("tls") && created("tcp"), "{metrics}");
}

#[tokio::test]
async fn http_keeps_working_with_every_alpn_beside_turn() {
    let server = TestServer::start_with(shared).await;
    // A TURN allocation held open on the same port meanwhile.
    let mut turn = tls_to(&server, &[]).await;
    allocate(&mut turn, "beside").await;
    // HTTP/1.1 and HTTP/2 (ALPN) through the project's HTTPS client.
    for http2 in [false, true] {
        let b = support::https_client(&[&server.cert_pem()], server.https_addr());
        let b = if http2 {
            b.http2_prior_knowledge()
        } else {
            b.http1_only()
        };
        let res = b
            .build()
            .unwrap()
            .get(format!(
                "https://localhost:{}/healthz",
                server.https_addr().port()
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    // HTTP/1.1 with no ALPN at all: decided by the first decrypted bytes.
    let mut s = tls_to(&server, &[]).await;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.ok();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // HTTP/2 with no ALPN (prior knowledge): the preface is not STUN.
    let mut s = tls_to(&server, &[]).await;
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 9];
    tokio::time::timeout(ws::WAIT, s.read_exact(&mut head))
        .await
        .expect("a frame in time")
        .unwrap();
    assert_eq!(head[3], 0x04, "the server's SETTINGS frame");
    // A WebSocket signaling session on the same port at the same time.
    let mut a = ws::connect(&server).await;
    a.join("shared-port").await;
    // And the TURN connection still answers.
    let answer = roundtrip(&mut turn, &client::binding_request()).await;
    assert!(client::is_success(&answer));
}

#[tokio::test]
async fn curl_with_and_without_alpn() {
    if !support::have_tool("curl", "curl") {
        return;
    }
    let server = TestServer::start_with(shared).await;
    let port = server.https_addr().port();
    let cert = server.cert_path();
    for (flag, want) in [("--no-alpn", "1.1"), ("--http1.1", "1.1"), ("--http2", "2")] {
        // Asynchronously: the server runs on this test's runtime.
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "--max-time", "20", flag, "--cacert"])
            .arg(&cert)
            .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
            .args(["-w", "%{http_version} %{http_code}", "-o", "/dev/null"])
            .arg(format!("https://localhost:{port}/healthz"))
            .output()
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "curl {flag}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(text, format!("{want} 200"), "curl {flag}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coturn_uclient_over_tls_and_tcp_on_the_https_port() {
    if !support::have_tool("turnutils_uclient", "coturn") {
        return;
    }
    let server = TestServer::start_with(shared).await;
    let peer = echo_peer().await;
    let port = server.https_addr().port();
    tokio::task::spawn_blocking(move || {
        uclient(&["-s", "-t", "-S"], port, peer);
        uclient(&["-s", "-t"], port, peer);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn plain_http_gets_400_and_silence_is_closed_and_counted() {
    let server = TestServer::start_with(shared).await;
    let mut tcp = TcpStream::connect(server.https_addr()).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(ws::WAIT, tcp.read_to_string(&mut answer))
        .await
        .expect("answered and closed")
        .ok();
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains("https://"), "{answer}");

    // Three bytes that could start a STUN message, then nothing: closed after the
    // classification limit.
    let mut silent = TcpStream::connect(server.https_addr()).await.unwrap();
    silent.write_all(&[0, 1, 0]).await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(
        meshmeet::demux::CLASSIFY_TIMEOUT + ws::WAIT,
        silent.read_to_end(&mut rest),
    )
    .await;
    assert!(closed.is_ok(), "the server closes an undecided connection");
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("meshmeet_https_port_connections_total{kind=\"timed-out\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("meshmeet_https_port_connections_total{kind=\"rejected\"} 1"),
        "{metrics}"
    );
}

/// Connects to the server's HTTPS port from `from` (another loopback address than
/// the flood's, so the per-address cap that holds the flood does not hold it).
async fn connect_from(server: &TestServer, from: &str) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
    sock.connect(server.https_addr()).await.unwrap()
}

#[tokio::test]
async fn half_open_connections_do_not_stop_others() {
    let server = TestServer::start_with(shared).await;
    // More half-open connections from one address than its cap allows
    // (`http.max_connections_per_ip`); none of them sends a byte.
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(TcpStream::connect(server.https_addr()).await.unwrap());
    }
    // Meanwhile, from another address: a TLS ClientHello trickled one byte per write
    // is still classified and served as TURN over TLS ...
    let tcp = connect_from(&server, "127.0.0.2").await;
    let mut tls = tls_over(&server, tcp).await;
    allocate(&mut tls, "trickled").await;
    // ... a normal HTTPS client is served ...
    let client = support::https_client(&[&server.cert_pem()], server.https_addr())
        .local_address(std::net::IpAddr::from([127, 0, 0, 3]))
        .build()
        .unwrap();
    let res = client
        .get(format!("{}/healthz", server.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    // ... and so is a TURN client over plain TCP.
    let mut tcp = connect_from(&server, "127.0.0.4").await;
    allocate(&mut tcp, "beside-the-flood").await;
    // The flood's surplus was refused, not queued.
    let metrics = client
        .get(format!("{}/metrics", server.base_url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("meshmeet_https_connections_refused_total{reason=\"per_ip\"}"),
        "{metrics}"
    );
    drop(idle);
}

/// TLS whose client bytes reach the server one byte per TCP write.
async fn tls_over(server: &TestServer, tcp: TcpStream) -> tokio_rustls::client::TlsStream<Trickle> {
    let cfg = server.rustls_client_config();
    tcp.set_nodelay(true).unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(cfg)
        .connect(name, Trickle(tcp))
        .await
        .expect("TLS handshake")
}

/// Writes at most one byte per call.
struct Trickle(TcpStream);

impl AsyncRead for Trickle {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Trickle {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let n = buf.len().min(1);
        std::pin::Pin::new(&mut self.0).poll_write(cx, &buf[..n])
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn the_ice_config_points_turns_at_the_https_port() {
    // A free UDP port for the extra listener (the ICE config names bound ports only
    // for the main listeners).
    let extra = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let server = TestServer::start_with(|c| {
        shared(c);
        c.turn.extra_udp_listen = vec![extra];
    })
    .await;
    let extra = [extra];
    let mut a = ws::connect(&server).await;
    let joined = a.join("urls").await;
    // One entry, TURN only (no stun: URL; TURN over UDP gives the reflexive
    // address), with credentials.
    let servers = joined["ice"]["iceServers"].as_array().unwrap();
    assert_eq!(servers.len(), 1, "{servers:?}");
    assert!(servers[0]["username"].is_string() && servers[0]["credential"].is_string());
    let urls: Vec<String> = servers[0]["urls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap().to_string())
        .collect();
    let https = server.https_addr().port();
    let main = server.addrs.turn_udp.unwrap().port();
    // UDP on the main and the extra port; TCP and TLS on the shared HTTPS port (not
    // on the main port, nor on turn.tls_listen, which the test server also binds).
    assert!(server.addrs.turn_tls.is_some());
    assert_eq!(
        urls,
        vec![
            format!("turn:localhost:{main}?transport=udp"),
            format!("turn:localhost:{}?transport=udp", extra[0].port()),
            format!("turn:localhost:{https}?transport=tcp"),
            format!("turns:localhost:{https}?transport=tcp"),
        ]
    );
    // The plain TCP URL on the HTTPS port allocates, with the handed-out credentials.
    let user = servers[0]["username"].as_str().unwrap();
    let pass = servers[0]["credential"].as_str().unwrap();
    let mut tcp = TcpStream::connect(server.https_addr()).await.unwrap();
    let mut session = Session::new(user, pass);
    let mut relayed = None;
    for _ in 0..3 {
        let req = session.request(METHOD_ALLOCATE, &[&Attr::UDP]);
        let answer = roundtrip(&mut tcp, &req).await;
        if session.learn(&answer) {
            continue;
        }
        assert!(client::is_success(&answer), "{answer}");
        relayed = client::relayed_address(&answer);
        break;
    }
    assert!(
        relayed.is_some(),
        "an allocation over TCP on the HTTPS port"
    );
    // The extra UDP listener serves STUN.
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let req = client::binding_request();
    sock.send_to(&req, extra[0]).await.unwrap();
    let mut buf = [0u8; 1500];
    let (n, _) = tokio::time::timeout(ws::WAIT, sock.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let m = client::parse(&buf[..n]).unwrap();
    assert!(client::answers(&req, &m) && m.typ.method == METHOD_BINDING);
    // And relays: the `turn` crate's client allocates there and relays both ways.
    let turn = crate::relay::turn_crate_relays(extra[0]).await;
    turn.close().await.unwrap();
}
