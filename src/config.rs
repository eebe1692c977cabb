//! One typed [`Config`], loaded once at start: compiled-in defaults, then the TOML
//! file, then `MESHMEET__SECTION__KEY` environment overrides. Addresses, networks and
//! port ranges are parsed while loading, so the rest of the program only sees typed
//! values; unknown keys and invalid values are errors that name the key. Secrets are
//! [`Secret`]s, which never print.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::net::valid_host;
use crate::secret::Secret;

/// A configuration problem, always naming the key at fault when there is one.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("config: {0}")]
    Parse(String),
    #[error("config key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
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
    pub cluster: ClusterConfig,
}

/// `[cluster]`: several nodes sharing rooms through NATS (docs/CLUSTER.md). An empty
/// `nats_url` is a single node, exactly as without this section.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// `nats://host:port` or `tls://host:port`; empty = no cluster.
    pub nats_url: String,
    /// Unique per node; empty = the host name.
    pub node_name: String,
    /// NATS user and password (both or neither), or a token (not both kinds).
    pub nats_user: String,
    pub nats_password: Secret,
    pub nats_token: Secret,
    /// PEM file of the CA that signed the NATS server's certificate (`tls://` URLs).
    pub nats_ca: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    #[serde(with = "addr")]
    pub listen: SocketAddr,
    /// Plain HTTP listener that 301-redirects to HTTPS; `None` (empty in TOML) = off.
    #[serde(with = "opt_addr")]
    pub redirect_listen: Option<SocketAddr>,
    /// Host name or IP clients use; empty = taken from each request's Host header.
    pub public_host: String,
    /// Extra origins allowed to open `/ws`; the server's own origin always is.
    pub allowed_origins: Vec<String>,
    /// Networks allowed to read `/metrics`.
    #[serde(with = "nets")]
    pub metrics_allow: Vec<IpNet>,
    /// HTTPS connections (WebSockets included) open at once, in total and from one
    /// client address; more are closed at once.
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// Seconds for the TLS handshake, and for each request's headers to arrive whole.
    pub handshake_timeout_s: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM chain and key; both empty = a self-signed certificate under `data_dir`.
    pub cert: String,
    pub key: String,
    pub self_signed_names: Vec<String>,
    /// Names (DNS names, or IP addresses where the CA issues for them) to obtain and
    /// renew a certificate for by ACME; empty = ACME off.
    pub acme_domains: Vec<String>,
    /// Contact for the CA account; empty = none.
    pub acme_email: String,
    /// The CA's ACME directory URL; empty = Let's Encrypt production.
    pub acme_directory: String,
    /// PEM file with an extra root to trust for the directory's own HTTPS.
    pub acme_directory_ca: String,
    /// Which challenge proves control of the names.
    pub acme_challenge: AcmeChallenge,
    /// Certificate profile to ask the CA for (e.g. `shortlived`); empty = the CA's default.
    pub acme_profile: String,
    /// Renew this many seconds before expiry; 0 = per the CA's renewal information,
    /// else at two thirds of the lifetime.
    pub acme_renew_before_s: u64,
    /// Seconds before the first retry after a failed order; doubles on each failure.
    pub acme_retry_s: u64,
}

/// How a certificate order proves control of its names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AcmeChallenge {
    /// TLS-ALPN-01 when the CA offers it, else HTTP-01 when `http.redirect_listen` is on.
    #[default]
    #[serde(rename = "auto")]
    Auto,
    /// TLS-ALPN-01 (RFC 8737) on the HTTPS listener (the CA connects to port 443).
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
    /// HTTP-01 on `http.redirect_listen` (the CA connects to port 80).
    #[serde(rename = "http-01")]
    Http01,
}

impl fmt::Display for AcmeChallenge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AcmeChallenge::Auto => "auto",
            AcmeChallenge::TlsAlpn01 => "tls-alpn-01",
            AcmeChallenge::Http01 => "http-01",
        })
    }
}

