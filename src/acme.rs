//! Certificates from an ACME CA (RFC 8555), obtained and renewed inside the server:
//! no certbot, no hook, no restart.
//!
//! One task owns the whole job. It plans (when is the served certificate due?), waits,
//! and orders: an account (created once, kept under `data_dir/acme/`), an order for
//! `tls.acme_domains`, one challenge per name answered by the listeners themselves
//! (TLS-ALPN-01 on the HTTPS listener, HTTP-01 on the redirect listener: see
//! [`challenge`]), a CSR with a fresh key, and the chain. The chain and key are checked,
//! written atomically ([`store`]) and handed to [`Tls::install`], which serves them to
//! every new HTTPS and TURN-over-TLS connection; open connections keep theirs.
//!
//! Timing ([`schedule`]): renewal at two thirds of the lifetime, or in the window the
//! CA's renewal information (ARI, RFC 9773) suggests, or `tls.acme_renew_before_s`
//! before expiry, each with jitter. A failed attempt leaves the current certificate
//! in place and is retried after `tls.acme_retry_s`, doubling up to six hours and never
//! sooner than the CA's `Retry-After`. The CA's problem documents (type, detail,
//! subproblems, and each failed challenge's error) are logged; keys never are.
//!
//! The CA is reached through the project's own HTTPS client: Mozilla's roots (webpki)
//! plus `tls.acme_directory_ca`, HTTPS only, every request and answer bounded in time
//! and size.

pub mod challenge;
pub mod schedule;
pub mod store;

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Limited;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use instant_acme::{
    Account, AuthorizationStatus, BodyWrapper, BytesResponse, CertificateIdentifier, Challenge,
    ChallengeType, HttpClient, Identifier, NewAccount, NewOrder, Order, OrderStatus, Problem,
    RetryPolicy,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{acme_identifier, AcmeChallenge, Config};
use crate::tls::{CertKind, Tls};
use challenge::{Challenges, ClearOnDrop};
use schedule::{renewal_due, retry_delay, CertInfo};
use store::Store;

/// Let's Encrypt's production directory, used when `tls.acme_directory` is empty.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// One whole attempt (account, order, validation, issuance) may take this long.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(300);
/// One request to the CA, until its answer's headers.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The renewal task plans again at least this often (seconds).
const MAX_SLEEP_S: i64 = 3600;
/// Largest answer read from the CA: directories, problems and chains are a few KiB.
const MAX_ANSWER_BYTES: usize = 1024 * 1024;
/// Polling an order while the CA validates or issues.
const POLL: RetryPolicy = RetryPolicy::new()
    .initial_delay(Duration::from_millis(250))
    .backoff(1.5)
    .timeout(Duration::from_secs(120));

#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    /// The CA could not be reached, or answered with a problem document.
    #[error("{step}: {detail}")]
    Ca { step: &'static str, detail: String },
    /// The CA refused the order (its problems, and each failed challenge's).
    #[error("the CA refused the order: {0}")]
    Refused(String),
    /// Something on this side: files, keys, an unusable answer.
    #[error("{0}")]
    Local(String),
    #[error("the attempt did not finish within {} s", ATTEMPT_TIMEOUT.as_secs())]
    Timeout,
}

/// Maps an instant-acme error at `step` to [`AcmeError::Ca`], with the CA's problem
/// document spelled out or the whole chain of causes.
fn ca(step: &'static str) -> impl Fn(instant_acme::Error) -> AcmeError {
    move |e| AcmeError::Ca {
        step,
        detail: describe(&e),
    }
}

/// An instant-acme error in words: the problem document, or the chain of causes.
pub fn describe(e: &instant_acme::Error) -> String {
    match e {
        instant_acme::Error::Api(p) => describe_problem(p),
        other => {
            let mut s = other.to_string();
            let mut source = std::error::Error::source(other);
            while let Some(cause) = source {
                let text = cause.to_string();
                if !s.contains(&text) {
                    s.push_str(": ");
                    s.push_str(&text);
                }
                source = cause.source();
            }
            s
        }
    }
}

/// Longest problem text logged: a CA's answer may be up to [`MAX_ANSWER_BYTES`].
const MAX_PROBLEM_CHARS: usize = 2000;

/// An RFC 7807 problem as the CA sent it: type, status, detail, subproblems (cut
/// after [`MAX_PROBLEM_CHARS`] characters).
pub fn describe_problem(p: &Problem) -> String {
    let full = problem_text(p);
    if full.chars().count() <= MAX_PROBLEM_CHARS {
        return full;
    }
    let mut cut: String = full.chars().take(MAX_PROBLEM_CHARS).collect();
    cut.push_str("...");
    cut
}

fn problem_text(p: &Problem) -> String {
    let mut s = String::from("problem");
    if let Some(t) = &p.r#type {
        s.push_str(&format!(" {t}"));
    }
    if let Some(status) = p.status {
        s.push_str(&format!(" (HTTP {status})"));
    }
    if let Some(d) = &p.detail {
        s.push_str(&format!(": {d}"));
    }
    for sub in &p.subproblems {
        s.push_str("; subproblem");
        if let Some(id) = &sub.identifier {
            s.push_str(&format!(" for {}", id.authorized(false)));
        }
        if let Some(t) = &sub.r#type {
            s.push_str(&format!(" {t}"));
        }
        if let Some(d) = &sub.detail {
            s.push_str(&format!(": {d}"));
        }
    }
    s
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    /// `success` or `failure`.
    result: &'static str,
}

