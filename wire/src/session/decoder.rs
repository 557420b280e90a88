//! Tunnel frames → local stream, for one direction of one connection.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use bytes::Bytes;

use super::SessionError;
use crate::branches;
use crate::delta;
use crate::frame::Frame;
use crate::group::{self, GroupCutter};
use crate::id::ChunkId;
use crate::page_hash::PageHasher;
use crate::store::ContentStore;
use crate::verified::{UnverifiedChunk, VerifiedChunk};
use crate::words;

/// The chunk a WORDS or BRANCHES frame stands for (its transform undone); `None` for
/// any other frame.
fn disguised_chunk(frame: &Frame) -> Option<Bytes> {
    match frame {
        Frame::Words { stride, diffs } => Some(Bytes::from(words::restore(diffs, *stride))),
        Frame::Branches(data) => Some(Bytes::from(branches::relative(data))),
        _ => None,
    }
}

/// Decoder settings.
#[derive(Clone, Debug)]
pub struct DecoderConfig {
    /// Send an ACK after resolving this many logical bytes (and whenever input idles).
    pub ack_interval: u64,
    /// Most logical bytes allowed to queue behind unresolved references. The peer's
    /// window bounds what it sends unacknowledged, so an honest peer stays below it.
    pub max_pending: u64,
}

impl Default for DecoderConfig {
    fn default() -> Self {
        DecoderConfig {
            ack_interval: 1 << 20,
            max_pending: 256 << 20,
        }
    }
}

/// Counters of one decoder.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DecoderStats {
    /// Logical bytes delivered.
    pub delivered: u64,
    /// References resolved from the store.
    pub refs_resolved: u64,
    /// MISS requests sent.
    pub misses: u64,
    /// REF_RECENT frames the store could not resolve on arrival, so they waited for
    /// the chunk to arrive on another connection instead of asking at once.
    pub deferred: u64,
    /// Of those, the ones whose chunk did arrive in time (no MISS needed).
    pub deferred_arrived: u64,
    /// FILLs received.
    pub fills: u64,
    /// New chunks verified and stored.
    pub chunks_stored: u64,
    /// DELTA frames rebuilt from their base, verified and stored.
    pub deltas_applied: u64,
    /// References received as FOLLOW or NEXT (also counted in `refs_resolved`).
    pub group_refs: u64,
    /// Groups cut from the delivered blocks and stored ([`crate::group`]).
    pub groups_stored: u64,
}

/// Assumed size of a chunk not yet resolved, for the pending bound.
const UNRESOLVED_WEIGHT: u64 = 4096;

enum Pending {
    /// Bytes to deliver; for a block, its id (the groups are cut from those).
    Ready(Bytes, Option<ChunkId>),
    /// Chunk `id`, not resolvable yet; for a DELTA whose base is missing, the base and
    /// patch to rebuild it from once the base arrives.
    Wait(ChunkId, Option<Box<(ChunkId, bool, Bytes)>>),
    /// The chunk at this position of a group the store lacks (a FOLLOW's or NEXT's).
    WaitGroup(ChunkId, usize),
    End,
}

/// Rebuilds the byte stream from data frames, resolving references from the shared
/// store and asking the peer for what the store lacks.
///
/// Output order is frame order: once one reference waits for a FILL, everything after
/// it queues until it resolves.
///
/// A REF_RECENT the store cannot resolve is *deferred*: its chunk was sent in full
/// moments ago, probably on a sibling connection, and will likely be in the store
/// shortly. The driver calls [`Decoder::recheck`] when the store may have gained
/// chunks and [`Decoder::expire_deferred`] when it has waited long enough; only then
/// is a MISS sent. The decoder keeps no clock: how long to wait is the driver's call.
pub struct Decoder {
    store: Arc<dyn ContentStore>,
    config: DecoderConfig,
    pending: VecDeque<Pending>,
    pending_weight: u64,
    requested: HashSet<ChunkId>,
    deferred: HashSet<ChunkId>,
    fills: HashMap<ChunkId, Bytes>,
    output: VecDeque<Bytes>,
    control: VecDeque<Frame>,
    resolved: u64,
    acked: u64,
    end_seen: bool,
    finished: bool,
    stats: DecoderStats,
    /// Cuts the delivered blocks' ids into groups, as the sender's encoder does.
    cutter: GroupCutter,
    /// The group the last FOLLOW or NEXT referred into, with that reference's
    /// position, and the group's content once known.
    follow: Option<(ChunkId, usize, Option<Bytes>)>,
    /// Hashes the CHUNK frames of [`Decoder::handle_frames`] side by side.
    hasher: PageHasher,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("pending", &self.pending.len())
            .field("resolved", &self.resolved)
            .field("stats", &self.stats)
            .finish()
    }
}

