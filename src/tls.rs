//! TLS for HTTPS and TURN over TLS: the configured PEM chain and key, a certificate
//! obtained by ACME (`crate::acme`), or a self-signed certificate generated once under
//! `data_dir` and reused. The live server config sits behind an [`ArcSwap`] so SIGHUP
//! and ACME renewals swap certificates without dropping connections: each connection
//! takes the config current when it starts.
//!
//! With ACME on, the config's certificate resolver also answers TLS-ALPN-01
//! validations (RFC 8737): a ClientHello whose ALPN list is exactly `acme-tls/1` gets
//! the pending challenge certificate for its SNI name, or no certificate (a failed
//! handshake) when none is pending. Every other client gets the served certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus_client::metrics::gauge::Gauge;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use sha2::{Digest, Sha256};

use crate::acme::challenge::Challenges;
use crate::acme::schedule::CertInfo;
use crate::acme::store::Store;
use crate::config::Config;

const SELF_SIGNED_CERT: &str = "selfsigned-cert.pem";
const SELF_SIGNED_KEY: &str = "selfsigned-key.pem";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("certificate {cert} and key {key} do not match or are unusable: {reason}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("cannot write {path}: {reason}")]
    Write { path: PathBuf, reason: String },
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(String),
}

/// Where the certificate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertKind {
    Configured,
    SelfSigned,
    /// Obtained by ACME and kept under `data_dir/acme/`.
    Acme,
}

impl std::fmt::Display for CertKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CertKind::Configured => "configured",
            CertKind::SelfSigned => "self-signed",
            CertKind::Acme => "acme",
        })
    }
}

/// A loaded certificate with its server config.
pub struct LoadedCert {
    pub kind: CertKind,
    /// SHA-256 of the leaf certificate (DER), colon-separated hex.
    pub fingerprint: String,
    pub server_config: Arc<ServerConfig>,
    /// The leaf certificate (DER).
    pub leaf: CertificateDer<'static>,
    /// The leaf's expiry (Unix seconds), when it parses.
    pub not_after: Option<i64>,
}

/// What is served now, besides the server config.
struct Served {
    kind: CertKind,
    fingerprint: String,
    cert_path: PathBuf,
    key_path: PathBuf,
    leaf: CertificateDer<'static>,
}

/// The live TLS state shared by every TLS listener.
pub struct Tls {
    current: ArcSwap<ServerConfig>,
    served: ArcSwap<Served>,
    /// Pending ACME challenge answers; `None` when ACME is off.
    challenges: Option<Arc<Challenges>>,
    /// `meshmeet_tls_certificate_not_after_seconds`.
    not_after: Gauge,
}

impl Tls {
    /// Loads the configured certificate; with ACME on, the stored ACME certificate
    /// while it is valid; else creates or reuses the self-signed one.
    pub fn load(cfg: &Config) -> Result<Tls, TlsError> {
        let challenges = cfg.tls.acme_enabled().then(Challenges::new);
        let stored = if cfg.tls.cert.is_empty() && cfg.tls.acme_enabled() {
            stored_acme(&Store::new(&cfg.data_dir), challenges.as_ref())
        } else {
            None
        };
        let (cert_path, key_path, loaded) = match stored {
            Some(found) => found,
            None => {
                let (cert_path, key_path, kind) = if cfg.tls.cert.is_empty() {
                    let (c, k) = ensure_self_signed(cfg)?;
                    (c, k, CertKind::SelfSigned)
                } else {
                    (
                        PathBuf::from(&cfg.tls.cert),
                        PathBuf::from(&cfg.tls.key),
                        CertKind::Configured,
                    )
                };
                let loaded = load_pem_with(&cert_path, &key_path, kind, challenges.as_ref())?;
                (cert_path, key_path, loaded)
            }
        };
        let tls = Tls {
            current: ArcSwap::new(loaded.server_config.clone()),
            served: ArcSwap::new(Arc::new(Served {
                kind: loaded.kind,
                fingerprint: loaded.fingerprint.clone(),
                cert_path,
                key_path,
                leaf: loaded.leaf.clone(),
            })),
            challenges,
            not_after: Gauge::default(),
        };
        tls.not_after.set(loaded.not_after.unwrap_or(0));
        Ok(tls)
    }

    /// Re-reads the served certificate and key from disk; on error the old ones stay.
    pub fn reload(&self) -> Result<String, TlsError> {
        let served = self.served.load_full();
        self.install(&served.cert_path, &served.key_path, served.kind)
    }

