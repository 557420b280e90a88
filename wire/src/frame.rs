//! Tunnel frames (protocol v5; v2 added WORDS, v3 FOLLOW and NEXT, v4 BRANCHES, v5 the
//! heartbeat rule: an end silent for 5 s repeats its last ACK) and their incremental decoder.
//!
//! After the handshake ([`crate::handshake`]) each direction of a tunnel connection is
//! a sequence of frames. Every frame starts with a one-byte type; every length is a
//! LEB128 varint checked against a cap *before* anything is allocated.
//!
//! | type | name | body |
//! |---|---|---|
//! | `0x01` | LITERAL | varint len, len bytes |
//! | `0x02` | CHUNK | varint len, len bytes (the receiver names it by hashing it) |
//! | `0x03` | REF | 32-byte id |
//! | `0x04` | MISS | 32-byte id (control: "send me this chunk") |
//! | `0x05` | FILL | 32-byte id, varint len, len bytes (control: answer to MISS) |
//! | `0x06` | ACK | varint logical offset the receiver has resolved (control) |
//! | `0x07` | END | — (no more data in this direction: half-close) |
//! | `0x08` | RESET | varint len, UTF-8 reason (abort the connection) |
//! | `0x09` | ZBATCH | varint raw len, varint zstd len, zstd frame holding LITERAL/CHUNK/REF/REF_RECENT frames |
//! | `0x0a` | REF_RECENT | 32-byte id (a REF whose chunk may still be in flight) |
//! | `0x0b` | DELTA | flags (bit 0: base sent moments ago, bit 1: zstd payload), 32-byte base id, 32-byte id, varint len, len bytes of payload ([`crate::delta`]) |
//! | `0x0c` | ZSTREAM | flags (bit 0: fresh context), varint raw len, varint zstd len, one flushed piece of the direction's zstd stream ([`crate::zstream`]) holding data frames |
//! | `0x0d` | WORDS | u8 stride (1..=64), varint len, len bytes: a CHUNK sent as the word differences of its bytes ([`crate::words`]) |
//! | `0x0e` | FOLLOW | 32-byte group id, u8 position: a REF of the group's id at that position ([`crate::group`]) |
//! | `0x0f` | NEXT | — (a REF of the followed group's next id) |
//! | `0x10` | BRANCHES | varint len, len bytes: a CHUNK sent with its x86 branch targets made absolute ([`crate::branches`]) |
//!
//! LITERAL, CHUNK, WORDS, BRANCHES, REF, REF_RECENT, DELTA, FOLLOW and NEXT are *data* frames: their order is the order of the bytes they
//! stand for. The others are control frames and may appear anywhere.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::id::{ChunkId, CHUNK_ID_LEN};
use crate::varint;

/// Largest LITERAL payload.
pub const MAX_LITERAL: usize = 1 << 20;
/// Largest CHUNK or FILL payload (the chunker never makes bigger chunks).
pub const MAX_CHUNK: usize = 1 << 20;
/// Largest decompressed ZBATCH body. Bounds what one hostile frame can make us allocate.
pub const MAX_BATCH_RAW: usize = 4 << 20;
/// Largest compressed ZBATCH body.
pub const MAX_BATCH_COMPRESSED: usize = MAX_BATCH_RAW + (MAX_BATCH_RAW >> 7) + 1024;
/// Largest WORDS stride (in 8-byte words).
pub const MAX_WORD_STRIDE: u8 = crate::words::MAX_STRIDE;
/// Longest RESET reason.
pub const MAX_REASON: usize = 4096;

const T_LITERAL: u8 = 0x01;
const T_CHUNK: u8 = 0x02;
const T_REF: u8 = 0x03;
const T_MISS: u8 = 0x04;
const T_FILL: u8 = 0x05;
const T_ACK: u8 = 0x06;
const T_END: u8 = 0x07;
const T_RESET: u8 = 0x08;
const T_ZBATCH: u8 = 0x09;
const T_REF_RECENT: u8 = 0x0a;
const T_DELTA: u8 = 0x0b;
const T_ZSTREAM: u8 = 0x0c;
const T_WORDS: u8 = 0x0d;
const T_FOLLOW: u8 = 0x0e;
const T_NEXT: u8 = 0x0f;
const T_BRANCHES: u8 = 0x10;
const T_DONE: u8 = 0x11;

