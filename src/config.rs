//! One typed [`Config`], loaded once at start: compiled-in defaults, then the TOML
//! file, then `MESHMEET__SECTION__KEY` environment overrides. Unknown keys and invalid
//! values are errors that name the key.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// A configuration problem, always naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("config: {0}")]
    Parse(String),
    #[error("config key `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// State: generated certificate, generated secrets.
    pub data_dir: PathBuf,
    pub http: HttpConfig,
    pub tls: TlsConfig,
    pub log: LogConfig,
    pub rooms: RoomsConfig,
    pub turn: TurnConfig,
    pub ice: IceConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: String,
    /// Plain HTTP listener that 301-redirects to HTTPS; empty = off.
    pub redirect_listen: String,
    /// Host name or IP clients use; empty = taken from each request's Host header.
    pub public_host: String,
    /// Extra origins allowed to open `/ws`; the server's own origin always is.
    pub allowed_origins: Vec<String>,
    /// Networks allowed to read `/metrics`.
    pub metrics_allow: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: String,
    pub key: String,
    pub self_signed_names: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub level: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoomsConfig {
    pub capacity: usize,
    pub password: String,
    pub resume_grace_s: u64,
    pub max_message_bytes: usize,
    pub rate_per_s: u32,
    pub rate_burst: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TurnConfig {
    pub enabled: bool,
    pub listen: String,
    pub tls_listen: String,
    pub relay_ips: Vec<String>,
    pub external_ips: Vec<String>,
    pub relay_ports: String,
    pub realm: String,
    pub secret: String,
    pub credential_ttl_s: u64,
    pub max_allocation_lifetime_s: u64,
    pub user_allocation_quota: usize,
    pub total_allocation_quota: usize,
    pub max_bps: u64,
    pub allowed_peer_ranges: Vec<String>,
    /// Static long-term users (name = password) for tools and tests.
    pub users: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IceConfig {
    pub force_relay: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("data"),
            http: HttpConfig::default(),
            tls: TlsConfig::default(),
            log: LogConfig::default(),
            rooms: RoomsConfig::default(),
            turn: TurnConfig::default(),
            ice: IceConfig::default(),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "0.0.0.0:8443".into(),
            redirect_listen: String::new(),
            public_host: String::new(),
            allowed_origins: Vec::new(),
            metrics_allow: vec!["127.0.0.0/8".into(), "::1/128".into()],
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
        }
    }
}

impl Default for RoomsConfig {
    fn default() -> Self {
        RoomsConfig {
            capacity: 6,
            password: String::new(),
            resume_grace_s: 20,
            max_message_bytes: 65536,
            rate_per_s: 50,
            rate_burst: 200,
        }
    }
}

impl Default for TurnConfig {
    fn default() -> Self {
        TurnConfig {
            enabled: true,
            listen: "0.0.0.0:3478".into(),
            tls_listen: "0.0.0.0:5349".into(),
            relay_ips: Vec::new(),
            external_ips: Vec::new(),
            relay_ports: "49152-65535".into(),
            realm: "meshmeet".into(),
            secret: String::new(),
            credential_ttl_s: 3600,
            max_allocation_lifetime_s: 3600,
            user_allocation_quota: 10,
            total_allocation_quota: 2000,
            max_bps: 0,
            allowed_peer_ranges: Vec::new(),
            users: BTreeMap::new(),
        }
    }
}

/// Keys whose environment value is a comma-separated list.
const LIST_KEYS: &[&str] = &[
    "http.allowed_origins",
    "http.metrics_allow",
    "tls.self_signed_names",
    "turn.relay_ips",
    "turn.external_ips",
    "turn.allowed_peer_ranges",
];