    /// Loads `cert` and `key` and serves them to new connections from now on;
    /// returns the new fingerprint. On error nothing changes.
    pub fn install(&self, cert: &Path, key: &Path, kind: CertKind) -> Result<String, TlsError> {
        let loaded = load_pem_with(cert, key, kind, self.challenges.as_ref())?;
        self.current.store(loaded.server_config);
        self.served.store(Arc::new(Served {
            kind,
            fingerprint: loaded.fingerprint.clone(),
            cert_path: cert.to_path_buf(),
            key_path: key.to_path_buf(),
            leaf: loaded.leaf,
        }));
        self.not_after.set(loaded.not_after.unwrap_or(0));
        Ok(loaded.fingerprint)
    }

    /// The server config new connections should use.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.current.load_full()
    }

    /// Where the served certificate came from.
    pub fn kind(&self) -> CertKind {
        self.served.load().kind
    }

    pub fn fingerprint(&self) -> String {
        self.served.load().fingerprint.clone()
    }

    /// The served certificate's file.
    pub fn cert_path(&self) -> PathBuf {
        self.served.load().cert_path.clone()
    }

    /// The served leaf certificate (DER).
    pub fn leaf(&self) -> CertificateDer<'static> {
        self.served.load().leaf.clone()
    }

    /// Pending ACME challenge answers; `None` when ACME is off.
    pub fn challenges(&self) -> Option<Arc<Challenges>> {
        self.challenges.clone()
    }

    /// The served certificate's expiry as a Unix time (0 if unknown), for the registry.
    pub fn not_after_gauge(&self) -> Gauge {
        self.not_after.clone()
    }
}

/// The stored ACME certificate, when it loads, matches its key and is valid now.
/// Anything else is logged and left for the order task to replace.
fn stored_acme(
    store: &Store,
    challenges: Option<&Arc<Challenges>>,
) -> Option<(PathBuf, PathBuf, LoadedCert)> {
    if !store.has_certificate() {
        return None;
    }
    let (cert, key) = (store.cert_path(), store.key_path());
    match load_pem_with(&cert, &key, CertKind::Acme, challenges) {
        Ok(loaded) => {
            let now = crate::clock::unix_secs() as i64;
            match CertInfo::from_der(loaded.leaf.as_ref()) {
                Ok(info) if info.valid_at(now) => Some((cert, key, loaded)),
                Ok(_) => {
                    tracing::warn!(path = %cert.display(), "the stored ACME certificate has expired (or is not yet valid); not serving it");
                    None
                }
                Err(e) => {
                    tracing::warn!(path = %cert.display(), error = %e, "the stored ACME certificate is unusable");
                    None
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "the stored ACME certificate is unusable; a new one will be ordered");
            None
        }
    }
}

/// Installs ring as the process-wide rustls provider (idempotent).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Loads a PEM chain and key into a server config with ALPN h2 and http/1.1 (and the
/// TURN ids).
pub fn load_pem(cert: &Path, key: &Path, kind: CertKind) -> Result<LoadedCert, TlsError> {
    load_pem_with(cert, key, kind, None)
}

/// [`load_pem`], answering TLS-ALPN-01 validations from `challenges` when given.
pub fn load_pem_with(
    cert: &Path,
    key: &Path,
    kind: CertKind,
    challenges: Option<&Arc<Challenges>>,
) -> Result<LoadedCert, TlsError> {
    let certs = read_certs(cert)?;
    let key_der = read_key(key)?;
    let leaf = certs[0].clone();
    let fingerprint = fingerprint(&leaf);
    let not_after = CertInfo::from_der(leaf.as_ref()).ok().map(|i| i.not_after);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mismatch = |e: rustls::Error| TlsError::Mismatch {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        reason: e.to_string(),
    };
    let certified = CertifiedKey::from_der(certs, key_der, &provider).map_err(mismatch)?;
    let resolver = Resolver {
        cert: Arc::new(certified),
        challenges: challenges.cloned(),
    };
    let mut sc = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Generate(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    // The TURN ids (RFC 7443) first: rustls picks the first of these the client
    // offers, and a client that offers `stun.turn` is a TURN client even when it
    // offers `http/1.1` too (coturn's does). Browsers offer only h2 and http/1.1 for
    // pages, and no ALPN at all on `turns:` connections (see `demux`). `acme-tls/1`
    // last, and only with ACME on: the HTTPS listener closes such a connection after
    // its handshake.
    let mut alpn = vec![
        crate::demux::ALPN_TURN,
        crate::demux::ALPN_STUN,
        crate::demux::ALPN_H2,
        crate::demux::ALPN_HTTP11,
    ];
    if challenges.is_some() {
        alpn.push(crate::demux::ALPN_ACME_TLS);
    }
    sc.alpn_protocols = alpn.iter().map(|id| id.to_vec()).collect();
    Ok(LoadedCert {
        kind,
        fingerprint,
        server_config: Arc::new(sc),
        leaf,
        not_after,
    })
}

/// Picks the certificate for a handshake: the served one, or with ACME on a pending
/// TLS-ALPN-01 challenge certificate for a client that offers only `acme-tls/1`.
#[derive(Debug)]
struct Resolver {
    cert: Arc<CertifiedKey>,
    challenges: Option<Arc<Challenges>>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if let Some(challenges) = &self.challenges {
            if let Some(mut alpn) = hello.alpn() {
                let only_acme =
                    alpn.next() == Some(crate::demux::ALPN_ACME_TLS) && alpn.next().is_none();
                if only_acme {
                    // No certificate (a failed handshake) unless a challenge for this
                    // name is pending: RFC 8737 section 3.
                    return hello.server_name().and_then(|n| challenges.tls_alpn01(n));
                }
            }
        }
        Some(self.cert.clone())
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut bytes.as_slice()).collect();
    let certs = certs.map_err(|e| TlsError::Pem {
        path: path.to_path_buf(),
        reason: format!("bad PEM: {e}"),
    })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            reason: "no CERTIFICATE block found".into(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    rustls_pemfile::private_key(&mut bytes.as_slice())
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            reason: format!("bad PEM: {e}"),
        })?
        .ok_or_else(|| TlsError::Pem {
            path: path.to_path_buf(),
            reason: "no PRIVATE KEY block found".into(),
        })
}

