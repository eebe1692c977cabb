//! The running server: binds every socket before serving (so a taken port fails fast
//! with its address), runs the listeners, tells systemd, and shuts down in order
//! (stop accepting, close long-lived connections with a proper close, exit).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::http::HttpState;
use crate::ice::{IceProvider, NoPeerEvents, PeerEvents, TurnPorts};
use crate::metrics::{HttpMetrics, Metrics};
use crate::signaling::ws::{Signaling, SignalingConfig, SignalingMetrics};
use crate::sys::notify_systemd;
use crate::tls::Tls;

/// How long shutdown may take before the remaining tasks are abandoned.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(4);

/// Handles to the running server's shared parts, for the process (signals) and for
/// tests. HTTP and signaling are built with only the pieces they use; the relay's IO
/// reads `shutdown`, `tasks` and `tls` from here.
pub struct AppState {
    pub tls: Arc<Tls>,
    pub metrics: Arc<Metrics>,
    /// Room signaling: the rooms core, its metrics and timings.
    pub signaling: Arc<Signaling>,
    /// Told when a peer leaves its room for good; the relay drops its allocations.
    pub peer_events: Arc<dyn PeerEvents>,
    /// Cancelled when the server shuts down; long-lived tasks watch it.
    pub shutdown: CancellationToken,
    /// Long-lived tasks (WebSockets, relay IO) that shutdown waits for.
    pub tasks: TaskTracker,
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
    config: Arc<Config>,
    http: HttpState,
    http_metrics: HttpMetrics,
    https_limits: crate::http::HttpsLimits,
    redirect_limits: crate::http::HttpsLimits,
    https: TcpListener,
    redirect: Option<TcpListener>,
    relay: Option<crate::relay::Relay>,
    acme: Option<crate::acme::Acme>,
    cluster: Option<Arc<crate::cluster::Cluster>>,
    addrs: BoundAddrs,
}

