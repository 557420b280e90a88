//! Near-duplicate chunks: finding a similar chunk ([`Sketch`]) and describing a chunk
//! as in-place edits of it ([`encode`] / [`apply`]).
//!
//! Memory pages of similar VMs often differ from a page the peer already holds in a
//! few bytes only: a counter, a timestamp, a pointer relocated by a different load
//! address. Such a page crosses the WAN as a DELTA frame naming the base chunk, the
//! target's own id and a *patch*; the receiver rebuilds the target from its verified
//! copy of the base and accepts it only if it hashes to the target id.
//!
//! # Patch format
//! The target has the base's length. A patch is a sequence of edits, each
//! `varint skip, varint len (≥ 1), len bytes`: keep `skip` bytes of the base, then
//! replace the next `len` bytes with the given ones. Bytes after the last edit are the
//! base's. Edits must stay within the chunk; anything else is malformed.
//!
//! # Sketch
//! A chunk is cut into [`FEATURES`] equal parts and each part hashed (with the chunk
//! length mixed in); two chunks of the same length that share one part share that
//! feature. In-place edits leave every untouched part's feature intact, so a page
//! with fewer than [`FEATURES`] edited places always keeps at least one feature of its
//! base.
//! Parts whose bytes are all equal (zero runs, fill patterns) give no feature: they
//! match everything and predict nothing. Features only *propose* a base; the patch
//! size decides, and the target hash makes a wrong proposal harmless.

use bytes::{BufMut, Bytes, BytesMut};

use crate::varint;

/// Features per chunk: a chunk edited in fewer places than this keeps at least one
/// feature of its original. Near-duplicates of near-duplicates (two VMs' variants of
/// one page) differ in the edits of both, so there must be room for several.
pub const FEATURES: usize = 8;

/// Smallest chunk worth a delta: below it, the 64 bytes of ids in a DELTA frame eat
/// the gain.
pub const MIN_DELTA_CHUNK: usize = 1024;

/// The features of one chunk (`None` for a part without a usable feature).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sketch(pub [Option<u64>; FEATURES]);

impl Sketch {
    /// The sketch of `chunk`, or `None` when it is too small for deltas or has no
    /// usable feature.
    pub fn of(chunk: &[u8]) -> Option<Sketch> {
        if chunk.len() < MIN_DELTA_CHUNK {
            return None;
        }
        let part = chunk.len() / FEATURES;
        let mut out = [None; FEATURES];
        for (i, slot) in out.iter_mut().enumerate() {
            let end = if i + 1 == FEATURES {
                chunk.len()
            } else {
                (i + 1) * part
            };
            let bytes = &chunk[i * part..end];
            if bytes.iter().all(|&b| b == bytes[0]) {
                continue;
            }
            *slot = Some(part_hash(bytes, chunk.len() as u64, i as u64));
        }
        out.iter().any(Option::is_some).then_some(Sketch(out))
    }

    /// The usable features.
    pub fn features(&self) -> impl Iterator<Item = u64> + '_ {
        self.0.iter().flatten().copied()
    }
}

/// A fast, non-cryptographic hash of one part (word at a time). Collisions only cost
/// a failed delta attempt.
fn part_hash(bytes: &[u8], len: u64, index: u64) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h = (len << 8 | index).wrapping_mul(K) ^ 0x5851_F42D_4C95_7F2D;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let v = u64::from_le_bytes(w.try_into().expect("8 bytes"));
        h = (h ^ v).wrapping_mul(K).rotate_left(29);
    }
    for &b in words.remainder() {
        h = (h ^ u64::from(b)).wrapping_mul(K).rotate_left(29);
    }
    // Final avalanche (from splitmix64), so nearby inputs spread over the key space.
    h ^= h >> 30;
    h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^ (h >> 31)
}

/// Equal bytes between two edits shorter than this are folded into one edit: an edit
/// costs at least two bytes of header, so a short gap is cheaper sent than skipped.
const MERGE_GAP: usize = 3;

/// The patch that turns `base` into `target`, if both have the same length and the
/// patch is at most `limit` bytes (otherwise `None`: send the chunk another way).
pub fn encode(base: &[u8], target: &[u8], limit: usize) -> Option<Bytes> {
    if base.len() != target.len() {
        return None;
    }
    let mut out = BytesMut::new();
    let mut cursor = 0; // everything before it is described
    let mut i = 0;
    let n = target.len();
    while i < n {
        // Skip equal bytes, 8 at a time where possible.
        while i + 8 <= n && base[i..i + 8] == target[i..i + 8] {
            i += 8;
        }
        while i < n && base[i] == target[i] {
            i += 1;
        }
        if i == n {
            break;
        }
        // An edit starts at i; extend it over differing bytes and short equal gaps.
        let start = i;
        let mut end = i + 1;
        let mut j = end;
        while j < n {
            if base[j] != target[j] {
                j += 1;
                end = j;
            } else if j - end < MERGE_GAP {
                j += 1;
            } else {
                break;
            }
        }
        varint::put(&mut out, (start - cursor) as u64);
        varint::put(&mut out, (end - start) as u64);
        out.put_slice(&target[start..end]);
        if out.len() > limit {
            return None;
        }
        cursor = end;
        i = end;
    }
    Some(out.freeze())
}

