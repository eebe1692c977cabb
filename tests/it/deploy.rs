//! Deployment: the systemd unit verifies, `install.sh --root` produces the expected
//! tree and config (kept on upgrade), and the installed binary serves HTTPS and answers
//! STUN with the installed config.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use meshmeet::config::{AcmeChallenge, Config};
use meshmeet::secret::Secret;

use crate::support;

const BIN: &str = env!("CARGO_BIN_EXE_meshmeet");

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn install(args: &[&str]) -> std::process::Output {
    Command::new("bash")
        .arg(repo().join("deploy/install.sh"))
        .args(args)
        .output()
        .expect("bash runs")
}

fn install_ok(args: &[&str]) -> String {
    let out = install(args);
    assert!(
        out.status.success(),
        "install.sh {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn secret_of(conf: &Path) -> Secret {
    Config::load_with_env(Some(conf), Vec::new())
        .expect("installed config loads")
        .turn
        .secret
}

#[test]
fn systemd_unit_verifies() {
    if !support::have_tool("systemd-analyze", "systemd") {
        return;
    }
    // The unit names /usr/local/bin/meshmeet, which systemd-analyze wants to exist;
    // verify a copy that points at the binary under test instead.
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(repo().join("deploy/meshmeet.service")).unwrap();
    for needed in [
        "Type=notify",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "ProtectSystem=strict",
        "SystemCallFilter=@system-service",
        "ExecStartPre=/usr/local/bin/meshmeet check-config",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "StateDirectory=meshmeet",
        "LimitNOFILE=",
    ] {
        assert!(unit.contains(needed), "unit lacks {needed}");
    }
    let path = dir.path().join("meshmeet.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/meshmeet", BIN)).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("meshmeet.service:"), "warnings: {stderr}");
}

#[test]
fn install_into_root_then_upgrade_then_uninstall() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path().to_str().unwrap();
    let out = install_ok(&[
        "meet.example.org",
        "--root",
        r,
        "--binary",
        BIN,
        "--external-ip",
        "203.0.113.7",
        "--email",
        "admin@example.org",
    ]);
    assert!(out.contains("UDP 49152-65535"), "{out}");
    assert!(out.contains("ACME: obtained for meet.example.org"), "{out}");
    // The ports to open: TCP and UDP on the HTTPS port, no separate TLS port.
    assert!(out.contains("TCP 443 (HTTPS"), "{out}");
    assert!(out.contains("UDP 443 (TURN over UDP"), "{out}");
    assert!(!out.contains("5349"), "{out}");
    let bin = root.path().join("usr/local/bin/meshmeet");
    let conf = root.path().join("etc/meshmeet/meshmeet.toml");
    let unit = root.path().join("etc/systemd/system/meshmeet.service");
    assert!(bin.is_file() && conf.is_file() && unit.is_file());
    assert!(root.path().join("var/lib/meshmeet").is_dir());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&conf).unwrap().permissions().mode() & 0o007,
        0,
        "config holds the TURN secret: not world-readable"
    );

    let cfg = Config::load_with_env(Some(&conf), Vec::new()).unwrap();
    assert_eq!(cfg.http.public_host, "meet.example.org");
    assert_eq!(cfg.http.listen, "0.0.0.0:443".parse().unwrap());
    assert_eq!(
        cfg.http.redirect_listen,
        Some("0.0.0.0:80".parse().unwrap())
    );
    assert_eq!(cfg.data_dir, PathBuf::from("/var/lib/meshmeet"));
    assert_eq!(cfg.tls.self_signed_names, vec!["meet.example.org"]);
    // A trusted certificate by ACME by default (Let's Encrypt, TLS-ALPN-01 on 443).
    assert_eq!(cfg.tls.acme_domains, vec!["meet.example.org"]);
    assert_eq!(cfg.tls.acme_email, "admin@example.org");
    assert_eq!(cfg.tls.acme_directory, "");
    assert_eq!(cfg.tls.acme_challenge, AcmeChallenge::Auto);
    assert_eq!(
        cfg.turn.external_ips,
        vec!["203.0.113.7".parse::<std::net::IpAddr>().unwrap()]
    );
    assert!(cfg.turn.secret.char_count() >= 32);
    let secret = cfg.turn.secret.clone();

    let check = Command::new(&bin)
        .args(["check-config", "--config"])
        .arg(&conf)
        .output()
        .unwrap();
    assert!(check.status.success());
    assert!(!String::from_utf8_lossy(&check.stdout).contains(secret.expose()));

    // Upgrade: the binary is replaced, the config and its secret kept.
    std::fs::write(&bin, b"old").unwrap();
    let out = install_ok(&["meet.example.org", "--root", r, "--binary", BIN]);
    assert!(out.contains("installed"), "{out}");
    assert_eq!(secret_of(&conf), secret);
    assert_eq!(std::fs::read(&bin).unwrap(), std::fs::read(BIN).unwrap());

    // Uninstall keeps config and state; --purge removes them.
    install_ok(&["--uninstall", "--root", r]);
    assert!(!bin.exists() && !unit.exists());
    assert!(conf.exists());
    install_ok(&["--uninstall", "--purge", "--root", r]);
    assert!(!conf.exists());
    // Nothing was written outside the root (the tree holds only our paths).
    for entry in std::fs::read_dir(root.path()).unwrap() {
        let name = entry.unwrap().file_name();
        assert!(
            ["usr", "etc", "var"].contains(&name.to_str().unwrap()),
            "{name:?}"
        );
    }
}

