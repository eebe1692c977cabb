//! ICE configuration handed to clients (`joined.ice`, `ice`): STUN and TURN URLs for
//! the host the client used, with time-limited TURN REST API credentials
//! (username `EXPIRY:PEERID`, password `base64(HMAC-SHA1(secret, username))`, as
//! coturn's `use-auth-secret`). Also owns the TURN shared secret (configured, or
//! generated once and kept under `data_dir`).

use std::path::Path;

use base64::Engine;
use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha1::{Digest, Sha1};

use crate::config::Config;
use crate::net::client_host;
use crate::secret::Secret;
use crate::tls::TlsError;

const SECRET_FILE: &str = "turn-secret";

/// What the client passes to `new RTCPeerConnection(...)` (the `iceServers` and
/// `iceTransportPolicy` of an `RTCConfiguration`), plus `expiresAt`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RtcConfiguration {
    pub ice_servers: Vec<IceServer>,
    pub ice_transport_policy: &'static str,
    /// Unix seconds after which the TURN credentials stop working for new allocations.
    pub expires_at: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IceServer {
    pub urls: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// Builds [`RtcConfiguration`]s for peers. Shared behind an `Arc`.
pub struct IceProvider {
    turn_enabled: bool,
    secret: Secret,
    public_host: String,
    ports: TurnPorts,
    force_relay: bool,
    credential_ttl_s: u64,
}

/// The ports clients are told to use: those actually bound (they differ from the
/// config only when it asks for port 0, as tests do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TurnPorts {
    /// `turn.listen`: STUN, TURN over UDP and over TCP.
    pub main: u16,
    /// `turn.extra_udp_listen`: more TURN over UDP.
    pub extra_udp: Vec<u16>,
    /// TURN over TLS: the HTTPS port when `turn.share_https_port` is on, else
    /// `turn.tls_listen` (if set).
    pub tls: Option<u16>,
}

impl IceProvider {
    pub fn new(cfg: &Config, secret: Secret, ports: TurnPorts) -> Self {
        IceProvider {
            turn_enabled: cfg.turn.enabled,
            secret,
            public_host: cfg.http.public_host.clone(),
            ports,
            force_relay: cfg.ice.force_relay,
            credential_ttl_s: cfg.turn.credential_ttl_s,
        }
    }

    /// Full-lifetime ICE config for a joined peer.
    pub fn for_peer(
        &self,
        peer_id: &str,
        host_header: Option<&str>,
        now_unix: u64,
    ) -> RtcConfiguration {
        self.build(peer_id, host_header, now_unix, self.credential_ttl_s)
    }

    /// ICE config with an explicit credential lifetime (e.g. 120 s before `join`).
    pub fn build(
        &self,
        peer_id: &str,
        host_header: Option<&str>,
        now_unix: u64,
        ttl_s: u64,
    ) -> RtcConfiguration {
        let expires_at = now_unix + ttl_s;
        let policy = if self.force_relay { "relay" } else { "all" };
        if !self.turn_enabled {
            return RtcConfiguration {
                ice_servers: Vec::new(),
                ice_transport_policy: policy,
                expires_at,
            };
        }
        let host = client_host(&self.public_host, host_header);
        let username = format!("{expires_at}:{peer_id}");
        let credential = rest_password(self.secret.expose(), &username);
        // One URL per way in, no more: every URL costs each connection an
        // allocation and a little gathering time.
        let main = self.ports.main;
        let mut turn_urls = vec![format!("turn:{host}:{main}?transport=udp")];
        for p in self.ports.extra_udp.iter().filter(|p| **p != main) {
            turn_urls.push(format!("turn:{host}:{p}?transport=udp"));
        }
        turn_urls.push(format!("turn:{host}:{main}?transport=tcp"));
        if let Some(p) = self.ports.tls {
            turn_urls.push(format!("turns:{host}:{p}?transport=tcp"));
        }
        RtcConfiguration {
            ice_servers: vec![
                IceServer {
                    urls: vec![format!("stun:{host}:{main}")],
                    username: None,
                    credential: None,
                },
                IceServer {
                    urls: turn_urls,
                    username: Some(username),
                    credential: Some(credential),
                },
            ],
            ice_transport_policy: policy,
            expires_at,
        }
    }
}

/// How many TURN URLs a client is handed ([`IceProvider::build`]): UDP and TCP, plus
/// TLS when `turn.tls_listen` is set; none with TURN off.
pub fn turn_url_count(cfg: &Config) -> usize {
    match (cfg.turn.enabled, cfg.turn.tls_listen.is_some()) {
        (false, _) => 0,
        (true, false) => 2,
        (true, true) => 3,
    }
}

/// The TURN REST API password for `username` under `secret`:
/// `base64(HMAC-SHA1(secret, username))`.
pub fn rest_password(secret: &str, username: &str) -> String {
    base64::engine::general_purpose::STANDARD
        .encode(hmac_sha1(secret.as_bytes(), username.as_bytes()))
}

