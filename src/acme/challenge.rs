//! The answers to pending ACME challenges, shared between the order task (which adds
//! and removes them) and the listeners (which serve them):
//!
//! - HTTP-01 (RFC 8555 section 8.3): `GET /.well-known/acme-challenge/{token}` on the
//!   plain-HTTP listener answers the key authorization.
//! - TLS-ALPN-01 (RFC 8737): a TLS handshake offering only ALPN `acme-tls/1` with a
//!   pending name in SNI gets a self-signed certificate for that name carrying the
//!   key authorization's digest in its critical `acmeIdentifier` extension. For an IP
//!   address (RFC 8738) the SNI is its reverse-DNS name.
//!
//! Only the order task adds entries, at most one per configured name, so the maps stay
//! as small as `tls.acme_domains`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;

/// Longest token accepted in a challenge path (Let's Encrypt's are 43 characters).
const MAX_TOKEN_LEN: usize = 128;

/// Pending challenge answers.
#[derive(Debug, Default)]
pub struct Challenges {
    /// HTTP-01: token -> key authorization.
    http: Mutex<HashMap<String, String>>,
    /// TLS-ALPN-01: SNI name (lower case, no trailing dot) -> challenge certificate.
    tls_alpn: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding it cannot leave these maps inconsistent.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Challenges {
    pub fn new() -> Arc<Challenges> {
        Arc::new(Challenges::default())
    }

    /// The key authorization for an HTTP-01 token, if that challenge is pending.
    pub fn http01(&self, token: &str) -> Option<String> {
        if token.is_empty()
            || token.len() > MAX_TOKEN_LEN
            || !token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return None;
        }
        lock(&self.http).get(token).cloned()
    }

    /// The TLS-ALPN-01 certificate for the name a client sent in SNI.
    pub fn tls_alpn01(&self, sni: &str) -> Option<Arc<CertifiedKey>> {
        let name = sni.strip_suffix('.').unwrap_or(sni).to_ascii_lowercase();
        lock(&self.tls_alpn).get(&name).cloned()
    }

    pub fn add_http01(&self, token: &str, key_authorization: &str) {
        lock(&self.http).insert(token.to_string(), key_authorization.to_string());
    }

    /// Makes and installs the challenge certificate for `identifier` (a canonical
    /// DNS name or IP address) with the SHA-256 `digest` of the key authorization.
    pub fn add_tls_alpn01(&self, identifier: &str, digest: &[u8]) -> Result<(), String> {
        let cert = challenge_certificate(identifier, digest)?;
        lock(&self.tls_alpn).insert(sni_name(identifier), Arc::new(cert));
        Ok(())
    }

    /// Forgets every pending answer (when an order ends, however it ends).
    pub fn clear(&self) {
        lock(&self.http).clear();
        lock(&self.tls_alpn).clear();
    }

    /// How many answers are pending (HTTP-01, TLS-ALPN-01).
    pub fn pending(&self) -> (usize, usize) {
        (lock(&self.http).len(), lock(&self.tls_alpn).len())
    }
}

/// Clears the pending answers when dropped: an order that fails or is cancelled part
/// way leaves nothing behind.
pub struct ClearOnDrop(pub Arc<Challenges>);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.clear();
    }
}

/// The name a TLS-ALPN-01 validator sends in SNI: the DNS name itself, or for an IP
/// address its reverse-DNS name (RFC 8738 section 6).
pub fn sni_name(identifier: &str) -> String {
    match identifier.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
        }
        Ok(IpAddr::V6(v6)) => {
            let mut s = String::with_capacity(72);
            for b in v6.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", b & 0xf, b >> 4));
            }
            s.push_str("ip6.arpa");
            s
        }
        Err(_) => identifier.to_ascii_lowercase(),
    }
}

/// A self-signed certificate for `identifier` with the critical acmeIdentifier
/// extension (RFC 8737 section 3) holding `digest`.
fn challenge_certificate(identifier: &str, digest: &[u8]) -> Result<CertifiedKey, String> {
    // rcgen asserts the length; a SHA-256 digest is 32 bytes.
    if digest.len() != 32 {
        return Err(format!(
            "challenge digest for {identifier} is {} bytes, not 32",
            digest.len()
        ));
    }
    let mut params = rcgen::CertificateParams::new(vec![identifier.to_string()])
        .map_err(|e| format!("challenge certificate for {identifier}: {e}"))?;
    params
        .custom_extensions
        .push(rcgen::CustomExtension::new_acme_identifier(digest));
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    // Not `CertifiedKey::from_der`: its key check parses the certificate with webpki,
    // which refuses the critical acmeIdentifier extension.
    let signing_key = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| e.to_string())?;
    Ok(CertifiedKey::new(
        vec![CertificateDer::from(cert.der().to_vec())],
        signing_key,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reverse_names_for_ip_addresses() {
        assert_eq!(sni_name("meet.test"), "meet.test");
        assert_eq!(sni_name("192.0.2.7"), "7.2.0.192.in-addr.arpa");
        let v6 = sni_name("2001:db8::1");
        assert!(v6.starts_with("1.0.0.0.0.0.0.0"), "{v6}");
        assert!(v6.ends_with("8.b.d.0.1.0.0.2.ip6.arpa"), "{v6}");
        assert_eq!(v6.split('.').count(), 32 + 2);
    }

    #[test]
    fn http01_answers_only_pending_well_formed_tokens() {
        let c = Challenges::new();
        c.add_http01("tok_en-1", "tok_en-1.thumb");
        assert_eq!(c.http01("tok_en-1").as_deref(), Some("tok_en-1.thumb"));
        assert_eq!(c.http01("other"), None);
        assert_eq!(c.http01(""), None);
        assert_eq!(c.http01("../etc/passwd"), None);
        assert_eq!(c.http01(&"a".repeat(MAX_TOKEN_LEN + 1)), None);
        {
            let _guard = ClearOnDrop(c.clone());
        }
        assert_eq!(c.http01("tok_en-1"), None);
    }

    #[test]
    fn tls_alpn01_certificate_carries_the_digest() {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let c = Challenges::new();
        let digest = [7u8; 32];
        c.add_tls_alpn01("meet.test", &digest).unwrap();
        c.add_tls_alpn01("127.0.0.1", &digest).unwrap();
        assert_eq!(c.pending(), (0, 2));
        assert!(c.tls_alpn01("other.test").is_none());
        // SNI in any case, with or without the root dot.
        let ck = c.tls_alpn01("MEET.test.").expect("pending");
        let (_, cert) = X509Certificate::from_der(ck.cert[0].as_ref()).unwrap();
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("acmeIdentifier extension");
        assert!(ext.critical);
        // An ASN.1 OCTET STRING of 32 bytes: 0x04 0x20, then the digest.
        assert_eq!(ext.value[..2], [0x04, 0x20]);
        assert_eq!(ext.value[2..], digest);
        let info = super::super::schedule::CertInfo::from_der(ck.cert[0].as_ref()).unwrap();
        assert_eq!(info.names, vec!["meet.test"]);
        let ip = c.tls_alpn01("1.0.0.127.in-addr.arpa").expect("pending");
        let info = super::super::schedule::CertInfo::from_der(ip.cert[0].as_ref()).unwrap();
        assert_eq!(info.names, vec!["127.0.0.1"]);
        c.clear();
        assert_eq!(c.pending(), (0, 0));
        assert!(c.add_tls_alpn01("meet.test", &[1, 2, 3]).is_err());
    }
}
