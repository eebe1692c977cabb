//! The real binary: command line, signals (SIGTERM exits cleanly, SIGHUP swaps the
//! certificate), readiness from the start-up banner.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::support::https_client;

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_meshmeet");

pub(crate) struct Proc {
    /// `None` once [`Proc::wait_exit`] has reaped it.
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    /// Starts the binary with `config` and waits for the banner naming the HTTPS port.
    pub(crate) fn start(config: &Path) -> (Proc, SocketAddr) {
        Proc::start_limited(config, None)
    }

    /// Like [`Proc::start`], with the open-files limit (soft and hard) set to
    /// `nofile` in the child before it runs.
    fn start_limited(config: &Path, nofile: Option<u64>) -> (Proc, SocketAddr) {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(BIN);
        cmd.arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null());
        if let Some(n) = nofile {
            // SAFETY: setrlimit is async-signal-safe and touches only this process.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut p = Proc {
            child: Some(child),
            lines: rx,
        };
        let line = p.wait_for("open https://");
        let port: u16 = line
            .split("https://localhost:")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {line}"));
        (p, SocketAddr::from(([127, 0, 0, 1], port)))
    }

    pub(crate) fn wait_for(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => continue,
                Err(_) => panic!("server never logged {needle:?}"),
            }
        }
    }

    pub(crate) fn signal(&self, sig: i32) {
        let child = self.child.as_ref().expect("still running");
        // SAFETY: plain kill(2) on our own child, not yet reaped.
        unsafe {
            libc::kill(child.id() as i32, sig);
        }
    }

    /// Waits for the process to exit (a thread blocks in wait(2) and reports); kills
    /// it and fails if that takes longer than `within`.
    pub(crate) fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("still running");
        let pid = child.id();
        let (tx, rx) = mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        match rx.recv_timeout(within) {
            Ok(status) => status.expect("wait for the server"),
            Err(_) => {
                // SAFETY: the waiter has not reaped it (no status arrived).
                unsafe {
                    libc::kill(pid as i32, libc::SIGKILL);
                }
                let _ = waiter.join();
                panic!("did not exit within {within:?}");
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub(crate) fn write_config(dir: &Path, extra: &str) -> std::path::PathBuf {
    let path = dir.join("meshmeet.toml");
    std::fs::write(
        &path,
        format!(
            "data_dir = \"{}\"\n[http]\nlisten = \"127.0.0.1:0\"\n[turn]\nlisten = \"127.0.0.1:0\"\ntls_listen = \"127.0.0.1:0\"\n{extra}",
            dir.join("data").display()
        ),
    )
    .unwrap();
    path
}

fn client(roots: &[&[u8]], addr: SocketAddr) -> reqwest::Client {
    https_client(roots, addr).tls_info(true).build().unwrap()
}

async fn peer_cert(c: &reqwest::Client, addr: SocketAddr) -> Vec<u8> {
    let res = c
        .get(format!("https://localhost:{}/healthz", addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let info = res.extensions().get::<reqwest::tls::TlsInfo>().unwrap();
    info.peer_certificate().unwrap().to_vec()
}

#[test]
fn version_and_check_config() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));

    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "[rooms]\npassword = \"hunter2-secret\"\n");
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("capacity = 6"), "{text}");
    assert!(!text.contains("hunter2-secret"), "{text}");
    assert!(text.contains("<redacted>"), "{text}");

    let bad = write_config(dir.path(), "[rooms]\ncapacity = 1\n");
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("rooms.capacity"));

    // A relay port range holding the TURN UDP listener's port.
    let base = write_config(dir.path(), "");
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&base)
        .env("MESHMEET__TURN__LISTEN", "0.0.0.0:3478")
        .env("MESHMEET__TURN__RELAY_PORTS", "3000-4000")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("turn.relay_ports") && err.contains("3000-4000 includes 3478"),
        "{err}"
    );

    let out = Command::new(BIN)
        .args(["check-config", "--config", "/nonexistent/meshmeet.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/meshmeet.toml"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_open_connection_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "");
    let (mut p, addr) = Proc::start(&cfg);
    let pem = std::fs::read(dir.path().join("data/selfsigned-cert.pem")).unwrap();
    let c = client(&[&pem], addr);
    // An open keep-alive connection.
    peer_cert(&c, addr).await;
    let t0 = Instant::now();
    p.signal(libc::SIGTERM);
    let st = tokio::task::spawn_blocking(move || {
        let st = p.wait_exit(Duration::from_secs(5));
        (st, p)
    })
    .await
    .unwrap()
    .0;
    assert!(st.success(), "exit status {st:?}");
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_swaps_certificate_without_dropping_connections() {
    let dir = tempfile::tempdir().unwrap();
    let a = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let b = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = dir.path().join("chain.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, a.cert.pem()).unwrap();
    std::fs::write(&key, a.signing_key.serialize_pem()).unwrap();
    let cfg = write_config(
        dir.path(),
        &format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            cert.display(),
            key.display()
        ),
    );
    let (mut p, addr) = Proc::start(&cfg);
    let (pem_a, pem_b) = (a.cert.pem(), b.cert.pem());
    let old = client(&[pem_a.as_bytes(), pem_b.as_bytes()], addr);
    assert_eq!(peer_cert(&old, addr).await, a.cert.der().to_vec());

    std::fs::write(&cert, b.cert.pem()).unwrap();
    std::fs::write(&key, b.signing_key.serialize_pem()).unwrap();
    p.signal(libc::SIGHUP);
    let p = tokio::task::spawn_blocking(move || {
        p.wait_for("TLS certificate reloaded");
        p
    })
    .await
    .unwrap();

    let fresh = client(&[pem_a.as_bytes(), pem_b.as_bytes()], addr);
    assert_eq!(peer_cert(&fresh, addr).await, b.cert.der().to_vec());
    // The pooled connection opened before the reload still works (and still shows A).
    assert_eq!(peer_cert(&old, addr).await, a.cert.der().to_vec());
    drop(p);
}

/// User plus system CPU time of process `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_file_descriptor_limit_udp_and_open_connections_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("meshmeet.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = \"{}\"\n[http]\nlisten = \"127.0.0.1:0\"\nhandshake_timeout_s = 120\n\
             [turn]\nlisten = \"127.0.0.1:0\"\ntls_listen = \"127.0.0.1:0\"\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let (mut p, addr) = Proc::start_limited(&cfg, Some(64));
    let turn = p.wait_for("STUN/TURN listening");
    let udp: SocketAddr = turn
        .split("udp=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no UDP address in {turn}"));
    let pem = std::fs::read(dir.path().join("data/selfsigned-cert.pem")).unwrap();
    // A call in progress: a kept-alive HTTPS connection.
    let existing = client(&[&pem], addr);
    assert_eq!(
        peer_cert(&existing, addr).await,
        peer_cert(&existing, addr).await
    );
    // Idle connections until the server runs out of descriptors.
    let mut held = Vec::new();
    for _ in 0..80 {
        held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let line = tokio::task::block_in_place(|| p.wait_for("out of file descriptors"));
    assert!(line.contains("LimitNOFILE"), "{line}");
    assert!(line.contains("ulimit -n"), "{line}");
    let pid = p.child.as_ref().unwrap().id();
    let ticks = cpu_ticks(pid);
    // New connections are not left waiting in the backlog for a descriptor: each is
    // either closed at once or, when a descriptor came free meanwhile (the rooms
    // snapshot writer opens files too), accepted and handshaken like any other.
    let tls = crate::support::rustls_client_config(&pem);
    let mut closed = 0u32;
    for _ in 0..20 {
        let c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let hs = tokio_rustls::TlsConnector::from(tls.clone()).connect(name, c);
        match tokio::time::timeout(Duration::from_secs(60), hs).await {
            Ok(Err(_)) => closed += 1,
            Ok(Ok(_)) => {}
            Err(_) => panic!("a connection at the limit was left waiting"),
        }
    }
    assert!(closed > 0, "no connection was refused at the limit");
    // UDP is served.
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let req = meshmeet::relay::client::binding_request();
    sock.send_to(&req, udp).await.unwrap();
    let mut b = [0u8; 512];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut b))
        .await
        .expect("a STUN answer at the fd limit")
        .unwrap();
    assert!(meshmeet::relay::client::parse(&b[..n])
        .is_some_and(|m| meshmeet::relay::client::answers(&req, &m)));
    // The open connection is served, and the refusals are counted.
    let metrics = existing
        .get(format!("https://localhost:{}/metrics", addr.port()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let shed: f64 = metrics
        .lines()
        .find(|l| l.starts_with("meshmeet_https_connections_refused_total{reason=\"fd_limit\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(shed >= f64::from(closed), "{closed} closed; {metrics}");
    // No busy loop: the refusals cost well under a second of CPU (100 ticks/s).
    let spent = cpu_ticks(pid) - ticks;
    assert!(spent < 50, "{spent} ticks of CPU while at the limit");
    // Said once (rate-limited), not once per refusal.
    let repeats = p
        .lines
        .try_iter()
        .filter(|l| l.contains("out of file descriptors"))
        .count();
    assert_eq!(repeats, 0);
    // Descriptors freed: new connections are served again.
    drop(held);
    let fresh = client(&[&pem], addr);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match fresh
            .get(format!("https://localhost:{}/healthz", addr.port()))
            .send()
            .await
        {
            Ok(r) if r.status() == 200 => break,
            other => {
                assert!(Instant::now() < deadline, "not served again: {other:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    p.signal(libc::SIGTERM);
    assert!(p.wait_exit(Duration::from_secs(10)).success());
}
