//! The running server: binds every socket before serving (so a taken port fails fast
//! with its address), runs the listeners, tells systemd, and shuts down in order
//! (stop accepting, close long-lived connections with a proper close, exit).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use ipnet::IpNet;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::ice::{IceProvider, NoPeerEvents, PeerEvents};
use crate::metrics::{HttpMetrics, Metrics};
use crate::tls::Tls;

/// How long shutdown may take before the remaining tasks are abandoned.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(4);

/// State shared by every connection. Each piece has one owner; cores sit behind short
/// `std::sync::Mutex` sections inside their modules.
pub struct AppState {
    pub config: Arc<Config>,
    pub tls: Arc<Tls>,
    pub metrics: Metrics,
    pub http_metrics: HttpMetrics,
    pub metrics_allow: Vec<IpNet>,
    pub ice: Arc<IceProvider>,
    /// Told when a peer leaves its room for good; the relay drops its allocations.
    pub peer_events: Arc<dyn PeerEvents>,
    pub started: Instant,
    /// Cancelled when the server shuts down; long-lived tasks watch it.
    pub shutdown: CancellationToken,
    /// Long-lived tasks (WebSockets, relay IO) that shutdown waits for.
    pub tasks: TaskTracker,
    pub https_port: u16,
    /// Room signaling: the rooms core, its metrics and timings.
    pub signaling: Arc<crate::signaling::ws::Signaling>,
}

/// The addresses actually bound (ports differ from the config when it asks for 0).
#[derive(Debug, Clone, Copy)]
pub struct BoundAddrs {
    pub https: SocketAddr,
    pub redirect: Option<SocketAddr>,
    /// TURN listeners; `None` when `turn.enabled` is false (or TLS is off).
    pub turn_udp: Option<SocketAddr>,
    pub turn_tcp: Option<SocketAddr>,
    pub turn_tls: Option<SocketAddr>,
}

/// A bound, not yet running server.
pub struct Server {
    state: Arc<AppState>,
    https: TcpListener,
    redirect: Option<TcpListener>,
    relay: Option<crate::relay::Relay>,
    addrs: BoundAddrs,
}

impl Server {
    /// Loads TLS material and binds every socket. Errors name the address or file.
    pub async fn bind(config: Config) -> anyhow::Result<Server> {
        crate::tls::install_crypto_provider();
        let tls = Arc::new(Tls::load(&config).context("TLS setup failed")?);
        let https_addr = config.http_listen()?;
        let https = bind_tcp(https_addr, "http.listen").await?;
        let redirect = match config.redirect_listen()? {
            Some(addr) => Some(bind_tcp(addr, "http.redirect_listen").await?),
            None => None,
        };
        let secret = crate::ice::turn_secret(&config).context("TURN secret")?;
        let mut registry = Registry::default();
        let relay = if config.turn.enabled {
            let metrics = crate::relay::RelayMetrics::register(&mut registry);
            Some(crate::relay::Relay::bind(&config, secret.clone(), metrics).await?)
        } else {
            None
        };
        let relay_addrs = relay.as_ref().map(|r| r.addrs());
        let addrs = BoundAddrs {
            https: https.local_addr()?,
            redirect: redirect.as_ref().map(|l| l.local_addr()).transpose()?,
            turn_udp: relay_addrs.map(|a| a.udp),
            turn_tcp: relay_addrs.map(|a| a.tcp),
            turn_tls: relay_addrs.and_then(|a| a.tls),
        };
        // Clients are told the ports actually bound.
        let (turn_port, turns_port) = match relay_addrs {
            Some(a) => (a.udp.port(), a.tls.map(|t| t.port())),
            None => (
                config.turn_listen()?.port(),
                config.turn_tls_listen()?.map(|a| a.port()),
            ),
        };
        let ice = Arc::new(IceProvider::new(&config, secret, turn_port, turns_port));
        let peer_events: Arc<dyn PeerEvents> = match &relay {
            Some(r) => Arc::new(r.handle()),
            None => Arc::new(NoPeerEvents),
        };
        let http_metrics = HttpMetrics::register(&mut registry);
        let signaling_metrics = crate::signaling::ws::SignalingMetrics::register(&mut registry);
        let signaling = Arc::new(crate::signaling::ws::Signaling::new(
            &config,
            signaling_metrics,
        ));
        let metrics_allow = config.metrics_allow()?;
        let state = Arc::new(AppState {
            config: Arc::new(config),
            tls,
            metrics: Metrics::new(registry),
            http_metrics,
            metrics_allow,
            ice,
            peer_events,
            started: Instant::now(),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            https_port: addrs.https.port(),
            signaling,
        });
        Ok(Server {
            state,
            https,
            redirect,
            relay,
            addrs,
        })
    }

    pub fn addrs(&self) -> BoundAddrs {
        self.addrs
    }

    pub fn state(&self) -> Arc<AppState> {
        self.state.clone()
    }