/// SHA-256 of a DER certificate as colon-separated upper-case hex.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    let digest = Sha256::digest(cert.as_ref());
    digest
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Returns the paths of the self-signed pair under `data_dir`, generating it when absent.
fn ensure_self_signed(cfg: &Config) -> Result<(PathBuf, PathBuf), TlsError> {
    let dir = &cfg.data_dir;
    let cert = dir.join(SELF_SIGNED_CERT);
    let key = dir.join(SELF_SIGNED_KEY);
    if cert.exists() && key.exists() {
        return Ok((cert, key));
    }
    std::fs::create_dir_all(dir).map_err(|e| TlsError::Write {
        path: dir.clone(),
        reason: e.to_string(),
    })?;
    let names = self_signed_names(cfg);
    let mut params =
        rcgen::CertificateParams::new(names).map_err(|e| TlsError::Generate(e.to_string()))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "meshmeet self-signed");
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let key_pair = rcgen::KeyPair::generate().map_err(|e| TlsError::Generate(e.to_string()))?;
    let generated = params
        .self_signed(&key_pair)
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    write_private(&key, key_pair.serialize_pem().as_bytes())?;
    std::fs::write(&cert, generated.pem()).map_err(|e| TlsError::Write {
        path: cert.clone(),
        reason: e.to_string(),
    })?;
    Ok((cert, key))
}

/// Writes a file readable by its owner only.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |e: std::io::Error| TlsError::Write {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    f.write_all(bytes).map_err(err)
}

