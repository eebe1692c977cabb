//! Shared test helpers: an in-process server on port 0 with a self-signed certificate
//! that shuts down on drop, and clients that trust that certificate.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use meshmeet::app::{AppState, BoundAddrs};
use meshmeet::{Config, Server};
use tokio::sync::oneshot;

pub struct TestServer {
    pub addrs: BoundAddrs,
    pub state: Arc<AppState>,
    pub data_dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// A config for tests: loopback, port 0 everywhere, state in a fresh temp dir.
pub fn test_config(data_dir: &std::path::Path) -> Config {
    let mut c = Config::default();
    c.data_dir = data_dir.to_path_buf();
    c.http.listen = "127.0.0.1:0".into();
    c.turn.listen = "127.0.0.1:0".into();
    c.turn.tls_listen = "127.0.0.1:0".into();
    c.log.level = "warn".into();
    c
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    /// Starts a server after `edit` adjusts the test config.
    pub async fn start_with(edit: impl FnOnce(&mut Config)) -> TestServer {
        let data_dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = test_config(data_dir.path());
        edit(&mut cfg);
        cfg.validate().expect("test config is valid");
        let server = Server::bind(cfg).await.expect("server binds");
        let addrs = server.addrs();
        let state = server.state();
        let (tx, rx) = oneshot::channel();
        let done = tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        TestServer {
            addrs,
            state,
            data_dir,
            stop: Some(tx),
            done: Some(done),
        }
    }

    pub fn https_addr(&self) -> SocketAddr {
        self.addrs.https
    }

    /// `https://localhost:PORT` (the self-signed certificate names localhost).
    pub fn base_url(&self) -> String {
        format!("https://localhost:{}", self.addrs.https.port())
    }

    pub fn ws_url(&self) -> String {
        format!("wss://localhost:{}/ws", self.addrs.https.port())
    }

    pub fn origin(&self) -> String {
        self.base_url()
    }

    pub fn cert_path(&self) -> PathBuf {
        self.state.tls.cert_path().to_path_buf()
    }

    pub fn cert_pem(&self) -> Vec<u8> {
        std::fs::read(self.cert_path()).expect("certificate readable")
    }

    /// An HTTPS client that trusts this server's certificate (and nothing else).
    pub fn http_client(&self) -> reqwest::Client {
        let cert = reqwest::Certificate::from_pem(&self.cert_pem()).expect("cert");
        reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(cert)
            .resolve("localhost", self.addrs.https)
            .build()
            .expect("client")
    }

    /// A rustls client config trusting this server's certificate (for WebSocket and
    /// raw TLS clients).
    pub fn rustls_client_config(&self) -> Arc<rustls::ClientConfig> {
        meshmeet::tls::install_crypto_provider();
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut self.cert_pem().as_slice()) {
            roots.add(cert.expect("pem")).expect("root");
        }
        Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }

    /// Stops the server and waits for it to finish.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.done.take() {
            Some(done) => done.await?,
            None => Ok(()),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}
