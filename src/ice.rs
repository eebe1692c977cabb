//! ICE configuration handed to clients (`joined.ice`, `ice`): STUN and TURN URLs for
//! the host the client used, with time-limited TURN REST API credentials
//! (username `EXPIRY:PEERID`, password `base64(HMAC-SHA1(secret, username))`, as
//! coturn's `use-auth-secret`). Also owns the TURN shared secret (configured, or
//! generated once and kept under `data_dir`).

use std::path::Path;

use base64::Engine;
use hmac::{Hmac, Mac};
use serde::Serialize;

use crate::config::Config;

const SECRET_FILE: &str = "turn-secret";

/// What the client passes to `new RTCPeerConnection(...)`, plus `expiresAt`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IceConfig {
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

/// Builds [`IceConfig`]s for peers. Cheap to clone-share behind an `Arc`.
pub struct IceProvider {
    turn_enabled: bool,
    secret: String,
    public_host: String,
    turn_port: u16,
    turns_port: Option<u16>,
    force_relay: bool,
    credential_ttl_s: u64,
}

impl IceProvider {
    /// `turn_port`/`turns_port` are the ports actually bound (they differ from the
    /// config only when it asks for port 0, as tests do).
    pub fn new(cfg: &Config, secret: String, turn_port: u16, turns_port: Option<u16>) -> Self {
        IceProvider {
            turn_enabled: cfg.turn.enabled,
            secret,
            public_host: cfg.http.public_host.clone(),
            turn_port,
            turns_port,
            force_relay: cfg.ice.force_relay,
            credential_ttl_s: cfg.turn.credential_ttl_s,
        }
    }

    /// Full-lifetime ICE config for a joined peer.
    pub fn for_peer(&self, peer_id: &str, host_header: Option<&str>, now_unix: u64) -> IceConfig {
        self.build(peer_id, host_header, now_unix, self.credential_ttl_s)
    }

    /// ICE config with an explicit credential lifetime (e.g. 120 s before `join`).
    pub fn build(
        &self,
        peer_id: &str,
        host_header: Option<&str>,
        now_unix: u64,
        ttl_s: u64,
    ) -> IceConfig {
        let expires_at = now_unix + ttl_s;
        let policy = if self.force_relay { "relay" } else { "all" };
        if !self.turn_enabled {
            return IceConfig {
                ice_servers: Vec::new(),
                ice_transport_policy: policy,
                expires_at,
            };
        }
        let host = client_host(&self.public_host, host_header);
        let username = format!("{expires_at}:{peer_id}");
        let credential = rest_password(&self.secret, &username);
        let mut turn_urls = vec![
            format!("turn:{host}:{}?transport=udp", self.turn_port),
            format!("turn:{host}:{}?transport=tcp", self.turn_port),
        ];
        if let Some(p) = self.turns_port {
            turn_urls.push(format!("turns:{host}:{p}?transport=tcp"));
        }
        IceConfig {
            ice_servers: vec![
                IceServer {
                    urls: vec![format!("stun:{host}:{}", self.turn_port)],
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

/// The host clients should use: `public_host` if set, else the Host header's host part
/// (port removed, IPv6 kept in brackets), else `localhost`.
pub fn client_host(public_host: &str, host_header: Option<&str>) -> String {
    if !public_host.is_empty() {
        return bracket_v6(public_host);
    }
    match host_header.and_then(host_part) {
        Some(h) => h,
        None => "localhost".into(),
    }
}

fn bracket_v6(h: &str) -> String {
    if h.contains(':') && !h.starts_with('[') {
        format!("[{h}]")
    } else {
        h.to_string()
    }
}

/// Host part of a `Host` header value, validated; `None` if malformed.
pub fn host_part(header: &str) -> Option<String> {
    let header = header.trim();
    let host = if let Some(rest) = header.strip_prefix('[') {
        let end = rest.find(']')?;
        let inner = &rest[..end];
        inner.parse::<std::net::Ipv6Addr>().ok()?;
        format!("[{inner}]")
    } else {
        header.split(':').next()?.to_string()
    };
    crate::config::valid_host(&host).then_some(host.to_ascii_lowercase())
}

/// The TURN REST API password for `username` under `secret`.
pub fn rest_password(secret: &str, username: &str) -> String {
    // HMAC accepts keys of any length; new_from_slice cannot fail for it.
    let mut mac = match Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// The configured secret, or the one stored under `data_dir`, generated on first use.
pub fn turn_secret(cfg: &Config) -> Result<String, crate::tls::TlsError> {
    if !cfg.turn.secret.is_empty() {
        return Ok(cfg.turn.secret.clone());
    }
    load_or_create_secret(&cfg.data_dir)
}

fn load_or_create_secret(dir: &Path) -> Result<String, crate::tls::TlsError> {
    let path = dir.join(SECRET_FILE);
    if let Ok(s) = std::fs::read_to_string(&path) {
        let s = s.trim().to_string();
        if s.len() >= 16 {
            return Ok(s);
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| crate::tls::TlsError::Write {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    let bytes: [u8; 24] = rand::random();
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    crate::tls::write_private(&path, format!("{secret}\n").as_bytes())?;
    Ok(secret)
}

/// Notified when a peer leaves its room for good (leave, or resume grace over), so the
/// relay can drop the allocations made with that peer's credentials.
pub trait PeerEvents: Send + Sync {
    fn peer_gone(&self, peer_id: &str);
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
    fn host_parts() {
        assert_eq!(
            host_part("example.org:8443").as_deref(),
            Some("example.org")
        );
        assert_eq!(host_part("[::1]:8443").as_deref(), Some("[::1]"));
        assert_eq!(host_part("[::1]").as_deref(), Some("[::1]"));
        assert_eq!(host_part("10.1.2.3").as_deref(), Some("10.1.2.3"));
        assert_eq!(host_part("evil.org/x"), None);
        assert_eq!(host_part("[zz]:1"), None);
        assert_eq!(
            client_host("meet.example.org", Some("x:1")),
            "meet.example.org"
        );
        assert_eq!(client_host("", None), "localhost");
    }

    #[test]
    fn ice_config_shape() {
        let mut cfg = Config::default();
        cfg.ice.force_relay = true;
        let p = IceProvider::new(&cfg, "0123456789abcdef".into(), 3478, Some(5349));
        let ice = p.for_peer("p1", Some("meet.example.org:8443"), 1000);
        assert_eq!(ice.expires_at, 1000 + 3600);
        assert_eq!(ice.ice_transport_policy, "relay");
        assert_eq!(ice.ice_servers[0].urls, vec!["stun:meet.example.org:3478"]);
        let turn = &ice.ice_servers[1];
        assert_eq!(turn.urls.len(), 3);
        assert_eq!(turn.urls[2], "turns:meet.example.org:5349?transport=tcp");
        assert_eq!(turn.username.as_deref(), Some("4600:p1"));
        assert_eq!(
            turn.credential.as_deref(),
            Some(rest_password("0123456789abcdef", "4600:p1").as_str())
        );
        let json = serde_json::to_value(&ice).unwrap();
        assert!(json.get("iceServers").is_some());
        assert!(json.get("expiresAt").is_some());
        cfg.turn.enabled = false;
        let p = IceProvider::new(&cfg, String::new(), 3478, None);
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
        assert!(a.len() >= 16);
        cfg.turn.secret = "configured-secret-123".into();
        assert_eq!(turn_secret(&cfg).unwrap(), "configured-secret-123");
    }
}
