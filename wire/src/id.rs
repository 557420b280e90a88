//! Content identity: a chunk is named by the BLAKE3 hash of its bytes.

use std::fmt;

/// Length in bytes of a [`ChunkId`] on the wire.
pub const CHUNK_ID_LEN: usize = 32;

/// The BLAKE3 hash of a chunk's bytes. Two chunks with the same id hold the same bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; CHUNK_ID_LEN]);

/// Maps keyed by ids (the store, the peer model, the decoder's waits) feed their hasher
/// 8 of the id's bytes instead of all 32 and a length: BLAKE3 output is uniform, so
/// those 8 are as good a key, and one `u64` costs the keyed hasher a fraction of a
/// 32-byte slice (hashing whole ids was ~1.5% of the edges' samples at 1 Gbit/s).
/// Bytes 8..16, not the [`shard_key`](ChunkId::shard_key)'s 0..8: every id in one
/// shard shares those bytes' low bits. The maps' hashers stay randomly seeded, so
/// content chosen to collide would need 64-bit collisions of BLAKE3 output.
impl std::hash::Hash for ChunkId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(u64::from_le_bytes(
            self.0[8..16].try_into().expect("8 bytes"),
        ));
    }
}

impl ChunkId {
    /// Hashes `data`.
    pub fn of(data: &[u8]) -> Self {
        ChunkId(*blake3::hash(data).as_bytes())
    }

    /// The raw hash bytes.
    pub fn as_bytes(&self) -> &[u8; CHUNK_ID_LEN] {
        &self.0
    }

    /// A well-mixed 64-bit value taken from the hash, for picking shards.
    pub fn shard_key(&self) -> u64 {
        u64::from_le_bytes(self.0[..8].try_into().expect("8 bytes"))
    }
}

impl fmt::Display for ChunkId {
    /// Short form for logs: the first 8 hex digits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId(")?;
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}