/// Default of `tls.acme_retry_s`.
pub const ACME_RETRY_S: u64 = 120;
/// Most names one ACME certificate may hold (Let's Encrypt's limit).
pub const MAX_ACME_DOMAINS: usize = 100;

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert: String::new(),
            key: String::new(),
            self_signed_names: Vec::new(),
            acme_domains: Vec::new(),
            acme_email: String::new(),
            acme_directory: String::new(),
            acme_directory_ca: String::new(),
            acme_challenge: AcmeChallenge::Auto,
            acme_profile: String::new(),
            acme_renew_before_s: 0,
            acme_retry_s: ACME_RETRY_S,
        }
    }
}

impl TlsConfig {
    /// Whether certificates come from ACME.
    pub fn acme_enabled(&self) -> bool {
        !self.acme_domains.is_empty()
    }
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
    /// Empty = rooms need no password.
    pub password: Secret,
    pub resume_grace_s: u64,
    pub max_message_bytes: usize,
    pub rate_per_s: u32,
    pub rate_burst: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TurnConfig {
    pub enabled: bool,
    #[serde(with = "addr")]
    pub listen: SocketAddr,
    /// A separate TURN-over-TLS listener; `None` (empty in TOML, the default) = off.
    /// Clients are handed TLS on the shared HTTPS port instead; this one serves
    /// clients configured by hand, and TLS when `share_https_port` is off.
    #[serde(with = "opt_addr")]
    pub tls_listen: Option<SocketAddr>,
    /// Serve TURN over TCP and over TLS on the HTTPS listener too (`http.listen`),
    /// told apart from HTTPS per connection.
    pub share_https_port: bool,
    /// More UDP listeners for STUN and TURN (e.g. the HTTPS port number, for networks
    /// that let out only port 443).
    #[serde(with = "addrs")]
    pub extra_udp_listen: Vec<SocketAddr>,
    /// At most one IPv4 and one IPv6 address (checked by [`Config::validate`]).
    #[serde(with = "ips")]
    pub relay_ips: Vec<IpAddr>,
    #[serde(with = "ips")]
    pub external_ips: Vec<IpAddr>,
    pub relay_ports: PortRange,
    pub realm: String,
    /// Empty = generated on first start and kept under `data_dir`.
    pub secret: Secret,
    pub credential_ttl_s: u64,
    pub max_allocation_lifetime_s: u64,
    /// 0 = derived from the room capacity: see [`Config::user_allocation_quota`].
    pub user_allocation_quota: usize,
    pub total_allocation_quota: usize,
    pub max_bps: u64,
    #[serde(with = "nets")]
    pub allowed_peer_ranges: Vec<IpNet>,
    /// TURN over TCP and TLS connections open at once, in total and from one client
    /// address; more are closed at once.
    pub max_stream_connections: usize,
    pub max_stream_connections_per_ip: usize,
    /// Seconds for the TLS handshake, for the first message of a TURN TCP/TLS
    /// connection, and for each later message once its first byte arrived.
    pub stream_message_timeout_s: u64,
    /// Static long-term users (name = password) for tools and tests.
    pub users: BTreeMap<String, Secret>,
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
            cluster: ClusterConfig::default(),
        }
    }
}

impl ClusterConfig {
    pub fn enabled(&self) -> bool {
        !self.nats_url.is_empty()
    }

