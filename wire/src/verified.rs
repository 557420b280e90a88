//! Trust as a type: bytes that claim to be chunk `id` are [`UnverifiedChunk`] until a
//! BLAKE3 re-hash matches; only [`VerifiedChunk`] can enter a [`ContentStore`].
//!
//! [`ContentStore`]: crate::store::ContentStore

use bytes::Bytes;

use crate::id::ChunkId;
use crate::page_hash::PageHasher;

/// A chunk whose bytes are known to hash to its id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedChunk {
    id: ChunkId,
    data: Bytes,
}

impl VerifiedChunk {
    /// Hashes bytes and names them by that hash: verified by construction, whatever
    /// their origin (our own socket, or a peer's CHUNK frame that carries no id).
    pub fn from_local(data: Bytes) -> Self {
        VerifiedChunk {
            id: ChunkId::of(&data),
            data,
        }
    }

    /// [`from_local`](Self::from_local) for many blocks at once, 4 KiB ones hashed side
    /// by side ([`PageHasher`]): one verified chunk per block, in order.
    pub fn from_local_all(hasher: &mut PageHasher, blocks: Vec<Bytes>) -> Vec<Self> {
        let mut ids = Vec::with_capacity(blocks.len());
        hasher.hash_all(&blocks, &mut ids);
        debug_assert_eq!(ids.len(), blocks.len());
        ids.into_iter()
            .zip(blocks)
            .map(|(id, data)| VerifiedChunk { id, data })
            .collect()
    }

    /// The chunk's id.
    pub fn id(&self) -> &ChunkId {
        &self.id
    }

    /// The chunk's bytes.
    pub fn data(&self) -> &Bytes {
        &self.data
    }

    /// Splits into id and bytes.
    pub fn into_parts(self) -> (ChunkId, Bytes) {
        (self.id, self.data)
    }
}

/// Bytes received from a peer (or read from disk) that claim to be chunk `id`.
#[derive(Clone, Debug)]
pub struct UnverifiedChunk {
    /// The claimed id.
    pub id: ChunkId,
    /// The bytes.
    pub data: Bytes,
}

/// A chunk's bytes do not hash to the id they were sent under.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("chunk hash mismatch: claimed {claimed:?}, bytes hash to {actual:?}")]
pub struct HashMismatch {
    /// The id the sender claimed.
    pub claimed: ChunkId,
    /// What the bytes actually hash to.
    pub actual: ChunkId,
}

impl UnverifiedChunk {
    /// Re-hashes the bytes and accepts them only if they match the claimed id.
    ///
    /// # Errors
    /// [`HashMismatch`] when the bytes hash to something else.
    pub fn verify(self) -> Result<VerifiedChunk, HashMismatch> {
        let actual = ChunkId::of(&self.data);
        if actual == self.id {
            Ok(VerifiedChunk {
                id: self.id,
                data: self.data,
            })
        } else {
            Err(HashMismatch {
                claimed: self.id,
                actual,
            })
        }
    }
}