#[test]
fn install_with_certificate_writes_copies_and_renewal_hook() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path().to_str().unwrap();
    let live = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["meet.example.org".to_string()]).unwrap();
    let cert = live.path().join("fullchain.pem");
    let key = live.path().join("privkey.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    install_ok(&[
        "meet.example.org",
        "--root",
        r,
        "--binary",
        BIN,
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--https-port",
        "8443",
        "--http-port",
        "0",
    ]);
    let conf = root.path().join("etc/meshmeet/meshmeet.toml");
    let cfg = Config::load_with_env(Some(&conf), Vec::new()).unwrap();
    assert_eq!(cfg.tls.cert, "/etc/meshmeet/tls/fullchain.pem");
    assert!(
        cfg.tls.acme_domains.is_empty(),
        "a given certificate: no ACME"
    );
    assert_eq!(cfg.tls.key, "/etc/meshmeet/tls/privkey.pem");
    assert_eq!(cfg.http.listen, "0.0.0.0:8443".parse().unwrap());
    assert_eq!(cfg.http.redirect_listen, None);
    assert_eq!(
        std::fs::read(root.path().join("etc/meshmeet/tls/fullchain.pem")).unwrap(),
        ck.cert.pem().into_bytes()
    );
    let hook = std::fs::read_to_string(
        root.path()
            .join("etc/letsencrypt/renewal-hooks/deploy/meshmeet.sh"),
    )
    .unwrap();
    assert!(hook.contains("systemctl reload meshmeet"), "{hook}");
    assert!(hook.contains(live.path().to_str().unwrap()), "{hook}");
}

#[test]
fn install_chooses_the_certificate_source() {
    let load = |args: &[&str]| {
        let root = tempfile::tempdir().unwrap();
        let r = root.path().to_str().unwrap();
        let mut all = args.to_vec();
        all.extend(["--root", r, "--binary", BIN]);
        let out = install_ok(&all);
        let conf = root.path().join("etc/meshmeet/meshmeet.toml");
        (Config::load_with_env(Some(&conf), Vec::new()).unwrap(), out)
    };
    // Asked for a self-signed certificate.
    let (cfg, out) = load(&["meet.example.org", "--self-signed"]);
    assert!(cfg.tls.acme_domains.is_empty());
    assert!(out.contains("TLS:    self-signed"), "{out}");
    // A name without a dot, or an address: no ACME.
    for host in ["localhost", "203.0.113.7", "2001:db8::7"] {
        let (cfg, _) = load(&[host]);
        assert!(cfg.tls.acme_domains.is_empty(), "{host}");
    }
    // HTTPS off 443 with the redirect on 80: the CA checks over HTTP-01 there.
    let (cfg, out) = load(&[
        "meet.example.org",
        "--https-port",
        "8443",
        "--acme-directory",
        "https://acme-staging-v02.api.letsencrypt.org/directory",
    ]);
    assert_eq!(cfg.tls.acme_challenge, AcmeChallenge::Http01);
    assert_eq!(
        cfg.tls.acme_directory,
        "https://acme-staging-v02.api.letsencrypt.org/directory"
    );
    assert!(
        out.contains("TCP 80 (redirect to HTTPS, the CA's certificate checks)"),
        "{out}"
    );
    // Neither port a CA checks: said so.
    let (_, out) = load(&[
        "meet.example.org",
        "--https-port",
        "8443",
        "--http-port",
        "0",
    ]);
    assert!(out.contains("forward one of them"), "{out}");
}