    /// Logs the start-up banner: version, URLs, ports, certificate.
    pub fn log_banner(&self) {
        let s = &self.state;
        let host = if s.config.http.public_host.is_empty() {
            "localhost".to_string()
        } else {
            crate::ice::client_host(&s.config.http.public_host, None)
        };
        tracing::info!(version = env!("CARGO_PKG_VERSION"), "meshmeet starting");
        tracing::info!(
            listen = %self.addrs.https,
            "open https://{host}:{}/ in a browser",
            self.addrs.https.port()
        );
        if let Some(r) = self.addrs.redirect {
            tracing::info!(listen = %r, "plain HTTP redirects to HTTPS");
        }
        match (self.addrs.turn_udp, self.addrs.turn_tcp) {
            (Some(udp), Some(tcp)) => {
                tracing::info!(udp = %udp, tcp = %tcp, "STUN/TURN listening");
                if let Some(tls) = self.addrs.turn_tls {
                    tracing::info!(listen = %tls, "TURN over TLS listening");
                }
            }
            _ => tracing::info!("STUN/TURN disabled (turn.enabled = false)"),
        }
        tracing::info!(
            kind = %s.tls.kind(),
            sha256 = %s.tls.fingerprint(),
            path = %s.tls.cert_path().display(),
            "TLS certificate"
        );
    }

    /// Serves until `shutdown` resolves, then stops in order and returns.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        let state = self.state.clone();
        let app = crate::http::router(state.clone());
        let https = tokio::spawn(crate::http::serve_https(self.https, state.clone(), app));
        let redirect = self.redirect.map(|listener| {
            let router = crate::http::redirect_router(
                state.config.http.public_host.clone(),
                state.https_port,
            );
            let token = state.shutdown.clone();
            tokio::spawn(async move {
                let serve = axum::serve(listener, router)
                    .with_graceful_shutdown(async move { token.cancelled().await });
                if let Err(e) = serve.await {
                    tracing::warn!(error = %e, "redirect listener failed");
                }
            })
        });
        if let Some(relay) = self.relay {
            relay.spawn(
                state.shutdown.clone(),
                state.tasks.clone(),
                state.tls.clone(),
            );
        }
        notify_systemd(&[sd_notify::NotifyState::Ready]);
        tokio::select! {
            _ = shutdown => {},
            _ = state.shutdown.cancelled() => {},
        }
        tracing::info!("shutting down");
        notify_systemd(&[sd_notify::NotifyState::Stopping]);
        state.shutdown.cancel();
        state.tasks.close();
        let stop = async {
            let _ = https.await;
            if let Some(r) = redirect {
                let _ = r.await;
            }
            state.tasks.wait().await;
        };
        if tokio::time::timeout(SHUTDOWN_TIMEOUT, stop).await.is_err() {
            tracing::warn!("shutdown timed out; exiting anyway");
        }
        tracing::info!("stopped");
        Ok(())
    }
}

async fn bind_tcp(addr: SocketAddr, key: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (TCP, {key})"))
}

fn notify_systemd(states: &[sd_notify::NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        if let Err(e) = sd_notify::notify(false, states) {
            tracing::warn!(error = %e, "systemd notify failed");
        }
    }
}

/// An IPv4-mapped IPv6 address as plain IPv4, so allow-lists match either form.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The process signals the server reacts to, registered as soon as this is created
/// (a signal that arrives before registration would kill the process instead).
pub struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    hup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    /// Registers SIGTERM and SIGHUP handlers; needs a running tokio runtime.
    pub fn register() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate());
        let hup = signal(SignalKind::hangup());
        if let Err(e) = &term {
            tracing::warn!(error = %e, "cannot handle SIGTERM");
        }
        if let Err(e) = &hup {
            tracing::warn!(error = %e, "cannot handle SIGHUP");
        }
        Signals {
            term: term.ok(),
            hup: hup.ok(),
        }
    }

    /// Resolves on SIGTERM or Ctrl-C; reloads the certificate on every SIGHUP meanwhile.
    pub async fn until_stop(mut self, tls: Arc<Tls>) {
        async fn next(sig: &mut Option<tokio::signal::unix::Signal>) {
            match sig {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        loop {
            tokio::select! {
                _ = next(&mut self.term) => return,
                _ = tokio::signal::ctrl_c() => return,
                _ = next(&mut self.hup) => {
                    notify_systemd(&[sd_notify::NotifyState::Reloading]);
                    match tls.reload() {
                        Ok(fp) => tracing::info!(sha256 = %fp, "TLS certificate reloaded"),
                        Err(e) => tracing::error!(error = %e, "TLS reload failed; keeping the old certificate"),
                    }
                    notify_systemd(&[sd_notify::NotifyState::Ready]);
                }
            }
        }
    }
}

/// Raises the soft open-files limit to the hard limit (each WebSocket is a file
/// descriptor; the usual soft default of 1024 is far too low for a server). Returns the
/// new soft limit.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}
