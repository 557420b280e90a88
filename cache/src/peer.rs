//! The sending edge's model of its peers' stores: [`PeerIndex`] per peer, found through
//! the [`PeerRegistry`].

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use wire::{ChunkId, Holding, PeerHoldings};

use crate::shard::{default_shards, DataLen, Insert, Sharded};

/// How long after a chunk was first sent in full a reference to it is flagged
/// [`Holding::Recent`].
///
/// The full copy leaves with its connection's next batch, but can wait behind that
/// connection's queued batches when the WAN is the bottleneck (up to 2 MiB per
/// connection, about 0.7 s at 25 Mbit/s per connection), while a sibling connection's
/// reference to the same content may overtake it. Flagged references make the
/// receiving edge wait for the full copy instead of asking for it again.
pub const RECENT_MARK: Duration = Duration::from_secs(2);

/// One entry of the index: the chunk's length, and when it was marked.
#[derive(Clone, Copy)]
struct Mark {
    len: u32,
    /// Milliseconds since the index was created, wrapping (about every 49 days; a
    /// wrapped old entry then only looks recent, which costs a short wait, never a
    /// wrong byte).
    at_ms: u32,
    /// The peer acknowledged the bytes that carried it: it stored it (unless it
    /// evicted it since).
    confirmed: bool,
}

impl DataLen for Mark {
    fn data_len(&self) -> u64 {
        u64::from(self.len)
    }
}

/// What one peer edge is believed to hold: chunk ids with their lengths, evicted with
/// the same layout and rule as that peer's [`ChunkStore`](crate::ChunkStore) uses.
///
/// Only lengths are kept (4 bytes per entry instead of the chunk), but every entry is
/// charged its data length plus [`ENTRY_OVERHEAD`](crate::ENTRY_OVERHEAD) against the
/// peer's advertised cache size, so this index forgets a chunk at about the time the
/// peer evicts it. It still over-predicts, since the peer's store is also filled by
/// other edges; each wrong guess costs one miss round trip.
pub struct PeerIndex {
    map: Sharded<Mark>,
    created: Instant,
    /// [`RECENT_MARK`] in milliseconds (shorter in tests).
    recent_ms: u32,
    hits: AtomicU64,
    recent_hits: AtomicU64,
    marks: AtomicU64,
    forgets: AtomicU64,
    evictions: AtomicU64,
    rejected: AtomicU64,
}

/// A snapshot of a [`PeerIndex`]'s size and counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerIndexStats {
    /// Chunk ids believed held.
    pub entries: usize,
    /// Bytes charged: chunk lengths plus [`ENTRY_OVERHEAD`](crate::ENTRY_OVERHEAD) each.
    pub bytes: u64,
    /// The peer's advertised cache size.
    pub capacity_bytes: u64,
    /// `check_and_mark` calls that found the id (a reference can be sent).
    pub hits: u64,
    /// Of `hits`, those within [`RECENT_MARK`] of the mark ([`Holding::Recent`]).
    pub recent_hits: u64,
    /// `check_and_mark` calls that recorded a new id (the chunk is sent in full).
    pub marks: u64,
    /// `forget` calls (the peer reported a miss).
    pub forgets: u64,
    /// Ids dropped to stay within the peer's budget.
    pub evictions: u64,
    /// Ids not recorded because the peer's store would reject a chunk that large.
    pub rejected: u64,
}

impl PeerIndex {
    /// An empty index for a peer whose store holds `peer_cache_bytes`, laid out as
    /// [`ChunkStore::new`](crate::ChunkStore::new) lays out a store of that size.
    pub fn new(peer_cache_bytes: u64) -> Self {
        Self::with_shards(peer_cache_bytes, default_shards(peer_cache_bytes))
    }

    /// An empty index with an explicit shard count (rounded up to a power of two); it
    /// models the peer well only if that matches the peer's store.
    pub fn with_shards(peer_cache_bytes: u64, shards: usize) -> Self {
        PeerIndex {
            map: Sharded::new(peer_cache_bytes, shards),
            created: Instant::now(),
            recent_ms: RECENT_MARK.as_millis() as u32,
            hits: AtomicU64::new(0),
            recent_hits: AtomicU64::new(0),
            marks: AtomicU64::new(0),
            forgets: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
        }
    }

