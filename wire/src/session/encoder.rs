//! Local stream → tunnel frames, for one direction of one connection.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::batch::{BatchCompressor, CompressStats, RawBatch};
use super::compress::CompressMode;
use super::ledger::SendLedger;
use crate::delta::{self, Sketch};
use crate::frame::{self, Frame, MAX_LITERAL};
use crate::group::{self, GroupCutter};
use crate::id::ChunkId;
use crate::page_hash::PageHasher;
use crate::segment::Segment;
use crate::store::{GroupIndex, Holding, PeerHoldings, SimilarChunks};
use crate::verified::VerifiedChunk;

/// Encoder settings.
#[derive(Clone, Debug)]
pub struct EncoderConfig {
    /// Compression setting.
    pub compress: CompressMode,
    /// zstd level for compressed batches.
    pub level: i32,
}

impl Default for EncoderConfig {
    fn default() -> Self {
        EncoderConfig {
            compress: CompressMode::Auto,
            level: 1,
        }
    }
}

/// Counters of one encoder (logical = bytes of the proxied stream), with those of the
/// compression of its batches.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EncoderStats {
    /// Logical bytes sent as literals.
    pub literal_bytes: u64,
    /// Chunks sent in full.
    pub chunks: u64,
    /// Logical bytes sent in full as chunks.
    pub chunk_bytes: u64,
    /// Chunks sent as references.
    pub refs: u64,
    /// Logical bytes replaced by references.
    pub ref_bytes: u64,
    /// Of `refs`, those sent as REF_RECENT (the full copy went out moments before).
    pub refs_recent: u64,
    /// Of `refs`, those sent as FOLLOW or NEXT: inside a run the peer saw before
    /// ([`crate::group`]).
    pub group_refs: u64,
    /// Of `group_refs`, the FOLLOW frames (each starts following a group).
    pub follows: u64,
    /// Chunks sent as deltas against a similar chunk the peer holds.
    pub deltas: u64,
    /// Logical bytes sent as deltas.
    pub delta_bytes: u64,
    /// Patch bytes of those deltas (what crossed instead of `delta_bytes`).
    pub delta_patch_bytes: u64,
    /// Of `deltas`, those sent as zstd frames with the base as dictionary.
    pub zstd_deltas: u64,
    /// Of `deltas`, those whose base stood at the same place in the run of
    /// references the stream was following (tried before the similarity search).
    pub positional_deltas: u64,
    /// Of `chunks`, those sent as word differences (WORDS frames, [`crate::words`]).
    pub word_chunks: u64,
    /// Of `chunks`, those sent with absolute branch targets (BRANCHES frames,
    /// [`crate::branches`]).
    pub branch_chunks: u64,
    /// What compressing its batches did.
    pub compression: CompressStats,
}

impl EncoderStats {
    /// Adds the counters of a [`BatchCompressor`] that compressed this encoder's
    /// batches.
    pub fn add_compression(&mut self, c: &CompressStats) {
        self.compression.add(c);
    }
}

/// Similar chunks tried as a delta's base, best first (in-place edits).
const DELTA_CANDIDATES: usize = 4;
/// Of those, the ones also tried as a zstd delta's dictionary (two compressions each).
const ZSTD_DELTA_CANDIDATES: usize = 2;
/// zstd deltas use at most this level: on 4 KiB pages level 6 saved 0.1% of the bytes
/// for 20% more CPU than level 3 (`bench encode` on Linux guests).
const ZSTD_DELTA_MAX_LEVEL: i32 = 3;
/// A patch may be at most 1/this of the chunk: larger ones lose to compressing the
/// chunk itself (zstd takes typical memory pages to a third or half).
const DELTA_MAX_SHARE: usize = 4;
/// A zstd delta is sent only if it is at most this share of the chunk compressed
/// alone (minus the frame's 70 bytes of ids and header): batches compress chunks
/// somewhat better than one at a time, so it must win clearly.
const ZSTD_DELTA_SHARE_NUM: usize = 3;
const ZSTD_DELTA_SHARE_DEN: usize = 4;

/// Capacity reserved for the next batch: at least this (a small message's batch)...
const BATCH_MIN_CAPACITY: usize = 64 * 1024;
/// ...and at most this (twice the previous batch, so a bulk batch never regrows).
const BATCH_MAX_CAPACITY: usize = 1 << 20;

