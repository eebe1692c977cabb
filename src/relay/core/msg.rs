//! STUN messages as the core writes and reads them: encoding answers (SOFTWARE,
//! MESSAGE-INTEGRITY and FINGERPRINT added), reading attributes, request errors.

use std::net::SocketAddr;

use stun::agent::TransactionId;
use stun::attributes::*;
use stun::error_code::{ErrorCode, ErrorCodeAttribute};
use stun::fingerprint::FINGERPRINT;
use stun::integrity::MessageIntegrity;
use stun::message::*;
use stun::textattrs::TextAttribute;

use crate::relay::wire::XorAddress;

const SOFTWARE: &str = "meshmeet";

/// A request error: code, reason, and the attributes not understood (for 420).
pub(super) struct Fail {
    pub code: u16,
    pub reason: &'static str,
    pub unknown: Vec<AttrType>,
}

pub(super) fn fail(code: u16, reason: &'static str) -> Fail {
    Fail {
        code,
        reason,
        unknown: Vec::new(),
    }
}

pub(super) use crate::relay::wire::decode_xor_address as decode_xor_addr;

pub(super) fn known_attr(t: AttrType) -> bool {
    t.0 >= 0x8000
        || matches!(
            t,
            ATTR_MAPPED_ADDRESS
                | ATTR_USERNAME
                | ATTR_MESSAGE_INTEGRITY
                | ATTR_ERROR_CODE
                | ATTR_REALM
                | ATTR_NONCE
                | ATTR_XORMAPPED_ADDRESS
                | ATTR_CHANNEL_NUMBER
                | ATTR_LIFETIME
                | ATTR_XOR_PEER_ADDRESS
                | ATTR_DATA
                | ATTR_REQUESTED_TRANSPORT
                | ATTR_DONT_FRAGMENT
                | ATTR_REQUESTED_ADDRESS_FAMILY
                | ATTR_PRIORITY
                | ATTR_USE_CANDIDATE
                | ATTR_MESSAGE_INTEGRITY_SHA256
                | ATTR_PASSWORD_ALGORITHM
                | ATTR_USER_HASH
                | ATTR_PADDING
                | ATTR_EVEN_PORT
        )
}

/// Adds one attribute. The setters used here fail only on values longer than STUN
/// allows (a realm over 763 bytes, say); then the attribute is left out and logged.
pub(super) fn add(m: &mut Message, a: &dyn Setter) {
    if let Err(e) = a.add_to(m) {
        tracing::error!(error = %e, "STUN attribute not encodable; answer sent without it");
    }
}

/// Builds an encoded STUN message; `key` adds MESSAGE-INTEGRITY; FINGERPRINT always.
pub(super) fn encode(
    method: Method,
    class: MessageClass,
    txid: [u8; 12],
    attrs: &[&dyn Setter],
    key: Option<&[u8]>,
) -> Vec<u8> {
    let mut m = Message::new();
    m.typ = MessageType::new(method, class);
    m.transaction_id = TransactionId(txid);
    m.write_header();
    for a in attrs {
        add(&mut m, *a);
    }
    add(&mut m, &TextAttribute::new(ATTR_SOFTWARE, SOFTWARE.into()));
    if let Some(k) = key {
        add(&mut m, &MessageIntegrity(k.to_vec()));
    }
    add(&mut m, &FINGERPRINT);
    m.raw
}

pub(super) fn attr_bytes(m: &Message, t: AttrType) -> Option<&[u8]> {
    m.attributes
        .0
        .iter()
        .find(|a| a.typ == t)
        .map(|a| a.value.as_slice())
}

pub(super) fn attr_text(m: &Message, t: AttrType, max: usize) -> Option<Result<String, ()>> {
    let v = attr_bytes(m, t)?;
    if v.len() > max {
        return Some(Err(()));
    }
    Some(String::from_utf8(v.to_vec()).map_err(|_| ()))
}

pub(super) fn error_answer(method: Method, txid: [u8; 12], f: &Fail, key: &[u8]) -> Vec<u8> {
    let ec = ErrorCodeAttribute {
        code: ErrorCode(f.code),
        reason: f.reason.as_bytes().to_vec(),
    };
    let unknown = stun::uattrs::UnknownAttributes(f.unknown.clone());
    let mut attrs: Vec<&dyn Setter> = vec![&ec];
    if !f.unknown.is_empty() {
        attrs.push(&unknown);
    }
    encode(method, CLASS_ERROR_RESPONSE, txid, &attrs, Some(key))
}

/// Builds a Data indication carrying `data` from `peer` (transaction id `txid`, which
/// the caller draws at random).
pub fn data_indication(peer: SocketAddr, data: &[u8], txid: [u8; 12]) -> Vec<u8> {
    let mut m = Message::new();
    m.typ = MessageType::new(METHOD_DATA, CLASS_INDICATION);
    m.transaction_id = TransactionId(txid);
    m.write_header();
    add(&mut m, &XorAddress(ATTR_XOR_PEER_ADDRESS, peer));
    m.add(ATTR_DATA, data);
    m.raw
}