#[test]
fn install_refuses_bad_arguments() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path().to_str().unwrap();
    for args in [
        vec!["--root", r, "--binary", BIN],
        vec!["bad domain!", "--root", r, "--binary", BIN],
        vec![
            "meet.example.org",
            "--root",
            r,
            "--binary",
            BIN,
            "--cert",
            "/x.pem",
        ],
        vec!["meet.example.org", "--root", r, "--bogus"],
        vec![
            "meet.example.org",
            "--root",
            r,
            "--binary",
            "/nonexistent/meshmeet",
        ],
        vec![
            "meet.example.org",
            "--root",
            r,
            "--binary",
            BIN,
            "--email",
            "nobody",
        ],
        vec![
            "meet.example.org",
            "--root",
            r,
            "--binary",
            BIN,
            "--acme-directory",
            "http://ca.example.org/directory",
        ],
        vec![
            "localhost",
            "--root",
            r,
            "--binary",
            BIN,
            "--email",
            "a@example.org",
        ],
        vec![
            "meet.example.org",
            "--root",
            r,
            "--binary",
            BIN,
            "--self-signed",
            "--email",
            "a@example.org",
        ],
    ] {
        let out = install(&args);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(!out.stderr.is_empty(), "{args:?} should say why");
    }
}

#[test]
fn installed_binary_serves_the_installed_config() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path().to_str().unwrap();
    install_ok(&["localhost", "--root", r, "--binary", BIN]);
    let bin = root.path().join("usr/local/bin/meshmeet");
    let conf = root.path().join("etc/meshmeet/meshmeet.toml");
    let data = root.path().join("var/lib/meshmeet");
    // Ports 443/80 need privileges the test lacks: move every listener to loopback
    // port 0 through the environment, as a systemd drop-in would.
    let mut child = Command::new(&bin)
        .arg("--config")
        .arg(&conf)
        .env("MESHMEET__DATA_DIR", &data)
        .env("MESHMEET__HTTP__LISTEN", "127.0.0.1:0")
        .env("MESHMEET__HTTP__REDIRECT_LISTEN", "127.0.0.1:0")
        .env("MESHMEET__TURN__LISTEN", "127.0.0.1:0")
        .env("MESHMEET__TURN__TLS_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drain stderr on a thread for the whole run (a closed pipe would fail writes).
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut port = None;
    let mut stun = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while port.is_none() || stun.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = rx.recv_timeout(left) else {
            let status = child.try_wait();
            panic!("no banner; exit {status:?}; log:\n{}", seen.join("\n"));
        };
        seen.push(line.clone());
        if let Some(rest) = line.split("open https://localhost:").nth(1) {
            port = rest.split('/').next().and_then(|p| p.parse::<u16>().ok());
        }
        if line.contains("STUN/TURN listening") {
            stun = line
                .split("udp=")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|a| a.parse::<std::net::SocketAddr>().ok());
        }
    }
    let port = port.expect("banner names the HTTPS port");
    let stun = stun.expect("banner names the STUN/TURN UDP address");
    let mapped = stun_binding(stun);
    let pem = std::fs::read(data.join("selfsigned-cert.pem")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let status = rt.block_on(async {
        let c = support::https_client(&[&pem], ([127, 0, 0, 1], port).into())
            .build()
            .unwrap();
        c.get(format!("https://localhost:{port}/healthz"))
            .send()
            .await
            .unwrap()
            .status()
    });
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status, 200);
    let (mapped, local) = mapped;
    assert_eq!(mapped, local, "STUN answers with our own address");
}

/// A STUN Binding exchange (the project's one client-side request builder): returns
/// the XOR-MAPPED-ADDRESS from the answer and the local address it should equal.
fn stun_binding(server: std::net::SocketAddr) -> (std::net::SocketAddr, std::net::SocketAddr) {
    use meshmeet::relay::client;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let req = client::binding_request();
    sock.send_to(&req, server).unwrap();
    let mut buf = [0u8; 1500];
    let (n, _) = sock.recv_from(&mut buf).expect("STUN answer");
    let msg = client::parse(&buf[..n]).expect("a STUN message");
    assert!(client::answers(&req, &msg), "answers our transaction");
    assert!(client::is_success(&msg), "Binding success response");
    let mapped = client::mapped_address(&msg).expect("XOR-MAPPED-ADDRESS");
    (mapped, sock.local_addr().unwrap())
}