impl Config {
    /// Loads defaults, then `path` (if given; it must exist), then the environment
    /// (`MESHMEET__SECTION__KEY`), and validates the result.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let vars: Vec<(String, String)> = std::env::vars().collect();
        Self::load_with_env(path, vars)
    }

    /// [`Config::load`] with an explicit environment, for tests.
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(path) = path {
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
            builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
        }
        let env_map: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("MESHMEET__"))
            .collect();
        let mut env_source = config::Environment::with_prefix("MESHMEET")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .source(Some(env_map));
        for key in LIST_KEYS {
            env_source = env_source.with_list_parse_key(key);
        }
        let built = builder
            .add_source(env_source)
            .build()
            .map_err(|e| ConfigError::Parse(e.to_string()))?;
        let cfg: Config = built
            .try_deserialize()
            .map_err(|e| ConfigError::Parse(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every value; the error names the first offending key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        parse_addr("http.listen", &self.http.listen)?;
        if !self.http.redirect_listen.is_empty() {
            parse_addr("http.redirect_listen", &self.http.redirect_listen)?;
        }
        if !self.http.public_host.is_empty() && !valid_host(&self.http.public_host) {
            return Err(invalid(
                "http.public_host",
                "must be a host name or IP address without scheme, port or path",
            ));
        }
        for origin in &self.http.allowed_origins {
            if !(origin.starts_with("https://") || origin.starts_with("http://"))
                || origin.trim_end_matches('/').matches('/').count() != 2
            {
                return Err(invalid(
                    "http.allowed_origins",
                    format!("`{origin}` is not an origin like https://example.org"),
                ));
            }
        }
        parse_nets("http.metrics_allow", &self.http.metrics_allow)?;
        if self.tls.cert.is_empty() != self.tls.key.is_empty() {
            return Err(invalid(
                if self.tls.cert.is_empty() {
                    "tls.cert"
                } else {
                    "tls.key"
                },
                "tls.cert and tls.key must be set together (or both empty for a self-signed certificate)",
            ));
        }
        for name in &self.tls.self_signed_names {
            if !valid_host(name) {
                return Err(invalid(
                    "tls.self_signed_names",
                    format!("`{name}` is not a host name or IP address"),
                ));
            }
        }
        if !valid_log_filter(&self.log.level) {
            return Err(invalid(
                "log.level",
                "expected a level (error, warn, info, debug, trace) or a filter directive",
            ));
        }
        let r = &self.rooms;
        if !(2..=50).contains(&r.capacity) {
            return Err(invalid("rooms.capacity", "must be between 2 and 50"));
        }
        if r.password.chars().count() > 256 {
            return Err(invalid("rooms.password", "at most 256 characters"));
        }
        if r.resume_grace_s > 3600 {
            return Err(invalid("rooms.resume_grace_s", "at most 3600"));
        }
        if !(1024..=16 * 1024 * 1024).contains(&r.max_message_bytes) {
            return Err(invalid(
                "rooms.max_message_bytes",
                "must be between 1024 and 16777216",
            ));
        }
        if !(1..=10_000_000).contains(&r.rate_per_s) {
            return Err(invalid(
                "rooms.rate_per_s",
                "must be between 1 and 10000000",
            ));
        }
        if !(1..=10_000_000).contains(&r.rate_burst) {
            return Err(invalid(
                "rooms.rate_burst",
                "must be between 1 and 10000000",
            ));
        }
        let t = &self.turn;
        parse_addr("turn.listen", &t.listen)?;
        if !t.tls_listen.is_empty() {
            parse_addr("turn.tls_listen", &t.tls_listen)?;
        }
        let relay_ips = parse_ips("turn.relay_ips", &t.relay_ips)?;
        check_one_per_family("turn.relay_ips", &relay_ips)?;
        let external_ips = parse_ips("turn.external_ips", &t.external_ips)?;
        check_one_per_family("turn.external_ips", &external_ips)?;
        self.relay_port_range()?;
        if t.realm.is_empty() || t.realm.len() > 127 || t.realm.chars().any(char::is_control) {
            return Err(invalid(
                "turn.realm",
                "must be 1 to 127 characters without control characters",
            ));
        }
        if !t.secret.is_empty() && t.secret.len() < 16 {
            return Err(invalid(
                "turn.secret",
                "must be at least 16 characters (or empty to generate one)",
            ));
        }
        if !(60..=7 * 86400).contains(&t.credential_ttl_s) {
            return Err(invalid(
                "turn.credential_ttl_s",
                "must be between 60 and 604800",
            ));
        }
        if !(600..=86400).contains(&t.max_allocation_lifetime_s) {
            return Err(invalid(
                "turn.max_allocation_lifetime_s",
                "must be between 600 and 86400",
            ));
        }
        if t.user_allocation_quota == 0 {
            return Err(invalid("turn.user_allocation_quota", "must be at least 1"));
        }
        if t.total_allocation_quota == 0 {
            return Err(invalid("turn.total_allocation_quota", "must be at least 1"));
        }
        parse_nets("turn.allowed_peer_ranges", &t.allowed_peer_ranges)?;
        for (user, pass) in &t.users {
            if user.is_empty() || user.len() > 128 || user.contains(':') {
                return Err(invalid(
                    "turn.users",
                    format!("user name `{user}` must be 1 to 128 characters without `:`"),
                ));
            }
            if pass.is_empty() {
                return Err(invalid(
                    "turn.users",
                    format!("user `{user}` has an empty password"),
                ));
            }
        }
        Ok(())
    }

    /// `http.listen` as an address (validated at load).
    pub fn http_listen(&self) -> Result<SocketAddr, ConfigError> {
        parse_addr("http.listen", &self.http.listen)
    }

    /// `http.redirect_listen`, `None` when off.
    pub fn redirect_listen(&self) -> Result<Option<SocketAddr>, ConfigError> {
        opt_addr("http.redirect_listen", &self.http.redirect_listen)
    }

    pub fn metrics_allow(&self) -> Result<Vec<IpNet>, ConfigError> {
        parse_nets("http.metrics_allow", &self.http.metrics_allow)
    }

    pub fn turn_listen(&self) -> Result<SocketAddr, ConfigError> {
        parse_addr("turn.listen", &self.turn.listen)
    }

    /// `turn.tls_listen`, `None` when off.
    pub fn turn_tls_listen(&self) -> Result<Option<SocketAddr>, ConfigError> {
        opt_addr("turn.tls_listen", &self.turn.tls_listen)
    }

    pub fn relay_ips(&self) -> Result<Vec<IpAddr>, ConfigError> {
        parse_ips("turn.relay_ips", &self.turn.relay_ips)
    }

    pub fn external_ips(&self) -> Result<Vec<IpAddr>, ConfigError> {
        parse_ips("turn.external_ips", &self.turn.external_ips)
    }

    pub fn allowed_peer_ranges(&self) -> Result<Vec<IpNet>, ConfigError> {
        parse_nets("turn.allowed_peer_ranges", &self.turn.allowed_peer_ranges)
    }

    /// `turn.relay_ports` as an inclusive range.
    pub fn relay_port_range(&self) -> Result<(u16, u16), ConfigError> {
        let key = "turn.relay_ports";
        let s = self.turn.relay_ports.trim();
        let (lo, hi) = s
            .split_once('-')
            .ok_or_else(|| invalid(key, "expected LOW-HIGH, e.g. 49152-65535"))?;
        let lo: u16 = lo
            .trim()
            .parse()
            .map_err(|_| invalid(key, "LOW is not a port number"))?;
        let hi: u16 = hi
            .trim()
            .parse()
            .map_err(|_| invalid(key, "HIGH is not a port number"))?;
        if lo == 0 || lo > hi {
            return Err(invalid(key, "expected 1 <= LOW <= HIGH <= 65535"));
        }
        Ok((lo, hi))
    }

    /// The effective config as TOML with every secret redacted.
    pub fn redacted_toml(&self) -> String {
        let mut c = self.clone();
        redact(&mut c.rooms.password);
        redact(&mut c.turn.secret);
        for pass in c.turn.users.values_mut() {
            redact(pass);
        }
        toml::to_string_pretty(&c).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

fn redact(s: &mut String) {
    if !s.is_empty() {
        *s = "<redacted>".into();
    }
}

fn parse_addr(key: &'static str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.trim().parse().map_err(|_| {
        invalid(
            key,
            format!("`{s}` is not an address like 0.0.0.0:8443 or [::]:8443"),
        )
    })
}