    /// The node's name: `node_name`, or the host name made a valid one (characters
    /// other than letters, digits, `-` and `_` become `_`), or `node` without one.
    pub fn effective_node_name(&self) -> String {
        if !self.node_name.is_empty() {
            return self.node_name.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .or_else(|_| std::fs::read_to_string("/etc/hostname"))
            .unwrap_or_default();
        let name: String = host
            .trim()
            .chars()
            .take(64)
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        if name.is_empty() {
            "node".into()
        } else {
            name
        }
    }

    fn validate(&self, turn: &TurnConfig) -> Result<(), ConfigError> {
        if !self.node_name.is_empty() && !valid_node_name(&self.node_name) {
            return Err(invalid(
                "cluster.node_name",
                "must be 1 to 64 letters, digits, `-` or `_` (it is a NATS subject token)",
            ));
        }
        if !self.enabled() {
            return Ok(());
        }
        check_nats_url(&self.nats_url).map_err(|e| invalid("cluster.nats_url", e))?;
        if self.nats_user.is_empty() != self.nats_password.is_empty() {
            return Err(invalid(
                if self.nats_user.is_empty() {
                    "cluster.nats_user"
                } else {
                    "cluster.nats_password"
                },
                "nats_user and nats_password go together",
            ));
        }
        if self.nats_user.chars().any(char::is_control) || self.nats_user.len() > 256 {
            return Err(invalid(
                "cluster.nats_user",
                "at most 256 bytes without control characters",
            ));
        }
        if !self.nats_user.is_empty() && !self.nats_token.is_empty() {
            return Err(invalid(
                "cluster.nats_token",
                "use either a token or nats_user and nats_password, not both",
            ));
        }
        if !self.nats_ca.is_empty() {
            if !self.nats_url.to_ascii_lowercase().starts_with("tls://") {
                return Err(invalid(
                    "cluster.nats_ca",
                    "is used for tls:// NATS URLs only; make nats_url tls://",
                ));
            }
            check_ca_file(Path::new(&self.nats_ca)).map_err(|e| invalid("cluster.nats_ca", e))?;
        }
        if turn.enabled && turn.secret.is_empty() {
            return Err(invalid(
                "turn.secret",
                "a cluster needs the same turn.secret on every node (each would generate its \
                 own otherwise, and credentials from one node would fail on the others)",
            ));
        }
        Ok(())
    }
}

/// A node name: 1 to 64 of `A-Z a-z 0-9 - _`.
pub fn valid_node_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// `nats://host[:port]` or `tls://host[:port]`, without credentials or a path.
fn check_nats_url(url: &str) -> Result<(), String> {
    let lower = url.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("nats://")
        .or_else(|| lower.strip_prefix("tls://"))
        .ok_or_else(|| format!("`{url}` is not a nats:// or tls:// URL"))?;
    if rest.contains('@') {
        return Err(
            "credentials go in cluster.nats_user/nats_password or nats_token, \
                    not in the URL"
                .into(),
        );
    }
    if rest.contains('/') || rest.contains(',') || rest.chars().any(char::is_whitespace) {
        return Err(format!(
            "`{url}` must be one server, scheme://host[:port], without a path"
        ));
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(':') && (!h.contains(':') || h.starts_with('[')) => {
            (h, Some(p))
        }
        _ => (rest, None),
    };
    if host.is_empty() || !valid_host(host.trim_start_matches('[').trim_end_matches(']')) {
        return Err(format!("`{url}` names no valid host"));
    }
    if let Some(p) = port {
        if p.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(format!("`{url}` has an invalid port"));
        }
    }
    Ok(())
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 8443)),
            redirect_listen: None,
            public_host: String::new(),
            allowed_origins: Vec::new(),
            metrics_allow: vec![
                IpNet::new_assert(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8),
                IpNet::new_assert(IpAddr::V6(Ipv6Addr::LOCALHOST), 128),
            ],
            max_connections: 4096,
            max_connections_per_ip: 256,
            handshake_timeout_s: 10,
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
            password: Secret::default(),
            resume_grace_s: 20,
            max_message_bytes: 65536,
            rate_per_s: 50,
            rate_burst: 200,
        }
    }
}

/// Most extra UDP listeners `turn.extra_udp_listen` may name.
pub const MAX_EXTRA_UDP_LISTEN: usize = 8;

impl Default for TurnConfig {
    fn default() -> Self {
        TurnConfig {
            enabled: true,
            listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 3478)),
            tls_listen: None,
            share_https_port: true,
            extra_udp_listen: Vec::new(),
            relay_ips: Vec::new(),
            external_ips: Vec::new(),
            relay_ports: PortRange {
                first: 49152,
                last: 65535,
            },
            realm: "meshmeet".into(),
            secret: Secret::default(),
            credential_ttl_s: 3600,
            max_allocation_lifetime_s: 3600,
            user_allocation_quota: 0,
            total_allocation_quota: 2000,
            max_bps: 0,
            allowed_peer_ranges: Vec::new(),
            max_stream_connections: 4096,
            max_stream_connections_per_ip: 256,
            stream_message_timeout_s: 10,
            users: BTreeMap::new(),
        }
    }
}

