//! [`ChunkStore`]: the receiving edge's shared, byte-budgeted chunk store.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use bytes::Bytes;
use wire::{ChunkId, ContentStore, VerifiedChunk};

use crate::shard::{default_shards, Insert, Sharded};

/// The content-addressed chunk store one edge shares across all its connections.
///
/// Cloning is cheap (an `Arc`); every clone sees the same store. Entries are evicted
/// least recently used first, per shard, so that the data plus
/// [`ENTRY_OVERHEAD`](crate::ENTRY_OVERHEAD) per entry stays within
/// [`capacity_bytes`](Self::capacity_bytes). A capacity of 0 stores nothing.
#[derive(Clone)]
pub struct ChunkStore {
    inner: Arc<Inner>,
}

struct Inner {
    map: Sharded<Bytes>,
    hits: AtomicU64,
    misses: AtomicU64,
    inserts: AtomicU64,
    evictions: AtomicU64,
    rejected: AtomicU64,
}

/// A snapshot of a [`ChunkStore`]'s size and counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Chunks held.
    pub entries: usize,
    /// Bytes charged: data lengths plus [`ENTRY_OVERHEAD`](crate::ENTRY_OVERHEAD) each.
    pub bytes: u64,
    /// The configured budget.
    pub capacity_bytes: u64,
    /// `get` calls that found the chunk.
    pub hits: u64,
    /// `get` calls that did not.
    pub misses: u64,
    /// Chunks newly stored (inserting a chunk already held does not count).
    pub inserts: u64,
    /// Chunks evicted to make room.
    pub evictions: u64,
    /// Chunks not stored because they exceed a shard's budget.
    pub rejected: u64,
}

impl ChunkStore {
    /// A store holding at most `capacity_bytes`, with [`default_shards`](crate::default_shards)
    /// shards (16 unless the budget is small).
    pub fn new(capacity_bytes: u64) -> Self {
        Self::with_shards(capacity_bytes, default_shards(capacity_bytes))
    }

    /// A store with an explicit shard count, rounded up to a power of two (at least
    /// one). Each shard gets `capacity_bytes / shards`, so a chunk is stored only if
    /// its charge fits in that.
    pub fn with_shards(capacity_bytes: u64, shards: usize) -> Self {
        ChunkStore {
            inner: Arc::new(Inner {
                map: Sharded::new(capacity_bytes, shards),
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
                inserts: AtomicU64::new(0),
                evictions: AtomicU64::new(0),
                rejected: AtomicU64::new(0),
            }),
        }
    }

    /// Chunk `id`'s bytes (a reference count, no copy), without marking it recently
    /// used or counting a hit or miss: for holders that need the bytes of a chunk
    /// they already know of, not a lookup of the store's.
    pub fn peek(&self, id: &ChunkId) -> Option<Bytes> {
        self.inner.map.peek_with(id, Bytes::clone)
    }

    /// Whether chunk `id` is held, without marking it recently used.
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.inner.map.contains(id)
    }

    /// Number of chunks held.
    pub fn len(&self) -> usize {
        self.inner.map.usage().0
    }

    /// Whether no chunk is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes currently charged (data plus per-entry overhead); at most
    /// [`capacity_bytes`](Self::capacity_bytes).
    pub fn bytes(&self) -> u64 {
        self.inner.map.usage().1
    }

    /// The configured budget.
    pub fn capacity_bytes(&self) -> u64 {
        self.inner.map.capacity_bytes()
    }

    /// Number of shards (a power of two).
    pub fn shard_count(&self) -> usize {
        self.inner.map.shard_count()
    }

    /// Current size and counters.
    pub fn stats(&self) -> StoreStats {
        let (entries, bytes) = self.inner.map.usage();
        let i = &self.inner;
        StoreStats {
            entries,
            bytes,
            capacity_bytes: i.map.capacity_bytes(),
            hits: i.hits.load(Relaxed),
            misses: i.misses.load(Relaxed),
            inserts: i.inserts.load(Relaxed),
            evictions: i.evictions.load(Relaxed),
            rejected: i.rejected.load(Relaxed),
        }
    }

    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        self.inner.map.check_invariants();
    }
}

