//! [`GroupMap`]: the sending edge's memory of groups (runs of block ids,
//! [`wire::group`]) formed on its connections, found by any id they hold.

use std::fmt;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use bytes::Bytes;
use lru::LruCache;
use parking_lot::Mutex;
use wire::{ChunkId, ContentStore, GroupIndex, VerifiedChunk};

use crate::store::ChunkStore;

/// Member-map shards (a power of two); ids are hashes, so their low bits pick.
const MEMBER_SHARDS: usize = 16;
/// Bytes an entry of the member map costs (key, group id, position, LRU links and
/// table slot), for sizing it from the budget.
const MEMBER_ENTRY_BYTES: u64 = 128;

/// Member id → (group, position in it), least recently used first out.
type MemberShard = LruCache<ChunkId, (ChunkId, u16)>;

/// Groups' contents, bounded in bytes, plus a map from each member id to the group
/// that last held it and its position there.
///
/// A quarter of the budget holds contents (32 bytes per member), the rest the member
/// map; both evict their least recently used entries. A member whose group was
/// evicted finds nothing, and a forgotten group only means full references.
pub struct GroupMap {
    contents: ChunkStore,
    members: Box<[Mutex<MemberShard>]>,
    lookups: AtomicU64,
    found: AtomicU64,
}

/// A snapshot of a [`GroupMap`]'s counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupStats {
    /// Groups whose contents are held.
    pub groups: usize,
    /// `find` calls.
    pub lookups: u64,
    /// `find` calls that found a group.
    pub found: u64,
}

impl GroupMap {
    /// A map using about `capacity_bytes` of memory.
    pub fn new(capacity_bytes: u64) -> Self {
        let per_shard = (capacity_bytes - capacity_bytes / 4)
            .div_ceil(MEMBER_ENTRY_BYTES * MEMBER_SHARDS as u64)
            .max(1);
        let cap = NonZeroUsize::new(usize::try_from(per_shard).unwrap_or(usize::MAX))
            .unwrap_or(NonZeroUsize::MIN);
        GroupMap {
            contents: ChunkStore::new(capacity_bytes / 4),
            members: (0..MEMBER_SHARDS)
                .map(|_| Mutex::new(LruCache::new(cap)))
                .collect(),
            lookups: AtomicU64::new(0),
            found: AtomicU64::new(0),
        }
    }

    fn shard(&self, id: &ChunkId) -> &Mutex<MemberShard> {
        &self.members[(id.shard_key() as usize) & (MEMBER_SHARDS - 1)]
    }

    /// Current counters.
    pub fn stats(&self) -> GroupStats {
        GroupStats {
            groups: self.contents.len(),
            lookups: self.lookups.load(Relaxed),
            found: self.found.load(Relaxed),
        }
    }
}

impl GroupIndex for GroupMap {
    fn find(&self, id: &ChunkId) -> Option<(ChunkId, Bytes, usize)> {
        self.lookups.fetch_add(1, Relaxed);
        let (group, pos) = self.shard(id).lock().get(id).copied()?;
        let content = self.contents.get(&group)?;
        let pos = usize::from(pos);
        // Contents are immutable under their name; checked anyway, it is cheap.
        (wire::group::id_at(&content, pos).as_ref() == Some(id)).then(|| {
            self.found.fetch_add(1, Relaxed);
            (group, content, pos)
        })
    }

    fn remember(&self, group: VerifiedChunk) {
        let name = *group.id();
        // A group formed again (a later VM repeating a run) is already mapped: its
        // members are refreshed when found, not here (64 map updates per group).
        if self.contents.contains(&name) {
            return;
        }
        for (pos, member) in wire::group::ids(group.data()).enumerate() {
            let Ok(pos) = u16::try_from(pos) else { break };
            self.shard(&member).lock().put(member, (name, pos));
        }
        self.contents.insert(group);
    }
}

impl fmt::Debug for GroupMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupMap")
            .field("stats", &self.stats())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u32) -> ChunkId {
        ChunkId::of(&n.to_le_bytes())
    }

    fn group(ids: impl Iterator<Item = ChunkId>) -> VerifiedChunk {
        let content: Vec<u8> = ids.flat_map(|i| i.0).collect();
        VerifiedChunk::from_local(Bytes::from(content))
    }

    #[test]
    fn finds_each_member_at_its_position() {
        let map = GroupMap::new(1 << 20);
        let g = group((0..10).map(id));
        let name = *g.id();
        map.remember(g);
        for n in 0..10 {
            let (found, content, pos) = map.find(&id(n)).expect("member");
            assert_eq!((found, pos), (name, n as usize));
            assert_eq!(wire::group::id_at(&content, pos), Some(id(n)));
        }
        assert!(map.find(&id(10)).is_none());
        // A later group holding the same id wins.
        let later = group([id(100), id(3), id(101)].into_iter());
        let later_name = *later.id();
        map.remember(later);
        let (found, _, pos) = map.find(&id(3)).unwrap();
        assert_eq!((found, pos), (later_name, 1));
        let st = map.stats();
        assert_eq!((st.groups, st.lookups, st.found), (2, 12, 11));
    }

    #[test]
    fn stays_within_its_budget_and_forgets_old_groups() {
        // Room for a few groups only.
        let map = GroupMap::new(64 << 10);
        for g in 0..200u32 {
            map.remember(group((g * 64..g * 64 + 64).map(id)));
        }
        assert!(map.find(&id(0)).is_none(), "the oldest group was evicted");
        assert!(map.find(&id(199 * 64 + 5)).is_some(), "the newest is kept");
        assert!(map.contents.bytes() <= 16 << 10);
    }
}
