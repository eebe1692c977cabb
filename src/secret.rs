//! [`Secret`]: a string that must not leak (room password, TURN shared secret, static
//! TURN users' passwords). Its `Debug`, `Display` and `Serialize` show `<redacted>`, so
//! a secret cannot reach a log line or a printed config by accident; its comparisons
//! take the same time wherever the inputs first differ.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What every rendering of a non-empty secret shows instead of it.
pub const REDACTED: &str = "<redacted>";

/// A secret string. Empty means "not set".
#[derive(Clone, Default, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// The secret itself, for the few places that use it (HMAC keys, the TURN
    /// long-term credential). Never log or print it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Length in characters (config limits are stated in characters).
    pub fn char_count(&self) -> usize {
        self.0.chars().count()
    }

    /// Whether `candidate` is this secret, in time that does not depend on where the
    /// two first differ (only on their lengths).
    pub fn matches(&self, candidate: &str) -> bool {
        constant_time_eq(self.0.as_bytes(), candidate.as_bytes())
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Secret) -> bool {
        self.matches(&other.0)
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Secret {
        Secret(s.to_string())
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Secret {
        Secret(s)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            f.write_str("Secret(\"\")")
        } else {
            write!(f, "Secret({REDACTED})")
        }
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            Ok(())
        } else {
            f.write_str(REDACTED)
        }
    }
}

/// Serialized only for display (`check-config`): redacted, empty stays empty.
impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Secret, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// Compares byte strings without an early exit on the first differing byte.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renderings_redact() {
        let s = Secret::from("hunter2-hunter2");
        assert_eq!(format!("{s}"), REDACTED);
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        assert!(!format!("{s:#?}").contains("hunter2"));
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"<redacted>\"");
        let empty = Secret::default();
        assert_eq!(format!("{empty}"), "");
        assert_eq!(serde_json::to_string(&empty).unwrap(), "\"\"");
        assert_eq!(s.expose(), "hunter2-hunter2");
    }

    #[test]
    fn comparisons() {
        let s = Secret::from("abc");
        assert!(s.matches("abc"));
        assert!(!s.matches("abd"));
        assert!(!s.matches("ab"));
        assert!(!s.matches(""));
        assert!(Secret::default().matches(""));
        assert_eq!(s, Secret::from("abc".to_string()));
        assert_ne!(s, Secret::from("abC"));
        assert!(constant_time_eq(b"", b""));
        assert!(!constant_time_eq(b"a", b"b"));
    }

    #[test]
    fn deserializes_from_a_string() {
        let s: Secret = serde_json::from_str("\"pw\"").unwrap();
        assert!(s.matches("pw"));
        assert_eq!(Secret::from("é1").char_count(), 2);
    }
}