/// Turns segments into data frames, batched and optionally compressed.
pub struct Encoder {
    peer: Arc<dyn PeerHoldings>,
    similar: Option<Arc<dyn SimilarChunks>>,
    /// Groups formed on this edge's connections, for references in runs.
    groups: Option<Arc<dyn GroupIndex>>,
    /// Cuts this stream's block ids into groups (as the peer's decoder does).
    cutter: GroupCutter,
    /// The group the last FOLLOW or NEXT referred into: its name, its content and the
    /// position of that reference.
    follow: Option<(ChunkId, Bytes, usize)>,
    /// Where in a group the stream stands, for a new chunk's delta base: the last
    /// FOLLOW's or NEXT's group and position, moved on by a delta against the
    /// group's next member (a near-duplicate of the page at the same place in an
    /// earlier VM). Unlike `follow`, which the peer mirrors, only a hint.
    place: Option<(Bytes, usize)>,
    /// Look for deltas at all (sketch, lookup, remember: a few µs per new chunk).
    deltas: bool,
    /// Also try zstd deltas (costs two compressions per candidate chunk).
    thorough: bool,
    /// Send new chunks that hold regular 64-bit words as their differences (a pass or
    /// two over each new chunk; pays only when batches are compressed).
    words: bool,
    /// Send new chunks of x86 code with their branch targets made absolute (a scan
    /// for two opcode bytes; pays only when batches are compressed).
    branches: bool,
    /// zstd level (zstd deltas use it, capped).
    level: i32,
    /// Compresses the batches [`Encoder::take_batch`] hands out (a driver that
    /// compresses elsewhere takes [`Encoder::take_raw_batch`] and leaves it idle).
    compressor: BatchCompressor,
    /// Hashes the blocks of [`Encoder::handle_segments`] side by side.
    hasher: PageHasher,
    batch: BytesMut,
    /// Capacity to reserve when the next batch starts (sized by the last one).
    next_batch_capacity: usize,
    /// Literal and chunk bytes in `batch`: what compression can act on (references
    /// and frame headers are random or tiny).
    batch_payload: usize,
    /// Logical bytes (of the local stream) the frames in `batch` stand for.
    batch_logical: u64,
    end: bool,
    end_sent: bool,
    stats: EncoderStats,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("batch", &self.batch.len())
            .field("stats", &self.stats)
            .finish()
    }
}

impl Encoder {
    /// An encoder sending to a peer whose holdings are modelled by `peer`.
    pub fn new(peer: Arc<dyn PeerHoldings>, config: EncoderConfig) -> Self {
        Encoder {
            peer,
            similar: None,
            groups: None,
            cutter: GroupCutter::new(),
            follow: None,
            place: None,
            deltas: true,
            thorough: true,
            words: true,
            branches: true,
            level: config.level,
            compressor: BatchCompressor::new(config.compress, config.level),
            hasher: PageHasher::new(),
            batch: BytesMut::new(),
            next_batch_capacity: BATCH_MIN_CAPACITY,
            batch_payload: 0,
            batch_logical: 0,
            end: false,
            end_sent: false,
            stats: EncoderStats::default(),
        }
    }

    /// Sends new chunks as deltas against similar chunks found in `similar` (and
    /// remembers every chunk sent there).
    #[must_use]
    pub fn with_deltas(mut self, similar: Arc<dyn SimilarChunks>) -> Self {
        self.similar = Some(similar);
        self
    }

    /// Cuts the stream's block ids into groups, remembered in `groups`, and sends a
    /// run of references the peer saw before as one FOLLOW and one-byte NEXT frames
    /// ([`crate::group`]).
    #[must_use]
    pub fn with_groups(mut self, groups: Arc<dyn GroupIndex>) -> Self {
        self.groups = Some(groups);
        self
    }

    /// Cuts groups with [`GroupCutter::with_modulus`] (tests: the peer's decoder must
    /// do the same).
    #[doc(hidden)]
    pub fn set_group_modulus(&mut self, modulus: u8) {
        self.cutter = GroupCutter::with_modulus(modulus);
    }

