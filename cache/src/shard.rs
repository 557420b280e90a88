//! The structure both [`ChunkStore`](crate::ChunkStore) and
//! [`PeerIndex`](crate::PeerIndex) are built on: a fixed set of mutex-guarded LRU maps
//! keyed by [`ChunkId`], each with its own byte budget.
//!
//! Sharing one implementation is deliberate, not just economy: the sending edge's
//! `PeerIndex` predicts what the receiving edge's `ChunkStore` evicts, and the
//! prediction is only good if both use the same shard layout, the same per-entry
//! charge and the same eviction rule.

use lru::LruCache;
use parking_lot::Mutex;
use wire::ChunkId;

/// Bytes charged for each entry on top of its data length.
///
/// Without it a flood of tiny chunks would look free while each one really costs its
/// 32-byte key, the value handle, the LRU list links and a hash-table slot (roughly
/// 64 to 100 bytes in `lru` 0.16). The value is a charge, not a measurement: what
/// matters is that every edge uses the same constant, because a sender's
/// [`PeerIndex`](crate::PeerIndex) models the receiver's evictions with it.
pub const ENTRY_OVERHEAD: u64 = 64;

/// Shard count used by [`ChunkStore::new`](crate::ChunkStore::new) and
/// [`PeerIndex::new`](crate::PeerIndex::new) for caches of at least
/// `DEFAULT_SHARDS * MIN_SHARD_BYTES` bytes.
///
/// Sixteen locks keep contention low for the handful of cores an edge has (every
/// connection thread hits the store for each chunk) while each shard still holds a
/// large enough slice of the budget that per-shard LRU behaves like a global LRU.
pub const DEFAULT_SHARDS: usize = 16;

/// Smallest per-shard budget the default layout accepts before it uses fewer shards.
///
/// A chunk larger than its shard's budget cannot be stored, and one that nearly fills
/// the shard flushes everything else in it. The wire caps chunks at 1 MiB, so a shard
/// should hold several of the largest ones; a cache too small for sixteen such shards
/// is small enough that lock contention does not matter.
pub const MIN_SHARD_BYTES: u64 = 4 << 20;

/// The shard count the default constructors pick for `capacity_bytes`: halves
/// [`DEFAULT_SHARDS`] until every shard gets at least [`MIN_SHARD_BYTES`] (down to one).
pub fn default_shards(capacity_bytes: u64) -> usize {
    let mut n = DEFAULT_SHARDS;
    while n > 1 && capacity_bytes / (n as u64) < MIN_SHARD_BYTES {
        n /= 2;
    }
    n
}

/// Charge of an entry whose data is `len` bytes long.
pub(crate) fn weight(len: u64) -> u64 {
    len.saturating_add(ENTRY_OVERHEAD)
}

/// A value that knows its own data length.
pub(crate) trait DataLen {
    fn data_len(&self) -> u64;
}

impl DataLen for bytes::Bytes {
    fn data_len(&self) -> u64 {
        self.len() as u64
    }
}

#[cfg(test)]
impl DataLen for u32 {
    fn data_len(&self) -> u64 {
        u64::from(*self)
    }
}

struct Shard<V> {
    lru: LruCache<ChunkId, V>,
    /// Sum of [`weight`] over the entries; never above the shard budget.
    bytes: u64,
}

/// What [`Sharded::insert`] did.
pub(crate) enum Insert<V, P = ()> {
    /// The id was already present; it is now the most recently used. The value passed
    /// in is dropped (same id, so same bytes); `P` is what the caller's `peek` read
    /// from the value already there.
    Present(P),
    /// Stored; `evicted` holds the values pushed out to make room, returned so they
    /// are dropped after the shard lock is released.
    Inserted { evicted: Vec<V> },
    /// Larger than a whole shard's budget: not stored.
    Rejected,
}

/// Sharded, byte-weighted LRU map from [`ChunkId`] to `V`.
pub(crate) struct Sharded<V> {
    shards: Box<[Mutex<Shard<V>>]>,
    /// `shards.len() - 1`; the length is a power of two so this picks a shard.
    mask: u64,
    shard_budget: u64,
    capacity_bytes: u64,
}

impl<V: DataLen> Sharded<V> {
    /// `shards` is rounded up to a power of two (and at least 1); the budget is split
    /// evenly, any remainder of the division is left unused.
    pub(crate) fn new(capacity_bytes: u64, shards: usize) -> Self {
        let n = shards.max(1).next_power_of_two();
        let shards = (0..n)
            .map(|_| {
                Mutex::new(Shard {
                    // Unbounded: the entry-count cap of `lru` is useless for entries of
                    // varying size, so eviction by bytes is done here.
                    lru: LruCache::unbounded(),
                    bytes: 0,
                })
            })
            .collect();
        Sharded {
            shards,
            mask: n as u64 - 1,
            shard_budget: capacity_bytes / n as u64,
            capacity_bytes,
        }
    }

