//! When to renew and when to retry, as plain functions of the certificate, the CA's
//! renewal information, the time and a random draw: no clock and no IO here.

use std::net::IpAddr;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Longest pause between two failed attempts, unless the CA asks for longer.
pub const MAX_RETRY_S: u64 = 6 * 3600;
/// Longest `Retry-After` honoured (a week): a CA cannot park renewal for longer.
pub const MAX_RETRY_AFTER_S: u64 = 7 * 86400;

/// What renewal needs to know about a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Validity, in Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
    /// Subject alternative names in canonical form (see [`crate::config::acme_identifier`]).
    pub names: Vec<String>,
}

impl CertInfo {
    /// Reads validity and names from a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<CertInfo, String> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| format!("unparsable certificate: {e}"))?;
        let validity = cert.validity();
        let mut names = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) => names.push(d.to_ascii_lowercase()),
                    GeneralName::IPAddress(bytes) => {
                        let ip = match bytes.len() {
                            4 => <[u8; 4]>::try_from(*bytes).ok().map(IpAddr::from),
                            16 => <[u8; 16]>::try_from(*bytes).ok().map(IpAddr::from),
                            _ => None,
                        };
                        names.extend(ip.map(|ip| ip.to_string()));
                    }
                    _ => {}
                }
            }
        }
        Ok(CertInfo {
            not_before: validity.not_before.timestamp(),
            not_after: validity.not_after.timestamp(),
            names,
        })
    }

    /// Seconds from not-before to not-after (at least 1).
    pub fn lifetime(&self) -> i64 {
        (self.not_after - self.not_before).max(1)
    }

    /// Whether every one of `wanted` (canonical names) is among the certificate's.
    pub fn covers(&self, wanted: &[String]) -> bool {
        wanted.iter().all(|w| self.names.contains(w))
    }

    /// Whether it may still be served at `now`.
    pub fn valid_at(&self, now: i64) -> bool {
        self.not_before <= now && now < self.not_after
    }
}

/// When a certificate is due for renewal, in Unix seconds. `unit` is a uniform random
/// draw in `[0, 1)` that spreads renewals of many servers (and of restarts) apart.
///
/// - With the CA's renewal information (`ari`, a window of Unix seconds): a random
///   point in the window, as RFC 9773 asks.
/// - With `renew_before_s` set: that long before expiry, less up to a twentieth of
///   it; and never after the window's pick when the CA sent one (a CA moves the
///   window forward when certificates must be replaced early).
/// - Otherwise: at two thirds of the lifetime, less up to a thirtieth of it.
pub fn renewal_due(
    cert: &CertInfo,
    renew_before_s: u64,
    ari: Option<(i64, i64)>,
    unit: f64,
) -> i64 {
    let unit = unit.clamp(0.0, 1.0);
    let ari_pick = ari
        .filter(|(start, end)| end >= start)
        .map(|(start, end)| start + ((end - start) as f64 * unit) as i64);
    let life = cert.lifetime();
    if renew_before_s > 0 {
        let before = i64::try_from(renew_before_s).unwrap_or(i64::MAX).min(life);
        let due = cert.not_after - before - ((before / 20) as f64 * unit) as i64;
        return ari_pick.map_or(due, |pick| pick.min(due));
    }
    if let Some(pick) = ari_pick {
        return pick;
    }
    cert.not_before + life * 2 / 3 - ((life / 30) as f64 * unit) as i64
}

