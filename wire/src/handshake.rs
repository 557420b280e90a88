//! Tunnel handshake, protocol v6: the first message in each direction of each proxied
//! connection (after TLS, or after the last connection on the same tunnel connection
//! ended with DONE both ways).
//!
//! The connecting edge sends [`Hello`]; the accepting edge connects to the target and
//! answers [`HelloReply`] (accepted, or refused with a reason). Both carry the edge's
//! name, its cache *epoch* (a random value chosen when its cache starts empty: a new
//! epoch tells the peer to forget what it believed this edge holds) and its cache size
//! (so the peer can model the eviction of this edge's store).
//!
//! Layout (all integers big-endian):
//! ```text
//! "SHRK" u16 version u8 kind(1 = hello, 2 = reply) u16 body_len body
//! hello body: str8 edge, u64 epoch, u64 cache_bytes, u64 window, str16 target, u64 open_seq, u64 after_seq
//! reply body: str8 edge, u64 epoch, u64 cache_bytes, u64 window, u8 status(0 = ok), str16 reason
//! ```

use bytes::{Buf, BufMut, BytesMut};

/// Magic that opens every handshake message.
pub const MAGIC: &[u8; 4] = b"SHRK";
/// The protocol version this build speaks.
pub const VERSION: u16 = 6;
/// Largest handshake body.
pub const MAX_BODY: usize = 4096;
/// Longest target address (`host:port`).
pub const MAX_TARGET: usize = 2048;
/// Longest refusal reason.
pub const MAX_REASON: usize = 1024;
const KIND_HELLO: u8 = 1;
const KIND_REPLY: u8 = 2;
const HEADER_LEN: usize = 4 + 2 + 1 + 2;

/// Sent by the connecting edge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The sender's edge name.
    pub edge: String,
    /// The sender's cache epoch.
    pub epoch: u64,
    /// The sender's store size in bytes.
    pub cache_bytes: u64,
    /// The most unacknowledged logical bytes the sender lets itself have in flight.
    pub window: u64,
    /// Where the accepting edge must connect (`host:port`).
    pub target: String,
    /// Sequence number of this connection at the sender (accept order; unique within
    /// the sender's epoch).
    pub open_seq: u64,
    /// The `open_seq` of the connection accepted before this one for the same target
    /// (0: none). The accepting edge connects this one to the target only after that
    /// one: a migration's channels reach QEMU in the order they were opened, while
    /// their Hellos cross the WAN without waiting for each other.
    pub after_seq: u64,
}

/// Sent by the accepting edge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelloReply {
    /// The sender's edge name.
    pub edge: String,
    /// The sender's cache epoch.
    pub epoch: u64,
    /// The sender's store size in bytes.
    pub cache_bytes: u64,
    /// The most unacknowledged logical bytes the sender lets itself have in flight.
    pub window: u64,
    /// `Ok` when the target connection is up, else why it is not.
    pub result: Result<(), String>,
}

/// A handshake that cannot be accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    /// The bytes do not start with the magic: not a Shrinker edge.
    #[error("peer is not a Shrinker edge (bad handshake magic)")]
    BadMagic,
    /// The peer speaks another protocol version.
    #[error(
        "peer speaks tunnel protocol v{0}; this edge speaks v{VERSION}: upgrade the older edge"
    )]
    Version(u16),
    /// Wrong message kind at this point.
    #[error("unexpected handshake message kind {0}")]
    Kind(u8),
    /// The body is malformed or too long.
    #[error("malformed handshake: {0}")]
    Malformed(&'static str),
}

impl Hello {
    /// Appends the encoded message.
    pub fn encode(&self, dst: &mut BytesMut) {
        let mut body = BytesMut::new();
        put_str8(&mut body, &self.edge);
        body.put_u64(self.epoch);
        body.put_u64(self.cache_bytes);
        body.put_u64(self.window);
        put_str16(&mut body, &self.target);
        body.put_u64(self.open_seq);
        body.put_u64(self.after_seq);
        put_envelope(dst, KIND_HELLO, &body);
    }

