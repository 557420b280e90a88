//! Page hashing speed: BLAKE3 one 4 KiB page at a time (`ChunkId::of`) against the
//! pages of one read side by side (`wire::page_hash::PageHasher`, what the edges do),
//! on the same pseudo-random pages, alternating, median of the runs.

use std::time::Instant;

use wire::page_hash::{PageHasher, PAGE};
use wire::ChunkId;

/// Arguments of `shrinker-bench hash`.
#[derive(clap::Args, Debug)]
pub struct HashArgs {
    /// Pages to hash per run, in MiB.
    #[arg(long, default_value_t = 256)]
    mib: usize,
    /// Pages handed over together (64 = one 256 KiB read).
    #[arg(long, default_value_t = 64)]
    pages_per_call: usize,
    /// Runs of each way (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

/// Runs the comparison and prints GB/s of each way.
pub fn run(a: HashArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.mib > 0 && a.runs > 0 && a.pages_per_call > 0,
        "--mib, --runs and --pages-per-call must be positive"
    );
    let mut data = vec![0u8; a.mib << 20];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for word in data.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        word.copy_from_slice(&x.to_le_bytes());
    }
    let pages: Vec<&[u8]> = data.chunks_exact(PAGE).collect();
    let mut hasher = PageHasher::new();
    let mut ids = Vec::with_capacity(pages.len());
    let (mut alone, mut together) = (Vec::new(), Vec::new());
    for run in 0..a.runs {
        let t = Instant::now();
        let one: Vec<ChunkId> = pages.iter().map(|p| ChunkId::of(p)).collect();
        alone.push(gbps(data.len(), t));
        ids.clear();
        let t = Instant::now();
        for group in pages.chunks(a.pages_per_call) {
            hasher.hash_all(group, &mut ids);
        }
        together.push(gbps(data.len(), t));
        anyhow::ensure!(ids == one, "side-by-side ids differ from blake3::hash");
        eprintln!(
            "run {}: one at a time {:.2} GB/s, side by side {:.2} GB/s",
            run + 1,
            alone[run],
            together[run]
        );
    }
    let (m1, m2) = (median(&mut alone), median(&mut together));
    println!(
        "{} MiB of 4 KiB pages, {} per call, median of {}: one at a time {m1:.2} GB/s, side by side {m2:.2} GB/s ({:.2}x)",
        a.mib,
        a.pages_per_call,
        a.runs,
        m2 / m1
    );
    Ok(())
}

fn gbps(bytes: usize, since: Instant) -> f64 {
    bytes as f64 / since.elapsed().as_secs_f64() / 1e9
}

/// The middle value of `v` (the upper one of an even count), sorting `v`.
pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