/// One decoded tunnel frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Bytes to deliver as they are.
    Literal(Bytes),
    /// A chunk the peer did not hold: deliver it and keep it. It carries no id: the
    /// receiver hashes the bytes anyway, so an id would only cost 32 bytes and could
    /// not be trusted.
    Chunk(Bytes),
    /// A [`Frame::Chunk`] whose x86 branch targets travel made absolute
    /// ([`crate::branches`]): deliver and keep
    /// [`branches::relative`](crate::branches::relative) of these bytes.
    Branches(Bytes),
    /// Deliver the chunk the receiver already holds under this id.
    Ref(ChunkId),
    /// A [`Frame::Chunk`] whose bytes travel as their word differences at `stride`
    /// ([`crate::words`]): deliver and keep [`words::restore`](crate::words::restore)
    /// of them.
    Words {
        /// In 8-byte words, 1..=[`MAX_WORD_STRIDE`].
        stride: u8,
        /// The chunk's word differences.
        diffs: Bytes,
    },
    /// Deliver the chunk under this id, which the sender sent in full only moments ago,
    /// possibly on another connection of the same peer: when the receiver's store lacks
    /// it, its full copy is probably still in flight, so the receiver waits briefly for
    /// it to arrive before asking with [`Frame::Miss`].
    RefRecent(ChunkId),
    /// Deliver the chunk `id`, rebuilt by applying `patch` to the chunk `base` the
    /// receiver already holds; it must hash to `id`.
    Delta {
        /// The base's full copy left the sender moments ago and may still be in
        /// flight (as for [`Frame::RefRecent`]): wait for it before asking.
        base_recent: bool,
        /// The payload is a zstd frame with the base as dictionary, not edits.
        zstd: bool,
        /// The chunk the patch edits.
        base: ChunkId,
        /// BLAKE3 of the rebuilt chunk.
        id: ChunkId,
        /// In-place edits ([`crate::delta`]).
        patch: Bytes,
    },
    /// Deliver the chunk whose id stands at `pos` in group `group` ([`crate::group`]:
    /// the group's content is its ids), and follow the group: each [`Frame::Next`]
    /// after it stands for the group's next id. A group the receiver lacks is asked
    /// for with [`Frame::Miss`] like a chunk.
    Follow {
        /// BLAKE3 of the group's content.
        group: ChunkId,
        /// Position of the chunk in the group, 0-based.
        pos: u8,
    },
    /// Deliver the chunk whose id follows, in the group last named by
    /// [`Frame::Follow`], the one delivered by the previous FOLLOW or NEXT.
    Next,
    /// The receiver lacks this chunk: the sender must answer with [`Frame::Fill`].
    Miss(ChunkId),
    /// Answer to [`Frame::Miss`].
    Fill {
        /// Claimed BLAKE3 of `data`.
        id: ChunkId,
        /// The chunk's bytes.
        data: Bytes,
    },
    /// The receiver has resolved every data frame up to this logical byte offset; the
    /// sender may drop what it kept to answer misses below it.
    Ack(u64),
    /// No more data frames in this direction.
    End,
    /// Nothing more at all in this direction: the writer's last frame of the proxied
    /// connection (protocol v6; it replaced TLS close_notify and FIN). Once both ends
    /// sent it, the tunnel connection is idle and may carry the next proxied
    /// connection from a new handshake, its TCP window already open.
    Done,
    /// Abort the proxied connection, with a reason for the log.
    Reset(String),
}

impl Frame {
    /// Whether this frame stands for bytes of the proxied stream (order matters).
    pub fn is_data(&self) -> bool {
        matches!(
            self,
            Frame::Literal(_)
                | Frame::Chunk(_)
                | Frame::Words { .. }
                | Frame::Branches(_)
                | Frame::Ref(_)
                | Frame::RefRecent(_)
                | Frame::Delta { .. }
                | Frame::Follow { .. }
                | Frame::Next
        )
    }