    /// Decodes from the front of `src` (`Ok(None)`: need more bytes).
    ///
    /// # Errors
    /// [`HandshakeError`] when the bytes are not a v6 hello.
    pub fn decode(src: &mut BytesMut) -> Result<Option<Hello>, HandshakeError> {
        let Some(mut body) = take_envelope(src, KIND_HELLO)? else {
            return Ok(None);
        };
        let b = &mut body;
        let hello = Hello {
            edge: get_str8(b)?,
            epoch: get_u64(b)?,
            cache_bytes: get_u64(b)?,
            window: get_u64(b)?,
            target: get_str16_max(b, MAX_TARGET, "target too long")?,
            open_seq: get_u64(b)?,
            after_seq: get_u64(b)?,
        };
        if b.has_remaining() {
            return Err(HandshakeError::Malformed("trailing bytes"));
        }
        Ok(Some(hello))
    }
}

impl HelloReply {
    /// Appends the encoded message.
    pub fn encode(&self, dst: &mut BytesMut) {
        let mut body = BytesMut::new();
        put_str8(&mut body, &self.edge);
        body.put_u64(self.epoch);
        body.put_u64(self.cache_bytes);
        body.put_u64(self.window);
        match &self.result {
            Ok(()) => {
                body.put_u8(0);
                put_str16(&mut body, "");
            }
            Err(reason) => {
                body.put_u8(1);
                put_str16(&mut body, truncate(reason, MAX_REASON));
            }
        }
        put_envelope(dst, KIND_REPLY, &body);
    }

