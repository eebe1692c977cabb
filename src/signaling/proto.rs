//! Wire messages of PROTOCOL.md (version 1): what clients send, parsed and validated
//! into [`ClientMsg`], and what the server sends, [`ServerMsg`], serialized once per
//! message however many peers receive it.

use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::ice::RtcConfiguration;

pub const PROTOCOL_VERSION: u32 = 1;
/// The minor version (`joined.minor`): 1 adds room control (hosts, lock, room
/// password, lobby, kick, mute request); 2 adds `media.recording`.
pub const PROTOCOL_MINOR: u32 = 2;
/// Longest room password, in characters.
pub const MAX_ROOM_PASSWORD_CHARS: usize = 128;
pub const MAX_CHAT_CHARS: usize = 2000;
pub const MAX_NAME_CHARS: usize = 64;

/// A validated client message.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientMsg {
    Join(JoinReq),
    Relay {
        kind: RelayKind,
        to: String,
        payload: RelayPayload,
    },
    Media(Media),
    Chat {
        text: String,
    },
    Leave,
    Ping,
    IceRequest {
        password: Option<String>,
    },
    /// A host action (protocol 1.1).
    Control(Control),
}

/// What a host asks for (protocol 1.1). Every one needs the sender to be a host of
/// its room; ids name peers (or waiting joiners) of that room only.
#[derive(Debug, Clone, PartialEq)]
pub enum Control {
    /// Make another participant a host too.
    MakeHost {
        id: String,
    },
    Lock {
        locked: bool,
    },
    /// Empty clears it.
    RoomPassword {
        password: String,
    },
    Lobby {
        on: bool,
    },
    Admit {
        id: String,
    },
    Deny {
        id: String,
    },
    Kick {
        id: String,
    },
    /// Ask `id` to turn these off (at least one true).
    MuteRequest {
        id: String,
        audio: bool,
        video: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct JoinReq {
    pub room: String,
    pub name: Option<String>,
    pub password: Option<String>,
    pub resume: Option<String>,
    /// The room's own password, when a host has set one (protocol 1.1).
    pub room_password: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RelayKind {
    Offer,
    Answer,
    Candidate,
}

impl RelayKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RelayKind::Offer => "offer",
            RelayKind::Answer => "answer",
            RelayKind::Candidate => "candidate",
        }
    }
}