/// Keys whose environment value is a comma-separated list.
const LIST_KEYS: &[&str] = &[
    "http.allowed_origins",
    "http.metrics_allow",
    "tls.self_signed_names",
    "tls.acme_domains",
    "turn.relay_ips",
    "turn.external_ips",
    "turn.allowed_peer_ranges",
];

/// Prefix of the environment overrides (`MESHMEET__SECTION__KEY`).
const ENV_PREFIX: &str = "MESHMEET__";

impl Config {
    /// Loads defaults, then `path` (if given; it must exist), then the environment
    /// (`MESHMEET__SECTION__KEY`), and validates the result.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let vars: Vec<(String, String)> = std::env::vars().collect();
        Self::load_with_env(path, vars)
    }

    /// [`Config::load`] with an explicit environment, for tests.
    ///
    /// Environment values are taken as text, as a TOML string would be, and converted
    /// by the key's type (so a digits-only secret or password stays exactly as
    /// written); list keys (`http.allowed_origins`, `turn.relay_ips`, ...) are split at
    /// commas, and an empty value is an empty list.
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
        for (name, value) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let key = rest.to_ascii_lowercase().replace("__", ".");
            if key.is_empty() {
                return Err(ConfigError::Parse(format!(
                    "environment variable {name} names no key"
                )));
            }
            let set = if LIST_KEYS.contains(&key.as_str()) {
                let items: Vec<String> = if value.trim().is_empty() {
                    Vec::new()
                } else {
                    value.split(',').map(|s| s.trim().to_string()).collect()
                };
                builder.set_override(key.as_str(), items)
            } else {
                builder.set_override(key.as_str(), value)
            };
            builder =
                set.map_err(|e| ConfigError::Parse(format!("environment variable {name}: {e}")))?;
        }
        let cfg: Config = builder
            .build()
            .and_then(|built| built.try_deserialize())
            .map_err(from_loader)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what the types alone do not (ranges, combinations); the error names the
    /// first offending key.
    /// Allocations one TURN username (one participant's credentials) may hold: the
    /// configured `turn.user_allocation_quota`, or when that is 0, what a participant
    /// in a full room needs: one connection to each of the other `capacity - 1`
    /// members, one allocation per TURN URL handed out on each (the client bundles
    /// all media on one transport), tripled: an ICE restart allocates anew while the
    /// old allocations are still held, and Firefox restarting all its connections
    /// at once was measured to need more than twice the set.
    pub fn user_allocation_quota(&self) -> usize {
        if self.turn.user_allocation_quota > 0 {
            return self.turn.user_allocation_quota;
        }
        let others = self.rooms.capacity.saturating_sub(1).max(1);
        (others * crate::ice::turn_url_count(self) * 3).max(1)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
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
        if self.turn.extra_udp_listen.len() > MAX_EXTRA_UDP_LISTEN {
            return Err(invalid(
                "turn.extra_udp_listen",
                format!("at most {MAX_EXTRA_UDP_LISTEN} addresses"),
            ));
        }
        for (i, a) in self.turn.extra_udp_listen.iter().enumerate() {
            if *a == self.turn.listen || self.turn.extra_udp_listen[..i].contains(a) {
                return Err(invalid(
                    "turn.extra_udp_listen",
                    format!("`{a}` is listed twice (or is turn.listen)"),
                ));
            }
        }
        for name in &self.tls.self_signed_names {
            if !valid_host(name) {
                return Err(invalid(
                    "tls.self_signed_names",
                    format!("`{name}` is not a host name or IP address"),
                ));
            }
        }
        self.validate_acme()?;
        self.cluster.validate(&self.turn)?;
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
        if r.password.char_count() > 256 {
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
        check_one_per_family("turn.relay_ips", &t.relay_ips)?;
        check_one_per_family("turn.external_ips", &t.external_ips)?;
        if t.realm.is_empty() || t.realm.len() > 127 || t.realm.chars().any(char::is_control) {
            return Err(invalid(
                "turn.realm",
                "must be 1 to 127 characters without control characters",
            ));
        }
        if !t.secret.is_empty() && t.secret.char_count() < 16 {
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
        let udp_port = t.listen.port();
        if t.enabled && udp_port != 0 && t.relay_ports.range().contains(&udp_port) {
            return Err(invalid(
                "turn.relay_ports",
                format!(
                    "{} includes {udp_port}, the UDP port of turn.listen: the relay refuses \
                     its own UDP listener's port as a peer, so a relay address with that \
                     port could not be reached by other relayed clients; choose a range \
                     without it",
                    t.relay_ports
                ),
            ));
        }
        if t.total_allocation_quota == 0 {
            return Err(invalid("turn.total_allocation_quota", "must be at least 1"));
        }
        check_caps(
            ("http.max_connections", self.http.max_connections),
            (
                "http.max_connections_per_ip",
                self.http.max_connections_per_ip,
            ),
        )?;
        check_caps(
            ("turn.max_stream_connections", t.max_stream_connections),
            (
                "turn.max_stream_connections_per_ip",
                t.max_stream_connections_per_ip,
            ),
        )?;
        for (key, v) in [
            ("http.handshake_timeout_s", self.http.handshake_timeout_s),
            ("turn.stream_message_timeout_s", t.stream_message_timeout_s),
        ] {
            if !(1..=300).contains(&v) {
                return Err(invalid(key, "must be between 1 and 300"));
            }
        }
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

    /// The `[tls] acme_*` keys: names a CA can issue for over HTTP-01 or TLS-ALPN-01,
    /// an HTTPS directory, a readable CA file, and no configured certificate beside.
    fn validate_acme(&self) -> Result<(), ConfigError> {
        let t = &self.tls;
        if t.acme_domains.len() > MAX_ACME_DOMAINS {
            return Err(invalid(
                "tls.acme_domains",
                format!("at most {MAX_ACME_DOMAINS} names"),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for name in &t.acme_domains {
            let id = acme_identifier(name).map_err(|e| invalid("tls.acme_domains", e))?;
            if !seen.insert(id) {
                return Err(invalid(
                    "tls.acme_domains",
                    format!("`{name}` is listed twice"),
                ));
            }
        }
        if t.acme_enabled() && !t.cert.is_empty() {
            return Err(invalid(
                "tls.acme_domains",
                "ACME and a configured certificate (tls.cert, tls.key) exclude each other: \
                 empty one of them",
            ));
        }
        if !t.acme_email.is_empty() && !valid_email(&t.acme_email) {
            return Err(invalid(
                "tls.acme_email",
                "expected an e-mail address like admin@example.org (without mailto:)",
            ));
        }
        if !t.acme_directory.is_empty() {
            check_directory_url(&t.acme_directory).map_err(|e| invalid("tls.acme_directory", e))?;
        }
        if !t.acme_directory_ca.is_empty() {
            check_ca_file(Path::new(&t.acme_directory_ca))
                .map_err(|e| invalid("tls.acme_directory_ca", e))?;
        }
        if t.acme_challenge == AcmeChallenge::Http01 && self.http.redirect_listen.is_none() {
            return Err(invalid(
                "tls.acme_challenge",
                "http-01 is answered on http.redirect_listen, which is off: set it (port 80 \
                 for a public CA) or use tls-alpn-01",
            ));
        }
        if t.acme_profile.len() > 64
            || !t
                .acme_profile
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(invalid(
                "tls.acme_profile",
                "a profile name of at most 64 letters, digits, `-`, `_` or `.`",
            ));
        }
        if t.acme_renew_before_s > 365 * 86400 {
            return Err(invalid(
                "tls.acme_renew_before_s",
                "at most 31536000 (a year)",
            ));
        }
        if !(1..=86400).contains(&t.acme_retry_s) {
            return Err(invalid("tls.acme_retry_s", "must be between 1 and 86400"));
        }
        Ok(())
    }

    /// The effective config as TOML, every secret shown as `<redacted>`.
    pub fn redacted_toml(&self) -> Result<String, ConfigError> {
        toml::to_string_pretty(self)
            .map_err(|e| ConfigError::Parse(format!("cannot render the config: {e}")))
    }
}

/// The loader's error, with the key it names (if any) in [`ConfigError::Invalid`].
fn from_loader(e: config::ConfigError) -> ConfigError {
    match e {
        config::ConfigError::At {
            error,
            key: Some(key),
            ..
        } => ConfigError::Invalid {
            key,
            reason: error.to_string(),
        },
        config::ConfigError::Type {
            unexpected,
            expected,
            key: Some(key),
            ..
        } => ConfigError::Invalid {
            key,
            reason: format!("invalid type: {unexpected}, expected {expected}"),
        },
        other => ConfigError::Parse(other.to_string()),
    }
}

/// A UDP port range, `FIRST-LAST` in TOML, with `1 <= FIRST <= LAST`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    first: u16,
    last: u16,
}

impl PortRange {
    /// `None` unless `1 <= first <= last`.
    pub fn new(first: u16, last: u16) -> Option<PortRange> {
        (first >= 1 && first <= last).then_some(PortRange { first, last })
    }

    pub fn first(&self) -> u16 {
        self.first
    }

    pub fn last(&self) -> u16 {
        self.last
    }

    pub fn range(&self) -> RangeInclusive<u16> {
        self.first..=self.last
    }

    /// How many ports the range holds (at least 1).
    pub fn len(&self) -> u32 {
        u32::from(self.last - self.first) + 1
    }

    /// Never true: a range holds at least one port.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<PortRange, String> {
        let (lo, hi) = s
            .trim()
            .split_once('-')
            .ok_or("expected LOW-HIGH, e.g. 49152-65535")?;
        let lo: u16 = lo.trim().parse().map_err(|_| "LOW is not a port number")?;
        let hi: u16 = hi.trim().parse().map_err(|_| "HIGH is not a port number")?;
        PortRange::new(lo, hi).ok_or_else(|| "expected 1 <= LOW <= HIGH <= 65535".to_string())
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl Serialize for PortRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<PortRange, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("`{s}` is not an address like 0.0.0.0:8443 or [::]:8443"))
}

fn parse_ip(s: &str) -> Result<IpAddr, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("`{s}` is not an IP address"))
}