impl Decoder {
    /// A decoder resolving references from `store`.
    pub fn new(store: Arc<dyn ContentStore>, config: DecoderConfig) -> Self {
        Decoder {
            store,
            config,
            pending: VecDeque::new(),
            pending_weight: 0,
            requested: HashSet::new(),
            deferred: HashSet::new(),
            fills: HashMap::new(),
            output: VecDeque::new(),
            control: VecDeque::new(),
            resolved: 0,
            acked: 0,
            end_seen: false,
            finished: false,
            stats: DecoderStats::default(),
            cutter: GroupCutter::new(),
            follow: None,
            hasher: PageHasher::new(),
        }
    }

    /// Cuts groups with [`GroupCutter::with_modulus`] (tests: the peer's encoder must
    /// do the same).
    #[doc(hidden)]
    pub fn set_group_modulus(&mut self, modulus: u8) {
        self.cutter = GroupCutter::with_modulus(modulus);
    }

    /// Handles a LITERAL, CHUNK, WORDS, REF, REF_RECENT, DELTA, FOLLOW, NEXT, END or
    /// FILL frame.
    ///
    /// # Errors
    /// [`SessionError`] when a chunk fails verification, data follows END, the pending
    /// bound is exceeded, or the frame is a control frame for the ledger.
    pub fn handle_frame(&mut self, frame: Frame) -> Result<(), SessionError> {
        self.handle_hashed(frame, None)
    }

    /// [`handle_frame`](Self::handle_frame) for every frame of `frames`, in order,
    /// leaving it empty (also on error: what follows a bad frame is dropped). The
    /// CHUNK frames are hashed first, all together: 4 KiB pages side by side in SIMD
    /// lanes ([`PageHasher`]).
    ///
    /// # Errors
    /// As [`handle_frame`](Self::handle_frame), for the first frame that fails.
    pub fn handle_frames(&mut self, frames: &mut Vec<Frame>) -> Result<(), SessionError> {
        if frames.is_empty() {
            return Ok(());
        }
        // WORDS and BRANCHES frames are CHUNKs in other clothes: restored first, they
        // are hashed with the others.
        for frame in frames.iter_mut() {
            if let Some(data) = disguised_chunk(frame) {
                *frame = Frame::Chunk(data);
            }
        }
        let blocks: Vec<Bytes> = frames
            .iter()
            .filter_map(|f| match f {
                Frame::Chunk(data) => Some(data.clone()),
                _ => None,
            })
            .collect();
        let mut chunks = VerifiedChunk::from_local_all(&mut self.hasher, blocks).into_iter();
        for frame in frames.drain(..) {
            let hashed = match frame {
                Frame::Chunk(_) => chunks.next(),
                _ => None,
            };
            self.handle_hashed(frame, hashed)?;
        }
        Ok(())
    }