    /// Whether `id` is believed held, without marking it recently used.
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.map.contains(id)
    }

    /// Number of ids believed held.
    pub fn len(&self) -> usize {
        self.map.usage().0
    }

    /// Whether no id is believed held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes charged; at most [`capacity_bytes`](Self::capacity_bytes).
    pub fn bytes(&self) -> u64 {
        self.map.usage().1
    }

    /// The peer's advertised cache size this index was built for.
    pub fn capacity_bytes(&self) -> u64 {
        self.map.capacity_bytes()
    }

    /// Current size and counters.
    pub fn stats(&self) -> PeerIndexStats {
        let (entries, bytes) = self.map.usage();
        PeerIndexStats {
            entries,
            bytes,
            capacity_bytes: self.map.capacity_bytes(),
            hits: self.hits.load(Relaxed),
            recent_hits: self.recent_hits.load(Relaxed),
            marks: self.marks.load(Relaxed),
            forgets: self.forgets.load(Relaxed),
            evictions: self.evictions.load(Relaxed),
            rejected: self.rejected.load(Relaxed),
        }
    }

    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        self.map.check_invariants();
    }

    #[cfg(test)]
    fn set_recent_window(&mut self, window: Duration) {
        self.recent_ms = window.as_millis() as u32;
    }
}

impl PeerHoldings for PeerIndex {
    fn check_and_mark(&self, id: &ChunkId, len: usize) -> Holding {
        // Chunks are capped at 1 MiB by the wire; saturate rather than wrap if a
        // caller ever passes more, so the entry is rejected instead of under-charged.
        let len = u32::try_from(len).unwrap_or(u32::MAX);
        // Truncation is the documented wrap of `Mark::at_ms`.
        let now_ms = self.created.elapsed().as_millis() as u32;
        let mark = Mark {
            len,
            at_ms: now_ms,
            confirmed: false,
        };
        // Check and insert under one shard lock, so two connections racing on the same
        // id cannot both see "absent" and "present" inconsistently: exactly one of them
        // marks it.
        match self.map.insert_or_peek(*id, mark, |m| m.at_ms) {
            Insert::Present(at_ms) => {
                self.hits.fetch_add(1, Relaxed);
                if now_ms.wrapping_sub(at_ms) < self.recent_ms {
                    self.recent_hits.fetch_add(1, Relaxed);
                    Holding::Recent
                } else {
                    Holding::Held
                }
            }
            Insert::Inserted { evicted } => {
                self.marks.fetch_add(1, Relaxed);
                if !evicted.is_empty() {
                    self.evictions.fetch_add(evicted.len() as u64, Relaxed);
                }
                Holding::Absent
            }
            Insert::Rejected => {
                // The peer will not keep it, so a later reference would only miss.
                self.rejected.fetch_add(1, Relaxed);
                Holding::Absent
            }
        }
    }

    fn forget(&self, id: &ChunkId) {
        self.forgets.fetch_add(1, Relaxed);
        self.map.remove(id);
    }

    fn confirm(&self, id: &ChunkId) {
        self.map.update_with(id, |m| m.confirmed = true);
    }

    fn confirmed(&self, id: &ChunkId) -> bool {
        self.map.get_with(id, |m| m.confirmed).unwrap_or(false)
    }

    fn peek(&self, id: &ChunkId) -> Holding {
        // Touches the entry: the caller is about to use it as a delta base, which the
        // peer's store reads (and so refreshes) too.
        let now_ms = self.created.elapsed().as_millis() as u32;
        match self.map.get_with(id, |m| m.at_ms) {
            None => Holding::Absent,
            Some(at_ms) if now_ms.wrapping_sub(at_ms) < self.recent_ms => Holding::Recent,
            Some(_) => Holding::Held,
        }
    }
}

impl fmt::Debug for PeerIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerIndex")
            .field("shards", &self.map.shard_count())
            .field("stats", &self.stats())
            .finish()
    }
}

