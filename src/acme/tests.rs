//! The pure parts of ACME: problem texts, challenge choice, checks of what the CA
//! issued, `Retry-After`, and the state files. The protocol itself runs against a
//! real CA (Pebble) in `tests/it/acme.rs`.

use super::*;

use instant_acme::{ChallengeStatus, Subproblem};

fn problem() -> Problem {
    serde_json::from_value(serde_json::json!({
        "type": "urn:ietf:params:acme:error:rejectedIdentifier",
        "detail": "Error creating new order",
        "status": 400,
        "subproblems": [{
            "type": "urn:ietf:params:acme:error:caa",
            "detail": "CAA record forbids issuance",
            "identifier": {"type": "dns", "value": "meet.test"}
        }]
    }))
    .unwrap()
}

#[test]
fn problems_are_spelled_out_with_subproblems() {
    let text = describe_problem(&problem());
    assert_eq!(
        text,
        "problem urn:ietf:params:acme:error:rejectedIdentifier (HTTP 400): Error creating new \
         order; subproblem for meet.test urn:ietf:params:acme:error:caa: CAA record forbids \
         issuance"
    );
    let e = instant_acme::Error::Api(problem());
    assert_eq!(describe(&e), text);
    // A CA's long detail is cut.
    let mut long = problem();
    long.detail = Some("x".repeat(10_000));
    let text = describe_problem(&long);
    assert!(text.chars().count() <= MAX_PROBLEM_CHARS + 3 && text.ends_with("..."));
    let sub: &Subproblem = &problem().subproblems[0];
    assert!(sub.identifier.is_some());
    // Other errors carry their causes.
    let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
    let e = instant_acme::Error::Other(Box::new(io));
    assert!(describe(&e).contains("refused"), "{}", describe(&e));
}

fn offered(types: &[ChallengeType]) -> Vec<Challenge> {
    types
        .iter()
        .map(|t| Challenge {
            r#type: t.clone(),
            url: "https://ca.test/chall".into(),
            token: "tok".into(),
            status: ChallengeStatus::Pending,
            error: None,
        })
        .collect()
}

#[test]
fn challenge_choice_follows_the_setting_and_the_offer() {
    use ChallengeType::{Dns01, Http01, TlsAlpn01};
    let all = offered(&[Http01, Dns01, TlsAlpn01]);
    let auto = AcmeChallenge::Auto;
    assert_eq!(pick_challenge(auto, true, &all), Some(TlsAlpn01));
    assert_eq!(pick_challenge(auto, false, &all), Some(TlsAlpn01));
    let http_only = offered(&[Http01, Dns01]);
    assert_eq!(pick_challenge(auto, true, &http_only), Some(Http01));
    assert_eq!(pick_challenge(auto, false, &http_only), None);
    assert_eq!(
        pick_challenge(AcmeChallenge::Http01, true, &all),
        Some(Http01)
    );
    assert_eq!(
        pick_challenge(AcmeChallenge::TlsAlpn01, true, &http_only),
        None
    );
    assert_eq!(pick_challenge(auto, true, &offered(&[Dns01])), None);
}