    /// Whether to also try zstd deltas (two compressions per chunk that has a similar
    /// base): worth it when the link, not the CPU, limits (the driver decides; on by
    /// default).
    pub fn set_thorough(&mut self, thorough: bool) {
        self.thorough = thorough;
        self.compressor.set_persistent(thorough);
    }

    /// Whether to look for deltas at all: sketching, looking up and remembering every
    /// new chunk costs a few µs, worth it only when the link, not the CPU, limits (the
    /// driver decides; on by default). Chunks sent while off are not remembered.
    pub fn set_deltas(&mut self, deltas: bool) {
        self.deltas = deltas;
    }

    /// Whether to send new chunks of regular 64-bit words as their differences
    /// ([`crate::words`]): it only helps batches that are compressed, so the driver
    /// turns it off where they are not (on by default).
    pub fn set_words(&mut self, words: bool) {
        self.words = words;
    }

    /// Whether to send new chunks of x86 code with their branch targets made absolute
    /// ([`crate::branches`]): like word differences, it only helps batches that are
    /// compressed (on by default).
    pub fn set_branches(&mut self, branches: bool) {
        self.branches = branches;
    }

    /// Compresses batches as pieces of one zstd stream keeping `2^window_log` bytes of
    /// history (`None`: each batch on its own). The history costs about that much
    /// memory here and at the peer, so the driver grants it from a budget; taking it
    /// away drops the context.
    pub fn set_stream(&mut self, window_log: Option<u32>) {
        self.compressor.set_stream(window_log);
    }

    /// Encodes one segment into the pending batch. Blocks become references when the
    /// peer is believed to hold them; their bytes are pinned in `ledger` until acked.
    pub fn handle_segment(&mut self, segment: Segment, ledger: &mut SendLedger) {
        self.start_segments();
        match segment {
            Segment::Opaque(data) => self.handle_opaque(data, ledger),
            // Hashed once: the id names the chunk and, for deltas, vouches for the
            // bytes remembered as a future base.
            Segment::Block(data) => {
                self.handle_block(VerifiedChunk::from_local(data), None, ledger)
            }
        }
    }

    /// [`handle_segment`](Self::handle_segment) for every segment of `segments`, in
    /// order, leaving it empty. The blocks are hashed first, all together: 4 KiB pages
    /// side by side in SIMD lanes ([`PageHasher`]), about twice as fast as one by one.
    pub fn handle_segments(&mut self, segments: &mut Vec<Segment>, ledger: &mut SendLedger) {
        if segments.is_empty() {
            return;
        }
        self.start_segments();
        let blocks: Vec<Bytes> = segments
            .iter()
            .filter_map(|s| match s {
                Segment::Block(data) => Some(data.clone()),
                Segment::Opaque(_) => None,
            })
            .collect();
        let mut chunks = VerifiedChunk::from_local_all(&mut self.hasher, blocks)
            .into_iter()
            .peekable();
        for segment in segments.drain(..) {
            match segment {
                Segment::Opaque(data) => self.handle_opaque(data, ledger),
                Segment::Block(_) => {
                    let chunk = chunks.next().expect("one chunk per block");
                    let next = chunks.peek().map(|c| *c.id());
                    self.handle_block(chunk, next, ledger);
                }
            }
        }
    }

    fn start_segments(&mut self) {
        if self.batch.is_empty() && self.batch.capacity() < self.next_batch_capacity {
            self.batch.reserve(self.next_batch_capacity);
        }
        debug_assert!(!self.end, "segment after end");
    }

    fn handle_opaque(&mut self, mut data: Bytes, ledger: &mut SendLedger) {
        while !data.is_empty() {
            let piece = data.split_to(data.len().min(MAX_LITERAL));
            ledger.advance(piece.len());
            self.batch_logical += piece.len() as u64;
            self.stats.literal_bytes += piece.len() as u64;
            self.batch_payload += piece.len();
            Frame::Literal(piece).encode(&mut self.batch);
        }
    }

    /// Encodes one block; `next` is the id of the block after it, when known.
    fn handle_block(
        &mut self,
        chunk: VerifiedChunk,
        next: Option<ChunkId>,
        ledger: &mut SendLedger,
    ) {
        let id = *chunk.id();
        self.encode_block(chunk, next, ledger);
        self.cut(&id, ledger);
    }

