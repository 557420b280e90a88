//! What the sans-IO session needs from the edge's shared state, as traits, so the
//! state machines can be tested with in-memory fakes and the `cache` crate supplies
//! the real, concurrent implementations.

use bytes::Bytes;

use crate::id::ChunkId;
use crate::verified::VerifiedChunk;

/// The receiving edge's content-addressed store, shared by every connection from every
/// peer. Only verified chunks enter it, so a hit needs no re-hash.
pub trait ContentStore: Send + Sync {
    /// The bytes of chunk `id`, if the store holds it (and marks it recently used).
    fn get(&self, id: &ChunkId) -> Option<Bytes>;
    /// Adds a verified chunk; the store may evict others to stay within its budget.
    fn insert(&self, chunk: VerifiedChunk);
}

/// The sending edge's model of what one peer edge holds in its store.
///
/// It is a prediction, not a promise: the peer may have evicted an entry since. A wrong
/// prediction costs one miss round trip, never a wrong byte.
pub trait PeerHoldings: Send + Sync {
    /// Returns `true` when the peer is believed to hold `id` already. Otherwise records
    /// that the peer will hold it (the caller is about to send it) and returns `false`.
    fn check_and_mark(&self, id: &ChunkId, len: usize) -> bool;
    /// Forgets `id` (the peer asked for it: it no longer holds it).
    fn forget(&self, id: &ChunkId);
}
