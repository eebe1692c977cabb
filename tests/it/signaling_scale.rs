//! 1000 clients in 250 rooms of 4 negotiate at once (offer, answer, candidates) over
//! real WebSockets: every message arrives, from the right peer, and nothing else.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::json;
use tokio::sync::Semaphore;

use crate::support::ws::{connect, id};
use crate::support::TestServer;

const ROOMS: usize = 250;
const PER_ROOM: usize = 4;
const CANDIDATES: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_clients_negotiate_without_loss_or_misrouting() {
    meshmeet::sys::raise_nofile_limit().expect("raise open-files limit");
    let server = Arc::new(TestServer::start().await);
    let connecting = Arc::new(Semaphore::new(64));
    let mut tasks = Vec::new();
    for i in 0..ROOMS * PER_ROOM {
        let server = server.clone();
        let connecting = connecting.clone();
        tasks.push(tokio::spawn(async move {
            let permit = connecting.acquire().await.unwrap();
            let mut c = connect(&server).await;
            drop(permit);
            let room = format!("room-{}", i % ROOMS);
            let joined = c.join(&room).await;
            let me = id(&joined);
            // The newcomer offers to everyone present.
            for p in joined["peers"].as_array().unwrap() {
                let p = p["id"].as_str().unwrap();
                c.send(json!({"type": "offer", "to": p, "sdp": format!("offer {me}->{p}")}))
                    .await;
                for k in 0..CANDIDATES {
                    c.send(json!({"type": "candidate", "to": p,
                        "candidate": {"candidate": format!("c{k} {me}->{p}"), "sdpMid": "0"}}))
                        .await;
                }
            }
            // Per peer: offer or answer, then the candidates, all addressed to me.
            let mut got: HashMap<String, Vec<String>> = HashMap::new();
            let mut announced = HashSet::new();
            while got.values().map(Vec::len).sum::<usize>() < (PER_ROOM - 1) * (1 + CANDIDATES) {
                let m = c.recv().await;
                let ty = m["type"].as_str().unwrap().to_string();
                if ty == "peer_joined" {
                    announced.insert(id(&m));
                    continue;
                }
                let from = m["from"].as_str().expect("from").to_string();
                let body = match ty.as_str() {
                    "offer" => {
                        assert!(announced.contains(&from), "offer from unannounced {from}");
                        c.send(json!({"type": "answer", "to": from, "sdp": format!("answer {me}->{from}")}))
                            .await;
                        for k in 0..CANDIDATES {
                            c.send(json!({"type": "candidate", "to": from,
                                "candidate": {"candidate": format!("c{k} {me}->{from}")}}))
                                .await;
                        }
                        m["sdp"].as_str().unwrap().to_string()
                    }
                    "answer" => m["sdp"].as_str().unwrap().to_string(),
                    "candidate" => m["candidate"]["candidate"].as_str().unwrap().to_string(),
                    other => panic!("unexpected {other}: {m}"),
                };
                assert!(body.ends_with(&format!(" {from}->{me}")), "misrouted: {m} to {me}");
                got.entry(from).or_default().push(body);
            }
            assert_eq!(got.len(), PER_ROOM - 1, "{got:?}");
            for (from, bodies) in &got {
                assert_eq!(bodies.len(), 1 + CANDIDATES, "{from}: {bodies:?}");
                assert!(bodies[0].starts_with("offer ") || bodies[0].starts_with("answer "));
            }
            c
        }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(t.await.expect("client task"));
    }
    // Nothing else is pending for anyone.
    for c in &mut clients {
        c.send(json!({"type": "ping"})).await;
        assert_eq!(c.recv().await, json!({"type": "pong"}));
    }
    let m = server.metrics().await;
    assert!(m.contains("meshmeet_peers 1000"), "{m}");
    assert!(m.contains(&format!("meshmeet_rooms {ROOMS}")), "{m}");
    let relayed = ROOMS * PER_ROOM * (PER_ROOM - 1) / 2;
    assert!(
        m.contains(&format!(
            "meshmeet_signaling_messages_total{{type=\"offer\"}} {relayed}"
        )),
        "{m}"
    );
    assert!(
        m.contains(&format!(
            "meshmeet_signaling_messages_total{{type=\"answer\"}} {relayed}"
        )),
        "{m}"
    );
    assert!(
        m.contains(&format!(
            "meshmeet_signaling_messages_total{{type=\"candidate\"}} {}",
            relayed * 2 * CANDIDATES
        )),
        "{m}"
    );
}