/// One [`PeerIndex`] per peer edge, keyed by the peer's name and tagged with the epoch
/// the peer announced (a fresh value each time its store starts empty).
///
/// Cloning is cheap (an `Arc`); all clones share the map. Connections to the same
/// peer in the same epoch share one index, which is what lets a chunk sent on one
/// connection be referenced on another.
#[derive(Clone, Default)]
pub struct PeerRegistry {
    inner: Arc<Mutex<PeerMap>>,
}

/// Peer edge name → its current epoch and index, and the epochs it replaced.
type PeerMap = HashMap<String, PeerSlot>;

/// Epochs remembered as replaced, per name: a restarted edge never returns to an old
/// epoch (it draws a fresh random one), so seeing one again means two edges share the
/// name.
const DISPLACED_KEPT: usize = 4;

struct PeerSlot {
    epoch: u64,
    index: Arc<PeerIndex>,
    displaced: Vec<u64>,
    /// Name conflicts seen so far.
    conflicts: u64,
}

/// What [`PeerRegistry::lookup`] found.
#[derive(Debug)]
pub struct PeerLookup {
    /// The index for the peer's epoch.
    pub index: Arc<PeerIndex>,
    /// The epoch this lookup replaced, when the epoch looked up had itself been
    /// replaced before: two live edges announce the same name, and each one's
    /// connections reset the other's index (and whatever else is kept per name).
    pub name_conflict: Option<NameConflict>,
}

/// Two live edges announce one name; see [`PeerLookup::name_conflict`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NameConflict {
    /// The epoch of the other edge (the one this lookup replaced).
    pub other_epoch: u64,
    /// How many conflicts this name has had, this one included (for logging the
    /// first and then ever more rarely).
    pub count: u64,
}

impl PeerRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The index for `peer` in `epoch`.
    ///
    /// If the registry knows `peer` under the same epoch, its index is returned (and
    /// `peer_cache_bytes` is ignored: a peer cannot resize its store without
    /// restarting, which changes the epoch). Otherwise the peer is new or has
    /// restarted and lost its store, so a fresh empty index of `peer_cache_bytes`
    /// replaces any old one: no reference learned in an earlier epoch is ever sent.
    /// Connections still holding the old `Arc` keep using it, harmlessly, until they end.
    pub fn index_for(&self, peer: &str, epoch: u64, peer_cache_bytes: u64) -> Arc<PeerIndex> {
        self.lookup(peer, epoch, peer_cache_bytes).index
    }

    /// [`index_for`](Self::index_for), also telling whether `peer`'s name is announced
    /// by two edges at once (an epoch that was replaced came back).
    pub fn lookup(&self, peer: &str, epoch: u64, peer_cache_bytes: u64) -> PeerLookup {
        let mut map = self.inner.lock();
        match map.get_mut(peer) {
            Some(slot) if slot.epoch == epoch => PeerLookup {
                index: Arc::clone(&slot.index),
                name_conflict: None,
            },
            Some(slot) => {
                let index = Arc::new(PeerIndex::new(peer_cache_bytes));
                let name_conflict = slot.displaced.contains(&epoch).then(|| {
                    slot.conflicts += 1;
                    NameConflict {
                        other_epoch: slot.epoch,
                        count: slot.conflicts,
                    }
                });
                slot.displaced.retain(|&e| e != epoch);
                if slot.displaced.len() == DISPLACED_KEPT {
                    slot.displaced.remove(0);
                }
                slot.displaced.push(slot.epoch);
                slot.epoch = epoch;
                slot.index = Arc::clone(&index);
                PeerLookup {
                    index,
                    name_conflict,
                }
            }
            None => {
                let index = Arc::new(PeerIndex::new(peer_cache_bytes));
                map.insert(
                    peer.to_owned(),
                    PeerSlot {
                        epoch,
                        index: Arc::clone(&index),
                        displaced: Vec::new(),
                        conflicts: 0,
                    },
                );
                PeerLookup {
                    index,
                    name_conflict: None,
                }
            }
        }
    }

    /// Every known peer as `(name, epoch, entries)`, sorted by name.
    pub fn peers(&self) -> Vec<(String, u64, usize)> {
        // Copy the handles out first so no shard lock is taken under the registry lock.
        let snapshot: Vec<(String, u64, Arc<PeerIndex>)> = self
            .inner
            .lock()
            .iter()
            .map(|(name, slot)| (name.clone(), slot.epoch, Arc::clone(&slot.index)))
            .collect();
        let mut out: Vec<_> = snapshot
            .into_iter()
            .map(|(name, epoch, index)| (name, epoch, index.len()))
            .collect();
        out.sort();
        out
    }
}

