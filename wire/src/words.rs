//! Word differences: a reversible transform for chunks that hold arrays of 64-bit
//! values, so that compression sees their regularity.
//!
//! Much of a guest's memory that is new to the peer is tables of 64-bit words that
//! grow by a constant: page tables (each entry the previous one plus 4 KiB), arrays
//! of pointers into one allocation, the kernel's per-page records (64-byte structs
//! whose fields step from one record to the next). zstd sees such a page as 512
//! different words; the same page as differences (each word minus the one `stride`
//! words before it) is a few distinct values repeated, which it takes to almost
//! nothing. On four real Linux guests this took 5% off the WAN bytes of the whole
//! cluster (docs/BENCHMARKS.md §3 "Word differences").
//!
//! # Format
//! For a chunk of `n` bytes and a stride `s` (in 8-byte words, 1 ≤ s ≤
//! [`MAX_STRIDE`]): word `i` (little-endian u64 at byte `8 i`) becomes
//! `word[i] − word[i − s]` (wrapping) for `i ≥ s`, and stays as it is for `i < s`; the
//! `n mod 8` bytes after the last whole word stay as they are. [`restore`] undoes it
//! exactly for every input, so a WORDS frame can only ever rebuild the bytes it was
//! made from (and the receiver hashes the result as it hashes any CHUNK).
//!
//! # Choosing
//! [`choose`] transforms a chunk only when an estimate of what compression would pay
//! for it drops clearly: zero bytes and words repeating one of the two before them are
//! what an LZ coder takes cheaply. The margin is deliberately wide; a chunk that
//! is not clearly better stays as it is (measured on the guests above: a narrow margin
//! transformed pages that then compressed worse, and cost more than it saved).

/// Largest stride a WORDS frame may carry (in 8-byte words).
pub const MAX_STRIDE: u8 = 64;

/// The strides tried: neighbouring words (tables, pointer arrays) and 64-byte records.
const STRIDES: [u8; 2] = [1, 8];

/// How much cheaper (in [`Price`] units: 4 per non-zero byte) the transformed chunk
/// must look, per byte of chunk: three quarters of a unit, 3,072 for a 4 KiB page (a
/// quarter of it in non-zero bytes).
const MARGIN_PER_4_BYTES: usize = 3;

/// Smallest chunk considered: the transform works on whole words, and a small chunk
/// has too few of them to show a pattern.
const MIN_CHUNK: usize = 256;

