//! What nodes send each other over NATS: JSON envelopes, each at most
//! [`MAX_ENVELOPE`] bytes, checked on the way in (size, node names) before use.

use serde::{Deserialize, Serialize};

use crate::config::valid_node_name;
use crate::signaling::core::Reattach;

/// Largest envelope sent or accepted (NATS' default `max_payload`).
pub const MAX_ENVELOPE: usize = 1 << 20;
/// Subject prefix of every cluster message.
pub const PREFIX: &str = "meshmeet";

/// A node's own subject: frames for rooms it is home to, deliveries for its
/// participants.
pub fn node_subject(node: &str) -> String {
    format!("{PREFIX}.node.{node}")
}

/// Heartbeats.
pub const ALIVE_SUBJECT: &str = "meshmeet.alive";
/// Peers gone for good, for every node's relay.
pub const GONE_SUBJECT: &str = "meshmeet.gone";

/// A message to one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum ToNode {
    /// A client frame, as the client sent it, for the room's home.
    Fwd {
        from: String,
        conn: u64,
        text: String,
        /// Sender's wall clock, Unix microseconds (forward latency).
        sent_us: u64,
    },
    /// The connection ended without `leave`: its peer enters the resume grace.
    Gone { from: String, conn: u64 },
    /// Connect this peer again through this connection (its room moved here, or
    /// its node lost touch for a while).
    Reattach {
        from: String,
        conn: u64,
        peer: Reattach,
    },
    /// From a home: what to do for participants on this node, in order.
    Deliver {
        from: String,
        items: Vec<Item>,
        sent_us: u64,
    },
}

impl ToNode {
    pub fn from_node(&self) -> &str {
        match self {
            ToNode::Fwd { from, .. }
            | ToNode::Gone { from, .. }
            | ToNode::Reattach { from, .. }
            | ToNode::Deliver { from, .. } => from,
        }
    }
}

/// One thing a home asks a participant's node to do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "snake_case")]
pub enum Item {
    /// Queue this text on these connections.
    Send { conns: Vec<u64>, text: String },
    /// A `joined` (without `ice`: the participant's node adds its own).
    Joined { conn: u64, text: String },
    /// Close the connection with this code.
    Close { conn: u64, code: u16 },
    /// After a `join`, `leave` or reattach: whether the connection is now in a room
    /// (joined or waiting in its lobby) at this home.
    Status { conn: u64, joined: bool },
    /// The room moved: find its home again and reattach there.
    Rehome { conn: u64 },
}

/// A heartbeat: `boot` changes when the node restarts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alive {
    pub node: String,
    pub boot: u64,
}

/// A peer left for good (`revoked`: a host removed it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerGone {
    pub from: String,
    pub peer: String,
    pub revoked: bool,
}

/// Why an envelope was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("larger than {MAX_ENVELOPE} bytes")]
    TooLarge,
    #[error("malformed: {0}")]
    Malformed(String),
    #[error("invalid node name")]
    NodeName,
}

fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, WireError> {
    if bytes.len() > MAX_ENVELOPE {
        return Err(WireError::TooLarge);
    }
    serde_json::from_slice(bytes).map_err(|e| WireError::Malformed(e.to_string()))
}

/// A room's replicated state (its part of the rooms snapshot), as its home writes it
/// to the rooms bucket.
pub fn decode_room_state(bytes: &[u8]) -> Result<crate::signaling::persist::Snapshot, WireError> {
    decode(bytes)
}

pub fn decode_to_node(bytes: &[u8]) -> Result<ToNode, WireError> {
    let m: ToNode = decode(bytes)?;
    if !valid_node_name(m.from_node()) {
        return Err(WireError::NodeName);
    }
    Ok(m)
}

pub fn decode_alive(bytes: &[u8]) -> Result<Alive, WireError> {
    let m: Alive = decode(bytes)?;
    if !valid_node_name(&m.node) {
        return Err(WireError::NodeName);
    }
    Ok(m)
}

pub fn decode_gone(bytes: &[u8]) -> Result<PeerGone, WireError> {
    let m: PeerGone = decode(bytes)?;
    if !valid_node_name(&m.from) || m.peer.len() > 64 {
        return Err(WireError::NodeName);
    }
    Ok(m)
}