    /// Appends the encoded frame to `dst`.
    ///
    /// # Panics
    /// In debug builds, if a payload exceeds its cap (the encoder never builds one).
    pub fn encode(&self, dst: &mut BytesMut) {
        match self {
            Frame::Literal(data) => encode_bytes(dst, T_LITERAL, data, MAX_LITERAL),
            Frame::Chunk(data) => encode_bytes(dst, T_CHUNK, data, MAX_CHUNK),
            Frame::Branches(data) => encode_bytes(dst, T_BRANCHES, data, MAX_CHUNK),
            Frame::Words { stride, diffs } => {
                debug_assert!((1..=MAX_WORD_STRIDE).contains(stride));
                debug_assert!(diffs.len() <= MAX_CHUNK);
                dst.reserve(2 + varint::MAX_VARINT_LEN + diffs.len());
                dst.put_u8(T_WORDS);
                dst.put_u8(*stride);
                varint::put(dst, diffs.len() as u64);
                dst.put_slice(diffs);
            }
            Frame::Fill { id, data } => encode_chunk(dst, T_FILL, id, data),
            Frame::Ref(id) => {
                dst.put_u8(T_REF);
                dst.put_slice(id.as_bytes());
            }
            Frame::RefRecent(id) => {
                dst.put_u8(T_REF_RECENT);
                dst.put_slice(id.as_bytes());
            }
            Frame::Delta {
                base_recent,
                zstd,
                base,
                id,
                patch,
            } => {
                debug_assert!(patch.len() <= MAX_CHUNK);
                dst.reserve(2 + 2 * CHUNK_ID_LEN + varint::MAX_VARINT_LEN + patch.len());
                dst.put_u8(T_DELTA);
                dst.put_u8(u8::from(*base_recent) | u8::from(*zstd) << 1);
                dst.put_slice(base.as_bytes());
                dst.put_slice(id.as_bytes());
                varint::put(dst, patch.len() as u64);
                dst.put_slice(patch);
            }
            Frame::Follow { group, pos } => {
                dst.reserve(2 + CHUNK_ID_LEN);
                dst.put_u8(T_FOLLOW);
                dst.put_slice(group.as_bytes());
                dst.put_u8(*pos);
            }
            Frame::Next => dst.put_u8(T_NEXT),
            Frame::Miss(id) => {
                dst.put_u8(T_MISS);
                dst.put_slice(id.as_bytes());
            }
            Frame::Ack(offset) => {
                dst.put_u8(T_ACK);
                varint::put(dst, *offset);
            }
            Frame::End => dst.put_u8(T_END),
            Frame::Done => dst.put_u8(T_DONE),
            Frame::Reset(reason) => {
                let mut end = reason.len().min(MAX_REASON);
                while !reason.is_char_boundary(end) {
                    end -= 1;
                }
                dst.put_u8(T_RESET);
                varint::put(dst, end as u64);
                dst.put_slice(&reason.as_bytes()[..end]);
            }
        }
    }

    /// Encoded size in bytes.
    pub fn encoded_len(&self) -> usize {
        match self {
            Frame::Literal(d) | Frame::Chunk(d) | Frame::Branches(d) => {
                1 + varint::len(d.len() as u64) + d.len()
            }
            Frame::Words { diffs, .. } => 2 + varint::len(diffs.len() as u64) + diffs.len(),
            Frame::Fill { data, .. } => {
                1 + CHUNK_ID_LEN + varint::len(data.len() as u64) + data.len()
            }
            Frame::Ref(_) | Frame::RefRecent(_) | Frame::Miss(_) => 1 + CHUNK_ID_LEN,
            Frame::Delta { patch, .. } => {
                2 + 2 * CHUNK_ID_LEN + varint::len(patch.len() as u64) + patch.len()
            }
            Frame::Ack(o) => 1 + varint::len(*o),
            Frame::Follow { .. } => 2 + CHUNK_ID_LEN,
            Frame::End | Frame::Done | Frame::Next => 1,
            Frame::Reset(r) => {
                let n = r.len().min(MAX_REASON);
                1 + varint::len(n as u64) + n
            }
        }
    }
}

