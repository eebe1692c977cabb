//! A minimal signaling client for tests: JSON over a real WebSocket over TLS.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use super::TestServer;

pub const WAIT: Duration = Duration::from_secs(20);

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// The upgrade request with the server's own Origin.
pub fn request(
    server: &TestServer,
    origin: Option<&str>,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let mut req = server.ws_url().into_client_request().expect("request");
    if let Some(o) = origin {
        req.headers_mut()
            .insert("origin", o.parse().expect("origin header"));
    }
    req
}

pub async fn try_connect(
    server: &TestServer,
    origin: Option<&str>,
) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
    let connector = Connector::Rustls(server.rustls_client_config());
    let (ws, _) = tokio_tungstenite::connect_async_tls_with_config(
        request(server, origin),
        None,
        false,
        Some(connector),
    )
    .await?;
    Ok(Client { ws })
}

/// A WebSocket to a server run as a child process (its data directory `dir`, its
/// HTTPS address `addr`), trusting the self-signed certificate it wrote there.
pub async fn connect_child(dir: &std::path::Path, addr: std::net::SocketAddr) -> Client {
    let pem = std::fs::read(dir.join("data/selfsigned-cert.pem")).expect("cert");
    let connector = Connector::Rustls(super::rustls_client_config(&pem));
    let url = format!("wss://localhost:{}/ws", addr.port());
    let (ws, _) =
        tokio_tungstenite::connect_async_tls_with_config(url, None, false, Some(connector))
            .await
            .expect("websocket connects");
    Client { ws }
}

pub async fn connect(server: &TestServer) -> Client {
    try_connect(server, Some(&server.origin()))
        .await
        .expect("websocket connects")
}

impl Client {
    pub async fn send(&mut self, v: Value) {
        self.ws
            .send(Message::text(v.to_string()))
            .await
            .expect("send");
    }

    pub async fn send_raw(&mut self, m: Message) {
        self.ws.send(m).await.expect("send");
    }

    /// The next JSON message but `room_state` (protocol 1.1; these tests speak 1.0
    /// unless they ask for it with [`Client::recv_any`]). Pings are answered by the
    /// library and skipped.
    pub async fn recv(&mut self) -> Value {
        loop {
            let v = self.recv_any().await;
            if v["type"] != "room_state" {
                return v;
            }
        }
    }

    /// The next JSON message, whatever its type.
    pub async fn recv_any(&mut self) -> Value {
        loop {
            let m = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("message within the wait")
                .expect("stream open")
                .expect("no error");
            match m {
                Message::Text(t) => return serde_json::from_str(t.as_str()).expect("JSON"),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }

    /// Reads until the server's close frame; returns its code.
    pub async fn close_code(&mut self) -> u16 {
        loop {
            let m = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("close within the wait");
            match m {
                Some(Ok(Message::Close(Some(f)))) => return u16::from(f.code),
                Some(Ok(Message::Close(None))) => return u16::from(CloseCode::Status),
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("error before close frame: {e}"),
                None => panic!("stream ended without a close frame"),
            }
        }
    }

    /// Closes the socket and waits for the server's answering close frame. The server
    /// takes the connection out of its rooms core before it answers, so afterwards the
    /// peer is in its resume grace (or gone).
    pub async fn close_and_wait(mut self) {
        self.ws.close(None).await.expect("close frame sent");
        loop {
            match tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("server closes within the wait")
            {
                None | Some(Err(_)) => return,
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Reads messages until one of type `ty`, returning it.
    pub async fn recv_type(&mut self, ty: &str) -> Value {
        loop {
            let v = self.recv().await;
            if v["type"] == ty {
                return v;
            }
        }
    }

    pub async fn join(&mut self, room: &str) -> Value {
        self.send(json!({"type": "join", "room": room})).await;
        let v = self.recv().await;
        assert_eq!(v["type"], "joined", "{v}");
        v
    }

    pub async fn expect_error(&mut self, code: &str) {
        let v = self.recv().await;
        assert_eq!(v["type"], "error", "{v}");
        assert_eq!(v["code"], code, "{v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
}

pub fn id(v: &Value) -> String {
    v["id"].as_str().expect("id").to_string()
}
