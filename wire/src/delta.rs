//! Near-duplicate chunks: finding a similar chunk ([`Sketch`]) and describing a chunk
//! against it, either as in-place edits ([`encode`] / [`apply`]) or as a zstd frame
//! compressed with the similar chunk as its dictionary ([`zstd_encode`] /
//! [`zstd_apply`]).
//!
//! Memory pages of similar VMs often differ from a page the peer already holds in a
//! few bytes only: a counter, a timestamp, a pointer relocated by a different load
//! address. Others hold the same text or structures at other offsets (page cache of
//! files laid out differently, symbol tables with other addresses). Such a page
//! crosses the WAN as a DELTA frame naming the base chunk, the target's own id and a
//! payload; the receiver rebuilds the target from its verified copy of the base and
//! accepts it only if it hashes to the target id.
//!
//! # Edits format
//! The target has the base's length. A patch is a sequence of edits, each
//! `varint skip, varint len (≥ 1), len bytes`: keep `skip` bytes of the base, then
//! replace the next `len` bytes with the given ones. Bytes after the last edit are the
//! base's. Edits must stay within the chunk; anything else is malformed.
//!
//! # Zstd format
//! One zstd frame with its content size set (at most 1 MiB), compressed with the base
//! as a raw-content dictionary (`ZSTD_compress_usingDict`).
//!
//! # Sketch
//! Two min-hashes over the chunk give its [`FEATURES`]: the smallest distinct values
//! of each ([`GEAR_FEATURES`] of a byte-granular one, the rest of a word-granular one).
//! Two chunks sharing most of their windows share most of their smallest values, so
//! a chunk proposes the stored chunks it shares features with.
//! - A gear rolling hash (the one FastCDC uses: each value covers the last 64 bytes)
//!   at every byte: content at any offset keeps its values (text or structures
//!   shifted by a few bytes).
//! - A hash of every run of [`WORD_WINDOW`] aligned 64-bit words (24 bytes): guest
//!   memory changes in whole words (counters, pointers relocated by a different load
//!   address, tables whose every few words differ), and a page edited every 32-64
//!   bytes keeps no unchanged 64-byte window at all, but many unchanged 24-byte ones.
//!   On four real Linux guests (`bench encode --level 8`) later guests found 29% more
//!   bases and crossed in 12-14% fewer bytes than with gear features alone; the first
//!   guest, whose near-duplicates are more often shifted, keeps its gear features
//!   (word features alone cost it 1.4%).
//!
//! Windows in uniform runs (zero pages, fill patterns) repeat the same value and are
//! skipped: they match everything and predict nothing. Features only *propose* a base;
//! the payload size decides, and the target hash makes a wrong proposal harmless.

use bytes::{BufMut, Bytes, BytesMut};

use crate::varint;

/// Features per chunk. More find more bases, for a longer sketch and search and more
/// memory per chunk remembered (the delta index charges each entry to `--delta-mem`).
/// Four Linux guests, `bench encode --level 8`: 8 features (2 gear) 35.63 MB, 12 (3
/// gear) 35.36, 16 (4 gear) 35.24; live over 100 Mbit/s 12 carried 0.4-1.0% fewer
/// bytes than 8 in the same time, while 16 slowed first guests on a busy machine
/// until they fell back to weaker levels (+2-18% bytes in two of three runs).
pub const FEATURES: usize = 12;

/// Of the [`FEATURES`], how many come from the gear hash (the rest from word
/// windows). Measured with `bench encode --level 8` on four Linux guests, of 8
/// features: 0 35.67 MB, 1 35.55, 2 35.53, 3 35.63, 4 35.76, 6 36.30, all 8 (gear
/// only) 37.17; a quarter of them is kept.
pub const GEAR_FEATURES: usize = 3;

/// 64-bit words per word window. On the same guests, with word features alone:
/// 2 words 35.78 MB, 3 35.67, 4 36.07, 6 37.28, 8 37.49.
pub const WORD_WINDOW: usize = 3;

/// Mixed into word features so that they never equal a gear feature.
const WORD_TAG: u64 = 0x5555_5555_5555_5555;

/// Smallest chunk worth a delta: below it, the 64 bytes of ids in a DELTA frame eat
/// the gain.
pub const MIN_DELTA_CHUNK: usize = 1024;

/// Largest chunk a zstd delta may rebuild (the wire's chunk cap).
const MAX_TARGET: usize = crate::frame::MAX_CHUNK;

/// The features of one chunk: its smallest distinct gear-hash values, then its
/// smallest distinct word-window values, each ascending (see the module notes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sketch(pub [Option<u64>; FEATURES]);

