//! The client side of STUN/TURN, as the relay's own tests, the benchmark and tools
//! speak it: requests (Binding, Allocate, Refresh, CreatePermission, ChannelBind) with
//! or without long-term credentials, the 401/438 challenge, Send indications and
//! ChannelData, and readers for what comes back (error code, relayed and mapped
//! addresses, lifetime, Data indications). Sans-IO like the server core: it builds and
//! parses bytes, the caller owns the socket. Not used by the server itself.
//!
//! ```
//! use meshmeet::relay::client::{self, Attr, Session};
//! use stun::message::METHOD_ALLOCATE;
//!
//! let mut s = Session::new("1700000000:alice", "password");
//! // First attempt: unauthenticated; the server answers 401 with a realm and nonce,
//! // `s.learn(&answer)` stores them and says to send again.
//! let req = s.request(METHOD_ALLOCATE, &[&Attr::UDP]);
//! assert!(client::parse(&req).is_some());
//! ```

use std::net::SocketAddr;

use stun::agent::TransactionId;
use stun::attributes::*;
use stun::error_code::ErrorCodeAttribute;
use stun::fingerprint::FINGERPRINT;
use stun::integrity::MessageIntegrity;
use stun::message::*;
use stun::textattrs::TextAttribute;
use stun::xoraddr::XorMappedAddress;

use super::auth::long_term_key;
use super::wire::XorAddress;

/// A request attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attr {
    /// REQUESTED-TRANSPORT with this IP protocol number (17 = UDP).
    Transport(u8),
    /// LIFETIME in seconds (0 deletes an allocation).
    Lifetime(u32),
    /// CHANNEL-NUMBER.
    Channel(u16),
    /// XOR-PEER-ADDRESS.
    Peer(SocketAddr),
    /// REQUESTED-ADDRESS-FAMILY: 1 = IPv4, 2 = IPv6.
    Family(u8),
    /// EVEN-PORT with these flags (0x80 = reserve the next port too).
    EvenPort(u8),
    /// Any attribute, value as given (for malformed and unknown attributes).
    Raw(AttrType, Vec<u8>),
}

impl Attr {
    /// REQUESTED-TRANSPORT UDP, the only transport a TURN relay must offer.
    pub const UDP: Attr = Attr::Transport(17);
}

impl Setter for Attr {
    fn add_to(&self, m: &mut Message) -> Result<(), stun::Error> {
        match self {
            Attr::Transport(p) => m.add(ATTR_REQUESTED_TRANSPORT, &[*p, 0, 0, 0]),
            Attr::Lifetime(s) => m.add(ATTR_LIFETIME, &s.to_be_bytes()),
            Attr::Channel(n) => {
                let b = n.to_be_bytes();
                m.add(ATTR_CHANNEL_NUMBER, &[b[0], b[1], 0, 0]);
            }
            Attr::Peer(p) => return XorAddress(ATTR_XOR_PEER_ADDRESS, *p).add_to(m),
            Attr::Family(f) => m.add(ATTR_REQUESTED_ADDRESS_FAMILY, &[*f, 0, 0, 0]),
            Attr::EvenPort(flags) => m.add(ATTR_EVEN_PORT, &[*flags]),
            Attr::Raw(t, v) => m.add(*t, v),
        }
        Ok(())
    }
}

/// Encodes a message of `method` and `class` with a fresh transaction id.
fn message(method: Method, class: MessageClass, attrs: &[&dyn Setter]) -> Message {
    let mut m = Message::new();
    m.typ = MessageType::new(method, class);
    m.transaction_id = TransactionId::new();
    m.write_header();
    for a in attrs {
        // Client-side values are the caller's to choose, oversized ones included
        // (tests send them on purpose); a value the codec refuses is left out.
        let _ = a.add_to(&mut m);
    }
    m
}

/// An unauthenticated request (Binding, or a first Allocate to be challenged), with
/// FINGERPRINT.
pub fn request(method: Method, attrs: &[&dyn Setter]) -> Vec<u8> {
    let mut m = message(method, CLASS_REQUEST, attrs);
    let _ = FINGERPRINT.add_to(&mut m);
    m.raw
}

/// A Binding request.
pub fn binding_request() -> Vec<u8> {
    request(METHOD_BINDING, &[])
}

/// A Send indication carrying `data` to `peer`.
pub fn send_indication(peer: SocketAddr, data: &[u8]) -> Vec<u8> {
    let mut m = message(METHOD_SEND, CLASS_INDICATION, &[&Attr::Peer(peer)]);
    m.add(ATTR_DATA, data);
    m.raw
}

/// A ChannelData message; `stream` pads it to a multiple of four bytes, as TCP and
/// TLS require. Payloads longer than 65535 bytes are cut to that length.
pub fn channel_data(channel: u16, payload: &[u8], stream: bool) -> Vec<u8> {
    let mut out = Vec::new();
    channel_data_into(&mut out, channel, payload, stream);
    out
}