/// The renewal task's figures.
#[derive(Clone, Default)]
pub struct AcmeMetrics {
    renewals: Family<ResultLabels, Counter>,
    last: Family<ResultLabels, Gauge>,
    next: Gauge,
}

impl AcmeMetrics {
    pub fn register(registry: &mut Registry) -> AcmeMetrics {
        let m = AcmeMetrics::default();
        registry.register(
            "meshmeet_acme_renewals",
            "ACME certificate orders by result (success, failure); the first order counts too",
            m.renewals.clone(),
        );
        registry.register(
            "meshmeet_acme_last_renewal_timestamp_seconds",
            "Unix time of the last ACME order by result (success, failure)",
            m.last.clone(),
        );
        registry.register(
            "meshmeet_acme_next_renewal_timestamp_seconds",
            "Unix time of the next planned ACME order (renewal, or retry after a failure)",
            m.next.clone(),
        );
        m
    }

    fn record(&self, result: &'static str, at: i64) {
        let labels = ResultLabels { result };
        self.renewals.get_or_create(&labels).inc();
        self.last.get_or_create(&labels).set(at);
    }
}

/// The HTTP client instant-acme talks to the CA through: HTTPS only, Mozilla's roots
/// plus the configured extra root, every answer bounded in time and size, and the
/// `Retry-After` of the last error answer kept for the retry schedule.
#[derive(Clone)]
struct CaClient {
    client: HyperClient<hyper_rustls::HttpsConnector<HttpConnector>, BodyWrapper<Bytes>>,
    retry_after: Arc<Mutex<Option<SystemTime>>>,
}