    /// Decodes from the front of `src` (`Ok(None)`: need more bytes).
    ///
    /// # Errors
    /// [`HandshakeError`] when the bytes are not a v6 reply.
    pub fn decode(src: &mut BytesMut) -> Result<Option<HelloReply>, HandshakeError> {
        let Some(mut body) = take_envelope(src, KIND_REPLY)? else {
            return Ok(None);
        };
        let b = &mut body;
        let edge = get_str8(b)?;
        let epoch = get_u64(b)?;
        let cache_bytes = get_u64(b)?;
        let window = get_u64(b)?;
        if !b.has_remaining() {
            return Err(HandshakeError::Malformed("truncated"));
        }
        let status = b.get_u8();
        let reason = get_str16_max(b, MAX_REASON, "reason too long")?;
        if b.has_remaining() {
            return Err(HandshakeError::Malformed("trailing bytes"));
        }
        Ok(Some(HelloReply {
            edge,
            epoch,
            cache_bytes,
            window,
            result: if status == 0 { Ok(()) } else { Err(reason) },
        }))
    }
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn put_envelope(dst: &mut BytesMut, kind: u8, body: &[u8]) {
    debug_assert!(body.len() <= MAX_BODY);
    dst.put_slice(MAGIC);
    dst.put_u16(VERSION);
    dst.put_u8(kind);
    dst.put_u16(body.len() as u16);
    dst.put_slice(body);
}

fn take_envelope(src: &mut BytesMut, kind: u8) -> Result<Option<bytes::Bytes>, HandshakeError> {
    // Reject a wrong magic as soon as its bytes are in, so garbage fails fast.
    let n = src.len().min(4);
    if src[..n] != MAGIC[..n] {
        return Err(HandshakeError::BadMagic);
    }
    if src.len() < HEADER_LEN {
        return Ok(None);
    }
    let version = u16::from_be_bytes([src[4], src[5]]);
    if version != VERSION {
        return Err(HandshakeError::Version(version));
    }
    if src[6] != kind {
        return Err(HandshakeError::Kind(src[6]));
    }
    let len = u16::from_be_bytes([src[7], src[8]]) as usize;
    if len > MAX_BODY {
        return Err(HandshakeError::Malformed("body too long"));
    }
    if src.len() < HEADER_LEN + len {
        return Ok(None);
    }
    let mut msg = src.split_to(HEADER_LEN + len).freeze();
    msg.advance(HEADER_LEN);
    Ok(Some(msg))
}

fn put_str8(dst: &mut BytesMut, s: &str) {
    let s = truncate(s, 255);
    dst.put_u8(s.len() as u8);
    dst.put_slice(s.as_bytes());
}

fn put_str16(dst: &mut BytesMut, s: &str) {
    let s = truncate(s, MAX_TARGET);
    dst.put_u16(s.len() as u16);
    dst.put_slice(s.as_bytes());
}

fn get_u64(b: &mut bytes::Bytes) -> Result<u64, HandshakeError> {
    if b.remaining() < 8 {
        return Err(HandshakeError::Malformed("truncated"));
    }
    Ok(b.get_u64())
}

fn get_str(b: &mut bytes::Bytes, len: usize) -> Result<String, HandshakeError> {
    if b.remaining() < len {
        return Err(HandshakeError::Malformed("truncated string"));
    }
    String::from_utf8(b.split_to(len).to_vec()).map_err(|_| HandshakeError::Malformed("not UTF-8"))
}

fn get_str8(b: &mut bytes::Bytes) -> Result<String, HandshakeError> {
    if !b.has_remaining() {
        return Err(HandshakeError::Malformed("truncated"));
    }
    let len = b.get_u8() as usize;
    get_str(b, len)
}

/// Reads a str16 no longer than `max`: decode accepts exactly what encode can produce.
fn get_str16_max(
    b: &mut bytes::Bytes,
    max: usize,
    what: &'static str,
) -> Result<String, HandshakeError> {
    if b.remaining() < 2 {
        return Err(HandshakeError::Malformed("truncated"));
    }
    let len = b.get_u16() as usize;
    if len > max {
        return Err(HandshakeError::Malformed(what));
    }
    get_str(b, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_roundtrip_any_split() {
        let h = Hello {
            edge: "site-a".into(),
            epoch: 42,
            cache_bytes: 1 << 30,
            window: 64 << 20,
            target: "10.0.0.1:4444".into(),
            open_seq: 7,
            after_seq: 6,
        };
        let mut enc = BytesMut::new();
        h.encode(&mut enc);
        for cut in 0..enc.len() {
            let mut part = BytesMut::from(&enc[..cut]);
            assert_eq!(Hello::decode(&mut part), Ok(None), "cut {cut}");
        }
        let mut all = enc.clone();
        assert_eq!(Hello::decode(&mut all), Ok(Some(h)));
        assert!(all.is_empty());
    }

    #[test]
    fn reply_roundtrip_and_errors() {
        let r = HelloReply {
            edge: "b".into(),
            epoch: 1,
            cache_bytes: 2,
            window: 3,
            result: Err("connect to 127.0.0.1:1 refused".into()),
        };
        let mut enc = BytesMut::new();
        r.encode(&mut enc);
        assert_eq!(HelloReply::decode(&mut enc.clone()), Ok(Some(r)));
        assert_eq!(
            Hello::decode(&mut enc.clone()),
            Err(HandshakeError::Kind(2))
        );
        let mut garbage = BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
        assert_eq!(Hello::decode(&mut garbage), Err(HandshakeError::BadMagic));
        // A v5 edge (no DONE: it closed every tunnel connection after one proxied
        // connection) and a future v7 are refused.
        for other in [5, 7] {
            let mut v = enc.clone();
            v[5] = other;
            assert_eq!(
                HelloReply::decode(&mut v),
                Err(HandshakeError::Version(u16::from(other)))
            );
        }
    }

    #[test]
    fn overlong_fields_are_rejected_not_truncated() {
        let h = Hello {
            edge: "a".into(),
            epoch: 1,
            cache_bytes: 2,
            window: 3,
            target: "h".repeat(MAX_TARGET),
            open_seq: 4,
            after_seq: 0,
        };
        let mut enc = BytesMut::new();
        h.encode(&mut enc);
        assert_eq!(Hello::decode(&mut enc.clone()), Ok(Some(h)));
        // One byte longer, built by hand: refused.
        let mut body = BytesMut::new();
        put_str8(&mut body, "a");
        body.put_u64(1);
        body.put_u64(2);
        body.put_u64(3);
        body.put_u16((MAX_TARGET + 1) as u16);
        body.put_slice("h".repeat(MAX_TARGET + 1).as_bytes());
        body.put_u64(4);
        body.put_u64(0);
        let mut msg = BytesMut::new();
        put_envelope(&mut msg, KIND_HELLO, &body);
        assert_eq!(
            Hello::decode(&mut msg),
            Err(HandshakeError::Malformed("target too long"))
        );
    }
}
