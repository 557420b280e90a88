//! Groups: runs of consecutive block ids, named by content, so a later stream that
//! repeats a run can send its references as one-byte NEXT frames.
//!
//! Similar VMs hold many of the same pages in the same order (kernel text, a cloned
//! disk's blocks, the same software loaded the same way). Sent one by one, each such
//! page costs a 33-byte reference, which compression cannot shrink (ids are random);
//! a shared long-window compressor pays a few bytes per whole run. Both ends of a
//! connection see the same sequence of block ids (the sender as it encodes, the
//! receiver as it delivers), so both cut it the same way, by content: a group ends
//! after an id whose last byte is a multiple of [`CUT_MODULUS`] once it holds
//! [`MIN_GROUP`] ids, or at [`MAX_GROUP`]. A group's *content* is its ids
//! concatenated and its name is the BLAKE3 of that content, exactly as for a chunk: the
//! receiver keeps groups in its content store, and a group it lacks is asked for and
//! answered with the ordinary MISS / FILL frames, verified like any chunk. Nothing
//! about groups needs the two edges to agree on numbering or timing: a FOLLOW names a
//! group by content, and a group the receiver does not hold costs one round trip.
//!
//! Cutting by content makes a later run's groups equal an earlier run's soon after
//! the two sequences align, whatever came before; FOLLOW may start anywhere inside a
//! group, so a run that joins mid-group is followed from there.

use bytes::Bytes;

use crate::id::{ChunkId, CHUNK_ID_LEN};
use crate::verified::VerifiedChunk;

/// Fewest ids in a group (runs of one repeated page would otherwise cut every id).
pub const MIN_GROUP: usize = 4;
/// Most ids in a group: a group's content is at most `MAX_GROUP × 32` bytes (8 KiB).
pub const MAX_GROUP: usize = 256;
/// A group ends after an id whose last byte is a multiple of this: 64 ids on average.
/// Measured on four real Linux guests (192 MiB each, sequential), the bytes their
/// references cost with groups ending after 16 / 64 / 128 ids on average: 115 / 90 /
/// 77 KB per later guest, against 475 KB without groups.
pub const CUT_MODULUS: u8 = 64;

/// Cuts one direction's sequence of block ids into groups.
#[derive(Debug)]
pub struct GroupCutter {
    ids: Vec<u8>,
    modulus: u8,
}

impl Default for GroupCutter {
    fn default() -> Self {
        GroupCutter::new()
    }
}

impl GroupCutter {
    /// A cutter at the start of a stream.
    pub fn new() -> Self {
        GroupCutter {
            ids: Vec::new(),
            modulus: CUT_MODULUS,
        }
    }

    /// A cutter ending groups after ids whose last byte is a multiple of `modulus`
    /// (1: every group [`MIN_GROUP`] long). For tests whose streams are too short for
    /// groups of 64: both ends of a connection must use the same value.
    #[doc(hidden)]
    pub fn with_modulus(modulus: u8) -> Self {
        GroupCutter {
            ids: Vec::new(),
            modulus: modulus.max(1),
        }
    }

    /// Appends the next block's id; returns the group it completes, if any, as a
    /// chunk (content and name).
    pub fn push(&mut self, id: &ChunkId) -> Option<VerifiedChunk> {
        if self.ids.is_empty() {
            self.ids.reserve(MAX_GROUP * CHUNK_ID_LEN);
        }
        self.ids.extend_from_slice(id.as_bytes());
        let len = self.ids.len() / CHUNK_ID_LEN;
        let cut = (len >= MIN_GROUP && id.as_bytes()[CHUNK_ID_LEN - 1] % self.modulus == 0)
            || len >= MAX_GROUP;
        cut.then(|| VerifiedChunk::from_local(Bytes::from(std::mem::take(&mut self.ids))))
    }
}

/// The id at `pos` of a group's content, if the content is a whole number of ids and
/// holds that many.
pub fn id_at(content: &[u8], pos: usize) -> Option<ChunkId> {
    if content.len() % CHUNK_ID_LEN != 0 {
        return None;
    }
    let start = pos.checked_mul(CHUNK_ID_LEN)?;
    let bytes = content.get(start..start.checked_add(CHUNK_ID_LEN)?)?;
    Some(ChunkId(bytes.try_into().expect("32 bytes")))
}

/// The ids of a group's content, in order (a trailing partial id is ignored).
pub fn ids(content: &[u8]) -> impl Iterator<Item = ChunkId> + '_ {
    content
        .chunks_exact(CHUNK_ID_LEN)
        .map(|b| ChunkId(b.try_into().expect("32 bytes")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u32) -> ChunkId {
        ChunkId::of(&n.to_le_bytes())
    }

    fn cut_all(cutter: &mut GroupCutter, ids: impl Iterator<Item = ChunkId>) -> Vec<ChunkId> {
        ids.filter_map(|i| cutter.push(&i).map(|g| *g.id()))
            .collect()
    }

    #[test]
    fn groups_hold_their_ids_in_order_and_respect_the_bounds() {
        let mut c = GroupCutter::new();
        let mut seen = Vec::new();
        let mut groups = 0;
        for n in 0..20_000 {
            seen.push(id(n));
            if let Some(g) = c.push(&id(n)) {
                groups += 1;
                let got: Vec<ChunkId> = ids(g.data()).collect();
                assert!((MIN_GROUP..=MAX_GROUP).contains(&got.len()));
                assert_eq!(got, seen);
                assert_eq!(*g.id(), ChunkId::of(g.data()));
                assert_eq!(id_at(g.data(), got.len() - 1), got.last().copied());
                assert_eq!(id_at(g.data(), got.len()), None);
                seen.clear();
            }
        }
        // Cuts by content: about one in CUT_MODULUS ids ends a group.
        assert!((200..450).contains(&groups), "{groups} groups");
    }

    #[test]
    fn a_later_run_of_the_same_ids_cuts_into_the_same_groups_once_aligned() {
        let run: Vec<ChunkId> = (0..5_000).map(id).collect();
        let first = cut_all(&mut GroupCutter::new(), run.iter().copied());
        // The same run after unrelated ids: all but the first group or two recur.
        let mut later = GroupCutter::new();
        let prefix = (100_000..100_037).map(id);
        let again = cut_all(&mut later, prefix.chain(run.iter().copied()));
        let shared = again.iter().filter(|g| first.contains(g)).count();
        assert!(shared + 2 >= first.len(), "{shared} of {}", first.len());
    }

    #[test]
    fn id_at_refuses_partial_content() {
        let content = [7u8; CHUNK_ID_LEN * 2 + 1];
        assert_eq!(id_at(&content, 0), None);
        assert_eq!(id_at(&[], 0), None);
        assert_eq!(id_at(&[1; 64], usize::MAX), None);
    }
}
