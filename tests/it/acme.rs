//! ACME against a real CA on this machine: Debian's `pebble` (Let's Encrypt's test CA)
//! with `pebble-challtestsrv` answering its DNS (every name resolves to 127.0.0.1),
//! both started here on loopback. Pebble validates challenges by connecting to the
//! ports its config names, so each test gives Pebble the HTTPS (TLS-ALPN-01) and
//! redirect (HTTP-01) ports of the server it starts.
//!
//! Tests skip with a printed reason where Pebble is not installed, and fail instead
//! under `MESHMEET_REQUIRE_TOOLS=1`. They wait on states (the served certificate, the
//! metrics, log lines), never on fixed sleeps.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshmeet::config::AcmeChallenge;
use meshmeet::relay::client::{self, Attr, Session};
use meshmeet::relay::wire::{self, Frame};
use meshmeet::tls::CertKind;
use meshmeet::Config;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;
use stun::message::{Message, METHOD_ALLOCATE, METHOD_CREATE_PERMISSION};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::oneport::roundtrip;
use crate::relay::{echo_peer, loopback_peers, SECRET};
use crate::support::{self, ws, TestServer};

/// The name certificates are ordered for (challtestsrv resolves it to 127.0.0.1).
const NAME: &str = "meet.test";
/// The longest any awaited state may take (Pebble generates RSA keys at start).
const WAIT: Duration = Duration::from_secs(90);
const BIN: &str = env!("CARGO_BIN_EXE_meshmeet");

/// Whether Pebble and its DNS are installed (see the module doc).
fn have_pebble() -> bool {
    support::have_tool("pebble", "pebble") && support::have_tool("pebble-challtestsrv", "pebble")
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A TCP port free on 127.0.0.1 now (handed to a server started right after, and
/// bound again by it after a restart).
fn free_port() -> u16 {
    support::fixed_port(|port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok())
}

/// A port free for both UDP and TCP (a DNS server listens on both).
fn free_dns_port() -> u16 {
    support::fixed_port(|port| {
        std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
    })
}

/// The lines a child process writes (stdout and stderr), gathered as they come.
#[derive(Default)]
struct Output {
    lines: Mutex<Vec<String>>,
    more: Notify,
}

impl Output {
    fn capture(child: &mut Child) -> Arc<Output> {
        let out = Arc::new(Output::default());
        let readers: Vec<Box<dyn std::io::Read + Send>> = vec![
            Box::new(child.stdout.take().expect("stdout piped")),
            Box::new(child.stderr.take().expect("stderr piped")),
        ];
        for r in readers {
            let out = out.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(r).lines().map_while(Result::ok) {
                    out.lines.lock().unwrap().push(line);
                    out.more.notify_waiters();
                }
            });
        }
        out
    }

    fn count(&self, pred: impl Fn(&str) -> bool) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| pred(l))
            .count()
    }

    fn text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits until `n` lines satisfy `pred`; returns the `n`-th.
    async fn wait_for(&self, n: usize, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let more = self.more.notified();
            tokio::pin!(more);
            more.as_mut().enable();
            {
                let lines = self.lines.lock().unwrap();
                if let Some(l) = lines.iter().filter(|l| pred(l)).nth(n - 1) {
                    return l.clone();
                }
            }
            if tokio::time::timeout_at(deadline, more).await.is_err() {
                panic!("no {what} within {WAIT:?}; output:\n{}", self.text());
            }
        }
    }
}

/// Kills a child process when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running Pebble and its DNS, stopped on drop.
struct Pebble {
    _procs: Vec<Killed>,
    out: Arc<Output>,
    _dir: tempfile::TempDir,
    /// The ACME directory URL.
    directory: String,
    /// Pebble's own HTTPS certificate (PEM file): `tls.acme_directory_ca`.
    ca_file: PathBuf,
    /// The root Pebble issues under (PEM), from its management interface.
    root: Vec<u8>,
}