    /// Handles `frame`; a CHUNK frame's bytes come already hashed in `hashed` when
    /// given (the same bytes, named by [`VerifiedChunk::from_local_all`]).
    fn handle_hashed(
        &mut self,
        frame: Frame,
        hashed: Option<VerifiedChunk>,
    ) -> Result<(), SessionError> {
        if self.end_seen && frame.is_data() {
            return Err(SessionError::DataAfterEnd);
        }
        // Any other block ends a run of group references (as at the sender).
        if frame.is_data() && !matches!(frame, Frame::Literal(_) | Frame::Next) {
            self.follow = None;
        }
        let item = match frame {
            Frame::Literal(data) => Pending::Ready(data, None),
            Frame::Words { .. } | Frame::Branches(_) => {
                let data = disguised_chunk(&frame).expect("WORDS and BRANCHES carry a chunk");
                return self.handle_hashed(Frame::Chunk(data), None);
            }
            Frame::Chunk(data) => {
                // Named by its own hash: verified by construction, cannot poison.
                let chunk = match hashed {
                    Some(chunk) => {
                        debug_assert_eq!(chunk.data(), &data, "hashed chunk of another frame");
                        chunk
                    }
                    None => VerifiedChunk::from_local(data),
                };
                let (id, data) = (*chunk.id(), chunk.data().clone());
                self.store.insert(chunk);
                self.stats.chunks_stored += 1;
                Pending::Ready(data, Some(id))
            }
            Frame::Delta {
                base_recent,
                zstd,
                base,
                id,
                patch,
            } => match self.lookup(&base) {
                Some(base) => Pending::Ready(self.rebuild(&base, zstd, &patch, id)?, Some(id)),
                None => match self.lookup(&id) {
                    Some(data) => {
                        self.stats.refs_resolved += 1;
                        Pending::Ready(data, Some(id))
                    }
                    // The base may still be in flight on another connection: wait.
                    None if base_recent => {
                        self.defer(id);
                        Pending::Wait(id, Some(Box::new((base, zstd, patch))))
                    }
                    // The base is gone (evicted): ask for the whole chunk, which the
                    // sender pinned as it does for a reference.
                    None => {
                        self.request(id);
                        Pending::Wait(id, None)
                    }
                },
            },
            Frame::Ref(id) => self.reference(id, false),
            Frame::RefRecent(id) => self.reference(id, true),
            Frame::Follow { group, pos } => {
                self.stats.group_refs += 1;
                let pos = usize::from(pos);
                let content = self.lookup(&group);
                self.follow = Some((group, pos, content.clone()));
                match content {
                    Some(content) => self.reference(member(&content, pos)?, false),
                    // Evicted (the sender follows only groups this edge stored).
                    None => {
                        self.request(group);
                        Pending::WaitGroup(group, pos)
                    }
                }
            }
            Frame::Next => {
                self.stats.group_refs += 1;
                let Some((group, pos, known)) = self.follow.as_mut() else {
                    return Err(SessionError::Unexpected("NEXT without FOLLOW"));
                };
                *pos += 1;
                let (group, pos, known) = (*group, *pos, known.clone());
                let content = known.or_else(|| self.lookup(&group));
                if let Some(f) = self.follow.as_mut() {
                    f.2.clone_from(&content);
                }
                match content {
                    Some(content) => self.reference(member(&content, pos)?, false),
                    // Its group is still asked for: this waits behind that FOLLOW.
                    None => Pending::WaitGroup(group, pos),
                }
            }
            Frame::End => {
                self.end_seen = true;
                Pending::End
            }
            Frame::Fill { id, data } => {
                let chunk = UnverifiedChunk { id, data }.verify()?;
                self.stats.fills += 1;
                self.fills.insert(id, chunk.data().clone());
                self.store.insert(chunk);
                return self.drain();
            }
            Frame::Miss(_) => return Err(SessionError::Unexpected("MISS")),
            Frame::Ack(_) => return Err(SessionError::Unexpected("ACK")),
            Frame::Reset(_) => return Err(SessionError::Unexpected("RESET")),
            Frame::Done => return Err(SessionError::Unexpected("DONE")),
        };
        if self.pending.is_empty() {
            self.deliver(item);
        } else {
            self.pending_weight += match &item {
                Pending::Ready(d, _) => d.len() as u64,
                Pending::Wait(..) | Pending::WaitGroup(..) => UNRESOLVED_WEIGHT,
                Pending::End => 0,
            };
            self.pending.push_back(item);
            if self.pending_weight > self.config.max_pending {
                return Err(SessionError::WindowExceeded {
                    pending: self.pending_weight,
                    limit: self.config.max_pending,
                });
            }
        }
        Ok(())
    }

