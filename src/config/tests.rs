//! Loading, overriding, validating and printing the config.

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

fn load_text(text: &str) -> Result<Config, ConfigError> {
    let f = write(text);
    Config::load_with_env(Some(f.path()), env(&[]))
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

#[test]
fn defaults_are_valid() {
    let c = Config::load_with_env(None, env(&[])).unwrap();
    assert_eq!(c, Config::default());
    assert_eq!(c.http.listen.port(), 8443);
    assert_eq!(c.turn.relay_ports.range(), 49152..=65535);
    assert_eq!(c.turn.tls_listen, None);
    assert!(c.turn.share_https_port);
    assert_eq!(c.http.redirect_listen, None);
    assert_eq!(
        c.http.metrics_allow,
        vec![net("127.0.0.0/8"), net("::1/128")]
    );
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
    // And each value is written the way the defaults print it.
    for (section, value) in &defaults {
        assert_eq!(doc.get(section), Some(value), "{section}");
    }
}

#[test]
fn file_values_are_used() {
    let c = load_text("[http]\nlisten = \"127.0.0.1:9000\"\n[rooms]\ncapacity = 4\n").unwrap();
    assert_eq!(c.http.listen, addr("127.0.0.1:9000"));
    assert_eq!(c.rooms.capacity, 4);
    assert_eq!(c.rooms.resume_grace_s, 20);
}

#[test]
fn typed_values_are_parsed_once() {
    let c = load_text(
        "[http]\nlisten = \"[::1]:443\"\nredirect_listen = \"127.0.0.1:80\"\n\
         metrics_allow = [\"10.0.0.0/8\", \"192.0.2.7\", \" ::1/128 \"]\n\
         [turn]\nlisten = \"127.0.0.1:3478\"\ntls_listen = \"\"\n\
         relay_ips = [\"127.0.0.1\", \"::1\"]\nexternal_ips = [\"203.0.113.7\"]\n\
         relay_ports = \"40000 - 40999\"\nallowed_peer_ranges = [\"192.168.1.0/24\"]\n",
    )
    .unwrap();
    assert_eq!(c.http.listen, addr("[::1]:443"));
    assert_eq!(c.http.redirect_listen, Some(addr("127.0.0.1:80")));
    assert_eq!(
        c.http.metrics_allow,
        vec![net("10.0.0.0/8"), net("192.0.2.7/32"), net("::1/128")]
    );
    assert_eq!(c.turn.listen, addr("127.0.0.1:3478"));
    assert_eq!(c.turn.tls_listen, None);
    assert_eq!(
        c.turn.relay_ips,
        vec![
            "127.0.0.1".parse::<IpAddr>().unwrap(),
            "::1".parse().unwrap()
        ]
    );
    assert_eq!(
        c.turn.external_ips,
        vec!["203.0.113.7".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(c.turn.relay_ports.range(), 40000..=40999);
    assert_eq!(c.turn.relay_ports.len(), 1000);
    assert_eq!(c.turn.allowed_peer_ranges, vec![net("192.168.1.0/24")]);
}

#[test]
fn printed_config_loads_back_to_the_same_values() {
    let mut c = Config::default();
    c.http.listen = addr("[::]:8443");
    c.http.redirect_listen = Some(addr("0.0.0.0:80"));
    c.http.metrics_allow = vec![net("10.1.0.0/16")];
    c.turn.tls_listen = None;
    c.turn.relay_ips = vec!["192.0.2.1".parse().unwrap()];
    c.turn.relay_ports = PortRange::new(1000, 1000).unwrap();
    c.turn.allowed_peer_ranges = vec![net("fd00::/8")];
    let text = c.redacted_toml().unwrap();
    assert!(text.contains("redirect_listen = \"0.0.0.0:80\""), "{text}");
    assert!(text.contains("tls_listen = \"\""), "{text}");
    assert!(text.contains("relay_ports = \"1000-1000\""), "{text}");
    assert_eq!(load_text(&text).unwrap(), c);
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
    assert_eq!(c.turn.secret, Secret::from("0123456789abcdef0123"));
    assert_eq!(
        c.http.allowed_origins,
        vec!["https://a.example", "https://b.example"]
    );
    assert_eq!(c.data_dir, PathBuf::from("/var/lib/meshmeet"));
}

#[test]
fn env_sets_typed_values() {
    let c = Config::load_with_env(
        None,
        env(&[
            ("MESHMEET__HTTP__LISTEN", "127.0.0.1:0"),
            ("MESHMEET__HTTP__REDIRECT_LISTEN", "127.0.0.1:8080"),
            ("MESHMEET__TURN__TLS_LISTEN", ""),
            ("MESHMEET__TURN__RELAY_IPS", "127.0.0.1, ::1"),
            ("MESHMEET__TURN__RELAY_PORTS", "40000-40010"),
            (
                "MESHMEET__TURN__ALLOWED_PEER_RANGES",
                "10.0.0.0/8,192.0.2.1",
            ),
            ("MESHMEET__HTTP__METRICS_ALLOW", ""),
            ("MESHMEET__TURN__ENABLED", "false"),
            ("MESHMEET__ICE__FORCE_RELAY", "true"),
            ("MESHMEET__TURN__USERS__TOOL", "tool-password"),
        ]),
    )
    .unwrap();
    assert_eq!(c.http.listen, addr("127.0.0.1:0"));
    assert_eq!(c.http.redirect_listen, Some(addr("127.0.0.1:8080")));
    assert_eq!(c.turn.tls_listen, None);
    assert_eq!(c.turn.relay_ips.len(), 2);
    assert_eq!(c.turn.relay_ports.range(), 40000..=40010);
    assert_eq!(
        c.turn.allowed_peer_ranges,
        vec![net("10.0.0.0/8"), net("192.0.2.1/32")]
    );
    // An empty list variable is an empty list.
    assert!(c.http.metrics_allow.is_empty());
    assert!(!c.turn.enabled);
    assert!(c.ice.force_relay);
    assert_eq!(
        c.turn.users.get("tool"),
        Some(&Secret::from("tool-password"))
    );
}

#[test]
fn env_text_is_kept_as_written() {
    // Digits-only values are text for text keys: not rounded as a number, no leading
    // zeros lost.
    let c = Config::load_with_env(
        None,
        env(&[
            ("MESHMEET__TURN__SECRET", "12345678901234567890123"),
            ("MESHMEET__ROOMS__PASSWORD", "007"),
            ("MESHMEET__TURN__REALM", "1e3"),
        ]),
    )
    .unwrap();
    assert!(c.turn.secret.matches("12345678901234567890123"));
    assert!(c.rooms.password.matches("007"));
    assert_eq!(c.turn.realm, "1e3");
}

#[test]
fn unknown_key_is_named() {
    let err = load_text("[rooms]\ncapacityy = 4\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("capacityy"), "{err}");
    let err = load_text("bogus = 1\n").unwrap_err().to_string();
    assert!(err.contains("bogus"), "{err}");
    let err = Config::load_with_env(None, env(&[("MESHMEET__HTTP__LISTN", "x")]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("listn"), "{err}");
    let err = Config::load_with_env(None, env(&[("MESHMEET__", "x")]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("MESHMEET__"), "{err}");
}

#[test]
fn invalid_values_are_named() {
    let cases = [
        ("[http]\nlisten = \"nope\"\n", "http.listen"),
        ("[http]\nlisten = 8443\n", "http.listen"),
        ("[http]\nredirect_listen = \"80\"\n", "http.redirect_listen"),
        ("[rooms]\ncapacity = 1\n", "rooms.capacity"),
        ("[rooms]\ncapacity = \"six\"\n", "capacity"),
        ("[turn]\nrelay_ports = \"5000-4000\"\n", "turn.relay_ports"),
        ("[turn]\nrelay_ports = \"0-10\"\n", "turn.relay_ports"),
        ("[turn]\nrelay_ports = \"49152\"\n", "turn.relay_ports"),
        ("[turn]\nrelay_ports = \"a-b\"\n", "turn.relay_ports"),
        ("[turn]\nrelay_ports = \"1-70000\"\n", "turn.relay_ports"),
        ("[turn]\nsecret = \"short\"\n", "turn.secret"),
        ("[turn]\ntls_listen = \"::1\"\n", "turn.tls_listen"),
        (
            "[turn]\nallowed_peer_ranges = [\"10.0.0.0/33\"]\n",
            "turn.allowed_peer_ranges",
        ),
        (
            "[turn]\nrelay_ips = [\"1.2.3.4\", \"5.6.7.8\"]\n",
            "turn.relay_ips",
        ),
        ("[turn]\nrelay_ips = [\"1.2.3\"]\n", "turn.relay_ips"),
        ("[turn]\nrelay_ips = \"1.2.3.4\"\n", "turn.relay_ips"),
        (
            "[turn]\nexternal_ips = [\"::1\", \"::2\"]\n",
            "turn.external_ips",
        ),
        ("[turn]\nexternal_ips = [\"me\"]\n", "turn.external_ips"),
        ("[turn.users]\nalice = \"\"\n", "turn.users"),
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
        ("[http]\nmax_connections = 0\n", "http.max_connections"),
        (
            "[http]\nmax_connections = 10\nmax_connections_per_ip = 11\n",
            "http.max_connections_per_ip",
        ),
        (
            "[http]\nhandshake_timeout_s = 0\n",
            "http.handshake_timeout_s",
        ),
        (
            "[turn]\nmax_stream_connections_per_ip = 0\n",
            "turn.max_stream_connections_per_ip",
        ),
        (
            "[turn]\nmax_stream_connections = 100\n",
            "turn.max_stream_connections_per_ip",
        ),
        (
            "[turn]\nstream_message_timeout_s = 301\n",
            "turn.stream_message_timeout_s",
        ),
    ];
    for (text, key) in cases {
        let err = load_text(text).unwrap_err().to_string();
        assert!(err.contains(key), "{text}: {err}");
    }
    // Values from the environment are named by their key too.
    for (var, value, key) in [
        ("MESHMEET__TURN__RELAY_PORTS", "x", "turn.relay_ports"),
        ("MESHMEET__HTTP__LISTEN", "localhost:1", "http.listen"),
        (
            "MESHMEET__TURN__RELAY_IPS",
            "127.0.0.1,nope",
            "turn.relay_ips",
        ),
        ("MESHMEET__ROOMS__CAPACITY", "many", "rooms.capacity"),
    ] {
        let err = Config::load_with_env(None, env(&[(var, value)]))
            .unwrap_err()
            .to_string();
        assert!(err.contains(key), "{var}={value}: {err}");
    }
}

#[test]
fn relay_ports_must_not_include_the_udp_listener() {
    let err = load_text("[turn]\nlisten = \"0.0.0.0:50000\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("turn.relay_ports"), "{err}");
    assert!(err.contains("49152-65535 includes 50000"), "{err}");
    assert!(err.contains("turn.listen"), "{err}");
    // The range's ends count; TCP-only listeners and a disabled relay do not.
    let err = load_text("[turn]\nlisten = \"[::]:4000\"\nrelay_ports = \"3000-4000\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("turn.relay_ports"), "{err}");
    for ok in [
        "[turn]\nlisten = \"0.0.0.0:4001\"\nrelay_ports = \"3000-4000\"\n",
        "[turn]\nlisten = \"0.0.0.0:2999\"\nrelay_ports = \"3000-4000\"\n",
        "[turn]\nrelay_ports = \"4000-6000\"\ntls_listen = \"0.0.0.0:5349\"\n\
         [http]\nlisten = \"0.0.0.0:4443\"\nredirect_listen = \"0.0.0.0:5080\"\n",
        "[turn]\nenabled = false\nlisten = \"0.0.0.0:50000\"\n",
        "[turn]\nlisten = \"127.0.0.1:0\"\n",
    ] {
        assert!(load_text(ok).is_ok(), "{ok}: {:?}", load_text(ok).err());
    }
}

#[test]
fn user_allocation_quota_is_derived_unless_set() {
    // Default: six per room, three TURN URLs (UDP, and TCP and TLS on the HTTPS
    // port): 5 x 3 x 3.
    let c = Config::default();
    assert_eq!(c.turn.user_allocation_quota, 0);
    assert_eq!(c.user_allocation_quota(), 45);
    // UDP on the HTTPS port number too (the installer's config): four URLs.
    let c = load_text("[turn]\nextra_udp_listen = [\"0.0.0.0:8443\"]\n").unwrap();
    assert_eq!(c.user_allocation_quota(), 60);
    // Without the shared port or a TLS listener two URLs are handed out (UDP, TCP).
    let c = load_text("[rooms]\ncapacity = 4\n[turn]\nshare_https_port = false\n").unwrap();
    assert_eq!(c.user_allocation_quota(), 18);
    let c = load_text("[rooms]\ncapacity = 50\n").unwrap();
    assert_eq!(c.user_allocation_quota(), 441);
    // A configured value wins, from the file or the environment.
    let c = load_text("[rooms]\ncapacity = 50\n[turn]\nuser_allocation_quota = 7\n").unwrap();
    assert_eq!(c.user_allocation_quota(), 7);
    let c = Config::load_with_env(None, env(&[("MESHMEET__TURN__USER_ALLOCATION_QUOTA", "3")]))
        .unwrap();
    assert_eq!(c.user_allocation_quota(), 3);
    // TURN off: nothing to allocate, the quota stays positive.
    let c = load_text("[turn]\nenabled = false\n").unwrap();
    assert_eq!(c.user_allocation_quota(), 1);
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
    load_text("[rooms]\nrate_per_s = 1000000\nrate_burst = 1000000\n").unwrap();
}

#[test]
fn redaction_hides_secrets() {
    let mut c = Config::default();
    c.turn.secret = "supersecretvalue1234".into();
    c.rooms.password = "hunter2".into();
    c.turn.users.insert("alice".into(), "pw-alice".into());
    let text = c.redacted_toml().unwrap();
    assert!(!text.contains("supersecretvalue1234"));
    assert!(!text.contains("hunter2"));
    assert!(!text.contains("pw-alice"));
    assert!(text.contains("alice"));
    assert!(text.contains("<redacted>"));
    // Debug output (what a stray log line would show) hides them too.
    let debug = format!("{c:?}");
    assert!(!debug.contains("supersecretvalue1234"), "{debug}");
    assert!(!debug.contains("hunter2"), "{debug}");
    assert!(!debug.contains("pw-alice"), "{debug}");
}

#[test]
fn port_ranges() {
    let r: PortRange = "10-20".parse().unwrap();
    assert_eq!((r.first(), r.last(), r.len()), (10, 20, 11));
    assert_eq!(r.to_string(), "10-20");
    assert_eq!(" 1 - 65535 ".parse::<PortRange>().unwrap().len(), 65535);
    for bad in ["", "10", "20-10", "0-1", "-1", "1-", "1-65536", "x-2"] {
        assert!(bad.parse::<PortRange>().is_err(), "{bad}");
    }
    assert!(PortRange::new(5, 4).is_none());
    assert!(!r.is_empty());
}

#[test]
fn log_filters() {
    assert!(valid_log_filter("info"));
    assert!(valid_log_filter("meshmeet=debug,warn"));
    assert!(!valid_log_filter("loud"));
    assert!(!valid_log_filter(""));
}

#[test]
fn acme_settings_are_checked_and_named() {
    let ca = write("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n");
    let no_cert = write("just text\n");
    let cases: Vec<(String, &str, &str)> = vec![
        (
            "[tls]\nacme_domains = [\"meet example.org\"]\n".into(),
            "tls.acme_domains",
            "not a fully qualified domain name",
        ),
        (
            "[tls]\nacme_domains = [\"localhost\"]\n".into(),
            "tls.acme_domains",
            "fully qualified",
        ),
        (
            "[tls]\nacme_domains = [\"-bad.example.org\"]\n".into(),
            "tls.acme_domains",
            "fully qualified",
        ),
        (
            "[tls]\nacme_domains = [\"a.b.123\"]\n".into(),
            "tls.acme_domains",
            "fully qualified",
        ),
        (
            "[tls]\nacme_domains = [\"*.example.org\"]\n".into(),
            "tls.acme_domains",
            "needs the DNS-01 challenge",
        ),
        (
            "[tls]\nacme_domains = [\"bücher.example\"]\n".into(),
            "tls.acme_domains",
            "xn--",
        ),
        (
            "[tls]\nacme_domains = [\"meet.example.org\", \"MEET.example.org\"]\n".into(),
            "tls.acme_domains",
            "listed twice",
        ),
        (
            "[tls]\nacme_domains = [\"meet.example.org\"]\ncert = \"c.pem\"\nkey = \"k.pem\"\n"
                .into(),
            "tls.acme_domains",
            "exclude each other",
        ),
        (
            "[tls]\nacme_directory = \"http://ca.example.org/dir\"\n".into(),
            "tls.acme_directory",
            "plain HTTP",
        ),
        (
            "[tls]\nacme_directory = \"ftp://ca.example.org/dir\"\n".into(),
            "tls.acme_directory",
            "not an https:// URL",
        ),
        (
            "[tls]\nacme_directory = \"https:///dir\"\n".into(),
            "tls.acme_directory",
            "",
        ),
        (
            "[tls]\nacme_directory_ca = \"/nonexistent/ca.pem\"\n".into(),
            "tls.acme_directory_ca",
            "cannot read /nonexistent/ca.pem",
        ),
        (
            format!(
                "[tls]\nacme_directory_ca = \"{}\"\n",
                no_cert.path().display()
            ),
            "tls.acme_directory_ca",
            "no CERTIFICATE",
        ),
        (
            format!("[tls]\nacme_directory_ca = \"{}\"\n", ca.path().display()),
            "tls.acme_directory_ca",
            "",
        ),
        (
            "[tls]\nacme_email = \"not an address\"\n".into(),
            "tls.acme_email",
            "e-mail",
        ),
        (
            "[tls]\nacme_email = \"mailto:admin@example.org\"\n".into(),
            "tls.acme_email",
            "without mailto",
        ),
        (
            "[tls]\nacme_challenge = \"dns-01\"\n".into(),
            "tls.acme_challenge",
            "",
        ),
        (
            "[tls]\nacme_challenge = \"http-01\"\n".into(),
            "tls.acme_challenge",
            "http.redirect_listen",
        ),
        (
            "[tls]\nacme_profile = \"short lived\"\n".into(),
            "tls.acme_profile",
            "",
        ),
        ("[tls]\nacme_retry_s = 0\n".into(), "tls.acme_retry_s", ""),
        (
            "[tls]\nacme_renew_before_s = 99999999999\n".into(),
            "tls.acme_renew_before_s",
            "",
        ),
    ];
    for (text, key, why) in &cases {
        let err = load_text(text).unwrap_err().to_string();
        assert!(err.contains(key) && err.contains(why), "{text}: {err}");
    }
    let names: Vec<String> = (0..=MAX_ACME_DOMAINS)
        .map(|i| format!("\"n{i}.example.org\""))
        .collect();
    let err = load_text(&format!("[tls]\nacme_domains = [{}]\n", names.join(",")))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tls.acme_domains") && err.contains("at most"),
        "{err}"
    );
}

#[test]
fn acme_settings_that_are_fine() {
    let c = load_text(
        "[http]\nredirect_listen = \"0.0.0.0:80\"\n[tls]\nacme_domains = [\"Meet.Example.org\", \
         \"203.0.113.7\", \"[2001:db8::1]\"]\nacme_email = \"admin@example.org\"\n\
         acme_directory = \"https://acme-staging-v02.api.letsencrypt.org/directory\"\n\
         acme_challenge = \"http-01\"\nacme_profile = \"shortlived\"\nacme_renew_before_s = 86400\n",
    )
    .unwrap();
    assert!(c.tls.acme_enabled());
    assert_eq!(c.tls.acme_challenge, AcmeChallenge::Http01);
    let ids: Vec<String> = c
        .tls
        .acme_domains
        .iter()
        .map(|n| acme_identifier(n).unwrap())
        .collect();
    assert_eq!(ids, ["meet.example.org", "203.0.113.7", "2001:db8::1"]);
    assert!(!Config::default().tls.acme_enabled());
    // A list from the environment.
    let c = Config::load_with_env(
        None,
        env(&[(
            "MESHMEET__TLS__ACME_DOMAINS",
            "a.example.org, b.example.org",
        )]),
    )
    .unwrap();
    assert_eq!(c.tls.acme_domains, ["a.example.org", "b.example.org"]);
}

#[test]
fn cluster_is_off_by_default_and_checked_when_on() {
    let c = Config::default();
    assert!(!c.cluster.enabled());
    let on = "[turn]\nsecret = \"0123456789abcdef\"\n[cluster]\n";
    let c = load_text(&format!(
        "{on}nats_url = \"nats://127.0.0.1:4222\"\nnode_name = \"a-1\"\n"
    ))
    .unwrap();
    assert!(c.cluster.enabled());
    assert_eq!(c.cluster.effective_node_name(), "a-1");
    for url in [
        "nats://[::1]:4222",
        "tls://nats.example.org",
        "NATS://nats.example.org:4222",
    ] {
        load_text(&format!("{on}nats_url = \"{url}\"\n")).unwrap();
    }
    let key_of = |text: String| match load_text(&text) {
        Err(ConfigError::Invalid { key, .. }) => key,
        other => panic!("{text}: {other:?}"),
    };
    for bad in [
        "http://x:4222",
        "nats://",
        "nats://u:p@x:4222",
        "nats://x:4222/path",
        "nats://a:1,nats://b:2",
        "nats://x:0",
        "nats://x:99999",
        "nats://bad host",
    ] {
        assert_eq!(
            key_of(format!("{on}nats_url = \"{bad}\"\n")),
            "cluster.nats_url",
            "{bad}"
        );
    }
    for bad in ["a.b", "a b", "x/y", "*", ">", &"n".repeat(65)] {
        assert_eq!(
            key_of(format!("{on}node_name = \"{bad}\"\n")),
            "cluster.node_name",
            "{bad}"
        );
    }
    let url = "nats_url = \"nats://127.0.0.1:4222\"\n";
    assert_eq!(
        key_of(format!("{on}{url}nats_user = \"u\"\n")),
        "cluster.nats_password"
    );
    assert_eq!(
        key_of(format!("{on}{url}nats_password = \"p\"\n")),
        "cluster.nats_user"
    );
    assert_eq!(
        key_of(format!(
            "{on}{url}nats_user = \"u\"\nnats_password = \"p\"\nnats_token = \"t\"\n"
        )),
        "cluster.nats_token"
    );
    assert_eq!(
        key_of(format!("{on}{url}nats_ca = \"/nonexistent.pem\"\n")),
        "cluster.nats_ca"
    );
    let tls = "nats_url = \"tls://127.0.0.1:4222\"\n";
    assert_eq!(
        key_of(format!("{on}{tls}nats_ca = \"/nonexistent.pem\"\n")),
        "cluster.nats_ca"
    );
    // Without a configured TURN secret each node would generate its own.
    assert_eq!(key_of(format!("[cluster]\n{url}")), "turn.secret");
    load_text(&format!("[turn]\nenabled = false\n[cluster]\n{url}")).unwrap();
    // The password never shows in the printed config.
    let c = load_text(&format!(
        "{on}{url}nats_user = \"u\"\nnats_password = \"hunter2-secret\"\n"
    ))
    .unwrap();
    let printed = c.redacted_toml().unwrap();
    assert!(!printed.contains("hunter2-secret"), "{printed}");
    assert!(!format!("{c:?}").contains("hunter2-secret"));
}

#[test]
fn cluster_secrets_come_from_the_environment() {
    let c = Config::load_with_env(
        None,
        env(&[
            ("MESHMEET__TURN__SECRET", "0123456789abcdef"),
            ("MESHMEET__CLUSTER__NATS_URL", "nats://127.0.0.1:4222"),
            ("MESHMEET__CLUSTER__NATS_TOKEN", "12345"),
        ]),
    )
    .unwrap();
    assert_eq!(c.cluster.nats_token.expose(), "12345");
    assert!(valid_node_name(&c.cluster.effective_node_name()));
}
