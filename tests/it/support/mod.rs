//! Shared test helpers: an in-process server on port 0 with a self-signed certificate
//! that shuts down on drop, clients that trust that certificate, and the check for the
//! external tools some tests need.

pub mod ws;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use meshmeet::app::{AppState, BoundAddrs};
use meshmeet::{Config, Server};
use tokio::sync::oneshot;

/// Set to `1` (as `tests/run.sh` does, after installing the tools) to make a missing
/// external tool fail the tests that need it instead of skipping them.
pub const REQUIRE_TOOLS_VAR: &str = "MESHMEET_REQUIRE_TOOLS";

/// Whether the external program `name` (Debian package `package`) is on `PATH`. When
/// it is not, the calling test should return at once: this prints why it is skipped,
/// or panics when [`REQUIRE_TOOLS_VAR`] is `1`.
pub fn have_tool(name: &str, package: &str) -> bool {
    let required = std::env::var(REQUIRE_TOOLS_VAR).is_ok_and(|v| v == "1");
    // Straight to the process's stderr: the test harness captures `eprintln!`, and a
    // skip should be seen.
    check_tool(name, package, required, &mut std::io::stderr())
}

fn check_tool(name: &str, package: &str, required: bool, report: &mut dyn Write) -> bool {
    if on_path(name) {
        return true;
    }
    assert!(
        !required,
        "{name} is not installed and {REQUIRE_TOOLS_VAR}=1 requires it (apt-get install {package})"
    );
    let test = std::thread::current()
        .name()
        .unwrap_or("a test")
        .to_string();
    let _ = writeln!(
        report,
        "SKIPPED {test}: {name} is not installed (apt-get install {package}; \
         {REQUIRE_TOOLS_VAR}=1 turns this into a failure)"
    );
    false
}

/// Whether this machine has IPv6 loopback (`::1`) to bind. When it has not, the
/// calling test should return at once: this prints why it is skipped, or panics
/// when [`REQUIRE_TOOLS_VAR`] is `1`.
pub fn have_ipv6_loopback() -> bool {
    let err = match std::net::UdpSocket::bind("[::1]:0") {
        Ok(_) => return true,
        Err(e) => e,
    };
    let required = std::env::var(REQUIRE_TOOLS_VAR).is_ok_and(|v| v == "1");
    assert!(
        !required,
        "IPv6 loopback is unavailable ({err}) and {REQUIRE_TOOLS_VAR}=1 requires it"
    );
    let test = std::thread::current()
        .name()
        .unwrap_or("a test")
        .to_string();
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: IPv6 loopback is unavailable ({err}; {REQUIRE_TOOLS_VAR}=1 turns \
         this into a failure)"
    );
    false
}