/// HMAC-SHA1 of `data` under `key`. It cannot fail: HMAC takes a key of any length,
/// brought to one 64-byte block as RFC 2104 says (hashed first when longer, then
/// zero-padded), which is done here so the fixed-size constructor applies.
fn hmac_sha1(key: &[u8], data: &[u8]) -> [u8; 20] {
    let mut block = [0u8; 64];
    if key.len() > block.len() {
        block[..20].copy_from_slice(&Sha1::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let mut mac = <Hmac<Sha1> as KeyInit>::new(&block.into());
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// The configured secret, or the one stored under `data_dir`, generated on first use.
pub fn turn_secret(cfg: &Config) -> Result<Secret, TlsError> {
    if !cfg.turn.secret.is_empty() {
        return Ok(cfg.turn.secret.clone());
    }
    load_or_create_secret(&cfg.data_dir)
}

/// Reads `dir/turn-secret`, or generates and writes it when the file does not exist.
/// An unreadable or too short file is an error naming it (never silently replaced:
/// coturn servers sharing the secret would stop accepting our credentials).
fn load_or_create_secret(dir: &Path) -> Result<Secret, TlsError> {
    let path = dir.join(SECRET_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            let s = s.trim();
            if s.chars().count() < 16 {
                return Err(TlsError::Read {
                    path,
                    reason: "the stored TURN secret is shorter than 16 characters; \
                             delete the file to generate a new one"
                        .into(),
                });
            }
            return Ok(Secret::from(s));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(TlsError::Read {
                path,
                reason: e.to_string(),
            })
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| TlsError::Write {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    let bytes: [u8; 24] = rand::random();
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    crate::tls::write_private(&path, format!("{secret}\n").as_bytes())?;
    Ok(Secret::from(secret))
}

/// Notified when a peer leaves its room for good (leave, or resume grace over), so the
/// relay can drop the allocations made with that peer's credentials.
pub trait PeerEvents: Send + Sync {
    fn peer_gone(&self, peer_id: &str);
    /// A host removed the peer: its allocations go, and the TURN credentials it was
    /// given are refused from now on (until they would have expired anyway).
    fn peer_revoked(&self, peer_id: &str) {
        self.peer_gone(peer_id);
    }
}

/// A [`PeerEvents`] that does nothing (relay disabled, tests).
pub struct NoPeerEvents;

impl PeerEvents for NoPeerEvents {
    fn peer_gone(&self, _peer_id: &str) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rest_password_matches_coturn_scheme() {
        // Reference value computed with: printf '%s' 1700000000:alice |
        //   openssl dgst -sha1 -hmac secret -binary | base64
        let p = rest_password("secret", "1700000000:alice");
        assert_eq!(p, "d8soP47RbdIKLDUOpnJPVQyq5Ts=");
        assert_ne!(p, rest_password("secret2", "1700000000:alice"));
    }

    #[test]
    fn hmac_takes_keys_of_any_length() {
        // Against the library's own key handling, around the 64-byte block size.
        for len in [0, 1, 16, 63, 64, 65, 100, 200] {
            let key: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(&key).unwrap();
            mac.update(b"1700000000:alice");
            let want: [u8; 20] = mac.finalize().into_bytes().into();
            assert_eq!(
                hmac_sha1(&key, b"1700000000:alice"),
                want,
                "key length {len}"
            );
        }
    }

    #[test]
    fn rtc_configuration_shape() {
        let mut cfg = Config::default();
        cfg.ice.force_relay = true;
        let ports = TurnPorts {
            main: 3478,
            extra_udp: vec![443],
            tls: Some(443),
        };
        let p = IceProvider::new(&cfg, "0123456789abcdef".into(), ports);
        let ice = p.for_peer("p1", Some("meet.example.org:8443"), 1000);
        assert_eq!(ice.expires_at, 1000 + 3600);
        assert_eq!(ice.ice_transport_policy, "relay");
        assert_eq!(ice.ice_servers[0].urls, vec!["stun:meet.example.org:3478"]);
        let turn = &ice.ice_servers[1];
        assert_eq!(
            turn.urls,
            vec![
                "turn:meet.example.org:3478?transport=udp",
                "turn:meet.example.org:443?transport=udp",
                "turn:meet.example.org:3478?transport=tcp",
                "turns:meet.example.org:443?transport=tcp",
            ]
        );
        assert_eq!(turn.username.as_deref(), Some("4600:p1"));
        assert_eq!(
            turn.credential.as_deref(),
            Some(rest_password("0123456789abcdef", "4600:p1").as_str())
        );
        let json = serde_json::to_value(&ice).unwrap();
        assert!(json.get("iceServers").is_some());
        assert!(json.get("expiresAt").is_some());
        cfg.turn.enabled = false;
        let p = IceProvider::new(&cfg, Secret::default(), TurnPorts::default());
        assert!(p.for_peer("p1", None, 0).ice_servers.is_empty());
    }

    #[test]
    fn secret_is_generated_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::default();
        cfg.data_dir = dir.path().to_path_buf();
        let a = turn_secret(&cfg).unwrap();
        let b = turn_secret(&cfg).unwrap();
        assert_eq!(a, b);
        assert!(a.char_count() >= 16);
        cfg.turn.secret = "configured-secret-123".into();
        assert!(turn_secret(&cfg).unwrap().matches("configured-secret-123"));
    }

    #[test]
    fn a_bad_stored_secret_is_an_error_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::default();
        cfg.data_dir = dir.path().to_path_buf();
        let file = dir.path().join(SECRET_FILE);
        std::fs::write(&file, "short\n").unwrap();
        let err = turn_secret(&cfg).unwrap_err().to_string();
        assert!(err.contains("turn-secret") && err.contains("16"), "{err}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "short\n");
        // A directory where the file should be cannot be read: an error too.
        std::fs::remove_file(&file).unwrap();
        std::fs::create_dir(&file).unwrap();
        assert!(turn_secret(&cfg).is_err());
    }
}