/// A CIDR range; a bare address is a range of one.
fn parse_net(s: &str) -> Result<IpNet, String> {
    let t = s.trim();
    t.parse::<IpNet>()
        .or_else(|_| t.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("`{s}` is not a CIDR range like 10.0.0.0/8"))
}

/// A socket address as a string (`0.0.0.0:8443`, `[::]:8443`).
mod addr {
    use super::*;

    pub fn serialize<S: Serializer>(a: &SocketAddr, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(a)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
        let s = String::deserialize(d)?;
        parse_addr(&s).map_err(serde::de::Error::custom)
    }
}

/// An optional socket address; empty string = `None`.
mod opt_addr {
    use super::*;

    pub fn serialize<S: Serializer>(a: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match a {
            Some(a) => s.collect_str(a),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let s = String::deserialize(d)?;
        if s.trim().is_empty() {
            return Ok(None);
        }
        parse_addr(&s).map(Some).map_err(serde::de::Error::custom)
    }
}

/// A list of socket addresses as strings.
mod addrs {
    use super::*;

    pub fn serialize<S: Serializer>(v: &[SocketAddr], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(ToString::to_string))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
        let v = Vec::<String>::deserialize(d)?;
        v.iter()
            .map(|a| parse_addr(a))
            .collect::<Result<_, _>>()
            .map_err(serde::de::Error::custom)
    }
}

