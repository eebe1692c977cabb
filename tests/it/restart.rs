//! Restarts in the middle of a call, with the real binary: after SIGTERM every peer
//! resumes with its id and nobody sees a `peer_left`; after `kill -9` peers resume
//! from the last snapshot or join again, and whoever does not come back leaves when
//! the grace ends (no ghosts). ICE credentials issued before a restart still work on
//! the relay after it.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::net::UdpSocket;

use meshmeet::relay::client::{self, Attr, Session};
use stun::message::METHOD_ALLOCATE;

use crate::lifecycle::{write_config, Proc};
use crate::support::ws::{connect_child, id, Client, WAIT};

/// The resume grace the tests run with: short, so those who never return leave soon.
const GRACE_S: u64 = 4;

fn config(dir: &Path) -> std::path::PathBuf {
    write_config(dir, &format!("[rooms]\nresume_grace_s = {GRACE_S}\n"))
}

async fn join(c: &mut Client, room: &str, name: &str, resume: Option<&str>) -> Value {
    let mut m = json!({"type": "join", "room": room, "name": name});
    if let Some(t) = resume {
        m["resume"] = json!(t);
    }
    c.send(m).await;
    c.recv_type("joined").await
}

fn token(joined: &Value) -> String {
    joined["resume"].as_str().expect("resume token").to_string()
}