fn encode_bytes(dst: &mut BytesMut, ty: u8, data: &[u8], max: usize) {
    debug_assert!(data.len() <= max);
    dst.reserve(1 + varint::MAX_VARINT_LEN + data.len());
    dst.put_u8(ty);
    varint::put(dst, data.len() as u64);
    dst.put_slice(data);
}

fn encode_chunk(dst: &mut BytesMut, ty: u8, id: &ChunkId, data: &[u8]) {
    debug_assert!(data.len() <= MAX_CHUNK);
    dst.reserve(1 + CHUNK_ID_LEN + varint::MAX_VARINT_LEN + data.len());
    dst.put_u8(ty);
    dst.put_slice(id.as_bytes());
    varint::put(dst, data.len() as u64);
    dst.put_slice(data);
}

/// Appends a ZSTREAM header for a piece of `compressed_len` bytes decoding to `raw_len`
/// bytes of encoded data frames; `fresh` tells the receiver to drop its context first.
pub fn encode_zstream_header(
    dst: &mut BytesMut,
    fresh: bool,
    raw_len: usize,
    compressed_len: usize,
) {
    dst.put_u8(T_ZSTREAM);
    dst.put_u8(u8::from(fresh));
    varint::put(dst, raw_len as u64);
    varint::put(dst, compressed_len as u64);
}

/// Appends a ZBATCH frame holding `compressed`, the zstd frame of `raw_len` bytes of
/// encoded data frames.
pub fn encode_zbatch_header(dst: &mut BytesMut, raw_len: usize, compressed_len: usize) {
    dst.put_u8(T_ZBATCH);
    varint::put(dst, raw_len as u64);
    varint::put(dst, compressed_len as u64);
}