impl CaClient {
    fn new(extra_root: Option<&Path>) -> Result<CaClient, AcmeError> {
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        if let Some(path) = extra_root {
            let bytes = std::fs::read(path).map_err(|e| {
                AcmeError::Local(format!(
                    "cannot read tls.acme_directory_ca {}: {e}",
                    path.display()
                ))
            })?;
            for cert in rustls_pemfile::certs(&mut bytes.as_slice()) {
                let cert: CertificateDer<'static> = cert
                    .map_err(|e| AcmeError::Local(format!("{}: bad PEM: {e}", path.display())))?;
                roots.add(cert).map_err(|e| {
                    AcmeError::Local(format!("{}: unusable root: {e}", path.display()))
                })?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| AcmeError::Local(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        Ok(CaClient {
            client: HyperClient::builder(TokioExecutor::new()).build(https),
            retry_after: Arc::default(),
        })
    }

    /// Seconds the CA asked to wait in its last error answer, once.
    fn take_retry_after(&self) -> Option<u64> {
        let at = self
            .retry_after
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        Some(
            at.duration_since(SystemTime::now())
                .map_or(0, |d| d.as_secs()),
        )
    }
}

/// `Retry-After`: delay seconds or an HTTP date.
fn parse_retry_after(value: &str, now: SystemTime) -> Option<SystemTime> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return now.checked_add(Duration::from_secs(secs.min(schedule::MAX_RETRY_AFTER_S)));
    }
    httpdate::parse_http_date(value).ok()
}

impl HttpClient for CaClient {
    fn request(
        &self,
        req: axum::http::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let answer = self.client.request(req);
        let retry_after = self.retry_after.clone();
        Box::pin(async move {
            let rsp = match tokio::time::timeout(REQUEST_TIMEOUT, answer).await {
                Ok(Ok(rsp)) => rsp,
                Ok(Err(e)) => return Err(instant_acme::Error::Other(Box::new(e))),
                Err(_) => {
                    return Err(instant_acme::Error::Other(
                        format!(
                            "the CA did not answer within {} s",
                            REQUEST_TIMEOUT.as_secs()
                        )
                        .into(),
                    ))
                }
            };
            let status = rsp.status();
            if status.is_client_error() || status.is_server_error() {
                let at = rsp
                    .headers()
                    .get(axum::http::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, SystemTime::now()));
                if at.is_some() {
                    *retry_after.lock().unwrap_or_else(|p| p.into_inner()) = at;
                }
            }
            Ok(BytesResponse::from(
                rsp.map(|body| Limited::new(body, MAX_ANSWER_BYTES)),
            ))
        })
    }
}

/// Which challenge to answer among those the CA offers for a name.
pub fn pick_challenge(
    wanted: AcmeChallenge,
    http01_available: bool,
    offered: &[Challenge],
) -> Option<ChallengeType> {
    let has = |t: &ChallengeType| offered.iter().any(|c| &c.r#type == t);
    let (tls, http) = (ChallengeType::TlsAlpn01, ChallengeType::Http01);
    match wanted {
        AcmeChallenge::TlsAlpn01 => has(&tls).then_some(tls),
        AcmeChallenge::Http01 => has(&http).then_some(http),
        AcmeChallenge::Auto if has(&tls) => Some(tls),
        AcmeChallenge::Auto => (http01_available && has(&http)).then_some(http),
    }
}

fn challenge_name(t: &ChallengeType) -> String {
    match t {
        ChallengeType::Http01 => "http-01".into(),
        ChallengeType::Dns01 => "dns-01".into(),
        ChallengeType::TlsAlpn01 => "tls-alpn-01".into(),
        ChallengeType::DeviceAttest01 => "device-attest-01".into(),
        ChallengeType::Unknown(s) => s.clone(),
        other => format!("{other:?}"),
    }
}

/// An ACME identifier in canonical form (see [`acme_identifier`]).
fn identifier_text(id: &Identifier) -> String {
    match id {
        Identifier::Dns(d) => d.to_ascii_lowercase(),
        Identifier::Ip(ip) => ip.to_string(),
        other => format!("{other:?}"),
    }
}

/// Checks an issued chain and its key before anything is stored: they parse, match,
/// are valid now and cover every name.
pub fn check_issued(
    chain_pem: &str,
    key_pem: &str,
    names: &[String],
    now: i64,
) -> Result<CertInfo, String> {
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("the issued chain is not PEM: {e}"))?;
    let leaf = certs.first().ok_or("the CA sent no certificate")?.clone();
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .ok()
        .flatten()
        .ok_or("the generated key does not parse")?;
    let provider = rustls::crypto::ring::default_provider();
    rustls::sign::CertifiedKey::from_der(certs, key, &provider)
        .map_err(|e| format!("the issued certificate does not match its key: {e}"))?;
    let info = CertInfo::from_der(leaf.as_ref())?;
    if !info.covers(names) {
        return Err(format!(
            "the issued certificate names {:?}, not all of {names:?}",
            info.names
        ));
    }
    if !info.valid_at(now) {
        return Err("the issued certificate is not valid now".into());
    }
    Ok(info)
}

/// What [`Acme::plan`] decided.
struct Plan {
    /// Unix time the next order is due (now or earlier: order at once).
    due: i64,
    /// Unix time to ask the CA's renewal information again, if it gave any.
    recheck: Option<i64>,
    /// The served certificate, when the next order replaces it (ARI).
    replaces: Option<CertificateIdentifier<'static>>,
    /// The served certificate's validity and names, when it is an ACME certificate
    /// for the configured names.
    current: Option<CertInfo>,
}