impl fmt::Debug for PeerRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerRegistry")
            .field("peers", &self.peers())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ENTRY_OVERHEAD;

    fn id(n: u32) -> ChunkId {
        ChunkId::of(&n.to_le_bytes())
    }

    #[test]
    fn check_and_mark_then_hit_then_forget() {
        let p = PeerIndex::new(1 << 20);
        assert!(!p.check_and_mark(&id(1), 100).is_held());
        assert!(p.check_and_mark(&id(1), 100).is_held());
        assert!(p.contains(&id(1)));
        assert_eq!(p.bytes(), 100 + ENTRY_OVERHEAD);
        p.forget(&id(1));
        assert!(!p.contains(&id(1)));
        assert_eq!(p.bytes(), 0);
        assert!(!p.check_and_mark(&id(1), 100).is_held());
        // Forgetting an unknown id is harmless.
        p.forget(&id(99));
        let st = p.stats();
        assert_eq!((st.hits, st.marks, st.forgets), (1, 2, 2));
        assert_eq!(st.entries, 1);
    }

    #[test]
    fn a_hit_soon_after_the_mark_is_recent() {
        let mut p = PeerIndex::new(1 << 20);
        assert_eq!(p.check_and_mark(&id(1), 100), Holding::Absent);
        assert_eq!(p.check_and_mark(&id(1), 100), Holding::Recent);
        // A hit does not renew the mark: recency is about when the full copy was sent.
        p.set_recent_window(Duration::from_millis(30));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(p.check_and_mark(&id(1), 100), Holding::Held);
        assert_eq!(p.check_and_mark(&id(1), 100), Holding::Held);
        let st = p.stats();
        assert_eq!((st.hits, st.recent_hits, st.marks), (3, 1, 1));
        assert_eq!(p.peek(&id(1)), Holding::Held);
        assert_eq!(p.peek(&id(2)), Holding::Absent);
        // Forgotten and sent again: recent again.
        p.forget(&id(1));
        assert_eq!(p.check_and_mark(&id(1), 100), Holding::Absent);
        assert_eq!(p.check_and_mark(&id(1), 100), Holding::Recent);
        assert_eq!(p.peek(&id(1)), Holding::Recent);
        assert_eq!(p.stats().marks, 2, "peek marks nothing");
    }

    #[test]
    fn evicts_lru_by_bytes_like_the_store() {
        // Room for three 100-byte chunks in one shard.
        let p = PeerIndex::with_shards(3 * (100 + ENTRY_OVERHEAD), 1);
        for n in 0..3 {
            assert!(!p.check_and_mark(&id(n), 100).is_held());
        }
        // A hit refreshes id(0); id(1) is now the oldest.
        assert!(p.check_and_mark(&id(0), 100).is_held());
        assert!(!p.check_and_mark(&id(3), 100).is_held());
        assert!(p.contains(&id(0)));
        assert!(!p.contains(&id(1)));
        assert!(p.contains(&id(2)));
        // A 200-byte chunk needs two slots: id(2) and id(0) go.
        assert!(!p.check_and_mark(&id(4), 200).is_held());
        assert!(!p.contains(&id(2)));
        assert!(!p.contains(&id(0)));
        assert!(p.contains(&id(3)));
        assert_eq!(p.stats().evictions, 3);
        assert!(p.bytes() <= p.capacity_bytes());
        p.check_invariants();
    }

    #[test]
    fn mirrors_a_chunk_store_of_the_same_size() {
        use bytes::Bytes;
        use wire::{ContentStore, VerifiedChunk};
        let cap = 5000;
        let store = crate::ChunkStore::new(cap);
        let index = PeerIndex::new(cap);
        for n in 0u32..200 {
            let data = Bytes::from(vec![n as u8; 100 + (n as usize * 37) % 900]);
            let c = VerifiedChunk::from_local(data);
            let held = index.check_and_mark(c.id(), c.data().len()).is_held();
            assert_eq!(held, store.contains(c.id()), "chunk {n}");
            if !held {
                store.insert(c);
            } else {
                store.get(c.id());
            }
        }
        assert_eq!(index.len(), store.len());
        assert_eq!(index.bytes(), store.bytes());
    }

    #[test]
    fn zero_capacity_and_oversize_never_marked() {
        let p = PeerIndex::new(0);
        assert!(!p.check_and_mark(&id(1), 0).is_held());
        assert!(!p.check_and_mark(&id(1), 0).is_held());
        assert!(p.is_empty());
        let p = PeerIndex::with_shards(1000, 1);
        assert!(!p.check_and_mark(&id(2), 1000).is_held());
        assert!(!p.check_and_mark(&id(2), 1000).is_held());
        assert!(!p.check_and_mark(&id(3), usize::MAX).is_held());
        assert_eq!(p.stats().rejected, 3);
        assert!(p.is_empty());
    }

    #[test]
    fn registry_reuses_index_within_an_epoch() {
        let r = PeerRegistry::new();
        let a = r.index_for("west", 7, 1 << 20);
        assert!(!a.check_and_mark(&id(1), 10).is_held());
        let b = r.clone().index_for("west", 7, 1 << 20);
        assert!(Arc::ptr_eq(&a, &b));
        assert!(b.check_and_mark(&id(1), 10).is_held());
    }

    #[test]
    fn registry_resets_index_on_epoch_change() {
        let r = PeerRegistry::new();
        let old = r.index_for("west", 1, 1 << 20);
        old.check_and_mark(&id(1), 10).is_held();
        old.check_and_mark(&id(2), 10).is_held();
        let east = r.index_for("east", 1, 1 << 20);
        east.check_and_mark(&id(1), 10).is_held();
        assert_eq!(
            r.peers(),
            vec![("east".to_owned(), 1, 1), ("west".to_owned(), 1, 2)]
        );

        // The peer restarted: a new epoch must not inherit any holdings.
        let new = r.index_for("west", 2, 2 << 20);
        assert!(!Arc::ptr_eq(&old, &new));
        assert!(new.is_empty());
        assert_eq!(new.capacity_bytes(), 2 << 20);
        assert!(!new.check_and_mark(&id(1), 10).is_held());
        assert!(Arc::ptr_eq(&new, &r.index_for("west", 2, 2 << 20)));
        // Going back to an earlier epoch value is also a change.
        assert!(r.index_for("west", 1, 1 << 20).is_empty());
        r.index_for("west", 2, 2 << 20);
        // Other peers are untouched.
        assert!(Arc::ptr_eq(&east, &r.index_for("east", 1, 1 << 20)));
        assert_eq!(
            r.peers(),
            vec![("east".to_owned(), 1, 1), ("west".to_owned(), 2, 0)]
        );
        assert!(format!("{r:?}").contains("west"));
    }

    #[test]
    fn registry_tells_a_name_announced_by_two_edges_from_a_restart() {
        let r = PeerRegistry::new();
        // Restarts: every epoch is new, however many.
        for epoch in 1..=10 {
            assert!(r.lookup("west", epoch, 1 << 20).name_conflict.is_none());
        }
        // Two edges called "east", epochs 20 and 21, connecting in turns.
        assert!(r.lookup("east", 20, 1 << 20).name_conflict.is_none());
        assert!(r.lookup("east", 21, 1 << 20).name_conflict.is_none());
        let conflict = |other_epoch, count| Some(NameConflict { other_epoch, count });
        assert_eq!(r.lookup("east", 20, 1 << 20).name_conflict, conflict(21, 1));
        assert_eq!(r.lookup("east", 21, 1 << 20).name_conflict, conflict(20, 2));
        // Repeated connections within one epoch are no news.
        assert!(r.lookup("east", 21, 1 << 20).name_conflict.is_none());
        // "west"'s restarts left only its last few epochs remembered; an epoch beyond
        // them is new again.
        assert!(r.lookup("west", 1, 1 << 20).name_conflict.is_none());
        assert_eq!(r.lookup("west", 10, 1 << 20).name_conflict, conflict(1, 1));
    }
}