/// Why a byte sequence is not a valid frame stream. Always fatal for the connection:
/// the sender is not a correct Shrinker edge (or the bytes were damaged).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The type byte is not one of the protocol's.
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    /// A varint is longer than 10 bytes or overflows.
    #[error("malformed length field in {0} frame")]
    BadVarint(&'static str),
    /// A length exceeds its cap.
    #[error("{what} length {len} exceeds the limit of {max} bytes")]
    TooLong {
        /// Which field.
        what: &'static str,
        /// The length announced.
        len: u64,
        /// The cap.
        max: usize,
    },
    /// A RESET reason is not UTF-8.
    #[error("RESET reason is not UTF-8")]
    BadReason,
    /// A ZBATCH could not be decompressed to exactly its announced size.
    #[error("ZBATCH does not decompress to its announced {0} bytes")]
    BadBatch(usize),
    /// A ZBATCH holds something other than complete data frames.
    #[error("ZBATCH holds a {0} frame; only data frames are allowed")]
    BatchContent(&'static str),
    /// A ZBATCH ends inside a frame.
    #[error("ZBATCH ends inside a frame")]
    BatchTruncated,
    /// A DELTA's or ZSTREAM's flags byte has unknown bits set.
    #[error("frame with unknown flags 0x{0:02x}")]
    BadFlags(u8),
    /// A WORDS frame's stride is 0 or above [`MAX_WORD_STRIDE`].
    #[error("WORDS frame with stride {0} (allowed 1..={MAX_WORD_STRIDE})")]
    BadStride(u8),
    /// A ZSTREAM piece does not decode in this stream.
    #[error(transparent)]
    Stream(#[from] crate::zstream::StreamError),
}

/// Incremental decoder of a frame stream: feed it a buffer that grows with each read.
///
/// Follows the `Decoder` contract: `Ok(None)` means "need more bytes" and consumes
/// nothing; `Ok(Some(frame))` consumes exactly that frame; `Err` is final.
pub struct FrameDecoder {
    batch: std::collections::VecDeque<Frame>,
    zstd: Option<zstd::bulk::Decompressor<'static>>,
    /// This direction's stream context, made by the first ZSTREAM.
    stream: Option<crate::zstream::StreamDecompressor>,
    /// Wire bytes consumed so far (including ZBATCH envelopes).
    consumed: u64,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for FrameDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameDecoder")
            .field("queued", &self.batch.len())
            .field("consumed", &self.consumed)
            .finish()
    }
}

impl FrameDecoder {
    /// A decoder at the start of a frame stream.
    pub fn new() -> Self {
        FrameDecoder {
            batch: Default::default(),
            zstd: None,
            stream: None,
            consumed: 0,
        }
    }

    /// Wire bytes consumed so far.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// Decodes the next frame from the front of `src`.
    ///
    /// # Errors
    /// [`FrameError`] when the bytes are not a valid frame stream.
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if let Some(f) = self.batch.pop_front() {
            return Ok(Some(f));
        }
        let Some((header_len, body_len, ty)) = peek_header(src)? else {
            return Ok(None);
        };
        let total = header_len + body_len;
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        self.consumed += total as u64;
        let mut frame = src.split_to(total).freeze();
        let header = frame.split_to(header_len);
        if ty == T_ZBATCH {
            let (raw_len, _) =
                get_varint(&header[1..], "ZBATCH")?.ok_or(FrameError::BadVarint("ZBATCH"))?;
            self.expand_batch(raw_len as usize, frame)?;
            // expand_batch refuses empty batches, so there is a frame to return.
            return Ok(self.batch.pop_front());
        }
        if ty == T_ZSTREAM {
            let fresh = header[1] & 1 != 0;
            let (raw_len, _) =
                get_varint(&header[2..], "ZSTREAM")?.ok_or(FrameError::BadVarint("ZSTREAM"))?;
            self.expand_piece(fresh, raw_len as usize, &frame)?;
            return Ok(self.batch.pop_front());
        }
        build(ty, frame).map(Some)
    }

    fn expand_batch(&mut self, raw_len: usize, compressed: Bytes) -> Result<(), FrameError> {
        // An encoder never sends an empty batch; refusing it keeps `Ok(None)` meaning
        // "consumed nothing".
        if raw_len == 0 {
            return Err(FrameError::BadBatch(0));
        }
        let z = match &mut self.zstd {
            Some(z) => z,
            None => self.zstd.insert(
                zstd::bulk::Decompressor::new().map_err(|_| FrameError::BadBatch(raw_len))?,
            ),
        };
        let raw = z
            .decompress(&compressed, raw_len)
            .map_err(|_| FrameError::BadBatch(raw_len))?;
        if raw.len() != raw_len {
            return Err(FrameError::BadBatch(raw_len));
        }
        self.queue_batch(Bytes::from(raw))
    }

    fn expand_piece(
        &mut self,
        fresh: bool,
        raw_len: usize,
        piece: &[u8],
    ) -> Result<(), FrameError> {
        if raw_len == 0 {
            return Err(FrameError::BadBatch(0));
        }
        let stream = match &mut self.stream {
            Some(s) => s,
            None => self
                .stream
                .insert(crate::zstream::StreamDecompressor::new()?),
        };
        let raw = stream.decompress(fresh, piece, raw_len)?;
        self.queue_batch(Bytes::from(raw))
    }

    /// Queues the data frames of a decompressed batch.
    fn queue_batch(&mut self, mut raw: Bytes) -> Result<(), FrameError> {
        while !raw.is_empty() {
            let Some((header_len, body_len, ty)) = peek_header(&raw)? else {
                return Err(FrameError::BatchTruncated);
            };
            if raw.len() < header_len + body_len {
                return Err(FrameError::BatchTruncated);
            }
            if !matches!(
                ty,
                T_LITERAL
                    | T_CHUNK
                    | T_WORDS
                    | T_BRANCHES
                    | T_REF
                    | T_REF_RECENT
                    | T_DELTA
                    | T_FOLLOW
                    | T_NEXT
            ) {
                return Err(FrameError::BatchContent(type_name(ty)));
            }
            let mut body = raw.split_to(header_len + body_len);
            body.advance(header_len);
            self.batch.push_back(build(ty, body)?);
        }
        Ok(())
    }
}

