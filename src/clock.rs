//! Wall-clock time, for the few places the protocol needs it: the expiry written into
//! TURN REST credentials (Unix seconds) and chat time stamps (Unix milliseconds).
//! Everything that measures durations (timeouts, grace periods, rate limits) uses
//! [`std::time::Instant`] instead, so a clock step cannot expire or extend anything.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch (0 if the system clock is set before 1970).
pub fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Milliseconds since the Unix epoch (0 if the system clock is set before 1970).
pub fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_agree() {
        let s = unix_secs();
        let ms = unix_millis();
        // Both read the same clock moments apart: within a second of each other.
        assert!(ms / 1000 >= s && ms / 1000 <= s + 1, "{s} s vs {ms} ms");
        // After 2023-11-14 (1_700_000_000): the clock is not at the epoch.
        assert!(s > 1_700_000_000);
    }
}