/// A patch that does not describe edits of its base.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    /// A length does not parse as a varint.
    #[error("malformed varint in delta patch")]
    BadVarint,
    /// An edit of length 0.
    #[error("empty edit in delta patch")]
    EmptyEdit,
    /// An edit reaches past the end of the chunk, or its bytes are missing.
    #[error("delta patch edit runs past the end of the {len}-byte base chunk")]
    OutOfBounds {
        /// The base's length.
        len: usize,
    },
}

/// Rebuilds the target from `base` and `patch`.
///
/// # Errors
/// [`PatchError`] when the patch is malformed; the caller treats it as a protocol
/// violation (an honest peer never sends one).
pub fn apply(base: &[u8], patch: &[u8]) -> Result<Bytes, PatchError> {
    let len = base.len();
    let mut out = BytesMut::from(base);
    let mut cursor = 0usize;
    let mut rest = patch;
    while !rest.is_empty() {
        let skip = next_varint(&mut rest)?;
        let n = next_varint(&mut rest)?;
        if n == 0 {
            return Err(PatchError::EmptyEdit);
        }
        let start = usize::try_from(skip)
            .ok()
            .and_then(|s| cursor.checked_add(s))
            .filter(|&s| s <= len)
            .ok_or(PatchError::OutOfBounds { len })?;
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| start.checked_add(n))
            .filter(|&e| e <= len)
            .ok_or(PatchError::OutOfBounds { len })?;
        let n = end - start;
        if rest.len() < n {
            return Err(PatchError::OutOfBounds { len });
        }
        out[start..end].copy_from_slice(&rest[..n]);
        rest = &rest[n..];
        cursor = end;
    }
    Ok(out.freeze())
}

fn next_varint(src: &mut &[u8]) -> Result<u64, PatchError> {
    match varint::get(src) {
        Ok(Some((v, l))) => {
            *src = &src[l..];
            Ok(v)
        }
        _ => Err(PatchError::BadVarint),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(seed: u8) -> Vec<u8> {
        (0..4096u32)
            .map(|i| (i.wrapping_mul(31) as u8) ^ seed)
            .collect()
    }

    #[test]
    fn few_edits_make_a_small_patch_that_rebuilds_the_target() {
        let base = page(1);
        let mut target = base.clone();
        target[100..108].copy_from_slice(&0xDEAD_BEEF_u64.to_le_bytes());
        target[2000] ^= 0xFF;
        target[4095] = 7;
        let patch = encode(&base, &target, 4096).unwrap();
        assert!(patch.len() < 30, "patch {} bytes", patch.len());
        assert_eq!(apply(&base, &patch).unwrap(), target);
        // Identical chunks: an empty patch.
        assert!(encode(&base, &base, 0).unwrap().is_empty());
        assert_eq!(apply(&base, &[]).unwrap(), base);
        // Over the limit, or different lengths: no patch.
        assert!(encode(&base, &page(2), 1000).is_none());
        assert!(encode(&base, &base[..4000], 4096).is_none());
    }

    #[test]
    fn malformed_patches_are_refused() {
        let base = page(3);
        assert_eq!(apply(&base, &[0, 0]), Err(PatchError::EmptyEdit));
        assert_eq!(apply(&base, &[0x80]), Err(PatchError::BadVarint));
        assert_eq!(
            apply(&base, &[0x80, 0x20, 1, 9]),
            Err(PatchError::OutOfBounds { len: 4096 })
        );
        // Length says 3 bytes, only 2 follow.
        assert_eq!(
            apply(&base, &[0, 3, 1, 2]),
            Err(PatchError::OutOfBounds { len: 4096 })
        );
        // An edit that ends exactly at the end is fine; one byte more is not.
        let mut p = vec![];
        varint::put(&mut p, 4095);
        p.extend_from_slice(&[1, 0xAA]);
        assert_eq!(apply(&base, &p).unwrap()[4095], 0xAA);
        let mut p = vec![];
        varint::put(&mut p, 4095);
        p.extend_from_slice(&[2, 0xAA, 0xBB]);
        assert!(apply(&base, &p).is_err());
    }

    #[test]
    fn sketch_survives_edits_in_fewer_than_eight_places() {
        let base = page(5);
        let mut target = base.clone();
        for at in [10, 600, 1100, 1600, 2100, 2600, 3100] {
            target[at] ^= 1;
        }
        let (a, b) = (Sketch::of(&base).unwrap(), Sketch::of(&target).unwrap());
        let shared = a
            .features()
            .filter(|f| b.features().any(|g| g == *f))
            .count();
        assert_eq!(shared, 1, "{a:?} {b:?}");
        // Uniform parts give no feature; an all-zero page no sketch at all.
        assert_eq!(Sketch::of(&[0u8; 4096]), None);
        let mut half = vec![0u8; 4096];
        half[..2048].copy_from_slice(&base[..2048]);
        assert_eq!(Sketch::of(&half).unwrap().features().count(), FEATURES / 2);
        // Too small for a delta.
        assert_eq!(Sketch::of(&base[..1000]), None);
        // Same bytes in a chunk of another length: different features.
        let longer = [base.clone(), base[..1024].to_vec()].concat();
        let c = Sketch::of(&longer).unwrap();
        assert!(a.features().all(|f| c.features().all(|g| g != f)));
    }
}