impl Pebble {
    /// Starts Pebble to validate HTTP-01 on `http_port` and TLS-ALPN-01 on
    /// `tls_port`, issuing certificates valid for `validity_s`, with `blocked` names
    /// refused outright.
    async fn start(http_port: u16, tls_port: u16, validity_s: u64, blocked: &[&str]) -> Pebble {
        let dir = tempfile::tempdir().unwrap();
        // Pebble's HTTPS certificate: ours, so the server can be told to trust it.
        let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
            .unwrap();
        let ca_file = dir.path().join("pebble-https.pem");
        let key_file = dir.path().join("pebble-https-key.pem");
        std::fs::write(&ca_file, ck.cert.pem()).unwrap();
        std::fs::write(&key_file, ck.signing_key.serialize_pem()).unwrap();
        let (acme, mgmt, dns, dns_mgmt) = (free_port(), free_port(), free_dns_port(), free_port());
        let config = json!({"pebble": {
            "listenAddress": loopback(acme).to_string(),
            "managementListenAddress": loopback(mgmt).to_string(),
            "certificate": ca_file,
            "privateKey": key_file,
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
            "domainBlocklist": blocked,
            "certificateValidityPeriod": validity_s,
        }});
        let config_file = dir.path().join("pebble.json");
        std::fs::write(&config_file, config.to_string()).unwrap();

        let mut dns_proc = Command::new("pebble-challtestsrv")
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .args(["-dns01", &loopback(dns).to_string()])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-management", &loopback(dns_mgmt).to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("pebble-challtestsrv starts");
        let dns_out = Output::capture(&mut dns_proc);
        let dns_proc = Killed(dns_proc);
        let mut pebble = Command::new("pebble")
            .arg("-config")
            .arg(&config_file)
            .args(["-dnsserver", &loopback(dns).to_string(), "-strict=false"])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("pebble starts");
        let out = Output::capture(&mut pebble);
        let pebble = Killed(pebble);
        dns_out
            .wait_for(1, "DNS server start", |l| {
                l.contains("Starting challenge servers")
            })
            .await;
        out.wait_for(1, "Pebble's directory", |l| {
            l.contains("ACME directory available")
        })
        .await;
        let client = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(ck.cert.pem().as_bytes()).unwrap())
            .build()
            .unwrap();
        // Pebble logs its listeners just before it binds them: ask until it answers.
        let deadline = Instant::now() + WAIT;
        let root = loop {
            match client
                .get(format!("https://127.0.0.1:{mgmt}/roots/0"))
                .send()
                .await
            {
                Ok(res) => break res.bytes().await.unwrap().to_vec(),
                Err(e) => assert!(
                    Instant::now() < deadline,
                    "Pebble's management interface does not answer: {e}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(root.starts_with(b"-----BEGIN CERTIFICATE-----"));
        Pebble {
            _procs: vec![pebble, dns_proc],
            out,
            _dir: dir,
            directory: format!("https://127.0.0.1:{acme}/dir"),
            ca_file,
            root,
        }
    }

    /// Orders Pebble has accepted so far (it logs each).
    fn orders(&self) -> usize {
        self.out.count(|l| l.contains("Added order"))
    }
}

/// The ports a server under test listens on, which Pebble validates.
#[derive(Clone, Copy)]
struct Ports {
    https: u16,
    http: u16,
}

impl Ports {
    fn pick() -> Ports {
        Ports {
            https: free_port(),
            http: free_port(),
        }
    }
}

/// A test config asking Pebble for a certificate for [`NAME`].
fn acme(c: &mut Config, pebble: &Pebble, ports: Ports, challenge: AcmeChallenge) {
    c.http.listen = loopback(ports.https);
    c.http.redirect_listen = Some(loopback(ports.http));
    c.tls.acme_domains = vec![NAME.into()];
    c.tls.acme_email = "admin@meet.test".into();
    c.tls.acme_directory = pebble.directory.clone();
    c.tls.acme_directory_ca = pebble.ca_file.display().to_string();
    c.tls.acme_challenge = challenge;
    c.tls.acme_retry_s = 1;
    // The placeholder certificate names it too, so `/metrics` can be read as NAME
    // before and after the ACME certificate arrives.
    c.tls.self_signed_names = vec![NAME.into()];
}

/// A rustls client config that trusts only Pebble's root.
fn trusting_pebble(pebble: &Pebble) -> Arc<rustls::ClientConfig> {
    support::rustls_client_config(&pebble.root)
}

/// A TLS connection to the server as [`NAME`], trusting only Pebble's root.
async fn tls_to(
    pebble: &Pebble,
    addr: SocketAddr,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut cfg = (*trusting_pebble(pebble)).clone();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from(NAME).unwrap(), tcp)
        .await
}

/// Waits until the server hands a client that trusts only Pebble's root a chain for
/// [`NAME`] (and, with `not`, one whose leaf is not that one); returns the chain.
async fn trusted_chain(
    pebble: &Pebble,
    addr: SocketAddr,
    not: Option<&CertificateDer<'static>>,
) -> Vec<CertificateDer<'static>> {
    let deadline = Instant::now() + WAIT;
    loop {
        let last = match tls_to(pebble, addr, &[b"http/1.1"]).await {
            Ok(s) => {
                let chain = s.get_ref().1.peer_certificates().unwrap().to_vec();
                if Some(&chain[0]) != not {
                    return chain;
                }
                "the same certificate as before".to_string()
            }
            Err(e) => e.to_string(),
        };
        assert!(
            Instant::now() < deadline,
            "no trusted certificate for {NAME} within {WAIT:?}; last: {last}"
        );
        // Polling the served certificate: an order takes Pebble a fraction of a second.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A metric's value in the server's `/metrics` (the first line starting with `key`).
async fn metric(server: &TestServer, pebble: &Pebble, key: &str) -> Option<f64> {
    let text = metrics_text(server, pebble).await;
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// `/metrics` over HTTPS from loopback, trusting Pebble's root or, before the first
/// certificate, the self-signed one.
async fn metrics_text(server: &TestServer, pebble: &Pebble) -> String {
    let self_signed = std::fs::read(server.data_dir.path().join("selfsigned-cert.pem")).unwrap();
    let client = support::https_client(&[&pebble.root, &self_signed], server.https_addr())
        .resolve(NAME, server.https_addr())
        .build()
        .unwrap();
    client
        .get(format!(
            "https://{NAME}:{}/metrics",
            server.https_addr().port()
        ))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .unwrap()
}

/// Waits until `key`'s value satisfies `pred`.
async fn wait_metric(
    server: &TestServer,
    pebble: &Pebble,
    key: &str,
    pred: impl Fn(f64) -> bool,
) -> f64 {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = metric(server, pebble, key).await.filter(|v| pred(*v)) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{key} not as awaited within {WAIT:?}:\n{}",
            metrics_text(server, pebble).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn names_of(leaf: &CertificateDer<'_>) -> Vec<String> {
    meshmeet::acme::schedule::CertInfo::from_der(leaf.as_ref())
        .unwrap()
        .names
}

fn now() -> f64 {
    meshmeet::clock::unix_secs() as f64
}

/// A client that trusts only Pebble's root sends `GET /healthz` as [`NAME`].
async fn healthz_trusted(pebble: &Pebble, addr: SocketAddr) -> reqwest::Response {
    support::https_client(&[&pebble.root], addr)
        .resolve(NAME, addr)
        .build()
        .unwrap()
        .get(format!("https://{NAME}:{}/healthz", addr.port()))
        .send()
        .await
        .expect("trusted HTTPS")
}

#[tokio::test]
async fn tls_alpn_01_from_nothing_to_a_trusted_chain_then_a_restart_reuses_it() {
    if !have_pebble() {
        return;
    }
    let ports = Ports::pick();
    let pebble = Pebble::start(ports.http, ports.https, 90 * 86400, &[]).await;
    let server =
        TestServer::start_with(|c| acme(c, &pebble, ports, AcmeChallenge::TlsAlpn01)).await;
    // Nothing stored: the self-signed certificate was made and is served meanwhile.
    assert!(server.data_dir.path().join("selfsigned-cert.pem").is_file());
    let addr = server.https_addr();
    let chain = trusted_chain(&pebble, addr, None).await;
    assert!(chain.len() >= 2, "leaf and intermediate: {}", chain.len());
    assert_eq!(names_of(&chain[0]), [NAME]);
    assert_eq!(server.state.tls.kind(), CertKind::Acme);
    let res = healthz_trusted(&pebble, addr).await;
    assert_eq!(res.status(), 200);
    assert!(res.headers().contains_key("strict-transport-security"));
    // The validation itself was a TLS-ALPN-01 handshake on the HTTPS port, closed
    // after it; no HTTP-01 request was needed.
    let m = metrics_text(&server, &pebble).await;
    assert!(
        m.contains("meshmeet_https_port_connections_total{kind=\"acme-tls\"}"),
        "{m}"
    );
    // With no challenge pending, a client offering only `acme-tls/1` gets no
    // certificate at all; one offering it beside another id gets the served one, and
    // with `acme-tls/1` negotiated the connection is closed: neither HTTP nor TURN.
    assert!(tls_to(&pebble, addr, &[b"acme-tls/1"]).await.is_err());
    let mut s = tls_to(&pebble, addr, &[b"x-other", b"acme-tls/1"])
        .await
        .expect("the served certificate");
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"acme-tls/1"[..]));
    let _ = s
        .write_all(b"GET / HTTP/1.1\r\nHost: meet.test\r\n\r\n")
        .await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(ws::WAIT, s.read_to_end(&mut rest))
        .await
        .expect("closed by the server");
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    assert!(
        m.contains("meshmeet_acme_renewals_total{result=\"success\"} 1"),
        "{m}"
    );
    let not_after = metric(
        &server,
        &pebble,
        "meshmeet_tls_certificate_not_after_seconds",
    )
    .await
    .unwrap();
    assert!(not_after > now() + 80.0 * 86400.0, "{not_after}");
    // A renewal is planned two thirds into the lifetime (90 days), not before.
    let next = wait_metric(
        &server,
        &pebble,
        "meshmeet_acme_next_renewal_timestamp_seconds",
        |v| v > 0.0,
    )
    .await;
    assert!(next > now() + 55.0 * 86400.0, "{next}");
    // State on disk: private, complete.
    use std::os::unix::fs::PermissionsExt;
    let acme_dir = server.data_dir.path().join("acme");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&acme_dir), 0o700);
    for f in ["account.json", "cert.pem", "key.pem"] {
        assert_eq!(mode(&acme_dir.join(f)), 0o600, "{f}");
    }
    let orders = pebble.orders();
    assert_eq!(orders, 1, "{}", pebble.out.text());
    let fingerprint = server.state.tls.fingerprint();