    /// A reference to chunk `id`: delivered from the store, or waited for (a
    /// `recent` one without asking, for a while).
    fn reference(&mut self, id: ChunkId, recent: bool) -> Pending {
        match self.lookup(&id) {
            Some(data) => {
                self.stats.refs_resolved += 1;
                Pending::Ready(data, Some(id))
            }
            None if recent => {
                self.defer(id);
                Pending::Wait(id, None)
            }
            None => {
                self.request(id);
                Pending::Wait(id, None)
            }
        }
    }

    /// Rebuilds a DELTA's chunk from its base, verified against the id the sender
    /// computed from the original (a wrong rebuild is refused, never delivered or
    /// stored), and stores it.
    fn rebuild(
        &mut self,
        base: &[u8],
        zstd: bool,
        patch: &[u8],
        id: ChunkId,
    ) -> Result<Bytes, SessionError> {
        let data = if zstd {
            delta::zstd_apply(base, patch)?
        } else {
            delta::apply(base, patch)?
        };
        let chunk = UnverifiedChunk { id, data }.verify()?;
        let data = chunk.data().clone();
        self.store.insert(chunk);
        self.stats.deltas_applied += 1;
        Ok(data)
    }

    /// A chunk from the store, or from the FILLs kept while references wait.
    fn lookup(&self, id: &ChunkId) -> Option<Bytes> {
        if self.pending.is_empty() {
            self.store.get(id)
        } else {
            self.fills.get(id).cloned().or_else(|| self.store.get(id))
        }
    }

    fn defer(&mut self, id: ChunkId) {
        if !self.requested.contains(&id) && self.deferred.insert(id) {
            self.stats.deferred += 1;
        }
    }

    fn request(&mut self, id: ChunkId) {
        if self.requested.insert(id) {
            self.stats.misses += 1;
            self.control.push_back(Frame::Miss(id));
        }
    }

    /// Delivers an item with nothing queued before it, or queues it behind a miss.
    fn deliver(&mut self, item: Pending) {
        match item {
            Pending::Ready(data, block) => self.emit(data, block),
            wait @ (Pending::Wait(..) | Pending::WaitGroup(..)) => {
                self.pending_weight += UNRESOLVED_WEIGHT;
                self.pending.push_back(wait);
            }
            Pending::End => self.finish(),
        }
    }

    /// Delivers `data`; a block's id goes to the groups, and a group it completes
    /// into the store (where the peer's FOLLOW frames find it).
    fn emit(&mut self, data: Bytes, block: Option<ChunkId>) {
        if let Some(group) = block.and_then(|id| self.cutter.push(&id)) {
            self.store.insert(group);
            self.stats.groups_stored += 1;
        }
        self.resolved += data.len() as u64;
        self.stats.delivered += data.len() as u64;
        if !data.is_empty() {
            self.output.push_back(data);
        }
        if self.resolved - self.acked >= self.config.ack_interval {
            self.ack();
        }
    }

    fn finish(&mut self) {
        self.finished = true;
        self.ack();
    }

    fn ack(&mut self) {
        if self.resolved > self.acked {
            self.acked = self.resolved;
            self.control.push_back(Frame::Ack(self.resolved));
        }
    }