fn issued(names: &[&str], days: (u8, u8)) -> (String, String) {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let mut params = rcgen::CertificateParams::new(names).unwrap();
    params.not_before = rcgen::date_time_ymd(2030, 1, days.0);
    params.not_after = rcgen::date_time_ymd(2030, 1, days.1);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

#[test]
fn issued_certificates_are_checked_before_use() {
    let in_jan_2030 = 1_893_456_000 + 5 * 86400; // 2030-01-06
    let names = vec!["meet.test".to_string(), "192.0.2.1".to_string()];
    let (chain, key) = issued(&["meet.test", "192.0.2.1"], (1, 20));
    let info = check_issued(&chain, &key, &names, in_jan_2030).unwrap();
    assert_eq!(info.names, names);
    // A name missing.
    let (chain2, key2) = issued(&["meet.test"], (1, 20));
    let err = check_issued(&chain2, &key2, &names, in_jan_2030).unwrap_err();
    assert!(err.contains("not all of"), "{err}");
    // Another key.
    let err = check_issued(&chain, &key2, &names, in_jan_2030).unwrap_err();
    assert!(err.contains("does not match"), "{err}");
    // Not valid yet / any more.
    let err = check_issued(&chain, &key, &names, in_jan_2030 + 30 * 86400).unwrap_err();
    assert!(err.contains("not valid now"), "{err}");
    // Not a chain at all.
    let err = check_issued("", &key, &names, in_jan_2030).unwrap_err();
    assert!(err.contains("no certificate"), "{err}");
    let err = check_issued(&chain, "junk", &names, in_jan_2030).unwrap_err();
    assert!(err.contains("key"), "{err}");
}

#[test]
fn retry_after_is_seconds_or_a_date() {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    assert_eq!(
        parse_retry_after(" 120 ", now),
        Some(now + Duration::from_secs(120))
    );
    assert_eq!(
        parse_retry_after("Thu, 01 Jan 1970 00:00:10 GMT", now),
        Some(SystemTime::UNIX_EPOCH + Duration::from_secs(10))
    );
    assert_eq!(parse_retry_after("soon", now), None);
    // A huge delay is capped at a week.
    assert_eq!(
        parse_retry_after("99999999999", now),
        Some(now + Duration::from_secs(schedule::MAX_RETRY_AFTER_S))
    );
}

/// Credentials as instant-acme stores them (a throwaway P-256 key).
const CREDENTIALS: &str = r#"{"id":"https://ca.test/acct/1","key_pkcs8":"MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgJVWC_QzOTCS5vtsJp2IG-UDc8cdDfeoKtxSZxaznM-mhRANCAAQenCPoGgPFTdPJ7VLLKt56RxPlYT1wNXnHc54PEyBg3LxKaH0-sJkX0mL8LyPEdsfL_Oz4TxHkWLJGrXVtNhfH","directory":"https://ca.test/dir"}"#;

#[test]
fn state_files_are_private_and_kept_per_directory() {
    use std::os::unix::fs::PermissionsExt;
    let data = tempfile::tempdir().unwrap();
    let store = Store::new(data.path());
    assert!(store.load_account("https://ca.test/dir").unwrap().is_none());
    assert!(!store.has_certificate());
    let creds: instant_acme::AccountCredentials = serde_json::from_str(CREDENTIALS).unwrap();
    store.save_account("https://ca.test/dir", creds).unwrap();
    assert!(store.load_account("https://ca.test/dir").unwrap().is_some());
    // Another CA: another account.
    assert!(store
        .load_account("https://other.test/dir")
        .unwrap()
        .is_none());
    let (chain, key) = issued(&["meet.test"], (1, 20));
    store.save_certificate(&chain, &key).unwrap();
    assert!(store.has_certificate());
    assert_eq!(std::fs::read_to_string(store.cert_path()).unwrap(), chain);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(store.dir()), 0o700);
    for f in ["account.json", "cert.pem", "key.pem"] {
        assert_eq!(mode(&store.dir().join(f)), 0o600, "{f}");
    }
    // No temporary file is left behind.
    let names: Vec<_> = std::fs::read_dir(store.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    // A damaged account file is reported (without its content), not trusted.
    std::fs::write(store.dir().join("account.json"), "{\"secret-ish\": ").unwrap();
    let Err(err) = store.load_account("https://ca.test/dir") else {
        panic!("a damaged account file loads");
    };
    let err = err.to_string();
    assert!(
        err.contains("account.json") && !err.contains("secret-ish"),
        "{err}"
    );
    // A directory made by someone else with looser permissions is tightened.
    std::fs::set_permissions(store.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    store.save_certificate(&chain, &key).unwrap();
    assert_eq!(mode(store.dir()), 0o700);
}

/// A one-answer HTTPS server on loopback with a certificate for 127.0.0.1; returns
/// its address and the certificate's PEM file (to trust as `acme_directory_ca`).
async fn answering(answer: Vec<u8>) -> (std::net::SocketAddr, tempfile::NamedTempFile) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    crate::tls::install_crypto_provider();
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let pem = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(pem.path(), ck.cert.pem()).unwrap();
    let key = PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let mut cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![ck.cert.der().clone()], key)
        .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        // A client that does not trust this certificate ends here.
        let Ok(mut tls) = acceptor.accept(tcp).await else {
            return;
        };
        let mut request = Vec::new();
        let mut buf = [0u8; 1024];
        while !request.ends_with(b"\r\n\r\n") {
            match tls.read(&mut buf).await {
                Ok(n) if n > 0 => request.extend_from_slice(&buf[..n]),
                _ => return,
            }
        }
        let _ = tls.write_all(&answer).await;
        let _ = tls.shutdown().await;
    });
    (addr, pem)
}