/// The relayed body: an SDP string, or an ICE candidate (object or null).
#[derive(Debug, Clone, PartialEq)]
pub enum RelayPayload {
    Sdp(String),
    Candidate(Value),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Media {
    pub audio: bool,
    pub video: bool,
    pub screen: bool,
    /// Protocol 1.2: the peer says it is recording the call on its device. Absent in
    /// 1.0/1.1 messages and in older snapshots: false.
    #[serde(default)]
    pub recording: bool,
}

/// Every field any client message may carry, so parsing needs no intermediate
/// buffering; fields a type does not use are ignored (a client-supplied `from`, too).
#[derive(Deserialize)]
struct Incoming {
    #[serde(rename = "type")]
    kind: String,
    room: Option<String>,
    name: Option<String>,
    password: Option<String>,
    resume: Option<String>,
    to: Option<String>,
    sdp: Option<String>,
    #[serde(default, deserialize_with = "present")]
    candidate: Option<Value>,
    audio: Option<bool>,
    video: Option<bool>,
    screen: Option<bool>,
    recording: Option<bool>,
    text: Option<String>,
    room_password: Option<String>,
    id: Option<String>,
    locked: Option<bool>,
    on: Option<bool>,
}

/// Distinguishes `"candidate": null` (Some(Null)) from a missing field (None).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// Why a frame is a `bad_message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("not a JSON object with a string `type`: {0}")]
    Json(String),
    #[error("unknown message type")]
    UnknownType,
    #[error("missing or invalid field `{0}`")]
    Field(&'static str),
}

impl ClientMsg {
    pub fn parse(text: &str) -> Result<ClientMsg, ParseError> {
        let m: Incoming = serde_json::from_str(text).map_err(|e| {
            // The serde message names the field and the expected type, not the input.
            ParseError::Json(e.to_string())
        })?;
        let relay = |kind: RelayKind, m: Incoming| -> Result<ClientMsg, ParseError> {
            let to = m.to.ok_or(ParseError::Field("to"))?;
            let payload = match kind {
                RelayKind::Candidate => match m.candidate {
                    Some(v @ (Value::Object(_) | Value::Null)) => RelayPayload::Candidate(v),
                    _ => return Err(ParseError::Field("candidate")),
                },
                _ => RelayPayload::Sdp(m.sdp.ok_or(ParseError::Field("sdp"))?),
            };
            Ok(ClientMsg::Relay { kind, to, payload })
        };
        match m.kind.as_str() {
            "join" => Ok(ClientMsg::Join(JoinReq {
                room: m.room.ok_or(ParseError::Field("room"))?,
                name: m.name,
                password: m.password,
                resume: m.resume,
                room_password: m.room_password,
            })),
            "offer" => relay(RelayKind::Offer, m),
            "answer" => relay(RelayKind::Answer, m),
            "candidate" => relay(RelayKind::Candidate, m),
            "media" => Ok(ClientMsg::Media(Media {
                audio: m.audio.ok_or(ParseError::Field("audio"))?,
                video: m.video.ok_or(ParseError::Field("video"))?,
                screen: m.screen.ok_or(ParseError::Field("screen"))?,
                recording: m.recording.unwrap_or(false),
            })),
            "chat" => Ok(ClientMsg::Chat {
                text: m.text.ok_or(ParseError::Field("text"))?,
            }),
            "leave" => Ok(ClientMsg::Leave),
            "ping" => Ok(ClientMsg::Ping),
            "ice_request" => Ok(ClientMsg::IceRequest {
                password: m.password,
            }),
            "host" | "admit" | "deny" | "kick" | "mute_request" => {
                let id = m.id.ok_or(ParseError::Field("id"))?;
                Ok(ClientMsg::Control(match m.kind.as_str() {
                    "host" => Control::MakeHost { id },
                    "admit" => Control::Admit { id },
                    "deny" => Control::Deny { id },
                    "kick" => Control::Kick { id },
                    _ => {
                        let audio = m.audio.unwrap_or(false);
                        let video = m.video.unwrap_or(false);
                        if !audio && !video {
                            return Err(ParseError::Field("audio"));
                        }
                        Control::MuteRequest { id, audio, video }
                    }
                }))
            }
            "lock" => Ok(ClientMsg::Control(Control::Lock {
                locked: m.locked.ok_or(ParseError::Field("locked"))?,
            })),
            "lobby" => Ok(ClientMsg::Control(Control::Lobby {
                on: m.on.ok_or(ParseError::Field("on"))?,
            })),
            "room_password" => {
                let password = m.password.ok_or(ParseError::Field("password"))?;
                if password.chars().count() > MAX_ROOM_PASSWORD_CHARS
                    || password.chars().any(char::is_control)
                {
                    return Err(ParseError::Field("password"));
                }
                Ok(ClientMsg::Control(Control::RoomPassword { password }))
            }
            _ => Err(ParseError::UnknownType),
        }
    }
}

/// Error codes of PROTOCOL.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadMessage,
    InvalidRoom,
    InvalidName,
    NotJoined,
    AlreadyJoined,
    UnknownPeer,
    BadPassword,
    RateLimited,
    /// Protocol 1.1: a host action from a participant who is not a host.
    NotHost,
    /// Protocol 1.1: the room is locked (and its lobby is off).
    RoomLocked,
    /// Protocol 1.1: the room's lobby holds as many joiners as it may.
    LobbyFull,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadMessage => "bad_message",
            ErrorCode::InvalidRoom => "invalid_room",
            ErrorCode::InvalidName => "invalid_name",
            ErrorCode::NotJoined => "not_joined",
            ErrorCode::AlreadyJoined => "already_joined",
            ErrorCode::UnknownPeer => "unknown_peer",
            ErrorCode::BadPassword => "bad_password",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::NotHost => "not_host",
            ErrorCode::RoomLocked => "room_locked",
            ErrorCode::LobbyFull => "lobby_full",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PeerInfo {
    pub id: Arc<str>,
    pub name: Arc<str>,
    pub media: Option<Media>,
}

/// A joiner waiting in a room's lobby, as hosts see it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Waiter {
    pub id: Arc<str>,
    pub name: Arc<str>,
}

