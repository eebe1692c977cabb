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
    /// The HTTPS port, when `turn.share_https_port` serves TURN over TCP and TLS there.
    pub https: Option<u16>,
    /// `turn.tls_listen`, if set.
    pub tls: Option<u16>,
}

impl TurnPorts {
    /// The ports a config asks for, before binding (a port 0 stays 0).
    pub fn configured(cfg: &Config) -> TurnPorts {
        TurnPorts {
            main: cfg.turn.listen.port(),
            extra_udp: cfg.turn.extra_udp_listen.iter().map(|a| a.port()).collect(),
            https: cfg.turn.share_https_port.then(|| cfg.http.listen.port()),
            tls: cfg.turn.tls_listen.map(|a| a.port()),
        }
    }

    /// The TURN URLs handed to clients for `host`, one per way in and no more (every
    /// URL costs each connection an allocation, and every blocked one keeps the
    /// browser gathering until it times out):
    ///
    /// - `turn:HOST:MAIN?transport=udp`, and the same on each extra UDP port;
    /// - with the HTTPS port shared, `turn:HOST:HTTPS?transport=tcp` and
    ///   `turns:HOST:HTTPS?transport=tcp`: the two ways through networks that let
    ///   out only HTTPS (plain TCP where the certificate is not trusted, TLS where a
    ///   firewall lets only TLS through). TCP on the main port and `turns:` on
    ///   `turn.tls_listen` reach no network these do not, so they are left out;
    /// - without it, `turn:HOST:MAIN?transport=tcp` and, if set,
    ///   `turns:HOST:TLS?transport=tcp`.
    ///
    /// No `stun:` URL: browsers learn their server-reflexive address from the TURN
    /// allocations over UDP.
    pub fn turn_urls(&self, host: &str) -> Vec<String> {
        let mut udp = vec![self.main];
        for &p in &self.extra_udp {
            // Port 0 (not bound yet) cannot be told apart: count each.
            if p == 0 || !udp.contains(&p) {
                udp.push(p);
            }
        }
        let mut urls: Vec<String> = udp
            .iter()
            .map(|p| format!("turn:{host}:{p}?transport=udp"))
            .collect();
        match self.https {
            Some(p) => {
                urls.push(format!("turn:{host}:{p}?transport=tcp"));
                urls.push(format!("turns:{host}:{p}?transport=tcp"));
            }
            None => {
                urls.push(format!("turn:{host}:{}?transport=tcp", self.main));
                if let Some(p) = self.tls {
                    urls.push(format!("turns:{host}:{p}?transport=tcp"));
                }
            }
        }
        urls
    }
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
        RtcConfiguration {
            ice_servers: vec![IceServer {
                urls: self.ports.turn_urls(&host),
                username: Some(username),
                credential: Some(credential),
            }],
            ice_transport_policy: policy,
            expires_at,
        }
    }
}

/// How many TURN URLs a client is handed ([`TurnPorts::turn_urls`]); none with TURN
/// off.
pub fn turn_url_count(cfg: &Config) -> usize {
    if !cfg.turn.enabled {
        return 0;
    }
    TurnPorts::configured(cfg).turn_urls("h").len()
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
            https: Some(443),
            tls: Some(5349),
        };
        let p = IceProvider::new(&cfg, "0123456789abcdef".into(), ports);
        let ice = p.for_peer("p1", Some("meet.example.org:8443"), 1000);
        assert_eq!(ice.expires_at, 1000 + 3600);
        assert_eq!(ice.ice_transport_policy, "relay");
        // One entry, TURN only: no stun: URL (TURN over UDP gives the reflexive
        // address too), four URLs (Firefox warns at five).
        assert_eq!(ice.ice_servers.len(), 1);
        let turn = &ice.ice_servers[0];
        assert_eq!(
            turn.urls,
            vec![
                "turn:meet.example.org:3478?transport=udp",
                "turn:meet.example.org:443?transport=udp",
                "turn:meet.example.org:443?transport=tcp",
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
    fn turn_urls_without_the_shared_port() {
        // TURN over TCP on the main port, and TLS on turn.tls_listen if set.
        let mut ports = TurnPorts {
            main: 3478,
            extra_udp: Vec::new(),
            https: None,
            tls: Some(5349),
        };
        assert_eq!(
            ports.turn_urls("h"),
            vec![
                "turn:h:3478?transport=udp",
                "turn:h:3478?transport=tcp",
                "turns:h:5349?transport=tcp",
            ]
        );
        ports.tls = None;
        assert_eq!(
            ports.turn_urls("h"),
            vec!["turn:h:3478?transport=udp", "turn:h:3478?transport=tcp"]
        );
        // The shared port replaces both; tls_listen stays for clients set up by hand.
        ports.https = Some(443);
        ports.tls = Some(5349);
        assert_eq!(
            ports.turn_urls("h"),
            vec![
                "turn:h:3478?transport=udp",
                "turn:h:443?transport=tcp",
                "turns:h:443?transport=tcp",
            ]
        );
    }

    #[test]
    fn extra_udp_ports_are_named_once() {
        // The main port again, and one port on two addresses (IPv4 and IPv6), give
        // no second URL.
        let ports = TurnPorts {
            main: 3478,
            extra_udp: vec![3478, 443, 443, 444],
            https: Some(443),
            tls: None,
        };
        let urls = ports.turn_urls("h");
        assert_eq!(
            urls[..3],
            [
                "turn:h:3478?transport=udp",
                "turn:h:443?transport=udp",
                "turn:h:444?transport=udp",
            ]
        );
        assert_eq!(urls.len(), 5);
    }

    #[test]
    fn url_count_follows_the_config() {
        // Defaults: UDP, and TCP and TLS on the shared HTTPS port.
        let mut cfg = Config::default();
        assert_eq!(turn_url_count(&cfg), 3);
        // The installer's: UDP on the HTTPS port number too.
        cfg.turn.extra_udp_listen = vec!["0.0.0.0:443".parse().unwrap()];
        assert_eq!(turn_url_count(&cfg), 4);
        // Not bound yet: port 0 listeners count each.
        cfg.turn.extra_udp_listen = vec![
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.2:0".parse().unwrap(),
        ];
        assert_eq!(turn_url_count(&cfg), 5);
        // The shared port off: TCP on the main port, TLS on tls_listen if set.
        cfg.turn.extra_udp_listen.clear();
        cfg.turn.share_https_port = false;
        cfg.turn.tls_listen = None;
        assert_eq!(turn_url_count(&cfg), 2);
        cfg.turn.tls_listen = Some("0.0.0.0:5349".parse().unwrap());
        assert_eq!(turn_url_count(&cfg), 3);
        cfg.turn.enabled = false;
        assert_eq!(turn_url_count(&cfg), 0);
        // The count is what a client is handed.
        let cfg = Config::default();
        let p = IceProvider::new(&cfg, "0123456789abcdef".into(), TurnPorts::configured(&cfg));
        assert_eq!(
            p.for_peer("p", None, 0).ice_servers[0].urls.len(),
            turn_url_count(&cfg)
        );
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
