//! Long-term credentials for the relay: TURN REST API usernames (`EXPIRY:ID`, password
//! `base64(HMAC-SHA1(secret, username))`, coturn `use-auth-secret` compatible),
//! optional static users, and stateless nonces (an HMAC of timestamp and client
//! address under a per-process key), so unauthenticated traffic costs no state.

use std::collections::HashMap;
use std::net::SocketAddr;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// How long a nonce stays fresh before the client gets 438 Stale Nonce.
pub const NONCE_TTL_MS: u64 = 600_000;

/// The long-term key: MD5(username ":" realm ":" password), RFC 8489 section 9.2.2.
pub fn long_term_key(username: &str, realm: &str, password: &str) -> Vec<u8> {
    stun::integrity::MessageIntegrity::new_long_term_integrity(
        username.to_string(),
        realm.to_string(),
        password.to_string(),
    )
    .0
}

/// A parsed REST API username: `EXPIRY:ID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestUser {
    pub expiry: u64,
    pub id: String,
}

/// Parses `EXPIRY:ID` (ID may be anything, even contain ':'), or a bare `EXPIRY`,
/// which coturn's `use-auth-secret` accepts too.
pub fn parse_rest_username(username: &str) -> Option<RestUser> {
    let (exp, id) = username.split_once(':').unwrap_or((username, ""));
    if exp.is_empty() || exp.len() > 20 || !exp.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(RestUser {
        expiry: exp.parse().ok()?,
        id: id.to_string(),
    })
}

/// Why credentials were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredError {
    /// Unknown or malformed username.
    UnknownUser,
    /// A REST username whose expiry has passed.
    Expired,
}

/// Resolves usernames to long-term keys.
pub struct Credentials {
    secret: String,
    realm: String,
    users: HashMap<String, String>,
}

/// A user that may authenticate, with its key.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub key: Vec<u8>,
    /// Unix seconds after which the username cannot allocate; `None` for static users.
    pub expiry: Option<u64>,
    /// The peer id from a REST username.
    pub peer_id: Option<String>,
}

impl Credentials {
    pub fn new(secret: String, realm: String, users: HashMap<String, String>) -> Self {
        Credentials {
            secret,
            realm,
            users,
        }
    }

    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// The key for `username`; static users first, then the REST scheme.
    pub fn resolve(&self, username: &str) -> Result<Resolved, CredError> {
        if let Some(pass) = self.users.get(username) {
            return Ok(Resolved {
                key: long_term_key(username, &self.realm, pass),
                expiry: None,
                peer_id: None,
            });
        }
        if self.secret.is_empty() {
            return Err(CredError::UnknownUser);
        }
        let rest = parse_rest_username(username).ok_or(CredError::UnknownUser)?;
        let pass = crate::ice::rest_password(&self.secret, username);
        Ok(Resolved {
            key: long_term_key(username, &self.realm, &pass),
            expiry: Some(rest.expiry),
            peer_id: (!rest.id.is_empty()).then_some(rest.id),
        })
    }
}

/// Outcome of checking a nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceCheck {
    Fresh,
    Stale,
    Invalid,
}

/// Issues and checks stateless nonces.
pub struct Nonces {
    key: [u8; 32],
    ttl_ms: u64,
}

const MAC_HEX: usize = 24;

impl Nonces {
    pub fn new(key: [u8; 32], ttl_ms: u64) -> Self {
        Nonces { key, ttl_ms }
    }

    fn mac(&self, ts: u64, client: SocketAddr) -> String {
        let mut mac = match Hmac::<Sha256>::new_from_slice(&self.key) {
            Ok(m) => m,
            Err(_) => return String::new(),
        };
        mac.update(&ts.to_be_bytes());
        match client.ip() {
            std::net::IpAddr::V4(v4) => mac.update(&v4.octets()),
            std::net::IpAddr::V6(v6) => mac.update(&v6.octets()),
        }
        mac.update(&client.port().to_be_bytes());
        let out = mac.finalize().into_bytes();
        hex::encode(&out[..MAC_HEX / 2])
    }