/// localhost, the host name, every local address, and `tls.self_signed_names`.
fn self_signed_names(cfg: &Config) -> Vec<String> {
    let mut names = vec!["localhost".to_string()];
    if let Some(h) = host_name() {
        names.push(h);
    }
    for ip in crate::net::local_ips() {
        names.push(ip.to_string());
    }
    for n in &cfg.tls.self_signed_names {
        names.push(n.trim_start_matches('[').trim_end_matches(']').to_string());
    }
    if !cfg.http.public_host.is_empty() {
        let h = &cfg.http.public_host;
        names.push(h.trim_start_matches('[').trim_end_matches(']').to_string());
    }
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

/// The machine's host name, if it is a usable DNS name.
pub fn host_name() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates on success
    // when the name fits, and we stop at the first NUL or the end regardless.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let h = std::str::from_utf8(&buf[..end]).ok()?.trim();
    (!h.is_empty() && crate::net::valid_host(h)).then(|| h.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg_in(dir: &Path) -> Config {
        let mut c = Config::default();
        c.data_dir = dir.to_path_buf();
        c
    }

    #[test]
    fn self_signed_is_persisted_and_reused() {
        install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let cfg = cfg_in(dir.path());
        let a = Tls::load(&cfg).unwrap();
        let b = Tls::load(&cfg).unwrap();
        assert_eq!(a.kind(), CertKind::SelfSigned);
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint().len(), 32 * 3 - 1);
        let key_mode = std::fs::metadata(dir.path().join(SELF_SIGNED_KEY))
            .unwrap()
            .permissions();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(key_mode.mode() & 0o777, 0o600);
    }

    #[test]
    fn bad_pem_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("c.pem");
        let key = dir.path().join("k.pem");
        std::fs::write(&cert, "not a pem").unwrap();
        std::fs::write(&key, "not a pem").unwrap();
        let err = load_pem(&cert, &key, CertKind::Configured)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("c.pem"), "{err}");
        let missing = dir.path().join("missing.pem");
        let err = load_pem(&missing, &key, CertKind::Configured)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("missing.pem"), "{err}");
    }

    #[test]
    fn mismatched_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = rcgen::generate_simple_self_signed(vec!["a.test".to_string()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["b.test".to_string()]).unwrap();
        let cert = dir.path().join("a.pem");
        let key = dir.path().join("b-key.pem");
        std::fs::write(&cert, a.cert.pem()).unwrap();
        std::fs::write(&key, b.signing_key.serialize_pem()).unwrap();
        let err = load_pem(&cert, &key, CertKind::Configured)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("do not match"), "{err}");
    }

    /// A chain and key under `data_dir/acme/`, valid from `from` to `to` days from now.
    fn store_acme(dir: &Path, from: i64, to: i64) -> String {
        let mut params = rcgen::CertificateParams::new(vec!["meet.test".to_string()]).unwrap();
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::days(from);
        params.not_after = now + time::Duration::days(to);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Store::new(dir)
            .save_certificate(&cert.pem(), &key.serialize_pem())
            .unwrap();
        fingerprint(cert.der())
    }

    fn acme_cfg(dir: &Path) -> Config {
        let mut c = cfg_in(dir);
        c.tls.acme_domains = vec!["meet.test".into()];
        c
    }

    #[test]
    fn a_valid_stored_acme_certificate_is_served_from_the_start() {
        install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        // Nothing stored yet: the self-signed one, with challenge answers ready.
        let tls = Tls::load(&acme_cfg(dir.path())).unwrap();
        assert_eq!(tls.kind(), CertKind::SelfSigned);
        assert!(tls.challenges().is_some());
        let alpn = &tls.server_config().alpn_protocols;
        assert_eq!(
            alpn.last().map(Vec::as_slice),
            Some(crate::demux::ALPN_ACME_TLS)
        );
        // Stored and valid: served.
        let fp = store_acme(dir.path(), -1, 60);
        let tls = Tls::load(&acme_cfg(dir.path())).unwrap();
        assert_eq!(tls.kind(), CertKind::Acme);
        assert_eq!(tls.fingerprint(), fp);
        assert_eq!(tls.cert_path(), Store::new(dir.path()).cert_path());
        assert!(tls.not_after_gauge().get() > crate::clock::unix_secs() as i64);
        // Without ACME there are no challenge answers and no acme-tls/1.
        let plain = Tls::load(&cfg_in(dir.path())).unwrap();
        assert!(plain.challenges().is_none());
        assert!(!plain
            .server_config()
            .alpn_protocols
            .iter()
            .any(|p| p == crate::demux::ALPN_ACME_TLS));
    }

    #[test]
    fn an_expired_or_damaged_stored_certificate_is_not_served() {
        install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        store_acme(dir.path(), -30, -1);
        assert_eq!(
            Tls::load(&acme_cfg(dir.path())).unwrap().kind(),
            CertKind::SelfSigned
        );
        // A chain with another certificate's key (a crash between the two renames).
        store_acme(dir.path(), -1, 60);
        let other = rcgen::KeyPair::generate().unwrap();
        std::fs::write(Store::new(dir.path()).key_path(), other.serialize_pem()).unwrap();
        assert_eq!(
            Tls::load(&acme_cfg(dir.path())).unwrap().kind(),
            CertKind::SelfSigned
        );
    }

    #[test]
    fn install_swaps_what_new_connections_get() {
        install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let tls = Tls::load(&acme_cfg(dir.path())).unwrap();
        let before = tls.server_config();
        let fp = store_acme(dir.path(), -1, 60);
        let store = Store::new(dir.path());
        assert_eq!(
            tls.install(&store.cert_path(), &store.key_path(), CertKind::Acme)
                .unwrap(),
            fp
        );
        assert_eq!(tls.kind(), CertKind::Acme);
        assert!(!Arc::ptr_eq(&before, &tls.server_config()));
        // A failed install changes nothing.
        std::fs::write(store.cert_path(), "junk").unwrap();
        assert!(tls
            .install(&store.cert_path(), &store.key_path(), CertKind::Acme)
            .is_err());
        assert_eq!(tls.fingerprint(), fp);
    }
}
