//! Room names: validation and canonical form (Unicode NFC, then lowercase).

use unicode_normalization::UnicodeNormalization;

/// Names that are server paths and so cannot be rooms.
pub const RESERVED: &[&str] = &[
    "api",
    "assets",
    "check",
    "healthz",
    "metrics",
    "ws",
    "favicon.ico",
    "robots.txt",
];

pub const MAX_ROOM_CHARS: usize = 64;

/// Why a room name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoomNameError {
    #[error("room name must be 1 to 64 characters")]
    Length,
    #[error("room name may hold only letters, digits, '-', '_' and '.', and must start with a letter or digit")]
    Characters,
    #[error("room name is reserved")]
    Reserved,
}

/// Returns the canonical form of a room name, or why it is invalid.
pub fn normalize_room(raw: &str) -> Result<String, RoomNameError> {
    // Cheap bound before any allocation-heavy work.
    if raw.is_empty() || raw.len() > MAX_ROOM_CHARS * 4 {
        return Err(RoomNameError::Length);
    }
    let lowered: String = raw.nfc().collect::<String>().to_lowercase();
    let name: String = lowered.nfc().collect();
    let count = name.chars().count();
    if count == 0 || count > MAX_ROOM_CHARS {
        return Err(RoomNameError::Length);
    }
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(char::is_alphanumeric);
    let rest_ok = name
        .chars()
        .all(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.') || is_combining(c));
    if !first_ok || !rest_ok {
        return Err(RoomNameError::Characters);
    }
    if RESERVED.contains(&name.as_str()) {
        return Err(RoomNameError::Reserved);
    }
    Ok(name)
}

/// Combining marks that NFC leaves in place (e.g. Korean jamo compose, but some
/// scripts keep marks); they belong to the letter before them.
fn is_combining(c: char) -> bool {
    unicode_normalization::char::is_combining_mark(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_case_and_nfc() {
        assert_eq!(normalize_room("Team-Standup").unwrap(), "team-standup");
        // "é" as e + combining acute becomes the single precomposed character.
        assert_eq!(
            normalize_room("Caf\u{0065}\u{0301}").unwrap(),
            "caf\u{00e9}"
        );
        assert_eq!(normalize_room("회의실.1").unwrap(), "회의실.1");
        assert_eq!(normalize_room("ÄBC_9").unwrap(), "äbc_9");
    }

    #[test]
    fn refuses_bad_names() {
        assert_eq!(normalize_room(""), Err(RoomNameError::Length));
        assert_eq!(normalize_room(&"a".repeat(65)), Err(RoomNameError::Length));
        assert!(normalize_room(&"a".repeat(64)).is_ok());
        assert_eq!(normalize_room("-abc"), Err(RoomNameError::Characters));
        assert_eq!(normalize_room(".abc"), Err(RoomNameError::Characters));
        assert_eq!(normalize_room("a b"), Err(RoomNameError::Characters));
        assert_eq!(normalize_room("a/b"), Err(RoomNameError::Characters));
        assert_eq!(normalize_room("a\u{0000}"), Err(RoomNameError::Characters));
        assert_eq!(normalize_room("<script>"), Err(RoomNameError::Characters));
    }

    #[test]
    fn refuses_reserved() {
        for r in RESERVED {
            assert_eq!(normalize_room(r), Err(RoomNameError::Reserved), "{r}");
        }
        assert_eq!(normalize_room("WS"), Err(RoomNameError::Reserved));
        assert_eq!(normalize_room("Favicon.ICO"), Err(RoomNameError::Reserved));
    }
}
