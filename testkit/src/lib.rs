//! Workload generators: deterministic, migration-like byte streams with known
//! duplication, produced piece by piece so gigabytes never sit in memory.
//!
//! A stream is a sequence of *runs* of 4 KiB pages:
//! - **shared** runs copy consecutive pages of a pool common to every stream of a
//!   cluster (OS text, libraries, page cache), starting at a random page, so the same
//!   content recurs in a different order and alignment in each stream;
//! - **unique** runs are pages seen nowhere else;
//! - **zero** runs are all-zero pages.
//!
//! Optionally ([`Workload::with_near_duplicates`]) some shared pages are
//! *near-duplicates*: the pool page with a few 8-byte words changed in place, different
//! in every stream, the way kernel and library pages of similar VMs differ by
//! relocated pointers, counters and timestamps.
//!
//! Page contents are half random, half drawn from a small vocabulary, so a general
//! compressor finds roughly what it finds in real memory (about 2:1), and dedup is
//! measured separately from compression.
#![warn(missing_docs, unreachable_pub)]

use bytes::{BufMut, Bytes, BytesMut};

/// Bytes per page.
pub const PAGE: usize = 4096;

/// Shape of a cluster workload.
#[derive(Clone, Debug)]
pub struct Workload {
    /// Seed of everything.
    pub seed: u64,
    /// Pages in the shared pool.
    pub pool_pages: u64,
    /// Share of pages (in 1/1000) from shared runs.
    pub shared_permille: u32,
    /// Share of pages (in 1/1000) from zero runs; the rest is unique.
    pub zero_permille: u32,
    /// Shortest run, in pages (16 pages = 64 KiB).
    pub run_min: u64,
    /// Longest run, in pages.
    pub run_max: u64,
    /// Share of shared pages (in 1/1000) that are near-duplicates of their pool page.
    pub near_permille: u32,
}

impl Workload {
    /// A cluster of similar VMs: 70% shared pages, 10% zero pages, 20% unique, runs
    /// of 64 KiB to 256 KiB, a pool of `pool_bytes`.
    pub fn cluster(seed: u64, pool_bytes: u64) -> Self {
        Workload {
            seed,
            pool_pages: (pool_bytes / PAGE as u64).max(1),
            shared_permille: 700,
            zero_permille: 100,
            run_min: 16,
            run_max: 64,
            near_permille: 0,
        }
    }

    /// Makes `permille`/1000 of the shared pages near-duplicates: 1 to 4 words of the
    /// pool page replaced by values particular to the stream.
    #[must_use]
    pub fn with_near_duplicates(mut self, permille: u32) -> Self {
        self.near_permille = permille.min(1000);
        self
    }

    /// Stream number `index` of `len` bytes.
    pub fn stream(&self, index: u64, len: u64) -> Stream {
        Stream {
            w: self.clone(),
            rng: Rng::new(self.seed ^ index.wrapping_mul(0xA24B_AED4_963E_E407) ^ 0x5EED),
            remaining: len,
            run: Run::None,
            unique_next: 0,
            index,
        }
    }

    /// Pages of the pool `stream` would draw from (for computing the ideal).
    pub fn pool_page(&self, page: u64) -> [u8; PAGE] {
        page_bytes(self.seed, page % self.pool_pages)
    }
}

#[derive(Clone, Copy, Debug)]
enum Run {
    None,
    Shared { next: u64, left: u64 },
    Unique { left: u64 },
    Zero { left: u64 },
}

/// One generated stream; call [`Stream::next_piece`] until it returns `None`.
#[derive(Clone, Debug)]
pub struct Stream {
    w: Workload,
    rng: Rng,
    remaining: u64,
    run: Run,
    unique_next: u64,
    index: u64,
}

impl Stream {
    /// Bytes still to come.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// The next piece, about `max` bytes (whole pages, except the stream's tail).
    pub fn next_piece(&mut self, max: usize) -> Option<Bytes> {
        if self.remaining == 0 {
            return None;
        }
        let want = (max.max(PAGE) as u64).min(self.remaining) as usize;
        let mut out = BytesMut::with_capacity(want + PAGE);
        while out.len() < want {
            let page = self.next_page();
            out.put_slice(&page);
        }
        out.truncate(want);
        self.remaining -= want as u64;
        Some(out.freeze())
    }

