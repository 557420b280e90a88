//! The edge's shared state: the content-addressed chunk store that receiving
//! connections read references from, and the per-peer index that sending connections
//! consult to decide between sending a chunk and sending its 32-byte reference.
//!
//! Both are concrete, thread-safe implementations of the traits the sans-IO session
//! in `wire` is written against ([`wire::ContentStore`], [`wire::PeerHoldings`]).
//!
//! # Layout
//! - [`ChunkStore`] (module `store`): `ChunkId -> Bytes`, bounded in bytes, LRU
//!   eviction, shared by every connection from every peer. Cheap to clone.
//! - [`PeerIndex`] (module `peer`): `ChunkId -> length` for one peer, bounded by that
//!   peer's advertised cache size and evicted by the same rule, so it predicts what
//!   the peer's `ChunkStore` still holds.
//! - [`PeerRegistry`] (module `peer`): peer name → (epoch, `PeerIndex`); a new epoch
//!   means the peer restarted with an empty store, so its index starts over.
//! - [`SimilarIndex`] (module `similar`): chunks this edge sent, with a map from their
//!   sketch features ([`wire::delta::Sketch`]) to their ids: where a delta's base comes
//!   from. Its own byte budget, so it never disturbs the receiving store.
//! - [`GroupMap`] (module `groups`): groups of block ids ([`wire::group`]) this edge
//!   formed, found by any member id: where FOLLOW frames come from. Its own budget.
//! - module `shard` (private): the sharded, byte-weighted LRU map under both. Ids are
//!   BLAKE3 hashes, so [`ChunkId::shard_key`](wire::ChunkId::shard_key) spreads them
//!   evenly over [`DEFAULT_SHARDS`] mutexes; each shard gets an equal slice of the
//!   budget and evicts its own least recently used entries. Each entry is charged its
//!   length plus [`ENTRY_OVERHEAD`].
//!
//! # Concurrency
//! Every operation takes exactly one shard lock for a map lookup or update; nothing
//! is hashed, copied or freed under a lock (`Bytes` clones are reference-count bumps
//! and evicted chunks are dropped after unlocking). Counters are relaxed atomics.
#![warn(missing_docs, unreachable_pub)]

mod groups;
mod peer;
mod shard;
mod similar;
mod store;

pub use groups::{GroupMap, GroupStats};
pub use peer::{NameConflict, PeerIndex, PeerIndexStats, PeerLookup, PeerRegistry, RECENT_MARK};
pub use shard::{default_shards, DEFAULT_SHARDS, ENTRY_OVERHEAD, MIN_SHARD_BYTES};
pub use similar::{SimilarIndex, SimilarStats, FEATURE_ENTRY_CHARGE};
pub use store::{ChunkStore, StoreStats};

#[cfg(test)]
mod tests;