/// A server message. Cheap to clone (shared strings), serialized once per send.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    Joined {
        protocol: u32,
        id: Arc<str>,
        room: Arc<str>,
        capacity: usize,
        peers: Vec<PeerInfo>,
        /// Filled in by the IO layer (it knows the request's Host).
        ice: Option<RtcConfiguration>,
        resume: String,
        resumed: bool,
        /// Protocol 1.1.
        minor: u32,
        /// Protocol 1.1: the room's hosts.
        hosts: Vec<Arc<str>>,
    },
    /// Protocol 1.1: the room's control state, after `joined` and on every change.
    RoomState {
        hosts: Vec<Arc<str>>,
        locked: bool,
        /// Whether joins need a room password (never the password itself).
        password: bool,
        lobby: bool,
        /// Joiners in the lobby, oldest first: in hosts' copies only.
        #[serde(skip_serializing_if = "Option::is_none")]
        waiting: Option<Vec<Waiter>>,
    },
    /// Protocol 1.1: to a joiner held in the lobby.
    Waiting {
        room: Arc<str>,
        id: Arc<str>,
    },
    /// Protocol 1.1: to hosts, a joiner in the lobby.
    Knock {
        id: Arc<str>,
        name: Arc<str>,
    },
    /// Protocol 1.1: to a joiner turned away from the lobby (then closed with 4003).
    Denied {
        room: Arc<str>,
        /// `denied` (a host said no), `timeout`, or `locked` (the lobby was turned
        /// off while the room is locked).
        reason: &'static str,
    },
    /// Protocol 1.1: to a participant removed by a host (then closed with 4002).
    Kicked {
        by: Arc<str>,
        name: Arc<str>,
    },
    /// Protocol 1.1: a host asks this participant to turn its microphone and/or camera off.
    MuteRequest {
        from: Arc<str>,
        name: Arc<str>,
        audio: bool,
        video: bool,
    },
    PeerJoined {
        id: Arc<str>,
        name: Arc<str>,
    },
    PeerLeft {
        id: Arc<str>,
    },
    Offer {
        from: Arc<str>,
        sdp: Arc<str>,
    },
    Answer {
        from: Arc<str>,
        sdp: Arc<str>,
    },
    Candidate {
        from: Arc<str>,
        candidate: Arc<Value>,
    },
    Media {
        from: Arc<str>,
        audio: bool,
        video: bool,
        screen: bool,
        /// Protocol 1.2: always present.
        recording: bool,
    },
    Ice {
        ice: RtcConfiguration,
    },
    Chat {
        from: Arc<str>,
        name: Arc<str>,
        text: Arc<str>,
        ts: u64,
    },
    RoomFull {
        room: Arc<str>,
        capacity: usize,
    },
    Pong,
    Error {
        code: ErrorCode,
        message: &'static str,
        /// Protocol 1.1: `room` on a `bad_password` about the room's own password
        /// (absent when the server's password is meant).
        #[serde(skip_serializing_if = "Option::is_none")]
        scope: Option<&'static str>,
    },
}

impl ServerMsg {
    pub fn error(code: ErrorCode) -> ServerMsg {
        let message = match code {
            ErrorCode::BadMessage => "malformed message: not JSON, unknown type, or bad fields",
            ErrorCode::InvalidRoom => {
                "room must be 1 to 64 letters, digits, '-', '_' or '.', not a reserved name"
            }
            ErrorCode::InvalidName => {
                "name must be at most 64 characters without control characters"
            }
            ErrorCode::NotJoined => "join a room first",
            ErrorCode::AlreadyJoined => "already joined; send leave first",
            ErrorCode::UnknownPeer => "no such peer in your room",
            ErrorCode::BadPassword => "wrong room password",
            ErrorCode::RateLimited => "too many messages; slow down",
            ErrorCode::NotHost => "only a host of this room may do that",
            ErrorCode::RoomLocked => "the room is locked",
            ErrorCode::LobbyFull => "too many people are waiting to join this room",
        };
        ServerMsg::Error {
            code,
            message,
            scope: None,
        }
    }

    /// `bad_password` about the room's own password.
    pub fn bad_room_password() -> ServerMsg {
        ServerMsg::Error {
            code: ErrorCode::BadPassword,
            message: "wrong or missing room password",
            scope: Some("room"),
        }
    }

    /// The JSON text of this message. Serializing these types does not fail as
    /// written (string keys, no floats outside JSON values); should a change break
    /// that, the caller gets the error to log, never a substitute message.
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string(self)
    }

    /// The `type` field of this message.
    pub fn type_name(&self) -> &'static str {
        match self {
            ServerMsg::Joined { .. } => "joined",
            ServerMsg::PeerJoined { .. } => "peer_joined",
            ServerMsg::PeerLeft { .. } => "peer_left",
            ServerMsg::Offer { .. } => "offer",
            ServerMsg::Answer { .. } => "answer",
            ServerMsg::Candidate { .. } => "candidate",
            ServerMsg::Media { .. } => "media",
            ServerMsg::Ice { .. } => "ice",
            ServerMsg::Chat { .. } => "chat",
            ServerMsg::RoomFull { .. } => "room_full",
            ServerMsg::Pong => "pong",
            ServerMsg::RoomState { .. } => "room_state",
            ServerMsg::Waiting { .. } => "waiting",
            ServerMsg::Knock { .. } => "knock",
            ServerMsg::Denied { .. } => "denied",
            ServerMsg::Kicked { .. } => "kicked",
            ServerMsg::MuteRequest { .. } => "mute_request",
            ServerMsg::Error { .. } => "error",
        }
    }
}

