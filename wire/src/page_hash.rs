//! BLAKE3 of many 4 KiB blocks at once.
//!
//! A 4 KiB block is four BLAKE3 chunks, so hashing one block at a time fills only 4 of
//! the 16 lanes an AVX-512 core compresses in parallel (8 with AVX2): measured here,
//! ~2.4 GB/s one page at a time against ~5 GB/s for 16 or more pages side by side. The
//! sending edge hashes every page of every migration, so [`PageHasher`] lays the pages
//! of one read side by side: the four chunk levels, then the two parent nodes, then the
//! root, each level one `hash_many` call across all pages.
//!
//! `hash_many` is the blake3 crate's own SIMD kernel, reached through its
//! `platform` module, which the crate marks as unstable. The workspace therefore pins
//! blake3 to one exact version, and the tests compare every result with
//! [`blake3::hash`] (any content, any batch size), so an upgrade that changed the
//! kernel's contract fails them instead of naming chunks wrongly.

use blake3::platform::Platform;
use blake3::IncrementCounter;

use crate::id::ChunkId;

/// The block size hashed side by side; other sizes are hashed one at a time.
pub const PAGE: usize = 4096;

const CHUNK: usize = blake3::CHUNK_LEN;
const CHUNKS_PER_PAGE: usize = PAGE / CHUNK;
const OUT: usize = blake3::OUT_LEN;

/// BLAKE3's initial chaining value (the key of unkeyed hashing; the SHA-256 IV).
const IV: [u32; 8] = [
    0x6A09_E667,
    0xBB67_AE85,
    0x3C6E_F372,
    0xA54F_F53A,
    0x510E_527F,
    0x9B05_688C,
    0x1F83_D9AB,
    0x5BE0_CD19,
];
// Domain flags of the BLAKE3 specification (section 2.1).
const CHUNK_START: u8 = 1 << 0;
const CHUNK_END: u8 = 1 << 1;
const PARENT: u8 = 1 << 2;
const ROOT: u8 = 1 << 3;

/// Pages hashed per `hash_many` round: one full pass of AVX-512's 16 lanes, and 64 KiB
/// of pages, read four times (once per chunk level), stay near the core. 16, 32 and 64
/// measured alike here (`shrinker-bench hash`: 2.0-2.3x one at a time).
const GROUP: usize = 16;

/// Below this many pages side by side, one at a time is as fast.
const MIN_SIDE_BY_SIDE: usize = 4;

/// Hashes batches of blocks, 4 KiB ones side by side. Keeps its scratch between calls.
pub struct PageHasher {
    platform: Platform,
    /// Chunk chaining values, four per page, in page order.
    chunk_cvs: Vec<u8>,
    /// Output of one `hash_many` round.
    out: Vec<u8>,
    /// Parent chaining values, two per page.
    parent_cvs: Vec<u8>,
}

impl Default for PageHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for PageHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageHasher").finish_non_exhaustive()
    }
}

impl PageHasher {
    /// A hasher using the widest SIMD this CPU has.
    pub fn new() -> Self {
        PageHasher {
            platform: Platform::detect(),
            chunk_cvs: vec![0; GROUP * CHUNKS_PER_PAGE * OUT],
            out: vec![0; GROUP * OUT],
            parent_cvs: vec![0; GROUP * 2 * OUT],
        }
    }

    /// Appends the id of every block in `blocks`, in order, to `ids`: the BLAKE3 hash,
    /// exactly what [`ChunkId::of`] gives for each.
    pub fn hash_all<B: AsRef<[u8]>>(&mut self, blocks: &[B], ids: &mut Vec<ChunkId>) {
        ids.reserve(blocks.len());
        let mut i = 0;
        while i < blocks.len() {
            // The run of whole pages starting here.
            let run = blocks[i..]
                .iter()
                .take_while(|b| b.as_ref().len() == PAGE)
                .count();
            if run >= MIN_SIDE_BY_SIDE {
                for group in blocks[i..i + run].chunks(GROUP) {
                    self.hash_pages(group, ids);
                }
                i += run;
            } else {
                let end = i + run.max(1);
                ids.extend(blocks[i..end].iter().map(|b| ChunkId::of(b.as_ref())));
                i = end;
            }
        }
    }