fn type_name(ty: u8) -> &'static str {
    match ty {
        T_LITERAL => "LITERAL",
        T_CHUNK => "CHUNK",
        T_WORDS => "WORDS",
        T_BRANCHES => "BRANCHES",
        T_REF => "REF",
        T_REF_RECENT => "REF_RECENT",
        T_DELTA => "DELTA",
        T_FOLLOW => "FOLLOW",
        T_NEXT => "NEXT",
        T_MISS => "MISS",
        T_FILL => "FILL",
        T_ACK => "ACK",
        T_END => "END",
        T_DONE => "DONE",
        T_RESET => "RESET",
        T_ZBATCH => "ZBATCH",
        T_ZSTREAM => "ZSTREAM",
        _ => "unknown",
    }
}

fn get_varint(src: &[u8], what: &'static str) -> Result<Option<(u64, usize)>, FrameError> {
    varint::get(src).map_err(|()| FrameError::BadVarint(what))
}

fn capped(len: u64, max: usize, what: &'static str) -> Result<usize, FrameError> {
    if len > max as u64 {
        Err(FrameError::TooLong { what, len, max })
    } else {
        Ok(len as usize)
    }
}

/// Reads a frame's header: `(header_len, body_len, type)`, or `None` if incomplete.
fn peek_header(src: &[u8]) -> Result<Option<(usize, usize, u8)>, FrameError> {
    let Some(&ty) = src.first() else {
        return Ok(None);
    };
    let rest = &src[1..];
    let r = match ty {
        T_LITERAL => get_varint(rest, "LITERAL")?
            .map(|(n, l)| capped(n, MAX_LITERAL, "LITERAL").map(|n| (1 + l, n, ty)))
            .transpose()?,
        T_CHUNK => get_varint(rest, "CHUNK")?
            .map(|(n, l)| capped(n, MAX_CHUNK, "CHUNK").map(|n| (1 + l, n, ty)))
            .transpose()?,
        T_BRANCHES => get_varint(rest, "BRANCHES")?
            .map(|(n, l)| capped(n, MAX_CHUNK, "BRANCHES").map(|n| (1 + l, n, ty)))
            .transpose()?,
        T_WORDS => {
            let Some(&stride) = rest.first() else {
                return Ok(None);
            };
            if !(1..=MAX_WORD_STRIDE).contains(&stride) {
                return Err(FrameError::BadStride(stride));
            }
            get_varint(&rest[1..], "WORDS")?
                .map(|(n, l)| capped(n, MAX_CHUNK, "WORDS").map(|n| (1, 1 + l + n, ty)))
                .transpose()?
        }
        T_FILL => {
            if rest.len() < CHUNK_ID_LEN {
                return Ok(None);
            }
            get_varint(&rest[CHUNK_ID_LEN..], type_name(ty))?
                .map(|(n, l)| {
                    capped(n, MAX_CHUNK, type_name(ty)).map(|n| (1, CHUNK_ID_LEN + l + n, ty))
                })
                .transpose()?
        }
        T_DELTA => {
            if rest.len() < 1 + 2 * CHUNK_ID_LEN {
                return Ok(None);
            }
            if rest[0] > 3 {
                return Err(FrameError::BadFlags(rest[0]));
            }
            get_varint(&rest[1 + 2 * CHUNK_ID_LEN..], "DELTA")?
                .map(|(n, l)| {
                    capped(n, MAX_CHUNK, "DELTA patch")
                        .map(|n| (1, 1 + 2 * CHUNK_ID_LEN + l + n, ty))
                })
                .transpose()?
        }
        T_REF | T_REF_RECENT | T_MISS => Some((1, CHUNK_ID_LEN, ty)),
        T_FOLLOW => Some((1, 1 + CHUNK_ID_LEN, ty)),
        T_NEXT => Some((1, 0, ty)),
        T_ACK => get_varint(rest, "ACK")?.map(|(_, l)| (1, l, ty)),
        T_END | T_DONE => Some((1, 0, ty)),
        T_RESET => get_varint(rest, "RESET")?
            .map(|(n, l)| capped(n, MAX_REASON, "RESET reason").map(|n| (1 + l, n, ty)))
            .transpose()?,
        T_ZBATCH => {
            let Some((raw, l1)) = get_varint(rest, "ZBATCH")? else {
                return Ok(None);
            };
            capped(raw, MAX_BATCH_RAW, "ZBATCH raw")?;
            get_varint(&rest[l1..], "ZBATCH")?
                .map(|(z, l2)| {
                    capped(z, MAX_BATCH_COMPRESSED, "ZBATCH compressed")
                        .map(|z| (1 + l1 + l2, z, ty))
                })
                .transpose()?
        }
        T_ZSTREAM => {
            let Some(&flags) = rest.first() else {
                return Ok(None);
            };
            if flags > 1 {
                return Err(FrameError::BadFlags(flags));
            }
            let Some((raw, l1)) = get_varint(&rest[1..], "ZSTREAM")? else {
                return Ok(None);
            };
            capped(raw, MAX_BATCH_RAW, "ZSTREAM raw")?;
            get_varint(&rest[1 + l1..], "ZSTREAM")?
                .map(|(z, l2)| {
                    capped(z, MAX_BATCH_COMPRESSED, "ZSTREAM compressed")
                        .map(|z| (2 + l1 + l2, z, ty))
                })
                .transpose()?
        }
        other => return Err(FrameError::UnknownType(other)),
    };
    Ok(r)
}

