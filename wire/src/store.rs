//! What the sans-IO session needs from the edge's shared state, as traits, so the
//! state machines can be tested with in-memory fakes and the `cache` crate supplies
//! the real, concurrent implementations.

use bytes::Bytes;

use crate::delta::Sketch;
use crate::id::ChunkId;
use crate::verified::VerifiedChunk;

/// The receiving edge's content-addressed store, shared by every connection from every
/// peer. Only verified chunks enter it, so a hit needs no re-hash.
pub trait ContentStore: Send + Sync {
    /// The bytes of chunk `id`, if the store holds it (and marks it recently used).
    fn get(&self, id: &ChunkId) -> Option<Bytes>;
    /// Adds a verified chunk; the store may evict others to stay within its budget.
    fn insert(&self, chunk: VerifiedChunk);
    /// How many chunks have been newly stored so far (never decreases): a reference
    /// waiting for a chunk from a sibling connection keeps waiting while this moves.
    /// 0 where the store does not count.
    fn inserted(&self) -> u64 {
        0
    }
}

/// What [`PeerHoldings::check_and_mark`] believes about a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holding {
    /// Not believed held: it is now marked, and the caller sends it in full.
    Absent,
    /// Believed held for a while: a reference can be sent.
    Held,
    /// Believed held, but marked only moments ago: its full copy may still be on its
    /// way to the peer, possibly on another connection, so a reference may overtake it.
    /// The reference tells the peer to wait briefly for it before asking.
    Recent,
}

impl Holding {
    /// Whether a reference can be sent.
    pub fn is_held(self) -> bool {
        !matches!(self, Holding::Absent)
    }
}

/// The sending edge's model of what one peer edge holds in its store.
///
/// It is a prediction, not a promise: the peer may have evicted an entry since. A wrong
/// prediction costs one miss round trip, never a wrong byte.
pub trait PeerHoldings: Send + Sync {
    /// Whether the peer is believed to hold `id` already ([`Holding::Held`] or
    /// [`Holding::Recent`]). Otherwise records that the peer will hold it (the caller is
    /// about to send it) and returns [`Holding::Absent`].
    fn check_and_mark(&self, id: &ChunkId, len: usize) -> Holding;
    /// Forgets `id` (the peer asked for it: it no longer holds it).
    fn forget(&self, id: &ChunkId);
    /// The peer acknowledged the bytes that ended group `id` ([`crate::group`]): it
    /// has stored it. The default records nothing.
    fn confirm(&self, _id: &ChunkId) {}
    /// Whether `id` was confirmed ([`PeerHoldings::confirm`]) and is still believed
    /// held. The default believes nothing, which turns runs of references off.
    fn confirmed(&self, _id: &ChunkId) -> bool {
        false
    }
    /// What is believed about `id`, without marking anything (a delta's base must be
    /// held already). The default believes nothing, which turns deltas off.
    fn peek(&self, _id: &ChunkId) -> Holding {
        Holding::Absent
    }
}

/// The sending edge's memory of chunks it sent, searchable by similarity: where a
/// delta's base comes from. Shared by every connection to every peer; a base is only
/// used if the peer is also believed to hold it ([`PeerHoldings::peek`]).
pub trait SimilarChunks: Send + Sync {
    /// Up to `max` remembered chunks sharing a feature with `sketch`, most shared
    /// features first.
    fn similar(&self, sketch: &Sketch, max: usize) -> Vec<(ChunkId, Bytes)>;
    /// Remembers a chunk this edge sent (in full or as a delta) under its features.
    fn remember(&self, chunk: VerifiedChunk, sketch: &Sketch);
    /// The bytes of a remembered chunk, by id. The default remembers none.
    fn get(&self, _id: &ChunkId) -> Option<Bytes> {
        None
    }
    /// As [`SimilarChunks::get`], without marking the chunk recently used: a chunk
    /// referenced again is no better a delta base for it. The default is `get`.
    fn peek(&self, id: &ChunkId) -> Option<Bytes> {
        self.get(id)
    }
}

/// The sending edge's memory of groups ([`crate::group`]) formed on its connections:
/// for a block id, a group holding it and where. Shared by every connection to every
/// peer; a group is only followed if the peer is also believed to hold it
/// ([`PeerHoldings::peek`]). Bounded: a forgotten group only costs full references.
pub trait GroupIndex: Send + Sync {
    /// A group holding `id`: its name, its content and `id`'s position in it.
    fn find(&self, id: &ChunkId) -> Option<(ChunkId, Bytes, usize)>;
    /// Remembers a group this edge formed (content named by its hash).
    fn remember(&self, group: VerifiedChunk);
}