    /// Hashes up to [`GROUP`] blocks of exactly [`PAGE`] bytes.
    fn hash_pages<B: AsRef<[u8]>>(&mut self, pages: &[B], ids: &mut Vec<ChunkId>) {
        let n = pages.len();
        debug_assert!(n <= GROUP && pages.iter().all(|p| p.as_ref().len() == PAGE));
        // Leaves: chunk j of every page, counter j, as one chunk each.
        for j in 0..CHUNKS_PER_PAGE {
            let inputs: Vec<&[u8; CHUNK]> = pages
                .iter()
                .map(|p| {
                    p.as_ref()[j * CHUNK..(j + 1) * CHUNK]
                        .try_into()
                        .expect("a page holds four chunks")
                })
                .collect();
            let out = &mut self.out[..n * OUT];
            self.platform.hash_many(
                &inputs,
                &IV,
                j as u64,
                IncrementCounter::No,
                0,
                CHUNK_START,
                CHUNK_END,
                out,
            );
            for (p, cv) in out.chunks_exact(OUT).enumerate() {
                let at = (p * CHUNKS_PER_PAGE + j) * OUT;
                self.chunk_cvs[at..at + OUT].copy_from_slice(cv);
            }
        }
        // Parents: chunks (0, 1) and (2, 3) of each page; the chunk CVs already lie
        // pairwise as 64-byte parent blocks.
        let blocks: Vec<&[u8; 2 * OUT]> = self.chunk_cvs[..n * CHUNKS_PER_PAGE * OUT]
            .chunks_exact(2 * OUT)
            .map(|b| b.try_into().expect("64-byte parent block"))
            .collect();
        self.platform.hash_many(
            &blocks,
            &IV,
            0,
            IncrementCounter::No,
            PARENT,
            0,
            0,
            &mut self.parent_cvs[..n * 2 * OUT],
        );
        // Roots: the two parents of each page. A root's first 32 output bytes are its
        // chaining value, which `hash_many` returns.
        let roots: Vec<&[u8; 2 * OUT]> = self.parent_cvs[..n * 2 * OUT]
            .chunks_exact(2 * OUT)
            .map(|b| b.try_into().expect("64-byte root block"))
            .collect();
        let out = &mut self.out[..n * OUT];
        self.platform.hash_many(
            &roots,
            &IV,
            0,
            IncrementCounter::No,
            PARENT | ROOT,
            0,
            0,
            out,
        );
        ids.extend(
            out.chunks_exact(OUT)
                .map(|h| ChunkId(h.try_into().expect("32-byte hash"))),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn one_at_a_time(blocks: &[Vec<u8>]) -> Vec<ChunkId> {
        blocks.iter().map(|b| ChunkId::of(b)).collect()
    }

    #[test]
    fn pages_side_by_side_hash_as_blake3_does() {
        let mut h = PageHasher::new();
        for n in [0usize, 1, 3, 4, 5, 16, 17, 63, 64, 65, 130] {
            let blocks: Vec<Vec<u8>> = (0..n)
                .map(|i| {
                    (0..PAGE)
                        .map(|k| (k.wrapping_mul(31) ^ i.wrapping_mul(977)) as u8)
                        .collect()
                })
                .collect();
            let mut ids = Vec::new();
            h.hash_all(&blocks, &mut ids);
            assert_eq!(ids, one_at_a_time(&blocks), "{n} pages");
        }
    }

    #[test]
    fn every_simd_kernel_this_cpu_has_agrees() {
        let blocks: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; PAGE]).collect();
        let want = one_at_a_time(&blocks);
        let kernels = [
            Some(Platform::portable()),
            Platform::sse2(),
            Platform::sse41(),
            Platform::avx2(),
            Platform::avx512(),
        ];
        for platform in kernels.into_iter().flatten() {
            let mut h = PageHasher::new();
            h.platform = platform;
            let mut ids = Vec::new();
            h.hash_all(&blocks, &mut ids);
            assert_eq!(ids, want);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Any mix of page-sized and other blocks, any content: the ids of
        /// `ChunkId::of`, in order.
        #[test]
        fn any_blocks_hash_as_one_at_a_time(
            shapes in proptest::collection::vec((0usize..6, any::<u64>()), 0..80),
        ) {
            let blocks: Vec<Vec<u8>> = shapes
                .iter()
                .map(|&(kind, seed)| {
                    let len = match kind {
                        0 => 1 + (seed % 9000) as usize,
                        1 => 0,
                        _ => PAGE,
                    };
                    crate::fuzzing::noise(len, seed)
                })
                .collect();
            let mut ids = vec![ChunkId([7; 32])];
            PageHasher::new().hash_all(&blocks, &mut ids);
            prop_assert_eq!(ids[0], ChunkId([7; 32]));
            prop_assert_eq!(&ids[1..], &one_at_a_time(&blocks)[..]);
        }
    }
}