fn on_path(name: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| {
        std::fs::metadata(dir.join(name))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// A rustls client config that trusts exactly the certificates in `pem`.
pub fn rustls_client_config(pem: &[u8]) -> Arc<rustls::ClientConfig> {
    meshmeet::tls::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(cert.expect("pem")).expect("root");
    }
    Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// An HTTPS client that trusts exactly the certificates in `pems` and sends requests
/// for `localhost` to `addr`.
pub fn https_client(pems: &[&[u8]], addr: SocketAddr) -> reqwest::ClientBuilder {
    let mut b = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .resolve("localhost", addr);
    for pem in pems {
        b = b.add_root_certificate(reqwest::Certificate::from_pem(pem).expect("cert"));
    }
    b
}

pub struct TestServer {
    pub addrs: BoundAddrs,
    pub state: Arc<AppState>,
    pub data_dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// A port below the kernel's ephemeral range that `free` finds free. A port from
/// `bind(0)` is in that range: between a server's stop and its restart, the kernel
/// may hand it to any test's outgoing connection, and the restart cannot bind it.
/// Ports are taken in turn from a start that differs per process, so two tests of
/// one run never get the same port. For a child process (Pebble, NATS) and for a
/// server that is restarted on its port.
pub fn fixed_port(free: impl Fn(u16) -> bool) -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u32, ephemeral_low.clamp(10_000, 65_536));
    if high - low < 1000 {
        // No room below the range: a port the kernel picks (as before).
        return std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
    }
    let start = std::process::id().wrapping_mul(7919) % (high - low);
    for _ in 0..(high - low) {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = low + (start + n) % (high - low);
        if free(port as u16) {
            return port as u16;
        }
    }
    panic!("no free port in {low}..{high}");
}

/// A config for tests: loopback, port 0 everywhere, state in `data_dir`.
pub fn test_config(data_dir: &Path) -> Config {
    let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
    let mut c = Config::default();
    c.data_dir = data_dir.to_path_buf();
    c.http.listen = loopback(0);
    c.turn.listen = loopback(0);
    c.turn.tls_listen = Some(loopback(0));
    c.log.level = "warn".into();
    c
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    /// Starts a server after `edit` adjusts the test config.
    pub async fn start_with(edit: impl FnOnce(&mut Config)) -> TestServer {
        Self::start_in(tempfile::tempdir().expect("tempdir"), edit).await
    }

    /// Starts a server with its state in `data_dir` (e.g. one a stopped server left:
    /// see [`TestServer::stop`]).
    pub async fn start_in(
        data_dir: tempfile::TempDir,
        edit: impl FnOnce(&mut Config),
    ) -> TestServer {
        let mut cfg = test_config(data_dir.path());
        edit(&mut cfg);
        cfg.validate().expect("test config is valid");
        let server = Server::bind(cfg).await.expect("server binds");
        let addrs = server.addrs();
        let state = server.state();
        let (tx, rx) = oneshot::channel();
        let done = tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        TestServer {
            addrs,
            state,
            data_dir,
            stop: Some(tx),
            done: Some(done),
        }
    }

    pub fn https_addr(&self) -> SocketAddr {
        self.addrs.https
    }

    /// `https://localhost:PORT` (the self-signed certificate names localhost).
    pub fn base_url(&self) -> String {
        format!("https://localhost:{}", self.addrs.https.port())
    }

    pub fn ws_url(&self) -> String {
        format!("wss://localhost:{}/ws", self.addrs.https.port())
    }

    /// The server's own origin, which `/ws` always allows.
    pub fn origin(&self) -> String {
        self.base_url()
    }

    pub fn cert_path(&self) -> PathBuf {
        self.state.tls.cert_path().to_path_buf()
    }

    pub fn cert_pem(&self) -> Vec<u8> {
        std::fs::read(self.cert_path()).expect("certificate readable")
    }

    /// An HTTPS client that trusts this server's certificate (and nothing else).
    pub fn http_client(&self) -> reqwest::Client {
        https_client(&[&self.cert_pem()], self.addrs.https)
            .build()
            .expect("client")
    }

    /// `/metrics` as the server shows it to a client on loopback.
    pub async fn metrics(&self) -> String {
        self.http_client()
            .get(format!("{}/metrics", self.base_url()))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("body")
    }

    /// A rustls client config trusting this server's certificate (for WebSocket and
    /// raw TLS clients).
    pub fn rustls_client_config(&self) -> Arc<rustls::ClientConfig> {
        rustls_client_config(&self.cert_pem())
    }

    /// Stops the server, waits for it to finish, and hands back its state directory.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(done) = self.done.take() {
            done.await
                .expect("server task")
                .expect("server stops cleanly");
        }
        let placeholder = tempfile::tempdir().expect("tempdir");
        std::mem::replace(&mut self.data_dir, placeholder)
    }

    /// Stops the server and waits for it to finish.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.done.take() {
            Some(done) => done.await?,
            None => Ok(()),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

#[test]
fn tools_on_path_are_found() {
    let mut report = Vec::new();
    assert!(check_tool("sh", "dash", true, &mut report));
    assert!(report.is_empty());
}

#[test]
fn a_missing_tool_skips_with_a_reason() {
    let mut report = Vec::new();
    assert!(!check_tool(
        "meshmeet-no-such-tool",
        "none",
        false,
        &mut report
    ));
    let text = String::from_utf8(report).unwrap();
    assert!(
        text.starts_with("SKIPPED support::a_missing_tool_skips_with_a_reason: meshmeet-no-such-tool is not installed"),
        "{text}"
    );
}

#[test]
#[should_panic(expected = "requires it")]
fn a_missing_tool_fails_when_required() {
    check_tool("meshmeet-no-such-tool", "none", true, &mut Vec::new());
}