    // Restart on the same state: the stored certificate is served from the first
    // connection on, and no order is placed.
    let dir = server.stop().await;
    let server =
        TestServer::start_in(dir, |c| acme(c, &pebble, ports, AcmeChallenge::TlsAlpn01)).await;
    assert_eq!(server.state.tls.kind(), CertKind::Acme);
    assert_eq!(server.state.tls.fingerprint(), fingerprint);
    let again = trusted_chain(&pebble, addr, None).await;
    assert_eq!(again[0], chain[0]);
    // The renewal task has planned (it read the stored certificate and the account).
    let next = wait_metric(
        &server,
        &pebble,
        "meshmeet_acme_next_renewal_timestamp_seconds",
        |v| v > 0.0,
    )
    .await;
    assert!(next > now() + 55.0 * 86400.0, "{next}");
    assert_eq!(pebble.orders(), orders, "a restart ordered again");
    let m = metrics_text(&server, &pebble).await;
    assert!(!m.contains("meshmeet_acme_renewals_total{"), "{m}");
}

#[tokio::test]
async fn http_01_on_the_redirect_listener() {
    if !have_pebble() {
        return;
    }
    let ports = Ports::pick();
    let pebble = Pebble::start(ports.http, ports.https, 90 * 86400, &[]).await;
    let server = TestServer::start_with(|c| acme(c, &pebble, ports, AcmeChallenge::Http01)).await;
    let chain = trusted_chain(&pebble, server.https_addr(), None).await;
    assert_eq!(names_of(&chain[0]), [NAME]);
    let m = metrics_text(&server, &pebble).await;
    assert!(
        m.contains("meshmeet_acme_renewals_total{result=\"success\"} 1"),
        "{m}"
    );
    // Validated over HTTP-01: no TLS-ALPN-01 handshake reached the HTTPS port.
    assert!(!m.contains("kind=\"acme-tls\""), "{m}");
    // Anything else on the redirect listener is still redirected, and a token that
    // is not pending is not found.
    let plain = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let base = format!("http://127.0.0.1:{}", ports.http);
    let res = plain.get(format!("{base}/room")).send().await.unwrap();
    assert_eq!(res.status(), 301);
    let res = plain
        .get(format!("{base}/.well-known/acme-challenge/not-pending"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
}

#[tokio::test]
async fn ip_address_identifiers() {
    if !have_pebble() {
        return;
    }
    // RFC 8738: Pebble validates 127.0.0.1 over TLS-ALPN-01 with the reverse-DNS name
    // 1.0.0.127.in-addr.arpa in SNI.
    let ports = Ports::pick();
    let pebble = Pebble::start(ports.http, ports.https, 90 * 86400, &[]).await;
    let server = TestServer::start_with(|c| {
        acme(c, &pebble, ports, AcmeChallenge::TlsAlpn01);
        c.tls.acme_domains = vec![NAME.into(), "127.0.0.1".into()];
    })
    .await;
    let chain = trusted_chain(&pebble, server.https_addr(), None).await;
    assert_eq!(names_of(&chain[0]), [NAME, "127.0.0.1"]);
    // A client that names the address itself trusts it too.
    let tcp = TcpStream::connect(server.https_addr()).await.unwrap();
    let ip = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    tokio_rustls::TlsConnector::from(trusting_pebble(&pebble))
        .connect(ip, tcp)
        .await
        .expect("a certificate for 127.0.0.1");
}

/// Allocates over `s`; returns the session (nonce learnt) for later requests.
async fn allocate<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Session {
    let mut session = Session::rest(SECRET, "renewal", meshmeet::clock::unix_secs() + 3600);
    for _ in 0..3 {
        let req = session.request(METHOD_ALLOCATE, &[&Attr::UDP]);
        let answer = roundtrip(s, &req).await;
        if session.learn(&answer) {
            continue;
        }
        assert!(client::is_success(&answer), "{answer}");
        return session;
    }
    panic!("challenge loop");
}

/// The next STUN message on a TURN stream.
async fn next_message<S: AsyncRead + Unpin>(s: &mut S) -> Message {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        if let Frame::Complete(len) = wire::stream_frame(&buf) {
            assert_eq!(len, buf.len());
            return client::parse(&buf).expect("a STUN message");
        }
        // Byte by byte: nothing past this message is taken from the stream.
        let n = tokio::time::timeout(ws::WAIT, s.read(&mut byte))
            .await
            .expect("a message in time")
            .unwrap();
        assert!(n > 0, "connection closed");
        buf.push(byte[0]);
    }
}

#[tokio::test]
async fn renewal_swaps_the_certificate_under_open_calls() {
    if !have_pebble() {
        return;
    }
    let ports = Ports::pick();
    let pebble = Pebble::start(ports.http, ports.https, 3600, &[]).await;
    let renewing = |c: &mut Config| {
        acme(c, &pebble, ports, AcmeChallenge::TlsAlpn01);
        loopback_peers(c);
        // Due as soon as issued: every certificate is renewed a second after it
        // arrives (the pause after a success is tls.acme_retry_s).
        c.tls.acme_renew_before_s = 3600;
    };
    let server = TestServer::start_with(renewing).await;
    let addr = server.https_addr();
    let first = trusted_chain(&pebble, addr, None).await;

    // A signaling session and a TURN-over-TLS allocation, both on the first
    // certificate.
    let connector = tokio_tungstenite::Connector::Rustls(trusting_pebble(&pebble));
    let url = format!("wss://{NAME}:{}/ws", addr.port());
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        url.as_str(),
    )
    .unwrap();
    req.headers_mut().insert(
        "origin",
        format!("https://{NAME}:{}", addr.port()).parse().unwrap(),
    );
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (socket, _) =
        tokio_tungstenite::client_async_tls_with_config(req, tcp, None, Some(connector))
            .await
            .expect("WebSocket over the ACME certificate");
    let mut signaling = ws::Client { ws: socket };
    signaling.join("renewal").await;
    let mut turn = tls_to(&pebble, addr, &[]).await.expect("TURN over TLS");
    let session = allocate(&mut turn).await;

    // Renewed: a new connection gets another certificate, still trusted.
    let second = trusted_chain(&pebble, addr, Some(&first[0])).await;
    assert_eq!(names_of(&second[0]), [NAME]);
    wait_metric(
        &server,
        &pebble,
        "meshmeet_acme_renewals_total{result=\"success\"}",
        |v| v >= 2.0,
    )
    .await;

    // The session and the allocation opened before keep working.
    signaling.send(json!({"type": "ping"})).await;
    assert_eq!(signaling.recv_type("pong").await["type"], "pong");
    let peer = echo_peer().await;
    let answer = roundtrip(
        &mut turn,
        &session.request(METHOD_CREATE_PERMISSION, &[&Attr::Peer(peer)]),
    )
    .await;
    assert!(client::is_success(&answer), "{answer}");
    turn.write_all(&client::send_indication(peer, b"still here"))
        .await
        .unwrap();
    turn.flush().await.unwrap();
    let data = next_message(&mut turn).await;
    assert_eq!(client::data(&data).as_deref(), Some(&b"still here"[..]));
    assert_eq!(client::peer_address(&data), Some(peer));
    // The separate TURN-over-TLS listener hands new connections a renewed one too.
    let turn_tls = server.addrs.turn_tls.expect("turn.tls_listen bound");
    let on_5349 = trusted_chain(&pebble, turn_tls, Some(&first[0])).await;
    assert_eq!(names_of(&on_5349[0]), [NAME]);
    // The first certificate was never taken from the open connections.
    assert_eq!(turn.get_ref().1.peer_certificates().unwrap()[0], first[0]);
}

