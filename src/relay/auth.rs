//! Long-term credentials for the relay: TURN REST API usernames (`EXPIRY:ID`, password
//! `base64(HMAC-SHA1(secret, username))`, coturn `use-auth-secret` compatible),
//! optional static users, and stateless nonces (an HMAC of timestamp and client
//! address under a per-process key), so unauthenticated traffic costs no state.

use std::collections::HashMap;
use std::net::SocketAddr;

use std::time::{Duration, Instant};

use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// How long a nonce stays fresh before the client gets 438 Stale Nonce.
pub const NONCE_TTL: Duration = Duration::from_secs(600);

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

/// Issues and checks stateless nonces: the issue time (milliseconds on the monotonic
/// clock since `epoch`) and an HMAC of it and the client address. Monotonic time
/// keeps nonces valid across a wall-clock step.
pub struct Nonces {
    /// HMAC-SHA-256 keyed once; cloned per nonce.
    mac: Hmac<Sha256>,
    ttl: Duration,
    epoch: Instant,
}

const MAC_HEX: usize = 24;
/// How far in the future an issue time may lie (inputs from tasks that read the clock
/// just before another task took the lock arrive slightly out of order).
const FUTURE_SLACK_MS: u64 = 5_000;

/// Milliseconds from `epoch` to `now` (zero if `now` is earlier).
fn millis_since(epoch: Instant, now: Instant) -> u64 {
    // u64 milliseconds last 584 million years: the conversion saturates in theory only.
    u64::try_from(now.saturating_duration_since(epoch).as_millis()).unwrap_or(u64::MAX)
}

impl Nonces {
    /// `key` is a random per-process secret (64 bytes, HMAC-SHA-256's block size, so
    /// keying cannot fail); `epoch` is any instant before the first nonce.
    pub fn new(key: [u8; 64], ttl: Duration, epoch: Instant) -> Self {
        Nonces {
            mac: <Hmac<Sha256> as KeyInit>::new(&key.into()),
            ttl,
            epoch,
        }
    }

    fn mac(&self, ts: u64, client: SocketAddr) -> String {
        let mut mac = self.mac.clone();
        mac.update(&ts.to_be_bytes());
        match client.ip() {
            std::net::IpAddr::V4(v4) => mac.update(&v4.octets()),
            std::net::IpAddr::V6(v6) => mac.update(&v6.octets()),
        }
        mac.update(&client.port().to_be_bytes());
        let out = mac.finalize().into_bytes();
        hex::encode(&out[..MAC_HEX / 2])
    }

    /// A nonce for `client`, issued at `now`.
    pub fn issue(&self, now: Instant, client: SocketAddr) -> String {
        let ts = millis_since(self.epoch, now);
        format!("{ts:016x}{}", self.mac(ts, client))
    }

    pub fn check(&self, nonce: &str, now: Instant, client: SocketAddr) -> NonceCheck {
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
        let now_ms = millis_since(self.epoch, now);
        let ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        if ts > now_ms.saturating_add(FUTURE_SLACK_MS) || now_ms.saturating_sub(ts) > ttl_ms {
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
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let n = Nonces::new([7; 64], Duration::from_millis(1000), t0);
        let a: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        let b: SocketAddr = "192.0.2.1:5001".parse().unwrap();
        let nonce = n.issue(at(10_000), a);
        assert_eq!(n.check(&nonce, at(10_500), a), NonceCheck::Fresh);
        assert_eq!(n.check(&nonce, at(11_000), a), NonceCheck::Fresh);
        assert_eq!(n.check(&nonce, at(11_001), a), NonceCheck::Stale);
        assert_eq!(n.check(&nonce, at(10_500), b), NonceCheck::Invalid);
        let mut bad = nonce.clone().into_bytes();
        bad[30] = if bad[30] == b'0' { b'1' } else { b'0' };
        assert_eq!(
            n.check(std::str::from_utf8(&bad).unwrap(), at(10_500), a),
            NonceCheck::Invalid
        );
        assert_eq!(n.check("short", at(10_500), a), NonceCheck::Invalid);
        let other = Nonces::new([8; 64], Duration::from_millis(1000), t0);
        assert_eq!(other.check(&nonce, at(10_500), a), NonceCheck::Invalid);
        // Checked by a task whose clock reading is a little older than the issue time:
        // fresh within the slack, stale beyond it.
        assert_eq!(n.check(&nonce, at(6_000), a), NonceCheck::Fresh);
        assert_eq!(n.check(&nonce, at(4_999), a), NonceCheck::Stale);
    }
}