/// [`channel_data`] into `out` (cleared first), reusing its allocation.
pub fn channel_data_into(out: &mut Vec<u8>, channel: u16, payload: &[u8], stream: bool) {
    let payload = &payload[..payload.len().min(usize::from(u16::MAX))];
    let len = payload.len();
    let total = if stream { (4 + len + 3) & !3 } else { 4 + len };
    out.clear();
    out.reserve(total);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(payload);
    out.resize(total, 0);
}

/// Long-term credentials and what the server told about them (realm, nonce).
#[derive(Debug, Clone)]
pub struct Session {
    user: String,
    pass: String,
    /// The realm from the last challenge.
    pub realm: String,
    /// The nonce from the last challenge; requests are authenticated once it is set.
    pub nonce: Option<String>,
}

impl Session {
    pub fn new(user: &str, pass: &str) -> Session {
        Session {
            user: user.into(),
            pass: pass.into(),
            realm: String::new(),
            nonce: None,
        }
    }

    /// TURN REST API credentials: username `EXPIRY:ID` (`expiry` in Unix seconds),
    /// password `base64(HMAC-SHA1(secret, username))`.
    pub fn rest(secret: &str, id: &str, expiry: u64) -> Session {
        let user = format!("{expiry}:{id}");
        let pass = crate::ice::rest_password(secret, &user);
        Session::new(&user, &pass)
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    pub fn password(&self) -> &str {
        &self.pass
    }

    /// A request with a fresh transaction id: authenticated (USERNAME, REALM, NONCE,
    /// MESSAGE-INTEGRITY) once a nonce is known; FINGERPRINT always.
    pub fn request(&self, method: Method, attrs: &[&dyn Setter]) -> Vec<u8> {
        let mut m = message(method, CLASS_REQUEST, attrs);
        if let Some(nonce) = &self.nonce {
            let key = long_term_key(&self.user, &self.realm, &self.pass);
            let _ = TextAttribute::new(ATTR_USERNAME, self.user.clone()).add_to(&mut m);
            let _ = TextAttribute::new(ATTR_REALM, self.realm.clone()).add_to(&mut m);
            let _ = TextAttribute::new(ATTR_NONCE, nonce.clone()).add_to(&mut m);
            let _ = MessageIntegrity(key).add_to(&mut m);
        }
        let _ = FINGERPRINT.add_to(&mut m);
        m.raw
    }

    /// Learns realm and nonce from a challenge: a 401 while no nonce is known, or a
    /// 438 Stale Nonce. True when the request should be sent again (with
    /// [`Session::request`], which then authenticates).
    pub fn learn(&mut self, answer: &Message) -> bool {
        let code = error_code(answer);
        if !(code == Some(401) && self.nonce.is_none() || code == Some(438)) {
            return false;
        }
        match (text(answer, ATTR_NONCE), text(answer, ATTR_REALM)) {
            (Some(nonce), Some(realm)) => {
                self.nonce = Some(nonce);
                self.realm = realm;
                true
            }
            _ => false,
        }
    }
}

/// Decodes a STUN message.
pub fn parse(bytes: &[u8]) -> Option<Message> {
    let mut m = Message::new();
    m.unmarshal_binary(bytes).ok()?;
    Some(m)
}

/// Whether `answer` answers `request` (same transaction id).
pub fn answers(request: &[u8], answer: &Message) -> bool {
    request.get(8..20) == Some(&answer.transaction_id.0[..])
}

/// The ERROR-CODE of an error response; `None` for any other message.
pub fn error_code(m: &Message) -> Option<u16> {
    if m.typ.class != CLASS_ERROR_RESPONSE {
        return None;
    }
    let mut e = ErrorCodeAttribute::default();
    e.get_from(m).ok()?;
    Some(e.code.0)
}

/// Whether `m` is a success response.
pub fn is_success(m: &Message) -> bool {
    m.typ.class == CLASS_SUCCESS_RESPONSE
}

fn xor_address(m: &Message, t: AttrType) -> Option<SocketAddr> {
    let mut a = XorMappedAddress::default();
    a.get_from_as(m, t).ok()?;
    Some(SocketAddr::new(a.ip, a.port))
}

/// XOR-RELAYED-ADDRESS of an Allocate success.
pub fn relayed_address(m: &Message) -> Option<SocketAddr> {
    xor_address(m, ATTR_XOR_RELAYED_ADDRESS)
}

/// Every XOR-RELAYED-ADDRESS of an Allocate success, in order: two for a dual
/// allocation (RFC 8656 section 7.2, the IPv4 one first from this server).
pub fn relayed_addresses(m: &Message) -> Vec<SocketAddr> {
    m.attributes
        .0
        .iter()
        .filter(|a| a.typ == ATTR_XOR_RELAYED_ADDRESS)
        .filter_map(|a| super::wire::decode_xor_address(&a.value, &m.transaction_id.0))
        .collect()
}

/// ADDRESS-ERROR-CODE of an Allocate success (RFC 8656 section 18.13): the address
/// family not allocated (1 = IPv4, 2 = IPv6) and the error code (440, 508).
pub fn address_error(m: &Message) -> Option<(u8, u16)> {
    let v = m.get(AttrType(0x8001)).ok()?;
    match v[..] {
        [family, _, class, number, ..] => {
            Some((family, u16::from(class & 0x07) * 100 + u16::from(number)))
        }
        _ => None,
    }
}

/// XOR-MAPPED-ADDRESS: the client's address as the server sees it.
pub fn mapped_address(m: &Message) -> Option<SocketAddr> {
    xor_address(m, ATTR_XORMAPPED_ADDRESS)
}

/// XOR-PEER-ADDRESS of a Data indication.
pub fn peer_address(m: &Message) -> Option<SocketAddr> {
    xor_address(m, ATTR_XOR_PEER_ADDRESS)
}

/// LIFETIME in seconds.
pub fn lifetime(m: &Message) -> Option<u32> {
    let v = m.get(ATTR_LIFETIME).ok()?;
    Some(u32::from_be_bytes(<[u8; 4]>::try_from(v.as_slice()).ok()?))
}

/// DATA of a Data indication.
pub fn data(m: &Message) -> Option<Vec<u8>> {
    m.get(ATTR_DATA).ok()
}

/// A text attribute (REALM, NONCE, SOFTWARE, ...).
pub fn text(m: &Message, t: AttrType) -> Option<String> {
    TextAttribute::get_from_as(m, t).ok().map(|a| a.text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_carry_what_was_asked() {
        let peer: SocketAddr = "192.0.2.1:4000".parse().unwrap();
        let req = request(
            METHOD_CREATE_PERMISSION,
            &[
                &Attr::Peer(peer),
                &Attr::Lifetime(600),
                &Attr::Channel(0x4001),
            ],
        );
        let m = parse(&req).unwrap();
        assert_eq!(
            m.typ,
            MessageType::new(METHOD_CREATE_PERMISSION, CLASS_REQUEST)
        );
        assert_eq!(peer_address(&m), Some(peer));
        assert_eq!(lifetime(&m), Some(600));
        assert_eq!(m.get(ATTR_CHANNEL_NUMBER).unwrap(), vec![0x40, 0x01, 0, 0]);
        assert!(FINGERPRINT.check(&m).is_ok());
        assert!(!m.contains(ATTR_MESSAGE_INTEGRITY));
        assert!(answers(&req, &m));
        assert!(!answers(&binding_request(), &m));
    }

    #[test]
    fn a_session_authenticates_after_a_challenge() {
        let mut s = Session::new("user", "pw");
        assert!(parse(&s.request(METHOD_ALLOCATE, &[&Attr::UDP]))
            .is_some_and(|m| !m.contains(ATTR_MESSAGE_INTEGRITY)));
        let mut challenge = message(METHOD_ALLOCATE, CLASS_ERROR_RESPONSE, &[]);
        ErrorCodeAttribute {
            code: stun::error_code::ErrorCode(401),
            reason: b"Unauthorized".to_vec(),
        }
        .add_to(&mut challenge)
        .unwrap();
        TextAttribute::new(ATTR_REALM, "r".into())
            .add_to(&mut challenge)
            .unwrap();
        TextAttribute::new(ATTR_NONCE, "n1".into())
            .add_to(&mut challenge)
            .unwrap();
        let challenge = parse(&challenge.raw).unwrap();
        assert!(s.learn(&challenge));
        assert_eq!((s.realm.as_str(), s.nonce.as_deref()), ("r", Some("n1")));
        // A second 401 with a nonce known is a refusal, not a challenge.
        assert!(!s.learn(&challenge));
        let m = parse(&s.request(METHOD_REFRESH, &[&Attr::Lifetime(0)])).unwrap();
        assert_eq!(text(&m, ATTR_USERNAME).as_deref(), Some("user"));
        assert_eq!(text(&m, ATTR_NONCE).as_deref(), Some("n1"));
        MessageIntegrity(long_term_key("user", "r", "pw"))
            .check(&mut m.clone())
            .unwrap();
    }

    #[test]
    fn channel_data_pads_on_streams_only() {
        assert_eq!(
            channel_data(0x4000, &[1, 2, 3], false),
            [0x40, 0, 0, 3, 1, 2, 3]
        );
        assert_eq!(
            channel_data(0x4000, &[1, 2, 3], true),
            [0x40, 0, 0, 3, 1, 2, 3, 0]
        );
        // Into a buffer that held something longer: cleared first.
        let mut out = vec![9; 20];
        channel_data_into(&mut out, 0x4001, &[5], true);
        assert_eq!(out, [0x40, 1, 0, 1, 5, 0, 0, 0]);
        let m = parse(&send_indication("192.0.2.9:9".parse().unwrap(), b"hi")).unwrap();
        assert_eq!(data(&m).as_deref(), Some(&b"hi"[..]));
    }
}