/// A display name: trimmed, at most 64 characters, no control characters; missing or
/// empty becomes `Guest`.
pub fn normalize_name(raw: Option<&str>) -> Option<String> {
    let name = raw.unwrap_or("").trim();
    if name.is_empty() {
        return Some("Guest".to_string());
    }
    if name.chars().count() > MAX_NAME_CHARS || name.chars().any(char::is_control) {
        return None;
    }
    Some(name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_every_type() {
        assert_eq!(
            ClientMsg::parse(r#"{"type":"join","room":"a","name":"N","resume":"t"}"#).unwrap(),
            ClientMsg::Join(JoinReq {
                room: "a".into(),
                name: Some("N".into()),
                password: None,
                resume: Some("t".into()),
                room_password: None,
            })
        );
        assert_eq!(
            ClientMsg::parse(r#"{"type":"offer","to":"x","sdp":"v=0","from":"forged"}"#).unwrap(),
            ClientMsg::Relay {
                kind: RelayKind::Offer,
                to: "x".into(),
                payload: RelayPayload::Sdp("v=0".into())
            }
        );
        assert!(matches!(
            ClientMsg::parse(r#"{"type":"answer","to":"x","sdp":""}"#).unwrap(),
            ClientMsg::Relay {
                kind: RelayKind::Answer,
                ..
            }
        ));
        assert_eq!(
            ClientMsg::parse(r#"{"type":"candidate","to":"x","candidate":null}"#).unwrap(),
            ClientMsg::Relay {
                kind: RelayKind::Candidate,
                to: "x".into(),
                payload: RelayPayload::Candidate(Value::Null)
            }
        );
        assert_eq!(
            ClientMsg::parse(r#"{"type":"candidate","to":"x","candidate":{"candidate":"c"}}"#)
                .unwrap(),
            ClientMsg::Relay {
                kind: RelayKind::Candidate,
                to: "x".into(),
                payload: RelayPayload::Candidate(json!({"candidate":"c"}))
            }
        );
        assert_eq!(
            ClientMsg::parse(r#"{"type":"media","audio":true,"video":false,"screen":false}"#)
                .unwrap(),
            ClientMsg::Media(Media {
                audio: true,
                video: false,
                screen: false,
                recording: false,
            })
        );
        // Protocol 1.2: `recording`, absent or null = false.
        for (text, recording) in [
            (
                r#"{"type":"media","audio":true,"video":true,"screen":false,"recording":true}"#,
                true,
            ),
            (
                r#"{"type":"media","audio":true,"video":true,"screen":false,"recording":false}"#,
                false,
            ),
            (
                r#"{"type":"media","audio":true,"video":true,"screen":false,"recording":null}"#,
                false,
            ),
        ] {
            assert_eq!(
                ClientMsg::parse(text).unwrap(),
                ClientMsg::Media(Media {
                    audio: true,
                    video: true,
                    screen: false,
                    recording,
                }),
                "{text}"
            );
        }
        assert_eq!(
            ClientMsg::parse(r#"{"type":"chat","text":"hi"}"#).unwrap(),
            ClientMsg::Chat { text: "hi".into() }
        );
        assert_eq!(
            ClientMsg::parse(r#"{"type":"leave"}"#).unwrap(),
            ClientMsg::Leave
        );
        assert_eq!(
            ClientMsg::parse(r#"{"type":"ping"}"#).unwrap(),
            ClientMsg::Ping
        );
        assert_eq!(
            ClientMsg::parse(r#"{"type":"ice_request","password":"p"}"#).unwrap(),
            ClientMsg::IceRequest {
                password: Some("p".into())
            }
        );
    }

    #[test]
    fn refuses_malformed() {
        for bad in [
            "not json",
            "[]",
            "{}",
            r#"{"type":5}"#,
            r#"{"type":"nope"}"#,
            r#"{"type":"join"}"#,
            r#"{"type":"join","room":5}"#,
            r#"{"type":"offer","sdp":"x"}"#,
            r#"{"type":"offer","to":"x"}"#,
            r#"{"type":"offer","to":"x","sdp":{}}"#,
            r#"{"type":"candidate","to":"x"}"#,
            r#"{"type":"candidate","to":"x","candidate":"str"}"#,
            r#"{"type":"media","audio":true,"video":false}"#,
            r#"{"type":"media","audio":1,"video":false,"screen":false}"#,
            r#"{"type":"media","audio":true,"video":false,"screen":false,"recording":1}"#,
            r#"{"type":"media","audio":true,"video":false,"screen":false,"recording":"yes"}"#,
            r#"{"type":"media","audio":true,"video":false,"screen":false,"recording":{}}"#,
            r#"{"type":"ping","recording":"no"}"#,
            r#"{"type":"media","audio":true,"video":false,"screen":false,"recording":true,"recording":true}"#,
            r#"{"type":"chat"}"#,
        ] {
            assert!(ClientMsg::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn serializes_server_messages() {
        let m = ServerMsg::Offer {
            from: "ab".into(),
            sdp: "v=0".into(),
        };
        assert_eq!(
            m.to_json().unwrap(),
            r#"{"type":"offer","from":"ab","sdp":"v=0"}"#
        );
        assert_eq!(ServerMsg::Pong.to_json().unwrap(), r#"{"type":"pong"}"#);
        let e: Value =
            serde_json::from_str(&ServerMsg::error(ErrorCode::UnknownPeer).to_json().unwrap())
                .unwrap();
        assert_eq!(e["type"], "error");
        assert_eq!(e["code"], "unknown_peer");
        let f: Value = serde_json::from_str(
            &ServerMsg::RoomFull {
                room: "r".into(),
                capacity: 6,
            }
            .to_json()
            .unwrap(),
        )
        .unwrap();
        assert_eq!(f, json!({"type":"room_full","room":"r","capacity":6}));
        // Protocol 1.2: `recording` is always present, in `media` and in peers' media.
        let m: Value = serde_json::from_str(
            &ServerMsg::Media {
                from: "a".into(),
                audio: true,
                video: false,
                screen: false,
                recording: false,
            }
            .to_json()
            .unwrap(),
        )
        .unwrap();
        assert_eq!(
            m,
            json!({"type":"media","from":"a","audio":true,"video":false,"screen":false,"recording":false})
        );
        let p = serde_json::to_value(PeerInfo {
            id: "a".into(),
            name: "n".into(),
            media: Some(Media {
                audio: false,
                video: false,
                screen: false,
                recording: true,
            }),
        })
        .unwrap();
        assert_eq!(
            p["media"],
            json!({"audio":false,"video":false,"screen":false,"recording":true})
        );
    }

    #[test]
    fn type_names_match_the_serialized_type() {
        let ice = crate::ice::RtcConfiguration {
            ice_servers: Vec::new(),
            ice_transport_policy: "all",
            expires_at: 1,
        };
        let all = [
            ServerMsg::Joined {
                protocol: PROTOCOL_VERSION,
                id: "a".into(),
                room: "r".into(),
                capacity: 6,
                peers: Vec::new(),
                ice: None,
                resume: "t".into(),
                resumed: false,
                minor: PROTOCOL_MINOR,
                hosts: vec!["a".into()],
            },
            ServerMsg::PeerJoined {
                id: "a".into(),
                name: "n".into(),
            },
            ServerMsg::PeerLeft { id: "a".into() },
            ServerMsg::Offer {
                from: "a".into(),
                sdp: "s".into(),
            },
            ServerMsg::Answer {
                from: "a".into(),
                sdp: "s".into(),
            },
            ServerMsg::Candidate {
                from: "a".into(),
                candidate: Arc::new(json!({"candidate": "c", "x": 1.5})),
            },
            ServerMsg::Media {
                from: "a".into(),
                audio: true,
                video: false,
                screen: false,
                recording: true,
            },
            ServerMsg::Ice { ice },
            ServerMsg::Chat {
                from: "a".into(),
                name: "n".into(),
                text: "t".into(),
                ts: 1,
            },
            ServerMsg::RoomFull {
                room: "r".into(),
                capacity: 6,
            },
            ServerMsg::Pong,
            ServerMsg::error(ErrorCode::BadMessage),
        ];
        for m in all {
            let v: Value = serde_json::from_str(&m.to_json().unwrap()).unwrap();
            assert_eq!(v["type"], m.type_name(), "{v}");
        }
    }

    #[test]
    fn names() {
        assert_eq!(normalize_name(None).unwrap(), "Guest");
        assert_eq!(normalize_name(Some("  ")).unwrap(), "Guest");
        assert_eq!(normalize_name(Some("  Ann ")).unwrap(), "Ann");
        assert_eq!(
            normalize_name(Some(&"é".repeat(64))).unwrap(),
            "é".repeat(64)
        );
        assert_eq!(normalize_name(Some(&"a".repeat(65))), None);
        assert_eq!(normalize_name(Some("a\u{7}b")), None);
    }
}