/// Builds a frame from its type and body (for CHUNK/FILL the body starts at the id).
fn build(ty: u8, mut body: Bytes) -> Result<Frame, FrameError> {
    let take_id = |b: &mut Bytes| {
        let mut id = [0u8; CHUNK_ID_LEN];
        b.copy_to_slice(&mut id);
        ChunkId(id)
    };
    Ok(match ty {
        T_LITERAL => Frame::Literal(body),
        T_CHUNK => Frame::Chunk(body),
        T_BRANCHES => Frame::Branches(body),
        T_WORDS => {
            let stride = body.get_u8();
            let (_, l) = get_varint(&body, "WORDS")?.ok_or(FrameError::BadVarint("WORDS"))?;
            body.advance(l);
            Frame::Words {
                stride,
                diffs: body,
            }
        }
        T_FILL => {
            let id = take_id(&mut body);
            let (_, l) = get_varint(&body, "FILL")?.ok_or(FrameError::BadVarint("FILL"))?;
            body.advance(l);
            Frame::Fill { id, data: body }
        }
        T_REF => Frame::Ref(take_id(&mut body)),
        T_REF_RECENT => Frame::RefRecent(take_id(&mut body)),
        T_DELTA => {
            let flags = body.get_u8();
            let (base_recent, zstd) = (flags & 1 != 0, flags & 2 != 0);
            let base = take_id(&mut body);
            let id = take_id(&mut body);
            let (_, l) = get_varint(&body, "DELTA")?.ok_or(FrameError::BadVarint("DELTA"))?;
            body.advance(l);
            Frame::Delta {
                base_recent,
                zstd,
                base,
                id,
                patch: body,
            }
        }
        T_FOLLOW => {
            let group = take_id(&mut body);
            Frame::Follow {
                group,
                pos: body.get_u8(),
            }
        }
        T_NEXT => Frame::Next,
        T_MISS => Frame::Miss(take_id(&mut body)),
        T_ACK => {
            let (v, _) = get_varint(&body, "ACK")?.ok_or(FrameError::BadVarint("ACK"))?;
            Frame::Ack(v)
        }
        T_END => Frame::End,
        T_DONE => Frame::Done,
        T_RESET => {
            Frame::Reset(String::from_utf8(body.to_vec()).map_err(|_| FrameError::BadReason)?)
        }
        other => return Err(FrameError::UnknownType(other)),
    })
}