/// Seconds to wait after the `failures`-th failure in a row (1 = the first): `base_s`
/// doubling up to [`MAX_RETRY_S`], and never less than the CA's `Retry-After`.
pub fn retry_delay(failures: u32, base_s: u64, retry_after_s: Option<u64>) -> u64 {
    let doublings = failures.saturating_sub(1).min(20);
    let backoff = base_s.saturating_mul(1u64 << doublings).min(MAX_RETRY_S);
    let asked = retry_after_s.unwrap_or(0).min(MAX_RETRY_AFTER_S);
    backoff.max(asked)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(not_before: i64, life: i64) -> CertInfo {
        CertInfo {
            not_before,
            not_after: not_before + life,
            names: vec!["meet.test".into()],
        }
    }

    const DAY: i64 = 86400;

    #[test]
    fn two_thirds_of_the_lifetime_with_jitter_before_it() {
        let c = cert(1000, 90 * DAY);
        assert_eq!(renewal_due(&c, 0, None, 0.0), 1000 + 60 * DAY);
        let late = renewal_due(&c, 0, None, 0.999);
        assert!(late < 1000 + 60 * DAY && late > 1000 + 57 * DAY, "{late}");
        // Six-day certificates renew after four days.
        let short = cert(0, 6 * DAY);
        assert_eq!(renewal_due(&short, 0, None, 0.0), 4 * DAY);
    }

    #[test]
    fn renew_before_counts_back_from_expiry() {
        let c = cert(0, 90 * DAY);
        assert_eq!(renewal_due(&c, 30 * DAY as u64, None, 0.0), 60 * DAY);
        let jittered = renewal_due(&c, 30 * DAY as u64, None, 0.5);
        assert_eq!(jittered, 60 * DAY - (30 * DAY / 20) / 2);
        // Longer than the lifetime: due at once (at not-before).
        assert_eq!(renewal_due(&c, 365 * DAY as u64, None, 0.0), 0);
    }

    #[test]
    fn the_cas_window_decides_when_it_is_there() {
        let c = cert(0, 90 * DAY);
        let window = Some((50 * DAY, 52 * DAY));
        assert_eq!(renewal_due(&c, 0, window, 0.0), 50 * DAY);
        assert_eq!(renewal_due(&c, 0, window, 0.5), 51 * DAY);
        // A window in the past (say, after a revocation incident): due already.
        assert_eq!(renewal_due(&c, 0, Some((10, 20)), 0.0), 10);
        // With renew_before set, the earlier of the two.
        assert_eq!(renewal_due(&c, 80 * DAY as u64, window, 0.0), 10 * DAY);
        assert_eq!(renewal_due(&c, DAY as u64, window, 0.0), 50 * DAY);
        // A reversed window is ignored.
        assert_eq!(renewal_due(&c, 0, Some((20, 10)), 0.0), 60 * DAY);
    }

    #[test]
    fn retries_double_up_to_a_cap_and_respect_retry_after() {
        assert_eq!(retry_delay(1, 120, None), 120);
        assert_eq!(retry_delay(2, 120, None), 240);
        assert_eq!(retry_delay(5, 120, None), 1920);
        assert_eq!(retry_delay(40, 120, None), MAX_RETRY_S);
        assert_eq!(retry_delay(1, 120, Some(3600)), 3600);
        assert_eq!(retry_delay(1, 120, Some(10)), 120);
        assert_eq!(retry_delay(1, 120, Some(u64::MAX)), MAX_RETRY_AFTER_S);
        assert_eq!(retry_delay(0, 1, None), 1);
    }

    #[test]
    fn names_and_validity_come_from_the_certificate() {
        let mut params =
            rcgen::CertificateParams::new(vec!["Meet.Test".to_string(), "127.0.0.1".to_string()])
                .unwrap();
        params.not_before = rcgen::date_time_ymd(2030, 1, 1);
        params.not_after = rcgen::date_time_ymd(2030, 4, 1);
        let key = rcgen::KeyPair::generate().unwrap();
        let der = params.self_signed(&key).unwrap().der().to_vec();
        let info = CertInfo::from_der(&der).unwrap();
        assert_eq!(info.names, vec!["meet.test", "127.0.0.1"]);
        assert_eq!(info.lifetime(), 90 * DAY);
        assert!(info.covers(&["meet.test".into()]));
        assert!(info.covers(&["meet.test".into(), "127.0.0.1".into()]));
        assert!(!info.covers(&["other.test".into()]));
        assert!(info.valid_at(info.not_before));
        assert!(!info.valid_at(info.not_after));
        assert!(CertInfo::from_der(b"junk").is_err());
    }
}