impl ContentStore for ChunkStore {
    fn get(&self, id: &ChunkId) -> Option<Bytes> {
        // Cloning `Bytes` is a reference-count bump, so the lock is held only for the
        // map lookup.
        let found = self.inner.map.get_with(id, Bytes::clone);
        let counter = if found.is_some() {
            &self.inner.hits
        } else {
            &self.inner.misses
        };
        counter.fetch_add(1, Relaxed);
        found
    }

    fn insert(&self, chunk: VerifiedChunk) {
        // The chunk was hashed when it was verified; nothing here hashes.
        let (id, data) = chunk.into_parts();
        // Already held: only refresh its place in the LRU (no copy). Going through
        // `insert` here once raced with an eviction on another thread: the chunk went
        // back in uncounted (inserts - evictions != entries) and uncopied.
        if self.inner.map.get_with(&id, |_| ()).is_some() {
            return;
        }
        // A chunk usually is a slice of a read buffer or of a decompressed batch
        // hundreds of KiB long, which the slice would keep alive: the budget would
        // count 4 KiB and the process hold the whole buffer. Stored chunks get their
        // own allocation (a memcpy, cheap beside the hash that verified them).
        let data = Bytes::copy_from_slice(&data);
        match self.inner.map.insert(id, data) {
            Insert::Present(()) => {}
            Insert::Inserted { evicted } => {
                self.inner.inserts.fetch_add(1, Relaxed);
                if !evicted.is_empty() {
                    self.inner
                        .evictions
                        .fetch_add(evicted.len() as u64, Relaxed);
                }
                // `evicted` is dropped here, after the shard lock was released, so
                // freeing large buffers does not stall other threads on that shard.
            }
            Insert::Rejected => {
                self.inner.rejected.fetch_add(1, Relaxed);
            }
        }
    }

    fn inserted(&self) -> u64 {
        self.inner.inserts.load(Relaxed)
    }
}

