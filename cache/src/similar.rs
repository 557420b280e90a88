//! [`SimilarIndex`]: the sending edge's memory of chunks it sent, found by feature, so
//! a new chunk that resembles one of them can cross as a delta.

use std::fmt;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use bytes::Bytes;
use lru::LruCache;
use parking_lot::Mutex;
use wire::delta::{Sketch, FEATURES};
use wire::{ChunkId, ContentStore, SimilarChunks, VerifiedChunk};

use crate::store::ChunkStore;
use crate::ENTRY_OVERHEAD;

/// Feature-map shards (a power of two); features are hashes, so the low bits pick.
const FEATURE_SHARDS: usize = 16;

/// Memory charged per feature-map entry: the `lru` node (a 64-bit key, a 32-byte id and
/// two links: 56 bytes, a 64-byte allocation) plus its hash-table slot (16 bytes and a
/// control byte, in a table that `LruCache::new` sizes up front to at most 16/7 slots
/// per entry). An upper bound, like [`ENTRY_OVERHEAD`] for the stored bytes.
pub const FEATURE_ENTRY_CHARGE: u64 = 104;

/// The chunk size the budget split assumes (guest pages and disk blocks).
const ASSUMED_CHUNK: u64 = 4096;

/// Chunks sent to any peer, bounded in bytes, plus a map from each chunk's features
/// to its id.
///
/// The bytes live in a [`ChunkStore`] of their own (not the edge's receiving store:
/// peers model that one's evictions, and sent chunks must not disturb it). The byte
/// budget covers both: it is split so that every 4 KiB chunk it can hold also pays for
/// its [`FEATURES`] feature-map entries ([`FEATURE_ENTRY_CHARGE`] each), so
/// `--delta-mem` bounds the whole index, not only the bytes. A feature whose chunk was
/// evicted simply finds nothing.
pub struct SimilarIndex {
    chunks: ChunkStore,
    features: Box<[Mutex<LruCache<u64, ChunkId>>]>,
    lookups: AtomicU64,
    found: AtomicU64,
}

/// A snapshot of a [`SimilarIndex`]'s counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimilarStats {
    /// Chunks whose bytes are held.
    pub chunks: usize,
    /// Bytes charged for them.
    pub bytes: u64,
    /// Entries in the feature map.
    pub feature_entries: usize,
    /// `similar` calls.
    pub lookups: u64,
    /// `similar` calls that proposed at least one base.
    pub found: u64,
}

impl SimilarIndex {
    /// An index within `capacity_bytes`: the sent chunks' bytes and their feature-map
    /// entries together.
    pub fn new(capacity_bytes: u64) -> Self {
        let feature_bytes = FEATURES as u64 * FEATURE_ENTRY_CHARGE;
        let chunks = capacity_bytes / (ASSUMED_CHUNK + ENTRY_OVERHEAD + feature_bytes);
        let per_shard = chunks.saturating_mul(FEATURES as u64) / FEATURE_SHARDS as u64;
        let cap = NonZeroUsize::new(usize::try_from(per_shard.max(1)).unwrap_or(usize::MAX))
            .unwrap_or(NonZeroUsize::MIN);
        SimilarIndex {
            chunks: ChunkStore::new(capacity_bytes - chunks * feature_bytes),
            features: (0..FEATURE_SHARDS)
                .map(|_| Mutex::new(LruCache::new(cap)))
                .collect(),
            lookups: AtomicU64::new(0),
            found: AtomicU64::new(0),
        }
    }

    fn shard(&self, feature: u64) -> &Mutex<LruCache<u64, ChunkId>> {
        &self.features[(feature as usize) & (FEATURE_SHARDS - 1)]
    }

    /// Current counters.
    pub fn stats(&self) -> SimilarStats {
        SimilarStats {
            chunks: self.chunks.len(),
            bytes: self.chunks.bytes(),
            feature_entries: self.features.iter().map(|f| f.lock().len()).sum(),
            lookups: self.lookups.load(Relaxed),
            found: self.found.load(Relaxed),
        }
    }
}