fn opt_addr(key: &'static str, s: &str) -> Result<Option<SocketAddr>, ConfigError> {
    if s.trim().is_empty() {
        Ok(None)
    } else {
        parse_addr(key, s).map(Some)
    }
}

fn parse_ips(key: &'static str, list: &[String]) -> Result<Vec<IpAddr>, ConfigError> {
    list.iter()
        .map(|s| {
            s.trim()
                .parse()
                .map_err(|_| invalid(key, format!("`{s}` is not an IP address")))
        })
        .collect()
}

fn check_one_per_family(key: &'static str, ips: &[IpAddr]) -> Result<(), ConfigError> {
    let v4 = ips.iter().filter(|ip| ip.is_ipv4()).count();
    let v6 = ips.len() - v4;
    if v4 > 1 || v6 > 1 {
        return Err(invalid(key, "at most one IPv4 and one IPv6 address"));
    }
    Ok(())
}

fn parse_nets(key: &'static str, list: &[String]) -> Result<Vec<IpNet>, ConfigError> {
    list.iter()
        .map(|s| {
            let s = s.trim();
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| invalid(key, format!("`{s}` is not a CIDR range like 10.0.0.0/8")))
        })
        .collect()
}

/// `info`, or directives like `meshmeet=debug,warn`.
fn valid_log_filter(s: &str) -> bool {
    const LEVELS: &[&str] = &["off", "error", "warn", "info", "debug", "trace"];
    !s.trim().is_empty()
        && s.split(',').all(|d| {
            let d = d.trim();
            match d.split_once('=') {
                None => LEVELS.contains(&d.to_ascii_lowercase().as_str()),
                Some((target, level)) => {
                    !target.is_empty()
                        && target
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-'))
                        && LEVELS.contains(&level.to_ascii_lowercase().as_str())
                }
            }
        })
}