    fn shard(&self, id: &ChunkId) -> &Mutex<Shard<V>> {
        // The key comes from a cryptographic hash, so its low bits are uniform.
        &self.shards[(id.shard_key() & self.mask) as usize]
    }

    pub(crate) fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }

    pub(crate) fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Runs `f` on the value of `id`, marking it most recently used.
    pub(crate) fn get_with<R>(&self, id: &ChunkId, f: impl FnOnce(&V) -> R) -> Option<R> {
        self.shard(id).lock().lru.get(id).map(f)
    }

    /// Runs `f` on the value of `id` to change it in place (its charge must not
    /// change), marking it most recently used.
    pub(crate) fn update_with<R>(&self, id: &ChunkId, f: impl FnOnce(&mut V) -> R) -> Option<R> {
        let mut shard = self.shard(id).lock();
        let value = shard.lru.get_mut(id)?;
        let before = value.data_len();
        let r = f(value);
        debug_assert_eq!(
            value.data_len(),
            before,
            "an update changed an entry's charge"
        );
        Some(r)
    }

    /// Runs `f` on the value of `id`, without touching its recency.
    pub(crate) fn peek_with<R>(&self, id: &ChunkId, f: impl FnOnce(&V) -> R) -> Option<R> {
        self.shard(id).lock().lru.peek(id).map(f)
    }

    /// Whether `id` is present, without touching its recency.
    pub(crate) fn contains(&self, id: &ChunkId) -> bool {
        self.shard(id).lock().lru.contains(id)
    }

    /// Stores `value` under `id`, evicting least recently used entries of that shard
    /// until it fits; if `id` is present, only touches it.
    pub(crate) fn insert(&self, id: ChunkId, value: V) -> Insert<V> {
        self.insert_or_peek(id, value, |_| ())
    }

    /// [`Sharded::insert`], which also reads the value already present (under the same
    /// lock) with `peek`.
    pub(crate) fn insert_or_peek<P>(
        &self,
        id: ChunkId,
        value: V,
        peek: impl FnOnce(&V) -> P,
    ) -> Insert<V, P> {
        let w = weight(value.data_len());
        if w > self.shard_budget {
            return Insert::Rejected;
        }
        let mut shard = self.shard(&id).lock();
        if let Some(present) = shard.lru.get(&id) {
            return Insert::Present(peek(present));
        }
        let mut evicted = Vec::new();
        while shard.bytes + w > self.shard_budget {
            // Cannot be empty here: an empty shard has 0 bytes and w <= budget.
            let Some((_, old)) = shard.lru.pop_lru() else {
                break;
            };
            shard.bytes -= weight(old.data_len());
            evicted.push(old);
        }
        shard.lru.put(id, value);
        shard.bytes += w;
        Insert::Inserted { evicted }
    }

    /// Removes `id`, returning its value.
    pub(crate) fn remove(&self, id: &ChunkId) -> Option<V> {
        let mut shard = self.shard(id).lock();
        let old = shard.lru.pop(id)?;
        shard.bytes -= weight(old.data_len());
        Some(old)
    }

    /// Entries and charged bytes, summed shard by shard (each shard is consistent; the
    /// total is not a snapshot if other threads are inserting).
    pub(crate) fn usage(&self) -> (usize, u64) {
        self.shards.iter().fold((0, 0), |(n, b), s| {
            let s = s.lock();
            (n + s.lru.len(), b + s.bytes)
        })
    }

    /// Checks the bookkeeping of every shard; for tests.
    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        for s in self.shards.iter() {
            let s = s.lock();
            let sum: u64 = s.lru.iter().map(|(_, v)| weight(v.data_len())).sum();
            assert_eq!(sum, s.bytes, "shard byte count drifted");
            assert!(s.bytes <= self.shard_budget, "shard over budget");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_layout() {
        assert_eq!(default_shards(0), 1);
        assert_eq!(default_shards(MIN_SHARD_BYTES - 1), 1);
        assert_eq!(default_shards(2 * MIN_SHARD_BYTES), 2);
        assert_eq!(default_shards(16 * MIN_SHARD_BYTES), 16);
        assert_eq!(default_shards(u64::MAX), DEFAULT_SHARDS);
    }

    #[test]
    fn shard_count_is_power_of_two() {
        assert_eq!(Sharded::<u32>::new(1000, 0).shard_count(), 1);
        assert_eq!(Sharded::<u32>::new(1000, 3).shard_count(), 4);
        assert_eq!(Sharded::<u32>::new(1000, 16).shard_count(), 16);
    }
}