/// The JSON of an envelope, or `None` when it would exceed [`MAX_ENVELOPE`] (or
/// cannot be serialized, which these types do not do as written).
pub fn encode<T: Serialize>(m: &T) -> Option<bytes::Bytes> {
    let v = serde_json::to_vec(m).ok()?;
    (v.len() <= MAX_ENVELOPE).then(|| bytes::Bytes::from(v))
}

/// The bucket key of a room: its canonical name in hex (room names may hold any
/// letter; keys may not).
pub fn room_key(room: &str) -> String {
    hex::encode(room.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip() {
        let m = ToNode::Deliver {
            from: "a".into(),
            items: vec![
                Item::Send {
                    conns: vec![1, 2],
                    text: "{\"type\":\"pong\"}".into(),
                },
                Item::Joined {
                    conn: 3,
                    text: "{}".into(),
                },
                Item::Close {
                    conn: 1,
                    code: 4002,
                },
                Item::Status {
                    conn: 2,
                    joined: false,
                },
                Item::Rehome { conn: 4 },
            ],
            sent_us: 5,
        };
        let b = encode(&m).unwrap();
        assert_eq!(decode_to_node(&b).unwrap(), m);
        let a = Alive {
            node: "n-1".into(),
            boot: 9,
        };
        assert_eq!(decode_alive(&encode(&a).unwrap()).unwrap(), a);
        let g = PeerGone {
            from: "n".into(),
            peer: "0123456789abcdef".into(),
            revoked: true,
        };
        assert_eq!(decode_gone(&encode(&g).unwrap()).unwrap(), g);
    }

    #[test]
    fn bad_envelopes_are_refused() {
        assert!(matches!(
            decode_to_node(b"{\"t\":\"gone\"}"),
            Err(WireError::Malformed(_))
        ));
        assert!(matches!(
            decode_to_node(b"\xff"),
            Err(WireError::Malformed(_))
        ));
        assert_eq!(
            decode_to_node(b"{\"t\":\"gone\",\"from\":\"a.b\",\"conn\":1}"),
            Err(WireError::NodeName)
        );
        assert_eq!(
            decode_to_node(b"{\"t\":\"gone\",\"from\":\"\",\"conn\":1}"),
            Err(WireError::NodeName)
        );
        let big = vec![b' '; MAX_ENVELOPE + 1];
        assert_eq!(decode_to_node(&big), Err(WireError::TooLarge));
        assert_eq!(
            decode_alive(b"{\"node\":\"*\",\"boot\":1}"),
            Err(WireError::NodeName)
        );
        assert_eq!(
            decode_gone(b"{\"from\":\"a\",\"peer\":\"x\",\"revoked\":false,\"extra\":1}")
                .map(|g| g.peer),
            Ok("x".to_string())
        );
        let text = "x".repeat(MAX_ENVELOPE);
        assert!(encode(&ToNode::Fwd {
            from: "a".into(),
            conn: 1,
            text,
            sent_us: 0
        })
        .is_none());
    }

    #[test]
    fn room_states_are_bounded_and_checked_for_shape() {
        let big = vec![b' '; MAX_ENVELOPE + 1];
        assert!(matches!(decode_room_state(&big), Err(WireError::TooLarge)));
        assert!(matches!(
            decode_room_state(b"{\"format\":1}"),
            Err(WireError::Malformed(_))
        ));
        let snap = crate::signaling::persist::Snapshot {
            format: 1,
            saved_unix_ms: 5,
            id_key: [0; 4],
            id_next: 0,
            peers: Vec::new(),
            rooms: Vec::new(),
        };
        let bytes = encode(&snap).expect("small");
        assert_eq!(decode_room_state(&bytes).expect("decodes").saved_unix_ms, 5);
    }

    #[test]
    fn room_keys_are_valid_bucket_keys() {
        assert_eq!(room_key("ab"), "6162");
        assert!(room_key("größe.1").chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(node_subject("n1"), "meshmeet.node.n1");
    }
}