impl Server {
    /// Loads TLS material and binds every socket. Errors name the address or file.
    pub async fn bind(config: Config) -> anyhow::Result<Server> {
        crate::tls::install_crypto_provider();
        let tls = Arc::new(Tls::load(&config).context("TLS setup failed")?);
        let https = bind_tcp(config.http.listen, "http.listen").await?;
        let redirect = match config.http.redirect_listen {
            Some(addr) => Some(bind_tcp(addr, "http.redirect_listen").await?),
            None => None,
        };
        let secret = crate::ice::turn_secret(&config).context("TURN secret")?;
        let mut registry = Registry::default();
        let relay = if config.turn.enabled {
            let metrics = crate::relay::RelayMetrics::register(&mut registry);
            use crate::relay::policy::Listener;
            let mut others = vec![Listener::Tcp(https.local_addr()?)];
            if let Some(r) = &redirect {
                others.push(Listener::Tcp(r.local_addr()?));
            }
            Some(
                crate::relay::Relay::bind(&config, secret.expose().to_owned(), metrics, &others)
                    .await?,
            )
        } else {
            None
        };
        let relay_addrs = relay.as_ref().map(|r| r.addrs());
        let addrs = BoundAddrs {
            https: https.local_addr()?,
            redirect: redirect.as_ref().map(|l| l.local_addr()).transpose()?,
            turn_udp: relay_addrs.as_ref().map(|a| a.udp),
            turn_tcp: relay_addrs.as_ref().map(|a| a.tcp),
            turn_tls: relay_addrs.as_ref().and_then(|a| a.tls),
        };
        // Clients are told the ports actually bound.
        let turn_ports = match &relay_addrs {
            Some(a) => TurnPorts {
                main: a.udp.port(),
                extra_udp: a.extra_udp.iter().map(|u| u.port()).collect(),
                https: config.turn.share_https_port.then_some(addrs.https.port()),
                tls: a.tls.map(|t| t.port()),
            },
            None => TurnPorts::default(),
        };
        let ice = Arc::new(IceProvider::new(&config, secret, turn_ports));
        let peer_events: Arc<dyn PeerEvents> = match &relay {
            Some(r) => Arc::new(r.handle()),
            None => Arc::new(NoPeerEvents),
        };
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        registry.register(
            "meshmeet_tls_certificate_not_after_seconds",
            "Expiry of the served TLS certificate (Unix time)",
            tls.not_after_gauge(),
        );
        let acme = crate::acme::Acme::new(
            &config,
            tls.clone(),
            crate::acme::AcmeMetrics::register(&mut registry),
        )
        .context("ACME setup failed")?;
        let http_metrics = HttpMetrics::register(&mut registry);
        let https_limits = crate::http::HttpsLimits::from_config(
            &config.http,
            crate::limits::LimitMetrics::register(&mut registry, "https"),
        );
        let redirect_limits = crate::http::redirect_limits(
            &config.http,
            crate::limits::LimitMetrics::register(&mut registry, "http_redirect"),
        );
        let signaling = Arc::new(Signaling::new(
            SignalingConfig::from_config(&config),
            ice,
            peer_events.clone(),
            shutdown.clone(),
            tasks.clone(),
            SignalingMetrics::register(&mut registry),
        ));
        signaling.restore_saved();
        let cluster = if config.cluster.enabled() {
            let m = crate::cluster::ClusterMetrics::register(&mut registry);
            let c = Arc::new(
                crate::cluster::Cluster::connect(&config.cluster, m)
                    .await
                    .context("cluster setup failed")?,
            );
            signaling.set_cluster(c.clone());
            Some(c)
        } else {
            None
        };
        let metrics = Arc::new(Metrics::new(registry));
        let http = HttpState {
            // An ACME server serves a trusted certificate (or, until the first one
            // arrives, a self-signed one, over which browsers ignore HSTS).
            cert_kind: if acme.is_some() {
                crate::tls::CertKind::Acme
            } else {
                tls.kind()
            },
            metrics: metrics.clone(),
            http_metrics: http_metrics.clone(),
            metrics_allow: config.http.metrics_allow.clone(),
            started: Instant::now(),
            signaling: signaling.clone(),
        };
        let state = Arc::new(AppState {
            tls,
            metrics,
            signaling,
            peer_events,
            shutdown,
            tasks,
        });
        Ok(Server {
            state,
            config: Arc::new(config),
            http,
            http_metrics,
            https_limits,
            redirect_limits,
            https,
            redirect,
            relay,
            acme,
            cluster,
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
        let host = crate::net::client_host(&self.config.http.public_host, None);
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
        if let Some(acme) = &self.acme {
            tracing::info!(
                names = ?acme.names(),
                directory = %acme.directory(),
                challenge = %self.config.tls.acme_challenge,
                "ACME certificates on"
            );
        }
    }

    /// Serves until `shutdown` resolves, then stops in order and returns.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        let state = self.state.clone();
        let app = crate::http::router(self.http);
        // The relay first: the HTTPS listener hands it TURN connections on its port.
        let turn_entry = self.relay.map(|relay| {
            relay.spawn(
                state.shutdown.clone(),
                state.tasks.clone(),
                state.tls.clone(),
            )
        });
        let turn_entry = turn_entry.filter(|_| self.config.turn.share_https_port);
        let https = tokio::spawn(crate::http::serve_https(
            self.https,
            state.tls.clone(),
            self.http_metrics,
            state.shutdown.clone(),
            app,
            self.https_limits,
            turn_entry,
        ));
        let redirect = self.redirect.map(|listener| {
            let router = crate::http::redirect_router(
                self.config.http.public_host.clone(),
                self.addrs.https.port(),
                state.tls.challenges(),
            );
            tokio::spawn(crate::http::serve_redirect(
                listener,
                router,
                state.shutdown.clone(),
                self.redirect_limits,
            ))
        });
        state.signaling.spawn_saver();
        if let Some(cluster) = &self.cluster {
            tracing::info!(node = %cluster.node, "cluster node; rooms are shared through NATS");
            cluster.spawn(
                state.signaling.clone(),
                state.shutdown.clone(),
                &state.tasks,
            );
        }
        if let Some(acme) = self.acme {
            acme.spawn(state.shutdown.clone(), &state.tasks);
        }
        notify_systemd(&[sd_notify::NotifyState::Ready]);
        tokio::select! {
            _ = shutdown => {},
            _ = state.shutdown.cancelled() => {},
        }
        tracing::info!("shutting down");
        notify_systemd(&[sd_notify::NotifyState::Stopping]);
        // The rooms as they are now, before closing the sockets: their peers resume
        // after the restart.
        state.signaling.save_for_shutdown().await;
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