fn get_request(addr: std::net::SocketAddr) -> axum::http::Request<BodyWrapper<Bytes>> {
    axum::http::Request::get(format!("https://{addr}/dir"))
        .body(BodyWrapper::default())
        .unwrap()
}

#[tokio::test]
async fn the_cas_retry_after_is_kept_for_the_next_attempt() {
    let (addr, ca) = answering(
        b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 3600\r\nContent-Type: \
          application/problem+json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
            .to_vec(),
    )
    .await;
    let client = CaClient::new(Some(ca.path())).unwrap();
    let rsp = client.request(get_request(addr)).await.unwrap();
    assert_eq!(rsp.parts.status, 429);
    let wait = client.take_retry_after().expect("Retry-After kept");
    assert!((3590..=3600).contains(&wait), "{wait}");
    // Taken once: the next failure without one falls back to the backoff.
    assert_eq!(client.take_retry_after(), None);
    assert_eq!(
        retry_delay(1, 120, Some(wait)),
        wait,
        "the retry waits for the CA"
    );
}

#[tokio::test]
async fn answers_from_the_ca_are_bounded() {
    let big = vec![b'x'; MAX_ANSWER_BYTES + 1];
    let mut answer = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        big.len()
    )
    .into_bytes();
    answer.extend_from_slice(&big);
    let (addr, ca) = answering(answer).await;
    let client = CaClient::new(Some(ca.path())).unwrap();
    let mut rsp = client.request(get_request(addr)).await.unwrap();
    assert!(
        rsp.body.into_bytes().await.is_err(),
        "a 1 MiB + 1 answer read whole"
    );
}

#[tokio::test]
async fn only_trusted_https_reaches_the_ca() {
    // Without the extra root the test server is not trusted.
    let (addr, _ca) = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_vec()).await;
    let client = CaClient::new(None).unwrap();
    let err = client
        .request(get_request(addr))
        .await
        .err()
        .expect("refused");
    let text = describe(&err);
    assert!(text.to_ascii_lowercase().contains("certificate"), "{text}");
    // Plain HTTP is refused before any connection.
    let plain = axum::http::Request::get("http://127.0.0.1:9/dir")
        .body(BodyWrapper::default())
        .unwrap();
    assert!(client.request(plain).await.is_err());
    // An unreadable extra root is named.
    let Err(e) = CaClient::new(Some(Path::new("/nonexistent/root.pem"))) else {
        panic!("an unreadable root file accepted");
    };
    assert!(e.to_string().contains("/nonexistent/root.pem"), "{e}");
}

#[test]
fn log_dates_are_rfc3339() {
    assert_eq!(date(0), "1970-01-01T00:00:00Z");
    assert_eq!(date(1_893_456_000), "2030-01-01T00:00:00Z");
    assert_eq!(date(i64::MAX), i64::MAX.to_string());
}