/// Runs the binary with `env` on top of a loopback config; returns it and its output.
fn spawn_binary(data: &Path, env: &[(&str, String)]) -> (Killed, Arc<Output>) {
    let mut cmd = Command::new(BIN);
    cmd.env("MESHMEET__DATA_DIR", data)
        .env("MESHMEET__HTTP__LISTEN", "127.0.0.1:0")
        .env("MESHMEET__TURN__LISTEN", "127.0.0.1:0")
        .env("MESHMEET__TURN__TLS_LISTEN", "")
        .env("MESHMEET__TLS__ACME_RETRY_S", "1")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("meshmeet starts");
    let out = Output::capture(&mut child);
    (Killed(child), out)
}

/// The HTTPS port from the binary's banner.
async fn banner_port(out: &Output) -> u16 {
    let line = out
        .wait_for(1, "banner", |l| l.contains("open https://"))
        .await;
    line.split("open https://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .and_then(|h| h.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .expect("banner names the port")
}

/// The server keeps serving with its self-signed certificate while the order fails.
async fn serves_self_signed(data: &Path, port: u16) {
    let pem = std::fs::read(data.join("selfsigned-cert.pem")).unwrap();
    let res = support::https_client(&[&pem], loopback(port))
        .build()
        .unwrap()
        .get(format!("https://localhost:{port}/healthz"))
        .send()
        .await
        .expect("HTTPS with the self-signed certificate");
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn the_ca_refusing_is_logged_with_its_problem_and_retried() {
    if !have_pebble() {
        return;
    }
    // Pebble validates on ports nobody listens on: every challenge fails with a
    // connection problem. And it refuses blocked.test outright at the new order.
    let ports = Ports::pick();
    let pebble = Pebble::start(ports.http, ports.https, 90 * 86400, &["blocked.test"]).await;
    for (name, problem) in [
        // Pebble calls a validation that could not connect `unauthorized`.
        (
            "refused.test",
            "tls-alpn-01 for refused.test: problem urn:ietf:params:acme:error:",
        ),
        (
            "blocked.test",
            "urn:ietf:params:acme:error:rejectedIdentifier",
        ),
    ] {
        let data = tempfile::tempdir().unwrap();
        let (_proc, out) = spawn_binary(
            data.path(),
            &[
                ("MESHMEET__TLS__ACME_DOMAINS", name.to_string()),
                ("MESHMEET__TLS__ACME_DIRECTORY", pebble.directory.clone()),
                (
                    "MESHMEET__TLS__ACME_DIRECTORY_CA",
                    pebble.ca_file.display().to_string(),
                ),
                ("MESHMEET__TLS__ACME_CHALLENGE", "tls-alpn-01".into()),
            ],
        );
        let port = banner_port(&out).await;
        let failed = |l: &str| l.contains("ACME order failed");
        let first = out.wait_for(1, "a failed order", failed).await;
        assert!(first.contains(problem), "{name}: {first}");
        assert!(first.contains(name), "{name}: {first}");
        // Retried (after tls.acme_retry_s, then twice that), and served meanwhile.
        let second = out.wait_for(2, "a retried order", failed).await;
        assert!(second.contains("failures=2"), "{second}");
        serves_self_signed(data.path(), port).await;
        // Neither key material nor account secrets reach the log.
        let log = out.text();
        assert!(
            !log.contains("PRIVATE KEY") && !log.contains("key_pkcs8"),
            "{log}"
        );
    }
}

#[tokio::test]
async fn an_unreachable_ca_is_logged_and_retried() {
    // No CA at all (nothing listens on the directory's port): no Pebble needed.
    let data = tempfile::tempdir().unwrap();
    let directory = format!("https://127.0.0.1:{}/dir", free_port());
    let (_proc, out) = spawn_binary(
        data.path(),
        &[
            ("MESHMEET__TLS__ACME_DOMAINS", NAME.to_string()),
            ("MESHMEET__TLS__ACME_DIRECTORY", directory.clone()),
        ],
    );
    let port = banner_port(&out).await;
    let failed = |l: &str| l.contains("ACME order failed");
    let first = out.wait_for(1, "a failed order", failed).await;
    assert!(first.contains(&directory), "{first}");
    assert!(
        first.to_ascii_lowercase().contains("connection refused"),
        "{first}"
    );
    out.wait_for(2, "a retried order", failed).await;
    serves_self_signed(data.path(), port).await;
}

#[test]
fn check_config_names_bad_acme_keys() {
    let dir = tempfile::tempdir().unwrap();
    for (key, value, why) in [
        (
            "TLS__ACME_DOMAINS",
            "meet example.org",
            "not a fully qualified domain name",
        ),
        ("TLS__ACME_DOMAINS", "*.example.org", "DNS-01"),
        (
            "TLS__ACME_DIRECTORY",
            "http://ca.example.org/directory",
            "https://",
        ),
        (
            "TLS__ACME_DIRECTORY_CA",
            "/nonexistent/root.pem",
            "cannot read",
        ),
    ] {
        let out = Command::new(BIN)
            .arg("check-config")
            .env("MESHMEET__DATA_DIR", dir.path())
            .env(format!("MESHMEET__{key}"), value)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{key}={value} accepted");
        let named = format!(
            "tls.{}",
            key.trim_start_matches("TLS__").to_ascii_lowercase()
        );
        assert!(
            stderr.contains(&named) && stderr.contains(why),
            "{key}: {stderr}"
        );
    }
    // ACME beside a configured certificate: one or the other.
    let out = Command::new(BIN)
        .arg("check-config")
        .env("MESHMEET__TLS__ACME_DOMAINS", "meet.example.org")
        .env("MESHMEET__TLS__CERT", "/etc/c.pem")
        .env("MESHMEET__TLS__KEY", "/etc/k.pem")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("tls.acme_domains"),
        "{stderr}"
    );
}