    fn encode_block(
        &mut self,
        chunk: VerifiedChunk,
        next: Option<ChunkId>,
        ledger: &mut SendLedger,
    ) {
        let id = *chunk.id();
        let data = chunk.data().clone();
        debug_assert!(!data.is_empty() && data.len() <= frame::MAX_CHUNK);
        ledger.advance(data.len());
        self.batch_logical += data.len() as u64;
        let holding = self.peer.check_and_mark(&id, data.len());
        if holding.is_held() {
            self.stats.refs += 1;
            self.stats.ref_bytes += data.len() as u64;
            // Pages referenced again are mostly ones this edge sent: their delta base
            // copy serves as the pin.
            let similar = self.similar.as_ref();
            ledger.pin(id, &data, || similar.and_then(|s| s.peek(&id)));
            // A member sent moments ago is no risk in a run: runs follow only groups
            // the peer acknowledged, and it stores a group only once it delivered
            // every member, so a NEXT it cannot resolve was evicted.
            if self.group_ref(&id, next, ledger) {
                self.stats.group_refs += 1;
            } else if holding == Holding::Recent {
                self.stats.refs_recent += 1;
                Frame::RefRecent(id).encode(&mut self.batch);
            } else {
                Frame::Ref(id).encode(&mut self.batch);
            }
        } else {
            self.follow = None;
            let place = self.place.take();
            // A table of words first: as differences it compresses better than as a
            // delta against a similar page (bench encode on four real guests: −0.4%),
            // and needs no delta search; it is still remembered as a base.
            let words = if self.words {
                crate::words::choose(&data)
            } else {
                None
            };
            if words.is_some() {
                self.remember(chunk);
            } else if self.try_delta(chunk, place, ledger) {
                return;
            }
            ledger.carry(id);
            self.stats.chunks += 1;
            self.stats.chunk_bytes += data.len() as u64;
            self.batch_payload += data.len();
            // Code is tried only for a chunk that no other form took: a code page
            // resembling one the peer holds crosses as a small delta instead.
            let branches = match words {
                None if self.branches => crate::branches::choose(&data),
                _ => None,
            };
            match (words, branches) {
                (Some((stride, diffs)), _) => {
                    self.stats.word_chunks += 1;
                    Frame::Words {
                        stride,
                        diffs: Bytes::from(diffs),
                    }
                    .encode(&mut self.batch);
                }
                (None, Some(absolute)) => {
                    self.stats.branch_chunks += 1;
                    Frame::Branches(Bytes::from(absolute)).encode(&mut self.batch);
                }
                (None, None) => Frame::Chunk(data).encode(&mut self.batch),
            }
        }
    }