impl Sketch {
    /// The sketch of `chunk`, or `None` when it is too small for deltas or has no
    /// usable feature.
    pub fn of(chunk: &[u8]) -> Option<Sketch> {
        if chunk.len() < MIN_DELTA_CHUNK {
            return None;
        }
        let mut gear = Smallest::<GEAR_FEATURES>::new();
        gear_values(chunk, &mut gear);
        let mut words = Smallest::<{ FEATURES - GEAR_FEATURES }>::new();
        word_values(chunk, &mut words);
        if gear.kept == 0 && words.kept == 0 {
            return None;
        }
        // Mixed with the length class so tiny and huge chunks do not propose each other
        // (a chunk and its base are usually about the same size).
        let class = ((chunk.len() as u64).ilog2() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut out = [None; FEATURES];
        let values = gear.values().map(|m| m ^ class);
        let values = values.chain(words.values().map(|m| m ^ class ^ WORD_TAG));
        for (slot, v) in out.iter_mut().zip(values) {
            *slot = Some(v);
        }
        Some(Sketch(out))
    }

    /// The usable features.
    pub fn features(&self) -> impl Iterator<Item = u64> + '_ {
        self.0.iter().flatten().copied()
    }
}

/// The `N` smallest distinct values offered, ascending.
struct Smallest<const N: usize> {
    mins: [u64; N],
    kept: usize,
}

impl<const N: usize> Smallest<N> {
    fn new() -> Self {
        Smallest {
            mins: [u64::MAX; N],
            kept: 0,
        }
    }

    /// Keeps `h` if it is among the `N` smallest so far; once full, most values cost
    /// one comparison with the largest kept.
    #[inline]
    fn offer(&mut self, h: u64) {
        if N == 0 || (self.kept == N && h >= self.mins[N - 1]) {
            return;
        }
        let at = self.mins[..self.kept].partition_point(|&m| m < h);
        if at < self.kept && self.mins[at] == h {
            return;
        }
        let end = self.kept.min(N - 1);
        self.mins.copy_within(at..end, at + 1);
        self.mins[at] = h;
        self.kept = (self.kept + 1).min(N);
    }

    /// Whether [`Smallest::offer`] could keep a value this small.
    #[inline]
    fn could_keep(&self, h: u64) -> bool {
        N > 0 && (self.kept < N || h < self.mins[N - 1])
    }

    /// What a value must be below to be kept, and whether `u64::MAX` may be kept
    /// too (while not full): [`Smallest::could_keep`] in two plain values.
    #[inline]
    fn bound(&self) -> (u64, bool) {
        match (N, self.kept < N) {
            (0, _) => (0, false),
            (_, true) => (u64::MAX, true),
            _ => (self.mins[N - 1], false),
        }
    }

    fn values(&self) -> impl Iterator<Item = u64> + '_ {
        self.mins[..self.kept].iter().copied()
    }
}

/// Positions a gear value covers: the hash at a position depends on these bytes only.
const GEAR_WINDOW: usize = 64;

/// Positions hashed before their values are looked at together.
const GEAR_BLOCK: usize = 8;

/// Offers the gear hash's value at every position with a full 64-byte window (from
/// the 65th byte on), skipping values equal to the previous position's (a uniform
/// run; [`Smallest`] would refuse them anyway).
///
/// Built for speed, the sketch having cost 9 times BLAKE3 per byte with a comparison
/// and a branch per position: the values are hashed [`GEAR_BLOCK`] at a time and a
/// block is offered value by value only if its smallest could still be kept (once
/// `kept` is full, almost never). Two chains over the two halves side by side (a
/// value depends only on the 64 bytes before it) measured no faster. Offers exactly
/// what the tests' `gear_values_one_by_one` offers.
fn gear_values<const N: usize>(chunk: &[u8], kept: &mut Smallest<N>) {
    if chunk.len() <= GEAR_WINDOW {
        return;
    }
    let (mut chain, rest) = GearChain::warmed(chunk);
    let mut blocks = rest.chunks_exact(GEAR_BLOCK);
    for block in &mut blocks {
        let values = chain.hash(block);
        if kept.could_keep(values.iter().fold(u64::MAX, |m, &v| m.min(v))) {
            chain.offer(&values, kept);
        } else {
            chain.pass(&values);
        }
    }
    for &byte in blocks.remainder() {
        let values = chain.hash(&[byte]);
        chain.offer(&values, kept);
    }
}