impl SimilarChunks for SimilarIndex {
    fn similar(&self, sketch: &Sketch, max: usize) -> Vec<(ChunkId, Bytes)> {
        self.lookups.fetch_add(1, Relaxed);
        // Votes: a candidate sharing more features is more likely to be a close match.
        let mut votes: Vec<(ChunkId, usize)> = Vec::with_capacity(FEATURES);
        for f in sketch.features() {
            let Some(id) = self.shard(f).lock().get(&f).copied() else {
                continue;
            };
            match votes.iter_mut().find(|(v, _)| *v == id) {
                Some((_, n)) => *n += 1,
                None => votes.push((id, 1)),
            }
        }
        votes.sort_by_key(|v| std::cmp::Reverse(v.1));
        let out: Vec<(ChunkId, Bytes)> = votes
            .into_iter()
            .filter_map(|(id, _)| self.chunks.get(&id).map(|d| (id, d)))
            .take(max)
            .collect();
        if !out.is_empty() {
            self.found.fetch_add(1, Relaxed);
        }
        out
    }

    fn get(&self, id: &ChunkId) -> Option<Bytes> {
        self.chunks.get(id)
    }

    fn peek(&self, id: &ChunkId) -> Option<Bytes> {
        self.chunks.peek(id)
    }

    fn remember(&self, chunk: VerifiedChunk, sketch: &Sketch) {
        let id = *chunk.id();
        self.chunks.insert(chunk);
        for f in sketch.features() {
            self.shard(f).lock().put(f, id);
        }
    }
}

impl fmt::Debug for SimilarIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimilarIndex")
            .field("stats", &self.stats())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(seed: u8) -> Vec<u8> {
        (0..4096u32)
            .map(|i| (i.wrapping_mul(131) >> 3) as u8 ^ seed)
            .collect()
    }

    #[test]
    fn finds_the_page_a_near_duplicate_came_from() {
        let idx = SimilarIndex::new(1 << 20);
        let (a, b) = (Bytes::from(page(1)), Bytes::from(page(2)));
        for p in [&a, &b] {
            idx.remember(
                VerifiedChunk::from_local(p.clone()),
                &Sketch::of(p).unwrap(),
            );
        }
        let mut edited = a.to_vec();
        edited[5] ^= 1;
        edited[4000] ^= 1;
        let found = idx.similar(&Sketch::of(&edited).unwrap(), 2);
        assert_eq!(found.first().map(|f| f.0), Some(ChunkId::of(&a)));
        assert_eq!(found[0].1, a);
        // Nothing alike: nothing proposed.
        let other: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        assert!(idx.similar(&Sketch::of(&other).unwrap(), 2).is_empty());
        let st = idx.stats();
        assert_eq!((st.chunks, st.lookups, st.found), (2, 2, 1));
    }

    #[test]
    fn the_budget_covers_the_feature_map() {
        let budget: u64 = 8 << 20;
        let idx = SimilarIndex::new(budget);
        for n in 0..4000u32 {
            let p: Vec<u8> = (0..4096u32)
                .map(|i| {
                    (i.wrapping_mul(2_654_435_761) ^ n.wrapping_mul(40_503)).to_le_bytes()
                        [(i % 4) as usize]
                        ^ (n >> 8) as u8
                })
                .collect();
            let p = Bytes::from(p);
            if let Some(sk) = Sketch::of(&p) {
                idx.remember(VerifiedChunk::from_local(p), &sk);
            }
        }
        let st = idx.stats();
        // Full: more pages were offered than the budget holds.
        assert!(st.chunks > 1000 && st.chunks < 4000, "{st:?}");
        let charged = st.bytes + st.feature_entries as u64 * FEATURE_ENTRY_CHARGE;
        assert!(charged <= budget, "{charged} > {budget}: {st:?}");
    }

    #[test]
    fn evicted_bytes_propose_nothing() {
        // Room for one page and its features only.
        let idx = SimilarIndex::new(4096 + ENTRY_OVERHEAD + FEATURES as u64 * FEATURE_ENTRY_CHARGE);
        let (a, b) = (Bytes::from(page(1)), Bytes::from(page(2)));
        for p in [&a, &b] {
            idx.remember(
                VerifiedChunk::from_local(p.clone()),
                &Sketch::of(p).unwrap(),
            );
        }
        assert!(idx.similar(&Sketch::of(&a).unwrap(), 2).is_empty());
        assert_eq!(idx.similar(&Sketch::of(&b).unwrap(), 2)[0].1, b);
    }
}
