//! Fuzzing entry points (used by the cargo-fuzz targets in `fuzz/` and replayed over the
//! committed corpus by `wire/tests/fuzz_corpus.rs`).
//!
//! Each entry point takes arbitrary bytes and panics **only** when one of the crate's
//! invariants is violated: invalid input must come back as an `Err` (or `Ok(None)`),
//! never as a panic, an overflow or an unbounded allocation.
//!
//! The first bytes of each input are a small header that chooses how the rest is fed
//! (the read-split pattern, store size, compression mode, ...), so a fuzzer explores the
//! state machines' configurations together with their input. Every entry point accepts
//! any length: inputs shorter than the header are ignored.
//!
//! Not a stable API: hidden from the docs, for tests and fuzzers only.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};

use crate::chunk::{ChunkParams, Chunker};
use crate::delta::{self, Sketch};
use crate::frame::{self, Frame, FrameDecoder, FrameError};
use crate::handshake::{HandshakeError, Hello, HelloReply};
use crate::id::ChunkId;
use crate::segment::{CdcSegmenter, Segment, Segmenter};
use crate::session::{CompressMode, Decoder, DecoderConfig, Encoder, EncoderConfig, SendLedger};
use crate::store::{ContentStore, GroupIndex, Holding, PeerHoldings, SimilarChunks};
use crate::verified::VerifiedChunk;

/// `len` pseudo-random bytes from `seed` (xorshift64), the same for the same seed:
/// incompressible test content for the crate's tests, the corpus seeds and the
/// fuzz harnesses.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// `len` bytes that look like x86 code to [`crate::branches`]: near calls (`E8`) of four
/// functions from many places, with a few bytes of other instructions (none `E8` or
/// `E9`) between them; the same for the same seed.
pub fn code(len: usize, seed: u64) -> Vec<u8> {
    const OTHER: [u8; 8] = [0x48, 0x89, 0xc7, 0x31, 0xc0, 0x0f, 0x85, 0x90];
    const TARGETS: [u32; 4] = [0x0100, 0x2_0000, 0x80_0000, 0x1f_f000];
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 16);
    while out.len() + 16 <= len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        for k in 0..(x % 8) as usize {
            out.push(OTHER[(k + x as usize) % OTHER.len()]);
        }
        let target = TARGETS[(x >> 8) as usize % TARGETS.len()];
        let after = out.len() as u32 + 5;
        out.push(0xE8);
        out.extend_from_slice(&target.wrapping_sub(after).to_le_bytes());
    }
    out.resize(len, 0xcc);
    out
}

// ---------------------------------------------------------------------------------------
// Read-split patterns
// ---------------------------------------------------------------------------------------

/// Sizes of successive reads, chosen by two fuzz bytes.
#[derive(Clone, Debug)]
struct Splits {
    mode: u8,
    step: usize,
    state: u64,
}