impl fmt::Debug for ChunkStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkStore")
            .field("shards", &self.shard_count())
            .field("stats", &self.stats())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ENTRY_OVERHEAD;

    fn chunk(tag: u8, len: usize) -> VerifiedChunk {
        VerifiedChunk::from_local(Bytes::from(vec![tag; len]))
    }

    /// A single-shard store with room for exactly `n` entries of `len` bytes.
    fn store_for(n: u64, len: u64) -> ChunkStore {
        ChunkStore::with_shards(n * (len + ENTRY_OVERHEAD), 1)
    }

    #[test]
    fn get_returns_inserted_bytes_and_counts() {
        let s = ChunkStore::new(1 << 20);
        let c = chunk(1, 100);
        assert_eq!(s.get(c.id()), None);
        s.insert(c.clone());
        assert_eq!(s.get(c.id()).as_ref(), Some(c.data()));
        assert!(s.contains(c.id()));
        assert_eq!(s.len(), 1);
        assert_eq!(s.bytes(), 100 + ENTRY_OVERHEAD);
        let st = s.stats();
        assert_eq!((st.hits, st.misses, st.inserts), (1, 1, 1));
        assert_eq!(st.capacity_bytes, 1 << 20);
    }

    #[test]
    fn evicts_least_recently_used_first() {
        let s = store_for(3, 100);
        let (a, b, c, d) = (chunk(1, 100), chunk(2, 100), chunk(3, 100), chunk(4, 100));
        s.insert(a.clone());
        s.insert(b.clone());
        s.insert(c.clone());
        // Touch `a`: `b` becomes the oldest.
        assert!(s.get(a.id()).is_some());
        s.insert(d.clone());
        assert!(s.contains(a.id()));
        assert!(!s.contains(b.id()));
        assert!(s.contains(c.id()));
        assert!(s.contains(d.id()));
        assert_eq!(s.stats().evictions, 1);
    }

    #[test]
    fn eviction_is_by_bytes_not_count() {
        // Room for four 100-byte chunks (4 * 164 = 656 bytes charged).
        let s = store_for(4, 100);
        let small: Vec<_> = (0..4).map(|i| chunk(i, 100)).collect();
        for c in &small {
            s.insert(c.clone());
        }
        assert_eq!(s.len(), 4);
        let big = chunk(9, 350);
        s.insert(big.clone());
        // 350 + 64 = 414 > 656 - 2 * 164: the three oldest go, the newest one stays.
        assert!(s.contains(big.id()));
        assert!(!s.contains(small[0].id()));
        assert!(!s.contains(small[1].id()));
        assert!(!s.contains(small[2].id()));
        assert!(s.contains(small[3].id()));
        assert_eq!(s.stats().evictions, 3);
        assert!(s.bytes() <= s.capacity_bytes());
        s.check_invariants();
    }

    #[test]
    fn contains_does_not_touch() {
        let s = store_for(2, 10);
        let (a, b, c) = (chunk(1, 10), chunk(2, 10), chunk(3, 10));
        s.insert(a.clone());
        s.insert(b.clone());
        assert!(s.contains(a.id()));
        s.insert(c.clone());
        assert!(!s.contains(a.id()), "contains must not have refreshed `a`");
        assert!(s.contains(b.id()));
    }

    #[test]
    fn reinsert_touches_without_double_counting() {
        let s = store_for(2, 10);
        let (a, b, c) = (chunk(1, 10), chunk(2, 10), chunk(3, 10));
        s.insert(a.clone());
        s.insert(b.clone());
        s.insert(a.clone());
        assert_eq!(s.len(), 2);
        assert_eq!(s.bytes(), 2 * (10 + ENTRY_OVERHEAD));
        assert_eq!(s.stats().inserts, 2);
        s.insert(c.clone());
        assert!(s.contains(a.id()), "re-insert refreshed `a`");
        assert!(!s.contains(b.id()));
    }

    #[test]
    fn capacity_zero_stores_nothing() {
        let s = ChunkStore::new(0);
        for i in 0..10 {
            s.insert(chunk(i, usize::from(i)));
        }
        let c = chunk(0, 0);
        assert_eq!(s.get(c.id()), None);
        assert!(s.is_empty());
        assert_eq!(s.bytes(), 0);
        let st = s.stats();
        assert_eq!((st.inserts, st.rejected, st.misses), (0, 10, 1));
    }

    #[test]
    fn oversize_chunk_is_rejected_and_evicts_nothing() {
        // Two shards of 1000 bytes each.
        let s = ChunkStore::with_shards(2000, 2);
        let small = chunk(1, 100);
        s.insert(small.clone());
        let big = chunk(2, 1000 - ENTRY_OVERHEAD as usize + 1);
        s.insert(big.clone());
        assert!(!s.contains(big.id()));
        assert!(s.contains(small.id()));
        assert_eq!(s.stats().rejected, 1);
        // Exactly a shard's budget fits.
        let exact = chunk(3, 1000 - ENTRY_OVERHEAD as usize);
        s.insert(exact.clone());
        assert!(s.contains(exact.id()));
        s.check_invariants();
    }

    #[test]
    fn empty_chunk_is_charged_overhead() {
        let s = ChunkStore::new(1000);
        s.insert(chunk(0, 0));
        assert_eq!(s.bytes(), ENTRY_OVERHEAD);
    }

    #[test]
    fn clones_share_state() {
        let s = ChunkStore::new(1 << 20);
        let t = s.clone();
        let c = chunk(7, 10);
        s.insert(c.clone());
        assert_eq!(t.get(c.id()).as_ref(), Some(c.data()));
        assert!(format!("{t:?}").contains("ChunkStore"));
    }
}