/// One gear hash chain over consecutive positions.
struct GearChain {
    table: &'static [u64; 256],
    /// The value at the last position hashed.
    h: u64,
    /// The value at the last position offered or passed.
    prev: u64,
}

impl GearChain {
    /// A chain over `bytes` whose first [`GEAR_WINDOW`] bytes are hashed, and the rest.
    fn warmed(bytes: &[u8]) -> (GearChain, &[u8]) {
        let table = gear_table();
        let (head, rest) = bytes.split_at(GEAR_WINDOW);
        let h = head
            .iter()
            .fold(0u64, |h, &b| (h << 1).wrapping_add(table[usize::from(b)]));
        (GearChain { table, h, prev: h }, rest)
    }

    /// The values at the positions of `bytes` (at most [`GEAR_BLOCK`]; unused slots
    /// repeat the last value).
    #[inline]
    fn hash(&mut self, bytes: &[u8]) -> [u64; GEAR_BLOCK] {
        let mut values = [0u64; GEAR_BLOCK];
        for (v, &b) in values.iter_mut().zip(bytes) {
            self.h = (self.h << 1).wrapping_add(self.table[usize::from(b)]);
            *v = self.h;
        }
        values[bytes.len()..].fill(self.h);
        values
    }

    /// Offers a block's values, each unless it repeats the one before.
    #[inline]
    fn offer<const N: usize>(&mut self, values: &[u64; GEAR_BLOCK], kept: &mut Smallest<N>) {
        for &v in values {
            if v != self.prev {
                kept.offer(v);
            }
            self.prev = v;
        }
    }

    /// Moves past a block none of whose values can be kept.
    #[inline]
    fn pass(&mut self, values: &[u64; GEAR_BLOCK]) {
        self.prev = values[GEAR_BLOCK - 1];
    }
}

/// Offers a hash of every run of [`WORD_WINDOW`] aligned 64-bit words, except runs of
/// one word repeated and values equal to the previous run's. Bytes after the last
/// whole word are not covered.
///
/// The bound a window must beat is kept in a local between offers, so most windows
/// cost their hash and one comparison (blocks as in [`gear_values`] do not pay here:
/// with a few hundred windows per page and six kept, a third of all blocks would
/// hold a value to offer). Offers exactly what the tests' `word_values_one_by_one`
/// offers.
fn word_values<const N: usize>(chunk: &[u8], kept: &mut Smallest<N>) {
    const _: () = assert!(
        WORD_WINDOW == 3,
        "the window below is written out for 3 words"
    );
    if chunk.len() < 8 * WORD_WINDOW {
        return;
    }
    let mut words = chunk.chunks_exact(8);
    let (mut older, mut old) = (0u64, 0u64);
    for bytes in words.by_ref().take(WORD_WINDOW - 1) {
        (older, old) = (old, word_mix(bytes));
    }
    let mut prev = 0u64;
    let mut bound = kept.bound();
    for bytes in words {
        let w = word_mix(bytes);
        let (v, uniform) = word_window(w, old, older);
        let keepable = v < bound.0 || bound.1 && v == u64::MAX;
        if keepable && v != prev && !uniform {
            kept.offer(v);
            bound = kept.bound();
        }
        prev = v;
        (older, old) = (old, w);
    }
}

/// One aligned word, mixed once (the windows it ends and is part of combine it).
#[inline]
fn word_mix(bytes: &[u8]) -> u64 {
    let x = u64::from_le_bytes(bytes.try_into().expect("8 bytes"));
    let w = (x ^ 0x243F_6A88_85A3_08D3).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    w ^ (w >> 29)
}

/// The value of the window of mixed words `older, old, w` (rotated apart so that the
/// same words in another order give another value), and whether it is one word three
/// times: a uniform run, wherever it starts.
#[inline]
fn word_window(w: u64, old: u64, older: u64) -> (u64, bool) {
    let mut h = w ^ old.rotate_left(8) ^ older.rotate_left(16);
    h = (h ^ (h >> 31)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    (h ^ (h >> 27), w == old && w == older)
}

/// A fixed pseudo-random table (splitmix64 of the byte value), the gear hash's input.
fn gear_table() -> &'static [u64; 256] {
    static TABLE: std::sync::OnceLock<[u64; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = [0u64; 256];
        for (i, v) in t.iter_mut().enumerate() {
            let mut z = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            *v = z ^ (z >> 31);
        }
        t
    })
}