impl Splits {
    /// `a % 4` picks the mode: everything at once, one byte at a time, a fixed step of
    /// `b + 1` bytes, or pseudo-random sizes (mostly small, some large) seeded by both.
    fn new(a: u8, b: u8) -> Self {
        Splits {
            mode: a % 4,
            step: usize::from(b) + 1,
            state: (u64::from(a) << 8 | u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        }
    }

    /// Everything in one read.
    fn whole() -> Self {
        Splits::new(0, 0)
    }

    /// The next read size, at least 1.
    fn next_len(&mut self) -> usize {
        match self.mode {
            0 => usize::MAX,
            1 => 1,
            2 => self.step,
            _ => {
                let x = &mut self.state;
                *x ^= *x << 13;
                *x ^= *x >> 7;
                *x ^= *x << 17;
                let bits = (*x >> 40) % 17;
                1 + (*x as usize & ((1usize << bits) - 1))
            }
        }
    }

    /// `data` cut into reads.
    fn pieces(mut self, data: &[u8]) -> impl Iterator<Item = &[u8]> {
        let mut rest = data;
        std::iter::from_fn(move || {
            if rest.is_empty() {
                return None;
            }
            let (piece, tail) = rest.split_at(self.next_len().min(rest.len()));
            rest = tail;
            Some(piece)
        })
    }
}

// ---------------------------------------------------------------------------------------
// In-memory fakes of the shared state
// ---------------------------------------------------------------------------------------

/// A FIFO content store bounded in bytes (0 = stores nothing). Asserts that only
/// verified chunks reach it.
#[derive(Debug)]
struct MemStore {
    cap: usize,
    inner: Mutex<MemStoreInner>,
}

#[derive(Debug, Default)]
struct MemStoreInner {
    order: VecDeque<ChunkId>,
    chunks: HashMap<ChunkId, Bytes>,
    bytes: usize,
}

impl MemStore {
    fn new(cap: usize) -> Self {
        MemStore {
            cap,
            inner: Mutex::new(MemStoreInner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemStoreInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn evict_all(&self) {
        *self.lock() = MemStoreInner::default();
    }
}

impl ContentStore for MemStore {
    fn get(&self, id: &ChunkId) -> Option<Bytes> {
        self.lock().chunks.get(id).cloned()
    }

    fn insert(&self, chunk: VerifiedChunk) {
        let (id, data) = chunk.into_parts();
        assert_eq!(ChunkId::of(&data), id, "unverified bytes reached the store");
        let mut g = self.lock();
        if data.len() > self.cap || g.chunks.contains_key(&id) {
            return;
        }
        g.bytes += data.len();
        g.order.push_back(id);
        g.chunks.insert(id, data);
        while g.bytes > self.cap {
            let old = g.order.pop_front().expect("bytes > 0 means an entry");
            let d = g.chunks.remove(&old).expect("ordered ids are stored");
            g.bytes -= d.len();
        }
    }
}

/// Believes the peer holds every chunk it was ever sent (until told otherwise), so
/// store evictions on the receiving side turn into misses.
#[derive(Debug, Default)]
struct Optimist {
    marked: Mutex<HashSet<ChunkId>>,
    /// Marked and acknowledged (a forgotten id leaves both).
    confirmed: Mutex<HashSet<ChunkId>>,
}

impl Optimist {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<ChunkId>> {
        self.marked.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_confirmed(&self) -> std::sync::MutexGuard<'_, HashSet<ChunkId>> {
        self.confirmed.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl PeerHoldings for Optimist {
    fn check_and_mark(&self, id: &ChunkId, _len: usize) -> Holding {
        if self.lock().insert(*id) {
            Holding::Absent
        } else if id.as_bytes()[0] & 1 == 1 {
            // Half the references claim their chunk was sent moments ago, so the
            // decoder defers them when the store lacks the chunk.
            Holding::Recent
        } else {
            Holding::Held
        }
    }

    fn forget(&self, id: &ChunkId) {
        self.lock().remove(id);
        self.lock_confirmed().remove(id);
    }

    fn confirm(&self, id: &ChunkId) {
        if self.lock().contains(id) {
            self.lock_confirmed().insert(*id);
        }
    }

    fn confirmed(&self, id: &ChunkId) -> bool {
        self.lock_confirmed().contains(id)
    }

    fn peek(&self, id: &ChunkId) -> Holding {
        if !self.lock().contains(id) {
            Holding::Absent
        } else if id.as_bytes()[0] & 1 == 1 {
            Holding::Recent
        } else {
            Holding::Held
        }
    }
}

/// Remembers every group formed, without bound: runs of references wherever
/// possible. (Also the fake the property tests use.)
#[derive(Debug, Default)]
pub struct MemGroups(Mutex<MemGroupsInner>);

#[derive(Debug, Default)]
struct MemGroupsInner {
    /// Member id → (group, position).
    members: HashMap<ChunkId, (ChunkId, usize)>,
    /// Group → content.
    contents: HashMap<ChunkId, Bytes>,
}

impl GroupIndex for MemGroups {
    fn find(&self, id: &ChunkId) -> Option<(ChunkId, Bytes, usize)> {
        let g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let &(name, pos) = g.members.get(id)?;
        Some((name, g.contents[&name].clone(), pos))
    }

    fn remember(&self, group: VerifiedChunk) {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (name, content) = group.into_parts();
        assert_eq!(
            ChunkId::of(&content),
            name,
            "a group not named by its content"
        );
        for (pos, member) in crate::group::ids(&content).enumerate() {
            g.members.insert(member, (name, pos));
        }
        g.contents.insert(name, content);
    }
}

/// Remembers every chunk sent, by feature, without bound: deltas whenever possible.
/// (Also the fake the property tests use.)
#[derive(Debug, Default)]
pub struct MemSimilar(Mutex<(HashMap<u64, ChunkId>, HashMap<ChunkId, Bytes>)>);

impl SimilarChunks for MemSimilar {
    fn similar(&self, sketch: &Sketch, max: usize) -> Vec<(ChunkId, Bytes)> {
        let g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<(ChunkId, Bytes)> = Vec::new();
        for f in sketch.features() {
            if let Some(id) = g.0.get(&f) {
                if out.iter().all(|(o, _)| o != id) {
                    out.push((*id, g.1[id].clone()));
                }
            }
        }
        out.truncate(max);
        out
    }

    fn get(&self, id: &ChunkId) -> Option<Bytes> {
        let g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        g.1.get(id).cloned()
    }

    fn remember(&self, chunk: VerifiedChunk, sketch: &Sketch) {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (id, data) = chunk.into_parts();
        assert_eq!(
            ChunkId::of(&data),
            id,
            "remembered bytes are not their id's"
        );
        for f in sketch.features() {
            g.0.insert(f, id);
        }
        g.1.insert(id, data);
    }
}

/// Believes the peer holds everything: every block becomes a reference (and a pin).
#[derive(Debug)]
struct AlwaysHolds;

impl PeerHoldings for AlwaysHolds {
    fn check_and_mark(&self, _id: &ChunkId, _len: usize) -> Holding {
        Holding::Held
    }

    fn forget(&self, _id: &ChunkId) {}
}

// ---------------------------------------------------------------------------------------
// frame_decoder
// ---------------------------------------------------------------------------------------

/// What decoding a whole byte stream produced.
#[derive(Debug, PartialEq, Eq)]
struct FrameRun {
    frames: Vec<Frame>,
    /// `Ok(bytes left undecoded)` or the first error.
    end: Result<usize, FrameError>,
    consumed: u64,
}

fn decode_frames(input: &[u8], splits: Splits) -> FrameRun {
    let mut dec = FrameDecoder::new();
    let mut buf = BytesMut::new();
    let mut fed = 0usize;
    let mut frames = Vec::new();
    for piece in splits.pieces(input) {
        buf.extend_from_slice(piece);
        fed += piece.len();
        loop {
            let before = buf.len();
            match dec.decode(&mut buf) {
                Ok(Some(f)) => {
                    check_frame_roundtrip(&f);
                    frames.push(f);
                }
                Ok(None) => {
                    assert_eq!(buf.len(), before, "Ok(None) consumed bytes");
                    break;
                }
                Err(e) => {
                    return FrameRun {
                        frames,
                        end: Err(e),
                        consumed: dec.consumed(),
                    }
                }
            }
            assert_eq!(
                dec.consumed(),
                (fed - buf.len()) as u64,
                "consumed() disagrees with the bytes taken from the buffer"
            );
        }
    }
    FrameRun {
        frames,
        end: Ok(buf.len()),
        consumed: dec.consumed(),
    }
}

/// `f` encodes to `encoded_len()` bytes that decode back to `f` (also inside a ZBATCH
/// when it is a data frame).
fn check_frame_roundtrip(f: &Frame) {
    let mut enc = BytesMut::new();
    f.encode(&mut enc);
    assert_eq!(enc.len(), f.encoded_len(), "encoded_len of {f:?}");
    let mut d = FrameDecoder::new();
    let mut src = enc.clone();
    match d.decode(&mut src) {
        Ok(Some(g)) => assert_eq!(&g, f, "frame changed through encode/decode"),
        other => panic!("re-encoded {f:?} decodes to {other:?}"),
    }
    assert!(src.is_empty(), "re-encoded frame left {} bytes", src.len());
    assert_eq!(d.consumed(), enc.len() as u64);

    if f.is_data() {
        let z = zstd::bulk::compress(&enc, 1).expect("zstd compresses");
        let mut batch = BytesMut::new();
        frame::encode_zbatch_header(&mut batch, enc.len(), z.len());
        batch.extend_from_slice(&z);
        let total = batch.len();
        let mut d = FrameDecoder::new();
        match d.decode(&mut batch) {
            Ok(Some(g)) => assert_eq!(&g, f, "frame changed through a ZBATCH"),
            other => panic!("{f:?} in a ZBATCH decodes to {other:?}"),
        }
        assert!(batch.is_empty());
        assert_eq!(d.consumed(), total as u64);
        assert_eq!(
            d.decode(&mut batch),
            Ok(None),
            "ZBATCH of one frame yields more"
        );
    }
}

/// Header: 2 bytes (read-split pattern); the rest is a frame stream.
///
/// Decodes the stream fed in the chosen reads and checks: `Ok(None)` consumes nothing,
/// `consumed()` counts exactly the bytes taken, every frame re-encodes (alone and, for
/// data frames, inside a ZBATCH) to bytes that decode back to it, and the frames and
/// first error are the same as when the stream is fed whole.
pub fn frame_decoder(data: &[u8]) {
    let Some((&[a, b], rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let split = decode_frames(rest, Splits::new(a, b));
    if a % 4 != 0 {
        let whole = decode_frames(rest, Splits::whole());
        assert_eq!(split, whole, "frame decoding depends on the read split");
    }
}

// ---------------------------------------------------------------------------------------
// handshake
// ---------------------------------------------------------------------------------------

trait HandshakeMsg: Sized + PartialEq + std::fmt::Debug {
    fn decode(src: &mut BytesMut) -> Result<Option<Self>, HandshakeError>;
    fn encode(&self, dst: &mut BytesMut);
}

impl HandshakeMsg for Hello {
    fn decode(src: &mut BytesMut) -> Result<Option<Self>, HandshakeError> {
        Hello::decode(src)
    }
    fn encode(&self, dst: &mut BytesMut) {
        Hello::encode(self, dst)
    }
}

impl HandshakeMsg for HelloReply {
    fn decode(src: &mut BytesMut) -> Result<Option<Self>, HandshakeError> {
        HelloReply::decode(src)
    }
    fn encode(&self, dst: &mut BytesMut) {
        HelloReply::encode(self, dst)
    }
}

/// Decodes consecutive messages of one kind; `(messages, Ok(bytes left) or the error)`.
fn decode_msgs<M: HandshakeMsg>(
    input: &[u8],
    splits: Splits,
) -> (Vec<M>, Result<usize, HandshakeError>) {
    let mut buf = BytesMut::new();
    let mut msgs = Vec::new();
    for piece in splits.pieces(input) {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.len();
            match M::decode(&mut buf) {
                Ok(Some(m)) => {
                    let mut enc = BytesMut::new();
                    m.encode(&mut enc);
                    let mut src = enc.clone();
                    match M::decode(&mut src) {
                        Ok(Some(again)) => {
                            assert_eq!(again, m, "handshake changed through encode/decode")
                        }
                        other => panic!("re-encoded {m:?} decodes to {other:?}"),
                    }
                    assert!(src.is_empty(), "re-encoded handshake left bytes");
                    msgs.push(m);
                }
                Ok(None) => {
                    assert_eq!(buf.len(), before, "Ok(None) consumed bytes");
                    break;
                }
                Err(e) => return (msgs, Err(e)),
            }
        }
    }
    (msgs, Ok(buf.len()))
}

fn check_handshake<M: HandshakeMsg>(rest: &[u8], a: u8, b: u8) {
    let split = decode_msgs::<M>(rest, Splits::new(a, b));
    if a % 4 != 0 {
        let whole = decode_msgs::<M>(rest, Splits::whole());
        assert_eq!(split, whole, "handshake decoding depends on the read split");
    }
}

/// Header: 2 bytes (read-split pattern); the rest is decoded both as hello and as
/// reply messages.
///
/// Checks that every decoded message re-encodes to bytes that decode to an equal value,
/// that `Ok(None)` consumes nothing, and that the result does not depend on the split.
pub fn handshake(data: &[u8]) {
    let Some((&[a, b], rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    check_handshake::<Hello>(rest, a, b);
    check_handshake::<HelloReply>(rest, a, b);
}

// ---------------------------------------------------------------------------------------
// chunker_split_invariance
// ---------------------------------------------------------------------------------------

/// Small sizes, so fuzz-sized inputs make many chunks.
pub const SMALL_CHUNKS: ChunkParams = ChunkParams {
    min: 64,
    avg: 256,
    max: 1024,
};

fn chunk_all(chunker: &Chunker, input: &[u8], splits: Splits) -> Vec<Bytes> {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in splits.pieces(input) {
        buf.extend_from_slice(piece);
        while let Some(c) = chunker.next(&mut buf, false) {
            out.push(c);
        }
    }
    while let Some(c) = chunker.next(&mut buf, true) {
        out.push(c);
    }
    assert!(buf.is_empty(), "flush left {} bytes", buf.len());
    out
}

/// Header: 3 bytes (read-split pattern, then how many times, 1 to 8, the rest is
/// repeated to form the input, so small inputs still exceed the default max chunk).
///
/// For [`SMALL_CHUNKS`] and [`ChunkParams::DEFAULT`]: the chunks are the same whether
/// the input is fed in the chosen reads or whole, they concatenate to the input, none
/// is empty or longer than `max`, and all but the flushed last one are at least `min`.
pub fn chunker_split_invariance(data: &[u8]) {
    let Some((&[a, b, c], rest)) = data.split_first_chunk::<3>() else {
        return;
    };
    let input = rest.repeat(1 + usize::from(c % 8));
    for params in [SMALL_CHUNKS, ChunkParams::DEFAULT] {
        let chunker = Chunker::new(params);
        let whole = chunk_all(&chunker, &input, Splits::whole());
        let split = chunk_all(&chunker, &input, Splits::new(a, b));
        assert!(
            split == whole,
            "chunk boundaries depend on the read split ({params:?}): {:?} vs {:?}",
            split.iter().map(Bytes::len).collect::<Vec<_>>(),
            whole.iter().map(Bytes::len).collect::<Vec<_>>()
        );
        assert!(
            whole.concat() == input,
            "chunks do not concatenate to the input"
        );
        for (i, ch) in whole.iter().enumerate() {
            assert!(!ch.is_empty(), "empty chunk");
            assert!(ch.len() <= params.max, "chunk of {} > max", ch.len());
            if i + 1 < whole.len() {
                assert!(
                    ch.len() >= params.min,
                    "non-final chunk of {} < min",
                    ch.len()
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// session_decoder
// ---------------------------------------------------------------------------------------

/// Blocks the `session_decoder` harness knows before it reads its input: blocks 0 and 1
/// are in the receiving store (when it is big enough), blocks 1, 2 and 3 are pinned in
/// the sending ledger (referenced after a 100-byte literal, in that order). Seed inputs
/// use their ids in REF, MISS and FILL frames.
pub fn session_known_blocks() -> [Bytes; 4] {
    std::array::from_fn(|i| {
        let len = 600 + 300 * i;
        Bytes::from(
            (0..len)
                .map(|j| (j as u8).wrapping_mul(31).wrapping_add(i as u8 * 77))
                .collect::<Vec<u8>>(),
        )
    })
}

/// Logical bytes the `session_decoder` ledger has sent before reading its input.
pub fn session_ledger_sent() -> u64 {
    let b = session_known_blocks();
    100 + (b[1].len() + b[2].len() + b[3].len()) as u64
}

/// Collects what the decoder produced and checks its bookkeeping.
#[derive(Debug, Default)]
struct DecoderWatch {
    out_bytes: u64,
    last_ack: u64,
}

impl DecoderWatch {
    fn drain(&mut self, dec: &mut Decoder) {
        while let Some(b) = dec.poll_output() {
            assert!(!b.is_empty(), "empty output buffer");
            self.out_bytes += b.len() as u64;
        }
        while let Some(c) = dec.poll_control() {
            match c {
                Frame::Ack(n) => {
                    assert!(n > self.last_ack, "ACK {n} not above {}", self.last_ack);
                    assert!(n <= dec.resolved(), "ACK {n} beyond resolved");
                    self.last_ack = n;
                }
                Frame::Miss(_) => {}
                other => panic!("decoder emitted control frame {other:?}"),
            }
        }
        assert_eq!(self.out_bytes, dec.resolved(), "output != resolved");
        assert_eq!(dec.stats().delivered, dec.resolved());
        if dec.is_finished() {
            assert!(!dec.is_waiting(), "finished while references wait");
        }
    }
}

/// Header: 3 bytes (read-split pattern, then config: bits 0-1 store size, 2-3 ACK
/// interval, 4-5 pending limit, 6 idle after each read, 7 stop waiting for deferred
/// references after each read); the rest is a frame stream
/// arriving from a (possibly hostile) peer.
///
/// Frames go to a [`Decoder`] (data, END, FILL) or to a [`SendLedger`] (MISS, ACK) that
/// already pinned [`session_known_blocks`] 1 to 3; RESET stops. Errors are expected and
/// end the machine that returned them; panics are not. Also checks that only verified
/// chunks reach the store, that output matches `resolved()`, that ACKs rise and never
/// pass what is resolved, and that FILLs carry the bytes of their id.
pub fn session_decoder(data: &[u8]) {
    let Some((&[a, b, c], rest)) = data.split_first_chunk::<3>() else {
        return;
    };
    let store_cap = [0, 1000, 4096, 1 << 20][usize::from(c & 3)];
    let ack_interval = [1, 100, 4096, 1 << 20][usize::from((c >> 2) & 3)];
    let max_pending = [0, 5000, 1 << 16, u64::MAX][usize::from((c >> 4) & 3)];
    let idle = c & 0x40 != 0;
    let expire = c & 0x80 != 0;

    let blocks = session_known_blocks();
    let store = Arc::new(MemStore::new(store_cap));
    for blk in &blocks[..2] {
        store.insert(VerifiedChunk::from_local(blk.clone()));
    }
    let mut ledger = SendLedger::new();
    let mut enc = Encoder::new(
        Arc::new(AlwaysHolds),
        EncoderConfig {
            compress: CompressMode::Off,
            level: 1,
        },
    );
    enc.handle_segment(Segment::Opaque(Bytes::from(vec![b'x'; 100])), &mut ledger);
    for blk in &blocks[1..] {
        enc.handle_segment(Segment::Block(blk.clone()), &mut ledger);
    }
    assert_eq!(ledger.sent(), session_ledger_sent());

    let mut dec = Some(Decoder::new(
        store.clone(),
        DecoderConfig {
            ack_interval,
            max_pending,
        },
    ));
    let mut ledger = Some(ledger);
    let mut watch = DecoderWatch::default();
    let mut fdec = FrameDecoder::new();
    let mut buf = BytesMut::new();
    for piece in Splits::new(a, b).pieces(rest) {
        buf.extend_from_slice(piece);
        loop {
            let f = match fdec.decode(&mut buf) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(_) => return,
            };
            match f {
                Frame::Miss(_) | Frame::Ack(_) => {
                    let Some(l) = ledger.as_mut() else { continue };
                    let before = (l.acked(), l.sent());
                    match l.handle_control(f.clone()) {
                        Ok(Some(Frame::Fill { id, data })) => {
                            assert!(
                                matches!(f, Frame::Miss(m) if m == id),
                                "FILL for another id"
                            );
                            assert_eq!(ChunkId::of(&data), id, "ledger FILL with wrong bytes");
                        }
                        Ok(Some(other)) => panic!("ledger answered {f:?} with {other:?}"),
                        Ok(None) => {
                            assert!(l.acked() >= before.0 && l.acked() <= l.sent());
                            assert_eq!(l.sent(), before.1);
                        }
                        Err(_) => ledger = None,
                    }
                }
                Frame::Reset(_) => return,
                f => {
                    let Some(d) = dec.as_mut() else { continue };
                    if d.handle_frame(f).is_err() {
                        dec = None;
                    } else {
                        watch.drain(d);
                    }
                }
            }
            if dec.is_none() && ledger.is_none() {
                return;
            }
        }
        if let Some(d) = dec.as_mut() {
            if idle {
                d.handle_idle();
            }
            let r = if expire {
                d.expire_deferred()
            } else {
                d.recheck()
            };
            if r.is_err() {
                dec = None;
            } else {
                watch.drain(d);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// tunnel_roundtrip
// ---------------------------------------------------------------------------------------

/// Chunk sizes for the round trip: small, so fuzz-sized inputs make blocks.
const ROUNDTRIP_PARAMS: [ChunkParams; 2] = [
    SMALL_CHUNKS,
    ChunkParams {
        min: 256,
        avg: 1024,
        max: 4096,
    },
];

/// One direction of one tunnel connection, sender to receiver.
struct Tunnel {
    input: Vec<u8>,
    fed: usize,
    read_buf: BytesMut,
    seg: CdcSegmenter,
    enc: Encoder,
    ledger: SendLedger,
    peer: Arc<Optimist>,
    wire: BytesMut,
    carry: BytesMut,
    fdec: FrameDecoder,
    dec: Decoder,
    back: VecDeque<Frame>,
    out: Vec<u8>,
    flush_each_read: bool,
    backlog: bool,
    idle_each_read: bool,
    expire_each_read: bool,
    forget_on_miss: bool,
}

impl Tunnel {
    /// The sender reads up to `n` bytes; returns whether anything happened.
    fn send_step(&mut self, n: usize) -> bool {
        if self.enc.is_finished() {
            return false;
        }
        let end = self.fed.saturating_add(n).min(self.input.len());
        self.read_buf.extend_from_slice(&self.input[self.fed..end]);
        self.fed = end;
        let done = self.fed == self.input.len();
        let mut segs = Vec::new();
        self.seg
            .segment(&mut self.read_buf, self.flush_each_read || done, &mut segs);
        if done {
            assert!(self.read_buf.is_empty(), "flushing segmenter kept bytes");
        }
        self.enc.handle_segments(&mut segs, &mut self.ledger);
        if done {
            self.enc.handle_end();
        }
        if let Some(b) = self.enc.take_batch(self.backlog) {
            self.wire.extend_from_slice(&b);
        }
        assert_eq!(
            self.ledger.sent() + self.read_buf.len() as u64,
            self.fed as u64,
            "ledger.sent() + buffered != bytes read"
        );
        true
    }

    /// The receiver reads up to `n` wire bytes; returns whether anything happened.
    fn recv_step(&mut self, n: usize) -> bool {
        let take = n.min(self.wire.len());
        if take == 0 {
            return false;
        }
        let piece = self.wire.split_to(take);
        self.carry.extend_from_slice(&piece);
        // As the edge does: the frames of one read go to the decoder together.
        let mut frames = Vec::new();
        loop {
            let f = match self.fdec.decode(&mut self.carry) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => panic!("encoder produced an invalid frame stream: {e}"),
            };
            assert!(
                matches!(
                    f,
                    Frame::Literal(_)
                        | Frame::Chunk(_)
                        | Frame::Words { .. }
                        | Frame::Branches(_)
                        | Frame::Ref(_)
                        | Frame::RefRecent(_)
                        | Frame::Delta { .. }
                        | Frame::Follow { .. }
                        | Frame::Next
                        | Frame::Fill { .. }
                        | Frame::End
                ),
                "{f:?} on the data path"
            );
            frames.push(f);
        }
        if let Err(e) = self.dec.handle_frames(&mut frames) {
            panic!("decoder refused an honest encoder's frame: {e}");
        }
        if self.idle_each_read {
            self.dec.handle_idle();
        }
        let r = if self.expire_each_read {
            self.dec.expire_deferred()
        } else {
            self.dec.recheck()
        };
        if let Err(e) = r {
            panic!("decoder refused an honest encoder's delta: {e}");
        }
        self.collect();
        true
    }

    /// The receiver's wait for deferred references ends; returns whether any waited.
    fn expire_step(&mut self) -> bool {
        if !self.dec.has_deferred() {
            return false;
        }
        if let Err(e) = self.dec.expire_deferred() {
            panic!("decoder refused an honest encoder's delta: {e}");
        }
        self.collect();
        true
    }

    /// Takes the decoder's output (checking it against the input) and control frames.
    fn collect(&mut self) {
        let before = self.out.len();
        while let Some(b) = self.dec.poll_output() {
            self.out.extend_from_slice(&b);
        }
        assert!(
            self.out.len() <= self.input.len()
                && self.out[before..] == self.input[before..self.out.len()],
            "delivered bytes differ from the input between offsets {before} and {}",
            self.out.len()
        );
        while let Some(c) = self.dec.poll_control() {
            self.back.push_back(c);
        }
    }

    /// The sender handles MISS and ACK frames; returns whether there were any.
    fn control_step(&mut self) -> bool {
        if self.back.is_empty() {
            return false;
        }
        while let Some(c) = self.back.pop_front() {
            if let Frame::Miss(id) = &c {
                if self.forget_on_miss {
                    self.peer.forget(id);
                }
            }
            match self.ledger.handle_control(c.clone()) {
                Ok(Some(fill)) => {
                    // FILLs travel on the data direction's wire, between batches.
                    fill.encode(&mut self.wire);
                }
                Ok(None) => {}
                Err(e) => panic!("ledger refused the decoder's {c:?}: {e}"),
            }
        }
        true
    }

    fn done(&self) -> bool {
        self.dec.is_finished() && self.wire.is_empty() && self.back.is_empty()
    }
}

/// Header: 6 bytes.
/// - byte 0: bits 0-2 store size (0, 1, 511, 1024, 3000, 10 000, 100 000 bytes or 1 GiB),
///   bits 3-4 compression (off, auto, always, always), bit 5 link backlogged,
///   bit 6 the sender forgets a chunk the receiver missed, bit 7 chunk sizes;
/// - byte 1: bits 0-2 evict the whole store every N rounds (0 = never), bits 3-4 ACK
///   interval, bit 5 flush the segmenter on every read, bit 6 idle after every wire read,
///   bit 7 stop waiting for deferred references after every wire read (otherwise only
///   when nothing else can progress);
/// - bytes 2-3: sender read splits; bytes 4-5: wire read splits (byte 5 mod 3 also
///   picks how short the groups of block ids are: 4 ids, ~8, or the real ~64).
///
/// The rest, twice (so the second copy is deduplicated), goes through
/// CdcSegmenter → Encoder (+ SendLedger) → wire bytes → FrameDecoder → Decoder, with
/// MISS/ACK carried back and FILLs answered. Checks that the output is exactly the
/// input, that every step's output is a prefix of it, that the run never stalls, and
/// that the ledger ends with everything acknowledged and nothing pinned.
pub fn tunnel_roundtrip(data: &[u8]) {
    let Some((&[h0, h1, s0, s1, r0, r1], rest)) = data.split_first_chunk::<6>() else {
        return;
    };
    let store_cap = [0, 1, 511, 1024, 3000, 10_000, 100_000, 1 << 30][usize::from(h0 & 7)];
    let compress = [
        CompressMode::Off,
        CompressMode::Auto,
        CompressMode::Always,
        CompressMode::Always,
    ][usize::from((h0 >> 3) & 3)];
    let params = ROUNDTRIP_PARAMS[usize::from(h0 >> 7)];
    let evict_every = usize::from(h1 & 7);
    let ack_interval = [1, 512, 2048, 1 << 20][usize::from((h1 >> 3) & 3)];

    let store = Arc::new(MemStore::new(store_cap));
    let peer = Arc::new(Optimist::default());
    let mut t = Tunnel {
        input: [rest, rest].concat(),
        fed: 0,
        read_buf: BytesMut::new(),
        seg: CdcSegmenter::new(Chunker::new(params)),
        enc: Encoder::new(peer.clone(), EncoderConfig { compress, level: 1 })
            .with_deltas(Arc::new(MemSimilar::default()))
            .with_groups(Arc::new(MemGroups::default())),
        ledger: SendLedger::new().confirming(peer.clone()),
        peer,
        wire: BytesMut::new(),
        carry: BytesMut::new(),
        fdec: FrameDecoder::new(),
        dec: Decoder::new(
            store.clone(),
            DecoderConfig {
                ack_interval,
                max_pending: u64::MAX,
            },
        ),
        back: VecDeque::new(),
        out: Vec::new(),
        flush_each_read: h1 & 0x20 != 0,
        backlog: h0 & 0x20 != 0,
        idle_each_read: h1 & 0x40 != 0,
        expire_each_read: h1 & 0x80 != 0,
        forget_on_miss: h0 & 0x40 != 0,
    };
    // The second `Always` also keeps a compression stream across batches.
    if (h0 >> 3) & 3 == 3 {
        t.enc.set_stream(Some(18));
    }
    // Groups short enough for fuzz-sized streams (the cut is the same both ways).
    let group_modulus = [1, 2, 64][usize::from(r1 % 3)];
    t.enc.set_group_modulus(group_modulus);
    t.dec.set_group_modulus(group_modulus);
    let mut send_splits = Splits::new(s0, s1);
    let mut recv_splits = Splits::new(r0, r1);
    let mut round = 0usize;
    while !t.done() {
        round += 1;
        let sent = t.send_step(send_splits.next_len());
        let received = t.recv_step(recv_splits.next_len());
        let answered = t.control_step();
        if evict_every != 0 && round % evict_every == 0 {
            store.evict_all();
        }
        // Nothing else to do: the driver's wait for deferred references times out.
        let expired = !(sent || received || answered) && t.expire_step();
        if !(sent || received || answered || expired) {
            panic!(
                "tunnel stalled: decoder finished={} waiting={}, {} of {} bytes delivered, \
                 ledger sent={} acked={}",
                t.dec.is_finished(),
                t.dec.is_waiting(),
                t.out.len(),
                t.input.len(),
                t.ledger.sent(),
                t.ledger.acked()
            );
        }
    }
    assert!(
        t.carry.is_empty(),
        "bytes left after END: {}",
        t.carry.len()
    );
    assert_eq!(t.out.len(), t.input.len(), "output length differs");
    assert!(t.out == t.input, "output bytes differ");
    assert_eq!(t.ledger.sent(), t.input.len() as u64);
    assert_eq!(
        t.ledger.acked(),
        t.ledger.sent(),
        "not everything acknowledged"
    );
    assert_eq!(t.ledger.pinned_bytes(), 0, "pins left after the final ACK");
    assert!(t.dec.poll_output().is_none());
}

// ---------------------------------------------------------------------------------------
// delta_patch
// ---------------------------------------------------------------------------------------

/// `delta_patch`: byte 0 picks the base (length 1024-4096, content from byte 1); the
/// rest is, in turn, a patch and a zstd delta applied to the base (which must fail
/// cleanly or give a chunk within the caps) and a list of in-place edits whose encoded
/// patch and zstd delta must rebuild the edited chunk exactly.
pub fn delta_patch(data: &[u8]) {
    let Some((&[a, b], rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let len = 1024 + usize::from(a) * 12;
    let base: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(b) ^ (i >> 8) as u8)
        .collect();
    // Arbitrary bytes as a patch, and as a zstd delta.
    if let Ok(out) = delta::apply(&base, rest) {
        assert_eq!(out.len(), base.len(), "a patch changed the length");
    }
    if let Ok(out) = delta::zstd_apply(&base, rest) {
        assert!(
            out.len() <= frame::MAX_CHUNK,
            "a zstd delta exceeded the chunk cap"
        );
    }
    // Arbitrary edits: (offset, value) pairs.
    let mut target = base.clone();
    for pair in rest.chunks_exact(3) {
        let at = usize::from(u16::from_le_bytes([pair[0], pair[1]])) % len;
        target[at] = pair[2];
    }
    let patch = delta::encode(&base, &target, usize::MAX).expect("same length, no limit");
    let rebuilt = delta::apply(&base, &patch).expect("own patch applies");
    assert!(
        rebuilt[..] == target[..],
        "patch does not rebuild the target"
    );
    if target == base {
        assert!(patch.is_empty(), "identical chunks need no edit");
    }
    // A limit below the patch's size gives no patch.
    if !patch.is_empty() {
        assert!(delta::encode(&base, &target, patch.len() - 1).is_none());
    }
    // The zstd codec rebuilds it too.
    let z = delta::zstd_encode(&base, &target, 1, usize::MAX).expect("zstd delta");
    let rebuilt = delta::zstd_apply(&base, &z).expect("own zstd delta applies");
    assert!(
        rebuilt[..] == target[..],
        "zstd delta does not rebuild the target"
    );
    // Sketches: deterministic, and equal for equal chunks.
    assert_eq!(Sketch::of(&target), Sketch::of(&target.clone()));
}

// ---------------------------------------------------------------------------------------
// QEMU main-channel segmenter
// ---------------------------------------------------------------------------------------

/// `qemu_segment`: bytes 0-1 pick the read split, byte 2 bit 0 flushes after every
/// read; the rest is a (possibly damaged) migration stream. The segments must
/// concatenate to exactly the input whatever the parser makes of it, every block must
/// be 4 KiB or a content-defined chunk, and a final flush must consume everything.
pub fn qemu_segment(data: &[u8]) {
    let [a, b, c, rest @ ..] = data else { return };
    let flush_each = c & 1 == 1;
    let mut seg = crate::segment::detecting_segmenter(ChunkParams::DEFAULT);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in Splits::new(*a, *b).pieces(rest) {
        buf.extend_from_slice(piece);
        seg.segment(&mut buf, flush_each, &mut out);
    }
    seg.segment(&mut buf, true, &mut out);
    assert!(buf.is_empty(), "a flush left bytes behind");
    let mut joined = Vec::with_capacity(rest.len());
    for s in &out {
        match s {
            Segment::Block(b) => assert!(!b.is_empty() && b.len() <= ChunkParams::DEFAULT.max),
            Segment::Opaque(b) => assert!(!b.is_empty(), "empty segment"),
        }
        joined.extend_from_slice(s.bytes());
    }
    assert!(joined == rest, "segments do not rebuild the stream");
    let r = seg.report();
    assert!(r.blocks_lost <= r.blocks + r.blocks_lost);
}

// ---------------------------------------------------------------------------------------
// word_differences
// ---------------------------------------------------------------------------------------

/// `word_differences`: byte 0 picks the stride (1..=[`crate::words::MAX_STRIDE`]), the
/// rest is a chunk. Differences and restore are inverse both ways (a WORDS frame's
/// payload is arbitrary bytes from the peer, and any of them restores to the one chunk
/// whose differences they are); lengths are kept; whatever [`crate::words::choose`]
/// picks restores to the chunk.
pub fn word_differences(data: &[u8]) {
    let Some((&first, chunk)) = data.split_first() else {
        return;
    };
    let stride = first % crate::words::MAX_STRIDE + 1;
    let diffs = crate::words::difference(chunk, stride);
    assert_eq!(diffs.len(), chunk.len(), "differences changed the length");
    assert!(
        crate::words::restore(&diffs, stride) == chunk,
        "restore does not undo difference"
    );
    let restored = crate::words::restore(chunk, stride);
    assert!(
        crate::words::difference(&restored, stride) == chunk,
        "difference does not undo restore"
    );
    if let Some((s, d)) = crate::words::choose(chunk) {
        assert!((1..=crate::words::MAX_STRIDE).contains(&s), "stride {s}");
        assert!(crate::words::restore(&d, s) == chunk, "chosen form differs");
    }
}

// ---------------------------------------------------------------------------------------
// branch_targets
// ---------------------------------------------------------------------------------------

/// `branch_targets`: the input is a chunk. Made absolute and made relative are inverse
/// both ways (a BRANCHES frame's payload is arbitrary bytes from the peer, and any of
/// them makes the one chunk whose absolute form they are); lengths are kept; whatever
/// [`crate::branches::choose`] picks makes the chunk again.
pub fn branch_targets(chunk: &[u8]) {
    let (absolute, _) = crate::branches::absolute(chunk);
    assert_eq!(
        absolute.len(),
        chunk.len(),
        "made absolute, changed the length"
    );
    assert!(
        crate::branches::relative(&absolute) == chunk,
        "relative does not undo absolute"
    );
    let relative = crate::branches::relative(chunk);
    assert!(
        crate::branches::absolute(&relative).0 == chunk,
        "absolute does not undo relative"
    );
    if let Some(made) = crate::branches::choose(chunk) {
        assert!(
            crate::branches::relative(&made) == chunk,
            "chosen form differs"
        );
    }
}