    /// Sends the reference to `id` (held by the peer) as a NEXT when it continues the
    /// group followed, or as a FOLLOW when a group the peer holds has `id` followed by
    /// `next` (unknown at the end of a read: assumed to continue). Returns whether it
    /// did; otherwise the caller sends a REF.
    fn group_ref(&mut self, id: &ChunkId, next: Option<ChunkId>, ledger: &mut SendLedger) -> bool {
        let Some(groups) = self.groups.as_ref() else {
            return false;
        };
        if let Some((name, content, pos)) = self.follow.as_mut() {
            if group::id_at(content, *pos + 1).as_ref() == Some(id) {
                *pos += 1;
                // Pinned again (a count; the group index's copy if the first pin is
                // gone): a receiver that evicted the group since the FOLLOW needs it
                // for this NEXT.
                ledger.pin(*name, content, || Some(content.clone()));
                Frame::Next.encode(&mut self.batch);
                self.place = Some((content.clone(), *pos));
                return true;
            }
        }
        self.follow = None;
        let Some((name, content, pos)) = groups.find(id) else {
            return false;
        };
        let Ok(pos_byte) = u8::try_from(pos) else {
            return false;
        };
        // A FOLLOW costs a byte more than a REF: only where the run goes on.
        let continues = match (group::id_at(&content, pos + 1), next) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(after), Some(next)) => after == next,
        };
        if !continues || group::id_at(&content, pos).as_ref() != Some(id) {
            return false;
        }
        // Only a group the peer acknowledged: one merely sent may sit for seconds
        // behind its connection's queue on a slow link, and a FOLLOW that overtook it
        // would make the peer wait for (or ask for) the group and then every member.
        if !self.peer.confirmed(&name) {
            return false;
        }
        // Pinned like a reference: a peer that evicted the group asks for it.
        ledger.pin(name, &content, || Some(content.clone()));
        Frame::Follow {
            group: name,
            pos: pos_byte,
        }
        .encode(&mut self.batch);
        self.stats.follows += 1;
        self.place = Some((content.clone(), pos));
        self.follow = Some((name, content, pos));
        true
    }

    /// Adds `id` to the stream's groups; a group it completes is remembered, and the
    /// peer, whose decoder cuts the same groups and stores them, is believed to hold
    /// it.
    fn cut(&mut self, id: &ChunkId, ledger: &mut SendLedger) {
        let Some(groups) = self.groups.as_ref() else {
            return;
        };
        let Some(group) = self.cutter.push(id) else {
            return;
        };
        let name = *group.id();
        if !self
            .peer
            .check_and_mark(&name, group.data().len())
            .is_held()
        {
            // As for a chunk sent whole: forgotten if the connection fails first.
            ledger.carry_group(name);
        }
        groups.remember(group);
    }

    /// Remembers a chunk sent whole as a future delta base (what [`Self::try_delta`]
    /// does after its search).
    fn remember(&mut self, chunk: VerifiedChunk) {
        let Some(similar) = self.similar.as_ref().filter(|_| self.deltas) else {
            return;
        };
        if let Some(sketch) = Sketch::of(chunk.data()) {
            similar.remember(chunk, &sketch);
        }
    }

    /// Sends a new chunk as a DELTA against a similar chunk the peer holds, if one is
    /// known and the patch is small; remembers the chunk either way. Returns whether a
    /// DELTA was sent.
    fn try_delta(
        &mut self,
        chunk: VerifiedChunk,
        place: Option<(Bytes, usize)>,
        ledger: &mut SendLedger,
    ) -> bool {
        let Some(similar) = self.similar.as_ref().filter(|_| self.deltas) else {
            return false;
        };
        let (id, data) = (*chunk.id(), chunk.data());
        let Some(sketch) = Sketch::of(data) else {
            return false;
        };
        let mut sent = false;
        // What the chunk costs without a base, computed once if needed.
        let mut alone: Option<usize> = None;
        let mut zstd_tries = 0;
        let zstd_level = self.level.min(ZSTD_DELTA_MAX_LEVEL);
        // The chunk at the same place in the run the stream was following comes
        // first: later VMs change pages where they stand.
        let positional = place.as_ref().and_then(|(content, pos)| {
            let base = group::id_at(content, pos + 1)?;
            Some((base, similar.get(&base)?))
        });
        let mut candidates = similar.similar(&sketch, DELTA_CANDIDATES);
        if let Some((base, base_data)) = positional.clone() {
            candidates.retain(|(c, _)| *c != base);
            candidates.insert(0, (base, base_data));
            candidates.truncate(DELTA_CANDIDATES);
        }
        for (base, base_data) in candidates {
            let holding = self.peer.peek(&base);
            if base == id || !holding.is_held() {
                continue;
            }
            // In-place edits first (cheap); a zstd frame with the base as dictionary
            // when the link is slow enough to afford it and it beats compressing the
            // chunk on its own.
            let mut zstd = false;
            let mut payload = delta::encode(&base_data, data, data.len() / DELTA_MAX_SHARE);
            if payload.is_none() && self.thorough && zstd_tries < ZSTD_DELTA_CANDIDATES {
                zstd_tries += 1;
                let alone = *alone.get_or_insert_with(|| delta::zstd_alone(data, zstd_level));
                let limit =
                    (alone * ZSTD_DELTA_SHARE_NUM / ZSTD_DELTA_SHARE_DEN).saturating_sub(70);
                payload = delta::zstd_encode(&base_data, data, zstd_level, limit).map(Bytes::from);
                zstd = payload.is_some();
            }
            if let Some(patch) = payload {
                self.stats.deltas += 1;
                self.stats.zstd_deltas += u64::from(zstd);
                self.stats.delta_bytes += data.len() as u64;
                self.stats.delta_patch_bytes += patch.len() as u64;
                // Pinned like a reference: if the base is gone at the peer, it asks
                // for the whole chunk.
                ledger.pin(id, data, || None);
                ledger.carry(id);
                // Edits of similar pages still share bytes: let compression see them.
                if !zstd {
                    self.batch_payload += patch.len();
                }
                // A base sent moments ago may still be in flight: the receiver waits
                // for it as for a REF_RECENT.
                Frame::Delta {
                    base_recent: holding == Holding::Recent,
                    zstd,
                    base,
                    id,
                    patch,
                }
                .encode(&mut self.batch);
                sent = true;
                if positional.as_ref().is_some_and(|(p, _)| *p == base) {
                    self.stats.positional_deltas += 1;
                    self.place = place.map(|(content, pos)| (content, pos + 1));
                }
                break;
            }
        }
        similar.remember(chunk, &sketch);
        sent
    }

    /// Marks the end of the local stream: the next [`Encoder::take_batch`] ends with END.
    pub fn handle_end(&mut self) {
        self.end = true;
    }

    /// Bytes of frames waiting in the batch.
    pub fn batch_len(&self) -> usize {
        self.batch.len()
    }

    /// Logical bytes of the local stream the frames waiting in the batch stand for:
    /// a batch of references is small on the wire but may stand for far more than
    /// the flow-control window.
    pub fn batch_logical(&self) -> u64 {
        self.batch_logical
    }

    /// Whether END has been handed out.
    pub fn is_finished(&self) -> bool {
        self.end_sent
    }

    /// Takes the pending frames as wire bytes (a ZSTREAM piece when the encoder has a
    /// stream, else a ZBATCH when compression pays), followed by END if the stream
    /// ended. `link_limited` feeds the `Auto` compression policy.
    pub fn take_batch(&mut self, link_limited: bool) -> Option<Bytes> {
        let batch = self.take_raw_batch()?;
        Some(self.compress_batch(batch, link_limited))
    }

    /// The wire bytes of a batch [`take_raw_batch`](Self::take_raw_batch) took, made by
    /// this encoder's own compressor (what [`take_batch`](Self::take_batch) does in
    /// one step; apart, a caller can look at the frames before they are compressed).
    pub fn compress_batch(&mut self, batch: RawBatch, link_limited: bool) -> Bytes {
        self.compressor.compress(batch, link_limited)
    }

    /// Takes the pending frames (and END, if the stream ended) uncompressed, for a
    /// [`BatchCompressor`] of the driver's; `None` when there is nothing to send.
    pub fn take_raw_batch(&mut self) -> Option<RawBatch> {
        if self.batch.is_empty() && (!self.end || self.end_sent) {
            return None;
        }
        let frames = if self.batch.is_empty() {
            BytesMut::new()
        } else {
            let raw = self.batch.split();
            // Room for the next batch, taken when it starts (so an idle connection
            // holds none): growing a bulk batch from 64 KiB by doubling copied each one
            // ~1.7 times over (10% of the sender's instructions).
            self.next_batch_capacity =
                (raw.len() * 2).clamp(BATCH_MIN_CAPACITY, BATCH_MAX_CAPACITY);
            // The rest of the old buffer would keep it alive while idle.
            self.batch = BytesMut::new();
            raw
        };
        let end = self.end && !self.end_sent;
        self.end_sent |= end;
        self.batch_logical = 0;
        Some(RawBatch {
            frames,
            payload: std::mem::take(&mut self.batch_payload),
            end,
        })
    }

    /// Sets the zstd level for the next batches (the driver picks it from the link's
    /// pace: a slow link affords a stronger level).
    pub fn set_level(&mut self, level: i32) {
        self.level = level;
        self.compressor.set_level(level);
    }

    /// The zstd level in use.
    pub fn level(&self) -> i32 {
        self.level
    }

    /// Counters so far, with those of the batches [`Encoder::take_batch`] compressed.
    pub fn stats(&self) -> EncoderStats {
        let mut s = self.stats.clone();
        s.add_compression(self.compressor.stats());
        s
    }
}