fn peer_ids(joined: &Value) -> Vec<String> {
    let mut ids: Vec<String> = joined["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .map(id)
        .collect();
    ids.sort();
    ids
}

/// The TURN server entry (URLs, username, credential) of a `joined` message.
fn turn_entry(joined: &Value) -> (u16, String, String) {
    let servers = joined["ice"]["iceServers"].as_array().expect("iceServers");
    let s = servers
        .iter()
        .find(|s| s["username"].is_string())
        .expect("a TURN server with credentials");
    let url = s["urls"]
        .as_array()
        .and_then(|u| {
            u.iter()
                .filter_map(Value::as_str)
                .find(|u| u.starts_with("turn:"))
        })
        .expect("a turn: URL");
    let port = url
        .rsplit(':')
        .next()
        .and_then(|p| p.split('?').next())
        .and_then(|p| p.parse().ok())
        .expect("port in the URL");
    (
        port,
        s["username"].as_str().unwrap_or_default().to_string(),
        s["credential"].as_str().unwrap_or_default().to_string(),
    )
}

/// Allocates on the relay at `port` with these credentials; true on success.
async fn allocate(port: u16, user: &str, pass: &str) -> bool {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let server = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = Session::new(user, pass);
    for _ in 0..2 {
        let req = s.request(METHOD_ALLOCATE, &[&Attr::UDP]);
        sock.send_to(&req, server).await.unwrap();
        let mut buf = vec![0u8; 2048];
        let (n, _) = tokio::time::timeout(WAIT, sock.recv_from(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        let m = client::parse(&buf[..n]).expect("STUN");
        if client::is_success(&m) {
            return true;
        }
        if !s.learn(&m) {
            return false;
        }
    }
    false
}

/// Stops the process with `sig` and waits for it to exit.
async fn stop(mut p: Proc, sig: i32) -> std::process::ExitStatus {
    p.signal(sig);
    tokio::task::spawn_blocking(move || p.wait_exit(Duration::from_secs(10)))
        .await
        .unwrap()
}

/// Reads `c` until `peer_left` for `gone`, failing on a `peer_left` for anyone else.
async fn wait_left(c: &mut Client, gone: &str) {
    loop {
        let m = c.recv().await;
        if m["type"] == "peer_left" {
            assert_eq!(m["id"], gone, "only {gone} leaves: {m}");
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_restart_keeps_ids_and_tells_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let (p, addr) = Proc::start(&cfg);
    let mut a = connect_child(dir.path(), addr).await;
    let mut b = connect_child(dir.path(), addr).await;
    let mut c = connect_child(dir.path(), addr).await;
    let ja = join(&mut a, "standup", "Ann", None).await;
    let jb = join(&mut b, "standup", "Bob", None).await;
    let jc = join(&mut c, "standup", "Cy", None).await;
    a.send(json!({"type": "media", "audio": true, "video": false, "screen": false}))
        .await;
    b.recv_type("media").await;
    let (ida, idb, idc) = (id(&ja), id(&jb), id(&jc));
    let (_, turn_user, turn_pass) = turn_entry(&ja);

    let st = stop(p, libc::SIGTERM).await;
    assert!(st.success(), "{st:?}");
    for s in [&mut a, &mut b, &mut c] {
        assert_eq!(s.close_code().await, 1001);
    }
    let file = dir.path().join("data/rooms.json");
    let text = std::fs::read_to_string(&file).expect("snapshot written");
    assert!(!text.contains(&token(&ja)), "no token at rest");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    let (p, addr) = Proc::start(&cfg);
    assert_eq!(gauge(dir.path(), addr, "meshmeet_peers").await, 3);
    assert_eq!(gauge(dir.path(), addr, "meshmeet_rooms").await, 1);

    // a and b come back with their tokens, as the web client does after a drop.
    let mut a = connect_child(dir.path(), addr).await;
    let ja2 = join(&mut a, "standup", "Ann", Some(&token(&ja))).await;
    assert_eq!(ja2["resumed"], true, "{ja2}");
    assert_eq!(id(&ja2), ida);
    let mut want = vec![idb.clone(), idc.clone()];
    want.sort();
    assert_eq!(peer_ids(&ja2), want);
    let mut b = connect_child(dir.path(), addr).await;
    let jb2 = join(&mut b, "standup", "Bob", Some(&token(&jb))).await;
    assert_eq!(
        (id(&jb2), jb2["resumed"].clone()),
        (idb.clone(), json!(true))
    );
    // b sees a's media state as it was before the restart.
    let a_info = jb2["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == ida.as_str())
        .cloned()
        .expect("a listed");
    assert_eq!(a_info["media"]["audio"], true, "{a_info}");
    assert_eq!(a_info["name"], "Ann");

    // Signaling between the resumed peers works at once.
    a.send(json!({"type": "offer", "to": idb, "sdp": "v=0 after restart"}))
        .await;
    let o = b.recv_type("offer").await;
    assert_eq!(o["from"], ida.as_str());

    // Credentials issued before the restart still allocate on the relay.
    let (port, _, _) = turn_entry(&ja2);
    assert!(
        allocate(port, &turn_user, &turn_pass).await,
        "old credentials refused"
    );

    // c never returns: when the grace ends, a and b each see c leave, and nobody
    // else (in particular not each other).
    wait_left(&mut a, &idc).await;
    wait_left(&mut b, &idc).await;
    assert_eq!(gauge(dir.path(), addr, "meshmeet_peers").await, 2);
    stop(p, libc::SIGTERM).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_restart_resumes_or_rejoins_and_leaves_no_ghost() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let (p, addr) = Proc::start(&cfg);
    let mut a = connect_child(dir.path(), addr).await;
    let mut b = connect_child(dir.path(), addr).await;
    let ja = join(&mut a, "r", "Ann", None).await;
    let jb = join(&mut b, "r", "Bob", None).await;
    // Wait (on the file, not a clock) for the periodic write that holds both.
    let file = dir.path().join("data/rooms.json");
    let (ida, idb) = (id(&ja), id(&jb));
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        if text.contains(&ida) && text.contains(&idb) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never written");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // c joins just before the crash: it may or may not be in the last snapshot.
    let mut c = connect_child(dir.path(), addr).await;
    let jc = join(&mut c, "r", "Cy", None).await;
    let st = stop(p, libc::SIGKILL).await;
    assert!(!st.success());

    let (p, addr) = Proc::start(&cfg);
    let mut a = connect_child(dir.path(), addr).await;
    let ja2 = join(&mut a, "r", "Ann", Some(&token(&ja))).await;
    assert_eq!(
        (id(&ja2), ja2["resumed"].clone()),
        (ida.clone(), json!(true))
    );
    let mut c = connect_child(dir.path(), addr).await;
    let jc2 = join(&mut c, "r", "Cy", Some(&token(&jc))).await;
    let c_now = id(&jc2);
    if jc2["resumed"] == true {
        assert_eq!(c_now, id(&jc));
    } else {
        // Not in the snapshot: c joined afresh, with an id never issued before.
        assert!(c_now != ida && c_now != idb && c_now != id(&jc));
        assert_eq!(a.recv_type("peer_joined").await["id"], c_now.as_str());
    }
    // b never returns: it leaves at the end of the grace, told to a and c once.
    wait_left(&mut a, &idb).await;
    wait_left(&mut c, &idb).await;
    assert_eq!(gauge(dir.path(), addr, "meshmeet_peers").await, 2);
    // (An old c restored from the snapshot but replaced by a fresh join would have
    // left too; the count shows nobody else stayed.)
    stop(p, libc::SIGTERM).await;
}

/// One gauge from `/metrics`.
async fn gauge(dir: &Path, addr: SocketAddr, name: &str) -> i64 {
    let pem = std::fs::read(dir.join("data/selfsigned-cert.pem")).expect("cert");
    let c = crate::support::https_client(&[&pem], addr).build().unwrap();
    let text = c
        .get(format!("https://localhost:{}/metrics", addr.port()))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in {text}"))
}