/// A bare host name or IP address (IPv6 with or without brackets).
pub fn valid_host(s: &str) -> bool {
    if s.is_empty() || s.len() > 253 {
        return false;
    }
    let bare = s.trim_start_matches('[').trim_end_matches(']');
    if bare.parse::<IpAddr>().is_ok() {
        return true;
    }
    s.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            && !label.starts_with('-')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn write(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::load_with_env(None, env(&[])).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.http_listen().unwrap().port(), 8443);
        assert_eq!(c.relay_port_range().unwrap(), (49152, 65535));
    }

    #[test]
    fn shipped_config_file_equals_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/meshmeet.toml");
        let c = Config::load_with_env(Some(&path), env(&[])).unwrap();
        assert_eq!(c, Config::default());
        // Every key is present in the file (it documents all of them).
        let text = std::fs::read_to_string(&path).unwrap();
        let doc: toml::Table = text.parse().unwrap();
        let defaults: toml::Table = toml::to_string(&Config::default())
            .unwrap()
            .parse()
            .unwrap();
        for (section, value) in &defaults {
            match value {
                toml::Value::Table(t) => {
                    for key in t.keys() {
                        let in_doc = doc
                            .get(section)
                            .and_then(|s| s.as_table())
                            .is_some_and(|s| s.contains_key(key));
                        assert!(in_doc, "config/meshmeet.toml lacks {section}.{key}");
                    }
                }
                _ => assert!(doc.contains_key(section), "lacks {section}"),
            }
        }
    }

    #[test]
    fn file_values_are_used() {
        let f = write("[http]\nlisten = \"127.0.0.1:9000\"\n[rooms]\ncapacity = 4\n");
        let c = Config::load_with_env(Some(f.path()), env(&[])).unwrap();
        assert_eq!(c.http.listen, "127.0.0.1:9000");
        assert_eq!(c.rooms.capacity, 4);
        assert_eq!(c.rooms.resume_grace_s, 20);
    }

    #[test]
    fn env_overrides_file() {
        let f = write("[rooms]\ncapacity = 4\n");
        let c = Config::load_with_env(
            Some(f.path()),
            env(&[
                ("MESHMEET__ROOMS__CAPACITY", "8"),
                ("MESHMEET__TURN__SECRET", "0123456789abcdef0123"),
                (
                    "MESHMEET__HTTP__ALLOWED_ORIGINS",
                    "https://a.example,https://b.example",
                ),
                ("MESHMEET__DATA_DIR", "/var/lib/meshmeet"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.rooms.capacity, 8);
        assert_eq!(c.turn.secret, "0123456789abcdef0123");
        assert_eq!(
            c.http.allowed_origins,
            vec!["https://a.example", "https://b.example"]
        );
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/meshmeet"));
    }

    #[test]
    fn unknown_key_is_named() {
        let f = write("[rooms]\ncapacityy = 4\n");
        let err = Config::load_with_env(Some(f.path()), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("capacityy"), "{err}");
        let f = write("bogus = 1\n");
        let err = Config::load_with_env(Some(f.path()), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("bogus"), "{err}");
        let err = Config::load_with_env(None, env(&[("MESHMEET__HTTP__LISTN", "x")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("listn"), "{err}");
    }

    #[test]
    fn invalid_values_are_named() {
        let cases = [
            ("[http]\nlisten = \"nope\"\n", "http.listen"),
            ("[rooms]\ncapacity = 1\n", "rooms.capacity"),
            ("[rooms]\ncapacity = \"six\"\n", "capacity"),
            ("[turn]\nrelay_ports = \"5000-4000\"\n", "turn.relay_ports"),
            ("[turn]\nsecret = \"short\"\n", "turn.secret"),
            (
                "[turn]\nallowed_peer_ranges = [\"10.0.0.0/33\"]\n",
                "turn.allowed_peer_ranges",
            ),
            (
                "[turn]\nrelay_ips = [\"1.2.3.4\", \"5.6.7.8\"]\n",
                "turn.relay_ips",
            ),
            ("[tls]\ncert = \"a.pem\"\n", "tls.key"),
            (
                "[http]\nmetrics_allow = [\"everyone\"]\n",
                "http.metrics_allow",
            ),
            (
                "[http]\nallowed_origins = [\"example.org\"]\n",
                "http.allowed_origins",
            ),
            ("[log]\nlevel = \"loud!!\"\n", "log.level"),
        ];
        for (text, key) in cases {
            let f = write(text);
            let err = Config::load_with_env(Some(f.path()), env(&[]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn missing_file_is_an_error() {
        let err = Config::load_with_env(Some(Path::new("/nonexistent/m.toml")), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/m.toml"), "{err}");
    }

    #[test]
    fn high_rates_are_accepted_for_benchmarks() {
        let f = write("[rooms]\nrate_per_s = 1000000\nrate_burst = 1000000\n");
        Config::load_with_env(Some(f.path()), env(&[])).unwrap();
    }

    #[test]
    fn redaction_hides_secrets() {
        let mut c = Config::default();
        c.turn.secret = "supersecretvalue1234".into();
        c.rooms.password = "hunter2".into();
        c.turn.users.insert("alice".into(), "pw-alice".into());
        let text = c.redacted_toml();
        assert!(!text.contains("supersecretvalue1234"));
        assert!(!text.contains("hunter2"));
        assert!(!text.contains("pw-alice"));
        assert!(text.contains("alice"));
    }

    #[test]
    fn log_filters() {
        assert!(valid_log_filter("info"));
        assert!(valid_log_filter("meshmeet=debug,warn"));
        assert!(!valid_log_filter("loud"));
        assert!(!valid_log_filter(""));
    }

    #[test]
    fn hosts() {
        assert!(valid_host("example.org"));
        assert!(valid_host("[::1]"));
        assert!(valid_host("10.0.0.1"));
        assert!(!valid_host("https://x"));
        assert!(!valid_host("a:443"));
    }
}