    /// A nonce for `client`, issued at `now_ms`.
    pub fn issue(&self, now_ms: u64, client: SocketAddr) -> String {
        format!("{now_ms:016x}{}", self.mac(now_ms, client))
    }

    pub fn check(&self, nonce: &str, now_ms: u64, client: SocketAddr) -> NonceCheck {
        if nonce.len() != 16 + MAC_HEX || !nonce.is_ascii() {
            return NonceCheck::Invalid;
        }
        let Ok(ts) = u64::from_str_radix(&nonce[..16], 16) else {
            return NonceCheck::Invalid;
        };
        // Constant-time enough: both are fixed-length hex strings compared in full.
        let expected = self.mac(ts, client);
        let diff = expected
            .bytes()
            .zip(nonce[16..].bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff != 0 {
            return NonceCheck::Invalid;
        }
        if ts > now_ms.saturating_add(5_000) || now_ms.saturating_sub(ts) > self.ttl_ms {
            return NonceCheck::Stale;
        }
        NonceCheck::Fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rest_usernames() {
        assert_eq!(
            parse_rest_username("1700000000:alice"),
            Some(RestUser {
                expiry: 1_700_000_000,
                id: "alice".into()
            })
        );
        assert_eq!(parse_rest_username("17:a:b").unwrap().id, "a:b");
        assert_eq!(parse_rest_username("x:alice"), None);
        assert_eq!(parse_rest_username("alice"), None);
        let bare = parse_rest_username("1700000000").unwrap();
        assert_eq!((bare.expiry, bare.id.as_str()), (1700000000, ""));
        assert_eq!(parse_rest_username(":alice"), None);
        assert_eq!(parse_rest_username("99999999999999999999999:a"), None);
    }

    #[test]
    fn credentials_resolve() {
        let mut users = HashMap::new();
        users.insert("tool".to_string(), "pw".to_string());
        let c = Credentials::new("0123456789abcdef".into(), "r".into(), users);
        let s = c.resolve("tool").unwrap();
        assert_eq!(s.key, long_term_key("tool", "r", "pw"));
        assert_eq!(s.expiry, None);
        let r = c.resolve("100:p1").unwrap();
        assert_eq!(r.expiry, Some(100));
        assert_eq!(r.peer_id.as_deref(), Some("p1"));
        let pass = crate::ice::rest_password("0123456789abcdef", "100:p1");
        assert_eq!(r.key, long_term_key("100:p1", "r", &pass));
        assert_eq!(c.resolve("nobody").unwrap_err(), CredError::UnknownUser);
    }

    #[test]
    fn nonces_expire_and_bind_to_client() {
        let n = Nonces::new([7; 32], 1000);
        let a: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        let b: SocketAddr = "192.0.2.1:5001".parse().unwrap();
        let nonce = n.issue(10_000, a);
        assert_eq!(n.check(&nonce, 10_500, a), NonceCheck::Fresh);
        assert_eq!(n.check(&nonce, 11_000, a), NonceCheck::Fresh);
        assert_eq!(n.check(&nonce, 11_001, a), NonceCheck::Stale);
        assert_eq!(n.check(&nonce, 10_500, b), NonceCheck::Invalid);
        let mut bad = nonce.clone().into_bytes();
        bad[30] = if bad[30] == b'0' { b'1' } else { b'0' };
        assert_eq!(
            n.check(std::str::from_utf8(&bad).unwrap(), 10_500, a),
            NonceCheck::Invalid
        );
        assert_eq!(n.check("short", 10_500, a), NonceCheck::Invalid);
        let other = Nonces::new([8; 32], 1000);
        assert_eq!(other.check(&nonce, 10_500, a), NonceCheck::Invalid);
    }
}