/// A list of IP addresses as strings.
mod ips {
    use super::*;

    pub fn serialize<S: Serializer>(v: &[IpAddr], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(ToString::to_string))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpAddr>, D::Error> {
        let v = Vec::<String>::deserialize(d)?;
        v.iter()
            .map(|s| parse_ip(s))
            .collect::<Result<_, _>>()
            .map_err(serde::de::Error::custom)
    }
}

/// A list of CIDR ranges as strings.
mod nets {
    use super::*;

    pub fn serialize<S: Serializer>(v: &[IpNet], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(ToString::to_string))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
        let v = Vec::<String>::deserialize(d)?;
        v.iter()
            .map(|s| parse_net(s))
            .collect::<Result<_, _>>()
            .map_err(serde::de::Error::custom)
    }
}

/// A total cap and a per-address cap: both at least 1, the second at most the first.
fn check_caps(total: (&str, usize), per_ip: (&str, usize)) -> Result<(), ConfigError> {
    for (key, v) in [total, per_ip] {
        if !(1..=1_000_000).contains(&v) {
            return Err(invalid(key, "must be between 1 and 1000000"));
        }
    }
    if per_ip.1 > total.1 {
        return Err(invalid(
            per_ip.0,
            format!("must not exceed {} ({})", total.0, total.1),
        ));
    }
    Ok(())
}

