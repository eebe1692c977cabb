//! Telling STUN from ChannelData, and framing both on a stream (RFC 8656 section 12:
//! over TCP and TLS, ChannelData is padded to a multiple of four bytes). CoreCell by the
//! server's IO and the [`client`](super::client) side; plus the XOR address attribute
//! both sides write.

use std::net::{IpAddr, SocketAddr};

use stun::attributes::AttrType;
use stun::message::{Message, Setter};
use stun::xoraddr::XorMappedAddress;

/// Largest frame accepted on a stream: a STUN message or a ChannelData message.
pub const MAX_FRAME: usize = 65_535 + 20;

/// STUN's magic cookie, bytes 4..8 of every message.
const COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];

/// A ChannelData message: the first two bits are 01 (channel numbers 0x4000-0x7FFF).
pub fn is_channel_data(b: &[u8]) -> bool {
    b.len() >= 4 && (b[0] & 0xC0) == 0x40
}

/// A STUN message: the first two bits are 00 and the magic cookie is in place.
pub fn is_stun(b: &[u8]) -> bool {
    b.len() >= 20 && (b[0] & 0xC0) == 0 && b[4..8] == COOKIE
}

/// The channel number and payload length of a ChannelData header.
pub fn channel_header(b: &[u8]) -> Option<(u16, usize)> {
    if !is_channel_data(b) {
        return None;
    }
    Some((
        u16::from_be_bytes([b[0], b[1]]),
        usize::from(u16::from_be_bytes([b[2], b[3]])),
    ))
}

/// What the start of a stream buffer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// A complete frame of this many bytes (padding included).
    Complete(usize),
    /// More bytes are needed.
    Incomplete,
    /// Neither STUN nor ChannelData, or longer than [`MAX_FRAME`]: close the stream.
    Invalid,
}

/// Frames the start of `b`, a buffer read from a TCP or TLS stream.
pub fn stream_frame(b: &[u8]) -> Frame {
    if b.len() < 4 {
        return Frame::Incomplete;
    }
    let len = usize::from(u16::from_be_bytes([b[2], b[3]]));
    let total = match b[0] & 0xC0 {
        0x40 => (4 + len + 3) & !3,
        0x00 => 20 + len,
        _ => return Frame::Invalid,
    };
    if total > MAX_FRAME {
        return Frame::Invalid;
    }
    if b.len() >= total {
        Frame::Complete(total)
    } else {
        Frame::Incomplete
    }
}

/// An XOR-encoded address attribute (XOR-PEER-ADDRESS, XOR-RELAYED-ADDRESS, ...).
pub struct XorAddress(pub AttrType, pub SocketAddr);

impl Setter for XorAddress {
    fn add_to(&self, m: &mut Message) -> Result<(), stun::Error> {
        XorMappedAddress {
            ip: self.1.ip(),
            port: self.1.port(),
        }
        .add_to_as(m, self.0)
    }
}

/// Decodes the value of an XOR address attribute (XOR-PEER-ADDRESS,
/// XOR-RELAYED-ADDRESS, ...) of a message with transaction id `txid`.
pub fn decode_xor_address(v: &[u8], txid: &[u8; 12]) -> Option<SocketAddr> {
    if v.len() < 4 {
        return None;
    }
    let port = u16::from_be_bytes([v[2], v[3]]) ^ 0x2112;
    match v[1] {
        0x01 if v.len() == 8 => {
            let mut ip = [0u8; 4];
            for i in 0..4 {
                ip[i] = v[4 + i] ^ COOKIE[i];
            }
            Some(SocketAddr::new(IpAddr::from(ip), port))
        }
        0x02 if v.len() == 20 => {
            let mut ip = [0u8; 16];
            for i in 0..16 {
                let k = if i < 4 { COOKIE[i] } else { txid[i - 4] };
                ip[i] = v[4 + i] ^ k;
            }
            Some(SocketAddr::new(IpAddr::from(ip), port))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_on_a_stream() {
        assert_eq!(stream_frame(&[0x40, 0]), Frame::Incomplete);
        // ChannelData with 5 payload bytes is padded to 12 on a stream.
        let cd = [0x40, 0x00, 0x00, 0x05, 1, 2, 3, 4, 5, 0, 0, 0];
        assert_eq!(stream_frame(&cd), Frame::Complete(12));
        assert_eq!(stream_frame(&cd[..9]), Frame::Incomplete);
        assert_eq!(channel_header(&cd), Some((0x4000, 5)));
        // A STUN header announcing 8 attribute bytes.
        let mut stun = vec![0x00, 0x01, 0x00, 0x08, 0x21, 0x12, 0xA4, 0x42];
        stun.extend_from_slice(&[0; 12 + 8]);
        assert!(is_stun(&stun));
        assert!(!is_channel_data(&stun));
        assert_eq!(stream_frame(&stun), Frame::Complete(28));
        assert_eq!(stream_frame(&stun[..27]), Frame::Incomplete);
        // The other two leading-bit patterns are garbage.
        assert_eq!(stream_frame(&[0x80, 0, 0, 0]), Frame::Invalid);
        assert_eq!(stream_frame(&[0xC0, 0, 0, 0]), Frame::Invalid);
        // A STUN message without the cookie is not STUN.
        stun[4] = 0;
        assert!(!is_stun(&stun));
        assert_eq!(channel_header(&stun), None);
    }

    #[test]
    fn the_largest_frames_fit() {
        let mut cd = vec![0x7F, 0xFF, 0xFF, 0xFF];
        cd.resize(4 + 65_535 + 1, 0);
        assert_eq!(stream_frame(&cd), Frame::Complete(4 + 65_536));
        let mut stun = vec![0x00, 0x01, 0xFF, 0xFF, 0x21, 0x12, 0xA4, 0x42];
        stun.resize(MAX_FRAME, 0);
        assert_eq!(stream_frame(&stun), Frame::Complete(MAX_FRAME));
    }
}