    /// Collects the whole stream (for small streams in tests).
    pub fn collect_all(mut self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.remaining as usize);
        while let Some(p) = self.next_piece(1 << 20) {
            v.extend_from_slice(&p);
        }
        v
    }

    fn next_page(&mut self) -> [u8; PAGE] {
        loop {
            match &mut self.run {
                Run::Shared { next, left } if *left > 0 => {
                    *left -= 1;
                    let p = *next % self.w.pool_pages;
                    *next += 1;
                    let mut page = page_bytes(self.w.seed, p);
                    // Draws only when enabled, so other workloads stay as they were.
                    if self.w.near_permille > 0
                        && (self.rng.next() % 1000) < u64::from(self.w.near_permille)
                    {
                        let edits = 1 + self.rng.next() % 4;
                        for _ in 0..edits {
                            let at = (self.rng.next() as usize % (PAGE / 8)) * 8;
                            let v = self.rng.next() ^ self.index.wrapping_mul(0x9E37_79B9);
                            page[at..at + 8].copy_from_slice(&v.to_le_bytes());
                        }
                    }
                    return page;
                }
                Run::Unique { left } if *left > 0 => {
                    *left -= 1;
                    self.unique_next += 1;
                    // Unique to this stream: mix the stream index into the page id.
                    let id = (1u64 << 63) | (self.index << 40) | self.unique_next;
                    return page_bytes(self.w.seed ^ 0xDEAD_BEEF, id);
                }
                Run::Zero { left } if *left > 0 => {
                    *left -= 1;
                    return [0u8; PAGE];
                }
                _ => self.new_run(),
            }
        }
    }

    fn new_run(&mut self) {
        let span = self.w.run_max - self.w.run_min + 1;
        let left = self.w.run_min + self.rng.next() % span;
        let roll = (self.rng.next() % 1000) as u32;
        self.run = if roll < self.w.shared_permille {
            Run::Shared {
                next: self.rng.next() % self.w.pool_pages,
                left,
            }
        } else if roll < self.w.shared_permille + self.w.zero_permille {
            Run::Zero { left }
        } else {
            Run::Unique { left }
        };
    }
}

/// The content of page `id` under `seed`: half random bytes, half vocabulary words.
pub fn page_bytes(seed: u64, id: u64) -> [u8; PAGE] {
    let mut rng =
        Rng::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ id.wrapping_mul(0xD6E8_FEB8_6659_FD93));
    let mut page = [0u8; PAGE];
    const WORDS: [&[u8; 8]; 8] = [
        b"libc.so.",
        b"\0\0\0\0\0\0\0\0",
        b"/usr/lib",
        b"\xff\xff\xff\xff\0\0\0\0",
        b"kernel32",
        b"GLIBC_2.",
        b"\x48\x89\xe5\x48\x83\xec\x10\x00",
        b"        ",
    ];
    for (i, word) in page.chunks_exact_mut(8).enumerate() {
        let r = rng.next();
        if i % 2 == 0 {
            word.copy_from_slice(&r.to_le_bytes());
        } else {
            word.copy_from_slice(WORDS[(r & 7) as usize]);
        }
    }
    page
}

/// xorshift64*: fast, deterministic, good enough for test data.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value).
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x2545_F491_4F6C_DD1D | 1)
    }

    /// The next value.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_sized() {
        let w = Workload::cluster(1, 1 << 20);
        let a = w.stream(0, 300_001).collect_all();
        let b = w.stream(0, 300_001).collect_all();
        assert_eq!(a.len(), 300_001);
        assert_eq!(a, b);
        assert_ne!(a, w.stream(1, 300_001).collect_all());
    }

    #[test]
    fn near_duplicates_differ_from_their_pool_page_in_a_few_words() {
        let w = Workload::cluster(3, 1 << 20).with_near_duplicates(500);
        let pool: std::collections::HashMap<Vec<u8>, ()> = (0..w.pool_pages)
            .map(|p| (w.pool_page(p).to_vec(), ()))
            .collect();
        let data = w.stream(0, 4 << 20).collect_all();
        let (mut exact, mut near) = (0, 0);
        for page in data.chunks(PAGE) {
            if pool.contains_key(page) {
                exact += 1;
                continue;
            }
            // Compare with every pool page: a near-duplicate differs in <= 32 bytes.
            if (0..w.pool_pages).any(|p| {
                let q = w.pool_page(p);
                q.iter().zip(page).filter(|(a, b)| a != b).count() <= 32
            }) {
                near += 1;
            }
        }
        assert!(near > 0 && exact > 0, "{near} near, {exact} exact");
        let ratio = near as f64 / (near + exact) as f64;
        assert!((0.4..0.6).contains(&ratio), "near share {ratio}");
        // Without near-duplicates the stream is unchanged.
        let plain = Workload::cluster(3, 1 << 20)
            .stream(0, 1 << 20)
            .collect_all();
        assert_eq!(
            plain,
            Workload::cluster(3, 1 << 20)
                .with_near_duplicates(0)
                .stream(0, 1 << 20)
                .collect_all()
        );
    }

    #[test]
    fn has_the_promised_duplication() {
        let w = Workload::cluster(2, 4 << 20);
        let data = w.stream(0, 64 << 20).collect_all();
        let mut seen = std::collections::HashSet::new();
        let dup = data
            .chunks(PAGE)
            .filter(|p| !seen.insert(p.to_vec()))
            .count();
        let pages = data.len() / PAGE;
        // 70% shared from a 1024-page pool + zero pages: most pages repeat.
        assert!(dup * 10 > pages * 7, "{dup} of {pages} pages repeat");
    }
}
#[cfg(all(target_os = "linux", feature = "wan-path"))]
pub mod wan_path;