fn check_one_per_family(key: &str, ips: &[IpAddr]) -> Result<(), ConfigError> {
    let v4 = ips.iter().filter(|ip| ip.is_ipv4()).count();
    let v6 = ips.len() - v4;
    if v4 > 1 || v6 > 1 {
        return Err(invalid(key, "at most one IPv4 and one IPv6 address"));
    }
    Ok(())
}

/// One ACME name, checked and in canonical form: an IP address as printed by
/// [`IpAddr`], a DNS name in lower case. Wildcards need DNS-01, which is not offered.
pub fn acme_identifier(name: &str) -> Result<String, String> {
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(ip.to_string());
    }
    if name.starts_with("*.") {
        return Err(format!(
            "`{name}` is a wildcard, which needs the DNS-01 challenge: meshmeet answers only \
             HTTP-01 and TLS-ALPN-01, so list each name instead"
        ));
    }
    if !name.is_ascii() {
        return Err(format!(
            "`{name}` is not ASCII: write an internationalized name in its xn-- form"
        ));
    }
    let name = name.strip_suffix('.').unwrap_or(name);
    let labels: Vec<&str> = name.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    let tld_ok = labels
        .last()
        .is_some_and(|l| !l.chars().all(|c| c.is_ascii_digit()));
    if name.len() > 253 || labels.len() < 2 || !labels.iter().all(label_ok) || !tld_ok {
        return Err(format!(
            "`{name}` is not a fully qualified domain name like meet.example.org (or an IP \
             address)"
        ));
    }
    Ok(name.to_ascii_lowercase())
}

fn valid_email(s: &str) -> bool {
    let Some((local, domain)) = s.split_once('@') else {
        return false;
    };
    s.len() <= 254
        && !local.is_empty()
        && !domain.contains('@')
        && valid_host(domain)
        && domain.contains('.')
        && !s
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, ',' | '<' | '>' | ':'))
}

/// An `https://` URL with a host.
fn check_directory_url(url: &str) -> Result<(), String> {
    if url.len() > 2048 {
        return Err("at most 2048 characters".into());
    }
    let lower = url.to_ascii_lowercase();
    if lower.starts_with("http://") {
        return Err(format!(
            "`{url}` is plain HTTP: ACME directories are served over https:// (RFC 8555)"
        ));
    }
    if !lower.starts_with("https://") {
        return Err(format!(
            "`{url}` is not an https:// URL like https://acme-staging-v02.api.letsencrypt.org/directory"
        ));
    }
    let uri: axum::http::Uri = url
        .parse()
        .map_err(|e| format!("`{url}` is not a valid URL: {e}"))?;
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("`{url}` names no host"));
    }
    Ok(())
}

/// A readable PEM file holding at least one certificate.
pub fn check_ca_file(path: &Path) -> Result<(), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut found = 0;
    for cert in rustls_pemfile::certs(&mut bytes.as_slice()) {
        let der = cert.map_err(|e| format!("{}: bad PEM: {e}", path.display()))?;
        x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| format!("{}: not an X.509 certificate: {e}", path.display()))?;
        found += 1;
    }
    if found == 0 {
        return Err(format!("{}: no CERTIFICATE block found", path.display()));
    }
    Ok(())
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

#[cfg(test)]
mod tests;