/// `target` compressed as one zstd frame with `base` as its dictionary, if that works
/// and comes out at most `limit` bytes. The context comes from [`crate::zpool`]:
/// creating one per chunk (it allocates and clears its match tables) cost more than a
/// tenth of the delta search, and keeping one per connection costs memory.
pub fn zstd_encode(base: &[u8], target: &[u8], level: i32, limit: usize) -> Option<Vec<u8>> {
    if target.len() > MAX_TARGET {
        return None;
    }
    crate::zpool::compress(target, Some(base), level).filter(|out| out.len() <= limit)
}

/// Size of `target` compressed on its own at `level` (its length if zstd fails).
pub fn zstd_alone(target: &[u8], level: i32) -> usize {
    crate::zpool::compress(target, None, level).map_or(target.len(), |out| out.len())
}

/// Rebuilds a target from `base` and a zstd frame made by [`zstd_encode`].
///
/// # Errors
/// [`PatchError::BadZstd`] when the frame does not say its size, says more than 1 MiB,
/// or does not decompress to exactly that size with this base.
pub fn zstd_apply(base: &[u8], frame: &[u8]) -> Result<Bytes, PatchError> {
    let size = match zstd::zstd_safe::get_frame_content_size(frame) {
        Ok(Some(n)) if n <= MAX_TARGET as u64 => n as usize,
        _ => return Err(PatchError::BadZstd),
    };
    let mut out: Vec<u8> = Vec::with_capacity(size);
    let mut dctx = zstd::zstd_safe::DCtx::create();
    match dctx.decompress_using_dict(&mut out, frame, base) {
        Ok(n) if n == size && out.len() == size => Ok(Bytes::from(out)),
        _ => Err(PatchError::BadZstd),
    }
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
    /// A zstd delta that does not decompress, with its base, to its announced size
    /// (at most 1 MiB).
    #[error("zstd delta does not decompress with its base to its announced size")]
    BadZstd,
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

    /// The gear features' definition, one position at a time: the oracle for the
    /// block-wise [`gear_values`].
    fn gear_values_one_by_one(chunk: &[u8], mut offer: impl FnMut(u64)) {
        let gear = gear_table();
        let mut h = 0u64;
        let mut prev = 0u64;
        for (i, &b) in chunk.iter().enumerate() {
            h = (h << 1).wrapping_add(gear[usize::from(b)]);
            let repeat = h == prev;
            prev = h;
            if i >= 64 && !repeat {
                offer(h);
            }
        }
    }

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

    fn shared_features(a: &[u8], b: &[u8]) -> usize {
        let (a, b) = (Sketch::of(a).unwrap(), Sketch::of(b).unwrap());
        a.features()
            .filter(|f| b.features().any(|g| g == *f))
            .count()
    }

    #[test]
    fn sketch_survives_edits_and_shifts() {
        let mut x = 7u64;
        let base: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 40) as u8 + b'0'
            })
            .collect();
        let mut edited = base.clone();
        for at in [10, 600, 1100, 1600, 2100, 2600, 3100] {
            edited[at] ^= 1;
        }
        assert!(
            shared_features(&base, &edited) >= 4,
            "edited: {}",
            shared_features(&base, &edited)
        );
        // The same content 100 bytes further on, other bytes in front: the gear
        // features see it at any offset.
        let shifted = [&page(9)[..100], &base[..3996]].concat();
        assert!(
            shared_features(&base, &shifted) >= GEAR_FEATURES,
            "shifted: {}",
            shared_features(&base, &shifted)
        );
        // Shifted by whole words, the word windows see it too.
        let shifted = [&page(9)[..96], &base[..4000]].concat();
        assert!(
            shared_features(&base, &shifted) >= 4,
            "shifted by words: {}",
            shared_features(&base, &shifted)
        );
        // Unrelated content shares nothing.
        let other: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        assert_eq!(shared_features(&base, &other), 0);
        // Uniform runs give no feature; an all-zero page no sketch at all.
        assert_eq!(Sketch::of(&[0u8; 4096]), None);
        assert_eq!(Sketch::of(&[0xAAu8; 4096]), None);
        // Too small for a delta; deterministic.
        assert_eq!(Sketch::of(&base[..1000]), None);
        assert_eq!(Sketch::of(&base), Sketch::of(&base.clone()));
    }

    #[test]
    fn a_table_changed_every_eighth_word_keeps_word_features() {
        // A table of pointers relocated by another load address: every eighth word
        // differs, so no 64-byte window is unchanged and the gear hash finds nothing
        // in common; most 24-byte windows are unchanged.
        let mut x = 11u64;
        let base: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut edited = base.clone();
        for word in edited.chunks_exact_mut(64) {
            word[0] ^= 0x40;
        }
        let (a, b) = (Sketch::of(&base).unwrap(), Sketch::of(&edited).unwrap());
        let gear_shared = a.0[..GEAR_FEATURES]
            .iter()
            .filter(|f| b.0[..GEAR_FEATURES].contains(f))
            .count();
        assert_eq!(gear_shared, 0, "no 64-byte window survives");
        assert!(
            shared_features(&base, &edited) >= 2,
            "word windows: {}",
            shared_features(&base, &edited)
        );
    }

    #[test]
    fn zstd_delta_rebuilds_shifted_content_small() {
        let base: Vec<u8> = (0..4096u32)
            .map(|i| ((i * 7) ^ (i >> 5)) as u8 | 1)
            .collect();
        let mut target = [&b"a new header "[..], &base[..4000]].concat();
        target.truncate(4096);
        let z = zstd_encode(&base, &target, 3, 4096).unwrap();
        assert!(z.len() < 200, "{} bytes", z.len());
        assert_eq!(zstd_apply(&base, &z).unwrap(), target);
        // With another base it does not rebuild the same bytes (or fails).
        assert!(zstd_apply(&page(1), &z).map_or(true, |t| t != target));
        // Over the limit: none.
        assert!(zstd_encode(&base, &page(2), 3, 100).is_none());
        // Garbage is refused, not trusted.
        assert_eq!(zstd_apply(&base, b"not zstd"), Err(PatchError::BadZstd));
    }

    /// The word features' definition, one window at a time: the oracle for the
    /// block-wise [`word_values`].
    fn word_values_one_by_one(chunk: &[u8], mut offer: impl FnMut(u64)) {
        const _: () = assert!(
            WORD_WINDOW == 3,
            "the window below is written out for 3 words"
        );
        // Each word mixed once; a window combines the last three, rotated apart so that
        // the same words in another order give another value.
        let (mut older, mut old) = (0u64, 0u64);
        let mut prev = 0u64;
        for (i, bytes) in chunk.chunks_exact(8).enumerate() {
            let x = u64::from_le_bytes(bytes.try_into().expect("8 bytes"));
            let mut w = (x ^ 0x243F_6A88_85A3_08D3).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            w ^= w >> 29;
            if i + 1 >= WORD_WINDOW {
                let mut h = w ^ old.rotate_left(8) ^ older.rotate_left(16);
                h = (h ^ (h >> 31)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                h ^= h >> 27;
                // One word three times is a uniform run, wherever it starts.
                let uniform = w == old && w == older;
                if h != prev && !uniform {
                    offer(h);
                }
                prev = h;
            }
            older = old;
            old = w;
        }
    }

    /// Chunks of uniform runs, repeating patterns and noise: the repeat rule and
    /// blocks that straddle them are where the block-wise loop could differ.
    fn mixed_chunk() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let segment = prop_oneof![
            (any::<u8>(), 1..300usize).prop_map(|(b, n)| vec![b; n]),
            (proptest::collection::vec(any::<u8>(), 1..9), 1..60usize)
                .prop_map(|(pat, n)| pat.repeat(n)),
            proptest::collection::vec(any::<u8>(), 1..400),
        ];
        proptest::collection::vec(segment, 0..24).prop_map(|s| s.concat())
    }

    fn kept_by<const N: usize>(fill: impl FnOnce(&mut Smallest<N>)) -> Vec<u64> {
        let mut kept = Smallest::<N>::new();
        fill(&mut kept);
        kept.values().collect()
    }

    proptest::proptest! {
        #[test]
        fn gear_blocks_keep_what_one_by_one_keeps(chunk in mixed_chunk()) {
            let one = kept_by::<2>(|k| gear_values_one_by_one(&chunk, |h| k.offer(h)));
            proptest::prop_assert_eq!(kept_by::<2>(|k| gear_values(&chunk, k)), one);
            let one = kept_by::<8>(|k| gear_values_one_by_one(&chunk, |h| k.offer(h)));
            proptest::prop_assert_eq!(kept_by::<8>(|k| gear_values(&chunk, k)), one);
        }

        #[test]
        fn word_blocks_keep_what_one_by_one_keeps(chunk in mixed_chunk()) {
            let one = kept_by::<6>(|k| word_values_one_by_one(&chunk, |h| k.offer(h)));
            proptest::prop_assert_eq!(kept_by::<6>(|k| word_values(&chunk, k)), one);
            let one = kept_by::<1>(|k| word_values_one_by_one(&chunk, |h| k.offer(h)));
            proptest::prop_assert_eq!(kept_by::<1>(|k| word_values(&chunk, k)), one);
        }
    }
}