/// The word differences of `chunk` at `stride` (see the module docs).
///
/// # Panics
/// If `stride` is 0.
pub fn difference(chunk: &[u8], stride: u8) -> Vec<u8> {
    assert!(stride >= 1, "stride 0");
    let s = usize::from(stride);
    let mut out = chunk.to_vec();
    let words = chunk.len() / 8;
    // Backwards, in place: word i still holds its original value while later ones
    // read it.
    for i in (s..words).rev() {
        let v = word(&out, i).wrapping_sub(word(&out, i - s));
        out[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    out
}

/// The chunk whose word differences at `stride` are `diffs` (inverse of
/// [`difference`], for any bytes).
///
/// # Panics
/// If `stride` is 0.
pub fn restore(diffs: &[u8], stride: u8) -> Vec<u8> {
    assert!(stride >= 1, "stride 0");
    let s = usize::from(stride);
    let mut out = diffs.to_vec();
    let words = diffs.len() / 8;
    for i in s..words {
        let v = word(&out, i).wrapping_add(word(&out, i - s));
        out[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    out
}

/// The stride and differences to send `chunk` as, when they promise to compress
/// clearly better than the chunk itself; `None` keeps it as it is.
pub fn choose(chunk: &[u8]) -> Option<(u8, Vec<u8>)> {
    if chunk.len() < MIN_CHUNK {
        return None;
    }
    // Each form must beat the best so far by the margin: the first stride tried wins
    // near-ties (on real guests, letting a second stride win by a hair cost 0.2%).
    let margin = chunk.len() / 4 * MARGIN_PER_4_BYTES;
    let prices = prices(chunk);
    let mut bar = prices[0];
    let mut best = None;
    for (k, stride) in STRIDES.into_iter().enumerate() {
        if prices[k + 1] + margin < bar {
            bar = prices[k + 1];
            best = Some(stride);
        }
    }
    best.map(|stride| (stride, difference(chunk, stride)))
}

/// The [`Price`] of the chunk as it is and of its differences at each of
/// [`STRIDES`], in one pass (only the chosen form is then built).
///
/// This runs on every new chunk while batches are compressed, as often as the delta
/// search's sketch, so the words come from one pass over the bytes and the ones a
/// stride looks back at from a small ring, not from indexing the chunk again.
fn prices(chunk: &[u8]) -> [usize; 1 + STRIDES.len()] {
    const RING: usize = 8;
    const _: () = {
        let mut k = 0;
        while k < STRIDES.len() {
            assert!(
                STRIDES[k] as usize <= RING,
                "a stride reaches past the ring"
            );
            k += 1;
        }
    };
    let mut ring = [0u64; RING];
    let mut prices = [Price::default(); 1 + STRIDES.len()];
    for (i, bytes) in chunk.chunks_exact(8).enumerate() {
        let w = u64::from_le_bytes(bytes.try_into().expect("8 bytes"));
        prices[0].add(w);
        for (price, stride) in prices[1..].iter_mut().zip(STRIDES) {
            let s = usize::from(stride);
            price.add(if i >= s {
                w.wrapping_sub(ring[(i - s) % RING])
            } else {
                w
            });
        }
        ring[i % RING] = w;
    }
    prices.map(|p| p.total)
}

/// A rough price of a run of words to an LZ coder: a word repeating one of the two
/// words before it costs 1; any other word 4 per non-zero byte. (The two words
/// "before" the first are an arbitrary pair: a price is an estimate.)
#[derive(Clone, Copy)]
struct Price {
    total: usize,
    prev: [u64; 2],
}

impl Default for Price {
    fn default() -> Self {
        Price {
            total: 0,
            prev: [0x5bd1_e995_5bd1_e995, 0x9e37_79b9_7f4a_7c15],
        }
    }
}

impl Price {
    fn add(&mut self, w: u64) {
        // Both sides computed, then picked: no branch to mispredict on every word.
        let repeat = (w == self.prev[0]) | (w == self.prev[1]);
        let cost = 4 * nonzero_bytes(w);
        self.total += if repeat { 1 } else { cost };
        self.prev = [w, self.prev[0]];
    }
}

/// Non-zero bytes of `w`.
fn nonzero_bytes(w: u64) -> usize {
    // Each byte's high bit set iff the byte is non-zero.
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    let high = ((w & LOW7).wrapping_add(LOW7) | w) & !LOW7;
    // One bit per byte: a multiply sums them into the top byte (cheaper than
    // `count_ones` without a POPCNT target feature, which a portable build lacks).
    ((high >> 7).wrapping_mul(0x0101_0101_0101_0101) >> 56) as usize
}

fn word(bytes: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_table_is_sent_as_differences_and_restored() {
        // Entries of consecutive 4 KiB frames with the same flags.
        let table: Vec<u8> = (0..512u64)
            .flat_map(|i| ((0x1234_5000 + i * 0x1000) | 0x63).to_le_bytes())
            .collect();
        let (stride, diffs) = choose(&table).expect("a page table is regular");
        assert_eq!(stride, 1);
        assert!(diffs[8..].chunks(8).all(|w| w == 0x1000u64.to_le_bytes()));
        assert_eq!(restore(&diffs, stride), table);
    }

    #[test]
    fn records_of_eight_words_take_stride_eight() {
        // 64-byte records: a pointer field stepping by 64, a counter, flags, padding.
        let records: Vec<u8> = (0..64u64)
            .flat_map(|i| {
                let rec = [
                    0xffff_8880_0000_0000 + i * 64,
                    0x0000_0001_0000_0000 | (i * 7919 % 13),
                    0x17ff_ffc0_0000_0000 + (i << 12),
                    0xdead_0000_0000_0000 + i * 64,
                    0,
                    0xffff_ea00_0000_0000 + i * 0x40,
                    0x0000_0000_ffff_ffff,
                    i * 3,
                ];
                rec.into_iter().flat_map(u64::to_le_bytes)
            })
            .collect();
        let (stride, diffs) = choose(&records).expect("records step regularly");
        assert_eq!(stride, 8);
        assert_eq!(restore(&diffs, stride), records);
    }

    #[test]
    fn text_and_random_bytes_stay_as_they_are() {
        let text = b"The quick brown fox jumps over the lazy dog. ".repeat(92);
        assert_eq!(choose(&text[..4096]), None);
        assert_eq!(choose(&crate::fuzzing::noise(4096, 5)), None);
        assert_eq!(choose(&[0u8; 4096]), None, "zeros compress as they are");
    }

    #[test]
    fn nonzero_bytes_are_counted_exactly() {
        let mut x = 0x1234_5678_9abc_def1u64;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Zero out a random set of bytes.
            let w = x & (x >> 8).wrapping_mul(0xff);
            for v in [x, w, w & 0x8080_8080_8080_8080, w & 0x0101_0101_0101_0101] {
                let naive = v.to_le_bytes().iter().filter(|&&b| b != 0).count();
                assert_eq!(nonzero_bytes(v), naive, "{v:#x}");
            }
        }
        assert_eq!(nonzero_bytes(0), 0);
        assert_eq!(nonzero_bytes(u64::MAX), 8);
    }

    #[test]
    fn restore_undoes_difference_for_odd_lengths_and_every_stride() {
        let data: Vec<u8> = (0..1003u32).map(|i| (i * 37 % 251) as u8).collect();
        for stride in 1..=MAX_STRIDE {
            let d = difference(&data, stride);
            assert_eq!(d.len(), data.len());
            assert_eq!(d[1000..], data[1000..], "tail bytes kept");
            assert_eq!(restore(&d, stride), data, "stride {stride}");
        }
    }
}