    /// Resolves queued items from the front for as long as possible.
    ///
    /// # Errors
    /// [`SessionError`] when a deferred DELTA rebuilds to something else than its id.
    fn drain(&mut self) -> Result<(), SessionError> {
        while let Some(front) = self.pending.front() {
            let (data, block) = match front {
                Pending::Ready(d, block) => {
                    self.pending_weight -= d.len() as u64;
                    (d.clone(), *block)
                }
                &Pending::WaitGroup(group, pos) => {
                    let content = self
                        .fills
                        .get(&group)
                        .cloned()
                        .or_else(|| self.store.get(&group));
                    match content {
                        Some(content) => {
                            // Now a plain reference (weighed the same), tried at once.
                            let id = member(&content, pos)?;
                            if let Some(f) = self.follow.as_mut().filter(|f| f.0 == group) {
                                f.2.get_or_insert(content);
                            }
                            *self.pending.front_mut().expect("front") = Pending::Wait(id, None);
                            continue;
                        }
                        None => {
                            self.request(group);
                            break;
                        }
                    }
                }
                Pending::Wait(id, delta) => {
                    let id = *id;
                    let mut found = self.fills.get(&id).cloned().or_else(|| self.store.get(&id));
                    if found.is_none() {
                        if let Some((base, zstd, patch)) = delta.as_deref() {
                            if let Some(base) = self.store.get(base) {
                                let (zstd, patch) = (*zstd, patch.clone());
                                found = Some(self.rebuild(&base, zstd, &patch, id)?);
                            }
                        }
                    }
                    match found {
                        Some(d) => {
                            self.pending_weight -= UNRESOLVED_WEIGHT;
                            self.stats.refs_resolved += 1;
                            if self.deferred.remove(&id) {
                                self.stats.deferred_arrived += 1;
                            }
                            (d, Some(id))
                        }
                        None if self.deferred.contains(&id) => break,
                        None => {
                            // Evicted between arrival and now (tiny store): ask again.
                            self.request(id);
                            break;
                        }
                    }
                }
                Pending::End => {
                    self.pending.pop_front();
                    self.finish();
                    continue;
                }
            };
            self.pending.pop_front();
            self.emit(data, block);
        }
        if self.pending.is_empty() {
            // Nothing waits any more: what was fetched is in the store (or not wanted).
            self.fills.clear();
            self.requested.clear();
            self.deferred.clear();
        }
        Ok(())
    }

    /// The store may have gained chunks (from sibling connections): resolve what now
    /// can be, from the front.
    ///
    /// # Errors
    /// [`SessionError`] when a deferred DELTA rebuilds to something else than its id.
    pub fn recheck(&mut self) -> Result<(), SessionError> {
        self.drain()
    }

    /// Deferred references have waited long enough: ask the peer for every one the
    /// store still lacks.
    ///
    /// # Errors
    /// [`SessionError`] when a deferred DELTA rebuilds to something else than its id.
    pub fn expire_deferred(&mut self) -> Result<(), SessionError> {
        let ids: Vec<ChunkId> = self.deferred.drain().collect();
        for id in ids {
            if self.store.get(&id).is_none() {
                self.request(id);
            }
        }
        self.drain()
    }

    /// Whether deferred references wait for a chunk to arrive on another connection
    /// (the driver must eventually call [`Decoder::expire_deferred`]).
    pub fn has_deferred(&self) -> bool {
        !self.deferred.is_empty()
    }

    /// The input went idle: acknowledge whatever is resolved, so the peer can release
    /// its pins even on a quiet, interactive stream.
    pub fn handle_idle(&mut self) {
        self.ack();
    }

    /// Next bytes to write to the local socket, in order.
    pub fn poll_output(&mut self) -> Option<Bytes> {
        self.output.pop_front()
    }

    /// Next control frame (MISS, ACK) to send to the peer.
    pub fn poll_control(&mut self) -> Option<Frame> {
        self.control.pop_front()
    }

    /// Whether END has been resolved: every byte of this direction is delivered.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Whether references wait for FILLs.
    pub fn is_waiting(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Whether resolved bytes wait for an ACK.
    pub fn has_unacked(&self) -> bool {
        self.resolved > self.acked
    }

    /// Logical bytes resolved so far.
    pub fn resolved(&self) -> u64 {
        self.resolved
    }

    /// Counters so far.
    pub fn stats(&self) -> &DecoderStats {
        &self.stats
    }
}

/// The id at `pos` of a group's content, or the error for a FOLLOW or NEXT that
/// names a position the group does not have.
fn member(content: &[u8], pos: usize) -> Result<ChunkId, SessionError> {
    group::id_at(content, pos).ok_or(SessionError::BadGroup {
        pos,
        len: content.len(),
    })
}