/// The certificate manager: one per server with `tls.acme_domains` set.
pub struct Acme {
    names: Vec<String>,
    identifiers: Vec<Identifier>,
    contact: Vec<String>,
    directory: String,
    profile: Option<String>,
    challenge: AcmeChallenge,
    http01_available: bool,
    renew_before_s: u64,
    retry_s: u64,
    store: Store,
    tls: Arc<Tls>,
    challenges: Arc<Challenges>,
    http: CaClient,
    metrics: AcmeMetrics,
    account: Option<Account>,
    failures: u32,
    /// The served certificate's fingerprint and its random draw for the jitter.
    jitter: Option<(String, f64)>,
    /// The CA's last renewal information for the served certificate.
    ari: Option<AriCache>,
}

/// Renewal information (ARI) as the CA last gave it, for one certificate.
struct AriCache {
    fingerprint: String,
    window: (i64, i64),
    /// Unix time to ask again.
    recheck: i64,
    id: CertificateIdentifier<'static>,
}

/// A Unix time as an RFC 3339 date for the log.
fn date(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

fn now_unix() -> i64 {
    i64::try_from(crate::clock::unix_secs()).unwrap_or(i64::MAX)
}

impl Acme {
    /// The manager for `cfg`, or `None` when ACME is off.
    pub fn new(
        cfg: &Config,
        tls: Arc<Tls>,
        metrics: AcmeMetrics,
    ) -> Result<Option<Acme>, AcmeError> {
        let t = &cfg.tls;
        if !t.acme_enabled() {
            return Ok(None);
        }
        let Some(challenges) = tls.challenges() else {
            return Err(AcmeError::Local(
                "TLS was loaded without ACME challenge support".into(),
            ));
        };
        let names = t
            .acme_domains
            .iter()
            .map(|n| acme_identifier(n))
            .collect::<Result<Vec<_>, _>>()
            .map_err(AcmeError::Local)?;
        let identifiers = names
            .iter()
            .map(|n| match n.parse() {
                Ok(ip) => Identifier::Ip(ip),
                Err(_) => Identifier::Dns(n.clone()),
            })
            .collect();
        let extra_root = (!t.acme_directory_ca.is_empty()).then(|| Path::new(&t.acme_directory_ca));
        Ok(Some(Acme {
            names,
            identifiers,
            contact: if t.acme_email.is_empty() {
                Vec::new()
            } else {
                vec![format!("mailto:{}", t.acme_email)]
            },
            directory: if t.acme_directory.is_empty() {
                LETS_ENCRYPT.to_string()
            } else {
                t.acme_directory.clone()
            },
            profile: (!t.acme_profile.is_empty()).then(|| t.acme_profile.clone()),
            challenge: t.acme_challenge,
            http01_available: cfg.http.redirect_listen.is_some(),
            renew_before_s: t.acme_renew_before_s,
            retry_s: t.acme_retry_s,
            store: Store::new(&cfg.data_dir),
            tls,
            challenges,
            http: CaClient::new(extra_root)?,
            metrics,
            account: None,
            failures: 0,
            jitter: None,
            ari: None,
        }))
    }

    /// The configured names, canonical.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn directory(&self) -> &str {
        &self.directory
    }

    /// Runs the plan-wait-order loop until `shutdown`.
    pub fn spawn(self, shutdown: CancellationToken, tasks: &TaskTracker) {
        tasks.spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = self.run() => {}
            }
        });
    }

    async fn run(mut self) {
        // No order before this (Unix time): the retry backoff, or the pause after a
        // success that keeps a too-eager renew_before_s from ordering in a loop.
        let mut earliest = 0i64;
        let mut announced = None;
        loop {
            let plan = self.plan().await;
            let now = now_unix();
            let at = plan.due.max(earliest);
            self.metrics.next.set(at);
            if at > now {
                // Said once per planned time, not at every hourly look.
                if let Some(info) = plan.current.as_ref().filter(|_| announced != Some(at)) {
                    announced = Some(at);
                    tracing::info!(
                        names = ?self.names,
                        not_after = %date(info.not_after),
                        renew_at = %date(at),
                        "ACME certificate valid; renewal planned"
                    );
                }
                // Awake at least hourly to plan again: the wall clock may have moved
                // (a suspended VM, a clock step), and the CA's renewal information
                // is asked again when it said to.
                let wake = plan
                    .recheck
                    .map_or(at, |r| r.clamp(now + 1, at))
                    .min(now + MAX_SLEEP_S);
                sleep_until_unix(wake).await;
                if wake < at {
                    continue;
                }
            }
            match &plan.current {
                Some(info) => tracing::info!(
                    names = ?self.names,
                    directory = %self.directory,
                    not_after = %date(info.not_after),
                    "renewing the ACME certificate"
                ),
                None => tracing::info!(
                    names = ?self.names,
                    directory = %self.directory,
                    serving = %self.tls.kind(),
                    "ordering an ACME certificate; the current certificate is served meanwhile"
                ),
            }
            let outcome =
                match tokio::time::timeout(ATTEMPT_TIMEOUT, self.obtain(plan.replaces)).await {
                    Ok(r) => r,
                    Err(_) => Err(AcmeError::Timeout),
                };
            let now = now_unix();
            match outcome {
                Ok((fingerprint, info)) => {
                    self.failures = 0;
                    self.metrics.record("success", now);
                    earliest = now.saturating_add(self.retry_s as i64);
                    tracing::info!(
                        names = ?self.names,
                        sha256 = %fingerprint,
                        not_after = %date(info.not_after),
                        "ACME certificate installed: new connections get it, open ones keep theirs"
                    );
                }
                Err(e) => {
                    self.failures = self.failures.saturating_add(1);
                    self.metrics.record("failure", now);
                    // The account may be what failed (deactivated, or the CA lost it).
                    if matches!(
                        e,
                        AcmeError::Ca {
                            step: "account",
                            ..
                        }
                    ) {
                        self.account = None;
                    }
                    let delay =
                        retry_delay(self.failures, self.retry_s, self.http.take_retry_after());
                    earliest = now.saturating_add(delay as i64);
                    tracing::warn!(
                        names = ?self.names,
                        directory = %self.directory,
                        error = %e,
                        failures = self.failures,
                        retry_in_s = delay,
                        serving = %self.tls.kind(),
                        "ACME order failed; the current certificate stays in use"
                    );
                }
            }
        }
    }

    /// When the served certificate is due: at once unless it is an ACME certificate
    /// for every configured name, valid now; else per [`renewal_due`], with the CA's
    /// renewal information when it offers some.
    async fn plan(&mut self) -> Plan {
        let now = now_unix();
        let at_once = Plan {
            due: now,
            recheck: None,
            replaces: None,
            current: None,
        };
        if self.tls.kind() != CertKind::Acme {
            return at_once;
        }
        let leaf = self.tls.leaf();
        let Ok(info) = CertInfo::from_der(leaf.as_ref()) else {
            return at_once;
        };
        if !info.covers(&self.names) || !info.valid_at(now) {
            return at_once;
        }
        let fingerprint = self.tls.fingerprint();
        // One random draw per certificate: plans made again (hourly, or after the
        // CA's renewal information changed) keep its place in the window.
        let unit = match &self.jitter {
            Some((fp, unit)) if *fp == fingerprint => *unit,
            _ => {
                let unit = rand::random::<f64>();
                self.jitter = Some((fingerprint.clone(), unit));
                unit
            }
        };
        // The CA's renewal information, asked again only when it said to.
        let (ari, recheck, replaces) = match &self.ari {
            Some(c) if c.fingerprint == fingerprint && now < c.recheck => {
                (Some(c.window), Some(c.recheck), Some(c.id.clone()))
            }
            _ => {
                let (ari, recheck, replaces) = self.renewal_info(&leaf).await;
                self.ari = match (ari, recheck, &replaces) {
                    (Some(window), Some(recheck), Some(id)) => Some(AriCache {
                        fingerprint,
                        window,
                        recheck,
                        id: id.clone(),
                    }),
                    _ => None,
                };
                (ari, recheck, replaces)
            }
        };
        let due = renewal_due(&info, self.renew_before_s, ari, unit);
        Plan {
            due,
            recheck,
            replaces,
            current: Some(info),
        }
    }

    /// The CA's suggested renewal window for `leaf`, when to ask again, and the id to
    /// name in the replacing order. Nothing when the CA has no renewal information or
    /// cannot be reached (the default schedule applies then).
    async fn renewal_info(
        &mut self,
        leaf: &CertificateDer<'static>,
    ) -> (
        Option<(i64, i64)>,
        Option<i64>,
        Option<CertificateIdentifier<'static>>,
    ) {
        let Ok(id) = CertificateIdentifier::try_from(leaf) else {
            return (None, None, None);
        };
        let id = id.into_owned();
        let asked = async {
            let account = self.account().await.ok()?;
            match account.renewal_info(&id).await {
                Ok(answer) => Some(answer),
                Err(instant_acme::Error::Unsupported(_)) => None,
                Err(e) => {
                    tracing::debug!(error = %describe(&e), "no ACME renewal information");
                    None
                }
            }
        };
        match tokio::time::timeout(REQUEST_TIMEOUT * 2, asked).await {
            Ok(Some((info, ask_again))) => {
                let w = info.suggested_window;
                let again = ask_again.as_secs().clamp(60, 86400) as i64;
                (
                    Some((w.start.unix_timestamp(), w.end.unix_timestamp())),
                    Some(now_unix() + again),
                    Some(id),
                )
            }
            _ => (None, None, None),
        }
    }

    /// The account: loaded once from `data_dir/acme/account.json`, or created there.
    async fn account(&mut self) -> Result<Account, AcmeError> {
        if let Some(a) = &self.account {
            return Ok(a.clone());
        }
        let builder = || Account::builder_with_http(Box::new(self.http.clone()));
        let stored = match self.store.load_account(&self.directory) {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(error = %e, "unusable ACME account file; creating a new account");
                None
            }
        };
        let account = match stored {
            Some(credentials) => builder()
                .from_credentials(credentials)
                .await
                .map_err(ca("account"))?,
            None => {
                let contact: Vec<&str> = self.contact.iter().map(String::as_str).collect();
                let (account, credentials) = builder()
                    .create(
                        &NewAccount {
                            contact: &contact,
                            terms_of_service_agreed: true,
                            only_return_existing: false,
                        },
                        self.directory.clone(),
                        None,
                    )
                    .await
                    .map_err(ca("account"))?;
                self.store
                    .save_account(&self.directory, credentials)
                    .map_err(|e| AcmeError::Local(e.to_string()))?;
                tracing::info!(directory = %self.directory, "ACME account created");
                account
            }
        };
        self.account = Some(account.clone());
        Ok(account)
    }

    /// One order, from the account to the installed certificate. Returns the new
    /// certificate's fingerprint and validity.
    async fn obtain(
        &mut self,
        replaces: Option<CertificateIdentifier<'static>>,
    ) -> Result<(String, CertInfo), AcmeError> {
        let account = self.account().await?;
        let mut new_order = NewOrder::new(&self.identifiers);
        if let Some(p) = &self.profile {
            new_order = new_order.profile(p);
        }
        if let Some(r) = replaces {
            new_order = new_order.replaces(r);
        }
        let mut order = account
            .new_order(&new_order)
            .await
            .map_err(ca("new order"))?;
        // Whatever happens from here, no answer stays pending.
        let _pending = ClearOnDrop(self.challenges.clone());
        self.answer_challenges(&mut order).await?;
        let status = match order.poll_ready(&POLL).await {
            Ok(s) => s,
            Err(e @ instant_acme::Error::Api(_)) => {
                return Err(AcmeError::Refused(self.why_invalid(&mut order, &e).await));
            }
            Err(e) => return Err(ca("validation")(e)),
        };
        if status != OrderStatus::Ready {
            let e = instant_acme::Error::Other(format!("order {status:?}").into());
            return Err(AcmeError::Refused(self.why_invalid(&mut order, &e).await));
        }
        let key = rcgen::KeyPair::generate().map_err(|e| AcmeError::Local(e.to_string()))?;
        let mut params = rcgen::CertificateParams::new(self.names.clone())
            .map_err(|e| AcmeError::Local(e.to_string()))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params
            .serialize_request(&key)
            .map_err(|e| AcmeError::Local(e.to_string()))?;
        order
            .finalize_csr(csr.der())
            .await
            .map_err(ca("finalize"))?;
        let chain = order
            .poll_certificate(&POLL)
            .await
            .map_err(ca("certificate"))?;
        let key_pem = key.serialize_pem();
        let info =
            check_issued(&chain, &key_pem, &self.names, now_unix()).map_err(AcmeError::Local)?;
        self.store
            .save_certificate(&chain, &key_pem)
            .map_err(|e| AcmeError::Local(e.to_string()))?;
        let fingerprint = self
            .tls
            .install(
                &self.store.cert_path(),
                &self.store.key_path(),
                CertKind::Acme,
            )
            .map_err(|e| AcmeError::Local(e.to_string()))?;
        Ok((fingerprint, info))
    }

    /// Puts up the answer to one challenge per pending authorization and tells the
    /// CA to validate it.
    async fn answer_challenges(&self, order: &mut Order) -> Result<(), AcmeError> {
        // One authorization per name: more would be a CA misbehaving, and each one
        // would hold a pending answer.
        let count = order.state().authorizations.len();
        if count > self.names.len() {
            return Err(AcmeError::Refused(format!(
                "the CA asks for {count} authorizations for {} names",
                self.names.len()
            )));
        }
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz.map_err(ca("authorization"))?;
            let name = identifier_text(authz.identifier().identifier);
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => {
                    return Err(AcmeError::Refused(format!(
                        "the authorization for {name} is {other:?}"
                    )))
                }
            }
            let Some(kind) =
                pick_challenge(self.challenge, self.http01_available, &authz.challenges)
            else {
                let offered: Vec<String> = authz
                    .challenges
                    .iter()
                    .map(|c| challenge_name(&c.r#type))
                    .collect();
                return Err(AcmeError::Refused(format!(
                    "no challenge for {name} that this server can answer (tls.acme_challenge = {}, \
                     http.redirect_listen {}); the CA offers {offered:?}",
                    self.challenge,
                    if self.http01_available { "on" } else { "off" },
                )));
            };
            let mut challenge = authz
                .challenge(kind.clone())
                .ok_or_else(|| AcmeError::Local(format!("challenge for {name} vanished")))?;
            let key_authorization = challenge.key_authorization();
            match kind {
                ChallengeType::TlsAlpn01 => self
                    .challenges
                    .add_tls_alpn01(&name, key_authorization.digest().as_ref())
                    .map_err(AcmeError::Local)?,
                _ => self
                    .challenges
                    .add_http01(&challenge.token, key_authorization.as_str()),
            }
            tracing::debug!(%name, challenge = %challenge_name(&kind), "ACME challenge ready");
            challenge.set_ready().await.map_err(ca("challenge"))?;
        }
        Ok(())
    }

    /// Why an order failed, in the CA's words: each failed challenge's problem
    /// (fetched anew), the most specific; else the order's problem, or `e`.
    async fn why_invalid(&self, order: &mut Order, e: &instant_acme::Error) -> String {
        let order_problem = order.state().error.as_ref().map(describe_problem);
        let mut parts = Vec::new();
        let mut authorizations = order.authorizations();
        while let Some(Ok(mut authz)) = authorizations.next().await {
            let Ok(state) = authz.refresh().await else {
                continue;
            };
            let name = identifier_text(state.identifier().identifier);
            for c in &state.challenges {
                if let Some(p) = &c.error {
                    parts.push(format!(
                        "{} for {name}: {}",
                        challenge_name(&c.r#type),
                        describe_problem(p)
                    ));
                }
            }
        }
        if parts.is_empty() {
            order_problem.unwrap_or_else(|| describe(e))
        } else {
            parts.join("; ")
        }
    }
}

async fn sleep_until_unix(at: i64) {
    let wait = at.saturating_sub(now_unix()).max(0) as u64;
    tokio::time::sleep(Duration::from_secs(wait)).await;
}

#[cfg(test)]
mod tests;
